//! The few disk calls that differ between Linux and FreeBSD: the size of a disk device,
//! whether a file is a disk at all, and fallocate. Everything else the daemon does to a disk
//! is positional read/write and fdatasync, which are the same on both, plus two Linux calls
//! with a portable fallback: a read only from the page cache and a write synced alone.
//!
//! On Linux disks are block devices and BLKGETSIZE64 gives their size. On FreeBSD every disk
//! (`/dev/ada0p3`, `/dev/gpt/x`, `/dev/zvol/...`) is a character device, `st_size` and
//! `SEEK_END` report 0 on it, and DIOCGMEDIASIZE gives the size.

use std::fs::{File, FileType};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;

/// Whether a file of this type is a disk device on this platform.
pub fn is_disk(ft: &FileType) -> bool {
    if cfg!(target_os = "freebsd") {
        ft.is_char_device()
    } else {
        ft.is_block_device()
    }
}

#[cfg(target_os = "linux")]
nix::ioctl_read!(blkgetsize64, 0x12, 114, u64);

/// The size in bytes of a disk device (see [`is_disk`]).
#[cfg(target_os = "linux")]
pub fn disk_size(file: &File) -> io::Result<u64> {
    let mut size = 0u64;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which is valid.
    unsafe { blkgetsize64(file.as_raw_fd(), &mut size) }.map_err(io::Error::from)?;
    Ok(size)
}

/// DIOCGMEDIASIZE from FreeBSD's `sys/disk.h`: `_IOR('d', 129, off_t)`.
#[cfg(any(test, target_os = "freebsd"))]
pub const DIOCGMEDIASIZE: u64 = ioc_out(b'd', 129, 8);

/// DIOCGSECTORSIZE from FreeBSD's `sys/disk.h`: `_IOR('d', 128, u_int)`.
#[cfg(any(test, target_os = "freebsd"))]
pub const DIOCGSECTORSIZE: u64 = ioc_out(b'd', 128, 4);

/// FreeBSD's `_IOC(inout, group, num, len)` (`sys/ioccom.h`): inout | (len & IOCPARM_MASK) << 16
/// | group << 8 | num.
#[cfg(any(test, target_os = "freebsd"))]
const fn ioc(inout: u64, group: u8, num: u8, len: u64) -> u64 {
    const IOCPARM_MASK: u64 = (1 << 13) - 1;
    inout | ((len & IOCPARM_MASK) << 16) | ((group as u64) << 8) | num as u64
}

/// FreeBSD's `_IOR(group, num, len)`: the kernel copies `len` bytes out (IOC_OUT).
#[cfg(any(test, target_os = "freebsd"))]
pub const fn ioc_out(group: u8, num: u8, len: u64) -> u64 {
    ioc(0x4000_0000, group, num, len)
}

/// FreeBSD's `_IOWR(group, num, len)`: the kernel copies `len` bytes in and back out
/// (IOC_INOUT = IOC_IN | IOC_OUT).
#[cfg(any(test, target_os = "freebsd"))]
pub const fn ioc_inout(group: u8, num: u8, len: u64) -> u64 {
    ioc(0xC000_0000, group, num, len)
}

/// The size in bytes of a disk device (see [`is_disk`]).
#[cfg(target_os = "freebsd")]
pub fn disk_size(file: &File) -> io::Result<u64> {
    let mut size: libc::off_t = 0;
    // SAFETY: DIOCGMEDIASIZE writes one off_t through the pointer, which is valid.
    if unsafe { libc::ioctl(file.as_raw_fd(), DIOCGMEDIASIZE as libc::c_ulong, &mut size) } != 0 {
        return Err(io::Error::last_os_error());
    }
    u64::try_from(size).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// The sector size of a disk device (see [`is_disk`]): I/O on a FreeBSD disk must be aligned
/// to it.
#[cfg(target_os = "freebsd")]
pub fn sector_size(file: &File) -> io::Result<u32> {
    let mut size: libc::c_uint = 0;
    // SAFETY: DIOCGSECTORSIZE writes one u_int through the pointer, which is valid.
    if unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            DIOCGSECTORSIZE as libc::c_ulong,
            &mut size,
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

/// The size in bytes of a disk device: unsupported on this platform.
#[cfg(not(any(target_os = "linux", target_os = "freebsd")))]
pub fn disk_size(_file: &File) -> io::Result<u64> {
    Err(io::Error::from_raw_os_error(libc::ENOTSUP))
}

/// fallocate mode that discards a range and keeps the size (reads return zeroes after).
#[cfg(target_os = "linux")]
pub const PUNCH_HOLE: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
/// fallocate mode that makes a range read as zeroes and keeps the size.
#[cfg(target_os = "linux")]
pub const ZERO_RANGE: i32 = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
#[cfg(not(target_os = "linux"))]
pub const PUNCH_HOLE: i32 = 0;
#[cfg(not(target_os = "linux"))]
pub const ZERO_RANGE: i32 = 0;

/// Linux fallocate(2) with `mode`, retried on EINTR.
#[cfg(target_os = "linux")]
pub fn fallocate(file: &File, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    let (Ok(off), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    };
    loop {
        // SAFETY: plain system call on an open descriptor.
        if unsafe { libc::fallocate(file.as_raw_fd(), mode, off, len) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// No fallocate modes elsewhere: EOPNOTSUPP, and callers write zeroes instead.
#[cfg(not(target_os = "linux"))]
pub fn fallocate(_file: &File, _mode: i32, _offset: u64, _len: u64) -> io::Result<()> {
    Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP))
}

/// Read `buf` at `offset` only if that does not wait for the disk: the data is in the page
/// cache (preadv2 with RWF_NOWAIT on Linux). None when it would block, when only part of it
/// is cached, and on other systems: the caller then reads the ordinary way, elsewhere.
#[cfg(target_os = "linux")]
pub fn read_cached(file: &File, buf: &mut [u8], offset: u64) -> Option<io::Result<()>> {
    let iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let off = libc::off_t::try_from(offset).ok()?;
    // SAFETY: iov describes `buf`, which is valid for writes of its length for the call.
    let n = unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, off, libc::RWF_NOWAIT) };
    if n < 0 {
        // EAGAIN: not cached; EOPNOTSUPP: a file system without it. Either way: read elsewhere.
        return None;
    }
    (n as usize == buf.len()).then_some(Ok(()))
}

/// Read `buf` at `offset` only if that does not wait for the disk: never known here.
#[cfg(not(target_os = "linux"))]
pub fn read_cached(file: &File, buf: &mut [u8], offset: u64) -> Option<io::Result<()>> {
    let _ = (file, buf, offset);
    None
}

/// Write `data` at `offset` and make that range durable, not the rest of the file: pwritev2
/// with RWF_DSYNC on Linux (the range is written back and the disk's cache flushed, as
/// O_DSYNC does; file systems sync allocation metadata as needed). Elsewhere, or where the
/// kernel lacks it: write, then fdatasync of the whole file.
pub fn write_durable(file: &File, data: &[u8], offset: u64) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        let mut done = 0usize;
        while done < data.len() {
            let rest = &data[done..];
            let iov = libc::iovec {
                iov_base: rest.as_ptr() as *mut libc::c_void,
                iov_len: rest.len(),
            };
            let off = libc::off_t::try_from(offset + done as u64)
                .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
            // SAFETY: iov describes `rest`, valid for reads of its length for the call.
            let n = unsafe { libc::pwritev2(file.as_raw_fd(), &iov, 1, off, libc::RWF_DSYNC) };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    // Not supported (a kernel before 4.7): the portable way, from the start.
                    Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) | Some(libc::ENOSYS)
                        if done == 0 =>
                    {
                        break;
                    }
                    _ => return Err(e),
                }
            }
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            done += n as usize;
        }
        if done == data.len() {
            return Ok(());
        }
    }
    std::os::unix::fs::FileExt::write_all_at(file, data, offset)?;
    file.sync_data()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diocgmediasize_matches_freebsd_header() {
        // sys/disk.h: #define DIOCGMEDIASIZE _IOR('d', 129, off_t), 0x40086481 on amd64.
        assert_eq!(DIOCGMEDIASIZE, 0x4008_6481);
        // #define DIOCGSECTORSIZE _IOR('d', 128, u_int): 0x40000000 | 4 << 16 | 0x64 << 8 | 128.
        assert_eq!(DIOCGSECTORSIZE, 0x4004_6480);
    }

    #[test]
    fn ioc_inout_is_freebsd_iowr() {
        // _IOWR('m', 4, 56 bytes): IOC_INOUT 0xc0000000 | 56 << 16 | 'm' (0x6d) << 8 | 4.
        assert_eq!(ioc_inout(b'm', 4, 56), 0xc038_6d04);
        // The length is masked to 13 bits (IOCPARM_MASK).
        assert_eq!(ioc_inout(b'm', 0, 0x2000 + 8), 0xc008_6d00);
    }
}
