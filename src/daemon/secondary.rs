//! The secondary: the listener shared by all resources (`daemon.listen`), the accepting side of
//! the handshake, and the session that applies the primary's writes and sync data in order.
//!
//! A connection is checked before anything is trusted: its first frame must be a `Hello`
//! naming a resource of this node, from the IP address of that resource's `remote`; then both
//! sides prove the shared secret. Only then is any other frame read. Everything refused is
//! logged with the peer's address.

use std::collections::HashMap;
use std::io::{self, BufReader, BufWriter, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::Role;
use super::auth::{self, Side};
use super::generation::{self, Decision};
use super::hooks::Event;
use super::protocol::{
    self, AckKind, DataFrame, GoodbyeCode, MAX_DATA, MAX_FRAME, MAX_FRAME_UNAUTHENTICATED,
    MIN_PROTOCOL_VERSION, Message, NodeState, PROTOCOL_VERSION, Purpose,
};
use super::state::{Accepted, Connection, Msg, Session, Shared};
use super::verify;

/// A peer must complete hello and authentication within this time.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections between accept and the end of the handshake, at most; more are dropped, so a
/// flood of strangers cannot exhaust threads.
const MAX_HANDSHAKES: usize = 32;

/// Resources by name, as the listener looks them up.
pub type Registry = Arc<Mutex<HashMap<String, Arc<Shared>>>>;

/// End a session: say goodbye, shut the socket, wait for its thread.
pub fn close_session(sess: Session, reason: &str) {
    let _ = protocol::write_message(
        &mut &sess.stream,
        &Message::Goodbye {
            code: GoodbyeCode::NotReady,
            reason: reason.into(),
        },
    );
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
pub fn refuse(mut stream: TcpStream, reason: &str) {
    goodbye(&mut stream, GoodbyeCode::NotReady, reason);
    let _ = stream.shutdown(Shutdown::Both);
}

/// How long the listener waits for the owner thread to end an old session.
const OWNER_WAIT: Duration = Duration::from_secs(30);

/// Accept peer connections on `addr` until `stop` is set.
pub fn listen(addr: &str, registry: Registry, stop: Arc<AtomicBool>) -> Result<JoinHandle<()>> {
    let listener = TcpListener::bind(addr).with_context(|| format!("listening on {addr}"))?;
    listener.set_nonblocking(true).context("listener")?;
    log::info!("listening for peers on {addr}");
    let t = thread::Builder::new()
        .name("listen".into())
        .spawn(move || {
            let handshakes = Arc::new(AtomicUsize::new(0));
            while !stop.load(Ordering::Acquire) {
                match listener.accept() {
                    Ok((stream, from)) => {
                        if !may_be_a_peer(&registry, from.ip()) {
                            log::warn!(
                                "peer connection from {from} refused: not the configured remote of any resource"
                            );
                            continue;
                        }
                        if handshakes.load(Ordering::Acquire) >= MAX_HANDSHAKES {
                            log::warn!("peer connection from {from} dropped: too many handshakes in progress");
                            continue;
                        }
                        handshakes.fetch_add(1, Ordering::AcqRel);
                        let reg = Arc::clone(&registry);
                        let hs = Arc::clone(&handshakes);
                        let spawned =
                            thread::Builder::new().name("accept".into()).spawn(move || {
                                let r = accept(stream, from, &reg);
                                hs.fetch_sub(1, Ordering::AcqRel);
                                if let Err(e) = r {
                                    log::warn!("peer connection from {from} refused: {e:#}");
                                }
                            });
                        if let Err(e) = spawned {
                            log::error!("cannot start a thread for {from}: {e}");
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(50))
                    }
                    Err(e) => {
                        log::warn!("accept: {e}");
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
/// MAX_HANDSHAKES slots (which would lock the real primary out).
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

fn accept(mut stream: TcpStream, from: SocketAddr, registry: &Registry) -> Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    stream.set_write_timeout(Some(HANDSHAKE_TIMEOUT))?;
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
    let shared = registry
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&resource)
        .cloned();
    let Some(s) = shared else {
        goodbye(&mut stream, GoodbyeCode::NotReady, "unknown resource");
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
    // An older peer is answered in its own version (it never sends what it does not know);
    // a newer one is refused, as it may send messages this node cannot handle.
    if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&version) {
        goodbye(&mut stream, GoodbyeCode::Mismatch, "protocol version");
        bail!(
            "{resource}: peer speaks protocol version {version}, we speak {MIN_PROTOCOL_VERSION} to {PROTOCOL_VERSION}"
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
    let their_state = match protocol::read_message(&mut stream, MAX_FRAME) {
        Ok(Message::State(st)) => st,
        Ok(other) => bail!("{resource}: expected State, got {}", other.name()),
        Err(e) => bail!("{resource}: {e}"),
    };
    let role = s.role();
    if purpose == Purpose::Probe {
        protocol::write_message(&mut stream, &Message::State(s.node_state()))?;
        log::debug!("{resource}: probed by {node} at {from}");
        return Ok(());
    }
    match role {
        Role::Secondary => {}
        Role::Primary => {
            // Two primaries: the peer was promoted while the link was down. If both were
            // written meanwhile, that is the split-brain a demote would find: report it now,
            // on both nodes (each accepts the other's connection).
            let me = s.node_state();
            if generation::decide(&their_state, &me) == Decision::SplitBrain {
                record_split_brain(&s, &me, &their_state)?;
            }
            goodbye(
                &mut stream,
                GoodbyeCode::PeerPrimary,
                "this node is primary",
            );
            bail!("{resource}: {node} at {from} wants to replicate, but this node is primary");
        }
        Role::Init => {
            goodbye(
                &mut stream,
                GoodbyeCode::NotReady,
                "this node's role is init",
            );
            log::info!("{resource}: {node} at {from} wants to replicate; role is init, refused");
            return Ok(());
        }
    }
    let me = s.node_state();
    if their_state.data_size != me.data_size || their_state.extent_size != me.extent_size {
        goodbye(
            &mut stream,
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
    let me = s.node_state();
    protocol::write_message(&mut stream, &Message::State(me.clone()))?;
    match generation::decide(&their_state, &me) {
        Decision::SplitBrain => {
            record_split_brain(&s, &me, &their_state)?;
            return Ok(());
        }
        Decision::Stale => {
            log::warn!("{resource}: primary {node} at {from} has stale data; not replicating");
            return Ok(());
        }
        Decision::FullSync { .. } | Decision::DirtySync => {}
    }
    stream.set_read_timeout(Some(s.timeout))?;
    stream.set_write_timeout(Some(s.timeout))?;
    // The owner thread starts the session, if this node is still secondary by then.
    let accepted = Accepted {
        stream,
        memsync: mode == 1,
        node,
        from,
    };
    s.owner
        .send(Msg::Session(Box::new(accepted)))
        .map_err(|_| anyhow::anyhow!("{resource}: the resource is stopping"))?;
    Ok(())
}

/// Start the session thread on an accepted connection (called by the owner thread).
pub fn start_session(s: &Arc<Shared>, a: Accepted) -> Result<Session> {
    let Accepted {
        stream,
        memsync,
        node,
        from,
    } = a;
    let keep = stream.try_clone()?;
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
            let closer = stream.try_clone();
            let r = session(&s2, stream, memsync);
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
        thread,
    })
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

/// True if `buf` starts with a whole frame (length prefix and body).
fn holds_frame(buf: &[u8]) -> bool {
    buf.len() >= 4 && buf.len() - 4 >= u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize
}

/// memsync: a `Received` ack of a write at least this large is sent before the write is
/// applied; smaller ones go out with the batch.
const EARLY_RECEIVED_ACK: usize = 64 << 10;

/// Between frames: until the primary's next frame arrives, ping it every `ping_interval`
/// (its pongs and pings are what `peer_silence` counts), and give up once it has been silent
/// for `daemon.timeout`.
fn idle_until_readable(
    s: &Shared,
    r: &BufReader<TcpStream>,
    w: &mut BufWriter<TcpStream>,
) -> Result<()> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let ms = s.ping_interval.as_millis().clamp(1, 60_000) as u16;
    loop {
        let mut fds = [PollFd::new(
            std::os::fd::AsFd::as_fd(r.get_ref()),
            PollFlags::POLLIN,
        )];
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(0) => {}
            Ok(_) => return Ok(()),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => bail!("poll on the primary's connection: {e}"),
        }
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
fn session(s: &Shared, stream: TcpStream, memsync: bool) -> Result<()> {
    let mut w = BufWriter::with_capacity(64 << 10, stream.try_clone()?);
    let mut r = BufReader::with_capacity(256 << 10, stream);
    let disk = &s.disk;
    let ack = |w: &mut BufWriter<TcpStream>,
               seq: u64,
               kind: AckKind,
               res: io::Result<()>|
     -> io::Result<()> {
        let status = match &res {
            Ok(()) => 0,
            Err(e) => {
                log::error!("{}: request {seq} failed: {e}", s.name);
                errno(e)
            }
        };
        w.write_all(&Message::Ack { seq, kind, status }.encode())
    };
    let durable = |fua: bool, res: io::Result<()>| {
        res.and_then(|()| if fua { disk.sync_data() } else { Ok(()) })
    };
    // Frames are read into one reused buffer; data frames are applied from it in place.
    let mut frame = Vec::new();
    loop {
        if !holds_frame(r.buffer()) {
            w.flush()?;
            if r.buffer().is_empty() {
                idle_until_readable(s, &r, &mut w)?;
            }
        }
        let body = match protocol::read_frame(&mut r, MAX_FRAME, &mut frame) {
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
                let res = disk.write_at(data, offset);
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
                if fua {
                    w.flush()?;
                }
                let res = durable(fua, disk.write_at(data, offset));
                ack(&mut w, seq, AckKind::Written, res)?;
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
                if fua {
                    w.flush()?;
                }
                let res = if zeroes {
                    disk.write_zeroes(offset, len)
                } else {
                    disk.punch(offset, len)
                };
                ack(&mut w, seq, AckKind::Written, durable(fua, res))?;
            }
            Message::Flush { seq } => {
                w.flush()?;
                let res = disk.sync_data();
                ack(&mut w, seq, AckKind::Written, res)?;
            }
            Message::SyncStart { total, full } => {
                if total > 0 || full {
                    disk.update_header(|h| h.inconsistent = true)?;
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
                let res = match whole_extent && disk.is_zero_extent(offset / es).unwrap_or(false) {
                    true => Ok(()),
                    false => disk.write_zeroes(offset, len),
                };
                s.sync.done.fetch_add(len, Ordering::Relaxed);
                ack(&mut w, seq, AckKind::Written, res)?;
            }
            Message::SyncDone { seq, local_gen } => {
                w.flush()?;
                let res = (|| -> io::Result<()> {
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
                })();
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
                match verify::hash_extent(disk, extent) {
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
                match disk.read_at(&mut data, offset) {
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

    use super::holds_frame;
    use crate::daemon::Role;
    use crate::daemon::auth::{Secret, Side};
    use crate::daemon::protocol::{self, AckKind, MAX_FRAME, Message, NodeState, Purpose};
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
        let registry = Arc::new(Mutex::new(HashMap::from([(
            "r0".to_string(),
            Arc::clone(&handle.shared),
        )])));
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut c = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, from) = listener.accept().unwrap();
        let acceptor = std::thread::spawn(move || super::accept(server, from, &registry));
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let ours = [1u8; 32];
        let hello = Message::Hello {
            version: 1,
            purpose: Purpose::Replicate,
            mode: 0,
            resource: "r0".into(),
            node: "a".into(),
            nonce: ours,
        };
        protocol::write_message(&mut c, &hello).unwrap();
        let theirs = match protocol::read_message(&mut c, MAX_FRAME).unwrap() {
            Message::Hello { version, nonce, .. } => {
                assert_eq!(version, 1, "a version-1 peer is answered in version 1");
                nonce
            }
            other => panic!("{other:?}"),
        };
        let secret = Secret::from_bytes(b"k");
        let proof = secret.proof(Side::Connect, "r0", &ours, &theirs);
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
        assert!(matches!(
            protocol::read_message(&mut c, MAX_FRAME).unwrap(),
            Message::State(_)
        ));
        acceptor.join().unwrap().unwrap();
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
        // Extent 16 does not exist: the session ends instead of answering.
        assert!(protocol::read_message(&mut r, MAX_FRAME).is_err());
        handle.stop();
    }

    /// A session whose thread reads its end of a loopback connection until it is closed, and
    /// records that it ended.
    fn reading_session(ended: Arc<AtomicBool>) -> Session {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (server, _) = l.accept().unwrap();
        let keep = server.try_clone().unwrap();
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

    #[test]
    fn holds_frame_needs_the_whole_body() {
        let f = Message::Ack {
            seq: 7,
            kind: crate::daemon::protocol::AckKind::Written,
            status: 0,
        }
        .encode();
        assert!(holds_frame(&f));
        assert!(!holds_frame(&f[..f.len() - 1]));
        assert!(!holds_frame(&f[..3]));
        assert!(!holds_frame(&[]));
        let mut two = f.clone();
        two.extend_from_slice(&f[..5]);
        assert!(holds_frame(&two));
    }
}
