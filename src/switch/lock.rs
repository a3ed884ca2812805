//! Serialisation and newest-event-wins.
//!
//! Every switch records its event under a short flock on the sequence file (`LOCK.seq`,
//! beside `switch.lock`): it takes the next sequence number and becomes the newest event for
//! each of its resources. Then it waits for the exclusive flock on `switch.lock`. A waiting
//! event whose resources all got a newer event gives up (exit 75, nothing done); one that
//! keeps some resources acts on those only.
//!
//! The sequence file, text: `next N`, one `res NAME SEQ` per resource,
//! `last SEQ WORD running|done` (the event being applied or applied last), and
//! `finished SEQ WORD ok|failed END_UNIX_SECONDS DURATION_SECONDS` (the last event that ran to
//! its end, which the daemon exports as metrics).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use crate::config::format_duration;
use crate::exit::Superseded;

#[derive(Debug, Default, Clone, PartialEq)]
pub struct SeqState {
    pub next: u64,
    pub newest: BTreeMap<String, u64>,
    pub last: Option<(u64, String, bool)>,
    pub finished: Option<Finished>,
}

/// The last switch event that ran to its end.
#[derive(Debug, Clone, PartialEq)]
pub struct Finished {
    pub seq: u64,
    /// master | slave
    pub word: String,
    pub ok: bool,
    /// Unix time of its end, and how long it took from its start.
    pub ended: f64,
    pub seconds: f64,
}

impl SeqState {
    fn parse(text: &str) -> SeqState {
        let mut s = SeqState::default();
        for line in text.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            match f.as_slice() {
                ["next", n] => s.next = n.parse().unwrap_or(0),
                ["res", name, n] => {
                    s.newest.insert(name.to_string(), n.parse().unwrap_or(0));
                }
                ["last", n, word, st] => {
                    s.last = Some((n.parse().unwrap_or(0), word.to_string(), *st == "running"))
                }
                ["finished", n, word, result, ended, secs] => {
                    s.finished = Some(Finished {
                        seq: n.parse().unwrap_or(0),
                        word: word.to_string(),
                        ok: *result == "ok",
                        ended: ended.parse().unwrap_or(0.0),
                        seconds: secs.parse().unwrap_or(0.0),
                    })
                }
                _ => {}
            }
        }
        s
    }

    fn render(&self) -> String {
        let mut out = format!("next {}\n", self.next);
        for (k, v) in &self.newest {
            out += &format!("res {k} {v}\n");
        }
        if let Some((n, w, running)) = &self.last {
            out += &format!(
                "last {n} {w} {}\n",
                if *running { "running" } else { "done" }
            );
        }
        if let Some(f) = &self.finished {
            out += &format!(
                "finished {} {} {} {:.3} {:.3}\n",
                f.seq,
                f.word,
                if f.ok { "ok" } else { "failed" },
                f.ended,
                f.seconds
            );
        }
        out
    }
}

fn seq_path(lock: &Path) -> PathBuf {
    let mut p = lock.as_os_str().to_owned();
    p.push(".seq");
    PathBuf::from(p)
}

fn open_rw(path: &Path) -> Result<File> {
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() && !dir.exists() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
    }
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))
}

/// Read-modify-write the sequence file under its own short exclusive flock.
fn with_seq<T>(lock: &Path, f: impl FnOnce(&mut SeqState) -> T) -> Result<T> {
    let path = seq_path(lock);
    let file = open_rw(&path)?;
    let mut file = Flock::lock(file, FlockArg::LockExclusive)
        .map_err(|(_, e)| anyhow::anyhow!("cannot lock {}: {e}", path.display()))?;
    let mut text = String::new();
    file.read_to_string(&mut text)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let mut st = SeqState::parse(&text);
    let before = st.clone();
    let out = f(&mut st);
    if st != before {
        let data = st.render();
        file.seek(SeekFrom::Start(0))?;
        file.set_len(0)?;
        file.write_all(data.as_bytes())
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(out)
}

/// Read the sequence file (for `status` and tests); a missing file is an empty state.
pub fn read_state(lock: &Path) -> SeqState {
    std::fs::read_to_string(seq_path(lock))
        .map(|t| SeqState::parse(&t))
        .unwrap_or_default()
}

/// Record how event `seq` (`word`) ended, for the daemon's metrics.
pub fn finish(lock: &Path, seq: u64, word: &str, ok: bool, took: Duration) -> Result<()> {
    let ended = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    with_seq(lock, |st| {
        st.finished = Some(Finished {
            seq,
            word: word.to_string(),
            ok,
            ended,
            seconds: took.as_secs_f64(),
        })
    })
}

/// An event that has its sequence number.
#[derive(Debug)]
pub struct Ticket {
    pub seq: u64,
    pub resources: Vec<String>,
}

/// Record an event for `resources`: it becomes the newest for each of them.
pub fn record(lock: &Path, resources: &[String]) -> Result<Ticket> {
    let seq = with_seq(lock, |st| {
        st.next += 1;
        for r in resources {
            st.newest.insert(r.clone(), st.next);
        }
        st.next
    })?;
    Ok(Ticket {
        seq,
        resources: resources.to_vec(),
    })
}

/// The resources of `t` for which no newer event was recorded.
fn still_newest(lock: &Path, t: &Ticket) -> Result<Vec<String>> {
    with_seq(lock, |st| {
        t.resources
            .iter()
            .filter(|r| st.newest.get(*r).copied().unwrap_or(0) <= t.seq)
            .cloned()
            .collect()
    })
}

/// Holding `switch.lock`: this event may act on `resources`.
#[derive(Debug)]
pub struct Guard {
    lock_path: PathBuf,
    _lock: Flock<File>,
    pub seq: u64,
    pub resources: Vec<String>,
}

fn superseded(t: &Ticket) -> anyhow::Error {
    Superseded(format!(
        "event #{} superseded by a newer event for {}: nothing done",
        t.seq,
        t.resources.join(", ")
    ))
    .into()
}

/// Wait (at most `timeout`) for the exclusive lock. Superseded as soon as every resource of
/// the ticket got a newer event, while waiting or once the lock is held.
pub fn acquire(lock: &Path, ticket: &Ticket, word: &str, timeout: Duration) -> Result<Guard> {
    let deadline = Instant::now() + timeout;
    let mut file = open_rw(lock)?;
    let held = loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(l) => break l,
            Err((f, Errno::EWOULDBLOCK)) => file = f,
            Err((_, e)) => anyhow::bail!("cannot lock {}: {e}", lock.display()),
        }
        if still_newest(lock, ticket)?.is_empty() {
            return Err(superseded(ticket));
        }
        if Instant::now() >= deadline {
            anyhow::bail!(
                "event #{}: {} is still held by another switch after {}; nothing done",
                ticket.seq,
                lock.display(),
                format_duration(timeout)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let resources = still_newest(lock, ticket)?;
    if resources.is_empty() {
        return Err(superseded(ticket));
    }
    with_seq(lock, |st| {
        st.last = Some((ticket.seq, word.to_string(), true))
    })?;
    Ok(Guard {
        lock_path: lock.to_path_buf(),
        _lock: held,
        seq: ticket.seq,
        resources,
    })
}

impl Guard {
    /// Which of this event's resources are still its own (a newer event may have arrived
    /// during the settle delay).
    pub fn recheck(&self) -> Result<Vec<String>> {
        still_newest(
            &self.lock_path,
            &Ticket {
                seq: self.seq,
                resources: self.resources.clone(),
            },
        )
    }

    /// Mark the event as applied (whatever the outcome) before the lock is released.
    pub fn done(&self) {
        let _ = with_seq(&self.lock_path, |st| {
            if let Some(last) = st.last.as_mut() {
                if last.0 == self.seq {
                    last.2 = false;
                }
            }
        });
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.done();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_event_wins_per_resource() {
        let dir = tempfile::tempdir().unwrap();
        let lock = dir.path().join("switch.lock");
        let a = record(&lock, &["r1".into(), "r2".into()]).unwrap();
        let b = record(&lock, &["r1".into()]).unwrap();
        assert_eq!((a.seq, b.seq), (1, 2));
        let g = acquire(&lock, &a, "master", Duration::from_secs(1)).unwrap();
        assert_eq!(g.resources, vec!["r2".to_string()]);
        // b waits while a holds the lock, then times out.
        let e = acquire(&lock, &b, "slave", Duration::from_millis(100)).unwrap_err();
        assert!(format!("{e}").contains("still held"), "{e}");
        drop(g);
        let c = record(&lock, &["r1".into()]).unwrap();
        let e = acquire(&lock, &b, "slave", Duration::from_secs(1)).unwrap_err();
        assert_eq!(crate::exit::code_for(&e), crate::exit::SUPERSEDED);
        let g = acquire(&lock, &c, "slave", Duration::from_secs(1)).unwrap();
        assert_eq!(read_state(&lock).last, Some((3, "slave".into(), true)));
        drop(g);
        assert_eq!(read_state(&lock).last, Some((3, "slave".into(), false)));
        finish(&lock, 3, "slave", false, Duration::from_millis(1500)).unwrap();
        let f = read_state(&lock).finished.unwrap();
        assert_eq!(
            (f.seq, f.word.as_str(), f.ok, f.seconds),
            (3, "slave", false, 1.5)
        );
        assert!(f.ended > 1.7e9, "{f:?}");
        // The other lines survive a later event.
        record(&lock, &["r1".into()]).unwrap();
        assert_eq!(read_state(&lock).finished.unwrap().seq, 3);
    }
}
