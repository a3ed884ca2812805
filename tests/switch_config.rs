//! Bad config files: one clear error each (file:line:column), exit 2, nothing changed.

mod switch_util;

use switch_util::Env;

const BAD: &[(&str, &str, &str)] = &[
    // (config, expected position, expected words)
    ("[switch]\nrole_timout = \"5s\"\n", ":2:1:", "role_timout"),
    (
        "[switch]\ndelay = \"3 parsecs\"\n",
        ":2:9:",
        "invalid duration",
    ),
    (
        "[resource.z]\nbackend = \"none\"\ndevice = \"/dev/da0\"\nfstype = \"zfs\"\n",
        ":1:1:",
        "needs pool",
    ),
    (
        "node = \"a\"\n[resource.r]\nmountpoint = \"/mnt/r\"\n[resource.r.on.b]\nlocal = \"/x\"\nremote = \"198.18.0.2\"\n",
        ":2:1:",
        "no [resource.r.on.a] section",
    ),
    (
        "[resource.r]\nbackend = \"none\"\ndevice = \"/dev/x\"\nmountpoint = \"/m\"\ncarp = \"em0\"\n",
        ":5:8:",
        "VHID@IFACE",
    ),
    ("[resource.r]\nbackend = \"lvm\"\n", ":2:11:", "lvm"),
    ("this is not toml\n", ":1:", ""),
];

#[test]
fn bad_configs_give_one_error_and_exit_2() {
    for (text, pos, words) in BAD {
        for args in [
            &["switch", "master"][..],
            &["promote"][..],
            &["demote", "--dry-run"][..],
            &["status", "--json"][..],
            &["check-config"][..],
        ] {
            let e = Env::new();
            e.write_config(text);
            let r = e.run(args);
            assert_eq!(r.code, 2, "{args:?} {text}\n{r:?}");
            let lines: Vec<&str> = r.stderr.lines().collect();
            assert_eq!(lines.len(), 1, "{args:?} {text}\n{r:?}");
            let prefix = format!("tandem: {}{pos}", e.config().display());
            assert!(lines[0].starts_with(&prefix), "{args:?} {text}\n{r:?}");
            assert!(lines[0].contains(words), "{args:?} {text}\n{r:?}");
            assert_eq!(r.stdout, "", "{args:?}");
            // Nothing ran, nothing was created.
            let entries: Vec<_> = std::fs::read_dir(e.path())
                .unwrap()
                .map(|d| d.unwrap().file_name())
                .collect();
            assert_eq!(entries.len(), 2, "{entries:?}");
            assert_eq!(e.calls(), "");
        }
    }
}

#[test]
fn missing_config_file_is_exit_2() {
    let e = Env::new();
    let r = e.run(&["switch", "master"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains("cannot read the configuration"), "{r:?}");
}
