//! Online verify (`tandem verify`, DRBD's verify): while the export keeps serving, the primary
//! and the secondary hash every extent with SHA-256 and compare; the extents whose digests
//! differ are logged and reported and, with `--repair`, resynced from the primary.
//!
//! Why the two digests cover the same writes: the primary queues `VerifyRequest{extent}` on
//! the replication link and hashes its own copy while holding the extent's exclusive stripe
//! lock. An application write holds its extents' stripes shared while it writes locally and
//! queues its frame; so every write to the extent that the local hash sees was queued before
//! the request, and every write it does not see is queued after it. The secondary applies the
//! link's frames in order, one at a time, and hashes the extent when it reaches the request.
//! A concurrent write therefore never causes a false difference. The lock is held for one
//! extent at a time (one extent read), so writers wait at most that long.
//!
//! Not owned here: the resync of a repair (`sync::repair`), the wire format (`protocol.rs`),
//! the secondary's answer (`secondary.rs`).

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::Role;
use super::control::{DifferingExtent, ErrorKind, VerifyResult};
use super::hooks::Event;
use super::metadata::Disk;
use super::peer::{Completion, Outcome};
use super::protocol::DIGEST_LEN;
use super::state::{Connection, RoleError, Shared};
use super::sync;

/// Default hashing rate per node (bytes per second) when the request names none: about what
/// a 1 Gbit/s resync moves, so a verify costs the disks no more than a resync does.
pub const DEFAULT_RATE: u64 = 100 << 20;
/// Extents are read in chunks of this size.
const CHUNK: u64 = 1 << 20;
/// Verify requests in flight: the secondary hashes the next extent while the reply to the
/// previous one travels back.
const WINDOW: usize = 8;

/// SHA-256 of extent `extent` of the data region (the last extent up to the data size),
/// read in chunks, with `between` called between them (the secondary pings the primary
/// there: an extent may be up to 1 GiB, seconds of reading on a busy disk).
pub fn hash_extent(
    disk: &Disk,
    extent: u64,
    mut between: impl FnMut() -> io::Result<()>,
) -> io::Result<[u8; DIGEST_LEN]> {
    if extent >= disk.extent_count() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "extent {extent} is beyond the last extent {}",
                disk.extent_count().saturating_sub(1)
            ),
        ));
    }
    let start = extent * disk.extent_size();
    let end = (start + disk.extent_size()).min(disk.data_size());
    let mut h = Sha256::new();
    let mut buf = vec![0u8; CHUNK.min(end - start) as usize];
    let mut off = start;
    while off < end {
        let n = CHUNK.min(end - off) as usize;
        disk.read_at(&mut buf[..n], off)?;
        h.update(&buf[..n]);
        off += n as u64;
        if off < end {
            between()?;
        }
    }
    Ok(h.finalize().into())
}

/// What the caller asked for.
pub struct Options {
    pub repair: bool,
    /// Bytes hashed per second on each node; 0: unlimited.
    pub rate: u64,
}

fn failed(message: String) -> RoleError {
    RoleError::new(ErrorKind::Failed, message)
}

/// Verify every extent of the resource against the peer; only on a primary with a connected,
/// in-sync peer. With `repair`, the differing extents are resynced before this returns.
pub fn run(s: &Arc<Shared>, opts: Options) -> Result<VerifyResult, RoleError> {
    let name = &s.name;
    let role = s.role();
    if role != Role::Primary {
        return Err(RoleError::new(
            ErrorKind::Usage,
            format!(
                "{name}: this node is {}; run verify on the primary",
                role.name()
            ),
        ));
    }
    let Ok(_only) = s.verifying.try_lock() else {
        return Err(failed(format!("{name}: a verify is already running")));
    };
    let st = s.status();
    let link = match s.link() {
        Some(l) if s.conn().connection == Connection::Connected => l,
        _ => {
            return Err(failed(format!(
                "{name}: not connected to the peer (connection {}, state {}); verify needs a connected, in-sync peer",
                st.connection, st.state
            )));
        }
    };
    if st.state != "complete" {
        return Err(failed(format!(
            "{name}: the peer is not in sync (state {}); wait for the resync (`tandem wait-sync {name}`) and verify again",
            st.state
        )));
    }
    let disk = &s.disk;
    let (count, es, size) = (disk.extent_count(), disk.extent_size(), disk.data_size());
    let ext_len = |e: u64| (size - e * es).min(es);
    log::info!(
        "{name}: verify of {size} bytes ({count} extents) against {} started{}",
        link.peer(),
        match opts.rate {
            0 => String::new(),
            r => format!(" (at most {r} bytes/s)"),
        }
    );
    let started = Instant::now();
    s.verify.start(size);
    let mut differing = Vec::new();
    let result = (|| -> Result<(), RoleError> {
        let mut window: VecDeque<(u64, [u8; DIGEST_LEN], Arc<Completion>)> = VecDeque::new();
        let mut finish = |(e, ours, c): (u64, [u8; DIGEST_LEN], Arc<Completion>)| {
            if !c.wait(Outcome::Written) {
                return Err(failed(format!(
                    "{name}: lost the peer {} during verify: {}",
                    link.peer(),
                    link.last_error().unwrap_or_default()
                )));
            }
            if c.digest() != Some(ours) {
                log::warn!(
                    "{name}: verify: extent {e} (offset {}, {} bytes) differs between the nodes",
                    e * es,
                    ext_len(e)
                );
                differing.push(e);
            }
            s.verify.done.fetch_add(ext_len(e), Ordering::Relaxed);
            Ok(())
        };
        let mut hashed = 0u64;
        for e in 0..count {
            if link.is_dead() || s.role() != Role::Primary {
                return Err(failed(format!(
                    "{name}: verify interrupted after {e} of {count} extents: {}",
                    link.last_error()
                        .unwrap_or_else(|| "the role changed".into())
                )));
            }
            throttle(started, hashed, opts.rate);
            let entry = {
                let _x = s.locks.exclusive(e);
                let c = link.submit_verify(e);
                let ours = hash_extent(disk, e, || Ok(())).map_err(|err| {
                    failed(format!(
                        "{name}: verify: reading extent {e} of the local disk: {err}"
                    ))
                })?;
                (e, ours, c)
            };
            hashed += ext_len(e);
            window.push_back(entry);
            while window.len() > WINDOW {
                if let Some(w) = window.pop_front() {
                    finish(w)?;
                }
            }
        }
        while let Some(w) = window.pop_front() {
            finish(w)?;
        }
        Ok(())
    })();
    s.verify.stop();
    result?;
    log::info!(
        "{name}: verify done: {} of {count} extents differ ({:.1} s)",
        differing.len(),
        started.elapsed().as_secs_f64()
    );
    s.hooks
        .fire(Event::Verify, name, &[&differing.len().to_string()]);
    let mut repaired = false;
    if opts.repair && !differing.is_empty() {
        // On the live link, like the resync after connecting: no reconnect, so no failed
        // in-flight writes and no generation bump. If it fails, the extents stay marked and
        // the link is dropped, so the reconnect resyncs them.
        let stop = AtomicBool::new(false);
        match sync::repair(s, &link, &differing, &stop) {
            Ok(()) => {
                log::info!(
                    "{name}: verify: {} differing extents resynced from this node",
                    differing.len()
                );
                repaired = true;
            }
            Err(e) => {
                log::error!(
                    "{name}: verify: repair interrupted ({e:#}); the extents stay marked for the resync after the reconnect"
                );
                link.kill("repair interrupted");
            }
        }
    }
    Ok(VerifyResult {
        resource: name.clone(),
        extents_checked: count,
        bytes_checked: size,
        differing: differing
            .iter()
            .map(|&e| DifferingExtent {
                extent: e,
                offset: e * es,
                length: ext_len(e),
            })
            .collect(),
        repaired,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Sleep until `done` bytes are no more than `rate` bytes per second since `started`.
fn throttle(started: Instant, done: u64, rate: u64) {
    if rate == 0 {
        return;
    }
    let due = Duration::from_secs_f64(done as f64 / rate as f64);
    if let Some(wait) = due.checked_sub(started.elapsed()) {
        thread::sleep(wait);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttle_keeps_the_rate() {
        let t = Instant::now();
        throttle(t, 0, 1000);
        throttle(t, 1 << 40, 0);
        assert!(t.elapsed() < Duration::from_millis(100));
        throttle(t, 300, 1000);
        assert!(t.elapsed() >= Duration::from_millis(300));
    }
}
