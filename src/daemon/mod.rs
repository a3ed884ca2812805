//! The replication daemon (backend `tandem`).

pub mod activemap;
pub mod metadata;

use std::path::PathBuf;

use crate::config::Config;

pub fn run(_cfg: Config, _config_path: PathBuf) -> anyhow::Result<()> {
    anyhow::bail!("daemon: not implemented yet")
}
