//! An ext4 filesystem written through the primary's export survives a failover: demote A,
//! promote B, and B's export holds a clean filesystem with identical files. The filesystem is
//! built with `mkfs.ext4 -d` and moved with `nbdcopy`, so no mount (and no root) is needed.

mod daemon_common;

use std::process::{Command, Stdio};

use daemon_common::*;

fn run(cmd: &mut Command) -> std::process::Output {
    let out = cmd.stdin(Stdio::null()).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn ext4_on_the_export_survives_failover() {
    for tool in ["mkfs.ext4", "e2fsck", "debugfs", "nbdcopy"] {
        if !have(tool) {
            eprintln!("skipping: {tool} not installed (apt-get install e2fsprogs libnbd-bin)");
            return;
        }
    }
    let p = synced_pair("fullsync");
    let size = u(&p.a.status(), &["data_size"]);
    let d = p.dir.path();
    let src = d.join("src");
    std::fs::create_dir(&src).unwrap();
    let mut files = Vec::new();
    for i in 0..8u32 {
        let body: Vec<u8> = (0..(50_000 + i * 7919))
            .map(|j| (j.wrapping_mul(31).wrapping_add(i)) as u8)
            .collect();
        std::fs::write(src.join(format!("f{i}")), &body).unwrap();
        files.push((format!("f{i}"), body));
    }
    let fs = d.join("fs.img");
    std::fs::File::create(&fs).unwrap().set_len(size).unwrap();
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&src)
        .arg(&fs));
    run(Command::new("nbdcopy").arg(&fs).arg(p.a.nbd_uri()));
    if have("qemu-io") {
        p.a.qemu_io_ok(&["flush"]);
    }
    // Failover.
    p.a.ok(&["role", "secondary", "r0"]);
    p.b.ok(&["role", "primary", "r0"]);
    let out_img = d.join("out.img");
    run(Command::new("nbdcopy").arg(p.b.nbd_uri()).arg(&out_img));
    run(Command::new("e2fsck").args(["-f", "-n"]).arg(&out_img));
    for (name, body) in &files {
        let dumped = d.join(format!("{name}.out"));
        run(Command::new("debugfs")
            .arg("-R")
            .arg(format!("dump /{name} {}", dumped.display()))
            .arg(&out_img));
        assert_eq!(
            &std::fs::read(&dumped).unwrap(),
            body,
            "{name} differs after failover"
        );
    }
}
