//! The dirty-extent map (HAST's activemap, DRBD's bitmap): which extents of the data region
//! may differ between the two nodes and must be resynced.
//!
//! The rule that makes it crash safe: a dirty bit is on disk (written and synced: its page
//! alone, with `RWF_DSYNC` on Linux) before the first write to a clean extent is issued, and a clean bit is only written once
//! the extent's data is on both nodes. A stale dirty bit costs a little extra resync; a stale
//! clean bit would lose data.
//!
//! Like hastd's `keepdirty`, the most recently written extents stay dirty after their writes
//! completed, so a hot extent costs no metadata write per data write. Clears reach the disk
//! only through [`ActiveMap::flush_clean`] (all of them) and [`ActiveMap::flush_idle`] (those
//! of extents not written since its previous call), never with a page written for a new dirty
//! bit: writing them there made a random workload over more extents than `keepdirty` re-dirty
//! (write + fdatasync, under the map's lock) an extent on every other write.
//!
//! Memory: three bitmaps (in memory, as persisted, needs-sync), a map of in-flight write
//! counts for the extents being written, and the `keepdirty` LRU: about 200 KiB for
//! 1 TiB with 2 MiB extents. Not owned here: the sync itself, which the engine drives with
//! [`ActiveMap::dirty_extents`] and [`ActiveMap::mark_synced`].

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::{Mutex, MutexGuard};

use super::faultdisk::DiskFile;

/// How many recently written extents stay dirty (hastd's default).
pub const DEFAULT_KEEPDIRTY: usize = 64;
/// The bitmap is written in pages of this many bytes (32768 extents per page).
const PAGE: usize = 4096;

pub struct ActiveMap {
    file: DiskFile,
    bitmap_offset: u64,
    extent_size: u64,
    data_size: u64,
    extents: u64,
    inner: Mutex<Inner>,
}

struct Inner {
    /// What must be treated as dirty now. Always a superset of the extents whose data may
    /// differ on the peer.
    dirty: Vec<u8>,
    /// What we know is on disk. A set bit here is certainly set on disk.
    ondisk: Vec<u8>,
    /// Extents the peer is known (or feared) to lack: never cleared except by `mark_synced`.
    needs_sync: Vec<u8>,
    /// In-flight write counts, only for extents with writes in flight.
    inflight: HashMap<u64, u32>,
    /// The `keepdirty` most recently written extents, most recent first.
    lru: VecDeque<u64>,
    /// Extents written since the last `flush_idle`: their on-disk dirty bits stay.
    recent: Vec<u8>,
    keepdirty: usize,
}

fn get(v: &[u8], e: u64) -> bool {
    v[(e / 8) as usize] & (1 << (e % 8)) != 0
}

fn set(v: &mut [u8], e: u64) {
    v[(e / 8) as usize] |= 1 << (e % 8);
}

fn clear(v: &mut [u8], e: u64) {
    v[(e / 8) as usize] &= !(1 << (e % 8));
}

fn page_of(e: u64) -> usize {
    (e / 8) as usize / PAGE
}

fn page_range(len: usize, page: usize) -> std::ops::Range<usize> {
    page * PAGE..((page + 1) * PAGE).min(len)
}

fn einval(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

impl Inner {
    /// Clear an extent in memory if that is safe: no write in flight, not missed by the
    /// peer, not among the recently written extents.
    fn try_clear(&mut self, e: u64) {
        if !self.inflight.contains_key(&e) && !get(&self.needs_sync, e) && !self.lru.contains(&e) {
            clear(&mut self.dirty, e);
        }
    }

    fn touch(&mut self, e: u64) {
        if let Some(pos) = self.lru.iter().position(|&x| x == e) {
            self.lru.remove(pos);
        }
        self.lru.push_front(e);
        self.trim_lru();
    }

    fn trim_lru(&mut self) {
        while self.lru.len() > self.keepdirty {
            if let Some(old) = self.lru.pop_back() {
                self.try_clear(old);
            }
        }
    }
}

/// One write's hold on its extents, from [`ActiveMap::begin_write`] until
/// [`WriteGuard::done`]. Dropping it without `done` counts as `done(false)`.
pub struct WriteGuard<'a> {
    map: &'a ActiveMap,
    /// First and last extent, or None for an empty write.
    range: Option<(u64, u64)>,
    finished: bool,
}

impl WriteGuard<'_> {
    /// The write completed. `replicated`: the peer has the data too; if false the extents
    /// stay dirty until resynced.
    pub fn done(mut self, replicated: bool) {
        self.finish(replicated);
    }

    /// Keep the extents in flight past this guard: the peer acknowledges later (memsync,
    /// async). Until `ActiveMap::complete_pending` is called the extents stay dirty, so a
    /// crash meanwhile leaves them marked for resync.
    pub fn defer(mut self) -> Pending {
        self.finished = true;
        Pending { range: self.range }
    }

    /// The extents this write covers (first, last), None for an empty write.
    pub fn extents(&self) -> Option<(u64, u64)> {
        self.range
    }

    fn finish(&mut self, replicated: bool) {
        if self.finished {
            return;
        }
        self.finished = true;
        if let Some((first, last)) = self.range {
            self.map.complete(first, last, replicated);
        }
    }
}

/// A write whose extents stay in flight until the peer's final acknowledgement
/// (`WriteGuard::defer`). Dropping it without `complete_pending` leaves them dirty.
#[derive(Debug)]
pub struct Pending {
    range: Option<(u64, u64)>,
}

impl Drop for WriteGuard<'_> {
    fn drop(&mut self) {
        self.finish(false);
    }
}

impl ActiveMap {
    /// The deferred write is final: `replicated` as for `WriteGuard::done`.
    pub fn complete_pending(&self, p: Pending, replicated: bool) {
        if let Some((first, last)) = p.range {
            self.complete(first, last, replicated);
        }
    }

    /// Read the persisted map: `file` is the disk, the bitmap starts at `bitmap_offset`.
    /// Every extent dirty on disk is taken as needing a sync (we cannot know better after a
    /// crash).
    pub fn load(
        file: DiskFile,
        bitmap_offset: u64,
        extent_size: u64,
        data_size: u64,
    ) -> io::Result<ActiveMap> {
        if extent_size == 0 {
            return Err(einval("extent size 0".into()));
        }
        let extents = data_size.div_ceil(extent_size);
        let len = extents.div_ceil(8) as usize;
        let mut ondisk = vec![0u8; len];
        file.read_exact_at(&mut ondisk, bitmap_offset)?;
        let mut dirty = ondisk.clone();
        if extents % 8 != 0
            && let Some(last) = dirty.last_mut()
        {
            *last &= (1u8 << (extents % 8)) - 1;
        }
        let needs_sync = dirty.clone();
        let recent = vec![0u8; len];
        Ok(ActiveMap {
            file,
            bitmap_offset,
            extent_size,
            data_size,
            extents,
            inner: Mutex::new(Inner {
                dirty,
                ondisk,
                needs_sync,
                recent,
                inflight: HashMap::new(),
                lru: VecDeque::with_capacity(DEFAULT_KEEPDIRTY + 1),
                keepdirty: DEFAULT_KEEPDIRTY,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    #[cfg(test)]
    pub fn extent_count(&self) -> u64 {
        self.extents
    }

    #[cfg(test)]
    /// Change how many recently written extents stay dirty.
    pub fn set_keepdirty(&self, n: usize) {
        let mut inner = self.lock();
        inner.keepdirty = n;
        inner.trim_lru();
    }

    /// Write the given bitmap pages with the new dirty bits added (clears are left for
    /// `flush_clean`/`flush_idle`) and fdatasync.
    ///
    /// Only these pages are made durable (a ranged sync: `RWF_DSYNC` on Linux), not the data
    /// region: a new dirty bit needs nothing else on disk first, and an fdatasync of the whole
    /// file here made each write to a clean extent wait for all the data written before it.
    fn persist_pages(&self, inner: &mut Inner, pages: &mut Vec<usize>) -> io::Result<()> {
        self.write_pages(inner, pages, true, |_, dirty, ondisk, _| dirty | ondisk)
    }

    /// Write the given bitmap pages, byte i becoming `target(i, dirty[i], ondisk[i], recent[i])`
    /// (always a superset of `dirty`), and make them durable: each page with a ranged sync
    /// (`ranged`, for new dirty bits) or all with an fdatasync of the whole file (clears,
    /// which their barrier already paid for). On failure the "on disk" copy keeps only the
    /// bits that are set both before and after, so nothing is believed persisted that may not
    /// be.
    fn write_pages(
        &self,
        inner: &mut Inner,
        pages: &mut Vec<usize>,
        ranged: bool,
        target: impl Fn(usize, u8, u8, u8) -> u8,
    ) -> io::Result<()> {
        pages.sort_unstable();
        pages.dedup();
        let len = inner.dirty.len();
        let mut old = Vec::with_capacity(pages.len());
        for &p in pages.iter() {
            let r = page_range(len, p);
            old.push(inner.ondisk[r.clone()].to_vec());
            let Inner {
                dirty,
                ondisk,
                recent,
                ..
            } = &mut *inner;
            for i in r {
                ondisk[i] = target(i, dirty[i], ondisk[i], recent[i]);
            }
        }
        let result = if ranged {
            pages.iter().try_for_each(|&p| {
                let r = page_range(len, p);
                self.file.write_durable_at(
                    &inner.ondisk[r.clone()],
                    self.bitmap_offset + r.start as u64,
                )
            })
        } else {
            pages
                .iter()
                .try_for_each(|&p| {
                    let r = page_range(len, p);
                    self.file.write_all_at(
                        &inner.ondisk[r.clone()],
                        self.bitmap_offset + r.start as u64,
                    )
                })
                .and_then(|()| self.file.sync_data())
        };
        if result.is_err() {
            for (&p, old) in pages.iter().zip(old) {
                let r = page_range(len, p);
                for (b, o) in inner.ondisk[r].iter_mut().zip(old) {
                    *b &= o;
                }
            }
        }
        result
    }

    /// Mark the extents of [offset, offset+len) dirty before a write. If any extent goes
    /// clean -> dirty, the changed bitmap page(s) are written and fdatasync'ed before this
    /// returns. Extents already dirty on disk cost no I/O. Counts in-flight writes per extent.
    pub fn begin_write(&self, offset: u64, len: u64) -> io::Result<WriteGuard<'_>> {
        let end = offset
            .checked_add(len)
            .filter(|&end| end <= self.data_size)
            .ok_or_else(|| {
                einval(format!(
                    "write of {len} bytes at offset {offset} is beyond the data size {}",
                    self.data_size
                ))
            })?;
        if len == 0 {
            return Ok(WriteGuard {
                map: self,
                range: None,
                finished: false,
            });
        }
        let (first, last) = (offset / self.extent_size, (end - 1) / self.extent_size);
        let mut inner = self.lock();
        let mut pages = Vec::new();
        for e in first..=last {
            *inner.inflight.entry(e).or_insert(0) += 1;
            inner.touch(e);
            set(&mut inner.dirty, e);
            set(&mut inner.recent, e);
            if !get(&inner.ondisk, e) {
                pages.push(page_of(e));
            }
        }
        if !pages.is_empty()
            && let Err(err) = self.persist_pages(&mut inner, &mut pages)
        {
            for e in first..=last {
                Self::uncount(&mut inner, e);
            }
            return Err(err);
        }
        Ok(WriteGuard {
            map: self,
            range: Some((first, last)),
            finished: false,
        })
    }

    fn uncount(inner: &mut Inner, e: u64) {
        if let Some(n) = inner.inflight.get_mut(&e) {
            *n -= 1;
            if *n == 0 {
                inner.inflight.remove(&e);
            }
        }
    }

    fn complete(&self, first: u64, last: u64, replicated: bool) {
        let mut inner = self.lock();
        for e in first..=last {
            Self::uncount(&mut inner, e);
            if !replicated {
                set(&mut inner.needs_sync, e);
                set(&mut inner.dirty, e);
            }
            inner.try_clear(e);
        }
    }

    #[cfg(test)]
    /// The peer missed data for this extent: it stays dirty until `mark_synced`. The dirty
    /// bit is normally on disk already (a write began there); if not, it is written now and a
    /// failure is logged.
    pub fn set_needs_sync(&self, extent: u64) {
        if extent >= self.extents {
            log::error!("set_needs_sync: extent {extent} is beyond the last extent");
            return;
        }
        let mut inner = self.lock();
        set(&mut inner.needs_sync, extent);
        set(&mut inner.dirty, extent);
        if !get(&inner.ondisk, extent) {
            let mut pages = vec![page_of(extent)];
            if let Err(e) = self.persist_pages(&mut inner, &mut pages) {
                log::error!("cannot persist the dirty bit of extent {extent}: {e}");
            }
        }
    }

    /// The link to the peer died: writes it acknowledged but had not yet made durable may be
    /// lost with it (a crash of the peer's machine). The on-disk map still covers every such
    /// extent (`flush_idle` clears only after a peer flush), so every extent dirty on disk
    /// now needs a sync, as after a crash of this node.
    pub fn resync_unflushed(&self) {
        let mut inner = self.lock();
        let Inner {
            dirty,
            ondisk,
            needs_sync,
            ..
        } = &mut *inner;
        for ((d, n), o) in dirty
            .iter_mut()
            .zip(needs_sync.iter_mut())
            .zip(ondisk.iter())
        {
            *d |= o;
            *n |= o;
        }
    }

    /// Every extent dirty and needing a sync, persisted.
    pub fn mark_all_dirty(&self) -> io::Result<()> {
        let mut inner = self.lock();
        for e in 0..self.extents {
            set(&mut inner.dirty, e);
            set(&mut inner.needs_sync, e);
        }
        let mut pages: Vec<usize> = (0..inner.dirty.len().div_ceil(PAGE)).collect();
        self.persist_pages(&mut inner, &mut pages)
    }

    /// The resync of this extent reached the peer. The clean bit is persisted lazily (call
    /// `flush_clean` before reporting the sync complete).
    pub fn mark_synced(&self, extent: u64) -> io::Result<()> {
        if extent >= self.extents {
            return Err(einval(format!("extent {extent} is beyond the last extent")));
        }
        let mut inner = self.lock();
        clear(&mut inner.needs_sync, extent);
        inner.try_clear(extent);
        Ok(())
    }

    /// Persist pending clears: write every page whose on-disk copy differs, then fdatasync.
    /// No I/O when nothing changed.
    pub fn flush_clean(&self) -> io::Result<()> {
        let mut inner = self.lock();
        let len = inner.dirty.len();
        let mut pages: Vec<usize> = (0..len.div_ceil(PAGE))
            .filter(|&p| {
                let r = page_range(len, p);
                inner.dirty[r.clone()] != inner.ondisk[r]
            })
            .collect();
        if pages.is_empty() {
            return Ok(());
        }
        self.write_pages(&mut inner, &mut pages, false, |_, dirty, _, _| dirty)
    }

    /// Persist the clears of extents that were not written since the previous call (call it
    /// every few seconds): an extent that keeps being written keeps its on-disk dirty bit
    /// even when it drops out of the `keepdirty` window, so it costs no metadata write when
    /// written again; one left alone is clean on disk two periods later. No I/O when nothing
    /// changed.
    ///
    /// A clear bit claims that both nodes hold the extent durably, while a completed write
    /// may still sit in a page cache, here or on the peer. So when there is something to
    /// clear, `barrier` runs first, without the map's lock: it must make every write completed
    /// so far durable on both nodes (local fdatasync, peer flush) and say whether it did. Only
    /// extents that were already candidates before it, and were not written since, are
    /// cleared; if the barrier fails, nothing is.
    pub fn flush_idle(&self, barrier: impl FnOnce() -> bool) -> io::Result<()> {
        self.clear_behind(true, barrier)
    }

    /// Persist every clear behind a barrier, as `flush_idle` does but also for extents written
    /// during the last period: the end of a sync. A write completed after the sync's last
    /// peer FLUSH keeps its dirty bit unless `barrier` made it durable on both nodes.
    pub fn flush_clean_behind(&self, barrier: impl FnOnce() -> bool) -> io::Result<()> {
        self.clear_behind(false, barrier)
    }

    fn clear_behind(&self, only_idle: bool, barrier: impl FnOnce() -> bool) -> io::Result<()> {
        // Candidates: dirty on disk, clean in memory (no write in flight, out of keepdirty),
        // and for `only_idle` not written during the last period. Their writes completed
        // before this point.
        let candidates: Vec<u8> = {
            let mut inner = self.lock();
            let c: Vec<u8> = (0..inner.dirty.len())
                .map(|i| {
                    let recent = if only_idle { inner.recent[i] } else { 0 };
                    inner.ondisk[i] & !inner.dirty[i] & !recent
                })
                .collect();
            // From here on `recent` marks the writes the barrier may not cover.
            inner.recent.iter_mut().for_each(|b| *b = 0);
            c
        };
        if candidates.iter().all(|&b| b == 0) || !barrier() {
            return Ok(());
        }
        let mut inner = self.lock();
        let len = inner.dirty.len();
        let target = |i: usize, dirty: u8, ondisk: u8, recent: u8| {
            ondisk & !(candidates[i] & !dirty & !recent)
        };
        let mut pages: Vec<usize> = (0..len.div_ceil(PAGE))
            .filter(|&p| {
                page_range(len, p).any(|i| {
                    target(i, inner.dirty[i], inner.ondisk[i], inner.recent[i]) != inner.ondisk[i]
                })
            })
            .collect();
        if pages.is_empty() {
            return Ok(());
        }
        self.write_pages(&mut inner, &mut pages, false, target)
    }

    /// The dirty extents, sorted.
    pub fn dirty_extents(&self) -> Vec<u64> {
        let inner = self.lock();
        let mut out = Vec::new();
        for (i, &byte) in inner.dirty.iter().enumerate() {
            if byte == 0 {
                continue;
            }
            for bit in 0..8 {
                if byte & (1 << bit) != 0 {
                    out.push(i as u64 * 8 + bit);
                }
            }
        }
        out
    }

    #[cfg(test)]
    /// The first dirty extent at or after `from`: walks the map without allocating (a 1 TiB
    /// disk with every extent dirty makes `dirty_extents` a 4 MiB vector).
    pub fn next_dirty(&self, from: u64) -> Option<u64> {
        let inner = self.lock();
        let mut e = from;
        while e < self.extents {
            let byte = inner.dirty[(e / 8) as usize] >> (e % 8);
            if byte != 0 {
                return Some(e + u64::from(byte.trailing_zeros()));
            }
            e = (e / 8 + 1) * 8;
        }
        None
    }

    #[cfg(test)]
    pub fn is_dirty(&self, extent: u64) -> bool {
        extent < self.extents && get(&self.lock().dirty, extent)
    }

    #[cfg(test)]
    pub fn dirty_count(&self) -> u64 {
        self.lock()
            .dirty
            .iter()
            .map(|b| u64::from(b.count_ones()))
            .sum()
    }

    /// Dirty extents times the extent size; the last extent counts only its bytes.
    pub fn dirty_bytes(&self) -> u64 {
        let inner = self.lock();
        let count: u64 = inner.dirty.iter().map(|b| u64::from(b.count_ones())).sum();
        let mut bytes = count * self.extent_size;
        let tail = self.data_size % self.extent_size;
        if tail != 0 && self.extents > 0 && get(&inner.dirty, self.extents - 1) {
            bytes -= self.extent_size - tail;
        }
        bytes
    }

    /// The peer's dirty extents are added (they need a sync), persisted.
    pub fn merge(&self, extents: &[u64]) -> io::Result<()> {
        if let Some(bad) = extents.iter().find(|&&e| e >= self.extents) {
            return Err(einval(format!(
                "merge: extent {bad} is beyond the last extent {}",
                self.extents.saturating_sub(1)
            )));
        }
        let mut inner = self.lock();
        let mut pages = Vec::new();
        for &e in extents {
            set(&mut inner.needs_sync, e);
            set(&mut inner.dirty, e);
            if !get(&inner.ondisk, e) {
                pages.push(page_of(e));
            }
        }
        if pages.is_empty() {
            return Ok(());
        }
        self.persist_pages(&mut inner, &mut pages)
    }

    /// The dirty bitmap, one bit per extent (extent e is bit e%8 of byte e/8),
    /// ceil(extent_count/8) bytes: for sending to the peer.
    pub fn bitmap_bytes(&self) -> Vec<u8> {
        self.lock().dirty.clone()
    }

    #[cfg(test)]
    /// Approximate heap memory held by the map, in bytes.
    pub fn memory_bytes(&self) -> usize {
        let inner = self.lock();
        inner.dirty.capacity()
            + inner.ondisk.capacity()
            + inner.recent.capacity()
            + inner.needs_sync.capacity()
            + inner.inflight.capacity() * 2 * std::mem::size_of::<u64>()
            + inner.lru.capacity() * std::mem::size_of::<u64>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::metadata::{Disk, create};
    use std::fs::File;
    use std::path::PathBuf;

    const MIB: u64 = 1024 * 1024;

    /// A created resource "r0" on a sparse file with 1 MiB extents, every extent clean.
    fn clean_disk(size: u64) -> (tempfile::TempDir, PathBuf, Disk) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        File::create(&path).unwrap().set_len(size).unwrap();
        create(&path, "r0", MIB, false).unwrap();
        let disk = Disk::open(&path, "r0").unwrap();
        for e in 0..disk.extent_count() {
            disk.activemap().mark_synced(e).unwrap();
        }
        disk.activemap().flush_clean().unwrap();
        (dir, path, disk)
    }

    /// The dirty extents as the bitmap on disk says (what a crash leaves behind).
    fn dirty_on_disk(path: &std::path::Path) -> Vec<u64> {
        Disk::open(path, "r0").unwrap().activemap().dirty_extents()
    }

    #[test]
    fn begin_write_persists_before_returning() {
        let (_d, path, disk) = clean_disk(64 * MIB);
        assert_eq!(dirty_on_disk(&path), Vec::<u64>::new());
        let map = disk.activemap();
        // A write across the boundary of extents 3 and 4, plus one in extent 40.
        let g = map.begin_write(4 * MIB - 512, 1024).unwrap();
        assert_eq!(g.extents(), Some((3, 4)));
        let g2 = map.begin_write(40 * MIB, 4096).unwrap();
        disk.write_at(&[1; 1024], 4 * MIB - 512).unwrap();
        // Crash now: the disk already says 3, 4 and 40 are dirty.
        assert_eq!(dirty_on_disk(&path), vec![3, 4, 40]);
        // The bit is observable in the file: extent 40 is bit 0 of byte 5 of the bitmap.
        let mut b = [0u8; 1];
        std::os::unix::fs::FileExt::read_exact_at(
            &File::open(&path).unwrap(),
            &mut b,
            disk.layout().bitmap_offset + 5,
        )
        .unwrap();
        assert_eq!(b[0], 0x01);
        g.done(true);
        g2.done(true);
    }

    #[test]
    fn crash_without_flush_keeps_extents_dirty() {
        let (_d, path, disk) = clean_disk(64 * MIB);
        let g = disk.activemap().begin_write(7 * MIB, 4096).unwrap();
        disk.write_at(&[9; 4096], 7 * MIB).unwrap();
        g.done(true);
        drop(disk); // no flush_clean: as if the machine died
        let again = Disk::open(&path, "r0").unwrap();
        assert_eq!(again.activemap().dirty_extents(), vec![7]);
        // After a reopen the extent needs a sync: leaving the keepdirty window does not clear it.
        let map = again.activemap();
        map.set_keepdirty(0);
        map.begin_write(8 * MIB, 1).unwrap().done(true);
        map.flush_clean().unwrap();
        assert_eq!(map.dirty_extents(), vec![7]);
        map.mark_synced(7).unwrap();
        assert_eq!(map.dirty_extents(), Vec::<u64>::new());
        // A clear is not on disk until flushed (a stale dirty bit is the safe side).
        assert_eq!(dirty_on_disk(&path), vec![7]);
        map.flush_clean().unwrap();
        assert_eq!(dirty_on_disk(&path), Vec::<u64>::new());
    }

    /// The end of a sync: a write that completed after the sync's last peer FLUSH must not
    /// lose its dirty bit unless a barrier made it durable on both nodes; one that completes
    /// while the barrier runs keeps it either way.
    #[test]
    fn the_clear_at_the_end_of_a_sync_waits_for_a_barrier() {
        let (_d, path, disk) = clean_disk(64 * MIB);
        let map = disk.activemap();
        map.set_keepdirty(0);
        map.begin_write(3 * MIB, 4096).unwrap().done(true);
        assert_eq!(map.dirty_extents(), Vec::<u64>::new());
        assert_eq!(dirty_on_disk(&path), vec![3]);
        map.flush_clean_behind(|| false).unwrap();
        assert_eq!(dirty_on_disk(&path), vec![3], "cleared without a barrier");
        map.flush_clean_behind(|| {
            map.begin_write(5 * MIB, 4096).unwrap().done(true);
            true
        })
        .unwrap();
        assert_eq!(dirty_on_disk(&path), vec![5]);
    }

    #[test]
    fn keepdirty_bounds_the_dirty_set() {
        let (_d, path, disk) = clean_disk(256 * MIB);
        let map = disk.activemap();
        for e in 0..200 {
            map.begin_write(e * MIB + 100, 4096).unwrap().done(true);
        }
        map.flush_clean().unwrap();
        let dirty = map.dirty_extents();
        assert_eq!(dirty.len(), DEFAULT_KEEPDIRTY);
        // The most recent ones stay dirty.
        assert_eq!(
            dirty,
            (200 - DEFAULT_KEEPDIRTY as u64..200).collect::<Vec<_>>()
        );
        assert_eq!(dirty_on_disk(&path), dirty);
        // Rewriting a hot extent costs nothing and keeps the set.
        map.begin_write(199 * MIB, 1).unwrap().done(true);
        assert_eq!(map.dirty_extents(), dirty);
    }

    #[test]
    fn clears_reach_the_disk_only_when_flushed() {
        let (_d, path, disk) = clean_disk(256 * MIB);
        let map = disk.activemap();
        map.set_keepdirty(2);
        for e in 0..4 {
            map.begin_write(e * MIB, 4096).unwrap().done(true);
        }
        assert_eq!(map.dirty_extents(), vec![2, 3]);
        // A new dirty bit in the same page does not write the clears of 0 and 1.
        map.begin_write(100 * MIB, 1).unwrap().done(true);
        assert_eq!(dirty_on_disk(&path), vec![0, 1, 2, 3, 100]);
        // Extent 0 is written again: no longer in the window, but still dirty on disk.
        map.begin_write(0, 1).unwrap().done(true);
        // The first flush_idle keeps everything written since the start.
        map.flush_idle(|| true).unwrap();
        assert_eq!(dirty_on_disk(&path), vec![0, 1, 2, 3, 100]);
        // Only 0 is written in the next period: the idle clean extents become clean on disk.
        map.begin_write(0, 1).unwrap().done(true);
        map.flush_idle(|| true).unwrap();
        assert_eq!(map.dirty_extents(), vec![0, 100]);
        assert_eq!(dirty_on_disk(&path), vec![0, 100]);
        map.flush_idle(|| true).unwrap();
        assert_eq!(dirty_on_disk(&path), vec![0, 100]);
    }

    #[test]
    fn a_lost_peer_resyncs_what_it_may_not_have_made_durable() {
        let (_d, path, disk) = clean_disk(256 * MIB);
        let map = disk.activemap();
        map.set_keepdirty(1);
        for e in 0..4 {
            map.begin_write(e * MIB, 1).unwrap().done(true);
        }
        // Acknowledged by the peer, out of keepdirty: clean in memory, still dirty on disk.
        assert_eq!(map.dirty_extents(), vec![3]);
        map.resync_unflushed();
        assert_eq!(map.dirty_extents(), vec![0, 1, 2, 3]);
        // They stay dirty until a resync, whatever the idle cleaner does.
        map.flush_idle(|| true).unwrap();
        map.flush_idle(|| true).unwrap();
        assert_eq!(dirty_on_disk(&path), vec![0, 1, 2, 3]);
        map.mark_synced(1).unwrap();
        map.flush_clean().unwrap();
        assert_eq!(dirty_on_disk(&path), vec![0, 2, 3]);
    }

    #[test]
    fn idle_clears_wait_for_the_durability_barrier() {
        let (_d, path, disk) = clean_disk(256 * MIB);
        let map = disk.activemap();
        map.set_keepdirty(1);
        for e in 0..3 {
            map.begin_write(e * MIB, 1).unwrap().done(true);
        }
        map.flush_idle(|| true).unwrap(); // the period in which they were written
        // A failed barrier (peer flush not acknowledged) clears nothing.
        map.flush_idle(|| false).unwrap();
        assert_eq!(dirty_on_disk(&path), vec![0, 1, 2]);
        // An extent written while the barrier runs is not a candidate any more.
        map.flush_idle(|| {
            map.begin_write(0, 1).unwrap().done(true);
            true
        })
        .unwrap();
        assert_eq!(dirty_on_disk(&path), vec![0, 2]);
        // Without candidates the barrier is not even run.
        let mut ran = false;
        map.begin_write(2 * MIB, 1).unwrap().done(true);
        map.flush_idle(|| {
            ran = true;
            true
        })
        .unwrap();
        assert!(!ran);
    }

    #[test]
    fn deferred_writes_stay_dirty_until_the_peer_answers() {
        let (_d, path, disk) = clean_disk(64 * MIB);
        let map = disk.activemap();
        map.set_keepdirty(1);
        let acked = map.begin_write(0, 4096).unwrap().defer();
        let lost = map.begin_write(MIB, 4096).unwrap().defer();
        // Enough later writes to push both out of the keepdirty window.
        for e in 2..10 {
            map.begin_write(e * MIB, 1).unwrap().done(true);
        }
        map.flush_clean().unwrap();
        assert_eq!(map.dirty_extents(), vec![0, 1, 9]);
        assert_eq!(dirty_on_disk(&path), vec![0, 1, 9]);
        map.complete_pending(acked, true);
        map.complete_pending(lost, false);
        map.begin_write(10 * MIB, 1).unwrap().done(true);
        map.flush_clean().unwrap();
        // The acknowledged extent is clean now; the one the peer never wrote needs a sync.
        assert_eq!(map.dirty_extents(), vec![1, 10]);
        assert_eq!(dirty_on_disk(&path), vec![1, 10]);
    }

    #[test]
    fn in_flight_writes_are_never_cleared() {
        let (_d, _path, disk) = clean_disk(64 * MIB);
        let map = disk.activemap();
        map.set_keepdirty(1);
        let slow = map.begin_write(0, 4096).unwrap();
        let other = map.begin_write(0, 4096).unwrap();
        map.begin_write(MIB, 1).unwrap().done(true);
        map.begin_write(2 * MIB, 1).unwrap().done(true);
        map.flush_clean().unwrap();
        assert_eq!(map.dirty_extents(), vec![0, 2]);
        other.done(true);
        assert!(map.is_dirty(0), "one write is still in flight");
        slow.done(true);
        assert_eq!(map.dirty_extents(), vec![2]);
    }

    #[test]
    fn unreplicated_writes_stay_dirty() {
        let (_d, path, disk) = clean_disk(64 * MIB);
        let map = disk.activemap();
        map.set_keepdirty(0);
        map.begin_write(5 * MIB, 3 * MIB).unwrap().done(false);
        // A guard dropped without done() counts as not replicated.
        drop(map.begin_write(20 * MIB, 1).unwrap());
        map.begin_write(30 * MIB, 1).unwrap().done(true);
        map.begin_write(31 * MIB, 1).unwrap().done(true);
        map.flush_clean().unwrap();
        assert_eq!(map.dirty_extents(), vec![5, 6, 7, 20]);
        assert_eq!(dirty_on_disk(&path), vec![5, 6, 7, 20]);
        // A later replicated write does not make the missed data clean.
        map.begin_write(6 * MIB, 1).unwrap().done(true);
        map.set_needs_sync(40);
        assert_eq!(map.dirty_extents(), vec![5, 6, 7, 20, 40]);
        assert_eq!(dirty_on_disk(&path), vec![5, 6, 7, 20, 40]);
        for e in [5, 6, 7, 20, 40] {
            map.mark_synced(e).unwrap();
        }
        map.flush_clean().unwrap();
        assert_eq!(dirty_on_disk(&path), Vec::<u64>::new());
    }

    #[test]
    fn merge_mark_all_and_counts() {
        // 16 MiB device with 1 MiB extents: data_size 16 MiB - 12 KiB, the last extent is partial.
        let (_d, path, disk) = clean_disk(16 * MIB);
        let map = disk.activemap();
        assert_eq!(map.extent_count(), 16);
        map.merge(&[1, 15, 9]).unwrap();
        assert_eq!(dirty_on_disk(&path), vec![1, 9, 15]);
        assert_eq!(map.dirty_count(), 3);
        assert_eq!(map.dirty_bytes(), 3 * MIB - 12288);
        assert_eq!(map.bitmap_bytes(), vec![0b0000_0010, 0b1000_0010]);
        assert_eq!(map.next_dirty(0), Some(1));
        assert_eq!(map.next_dirty(2), Some(9));
        assert_eq!(map.next_dirty(9), Some(9));
        assert_eq!(map.next_dirty(10), Some(15));
        assert_eq!(map.next_dirty(16), None);
        let err = map.merge(&[16]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert_eq!(
            map.mark_synced(16).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        map.mark_all_dirty().unwrap();
        assert_eq!(map.dirty_count(), 16);
        assert_eq!(map.dirty_bytes(), disk.data_size());
        assert_eq!(dirty_on_disk(&path).len(), 16);
        assert_eq!(
            map.begin_write(disk.data_size(), 1).err().map(|e| e.kind()),
            Some(io::ErrorKind::InvalidInput)
        );
        assert_eq!(
            map.begin_write(disk.data_size(), 0).unwrap().extents(),
            None
        );
    }

    #[test]
    fn concurrent_writers() {
        let (_d, path, disk) = clean_disk(64 * MIB);
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let disk = &disk;
                s.spawn(move || {
                    for i in 0..100u64 {
                        let off = ((t * 100 + i) % 60) * MIB;
                        let g = disk.activemap().begin_write(off, 4096).unwrap();
                        disk.write_at(&[t as u8; 4096], off).unwrap();
                        g.done(i % 10 != 0);
                    }
                });
            }
        });
        let map = disk.activemap();
        map.flush_clean().unwrap();
        // The missed writes (i % 10 == 0) stay dirty whatever the interleaving.
        let dirty = map.dirty_extents();
        for t in 0..4u64 {
            for i in (0..100u64).step_by(10) {
                assert!(dirty.contains(&((t * 100 + i) % 60)));
            }
        }
        assert_eq!(dirty_on_disk(&path), dirty);
    }
}
