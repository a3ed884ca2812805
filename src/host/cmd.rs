//! The one way tandem runs an external program: stdin from /dev/null, stdout and stderr
//! captured, bounded by a timeout, the exit status checked. Errors name the command line,
//! its exit status and the tail of its stderr.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// How much of stdout/stderr is kept (the tail).
const KEEP_OUTPUT: u64 = 16 * 1024;

/// An external command, built, shown (`--dry-run`, errors) and run in one place.
#[derive(Debug, Clone)]
pub struct Cmd {
    pub program: String,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// None: no bound (fsck can take as long as it takes).
    pub timeout: Option<Duration>,
}

/// What a finished command produced.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// The exit code, or 128+signal for a command killed by a signal.
    pub fn code(&self) -> i32 {
        self.status
            .code()
            .unwrap_or_else(|| 128 + self.status.signal().unwrap_or(0))
    }
}

/// A command that ran but did not succeed; the error text has everything an admin needs.
#[derive(Debug)]
pub struct CmdFailed {
    pub line: String,
    pub code: i32,
    pub stderr: String,
}

impl std::fmt::Display for CmdFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "`{}` exited with status {}", self.line, self.code)?;
        let err = self.stderr.trim();
        if !err.is_empty() {
            write!(f, ": {}", err.replace('\n', " | "))?;
        }
        Ok(())
    }
}

impl std::error::Error for CmdFailed {}

impl Cmd {
    pub fn new(program: &str, args: &[&str]) -> Cmd {
        Cmd {
            program: program.to_string(),
            args: args.iter().map(|s| s.to_string()).collect(),
            env: Vec::new(),
            timeout: Some(Duration::from_secs(60)),
        }
    }

    /// `sh -c SCRIPT`, for the commands the admin writes in the config.
    pub fn shell(script: &str) -> Cmd {
        Cmd::new("/bin/sh", &["-c", script])
    }

    pub fn arg(mut self, a: impl Into<String>) -> Cmd {
        self.args.push(a.into());
        self
    }

    pub fn env(mut self, k: &str, v: impl Into<String>) -> Cmd {
        self.env.push((k.to_string(), v.into()));
        self
    }

    pub fn timeout(mut self, t: Option<Duration>) -> Cmd {
        self.timeout = t;
        self
    }

    /// The command as a shell would read it (what `--dry-run` prints).
    pub fn line(&self) -> String {
        if self.program == "/bin/sh" && self.args.len() == 2 && self.args[0] == "-c" {
            return self.args[1].clone();
        }
        std::iter::once(self.program.as_str())
            .chain(self.args.iter().map(String::as_str))
            .map(quote)
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Run and return the output whatever the exit status; errors only when it could not be
    /// started or ran out of time (then it is killed, with its process group).
    pub fn output(&self) -> Result<Output> {
        let line = self.line();
        let out_file = scratch_file().with_context(|| format!("`{line}`: scratch file"))?;
        let err_file = scratch_file().with_context(|| format!("`{line}`: scratch file"))?;
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args)
            .stdin(Stdio::null())
            // Files, not pipes: a service start command that leaves a daemon behind would
            // hold a pipe open forever.
            .stdout(out_file.try_clone()?)
            .stderr(err_file.try_clone()?)
            .process_group(0);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().map_err(|e| {
            anyhow::Error::new(CmdFailed {
                line: line.clone(),
                code: 127,
                stderr: format!("cannot run {}: {e}", self.program),
            })
        })?;
        let start = Instant::now();
        let mut pause = Duration::from_millis(1);
        let status = loop {
            if let Some(st) = child.try_wait()? {
                break st;
            }
            if let Some(t) = self.timeout {
                if start.elapsed() >= t {
                    let pgid = nix::unistd::Pid::from_raw(-(child.id() as i32));
                    let _ = nix::sys::signal::kill(pgid, nix::sys::signal::Signal::SIGKILL);
                    let _ = child.wait();
                    let stderr = tail(err_file).unwrap_or_default();
                    anyhow::bail!(CmdFailed {
                        line,
                        code: 137,
                        stderr: format!(
                            "timed out after {}, killed{}{}",
                            crate::config::format_duration(t),
                            if stderr.trim().is_empty() {
                                ""
                            } else {
                                "; stderr: "
                            },
                            stderr.trim()
                        ),
                    });
                }
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(50));
        };
        Ok(Output {
            status,
            stdout: tail(out_file)?,
            stderr: tail(err_file)?,
        })
    }

    /// Run and fail unless the exit status is 0.
    pub fn run(&self) -> Result<Output> {
        self.run_ok(|code| code == 0)
    }

    /// Run and fail unless `ok(exit code)`.
    pub fn run_ok(&self, ok: impl Fn(i32) -> bool) -> Result<Output> {
        let out = self.output()?;
        if ok(out.code()) {
            Ok(out)
        } else {
            Err(CmdFailed {
                line: self.line(),
                code: out.code(),
                stderr: if out.stderr.trim().is_empty() {
                    out.stdout.clone()
                } else {
                    out.stderr.clone()
                },
            }
            .into())
        }
    }
}

/// Quote a word for a POSIX shell when it needs it.
pub fn quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:@,+%".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// An unlinked temporary file (portable: no O_TMPFILE on FreeBSD).
fn scratch_file() -> std::io::Result<File> {
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir();
    for _ in 0..100 {
        let path: PathBuf = dir.join(format!(
            ".tandem-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(f) => {
                let _ = std::fs::remove_file(&path);
                return Ok(f);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::other("no free scratch file name"))
}

fn tail(mut f: File) -> std::io::Result<String> {
    let len = f.seek(SeekFrom::End(0))?;
    f.seek(SeekFrom::Start(len.saturating_sub(KEEP_OUTPUT)))?;
    let mut buf = Vec::new();
    f.take(KEEP_OUTPUT).read_to_end(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_and_stderr_in_error() {
        let e = Cmd::shell("echo boom >&2; exit 4").run().unwrap_err();
        let f = e.downcast_ref::<CmdFailed>().unwrap();
        assert_eq!(f.code, 4);
        assert_eq!(
            format!("{e}"),
            "`echo boom >&2; exit 4` exited with status 4: boom"
        );
    }

    #[test]
    fn timeout_kills() {
        let e = Cmd::shell("sleep 5")
            .timeout(Some(Duration::from_millis(100)))
            .run()
            .unwrap_err();
        assert!(format!("{e}").contains("timed out after 100ms"), "{e}");
    }

    #[test]
    fn background_child_does_not_block() {
        // With pipes this would block until the background sleep ends.
        let out = Cmd::shell("sleep 3 & echo started").run().unwrap();
        assert_eq!(out.stdout.trim(), "started");
    }

    #[test]
    fn quoting() {
        let c = Cmd::new("mount", &["-o", "a b", "/dev/x"]);
        assert_eq!(c.line(), "mount -o 'a b' /dev/x");
        assert_eq!(quote("it's"), "'it'\\''s'");
    }

    #[test]
    fn missing_program() {
        let e = Cmd::new("/nonexistent/prog", &[]).run().unwrap_err();
        assert!(format!("{e}").contains("status 127"), "{e}");
    }
}
