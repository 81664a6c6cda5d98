//! A map whose entries expire and whose size is capped.
//!
//! The client learns things per blob, per repository and per host (redirected URLs, tokens,
//! fallbacks already logged, mirrors that failed) for as long as the daemon lives. A node runs
//! for months and pulls thousands of images, so maps keyed by digest or repository would grow
//! without end if nothing were ever dropped. Every entry here carries the instant after which
//! it is worthless; inserting into a full map first drops those, then, if all are still live,
//! the ones closest to expiring. Forgetting an entry early costs only a round trip (a redirect
//! or a token asked for again) or a repeated log line, never a wrong answer.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::time::Instant;

#[derive(Debug)]
pub(crate) struct BoundedMap<K, V> {
    entries: HashMap<K, (V, Instant)>,
    cap: usize,
}

impl<K: Eq + Hash + Clone, V> BoundedMap<K, V> {
    pub(crate) fn new(cap: usize) -> Self {
        BoundedMap {
            entries: HashMap::new(),
            cap: cap.max(1),
        }
    }

    /// The value of `key` unless it expired by `now`.
    pub(crate) fn get<Q>(&self, key: &Q, now: Instant) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.entries
            .get(key)
            .filter(|(_, expiry)| *expiry > now)
            .map(|(v, _)| v)
    }

    /// Inserts `key` (replacing any earlier value) until `expiry`, making room first if the
    /// map is full. Returns whether the key was absent or expired, i.e. new.
    pub(crate) fn insert(&mut self, key: K, value: V, expiry: Instant, now: Instant) -> bool {
        if !self.entries.contains_key(&key) && self.entries.len() >= self.cap {
            self.make_room(now);
        }
        match self.entries.insert(key, (value, expiry)) {
            Some((_, old_expiry)) => old_expiry <= now,
            None => true,
        }
    }

    pub(crate) fn remove<Q>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.entries.remove(key).map(|(v, _)| v)
    }

    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&K, &V) -> bool) {
        self.entries.retain(|k, (v, _)| keep(k, v));
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Drops the expired entries, then, while still full, the entry expiring soonest. Only
    /// called on a full map, so the linear scans are paid once per insert at the cap, not on
    /// every lookup.
    fn make_room(&mut self, now: Instant) {
        self.entries.retain(|_, (_, expiry)| *expiry > now);
        while self.entries.len() >= self.cap {
            let soonest = self
                .entries
                .iter()
                .min_by_key(|(_, (_, expiry))| *expiry)
                .map(|(k, _)| k.clone());
            let Some(soonest) = soonest else { break };
            self.entries.remove(&soonest);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn expired_entries_are_absent_and_dropped_first_when_full() {
        let now = Instant::now();
        let mut map = BoundedMap::new(3);
        map.insert("old", 1, now + Duration::from_secs(1), now);
        map.insert("a", 2, now + Duration::from_secs(100), now);
        map.insert("b", 3, now + Duration::from_secs(50), now);
        let later = now + Duration::from_secs(10);
        assert_eq!(map.get("old", later), None, "expired");
        assert_eq!(map.get("a", later), Some(&2));
        assert!(map.insert("c", 4, later + Duration::from_secs(100), later));
        assert_eq!(map.len(), 3);
        assert_eq!(map.get("old", now), None, "the expired entry made room");
        assert_eq!(map.get("b", later), Some(&3), "live entries were kept");
    }

    #[test]
    fn a_full_map_of_live_entries_drops_the_one_expiring_soonest() {
        let now = Instant::now();
        let mut map = BoundedMap::new(256);
        for i in 0..1_000u64 {
            map.insert(i, i, now + Duration::from_secs(1000 + i), now);
            assert!(map.len() <= 256);
        }
        assert_eq!(map.len(), 256);
        assert_eq!(map.get(&999, now), Some(&999), "the newest is kept");
        assert_eq!(map.get(&0, now), None, "the one expiring soonest went");
        assert_eq!(map.get(&(1_000 - 256), now), Some(&(1_000 - 256)));
        assert_eq!(map.get(&(1_000 - 257), now), None);
    }

    #[test]
    fn replacing_a_key_does_not_evict_and_reports_whether_it_was_new() {
        let now = Instant::now();
        let mut map = BoundedMap::new(2);
        assert!(map.insert("a", 1, now + Duration::from_secs(5), now));
        assert!(map.insert("b", 1, now + Duration::from_secs(5), now));
        assert!(!map.insert("a", 2, now + Duration::from_secs(5), now));
        assert_eq!(map.get("b", now), Some(&1));
        let later = now + Duration::from_secs(6);
        assert!(
            map.insert("a", 3, later + Duration::from_secs(5), later),
            "was expired"
        );
        assert_eq!(map.remove("a"), Some(3));
        assert_eq!(map.remove("a"), None);
    }
}
