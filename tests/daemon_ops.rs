//! Operating the daemon: the Prometheus endpoint scraped with curl during a resync and checked
//! by promtool, the contrib/ dashboard and alert rules, the systemd notify protocol on a fake
//! NOTIFY_SOCKET (READY, STATUS, WATCHDOG, STOPPING, and a wedged owner thread that stops the
//! watchdog), the `status --json` fields against their documentation in tandem(8), and the
//! control socket's bounds against oversized requests and idle clients.

mod daemon_common;
mod fault_proxy;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use daemon_common::*;
use fault_proxy::{Fault, FaultProxy};

fn repo(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path)).unwrap()
}

/// Append TOML to a node's configuration (before its daemon starts).
fn append_conf(n: &Node, text: &str) {
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&n.conf)
        .unwrap();
    f.write_all(text.as_bytes()).unwrap();
}

/// Give `n` a metrics listener and its own switch lock; the metrics address.
fn with_metrics(p: &Pair, n: &Node) -> String {
    let addr = format!("{}:{}", n.ip, free_port(n.ip));
    append_conf(
        n,
        &format!(
            "\n[metrics]\nlisten = \"{addr}\"\n\n[switch]\nlock = \"{}/{}.lock\"\n",
            p.dir.path().display(),
            n.name
        ),
    );
    addr
}

/// GET /metrics with curl, a real HTTP client.
fn scrape(addr: &str) -> String {
    let out = Command::new("curl")
        .args(["-sS", "--fail", "--max-time", "10"])
        .arg(format!("http://{addr}/metrics"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "curl {addr}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The value of the sample `series` (name and labels exactly as exposed).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// promtool is in Debian's `prometheus` package; in CI (CI set) it must be there.
fn need_promtool() -> bool {
    if have("promtool") {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "promtool missing in CI: apt-get install prometheus"
    );
    eprintln!("skipping: promtool not installed (apt-get install prometheus)");
    false
}

fn promtool(args: &[&str], stdin: Option<&str>) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        let mut i = child.stdin.take().unwrap();
        if let Some(s) = stdin {
            i.write_all(s.as_bytes()).unwrap();
        }
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// During a resync slowed by a link that stalls most of the time, successive scrapes show the
/// progress moving; promtool accepts the exposition; afterwards the I/O histograms, the
/// replicated bytes and the last switch event are there.
#[test]
fn metrics_show_a_resync_moving_and_pass_promtool() {
    if !need("curl", "curl") || !need("qemu-io", "qemu-utils") {
        return;
    }
    let mut p = Pair::new("fullsync");
    let ma = with_metrics(&p, &p.a);
    let mb = with_metrics(&p, &p.b);
    let proxy = Arc::new(FaultProxy::start(
        format!("{}:{}", p.b.ip, p.b.port).parse().unwrap(),
    ));
    p.route_via("a", proxy.addr);
    // Data that is not zero (zero extents travel as a few bytes): 48 MiB of noise at the
    // start of a's data region, which the initial full sync copies.
    {
        use std::os::unix::fs::FileExt;
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let noise: Vec<u8> = (0..48 << 20)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&p.a.img)
            .unwrap();
        f.write_all_at(&noise, 0).unwrap();
    }
    p.a.start();
    p.b.start();
    p.b.ok(&["role", "secondary", "r0"]);
    // A link that passes 20 ms in every 170: the initial full sync takes seconds.
    let pulsing = Arc::new(AtomicBool::new(true));
    let (px, on) = (Arc::clone(&proxy), Arc::clone(&pulsing));
    let pulser = std::thread::spawn(move || {
        let end = Instant::now() + Duration::from_secs(120);
        while on.load(Ordering::Acquire) && Instant::now() < end {
            px.set(Fault::Stall);
            std::thread::sleep(Duration::from_millis(150));
            px.set(Fault::Pass);
            std::thread::sleep(Duration::from_millis(20));
        }
        px.set(Fault::Pass);
    });
    p.a.ok(&["role", "primary", "r0"]);
    let r = "resource=\"r0\"";
    let mut seen: Vec<f64> = Vec::new();
    let mut during = None;
    let end = Instant::now() + Duration::from_secs(90);
    while Instant::now() < end {
        let text = scrape(&ma);
        let syncing = sample(
            &text,
            &format!("tandem_sync_state{{{r},state=\"syncing\"}}"),
        );
        let done = sample(&text, &format!("tandem_sync_done_bytes{{{r}}}")).unwrap();
        if syncing == Some(1.0) {
            let ratio = sample(&text, &format!("tandem_sync_progress_ratio{{{r}}}")).unwrap();
            assert!((0.0..=1.0).contains(&ratio), "{ratio}");
            if seen.last() != Some(&done) {
                seen.push(done);
            }
            during.get_or_insert(text);
        } else if !seen.is_empty()
            && sample(
                &text,
                &format!("tandem_sync_state{{{r},state=\"complete\"}}"),
            ) == Some(1.0)
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    pulsing.store(false, Ordering::Release);
    pulser.join().unwrap();
    eprintln!("sync bytes done, successive scrapes: {seen:?}");
    // Moving forward within one resync (a link dropped by the stalls restarts it from 0).
    let mut run = 1;
    let mut longest = 1;
    for w in seen.windows(2) {
        run = if w[0] < w[1] { run + 1 } else { 1 };
        longest = longest.max(run);
    }
    assert!(
        longest >= 3,
        "sync progress seen by successive scrapes: {seen:?}"
    );
    p.a.ok(&["wait-sync", "r0", "--timeout", "60s"]);
    p.b.wait_for(30, "secondary complete", |s| s["state"] == "complete");
    let during = during.unwrap();
    assert!(
        during.contains("# TYPE tandem_sync_progress_ratio gauge\n"),
        "{during}"
    );

    // Application I/O and a switch event on b, then the rest of the families.
    p.a.qemu_io_ok(&["write -P 0x5a 0 1M", "read -P 0x5a 0 1M", "flush"]);
    p.b.ok(&["demote", "r0"]);
    let after = scrape(&ma);
    let n = |t: &str, s: &str| sample(t, s).unwrap_or_else(|| panic!("no {s} in\n{t}"));
    assert_eq!(
        n(&after, &format!("tandem_role{{{r},role=\"primary\"}}")),
        1.0
    );
    assert_eq!(
        n(&after, &format!("tandem_role{{{r},role=\"secondary\"}}")),
        0.0
    );
    assert_eq!(
        n(
            &after,
            &format!("tandem_connection_state{{{r},state=\"connected\"}}")
        ),
        1.0
    );
    assert_eq!(
        n(&after, &format!("tandem_sync_progress_ratio{{{r}}}")),
        1.0
    );
    assert_eq!(n(&after, &format!("tandem_split_brain{{{r}}}")), 0.0);
    assert!(n(&after, &format!("tandem_resynced_bytes_total{{{r}}}")) >= (32 << 20) as f64);
    assert!(n(&after, &format!("tandem_written_bytes_total{{{r}}}")) >= (1 << 20) as f64);
    assert!(n(&after, &format!("tandem_replicated_bytes_total{{{r}}}")) >= (1 << 20) as f64);
    assert!(
        n(
            &after,
            &format!("tandem_request_duration_seconds_count{{{r},op=\"write\"}}")
        ) >= 1.0
    );
    assert!(
        n(
            &after,
            &format!("tandem_request_duration_seconds_count{{{r},op=\"read\"}}")
        ) >= 1.0
    );
    assert!(
        n(
            &after,
            &format!("tandem_replication_round_trip_seconds_count{{{r}}}")
        ) >= 1.0
    );
    assert!(n(&after, &format!("tandem_link_established_total{{{r}}}")) >= 1.0);
    assert!(
        n(
            &after,
            &format!("tandem_last_in_sync_timestamp_seconds{{{r}}}")
        ) > 1.7e9
    );
    let b = scrape(&mb);
    assert_eq!(
        n(&b, "tandem_switch_last_info{event=\"slave\",result=\"ok\"}"),
        1.0
    );
    assert_eq!(n(&b, "tandem_switch_last_success"), 1.0);
    assert!(n(&b, "tandem_switch_last_duration_seconds") > 0.0);
    assert_eq!(
        n(&b, &format!("tandem_role{{{r},role=\"secondary\"}}")),
        1.0
    );
    assert!(n(&b, &format!("tandem_resynced_bytes_total{{{r}}}")) >= (32 << 20) as f64);

    if need_promtool() {
        for (what, text) in [("during", &during), ("after", &after), ("b", &b)] {
            let (ok, out) = promtool(&["check", "metrics"], Some(text));
            assert!(ok, "promtool check metrics ({what}): {out}\n{text}");
        }
    }
}

/// contrib/: the alert rules pass `promtool check rules` and name the metrics the daemon
/// exports; the Grafana dashboard is valid JSON whose panels query exported metrics.
#[test]
fn contrib_dashboard_and_alert_rules() {
    let exported: BTreeSet<String> = repo("src/daemon/metrics.rs")
        .lines()
        .filter_map(|l| {
            let l = l.trim().trim_start_matches('"');
            let name = l.split(['"', '{', ' ']).next()?;
            name.starts_with("tandem_").then(|| name.to_string())
        })
        .collect();
    assert!(exported.len() > 20, "{exported:?}");
    let known = |name: &str| {
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        exported.contains(base) || exported.contains(name)
    };
    let names_in = |expr: &str| -> Vec<String> {
        let mut v = Vec::new();
        let mut rest = expr;
        while let Some(i) = rest.find("tandem_") {
            let tail = &rest[i..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            v.push(tail[..end].to_string());
            rest = &tail[end..];
        }
        v
    };
    let rules = repo("contrib/tandem-alerts.yml");
    for alert in [
        "TandemSplitBrain",
        "TandemDisconnected",
        "TandemDegradedTooLong",
        "TandemSyncStalled",
        "TandemDaemonDown",
    ] {
        assert!(rules.contains(&format!("alert: {alert}")), "no {alert}");
    }
    for n in names_in(&rules) {
        assert!(
            known(&n),
            "alert rules use {n}, which the daemon does not export"
        );
    }
    let dash: serde_json::Value = serde_json::from_str(&repo("contrib/grafana-dashboard.json"))
        .expect("contrib/grafana-dashboard.json is not valid JSON");
    let panels = dash["panels"].as_array().expect("panels");
    assert!(panels.len() >= 8, "{} panels", panels.len());
    let mut queried = 0;
    for panel in panels {
        for t in panel["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().expect("target expr");
            for n in names_in(expr) {
                assert!(
                    known(&n),
                    "dashboard queries {n}, which the daemon does not export"
                );
                queried += 1;
            }
        }
    }
    assert!(queried >= 8, "{queried}");
    if need_promtool() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/tandem-alerts.yml");
        let (ok, out) = promtool(&["check", "rules", path.to_str().unwrap()], None);
        assert!(ok, "promtool check rules: {out}");
    }
}

/// A fake systemd: a datagram socket as NOTIFY_SOCKET.
struct FakeSystemd {
    sock: UnixDatagram,
    seen: Vec<String>,
}

impl FakeSystemd {
    fn new(dir: &Path) -> (FakeSystemd, String) {
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        (
            FakeSystemd {
                sock,
                seen: Vec::new(),
            },
            path.display().to_string(),
        )
    }

    /// Datagrams until one contains `what` (bounded by `secs`); the datagram.
    fn until(&mut self, what: &str, secs: u64) -> String {
        let end = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < end {
            if let Some(m) = self.next(Duration::from_millis(500)) {
                if m.contains(what) {
                    return m;
                }
            }
        }
        panic!("no {what:?} within {secs}s; seen {:?}", self.seen);
    }

    fn next(&mut self, wait: Duration) -> Option<String> {
        self.sock.set_read_timeout(Some(wait)).unwrap();
        let mut buf = [0u8; 4096];
        let n = self.sock.recv(&mut buf).ok()?;
        let m = String::from_utf8_lossy(&buf[..n]).into_owned();
        self.seen.push(m.clone());
        Some(m)
    }

    /// Every datagram for `d`.
    fn during(&mut self, d: Duration) -> Vec<String> {
        let end = Instant::now() + d;
        let mut v = Vec::new();
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            if let Some(m) = self.next(left.max(Duration::from_millis(1))) {
                v.push(m);
            }
        }
        v
    }
}

/// READY=1, STATUS lines that follow the resource, WATCHDOG=1 at a quarter of
/// WATCHDOG_USEC, STOPPING=1; with the faults build also a wedged owner thread, which stops
/// the watchdog until it answers again.
#[test]
fn systemd_notify_status_watchdog_and_stopping() {
    let mut p = Pair::new("fullsync");
    // A wedge is told from a demote waiting for a slow flush on the peer by
    // `flush_timeout`: a short one here, so that the wedge below is found soon.
    p.a.edit_conf(
        "timeout = \"3s\"\n",
        "timeout = \"3s\"\nflush_timeout = \"3s\"\n",
    );
    let (mut sd, path) = FakeSystemd::new(p.dir.path());
    p.a.start_with_env(&[("NOTIFY_SOCKET", &path), ("WATCHDOG_USEC", "400000")]);
    sd.until("READY=1", 10);
    sd.until("STATUS=r0 init disconnected degraded", 10);
    p.b.start();
    p.b.ok(&["role", "secondary", "r0"]);
    p.a.ok(&["role", "primary", "r0"]);
    p.a.ok(&["wait-sync", "r0", "--timeout", "60s"]);
    sd.until("STATUS=r0 primary connected complete", 10);
    let pings = sd.during(Duration::from_secs(1));
    let n = pings.iter().filter(|m| m.contains("WATCHDOG=1")).count();
    // Every 100 ms; a loaded machine may lose a few.
    assert!(n >= 4, "{n} WATCHDOG=1 in a second: {pings:?}");
    #[cfg(feature = "faults")]
    {
        // The owner thread stops answering for 25 s; the harness's timeout is 3 s and the
        // flush_timeout 3 s, so the owner counts as wedged after 2 x 3 s + 3 s + 10 s = 19 s.
        let wedged_at = Instant::now();
        p.a.ok(&["fault", "r0", "wedge-owner", "25"]);
        let said = sd.until("STATUS=owner thread not responding: r0", 25);
        let took = wedged_at.elapsed();
        assert!(
            took >= Duration::from_secs(15),
            "wedged after only {took:?}"
        );
        assert!(!said.contains("WATCHDOG=1"), "{said}");
        let quiet = sd.during(Duration::from_secs(3));
        assert!(
            quiet.iter().all(|m| !m.contains("WATCHDOG=1")),
            "WATCHDOG=1 while wedged: {quiet:?}"
        );
        assert!(p.a.log_contains("watchdog: the owner thread of r0 has not answered", 5));
        // It answers again: the pings and the normal STATUS come back.
        let back = sd.until("STATUS=r0 primary connected complete", 20);
        assert!(back.contains("WATCHDOG=1"), "{back}");
    }
    p.a.stop();
    sd.until("STOPPING=1", 10);
}

/// A demote makes everything durable on the peer first. On a secondary whose fdatasync takes
/// 20 s (slow, not hung: `daemon.flush_timeout` is 30 s) that FLUSH takes 20 s, and the owner
/// thread waits for it. A slow peer disk is not a wedged daemon: the watchdog must go on
/// sending WATCHDOG=1, or systemd would kill the daemon in the middle of the demote.
#[cfg(feature = "faults")]
#[test]
fn a_demote_waiting_for_a_slow_secondary_flush_is_not_a_wedged_owner() {
    let mut p = Pair::new("fullsync");
    let (mut sd, path) = FakeSystemd::new(p.dir.path());
    p.a.start_with_env(&[("NOTIFY_SOCKET", &path), ("WATCHDOG_USEC", "400000")]);
    p.b.start();
    p.b.ok(&["role", "secondary", "r0"]);
    p.a.ok(&["role", "primary", "r0"]);
    p.a.ok(&["wait-sync", "r0", "--timeout", "60s"]);
    sd.until("STATUS=r0 primary connected complete", 10);
    p.a.qemu_io_ok(&["write -P 0x77 0 1M"]);
    p.b.ok(&["fault", "r0", "slow-sync", "20"]);
    let t = Instant::now();
    let conf = p.a.conf.clone();
    let demote = std::thread::spawn(move || {
        run_argv(&[BIN, "-c", conf.to_str().unwrap(), "role", "secondary", "r0"])
    });
    let mut seen = Vec::new();
    while !demote.is_finished() && t.elapsed() < Duration::from_secs(60) {
        seen.extend(sd.during(Duration::from_millis(500)));
    }
    let out = demote.join().unwrap();
    let took = t.elapsed();
    p.b.ok(&["fault", "r0", "clear"]);
    eprintln!("the demote took {took:?}");
    assert!(
        out.status.success(),
        "role secondary: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let wedged: Vec<_> = seen
        .iter()
        .filter(|m| m.contains("not responding"))
        .collect();
    assert!(
        wedged.is_empty(),
        "the watchdog called the owner wedged while it waited for the peer's flush: {wedged:?}\n{}",
        p.a.log_text()
    );
    let last = seen
        .iter()
        .rev()
        .take(20)
        .filter(|m| m.contains("WATCHDOG=1"))
        .count();
    assert!(last >= 10, "WATCHDOG=1 stopped during the demote: {seen:?}");
    assert!(
        took >= Duration::from_secs(15),
        "the demote took {took:?}: it did not wait for b's slow flush, so this test did not test it"
    );
}

/// One status line: the request, and the answer read whole.
fn control_exchange(sock: &Path, req: &[u8]) -> String {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    // A daemon at its connection bound answers "busy" and closes at once, perhaps before
    // the request is written (EPIPE): its answer is still there to read.
    let written = s.write_all(req);
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    assert!(written.is_ok() || !line.is_empty(), "{written:?}");
    line
}

fn rss_kib(pid: u32) -> u64 {
    let st = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    st.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// A 65 KB `status` naming r0 13 000 times is answered with r0 once; 50 such clients that do
/// not read their answers, then 50 idle clients, leave the daemon's memory bounded; clients
/// past the connection bound are told the daemon is busy; it serves again once they leave.
#[test]
fn control_socket_bounds_requests_replies_and_clients() {
    let mut p = Pair::new("fullsync");
    p.a.start();
    let sock = p.a.sock();
    let names = vec!["r0"; 13_000];
    let req = format!(
        "{}\n",
        serde_json::json!({"cmd": "status", "resources": names})
    );
    assert!(req.len() > 64_000 && req.len() < 65_536, "{}", req.len());
    let answer = control_exchange(&sock, req.as_bytes());
    assert!(answer.len() < 4096, "{} bytes", answer.len());
    let v: serde_json::Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(v["resources"].as_array().unwrap().len(), 1, "{answer}");
    assert_eq!(v["resources"][0]["name"], "r0");

    let pid = p.a.child.as_ref().unwrap().id();
    let before = rss_kib(pid);
    let mut unread = Vec::new();
    for _ in 0..50 {
        let mut s = UnixStream::connect(&sock).unwrap();
        // Past the connection bound the daemon answers "busy" and closes at once, perhaps
        // before this is written (EPIPE).
        let _ = s.write_all(req.as_bytes());
        unread.push(s);
    }
    let mut idle = Vec::new();
    for _ in 0..50 {
        idle.push(UnixStream::connect(&sock).unwrap());
    }
    std::thread::sleep(Duration::from_secs(2));
    let during = rss_kib(pid);
    eprintln!("daemon VmRSS {before} KiB before, {during} KiB with 100 clients");
    assert!(
        during < before + 64 * 1024,
        "VmRSS {before} KiB -> {during} KiB with 100 clients"
    );
    // The unread answers are small and whole.
    for s in unread.iter_mut().take(5) {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut line = String::new();
        BufReader::new(&*s).read_line(&mut line).unwrap();
        assert!(line.len() < 4096 && line.contains("\"r0\""), "{line}");
    }
    // Idle clients hold every slot (some of the first 50 may have been refused while the
    // unread ones were still being answered: add more); the next client hears why it is
    // refused.
    for _ in 0..40 {
        idle.push(UnixStream::connect(&sock).unwrap());
    }
    std::thread::sleep(Duration::from_millis(500));
    let busy = control_exchange(&sock, b"{\"cmd\":\"status\"}\n");
    assert!(busy.contains("the daemon is busy"), "{busy}");
    // The CLI says so too, though the daemon may close before the request is written (a
    // role change: `status` shows what it can instead of failing).
    for _ in 0..5 {
        let out = p.a.run(&["role", "secondary", "r0"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("the daemon is busy"),
            "{:?}: {err}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout)
        );
    }
    drop(idle);
    drop(unread);
    let end = Instant::now() + Duration::from_secs(10);
    while p.a.try_status().is_err() || p.a.try_status().unwrap().is_null() {
        assert!(Instant::now() < end, "no answer after the clients left");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(p.a.status()["name"], "r0");
}

/// The `status --json` fields listed in tandem(8) are exactly those a running pair's
/// `tandem status --json` prints (both directions; fields documented as present only
/// sometimes may be absent).
#[test]
fn status_json_fields_match_the_man_page() {
    let man = repo("man/tandem.8");
    let start = man
        .find(".\\\" status-json-fields-begin")
        .expect("marker in tandem.8");
    let end = man
        .find(".\\\" status-json-fields-end")
        .expect("end marker");
    let mut documented = BTreeSet::new();
    let mut optional = BTreeSet::new();
    let mut current = None;
    for line in man[start..end].lines() {
        if let Some(f) = line.strip_prefix(".It Li ") {
            let f = f.trim().to_string();
            documented.insert(f.clone());
            current = Some(f);
        } else if line.contains("Present only") {
            optional.insert(current.clone().expect("a field before its text"));
        }
    }
    assert!(documented.len() > 30, "{documented:?}");

    let mut p = synced_pair("fullsync");
    append_conf(
        &p.a,
        "\n[[service]]\nname = \"fake\"\nmanager = \"command\"\nstart = \"true\"\nstop = \"true\"\nstatus = \"true\"\n",
    );
    let out = p.a.run(&["status", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["version"], 1, "{v}");
    let mut printed = BTreeSet::new();
    fn walk(v: &serde_json::Value, prefix: &str, out: &mut BTreeSet<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, x) in m {
                    let path = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    out.insert(path.clone());
                    walk(x, &path, out);
                }
            }
            serde_json::Value::Array(a) => {
                for x in a {
                    walk(x, &format!("{prefix}[]"), out);
                }
            }
            _ => {}
        }
    }
    walk(&v, "", &mut printed);
    let undocumented: Vec<_> = printed.difference(&documented).collect();
    assert!(
        undocumented.is_empty(),
        "printed but not in tandem(8): {undocumented:?}"
    );
    let missing: Vec<_> = documented
        .difference(&printed)
        .filter(|f| !optional.contains(*f))
        .collect();
    assert!(
        missing.is_empty(),
        "in tandem(8) but not printed: {missing:?}"
    );
    p.a.stop();
    p.b.stop();
}

/// `nbd_tcp` on an address that is not loopback: the daemon refuses to start and says why and
/// what to do; with `nbd_tcp_allow_remote = true` the configuration is accepted.
#[test]
fn nbd_tcp_off_loopback_is_refused_unless_allowed() {
    let p = Pair::new("fullsync");
    let text = std::fs::read_to_string(&p.a.conf).unwrap();
    let nbd_line = format!("nbd = \"{}\"\n", p.a.nbd.display());
    assert!(text.contains(&nbd_line), "{text}");
    let remote = text.replace(
        &nbd_line,
        &format!("{nbd_line}nbd_tcp = \"0.0.0.0:10809\"\n"),
    );
    std::fs::write(&p.a.conf, &remote).unwrap();
    let out = Command::new(BIN)
        .args(["-c", p.a.conf.to_str().unwrap(), "daemon"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("resource \"r0\": nbd_tcp 0.0.0.0:10809 is not a loopback address: the NBD export has no authentication")
            && err.contains("set nbd_tcp_allow_remote = true"),
        "{err}"
    );
    let allowed = remote.replace(
        "nbd_tcp = \"0.0.0.0:10809\"\n",
        "nbd_tcp = \"0.0.0.0:10809\"\nnbd_tcp_allow_remote = true\n",
    );
    std::fs::write(&p.a.conf, allowed).unwrap();
    let out = p.a.run(&["check-config"]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("nbd_tcp_allow_remote = true"));
}
