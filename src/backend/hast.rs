//! Backend `hast`: FreeBSD HAST through hastctl(8).
//!
//! Before promoting, the seed script waited for the `hastd: RES (secondary)` worker to exit:
//! while it runs, the peer is still connected to it as primary. tandem does the same, bounded
//! by `role_timeout`. hastd reports its state in `hastctl list`; a status that says stale or
//! split-brain is refused.

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
    pub role: String,
    pub status: String,
    pub dirty: Option<u64>,
}

/// Parse `hastctl list` output ("RES:" then indented "key: value" lines) for `name`.
pub fn parse_list(text: &str, name: &str) -> Option<HastList> {
    let mut found = None;
    let mut current = false;
    for line in text.lines() {
        if !line.starts_with(' ') {
            current = line.trim_end().strip_suffix(':') == Some(name);
            if current {
                found = Some(HastList::default());
            }
            continue;
        }
        let (Some(h), true) = (found.as_mut(), current) else {
            continue;
        };
        let Some((k, v)) = line.trim().split_once(':') else {
            continue;
        };
        let v = v.trim();
        match k {
            "role" => h.role = v.to_string(),
            "status" => h.status = v.to_string(),
            // "dirty: 1048576 (1.0MB)"
            "dirty" => h.dirty = v.split_whitespace().next().and_then(|n| n.parse().ok()),
            "error" => h.status = format!("error {v}"),
            _ => {}
        }
    }
    found
}

/// Parse the `hastctl status` table of FreeBSD 10+ ("Name Status Role Components").
pub fn parse_status_table(text: &str, name: &str) -> Option<HastList> {
    text.lines().skip(1).find_map(|line| {
        let mut f = line.split_whitespace();
        if f.next()? != name {
            return None;
        }
        let status = f.next()?.to_string();
        if let Some(code) = status.strip_prefix("ERR") {
            return Some(HastList {
                status: format!("error {code}"),
                ..HastList::default()
            });
        }
        Some(HastList {
            role: f.next()?.to_string(),
            status,
            dirty: None,
        })
    })
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
        parse_list(&out.stdout, &self.name)
            .or_else(|| parse_status_table(&out.stdout, &self.name))
            .with_context(|| {
                format!(
                    "`{}` does not show the resource: {}",
                    cmd.line(),
                    out.stdout.trim()
                )
            })
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
            let out = Cmd::new("pgrep", &["-f", &pattern]).output()?;
            Ok(out.status.success())
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

    const LIST: &str = "hast0:
  role: primary
  provname: hast0
  localpath: /dev/ada1
  extentsize: 2097152 (2.0MB)
  keepdirty: 64
  remoteaddr: 192.168.10.12
  replication: memsync
  status: complete
  workerpid: 1234
  dirty: 1048576 (1.0MB)
  statistics:
    reads: 19
    writes: 0
hast1:
  role: secondary
  status: degraded
  dirty: 0 (0B)
";

    #[test]
    fn list_parsing() {
        let h = parse_list(LIST, "hast0").unwrap();
        assert_eq!(h.role, "primary");
        assert_eq!(h.status, "complete");
        assert_eq!(h.dirty, Some(1 << 20));
        let h = parse_list(LIST, "hast1").unwrap();
        assert_eq!(
            (h.role.as_str(), h.status.as_str()),
            ("secondary", "degraded")
        );
        assert!(parse_list(LIST, "hast2").is_none());
        let e = parse_list("hast0:\n  error: 2\n", "hast0").unwrap();
        assert_eq!(e.status, "error 2");
    }

    #[test]
    fn status_table_parsing() {
        let t = "Name\tStatus\t Role\t\tComponents\n\
                 hast0\tcomplete primary        /dev/ada1\t192.168.10.12\n\
                 hast1\tERR2\n";
        let h = parse_status_table(t, "hast0").unwrap();
        assert_eq!(
            (h.role.as_str(), h.status.as_str()),
            ("primary", "complete")
        );
        assert_eq!(parse_status_table(t, "hast1").unwrap().status, "error 2");
        assert!(parse_status_table(t, "hast2").is_none());
        // The table's first line does not parse as the detailed format.
        assert!(parse_list(t, "hast0").is_none());
    }
}
