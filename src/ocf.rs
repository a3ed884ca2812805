//! `tandem ocf ACTION`: tandem as a promotable OCF resource agent for Pacemaker (the job
//! `ocf:linbit:drbd` does for DRBD). `ocf/tandem` is the agent file; it execs this.
//!
//! Pacemaker owns the roles: `start` makes this node secondary, `promote` runs the same full
//! promote as `tandem switch master` for the one resource (role primary, attach, device, fsck,
//! mount, services), `demote` the full demote, `stop` demotes if needed and sets role init.
//! `monitor` reports the role with the promotable return codes and publishes a promotion
//! score from the data state, so Pacemaker promotes only an up-to-date copy.
//!
//! Fencing (DRBD's `crm-fence-peer`): while this node is primary and the link to the peer is
//! down, a location constraint `tandem-fence-RES` forbids promoting the clone anywhere else;
//! it is removed once the peer is connected and in sync again. The daemon's `disconnect` and
//! `syncdone` hook events (`daemon.exec` pointing at the agent file) do it at once; `monitor`
//! does it too, as a backstop.
//!
//! The mapping from what was observed to exit codes, scores and fence actions is pure
//! (`monitor_rc`, `promotion_score`, `fence_action`) and unit-tested; the rest asks the daemon,
//! the mount table and the Pacemaker tools.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use log::{info, warn};

use crate::StepOpts;
use crate::config::{self, BackendKind, Config, Resource};
use crate::daemon::control::{self, ErrorKind, Request};
use crate::exit::Usage;
use crate::host::{Cmd, service};
use crate::switch;

/// OCF return codes (OCF resource agent API 1.1).
pub mod rc {
    pub const SUCCESS: i32 = 0;
    pub const ERR_GENERIC: i32 = 1;
    pub const ERR_ARGS: i32 = 2;
    pub const ERR_UNIMPLEMENTED: i32 = 3;
    pub const ERR_INSTALLED: i32 = 5;
    pub const ERR_CONFIGURED: i32 = 6;
    pub const NOT_RUNNING: i32 = 7;
    pub const RUNNING_PROMOTED: i32 = 8;
    pub const FAILED_PROMOTED: i32 = 9;
}

/// Promotion score of the primary while it serves: it holds the newest data there is, so no
/// secondary's score may reach it (see `promotion_score`).
pub const SCORE_PRIMARY: u32 = 20000;
/// Promotion score of an up-to-date copy that is connected to its peer.
pub const SCORE_CONNECTED: u32 = 10000;
/// Promotion score of a copy that is up to date as far as it knows, without a peer; and of a
/// diskless primary (its disk failed), which a peer in sync is to replace.
pub const SCORE_ALONE: u32 = 1000;

/// The id of the fencing constraint of resource `res`.
pub fn fence_id(res: &str) -> String {
    format!("tandem-fence-{res}")
}

/// Default of the `settle` parameter: above this lab's partition decision (token 1 s +
/// consensus 1.2 s + the qdevice's answer; the losing side stopped 2.8-4.6 s after the cut).
const DEFAULT_SETTLE_S: u64 = 5;
const TOOL_TIMEOUT: Duration = Duration::from_secs(20);
const STATUS_TIMEOUT: Duration = Duration::from_secs(10);

/// The agent's environment (OCF_RESKEY_*, OCF_RESOURCE_INSTANCE, OCF_RESKEY_CRM_meta_*).
#[derive(Debug, Clone, Default)]
pub struct Env {
    pub resource: Option<String>,
    pub config: Option<PathBuf>,
    pub instance: Option<String>,
    /// OCF_RESKEY_CRM_meta_interval in ms; 0 (or unset) on a probe.
    pub interval_ms: u64,
    /// OCF_CHECK_LEVEL: 10 and up also reads the primary's device.
    pub check_level: u32,
    pub notify_type: Option<String>,
    pub notify_operation: Option<String>,
    /// OCF_RESKEY_settle: seconds the peer must have been silent before a promote over it.
    pub settle: Duration,
    /// Pacemaker runs the action (it passes `crm_feature_set` and, for a clone, its meta
    /// attributes); ocf-tester and hand runs set neither.
    pub cluster: bool,
}

impl Env {
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Env {
        let get = |k: &str| get(k).filter(|v| !v.is_empty());
        Env {
            resource: get("OCF_RESKEY_resource"),
            config: get("OCF_RESKEY_config").map(PathBuf::from),
            instance: get("OCF_RESOURCE_INSTANCE"),
            interval_ms: get("OCF_RESKEY_CRM_meta_interval")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            check_level: get("OCF_CHECK_LEVEL")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            notify_type: get("OCF_RESKEY_CRM_meta_notify_type"),
            notify_operation: get("OCF_RESKEY_CRM_meta_notify_operation"),
            settle: Duration::from_secs(
                get("OCF_RESKEY_settle")
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(DEFAULT_SETTLE_S),
            ),
            cluster: get("OCF_RESKEY_crm_feature_set").is_some()
                || get("OCF_RESKEY_CRM_meta_clone_max").is_some(),
        }
    }

    pub fn is_probe(&self) -> bool {
        self.interval_ms == 0
    }

    /// Run by Pacemaker (not by hand, not by ocf-tester outside a cluster)?
    fn in_cluster(&self) -> bool {
        self.instance.is_some() && self.cluster
    }
}

/// The daemon's view of the resource, as far as the agent needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct View {
    /// init | primary | secondary
    pub role: String,
    /// connected | connecting | disconnected
    pub connection: String,
    /// complete | degraded | syncing | split-brain | diskless
    pub state: String,
    /// Must not be promoted: older than the peer's, or incomplete.
    pub stale: bool,
    /// The resource's disk could not be opened.
    pub error: bool,
    /// Milliseconds since the peer was last heard.
    pub peer_silent_ms: Option<u64>,
}

impl View {
    fn connected(&self) -> bool {
        self.connection == "connected"
    }
    /// UpToDate in DRBD's words: nothing says this copy is behind.
    fn up_to_date(&self) -> bool {
        !self.stale && !self.error && matches!(self.state.as_str(), "complete" | "degraded")
    }
}

/// What `monitor` observed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Daemon {
    /// The control socket does not answer: no daemon, so no role on this node.
    Down,
    /// The daemon runs but has no such resource.
    Unknown,
    Up(View),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    pub daemon: Daemon,
    /// The resource has a filesystem (mountpoint or pool) in the config.
    pub has_fs: bool,
    /// … and it is mounted (imported) here.
    pub mounted: bool,
    /// A service of this resource that says it is not running.
    pub service_down: Option<String>,
    /// OCF_CHECK_LEVEL >= 10 on a primary: why its device could not be read.
    pub device_error: Option<String>,
}

/// The monitor's exit code for what was observed.
pub fn monitor_rc(o: &Observed, probe: bool) -> i32 {
    let v = match &o.daemon {
        Daemon::Down => {
            // Without its daemon the resource has no role here. A filesystem still mounted
            // means a promoted instance lost its replication under it.
            return if o.mounted {
                rc::FAILED_PROMOTED
            } else {
                rc::NOT_RUNNING
            };
        }
        Daemon::Unknown => {
            // A probe on a node whose daemon does not carry the resource: it cannot run here.
            return if probe {
                rc::NOT_RUNNING
            } else {
                rc::ERR_CONFIGURED
            };
        }
        Daemon::Up(v) => v,
    };
    match v.role.as_str() {
        "primary" => {
            if (o.has_fs && !o.mounted)
                || o.service_down.is_some()
                || o.device_error.is_some()
                || v.error
            {
                rc::FAILED_PROMOTED
            } else {
                rc::RUNNING_PROMOTED
            }
        }
        "secondary" if o.mounted => rc::ERR_GENERIC,
        "secondary" if v.error => rc::ERR_GENERIC,
        "secondary" => rc::SUCCESS,
        // init: stopped. Mounted without a role is not a clean stop.
        _ if o.mounted => rc::ERR_GENERIC,
        _ => rc::NOT_RUNNING,
    }
}

/// The promotion score for this node's copy; None: no score (never promoted).
pub fn promotion_score(v: &View) -> Option<u32> {
    match v.role.as_str() {
        "init" => None,
        // A primary keeps the highest score while it serves, whatever its link: it holds the
        // newest data. With 1000 while alone, a peer that came back and resynced reached
        // 10000 before the primary's next monitor, and Pacemaker demoted the serving primary
        // to promote it (cluster lab).
        "primary" if v.error => None,
        // Its own disk failed: it serves from the peer, which holds every write, so a peer
        // connected and in sync outranks it and Pacemaker hands over to the copy with a disk.
        "primary" if v.state == "diskless" => Some(SCORE_ALONE),
        "primary" => Some(SCORE_PRIMARY),
        _ if !v.up_to_date() => None,
        _ if v.connected() && v.state == "complete" => Some(SCORE_CONNECTED),
        // Connected but not in sync yet (the sync has not started): wait for it.
        _ if v.connected() => None,
        _ => Some(SCORE_ALONE),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fence {
    /// Forbid promoting the peer (this node is primary and the link is down).
    Place,
    /// The peer is connected and in sync again: lift the constraint.
    Remove,
    /// Leave the constraint as it is.
    Keep,
}

pub fn fence_action(v: &View) -> Fence {
    if v.role != "primary" {
        // Only the primary knows the peer missed writes; a secondary leaves it alone (the
        // constraint of a crashed primary keeps the stale peer from being promoted).
        return Fence::Keep;
    }
    if !v.connected() {
        Fence::Place
    } else if v.state == "complete" {
        Fence::Remove
    } else {
        Fence::Keep
    }
}

/// The OCF 1.1 meta-data of the agent.
pub fn meta_data() -> String {
    format!(
        r#"<?xml version="1.0"?>
<resource-agent name="tandem" version="{version}">
  <version>1.1</version>
  <longdesc lang="en">
Manages one tandem replicated resource as a promotable clone: the promoted
instance is the primary (role primary, device, fsck, mount and the services of
the resource, the same full promote as "tandem switch master"), the unpromoted
instance the secondary. The tandem daemon must run on every node (it is started
by the init system, not by this agent). Promotion scores follow the data state:
{primary} for the primary while it serves from its own disk, {alone} for a
primary whose disk failed (it serves from the peer), {connected} for an up-to-date
secondary connected to its peer, {alone} for an up-to-date secondary alone,
none for a stale, syncing or split-brain copy.
  </longdesc>
  <shortdesc lang="en">Manages a tandem replicated resource</shortdesc>
  <parameters>
    <parameter name="resource" unique-group="resource" required="1">
      <longdesc lang="en">The name of the resource in tandem.toml.</longdesc>
      <shortdesc lang="en">tandem resource name</shortdesc>
      <content type="string"/>
    </parameter>
    <parameter name="config" reloadable="1">
      <longdesc lang="en">The tandem configuration file.</longdesc>
      <shortdesc lang="en">tandem.toml path</shortdesc>
      <content type="string" default="{config}"/>
    </parameter>
    <parameter name="settle" reloadable="1">
      <longdesc lang="en">Before promoting over a peer that is gone (silent for daemon.timeout), wait until the peer has been silent this long (seconds) and then promote only if this node's partition has quorum (crm_node -q). Set it above the time the cluster takes to decide a partition (Corosync token + consensus + the quorum device's answer), so that the side that is about to lose quorum never promotes in the moment before it knows. 0 turns the wait off (the quorum check stays).</longdesc>
      <shortdesc lang="en">seconds of peer silence before a promote</shortdesc>
      <content type="integer" default="5"/>
    </parameter>
    <parameter name="binary" reloadable="1">
      <longdesc lang="en">The tandem program (a path, or a name looked up in PATH).</longdesc>
      <shortdesc lang="en">tandem binary</shortdesc>
      <content type="string" default="tandem"/>
    </parameter>
  </parameters>
  <actions>
    <action name="start" timeout="60s"/>
    <action name="stop" timeout="120s"/>
    <action name="promote" timeout="120s"/>
    <action name="demote" timeout="120s"/>
    <action name="monitor" timeout="30s" interval="10s" depth="0" role="Promoted"/>
    <action name="monitor" timeout="30s" interval="11s" depth="0" role="Unpromoted"/>
    <action name="monitor" timeout="30s" interval="31s" depth="10" role="Promoted"/>
    <action name="notify" timeout="30s"/>
    <action name="meta-data" timeout="5s"/>
    <action name="validate-all" timeout="30s"/>
    <action name="reload-agent" timeout="30s"/>
  </actions>
</resource-agent>
"#,
        version = env!("CARGO_PKG_VERSION"),
        primary = SCORE_PRIMARY,
        connected = SCORE_CONNECTED,
        alone = SCORE_ALONE,
        config = config::DEFAULT_PATH,
    )
}

const USAGE: &str = "usage: tandem ocf {start|stop|promote|demote|monitor|notify|meta-data|validate-all|reload-agent}
       tandem ocf {disconnect|syncdone|connect|role|...} RESOURCE   (daemon.exec hook)";

/// Daemon hook events the agent acts on when it is `daemon.exec` (the others are ignored).
const HOOK_EVENTS: [&str; 9] = [
    "role",
    "connect",
    "disconnect",
    "syncstart",
    "syncdone",
    "syncintr",
    "split-brain",
    "verify",
    "disk-failed",
];

/// `tandem ocf ACTION [ARGS]`: run one action, return its OCF exit code.
pub fn run(action: &str, args: &[String], cli_config: &Path, node: Option<&str>) -> i32 {
    let env = Env::from_vars(|k| std::env::var(k).ok());
    match action {
        "meta-data" => {
            print!("{}", meta_data());
            return rc::SUCCESS;
        }
        "usage" | "help" => {
            println!("{USAGE}");
            return rc::SUCCESS;
        }
        a if HOOK_EVENTS.contains(&a) => {
            return hook(a, args, cli_config, node);
        }
        "start" | "stop" | "promote" | "demote" | "monitor" | "status" | "notify"
        | "validate-all" | "reload-agent" | "reload" => {}
        other => {
            eprintln!("tandem ocf: unknown action {other:?}\n{USAGE}");
            return rc::ERR_UNIMPLEMENTED;
        }
    }
    let path = env
        .config
        .clone()
        .unwrap_or_else(|| cli_config.to_path_buf());
    let ctx = match load(&env, &path, node, action) {
        Ok(c) => c,
        Err(code) => return code,
    };
    crate::logging::init(Some(&ctx.cfg.log), 0, false);
    let code = match action {
        "validate-all" | "reload-agent" | "reload" => rc::SUCCESS,
        "monitor" | "status" => monitor(&ctx, &env),
        "start" => start(&ctx, &env),
        "stop" => stop(&ctx, &env),
        "promote" => promote(&ctx, &env),
        "demote" => demote(&ctx, &env),
        "notify" => notify(&ctx, &env),
        _ => rc::ERR_UNIMPLEMENTED,
    };
    info!("ocf {action} {}: exit {code}", ctx.name);
    code
}

struct Ctx {
    cfg: Config,
    name: String,
    /// Index of the resource in `cfg.resources` (load() found it).
    idx: usize,
}

impl Ctx {
    fn res(&self) -> &Resource {
        &self.cfg.resources[self.idx]
    }
}

/// Read the config and check the parameters (validate-all). Missing files are "not
/// installed" on this node (5), except on a probe or stop, where nothing can be running
/// (7 / 0); bad parameters or a bad config are 6.
fn load(env: &Env, path: &Path, node: Option<&str>, action: &str) -> Result<Ctx, i32> {
    let nothing_here = match action {
        "stop" => Some(rc::SUCCESS),
        "monitor" | "status" if env.is_probe() => Some(rc::NOT_RUNNING),
        _ => None,
    };
    let Some(name) = env.resource.clone() else {
        eprintln!("tandem ocf {action}: the parameter `resource` is required");
        return Err(rc::ERR_CONFIGURED);
    };
    if !path.exists() {
        eprintln!(
            "tandem ocf {action} {name}: configuration file {} not found",
            path.display()
        );
        return Err(nothing_here.unwrap_or(rc::ERR_INSTALLED));
    }
    let cfg = match config::load(path, node) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tandem ocf {action} {name}: {e:#}");
            return Err(rc::ERR_CONFIGURED);
        }
    };
    let idx = cfg.resources.iter().position(|r| r.name == name);
    match idx.map(|i| &cfg.resources[i]) {
        None => {
            eprintln!(
                "tandem ocf {action}: resource {name:?} is not in {}",
                path.display()
            );
            return Err(rc::ERR_CONFIGURED);
        }
        Some(r) if r.backend != BackendKind::Tandem => {
            eprintln!(
                "tandem ocf {action}: resource {name:?} uses backend {}; the agent manages backend tandem",
                r.backend
            );
            return Err(rc::ERR_CONFIGURED);
        }
        Some(_) => {}
    }
    let idx = idx.unwrap_or_default();
    Ok(Ctx { cfg, name, idx })
}

/// Ask the daemon for the resource.
fn observe_daemon(ctx: &Ctx) -> Daemon {
    let req = Request::Status {
        resources: vec![ctx.name.clone()],
    };
    let resp = match control::request(&ctx.cfg.daemon.control, &req, STATUS_TIMEOUT) {
        Ok(r) => r,
        Err(e) => {
            info!("ocf {}: the daemon does not answer: {e:#}", ctx.name);
            return Daemon::Down;
        }
    };
    if let Some(e) = resp.error {
        if e.kind == ErrorKind::Usage {
            return Daemon::Unknown;
        }
        warn!("ocf {}: status: {}", ctx.name, e.message);
        return Daemon::Down;
    }
    match resp.resources.into_iter().find(|r| r.name == ctx.name) {
        None => Daemon::Unknown,
        Some(s) => Daemon::Up(View {
            role: s.role,
            connection: s.connection,
            state: s.state,
            stale: s.stale,
            error: s.error.is_some(),
            peer_silent_ms: s.peer_silent_ms,
        }),
    }
}

/// Read the first 4 KiB of the primary's device, bypassing the page cache, within 10 s.
fn read_device(r: &Resource) -> Option<String> {
    if !r.device.exists() {
        // Without a filesystem or an attach hook a tandem resource is used through its
        // export socket only; its device may never exist.
        let wanted = r.mountpoint.is_some() || r.pool.is_some() || r.attach.is_some();
        return wanted.then(|| format!("its device {} is absent", r.device.display()));
    }
    let dev = format!("if={}", r.device.display());
    let c = Cmd::new(
        "dd",
        &[&dev, "of=/dev/null", "bs=4096", "count=1", "iflag=direct"],
    )
    .timeout(Some(Duration::from_secs(10)));
    c.run()
        .err()
        .map(|e| format!("its device cannot be read: {e:#}"))
}

fn observe(ctx: &Ctx, env: &Env) -> Observed {
    let r = ctx.res();
    let has_fs = r.mountpoint.is_some() || r.pool.is_some();
    let daemon = observe_daemon(ctx);
    let primary = matches!(&daemon, Daemon::Up(v) if v.role == "primary");
    let t = ctx.cfg.switch.command_timeout.min(STATUS_TIMEOUT);
    let service_down = if primary {
        ctx.cfg
            .services
            .iter()
            .filter(|s| s.uses(&ctx.name))
            .find(|s| matches!(service::is_active(s, t), Ok(Some(false))))
            .map(|s| s.name.clone())
    } else {
        None
    };
    let device_error = if primary && env.check_level >= 10 {
        read_device(r)
    } else {
        None
    };
    Observed {
        daemon,
        has_fs,
        mounted: has_fs && switch::is_up(r),
        service_down,
        device_error,
    }
}

fn monitor(ctx: &Ctx, env: &Env) -> i32 {
    let o = observe(ctx, env);
    let code = monitor_rc(&o, env.is_probe());
    if let Daemon::Up(v) = &o.daemon {
        if env.in_cluster() {
            set_score(ctx, env, promotion_score(v));
            fence(&ctx.name, fence_action(v));
        }
        if code == rc::FAILED_PROMOTED {
            warn!(
                "ocf monitor {}: primary but {}",
                ctx.name,
                match (&o.device_error, &o.service_down) {
                    (Some(e), _) => e.clone(),
                    (None, Some(s)) => format!("service {s} is not running"),
                    (None, None) => "its filesystem is not mounted".into(),
                }
            );
        }
    }
    code
}

fn opts() -> StepOpts {
    StepOpts::default()
}

/// The OCF code for a failed action.
fn failed(action: &str, name: &str, e: &anyhow::Error) -> i32 {
    log::error!("ocf {action} {name}: {e:#}");
    if crate::exit::code_for(e) == crate::exit::USAGE {
        rc::ERR_CONFIGURED
    } else {
        rc::ERR_GENERIC
    }
}

fn set_role(ctx: &Ctx, role: &str) -> Result<()> {
    let req = Request::Role {
        role: match role {
            "init" => control::Role::Init,
            "secondary" => control::Role::Secondary,
            _ => control::Role::Primary,
        },
        resources: vec![ctx.name.clone()],
        force: false,
    };
    let t = ctx
        .cfg
        .switch
        .command_timeout
        .max(ctx.cfg.switch.role_timeout);
    let resp = control::request(&ctx.cfg.daemon.control, &req, t)
        .with_context(|| format!("{}: role {role}", ctx.name))?;
    if let Some(e) = resp.error {
        return Err(control::exit_error(e)).with_context(|| format!("{}: role {role}", ctx.name));
    }
    Ok(())
}

fn start(ctx: &Ctx, env: &Env) -> i32 {
    let result = (|| -> Result<()> {
        match observe_daemon(ctx) {
            Daemon::Down => anyhow::bail!(
                "the tandem daemon does not answer on {} (start it with the init system: it is not managed by Pacemaker)",
                ctx.cfg.daemon.control.display()
            ),
            Daemon::Unknown => {
                return Err(
                    Usage(format!("the daemon does not carry resource {}", ctx.name)).into(),
                );
            }
            Daemon::Up(v) if v.role == "primary" => {
                // Pacemaker starts an instance it believes stopped: leave primary cleanly.
                switch::cmd_demote(&ctx.cfg, std::slice::from_ref(&ctx.name), opts())?;
            }
            Daemon::Up(_) => {}
        }
        set_role(ctx, "secondary")
    })();
    match result {
        Ok(()) => {
            if let Daemon::Up(v) = observe_daemon(ctx) {
                set_score(ctx, env, promotion_score(&v));
            }
            rc::SUCCESS
        }
        Err(e) => failed("start", &ctx.name, &e),
    }
}

fn stop(ctx: &Ctx, env: &Env) -> i32 {
    let result = (|| -> Result<()> {
        match observe_daemon(ctx) {
            Daemon::Down | Daemon::Unknown => {
                // No role to drop; only a filesystem left mounted stops this being a stop.
                if switch::is_up(ctx.res()) {
                    switch::cmd_demote(&ctx.cfg, std::slice::from_ref(&ctx.name), opts())?;
                }
                Ok(())
            }
            Daemon::Up(v) => {
                if v.role == "primary" || switch::is_up(ctx.res()) {
                    switch::cmd_demote(&ctx.cfg, std::slice::from_ref(&ctx.name), opts())?;
                }
                set_role(ctx, "init")
            }
        }
    })();
    match result {
        Ok(()) => {
            set_score(ctx, env, None);
            rc::SUCCESS
        }
        Err(e) => failed("stop", &ctx.name, &e),
    }
}

/// Under Pacemaker, a promote over a peer that is gone (silent for `daemon.timeout`) waits until
/// the peer has been silent for `settle` and then needs quorum. Without fencing, the side of a partition that is
/// about to lose quorum can be told to promote in the moment before the quorum device's answer
/// arrives (seen in the cluster lab: both partitions listed the clone as promoted); the wait
/// lets that answer arrive, and `crm_node -q` then says no.
fn quorum_gate(ctx: &Ctx, env: &Env) -> Result<()> {
    let started = Instant::now();
    // Bounded well inside the promote's default timeout (120 s).
    let bound = env.settle + Duration::from_secs(30);
    loop {
        match observe_daemon(ctx) {
            Daemon::Up(v) if v.connected() => return Ok(()),
            Daemon::Up(v) => {
                let silent = Duration::from_millis(v.peer_silent_ms.unwrap_or(u64::MAX));
                // A peer heard within daemon.timeout is alive (an idle pair probes each
                // other): the promote asks it and refuses over a live primary.
                if silent < ctx.cfg.daemon.timeout {
                    return Ok(());
                }
                if silent >= env.settle {
                    break;
                }
                if started.elapsed() >= bound {
                    anyhow::bail!(
                        "the peer is not connected but was heard {} ms ago, still after {} s",
                        silent.as_millis(),
                        bound.as_secs()
                    );
                }
            }
            // The promote itself reports what is wrong with the daemon.
            Daemon::Down | Daemon::Unknown => return Ok(()),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = Cmd::new("crm_node", &["-q"])
        .timeout(Some(TOOL_TIMEOUT))
        .run()
        .context("asking Pacemaker whether this partition has quorum (crm_node -q)")?;
    if out.stdout.trim() != "1" {
        anyhow::bail!(
            "the peer is gone and this node's partition has no quorum (crm_node -q: {}): not promoting",
            out.stdout.trim()
        );
    }
    info!(
        "ocf {}: peer silent for at least {} s and this partition has quorum: promoting",
        ctx.name,
        env.settle.as_secs()
    );
    Ok(())
}

fn promote(ctx: &Ctx, env: &Env) -> i32 {
    if env.in_cluster()
        && let Err(e) = quorum_gate(ctx, env)
    {
        return failed("promote", &ctx.name, &e);
    }
    match switch::cmd_promote(&ctx.cfg, std::slice::from_ref(&ctx.name), opts()) {
        Ok(()) => {
            if let Daemon::Up(v) = observe_daemon(ctx) {
                set_score(ctx, env, promotion_score(&v));
                if env.in_cluster() {
                    fence(&ctx.name, fence_action(&v));
                }
            }
            rc::SUCCESS
        }
        Err(e) => failed("promote", &ctx.name, &e),
    }
}

fn demote(ctx: &Ctx, env: &Env) -> i32 {
    match switch::cmd_demote(&ctx.cfg, std::slice::from_ref(&ctx.name), opts()) {
        Ok(()) => {
            if let Daemon::Up(v) = observe_daemon(ctx) {
                set_score(ctx, env, promotion_score(&v));
            }
            rc::SUCCESS
        }
        Err(e) => failed("demote", &ctx.name, &e),
    }
}

fn notify(ctx: &Ctx, env: &Env) -> i32 {
    let what = format!(
        "{}-{}",
        env.notify_type.as_deref().unwrap_or("?"),
        env.notify_operation.as_deref().unwrap_or("?")
    );
    info!("ocf notify {}: {what}", ctx.name);
    // After any change of the other instances the data state may have changed: refresh the
    // score (a peer that started connects, a promoted peer starts a sync).
    if env.notify_type.as_deref() == Some("post")
        && let Daemon::Up(v) = observe_daemon(ctx)
    {
        set_score(ctx, env, promotion_score(&v));
    }
    rc::SUCCESS
}

/// `crm_attribute --promotion` (Pacemaker ≥ 2.1.3; `crm_master` before) for this instance.
/// Failures are logged, never fatal: outside a cluster (ocf-tester) there is nothing to set.
fn set_score(ctx: &Ctx, env: &Env, score: Option<u32>) {
    if !env.in_cluster() {
        return;
    }
    let c = match score {
        Some(n) => Cmd::new(
            "crm_attribute",
            &["--promotion", "--lifetime", "reboot", "-v", &n.to_string()],
        ),
        None => Cmd::new(
            "crm_attribute",
            &["--promotion", "--lifetime", "reboot", "-D"],
        ),
    }
    .timeout(Some(TOOL_TIMEOUT));
    if let Err(e) = c.run() {
        warn!("ocf {}: promotion score: {e:#}", ctx.name);
    }
}

/// The id of the clone (the `rsc` of the constraint) that manages tandem resource `res`.
fn clone_id(res: &str) -> Result<String> {
    let xpath = format!(
        "//clone[.//primitive[@class='ocf' and @provider='tandem' and @type='tandem']\
         /instance_attributes/nvpair[@name='resource' and @value='{res}']]"
    );
    let out = Cmd::new("cibadmin", &["--query", "--xpath", &xpath])
        .timeout(Some(TOOL_TIMEOUT))
        .run()
        .with_context(|| format!("no Pacemaker clone manages tandem resource {res}"))?;
    xml_attr(&out.stdout, "clone", "id")
        .with_context(|| format!("cibadmin: no clone id for tandem resource {res}"))
}

/// The value of `attr` in the first `<tag …>` of `xml` (enough for cibadmin's own output).
pub fn xml_attr(xml: &str, tag: &str, attr: &str) -> Option<String> {
    let start = xml.find(&format!("<{tag} "))?;
    let end = start + xml[start..].find('>')?;
    let open = &xml[start..end];
    let key = format!(" {attr}=\"");
    let at = open.find(&key)? + key.len();
    let len = open[at..].find('"')?;
    Some(open[at..at + len].to_string())
}

/// The constraint that keeps clone `clone` promoted only on `node`.
pub fn fence_xml(res: &str, clone: &str, node: &str) -> String {
    let id = fence_id(res);
    format!(
        "<rsc_location id=\"{id}\" rsc=\"{clone}\">\
         <rule id=\"{id}-rule\" role=\"Promoted\" score=\"-INFINITY\">\
         <expression id=\"{id}-expr\" attribute=\"#uname\" operation=\"ne\" value=\"{node}\"/>\
         </rule></rsc_location>"
    )
}

fn fence_exists(res: &str) -> Result<bool> {
    let out = Cmd::new(
        "cibadmin",
        &[
            "--query",
            "--xpath",
            &format!("//rsc_location[@id='{}']", fence_id(res)),
        ],
    )
    .timeout(Some(TOOL_TIMEOUT))
    .output()?;
    // 0: found; 105 (CRM_EX_NOSUCH): not there.
    match out.code() {
        0 => Ok(true),
        105 => Ok(false),
        c => anyhow::bail!(
            "cibadmin --query {}: exit {c}: {}",
            fence_id(res),
            out.stderr.trim()
        ),
    }
}

fn place_fence(res: &str) -> Result<()> {
    if fence_exists(res)? {
        return Ok(());
    }
    let clone = clone_id(res)?;
    let node = Cmd::new("crm_node", &["-n"])
        .timeout(Some(TOOL_TIMEOUT))
        .run()?
        .stdout
        .trim()
        .to_string();
    if node.is_empty() {
        anyhow::bail!("crm_node -n printed no node name");
    }
    Cmd::new(
        "cibadmin",
        &[
            "--create",
            "--scope",
            "constraints",
            "--xml-text",
            &fence_xml(res, &clone, &node),
        ],
    )
    .timeout(Some(TOOL_TIMEOUT))
    .run()?;
    warn!(
        "{res}: link to the peer lost while primary: placed constraint {} (only {node} may be promoted until the peer has resynced)",
        fence_id(res)
    );
    Ok(())
}

fn remove_fence(res: &str) -> Result<()> {
    if !fence_exists(res)? {
        return Ok(());
    }
    Cmd::new(
        "cibadmin",
        &[
            "--delete",
            "--xpath",
            &format!("//rsc_location[@id='{}']", fence_id(res)),
        ],
    )
    .timeout(Some(TOOL_TIMEOUT))
    .run_ok(|c| c == 0 || c == 105)?;
    info!(
        "{res}: the peer is connected and in sync: removed constraint {}",
        fence_id(res)
    );
    Ok(())
}

fn fence(res: &str, what: Fence) {
    let r = match what {
        Fence::Place => place_fence(res),
        Fence::Remove => remove_fence(res),
        Fence::Keep => Ok(()),
    };
    if let Err(e) = r {
        log::error!("{res}: fencing constraint: {e:#}");
    }
}

/// `daemon.exec` entry: `tandem ocf EVENT RESOURCE [ARGS]` (the daemon sets TANDEM_CONFIG).
/// Acts on `disconnect` (place the constraint if primary; not `disconnect RES demote`, the
/// link a demote closes) and `syncdone`/`connect` (remove it once in sync); every other
/// event is accepted and ignored.
fn hook(event: &str, args: &[String], cli_config: &Path, node: Option<&str>) -> i32 {
    let Some(name) = args.first() else {
        eprintln!("tandem ocf {event}: missing RESOURCE\n{USAGE}");
        return rc::ERR_ARGS;
    };
    if !matches!(event, "disconnect" | "syncdone" | "connect") {
        return rc::SUCCESS;
    }
    if event == "disconnect" && args.get(1).is_some_and(|a| a == "demote") {
        // The link closed because this node left role primary (a demote hands over to the
        // peer): nothing to fence, and the role may still read primary in the daemon.
        return rc::SUCCESS;
    }
    let env = Env {
        resource: Some(name.clone()),
        ..Env::default()
    };
    let ctx = match load(&env, cli_config, node, event) {
        Ok(c) => c,
        Err(code) => return code,
    };
    crate::logging::init(Some(&ctx.cfg.log), 0, false);
    if let Daemon::Up(v) = observe_daemon(&ctx) {
        fence(name, fence_action(&v));
    }
    rc::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(role: &str, connection: &str, state: &str) -> View {
        View {
            role: role.into(),
            connection: connection.into(),
            state: state.into(),
            stale: false,
            error: false,
            peer_silent_ms: None,
        }
    }

    fn obs(daemon: Daemon, has_fs: bool, mounted: bool) -> Observed {
        Observed {
            daemon,
            has_fs,
            mounted,
            service_down: None,
            device_error: None,
        }
    }

    #[test]
    fn monitor_codes_follow_the_role() {
        let up = |r: &str| Daemon::Up(view(r, "connected", "complete"));
        assert_eq!(monitor_rc(&obs(up("init"), true, false), false), 7);
        assert_eq!(monitor_rc(&obs(up("secondary"), true, false), false), 0);
        assert_eq!(monitor_rc(&obs(up("primary"), true, true), false), 8);
        // A promote without a filesystem (a bare export) is promoted when primary.
        assert_eq!(monitor_rc(&obs(up("primary"), false, false), false), 8);
        // Primary, but the mount is gone: failed promoted.
        assert_eq!(monitor_rc(&obs(up("primary"), true, false), false), 9);
        let mut o = obs(up("primary"), true, true);
        o.service_down = Some("nfs".into());
        assert_eq!(monitor_rc(&o, false), 9);
        let mut o = obs(up("primary"), true, true);
        o.device_error = Some("its device cannot be read".into());
        assert_eq!(monitor_rc(&o, false), 9);
        // Mounted without the role is not a clean state.
        assert_eq!(monitor_rc(&obs(up("secondary"), true, true), false), 1);
        assert_eq!(monitor_rc(&obs(up("init"), true, true), true), 1);
    }

    #[test]
    fn probe_with_the_daemon_down_is_not_running_unless_mounted() {
        assert_eq!(monitor_rc(&obs(Daemon::Down, true, false), true), 7);
        assert_eq!(monitor_rc(&obs(Daemon::Down, true, false), false), 7);
        assert_eq!(monitor_rc(&obs(Daemon::Down, true, true), true), 9);
        assert_eq!(monitor_rc(&obs(Daemon::Unknown, true, false), true), 7);
        assert_eq!(monitor_rc(&obs(Daemon::Unknown, true, false), false), 6);
    }

    #[test]
    fn split_brain_primary_keeps_serving() {
        let v = view("primary", "disconnected", "split-brain");
        assert_eq!(
            monitor_rc(&obs(Daemon::Up(v.clone()), true, true), false),
            8
        );
        assert_eq!(promotion_score(&v), Some(SCORE_PRIMARY));
    }

    #[test]
    fn scores_follow_the_data_state() {
        assert_eq!(
            promotion_score(&view("secondary", "connected", "complete")),
            Some(SCORE_CONNECTED)
        );
        assert_eq!(
            promotion_score(&view("secondary", "disconnected", "degraded")),
            Some(SCORE_ALONE)
        );
        assert_eq!(
            promotion_score(&view("primary", "connected", "complete")),
            Some(SCORE_PRIMARY)
        );
        assert_eq!(
            promotion_score(&view("primary", "disconnected", "degraded")),
            Some(SCORE_PRIMARY)
        );
        // Sync target, stale, split-brain, not in sync yet, stopped, broken disk: never.
        assert_eq!(
            promotion_score(&view("secondary", "connected", "syncing")),
            None
        );
        assert_eq!(
            promotion_score(&view("secondary", "disconnected", "split-brain")),
            None
        );
        assert_eq!(
            promotion_score(&view("secondary", "connected", "degraded")),
            None
        );
        assert_eq!(
            promotion_score(&view("init", "disconnected", "degraded")),
            None
        );
        assert_eq!(
            promotion_score(&view("secondary", "disconnected", "diskless")),
            None
        );
        let mut stale = view("secondary", "disconnected", "degraded");
        stale.stale = true;
        assert_eq!(promotion_score(&stale), None);
        let mut broken = view("secondary", "disconnected", "degraded");
        broken.error = true;
        assert_eq!(promotion_score(&broken), None);
    }

    /// Seen in the cluster lab: a primary alone (its peer crashed or cut off) had 1000, the
    /// returning peer reached 10000 once resynced, before the primary's own monitor raised its
    /// score; Pacemaker then demoted the serving primary to promote the peer. A serving
    /// primary holds the newest data: whatever its link and the peer's state, no secondary's
    /// score may reach its own.
    #[test]
    fn a_serving_primary_outranks_every_secondary() {
        let states = ["complete", "degraded", "syncing", "split-brain", "diskless"];
        let links = ["connected", "connecting", "disconnected"];
        for pl in links {
            for ps in states.into_iter().filter(|&s| s != "diskless") {
                let primary = promotion_score(&view("primary", pl, ps))
                    .unwrap_or_else(|| panic!("primary {pl} {ps}: no score"));
                for sl in links {
                    for ss in states {
                        for stale in [false, true] {
                            let mut v = view("secondary", sl, ss);
                            v.stale = stale;
                            let secondary = promotion_score(&v).unwrap_or(0);
                            assert!(
                                secondary < primary,
                                "secondary {sl} {ss} (stale {stale}) scores {secondary}, \
                                 primary {pl} {ps} {primary}"
                            );
                        }
                    }
                }
            }
        }
        let mut broken = view("primary", "connected", "complete");
        broken.error = true;
        assert_eq!(promotion_score(&broken), None);
        // A primary whose own disk failed serves from the peer: the peer, in sync, takes over.
        let diskless = promotion_score(&view("primary", "connected", "diskless"));
        assert!(diskless.is_some());
        assert!(diskless < promotion_score(&view("secondary", "connected", "complete")));
    }

    #[test]
    fn fence_only_from_the_primary() {
        assert_eq!(
            fence_action(&view("primary", "disconnected", "degraded")),
            Fence::Place
        );
        assert_eq!(
            fence_action(&view("primary", "connecting", "degraded")),
            Fence::Place
        );
        assert_eq!(
            fence_action(&view("primary", "connected", "syncing")),
            Fence::Keep
        );
        assert_eq!(
            fence_action(&view("primary", "connected", "complete")),
            Fence::Remove
        );
        assert_eq!(
            fence_action(&view("secondary", "disconnected", "degraded")),
            Fence::Keep
        );
        assert_eq!(
            fence_action(&view("secondary", "connected", "complete")),
            Fence::Keep
        );
    }

    #[test]
    fn env_reads_the_ocf_variables() {
        let vars = [
            ("OCF_RESKEY_resource", "r0"),
            ("OCF_RESKEY_config", "/etc/t.toml"),
            ("OCF_RESOURCE_INSTANCE", "p_r0"),
            ("OCF_RESKEY_crm_feature_set", "3.16.2"),
            ("OCF_RESKEY_CRM_meta_interval", "10000"),
            ("OCF_CHECK_LEVEL", "10"),
            ("OCF_RESKEY_CRM_meta_notify_type", "post"),
            ("OCF_RESKEY_CRM_meta_notify_operation", "promote"),
        ];
        let e = Env::from_vars(|k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        });
        assert_eq!(e.resource.as_deref(), Some("r0"));
        assert_eq!(e.config, Some(PathBuf::from("/etc/t.toml")));
        assert!(!e.is_probe() && e.in_cluster());
        assert_eq!(e.notify_operation.as_deref(), Some("promote"));
        assert_eq!(e.check_level, 10);
        let probe = Env::from_vars(|k| (k == "OCF_RESKEY_CRM_meta_interval").then(|| "0".into()));
        assert!(probe.is_probe() && !probe.in_cluster() && probe.resource.is_none());
        // ocf-tester sets the instance name only: not a cluster.
        let tester = Env::from_vars(|k| (k == "OCF_RESOURCE_INSTANCE").then(|| "t".into()));
        assert!(!tester.in_cluster());
    }

    #[test]
    fn cibadmin_output_gives_the_clone_id() {
        let xml = "<clone id=\"tandem-clone\">\n  <meta_attributes id=\"x\"/>\n  <primitive id=\"p\" class=\"ocf\"/>\n</clone>\n";
        assert_eq!(
            xml_attr(xml, "clone", "id").as_deref(),
            Some("tandem-clone")
        );
        assert_eq!(xml_attr(xml, "group", "id"), None);
        let f = fence_xml("r0", "tandem-clone", "node1");
        assert!(f.starts_with("<rsc_location id=\"tandem-fence-r0\" rsc=\"tandem-clone\">"));
        assert!(f.contains("role=\"Promoted\" score=\"-INFINITY\""));
        assert!(f.contains("attribute=\"#uname\" operation=\"ne\" value=\"node1\""));
    }

    #[test]
    fn meta_data_names_the_parameters_and_actions() {
        let m = meta_data();
        for p in ["resource", "config", "binary"] {
            assert!(m.contains(&format!("<parameter name=\"{p}\"")), "{p}");
        }
        for a in [
            "start",
            "stop",
            "promote",
            "demote",
            "monitor",
            "notify",
            "meta-data",
            "validate-all",
            "reload-agent",
        ] {
            assert!(m.contains(&format!("<action name=\"{a}\"")), "{a}");
        }
        assert!(m.contains("<version>1.1</version>"));
    }
}
