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

/// `1@em0`, `12@carp0`: a CARP VHID (1-255) at an interface.
pub fn is_vhid_at_iface(w: &str) -> bool {
    w.split_once('@').is_some_and(|(vhid, ifc)| {
        vhid.parse::<u8>().is_ok_and(|v| v > 0)
            && !ifc.is_empty()
            && ifc
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
    })
}

/// The first state word decides; other arguments are ignored except `VHID@IFACE`.
pub fn parse(args: &[String]) -> Result<Event> {
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
        assert!(!is_vhid_at_iface("0@em0"));
        assert!(!is_vhid_at_iface("em0"));
        assert!(!is_vhid_at_iface("1@"));
        assert!(!is_vhid_at_iface("a@em0"));
    }
}
