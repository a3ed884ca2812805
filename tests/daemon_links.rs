//! Faults of the link between the daemons, not of the daemons: a link that hangs, one that loses
//! one direction, one cut in the middle of a frame, one reset over and over. a reaches b through
//! a fault proxy (tests/fault_proxy); b sees a's own address. Each scenario asserts what a user
//! would observe: client writes on the primary still complete, `status` and the log say the
//! peer is gone, and once the link heals the pair resyncs, `tandem verify` finds the replicas
//! identical and every acknowledged write is on both disks.

mod daemon_common;
mod fault_proxy;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use daemon_common::*;
use fault_proxy::{Dir, Fault, FaultProxy};

const MIB: u64 = 1 << 20;
/// The daemons' `timeout` in the harness config.
const TIMEOUT: Duration = Duration::from_secs(3);
/// Slack for a write that must wait for the link to be declared dead: generous, since only
/// "it completes" is asserted, not how fast.
const MARGIN: Duration = Duration::from_secs(12);

/// A synced pair whose a reaches b only through a fault proxy (in `Pass`).
fn proxied_pair(mode: &str) -> (Pair, FaultProxy) {
    let mut proxy = None;
    let p = synced_pair_with(mode, |p| {
        let fp = FaultProxy::start(format!("{}:{}", p.b.ip, p.b.port).parse().unwrap());
        p.route_via("a", fp.addr);
        proxy = Some(fp);
    });
    let proxy = proxy.unwrap();
    assert!(proxy.accepted() >= 1, "a did not connect through the proxy");
    (p, proxy)
}

/// What a client thread needs of a node: its export, and its log for the failure report.
#[derive(Clone)]
struct Export {
    uri: String,
    log: std::path::PathBuf,
}

impl Export {
    fn of(n: &Node) -> Export {
        Export {
            uri: n.nbd_uri(),
            log: n.log.clone(),
        }
    }
}

/// qemu-io on an export within `limit` (see `daemon_common::qemu_io_within`).
fn qemu_io_within(n: &Export, cmds: &[&str], limit: Duration) -> (String, Duration) {
    daemon_common::qemu_io_within(&n.uri, &n.log, cmds, limit)
}

fn no_panics(p: &Pair) {
    for n in [&p.a, &p.b] {
        assert!(
            !n.log_text().contains("panicked"),
            "{} panicked:\n{}",
            n.name,
            n.log_text()
        );
    }
}

/// a is primary without its peer: degraded, not connected, writes kept in the dirty map.
fn assert_degraded(p: &Pair) {
    let st = p.a.wait_for(10, "a degraded", |s| {
        s["state"] == "degraded" && s["connection"] != "connected"
    });
    assert!(u(&st, &["dirty_bytes"]) >= MIB, "{st}");
    assert!(p.a.log_contains("lost the peer", 10), "{}", p.a.log_text());
}

/// The link is healthy again: a reconnects and resyncs, `tandem verify` finds nothing, the data
/// regions are identical and each `(offset, len, byte)` written meanwhile is on b.
fn assert_healed(p: &Pair, written: &[(u64, u64, u8)]) {
    let start = Instant::now();
    p.a.ok(&["wait-sync", "r0", "--timeout", "60s"]);
    p.b.wait_for(30, "b complete", |s| s["state"] == "complete");
    eprintln!("resynced {:?} after the link healed", start.elapsed());
    let out = p.a.run(&["verify", "r0", "--rate", "0"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "verify: {}{}\nlog a:\n{}\nlog b:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        p.a.log_text(),
        p.b.log_text()
    );
    let size = u(&p.a.status(), &["data_size"]);
    assert!(
        same_data(&p.a.img, &p.b.img, size),
        "data regions differ after the resync"
    );
    for &(offset, len, byte) in written {
        assert!(
            region_is(&p.b.img, offset, len as usize, byte),
            "b lacks the write of {byte:#x} at {offset}"
        );
    }
    no_panics(p);
}

#[test]
fn a_stalled_link_degrades_the_primary_and_a_resync_heals_it() {
    if !need("qemu-io", "qemu-utils") {
        return;
    }
    let (p, proxy) = proxied_pair("fullsync");
    proxy.set(Fault::Stall);
    // No ack can come: the write completes once the link is declared dead, degraded.
    let (_, took) = qemu_io_within(
        &Export::of(&p.a),
        &["write -P 0x5a 6M 1M", "flush"],
        TIMEOUT + MARGIN,
    );
    eprintln!("write during the stall completed after {took:?}");
    assert_degraded(&p);
    proxy.set(Fault::Pass);
    assert_healed(&p, &[(6 * MIB, MIB, 0x5a)]);
}

#[test]
fn lost_acks_on_a_half_open_link_do_not_hang_the_primary() {
    if !need("qemu-io", "qemu-utils") {
        return;
    }
    let (p, proxy) = proxied_pair("fullsync");
    // a -> b still flows: b applies the write, but its ack (and pong) never reaches a.
    proxy.set(Fault::OneWay(Dir::AToB));
    let (_, took) = qemu_io_within(
        &Export::of(&p.a),
        &["write -P 0x6b 3M 2M", "flush"],
        TIMEOUT + MARGIN,
    );
    eprintln!("write with the acks lost completed after {took:?}");
    assert_degraded(&p);
    proxy.set(Fault::Pass);
    assert_healed(&p, &[(3 * MIB, 2 * MIB, 0x6b)]);
}

/// The other half-open link: b's frames (its pings) still reach a, a's never reach b. a must
/// not take b's pings for a link that works: its writes pile up unsent. b notices the
/// primary's silence after `timeout` and closes; the write completes degraded in about that
/// time, not after `daemon.flush_timeout` (30 s here), the patience a's sends have for a
/// secondary that talks but is busy with its disk.
#[test]
fn lost_frames_to_the_secondary_degrade_the_primary_within_the_timeout() {
    if !need("qemu-io", "qemu-utils") {
        return;
    }
    let (p, proxy) = proxied_pair("fullsync");
    proxy.set(Fault::OneWay(Dir::BToA));
    let (_, took) = qemu_io_within(
        &Export::of(&p.a),
        &["write -P 0x6c 3M 8M", "flush"],
        TIMEOUT + MARGIN,
    );
    eprintln!("write with a's frames lost completed after {took:?}");
    assert_degraded(&p);
    proxy.set(Fault::Pass);
    assert_healed(&p, &[(3 * MIB, 8 * MIB, 0x6c)]);
}

#[test]
fn a_link_cut_mid_frame_is_rejected_by_the_secondary_and_resynced() {
    if !need("qemu-io", "qemu-utils") {
        return;
    }
    let (p, proxy) = proxied_pair("fullsync");
    let before = proxy.accepted();
    // A few KiB into the burst: inside the first 4 MiB Write frame.
    proxy.set(Fault::CutAfter(5000 + 123));
    let (_, took) = qemu_io_within(
        &Export::of(&p.a),
        &[
            "write -P 0x77 8M 4M",
            "write -P 0x78 12M 4M",
            "write -P 0x79 16M 4M",
            "flush",
        ],
        TIMEOUT + MARGIN,
    );
    eprintln!("burst over the cut link completed after {took:?}");
    assert_eq!(proxy.fault(), Fault::Pass, "the cut never happened");
    assert!(
        p.b.log_contains(
            "primary connection lost: the connection ended in the middle of a frame",
            10
        ),
        "b does not say why the connection ended:\n{}",
        p.b.log_text()
    );
    assert!(p.a.log_contains("lost the peer", 10), "{}", p.a.log_text());
    assert_healed(
        &p,
        &[
            (8 * MIB, 4 * MIB, 0x77),
            (12 * MIB, 4 * MIB, 0x78),
            (16 * MIB, 4 * MIB, 0x79),
        ],
    );
    assert!(proxy.accepted() > before, "a never reconnected");
}

#[test]
fn acknowledged_writes_survive_a_flapping_link() {
    if !need("qemu-io", "qemu-utils") {
        return;
    }
    let (p, proxy) = proxied_pair("fullsync");
    const BLOCK: u64 = 64 << 10;
    const BASE: u64 = 20 * MIB;
    // A stamp per block (0 is what unwritten space holds); each offset is written once.
    let stamp = |i: u64| (i % 255 + 1) as u8;
    let acked = Arc::new(Mutex::new(Vec::new()));
    let done = Arc::new(AtomicBool::new(false));
    let writer = {
        let (acked, done) = (Arc::clone(&acked), Arc::clone(&done));
        let export = Export::of(&p.a);
        std::thread::spawn(move || {
            // Paced so that the writes span all the resets.
            for i in 0..400u64 {
                if done.load(Ordering::SeqCst) {
                    break;
                }
                let off = BASE + i * BLOCK;
                // qemu-io flushes on close: a success means the write was acknowledged.
                let (text, _) = qemu_io_within(
                    &export,
                    &[&format!("write -P {} {off} {BLOCK}", stamp(i))],
                    TIMEOUT + MARGIN,
                );
                assert!(text.contains("wrote"), "{text}");
                acked.lock().unwrap().push(i);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(800));
        proxy.reset();
    }
    done.store(true, Ordering::SeqCst);
    let w = writer.join();
    let acked = acked.lock().unwrap().clone();
    assert!(w.is_ok(), "the writer failed after {} writes", acked.len());
    eprintln!(
        "{} writes acknowledged over 10 resets; {} connections",
        acked.len(),
        proxy.accepted()
    );
    assert!(acked.len() >= 10, "too few writes to mean anything");
    assert!(proxy.accepted() >= 3, "a did not reconnect between resets");
    let written: Vec<_> = acked
        .iter()
        .map(|&i| (BASE + i * BLOCK, BLOCK, stamp(i)))
        .collect();
    for &(offset, len, byte) in &written {
        assert!(
            region_is(&p.a.img, offset, len as usize, byte),
            "a lacks its acknowledged write {byte} at {offset}"
        );
    }
    assert_healed(&p, &written);
}
