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
//! before allocation is unchanged. The keys from the exchange are used with ring directly, in
//! place: the writer copies frames once, into the record it then seals where it lies; the
//! secondary's reader (`open_ahead`) reads a frame's length first and opens each record that
//! is all that frame's where its plaintext goes, in the frame's own buffer, so a data frame
//! reaches the disk write without a copy after the socket's.
//!
//! This module knows nothing of the messages; `peer.rs` and `secondary.rs` run the handshake
//! and hand a `Channel` to the link and the session.

use std::collections::VecDeque;
use std::io::{self, BufReader, IoSlice, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use hmac::{Hmac, KeyInit, Mac};
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN as NONCE_LEN_AEAD, Nonce, UnboundKey};
use sha2::Sha256;

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

    /// The transport keys, once both messages have passed: Noise's split, one AES-256-GCM key
    /// per direction.
    pub fn finish(mut self) -> Result<Keys> {
        if !self.0.is_handshake_finished() {
            return Err(anyhow!("key exchange: not finished"));
        }
        let initiator = self.0.is_initiator();
        let (to_responder, to_initiator) = self.0.dangerously_get_raw_split();
        let (send, recv) = match initiator {
            true => (to_responder, to_initiator),
            false => (to_initiator, to_responder),
        };
        let key = |k: &[u8; 32]| {
            UnboundKey::new(&AES_256_GCM, k)
                .map(LessSafeKey::new)
                .map_err(|_| anyhow!("key exchange: the split did not give an AES-256-GCM key"))
        };
        Ok(Keys(Arc::new(KeyPair {
            send: key(&send)?,
            recv: key(&recv)?,
        })))
    }
}

/// The two directions' keys of a sealed channel (shared by its reader and writer; each keeps
/// its own record counter). They are used exactly as Noise's transport uses them (the nonce
/// is 4 zero bytes and the record's number big-endian, no associated data), so the records
/// are the ones `snow`'s transport would make; ring's in-place calls let a record be sealed
/// where it is sent from and opened where its plaintext is wanted.
#[derive(Clone)]
pub struct Keys(Arc<KeyPair>);

struct KeyPair {
    send: LessSafeKey,
    recv: LessSafeKey,
}

/// Record `n`'s nonce. Noise reserves the last counter value; 2^64 - 1 records are never sent.
fn nonce(n: u64) -> Option<Nonce> {
    if n == u64::MAX {
        return None;
    }
    let mut b = [0u8; NONCE_LEN_AEAD];
    b[4..].copy_from_slice(&n.to_be_bytes());
    Some(Nonce::assume_unique_for_key(b))
}

impl Keys {
    /// Seal record `n` in place: `rec` is its plaintext and then `TAG_LEN` bytes for the tag.
    fn seal(&self, n: u64, rec: &mut [u8]) -> io::Result<()> {
        let (plain, tag_room) = rec.split_at_mut(rec.len() - TAG_LEN);
        tag_room.copy_from_slice(&self.seal_apart(n, plain)?);
        Ok(())
    }

    /// Seal record `n`'s plaintext in place; its tag, which follows it on the wire.
    fn seal_apart(&self, n: u64, plain: &mut [u8]) -> io::Result<[u8; TAG_LEN]> {
        let failed = || io::Error::other(format!("sealing record {n} failed"));
        let tag = self
            .0
            .send
            .seal_in_place_separate_tag(nonce(n).ok_or_else(failed)?, Aad::empty(), plain)
            .map_err(|_| failed())?;
        let mut out = [0u8; TAG_LEN];
        out.copy_from_slice(tag.as_ref());
        Ok(out)
    }

    /// Open record `n` (ciphertext and tag) in place; the length of its plaintext, which is
    /// then at the start of `rec`, or None if it does not authenticate.
    fn open(&self, n: u64, rec: &mut [u8]) -> Option<usize> {
        let opened = self.0.recv.open_in_place(nonce(n)?, Aad::empty(), rec);
        opened.ok().map(|p| p.len())
    }
}

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
            // Sealed, small: what a read takes beyond what it asked for is copied out later,
            // and a large record is read straight into place (see `open_into`). In the clear,
            // frames are read through it (many small ones per system call).
            inner: BufReader::with_capacity(
                match keys {
                    Some(_) => super::nbd::READ_DIRECT,
                    None => 256 << 10,
                },
                clone()?,
            ),
            peer,
            keys: keys.clone(),
            nonce: 0,
            plain: Vec::new(),
            pos: 0,
            end: 0,
            failed: None,
            after_large: false,
        }));
        let writer = Writer {
            sealed: keys.is_some(),
            inner: Arc::new(Mutex::new(WriterInner {
                stream: clone()?,
                keys,
                nonce: 0,
                plain: Vec::new(),
                out: Vec::new(),
                out_len: 0,
                rec: None,
            })),
        };
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
            Source::Ahead(a) => &a.cur[a.pos..a.len],
        }
    }

    /// Is a whole frame at hand, so that `read_frame` returns it without blocking?
    pub fn frame_at_hand(&self) -> bool {
        match &self.0 {
            Source::Direct(d) => protocol::holds_frame(d.buffer()),
            Source::Ahead(a) => a.pos < a.len || !a.shared.lock().queue.is_empty(),
        }
    }

    /// Read one frame of at most `max` bytes (opened ahead: at most the `max` given to
    /// `open_ahead`) and return its body, as `protocol::read_frame` does. `buf` is reused
    /// and never shrinks; opened ahead, it is swapped for the buffer the frame was opened in.
    pub fn read_frame<'a>(
        &mut self,
        max: usize,
        buf: &'a mut Vec<u8>,
    ) -> Result<&'a [u8], ProtocolError> {
        match &mut self.0 {
            Source::Ahead(a) if a.pos == 0 || a.pos == a.len => a.read_frame(buf),
            _ => protocol::read_frame(self, max, buf),
        }
    }

    /// Wait up to `timeout` for something to read: true when a read will make progress (data,
    /// the end of the stream or an error to report), false when nothing arrived in time.
    pub fn wait_readable(&mut self, timeout: Duration) -> io::Result<bool> {
        match &mut self.0 {
            Source::Direct(d) => {
                if d.holds_more() || d.failed.is_some() {
                    return Ok(true);
                }
                poll_readable(d.inner.get_ref(), timeout)
            }
            Source::Ahead(a) => a.wait_readable(timeout),
        }
    }

    /// From now on, frames of at most `max` bytes may be read and opened ahead on a thread
    /// of its own (named `name`), up to 256 frames or 1 MiB, so that the caller's thread (the
    /// secondary's session, which also applies the writes) does not spend its time on AES-GCM
    /// while more is waiting in the socket. When nothing more is waiting, the caller reads and
    /// opens the next frame itself: a lone write then wakes one thread on arrival, not the
    /// opener and then the caller. Either way the records of a frame are opened in the
    /// frame's own buffer, where the plaintext goes (`read_frame` hands that buffer over: no
    /// copy). Errors and the end of the stream arrive in order, after the frames before them.
    /// Nothing changes for a channel in clear.
    pub fn open_ahead(self, name: String, max: usize) -> Result<Reader> {
        let d = match self.0 {
            Source::Direct(d) if d.keys.is_some() => d,
            other => return Ok(Reader(other)),
        };
        // Plaintext already opened (the end of the last record read here) stays in `d`, at
        // the start of the next frame.
        let fd = d
            .inner
            .get_ref()
            .try_clone()
            .context("cloning the peer socket for the record opener")?;
        let shared = Arc::new(AheadShared {
            state: Mutex::new(AheadState {
                queue: VecDeque::new(),
                queued_bytes: 0,
                direct: Some(Box::new(d)),
                max,
                wanted: false,
                closed: false,
                spare: Vec::new(),
                spare_bytes: 0,
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
            cur: Vec::new(),
            pos: 0,
            len: 0,
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

/// A frame (its length prefix, its body and maybe room after it), an error, or `None` at the
/// end of the stream.
type Opened = Result<Option<Vec<u8>>, ProtocolError>;

/// How many opened frames may wait for the reader, and how many bytes of them: the opener
/// goes on while both are below. (A burst of 4 KiB writes is hundreds of frames: a bound of
/// a few frames would stop the opener, and wake it again, at every frame the reader takes.)
const AHEAD: usize = 256;
const AHEAD_BYTES: usize = 1 << 20;
/// Buffers kept to open the next frames into, how many bytes of them, and the largest kept
/// (a frame larger than this gets a buffer of its own, freed when read).
const SPARE: usize = AHEAD;
const SPARE_BYTES: usize = 4 << 20;
const SPARE_MAX: usize = 2 << 20;

/// The length of the frame in `f` (prefix included), from its prefix.
fn frame_len(f: &[u8]) -> usize {
    4 + u32::from_le_bytes([f[0], f[1], f[2], f[3]]) as usize
}

/// Frames opened by this thread or ahead by another (`Reader::open_ahead`).
struct Ahead {
    shared: Arc<AheadShared>,
    /// The socket, to wait for it without taking the `Direct` from the opener.
    fd: TcpStream,
    /// The frame being read as bytes (`Read`): `cur[pos..len]` is left of it.
    cur: Vec<u8>,
    pos: usize,
    len: usize,
    failed: Option<(io::ErrorKind, String)>,
    ended: bool,
}

struct AheadShared {
    state: Mutex<AheadState>,
    to_reader: Condvar,
    to_opener: Condvar,
}

struct AheadState {
    /// Opened ahead, in frame order, before anything still in the socket.
    queue: VecDeque<Opened>,
    /// Frame bytes in `queue`.
    queued_bytes: usize,
    /// The socket's reader; `None` while one of the two threads reads a frame from it.
    /// Whoever takes it reads exactly one frame and, still under the lock where it puts it
    /// back, queues that frame (the opener) or returns it (the reader) before anyone
    /// can read the next: so the order of frames is the socket's.
    direct: Option<Box<Direct>>,
    /// The largest frame accepted.
    max: usize,
    /// More is waiting in the socket while the reader is busy: the opener reads ahead.
    wanted: bool,
    /// The reader went away: the opener ends.
    closed: bool,
    /// Buffers read to the end, to open into again: no allocation per frame.
    spare: Vec<Vec<u8>>,
    spare_bytes: usize,
    /// A thread waits on its condvar (so that a wakeup is a system call only when needed).
    reader_waits: bool,
    opener_waits: bool,
    /// Frames the opener read (the rest the reader read itself).
    opened_ahead: u64,
}

impl AheadShared {
    fn lock(&self) -> std::sync::MutexGuard<'_, AheadState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl AheadState {
    /// Keep `buf` to open a later frame into, if it is worth keeping.
    fn recycle(&mut self, buf: Vec<u8>) {
        let n = buf.capacity();
        if n > 0
            && n <= SPARE_MAX
            && self.spare.len() < SPARE
            && self.spare_bytes + n <= SPARE_BYTES
        {
            self.spare_bytes += n;
            self.spare.push(buf);
        }
    }

    /// A buffer to open the next frame into.
    fn spare(&mut self) -> Option<Vec<u8>> {
        let buf = self.spare.pop()?;
        self.spare_bytes -= buf.capacity();
        Some(buf)
    }

    fn room_ahead(&self) -> bool {
        self.queue.len() < AHEAD && self.queued_bytes < AHEAD_BYTES
    }

    /// Room enough to wake a waiting opener for: half the bounds, so that a full queue does
    /// not wake it for every frame taken.
    fn room_to_wake(&self) -> bool {
        self.queue.len() <= AHEAD / 2 && self.queued_bytes <= AHEAD_BYTES / 2
    }
}

/// Read and open one frame from `d` into a spare buffer (or a new one).
fn open_one(d: &mut Direct, max: usize, spare: Option<Vec<u8>>) -> Opened {
    let Some(keys) = d.keys.clone() else {
        return Err(ProtocolError::Io(io::Error::other(
            "internal: records opened on a channel in clear",
        )));
    };
    d.next_frame(&keys, max, spare.unwrap_or_default())
}

/// Bytes of an opened frame, for the bound on what waits.
fn opened_bytes(item: &Opened) -> usize {
    match item {
        Ok(Some(f)) => frame_len(f),
        _ => 0,
    }
}

/// Is more than what was read waiting: plaintext or ciphertext buffered, or the socket
/// readable now?
fn more_waiting(d: &Direct, fd: &TcpStream) -> bool {
    d.holds_more() || poll_readable(fd, Duration::ZERO).unwrap_or(false)
}

/// The opener thread: reads ahead while the reader is busy and more is waiting.
fn opener(shared: &AheadShared, fd: &TcpStream) {
    let mut st = shared.lock();
    loop {
        if st.closed {
            return;
        }
        if !(st.wanted && st.direct.is_some() && st.room_ahead()) {
            st.opener_waits = true;
            st = shared.to_opener.wait(st).unwrap_or_else(|p| p.into_inner());
            st.opener_waits = false;
            continue;
        }
        let Some(mut d) = st.direct.take() else {
            continue;
        };
        // The reader may have read what was waiting itself: never block in the socket here
        // (the reader would then wait for this thread when the next frame arrives).
        if !more_waiting(&d, fd) {
            st.direct = Some(d);
            st.wanted = false;
            continue;
        }
        let (spare, max) = (st.spare(), st.max);
        drop(st);
        let item = open_one(&mut d, max, spare);
        let end = !matches!(item, Ok(Some(_)));
        let more = !end && more_waiting(&d, fd);
        st = shared.lock();
        st.queued_bytes += opened_bytes(&item);
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
    /// The next frame: from the queue, or read here when the opener is not reading one.
    /// `done`, a buffer read to the end, is kept to open a later frame into. With
    /// `wait_until`, nothing is read here: it waits until that instant for a frame to be at
    /// hand, `Some(Ok(Some(empty)))` saying the socket has something to read now and `None`
    /// that nothing came in time. Without, it reads (as long as the socket's own timeout
    /// allows).
    fn next(&mut self, done: Vec<u8>, wait_until: Option<Instant>) -> Option<Opened> {
        let mut st = self.shared.lock();
        st.recycle(done);
        loop {
            if let Some(item) = st.queue.pop_front() {
                st.queued_bytes -= opened_bytes(&item);
                // The opener may go on now that there is room.
                if st.wanted && st.opener_waits && st.room_to_wake() {
                    self.shared.to_opener.notify_one();
                }
                return Some(item);
            }
            if let Some(mut d) = st.direct.take() {
                if let Some(t) = wait_until {
                    drop(st);
                    let left = t.saturating_duration_since(Instant::now());
                    let ready = match d.holds_more() {
                        true => Ok(true),
                        false => poll_readable(&self.fd, left),
                    };
                    self.shared.lock().direct = Some(d);
                    return match ready {
                        Ok(true) => Some(Ok(Some(Vec::new()))),
                        Ok(false) => None,
                        Err(e) => Some(Err(ProtocolError::Io(e))),
                    };
                }
                let (spare, max) = (st.spare(), st.max);
                drop(st);
                let item = open_one(&mut d, max, spare);
                // Only what is already buffered counts here (no system call): a lone write
                // leaves nothing, while a burst of large ones arrives several records a read.
                let more = matches!(item, Ok(Some(_))) && d.holds_more();
                let mut st = self.shared.lock();
                st.direct = Some(d);
                st.wanted = more;
                if more && st.opener_waits {
                    self.shared.to_opener.notify_one();
                }
                return Some(item);
            }
            // The opener is reading a frame: wait for it.
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

    /// The error to report again after the first (the same kind and words).
    fn failure(&self) -> Option<io::Error> {
        let (kind, why) = self.failed.as_ref()?;
        Some(io::Error::new(*kind, why.clone()))
    }

    /// Remember an error for every later read.
    fn keep_failure(&mut self, e: &ProtocolError) {
        // Never a sticky Interrupted: `read_exact` would retry it forever.
        let kind = match e {
            ProtocolError::Io(e) if e.kind() != io::ErrorKind::Interrupted => e.kind(),
            ProtocolError::Io(_) => io::ErrorKind::Other,
            // As `cut` says it inside a record: never a clean end between frames.
            ProtocolError::EndedMidFrame => io::ErrorKind::ConnectionAborted,
            _ => io::ErrorKind::InvalidData,
        };
        self.failed = Some((kind, e.to_string()));
    }

    /// Take in what `next` returned, to be read as bytes.
    fn take(&mut self, item: Opened) {
        match item {
            Ok(Some(v)) => {
                self.len = frame_len(&v);
                self.cur = v;
                self.pos = 0;
            }
            Ok(None) => self.ended = true,
            Err(e) => self.keep_failure(&e),
        }
    }

    /// The next whole frame's body, its buffer swapped into `buf`: the one `wait_readable`
    /// took in, if none of it was read yet, or the next.
    fn read_frame<'a>(&mut self, buf: &'a mut Vec<u8>) -> Result<&'a [u8], ProtocolError> {
        if self.pos == 0 && self.len > 0 {
            let done = std::mem::replace(buf, std::mem::take(&mut self.cur));
            self.len = 0;
            self.shared.lock().recycle(done);
            return Ok(&buf[4..frame_len(buf)]);
        }
        if let Some(e) = self.failure() {
            return Err(ProtocolError::Io(e));
        }
        if self.ended {
            return Err(ProtocolError::Io(io::ErrorKind::UnexpectedEof.into()));
        }
        let done = std::mem::take(buf);
        let item = match self.next(done, None) {
            Some(item) => item,
            None => {
                return Err(ProtocolError::Io(io::Error::other(
                    "internal: a read without a deadline ended",
                )));
            }
        };
        match item {
            Ok(Some(f)) => {
                *buf = f;
                Ok(&buf[4..frame_len(buf)])
            }
            Ok(None) => {
                self.ended = true;
                Err(ProtocolError::Io(io::ErrorKind::UnexpectedEof.into()))
            }
            Err(e) => {
                self.keep_failure(&e);
                Err(e)
            }
        }
    }

    fn wait_readable(&mut self, timeout: Duration) -> io::Result<bool> {
        if self.pos < self.len || self.failed.is_some() || self.ended {
            return Ok(true);
        }
        let done = std::mem::take(&mut self.cur);
        (self.pos, self.len) = (0, 0);
        match self.next(done, Some(Instant::now() + timeout)) {
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
        while self.pos == self.len {
            if let Some(e) = self.failure() {
                return Err(e);
            }
            if self.ended {
                return Ok(0);
            }
            let done = std::mem::take(&mut self.cur);
            (self.pos, self.len) = (0, 0);
            match self.next(done, None) {
                Some(item) => self.take(item),
                None => {
                    return Err(io::Error::other(
                        "internal: a read without a deadline ended",
                    ));
                }
            }
        }
        let n = out.len().min(self.len - self.pos);
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
    /// The current record's plaintext is `plain[pos..end]`.
    plain: Vec<u8>,
    pos: usize,
    end: usize,
    /// Once a record failed, every later read fails the same way.
    failed: Option<String>,
    /// The last record was large (see `record_len`).
    after_large: bool,
}

impl Direct {
    fn buffer(&self) -> &[u8] {
        match self.keys {
            None => self.inner.buffer(),
            Some(_) => &self.plain[self.pos..self.end],
        }
    }

    /// Is plaintext, or ciphertext not opened yet, buffered here?
    fn holds_more(&self) -> bool {
        self.pos < self.end || !self.inner.buffer().is_empty()
    }

    fn named(&self, e: io::Error) -> io::Error {
        name_timeout(cut(e), self.inner.get_ref(), true)
    }

    /// The length of the next record, None at a clean end of the stream.
    fn record_len(&mut self) -> io::Result<Option<usize>> {
        if let Some(why) = &self.failed {
            return Err(io::Error::new(io::ErrorKind::InvalidData, why.clone()));
        }
        let mut len = [0u8; 2];
        // After a large record, with nothing buffered, the length is read alone: filling
        // the buffer would fill it with the start of the next large record, copied out of it
        // then (see `open_into`). After a small one, the buffer is filled: small records
        // come one system call for several, or for a length and its record.
        let r = match self.after_large && self.inner.buffer().is_empty() {
            true => self.inner.get_mut().read(&mut len),
            false => self.inner.read(&mut len),
        };
        match r.map_err(|e| self.named(e))? {
            0 => return Ok(None),
            2 => {}
            _ => {
                let r = self.inner.read_exact(&mut len[1..]);
                r.map_err(|e| self.named(e))?
            }
        }
        let len = u16::from_le_bytes(len) as usize;
        if len < TAG_LEN {
            let n = self.nonce;
            return Err(self.fail(format!(
                "sealed record {n} failed authentication: {len} bytes, shorter than its tag"
            )));
        }
        Ok(Some(len))
    }

    /// Read the record of `rec.len()` bytes announced by `record_len` into `rec` and open
    /// it there: the length of its plaintext, now at the start of `rec`.
    fn open_into(&mut self, keys: &Keys, rec: &mut [u8]) -> io::Result<usize> {
        let r = super::nbd::read_into_place(&mut self.inner, rec);
        self.after_large = r.map_err(|e| self.named(e))?;
        match keys.open(self.nonce, rec) {
            Some(n) => {
                self.nonce += 1;
                Ok(n)
            }
            None => Err(self.fail(format!(
                "sealed record {} failed authentication: tampered with, replayed, reordered or \
                 dropped on the way",
                self.nonce
            ))),
        }
    }

    /// Read and open the next record into `plain`. Ok(false) at a clean end of the stream.
    fn next_record(&mut self, keys: &Keys) -> io::Result<bool> {
        let Some(len) = self.record_len()? else {
            return Ok(false);
        };
        self.open_to_plain(keys, len)?;
        Ok(true)
    }

    fn open_to_plain(&mut self, keys: &Keys, len: usize) -> io::Result<()> {
        // As long as the largest record (zero-filled only the first time).
        self.plain.resize(MAX_RECORD, 0);
        let mut plain = std::mem::take(&mut self.plain);
        let r = self.open_into(keys, &mut plain[..len]);
        self.plain = plain;
        self.end = r?;
        self.pos = 0;
        Ok(())
    }

    /// Read one whole frame (its length prefix and body) into `frame`, reused: the body's
    /// records are opened in `frame` where their plaintext goes, and only a record that holds
    /// the end of one frame and the start of the next is opened aside and copied. Ok(None) at
    /// a clean end of the stream between frames. `frame` may come back longer than the frame;
    /// its first 4 bytes say how long the body is.
    fn next_frame(
        &mut self,
        keys: &Keys,
        max: usize,
        mut frame: Vec<u8>,
    ) -> Result<Option<Vec<u8>>, ProtocolError> {
        let mut head = [0u8; 4];
        let mut got = 0;
        while got < 4 {
            if self.pos == self.end {
                match self.next_record(keys) {
                    Ok(true) => continue,
                    Ok(false) if got == 0 => return Ok(None),
                    Ok(false) => return Err(ProtocolError::EndedMidFrame),
                    // A socket with a timeout returns EINTR after SIGSTOP/SIGCONT; nothing of
                    // the record was consumed yet (`read_exact` retries by itself).
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(ProtocolError::Io(e)),
                }
            }
            let n = (4 - got).min(self.end - self.pos);
            head[got..got + n].copy_from_slice(&self.plain[self.pos..self.pos + n]);
            got += n;
            self.pos += n;
        }
        let len = u32::from_le_bytes(head) as usize;
        if len == 0 || len > max {
            return Err(ProtocolError::BadLength(len));
        }
        // Room for the last record's tag too, when it is opened here.
        if frame.len() < 4 + len + TAG_LEN {
            frame.resize(4 + len + TAG_LEN, 0);
        }
        frame[..4].copy_from_slice(&head);
        let (mut at, end) = (4, 4 + len);
        while at < end {
            if self.pos < self.end {
                let n = (end - at).min(self.end - self.pos);
                frame[at..at + n].copy_from_slice(&self.plain[self.pos..self.pos + n]);
                at += n;
                self.pos += n;
                continue;
            }
            let rec = match self.record_len() {
                Ok(Some(rec)) => rec,
                Ok(None) => return Err(ProtocolError::EndedMidFrame),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(ProtocolError::Io(e)),
            };
            // A record that is all this frame's is opened where it goes (its tag lands
            // where the next record's plaintext will).
            if rec - TAG_LEN <= end - at {
                at += self.open_into(keys, &mut frame[at..at + rec])?;
            } else {
                self.open_to_plain(keys, rec)?;
            }
        }
        Ok(Some(frame))
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
pub struct Writer {
    inner: Arc<Mutex<WriterInner>>,
    /// Whether `inner` seals (fixed for the connection; read without the lock).
    sealed: bool,
}

struct WriterInner {
    stream: TcpStream,
    keys: Option<Keys>,
    nonce: u64,
    /// In clear: frames not sent yet.
    plain: Vec<u8>,
    /// Sealed: records not sent yet, `out[..out_len]` (the rest is room, zeroed once). The
    /// last may still be open: its length field at `out[rec]`, its plaintext so far after it.
    /// Frames are copied once, into the record, which is then sealed where it lies.
    out: Vec<u8>,
    out_len: usize,
    rec: Option<usize>,
}

/// Pending bytes that make a write go out without waiting for `flush`.
const SEND_AT: usize = 256 << 10;
/// A frame's payload this large goes out from its own buffer, not copied: in the clear as
/// it is, sealed where it lies when the caller gives it up (`Body::Given`).
pub const SEND_DIRECT: usize = 64 << 10;
/// Buffers per `writev` (IOV_MAX is 1024 on Linux and FreeBSD).
const IOV_BATCH: usize = 512;

/// A frame's payload as the writer gets it.
pub enum Body<'a> {
    /// Read only: shared with others (the local write reads it too). Sealed, it is copied
    /// into the records.
    Shared(&'a [u8]),
    /// Nobody else reads it: a sealed link may seal it where it lies and send it from there;
    /// it then holds ciphertext.
    Given(&'a mut [u8]),
}

impl Body<'_> {
    fn bytes(&self) -> &[u8] {
        match self {
            Body::Shared(b) => b,
            Body::Given(b) => b,
        }
    }
}

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
            let rec = match self.rec {
                Some(r) => r,
                None => {
                    self.out_len += 2;
                    *self.rec.insert(self.out_len - 2)
                }
            };
            let filled = self.out_len - rec - 2;
            let n = data.len().min(MAX_PLAIN - filled);
            let at = self.out_len;
            if self.out.len() < at + n + TAG_LEN {
                self.out.resize(at + n + TAG_LEN, 0);
            }
            self.out[at..at + n].copy_from_slice(&data[..n]);
            self.out_len += n;
            data = &data[n..];
            if filled + n == MAX_PLAIN {
                self.seal(&keys)?;
                if self.out_len >= SEND_AT {
                    self.send_out()?;
                }
            }
        }
        Ok(())
    }

    /// Seal the open record where it lies (its tag after its plaintext).
    fn seal(&mut self, keys: &Keys) -> io::Result<()> {
        let Some(rec) = self.rec.take() else {
            return Ok(());
        };
        let len = self.out_len - rec - 2 + TAG_LEN;
        self.out[rec..rec + 2].copy_from_slice(&(len as u16).to_le_bytes());
        keys.seal(self.nonce, &mut self.out[rec + 2..rec + 2 + len])?;
        self.nonce += 1;
        self.out_len = rec + 2 + len;
        Ok(())
    }

    /// `write_all` of `head` and then `body`, except that a large `body` is not copied: in
    /// the clear it goes out from its own buffer, in one writev with what is buffered; sealed,
    /// when given up (`Body::Given`), it is sealed where it lies and sent from there.
    fn write_frame(&mut self, head: &[u8], body: Body<'_>) -> io::Result<()> {
        let large = body.bytes().len() >= SEND_DIRECT;
        match (self.keys.clone(), body) {
            (None, body) if large => {
                self.plain.extend_from_slice(head);
                let r = super::nbd::write_two(&mut self.stream, &self.plain, body.bytes());
                self.plain.clear();
                r.map_err(|e| name_timeout(e, &self.stream, false))
            }
            (Some(keys), Body::Given(body)) if large => {
                self.send_sealed_in_place(&keys, head, body)
            }
            (_, body) => {
                self.write_all(head)?;
                self.write_all(body.bytes())
            }
        }
    }

    /// Sealed, a large payload nobody else reads: `head` ends the open record, then each
    /// record of the payload is sealed in `body` itself and the whole goes out by writev
    /// from there, with the record's length before it and its tag after (the same records
    /// on the wire as `write_all` makes, cut at other places).
    fn send_sealed_in_place(
        &mut self,
        keys: &Keys,
        head: &[u8],
        body: &mut [u8],
    ) -> io::Result<()> {
        self.write_all(head)?;
        self.seal(keys)?;
        let records = body.len().div_ceil(MAX_PLAIN);
        // Between two records: the tag of the one before and the length of the next.
        let mut glue = Vec::with_capacity(records * (TAG_LEN + 2) + 2);
        for chunk in body.chunks_mut(MAX_PLAIN) {
            glue.extend_from_slice(&((chunk.len() + TAG_LEN) as u16).to_le_bytes());
            let tag = keys.seal_apart(self.nonce, chunk)?;
            self.nonce += 1;
            glue.extend_from_slice(&tag);
        }
        let mut iov = Vec::with_capacity(2 * records + 2);
        if self.out_len > 0 {
            iov.push(IoSlice::new(&self.out[..self.out_len]));
        }
        let mut g = &glue[..];
        for chunk in body.chunks(MAX_PLAIN) {
            iov.push(IoSlice::new(&g[..2]));
            iov.push(IoSlice::new(chunk));
            iov.push(IoSlice::new(&g[2..2 + TAG_LEN]));
            g = &g[2 + TAG_LEN..];
        }
        let r = write_all_vectored(&mut self.stream, &mut iov);
        self.out_len = 0;
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
                self.seal(&keys)?;
                self.send_out()?;
            }
        }
        self.stream.flush()
    }
}

/// Write every byte of `iov`, at most IOV_BATCH buffers per system call.
fn write_all_vectored(w: &mut impl Write, mut iov: &mut [IoSlice<'_>]) -> io::Result<()> {
    while !iov.is_empty() {
        let batch = iov.len().min(IOV_BATCH);
        match w.write_vectored(&iov[..batch]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut iov, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl Writer {
    fn lock(&self) -> std::sync::MutexGuard<'_, WriterInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Encode, queue and flush one message.
    pub fn send(&self, msg: &Message) -> io::Result<()> {
        let mut w = self.lock();
        w.write_all(&msg.encode())?;
        w.flush()
    }

    /// Queue a frame given as its encoded head and its payload (see
    /// `WriterInner::write_frame`); like `write_all`, it goes out at `flush` at the latest.
    pub fn write_frame(&self, head: &[u8], body: Body<'_>) -> io::Result<()> {
        self.lock().write_frame(head, body)
    }

    /// Whether the link is sealed (and a large payload given up is sealed where it lies).
    pub fn sealed(&self) -> bool {
        self.sealed
    }

    /// Write and flush a frame (as `write_frame` + `flush`) now, on the caller's thread, if no
    /// other thread is writing and `idle` says so under the writer's lock; None (nothing
    /// written) otherwise.
    pub fn send_frame_if(
        &self,
        head: &[u8],
        body: Body<'_>,
        idle: impl FnOnce() -> bool,
    ) -> Option<io::Result<()>> {
        let mut w = self.inner.try_lock().ok()?;
        if !idle() {
            return None;
        }
        Some(w.write_frame(head, body).and_then(|()| w.flush()))
    }

    /// Like `send`, unless another thread is writing right now (then nothing is sent): for a
    /// last word before the socket is shut, which must not wait for a stuck peer.
    pub fn try_send(&self, msg: &Message) -> io::Result<()> {
        match self.inner.try_lock() {
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
        let mut r = reader.open_ahead("test-open".into(), MAX_FRAME).unwrap();
        let mut waits = 0;
        let mut buf = Vec::new();
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
            // Every other frame as bytes (`Read`), the rest whole (`read_frame`, the session's
            // way): both give the same frames.
            let got = match i % 2 {
                0 => protocol::read_message(&mut r, MAX_FRAME).unwrap(),
                _ => Message::decode(r.read_frame(MAX_FRAME, &mut buf).unwrap()).unwrap(),
            };
            assert_eq!(&got, want, "frame {i}");
        }
        t.join().unwrap();
        // The sender is gone: the end of the stream, reported as such.
        assert!(r.wait_readable(Duration::from_secs(5)).unwrap());
        match r.read_frame(MAX_FRAME, &mut buf) {
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

    /// The handshake is read on the caller's thread before the session reads ahead: the
    /// plaintext left over from the record that ended the handshake (here: the rest of a
    /// record holding four frames, the third cut across into the next record) is where the
    /// frames read ahead begin, none lost, none twice.
    #[test]
    fn frames_after_the_handshake_continue_in_the_same_record() {
        let (ki, kr) = keys_pair(&secret(1), &secret(1)).unwrap();
        let (c, s) = sockets();
        let mut tx = Channel::sealed(c, ki).unwrap();
        let big = MAX_PLAIN + 100;
        let msgs = [
            Message::Flush { seq: 1 },
            Message::Flush { seq: 2 },
            Message::Write {
                seq: 3,
                offset: 0,
                fua: false,
                data: vec![5u8; big],
            },
            Message::Flush { seq: 4 },
        ];
        for m in &msgs {
            tx.writer.write_all(&m.encode()).unwrap();
        }
        tx.writer.flush().unwrap();
        let mut rx = Channel::sealed(s, kr).unwrap();
        // "The handshake": the first frame, read directly.
        assert_eq!(rx.recv(MAX_FRAME).unwrap(), msgs[0]);
        assert!(
            !rx.reader.buffer().is_empty(),
            "the rest of the record is left over"
        );
        let Channel { reader, .. } = rx;
        let mut r = reader.open_ahead("test-open".into(), MAX_FRAME).unwrap();
        let mut buf = Vec::new();
        for want in &msgs[1..] {
            assert!(r.wait_readable(Duration::from_secs(5)).unwrap());
            let got = Message::decode(r.read_frame(MAX_FRAME, &mut buf).unwrap()).unwrap();
            assert_eq!(&got, want);
        }
        drop(tx);
        match r.read_frame(MAX_FRAME, &mut buf) {
            Err(ProtocolError::Io(e)) => assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof),
            other => panic!("after the last frame: {other:?}"),
        }
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
                            tx.writer.write_frame(&head, Body::Shared(data)).unwrap();
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
            rec: None,
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
            reader = reader.open_ahead("test-open".into(), MAX_FRAME).unwrap();
        }
        let mut got = Vec::new();
        let mut buf = Vec::new();
        loop {
            let r = match ahead {
                true => reader
                    .read_frame(MAX_FRAME, &mut buf)
                    .and_then(Message::decode),
                false => protocol::read_message(&mut reader, MAX_FRAME),
            };
            match r {
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

    /// A large payload given up to a sealed writer is sealed where it lies and sent from
    /// there (its buffer then holds ciphertext); one shared stays as it was and is copied
    /// into the records. Either way the reader gets every frame whole and in order, also one
    /// of more records than a writev takes at once.
    #[test]
    fn a_payload_given_up_is_sealed_where_it_lies() {
        let (ki, kr) = keys_pair(&secret(1), &secret(1)).unwrap();
        let (c, s) = sockets();
        let mut tx = Channel::sealed(c, ki).unwrap();
        let mut rx = Channel::sealed(s, kr).unwrap();
        let data = |len: usize, seed: usize| -> Vec<u8> {
            (0..len).map(|b| (b * 31 + seed) as u8).collect()
        };
        let sizes = [
            3 * MAX_PLAIN + 123,
            SEND_DIRECT,
            (IOV_BATCH / 3 + 3) * MAX_PLAIN + 7,
        ];
        let shared = data(70_000, 9);
        let mut want = vec![Message::Flush { seq: 0 }];
        for (i, &len) in sizes.iter().enumerate() {
            want.push(Message::Write {
                seq: 1 + i as u64,
                offset: (i as u64) << 30,
                fua: false,
                data: data(len, i),
            });
            // seq 100 and up: shared with others.
            want.push(Message::Write {
                seq: 100 + i as u64,
                offset: 0,
                fua: false,
                data: shared.clone(),
            });
            want.push(Message::Flush { seq: 10 + i as u64 });
        }
        let expected = want.clone();
        let reader = thread::spawn(move || {
            for w in &expected {
                assert_eq!(&rx.recv(MAX_FRAME).unwrap(), w);
            }
        });
        for m in &want {
            match m {
                Message::Write {
                    seq, offset, data, ..
                } if *seq < 100 => {
                    let head = protocol::encode_write_head(*seq, *offset, false, data.len());
                    let mut given = data.clone();
                    tx.writer
                        .write_frame(&head, Body::Given(&mut given))
                        .unwrap();
                    assert_ne!(&given, data, "sealed where it lay");
                }
                Message::Write {
                    seq, offset, data, ..
                } => {
                    let head = protocol::encode_write_head(*seq, *offset, false, data.len());
                    tx.writer.write_frame(&head, Body::Shared(data)).unwrap();
                }
                other => tx.writer.write_all(&other.encode()).unwrap(),
            }
        }
        tx.writer.flush().unwrap();
        assert_eq!(shared, data(70_000, 9), "a shared payload is left alone");
        reader.join().unwrap();
    }

    /// The records are the ones `snow`'s Noise transport makes and opens (tandem before
    /// these keys were used directly, and any Noise implementation): the same bytes on the
    /// wire, in both directions, for records of every size.
    #[test]
    fn records_are_noise_transport_messages() {
        let (nc, na) = ([1u8; 32], [2u8; 32]);
        let mut i = KeyExchange::new(Role::Initiator, &secret(1), "r0", &nc, &na).unwrap();
        let mut r = KeyExchange::new(Role::Responder, &secret(1), "r0", &nc, &na).unwrap();
        r.read(&i.write().unwrap()).unwrap();
        i.read(&r.write().unwrap()).unwrap();
        let ours = i.finish().unwrap();
        let noise = r.0.into_stateless_transport_mode().unwrap();
        for (n, len) in [(0u64, 1usize), (1, 4096), (2, MAX_PLAIN), (3, 100)] {
            let plain: Vec<u8> = (0..len).map(|b| (b * 7 + n as usize) as u8).collect();
            // Ours to Noise.
            let mut rec = plain.clone();
            rec.resize(len + TAG_LEN, 0);
            ours.seal(n, &mut rec).unwrap();
            let mut got = vec![0u8; MAX_RECORD];
            let m = noise.read_message(n, &rec, &mut got).unwrap();
            assert_eq!(&got[..m], &plain[..], "record {n} sealed here");
            // Noise to ours.
            let mut rec = vec![0u8; len + TAG_LEN];
            assert_eq!(noise.write_message(n, &plain, &mut rec).unwrap(), rec.len());
            assert_eq!(
                ours.open(n, &mut rec),
                Some(len),
                "record {n} sealed by Noise"
            );
            assert_eq!(&rec[..len], &plain[..]);
            // Under another number, it does not open.
            assert_eq!(ours.open(n + 1, &mut rec.clone()), None);
        }
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
            plain: Vec::new(),
            out: Vec::new(),
            out_len: 0,
            rec: None,
        };
        w.write_all(&frame).unwrap();
        let k = w.keys.clone().unwrap();
        w.seal(&k).unwrap();
        let (_, err) = open(kr, &w.out[..w.out_len]);
        assert!(err.unwrap_or_default().contains("out of bounds"));
    }
}
