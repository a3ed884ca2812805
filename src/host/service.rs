//! Services: started after the resources are mounted, stopped before they are unmounted,
//! through systemd, FreeBSD rc (service(8)) or the admin's own commands.

use std::time::Duration;

use anyhow::Result;

use super::cmd::Cmd;
use crate::config::{Manager, Service};

/// The command that starts `svc`.
pub fn start_cmd(svc: &Service, timeout: Duration) -> Cmd {
    action(svc, "start", timeout)
}

/// The command that stops `svc`.
pub fn stop_cmd(svc: &Service, timeout: Duration) -> Cmd {
    action(svc, "stop", timeout)
}

/// The command that asks whether `svc` runs (exit 0: it does); None when the config has none.
pub fn status_cmd(svc: &Service, timeout: Duration) -> Option<Cmd> {
    let unit = svc.unit.clone().unwrap_or_else(|| svc.name.clone());
    let c = match svc.manager {
        Manager::Systemd => Cmd::new("systemctl", &["is-active", "--quiet", &unit]),
        // `onestatus` works whether or not NAME_enable is set in rc.conf.
        Manager::Rc => Cmd::new("service", &[&unit, "onestatus"]),
        Manager::Command => Cmd::shell(svc.status.as_deref()?).env("TANDEM_SERVICE", &svc.name),
    };
    Some(c.timeout(Some(timeout)))
}

fn action(svc: &Service, what: &str, timeout: Duration) -> Cmd {
    let unit = svc.unit.clone().unwrap_or_else(|| svc.name.clone());
    let c = match svc.manager {
        Manager::Systemd => Cmd::new("systemctl", &[what, &unit]),
        // onestart/onestop: tandem, not rc.conf, decides when the service runs.
        Manager::Rc => Cmd::new("service", &[&unit, &format!("one{what}")]),
        Manager::Command => {
            let script = if what == "start" {
                &svc.start
            } else {
                &svc.stop
            };
            Cmd::shell(script.as_deref().unwrap_or("true")).env("TANDEM_SERVICE", &svc.name)
        }
    };
    c.timeout(Some(timeout))
}

/// Is the service running? None when it cannot be asked (no `status` command).
pub fn is_active(svc: &Service, timeout: Duration) -> Result<Option<bool>> {
    match status_cmd(svc, timeout) {
        None => Ok(None),
        Some(c) => Ok(Some(c.output()?.status.success())),
    }
}
