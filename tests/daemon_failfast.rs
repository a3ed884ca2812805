//! Failover without waiting on a dead peer: the link's heartbeat tells the survivor that the
//! primary is gone before anyone asks it to take over, so `role primary` does not spend its
//! time probing a peer that can only time out, and every refusal of a promote still holds.
//!
//! The netns test puts the nodes in network namespaces `tfo-a` and `tfo-b` joined by a veth
//! pair on 198.18.0.0/24 (needs root, `ip`, `nsenter`, `qemu-io`; skips without them), so that
//! the dead primary's address drops packets instead of refusing them. The daemons run under
//! `nsenter --net`: their control sockets, exports and disk images stay in this test's mount
//! namespace. The root namespace never gets an address in 198.18.0.0/24.

mod daemon_common;

use std::time::{Duration, Instant};

use daemon_common::*;

const NS_A: &str = "tfo-a";
const NS_B: &str = "tfo-b";
const DEV_A: &str = "tfo-va";
const DEV_B: &str = "tfo-vb";
const IP_A: &str = "198.18.0.51";
const IP_B: &str = "198.18.0.52";
const PORT: u16 = 7789;
const LOCK: &str = "/run/tandem-tfo-netns-test.lock";

/// The two namespaces and their veth link, removed on drop; `None`: skip (printed why).
fn net_up() -> Option<NetnsPair> {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipping: network namespaces need root");
        return None;
    }
    if !(need("ip", "iproute2") && need("nsenter", "util-linux") && need("qemu-io", "qemu-utils")) {
        return None;
    }
    Some(NetnsPair::up(
        LOCK,
        [NS_A, NS_B],
        [DEV_A, DEV_B],
        [IP_A, IP_B],
    ))
}

/// The harness sets `daemon.timeout = "3s"`; these tests run on the defaults.
fn use_default_timeouts(p: &Pair) {
    for n in [&p.a, &p.b] {
        n.edit_conf("timeout = \"3s\"\n", "");
    }
}

/// The primary's machine dies (NIC down, then every process killed, so not even a FIN leaves
/// it); 1.5 s later the survivor is told to take over. It must not spend that call probing a
/// peer that can only time out: the link's heartbeat has already told it the peer is gone.
/// And it serves what the old primary acknowledged.
#[test]
fn promote_after_the_primary_vanished_answers_at_once_and_serves_the_data() {
    let Some(_net) = net_up() else { return };
    let mut p = Pair::new_on("fullsync", (IP_A, PORT), (IP_B, PORT));
    p.a.netns = Some(NS_A);
    p.b.netns = Some(NS_B);
    use_default_timeouts(&p);
    let mut p = synced(p);
    p.a.qemu_io_ok(&["write -P 0x6b 4M 1M", "flush"]);
    p.a.wait_for(10, "a in sync", |s| s["state"] == "complete");
    // The crash: the NIC first, so the kernel cannot send a FIN or RST for the killed
    // daemon's sockets; connects to a's address now only time out.
    in_ns(NS_A, &["ip", "link", "set", DEV_A, "down"]);
    p.a.kill9();
    std::thread::sleep(Duration::from_millis(1500));
    let t = Instant::now();
    let out = p.b.run(&["role", "primary", "r0"]);
    let took = t.elapsed();
    eprintln!("role primary on the survivor took {} ms", took.as_millis());
    assert!(
        out.status.success(),
        "role primary on b: {}\nb log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        p.b.log_text()
    );
    // Issue 10's bound: a probe of the dead peer alone would take daemon.probe_timeout
    // (300 ms), so this fails if the promote asks a peer the heartbeat already gave up on.
    assert!(
        took <= Duration::from_millis(300),
        "role primary took {took:?}\nb log:\n{}",
        p.b.log_text()
    );
    p.b.qemu_io_ok(&["read -P 0x6b 4M 1M"]);
    p.b.qemu_io_ok(&["write -P 0x6c 8M 1M", "flush", "read -P 0x6c 8M 1M"]);
}

/// The heartbeat must not weaken the refusals: two idle nodes (neither primary, so no
/// replication link carries pings) stay silent far longer than `daemon.timeout`, and the one
/// with stale data is still refused, because its peer is reachable and answers.
#[test]
fn stale_data_is_refused_even_when_the_link_has_been_idle_past_the_timeout() {
    if !need("qemu-io", "qemu-utils") {
        return;
    }
    let p = Pair::new("fullsync");
    use_default_timeouts(&p);
    let mut p = synced(p);
    p.b.kill9();
    p.a.qemu_io_ok(&["write -P 0x11 0 1M", "flush"]);
    p.a.stop();
    p.a.start();
    p.b.start();
    // Both in role init, nothing connects to anything; wait well past daemon.timeout (1 s).
    std::thread::sleep(Duration::from_millis(2500));
    let out = p.b.run(&["role", "primary", "r0"]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}\nb log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        p.b.log_text()
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("stale"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // And a live primary is still refused after the same idle wait on the other side.
    p.a.ok(&["role", "primary", "r0"]);
    p.b.ok(&["role", "secondary", "r0"]);
    p.a.ok(&["wait-sync", "r0", "--timeout", "60s"]);
    std::thread::sleep(Duration::from_millis(2500));
    let out = p.b.run(&["role", "primary", "r0"]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("peer is primary"));
}
