//! Kill -9 the primary under a write load of sequence-stamped blocks in fullsync mode, promote
//! the secondary: every write whose acknowledgement the client received is there. Then the
//! killed node rejoins as secondary, catches up, and the roles swap for the next round.

mod daemon_common;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use daemon_common::*;

const BLOCK: u64 = 64 << 10;
const BLOCKS: usize = 150;

fn pattern(round: usize, i: usize) -> u8 {
    ((round * 37 + i) % 250 + 1) as u8
}

fn rounds() -> usize {
    std::env::var("TANDEM_FAILOVER_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20)
}

#[test]
fn acknowledged_writes_survive_primary_crash() {
    if !need("qemu-io", "qemu-utils") {
        return;
    }
    let mut p = synced_pair("fullsync");
    let (mut primary, mut secondary) = ("a", "b");
    for round in 0..rounds() {
        let uri = p.node(primary).nbd_uri();
        let acked = Arc::new(AtomicUsize::new(0));
        let acked2 = Arc::clone(&acked);
        let writer = std::thread::spawn(move || {
            for i in 0..BLOCKS {
                let ok = Command::new("qemu-io")
                    .args(["-f", "raw", "-c"])
                    .arg(format!(
                        "write -P {} {} {}",
                        pattern(round, i),
                        i as u64 * BLOCK,
                        BLOCK
                    ))
                    .arg(&uri)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .map(|s| s.success())
                    .unwrap_or(false);
                if !ok {
                    return;
                }
                acked2.store(i + 1, Ordering::SeqCst);
            }
        });
        // Let some writes through, then crash the primary.
        let end = Instant::now() + Duration::from_secs(30);
        let want = 5 + (round * 7) % 40;
        while acked.load(Ordering::SeqCst) < want && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(5));
        }
        p.node(primary).kill9();
        writer.join().unwrap();
        let acked = acked.load(Ordering::SeqCst);
        assert!(
            acked >= want.min(BLOCKS),
            "round {round}: only {acked} writes went through"
        );

        // Promote the survivor; it may take a moment to notice the peer is gone.
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            let out = p.node(secondary).run(&["role", "primary", "r0"]);
            if out.status.success() {
                break;
            }
            let err = String::from_utf8_lossy(&out.stderr).to_string();
            assert!(
                err.contains("peer is primary") && Instant::now() < end,
                "round {round}: promote failed: {err}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        let mut cmds: Vec<String> = Vec::new();
        for i in 0..acked {
            cmds.push(format!(
                "read -P {} {} {}",
                pattern(round, i),
                i as u64 * BLOCK,
                BLOCK
            ));
        }
        let refs: Vec<&str> = cmds.iter().map(|s| s.as_str()).collect();
        for chunk in refs.chunks(50) {
            let out = p.node(secondary).qemu_io(chunk);
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            assert!(
                out.status.success() && !text.contains("failed"),
                "round {round}: an acknowledged write is missing on the new primary ({acked} acked): {text}"
            );
        }
        // The crashed node rejoins as secondary and catches up.
        p.node(primary).start();
        p.node(primary).ok(&["role", "secondary", "r0"]);
        p.node(secondary)
            .ok(&["wait-sync", "r0", "--timeout", "60s"]);
        std::mem::swap(&mut primary, &mut secondary);
    }
    p.node(primary).qemu_io_ok(&["flush"]);
    let size = u(&p.a.status(), &["data_size"]);
    assert!(
        same_data(&p.a.img, &p.b.img, size),
        "data regions differ after the last round"
    );
}
