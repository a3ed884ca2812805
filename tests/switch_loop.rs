//! Root only: backend `none` on real loop-backed ext4 and xfs images, with a real service
//! process. Promote mounts and starts; demote stops and unmounts, killing the processes that
//! hold the mount; a corrupted filesystem rolls back; flapping events end in the last state.
//!
//! The tests take a file lock so that loop devices are set up one test at a time.

mod switch_util;

use std::fs::OpenOptions;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::fcntl::{Flock, FlockArg};
use switch_util::{Env, root_with};

/// Serialise the loop-device tests, in this binary and across test binaries.
fn serial() -> Flock<std::fs::File> {
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open("/tmp/tandem-tests-loop.lock")
        .expect("open loop test lock");
    Flock::lock(f, FlockArg::LockExclusive).expect("flock")
}

fn sh(cmd: &str) -> std::process::Output {
    Command::new("sh").arg("-c").arg(cmd).output().expect("sh")
}

/// A loop device over an image file; detached on drop.
struct Loop {
    dev: String,
}

impl Loop {
    fn new(image: &Path, size_mb: u64, mkfs: &str) -> Loop {
        let f = std::fs::File::create(image).unwrap();
        f.set_len(size_mb << 20).unwrap();
        drop(f);
        let out = sh(&format!("{mkfs} {} >/dev/null 2>&1", image.display()));
        assert!(out.status.success(), "{mkfs} failed");
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(image)
            .output()
            .unwrap();
        assert!(out.status.success(), "losetup: {out:?}");
        Loop {
            dev: String::from_utf8_lossy(&out.stdout).trim().to_string(),
        }
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
    }
}

/// Unmounts the mountpoints and kills the service on drop, even when a test fails.
struct Cleanup {
    mps: Vec<PathBuf>,
    pidfile: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Ok(p) = std::fs::read_to_string(&self.pidfile) {
            if let Ok(pid) = p.trim().parse::<i32>() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        for mp in &self.mps {
            for _ in 0..3 {
                if !mounted(mp) {
                    break;
                }
                let _ = Command::new("umount").arg(mp).status();
                if mounted(mp) {
                    // Whatever a failed test left holding it (fuser -k: SIGKILL).
                    let _ = Command::new("fuser").arg("-km").arg(mp).output();
                    std::thread::sleep(Duration::from_millis(100));
                    let _ = Command::new("umount").arg(mp).status();
                }
                if mounted(mp) {
                    let _ = Command::new("umount").arg("-l").arg(mp).status();
                }
            }
        }
    }
}

fn mounted(mp: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mp = mp.display().to_string();
    info.lines()
        .any(|l| l.split(' ').nth(4) == Some(mp.as_str()))
}

/// A service that keeps a process with its cwd on the mount; logs start/stop to `events`.
const SERVICE_SH: &str = r#"#!/bin/sh
D=$(dirname "$0")
MP=$2
case "$1" in
start)
	if grep -q " $MP " /proc/self/mountinfo; then m=mounted; else m=unmounted; fi
	echo "start $m" >> "$D/events"
	(cd "$MP" && exec sleep 1000) </dev/null >/dev/null 2>&1 &
	echo $! > "$D/svc.pid"
	;;
stop)
	pid=$(cat "$D/svc.pid" 2>/dev/null)
	rm -f "$D/svc.pid"
	if [ -n "$pid" ]; then
		kill "$pid" 2>/dev/null
		i=0
		while [ $i -lt 100 ] && [ -d "/proc/$pid/cwd" ] && [ "$(readlink /proc/$pid/cwd)" = "$MP" ]; do
			sleep 0.05; i=$((i + 1))
		done
	fi
	echo stop >> "$D/events"
	;;
status)
	[ -f "$D/svc.pid" ] && kill -0 "$(cat "$D/svc.pid")" 2>/dev/null
	;;
esac
"#;

// Fields drop in order: unmount, then detach the loop devices, then remove the temp dir.
struct Setup {
    _cleanup: Cleanup,
    loops: Vec<Loop>,
    mps: Vec<PathBuf>,
    env: Env,
}

impl Setup {
    /// One resource per (name, fstype, mkfs, corrupt) on its own loop device.
    fn new(resources: &[(&str, &str, &str, bool)], extra: &str) -> Setup {
        let env = Env::new();
        let svc = env.path().join("svc.sh");
        std::fs::write(&svc, SERVICE_SH).unwrap();
        std::fs::set_permissions(&svc, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut loops = Vec::new();
        let mut mps = Vec::new();
        let mut cfg = format!(
            "node = \"s1\"\n[switch]\nlock = \"@DIR@/switch.lock\"\nstop_timeout = \"3s\"\n\
             device_timeout = \"2s\"\n{extra}\n"
        );
        for (name, fstype, mkfs, corrupt) in resources {
            let img = env.path().join(format!("{name}.img"));
            let size = if *fstype == "xfs" { 320 } else { 64 };
            let l = Loop::new(&img, size, mkfs);
            if *corrupt {
                // Zero the ext superblock (offset 1024), through the device.
                let out = sh(&format!(
                    "dd if=/dev/zero of={} bs=1024 seek=1 count=1 conv=notrunc,fsync 2>/dev/null",
                    l.dev
                ));
                assert!(out.status.success());
            }
            let mp = env.path().join(format!("mnt-{name}"));
            cfg += &format!(
                "[resource.{name}]\nbackend = \"none\"\ndevice = \"{}\"\nmountpoint = \"{}\"\n\
                 fstype = \"{fstype}\"\nmount_options = \"noatime\"\n",
                l.dev,
                mp.display()
            );
            loops.push(l);
            mps.push(mp);
        }
        let first_mp = mps[0].display().to_string();
        cfg += &format!(
            "[[service]]\nname = \"svc\"\nmanager = \"command\"\n\
             start = \"{s} start {first_mp}\"\nstop = \"{s} stop {first_mp}\"\n\
             status = \"{s} status {first_mp}\"\n",
            s = svc.display()
        );
        env.write_config(&cfg);
        let cleanup = Cleanup {
            mps: mps.clone(),
            pidfile: env.path().join("svc.pid"),
        };
        Setup {
            _cleanup: cleanup,
            loops,
            mps,
            env,
        }
    }

    fn events(&self) -> String {
        self.env.read("events")
    }

    fn service_pid(&self) -> Option<i32> {
        self.env.read("svc.pid").trim().parse().ok()
    }
}

fn alive(pid: i32) -> bool {
    // A zombie (nobody reaped it yet) is dead for our purposes.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

fn promote_demote(fstype: &str, mkfs: &str) {
    let _serial = serial();
    let s = Setup::new(&[("r0", fstype, mkfs, false)], "");
    let e = &s.env;
    let r = e.run(&["promote"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(mounted(&s.mps[0]), "{r:?}");
    assert!(
        r.stderr.contains(&format!("mount {} on", s.loops[0].dev)),
        "{r:?}"
    );
    assert!(r.stderr.contains(&format!("({fstype}) ok in")), "{r:?}");
    let pid = s.service_pid().expect("service pid");
    assert!(alive(pid));
    assert_eq!(s.events(), "start mounted\n");
    std::fs::write(s.mps[0].join("data"), b"kept across switches").unwrap();

    // Already primary, mounted and running: nothing to do.
    let r = e.run(&["switch", "MASTER"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stderr.contains("skipped: already mounted"), "{r:?}");
    assert!(r.stderr.contains("skipped: already running"), "{r:?}");
    assert_eq!(s.service_pid(), Some(pid));
    assert_eq!(s.events(), "start mounted\n");

    let r = e.run(&["demote"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(!mounted(&s.mps[0]));
    assert!(!alive(pid));
    // The service stopped before the unmount: nobody had to be killed.
    assert!(!r.stderr.contains("SIGTERM"), "{r:?}");
    assert_eq!(s.events(), "start mounted\nstop\n");

    // Demoting again is a quick success.
    let r = e.run(&["switch", "BACKUP"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stderr.contains("not mounted"), "{r:?}");

    let r = e.run(&["promote"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(
        std::fs::read(s.mps[0].join("data")).unwrap(),
        b"kept across switches"
    );
    let r = e.run(&["demote"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(!mounted(&s.mps[0]));
}

#[test]
fn ext4_promote_mounts_and_starts_demote_stops_and_unmounts() {
    if !root_with(&["losetup", "mkfs.ext4", "e2fsck"]) {
        return;
    }
    promote_demote("ext4", "mkfs.ext4 -q -F");
}

#[test]
fn xfs_promote_mounts_and_starts_demote_stops_and_unmounts() {
    if !root_with(&["losetup", "mkfs.xfs"]) {
        return;
    }
    promote_demote("xfs", "mkfs.xfs -q -f");
}

fn wait_holding(child: &Child, mp: &Path) {
    let fds = format!("/proc/{}/", child.id());
    for _ in 0..500 {
        let cwd = std::fs::read_link(format!("{fds}cwd")).unwrap_or_default();
        let fd3 = std::fs::read_link(format!("{fds}fd/3")).unwrap_or_default();
        if cwd.starts_with(mp) || fd3.starts_with(mp) {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("the holder did not open the mount");
}

#[test]
fn demote_kills_the_processes_holding_the_mount() {
    if !root_with(&["losetup", "mkfs.ext4", "e2fsck"]) {
        return;
    }
    let _serial = serial();
    let s = Setup::new(&[("r0", "ext4", "mkfs.ext4 -q -F", false)], "");
    let e = &s.env;
    let r = e.run(&["promote"]);
    assert_eq!(r.code, 0, "{r:?}");
    let mp = s.mps[0].clone();
    std::fs::write(mp.join("file"), b"x").unwrap();
    // One holder with an open file, one that ignores TERM and sits in the mount.
    let mut polite = Command::new("sh")
        .arg("-c")
        .arg(format!("exec 3<{}/file; exec sleep 1000", mp.display()))
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let mut stubborn = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "trap '' TERM; cd {} && exec sleep 1000",
            mp.display()
        ))
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    wait_holding(&polite, &mp);
    wait_holding(&stubborn, &mp);

    let r = e.run(&["switch", "LINK_DOWN"]);
    let polite_status = polite.wait().unwrap();
    let stubborn_status = stubborn.wait().unwrap();
    assert_eq!(r.code, 0, "{r:?}");
    assert!(!mounted(&mp), "{r:?}");
    assert!(r.stderr.contains("is busy"), "{r:?}");
    assert!(r.stderr.contains("SIGTERM"), "{r:?}");
    assert!(r.stderr.contains("SIGKILL"), "{r:?}");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(polite_status.signal(), Some(15));
    assert_eq!(stubborn_status.signal(), Some(9));
    assert_eq!(s.events(), "start mounted\nstop\n");
}

#[test]
fn corrupted_filesystem_fails_and_rolls_back() {
    if !root_with(&["losetup", "mkfs.ext4", "e2fsck"]) {
        return;
    }
    let _serial = serial();
    let s = Setup::new(
        &[
            ("a", "ext4", "mkfs.ext4 -q -F", false),
            ("b", "ext4", "mkfs.ext4 -q -F", true),
        ],
        "on_promote_failure = \"echo $TANDEM_RESOURCE > @DIR@/hook\"",
    );
    let e = &s.env;
    let r = e.run(&["switch", "master"]);
    assert_eq!(r.code, 1, "{r:?}");
    let last = r.stderr.lines().last().unwrap_or_default();
    let fsck = format!("e2fsck -p {}", s.loops[1].dev);
    assert!(last.contains(&format!("promote b: {fsck} failed")), "{r:?}");
    assert!(
        last.contains(&format!("`{fsck}` exited with status 8")),
        "{r:?}"
    );
    // The resources come up in parallel: a may have been mounted before b's fsck failed, or
    // not yet; either way the rollback leaves it unmounted. b never mounted; no service started.
    if r.stderr.contains("promote a: mount") {
        assert!(r.stderr.contains("rollback a: unmount"), "{r:?}");
    }
    assert!(!mounted(&s.mps[0]));
    assert!(!mounted(&s.mps[1]));
    assert_eq!(s.events(), "");
    assert!(s.service_pid().is_none());
    assert_eq!(e.read("hook").trim(), "b");
}

#[test]
fn flapping_events_from_many_processes_end_in_the_last_state() {
    if !root_with(&["losetup", "mkfs.ext4", "e2fsck"]) {
        return;
    }
    let _serial = serial();
    let s = Setup::new(&[("r0", "ext4", "mkfs.ext4 -q -F", false)], "");
    let mp = s.mps[0].clone();
    let f = switch_util::flap(&s.env, 10, 10, move || mounted(&mp));
    assert_eq!(mounted(&s.mps[0]), f.last_word == "master");
    let running = s.service_pid().is_some_and(alive);
    assert_eq!(running, f.last_word == "master");
    let events = s.events();
    let last_event = events.lines().last().unwrap_or("");
    if f.last_word == "master" {
        assert_eq!(last_event, "start mounted", "{events}");
    } else {
        assert!(last_event == "stop" || events.is_empty(), "{events}");
    }
    // The service never started without its filesystem.
    assert!(!events.contains("start unmounted"), "{events}");
}
