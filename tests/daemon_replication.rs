//! Replication through the NBD export between two daemons on loopback: data reaches the
//! secondary, and a secondary killed under load is resynced from its dirty extents only.

mod daemon_common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use daemon_common::*;

#[test]
fn writes_through_the_export_reach_the_secondary() {
    if !need("qemu-io", "qemu-utils") {
        return;
    }
    let p = synced_pair("fullsync");
    let st = p.a.status();
    assert_eq!(st["role"], "primary");
    assert_eq!(st["connection"], "connected");
    let size = u(&st, &["data_size"]);
    p.a.qemu_io_ok(&[
        "write -P 0xab 0 4M",
        "write -P 0xcd 9M 64k",
        "write -f -P 0x5a 20M 4k",
        "write -z 1M 64k",
        "discard 2M 1M",
        "flush",
    ]);
    p.a.qemu_io_ok(&[
        "read -P 0xab 0 1M",
        "read -P 0 1M 64k",
        "read -P 0 2M 1M",
        "read -P 0xcd 9M 64k",
        "read -P 0x5a 20M 4k",
    ]);
    assert!(
        same_data(&p.a.img, &p.b.img, size),
        "data regions differ after flush"
    );
    let st = p.a.status();
    assert_eq!(st["state"], "complete");
    assert!(u(&st, &["counters", "bytes_replicated"]) >= 4 << 20, "{st}");
    assert!(u(&st, &["counters", "flushes"]) >= 1, "{st}");
    let hooks = std::fs::read_to_string(p.dir.path().join(format!(
        "hooks.{}.log",
        p.dir.path().file_name().unwrap().to_string_lossy()
    )))
    .unwrap_or_default();
    assert!(
        hooks.contains("syncstart r0") || hooks.contains("connect r0"),
        "hooks ran: {hooks}"
    );
}

#[test]
fn killed_secondary_is_resynced_from_dirty_extents_only() {
    if !need("qemu-io", "qemu-utils") {
        return;
    }
    let mut p = synced_pair("fullsync");
    let size = u(&p.a.status(), &["data_size"]);
    // A write load in the background while the secondary dies.
    let uri = p.a.nbd_uri();
    let mut load = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "i=0; while [ $i -lt 40 ]; do qemu-io -f raw -c \"write -P $((i % 200 + 1)) $((i % 8))M 256k\" '{uri}' >/dev/null || exit 1; i=$((i+1)); done"
        ))
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    p.b.kill9();
    let end = Instant::now() + Duration::from_secs(120);
    let st = loop {
        if let Some(s) = load.try_wait().unwrap() {
            assert!(
                s.success(),
                "the write load failed while the secondary died"
            );
            break p.a.status();
        }
        assert!(Instant::now() < end, "write load did not finish");
        std::thread::sleep(Duration::from_millis(100));
    };
    // The primary kept serving, degraded, and tracks what the secondary missed.
    p.a.qemu_io_ok(&["write -P 0x77 30M 1M", "flush"]);
    let st2 = p.a.wait_for(20, "degraded", |s| {
        s["state"] == "degraded" && s["connection"] != "connected"
    });
    let dirty = u(&st2, &["dirty_bytes"]);
    assert!(
        dirty >= 1 << 20,
        "dirty bytes {dirty} after writes while degraded: {st}"
    );
    assert!(dirty < size / 2, "dirty bytes {dirty} of {size}");
    let resynced_before = u(&st2, &["counters", "bytes_resynced"]);
    p.b.start();
    p.b.ok(&["role", "secondary", "r0"]);
    p.a.ok(&["wait-sync", "r0", "--timeout", "60s"]);
    let st3 = p.a.status();
    let resynced = u(&st3, &["counters", "bytes_resynced"]) - resynced_before;
    assert!(resynced <= dirty, "resynced {resynced} > dirty {dirty}");
    assert!(resynced >= 1 << 20, "resynced only {resynced}");
    assert!(
        resynced < size / 2,
        "resync moved {resynced} of {size} bytes"
    );
    p.a.qemu_io_ok(&["flush"]);
    assert!(
        same_data(&p.a.img, &p.b.img, size),
        "data regions differ after resync"
    );
}

#[test]
fn demote_removes_the_export_and_promote_on_the_peer_serves_the_same_data() {
    if !need("qemu-io", "qemu-utils") {
        return;
    }
    let p = synced_pair("memsync");
    p.a.qemu_io_ok(&["write -P 0x42 5M 2M", "flush"]);
    p.a.ok(&["role", "secondary", "r0"]);
    assert!(!p.a.nbd.exists(), "export still present after demote");
    p.b.ok(&["role", "primary", "r0"]);
    p.b.qemu_io_ok(&["read -P 0x42 5M 2M"]);
    p.b.ok(&["wait-sync", "r0", "--timeout", "60s"]);
    let st =
        p.a.wait_for(30, "a secondary complete", |s| s["state"] == "complete");
    assert_eq!(st["role"], "secondary");
    assert_eq!(st["peer_role"], "primary");
}

#[test]
fn async_mode_ships_writes_in_order_and_flush_waits_for_the_peer() {
    if !need("qemu-io", "qemu-utils") {
        return;
    }
    let p = synced_pair("async");
    let size = u(&p.a.status(), &["data_size"]);
    // Overwrites of the same range: the secondary must end with the last one.
    p.a.qemu_io_ok(&[
        "write -P 1 0 2M",
        "write -P 2 1M 2M",
        "write -P 3 1536k 64k",
        "aio_write -P 4 10M 1M",
        "aio_write -P 5 11M 1M",
        "aio_flush",
        "flush",
    ]);
    assert!(
        same_data(&p.a.img, &p.b.img, size),
        "data regions differ after flush in async mode"
    );
    p.b.wait_for(10, "b complete", |s| s["state"] == "complete");
}
