//! Filesystems: the mount table, fsck, mount, and unmount with the processes that hold it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use log::{info, warn};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::cmd::Cmd;
use crate::config::{FsType, FsckMode};

/// One line of the mount table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub source: String,
    pub target: PathBuf,
    pub fstype: String,
}

/// `\040` and friends, as the kernel escapes them in mount tables.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parse /proc/self/mountinfo.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let target = left.split(' ').nth(4)?;
            let mut r = right.split(' ');
            let fstype = r.next()?;
            let source = r.next()?;
            Some(MountEntry {
                source: unescape(source),
                target: PathBuf::from(unescape(target)),
                fstype: fstype.to_string(),
            })
        })
        .collect()
}

/// Parse `mount -p` (FreeBSD): one fstab(5)-style line per mounted filesystem, as printed by
/// putfsent() in sbin/mount/mount.c (FreeBSD 13 and 14 alike):
///
/// ```text
/// printf("%s%s%s%s", from, l < 8 ? "\t" : "", l < 16 ? "\t" : "", l < 24 ? "\t" : " ");
/// printf("%s%s%s%s", on,   (the same padding));
/// printf("%s\t", fstype); printf("%s%s", opts, l < 8 ? "\t" : " "); printf("\t%u %u\n", ...);
/// ```
///
/// The names are printed raw, not escaped (unlike Linux's `\040`), so a mount point may hold
/// spaces: the line is taken apart from its right end, where the fields never do, and the
/// source ends at the first tab (or, for a source of 24 bytes or more, at its one space).
pub fn parse_mount_p(text: &str) -> Result<Vec<MountEntry>> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            parse_mount_p_line(l).with_context(|| format!("`mount -p` line {}: {l:?}", i + 1))
        })
        .collect()
}

fn parse_mount_p_line(line: &str) -> Result<MountEntry> {
    let (rest, dump_pass) = line
        .rsplit_once('\t')
        .context("no tab before the dump and pass numbers")?;
    let numbers: Vec<&str> = dump_pass.split(' ').collect();
    if numbers.len() != 2 || numbers.iter().any(|n| n.parse::<u32>().is_err()) {
        anyhow::bail!("expected the dump and pass numbers at the end, found {dump_pass:?}");
    }
    let (rest, opts) = rest
        .trim_end_matches(['\t', ' '])
        .rsplit_once('\t')
        .context("no tab between the filesystem type and the options")?;
    if opts.is_empty() || opts.contains(' ') {
        anyhow::bail!("bad mount options {opts:?}");
    }
    let (rest, fstype) = rest
        .rsplit_once(['\t', ' '])
        .context("no mount point before the filesystem type")?;
    if fstype.is_empty() {
        anyhow::bail!("empty filesystem type");
    }
    let rest = rest.trim_end_matches('\t');
    let (source, target) = match rest.split_once('\t') {
        Some((source, target)) => (source, target.trim_start_matches('\t')),
        // A source of 24 bytes or more is followed by one space, and a mount point is absolute.
        None => rest
            .char_indices()
            .find(|&(i, c)| c == ' ' && i >= 24 && rest[i + 1..].starts_with('/'))
            .map(|(i, _)| (&rest[..i], &rest[i + 1..]))
            .context("cannot tell the source from the mount point")?,
    };
    if source.is_empty() || !target.starts_with('/') {
        anyhow::bail!("expected a source and an absolute mount point, found {rest:?}");
    }
    Ok(MountEntry {
        source: source.to_string(),
        target: PathBuf::from(target),
        fstype: fstype.to_string(),
    })
}

/// The mount table, in mount order.
pub fn mounts() -> Result<Vec<MountEntry>> {
    if cfg!(target_os = "linux") {
        let text = std::fs::read_to_string("/proc/self/mountinfo")
            .context("cannot read /proc/self/mountinfo")?;
        Ok(parse_mountinfo(&text))
    } else {
        parse_mount_p(&Cmd::new("mount", &["-p"]).run()?.stdout)
    }
}

/// What is mounted on `mp` (the topmost mount), if anything.
pub fn mounted_at(mp: &Path) -> Result<Option<MountEntry>> {
    let canon = std::fs::canonicalize(mp).unwrap_or_else(|_| mp.to_path_buf());
    Ok(mounts()?
        .into_iter()
        .rev()
        .find(|m| m.target == mp || m.target == canon))
}

/// Is `device` mounted anywhere? (Before fsck: never check a mounted filesystem.)
pub fn device_mounted(device: &Path) -> Result<Option<MountEntry>> {
    let canon = std::fs::canonicalize(device).unwrap_or_else(|_| device.to_path_buf());
    Ok(mounts()?
        .into_iter()
        .find(|m| Path::new(&m.source) == device || Path::new(&m.source) == canon))
}

/// The fsck for a filesystem, and the highest exit status that still means success.
pub struct Fsck {
    pub cmd: Cmd,
    pub max_ok: i32,
}

/// The check `fsck = mode` asks for on `fstype`, if any.
pub fn fsck_for(mode: FsckMode, fstype: FsType, device: &Path) -> Option<Fsck> {
    let dev = device.display().to_string();
    let (args, max_ok): (Vec<&str>, i32) = match (mode, fstype) {
        (FsckMode::Never, _) | (_, FsType::Zfs) => return None,
        // As the seed script did on FreeBSD: preen, answer yes.
        (FsckMode::Auto, FsType::Ufs) => (vec!["fsck", "-p", "-y", "-t", "ufs"], 3),
        (FsckMode::Auto, FsType::Ext2 | FsType::Ext3 | FsType::Ext4) => (vec!["e2fsck", "-p"], 3),
        (FsckMode::Auto, FsType::Xfs | FsType::Btrfs) => return None,
        (FsckMode::Always, FsType::Ufs) => (vec!["fsck", "-y", "-t", "ufs"], 3),
        (FsckMode::Always, FsType::Ext2 | FsType::Ext3 | FsType::Ext4) => {
            (vec!["e2fsck", "-f", "-y"], 3)
        }
        (FsckMode::Always, FsType::Xfs) => (vec!["xfs_repair"], 0),
        (FsckMode::Always, FsType::Btrfs) => (vec!["btrfs", "check"], 0),
    };
    let mut cmd = Cmd::new(args[0], &args[1..]).timeout(None);
    cmd = cmd.arg(dev);
    Some(Fsck { cmd, max_ok })
}

/// `mount -t TYPE [-o OPTS] DEV MP`.
pub fn mount_cmd(fstype: FsType, options: &str, device: &Path, mp: &Path) -> Cmd {
    let mut c = Cmd::new("mount", &["-t", &fstype.to_string()]);
    if !options.trim().is_empty() {
        c = c.arg("-o").arg(options.trim());
    }
    c.arg(device.display().to_string())
        .arg(mp.display().to_string())
}

/// Unmount `mp`: plain first; then TERM and KILL the processes holding it within
/// `stop_timeout`; then `umount -f` as the last resort. Fails if it is still mounted.
pub fn unmount(mp: &Path, stop_timeout: Duration, cmd_timeout: Duration) -> Result<()> {
    let mpd = mp.display().to_string();
    let umount = Cmd::new("umount", &[&mpd]).timeout(Some(cmd_timeout));
    if mounted_at(mp)?.is_none() {
        return Ok(());
    }
    let first = match umount.run() {
        Ok(_) if mounted_at(mp)?.is_none() => return Ok(()),
        Ok(_) => anyhow::anyhow!("{mpd} is still mounted after `umount {mpd}`"),
        Err(e) => e,
    };
    info!("{mpd} is busy ({first:#}); stopping the processes that hold it");
    let deadline = Instant::now() + stop_timeout;
    let term_until = Instant::now() + stop_timeout / 2;
    let mut signal = Signal::SIGTERM;
    loop {
        let holders = holders(mp)?;
        if holders.is_empty() {
            break;
        }
        if signal == Signal::SIGTERM && Instant::now() >= term_until {
            signal = Signal::SIGKILL;
        }
        for &pid in &holders {
            if pid == std::process::id() as i32 {
                continue;
            }
            warn!(
                "{mpd}: sending {signal} to pid {pid} ({}) that holds it",
                comm(pid)
            );
            let _ = kill(Pid::from_raw(pid), signal);
        }
        if Instant::now() >= deadline {
            break;
        }
        // Give them a moment, then look again.
        let wait_until = (Instant::now() + Duration::from_millis(200)).min(deadline);
        while Instant::now() < wait_until {
            std::thread::sleep(Duration::from_millis(20));
            if holders_alive(&holders) == 0 {
                break;
            }
        }
    }
    match umount.run() {
        Ok(_) if mounted_at(mp)?.is_none() => return Ok(()),
        Ok(_) => {}
        Err(e) => warn!("{e:#}; trying umount -f"),
    }
    let force = Cmd::new("umount", &["-f", &mpd]).timeout(Some(cmd_timeout));
    let res = force.run();
    if mounted_at(mp)?.is_none() {
        return Ok(());
    }
    match res {
        Err(e) => Err(e.context(format!("{mpd} is still mounted"))),
        Ok(_) => anyhow::bail!("{mpd} is still mounted after `umount -f {mpd}`"),
    }
}

fn holders_alive(pids: &[i32]) -> usize {
    pids.iter()
        .filter(|&&p| {
            if !cfg!(target_os = "linux") {
                return kill(Pid::from_raw(p), None).is_ok();
            }
            // A zombie holds nothing: count it as gone.
            match std::fs::read_to_string(format!("/proc/{p}/stat")) {
                Ok(s) => !s
                    .rsplit_once(')')
                    .is_some_and(|(_, r)| r.trim_start().starts_with('Z')),
                Err(_) => false,
            }
        })
        .count()
}

fn comm(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into())
}

/// The access letters fuser(1) prints after a pid: usr.bin/fstat/fuser.c, uflags[] then fflags[].
const FUSER_LETTERS: &str = "rcjtxmywadse";

/// Parse the stdout of FreeBSD's `fuser -c MP`. usr.bin/fstat/fuser.c prints each pid as
/// `fprintf(stdout, "%6d", pid)` and the access letters and names on stderr, so stdout is
/// only space-padded pids; letters glued to a pid (`1234c`, both streams in one) are
/// accepted too. Anything else is an error: a misread pid would be killed.
pub fn parse_fuser(stdout: &str) -> Result<Vec<i32>> {
    stdout
        .split_whitespace()
        .map(|word| {
            let digits = word.trim_end_matches(|c| FUSER_LETTERS.contains(c));
            digits
                .parse::<i32>()
                .ok()
                .filter(|&pid| pid > 0)
                .with_context(|| format!("`fuser -c` printed {word:?} where a pid belongs"))
        })
        .collect()
}

/// The processes that have a file, directory or mapping open on the filesystem at `mp`.
pub fn holders(mp: &Path) -> Result<Vec<i32>> {
    if cfg!(target_os = "linux") {
        proc_holders(mp)
    } else {
        // -c: the whole filesystem mounted at MP; -m: mapped files too, as /proc/PID/maps.
        let out = Cmd::new("fuser", &["-c", "-m", &mp.display().to_string()]).run()?;
        parse_fuser(&out.stdout).with_context(|| format!("processes holding {}", mp.display()))
    }
}

/// Linux's major and minor of a device number (glibc's gnu_dev_major/gnu_dev_minor), to
/// match the MAJ:MIN of /proc/PID/maps.
fn linux_major_minor(dev: nix::libc::dev_t) -> (u64, u64) {
    (
        ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff),
        (dev & 0xff) | ((dev >> 12) & !0xff),
    )
}

/// The processes that have a file, directory or mapping open on the filesystem at `mp`:
/// every /proc/PID whose cwd, root, exe, open file or mapped file lives on its device.
fn proc_holders(mp: &Path) -> Result<Vec<i32>> {
    let dev = nix::sys::stat::stat(mp)
        .with_context(|| format!("stat {}", mp.display()))?
        .st_dev;
    let (maj, min) = linux_major_minor(dev);
    let me = std::process::id() as i32;
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Ok(out);
    };
    let on_dev = |p: &Path| nix::sys::stat::stat(p).is_ok_and(|st| st.st_dev == dev);
    // /proc/PID/maps: "addr perms offset MAJ:MIN inode path", MAJ:MIN in hex.
    let maps_on_dev = |maps: &str| {
        maps.lines().any(|l| {
            l.split_whitespace()
                .nth(3)
                .and_then(|d| d.split_once(':'))
                .is_some_and(|(a, b)| {
                    u64::from_str_radix(a, 16).ok() == Some(maj)
                        && u64::from_str_radix(b, 16).ok() == Some(min)
                })
        })
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let base = e.path();
        let hit = ["cwd", "root", "exe"].iter().any(|l| on_dev(&base.join(l)))
            || std::fs::read_dir(base.join("fd"))
                .is_ok_and(|fds| fds.flatten().any(|fd| on_dev(&fd.path())))
            || std::fs::read_to_string(base.join("maps")).is_ok_and(|m| maps_on_dev(&m));
        if hit {
            out.push(pid);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_parsing() {
        let t = "36 35 98:0 /mnt1 /mnt/with\\040space rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n\
                 43 27 7:0 / /tmp/tm rw,relatime - ext4 /dev/loop0 rw\n";
        let m = parse_mountinfo(t);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].target, PathBuf::from("/mnt/with space"));
        assert_eq!(m[0].fstype, "ext3");
        assert_eq!(m[1].source, "/dev/loop0");
    }

    /// `mount -p` on a FreeBSD 14 ZFS-on-root install with a HAST resource mounted, as
    /// putfsent() in sbin/mount/mount.c prints it (tab padding to 8/16/24 columns, options
    /// padded to 8, then "\tDUMP PASS"; FreeBSD 13 prints the same).
    const MOUNT_P_ZFS: &str = "zroot/ROOT/default\t/\t\t\tzfs\trw,noatime,nfsv4acls \t0 0\n\
        devfs\t\t\t/dev\t\t\tdevfs\trw\t\t0 0\n\
        tmpfs\t\t\t/tmp\t\t\ttmpfs\trw,nosuid \t0 0\n\
        zroot/usr/home\t\t/usr/home\t\tzfs\trw,noatime,nfsv4acls \t0 0\n\
        fdescfs\t\t\t/dev/fd\t\t\tfdescfs\trw\t\t0 0\n\
        /dev/hast/shared\t/export\t\t\tufs\trw\t\t2 2\n";

    /// The same on a UFS install; names with spaces are printed raw (no `\040`), and a name of
    /// 24 bytes or more is followed by one space instead of tabs.
    const MOUNT_P_UFS: &str = "/dev/ada0p2\t\t/\t\t\tufs\trw\t\t1 1\n\
        devfs\t\t\t/dev\t\t\tdevfs\trw\t\t0 0\n\
        /dev/hast/shared\t/export/Shared Docs\tufs\trw,noatime \t2 2\n\
        /dev/gpt/a-very-long-label-name /mnt/a very long mount point name ufs\tro\t\t0 0\n";

    #[test]
    fn mount_p_zfs_root() {
        let m = parse_mount_p(MOUNT_P_ZFS).unwrap();
        let got: Vec<(&str, &Path, &str)> = m
            .iter()
            .map(|e| (e.source.as_str(), e.target.as_path(), e.fstype.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("zroot/ROOT/default", Path::new("/"), "zfs"),
                ("devfs", Path::new("/dev"), "devfs"),
                ("tmpfs", Path::new("/tmp"), "tmpfs"),
                ("zroot/usr/home", Path::new("/usr/home"), "zfs"),
                ("fdescfs", Path::new("/dev/fd"), "fdescfs"),
                ("/dev/hast/shared", Path::new("/export"), "ufs"),
            ]
        );
    }

    #[test]
    fn mount_p_ufs_and_spaces() {
        let m = parse_mount_p(MOUNT_P_UFS).unwrap();
        assert_eq!(m.len(), 4);
        assert_eq!(
            (m[0].source.as_str(), m[0].fstype.as_str()),
            ("/dev/ada0p2", "ufs")
        );
        assert_eq!(m[2].source, "/dev/hast/shared");
        assert_eq!(m[2].target, PathBuf::from("/export/Shared Docs"));
        assert_eq!(m[3].source, "/dev/gpt/a-very-long-label-name");
        assert_eq!(
            m[3].target,
            PathBuf::from("/mnt/a very long mount point name")
        );
        assert_eq!(m[3].fstype, "ufs");
        // Raw, not escaped: a backslash in a name stays a backslash.
        let m = parse_mount_p("/dev/md0\t\t/mnt/a\\040b\t\tufs\trw\t\t2 2\n").unwrap();
        assert_eq!(m[0].target, PathBuf::from("/mnt/a\\040b"));
    }

    #[test]
    fn mount_p_malformed() {
        let e = |t: &str| format!("{:#}", parse_mount_p(t).unwrap_err());
        // The Linux `mount` listing is not `mount -p`.
        let msg = e("/dev/sda1 on / type ext4 (rw,relatime)\n");
        assert!(msg.contains("`mount -p` line 1"), "{msg}");
        assert!(msg.contains("no tab"), "{msg}");
        // Truncated before the dump and pass numbers.
        let msg = e("devfs\t\t\t/dev\t\t\tdevfs\trw\t\t0 0\n/dev/ada0p2\t\t/\t\t\tufs\trw");
        assert!(msg.contains("line 2"), "{msg}");
        assert!(msg.contains("dump and pass"), "{msg}");
        // No options.
        let msg = e("devfs\t/dev devfs\t\t0 0\n");
        assert!(msg.contains("line 1"), "{msg}");
        // A relative mount point.
        let msg = e("devfs\t\t\tdev\t\t\tdevfs\trw\t\t0 0\n");
        assert!(msg.contains("absolute mount point"), "{msg}");
        // Blank lines are no entries, not errors.
        assert!(parse_mount_p("\n\n").unwrap().is_empty());
    }

    /// `fuser -c /export` with three processes on the filesystem: fuser.c writes the pids
    /// with "%6d" on stdout and the names and access letters on stderr
    /// (listings like "/export:  1234c  5678rw" are the two streams merged).
    #[test]
    fn fuser_output() {
        assert_eq!(
            parse_fuser("  1234  5678 98765").unwrap(),
            [1234, 5678, 98765]
        );
        // Merged with stderr's letters (r c j t x m y w a d s e).
        assert_eq!(parse_fuser("  1234c  5678rw\n").unwrap(), [1234, 5678]);
        // Nobody holds it.
        assert!(parse_fuser("").unwrap().is_empty());
    }

    #[test]
    fn fuser_malformed() {
        let e = |t: &str| format!("{:#}", parse_fuser(t).unwrap_err());
        // The name prefix belongs to stderr; on stdout it means the streams are mixed up.
        assert!(e("/export:  1234c").contains("\"/export:\""));
        assert!(e("  1234  12o4").contains("\"12o4\""));
        assert!(e("  -1").contains("where a pid belongs"));
        assert!(e("  0").contains("\"0\""));
    }

    #[test]
    fn linux_device_numbers() {
        // makedev(259, 1) and makedev(8, 300), as glibc encodes them.
        assert_eq!(linux_major_minor(0x10301), (259, 1));
        assert_eq!(linux_major_minor(1_050_668), (8, 300));
    }

    #[test]
    fn fsck_commands() {
        let d = Path::new("/dev/hast/hast0");
        let line = |m, t| fsck_for(m, t, d).map(|f| f.cmd.line());
        assert_eq!(
            line(FsckMode::Auto, FsType::Ufs).as_deref(),
            Some("fsck -p -y -t ufs /dev/hast/hast0")
        );
        assert_eq!(
            line(FsckMode::Auto, FsType::Ext4).as_deref(),
            Some("e2fsck -p /dev/hast/hast0")
        );
        assert_eq!(line(FsckMode::Auto, FsType::Xfs), None);
        assert_eq!(line(FsckMode::Always, FsType::Zfs), None);
        assert_eq!(
            line(FsckMode::Always, FsType::Xfs).as_deref(),
            Some("xfs_repair /dev/hast/hast0")
        );
        assert_eq!(line(FsckMode::Never, FsType::Ext4), None);
    }

    #[test]
    fn mount_command() {
        let c = mount_cmd(
            FsType::Ext4,
            "noatime",
            Path::new("/dev/x"),
            Path::new("/mnt/x"),
        );
        assert_eq!(c.line(), "mount -t ext4 -o noatime /dev/x /mnt/x");
        let c = mount_cmd(FsType::Xfs, "", Path::new("/dev/x"), Path::new("/mnt/x"));
        assert_eq!(c.line(), "mount -t xfs /dev/x /mnt/x");
    }
}
