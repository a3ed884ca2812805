//! Power cuts through the daemon's own fault layer (`--features faults`): a daemon started with
//! `TANDEM_FAULTS=power-loss` keeps its unsynced writes in memory, and `tandem fault RES
//! power-cut` drops them and ends it at once, as a machine losing power. Each scenario asserts
//! what the user would find on the disks and in `status` after the machine comes back.

mod daemon_common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use daemon_common::*;

const POWER_LOSS: &[(&str, &str)] = &[("TANDEM_FAULTS", "power-loss")];

/// `tandem fault r0 power-cut` on `n`, then wait until its daemon is gone.
fn power_cut(n: &mut Node) {
    n.ok(&["fault", "r0", "power-cut"]);
    let st = n.wait_exit(20);
    assert!(!st.success(), "a power cut is not a clean exit: {st}");
}

/// A pair like `synced_pair`, with `a`'s and `b`'s daemons started with `env_a` and `env_b`.
fn synced_pair_env(env_a: &[(&str, &str)], env_b: &[(&str, &str)]) -> Pair {
    let mut p = Pair::new("fullsync");
    p.a.start_with_env(env_a);
    p.b.start_with_env(env_b);
    p.b.ok(&["role", "secondary", "r0"]);
    p.a.ok(&["role", "primary", "r0"]);
    p.a.ok(&["wait-sync", "r0", "--timeout", "60s"]);
    p.b.wait_for(30, "secondary complete", |s| s["state"] == "complete");
    p
}

/// The secondary loses power right after acknowledging a write that no FLUSH covered: the
/// write was only in its page cache and is gone. The primary then dies too, and the secondary
/// is promoted and written. When the old primary returns, both nodes hold data the other
/// lacks: split-brain on the old primary, whose copy of the acknowledged write stays intact.
#[test]
fn power_cut_of_the_secondary_then_its_promotion_is_split_brain_not_an_overwrite() {
    if !need("qemu-io", "qemu-utils") || !need("fio", "fio") {
        return;
    }
    let mut p = synced_pair_env(&[], POWER_LOSS);
    let size = u(&p.a.status(), &["data_size"]);
    write_unflushed(&p.a, 0xaa, 1 << 20, 65536);
    // Acknowledged by b (fullsync), but only in b's page cache.
    assert!(
        !region_is(&p.b.img, 1 << 20, 65536, 0xaa),
        "b made the unflushed write durable: the power cut below loses nothing"
    );
    power_cut(&mut p.b);
    assert!(region_is(&p.b.img, 1 << 20, 65536, 0));
    assert!(
        p.a.log_contains("lost the peer", 20),
        "a did not notice: {}",
        p.a.log_text()
    );
    p.a.kill9();
    p.b.start_with_env(POWER_LOSS);
    p.b.ok(&["role", "primary", "r0"]);
    p.b.qemu_io_ok(&["write -P 0xbb 8M 64k", "flush"]);
    p.a.start();
    p.a.ok(&["role", "secondary", "r0"]);
    let sa =
        p.a.wait_for(30, "split-brain on a", |s| s["state"] == "split-brain");
    assert_ne!(sa["connection"], "connected", "{sa}");
    assert!(
        region_is(&p.a.img, 1 << 20, 65536, 0xaa),
        "the old primary's acknowledged write was overwritten"
    );
    assert!(!same_data(&p.a.img, &p.b.img, size));
}

// ---------------------------------------------------------------------------------------------
// A pipelined NBD writer that knows which writes a FLUSH made durable
// ---------------------------------------------------------------------------------------------

const CMD_WRITE: u16 = 1;
const CMD_FLUSH: u16 = 3;
const BLOCK: usize = 4096;
/// Blocks written in turn, one per `STRIDE` bytes from `BASE`: 16 extents of 1 MiB.
const BLOCKS: u64 = 256;
const BASE: u64 = 4 << 20;
const STRIDE: u64 = 64 << 10;
/// Requests in flight at once.
const WINDOW: usize = 8;
/// A FLUSH after every this many writes.
const FLUSH_EVERY: u64 = 64;

fn block_offset(b: u64) -> u64 {
    BASE + b * STRIDE
}

/// Write number `seq` (from 1): its block, filled with `seq` as little-endian u64s.
fn stamp(seq: u64) -> (u64, Vec<u8>) {
    let block = seq % BLOCKS;
    (block, seq.to_le_bytes().repeat(BLOCK / 8))
}

/// What the writer saw before its connection died.
struct Written {
    /// Per block, the newest write acknowledged before an acknowledged FLUSH was sent.
    durable: HashMap<u64, u64>,
    /// Every write sent (whether or not acknowledged): what a block may hold.
    sent: u64,
    acked: u64,
    flushes: u64,
    /// Replies with an error.
    failed: u64,
}

/// Stamp blocks through the export at `sock`, `WINDOW` writes in flight and a FLUSH every
/// `FLUSH_EVERY`, until `limit` writes or the server is gone; `started` gets a message once
/// 4 FLUSHes are acknowledged.
fn write_until_gone(sock: &Path, limit: u64, started: mpsc::Sender<()>) -> Written {
    let mut s = nbd_connect(sock);
    // Handles: writes are their sequence number; a FLUSH is 1 << 63 | its number.
    const FLUSH: u64 = 1 << 63;
    let mut acked_newest: HashMap<u64, u64> = HashMap::new();
    let mut flush_snapshots: HashMap<u64, HashMap<u64, u64>> = HashMap::new();
    let mut w = Written {
        durable: HashMap::new(),
        sent: 0,
        acked: 0,
        flushes: 0,
        failed: 0,
    };
    let mut in_flight = 0usize;
    let mut told = false;
    let mut flushed_at = 0;
    loop {
        while in_flight < WINDOW && w.sent < limit {
            let sent_ok = if w.sent % FLUSH_EVERY == 0 && flushed_at != w.sent {
                // A FLUSH covers the writes whose replies came before it was sent.
                flushed_at = w.sent;
                flush_snapshots.insert(FLUSH | w.sent, acked_newest.clone());
                nbd_send(&mut s, CMD_FLUSH, FLUSH | w.sent, 0, &[])
            } else {
                w.sent += 1;
                let (block, data) = stamp(w.sent);
                nbd_send(&mut s, CMD_WRITE, w.sent, block_offset(block), &data)
            };
            if !sent_ok {
                return w;
            }
            in_flight += 1;
        }
        if in_flight == 0 {
            return w;
        }
        let Some((handle, error)) = nbd_reply(&mut s) else {
            return w;
        };
        in_flight -= 1;
        if error != 0 {
            w.failed += 1;
            continue;
        }
        if handle & FLUSH != 0 {
            let snap = flush_snapshots.remove(&handle).unwrap();
            for (b, seq) in snap {
                let d = w.durable.entry(b).or_insert(0);
                *d = (*d).max(seq);
            }
            w.flushes += 1;
            if !told && w.flushes >= 4 {
                told = true;
                let _ = started.send(());
            }
        } else {
            w.acked += 1;
            let e = acked_newest.entry(handle % BLOCKS).or_insert(0);
            *e = (*e).max(handle);
        }
    }
}

/// Every write acknowledged before an acknowledged FLUSH is in `img` (or a newer write sent to
/// the same block); no block holds a mix of writes or a write never sent.
fn check_stamps(img: &Path, w: &Written) -> Result<(), String> {
    for b in 0..BLOCKS {
        let data = region(img, block_offset(b), BLOCK);
        let seq = u64::from_le_bytes(data[..8].try_into().unwrap());
        if data != seq.to_le_bytes().repeat(BLOCK / 8) {
            return Err(format!("block {b} holds a mix of writes"));
        }
        let durable = w.durable.get(&b).copied().unwrap_or(0);
        if seq < durable {
            return Err(format!(
                "block {b} holds write {seq}, older than write {durable} that a FLUSH covered"
            ));
        }
        if seq != 0 && (seq % BLOCKS != b || seq > w.sent) {
            return Err(format!("block {b} holds write {seq}, never sent to it"));
        }
    }
    Ok(())
}

/// The primary loses power under a stream of writes and FLUSHes. Every write acknowledged
/// before an acknowledged FLUSH is on both nodes: on the secondary at once, and on the primary
/// after it comes back and resyncs; then `tandem verify` finds the replicas identical.
#[test]
fn power_cut_of_the_primary_under_writes_keeps_every_flushed_write() {
    let mut p = synced_pair_env(POWER_LOSS, &[]);
    let (tx, rx) = mpsc::channel();
    let sock = p.a.nbd.clone();
    let writer = std::thread::spawn(move || write_until_gone(&sock, 200_000, tx));
    rx.recv_timeout(Duration::from_secs(60))
        .expect("the writer did not get going");
    power_cut(&mut p.a);
    let w = writer.join().unwrap();
    eprintln!(
        "{} writes sent, {} acknowledged, {} flushes acknowledged, {} requests failed",
        w.sent, w.acked, w.flushes, w.failed
    );
    assert!(w.sent < 200_000, "the power cut came after the last write");
    assert!(w.flushes >= 4);
    // The secondary was not cut: everything it acknowledged is in its file. The primary's
    // disk has what its FLUSHes made durable, and lacks what the power cut took.
    check_stamps(&p.b.img, &w).unwrap_or_else(|e| panic!("secondary: {e}"));
    check_stamps(&p.a.img, &w).unwrap_or_else(|e| panic!("primary after the cut: {e}"));
    let lost = (0..BLOCKS)
        .filter(|&b| region(&p.a.img, block_offset(b), 8) != region(&p.b.img, block_offset(b), 8))
        .count();
    eprintln!("{lost} blocks lost their newest write with the primary's power");
    assert!(
        p.b.log_contains("event disconnect", 20),
        "b did not notice: {}",
        p.b.log_text()
    );
    p.a.start();
    p.a.ok(&["role", "primary", "r0"]);
    p.a.ok(&["wait-sync", "r0", "--timeout", "60s"]);
    p.b.wait_for(30, "secondary complete", |s| s["state"] == "complete");
    check_stamps(&p.a.img, &w).unwrap_or_else(|e| panic!("primary after restart: {e}"));
    check_stamps(&p.b.img, &w).unwrap_or_else(|e| panic!("secondary after resync: {e}"));
    let out = p.a.run(&["verify", "r0"]);
    assert!(
        out.status.success(),
        "verify: {}{}\nlog a:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        p.a.log_text()
    );
}

/// The power cut of the previous test, but the secondary returns as secondary: the primary's
/// data is newer, and the write the secondary lost is resynced to it.
#[test]
fn power_cut_of_the_secondary_resyncs_the_write_it_lost() {
    if !need("fio", "fio") {
        return;
    }
    let mut p = synced_pair_env(&[], POWER_LOSS);
    let size = u(&p.a.status(), &["data_size"]);
    write_unflushed(&p.a, 0xaa, 1 << 20, 65536);
    power_cut(&mut p.b);
    assert!(region_is(&p.b.img, 1 << 20, 65536, 0));
    assert!(p.a.log_contains("lost the peer", 20));
    p.b.start();
    p.b.ok(&["role", "secondary", "r0"]);
    p.a.ok(&["wait-sync", "r0", "--timeout", "60s"]);
    p.b.wait_for(30, "b complete", |s| s["state"] == "complete");
    assert!(region_is(&p.b.img, 1 << 20, 65536, 0xaa));
    assert!(same_data(&p.a.img, &p.b.img, size));
}

/// `tandem status --json r0` (the CLI, as an administrator or a script runs it): r0's entry.
fn cli_status(n: &Node) -> serde_json::Value {
    let out = n.run(&["status", "--json", "r0"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "tandem status --json on {}: {e}: {}{}",
            n.name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    v["resources"][0].clone()
}

/// The primary's local disk fails (EIO on every read and write of its data region): the
/// export keeps serving from the peer, as hastd and DRBD (`on-io-error detach`) do. Reads
/// return the data, writes land on the peer, `status` says diskless, the hook hears
/// `disk-failed`; the diskless node refuses to become primary again, and the peer, promoted,
/// has every write.
#[test]
fn a_failed_local_disk_keeps_the_export_serving_from_the_peer() {
    if !need("qemu-io", "qemu-utils") {
        return;
    }
    let p = synced_pair_env(&[], &[]);
    let size = u(&p.a.status(), &["data_size"]);
    p.a.qemu_io_ok(&["write -P 0x5a 1M 64k", "flush"]);
    p.a.ok(&["fault", "r0", "eio", "rw", "0", &size.to_string()]);
    p.a.qemu_io_ok(&["read -P 0x5a 1M 64k"]);
    let st = p.a.status();
    assert_eq!(st["state"], "diskless", "{st}");
    assert!(
        p.a.log_text()
            .contains("serving reads and writes from the peer")
    );
    // What the administrator reads: `tandem status` says diskless too, in JSON and in the
    // table (it said degraded: the disk failure was invisible there).
    let cli = cli_status(&p.a);
    assert_eq!(cli["state"], "diskless", "{cli}");
    p.a.qemu_io_ok(&["write -P 0x77 2M 64k", "flush", "read -P 0x77 2M 64k"]);
    assert!(
        region_is(&p.b.img, 2 << 20, 65536, 0x77),
        "the write did not reach the peer"
    );
    assert!(
        !region_is(&p.a.img, 2 << 20, 65536, 0x77),
        "the failed disk took a write"
    );
    assert!(
        hook_log(&p).lines().any(|l| l == "disk-failed r0"),
        "{}",
        hook_log(&p)
    );
    // The peer holds every write and says it is in sync: under Pacemaker its score (10000)
    // then outranks the diskless primary's (1000) and the promotion moves to the copy with a
    // disk (tandem ocf).
    let sb = p.b.status();
    assert_eq!(sb["state"], "complete", "{sb}");
    // Hand over: the diskless node steps down and may not come back as primary.
    p.a.ok(&["role", "secondary", "r0"]);
    // Stepped down, it still has no disk, and says so.
    assert_eq!(p.a.status()["state"], "diskless");
    let out = p.a.run(&["status", "r0"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("diskless"), "{table}");
    p.b.ok(&["role", "primary", "r0"]);
    p.b.qemu_io_ok(&["read -P 0x5a 1M 64k", "read -P 0x77 2M 64k"]);
    p.b.ok(&["role", "secondary", "r0"]);
    let out = p.a.run(&["role", "primary", "r0"]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("local disk failed"));
}

/// A header update torn after its first sector (where all of the header lives) by a power
/// cut: the restarted daemon opens the disk from the other header slot.
#[test]
fn a_torn_header_write_leaves_a_disk_that_opens() {
    let mut p = synced_pair_env(&[], &[]);
    // The two header slots are the last two 4 KiB blocks; demoting writes one of them.
    let slots = (IMG_SIZE - 8192).to_string();
    p.a.ok(&["fault", "r0", "torn", &slots, "8192", "1"]);
    let out = p.a.run(&["role", "secondary", "r0"]);
    assert!(!out.status.success(), "the demote outlived its torn write");
    let st = p.a.wait_exit(20);
    assert!(!st.success(), "{st}");
    assert!(
        p.a.log_text().contains("torn after 512 bytes"),
        "{}",
        p.a.log_text()
    );
    p.a.start();
    let st = p.a.status();
    assert_eq!(st["role"], "init", "{st}");
    assert!(st["error"].is_null(), "{st}");
}

/// The primary's disk fails (the data region only: its header still takes writes) and it goes
/// on diskless: a flushed write lands on the peer alone. The machine then restarts and the
/// disk reads again. Its data is stale: the node must not become primary over it, neither
/// with the peer down (its own header says so) nor with the peer up (the peer says so);
/// before, it was promoted and resynced its stale copy over the peer's, and the flushed write
/// was gone from both. Promoted, the peer has the write, and the old primary gets it back.
#[test]
fn a_primary_whose_disk_failed_is_not_promoted_over_the_peer_after_a_restart() {
    if !need("qemu-io", "qemu-utils") {
        return;
    }
    let mut p = synced_pair_env(&[], &[]);
    let size = u(&p.a.status(), &["data_size"]);
    diskless_with_a_flushed_write(&p, size);
    p.a.kill9();
    p.b.stop();
    p.a.start();
    refused_as_primary(&p.a, "with the peer down");
    p.b.start();
    p.b.ok(&["role", "secondary", "r0"]);
    refused_as_primary(&p.a, "over the peer");
    hand_back(&p);
}

/// As above, but the whole disk fails, header included: nothing can be recorded on it, and
/// only the peer knows that it holds the only copy. The restarted node must still not be
/// promoted over it.
#[test]
fn a_primary_whose_whole_disk_failed_is_not_promoted_over_the_peer_after_a_restart() {
    if !need("qemu-io", "qemu-utils") {
        return;
    }
    let mut p = synced_pair_env(&[], &[]);
    diskless_with_a_flushed_write(&p, IMG_SIZE);
    p.a.kill9();
    p.a.start();
    refused_as_primary(&p.a, "over the peer");
    hand_back(&p);
}

/// a's disk fails from offset 0 for `len` bytes after a write of 0x5a at 1 MiB; a flushed
/// write of 0x77 at 2 MiB then lands on b alone.
fn diskless_with_a_flushed_write(p: &Pair, len: u64) {
    p.a.qemu_io_ok(&["write -P 0x5a 1M 64k", "flush"]);
    p.a.ok(&["fault", "r0", "eio", "rw", "0", &len.to_string()]);
    p.a.qemu_io_ok(&["write -P 0x77 2M 64k", "flush"]);
    assert!(region_is(&p.b.img, 2 << 20, 65536, 0x77));
}

/// `role primary` on `n` (restarted on its failed disk) is refused as stale (exit 3).
fn refused_as_primary(n: &Node, when: &str) {
    let out = n.run(&["role", "primary", "r0"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(3),
        "a node whose disk failed became primary {when}: {err}"
    );
    eprintln!("{when}: {err}");
}

/// b still has the write made while a was diskless; promoted, with the restarted old primary
/// (a) as its secondary, it serves the writes and a gets back those it missed.
fn hand_back(p: &Pair) {
    assert!(
        region_is(&p.b.img, 2 << 20, 65536, 0x77),
        "the peer lost the write made while the primary was diskless"
    );
    p.a.ok(&["role", "secondary", "r0"]);
    p.b.ok(&["role", "primary", "r0"]);
    p.b.ok(&["wait-sync", "r0", "--timeout", "60s"]);
    p.b.qemu_io_ok(&["read -P 0x5a 1M 64k", "read -P 0x77 2M 64k"]);
    assert!(
        region_is(&p.a.img, 2 << 20, 65536, 0x77),
        "the old primary did not get back the write it missed"
    );
}

/// A diskless primary whose peer restarts: it reconnects and goes on serving from the peer
/// (reads and writes), and the peer still holds every write.
#[test]
fn a_diskless_primary_reconnects_to_its_restarted_peer_and_serves_on() {
    if !need("qemu-io", "qemu-utils") {
        return;
    }
    let mut p = synced_pair_env(&[], &[]);
    let size = u(&p.a.status(), &["data_size"]);
    p.a.qemu_io_ok(&["write -P 0x5a 1M 64k", "flush"]);
    p.a.ok(&["fault", "r0", "eio", "rw", "0", &size.to_string()]);
    p.a.qemu_io_ok(&["write -P 0x77 2M 64k", "flush"]);
    p.b.kill9();
    p.a.wait_for(20, "a without its peer", |s| s["connection"] != "connected");
    p.b.start();
    p.b.ok(&["role", "secondary", "r0"]);
    p.a.wait_for(30, "a reconnected and serving", |s| {
        s["connection"] == "connected" && s["state"] == "diskless"
    });
    p.a.qemu_io_ok(&[
        "read -P 0x5a 1M 64k",
        "read -P 0x77 2M 64k",
        "write -P 0x78 3M 64k",
        "flush",
    ]);
    assert!(region_is(&p.b.img, 3 << 20, 65536, 0x78));
    assert!(region_is(&p.b.img, 2 << 20, 65536, 0x77));
}

/// The secondary's disk fails a write. It detaches the disk (as DRBD's `on-io-error detach`)
/// and takes no replication until the disk is replaced, instead of failing the same resync
/// over and over: before, the primary reconnected and resynced about 75 times a second, each
/// time running the connect, syncstart, syncintr and disconnect hooks. The primary goes on
/// alone with the write in its dirty map, and its log says why; the secondary is not promoted
/// over it.
#[test]
fn a_secondary_whose_disk_fails_a_write_detaches_it_instead_of_resyncing_in_a_loop() {
    if !need("qemu-io", "qemu-utils") {
        return;
    }
    let p = synced_pair_env(&[], &[]);
    p.b.ok(&["fault", "r0", "eio", "write", "4M", "1M"]);
    let connects = |p: &Pair| hook_log(p).lines().filter(|l| *l == "connect r0").count();
    let before = connects(&p);
    p.a.qemu_io_ok(&["write -P 0x5a 4M 64k", "flush"]);
    p.b.wait_for(20, "b detached its disk", |s| s["state"] == "diskless");
    std::thread::sleep(Duration::from_secs(6));
    let again = connects(&p) - before;
    assert!(
        again <= 4,
        "{again} connections after b's disk failed: the pair reconnects in a loop\n{}",
        hook_log(&p)
    );
    let st = p.a.status();
    assert_ne!(st["connection"], "connected", "{st}");
    assert!(u(&st, &["dirty_bytes"]) >= 1 << 20, "{st}");
    assert!(
        p.a.log_contains("failed", 5) && p.a.log_text().contains(&p.b.img.display().to_string()),
        "a's log does not say that b's disk failed: {}",
        p.a.log_text()
    );
    p.a.qemu_io_ok(&["read -P 0x5a 4M 64k"]);
    p.a.ok(&["role", "secondary", "r0"]);
    let out = p.b.run(&["role", "primary", "r0"]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "b became primary on a disk that failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
