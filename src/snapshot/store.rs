//! The snapshot metadata store: one embedded, transactional redb file under the root dir.
//!
//! Every change is one write transaction committed with an fsync, so a daemon killed at any
//! moment finds either the state before or after an operation, never half of it (a lazy
//! Prepare's first write skips the fsync, as its last one has it: `Durability::Deferred`).
//! Directories on disk are made outside the store and linked to a record by its numeric id;
//! whatever directory has no record is an orphan for `Snapshotter::cleanup` to remove. Keys of active snapshots and
//! names of committed ones share one table, as they share one namespace in containerd.

use std::path::Path;
use std::time::SystemTime;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};

use super::types::{Info, Kind, Labels, Usage};

/// key or name → JSON-encoded `Record`. JSON keeps the file debuggable and lets fields be added.
const SNAPSHOTS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("snapshots");
/// (parent, child) → (): answers "has children?" without scanning every snapshot.
const CHILDREN: TableDefinition<'_, (&str, &str), ()> = TableDefinition::new("children");
/// Counters; only `next_id` for now.
const COUNTERS: TableDefinition<'_, &str, u64> = TableDefinition::new("counters");
const NEXT_ID: &str = "next_id";

/// Errors of the store itself, as opposed to snapshot semantics.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("open {path}")]
    Open {
        path: String,
        #[source]
        source: redb::DatabaseError,
    },
    #[error("database")]
    Db(#[from] redb::Error),
    #[error("record of snapshot {key:?} is corrupt")]
    Corrupt {
        key: String,
        #[source]
        source: serde_json::Error,
    },
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Db(e.into())
            }
        }
    )*};
}
from_redb!(
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);

/// Whether a write is on disk when it returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// fsynced before the write returns.
    Immediate,
    /// Durable only with the next `Immediate` write (see [`Store::write_with`]).
    Deferred,
}

/// What the store keeps about one snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Names the snapshot's directory; never reused while the record exists.
    pub id: u64,
    pub kind: Kind,
    pub parent: Option<String>,
    pub labels: Labels,
    pub created_at: SystemTime,
    pub updated_at: SystemTime,
    /// Measured at commit; zero for active snapshots and views.
    #[serde(default)]
    pub usage: Usage,
    /// Set when the layer is a lazily pulled one mounted at `fs`: what it takes to mount it
    /// again after a restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<super::remote::RemoteState>,
}

impl Record {
    pub fn info(&self, name: &str) -> Info {
        Info {
            name: name.to_owned(),
            parent: self.parent.clone().unwrap_or_default(),
            kind: self.kind,
            created_at: self.created_at,
            updated_at: self.updated_at,
            labels: self.labels.clone(),
        }
    }
}

/// The metadata database.
pub struct Store {
    db: Database,
}

impl Store {
    /// Opens or creates the database and makes sure every table exists, so that readers never
    /// meet a missing table.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Database::create(path).map_err(|source| StoreError::Open {
            path: path.display().to_string(),
            source,
        })?;
        let tx = db.begin_write()?;
        tx.open_table(SNAPSHOTS)?;
        tx.open_table(CHILDREN)?;
        tx.open_table(COUNTERS)?;
        tx.commit()?;
        Ok(Store { db })
    }

    /// Runs `f` in one write transaction and commits only if it succeeds.
    pub fn write<T, E>(&self, f: impl FnOnce(&mut Tx<'_>) -> Result<T, E>) -> Result<T, E>
    where
        E: From<StoreError>,
    {
        self.write_with(Durability::Immediate, f)
    }

    /// [`Self::write`], committed with `durability`: `Deferred` skips the fsync, for a change
    /// that the caller makes durable with a later write (or [`Self::sync`]) before anyone
    /// outside the daemon relies on it. Until then a crash may lose it, and only it: it is
    /// seen by every later transaction of this process as any committed change is.
    pub fn write_with<T, E>(
        &self,
        durability: Durability,
        f: impl FnOnce(&mut Tx<'_>) -> Result<T, E>,
    ) -> Result<T, E>
    where
        E: From<StoreError>,
    {
        let mut tx = self.db.begin_write().map_err(StoreError::from)?;
        if durability == Durability::Deferred {
            tx.set_durability(redb::Durability::None)
                .map_err(StoreError::from)?;
        }
        let mut wrapped = Tx { tx: &tx };
        let value = f(&mut wrapped)?;
        tx.commit().map_err(StoreError::from)?;
        Ok(value)
    }

    /// Makes every change committed so far durable (an empty transaction, fsynced).
    pub fn sync(&self) -> Result<(), StoreError> {
        self.write(|_| Ok::<_, StoreError>(()))
    }

    pub fn get(&self, key: &str) -> Result<Option<Record>, StoreError> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(SNAPSHOTS)?;
        let value = table.get(key)?;
        value.map(|v| decode(key, v.value())).transpose()
    }

    /// Every record, ordered by key. Read in one snapshot of the database, so a concurrent
    /// writer never makes a List skip or repeat an entry, and nothing is held once it returns.
    pub fn all(&self) -> Result<Vec<(String, Record)>, StoreError> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(SNAPSHOTS)?;
        let mut out = Vec::new();
        for item in table.iter()? {
            let (k, v) = item?;
            let key = k.value().to_owned();
            let record = decode(&key, v.value())?;
            out.push((key, record));
        }
        Ok(out)
    }

    /// The ids of `key`'s ancestors, nearest first (the order of overlayfs' `lowerdir`).
    pub fn parent_ids(&self, record: &Record) -> Result<Vec<u64>, StoreError> {
        Ok(self
            .parents(record)?
            .into_iter()
            .map(|(_, parent)| parent.id)
            .collect())
    }

    /// The parent chain of `record` with their keys, nearest first.
    pub fn parents(&self, record: &Record) -> Result<Vec<(String, Record)>, StoreError> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(SNAPSHOTS)?;
        let mut chain = Vec::new();
        let mut next = record.parent.clone();
        while let Some(parent) = next {
            let Some(value) = table.get(parent.as_str())? else {
                break;
            };
            let parent_record = decode(&parent, value.value())?;
            next = parent_record.parent.clone();
            chain.push((parent, parent_record));
        }
        Ok(chain)
    }
}

/// A write transaction with the operations the snapshotter needs.
pub struct Tx<'a> {
    tx: &'a WriteTransaction,
}

impl Tx<'_> {
    pub fn get(&self, key: &str) -> Result<Option<Record>, StoreError> {
        let table = self.tx.open_table(SNAPSHOTS)?;
        let value = table.get(key)?;
        value.map(|v| decode(key, v.value())).transpose()
    }

    /// Inserts or replaces `key`, keeping the children index in step with `record.parent`.
    pub fn put(&mut self, key: &str, record: &Record) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(record).map_err(|source| StoreError::Corrupt {
            key: key.to_owned(),
            source,
        })?;
        self.tx
            .open_table(SNAPSHOTS)?
            .insert(key, bytes.as_slice())?;
        if let Some(parent) = &record.parent {
            self.tx
                .open_table(CHILDREN)?
                .insert((parent.as_str(), key), ())?;
        }
        Ok(())
    }

    /// Deletes `key` and its entry in the children index; returns what was there.
    pub fn delete(&mut self, key: &str) -> Result<Option<Record>, StoreError> {
        let record = {
            let mut table = self.tx.open_table(SNAPSHOTS)?;
            let removed = table.remove(key)?;
            removed.map(|v| decode(key, v.value())).transpose()?
        };
        if let Some(parent) = record.as_ref().and_then(|r| r.parent.as_deref()) {
            self.tx.open_table(CHILDREN)?.remove((parent, key))?;
        }
        Ok(record)
    }

    pub fn has_children(&self, key: &str) -> Result<bool, StoreError> {
        let table = self.tx.open_table(CHILDREN)?;
        let mut range = table.range((key, "")..)?;
        let first = match range.next() {
            Some(item) => {
                let (k, _) = item?;
                k.value().0 == key
            }
            None => false,
        };
        Ok(first)
    }

    /// Allocates a fresh id. It is only used if the transaction commits, and an id from an
    /// uncommitted transaction may be handed out again, which is why a directory that no record
    /// names is always safe to delete.
    pub fn next_id(&mut self) -> Result<u64, StoreError> {
        let mut table = self.tx.open_table(COUNTERS)?;
        let id = table.get(NEXT_ID)?.map(|v| v.value()).unwrap_or(1);
        table.insert(NEXT_ID, id + 1)?;
        Ok(id)
    }
}

fn decode(key: &str, bytes: &[u8]) -> Result<Record, StoreError> {
    serde_json::from_slice(bytes).map_err(|source| StoreError::Corrupt {
        key: key.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: u64, kind: Kind, parent: Option<&str>) -> Record {
        Record {
            id,
            kind,
            parent: parent.map(str::to_owned),
            labels: Labels::new(),
            created_at: SystemTime::UNIX_EPOCH,
            updated_at: SystemTime::UNIX_EPOCH,
            usage: Usage::default(),
            remote: None,
        }
    }

    fn open() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("metadata.redb")).expect("open store");
        (dir, store)
    }

    #[test]
    fn parent_chain_is_nearest_first() {
        let (_dir, store) = open();
        store
            .write(|tx| -> Result<(), StoreError> {
                tx.put("base", &record(1, Kind::Committed, None))?;
                tx.put("mid", &record(2, Kind::Committed, Some("base")))?;
                tx.put("top", &record(3, Kind::Active, Some("mid")))
            })
            .expect("write");
        let top = store.get("top").expect("get").expect("top exists");
        assert_eq!(store.parent_ids(&top).expect("parents"), vec![2, 1]);
    }

    #[test]
    fn children_index_follows_puts_and_deletes() {
        let (_dir, store) = open();
        store
            .write(|tx| -> Result<(), StoreError> {
                tx.put("a", &record(1, Kind::Committed, None))?;
                tx.put("ab", &record(2, Kind::Committed, None))?;
                tx.put("child", &record(3, Kind::Active, Some("a")))?;
                // "ab" sorts right after "a": a prefix match would wrongly report a child.
                assert!(tx.has_children("a")?);
                assert!(!tx.has_children("ab")?);
                tx.delete("child")?;
                assert!(!tx.has_children("a")?);
                Ok(())
            })
            .expect("write");
    }

    #[test]
    fn failed_transaction_leaves_nothing() {
        let (_dir, store) = open();
        let result: Result<(), StoreError> = store.write(|tx| {
            tx.put("x", &record(1, Kind::Active, None))?;
            Err(StoreError::Corrupt {
                key: "x".into(),
                source: serde_json::from_slice::<u8>(b"!").unwrap_err(),
            })
        });
        assert!(result.is_err());
        assert_eq!(store.get("x").expect("get"), None);
    }

    #[test]
    fn deferred_writes_are_seen_at_once_and_kept_once_synced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("metadata.redb");
        {
            let store = Store::open(&path).expect("open");
            store
                .write_with(Durability::Deferred, |tx| {
                    tx.put("a", &record(1, Kind::Active, None))
                })
                .expect("deferred write");
            assert!(store.get("a").expect("get").is_some(), "seen at once");
            store.sync().expect("sync");
        }
        let store = Store::open(&path).expect("reopen");
        assert!(store.get("a").expect("get").is_some(), "kept once synced");
    }

    #[test]
    fn ids_are_unique_and_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("metadata.redb");
        let first = {
            let store = Store::open(&path).expect("open");
            store.write(|tx| tx.next_id()).expect("id")
        };
        let store = Store::open(&path).expect("reopen");
        let second = store.write(|tx| tx.next_id()).expect("id");
        assert!(second > first);
    }
}
