//! FLUSH on a replicated export while the secondary's disk is slow to flush (`--features
//! faults`: `tandem fault RES slow-sync SECONDS` makes every fdatasync of that node's disk
//! take that much longer). A FLUSH must wait for the secondary's fdatasync; the writes of
//! other clients must not, a slow fdatasync must not look like a dead peer, and one that never
//! returns must not hold the primary's FLUSH for longer than `daemon.flush_timeout`. The same
//! holds for the durable header writes the secondary makes at the start and the end of a
//! resync, and a disk slow to write zeroes (`slow-zero MS`: MS per MiB) or to read
//! (`slow-read MS`) must not make a large discard or a verify look like a dead peer either, nor
//! one slow to write (`slow-write MS`) a large write or a resync.

mod daemon_common;
mod fault_proxy;

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use daemon_common::*;
use fault_proxy::{Fault, FaultProxy};

const NBD_CMD_WRITE: u16 = 1;
const NBD_CMD_FLUSH: u16 = 3;

/// Send one request and read its simple reply: the reply's error, and how long it took.
fn request(
    c: &mut UnixStream,
    kind: u16,
    handle: u64,
    offset: u64,
    data: &[u8],
) -> (u32, Duration) {
    let t = Instant::now();
    assert!(
        nbd_send(c, kind, handle, offset, data),
        "the export went away"
    );
    let (h, error) = nbd_reply(c).expect("no reply: the export went away");
    assert_eq!(h, handle);
    (error, t.elapsed())
}

/// A FLUSH sent from a thread of its own: its error and how long it took.
fn flush_in_background(sock: PathBuf) -> thread::JoinHandle<(u32, Duration)> {
    thread::spawn(move || {
        let mut c = nbd_connect(&sock);
        request(&mut c, NBD_CMD_FLUSH, 7, 0, &[])
    })
}

/// The secondary takes 4 s to flush, longer than `daemon.timeout` (3 s here). A FLUSH on the
/// primary waits for that (its data must be durable on both nodes), but a write from another
/// client, sent while the flush is running, is answered at once: a flush is not a barrier for
/// the writes after it. And a secondary busy flushing is not a dead peer: the link stays.
#[test]
fn a_slow_flush_on_the_secondary_holds_up_the_flush_and_not_other_writes() {
    if !need("qemu-io", "qemu-utils") {
        return;
    }
    let p = synced_pair("fullsync");
    p.a.qemu_io_ok(&["write -P 0x11 0 1M"]);
    p.b.ok(&["fault", "r0", "slow-sync", "4"]);
    let flush = flush_in_background(p.a.nbd.clone());
    thread::sleep(Duration::from_millis(500));
    let mut c = nbd_connect(&p.a.nbd);
    let mut took = Vec::new();
    for i in 0..4u64 {
        let (err, t) = request(
            &mut c,
            NBD_CMD_WRITE,
            100 + i,
            (2 << 20) + i * 4096,
            &[0x5c; 4096],
        );
        assert_eq!(err, 0, "write {i} failed");
        took.push(t);
    }
    let (err, flush_took) = flush.join().unwrap();
    eprintln!("writes during the slow flush: {took:?}; the flush: {flush_took:?}");
    assert_eq!(err, 0, "the FLUSH failed");
    let worst = took.iter().max().copied().unwrap_or_default();
    assert!(
        worst < Duration::from_millis(1500),
        "writes sent during the secondary's slow fdatasync took {took:?}: they waited for it"
    );
    assert!(
        flush_took >= Duration::from_millis(3500),
        "the FLUSH returned after {flush_took:?}, before the secondary's fdatasync (4 s) could end"
    );
    a_kept_the_link(&p, "that was flushing");
    assert!(
        region_is(&p.b.img, 2 << 20, 4 * 4096, 0x5c),
        "the writes are not on b"
    );
    p.b.ok(&["fault", "r0", "clear"]);
}

/// The secondary's fdatasync does not return (a hung disk). The primary's FLUSH must not hang
/// with it: within about `daemon.flush_timeout` (3 s here) the link is given up, the FLUSH
/// completes on the primary alone, and once the fault is cleared the pair reconnects and
/// resyncs.
#[test]
fn a_secondary_whose_flush_never_returns_is_given_up_within_the_flush_timeout() {
    if !need("qemu-io", "qemu-utils") {
        return;
    }
    let p = pair_with_flush_timeout_3s();
    p.a.qemu_io_ok(&["write -P 0x22 0 1M"]);
    // 10 s stands for "never" here: long enough to tell a FLUSH given up after 3 s from one
    // that waited it out; short enough that a reconnection racing the `clear` below (its
    // first fdatasync may still be slow) is in sync well within the 30 s.
    p.b.ok(&["fault", "r0", "slow-sync", "10"]);
    let flush = flush_in_background(p.a.nbd.clone());
    let (err, flush_took) = flush.join().unwrap();
    eprintln!("the FLUSH: {flush_took:?}");
    assert_eq!(err, 0, "the FLUSH failed: the primary's own disk is fine");
    assert!(
        flush_took < Duration::from_secs(7),
        "the FLUSH took {flush_took:?} with daemon.flush_timeout = 3s: it waited for a hung secondary"
    );
    a_gave_b_up(&p);
    p.b.ok(&["fault", "r0", "clear"]);
    p.a.ok(&["wait-sync", "r0", "--timeout", "30s"]);
    let st = p.a.status();
    assert_eq!(st["connection"], "connected", "{st}");
    assert!(region_is(&p.b.img, 0, 1 << 20, 0x22));
}

/// A synced pair whose nodes have `daemon.flush_timeout` = 3 s (and `timeout` 3 s).
fn pair_with_flush_timeout_3s() -> Pair {
    synced_pair_with("fullsync", |p| {
        for n in [&p.a, &p.b] {
            n.edit_conf(
                "timeout = \"3s\"\n",
                "timeout = \"3s\"\nflush_timeout = \"3s\"\n",
            );
        }
    })
}

/// a kept the link to b, busy with its disk (`busy` says how, for the message) but not
/// dead: still connected, and never lost meanwhile.
fn a_kept_the_link(p: &Pair, busy: &str) {
    let st = p.a.status();
    assert_eq!(st["connection"], "connected", "{st}");
    assert!(
        !p.a.log_text().contains("lost the peer"),
        "a dropped the link to a secondary {busy}: {}",
        p.a.log_text()
    );
}

/// a dropped the link to b, whose disk hangs, and its log says why in b's words.
fn a_gave_b_up(p: &Pair) {
    assert!(
        p.a.log_contains("lost the peer", 10),
        "a kept the link to a secondary whose disk hangs: {}",
        p.a.log_text()
    );
    assert!(
        p.a.log_contains("the disk hangs", 5),
        "a's log does not say why b gave the link up: {}",
        p.a.log_text()
    );
    eprintln!("{}", why_b_left(p));
}

/// a's log line that says why b gave the link up.
fn why_b_left(p: &Pair) -> String {
    let log = p.a.log_text();
    let line = log.lines().find(|l| l.contains("the disk hangs"));
    line.unwrap_or_default().to_string()
}

/// A synced pair whose a reaches b only through a fault proxy (in `Pass`), with `extra` added
/// to both nodes' `[daemon]` section.
fn proxied_pair(extra: &str) -> (Pair, FaultProxy) {
    let mut proxy = None;
    let p = synced_pair_with("fullsync", |p| {
        for n in [&p.a, &p.b] {
            n.edit_conf("timeout = \"3s\"\n", &format!("timeout = \"3s\"\n{extra}"));
        }
        let fp = FaultProxy::start(format!("{}:{}", p.b.ip, p.b.port).parse().unwrap());
        p.route_via("a", fp.addr);
        proxy = Some(fp);
    });
    (p, proxy.unwrap())
}

/// Cut the link and write 2 MiB on a alone (dirty extents to resync); the link stays cut.
fn cut_and_write_alone(p: &Pair, proxy: &FaultProxy, byte: u8) {
    proxy.set(Fault::Stall);
    proxy.reset();
    p.a.wait_for(20, "a degraded", |s| s["connection"] != "connected");
    p.a.qemu_io_ok(&[&format!("write -P {byte:#x} 4M 2M")]);
    let st = p.a.status();
    assert!(u(&st, &["dirty_bytes"]) >= 2 << 20, "{st}");
}

/// How many syncs a has begun so far (its log).
fn syncs_started(p: &Pair) -> usize {
    p.a.log_text().matches("to the peer started").count()
}

/// The secondary's disk takes 4 s per fdatasync, longer than `daemon.timeout` (3 s), while a
/// resync runs; b writes its header durably as the resync starts and as it ends. The resync
/// must complete on its first attempt. Before, b answered nothing while it wrote its header, a
/// took it for dead after 3 s, and the next connection began the same resync: the pair never
/// got back in sync while b's disk was slow.
#[test]
fn a_resync_completes_while_the_secondarys_header_writes_are_slow() {
    if !need("qemu-io", "qemu-utils") {
        return;
    }
    let (p, proxy) = proxied_pair("");
    cut_and_write_alone(&p, &proxy, 0x33);
    p.b.ok(&["fault", "r0", "slow-sync", "4"]);
    let before = syncs_started(&p);
    let t = Instant::now();
    proxy.set(Fault::Pass);
    // Each of b's fdatasyncs takes 4 s: the header at the start, the Flushes, and at the end
    // the data, the dirty map and the header again: about 25 s for one resync.
    let out = p.a.run(&["wait-sync", "r0", "--timeout", "60s"]);
    let log = p.a.log_text();
    assert!(
        out.status.success(),
        "the resync did not complete while b's disk was slow: {}\na's log:\n{log}\nb's log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        p.b.log_text()
    );
    let took = t.elapsed();
    eprintln!("the resync with b's fdatasyncs 4 s slow took {took:?}");
    assert!(
        took >= Duration::from_secs(8),
        "the resync took {took:?}: b's slow fdatasyncs (header, data) did not slow it, so this \
         test did not test them"
    );
    let attempts = syncs_started(&p) - before;
    assert_eq!(
        attempts, 1,
        "the resync took {attempts} attempts: a gave up on b while b wrote its header\n{log}"
    );
    p.b.ok(&["fault", "r0", "clear"]);
    assert!(
        region_is(&p.b.img, 4 << 20, 2 << 20, 0x33),
        "the resync did not reach b"
    );
}

/// As above, but b's disk hangs (every fdatasync 10 s, `daemon.flush_timeout` 3 s): b keeps
/// the link alive while it writes its header no longer than `flush_timeout`, then gives the
/// connection up, so a is not held by a hung peer; once the disk recovers the pair resyncs.
#[test]
fn a_secondary_whose_header_write_hangs_gives_the_link_up_within_the_flush_timeout() {
    if !need("qemu-io", "qemu-utils") {
        return;
    }
    let (p, proxy) = proxied_pair("flush_timeout = \"3s\"\n");
    cut_and_write_alone(&p, &proxy, 0x44);
    p.b.ok(&["fault", "r0", "slow-sync", "10"]);
    proxy.set(Fault::Pass);
    assert!(
        p.b.log_contains("writing the header on", 20),
        "b did not give up a header write that hangs: {}",
        p.b.log_text()
    );
    assert!(
        p.a.log_contains("the disk hangs", 5),
        "a's log does not say why b gave the link up: {}",
        p.a.log_text()
    );
    eprintln!("{}", why_b_left(&p));
    // a, meanwhile, is not stuck with it: a write completes (degraded) well before the
    // hung fdatasync would have returned by itself.
    let (text, took) = qemu_io_within(
        &p.a.nbd_uri(),
        &p.a.log,
        &["write -P 0x45 8M 64k"],
        Duration::from_secs(20),
    );
    assert!(text.contains("wrote"), "{text}");
    eprintln!("a write on a during b's hung header write took {took:?}");
    p.b.ok(&["fault", "r0", "clear"]);
    p.a.ok(&["wait-sync", "r0", "--timeout", "60s"]);
    assert!(region_is(&p.b.img, 4 << 20, 2 << 20, 0x44));
    assert!(region_is(&p.b.img, 8 << 20, 64 << 10, 0x45));
}

/// A discard of 48 MiB (mkfs discards a whole device, up to 4 GiB a request) on a secondary
/// whose disk writes zeroes at 150 ms per MiB: 7 s of work, longer than `daemon.timeout`
/// (3 s). The primary waits for it (fullsync), but must not take the busy secondary for a
/// dead one: the link stays up, and the zeroes are on both disks.
#[test]
fn a_large_discard_on_a_secondary_slow_to_zero_keeps_the_link() {
    if !need("qemu-io", "qemu-utils") {
        return;
    }
    let p = synced_pair("fullsync");
    p.a.qemu_io_ok(&["write -P 0x66 0 48M"]);
    p.b.ok(&["fault", "r0", "slow-zero", "150"]);
    let t = Instant::now();
    p.a.qemu_io_ok(&["write -z 0 48M"]);
    let took = t.elapsed();
    eprintln!("a 48 MiB zeroing with b's disk at 150 ms/MiB took {took:?}");
    p.b.ok(&["fault", "r0", "clear"]);
    a_kept_the_link(&p, "busy zeroing");
    assert!(
        took >= Duration::from_secs(5),
        "the zeroing took {took:?}: b's slow zeroing did not slow it, so this test did not test it"
    );
    assert!(
        region_is(&p.b.img, 0, 48 << 20, 0),
        "the zeroes are not on b"
    );
}

/// A synced pair with 16 MiB extents (a verify then hashes 16 MiB at a time).
fn synced_pair_16m_extents() -> Pair {
    synced_pair_with("fullsync", |p| {
        for n in [&p.a, &p.b] {
            n.edit_conf("extent_size = \"1M\"\n", "extent_size = \"16M\"\n");
            let out = tandem(n, &["create", "r0", "--force"]);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    })
}

/// `tandem verify` with 16 MiB extents while the secondary's disk reads at 250 ms per MiB: b
/// takes 4 s to hash each extent, longer than `daemon.timeout` (3 s). A secondary busy
/// hashing is not a dead one: the verify completes and finds the replicas identical, and the
/// link stays up.
#[test]
fn a_verify_of_large_extents_on_a_secondary_slow_to_read_keeps_the_link() {
    if !need("qemu-io", "qemu-utils") {
        return;
    }
    let p = synced_pair_16m_extents();
    p.a.qemu_io_ok(&["write -P 0x88 0 40M"]);
    p.b.ok(&["fault", "r0", "slow-read", "250"]);
    let t = Instant::now();
    let out = p.a.run(&["verify", "r0", "--rate", "0"]);
    let took = t.elapsed();
    p.b.ok(&["fault", "r0", "clear"]);
    eprintln!("verify with b's reads at 250 ms/MiB took {took:?}");
    assert!(
        out.status.success(),
        "verify failed: {}{}\na's log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        p.a.log_text()
    );
    a_kept_the_link(&p, "busy hashing");
    assert!(
        took >= Duration::from_secs(8),
        "the verify took {took:?}: b's slow reads did not slow it, so this test did not test them"
    );
}

/// While b hashes for a verify (4 s an extent here, pinging meanwhile) it reads no frames, and
/// a client writes 48 MiB on a: more than the sockets between them hold, so a's sends wait for
/// b longer than `daemon.timeout` (3 s). b is busy, not dead (it pings): a must wait for it,
/// not drop the link; the writes and the verify complete, the link stays up.
#[test]
fn writes_queued_behind_a_busy_secondary_wait_for_it_instead_of_dropping_the_link() {
    if !need("qemu-io", "qemu-utils") {
        return;
    }
    let p = synced_pair_16m_extents();
    p.b.ok(&["fault", "r0", "slow-read", "250"]);
    let conf = p.a.conf.clone();
    let t = Instant::now();
    let verify = thread::spawn(move || {
        run_argv(&[
            BIN,
            "-c",
            conf.to_str().unwrap(),
            "verify",
            "r0",
            "--rate",
            "0",
        ])
    });
    thread::sleep(Duration::from_millis(1500));
    p.a.qemu_io_ok(&["write -P 0x99 0 48M"]);
    let wrote = t.elapsed();
    let out = verify.join().unwrap();
    p.b.ok(&["fault", "r0", "clear"]);
    eprintln!("48 MiB written during the verify after {wrote:?}");
    a_kept_the_link(&p, "busy hashing");
    assert!(
        out.status.success(),
        "verify failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        region_is(&p.b.img, 0, 48 << 20, 0x99),
        "the writes are not on b"
    );
}

/// One 32 MiB write (the largest request the export takes) on a secondary whose disk writes at
/// 250 ms per MiB: b is inside one write of its disk (in pieces of 256 KiB) for 8 s, longer
/// than `daemon.timeout` (3 s). The primary waits for it (fullsync), but a secondary busy
/// writing is not a dead one: the link stays up and the data is on b.
#[test]
fn a_large_write_on_a_secondary_slow_to_write_keeps_the_link() {
    if !need("qemu-io", "qemu-utils") {
        return;
    }
    let p = synced_pair("fullsync");
    p.b.ok(&["fault", "r0", "slow-write", "250"]);
    let t = Instant::now();
    p.a.qemu_io_ok(&["write -P 0x5e 0 32M"]);
    let took = t.elapsed();
    eprintln!("a 32 MiB write with b's disk at 250 ms/MiB took {took:?}");
    p.b.ok(&["fault", "r0", "clear"]);
    a_kept_the_link(&p, "busy writing");
    assert!(
        took >= Duration::from_secs(6),
        "the write took {took:?}: b's slow writes did not slow it, so this test did not test them"
    );
    assert!(
        region_is(&p.b.img, 0, 32 << 20, 0x5e),
        "the write is not on b"
    );
}

/// A resync onto a secondary whose disk takes 4 s for every MiB written: each 1 MiB sync
/// chunk keeps b inside one write of its disk for longer than `daemon.timeout` (3 s). The
/// resync must complete on its first attempt, not be restarted by every chunk.
#[test]
fn a_resync_completes_on_a_secondary_slow_to_write() {
    if !need("qemu-io", "qemu-utils") {
        return;
    }
    let (p, proxy) = proxied_pair("");
    cut_and_write_alone(&p, &proxy, 0x3c);
    p.b.ok(&["fault", "r0", "slow-write", "4000"]);
    let before = syncs_started(&p);
    let t = Instant::now();
    proxy.set(Fault::Pass);
    let out = p.a.run(&["wait-sync", "r0", "--timeout", "60s"]);
    let took = t.elapsed();
    p.b.ok(&["fault", "r0", "clear"]);
    let log = p.a.log_text();
    assert!(
        out.status.success(),
        "the resync did not complete while b's disk was slow to write: {}\na's log:\n{log}",
        String::from_utf8_lossy(&out.stderr),
    );
    eprintln!("the resync of 2 MiB with b's writes at 4 s/MiB took {took:?}");
    assert!(
        took >= Duration::from_secs(6),
        "the resync took {took:?}: b's slow writes did not slow it, so this test did not test them"
    );
    let attempts = syncs_started(&p) - before;
    assert_eq!(
        attempts, 1,
        "the resync took {attempts} attempts: a gave up on b while b wrote a chunk\n{log}"
    );
    assert!(
        region_is(&p.b.img, 4 << 20, 2 << 20, 0x3c),
        "the resync did not reach b"
    );
}

/// b's disk hangs in a write (10 s per MiB, `daemon.flush_timeout` 3 s): b keeps the link no
/// longer than `flush_timeout` while it is stuck, then gives it up saying why, so a's client
/// is not held by a hung peer; the write completes on a alone, and once the disk recovers the
/// pair resyncs.
#[test]
fn a_secondary_whose_write_hangs_gives_the_link_up_within_the_flush_timeout() {
    if !need("qemu-io", "qemu-utils") {
        return;
    }
    let p = pair_with_flush_timeout_3s();
    p.b.ok(&["fault", "r0", "slow-write", "10000"]);
    let (text, took) = qemu_io_within(
        &p.a.nbd_uri(),
        &p.a.log,
        &["write -P 0x4e 1M 1M"],
        Duration::from_secs(20),
    );
    eprintln!("a 1 MiB write while b's write hangs took {took:?}");
    assert!(text.contains("wrote"), "{text}");
    assert!(
        took < Duration::from_secs(8),
        "the write took {took:?} with daemon.flush_timeout = 3s: it waited for a hung secondary"
    );
    a_gave_b_up(&p);
    p.b.ok(&["fault", "r0", "clear"]);
    p.a.ok(&["wait-sync", "r0", "--timeout", "60s"]);
    assert!(region_is(&p.b.img, 1 << 20, 1 << 20, 0x4e));
}
