//! Safety review of the replication daemon: scenarios where a failover tool could mount stale
//! data, lose acknowledged writes or resolve a split-brain silently. Each test is a sequence of
//! role changes and writes that a user could run, and asserts what the user would see.

mod daemon_common;

use daemon_common::*;

fn code(out: &std::process::Output) -> Option<i32> {
    out.status.code()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

/// A node used alone as primary (its peer not set up yet) holds the only copy of the data. A
/// freshly created peer must not become the sync source: promoting it while the written node
/// is reachable is refused as stale, instead of a "initial full sync" that zeroes the data.
#[test]
fn fresh_peer_cannot_wipe_a_node_written_alone() {
    if !need("qemu-io", "qemu-utils") {
        return;
    }
    let mut p = Pair::new("fullsync");
    p.a.start();
    p.a.ok(&["role", "primary", "r0"]);
    p.a.qemu_io_ok(&["write -P 0xab 0 1M", "flush"]);
    p.a.ok(&["role", "secondary", "r0"]);
    p.b.start();
    let out = p.b.run(&["role", "primary", "r0"]);
    assert_eq!(
        code(&out),
        Some(3),
        "promoting the empty node must be refused: {}\na log:\n{}\nb log:\n{}",
        stderr(&out),
        p.a.log_text(),
        p.b.log_text()
    );
    assert!(stderr(&out).contains("stale"), "{}", stderr(&out));
    assert!(
        region_is(&p.a.img, 0, 1 << 20, 0xab),
        "a's data was overwritten"
    );
    // The right direction works: a becomes primary and b receives its data.
    p.b.ok(&["role", "secondary", "r0"]);
    p.a.ok(&["role", "primary", "r0"]);
    p.a.ok(&["wait-sync", "r0", "--timeout", "60s"]);
    let size = u(&p.a.status(), &["data_size"]);
    assert!(same_data(&p.a.img, &p.b.img, size));
    assert!(region_is(&p.b.img, 0, 1 << 20, 0xab));
}

/// Both nodes written while never synced (two standalone primaries) is a split-brain, not an
/// initial sync that silently throws one node's data away.
#[test]
fn two_nodes_written_alone_before_their_first_sync_are_split_brain() {
    if !need("qemu-io", "qemu-utils") {
        return;
    }
    let mut p = Pair::new("fullsync");
    p.a.start();
    p.a.ok(&["role", "primary", "r0"]);
    p.a.qemu_io_ok(&["write -P 0xaa 0 1M", "flush"]);
    p.a.stop();
    p.b.start();
    p.b.ok(&["role", "primary", "r0"]);
    p.b.qemu_io_ok(&["write -P 0xbb 1M 1M", "flush"]);
    p.a.start();
    p.a.ok(&["role", "secondary", "r0"]);
    p.b.wait_for(30, "split-brain on b", |s| s["state"] == "split-brain");
    assert!(
        region_is(&p.a.img, 0, 1 << 20, 0xaa),
        "a's data was overwritten"
    );
    // resolve on a ends it in favour of b.
    p.a.ok(&["resolve", "r0", "--discard-local"]);
    p.b.ok(&["wait-sync", "r0", "--timeout", "60s"]);
    let size = u(&p.a.status(), &["data_size"]);
    assert!(same_data(&p.a.img, &p.b.img, size));
}

/// A node that was written degraded as primary, then became a sync target (here after a
/// split-brain resolved in the peer's favour), must still record its next degraded writes in
/// its generation: otherwise the peer is later promoted as "equal" and its resync overwrites
/// them.
#[test]
fn sync_target_still_records_its_later_degraded_writes() {
    if !need("qemu-io", "qemu-utils") {
        return;
    }
    let mut p = synced_pair("fullsync");
    // a writes without b (generation bump on a), then steps down.
    p.b.stop();
    p.a.qemu_io_ok(&["write -P 0x11 0 64k", "flush"]);
    p.a.ok(&["role", "secondary", "r0"]);
    // b is forced up over it and written too: split-brain, resolved in b's favour.
    p.b.start();
    p.b.ok(&["role", "primary", "r0", "--force"]);
    p.b.qemu_io_ok(&["write -P 0x22 1M 64k", "flush"]);
    p.a.ok(&["resolve", "r0", "--discard-local"]);
    p.b.ok(&["wait-sync", "r0", "--timeout", "60s"]);
    p.a.wait_for(30, "a complete", |s| s["state"] == "complete");
    // b goes away; a (its daemon still running) is promoted alone and written: b is stale
    // from now on.
    p.b.stop();
    p.a.ok(&["role", "primary", "r0"]);
    p.a.qemu_io_ok(&["write -P 0x33 2M 64k", "flush"]);
    p.a.ok(&["role", "secondary", "r0"]);
    p.b.start();
    let out = p.b.run(&["role", "primary", "r0"]);
    assert_eq!(
        code(&out),
        Some(3),
        "b lacks a's last writes and must not be promoted: {}\na log:\n{}",
        stderr(&out),
        p.a.log_text()
    );
    assert!(region_is(&p.a.img, 2 << 20, 64 << 10, 0x33));
}

/// Two disks created with different extent sizes can have the same data size; their
/// dirty-extent maps number different ranges, so a resync driven by the peer's map would copy
/// the wrong ranges. Such a pair must be refused, not reported in sync.
#[test]
fn different_extent_sizes_are_refused() {
    let mut p = Pair::new("fullsync");
    let out = p.b.run(&["create", "r0", "--extent-size", "2M", "--force"]);
    assert!(out.status.success(), "{}", stderr(&out));
    p.a.start();
    p.b.start();
    p.b.ok(&["role", "secondary", "r0"]);
    p.a.ok(&["role", "primary", "r0"]);
    assert!(
        p.a.log_contains("extent size differs", 20),
        "a log:\n{}\nb status: {}",
        p.a.log_text(),
        p.b.status()
    );
    let st = p.a.status();
    assert_ne!(st["state"], "complete", "{st}");
    assert_ne!(p.b.status()["connection"], "connected");
}

/// One control-socket request on an already open connection (so two requests can follow each
/// other within microseconds).
fn control(sock: &std::os::unix::net::UnixStream, line: &str) -> serde_json::Value {
    use std::io::{BufRead, Write};
    let mut w = sock.try_clone().unwrap();
    w.write_all(line.as_bytes()).unwrap();
    w.write_all(b"\n").unwrap();
    let mut answer = String::new();
    std::io::BufReader::new(sock.try_clone().unwrap())
        .read_line(&mut answer)
        .unwrap();
    serde_json::from_str(&answer).unwrap()
}

/// Demoting right after a promote, while the new primary's connector is still connecting,
/// must not leave a replication link behind: the secondary would keep seeing a live primary
/// and refuse every later promotion with "the peer is primary".
#[test]
fn demote_during_connect_leaves_no_link_behind() {
    let p = synced_pair("fullsync");
    p.a.ok(&["role", "secondary", "r0"]);
    p.b.wait_for(30, "b disconnected", |s| s["connection"] == "disconnected");
    for i in 0..15 {
        let promote = std::os::unix::net::UnixStream::connect(p.a.sock()).unwrap();
        let demote = std::os::unix::net::UnixStream::connect(p.a.sock()).unwrap();
        for s in [&promote, &demote] {
            s.set_read_timeout(Some(std::time::Duration::from_secs(60)))
                .unwrap();
        }
        let r = control(
            &promote,
            r#"{"cmd":"role","role":"primary","resources":["r0"]}"#,
        );
        assert!(r["error"].is_null(), "promote {i}: {r}");
        let r = control(
            &demote,
            r#"{"cmd":"role","role":"secondary","resources":["r0"]}"#,
        );
        assert!(r["error"].is_null(), "demote {i}: {r}");
        p.b.wait_for(20, "b sees the primary gone", |s| {
            s["connection"] == "disconnected"
        });
    }
    p.a.ok(&["role", "secondary", "r0"]);
    p.b.ok(&["role", "primary", "r0"]);
}

/// SIGHUP with a changed `local` disk must not pull the export from under a primary that is
/// in use (its filesystem would see I/O errors and the role silently fall back to init).
#[test]
fn reload_does_not_swap_the_disk_under_a_live_primary() {
    if !need("qemu-io", "qemu-utils") {
        return;
    }
    let mut p = Pair::new("fullsync");
    p.a.start();
    p.a.ok(&["role", "primary", "r0"]);
    p.a.qemu_io_ok(&["write -P 0x77 0 64k", "flush"]);
    // A second disk for a, and a configuration that points at it.
    let other = p.dir.path().join("a2.img");
    std::fs::File::create(&other)
        .unwrap()
        .set_len(IMG_SIZE)
        .unwrap();
    let text = std::fs::read_to_string(&p.a.conf).unwrap();
    let changed = text.replace(
        &format!("local = \"{}\"", p.a.img.display()),
        &format!("local = \"{}\"", other.display()),
    );
    assert_ne!(text, changed);
    std::fs::write(&p.a.conf, changed).unwrap();
    assert!(p.a.run(&["create", "r0"]).status.success());
    let pid = p.a.child.as_ref().unwrap().id().to_string();
    std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap();
    assert!(
        p.a.log_contains("local disk changed", 20),
        "{}",
        p.a.log_text()
    );
    let st = p.a.status();
    assert_eq!(st["role"], "primary", "{st}\n{}", p.a.log_text());
    p.a.qemu_io_ok(&["read -P 0x77 0 64k"]);
}

/// Strangers (any address but the configured remote) that open connections to the
/// replication port and trickle bytes must not occupy the handshake slots the real primary
/// needs: the pair still connects while they are there.
#[test]
fn strangers_cannot_lock_the_primary_out() {
    use std::io::Write;
    use std::time::{Duration, Instant};
    let mut p = Pair::new("fullsync");
    p.a.start();
    p.b.start();
    p.b.ok(&["role", "secondary", "r0"]);
    // 40 connections from 127.0.0.1 (the configured remote is 127.0.0.2), each sending a
    // frame header and then one byte every 3 s, for at most 40 s.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let port = p.b.port;
    let st = std::sync::Arc::clone(&stop);
    let trickler = std::thread::spawn(move || {
        let mut conns: Vec<_> = (0..40)
            .filter_map(|_| std::net::TcpStream::connect(("127.0.0.3", port)).ok())
            .collect();
        // A plausible frame length first, then the body one byte at a time.
        conns.retain_mut(|c| c.write_all(&[200, 0, 0, 0]).is_ok());
        let end = Instant::now() + Duration::from_secs(40);
        while Instant::now() < end && !st.load(std::sync::atomic::Ordering::Acquire) {
            conns.retain_mut(|c| c.write_all(&[0]).is_ok());
            for _ in 0..30 {
                if st.load(std::sync::atomic::Ordering::Acquire) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    });
    std::thread::sleep(Duration::from_millis(500));
    p.a.ok(&["role", "primary", "r0"]);
    let connected = p.a.log_contains("connected to", 20);
    stop.store(true, std::sync::atomic::Ordering::Release);
    trickler.join().unwrap();
    assert!(
        connected,
        "the primary could not connect while strangers held the port\na log:\n{}\nb log:\n{}",
        p.a.log_text(),
        p.b.log_text()
    );
}
