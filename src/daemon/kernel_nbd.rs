//! Attaching the NBD export to a Linux kernel nbd device (`device = "/dev/nbdN"`).
//!
//! Owns the classic ioctl interface of `drivers/block/nbd.c` (what `nbd-client` uses): size,
//! block size, flags and timeout are set with ioctls, one end of a socketpair is given to the
//! kernel with NBD_SET_SOCK, and NBD_DO_IT, which blocks until the device is disconnected,
//! runs in a thread of its own. The other end of the socketpair is served by the caller
//! (`NbdServer::serve_kernel`) from the transmission phase on: the kernel never negotiates.
//! It does not know about replication or roles; the resource owner attaches after the export
//! starts and detaches before it stops.
//!
//! Elsewhere than Linux, and on a Linux host without the nbd module (like the build machine),
//! [`available`] says why attaching cannot work, and the device is left to the `attach` hook.
use std::io;
use std::os::unix::net::UnixStream;
use std::path::Path;

/// The block major of the nbd driver (`NBD_MAJOR` in linux/major.h).
#[cfg(target_os = "linux")]
pub const NBD_MAJOR: u64 = 43;

/// Requests the kernel has not answered within this time fail and the device is shut down.
/// Longer than any wait of the replicated device (a dead peer is noticed within the
/// resource's `timeout`, 20 s by default, and writes then go on degraded), so only a daemon
/// that is wedged trips it; a daemon that dies closes the socket and the kernel notices at once.
#[cfg(target_os = "linux")]
pub const KERNEL_TIMEOUT_SECS: u32 = 120;

/// Why attaching `device` to the kernel cannot work here; Ok when it can (Linux, the nbd module
/// loaded, `device` an nbd device nobody uses, and the privilege to configure it).
/// Meant for tests and for the daemon's log.
pub fn available(device: &Path) -> Result<(), String> {
    imp::check(device, Path::new("/sys"))
}

/// A kernel nbd device attached to the export. Dropping it detaches (errors are logged).
pub struct KernelAttach {
    #[cfg(target_os = "linux")]
    inner: Option<imp::Attached>,
}

impl KernelAttach {
    /// Configures `device` for an export of `size` bytes (rounded down to `block_size`, a power
    /// of two from 512 to 4096) with the transmission `flags` (`nbd::TRANSMISSION_FLAGS`), hands
    /// the daemon's end of a new socketpair to `serve` (which must serve it without handshake,
    /// e.g. `|s| server.serve_kernel(s)`), and starts the device.
    pub fn attach(
        device: &Path,
        size: u64,
        block_size: u32,
        flags: u16,
        serve: impl FnOnce(UnixStream) -> io::Result<()>,
    ) -> anyhow::Result<KernelAttach> {
        #[cfg(target_os = "linux")]
        {
            let inner = imp::Attached::attach(device, size, block_size, flags, serve)?;
            Ok(KernelAttach { inner: Some(inner) })
        }
        #[cfg(not(target_os = "linux"))]
        {
            let _ = (size, block_size, flags, serve);
            let why = imp::check(device, Path::new("/sys")).err();
            Err(anyhow::anyhow!(
                "{}: {}",
                device.display(),
                why.unwrap_or_default()
            ))
        }
    }

    /// Disconnects the device (the kernel sends NBD_CMD_DISC after the requests it has queued),
    /// clears its socket and waits, bounded, for NBD_DO_IT to return.
    pub fn detach(mut self) -> anyhow::Result<()> {
        self.stop()
    }

    fn stop(&mut self) -> anyhow::Result<()> {
        #[cfg(target_os = "linux")]
        if let Some(inner) = self.inner.take() {
            return inner.detach();
        }
        Ok(())
    }
}

impl Drop for KernelAttach {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            log::warn!("nbd: {e:#}");
        }
    }
}

#[cfg(not(target_os = "linux"))]
mod imp {
    use std::path::Path;

    pub fn check(_device: &Path, _sys: &Path) -> Result<(), String> {
        Err("attaching a kernel nbd device needs Linux".into())
    }
}

#[cfg(target_os = "linux")]
mod imp {
    use std::fs::{File, OpenOptions};
    use std::io;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    use std::os::unix::net::UnixStream;
    use std::path::{Path, PathBuf};
    use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
    use std::thread::{self, JoinHandle};
    use std::time::{Duration, Instant};

    use anyhow::{Context, anyhow, bail};
    use log::{debug, info, warn};
    use nix::sys::signal::SigSet;
    use nix::{ioctl_none_bad, ioctl_write_int_bad, request_code_none};

    use super::{KERNEL_TIMEOUT_SECS, NBD_MAJOR};

    /// How long `attach` waits for the kernel to report the device started.
    const START_WAIT_MS: u64 = 5000;
    /// How long `detach` waits for NBD_DO_IT to return, after NBD_DISCONNECT and again after
    /// NBD_CLEAR_SOCK.
    const DETACH_WAIT_MS: u64 = 10_000;

    // The ioctls of linux/nbd.h, all `_IO(0xab, N)` whatever their argument.
    pub const NBD_SET_SOCK: u32 = request_code_none!(0xab, 0) as u32;
    pub const NBD_SET_BLKSIZE: u32 = request_code_none!(0xab, 1) as u32;
    #[allow(dead_code)] // unused, but part of the table a test checks
    pub const NBD_SET_SIZE: u32 = request_code_none!(0xab, 2) as u32;
    pub const NBD_DO_IT: u32 = request_code_none!(0xab, 3) as u32;
    pub const NBD_CLEAR_SOCK: u32 = request_code_none!(0xab, 4) as u32;
    #[allow(dead_code)] // unused, but part of the table a test checks
    pub const NBD_CLEAR_QUE: u32 = request_code_none!(0xab, 5) as u32;
    #[allow(dead_code)] // unused, but part of the table a test checks
    pub const NBD_PRINT_DEBUG: u32 = request_code_none!(0xab, 6) as u32;
    pub const NBD_SET_SIZE_BLOCKS: u32 = request_code_none!(0xab, 7) as u32;
    pub const NBD_DISCONNECT: u32 = request_code_none!(0xab, 8) as u32;
    pub const NBD_SET_TIMEOUT: u32 = request_code_none!(0xab, 9) as u32;
    pub const NBD_SET_FLAGS: u32 = request_code_none!(0xab, 10) as u32;

    ioctl_write_int_bad!(nbd_set_sock, NBD_SET_SOCK);
    ioctl_write_int_bad!(nbd_set_blksize, NBD_SET_BLKSIZE);
    ioctl_none_bad!(nbd_do_it, NBD_DO_IT);
    ioctl_none_bad!(nbd_clear_sock, NBD_CLEAR_SOCK);
    ioctl_none_bad!(nbd_disconnect, NBD_DISCONNECT);
    ioctl_write_int_bad!(nbd_set_timeout, NBD_SET_TIMEOUT);
    ioctl_write_int_bad!(nbd_set_flags, NBD_SET_FLAGS);

    /// NBD_SET_SIZE_BLOCKS takes an unsigned long; nix's `ioctl_write_int_bad` passes a C int,
    /// which would cut a count above 2^31 blocks (8 TiB of 4 KiB blocks).
    ///
    /// # Safety
    /// `fd` must be an open nbd device.
    unsafe fn nbd_set_size_blocks(fd: libc::c_int, blocks: libc::c_ulong) -> nix::Result<()> {
        // SAFETY: the request takes its argument by value; the caller vouches for fd.
        let r = unsafe { libc::ioctl(fd, NBD_SET_SIZE_BLOCKS as _, blocks) };
        nix::errno::Errno::result(r).map(drop)
    }

    /// Capability number of CAP_SYS_ADMIN, which the nbd ioctls require.
    const CAP_SYS_ADMIN: u32 = 21;

    /// The checks of `available`, with the sysfs root as a parameter for tests.
    pub fn check(device: &Path, sys: &Path) -> Result<(), String> {
        let module = sys.join("module/nbd").exists();
        let dev = device.display();
        let meta = match std::fs::metadata(device) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound && !module => {
                return Err("the nbd kernel module is not loaded: modprobe nbd".into());
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(format!(
                    "{dev} does not exist (the nbd module has fewer devices: see its nbds_max)"
                ));
            }
            Err(e) => return Err(format!("{dev}: {e}")),
        };
        let rdev = meta.rdev();
        let (major, minor) = (libc::major(rdev) as u64, libc::minor(rdev) as u64);
        if !meta.file_type().is_block_device() || major != NBD_MAJOR {
            return Err(format!("{dev} is not an nbd device"));
        }
        if !module {
            return Err("the nbd kernel module is not loaded: modprobe nbd".into());
        }
        let node = sys.join(format!("dev/block/{major}:{minor}"));
        if node.join("partition").exists() {
            return Err(format!(
                "{dev} is a partition of an nbd device, not an nbd device"
            ));
        }
        if let Some(pid) = attached_pid(&node) {
            return Err(format!("{dev} is already attached by pid {pid}"));
        }
        if !has_sys_admin(&std::fs::read_to_string("/proc/self/status").unwrap_or_default()) {
            return Err(format!(
                "configuring {dev} needs root (CAP_SYS_ADMIN), which this process lacks"
            ));
        }
        Ok(())
    }

    /// The pid the kernel shows for a running device (`/sys/block/nbdN/pid` exists only then).
    fn attached_pid(node: &Path) -> Option<String> {
        let pid = std::fs::read_to_string(node.join("pid")).ok()?;
        Some(pid.trim().to_string())
    }

    /// Whether the effective capabilities in a /proc/PID/status text include CAP_SYS_ADMIN.
    pub fn has_sys_admin(status: &str) -> bool {
        status
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
            .is_some_and(|caps| caps & (1 << CAP_SYS_ADMIN) != 0)
    }

    /// The number of blocks the device gets, or why the geometry is refused.
    pub fn geometry(size: u64, block_size: u32) -> Result<u64, String> {
        // The kernel accepts a power of two from 512 bytes to the page size.
        if !block_size.is_power_of_two() || !(512..=4096).contains(&block_size) {
            return Err(format!(
                "block size {block_size} is not a power of two from 512 to 4096"
            ));
        }
        let blocks = size / u64::from(block_size);
        if blocks == 0 {
            return Err(format!(
                "{size} bytes is less than one block of {block_size}"
            ));
        }
        // The count is an unsigned long: 32 bits on 32-bit hosts.
        #[cfg(target_pointer_width = "32")]
        if blocks > u64::from(u32::MAX) {
            return Err(format!(
                "{blocks} blocks do not fit the kernel's block count"
            ));
        }
        Ok(blocks)
    }

    /// A running device: our descriptor, and the thread blocked in NBD_DO_IT.
    pub struct Attached {
        device: PathBuf,
        file: File,
        sysnode: PathBuf,
        do_it: Option<JoinHandle<()>>,
        /// NBD_DO_IT's result, sent when it returns.
        done: Receiver<nix::Result<libc::c_int>>,
    }

    /// Runs an ioctl, naming it and the device in the error.
    fn ctl<T>(device: &Path, what: &str, r: nix::Result<T>) -> anyhow::Result<T> {
        r.map_err(|e| match e {
            nix::errno::Errno::EPERM => anyhow!(
                "{what} on {}: {e} (configuring nbd devices needs CAP_SYS_ADMIN)",
                device.display()
            ),
            _ => anyhow!("{what} on {}: {e}", device.display()),
        })
    }

    impl Attached {
        pub fn attach(
            device: &Path,
            size: u64,
            block_size: u32,
            flags: u16,
            serve: impl FnOnce(UnixStream) -> io::Result<()>,
        ) -> anyhow::Result<Attached> {
            check(device, Path::new("/sys")).map_err(anyhow::Error::msg)?;
            let blocks = geometry(size, block_size)
                .map_err(|e| anyhow!("cannot attach {}: {e}", device.display()))?;
            let unseen = size - blocks * u64::from(block_size);
            if unseen > 0 {
                warn!(
                    "nbd: {} shows {} bytes; the last {unseen} of the export do not fill a block",
                    device.display(),
                    size - unseen
                );
            }
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(device)
                .with_context(|| format!("opening {}", device.display()))?;
            let meta = file.metadata()?;
            let rdev = meta.rdev();
            let sysnode = PathBuf::from(format!(
                "/sys/dev/block/{}:{}",
                libc::major(rdev),
                libc::minor(rdev)
            ));
            let fd = file.as_raw_fd();
            // SAFETY (all ioctls below): fd is the open nbd device; arguments are by value.
            ctl(device, "NBD_CLEAR_SOCK", unsafe { nbd_clear_sock(fd) })?;
            ctl(device, "NBD_SET_BLKSIZE", unsafe {
                nbd_set_blksize(fd, block_size as libc::c_int)
            })?;
            ctl(device, "NBD_SET_SIZE_BLOCKS", unsafe {
                nbd_set_size_blocks(fd, blocks as libc::c_ulong)
            })?;
            // As nbd-client: a kernel without NBD_SET_FLAGS still works, but never sends FLUSH,
            // FUA or TRIM, so say so.
            // SAFETY: as above.
            if let Err(e) = unsafe { nbd_set_flags(fd, libc::c_int::from(flags)) } {
                warn!(
                    "nbd: NBD_SET_FLAGS on {}: {e}; the kernel will not send flushes",
                    device.display()
                );
            }
            ctl(device, "NBD_SET_TIMEOUT", unsafe {
                nbd_set_timeout(fd, KERNEL_TIMEOUT_SECS as libc::c_int)
            })?;
            let (kernel_end, ours) = UnixStream::pair().context("creating a socketpair")?;
            // The kernel takes its own reference to the socket: our descriptor can go after.
            ctl(device, "NBD_SET_SOCK", unsafe {
                nbd_set_sock(fd, kernel_end.as_raw_fd())
            })?;
            drop(kernel_end);
            let undo = |e: anyhow::Error| {
                // SAFETY: as above.
                let _ = unsafe { nbd_clear_sock(fd) };
                e
            };
            serve(ours)
                .with_context(|| format!("serving {}", device.display()))
                .map_err(undo)?;

            let (tx, done) = mpsc::channel();
            let runner = file
                .try_clone()
                .with_context(|| format!("duplicating the descriptor of {}", device.display()))
                .map_err(undo)?;
            let do_it = thread::Builder::new()
                .name("nbd-do-it".into())
                .spawn(move || {
                    // A signal would end NBD_DO_IT and with it the device: this thread takes none.
                    if let Err(e) = SigSet::all().thread_block() {
                        warn!("nbd: blocking signals in the NBD_DO_IT thread: {e}");
                    }
                    // SAFETY: runner is the open nbd device, kept open by this thread.
                    let r = unsafe { nbd_do_it(runner.as_raw_fd()) };
                    let _ = tx.send(r);
                })
                .context("starting the NBD_DO_IT thread")
                .map_err(undo)?;
            let mut attached = Attached {
                device: device.to_path_buf(),
                file,
                sysnode,
                do_it: Some(do_it),
                done,
            };
            if let Err(e) = attached.wait_started() {
                if let Err(e2) = attached.detach_inner() {
                    debug!("nbd: after a failed start: {e2:#}");
                }
                return Err(e);
            }
            info!(
                "nbd: {} attached to the export ({} blocks of {block_size} bytes)",
                device.display(),
                blocks
            );
            Ok(attached)
        }

        /// Until the kernel shows the device's pid (started) or NBD_DO_IT returns (failed).
        fn wait_started(&mut self) -> anyhow::Result<()> {
            let deadline = Instant::now() + Duration::from_millis(START_WAIT_MS);
            loop {
                match self.done.recv_timeout(Duration::from_millis(50)) {
                    Ok(r) => {
                        self.join();
                        let why = match r {
                            Err(e) => e.to_string(),
                            Ok(_) => "it ended at once".into(),
                        };
                        bail!("NBD_DO_IT on {}: {why}", self.device.display());
                    }
                    Err(RecvTimeoutError::Disconnected) => {
                        self.join();
                        bail!("NBD_DO_IT on {}: the thread died", self.device.display());
                    }
                    Err(RecvTimeoutError::Timeout) => {}
                }
                if attached_pid(&self.sysnode).is_some() {
                    return Ok(());
                }
                if Instant::now() >= deadline {
                    bail!(
                        "{} did not start within {} ms",
                        self.device.display(),
                        START_WAIT_MS
                    );
                }
            }
        }

        fn join(&mut self) {
            if let Some(t) = self.do_it.take() {
                let _ = t.join();
            }
        }

        /// Waits up to `ms` for NBD_DO_IT to return; true when it has.
        fn wait_done(&mut self, ms: u64) -> bool {
            if self.do_it.is_none() {
                return true;
            }
            match self.done.recv_timeout(Duration::from_millis(ms)) {
                Ok(r) => {
                    // After NBD_DISCONNECT the kernel reports success; older ones an error.
                    if let Err(e) = r {
                        debug!("nbd: NBD_DO_IT on {} returned {e}", self.device.display());
                    }
                    self.join();
                    true
                }
                Err(RecvTimeoutError::Disconnected) => {
                    self.join();
                    true
                }
                Err(RecvTimeoutError::Timeout) => false,
            }
        }

        pub fn detach(mut self) -> anyhow::Result<()> {
            self.detach_inner()?;
            info!("nbd: {} detached", self.device.display());
            Ok(())
        }

        fn detach_inner(&mut self) -> anyhow::Result<()> {
            let fd = self.file.as_raw_fd();
            let device = self.device.clone();
            // Dirty pages of the device reach the export first: newer kernels do not write them
            // back on NBD_DISCONNECT.
            if let Err(e) = self.file.sync_all() {
                warn!("nbd: syncing {} before detaching: {e}", device.display());
            }
            // The kernel sends NBD_CMD_DISC; the server drains and closes; NBD_DO_IT returns.
            // SAFETY: fd is the open nbd device.
            if let Err(e) = unsafe { nbd_disconnect(fd) } {
                debug!("nbd: NBD_DISCONNECT on {}: {e}", device.display());
            }
            let ended = self.wait_done(DETACH_WAIT_MS);
            // Shuts the socket down if the server did not, and forgets it.
            // SAFETY: as above.
            let cleared = unsafe { nbd_clear_sock(fd) };
            let ended = ended || self.wait_done(DETACH_WAIT_MS);
            if !ended {
                // The thread stays blocked in the kernel; it owns its descriptor.
                bail!(
                    "{}: NBD_DO_IT still running {} s after NBD_DISCONNECT and NBD_CLEAR_SOCK",
                    device.display(),
                    2 * DETACH_WAIT_MS / 1000
                );
            }
            ctl(&device, "NBD_CLEAR_SOCK", cleared)?;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::nbd::{FileDevice, NbdServer, TRANSMISSION_FLAGS};
    use std::io::{Read, Write};
    use std::path::PathBuf;
    use std::sync::Arc;
    use std::time::Duration;

    // What the kernel puts on the wire, written out here rather than taken from nbd.rs.
    const REQUEST_MAGIC: u32 = 0x2560_9513;
    const REPLY_MAGIC: u32 = 0x6744_6698;
    const READ: u16 = 0;
    const WRITE: u16 = 1;
    const DISC: u16 = 2;
    const FLUSH: u16 = 3;
    const TRIM: u16 = 4;
    const WRITE_ZEROES: u16 = 6;
    const FUA: u16 = 1;
    const SIZE: u64 = 4 << 20;

    struct Fixture {
        _dir: tempfile::TempDir,
        img: PathBuf,
        server: Option<NbdServer>,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.img");
        let dev = Arc::new(FileDevice::open(&img, Some(SIZE)).unwrap());
        let sock = dir.path().join("nbd.sock");
        let server = NbdServer::start(Some(&sock), None, "hast0", dev).unwrap();
        Fixture {
            _dir: dir,
            img,
            server: Some(server),
        }
    }

    /// The kernel's side of the socketpair, after NBD_SET_SOCK.
    fn kernel_side(f: &Fixture) -> UnixStream {
        let (kernel, ours) = UnixStream::pair().unwrap();
        f.server.as_ref().unwrap().serve_kernel(ours).unwrap();
        // Bounds every read so a server bug fails the test instead of hanging it.
        kernel
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        kernel
    }

    /// A request as the kernel sends it: type and flags in one 32-bit word.
    fn send(s: &mut UnixStream, kind: u16, flags: u16, cookie: u64, offset: u64, data: &[u8]) {
        send_len(s, kind, flags, cookie, offset, data.len() as u32);
        s.write_all(data).unwrap();
    }

    fn send_len(s: &mut UnixStream, kind: u16, flags: u16, cookie: u64, offset: u64, len: u32) {
        let mut b = REQUEST_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&((u32::from(flags) << 16) | u32::from(kind)).to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        s.write_all(&b).unwrap();
    }

    /// A simple reply: (error, cookie).
    fn reply(s: &mut UnixStream) -> (u32, u64) {
        let mut b = [0u8; 16];
        s.read_exact(&mut b).unwrap();
        assert_eq!(u32::from_be_bytes(b[..4].try_into().unwrap()), REPLY_MAGIC);
        (
            u32::from_be_bytes(b[4..8].try_into().unwrap()),
            u64::from_be_bytes(b[8..].try_into().unwrap()),
        )
    }

    /// True when the server closes the connection (after whatever it still sends).
    fn closed(s: &mut UnixStream) -> bool {
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).is_ok()
    }

    #[test]
    fn kernel_connection_serves_requests_without_handshake() {
        let f = fixture();
        let mut k = kernel_side(&f);
        // No greeting: the first thing on the wire is the answer to the first request.
        let data: Vec<u8> = (0..8192u32).map(|i| (i * 7 % 251) as u8).collect();
        send(&mut k, WRITE, FUA, 1, 4096, &data);
        assert_eq!(reply(&mut k), (0, 1));
        send_len(&mut k, READ, 0, 2, 4096, 8192);
        assert_eq!(reply(&mut k), (0, 2));
        let mut back = vec![0u8; 8192];
        k.read_exact(&mut back).unwrap();
        assert_eq!(back, data);
        send(&mut k, WRITE, 0, 3, SIZE - 512, &[0xee; 512]);
        send_len(&mut k, TRIM, 0, 4, 4096, 512);
        send_len(&mut k, WRITE_ZEROES, 0, 5, 8192, 1024);
        send_len(&mut k, FLUSH, 0, 6, 0, 0);
        let mut cookies: Vec<u64> = (0..4)
            .map(|_| {
                let (err, cookie) = reply(&mut k);
                assert_eq!(err, 0, "request {cookie}");
                cookie
            })
            .collect();
        cookies.sort();
        assert_eq!(cookies, vec![3, 4, 5, 6]);
        // Past the end: an error, and the stream stays usable.
        send_len(&mut k, READ, 0, 7, SIZE, 512);
        assert_eq!(reply(&mut k), (22, 7)); // EINVAL
        send_len(&mut k, DISC, 0, 8, 0, 0);
        assert!(closed(&mut k));

        let disk = std::fs::read(&f.img).unwrap();
        assert!(disk[4096..4608].iter().all(|&b| b == 0));
        assert_eq!(&disk[4608..8192], &data[512..4096]);
        assert!(disk[8192..9216].iter().all(|&b| b == 0));
        assert_eq!(&disk[9216..12288], &data[5120..]);
        assert!(disk[SIZE as usize - 512..].iter().all(|&b| b == 0xee));
        let stats = f.server.as_ref().unwrap().stats();
        assert_eq!((stats.writes, stats.reads, stats.flushes), (2, 1, 1));
    }

    #[test]
    fn shutdown_closes_the_kernel_connection() {
        let mut f = fixture();
        let mut k = kernel_side(&f);
        send(&mut k, WRITE, 0, 1, 0, b"kept");
        assert_eq!(reply(&mut k), (0, 1));
        // Closed by the peer: the kernel reads end of stream, the server has nothing left.
        f.server.take().unwrap().shutdown();
        assert!(closed(&mut k));
        assert_eq!(&std::fs::read(&f.img).unwrap()[..4], b"kept");
    }

    #[test]
    fn kernel_connection_ends_when_the_kernel_closes() {
        let f = fixture();
        let mut k = kernel_side(&f);
        // A request cut short, then the socket goes away: the server stays up.
        send_len(&mut k, WRITE, 0, 1, 0, 4096);
        k.write_all(&[1; 100]).unwrap();
        drop(k);
        let mut k = kernel_side(&f);
        send_len(&mut k, FLUSH, 0, 2, 0, 0);
        assert_eq!(reply(&mut k), (0, 2));
        drop(k);
        assert!(
            std::fs::read(&f.img).unwrap()[..4096]
                .iter()
                .all(|&b| b == 0)
        );
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn ioctl_numbers_are_those_of_linux_nbd_h() {
        use imp::*;
        let all = [
            NBD_SET_SOCK,
            NBD_SET_BLKSIZE,
            NBD_SET_SIZE,
            NBD_DO_IT,
            NBD_CLEAR_SOCK,
            NBD_CLEAR_QUE,
            NBD_PRINT_DEBUG,
            NBD_SET_SIZE_BLOCKS,
            NBD_DISCONNECT,
            NBD_SET_TIMEOUT,
            NBD_SET_FLAGS,
        ];
        let want: Vec<u32> = (0..=10).map(|n| 0xab00 + n).collect();
        assert_eq!(all.to_vec(), want);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn geometry_and_capabilities() {
        use imp::{geometry, has_sys_admin};
        assert_eq!(geometry(1 << 30, 4096), Ok(1 << 18));
        assert_eq!(geometry(4096 * 3 + 100, 4096), Ok(3));
        assert_eq!(geometry(1 << 40, 512), Ok(1 << 31));
        assert!(
            geometry(4095, 4096)
                .unwrap_err()
                .contains("less than one block")
        );
        for bad in [0, 256, 1000, 8192] {
            assert!(geometry(1 << 20, bad).unwrap_err().contains("power of two"));
        }
        let status = "Name:\ttandem\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        assert!(has_sys_admin(status));
        assert!(!has_sys_admin("CapEff:\t0000000000000000\n"));
        assert!(!has_sys_admin("CapEff:\t0000000000100000\n"));
        assert!(has_sys_admin("CapEff:\t0000000000200000\n"));
        assert!(!has_sys_admin("nothing here"));
    }

    #[test]
    fn not_an_nbd_device_is_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("plain.img");
        std::fs::write(&plain, vec![0u8; 1 << 20]).unwrap();
        let err = KernelAttach::attach(&plain, 1 << 20, 4096, TRANSMISSION_FLAGS, |_| {
            panic!("nothing to serve for a regular file")
        })
        .err()
        .unwrap();
        let text = format!("{err:#}");
        if cfg!(target_os = "linux") {
            assert_eq!(text, format!("{} is not an nbd device", plain.display()));
            assert!(
                available(dir.path())
                    .unwrap_err()
                    .contains("is not an nbd device")
            );
            assert!(
                available(Path::new("/dev/null"))
                    .unwrap_err()
                    .contains("/dev/null is not an nbd device")
            );
        } else {
            assert!(text.contains("needs Linux"), "{text}");
        }
        // The file is untouched.
        assert_eq!(std::fs::read(&plain).unwrap(), vec![0u8; 1 << 20]);
    }

    /// A fake sysfs and a real device node of major 43 (made with mknod: root only).
    #[cfg(target_os = "linux")]
    #[test]
    fn module_partition_and_busy_checks() {
        use std::os::unix::ffi::OsStrExt;
        let dir = tempfile::tempdir().unwrap();
        let sys = dir.path().join("sys");
        std::fs::create_dir_all(sys.join("dev/block/43:0")).unwrap();
        std::fs::create_dir_all(sys.join("dev/block/43:1")).unwrap();
        std::fs::write(sys.join("dev/block/43:1/partition"), "1\n").unwrap();
        // Without the module and without the node.
        let missing = dir.path().join("nbd9");
        assert_eq!(
            imp::check(&missing, &sys).unwrap_err(),
            "the nbd kernel module is not loaded: modprobe nbd"
        );
        let node = dir.path().join("nbd0");
        let part = dir.path().join("nbd0p1");
        for (path, minor) in [(&node, 0), (&part, 1)] {
            let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
            // SAFETY: c is a valid NUL-terminated path.
            let r =
                unsafe { libc::mknod(c.as_ptr(), libc::S_IFBLK | 0o600, libc::makedev(43, minor)) };
            if r != 0 {
                eprintln!(
                    "skipping module_partition_and_busy_checks: mknod: {}",
                    io::Error::last_os_error()
                );
                return;
            }
        }
        // A static node without the module.
        assert_eq!(
            imp::check(&node, &sys).unwrap_err(),
            "the nbd kernel module is not loaded: modprobe nbd"
        );
        std::fs::create_dir_all(sys.join("module/nbd")).unwrap();
        assert!(
            imp::check(&missing, &sys)
                .unwrap_err()
                .contains("nbd9 does not exist")
        );
        assert!(
            imp::check(&part, &sys)
                .unwrap_err()
                .contains("is a partition of an nbd device")
        );
        std::fs::write(sys.join("dev/block/43:0/pid"), "4242\n").unwrap();
        assert_eq!(
            imp::check(&node, &sys).unwrap_err(),
            format!("{} is already attached by pid 4242", node.display())
        );
        std::fs::remove_file(sys.join("dev/block/43:0/pid")).unwrap();
        // Free: only the privilege is left to check (this test runs as root or skipped).
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        assert_eq!(imp::check(&node, &sys).is_ok(), imp::has_sys_admin(&status));
    }

    /// Aligned memory for O_DIRECT.
    #[cfg(target_os = "linux")]
    struct Aligned {
        ptr: *mut u8,
        layout: std::alloc::Layout,
    }

    #[cfg(target_os = "linux")]
    impl Aligned {
        fn new(len: usize) -> Aligned {
            let layout = std::alloc::Layout::from_size_align(len, 4096).unwrap();
            // SAFETY: the layout has a non-zero size.
            let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
            assert!(!ptr.is_null());
            Aligned { ptr, layout }
        }
        fn slice(&mut self) -> &mut [u8] {
            // SAFETY: ptr points to layout.size() initialised bytes owned by self.
            unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
        }
    }

    #[cfg(target_os = "linux")]
    impl Drop for Aligned {
        fn drop(&mut self) {
            // SAFETY: allocated in `new` with this layout.
            unsafe { std::alloc::dealloc(self.ptr, self.layout) };
        }
    }

    /// The whole path on a host with the nbd module, as root: the kernel device shows the
    /// export's bytes, and bytes written through it (O_DIRECT) reach the backing file.
    #[test]
    #[cfg(target_os = "linux")]
    fn kernel_attach_writes_and_reads_through_dev_nbd0() {
        let device = Path::new("/dev/nbd0");
        if let Err(why) = available(device) {
            eprintln!("skipping kernel attach test: {why}");
            return;
        }
        {
            use crate::daemon::nbd::BlockDevice;
            use std::fs::OpenOptions;
            use std::os::unix::fs::{FileExt, OpenOptionsExt};
            let f = fixture();
            let server = f.server.as_ref().unwrap();
            let dev = FileDevice::open(&f.img, None).unwrap();
            let pattern: Vec<u8> = (0..65536u32).map(|i| (i % 253) as u8).collect();
            dev.write(1 << 20, &pattern, true).unwrap();
            let attached = KernelAttach::attach(device, SIZE, 4096, TRANSMISSION_FLAGS, |s| {
                server.serve_kernel(s)
            })
            .unwrap();
            let blk = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_DIRECT)
                .open(device)
                .unwrap();
            let mut buf = Aligned::new(65536);
            blk.read_exact_at(buf.slice(), 1 << 20).unwrap();
            assert_eq!(buf.slice(), &pattern[..]);
            buf.slice().fill(0x5a);
            blk.write_all_at(buf.slice(), 2 << 20).unwrap();
            blk.sync_all().unwrap();
            let mut back = Aligned::new(65536);
            blk.read_exact_at(back.slice(), 2 << 20).unwrap();
            assert!(back.slice().iter().all(|&b| b == 0x5a));
            drop(blk);
            attached.detach().unwrap();
            let disk = std::fs::read(&f.img).unwrap();
            assert!(disk[2 << 20..(2 << 20) + 65536].iter().all(|&b| b == 0x5a));
            assert!(server.stats().writes >= 1);
        }
    }
}
