//! Backend `drbd`: DRBD 9 through drbdadm(8), state from `drbdsetup status RES --json`.
//!
//! A promote waits (bounded by `role_timeout`) while a peer is Primary, and refuses when the
//! local disk is not UpToDate (Outdated, Inconsistent, …) unless `--force`.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::Value;

use super::{Backend, BackendStatus, Connection, Role, RoleCtx, SyncState};
use crate::config::format_duration;
use crate::exit::Refused;
use crate::host::Cmd;
use crate::host::cmd::CmdFailed;

pub struct Drbd {
    name: String,
}

/// The fields of `drbdsetup status --json` tandem uses.
#[derive(Debug, Clone, PartialEq)]
pub struct DrbdState {
    pub role: String,
    /// Local disk state of every volume ("UpToDate", "Outdated", "Inconsistent", "Diskless"…).
    pub disks: Vec<String>,
    pub peer_roles: Vec<String>,
    pub connection_states: Vec<String>,
    pub replication_states: Vec<String>,
    pub out_of_sync_kib: u64,
    pub percent_in_sync: Option<f64>,
}

/// Parse the JSON array `drbdsetup status --json` prints, for resource `name`.
pub fn parse_status(text: &str, name: &str) -> Result<DrbdState> {
    let v: Value = serde_json::from_str(text).context("drbdsetup status --json: not JSON")?;
    let res = v
        .as_array()
        .and_then(|a| {
            a.iter()
                .find(|r| r.get("name").and_then(Value::as_str) == Some(name))
        })
        .with_context(|| format!("drbdsetup status --json: no resource {name:?}"))?;
    let s = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    let empty = Vec::new();
    let arr = |v: &Value, k: &str| v.get(k).and_then(Value::as_array).unwrap_or(&empty).clone();
    let devices = arr(res, "devices");
    let conns = arr(res, "connections");
    let peer_devs: Vec<Value> = conns.iter().flat_map(|c| arr(c, "peer_devices")).collect();
    Ok(DrbdState {
        role: s(res, "role"),
        disks: devices.iter().map(|d| s(d, "disk-state")).collect(),
        peer_roles: conns.iter().map(|c| s(c, "peer-role")).collect(),
        connection_states: conns.iter().map(|c| s(c, "connection-state")).collect(),
        replication_states: peer_devs
            .iter()
            .map(|p| s(p, "replication-state"))
            .collect(),
        out_of_sync_kib: peer_devs
            .iter()
            .filter_map(|p| p.get("out-of-sync").and_then(Value::as_u64))
            .sum(),
        percent_in_sync: peer_devs
            .iter()
            .filter_map(|p| p.get("percent-in-sync").and_then(Value::as_f64))
            .reduce(f64::min),
    })
}

impl Drbd {
    pub fn new(name: &str) -> Drbd {
        Drbd {
            name: name.to_string(),
        }
    }

    fn state(&self, timeout: Duration) -> Result<DrbdState> {
        let out = Cmd::new("drbdsetup", &["status", &self.name, "--json"])
            .timeout(Some(timeout))
            .run()?;
        parse_status(&out.stdout, &self.name)
    }
}

/// The connection and the sync state `tandem status` shows for a DRBD resource.
fn sync_state(st: &DrbdState) -> (Connection, SyncState) {
    let connection = if st.connection_states.iter().any(|c| c == "Connected") {
        Connection::Connected
    } else if st.connection_states.iter().any(|c| c == "Connecting") {
        Connection::Connecting
    } else {
        Connection::Disconnected
    };
    let syncing = st
        .replication_states
        .iter()
        .any(|r| r.starts_with("Sync") || r.starts_with("PausedSync"));
    let state = if st.disks.iter().any(|d| d == "Diskless") {
        // Detached (on-io-error detach, or `drbdadm detach`): served from the peer.
        SyncState::Diskless
    } else if syncing {
        SyncState::Syncing
    } else if connection == Connection::Connected
        && st.disks.iter().all(|d| d == "UpToDate")
        && st.out_of_sync_kib == 0
    {
        SyncState::Complete
    } else {
        SyncState::Degraded
    };
    (connection, state)
}

impl Backend for Drbd {
    fn status(&self) -> Result<BackendStatus> {
        let st = self.state(Duration::from_secs(10))?;
        let role = match st.role.as_str() {
            "Primary" => Role::Primary,
            "Secondary" => Role::Secondary,
            _ => Role::Unknown,
        };
        let (connection, state) = sync_state(&st);
        Ok(BackendStatus {
            role,
            connection,
            state,
            dirty_bytes: Some(st.out_of_sync_kib * 1024),
            sync_progress: st.percent_in_sync.map(|p| p / 100.0),
            extra: serde_json::Map::new(),
        })
    }

    fn promote(&self, ctx: &RoleCtx) -> Result<()> {
        let deadline = Instant::now() + ctx.role_timeout;
        loop {
            let st = self.state(ctx.command_timeout)?;
            if let Some(bad) = st.disks.iter().find(|d| *d != "UpToDate") {
                if !ctx.force {
                    return Err(Refused(format!(
                        "drbd {}: the local disk is {bad}, not UpToDate: refusing to promote \
                         stale data (use --force to promote anyway)",
                        self.name
                    ))
                    .into());
                }
            }
            let peer_primary = st.peer_roles.iter().any(|r| r == "Primary");
            if !peer_primary {
                let mut c = Cmd::new("drbdadm", &["primary"]);
                if ctx.force {
                    c = c.arg("--force");
                }
                let c = c.arg(&self.name).timeout(Some(ctx.command_timeout));
                match c.run() {
                    Ok(_) => return Ok(()),
                    // The peer became primary between the status and the role change.
                    Err(e)
                        if e.downcast_ref::<CmdFailed>()
                            .is_some_and(|f| f.stderr.contains("Multiple primaries"))
                            && Instant::now() < deadline => {}
                    Err(e) => return Err(e),
                }
            }
            if Instant::now() >= deadline {
                return Err(Refused(format!(
                    "drbd {}: the peer is still Primary after {}",
                    self.name,
                    format_duration(ctx.role_timeout)
                ))
                .into());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn demote(&self, ctx: &RoleCtx) -> Result<()> {
        Cmd::new("drbdadm", &["secondary", &self.name])
            .timeout(Some(ctx.command_timeout))
            .run()?;
        Ok(())
    }

    fn promote_plan(&self, ctx: &RoleCtx) -> Vec<String> {
        vec![
            format!(
                "drbdsetup status {} --json    # {}wait up to {} while a peer is Primary",
                self.name,
                if ctx.force {
                    ""
                } else {
                    "refuse unless the local disk is UpToDate; "
                },
                format_duration(ctx.role_timeout)
            ),
            format!(
                "drbdadm primary {}{}",
                if ctx.force { "--force " } else { "" },
                self.name
            ),
        ]
    }

    fn demote_plan(&self, _: &RoleCtx) -> Vec<String> {
        vec![format!("drbdadm secondary {}", self.name)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const JSON: &str = r#"[
{
  "name": "r0", "node-id": 1, "role": "Secondary", "suspended": false,
  "devices": [ { "volume": 0, "minor": 0, "disk-state": "Outdated", "client": false,
                 "size": 1048508 } ],
  "connections": [ { "peer-node-id": 0, "name": "peer", "connection-state": "Connected",
      "congested": false, "peer-role": "Primary",
      "peer_devices": [ { "volume": 0, "replication-state": "SyncTarget",
          "peer-disk-state": "UpToDate", "out-of-sync": 2048, "percent-in-sync": 75.5 } ] } ]
}
]"#;

    #[test]
    fn status_parsing() {
        let s = parse_status(JSON, "r0").unwrap();
        assert_eq!(s.role, "Secondary");
        assert_eq!(s.disks, vec!["Outdated"]);
        assert_eq!(s.peer_roles, vec!["Primary"]);
        assert_eq!(s.out_of_sync_kib, 2048);
        assert_eq!(s.percent_in_sync, Some(75.5));
        assert!(parse_status(JSON, "r1").is_err());
        assert!(parse_status("nope", "r0").is_err());
        assert_eq!(sync_state(&s), (Connection::Connected, SyncState::Syncing));
    }

    /// A primary whose disk DRBD detached after an I/O error serves from its peer; status
    /// says so instead of "degraded".
    #[test]
    fn a_detached_disk_is_diskless() {
        let detached = JSON
            .replace(r#""role": "Secondary""#, r#""role": "Primary""#)
            .replace(r#""disk-state": "Outdated""#, r#""disk-state": "Diskless""#)
            .replace(r#""peer-role": "Primary""#, r#""peer-role": "Secondary""#)
            .replace(
                r#""replication-state": "SyncTarget""#,
                r#""replication-state": "Established""#,
            )
            .replace(r#""out-of-sync": 2048"#, r#""out-of-sync": 0"#);
        let s = parse_status(&detached, "r0").unwrap();
        assert_eq!(s.disks, vec!["Diskless"]);
        assert_eq!(sync_state(&s), (Connection::Connected, SyncState::Diskless));
    }
}
