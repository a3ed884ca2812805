//! The installed files: man pages clean under mandoc and in step with the binary and the
//! config schema; unit files clean under systemd-analyze; the devd rules.

mod switch_util;

use std::path::Path;
use std::process::Command;

use switch_util::BIN;

fn repo(rel: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .is_ok_and(|o| o.status.success())
}

fn help(args: &[&str]) -> String {
    let out = Command::new(BIN).args(args).arg("--help").output().unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn man_pages_are_lint_clean() {
    if !have("mandoc") {
        eprintln!("skipped: mandoc is not installed");
        return;
    }
    for page in ["man/tandem.8", "man/tandem.toml.5"] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(page);
        // -W warning: STYLE notes about manuals not installed here (hastctl(8)…) are fine.
        let out = Command::new("mandoc")
            .args(["-Tlint", "-W", "warning"])
            .arg(&path)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && text.trim().is_empty(),
            "{page}:\n{text}"
        );
    }
}

#[test]
fn tandem_8_documents_every_subcommand_and_option() {
    let man = repo("man/tandem.8");
    let top = help(&[]);
    let commands: Vec<&str> = top
        .split("Commands:")
        .nth(1)
        .unwrap()
        .split("Options:")
        .next()
        .unwrap()
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .collect();
    assert!(commands.len() >= 12, "{commands:?}");
    for c in &commands {
        assert!(
            man.contains(&format!(".It Cm {c}")),
            "tandem.8 lacks command {c}"
        );
        for line in help(&[c]).lines() {
            for word in line.split(|ch: char| ch.is_whitespace() || ch == ',') {
                if let Some(opt) = word.strip_prefix("--") {
                    if opt.is_empty() || opt == "help" || opt == "version" {
                        continue;
                    }
                    let opt = opt.split(['<', '=', '.']).next().unwrap();
                    let roff = opt.replace('-', "\\-");
                    assert!(
                        man.contains(&format!("Fl Fl {opt}"))
                            || man.contains(&format!("Fl Fl {roff}")),
                        "tandem.8 lacks option --{opt} of {c}"
                    );
                }
            }
        }
    }
    for code in ["0", "1", "2", "3", "75"] {
        assert!(
            man.contains(&format!(".It {code}\n")),
            "tandem.8 lacks exit status {code}"
        );
    }
}

#[test]
fn tandem_toml_5_documents_every_key() {
    let man = repo("man/tandem.toml.5");
    let src = repo("src/config.rs");
    // The keys of the file are the fields of the Raw* structs of src/config.rs.
    let mut keys = Vec::new();
    let mut inside = false;
    for line in src.lines() {
        if line.starts_with("struct Raw") {
            inside = true;
            continue;
        }
        if inside && line.starts_with('}') {
            inside = false;
        }
        if inside {
            if let Some((name, _)) = line.trim().split_once(':') {
                if !name.starts_with('#') && !name.starts_with("//") && name != "on" {
                    keys.push(name.trim().to_string());
                }
            }
        }
    }
    assert!(keys.len() > 30, "{keys:?}");
    for k in keys {
        let k = match k.as_str() {
            "service" => "[[service]]".to_string(),
            "resource" => "[resource.".to_string(),
            "log" | "switch" | "daemon" | "watch" | "metrics" => format!("[{k}]"),
            _ => format!(".It Ic {k} No"),
        };
        assert!(man.contains(&k), "tandem.toml.5 lacks {k}");
    }
}

#[test]
fn unit_files_verify() {
    if !have("systemd-analyze") || !Path::new("/lib/systemd/system/sysinit.target").exists() {
        eprintln!("skipped: systemd-analyze or the systemd units are not installed");
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    std::fs::create_dir_all(r.join("usr/sbin")).unwrap();
    std::fs::create_dir_all(r.join("etc/systemd/system")).unwrap();
    std::fs::create_dir_all(r.join("usr/lib/systemd")).unwrap();
    let st = Command::new("cp")
        .args(["-r", "/lib/systemd/system"])
        .arg(r.join("usr/lib/systemd/"))
        .status()
        .unwrap();
    assert!(st.success());
    std::fs::copy(BIN, r.join("usr/sbin/tandem")).unwrap();
    // tandem.service reloads with /bin/kill.
    std::fs::create_dir_all(r.join("bin")).unwrap();
    std::fs::copy("/bin/kill", r.join("bin/kill")).unwrap();
    std::fs::write(
        r.join("etc/systemd/system/tandem-switch@.service"),
        repo("systemd/tandem-switch@.service"),
    )
    .unwrap();
    // Every unit we ship, whatever else lands in systemd/ later.
    let mut units = vec![
        "tandem-switch@master.service".to_string(),
        "tandem-switch@slave.service".to_string(),
    ];
    for entry in std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd")).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        if name.ends_with(".service") {
            std::fs::write(
                r.join("etc/systemd/system").join(&name),
                repo(&format!("systemd/{name}")),
            )
            .unwrap();
            if !name.contains('@') {
                units.push(name);
            }
        }
    }
    assert!(units.iter().any(|u| u == "tandem.service"), "{units:?}");
    // The daemon speaks the notify protocol with a watchdog (src/daemon/systemd.rs).
    let daemon = repo("systemd/tandem.service");
    for line in ["Type=notify", "NotifyAccess=main", "WatchdogSec=60s"] {
        assert!(
            daemon.lines().any(|l| l == line),
            "tandem.service lacks {line}"
        );
    }
    for unit in &units {
        let out = Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(format!("--root={}", r.display()))
            .arg(unit)
            .output()
            .unwrap();
        assert!(
            out.status.success() && out.stderr.is_empty(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let rules = repo("systemd/90-tandem.rules");
    assert!(rules.contains("SYSTEMD_WANTS}+=\"tandem-switch@master.service\""));
    assert!(rules.contains("does NOT see carrier changes"));
}

#[test]
fn devd_rules_call_switch() {
    let d = repo("devd/tandem.conf");
    assert!(d.contains("match \"system\"\t\t\"CARP\";"));
    assert!(d.contains("action \"/usr/local/sbin/tandem switch $subsystem $type\";"));
    assert!(d.contains("match \"subsystem\"\t\"carp0\";"));
    assert!(d.contains("action \"/usr/local/sbin/tandem switch master\";"));
    assert!(d.contains("action \"/usr/local/sbin/tandem switch slave\";"));
    let k = repo("systemd/keepalived-notify.example");
    assert!(k.contains("notify_master \"/usr/sbin/tandem switch master\""));
}

/// devd/rc.d/tandem: `sh -n` clean, rc.subr(8) style, and run under a stand-in for
/// /etc/rc.subr that prints what run_rc_command would start: `$command $rc_flags
/// $command_args`, as rc.subr's start does (rc_flags comes from ${name}_flags).
#[test]
fn rc_d_script_follows_rc_subr() {
    if !have("sh") {
        eprintln!("skipped: sh is not installed");
        return;
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("devd/rc.d/tandem");
    let out = Command::new("sh").arg("-n").arg(&path).output().unwrap();
    assert!(
        out.status.success(),
        "sh -n {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let script = repo("devd/rc.d/tandem");
    let lines: Vec<&str> = script.lines().map(str::trim).collect();
    let at = |want: &str| {
        lines
            .iter()
            .position(|l| *l == want)
            .unwrap_or_else(|| panic!("devd/rc.d/tandem has no line {want:?}"))
    };
    for key in [
        "PROVIDE: tandem",
        "REQUIRE: NETWORKING",
        "KEYWORD: shutdown",
    ] {
        assert!(script.contains(&format!("# {key}\n")), "no `# {key}`");
    }
    let subr = at(". /etc/rc.subr");
    let rcvar = at("rcvar=\"tandem_enable\"");
    let load = at("load_rc_config $name");
    let default = at(": ${tandem_enable:=\"NO\"}");
    assert!(subr < rcvar && rcvar < load && load < default);
    at("name=\"tandem\"");
    at("command=\"/usr/sbin/daemon\"");
    at("procname=\"/usr/local/sbin/tandem\"");
    at("pidfile=\"/var/run/${name}.pid\"");
    at("required_modules=\"geom_gate\"");
    assert_eq!(
        lines.iter().rev().find(|l| !l.is_empty()),
        Some(&"run_rc_command \"$1\"")
    );

    let dir = tempfile::tempdir().unwrap();
    let stub = dir.path().join("rc.subr");
    std::fs::write(
        &stub,
        "load_rc_config() { :; }\n\
         run_rc_command() {\n\
         \techo \"$1: $command $tandem_flags $command_args\"\n\
         \techo \"pidfile=$pidfile procname=$procname modules=$required_modules\"\n\
         }\n",
    )
    .unwrap();
    let local = dir.path().join("tandem");
    std::fs::write(
        &local,
        script.replace(". /etc/rc.subr", &format!(". {}", stub.display())),
    )
    .unwrap();
    let run = |env: &[(&str, &str)]| {
        let out = Command::new("sh")
            .arg(&local)
            .arg("start")
            .env_clear()
            .envs(env.iter().copied())
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(
        run(&[]),
        "start: /usr/sbin/daemon  -f -S -T tandem -p /var/run/tandem.pid /usr/local/sbin/tandem \
         -c /usr/local/etc/tandem.toml  daemon\n\
         pidfile=/var/run/tandem.pid procname=/usr/local/sbin/tandem modules=geom_gate\n"
    );
    // tandem_args reach tandem, before the subcommand (global options).
    let out = run(&[
        ("tandem_args", "--node s1 -v"),
        ("tandem_config", "/etc/t.toml"),
    ]);
    assert!(
        out.contains(" /usr/local/sbin/tandem -c /etc/t.toml --node s1 -v daemon\n"),
        "{out}"
    );
}
