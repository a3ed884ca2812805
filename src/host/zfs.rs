//! ZFS pools: imported on the primary instead of mounted, exported before demoting.

use std::time::Duration;

use anyhow::Result;

use super::cmd::Cmd;

/// `zpool import -f POOL`: -f because the pool was last imported by the peer.
pub fn import_cmd(pool: &str, timeout: Duration) -> Cmd {
    Cmd::new("zpool", &["import", "-f", pool]).timeout(Some(timeout))
}

pub fn export_cmd(pool: &str, timeout: Duration) -> Cmd {
    Cmd::new("zpool", &["export", pool]).timeout(Some(timeout))
}

/// Is the pool imported here?
pub fn imported(pool: &str, timeout: Duration) -> Result<bool> {
    let out = Cmd::new("zpool", &["list", "-H", "-o", "name", pool])
        .timeout(Some(timeout))
        .output()?;
    Ok(out.status.success() && out.stdout.lines().any(|l| l.trim() == pool))
}
