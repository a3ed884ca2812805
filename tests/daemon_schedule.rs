//! Randomised fault schedules: stamped writes from many connections run through the primary's
//! export while a seeded scheduler crashes daemons, fails over, switches over, stalls, cuts
//! and resets the link, and (in a build with `--features faults`, as CI runs it) cuts the
//! power of the primary, the secondary or both. At the end the pair is brought together and resynced, and the test
//! checks what a user relies on:
//! - every write acknowledged before an acknowledged FLUSH is on the final primary (the
//!   stamped-block checker in tests/stamp);
//! - `tandem verify` finds the two replicas identical;
//! - no split-brain was reported (no schedule here writes both sides apart);
//! - no daemon panicked.
//!
//! `SEED=n` replays schedule n; `TANDEM_SCHEDULES=k` runs k schedules (default 3, the CI
//! subset; `bench/schedules` runs 200). Each schedule prints its seed and its steps.

mod daemon_common;
mod fault_proxy;
mod stamp;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use daemon_common::*;
use fault_proxy::{Dir, Fault, FaultProxy};
use stamp::Rng;

/// Blocks the writers use: 8 MiB, 8 extents of the harness's 1 MiB.
const BLOCKS: u32 = 2048;
const STEPS: u32 = 6;

#[derive(Debug, Clone, Copy)]
enum Step {
    /// Writes go on.
    Pause(u64),
    /// kill -9 of the primary; the secondary is promoted; the old primary returns as secondary.
    Failover,
    /// kill -9 of the primary, which comes back as primary (the secondary was not in sync).
    PrimaryRestart,
    /// kill -9 of the secondary, which returns after a while.
    SecondaryCrash(u64),
    /// demote the primary, promote the secondary: a planned switchover.
    Switchover,
    /// The link hangs for a while.
    Stall(u64),
    /// Only a→b flows for a while: b's acks are lost.
    HalfOpen(u64),
    /// The link is cut after this many more bytes a→b.
    Cut(u64),
    /// Every connection through the proxy is reset.
    Reset,
    /// The primary's machine loses power (unflushed writes gone); it returns, as secondary if
    /// the other node was in sync (promoted meanwhile), else as primary.
    PowerCutPrimary,
    /// The secondary's machine loses power and returns after a while.
    PowerCutSecondary(u64),
    /// Both machines lose power at once and return in their roles.
    PowerCutBoth,
}

/// Daemons run with the power-loss disk layer when the build has it (`--features faults`).
const ENV: &[(&str, &str)] = if cfg!(feature = "faults") {
    &[("TANDEM_FAULTS", "power-loss")]
} else {
    &[]
};

fn pick(rng: &mut Rng) -> Step {
    let kinds = if cfg!(feature = "faults") { 12 } else { 9 };
    match rng.below(kinds) {
        9 => Step::PowerCutPrimary,
        10 => Step::PowerCutSecondary(200 + rng.below(2000)),
        11 => Step::PowerCutBoth,
        0 => Step::Pause(200 + rng.below(1500)),
        1 => Step::Failover,
        2 => Step::PrimaryRestart,
        3 => Step::SecondaryCrash(200 + rng.below(2000)),
        4 => Step::Switchover,
        5 => Step::Stall(500 + rng.below(4500)),
        6 => Step::HalfOpen(500 + rng.below(4500)),
        7 => Step::Cut(1 + rng.below(1 << 20)),
        _ => Step::Reset,
    }
}

struct World {
    p: Pair,
    /// a → b and b → a; the primary always connects, so `Dir::AToB` is primary → secondary.
    proxies: [FaultProxy; 2],
    /// "a" or "b": the node that is primary (or was, while it is down).
    primary: &'static str,
    target: stamp::Target,
}

impl World {
    fn fault(&self, f: Fault) {
        for p in &self.proxies {
            p.set(f);
        }
    }

    fn secondary(&self) -> &'static str {
        if self.primary == "a" { "b" } else { "a" }
    }

    fn sock(&mut self, name: &str) -> PathBuf {
        self.p.node(name).nbd.clone()
    }

    fn aim(&mut self, name: Option<&'static str>) {
        let path = name.map(|n| self.sock(n));
        stamp::aim(&self.target, path);
    }

    /// Both sides say the pair is connected and complete, and the secondary holds the
    /// primary's current generation, for half a second on end (wait up to 30 s): only then is
    /// a failover to the secondary safe, as a CARP setup with `tandem switch` would refuse it
    /// otherwise. One look is not enough: right after a link fault both sides may still show
    /// `connected` and `complete` for a few milliseconds while the primary is about to write
    /// without the peer, and a failover then is a real split-brain (seen with
    /// SEED=1796008797 and SEED=1796027031: Reset, then Failover 4 ms later). A link fault
    /// injected before the call is noticed well within the half second.
    fn secondary_in_sync(&mut self) -> bool {
        let (prim, sec) = (self.primary, self.secondary());
        let end = Instant::now() + Duration::from_secs(30);
        let mut since: Option<Instant> = None;
        while Instant::now() < end {
            let mut status = |n: &str| self.p.node(n).try_status().ok();
            let ok = match (status(prim), status(sec)) {
                (Some(p), Some(s)) => {
                    let complete = |s: &serde_json::Value| {
                        s["state"] == "complete" && s["connection"] == "connected"
                    };
                    complete(&p) && complete(&s) && p["local_gen"] == s["peer_gen"]
                }
                _ => false,
            };
            match (ok, since) {
                (false, _) => since = None,
                (true, None) => since = Some(Instant::now()),
                (true, Some(t)) if t.elapsed() >= Duration::from_millis(500) => return true,
                (true, Some(_)) => {}
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }

    /// The primary is gone: wait (bounded) until the secondary noticed, as CARP notices only
    /// after missed advertisements; before that it rightly refuses to be promoted over what it
    /// still sees as a live primary.
    fn lost_primary(&mut self) {
        let sec = self.secondary();
        self.p
            .node(sec)
            .wait_for(30, "the secondary to lose the primary", |s| {
                s["connection"] != "connected"
            });
    }

    fn run(&mut self, step: Step) {
        let (prim, sec) = (self.primary, self.secondary());
        match step {
            Step::Pause(ms) => std::thread::sleep(Duration::from_millis(ms)),
            Step::Failover => {
                if !self.secondary_in_sync() {
                    eprintln!("    (not in sync within 30 s: the failover is a restart)");
                    return self.run(Step::PrimaryRestart);
                }
                eprintln!("    (in sync: failing over)");
                self.aim(None);
                self.p.node(prim).kill9();
                self.lost_primary();
                self.p.node(sec).ok(&["role", "primary", "r0"]);
                self.primary = sec;
                self.aim(Some(sec));
                self.p.node(prim).start_with_env(ENV);
                self.p.node(prim).ok(&["role", "secondary", "r0"]);
            }
            Step::PrimaryRestart => {
                self.aim(None);
                self.p.node(prim).kill9();
                self.p.node(prim).start_with_env(ENV);
                self.p.node(prim).ok(&["role", "primary", "r0"]);
                self.aim(Some(prim));
            }
            Step::SecondaryCrash(ms) => {
                self.p.node(sec).kill9();
                std::thread::sleep(Duration::from_millis(ms));
                self.p.node(sec).start_with_env(ENV);
                self.p.node(sec).ok(&["role", "secondary", "r0"]);
            }
            Step::Switchover => {
                if !self.secondary_in_sync() {
                    eprintln!("    (not in sync within 30 s: no switchover)");
                    return;
                }
                eprintln!("    (in sync: switching over)");
                self.aim(None);
                self.p.node(prim).ok(&["role", "secondary", "r0"]);
                self.p.node(sec).ok(&["role", "primary", "r0"]);
                self.primary = sec;
                self.aim(Some(sec));
            }
            Step::Stall(ms) => {
                self.fault(Fault::Stall);
                std::thread::sleep(Duration::from_millis(ms));
                self.fault(Fault::Pass);
            }
            Step::HalfOpen(ms) => {
                self.fault(Fault::OneWay(Dir::AToB));
                std::thread::sleep(Duration::from_millis(ms));
                self.fault(Fault::Pass);
            }
            Step::Cut(n) => {
                self.fault(Fault::CutAfter(n));
                std::thread::sleep(Duration::from_millis(500));
                self.fault(Fault::Pass);
            }
            Step::Reset => self.proxies.iter().for_each(FaultProxy::reset),
            Step::PowerCutPrimary => {
                let failover = self.secondary_in_sync();
                self.aim(None);
                power_cut(self.p.node(prim));
                if failover {
                    self.lost_primary();
                }
                self.p.node(prim).start_with_env(ENV);
                if failover {
                    self.p.node(sec).ok(&["role", "primary", "r0"]);
                    self.primary = sec;
                    self.p.node(prim).ok(&["role", "secondary", "r0"]);
                } else {
                    self.p.node(prim).ok(&["role", "primary", "r0"]);
                }
                self.aim(Some(self.primary));
            }
            Step::PowerCutSecondary(ms) => {
                power_cut(self.p.node(sec));
                std::thread::sleep(Duration::from_millis(ms));
                self.p.node(sec).start_with_env(ENV);
                self.p.node(sec).ok(&["role", "secondary", "r0"]);
            }
            Step::PowerCutBoth => {
                self.aim(None);
                power_cut(self.p.node(prim));
                power_cut(self.p.node(sec));
                for n in [prim, sec] {
                    self.p.node(n).start_with_env(ENV);
                }
                self.p.node(sec).ok(&["role", "secondary", "r0"]);
                self.p.node(prim).ok(&["role", "primary", "r0"]);
                self.aim(Some(prim));
            }
        }
    }
}

/// `tandem fault r0 power-cut` on `n` (the daemon ends as a machine losing power), then wait
/// until it is gone.
fn power_cut(n: &mut Node) {
    let _ = n.run(&["fault", "r0", "power-cut"]);
    let st = n.wait_exit(20);
    assert!(
        !st.success(),
        "{}: a power cut is not a clean exit: {st}",
        n.name
    );
}

fn schedule(seed: u64) {
    let modes = ["fullsync", "memsync", "async"];
    let mode = match std::env::var("TANDEM_SCHEDULE_MODE") {
        Ok(m) => modes
            .into_iter()
            .find(|x| *x == m)
            .expect("fullsync, memsync or async"),
        Err(_) => modes[(seed % 3) as usize],
    };
    let mut rng = Rng::new(seed);
    let steps: Vec<Step> = (0..STEPS).map(|_| pick(&mut rng)).collect();
    eprintln!("schedule SEED={seed} mode={mode}: {steps:?}");
    // One proxy per direction, each listening on its target's own address: every connection
    // between the daemons, whoever is primary, goes through one, and both daemons' checks of
    // the peer's address still pass.
    let mut p = Pair::new(mode);
    let to_b = FaultProxy::between(
        [127, 0, 0, 3],
        format!("{}:{}", p.b.ip, p.b.port).parse().unwrap(),
        [127, 0, 0, 2],
    );
    let to_a = FaultProxy::between(
        [127, 0, 0, 2],
        format!("{}:{}", p.a.ip, p.a.port).parse().unwrap(),
        [127, 0, 0, 3],
    );
    p.route_via("a", to_b.addr);
    p.route_via("b", to_a.addr);
    let proxies = [to_b, to_a];
    p.a.start_with_env(ENV);
    p.b.start_with_env(ENV);
    p.b.ok(&["role", "secondary", "r0"]);
    p.a.ok(&["role", "primary", "r0"]);
    p.a.ok(&["wait-sync", "r0", "--timeout", "60s"]);
    let target = stamp::target(Some(p.a.nbd.clone()));
    let mut w = World {
        p,
        proxies,
        primary: "a",
        target: Arc::clone(&target),
    };
    let writers = stamp::start(Arc::clone(&target), BLOCKS, 3, 4, seed);
    std::thread::sleep(Duration::from_millis(500));
    for (i, &step) in steps.iter().enumerate() {
        eprintln!(
            "  SEED={seed} step {i}: {step:?} (primary {}, clock {})",
            w.primary,
            writers.log.now()
        );
        w.run(step);
    }
    w.fault(Fault::Pass);
    std::thread::sleep(Duration::from_millis(300));
    let log = writers.stop();
    // A last FLUSH, as an application would before it trusts its data.
    let prim = w.primary;
    let sock = w.sock(prim);
    stamp::Client::connect(&sock, "r0")
        .and_then(|c| c.flush().map_err(std::io::Error::other))
        .unwrap_or_else(|e| panic!("SEED={seed}: final flush on {prim}: {e}"));
    let sec = w.secondary();
    let out = w.p.node(prim).run(&["wait-sync", "r0", "--timeout", "90s"]);
    assert!(
        out.status.success(),
        "SEED={seed}: the pair did not come back in sync: {}\na log:\n{}\nb log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        w.p.a.log_text(),
        w.p.b.log_text()
    );
    w.p.node(sec)
        .wait_for(30, "secondary complete", |s| s["state"] == "complete");
    let blocks = stamp::read_blocks(&sock, BLOCKS);
    let bad = log.check(&blocks);
    let (acked, durable) = log.counts();
    eprintln!("  SEED={seed}: {acked} writes acknowledged, {durable} durable");
    assert!(
        durable > 0,
        "SEED={seed}: no write was made durable: the test tested nothing"
    );
    assert!(
        bad.is_empty(),
        "SEED={seed}: {} violations, first: {:#?}\na log:\n{}\nb log:\n{}",
        bad.len(),
        &bad[..bad.len().min(5)],
        w.p.a.log_text(),
        w.p.b.log_text()
    );
    let v = w.p.node(prim).run(&["verify", "r0"]);
    assert!(
        v.status.success(),
        "SEED={seed}: verify found differences: {}{}",
        String::from_utf8_lossy(&v.stdout),
        String::from_utf8_lossy(&v.stderr)
    );
    for n in ["a", "b"] {
        let text = w.p.node(n).log_text();
        assert!(
            !text.contains("panicked"),
            "SEED={seed}: {n} panicked:\n{text}"
        );
        assert!(
            !text.contains("split-brain: both nodes"),
            "SEED={seed}: split-brain reported on {n}, but no schedule writes both sides apart:\n{text}"
        );
    }
}

#[test]
fn randomised_fault_schedules_lose_no_durable_write_and_leave_identical_replicas() {
    let (first, count) = match std::env::var("SEED").ok().and_then(|s| s.parse().ok()) {
        Some(seed) => (seed, 1),
        None => {
            let count = std::env::var("TANDEM_SCHEDULES")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(3);
            let first = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(1);
            (first, count)
        }
    };
    for i in 0..count {
        schedule(first + i);
    }
}

/// Schedules that once failed, replayed every run: SEED=1796007848 (a promote right after
/// the primary was killed behind a resetting relay gave up a moment before the peer counted
/// as gone) and SEED=1796008797 (a failover right after a link reset, while only the
/// secondary still said `complete`).
#[test]
fn schedules_that_once_failed_pass() {
    if std::env::var("SEED").is_ok() {
        return;
    }
    for seed in [1796007848, 1796008797] {
        schedule(seed);
    }
}
