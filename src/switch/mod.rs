//! The switch: promote and demote as plans of steps, the lock, newest-event-wins.

use anyhow::Result;

use crate::StepOpts;
use crate::config::Config;

pub fn cmd_switch(_cfg: &Config, _event: &[String], _opts: StepOpts) -> Result<()> {
    anyhow::bail!("switch: not implemented yet")
}

pub fn cmd_promote(_cfg: &Config, _resources: &[String], _opts: StepOpts) -> Result<()> {
    anyhow::bail!("promote: not implemented yet")
}

pub fn cmd_demote(_cfg: &Config, _resources: &[String], _opts: StepOpts) -> Result<()> {
    anyhow::bail!("demote: not implemented yet")
}
