//! The failover lab (tests/lab/): two storage hosts and a client as network namespaces, real
//! ucarp, real smbd, tandem switching between them. Each scenario is one test; each asserts
//! what the client observes through the VIP (see tests/lab/scenarios.sh for the steps).
//!
//! Needs root and ucarp, smbd, smbclient (and nbdfuse for backend tandem): without them each
//! test prints why and passes as skipped. The backend is `LAB_BACKEND` (`none` or `tandem`);
//! unset, the lab uses `tandem` when this binary's replication daemon works and `none` (one
//! shared loop device, the "SAN disk" setup) otherwise. The scenarios share the namespaces
//! and /tmp/lab, so they run one at a time.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

static LAB_LOCK: Mutex<()> = Mutex::new(());

fn harness() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/lab/lab.sh")
}

fn tandem_bin() -> &'static str {
    env!("CARGO_BIN_EXE_tandem")
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Why the lab cannot run here, if it cannot.
fn skip_reason(backend: &str, mode: &str) -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("not root (network namespaces, mounts and loop devices need root)".into());
    }
    let mut tools = vec![
        "ucarp",
        "smbd",
        "smbclient",
        "nsenter",
        "losetup",
        "mkfs.ext4",
    ];
    if backend == "tandem" {
        tools.push("nbdfuse");
    }
    if mode == "keepalived" {
        tools.push("keepalived");
    }
    let missing: Vec<&str> = tools.into_iter().filter(|t| !have(t)).collect();
    if !missing.is_empty() {
        return Some(format!(
            "missing {} (apt-get install ucarp samba smbclient nbdfuse keepalived)",
            missing.join(", ")
        ));
    }
    None
}

/// While the branches that build `switch` and `watch` are not merged, this binary answers
/// "not implemented yet": the lab has nothing to drive then.
fn unimplemented(mode: &str) -> Option<String> {
    // `tandem watch` runs the switch's code: both modes need it.
    let probe = match mode {
        "switch" | "watch" | "keepalived" => ["switch", "--dry-run", "master"],
        _ => return None,
    };
    let dir = tempfile::tempdir().ok()?;
    let conf = dir.path().join("empty.toml");
    std::fs::write(&conf, "").ok()?;
    let out = Command::new(tandem_bin())
        .arg("-c")
        .arg(&conf)
        .args(probe)
        .output()
        .ok()?;
    let err = String::from_utf8_lossy(&out.stderr);
    err.contains("not implemented")
        .then(|| format!("this tandem binary has no `{mode}` yet ({})", err.trim()))
}

/// Does this binary's replication daemon work? (`tandem create` on a scratch file.)
fn tandem_backend_works() -> bool {
    let Ok(dir) = tempfile::tempdir() else {
        return false;
    };
    let disk = dir.path().join("disk");
    let conf = dir.path().join("t.toml");
    let text = format!(
        "node = \"a\"\n[daemon]\nlisten = [\"127.0.0.1:0\"]\ncontrol = \"{d}/c.sock\"\nsecret = \"{d}/key\"\n\
         [resource.r]\nmountpoint = \"/mnt/r\"\nfstype = \"ext4\"\nnbd = \"{d}/r.nbd\"\n\
         [resource.r.on.a]\nlocal = \"{disk}\"\nremote = \"127.0.0.1:1\"\n\
         [resource.r.on.b]\nlocal = \"{disk}\"\nremote = \"127.0.0.1:2\"\n",
        d = dir.path().display(),
        disk = disk.display()
    );
    if std::fs::write(&conf, text).is_err()
        || std::fs::write(&disk, vec![0u8; 4 << 20]).is_err()
        || std::fs::write(dir.path().join("key"), "0123456789abcdef0123456789abcdef").is_err()
    {
        return false;
    }
    // The daemon refuses a secret file others can read.
    use std::os::unix::fs::PermissionsExt;
    if std::fs::set_permissions(
        dir.path().join("key"),
        std::fs::Permissions::from_mode(0o600),
    )
    .is_err()
    {
        return false;
    }
    let created = Command::new(tandem_bin())
        .arg("-c")
        .arg(&conf)
        .args(["create", "r"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !created {
        return false;
    }
    // A daemon that is still running after a second works (it is killed right away).
    let Ok(mut daemon) = Command::new(tandem_bin())
        .arg("-c")
        .arg(&conf)
        .arg("daemon")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
    else {
        return false;
    };
    std::thread::sleep(Duration::from_secs(1));
    // … and `tandem status` can talk to it (the switch's backend is wired to the daemon).
    let running = matches!(daemon.try_wait(), Ok(None))
        && Command::new(tandem_bin())
            .arg("-c")
            .arg(&conf)
            .args(["status", "--json", "r"])
            .stderr(Stdio::null())
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("\"role\":\"init\""));
    let _ = daemon.kill();
    let _ = daemon.wait();
    running
}

fn backend() -> String {
    match std::env::var("LAB_BACKEND") {
        Ok(b) if !b.is_empty() => b,
        _ if tandem_backend_works() => "tandem".into(),
        _ => {
            eprintln!(
                "lab: backend none (one shared loop device): this binary cannot run a tandem \
                 pair yet (its daemon, or `tandem status` through the daemon, does not work); \
                 LAB_BACKEND=tandem forces it"
            );
            "none".into()
        }
    }
}

/// Tears the lab down when the test ends, passed or not (the harness's own trap does too;
/// this covers a killed harness).
struct Lab<'a> {
    _serial: MutexGuard<'a, ()>,
}

impl Drop for Lab<'_> {
    fn drop(&mut self) {
        let _ = Command::new(harness())
            .arg("down")
            .env("TANDEM", tandem_bin())
            .status();
    }
}

/// Run one scenario with a time bound; panics with the harness's verdict on failure.
fn scenario(name: &str, mode: &str, limit: Duration, tandem_only: bool) {
    let serial = LAB_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let backend = backend();
    if let Some(why) = skip_reason(&backend, mode) {
        eprintln!("lab scenario {name}: SKIPPED: {why}");
        return;
    }
    if tandem_only && backend != "tandem" {
        eprintln!(
            "lab scenario {name}: SKIPPED: needs backend tandem (a partition over one shared \
             disk is unsafe by design); LAB_BACKEND={backend}"
        );
        return;
    }
    // LAB_MODE=baseline runs the same scenarios with the seed script's flow instead.
    let mode = match std::env::var("LAB_MODE") {
        Ok(m) if !m.is_empty() && mode != "watch" && mode != "keepalived" => m,
        _ => mode.to_string(),
    };
    let mode = mode.as_str();
    if let Some(why) = unimplemented(mode) {
        eprintln!("lab scenario {name}: SKIPPED: {why}");
        return;
    }
    let _lab = Lab { _serial: serial };
    eprintln!("lab scenario {name}: backend={backend} mode={mode}");
    let mut child = Command::new(harness())
        .args(["scenario", name, &backend, mode])
        .env("TANDEM", tandem_bin())
        .stdin(Stdio::null())
        .spawn()
        .expect("cannot run tests/lab/lab.sh");
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait for the harness") {
            break s;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("lab scenario {name}: still running after {limit:?}, killed");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        status.success(),
        "lab scenario {name} failed ({status}); its output above says which check"
    );
}

#[test]
fn lab_cold_start() {
    scenario("cold", "switch", Duration::from_secs(120), false);
}

#[test]
fn lab_primary_loss() {
    scenario("loss", "switch", Duration::from_secs(150), false);
}

#[test]
fn lab_return_and_switch_back() {
    scenario("return", "switch", Duration::from_secs(200), false);
}

#[test]
fn lab_flapping() {
    scenario("flap", "switch", Duration::from_secs(240), false);
}

#[test]
fn lab_partition() {
    scenario("partition", "switch", Duration::from_secs(200), true);
}

#[test]
fn lab_tandem_watch() {
    scenario("watch", "watch", Duration::from_secs(150), false);
}

/// keepalived with VRRPv3 adverts every 200 ms instead of ucarp: A crashes, B takes over and
/// serves every acknowledged file (checksums through the VIP).
#[test]
fn lab_keepalived_fast_adverts() {
    scenario("keepalived", "keepalived", Duration::from_secs(150), false);
}
