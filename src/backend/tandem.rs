//! Backend `tandem`: role changes and state through the replication daemon's control socket.
//!
//! Stub: the daemon client is filled in with the daemon. `promote` must map the daemon's
//! refusals (stale data, split-brain, peer still primary after `role_timeout`) to
//! `exit::Refused`; `status` feeds `tandem status`.

use std::path::PathBuf;

use anyhow::Result;

use super::{Backend, BackendStatus, RoleCtx};
use crate::config::{Config, Resource};

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

    fn not_wired(&self) -> anyhow::Error {
        anyhow::anyhow!("backend tandem: the daemon client is not wired yet")
    }
}

impl Backend for Tandem {
    fn status(&self) -> Result<BackendStatus> {
        Err(self.not_wired())
    }
    fn promote(&self, _: &RoleCtx) -> Result<()> {
        Err(self.not_wired())
    }
    fn demote(&self, _: &RoleCtx) -> Result<()> {
        Err(self.not_wired())
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
