//! Hook events: `daemon.exec` is run as `exec EVENT RESOURCE [ARGS…]` (the HAST convention)
//! for `role`, `connect`, `disconnect`, `syncstart`, `syncdone`, `syncintr`, `split-brain` and
//! `verify` (its argument: the number of extents that differ).
//!
//! Hooks run asynchronously with stdin from /dev/null; the daemon never waits for them. Each
//! gets a watcher thread that logs its exit status and warns once if it runs longer than
//! `SLOW_HOOK`.

use std::process::{Command, Stdio};
use std::sync::{Arc, RwLock};
use std::thread;
use std::time::{Duration, Instant};

const SLOW_HOOK: Duration = Duration::from_secs(30);

/// The hook events, with their HAST names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Role,
    Connect,
    Disconnect,
    SyncStart,
    SyncDone,
    SyncIntr,
    SplitBrain,
    /// An online verify finished; argument: how many extents differ.
    Verify,
    /// The primary's local disk failed; it serves from the peer (diskless).
    DiskFailed,
}

impl Event {
    pub fn name(self) -> &'static str {
        match self {
            Event::Role => "role",
            Event::Connect => "connect",
            Event::Disconnect => "disconnect",
            Event::SyncStart => "syncstart",
            Event::SyncDone => "syncdone",
            Event::SyncIntr => "syncintr",
            Event::SplitBrain => "split-brain",
            Event::Verify => "verify",
            Event::DiskFailed => "disk-failed",
        }
    }
}

/// The configured hook program; shared so a reload can change it under running resources.
/// `env`: variables every hook gets (TANDEM_CONFIG, TANDEM_NODE), so a hook can call tandem
/// with the daemon's own configuration.
#[derive(Clone, Default)]
pub struct Hooks(Arc<RwLock<Option<String>>>, Arc<Vec<(String, String)>>);

impl Hooks {
    pub fn new(exec: Option<String>) -> Hooks {
        Hooks(
            Arc::new(RwLock::new(exec.filter(|e| !e.is_empty()))),
            Arc::default(),
        )
    }

    /// Give every hook these environment variables.
    pub fn with_env(mut self, env: Vec<(String, String)>) -> Hooks {
        self.1 = Arc::new(env);
        self
    }

    pub fn set(&self, exec: Option<String>) {
        if let Ok(mut g) = self.0.write() {
            *g = exec.filter(|e| !e.is_empty());
        }
    }

    /// Start the hook for `event` on `resource` and return at once.
    pub fn fire(&self, event: Event, resource: &str, args: &[&str]) {
        log::info!(
            "{resource}: event {}{}{}",
            event.name(),
            if args.is_empty() { "" } else { " " },
            args.join(" ")
        );
        let exec = match self.0.read() {
            Ok(g) => g.clone(),
            Err(_) => None,
        };
        let Some(exec) = exec else { return };
        let mut cmd = Command::new(&exec);
        cmd.arg(event.name()).arg(resource).args(args);
        cmd.envs(self.1.iter().map(|(k, v)| (k, v)));
        cmd.stdin(Stdio::null());
        let desc = format!("{exec} {} {resource} {}", event.name(), args.join(" "));
        let desc = desc.trim_end().to_string();
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                log::error!("{resource}: hook `{desc}` could not start: {e}");
                return;
            }
        };
        let spawned = thread::Builder::new().name("hook".into()).spawn(move || {
            let start = Instant::now();
            let mut warned = false;
            loop {
                match child.try_wait() {
                    Ok(Some(status)) if status.success() => {
                        log::info!("hook `{desc}` finished: {status}");
                        return;
                    }
                    Ok(Some(status)) => {
                        log::warn!("hook `{desc}` failed: {status}");
                        return;
                    }
                    Ok(None) => {}
                    Err(e) => {
                        log::error!("hook `{desc}`: wait: {e}");
                        return;
                    }
                }
                if !warned && start.elapsed() > SLOW_HOOK {
                    log::warn!(
                        "hook `{desc}` still running after {} s",
                        SLOW_HOOK.as_secs()
                    );
                    warned = true;
                }
                thread::sleep(Duration::from_millis(100));
            }
        });
        if let Err(e) = spawned {
            log::error!("hook watcher thread: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hook_gets_event_resource_and_args() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let script = dir.path().join("hook.sh");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\necho \"$@\" \"$TANDEM_CONFIG\" \"$TANDEM_NODE\" >> {}\n",
                out.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let hooks = Hooks::new(Some(script.display().to_string())).with_env(vec![
            ("TANDEM_CONFIG".into(), "/etc/t.toml".into()),
            ("TANDEM_NODE".into(), "n1".into()),
        ]);
        hooks.fire(Event::SplitBrain, "r0", &["x"]);
        for _ in 0..100 {
            if std::fs::read_to_string(&out)
                .map(|s| s.contains('\n'))
                .unwrap_or(false)
            {
                break;
            }
            thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(
            std::fs::read_to_string(&out).unwrap(),
            "split-brain r0 x /etc/t.toml n1\n"
        );
    }
}
