//! Ordering of conflicting application writes on the primary.
//!
//! NBD lets a server run overlapping requests in any order, but the two replicas must end up
//! with the same order. The primary queues a write to the peer and applies it to its disk in
//! one step; two overlapping writes from different connections could otherwise interleave
//! that step (A queued, B queued, B local, A local) and leave the primary with A's data and
//! the secondary with B's, with no dirty bit to notice. A write therefore claims its byte
//! range for that step, and a write that overlaps a claimed range waits for it (DRBD waits
//! for conflicting requests the same way). Writes that do not overlap never wait for each
//! other.

use std::sync::{Condvar, Mutex};

/// The byte ranges whose writes are between "queued to the peer" and "applied locally".
#[derive(Default)]
pub struct Conflicts {
    claimed: Mutex<Claimed>,
    released: Condvar,
}

#[derive(Default)]
struct Claimed {
    ranges: Vec<(u64, u64)>,
    /// Claims waiting for a release (a release wakes them; without any it makes no system
    /// call).
    waiters: usize,
}

/// A claimed range; released on drop.
pub struct Claim<'a> {
    owner: &'a Conflicts,
    range: (u64, u64),
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

impl Conflicts {
    /// Claim `[offset, offset + len)`, waiting while an overlapping range is claimed.
    pub fn claim(&self, offset: u64, len: u64) -> Claim<'_> {
        let range = (offset, offset.saturating_add(len));
        let mut claimed = self.claimed.lock().unwrap_or_else(|p| p.into_inner());
        while claimed.ranges.iter().any(|&c| overlaps(c, range)) {
            claimed.waiters += 1;
            claimed = self
                .released
                .wait(claimed)
                .unwrap_or_else(|p| p.into_inner());
            claimed.waiters -= 1;
        }
        claimed.ranges.push(range);
        Claim { owner: self, range }
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        let mut claimed = self.owner.claimed.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = claimed.ranges.iter().position(|&c| c == self.range) {
            claimed.ranges.swap_remove(i);
        }
        let waiters = claimed.waiters;
        drop(claimed);
        if waiters > 0 {
            self.owner.released.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    #[test]
    fn overlap_is_half_open() {
        assert!(overlaps((0, 4096), (4095, 8192)));
        assert!(!overlaps((0, 4096), (4096, 8192)));
        assert!(overlaps((100, 200), (0, 1000)));
        assert!(!overlaps((0, 0), (0, 10)));
    }

    #[test]
    fn an_overlapping_claim_waits_for_the_release_and_a_disjoint_one_does_not() {
        let c = Arc::new(Conflicts::default());
        let first = c.claim(0, 8192);
        // Disjoint: granted at once while the first is held.
        drop(c.claim(8192, 4096));
        let got = Arc::new(AtomicBool::new(false));
        let t = {
            let (c, got) = (Arc::clone(&c), Arc::clone(&got));
            std::thread::spawn(move || {
                let _x = c.claim(4096, 4096);
                got.store(true, Ordering::SeqCst);
            })
        };
        std::thread::sleep(Duration::from_millis(100));
        assert!(!got.load(Ordering::SeqCst), "overlapping claim granted");
        drop(first);
        t.join().unwrap();
        assert!(got.load(Ordering::SeqCst));
    }

    #[test]
    fn equal_ranges_are_released_one_at_a_time() {
        let c = Conflicts::default();
        let a = c.claim(0, 10);
        drop(a);
        let b = c.claim(0, 10);
        assert_eq!(c.claimed.lock().unwrap().ranges.len(), 1);
        drop(b);
        assert!(c.claimed.lock().unwrap().ranges.is_empty());
    }
}
