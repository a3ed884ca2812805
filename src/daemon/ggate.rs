//! The GEOM Gate export on FreeBSD: the primary's replicated disk as `/dev/tandem/RES`, the way
//! hastd exposes `/dev/hast/RES`.
//!
//! Owns the userland side of `sys/geom/gate/g_gate.h`: the control structures and ioctl numbers
//! of `/dev/ggctl`, the provider's creation (G_GATE_CMD_CREATE, or G_GATE_CMD_CANCEL to take
//! over one left by a daemon that died), a pool of worker threads that each loop
//! G_GATE_CMD_START → [`BlockDevice`] → G_GATE_CMD_DONE, and the provider's destruction on
//! demote (G_GATE_CMD_DESTROY, refused by the kernel while the provider is open, forced after a
//! timeout). Requests go through the same [`BlockDevice`] as the NBD export, so a write through
//! `/dev/tandem/RES` is replicated exactly like one through the NBD socket.
//! It does not know about roles: the resource owner starts the export on promote and stops it
//! on demote.
//!
//! Everything except the `/dev/ggctl` calls is behind [`GateCtl`], so the request dispatch and
//! the destroy logic are unit-tested on Linux with a fake kernel. The real implementation
//! (`Ggctl`) is compiled on FreeBSD only.
//!
//! References: FreeBSD `sys/geom/gate/g_gate.h` (G_GATE_VERSION 3 since FreeBSD 9, still in
//! the 2023 freebsd-src consulted, so FreeBSD 13 and 14),
//! `sys/geom/gate/g_gate.c` (what START/DONE/DESTROY do; START answers ENOMEM with the length
//! needed when a WRITE or DELETE is longer than the buffer and keeps it queued, so the buffer
//! grows and START is asked again) and `sbin/hastd/primary.c` (init_ggate, ggate_recv_thread).

use std::ffi::c_void;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use log::{debug, error, info, warn};

use super::diskio::ioc_inout;
use super::nbd::BlockDevice;

/// `G_GATE_VERSION`: the kernel refuses every command of another version with EINVAL.
pub const G_GATE_VERSION: u32 = 3;
/// `G_GATE_NAME_GIVEN`: the provider is named by `gctl_name`, not `ggate<unit>`.
pub const G_GATE_NAME_GIVEN: i32 = -2;
/// `NAME_MAX` of FreeBSD's `sys/syslimits.h`: the size of every `gctl_name`.
pub const NAME_MAX: usize = 255;
/// `G_GATE_INFOSIZE`.
pub const G_GATE_INFOSIZE: usize = 2048;
/// The control device (`"/dev/" G_GATE_CTL_NAME`).
pub const CTL_PATH: &str = "/dev/ggctl";
/// Where devfs shows the providers this daemon creates, and their name prefix in GEOM.
pub const DEV_DIR: &str = "/dev/tandem/";

// `bio_cmd` values of `sys/bio.h` that reach a ggate daemon (g_gate_start answers every other
// command, BIO_GETATTR included, with EOPNOTSUPP itself).
pub const BIO_READ: u32 = 0x01;
pub const BIO_WRITE: u32 = 0x02;
pub const BIO_DELETE: u32 = 0x03;
pub const BIO_FLUSH: u32 = 0x05;

/// `struct g_gate_ctl_create` (`u_int` is u32, `off_t` i64 on every FreeBSD platform).
#[repr(C)]
pub struct CtlCreate {
    pub gctl_version: u32,
    pub gctl_mediasize: i64,
    pub gctl_sectorsize: u32,
    pub gctl_flags: u32,
    pub gctl_maxcount: u32,
    pub gctl_timeout: u32,
    pub gctl_name: [u8; NAME_MAX],
    pub gctl_info: [u8; G_GATE_INFOSIZE],
    pub gctl_readprov: [u8; NAME_MAX],
    pub gctl_readoffset: i64,
    pub gctl_unit: i32,
}

/// `struct g_gate_ctl_destroy`.
#[repr(C)]
pub struct CtlDestroy {
    pub gctl_version: u32,
    pub gctl_unit: i32,
    pub gctl_force: i32,
    pub gctl_name: [u8; NAME_MAX],
}

/// `struct g_gate_ctl_cancel` (`uintptr_t` is usize).
#[repr(C)]
pub struct CtlCancel {
    pub gctl_version: u32,
    pub gctl_unit: i32,
    pub gctl_seq: usize,
    pub gctl_name: [u8; NAME_MAX],
}

/// `struct g_gate_ctl_io`: one request, filled by START, answered by DONE.
#[repr(C)]
pub struct CtlIo {
    pub gctl_version: u32,
    pub gctl_unit: i32,
    pub gctl_seq: usize,
    pub gctl_cmd: u32,
    pub gctl_offset: i64,
    pub gctl_length: i64,
    pub gctl_data: *mut c_void,
    pub gctl_error: i32,
}

pub const G_GATE_CMD_CREATE: u64 = ioc_inout(b'm', 0, size_of::<CtlCreate>() as u64);
pub const G_GATE_CMD_DESTROY: u64 = ioc_inout(b'm', 2, size_of::<CtlDestroy>() as u64);
pub const G_GATE_CMD_CANCEL: u64 = ioc_inout(b'm', 3, size_of::<CtlCancel>() as u64);
pub const G_GATE_CMD_START: u64 = ioc_inout(b'm', 4, size_of::<CtlIo>() as u64);
pub const G_GATE_CMD_DONE: u64 = ioc_inout(b'm', 5, size_of::<CtlIo>() as u64);

/// Worker threads per provider: requests in flight at once (a replicated write waits for the
/// peer, so they have to overlap).
#[cfg(target_os = "freebsd")]
pub const WORKERS: usize = 32;
/// A worker's buffer to start with: MAXPHYS of FreeBSD before 13, the largest request most
/// consumers send.
const BUFFER_START: usize = 128 << 10;
/// A worker keeps a grown buffer up to this size (`maxphys`, 1 MiB by default since FreeBSD
/// 13); a larger one is given back after its request.
const BUFFER_KEEP: usize = 1 << 20;
/// The largest request served. Writes are at most `maxphys`; GEOM splits DIOCGDELETE into
/// 128 MiB (kern.geom.dev.delete_max_sectors) and ZFS trims at most 128 MiB; the kernel wants
/// a buffer as long as a BIO_DELETE too, though it never touches it.
const REQUEST_MAX: usize = 1 << 30;
/// How often an unforced G_GATE_CMD_DESTROY is retried while the provider is open.
const DESTROY_RETRY: Duration = Duration::from_millis(100);

/// The provider name for `device` when it is one of ours (`/dev/tandem/X` → `tandem/X`).
pub fn provider_name(device: &Path) -> Option<String> {
    let s = device.to_str()?;
    let rest = s.strip_prefix(DEV_DIR)?;
    if rest.is_empty() || rest.contains('\0') {
        return None;
    }
    Some(format!("tandem/{rest}"))
}

/// The provider's media size and sector size for `data_size` bytes on a disk with sectors of
/// `disk_sector` bytes: at least 512 and never less than the disk's, since a FreeBSD disk
/// refuses I/O not aligned to its sectors.
pub fn geometry(data_size: u64, disk_sector: u32) -> Result<(u64, u32), String> {
    let sector = disk_sector.max(512);
    if !sector.is_power_of_two() {
        return Err(format!("sector size {sector} is not a power of two"));
    }
    let media = data_size / u64::from(sector) * u64::from(sector);
    if media == 0 || i64::try_from(media).is_err() {
        return Err(format!(
            "{data_size} bytes cannot be a provider with sectors of {sector} bytes"
        ));
    }
    Ok((media, sector))
}

/// `name` as a NUL-terminated `gctl_name`.
pub fn name_field(name: &str) -> io::Result<[u8; NAME_MAX]> {
    let mut field = [0u8; NAME_MAX];
    if name.is_empty() || name.len() >= NAME_MAX || name.contains('\0') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "provider name {name:?} must be 1 to {} bytes without NUL",
                NAME_MAX - 1
            ),
        ));
    }
    field[..name.len()].copy_from_slice(name.as_bytes());
    Ok(field)
}

/// The provider's side of `/dev/ggctl`, as the workers and the destroy path use it. The real
/// one is `Ggctl` (FreeBSD); tests use a fake kernel.
pub trait GateCtl: Send + Sync + 'static {
    /// The provider's unit number (what CREATE returned).
    fn unit(&self) -> i32;
    /// G_GATE_CMD_START: waits for the next request and fills `io`; a write's data is copied to
    /// `io.gctl_data` (at most `io.gctl_length` bytes, else `gctl_error` is ENOMEM and
    /// `gctl_length` the length needed). An `Err` is the ioctl's own failure.
    fn start(&self, io: &mut CtlIo) -> io::Result<()>;
    /// G_GATE_CMD_DONE: answers the request `io.gctl_seq` with `io.gctl_error`; a read's data is
    /// copied from `io.gctl_data`.
    fn done(&self, io: &mut CtlIo) -> io::Result<()>;
    /// G_GATE_CMD_DESTROY; without `force` the kernel answers EBUSY while the provider is open.
    fn destroy(&self, force: bool) -> io::Result<()>;
}

/// A worker's request buffer: zeroed memory from the allocator, grown on demand without
/// aborting when memory is short.
struct Buffer {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the buffer owns its memory; it moves between threads like a Vec<u8>.
unsafe impl Send for Buffer {}

impl Buffer {
    fn zeroed(len: usize) -> io::Result<Buffer> {
        let layout = std::alloc::Layout::array::<u8>(len.max(1))
            .map_err(|_| io::Error::from_raw_os_error(libc::ENOMEM))?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(io::Error::from_raw_os_error(libc::ENOMEM));
        }
        Ok(Buffer { ptr, len })
    }

    fn slice(&mut self, len: usize) -> &mut [u8] {
        let len = len.min(self.len);
        // SAFETY: ptr points to self.len initialised bytes owned by self; len is within them.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, len) }
    }

    /// Makes the buffer at least `len` bytes (its contents are not kept).
    fn reserve(&mut self, len: usize) -> io::Result<()> {
        if len > self.len {
            *self = Buffer::zeroed(len)?;
        }
        Ok(())
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        if let Ok(layout) = std::alloc::Layout::array::<u8>(self.len.max(1)) {
            // SAFETY: allocated in `zeroed` with this layout.
            unsafe { std::alloc::dealloc(self.ptr, layout) };
        }
    }
}

/// How a request reads in the log, like hastd's reqlog: `WRITE(offset, length)`.
fn describe(io: &CtlIo) -> String {
    let (off, len) = (io.gctl_offset, io.gctl_length);
    match io.gctl_cmd {
        BIO_READ => format!("READ({off}, {len})"),
        BIO_WRITE => format!("WRITE({off}, {len})"),
        BIO_DELETE => format!("DELETE({off}, {len})"),
        BIO_FLUSH => "FLUSH".to_string(),
        other => format!("UNKNOWN({other})"),
    }
}

/// Runs one request against the device and returns the errno for `gctl_error` (0: done).
/// A bad offset or length is EINVAL, a device error EIO, an unknown command EOPNOTSUPP; the
/// buffer grows for a read longer than it, and `io.gctl_data` follows it.
fn dispatch(dev: &dyn BlockDevice, name: &str, io: &mut CtlIo, buf: &mut Buffer) -> i32 {
    let what = describe(io);
    if io.gctl_cmd == BIO_FLUSH {
        return match dev.flush() {
            Ok(()) => 0,
            Err(e) => {
                warn!("{name}: {what}: {e}");
                libc::EIO
            }
        };
    }
    if !matches!(io.gctl_cmd, BIO_READ | BIO_WRITE | BIO_DELETE) {
        warn!("{name}: {what}: not supported");
        return libc::EOPNOTSUPP;
    }
    let (Ok(offset), Ok(len)) = (
        u64::try_from(io.gctl_offset),
        usize::try_from(io.gctl_length),
    ) else {
        warn!("{name}: {what}: negative offset or length");
        return libc::EINVAL;
    };
    if offset
        .checked_add(len as u64)
        .is_none_or(|end| end > dev.size())
    {
        warn!("{name}: {what}: beyond the end ({} bytes)", dev.size());
        return libc::EINVAL;
    }
    let result = match io.gctl_cmd {
        BIO_READ => {
            if len > REQUEST_MAX {
                warn!("{name}: {what}: longer than the {REQUEST_MAX} bytes served");
                return libc::EINVAL;
            }
            if let Err(e) = buf.reserve(len) {
                warn!("{name}: {what}: no buffer of {len} bytes: {e}");
                return libc::ENOMEM;
            }
            io.gctl_data = buf.ptr.cast();
            dev.read(offset, buf.slice(len))
        }
        BIO_WRITE => {
            // START copied the data into the buffer: the kernel never passes a longer write.
            if len > buf.len {
                warn!("{name}: {what}: longer than the {} byte buffer", buf.len);
                return libc::EINVAL;
            }
            dev.write(offset, buf.slice(len), false)
        }
        _ => dev.trim(offset, len as u64, false),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            warn!("{name}: {what}: {e}");
            libc::EIO
        }
    }
}

/// Why a worker ended.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    /// START answered ECANCELED: the provider is being destroyed.
    Cancelled,
    /// START failed with ENXIO: the provider is gone.
    Gone,
}

/// One worker: START, run, DONE until the provider goes away. `name` is the provider's, for
/// the log and errors.
pub fn serve(ctl: &dyn GateCtl, dev: &dyn BlockDevice, name: &str) -> anyhow::Result<End> {
    let mut buf = Buffer::zeroed(BUFFER_START)
        .with_context(|| format!("{name}: allocating a request buffer"))?;
    loop {
        let mut io = CtlIo {
            gctl_version: G_GATE_VERSION,
            gctl_unit: ctl.unit(),
            gctl_seq: 0,
            gctl_cmd: 0,
            gctl_offset: 0,
            gctl_length: buf.len as i64,
            gctl_data: buf.ptr.cast(),
            gctl_error: 0,
        };
        match ctl.start(&mut io) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => return Ok(End::Gone),
            Err(e) => return Err(anyhow!("G_GATE_CMD_START on {CTL_PATH} for {name}: {e}")),
        }
        match io.gctl_error {
            0 => {}
            libc::ECANCELED => return Ok(End::Cancelled),
            // The request at the head of the queue (a write or delete) is longer than the
            // buffer: grow it and ask again; the kernel kept the request queued.
            libc::ENOMEM => {
                let need = usize::try_from(io.gctl_length).unwrap_or(usize::MAX);
                if need <= buf.len || need > REQUEST_MAX {
                    return Err(anyhow!(
                        "{name}: {} wants a buffer of {} bytes (have {}, serve at most {REQUEST_MAX})",
                        describe(&io),
                        io.gctl_length,
                        buf.len
                    ));
                }
                buf.reserve(need)
                    .with_context(|| format!("{name}: {}: no buffer", describe(&io)))?;
                continue;
            }
            e => {
                return Err(anyhow!(
                    "G_GATE_CMD_START on {CTL_PATH} for {name}: {}",
                    io::Error::from_raw_os_error(e)
                ));
            }
        }
        io.gctl_error = dispatch(dev, name, &mut io, &mut buf);
        match ctl.done(&mut io) {
            Ok(()) => {}
            // Destroyed (forced) while the request ran: the kernel answered it ENXIO already,
            // and the next START says the provider is gone.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENXIO)) => {
                debug!("{name}: G_GATE_CMD_DONE for {}: {e}", describe(&io));
            }
            Err(e) => {
                return Err(anyhow!(
                    "G_GATE_CMD_DONE on {CTL_PATH} for {name}, {}: {e}",
                    describe(&io)
                ));
            }
        }
        if buf.len > BUFFER_KEEP {
            buf = Buffer::zeroed(BUFFER_START)
                .with_context(|| format!("{name}: allocating a request buffer"))?;
        }
    }
}

/// How `Export::stop` got rid of the provider.
#[derive(Debug, PartialEq, Eq)]
pub enum Destroyed {
    /// Unforced: nobody had it open.
    Clean,
    /// Still open after the timeout: destroyed anyway, its open requests failed with ENXIO.
    Forced,
    /// Already gone (ENXIO).
    Gone,
}

/// G_GATE_CMD_DESTROY, unforced and retried while the kernel says the provider is open (EBUSY
/// or another error), forced once `force_after` has passed.
pub fn destroy(ctl: &dyn GateCtl, name: &str, force_after: Duration) -> anyhow::Result<Destroyed> {
    let deadline = Instant::now() + force_after;
    loop {
        match ctl.destroy(false) {
            Ok(()) => return Ok(Destroyed::Clean),
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => return Ok(Destroyed::Gone),
            Err(e) if Instant::now() >= deadline => {
                warn!(
                    "{name}: still in use after {} ms ({e}); destroying it anyway",
                    force_after.as_millis()
                );
                break;
            }
            Err(e) => debug!("{name}: G_GATE_CMD_DESTROY: {e}"),
        }
        thread::sleep(DESTROY_RETRY.min(deadline.saturating_duration_since(Instant::now())));
    }
    match ctl.destroy(true) {
        Ok(()) => Ok(Destroyed::Forced),
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Ok(Destroyed::Gone),
        Err(e) => Err(anyhow!(
            "G_GATE_CMD_DESTROY (forced) on {CTL_PATH} for {name}: {e}"
        )),
    }
}

/// A provider served by a pool of workers.
pub struct Export {
    ctl: Arc<dyn GateCtl>,
    name: String,
    workers: Vec<JoinHandle<()>>,
    /// One message per worker that ended.
    ended: mpsc::Receiver<()>,
}

impl Export {
    /// Starts `workers` threads serving `ctl`'s provider (named `name`) from `dev`.
    pub fn start(
        ctl: Arc<dyn GateCtl>,
        dev: Arc<dyn BlockDevice>,
        name: &str,
        workers: usize,
    ) -> anyhow::Result<Export> {
        let (tx, ended) = mpsc::channel();
        let mut export = Export {
            ctl,
            name: name.to_string(),
            workers: Vec::new(),
            ended,
        };
        for i in 0..workers.max(1) {
            let (ctl, dev, tx, provider) = (
                Arc::clone(&export.ctl),
                Arc::clone(&dev),
                tx.clone(),
                name.to_string(),
            );
            let spawned = thread::Builder::new()
                .name(format!("ggate-{i}"))
                .spawn(move || {
                    // A signal would end START with ECANCELED as if the provider were going.
                    if let Err(e) = nix::sys::signal::SigSet::all().thread_block() {
                        warn!("{provider}: blocking signals in a ggate worker: {e}");
                    }
                    match serve(ctl.as_ref(), dev.as_ref(), &provider) {
                        Ok(end) => debug!("{provider}: ggate worker ended: {end:?}"),
                        Err(e) => error!("{provider}: ggate worker stopped: {e:#}"),
                    }
                    let _ = tx.send(());
                });
            match spawned {
                Ok(t) => export.workers.push(t),
                Err(e) => {
                    let e = anyhow!("{name}: starting a ggate worker: {e}");
                    if let Err(e2) = export.stop(Duration::ZERO, Duration::from_secs(10)) {
                        error!("{e2:#}");
                    }
                    return Err(e);
                }
            }
        }
        Ok(export)
    }

    /// Destroys the provider (see [`destroy`]) and waits up to `wait` for the workers, which
    /// finish the request they are running first.
    pub fn stop(mut self, force_after: Duration, wait: Duration) -> anyhow::Result<Destroyed> {
        let how = destroy(self.ctl.as_ref(), &self.name, force_after)?;
        let deadline = Instant::now() + wait;
        let mut left = self.workers.len();
        while left > 0 {
            match self
                .ended
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(()) => left -= 1,
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {
                    // They stay blocked on the device; each owns what it uses.
                    return Err(anyhow!(
                        "{}: {left} ggate workers still running {} s after the provider was destroyed (local disk hung?)",
                        self.name,
                        wait.as_secs()
                    ));
                }
            }
        }
        for t in self.workers.drain(..) {
            let _ = t.join();
        }
        info!("{}: provider destroyed ({how:?})", self.name);
        Ok(how)
    }
}

#[cfg(target_os = "freebsd")]
pub use sys::Ggctl;

/// The real `/dev/ggctl`.
#[cfg(target_os = "freebsd")]
mod sys {
    use std::ffi::{CString, c_char, c_int};
    use std::fs::{File, OpenOptions};
    use std::io;
    use std::os::fd::AsRawFd;

    use anyhow::{Context, anyhow};
    use log::info;

    use super::*;

    unsafe extern "C" {
        /// kldload(2).
        fn kldload(file: *const c_char) -> c_int;
    }

    /// A provider this process created (or took over) through `/dev/ggctl`.
    pub struct Ggctl {
        file: File,
        unit: i32,
        name: String,
    }

    /// One ioctl on `/dev/ggctl`, retried on EINTR.
    fn ioctl<T>(file: &File, request: u64, arg: &mut T) -> io::Result<()> {
        loop {
            // SAFETY: `arg` is the #[repr(C)] structure `request` encodes (size included).
            let r = unsafe {
                libc::ioctl(
                    file.as_raw_fd(),
                    request as libc::c_ulong,
                    arg as *mut T as *mut c_void,
                )
            };
            if r == 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// Opens `/dev/ggctl`, loading geom_gate first when it is missing (as hastd does).
    fn open_ctl() -> anyhow::Result<File> {
        let open = || OpenOptions::new().read(true).write(true).open(CTL_PATH);
        match open() {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let module = CString::new("geom_gate").context("module name")?;
                // SAFETY: module is a valid NUL-terminated string.
                if unsafe { kldload(module.as_ptr()) } < 0 {
                    let e = io::Error::last_os_error();
                    if e.raw_os_error() != Some(libc::EEXIST) {
                        return Err(anyhow!(
                            "{CTL_PATH} is missing and kldload geom_gate failed: {e}"
                        ));
                    }
                }
                open().with_context(|| format!("opening {CTL_PATH} after kldload geom_gate"))
            }
            r => r.with_context(|| format!("opening {CTL_PATH}")),
        }
    }

    impl Ggctl {
        /// Creates the provider `name` (e.g. `tandem/hast0`, shown as `/dev/tandem/hast0`) of
        /// `mediasize` bytes in sectors of `sectorsize`, like hastd's init_ggate. A provider of
        /// that name left by a daemon that died is taken over (G_GATE_CMD_CANCEL puts its
        /// unanswered requests back in the queue).
        pub fn create(name: &str, mediasize: u64, sectorsize: u32) -> anyhow::Result<Ggctl> {
            let file = open_ctl()?;
            let field = name_field(name).with_context(|| format!("creating {name}"))?;
            let mut create = CtlCreate {
                gctl_version: G_GATE_VERSION,
                gctl_mediasize: i64::try_from(mediasize)
                    .with_context(|| format!("{name}: media size {mediasize}"))?,
                gctl_sectorsize: sectorsize,
                gctl_flags: 0,
                gctl_maxcount: 0,
                gctl_timeout: 0,
                gctl_name: field,
                gctl_info: [0; G_GATE_INFOSIZE],
                gctl_readprov: [0; NAME_MAX],
                gctl_readoffset: 0,
                gctl_unit: G_GATE_NAME_GIVEN,
            };
            let info = b"tandem replicated disk";
            create.gctl_info[..info.len()].copy_from_slice(info);
            match ioctl(&file, G_GATE_CMD_CREATE, &mut create) {
                Ok(()) => {
                    info!("{name}: provider created (unit {})", create.gctl_unit);
                    return Ok(Ggctl {
                        file,
                        unit: create.gctl_unit,
                        name: name.to_string(),
                    });
                }
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => {
                    return Err(anyhow!(
                        "G_GATE_CMD_CREATE on {CTL_PATH} for {name} ({mediasize} bytes, sectors of {sectorsize}): {e}"
                    ));
                }
            }
            let mut cancel = CtlCancel {
                gctl_version: G_GATE_VERSION,
                gctl_unit: G_GATE_NAME_GIVEN,
                gctl_seq: 0,
                gctl_name: field,
            };
            ioctl(&file, G_GATE_CMD_CANCEL, &mut cancel).map_err(|e| {
                anyhow!("{name} exists and G_GATE_CMD_CANCEL on {CTL_PATH} to take it over: {e}")
            })?;
            info!(
                "{name}: provider left by an earlier daemon taken over (unit {})",
                cancel.gctl_unit
            );
            Ok(Ggctl {
                file,
                unit: cancel.gctl_unit,
                name: name.to_string(),
            })
        }
    }

    impl GateCtl for Ggctl {
        fn unit(&self) -> i32 {
            self.unit
        }

        fn start(&self, io: &mut CtlIo) -> io::Result<()> {
            ioctl(&self.file, G_GATE_CMD_START, io)
        }

        fn done(&self, io: &mut CtlIo) -> io::Result<()> {
            ioctl(&self.file, G_GATE_CMD_DONE, io)
        }

        fn destroy(&self, force: bool) -> io::Result<()> {
            let mut d = CtlDestroy {
                gctl_version: G_GATE_VERSION,
                gctl_unit: self.unit,
                gctl_force: i32::from(force),
                gctl_name: name_field(&self.name)?,
            };
            ioctl(&self.file, G_GATE_CMD_DESTROY, &mut d)
        }
    }
}

#[cfg(test)]
mod tests;
