//! Backend `tandem`: role changes and state through the replication daemon's control socket.
//!
//! The daemon decides what is safe: it refuses `role primary` on stale or split-brain data and
//! while the peer is primary. This backend maps those refusals to `exit::Refused`, and retries
//! "peer still primary" until `role_timeout`, which is how a failover waits for the old
//! primary to step down.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::{Backend, BackendStatus, Connection, Role, RoleCtx, SyncState};
use crate::config::{Config, Resource};
use crate::daemon::Role as DaemonRole;
use crate::daemon::control::{self, ErrorKind, Request, ResourceStatus};
use crate::exit::Refused;

/// Pause between two `role primary` attempts while the peer is still primary.
const RETRY: Duration = Duration::from_millis(250);

pub struct Tandem {
    name: String,
    control: PathBuf,
}

impl Tandem {
    pub fn new(cfg: &Config, res: &Resource) -> Tandem {
        Tandem {
            name: res.name.clone(),
            control: cfg.daemon.control.clone(),
        }
    }

    /// The daemon's view of this resource.
    pub fn daemon_status(&self, timeout: Duration) -> Result<ResourceStatus> {
        let req = Request::Status {
            resources: vec![self.name.clone()],
        };
        let resp = control::request(&self.control, &req, timeout)?;
        if let Some(e) = resp.error {
            return Err(control::exit_error(e));
        }
        resp.resources
            .into_iter()
            .find(|r| r.name == self.name)
            .with_context(|| format!("the daemon does not know resource {:?}", self.name))
    }

    fn set_role(&self, role: DaemonRole, ctx: &RoleCtx) -> Result<(), control::ControlError> {
        let req = Request::Role {
            role,
            resources: vec![self.name.clone()],
            force: ctx.force,
        };
        // A demote waits for in-flight writes and a promote probes the peer: give the daemon
        // the longer of the two bounds.
        let timeout = ctx.command_timeout.max(ctx.role_timeout);
        match control::request(&self.control, &req, timeout) {
            Ok(resp) => match resp.error {
                Some(e) => Err(e),
                None => Ok(()),
            },
            Err(e) => Err(control::ControlError {
                kind: ErrorKind::Failed,
                message: format!("{e:#}"),
            }),
        }
    }
}

/// A role, connection or state name from the daemon, parsed with the names the CLI prints
/// (the daemon builds them from the same enums). A name this binary does not know comes only
/// from a daemon of another version; it is logged and read as `unknown`, the caller's
/// fallback (role unknown, disconnected, degraded).
fn wire<T>(res: &str, what: &str, name: &str, unknown: T) -> T
where
    T: serde::de::DeserializeOwned + std::fmt::Display,
{
    match serde_json::from_value(serde_json::Value::String(name.to_string())) {
        Ok(v) => v,
        Err(_) => {
            log::warn!(
                "{res}: the daemon reports {what} {name:?}, which this tandem does not know \
                 (daemon of another version?); read as {what} {unknown}"
            );
            unknown
        }
    }
}

impl Backend for Tandem {
    fn status(&self) -> Result<BackendStatus> {
        let s = self.daemon_status(Duration::from_secs(10))?;
        let role = wire(&self.name, "role", &s.role, Role::Unknown);
        let connection = wire(
            &self.name,
            "connection",
            &s.connection,
            Connection::Disconnected,
        );
        let state = wire(&self.name, "state", &s.state, SyncState::Degraded);
        let mut extra = serde_json::to_value(&s)
            .ok()
            .and_then(|v| v.as_object().cloned())
            .unwrap_or_default();
        // These are the common fields of every backend; the rest is tandem's own detail.
        for k in [
            "name",
            "role",
            "connection",
            "state",
            "dirty_bytes",
            "sync_progress",
        ] {
            extra.remove(k);
        }
        Ok(BackendStatus {
            role,
            connection,
            state,
            dirty_bytes: Some(s.dirty_bytes),
            sync_progress: Some(s.sync_progress),
            extra,
        })
    }

    fn promote(&self, ctx: &RoleCtx) -> Result<()> {
        let deadline = Instant::now() + ctx.role_timeout;
        let mut waited = false;
        loop {
            match self.set_role(DaemonRole::Primary, ctx) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind == ErrorKind::PeerPrimary => {
                    if Instant::now() >= deadline {
                        return Err(Refused(format!(
                            "{}: the peer is still primary after role_timeout {}: {}",
                            self.name,
                            crate::config::format_duration(ctx.role_timeout),
                            e.message
                        ))
                        .into());
                    }
                    if !waited {
                        log::info!("{}: waiting for the peer to give up primary", self.name);
                        waited = true;
                    }
                    std::thread::sleep(RETRY);
                }
                Err(e) => return Err(control::exit_error(e)),
            }
        }
    }

    fn demote(&self, ctx: &RoleCtx) -> Result<()> {
        self.set_role(DaemonRole::Secondary, ctx)
            .map_err(control::exit_error)
    }

    fn promote_plan(&self, ctx: &RoleCtx) -> Vec<String> {
        vec![format!(
            "tandem role primary {}{}    # through {}, waits up to {} for the peer",
            self.name,
            if ctx.force { " --force" } else { "" },
            self.control.display(),
            crate::config::format_duration(ctx.role_timeout)
        )]
    }

    fn demote_plan(&self, _: &RoleCtx) -> Vec<String> {
        vec![format!(
            "tandem role secondary {}    # through {}",
            self.name,
            self.control.display()
        )]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_the_daemon_prints_reads_back_as_itself() {
        for s in [
            SyncState::Complete,
            SyncState::Degraded,
            SyncState::Syncing,
            SyncState::SplitBrain,
            SyncState::Diskless,
        ] {
            assert_eq!(
                wire("r0", "state", &s.to_string(), SyncState::NotApplicable),
                s
            );
        }
        for c in [
            Connection::Connected,
            Connection::Connecting,
            Connection::Disconnected,
        ] {
            assert_eq!(
                wire(
                    "r0",
                    "connection",
                    &c.to_string(),
                    Connection::NotApplicable
                ),
                c
            );
        }
        for r in [DaemonRole::Init, DaemonRole::Primary, DaemonRole::Secondary] {
            assert_ne!(wire("r0", "role", r.name(), Role::Unknown), Role::Unknown);
        }
    }

    #[test]
    fn a_name_from_another_version_is_not_a_known_state() {
        assert_eq!(
            wire("r0", "state", "resyncing-backwards", SyncState::Degraded),
            SyncState::Degraded
        );
        assert_eq!(wire("r0", "role", "Primary", Role::Unknown), Role::Unknown);
    }
}
