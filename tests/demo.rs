//! `tandem demo`, the README's first command: it must work without root and exit 0.

use std::process::Command;

fn tandem() -> &'static str {
    env!("CARGO_BIN_EXE_tandem")
}

fn check(out: std::process::Output) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "tandem demo failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    assert!(stdout.contains("all checks passed"), "{stdout}");
    assert!(
        stdout.contains("check: B returns the 16 MiB written through A"),
        "{stdout}"
    );
    assert!(stdout.contains("resync after the outage moved"), "{stdout}");
}

#[test]
fn demo_runs_to_the_end() {
    check(Command::new(tandem()).arg("demo").output().unwrap());
}

#[test]
fn demo_runs_without_root() {
    if !nix::unistd::geteuid().is_root() {
        // We are the unprivileged user already: the other test covers it.
        return;
    }
    if Command::new("setpriv").arg("--version").output().is_err() {
        eprintln!("skipping: setpriv (util-linux) is not installed");
        return;
    }
    // The binary must be reachable by an unprivileged user; a build tree under /root is not.
    let exe = std::path::Path::new(tandem());
    let copy = std::env::temp_dir().join(format!("tandem-demo-bin-{}", std::process::id()));
    std::fs::copy(exe, &copy).unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(&copy)
        .arg("demo")
        .env("TMPDIR", "/tmp")
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&copy);
    check(out);
}
