//! The state of one replicated resource that every thread working for it shares: the
//! configuration and resolved peer addresses, the role, the local disk, the primary's link
//! or the secondary's session, the connection facts `status` reports, counters and progress,
//! and the locks that order application writes against the resync and each other.
//!
//! Plain data and the small operations on it; no threads are started here. The owner thread
//! (`resource.rs`) changes the role; the primary (`primary.rs`, `sync.rs`, `verify.rs`) and the
//! secondary (`secondary.rs`) read and update the rest under its locks.

use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::Role;
use super::auth::SharedSecret;
use super::channel::{Channel, Writer};
use super::conflict::Conflicts;
use super::control::{Counters as CounterValues, ErrorKind, ResourceStatus};
use super::hooks::{Event, Hooks};
use super::metadata::Disk;
use super::metrics::ResourceMetrics;
use super::peer::{self, Link, Outcome};
use super::protocol::{Message, NodeState};
use crate::backend::{self, SyncState};
use crate::config::{Replication, Resource};

/// The secondary's running session with the primary (see `secondary.rs`); held by the owner
/// thread, which alone starts and ends it.
pub struct Session {
    pub stream: TcpStream,
    /// The session's writer, for a last `Goodbye` between its frames.
    pub writer: Writer,
    pub thread: JoinHandle<()>,
}

/// Messages to a resource's owner thread (`resource.rs`): the only thread that changes the
/// role and starts or ends the secondary's session, so a session and a role change are
/// ordered by the order of these messages.
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
    /// The listener authenticated the primary and both agreed to replicate: start the
    /// session if this node is still secondary, ending any earlier one first.
    Session(Box<Accepted>),
    /// End the session, if any, then reply (the listener does this before it tells a newly
    /// connected primary this node's state, so no older session changes it afterwards).
    EndSession {
        reply: Sender<()>,
    },
    /// The watchdog checks that the owner thread is alive: answer on the sender.
    Ping(Sender<()>),
    /// Test hook (`tandem fault RES wedge-owner SECS`): the owner thread stops answering
    /// messages for this long.
    #[cfg(feature = "faults")]
    Wedge(Duration),
    Stop,
}

/// A primary's replication connection, handshake done, for the owner to start a session on.
pub struct Accepted {
    pub chan: Channel,
    /// The primary replicates in memsync mode (acknowledge on receipt too).
    pub memsync: bool,
    /// The primary's node name and address, for the log.
    pub node: String,
    pub from: SocketAddr,
    /// The primary's `peer_gen` (what it last recorded of this node's generation): this
    /// node's generation goes past it if the primary's disk fails (`DiskFailed`).
    pub primary_peer_gen: u64,
}

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

/// What every resource takes from the daemon's configuration.
#[derive(Clone)]
pub struct DaemonSettings {
    pub secret: SharedSecret,
    /// A peer silent this long is dead.
    pub timeout: Duration,
    /// How long `role primary` tries to reach the peer before deciding alone.
    pub probe_timeout: Duration,
    /// How often an idle link is pinged (and an idle secondary checks on its peer).
    pub ping_interval: Duration,
    /// A secondary's fdatasync running this long means a hung disk.
    pub flush_timeout: Duration,
    /// How long the primary's NBD reader stays awake for the answer of a lone write.
    pub busy_poll: Duration,
    pub hooks: Hooks,
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
    pub ping_interval: Duration,
    /// A secondary's fdatasync running this long means a hung disk: the session ends.
    pub flush_timeout: Duration,
    /// `daemon.busy_poll`.
    pub busy_poll: Duration,
    pub hooks: Hooks,
    /// When this resource started: the peer's silence counts from here until it is heard.
    pub started: Instant,
    /// When the peer was last heard (a frame of the session, an authenticated handshake, an
    /// answered probe), in milliseconds after `started` plus one; 0: never.
    heard_at: AtomicU64,
    pub role: RwLock<Role>,
    /// The primary's replication link, present while connected and handshaken.
    pub link: RwLock<Option<Arc<Link>>>,
    pub conn: Mutex<ConnInfo>,
    pub counters: Counters,
    /// Latency histograms and link events for the metrics (`metrics.rs`).
    pub metrics: ResourceMetrics,
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
    /// The owner thread's mailbox.
    pub owner: Sender<Msg>,
    /// The local disk failed (an I/O error under the primary's export): reads and writes go
    /// to the peer only, as hastd and DRBD (`on-io-error detach`) do. Until the daemon
    /// restarts; the disk must be replaced and recreated.
    pub disk_failed: AtomicBool,
    /// The `DiskFailed` sent to the peer when the disk failed (`None`: no link then, or the
    /// peer was told by the handshake since). Held while `disk_failed` is set, so a write that
    /// sees the flag finds the notice here, and is not answered before the peer confirmed it.
    pub diskless_notice: Mutex<Option<Arc<peer::Completion>>>,
}

impl Shared {
    /// The state of a resource on `disk`, role init, not connected.
    pub fn new(
        res: &Resource,
        node: &str,
        disk: Disk,
        daemon: DaemonSettings,
        owner: Sender<Msg>,
    ) -> Shared {
        let DaemonSettings {
            secret,
            timeout,
            probe_timeout,
            ping_interval,
            flush_timeout,
            busy_poll,
            hooks,
        } = daemon;
        Shared {
            name: res.name.clone(),
            node: node.to_string(),
            cfg: RwLock::new(res.clone()),
            addrs: RwLock::new(PeerAddrs::resolve(res)),
            disk: Arc::new(disk),
            secret,
            timeout,
            probe_timeout,
            ping_interval,
            flush_timeout,
            busy_poll,
            hooks,
            started: Instant::now(),
            heard_at: AtomicU64::new(0),
            role: RwLock::new(Role::Init),
            link: RwLock::new(None),
            conn: Mutex::new(ConnInfo {
                connection: Connection::Disconnected,
                peer_role: None,
                stale: false,
                in_sync: false,
            }),
            counters: Counters::default(),
            metrics: ResourceMetrics::default(),
            sync: SyncProgress::default(),
            verify: SyncProgress::default(),
            verifying: Mutex::new(()),
            locks: ExtentLocks::new(),
            conflicts: Conflicts::default(),
            gen_bumped: Mutex::new(false),
            writes_queued: AtomicU64::new(0),
            writes_flushed: AtomicU64::new(0),
            owner,
            disk_failed: AtomicBool::new(false),
            diskless_notice: Mutex::new(None),
        }
    }

    pub fn role(&self) -> Role {
        *self.role.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The peer was heard just now.
    pub fn heard_peer(&self) {
        let ms = self.started.elapsed().as_millis() as u64 + 1;
        self.heard_at.fetch_max(ms, Ordering::Relaxed);
    }

    /// How long the peer has been silent: since it was last heard (on this resource's
    /// session or link, in a handshake or a probe), or since the resource started if it never
    /// was. A peer silent for `timeout` is gone or cut off; either way a probe would only
    /// time out.
    pub fn peer_silence(&self) -> Duration {
        let at = self.heard_at.load(Ordering::Relaxed);
        let mine = self
            .started
            .elapsed()
            .saturating_sub(Duration::from_millis(at.saturating_sub(1)));
        match self.link() {
            Some(l) => mine.min(l.silent_for()),
            None => mine,
        }
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
        let (was_up, was_in_sync) = (c.connection == Connection::Connected, c.in_sync);
        f(&mut c);
        let m = &self.metrics;
        match (was_up, c.connection == Connection::Connected) {
            (false, true) => {
                m.links_established.fetch_add(1, Ordering::Relaxed);
            }
            (true, false) => {
                m.links_lost.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
        if was_in_sync != c.in_sync {
            m.mark_in_sync_now();
        }
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
            diskless: self.diskless(),
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
    /// extent is marked dirty and the data inconsistent (on disk too, if it still takes
    /// writes), so a disk that comes back is fully resynced, never trusted, nor promoted
    /// after a restart. The peer is told (`DiskFailed`) so that it records the same on its
    /// side: a disk that takes no write at all cannot say it itself.
    pub fn fail_disk(&self, what: &str, e: &std::io::Error) {
        let mut notice = self
            .diskless_notice
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if self.disk_failed.swap(true, Ordering::AcqRel) {
            return;
        }
        let then = match self.role() {
            Role::Primary => "serving reads and writes from the peer (diskless)",
            _ => "it takes no replication (detached)",
        };
        log::error!(
            "{}: the local disk {} failed ({what}: {e}); {then}: replace the disk and recreate the metadata",
            self.name,
            self.disk.path().display()
        );
        if let Err(e) = self.disk.activemap().mark_all_dirty() {
            log::warn!(
                "{}: marking every extent dirty on the failed disk: {e}",
                self.name
            );
        }
        if let Err(e) = self.disk.update_header(|h| h.inconsistent = true) {
            log::warn!(
                "{}: marking the failed disk's data inconsistent: {e}",
                self.name
            );
        }
        *notice = self
            .link()
            .map(|l| l.submit(|seq| Message::DiskFailed { seq }));
        drop(notice);
        self.hooks.fire(Event::DiskFailed, &self.name, &[]);
    }

    /// Whether the peer has recorded that it holds the only copy (see `fail_disk`): a write
    /// that reached the peer alone is answered only then. Waits for its answer.
    pub fn peer_knows_diskless(&self) -> bool {
        let notice = self
            .diskless_notice
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        notice.is_none_or(|c| c.wait(Outcome::Written))
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
        // The CLI parses these names back into the same enums (backend::tandem): a state the
        // daemon can report is a variant there too, never an unknown string.
        let state = if h.split_brain {
            SyncState::SplitBrain
        } else if self.diskless() {
            SyncState::Diskless
        } else if syncing {
            SyncState::Syncing
        } else if c.connection == Connection::Connected && c.in_sync && !h.inconsistent {
            SyncState::Complete
        } else {
            SyncState::Degraded
        };
        if state == SyncState::Complete {
            self.metrics.mark_in_sync_now();
        }
        let total = self.sync.total.load(Ordering::Relaxed);
        let done = self.sync.done.load(Ordering::Relaxed);
        let cn = &self.counters;
        let cfg = self.cfg();
        ResourceStatus {
            name: self.name.clone(),
            role: role.name().to_string(),
            connection: match c.connection {
                Connection::Connected => backend::Connection::Connected,
                Connection::Connecting => backend::Connection::Connecting,
                Connection::Disconnected => backend::Connection::Disconnected,
            }
            .to_string(),
            state: state.to_string(),
            dirty_bytes: self.disk.activemap().dirty_bytes(),
            data_size: self.disk.data_size(),
            sync_progress: if !syncing || total == 0 {
                if state == SyncState::Complete {
                    1.0
                } else {
                    0.0
                }
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
            peer_silent_ms: Some(self.peer_silence().as_millis() as u64),
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
