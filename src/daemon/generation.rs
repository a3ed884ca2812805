//! Generation counters: which way data flows when two nodes meet.
//!
//! Each node keeps `local_gen` (bumped the first time it is written as primary while not in sync
//! with its peer) and `peer_gen` (the peer's `local_gen` at the end of the last completed sync).
//! Comparing the two pairs tells whether one side is newer, both are (split-brain), or neither.
//! This module is the decision table only, a pure function; the callers act on it.

use super::protocol::NodeState;

/// What happens between a (would-be) primary `p` and a secondary `s`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Copy every extent from `p` to `s`; with `skip_zero`, extents all-zero on `p` are not
    /// sent because `s` is freshly created and reads as zeroes already.
    FullSync { skip_zero: bool },
    /// Copy the union of both dirty-extent maps from `p` to `s` (often empty).
    DirtySync,
    /// `p`'s data is older than (or not a valid copy of) `s`'s: `p` must never be the source.
    Stale,
    /// Both were written while apart; nothing is synced until an operator resolves it.
    SplitBrain,
    /// `p`'s local disk failed: it serves from `s`, whose copy is the only one. Nothing is
    /// synced either way, and `s` records that it holds the only copy (newer than `p`'s disk).
    Diskless,
}

/// The decision table (docs/protocol.md, "Generation exchange"), first matching row wins.
pub fn decide(p: &NodeState, s: &NodeState) -> Decision {
    if p.diskless {
        return Decision::Diskless;
    }
    if s.discard_local {
        return Decision::FullSync { skip_zero: false };
    }
    if p.discard_local || p.inconsistent {
        return Decision::Stale;
    }
    // A node that never completed a sync and has local_gen > 0 was written as a primary on
    // its own: its data is the only copy of those writes and must not be overwritten blindly.
    let p_written = p.local_gen > 0;
    let s_written = !s.ever_synced && s.local_gen > 0;
    if !p.ever_synced && !s.ever_synced {
        return match (p_written, s_written) {
            (true, true) => Decision::SplitBrain,
            (false, true) => Decision::Stale,
            _ => Decision::FullSync { skip_zero: s.fresh },
        };
    }
    if !s.ever_synced {
        if s_written {
            return Decision::SplitBrain;
        }
        return Decision::FullSync { skip_zero: s.fresh };
    }
    if !p.ever_synced {
        return Decision::Stale;
    }
    let p_newer = p.local_gen > s.peer_gen;
    let s_newer = s.local_gen > p.peer_gen;
    if (p_newer && s_newer) || p.split_brain || s.split_brain {
        return Decision::SplitBrain;
    }
    if s_newer {
        return Decision::Stale;
    }
    Decision::DirtySync
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(local_gen: u64, peer_gen: u64) -> NodeState {
        NodeState {
            local_gen,
            peer_gen,
            ever_synced: true,
            ..Default::default()
        }
    }

    #[test]
    fn secondary_discarding_gets_full_sync() {
        let s = NodeState {
            discard_local: true,
            ..node(9, 1)
        };
        assert_eq!(
            decide(&node(2, 1), &s),
            Decision::FullSync { skip_zero: false }
        );
    }

    #[test]
    fn primary_discarding_or_inconsistent_is_stale() {
        assert_eq!(
            decide(
                &NodeState {
                    discard_local: true,
                    ..node(5, 1)
                },
                &node(1, 1)
            ),
            Decision::Stale
        );
        assert_eq!(
            decide(
                &NodeState {
                    inconsistent: true,
                    ..node(5, 1)
                },
                &node(1, 1)
            ),
            Decision::Stale
        );
    }

    #[test]
    fn never_synced_pair_gets_initial_sync_skipping_zeroes_on_fresh_target() {
        let fresh = NodeState {
            fresh: true,
            ..Default::default()
        };
        let p = NodeState::default();
        assert_eq!(decide(&p, &fresh), Decision::FullSync { skip_zero: true });
        assert_eq!(
            decide(&p, &NodeState::default()),
            Decision::FullSync { skip_zero: false }
        );
    }

    #[test]
    fn new_secondary_disk_gets_full_sync() {
        let fresh = NodeState {
            fresh: true,
            ..Default::default()
        };
        assert_eq!(
            decide(&node(3, 3), &fresh),
            Decision::FullSync { skip_zero: true }
        );
    }

    #[test]
    fn fresh_node_never_overwrites_a_peer_written_alone() {
        let written_alone = NodeState {
            local_gen: 1,
            ..Default::default()
        };
        assert_eq!(
            decide(&NodeState::default(), &written_alone),
            Decision::Stale
        );
        // The other way round is the initial sync.
        assert_eq!(
            decide(&written_alone, &NodeState::default()),
            Decision::FullSync { skip_zero: false }
        );
    }

    #[test]
    fn both_written_alone_before_any_sync_is_split_brain() {
        let w = NodeState {
            local_gen: 1,
            ..Default::default()
        };
        assert_eq!(decide(&w, &w), Decision::SplitBrain);
        // A synced primary meeting a new disk that was written as primary on its own.
        assert_eq!(decide(&node(3, 3), &w), Decision::SplitBrain);
        // ... unless that node's data was discarded by resolve.
        let discarded = NodeState {
            discard_local: true,
            ..w
        };
        assert_eq!(
            decide(&node(3, 3), &discarded),
            Decision::FullSync { skip_zero: false }
        );
    }

    #[test]
    fn new_primary_disk_against_synced_secondary_is_stale() {
        assert_eq!(decide(&NodeState::default(), &node(3, 3)), Decision::Stale);
    }

    #[test]
    fn primary_newer_syncs_dirty_union() {
        assert_eq!(decide(&node(4, 3), &node(3, 3)), Decision::DirtySync);
    }

    #[test]
    fn secondary_newer_means_primary_stale() {
        assert_eq!(decide(&node(3, 3), &node(4, 3)), Decision::Stale);
    }

    #[test]
    fn both_newer_is_split_brain() {
        assert_eq!(decide(&node(4, 3), &node(4, 3)), Decision::SplitBrain);
        assert_eq!(decide(&node(5, 3), &node(4, 3)), Decision::SplitBrain);
    }

    #[test]
    fn recorded_split_brain_stays_until_resolved() {
        let s = NodeState {
            split_brain: true,
            ..node(3, 3)
        };
        assert_eq!(decide(&node(3, 3), &s), Decision::SplitBrain);
        let p = NodeState {
            split_brain: true,
            ..node(3, 3)
        };
        assert_eq!(decide(&p, &node(3, 3)), Decision::SplitBrain);
    }

    /// A diskless primary neither syncs nor is stale, whatever the generations say: the
    /// secondary's copy is the only one, and it is newer than the primary's failed disk.
    #[test]
    fn a_diskless_primary_serves_from_the_secondary() {
        for p in [node(3, 3), node(3, 4), node(4, 3)] {
            let p = NodeState {
                diskless: true,
                inconsistent: true,
                ..p
            };
            assert_eq!(decide(&p, &node(4, 3)), Decision::Diskless);
        }
    }

    #[test]
    fn equal_generations_sync_dirty_union() {
        assert_eq!(decide(&node(3, 3), &node(3, 3)), Decision::DirtySync);
    }
}
