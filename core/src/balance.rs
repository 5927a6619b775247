//! Fair share across a fleet: the pure rule that decides, from the counts the table reports,
//! how many channels of a balance group a session releases and how many more it may take.
//!
//! A group's size `N` (its channels known to the table) and its members (live sessions that
//! compete in it, each with the number of channels it holds) come from the table
//! ([`BalanceCounts`]). With `q = N / P` and `P` live members:
//!
//! - a member holding more than `q + 1` releases down to `q + 1`, all at once;
//! - a member holding exactly `q + 1` releases one channel only while some member holds fewer
//!   than `q`, and only if it is among the first `d` members at `q + 1` in the table's order,
//!   `d` being the channels the members below `q` lack (so concurrent releasers do not give
//!   away more than is needed);
//! - a member may take channels up to `q` while some member is below `q` or the `r = N % P`
//!   places at `q + 1` are taken by others, else up to `q + 1`, so every free channel is wanted
//!   by the member that holds the fewest.
//!
//! Once every member holds `q` or `q + 1` nobody releases: a steady fleet makes no move.

/// What the table says about a balance group, as one member saw it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BalanceCounts {
    /// The group's channels known to the table (`N`).
    pub channels: u64,
    /// The channels each live member holds, in the table's member order (by application name).
    pub members: Vec<u64>,
    /// The asking session's place in `members` (`None` if the table does not list it yet).
    pub own: Option<usize>,
    /// Channels of the group that nobody holds now (released, expired, or their holder's
    /// session gone), at most [`MAX_FREE_LISTED`]: a member below its share tries these first.
    pub free: Vec<String>,
}

/// Most free channels a [`BalanceCounts`] lists.
pub const MAX_FREE_LISTED: usize = 1000;

impl BalanceCounts {
    /// The live members, counting the asking session even if the table does not list it yet.
    pub fn live_members(&self) -> u64 {
        let listed = self.members.len() as u64;
        (listed + u64::from(self.own.is_none())).max(1)
    }

    /// The quota: `(q, r)` with `q = N / P` and `r = N % P`.
    pub fn quota(&self) -> (u64, u64) {
        let p = self.live_members();
        (self.channels / p, self.channels % p)
    }

    /// The other members' counts.
    fn others(&self) -> impl Iterator<Item = (usize, u64)> + '_ {
        let own = self.own;
        self.members
            .iter()
            .copied()
            .enumerate()
            .filter(move |(i, _)| Some(*i) != own)
    }

    /// How many channels a member that holds `held` (its own, current count) releases now.
    pub fn to_release(&self, held: u64) -> u64 {
        let (q, _) = self.quota();
        if held > q + 1 {
            return held - (q + 1);
        }
        if held < q + 1 {
            return 0;
        }
        // At q + 1: give one only to a member below q, and no more releasers than they lack.
        let lacking: u64 = self.others().filter(|(_, c)| *c < q).map(|(_, c)| q - c).sum();
        if lacking == 0 {
            return 0;
        }
        let rank = match self.own {
            // Members listed before us that hold q + 1 (or more: they will come down to it).
            Some(own) => self.members[..own].iter().filter(|c| **c > q).count() as u64,
            // Not listed yet: after every listed one.
            None => self.members.iter().filter(|c| **c > q).count() as u64,
        };
        u64::from(rank < lacking)
    }

    /// How many more channels a member that holds (or is acquiring) `held` may attempt now.
    pub fn allowance(&self, held: u64) -> u64 {
        let (q, r) = self.quota();
        let someone_below = held < q || self.others().any(|(_, c)| c < q);
        let above = self.others().filter(|(_, c)| *c > q).count() as u64;
        let limit = if someone_below || above >= r { q } else { q + 1 };
        limit.saturating_sub(held)
    }

    /// Whether a member holding `held` is within one of every fair share: `q` or `q + 1`, and
    /// `q + 1` only where the remainder allows it.
    pub fn is_fair(&self, held: u64) -> bool {
        let (q, r) = self.quota();
        held == q || (r > 0 && held == q + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SplitMix64;

    fn counts(channels: u64, members: &[u64], own: usize) -> BalanceCounts {
        BalanceCounts {
            channels,
            members: members.to_vec(),
            own: Some(own),
            free: Vec::new(),
        }
    }

    #[test]
    fn quota_of_three_hundred_over_three_and_four() {
        assert_eq!(counts(300, &[0, 0, 0], 0).quota(), (100, 0));
        assert_eq!(counts(300, &[0, 0, 0, 0], 0).quota(), (75, 0));
        assert_eq!(counts(301, &[0, 0, 0], 0).quota(), (100, 1));
        // Not listed yet: the asking session counts as a member.
        let c = BalanceCounts {
            channels: 300,
            members: vec![150, 150],
            own: None,
            free: Vec::new(),
        };
        assert_eq!(c.quota(), (100, 0));
        // No member at all: never a division by zero.
        assert_eq!(BalanceCounts::default().quota(), (0, 0));
    }

    #[test]
    fn a_joiner_makes_each_holder_release_its_excess() {
        let c = counts(300, &[100, 100, 100, 0], 0);
        assert_eq!(c.to_release(100), 24, "down to q + 1 at once");
        assert_eq!(c.allowance(100), 0);
        let joiner = counts(300, &[100, 100, 100, 0], 3);
        assert_eq!(joiner.allowance(0), 75);
        assert_eq!(joiner.to_release(0), 0);
        // Then each at q + 1 gives one while the joiner lacks them, but only as many as it lacks.
        let c = counts(300, &[76, 76, 76, 73], 0);
        assert_eq!(c.to_release(76), 1);
        let c = counts(300, &[76, 76, 76, 74], 1);
        assert_eq!(c.to_release(76), 0, "the first at q + 1 gives the one the joiner lacks");
        let c = counts(300, &[76, 76, 76, 74], 0);
        assert_eq!(c.to_release(76), 1);
    }

    #[test]
    fn a_crashed_members_channels_go_to_those_below_quota() {
        // Four held 75 each; one died: the table lists three, each below q = 100.
        let c = counts(300, &[75, 75, 75], 1);
        assert_eq!(c.allowance(75), 25);
        assert_eq!(c.to_release(75), 0);
    }

    #[test]
    fn at_quota_a_member_takes_a_free_channel_only_if_nobody_is_below() {
        let c = counts(301, &[100, 100, 100], 0);
        assert_eq!(c.allowance(100), 1, "nobody below q: the remainder is anyone's");
        let c = counts(301, &[100, 99, 100], 0);
        assert_eq!(c.allowance(100), 0, "the one below q comes first");
        let c = counts(301, &[101, 100, 100], 0);
        assert_eq!(c.allowance(101), 0);
        // The remainder's places are taken: a stale view of a free channel takes nothing.
        let c = counts(300, &[100, 110, 100], 0);
        assert_eq!(c.allowance(100), 0);
        // Fewer channels than members: a member with none may take one while a place is left.
        let c = counts(2, &[1, 0, 0], 2);
        assert_eq!(c.allowance(0), 1);
        let c = counts(2, &[1, 1, 0], 2);
        assert_eq!(c.allowance(0), 0);
        assert_eq!(counts(2, &[1, 1, 0], 0).to_release(1), 0);
    }

    /// Random counts within one of the fair share: nobody releases, whatever the vector.
    #[test]
    fn no_oscillation_once_every_member_holds_floor_or_ceil() {
        let mut rng = SplitMix64::new(13);
        for _ in 0..20_000 {
            let p = 1 + rng.next_u64() % 40;
            let q = rng.next_u64() % 300;
            let r = rng.next_u64() % p;
            // r members at q + 1, the rest at q, in a random order.
            let mut members: Vec<u64> = (0..p).map(|i| if i < r { q + 1 } else { q }).collect();
            for i in (1..members.len()).rev() {
                let j = (rng.next_u64() % (i as u64 + 1)) as usize;
                members.swap(i, j);
            }
            let n = q * p + r;
            for own in 0..members.len() {
                let c = counts(n, &members, own);
                assert!(c.is_fair(members[own]), "{members:?} n={n}");
                assert_eq!(c.to_release(members[own]), 0, "{members:?} n={n} own={own}");
            }
        }
    }

    /// Random starting counts, rounds in which every member applies the rule on one snapshot and
    /// freed channels go to random members that are allowed them: the fleet reaches floor or
    /// ceil, each channel moves a bounded number of times, and then nobody moves.
    #[test]
    fn random_fleets_converge_and_then_stay() {
        let mut rng = SplitMix64::new(7);
        for case in 0..2_000 {
            let p = 1 + (rng.next_u64() % 12) as usize;
            let n = rng.next_u64() % 400;
            // A random assignment of the n channels (some free).
            let mut held = vec![0u64; p];
            let mut free = 0u64;
            for _ in 0..n {
                let slot = (rng.next_u64() % (p as u64 + 1)) as usize;
                if slot == p {
                    free += 1;
                } else {
                    held[slot] += 1;
                }
            }
            let mut converged_at = None;
            for round in 0..60 {
                let snapshot = held.clone();
                let view = |own: usize| counts(n, &snapshot, own);
                if snapshot.iter().enumerate().all(|(i, c)| view(i).is_fair(*c)) && free == 0 {
                    converged_at.get_or_insert(round);
                }
                let mut released = 0;
                for (i, c) in held.iter_mut().enumerate() {
                    let give = view(i).to_release(*c);
                    *c -= give;
                    released += give;
                }
                if converged_at.is_some() {
                    assert_eq!(released, 0, "case {case}: a move after convergence");
                }
                free += released;
                // Each free channel: a random member that its own (stale) view allows takes it.
                let mut left = free;
                for _ in 0..free {
                    let start = (rng.next_u64() % p as u64) as usize;
                    let taker = (0..p)
                        .map(|k| (start + k) % p)
                        .find(|i| view(*i).allowance(held[*i]) > 0);
                    if let Some(i) = taker {
                        held[i] += 1;
                        left -= 1;
                    }
                }
                free = left;
            }
            assert!(
                converged_at.is_some(),
                "case {case}: p={p} n={n} ended at {held:?} with {free} free"
            );
        }
    }
}
