//! Fault scenarios a user's machines go through, beyond a clean kill of the daemon: a node
//! losing power (its page cache with it), a link dying with writes the peer has not yet made
//! durable. Each scenario asserts what the user would find on the disks and in `status`.

mod daemon_common;

use std::os::unix::fs::FileExt;

use daemon_common::*;

/// What a power cut does to a disk: writes not yet made durable are gone. The test's stand-in
/// for the page cache that went with it: put `old` back over the range.
fn lose_unflushed(img: &std::path::Path, offset: u64, old: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
    f.write_all_at(old, offset).unwrap();
    f.sync_all().unwrap();
}

/// Write `byte` over `[offset, offset + len)` through `n`'s export and send no FLUSH (fio's
/// nbd engine flushes only when asked to; qemu-io flushes when it closes the image).
fn write_unflushed(n: &Node, byte: u8, offset: u64, len: u64) {
    fio_nbd(
        &n.nbd_uri(),
        &[
            "--name=unflushed",
            "--rw=write",
            &format!("--bs={len}"),
            &format!("--size={len}"),
            &format!("--offset={offset}"),
            &format!("--buffer_pattern={byte}"),
        ],
    );
}

/// The secondary loses power right after acknowledging a write that no FLUSH covered, so the
/// write is gone from its disk. The primary then dies too, and the secondary is promoted and
/// written. When the old primary returns, both nodes hold data the other lacks: that must be
/// reported as split-brain, not resolved by a resync that overwrites the old primary's only
/// copy of the acknowledged write.
#[test]
fn power_loss_of_the_secondary_then_its_promotion_is_split_brain_not_an_overwrite() {
    if !need("qemu-io", "qemu-utils") || !need("fio", "fio") {
        return;
    }
    let mut p = synced_pair("fullsync");
    let size = u(&p.a.status(), &["data_size"]);
    // Acknowledged by both (fullsync), not flushed. (The primary's own periodic flush, which
    // lets it clean its dirty map, comes only after the extent was idle for a tick, seconds
    // after the kill below.)
    write_unflushed(&p.a, 0xaa, 1 << 20, 65536);
    assert!(region_is(&p.b.img, 1 << 20, 65536, 0xaa));
    p.b.kill9();
    lose_unflushed(&p.b.img, 1 << 20, &[0u8; 65536]);
    assert!(
        p.a.log_contains("lost the peer", 20),
        "a did not notice: {}",
        p.a.log_text()
    );
    p.a.kill9();
    p.b.start();
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

/// The same power loss of the secondary, but this time it returns as secondary: the primary's
/// data is newer, and the write the secondary lost is resynced to it.
#[test]
fn power_loss_of_the_secondary_resyncs_the_write_it_lost() {
    if !need("qemu-io", "qemu-utils") || !need("fio", "fio") {
        return;
    }
    let mut p = synced_pair("fullsync");
    let size = u(&p.a.status(), &["data_size"]);
    write_unflushed(&p.a, 0xaa, 1 << 20, 65536);
    p.b.kill9();
    lose_unflushed(&p.b.img, 1 << 20, &[0u8; 65536]);
    assert!(p.a.log_contains("lost the peer", 20));
    p.b.start();
    p.b.ok(&["role", "secondary", "r0"]);
    p.a.ok(&["wait-sync", "r0", "--timeout", "60s"]);
    p.b.wait_for(30, "b complete", |s| s["state"] == "complete");
    assert!(region_is(&p.b.img, 1 << 20, 65536, 0xaa));
    assert!(same_data(&p.a.img, &p.b.img, size));
}
