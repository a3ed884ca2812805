//! The switch: promote and demote as plans of steps, the lock, newest-event-wins, rollback.
//!
//! `tandem switch EVENT…`, `tandem promote [RES…]` and `tandem demote [RES…]` all end here:
//! pick the resources, record the event, wait for the lock, build the plan, run it; a failed
//! promote is rolled back (a full demote of its resources) and `on_promote_failure` runs.

mod devwait;
mod event;
mod exec;
mod lock;
mod plan;

use std::time::{Duration, Instant};

use anyhow::Result;
use log::{error, info, warn};

use crate::StepOpts;
use crate::backend::RoleCtx;
use crate::config::{Config, Resource, format_duration};
use crate::exit::Superseded;
use crate::host::Cmd;

pub use event::Target;
pub use lock::read_state;
pub use plan::is_up;

pub fn cmd_switch(cfg: &Config, args: &[String], opts: StepOpts) -> Result<()> {
    let ev = event::parse(args)?;
    let resources: Vec<&Resource> = cfg.resources.iter().filter(|r| ev.matches(r)).collect();
    let what = format!("switch {}", args.join(" "));
    if resources.is_empty() {
        info!(
            "{what}: no resource has carp = {:?}; nothing to do",
            ev.carp.as_deref().unwrap_or("")
        );
        return Ok(());
    }
    act(cfg, ev.target, &resources, opts, cfg.switch.delay, &what)
}

pub fn cmd_promote(cfg: &Config, names: &[String], opts: StepOpts) -> Result<()> {
    let resources = cfg.select(names)?;
    act(
        cfg,
        Target::Master,
        &resources,
        opts,
        Duration::ZERO,
        "promote",
    )
}

pub fn cmd_demote(cfg: &Config, names: &[String], opts: StepOpts) -> Result<()> {
    let resources = cfg.select(names)?;
    act(
        cfg,
        Target::Slave,
        &resources,
        opts,
        Duration::ZERO,
        "demote",
    )
}

/// The longest a switch may wait for the one before it.
fn lock_timeout(cfg: &Config) -> Duration {
    let s = &cfg.switch;
    let commands = 3 * cfg.resources.len() as u32 + cfg.services.len() as u32 + 2;
    s.delay + s.role_timeout + s.device_timeout + s.stop_timeout + s.command_timeout * commands
}

fn act(
    cfg: &Config,
    target: Target,
    resources: &[&Resource],
    opts: StepOpts,
    delay: Duration,
    what: &str,
) -> Result<()> {
    let role = RoleCtx {
        role_timeout: cfg.switch.role_timeout,
        command_timeout: cfg.switch.command_timeout,
        force: opts.force,
    };
    if opts.dry_run {
        print_plan(cfg, target, resources, &role, delay);
        return Ok(());
    }
    let began = Instant::now();
    let names: Vec<String> = resources.iter().map(|r| r.name.clone()).collect();
    let word = match target {
        Target::Master => "master",
        Target::Slave => "slave",
    };
    let ticket = lock::record(&cfg.switch.lock, &names)?;
    info!(
        "event #{}: {what}: {} {}",
        ticket.seq,
        if target == Target::Master {
            "promote"
        } else {
            "demote"
        },
        names.join(", ")
    );
    let guard = lock::acquire(&cfg.switch.lock, &ticket, word, lock_timeout(cfg))?;
    let mut mine = guard.resources.clone();
    if mine.len() < names.len() {
        info!(
            "event #{}: newer events took over some resources; acting on {} only",
            ticket.seq,
            mine.join(", ")
        );
    }
    if !delay.is_zero() {
        info!(
            "event #{}: settle delay {}",
            ticket.seq,
            format_duration(delay)
        );
        std::thread::sleep(delay);
        mine = guard.recheck()?;
        if mine.is_empty() {
            return Err(Superseded(format!(
                "event #{} superseded during the settle delay: nothing done",
                ticket.seq
            ))
            .into());
        }
    }
    let resources: Vec<&Resource> = resources
        .iter()
        .copied()
        .filter(|r| mine.contains(&r.name))
        .collect();
    let start = Instant::now();
    let result = match target {
        Target::Master => promote(cfg, &resources, role),
        Target::Slave => {
            exec::Runner::new(cfg, role, "demote").demote(&plan::demote(cfg, &resources))
        }
    };
    if result.is_ok() {
        info!(
            "event #{}: {} {} done in {}",
            ticket.seq,
            if target == Target::Master {
                "promote"
            } else {
                "demote"
            },
            mine.join(", "),
            exec::took(start.elapsed())
        );
    }
    // For the daemon's metrics; the switch itself does not depend on it.
    if let Err(e) = lock::finish(
        &cfg.switch.lock,
        ticket.seq,
        word,
        result.is_ok(),
        began.elapsed(),
    ) {
        warn!("event #{}: recording its result: {e:#}", ticket.seq);
    }
    guard.done();
    result
}

/// The last switch event that ran to its end, for the daemon's metrics.
pub fn last_switch(lock: &std::path::Path) -> Option<crate::daemon::metrics::SwitchRecord> {
    let st = read_state(lock);
    let f = st.finished?;
    Some(crate::daemon::metrics::SwitchRecord {
        seq: f.seq,
        event: f.word,
        result: if f.ok { "ok" } else { "failed" }.into(),
        ended_unix: f.ended,
        seconds: f.seconds,
        running: st.last.is_some_and(|(_, _, running)| running),
    })
}

/// Promote; on failure roll back every resource of this switch and run on_promote_failure.
fn promote(cfg: &Config, resources: &[&Resource], role: RoleCtx) -> Result<()> {
    let steps = plan::promote(cfg, resources);
    let err = match exec::Runner::new(cfg, role, "promote").promote(&steps) {
        Ok(()) => return Ok(()),
        Err(e) => e,
    };
    error!("{err:#}");
    warn!("promote failed: rolling back (services stopped, unmounted, role secondary)");
    let rollback = exec::Runner::new(cfg, role, "rollback").demote(&plan::demote(cfg, resources));
    let failed = failed_resource(&err, resources);
    if let Some(hook) = &cfg.switch.on_promote_failure {
        let names: Vec<&str> = resources.iter().map(|r| r.name.as_str()).collect();
        let c = Cmd::shell(hook)
            .env("TANDEM_RESOURCE", failed.unwrap_or(""))
            .env("TANDEM_RESOURCES", names.join(" "))
            .timeout(Some(cfg.switch.command_timeout));
        let start = Instant::now();
        match c.run() {
            Ok(_) => info!(
                "on_promote_failure `{hook}` ok in {}",
                exec::took(start.elapsed())
            ),
            Err(e) => error!("on_promote_failure: {e:#}"),
        }
    }
    Err(match rollback {
        Ok(()) => err.context("promote failed and was rolled back"),
        Err(rb) => err.context(format!(
            "promote failed, and the rollback failed too ({rb:#})"
        )),
    })
}

fn failed_resource<'a>(err: &anyhow::Error, resources: &[&'a Resource]) -> Option<&'a str> {
    let text = format!("{err}");
    resources
        .iter()
        .find(|r| text.starts_with(&format!("promote {}:", r.name)))
        .map(|r| r.name.as_str())
}

/// `--dry-run`: every command line or action, one per line, shell comments for context.
fn print_plan(
    cfg: &Config,
    target: Target,
    resources: &[&Resource],
    role: &RoleCtx,
    delay: Duration,
) {
    let names: Vec<&str> = resources.iter().map(|r| r.name.as_str()).collect();
    let (verb, steps) = match target {
        Target::Master => ("promote", plan::promote(cfg, resources)),
        Target::Slave => ("demote", plan::demote(cfg, resources)),
    };
    println!("# {verb} {} on node {}", names.join(" "), cfg.node);
    println!(
        "# lock {} (wait up to {}; a newer event supersedes this one)",
        cfg.switch.lock.display(),
        format_duration(lock_timeout(cfg))
    );
    if !delay.is_zero() {
        println!("sleep {}", delay.as_secs_f64());
    }
    for step in &steps {
        for line in step.lines(cfg, role) {
            println!("{line}");
        }
    }
    if target == Target::Master {
        if let Some(h) = &cfg.switch.on_promote_failure {
            println!(
                "# on failure: roll back (demote {}), then: {h}",
                names.join(" ")
            );
        } else {
            println!("# on failure: roll back (demote {})", names.join(" "));
        }
    }
}
