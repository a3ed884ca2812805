//! Resync from the primary to the secondary, run by the primary's connector while the export
//! keeps serving.
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
use super::resource::Shared;

/// Bytes of sync data in flight at once.
const WINDOW: u64 = 16 << 20;
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
    let disk = &s.disk;
    let am = disk.activemap();
    let count = disk.extent_count();
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
    let es = disk.extent_size();
    let size = disk.data_size();
    let ext_len = |e: u64| (size - e * es).min(es);
    let total: u64 = extents.iter().map(|&e| ext_len(e)).sum();
    s.sync.start(total);
    let result = (|| -> Result<()> {
        if !link.send(&Message::SyncStart { total, full }) {
            bail!("link closed");
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
            am.mark_synced(e)?;
            s.sync.done.fetch_add(len, Ordering::Relaxed);
            if !zero {
                s.counters.bytes_resynced.fetch_add(len, Ordering::Relaxed);
            }
            Ok(len)
        };
        for &e in &extents {
            if stop.load(Ordering::Acquire) || link.is_dead() {
                bail!("stopped");
            }
            let start = e * es;
            let len = ext_len(e);
            let zero = disk.is_zero_extent(e)?;
            let mut comps = Vec::new();
            {
                let _x = s.locks.exclusive(e);
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
                            frame
                        }));
                        off += n as u64;
                    }
                }
            }
            window.push_back((e, len, zero, comps));
            in_flight += if zero { 0 } else { len };
            while in_flight > WINDOW || window.len() > 64 {
                let Some(w) = window.pop_front() else { break };
                let zero = w.2;
                let len = finish(w)?;
                in_flight -= if zero { 0 } else { len };
            }
        }
        while let Some(w) = window.pop_front() {
            finish(w)?;
        }
        am.flush_clean()?;
        let local_gen = disk.header().local_gen;
        let c = link.submit(|seq| Message::SyncDone { seq, local_gen });
        if !c.wait(Outcome::Written) {
            bail!("the peer did not confirm the end of the sync");
        }
        disk.update_header(|h| {
            h.peer_gen = peer.local_gen;
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
mod tests {
    #[test]
    fn bitmap_to_extents() {
        assert_eq!(
            super::extents_from_bitmap(&[0b1000_0001, 0b0000_0011], 9),
            vec![0, 7, 8]
        );
    }
}
