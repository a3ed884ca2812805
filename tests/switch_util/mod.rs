//! Shared by the tests/switch_*.rs integration tests: a temp dir with a config, the fakes of
//! tests/fakes first in PATH, and a way to run the built `tandem` binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub const BIN: &str = env!("CARGO_BIN_EXE_tandem");

pub struct Env {
    pub dir: tempfile::TempDir,
}

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for Run {
    fn from(o: Output) -> Run {
        Run {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

impl Env {
    pub fn new() -> Env {
        let dir = tempfile::Builder::new()
            .prefix("tandem-switch-")
            .tempdir()
            .expect("tempdir");
        std::fs::create_dir_all(dir.path().join("state")).unwrap();
        Env { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Where the fakes keep their state ($TANDEM_FAKE_STATE).
    pub fn state(&self) -> PathBuf {
        self.path().join("state")
    }

    pub fn config(&self) -> PathBuf {
        self.path().join("tandem.toml")
    }

    /// Write the config; `@DIR@` stands for the temp dir, `@STATE@` for the fakes' state.
    pub fn write_config(&self, text: &str) {
        let t = text
            .replace("@DIR@", &self.path().display().to_string())
            .replace("@STATE@", &self.state().display().to_string());
        std::fs::write(self.config(), t).unwrap();
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let fakes = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fakes");
        let path = format!(
            "{}:{}",
            fakes.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut c = Command::new(BIN);
        c.arg("-c")
            .arg(self.config())
            .args(args)
            .env("PATH", path)
            .env("TANDEM_FAKE_STATE", self.state())
            .env_remove("TANDEM_NODE")
            .env_remove("TANDEM_CONFIG");
        c
    }

    pub fn run(&self, args: &[&str]) -> Run {
        self.command(args).output().expect("run tandem").into()
    }

    /// The calls the fakes logged.
    pub fn calls(&self) -> String {
        std::fs::read_to_string(self.state().join("calls")).unwrap_or_default()
    }

    pub fn clear_calls(&self) {
        let _ = std::fs::remove_file(self.state().join("calls"));
    }

    /// Set a fake's state file, e.g. `set("hast/hast0/role", "secondary")`.
    pub fn set(&self, rel: &str, value: &str) {
        let p = self.state().join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, format!("{value}\n")).unwrap();
    }

    pub fn get(&self, rel: &str) -> Option<String> {
        std::fs::read_to_string(self.state().join(rel))
            .ok()
            .map(|s| s.trim().to_string())
    }

    pub fn exists(&self, rel: &str) -> bool {
        self.state().join(rel).exists()
    }

    pub fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.path().join(rel)).unwrap_or_default()
    }
}

/// A `manager = "command"` service that logs start/stop to @DIR@/events.
pub const EVENT_SERVICE: &str = r#"
[[service]]
name = "share"
manager = "command"
start = "echo start >> @DIR@/events; touch @DIR@/share.running"
stop = "echo stop >> @DIR@/events; rm -f @DIR@/share.running"
status = "test -f @DIR@/share.running"
"#;

/// Are we root, with these tools? Prints why not.
pub fn root_with(tools: &[&str]) -> bool {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root");
        return false;
    }
    for t in tools {
        let found = std::env::var("PATH")
            .unwrap_or_default()
            .split(':')
            .chain(["/sbin", "/usr/sbin"])
            .any(|d| Path::new(d).join(t).exists());
        if !found {
            eprintln!("skipped: {t} is not installed");
            return false;
        }
    }
    true
}

/// A tiny xorshift: no rand crate needed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// What a flapping run ended with.
pub struct Flapping {
    /// The word of the newest event (sequence number threads × per_thread).
    pub last_word: &'static str,
}

/// `threads` threads each run `per_thread` `tandem switch master|slave` processes, at random,
/// while a watcher samples `is_up()`. Asserts: every switch exits 0 or 75; the newest event
/// is applied (exit 0); whenever the sequence file shows the last applied event was slave
/// and nothing running (unchanged before and after sampling), `is_up()` is false.
pub fn flap(
    env: &Env,
    threads: u64,
    per_thread: u64,
    is_up: impl Fn() -> bool + Send + 'static,
) -> Flapping {
    let seq_file = env.path().join("switch.lock.seq");
    let stop = Arc::new(AtomicBool::new(false));
    let violations = Arc::new(Mutex::new(Vec::<String>::new()));
    let watcher = {
        let (stop, violations) = (stop.clone(), violations.clone());
        std::thread::spawn(move || {
            let mut samples = 0u32;
            while !stop.load(Ordering::Relaxed) && samples < 200_000 {
                samples += 1;
                let before = std::fs::read_to_string(&seq_file).unwrap_or_default();
                let up = is_up();
                let after = std::fs::read_to_string(&seq_file).unwrap_or_default();
                let last = before
                    .lines()
                    .find(|l| l.starts_with("last "))
                    .unwrap_or("");
                if before == after && last.ends_with(" slave done") && up {
                    violations.lock().unwrap().push(last.to_string());
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            samples
        })
    };

    let results = Arc::new(Mutex::new(Vec::<(u64, &'static str, i32)>::new()));
    let seed = std::process::id() as u64 ^ 0x9e37_79b9_7f4a_7c15;
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let results = results.clone();
            let mut cmds: Vec<(Command, &'static str)> = Vec::new();
            let mut rng = Rng(seed.wrapping_add(t * 7919) | 1);
            for _ in 0..per_thread {
                let word = if rng.next() % 2 == 0 {
                    "master"
                } else {
                    "slave"
                };
                cmds.push((env.command(&["switch", word]), word));
            }
            let pauses: Vec<u64> = (0..per_thread).map(|_| rng.next() % 30).collect();
            std::thread::spawn(move || {
                for ((mut cmd, word), pause) in cmds.into_iter().zip(pauses) {
                    std::thread::sleep(Duration::from_millis(pause));
                    let out = cmd.output().unwrap();
                    let stderr = String::from_utf8_lossy(&out.stderr);
                    let seq = stderr
                        .split("event #")
                        .nth(1)
                        .and_then(|r| r.split(':').next())
                        .and_then(|n| n.parse::<u64>().ok())
                        .unwrap_or_else(|| panic!("no event number in {stderr}"));
                    let code = out.status.code().unwrap_or(-1);
                    assert!(
                        code == 0 || code == 75,
                        "switch {word} exited {code}: {stderr}"
                    );
                    results.lock().unwrap().push((seq, word, code));
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let samples = watcher.join().unwrap();

    let results = results.lock().unwrap();
    let total = threads * per_thread;
    assert_eq!(results.len() as u64, total);
    let &(last_seq, last_word, last_code) = results.iter().max_by_key(|r| r.0).unwrap();
    assert_eq!(last_seq, total);
    assert_eq!(last_code, 0, "the newest event must be applied");
    let applied = results.iter().filter(|r| r.2 == 0).count();
    eprintln!(
        "{applied} of {total} events applied, the others superseded; \
         last: #{last_seq} {last_word}; {samples} samples"
    );
    let v = violations.lock().unwrap();
    assert!(
        v.is_empty(),
        "up while the last applied event was slave: {v:?}"
    );
    Flapping { last_word }
}
