//! The secondary: the listener shared by all resources (`daemon.listen`), the accepting side of
//! the handshake, and the session that applies the primary's writes and sync data in order.
//!
//! A connection is checked before anything is trusted: its first frame must be a `Hello`
//! naming a resource of this node, from the IP address of that resource's `remote`; then both
//! sides prove the shared secret. Only then is any other frame read. Everything refused is
//! logged with the peer's address.

use std::collections::HashMap;
use std::io::{self, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::Role;
use super::auth::{self, Side};
use super::channel::{self, Channel, KeyExchange, Reader, Writer};
use super::generation::{self, Decision};
use super::hooks::Event;
use super::metadata::Disk;
use super::protocol::{
    self, AckKind, DataFrame, GoodbyeCode, MAX_DATA, MAX_FRAME, MAX_FRAME_UNAUTHENTICATED,
    MIN_PROTOCOL_VERSION, Message, NodeState, PROTOCOL_VERSION, Purpose, SEALED_PROTOCOL_VERSION,
};
use super::state::{Accepted, Connection, Msg, Session, Shared};
use super::verify;

/// A peer must complete hello and authentication within this time after it connected: an
/// absolute deadline, not a per-read timeout, so a client that trickles bytes cannot hold a
/// handshake slot for longer.
const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);

/// Handshakes in progress, at most. When all are taken, a new connection from a configured
/// remote closes the least advanced, oldest unauthenticated one (see `Slots::admit`) rather
/// than being turned away: an attacker sharing the primary's address can hold every slot, but
/// it cannot keep the primary out.
const MAX_HANDSHAKES: usize = 32;

/// Resources by name, as the listener looks them up.
pub type Registry = Arc<Mutex<HashMap<String, Arc<Shared>>>>;

/// End a session: say goodbye (unless its writer is busy), shut the socket, wait for its
/// thread.
pub fn close_session(sess: Session, reason: &str) {
    let _ = sess.writer.try_send(&Message::Goodbye {
        code: GoodbyeCode::NotReady,
        reason: reason.into(),
    });
    let _ = sess.stream.shutdown(Shutdown::Both);
    let _ = sess.thread.join();
}

/// Start a session in `slot` (the owner thread's): a session already there is ended and its
/// thread joined first, so two sessions never apply writes at once.
pub fn replace_session(
    slot: &mut Option<Session>,
    start: impl FnOnce() -> Result<Session>,
) -> Result<()> {
    if let Some(old) = slot.take() {
        close_session(old, "replaced by a newer connection");
    }
    *slot = Some(start()?);
    Ok(())
}

/// Turn an accepted connection away after the handshake.
pub fn refuse(mut chan: Channel, reason: &str) {
    let _ = chan.send(&Message::Goodbye {
        code: GoodbyeCode::NotReady,
        reason: reason.into(),
    });
    chan.shutdown();
}

/// How long the listener waits for the owner thread to end an old session.
const OWNER_WAIT: Duration = Duration::from_secs(30);

/// How far a handshake got (0: connected); the listener reads it to choose what to close.
#[derive(Default)]
pub struct Progress(AtomicU8);

impl Progress {
    /// A whole `Hello` arrived.
    const HELLO: u8 = 1;
    /// The peer proved the secret: never closed to make room.
    const AUTHENTICATED: u8 = 2;
    /// Closed by the listener (deadline or room for a newcomer), which logged why.
    const CLOSED: u8 = 3;

    fn set(&self, p: u8) {
        self.0.store(p, Ordering::Release);
    }

    fn get(&self) -> u8 {
        self.0.load(Ordering::Acquire)
    }
}

/// One handshake in progress.
struct Slot {
    id: u64,
    from: SocketAddr,
    started: Instant,
    stream: TcpStream,
    progress: Arc<Progress>,
}

/// The handshakes in progress, shared by the listener and the handshake threads.
#[derive(Default)]
struct Slots(Mutex<Vec<Slot>>);

impl Slots {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Slot>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Take a slot for a new connection, closing another handshake if all are taken: the
    /// least advanced (no complete `Hello` before a `Hello`), oldest first; never an
    /// authenticated one. None if every slot holds an authenticated peer.
    fn admit(&self, slot: Slot, log: &Throttle) -> bool {
        let mut slots = self.lock();
        if slots.len() >= MAX_HANDSHAKES {
            let victim = slots
                .iter()
                .enumerate()
                .filter(|(_, s)| s.progress.get() < Progress::AUTHENTICATED)
                .min_by_key(|(_, s)| (s.progress.get(), s.started))
                .map(|(i, _)| i);
            let Some(i) = victim else {
                log.warn(format!(
                    "peer connection from {} dropped: {MAX_HANDSHAKES} authenticated handshakes in progress",
                    slot.from
                ));
                return false;
            };
            let old = slots.swap_remove(i);
            old.progress.set(Progress::CLOSED);
            let _ = old.stream.shutdown(Shutdown::Both);
            log.warn(format!(
                "peer connection from {} closed after {} ms without authenticating, to make room for one from {} ({MAX_HANDSHAKES} handshakes in progress)",
                old.from,
                old.started.elapsed().as_millis(),
                slot.from
            ));
        }
        slots.push(slot);
        true
    }

    /// Close the handshakes older than the deadline that have not authenticated.
    fn reap(&self, log: &Throttle) {
        let mut slots = self.lock();
        slots.retain(|s| {
            let late = s.progress.get() < Progress::AUTHENTICATED
                && s.started.elapsed() >= HANDSHAKE_DEADLINE;
            if late {
                s.progress.set(Progress::CLOSED);
                let _ = s.stream.shutdown(Shutdown::Both);
                log.warn(format!(
                    "peer connection from {} closed: no authentication within {}s",
                    s.from,
                    HANDSHAKE_DEADLINE.as_secs()
                ));
            }
            !late
        });
    }

    fn remove(&self, id: u64) {
        self.lock().retain(|s| s.id != id);
    }
}

/// Log lines about refused and failed peer connections, at most one a second, so that a
/// flood of connections cannot flood the log; the next line says how many were held back.
#[derive(Default)]
struct Throttle(Mutex<(Option<Instant>, u64)>);

impl Throttle {
    const EVERY: Duration = Duration::from_secs(1);

    fn warn(&self, line: String) {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let (last, held) = &mut *g;
        if last.is_some_and(|t| t.elapsed() < Self::EVERY) {
            *held += 1;
            return;
        }
        *last = Some(Instant::now());
        match std::mem::take(held) {
            0 => log::warn!("{line}"),
            n => log::warn!("{line} ({n} more refused or failed peer connections not logged)"),
        }
    }

    /// Say what was held back once a second has passed, even if nothing else comes.
    fn tick(&self) {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let (last, held) = &mut *g;
        if *held > 0 && last.is_none_or(|t| t.elapsed() >= Self::EVERY) {
            log::warn!(
                "{} more refused or failed peer connections not logged",
                std::mem::take(held)
            );
            *last = Some(Instant::now());
        }
    }
}

/// Accept peer connections on `addr` until `stop` is set.
pub fn listen(addr: &str, registry: Registry, stop: Arc<AtomicBool>) -> Result<JoinHandle<()>> {
    let listener = TcpListener::bind(addr).with_context(|| format!("listening on {addr}"))?;
    listener.set_nonblocking(true).context("listener")?;
    log::info!("listening for peers on {addr}");
    let t = thread::Builder::new()
        .name("listen".into())
        .spawn(move || {
            let slots = Arc::new(Slots::default());
            let log = Arc::new(Throttle::default());
            let mut next_id = 0u64;
            while !stop.load(Ordering::Acquire) {
                slots.reap(&log);
                log.tick();
                match listener.accept() {
                    Ok((stream, from)) => {
                        if !may_be_a_peer(&registry, from.ip()) {
                            log.warn(format!(
                                "peer connection from {from} refused: not the configured remote of any resource"
                            ));
                            continue;
                        }
                        let Ok(clone) = stream.try_clone() else {
                            continue;
                        };
                        next_id += 1;
                        let id = next_id;
                        let progress = Arc::new(Progress::default());
                        let slot = Slot {
                            id,
                            from,
                            started: Instant::now(),
                            stream: clone,
                            progress: Arc::clone(&progress),
                        };
                        if !slots.admit(slot, &log) {
                            continue;
                        }
                        let reg = Arc::clone(&registry);
                        let sl = Arc::clone(&slots);
                        let lg = Arc::clone(&log);
                        let spawned =
                            thread::Builder::new().name("accept".into()).spawn(move || {
                                let r = accept(stream, from, &reg, &progress);
                                sl.remove(id);
                                // A handshake the listener closed was logged by it.
                                if let Err(e) = r
                                    && progress.get() != Progress::CLOSED
                                {
                                    lg.warn(format!("peer connection from {from} refused: {e:#}"));
                                }
                            });
                        if let Err(e) = spawned {
                            slots.remove(id);
                            log::error!("cannot start a thread for {from}: {e}");
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        {
                        // Until a connection waits, or a while to look at the stop flag.
                        let _ = super::channel::poll_readable(&listener, super::channel::STOP_CHECK);
                    }
                    }
                    Err(e) => {
                        log.warn(format!("accept: {e}"));
                        thread::sleep(Duration::from_millis(100));
                    }
                }
            }
        })
        .context("starting the listener thread")?;
    Ok(t)
}

/// Whether `ip` is the remote of some resource (resolved at load, so no DNS here and the
/// listener never blocks): strangers are dropped before they can hold one of the
/// MAX_HANDSHAKES slots.
fn may_be_a_peer(registry: &Registry, ip: std::net::IpAddr) -> bool {
    let shared: Vec<Arc<Shared>> = registry
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .values()
        .cloned()
        .collect();
    shared
        .iter()
        .any(|s| s.addrs().remote.is_some_and(|a| a.ip() == ip))
}

fn goodbye(stream: &mut TcpStream, code: GoodbyeCode, reason: &str) {
    let _ = protocol::write_message(
        stream,
        &Message::Goodbye {
            code,
            reason: reason.to_string(),
        },
    );
}

/// The accepting side of the handshake, up to handing the session to the owner thread.
fn accept(
    mut stream: TcpStream,
    from: SocketAddr,
    registry: &Registry,
    progress: &Progress,
) -> Result<()> {
    stream.set_nonblocking(false)?;
    // Per read; the listener enforces the deadline for the whole handshake.
    stream.set_read_timeout(Some(HANDSHAKE_DEADLINE))?;
    stream.set_write_timeout(Some(HANDSHAKE_DEADLINE))?;
    let _ = stream.set_nodelay(true);
    let (version, purpose, mode, resource, node, theirs) =
        match protocol::read_message(&mut stream, MAX_FRAME_UNAUTHENTICATED) {
            Ok(Message::Hello {
                version,
                purpose,
                mode,
                resource,
                node,
                nonce,
            }) => (version, purpose, mode, resource, node, nonce),
            Ok(other) => bail!("expected Hello, got {}", other.name()),
            Err(e) => bail!("{e}"),
        };
    progress.set(Progress::HELLO);
    let shared = registry
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&resource)
        .cloned();
    let Some(s) = shared else {
        // Only a configured remote learns that the name is unknown.
        if may_be_a_peer(registry, from.ip()) {
            goodbye(&mut stream, GoodbyeCode::NotReady, "unknown resource");
        }
        bail!("unknown resource {resource:?}");
    };
    let cfg = s.cfg();
    let allowed = s.addrs().remote.map(|a| a.ip());
    if allowed != Some(from.ip()) {
        bail!(
            "{resource}: connection from {} but the configured remote is {}",
            from.ip(),
            cfg.remote.as_deref().unwrap_or("(none)")
        );
    }
    let encrypt = s.secret.encrypt();
    // An older peer is answered in its own version (it never sends what it does not know);
    // a newer one is refused, as it may send messages this node cannot handle. One too old to
    // seal the link only where this node does not want it sealed.
    if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&version) {
        goodbye(&mut stream, GoodbyeCode::Mismatch, "protocol version");
        bail!(
            "{resource}: peer speaks protocol version {version}, we speak {MIN_PROTOCOL_VERSION} to {PROTOCOL_VERSION}"
        );
    }
    if encrypt && version < SEALED_PROTOCOL_VERSION {
        goodbye(
            &mut stream,
            GoodbyeCode::Mismatch,
            &format!(
                "protocol version {version} cannot encrypt the link and daemon.encrypt is true on {}",
                s.node
            ),
        );
        bail!(
            "{resource}: {node} at {from} speaks protocol version {version}, which cannot encrypt the link; upgrade it, or set daemon.encrypt = false on both nodes until then"
        );
    }
    let ours = auth::nonce()?;
    protocol::write_message(
        &mut stream,
        &Message::Hello {
            version,
            purpose,
            mode,
            resource: resource.clone(),
            node: s.node.clone(),
            nonce: ours,
        },
    )?;
    let secret = s.secret.get();
    match protocol::read_message(&mut stream, MAX_FRAME_UNAUTHENTICATED) {
        Ok(Message::Auth { proof })
            if secret.verify(Side::Connect, &resource, &theirs, &ours, &proof) => {}
        Ok(Message::Auth { .. }) => {
            goodbye(
                &mut stream,
                GoodbyeCode::AuthFailed,
                "authentication failed",
            );
            bail!("{resource}: authentication failed (wrong secret?) for node {node:?}");
        }
        Ok(other) => bail!("{resource}: expected Auth, got {}", other.name()),
        Err(e) => bail!("{resource}: {e}"),
    }
    s.heard_peer();
    let proof = secret.proof(Side::Accept, &resource, &ours, &theirs);
    protocol::write_message(&mut stream, &Message::Auth { proof })?;
    progress.set(Progress::AUTHENTICATED);
    // The key exchange if this node seals the link; a peer that does otherwise is told so.
    let first = match protocol::read_message(&mut stream, MAX_FRAME) {
        Ok(m) => m,
        Err(e) => bail!("{resource}: {e}"),
    };
    let (mut chan, first) = match (encrypt, first) {
        (true, Message::Key { message }) => {
            let mut kx =
                KeyExchange::new(channel::Role::Responder, &secret, &resource, &theirs, &ours)?;
            kx.read(&message)
                .with_context(|| format!("{resource}: {node} at {from}"))?;
            let message = kx.write()?;
            protocol::write_message(&mut stream, &Message::Key { message })?;
            (Channel::sealed(stream, kx.finish()?)?, None)
        }
        (false, m @ Message::State(_)) => (Channel::clear(stream)?, Some(m)),
        (true, Message::State(_)) | (false, Message::Key { .. }) => {
            let (here, there) = if encrypt {
                ("true", "false")
            } else {
                ("false", "true")
            };
            goodbye(
                &mut stream,
                GoodbyeCode::Mismatch,
                &format!(
                    "daemon.encrypt is {here} on {} and {there} on {node}: set the same on both nodes",
                    s.node
                ),
            );
            bail!(
                "{resource}: daemon.encrypt is {here} here and {there} on {node} at {from}; set the same on both nodes"
            );
        }
        (_, other) => bail!("{resource}: expected Key or State, got {}", other.name()),
    };
    let first = match first {
        Some(m) => Ok(m),
        None => chan.recv(MAX_FRAME),
    };
    let their_state = match first {
        Ok(Message::State(st)) => st,
        Ok(other) => bail!("{resource}: expected State, got {}", other.name()),
        Err(e) => bail!("{resource}: {e}"),
    };
    let role = s.role();
    // This node's state as the primary's version reads it (the `diskless` flag is version 4).
    let state = || {
        let mut st = s.node_state();
        st.diskless &= version >= 4;
        st
    };
    if purpose == Purpose::Probe {
        chan.send(&Message::State(state()))?;
        log::debug!("{resource}: probed by {node} at {from}");
        return Ok(());
    }
    let say = |chan: &mut Channel, code, reason: &str| {
        let _ = chan.send(&Message::Goodbye {
            code,
            reason: reason.to_string(),
        });
    };
    match role {
        Role::Secondary => {}
        Role::Primary => {
            // Two primaries: the peer was promoted while the link was down. If both were
            // written meanwhile, that is the split-brain a demote would find: report it now,
            // on both nodes (each accepts the other's connection).
            let me = state();
            if generation::decide(&their_state, &me) == Decision::SplitBrain {
                record_split_brain(&s, &me, &their_state)?;
            }
            say(&mut chan, GoodbyeCode::PeerPrimary, "this node is primary");
            bail!("{resource}: {node} at {from} wants to replicate, but this node is primary");
        }
        Role::Init => {
            say(&mut chan, GoodbyeCode::NotReady, "this node's role is init");
            log::info!("{resource}: {node} at {from} wants to replicate; role is init, refused");
            return Ok(());
        }
    }
    if s.diskless() {
        let why = format!(
            "the local disk of {} failed; it takes no replication until the disk is replaced and its metadata recreated",
            s.node
        );
        say(&mut chan, GoodbyeCode::Error, &why);
        bail!("{resource}: {node} at {from} wants to replicate, refused: {why}");
    }
    let me = state();
    if their_state.data_size != me.data_size || their_state.extent_size != me.extent_size {
        say(
            &mut chan,
            GoodbyeCode::Mismatch,
            "data size or extent size differs",
        );
        bail!(
            "{resource}: data size or extent size differs: here {}/{}, primary {}/{}",
            me.data_size,
            me.extent_size,
            their_state.data_size,
            their_state.extent_size
        );
    }
    // One session at a time: a new connection from the primary replaces a stale one, which
    // ends before this node's state is read, so it cannot change it afterwards.
    let (tx, rx) = std::sync::mpsc::channel();
    s.owner
        .send(Msg::EndSession { reply: tx })
        .map_err(|_| anyhow::anyhow!("{resource}: the resource is stopping"))?;
    rx.recv_timeout(OWNER_WAIT).map_err(|_| {
        anyhow::anyhow!(
            "{resource}: the resource did not end its old session within {}s",
            OWNER_WAIT.as_secs()
        )
    })?;
    let me = state();
    chan.send(&Message::State(me.clone()))?;
    match generation::decide(&their_state, &me) {
        Decision::SplitBrain => {
            record_split_brain(&s, &me, &their_state)?;
            return Ok(());
        }
        Decision::Stale => {
            log::warn!("{resource}: primary {node} at {from} has stale data; not replicating");
            return Ok(());
        }
        Decision::Diskless => {
            // Recorded before the session applies (and acknowledges) any write of it.
            if let Err(e) = hold_only_copy(&s, their_state.peer_gen) {
                say(&mut chan, GoodbyeCode::Error, &format!("{e}"));
                bail!("{resource}: the diskless primary {node} at {from}: {e}");
            }
        }
        Decision::FullSync { .. } | Decision::DirtySync => {}
    }
    chan.stream().set_read_timeout(Some(s.timeout))?;
    chan.stream().set_write_timeout(Some(s.timeout))?;
    // The owner thread starts the session, if this node is still secondary by then.
    let accepted = Accepted {
        chan,
        memsync: mode == 1,
        node,
        from,
        primary_peer_gen: their_state.peer_gen,
    };
    s.owner
        .send(Msg::Session(Box::new(accepted)))
        .map_err(|_| anyhow::anyhow!("{resource}: the resource is stopping"))?;
    Ok(())
}

/// Start the session thread on an accepted connection (called by the owner thread).
pub fn start_session(s: &Arc<Shared>, a: Accepted) -> Result<Session> {
    let Accepted {
        chan,
        memsync,
        node,
        from,
        primary_peer_gen,
    } = a;
    let keep = chan.stream().try_clone()?;
    let writer = chan.writer.clone();
    s.set_conn(|c| {
        c.connection = Connection::Connected;
        c.peer_role = Some(Role::Primary);
        c.in_sync = false;
    });
    log::info!("{}: primary {node} connected from {from}", s.name);
    s.hooks.fire(Event::Connect, &s.name, &[]);
    let s2 = Arc::clone(s);
    let thread = thread::Builder::new()
        .name(format!("sec-{}", s.name))
        .spawn(move || {
            let closer = chan.stream().try_clone();
            let goodbye = chan.writer.clone();
            let r = session(&s2, chan, memsync, primary_peer_gen);
            if let Err(e) = &r {
                say_goodbye(&goodbye, &format!("{e:#}"));
            }
            // The owner keeps a clone of the socket open: shut it, so that the primary sees
            // the end at once (after a protocol error, say) rather than after its timeout.
            if let Ok(c) = closer {
                let _ = c.shutdown(Shutdown::Both);
            }
            let syncing = s2.sync.active.swap(false, Ordering::AcqRel);
            s2.set_conn(|c| {
                c.connection = Connection::Disconnected;
                c.peer_role = None;
                c.in_sync = false;
            });
            match r {
                Ok(()) => log::info!("{}: primary disconnected", s2.name),
                Err(e) => log::warn!("{}: primary connection lost: {e:#}", s2.name),
            }
            if syncing {
                s2.hooks.fire(Event::SyncIntr, &s2.name, &[]);
            }
            s2.hooks.fire(Event::Disconnect, &s2.name, &[]);
        })
        .context("starting the session thread")?;
    Ok(Session {
        stream: keep,
        writer,
        thread,
    })
}

/// Tell the primary why this node ends the session (its log then says so, not just "closed"),
/// unless the writer is busy: never wait for a stuck link here.
fn say_goodbye(w: &Writer, why: &str) {
    let mut reason = why.to_string();
    if reason.len() > 512 {
        let mut end = 512;
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        reason.truncate(end);
    }
    let _ = w.try_send(&Message::Goodbye {
        code: GoodbyeCode::Error,
        reason,
    });
}

/// A write to this node's disk failed (`res`): the disk is detached (`fail_disk`: every
/// extent dirty, the data inconsistent, no replication taken until the daemon restarts on a
/// replaced disk) and the session ends, saying why, rather than answering the error: the
/// primary would drop the link, reconnect and resync onto the same failing disk over and over.
/// A request beyond the disk (`InvalidInput`) is the primary's error, answered as before.
fn detach_on_failure(s: &Shared, what: &str, offset: u64, res: &io::Result<()>) -> Result<()> {
    match res {
        Err(e) if e.kind() != io::ErrorKind::InvalidInput => {
            s.fail_disk(&format!("{what} at {offset}"), e);
            bail!(
                "the local disk {} failed ({what} at {offset}: {e}); detached: replace the disk and recreate its metadata",
                s.disk.path().display()
            )
        }
        _ => Ok(()),
    }
}

/// The primary's local disk failed: from now on this node's copy is the only one. Recorded
/// durably before the primary answers any write that reached only this copy: every extent
/// dirty (all of it goes back to the primary's disk once that is replaced or repaired), and
/// `local_gen` past `primary_peer_gen` (what the primary last recorded of it), so that the
/// primary, restarted on its old disk, finds its data stale here and is neither promoted
/// over this copy nor a sync source for it. Once per failure: a later notice or handshake
/// finds the generation already past.
fn hold_only_copy(s: &Shared, primary_peer_gen: u64) -> io::Result<()> {
    s.disk.activemap().mark_all_dirty()?;
    if s.disk.header().local_gen > primary_peer_gen {
        return Ok(());
    }
    s.disk
        .update_header(|h| h.local_gen = primary_peer_gen + 1)?;
    log::warn!(
        "{}: the primary's disk failed: this node holds the only copy (local generation now {}); the primary's disk gets all of it back once replaced",
        s.name,
        primary_peer_gen + 1
    );
    Ok(())
}

/// Persist, log and hook a split-brain with the peer (once: not again while it is recorded).
fn record_split_brain(s: &Shared, me: &NodeState, theirs: &NodeState) -> Result<()> {
    if me.split_brain {
        return Ok(());
    }
    s.disk.update_header(|h| h.split_brain = true)?;
    let name = &s.name;
    log::error!(
        "{name}: split-brain: both nodes were written while apart (here {}/{}, peer {}/{}); run `tandem resolve {name} --discard-local` on one node",
        me.local_gen,
        me.peer_gen,
        theirs.local_gen,
        theirs.peer_gen
    );
    s.hooks.fire(Event::SplitBrain, name, &[]);
    Ok(())
}

fn errno(e: &io::Error) -> u32 {
    e.raw_os_error().unwrap_or(libc::EIO) as u32
}

/// memsync: a `Received` ack of a write at least this large is sent before the write is
/// applied; smaller ones go out with the batch.
const EARLY_RECEIVED_ACK: usize = 64 << 10;

/// A larger Trim, WriteZeroes or SyncZero is applied in pieces of this size (`in_pieces`), so
/// that the watch sees progress and keeps the link while the whole request takes long. mkfs
/// discards a whole device, up to 4 GiB a request, and a disk without fast zeroing (most
/// spinning disks, many RAID controllers; on FreeBSD the zeroes are always written) takes
/// seconds for that; a single call that long would be a hung disk to the watch. 8 MiB of
/// zeroes take 0.15 s at 60 MB/s.
const ZERO_PIECE: u64 = 8 << 20;

/// What the session is doing on its disk, as the watch (`Watch`) sees it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
enum Doing {
    /// Not in a disk call: reading frames, sending acks (bounded by the socket's timeouts).
    Nothing = 0,
    Writing,
    Zeroing,
    Reading,
    WritingHeader,
    CompletingSync,
}

impl Doing {
    const ALL: [Doing; 6] = [
        Doing::Nothing,
        Doing::Writing,
        Doing::Zeroing,
        Doing::Reading,
        Doing::WritingHeader,
        Doing::CompletingSync,
    ];

    /// The call, as `disk_hangs` names it ("... PATH has not returned").
    fn call(self) -> &'static str {
        match self {
            Doing::Nothing => "nothing on",
            Doing::Writing => "a write to",
            Doing::Zeroing => "zeroing a range of",
            Doing::Reading => "a read of",
            Doing::WritingHeader => "writing the header on",
            Doing::CompletingSync => "completing the sync on",
        }
    }
}

/// The session's disk calls, watched by a thread of their own (`Watch::run`). Every call the
/// session makes on its disk (a write, a read, a piece of a zeroing, a chunk of a hash, the
/// header writes of a sync) may take longer than `daemon.timeout` on a busy disk: a large write
/// throttled by the page cache, a resync chunk on a slow array. Meanwhile the session is
/// silent, and the primary would take a busy secondary for a dead one, drop the link and begin
/// a resync that the same slow disk interrupts again. So while the session is inside a disk
/// call, the watch pings the primary every `ping_interval`; and once one call has not returned
/// for `daemon.flush_timeout`, the disk hangs: the watch says so to the primary and shuts the
/// connection, so the primary goes on alone rather than waiting for it.
///
/// The session alone writes `state`: `(calls begun << 8) | Doing`, with a plain store per call
/// (no read-modify-write, no clock read: nothing a 4 KiB write would notice).
#[derive(Default)]
struct Watch {
    state: AtomicU64,
}

impl Watch {
    /// The session begins a disk call (another one: progress, even if `doing` is the same).
    fn enter(&self, doing: Doing) {
        let begun = (self.state.load(Ordering::Relaxed) >> 8) + 1;
        self.state
            .store((begun << 8) | doing as u64, Ordering::Release);
    }

    /// The session's disk call returned.
    fn leave(&self) {
        let v = self.state.load(Ordering::Relaxed);
        self.state.store(v & !0xff, Ordering::Release);
    }

    /// `call` as a disk call of the kind `doing`.
    fn on_disk<T>(&self, doing: Doing, call: impl FnOnce() -> T) -> T {
        self.enter(doing);
        let r = call();
        self.leave();
        r
    }

    /// The watching thread, until `ended` is dropped: pings while the session is in a disk
    /// call, and gives the connection up once one call has run for `daemon.flush_timeout`.
    fn run(&self, s: &Shared, w: &Writer, stream: &TcpStream, ended: mpsc::Receiver<()>) {
        // The state last seen inside a call, and when it was first seen.
        let mut seen = (0u64, Instant::now());
        while let Err(mpsc::RecvTimeoutError::Timeout) = ended.recv_timeout(s.ping_interval) {
            let now = self.state.load(Ordering::Acquire);
            let doing = Doing::ALL
                .get((now & 0xff) as usize)
                .copied()
                .unwrap_or(Doing::Nothing);
            if doing == Doing::Nothing {
                continue;
            }
            if now != seen.0 {
                seen = (now, Instant::now());
            }
            let ran = seen.1.elapsed();
            if ran >= s.flush_timeout {
                let why = disk_hangs(s, doing.call(), ran);
                log::error!("{}: {why}; closing the connection", s.name);
                say_goodbye(w, &why);
                let _ = stream.shutdown(Shutdown::Both);
                return;
            }
            // Not if acks are being sent meanwhile (the flush thread's): they count as well.
            let _ = w.try_send(&Message::Ping);
        }
    }
}

/// `op` over [offset, offset + len) in pieces of at most `ZERO_PIECE`, each a disk call of its
/// own to the watch. A range beyond the disk is refused whole, before any piece is applied.
fn in_pieces(
    s: &Shared,
    watch: &Watch,
    offset: u64,
    len: u64,
    mut op: impl FnMut(u64, u64) -> io::Result<()>,
) -> io::Result<()> {
    if len <= ZERO_PIECE {
        return watch.on_disk(Doing::Zeroing, || op(offset, len));
    }
    s.disk.check_range(offset, len)?;
    let end = offset + len;
    let mut pos = offset;
    while pos < end {
        let n = ZERO_PIECE.min(end - pos);
        watch.on_disk(Doing::Zeroing, || op(pos, n))?;
        pos += n;
    }
    Ok(())
}

/// Between frames: until the primary's next frame arrives, ping it every `ping_interval`
/// (its pongs and pings are what `peer_silence` counts), and give up once it has been silent
/// for `daemon.timeout`.
fn idle_until_readable(s: &Shared, r: &mut Reader, w: &mut Writer, f: &Flusher) -> Result<()> {
    loop {
        if r.wait_readable(s.ping_interval)
            .context("waiting for the primary's next frame")?
        {
            return Ok(());
        }
        f.check(s)?;
        let silent = s.peer_silence();
        if silent >= s.timeout {
            bail!(
                "nothing from the primary for {} ms (daemon.timeout {} ms)",
                silent.as_millis(),
                s.timeout.as_millis()
            );
        }
        w.write_all(&Message::Ping.encode())?;
        w.flush()?;
    }
}

/// Apply the primary's frames in order until it says goodbye or the connection fails.
///
/// Acks are batched: they collect in a buffer that is sent whenever the next frame is not
/// already received in full (so the next read may block), and before every fdatasync. One
/// send per batch instead of one per request: with 32 writes in flight this was one
/// `sendto` (and one TCP segment) per 4 KiB write.
fn session(s: &Shared, chan: Channel, memsync: bool, primary_peer_gen: u64) -> Result<()> {
    let stream = chan.stream().try_clone()?;
    let Channel { reader, writer, .. } = chan;
    let mut w = writer.clone();
    // This thread applies the writes; records are opened (decrypted) on another, and the
    // fdatasyncs run on a third.
    let reader = reader.open_ahead(format!("open-{}", s.name), MAX_FRAME)?;
    let flusher = Flusher::start(s, writer.clone())?;
    // The disk calls are watched on a fourth (`Watch`), until `apply` returns.
    let watch = Watch::default();
    let (watching, ended) = mpsc::channel::<()>();
    let r = thread::scope(|scope| {
        let (watch, w, stream) = (&watch, &w, &stream);
        let watcher = thread::Builder::new()
            .name(format!("watch-{}", s.name))
            .spawn_scoped(scope, move || watch.run(s, w, stream, ended));
        if let Err(e) = &watcher {
            log::warn!("{}: the session's disk calls are not watched: {e}", s.name);
        }
        let r = apply(
            s,
            reader,
            writer,
            memsync,
            primary_peer_gen,
            &flusher,
            watch,
        );
        drop(watching);
        r
    });
    // The acks of what was applied before an error still go out.
    let _ = w.flush();
    // At a clean end, those of pending fdatasyncs too (unless the disk hangs: no longer than
    // `daemon.flush_timeout`). After an error the connection is closed at once: the
    // flusher ends by itself once its fdatasync returns, and it applies no write.
    if r.is_ok() {
        flusher.finish(s);
    }
    r
}

/// Ack request `seq` with the outcome `res`, logging a failure.
fn ack(name: &str, w: &mut Writer, seq: u64, kind: AckKind, res: io::Result<()>) -> io::Result<()> {
    let status = match &res {
        Ok(()) => 0,
        Err(e) => {
            log::error!("{name}: request {seq} failed: {e}");
            errno(e)
        }
    };
    w.write_all(&Message::Ack { seq, kind, status }.encode())
}

/// The session's fdatasyncs, on a thread of their own: a FLUSH, and a FUA write once it is
/// written, are acknowledged when an fdatasync that began after them returns, while the
/// session goes on applying the frames that follow. An fdatasync covers every write
/// completed before it began, so what the primary asked to be durable is; the writes after
/// a FLUSH need not wait for the disk's cache (on a busy disk, seconds), as they do not on
/// the primary either. Requests queued while an fdatasync runs share the next one.
///
/// Meanwhile the session reads on and answers pings, so a slow fdatasync no longer looks like
/// a dead peer after `daemon.timeout` (each such drop cost a resync). A disk whose fdatasync
/// does not return at all is a hung disk: past `daemon.flush_timeout` the session ends
/// (`check`), so the primary's FLUSH does not hang with it; the primary goes on alone.
struct Flusher {
    tx: Option<mpsc::Sender<u64>>,
    /// Set (to `()`) or dropped when the thread ends.
    ended: mpsc::Receiver<()>,
    /// When the running fdatasync began, in ms after `since` plus one; 0 while none runs.
    busy: Arc<AtomicU64>,
    since: Instant,
}

impl Flusher {
    fn start(s: &Shared, mut w: Writer) -> Result<Flusher> {
        let (tx, rx) = mpsc::channel::<u64>();
        let (ended_tx, ended) = mpsc::channel();
        let busy = Arc::new(AtomicU64::new(0));
        let since = Instant::now();
        let disk: Arc<Disk> = Arc::clone(&s.disk);
        let name = s.name.clone();
        let b = Arc::clone(&busy);
        thread::Builder::new()
            .name(format!("flush-{}", s.name))
            .spawn(move || {
                let _ended = ended_tx;
                while let Ok(first) = rx.recv() {
                    let mut seqs = vec![first];
                    seqs.extend(rx.try_iter());
                    b.store(since.elapsed().as_millis() as u64 + 1, Ordering::Release);
                    let res = disk.sync_data();
                    b.store(0, Ordering::Release);
                    let sent = seqs.iter().try_for_each(|&seq| {
                        let r = match &res {
                            Ok(()) => Ok(()),
                            Err(e) => Err(io::Error::new(e.kind(), format!("fdatasync: {e}"))),
                        };
                        ack(&name, &mut w, seq, AckKind::Written, r)
                    });
                    if sent.and_then(|()| w.flush()).is_err() {
                        // The connection is gone; the session notices on its own.
                        return;
                    }
                }
            })
            .context("starting the flush thread")?;
        Ok(Flusher {
            tx: Some(tx),
            ended,
            busy,
            since,
        })
    }

    /// Ack `seq` (Written) after an fdatasync that begins from now on.
    fn queue(&self, seq: u64) -> Result<()> {
        match &self.tx {
            Some(tx) if tx.send(seq).is_ok() => Ok(()),
            _ => bail!("the flush thread ended"),
        }
    }

    /// How long the running fdatasync has been running, if one is.
    fn running_for(&self) -> Option<Duration> {
        // Checked before every frame: no clock read while no fdatasync runs.
        let began = self.busy.load(Ordering::Acquire);
        if began == 0 {
            return None;
        }
        let now = self.since.elapsed().as_millis() as u64 + 1;
        Some(Duration::from_millis(now.saturating_sub(began)))
    }

    /// An error once an fdatasync has run for `daemon.flush_timeout`.
    fn check(&self, s: &Shared) -> Result<()> {
        let Some(ran) = self.running_for() else {
            return Ok(());
        };
        if ran >= s.flush_timeout {
            bail!("{}", disk_hangs(s, "fdatasync of", ran));
        }
        Ok(())
    }

    /// Let the pending fdatasyncs finish and their acks go out, waiting no longer than
    /// what is left of `daemon.flush_timeout`; a thread stuck in a hung fdatasync is left to
    /// end by itself.
    fn finish(mut self, s: &Shared) {
        self.tx = None;
        let left = s
            .flush_timeout
            .saturating_sub(self.running_for().unwrap_or_default());
        if let Err(mpsc::RecvTimeoutError::Timeout) = self.ended.recv_timeout(left) {
            log::warn!(
                "{}: an fdatasync of {} is still running; the session ends without it",
                s.name,
                s.disk.path().display()
            );
        }
    }
}

/// What a secondary says of a disk call (`doing` the disk's path) that has run for `ran`, past
/// `daemon.flush_timeout`: the same words from the flush thread and from the watch.
fn disk_hangs(s: &Shared, doing: &str, ran: Duration) -> String {
    format!(
        "{doing} {} has not returned for {} ms (daemon.flush_timeout {} ms): the disk hangs",
        s.disk.path().display(),
        ran.as_millis(),
        s.flush_timeout.as_millis()
    )
}

fn apply(
    s: &Shared,
    mut r: Reader,
    mut w: Writer,
    memsync: bool,
    primary_peer_gen: u64,
    f: &Flusher,
    watch: &Watch,
) -> Result<()> {
    let disk = &s.disk;
    let ack = |w: &mut Writer, seq: u64, kind: AckKind, res: io::Result<()>| {
        ack(&s.name, w, seq, kind, res)
    };
    // A FUA request: written, its ack waits for an fdatasync (unless it failed already).
    let durable = |w: &mut Writer, seq: u64, fua: bool, res: io::Result<()>| -> Result<()> {
        match res {
            Ok(()) if fua => f.queue(seq),
            res => Ok(ack(w, seq, AckKind::Written, res)?),
        }
    };
    // Frames are read into one reused buffer; data frames are applied from it in place.
    let mut frame = Vec::new();
    loop {
        f.check(s)?;
        if !r.frame_at_hand() {
            w.flush()?;
            if r.buffer().is_empty() {
                idle_until_readable(s, &mut r, &mut w, f)?;
            }
        }
        let body = match r.read_frame(MAX_FRAME, &mut frame) {
            Ok(b) => {
                s.heard_peer();
                b
            }
            Err(protocol::ProtocolError::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Ok(());
            }
            Err(e) => bail!("{e}"),
        };
        let msg = match protocol::decode_data(body) {
            None => match Message::decode(body) {
                Ok(m) => m,
                Err(e) => bail!("{e}"),
            },
            Some(Err(e)) => bail!("{e}"),
            Some(Ok(DataFrame::SyncChunk { seq, offset, data })) => {
                let res = watch.on_disk(Doing::Writing, || disk.write_at(data, offset));
                detach_on_failure(s, "write", offset, &res)?;
                s.sync.done.fetch_add(data.len() as u64, Ordering::Relaxed);
                s.counters
                    .bytes_resynced
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
                ack(&mut w, seq, AckKind::Written, res)?;
                continue;
            }
            Some(Ok(DataFrame::Write {
                seq,
                offset,
                fua,
                data,
            })) => {
                if memsync {
                    ack(&mut w, seq, AckKind::Received, Ok(()))?;
                    if data.len() >= EARLY_RECEIVED_ACK {
                        w.flush()?;
                    }
                }
                let res = watch.on_disk(Doing::Writing, || disk.write_at(data, offset));
                detach_on_failure(s, "write", offset, &res)?;
                durable(&mut w, seq, fua, res)?;
                continue;
            }
        };
        let zeroes = matches!(msg, Message::WriteZeroes { .. });
        match msg {
            Message::Write { .. } | Message::SyncChunk { .. } => {
                bail!("internal: data frame not decoded in place")
            }
            Message::Trim {
                seq,
                offset,
                len,
                fua,
            }
            | Message::WriteZeroes {
                seq,
                offset,
                len,
                fua,
            } => {
                if memsync {
                    ack(&mut w, seq, AckKind::Received, Ok(()))?;
                }
                let res = in_pieces(s, watch, offset, len, |o, l| match zeroes {
                    true => disk.write_zeroes(o, l),
                    false => disk.punch(o, l),
                });
                detach_on_failure(s, "zeroing", offset, &res)?;
                durable(&mut w, seq, fua, res)?;
            }
            Message::Flush { seq } => f.queue(seq)?,
            Message::DiskFailed { seq } => {
                // In frame order: before every write the primary answers on this copy alone.
                let res =
                    watch.on_disk(Doing::WritingHeader, || hold_only_copy(s, primary_peer_gen));
                ack(&mut w, seq, AckKind::Written, res)?;
            }
            Message::SyncStart { total, full } => {
                if total > 0 || full {
                    w.flush()?;
                    watch.on_disk(Doing::WritingHeader, || {
                        disk.update_header(|h| h.inconsistent = true)
                    })?;
                    s.sync.start(total);
                    log::info!(
                        "{}: receiving a {} sync of {total} bytes",
                        s.name,
                        if full { "full" } else { "partial" }
                    );
                    s.hooks.fire(Event::SyncStart, &s.name, &[]);
                }
            }
            Message::SyncZero { seq, offset, len } => {
                let es = disk.extent_size();
                let whole_extent =
                    offset % es == 0 && (len == es || offset + len == disk.data_size());
                let zero = whole_extent
                    && watch
                        .on_disk(Doing::Reading, || disk.is_zero_extent(offset / es))
                        .unwrap_or(false);
                let res = match zero {
                    true => Ok(()),
                    false => in_pieces(s, watch, offset, len, |o, l| disk.write_zeroes(o, l)),
                };
                detach_on_failure(s, "zeroing", offset, &res)?;
                s.sync.done.fetch_add(len, Ordering::Relaxed);
                ack(&mut w, seq, AckKind::Written, res)?;
            }
            Message::SyncDone { seq, local_gen } => {
                w.flush()?;
                let res = watch.on_disk(Doing::CompletingSync, || {
                    disk.sync_data()?;
                    let am = disk.activemap();
                    for e in am.dirty_extents() {
                        am.mark_synced(e)?;
                    }
                    am.flush_clean()?;
                    disk.update_header(|h| {
                        h.peer_gen = local_gen;
                        h.ever_synced = true;
                        h.inconsistent = false;
                        h.discard_local = false;
                        h.split_brain = false;
                    })
                });
                let ok = res.is_ok();
                if ok {
                    // This disk is now a copy of the primary's, whose generation the primary
                    // records as ours: the next write this node makes alone as primary must
                    // bump local_gen again, even if an earlier outage already bumped it.
                    *s.gen_bumped.lock().unwrap_or_else(|p| p.into_inner()) = false;
                }
                ack(&mut w, seq, AckKind::Written, res)?;
                if ok {
                    let was = s.sync.active.swap(false, Ordering::AcqRel);
                    s.set_conn(|c| c.in_sync = true);
                    if was {
                        log::info!("{}: sync from the primary complete", s.name);
                        s.hooks.fire(Event::SyncDone, &s.name, &[]);
                    }
                }
            }
            Message::VerifyRequest { seq, extent } => {
                // Hashed here, in frame order: the digest covers every write the primary
                // queued before the request and none after it (see verify.rs).
                if extent >= disk.extent_count() {
                    bail!(
                        "protocol error: VerifyRequest for extent {extent}, but the disk has {} extents",
                        disk.extent_count()
                    );
                }
                // Each chunk read is a disk call of its own to the watch.
                let hashed = watch.on_disk(Doing::Reading, || {
                    verify::hash_extent(disk, extent, || {
                        watch.enter(Doing::Reading);
                        Ok(())
                    })
                });
                match hashed {
                    Ok(digest) => w.write_all(
                        &Message::VerifyReply {
                            seq,
                            extent,
                            digest,
                        }
                        .encode(),
                    )?,
                    Err(e) => ack(&mut w, seq, AckKind::Written, Err(e))?,
                }
            }
            Message::ReadRequest { seq, offset, len } => {
                // The primary's local disk failed and it reads from here; in frame order, so
                // the data includes every write it queued before.
                if len as usize > MAX_DATA {
                    bail!("protocol error: ReadRequest of {len} bytes, more than {MAX_DATA}");
                }
                let mut data = vec![0u8; len as usize];
                match watch.on_disk(Doing::Reading, || disk.read_at(&mut data, offset)) {
                    Ok(()) => w.write_all(&Message::ReadReply { seq, data }.encode())?,
                    Err(e) => ack(&mut w, seq, AckKind::Written, Err(e))?,
                }
            }
            Message::Ping => w.write_all(&Message::Pong.encode())?,
            Message::Pong => {}
            Message::Goodbye { reason, .. } => {
                log::info!("{}: primary closed the connection: {reason}", s.name);
                return Ok(());
            }
            other => bail!("unexpected {} from the primary", other.name()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::io::{BufReader, Write};
    use std::net::{TcpListener, TcpStream};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use crate::daemon::Role;
    use crate::daemon::auth::{Secret, Side};
    use crate::daemon::protocol::{
        self, AckKind, GoodbyeCode, MAX_FRAME, Message, NodeState, Purpose,
    };
    use crate::daemon::resource;
    use crate::daemon::state::Msg;

    /// A secondary of a 16 MiB disk (1 MiB extents) whose remote is 127.0.0.1.
    fn secondary(dir: &std::path::Path) -> resource::Handle {
        let handle = resource::start_for_test(dir, "b");
        let (tx, rx) = std::sync::mpsc::channel();
        handle
            .tx
            .send(Msg::Role {
                role: Role::Secondary,
                force: false,
                reply: tx,
            })
            .unwrap();
        assert!(rx.recv().unwrap().is_ok());
        handle
    }

    /// A version-1 primary (before verify existed) is accepted and answered in version 1; the
    /// session applies its writes and answers a VerifyRequest with the digest of the extent
    /// as written; a request beyond the last extent ends the session.
    #[test]
    fn a_version_1_primary_replicates_and_verify_requests_are_answered_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let handle = secondary(dir.path());
        // Version 1 cannot seal the link: accepted only where encryption is off.
        handle.shared.secret.set_encrypt(false);
        let (mut c, answer, accepted) = handshake_as(&handle, 1, Purpose::Replicate);
        assert!(matches!(answer, Ok(Message::State(_))), "{answer:?}");
        accepted.unwrap();
        let data = vec![0x5au8; 8192];
        let mut stream = protocol::encode_write(1, (3 << 20) + 4096, false, &data);
        stream.extend(Message::VerifyRequest { seq: 2, extent: 3 }.encode());
        stream.extend(
            Message::ReadRequest {
                seq: 4,
                offset: (3 << 20) + 4096 - 8,
                len: 16,
            }
            .encode(),
        );
        stream.extend(Message::VerifyRequest { seq: 3, extent: 16 }.encode());
        c.write_all(&stream).unwrap();
        let mut r = BufReader::new(c);
        let ack = protocol::read_message(&mut r, MAX_FRAME).unwrap();
        assert_eq!(
            ack,
            Message::Ack {
                seq: 1,
                kind: AckKind::Written,
                status: 0
            }
        );
        let mut extent = vec![0u8; 1 << 20];
        extent[4096..4096 + 8192].copy_from_slice(&data);
        let want: [u8; 32] = sha2::Digest::finalize(sha2::Digest::chain_update(
            <sha2::Sha256 as sha2::Digest>::new(),
            &extent,
        ))
        .into();
        assert_eq!(
            protocol::read_message(&mut r, MAX_FRAME).unwrap(),
            Message::VerifyReply {
                seq: 2,
                extent: 3,
                digest: want
            }
        );
        // A read of the data as written, for a primary whose own disk failed.
        let mut want = vec![0u8; 8];
        want.extend_from_slice(&[0x5a; 8]);
        assert_eq!(
            protocol::read_message(&mut r, MAX_FRAME).unwrap(),
            Message::ReadReply { seq: 4, data: want }
        );
        // Extent 16 does not exist: the session ends instead of answering, saying why.
        match protocol::read_message(&mut r, MAX_FRAME) {
            Ok(Message::Goodbye {
                code: GoodbyeCode::Error,
                reason,
            }) => assert!(reason.contains("extent 16"), "{reason}"),
            other => panic!("not a Goodbye naming the bad request: {other:?}"),
        }
        assert!(protocol::read_message(&mut r, MAX_FRAME).is_err());
        handle.stop();
    }

    /// The clear handshake of a primary speaking protocol `version` with `purpose`, by hand
    /// (it is answered in its own version): the connection, the secondary's answer to its
    /// `State`, and how `accept` ended.
    fn handshake_as(
        handle: &resource::Handle,
        version: u32,
        purpose: Purpose,
    ) -> (TcpStream, std::io::Result<Message>, Result<()>) {
        let registry = Arc::new(Mutex::new(HashMap::from([(
            "r0".to_string(),
            Arc::clone(&handle.shared),
        )])));
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut c = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, from) = listener.accept().unwrap();
        let acceptor = std::thread::spawn(move || {
            super::accept(server, from, &registry, &Progress::default())
        });
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let ours = [1u8; 32];
        let hello = Message::Hello {
            version,
            purpose,
            mode: 0,
            resource: "r0".into(),
            node: "a".into(),
            nonce: ours,
        };
        protocol::write_message(&mut c, &hello).unwrap();
        let theirs = match protocol::read_message(&mut c, MAX_FRAME).unwrap() {
            Message::Hello {
                version: answered,
                nonce,
                ..
            } => {
                assert_eq!(
                    answered, version,
                    "a version-{version} peer is answered in kind"
                );
                nonce
            }
            other => panic!("{other:?}"),
        };
        let proof = Secret::from_bytes(b"k").proof(Side::Connect, "r0", &ours, &theirs);
        protocol::write_message(&mut c, &Message::Auth { proof }).unwrap();
        assert!(matches!(
            protocol::read_message(&mut c, MAX_FRAME).unwrap(),
            Message::Auth { .. }
        ));
        let me = NodeState {
            role: 1,
            data_size: handle.shared.disk.data_size(),
            extent_size: 1 << 20,
            ..Default::default()
        };
        protocol::write_message(&mut c, &Message::State(me)).unwrap();
        let answer = protocol::read_message(&mut c, MAX_FRAME)
            .map_err(|e| std::io::Error::other(e.to_string()));
        let accepted = acceptor.join().unwrap();
        (c, answer, accepted)
    }

    /// A node whose disk failed says so (`diskless`) to a version-4 peer only: a version-3
    /// primary, which refuses unknown state flags, still reads its state (an upgrade starts
    /// with the secondary). As a secondary it takes no replication, and says why.
    #[test]
    fn a_diskless_node_tells_only_version_4_and_takes_no_replication() {
        let dir = tempfile::tempdir().unwrap();
        let handle = secondary(dir.path());
        handle.shared.secret.set_encrypt(false);
        handle.shared.disk_failed.store(true, Ordering::Release);
        for (version, diskless) in [(3, false), (4, true)] {
            match handshake_as(&handle, version, Purpose::Probe).1 {
                Ok(Message::State(st)) => assert_eq!(st.diskless, diskless, "version {version}"),
                other => panic!("version {version}: {other:?}"),
            }
        }
        match handshake_as(&handle, 4, Purpose::Replicate).1 {
            Ok(Message::Goodbye {
                code: GoodbyeCode::Error,
                reason,
            }) => assert!(reason.contains("disk"), "{reason}"),
            other => panic!("a diskless secondary took replication: {other:?}"),
        }
        handle.stop();
    }

    /// Run the connecting side of the handshake against `accept` on `handle`'s resource.
    fn connect(
        handle: &resource::Handle,
        encrypt: bool,
    ) -> Result<(NodeState, Channel), crate::daemon::peer::HandshakeError> {
        let registry = Arc::new(Mutex::new(HashMap::from([(
            "r0".to_string(),
            Arc::clone(&handle.shared),
        )])));
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, from) = listener.accept().unwrap();
        let acceptor = std::thread::spawn(move || {
            super::accept(server, from, &registry, &Progress::default())
        });
        let secret = Secret::from_bytes(b"k");
        let hello = crate::daemon::peer::Hello {
            resource: "r0",
            node: "a",
            purpose: Purpose::Replicate,
            mode: 0,
            secret: &secret,
            encrypt,
            state: NodeState {
                role: 1,
                data_size: handle.shared.disk.data_size(),
                extent_size: 1 << 20,
                ..Default::default()
            },
        };
        let r = crate::daemon::peer::handshake_connect(c, &hello, Duration::from_secs(10));
        let _ = acceptor.join().unwrap();
        r
    }

    /// Both sides sealed: the session applies a write sent through the channel. One side
    /// sealed and the other not: a handshake error that names the setting, on both sides.
    #[test]
    fn a_sealed_link_replicates_and_an_encrypt_mismatch_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let handle = secondary(dir.path());
        let (_, mut chan) = connect(&handle, true).unwrap();
        let data = vec![0xc3u8; 100_000];
        chan.writer
            .write_all(&protocol::encode_write(1, 1 << 20, true, &data))
            .unwrap();
        chan.writer.flush().unwrap();
        assert_eq!(
            chan.recv(MAX_FRAME).unwrap(),
            Message::Ack {
                seq: 1,
                kind: AckKind::Written,
                status: 0
            }
        );
        let mut back = vec![0u8; data.len()];
        handle.shared.disk.read_at(&mut back, 1 << 20).unwrap();
        assert_eq!(back, data);
        drop(chan);
        for (here, there) in [(true, false), (false, true)] {
            handle.shared.secret.set_encrypt(here);
            match connect(&handle, there) {
                Err(crate::daemon::peer::HandshakeError::Refused(GoodbyeCode::Mismatch, why)) => {
                    assert!(
                        why.contains(&format!("daemon.encrypt is {here}")),
                        "{here}/{there}: {why}"
                    );
                }
                other => panic!("{here}/{there}: {:?}", other.map(|r| r.0)),
            }
        }
        // An old peer cannot seal: refused while this node wants it sealed.
        handle.shared.secret.set_encrypt(true);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut c = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, from) = listener.accept().unwrap();
        let registry = Arc::new(Mutex::new(HashMap::from([(
            "r0".to_string(),
            Arc::clone(&handle.shared),
        )])));
        let acceptor = std::thread::spawn(move || {
            super::accept(server, from, &registry, &Progress::default())
        });
        let hello = Message::Hello {
            version: 2,
            purpose: Purpose::Replicate,
            mode: 0,
            resource: "r0".into(),
            node: "a".into(),
            nonce: [1; 32],
        };
        protocol::write_message(&mut c, &hello).unwrap();
        match protocol::read_message(&mut c, MAX_FRAME).unwrap() {
            Message::Goodbye { code, reason } => {
                assert_eq!(code, GoodbyeCode::Mismatch);
                assert!(reason.contains("cannot encrypt"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        let err = acceptor.join().unwrap().unwrap_err().to_string();
        assert!(err.contains("protocol version 2"), "{err}");
        handle.stop();
    }

    /// A session whose thread reads its end of a loopback connection until it is closed, and
    /// records that it ended.
    fn reading_session(ended: Arc<AtomicBool>) -> Session {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (server, _) = l.accept().unwrap();
        let keep = server.try_clone().unwrap();
        let writer = Channel::clear(server.try_clone().unwrap()).unwrap().writer;
        let thread = thread::spawn(move || {
            let mut buf = [0u8; 64];
            let mut r = &server;
            while io::Read::read(&mut r, &mut buf)
                .map(|n| n > 0)
                .unwrap_or(false)
            {}
            ended.store(true, Ordering::SeqCst);
            drop(client);
        });
        Session {
            stream: keep,
            writer,
            thread,
        }
    }

    /// Two accepts that raced: the second one's session replaces the first, which is ended and
    /// joined before the second starts, so at most one session applies writes at a time.
    #[test]
    fn a_new_session_ends_the_one_it_replaces() {
        let mut slot = None;
        let first = Arc::new(AtomicBool::new(false));
        let f = Arc::clone(&first);
        replace_session(&mut slot, || Ok(reading_session(f))).unwrap();
        assert!(!first.load(Ordering::SeqCst));
        let second = Arc::new(AtomicBool::new(false));
        let s2 = Arc::clone(&second);
        let f = Arc::clone(&first);
        replace_session(&mut slot, move || {
            assert!(
                f.load(Ordering::SeqCst),
                "the old session still runs while the new one starts"
            );
            Ok(reading_session(s2))
        })
        .unwrap();
        assert!(first.load(Ordering::SeqCst));
        assert!(!second.load(Ordering::SeqCst));
        close_session(slot.take().unwrap(), "test");
        assert!(second.load(Ordering::SeqCst));
    }
}
