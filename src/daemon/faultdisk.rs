//! The daemon's handle on its local disk: `Disk` and `ActiveMap` do all their I/O through a
//! [`DiskFile`].
//!
//! Built without the cargo feature `faults` (the binary users get) a `DiskFile` is the `File`
//! and nothing else: the same calls, no lock, no check. Built with it (the test suite), a disk
//! can also fail the way hardware does, like Crucible's fault modes built into the product:
//! - power-loss mode (`TANDEM_FAULTS=power-loss` when the daemon starts): every write not yet
//!   covered by an fdatasync stays in memory (reads see it, as with a page cache); `sync_data`
//!   writes it out. A power cut (`tandem fault RES power-cut`) drops those writes and ends the
//!   process at once, without destructors;
//! - EIO ranges: reads and/or writes that touch a byte range fail with EIO;
//! - a torn write: the next write that touches a range lands only its first sectors, then the
//!   power goes.
//!
//! Disk and activemap of one path share one [`Faults`] (one page cache per file), kept in the
//! process-wide machine. Not owned here: what the daemon makes of a failing disk.

use std::fs::File;

use super::diskio;

/// A disk file: positional I/O, fdatasync, fallocate and lseek, with faults in test builds.
pub struct DiskFile {
    file: File,
    #[cfg(feature = "faults")]
    faults: std::sync::Arc<Faults>,
}

#[cfg(not(feature = "faults"))]
mod plain {
    use std::fs::File;
    use std::io;
    use std::os::unix::fs::FileExt;
    use std::path::Path;

    use super::{DiskFile, diskio};

    impl DiskFile {
        /// The disk file `file`, opened from `path`.
        #[inline]
        pub fn new(file: File, path: &Path) -> DiskFile {
            let _ = path;
            DiskFile { file }
        }

        #[inline]
        pub fn try_clone(&self) -> io::Result<DiskFile> {
            Ok(DiskFile {
                file: self.file.try_clone()?,
            })
        }

        /// fdatasync.
        #[inline]
        pub fn sync_data(&self) -> io::Result<()> {
            self.file.sync_data()
        }

        /// [`diskio::fallocate`].
        #[inline]
        pub fn fallocate(&self, mode: i32, offset: u64, len: u64) -> io::Result<()> {
            diskio::fallocate(&self.file, mode, offset, len)
        }

        /// lseek(2) (the daemon uses SEEK_DATA and SEEK_HOLE to skip holes).
        #[inline]
        pub fn lseek(&self, offset: i64, whence: nix::unistd::Whence) -> nix::Result<i64> {
            nix::unistd::lseek(&self.file, offset, whence)
        }

        /// [`diskio::write_durable`].
        #[inline]
        pub fn write_durable_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
            diskio::write_durable(&self.file, data, offset)
        }

        /// [`diskio::read_cached`].
        #[inline]
        pub fn read_cached(&self, buf: &mut [u8], offset: u64) -> Option<io::Result<()>> {
            diskio::read_cached(&self.file, buf, offset)
        }
    }

    impl FileExt for DiskFile {
        #[inline]
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
            self.file.read_at(buf, offset)
        }

        #[inline]
        fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
            self.file.write_at(buf, offset)
        }

        #[inline]
        fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            self.file.read_exact_at(buf, offset)
        }

        #[inline]
        fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
            self.file.write_all_at(buf, offset)
        }
    }
}

impl DiskFile {
    /// The file itself, for what faults do not touch: stat and the size ioctls.
    #[inline]
    pub fn file(&self) -> &File {
        &self.file
    }
}

#[cfg(feature = "faults")]
pub use faults::{Action, Faults};

#[cfg(feature = "faults")]
mod faults {
    use std::collections::{BTreeMap, HashMap};
    use std::fs::File;
    use std::io;
    use std::os::unix::fs::FileExt;
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
    use std::time::Duration;

    use serde::{Deserialize, Serialize};

    use super::{DiskFile, diskio};

    /// Sectors of a torn write.
    const SECTOR: u64 = 512;

    /// Which I/O an EIO range fails.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
    #[serde(rename_all = "kebab-case")]
    pub enum Op {
        Read,
        Write,
        Rw,
    }

    /// A fault to inject: `tandem fault RES ACTION` and the control request behind it.
    /// Offsets and lengths are bytes of the disk file (the data region starts at 0).
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, clap::Subcommand)]
    #[serde(tag = "action", rename_all = "kebab-case")]
    pub enum Action {
        /// Drop every write no fdatasync covered (power-loss mode) and end the daemon at once.
        PowerCut,
        /// Fail reads, writes or both that touch [OFFSET, OFFSET+LEN) with EIO.
        Eio {
            op: Op,
            #[arg(value_parser = crate::config::parse_size)]
            offset: u64,
            #[arg(value_parser = crate::config::parse_size)]
            len: u64,
        },
        /// The next write touching [OFFSET, OFFSET+LEN) lands only its first SECTORS 512-byte
        /// sectors, then the power goes as with power-cut.
        Torn {
            #[arg(value_parser = crate::config::parse_size)]
            offset: u64,
            #[arg(value_parser = crate::config::parse_size)]
            len: u64,
            sectors: u64,
        },
        /// Every fdatasync of this disk takes SECONDS longer (a disk slow to flush its cache,
        /// or one that hangs), until `clear`; other I/O goes on meanwhile.
        SlowSync { seconds: u64 },
        /// Every fallocate (a discard or a zeroing) takes MS milliseconds longer per MiB of
        /// its range (a disk that has to write the zeroes), until `clear`.
        SlowZero { ms: u64 },
        /// Every read takes MS milliseconds longer per MiB read (a busy disk), until `clear`.
        SlowRead { ms: u64 },
        /// Every write takes MS milliseconds longer per MiB written (a busy disk, or writes
        /// throttled by the page cache), until `clear`.
        SlowWrite { ms: u64 },
        /// Remove the EIO ranges, the pending torn write and the slow syncs, zeroings, reads
        /// and writes (power-loss mode stays).
        Clear,
        /// Not a disk fault: the resource's owner thread stops answering for SECONDS (for
        /// the watchdog tests); the daemon handles it, the disk ignores it.
        WedgeOwner { seconds: u64 },
    }

    /// The process's disks and their power: one per daemon ([`Machine::global`]); unit tests
    /// make their own.
    struct Machine {
        inner: Arc<Power>,
    }

    struct Power {
        disks: Mutex<HashMap<PathBuf, Arc<Faults>>>,
        /// Disks opened from now on start in power-loss mode.
        power_loss: bool,
        /// A power cut ends the process (false only in unit tests, which look at the disks).
        exits: bool,
        /// The power is gone: I/O on faulted disks no longer happens (see `Faults::state`).
        off: AtomicBool,
    }

    /// One disk path's faults and, in power-loss mode, its unsynced writes.
    pub struct Faults {
        path: PathBuf,
        power: Weak<Power>,
        /// Anything configured: otherwise I/O goes to the file without taking `state`.
        armed: AtomicBool,
        state: Mutex<State>,
    }

    #[derive(Default)]
    struct State {
        power_loss: bool,
        overlay: Overlay,
        eio: Vec<(Op, u64, u64)>,
        /// (offset, len, sectors)
        torn: Option<(u64, u64, u64)>,
        /// Added to every fdatasync.
        slow_sync: Option<Duration>,
        /// Added to every fallocate, per MiB of its range.
        slow_zero: Option<Duration>,
        /// Added to every read, per MiB read.
        slow_read: Option<Duration>,
        /// Added to every write, per MiB written.
        slow_write: Option<Duration>,
    }

    /// `per_mib` for every MiB of `len`, in proportion: a disk's time grows with what it
    /// writes, whatever the pieces it is written in (`Disk::write_at` writes 256 KiB at a
    /// time; 10 s per MiB makes each of them take 2.5 s).
    fn per_mib(per_mib: Duration, len: u64) -> Duration {
        let nanos = per_mib.as_nanos().saturating_mul(u128::from(len)) >> 20;
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }

    fn intersects(offset: u64, len: u64, start: u64, rlen: u64) -> bool {
        len > 0
            && rlen > 0
            && offset < start.saturating_add(rlen)
            && start < offset.saturating_add(len)
    }

    fn eio() -> io::Error {
        io::Error::from_raw_os_error(libc::EIO)
    }

    fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
        m.lock().unwrap_or_else(|p| p.into_inner())
    }

    impl Machine {
        /// The daemon's machine; `TANDEM_FAULTS=power-loss` puts its disks in power-loss mode.
        fn global() -> &'static Machine {
            static GLOBAL: OnceLock<Machine> = OnceLock::new();
            GLOBAL.get_or_init(|| {
                let spec = std::env::var("TANDEM_FAULTS").unwrap_or_default();
                let mut power_loss = false;
                for word in spec.split(',').map(str::trim).filter(|w| !w.is_empty()) {
                    match word {
                        "power-loss" => power_loss = true,
                        other => log::warn!("TANDEM_FAULTS: unknown fault mode {other:?} ignored"),
                    }
                }
                if power_loss {
                    log::warn!(
                        "TANDEM_FAULTS: power-loss mode: unsynced writes are kept in memory"
                    );
                }
                Machine::new(power_loss, true)
            })
        }

        fn new(power_loss: bool, exits: bool) -> Machine {
            Machine {
                inner: Arc::new(Power {
                    disks: Mutex::new(HashMap::new()),
                    power_loss,
                    exits,
                    off: AtomicBool::new(false),
                }),
            }
        }

        /// The faults of `path`, the same for every open of the same file.
        fn disk(&self, path: &Path) -> Arc<Faults> {
            let key = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
            let mut disks = lock(&self.inner.disks);
            Arc::clone(disks.entry(key).or_insert_with(|| {
                Arc::new(Faults {
                    path: path.to_path_buf(),
                    power: Arc::downgrade(&self.inner),
                    armed: AtomicBool::new(self.inner.power_loss),
                    state: Mutex::new(State {
                        power_loss: self.inner.power_loss,
                        ..State::default()
                    }),
                })
            }))
        }

        fn open(&self, file: File, path: &Path) -> DiskFile {
            DiskFile {
                file,
                faults: self.disk(path),
            }
        }
    }

    impl Power {
        /// The power goes: unsynced writes vanish (`held`: the disk whose lock the caller holds)
        /// and the process ends at once (`_exit`, no destructors, nothing flushed). Returns
        /// only on a unit test's machine.
        fn cut(&self, held: Option<(&Faults, &mut State)>) {
            self.off.store(true, Ordering::SeqCst);
            let disks: Vec<Arc<Faults>> = lock(&self.disks).values().cloned().collect();
            let held_disk = held.as_ref().map(|(f, _)| *f as *const Faults);
            if let Some((_, st)) = held {
                st.overlay = Overlay::default();
            }
            for d in disks {
                if held_disk != Some(Arc::as_ptr(&d)) {
                    // One lock at a time: never waits while holding another disk's lock.
                    lock(&d.state).overlay = Overlay::default();
                }
            }
            if self.exits {
                log::error!("fault injection: power cut");
                // SAFETY: _exit ends the process without running anything else, which is
                // exactly a machine losing power.
                unsafe { libc::_exit(137) };
            }
        }
    }

    impl Faults {
        fn power(&self) -> Option<Arc<Power>> {
            self.power.upgrade()
        }

        /// The state, while the power is on. Once it is off, I/O in the daemon waits for the
        /// `_exit` that follows (an error would be answered to clients and the peer, which a
        /// dead machine does not do); on a unit test's machine it fails with EIO.
        fn state(&self) -> io::Result<MutexGuard<'_, State>> {
            let st = lock(&self.state);
            match self.power() {
                Some(p) if !p.off.load(Ordering::SeqCst) => Ok(st),
                Some(p) if p.exits => {
                    drop(st);
                    loop {
                        std::thread::park();
                    }
                }
                _ => Err(eio()),
            }
        }

        fn rearm(&self, st: &State) {
            let armed = st.power_loss
                || !st.eio.is_empty()
                || st.torn.is_some()
                || st.slow_sync.is_some()
                || st.slow_zero.is_some()
                || st.slow_read.is_some()
                || st.slow_write.is_some();
            self.armed.store(armed, Ordering::Release);
        }

        /// Inject `action` (a power cut ends the process and does not return in the daemon).
        pub fn apply(&self, action: &Action) {
            match *action {
                Action::PowerCut => {
                    log::warn!("fault injection: {}: power cut", self.path.display());
                    if let Some(p) = self.power() {
                        p.cut(None);
                    }
                }
                Action::Eio { op, offset, len } => self
                    .arm(format!("EIO on {op:?} of [{offset}, +{len})"), |st| {
                        st.eio.push((op, offset, len))
                    }),
                Action::Torn {
                    offset,
                    len,
                    sectors,
                } => self.arm(
                    format!("the next write to [{offset}, +{len}) tears after {sectors} sectors"),
                    |st| st.torn = Some((offset, len, sectors)),
                ),
                Action::SlowSync { seconds } => self
                    .arm(format!("every fdatasync takes {seconds}s longer"), |st| {
                        st.slow_sync = Some(Duration::from_secs(seconds))
                    }),
                Action::SlowZero { ms } => self.arm(
                    format!("every fallocate takes {ms} ms longer per MiB"),
                    |st| st.slow_zero = Some(Duration::from_millis(ms)),
                ),
                Action::SlowRead { ms } => self
                    .arm(format!("every read takes {ms} ms longer per MiB"), |st| {
                        st.slow_read = Some(Duration::from_millis(ms))
                    }),
                Action::SlowWrite { ms } => self
                    .arm(format!("every write takes {ms} ms longer per MiB"), |st| {
                        st.slow_write = Some(Duration::from_millis(ms))
                    }),
                Action::Clear => self.arm("faults cleared".into(), |st| {
                    st.eio.clear();
                    st.torn = None;
                    st.slow_sync = None;
                    st.slow_zero = None;
                    st.slow_read = None;
                    st.slow_write = None;
                }),
                Action::WedgeOwner { .. } => {}
            }
        }

        /// Log the fault `what` and set it in the state.
        fn arm(&self, what: String, set: impl FnOnce(&mut State)) {
            log::warn!("fault injection: {}: {what}", self.path.display());
            let mut st = lock(&self.state);
            set(&mut st);
            self.rearm(&st);
        }

        fn armed(&self) -> bool {
            self.armed.load(Ordering::Acquire)
        }

        fn check_eio(st: &State, write: bool, offset: u64, len: u64) -> io::Result<()> {
            let hit = st.eio.iter().any(|&(op, start, rlen)| {
                let applies = match op {
                    Op::Read => !write,
                    Op::Write => write,
                    Op::Rw => true,
                };
                applies && intersects(offset, len, start, rlen)
            });
            if hit { Err(eio()) } else { Ok(()) }
        }

        fn read(&self, file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
            // As for a slow sync: the delay first, without the lock.
            if let Some(d) = self.state()?.slow_read {
                std::thread::sleep(per_mib(d, buf.len() as u64));
            }
            let st = self.state()?;
            Self::check_eio(&st, false, offset, buf.len() as u64)?;
            let n = file.read_at(buf, offset)?;
            st.overlay.read(&mut buf[..n], offset);
            Ok(n)
        }

        fn write(&self, file: &File, data: &[u8], offset: u64) -> io::Result<usize> {
            let len = data.len() as u64;
            if let Some(d) = self.state()?.slow_write {
                std::thread::sleep(per_mib(d, len));
            }
            let mut st = self.state()?;
            Self::check_eio(&st, true, offset, len)?;
            if let Some((start, rlen, sectors)) = st.torn
                && intersects(offset, len, start, rlen)
            {
                st.torn = None;
                let keep = (sectors * SECTOR).min(len) as usize;
                log::error!(
                    "fault injection: {}: write of {len} bytes at {offset} torn after {keep} bytes",
                    self.path.display()
                );
                // The first sectors reach the platter; the rest, and every unsynced write,
                // go with the power.
                let landed = file
                    .write_all_at(&data[..keep], offset)
                    .and_then(|()| file.sync_data());
                if let Some(p) = self.power() {
                    p.cut(Some((self, &mut st)));
                }
                landed?;
                return Err(eio());
            }
            if st.power_loss {
                st.overlay.insert(offset, Seg::Data(data.to_vec()));
            } else {
                file.write_all_at(data, offset)?;
            }
            Ok(data.len())
        }

        fn sync(&self, file: &File) -> io::Result<()> {
            // The delay comes first and without the lock: writes go on while a sync is slow.
            let slow = self.state()?.slow_sync;
            if let Some(d) = slow {
                std::thread::sleep(d);
            }
            let mut st = self.state()?;
            if st.power_loss {
                st.overlay.write_out(file)?;
            }
            file.sync_data()
        }

        /// Make [offset, offset+len) durable, and nothing else: its bytes as the page cache
        /// holds them go to the file, the rest of the overlay stays unsynced.
        fn sync_range(&self, file: &File, offset: u64, len: u64) -> io::Result<()> {
            let mut st = self.state()?;
            if st.power_loss {
                let mut cur = vec![0u8; len as usize];
                let n = file.read_at(&mut cur, offset)?;
                cur[n..].fill(0);
                st.overlay.read(&mut cur, offset);
                diskio::write_durable(file, &cur, offset)?;
                // Out of the overlay: a zero run over exactly the range, then removed.
                st.overlay.insert(offset, Seg::Zero(len));
                st.overlay.segs.remove(&offset);
                return Ok(());
            }
            drop(st);
            file.sync_data()
        }

        fn fallocate(&self, file: &File, mode: i32, offset: u64, len: u64) -> io::Result<()> {
            // As for a slow sync: the delay first, without the lock.
            let slow = self.state()?.slow_zero;
            if let Some(d) = slow {
                std::thread::sleep(per_mib(d, len));
            }
            let mut st = self.state()?;
            Self::check_eio(&st, true, offset, len)?;
            // Without fallocate (FreeBSD) the real call fails and the caller writes zeroes, which
            // the overlay keeps like any write.
            if !st.power_loss || !cfg!(target_os = "linux") {
                return diskio::fallocate(file, mode, offset, len);
            }
            st.overlay.insert(offset, Seg::Zero(len));
            Ok(())
        }

        fn power_loss(&self) -> bool {
            lock(&self.state).power_loss
        }

        /// Bytes held in the overlay (writes no fdatasync has covered yet).
        #[cfg(test)]
        fn unsynced(&self) -> u64 {
            lock(&self.state).overlay.segs.values().map(Seg::len).sum()
        }
    }

    impl DiskFile {
        /// The disk file `file`, opened from `path`, with the faults of `path`.
        pub fn new(file: File, path: &Path) -> DiskFile {
            Machine::global().open(file, path)
        }

        pub fn try_clone(&self) -> io::Result<DiskFile> {
            Ok(DiskFile {
                file: self.file.try_clone()?,
                faults: Arc::clone(&self.faults),
            })
        }

        /// fdatasync; in power-loss mode the unsynced writes are written out first.
        pub fn sync_data(&self) -> io::Result<()> {
            if !self.faults.armed() {
                return self.file.sync_data();
            }
            self.faults.sync(&self.file)
        }

        /// [`diskio::fallocate`]; in power-loss mode the range is zeroes in the overlay.
        pub fn fallocate(&self, mode: i32, offset: u64, len: u64) -> io::Result<()> {
            if !self.faults.armed() {
                return diskio::fallocate(&self.file, mode, offset, len);
            }
            self.faults.fallocate(&self.file, mode, offset, len)
        }

        /// lseek(2). In power-loss mode the file's holes are not the disk's (the overlay may
        /// fill them): SEEK_DATA/SEEK_HOLE fail and callers read instead.
        pub fn lseek(&self, offset: i64, whence: nix::unistd::Whence) -> nix::Result<i64> {
            if self.faults.armed() && self.faults.power_loss() {
                return Err(nix::errno::Errno::EOPNOTSUPP);
            }
            nix::unistd::lseek(&self.file, offset, whence)
        }

        /// This disk's faults.
        pub fn faults(&self) -> &Faults {
            &self.faults
        }

        /// [`diskio::write_durable`]; in power-loss mode the range (only) leaves the overlay
        /// for the disk, and torn writes and EIO apply as to any write.
        pub fn write_durable_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
            if !self.faults.armed() {
                return diskio::write_durable(&self.file, data, offset);
            }
            self.write_all_at(data, offset)?;
            self.faults
                .sync_range(&self.file, offset, data.len() as u64)
        }

        /// [`diskio::read_cached`]; with faults armed, a plain read (which sees them), so the
        /// faults reach the callers' cached-read path too.
        pub fn read_cached(&self, buf: &mut [u8], offset: u64) -> Option<io::Result<()>> {
            if !self.faults.armed() {
                return diskio::read_cached(&self.file, buf, offset);
            }
            Some(self.read_exact_at(buf, offset))
        }
    }

    impl FileExt for DiskFile {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
            if !self.faults.armed() {
                return self.file.read_at(buf, offset);
            }
            self.faults.read(&self.file, buf, offset)
        }

        fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
            if !self.faults.armed() {
                return self.file.write_at(buf, offset);
            }
            self.faults.write(&self.file, buf, offset)
        }
    }

    /// A run of unsynced bytes: data, or zeroes from a punch/zero-range.
    enum Seg {
        Data(Vec<u8>),
        Zero(u64),
    }

    impl Seg {
        fn len(&self) -> u64 {
            match self {
                Seg::Data(d) => d.len() as u64,
                Seg::Zero(n) => *n,
            }
        }

        /// The bytes [from, to) of the run.
        fn slice(&self, from: u64, to: u64) -> Seg {
            match self {
                Seg::Data(d) => Seg::Data(d[from as usize..to as usize].to_vec()),
                Seg::Zero(_) => Seg::Zero(to - from),
            }
        }
    }

    /// Unsynced writes by offset, never overlapping: what a page cache holds for the file.
    #[derive(Default)]
    struct Overlay {
        segs: BTreeMap<u64, Seg>,
    }

    impl Overlay {
        /// A newer write over [offset, offset+len): what it covers of older runs goes.
        fn insert(&mut self, offset: u64, seg: Seg) {
            let end = offset + seg.len();
            let hit: Vec<u64> = self
                .segs
                .range(..end)
                .rev()
                .take_while(|(s, old)| *s + old.len() > offset)
                .map(|(s, _)| *s)
                .collect();
            for s in hit {
                let Some(old) = self.segs.remove(&s) else {
                    continue;
                };
                let old_end = s + old.len();
                if s < offset {
                    self.segs.insert(s, old.slice(0, offset - s));
                }
                if old_end > end {
                    self.segs.insert(end, old.slice(end - s, old.len()));
                }
            }
            if end > offset {
                self.segs.insert(offset, seg);
            }
        }

        /// Lay the unsynced writes over `buf`, read from the file at `offset`.
        fn read(&self, buf: &mut [u8], offset: u64) {
            let end = offset + buf.len() as u64;
            for (&s, seg) in self.segs.range(..end).rev() {
                let seg_end = s + seg.len();
                if seg_end <= offset {
                    break;
                }
                let (from, to) = (s.max(offset), seg_end.min(end));
                let dst = &mut buf[(from - offset) as usize..(to - offset) as usize];
                match seg {
                    Seg::Data(d) => dst.copy_from_slice(&d[(from - s) as usize..(to - s) as usize]),
                    Seg::Zero(_) => dst.fill(0),
                }
            }
        }

        /// Write every run to the file (punching or writing the zero runs); the caller syncs.
        fn write_out(&mut self, file: &File) -> io::Result<()> {
            while let Some((s, seg)) = self.segs.pop_first() {
                let done = match &seg {
                    Seg::Data(d) => file.write_all_at(d, s),
                    Seg::Zero(n) => write_zeroes(file, s, *n),
                };
                if let Err(e) = done {
                    self.segs.insert(s, seg);
                    return Err(e);
                }
            }
            Ok(())
        }
    }

    fn write_zeroes(file: &File, offset: u64, len: u64) -> io::Result<()> {
        if diskio::fallocate(file, diskio::PUNCH_HOLE, offset, len).is_ok() {
            return Ok(());
        }
        const CHUNK: u64 = 1 << 20;
        let zeroes = vec![0u8; CHUNK.min(len) as usize];
        let mut pos = offset;
        while pos < offset + len {
            let n = CHUNK.min(offset + len - pos) as usize;
            file.write_all_at(&zeroes[..n], pos)?;
            pos += n as u64;
        }
        Ok(())
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        const SIZE: u64 = 1 << 20;

        /// A slow disk's delay grows with the bytes of a call, also below a MiB: the daemon
        /// writes data in pieces of 256 KiB, and a delay counted in whole MiB left them all
        /// fast (`daemon_flush`'s slow-write tests then tested nothing).
        #[test]
        fn a_slow_disk_takes_its_time_per_byte_whatever_the_pieces() {
            let s = Duration::from_secs(10);
            assert_eq!(per_mib(s, 256 << 10), Duration::from_millis(2500));
            assert_eq!(per_mib(s, 4 << 20), Duration::from_secs(40));
            assert_eq!(
                per_mib(Duration::from_millis(250), 32 << 20),
                Duration::from_secs(8)
            );
            assert_eq!(per_mib(s, 0), Duration::ZERO);
            assert_eq!(
                per_mib(Duration::MAX, u64::MAX),
                Duration::from_nanos(u64::MAX)
            );
        }

        /// A file of `SIZE` bytes of 0x11 and a unit-test machine (the power cut returns).
        fn setup(power_loss: bool) -> (tempfile::TempDir, PathBuf, Machine) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("disk.img");
            std::fs::write(&path, vec![0x11u8; SIZE as usize]).unwrap();
            (dir, path, Machine::new(power_loss, false))
        }

        fn open(m: &Machine, path: &Path) -> DiskFile {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .unwrap();
            m.open(f, path)
        }

        /// What is on the disk, past any overlay: what a restart after the power cut finds.
        fn platter(path: &Path, offset: u64, len: usize) -> Vec<u8> {
            let mut b = vec![0u8; len];
            File::open(path)
                .unwrap()
                .read_exact_at(&mut b, offset)
                .unwrap();
            b
        }

        fn read(d: &DiskFile, offset: u64, len: usize) -> Vec<u8> {
            let mut b = vec![0u8; len];
            d.read_exact_at(&mut b, offset).unwrap();
            b
        }

        #[test]
        fn unsynced_writes_are_read_back_but_not_on_the_disk() {
            let (_d, path, m) = setup(true);
            let d = open(&m, &path);
            d.write_all_at(&[0xaa; 1000], 100).unwrap();
            d.write_all_at(&[0xbb; 10], 600).unwrap();
            let got = read(&d, 0, 2000);
            assert_eq!(&got[..100], &[0x11; 100]);
            assert_eq!(&got[100..600], &[0xaa; 500]);
            assert_eq!(&got[600..610], &[0xbb; 10]);
            assert_eq!(&got[610..1100], &[0xaa; 490]);
            assert_eq!(&got[1100..], &[0x11; 900]);
            assert_eq!(platter(&path, 0, 2000), vec![0x11; 2000]);
            // A second open of the same file (the activemap's) sees the same page cache.
            assert_eq!(read(&open(&m, &path), 600, 10), vec![0xbb; 10]);
            d.sync_data().unwrap();
            assert_eq!(platter(&path, 0, 2000), got);
            assert_eq!(d.faults().unsynced(), 0);
        }

        /// The activemap's dirty-bit page is synced alone (RWF_DSYNC): after a power cut it
        /// is on the disk, while a data write before it that nothing synced is gone, and a
        /// part of an older unsynced write outside the page stays unsynced too.
        #[test]
        fn a_durable_write_syncs_its_range_and_nothing_else() {
            let (_d, path, m) = setup(true);
            let d = open(&m, &path);
            d.write_all_at(&[0xaa; 8192], 8192).unwrap();
            d.write_all_at(&[0xcc; 100], 4000).unwrap();
            d.write_durable_at(&[0xbb; 4096], 0).unwrap();
            assert_eq!(
                read(&d, 4000, 100),
                vec![0xbb; 96]
                    .into_iter()
                    .chain([0xcc; 4])
                    .collect::<Vec<_>>()
            );
            assert_eq!(platter(&path, 0, 4096), vec![0xbb; 4096]);
            assert_eq!(
                platter(&path, 4096, 4),
                vec![0x11; 4],
                "unsynced bytes past the range"
            );
            assert_eq!(
                platter(&path, 8192, 8192),
                vec![0x11; 8192],
                "unsynced data"
            );
            assert_eq!(d.faults().unsynced(), 8192 + 4);
            d.faults().apply(&Action::PowerCut);
            assert_eq!(platter(&path, 0, 4096), vec![0xbb; 4096]);
            assert_eq!(platter(&path, 8192, 8192), vec![0x11; 8192]);
        }

        /// Without faults armed, the real call (pwritev2 RWF_DSYNC on Linux) writes the bytes.
        #[test]
        fn a_durable_write_lands_without_faults() {
            let (_d, path, m) = setup(false);
            let d = open(&m, &path);
            d.write_durable_at(&[0x5a; 5000], 1000).unwrap();
            assert_eq!(platter(&path, 1000, 5000), vec![0x5a; 5000]);
            assert_eq!(platter(&path, 0, 1000), vec![0x11; 1000]);
        }

        #[test]
        fn overlapping_writes_keep_the_newest_bytes() {
            let mut o = Overlay::default();
            o.insert(10, Seg::Data(vec![1; 10]));
            o.insert(30, Seg::Data(vec![2; 10]));
            o.insert(15, Seg::Data(vec![3; 20]));
            o.insert(0, Seg::Zero(12));
            let mut buf = vec![9u8; 45];
            o.read(&mut buf, 0);
            let mut want = vec![0u8; 12];
            want.extend([1; 3]);
            want.extend([3; 20]);
            want.extend([2; 5]);
            want.extend([9; 5]);
            assert_eq!(buf, want);
            assert_eq!(o.segs.len(), 4);
        }

        #[test]
        fn a_power_cut_drops_unsynced_writes_and_keeps_synced_ones() {
            let (_d, path, m) = setup(true);
            let d = open(&m, &path);
            d.write_all_at(&[0xaa; 4096], 0).unwrap();
            d.sync_data().unwrap();
            d.write_all_at(&[0xbb; 4096], 4096).unwrap();
            d.write_all_at(&[0xcc; 512], 0).unwrap();
            assert_eq!(d.faults().unsynced(), 4096 + 512);
            d.faults().apply(&Action::PowerCut);
            assert_eq!(platter(&path, 0, 4096), vec![0xaa; 4096]);
            assert_eq!(platter(&path, 4096, 4096), vec![0x11; 4096]);
            assert_eq!(d.faults().unsynced(), 0);
            // Until the process is gone, the disk answers nothing.
            let e = d.write_all_at(&[1], 0).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EIO));
            assert!(d.sync_data().is_err());
        }

        #[test]
        #[cfg(target_os = "linux")]
        fn punches_are_unsynced_zeroes_too() {
            let (_d, path, m) = setup(true);
            let d = open(&m, &path);
            d.fallocate(diskio::PUNCH_HOLE, 8192, 8192).unwrap();
            assert_eq!(read(&d, 8192 - 1, 8194)[1..8193], vec![0u8; 8192]);
            assert_eq!(read(&d, 8192 - 1, 1), vec![0x11]);
            assert_eq!(platter(&path, 8192, 8192), vec![0x11; 8192]);
            // Holes are not the file's while the overlay may fill them: callers read.
            assert!(d.lseek(0, nix::unistd::Whence::SeekData).is_err());
            d.sync_data().unwrap();
            assert_eq!(platter(&path, 8192, 8192), vec![0u8; 8192]);
            assert_eq!(platter(&path, 8192 - 1, 1), vec![0x11]);
            d.fallocate(diskio::ZERO_RANGE, 0, 4096).unwrap();
            d.faults().apply(&Action::PowerCut);
            assert_eq!(platter(&path, 0, 4096), vec![0x11; 4096]);
        }

        #[test]
        fn eio_ranges_fail_the_io_that_touches_them() {
            let (_d, path, m) = setup(false);
            let d = open(&m, &path);
            let f = d.faults();
            f.apply(&Action::Eio {
                op: Op::Read,
                offset: 4096,
                len: 4096,
            });
            let mut b = [0u8; 512];
            let e = d.read_exact_at(&mut b, 8192 - 256).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EIO));
            d.read_exact_at(&mut b, 8192).unwrap();
            d.read_exact_at(&mut b, 4096 - 512).unwrap();
            // Writes still work, and without power-loss mode they go straight to the file.
            d.write_all_at(&[0xaa; 512], 4096).unwrap();
            assert_eq!(platter(&path, 4096, 512), vec![0xaa; 512]);
            f.apply(&Action::Eio {
                op: Op::Write,
                offset: 0,
                len: 1,
            });
            let e = d.write_all_at(&[0; 512], 0).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EIO));
            assert!(d.fallocate(diskio::PUNCH_HOLE, 0, 4096).is_err());
            d.read_exact_at(&mut b, 0).unwrap();
            f.apply(&Action::Eio {
                op: Op::Rw,
                offset: 100_000,
                len: 10,
            });
            assert!(d.read_exact_at(&mut b, 100_000 - 500).is_err());
            assert!(d.write_all_at(&b, 100_009).is_err());
            f.apply(&Action::Clear);
            d.read_exact_at(&mut b, 4096).unwrap();
            d.write_all_at(&b, 0).unwrap();
            assert!(!f.armed());
        }

        #[test]
        fn a_torn_write_lands_its_first_sectors_then_the_power_goes() {
            let (_d, path, m) = setup(true);
            let d = open(&m, &path);
            let other = open(&m, &path);
            d.write_all_at(&[0xcc; 512], 0).unwrap();
            d.faults().apply(&Action::Torn {
                offset: 65536,
                len: 4096,
                sectors: 3,
            });
            // Writes elsewhere are not torn.
            d.write_all_at(&[0xdd; 512], 32768).unwrap();
            let e = d.write_all_at(&[0xaa; 8192], 61440).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EIO));
            assert_eq!(platter(&path, 61440, 1536), vec![0xaa; 1536]);
            assert_eq!(platter(&path, 61440 + 1536, 8192 - 1536), vec![0x11; 6656]);
            // The unsynced writes went with the power.
            assert_eq!(platter(&path, 0, 512), vec![0x11; 512]);
            assert_eq!(platter(&path, 32768, 512), vec![0x11; 512]);
            assert!(other.read_exact_at(&mut [0u8; 1], 0).is_err());
        }

        #[test]
        fn actions_are_one_json_object() {
            let a = Action::Torn {
                offset: 1,
                len: 2,
                sectors: 3,
            };
            let s = serde_json::to_string(&a).unwrap();
            assert_eq!(s, r#"{"action":"torn","offset":1,"len":2,"sectors":3}"#);
            assert_eq!(serde_json::from_str::<Action>(&s).unwrap(), a);
            let e = r#"{"action":"eio","op":"rw","offset":0,"len":1}"#;
            assert!(matches!(
                serde_json::from_str::<Action>(e).unwrap(),
                Action::Eio { op: Op::Rw, .. }
            ));
        }
    }
}
