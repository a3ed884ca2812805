//! `tandem status`: what each resource, its device, its mount and the services look like,
//! as a table or as the JSON of SPEC.md.
//!
//! The replication part comes from the resource's backend (`Backend::status`); for backend
//! `tandem` that is the daemon's control socket (src/backend/tandem.rs).

use std::time::Duration;

use anyhow::Result;
use serde::Serialize;

use crate::backend::{self, BackendStatus, Connection, Role, SyncState};
use crate::config::{Config, Resource};
use crate::host::service;
use crate::switch::is_up;

/// The version of the `status --json` schema (documented field by field in tandem(8)): bumped
/// when a field changes meaning or goes away; new fields do not bump it.
pub const JSON_VERSION: u32 = 1;

#[derive(Serialize)]
pub struct Status {
    pub version: u32,
    pub node: String,
    pub resources: Vec<ResourceStatus>,
    pub services: Vec<ServiceStatus>,
}

#[derive(Serialize)]
pub struct ResourceStatus {
    pub name: String,
    pub backend: String,
    pub role: Role,
    pub connection: Connection,
    pub state: SyncState,
    pub dirty_bytes: Option<u64>,
    pub sync_progress: Option<f64>,
    pub device: String,
    pub device_present: bool,
    pub mountpoint: Option<String>,
    pub mounted: bool,
    /// Backend-specific detail (tandem: counters, sync rate, generations, stale).
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
    /// Why the backend could not be asked (omitted when it could).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Serialize)]
pub struct ServiceStatus {
    pub name: String,
    /// null: the service has no status command.
    pub active: Option<bool>,
}

/// Gather the status of `resources` (all when empty) and of every service.
pub fn collect(cfg: &Config, names: &[String]) -> Result<Status> {
    let mut resources = Vec::new();
    for r in cfg.select(names)? {
        resources.push(resource_status(cfg, r));
    }
    let t = cfg.switch.command_timeout.min(Duration::from_secs(10));
    let services = cfg
        .services
        .iter()
        .map(|s| ServiceStatus {
            name: s.name.clone(),
            active: service::is_active(s, t).ok().flatten(),
        })
        .collect();
    Ok(Status {
        version: JSON_VERSION,
        node: cfg.node.clone(),
        resources,
        services,
    })
}

fn resource_status(cfg: &Config, r: &Resource) -> ResourceStatus {
    let b = backend::for_resource(cfg, r);
    let mounted = is_up(r);
    let (st, error) = match b.status() {
        Ok(s) => (s, None),
        Err(e) => (
            BackendStatus {
                role: Role::Unknown,
                ..BackendStatus::not_replicated()
            },
            Some(format!("{e:#}")),
        ),
    };
    // Without replication the role is this node's use of the device.
    let role = if b.has_roles() {
        st.role
    } else if mounted {
        Role::Primary
    } else {
        Role::Secondary
    };
    ResourceStatus {
        name: r.name.clone(),
        backend: r.backend.to_string(),
        role,
        connection: st.connection,
        state: st.state,
        dirty_bytes: st.dirty_bytes,
        sync_progress: st.sync_progress,
        device: r.device.display().to_string(),
        device_present: r.device.exists(),
        mountpoint: r.mountpoint.as_ref().map(|m| m.display().to_string()),
        mounted,
        extra: st.extra,
        error,
    }
}

/// `1.5 GiB`, `0 B`.
fn human_bytes(n: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < units.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", units[i])
    }
}

/// The daemon's detail for a `tandem` resource, in one line: sync progress and rate, safety
/// flags, and the I/O counters.
fn replication_detail(r: &ResourceStatus) -> Option<String> {
    let x = serde_json::Value::Object(r.extra.clone());
    let x = &x;
    let c = x.get("counters")?;
    let n = |v: &serde_json::Value, k: &str| v.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
    let mut parts = Vec::new();
    if r.state == SyncState::Syncing {
        parts.push(format!(
            "sync {} of {} at {}/s",
            human_bytes(n(x, "sync_bytes_done")),
            human_bytes(n(x, "sync_bytes_total")),
            human_bytes(n(x, "sync_rate_bps"))
        ));
    }
    if x.get("stale").and_then(|v| v.as_bool()) == Some(true) {
        parts.push("STALE: this node's data is older than the peer's (promote refused)".into());
    }
    if x.get("inconsistent").and_then(|v| v.as_bool()) == Some(true) {
        parts.push("INCONSISTENT: a sync into this node did not finish".into());
    }
    parts.push(format!(
        "reads {} ({}), writes {} ({}), flushes {}, replicated {}, resynced {}",
        n(c, "reads"),
        human_bytes(n(c, "bytes_read")),
        n(c, "writes"),
        human_bytes(n(c, "bytes_written")),
        n(c, "flushes"),
        human_bytes(n(c, "bytes_replicated")),
        human_bytes(n(c, "bytes_resynced"))
    ));
    Some(parts.join("; "))
}

pub fn render_table(s: &Status) -> String {
    let mut rows = vec![
        [
            "RESOURCE",
            "BACKEND",
            "ROLE",
            "CONNECTION",
            "STATE",
            "DIRTY",
            "DEVICE",
            "MOUNTED",
        ]
        .map(String::from),
    ];
    for r in &s.resources {
        let state = match (r.state, r.sync_progress) {
            (SyncState::Syncing, Some(p)) => format!("syncing {:.1}%", p * 100.0),
            (st, _) => st.to_string(),
        };
        rows.push([
            r.name.clone(),
            r.backend.clone(),
            r.role.to_string(),
            r.connection.to_string(),
            state,
            r.dirty_bytes.map(human_bytes).unwrap_or_else(|| "-".into()),
            format!(
                "{}{}",
                r.device,
                if r.device_present { "" } else { " (absent)" }
            ),
            match (&r.mountpoint, r.mounted) {
                (Some(m), true) => m.clone(),
                (_, true) => "yes".into(),
                _ => "no".into(),
            },
        ]);
    }
    let mut out = format!("node {}\n", s.node);
    let widths: Vec<usize> = (0..8)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    for row in &rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out += line.join("  ").trim_end();
        out += "\n";
    }
    for r in &s.resources {
        if let Some(e) = &r.error {
            out += &format!("{}: {e}\n", r.name);
        }
        if let Some(d) = replication_detail(r) {
            out += &format!("{}: {d}\n", r.name);
        }
    }
    if !s.services.is_empty() {
        let w = s
            .services
            .iter()
            .map(|x| x.name.len())
            .max()
            .unwrap_or(0)
            .max(7);
        out += &format!("\n{:<w$}  ACTIVE\n", "SERVICE");
        for x in &s.services {
            let a = match x.active {
                Some(true) => "yes",
                Some(false) => "no",
                None => "unknown",
            };
            out += &format!("{:<w$}  {a}\n", x.name);
        }
    }
    out
}

pub fn cmd_status(cfg: &Config, names: &[String], json: bool) -> Result<()> {
    let s = collect(cfg, names)?;
    if json {
        println!("{}", serde_json::to_string(&s)?);
    } else {
        print!("{}", render_table(&s));
        if let Some((seq, word, running)) = crate::switch::read_state(&cfg.switch.lock).last {
            println!(
                "\nlast switch event: #{seq} {word} ({})",
                if running { "running" } else { "done" }
            );
        }
    }
    Ok(())
}
