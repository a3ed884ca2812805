//! The event words of devd, keepalived, ucarp and admins, and the `carp` filter.

use anyhow::Result;

use crate::config::Resource;
use crate::exit::Usage;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Become primary: promote.
    Master,
    /// Become secondary: demote.
    Slave,
}

/// One `tandem switch` invocation, understood.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub target: Target,
    /// The state word as given (for logs).
    pub word: String,
    /// A `VHID@IFACE` argument (FreeBSD 10+ devd CARP events), if any.
    pub carp: Option<String>,
}

const MASTER_WORDS: &[&str] = &["master", "primary", "link_up", "up"];
const SLAVE_WORDS: &[&str] = &[
    "slave",
    "secondary",
    "backup",
    "init",
    "link_down",
    "down",
    "fault",
    "stop",
];

/// The state a word stands for, case-insensitively.
pub fn state_word(w: &str) -> Option<Target> {
    let l = w.to_ascii_lowercase();
    if MASTER_WORDS.contains(&l.as_str()) {
        Some(Target::Master)
    } else if SLAVE_WORDS.contains(&l.as_str()) {
        Some(Target::Slave)
    } else {
        None
    }
}

/// `1@em0`, `12@vlan0.100`: a CARP VHID (1-255) at an interface, as ip_carp.c's
/// carp_set_state() names its devd subsystem (`"%u@%s"`, vhid and if_xname). Interface names
/// can be renamed to almost anything (`ifconfig em0 name lan_if`), so any printable ASCII but
/// `@` is allowed, up to IFNAMSIZ - 1 = 15 bytes.
pub fn is_vhid_at_iface(w: &str) -> bool {
    w.split_once('@').is_some_and(|(vhid, ifc)| {
        vhid.parse::<u8>().is_ok_and(|v| v > 0)
            && !vhid.starts_with(['+', '0'])
            && (1..=15).contains(&ifc.len())
            && ifc.chars().all(|c| c.is_ascii_graphic() && c != '@')
    })
}

/// The first state word decides; other arguments are ignored except `VHID@IFACE`. An argument
/// that starts like one (`DIGITS@`) but is not one is an error: read as no filter, it would
/// switch every resource.
pub fn parse(args: &[String]) -> Result<Event> {
    if let Some(bad) = args.iter().find(|a| {
        a.split_once('@')
            .is_some_and(|(v, _)| !v.is_empty() && v.chars().all(|c| c.is_ascii_digit()))
            && !is_vhid_at_iface(a)
    }) {
        return Err(Usage(format!(
            "switch: {bad:?} is not a CARP VHID@IFACE: expected a VHID of 1 to 255 and an \
             interface name of 1 to 15 characters, e.g. 1@em0"
        ))
        .into());
    }
    let Some((word, target)) = args
        .iter()
        .find_map(|a| state_word(a).map(|t| (a.clone(), t)))
    else {
        return Err(Usage(format!(
            "switch: no state word in {:?}: expected one of master, primary, MASTER, LINK_UP, up \
             (promote) or slave, secondary, backup, BACKUP, INIT, LINK_DOWN, down, FAULT, STOP \
             (demote)",
            args.join(" ")
        ))
        .into());
    };
    let carp = args.iter().find(|a| is_vhid_at_iface(a)).cloned();
    Ok(Event { target, word, carp })
}

impl Event {
    /// Does this event concern `res`? A resource without `carp` follows every event; one with
    /// `carp` skips events for another `VHID@IFACE`.
    pub fn matches(&self, res: &Resource) -> bool {
        match (&self.carp, &res.carp) {
            (Some(ev), Some(mine)) => ev.eq_ignore_ascii_case(mine),
            _ => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<Event> {
        parse(&s.split_whitespace().map(String::from).collect::<Vec<_>>())
    }

    #[test]
    fn every_callers_convention() {
        assert_eq!(p("master").unwrap().target, Target::Master);
        let e = p("1@em0 MASTER").unwrap();
        assert_eq!(
            (e.target, e.carp.as_deref()),
            (Target::Master, Some("1@em0"))
        );
        assert_eq!(p("INSTANCE VI_1 BACKUP 100").unwrap().target, Target::Slave);
        let e = p("master eth0 198.18.0.10").unwrap();
        assert_eq!((e.target, e.carp), (Target::Master, None));
        assert_eq!(p("LINK_DOWN").unwrap().target, Target::Slave);
        assert_eq!(p("carp0 LINK_UP").unwrap().target, Target::Master);
        assert_eq!(p("2@vtnet0 INIT").unwrap().target, Target::Slave);
        assert_eq!(p("GROUP g FAULT 0").unwrap().target, Target::Slave);
        // The first state word decides.
        assert_eq!(p("down master").unwrap().target, Target::Slave);
    }

    #[test]
    fn no_state_word_is_usage() {
        let e = p("INSTANCE VI_1 100").unwrap_err();
        assert!(e.downcast_ref::<Usage>().is_some());
    }

    #[test]
    fn vhid() {
        assert!(is_vhid_at_iface("1@em0"));
        assert!(is_vhid_at_iface("255@vlan0.100"));
        assert!(is_vhid_at_iface("3@lan_if"));
        assert!(!is_vhid_at_iface("0@em0"));
        assert!(!is_vhid_at_iface("256@em0"));
        assert!(!is_vhid_at_iface("01@em0"));
        assert!(!is_vhid_at_iface("em0"));
        assert!(!is_vhid_at_iface("1@"));
        assert!(!is_vhid_at_iface("a@em0"));
        assert!(!is_vhid_at_iface("1@a-very-long-ifname"));
    }

    #[test]
    fn malformed_carp_arguments_are_usage_errors() {
        for args in [
            "256@em0 MASTER",
            "0@em0 BACKUP",
            "1@ MASTER",
            "1@em0@x MASTER",
        ] {
            let e = p(args).unwrap_err();
            assert!(e.downcast_ref::<Usage>().is_some(), "{args}: {e}");
            let bad = args.split(' ').next().unwrap_or_default();
            assert!(e.to_string().contains(&format!("{bad:?}")), "{args}: {e}");
        }
        // An empty devd expansion (a rule without $subsystem) leaves only the state word.
        let e = p("MASTER").unwrap();
        assert_eq!((e.target, e.carp), (Target::Master, None));
    }

    /// The `match` values and the `action` of each `notify` rule in devd/tandem.conf.
    fn devd_rules(conf: &str) -> Vec<(Vec<(String, String)>, String)> {
        let quoted = |l: &str| -> Vec<String> {
            l.split('"').skip(1).step_by(2).map(String::from).collect()
        };
        let mut rules = Vec::new();
        let mut matches = Vec::new();
        for line in conf.lines().map(str::trim) {
            if line.starts_with("notify") {
                matches.clear();
            } else if line.starts_with("match") {
                let q = quoted(line);
                matches.push((q[0].clone(), q[1].clone()));
            } else if line.starts_with("action") {
                rules.push((matches.clone(), quoted(line)[0].clone()));
            }
        }
        rules
    }

    /// Run every rule of devd/tandem.conf through the argument shapes devd(8) gives it: the
    /// kernel's CARP notification is system=CARP subsystem=VHID@IFACE type=MASTER|BACKUP|INIT
    /// (carp_set_state() in sys/netinet/ip_carp.c), the legacy carp0 one system=IFNET
    /// subsystem=carp0 type=LINK_UP|LINK_DOWN; devd substitutes $subsystem and $type.
    #[test]
    fn devd_conf_actions() {
        let rules = devd_rules(include_str!("../../devd/tandem.conf"));
        assert_eq!(rules.len(), 3, "{rules:?}");
        let mut seen = Vec::new();
        for (matches, action) in rules {
            let get = |k: &str| {
                matches
                    .iter()
                    .find(|(key, _)| key == k)
                    .map(|(_, v)| v.clone())
            };
            let types = get("type").expect("every rule matches a type");
            let subsystem = get("subsystem").unwrap_or_else(|| "1@em0".into());
            for ty in types.trim_matches(['(', ')']).split('|') {
                let line = action
                    .replace("$subsystem", &subsystem)
                    .replace("$type", ty);
                let argv: Vec<String> = line.split_whitespace().map(String::from).collect();
                assert_eq!(argv[..2], ["/usr/local/sbin/tandem", "switch"], "{line}");
                let e = parse(&argv[2..]).unwrap();
                seen.push((ty.to_string(), e.target, e.carp));
            }
        }
        let m = Some("1@em0".to_string());
        assert_eq!(
            seen,
            [
                ("MASTER".into(), Target::Master, m.clone()),
                ("BACKUP".into(), Target::Slave, m.clone()),
                ("INIT".into(), Target::Slave, m),
                ("LINK_UP".into(), Target::Master, None),
                ("LINK_DOWN".into(), Target::Slave, None),
            ]
        );
    }
}
