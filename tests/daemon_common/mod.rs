//! A two-node tandem pair on loopback for the daemon integration tests: node `a` on 127.0.0.2,
//! node `b` on 127.0.0.3, file-backed disks in a temporary directory, each daemon driven only
//! through the `tandem` binary. Every wait is bounded.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_tandem");
pub const IMG_SIZE: u64 = 64 << 20;

pub struct Node {
    pub name: &'static str,
    pub ip: &'static str,
    pub port: u16,
    pub conf: PathBuf,
    pub img: PathBuf,
    pub nbd: PathBuf,
    pub log: PathBuf,
    /// Run the daemon in this network namespace (`/run/netns/NAME`) instead of the test's own.
    pub netns: Option<&'static str>,
    pub child: Option<Child>,
}

pub struct Pair {
    pub dir: tempfile::TempDir,
    pub a: Node,
    pub b: Node,
}

/// Is `tool` on PATH? Tests that need it print why they skip.
/// Is `tool` installed? If not, say which test skips and which Debian package brings it.
pub fn need(tool: &str, package: &str) -> bool {
    let ok = have(tool);
    if !ok {
        eprintln!("skipping: {tool} not installed (apt-get install {package})");
    }
    ok
}

pub fn have(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// A free port on `ip` from 20000-31999, below Linux's ephemeral range (32768 up): the
/// daemons bind their outgoing connections to 127.0.0.2/.3 with port 0, so a port that
/// `bind(ip:0)` handed out and the test released could be taken by another pair's connection
/// before this daemon listens on it ("daemon on b exited at start" in CI, `tests/demo.rs`).
/// Ports are handed out in turn from a start that differs per process, so the tests of one
/// binary, which run at the same time, never pick the same one.
pub fn free_port(ip: &str) -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        std::process::id().wrapping_mul(7919) % 12_000,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..500 {
        let port = 20_000 + (NEXT.fetch_add(1, Ordering::SeqCst) % 12_000) as u16;
        if TcpListener::bind((ip, port)).is_ok() {
            return port;
        }
    }
    panic!("no free port on {ip} in 20000-31999 after 500 tries");
}

fn write_conf(dir: &Path, me: &Node, a: &Node, b: &Node, secret: &Path, mode: &str, hook: &Path) {
    let text = format!(
        r#"node = "{name}"
[daemon]
listen = ["{ip}:{port}"]
control = "{dir}/{name}.sock"
secret = "{secret}"
timeout = "3s"
exec = "{hook}"

[resource.r0]
backend = "tandem"
replication = "{mode}"
extent_size = "1M"
nbd = "{nbd}"

[resource.r0.on.a]
local = "{aimg}"
remote = "{bip}:{bport}"

[resource.r0.on.b]
local = "{bimg}"
remote = "{aip}:{aport}"
"#,
        name = me.name,
        ip = me.ip,
        port = me.port,
        dir = dir.display(),
        secret = secret.display(),
        hook = hook.display(),
        nbd = me.nbd.display(),
        aimg = a.img.display(),
        bimg = b.img.display(),
        aip = a.ip,
        aport = a.port,
        bip = b.ip,
        bport = b.port,
    );
    std::fs::write(&me.conf, text).unwrap();
}

impl Pair {
    /// Create the pair's files and metadata (no daemons yet).
    pub fn new(mode: &str) -> Pair {
        let (a, b) = ("127.0.0.2", "127.0.0.3");
        Pair::new_on(mode, (a, free_port(a)), (b, free_port(b)))
    }

    /// `new` with the nodes listening on these addresses (ip, port) of `a` and `b`.
    pub fn new_on(mode: &str, a: (&'static str, u16), b: (&'static str, u16)) -> Pair {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let node = |name: &'static str, (ip, port): (&'static str, u16)| Node {
            name,
            ip,
            port,
            conf: d.join(format!("{name}.toml")),
            img: d.join(format!("{name}.img")),
            nbd: d.join(format!("{name}.nbd")),
            log: d.join(format!("{name}.log")),
            netns: None,
            child: None,
        };
        let a = node("a", a);
        let b = node("b", b);
        let secret = d.join("key");
        // As `openssl rand -hex 32` makes them (the daemon refuses fewer than 32 bytes).
        std::fs::write(
            &secret,
            "3f1c9a7e5d2b8460c1e7a9d3f5b2084e6a1c3e5f7092b4d6f8a0c2e4a6b8d0f2\n",
        )
        .unwrap();
        std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        let hook = d.join("hook.sh");
        std::fs::write(
            &hook,
            format!(
                "#!/bin/sh\necho \"$@\" >> {}/hooks.$(basename $PWD).log\n",
                d.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        for n in [&a, &b] {
            write_conf(d, n, &a, &b, &secret, mode, &hook);
            let f = std::fs::File::create(&n.img).unwrap();
            f.set_len(IMG_SIZE).unwrap();
        }
        let p = Pair { dir, a, b };
        for n in [&p.a, &p.b] {
            let out = tandem(n, &["create", "r0"]);
            assert!(
                out.status.success(),
                "create: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        p
    }

    /// `from` ("a" or "b") reaches its peer through `via` instead of directly: its `remote` is
    /// rewritten before the daemons start.
    pub fn route_via(&self, from: &str, via: std::net::SocketAddr) {
        let (me, peer) = if from == "a" {
            (&self.a, &self.b)
        } else {
            (&self.b, &self.a)
        };
        let text = std::fs::read_to_string(&me.conf).unwrap();
        let direct = format!("remote = \"{}:{}\"", peer.ip, peer.port);
        assert!(text.contains(&direct), "{text}");
        let text = text.replace(&direct, &format!("remote = \"{via}\""));
        std::fs::write(&me.conf, text).unwrap();
    }

    pub fn node(&mut self, name: &str) -> &mut Node {
        if name == "a" {
            &mut self.a
        } else {
            &mut self.b
        }
    }
}

impl Node {
    /// Replace `from`, which must be there, with `to` in this node's configuration file (before
    /// its daemon starts, or before a SIGHUP).
    pub fn edit_conf(&self, from: &str, to: &str) {
        let text = std::fs::read_to_string(&self.conf).unwrap();
        assert!(
            text.contains(from),
            "{} has no {from:?}:\n{text}",
            self.conf.display()
        );
        std::fs::write(&self.conf, text.replace(from, to)).unwrap();
    }

    pub fn sock(&self) -> PathBuf {
        self.conf.with_file_name(format!("{}.sock", self.name))
    }

    /// Start the daemon and wait (bounded) until its control socket answers.
    pub fn start(&mut self) {
        self.start_with_env(&[]);
    }

    /// `start` with extra environment variables for the daemon (e.g. `TANDEM_FAULTS`).
    pub fn start_with_env(&mut self, env: &[(&str, &str)]) {
        assert!(self.child.is_none());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        // nsenter, unlike `ip netns exec`, keeps the test's mount namespace: the sockets and
        // files the daemon creates stay visible here. It execs, so the child's PID is the
        // daemon's.
        let mut cmd = match self.netns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{ns}")).arg("--").arg(BIN);
                c
            }
            None => Command::new(BIN),
        };
        let child = cmd
            .args(["-c", self.conf.to_str().unwrap(), "-v", "daemon"])
            .current_dir(self.conf.parent().unwrap())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .envs(env.iter().copied())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let end = Instant::now() + Duration::from_secs(20);
        while Instant::now() < end {
            if self.try_status().is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "daemon {} did not come up; log:\n{}",
            self.name,
            self.log_text()
        );
    }

    /// SIGKILL the daemon.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Wait (bounded) for the daemon to end by itself (a power cut); its exit status.
    pub fn wait_exit(&mut self, secs: u64) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("daemon not started");
        let end = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < end {
            if let Ok(Some(st)) = c.try_wait() {
                return st;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        let _ = c.wait();
        panic!(
            "daemon {} did not exit; log:\n{}",
            self.name,
            self.log_text()
        );
    }

    /// SIGTERM the daemon and wait (bounded) for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix_kill(c.id(), 15);
            let end = Instant::now() + Duration::from_secs(30);
            while Instant::now() < end {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
            panic!("daemon {} ignored SIGTERM", self.name);
        }
    }

    /// Wait (bounded) until the daemon's log contains `text`.
    pub fn log_contains(&self, text: &str, secs: u64) -> bool {
        let end = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < end {
            if self.log_text().contains(text) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn run(&self, args: &[&str]) -> Output {
        tandem(self, args)
    }

    pub fn ok(&self, args: &[&str]) {
        let out = tandem(self, args);
        assert!(
            out.status.success(),
            "tandem {:?} on {} failed: {}\nlog:\n{}",
            args,
            self.name,
            String::from_utf8_lossy(&out.stderr),
            self.log_text()
        );
    }

    /// The daemon's own status of r0, straight from the control socket (one JSON line each way).
    pub fn status(&self) -> serde_json::Value {
        self.try_status()
            .unwrap_or_else(|e| panic!("{}: status: {e}\nlog:\n{}", self.name, self.log_text()))
    }

    pub fn try_status(&self) -> std::io::Result<serde_json::Value> {
        use std::io::{BufRead, Write};
        let mut s = std::os::unix::net::UnixStream::connect(self.sock())?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        s.write_all(b"{\"cmd\":\"status\",\"resources\":[\"r0\"]}\n")?;
        let mut line = String::new();
        std::io::BufReader::new(s).read_line(&mut line)?;
        let v: serde_json::Value = serde_json::from_str(&line).map_err(std::io::Error::other)?;
        Ok(v["resources"][0].clone())
    }

    /// Poll status until `pred` holds; panics with the last status after `secs`.
    pub fn wait_for(
        &self,
        secs: u64,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let end = Instant::now() + Duration::from_secs(secs);
        let mut last = serde_json::Value::Null;
        while Instant::now() < end {
            last = self.status();
            if pred(&last) {
                return last;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "{}: timed out waiting for {what}; last status {last}\nlog:\n{}",
            self.name,
            self.log_text()
        );
    }

    pub fn nbd_uri(&self) -> String {
        format!("nbd+unix:///r0?socket={}", self.nbd.display())
    }

    /// Run qemu-io commands against this node's export.
    pub fn qemu_io(&self, cmds: &[&str]) -> Output {
        let mut c = Command::new("qemu-io");
        c.args(["-f", "raw"]);
        for cmd in cmds {
            c.args(["-c", cmd]);
        }
        c.arg(self.nbd_uri());
        c.stdin(Stdio::null());
        c.output().unwrap()
    }

    pub fn qemu_io_ok(&self, cmds: &[&str]) -> String {
        let out = self.qemu_io(cmds);
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && !text.contains("failed"),
            "qemu-io {cmds:?}: {text}"
        );
        text
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn nix_kill(pid: u32, sig: i32) -> std::io::Result<()> {
    let st = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()?;
    if st.success() {
        Ok(())
    } else {
        Err(std::io::Error::other("kill failed"))
    }
}

pub fn tandem(n: &Node, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(["-c", n.conf.to_str().unwrap()])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// The `len` bytes at `offset` of `img` all equal `byte`.
pub fn region_is(img: &Path, offset: u64, len: usize, byte: u8) -> bool {
    region(img, offset, len).iter().all(|&b| b == byte)
}

/// The `len` bytes at `offset` of `img`.
pub fn region(img: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; len];
    std::fs::File::open(img)
        .unwrap()
        .read_exact_at(&mut buf, offset)
        .unwrap();
    buf
}

/// Write `byte` over `[offset, offset + len)` through `n`'s export and send no FLUSH (fio's
/// nbd engine flushes only when asked to; qemu-io flushes when it closes the image).
pub fn write_unflushed(n: &Node, byte: u8, offset: u64, len: u64) {
    fio_nbd(
        &n.nbd_uri(),
        &[
            "--name=unflushed",
            "--rw=write",
            &format!("--bs={len}"),
            &format!("--size={len}"),
            &format!("--offset={offset}"),
            &format!("--buffer_pattern={byte}"),
        ],
    );
}

/// Run qemu-io `cmds` on the export at `uri`; it must succeed within `limit`, or it is killed
/// and the test fails (a client that hangs is the failure), with the daemon's log at `log`.
/// Returns its output and how long it took.
pub fn qemu_io_within(uri: &str, log: &Path, cmds: &[&str], limit: Duration) -> (String, Duration) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let started = Instant::now();
    let mut child = c
        .arg(uri)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let daemon_log = || std::fs::read_to_string(log).unwrap_or_default();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "qemu-io {cmds:?} on {uri} hung for more than {limit:?}; killed\nlog:\n{}",
                daemon_log()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let took = started.elapsed();
    let out = child.wait_with_output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !text.contains("failed"),
        "qemu-io {cmds:?} on {uri}: {text}\nlog:\n{}",
        daemon_log()
    );
    (text, took)
}

/// What the pair's hook script recorded, one event per line (`EVENT RESOURCE ARGS...`).
pub fn hook_log(p: &Pair) -> String {
    let name = p
        .dir
        .path()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .to_string();
    std::fs::read_to_string(p.dir.path().join(format!("hooks.{name}.log"))).unwrap_or_default()
}

/// Run fio with the nbd engine against `uri` and these job options; it must succeed. Returns
/// its report.
pub fn fio_nbd(uri: &str, args: &[&str]) -> String {
    let out = Command::new("fio")
        .arg("--ioengine=nbd")
        .arg(format!("--uri={uri}"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "fio {args:?}: {text}");
    text
}

/// The first `len` bytes of both images are identical.
pub fn same_data(a: &Path, b: &Path, len: u64) -> bool {
    Command::new("cmp")
        .args([
            "-n",
            &len.to_string(),
            a.to_str().unwrap(),
            b.to_str().unwrap(),
        ])
        .stdout(Stdio::null())
        .status()
        .unwrap()
        .success()
}

pub fn u(v: &serde_json::Value, path: &[&str]) -> u64 {
    let mut x = v;
    for p in path {
        x = &x[*p];
    }
    x.as_u64()
        .unwrap_or_else(|| panic!("{path:?} not a number in {v}"))
}

/// A synced pair: daemons up, `b` secondary, `a` primary, initial sync done.
pub fn synced_pair(mode: &str) -> Pair {
    synced_pair_with(mode, |_| {})
}

/// `synced_pair`, with `prepare` run on the pair before its daemons start (to reroute a link,
/// say).
pub fn synced_pair_with(mode: &str, prepare: impl FnOnce(&mut Pair)) -> Pair {
    let mut p = Pair::new(mode);
    prepare(&mut p);
    synced(p)
}

/// Start the daemons of a new pair: `b` secondary, `a` primary, initial sync done.
pub fn synced(mut p: Pair) -> Pair {
    p.a.start();
    p.b.start();
    p.b.ok(&["role", "secondary", "r0"]);
    p.a.ok(&["role", "primary", "r0"]);
    p.a.ok(&["wait-sync", "r0", "--timeout", "60s"]);
    p.b.wait_for(30, "secondary complete", |s| s["state"] == "complete");
    p
}

/// Run `argv` (stdin null) and return its output; panic if it cannot start.
pub fn run_argv(argv: &[&str]) -> Output {
    Command::new(argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{argv:?}: {e}"))
}

/// Run `argv`, panic unless it succeeds, return its stdout.
pub fn must(argv: &[&str]) -> String {
    let out = run_argv(argv);
    assert!(
        out.status.success(),
        "{argv:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Run `argv` in network namespace `ns` (network only: the mount namespace stays ours, so
/// mounts made there stay visible).
pub fn in_ns(ns: &str, argv: &[&str]) -> String {
    let net = format!("--net=/run/netns/{ns}");
    let mut all = vec!["nsenter", &net, "--"];
    all.extend_from_slice(argv);
    must(&all)
}

/// Panic if the root namespace has anything in 198.18.0.0/24: this machine reserves that
/// range for the namespaces of the tests.
pub fn assert_root_ns_clean() {
    const NET: &str = "198.18.0.";
    let addrs = must(&["ip", "-4", "addr", "show"]);
    let routes = must(&["ip", "-4", "route", "show", "table", "all"]);
    assert!(
        !addrs.contains(NET) && !routes.contains(NET),
        "refusing to run: the root network namespace already has an address or route in \
         198.18.0.0/24, which the tests need for their namespaces only\n{addrs}\n{routes}"
    );
}

/// A raw NBD connection to the export at `sock` (fixed newstyle, export `r0`), for tests that
/// must send what no ordinary client would; reads time out after 60 s.
pub fn nbd_connect(sock: &Path) -> std::os::unix::net::UnixStream {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).unwrap();
    assert_eq!(&hello[..16], b"NBDMAGICIHAVEOPT");
    // Fixed newstyle, no zeroes; NBD_OPT_EXPORT_NAME "r0".
    s.write_all(&3u32.to_be_bytes()).unwrap();
    let mut o = b"IHAVEOPT".to_vec();
    o.extend_from_slice(&1u32.to_be_bytes());
    o.extend_from_slice(&2u32.to_be_bytes());
    o.extend_from_slice(b"r0");
    s.write_all(&o).unwrap();
    let mut info = [0u8; 10];
    s.read_exact(&mut info).unwrap();
    s
}

/// Send one raw NBD request on `s` (a connection from `nbd_connect`); false once the server
/// is gone.
pub fn nbd_send(
    s: &mut std::os::unix::net::UnixStream,
    kind: u16,
    handle: u64,
    offset: u64,
    data: &[u8],
) -> bool {
    use std::io::Write;
    let mut r = Vec::with_capacity(28 + data.len());
    r.extend_from_slice(&0x2560_9513u32.to_be_bytes());
    r.extend_from_slice(&0u16.to_be_bytes());
    r.extend_from_slice(&kind.to_be_bytes());
    r.extend_from_slice(&handle.to_be_bytes());
    r.extend_from_slice(&offset.to_be_bytes());
    r.extend_from_slice(&(data.len() as u32).to_be_bytes());
    r.extend_from_slice(data);
    s.write_all(&r).is_ok()
}

/// The next simple reply on `s`: (handle, error), None once the server is gone.
pub fn nbd_reply(s: &mut std::os::unix::net::UnixStream) -> Option<(u64, u32)> {
    use std::io::Read;
    let mut b = [0u8; 16];
    s.read_exact(&mut b).ok()?;
    assert_eq!(u32::from_be_bytes(b[..4].try_into().unwrap()), 0x6744_6698);
    let error = u32::from_be_bytes(b[4..8].try_into().unwrap());
    Some((u64::from_be_bytes(b[8..].try_into().unwrap()), error))
}

/// Two network namespaces joined by a veth pair on 198.18.0.0/24, each end with its address,
/// for tests whose nodes must drop packets rather than refuse them. Made under a file lock
/// (tests sharing the names wait for each other, at most 300 s); removed on drop, also when
/// the test fails. The caller has checked for root and `ip`. The root namespace never gets an
/// address there: checked before and after.
pub struct NetnsPair {
    _lock: nix::fcntl::Flock<std::fs::File>,
    ns: [&'static str; 2],
}

impl NetnsPair {
    /// Namespaces `ns`, veth ends `dev` in them, addresses `ip` (/24).
    pub fn up(
        lock: &str,
        ns: [&'static str; 2],
        dev: [&'static str; 2],
        ip: [&'static str; 2],
    ) -> NetnsPair {
        use nix::fcntl::{Flock, FlockArg};
        let mut file = std::fs::File::create(lock).unwrap();
        let end = Instant::now() + Duration::from_secs(300);
        let lock_held = loop {
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(l) => break l,
                Err((f, _)) if Instant::now() < end => {
                    file = f;
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err((_, e)) => panic!("{lock} still locked after 300 s: {e}"),
            }
        };
        assert_root_ns_clean();
        // Under the lock, namespaces of these names are leftovers of a killed run.
        for n in ns {
            if run_argv(&["ip", "netns", "del", n]).status.success() {
                eprintln!("removed the stale namespace {n}");
            }
        }
        let pair = NetnsPair {
            _lock: lock_held,
            ns,
        };
        for n in ns {
            must(&["ip", "netns", "add", n]);
            // No IPv6 (router solicitations, DAD) on the link: IPv4 between the two only.
            in_ns(
                n,
                &["sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"],
            );
        }
        // Created inside the first namespace, its peer inside the second: the link is never in
        // the root namespace.
        must(&[
            "ip", "-n", ns[0], "link", "add", dev[0], "type", "veth", "peer", "name", dev[1],
            "netns", ns[1],
        ]);
        for i in 0..2 {
            let cidr = format!("{}/24", ip[i]);
            must(&["ip", "-n", ns[i], "addr", "add", &cidr, "dev", dev[i]]);
            must(&["ip", "-n", ns[i], "link", "set", "lo", "up"]);
            must(&["ip", "-n", ns[i], "link", "set", dev[i], "up"]);
        }
        assert_root_ns_clean();
        pair
    }
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        // The veth pair goes with its namespaces.
        for n in self.ns {
            let _ = run_argv(&["ip", "netns", "del", n]);
        }
    }
}
