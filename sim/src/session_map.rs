//! A map keyed by [`SessionId`] for the server's per-session tables: the server hands out ids
//! in order from 1, so a lookup is an index into a vector (it runs for nearly every event),
//! while iteration visits the live ids in ascending order, as a `BTreeMap` would.

use std::collections::BTreeSet;

use pgiplock_core::SessionId;

#[derive(Clone)]
pub(crate) struct SessionMap<V> {
    slots: Vec<Option<V>>,
    live: BTreeSet<SessionId>,
}

impl<V> Default for SessionMap<V> {
    fn default() -> Self {
        SessionMap {
            slots: Vec::new(),
            live: BTreeSet::new(),
        }
    }
}

impl<V> SessionMap<V> {
    fn index(id: SessionId) -> Option<usize> {
        usize::try_from(id.0).ok()
    }

    pub(crate) fn get(&self, id: &SessionId) -> Option<&V> {
        self.slots.get(Self::index(*id)?)?.as_ref()
    }

    pub(crate) fn get_mut(&mut self, id: &SessionId) -> Option<&mut V> {
        self.slots.get_mut(Self::index(*id)?)?.as_mut()
    }

    pub(crate) fn contains_key(&self, id: &SessionId) -> bool {
        self.get(id).is_some()
    }

    /// Inserts `value` for `id`; the previous value, if any. Ids far beyond every id handed out
    /// would make the vector huge: the server's ids are dense, and a debug build checks it.
    pub(crate) fn insert(&mut self, id: SessionId, value: V) -> Option<V> {
        let i = Self::index(id)?;
        debug_assert!(i <= self.slots.len() + (1 << 20), "session id {i} far beyond the table");
        if self.slots.len() <= i {
            self.slots.resize_with(i + 1, || None);
        }
        self.live.insert(id);
        self.slots[i].replace(value)
    }

    pub(crate) fn remove(&mut self, id: &SessionId) -> Option<V> {
        let value = self.slots.get_mut(Self::index(*id)?)?.take();
        if value.is_some() {
            self.live.remove(id);
        }
        value
    }

    pub(crate) fn clear(&mut self) {
        self.slots.clear();
        self.live.clear();
    }

    /// Live entries in ascending id order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&SessionId, &V)> + '_ {
        self.live
            .iter()
            .filter_map(move |id| Some((id, self.slots.get(Self::index(*id)?)?.as_ref()?)))
    }

    /// Live entries in ascending id order, mutable (a walk over every slot: for rare events).
    pub(crate) fn iter_mut(&mut self) -> impl Iterator<Item = (SessionId, &mut V)> + '_ {
        self.slots
            .iter_mut()
            .enumerate()
            .filter_map(|(i, slot)| Some((SessionId(i as u64), slot.as_mut()?)))
    }

    /// Live ids in ascending order.
    pub(crate) fn keys(&self) -> impl Iterator<Item = &SessionId> + '_ {
        self.live.iter()
    }
}

/// As a `BTreeMap` prints: the live entries in id order.
impl<V: std::fmt::Debug> std::fmt::Debug for SessionMap<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgiplock_core::SplitMix64;
    use std::collections::BTreeMap;

    #[test]
    fn behaves_as_a_btree_map() {
        let mut rng = SplitMix64::new(3);
        let mut map = SessionMap::default();
        let mut reference = BTreeMap::new();
        for step in 0..20_000u64 {
            let id = SessionId(rng.below_inclusive(300));
            match rng.below_inclusive(3) {
                0 | 1 => assert_eq!(map.insert(id, step), reference.insert(id, step)),
                2 => assert_eq!(map.remove(&id), reference.remove(&id)),
                _ => {
                    if let (Some(a), Some(b)) = (map.get_mut(&id), reference.get_mut(&id)) {
                        *a += 1;
                        *b += 1;
                    }
                }
            }
            assert_eq!(map.get(&id), reference.get(&id));
            assert_eq!(map.contains_key(&id), reference.contains_key(&id));
        }
        assert!(map.iter().eq(reference.iter()));
        assert!(map.keys().eq(reference.keys()));
        assert!(map
            .iter_mut()
            .map(|(k, v)| (k, *v))
            .eq(reference.iter().map(|(k, v)| (*k, *v))));
        assert_eq!(format!("{map:?}"), format!("{reference:?}"));
        map.clear();
        assert_eq!(map.iter().count(), 0);
    }
}
