//! The thread that owns one replicated resource's role.
//!
//! The owner thread receives `Msg`s (role changes and `resolve` from the control socket,
//! sessions the listener accepted, reload, stop) and is the only one that changes the role,
//! starts or ends the secondary's session, and starts or stops the NBD export (and the kernel
//! device in front of it: `/dev/nbdN` on Linux, the GEOM Gate provider `/dev/tandem/RES` on
//! FreeBSD) and the primary's connector. So a session and a role change happen in the order of
//! their messages, never at once. Other threads (NBD workers, the peer link, the session, the
//! control socket's status) read and update the resource's `state::Shared` under its small
//! locks; nothing here is shared but through it.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use anyhow::{Context, Result};

use super::Role;
use super::control::ErrorKind;
use super::generation::{self, Decision};
use super::hooks::Event;
use super::metadata::{Disk, PrevRole};
use super::nbd::NbdServer;
use super::peer::{self, HandshakeError};
use super::primary::{self, Replicated};
use super::protocol::{GoodbyeCode, NodeState, Purpose};
use super::state::{Connection, DaemonSettings, Msg, PeerAddrs, RoleError, Session, Shared};
use crate::config::Resource;

/// Handle kept by the daemon for a running resource.
pub struct Handle {
    pub shared: Arc<Shared>,
    pub tx: Sender<Msg>,
    thread: Option<JoinHandle<()>>,
    /// The peer watcher (`watch_peer`) and its stop flag.
    watcher: Option<(Arc<AtomicBool>, JoinHandle<()>)>,
}

impl Handle {
    /// Stop the owner thread (demotes to init first) and the peer watcher, and wait for them.
    pub fn stop(mut self) {
        if let Some((stop, _)) = &self.watcher {
            stop.store(true, Ordering::Release);
        }
        let _ = self.tx.send(Msg::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Some((_, t)) = self.watcher.take() {
            let _ = t.join();
        }
    }
}

/// Open the resource's disk and start its owner thread in role init.
pub fn start(res: &Resource, node: &str, daemon: DaemonSettings) -> Result<Handle> {
    let local: PathBuf = res
        .local
        .clone()
        .with_context(|| format!("{}: no local disk configured for this node", res.name))?;
    let disk = Disk::open(&local, &res.name)?;
    let (tx, rx) = mpsc::channel();
    let shared = Arc::new(Shared::new(res, node, disk, daemon, tx.clone()));
    let watch_stop = Arc::new(AtomicBool::new(false));
    let (s, st) = (Arc::clone(&shared), Arc::clone(&watch_stop));
    let watcher = thread::Builder::new()
        .name(format!("watch-{}", res.name))
        .spawn(move || watch_peer(&s, &st))
        .context("starting the peer watcher")?;
    let s = Arc::clone(&shared);
    let thread = thread::Builder::new()
        .name(format!("res-{}", res.name))
        .spawn(move || {
            Owner {
                shared: s,
                nbd: None,
                kernel: None,
                #[cfg(target_os = "freebsd")]
                gate: None,
                connector: None,
                fence: None,
                session: None,
            }
            .run(rx)
        })
        .context("starting the resource thread")?;
    log::info!("{}: started on {} (role init)", res.name, local.display());
    Ok(Handle {
        shared,
        tx,
        thread: Some(thread),
        watcher: Some((watch_stop, watcher)),
    })
}

/// While this node is not primary and no session carries the peer's pings, ask the peer every
/// `ping_interval` how it is (a probe, bounded by `probe_timeout`), so that its silence is
/// known before a promote asks: a peer that answers is heard (`Shared::heard_peer`), and a
/// promote then probes it for its role and data; one silent for `daemon.timeout` is gone or
/// cut off, and a promote skips the probe, which could only time out. Without this, two idle
/// nodes (neither primary, so no link pings) would seem dead to each other, and a stale node
/// would be promoted without the generation check.
fn watch_peer(s: &Shared, stop: &AtomicBool) {
    while !peer::sleep_unless(stop, s.ping_interval) {
        // A session that carries the primary's pings needs no probe; one that went quiet may
        // be a stalled connection to a live peer, which the probe (a connection of its own)
        // tells apart from a dead one.
        let quiet =
            s.conn().connection != Connection::Connected || s.peer_silence() >= 2 * s.ping_interval;
        if s.role() == Role::Primary || !quiet || s.addrs().remote.is_none() {
            continue;
        }
        match probe_within(s, s.probe_timeout) {
            Probe::State(_) | Probe::Refused(_) => {}
            Probe::Unreachable(e) => log::trace!("{}: peer watcher: {e:#}", s.name),
        }
    }
}

/// The primary's background connector.
struct Connector {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

struct Owner {
    shared: Arc<Shared>,
    nbd: Option<NbdServer>,
    /// The export attached to the kernel's `/dev/nbdN`, when the daemon does that itself.
    kernel: Option<super::kernel_nbd::KernelAttach>,
    /// The GEOM Gate provider (`/dev/tandem/RES`) serving the replicated device.
    #[cfg(target_os = "freebsd")]
    gate: Option<super::ggate::Export>,
    connector: Option<Connector>,
    /// Fences the current export's replicated device (see `Replicated`).
    fence: Option<Arc<AtomicBool>>,
    /// The secondary's session with the primary.
    session: Option<Session>,
}

impl Owner {
    fn run(mut self, rx: Receiver<Msg>) {
        while let Ok(msg) = rx.recv() {
            match msg {
                Msg::Role { role, force, reply } => {
                    let r = self.change_role(role, force);
                    if let Err(e) = &r {
                        log::error!("{}: role {}: {}", self.shared.name, role.name(), e.message);
                    }
                    let _ = reply.send(r);
                }
                Msg::Resolve { reply } => {
                    let _ = reply.send(self.resolve());
                }
                Msg::Reload(res) => {
                    log::info!("{}: configuration reloaded", self.shared.name);
                    let addrs = PeerAddrs::resolve(&res);
                    *self.shared.cfg.write().unwrap_or_else(|p| p.into_inner()) = *res;
                    *self.shared.addrs.write().unwrap_or_else(|p| p.into_inner()) = addrs;
                }
                Msg::Session(accepted) => self.start_session(*accepted),
                Msg::EndSession { reply } => {
                    self.end_session("a new connection from the primary");
                    let _ = reply.send(());
                }
                Msg::Ping(answer) => {
                    let _ = answer.send(());
                }
                #[cfg(feature = "faults")]
                Msg::Wedge(d) => {
                    log::warn!(
                        "fault injection: {}: owner thread wedged for {}s",
                        self.shared.name,
                        d.as_secs()
                    );
                    thread::sleep(d);
                }
                Msg::Stop => break,
            }
        }
        if let Err(e) = self.change_role(Role::Init, false) {
            log::error!("{}: stopping: {}", self.shared.name, e.message);
        }
        if let Err(e) = self.shared.disk.activemap().flush_clean() {
            log::error!("{}: persisting the dirty-extent map: {e}", self.shared.name);
        }
        log::info!("{}: stopped", self.shared.name);
    }

    /// Start a session on a connection the listener accepted, if this node is still
    /// secondary (a role change may have come first); any earlier session ends first.
    fn start_session(&mut self, a: super::state::Accepted) {
        let s = &self.shared;
        if s.role() != Role::Secondary {
            super::secondary::refuse(a.chan, "role changed");
            log::info!(
                "{}: {} at {}: not starting a session, the role changed meanwhile",
                s.name,
                a.node,
                a.from
            );
            return;
        }
        let started = super::secondary::replace_session(&mut self.session, || {
            super::secondary::start_session(s, a)
        });
        if let Err(e) = started {
            log::error!("{}: {e:#}", s.name);
        }
    }

    fn end_session(&mut self, why: &str) {
        if let Some(sess) = self.session.take() {
            super::secondary::close_session(sess, why);
        }
    }

    fn change_role(&mut self, role: Role, force: bool) -> Result<(), RoleError> {
        let current = self.shared.role();
        if current == role {
            return Ok(());
        }
        let name = self.shared.name.clone();
        if role == Role::Primary {
            self.check_promote(force)?;
        }
        // Leave the current role.
        match current {
            Role::Primary => self.stop_primary(),
            // Sessions start only on this thread and only in role secondary: ending this one
            // here means none applies the old primary's writes once the role has changed.
            Role::Secondary => self.end_session("role change"),
            Role::Init => {}
        }
        *self.shared.role.write().unwrap_or_else(|p| p.into_inner()) = role;
        let prev = match role {
            Role::Init => PrevRole::Init,
            Role::Primary => PrevRole::Primary,
            Role::Secondary => PrevRole::Secondary,
        };
        self.shared
            .disk
            .update_header(|h| h.prev_role = prev)
            .map_err(|e| {
                RoleError::new(ErrorKind::Failed, format!("{name}: writing metadata: {e}"))
            })?;
        if role == Role::Primary
            && let Err(e) = self.start_primary()
        {
            self.stop_primary();
            *self.shared.role.write().unwrap_or_else(|p| p.into_inner()) = Role::Secondary;
            return Err(RoleError::new(
                ErrorKind::Failed,
                format!("{name}: starting the export: {e:#}"),
            ));
        }
        log::info!("{name}: role {} -> {}", current.name(), role.name());
        self.shared
            .hooks
            .fire(Event::Role, &name, &[current.name(), role.name()]);
        Ok(())
    }

    /// Refuse to promote stale or split-brain data (unless forced) and a node whose peer is
    /// still primary.
    fn check_promote(&self, force: bool) -> Result<(), RoleError> {
        let name = &self.shared.name;
        if self.shared.diskless() {
            return Err(RoleError::new(
                ErrorKind::Stale,
                format!(
                    "{name}: the local disk failed; the peer holds the data: promote the peer, then replace this disk and recreate its metadata"
                ),
            ));
        }
        let me = self.shared.node_state();
        if (me.inconsistent || me.discard_local) && !force {
            return Err(RoleError::new(
                ErrorKind::Stale,
                format!(
                    "{name}: local data is incomplete (an interrupted sync, resolve --discard-local, or a disk that failed while primary); use --force to promote anyway"
                ),
            ));
        }
        let cfg = self.shared.cfg();
        if cfg.remote.is_none() {
            return Ok(());
        }
        let timeout = self.shared.timeout;
        // A secondary connected to a live primary knows the answer without asking.
        if self.connected_to_primary() && !self.primary_went_silent() {
            return Err(RoleError::new(
                ErrorKind::PeerPrimary,
                format!("{name}: the peer is primary"),
            ));
        }
        // Ask the peer until it answers or has been silent for daemon.timeout: a peer heard
        // within that time is alive, and is not promoted over because one probe was slow.
        // The silence, not the time since this promote began, ends the asking: a promote that
        // starts just after the peer was last heard must not give up (nor fail) before the
        // peer counts as gone. `deadline` bounds a peer that stays heard (through the
        // watcher's probes) yet never answers this one.
        let deadline = std::time::Instant::now() + 2 * timeout;
        let peer = loop {
            let silence = self.shared.peer_silence();
            if silence >= timeout {
                // Nothing from the peer for daemon.timeout, though it pings an idle link and
                // answers the watcher's probes while it lives: it is down or cut off, and a
                // probe could only time out. (A session still "connected" has not noticed.)
                log::info!(
                    "{name}: nothing heard from the peer for {} ms (daemon.timeout {} ms); becoming primary without it",
                    silence.as_millis(),
                    timeout.as_millis()
                );
                return Ok(());
            }
            // Not beyond the moment the peer would count as gone.
            let bound = self
                .shared
                .probe_timeout
                .min(timeout - silence)
                .max(MIN_PROBE);
            match probe_within(&self.shared, bound) {
                Probe::State(p) => break Ok(p),
                Probe::Unreachable(e) if connection_refused(&e) => {
                    // Nothing listens on the peer's port: its daemon is not running, so it
                    // serves nothing.
                    log::info!("{name}: peer unreachable ({e:#}); becoming primary without it");
                    return Ok(());
                }
                Probe::Unreachable(e) if std::time::Instant::now() >= deadline => {
                    if force {
                        log::warn!(
                            "{name}: the peer was heard {} ms ago but does not answer ({e:#}); promoting anyway (--force)",
                            self.shared.peer_silence().as_millis()
                        );
                        return Ok(());
                    }
                    return Err(RoleError::new(
                        ErrorKind::Failed,
                        format!(
                            "{name}: the peer was heard {} ms ago but does not answer a probe ({e:#}); not promoting over it (try again, or use --force)",
                            self.shared.peer_silence().as_millis()
                        ),
                    ));
                }
                Probe::Unreachable(e) => {
                    log::info!("{name}: no answer from the peer yet ({e:#}); asking again");
                    // A refused or reset connection fails at once: a short pause, not beyond
                    // the moment the peer counts as gone, rather than a burst of connects.
                    let left = timeout.saturating_sub(self.shared.peer_silence());
                    thread::sleep(RETRY_PAUSE.min(left));
                }
                Probe::Refused(why) => break Err(why),
            }
        };
        let peer = match peer {
            Ok(p) => p,
            Err(why) if !force => {
                // The peer answered but will not talk to us (wrong secret, other protocol
                // version): a configuration error, not an absent peer.
                return Err(RoleError::new(
                    ErrorKind::Failed,
                    format!(
                        "{name}: the peer refused us ({why}); fix the configuration or use --force"
                    ),
                ));
            }
            Err(why) => {
                log::warn!("{name}: the peer refused us ({why}); promoting anyway (--force)");
                return Ok(());
            }
        };
        if peer.role == 1 {
            return Err(RoleError::new(
                ErrorKind::PeerPrimary,
                format!("{name}: the peer is primary"),
            ));
        }
        match generation::decide(&me, &peer) {
            Decision::Stale if !force => Err(RoleError::new(
                ErrorKind::Stale,
                format!(
                    "{name}: local data is stale (local generation {}, the peer has {}); use --force to promote anyway",
                    me.local_gen, peer.local_gen
                ),
            )),
            Decision::SplitBrain if !force => Err(RoleError::new(
                ErrorKind::SplitBrain,
                format!(
                    "{name}: split-brain with the peer; run `tandem resolve {name} --discard-local` on the node whose changes are to be thrown away"
                ),
            )),
            _ => Ok(()),
        }
    }

    fn connected_to_primary(&self) -> bool {
        let c = self.shared.conn();
        self.shared.role() == Role::Secondary
            && c.connection == Connection::Connected
            && c.peer_role == Some(Role::Primary)
    }

    /// The primary this secondary is connected to has missed its pings: wait (at most until
    /// it has been silent for daemon.timeout, so less than that) for it to be heard again or
    /// to count as gone, rather than have the caller retry. True: gone; false: it is alive.
    /// A primary heard within two ping intervals is alive, with no wait.
    fn primary_went_silent(&self) -> bool {
        let s = &self.shared;
        let mut last = s.peer_silence();
        if last < 2 * s.ping_interval {
            return false;
        }
        log::info!(
            "{}: the primary has been silent for {} ms; waiting up to daemon.timeout ({} ms) for it",
            s.name,
            last.as_millis(),
            s.timeout.as_millis()
        );
        // Bounded: silence only grows until the peer is heard, and reaches the timeout.
        for _ in 0..(s.timeout.as_millis() / 5 + 2) {
            let now = s.peer_silence();
            if now >= s.timeout || !self.connected_to_primary() {
                return true;
            }
            if now < last {
                log::info!("{}: the primary answered again", s.name);
                return false;
            }
            last = now;
            thread::sleep(Duration::from_millis(5));
        }
        s.peer_silence() >= s.timeout
    }

    fn start_primary(&mut self) -> Result<()> {
        let cfg = self.shared.cfg();
        let replicated = Replicated::new(Arc::clone(&self.shared));
        self.fence = Some(replicated.fence_handle());
        let dev: Arc<dyn super::nbd::BlockDevice> = Arc::new(replicated);
        if let Some(dir) = cfg.nbd.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let server = NbdServer::start(Some(&cfg.nbd), cfg.nbd_tcp, &cfg.name, Arc::clone(&dev))?;
        // `device = "/dev/nbdN"` without an attach hook: the daemon attaches the export to the
        // kernel itself. Without the nbd module the export stays on its socket only.
        if cfg.attach.is_none() && cfg.device.to_string_lossy().starts_with("/dev/nbd") {
            use super::kernel_nbd::{KernelAttach, available};
            let (d, size) = (&cfg.device, self.shared.disk.data_size());
            match available(d).and_then(|()| {
                let flags = super::nbd::TRANSMISSION_FLAGS;
                KernelAttach::attach(d, size, 4096, flags, |s| server.serve_kernel(s))
                    .map_err(|e| format!("{e:#}"))
            }) {
                Ok(k) => {
                    log::info!("{}: export attached to {}", cfg.name, d.display());
                    self.kernel = Some(k);
                }
                Err(why) => log::warn!(
                    "{}: {} not attached, the export is only on {}: {why}",
                    cfg.name,
                    d.display(),
                    cfg.nbd.display()
                ),
            }
        }
        self.nbd = Some(server);
        // `device = "/dev/tandem/X"` (the default on FreeBSD) without an attach hook: the
        // daemon creates that GEOM Gate provider, as hastd creates /dev/hast/X. It is the
        // device the switch mounts, so promoting fails without it.
        #[cfg(target_os = "freebsd")]
        if cfg.attach.is_none()
            && let Some(provider) = super::ggate::provider_name(&cfg.device)
        {
            self.gate = Some(self.start_gate(&provider, dev)?);
            log::info!("{}: export shown as {}", cfg.name, cfg.device.display());
        }
        if cfg.remote.is_some() {
            let stop = Arc::new(AtomicBool::new(false));
            let (s, st) = (Arc::clone(&self.shared), Arc::clone(&stop));
            let thread = thread::Builder::new()
                .name(format!("conn-{}", cfg.name))
                .spawn(move || primary::connector(s, st))
                .context("starting the connector")?;
            self.connector = Some(Connector { stop, thread });
        }
        Ok(())
    }

    /// Creates the GEOM Gate provider `provider` (`tandem/RES`) and its workers.
    #[cfg(target_os = "freebsd")]
    fn start_gate(
        &self,
        provider: &str,
        dev: Arc<dyn super::nbd::BlockDevice>,
    ) -> Result<super::ggate::Export> {
        use super::ggate::{Export, Ggctl, WORKERS, geometry};
        let disk = &self.shared.disk;
        let sector = disk
            .sector_size()
            .with_context(|| format!("{}: the sector size of the local disk", self.shared.name))?;
        let (media, sector) =
            geometry(disk.data_size(), sector).map_err(|e| anyhow::anyhow!("{provider}: {e}"))?;
        let ctl = Ggctl::create(provider, media, sector)?;
        Export::start(Arc::new(ctl), dev, provider, WORKERS)
    }

    /// Remove the export (waiting for in-flight requests), make everything durable locally and
    /// on the peer, then close the link.
    fn stop_primary(&mut self) {
        // The provider goes first, as hastd's does: unforced while it is open (the switch
        // unmounts before it demotes), forced after the dead-peer timeout.
        #[cfg(target_os = "freebsd")]
        if let Some(gate) = self.gate.take() {
            let wait = self.shared.timeout + Duration::from_secs(10);
            if let Err(e) = gate.stop(self.shared.timeout, wait) {
                log::error!("{}: {e:#}", self.shared.name);
            }
        }
        if let Some(Err(e)) = self.kernel.take().map(|k| k.detach()) {
            log::error!("{}: {e:#}", self.shared.name);
        }
        if let Some(server) = self.nbd.take() {
            // A replicated write waits for the peer at most the dead-peer timeout: wait for
            // that, so no request of the old role is still running when the role changes.
            let wait = self.shared.timeout + Duration::from_secs(10);
            if !server.shutdown_within(wait) {
                log::error!(
                    "{}: requests of the export still running {}s after demote began (local disk hung?)",
                    self.shared.name,
                    wait.as_secs()
                );
            }
        }
        // Requests still running past that wait fail from here on, rather than write to
        // what is about to be a secondary's disk.
        if let Some(f) = self.fence.take() {
            f.store(true, Ordering::Release);
        }
        // Everything acknowledged so far durable here and on the peer; if the peer cannot
        // confirm that, the extents it may lack stay dirty.
        if let Err(e) = self.shared.disk.sync_data() {
            log::error!("{}: fdatasync on demote: {e}", self.shared.name);
        }
        let peer_flushed = self
            .shared
            .link()
            .is_some_and(|l| self.shared.peer_flush(&l));
        if !peer_flushed && let Err(e) = self.shared.peer_may_have_lost_writes() {
            log::error!("{}: bumping the generation: {e}", self.shared.name);
        }
        if let Some(c) = self.connector.take() {
            c.stop.store(true, Ordering::Release);
            if let Some(link) = self.shared.link() {
                link.close("demote");
            }
            let _ = c.thread.join();
        }
        if let Err(e) = self.shared.disk.activemap().flush_clean() {
            log::error!("{}: persisting the dirty-extent map: {e}", self.shared.name);
        }
    }

    fn resolve(&mut self) -> Result<(), RoleError> {
        let name = self.shared.name.clone();
        if self.shared.role() == Role::Primary {
            return Err(RoleError::new(
                ErrorKind::Usage,
                format!(
                    "{name}: is primary here; demote it (role secondary) before discarding its data"
                ),
            ));
        }
        self.end_session("resolve");
        let disk = &self.shared.disk;
        disk.activemap()
            .mark_all_dirty()
            .map_err(|e| RoleError::new(ErrorKind::Failed, format!("{name}: {e}")))?;
        disk.update_header(|h| {
            h.discard_local = true;
            h.split_brain = false;
        })
        .map_err(|e| RoleError::new(ErrorKind::Failed, format!("{name}: writing metadata: {e}")))?;
        self.shared.set_conn(|c| c.stale = false);
        // Whatever this node writes from now on (if it is forced up) is new to the peer.
        *self
            .shared
            .gen_bumped
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = false;
        log::warn!("{name}: local data will be discarded and fully resynced from the peer");
        Ok(())
    }
}

/// What a probe of the peer found.
pub enum Probe {
    State(NodeState),
    /// No answer (connection refused, timed out, closed): the peer may be down.
    Unreachable(anyhow::Error),
    /// The peer answered and refused (authentication, version).
    Refused(String),
}

/// Did the connection fail because nothing listens on the peer's port?
fn connection_refused(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused)
    })
}

/// A promote's probe of a peer heard just before `daemon.timeout` ran out still gets this
/// long: a reachable peer answers within a few round trips.
const MIN_PROBE: Duration = Duration::from_millis(50);

/// Between two probes of a promote when the first failed at once (reset, closed).
const RETRY_PAUSE: Duration = Duration::from_millis(20);

/// Ask the peer for its role and state, connecting and answering within `bound` each; an
/// answer (even a refusal) counts as hearing from the peer.
pub fn probe_within(shared: &Shared, bound: Duration) -> Probe {
    let r = probe_inner(shared, bound);
    if matches!(r, Ok(_) | Err(ProbeError::Refused(..))) {
        shared.heard_peer();
    }
    match r {
        Ok(s) => Probe::State(s),
        Err(ProbeError::Refused(code, why)) => Probe::Refused(format!("{code:?}: {why}")),
        Err(ProbeError::Other(e)) => Probe::Unreachable(e),
    }
}

enum ProbeError {
    Refused(GoodbyeCode, String),
    Other(anyhow::Error),
}

impl From<anyhow::Error> for ProbeError {
    fn from(e: anyhow::Error) -> Self {
        ProbeError::Other(e)
    }
}

fn probe_inner(shared: &Shared, bound: Duration) -> Result<NodeState, ProbeError> {
    let addrs = shared.addrs();
    let to = addrs
        .remote
        .context("the peer's address did not resolve when the configuration was loaded")?;
    let stream = peer::connect_from(to, addrs.from, bound)?;
    let hello = peer::Hello {
        resource: &shared.name,
        node: &shared.node,
        purpose: Purpose::Probe,
        mode: 0,
        secret: &shared.secret.get(),
        encrypt: shared.secret.encrypt(),
        state: shared.node_state(),
    };
    match peer::handshake_connect(stream, &hello, bound) {
        Ok((s, mut chan)) => {
            let _ = chan.send(&super::protocol::Message::Goodbye {
                code: GoodbyeCode::Normal,
                reason: "probe done".into(),
            });
            Ok(s)
        }
        Err(HandshakeError::Refused(
            code @ (GoodbyeCode::AuthFailed | GoodbyeCode::Mismatch),
            m,
        )) => Err(ProbeError::Refused(code, m)),
        Err(e) => Err(ProbeError::Other(anyhow::anyhow!("{e}"))),
    }
}

/// A resource of node `node` ("a" or "b") on a 16 MiB file disk with 1 MiB extents in `dir`,
/// fresh metadata, role init; its remote (the peer's address) is on 127.0.0.1 (tests only).
#[cfg(test)]
pub(crate) fn start_for_test(dir: &std::path::Path, node: &str) -> Handle {
    let img = dir.join(format!("{node}.img"));
    std::fs::File::create(&img)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    super::metadata::create(&img, "r0", 1 << 20, false).unwrap();
    let (ra, rb) = if node == "a" { (1, 2) } else { (2, 1) };
    let text = format!(
        "node = \"{node}\"\n[daemon]\nlisten = [\"127.0.0.1:1\"]\n\
         [resource.r0]\nbackend = \"tandem\"\nextent_size = \"1M\"\n\
         nbd = \"{nbd}\"\n\
         [resource.r0.on.a]\nlocal = \"{img}\"\nremote = \"127.0.0.1:{ra}\"\n\
         [resource.r0.on.b]\nlocal = \"{img}\"\nremote = \"127.0.0.1:{rb}\"\n",
        nbd = dir.join(format!("{node}.nbd")).display(),
        img = img.display()
    );
    let cfg = crate::config::parse(&dir.join("t.toml"), &text, Some(node)).unwrap();
    let daemon = DaemonSettings {
        secret: super::auth::SharedSecret::new(super::auth::Secret::from_bytes(b"k"), true),
        timeout: Duration::from_secs(10),
        probe_timeout: Duration::from_secs(2),
        ping_interval: Duration::from_millis(500),
        flush_timeout: Duration::from_secs(30),
        busy_poll: crate::config::DEFAULT_BUSY_POLL,
        hooks: super::hooks::Hooks::new(None),
    };
    start(cfg.resource("r0").unwrap(), node, daemon).unwrap()
}
