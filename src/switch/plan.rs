//! Promote and demote as plans: lists of steps, built without touching the machine.
//! `--dry-run` prints them; the executor (exec.rs) runs them.

use std::path::Path;
use std::time::Duration;

use crate::backend::{self, RoleCtx};
use crate::config::{BackendKind, Config, Resource, Service, format_duration};
use crate::host::{Cmd, fs, service, zfs};

/// One step of a plan.
#[derive(Debug, Clone, Copy)]
pub enum Step<'a> {
    /// Change the replication role (backend).
    Role(&'a Resource, bool),
    /// The `attach` hook, after role primary.
    Attach(&'a Resource),
    WaitDevice(&'a Resource),
    Fsck(&'a Resource),
    Mkdir(&'a Resource),
    /// mount, or `zpool import -o cachefile=none -d DEVICE -f` for zfs.
    Mount(&'a Resource),
    StartService(&'a Service),
    StopService(&'a Service),
    /// umount (holders TERM/KILL, umount -f), or `zpool export` for zfs.
    Unmount(&'a Resource),
    /// The `detach` hook, before role secondary.
    Detach(&'a Resource),
}

/// Is `svc` to be started when `promoted` are up? Only if every resource it uses is in the
/// plan or already up.
fn service_ready(cfg: &Config, svc: &Service, promoted: &[&Resource]) -> bool {
    cfg.resources
        .iter()
        .filter(|r| svc.uses(&r.name))
        .all(|r| promoted.iter().any(|p| p.name == r.name) || is_up(r))
}

/// Is the resource's filesystem in use here (mounted, or its pool imported)?
pub fn is_up(res: &Resource) -> bool {
    match (&res.pool, &res.mountpoint) {
        (Some(pool), _) => zfs::imported(pool, Duration::from_secs(10)).unwrap_or(false),
        (None, Some(mp)) => fs::mounted_at(mp).ok().flatten().is_some(),
        (None, None) => false,
    }
}

/// Promote: for each resource role, attach, device, fsck, mkdir, mount; then the services in
/// order.
pub fn promote<'a>(cfg: &'a Config, resources: &[&'a Resource]) -> Vec<Step<'a>> {
    let mut steps = Vec::new();
    for &r in resources {
        steps.push(Step::Role(r, true));
        steps.push(Step::Attach(r));
        if r.mountpoint.is_none() && r.pool.is_none() {
            // No filesystem here: nothing to check or mount. A tandem resource without an
            // attach hook is used through its export socket; its device may never appear.
            if r.backend != BackendKind::Tandem || r.attach.is_some() {
                steps.push(Step::WaitDevice(r));
            }
            continue;
        }
        steps.push(Step::WaitDevice(r));
        steps.push(Step::Fsck(r));
        steps.push(Step::Mkdir(r));
        steps.push(Step::Mount(r));
    }
    for svc in &cfg.services {
        if resources.iter().any(|r| svc.uses(&r.name)) && service_ready(cfg, svc, resources) {
            steps.push(Step::StartService(svc));
        }
    }
    steps
}

/// Demote: the services that use these resources stopped in reverse order; then for each
/// resource (reverse order) unmount, detach, role secondary.
pub fn demote<'a>(cfg: &'a Config, resources: &[&'a Resource]) -> Vec<Step<'a>> {
    let mut steps = Vec::new();
    for svc in cfg.services.iter().rev() {
        if resources.iter().any(|r| svc.uses(&r.name)) {
            steps.push(Step::StopService(svc));
        }
    }
    for &r in resources.iter().rev() {
        steps.push(Step::Unmount(r));
        steps.push(Step::Detach(r));
        steps.push(Step::Role(r, false));
    }
    steps
}

/// The environment of the attach/detach hooks.
pub fn hook_cmd(res: &Resource, script: &str, timeout: Duration) -> Cmd {
    Cmd::shell(script)
        .env("TANDEM_RESOURCE", &res.name)
        .env("TANDEM_NBD", res.nbd.display().to_string())
        .env("TANDEM_DEVICE", res.device.display().to_string())
        .timeout(Some(timeout))
}

impl<'a> Step<'a> {
    pub fn resource(&self) -> Option<&'a Resource> {
        match *self {
            Step::Role(r, _)
            | Step::Attach(r)
            | Step::WaitDevice(r)
            | Step::Fsck(r)
            | Step::Mkdir(r)
            | Step::Mount(r)
            | Step::Unmount(r)
            | Step::Detach(r) => Some(r),
            Step::StartService(_) | Step::StopService(_) => None,
        }
    }

    /// What the log calls this step.
    pub fn label(&self) -> String {
        match *self {
            Step::Role(_, p) => format!("role {}", if p { "primary" } else { "secondary" }),
            Step::Attach(_) => "attach hook".into(),
            Step::Detach(_) => "detach hook".into(),
            Step::WaitDevice(r) => format!("wait for {}", r.device.display()),
            Step::Fsck(r) => match fs::fsck_for(r.fsck, r.fstype, &r.device) {
                Some(f) => f.cmd.line(),
                None => "fsck".into(),
            },
            Step::Mkdir(r) => format!("mkdir {}", mp(r)),
            Step::Mount(r) => match &r.pool {
                Some(p) => format!("import pool {p}"),
                None => format!("mount {} on {} ({})", r.device.display(), mp(r), r.fstype),
            },
            Step::Unmount(r) => match &r.pool {
                Some(p) => format!("export pool {p}"),
                None => format!("unmount {}", mp(r)),
            },
            Step::StartService(s) => format!("start service {}", s.name),
            Step::StopService(s) => format!("stop service {}", s.name),
        }
    }

    /// The command lines or actions this step stands for (`--dry-run`); empty: nothing to do.
    pub fn lines(&self, cfg: &Config, role: &RoleCtx) -> Vec<String> {
        let t = cfg.switch.command_timeout;
        match *self {
            Step::Role(r, true) => backend::for_resource(cfg, r).promote_plan(role),
            Step::Role(r, false) => backend::for_resource(cfg, r).demote_plan(role),
            Step::Attach(r) => r.attach.iter().map(|h| hook_cmd(r, h, t).line()).collect(),
            Step::Detach(r) => r.detach.iter().map(|h| hook_cmd(r, h, t).line()).collect(),
            Step::WaitDevice(r) => vec![format!(
                "wait for {} (up to {})",
                r.device.display(),
                format_duration(cfg.switch.device_timeout)
            )],
            Step::Fsck(r) => fs::fsck_for(r.fsck, r.fstype, &r.device)
                .map(|f| f.cmd.line())
                .into_iter()
                .collect(),
            Step::Mkdir(r) => match (&r.pool, &r.mountpoint) {
                (None, Some(m)) => vec![format!(
                    "mkdir -p {}",
                    crate::host::cmd::quote(&m.display().to_string())
                )],
                _ => Vec::new(),
            },
            Step::Mount(r) => vec![match (&r.pool, &r.mountpoint) {
                (Some(p), _) => zfs::import_cmd(p, &r.device, t).line(),
                (None, Some(m)) => mount_cmd(r, m).line(),
                (None, None) => return Vec::new(),
            }],
            Step::Unmount(r) => vec![match (&r.pool, &r.mountpoint) {
                (Some(p), _) => zfs::export_cmd(p, t).line(),
                (None, Some(m)) => format!(
                    "umount {}    # if busy: TERM, then KILL the processes holding it within {}, then umount -f",
                    crate::host::cmd::quote(&m.display().to_string()),
                    format_duration(cfg.switch.stop_timeout)
                ),
                (None, None) => return Vec::new(),
            }],
            Step::StartService(s) => vec![service::start_cmd(s, t).line()],
            Step::StopService(s) => vec![service::stop_cmd(s, t).line()],
        }
    }
}

pub fn mount_cmd(r: &Resource, mp: &Path) -> Cmd {
    fs::mount_cmd(r.fstype, &r.mount_options, &r.device, mp)
}

fn mp(r: &Resource) -> String {
    r.mountpoint
        .as_ref()
        .map(|m| m.display().to_string())
        .unwrap_or_else(|| "-".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;

    const CFG: &str = r#"
node = "s1"
[switch]
delay = "3s"
[[service]]
name = "samba_server"
manager = "rc"
[[service]]
name = "nfs"
manager = "systemd"
unit = "nfs-server.service"
resources = ["hast0"]
[resource.hast0]
backend = "hast"
mountpoint = "/mnt/hast0"
fstype = "ufs"
mount_options = "noatime"
attach = "logger attached"
[resource.tank]
backend = "drbd"
fstype = "zfs"
pool = "tank"
"#;

    fn lines(cfg: &Config, steps: &[Step]) -> Vec<String> {
        let role = RoleCtx {
            role_timeout: cfg.switch.role_timeout,
            command_timeout: cfg.switch.command_timeout,
            force: false,
        };
        steps.iter().flat_map(|s| s.lines(cfg, &role)).collect()
    }

    #[test]
    fn promote_reads_as_the_seed_script_did() {
        let cfg = parse(Path::new("t.toml"), CFG, None).unwrap();
        let all: Vec<&Resource> = cfg.resources.iter().collect();
        let l = lines(&cfg, &promote(&cfg, &all));
        let expected = [
            "hastctl list hast0    # refuse stale or split-brain data",
            "wait until no \"hastd: hast0 (secondary)\" process runs (up to 20s)",
            "hastctl role primary hast0",
            "logger attached",
            "wait for /dev/hast/hast0 (up to 30s)",
            "fsck -p -y -t ufs /dev/hast/hast0",
            "mkdir -p /mnt/hast0",
            "mount -t ufs -o noatime /dev/hast/hast0 /mnt/hast0",
            "drbdsetup status tank --json    # refuse unless the local disk is UpToDate; wait up to 20s while a peer is Primary",
            "drbdadm primary tank",
            "wait for /dev/drbd/by-res/tank/0 (up to 30s)",
            "zpool import -o cachefile=none -d /dev/drbd/by-res/tank/0 -f tank",
            "service samba_server onestart",
            "systemctl start nfs-server.service",
        ];
        assert_eq!(l, expected);
    }

    #[test]
    fn demote_is_the_reverse() {
        let cfg = parse(Path::new("t.toml"), CFG, None).unwrap();
        let all: Vec<&Resource> = cfg.resources.iter().collect();
        let l = lines(&cfg, &demote(&cfg, &all));
        assert_eq!(l[0], "systemctl stop nfs-server.service");
        assert_eq!(l[1], "service samba_server onestop");
        assert_eq!(l[2], "zpool export tank");
        assert_eq!(l[3], "drbdadm secondary tank");
        assert!(l[4].starts_with("umount /mnt/hast0    # if busy: TERM, then KILL"));
        assert_eq!(l[5], "hastctl role secondary hast0");
        assert_eq!(l.len(), 6);
        // Demoting only the pool stops the services that use it, not nfs.
        let tank = vec![cfg.resource("tank").unwrap()];
        let l = lines(&cfg, &demote(&cfg, &tank));
        assert_eq!(l[0], "service samba_server onestop");
    }

    #[test]
    fn no_filesystem_no_fsck_and_no_wait_for_a_bare_export() {
        let text = "node = \"a\"\n[resource.raw]\nbackend = \"hast\"\n\
                    [resource.r0]\nbackend = \"tandem\"\n\
                    [resource.r0.on.a]\nlocal = \"/x\"\nremote = \"10.0.0.2\"\n\
                    [resource.r0.on.b]\nlocal = \"/x\"\nremote = \"10.0.0.1\"\n";
        let cfg = parse(Path::new("t.toml"), text, None).unwrap();
        let all: Vec<&Resource> = cfg.resources.iter().collect();
        let l = lines(&cfg, &promote(&cfg, &all));
        assert!(l.iter().all(|l| !l.contains("fsck")), "{l:?}");
        let waits: Vec<&String> = l.iter().filter(|l| l.starts_with("wait for ")).collect();
        assert_eq!(waits.len(), 1, "{l:?}");
        assert!(waits[0].starts_with("wait for /dev/hast/raw "), "{l:?}");
    }
}
