//! Services: started after the resources are mounted, stopped before they are unmounted,
//! through systemd, FreeBSD rc (service(8)) or the admin's own commands.

use std::time::Duration;

use anyhow::{Context, Result};
use log::warn;

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

/// What `service NAME onestatus` answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RcStatus {
    /// Exit 0, "NAME is running as pid N.".
    Running,
    /// Any other exit below 126: rc.subr prints "NAME is not running." and returns 1; the
    /// status_cmd of ports (pg_ctl status: 3, ...) return other non-zero codes.
    NotRunning,
    /// The rc.d script has no status (no `command`): "unknown directive", exit 1.
    NoStatus,
    /// service(8) found no such script in /etc/rc.d or the local startup directories.
    NoSuchService,
}

/// Interpret `service NAME onestatus`, from FreeBSD's libexec/rc/rc.subr (run_rc_command:
/// `status)` echoes "${name} is running as pid $rc_pid." or "${name} is not running." and
/// returns 1; an rc_arg not in the script's keywords gets `echo 1>&2 "$0: unknown directive
/// '$rc_arg'."`, then rc_usage, exit 1) and usr.sbin/service/service.sh (a missing script:
/// "NAME does not exist in /etc/rc.d or the local startup" on stdout, exit 1). Exit 1 alone
/// is ambiguous; the text tells the cases apart.
pub fn rc_status(code: i32, stdout: &str, stderr: &str) -> Result<RcStatus> {
    Ok(match code {
        0 => RcStatus::Running,
        _ if stdout.contains(" does not exist in /etc/rc.d") => RcStatus::NoSuchService,
        _ if stderr.contains(": unknown directive '") => RcStatus::NoStatus,
        // 126/127: the shell could not run it; 128+N: killed by signal N.
        1..=125 => RcStatus::NotRunning,
        _ => {
            let said = if stderr.trim().is_empty() {
                stdout
            } else {
                stderr
            };
            anyhow::bail!(
                "exited with status {code}: {}",
                said.trim().replace('\n', " | ")
            )
        }
    })
}

/// Is the service running? None when it cannot be asked (no `status` command).
pub fn is_active(svc: &Service, timeout: Duration) -> Result<Option<bool>> {
    let Some(c) = status_cmd(svc, timeout) else {
        return Ok(None);
    };
    let out = c.output()?;
    if svc.manager != Manager::Rc {
        return Ok(Some(out.status.success()));
    }
    let status = rc_status(out.code(), &out.stdout, &out.stderr)
        .with_context(|| format!("`{}`", c.line()))?;
    Ok(match status {
        RcStatus::Running => Some(true),
        RcStatus::NotRunning => Some(false),
        RcStatus::NoStatus => None,
        // As before: not running. Starting it fails with service(8)'s own message.
        RcStatus::NoSuchService => {
            warn!(
                "service {}: `{}` finds no rc.d script of that name",
                svc.name,
                c.line()
            );
            Some(false)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn onestatus_answers() {
        // /etc/rc.d/sshd onestatus, running and stopped (rc.subr run_rc_command).
        let running = rc_status(0, "sshd is running as pid 812.\n", "").unwrap();
        assert_eq!(running, RcStatus::Running);
        let stopped = rc_status(1, "sshd is not running.\n", "").unwrap();
        assert_eq!(stopped, RcStatus::NotRunning);
        // A port's own status_cmd: postgresql's `pg_ctl status` exits 3 when stopped.
        let pg = rc_status(3, "pg_ctl: no server running\n", "").unwrap();
        assert_eq!(pg, RcStatus::NotRunning);
        // service.sh, no such script (FreeBSD 13 and 14 print the same two lines).
        let missing = rc_status(
            1,
            "sambaa does not exist in /etc/rc.d or the local startup\n\
             directories (/usr/local/etc/rc.d), or is not executable\n",
            "",
        )
        .unwrap();
        assert_eq!(missing, RcStatus::NoSuchService);
        // A script without `command` has no status: unknown directive, then rc_usage.
        let none = rc_status(
            1,
            "",
            "/etc/rc.d/hostname: unknown directive 'status'.\n\
             Usage: /etc/rc.d/hostname [fast|force|one|quiet](start|stop|restart|rcvar|enable|disable|delete|enabled|describe|extracommands)\n",
        )
        .unwrap();
        assert_eq!(none, RcStatus::NoStatus);
    }

    #[test]
    fn onestatus_failures() {
        let e = rc_status(
            127,
            "",
            "env: /usr/local/etc/rc.d/samba_server: not found\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("status 127"), "{e}");
        assert!(e.contains("samba_server: not found"), "{e}");
        // Killed by SIGKILL after the timeout.
        let e = rc_status(137, "", "").unwrap_err().to_string();
        assert!(e.contains("status 137"), "{e}");
    }
}
