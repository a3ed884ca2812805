//! `tandem demo`: a complete pair on loopback, walked through sync, writes, failover and resync.
//!
//! No root and no config: two daemons run as child processes on 127.0.0.2 and 127.0.0.3 with
//! file-backed disks in a temporary directory. Data goes in and out through the primary's NBD
//! export with tandem's own small NBD client, so nothing but the binary is needed. Every check
//! that fails makes the demo exit non-zero; everything it started is stopped on the way out.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::net::TcpListener;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use sha2::{Digest, Sha256};

use crate::nbd_client::NbdClient;

const MIB: u64 = 1024 * 1024;
const DISK_SIZE: u64 = 1024 * MIB;
/// Data placed on A's disk before the first sync (the rest stays sparse and is skipped).
const PRELOADED: u64 = 384 * MIB;
const RESOURCE: &str = "r0";

struct Node {
    name: &'static str,
    ip: &'static str,
    dir: PathBuf,
    config: PathBuf,
    disk: PathBuf,
    nbd: PathBuf,
    daemon: Option<Child>,
}

struct Demo {
    dir: PathBuf,
    exe: PathBuf,
    nodes: [Node; 2],
}

impl Drop for Demo {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            n.kill();
        }
        if std::env::var_os("TANDEM_DEMO_KEEP").is_none() {
            let _ = fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("demo: kept {}", self.dir.display());
        }
    }
}

impl Node {
    fn kill(&mut self) {
        if let Some(mut c) = self.daemon.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn step(n: u32, text: &str) {
    println!("\n\x1b[1m== {n}. {text}\x1b[0m");
}

/// A port free on `ip`, taken below the kernel's ephemeral range. A port that `bind(ip:0)`
/// hands out and the demo releases again may be handed to an outgoing connection before the
/// daemon listens on it: tandem binds its connections to the node's own address, so another
/// pair on the same loopback addresses (a second demo, a test) can take exactly that port,
/// and the daemon then exits at start with "address in use". Automatic binds never take a
/// port below the ephemeral range.
fn free_port(ip: &str) -> Result<u16> {
    let (low, high) = below_ephemeral();
    let span = u32::from(high - low);
    let mut start = [0u8; 4];
    getrandom::fill(&mut start).map_err(|e| anyhow::anyhow!("no random numbers: {e}"))?;
    let start = u32::from_ne_bytes(start) % span;
    let mut last = None;
    for i in 0..span.min(200) {
        // In range: low + (start + i) % span < high <= u16::MAX.
        let port = low + ((start + i) % span) as u16;
        match TcpListener::bind((ip, port)) {
            Ok(_) => return Ok(port),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => last = Some(e),
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("cannot bind {ip}: is 127.0.0.0/8 routed to lo?"));
            }
        }
    }
    let why = last.map_or_else(String::new, |e| format!(": {e}"));
    bail!("no free port on {ip} between {low} and {high}{why}")
}

/// The ports below the ephemeral range that the demo picks from: up to 12,000 of them, none
/// below 1024.
fn below_ephemeral() -> (u16, u16) {
    // Linux: ip_local_port_range; FreeBSD's net.inet.ip.portrange.first is 10000 by default.
    let first = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(10_000);
    let high = first.max(2048);
    (high.saturating_sub(12_000).max(1024), high)
}

/// Deterministic, position-stamped data: every 4 KiB block names its offset and a round.
fn pattern(offset: u64, len: usize, round: u8) -> Vec<u8> {
    let mut v = vec![0u8; len];
    for (i, chunk) in v.chunks_mut(4096).enumerate() {
        let pos = offset + (i as u64) * 4096;
        let stamp = format!("tandem demo round {round} block at {pos:>12}\n");
        for (j, b) in chunk.iter_mut().enumerate() {
            *b = stamp.as_bytes()[j % stamp.len()];
        }
    }
    v
}

fn sha(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl Demo {
    fn new() -> Result<Demo> {
        let exe = std::env::current_exe().context("cannot find the tandem binary")?;
        let base = std::env::temp_dir().join(format!("tandem-demo-{}", std::process::id()));
        fs::create_dir_all(&base)?;
        let secret = base.join("secret");
        let mut key = [0u8; 32];
        getrandom::fill(&mut key).map_err(|e| anyhow::anyhow!("no random numbers: {e}"))?;
        let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&secret)?
            .write_all(hex.as_bytes())?;

        let ips = ["127.0.0.2", "127.0.0.3"];
        let ports = [free_port(ips[0])?, free_port(ips[1])?];
        let mk = |i: usize, name: &'static str| -> Result<Node> {
            let dir = base.join(name);
            fs::create_dir_all(&dir)?;
            let disk = dir.join("disk.img");
            File::create(&disk)?.set_len(DISK_SIZE)?;
            Ok(Node {
                name,
                ip: ips[i],
                config: dir.join("tandem.toml"),
                nbd: dir.join("r0.nbd"),
                disk,
                dir,
                daemon: None,
            })
        };
        let nodes = [mk(0, "a")?, mk(1, "b")?];
        for (i, n) in nodes.iter().enumerate() {
            let other = &nodes[1 - i];
            let text = format!(
                r#"# written by tandem demo
node = "{name}"

[log]
level = "info"

[switch]
lock = "{dir}/switch.lock"

[daemon]
listen = ["{ip}:{port}"]
control = "{dir}/control.sock"
secret = "{secret}"
timeout = "2s"

[resource.{RESOURCE}]
backend = "tandem"
replication = "fullsync"
nbd = "{nbd}"

[resource.{RESOURCE}.on.{name}]
local = "{disk}"
remote = "{oip}:{oport}"

[resource.{RESOURCE}.on.{oname}]
local = "{odisk}"
remote = "{ip}:{port}"
"#,
                name = n.name,
                dir = n.dir.display(),
                ip = n.ip,
                port = ports[i],
                secret = secret.display(),
                nbd = n.nbd.display(),
                disk = n.disk.display(),
                oip = other.ip,
                oport = ports[1 - i],
                oname = other.name,
                odisk = other.disk.display(),
            );
            fs::write(&n.config, text)?;
        }
        Ok(Demo {
            dir: base,
            exe,
            nodes,
        })
    }

    fn tandem(&self, node: usize, args: &[&str]) -> Command {
        let mut c = Command::new(&self.exe);
        c.arg("-c").arg(&self.nodes[node].config).args(args);
        c.stdin(Stdio::null());
        c
    }

    /// Run a tandem command, show its output, fail on a non-zero exit.
    fn run(&self, node: usize, args: &[&str]) -> Result<()> {
        println!("$ tandem {} # on {}", args.join(" "), self.nodes[node].name);
        let st = self.tandem(node, args).status()?;
        ensure!(
            st.success(),
            "tandem {} on {} failed: {st}",
            args.join(" "),
            self.nodes[node].name
        );
        Ok(())
    }

    fn status_json(&self, node: usize) -> Result<serde_json::Value> {
        let out = self.tandem(node, &["status", "--json"]).output()?;
        ensure!(
            out.status.success(),
            "status on {} failed: {}",
            self.nodes[node].name,
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value =
            serde_json::from_slice(&out.stdout).context("status --json is not JSON")?;
        v["resources"]
            .as_array()
            .and_then(|a| a.first())
            .cloned()
            .context("status --json lists no resource")
    }

    fn start_daemon(&mut self, node: usize) -> Result<()> {
        let log = File::create(self.nodes[node].dir.join("daemon.log"))?;
        let child = self
            .tandem(node, &["daemon"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("cannot start tandem daemon")?;
        self.nodes[node].daemon = Some(child);
        // The socket file of a killed daemon may still be there: wait for an answer.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self
            .status_json(node)
            .is_ok_and(|s| s.get("error").is_none())
        {
            if let Some(c) = self.nodes[node].daemon.as_mut() {
                if let Some(st) = c.try_wait()? {
                    bail!(
                        "daemon on {} exited at start ({st}); the end of {}:\n{}",
                        self.nodes[node].name,
                        self.log_path(node),
                        self.log_tail(node, 20)
                    );
                }
            }
            ensure!(
                Instant::now() < deadline,
                "daemon on {} did not open its control socket in 10 s",
                self.nodes[node].name
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        println!(
            "started tandem daemon on {} ({})",
            self.nodes[node].name, self.nodes[node].ip
        );
        Ok(())
    }

    fn log_path(&self, node: usize) -> String {
        self.nodes[node]
            .dir
            .join("daemon.log")
            .display()
            .to_string()
    }

    /// The last `lines` lines of a daemon's log, for an error that would otherwise point at a
    /// file the demo removes on its way out.
    fn log_tail(&self, node: usize, lines: usize) -> String {
        match fs::read_to_string(self.log_path(node)) {
            Ok(text) => {
                let all: Vec<&str> = text.lines().collect();
                all[all.len().saturating_sub(lines)..].join("\n")
            }
            Err(e) => format!("(cannot read it: {e})"),
        }
    }

    fn show_status(&self) -> Result<()> {
        for i in 0..2 {
            println!("--- {} ---", self.nodes[i].name);
            let out = self.tandem(i, &["status"]).output()?;
            print!("{}", String::from_utf8_lossy(&out.stdout));
        }
        Ok(())
    }

    fn wait_export(&self, node: usize) -> Result<NbdClient> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match NbdClient::connect(&self.nodes[node].nbd, RESOURCE) {
                Ok(c) => return Ok(c),
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    fn wait_state(&self, node: usize, state: &str, timeout: Duration) -> Result<serde_json::Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.status_json(node)?;
            if s["state"] == state {
                return Ok(s);
            }
            ensure!(
                Instant::now() < deadline,
                "{} did not reach state {state} in {timeout:?} (now: {s})",
                self.nodes[node].name
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Compare the data regions of both disks (the metadata lives at the end, after the data).
fn compare_disks(a: &Path, b: &Path, len: u64) -> Result<()> {
    let (fa, fb) = (File::open(a)?, File::open(b)?);
    let mut ba = vec![0u8; MIB as usize];
    let mut bb = vec![0u8; MIB as usize];
    let mut off = 0;
    while off < len {
        let n = (len - off).min(MIB) as usize;
        fa.read_exact_at(&mut ba[..n], off)?;
        fb.read_exact_at(&mut bb[..n], off)?;
        ensure!(
            ba[..n] == bb[..n],
            "the disks differ in the MiB at offset {off}"
        );
        off += n as u64;
    }
    Ok(())
}

pub fn run() -> Result<()> {
    let started = Instant::now();
    let mut d = Demo::new()?;
    println!(
        "tandem demo: two nodes on loopback, disks and configs in {}",
        d.dir.display()
    );

    step(
        1,
        "create metadata on both disks; A's disk already holds 384 MiB of data",
    );
    {
        let f = OpenOptions::new().write(true).open(&d.nodes[0].disk)?;
        let mut off = 0;
        while off < PRELOADED {
            f.write_all_at(&pattern(off, MIB as usize, 0), off)?;
            off += MIB;
        }
    }
    d.run(0, &["create", RESOURCE])?;
    d.run(1, &["create", RESOURCE])?;

    step(
        2,
        "start both daemons; B secondary, A primary; the initial sync copies only what is allocated",
    );
    d.start_daemon(0)?;
    d.start_daemon(1)?;
    d.run(1, &["role", "secondary", RESOURCE])?;
    d.run(0, &["role", "primary", RESOURCE])?;
    d.run(0, &["wait-sync", RESOURCE, "--timeout", "60s"])?;
    d.show_status()?;

    step(
        3,
        "write 16 MiB of stamped blocks through A's NBD export, flush",
    );
    let mut client = d.wait_export(0)?;
    let data_size = client.size();
    let write_at = 128 * MIB;
    let data = pattern(write_at, 16 * MIB as usize, 1);
    for (i, chunk) in data.chunks(MIB as usize).enumerate() {
        client.write(write_at + i as u64 * MIB, chunk)?;
    }
    client.flush()?;
    client.disconnect();
    let expect = sha(&data);
    println!(
        "wrote 16 MiB at offset {write_at}, sha256 {}",
        &expect[..16]
    );
    compare_disks(&d.nodes[0].disk, &d.nodes[1].disk, data_size)?;
    println!(
        "check: both disks hold identical data regions ({} MiB)",
        data_size / MIB
    );

    step(
        4,
        "A dies (kill -9); B is promoted and serves the same data",
    );
    d.nodes[0].kill();
    println!("killed A's daemon");
    // As in a real failover, B is promoted once A's death is noticed (VRRP or CARP take
    // longer than B's link does); a promote in the same millisecond may still find A primary.
    let end = Instant::now() + Duration::from_secs(10);
    while d.status_json(1)?["connection"] == "connected" && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
    d.run(1, &["role", "primary", RESOURCE])?;
    let mut client = d.wait_export(1)?;
    let mut back = vec![0u8; data.len()];
    for (i, chunk) in back.chunks_mut(MIB as usize).enumerate() {
        client.read(write_at + i as u64 * MIB, chunk)?;
    }
    ensure!(
        sha(&back) == expect,
        "B does not return the data written through A"
    );
    println!(
        "check: B returns the 16 MiB written through A (sha256 {})",
        &expect[..16]
    );

    step(5, "B takes 8 MiB of new writes while A is down");
    let data2 = pattern(32 * MIB, 8 * MIB as usize, 2);
    for (i, chunk) in data2.chunks(MIB as usize).enumerate() {
        client.write(32 * MIB + i as u64 * MIB, chunk)?;
    }
    client.flush()?;
    client.disconnect();
    let s = d.status_json(1)?;
    println!("B: state {}, dirty {} bytes", s["state"], s["dirty_bytes"]);
    ensure!(
        s["state"] == "degraded",
        "B should be degraded while A is down, is {}",
        s["state"]
    );

    let resynced_before = s["counters"]["bytes_resynced"].as_u64().unwrap_or(0);

    step(
        6,
        "A comes back as secondary; only the extents changed meanwhile are resynced",
    );
    d.start_daemon(0)?;
    d.run(0, &["role", "secondary", RESOURCE])?;
    d.run(1, &["wait-sync", RESOURCE, "--timeout", "60s"])?;
    let s = d.wait_state(1, "complete", Duration::from_secs(30))?;
    d.show_status()?;
    let resynced = s["counters"]["bytes_resynced"]
        .as_u64()
        .unwrap_or(0)
        .saturating_sub(resynced_before);
    println!(
        "resync after the outage moved {} MiB of a {} MiB disk",
        resynced as f64 / MIB as f64,
        data_size / MIB
    );
    // The 8 MiB written on B, plus the extents A had recently written (kept dirty, like
    // hastd's keepdirty, because A died without a clean shutdown): far below the disk size.
    ensure!(
        resynced > 0 && resynced <= 32 * MIB,
        "the resync moved {resynced} bytes; expected the changed extents only (at most 32 MiB)"
    );
    compare_disks(&d.nodes[0].disk, &d.nodes[1].disk, data_size)?;
    println!("check: both disks hold identical data regions again");

    println!(
        "\ndemo finished in {:.1} s: all checks passed",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
