//! Logging to syslog (facility and tag from the config) and to stderr, one line per event.

use std::io::Write;
use std::sync::Mutex;

use log::{LevelFilter, Log, Metadata, Record};
use syslog::Facility;

use crate::config::LogConfig;

pub fn parse_facility(name: &str) -> Option<Facility> {
    name.parse::<Facility>().ok()
}

struct Logger {
    syslog: Option<Mutex<syslog::Logger<syslog::LoggerBackend, syslog::Formatter3164>>>,
    stderr_level: LevelFilter,
}

impl Log for Logger {
    fn enabled(&self, _: &Metadata) -> bool {
        true
    }

    fn log(&self, record: &Record) {
        let msg = record.args().to_string();
        if record.level() <= self.stderr_level {
            let prefix = match record.level() {
                log::Level::Error => "error: ",
                log::Level::Warn => "warning: ",
                _ => "",
            };
            let _ = writeln!(std::io::stderr().lock(), "tandem: {prefix}{msg}");
        }
        if let Some(s) = &self.syslog {
            if let Ok(mut s) = s.lock() {
                let _ = match record.level() {
                    log::Level::Error => s.err(&msg),
                    log::Level::Warn => s.warning(&msg),
                    log::Level::Info => s.info(&msg),
                    _ => s.debug(&msg),
                };
            }
        }
    }

    fn flush(&self) {}
}

/// Install the logger. `verbose`/`quiet` move the stderr level; syslog gets `cfg.level`.
/// Syslog being unavailable (no /dev/log in a container) is not an error.
pub fn init(cfg: Option<&LogConfig>, verbose: u8, quiet: bool) {
    let file_level: LevelFilter = cfg
        .and_then(|c| c.level.parse().ok())
        .unwrap_or(LevelFilter::Info);
    let stderr_level = if quiet {
        LevelFilter::Warn
    } else {
        match verbose {
            0 => file_level.max(LevelFilter::Info),
            1 => LevelFilter::Debug,
            _ => LevelFilter::Trace,
        }
    };
    let syslog = cfg.and_then(|c| {
        let formatter = syslog::Formatter3164 {
            facility: parse_facility(&c.facility).unwrap_or(Facility::LOG_LOCAL0),
            hostname: None,
            process: c.tag.clone(),
            pid: std::process::id(),
        };
        syslog::unix(formatter).ok().map(Mutex::new)
    });
    let logger = Logger {
        syslog,
        stderr_level,
    };
    if log::set_boxed_logger(Box::new(logger)).is_ok() {
        log::set_max_level(stderr_level.max(file_level));
    }
}
