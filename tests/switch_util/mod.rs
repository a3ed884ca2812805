//! Shared by the tests/switch_*.rs integration tests: a temp dir with a config, the fakes of
//! tests/fakes first in PATH, and a way to run the built `tandem` binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

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
