//! A stamped-block writer and its checker: the oracle of the fault-schedule tests.
//!
//! Client threads write whole 4 KiB blocks through a node's NBD export (several connections,
//! several requests in flight on each, the same blocks written from all of them), with FUA and
//! FLUSH mixed in. Every block written carries a stamp (block number, writer, sequence number)
//! repeated in every 32 bytes, so a torn or misplaced block is seen. The log records, on one
//! logical clock, when each write and FLUSH was sent and when it was acknowledged, and to which
//! primary (an *epoch*: the target changes at every failover or restart). At the end
//! [`Log::check`] reads the final primary's blocks and applies the rule a user relies on:
//! a write acknowledged before a FLUSH to the same primary that was then acknowledged is
//! durable, so the block holds that write or one that was not finished before it was sent;
//! never an older one, never anything that was not written. (A FLUSH to a new primary says
//! nothing about writes the old one acknowledged and never passed on: async mode.)
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

pub const BLOCK: usize = 4096;
const STAMP: usize = 32;
const STAMP_MAGIC: u32 = 0x5354_4d50; // "STMP"

const NBD_CMD_READ: u16 = 0;
const NBD_CMD_WRITE: u16 = 1;
const NBD_CMD_DISC: u16 = 2;
const NBD_CMD_FLUSH: u16 = 3;
const NBD_CMD_FLAG_FUA: u16 = 1;

type Reply = Result<Vec<u8>, String>;
/// Requests waiting for their reply, by handle: how many bytes a read returns, and where to.
type Pending = Arc<Mutex<HashMap<u64, (u32, Sender<Reply>)>>>;

/// A minimal NBD client (fixed newstyle, NBD_OPT_EXPORT_NAME, simple replies) whose requests
/// may be issued from many threads at once; each waits for its own reply.
pub struct Client {
    w: Mutex<UnixStream>,
    pending: Pending,
    next: AtomicU64,
    pub size: u64,
    /// The epoch of the target this client connected to.
    pub epoch: u64,
    reader: Option<JoinHandle<()>>,
}

fn read_exact(s: &mut UnixStream, n: usize) -> std::io::Result<Vec<u8>> {
    let mut b = vec![0u8; n];
    s.read_exact(&mut b)?;
    Ok(b)
}

impl Client {
    pub fn connect(socket: &Path, export: &str) -> std::io::Result<Client> {
        let mut s = UnixStream::connect(socket)?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        s.set_write_timeout(Some(Duration::from_secs(30)))?;
        let hello = read_exact(&mut s, 18)?;
        if &hello[..8] != b"NBDMAGIC" || &hello[8..16] != b"IHAVEOPT" {
            return Err(std::io::Error::other("not a fixed-newstyle NBD server"));
        }
        // FIXED_NEWSTYLE | NO_ZEROES
        s.write_all(&3u32.to_be_bytes())?;
        let mut opt = Vec::new();
        opt.extend_from_slice(b"IHAVEOPT");
        opt.extend_from_slice(&1u32.to_be_bytes()); // NBD_OPT_EXPORT_NAME
        opt.extend_from_slice(&(export.len() as u32).to_be_bytes());
        opt.extend_from_slice(export.as_bytes());
        s.write_all(&opt)?;
        let info = read_exact(&mut s, 10)?;
        let size = u64::from_be_bytes(info[..8].try_into().unwrap());
        s.set_read_timeout(None)?;
        let pending: Pending = Arc::default();
        let mut r = s.try_clone()?;
        let p = Arc::clone(&pending);
        let reader = thread::spawn(move || {
            let fail_all = |why: String| {
                for (_, (_, tx)) in p.lock().unwrap().drain() {
                    let _ = tx.send(Err(why.clone()));
                }
            };
            loop {
                let head = match read_exact(&mut r, 16) {
                    Ok(h) => h,
                    Err(e) => return fail_all(format!("connection lost: {e}")),
                };
                if head[..4] != 0x6744_6698u32.to_be_bytes() {
                    return fail_all("bad reply magic".into());
                }
                let error = u32::from_be_bytes(head[4..8].try_into().unwrap());
                let handle = u64::from_be_bytes(head[8..16].try_into().unwrap());
                let Some((read_len, tx)) = p.lock().unwrap().remove(&handle) else {
                    return fail_all(format!("reply for unknown handle {handle}"));
                };
                let reply = if error != 0 {
                    Err(format!("NBD error {error}"))
                } else if read_len > 0 {
                    match read_exact(&mut r, read_len as usize) {
                        Ok(d) => Ok(d),
                        Err(e) => {
                            let _ = tx.send(Err(format!("connection lost: {e}")));
                            return fail_all(format!("connection lost: {e}"));
                        }
                    }
                } else {
                    Ok(Vec::new())
                };
                let _ = tx.send(reply);
            }
        });
        Ok(Client {
            w: Mutex::new(s),
            pending,
            next: AtomicU64::new(1),
            size,
            epoch: 0,
            reader: Some(reader),
        })
    }

    fn request(&self, cmd: u16, flags: u16, offset: u64, len: u32, data: &[u8]) -> Reply {
        let handle = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx): (Sender<Reply>, Receiver<Reply>) = mpsc::channel();
        let read_len = if cmd == NBD_CMD_READ { len } else { 0 };
        self.pending.lock().unwrap().insert(handle, (read_len, tx));
        let mut req = Vec::with_capacity(28 + data.len());
        req.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        req.extend_from_slice(&flags.to_be_bytes());
        req.extend_from_slice(&cmd.to_be_bytes());
        req.extend_from_slice(&handle.to_be_bytes());
        req.extend_from_slice(&offset.to_be_bytes());
        req.extend_from_slice(&len.to_be_bytes());
        req.extend_from_slice(data);
        if let Err(e) = self.w.lock().unwrap().write_all(&req) {
            self.pending.lock().unwrap().remove(&handle);
            return Err(format!("send: {e}"));
        }
        rx.recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|e| Err(format!("no reply: {e}")))
    }

    pub fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), String> {
        let flags = if fua { NBD_CMD_FLAG_FUA } else { 0 };
        self.request(NBD_CMD_WRITE, flags, offset, data.len() as u32, data)
            .map(|_| ())
    }

    pub fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, String> {
        self.request(NBD_CMD_READ, 0, offset, len, &[])
    }

    pub fn flush(&self) -> Result<(), String> {
        self.request(NBD_CMD_FLUSH, 0, 0, 0, &[]).map(|_| ())
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        if let Ok(mut w) = self.w.lock() {
            let mut req = Vec::new();
            req.extend_from_slice(&0x2560_9513u32.to_be_bytes());
            req.extend_from_slice(&0u16.to_be_bytes());
            req.extend_from_slice(&NBD_CMD_DISC.to_be_bytes());
            req.extend_from_slice(&[0u8; 20]);
            let _ = w.write_all(&req);
            let _ = w.shutdown(std::net::Shutdown::Both);
        }
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

/// The stamp of one written block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Stamp {
    pub block: u32,
    pub writer: u32,
    pub seq: u64,
}

impl Stamp {
    pub fn fill(&self) -> Vec<u8> {
        let mut one = [0u8; STAMP];
        one[..4].copy_from_slice(&STAMP_MAGIC.to_le_bytes());
        one[4..8].copy_from_slice(&self.block.to_le_bytes());
        one[8..12].copy_from_slice(&self.writer.to_le_bytes());
        one[12..20].copy_from_slice(&self.seq.to_le_bytes());
        one.repeat(BLOCK / STAMP)
    }

    /// What a block holds: None for all zeroes, Err for anything that is not one whole stamp.
    pub fn parse(b: &[u8]) -> Result<Option<Stamp>, String> {
        if b.iter().all(|&x| x == 0) {
            return Ok(None);
        }
        let one = &b[..STAMP];
        if b.chunks(STAMP).any(|c| c != one) {
            return Err("torn or mixed block".into());
        }
        if one[..4] != STAMP_MAGIC.to_le_bytes() {
            return Err("not a stamp".into());
        }
        Ok(Some(Stamp {
            block: u32::from_le_bytes(one[4..8].try_into().unwrap()),
            writer: u32::from_le_bytes(one[8..12].try_into().unwrap()),
            seq: u64::from_le_bytes(one[12..20].try_into().unwrap()),
        }))
    }
}

/// A write of the log: sent at `sent`, acknowledged at `acked` (None: failed, or the
/// connection died first; it may or may not have landed).
#[derive(Debug, Clone)]
struct Written {
    stamp: Stamp,
    epoch: u64,
    sent: u64,
    acked: Option<u64>,
}

#[derive(Default)]
struct Inner {
    writes: HashMap<u32, Vec<Written>>,
    by_stamp: HashMap<Stamp, usize>,
    /// (epoch, sent, acked) of every acknowledged FLUSH (a FUA write counts for itself only).
    flushes: Vec<(u64, u64, u64)>,
    fua: Vec<(Stamp, u64)>,
}

/// Everything the writers did, on one logical clock.
#[derive(Default)]
pub struct Log {
    clock: AtomicU64,
    inner: Mutex<Inner>,
}

impl Log {
    /// The logical clock now (for correlating a schedule's steps with the writes).
    pub fn now(&self) -> u64 {
        self.clock.load(Ordering::SeqCst)
    }

    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::SeqCst)
    }

    fn sent(&self, stamp: Stamp, epoch: u64) -> u64 {
        let t = self.tick();
        let mut i = self.inner.lock().unwrap();
        let v = i.writes.entry(stamp.block).or_default();
        v.push(Written {
            stamp,
            epoch,
            sent: t,
            acked: None,
        });
        let n = v.len() - 1;
        i.by_stamp.insert(stamp, n);
        t
    }

    fn acked(&self, stamp: Stamp, fua: bool) {
        let t = self.tick();
        let mut i = self.inner.lock().unwrap();
        let n = i.by_stamp[&stamp];
        i.writes.get_mut(&stamp.block).unwrap()[n].acked = Some(t);
        if fua {
            i.fua.push((stamp, t));
        }
    }

    fn flushed(&self, epoch: u64, sent: u64) {
        let t = self.tick();
        self.inner.lock().unwrap().flushes.push((epoch, sent, t));
    }

    /// How many writes were acknowledged, and how many of them are durable by the rule.
    pub fn counts(&self) -> (usize, usize) {
        let i = self.inner.lock().unwrap();
        let acked = i
            .writes
            .values()
            .flatten()
            .filter(|w| w.acked.is_some())
            .count();
        let durable = i
            .writes
            .values()
            .flatten()
            .filter(|w| durable(&i, w))
            .count();
        (acked, durable)
    }

    /// Check `blocks` (block number → its content on the final primary). Returns the
    /// violations, each naming the block and why.
    pub fn check(&self, blocks: &HashMap<u32, Vec<u8>>) -> Vec<String> {
        let i = self.inner.lock().unwrap();
        let mut bad = Vec::new();
        for (&b, content) in blocks {
            let history = i.writes.get(&b).map(Vec::as_slice).unwrap_or(&[]);
            let found = match Stamp::parse(content) {
                Err(e) => {
                    bad.push(format!("block {b}: {e}"));
                    continue;
                }
                Ok(s) => s,
            };
            let holder = match found {
                None => None,
                Some(s) if s.block != b => {
                    bad.push(format!(
                        "block {b} holds the write meant for block {}",
                        s.block
                    ));
                    continue;
                }
                Some(s) => match history.iter().find(|w| w.stamp == s) {
                    Some(w) => Some(w),
                    None => {
                        bad.push(format!("block {b} holds {s:?}, which was never written"));
                        continue;
                    }
                },
            };
            // The block must not hold something that a durable write certainly replaced.
            for d in history.iter().filter(|w| durable(&i, w)) {
                let replaced = match holder {
                    None => true,
                    Some(h) => h.stamp != d.stamp && h.acked.is_some_and(|a| a < d.sent),
                };
                if replaced {
                    bad.push(format!(
                        "block {b}: the durable write {:?} (sent at {}, acknowledged at {:?}) is lost; the block holds {:?}",
                        d.stamp, d.sent, d.acked, found
                    ));
                    break;
                }
            }
        }
        bad
    }
}

/// Acknowledged, then covered by an acknowledged FLUSH to the same primary sent after the
/// acknowledgement (or itself a FUA write).
fn durable(i: &Inner, w: &Written) -> bool {
    let Some(a) = w.acked else { return false };
    i.flushes
        .iter()
        .any(|&(epoch, sent, _)| epoch == w.epoch && sent > a)
        || i.fua.iter().any(|(s, _)| *s == w.stamp)
}

/// Where the writers send: the export socket of the current primary (None while there is
/// none; writers wait), and its epoch, counted up at every change.
pub type Target = Arc<Mutex<(u64, Option<PathBuf>)>>;

/// A target aimed at `path`.
pub fn target(path: Option<PathBuf>) -> Target {
    Arc::new(Mutex::new((1, path)))
}

/// Aim the writers at `path` from now on: a new epoch.
pub fn aim(t: &Target, path: Option<PathBuf>) {
    let mut g = t.lock().unwrap();
    *g = (g.0 + 1, path);
}

/// Writers running in the background until `stop`.
pub struct Writers {
    pub log: Arc<Log>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

/// Start `conns` connections with `depth` writer threads each, writing random blocks among
/// the first `blocks` of the export (every 16th request FUA, a FLUSH from each connection
/// every ~20 requests). `seed` makes the choices reproducible.
pub fn start(target: Target, blocks: u32, conns: u32, depth: u32, seed: u64) -> Writers {
    let log = Arc::new(Log::default());
    let stop = Arc::new(AtomicBool::new(false));
    let seqs = Arc::new(AtomicU64::new(1));
    let mut threads = Vec::new();
    for c in 0..conns {
        let client: Arc<Mutex<Option<Arc<Client>>>> = Arc::default();
        for d in 0..depth {
            let writer = c * depth + d;
            let (target, log, stop, seqs, client) = (
                Arc::clone(&target),
                Arc::clone(&log),
                Arc::clone(&stop),
                Arc::clone(&seqs),
                Arc::clone(&client),
            );
            let mut rng = Rng::new(seed ^ (u64::from(writer) + 1).wrapping_mul(0x9e37_79b9));
            threads.push(thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Acquire) {
                    let Some(cl) = current(&target, &client) else {
                        thread::sleep(Duration::from_millis(50));
                        continue;
                    };
                    n += 1;
                    let result = if n % 20 == (u64::from(writer) % 20) {
                        let sent = log.tick();
                        cl.flush().map(|()| log.flushed(cl.epoch, sent))
                    } else {
                        // One write in eight covers a run of 16 to 32 blocks (64-128 KiB: on a
                        // sealed link, behind other writes, tandem writes those locally first
                        // and seals them where they lie), one in 64 a run of 80 to 160 blocks
                        // (320-640 KiB: both disks take it in pieces of 256 KiB, so a crash can
                        // land between them), each block with a stamp of its own.
                        let run = match rng.next() % 64 {
                            0 => (80 + rng.next() % 81).min(u64::from(blocks)) as u32,
                            r if r % 8 == 1 => (16 + rng.next() % 17).min(u64::from(blocks)) as u32,
                            _ => 1,
                        };
                        let first = (rng.next() % u64::from(blocks - run + 1)) as u32;
                        let seq = seqs.fetch_add(u64::from(run), Ordering::Relaxed);
                        let stamps: Vec<Stamp> = (0..run)
                            .map(|i| Stamp {
                                block: first + i,
                                writer,
                                seq: seq + u64::from(i),
                            })
                            .collect();
                        let fua = n % 16 == 0;
                        for &stamp in &stamps {
                            log.sent(stamp, cl.epoch);
                        }
                        let data: Vec<u8> = stamps.iter().flat_map(|s| s.fill()).collect();
                        cl.write(u64::from(first) * BLOCK as u64, &data, fua)
                            .map(|()| {
                                for &stamp in &stamps {
                                    log.acked(stamp, fua);
                                }
                            })
                    };
                    if result.is_err() {
                        // The connection died (a failover) or the request failed: drop the
                        // connection, find the primary again.
                        let mut g = client.lock().unwrap();
                        if g.as_ref().is_some_and(|g| Arc::ptr_eq(g, &cl)) {
                            *g = None;
                        }
                        drop(g);
                        thread::sleep(Duration::from_millis(20));
                    }
                }
            }));
        }
    }
    Writers { log, stop, threads }
}

fn current(target: &Target, client: &Mutex<Option<Arc<Client>>>) -> Option<Arc<Client>> {
    let mut g = client.lock().unwrap();
    if let Some(c) = g.as_ref() {
        return Some(Arc::clone(c));
    }
    let (epoch, path) = target.lock().unwrap().clone();
    let mut c = Client::connect(&path?, "r0").ok()?;
    c.epoch = epoch;
    let c = Arc::new(c);
    *g = Some(Arc::clone(&c));
    Some(c)
}

impl Writers {
    /// Stop every writer and wait for them (each has at most one request to finish).
    pub fn stop(self) -> Arc<Log> {
        self.stop.store(true, Ordering::Release);
        for t in self.threads {
            let _ = t.join();
        }
        self.log
    }
}

/// Read the first `blocks` blocks of the export at `socket`.
pub fn read_blocks(socket: &Path, blocks: u32) -> HashMap<u32, Vec<u8>> {
    let c = Client::connect(socket, "r0").expect("connect to the final primary");
    let data = c
        .read(0, blocks * BLOCK as u32)
        .expect("read the stamped region");
    (0..blocks)
        .map(|b| {
            let at = b as usize * BLOCK;
            (b, data[at..at + BLOCK].to_vec())
        })
        .collect()
}

/// xorshift64*: small, seeded, reproducible.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_with(writes: &[(u32, u64, u64, Option<u64>)], flushes: &[(u64, u64, u64)]) -> Log {
        let log = Log::default();
        {
            let mut i = log.inner.lock().unwrap();
            for &(block, seq, sent, acked) in writes {
                let stamp = Stamp {
                    block,
                    writer: 0,
                    seq,
                };
                i.writes.entry(block).or_default().push(Written {
                    stamp,
                    epoch: 1,
                    sent,
                    acked,
                });
            }
            i.flushes = flushes.to_vec();
        }
        log
    }

    fn holds(block: u32, seq: u64) -> HashMap<u32, Vec<u8>> {
        HashMap::from([(
            block,
            Stamp {
                block,
                writer: 0,
                seq,
            }
            .fill(),
        )])
    }

    #[test]
    fn the_checker_accepts_the_durable_write_or_a_later_one_and_nothing_older() {
        // seq 1 acked at 2, flushed (sent 3, acked 4): durable. seq 2 sent at 5, never acked.
        let log = log_with(&[(7, 1, 1, Some(2)), (7, 2, 5, None)], &[(1, 3, 4)]);
        assert!(log.check(&holds(7, 1)).is_empty());
        assert!(log.check(&holds(7, 2)).is_empty());
        let zero = HashMap::from([(7, vec![0u8; BLOCK])]);
        assert_eq!(
            log.check(&zero).len(),
            1,
            "a durable write lost must be reported"
        );
        // An older write than the durable one: seq 0 acked at 0 before seq 1 was sent.
        let log = log_with(&[(7, 0, 0, Some(0)), (7, 1, 1, Some(2))], &[(1, 3, 4)]);
        assert_eq!(log.check(&holds(7, 0)).len(), 1);
        // Not flushed: anything written may be there, or zeroes.
        let log = log_with(&[(7, 1, 1, Some(2))], &[]);
        assert!(log.check(&zero).is_empty());
        // Garbage and a misplaced block are violations.
        assert_eq!(log.check(&HashMap::from([(7, vec![1u8; BLOCK])])).len(), 1);
        assert_eq!(
            log.check(&holds(8, 1).into_values().map(|v| (7, v)).collect())
                .len(),
            1
        );
    }

    /// A FLUSH to another primary (after a failover) does not make a write durable that the
    /// old primary acknowledged: in async mode it may never have left it.
    #[test]
    fn a_flush_covers_only_writes_to_the_same_primary() {
        let log = log_with(&[(7, 1, 1, Some(2))], &[(2, 3, 4)]);
        let zero = HashMap::from([(7, vec![0u8; BLOCK])]);
        assert!(log.check(&zero).is_empty());
        assert_eq!(log.counts(), (1, 0));
    }

    #[test]
    fn a_torn_block_is_seen() {
        let mut b = Stamp {
            block: 1,
            writer: 0,
            seq: 1,
        }
        .fill();
        b[512..].copy_from_slice(
            &Stamp {
                block: 1,
                writer: 0,
                seq: 2,
            }
            .fill()[512..],
        );
        assert!(Stamp::parse(&b).is_err());
    }
}
