//! The control socket: how `tandem role`, `status`, `resolve`, `wait-sync` and `verify` talk to
//! the daemon. A unix stream socket (mode 0600); one JSON request per line, one JSON response per
//! line. The server side dispatches to the resources' owner threads; the client side is
//! `request` (and `wait_sync` on top of it).

use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

pub use super::Role;

/// How long `wait_sync` lets a split-brain state stand before failing (the primary retries
/// refused connections every 5 s).
const SPLIT_BRAIN_GRACE: Duration = Duration::from_secs(12);

/// A request to the daemon. An empty resource list (or `all`) means every resource.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    Status {
        #[serde(default)]
        resources: Vec<String>,
    },
    Role {
        role: Role,
        #[serde(default)]
        resources: Vec<String>,
        #[serde(default)]
        force: bool,
    },
    /// `resolve RES --discard-local`.
    Resolve { resource: String },
    /// `verify RES [--repair] [--rate SIZE]`: answered when the verify (and repair) is done.
    Verify {
        resource: String,
        #[serde(default)]
        repair: bool,
        /// Bytes hashed per second on each node; absent: the default, 0: unlimited.
        #[serde(default)]
        rate: Option<u64>,
    },
    /// `fault RES ACTION`: inject a disk fault (builds with the `faults` feature only).
    #[cfg(feature = "faults")]
    Fault {
        resource: String,
        action: super::faultdisk::Action,
    },
}

/// Why a request failed; the CLI maps it to an exit status (`exit_code`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorKind {
    /// Local data is older than the peer's, or incomplete: exit 3.
    Stale,
    /// The peer is still primary: exit 3 (after the caller's role_timeout).
    PeerPrimary,
    /// Split-brain: exit 3.
    SplitBrain,
    /// Bad request (unknown resource, resolve on a primary): exit 2.
    Usage,
    /// Anything else: exit 1.
    Failed,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ControlError {
    pub kind: ErrorKind,
    pub message: String,
}

impl ControlError {
    #[cfg(test)]
    pub fn exit_code(&self) -> i32 {
        match self.kind {
            ErrorKind::Stale | ErrorKind::PeerPrimary | ErrorKind::SplitBrain => 3,
            ErrorKind::Usage => 2,
            ErrorKind::Failed => 1,
        }
    }
}

impl std::fmt::Display for ControlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ControlError {}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Counters {
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub trims: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// Application bytes the peer acknowledged as written.
    pub bytes_replicated: u64,
    /// Bytes of data sent (primary) or received (secondary) by resyncs.
    pub bytes_resynced: u64,
}

/// One resource as the daemon sees it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ResourceStatus {
    pub name: String,
    /// init | primary | secondary
    pub role: String,
    /// connected | connecting | disconnected
    pub connection: String,
    /// complete | degraded | syncing | split-brain
    pub state: String,
    pub dirty_bytes: u64,
    /// Size of the replicated data region (what the export serves).
    pub data_size: u64,
    /// 0..1
    pub sync_progress: f64,
    pub sync_bytes_total: u64,
    pub sync_bytes_done: u64,
    pub sync_rate_bps: u64,
    /// An online verify (`tandem verify`) is running; the bytes are of the running or last one.
    #[serde(default)]
    pub verifying: bool,
    #[serde(default)]
    pub verify_bytes_total: u64,
    #[serde(default)]
    pub verify_bytes_done: u64,
    /// This node's data must not be promoted (older than the peer's, or incomplete).
    pub stale: bool,
    pub peer_role: Option<String>,
    /// The NBD socket, while primary.
    pub nbd: Option<PathBuf>,
    pub local_gen: u64,
    pub peer_gen: u64,
    pub inconsistent: bool,
    pub counters: Counters,
    /// How long since the peer was last heard (link, session, handshake or probe), or since
    /// the daemon started if never; a peer silent for `daemon.timeout` counts as gone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_silent_ms: Option<u64>,
    /// Why the resource is not running (its disk could not be opened), if so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// An extent whose digests differ between the nodes.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct DifferingExtent {
    pub extent: u64,
    /// Byte offset in the data region (what the export serves).
    pub offset: u64,
    pub length: u64,
}

/// What an online verify found: the daemon's answer to `verify`, and `tandem verify --json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct VerifyResult {
    pub resource: String,
    pub extents_checked: u64,
    pub bytes_checked: u64,
    pub differing: Vec<DifferingExtent>,
    /// The differing extents were resynced from the primary (`--repair`).
    pub repaired: bool,
    pub seconds: f64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Response {
    pub node: String,
    #[serde(default)]
    pub resources: Vec<ResourceStatus>,
    /// The answer to `verify`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify: Option<VerifyResult>,
    #[serde(default)]
    pub error: Option<ControlError>,
}

impl Response {
    /// The response, or its error as an `anyhow::Error` carrying a `ControlError`.
    pub fn into_result(self) -> Result<Response> {
        match self.error {
            Some(e) => Err(e.into()),
            None => Ok(self),
        }
    }
}

/// The error as the CLI reports it: refusals for safety exit 3, usage errors 2, the rest 1.
pub fn exit_error(e: ControlError) -> anyhow::Error {
    match e.kind {
        ErrorKind::Stale | ErrorKind::PeerPrimary | ErrorKind::SplitBrain => {
            crate::exit::Refused(e.message).into()
        }
        ErrorKind::Usage => crate::exit::Usage(e.message).into(),
        ErrorKind::Failed => anyhow::anyhow!(e.message),
    }
}

/// How long the CLI waits for the daemon to answer a role change (a demote waits for in-flight
/// writes, a promote probes the peer).
const CLI_TIMEOUT: Duration = Duration::from_secs(120);

/// `tandem role ROLE RES…|all`.
pub fn cmd_role(
    cfg: &crate::config::Config,
    role: &str,
    resources: &[String],
    force: bool,
) -> Result<()> {
    let role: Role = role.parse().map_err(crate::exit::Usage)?;
    let req = Request::Role {
        role,
        resources: resources.to_vec(),
        force,
    };
    let resp = request(&cfg.daemon.control, &req, CLI_TIMEOUT)?;
    match resp.error {
        Some(e) => Err(exit_error(e)),
        None => Ok(()),
    }
}

/// `tandem wait-sync [RES…] [--timeout D]`.
pub fn cmd_wait_sync(
    cfg: &crate::config::Config,
    resources: &[String],
    timeout: Duration,
) -> Result<()> {
    match wait_sync(&cfg.daemon.control, resources, timeout, true) {
        Err(e) => match e.downcast::<ControlError>() {
            Ok(c) => Err(exit_error(c)),
            Err(e) => Err(e),
        },
        Ok(()) => Ok(()),
    }
}

/// `tandem resolve RES --discard-local`.
pub fn cmd_resolve(cfg: &crate::config::Config, resource: &str) -> Result<()> {
    let req = Request::Resolve {
        resource: resource.to_string(),
    };
    let resp = request(&cfg.daemon.control, &req, CLI_TIMEOUT)?;
    match resp.error {
        Some(e) => Err(exit_error(e)),
        None => {
            log::info!(
                "{resource}: local data discarded; it is resynced from the peer on the next connection"
            );
            Ok(())
        }
    }
}

/// `tandem verify RES [--repair] [--json] [--rate SIZE]`: the result on stdout; differences
/// are a failure (exit 1) once they are listed.
pub fn cmd_verify(
    cfg: &crate::config::Config,
    resource: &str,
    repair: bool,
    json: bool,
    rate: Option<u64>,
) -> Result<()> {
    let socket = cfg.daemon.control.clone();
    let req = Request::Verify {
        resource: resource.to_string(),
        repair,
        rate,
    };
    // The verify takes as long as the disk takes to read at `rate`: no timeout on its answer.
    // Meanwhile the progress comes from `status` on a second connection.
    let (tx, rx) = std::sync::mpsc::channel();
    let s = socket.clone();
    thread::Builder::new()
        .name("verify".into())
        .spawn(move || {
            let _ = tx.send(exchange(&s, &req, None));
        })
        .context("starting the verify request")?;
    let bar = std::io::stderr().is_terminal().then(|| {
        let b = indicatif::ProgressBar::new(1);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:40}] {percent}% {binary_bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    });
    let resp = loop {
        match rx.recv_timeout(Duration::from_millis(250)) {
            Ok(r) => break r?,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                bail!("{resource}: the verify request ended without an answer")
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
        }
        let Some(b) = &bar else { continue };
        let status = Request::Status {
            resources: vec![resource.to_string()],
        };
        let Ok(r) = request(&socket, &status, Duration::from_secs(10)) else {
            continue;
        };
        if let Some(st) = r.resources.first() {
            let (msg, total, done) = if st.verifying {
                ("verifying", st.verify_bytes_total, st.verify_bytes_done)
            } else if st.state == "syncing" {
                ("repairing", st.sync_bytes_total, st.sync_bytes_done)
            } else {
                continue;
            };
            b.set_message(format!("{resource} {msg}"));
            b.set_length(total.max(1));
            b.set_position(done);
        }
    };
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    if let Some(e) = resp.error {
        return Err(exit_error(e));
    }
    let v = resp.verify.with_context(|| {
        format!("{resource}: the daemon answered the verify request without a result")
    })?;
    if json {
        println!("{}", serde_json::to_string(&v)?);
    } else {
        for d in &v.differing {
            println!(
                "{}: extent {} differs: offset {}, length {}",
                v.resource, d.extent, d.offset, d.length
            );
        }
        println!(
            "{}: {} extents ({} bytes) checked in {:.1} s, {} differ{}",
            v.resource,
            v.extents_checked,
            v.bytes_checked,
            v.seconds,
            v.differing.len(),
            match (v.differing.is_empty(), v.repaired) {
                (true, _) => "",
                (false, true) => "; repaired from the primary",
                (false, false) if repair => "; NOT repaired (see the daemon log)",
                (false, false) => "; run again with --repair to resync them from the primary",
            }
        );
    }
    if v.differing.is_empty() {
        Ok(())
    } else {
        bail!(
            "{}: {} extents differ between the nodes{}",
            v.resource,
            v.differing.len(),
            if v.repaired { " (repaired)" } else { "" }
        )
    }
}

/// `tandem fault RES ACTION` (builds with the `faults` feature): a power cut ends the daemon
/// before it can answer, so there the connection closing is the answer.
#[cfg(feature = "faults")]
pub fn cmd_fault(
    cfg: &crate::config::Config,
    resource: &str,
    action: super::faultdisk::Action,
) -> Result<()> {
    let power_cut = action == super::faultdisk::Action::PowerCut;
    let req = Request::Fault {
        resource: resource.to_string(),
        action,
    };
    match exchange_or_eof(&cfg.daemon.control, &req, Some(Duration::from_secs(30)))? {
        Some(Response { error: Some(e), .. }) => Err(exit_error(e)),
        Some(_) => Ok(()),
        None if power_cut => Ok(()),
        None => bail!(
            "the daemon at {} closed the connection without answering",
            cfg.daemon.control.display()
        ),
    }
}

/// Send one request and read the response, within `timeout`.
pub fn request(socket: &Path, req: &Request, timeout: Duration) -> Result<Response> {
    exchange(socket, req, Some(timeout))
}

/// Send one request and read the response, waiting at most `timeout` (None: as long as the
/// daemon takes) for each.
fn exchange(socket: &Path, req: &Request, timeout: Option<Duration>) -> Result<Response> {
    exchange_or_eof(socket, req, timeout)?.with_context(|| {
        format!(
            "the daemon at {} closed the connection without answering",
            socket.display()
        )
    })
}

/// [`exchange`], with None when the daemon closes the connection without an answer.
fn exchange_or_eof(
    socket: &Path,
    req: &Request,
    timeout: Option<Duration>,
) -> Result<Option<Response>> {
    let mut stream = UnixStream::connect(socket).with_context(|| {
        format!(
            "cannot reach the tandem daemon at {} (is `tandem daemon` running?)",
            socket.display()
        )
    })?;
    stream.set_read_timeout(timeout)?;
    stream.set_write_timeout(timeout)?;
    let mut line = serde_json::to_string(req)?;
    line.push('\n');
    // A daemon at its connection bound answers "busy" at once and closes, maybe before the
    // request is written: then the write fails, and the answer waiting to be read says why.
    let mut unsent = None;
    if let Err(e) = stream.write_all(line.as_bytes()) {
        if !matches!(
            e.kind(),
            std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
        ) {
            // (A write that timed out: a daemon that reads nothing would not answer either.)
            return Err(e).with_context(|| format!("writing to {}", socket.display()));
        }
        unsent = Some(e);
    }
    let mut reader = BufReader::new(stream);
    let mut answer = String::new();
    let read = reader.read_line(&mut answer);
    if let Some(e) = unsent
        && answer.is_empty()
    {
        return Err(e).with_context(|| format!("writing to {}", socket.display()));
    }
    read.with_context(|| format!("no answer from the daemon at {}", socket.display()))?;
    if answer.is_empty() {
        return Ok(None);
    }
    serde_json::from_str(&answer)
        .map(Some)
        .with_context(|| format!("bad answer from the daemon: {}", answer.trim()))
}

/// Block until every named resource (all when empty) is `complete`, with a progress bar on a
/// terminal. Fails on split-brain, on a resource that is not replicating, and after `timeout`.
pub fn wait_sync(
    socket: &Path,
    resources: &[String],
    timeout: Duration,
    progress: bool,
) -> Result<()> {
    let start = Instant::now();
    let bar = if progress && std::io::stderr().is_terminal() {
        let b = indicatif::ProgressBar::new(1000);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:40}] {percent}% {binary_bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        Some(b)
    } else {
        None
    };
    // Split-brain is final only if it persists: right after `resolve` on the peer it clears
    // with the primary's next connection attempt.
    let grace = SPLIT_BRAIN_GRACE.min(timeout);
    let mut split_since: Option<Instant> = None;
    loop {
        let resp = request(
            socket,
            &Request::Status {
                resources: resources.to_vec(),
            },
            Duration::from_secs(10),
        )?
        .into_result()?;
        let split = resp.resources.iter().find(|r| r.state == "split-brain");
        if split.is_none() {
            split_since = None;
        }
        if let Some(sb) = split
            && (split_since.get_or_insert_with(Instant::now).elapsed() >= grace
                || start.elapsed() >= timeout)
        {
            return Err(ControlError {
                kind: ErrorKind::SplitBrain,
                message: format!(
                    "{}: split-brain; run `tandem resolve {} --discard-local` on one node",
                    sb.name, sb.name
                ),
            }
            .into());
        }
        let pending: Vec<&ResourceStatus> = resp
            .resources
            .iter()
            .filter(|r| r.state != "complete")
            .collect();
        if pending.is_empty() {
            if let Some(b) = &bar {
                b.finish_with_message("in sync");
            }
            return Ok(());
        }
        if let Some(b) = &bar {
            let total: u64 = pending.iter().map(|r| r.sync_bytes_total).sum();
            let done: u64 = pending.iter().map(|r| r.sync_bytes_done).sum();
            b.set_length(total.max(1));
            b.set_position(done);
            b.set_message(
                pending
                    .iter()
                    .map(|r| format!("{} {}", r.name, r.state))
                    .collect::<Vec<_>>()
                    .join(", "),
            );
        }
        if start.elapsed() >= timeout {
            let what: Vec<String> = pending
                .iter()
                .map(|r| {
                    format!(
                        "{} {} ({}, {:.0}%)",
                        r.name,
                        r.state,
                        r.connection,
                        r.sync_progress * 100.0
                    )
                })
                .collect();
            bail!(
                "timed out after {:?} waiting for sync: {}",
                timeout,
                what.join(", ")
            );
        }
        thread::sleep(Duration::from_millis(200));
    }
}

/// What the server needs from the daemon to answer requests.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, req: Request) -> Response;
}

/// Listen on `path` (mode 0600, stale socket removed) and answer requests until `stop`.
pub fn serve(
    path: &Path,
    handler: Arc<dyn Handler>,
    stop: Arc<AtomicBool>,
) -> Result<JoinHandle<()>> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            bail!("{} is in use by another daemon", path.display());
        }
        std::fs::remove_file(path).with_context(|| format!("removing stale {}", path.display()))?;
    }
    // Never accessible to others, even briefly.
    let listener = super::unixsock::bind_private(path)
        .with_context(|| format!("binding the control socket {}", path.display()))?;
    listener.set_nonblocking(true)?;
    let path = path.to_path_buf();
    let live = Arc::new(AtomicUsize::new(0));
    let t = thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            while !stop.load(Ordering::Acquire) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        if live.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
                            live.fetch_sub(1, Ordering::AcqRel);
                            refuse_busy(stream);
                            continue;
                        }
                        let (h, l) = (Arc::clone(&handler), Arc::clone(&live));
                        let spawned =
                            thread::Builder::new()
                                .name("control-conn".into())
                                .spawn(move || {
                                    serve_one(stream, h);
                                    l.fetch_sub(1, Ordering::AcqRel);
                                });
                        if let Err(e) = spawned {
                            live.fetch_sub(1, Ordering::AcqRel);
                            log::warn!("control socket: cannot start a connection thread: {e}");
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
                        log::warn!("control socket: {e}");
                        thread::sleep(Duration::from_millis(100));
                    }
                }
            }
            let _ = std::fs::remove_file(&path);
        })
        .context("starting the control thread")?;
    Ok(t)
}

/// Connections served at once (a `verify` holds one for its whole run); more are told the
/// daemon is busy.
const MAX_CONNECTIONS: usize = 32;
/// A request is one line of at most this many bytes, and must arrive whole within
/// REQUEST_TIMEOUT (a deadline, not a per-read timeout).
const MAX_REQUEST: usize = 64 << 10;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// The answer must be taken within this time.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// A reply larger than this is replaced by an error (a status of every resource is a few KiB
/// per resource; names are deduplicated before).
const MAX_REPLY: usize = 4 << 20;

fn error_response(kind: ErrorKind, message: String) -> Response {
    Response {
        error: Some(ControlError { kind, message }),
        ..Default::default()
    }
}

fn refuse_busy(mut stream: UnixStream) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_write_timeout(Some(Duration::from_millis(200)));
    let resp = error_response(
        ErrorKind::Failed,
        format!("the daemon is busy: {MAX_CONNECTIONS} control connections are open; try again"),
    );
    if let Ok(mut out) = serde_json::to_string(&resp) {
        out.push('\n');
        let _ = stream.write_all(out.as_bytes());
    }
}

/// One request line, read within REQUEST_TIMEOUT and MAX_REQUEST bytes; None if the client
/// closed, stalled or sent too much (it gets no answer).
fn read_request(stream: &mut UnixStream) -> Option<Vec<u8>> {
    let deadline = Instant::now() + REQUEST_TIMEOUT;
    let mut line = Vec::with_capacity(512);
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = line.iter().position(|&b| b == b'\n') {
            line.truncate(end);
            return Some(line);
        }
        if line.len() > MAX_REQUEST {
            return None;
        }
        let left = deadline.checked_duration_since(Instant::now())?;
        stream
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .ok()?;
        match std::io::Read::read(stream, &mut chunk) {
            Ok(0) if line.is_empty() => return None,
            // A last request without its newline.
            Ok(0) => return Some(line),
            Ok(n) => line.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
}

fn serve_one(mut stream: UnixStream, handler: Arc<dyn Handler>) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_write_timeout(Some(REPLY_TIMEOUT));
    let Some(line) = read_request(&mut stream) else {
        return;
    };
    let resp = match serde_json::from_slice::<Request>(&line) {
        Ok(req) => handler.handle(req),
        Err(e) => error_response(ErrorKind::Usage, format!("bad request: {e}")),
    };
    let mut out = serde_json::to_string(&resp).unwrap_or_else(|_| "{}".into());
    if out.len() > MAX_REPLY {
        let e = error_response(
            ErrorKind::Usage,
            format!(
                "the answer would be {} bytes, more than the {MAX_REPLY} allowed: ask for fewer resources",
                out.len()
            ),
        );
        out = serde_json::to_string(&e).unwrap_or_else(|_| "{}".into());
    }
    out.push('\n');
    let _ = stream.write_all(out.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    struct Fake;
    impl Handler for Fake {
        fn handle(&self, req: Request) -> Response {
            match req {
                Request::Role { .. } => Response {
                    node: "n".into(),
                    error: Some(ControlError {
                        kind: ErrorKind::Stale,
                        message: "r0: stale".into(),
                    }),
                    ..Default::default()
                },
                _ => Response {
                    node: "n".into(),
                    resources: vec![ResourceStatus {
                        name: "r0".into(),
                        state: "complete".into(),
                        ..Default::default()
                    }],
                    ..Default::default()
                },
            }
        }
    }

    #[test]
    fn socket_is_private_and_answers_requests() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/control.sock");
        let stop = Arc::new(AtomicBool::new(false));
        let t = serve(&path, Arc::new(Fake), Arc::clone(&stop)).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let t5 = Duration::from_secs(5);
        let status = Request::Status {
            resources: vec!["r0".into()],
        };
        let st = request(&path, &status, t5).unwrap();
        assert_eq!(st.resources[0].state, "complete");
        wait_sync(&path, &[], t5, false).unwrap();
        let promote = Request::Role {
            role: Role::Primary,
            resources: vec!["r0".into()],
            force: false,
        };
        let e = request(&path, &promote, t5).unwrap().error.unwrap();
        assert_eq!(e.exit_code(), crate::exit::REFUSED);
        let err = exit_error(e);
        assert_eq!(crate::exit::code_for(&err), crate::exit::REFUSED);
        // Garbage gets a usage error, not a hang or a crash.
        let mut s = UnixStream::connect(&path).unwrap();
        s.write_all(b"{not json\n").unwrap();
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).unwrap();
        assert!(line.contains("\"usage\""), "{line}");
        stop.store(true, Ordering::Release);
        t.join().unwrap();
        assert!(!path.exists());
    }

    #[test]
    fn requests_are_one_json_line() {
        let r = Request::Role {
            role: Role::Primary,
            resources: vec!["r0".into()],
            force: false,
        };
        let s = serde_json::to_string(&r).unwrap();
        assert_eq!(
            s,
            r#"{"cmd":"role","role":"primary","resources":["r0"],"force":false}"#
        );
        assert_eq!(serde_json::from_str::<Request>(&s).unwrap(), r);
        let e = ControlError {
            kind: ErrorKind::PeerPrimary,
            message: "x".into(),
        };
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"kind":"peer-primary","message":"x"}"#
        );
        assert_eq!(e.exit_code(), 3);
    }
}
