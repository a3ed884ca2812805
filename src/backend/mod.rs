//! Replication backends behind one trait: tandem, hast, drbd, none.
//!
//! The switch logic (src/switch) only talks to `Backend`: it asks for the state, and asks the
//! backend to become primary or secondary. A backend owns everything about its replication:
//! the waiting for the peer to step down, the refusal to promote stale or split-brain data,
//! the exact commands or control-socket requests. It does not mount, fsck or start services.

mod drbd;
mod hast;
mod none;
mod tandem;

use std::time::Duration;

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::config::{BackendKind, Config, Resource};

/// The replication role of this node for a resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Init,
    Primary,
    Secondary,
    Unknown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Connection {
    #[serde(rename = "connected")]
    Connected,
    #[serde(rename = "connecting")]
    Connecting,
    #[serde(rename = "disconnected")]
    Disconnected,
    #[serde(rename = "n/a")]
    NotApplicable,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SyncState {
    #[serde(rename = "complete")]
    Complete,
    #[serde(rename = "degraded")]
    Degraded,
    #[serde(rename = "syncing")]
    Syncing,
    #[serde(rename = "split-brain")]
    SplitBrain,
    /// The local disk failed and was detached (tandem: served from the peer while primary;
    /// DRBD: disk state Diskless).
    #[serde(rename = "diskless")]
    Diskless,
    #[serde(rename = "n/a")]
    NotApplicable,
}

macro_rules! display_as_serde {
    ($t:ty) => {
        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                let v = serde_json::to_value(self).map_err(|_| std::fmt::Error)?;
                f.write_str(v.as_str().unwrap_or("?"))
            }
        }
    };
}
display_as_serde!(Role);
display_as_serde!(Connection);
display_as_serde!(SyncState);

/// What a backend knows about one resource on this node.
#[derive(Debug, Clone, PartialEq)]
pub struct BackendStatus {
    pub role: Role,
    pub connection: Connection,
    pub state: SyncState,
    /// Bytes this node still has to send to (or receive from) the peer; None: not known.
    pub dirty_bytes: Option<u64>,
    /// 0.0 ..= 1.0 while syncing; None: not known.
    pub sync_progress: Option<f64>,
    /// Backend-specific detail, added to `status --json` as is (tandem: counters, sync rate,
    /// generations).
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl BackendStatus {
    /// The state of a resource without replication.
    pub fn not_replicated() -> BackendStatus {
        BackendStatus {
            role: Role::Unknown,
            connection: Connection::NotApplicable,
            state: SyncState::NotApplicable,
            dirty_bytes: None,
            sync_progress: None,
            extra: serde_json::Map::new(),
        }
    }
}

/// The bounds and permissions of one role change.
#[derive(Debug, Clone, Copy)]
pub struct RoleCtx {
    /// How long `promote` may wait for the peer to give up primary.
    pub role_timeout: Duration,
    /// Bound for each command or control request.
    pub command_timeout: Duration,
    /// Promote even stale or split-brain data.
    pub force: bool,
}

/// A replication backend, as the switch sees it.
///
/// Errors: wrap the cause in `exit::Refused` when the change is refused for safety (stale
/// data, split-brain, the peer still primary after `role_timeout`): the switch then exits 3.
/// Any other error is a failure (exit 1, after rollback). Both must be cheap to call again:
/// the switch skips `promote` when `status()` already says primary, and rolls back with
/// `demote`.
pub trait Backend: Send + Sync {
    /// False for `none`: no role to change, `status().role` means nothing.
    fn has_roles(&self) -> bool {
        true
    }
    /// The current state, asked from the tool or daemon.
    fn status(&self) -> Result<BackendStatus>;
    /// Become primary: wait (bounded by `ctx.role_timeout`) for the peer to step down, refuse
    /// stale or split-brain data unless `ctx.force`, then change the role.
    fn promote(&self, ctx: &RoleCtx) -> Result<()>;
    /// Become secondary.
    fn demote(&self, ctx: &RoleCtx) -> Result<()>;
    /// What `promote` would do, one command line or action per line (for `--dry-run`).
    fn promote_plan(&self, ctx: &RoleCtx) -> Vec<String>;
    /// What `demote` would do.
    fn demote_plan(&self, ctx: &RoleCtx) -> Vec<String>;
}

/// The backend of `res`.
pub fn for_resource(cfg: &Config, res: &Resource) -> Box<dyn Backend> {
    match res.backend {
        BackendKind::None => Box::new(none::NoneBackend),
        BackendKind::Hast => Box::new(hast::Hast::new(&res.name)),
        BackendKind::Drbd => Box::new(drbd::Drbd::new(&res.name)),
        BackendKind::Tandem => Box::new(tandem::Tandem::new(cfg, res)),
    }
}

/// Poll `ready` until it says yes or `timeout` passes; true if it became ready.
pub(crate) fn wait_until(
    timeout: Duration,
    mut ready: impl FnMut() -> Result<bool>,
) -> Result<bool> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if ready()? {
            return Ok(true);
        }
        if std::time::Instant::now() >= deadline {
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
