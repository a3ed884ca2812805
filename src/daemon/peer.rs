//! One authenticated connection to the peer, as the primary uses it for replication.
//!
//! A `Link` owns two threads: the sender writes frames from a channel in order (and a `Ping`
//! when idle for `daemon.ping_interval`), except that a request alone in flight on an idle
//! link is written by the thread that submits it; the receiver reads `Ack`s and completes the
//! waiting request by sequence number. Requests are pipelined: any number can be in flight.
//! When the connection fails (I/O error, bad frame, no frame within the timeout), every
//! pending request completes as failed, so callers finish them locally as degraded.
//!
//! Also here: opening a connection (bound to this node's configured address) and the
//! connecting side of the hello/auth/state handshake, shared by replication and probes.

use std::collections::HashMap;
use std::io::Write;
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::auth::{self, Secret, Side};
use super::channel::{self, Channel, KeyExchange};
use super::nbd::Payload;
use super::protocol::{
    self, AckKind, DIGEST_LEN, GoodbyeCode, MAX_FRAME, MAX_FRAME_UNAUTHENTICATED, Message,
    NodeState, PROTOCOL_VERSION, Purpose,
};

/// The outcome a waiter sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Pending,
    Received,
    Written,
    Failed,
}

type Callback = Box<dyn FnOnce(bool) + Send>;

/// Completion of one request sent to the peer.
pub struct Completion {
    state: Mutex<Progress>,
    cv: Condvar,
    /// Frame bytes, counted in `Pending::bytes` while the request is pending.
    bytes: usize,
    /// What answers the request besides a failed `Ack`.
    answer: Answer,
    /// The peer's digest (`VerifyReply`) or data (`ReadReply`), set before the request
    /// becomes Written.
    reply: Mutex<Option<Vec<u8>>>,
}

/// The outcome so far and the callbacks still waiting for theirs.
struct Progress {
    outcome: Outcome,
    /// Threads blocked in `wait`: without any, a change wakes nobody (a notify is a futex
    /// system call even when no thread waits).
    sleepers: u32,
    /// Each is called once, with `true` when the outcome reached what it waits for
    /// (Received or Written), `false` when the request failed first.
    waiting: Vec<(Outcome, Callback)>,
}

/// A socket timeout (`SO_RCVTIMEO`/`SO_SNDTIMEO` ran out): EAGAIN on Linux and FreeBSD, or
/// the channel's own wording of it.
fn timed_out(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// Whether `now` settles a callback waiting for `want`: Some(success) or None (not yet).
fn settles(now: Outcome, want: Outcome) -> Option<bool> {
    match (now, want) {
        (Outcome::Failed, _) => Some(false),
        (Outcome::Written, _) => Some(true),
        (Outcome::Received, Outcome::Received) => Some(true),
        _ => None,
    }
}

/// What the peer answers a request with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    /// An `Ack` (every replication request).
    Ack,
    /// A `VerifyReply` for this extent.
    Verify(u64),
    /// A `ReadReply` of exactly this many bytes.
    Read(u32),
}

impl Completion {
    fn new(bytes: usize, answer: Answer) -> Arc<Completion> {
        Arc::new(Completion {
            state: Mutex::new(Progress {
                outcome: Outcome::Pending,
                sleepers: 0,
                waiting: Vec::new(),
            }),
            cv: Condvar::new(),
            bytes,
            answer,
            reply: Mutex::new(None),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Progress> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The digest the peer answered a `VerifyRequest` with (None until it did, and for every
    /// other request).
    pub fn digest(&self) -> Option<[u8; DIGEST_LEN]> {
        match self.answer {
            Answer::Verify(_) => self.reply().and_then(|d| d.try_into().ok()),
            _ => None,
        }
    }

    /// The data the peer answered a `ReadRequest` with (None until it did).
    pub fn take_data(&self) -> Option<Vec<u8>> {
        match self.answer {
            Answer::Read(_) => self.reply.lock().unwrap_or_else(|p| p.into_inner()).take(),
            _ => None,
        }
    }

    fn reply(&self) -> Option<Vec<u8>> {
        self.reply.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn answered(&self, data: Vec<u8>) {
        *self.reply.lock().unwrap_or_else(|p| p.into_inner()) = Some(data);
        self.set(Outcome::Written);
    }

    /// Advance the outcome and run the callbacks it settles, on this thread (the receiver's,
    /// or whichever kills the link), after the state lock is released.
    fn set(&self, o: Outcome) {
        let (due, sleepers) = {
            let mut p = self.lock();
            if matches!(p.outcome, Outcome::Written | Outcome::Failed) {
                return;
            }
            p.outcome = o;
            let mut due = Vec::new();
            let mut i = 0;
            while i < p.waiting.len() {
                match settles(o, p.waiting[i].0) {
                    Some(ok) => due.push((ok, p.waiting.swap_remove(i).1)),
                    None => i += 1,
                }
            }
            (due, p.sleepers)
        };
        if sleepers > 0 {
            self.cv.notify_all();
        }
        for (ok, cb) in due {
            cb(ok);
        }
    }

    /// Run `f` when the request is final (at once if it already is): `true` when written on
    /// the peer, `false` when it failed.
    pub fn on_final(&self, f: impl FnOnce(bool) + Send + 'static) {
        self.on(Outcome::Written, f);
    }

    /// Run `f` once the peer has at least `want` (Received or Written), with `true`, or with
    /// `false` once the request failed first; at once if that is already so.
    pub fn on(&self, want: Outcome, f: impl FnOnce(bool) + Send + 'static) {
        let now = {
            let mut p = self.lock();
            match settles(p.outcome, want) {
                Some(ok) => ok,
                None => {
                    p.waiting.push((want, Box::new(f)));
                    return;
                }
            }
        };
        f(now);
    }

    /// Block until the peer has at least `want` (Received or Written) or the request failed;
    /// true on success.
    pub fn wait(&self, want: Outcome) -> bool {
        let mut p = self.lock();
        loop {
            if let Some(ok) = settles(p.outcome, want) {
                return ok;
            }
            p.sleepers += 1;
            p = self.cv.wait(p).unwrap_or_else(|e| e.into_inner());
            p.sleepers -= 1;
        }
    }
}

struct Pending {
    dead: bool,
    map: HashMap<u64, Arc<Completion>>,
    /// Frame bytes of the requests in `map`.
    bytes: usize,
}

impl Pending {
    fn remove(&mut self, seq: u64) -> Option<Arc<Completion>> {
        let c = self.map.remove(&seq)?;
        self.bytes -= c.bytes;
        Some(c)
    }
}

/// One frame for the sender: encoded bytes, and for a write its data, which goes to the
/// socket (or the sealing) from the NBD request's own buffer instead of being copied into
/// the frame.
pub struct Frame {
    head: Vec<u8>,
    body: Option<Payload>,
}

impl Frame {
    /// The frame of a `Write` of `data`.
    pub fn write(seq: u64, offset: u64, fua: bool, data: Payload) -> Frame {
        Frame {
            head: protocol::encode_write_head(seq, offset, fua, data.len()),
            body: Some(data),
        }
    }

    fn len(&self) -> usize {
        self.head.len() + self.body.as_deref().map_or(0, <[u8]>::len)
    }

    /// The encoded head and the payload: given up to the writer if nobody else holds it
    /// (then it may be sealed where it lies: the frame is sent once, then dropped).
    fn parts(&mut self) -> (&[u8], channel::Body<'_>) {
        let body = match self.body.as_mut() {
            None => channel::Body::Shared(&[]),
            Some(p) => {
                if p.unique() {
                    channel::Body::Given(p.get_mut().unwrap_or_default())
                } else {
                    channel::Body::Shared(p)
                }
            }
        };
        (&self.head, body)
    }
}

impl From<Vec<u8>> for Frame {
    fn from(head: Vec<u8>) -> Frame {
        Frame { head, body: None }
    }
}

/// A live replication connection to the secondary.
pub struct Link {
    peer: SocketAddr,
    tx: Mutex<Option<Sender<Frame>>>,
    /// The socket's sending half, shared with the sender thread: a frame queued while the
    /// link is idle is written by the thread that queues it (see `queue`).
    writer: channel::Writer,
    /// Frames given to the sender thread and not yet flushed by it. While any are, a new
    /// frame must queue behind them.
    unsent: AtomicUsize,
    pending: Mutex<Pending>,
    next_seq: AtomicU64,
    dead: AtomicBool,
    dead_cv: Condvar,
    dead_mx: Mutex<()>,
    stream: TcpStream,
    last_error: Mutex<Option<String>>,
    started: Instant,
    /// When a frame last came from the peer, in milliseconds after `started`.
    heard_at: AtomicU64,
}

impl Link {
    /// Start the sender and receiver threads on an authenticated channel: a peer silent for
    /// `timeout` is dead; an idle link is pinged every `ping_every`. A peer that still talks
    /// but takes nothing sent to it is busy with its disk (it pings while it writes its
    /// header or hashes an extent, and reads no frames meanwhile): sends wait for it up to
    /// `send_timeout` (`daemon.flush_timeout`), not `timeout`. A dead peer is still found
    /// after `timeout`, by the receiver, which then shuts the socket under a blocked send.
    pub fn start(
        chan: Channel,
        timeout: Duration,
        send_timeout: Duration,
        ping_every: Duration,
    ) -> Result<Arc<Link>> {
        let peer = chan.peer();
        let stream = chan.stream();
        let send_timeout = send_timeout.max(timeout);
        stream
            .set_read_timeout(Some(timeout))
            .context("socket timeout")?;
        stream
            .set_write_timeout(Some(send_timeout))
            .context("socket timeout")?;
        let _ = stream.set_nodelay(true);
        let (tx, rx) = mpsc::channel::<Frame>();
        let link = Arc::new(Link {
            peer,
            tx: Mutex::new(Some(tx)),
            writer: chan.writer.clone(),
            unsent: AtomicUsize::new(0),
            pending: Mutex::new(Pending {
                dead: false,
                map: HashMap::new(),
                bytes: 0,
            }),
            next_seq: AtomicU64::new(1),
            dead: AtomicBool::new(false),
            dead_cv: Condvar::new(),
            dead_mx: Mutex::new(()),
            stream: stream.try_clone().context("cloning the peer socket")?,
            last_error: Mutex::new(None),
            started: Instant::now(),
            heard_at: AtomicU64::new(0),
        });
        let Channel {
            reader, mut writer, ..
        } = chan;
        let l = Arc::clone(&link);
        let ping_every = ping_every.max(Duration::from_millis(10));
        thread::Builder::new()
            .name("peer-send".into())
            .spawn(move || {
                // The writer buffers (and seals) until flushed, and sends on its own once a
                // quarter MiB is pending.
                let w = &mut writer;
                let result = (|| -> std::io::Result<()> {
                    loop {
                        let (mut frame, mut queued) = match rx.recv_timeout(ping_every) {
                            Ok(f) => (f, 1),
                            Err(RecvTimeoutError::Timeout) => (Message::Ping.encode().into(), 0),
                            Err(RecvTimeoutError::Disconnected) => return w.flush(),
                        };
                        // (A write's payload goes back to its connection's pool as the
                        // frame is dropped, once sent.)
                        let (head, body) = frame.parts();
                        w.write_frame(head, body)?;
                        // Batch whatever is already queued into as few writes as possible.
                        while let Ok(mut f) = rx.try_recv() {
                            let (head, body) = f.parts();
                            w.write_frame(head, body)?;
                            queued += 1;
                        }
                        w.flush()?;
                        l.unsent.fetch_sub(queued, Ordering::AcqRel);
                    }
                })();
                match result {
                    Ok(()) => l.kill("closed"),
                    Err(e) if timed_out(&e) => l.kill(&format!(
                        "the peer took nothing sent to it for {} ms (daemon.flush_timeout)",
                        send_timeout.as_millis()
                    )),
                    Err(e) => l.kill(&format!("send: {e}")),
                }
            })
            .context("starting the peer sender")?;
        let l = Arc::clone(&link);
        let mut rstream = reader;
        thread::Builder::new()
            .name("peer-recv".into())
            .spawn(move || {
                loop {
                    let msg = protocol::read_message(&mut rstream, MAX_FRAME);
                    if msg.is_ok() {
                        let ms = l.started.elapsed().as_millis() as u64;
                        l.heard_at.store(ms, Ordering::Relaxed);
                    }
                    match msg {
                        Ok(Message::Ack { seq, kind, status }) => {
                            let c = match l.pending.lock() {
                                Ok(mut p) => {
                                    if kind == AckKind::Written || status != 0 {
                                        p.remove(seq)
                                    } else {
                                        p.map.get(&seq).cloned()
                                    }
                                }
                                Err(_) => None,
                            };
                            if status != 0 {
                                if let Some(c) = c {
                                    c.set(Outcome::Failed);
                                }
                                l.kill(&format!("peer failed request {seq} with errno {status}"));
                                return;
                            }
                            if let Some(c) = c.as_ref().filter(|c| c.answer != Answer::Ack) {
                                c.set(Outcome::Failed);
                                l.kill(&format!(
                                    "protocol error: Ack for request {seq}, which expects a reply ({:?})",
                                    c.answer
                                ));
                                return;
                            }
                            if let Some(c) = c {
                                c.set(if kind == AckKind::Written {
                                    Outcome::Written
                                } else {
                                    Outcome::Received
                                });
                            }
                        }
                        Ok(Message::VerifyReply {
                            seq,
                            extent,
                            digest,
                        }) => {
                            let c = l.pending.lock().ok().and_then(|mut p| p.remove(seq));
                            match c {
                                Some(c) if c.answer == Answer::Verify(extent) => {
                                    c.answered(digest.to_vec());
                                }
                                other => {
                                    if let Some(c) = other {
                                        c.set(Outcome::Failed);
                                    }
                                    l.kill(&format!(
                                        "protocol error: VerifyReply for extent {extent} answers request {seq}, which is no pending verify of that extent"
                                    ));
                                    return;
                                }
                            }
                        }
                        Ok(Message::ReadReply { seq, data }) => {
                            let c = l.pending.lock().ok().and_then(|mut p| p.remove(seq));
                            match c {
                                Some(c)
                                    if u32::try_from(data.len())
                                        .is_ok_and(|n| c.answer == Answer::Read(n)) =>
                                {
                                    c.answered(data);
                                }
                                other => {
                                    if let Some(c) = other {
                                        c.set(Outcome::Failed);
                                    }
                                    l.kill(&format!(
                                        "protocol error: ReadReply of {} bytes answers request {seq}, which is no pending read of that length",
                                        data.len()
                                    ));
                                    return;
                                }
                            }
                        }
                        Ok(Message::Pong) | Ok(Message::Ping) => {}
                        Ok(Message::Goodbye { code, reason }) => {
                            l.kill(&format!("peer closed ({code:?}): {reason}"));
                            return;
                        }
                        Ok(other) => {
                            l.kill(&format!("unexpected {} from peer", other.name()));
                            return;
                        }
                        Err(protocol::ProtocolError::Io(e)) if timed_out(&e) => {
                            l.kill(&format!(
                                "nothing from the peer for {} ms (daemon.timeout)",
                                timeout.as_millis()
                            ));
                            return;
                        }
                        Err(e) => {
                            l.kill(&format!("receive: {e}"));
                            return;
                        }
                    }
                }
            })
            .context("starting the peer receiver")?;
        Ok(link)
    }

    /// Whether the link is sealed (see `channel::Body`).
    pub fn sealed(&self) -> bool {
        self.writer.sealed()
    }

    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// Requests sent and not yet acknowledged as written.
    pub fn pending(&self) -> usize {
        self.pending.lock().map(|p| p.map.len()).unwrap_or(0)
    }

    /// Frame bytes of the requests sent and not yet acknowledged as written.
    pub fn pending_bytes(&self) -> usize {
        self.pending.lock().map(|p| p.bytes).unwrap_or(0)
    }

    /// How long since the peer last sent a frame (an ack, a reply, a ping or pong).
    pub fn silent_for(&self) -> Duration {
        let at = Duration::from_millis(self.heard_at.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(at)
    }

    pub fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Acquire)
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|g| g.clone())
    }

    /// Mark the link dead, close the socket and fail every pending request.
    pub fn kill(&self, why: &str) {
        let drained: Vec<Arc<Completion>> = match self.pending.lock() {
            Ok(mut p) => {
                if p.dead {
                    return;
                }
                p.dead = true;
                p.bytes = 0;
                p.map.drain().map(|(_, c)| c).collect()
            }
            Err(_) => Vec::new(),
        };
        if let Ok(mut e) = self.last_error.lock() {
            *e = Some(why.to_string());
        }
        log::debug!("link to {}: {why}", self.peer);
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
        let _ = self.stream.shutdown(Shutdown::Both);
        self.dead.store(true, Ordering::Release);
        for c in drained {
            c.set(Outcome::Failed);
        }
        let _g = self.dead_mx.lock();
        self.dead_cv.notify_all();
    }

    /// Wait until the link is dead or `d` passed; true if dead.
    pub fn wait_dead(&self, d: Duration) -> bool {
        let g = match self.dead_mx.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if self.is_dead() {
            return true;
        }
        let _ = self.dead_cv.wait_timeout(g, d);
        self.is_dead()
    }

    /// Queue a frame that expects no acknowledgement.
    pub fn send(&self, msg: &Message) -> bool {
        self.to_sender(Frame::from(msg.encode()))
    }

    /// Give a frame to the sender thread, behind everything queued before.
    fn to_sender(&self, frame: Frame) -> bool {
        self.unsent.fetch_add(1, Ordering::AcqRel);
        let sent = match self.tx.lock() {
            Ok(tx) => tx.as_ref().map(|t| t.send(frame).is_ok()).unwrap_or(false),
            Err(_) => false,
        };
        if !sent {
            self.unsent.fetch_sub(1, Ordering::AcqRel);
        }
        sent
    }

    /// Queue a request built from its sequence number; the completion reports the peer's acks.
    /// On a dead link the completion is already failed.
    pub fn submit(&self, make: impl FnOnce(u64) -> Message) -> Arc<Completion> {
        self.submit_frame(|seq| make(seq).encode().into())
    }

    /// Like `submit`, with the frame already encoded (see `Frame::write`).
    pub fn submit_frame(&self, make: impl FnOnce(u64) -> Frame) -> Arc<Completion> {
        self.queue(make, Answer::Ack)
    }

    /// Queue a `ReadRequest`; once Written, `take_data()` holds the peer's `len` bytes.
    pub fn submit_read(&self, offset: u64, len: u32) -> Arc<Completion> {
        self.queue(
            |seq| Message::ReadRequest { seq, offset, len }.encode().into(),
            Answer::Read(len),
        )
    }

    /// Queue a `VerifyRequest` for `extent`; once Written, `digest()` holds the peer's answer.
    /// Called under the extent's exclusive stripe lock (see `verify.rs`).
    pub fn submit_verify(&self, extent: u64) -> Arc<Completion> {
        self.queue(
            |seq| Message::VerifyRequest { seq, extent }.encode().into(),
            Answer::Verify(extent),
        )
    }

    /// Send a request: written here when it is the only one in flight and nothing is queued
    /// for the sender thread (no other thread writing either), which saves a thread handoff
    /// per request at queue depth 1; queued for the sender thread otherwise, which batches
    /// the frames of a deeper queue into fewer system calls. A frame written here cannot
    /// overtake one queued before it: while any is unsent, this one queues too.
    fn queue(&self, make: impl FnOnce(u64) -> Frame, answer: Answer) -> Arc<Completion> {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let mut frame = make(seq);
        let c = Completion::new(frame.len(), answer);
        // None: the link is dead; Some(alone): no other request awaits the peer's answer.
        let open = match self.pending.lock() {
            Ok(mut p) if !p.dead => {
                p.map.insert(seq, Arc::clone(&c));
                p.bytes += c.bytes;
                Some(p.map.len() == 1)
            }
            _ => None,
        };
        // (The ack may come before this returns: the request is pending already.)
        let inline = match open {
            Some(true) => {
                let (head, body) = frame.parts();
                self.writer
                    .send_frame_if(head, body, || self.unsent.load(Ordering::Acquire) == 0)
            }
            _ => None,
        };
        let queued = match (open, inline) {
            (None, _) => false,
            (Some(_), Some(Ok(()))) => true,
            (Some(_), Some(Err(e))) => {
                self.kill(&format!("send: {e}"));
                return c;
            }
            (Some(_), None) => self.to_sender(frame),
        };
        if !queued {
            if let Ok(mut p) = self.pending.lock() {
                p.remove(seq);
            }
            c.set(Outcome::Failed);
        }
        c
    }

    /// Orderly close: a Goodbye after everything queued, then the socket is shut.
    pub fn close(&self, reason: &str) {
        self.send(&Message::Goodbye {
            code: GoodbyeCode::Normal,
            reason: reason.to_string(),
        });
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
        // The sender drains its queue and exits; give it a moment before cutting the socket.
        self.wait_dead(Duration::from_millis(500));
        self.kill(reason);
    }
}

/// Resolve "host:port" to one socket address.
pub fn resolve(addr: &str) -> Result<SocketAddr> {
    addr.to_socket_addrs()
        .with_context(|| format!("resolving {addr}"))?
        .next()
        .with_context(|| format!("{addr} resolves to no address"))
}

/// Open a TCP connection to `to`, from `from` (this node's address as the peer knows it) if
/// given, within `timeout`.
pub fn connect_from(to: SocketAddr, from: Option<IpAddr>, timeout: Duration) -> Result<TcpStream> {
    let Some(from) = from else {
        return TcpStream::connect_timeout(&to, timeout)
            .with_context(|| format!("connecting to {to}"));
    };
    if from.is_ipv4() != to.is_ipv4() {
        return TcpStream::connect_timeout(&to, timeout)
            .with_context(|| format!("connecting to {to}"));
    }
    let family = if to.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket(2) call; the result is checked before use.
    let raw = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        bail!("socket: {}", std::io::Error::last_os_error());
    }
    // SAFETY: raw is a fresh descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let (local, local_len) = sockaddr(SocketAddr::new(from, 0));
    // SAFETY: local is a valid sockaddr of local_len bytes.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            &local as *const _ as *const libc::sockaddr,
            local_len,
        )
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        log::debug!("cannot bind to {from} ({e}); connecting from any address");
        return TcpStream::connect_timeout(&to, timeout)
            .with_context(|| format!("connecting to {to}"));
    }
    // Connect without blocking so the timeout holds, then back to blocking mode.
    let flags = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_GETFL).context("fcntl")?;
    let nb = nix::fcntl::OFlag::from_bits_truncate(flags) | nix::fcntl::OFlag::O_NONBLOCK;
    nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFL(nb)).context("fcntl")?;
    let (remote, remote_len) = sockaddr(to);
    // SAFETY: remote is a valid sockaddr of remote_len bytes.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            &remote as *const _ as *const libc::sockaddr,
            remote_len,
        )
    };
    let err = if rc == 0 {
        None
    } else {
        Some(std::io::Error::last_os_error())
    };
    match err {
        None => {}
        Some(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {
            use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
            let ms = timeout.as_millis().min(60_000) as u16;
            let mut fds = [PollFd::new(
                std::os::fd::AsFd::as_fd(&fd),
                PollFlags::POLLOUT,
            )];
            let n = poll(&mut fds, PollTimeout::from(ms)).context("poll")?;
            if n == 0 {
                bail!("connecting to {to}: timed out");
            }
            let err = nix::sys::socket::getsockopt(&fd, nix::sys::socket::sockopt::SocketError)
                .context("getsockopt")?;
            if err != 0 {
                // The io::Error kept in the chain: a probe tells "refused" from "timed out".
                return Err(anyhow::Error::new(std::io::Error::from_raw_os_error(err))
                    .context(format!("connecting to {to}")));
            }
        }
        Some(e) => return Err(anyhow::Error::new(e).context(format!("connecting to {to}"))),
    }
    nix::fcntl::fcntl(
        &fd,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::from_bits_truncate(flags)),
    )
    .context("fcntl")?;
    // SAFETY: fd is an open, connected TCP socket we own; into_raw_fd hands over ownership.
    let stream = unsafe { TcpStream::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(fd)) };
    Ok(stream)
}

/// A socket address in the C layout, for bind(2) and connect(2).
fn sockaddr(a: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain data; all-zero is a valid value.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match a {
        SocketAddr::V4(v4) => {
            // SAFETY: sockaddr_storage is large enough and suitably aligned for sockaddr_in.
            let sin =
                unsafe { &mut *(&mut ss as *mut libc::sockaddr_storage as *mut libc::sockaddr_in) };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = v4.port().to_be();
            sin.sin_addr = libc::in_addr {
                s_addr: u32::from_ne_bytes(v4.ip().octets()),
            };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6 = unsafe {
                &mut *(&mut ss as *mut libc::sockaddr_storage as *mut libc::sockaddr_in6)
            };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = v6.port().to_be();
            sin6.sin6_addr = libc::in6_addr {
                s6_addr: v6.ip().octets(),
            };
            sin6.sin6_scope_id = v6.scope_id();
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

/// What the connecting side knows for the handshake.
pub struct Hello<'a> {
    pub resource: &'a str,
    pub node: &'a str,
    pub purpose: Purpose,
    pub mode: u8,
    pub secret: &'a Secret,
    /// Seal the link after authentication (`daemon.encrypt`).
    pub encrypt: bool,
    pub state: NodeState,
}

/// Why a handshake did not produce a connection.
#[derive(Debug)]
pub enum HandshakeError {
    /// The peer said goodbye with a reason code.
    Refused(GoodbyeCode, String),
    Other(anyhow::Error),
}

impl std::fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HandshakeError::Refused(c, r) => write!(f, "peer refused ({c:?}): {r}"),
            HandshakeError::Other(e) => write!(f, "{e:#}"),
        }
    }
}

impl From<anyhow::Error> for HandshakeError {
    fn from(e: anyhow::Error) -> Self {
        HandshakeError::Other(e)
    }
}

fn expect(stream: &mut TcpStream, max: usize) -> Result<Message, HandshakeError> {
    match protocol::read_message(stream, max) {
        Ok(Message::Goodbye { code, reason }) => Err(HandshakeError::Refused(code, reason)),
        Ok(m) => Ok(m),
        Err(e) => Err(HandshakeError::Other(anyhow::anyhow!("handshake: {e}"))),
    }
}

/// The connecting side: Hello, Auth, the key exchange (if `encrypt`), State. Returns the
/// peer's state and the channel, sealed if `encrypt`, for everything after.
pub fn handshake_connect(
    mut stream: TcpStream,
    h: &Hello,
    timeout: Duration,
) -> Result<(NodeState, Channel), HandshakeError> {
    let to = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "the peer".into());
    stream
        .set_read_timeout(Some(timeout))
        .context("socket timeout")?;
    stream
        .set_write_timeout(Some(timeout))
        .context("socket timeout")?;
    let ours = auth::nonce()?;
    let hello = Message::Hello {
        version: PROTOCOL_VERSION,
        purpose: h.purpose,
        mode: h.mode,
        resource: h.resource.to_string(),
        node: h.node.to_string(),
        nonce: ours,
    };
    protocol::write_message(&mut stream, &hello).context("sending hello")?;
    let theirs = match expect(&mut stream, MAX_FRAME_UNAUTHENTICATED)? {
        Message::Hello { version, nonce, .. } => {
            if version != PROTOCOL_VERSION {
                return Err(HandshakeError::Refused(
                    GoodbyeCode::Mismatch,
                    format!("peer speaks protocol version {version}, we speak {PROTOCOL_VERSION}"),
                ));
            }
            nonce
        }
        other => {
            return Err(anyhow::anyhow!("handshake: expected Hello, got {}", other.name()).into());
        }
    };
    let proof = h.secret.proof(Side::Connect, h.resource, &ours, &theirs);
    protocol::write_message(&mut stream, &Message::Auth { proof }).context("sending auth")?;
    match expect(&mut stream, MAX_FRAME_UNAUTHENTICATED)? {
        Message::Auth { proof }
            if h.secret
                .verify(Side::Accept, h.resource, &theirs, &ours, &proof) => {}
        Message::Auth { .. } => {
            return Err(HandshakeError::Refused(
                GoodbyeCode::AuthFailed,
                "peer failed authentication".into(),
            ));
        }
        other => {
            return Err(anyhow::anyhow!("handshake: expected Auth, got {}", other.name()).into());
        }
    }
    let mut chan = if h.encrypt {
        let mut kx = KeyExchange::new(
            channel::Role::Initiator,
            h.secret,
            h.resource,
            &ours,
            &theirs,
        )?;
        let message = kx.write()?;
        protocol::write_message(&mut stream, &Message::Key { message })
            .context("sending the key exchange")?;
        match expect(&mut stream, MAX_FRAME_UNAUTHENTICATED)? {
            Message::Key { message } => kx.read(&message)?,
            Message::State(_) => {
                return Err(HandshakeError::Refused(
                    GoodbyeCode::Mismatch,
                    format!(
                        "{to} answered in clear: daemon.encrypt is true here and false on the peer \
                         (set the same on both nodes)"
                    ),
                ));
            }
            other => {
                return Err(
                    anyhow::anyhow!("handshake: expected Key, got {}", other.name()).into(),
                );
            }
        }
        Channel::sealed(stream, kx.finish()?)?
    } else {
        Channel::clear(stream)?
    };
    chan.send(&Message::State(h.state.clone()))
        .context("sending state")?;
    match chan.recv(MAX_FRAME) {
        Ok(Message::State(s)) => Ok((s, chan)),
        Ok(Message::Goodbye { code, reason }) => Err(HandshakeError::Refused(code, reason)),
        Ok(other) => Err(anyhow::anyhow!("handshake: expected State, got {}", other.name()).into()),
        Err(e) => Err(HandshakeError::Other(anyhow::anyhow!("handshake: {e}"))),
    }
}

/// Sleep for `d` in small steps, returning early (true) when `stop` is set.
pub fn sleep_unless(stop: &AtomicBool, d: Duration) -> bool {
    let end = Instant::now() + d;
    while Instant::now() < end {
        if stop.load(Ordering::Acquire) {
            return true;
        }
        thread::sleep(Duration::from_millis(50).min(end.saturating_duration_since(Instant::now())));
    }
    stop.load(Ordering::Acquire)
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::net::{TcpListener, TcpStream};
    use std::time::Duration;

    use super::{Link, Outcome};
    use crate::daemon::protocol::{self, AckKind, DIGEST_LEN, MAX_FRAME, Message};

    /// A link to a fake secondary that answers the first frame it reads with `answer(frame)`.
    fn link_answered_by(
        answer: impl FnOnce(Message) -> Message + Send + 'static,
    ) -> std::sync::Arc<Link> {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        std::thread::spawn(move || {
            let mut r = std::io::BufReader::new(server.try_clone().unwrap());
            let m = protocol::read_message(&mut r, MAX_FRAME).unwrap();
            let _ = server.write_all(&answer(m).encode());
            // Keep the socket open until the link closes it.
            let _ = protocol::read_message(&mut r, MAX_FRAME);
        });
        Link::start(
            crate::daemon::channel::Channel::clear(client).unwrap(),
            Duration::from_secs(10),
            Duration::from_secs(10),
            Duration::from_secs(2),
        )
        .unwrap()
    }

    /// Writes submitted from several threads at once, some written by the submitting thread
    /// (idle link), some queued for the sender thread: each thread's writes reach the peer
    /// in the order it submitted them (an inline write never overtakes a queued one), and
    /// every one is acknowledged.
    #[test]
    fn a_threads_writes_arrive_in_its_order_whoever_sends_them() {
        const THREADS: u64 = 4;
        const EACH: u64 = 400;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        let peer = std::thread::spawn(move || {
            let mut r = std::io::BufReader::new(server.try_clone().unwrap());
            let mut next = [0u64; THREADS as usize];
            for _ in 0..THREADS * EACH {
                let Message::Write { seq, offset, .. } =
                    protocol::read_message(&mut r, MAX_FRAME).unwrap()
                else {
                    panic!("expected a Write");
                };
                // offset = thread << 32 | index within the thread
                let (t, i) = ((offset >> 32) as usize, offset & 0xffff_ffff);
                assert_eq!(
                    i, next[t],
                    "thread {t}: write {i} came before write {}",
                    next[t]
                );
                next[t] += 1;
                let ack = Message::Ack {
                    seq,
                    kind: AckKind::Written,
                    status: 0,
                };
                server.write_all(&ack.encode()).unwrap();
            }
            let _ = protocol::read_message(&mut r, MAX_FRAME);
        });
        let link = Link::start(
            crate::daemon::channel::Channel::clear(client).unwrap(),
            Duration::from_secs(10),
            Duration::from_secs(10),
            Duration::from_secs(2),
        )
        .unwrap();
        let writers: Vec<_> = (0..THREADS)
            .map(|t| {
                let link = std::sync::Arc::clone(&link);
                std::thread::spawn(move || {
                    let mut waits = Vec::new();
                    for i in 0..EACH {
                        // Payloads of several sizes: some go out by writev from their buffer.
                        let data = vec![t as u8; [512, 4096, 70_000][(i % 3) as usize]];
                        let c = link.submit_frame(|seq| {
                            super::Frame::write(
                                seq,
                                (t << 32) | i,
                                false,
                                crate::daemon::nbd::Payload::from_vec(data),
                            )
                        });
                        // Now and then wait, so the link goes idle and writes go inline.
                        if i % 7 == 0 {
                            assert!(c.wait(Outcome::Written));
                        } else {
                            waits.push(c);
                        }
                    }
                    for c in waits {
                        assert!(c.wait(Outcome::Written));
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        link.kill("test done");
        peer.join().unwrap();
    }

    fn seq_extent(m: &Message) -> (u64, u64) {
        match m {
            Message::VerifyRequest { seq, extent } => (*seq, *extent),
            other => panic!("expected a VerifyRequest, got {other:?}"),
        }
    }

    #[test]
    fn a_verify_reply_delivers_its_digest() {
        let link = link_answered_by(|m| {
            let (seq, extent) = seq_extent(&m);
            Message::VerifyReply {
                seq,
                extent,
                digest: [9; DIGEST_LEN],
            }
        });
        let c = link.submit_verify(4);
        assert!(c.wait(Outcome::Written));
        assert_eq!(c.digest(), Some([9; DIGEST_LEN]));
        assert!(!link.is_dead());
        link.kill("test done");
    }

    /// A reply for another extent, an unsolicited reply and a plain Ack for a verify request
    /// are protocol errors: the link dies and the request fails, nothing panics.
    #[test]
    fn unexpected_verify_answers_kill_the_link() {
        let answers: Vec<Box<dyn FnOnce(Message) -> Message + Send>> = vec![
            Box::new(|m| {
                let (seq, extent) = seq_extent(&m);
                Message::VerifyReply {
                    seq,
                    extent: extent + 1,
                    digest: [0; DIGEST_LEN],
                }
            }),
            Box::new(|m| {
                let (seq, extent) = seq_extent(&m);
                Message::VerifyReply {
                    seq: seq + 100,
                    extent,
                    digest: [0; DIGEST_LEN],
                }
            }),
            Box::new(|m| Message::Ack {
                seq: seq_extent(&m).0,
                kind: AckKind::Written,
                status: 0,
            }),
        ];
        for answer in answers {
            let link = link_answered_by(answer);
            let c = link.submit_verify(4);
            assert!(!c.wait(Outcome::Written));
            assert_eq!(c.digest(), None);
            assert!(link.wait_dead(Duration::from_secs(5)));
            let why = link.last_error().unwrap_or_default();
            assert!(why.contains("protocol error"), "{why}");
        }
    }
}
