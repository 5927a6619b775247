//! A binary min-heap of at most one key per id (a process), indexed by id so that a key can be
//! moved or removed in place: what the engine's session timers and the checkers' phase bounds
//! need, one entry per process changing after nearly every input, without the allocations of
//! an ordered set or the stale entries of a plain heap.

/// Not in the heap.
const NONE: usize = usize::MAX;

#[derive(Debug, Clone)]
pub(crate) struct IndexedHeap<K> {
    heap: Vec<(K, usize)>,
    /// The heap index of each id's entry (`NONE`: absent).
    pos: Vec<usize>,
}

impl<K> Default for IndexedHeap<K> {
    fn default() -> Self {
        IndexedHeap {
            heap: Vec::new(),
            pos: Vec::new(),
        }
    }
}

impl<K: Ord + Copy> IndexedHeap<K> {
    /// The least key and its id.
    pub(crate) fn peek(&self) -> Option<(K, usize)> {
        self.heap.first().copied()
    }

    /// Sets the key of `id`, inserting it or moving it.
    pub(crate) fn set(&mut self, id: usize, key: K) {
        if self.pos.len() <= id {
            self.pos.resize(id + 1, NONE);
        }
        let i = match self.pos[id] {
            NONE => {
                self.heap.push((key, id));
                self.heap.len() - 1
            }
            i => {
                self.heap[i].0 = key;
                i
            }
        };
        let i = self.sift_up(i);
        self.sift_down(i);
    }

    /// Removes the entry of `id`; its key, if it had one.
    pub(crate) fn remove(&mut self, id: usize) -> Option<K> {
        let i = *self.pos.get(id)?;
        if i == NONE {
            return None;
        }
        self.pos[id] = NONE;
        let (key, _) = self.heap.swap_remove(i);
        if i < self.heap.len() {
            let i = self.sift_up(i);
            self.sift_down(i);
        }
        Some(key)
    }

    /// Moves the entry at `i` up to its place (a hole moves; the entry is written once).
    fn sift_up(&mut self, mut i: usize) -> usize {
        let entry = self.heap[i];
        while i > 0 {
            let parent = (i - 1) / 2;
            if self.heap[parent].0 <= entry.0 {
                break;
            }
            self.heap[i] = self.heap[parent];
            self.pos[self.heap[i].1] = i;
            i = parent;
        }
        self.heap[i] = entry;
        self.pos[entry.1] = i;
        i
    }

    /// Moves the entry at `i` down to its place.
    fn sift_down(&mut self, mut i: usize) {
        let entry = self.heap[i];
        let len = self.heap.len();
        loop {
            let mut child = 2 * i + 1;
            if child >= len {
                break;
            }
            if child + 1 < len && self.heap[child + 1].0 < self.heap[child].0 {
                child += 1;
            }
            if self.heap[child].0 >= entry.0 {
                break;
            }
            self.heap[i] = self.heap[child];
            self.pos[self.heap[i].1] = i;
            i = child;
        }
        self.heap[i] = entry;
        self.pos[entry.1] = i;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgiplock_core::SplitMix64;
    use std::collections::BTreeMap;

    /// Random sets, moves and removals: the least key is always that of a plain map's least
    /// entry, and every id has exactly the key last set.
    #[test]
    fn agrees_with_a_map() {
        let mut rng = SplitMix64::new(9);
        let mut heap = IndexedHeap::default();
        let mut map: BTreeMap<usize, u64> = BTreeMap::new();
        for step in 0..30_000 {
            let id = rng.below_inclusive(60) as usize;
            if rng.below_inclusive(3) == 0 {
                assert_eq!(heap.remove(id), map.remove(&id), "step {step}");
            } else {
                // Keys unique per id, so that the least entry is unambiguous.
                let key = rng.below_inclusive(1_000) * 100 + id as u64;
                heap.set(id, key);
                map.insert(id, key);
            }
            let least = map.iter().map(|(id, key)| (*key, *id)).min();
            assert_eq!(heap.peek(), least, "step {step}");
        }
    }
}
