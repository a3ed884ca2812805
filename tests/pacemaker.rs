//! The Pacemaker lab (tests/pacemaker/lab.sh): two cluster nodes and a corosync-qnetd host,
//! each in its own mount + UTS + net + pid namespaces, Corosync 3 (knet, crypto on, token
//! 1000) with a qdevice (ffsplit, heuristics: the vote goes to the side of the tandem
//! primary), Pacemaker 2.1 configured with crmsh: a promotable clone of ocf:tandem:tandem,
//! colocated with and ordered before an ocf:heartbeat:Filesystem mount and a small service
//! (ocf:heartbeat:anything). One test runs the scenarios in order, each from the state the
//! previous one left:
//!
//! - cold start: one node promoted and serving, the pair in sync, a client write reads back;
//! - partition: the secondary (no quorum) stops, the primary stays promoted and places the
//!   fencing constraint; never two primaries, two promoted instances, two mounts or a
//!   split-brain (sampled on both sides throughout); after the heal the secondary resyncs,
//!   the constraint is lifted and `tandem verify` finds no difference;
//! - crash of the promoted node (its namespace init killed): the survivor is promoted with
//!   every acknowledged write, and fences the dead node off;
//! - the crashed node returns: it resyncs only the dirty extents and stays unpromoted;
//! - partition again, now with the primary on the other node (so one of the two partitions
//!   has the primary on node2, which the plain ffsplit tie-breaker would leave without quorum);
//! - a planned switchover (`crm_resource --move --promoted`, then `--clear`): the other node
//!   is promoted with every acknowledged write, the old primary comes back as secondary in
//!   sync, no fencing constraint is placed, and the promotion stays after `--clear`;
//! - (with `--features faults`, as CI builds it) the primary's disk fails: it goes diskless,
//!   its promotion score falls below the peer's, Pacemaker moves the promotion to the copy
//!   with a disk; the failed node, rebuilt on a new disk, resyncs in full.
//!
//! Throughout the partitions and the return, the sampler also checks that no primary serving
//! from its own disk is outranked by the other node's promotion score, and those scenarios
//! fail if the primary was demoted at all: a resynced peer once outranked a primary alone and
//! Pacemaker moved the promotion to it.
//!
//! `stonith-enabled=false` only because there is no fencing device on this machine; the
//! qdevice gives the quorum that makes the minority stop. Needs root and the Debian packages
//! of tests/run.sh; without them the test says why and passes as skipped.

use std::path::Path;
use std::process::{Command, Stdio};

fn lab() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/pacemaker/lab.sh")
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn skip_reason() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("not root (namespaces, mounts and loop devices need root)".into());
    }
    let tools = [
        "corosync",
        "corosync-qnetd",
        "corosync-qdevice",
        "pacemakerd",
        "crm",
        "cibadmin",
        "nbdfuse",
        "modprobe",
        "unshare",
        "nsenter",
        "losetup",
        "mkfs.ext4",
    ];
    let missing: Vec<&str> = tools.into_iter().filter(|t| !have(t)).collect();
    if !missing.is_empty() {
        return Some(format!(
            "missing {} (apt-get install pacemaker corosync corosync-qnetd corosync-qdevice \
             crmsh resource-agents nbdfuse kmod)",
            missing.join(", ")
        ));
    }
    if Path::new("/run/netns/tocf-sw").exists() {
        return Some("namespace tocf-sw exists: another Pacemaker lab is running".into());
    }
    None
}

/// Tears the lab down whatever happened (processes by PID, loop devices, namespace, files).
struct Down(std::path::PathBuf);

impl Drop for Down {
    fn drop(&mut self) {
        let _ = Command::new(lab())
            .arg("down")
            .env("TOCF_LAB", &self.0)
            .stdin(Stdio::null())
            .status();
    }
}

#[test]
fn pacemaker_cluster_scenarios() {
    if let Some(why) = skip_reason() {
        eprintln!("skipping the Pacemaker lab: {why}");
        return;
    }
    let dir = std::env::temp_dir().join(format!("tocf-{}", std::process::id()));
    let _down = Down(dir.clone());
    // Bounded: the lab takes about a minute; `timeout` kills it after 6.
    let out = Command::new("timeout")
        .args(["-k", "10", "360"])
        .arg(lab())
        .arg("run")
        .env("TOCF_LAB", &dir)
        .env("TANDEM", env!("CARGO_BIN_EXE_tandem"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{text}");
    assert!(
        out.status.success() && text.contains("all scenarios passed"),
        "the Pacemaker lab failed (exit {:?})",
        out.status.code()
    );
    for key in [
        "crash_to_promoted_reported_s=",
        "return_resynced_bytes=",
        "partition1_secondary_stopped_s=",
        "partition2_secondary_stopped_s=",
        "switchover_to_serving_s=",
        "switchover_to_in_sync_s=",
    ] {
        assert!(text.contains(key), "no {key} in the lab's timings");
    }
    if cfg!(feature = "faults") {
        for key in [
            "disk_failure_to_moved_s=",
            "disk_rebuild_boot_to_in_sync_s=",
        ] {
            assert!(text.contains(key), "no {key} in the lab's timings");
        }
    }
}
