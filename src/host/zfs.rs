//! ZFS pools: imported on the primary instead of mounted, exported before demoting.

use std::path::Path;
use std::time::Duration;

use anyhow::Result;

use super::cmd::Cmd;

/// `zpool import -o cachefile=none -d DEVICE -f POOL`. -f: the pool was last imported by the
/// peer. -d: without it zpool scans every disk, and the local backing disk under the
/// replicated `device` carries the same labels; importing from it would bypass replication
/// and silently diverge the replicas. Given a device (not a directory), -d probes that one
/// path only (OpenZFS 0.8 and later). cachefile=none: the pool never enters zpool.cache, so
/// a reboot does not import it behind tandem's back; the property is not kept on disk, so
/// it is given at every import.
pub fn import_cmd(pool: &str, device: &Path, timeout: Duration) -> Cmd {
    Cmd::new("zpool", &["import", "-o", "cachefile=none", "-d"])
        .arg(device.display().to_string())
        .arg("-f")
        .arg(pool)
        .timeout(Some(timeout))
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
