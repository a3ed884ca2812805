//! `tandem status`: what each resource, its device, its mount and the services look like.

use anyhow::Result;

use crate::config::Config;

pub fn cmd_status(_cfg: &Config, _resources: &[String], _json: bool) -> Result<()> {
    anyhow::bail!("status: not implemented yet")
}
