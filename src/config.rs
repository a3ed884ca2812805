//! The configuration file: TOML schema, defaults, validation and per-node resolution.
//!
//! One file, identical on both nodes (like `hast.conf`). Parsing rejects unknown keys; every
//! error names the file, line and column. `load` returns the config as seen from this node:
//! each resource carries this node's `local`/`remote` and the peer's name.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::exit::Usage;

/// Default config path; the FreeBSD port installs under /usr/local/etc.
pub const DEFAULT_PATH: &str = if cfg!(target_os = "freebsd") {
    "/usr/local/etc/tandem.toml"
} else {
    "/etc/tandem.toml"
};
const DEFAULT_LOCK: &str = if cfg!(target_os = "freebsd") {
    "/var/run/tandem.lock"
} else {
    "/run/tandem.lock"
};
const DEFAULT_CONTROL: &str = if cfg!(target_os = "freebsd") {
    "/var/run/tandem/control.sock"
} else {
    "/run/tandem/control.sock"
};
const DEFAULT_RUN_DIR: &str = if cfg!(target_os = "freebsd") {
    "/var/run/tandem"
} else {
    "/run/tandem"
};
pub const DEFAULT_PORT: u16 = 8457;
/// `daemon.busy_poll`: long enough for a peer on the same LAN to write a 4 KiB block and
/// answer (one round trip and a page-cache write), short enough that a slow peer costs little
/// CPU; see bench/README.md, "Change 20".
pub const DEFAULT_BUSY_POLL: Duration = Duration::from_micros(200);
const MAX_BUSY_POLL: Duration = Duration::from_millis(1);
pub const DEFAULT_EXTENT_SIZE: u64 = 2 * 1024 * 1024;
/// `daemon.timeout`: below what VRRP with sub-second adverts or CARP need to notice a dead
/// master, so the link state is known when the switch asks for role primary.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
/// `daemon.probe_timeout`: a reachable peer answers in a few round trips, well within this.
pub const DEFAULT_PROBE_TIMEOUT: Duration = Duration::from_millis(300);
/// `daemon.flush_timeout`: a disk that takes longer than this to flush its cache hangs (hastd
/// and DRBD give a slow secondary 20 to 42 s).
pub const DEFAULT_FLUSH_TIMEOUT: Duration = Duration::from_secs(30);
/// `daemon.ping_interval`.
pub const DEFAULT_PING_INTERVAL: Duration = Duration::from_millis(200);

// ---------------------------------------------------------------------------------------------
// The resolved configuration, as the rest of tandem sees it.

#[derive(Debug, Clone, serde::Serialize)]
pub struct Config {
    pub file: PathBuf,
    pub node: String,
    pub log: LogConfig,
    pub switch: SwitchConfig,
    pub daemon: DaemonConfig,
    pub services: Vec<Service>,
    pub resources: Vec<Resource>,
    /// `[watch]`: what `tandem watch` looks for; None without the section.
    pub watch: Option<WatchConfig>,
    /// `[metrics]`: where the daemon serves Prometheus metrics; None: not served.
    pub metrics: Option<MetricsConfig>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct MetricsConfig {
    /// `IP:PORT` of the `/metrics` HTTP listener.
    pub listen: SocketAddr,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct WatchConfig {
    /// The virtual IP: present on this host means master.
    pub address: std::net::IpAddr,
    /// Only count the address on this interface.
    pub interface: Option<String>,
    /// A change must hold this long before it is acted on.
    #[serde(serialize_with = "ser_duration")]
    pub debounce: Duration,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct LogConfig {
    pub facility: String,
    pub tag: String,
    pub level: String,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct SwitchConfig {
    pub lock: PathBuf,
    #[serde(serialize_with = "ser_duration")]
    pub delay: Duration,
    #[serde(serialize_with = "ser_duration")]
    pub role_timeout: Duration,
    #[serde(serialize_with = "ser_duration")]
    pub device_timeout: Duration,
    #[serde(serialize_with = "ser_duration")]
    pub stop_timeout: Duration,
    /// Bound for each external command (fsck excepted: it can take as long as it takes).
    #[serde(serialize_with = "ser_duration")]
    pub command_timeout: Duration,
    pub on_promote_failure: Option<String>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct DaemonConfig {
    pub listen: Vec<String>,
    pub control: PathBuf,
    pub secret: PathBuf,
    pub exec: Option<String>,
    /// A peer that sent nothing for this long is dead.
    #[serde(serialize_with = "ser_duration")]
    pub timeout: Duration,
    /// How long `role primary` tries to reach the peer before deciding it is gone.
    #[serde(serialize_with = "ser_duration")]
    pub probe_timeout: Duration,
    /// Each side of an idle link sends a ping this often (and an idle secondary checks
    /// that its peer still answers).
    #[serde(serialize_with = "ser_duration")]
    pub ping_interval: Duration,
    /// A secondary whose fdatasync (for a FLUSH or FUA write) has not returned after this
    /// long has a hung disk: it drops the link, and the primary goes on alone.
    #[serde(serialize_with = "ser_duration")]
    pub flush_timeout: Duration,
    /// How long the primary's NBD reader stays awake (yielding its CPU, not sleeping) for the
    /// answer of a write alone in flight; zero: it sleeps at once.
    #[serde(serialize_with = "ser_duration")]
    pub busy_poll: Duration,
    /// Seal every frame after authentication (both nodes must agree); false only on a
    /// dedicated cable.
    pub encrypt: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Manager {
    Systemd,
    Rc,
    Command,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Service {
    pub name: String,
    pub manager: Manager,
    pub unit: Option<String>,
    pub start: Option<String>,
    pub stop: Option<String>,
    pub status: Option<String>,
    /// Resources this service depends on; empty means all.
    pub resources: Vec<String>,
}

impl Service {
    /// Does this service depend on `resource`?
    pub fn uses(&self, resource: &str) -> bool {
        self.resources.is_empty() || self.resources.iter().any(|r| r == resource)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Tandem,
    Hast,
    Drbd,
    None,
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendKind::Tandem => "tandem",
            BackendKind::Hast => "hast",
            BackendKind::Drbd => "drbd",
            BackendKind::None => "none",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FsType {
    Ufs,
    Ext2,
    Ext3,
    Ext4,
    Xfs,
    Btrfs,
    Zfs,
}

impl fmt::Display for FsType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FsType::Ufs => "ufs",
            FsType::Ext2 => "ext2",
            FsType::Ext3 => "ext3",
            FsType::Ext4 => "ext4",
            FsType::Xfs => "xfs",
            FsType::Btrfs => "btrfs",
            FsType::Zfs => "zfs",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FsckMode {
    Auto,
    Always,
    Never,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Replication {
    Fullsync,
    Memsync,
    Async,
}

impl fmt::Display for Replication {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Replication::Fullsync => "fullsync",
            Replication::Memsync => "memsync",
            Replication::Async => "async",
        })
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Resource {
    pub name: String,
    pub backend: BackendKind,
    /// None for a resource that is replicated but never mounted by tandem.
    pub mountpoint: Option<PathBuf>,
    pub fstype: FsType,
    pub fsck: FsckMode,
    pub mount_options: String,
    pub pool: Option<String>,
    /// `VHID@IFACE`: only events for this CARP address switch the resource.
    pub carp: Option<String>,
    /// The block device on the primary (backend default resolved).
    pub device: PathBuf,
    pub attach: Option<String>,
    pub detach: Option<String>,
    pub replication: Replication,
    #[serde(serialize_with = "ser_size")]
    pub extent_size: u64,
    pub nbd: PathBuf,
    pub nbd_tcp: Option<SocketAddr>,
    /// `nbd_tcp` may be a non-loopback address (the export has no authentication).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub nbd_tcp_allow_remote: bool,
    /// This node's disk (backend `tandem`).
    pub local: Option<PathBuf>,
    /// The peer's replication address `host:port` (backend `tandem`).
    pub remote: Option<String>,
    /// The peer's node name, when the resource has exactly one other `on` section.
    pub peer: Option<String>,
    /// The address the peer expects this node to connect from (the peer's `remote`).
    pub peer_remote: Option<String>,
}

impl Config {
    pub fn resource(&self, name: &str) -> Option<&Resource> {
        self.resources.iter().find(|r| r.name == name)
    }

    /// The resources named on the command line (all of them when `names` is empty or `all`).
    /// An unknown name is a usage error.
    pub fn select(&self, names: &[String]) -> anyhow::Result<Vec<&Resource>> {
        if names.is_empty() || (names.len() == 1 && names[0] == "all") {
            return Ok(self.resources.iter().collect());
        }
        let mut out = Vec::new();
        for n in names {
            match self.resource(n) {
                Some(r) => {
                    if !out.iter().any(|o: &&Resource| o.name == r.name) {
                        out.push(r)
                    }
                }
                None => {
                    let known: Vec<&str> = self.resources.iter().map(|r| r.name.as_str()).collect();
                    return Err(Usage(format!(
                        "{}: no resource named {n:?} (known: {})",
                        self.file.display(),
                        if known.is_empty() {
                            "none".to_string()
                        } else {
                            known.join(", ")
                        }
                    ))
                    .into());
                }
            }
        }
        Ok(out)
    }
}

/// The resolved configuration in the shape of the file (`[resource.NAME]`, `[[service]]`),
/// every default filled in, each resource with this node's `local` and `remote`.
pub fn to_toml(cfg: &Config) -> Result<String, toml::ser::Error> {
    let mut top = toml::Table::try_from(cfg)?;
    top.remove("file");
    if let Some(toml::Value::Array(services)) = top.remove("services") {
        top.insert("service".into(), toml::Value::Array(services));
    }
    if let Some(toml::Value::Array(resources)) = top.remove("resources") {
        let mut by_name = toml::Table::new();
        for r in resources {
            if let toml::Value::Table(mut t) = r {
                // This node's `local`/`remote` and the peer's address go back into their `on`
                // sections (the peer's disk is its own business).
                let mut on = toml::Table::new();
                let mut mine = toml::Table::new();
                for k in ["local", "remote"] {
                    if let Some(v) = t.remove(k) {
                        mine.insert(k.into(), v);
                    }
                }
                if !mine.is_empty() {
                    on.insert(cfg.node.clone(), toml::Value::Table(mine));
                }
                let peer_remote = t.remove("peer_remote");
                if let Some(toml::Value::String(peer)) = t.remove("peer") {
                    let mut theirs = toml::Table::new();
                    if let Some(v) = peer_remote {
                        theirs.insert("remote".into(), v);
                    }
                    on.insert(peer, toml::Value::Table(theirs));
                }
                if !on.is_empty() {
                    t.insert("on".into(), toml::Value::Table(on));
                }
                if let Some(toml::Value::String(name)) = t.remove("name") {
                    by_name.insert(name, toml::Value::Table(t));
                }
            }
        }
        top.insert("resource".into(), toml::Value::Table(by_name));
    }
    toml::to_string_pretty(&top)
}

fn ser_size<S: serde::Serializer>(n: &u64, s: S) -> Result<S::Ok, S::Error> {
    let text = match *n {
        n if n >= 1 << 30 && n % (1 << 30) == 0 => format!("{}G", n >> 30),
        n if n >= 1 << 20 && n % (1 << 20) == 0 => format!("{}M", n >> 20),
        n if n >= 1 << 10 && n % (1 << 10) == 0 => format!("{}K", n >> 10),
        n => n.to_string(),
    };
    s.serialize_str(&text)
}

fn ser_duration<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_duration(*d))
}

/// `200us`, `1500ms`, `20s`, `2m`: the shortest exact form (to the microsecond).
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    let us = d.as_micros();
    if us % 1000 != 0 {
        format!("{us}us")
    } else if ms % 60_000 == 0 && ms >= 60_000 {
        format!("{}m", ms / 60_000)
    } else if ms % 1000 == 0 {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// Parse `"200us"`, `"500ms"`, `"20s"`, `"2m"`, `"1h"`; a bare number is seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: expected a number and a unit such as \"500ms\", \"20s\", \"2m\""))?;
    let mult = match unit.trim() {
        "us" | "µs" => 0.000_001,
        "ms" => 0.001,
        "" | "s" | "sec" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        u => {
            return Err(format!(
                "invalid duration {s:?}: unknown unit {u:?} (use us, ms, s, m or h)"
            ));
        }
    };
    let secs = value * mult;
    if !secs.is_finite() || !(0.0..=86400.0 * 365.0).contains(&secs) {
        return Err(format!("invalid duration {s:?}: out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parse `"2M"`, `"512K"`, `"1G"`, `"4096"` (bytes; binary multiples).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: u64 = num.parse().map_err(|_| {
        format!("invalid size {s:?}: expected a number and an optional unit K, M, G or T")
    })?;
    let shift = match unit
        .trim()
        .to_ascii_uppercase()
        .trim_end_matches("IB")
        .trim_end_matches('B')
    {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        u => {
            return Err(format!(
                "invalid size {s:?}: unknown unit {u:?} (use K, M, G or T)"
            ));
        }
    };
    value
        .checked_mul(1u64 << shift)
        .ok_or_else(|| format!("invalid size {s:?}: too large"))
}

// ---------------------------------------------------------------------------------------------
// The file as written (serde schema).

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    node: Option<Spanned<String>>,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    switch: RawSwitch,
    #[serde(default)]
    daemon: RawDaemon,
    #[serde(default)]
    service: Vec<Spanned<RawService>>,
    #[serde(default)]
    resource: BTreeMap<String, Spanned<RawResource>>,
    watch: Option<RawWatch>,
    metrics: Option<RawMetrics>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWatch {
    address: Spanned<String>,
    interface: Option<String>,
    debounce: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLog {
    facility: Option<Spanned<String>>,
    tag: Option<String>,
    level: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawSwitch {
    lock: Option<PathBuf>,
    delay: Option<Spanned<String>>,
    role_timeout: Option<Spanned<String>>,
    device_timeout: Option<Spanned<String>>,
    stop_timeout: Option<Spanned<String>>,
    command_timeout: Option<Spanned<String>>,
    on_promote_failure: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDaemon {
    listen: Option<Vec<Spanned<String>>>,
    control: Option<PathBuf>,
    secret: Option<PathBuf>,
    exec: Option<String>,
    timeout: Option<Spanned<String>>,
    probe_timeout: Option<Spanned<String>>,
    ping_interval: Option<Spanned<String>>,
    flush_timeout: Option<Spanned<String>>,
    busy_poll: Option<Spanned<String>>,
    encrypt: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: Spanned<String>,
    manager: Manager,
    unit: Option<String>,
    start: Option<String>,
    stop: Option<String>,
    status: Option<String>,
    resources: Option<Vec<Spanned<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawResource {
    backend: Option<BackendKind>,
    mountpoint: Option<PathBuf>,
    fstype: Option<FsType>,
    fsck: Option<FsckMode>,
    mount_options: Option<String>,
    pool: Option<String>,
    carp: Option<Spanned<String>>,
    device: Option<PathBuf>,
    attach: Option<String>,
    detach: Option<String>,
    replication: Option<Replication>,
    extent_size: Option<Spanned<String>>,
    nbd: Option<PathBuf>,
    nbd_tcp: Option<Spanned<String>>,
    nbd_tcp_allow_remote: Option<bool>,
    #[serde(default)]
    on: BTreeMap<String, Spanned<RawOn>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOn {
    local: Option<PathBuf>,
    remote: Option<Spanned<String>>,
}

// ---------------------------------------------------------------------------------------------
// Loading and validation.

/// Where in the file something is, for error messages.
struct Source<'a> {
    file: &'a Path,
    text: &'a str,
}

impl Source<'_> {
    fn position(&self, offset: usize) -> (usize, usize) {
        let before = &self.text[..offset.min(self.text.len())];
        let line = before.matches('\n').count() + 1;
        let col = before
            .rfind('\n')
            .map_or(before.len(), |nl| before.len() - nl - 1)
            + 1;
        (line, col)
    }

    fn error(&self, span: std::ops::Range<usize>, msg: impl fmt::Display) -> anyhow::Error {
        let (line, col) = self.position(span.start);
        Usage(format!("{}:{line}:{col}: {msg}", self.file.display())).into()
    }

    fn duration(&self, v: &Option<Spanned<String>>, default: Duration) -> anyhow::Result<Duration> {
        match v {
            None => Ok(default),
            Some(s) => parse_duration(s.get_ref()).map_err(|e| self.error(s.span(), e)),
        }
    }
}

/// The name this host answers to: `node` in the file, else the hostname.
fn host_name() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default()
}

/// Does `candidate` (a name in the file) designate this host? The short name matches too.
fn names_this_node(candidate: &str, node: &str) -> bool {
    let short = |s: &str| s.split('.').next().unwrap_or(s).to_string();
    candidate == node || short(candidate) == short(node)
}

/// Read and validate `path` for this node (`node_override`, else `node` in the file, else the
/// hostname).
pub fn load(path: &Path, node_override: Option<&str>) -> anyhow::Result<Config> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        Usage(format!(
            "{}: cannot read the configuration: {e}",
            path.display()
        ))
    })?;
    parse(path, &text, node_override)
}

/// Parse `text` as if read from `path`.
pub fn parse(path: &Path, text: &str, node_override: Option<&str>) -> anyhow::Result<Config> {
    let src = Source { file: path, text };
    let raw: RawConfig = toml::from_str(text).map_err(|e| match e.span() {
        Some(span) => src.error(span, e.message()),
        None => Usage(format!("{}: {}", path.display(), e.message())).into(),
    })?;

    let node = match (node_override, &raw.node) {
        (Some(n), _) => n.to_string(),
        (None, Some(n)) => {
            if n.get_ref().trim().is_empty() {
                return Err(src.error(n.span(), "node must not be empty"));
            }
            n.get_ref().clone()
        }
        (None, None) => host_name(),
    };

    let log = LogConfig {
        facility: match &raw.log.facility {
            None => "local0".into(),
            Some(f) => {
                if crate::logging::parse_facility(f.get_ref()).is_none() {
                    return Err(src.error(
                        f.span(),
                        format!(
                            "unknown syslog facility {:?} (e.g. local0 … local7, daemon, user)",
                            f.get_ref()
                        ),
                    ));
                }
                f.get_ref().clone()
            }
        },
        tag: raw.log.tag.clone().unwrap_or_else(|| "tandem".into()),
        level: match &raw.log.level {
            None => "info".into(),
            Some(l) => {
                if l.get_ref().parse::<log::LevelFilter>().is_err() {
                    return Err(src.error(
                        l.span(),
                        format!(
                            "unknown log level {:?} (error, warn, info, debug, trace)",
                            l.get_ref()
                        ),
                    ));
                }
                l.get_ref().clone()
            }
        },
    };

    let switch = SwitchConfig {
        lock: raw
            .switch
            .lock
            .clone()
            .unwrap_or_else(|| DEFAULT_LOCK.into()),
        delay: src.duration(&raw.switch.delay, Duration::ZERO)?,
        role_timeout: src.duration(&raw.switch.role_timeout, Duration::from_secs(20))?,
        device_timeout: src.duration(&raw.switch.device_timeout, Duration::from_secs(30))?,
        stop_timeout: src.duration(&raw.switch.stop_timeout, Duration::from_secs(20))?,
        command_timeout: src.duration(&raw.switch.command_timeout, Duration::from_secs(60))?,
        on_promote_failure: raw
            .switch
            .on_promote_failure
            .clone()
            .filter(|s| !s.trim().is_empty()),
    };

    let mut listen = Vec::new();
    for l in raw.daemon.listen.as_deref().unwrap_or_default() {
        if l.get_ref().parse::<SocketAddr>().is_err() {
            return Err(src.error(
                l.span(),
                format!(
                    "listen address {:?} is not IP:PORT (e.g. \"0.0.0.0:8457\")",
                    l.get_ref()
                ),
            ));
        }
        listen.push(l.get_ref().clone());
    }
    if raw.daemon.listen.is_none() {
        listen.push(format!("0.0.0.0:{DEFAULT_PORT}"));
    }
    let mut daemon = DaemonConfig {
        listen,
        control: raw
            .daemon
            .control
            .clone()
            .unwrap_or_else(|| DEFAULT_CONTROL.into()),
        secret: raw.daemon.secret.clone().unwrap_or_else(|| {
            if cfg!(target_os = "freebsd") {
                "/usr/local/etc/tandem.key"
            } else {
                "/etc/tandem.key"
            }
            .into()
        }),
        exec: raw.daemon.exec.clone().filter(|s| !s.trim().is_empty()),
        timeout: src.duration(&raw.daemon.timeout, DEFAULT_TIMEOUT)?,
        probe_timeout: src.duration(&raw.daemon.probe_timeout, DEFAULT_PROBE_TIMEOUT)?,
        ping_interval: src.duration(&raw.daemon.ping_interval, DEFAULT_PING_INTERVAL)?,
        flush_timeout: src.duration(&raw.daemon.flush_timeout, DEFAULT_FLUSH_TIMEOUT)?,
        busy_poll: src.duration(&raw.daemon.busy_poll, DEFAULT_BUSY_POLL)?,
        encrypt: raw.daemon.encrypt.unwrap_or(true),
    };
    let span_of = |v: &Option<Spanned<String>>| v.as_ref().map(|t| t.span()).unwrap_or(0..0);
    if daemon.timeout < Duration::from_millis(100) {
        return Err(src.error(
            span_of(&raw.daemon.timeout),
            "daemon.timeout must be at least 100ms",
        ));
    }
    if daemon.probe_timeout < Duration::from_millis(10) {
        return Err(src.error(
            span_of(&raw.daemon.probe_timeout),
            "daemon.probe_timeout must be at least 10ms",
        ));
    }
    if raw.daemon.flush_timeout.is_none() {
        // Unset: never shorter than the link's own timeout.
        daemon.flush_timeout = daemon.flush_timeout.max(daemon.timeout);
    }
    if daemon.flush_timeout < daemon.timeout {
        return Err(src.error(
            span_of(&raw.daemon.flush_timeout),
            format!(
                "daemon.flush_timeout ({}) must be at least daemon.timeout ({})",
                format_duration(daemon.flush_timeout),
                format_duration(daemon.timeout)
            ),
        ));
    }
    if daemon.busy_poll > MAX_BUSY_POLL {
        return Err(src.error(
            span_of(&raw.daemon.busy_poll),
            "daemon.busy_poll must be at most 1ms (it keeps a CPU busy for that long per write)",
        ));
    }
    if daemon.ping_interval < Duration::from_millis(10) {
        return Err(src.error(
            span_of(&raw.daemon.ping_interval),
            "daemon.ping_interval must be at least 10ms",
        ));
    }
    if daemon.ping_interval * 2 > daemon.timeout {
        let span = match raw.daemon.ping_interval {
            Some(_) => span_of(&raw.daemon.ping_interval),
            None => span_of(&raw.daemon.timeout),
        };
        return Err(src.error(
            span,
            format!(
                "daemon.ping_interval ({}) must be at most half of daemon.timeout ({}): a live peer would be taken for dead between two pings",
                format_duration(daemon.ping_interval),
                format_duration(daemon.timeout)
            ),
        ));
    }

    let mut resources = Vec::new();
    for (name, spanned) in &raw.resource {
        let r = resolve_resource(&src, name, spanned, &node)?;
        if let Some((what, other)) = shared_path(&resources, &r) {
            return Err(src.error(
                spanned.span(),
                format!(
                    "resources {:?} and {:?} both use {what}: each resource needs its own",
                    other, r.name
                ),
            ));
        }
        resources.push(r);
    }

    let mut services: Vec<Service> = Vec::new();
    for s in &raw.service {
        let span = s.span();
        let s = s.get_ref();
        let name = s.name.get_ref().clone();
        if name.trim().is_empty() {
            return Err(src.error(s.name.span(), "service name must not be empty"));
        }
        if services.iter().any(|o| o.name == name) {
            return Err(src.error(s.name.span(), format!("service {name:?} is defined twice")));
        }
        match s.manager {
            Manager::Systemd | Manager::Rc => {
                if s.start.is_some() || s.stop.is_some() || s.status.is_some() {
                    return Err(src.error(
                        span,
                        format!(
                            "service {name:?}: start/stop/status are for manager = \"command\""
                        ),
                    ));
                }
            }
            Manager::Command => {
                if s.start.is_none() || s.stop.is_none() {
                    return Err(src.error(
                        span,
                        format!(
                            "service {name:?}: manager = \"command\" needs both start and stop"
                        ),
                    ));
                }
                if s.unit.is_some() {
                    return Err(
                        src.error(span, format!("service {name:?}: unit is for systemd or rc"))
                    );
                }
            }
        }
        let mut uses = Vec::new();
        for r in s.resources.as_deref().unwrap_or_default() {
            if !raw.resource.contains_key(r.get_ref()) {
                return Err(src.error(
                    r.span(),
                    format!("service {name:?}: no resource named {:?}", r.get_ref()),
                ));
            }
            uses.push(r.get_ref().clone());
        }
        services.push(Service {
            unit: s.unit.clone().or_else(|| match s.manager {
                Manager::Systemd => Some(format!("{name}.service")),
                Manager::Rc => Some(name.clone()),
                Manager::Command => None,
            }),
            name,
            manager: s.manager,
            start: s.start.clone(),
            stop: s.stop.clone(),
            status: s.status.clone(),
            resources: uses,
        });
    }

    let watch = match &raw.watch {
        None => None,
        Some(w) => Some(WatchConfig {
            address: w.address.get_ref().parse().map_err(|_| {
                src.error(
                    w.address.span(),
                    format!(
                        "watch address {:?} is not an IP address",
                        w.address.get_ref()
                    ),
                )
            })?,
            interface: w.interface.clone().filter(|i| !i.is_empty()),
            debounce: src.duration(&w.debounce, Duration::from_millis(200))?,
        }),
    };

    let metrics = match raw.metrics.as_ref().and_then(|m| m.listen.as_ref()) {
        None => None,
        Some(l) => Some(MetricsConfig {
            listen: l.get_ref().parse().map_err(|_| {
                src.error(
                    l.span(),
                    format!(
                        "metrics listen address {:?} is not IP:PORT (e.g. \"127.0.0.1:9857\")",
                        l.get_ref()
                    ),
                )
            })?,
        }),
    };

    Ok(Config {
        file: path.to_path_buf(),
        node,
        log,
        switch,
        daemon,
        services,
        resources,
        watch,
        metrics,
    })
}

fn resolve_resource(
    src: &Source<'_>,
    name: &str,
    spanned: &Spanned<RawResource>,
    node: &str,
) -> anyhow::Result<Resource> {
    let span = spanned.span();
    let r = spanned.get_ref();
    let err = |msg: String| src.error(span.clone(), format!("resource {name:?}: {msg}"));

    if name.is_empty()
        || name.len() > 63
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(err(
            "the name must be 1-63 characters of A-Z a-z 0-9 - _ .".into()
        ));
    }
    let backend = r.backend.unwrap_or(BackendKind::Tandem);
    // The native filesystem of the platform when the file does not say.
    let fstype = r.fstype.unwrap_or(if cfg!(target_os = "freebsd") {
        FsType::Ufs
    } else {
        FsType::Ext4
    });
    if fstype == FsType::Zfs && r.pool.is_none() {
        return Err(err(
            "fstype = \"zfs\" needs pool = \"NAME\" (tandem imports and exports the pool)".into(),
        ));
    }
    if fstype != FsType::Zfs && r.pool.is_some() {
        return Err(err("pool is only for fstype = \"zfs\"".into()));
    }
    if let Some(mp) = &r.mountpoint {
        if !mp.is_absolute() {
            return Err(err(format!(
                "mountpoint {} must be an absolute path",
                mp.display()
            )));
        }
    }
    if let Some(c) = &r.carp {
        let ok = c
            .get_ref()
            .split_once('@')
            .is_some_and(|(vhid, ifc)| vhid.parse::<u8>().is_ok_and(|v| v > 0) && !ifc.is_empty());
        if !ok {
            return Err(src.error(
                c.span(),
                format!(
                    "resource {name:?}: carp = {:?} is not VHID@IFACE (e.g. \"1@em0\")",
                    c.get_ref()
                ),
            ));
        }
    }
    let extent_size = match &r.extent_size {
        None => DEFAULT_EXTENT_SIZE,
        Some(s) => {
            let v = parse_size(s.get_ref()).map_err(|e| src.error(s.span(), e))?;
            if !v.is_power_of_two() || !(64 * 1024..=1024 * 1024 * 1024).contains(&v) {
                return Err(src.error(
                    s.span(),
                    format!(
                        "resource {name:?}: extent_size must be a power of two between 64K and 1G"
                    ),
                ));
            }
            v
        }
    };
    let nbd_tcp = match &r.nbd_tcp {
        None => None,
        Some(s) => Some(s.get_ref().parse::<SocketAddr>().map_err(|_| {
            src.error(
                s.span(),
                format!(
                    "resource {name:?}: nbd_tcp {:?} is not IP:PORT",
                    s.get_ref()
                ),
            )
        })?),
    };
    let nbd_tcp_allow_remote = r.nbd_tcp_allow_remote.unwrap_or(false);
    if let (Some(addr), Some(s)) = (nbd_tcp, &r.nbd_tcp)
        && !addr.ip().is_loopback()
        && !nbd_tcp_allow_remote
    {
        return Err(src.error(
            s.span(),
            format!(
                "resource {name:?}: nbd_tcp {addr} is not a loopback address: the NBD export has no authentication, so whoever reaches it reads and writes the disk; use 127.0.0.1 or ::1, or set nbd_tcp_allow_remote = true to accept that"
            ),
        ));
    }
    if backend != BackendKind::Tandem {
        for (what, set) in [
            ("replication", r.replication.is_some()),
            ("extent_size", r.extent_size.is_some()),
            ("nbd", r.nbd.is_some()),
            ("nbd_tcp", r.nbd_tcp.is_some()),
            ("nbd_tcp_allow_remote", r.nbd_tcp_allow_remote.is_some()),
        ] {
            if set {
                return Err(err(format!("{what} is only for backend = \"tandem\"")));
            }
        }
    }

    // This node's section, and the peer's.
    let mine: Vec<(&String, &Spanned<RawOn>)> =
        r.on.iter()
            .filter(|(n, _)| names_this_node(n, node))
            .collect();
    let others: Vec<(&String, &Spanned<RawOn>)> =
        r.on.iter()
            .filter(|(n, _)| !names_this_node(n, node))
            .collect();
    if mine.len() > 1 {
        return Err(err(format!(
            "more than one [resource.{name}.on.*] section matches this node {node:?}"
        )));
    }
    let mine = mine.first().map(|(_, on)| *on);
    let peer = if others.len() == 1 {
        Some(others[0].0.clone())
    } else {
        None
    };
    let peer_remote = if others.len() == 1 {
        others[0]
            .1
            .get_ref()
            .remote
            .as_ref()
            .map(|s| s.get_ref().clone())
    } else {
        None
    };
    let (local, remote) = match mine {
        Some(on) => (
            on.get_ref().local.clone(),
            on.get_ref().remote.as_ref().map(|s| s.get_ref().clone()),
        ),
        None => (None, None),
    };

    let mut remote_checked = remote.clone();
    if backend == BackendKind::Tandem {
        let known: Vec<&str> = r.on.keys().map(String::as_str).collect();
        let Some(on) = mine else {
            return Err(err(format!(
                "no [resource.{name}.on.{node}] section for this node (sections: {}; set node = \"NAME\" or use --node)",
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            )));
        };
        let on_span = on.span();
        if local.is_none() {
            return Err(src.error(
                on_span,
                format!("resource {name:?} on {node:?}: local = \"/dev/…\" is required"),
            ));
        }
        let Some(rem) = &on.get_ref().remote else {
            return Err(src.error(
                on_span,
                format!("resource {name:?} on {node:?}: remote = \"HOST:PORT\" is required"),
            ));
        };
        let with_port = normalize_remote(rem.get_ref()).ok_or_else(|| {
            src.error(
                rem.span(),
                format!(
                    "resource {name:?}: remote {:?} is not HOST[:PORT]",
                    rem.get_ref()
                ),
            )
        })?;
        remote_checked = Some(with_port);
        if others.len() != 1 {
            return Err(err(format!(
                "backend \"tandem\" needs exactly two [resource.{name}.on.NODE] sections (found {})",
                r.on.len()
            )));
        }
    }

    let device = match &r.device {
        Some(d) => d.clone(),
        None => match backend {
            BackendKind::Hast => PathBuf::from(format!("/dev/hast/{name}")),
            // DRBD 9's udev rules create this link; set `device` for /dev/drbdN.
            BackendKind::Drbd => PathBuf::from(format!("/dev/drbd/by-res/{name}/0")),
            BackendKind::Tandem => PathBuf::from(default_tandem_device(name)),
            BackendKind::None => {
                return Err(err("backend = \"none\" needs device = \"/dev/…\"".into()));
            }
        },
    };

    Ok(Resource {
        name: name.to_string(),
        backend,
        mountpoint: r.mountpoint.clone(),
        fstype,
        fsck: r.fsck.unwrap_or(FsckMode::Auto),
        mount_options: r.mount_options.clone().unwrap_or_default(),
        pool: r.pool.clone(),
        carp: r.carp.as_ref().map(|c| c.get_ref().clone()),
        device,
        attach: r.attach.clone().filter(|s| !s.trim().is_empty()),
        detach: r.detach.clone().filter(|s| !s.trim().is_empty()),
        replication: r.replication.unwrap_or(Replication::Fullsync),
        extent_size,
        nbd: r
            .nbd
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("{DEFAULT_RUN_DIR}/{name}.nbd"))),
        nbd_tcp,
        nbd_tcp_allow_remote,
        local,
        remote: remote_checked,
        peer,
        peer_remote: peer_remote.and_then(|p| normalize_remote(&p)),
    })
}

/// The device of backend "tandem" when `device` is not set. On FreeBSD the daemon creates the
/// GEOM Gate provider `/dev/tandem/NAME` itself (src/daemon/ggate.rs), one per resource. On
/// Linux it attaches the export to `/dev/nbd0` when the nbd module is loaded (a second
/// resource needs its own `device`); without the module an attach hook produces the device.
pub fn default_tandem_device(name: &str) -> String {
    if cfg!(target_os = "freebsd") {
        format!("/dev/tandem/{name}")
    } else {
        "/dev/nbd0".to_string()
    }
}

/// A path that `r` would share with an earlier resource: two resources on one device, disk,
/// socket or mountpoint would overwrite each other.
fn shared_path(earlier: &[Resource], r: &Resource) -> Option<(String, String)> {
    for o in earlier {
        let same = |a: &Option<PathBuf>, b: &Option<PathBuf>| a.is_some() && a == b;
        if o.device == r.device && o.pool.is_none() {
            let hint = if r.backend == BackendKind::Tandem && !cfg!(target_os = "freebsd") {
                " (the default for backend \"tandem\" is /dev/nbd0: set device for each)"
            } else {
                ""
            };
            return Some((
                format!("device {}{hint}", r.device.display()),
                o.name.clone(),
            ));
        }
        if same(&o.mountpoint, &r.mountpoint) {
            let mp = r.mountpoint.as_deref().unwrap_or(Path::new(""));
            return Some((format!("mountpoint {}", mp.display()), o.name.clone()));
        }
        if same(&o.local, &r.local) {
            let l = r.local.as_deref().unwrap_or(Path::new(""));
            return Some((format!("local disk {}", l.display()), o.name.clone()));
        }
        if r.backend == BackendKind::Tandem && o.backend == BackendKind::Tandem && o.nbd == r.nbd {
            return Some((format!("nbd socket {}", r.nbd.display()), o.name.clone()));
        }
    }
    None
}

/// `host`, `host:port`, `[v6]:port` → `host:port` with the default port filled in.
fn normalize_remote(s: &str) -> Option<String> {
    let s = s.trim();
    if s.is_empty() || s.contains(char::is_whitespace) {
        return None;
    }
    if s.parse::<SocketAddr>().is_ok() {
        return Some(s.to_string());
    }
    if s.parse::<std::net::IpAddr>().is_ok() {
        return Some(if s.contains(':') {
            format!("[{s}]:{DEFAULT_PORT}")
        } else {
            format!("{s}:{DEFAULT_PORT}")
        });
    }
    match s.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
            Some(s.to_string())
        }
        Some(_) => None,
        None => Some(format!("{s}:{DEFAULT_PORT}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
node = "s1"

[switch]
delay = "0s"
role_timeout = "20s"

[daemon]
listen = ["0.0.0.0:8457"]

[[service]]
name = "samba"
manager = "systemd"
unit = "smbd.service"

[resource.hast0]
backend = "tandem"
mountpoint = "/mnt/hast0"
fstype = "ext4"
mount_options = "noatime"
carp = "1@em0"
replication = "fullsync"
extent_size = "2M"
nbd = "/run/tandem/hast0.nbd"

[resource.hast0.on.s1]
local = "/dev/ada1"
remote = "192.168.10.12:8457"
[resource.hast0.on.s2]
local = "/dev/ada1"
remote = "192.168.10.11"
"#;

    fn p(text: &str) -> anyhow::Result<Config> {
        parse(Path::new("/etc/tandem.toml"), text, None)
    }

    fn err(text: &str) -> String {
        match p(text) {
            Ok(_) => panic!("config was accepted:\n{text}"),
            Err(e) => format!("{e:#}"),
        }
    }

    #[test]
    fn example_resolves_for_this_node() {
        let c = p(EXAMPLE).unwrap();
        assert_eq!(c.node, "s1");
        let r = c.resource("hast0").unwrap();
        assert_eq!(r.local.as_deref(), Some(Path::new("/dev/ada1")));
        assert_eq!(r.remote.as_deref(), Some("192.168.10.12:8457"));
        assert_eq!(r.peer.as_deref(), Some("s2"));
        assert_eq!(r.peer_remote.as_deref(), Some("192.168.10.11:8457"));
        assert_eq!(r.extent_size, 2 << 20);
        assert_eq!(c.switch.role_timeout, Duration::from_secs(20));
        assert_eq!(c.switch.lock, PathBuf::from(DEFAULT_LOCK));
        assert_eq!(c.services[0].unit.as_deref(), Some("smbd.service"));
        assert_eq!(r.device, PathBuf::from(default_tandem_device("hast0")));
    }

    #[test]
    fn tandem_device_default_per_platform() {
        // FreeBSD: the daemon's own GEOM Gate provider, one per resource, like /dev/hast/NAME.
        let want = if cfg!(target_os = "freebsd") {
            "/dev/tandem/r1"
        } else {
            "/dev/nbd0"
        };
        assert_eq!(default_tandem_device("r1"), want);
    }

    #[test]
    fn other_node_and_short_names() {
        let c = parse(Path::new("x"), EXAMPLE, Some("s2.example.org")).unwrap();
        let r = c.resource("hast0").unwrap();
        assert_eq!(r.remote.as_deref(), Some("192.168.10.11:8457"));
        assert_eq!(r.peer.as_deref(), Some("s1"));
    }

    /// The node name comes from gethostname(3) on both targets (no sysctl); on FreeBSD that is
    /// kern.hostname, which rc.conf's `hostname=` usually sets to the FQDN.
    #[test]
    fn hostname_forms() {
        assert!(names_this_node("s1", "s1.example.org"));
        assert!(names_this_node("s1.example.org", "s1"));
        assert!(names_this_node("s1.example.org", "s1.example.org"));
        assert!(names_this_node("s1", "s1.example.org."));
        assert!(!names_this_node("s1", "s10.example.org"));
        assert!(!names_this_node("s2", "s1.example.org"));
        // gethostname() failed: the empty name designates no section.
        assert!(!names_this_node("s1", ""));
    }

    #[test]
    fn unknown_key_names_line_and_column() {
        let e = err("node = \"s1\"\n[switch]\nrole_timout = \"5s\"\n");
        assert!(e.starts_with("/etc/tandem.toml:3:1: "), "{e}");
        assert!(e.contains("role_timout"), "{e}");
    }

    #[test]
    fn bad_duration_names_position() {
        let e = err("[switch]\ndelay = \"3 parsecs\"\n");
        assert!(
            e.starts_with("/etc/tandem.toml:2:9: invalid duration"),
            "{e}"
        );
    }

    #[test]
    fn daemon_encrypt_defaults_on_and_takes_only_a_boolean() {
        assert!(p(EXAMPLE).unwrap().daemon.encrypt);
        let c = p("[daemon]\nencrypt = false\n").unwrap();
        assert!(!c.daemon.encrypt);
        let e = err("[daemon]\nencrypt = \"no\"\n");
        assert!(e.starts_with("/etc/tandem.toml:2:"), "{e}");
        assert!(e.contains("boolean"), "{e}");
    }

    #[test]
    fn zfs_without_pool() {
        let e = err("[resource.z]\nbackend = \"none\"\ndevice = \"/dev/da0\"\nfstype = \"zfs\"\n");
        assert!(e.contains("needs pool"), "{e}");
        assert!(e.starts_with("/etc/tandem.toml:"), "{e}");
    }

    #[test]
    fn tandem_needs_local_and_remote_for_this_node() {
        let e = err(
            "node = \"a\"\n[resource.r]\nmountpoint = \"/mnt\"\n[resource.r.on.b]\nlocal = \"/x\"\nremote = \"1.2.3.4\"\n",
        );
        assert!(e.contains("no [resource.r.on.a] section"), "{e}");
        let e = err(
            "node = \"a\"\n[resource.r]\nmountpoint = \"/mnt\"\n[resource.r.on.a]\nremote = \"1.2.3.4\"\n[resource.r.on.b]\nlocal = \"/x\"\nremote = \"1.2.3.4\"\n",
        );
        assert!(e.contains("local = "), "{e}");
        assert!(e.starts_with("/etc/tandem.toml:4:1:"), "{e}");
    }

    #[test]
    fn bad_values() {
        assert!(err("[resource.r]\nbackend = \"lvm\"\n").contains("lvm"));
        assert!(err("[resource.r]\nbackend=\"none\"\ndevice=\"/dev/x\"\nmountpoint=\"/m\"\ncarp = \"em0\"\n").contains("VHID@IFACE"));
        assert!(
            err("[resource.r]\nbackend=\"none\"\ndevice=\"/dev/x\"\nmountpoint=\"rel\"\n")
                .contains("absolute")
        );
        assert!(
            err("[resource.r]\nbackend=\"none\"\nmountpoint=\"/m\"\n").contains("needs device")
        );
        assert!(
            err("[resource.r]\nbackend=\"hast\"\nmountpoint=\"/m\"\nreplication=\"async\"\n")
                .contains("only for backend")
        );
        assert!(err("[log]\nfacility = \"local9\"\n").contains("facility"));
        assert!(err("[daemon]\nlisten = [\"nowhere\"]\n").contains("IP:PORT"));
        assert!(
            err("[[service]]\nname=\"x\"\nmanager=\"command\"\nstart=\"true\"\n")
                .contains("needs both")
        );
        assert!(err("this is not toml").starts_with("/etc/tandem.toml:1:"));
    }

    #[test]
    fn resources_do_not_share_devices_or_mountpoints() {
        let two = |a: &str, b: &str| {
            format!("[resource.r1]\nbackend=\"none\"\n{a}\n[resource.r2]\nbackend=\"none\"\n{b}\n")
        };
        let e = err(&two("device=\"/dev/x\"", "device=\"/dev/x\""));
        assert!(
            e.contains("\"r1\" and \"r2\" both use device /dev/x"),
            "{e}"
        );
        assert!(e.starts_with("/etc/tandem.toml:4:1:"), "{e}");
        let e = err(&two(
            "device=\"/dev/x\"\nmountpoint=\"/m\"",
            "device=\"/dev/y\"\nmountpoint=\"/m\"",
        ));
        assert!(e.contains("mountpoint /m"), "{e}");
        p(&two("device=\"/dev/x\"", "device=\"/dev/y\"")).unwrap();
    }

    #[test]
    fn resolved_config_prints_in_the_file_shape() {
        let c = p(EXAMPLE).unwrap();
        let text = to_toml(&c).unwrap();
        assert!(text.contains("[resource.hast0]"), "{text}");
        assert!(text.contains("[[service]]"), "{text}");
        assert!(text.contains("remote = \"192.168.10.12:8457\""), "{text}");
        assert!(text.contains("role_timeout = \"20s\""), "{text}");
        // What it prints is itself a valid configuration with the same meaning.
        let again = parse(Path::new("again"), &text, Some("s1")).unwrap();
        assert_eq!(again.resources[0].remote, c.resources[0].remote);
        assert_eq!(again.switch.role_timeout, c.switch.role_timeout);
    }

    #[test]
    fn durations_and_sizes() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("20s").unwrap(), Duration::from_secs(20));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("1y").is_err());
        assert_eq!(parse_duration("200us").unwrap(), Duration::from_micros(200));
        assert_eq!(parse_duration("50µs").unwrap(), Duration::from_micros(50));
        assert_eq!(format_duration(Duration::from_micros(200)), "200us");
        assert_eq!(format_duration(Duration::ZERO), "0s");
        assert_eq!(parse_size("2M").unwrap(), 2 << 20);
        assert_eq!(parse_size("64KiB").unwrap(), 64 << 10);
        assert!(parse_size("2X").is_err());
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(format_duration(Duration::from_secs(120)), "2m");
    }

    #[test]
    fn remote_gets_default_port() {
        assert_eq!(
            normalize_remote("10.0.0.1").as_deref(),
            Some("10.0.0.1:8457")
        );
        assert_eq!(normalize_remote("s2").as_deref(), Some("s2:8457"));
        assert_eq!(normalize_remote("s2:99").as_deref(), Some("s2:99"));
        assert_eq!(normalize_remote("::1").as_deref(), Some("[::1]:8457"));
        assert_eq!(normalize_remote("s2:port"), None);
    }

    #[test]
    fn watch_section() {
        let c = p("[watch]\naddress = \"198.18.0.10\"\ninterface = \"eth0\"\n").unwrap();
        let w = c.watch.clone().unwrap();
        assert_eq!(w.address.to_string(), "198.18.0.10");
        assert_eq!(w.interface.as_deref(), Some("eth0"));
        assert_eq!(w.debounce, Duration::from_millis(200));
        assert!(p("").unwrap().watch.is_none());
        // check-config prints it back in the file's shape.
        let again = p(&to_toml(&c).unwrap()).unwrap().watch.unwrap();
        assert_eq!((again.address, again.interface), (w.address, w.interface));
        assert!(err("[watch]\naddress = \"vip\"\n").starts_with("/etc/tandem.toml:2:11:"));
        assert!(err("[watch]\ninterface = \"eth0\"\n").contains("address"));
    }

    #[test]
    fn nbd_tcp_is_loopback_only_unless_allowed() {
        let res = |extra: &str| {
            format!(
                "node = \"a\"\n[resource.r0]\nbackend = \"tandem\"\n{extra}\n[resource.r0.on.a]\nlocal = \"/dev/sdb\"\nremote = \"198.18.0.2:8457\"\n[resource.r0.on.b]\nlocal = \"/dev/sdb\"\nremote = \"198.18.0.1:8457\"\n"
            )
        };
        let c = p(&res("nbd_tcp = \"127.0.0.1:10809\"")).unwrap();
        assert_eq!(
            c.resources[0].nbd_tcp.unwrap().to_string(),
            "127.0.0.1:10809"
        );
        assert!(p(&res("nbd_tcp = \"[::1]:10809\"")).is_ok());
        let e = err(&res("nbd_tcp = \"0.0.0.0:10809\""));
        assert!(
            e.starts_with("/etc/tandem.toml:4:11: resource \"r0\": nbd_tcp 0.0.0.0:10809 is not a loopback address: the NBD export has no authentication"),
            "{e}"
        );
        assert!(e.contains("nbd_tcp_allow_remote = true"), "{e}");
        let c = p(&res(
            "nbd_tcp = \"198.18.0.1:10809\"\nnbd_tcp_allow_remote = true",
        ))
        .unwrap();
        assert!(c.resources[0].nbd_tcp_allow_remote);
        // check-config prints it back and it parses again.
        assert!(p(&to_toml(&c).unwrap()).unwrap().resources[0].nbd_tcp_allow_remote);
    }

    #[test]
    fn metrics_section() {
        assert!(p("").unwrap().metrics.is_none());
        assert!(p("[metrics]\n").unwrap().metrics.is_none());
        let c = p("[metrics]\nlisten = \"127.0.0.1:9857\"\n").unwrap();
        assert_eq!(
            c.metrics.as_ref().unwrap().listen.to_string(),
            "127.0.0.1:9857"
        );
        let again = p(&to_toml(&c).unwrap()).unwrap();
        assert_eq!(again.metrics.unwrap().listen.to_string(), "127.0.0.1:9857");
        let e = err("[metrics]\nlisten = \"localhost\"\n");
        assert!(
            e.starts_with(
                "/etc/tandem.toml:2:10: metrics listen address \"localhost\" is not IP:PORT"
            ),
            "{e}"
        );
        assert!(err("[metrics]\nport = 1\n").contains("unknown field"));
    }

    #[test]
    fn select_resources() {
        let c = p(EXAMPLE).unwrap();
        assert_eq!(c.select(&[]).unwrap().len(), 1);
        assert_eq!(c.select(&["all".into()]).unwrap().len(), 1);
        let e = c.select(&["nope".into()]).unwrap_err();
        assert!(e.downcast_ref::<Usage>().is_some());
    }

    #[test]
    fn link_timing_defaults_and_bounds() {
        let c = p("node = \"s1\"\n").unwrap();
        assert_eq!(c.daemon.timeout, Duration::from_secs(1));
        assert_eq!(c.daemon.probe_timeout, Duration::from_millis(300));
        assert_eq!(c.daemon.ping_interval, Duration::from_millis(200));
        assert_eq!(c.daemon.flush_timeout, Duration::from_secs(30));
        assert_eq!(c.daemon.busy_poll, Duration::from_micros(200));
        let c = p("node = \"s1\"\n[daemon]\nbusy_poll = \"0\"\n").unwrap();
        assert_eq!(c.daemon.busy_poll, Duration::ZERO);
        let c = p("node = \"s1\"\n[daemon]\nbusy_poll = \"0.5ms\"\n").unwrap();
        assert_eq!(c.daemon.busy_poll, Duration::from_micros(500));
        let e = err("node = \"s1\"\n[daemon]\nbusy_poll = \"5ms\"\n");
        assert!(e.contains("/etc/tandem.toml:3:13:"), "{e}");
        assert!(e.contains("daemon.busy_poll must be at most 1ms"), "{e}");
        // Unset, the flush timeout follows a longer link timeout; set, it may not be shorter.
        let c = p("node = \"s1\"\n[daemon]\ntimeout = \"45s\"\n").unwrap();
        assert_eq!(c.daemon.flush_timeout, Duration::from_secs(45));
        let c = p("node = \"s1\"\n[daemon]\nflush_timeout = \"2s\"\n").unwrap();
        assert_eq!(c.daemon.flush_timeout, Duration::from_secs(2));
        let e = err("node = \"s1\"\n[daemon]\ntimeout = \"5s\"\nflush_timeout = \"2s\"\n");
        assert!(e.contains("/etc/tandem.toml:4:17:"), "{e}");
        assert!(
            e.contains("daemon.flush_timeout (2s) must be at least daemon.timeout (5s)"),
            "{e}"
        );
        let c = p("node = \"s1\"\n[daemon]\nping_interval = \"50ms\"\ntimeout = \"3s\"\n").unwrap();
        assert_eq!(c.daemon.ping_interval, Duration::from_millis(50));
        let e = err("node = \"s1\"\n[daemon]\nping_interval = \"600ms\"\n");
        assert!(e.contains("/etc/tandem.toml:3:17:"), "{e}");
        assert!(e.contains("at most half of daemon.timeout (1s)"), "{e}");
        // Lowering the timeout alone below twice the default ping interval points at it.
        let e = err("node = \"s1\"\n[daemon]\ntimeout = \"300ms\"\n");
        assert!(
            e.contains("/etc/tandem.toml:3:11:") && e.contains("ping_interval"),
            "{e}"
        );
        assert!(err("node = \"s1\"\n[daemon]\nping_interval = \"0s\"\n").contains("at least 10ms"));
        assert!(
            err("node = \"s1\"\n[daemon]\nprobe_timeout = \"1ms\"\n").contains("at least 10ms")
        );
        assert!(
            err("node = \"s1\"\n[daemon]\nping_interval = \"fast\"\n")
                .starts_with("/etc/tandem.toml:3:17:")
        );
    }
}
