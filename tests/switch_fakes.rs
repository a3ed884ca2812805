//! The hast and drbd backends against fakes of hastctl, drbdadm, drbdsetup and zpool
//! (tests/fakes): waiting for the peer, refusals (exit 3), failing role changes (exit 1 and
//! rollback). ZFS pools stand in for filesystems so that no root is needed.

mod switch_util;

use std::os::unix::process::CommandExt;
use std::process::{Child, Command};

use switch_util::{EVENT_SERVICE, Env};

fn hast_env(role_timeout: &str) -> Env {
    let e = Env::new();
    e.write_config(&format!(
        r#"
node = "s1"
[switch]
lock = "@DIR@/switch.lock"
role_timeout = "{role_timeout}"
device_timeout = "2s"
on_promote_failure = "echo \"$TANDEM_RESOURCE\" > @DIR@/failure-hook"
{EVENT_SERVICE}
[resource.hast0]
backend = "hast"
device = "@STATE@/dev/hast0"
fstype = "zfs"
pool = "tank0"
[resource.hast1]
backend = "hast"
device = "@STATE@/dev/hast1"
fstype = "zfs"
pool = "tank1"
"#
    ));
    e.set("hast/hast0/role", "secondary");
    e.set("hast/hast1/role", "secondary");
    e
}

/// A process that looks like hastd's secondary worker (`hastd: RES (secondary)`).
struct Worker(Child);

impl Worker {
    fn start(res: &str, secs: u32) -> Worker {
        let c = Command::new("sleep")
            .arg0(format!("hastd: {res} (secondary)"))
            .arg(secs.to_string())
            .spawn()
            .expect("spawn sleep");
        Worker(c)
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn hast_promote_demote_and_idempotence() {
    let e = hast_env("5s");
    let r = e.run(&["promote"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(e.get("hast/hast0/role").as_deref(), Some("primary"));
    assert_eq!(e.get("hast/hast1/role").as_deref(), Some("primary"));
    assert!(e.exists("zpool/tank0/imported") && e.exists("zpool/tank1/imported"));
    assert_eq!(e.read("events"), "start\n");
    let calls = e.calls();
    assert!(calls.contains("hastctl role primary hast0\n"), "{calls}");
    let import = format!(
        "zpool import -o cachefile=none -d {} -f tank0\n",
        e.state().join("dev/hast0").display()
    );
    assert!(calls.contains(&import), "{calls}");
    assert!(
        r.stderr.contains("promote hast0: import pool tank0 ok in"),
        "{r:?}"
    );

    let s = e.run(&["status", "--json"]);
    assert_eq!(s.code, 0, "{s:?}");
    let v: serde_json::Value = serde_json::from_str(&s.stdout).unwrap();
    assert_eq!(v["node"], "s1");
    assert_eq!(v["resources"][0]["name"], "hast0");
    assert_eq!(v["resources"][0]["backend"], "hast");
    assert_eq!(v["resources"][0]["role"], "primary");
    assert_eq!(v["resources"][0]["connection"], "connected");
    assert_eq!(v["resources"][0]["state"], "complete");
    assert_eq!(v["resources"][0]["dirty_bytes"], 0);
    assert_eq!(v["resources"][0]["device_present"], true);
    assert_eq!(v["resources"][0]["mounted"], true);
    assert_eq!(v["services"][0]["name"], "share");
    assert_eq!(v["services"][0]["active"], true);
    let t = e.run(&["status"]);
    assert!(t.stdout.contains("hast0"), "{t:?}");
    assert!(t.stdout.contains("primary"), "{t:?}");
    assert!(
        t.stdout.contains("last switch event: #1 master (done)"),
        "{t:?}"
    );

    // Promoting again changes nothing.
    e.clear_calls();
    let r = e.run(&["promote"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(!e.calls().contains("role primary"), "{}", e.calls());
    assert!(!e.calls().contains("import"), "{}", e.calls());
    assert!(r.stderr.contains("already primary"), "{r:?}");
    assert_eq!(e.read("events"), "start\n");

    let r = e.run(&["demote"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(e.get("hast/hast0/role").as_deref(), Some("secondary"));
    assert!(!e.exists("zpool/tank0/imported") && !e.exists("zpool/tank1/imported"));
    assert_eq!(e.read("events"), "start\nstop\n");
    // Services stop before the pools go, and roles change after.
    let calls = e.calls();
    let export = calls.find("zpool export tank0").unwrap();
    let role = calls.find("hastctl role secondary hast0").unwrap();
    assert!(export < role, "{calls}");

    // Demoting a secondary is a quick success.
    e.clear_calls();
    let r = e.run(&["demote"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(!e.calls().contains("role secondary"), "{}", e.calls());
}

#[test]
fn hast_waits_for_the_secondary_worker_to_exit() {
    let e = hast_env("20s");
    let _w = Worker::start("hast0", 1);
    let r = e.run(&["promote", "hast0"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(e.get("hast/hast0/role").as_deref(), Some("primary"));
    assert!(
        !e.calls().contains("while the secondary worker runs"),
        "{}",
        e.calls()
    );
}

#[test]
fn hast_peer_still_primary_is_refused() {
    let e = hast_env("1s");
    let _w = Worker::start("hast0", 60);
    let r = e.run(&["switch", "master"]);
    assert_eq!(r.code, 3, "{r:?}");
    assert!(r.stderr.contains("still primary"), "{r:?}");
    assert!(r.stderr.contains("hastd: hast0 (secondary)"), "{r:?}");
    assert!(!e.calls().contains("role primary hast0"), "{}", e.calls());
    assert_eq!(e.read("events"), "");
    // The failure hook ran after the (empty) rollback.
    assert_eq!(e.read("failure-hook").trim(), "hast0");
}

#[test]
fn hast_split_brain_is_refused_unless_forced() {
    let e = hast_env("5s");
    e.set("hast/hast0/status", "split-brain");
    let r = e.run(&["promote", "hast0"]);
    assert_eq!(r.code, 3, "{r:?}");
    assert!(r.stderr.contains("split-brain"), "{r:?}");
    assert!(r.stderr.contains("--force"), "{r:?}");
    assert_eq!(e.get("hast/hast0/role").as_deref(), Some("secondary"));
    let r = e.run(&["promote", "--force", "hast0"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(e.get("hast/hast0/role").as_deref(), Some("primary"));
}

#[test]
fn hast_failing_role_change_rolls_back() {
    let e = hast_env("5s");
    e.set("hast/hast1/fail_role", "2");
    let r = e.run(&["switch", "master"]);
    assert_eq!(r.code, 1, "{r:?}");
    // Resource, step, command, exit status and stderr in the message.
    let last = r.stderr.lines().last().unwrap_or_default();
    assert!(last.contains("promote hast1: role primary failed"), "{r:?}");
    assert!(
        last.contains("`hastctl role primary hast1` exited with status 2"),
        "{r:?}"
    );
    assert!(last.contains("Received error 2 from hastd."), "{r:?}");
    // hast0 had been promoted and imported: all undone; no service started.
    assert_eq!(e.get("hast/hast0/role").as_deref(), Some("secondary"));
    assert!(!e.exists("zpool/tank0/imported"));
    assert_eq!(e.read("events"), "");
    assert_eq!(e.read("failure-hook").trim(), "hast1");
}

#[test]
fn zfs_import_failure_rolls_back() {
    let e = hast_env("5s");
    e.set("zpool/tank0/fail_import", "");
    let r = e.run(&["promote", "hast0"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("cannot import 'tank0'"), "{r:?}");
    assert_eq!(e.get("hast/hast0/role").as_deref(), Some("secondary"));
}

#[test]
fn zfs_imports_from_the_replicated_device_not_the_backing_disk() {
    // The backing disk under /dev/hast/hast0 carries the same ZFS labels; a scan of every
    // disk (zpool import without -d) meets it first and would import the pool from it,
    // bypassing replication.
    let e = hast_env("5s");
    let disk = e.state().join("disk/ada1");
    let dev = e.state().join("dev/hast0");
    e.set("disk/ada1", "");
    e.set(
        "zpool/tank0/labels",
        &format!("{}\n{}", disk.display(), dev.display()),
    );
    let r = e.run(&["promote", "hast0"]);
    assert_eq!(r.code, 0, "{r:?}");
    let calls = e.calls();
    let import = format!(
        "zpool import -o cachefile=none -d {} -f tank0\n",
        dev.display()
    );
    assert!(calls.contains(&import), "{calls}");
    assert_eq!(
        e.get("zpool/tank0/imported").as_deref(),
        Some(dev.to_str().unwrap()),
        "imported from the backing disk"
    );

    // The export on demote names the pool only.
    e.clear_calls();
    let r = e.run(&["demote", "hast0"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(e.calls().contains("zpool export tank0\n"), "{}", e.calls());
    assert!(!e.exists("zpool/tank0/imported"));
}

fn drbd_env(role_timeout: &str) -> Env {
    let e = Env::new();
    e.write_config(&format!(
        r#"
node = "s1"
[switch]
lock = "@DIR@/switch.lock"
role_timeout = "{role_timeout}"
device_timeout = "2s"
{EVENT_SERVICE}
[resource.r0]
backend = "drbd"
device = "@STATE@/dev/r0"
fstype = "zfs"
pool = "tank"
"#
    ));
    e.set("drbd/r0/role", "Secondary");
    e
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[test]
fn drbd_waits_for_the_peer_to_step_down() {
    let e = drbd_env("20s");
    e.set("drbd/r0/peer_primary_until", &(now() + 2).to_string());
    let r = e.run(&["switch", "MASTER"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(e.get("drbd/r0/role").as_deref(), Some("Primary"));
    assert!(e.exists("zpool/tank/imported"));
    assert_eq!(e.read("events"), "start\n");
    let s = e.run(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&s.stdout).unwrap();
    assert_eq!(v["resources"][0]["role"], "primary");
    assert_eq!(v["resources"][0]["state"], "complete");
    assert_eq!(v["resources"][0]["sync_progress"], 1.0);

    let r = e.run(&["switch", "BACKUP"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(e.get("drbd/r0/role").as_deref(), Some("Secondary"));
    assert!(!e.exists("zpool/tank/imported"));
}

#[test]
fn drbd_peer_still_primary_is_refused() {
    let e = drbd_env("1s");
    e.set("drbd/r0/peer_primary_until", &(now() + 3600).to_string());
    let r = e.run(&["promote"]);
    assert_eq!(r.code, 3, "{r:?}");
    assert!(r.stderr.contains("peer is still Primary after 1s"), "{r:?}");
    assert_eq!(e.get("drbd/r0/role").as_deref(), Some("Secondary"));
    assert!(!e.exists("zpool/tank/imported"));
}

#[test]
fn drbd_outdated_disk_is_refused_unless_forced() {
    let e = drbd_env("2s");
    e.set("drbd/r0/disk", "Outdated");
    let r = e.run(&["promote"]);
    assert_eq!(r.code, 3, "{r:?}");
    assert!(r.stderr.contains("Outdated, not UpToDate"), "{r:?}");
    assert!(!e.calls().contains("drbdadm primary"), "{}", e.calls());
    let r = e.run(&["promote", "--force"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(
        e.calls().contains("drbdadm primary --force r0"),
        "{}",
        e.calls()
    );
}

#[test]
fn drbd_failing_role_change_rolls_back() {
    let e = drbd_env("2s");
    e.set(
        "drbd/r0/fail_primary",
        "(-7) Refusing to be Primary while peer is not outdated",
    );
    let r = e.run(&["promote"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stderr
            .contains("`drbdadm primary r0` exited with status 11"),
        "{r:?}"
    );
    assert!(r.stderr.contains("Refusing to be Primary"), "{r:?}");
    assert!(
        r.stderr
            .contains("rollback r0: role secondary skipped: already secondary"),
        "{r:?}"
    );
    assert_eq!(e.get("drbd/r0/role").as_deref(), Some("Secondary"));
    assert!(!e.exists("zpool/tank/imported"));
    assert_eq!(e.read("events"), "");
}

#[test]
fn hast_works_with_the_hastctl_of_freebsd_8_and_9() {
    // No `hastctl list` there; `hastctl status` printed the detailed listing.
    let e = hast_env("5s");
    e.set("hast_legacy", "");
    e.set("hast/hast0/status", "split-brain");
    let r = e.run(&["promote", "hast0"]);
    assert_eq!(r.code, 3, "{r:?}");
    assert!(e.calls().contains("hastctl status hast0"), "{}", e.calls());
    e.set("hast/hast0/status", "degraded");
    let r = e.run(&["promote", "hast0"]);
    assert_eq!(r.code, 0, "{r:?}");
    let s = e.run(&["status", "--json", "hast0"]);
    let v: serde_json::Value = serde_json::from_str(&s.stdout).unwrap();
    assert_eq!(v["resources"][0]["role"], "primary");
    assert_eq!(v["resources"][0]["state"], "degraded");
}

#[test]
fn attach_and_detach_hooks_run_around_the_role_change() {
    let e = Env::new();
    e.write_config(
        r#"
node = "s1"
[switch]
lock = "@DIR@/switch.lock"
device_timeout = "2s"
[resource.hast0]
backend = "hast"
device = "@STATE@/dev/hast0"
fstype = "zfs"
pool = "tank0"
attach = "echo attach $TANDEM_RESOURCE $TANDEM_DEVICE $TANDEM_NBD >> @DIR@/hooks"
detach = "echo detach $TANDEM_RESOURCE >> @DIR@/hooks; test -f @STATE@/zpool/tank0/imported && echo still-imported >> @DIR@/hooks; true"
"#,
    );
    e.set("hast/hast0/role", "secondary");
    let r = e.run(&["promote"]);
    assert_eq!(r.code, 0, "{r:?}");
    let dev = e.state().join("dev/hast0");
    assert_eq!(
        e.read("hooks"),
        format!("attach hast0 {} /run/tandem/hast0.nbd\n", dev.display()).replace(
            "/run/tandem/",
            if cfg!(target_os = "freebsd") {
                "/var/run/tandem/"
            } else {
                "/run/tandem/"
            }
        )
    );
    // Already up: the hook does not run again.
    let r = e.run(&["promote"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(e.read("hooks").lines().count(), 1);
    let r = e.run(&["demote"]);
    assert_eq!(r.code, 0, "{r:?}");
    // detach runs after the export, before role secondary.
    assert!(
        e.read("hooks").ends_with("detach hast0\n"),
        "{}",
        e.read("hooks")
    );
    let calls = e.calls();
    assert!(calls.find("zpool export").unwrap() < calls.find("role secondary").unwrap());
}

#[test]
fn an_event_superseded_during_the_settle_delay_does_nothing() {
    let e = Env::new();
    e.write_config(
        r#"
node = "s1"
[switch]
lock = "@DIR@/switch.lock"
delay = "2s"
[resource.hast0]
backend = "hast"
device = "@STATE@/dev/hast0"
fstype = "zfs"
pool = "tank0"
"#,
    );
    e.set("hast/hast0/role", "secondary");
    let first = e
        .command(&["switch", "MASTER"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until it holds the lock and sleeps.
    for _ in 0..500 {
        if e.read("switch.lock.seq").contains("running") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let second = e.run(&["switch", "BACKUP"]);
    let first = first.wait_with_output().unwrap();
    assert_eq!(first.status.code(), Some(75), "{first:?}");
    assert!(
        String::from_utf8_lossy(&first.stderr).contains("superseded during the settle delay"),
        "{first:?}"
    );
    assert_eq!(second.code, 0, "{second:?}");
    assert!(!e.calls().contains("role primary"), "{}", e.calls());
    assert_eq!(e.get("hast/hast0/role").as_deref(), Some("secondary"));
}

/// The stamps the fakes and services wrote: (what, pool or service, nanoseconds).
fn stamps(e: &Env) -> Vec<(String, String, u128)> {
    std::fs::read_to_string(e.state().join("stamps"))
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(f.len(), 3, "stamp line {l:?}");
            (f[0].to_string(), f[1].to_string(), f[2].parse().unwrap())
        })
        .collect()
}

fn stamp(all: &[(String, String, u128)], what: &str, name: &str) -> u128 {
    all.iter()
        .find(|(w, n, _)| w == what && n == name)
        .unwrap_or_else(|| panic!("no {what} {name} in {all:?}"))
        .2
}

/// Two resources come up side by side: each import (the mount of a zfs resource) starts
/// before the other one ends. A service that uses only the quick resource starts before the
/// slow one is mounted; the one that uses both starts after. Order of stamps only, no timing.
#[test]
fn resources_mount_concurrently_and_each_service_starts_when_its_own_are_up() {
    let e = Env::new();
    e.write_config(
        r#"
node = "s1"
[switch]
lock = "@DIR@/switch.lock"
role_timeout = "5s"
device_timeout = "5s"
[[service]]
name = "early"
manager = "command"
resources = ["hast0"]
start = "echo service-start early $(date +%s%N) >> @STATE@/stamps; touch @DIR@/early.running"
stop = "rm -f @DIR@/early.running"
status = "test -f @DIR@/early.running"
[[service]]
name = "both"
manager = "command"
start = "echo service-start both $(date +%s%N) >> @STATE@/stamps; touch @DIR@/both.running"
stop = "rm -f @DIR@/both.running"
status = "test -f @DIR@/both.running"
[resource.hast0]
backend = "hast"
device = "@STATE@/dev/hast0"
fstype = "zfs"
pool = "tank0"
[resource.hast1]
backend = "hast"
device = "@STATE@/dev/hast1"
fstype = "zfs"
pool = "tank1"
"#,
    );
    e.set("hast/hast0/role", "secondary");
    e.set("hast/hast1/role", "secondary");
    e.set("zpool/tank0/import_delay", "0.3");
    e.set("zpool/tank1/import_delay", "1.5");
    let r = e.run(&["promote"]);
    assert_eq!(r.code, 0, "{r:?}");
    let s = stamps(&e);
    let (s0, e0) = (
        stamp(&s, "import-start", "tank0"),
        stamp(&s, "import-end", "tank0"),
    );
    let (s1, e1) = (
        stamp(&s, "import-start", "tank1"),
        stamp(&s, "import-end", "tank1"),
    );
    assert!(
        s1 < e0 && s0 < e1,
        "the imports did not overlap: {s:?}\n{r:?}"
    );
    let early = stamp(&s, "service-start", "early");
    assert!(e0 < early && early < e1, "early: {s:?}\n{r:?}");
    assert!(
        e1 < stamp(&s, "service-start", "both"),
        "both: {s:?}\n{r:?}"
    );
    // Demote and promote again: the same, every step still logged once per resource.
    let r = e.run(&["demote"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(!e.exists("zpool/tank0/imported") && !e.exists("zpool/tank1/imported"));
}

/// A failure in one resource's chain stops the promote: no service starts, both resources
/// are rolled back, and the error names the resource that failed.
#[test]
fn a_failing_import_beside_a_slow_one_rolls_both_back() {
    let e = hast_env("5s");
    e.set("zpool/tank0/import_delay", "0.5");
    e.set("zpool/tank1/fail_import", "");
    let r = e.run(&["promote"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stderr.contains("promote hast1: import pool tank1 failed"),
        "{r:?}"
    );
    assert_eq!(e.read("events"), "");
    assert!(!e.exists("zpool/tank0/imported") && !e.exists("zpool/tank1/imported"));
    assert_eq!(e.get("hast/hast0/role").as_deref(), Some("secondary"));
    assert_eq!(e.get("hast/hast1/role").as_deref(), Some("secondary"));
}
