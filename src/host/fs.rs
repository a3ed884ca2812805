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

/// The mount table, in mount order.
pub fn mounts() -> Result<Vec<MountEntry>> {
    if cfg!(target_os = "linux") {
        let text = std::fs::read_to_string("/proc/self/mountinfo")
            .context("cannot read /proc/self/mountinfo")?;
        Ok(parse_mountinfo(&text))
    } else {
        // `mount -p` prints fstab lines: source target fstype options dump pass.
        let out = Cmd::new("mount", &["-p"]).run()?;
        Ok(out
            .stdout
            .lines()
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                Some(MountEntry {
                    source: unescape(f.next()?),
                    target: PathBuf::from(unescape(f.next()?)),
                    fstype: f.next()?.to_string(),
                })
            })
            .collect())
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

/// The processes that have a file, directory or mapping open on the filesystem at `mp`.
#[cfg(not(target_os = "linux"))]
pub fn holders(mp: &Path) -> Result<Vec<i32>> {
    // FreeBSD: fuser -c prints the pids on stdout (the names on stderr).
    let out = Cmd::new("fuser", &["-c", &mp.display().to_string()]).output()?;
    Ok(out
        .stdout
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect())
}

/// The processes that have a file, directory or mapping open on the filesystem at `mp`:
/// every /proc/PID whose cwd, root, exe, open file or mapped file lives on its device.
#[cfg(target_os = "linux")]
pub fn holders(mp: &Path) -> Result<Vec<i32>> {
    let dev = nix::sys::stat::stat(mp)
        .with_context(|| format!("stat {}", mp.display()))?
        .st_dev;
    let (maj, min) = (nix::sys::stat::major(dev), nix::sys::stat::minor(dev));
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
