//! The executor: runs a plan, skips what is already done, logs one line per step with its
//! duration, and stops (promote) or carries on with the other resources (demote) on failure.
//!
//! A promote runs each resource's steps (role, attach, device, fsck, mkdir, mount) in order,
//! but the resources side by side (up to `PARALLEL` at once), and starts each service as soon
//! as every resource of the plan it uses is mounted. A demote runs step by step.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use log::{debug, error, info};

use super::plan::{Step, hook_cmd, is_up, mount_cmd};
use crate::backend::{self, Backend, Role, RoleCtx};
use crate::config::{Config, Resource};
use crate::host::{fs, service, zfs};

pub struct Runner<'a> {
    cfg: &'a Config,
    role: RoleCtx,
    /// "promote", "demote" or "rollback": the first word of every log line.
    verb: &'static str,
    backends: BTreeMap<String, Box<dyn Backend>>,
    /// Resources that were primary before this run.
    already_primary: Mutex<BTreeSet<String>>,
    /// Resources that were mounted when the demote started.
    was_up: Mutex<BTreeSet<String>>,
}

/// Resources a promote brings up at once, at most (each runs its own fsck and mount).
pub const PARALLEL: usize = 4;

/// How one resource's chain of promote steps ended.
enum ChainEnd {
    Up,
    Failed(anyhow::Error),
    /// Not finished: another resource failed first.
    Stopped,
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// `12ms`, `1.52s`.
pub fn took(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{}ms", d.as_millis())
    } else {
        format!("{:.2}s", d.as_secs_f64())
    }
}

impl<'a> Runner<'a> {
    pub fn new(cfg: &'a Config, role: RoleCtx, verb: &'static str) -> Runner<'a> {
        let backends = cfg
            .resources
            .iter()
            .map(|r| (r.name.clone(), backend::for_resource(cfg, r)))
            .collect();
        Runner {
            cfg,
            role,
            verb,
            backends,
            already_primary: Mutex::default(),
            was_up: Mutex::default(),
        }
    }

    fn backend(&self, r: &Resource) -> Result<&dyn Backend> {
        self.backends
            .get(&r.name)
            .map(|b| b.as_ref())
            .with_context(|| format!("no backend for {}", r.name))
    }

    fn prefix(&self, step: &Step) -> String {
        match step.resource() {
            Some(r) => format!("{} {}", self.verb, r.name),
            None => self.verb.to_string(),
        }
    }

    /// Run a promote plan: each resource's steps in order, the resources in parallel (at most
    /// `PARALLEL` at once), each service once every resource of the plan it uses is up (in
    /// plan order among those ready together). On the first failure no further step starts;
    /// the steps already running finish, and that first failure is returned.
    pub fn promote(&self, steps: &[Step<'a>]) -> Result<()> {
        // The resources' step lists, in plan order, and the services.
        let mut chains: Vec<(&'a Resource, Vec<Step<'a>>)> = Vec::new();
        let mut services: Vec<Step<'a>> = Vec::new();
        for step in steps {
            match step.resource() {
                Some(r) => match chains.iter_mut().find(|(c, _)| c.name == r.name) {
                    Some((_, v)) => v.push(*step),
                    None => chains.push((r, vec![*step])),
                },
                None => services.push(*step),
            }
        }
        let needs = |svc: &Step<'a>| -> Vec<&str> {
            match svc {
                Step::StartService(s) => chains
                    .iter()
                    .filter(|(r, _)| s.uses(&r.name))
                    .map(|(r, _)| r.name.as_str())
                    .collect(),
                _ => chains.iter().map(|(r, _)| r.name.as_str()).collect(),
            }
        };
        let failed = AtomicBool::new(false);
        let next = AtomicUsize::new(0);
        let (tx, rx) = mpsc::channel::<(usize, ChainEnd)>();
        let workers = chains.len().clamp(1, PARALLEL);
        let mut first_err: Option<anyhow::Error> = None;
        std::thread::scope(|scope| {
            for _ in 0..workers {
                let (tx, chains, failed, next) = (tx.clone(), &chains, &failed, &next);
                scope.spawn(move || {
                    loop {
                        let i = next.fetch_add(1, Ordering::AcqRel);
                        let Some((_, chain)) = chains.get(i) else {
                            return;
                        };
                        let mut end = ChainEnd::Up;
                        for step in chain {
                            if failed.load(Ordering::Acquire) {
                                end = ChainEnd::Stopped;
                                break;
                            }
                            if let Err(e) = self.one(step) {
                                failed.store(true, Ordering::Release);
                                end = ChainEnd::Failed(e);
                                break;
                            }
                        }
                        if tx.send((i, end)).is_err() {
                            return;
                        }
                    }
                });
            }
            drop(tx);
            let mut up: BTreeSet<&str> = BTreeSet::new();
            let mut started = vec![false; services.len()];
            for (i, end) in rx.iter() {
                match end {
                    ChainEnd::Up => {
                        if let Some((r, _)) = chains.get(i) {
                            up.insert(r.name.as_str());
                        }
                    }
                    ChainEnd::Stopped => continue,
                    ChainEnd::Failed(e) => {
                        match &first_err {
                            None => first_err = Some(e),
                            // Reported here, as only the first goes back to the caller.
                            Some(_) => error!("{e:#}"),
                        }
                        continue;
                    }
                }
                if failed.load(Ordering::Acquire) {
                    continue;
                }
                for (k, svc) in services.iter().enumerate() {
                    if started[k] || !needs(svc).iter().all(|n| up.contains(n)) {
                        continue;
                    }
                    started[k] = true;
                    if let Err(e) = self.one(svc) {
                        failed.store(true, Ordering::Release);
                        first_err = Some(e);
                        break;
                    }
                }
            }
        });
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Run every step; a failing resource skips its remaining steps (never role secondary
    /// while still mounted), the others go on. All failures are reported.
    pub fn demote(&self, steps: &[Step<'a>]) -> Result<()> {
        let mut failed: BTreeSet<String> = BTreeSet::new();
        let mut errors: Vec<anyhow::Error> = Vec::new();
        for step in steps {
            if let Some(r) = step.resource() {
                if failed.contains(&r.name) {
                    info!(
                        "{}: {} not done: an earlier step failed",
                        self.prefix(step),
                        step.label()
                    );
                    continue;
                }
            }
            if let Err(e) = self.one(step) {
                error!("{e:#}");
                if let Some(r) = step.resource() {
                    failed.insert(r.name.clone());
                }
                errors.push(e);
            }
        }
        match errors.len() {
            0 => Ok(()),
            1 => Err(errors.remove(0)),
            n => {
                let first = errors.remove(0);
                Err(first.context(format!("{n} steps failed; the first")))
            }
        }
    }

    /// One step: skip it if its effect is already there, else run it, logging the outcome.
    fn one(&self, step: &Step<'a>) -> Result<()> {
        let prefix = self.prefix(step);
        let label = step.label();
        match self.skip_reason(step) {
            Ok(Some((reason, quiet))) => {
                if quiet {
                    debug!("{prefix}: {label} skipped: {reason}");
                } else {
                    info!("{prefix}: {label} skipped: {reason}");
                }
                return Ok(());
            }
            Ok(None) => {}
            Err(e) => debug!("{prefix}: {label}: cannot tell whether it is done ({e:#})"),
        }
        let start = Instant::now();
        match self.run(step) {
            Ok(()) => {
                info!("{prefix}: {label} ok in {}", took(start.elapsed()));
                Ok(())
            }
            Err(e) => Err(e.context(format!(
                "{prefix}: {label} failed after {}",
                took(start.elapsed())
            ))),
        }
    }

    /// Why this step need not run (and whether that is worth an info line).
    fn skip_reason(&self, step: &Step<'a>) -> Result<Option<(String, bool)>> {
        let t = self.cfg.switch.command_timeout;
        Ok(match *step {
            Step::Role(r, primary) => {
                let b = self.backend(r)?;
                if !b.has_roles() {
                    return Ok(Some((format!("backend {} has no role", r.backend), true)));
                }
                let role = b.status()?.role;
                match (primary, role) {
                    (true, Role::Primary) => {
                        locked(&self.already_primary).insert(r.name.clone());
                        Some(("already primary".into(), false))
                    }
                    (false, Role::Secondary) => Some(("already secondary".into(), false)),
                    _ => None,
                }
            }
            Step::Attach(r) => match &r.attach {
                None => Some(("no attach hook".into(), true)),
                Some(_) => {
                    let primary_before = !self.backend(r)?.has_roles()
                        || locked(&self.already_primary).contains(&r.name);
                    (primary_before && is_up(r))
                        .then(|| ("already attached and mounted".into(), false))
                }
            },
            Step::Detach(r) => match &r.detach {
                None => Some(("no detach hook".into(), true)),
                Some(_) => {
                    let b = self.backend(r)?;
                    let done = if b.has_roles() {
                        b.status()?.role == Role::Secondary
                    } else {
                        !locked(&self.was_up).contains(&r.name)
                    };
                    done.then(|| ("already detached".into(), false))
                }
            },
            Step::WaitDevice(_) => None,
            Step::Fsck(r) => {
                if fs::fsck_for(r.fsck, r.fstype, &r.device).is_none() {
                    Some((
                        format!("no fsck for {} with fsck = {:?}", r.fstype, r.fsck).to_lowercase(),
                        true,
                    ))
                } else if is_up(r) {
                    Some(("already mounted".into(), false))
                } else {
                    None
                }
            }
            Step::Mkdir(r) => match (&r.pool, &r.mountpoint) {
                (None, Some(m)) if !m.is_dir() => None,
                (None, Some(_)) => Some(("exists".into(), true)),
                _ => Some(("zfs mounts its datasets itself".into(), true)),
            },
            Step::Mount(r) => is_up(r).then(|| {
                (
                    if r.pool.is_some() {
                        "already imported"
                    } else {
                        "already mounted"
                    }
                    .into(),
                    false,
                )
            }),
            Step::Unmount(r) => {
                if is_up(r) {
                    locked(&self.was_up).insert(r.name.clone());
                    None
                } else {
                    Some((
                        if r.pool.is_some() {
                            "not imported"
                        } else {
                            "not mounted"
                        }
                        .into(),
                        false,
                    ))
                }
            }
            Step::StartService(s) => {
                (service::is_active(s, t)? == Some(true)).then(|| ("already running".into(), false))
            }
            Step::StopService(s) => {
                (service::is_active(s, t)? == Some(false)).then(|| ("not running".into(), false))
            }
        })
    }

    fn run(&self, step: &Step<'a>) -> Result<()> {
        let sw = &self.cfg.switch;
        let t = sw.command_timeout;
        match *step {
            Step::Role(r, true) => self.backend(r)?.promote(&self.role),
            Step::Role(r, false) => self.backend(r)?.demote(&self.role),
            Step::Attach(r) => hook(r, r.attach.as_deref(), t),
            Step::Detach(r) => hook(r, r.detach.as_deref(), t),
            Step::WaitDevice(r) => {
                if super::devwait::wait_for(&r.device, sw.device_timeout)? {
                    Ok(())
                } else {
                    anyhow::bail!(
                        "{} did not appear within {}",
                        r.device.display(),
                        crate::config::format_duration(sw.device_timeout)
                    )
                }
            }
            Step::Fsck(r) => {
                if let Some(m) = fs::device_mounted(&r.device)? {
                    anyhow::bail!(
                        "{} is mounted on {}: not checking a mounted filesystem",
                        r.device.display(),
                        m.target.display()
                    );
                }
                let Some(f) = fs::fsck_for(r.fsck, r.fstype, &r.device) else {
                    return Ok(());
                };
                let out = f.cmd.run_ok(|c| c <= f.max_ok)?;
                if out.code() != 0 {
                    info!(
                        "{} {}: `{}` repaired the filesystem (status {})",
                        self.verb,
                        r.name,
                        f.cmd.line(),
                        out.code()
                    );
                }
                Ok(())
            }
            Step::Mkdir(r) => match &r.mountpoint {
                Some(m) if r.pool.is_none() => {
                    std::fs::create_dir_all(m).with_context(|| format!("mkdir -p {}", m.display()))
                }
                _ => Ok(()),
            },
            Step::Mount(r) => match (&r.pool, &r.mountpoint) {
                (Some(p), _) => zfs::import_cmd(p, &r.device, t).run().map(drop),
                (None, Some(m)) => {
                    mount_cmd(r, m).timeout(Some(t)).run()?;
                    if fs::mounted_at(m)?.is_none() {
                        anyhow::bail!(
                            "mount succeeded but {} is not in the mount table",
                            m.display()
                        );
                    }
                    Ok(())
                }
                (None, None) => Ok(()),
            },
            Step::Unmount(r) => match (&r.pool, &r.mountpoint) {
                (Some(p), _) => zfs::export_cmd(p, t).run().map(drop),
                (None, Some(m)) => fs::unmount(m, sw.stop_timeout, t),
                (None, None) => Ok(()),
            },
            Step::StartService(s) => service::start_cmd(s, t).run().map(drop),
            Step::StopService(s) => service::stop_cmd(s, t).run().map(drop),
        }
    }
}

fn hook(r: &Resource, script: Option<&str>, t: Duration) -> Result<()> {
    match script {
        Some(s) => hook_cmd(r, s, t).run().map(drop),
        None => Ok(()),
    }
}
