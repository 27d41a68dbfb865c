//! [`Instances`]: the registered instances by id, shared between revisions.
//!
//! Every revision is published as an immutable view (`push::Published`)
//! that readers and watch streams hold while the registry moves on. A
//! plain map would have to be copied whole for each revision — with 10 000
//! instances, registering them one by one copies 50 million — so the map
//! is cut into [`SHARDS`] shards by a hash of the id, each behind an `Arc`.
//! Cloning the map clones the `Arc`s; changing one instance copies its
//! shard only if a published view still shares it (`Arc::make_mut`), so a
//! revision costs 1/[`SHARDS`] of the instances instead of all of them.
//!
//! Iteration order: [`Instances::values`] is by id (sorted on the way out,
//! for the API's listings); [`Instances::iter_unordered`] is for counting.

use std::collections::BTreeMap;
use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
use std::sync::Arc;

use crate::store::StoredInstance;

/// Shards of the map (a power of two).
pub const SHARDS: usize = 64;

type Shard = BTreeMap<String, StoredInstance>;

#[derive(Debug, Clone, PartialEq)]
pub struct Instances {
    shards: Vec<Arc<Shard>>,
    len: usize,
}

impl Default for Instances {
    fn default() -> Instances {
        let empty = Arc::new(Shard::new());
        Instances {
            shards: vec![empty; SHARDS],
            len: 0,
        }
    }
}

/// The shard of `id`: SipHash with fixed keys (the same in every process).
fn shard_of(id: &str) -> usize {
    let hash = BuildHasherDefault::<DefaultHasher>::default().hash_one(id);
    (hash as usize) & (SHARDS - 1)
}

impl Instances {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn get(&self, id: &str) -> Option<&StoredInstance> {
        self.shards[shard_of(id)].get(id)
    }

    pub fn contains_key(&self, id: &str) -> bool {
        self.get(id).is_some()
    }

    /// Inserts or replaces `instance` (by its registration's id); returns
    /// the one it replaced.
    pub fn insert(&mut self, instance: StoredInstance) -> Option<StoredInstance> {
        let id = instance.registration.id.clone();
        let old = Arc::make_mut(&mut self.shards[shard_of(&id)]).insert(id, instance);
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    pub fn remove(&mut self, id: &str) -> Option<StoredInstance> {
        let shard = &mut self.shards[shard_of(id)];
        if !shard.contains_key(id) {
            return None;
        }
        let old = Arc::make_mut(shard).remove(id);
        self.len -= usize::from(old.is_some());
        old
    }

    /// Every instance, in no particular order.
    pub fn iter_unordered(&self) -> impl Iterator<Item = &StoredInstance> + '_ {
        self.shards.iter().flat_map(|shard| shard.values())
    }

    /// Every instance, sorted by id.
    pub fn values(&self) -> impl Iterator<Item = &StoredInstance> + '_ {
        let mut all: Vec<&StoredInstance> = self.iter_unordered().collect();
        all.sort_unstable_by(|a, b| a.registration.id.cmp(&b.registration.id));
        all.into_iter()
    }

    /// Every id, sorted.
    pub fn keys(&self) -> impl Iterator<Item = &String> + '_ {
        self.values().map(|i| &i.registration.id)
    }
}

impl FromIterator<StoredInstance> for Instances {
    fn from_iter<I: IntoIterator<Item = StoredInstance>>(iter: I) -> Instances {
        let mut instances = Instances::default();
        for instance in iter {
            instances.insert(instance);
        }
        instances
    }
}

impl std::ops::Index<&str> for Instances {
    type Output = StoredInstance;

    fn index(&self, id: &str) -> &StoredInstance {
        self.get(id).expect("instance registered")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(id: &str) -> StoredInstance {
        StoredInstance {
            registration: crate::registry::tests::registration(id, "orders", 8080),
            registered_at_ms: 1,
        }
    }

    #[test]
    fn a_clone_keeps_its_view_while_the_original_changes() {
        let mut live: Instances = (0..500).map(|i| instance(&format!("i{i:03}"))).collect();
        let published = live.clone();
        live.remove("i007");
        live.insert(instance("new"));
        assert_eq!((published.len(), live.len()), (500, 500));
        assert!(published.contains_key("i007") && !published.contains_key("new"));
        assert!(!live.contains_key("i007") && live.contains_key("new"));
        // Only the two touched shards were copied.
        let shared = live
            .shards
            .iter()
            .zip(&published.shards)
            .filter(|(a, b)| Arc::ptr_eq(a, b))
            .count();
        assert!(shared >= SHARDS - 2, "{shared} shards shared");
        assert!(live.remove("absent").is_none());
        assert_eq!(live.len(), 500);
    }

    #[test]
    fn values_and_keys_are_sorted_by_id() {
        let live: Instances = ["c", "a", "b", "aa"].into_iter().map(instance).collect();
        let keys: Vec<&String> = live.keys().collect();
        assert_eq!(keys, ["a", "aa", "b", "c"]);
        assert_eq!(live.iter_unordered().count(), 4);
        assert_eq!(live["b"].registration.id, "b");
    }
}
