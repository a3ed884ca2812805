//! The channel that carries protocol frames once both daemons have proved the shared secret:
//! in clear (`daemon.encrypt = false`) or sealed, every byte in both directions encrypted and
//! authenticated with keys from a Noise handshake.
//!
//! The key exchange is `Noise_NNpsk0_25519_AESGCM_SHA256` (the `snow` crate, AES-GCM from
//! `ring`): fresh X25519 keys on both sides, mixed with a pre-shared key derived from the
//! secret and bound (prologue) to the nonces of the `Hello`s just exchanged. So only a holder
//! of the secret gets the keys, and a secret that leaks later does not open recorded traffic.
//!
//! Sealed, the byte stream of frames is cut into records: `u16 length` (little-endian) and a
//! Noise transport message of that many bytes (at most 65535: up to 65519 bytes of frames and
//! a 16-byte tag). Each direction numbers its records from 0 and the nonce is that number, so
//! a record that is altered, replayed, reordered or dropped fails authentication: the reader
//! logs it with the peer's address and every later read fails, which closes the link. Frames
//! are read from the plaintext exactly as from a socket, so the frame reader's length check
//! before allocation is unchanged; a record never needs more than its fixed 64 KiB buffer.
//!
//! This module knows nothing of the messages; `peer.rs` and `secondary.rs` run the handshake
//! and hand a `Channel` to the link and the session.

use std::collections::VecDeque;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use snow::StatelessTransportState;

use super::auth::Secret;
use super::protocol::{self, Message, NONCE_LEN, ProtocolError};

/// The Noise protocol: no static keys (the pre-shared key authenticates), AES-GCM because
/// this hardware has AES-NI and it measured 4 times faster than ChaCha20-Poly1305 here.
const NOISE_PARAMS: &str = "Noise_NNpsk0_25519_AESGCM_SHA256";
/// The largest Noise message.
pub const MAX_RECORD: usize = 65535;
const TAG_LEN: usize = 16;
/// Plaintext bytes in a full record.
pub const MAX_PLAIN: usize = MAX_RECORD - TAG_LEN;
/// Largest handshake message (an ephemeral key and a tag; room to spare).
pub const MAX_KEY_MESSAGE: usize = 256;

/// Which side of the key exchange this node is (the connecting side initiates).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Initiator,
    Responder,
}

/// The pre-shared key for one resource: HMAC-SHA256(secret, "tandem-v3 psk" || resource).
fn psk(secret: &Secret, resource: &str) -> [u8; 32] {
    let mut mac = match <Hmac<Sha256> as KeyInit>::new_from_slice(secret.bytes()) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC accepts any key length"),
    };
    mac.update(b"tandem-v3 psk");
    mac.update(resource.as_bytes());
    let mut k = [0u8; 32];
    k.copy_from_slice(&mac.finalize().into_bytes());
    k
}

/// What binds the key exchange to this connection: the resource and both `Hello` nonces.
fn prologue(resource: &str, connect: &[u8; NONCE_LEN], accept: &[u8; NONCE_LEN]) -> Vec<u8> {
    let mut p = b"tandem-v3 link ".to_vec();
    p.extend_from_slice(&(resource.len() as u32).to_le_bytes());
    p.extend_from_slice(resource.as_bytes());
    p.extend_from_slice(connect);
    p.extend_from_slice(accept);
    p
}

/// A key exchange in progress.
pub struct KeyExchange(snow::HandshakeState);

impl KeyExchange {
    /// Start the exchange; `connect`/`accept` are the nonces of the connecting and the
    /// accepting side's `Hello`.
    pub fn new(
        role: Role,
        secret: &Secret,
        resource: &str,
        connect: &[u8; NONCE_LEN],
        accept: &[u8; NONCE_LEN],
    ) -> Result<KeyExchange> {
        let params = NOISE_PARAMS
            .parse()
            .map_err(|e| anyhow!("noise parameters: {e}"))?;
        let key = psk(secret, resource);
        let prologue = prologue(resource, connect, accept);
        let b = snow::Builder::new(params)
            .psk(0, &key)
            .and_then(|b| b.prologue(&prologue))
            .map_err(|e| anyhow!("noise setup: {e}"))?;
        let hs = match role {
            Role::Initiator => b.build_initiator(),
            Role::Responder => b.build_responder(),
        }
        .map_err(|e| anyhow!("noise setup: {e}"))?;
        Ok(KeyExchange(hs))
    }

    /// Our next handshake message.
    pub fn write(&mut self) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; MAX_KEY_MESSAGE];
        let n = self
            .0
            .write_message(&[], &mut buf)
            .map_err(|e| anyhow!("key exchange: {e}"))?;
        buf.truncate(n);
        Ok(buf)
    }

    /// The peer's handshake message; an error if it does not authenticate (another secret).
    pub fn read(&mut self, msg: &[u8]) -> Result<()> {
        let mut buf = vec![0u8; MAX_KEY_MESSAGE];
        self.0.read_message(msg, &mut buf).map_err(|e| {
            anyhow!("key exchange: the peer's key message does not authenticate ({e})")
        })?;
        Ok(())
    }

    /// The transport keys, once both messages have passed.
    pub fn finish(self) -> Result<Keys> {
        let t = self
            .0
            .into_stateless_transport_mode()
            .map_err(|e| anyhow!("key exchange: {e}"))?;
        Ok(Keys(Arc::new(t)))
    }
}

/// The two directions' keys of a sealed channel (shared by its reader and writer; each keeps
/// its own record counter).
#[derive(Clone)]
pub struct Keys(Arc<StatelessTransportState>);

/// A connection after authentication: the socket, its reader and its writer.
pub struct Channel {
    stream: TcpStream,
    peer: SocketAddr,
    pub reader: Reader,
    pub writer: Writer,
}

impl Channel {
    /// Frames in clear (`daemon.encrypt = false`, or before the key exchange).
    pub fn clear(stream: TcpStream) -> Result<Channel> {
        Channel::new(stream, None)
    }

    /// Frames sealed with `keys`.
    pub fn sealed(stream: TcpStream, keys: Keys) -> Result<Channel> {
        Channel::new(stream, Some(keys))
    }

    fn new(stream: TcpStream, keys: Option<Keys>) -> Result<Channel> {
        let peer = stream.peer_addr().context("peer address")?;
        let clone = || stream.try_clone().context("cloning the peer socket");
        let reader = Reader(Source::Direct(Direct {
            inner: BufReader::with_capacity(256 << 10, clone()?),
            peer,
            keys: keys.clone(),
            nonce: 0,
            record: Vec::new(),
            plain: Vec::new(),
            pos: 0,
            end: 0,
            failed: None,
        }));
        let writer = Writer(Arc::new(Mutex::new(WriterInner {
            stream: clone()?,
            keys,
            nonce: 0,
            plain: Vec::new(),
            out: Vec::new(),
            out_len: 0,
        })));
        Ok(Channel {
            stream,
            peer,
            reader,
            writer,
        })
    }

    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// The socket (for timeouts and shutdown).
    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    /// Send one message now.
    pub fn send(&mut self, msg: &Message) -> io::Result<()> {
        self.writer.send(msg)
    }

    /// Read one message of at most `max` bytes.
    pub fn recv(&mut self, max: usize) -> Result<Message, ProtocolError> {
        protocol::read_message(&mut self.reader, max)
    }

    pub fn shutdown(&self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

/// The receiving half: frames are read from it like from a socket.
pub struct Reader(Source);

enum Source {
    Direct(Direct),
    Ahead(Ahead),
}

impl Reader {
    /// Plaintext received and not read yet (all of it is at hand without blocking).
    pub fn buffer(&self) -> &[u8] {
        match &self.0 {
            Source::Direct(d) => d.buffer(),
            Source::Ahead(a) => &a.cur[a.pos..],
        }
    }

    /// Wait up to `timeout` for something to read: true when a read will make progress (data,
    /// the end of the stream or an error to report), false when nothing arrived in time.
    pub fn wait_readable(&mut self, timeout: Duration) -> io::Result<bool> {
        match &mut self.0 {
            Source::Direct(d) => {
                if !d.buffer().is_empty() || !d.inner.buffer().is_empty() || d.failed.is_some() {
                    return Ok(true);
                }
                poll_readable(d.inner.get_ref(), timeout)
            }
            Source::Ahead(a) => a.wait_readable(timeout),
        }
    }

    /// From now on, records may be opened ahead on a thread of its own (named `name`), up to
    /// 16 records, so that the caller's thread (the secondary's session, which also applies the
    /// writes) does not spend its time on AES-GCM while more is waiting in the socket. When
    /// nothing more is waiting, the caller reads and opens the next record itself: a lone
    /// write then wakes one thread on arrival, not the opener and then the caller. Errors
    /// and the end of the stream arrive in order, after the plaintext before them. Nothing
    /// changes for a channel in clear.
    pub fn open_ahead(self, name: String) -> Result<Reader> {
        let mut d = match self.0 {
            Source::Direct(d) if d.keys.is_some() => d,
            other => return Ok(Reader(other)),
        };
        // Plaintext already opened (the end of the last record read here) is read first.
        let mut cur = std::mem::take(&mut d.plain);
        cur.truncate(d.end);
        let pos = d.pos.min(cur.len());
        let fd = d
            .inner
            .get_ref()
            .try_clone()
            .context("cloning the peer socket for the record opener")?;
        let shared = Arc::new(AheadShared {
            state: Mutex::new(AheadState {
                queue: VecDeque::new(),
                direct: Some(Box::new(d)),
                wanted: false,
                closed: false,
                spare: Vec::new(),
                reader_waits: false,
                opener_waits: false,
                opened_ahead: 0,
            }),
            to_reader: Condvar::new(),
            to_opener: Condvar::new(),
        });
        let s2 = Arc::clone(&shared);
        let fd2 = fd
            .try_clone()
            .context("cloning the peer socket for the record opener")?;
        thread::Builder::new()
            .name(name)
            .spawn(move || opener(&s2, &fd2))
            .context("starting the record opener")?;
        Ok(Reader(Source::Ahead(Ahead {
            shared,
            fd,
            cur,
            pos,
            failed: None,
            ended: false,
        })))
    }
}

impl Read for Reader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        match &mut self.0 {
            Source::Direct(d) => d.read(out),
            Source::Ahead(a) => a.read(out),
        }
    }
}

/// A record's plaintext, an error, or `None` at the end of the stream.
type Opened = io::Result<Option<Vec<u8>>>;

/// How many opened records may wait for the reader.
const AHEAD: usize = 16;

/// Records opened by this thread or ahead by another (`Reader::open_ahead`).
struct Ahead {
    shared: Arc<AheadShared>,
    /// The socket, to wait for it without taking the `Direct` from the opener.
    fd: TcpStream,
    cur: Vec<u8>,
    pos: usize,
    failed: Option<(io::ErrorKind, String)>,
    ended: bool,
}

struct AheadShared {
    state: Mutex<AheadState>,
    to_reader: Condvar,
    to_opener: Condvar,
}

struct AheadState {
    /// Opened ahead, in record order, before anything still in the socket.
    queue: VecDeque<Opened>,
    /// The socket's reader; `None` while one of the two threads reads a record from it.
    /// Whoever takes it reads exactly one record and, still under the lock where it puts it
    /// back, queues that record (the opener) or returns it (the reader) before anyone
    /// can read the next: so the order of records is the socket's.
    direct: Option<Box<Direct>>,
    /// More is waiting in the socket while the reader is busy: the opener reads ahead.
    wanted: bool,
    /// The reader went away: the opener ends.
    closed: bool,
    /// Buffers read to the end, to open into again: no allocation per record.
    spare: Vec<Vec<u8>>,
    /// A thread waits on its condvar (so that a wakeup is a system call only when needed).
    reader_waits: bool,
    opener_waits: bool,
    /// Records the opener read (the rest the reader read itself).
    opened_ahead: u64,
}

impl AheadShared {
    fn lock(&self) -> std::sync::MutexGuard<'_, AheadState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Read and open one record from `d` into a buffer of its own.
fn open_one(d: &mut Direct, spare: Option<Vec<u8>>) -> Opened {
    let Some(keys) = d.keys.clone() else {
        return Err(io::Error::other(
            "internal: records opened on a channel in clear",
        ));
    };
    loop {
        match d.next_record(&keys) {
            Ok(true) => {
                let mut full = std::mem::replace(&mut d.plain, spare.unwrap_or_default());
                full.truncate(d.end);
                d.pos = 0;
                d.end = 0;
                return Ok(Some(full));
            }
            Ok(false) => return Ok(None),
            // A socket with a timeout returns EINTR after SIGSTOP/SIGCONT; nothing of the
            // record was consumed yet (`read_exact` retries by itself).
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Is more than what was read waiting: ciphertext buffered, or the socket readable now?
fn more_waiting(d: &Direct, fd: &TcpStream) -> bool {
    !d.inner.buffer().is_empty() || poll_readable(fd, Duration::ZERO).unwrap_or(false)
}

/// The opener thread: reads ahead while the reader is busy and more is waiting.
fn opener(shared: &AheadShared, fd: &TcpStream) {
    let mut st = shared.lock();
    loop {
        if st.closed {
            return;
        }
        if !(st.wanted && st.direct.is_some() && st.queue.len() < AHEAD) {
            st.opener_waits = true;
            st = shared.to_opener.wait(st).unwrap_or_else(|p| p.into_inner());
            st.opener_waits = false;
            continue;
        }
        let Some(mut d) = st.direct.take() else {
            continue;
        };
        // The reader may have read what was waiting itself: never block in the socket here
        // (the reader would then wait for this thread when the next record arrives).
        if !more_waiting(&d, fd) {
            st.direct = Some(d);
            st.wanted = false;
            continue;
        }
        let spare = st.spare.pop();
        drop(st);
        let item = open_one(&mut d, spare);
        let end = !matches!(item, Ok(Some(_)));
        let more = !end && more_waiting(&d, fd);
        st = shared.lock();
        st.queue.push_back(item);
        st.opened_ahead += 1;
        st.direct = Some(d);
        st.wanted = more;
        if st.reader_waits {
            shared.to_reader.notify_one();
        }
        if end {
            return;
        }
    }
}

impl Ahead {
    /// The next record: from the queue, or read here when the opener is not reading one.
    /// With `wait_until`, nothing is read here: it waits until that instant for a record to
    /// be at hand, `Some(Ok(Some(empty)))` saying the socket has something to read now and
    /// `None` that nothing came in time. Without, it reads (as long as the socket's own
    /// timeout allows).
    fn next(&mut self, wait_until: Option<Instant>) -> Option<Opened> {
        let done = std::mem::take(&mut self.cur);
        self.pos = 0;
        let mut st = self.shared.lock();
        if done.capacity() > 0 && st.spare.len() < AHEAD {
            st.spare.push(done);
        }
        loop {
            if let Some(item) = st.queue.pop_front() {
                // The opener may go on now that there is room.
                if st.wanted && st.opener_waits {
                    self.shared.to_opener.notify_one();
                }
                return Some(item);
            }
            if let Some(mut d) = st.direct.take() {
                if let Some(t) = wait_until {
                    drop(st);
                    let left = t.saturating_duration_since(Instant::now());
                    let ready = match d.inner.buffer().is_empty() {
                        false => Ok(true),
                        true => poll_readable(&self.fd, left),
                    };
                    self.shared.lock().direct = Some(d);
                    return match ready {
                        Ok(true) => Some(Ok(Some(Vec::new()))),
                        Ok(false) => None,
                        Err(e) => Some(Err(e)),
                    };
                }
                let spare = st.spare.pop();
                drop(st);
                let item = open_one(&mut d, spare);
                // Only what is already buffered counts here (no system call): a lone write
                // leaves nothing, while a burst of large ones arrives several records a read.
                let more = matches!(item, Ok(Some(_))) && !d.inner.buffer().is_empty();
                let mut st = self.shared.lock();
                st.direct = Some(d);
                st.wanted = more;
                if more && st.opener_waits {
                    self.shared.to_opener.notify_one();
                }
                return Some(item);
            }
            // The opener is reading a record: wait for it.
            st.reader_waits = true;
            st = match wait_until {
                None => self
                    .shared
                    .to_reader
                    .wait(st)
                    .unwrap_or_else(|p| p.into_inner()),
                Some(t) => {
                    let left = t.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        st.reader_waits = false;
                        return None;
                    }
                    self.shared
                        .to_reader
                        .wait_timeout(st, left)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
            };
            st.reader_waits = false;
        }
    }

    /// Take in what `next` returned.
    fn take(&mut self, item: Opened) {
        match item {
            Ok(Some(v)) => {
                self.cur = v;
                self.pos = 0;
            }
            Ok(None) => self.ended = true,
            Err(e) => {
                // Never a sticky Interrupted: `read_exact` would retry it forever.
                let kind = match e.kind() {
                    io::ErrorKind::Interrupted => io::ErrorKind::Other,
                    k => k,
                };
                self.failed = Some((kind, e.to_string()));
            }
        }
    }

    fn wait_readable(&mut self, timeout: Duration) -> io::Result<bool> {
        if self.pos < self.cur.len() || self.failed.is_some() || self.ended {
            return Ok(true);
        }
        match self.next(Some(Instant::now() + timeout)) {
            None => Ok(false),
            // Something can be read from the socket now (not read yet).
            Some(Ok(Some(v))) if v.is_empty() => Ok(true),
            Some(item) => {
                self.take(item);
                Ok(true)
            }
        }
    }
}

impl Drop for Ahead {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        st.closed = true;
        self.shared.to_opener.notify_one();
    }
}

impl Read for Ahead {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.cur.len() {
            if let Some((kind, why)) = &self.failed {
                return Err(io::Error::new(*kind, why.clone()));
            }
            if self.ended {
                return Ok(0);
            }
            match self.next(None) {
                Some(item) => self.take(item),
                None => {
                    return Err(io::Error::other(
                        "internal: a read without a deadline ended",
                    ));
                }
            }
        }
        let n = out.len().min(self.cur.len() - self.pos);
        out[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// How often an accept loop waiting in `poll_readable` looks at its stop flag.
pub(crate) const STOP_CHECK: Duration = Duration::from_millis(100);

/// Is `fd` readable (data, end of stream or error; for a listener, a connection to accept)
/// within `timeout`? An accept loop that must also notice its stop flag waits here for the
/// next connection instead of sleeping between attempts, so a client is served at once.
pub(crate) fn poll_readable(fd: &impl std::os::fd::AsFd, timeout: Duration) -> io::Result<bool> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    // Zero looks without waiting; anything else waits at least a millisecond.
    let ms = match timeout.is_zero() {
        true => 0,
        false => timeout.as_millis().clamp(1, 60_000) as u16,
    };
    loop {
        let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(0) => return Ok(false),
            Ok(_) => return Ok(true),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(io::Error::from(e)),
        }
    }
}

/// Reads and opens records on the caller's thread.
struct Direct {
    inner: BufReader<TcpStream>,
    peer: SocketAddr,
    keys: Option<Keys>,
    /// The number of the next record.
    nonce: u64,
    record: Vec<u8>,
    /// The current record's plaintext is `plain[pos..end]`.
    plain: Vec<u8>,
    pos: usize,
    end: usize,
    /// Once a record failed, every later read fails the same way.
    failed: Option<String>,
}

impl Direct {
    fn buffer(&self) -> &[u8] {
        match self.keys {
            None => self.inner.buffer(),
            Some(_) => &self.plain[self.pos..self.end],
        }
    }

    /// Read and open the next record into `plain`. Ok(false) at a clean end of the stream.
    fn next_record(&mut self, keys: &Keys) -> io::Result<bool> {
        if let Some(why) = &self.failed {
            return Err(io::Error::new(io::ErrorKind::InvalidData, why.clone()));
        }
        let mut len = [0u8; 2];
        let named = |e: io::Error, d: &Self| name_timeout(cut(e), d.inner.get_ref(), true);
        match self.inner.read(&mut len[..1]).map_err(|e| named(e, self))? {
            0 => return Ok(false),
            _ => {
                let r = self.inner.read_exact(&mut len[1..]);
                r.map_err(|e| named(e, self))?
            }
        }
        let len = u16::from_le_bytes(len) as usize;
        if len < TAG_LEN {
            let n = self.nonce;
            return Err(self.fail(format!(
                "sealed record {n} failed authentication: {len} bytes, shorter than its tag"
            )));
        }
        // As long as the largest record (zero-filled only where it grows): ring opens in place
        // in `plain`, and copies the record to a fresh allocation first when `plain` is shorter.
        self.plain.resize(MAX_RECORD, 0);
        // A record already buffered whole is opened from the buffer, not copied out first.
        let opened = if self.inner.buffer().len() >= len {
            let r = keys
                .0
                .read_message(self.nonce, &self.inner.buffer()[..len], &mut self.plain);
            self.inner.consume(len);
            r
        } else {
            self.record.resize(len, 0);
            let r = self.inner.read_exact(&mut self.record);
            r.map_err(|e| named(e, self))?;
            keys.0
                .read_message(self.nonce, &self.record, &mut self.plain)
        };
        match opened {
            Ok(n) => {
                self.end = n;
                self.pos = 0;
                self.nonce += 1;
                Ok(true)
            }
            Err(_) => Err(self.fail(format!(
                "sealed record {} failed authentication: tampered with, replayed, reordered or \
                 dropped on the way",
                self.nonce
            ))),
        }
    }

    fn fail(&mut self, why: String) -> io::Error {
        log::error!("link with {}: {why}; closing the connection", self.peer);
        self.failed = Some(why.clone());
        io::Error::new(io::ErrorKind::InvalidData, why)
    }
}

/// The end of the stream inside a record: a cut link, never applied. Every record carries frame
/// bytes, so this is always inside a frame, and said so as for a cut in clear.
fn cut(e: io::Error) -> io::Error {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "the connection ended in the middle of a frame (inside a sealed record)",
        )
    } else {
        e
    }
}

/// A socket timeout (`SO_RCVTIMEO`/`SO_SNDTIMEO` ran out: EAGAIN) said in words: which peer
/// and how long, instead of "Resource temporarily unavailable". Other errors pass unchanged.
fn name_timeout(e: io::Error, stream: &TcpStream, reading: bool) -> io::Error {
    if !matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    ) {
        return e;
    }
    let peer = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "the peer".into());
    let timeout = match reading {
        true => stream.read_timeout(),
        false => stream.write_timeout(),
    };
    let took = match timeout {
        Ok(Some(t)) => format!("{} ms", t.as_millis()),
        _ => "the socket's timeout".into(),
    };
    let msg = match reading {
        true => format!("nothing from {peer} for {took}"),
        false => format!("{peer} took nothing sent to it for {took}"),
    };
    io::Error::new(io::ErrorKind::TimedOut, msg)
}

impl Read for Direct {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let Some(keys) = self.keys.clone() else {
            return self
                .inner
                .read(out)
                .map_err(|e| name_timeout(e, self.inner.get_ref(), true));
        };
        while self.pos == self.end {
            if !self.next_record(&keys)? {
                return Ok(0);
            }
        }
        let n = out.len().min(self.end - self.pos);
        out[..n].copy_from_slice(&self.plain[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// The sending half; clones share one buffer and record counter, so a `Goodbye` from another
/// thread goes out between whole frames, in record order. Bytes are buffered until `flush`
/// (or until a quarter MiB is pending).
#[derive(Clone)]
pub struct Writer(Arc<Mutex<WriterInner>>);

struct WriterInner {
    stream: TcpStream,
    keys: Option<Keys>,
    nonce: u64,
    /// Frames not sealed yet (at most one record's worth when sealed).
    plain: Vec<u8>,
    /// Sealed records not sent yet: `out[..out_len]` (the rest is room, zeroed once).
    out: Vec<u8>,
    out_len: usize,
}

/// Pending bytes that make a write go out without waiting for `flush`.
const SEND_AT: usize = 256 << 10;
/// A frame's payload this large goes out in the clear from its own buffer, not copied.
const SEND_DIRECT: usize = 64 << 10;

impl WriterInner {
    fn write_all(&mut self, mut data: &[u8]) -> io::Result<()> {
        let Some(keys) = self.keys.clone() else {
            if self.plain.len() + data.len() > SEND_AT {
                self.send_plain()?;
                if data.len() > SEND_AT {
                    let r = self.stream.write_all(data);
                    return r.map_err(|e| name_timeout(e, &self.stream, false));
                }
            }
            self.plain.extend_from_slice(data);
            return Ok(());
        };
        while !data.is_empty() {
            if self.plain.is_empty() && data.len() >= MAX_PLAIN {
                // A whole record straight from the caller's bytes (no copy to `plain`).
                self.seal_from(&keys, &data[..MAX_PLAIN])?;
                data = &data[MAX_PLAIN..];
            } else {
                let n = data.len().min(MAX_PLAIN - self.plain.len());
                self.plain.extend_from_slice(&data[..n]);
                data = &data[n..];
                if self.plain.len() < MAX_PLAIN {
                    continue;
                }
                self.seal(&keys)?;
            }
            if self.out_len >= SEND_AT {
                self.send_out()?;
            }
        }
        Ok(())
    }

    /// Seal `plain` into a record at the end of `out`.
    fn seal(&mut self, keys: &Keys) -> io::Result<()> {
        let plain = std::mem::take(&mut self.plain);
        let r = self.seal_from(keys, &plain);
        self.plain = plain;
        self.plain.clear();
        r
    }

    /// Seal `plain` (at most `MAX_PLAIN` bytes) into a record at the end of `out`.
    fn seal_from(&mut self, keys: &Keys, plain: &[u8]) -> io::Result<()> {
        let start = self.out_len;
        let len = plain.len() + TAG_LEN;
        if self.out.len() < start + 2 + len {
            self.out.resize(start + 2 + len, 0);
        }
        self.out[start..start + 2].copy_from_slice(&(len as u16).to_le_bytes());
        let n = keys
            .0
            .write_message(self.nonce, plain, &mut self.out[start + 2..start + 2 + len])
            .map_err(|e| io::Error::other(format!("sealing a record: {e}")))?;
        debug_assert_eq!(n, len);
        self.nonce += 1;
        self.out_len = start + 2 + len;
        Ok(())
    }

    /// `write_all` of `head` and then `body`, except that in the clear a large `body` is
    /// not copied: it goes out from its own buffer, in one writev with what is buffered.
    /// (Sealed, a body's whole records are sealed straight from it, see `write_all`.)
    fn write_frame(&mut self, head: &[u8], body: &[u8]) -> io::Result<()> {
        if self.keys.is_some() || body.len() < SEND_DIRECT {
            self.write_all(head)?;
            return self.write_all(body);
        }
        self.plain.extend_from_slice(head);
        let r = super::nbd::write_two(&mut self.stream, &self.plain, body);
        self.plain.clear();
        r.map_err(|e| name_timeout(e, &self.stream, false))
    }

    fn send_plain(&mut self) -> io::Result<()> {
        let r = self.stream.write_all(&self.plain);
        self.plain.clear();
        r.map_err(|e| name_timeout(e, &self.stream, false))
    }

    fn send_out(&mut self) -> io::Result<()> {
        let r = self.stream.write_all(&self.out[..self.out_len]);
        self.out_len = 0;
        r.map_err(|e| name_timeout(e, &self.stream, false))
    }

    fn flush(&mut self) -> io::Result<()> {
        match self.keys.clone() {
            None => self.send_plain()?,
            Some(keys) => {
                if !self.plain.is_empty() {
                    self.seal(&keys)?;
                }
                self.send_out()?;
            }
        }
        self.stream.flush()
    }
}

impl Writer {
    fn lock(&self) -> std::sync::MutexGuard<'_, WriterInner> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Encode, queue and flush one message.
    pub fn send(&self, msg: &Message) -> io::Result<()> {
        let mut w = self.lock();
        w.write_all(&msg.encode())?;
        w.flush()
    }

    /// Queue a frame given as its encoded head and its payload (see
    /// `WriterInner::write_frame`); like `write_all`, it goes out at `flush` at the latest.
    pub fn write_frame(&self, head: &[u8], body: &[u8]) -> io::Result<()> {
        self.lock().write_frame(head, body)
    }

    /// Write and flush a frame (as `write_frame` + `flush`) now, on the caller's thread, if no
    /// other thread is writing and `idle` says so under the writer's lock; None (nothing
    /// written) otherwise.
    pub fn send_frame_if(
        &self,
        head: &[u8],
        body: &[u8],
        idle: impl FnOnce() -> bool,
    ) -> Option<io::Result<()>> {
        let mut w = self.0.try_lock().ok()?;
        if !idle() {
            return None;
        }
        Some(w.write_frame(head, body).and_then(|()| w.flush()))
    }

    /// Like `send`, unless another thread is writing right now (then nothing is sent): for a
    /// last word before the socket is shut, which must not wait for a stuck peer.
    pub fn try_send(&self, msg: &Message) -> io::Result<()> {
        match self.0.try_lock() {
            Ok(mut w) => {
                w.write_all(&msg.encode())?;
                w.flush()
            }
            Err(_) => Ok(()),
        }
    }
}

impl Write for Writer {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.lock().write_all(data)?;
        Ok(data.len())
    }

    fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        self.lock().write_all(data)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.lock().flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::protocol::MAX_FRAME;
    use std::net::TcpListener;

    fn keys_pair(a: &Secret, b: &Secret) -> Result<(Keys, Keys)> {
        let (nc, na) = ([1u8; 32], [2u8; 32]);
        let mut i = KeyExchange::new(Role::Initiator, a, "r0", &nc, &na)?;
        let mut r = KeyExchange::new(Role::Responder, b, "r0", &nc, &na)?;
        r.read(&i.write()?)?;
        i.read(&r.write()?)?;
        Ok((i.finish()?, r.finish()?))
    }

    fn secret(b: u8) -> Secret {
        Secret::from_bytes(&[b; 32])
    }

    fn sockets() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        (c, s)
    }

    #[test]
    fn another_secret_fails_the_key_exchange() {
        assert!(keys_pair(&secret(1), &secret(1)).is_ok());
        let err = keys_pair(&secret(1), &secret(2)).err().unwrap().to_string();
        assert!(err.contains("does not authenticate"), "{err}");
    }

    /// Frames of every size cross a sealed channel intact and the bytes on the wire do not
    /// contain them.
    #[test]
    fn frames_cross_sealed_and_never_in_clear() {
        let (ki, kr) = keys_pair(&secret(1), &secret(1)).unwrap();
        let (c, s) = sockets();
        let spy = s.try_clone().unwrap();
        let mut tx = Channel::sealed(c, ki).unwrap();
        let data = b"tandem-cleartext-marker".repeat(100_000);
        let msgs = [
            Message::Ping,
            protocol::Message::Write {
                seq: 1,
                offset: 0,
                fua: false,
                data: data.clone(),
            },
            Message::Flush { seq: 2 },
        ];
        let sent = msgs.clone();
        let t = std::thread::spawn(move || {
            for m in &sent {
                tx.writer.write_all(&m.encode()).unwrap();
            }
            tx.writer.flush().unwrap();
            tx
        });
        // Record the raw bytes, then read them back through a sealed reader.
        let mut raw = Vec::new();
        let want: usize = msgs.iter().map(|m| m.encode().len()).sum();
        let mut spy_r = spy;
        let mut buf = vec![0u8; 1 << 16];
        while raw.len() < want {
            let n = spy_r.read(&mut buf).unwrap();
            assert!(n > 0);
            raw.extend_from_slice(&buf[..n]);
        }
        let _tx = t.join().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        spy_r.set_nonblocking(true).unwrap();
        while let Ok(n) = spy_r.read(&mut buf) {
            if n == 0 {
                break;
            }
            raw.extend_from_slice(&buf[..n]);
        }
        assert!(
            !raw.windows(23).any(|w| w == b"tandem-cleartext-marker"),
            "cleartext on the wire"
        );
        let (c2, mut s2) = sockets();
        s2.write_all(&raw).unwrap();
        drop(s2);
        let mut rx = Channel::sealed(c2, kr).unwrap();
        for m in &msgs {
            assert_eq!(&rx.recv(MAX_FRAME).unwrap(), m);
        }
        // The stream ended cleanly between frames.
        assert!(matches!(rx.recv(MAX_FRAME), Err(ProtocolError::Io(_))));
    }

    /// Opened ahead, records are read by the opener while the reader is busy and more is
    /// waiting, and by the reader itself otherwise: under traffic that comes in bursts and
    /// pauses, with a reader that is sometimes slow, every frame arrives once, whole and in
    /// order, and `wait_readable` times out only when nothing is there.
    #[test]
    fn records_opened_by_either_thread_arrive_once_and_in_order() {
        let (ki, kr) = keys_pair(&secret(1), &secret(1)).unwrap();
        let (c, s) = sockets();
        let tx = Channel::sealed(c, ki).unwrap();
        // Sizes from a few bytes to several records, from a fixed pseudo-random sequence.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let msgs: Vec<Message> = (0..600u64)
            .map(|seq| {
                let r = next();
                let len = match r % 10 {
                    0 => 200_000 + (r >> 8) as usize % 70_000,
                    1..=3 => MAX_PLAIN - 20 + (r >> 8) as usize % 40,
                    _ => 1 + (r >> 8) as usize % 8192,
                };
                Message::Write {
                    seq,
                    offset: r >> 20,
                    fua: false,
                    data: vec![(seq % 251) as u8; len],
                }
            })
            .collect();
        let pauses: Vec<u64> = (0..msgs.len()).map(|_| next() % 8).collect();
        let sent = msgs.clone();
        let t = std::thread::spawn(move || {
            // The whole channel, not only the writer: its end closes the socket.
            let mut tx = tx;
            for (m, p) in sent.iter().zip(&pauses) {
                tx.writer.write_all(&m.encode()).unwrap();
                // A burst goes out together; a pause lets the reader catch up and wait.
                if *p < 4 {
                    tx.writer.flush().unwrap();
                    std::thread::sleep(Duration::from_micros(400 * p));
                }
            }
            tx.writer.flush().unwrap();
        });
        let Channel { reader, .. } = Channel::sealed(s, kr).unwrap();
        let mut r = reader.open_ahead("test-open".into()).unwrap();
        let mut waits = 0;
        for (i, want) in msgs.iter().enumerate() {
            match next() % 6 {
                // Wait as the session does between frames, in short steps.
                0 => {
                    let mut steps = 0;
                    while !r.wait_readable(Duration::from_millis(1)).unwrap() {
                        steps += 1;
                        assert!(steps < 10_000, "frame {i} never became readable");
                    }
                    waits += steps;
                }
                // A slow reader: the opener gets ahead.
                1 => std::thread::sleep(Duration::from_micros(300)),
                _ => {}
            }
            assert_eq!(
                &protocol::read_message(&mut r, MAX_FRAME).unwrap(),
                want,
                "frame {i}"
            );
        }
        t.join().unwrap();
        // The sender is gone: the end of the stream, reported as such.
        assert!(r.wait_readable(Duration::from_secs(5)).unwrap());
        match protocol::read_message(&mut r, MAX_FRAME) {
            Err(ProtocolError::Io(e)) => assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof),
            other => panic!("after the last frame: {other:?}"),
        }
        let ahead = match &r.0 {
            Source::Ahead(a) => a.shared.lock().opened_ahead,
            Source::Direct(_) => 0,
        };
        eprintln!("{waits} waits timed out, {ahead} records opened ahead");
        // Both ways were taken.
        assert!(
            waits > 0 && ahead > 0,
            "{waits} waits, {ahead} opened ahead"
        );
    }

    /// A peer that stops sending in the middle of a frame, or stops reading, is named in the
    /// error with how long it was waited for, on a clear and on a sealed channel.
    #[test]
    fn a_stalled_peer_is_named_with_the_timeout_on_both_halves() {
        for sealed in [false, true] {
            let (c, s) = sockets();
            let (tx, mut rx) = if sealed {
                let (ki, kr) = keys_pair(&secret(1), &secret(1)).unwrap();
                (
                    Channel::sealed(c, ki).unwrap(),
                    Channel::sealed(s, kr).unwrap(),
                )
            } else {
                (Channel::clear(c).unwrap(), Channel::clear(s).unwrap())
            };
            // Half a frame, then nothing: the reader's socket timeout runs out mid-frame.
            let frame = Message::Write {
                seq: 1,
                offset: 0,
                fua: false,
                data: vec![7; 100_000],
            }
            .encode();
            let mut w = tx.writer.clone();
            w.write_all(&frame[..frame.len() / 2]).unwrap();
            w.flush().unwrap();
            rx.stream()
                .set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            let e = rx.recv(MAX_FRAME).unwrap_err().to_string();
            assert!(
                e.contains("nothing from 127.0.0.1:") && e.contains("200 ms"),
                "sealed {sealed}: {e}"
            );
            // The other way: the peer reads nothing while more than the socket buffers hold
            // is sent.
            tx.stream()
                .set_write_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            let big = vec![1u8; 1 << 20];
            let e = (0..64)
                .find_map(|_| w.write_all(&big).and_then(|()| w.flush()).err())
                .expect("64 MiB went into a socket nobody reads")
                .to_string();
            assert!(
                e.contains("127.0.0.1:") && e.contains("took nothing") && e.contains("200 ms"),
                "sealed {sealed}: {e}"
            );
        }
    }

    /// Writes given as a head and a payload (sent from the payload's own buffer: in the clear
    /// by writev once large, sealed record by record) arrive as the same frames, in order
    /// with whole frames, on a clear and on a sealed channel.
    #[test]
    fn frames_in_two_parts_arrive_whole_and_in_order() {
        for sealed in [false, true] {
            let (c, s) = sockets();
            let (mut tx, mut rx) = if sealed {
                let (ki, kr) = keys_pair(&secret(1), &secret(1)).unwrap();
                (
                    Channel::sealed(c, ki).unwrap(),
                    Channel::sealed(s, kr).unwrap(),
                )
            } else {
                (Channel::clear(c).unwrap(), Channel::clear(s).unwrap())
            };
            // Sizes around the direct-send bound and the record size, and a 1 MiB write.
            let sizes = [
                0,
                1,
                4096,
                SEND_DIRECT - 1,
                SEND_DIRECT,
                MAX_PLAIN + 7,
                1 << 20,
            ];
            let mut msgs = Vec::new();
            for (i, &n) in sizes.iter().enumerate() {
                let seq = i as u64 + 1;
                let data: Vec<u8> = (0..n).map(|b| (b * 7 + i) as u8).collect();
                msgs.push(Message::Write {
                    seq,
                    offset: (i as u64) << 20,
                    fua: i % 2 == 0,
                    data,
                });
                msgs.push(Message::Flush { seq: 100 + seq });
            }
            let sent = msgs.clone();
            let t = std::thread::spawn(move || {
                for m in &sent {
                    match m {
                        Message::Write {
                            seq,
                            offset,
                            fua,
                            data,
                        } => {
                            let head = protocol::encode_write_head(*seq, *offset, *fua, data.len());
                            tx.writer.write_frame(&head, data).unwrap();
                        }
                        other => tx.writer.write_all(&other.encode()).unwrap(),
                    }
                }
                tx.writer.flush().unwrap();
                tx
            });
            for m in &msgs {
                assert_eq!(&rx.recv(MAX_FRAME).unwrap(), m, "sealed: {sealed}");
            }
            drop(t.join().unwrap());
            assert!(matches!(rx.recv(MAX_FRAME), Err(ProtocolError::Io(_))));
        }
    }

    /// Record the sealed bytes of `frames`.
    fn sealed_bytes(k: Keys, frames: &[Message]) -> Vec<u8> {
        let mut w = WriterInner {
            stream: sockets().0,
            keys: Some(k),
            nonce: 0,
            plain: Vec::new(),
            out: Vec::new(),
            out_len: 0,
        };
        for f in frames {
            w.write_all(&f.encode()).unwrap();
            let k = w.keys.clone().unwrap();
            w.seal(&k).unwrap();
        }
        w.out.truncate(w.out_len);
        w.out
    }

    /// Read `raw` through a sealed reader: the messages until the first error.
    /// Both ways, on the reading thread and opened ahead on another: the same result.
    fn open(k: Keys, raw: &[u8]) -> (Vec<Message>, Option<String>) {
        let direct = open_with(k.clone(), raw, false);
        assert_eq!(open_with(k, raw, true), direct, "opened ahead");
        direct
    }

    fn open_with(k: Keys, raw: &[u8], ahead: bool) -> (Vec<Message>, Option<String>) {
        let (c, mut s) = sockets();
        s.write_all(raw).unwrap();
        drop(s);
        let Channel { mut reader, .. } = Channel::sealed(c, k).unwrap();
        if ahead {
            reader = reader.open_ahead("test-open".into()).unwrap();
        }
        let mut got = Vec::new();
        loop {
            match protocol::read_message(&mut reader, MAX_FRAME) {
                Ok(m) => got.push(m),
                Err(ProtocolError::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    return (got, None);
                }
                Err(e) => return (got, Some(e.to_string())),
            }
        }
    }

    #[test]
    fn a_flipped_replayed_reordered_or_dropped_record_is_refused() {
        let frames = [
            Message::Flush { seq: 1 },
            Message::Flush { seq: 2 },
            Message::Flush { seq: 3 },
        ];
        let (ki, kr) = keys_pair(&secret(1), &secret(1)).unwrap();
        let raw = sealed_bytes(ki, &frames);
        let rec = raw.len() / 3;
        let (ok, err) = open(kr.clone(), &raw);
        assert_eq!(ok, frames.to_vec());
        assert!(err.is_none());
        let mut flipped = raw.clone();
        flipped[rec + 5] ^= 1;
        let replayed = [&raw[..2 * rec], &raw[rec..2 * rec], &raw[2 * rec..]].concat();
        let reordered = [&raw[..rec], &raw[2 * rec..], &raw[rec..2 * rec]].concat();
        let dropped = [&raw[..rec], &raw[2 * rec..]].concat();
        for (what, bytes, good) in [
            ("flipped", flipped, 1),
            ("replayed", replayed, 2),
            ("reordered", reordered, 1),
            ("dropped", dropped, 1),
        ] {
            let (ok, err) = open(kr.clone(), &bytes);
            assert_eq!(ok, frames[..good].to_vec(), "{what}");
            let err = err.unwrap_or_default();
            assert!(err.contains("failed authentication"), "{what}: {err}");
        }
        // Cut inside a record: an error, not a clean end.
        let (ok, err) = open(kr, &raw[..rec + 3]);
        assert_eq!(ok.len(), 1);
        assert!(err.unwrap_or_default().contains("inside a sealed record"));
    }

    /// A frame announced longer than the limit is refused before the body is read, sealed as
    /// in clear.
    #[test]
    fn the_frame_limit_holds_inside_records() {
        let (ki, kr) = keys_pair(&secret(1), &secret(1)).unwrap();
        let mut frame = ((MAX_FRAME + 1) as u32).to_le_bytes().to_vec();
        frame.push(48);
        let mut w = WriterInner {
            stream: sockets().0,
            keys: Some(ki),
            nonce: 0,
            plain: frame,
            out: Vec::new(),
            out_len: 0,
        };
        let k = w.keys.clone().unwrap();
        w.seal(&k).unwrap();
        let (_, err) = open(kr, &w.out[..w.out_len]);
        assert!(err.unwrap_or_default().contains("out of bounds"));
    }
}
