//! Resync from the primary to the secondary, run by the primary's connector while the export
//! keeps serving, and by `tandem verify --repair` on the live link for the extents it found
//! different.
//!
//! The extents to copy are all of them (full sync) or the union of both dirty maps. Each extent
//! is read and queued under its exclusive stripe lock (see `ExtentLocks`), so an application
//! write that lands during the sync reaches the secondary after the sync data, never before.
//! Up to `WINDOW` bytes are in flight; an extent is marked synced once the peer acknowledged
//! all of it. Extents that read as zeroes are sent as `SyncZero` (a few bytes on the wire).

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Result, bail};

use super::generation::Decision;
use super::hooks::Event;
use super::peer::{Completion, Link, Outcome};
use super::protocol::{self, MAX_DATA, Message, NodeState};
use super::state::Shared;

/// Bytes of sync data in flight at once (the unit tests' 16 MiB disk: less).
const WINDOW: u64 = if cfg!(test) { 2 << 20 } else { 16 << 20 };
/// Sync data after which the peer is asked to make it durable (see `commit` in `copy`).
const FLUSH_EVERY: u64 = if cfg!(test) { 4 << 20 } else { 256 << 20 };
/// Largest sync chunk.
const CHUNK: u64 = 1 << 20;

fn extents_from_bitmap(bitmap: &[u8], count: u64) -> Vec<u64> {
    let mut out = Vec::new();
    for (i, &b) in bitmap.iter().enumerate() {
        for bit in 0..8 {
            let e = i as u64 * 8 + bit;
            if b & (1 << bit) != 0 && e < count {
                out.push(e);
            }
        }
    }
    out
}

/// Copy what `decision` says from this node to the peer, then record the completed sync on
/// both sides.
pub fn run(
    s: &Arc<Shared>,
    link: &Arc<Link>,
    decision: Decision,
    peer: &NodeState,
    stop: &AtomicBool,
) -> Result<()> {
    let am = s.disk.activemap();
    let count = s.disk.extent_count();
    let full = matches!(decision, Decision::FullSync { .. });
    let extents: Vec<u64> = if full {
        (0..count).collect()
    } else {
        let mut v = am.dirty_extents();
        let theirs = extents_from_bitmap(&peer.dirty, count);
        // Remember the peer's dirty extents here too, so an interruption does not lose them.
        am.merge(&theirs)?;
        v.extend(theirs);
        v.sort_unstable();
        v.dedup();
        v
    };
    copy(s, link, &extents, full, peer.local_gen, stop)
}

/// Resync `extents` over a live link that is already in sync (`tandem verify --repair`): they
/// are marked as needing a sync first (persisted, so a crash or a lost link before the end
/// still resyncs them on the next connection), then copied exactly as after connecting. The
/// peer's generation is the one recorded at the end of the last sync, which a secondary does
/// not change while it is connected.
pub fn repair(s: &Arc<Shared>, link: &Arc<Link>, extents: &[u64], stop: &AtomicBool) -> Result<()> {
    s.disk.activemap().merge(extents)?;
    let peer_gen = s.disk.header().peer_gen;
    copy(s, link, extents, false, peer_gen, stop)
}

/// Send `extents` to the peer (SyncStart, data, SyncDone) and record the completed sync on
/// both sides; `peer_gen` is the peer's `local_gen`, recorded here as our `peer_gen`.
fn copy(
    s: &Arc<Shared>,
    link: &Arc<Link>,
    extents: &[u64],
    full: bool,
    peer_gen: u64,
    stop: &AtomicBool,
) -> Result<()> {
    let disk = &s.disk;
    let am = disk.activemap();
    let es = disk.extent_size();
    let size = disk.data_size();
    let ext_len = |e: u64| (size - e * es).min(es);
    let total: u64 = extents.iter().map(|&e| ext_len(e)).sum();
    s.sync.start(total);
    let result = (|| -> Result<()> {
        if !link.send(&Message::SyncStart { total, full }) {
            bail!("link closed");
        }
        if total > 0 || full {
            // The peer marks its copy inconsistent, durably, before it applies sync data.
            // Wait for that (a Flush after the SyncStart) instead of filling the socket
            // meanwhile: on a disk slow to flush, a send blocked for `daemon.timeout` would
            // end the link. The peer pings while it writes its header.
            if !s.peer_flush(link) {
                bail!(
                    "the peer did not confirm the start of the sync: {}",
                    link.last_error().unwrap_or_default()
                );
            }
        }
        if total > 0 {
            log::info!(
                "{}: sync of {} bytes ({} extents) to the peer started",
                s.name,
                total,
                extents.len()
            );
            s.hooks.fire(Event::SyncStart, &s.name, &[]);
        }
        let mut window: VecDeque<(u64, u64, bool, Vec<Arc<Completion>>)> = VecDeque::new();
        // Extents the peer acknowledged as written but has not yet made durable: they are
        // marked synced only after a Flush acknowledged by the peer covers them, so a power
        // loss on the peer mid-sync cannot leave extents clean here that it never persisted.
        let written = std::cell::RefCell::new(Vec::new());
        let mut unflushed = 0u64;
        // The last Flush asked for and the extents it covers (written before it was sent).
        // The sync goes on while the peer writes them out; they are marked synced when that
        // Flush is acknowledged, which is waited for at the next commit or at the end. One
        // Flush at a time: the peer's disk sets the pace, not a pause per Flush.
        let mut committing: Option<(Arc<Completion>, Vec<u64>)> = None;
        let settle = |c: Option<(Arc<Completion>, Vec<u64>)>| -> Result<()> {
            let Some((c, extents)) = c else {
                return Ok(());
            };
            if !c.wait(Outcome::Written) {
                bail!(
                    "the peer did not make sync data durable: {}",
                    link.last_error().unwrap_or_default()
                );
            }
            for e in extents {
                am.mark_synced(e)?;
            }
            Ok(())
        };
        let commit = |committing: &mut Option<(Arc<Completion>, Vec<u64>)>| -> Result<()> {
            settle(committing.take())?;
            let extents = std::mem::take(&mut *written.borrow_mut());
            if !extents.is_empty() {
                *committing = Some((link.submit(|seq| Message::Flush { seq }), extents));
            }
            Ok(())
        };
        let mut in_flight = 0u64;
        let finish = |w: (u64, u64, bool, Vec<Arc<Completion>>)| -> Result<u64> {
            let (e, len, zero, comps) = w;
            for c in comps {
                if !c.wait(Outcome::Written) {
                    bail!(
                        "the peer did not acknowledge sync data: {}",
                        link.last_error().unwrap_or_default()
                    );
                }
            }
            written.borrow_mut().push(e);
            s.sync.done.fetch_add(len, Ordering::Relaxed);
            if !zero {
                s.counters.bytes_resynced.fetch_add(len, Ordering::Relaxed);
            }
            Ok(len)
        };
        for &e in extents {
            if stop.load(Ordering::Acquire) || link.is_dead() {
                bail!("stopped");
            }
            let start = e * es;
            let len = ext_len(e);
            let mut comps = Vec::new();
            #[cfg(test)]
            tests::before_lock(e);
            let zero = {
                let _x = s.locks.exclusive(e);
                // Decided under the lock: an application write that lands before we hold it
                // is already queued to the peer, and must not be followed by a SyncZero that
                // wipes it there.
                let zero = disk.is_zero_extent(e)?;
                if zero {
                    comps.push(link.submit(|seq| Message::SyncZero {
                        seq,
                        offset: start,
                        len,
                    }));
                } else {
                    let chunk = CHUNK.min(MAX_DATA as u64);
                    let mut off = start;
                    while off < start + len {
                        let n = chunk.min(start + len - off) as usize;
                        let mut frame =
                            protocol::encode_sync_chunk(0, off, n, |b| disk.read_at(b, off))?;
                        comps.push(link.submit_frame(|seq| {
                            protocol::set_seq(&mut frame, seq);
                            frame.into()
                        }));
                        off += n as u64;
                    }
                }
                zero
            };
            window.push_back((e, len, zero, comps));
            in_flight += if zero { 0 } else { len };
            while in_flight > WINDOW || window.len() > 64 {
                let Some(w) = window.pop_front() else { break };
                let zero = w.2;
                let len = finish(w)?;
                in_flight -= if zero { 0 } else { len };
                unflushed += len;
            }
            if unflushed >= FLUSH_EVERY {
                commit(&mut committing)?;
                unflushed = 0;
            }
        }
        while let Some(w) = window.pop_front() {
            finish(w)?;
        }
        commit(&mut committing)?;
        settle(committing.take())?;
        // Application writes completed since that FLUSH are cleared in memory; their clears
        // reach the disk only behind a barrier (local fdatasync, peer FLUSH), else a crash of
        // either node could leave such a write clean here and missing there.
        am.flush_clean_behind(|| disk.sync_data().is_ok() && s.peer_flush(link))?;
        let local_gen = disk.header().local_gen;
        let c = link.submit(|seq| Message::SyncDone { seq, local_gen });
        if !c.wait(Outcome::Written) {
            bail!("the peer did not confirm the end of the sync");
        }
        disk.update_header(|h| {
            h.peer_gen = peer_gen;
            h.ever_synced = true;
            h.split_brain = false;
        })?;
        Ok(())
    })();
    s.sync.stop();
    match &result {
        Ok(()) if total > 0 => {
            log::info!("{}: sync complete ({} bytes)", s.name, total);
            s.hooks.fire(Event::SyncDone, &s.name, &[]);
        }
        Ok(()) => {}
        Err(_) => s.hooks.fire(Event::SyncIntr, &s.name, &[]),
    }
    result
}

#[cfg(test)]
pub(crate) mod tests {
    use std::cell::RefCell;
    use std::io::Write;
    use std::net::{TcpListener, TcpStream};
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;
    use std::time::Duration;

    use crate::daemon::generation::Decision;
    use crate::daemon::peer::Link;
    use crate::daemon::protocol::{self, AckKind, MAX_FRAME, Message, NodeState};

    type Hook = Box<dyn FnMut(u64)>;
    /// The fake secondary's thread; it returns what it was sent (kind, offset).
    type FakePeer = std::thread::JoinHandle<Vec<(&'static str, u64)>>;

    thread_local! {
        static BEFORE_LOCK: RefCell<Option<Hook>> = RefCell::new(None);
    }

    /// Called by `run` just before it takes an extent's stripe lock (tests only).
    pub(crate) fn before_lock(e: u64) {
        BEFORE_LOCK.with(|h| {
            if let Some(f) = h.borrow_mut().as_mut() {
                f(e)
            }
        });
    }

    /// A primary of a 16 MiB disk (1 MiB extents, all dirty as after `create`) and a fake
    /// secondary that acknowledges sync data as written and records what it was sent; with
    /// `lose_power = Some(n)`, it drops the connection instead of acknowledging its n-th
    /// Flush or SyncDone (the moment its data would have become durable).
    fn setup(
        dir: &std::path::Path,
        lose_power: Option<usize>,
    ) -> (crate::daemon::resource::Handle, Arc<Link>, FakePeer) {
        let handle = crate::daemon::resource::start_for_test(dir, "a");
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        server
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let fake = std::thread::spawn(move || {
            let mut w = server.try_clone().unwrap();
            let mut r = std::io::BufReader::new(server);
            let mut seen = Vec::new();
            let mut barriers = 0;
            while let Ok(m) = protocol::read_message(&mut r, MAX_FRAME) {
                let seq = match &m {
                    Message::SyncZero { seq, offset, .. } => {
                        seen.push(("zero", *offset));
                        *seq
                    }
                    Message::SyncChunk { seq, offset, .. } => {
                        seen.push(("data", *offset));
                        *seq
                    }
                    // The Flush that confirms the SyncStart, before any data.
                    Message::Flush { seq } if !seen.iter().any(|x| x.0 != "start") => {
                        seen.push(("start", 0));
                        *seq
                    }
                    Message::SyncDone { seq, .. } | Message::Flush { seq } => {
                        barriers += 1;
                        seen.push(("barrier", barriers as u64));
                        if lose_power == Some(barriers) {
                            let _ = w.shutdown(std::net::Shutdown::Both);
                            break;
                        }
                        *seq
                    }
                    _ => continue,
                };
                let ack = Message::Ack {
                    seq,
                    kind: AckKind::Written,
                    status: 0,
                };
                if w.write_all(&ack.encode()).is_err() {
                    break;
                }
            }
            seen
        });
        let link = Link::start(
            crate::daemon::channel::Channel::clear(client).unwrap(),
            Duration::from_secs(10),
            Duration::from_secs(10),
            Duration::from_secs(2),
        )
        .unwrap();
        (handle, link, fake)
    }

    /// An application write that lands on a zero extent just before the sync locks it must
    /// not be followed by a SyncZero for that extent (the secondary, which already received
    /// the write, would zero it; the extent would then be marked in sync).
    #[test]
    fn write_racing_the_zero_check_is_sent_as_data() {
        let dir = tempfile::tempdir().unwrap();
        let (handle, link, fake) = setup(dir.path(), None);
        let s = Arc::clone(&handle.shared);
        let disk = Arc::clone(&s.disk);
        BEFORE_LOCK.with(|h| {
            *h.borrow_mut() = Some(Box::new(move |e| {
                if e == 3 {
                    disk.write_at(&[0x5a; 4096], 3 << 20).unwrap();
                }
            }))
        });
        let stop = AtomicBool::new(false);
        super::run(
            &s,
            &link,
            Decision::FullSync { skip_zero: false },
            &NodeState::default(),
            &stop,
        )
        .unwrap();
        BEFORE_LOCK.with(|h| *h.borrow_mut() = None);
        link.kill("test done");
        let seen = fake.join().unwrap();
        handle.stop();
        assert!(
            seen.contains(&("data", 3 << 20)) && !seen.contains(&("zero", 3 << 20)),
            "extent 3 was written before the sync locked it, yet was sent as: {:?}",
            seen.iter().filter(|x| x.1 == 3 << 20).collect::<Vec<_>>()
        );
    }

    /// Sync data the peer acknowledged but never made durable (it lost power before the
    /// flush) must stay dirty here: the next resync has to send it again.
    #[test]
    fn extents_stay_dirty_until_the_peer_made_them_durable() {
        let dir = tempfile::tempdir().unwrap();
        let (handle, link, fake) = setup(dir.path(), Some(1));
        let s = Arc::clone(&handle.shared);
        let count = s.disk.extent_count();
        let stop = AtomicBool::new(false);
        let r = super::run(&s, &link, Decision::DirtySync, &NodeState::default(), &stop);
        assert!(r.is_err(), "the sync cannot complete without the peer");
        let seen = fake.join().unwrap();
        assert_eq!(
            seen.first(),
            Some(&("start", 0)),
            "sync data went out before the peer confirmed the start of the sync: {seen:?}"
        );
        let sent = seen
            .iter()
            .filter(|x| x.0 == "data" || x.0 == "zero")
            .count() as u64;
        assert_eq!(sent, count, "every extent was sent: {seen:?}");
        let dirty = s.disk.activemap().dirty_count();
        handle.stop();
        assert_eq!(
            dirty, count,
            "extents the peer never made durable were marked in sync"
        );
    }

    /// An extent is clean here only once a Flush sent after it was acknowledged, also now
    /// that the sync sends on while a Flush is outstanding: the peer loses power at its
    /// second Flush, so only extents sent before the first can be in sync, and everything
    /// sent after it stays dirty.
    #[test]
    fn only_extents_a_flush_covered_are_clean_after_the_peer_lost_power() {
        let dir = tempfile::tempdir().unwrap();
        let (handle, link, fake) = setup(dir.path(), Some(2));
        let s = Arc::clone(&handle.shared);
        let count = s.disk.extent_count();
        // Data in every extent: sent as data, which is what Flushes are counted by.
        for e in 0..count {
            s.disk.write_at(&[0x5a; 4096], e << 20).unwrap();
        }
        let stop = AtomicBool::new(false);
        let r = super::run(&s, &link, Decision::DirtySync, &NodeState::default(), &stop);
        assert!(r.is_err(), "the sync cannot complete without the peer");
        let seen = fake.join().unwrap();
        let dirty: Vec<u64> = s.disk.activemap().dirty_extents();
        handle.stop();
        let first = seen.iter().position(|x| *x == ("barrier", 1)).unwrap();
        let covered: Vec<u64> = seen[..first]
            .iter()
            .filter(|x| x.0 == "data")
            .map(|x| x.1 >> 20)
            .collect();
        let after = seen[first..].iter().filter(|x| x.0 == "data").count();
        assert!(
            after > 0,
            "nothing was sent between the two Flushes: the test misses its point: {seen:?}"
        );
        let clean: Vec<u64> = (0..count).filter(|e| !dirty.contains(e)).collect();
        assert!(
            !clean.is_empty(),
            "the acknowledged Flush made nothing clean: {seen:?}"
        );
        for e in clean {
            assert!(
                covered.contains(&e),
                "extent {e} is clean but was sent after the last acknowledged Flush: {seen:?}"
            );
        }
    }

    #[test]
    fn bitmap_to_extents() {
        assert_eq!(
            super::extents_from_bitmap(&[0b1000_0001, 0b0000_0011], 9),
            vec![0, 7, 8]
        );
    }
}
