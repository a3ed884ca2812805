//! `tandem verify`: the online compare of the two replicas, against real daemons written through
//! the NBD export. Differences are made behind the daemons' backs (a pwrite into a disk file's
//! data region), as bit rot or a buggy disk would.

mod daemon_common;

use std::os::unix::fs::FileExt;
use std::process::Output;

use daemon_common::*;

const MIB: u64 = 1 << 20;

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

/// `tandem verify r0 --json ARGS…` on `n` (unthrottled unless ARGS has a `--rate`): exit
/// status and the parsed result.
fn verify_json(n: &Node, args: &[&str]) -> (Option<i32>, serde_json::Value) {
    let mut all = vec!["verify", "r0", "--json"];
    if !args.contains(&"--rate") {
        all.extend(["--rate", "0"]);
    }
    all.extend_from_slice(args);
    let out = n.run(&all);
    let v = serde_json::from_str(stdout(&out).trim()).unwrap_or_else(|e| {
        panic!(
            "verify {args:?}: no JSON on stdout ({e}): {}\nstderr: {}\nlog:\n{}",
            stdout(&out),
            stderr(&out),
            n.log_text()
        )
    });
    (out.status.code(), v)
}

fn differing_offsets(v: &serde_json::Value) -> Vec<u64> {
    v["differing"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| u(d, &["offset"]))
        .collect()
}

/// Change one byte of an image file's data region without the daemon knowing.
fn poke(img: &std::path::Path, offset: u64) -> u8 {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .read(true)
        .open(img)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).unwrap();
    b[0] ^= 0xff;
    f.write_all_at(&b, offset).unwrap();
    f.sync_data().unwrap();
    b[0]
}

fn byte_at(img: &std::path::Path, offset: u64) -> u8 {
    let mut b = [0u8; 1];
    std::fs::File::open(img)
        .unwrap()
        .read_exact_at(&mut b, offset)
        .unwrap();
    b[0]
}

#[test]
fn verify_finds_bytes_changed_behind_the_daemons_and_repair_makes_the_replicas_equal() {
    if !need("qemu-io", "qemu-utils") {
        return;
    }
    let p = synced_pair("fullsync");
    let size = u(&p.a.status(), &["data_size"]);
    p.a.qemu_io_ok(&[
        "write -P 0x11 0 1M",
        "write -P 0x22 5M 3M",
        "write -P 0x33 9M 4k",
        "flush",
    ]);

    // Healthy pair: identical, exit 0.
    let (code, v) = verify_json(&p.a, &[]);
    assert_eq!(code, Some(0), "{v}\n{}", p.a.log_text());
    assert_eq!(v["resource"], "r0");
    assert_eq!(u(&v, &["bytes_checked"]), size);
    assert_eq!(u(&v, &["extents_checked"]), size.div_ceil(MIB));
    assert!(differing_offsets(&v).is_empty(), "{v}");
    assert_eq!(v["repaired"], false);
    assert!(v["seconds"].is_f64(), "{v}");

    // One byte changed on the secondary's disk: exactly that extent, in JSON and in words.
    poke(&p.b.img, 5 * MIB + 123);
    let (code, v) = verify_json(&p.a, &[]);
    assert_eq!(code, Some(1), "{v}");
    assert_eq!(differing_offsets(&v), vec![5 * MIB], "{v}");
    assert_eq!(v["differing"][0]["extent"], 5);
    assert_eq!(u(&v["differing"][0], &["length"]), MIB);
    let out = p.a.run(&["verify", "r0", "--rate", "0"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("extent 5 differs: offset 5242880"),
        "{}",
        stdout(&out)
    );
    assert!(p.a.log_contains("extent 5 (offset 5242880", 5));

    // And one on the primary's disk (the primary is the source a repair copies from).
    let poked = poke(&p.a.img, 9 * MIB + 7);
    let (code, v) = verify_json(&p.a, &[]);
    assert_eq!(code, Some(1), "{v}");
    assert_eq!(differing_offsets(&v), vec![5 * MIB, 9 * MIB], "{v}");
    assert!(!same_data(&p.a.img, &p.b.img, size));

    // Repair: still exit 1 (there were differences), then the replicas are identical.
    let (code, v) = verify_json(&p.a, &["--repair"]);
    assert_eq!(code, Some(1), "{v}");
    assert_eq!(differing_offsets(&v), vec![5 * MIB, 9 * MIB], "{v}");
    assert_eq!(v["repaired"], true, "{v}\n{}", p.a.log_text());
    let (code, v) = verify_json(&p.a, &[]);
    assert_eq!(code, Some(0), "{v}\n{}", p.a.log_text());
    assert!(
        same_data(&p.a.img, &p.b.img, size),
        "data regions differ after repair"
    );
    assert_eq!(
        byte_at(&p.b.img, 9 * MIB + 7),
        poked,
        "the primary's copy won"
    );
    assert_eq!(p.a.status()["state"], "complete");
    p.b.wait_for(10, "b complete", |s| s["state"] == "complete");
    // Still replicating afterwards.
    p.a.qemu_io_ok(&["write -P 0x44 5M 64k", "flush"]);
    assert_eq!(byte_at(&p.b.img, 5 * MIB + 100), 0x44);
    // The hook heard every run with its count.
    let hooks = hook_log(&p);
    for want in ["verify r0 0", "verify r0 1", "verify r0 2"] {
        assert!(
            hooks.contains(want),
            "no `{want}` in the hook log:\n{hooks}"
        );
    }
}

/// Writes that land while an extent is being compared must not show up as differences: the
/// request for an extent follows every write to it the primary queued before hashing.
#[test]
fn verify_under_concurrent_writes_finds_no_false_difference() {
    if !need("qemu-io", "qemu-utils") {
        return;
    }
    let p = synced_pair("async");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Three clients at once: more writes land in the short time an extent is being hashed.
    let writers: Vec<_> = (0..3u64)
        .map(|w| {
            let (uri, st) = (p.a.nbd_uri(), std::sync::Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut round = 0u64;
                while !st.load(std::sync::atomic::Ordering::Acquire) {
                    let mut c = std::process::Command::new("qemu-io");
                    c.args(["-f", "raw"]);
                    for i in 0..200u64 {
                        // Over every extent, 4 KiB to 192 KiB, some crossing an extent boundary.
                        let x = ((w << 32) | (round * 200 + i)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                        let off = (x >> 20) % (62 << 20) / 4096 * 4096;
                        let len = 4096 * (1 + (x >> 8) % 48);
                        c.args(["-c", &format!("write -P {} {off} {len}", (x & 0xff))]);
                    }
                    c.arg(&uri).stdin(std::process::Stdio::null());
                    let out = c.output().unwrap();
                    assert!(
                        out.status.success(),
                        "{}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                    round += 1;
                }
                round
            })
        })
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(300));
    // Slow enough that every extent is hashed while writes are arriving.
    let (code, v) = verify_json(&p.a, &["--rate", "24M"]);
    stop.store(true, std::sync::atomic::Ordering::Release);
    for w in writers {
        assert!(w.join().unwrap() >= 1, "a writer did not finish one round");
    }
    assert_eq!(code, Some(0), "false difference under writes: {v}");
    assert!(differing_offsets(&v).is_empty(), "{v}");
}

#[test]
fn verify_is_refused_on_a_secondary_and_without_a_connected_peer() {
    let mut p = synced_pair("fullsync");
    // On the secondary: a usage error (exit 2) that says where to run it.
    let out = p.b.run(&["verify", "r0"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("r0: this node is secondary; run verify on the primary"),
        "{}",
        stderr(&out)
    );
    // Unknown resource: usage error.
    let out = p.a.run(&["verify", "nosuch"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("nosuch"), "{}", stderr(&out));
    // The peer gone: a failure (exit 1) naming the resource and its state, no result.
    p.b.kill9();
    p.a.wait_for(30, "a notices the peer is gone", |s| {
        s["connection"] != "connected"
    });
    let out = p.a.run(&["verify", "r0", "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stdout(&out).is_empty(), "{}", stdout(&out));
    assert!(
        stderr(&out).contains("r0: not connected to the peer (connection"),
        "{}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("state degraded"), "{}", stderr(&out));
}
