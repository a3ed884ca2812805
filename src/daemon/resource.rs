//! One replicated resource of this node: its shared state and the thread that owns its role.
//!
//! The owner thread receives `Msg`s (role changes and `resolve` from the control socket,
//! reload, stop) and is the only one that changes the role, starts or stops the NBD export (and
//! the kernel device in front of it: `/dev/nbdN` on Linux, the GEOM Gate provider
//! `/dev/tandem/RES` on FreeBSD) and the primary's connector. Other threads (NBD workers, the peer link, the secondary session,
//! the control socket's status) read and update the `Shared` state under its small locks.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::Role;
use super::auth::SharedSecret;
use super::conflict::Conflicts;
use super::control::{Counters as CounterValues, ErrorKind, ResourceStatus};
use super::generation::{self, Decision};
use super::hooks::{Event, Hooks};
use super::metadata::{Disk, PrevRole};
use super::nbd::NbdServer;
use super::peer::{self, HandshakeError, Link, Outcome};
use super::primary::{self, Replicated};
use super::protocol::{GoodbyeCode, Message, NodeState, Purpose};
use super::secondary::Session;
use crate::config::{Replication, Resource};

/// A control-socket error with the kind the CLI maps to an exit status.
#[derive(Debug)]
pub struct RoleError {
    pub kind: ErrorKind,
    pub message: String,
}

impl RoleError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> RoleError {
        RoleError {
            kind,
            message: message.into(),
        }
    }
}

impl From<anyhow::Error> for RoleError {
    fn from(e: anyhow::Error) -> Self {
        RoleError::new(ErrorKind::Failed, format!("{e:#}"))
    }
}

/// Messages to a resource's owner thread.
pub enum Msg {
    Role {
        role: Role,
        force: bool,
        reply: Sender<Result<(), RoleError>>,
    },
    Resolve {
        reply: Sender<Result<(), RoleError>>,
    },
    Reload(Box<Resource>),
    Stop,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Connection {
    Disconnected,
    Connecting,
    Connected,
}

/// What is known about the peer right now.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub connection: Connection,
    pub peer_role: Option<Role>,
    /// The peer refused us because our data is older than its data.
    pub stale: bool,
    /// Connected and every extent synced: writes are replicated, nothing is owed.
    pub in_sync: bool,
}

/// Request counters since the daemon started.
#[derive(Default)]
pub struct Counters {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub flushes: AtomicU64,
    pub trims: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    pub bytes_replicated: AtomicU64,
    pub bytes_resynced: AtomicU64,
}

/// Progress of the running (or last) resync.
#[derive(Default)]
pub struct SyncProgress {
    pub active: AtomicBool,
    pub total: AtomicU64,
    pub done: AtomicU64,
    pub started: Mutex<Option<Instant>>,
}

impl SyncProgress {
    pub fn start(&self, total: u64) {
        self.total.store(total, Ordering::Relaxed);
        self.done.store(0, Ordering::Relaxed);
        if let Ok(mut s) = self.started.lock() {
            *s = Some(Instant::now());
        }
        self.active.store(true, Ordering::Release);
    }

    pub fn stop(&self) {
        self.active.store(false, Ordering::Release);
    }

    pub fn rate(&self) -> u64 {
        let elapsed = self
            .started
            .lock()
            .ok()
            .and_then(|s| *s)
            .map(|s| s.elapsed().as_secs_f64())
            .unwrap_or(0.0);
        if elapsed <= 0.0 {
            0
        } else {
            (self.done.load(Ordering::Relaxed) as f64 / elapsed) as u64
        }
    }
}

/// Stripe locks over extents: application writes hold their extents' stripes shared while they
/// write locally and queue the write to the peer; the resync holds an extent's stripe
/// exclusively while it reads the extent and queues it. So the secondary always receives an
/// extent's sync data before any write that came later, never after.
pub struct ExtentLocks(Vec<RwLock<()>>);

const STRIPES: u64 = 256;

impl ExtentLocks {
    fn new() -> ExtentLocks {
        ExtentLocks((0..STRIPES).map(|_| RwLock::new(())).collect())
    }

    pub fn shared(&self, first: u64, last: u64) -> Vec<RwLockReadGuard<'_, ()>> {
        let mut idx: Vec<u64> = if last - first + 1 >= STRIPES {
            (0..STRIPES).collect()
        } else {
            (first..=last).map(|e| e % STRIPES).collect()
        };
        idx.sort_unstable();
        idx.dedup();
        idx.into_iter()
            .map(|i| self.0[i as usize].read().unwrap_or_else(|p| p.into_inner()))
            .collect()
    }

    pub fn exclusive(&self, extent: u64) -> RwLockWriteGuard<'_, ()> {
        self.0[(extent % STRIPES) as usize]
            .write()
            .unwrap_or_else(|p| p.into_inner())
    }
}

/// The peer's addresses, resolved when the configuration is loaded (start and SIGHUP) and
/// never in the data path, where a slow or dead DNS server would stall connects, accepts and
/// the pre-promote probe with no timeout.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeerAddrs {
    /// `remote`; None when it is not set or did not resolve (the log says which).
    pub remote: Option<SocketAddr>,
    /// `peer_remote`, this node's address as the peer knows it: connections start from it.
    pub from: Option<IpAddr>,
}

impl PeerAddrs {
    pub fn resolve(res: &Resource) -> PeerAddrs {
        let lookup = |key: &str, addr: &str| match peer::resolve(addr) {
            Ok(a) => Some(a),
            Err(e) => {
                log::error!(
                    "{}: {key} {addr:?}: {e:#}; fix it and reload (SIGHUP): until then this resource cannot reach its peer",
                    res.name
                );
                None
            }
        };
        PeerAddrs {
            remote: res.remote.as_deref().and_then(|r| lookup("remote", r)),
            from: res
                .peer_remote
                .as_deref()
                .and_then(|r| lookup("the peer's remote", r))
                .map(|a| a.ip()),
        }
    }
}

/// A FLUSH queued to the peer.
pub struct PeerFlush {
    covers: u64,
    done: Arc<peer::Completion>,
}

impl PeerFlush {
    /// True when the peer made everything queued before the FLUSH durable.
    pub fn wait(self, s: &Shared) -> bool {
        let ok = self.done.wait(Outcome::Written);
        if ok {
            s.writes_flushed.fetch_max(self.covers, Ordering::AcqRel);
        }
        ok
    }
}

/// State shared by every thread working for one resource.
pub struct Shared {
    pub name: String,
    pub node: String,
    pub cfg: RwLock<Resource>,
    /// Resolved with `cfg`, replaced with it on reload.
    pub addrs: RwLock<PeerAddrs>,
    pub disk: Arc<Disk>,
    pub secret: SharedSecret,
    pub timeout: Duration,
    /// How long `role primary` tries to reach the peer before deciding alone.
    pub probe_timeout: Duration,
    pub hooks: Hooks,
    pub role: RwLock<Role>,
    /// The primary's replication link, present while connected and handshaken.
    pub link: RwLock<Option<Arc<Link>>>,
    pub conn: Mutex<ConnInfo>,
    pub counters: Counters,
    pub sync: SyncProgress,
    /// Progress of the running (or last) online verify.
    pub verify: SyncProgress,
    /// Held by the running online verify: one at a time per resource.
    pub verifying: Mutex<()>,
    pub locks: ExtentLocks,
    /// Overlapping application writes apply locally and queue to the peer one at a time.
    pub conflicts: Conflicts,
    /// local_gen was bumped since the last completed sync (the bump happens once per outage).
    pub gen_bumped: Mutex<bool>,
    /// Modifying requests queued to the peer so far, and how many of them the last peer FLUSH
    /// confirmed covers: the peer may lack the difference after a power cut of its machine.
    pub writes_queued: AtomicU64,
    pub writes_flushed: AtomicU64,
    /// The secondary's current session with the primary.
    pub session: Mutex<Option<Session>>,
    /// The local disk failed (an I/O error under the primary's export): reads and writes go
    /// to the peer only, as hastd and DRBD (`on-io-error detach`) do. Until the daemon
    /// restarts; the disk must be replaced and recreated.
    pub disk_failed: AtomicBool,
}

impl Shared {
    pub fn role(&self) -> Role {
        *self.role.read().unwrap_or_else(|p| p.into_inner())
    }

    pub fn cfg(&self) -> Resource {
        self.cfg.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn addrs(&self) -> PeerAddrs {
        *self.addrs.read().unwrap_or_else(|p| p.into_inner())
    }

    pub fn mode(&self) -> Replication {
        self.cfg
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .replication
    }

    pub fn link(&self) -> Option<Arc<Link>> {
        self.link
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .filter(|l| !l.is_dead())
    }

    pub fn set_conn(&self, f: impl FnOnce(&mut ConnInfo)) {
        let mut c = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut c);
    }

    pub fn conn(&self) -> ConnInfo {
        self.conn.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// This node's state for the generation exchange.
    pub fn node_state(&self) -> NodeState {
        let h = self.disk.header();
        NodeState {
            role: match self.role() {
                Role::Init => 0,
                Role::Primary => 1,
                Role::Secondary => 2,
            },
            local_gen: h.local_gen,
            peer_gen: h.peer_gen,
            ever_synced: h.ever_synced,
            inconsistent: h.inconsistent,
            discard_local: h.discard_local,
            split_brain: h.split_brain,
            fresh: !h.ever_synced && h.local_gen == 0,
            data_size: self.disk.data_size(),
            extent_size: self.disk.extent_size(),
            dirty: self.disk.activemap().bitmap_bytes(),
        }
    }

    /// A FLUSH to the peer: true when the peer confirmed that everything queued before it is
    /// durable there.
    pub fn peer_flush(&self, link: &Link) -> bool {
        self.queue_peer_flush(link).wait(self)
    }

    /// Queue a FLUSH to the peer; `wait` on it later (so a local fdatasync can run meanwhile).
    pub fn queue_peer_flush(&self, link: &Link) -> PeerFlush {
        // Read before queueing: every write counted here was queued before the FLUSH.
        let covers = self.writes_queued.load(Ordering::Acquire);
        PeerFlush {
            covers,
            done: link.submit(|seq| Message::Flush { seq }),
        }
    }

    /// The link to the peer ended, or a FLUSH to it failed. Writes it acknowledged but no
    /// FLUSH covered may be gone from its disk (a power cut of its machine): resync every
    /// extent still dirty here, and if there were such writes, treat them as written without
    /// the peer (bump the generation). Otherwise a peer promoted after losing them would later
    /// resync over this node's only copy instead of reporting split-brain.
    pub fn peer_may_have_lost_writes(&self) -> std::io::Result<()> {
        if self.diskless() {
            // The peer holds the only copy, flushed or not; nothing here to resync from.
            return Ok(());
        }
        self.disk.activemap().resync_unflushed();
        let queued = self.writes_queued.load(Ordering::Acquire);
        if self.writes_flushed.load(Ordering::Acquire) >= queued {
            return Ok(());
        }
        self.note_degraded_write()?;
        self.writes_flushed.fetch_max(queued, Ordering::AcqRel);
        Ok(())
    }

    /// The local disk failed (see `disk_failed`).
    pub fn diskless(&self) -> bool {
        self.disk_failed.load(Ordering::Acquire)
    }

    /// The local disk failed doing `what`: from now on the peer holds the only copy. Every
    /// extent is marked dirty (on disk too, if it still takes writes), so a disk that comes
    /// back is fully resynced, never trusted.
    pub fn fail_disk(&self, what: &str, e: &std::io::Error) {
        if self.disk_failed.swap(true, Ordering::AcqRel) {
            return;
        }
        log::error!(
            "{}: the local disk {} failed ({what}: {e}); serving reads and writes from the peer (diskless): replace the disk and recreate the metadata",
            self.name,
            self.disk.path().display()
        );
        if let Err(e) = self.disk.activemap().mark_all_dirty() {
            log::warn!(
                "{}: marking every extent dirty on the failed disk: {e}",
                self.name
            );
        }
        self.hooks.fire(Event::DiskFailed, &self.name, &[]);
    }

    /// A write completed without reaching the peer: the first one since the last completed
    /// sync bumps `local_gen` (persisted before the write is acknowledged), so the peer can
    /// tell later that this node has data it lacks.
    pub fn note_degraded_write(&self) -> std::io::Result<()> {
        if self.diskless() {
            // No local copy to have written to: the write failed. Nor a generation, which
            // would make the peer, the only good copy, look stale.
            return Err(std::io::Error::other(format!(
                "{}: the local disk failed and the peer cannot be reached: no copy to write to",
                self.name
            )));
        }
        let mut bumped = self.gen_bumped.lock().unwrap_or_else(|p| p.into_inner());
        if *bumped {
            return Ok(());
        }
        self.disk.update_header(|h| h.local_gen += 1)?;
        *bumped = true;
        log::info!(
            "{}: writing without the peer; local generation now {}",
            self.name,
            self.disk.header().local_gen
        );
        Ok(())
    }

    pub fn status(&self) -> ResourceStatus {
        let h = self.disk.header();
        let c = self.conn();
        let role = self.role();
        let syncing = self.sync.active.load(Ordering::Acquire);
        let verifying = self.verify.active.load(Ordering::Acquire);
        let state = if h.split_brain {
            "split-brain"
        } else if self.diskless() {
            "diskless"
        } else if syncing {
            "syncing"
        } else if c.connection == Connection::Connected && c.in_sync && !h.inconsistent {
            "complete"
        } else {
            "degraded"
        };
        let total = self.sync.total.load(Ordering::Relaxed);
        let done = self.sync.done.load(Ordering::Relaxed);
        let cn = &self.counters;
        let cfg = self.cfg();
        ResourceStatus {
            name: self.name.clone(),
            role: role.name().to_string(),
            connection: match c.connection {
                Connection::Connected => "connected",
                Connection::Connecting => "connecting",
                Connection::Disconnected => "disconnected",
            }
            .to_string(),
            state: state.to_string(),
            dirty_bytes: self.disk.activemap().dirty_bytes(),
            data_size: self.disk.data_size(),
            sync_progress: if !syncing || total == 0 {
                if state == "complete" { 1.0 } else { 0.0 }
            } else {
                done as f64 / total as f64
            },
            sync_bytes_total: total,
            sync_bytes_done: done,
            sync_rate_bps: if syncing { self.sync.rate() } else { 0 },
            verifying,
            verify_bytes_total: self.verify.total.load(Ordering::Relaxed),
            verify_bytes_done: self.verify.done.load(Ordering::Relaxed),
            stale: c.stale || h.inconsistent || h.discard_local,
            peer_role: c.peer_role.map(|r| r.name().to_string()),
            nbd: if role == Role::Primary {
                Some(cfg.nbd.clone())
            } else {
                None
            },
            local_gen: h.local_gen,
            peer_gen: h.peer_gen,
            inconsistent: h.inconsistent,
            error: None,
            counters: CounterValues {
                reads: cn.reads.load(Ordering::Relaxed),
                writes: cn.writes.load(Ordering::Relaxed),
                flushes: cn.flushes.load(Ordering::Relaxed),
                trims: cn.trims.load(Ordering::Relaxed),
                bytes_read: cn.bytes_read.load(Ordering::Relaxed),
                bytes_written: cn.bytes_written.load(Ordering::Relaxed),
                bytes_replicated: cn.bytes_replicated.load(Ordering::Relaxed),
                bytes_resynced: cn.bytes_resynced.load(Ordering::Relaxed),
            },
        }
    }
}

/// Handle kept by the daemon for a running resource.
pub struct Handle {
    pub shared: Arc<Shared>,
    pub tx: Sender<Msg>,
    thread: Option<JoinHandle<()>>,
}

impl Handle {
    /// Stop the owner thread (demotes to init first) and wait for it.
    pub fn stop(mut self) {
        let _ = self.tx.send(Msg::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Open the resource's disk and start its owner thread in role init.
pub fn start(
    res: &Resource,
    node: &str,
    secret: SharedSecret,
    timeout: Duration,
    probe_timeout: Duration,
    hooks: Hooks,
) -> Result<Handle> {
    let local: PathBuf = res
        .local
        .clone()
        .with_context(|| format!("{}: no local disk configured for this node", res.name))?;
    let disk = Disk::open(&local, &res.name)?;
    let shared = Arc::new(Shared {
        name: res.name.clone(),
        node: node.to_string(),
        cfg: RwLock::new(res.clone()),
        addrs: RwLock::new(PeerAddrs::resolve(res)),
        disk: Arc::new(disk),
        secret,
        timeout,
        probe_timeout,
        hooks,
        role: RwLock::new(Role::Init),
        link: RwLock::new(None),
        conn: Mutex::new(ConnInfo {
            connection: Connection::Disconnected,
            peer_role: None,
            stale: false,
            in_sync: false,
        }),
        counters: Counters::default(),
        sync: SyncProgress::default(),
        verify: SyncProgress::default(),
        verifying: Mutex::new(()),
        locks: ExtentLocks::new(),
        conflicts: Conflicts::default(),
        gen_bumped: Mutex::new(false),
        writes_queued: AtomicU64::new(0),
        writes_flushed: AtomicU64::new(0),
        session: Mutex::new(None),
        disk_failed: AtomicBool::new(false),
    });
    let (tx, rx) = mpsc::channel();
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
            }
            .run(rx)
        })
        .context("starting the resource thread")?;
    log::info!("{}: started on {} (role init)", res.name, local.display());
    Ok(Handle {
        shared,
        tx,
        thread: Some(thread),
    })
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
            Role::Secondary => {
                // The listener installs a session only while it sees role secondary under the
                // session lock: change the role under that lock first, then end whatever
                // session got in before, so none can start after (which would apply the old
                // primary's writes while this node serves its own export).
                {
                    let _slot = self
                        .shared
                        .session
                        .lock()
                        .unwrap_or_else(|p| p.into_inner());
                    *self.shared.role.write().unwrap_or_else(|p| p.into_inner()) = role;
                }
                super::secondary::end_session(&self.shared)
            }
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
                    "{name}: local data is incomplete (an interrupted sync or resolve --discard-local); use --force to promote anyway"
                ),
            ));
        }
        let cfg = self.shared.cfg();
        if cfg.remote.is_none() {
            return Ok(());
        }
        // A secondary connected to a live primary knows the answer without asking.
        if self.shared.role() == Role::Secondary
            && self.shared.conn().connection == Connection::Connected
            && self.shared.conn().peer_role == Some(Role::Primary)
        {
            return Err(RoleError::new(
                ErrorKind::PeerPrimary,
                format!("{name}: the peer is primary"),
            ));
        }
        let peer = match probe(&self.shared) {
            Probe::State(p) => p,
            Probe::Unreachable(e) => {
                log::info!("{name}: peer unreachable ({e:#}); becoming primary without it");
                return Ok(());
            }
            Probe::Refused(why) if !force => {
                // The peer answered but will not talk to us (wrong secret, other protocol
                // version): a configuration error, not an absent peer.
                return Err(RoleError::new(
                    ErrorKind::Failed,
                    format!(
                        "{name}: the peer refused us ({why}); fix the configuration or use --force"
                    ),
                ));
            }
            Probe::Refused(why) => {
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
        super::secondary::end_session(&self.shared);
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

/// Ask the peer for its role and state (bounded by `daemon.probe_timeout`).
pub fn probe(shared: &Shared) -> Probe {
    match probe_inner(shared) {
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

fn probe_inner(shared: &Shared) -> Result<NodeState, ProbeError> {
    let addrs = shared.addrs();
    let to = addrs
        .remote
        .context("the peer's address did not resolve when the configuration was loaded")?;
    let mut stream = peer::connect_from(to, addrs.from, shared.probe_timeout)?;
    let hello = peer::Hello {
        resource: &shared.name,
        node: &shared.node,
        purpose: Purpose::Probe,
        mode: 0,
        secret: &shared.secret.get(),
        state: shared.node_state(),
    };
    let r = peer::handshake_connect(&mut stream, &hello, shared.probe_timeout);
    let _ = super::protocol::write_message(
        &mut stream,
        &super::protocol::Message::Goodbye {
            code: GoodbyeCode::Normal,
            reason: "probe done".into(),
        },
    );
    match r {
        Ok(s) => Ok(s),
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
    start(
        cfg.resource("r0").unwrap(),
        node,
        SharedSecret::new(super::auth::Secret::from_bytes(b"k")),
        Duration::from_secs(10),
        Duration::from_secs(2),
        Hooks::new(None),
    )
    .unwrap()
}

#[cfg(test)]
mod tests {
    use super::PeerAddrs;
    use std::net::{IpAddr, Ipv4Addr, SocketAddr};
    use std::path::Path;

    fn resource(remote: &str, peer_remote: &str) -> crate::config::Resource {
        let text = format!(
            r#"node = "a"
[resource.r0]
backend = "tandem"
[resource.r0.on.a]
local = "/dev/null"
remote = "{remote}"
[resource.r0.on.b]
local = "/dev/null"
remote = "{peer_remote}"
"#
        );
        let cfg = crate::config::parse(Path::new("test.toml"), &text, None).unwrap();
        cfg.resources.into_iter().next().unwrap()
    }

    #[test]
    fn peer_addresses_are_resolved_once_from_the_configuration() {
        let a = PeerAddrs::resolve(&resource("198.18.0.2:7789", "198.18.0.1:7789"));
        assert_eq!(
            a.remote,
            Some("198.18.0.2:7789".parse::<SocketAddr>().unwrap())
        );
        assert_eq!(a.from, Some(IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1))));
        let h = PeerAddrs::resolve(&resource("localhost:7789", "198.18.0.1:7789"));
        assert!(
            h.remote
                .is_some_and(|r| r.ip().is_loopback() && r.port() == 7789)
        );
    }

    #[test]
    fn an_unresolvable_remote_is_none_not_an_error() {
        let a = PeerAddrs::resolve(&resource("no-such-host.invalid:7789", "also.invalid:1"));
        assert_eq!(a, PeerAddrs::default());
    }
}
