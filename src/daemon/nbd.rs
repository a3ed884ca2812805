//! The NBD export served on the primary.
//!
//! Owns the wire protocol (fixed newstyle handshake, simple replies), the listening sockets,
//! one reader thread per connection, and a bounded pool of worker threads per connection that
//! run requests against a [`BlockDevice`] concurrently and answer them out of order. The
//! reader itself answers reads the device can serve at once (`read_now`), and a device that
//! answers writes from another thread (`writes_then`) gets few workers, which only start its
//! writes.
//! It does not know about replication: the device it is given decides what "durable" means
//! (locally and on the peer). [`FileDevice`] is the plain local implementation.
//!
//! Protocol reference: <https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md>.

// `FileDevice`, the stats and the TCP address are what the tests and benchmarks of the export
// use; the daemon itself serves a `Replicated` device and keeps its own counters.
#![allow(dead_code)]

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, IoSlice, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use log::{debug, info, warn};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use serde::Serialize;

use super::diskio;

#[cfg(test)]
mod tests;

/// What the export serves. Implemented by the replication engine (writes go to both nodes)
/// and, in tests, by a plain file. All methods are blocking and called from many threads at once.
pub trait BlockDevice: Send + Sync + 'static {
    fn size(&self) -> u64;
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// fua: the data must be durable (locally and on the peer) before returning.
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()>;
    /// Every write that returned before this call is durable (locally and on the peer).
    fn flush(&self) -> io::Result<()>;
    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()>;
    /// no_hole: NBD_CMD_FLAG_NO_HOLE was set (must allocate).
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool, no_hole: bool) -> io::Result<()>;

    /// Whether `write_then` returns before the write is complete (it then answers from
    /// another thread): the export calls it on the connection's reader thread instead of
    /// handing the write to a worker.
    fn writes_then(&self) -> bool {
        false
    }

    /// How long the connection's reader stays awake for the answer of a `write_then` it
    /// started alone in flight (`daemon.busy_poll`); zero: it goes back to reading at once.
    fn busy_poll(&self) -> Duration {
        Duration::ZERO
    }

    /// A write without FUA, answered by calling `done` exactly once with what `write` would
    /// return, on this thread or on another one (the thread that sees the peer's
    /// acknowledgement). The device may keep `data` (e.g. to send it to the peer without
    /// copying it); its buffer goes back to the connection once dropped.
    fn write_then(&self, offset: u64, data: Payload, done: Done) {
        done(self.write(offset, &data, false))
    }

    /// A read served at once, on the connection's reader thread, when it need not wait for
    /// the disk (the data is in the page cache). None: it would block, and a worker runs
    /// `read` instead.
    fn read_now(&self, offset: u64, buf: &mut [u8]) -> Option<io::Result<()>> {
        let _ = (offset, buf);
        None
    }
}

/// Called once with the result of a request started with [`BlockDevice::write_then`].
pub type Done = Box<dyn FnOnce(io::Result<()>) + Send>;

/// The data of one WRITE, in a buffer of its connection's pool, handed on rather than copied:
/// the replication sends it to the peer from here while the local write reads it too (a
/// clone shares the buffer). The buffer goes back to the pool when the last clone is
/// dropped, on whichever thread that happens.
#[derive(Clone)]
pub struct Payload(Arc<PayloadBuf>);

struct PayloadBuf {
    buf: Vec<u8>,
    pool: Option<Arc<Pool>>,
}

impl Payload {
    /// A payload of its own buffer, returned to no pool.
    pub fn from_vec(buf: Vec<u8>) -> Payload {
        Payload(Arc::new(PayloadBuf { buf, pool: None }))
    }

    fn pooled(buf: Vec<u8>, pool: Arc<Pool>) -> Payload {
        Payload(Arc::new(PayloadBuf {
            buf,
            pool: Some(pool),
        }))
    }

    /// Whether this is the only handle on the buffer.
    pub fn unique(&mut self) -> bool {
        Arc::get_mut(&mut self.0).is_some()
    }

    /// The buffer to change, if this is the only handle on it.
    pub fn get_mut(&mut self) -> Option<&mut [u8]> {
        Arc::get_mut(&mut self.0).map(|b| &mut b.buf[..])
    }
}

impl std::ops::Deref for Payload {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0.buf
    }
}

impl Drop for PayloadBuf {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.take() {
            pool.give(std::mem::take(&mut self.buf));
        }
    }
}

/// Payload buffers of one connection, kept for reuse (so a write's buffer is neither
/// allocated nor zeroed again).
#[derive(Default)]
pub struct Pool(Mutex<Vec<Vec<u8>>>);

impl Pool {
    /// A buffer of exactly `len` bytes (its contents are whatever it held before).
    fn take(&self, len: usize) -> Vec<u8> {
        let mut buf = lock(&self.0).pop().unwrap_or_default();
        buf.resize(len, 0);
        buf
    }

    fn give(&self, buf: Vec<u8>) {
        if buf.capacity() == 0 || buf.capacity() > POOL_MAX_BUFFER {
            return;
        }
        let mut pool = lock(&self.0);
        if pool.len() < POOL_BUFFERS {
            pool.push(buf);
        }
    }
}

/// Wire constants, in the spec's names without the `NBD_` prefix (also used by the small
/// client in src/nbd_client.rs).
pub mod wire {
    pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
    pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
    pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
    pub const REQUEST_MAGIC: u32 = 0x2560_9513;
    pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

    // Handshake flags (server) and client flags.
    pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
    pub const FLAG_NO_ZEROES: u16 = 1 << 1;
    pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
    pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

    // Options.
    pub const OPT_EXPORT_NAME: u32 = 1;
    pub const OPT_ABORT: u32 = 2;
    pub const OPT_LIST: u32 = 3;
    pub const OPT_INFO: u32 = 6;
    pub const OPT_GO: u32 = 7;

    // Option replies.
    pub const REP_ACK: u32 = 1;
    pub const REP_SERVER: u32 = 2;
    pub const REP_INFO: u32 = 3;
    pub const REP_ERR_UNSUP: u32 = 0x8000_0001;
    pub const REP_ERR_INVALID: u32 = 0x8000_0003;
    pub const REP_ERR_UNKNOWN: u32 = 0x8000_0006;

    // Information types (NBD_OPT_INFO / NBD_OPT_GO).
    pub const INFO_EXPORT: u16 = 0;
    pub const INFO_NAME: u16 = 1;
    pub const INFO_DESCRIPTION: u16 = 2;
    pub const INFO_BLOCK_SIZE: u16 = 3;

    // Transmission flags.
    pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
    pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
    pub const FLAG_SEND_FUA: u16 = 1 << 3;
    pub const FLAG_SEND_TRIM: u16 = 1 << 5;
    pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
    pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;

    // Commands.
    pub const CMD_READ: u16 = 0;
    pub const CMD_WRITE: u16 = 1;
    pub const CMD_DISC: u16 = 2;
    pub const CMD_FLUSH: u16 = 3;
    pub const CMD_TRIM: u16 = 4;
    pub const CMD_WRITE_ZEROES: u16 = 6;

    // Command flags.
    pub const CMD_FLAG_FUA: u16 = 1 << 0;
    pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

    // Errors (NBD's own numbering, which is Linux's, not the host's).
    pub const EPERM: u32 = 1;
    pub const EIO: u32 = 5;
    pub const ENOMEM: u32 = 12;
    pub const EINVAL: u32 = 22;
    pub const ENOSPC: u32 = 28;
    pub const EOVERFLOW: u32 = 75;
    pub const ENOTSUP: u32 = 95;
    pub const ESHUTDOWN: u32 = 108;
}

/// Largest READ or WRITE accepted (advertised as the maximum block size).
pub const MAX_REQUEST: u32 = 32 << 20;
/// Advertised preferred block size.
const PREFERRED_BLOCK: u32 = 4096;
/// Option data longer than this closes the connection before anything is allocated.
const MAX_OPTION_LEN: u32 = 64 << 10;
/// Options accepted before transmission; a client looping forever is cut off.
const MAX_OPTIONS: usize = 1024;
/// Requests queued or running per connection; also the number of worker threads.
const MAX_INFLIGHT: usize = 64;
/// Payload bytes held by queued or running requests per connection (one request always fits).
const MAX_INFLIGHT_BYTES: usize = 256 << 20;
/// Worker threads per connection of a device that answers plain writes from another thread
/// (`BlockDevice::writes_then`): its workers no longer wait for the peer, only for the disk,
/// and buffered writes to one file are serialised by the kernel (the inode lock), so more
/// threads only add lock contention and context switches (up to 64 workers spent 30 % of
/// the primary's samples in `finish_task_switch` under 4k random writes at qd32).
const WRITES_THEN_WORKERS: usize = 4;
/// Simultaneous connections per server.
const MAX_CONNECTIONS: usize = 64;
/// A client must finish the handshake within this time.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// A reply the client does not take within this time (its socket buffer stays full) ends the
/// connection: a client that sends requests and never reads the replies cannot hold a
/// connection's threads forever. Per write call: a client that reads, however slowly, stays.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// Reply bytes waiting for a client that does not read them (see `Conn::reply`) before the
/// reader stops taking its requests.
const MAX_BACKLOG: u64 = 64 << 10;
/// How long `shutdown` waits for connection threads.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(10);
/// Socket read buffer: many request headers per system call.
const READ_BUFFER: usize = 256 << 10;
/// Payload buffers kept for reuse per connection, and the largest one kept.
const POOL_BUFFERS: usize = MAX_INFLIGHT;
const POOL_MAX_BUFFER: usize = 4 << 20;
const DESCRIPTION: &str = "tandem replicated disk";

/// Counters since the server started.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct NbdStats {
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub trims: u64,
    pub zeroes: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// Connections accepted (cumulative).
    pub connections: u64,
}

#[derive(Default)]
struct Counters {
    reads: AtomicU64,
    writes: AtomicU64,
    flushes: AtomicU64,
    trims: AtomicU64,
    zeroes: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    connections: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> NbdStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        NbdStats {
            reads: get(&self.reads),
            writes: get(&self.writes),
            flushes: get(&self.flushes),
            trims: get(&self.trims),
            zeroes: get(&self.zeroes),
            bytes_read: get(&self.bytes_read),
            bytes_written: get(&self.bytes_written),
            connections: get(&self.connections),
        }
    }
}

fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

/// A poisoned lock only means another thread panicked; the data is still usable.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn invalid(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

// ---------------------------------------------------------------------------------------------
// Handshake
// ---------------------------------------------------------------------------------------------

/// What the server offers during the handshake.
struct Export<'a> {
    name: &'a str,
    size: u64,
    flags: u16,
}

impl Export<'_> {
    /// The empty name is the default export.
    fn matches(&self, name: &[u8]) -> bool {
        name.is_empty() || name == self.name.as_bytes()
    }
}

/// How the handshake ended (errors end the connection).
#[derive(Debug, PartialEq, Eq)]
enum Negotiated {
    Transmission,
    Abort,
}

/// The transmission flags of the export: what the handshake advertises, and what
/// `kernel_nbd` hands to the kernel with NBD_SET_FLAGS (the kernel skips the handshake).
pub const TRANSMISSION_FLAGS: u16 = wire::FLAG_HAS_FLAGS
    | wire::FLAG_SEND_FLUSH
    | wire::FLAG_SEND_FUA
    | wire::FLAG_SEND_TRIM
    | wire::FLAG_SEND_WRITE_ZEROES
    | wire::FLAG_CAN_MULTI_CONN;

pub(crate) fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

pub(crate) fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

fn option_reply(w: &mut impl Write, opt: u32, kind: u32, data: &[u8]) -> io::Result<()> {
    let mut out = Vec::with_capacity(20 + data.len());
    out.extend_from_slice(&wire::OPT_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&opt.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    w.write_all(&out)
}

/// Parses NBD_OPT_INFO/GO data: name length, name, count of info requests, info requests.
fn parse_info_request(data: &[u8]) -> Option<(&[u8], Vec<u16>)> {
    let name_len = u32::from_be_bytes(data.get(0..4)?.try_into().ok()?) as usize;
    let name = data.get(4..4usize.checked_add(name_len)?)?;
    let rest = &data[4 + name_len..];
    let count = u16::from_be_bytes(rest.get(0..2)?.try_into().ok()?) as usize;
    let infos = &rest[2..];
    if infos.len() != count * 2 {
        return None;
    }
    Some((
        name,
        infos
            .chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .collect(),
    ))
}

fn info_replies(w: &mut impl Write, opt: u32, export: &Export, asked: &[u16]) -> io::Result<()> {
    let mut d = Vec::with_capacity(12);
    d.extend_from_slice(&wire::INFO_EXPORT.to_be_bytes());
    d.extend_from_slice(&export.size.to_be_bytes());
    d.extend_from_slice(&export.flags.to_be_bytes());
    option_reply(w, opt, wire::REP_INFO, &d)?;
    // Sent even when not asked: min 1 imposes nothing, and clients learn the 32 MiB limit.
    let mut d = Vec::with_capacity(14);
    d.extend_from_slice(&wire::INFO_BLOCK_SIZE.to_be_bytes());
    d.extend_from_slice(&1u32.to_be_bytes());
    d.extend_from_slice(&PREFERRED_BLOCK.to_be_bytes());
    d.extend_from_slice(&MAX_REQUEST.to_be_bytes());
    option_reply(w, opt, wire::REP_INFO, &d)?;
    for (kind, text) in [
        (wire::INFO_NAME, export.name),
        (wire::INFO_DESCRIPTION, DESCRIPTION),
    ] {
        if asked.contains(&kind) {
            let mut d = kind.to_be_bytes().to_vec();
            d.extend_from_slice(text.as_bytes());
            option_reply(w, opt, wire::REP_INFO, &d)?;
        }
    }
    option_reply(w, opt, wire::REP_ACK, &[])
}

/// Runs the fixed newstyle handshake up to transmission or abort. Protocol violations are
/// errors: the caller closes the connection.
fn handshake(r: &mut impl Read, w: &mut impl Write, export: &Export) -> io::Result<Negotiated> {
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&wire::NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&wire::IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(wire::FLAG_FIXED_NEWSTYLE | wire::FLAG_NO_ZEROES).to_be_bytes());
    w.write_all(&hello)?;
    w.flush()?;

    let client_flags = read_u32(r)?;
    if client_flags & !(wire::FLAG_C_FIXED_NEWSTYLE | wire::FLAG_C_NO_ZEROES) != 0 {
        return Err(invalid("unknown client flags"));
    }
    if client_flags & wire::FLAG_C_FIXED_NEWSTYLE == 0 {
        return Err(invalid("client does not speak fixed newstyle"));
    }
    let no_zeroes = client_flags & wire::FLAG_C_NO_ZEROES != 0;

    for _ in 0..MAX_OPTIONS {
        if read_u64(r)? != wire::IHAVEOPT {
            return Err(invalid("bad option magic"));
        }
        let opt = read_u32(r)?;
        let len = read_u32(r)?;
        if len > MAX_OPTION_LEN {
            return Err(invalid("option data too long"));
        }
        let mut data = vec![0u8; len as usize];
        r.read_exact(&mut data)?;
        match opt {
            wire::OPT_EXPORT_NAME => {
                if !export.matches(&data) {
                    // This option has no error reply: closing is the answer.
                    return Err(invalid("unknown export name"));
                }
                let mut out = Vec::with_capacity(134);
                out.extend_from_slice(&export.size.to_be_bytes());
                out.extend_from_slice(&export.flags.to_be_bytes());
                if !no_zeroes {
                    out.extend_from_slice(&[0u8; 124]);
                }
                w.write_all(&out)?;
                return Ok(Negotiated::Transmission);
            }
            wire::OPT_ABORT => {
                // The client may already be gone; the ACK is a courtesy.
                let _ = option_reply(w, opt, wire::REP_ACK, &[]);
                return Ok(Negotiated::Abort);
            }
            wire::OPT_LIST => {
                if !data.is_empty() {
                    option_reply(w, opt, wire::REP_ERR_INVALID, b"LIST takes no data")?;
                    continue;
                }
                let mut d = (export.name.len() as u32).to_be_bytes().to_vec();
                d.extend_from_slice(export.name.as_bytes());
                option_reply(w, opt, wire::REP_SERVER, &d)?;
                option_reply(w, opt, wire::REP_ACK, &[])?;
            }
            wire::OPT_INFO | wire::OPT_GO => match parse_info_request(&data) {
                None => option_reply(w, opt, wire::REP_ERR_INVALID, b"malformed request")?,
                Some((name, _)) if !export.matches(name) => {
                    option_reply(w, opt, wire::REP_ERR_UNKNOWN, b"no such export")?
                }
                Some((_, asked)) => {
                    info_replies(w, opt, export, &asked)?;
                    if opt == wire::OPT_GO {
                        return Ok(Negotiated::Transmission);
                    }
                }
            },
            _ => option_reply(w, opt, wire::REP_ERR_UNSUP, b"option not supported")?,
        }
    }
    Err(invalid("too many options"))
}

// ---------------------------------------------------------------------------------------------
// Transmission: requests
// ---------------------------------------------------------------------------------------------

const REQUEST_LEN: usize = 28;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Request {
    flags: u16,
    kind: u16,
    cookie: u64,
    offset: u64,
    len: u32,
}

impl Request {
    /// None when the magic is wrong (the stream cannot be resynchronised).
    fn parse(b: &[u8; REQUEST_LEN]) -> Option<Request> {
        let be32 = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let be64 = |i: usize| (u64::from(be32(i)) << 32) | u64::from(be32(i + 4));
        if be32(0) != wire::REQUEST_MAGIC {
            return None;
        }
        Some(Request {
            flags: u16::from_be_bytes([b[4], b[5]]),
            kind: u16::from_be_bytes([b[6], b[7]]),
            cookie: be64(8),
            offset: be64(16),
            len: be32(24),
        })
    }

    #[cfg(test)]
    fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&wire::REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.len.to_be_bytes());
        b
    }
}

/// A validated request, ready for a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Command {
    Read,
    Write { fua: bool },
    Flush,
    Trim { fua: bool },
    Zeroes { fua: bool, no_hole: bool },
    Disc,
}

impl Command {
    /// Writes that a later FLUSH must wait for.
    fn is_write(&self) -> bool {
        matches!(
            self,
            Command::Write { .. } | Command::Trim { .. } | Command::Zeroes { .. }
        )
    }
}

/// Checks a request against the export; Err is the NBD error to answer with. An oversized
/// WRITE is not handled here: the caller must close the connection for it.
fn check(req: &Request, size: u64) -> Result<Command, u32> {
    let fua = req.flags & wire::CMD_FLAG_FUA != 0;
    let allowed = match req.kind {
        wire::CMD_DISC => return Ok(Command::Disc),
        wire::CMD_WRITE_ZEROES => wire::CMD_FLAG_FUA | wire::CMD_FLAG_NO_HOLE,
        wire::CMD_READ | wire::CMD_WRITE | wire::CMD_FLUSH | wire::CMD_TRIM => wire::CMD_FLAG_FUA,
        _ => return Err(wire::EINVAL),
    };
    if req.flags & !allowed != 0 {
        return Err(wire::EINVAL);
    }
    if req.kind == wire::CMD_FLUSH {
        return Ok(Command::Flush);
    }
    let in_range = req
        .offset
        .checked_add(u64::from(req.len))
        .is_some_and(|end| end <= size);
    if !in_range {
        // As qemu-nbd: writing past the end is "no space", anything else is invalid.
        return Err(match req.kind {
            wire::CMD_WRITE | wire::CMD_WRITE_ZEROES => wire::ENOSPC,
            _ => wire::EINVAL,
        });
    }
    match req.kind {
        wire::CMD_READ if req.len > MAX_REQUEST => Err(wire::EINVAL),
        wire::CMD_READ => Ok(Command::Read),
        wire::CMD_WRITE => Ok(Command::Write { fua }),
        wire::CMD_TRIM => Ok(Command::Trim { fua }),
        _ => Ok(Command::Zeroes {
            fua,
            no_hole: req.flags & wire::CMD_FLAG_NO_HOLE != 0,
        }),
    }
}

/// Maps a device error to the NBD error sent to the client.
fn nbd_errno(e: &io::Error) -> u32 {
    match e.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) | Some(libc::EROFS) => wire::EPERM,
        Some(libc::ENOMEM) => wire::ENOMEM,
        Some(libc::EINVAL) => wire::EINVAL,
        Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG) => wire::ENOSPC,
        Some(libc::EOVERFLOW) => wire::EOVERFLOW,
        Some(libc::ENOTSUP) => wire::ENOTSUP,
        Some(libc::ESHUTDOWN) => wire::ESHUTDOWN,
        Some(_) => wire::EIO,
        None => match e.kind() {
            io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem => wire::EPERM,
            io::ErrorKind::InvalidInput => wire::EINVAL,
            io::ErrorKind::OutOfMemory => wire::ENOMEM,
            io::ErrorKind::StorageFull => wire::ENOSPC,
            io::ErrorKind::Unsupported => wire::ENOTSUP,
            _ => wire::EIO,
        },
    }
}

// ---------------------------------------------------------------------------------------------
// Transmission: one connection
// ---------------------------------------------------------------------------------------------

/// A client socket, unix or TCP.
enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
        })
    }

    fn shutdown(&self) {
        // Already closed by the peer is fine.
        let _ = match self {
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
        };
    }

    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_read_timeout(t),
            Stream::Tcp(s) => s.set_read_timeout(t),
        }
    }

    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_write_timeout(t),
            Stream::Tcp(s) => s.set_write_timeout(t),
        }
    }
}

impl AsFd for Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Stream::Unix(s) => s.as_fd(),
            Stream::Tcp(s) => s.as_fd(),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write_vectored(bufs),
            Stream::Tcp(s) => s.write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What is left of a read this large goes from the socket straight into its place, not through
/// the read buffer (see `read_into_place`).
pub(crate) const READ_DIRECT: usize = 16 << 10;

/// Fill `out` from `r`: the bytes `r` already buffers are copied; the rest, when it is at least
/// READ_DIRECT, is read from the socket straight into `out`. (`BufReader` alone would refill
/// its buffer for the last part and copy it out: a quarter of a 1 MiB write copied once
/// more.) Whether `out` was large, i.e. whether the next small read (a header, a length)
/// should come straight from the socket too while nothing is buffered, rather than fill the
/// buffer with the next large payload.
pub(crate) fn read_into_place<R: Read>(r: &mut BufReader<R>, out: &mut [u8]) -> io::Result<bool> {
    let have = r.buffer().len().min(out.len());
    if out.len() - have < READ_DIRECT {
        r.read_exact(out)?;
        return Ok(out.len() >= READ_DIRECT);
    }
    out[..have].copy_from_slice(&r.buffer()[..have]);
    r.consume(have);
    r.get_mut().read_exact(&mut out[have..])?;
    Ok(true)
}

/// Writes a header and a payload with as few system calls as possible (one writev usually).
pub(crate) fn write_two(w: &mut impl Write, head: &[u8], body: &[u8]) -> io::Result<()> {
    let total = head.len() + body.len();
    let mut done = 0;
    while done < total {
        let res = if done < head.len() {
            w.write_vectored(&[IoSlice::new(&head[done..]), IoSlice::new(body)])
        } else {
            w.write(&body[done - head.len()..])
        };
        match res {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// One request handed to a worker.
struct Job {
    req: Request,
    cmd: Command,
    /// WRITE data (already read from the socket).
    payload: Vec<u8>,
    /// For writes: their sequence number; for FLUSH: the first sequence number it need not wait for.
    seq: u64,
    /// Bytes counted against MAX_INFLIGHT_BYTES.
    cost: usize,
}

/// Shared state of one connection, under one mutex.
#[derive(Default)]
struct State {
    jobs: VecDeque<Job>,
    /// Workers waiting for a job.
    idle: usize,
    workers: usize,
    /// The reader stopped: workers exit once the queue is empty.
    closed: bool,
    /// Requests queued or running, and their payload bytes.
    inflight: usize,
    inflight_bytes: usize,
    /// Requests admitted and not yet answered: `inflight` drops before the reply is sent (so
    /// that a client waiting for it finds its next request alone in flight), this after.
    unanswered: usize,
    /// Sequence numbers of writes queued or running.
    writes: BTreeSet<u64>,
    flush_waiters: usize,
    reader_waiting: bool,
}

struct Conn {
    dev: Arc<dyn BlockDevice>,
    counters: Arc<Counters>,
    /// Replies go out whole, one at a time, in completion order.
    writer: Mutex<Replies>,
    /// The backlog was sent (or its sending failed): a waiting replier may go on.
    drained: Condvar,
    /// `Replies::backlog`'s length, for the reader's admission.
    backlog: AtomicU64,
    state: Mutex<State>,
    /// A job was queued (or the queue closed).
    work: Condvar,
    /// A request completed: room for the reader, or the queue drained.
    room: Condvar,
    /// A write completed while a FLUSH was waiting.
    writes_done: Condvar,
    buffers: Arc<Pool>,
    /// The first reply that could not be sent (it ended the connection).
    reply_error: Mutex<Option<io::Error>>,
    /// MAX_INFLIGHT, or WRITES_THEN_WORKERS.
    max_workers: usize,
}

/// Who answers a request.
enum Via {
    /// A thread of the connection (a worker, the reader), which may wait for the client;
    /// with the data of a READ (or the buffer to give back).
    Thread(Vec<u8>),
    /// The device's callback, possibly on the thread that serves every connection.
    Callback,
}

/// The sending side of a connection.
struct Replies {
    stream: Stream,
    /// Reply bytes the socket did not take at once; `flushing` while a thread sends them.
    backlog: Vec<u8>,
    flushing: bool,
    /// A reply could not be sent: the connection is ending, later replies fail the same way.
    failed: Option<(io::ErrorKind, String)>,
}

/// `sendmsg` of `head` and `body` without blocking: the bytes the socket took (0 when full).
fn send_nowait(s: &Stream, head: &[u8], body: &[u8]) -> io::Result<usize> {
    use nix::sys::socket::{MsgFlags, sendmsg};
    let fd = match s {
        Stream::Unix(u) => u.as_raw_fd(),
        Stream::Tcp(t) => t.as_raw_fd(),
    };
    let iov = [IoSlice::new(head), IoSlice::new(body)];
    let n = if body.is_empty() { 1 } else { 2 };
    loop {
        match sendmsg::<()>(
            fd,
            &iov[..n],
            &[],
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Ok(sent) => return Ok(sent),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(nix::errno::Errno::EAGAIN) => return Ok(0),
            Err(e) => return Err(io::Error::from(e)),
        }
    }
}

impl Conn {
    /// Send a reply. `may_wait`: the caller may block until the client takes it (a worker,
    /// the reader). Otherwise (a write answered by the thread that reads the peer's acks,
    /// which serves every connection) a reply the socket cannot take at once goes to the
    /// connection's backlog, sent by a thread of its own: a client that stops reading its
    /// replies then stalls only itself.
    fn reply(
        self: &Arc<Self>,
        cookie: u64,
        error: u32,
        data: &[u8],
        may_wait: bool,
    ) -> io::Result<()> {
        let mut head = [0u8; 16];
        head[0..4].copy_from_slice(&wire::SIMPLE_REPLY_MAGIC.to_be_bytes());
        head[4..8].copy_from_slice(&error.to_be_bytes());
        head[8..16].copy_from_slice(&cookie.to_be_bytes());
        let mut w = lock(&self.writer);
        if may_wait {
            // In order: after the backlog.
            while w.flushing && w.failed.is_none() {
                w = self.drained.wait(w).unwrap_or_else(|e| e.into_inner());
            }
        }
        if let Some((kind, why)) = &w.failed {
            return Err(io::Error::new(*kind, why.clone()));
        }
        if w.flushing {
            w.backlog.extend_from_slice(&head);
            w.backlog.extend_from_slice(data);
            self.backlog
                .store(w.backlog.len() as u64, Ordering::Release);
            return Ok(());
        }
        let res = match may_wait {
            true => write_two(&mut w.stream, &head, data),
            false => match send_nowait(&w.stream, &head, data) {
                Ok(n) if n == head.len() + data.len() => Ok(()),
                Ok(n) => {
                    let rest = [&head[..], data].concat();
                    w.backlog.extend_from_slice(&rest[n..]);
                    self.backlog
                        .store(w.backlog.len() as u64, Ordering::Release);
                    w.flushing = true;
                    drop(w);
                    self.start_flusher();
                    return Ok(());
                }
                Err(e) => Err(e),
            },
        };
        if let Err(e) = &res {
            self.reply_failed(&mut w, e);
        }
        res
    }

    /// The client is gone or takes no replies: wake the reader so the connection winds down.
    fn reply_failed(&self, w: &mut Replies, e: &io::Error) {
        w.stream.shutdown();
        w.failed = Some((e.kind(), e.to_string()));
        let mut first = lock(&self.reply_error);
        if first.is_none() {
            *first = Some(io::Error::new(e.kind(), e.to_string()));
        }
    }

    /// Send the backlog on a thread of its own, waiting for the client as long as the reply
    /// timeout allows each write. The connection is not drained (DISC, shutdown) before it
    /// is done.
    fn start_flusher(self: &Arc<Self>) {
        lock(&self.state).unanswered += 1;
        let conn = Arc::clone(self);
        let spawned = thread::Builder::new()
            .name("nbd-replies".into())
            .spawn(move || conn.flush_backlog());
        if let Err(e) = spawned {
            warn!("nbd: cannot start a thread to send delayed replies: {e}");
            // Sent here then, waiting as a worker would.
            self.flush_backlog();
        }
    }

    fn flush_backlog(&self) {
        let mut w = lock(&self.writer);
        // Written to outside the lock, so that replies can join the backlog meanwhile.
        let mut stream = match w.stream.try_clone() {
            Ok(s) => Some(s),
            Err(e) => {
                self.reply_failed(&mut w, &e);
                None
            }
        };
        while let Some(stream) = stream.as_mut() {
            if w.backlog.is_empty() || w.failed.is_some() {
                break;
            }
            let out = std::mem::take(&mut w.backlog);
            drop(w);
            let res = stream.write_all(&out);
            w = lock(&self.writer);
            self.backlog
                .store(w.backlog.len() as u64, Ordering::Release);
            if let Err(e) = res {
                self.reply_failed(&mut w, &e);
            }
        }
        w.backlog = Vec::new();
        w.flushing = false;
        self.backlog.store(0, Ordering::Release);
        drop(w);
        self.drained.notify_all();
        let mut st = lock(&self.state);
        st.unanswered -= 1;
        // The reader may wait for the backlog to shrink, or for the last reply.
        self.room.notify_all();
    }

    fn take_buffer(&self, len: usize) -> Vec<u8> {
        self.buffers.take(len)
    }

    fn give_buffer(&self, buf: Vec<u8>) {
        self.buffers.give(buf)
    }

    /// Blocks the reader until one more request of `cost` bytes may be in flight; returns
    /// how many are in flight with it.
    fn admit(&self, cost: usize) -> usize {
        let mut st = lock(&self.state);
        while st.inflight >= MAX_INFLIGHT
            || (st.inflight > 0 && st.inflight_bytes + cost > MAX_INFLIGHT_BYTES)
            || self.backlog.load(Ordering::Acquire) > MAX_BACKLOG
        {
            st.reader_waiting = true;
            st = self.room.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        st.reader_waiting = false;
        st.inflight += 1;
        st.inflight_bytes += cost;
        st.unanswered += 1;
        st.inflight
    }

    /// Undoes `admit` for a request that never reached a worker.
    fn unadmit(&self, cost: usize) {
        let mut st = lock(&self.state);
        st.inflight -= 1;
        st.inflight_bytes -= cost;
        st.unanswered -= 1;
        self.room.notify_all();
    }

    fn dispatch(self: &Arc<Self>, job: Job) {
        let mut st = lock(&self.state);
        if job.cmd.is_write() {
            st.writes.insert(job.seq);
        }
        st.jobs.push_back(job);
        if st.jobs.len() > st.idle && st.workers < self.max_workers {
            let conn = Arc::clone(self);
            let spawned = thread::Builder::new()
                .name("nbd-worker".into())
                .spawn(move || conn.work_loop());
            match spawned {
                Ok(_) => st.workers += 1,
                Err(e) => {
                    warn!("nbd: cannot start a worker thread: {e}");
                    // Existing workers drain the queue; with none, the reader runs the request.
                    if st.workers == 0
                        && let Some(job) = st.jobs.pop_back()
                    {
                        drop(st);
                        self.run(job);
                        return;
                    }
                }
            }
        }
        let idle = st.idle;
        drop(st);
        // A notify is a system call even with nobody waiting: only for an idle worker.
        if idle > 0 {
            self.work.notify_one();
        }
    }

    fn work_loop(self: &Arc<Self>) {
        loop {
            let job = {
                let mut st = lock(&self.state);
                loop {
                    if let Some(job) = st.jobs.pop_front() {
                        break job;
                    }
                    if st.closed {
                        st.workers -= 1;
                        return;
                    }
                    st.idle += 1;
                    st = self.work.wait(st).unwrap_or_else(|e| e.into_inner());
                    st.idle -= 1;
                }
            };
            self.run(job);
        }
    }

    fn run(self: &Arc<Self>, job: Job) {
        let Job {
            req,
            cmd,
            payload,
            seq,
            cost,
        } = job;
        let dev = &*self.dev;
        let len = u64::from(req.len);
        let mut data = Vec::new();
        let result = match cmd {
            Command::Read => {
                // The reader took the buffer for the data.
                data = payload;
                data.resize(req.len as usize, 0);
                dev.read(req.offset, &mut data)
            }
            Command::Write { fua: false } if dev.writes_then() => {
                // Answered by the device's callback; this worker goes on with the next job.
                self.write_then(req, cmd, payload, seq, cost);
                return;
            }
            Command::Write { fua } => {
                let r = dev.write(req.offset, &payload, fua);
                self.give_buffer(payload);
                r
            }
            Command::Flush => {
                self.wait_for_writes_before(seq);
                dev.flush()
            }
            Command::Trim { fua } => dev.trim(req.offset, len, fua),
            Command::Zeroes { fua, no_hole } => dev.write_zeroes(req.offset, len, fua, no_hole),
            Command::Disc => Ok(()),
        };
        self.finish(req, cmd, result, Via::Thread(data), seq, cost);
    }

    /// Start a plain write on a device that answers it through a callback (`write_then`).
    fn write_then(
        self: &Arc<Self>,
        req: Request,
        cmd: Command,
        payload: Vec<u8>,
        seq: u64,
        cost: usize,
    ) -> Arc<AtomicBool> {
        let c = Arc::clone(self);
        let answered = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&answered);
        // Possibly on the thread that reads the peer's acks: it must not wait for a client.
        let done: Done = Box::new(move |result| {
            c.finish(req, cmd, result, Via::Callback, seq, cost);
            flag.store(true, Ordering::Release);
        });
        let payload = Payload::pooled(payload, Arc::clone(&self.buffers));
        self.dev.write_then(req.offset, payload, done);
        answered
    }

    /// Answer a request (with `data` for a successful READ) and release what it held.
    fn finish(
        self: &Arc<Self>,
        req: Request,
        cmd: Command,
        result: io::Result<()>,
        via: Via,
        seq: u64,
        cost: usize,
    ) {
        let (data, may_wait) = match via {
            Via::Thread(data) => (data, true),
            Via::Callback => (Vec::new(), false),
        };
        {
            let mut st = lock(&self.state);
            st.inflight -= 1;
            st.inflight_bytes -= cost;
            if cmd.is_write() {
                st.writes.remove(&seq);
                if st.flush_waiters > 0 {
                    self.writes_done.notify_all();
                }
            }
            if st.reader_waiting {
                self.room.notify_all();
            }
        }
        let c = &*self.counters;
        let sent = match &result {
            Ok(()) => {
                match cmd {
                    Command::Read => {
                        bump(&c.reads, 1);
                        bump(&c.bytes_read, u64::from(req.len));
                    }
                    Command::Write { .. } => {
                        bump(&c.writes, 1);
                        bump(&c.bytes_written, u64::from(req.len));
                    }
                    Command::Flush => bump(&c.flushes, 1),
                    Command::Trim { .. } => bump(&c.trims, 1),
                    Command::Zeroes { .. } => bump(&c.zeroes, 1),
                    Command::Disc => {}
                }
                self.reply(
                    req.cookie,
                    0,
                    if cmd == Command::Read { &data } else { &[] },
                    may_wait,
                )
            }
            Err(e) => {
                debug!("nbd: request {:?} failed: {e}", req);
                self.reply(req.cookie, nbd_errno(e), &[], may_wait)
            }
        };
        if let Err(e) = sent {
            debug!("nbd: cannot send reply: {e}");
        }
        self.give_buffer(data);
        let mut st = lock(&self.state);
        st.unanswered -= 1;
        if st.closed {
            self.room.notify_all();
        }
    }

    /// A FLUSH covers every write received before it: wait until those have completed.
    fn wait_for_writes_before(&self, barrier: u64) {
        let mut st = lock(&self.state);
        st.flush_waiters += 1;
        while st.writes.first().is_some_and(|&s| s < barrier) {
            st = self.writes_done.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        st.flush_waiters -= 1;
    }

    /// Stops the workers once every queued and running request has been answered.
    fn close_and_drain(&self) {
        let mut st = lock(&self.state);
        st.closed = true;
        self.work.notify_all();
        while st.unanswered > 0 {
            st = self.room.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// Reads one request header; Ok(false) on a clean end of stream between requests.
fn read_header(r: &mut impl Read, buf: &mut [u8; REQUEST_LEN]) -> io::Result<bool> {
    let mut filled = 0;
    while filled < REQUEST_LEN {
        match r.read(&mut buf[filled..]) {
            Ok(0) if filled == 0 => return Ok(false),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Reads and drops `len` bytes of a payload that will not be used.
fn discard(r: &mut impl Read, len: u32) -> io::Result<()> {
    let copied = io::copy(&mut r.take(u64::from(len)), &mut io::sink())?;
    if copied != u64::from(len) {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// The reader side of the transmission phase: decodes requests and hands them to workers
/// until DISC, end of stream or a protocol violation.
fn transmission<R: Read + AsFd>(
    conn: &Arc<Conn>,
    r: &mut BufReader<R>,
    size: u64,
) -> io::Result<()> {
    let mut head = [0u8; REQUEST_LEN];
    let mut next_seq = 0u64;
    // After a large payload, the next header is read alone while nothing is buffered, so
    // that the buffer does not fill with (and copy out) the next large payload.
    let mut after_large = false;
    loop {
        let more = match after_large && r.buffer().is_empty() {
            true => read_header(r.get_mut(), &mut head)?,
            false => read_header(r, &mut head)?,
        };
        if !more {
            return Ok(());
        }
        after_large = false;
        let req = Request::parse(&head).ok_or_else(|| invalid("bad request magic"))?;
        if req.kind == wire::CMD_WRITE && req.len > MAX_REQUEST {
            return Err(invalid("write larger than the maximum block size"));
        }
        let cmd = match check(&req, size) {
            Ok(Command::Disc) => return Ok(()),
            Ok(cmd) => cmd,
            Err(errno) => {
                if req.kind == wire::CMD_WRITE {
                    discard(r, req.len)?;
                }
                conn.reply(req.cookie, errno, &[], true)?;
                continue;
            }
        };
        let cost = match cmd {
            Command::Read | Command::Write { .. } => req.len as usize,
            _ => 0,
        };
        let alone = conn.admit(cost) == 1;
        let mut payload = Vec::new();
        if let Command::Write { .. } | Command::Read = cmd {
            payload = conn.take_buffer(req.len as usize);
        }
        if let Command::Write { .. } = cmd {
            match read_into_place(r, &mut payload) {
                Ok(large) => after_large = large,
                Err(e) => {
                    conn.unadmit(cost);
                    return Err(e);
                }
            }
        }
        let seq = next_seq;
        if cmd.is_write() {
            next_seq += 1;
        }
        // Served here, without a worker: a read of cached data, and a plain write of a device
        // that answers it from another thread (the replication's ack receiver) when it is the
        // only request in flight (nothing to overlap its local write with: a worker would only
        // add a thread handoff).
        if cmd == Command::Read
            && let Some(result) = conn.dev.read_now(req.offset, &mut payload)
        {
            conn.finish(req, cmd, result, Via::Thread(payload), seq, cost);
            continue;
        }
        if alone && cmd == (Command::Write { fua: false }) && conn.dev.writes_then() {
            lock(&conn.state).writes.insert(seq);
            let answered = conn.write_then(req, cmd, payload, seq, cost);
            await_lone(&answered, r, conn.dev.busy_poll());
            continue;
        }
        conn.dispatch(Job {
            req,
            cmd,
            payload,
            seq,
            cost,
        });
    }
}

/// After starting a write alone in flight, stay awake until it is answered, for at most
/// `limit` (`daemon.busy_poll`) and only while the client sends nothing else. The answer
/// comes from the thread that reads the peer's acknowledgement; when this CPU has gone idle
/// meanwhile, waking that thread costs what waking an idle CPU costs: on a virtual machine
/// whose idle vCPUs halt at once (`guest_halt_poll_ns` 0) some 20 µs per write, which a
/// client at queue depth 1 waits for. Yielding, not sleeping, keeps this CPU running and
/// gives it to any other thread that is ready.
fn await_lone<R: Read + AsFd>(answered: &AtomicBool, r: &BufReader<R>, limit: Duration) {
    if limit.is_zero() {
        return;
    }
    let start = Instant::now();
    while !answered.load(Ordering::Acquire) {
        if start.elapsed() >= limit || !r.buffer().is_empty() {
            return;
        }
        let mut fds = [PollFd::new(r.get_ref().as_fd(), PollFlags::POLLIN)];
        if !matches!(poll(&mut fds, PollTimeout::ZERO), Ok(0)) {
            return;
        }
        thread::yield_now();
    }
}

/// How a connection begins.
#[derive(Clone, Copy)]
enum Opening<'a> {
    /// A client that negotiates the export (fixed newstyle) before transmission.
    Handshake { name: &'a str },
    /// The kernel's nbd driver after NBD_SET_SOCK: it sends requests straight away.
    Transmission,
}

/// Serves one client from its first byte to close.
fn serve(
    stream: Stream,
    dev: Arc<dyn BlockDevice>,
    opening: Opening,
    counters: Arc<Counters>,
    reply_timeout: Duration,
) {
    let peer = match (&stream, opening) {
        (Stream::Unix(_), Opening::Transmission) => "kernel".to_string(),
        (Stream::Unix(_), _) => "unix".to_string(),
        (Stream::Tcp(s), _) => s
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "tcp".into()),
    };
    if let Err(e) = serve_inner(&stream, dev, opening, counters, reply_timeout) {
        match e.kind() {
            io::ErrorKind::InvalidData => warn!("nbd: closing {peer}: {e}"),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => warn!(
                "nbd: closing {peer}: it took no reply for {}s",
                reply_timeout.as_secs_f64()
            ),
            _ => debug!("nbd: {peer}: {e}"),
        }
    }
    stream.shutdown();
    debug!("nbd: {peer} disconnected");
}

fn serve_inner(
    stream: &Stream,
    dev: Arc<dyn BlockDevice>,
    opening: Opening,
    counters: Arc<Counters>,
    reply_timeout: Duration,
) -> io::Result<()> {
    // Replies (and handshake answers) are written with a timeout: see REPLY_TIMEOUT.
    stream.set_write_timeout(Some(reply_timeout))?;
    let mut r = BufReader::with_capacity(READ_BUFFER, stream.try_clone()?);
    let mut w = stream.try_clone()?;
    let size = dev.size();
    if let Opening::Handshake { name } = opening {
        stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
        let export = Export {
            name,
            size,
            flags: TRANSMISSION_FLAGS,
        };
        if handshake(&mut r, &mut w, &export)? == Negotiated::Abort {
            return Ok(());
        }
    }
    stream.set_read_timeout(None)?;
    let max_workers = if dev.writes_then() {
        WRITES_THEN_WORKERS
    } else {
        MAX_INFLIGHT
    };
    let conn = Arc::new(Conn {
        dev,
        counters,
        writer: Mutex::new(Replies {
            stream: w,
            backlog: Vec::new(),
            flushing: false,
            failed: None,
        }),
        drained: Condvar::new(),
        backlog: AtomicU64::new(0),
        state: Mutex::new(State::default()),
        work: Condvar::new(),
        room: Condvar::new(),
        writes_done: Condvar::new(),
        buffers: Arc::default(),
        reply_error: Mutex::new(None),
        max_workers,
    });
    let result = transmission(&conn, &mut r, size);
    conn.close_and_drain();
    // A reply that timed out shut the socket down, which ended the reader with a plain end of
    // stream or a reset: say why the connection really ended.
    match conn
        .reply_error
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
    {
        Some(e) => Err(e),
        None => result,
    }
}

// ---------------------------------------------------------------------------------------------
// The server: listeners and connection bookkeeping
// ---------------------------------------------------------------------------------------------

struct Shared {
    dev: Arc<dyn BlockDevice>,
    name: String,
    counters: Arc<Counters>,
    stop: AtomicBool,
    /// Identifies connections in `conns`.
    next_id: AtomicU64,
    /// Open client sockets, to shut them down on `shutdown`.
    conns: Mutex<HashMap<u64, Stream>>,
    /// Connection threads still running.
    live: Mutex<usize>,
    live_cv: Condvar,
    reply_timeout: Duration,
}

/// An NBD server exporting one device on a unix socket and/or a TCP address.
/// The export exists only while the node is primary: `shutdown` ends it.
pub struct NbdServer {
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
    /// Writing a byte here wakes the acceptor.
    wake: Option<File>,
    /// The socket file and its inode, removed on shutdown if still ours.
    unix_path: Option<(PathBuf, u64, u64)>,
    tcp_addr: Option<SocketAddr>,
}

fn pipe() -> io::Result<(File, File)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: fds is a valid array of two ints for pipe(2) to fill.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe(2) succeeded, so both descriptors are open and owned by nobody else.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    for fd in [&r, &w] {
        // SAFETY: fd is open; FD_CLOEXEC keeps it out of hook processes.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    Ok((File::from(r), File::from(w)))
}

/// Binds the unix socket, replacing a stale socket file but never a live one or a non-socket.
fn bind_unix(path: &Path) -> anyhow::Result<UnixListener> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            bail!("{} exists and is not a socket", path.display());
        }
        if UnixStream::connect(path).is_ok() {
            bail!("{} is served by another process", path.display());
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    super::unixsock::bind_private(path).with_context(|| format!("binding {}", path.display()))
}

impl NbdServer {
    /// Listen on a unix socket (remove a stale socket file first; mode 0600),
    /// and optionally also on a TCP address (for tests/benchmarks on localhost).
    pub fn start(
        unix: Option<&Path>,
        tcp: Option<SocketAddr>,
        export_name: &str,
        dev: Arc<dyn BlockDevice>,
    ) -> anyhow::Result<NbdServer> {
        NbdServer::start_with(unix, tcp, export_name, dev, REPLY_TIMEOUT)
    }

    /// `start` with another reply timeout (tests).
    pub fn start_with(
        unix: Option<&Path>,
        tcp: Option<SocketAddr>,
        export_name: &str,
        dev: Arc<dyn BlockDevice>,
        reply_timeout: Duration,
    ) -> anyhow::Result<NbdServer> {
        if unix.is_none() && tcp.is_none() {
            bail!("NBD server needs a unix socket path or a TCP address");
        }
        if export_name.len() > 4096 {
            bail!("NBD export name longer than 4096 bytes");
        }
        let unix_listener = unix.map(bind_unix).transpose()?;
        let unix_path = match (unix, &unix_listener) {
            (Some(p), Some(_)) => {
                let meta = std::fs::symlink_metadata(p)
                    .with_context(|| format!("stat {}", p.display()))?;
                Some((p.to_path_buf(), meta.dev(), meta.ino()))
            }
            _ => None,
        };
        let tcp_listener = tcp
            .map(|a| TcpListener::bind(a).with_context(|| format!("binding NBD on {a}")))
            .transpose()?;
        let tcp_addr = tcp_listener
            .as_ref()
            .map(|l| l.local_addr())
            .transpose()
            .context("NBD TCP address")?;
        if let Some(l) = &unix_listener {
            l.set_nonblocking(true).context("unix listener")?;
        }
        if let Some(l) = &tcp_listener {
            l.set_nonblocking(true).context("TCP listener")?;
        }
        let (wake_r, wake_w) = pipe().context("creating a pipe")?;
        let shared = Arc::new(Shared {
            dev,
            name: export_name.to_string(),
            counters: Arc::new(Counters::default()),
            stop: AtomicBool::new(false),
            next_id: AtomicU64::new(0),
            conns: Mutex::new(HashMap::new()),
            live: Mutex::new(0),
            live_cv: Condvar::new(),
            reply_timeout,
        });
        let s = Arc::clone(&shared);
        let acceptor = thread::Builder::new()
            .name("nbd-accept".into())
            .spawn(move || accept_loop(&s, unix_listener, tcp_listener, wake_r))
            .context("starting the NBD accept thread")?;
        if let Some((p, _, _)) = &unix_path {
            info!("nbd: exporting '{export_name}' on {}", p.display());
        }
        if let Some(a) = tcp_addr {
            info!("nbd: exporting '{export_name}' on {a}");
        }
        Ok(NbdServer {
            shared,
            acceptor: Some(acceptor),
            wake: Some(wake_w),
            unix_path,
            tcp_addr,
        })
    }

    /// The TCP address actually bound (useful with port 0).
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp_addr
    }

    pub fn stats(&self) -> NbdStats {
        self.shared.counters.snapshot()
    }

    /// Serves the export on `stream` from the transmission phase on, without a handshake: what
    /// the kernel's nbd driver expects on the socket it was given with NBD_SET_SOCK (it knows
    /// size and flags from its ioctls). Returns once the connection's thread runs; the
    /// connection ends on NBD_CMD_DISC, when the other end closes, or on `shutdown`.
    pub fn serve_kernel(&self, stream: UnixStream) -> io::Result<()> {
        admit_client(&self.shared, Stream::Unix(stream), false)
    }

    /// Stop accepting, close every client connection, wait (bounded) for their threads and
    /// remove the unix socket file.
    pub fn shutdown(mut self) {
        self.stop(SHUTDOWN_WAIT);
    }

    /// `shutdown`, waiting up to `wait` for requests in flight (a replicated write may wait
    /// for the peer as long as the dead-peer timeout). False if some were still running.
    pub fn shutdown_within(mut self, wait: Duration) -> bool {
        self.stop(wait)
    }

    fn stop(&mut self, wait: Duration) -> bool {
        let Some(acceptor) = self.acceptor.take() else {
            return true;
        };
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(mut w) = self.wake.take() {
            let _ = w.write_all(b"x");
        }
        let _ = acceptor.join();
        for s in lock(&self.shared.conns).values() {
            s.shutdown();
        }
        let deadline = Instant::now() + wait;
        let mut live = lock(&self.shared.live);
        let mut drained = true;
        while *live > 0 {
            let now = Instant::now();
            if now >= deadline {
                warn!("nbd: {} connection(s) still busy after shutdown", *live);
                drained = false;
                break;
            }
            live = self
                .shared
                .live_cv
                .wait_timeout(live, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        drop(live);
        if let Some((path, dev, ino)) = self.unix_path.take() {
            // Another server may own the path by now; only remove our own socket.
            let ours =
                std::fs::symlink_metadata(&path).is_ok_and(|m| m.dev() == dev && m.ino() == ino);
            if ours && let Err(e) = std::fs::remove_file(&path) {
                warn!("nbd: removing {}: {e}", path.display());
            }
        }
        info!("nbd: export '{}' stopped", self.shared.name);
        drained
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        self.stop(SHUTDOWN_WAIT);
    }
}

fn accept_loop(
    shared: &Arc<Shared>,
    unix: Option<UnixListener>,
    tcp: Option<TcpListener>,
    wake: File,
) {
    loop {
        let mut fds = vec![libc::pollfd {
            fd: wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        for fd in [
            unix.as_ref().map(|l| l.as_raw_fd()),
            tcp.as_ref().map(|l| l.as_raw_fd()),
        ]
        .into_iter()
        .flatten()
        {
            fds.push(libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            });
        }
        // SAFETY: fds is a valid, initialised array of pollfd of the given length.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 1000) };
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                warn!("nbd: poll: {e}");
                thread::sleep(Duration::from_millis(100));
            }
            continue;
        }
        if let Some(l) = &unix {
            while let Ok((s, _)) = l.accept() {
                accepted(shared, s.set_nonblocking(false).map(|_| Stream::Unix(s)));
            }
        }
        if let Some(l) = &tcp {
            while let Ok((s, _)) = l.accept() {
                let s = s
                    .set_nonblocking(false)
                    .and_then(|_| s.set_nodelay(true))
                    .map(|_| Stream::Tcp(s));
                accepted(shared, s);
            }
        }
    }
}

/// A client from a listener: it starts with the handshake.
fn accepted(shared: &Arc<Shared>, stream: io::Result<Stream>) {
    let stream = match stream {
        Ok(s) => s,
        Err(e) => {
            warn!("nbd: setting up a connection: {e}");
            return;
        }
    };
    if let Err(e) = admit_client(shared, stream, true) {
        warn!("nbd: {e}");
    }
}

/// Registers a new connection and starts its thread; `handshake` false for the kernel.
fn admit_client(shared: &Arc<Shared>, stream: Stream, handshake: bool) -> io::Result<()> {
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    {
        let mut live = lock(&shared.live);
        if *live >= MAX_CONNECTIONS {
            stream.shutdown();
            return Err(io::Error::other(format!(
                "refusing a connection: {MAX_CONNECTIONS} already open"
            )));
        }
        *live += 1;
    }
    bump(&shared.counters.connections, 1);
    match stream.try_clone() {
        Ok(c) => {
            lock(&shared.conns).insert(id, c);
        }
        Err(e) => warn!("nbd: cannot track a connection for shutdown: {e}"),
    }
    let s = Arc::clone(shared);
    let spawned = thread::Builder::new()
        .name("nbd-conn".into())
        .spawn(move || {
            let opening = if handshake {
                Opening::Handshake { name: &s.name }
            } else {
                Opening::Transmission
            };
            serve(
                stream,
                Arc::clone(&s.dev),
                opening,
                Arc::clone(&s.counters),
                s.reply_timeout,
            );
            lock(&s.conns).remove(&id);
            *lock(&s.live) -= 1;
            s.live_cv.notify_all();
        });
    if let Err(e) = spawned {
        if let Some(s) = lock(&shared.conns).remove(&id) {
            s.shutdown();
        }
        *lock(&shared.live) -= 1;
        return Err(io::Error::new(
            e.kind(),
            format!("cannot start a connection thread: {e}"),
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// FileDevice
// ---------------------------------------------------------------------------------------------

/// A regular file or a local block device, without replication. Writes go through the page
/// cache; FLUSH and FUA are fdatasync.
pub struct FileDevice {
    file: File,
    size: u64,
    /// Cleared once fallocate reports the operation unsupported, to skip the attempt after.
    punch_hole: AtomicBool,
    zero_range: AtomicBool,
}

/// Bytes written per pwrite when zeroes must be written out.
const ZERO_CHUNK: usize = 1 << 20;

impl FileDevice {
    /// Opens `path` read-write. With `size`, a regular file is created or extended to that size
    /// (a larger one exports only its first `size` bytes); a block device must be at least that
    /// large. Without it, the whole file or device is exported.
    pub fn open(path: impl AsRef<Path>, size: Option<u64>) -> io::Result<FileDevice> {
        let path = path.as_ref();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(size.is_some())
            .truncate(false)
            .open(path)?;
        let meta = file.metadata()?;
        let ft = meta.file_type();
        let actual = if ft.is_file() {
            meta.len()
        } else if ft.is_block_device() || ft.is_char_device() {
            diskio::disk_size(&file)?
        } else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is neither a file nor a device", path.display()),
            ));
        };
        let size = match size {
            Some(want) if want > actual && ft.is_file() => {
                file.set_len(want)?;
                want
            }
            Some(want) if want > actual => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "{} has {actual} bytes, fewer than the {want} asked for",
                        path.display()
                    ),
                ));
            }
            Some(want) => want,
            None => actual,
        };
        Ok(FileDevice {
            file,
            size,
            punch_hole: AtomicBool::new(true),
            zero_range: AtomicBool::new(true),
        })
    }

    fn write_zero_bytes(&self, mut offset: u64, len: u64) -> io::Result<()> {
        let zeroes = vec![0u8; (len.min(ZERO_CHUNK as u64)) as usize];
        let end = offset + len;
        while offset < end {
            let n = (end - offset).min(zeroes.len() as u64) as usize;
            self.file.write_all_at(&zeroes[..n], offset)?;
            offset += n as u64;
        }
        Ok(())
    }

    /// Tries fallocate(mode); Ok(false) when this file or system cannot do it.
    fn try_fallocate(
        &self,
        enabled: &AtomicBool,
        mode: i32,
        offset: u64,
        len: u64,
    ) -> io::Result<bool> {
        if !enabled.load(Ordering::Relaxed) {
            return Ok(false);
        }
        match diskio::fallocate(&self.file, mode, offset, len) {
            Ok(()) => Ok(true),
            Err(e) => match e.raw_os_error() {
                Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::ENODEV) => {
                    enabled.store(false, Ordering::Relaxed);
                    Ok(false)
                }
                // Misaligned ranges on some devices: write zeroes for this one.
                Some(libc::EINVAL) => Ok(false),
                _ => Err(e),
            },
        }
    }

    fn sync_if(&self, fua: bool) -> io::Result<()> {
        if fua { self.file.sync_data() } else { Ok(()) }
    }
}

impl BlockDevice for FileDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        self.file.write_all_at(data, offset)?;
        self.sync_if(fua)
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        // Trimmed ranges read back as zeroes on both nodes, whatever each one's storage can do.
        if !self.try_fallocate(&self.punch_hole, diskio::PUNCH_HOLE, offset, len)? {
            self.write_zero_bytes(offset, len)?;
        }
        self.sync_if(fua)
    }

    fn write_zeroes(&self, offset: u64, len: u64, fua: bool, no_hole: bool) -> io::Result<()> {
        let done = (!no_hole
            && self.try_fallocate(&self.punch_hole, diskio::PUNCH_HOLE, offset, len)?)
            || self.try_fallocate(&self.zero_range, diskio::ZERO_RANGE, offset, len)?;
        if !done {
            self.write_zero_bytes(offset, len)?;
        }
        self.sync_if(fua)
    }
}

// ---------------------------------------------------------------------------------------------
// Unit tests: wire format and handshake (integration tests with real clients are in tests.rs)
// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod unit {
    use super::*;

    const SIZE: u64 = 1 << 20;

    /// Hands out at most `step` bytes per read, as a socket may.
    struct Trickle<'a> {
        data: &'a [u8],
        step: usize,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            let n = out.len().min(self.step).min(self.data.len());
            out[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    /// A 1 MiB payload behind a header, then a small request: the large payload's bytes past
    /// what the header's read buffered come straight from the socket, and the next header is
    /// not pulled into the buffer with its tail (`BufReader::read_exact` refills the buffer
    /// for the last part and copies it out); the bytes are the stream's either way, whatever
    /// the socket hands out per read.
    #[test]
    fn a_large_payload_is_read_into_place_and_small_ones_through_the_buffer() {
        let big = 1 << 20;
        let stream: Vec<u8> = (0..REQUEST_LEN + big + REQUEST_LEN + 4096)
            .map(|i| (i % 251) as u8)
            .collect();
        for step in [usize::MAX, 100_000, 4096, 7] {
            let mut r = BufReader::with_capacity(
                READ_BUFFER,
                Trickle {
                    data: &stream,
                    step,
                },
            );
            let mut head = [0u8; REQUEST_LEN];
            assert!(read_header(&mut r, &mut head).unwrap());
            let mut payload = vec![0u8; big];
            assert!(read_into_place(&mut r, &mut payload).unwrap(), "large");
            assert!(
                payload == stream[REQUEST_LEN..REQUEST_LEN + big],
                "step {step}"
            );
            assert!(
                r.buffer().is_empty(),
                "the next request was buffered (step {step})"
            );
            assert!(read_header(r.get_mut(), &mut head).unwrap());
            assert_eq!(head[..], stream[REQUEST_LEN + big..2 * REQUEST_LEN + big]);
            let mut small = vec![0u8; 4096];
            assert!(!read_into_place(&mut r, &mut small).unwrap(), "small");
            assert!(small == stream[2 * REQUEST_LEN + big..], "step {step}");
            assert!(!read_header(&mut r, &mut head).unwrap(), "end of stream");
        }
    }

    fn export() -> Export<'static> {
        Export {
            name: "disk",
            size: SIZE,
            flags: TRANSMISSION_FLAGS,
        }
    }

    fn opt(kind: u32, data: &[u8]) -> Vec<u8> {
        let mut v = wire::IHAVEOPT.to_be_bytes().to_vec();
        v.extend_from_slice(&kind.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        v
    }

    fn info_data(name: &str, infos: &[u16]) -> Vec<u8> {
        let mut v = (name.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(name.as_bytes());
        v.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            v.extend_from_slice(&i.to_be_bytes());
        }
        v
    }

    /// (option, reply type, data)
    type OptionReply = (u32, u32, Vec<u8>);

    /// Runs the handshake on `input` (after the client flags) and returns the result and the
    /// option replies the server sent, as (option, reply type, data).
    fn run(flags: u32, input: &[u8]) -> (io::Result<Negotiated>, Vec<OptionReply>, Vec<u8>) {
        let mut inp = flags.to_be_bytes().to_vec();
        inp.extend_from_slice(input);
        let mut out = Vec::new();
        let res = handshake(&mut &inp[..], &mut out, &export());
        assert_eq!(&out[0..8], b"NBDMAGIC");
        assert_eq!(&out[8..16], b"IHAVEOPT");
        assert_eq!(&out[16..18], &[0, 3]);
        let mut replies = Vec::new();
        let mut rest = &out[18..];
        while rest.len() >= 20 && rest[0..8] == wire::OPT_REPLY_MAGIC.to_be_bytes() {
            let o = u32::from_be_bytes(rest[8..12].try_into().unwrap());
            let t = u32::from_be_bytes(rest[12..16].try_into().unwrap());
            let l = u32::from_be_bytes(rest[16..20].try_into().unwrap()) as usize;
            replies.push((o, t, rest[20..20 + l].to_vec()));
            rest = &rest[20 + l..];
        }
        (res, replies, rest.to_vec())
    }

    const BOTH: u32 = wire::FLAG_C_FIXED_NEWSTYLE | wire::FLAG_C_NO_ZEROES;

    #[test]
    fn go_answers_export_block_size_name_then_ack() {
        let input = opt(
            wire::OPT_GO,
            &info_data("disk", &[wire::INFO_NAME, wire::INFO_BLOCK_SIZE]),
        );
        let (res, replies, rest) = run(BOTH, &input);
        assert_eq!(res.unwrap(), Negotiated::Transmission);
        assert!(rest.is_empty());
        let mut export = 0u16.to_be_bytes().to_vec();
        export.extend_from_slice(&SIZE.to_be_bytes());
        export.extend_from_slice(&TRANSMISSION_FLAGS.to_be_bytes());
        let mut bs = 3u16.to_be_bytes().to_vec();
        for v in [1u32, 4096, 32 << 20] {
            bs.extend_from_slice(&v.to_be_bytes());
        }
        let mut name = 1u16.to_be_bytes().to_vec();
        name.extend_from_slice(b"disk");
        let go = wire::OPT_GO;
        assert_eq!(
            replies,
            vec![
                (go, wire::REP_INFO, export),
                (go, wire::REP_INFO, bs),
                (go, wire::REP_INFO, name),
                (go, wire::REP_ACK, vec![]),
            ]
        );
    }

    #[test]
    fn flags_advertise_flush_fua_trim_zeroes_multi_conn() {
        assert_eq!(TRANSMISSION_FLAGS, 0b1_0110_1101);
    }

    #[test]
    fn info_then_default_export_go() {
        let mut input = opt(wire::OPT_INFO, &info_data("", &[wire::INFO_DESCRIPTION]));
        input.extend(opt(wire::OPT_GO, &info_data("", &[])));
        let (res, replies, _) = run(BOTH, &input);
        assert_eq!(res.unwrap(), Negotiated::Transmission);
        let kinds: Vec<(u32, u32)> = replies.iter().map(|r| (r.0, r.1)).collect();
        assert_eq!(
            kinds,
            vec![
                (wire::OPT_INFO, wire::REP_INFO),
                (wire::OPT_INFO, wire::REP_INFO),
                (wire::OPT_INFO, wire::REP_INFO),
                (wire::OPT_INFO, wire::REP_ACK),
                (wire::OPT_GO, wire::REP_INFO),
                (wire::OPT_GO, wire::REP_INFO),
                (wire::OPT_GO, wire::REP_ACK),
            ]
        );
        assert_eq!(&replies[2].2[2..], DESCRIPTION.as_bytes());
    }

    #[test]
    fn unknown_export_unknown_option_list_and_abort() {
        let mut input = opt(wire::OPT_GO, &info_data("other", &[]));
        input.extend(opt(8, &[])); // NBD_OPT_STRUCTURED_REPLY: not negotiated
        input.extend(opt(wire::OPT_LIST, &[]));
        input.extend(opt(wire::OPT_LIST, b"x"));
        input.extend(opt(wire::OPT_GO, &[0, 0, 0, 9, b'a'])); // name longer than the data
        input.extend(opt(wire::OPT_ABORT, &[]));
        let (res, replies, _) = run(BOTH, &input);
        assert_eq!(res.unwrap(), Negotiated::Abort);
        let kinds: Vec<u32> = replies.iter().map(|r| r.1).collect();
        assert_eq!(
            kinds,
            vec![
                wire::REP_ERR_UNKNOWN,
                wire::REP_ERR_UNSUP,
                wire::REP_SERVER,
                wire::REP_ACK,
                wire::REP_ERR_INVALID,
                wire::REP_ERR_INVALID,
                wire::REP_ACK,
            ]
        );
        assert_eq!(replies[2].2, b"\0\0\0\x04disk");
    }

    #[test]
    fn export_name_with_and_without_zeroes() {
        let (res, replies, rest) = run(BOTH, &opt(wire::OPT_EXPORT_NAME, b"disk"));
        assert_eq!(res.unwrap(), Negotiated::Transmission);
        assert!(replies.is_empty());
        assert_eq!(rest.len(), 10);
        assert_eq!(&rest[0..8], &SIZE.to_be_bytes());
        let (res, _, rest) = run(
            wire::FLAG_C_FIXED_NEWSTYLE,
            &opt(wire::OPT_EXPORT_NAME, b""),
        );
        assert_eq!(res.unwrap(), Negotiated::Transmission);
        assert_eq!(rest.len(), 134);
        let (res, _, _) = run(BOTH, &opt(wire::OPT_EXPORT_NAME, b"nope"));
        assert!(res.is_err());
    }

    #[test]
    fn malformed_handshakes_are_errors() {
        // Unknown client flag, no fixed newstyle, bad magic, huge option, truncated input.
        assert!(run(BOTH | 4, &[]).0.is_err());
        assert!(run(wire::FLAG_C_NO_ZEROES, &[]).0.is_err());
        assert!(run(BOTH, b"NOTAMAGIC...........").0.is_err());
        let mut huge = wire::IHAVEOPT.to_be_bytes().to_vec();
        huge.extend_from_slice(&wire::OPT_GO.to_be_bytes());
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(run(BOTH, &huge).0.is_err());
        let go = opt(wire::OPT_GO, &info_data("disk", &[]));
        assert!(run(BOTH, &go[..go.len() - 1]).0.is_err());
        assert!(run(BOTH, &[]).0.is_err());
    }

    #[test]
    fn too_many_options_end_the_handshake() {
        let input: Vec<u8> = (0..=MAX_OPTIONS).flat_map(|_| opt(99, &[])).collect();
        assert!(run(BOTH, &input).0.is_err());
    }

    fn req(kind: u16, flags: u16, offset: u64, len: u32) -> Request {
        Request {
            flags,
            kind,
            cookie: 0x1122_3344_5566_7788,
            offset,
            len,
        }
    }

    #[test]
    fn request_round_trip_and_bad_magic() {
        let r = req(
            wire::CMD_WRITE,
            wire::CMD_FLAG_FUA,
            0x0102_0304_0506_0708,
            4096,
        );
        let mut b = r.encode();
        assert_eq!(Request::parse(&b), Some(r));
        b[0] ^= 1;
        assert_eq!(Request::parse(&b), None);
    }

    #[test]
    fn check_commands_flags_and_ranges() {
        let fua = wire::CMD_FLAG_FUA;
        let no_hole = wire::CMD_FLAG_NO_HOLE;
        assert_eq!(check(&req(0, 0, 0, 4096), SIZE), Ok(Command::Read));
        assert_eq!(check(&req(0, fua, 0, 0), SIZE), Ok(Command::Read));
        assert_eq!(
            check(&req(1, fua, SIZE - 1, 1), SIZE),
            Ok(Command::Write { fua: true })
        );
        assert_eq!(check(&req(3, 0, 0, 0), SIZE), Ok(Command::Flush));
        assert_eq!(
            check(&req(4, 0, 0, 1), SIZE),
            Ok(Command::Trim { fua: false })
        );
        assert_eq!(
            check(&req(6, no_hole, 0, SIZE as u32), SIZE),
            Ok(Command::Zeroes {
                fua: false,
                no_hole: true
            })
        );
        assert_eq!(check(&req(2, 0, 0, 0), SIZE), Ok(Command::Disc));
        // Out of range, overflow, unknown command, unknown or misplaced flags, oversized read.
        assert_eq!(check(&req(0, 0, SIZE, 1), SIZE), Err(wire::EINVAL));
        assert_eq!(check(&req(1, 0, SIZE, 1), SIZE), Err(wire::ENOSPC));
        assert_eq!(check(&req(6, 0, SIZE - 1, 2), SIZE), Err(wire::ENOSPC));
        assert_eq!(check(&req(4, 0, u64::MAX, 2), SIZE), Err(wire::EINVAL));
        assert_eq!(check(&req(5, 0, 0, 1), SIZE), Err(wire::EINVAL));
        assert_eq!(check(&req(7, 0, 0, 1), SIZE), Err(wire::EINVAL));
        assert_eq!(check(&req(1, no_hole, 0, 1), SIZE), Err(wire::EINVAL));
        assert_eq!(check(&req(0, 1 << 4, 0, 1), SIZE), Err(wire::EINVAL));
        assert_eq!(
            check(&req(0, 0, 0, MAX_REQUEST + 1), u64::MAX),
            Err(wire::EINVAL)
        );
    }

    #[test]
    fn device_errors_map_to_nbd_errors() {
        assert_eq!(
            nbd_errno(&io::Error::from_raw_os_error(libc::ENOSPC)),
            wire::ENOSPC
        );
        assert_eq!(
            nbd_errno(&io::Error::from_raw_os_error(libc::EIO)),
            wire::EIO
        );
        assert_eq!(
            nbd_errno(&io::Error::from_raw_os_error(libc::ENOTSUP)),
            wire::ENOTSUP
        );
        assert_eq!(nbd_errno(&io::Error::other("peer gone")), wire::EIO);
        assert_eq!(nbd_errno(&io::ErrorKind::InvalidInput.into()), wire::EINVAL);
    }

    #[test]
    fn file_device_reads_writes_trims_and_zeroes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        let dev = FileDevice::open(&path, Some(SIZE)).unwrap();
        assert_eq!(dev.size(), SIZE);
        dev.write(4096, &[0xab; 8192], true).unwrap();
        let mut buf = vec![0u8; 8192];
        dev.read(4096, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0xab));
        dev.trim(4096, 100, false).unwrap();
        dev.write_zeroes(8192, 4096, true, true).unwrap();
        dev.flush().unwrap();
        let on_disk = std::fs::read(&path).unwrap();
        assert_eq!(on_disk.len() as u64, SIZE);
        assert!(on_disk[4096..4196].iter().all(|&b| b == 0));
        assert!(on_disk[4196..8192].iter().all(|&b| b == 0xab));
        assert!(on_disk[8192..12288].iter().all(|&b| b == 0));
        assert!(dev.read(SIZE - 1, &mut buf).is_err());
        // Without a size: the file's own length.
        assert_eq!(FileDevice::open(&path, None).unwrap().size(), SIZE);
        assert!(FileDevice::open(dir.path().join("missing"), None).is_err());
    }
}
