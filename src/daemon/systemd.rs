//! The systemd service protocol, by hand: `sd_notify` datagrams to `$NOTIFY_SOCKET` (a path,
//! or an abstract socket written `@name`), and the watchdog thread that sends `WATCHDOG=1`
//! only while every resource's owner thread answers pings.
//!
//! `READY=1` once the sockets are open, `STATUS=` with one "RES ROLE CONNECTION STATE" per
//! resource, `WATCHDOG=1` every quarter of `$WATCHDOG_USEC` (when `$WATCHDOG_PID`, if set,
//! is this process), `STOPPING=1` when a stop begins. Without `$NOTIFY_SOCKET` all of it is
//! a no-op.

use std::os::unix::net::UnixDatagram;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// Where notifications go; None without `$NOTIFY_SOCKET`.
pub struct Notifier {
    path: Vec<u8>,
    sock: UnixDatagram,
}

impl Notifier {
    pub fn from_env() -> Option<Notifier> {
        let path = std::env::var_os("NOTIFY_SOCKET")?;
        let path = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str()).to_vec();
        if path.is_empty() {
            return None;
        }
        match UnixDatagram::unbound() {
            Ok(sock) => Some(Notifier { path, sock }),
            Err(e) => {
                log::warn!("NOTIFY_SOCKET: cannot create a socket: {e}");
                None
            }
        }
    }

    /// Send one notification (`KEY=VALUE` lines); a failure is logged, never fatal.
    pub fn send(&self, msg: &str) {
        let sent = if let Some(name) = self.path.strip_prefix(b"@") {
            #[cfg(any(target_os = "linux", target_os = "android"))]
            {
                use std::os::linux::net::SocketAddrExt;
                std::os::unix::net::SocketAddr::from_abstract_name(name)
                    .and_then(|a| self.sock.send_to_addr(msg.as_bytes(), &a))
            }
            #[cfg(not(any(target_os = "linux", target_os = "android")))]
            {
                let _ = name;
                Err(std::io::Error::other("abstract sockets need Linux"))
            }
        } else {
            let p: &std::ffi::OsStr = std::os::unix::ffi::OsStrExt::from_bytes(&self.path);
            self.sock.send_to(msg.as_bytes(), p)
        };
        if let Err(e) = sent {
            log::warn!("NOTIFY_SOCKET {}: {e}", String::from_utf8_lossy(&self.path));
        }
    }
}

/// The watchdog interval systemd asked for: `$WATCHDOG_USEC`, if `$WATCHDOG_PID` is unset or
/// names this process.
pub fn watchdog_interval() -> Option<Duration> {
    interval_for(
        std::env::var("WATCHDOG_USEC").ok().as_deref(),
        std::env::var("WATCHDOG_PID").ok().as_deref(),
        std::process::id(),
    )
}

/// `WATCHDOG_USEC` and `WATCHDOG_PID` as sd_watchdog_enabled(3) reads them, for process `me`.
fn interval_for(usec: Option<&str>, pid: Option<&str>, me: u32) -> Option<Duration> {
    if let Some(pid) = pid
        && pid.parse::<u32>().ok() != Some(me)
    {
        return None;
    }
    let usec: u64 = usec?.parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// Sends a ping to one owner thread, which answers on the given sender when it gets to the
/// message; false when the owner is gone.
pub type Ping = Box<dyn FnOnce(Sender<()>) -> bool + Send>;

/// What the watchdog needs from the daemon.
pub trait Owners: Send + Sync + 'static {
    /// Each running resource with a way to ping its owner thread.
    fn ping(&self) -> Vec<(String, Ping)>;
    /// The `STATUS=` text.
    fn status_line(&self) -> String;
}

/// Start the thread that sends `STATUS=` lines (and `WATCHDOG=1` with `interval`) until
/// `stop`. An owner that has not answered a ping for `bound` is wedged: the thread logs it,
/// says so in `STATUS=`, and stops sending `WATCHDOG=1`, so systemd restarts the daemon.
pub fn start(
    notifier: Arc<Notifier>,
    owners: Arc<dyn Owners>,
    interval: Option<Duration>,
    bound: Duration,
    stop: Arc<AtomicBool>,
) -> std::io::Result<JoinHandle<()>> {
    // systemd's advice: notify at half the interval at least; a quarter leaves room for a
    // loaded machine.
    let tick = interval
        .map(|i| i / 4)
        .unwrap_or(Duration::from_secs(5))
        .max(Duration::from_millis(10));
    thread::Builder::new().name("watchdog".into()).spawn(move || {
        let mut pending: Vec<(String, Instant, Receiver<()>)> = Vec::new();
        let mut wedged_logged: Vec<String> = Vec::new();
        let mut last_status = String::new();
        while !stop.load(Ordering::Acquire) {
            // Answered pings leave; unanswered ones older than `bound` are wedged owners.
            let mut wedged = Vec::new();
            pending.retain(|(name, sent, rx)| match rx.try_recv() {
                Ok(()) | Err(TryRecvError::Disconnected) => false,
                Err(TryRecvError::Empty) => {
                    if sent.elapsed() >= bound {
                        wedged.push(name.clone());
                    }
                    true
                }
            });
            for (name, ping) in owners.ping() {
                if pending.iter().any(|(n, _, _)| *n == name) {
                    continue;
                }
                let (tx, rx) = std::sync::mpsc::channel();
                if ping(tx) {
                    pending.push((name, Instant::now(), rx));
                }
            }
            let status = if wedged.is_empty() {
                wedged_logged.clear();
                owners.status_line()
            } else {
                for w in &wedged {
                    if !wedged_logged.contains(w) {
                        log::error!(
                            "watchdog: the owner thread of {w} has not answered for longer than {}s; no more WATCHDOG=1",
                            bound.as_secs()
                        );
                    }
                }
                wedged_logged = wedged.clone();
                format!("owner thread not responding: {}", wedged.join(", "))
            };
            let mut msg = String::new();
            if status != last_status {
                msg += &format!("STATUS={status}\n");
                last_status = status;
            }
            if interval.is_some() && wedged.is_empty() {
                msg += "WATCHDOG=1\n";
            }
            if !msg.is_empty() {
                notifier.send(&msg);
            }
            // Sleep in small steps so a stop is prompt.
            let until = Instant::now() + tick;
            while Instant::now() < until && !stop.load(Ordering::Acquire) {
                thread::sleep(tick.min(Duration::from_millis(100)));
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    struct FakeOwners {
        /// The owner answers pings while this is false.
        wedged: Arc<AtomicBool>,
        /// Pings a wedged owner took and never answers.
        held: Arc<Mutex<Vec<Sender<()>>>>,
    }

    impl Owners for FakeOwners {
        fn ping(&self) -> Vec<(String, Ping)> {
            let wedged = self.wedged.load(Ordering::Acquire);
            let held = Arc::clone(&self.held);
            vec![(
                "r0".into(),
                Box::new(move |tx: Sender<()>| {
                    if wedged {
                        held.lock().unwrap().push(tx);
                    } else {
                        let _ = tx.send(());
                    }
                    true
                }),
            )]
        }
        fn status_line(&self) -> String {
            "r0 primary connected complete".into()
        }
    }

    /// One datagram, or the socket's read timeout. A signal to the test process interrupts a
    /// receive with a timeout (EINTR, not restarted); that is no answer either way, so retry.
    fn try_recv(s: &UnixDatagram) -> std::io::Result<String> {
        let mut buf = [0u8; 4096];
        loop {
            match s.recv(&mut buf) {
                Ok(n) => return Ok(String::from_utf8_lossy(&buf[..n]).into_owned()),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn recv(s: &UnixDatagram) -> String {
        try_recv(s).unwrap()
    }

    #[test]
    fn the_watchdog_interval_is_for_this_process_only() {
        let s = Some(Duration::from_secs(30));
        assert_eq!(interval_for(Some("30000000"), None, 42), s);
        assert_eq!(interval_for(Some("30000000"), Some("42"), 42), s);
        assert_eq!(interval_for(Some("30000000"), Some("41"), 42), None);
        assert_eq!(interval_for(Some("30000000"), Some("x"), 42), None);
        assert_eq!(interval_for(Some("0"), None, 42), None);
        assert_eq!(interval_for(Some("soon"), None, 42), None);
        assert_eq!(interval_for(None, Some("42"), 42), None);
    }

    #[test]
    fn notifications_reach_a_path_and_an_abstract_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let s = UnixDatagram::bind(&path).unwrap();
        let n = Notifier {
            path: path.as_os_str().as_encoded_bytes().to_vec(),
            sock: UnixDatagram::unbound().unwrap(),
        };
        n.send("READY=1\n");
        assert_eq!(recv(&s), "READY=1\n");
        #[cfg(target_os = "linux")]
        {
            use std::os::linux::net::SocketAddrExt;
            let name = format!("tops-notify-{}", std::process::id());
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(&name).unwrap();
            let a = UnixDatagram::bind_addr(&addr).unwrap();
            let n = Notifier {
                path: format!("@{name}").into_bytes(),
                sock: UnixDatagram::unbound().unwrap(),
            };
            n.send("STOPPING=1\n");
            assert_eq!(recv(&a), "STOPPING=1\n");
        }
    }

    #[test]
    fn a_wedged_owner_stops_the_watchdog_pings() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let s = UnixDatagram::bind(&path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let n = Arc::new(Notifier {
            path: path.as_os_str().as_encoded_bytes().to_vec(),
            sock: UnixDatagram::unbound().unwrap(),
        });
        let wedged = Arc::new(AtomicBool::new(false));
        let owners = Arc::new(FakeOwners {
            wedged: Arc::clone(&wedged),
            held: Arc::new(Mutex::new(Vec::new())),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let t = start(
            n,
            owners,
            Some(Duration::from_millis(200)),
            Duration::from_millis(500),
            Arc::clone(&stop),
        )
        .unwrap();
        let first = recv(&s);
        assert!(
            first.contains("STATUS=r0 primary connected complete\n"),
            "{first}"
        );
        assert!(first.contains("WATCHDOG=1\n"), "{first}");
        for _ in 0..3 {
            assert_eq!(recv(&s), "WATCHDOG=1\n");
        }
        wedged.store(true, Ordering::Release);
        // Within the bound (plus a tick) the pings stop and STATUS says why.
        let deadline = Instant::now() + Duration::from_secs(5);
        let said = loop {
            let m = recv(&s);
            if m.contains("STATUS=owner thread not responding: r0") {
                break m;
            }
            assert!(Instant::now() < deadline, "no wedge status; last {m}");
        };
        assert!(!said.contains("WATCHDOG=1"), "{said}");
        // Nothing more while it stays wedged: no WATCHDOG=1, and the same STATUS is not
        // repeated.
        s.set_read_timeout(Some(Duration::from_millis(600)))
            .unwrap();
        let more = try_recv(&s);
        assert!(more.is_err(), "a datagram after the wedge: {more:?}");
        stop.store(true, Ordering::Release);
        t.join().unwrap();
    }
}
