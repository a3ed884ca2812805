//! Races inside the replication daemon, provoked with real NBD clients and judged by what a
//! user would find: the two replicas' data regions must be byte-identical once the writes are
//! acknowledged, whatever order the clients' requests ran in.

mod daemon_common;

use daemon_common::*;

/// Overlapping writes from several connections at once may be applied in any order (NBD allows
/// that), but both nodes must apply them in the same order. 4 connections × 32 requests in
/// flight, all into the same 64 blocks, with random data: after every round the primary's and
/// the secondary's data regions are identical. Before the fix, the primary applied two
/// conflicting writes in one order and queued them to the peer in the other.
#[test]
fn overlapping_writes_from_many_connections_leave_identical_replicas() {
    overlapping_writes("fullsync", 4);
}

/// The same in async mode: fio's closing FLUSH waits for the peer, so the replicas must be
/// identical after it.
#[test]
fn overlapping_async_writes_leave_identical_replicas_after_flush() {
    overlapping_writes("async", 2);
}

fn overlapping_writes(mode: &str, rounds: u32) {
    if !need("fio", "fio") {
        return;
    }
    let p = synced_pair(mode);
    let size = u(&p.a.status(), &["data_size"]);
    for round in 1..=rounds {
        let report = fio_nbd(
            &p.a.nbd_uri(),
            &[
                "--name=overlap",
                "--rw=randwrite",
                "--bs=4k",
                "--size=256k",
                "--iodepth=32",
                "--numjobs=4",
                "--time_based",
                "--runtime=3",
                "--refill_buffers",
                "--randrepeat=0",
                "--end_fsync=1",
                "--group_reporting",
            ],
        );
        // After the acknowledged FLUSH every write is on the secondary's disk (page cache), so
        // the files can be compared as they are.
        assert!(
            same_data(&p.a.img, &p.b.img, size),
            "{mode} round {round}/{rounds}: the replicas differ after overlapping writes\n{}",
            report
        );
        // And as a user would check it, on the live pair.
        let v = p.a.run(&["verify", "r0", "--json"]);
        assert!(
            v.status.success(),
            "{mode} round {round}/{rounds}: tandem verify found differences: {}{}",
            String::from_utf8_lossy(&v.stdout),
            String::from_utf8_lossy(&v.stderr)
        );
    }
}
