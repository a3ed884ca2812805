//! What the daemon refuses: a peer with the wrong secret or from the wrong address, garbage on
//! the replication port, promoting stale data or over a live primary, and split-brain (detected
//! on both nodes, nothing synced until `resolve --discard-local`).

mod daemon_common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use daemon_common::*;

#[test]
fn wrong_secret_is_rejected_and_logged() {
    let mut p = Pair::new("fullsync");
    let other = p.dir.path().join("other.key");
    std::fs::write(&other, "not the shared secret, though long enough\n").unwrap();
    std::fs::set_permissions(&other, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let text = std::fs::read_to_string(&p.b.conf).unwrap();
    let key = p.dir.path().join("key");
    std::fs::write(
        &p.b.conf,
        text.replace(key.to_str().unwrap(), other.to_str().unwrap()),
    )
    .unwrap();
    p.a.start();
    p.b.start();
    p.b.ok(&["role", "secondary", "r0"]);
    // The probe before promotion cannot authenticate: refused unless forced.
    let out = p.a.run(&["role", "primary", "r0"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("the peer refused us"));
    p.a.ok(&["role", "primary", "r0", "--force"]);
    std::thread::sleep(Duration::from_secs(2));
    let st = p.a.status();
    assert_ne!(st["connection"], "connected", "{st}");
    assert!(
        p.b.log_contains("authentication failed", 10),
        "b log:\n{}",
        p.b.log_text()
    );
    assert!(
        p.b.log_text().contains("127.0.0.2"),
        "the log names the peer address"
    );
    assert_eq!(p.b.status()["connection"], "disconnected");
    // A promote that cannot authenticate with the peer is refused, not taken as "peer down".
    let out = p.b.run(&["role", "primary", "r0"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("the peer refused us"), "{err}");
    // Fix b's configuration and reload it: the pair connects and syncs.
    std::fs::write(&p.b.conf, text).unwrap();
    let pid = p.b.child.as_ref().unwrap().id().to_string();
    std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap();
    p.a.wait_for(30, "connected after the secret was fixed", |s| {
        s["state"] == "complete"
    });
}

#[test]
fn world_readable_secret_refuses_to_start() {
    let p = Pair::new("fullsync");
    let key = p.dir.path().join("key");
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let out = p.a.run(&["daemon"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("readable by group and others"), "{err}");
}

/// A secret shorter than 32 bytes is refused at start, with the file and the way to make a
/// good one in the error.
#[test]
fn a_31_byte_secret_refuses_to_start() {
    let p = Pair::new("fullsync");
    let key = p.dir.path().join("key");
    std::fs::write(&key, format!("{}\n", "k".repeat(31))).unwrap();
    let out = p.a.run(&["daemon"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(key.to_str().unwrap()), "{err}");
    assert!(err.contains("31 bytes"), "{err}");
    assert!(err.contains("openssl rand -hex 32"), "{err}");
}

#[test]
fn garbage_and_strangers_do_not_disturb_the_daemon() {
    let p = synced_pair("fullsync");
    // Random bytes, a huge length prefix, and a truncated hello to the replication port.
    let frames: Vec<Vec<u8>> = vec![
        (0..4096u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect(),
        vec![0xff, 0xff, 0xff, 0x7f, 1, 2, 3],
        vec![60, 0, 0, 0, 1, 1, 0, 0],
        b"GET / HTTP/1.0\r\n\r\n".to_vec(),
    ];
    for f in frames {
        let mut s = TcpStream::connect((p.b.ip, p.b.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let _ = s.write_all(&f);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
    }
    // A connection from an address that is not the configured remote is refused and logged.
    let mut s = TcpStream::connect((p.b.ip, p.b.port)).unwrap();
    let hello = hello_frame("r0");
    s.write_all(&hello).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    assert!(buf.is_empty(), "a stranger got an answer: {buf:?}");
    assert!(
        p.b.log_contains("configured remote", 10),
        "b log:\n{}",
        p.b.log_text()
    );
    // Garbage to the primary's NBD socket.
    for junk in [
        vec![0u8; 300],
        (0..=255u8).cycle().take(5000).collect::<Vec<u8>>(),
    ] {
        let mut s = std::os::unix::net::UnixStream::connect(&p.a.nbd).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let _ = s.write_all(&junk);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
    }
    // Still replicating.
    assert_eq!(p.b.status()["state"], "complete");
    assert_eq!(p.a.status()["connection"], "connected");
    if have("qemu-io") {
        p.a.qemu_io_ok(&["write -P 9 0 64k", "flush", "read -P 9 0 64k"]);
    }
}

/// A well-formed Hello (protocol version 1) for `resource`.
fn hello_frame(resource: &str) -> Vec<u8> {
    let mut body = vec![1u8];
    body.extend_from_slice(&1u32.to_le_bytes());
    body.push(0);
    body.push(0);
    body.extend_from_slice(&(resource.len() as u32).to_le_bytes());
    body.extend_from_slice(resource.as_bytes());
    body.extend_from_slice(&1u32.to_le_bytes());
    body.push(b'x');
    body.extend_from_slice(&[7u8; 32]);
    let mut f = (body.len() as u32).to_le_bytes().to_vec();
    f.extend(body);
    f
}

#[test]
fn promote_refused_over_a_live_primary_and_on_stale_data() {
    if !need("qemu-io", "qemu-utils") {
        return;
    }
    let mut p = synced_pair("fullsync");
    let out = p.b.run(&["role", "primary", "r0"]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("peer is primary"));
    // b dies; a writes alone and becomes newer; a's daemon goes away too.
    p.b.kill9();
    p.a.qemu_io_ok(&["write -P 0x11 0 1M", "flush"]);
    p.a.stop();
    p.a.start();
    p.b.start();
    // b's data is now stale: promoting it while a is reachable is refused with exit 3.
    let out = p.b.run(&["role", "primary", "r0"]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("stale"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // a is fine to promote; b catches up as secondary.
    p.b.ok(&["role", "secondary", "r0"]);
    p.a.ok(&["role", "primary", "r0"]);
    p.a.ok(&["wait-sync", "r0", "--timeout", "60s"]);
    let size = u(&p.a.status(), &["data_size"]);
    assert!(same_data(&p.a.img, &p.b.img, size));
}

#[test]
fn split_brain_is_detected_on_both_and_resolved_by_discarding_one_side() {
    if !need("qemu-io", "qemu-utils") {
        return;
    }
    let mut p = synced_pair("fullsync");
    let size = u(&p.a.status(), &["data_size"]);
    // Apart: a written as primary...
    p.b.kill9();
    p.a.qemu_io_ok(&["write -P 0xaa 0 1M", "flush"]);
    p.a.kill9();
    // ... and b promoted alone (a unreachable) and written too.
    p.b.start();
    p.b.ok(&["role", "primary", "r0"]);
    p.b.qemu_io_ok(&["write -P 0xbb 3M 1M", "flush"]);
    p.a.start();
    p.a.ok(&["role", "secondary", "r0"]);
    let sa =
        p.a.wait_for(30, "split-brain on a", |s| s["state"] == "split-brain");
    let sb =
        p.b.wait_for(30, "split-brain on b", |s| s["state"] == "split-brain");
    assert_ne!(sb["connection"], "connected", "{sb}");
    assert_ne!(sa["state"], "complete");
    assert!(
        !same_data(&p.a.img, &p.b.img, size),
        "something was synced during split-brain"
    );
    assert!(p.a.log_text().contains("split-brain") && p.b.log_text().contains("split-brain"));
    // Promoting a over it is refused.
    let out = p.b.run(&["wait-sync", "r0", "--timeout", "2s"]);
    assert_eq!(out.status.code(), Some(3));
    // Resolve on a (the secondary): its changes are thrown away and it is fully resynced.
    p.a.ok(&["resolve", "r0", "--discard-local"]);
    let out = p.b.run(&["wait-sync", "r0", "--timeout", "60s"]);
    assert!(
        out.status.success(),
        "wait-sync after resolve: {}\na log:\n{}\nb log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        p.a.log_text(),
        p.b.log_text()
    );
    p.a.wait_for(30, "a complete", |s| s["state"] == "complete");
    assert!(
        same_data(&p.a.img, &p.b.img, size),
        "data regions differ after resolve"
    );
    p.b.qemu_io_ok(&["read -P 0xbb 3M 1M"]);
}
