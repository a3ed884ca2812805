//! The primary: the replicated block device the NBD export serves, and the connector that
//! keeps a link to the secondary (connect, authenticate, decide the sync direction, resync).
//!
//! Acknowledgement rules per mode: fullsync waits for the peer's `Ack(Written)`, memsync for
//! `Ack(Received)`, async for nothing (the write is queued in order). FUA writes and FLUSH wait
//! for the peer's durable acknowledgement in every mode. Without a link, or when the link dies
//! under a request, the request completes locally: its extents stay dirty and the first such
//! write bumps the local generation.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::activemap::Pending;
use super::channel::{self, Channel};
use super::generation::{self, Decision};
use super::hooks::Event;
use super::metrics::Op;
use super::nbd::{BlockDevice, Done, Payload};
use super::peer::{self, Completion, Frame, HandshakeError, Link, Outcome};
use super::protocol::{self, GoodbyeCode, Message, Purpose};
use super::state::{Connection, Shared};
use super::{Role, sync};
use crate::config::Replication;

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Requests an async primary lets queue up for the peer before writers wait.
const ASYNC_BACKLOG: usize = 4096;
/// Bytes of frames an async primary lets queue up before writers wait: 4096 requests of
/// 1 MiB drove the daemon's VmHWM to 771 MiB.
const ASYNC_BACKLOG_BYTES: usize = 32 << 20;
/// Retry interval while the peer is in role init.
const NOT_READY_RETRY: Duration = Duration::from_secs(1);
/// How often extents left alone since the previous tick are cleaned in the on-disk dirty map.
const IDLE_CLEAN_EVERY: Duration = Duration::from_secs(2);
/// Retry interval while the peer refuses us (stale, split-brain, peer primary).
const REFUSED_RETRY: Duration = Duration::from_secs(5);

/// The block device of the export: local disk plus the peer link.
///
/// One per promotion. Demote fences it once it stops waiting for the export's requests: a
/// request that gets going after that (behind a hung disk, say) fails instead of writing to
/// what is now a secondary's disk, queueing to a peer or bumping the generation.
pub struct Replicated {
    s: Arc<Shared>,
    fenced: Arc<AtomicBool>,
}

impl Replicated {
    pub fn new(s: Arc<Shared>) -> Replicated {
        Replicated {
            s,
            fenced: Arc::new(AtomicBool::new(false)),
        }
    }

    /// A handle that fences this device (for the owner, which keeps it past the export).
    pub fn fence_handle(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.fenced)
    }

    #[cfg(test)]
    fn fence(&self) {
        self.fenced.store(true, Ordering::Release);
    }

    fn check_fence(&self) -> io::Result<()> {
        if self.fenced.load(Ordering::Acquire) {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                format!(
                    "{}: this export is no longer primary (demoted); request refused",
                    self.s.name
                ),
            ));
        }
        Ok(())
    }

    /// The request completed without the peer: the generation says so, unless the export
    /// was fenced meanwhile (then the node is no longer primary and the request fails).
    fn degraded(&self) -> io::Result<()> {
        degraded(&self.s, &self.fenced)
    }

    fn mode_code(mode: Replication) -> u8 {
        match mode {
            Replication::Fullsync => 0,
            Replication::Memsync => 1,
            Replication::Async => 2,
        }
    }

    /// Run a modifying request: mark its extents dirty, apply it locally and queue it to the
    /// peer under the extent locks and with its byte range claimed (so overlapping writes reach
    /// both disks in the same order), then wait as the mode says. A local I/O error fails the
    /// disk, and this request and all later ones go to the peer only (`on_peer`).
    fn modify(
        &self,
        offset: u64,
        len: u64,
        fua: bool,
        local: impl FnOnce() -> io::Result<()>,
        remote: impl FnOnce(u64) -> Frame,
    ) -> io::Result<()> {
        let (c, pending, queued) = match self.issue(offset, len, fua, false, local, remote)? {
            Issued::Done(r) => return r,
            Issued::Queued(c, pending, queued) => (c, pending, queued),
        };
        let s = &self.s;
        let am = s.disk.activemap();
        let mode = s.mode();
        if fua || mode == Replication::Fullsync {
            let ok = c.wait(Outcome::Written);
            return peer_settled(s, &self.fenced, pending, ok, len, queued);
        }
        if mode == Replication::Memsync && !c.wait(Outcome::Received) {
            am.complete_pending(pending, false);
            return self.degraded();
        }
        if self.backlog_full() && !c.wait(Outcome::Written) {
            am.complete_pending(pending, false);
            return self.degraded();
        }
        // memsync (received) or async (queued): the writer is answered now, but the extents stay
        // in flight (dirty, also on disk) until the peer has written the data, so a crash of
        // this node before that still resyncs them.
        self.after_written(c, pending, len, queued);
        Ok(())
    }

    /// Async: past the bounded backlog the writer waits like fullsync (backpressure).
    fn backlog_full(&self) -> bool {
        self.s.mode() == Replication::Async
            && self
                .s
                .link()
                .map(|l| l.pending() > ASYNC_BACKLOG || l.pending_bytes() > ASYNC_BACKLOG_BYTES)
                .unwrap_or(false)
    }

    /// The part of `modify` that does not wait for the peer: dirty bits, local apply, queueing
    /// (and the local fdatasync of a FUA request). `Done` when the request is already
    /// answered (an error, no peer, or a failed disk whose peer copy was awaited).
    ///
    /// `gives_payload`: `remote`'s frame holds a payload that `local` reads and then drops. On
    /// a sealed link, behind other writes awaiting the peer, a large one
    /// (`channel::SEND_DIRECT`) is then written locally first, so that the frame is its only
    /// holder and the link seals it where it lies instead of copying it into its records.
    fn issue(
        &self,
        offset: u64,
        len: u64,
        fua: bool,
        gives_payload: bool,
        local: impl FnOnce() -> io::Result<()>,
        remote: impl FnOnce(u64) -> Frame,
    ) -> io::Result<Issued> {
        let s = &self.s;
        if s.diskless() {
            return Ok(Issued::Done(self.on_peer(offset, len, remote)));
        }
        let am = s.disk.activemap();
        let guard = match am.begin_write(offset, len) {
            Ok(g) => g,
            Err(e) if is_disk_error(&e) => {
                s.fail_disk("writing the dirty map", &e);
                return Ok(Issued::Done(self.on_peer(offset, len, remote)));
            }
            Err(e) => return Err(e),
        };
        let Some((first, last)) = guard.extents() else {
            return Ok(Issued::Done(Ok(())));
        };
        let (completion, queued) = {
            let _order = s.conflicts.claim(offset, len);
            let _locks = s.locks.shared(first, last);
            self.check_fence()?;
            // To the peer first, so that its write runs while this one does, except a large
            // payload on a sealed link (see above). Both happen under the range claim:
            // overlapping requests reach both disks in the same order. Either copy alone is
            // an unanswered write, which a crash may leave half done; the extent is already
            // dirty here, so a resync makes the two agree.
            let queued = Instant::now();
            let link = s.link();
            // Only behind other writes: alone in flight, the frame goes out on this thread
            // at once (`Link::queue`), and B's write overlapping this one's saves more time
            // than the copy costs (a 1 MiB write at queue depth 1: p50 1,034 µs peer first,
            // 1,262 µs local first); deeper, the copy's CPU is what limits.
            let local_first = gives_payload
                && len >= channel::SEND_DIRECT as u64
                && link.as_ref().is_some_and(|l| l.sealed() && l.pending() > 0);
            let mut remote = Some(remote);
            let mut submit = || {
                let c = link
                    .as_ref()
                    .zip(remote.take())
                    .map(|(l, make)| l.submit_frame(make));
                if c.is_some() {
                    s.writes_queued.fetch_add(1, Ordering::AcqRel);
                }
                c
            };
            let (c, applied) = if local_first {
                let applied = local();
                (submit(), applied)
            } else {
                let c = submit();
                (c, local())
            };
            let applied = match applied {
                Ok(()) => Ok(()),
                Err(e) if is_disk_error(&e) => {
                    s.fail_disk("write", &e);
                    Err(e)
                }
                Err(e) => return Err(e),
            };
            if applied.is_err() {
                // The peer's copy is the only one now: answered once it is written there
                // (still holding the range, a single wait when the disk fails).
                drop(guard);
                return Ok(Issued::Done(self.peer_wrote(c, len)));
            }
            (c, queued)
        };
        // Queued before the local fdatasync of a FUA write, so both run at the same time.
        if fua && let Err(e) = s.disk.sync_data() {
            if !is_disk_error(&e) {
                return Err(e);
            }
            s.fail_disk("fdatasync", &e);
            drop(guard);
            return Ok(Issued::Done(self.peer_wrote(completion, len)));
        }
        let Some(c) = completion else {
            guard.done(false);
            return Ok(Issued::Done(self.degraded()));
        };
        Ok(Issued::Queued(c, guard.defer(), queued))
    }

    /// `modify` for a write that is answered through `done` (see
    /// [`BlockDevice::write_then`]): the waiting for the peer happens in callbacks run by the
    /// thread that reads the peer's acknowledgement, so the calling thread goes on at once.
    fn modify_then(
        &self,
        offset: u64,
        len: u64,
        gives_payload: bool,
        local: impl FnOnce() -> io::Result<()>,
        remote: impl FnOnce(u64) -> Frame,
        done: Done,
    ) {
        let (c, pending, queued) =
            match self.issue(offset, len, false, gives_payload, local, remote) {
                Ok(Issued::Queued(c, pending, queued)) => (c, pending, queued),
                Ok(Issued::Done(r)) => return done(r),
                Err(e) => return done(Err(e)),
            };
        let mode = self.s.mode();
        if mode == Replication::Async && !self.backlog_full() {
            self.after_written(c, pending, len, queued);
            return done(Ok(()));
        }
        let want = match mode {
            Replication::Memsync => Outcome::Received,
            _ => Outcome::Written,
        };
        if want == Outcome::Written {
            // fullsync, or async past its backlog: answered once written on the peer.
            let s = Arc::clone(&self.s);
            let fenced = Arc::clone(&self.fenced);
            c.on_final(move |ok| done(peer_settled(&s, &fenced, pending, ok, len, queued)));
            return;
        }
        // memsync: answered once received; the extents stay in flight until written.
        let s = Arc::clone(&self.s);
        let fenced = Arc::clone(&self.fenced);
        c.on(Outcome::Received, move |ok| {
            if ok {
                done(Ok(()))
            } else {
                done(degraded(&s, &fenced))
            }
        });
        self.after_written(c, pending, len, queued);
    }

    /// A modifying request of a diskless primary: to the peer only, in order with the others
    /// (the range claim), answered once the peer has written it.
    fn on_peer(&self, offset: u64, len: u64, remote: impl FnOnce(u64) -> Frame) -> io::Result<()> {
        let s = &self.s;
        let c = {
            let _order = s.conflicts.claim(offset, len);
            self.check_fence()?;
            s.link().map(|l| l.submit_frame(remote))
        };
        self.peer_wrote(c, len)
    }

    /// The request is good once the peer wrote it: the local disk failed.
    fn peer_wrote(&self, c: Option<Arc<Completion>>, len: u64) -> io::Result<()> {
        match c {
            // And only once the peer knows that its copy is the only one.
            Some(c) if c.wait(Outcome::Written) && self.s.peer_knows_diskless() => {
                self.s
                    .counters
                    .bytes_replicated
                    .fetch_add(len, Ordering::Relaxed);
                Ok(())
            }
            _ => Err(self.no_copy()),
        }
    }

    fn no_copy(&self) -> io::Error {
        io::Error::other(format!(
            "{}: the local disk failed and the peer is not reachable and in sync: no copy to serve from",
            self.s.name
        ))
    }

    /// Read from the peer, for a diskless primary. Only a peer in sync has the data.
    fn read_from_peer(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let s = &self.s;
        let link = match s.link() {
            Some(l) if s.conn().in_sync => l,
            _ => return Err(self.no_copy()),
        };
        let mut at = offset;
        for chunk in buf.chunks_mut(protocol::MAX_DATA) {
            let c = link.submit_read(at, chunk.len() as u32);
            match c.wait(Outcome::Written).then(|| c.take_data()).flatten() {
                Some(data) if data.len() == chunk.len() => chunk.copy_from_slice(&data),
                _ => return Err(self.no_copy()),
            }
            at += chunk.len() as u64;
        }
        Ok(())
    }

    fn after_written(&self, c: Arc<Completion>, pending: Pending, len: u64, queued: Instant) {
        let s = Arc::clone(&self.s);
        let fenced = Arc::clone(&self.fenced);
        c.on_final(move |ok| {
            // Nobody waits for the answer. A fenced export's node is no longer primary: its
            // extents stay dirty and are resynced from the new primary, with no generation
            // of its own (and no error to report).
            if let Err(e) = peer_settled(&s, &fenced, pending, ok, len, queued)
                && !fenced.load(Ordering::Acquire)
            {
                log::error!("{}: bumping the generation: {e}", s.name);
            }
        });
    }
}

impl BlockDevice for Replicated {
    fn size(&self) -> u64 {
        self.s.disk.data_size()
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let _t = self.s.metrics.request(Op::Read).start();
        self.s.counters.reads.fetch_add(1, Ordering::Relaxed);
        self.s
            .counters
            .bytes_read
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        if !self.s.diskless() {
            match self.s.disk.read_at(buf, offset) {
                Ok(()) => return Ok(()),
                Err(e) if is_disk_error(&e) => self.s.fail_disk("read", &e),
                Err(e) => return Err(e),
            }
        }
        self.read_from_peer(offset, buf)
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        let _t = self.s.metrics.request(Op::Write).start();
        self.s.counters.writes.fetch_add(1, Ordering::Relaxed);
        self.s
            .counters
            .bytes_written
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        let disk = &self.s.disk;
        self.modify(
            offset,
            data.len() as u64,
            fua,
            || disk.write_at(data, offset),
            |seq| protocol::encode_write(seq, offset, fua, data).into(),
        )
    }

    fn read_now(&self, offset: u64, buf: &mut [u8]) -> Option<io::Result<()>> {
        if self.s.diskless() {
            return None;
        }
        let started = Instant::now();
        match self.s.disk.read_cached(buf, offset)? {
            Ok(()) => {}
            // A disk error (or a stale request) is for `read` to handle, on a worker.
            Err(e) if is_disk_error(&e) => return None,
            Err(e) => return Some(Err(e)),
        }
        self.s.counters.reads.fetch_add(1, Ordering::Relaxed);
        self.s
            .counters
            .bytes_read
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        self.s.metrics.request(Op::Read).observe(started.elapsed());
        Some(Ok(()))
    }

    fn writes_then(&self) -> bool {
        true
    }

    fn busy_poll(&self) -> Duration {
        self.s.busy_poll
    }

    fn write_then(&self, offset: u64, data: Payload, done: Done) {
        // Timed until it is answered, on whichever thread that happens.
        let started = Instant::now();
        let s = Arc::clone(&self.s);
        let done: Done = Box::new(move |r| {
            s.metrics.request(Op::Write).observe(started.elapsed());
            done(r)
        });
        self.s.counters.writes.fetch_add(1, Ordering::Relaxed);
        self.s
            .counters
            .bytes_written
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        let disk = &self.s.disk;
        let len = data.len() as u64;
        // The peer's frame shares the buffer (no copy): it may be sent while the local write
        // reads it. The local write drops its handle when done (see `issue`).
        let frame_data = data.clone();
        self.modify_then(
            offset,
            len,
            true,
            move || disk.write_at(&data, offset),
            |seq| Frame::write(seq, offset, false, frame_data),
            done,
        )
    }

    fn flush(&self) -> io::Result<()> {
        let _t = self.s.metrics.request(Op::Flush).start();
        self.s.counters.flushes.fetch_add(1, Ordering::Relaxed);
        // The peer processes in order: its flush ack covers every write queued before. It is
        // queued before the local fdatasync so that the two run at the same time.
        let s = &self.s;
        let remote = s.link().map(|l| s.queue_peer_flush(&l));
        if !s.diskless()
            && let Err(e) = s.disk.sync_data()
        {
            if !is_disk_error(&e) {
                return Err(e);
            }
            s.fail_disk("fdatasync", &e);
        }
        if s.diskless() {
            // The peer holds the only copy: the flush is good only if it confirmed it.
            return match remote.map(|f| f.wait(s)) {
                Some(true) if s.peer_knows_diskless() => Ok(()),
                _ => Err(self.no_copy()),
            };
        }
        if let Some(f) = remote
            && !f.wait(s)
        {
            log::warn!(
                "{}: flush did not reach the peer; continuing degraded",
                s.name
            );
            // Acknowledged to the client only once the generation says what the peer may lack.
            s.peer_may_have_lost_writes()?;
        }
        Ok(())
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        let _t = self.s.metrics.request(Op::Trim).start();
        self.s.counters.trims.fetch_add(1, Ordering::Relaxed);
        let disk = &self.s.disk;
        self.modify(
            offset,
            len,
            fua,
            || disk.punch(offset, len),
            |seq| {
                Message::Trim {
                    seq,
                    offset,
                    len,
                    fua,
                }
                .encode()
                .into()
            },
        )
    }

    fn write_zeroes(&self, offset: u64, len: u64, fua: bool, no_hole: bool) -> io::Result<()> {
        let _t = self.s.metrics.request(Op::WriteZeroes).start();
        self.s.counters.writes.fetch_add(1, Ordering::Relaxed);
        let disk = &self.s.disk;
        let local = || {
            if no_hole {
                disk.write_zeroes(offset, len)
            } else {
                disk.punch(offset, len)
            }
        };
        self.modify(offset, len, fua, local, |seq| {
            Message::WriteZeroes {
                seq,
                offset,
                len,
                fua,
            }
            .encode()
            .into()
        })
    }
}

/// What `modify` has done before waiting for the peer.
enum Issued {
    /// The request is answered with this.
    Done(io::Result<()>),
    /// Applied locally and queued to the peer; the extents stay in flight until `Pending` is
    /// completed.
    Queued(Arc<Completion>, Pending, Instant),
}

/// The peer settled a queued request (`ok`: it reached what the mode waits for): the
/// extents leave flight, and the request is counted as replicated, or else completed
/// without the peer (`degraded`).
fn peer_settled(
    s: &Shared,
    fenced: &AtomicBool,
    pending: Pending,
    ok: bool,
    len: u64,
    queued: Instant,
) -> io::Result<()> {
    s.disk.activemap().complete_pending(pending, ok);
    if !ok {
        return degraded(s, fenced);
    }
    s.metrics.round_trip.observe(queued.elapsed());
    s.counters
        .bytes_replicated
        .fetch_add(len, Ordering::Relaxed);
    Ok(())
}

/// The request completed without the peer: the generation says so, unless the export was
/// fenced meanwhile (then the node is no longer primary and the request fails).
fn degraded(s: &Shared, fenced: &AtomicBool) -> io::Result<()> {
    if fenced.load(Ordering::Acquire) {
        return Err(io::Error::new(
            io::ErrorKind::BrokenPipe,
            format!(
                "{}: this export is no longer primary (demoted); request refused",
                s.name
            ),
        ));
    }
    s.note_degraded_write()
}

/// An error of the local disk itself, which fails the disk; not a request outside the
/// data region (InvalidInput), which is the client's error.
fn is_disk_error(e: &io::Error) -> bool {
    e.kind() != io::ErrorKind::InvalidInput
}

/// Keep a link to the secondary while this node is primary: connect with backoff, handshake,
/// resync, then watch the link until it dies or `stop` is set.
pub fn connector(s: Arc<Shared>, stop: Arc<AtomicBool>) {
    let mut backoff = BACKOFF_MIN;
    let mut was_connected = false;
    let mut last_refusal = None;
    while !stop.load(Ordering::Acquire) {
        s.set_conn(|c| c.connection = Connection::Connecting);
        match connect_once(&s, &stop, &mut last_refusal) {
            Ok(link) => {
                backoff = BACKOFF_MIN;
                was_connected = true;
                last_refusal = None;
                let mut last_idle = Instant::now();
                while !stop.load(Ordering::Acquire) && !link.wait_dead(Duration::from_millis(200)) {
                    if last_idle.elapsed() >= IDLE_CLEAN_EVERY && !s.diskless() {
                        last_idle = Instant::now();
                        // Clear bits only for data durable on both nodes.
                        let barrier = || match s.disk.sync_data() {
                            Ok(()) => s.peer_flush(&link),
                            Err(e) => {
                                log::warn!(
                                    "{}: fdatasync before cleaning the dirty map: {e}",
                                    s.name
                                );
                                false
                            }
                        };
                        if let Err(e) = s.disk.activemap().flush_idle(barrier) {
                            log::warn!("{}: writing the dirty map: {e}", s.name);
                        }
                    }
                }
                if stop.load(Ordering::Acquire) {
                    // A role change may have found no link to close while this one was still
                    // being set up: close it here, or its pings would keep it alive forever.
                    link.close("role change");
                } else if let Err(e) = s.peer_may_have_lost_writes() {
                    // The peer went away: what it had not flushed may be gone with it.
                    log::error!("{}: bumping the generation: {e}", s.name);
                }
                let why = link.last_error().unwrap_or_default();
                *s.link.write().unwrap_or_else(|p| p.into_inner()) = None;
                s.set_conn(|c| {
                    c.connection = Connection::Disconnected;
                    c.in_sync = false;
                    c.peer_role = None;
                });
                if !stop.load(Ordering::Acquire) {
                    log::warn!("{}: lost the peer {}: {why}", s.name, link.peer());
                    s.hooks.fire(Event::Disconnect, &s.name, &[]);
                } else {
                    // Closed because this node leaves role primary: not a lost peer. The
                    // hook is told, so that a fencing hook (tandem ocf) does not take it
                    // for one: its role still reads primary here, and a constraint placed
                    // now would forbid promoting the peer this demote hands over to.
                    s.hooks.fire(Event::Disconnect, &s.name, &["demote"]);
                }
            }
            Err(ConnectError::Refused(wait)) => {
                s.set_conn(|c| c.connection = Connection::Disconnected);
                if peer::sleep_unless(&stop, wait) {
                    break;
                }
            }
            Err(ConnectError::Failed(e)) => {
                if was_connected || backoff == BACKOFF_MIN {
                    log::info!("{}: cannot connect to the peer: {e:#}", s.name);
                } else {
                    log::debug!("{}: cannot connect to the peer: {e:#}", s.name);
                }
                was_connected = false;
                s.set_conn(|c| c.connection = Connection::Connecting);
                if peer::sleep_unless(&stop, backoff) {
                    break;
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
    s.set_conn(|c| {
        c.connection = Connection::Disconnected;
        c.in_sync = false;
    });
}

enum ConnectError {
    /// The peer refused (or we refused it) for a reason that will not go away soon.
    Refused(Duration),
    Failed(anyhow::Error),
}

impl From<anyhow::Error> for ConnectError {
    fn from(e: anyhow::Error) -> Self {
        ConnectError::Failed(e)
    }
}

fn connect_once(
    s: &Arc<Shared>,
    stop: &AtomicBool,
    last_refusal: &mut Option<GoodbyeCode>,
) -> Result<Arc<Link>, ConnectError> {
    let cfg = s.cfg();
    let addrs = s.addrs();
    let Some(to) = addrs.remote else {
        return Err(ConnectError::Refused(REFUSED_RETRY));
    };
    let stream = peer::connect_from(to, addrs.from, Duration::from_secs(2).min(s.timeout))?;
    let me = s.node_state();
    let secret = s.secret.get();
    let hello = peer::Hello {
        resource: &s.name,
        node: &s.node,
        purpose: Purpose::Replicate,
        mode: Replicated::mode_code(cfg.replication),
        secret: &secret,
        encrypt: s.secret.encrypt(),
        state: me.clone(),
    };
    let (theirs, mut chan) = match peer::handshake_connect(stream, &hello, s.timeout) {
        Ok(t) => {
            s.heard_peer();
            t
        }
        Err(HandshakeError::Refused(code, reason)) => {
            s.heard_peer();
            s.set_conn(|c| {
                c.peer_role = if code == GoodbyeCode::PeerPrimary {
                    Some(Role::Primary)
                } else {
                    None
                }
            });
            // Said once per change, not every retry.
            let repeated = *last_refusal == Some(code);
            *last_refusal = Some(code);
            match code {
                _ if repeated => log::debug!("{}: peer {to} still refuses: {reason}", s.name),
                GoodbyeCode::PeerPrimary => {
                    log::warn!("{}: the peer is primary too: {reason}", s.name);
                }
                GoodbyeCode::AuthFailed => {
                    log::error!("{}: authentication with {to} failed: {reason}", s.name)
                }
                GoodbyeCode::Mismatch => {
                    log::error!("{}: peer {to} does not match: {reason}", s.name)
                }
                _ => log::info!("{}: peer {to} refused: {reason}", s.name),
            }
            // A peer in role init usually becomes secondary soon: ask again quickly.
            return Err(ConnectError::Refused(if code == GoodbyeCode::NotReady {
                NOT_READY_RETRY
            } else {
                REFUSED_RETRY
            }));
        }
        Err(HandshakeError::Other(e)) => return Err(ConnectError::Failed(e)),
    };
    if theirs.data_size != me.data_size || theirs.extent_size != me.extent_size {
        // The peer's dirty-extent map is read in our extent numbering: different extent sizes
        // would resync the wrong ranges.
        let reason = format!(
            "data size or extent size differs: here {}/{}, peer {}/{} (recreate the metadata with the same --extent-size)",
            me.data_size, me.extent_size, theirs.data_size, theirs.extent_size
        );
        refuse(&mut chan, GoodbyeCode::Mismatch, &reason);
        log::error!("{}: {reason}", s.name);
        return Err(ConnectError::Refused(REFUSED_RETRY));
    }
    let decision = generation::decide(&me, &theirs);
    match decision {
        Decision::Stale => {
            refuse(&mut chan, GoodbyeCode::Stale, "the primary's data is stale");
            let first = !s.conn().stale;
            s.set_conn(|c| c.stale = true);
            if first {
                log::error!(
                    "{}: this node's data is stale (generation {}/{}, peer {}/{}); not replicating",
                    s.name,
                    me.local_gen,
                    me.peer_gen,
                    theirs.local_gen,
                    theirs.peer_gen
                );
            }
            return Err(ConnectError::Refused(REFUSED_RETRY));
        }
        Decision::SplitBrain => {
            refuse(&mut chan, GoodbyeCode::SplitBrain, "split-brain");
            if !me.split_brain {
                if let Err(e) = s.disk.update_header(|h| h.split_brain = true) {
                    log::error!("{}: writing metadata: {e}", s.name);
                }
                log::error!(
                    "{}: split-brain: both nodes were written while apart (here {}/{}, peer {}/{}); run `tandem resolve {} --discard-local` on one node",
                    s.name,
                    me.local_gen,
                    me.peer_gen,
                    theirs.local_gen,
                    theirs.peer_gen,
                    s.name
                );
                s.hooks.fire(Event::SplitBrain, &s.name, &[]);
            }
            return Err(ConnectError::Refused(REFUSED_RETRY));
        }
        Decision::FullSync { .. } | Decision::DirtySync | Decision::Diskless => {}
    }
    s.set_conn(|c| c.stale = false);
    let link = Link::start(chan, s.timeout, s.flush_timeout, s.ping_interval)?;
    *s.link.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::clone(&link));
    s.set_conn(|c| {
        c.connection = Connection::Connected;
        c.peer_role = Some(Role::Secondary);
        c.in_sync = false;
    });
    log::info!("{}: connected to {} ({:?})", s.name, link.peer(), decision);
    s.hooks.fire(Event::Connect, &s.name, &[]);
    if s.diskless() {
        // Nothing here to sync from: every write since the disk failed went to the peer only
        // and was answered only once it was written there. The peer recorded that its copy is
        // the only one as it accepted a diskless primary's handshake; if the disk failed after
        // the handshake, it is told now, before any write is answered (`peer_knows_diskless`).
        *s.diskless_notice.lock().unwrap_or_else(|p| p.into_inner()) = match me.diskless {
            true => None,
            false => Some(link.submit(|seq| Message::DiskFailed { seq })),
        };
        // A peer that is itself incomplete (an interrupted sync, a discarded copy) holds no
        // good copy either: reads fail.
        if theirs.inconsistent || !theirs.ever_synced || theirs.discard_local {
            log::error!(
                "{}: the local disk failed and the peer's data is incomplete: no good copy to serve",
                s.name
            );
        } else {
            s.set_conn(|c| c.in_sync = true);
        }
        return Ok(link);
    }
    match sync::run(s, &link, decision, &theirs, stop) {
        Ok(()) => {
            s.set_conn(|c| c.in_sync = true);
            *s.gen_bumped.lock().unwrap_or_else(|p| p.into_inner()) = false;
            // A write that failed on a link dying right at the end of the sync may have found
            // the flag still set and skipped its bump. Such a write was queued and never
            // covered by a peer FLUSH: bump if there is one (a link closed by a role change
            // with no write since is not a write without the peer, and must not make the
            // peer look stale).
            if link.is_dead()
                && let Err(e) = s.peer_may_have_lost_writes()
            {
                log::error!("{}: bumping the generation: {e}", s.name);
            }
        }
        Err(e) => {
            log::warn!("{}: sync interrupted: {e:#}", s.name);
            link.kill("sync interrupted");
        }
    }
    Ok(link)
}

fn refuse(chan: &mut Channel, code: GoodbyeCode, reason: &str) {
    let _ = chan.send(&Message::Goodbye {
        code,
        reason: reason.to_string(),
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::resource::start_for_test;

    /// Demote gave up waiting for the export's requests (a hung disk, say) and the node went
    /// on to become secondary. A request of the old export that gets going only now must not
    /// write to the disk, queue to a peer or bump the generation: it fails.
    #[test]
    fn a_request_of_a_fenced_export_does_not_write_or_bump_the_generation() {
        let dir = tempfile::tempdir().unwrap();
        let handle = start_for_test(dir.path(), "a");
        let s = Arc::clone(&handle.shared);
        let dev = Replicated::new(Arc::clone(&s));
        let gen_before = s.disk.header().local_gen;
        dev.fence();
        let e = dev.write(4096, &[0xee; 4096], false).unwrap_err();
        assert!(e.to_string().contains("no longer primary"), "{e}");
        assert!(dev.trim(0, 4096, false).is_err());
        assert!(dev.write_zeroes(0, 4096, false, true).is_err());
        let mut back = [0u8; 4096];
        s.disk.read_at(&mut back, 4096).unwrap();
        assert_eq!(back, [0u8; 4096], "a fenced write reached the disk");
        assert_eq!(s.disk.header().local_gen, gen_before);
        // Reads of a fenced export still work: they change nothing.
        dev.read(4096, &mut back).unwrap();
        handle.stop();
    }

    /// Without the fence, the same write goes through (degraded: no peer) and bumps the
    /// generation: what a late request did before.
    #[test]
    fn an_unfenced_write_without_a_peer_bumps_the_generation() {
        let dir = tempfile::tempdir().unwrap();
        let handle = start_for_test(dir.path(), "a");
        let s = Arc::clone(&handle.shared);
        let dev = Replicated::new(Arc::clone(&s));
        let gen_before = s.disk.header().local_gen;
        dev.write(4096, &[0xee; 4096], false).unwrap();
        assert_eq!(s.disk.header().local_gen, gen_before + 1);
        handle.stop();
    }
}
