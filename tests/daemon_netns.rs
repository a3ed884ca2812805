//! Real network faults: the two nodes are network namespaces (`tnf-a`, `tnf-b`) joined by a
//! veth pair on 198.18.0.0/24, and faults are nftables rules in those namespaces (one-way loss,
//! a full partition), not a proxy. The daemons run under `nsenter --net` so that their control
//! sockets, NBD exports and disk images stay in this test's mount namespace; the test talks to
//! them only through those unix sockets.
//!
//! Needs root, `ip`, `nft`, `nsenter` and `qemu-io`; skips without them. The root namespace
//! never gets an address or a route in 198.18.0.0/24, and nothing here sends traffic anywhere
//! but between the two namespaces. The tests take a file lock and run one at a time, since
//! they share the namespace names.

mod daemon_common;

use std::time::Duration;

use daemon_common::*;

const NS_A: &str = "tnf-a";
const NS_B: &str = "tnf-b";
const IP_A: &str = "198.18.0.31";
const IP_B: &str = "198.18.0.32";
const PORT: u16 = 7789;
const TABLE: &str = "tandemtest";
/// `daemon.timeout` of the harness's configuration.
const TIMEOUT_S: u64 = 3;
const LOCK: &str = "/run/tandem-daemon-netns-test.lock";

fn can_run() -> bool {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipping: network namespaces need root");
        return false;
    }
    need("ip", "iproute2")
        && need("nft", "nftables")
        && need("nsenter", "util-linux")
        && need("qemu-io", "qemu-utils")
}

/// The two namespaces and their link (removed on drop, also when the test fails), and the
/// faults made in them. Holds the lock that keeps the tests of this file (and of other
/// processes) from sharing them.
struct Net {
    _pair: NetnsPair,
}

impl Net {
    /// `None`: skip (printed why).
    fn up() -> Option<Net> {
        if !can_run() {
            return None;
        }
        Some(Net {
            _pair: NetnsPair::up(LOCK, [NS_A, NS_B], ["tnf-va", "tnf-vb"], [IP_A, IP_B]),
        })
    }

    /// Drop, in `ns`'s input chain, what matches each of `rules`.
    fn drop_in(&self, ns: &str, rules: &[&str]) {
        let mut text = format!(
            "table inet {TABLE} {{\n chain input {{\n  type filter hook input priority 0; policy accept;\n"
        );
        for r in rules {
            text += &format!("  {r} drop\n");
        }
        text += " }\n}\n";
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), text).unwrap();
        in_ns(ns, &["nft", "-f", file.path().to_str().unwrap()]);
    }

    /// Nothing gets from one node to the other, in either direction.
    fn partition(&self) {
        self.drop_in(NS_A, &[&format!("ip saddr {IP_B}")]);
        self.drop_in(NS_B, &[&format!("ip saddr {IP_A}")]);
    }

    /// Remove every rule again.
    fn heal(&self) {
        for ns in [NS_A, NS_B] {
            let net = format!("--net=/run/netns/{ns}");
            // Absent when only one side had rules.
            let _ = run_argv(&[
                "nsenter", &net, "--", "nft", "delete", "table", "inet", TABLE,
            ]);
        }
    }
}

/// A synced pair, `a` primary in tnf-a and `b` secondary in tnf-b.
fn netns_pair() -> Pair {
    let mut p = Pair::new_on("fullsync", (IP_A, PORT), (IP_B, PORT));
    p.a.netns = Some(NS_A);
    p.b.netns = Some(NS_B);
    synced(p)
}

/// qemu-io `cmds` on `n`'s export; it must succeed within `daemon.timeout` + 12 s, or it is
/// killed and the test fails: a primary that loses its peer must not hang its clients.
fn write_bounded(n: &Node, cmds: &[&str]) -> Duration {
    let limit = Duration::from_secs(TIMEOUT_S + 12);
    qemu_io_within(&n.nbd_uri(), &n.log, cmds, limit).1
}

fn verify_ok(p: &Pair) {
    let out = p.a.run(&["verify", "r0"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "verify: {}{}\na log:\n{}\nb log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        p.a.log_text(),
        p.b.log_text()
    );
}

fn wait_sync(p: &Pair) {
    let out = p.a.run(&["wait-sync", "r0", "--timeout", "30s"]);
    assert!(
        out.status.success(),
        "wait-sync: {}\na log:\n{}\nb log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        p.a.log_text(),
        p.b.log_text()
    );
    p.b.wait_for(20, "b complete", |s| s["state"] == "complete");
}

fn lost_peer(s: &serde_json::Value) -> bool {
    s["connection"] != "connected"
}

#[test]
fn one_way_loss_degrades_the_primary_without_a_hang_and_resyncs_after() {
    let Some(net) = Net::up() else { return };
    let p = netns_pair();
    // B's answers on the replication port (either end of the connection) never reach A; A's
    // data still reaches B.
    net.drop_in(
        NS_A,
        &[
            &format!("ip saddr {IP_B} tcp sport {PORT}"),
            &format!("ip saddr {IP_B} tcp dport {PORT}"),
        ],
    );
    let took = write_bounded(&p.a, &["write -P 0x5a 2M 1M", "flush"]);
    eprintln!("write under one-way loss took {took:?}");
    let st = p.a.wait_for(10, "a lost the peer", lost_peer);
    assert!(u(&st, &["dirty_bytes"]) >= 1 << 20, "{st}");
    net.heal();
    wait_sync(&p);
    verify_ok(&p);
    assert!(region_is(&p.b.img, 2 << 20, 1 << 20, 0x5a));
}

#[test]
fn partition_with_both_sides_written_is_split_brain_on_both_and_resolved() {
    let Some(net) = Net::up() else { return };
    let p = netns_pair();
    let size = u(&p.a.status(), &["data_size"]);
    net.partition();
    let took = write_bounded(&p.a, &["write -P 0xaa 0 1M", "flush"]);
    eprintln!("write on a in the partition took {took:?}");
    p.a.wait_for(10, "a lost the peer", lost_peer);
    // b promotes once it too has given up on a; its probe of a times out.
    p.b.wait_for(10, "b lost the peer", lost_peer);
    p.b.ok(&["role", "primary", "r0"]);
    write_bounded(&p.b, &["write -P 0xbb 3M 1M", "flush"]);
    net.heal();
    let sa =
        p.a.wait_for(30, "split-brain on a", |s| s["state"] == "split-brain");
    let sb =
        p.b.wait_for(30, "split-brain on b", |s| s["state"] == "split-brain");
    assert!(lost_peer(&sa) && lost_peer(&sb), "{sa}\n{sb}");
    // Nothing went either way.
    assert!(region_is(&p.a.img, 0, 1 << 20, 0xaa));
    assert!(region_is(&p.a.img, 3 << 20, 1 << 20, 0));
    assert!(region_is(&p.b.img, 3 << 20, 1 << 20, 0xbb));
    assert!(region_is(&p.b.img, 0, 1 << 20, 0));
    // b's changes go: a primary refuses to discard its data, a demoted b does.
    let out = p.b.run(&["resolve", "r0", "--discard-local"]);
    assert!(!out.status.success());
    p.b.ok(&["role", "secondary", "r0"]);
    p.b.ok(&["resolve", "r0", "--discard-local"]);
    wait_sync(&p);
    verify_ok(&p);
    assert!(same_data(&p.a.img, &p.b.img, size));
    for img in [&p.a.img, &p.b.img] {
        assert!(region_is(img, 0, 1 << 20, 0xaa));
        assert!(region_is(img, 3 << 20, 1 << 20, 0));
    }
}

#[test]
fn partition_with_only_the_primary_written_resyncs_without_split_brain() {
    let Some(net) = Net::up() else { return };
    let p = netns_pair();
    net.partition();
    write_bounded(&p.a, &["write -P 0xcc 5M 1M", "flush"]);
    p.a.wait_for(10, "a lost the peer", lost_peer);
    p.b.wait_for(10, "b lost the peer", lost_peer);
    net.heal();
    wait_sync(&p);
    verify_ok(&p);
    assert!(region_is(&p.b.img, 5 << 20, 1 << 20, 0xcc));
    for n in [&p.a, &p.b] {
        assert_ne!(n.status()["state"], "split-brain");
        assert!(
            !n.log_text().contains("split-brain"),
            "{} reported split-brain:\n{}",
            n.name,
            n.log_text()
        );
    }
}
