//! Backend `none`: a plain device (a shared disk, a local disk); no replication, no role.

use anyhow::Result;

use super::{Backend, BackendStatus, RoleCtx};

pub struct NoneBackend;

impl Backend for NoneBackend {
    fn has_roles(&self) -> bool {
        false
    }
    fn status(&self) -> Result<BackendStatus> {
        Ok(BackendStatus::not_replicated())
    }
    fn promote(&self, _: &RoleCtx) -> Result<()> {
        Ok(())
    }
    fn demote(&self, _: &RoleCtx) -> Result<()> {
        Ok(())
    }
    fn promote_plan(&self, _: &RoleCtx) -> Vec<String> {
        Vec::new()
    }
    fn demote_plan(&self, _: &RoleCtx) -> Vec<String> {
        Vec::new()
    }
}
