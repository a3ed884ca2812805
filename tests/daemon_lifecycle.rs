//! The daemon as a service: READY=1 to systemd, SIGHUP reloads resources, SIGTERM stops
//! cleanly (export removed, exit status 0).

mod daemon_common;

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use daemon_common::*;

#[test]
fn notify_reload_and_clean_stop() {
    let p = Pair::new("fullsync");
    let notify = p.dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&notify).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let log = std::fs::File::create(&p.a.log).unwrap();
    let mut child = KillOnDrop(
        Command::new(BIN)
            .args(["-c", p.a.conf.to_str().unwrap(), "-v", "daemon"])
            .env("NOTIFY_SOCKET", &notify)
            .stdin(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let mut buf = [0u8; 64];
    let n = sock.recv(&mut buf).expect("no READY=1 from the daemon");
    assert_eq!(&buf[..n], b"READY=1\n");
    assert_eq!(p.a.status()["role"], "init");

    // SIGHUP with a second resource in the file: it appears without a restart.
    let img = p.dir.path().join("a1.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let mut text = std::fs::read_to_string(&p.a.conf).unwrap();
    text.push_str(&format!(
        "\n[resource.r1]\nbackend = \"tandem\"\ndevice = \"/dev/nbd1\"\nnbd = \"{}\"\n[resource.r1.on.a]\nlocal = \"{}\"\nremote = \"127.0.0.3:9\"\n[resource.r1.on.b]\nlocal = \"{}\"\nremote = \"127.0.0.2:9\"\n",
        p.dir.path().join("a1.nbd").display(),
        img.display(),
        img.display()
    ));
    std::fs::write(&p.a.conf, text).unwrap();
    // Without metadata the new resource is reported with the reason; after `create` and
    // another SIGHUP it runs.
    let hup = || {
        Command::new("kill")
            .args(["-HUP", &child.0.id().to_string()])
            .status()
            .unwrap();
    };
    hup();
    wait_status(&p.a, "r1", "no tandem metadata");
    p.a.ok(&["create", "r1"]);
    hup();
    wait_status(&p.a, "r1", "\"role\":\"init\"");
    // A changed link timing is not applied by a reload: the log says so.
    p.a.edit_conf("timeout = \"3s\"\n", "timeout = \"4s\"\n");
    hup();
    assert!(
        p.a.log_contains("busy_poll changed; restart the daemon to apply it", 10),
        "no word of the ignored timeout change: {}",
        p.a.log_text()
    );

    // Primary (peer unreachable: degraded), then SIGTERM: export gone, exit 0.
    p.a.ok(&["role", "primary", "r0"]);
    assert!(p.a.nbd.exists());
    Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .unwrap();
    let end = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < end, "daemon ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "exit status {status}\n{}", p.a.log_text());
    assert!(!p.a.nbd.exists(), "export socket left behind");
    assert!(!p.a.sock().exists(), "control socket left behind");
}

/// The daemon this test started itself: killed if the test fails before it stopped it.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn status_of(n: &Node, res: &str) -> String {
    use std::io::{BufRead, Write};
    let Ok(mut s) = std::os::unix::net::UnixStream::connect(n.sock()) else {
        return String::new();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = s.write_all(format!("{{\"cmd\":\"status\",\"resources\":[\"{res}\"]}}\n").as_bytes());
    let mut line = String::new();
    let _ = std::io::BufReader::new(s).read_line(&mut line);
    line
}

fn wait_status(n: &Node, res: &str, text: &str) {
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let out = status_of(n, res);
        if out.contains(text) {
            return;
        }
        assert!(
            Instant::now() < end,
            "status of {res} never showed {text}: {out}\n{}",
            n.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Lines of the pair's hook log (both daemons write to it) equal to `line`.
fn hook_lines(p: &Pair, line: &str) -> usize {
    hook_log(p).lines().filter(|l| *l == line).count()
}

/// Wait up to 15 s (hooks run asynchronously) for more than `n` hook lines equal to `line`.
fn wait_hook_lines(p: &Pair, line: &str, n: usize) {
    let end = Instant::now() + Duration::from_secs(15);
    while hook_lines(p, line) <= n {
        assert!(
            Instant::now() < end,
            "no new hook line {line:?} in 15 s; hook log:\n{}",
            hook_log(p)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A primary's link closed by its own demote is not a lost peer, and the hook is told:
/// `disconnect r0 demote`. A fencing hook (`tandem ocf disconnect`) took the plain event for
/// a lost peer while the role still read primary, and under Pacemaker placed a constraint
/// forbidding the promotion of the very peer the demote handed over to (cluster lab, the
/// primary's disk failed). A peer that is really lost still gives a plain `disconnect r0`.
#[test]
fn a_demote_tells_the_hook_that_it_closed_the_link_itself() {
    let mut p = synced_pair("fullsync");
    p.a.ok(&["role", "secondary", "r0"]);
    wait_hook_lines(&p, "disconnect r0 demote", 0);
    p.a.ok(&["role", "primary", "r0"]);
    p.a.wait_for(30, "a connected again", |s| s["connection"] == "connected");
    let plain = hook_lines(&p, "disconnect r0");
    p.b.kill9();
    wait_hook_lines(&p, "disconnect r0", plain);
    assert_eq!(
        hook_lines(&p, "disconnect r0 demote"),
        1,
        "{}",
        hook_log(&p)
    );
}
