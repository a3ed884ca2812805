//! The replication daemon (backend `tandem`): one process for all resources of this node.
//!
//! `run` starts one owner thread per resource (`resource.rs`; the state its threads share is
//! in `state.rs`, which depends on none of them), the peer listener
//! (`secondary.rs`), the control socket (`control.rs`) and then turns signals into actions:
//! SIGHUP reloads the configuration, SIGTERM/SIGINT stop cleanly. The primary side lives in
//! `primary.rs` and `sync.rs`, the wire format in `protocol.rs`, authentication in `auth.rs`,
//! the sync-direction table in `generation.rs`, hook events in `hooks.rs`, the online verify in
//! `verify.rs`. The primary's export is an NBD socket (`nbd.rs`), attached to `/dev/nbdN` on
//! Linux (`kernel_nbd.rs`) and shown as `/dev/tandem/RES` through GEOM Gate on FreeBSD
//! (`ggate.rs`). The Prometheus endpoint is `metrics.rs`, the systemd notify protocol and the
//! watchdog of the owner threads `systemd.rs`, the private (mode 0600) unix sockets
//! `unixsock.rs`.
pub mod activemap;
pub mod auth;
pub mod channel;
pub mod conflict;
pub mod control;
pub mod diskio;
pub mod faultdisk;
pub mod generation;
// The GEOM Gate export exists on FreeBSD; its dispatch is unit-tested everywhere.
#[cfg(any(test, target_os = "freebsd"))]
pub mod ggate;
pub mod hooks;
pub mod kernel_nbd;
pub mod metadata;
pub mod metrics;
pub mod nbd;
pub mod peer;
pub mod primary;
pub mod protocol;
pub mod resource;
pub mod secondary;
pub mod state;
pub mod sync;
pub mod systemd;
pub mod unixsock;
pub mod verify;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use nix::sys::signal::{SigSet, Signal};
use serde::{Deserialize, Serialize};

use crate::config::{self, BackendKind, Config, Resource};
use auth::{Secret, SharedSecret};
use control::{ControlError, ErrorKind, Request, Response};
use hooks::Hooks;
use resource::Handle;
use state::DaemonSettings;
use state::Msg;

/// A node's replication role for one resource; changed only by command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Init,
    Primary,
    Secondary,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Init => "init",
            Role::Primary => "primary",
            Role::Secondary => "secondary",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Role, String> {
        match s {
            "init" => Ok(Role::Init),
            "primary" => Ok(Role::Primary),
            "secondary" => Ok(Role::Secondary),
            _ => Err(format!("unknown role {s:?} (init, primary, secondary)")),
        }
    }
}

struct Daemon {
    node: String,
    /// What each resource takes from the configuration; its secret and hooks are shared, so
    /// a reload reaches every resource.
    settings: DaemonSettings,
    handles: Mutex<HashMap<String, Handle>>,
    /// Resources that could not start (no metadata, disk missing), with the reason.
    failed: Mutex<HashMap<String, String>>,
    registry: secondary::Registry,
    /// `switch.lock`: `tandem switch` records its last event beside it, for the metrics.
    switch_lock: PathBuf,
}

impl Daemon {
    fn start_resource(&self, res: &Resource) {
        match resource::start(res, &self.node, self.settings.clone()) {
            Ok(h) => {
                self.failed
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&res.name);
                self.registry
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(res.name.clone(), Arc::clone(&h.shared));
                self.handles
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(res.name.clone(), h);
            }
            Err(e) => {
                log::error!("{}: cannot start: {e:#}", res.name);
                self.failed
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(res.name.clone(), format!("{e:#}"));
            }
        }
    }

    fn stop_resource(&self, name: &str) {
        self.failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        self.registry
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        let h = self
            .handles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        if let Some(h) = h {
            h.stop();
        }
    }

    fn names(&self, wanted: &[String]) -> std::result::Result<Vec<String>, ControlError> {
        let handles = self.handles.lock().unwrap_or_else(|p| p.into_inner());
        let failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        if wanted.is_empty() || wanted.iter().any(|w| w == "all") {
            let mut v: Vec<String> = handles.keys().chain(failed.keys()).cloned().collect();
            v.sort();
            return Ok(v);
        }
        // Each resource once, in the order asked: a request naming one resource thousands of
        // times gets one answer for it, not thousands.
        let mut names: Vec<String> = Vec::new();
        for w in wanted {
            if !handles.contains_key(w) && !failed.contains_key(w) {
                return Err(ControlError {
                    kind: ErrorKind::Usage,
                    message: format!("{w}: no such tandem resource running in this daemon"),
                });
            }
            if !names.contains(w) {
                names.push(w.clone());
            }
        }
        Ok(names)
    }

    fn call(
        &self,
        name: &str,
        make: impl FnOnce(std::sync::mpsc::Sender<std::result::Result<(), state::RoleError>>) -> Msg,
    ) -> std::result::Result<(), ControlError> {
        let tx = {
            let handles = self.handles.lock().unwrap_or_else(|p| p.into_inner());
            let failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
            match handles.get(name) {
                Some(h) => h.tx.clone(),
                None if failed.contains_key(name) => {
                    return Err(ControlError {
                        kind: ErrorKind::Failed,
                        message: format!("{name}: not running: {}", failed[name]),
                    });
                }
                None => {
                    return Err(ControlError {
                        kind: ErrorKind::Usage,
                        message: format!("{name}: no such resource"),
                    });
                }
            }
        };
        let (rtx, rrx) = std::sync::mpsc::channel();
        let fail = |m: &str| ControlError {
            kind: ErrorKind::Failed,
            message: format!("{name}: {m}"),
        };
        tx.send(make(rtx))
            .map_err(|_| fail("resource is stopping"))?;
        rrx.recv()
            .map_err(|_| fail("resource stopped"))?
            .map_err(|e| ControlError {
                kind: e.kind,
                message: e.message,
            })
    }

    /// The running resource `name`, or why it is not running.
    fn shared(&self, name: &str) -> std::result::Result<Arc<state::Shared>, ControlError> {
        let handles = self.handles.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = handles.get(name) {
            return Ok(Arc::clone(&h.shared));
        }
        let failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        Err(ControlError {
            kind: ErrorKind::Failed,
            message: match failed.get(name) {
                Some(why) => format!("{name}: not running: {why}"),
                None => format!("{name}: no such resource"),
            },
        })
    }

    fn statuses(&self, names: &[String]) -> Vec<control::ResourceStatus> {
        let handles = self.handles.lock().unwrap_or_else(|p| p.into_inner());
        let failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        names
            .iter()
            .filter_map(|n| match (handles.get(n), failed.get(n)) {
                (Some(h), _) => Some(h.shared.status()),
                (None, Some(err)) => Some(control::ResourceStatus {
                    name: n.clone(),
                    role: "unknown".into(),
                    connection: "n/a".into(),
                    state: "n/a".into(),
                    error: Some(err.clone()),
                    ..Default::default()
                }),
                (None, None) => None,
            })
            .collect()
    }
}

impl control::Handler for Daemon {
    fn handle(&self, req: Request) -> Response {
        let mut resp = Response {
            node: self.node.clone(),
            ..Default::default()
        };
        let result = match req {
            Request::Status { resources } => self.names(&resources).map(|names| {
                resp.resources = self.statuses(&names);
            }),
            Request::Role {
                role,
                resources,
                force,
            } => self.names(&resources).and_then(|names| {
                for n in &names {
                    self.call(n, |reply| Msg::Role { role, force, reply })?;
                }
                resp.resources = self.statuses(&names);
                Ok(())
            }),
            Request::Verify {
                resource,
                repair,
                rate,
            } => self
                .names(std::slice::from_ref(&resource))
                .and_then(|names| {
                    let opts = verify::Options {
                        repair,
                        rate: rate.unwrap_or(verify::DEFAULT_RATE),
                    };
                    // Runs on this control connection's thread, not the owner's: it takes
                    // minutes to hours, and role changes must not wait for it.
                    let r =
                        verify::run(&self.shared(&resource)?, opts).map_err(|e| ControlError {
                            kind: e.kind,
                            message: e.message,
                        })?;
                    resp.verify = Some(r);
                    resp.resources = self.statuses(&names);
                    Ok(())
                }),
            Request::Resolve { resource } => {
                self.names(std::slice::from_ref(&resource))
                    .and_then(|names| {
                        self.call(&resource, |reply| Msg::Resolve { reply })?;
                        resp.resources = self.statuses(&names);
                        Ok(())
                    })
            }
            #[cfg(feature = "faults")]
            Request::Fault {
                resource,
                action: faultdisk::Action::WedgeOwner { seconds },
            } => self.shared(&resource).and_then(|s| {
                s.owner
                    .send(Msg::Wedge(std::time::Duration::from_secs(seconds)))
                    .map_err(|_| ControlError {
                        kind: ErrorKind::Failed,
                        message: format!("{resource}: resource is stopping"),
                    })
            }),
            #[cfg(feature = "faults")]
            Request::Fault { resource, action } => self
                .shared(&resource)
                .map(|s| s.disk.faults().apply(&action)),
        };
        if let Err(e) = result {
            resp.error = Some(e);
        }
        resp
    }
}

impl Daemon {
    /// Every resource for the metrics: running ones with their recorded metrics, failed ones
    /// as not up.
    fn metrics_text(&self) -> String {
        let running: Vec<Arc<state::Shared>> = self
            .handles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|h| Arc::clone(&h.shared))
            .collect();
        let mut samples: Vec<metrics::Sample<'_>> = running
            .iter()
            .map(|s| metrics::Sample {
                status: s.status(),
                metrics: Some(&s.metrics),
            })
            .collect();
        let failed: Vec<String> = self
            .failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect();
        samples.extend(
            self.statuses(&failed)
                .into_iter()
                .map(|status| metrics::Sample {
                    status,
                    metrics: None,
                }),
        );
        samples.sort_by(|a, b| a.status.name.cmp(&b.status.name));
        let switch = crate::switch::last_switch(&self.switch_lock);
        metrics::render(&self.node, &samples, switch.as_ref())
    }
}

impl systemd::Owners for Daemon {
    fn ping(&self) -> Vec<(String, systemd::Ping)> {
        self.handles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(name, h)| {
                let tx = h.tx.clone();
                let ping: systemd::Ping =
                    Box::new(move |answer| tx.send(Msg::Ping(answer)).is_ok());
                (name.clone(), ping)
            })
            .collect()
    }

    fn status_line(&self) -> String {
        let names = self.names(&[]).unwrap_or_default();
        let parts: Vec<String> = self
            .statuses(&names)
            .iter()
            .map(|r| format!("{} {} {} {}", r.name, r.role, r.connection, r.state))
            .collect();
        if parts.is_empty() {
            "no resources".into()
        } else {
            parts.join("; ")
        }
    }
}

fn tandem_resources(cfg: &Config) -> Vec<Resource> {
    cfg.resources
        .iter()
        .filter(|r| r.backend == BackendKind::Tandem)
        .cloned()
        .collect()
}

/// `tandem daemon`: run in the foreground until SIGTERM or SIGINT.
pub fn run(cfg: Config, config_path: PathBuf) -> Result<()> {
    // glibc gives threads their own malloc arenas (up to 8 per core), each keeping the 1 MiB
    // payload buffers freed in it: VmHWM 62 MiB instead of 39 MiB after 1 MiB writes at qd16.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only tunes the allocator; no other thread exists yet.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
    let secret = SharedSecret::new(Secret::load(&cfg.daemon.secret)?, cfg.daemon.encrypt);
    // Signals are taken synchronously by this thread; every thread started below inherits
    // the blocked mask, so none of them is interrupted.
    let mut signals = SigSet::empty();
    for s in [Signal::SIGHUP, Signal::SIGTERM, Signal::SIGINT] {
        signals.add(s);
    }
    signals.thread_block().context("blocking signals")?;
    // Rust binaries ignore SIGPIPE already: a vanished peer is an error return, not death.
    let daemon = Arc::new(Daemon {
        node: cfg.node.clone(),
        settings: DaemonSettings {
            secret,
            timeout: cfg.daemon.timeout,
            probe_timeout: cfg.daemon.probe_timeout,
            ping_interval: cfg.daemon.ping_interval,
            flush_timeout: cfg.daemon.flush_timeout,
            busy_poll: cfg.daemon.busy_poll,
            hooks: Hooks::new(cfg.daemon.exec.clone()).with_env(vec![
                (
                    "TANDEM_CONFIG".into(),
                    std::fs::canonicalize(&config_path)
                        .unwrap_or_else(|_| config_path.clone())
                        .display()
                        .to_string(),
                ),
                ("TANDEM_NODE".into(), cfg.node.clone()),
            ]),
        },
        handles: Mutex::new(HashMap::new()),
        failed: Mutex::new(HashMap::new()),
        registry: Arc::new(Mutex::new(HashMap::new())),
        switch_lock: cfg.switch.lock.clone(),
    });
    let mut current = tandem_resources(&cfg);
    for r in &current {
        daemon.start_resource(r);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for addr in &cfg.daemon.listen {
        threads.push(secondary::listen(
            addr,
            Arc::clone(&daemon.registry),
            Arc::clone(&stop),
        )?);
    }
    let handler: Arc<dyn control::Handler> = daemon.clone();
    threads.push(control::serve(
        &cfg.daemon.control,
        handler,
        Arc::clone(&stop),
    )?);
    if let Some(m) = &cfg.metrics {
        let d = Arc::clone(&daemon);
        threads.push(metrics::serve(
            m.listen,
            Arc::new(move || d.metrics_text()),
            Arc::clone(&stop),
        )?);
    }
    log::info!(
        "daemon ready on node {} ({} resources)",
        cfg.node,
        current.len()
    );
    let notifier = systemd::Notifier::from_env().map(Arc::new);
    let watchdog_stop = Arc::new(AtomicBool::new(false));
    let mut watchdog = None;
    if let Some(n) = &notifier {
        n.send("READY=1\n");
        let interval = systemd::watchdog_interval();
        // An owner thread legitimately blocks for up to a demote: the export drains for the
        // dead-peer timeout plus 10 s, then a FLUSH to the peer, which waits for the peer's
        // fdatasync up to `flush_timeout` and for its silence up to the dead-peer timeout.
        // Only longer is wedged.
        let bound = interval.unwrap_or_default().max(
            2 * cfg.daemon.timeout + cfg.daemon.flush_timeout + std::time::Duration::from_secs(10),
        );
        match systemd::start(
            Arc::clone(n),
            daemon.clone(),
            interval,
            bound,
            Arc::clone(&watchdog_stop),
        ) {
            Ok(t) => watchdog = Some(t),
            Err(e) => log::error!("cannot start the watchdog thread: {e}"),
        }
    }
    let mut listen = cfg.daemon.listen.clone();
    let timing = |d: &config::DaemonConfig| {
        (
            d.timeout,
            d.probe_timeout,
            d.ping_interval,
            d.flush_timeout,
            d.busy_poll,
        )
    };
    let mut timings = timing(&cfg.daemon);
    loop {
        let sig = signals.wait().context("waiting for signals")?;
        match sig {
            Signal::SIGHUP => {
                log::info!("reloading {}", config_path.display());
                let new = match config::load(&config_path, Some(&daemon.node)) {
                    Ok(c) => c,
                    Err(e) => {
                        log::error!("reload failed, keeping the old configuration: {e:#}");
                        continue;
                    }
                };
                daemon.settings.hooks.set(new.daemon.exec.clone());
                // New connections only: a live link keeps what it was opened with.
                daemon.settings.secret.set_encrypt(new.daemon.encrypt);
                match Secret::load(&new.daemon.secret) {
                    Ok(sec) => daemon.settings.secret.set(sec),
                    Err(e) => log::error!("keeping the old secret: {e:#}"),
                }
                if new.daemon.listen != listen {
                    log::warn!("daemon.listen changed; restart the daemon to apply it");
                    listen = new.daemon.listen.clone();
                }
                if timing(&new.daemon) != timings {
                    log::warn!(
                        "daemon.timeout, probe_timeout, ping_interval, flush_timeout or busy_poll changed; restart the daemon to apply it"
                    );
                    timings = timing(&new.daemon);
                }
                let mut wanted = tandem_resources(&new);
                for w in wanted.iter_mut() {
                    let Some(o) = current.iter().find(|o| o.name == w.name) else {
                        continue;
                    };
                    let role = daemon
                        .handles
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get(&w.name)
                        .map(|h| h.shared.role());
                    if o.local != w.local && matches!(role, Some(r) if r != Role::Init) {
                        // Restarting would pull the export (or the replication target) from
                        // under its users: keep the old disk until the role is init.
                        log::error!(
                            "{}: local disk changed, but the role is {}; keeping {} until `tandem role init {}` and another reload",
                            w.name,
                            role.map(Role::name).unwrap_or("?"),
                            o.local
                                .as_deref()
                                .map(|l| l.display().to_string())
                                .unwrap_or_default(),
                            w.name
                        );
                        w.local = o.local.clone();
                    }
                }
                for old in &current {
                    if !wanted.iter().any(|w| w.name == old.name) {
                        log::info!("{}: removed from the configuration; stopping it", old.name);
                        daemon.stop_resource(&old.name);
                    }
                }
                for w in &wanted {
                    match current.iter().find(|o| o.name == w.name) {
                        None => daemon.start_resource(w),
                        Some(o) if o.local != w.local => {
                            log::info!("{}: local disk changed; restarting the resource", w.name);
                            daemon.stop_resource(&w.name);
                            daemon.start_resource(w);
                        }
                        Some(_) => {
                            let handles = daemon.handles.lock().unwrap_or_else(|p| p.into_inner());
                            match handles.get(&w.name) {
                                Some(h) => {
                                    let _ = h.tx.send(Msg::Reload(Box::new(w.clone())));
                                }
                                None => {
                                    // It failed to start before (e.g. `tandem create` had not
                                    // been run yet): try again.
                                    drop(handles);
                                    daemon.start_resource(w);
                                }
                            }
                        }
                    }
                }
                current = wanted;
            }
            _ => {
                log::info!("{sig:?}: stopping");
                break;
            }
        }
    }
    if let Some(n) = &notifier {
        n.send("STOPPING=1\n");
    }
    watchdog_stop.store(true, Ordering::Release);
    if let Some(t) = watchdog {
        let _ = t.join();
    }
    stop.store(true, Ordering::Release);
    let names: Vec<String> = daemon
        .handles
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .keys()
        .cloned()
        .collect();
    for n in names {
        daemon.stop_resource(&n);
    }
    for t in threads {
        let _ = t.join();
    }
    log::info!("daemon stopped");
    Ok(())
}
