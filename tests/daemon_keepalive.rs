//! A peer that stops answering (SIGSTOP: no RST, no FIN) is noticed within `daemon.timeout`;
//! the primary's pending writes complete locally as degraded, and the pair resyncs once the
//! peer is back.

mod daemon_common;

use std::process::Command;

use daemon_common::*;

#[test]
fn hung_secondary_is_dropped_after_the_timeout_and_resynced_later() {
    if !need("qemu-io", "qemu-utils") {
        return;
    }
    let p = synced_pair("fullsync");
    let size = u(&p.a.status(), &["data_size"]);
    let pid = p.b.child.as_ref().unwrap().id().to_string();
    Command::new("kill").args(["-STOP", &pid]).status().unwrap();
    // This write cannot be acknowledged by the frozen peer; it completes once the link is
    // declared dead (timeout = 3 s in the test config), degraded, not as an error.
    let out = p.a.qemu_io(&["write -P 0x33 6M 1M", "flush"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    Command::new("kill").args(["-CONT", &pid]).status().unwrap();
    assert!(
        out.status.success() && !text.contains("failed"),
        "write while the peer hung: {text}"
    );
    let st = p.a.status();
    assert!(u(&st, &["dirty_bytes"]) >= 1 << 20, "{st}");
    assert!(p.a.log_contains("lost the peer", 10), "{}", p.a.log_text());
    // The peer wakes up; the primary reconnects and resyncs.
    p.a.ok(&["wait-sync", "r0", "--timeout", "60s"]);
    p.a.qemu_io_ok(&["flush"]);
    assert!(
        same_data(&p.a.img, &p.b.img, size),
        "data regions differ after the hung peer came back"
    );
}
