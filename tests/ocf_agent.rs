//! The OCF resource agent (`ocf/tandem` → `tandem ocf ACTION`) outside a cluster: its
//! meta-data against the OCF 1.1 schema, its exit codes with and without a daemon, the full
//! promote/demote it runs, and resource-agents' `ocf-tester` against a live pair (node `a`'s
//! daemon up, node `b` secondary). The Pacemaker cluster itself is tests/pacemaker.rs.

mod daemon_common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use daemon_common::{BIN, Pair, need};

fn agent() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("ocf/tandem")
}

fn schema() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ocf/ocf-1.1.rng")
}

/// Run the agent file with `action` and these OCF variables (nothing else from OCF leaks in).
fn ocf(action: &str, vars: &[(&str, &str)]) -> Output {
    let mut c = Command::new(agent());
    c.arg(action).stdin(Stdio::null());
    for (k, _) in std::env::vars() {
        if k.starts_with("OCF_") {
            c.env_remove(k);
        }
    }
    c.env("OCF_RESKEY_binary", BIN);
    c.envs(vars.iter().copied());
    c.output().unwrap()
}

fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

/// Node `a`'s config, with its own switch lock and a service of r0 (marker file).
fn add_switch_and_service(p: &Pair) -> PathBuf {
    let d = p.dir.path();
    let marker = d.join("svc.on");
    let extra = format!(
        "\n[switch]\nlock = \"{d}/switch.lock\"\n\n[[service]]\nname = \"marker\"\n\
         manager = \"command\"\nstart = \"touch {m}\"\nstop = \"rm -f {m}\"\n\
         status = \"test -e {m}\"\nresources = [\"r0\"]\n",
        d = d.display(),
        m = marker.display()
    );
    for n in [&p.a, &p.b] {
        let mut text = std::fs::read_to_string(&n.conf).unwrap();
        text.push_str(&extra.replace("switch.lock", &format!("{}.lock", n.name)));
        std::fs::write(&n.conf, text).unwrap();
    }
    marker
}

#[test]
fn meta_data_is_valid_ocf_1_1() {
    let o = ocf("meta-data", &[]);
    assert_eq!(code(&o), 0);
    if !need("xmllint", "libxml2-utils") {
        return;
    }
    let mut x = Command::new("xmllint")
        .args(["--noout", "--relaxng"])
        .arg(schema())
        .arg("-")
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    x.stdin.take().unwrap().write_all(&o.stdout).unwrap();
    let out = x.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "meta-data does not validate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn exit_codes_without_a_daemon() {
    let p = Pair::new("fullsync");
    let conf = p.a.conf.to_str().unwrap();
    let base = [("OCF_RESKEY_resource", "r0"), ("OCF_RESKEY_config", conf)];
    let with = |extra: &[(&'static str, &'static str)]| {
        let mut v: Vec<(&str, &str)> = base.to_vec();
        v.extend_from_slice(extra);
        v
    };
    // A probe on a node whose daemon is down: not running (never an error).
    let probe = with(&[("OCF_RESKEY_CRM_meta_interval", "0")]);
    assert_eq!(code(&ocf("monitor", &probe)), 7);
    assert_eq!(
        code(&ocf(
            "monitor",
            &with(&[("OCF_RESKEY_CRM_meta_interval", "10000")])
        )),
        7
    );
    // Stopping what cannot run succeeds; starting without the daemon fails (generic).
    assert_eq!(code(&ocf("stop", &base)), 0);
    assert_eq!(code(&ocf("start", &base)), 1);
    assert_eq!(code(&ocf("validate-all", &base)), 0);
    assert_eq!(code(&ocf("reload-agent", &base)), 0);
    // Parameters: missing or unknown resource is a configuration error.
    assert_eq!(
        code(&ocf("validate-all", &[("OCF_RESKEY_config", conf)])),
        6
    );
    assert_eq!(
        code(&ocf(
            "validate-all",
            &[("OCF_RESKEY_resource", "nope"), ("OCF_RESKEY_config", conf)]
        )),
        6
    );
    // A config file missing on this node: not installed here (a probe: not running).
    let missing = [
        ("OCF_RESKEY_resource", "r0"),
        ("OCF_RESKEY_config", "/nonexistent/tandem.toml"),
    ];
    assert_eq!(code(&ocf("validate-all", &missing)), 5);
    let mut mp = missing.to_vec();
    mp.push(("OCF_RESKEY_CRM_meta_interval", "0"));
    assert_eq!(code(&ocf("monitor", &mp)), 7);
    assert_eq!(code(&ocf("stop", &missing)), 0);
    assert_eq!(code(&ocf("frobnicate", &base)), 3);
    // The binary is missing: not installed (a probe: not running; stop: nothing runs).
    let gone = [("OCF_RESKEY_binary", "/nonexistent/tandem")];
    assert_eq!(code(&ocf("start", &gone)), 5);
    assert_eq!(code(&ocf("stop", &gone)), 0);
    assert_eq!(
        code(&ocf(
            "monitor",
            &[
                ("OCF_RESKEY_binary", "/nonexistent/tandem"),
                ("OCF_RESKEY_CRM_meta_interval", "0")
            ]
        )),
        7
    );
}

#[test]
fn actions_drive_the_role_and_the_services() {
    let mut p = Pair::new("fullsync");
    let marker = add_switch_and_service(&p);
    p.a.start();
    p.b.start();
    p.b.ok(&["role", "secondary", "r0"]);
    let conf = p.a.conf.to_str().unwrap().to_string();
    let vars = [
        ("OCF_RESKEY_resource", "r0"),
        ("OCF_RESKEY_config", conf.as_str()),
        ("OCF_RESKEY_CRM_meta_interval", "10000"),
    ];
    let run = |a: &str| {
        let o = ocf(a, &vars);
        (code(&o), String::from_utf8_lossy(&o.stderr).to_string())
    };
    assert_eq!(run("monitor").0, 7, "role init is stopped");
    assert_eq!(run("start").0, 0);
    assert_eq!(p.a.status()["role"], "secondary");
    assert_eq!(run("monitor").0, 0);
    let (c, err) = run("promote");
    assert_eq!(c, 0, "promote: {err}\nlog:\n{}", p.a.log_text());
    assert_eq!(p.a.status()["role"], "primary");
    assert!(
        marker.exists(),
        "the promote started the resource's service"
    );
    assert_eq!(run("monitor").0, 8);
    // The service dies: failed promoted.
    std::fs::remove_file(&marker).unwrap();
    assert_eq!(run("monitor").0, 9);
    std::fs::write(&marker, "").unwrap();
    p.a.wait_for(60, "initial sync done", |s| s["state"] == "complete");
    assert_eq!(run("demote").0, 0);
    assert!(!marker.exists(), "the demote stopped the service");
    assert_eq!(p.a.status()["role"], "secondary");
    assert_eq!(run("monitor").0, 0);
    assert_eq!(run("stop").0, 0);
    assert_eq!(p.a.status()["role"], "init");
    assert_eq!(run("monitor").0, 7);
    // Stop from promoted demotes first.
    assert_eq!(run("start").0, 0);
    assert_eq!(run("promote").0, 0);
    assert_eq!(run("stop").0, 0);
    assert_eq!(p.a.status()["role"], "init");
    assert!(!marker.exists());
    p.a.stop();
    p.b.stop();
}

/// `ocf-tester` (resource-agents) with the brief's command line against a live pair.
///
/// ocf-tester checks the meta-data with `xmllint --valid`, i.e. against a DTD, and the only
/// one it knows is resource-agents' OCF 1.0 ra-api-1.dtd, which rejects the OCF 1.1
/// attributes (reloadable, unique-group) that Pacemaker 2.1 reads. The `xmllint` first in
/// PATH here validates against the OCF 1.1 schema (tests/ocf/ocf-1.1.rng) instead: stricter
/// than dropping `--valid`, and still real validation.
#[test]
fn ocf_tester_passes_against_a_live_pair() {
    if !need("ocf-tester", "resource-agents") || !need("xmllint", "libxml2-utils") {
        return;
    }
    let mut p = Pair::new("fullsync");
    add_switch_and_service(&p);
    p.a.start();
    p.b.start();
    p.b.ok(&["role", "secondary", "r0"]);
    let bin = p.dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    std::os::unix::fs::symlink(BIN, bin.join("tandem")).unwrap();
    let real = String::from_utf8(
        Command::new("sh")
            .args(["-c", "command -v xmllint"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    std::fs::write(
        bin.join("xmllint"),
        format!(
            "#!/bin/sh\n# ocf-tester calls: xmllint --noout --valid -\nexec {} --noout --relaxng {} -\n",
            real.trim(),
            schema().display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        bin.join("xmllint"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let conf = format!("config={}", p.a.conf.display());
    let mut c = Command::new("ocf-tester");
    c.args(["-n", "t", "-o", "resource=r0", "-o", &conf])
        .arg(agent())
        .env("PATH", path)
        .stdin(Stdio::null());
    for (k, _) in std::env::vars() {
        if k.starts_with("OCF_") {
            c.env_remove(k);
        }
    }
    let out = c.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{text}");
    assert!(
        out.status.success() && text.contains("passed all tests"),
        "ocf-tester failed (exit {:?}):\n{text}\nlog a:\n{}",
        out.status.code(),
        p.a.log_text()
    );
    // It leaves the resource stopped.
    assert_eq!(p.a.status()["role"], "init");
    p.a.stop();
    p.b.stop();
}
