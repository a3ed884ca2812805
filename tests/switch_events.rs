//! `tandem switch` as devd, keepalived and ucarp call it; the carp filter; --dry-run;
//! newest-event-wins. Backend hast with ZFS pools, on fakes: no root needed.

mod switch_util;

use std::fs::OpenOptions;
use std::time::Duration;

use nix::fcntl::{Flock, FlockArg};
use switch_util::{EVENT_SERVICE, Env};

/// r1 follows CARP 1@em0, r2 follows 2@em0, r3 follows every event.
fn env() -> Env {
    let e = Env::new();
    e.write_config(&format!(
        r#"
node = "s1"
[switch]
lock = "@DIR@/switch.lock"
role_timeout = "2s"
device_timeout = "2s"
{EVENT_SERVICE}
resources = ["r3"]
[resource.r1]
backend = "hast"
carp = "1@em0"
device = "@STATE@/dev/r1"
fstype = "zfs"
pool = "p1"
[resource.r2]
backend = "hast"
carp = "2@em0"
device = "@STATE@/dev/r2"
fstype = "zfs"
pool = "p2"
[resource.r3]
backend = "hast"
device = "@STATE@/dev/r3"
fstype = "zfs"
pool = "p3"
"#
    ));
    for r in ["r1", "r2", "r3"] {
        e.set(&format!("hast/{r}/role"), "secondary");
    }
    e
}

fn roles(e: &Env) -> Vec<String> {
    ["r1", "r2", "r3"]
        .iter()
        .map(|r| e.get(&format!("hast/{r}/role")).unwrap_or_default())
        .collect()
}

fn imported(e: &Env) -> Vec<bool> {
    ["p1", "p2", "p3"]
        .iter()
        .map(|p| e.exists(&format!("zpool/{p}/imported")))
        .collect()
}

#[test]
fn devd_carp_event_switches_only_matching_resources() {
    let e = env();
    let r = e.run(&["switch", "1@em0", "MASTER"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(roles(&e), ["primary", "secondary", "primary"]);
    assert_eq!(imported(&e), [true, false, true]);
    assert_eq!(e.read("events"), "start\n");
    let r = e.run(&["switch", "2@em0", "MASTER"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(roles(&e), ["primary", "primary", "primary"]);
    let r = e.run(&["switch", "1@em0", "BACKUP"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(roles(&e), ["secondary", "primary", "secondary"]);
    assert_eq!(imported(&e), [false, true, false]);
    assert_eq!(e.read("events"), "start\nstop\n");
    // An event for a VHID no resource has touches only the resources without carp.
    let r = e.run(&["switch", "9@em1", "MASTER"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(roles(&e), ["secondary", "primary", "primary"]);
}

#[test]
fn keepalived_ucarp_and_legacy_devd_conventions() {
    let e = env();
    let r = e.run(&["switch", "master", "eth0", "198.18.0.10"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(roles(&e), ["primary"; 3]);
    assert_eq!(imported(&e), [true; 3]);
    let r = e.run(&["switch", "INSTANCE", "VI_1", "BACKUP", "100"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(roles(&e), ["secondary"; 3]);
    assert_eq!(imported(&e), [false; 3]);
    let r = e.run(&["switch", "LINK_UP"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(roles(&e), ["primary"; 3]);
    let r = e.run(&["switch", "LINK_DOWN"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(roles(&e), ["secondary"; 3]);
    assert_eq!(imported(&e), [false; 3]);
    assert_eq!(e.read("events"), "start\nstop\nstart\nstop\n");
}

#[test]
fn no_state_word_is_a_usage_error() {
    let e = env();
    let r = e.run(&["switch", "INSTANCE", "VI_1", "100"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains("no state word"), "{r:?}");
    assert_eq!(e.calls(), "");
    assert!(!e.path().join("switch.lock").exists());
}

#[test]
fn dry_run_prints_every_step_and_changes_nothing() {
    let e = env();
    let r = e.run(&["switch", "--dry-run", "1@em0", "MASTER"]);
    assert_eq!(r.code, 0, "{r:?}");
    let lines: Vec<&str> = r.stdout.lines().filter(|l| !l.starts_with('#')).collect();
    assert!(lines.contains(&"hastctl role primary r1"), "{}", r.stdout);
    let import = format!(
        "zpool import -o cachefile=none -d {} -f p1",
        e.state().join("dev/r1").display()
    );
    assert!(lines.contains(&import.as_str()), "{}", r.stdout);
    assert!(lines.contains(&"hastctl role primary r3"), "{}", r.stdout);
    assert!(!r.stdout.contains("r2"), "{}", r.stdout);
    assert!(
        lines.contains(
            &"echo start >> @DIR@/events; touch @DIR@/share.running"
                .replace("@DIR@", &e.path().display().to_string())
                .as_str()
        ),
        "{}",
        r.stdout
    );
    // Options after the event words are options, not event words.
    let r = e.run(&["switch", "master", "eth0", "--dry-run"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(
        r.stdout.contains("hastctl role primary r2\n"),
        "{}",
        r.stdout
    );
    let r = e.run(&["demote", "--dry-run"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(
        r.stdout
            .contains("zpool export p3\nhastctl role secondary r3\n"),
        "{}",
        r.stdout
    );
    assert_eq!(roles(&e), ["secondary"; 3]);
    assert!(!e.calls().contains("role"), "{}", e.calls());
    assert!(!e.calls().contains("import"), "{}", e.calls());
    assert!(!e.path().join("switch.lock").exists());
    assert_eq!(e.read("events"), "");
}

#[test]
fn a_waiting_event_superseded_by_a_newer_one_exits_75() {
    let e = env();
    let lock = e.path().join("switch.lock");
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock)
        .unwrap();
    // Another switch holds the lock.
    let held = Flock::lock(f, FlockArg::LockExclusive).unwrap();
    let mut older = e.command(&["switch", "master"]).spawn().unwrap();
    // Wait until the older event is recorded, then send the newer one.
    for _ in 0..500 {
        if e.read("switch.lock.seq").contains("next 1") {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let newer = e
        .command(&["switch", "slave"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let older = older.wait().unwrap();
    assert_eq!(older.code(), Some(75));
    assert_eq!(roles(&e), ["secondary"; 3]);
    drop(held);
    let newer = newer.wait_with_output().unwrap();
    assert_eq!(newer.status.code(), Some(0));
    assert!(!e.calls().contains("role primary"), "{}", e.calls());
}

#[test]
fn flapping_events_end_in_the_last_state() {
    let e = env();
    let state = e.state();
    let f = switch_util::flap(&e, 10, 10, move || state.join("zpool/p3/imported").exists());
    let master = f.last_word == "master";
    assert_eq!(imported(&e), [master; 3]);
    assert_eq!(roles(&e), [if master { "primary" } else { "secondary" }; 3]);
    assert_eq!(e.path().join("share.running").exists(), master);
}
