//! Backend `hast`: FreeBSD HAST through hastctl(8).
//!
//! Before promoting, the seed script waited for the `hastd: RES (secondary)` worker to exit:
//! while it runs, the peer is still connected to it as primary. tandem does the same, bounded
//! by `role_timeout`. hastd reports its state in `hastctl list`. Its status is only ever
//! `complete` or `degraded` (ctrl_thread() in sbin/hastd/control.c): hastd logs a split-brain
//! and drops the connection rather than report it, so the refusal of a status naming stale or
//! split-brain data only guards against a hastd that would say so.

use std::time::Duration;

use anyhow::{Context, Result};

use super::{Backend, BackendStatus, Connection, Role, RoleCtx, SyncState, wait_until};
use crate::config::format_duration;
use crate::exit::Refused;
use crate::host::Cmd;

pub struct Hast {
    name: String,
}

/// The fields of `hastctl list RES` tandem uses.
#[derive(Debug, Default, PartialEq)]
pub struct HastList {
    /// init, primary or secondary (role2str() in sbin/hastd/subr.c).
    pub role: String,
    /// complete or degraded (ctrl_thread() in sbin/hastd/control.c), "" while no worker
    /// runs (role init, or secondary before the primary connects), "error N" when hastd
    /// answered EHAST_* error N for the resource (1: it has no such resource).
    pub status: String,
    pub dirty: Option<u64>,
}

/// Parse the output of `hastctl list` (FreeBSD 10 and later) or `hastctl status` (FreeBSD 8
/// and 9, the same format without workerpid, local errors and queues) for `name`: "RES:"
/// then "  key: value" lines, printed by control_list() (control_status() before 10) in
/// sbin/hastctl/hastctl.c.
pub fn parse_list(text: &str, name: &str) -> Result<HastList> {
    let mut found: Option<HastList> = None;
    let mut current = false;
    for (i, line) in text.lines().enumerate() {
        let at = || format!("line {}: {line:?}", i + 1);
        if line.trim().is_empty() {
            continue;
        }
        if !line.starts_with(' ') {
            let res = line
                .strip_suffix(':')
                .filter(|r| !r.is_empty() && !r.contains(char::is_whitespace))
                .with_context(|| format!("{}: expected \"RESOURCE:\"", at()))?;
            current = res == name;
            if current {
                found = Some(HastList::default());
            }
            continue;
        }
        let (k, v) = line
            .trim()
            .split_once(':')
            .with_context(|| format!("{}: expected \"  key: value\"", at()))?;
        let (Some(h), true) = (found.as_mut(), current) else {
            continue;
        };
        let v = v.trim();
        match k {
            "role" => h.role = v.to_string(),
            "status" => h.status = v.to_string(),
            // "dirty: 1048576 (1.0MB)": printf("  dirty: %ju (%NB)\n", ...).
            "dirty" => {
                let n = v.split_whitespace().next().unwrap_or_default();
                h.dirty = Some(
                    n.parse()
                        .with_context(|| format!("{}: dirty is not a number", at()))?,
                );
            }
            "error" => {
                let code: i16 = v
                    .parse()
                    .with_context(|| format!("{}: error is not a number", at()))?;
                h.status = format!("error {code}");
            }
            _ => {}
        }
    }
    let h = found.with_context(|| format!("no \"{name}:\" section"))?;
    if h.role.is_empty() && !h.status.starts_with("error") {
        anyhow::bail!("no role for {name}");
    }
    Ok(h)
}

/// The header control_status() prints before the first row of `hastctl status`.
const STATUS_HEADER: &str = "Name\tStatus\t Role\t\tComponents";

/// Parse the `hastctl status` table of FreeBSD 10 and later for `name`. control_status() in
/// sbin/hastctl/hastctl.c prints the header, then per resource `"%s\t"` name and either
/// `"ERR%d\n"` or `"%-9s"` status ("-" without a worker), `"%-15s"` role, `"%s\t"` local
/// path and `"%s\n"` remote address.
pub fn parse_status_table(text: &str, name: &str) -> Result<HastList> {
    let mut lines = text.lines().enumerate();
    match lines.next() {
        Some((_, h)) if h.trim_end() == STATUS_HEADER => {}
        other => anyhow::bail!(
            "line 1: expected the header {STATUS_HEADER:?}, found {:?}",
            other.map_or("", |(_, l)| l)
        ),
    }
    for (i, line) in lines {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.first() != Some(&name) {
            continue;
        }
        let at = || format!("line {}: {line:?}", i + 1);
        if let Some(code) = f.get(1).and_then(|s| s.strip_prefix("ERR")) {
            let code: i16 = code
                .parse()
                .with_context(|| format!("{}: error is not a number", at()))?;
            return Ok(HastList {
                status: format!("error {code}"),
                ..HastList::default()
            });
        }
        let [_, status, role, ..] = f[..] else {
            anyhow::bail!("{}: expected name, status and role", at());
        };
        return Ok(HastList {
            role: role.to_string(),
            status: if status == "-" { "" } else { status }.to_string(),
            dirty: None,
        });
    }
    anyhow::bail!("no row for {name}")
}

/// Parse what `hastctl list` or `hastctl status` printed, whichever format it is.
pub fn parse_hastctl(text: &str, name: &str) -> Result<HastList> {
    if text.starts_with("Name\t") {
        parse_status_table(text, name)
    } else {
        parse_list(text, name)
    }
}

/// pgrep(1)'s exit status: 0 a process matched, 1 none did, 2 a syntax error, 3 a fatal
/// error. Only 1 says the secondary worker is gone; an error must not pass for that.
pub fn pgrep_found(code: i32) -> Result<bool> {
    match code {
        0 => Ok(true),
        1 => Ok(false),
        _ => anyhow::bail!("pgrep exited with status {code}"),
    }
}

impl Hast {
    pub fn new(name: &str) -> Hast {
        Hast {
            name: name.to_string(),
        }
    }

    fn worker_title(&self) -> String {
        format!("hastd: {} (secondary)", self.name)
    }

    /// `hastctl list RES`; before FreeBSD 10 there was no `list` and `hastctl status RES`
    /// printed the same detailed format, so that is the fallback (table or detailed).
    fn list(&self, timeout: Duration) -> Result<HastList> {
        let list = Cmd::new("hastctl", &["list", &self.name]).timeout(Some(timeout));
        let (cmd, out) = match list.run() {
            Ok(out) => (list, out),
            Err(first) => {
                let status = Cmd::new("hastctl", &["status", &self.name]).timeout(Some(timeout));
                match status.run() {
                    Ok(out) => (status, out),
                    Err(_) => return Err(first),
                }
            }
        };
        parse_hastctl(&out.stdout, &self.name).with_context(|| format!("`{}`", cmd.line()))
    }

    /// Does this node still run a secondary worker for the resource (the peer is primary)?
    fn secondary_worker_running(&self) -> Result<bool> {
        let title = self.worker_title();
        if cfg!(target_os = "linux") {
            let Ok(dir) = std::fs::read_dir("/proc") else {
                return Ok(false);
            };
            for e in dir.flatten() {
                if let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) {
                    let argv0 = cmdline.split(|&b| b == 0).next().unwrap_or_default();
                    if argv0.starts_with(title.as_bytes()) {
                        return Ok(true);
                    }
                }
            }
            Ok(false)
        } else {
            let pattern = format!("^hastd: {} \\(secondary\\)", self.name);
            let pgrep = Cmd::new("pgrep", &["-f", &pattern]);
            let out = pgrep.output()?;
            pgrep_found(out.code())
                .with_context(|| format!("`{}`: {}", pgrep.line(), out.stderr.trim()))
        }
    }
}

impl Backend for Hast {
    fn status(&self) -> Result<BackendStatus> {
        let l = self.list(Duration::from_secs(10))?;
        let role = match l.role.as_str() {
            "primary" => Role::Primary,
            "secondary" => Role::Secondary,
            "init" => Role::Init,
            _ => Role::Unknown,
        };
        let s = l.status.to_ascii_lowercase();
        let (connection, state) = if s.contains("split") {
            (Connection::Disconnected, SyncState::SplitBrain)
        } else if s == "complete" {
            (Connection::Connected, SyncState::Complete)
        } else if s == "degraded" {
            (Connection::Disconnected, SyncState::Degraded)
        } else {
            (Connection::NotApplicable, SyncState::NotApplicable)
        };
        Ok(BackendStatus {
            role,
            connection,
            state,
            dirty_bytes: l.dirty,
            sync_progress: None,
            extra: serde_json::Map::new(),
        })
    }

    fn promote(&self, ctx: &RoleCtx) -> Result<()> {
        let l = self.list(ctx.command_timeout)?;
        let s = l.status.to_ascii_lowercase();
        if (s.contains("split") || s.contains("stale")) && !ctx.force {
            return Err(Refused(format!(
                "hastd reports {} as {:?}: refusing to promote (use --force to promote anyway)",
                self.name, l.status
            ))
            .into());
        }
        let gone = wait_until(ctx.role_timeout, || {
            self.secondary_worker_running().map(|r| !r)
        })?;
        if !gone {
            return Err(Refused(format!(
                "the peer is still primary for {}: \"{}\" still runs after {}",
                self.name,
                self.worker_title(),
                format_duration(ctx.role_timeout)
            ))
            .into());
        }
        Cmd::new("hastctl", &["role", "primary", &self.name])
            .timeout(Some(ctx.command_timeout))
            .run()?;
        Ok(())
    }

    fn demote(&self, ctx: &RoleCtx) -> Result<()> {
        Cmd::new("hastctl", &["role", "secondary", &self.name])
            .timeout(Some(ctx.command_timeout))
            .run()?;
        Ok(())
    }

    fn promote_plan(&self, ctx: &RoleCtx) -> Vec<String> {
        vec![
            format!(
                "hastctl list {}    # {}",
                self.name,
                if ctx.force {
                    "--force: promote even stale or split-brain data"
                } else {
                    "refuse stale or split-brain data"
                }
            ),
            format!(
                "wait until no \"{}\" process runs (up to {})",
                self.worker_title(),
                format_duration(ctx.role_timeout)
            ),
            format!("hastctl role primary {}", self.name),
        ]
    }

    fn demote_plan(&self, _: &RoleCtx) -> Vec<String> {
        vec![format!("hastctl role secondary {}", self.name)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `hastctl list` on FreeBSD 13 and 14: control_list() in sbin/hastctl/hastctl.c prints
    /// the same lines in releng/11.3 and in the post-14.0 tree (SPDX, no __FBSDID), so both
    /// releases print this. One primary, one resource in role init (no worker: no status and
    /// no workerpid line, zero sizes) and one hastd does not know (EHAST_NOENTRY, 1).
    const LIST_13_14: &str = "shared:
  role: primary
  provname: shared
  localpath: /dev/ada1
  extentsize: 2097152 (2.0MB)
  keepdirty: 64
  remoteaddr: 10.0.0.2
  sourceaddr: 10.0.0.1
  replication: memsync
  status: degraded
  workerpid: 1022
  dirty: 12582912 (12MB)
  statistics:
    reads: 19
    writes: 2
    deletes: 0
    flushes: 1
    activemap updates: 1
    local errors: read: 0, write: 0, delete: 0, flush: 0
    queues: local: 0, send: 0, recv: 0, done: 0, idle: 255
backup:
  role: init
  provname: backup
  localpath: /dev/ada2
  extentsize: 0 (0B)
  keepdirty: 0
  remoteaddr: tcp4://10.0.0.2
  replication: memsync
  dirty: 0 (0B)
  statistics:
    reads: 0
    writes: 0
    deletes: 0
    flushes: 0
    activemap updates: 0
    local errors: read: 0, write: 0, delete: 0, flush: 0
    queues: local: 0, send: 0, recv: 0, done: 0, idle: 0
nosuch:
  error: 1
";

    /// `hastctl status` on FreeBSD 13 and 14: control_status() prints this table (same
    /// source in both, see above); "-" is a resource without a worker.
    const STATUS_13_14: &str = "Name\tStatus\t Role\t\tComponents\n\
        shared\tcomplete primary        /dev/ada1\t10.0.0.2\n\
        backup\t-        init           /dev/ada2\ttcp4://10.0.0.2\n\
        logs\tdegraded secondary      /dev/ada3\t10.0.0.2\n\
        nosuch\tERR1\n";

    /// `hastctl status shared` on FreeBSD 8 and 9, before `list` existed: the detailed listing
    /// of control_status() in the RELENG_8 sbin/hastctl/hastctl.c ("1.1.2.12.2.1 2012/03/03"),
    /// without the workerpid, local errors and queues lines of later releases.
    const STATUS_8_9: &str = "shared:
  role: secondary
  provname: shared
  localpath: /dev/ada1
  extentsize: 2097152 (2.0MB)
  keepdirty: 0
  remoteaddr: 10.0.0.1
  replication: fullsync
  status: complete
  dirty: 0 (0B)
  statistics:
    reads: 0
    writes: 7
    deletes: 0
    flushes: 0
    activemap updates: 0
";

    fn fields(h: &HastList) -> (&str, &str, Option<u64>) {
        (h.role.as_str(), h.status.as_str(), h.dirty)
    }

    #[test]
    fn list_13_14() {
        let h = parse_hastctl(LIST_13_14, "shared").unwrap();
        assert_eq!(fields(&h), ("primary", "degraded", Some(12 << 20)));
        let h = parse_hastctl(LIST_13_14, "backup").unwrap();
        assert_eq!(fields(&h), ("init", "", Some(0)));
        let h = parse_hastctl(LIST_13_14, "nosuch").unwrap();
        assert_eq!(fields(&h), ("", "error 1", None));
    }

    #[test]
    fn status_table_13_14() {
        let h = parse_hastctl(STATUS_13_14, "shared").unwrap();
        assert_eq!(fields(&h), ("primary", "complete", None));
        let h = parse_hastctl(STATUS_13_14, "backup").unwrap();
        assert_eq!(fields(&h), ("init", "", None));
        let h = parse_hastctl(STATUS_13_14, "logs").unwrap();
        assert_eq!(fields(&h), ("secondary", "degraded", None));
        let h = parse_hastctl(STATUS_13_14, "nosuch").unwrap();
        assert_eq!(h.status, "error 1");
    }

    #[test]
    fn status_freebsd_8_9() {
        let h = parse_hastctl(STATUS_8_9, "shared").unwrap();
        assert_eq!(fields(&h), ("secondary", "complete", Some(0)));
    }

    #[test]
    fn absent_resource_is_named() {
        let e = parse_hastctl(LIST_13_14, "other").unwrap_err().to_string();
        assert_eq!(e, "no \"other:\" section");
        let e = parse_hastctl(STATUS_13_14, "other")
            .unwrap_err()
            .to_string();
        assert_eq!(e, "no row for other");
    }

    #[test]
    fn malformed_list() {
        let e = |t: &str| format!("{:#}", parse_hastctl(t, "shared").unwrap_err());
        let msg = e("shared:\n  role: primary\n  dirty: lots (?)\n");
        assert!(
            msg.contains("line 3") && msg.contains("dirty is not a number"),
            "{msg}"
        );
        let msg = e("shared:\n  role primary\n");
        assert!(
            msg.contains("line 2") && msg.contains("key: value"),
            "{msg}"
        );
        let msg = e("shared:\n  provname: shared\n  status: complete\n");
        assert_eq!(msg, "no role for shared");
        let msg = e("hastctl: Unable to connect to hastd via uds:///var/run/hastctl.\n");
        assert!(msg.contains("line 1") && msg.contains("RESOURCE:"), "{msg}");
        let msg = e("shared:\n  error: ENOENT\n");
        assert!(msg.contains("error is not a number"), "{msg}");
    }

    #[test]
    fn pgrep_exit_status() {
        assert!(pgrep_found(0).unwrap());
        assert!(!pgrep_found(1).unwrap());
        assert_eq!(
            pgrep_found(2).unwrap_err().to_string(),
            "pgrep exited with status 2"
        );
        assert!(pgrep_found(3).is_err());
    }

    #[test]
    fn malformed_status_table() {
        let e = |t: &str| format!("{:#}", parse_status_table(t, "shared").unwrap_err());
        let msg = e("Name Status Role\nshared complete primary\n");
        assert!(msg.contains("line 1: expected the header"), "{msg}");
        let msg = e("Name\tStatus\t Role\t\tComponents\nshared\tcomplete\n");
        assert!(
            msg.contains("line 2") && msg.contains("status and role"),
            "{msg}"
        );
        let msg = e("Name\tStatus\t Role\t\tComponents\nshared\tERRx\n");
        assert!(msg.contains("error is not a number"), "{msg}");
        assert!(e("").contains("expected the header"));
    }
}
