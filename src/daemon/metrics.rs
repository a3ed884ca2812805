//! Prometheus metrics: the cheap atomic histograms the data path records into, the text
//! exposition of every resource's state and counters, and the small HTTP responder that serves
//! it at `/metrics` when `[metrics] listen` is set.
//!
//! The responder is a fixed HTTP/1.1 answer on its own thread, not a web framework: one GET
//! per connection, a bounded request size, a read timeout and a bounded number of connections
//! (see `serve`). Recording never takes a lock: a histogram is an array of atomic counters.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};

use super::control::ResourceStatus;

/// Upper bounds of the latency buckets, in seconds (100 µs to 10 s; +Inf is implicit).
const BOUNDS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];
/// The same bounds in nanoseconds, for the comparison on the recording side.
const BOUNDS_NS: [u64; 16] = [
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];

/// A latency histogram: per-bucket counts (not cumulative), the count and the sum, each an
/// atomic; `observe` is a few relaxed additions.
#[derive(Default)]
pub struct Histogram {
    buckets: [AtomicU64; BOUNDS.len() + 1],
    count: AtomicU64,
    sum_ns: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let i = BOUNDS_NS
            .iter()
            .position(|&b| ns <= b)
            .unwrap_or(BOUNDS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// A timer that records into this histogram when dropped.
    pub fn start(&self) -> Timer<'_> {
        Timer(self, Instant::now())
    }

    /// Append the `_bucket`, `_sum` and `_count` lines of `name` with `labels` (`a="b",…`).
    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        let sep = if labels.is_empty() { "" } else { "," };
        for (i, b) in self.buckets.iter().enumerate() {
            cumulative += b.load(Ordering::Relaxed);
            let le = match BOUNDS.get(i) {
                Some(v) => format!("{v}"),
                None => "+Inf".into(),
            };
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {cumulative}"
            );
        }
        let sum = self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        // The count is the +Inf bucket's, so the exposition is consistent even while requests
        // complete during the scrape.
        let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
        let _ = writeln!(out, "{name}_count{{{labels}}} {cumulative}");
    }
}

/// See [`Histogram::start`].
pub struct Timer<'a>(&'a Histogram, Instant);

impl Drop for Timer<'_> {
    fn drop(&mut self) {
        self.0.observe(self.1.elapsed());
    }
}

/// The kinds of request the export answers, as the `op` label.
#[derive(Clone, Copy)]
pub enum Op {
    Read,
    Write,
    Flush,
    Trim,
    WriteZeroes,
}

const OPS: [(Op, &str); 5] = [
    (Op::Read, "read"),
    (Op::Write, "write"),
    (Op::Flush, "flush"),
    (Op::Trim, "trim"),
    (Op::WriteZeroes, "write_zeroes"),
];

/// What a resource records for the metrics beyond `state::Counters`.
#[derive(Default)]
pub struct ResourceMetrics {
    /// Time the replicated device took per request (local I/O and the wait for the peer).
    pub requests: [Histogram; 5],
    /// From queueing a modifying request to the peer to its acknowledgement as written.
    pub round_trip: Histogram,
    /// Times the replication link came up (primary: connected; secondary: session started).
    pub links_established: AtomicU64,
    /// Times the replication link went down.
    pub links_lost: AtomicU64,
    /// Unix time at which the resource was last seen in sync with its peer (0: never since
    /// the daemon started).
    pub last_in_sync: AtomicU64,
}

impl ResourceMetrics {
    pub fn request(&self, op: Op) -> &Histogram {
        &self.requests[op as usize]
    }

    pub fn mark_in_sync_now(&self) {
        self.last_in_sync
            .store(unix_now() as u64, Ordering::Relaxed);
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The last switch event as `tandem switch` recorded it (see `switch::lock`).
pub struct SwitchRecord {
    pub seq: u64,
    /// master | slave
    pub event: String,
    /// ok | failed
    pub result: String,
    pub ended_unix: f64,
    pub seconds: f64,
    /// An event is being applied right now.
    pub running: bool,
}

/// One resource for the exposition: its status and, when it runs, its recorded metrics.
pub struct Sample<'a> {
    pub status: ResourceStatus,
    pub metrics: Option<&'a ResourceMetrics>,
}

/// Label values are quoted strings: escape backslash, quote and newline.
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

struct Family<'a> {
    out: &'a mut String,
}

impl Family<'_> {
    fn head(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }
}

/// The text exposition (format 0.0.4) of `resources` and the last switch event.
pub fn render(node: &str, resources: &[Sample<'_>], switch: Option<&SwitchRecord>) -> String {
    let mut out = String::with_capacity(16 << 10);
    let mut f = Family { out: &mut out };
    f.head(
        "tandem_build_info",
        "gauge",
        "The tandem version and this node's name (always 1).",
    );
    let _ = writeln!(
        f.out,
        "tandem_build_info{{version=\"{}\",node=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION"),
        esc(node)
    );
    let lbl = |s: &ResourceStatus| format!("resource=\"{}\"", esc(&s.name));

    f.head(
        "tandem_resource_up",
        "gauge",
        "1 if the resource runs in the daemon, 0 if it could not start (see the log).",
    );
    for r in resources {
        let up = u8::from(r.status.error.is_none());
        let _ = writeln!(f.out, "tandem_resource_up{{{}}} {up}", lbl(&r.status));
    }
    type GetStr = fn(&ResourceStatus) -> &str;
    let enums: [(&str, &str, &[&str], GetStr); 3] = [
        (
            "tandem_role",
            "The resource's role on this node: 1 for the current one.",
            &["init", "primary", "secondary", "unknown"],
            |s| &s.role,
        ),
        (
            "tandem_connection_state",
            "The replication link's state: 1 for the current one.",
            &["connected", "connecting", "disconnected", "n/a"],
            |s| &s.connection,
        ),
        (
            "tandem_sync_state",
            "The replication state: 1 for the current one.",
            &[
                "complete",
                "degraded",
                "syncing",
                "split-brain",
                "diskless",
                "n/a",
            ],
            |s| &s.state,
        ),
    ];
    for (name, help, values, get) in enums {
        let label = match name {
            "tandem_role" => "role",
            _ => "state",
        };
        f.head(name, "gauge", help);
        for r in resources {
            for v in values {
                let on = u8::from(get(&r.status) == *v);
                let _ = writeln!(f.out, "{name}{{{},{label}=\"{v}\"}} {on}", lbl(&r.status));
            }
        }
    }
    type Get = fn(&ResourceStatus) -> f64;
    let gauges: [(&str, &str, Get); 10] = [
        (
            "tandem_split_brain",
            "1 while the resource is in split-brain (tandem resolve ends it).",
            |s| f64::from(u8::from(s.state == "split-brain")),
        ),
        (
            "tandem_stale",
            "1 if this node's data must not be promoted (older or incomplete).",
            |s| f64::from(u8::from(s.stale)),
        ),
        (
            "tandem_dirty_bytes",
            "Bytes marked dirty: to be resynced to (or written on) the peer.",
            |s| s.dirty_bytes as f64,
        ),
        (
            "tandem_data_size_bytes",
            "Size of the replicated data region (what the export serves).",
            |s| s.data_size as f64,
        ),
        (
            "tandem_sync_progress_ratio",
            "Progress of the running resync, 0 to 1 (1 when complete).",
            |s| s.sync_progress,
        ),
        (
            "tandem_sync_total_bytes",
            "Bytes the running (or last) resync has to copy.",
            |s| s.sync_bytes_total as f64,
        ),
        (
            "tandem_sync_done_bytes",
            "Bytes the running (or last) resync has copied.",
            |s| s.sync_bytes_done as f64,
        ),
        (
            "tandem_sync_rate_bytes_per_second",
            "Average rate of the running resync (0 when none runs).",
            |s| s.sync_rate_bps as f64,
        ),
        (
            "tandem_local_generation",
            "This node's data generation (metadata local_gen).",
            |s| s.local_gen as f64,
        ),
        (
            "tandem_peer_generation",
            "The peer's data generation as last seen (metadata peer_gen).",
            |s| s.peer_gen as f64,
        ),
    ];
    for (name, help, get) in gauges {
        f.head(name, "gauge", help);
        for r in resources {
            let _ = writeln!(f.out, "{name}{{{}}} {}", lbl(&r.status), get(&r.status));
        }
    }
    let counters: [(&str, &str, Get); 4] = [
        (
            "tandem_read_bytes_total",
            "Bytes read through the export.",
            |s| s.counters.bytes_read as f64,
        ),
        (
            "tandem_written_bytes_total",
            "Bytes written through the export.",
            |s| s.counters.bytes_written as f64,
        ),
        (
            "tandem_replicated_bytes_total",
            "Bytes of application writes the peer acknowledged as written.",
            |s| s.counters.bytes_replicated as f64,
        ),
        (
            "tandem_resynced_bytes_total",
            "Bytes sent (primary) or received (secondary) by resyncs.",
            |s| s.counters.bytes_resynced as f64,
        ),
    ];
    for (name, help, get) in counters {
        f.head(name, "counter", help);
        for r in resources {
            let _ = writeln!(f.out, "{name}{{{}}} {}", lbl(&r.status), get(&r.status));
        }
    }
    f.head(
        "tandem_requests_total",
        "counter",
        "Requests received by the export, by kind (write counts write_zeroes too).",
    );
    for r in resources {
        let c = &r.status.counters;
        for (op, n) in [
            ("read", c.reads),
            ("write", c.writes),
            ("flush", c.flushes),
            ("trim", c.trims),
        ] {
            let _ = writeln!(
                f.out,
                "tandem_requests_total{{{},op=\"{op}\"}} {n}",
                lbl(&r.status)
            );
        }
    }
    f.head(
        "tandem_request_duration_seconds",
        "histogram",
        "Time the replicated device took to complete a request: local I/O and the wait for the peer as the replication mode says.",
    );
    for r in resources {
        if let Some(m) = r.metrics {
            for (op, name) in OPS {
                m.request(op).render(
                    f.out,
                    "tandem_request_duration_seconds",
                    &format!("{},op=\"{name}\"", lbl(&r.status)),
                );
            }
        }
    }
    f.head(
        "tandem_replication_round_trip_seconds",
        "histogram",
        "Time from queueing a modifying request to the peer to its acknowledgement as written.",
    );
    for r in resources {
        if let Some(m) = r.metrics {
            m.round_trip.render(
                f.out,
                "tandem_replication_round_trip_seconds",
                &lbl(&r.status),
            );
        }
    }
    type GetM = fn(&ResourceMetrics) -> u64;
    let link: [(&str, &str, &str, GetM); 3] = [
        (
            "tandem_link_established_total",
            "counter",
            "Times the replication link came up; its increase counts reconnects.",
            |m| m.links_established.load(Ordering::Relaxed),
        ),
        (
            "tandem_link_lost_total",
            "counter",
            "Times the replication link went down.",
            |m| m.links_lost.load(Ordering::Relaxed),
        ),
        (
            "tandem_last_in_sync_timestamp_seconds",
            "gauge",
            "Unix time the resource was last in sync with its peer (0: not since the daemon started).",
            |m| m.last_in_sync.load(Ordering::Relaxed),
        ),
    ];
    for (name, kind, help, get) in link {
        f.head(name, kind, help);
        for r in resources {
            if let Some(m) = r.metrics {
                let _ = writeln!(f.out, "{name}{{{}}} {}", lbl(&r.status), get(m));
            }
        }
    }
    if let Some(sw) = switch {
        f.head(
            "tandem_switch_last_info",
            "gauge",
            "The last finished switch event (event master|slave, result ok|failed); always 1.",
        );
        let _ = writeln!(
            f.out,
            "tandem_switch_last_info{{event=\"{}\",result=\"{}\"}} 1",
            esc(&sw.event),
            esc(&sw.result)
        );
        let rows: [(&str, &str, f64); 5] = [
            (
                "tandem_switch_last_sequence",
                "Sequence number of the last finished switch event.",
                sw.seq as f64,
            ),
            (
                "tandem_switch_last_success",
                "1 if the last finished switch event succeeded.",
                f64::from(u8::from(sw.result == "ok")),
            ),
            (
                "tandem_switch_last_duration_seconds",
                "How long the last finished switch event took (lock wait and settle delay included).",
                sw.seconds,
            ),
            (
                "tandem_switch_last_end_timestamp_seconds",
                "Unix time the last finished switch event ended.",
                sw.ended_unix,
            ),
            (
                "tandem_switch_running",
                "1 while a switch event is being applied.",
                f64::from(u8::from(sw.running)),
            ),
        ];
        for (name, help, v) in rows {
            f.head(name, "gauge", help);
            let _ = writeln!(f.out, "{name} {v}");
        }
    }
    out
}

/// Simultaneous scrape connections; more are answered 503 and closed.
const MAX_CONNECTIONS: usize = 8;
/// A request line and headers longer than this are refused (431).
const MAX_REQUEST: usize = 8 << 10;
/// The whole request must arrive, and the answer be taken, within this time.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Serve `GET /metrics` on `addr` with what `render` returns, until `stop`.
pub fn serve(
    addr: SocketAddr,
    render: Arc<dyn Fn() -> String + Send + Sync>,
    stop: Arc<AtomicBool>,
) -> Result<JoinHandle<()>> {
    let listener =
        TcpListener::bind(addr).with_context(|| format!("binding the metrics listener {addr}"))?;
    listener
        .set_nonblocking(true)
        .with_context(|| format!("metrics listener {addr}"))?;
    log::info!("metrics on http://{addr}/metrics");
    let live = Arc::new(AtomicUsize::new(0));
    thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            while !stop.load(Ordering::Acquire) {
                match listener.accept() {
                    Ok((mut stream, _)) => {
                        if live.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
                            live.fetch_sub(1, Ordering::AcqRel);
                            let _ = stream.set_nonblocking(false);
                            let _ = stream.set_write_timeout(Some(Duration::from_millis(200)));
                            let _ = respond(&mut stream, "503 Service Unavailable", "busy\n");
                            continue;
                        }
                        let (r, l) = (Arc::clone(&render), Arc::clone(&live));
                        let spawned =
                            thread::Builder::new()
                                .name("metrics-conn".into())
                                .spawn(move || {
                                    let mut stream = stream;
                                    answer(&mut stream, &*r);
                                    // The slot is free before the client sees the close.
                                    l.fetch_sub(1, Ordering::AcqRel);
                                    drop(stream);
                                });
                        if spawned.is_err() {
                            live.fetch_sub(1, Ordering::AcqRel);
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        {
                            // Until a connection waits, or a while to look at the stop flag.
                            let _ = super::channel::poll_readable(
                                &listener,
                                super::channel::STOP_CHECK,
                            );
                        }
                    }
                    Err(e) => {
                        log::warn!("metrics listener: {e}");
                        thread::sleep(Duration::from_millis(100));
                    }
                }
            }
        })
        .context("starting the metrics thread")
}

/// Read one request (up to the blank line) and answer it; the connection then closes.
fn answer(stream: &mut TcpStream, render: &(dyn Fn() -> String + Send + Sync)) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
    let deadline = Instant::now() + IO_TIMEOUT;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let complete = loop {
        if buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n") {
            break true;
        }
        if buf.len() > MAX_REQUEST {
            let _ = respond(
                stream,
                "431 Request Header Fields Too Large",
                "request too large\n",
            );
            return;
        }
        if Instant::now() >= deadline {
            break false;
        }
        match stream.read(&mut chunk) {
            Ok(0) => break false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break false,
        }
    };
    if !complete {
        return;
    }
    let line = buf.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET" | "HEAD", "/metrics") => {
            let body = render();
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes());
            if method == "GET" {
                let _ = stream.write_all(body.as_bytes());
            }
        }
        ("GET" | "HEAD", _) => {
            let _ = respond(stream, "404 Not Found", "try /metrics\n");
        }
        _ => {
            let _ = respond(stream, "405 Method Not Allowed", "GET only\n");
        }
    }
}

fn respond(stream: &mut TcpStream, status: &str, body: &str) -> std::io::Result<()> {
    let text = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_count_every_observation() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(50));
        h.observe(Duration::from_micros(100));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(60));
        let mut out = String::new();
        h.render(&mut out, "x", "resource=\"r0\"");
        assert!(
            out.contains("x_bucket{resource=\"r0\",le=\"0.0001\"} 2\n"),
            "{out}"
        );
        assert!(
            out.contains("x_bucket{resource=\"r0\",le=\"0.0025\"} 2\n"),
            "{out}"
        );
        assert!(
            out.contains("x_bucket{resource=\"r0\",le=\"0.005\"} 3\n"),
            "{out}"
        );
        assert!(
            out.contains("x_bucket{resource=\"r0\",le=\"10\"} 3\n"),
            "{out}"
        );
        assert!(
            out.contains("x_bucket{resource=\"r0\",le=\"+Inf\"} 4\n"),
            "{out}"
        );
        assert!(out.contains("x_count{resource=\"r0\"} 4\n"), "{out}");
        assert!(out.contains("x_sum{resource=\"r0\"} 60.00315\n"), "{out}");
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(esc("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    fn get(addr: SocketAddr, req: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(req).unwrap();
        let mut text = String::new();
        let _ = s.read_to_string(&mut text);
        text
    }

    #[test]
    fn the_responder_answers_metrics_and_refuses_the_rest() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let stop = Arc::new(AtomicBool::new(false));
        let t = serve(
            addr,
            Arc::new(|| "tandem_x 1\n".to_string()),
            Arc::clone(&stop),
        )
        .unwrap();
        let ok = get(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.ends_with("\r\n\r\ntandem_x 1\n"), "{ok}");
        assert!(get(addr, b"GET / HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404"));
        assert!(get(addr, b"POST /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 405"));
        let big = format!(
            "GET /metrics HTTP/1.1\r\nX: {}\r\n\r\n",
            "a".repeat(20 << 10)
        );
        assert!(get(addr, big.as_bytes()).starts_with("HTTP/1.1 431"));
        // Idle connections up to the bound hold their slot; the next one is told busy, and a
        // slot frees when an idle client times out.
        let idle: Vec<TcpStream> = (0..MAX_CONNECTIONS)
            .map(|_| TcpStream::connect(addr).unwrap())
            .collect();
        thread::sleep(Duration::from_millis(300));
        assert!(get(addr, b"GET /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 503"));
        thread::sleep(IO_TIMEOUT + Duration::from_secs(1));
        assert!(get(addr, b"GET /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 200"));
        drop(idle);
        stop.store(true, Ordering::Release);
        t.join().unwrap();
    }
}
