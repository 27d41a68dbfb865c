//! The durable store: everything that must survive a restart or `kill -9`.
//!
//! Data flow: at start the control plane calls [`Store::load`] once and
//! builds its in-memory registry from it. Afterwards every revision is one
//! [`Commit`] — instances and resources put or deleted, the
//! [`RevisionRecord`] appended, the current revision set — written
//! atomically *before* the revision is published to watchers. Reads of the
//! API are served from memory; only [`Store::history`] reads the store.
//!
//! Heartbeat times are not stored: after a restart every loaded instance
//! gets a fresh TTL.
//!
//! **Rollback data.** Each revision that changes resources also records,
//! in the same transaction, its [`ResourceChange`]s: every touched key with
//! the resource *before* and *after* (table `changes`, keyed by revision,
//! trimmed with the revision records). The set of resources right after
//! revision N is rebuilt by starting from the current set and undoing the
//! changes of every later revision, newest first (put back each `before`).
//! Storing before/after pairs (rather than full sets per revision or
//! forward deltas) costs only what a revision changed, needs no base
//! snapshot when old history is trimmed, and makes "what did revision N
//! do" and "when did this resource last change" answerable from one table.
//! A store written before this table existed records, in `meta`, the
//! revision from which change records are complete (`changes_since`);
//! older revisions cannot be rolled back to.
//!
//! **Credentials** (issue 13): the API's token records (hashes, never a
//! token's plaintext) are a blob of their own ([`Store::load_access`],
//! [`Store::save_tokens`]), replaced whole when it changes. The instance
//! [`Owners`] (which token registered which instance id) are a table of
//! their own, `owners` (id → token name), changed by the ids claimed and
//! released ([`Store::save_owner_changes`]), so a registration writes one
//! row, not every owner of a 10 000-instance mesh. (Stores written before
//! kept the owners as one blob in `access`; the first change moves it
//! into the table.) Owners are written after the revision that registers
//! or removes an instance; a crash in between is harmless: on load, owners
//! of ids no longer registered are dropped, and a registered instance
//! without an owner gets 404 on its next heartbeat and registers again.
//!
//! **Dashboard sessions** are not part of [`Store`]: they live behind the
//! small async [`SessionStore`] (see `access::sessions`), in memory with
//! redb (`access::sessions::MemorySessions`) and in etcd with
//! `--store etcd` (shared by every replica, see `store::etcd`).
//!
//! Three implementations: [`RedbStore`] (a redb file, every commit durable
//! before it returns; the default), [`etcd::EtcdStore`] (`--store etcd`:
//! an etcd cluster shared by several control-plane replicas, see its
//! module docs) and [`MemoryStore`] for tests.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Mutex;

use meshlet_api::changes::ChangeStamp;
use meshlet_api::mesh::{Registration, RevisionRecord};
use meshlet_api::{Resource, ResourceKey};
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::auth::{Owners, TokenHash, TokenRecord};
use crate::error::StoreError;

pub mod etcd;

/// How many revision records are kept; older ones are dropped on commit.
pub const HISTORY_LIMIT: u64 = 10_000;

/// A registered instance as stored: the registration (with its current
/// health) and when it registered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredInstance {
    pub registration: Registration,
    pub registered_at_ms: u64,
}

/// One resource change of a revision: the resource before and after
/// (`None`: absent).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResourceChange {
    pub key: ResourceKey,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<Resource>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<Resource>,
}

/// The resource changes needed to go back to a revision.
#[derive(Debug, Clone, PartialEq)]
pub enum Rewind {
    /// The changes of every revision after it, oldest first.
    Changes(Vec<(u64, Vec<ResourceChange>)>),
    /// Its record or the change records after it are no longer kept;
    /// `oldest` is the oldest revision that can still be rolled back to.
    NotRetained { oldest: Option<u64> },
}

/// Everything the store holds, as loaded at start.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Loaded {
    /// Random identity of this store, fixed at its creation (see
    /// `MeshState::epoch`).
    pub epoch: u64,
    pub revision: u64,
    pub instances: Vec<StoredInstance>,
    pub resources: Vec<Resource>,
    /// The last recorded change of each current resource (resources last
    /// changed before change records existed have none).
    pub last_changes: BTreeMap<ResourceKey, ChangeStamp>,
}

/// One revision's writes, applied all or nothing.
#[derive(Debug, Clone, PartialEq)]
pub struct Commit {
    pub revision: u64,
    pub put_instances: Vec<StoredInstance>,
    pub delete_instances: Vec<String>,
    pub put_resources: Vec<Resource>,
    pub delete_resources: Vec<ResourceKey>,
    /// Before/after of every resource this revision changes (the rollback
    /// data; consistent with `put_resources` and `delete_resources`).
    pub resource_changes: Vec<ResourceChange>,
    pub record: RevisionRecord,
}

impl Commit {
    /// Applies the instance and resource writes to in-memory maps (the
    /// registry's, and the memory store's).
    pub fn apply_to(
        &self,
        instances: &mut BTreeMap<String, StoredInstance>,
        resources: &mut BTreeMap<ResourceKey, Resource>,
    ) {
        for id in &self.delete_instances {
            instances.remove(id);
        }
        for i in &self.put_instances {
            instances.insert(i.registration.id.clone(), i.clone());
        }
        for key in &self.delete_resources {
            resources.remove(key);
        }
        for r in &self.put_resources {
            resources.insert(r.key(), r.clone());
        }
    }
}

impl Default for Commit {
    fn default() -> Commit {
        Commit {
            revision: 0,
            put_instances: Vec::new(),
            delete_instances: Vec::new(),
            put_resources: Vec::new(),
            delete_resources: Vec::new(),
            resource_changes: Vec::new(),
            record: RevisionRecord {
                revision: 0,
                at_ms: 0,
                actor: String::new(),
                changes: Vec::new(),
            },
        }
    }
}

/// The durable store. Methods block; async callers run them on the
/// blocking pool, one writer at a time.
pub trait Store: Send + Sync + 'static {
    fn load(&self) -> Result<Loaded, StoreError>;
    fn commit(&self, commit: &Commit) -> Result<(), StoreError>;
    /// The newest `limit` revision records, newest first.
    fn history(&self, limit: usize) -> Result<Vec<RevisionRecord>, StoreError>;
    /// What it takes to go back to the state right after `revision`
    /// (at most the current revision).
    fn rewind(&self, revision: u64) -> Result<Rewind, StoreError>;
    /// The stored token records and instance owners (empty in a new store).
    fn load_access(&self) -> Result<AccessRecords, StoreError>;
    /// Replaces the stored token records (after a token is created or
    /// revoked, or the admin token set up).
    fn save_tokens(&self, tokens: &[TokenRecord]) -> Result<(), StoreError>;
    /// Records the instance ids claimed and released since the last call.
    fn save_owner_changes(&self, changes: &OwnerChanges) -> Result<(), StoreError>;
}

/// One dashboard log-in session as a [`SessionStore`] holds it, under
/// the SHA-256 of its id (the id itself is never stored).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredSession {
    /// The token it stands for (checked again on every use).
    pub token_name: String,
    pub created_ms: u64,
    /// The store forgets the session by then at the latest.
    pub expires_ms: u64,
}

/// What a [`SessionStore`] call answers, later (etcd is a network call).
pub type SessionFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// Where the dashboard's sessions live: one replica's memory, or etcd
/// for every replica. The logic (cookies, the token check) is
/// `access::sessions`'; a store only keeps records.
pub trait SessionStore: Send + Sync + 'static {
    /// Keeps `session` under `id` until its `expires_ms`; when that makes
    /// more than `cap` sessions, the oldest others go.
    fn put_session(
        &self,
        id: TokenHash,
        session: StoredSession,
        cap: usize,
    ) -> SessionFuture<'_, ()>;
    /// The session under `id`, if the store still holds it.
    fn session(&self, id: TokenHash) -> SessionFuture<'_, Option<StoredSession>>;
    /// Forgets the session under `id` (nothing if it is gone already).
    fn delete_session(&self, id: TokenHash) -> SessionFuture<'_, ()>;
}

/// Changes to the instance owners, as [`Store::save_owner_changes`] writes
/// them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OwnerChanges {
    /// `(instance id, token name)` of newly claimed ids.
    pub claimed: Vec<(String, String)>,
    /// Ids that are free again.
    pub released: Vec<String>,
}

impl OwnerChanges {
    pub fn is_empty(&self) -> bool {
        self.claimed.is_empty() && self.released.is_empty()
    }

    /// Applies the changes to `owners` (what the store now holds).
    pub fn apply_to(&self, owners: &mut Owners) {
        for id in &self.released {
            owners.release(id);
        }
        for (id, holder) in &self.claimed {
            owners.record(id.clone(), holder.clone());
        }
    }
}

/// The credentials part of the store (see the module docs).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AccessRecords {
    pub tokens: Vec<TokenRecord>,
    pub owners: Owners,
}

/// The last change of each key in `current`, from change records read
/// newest first.
fn last_changes(
    current: &[Resource],
    newest_first: impl Iterator<Item = (u64, Vec<ResourceChange>)>,
    record: impl Fn(u64) -> Option<ChangeStamp>,
) -> BTreeMap<ResourceKey, ChangeStamp> {
    let mut wanted: std::collections::BTreeSet<ResourceKey> =
        current.iter().map(Resource::key).collect();
    let mut out = BTreeMap::new();
    for (revision, changes) in newest_first {
        if wanted.is_empty() {
            break;
        }
        for change in changes {
            if wanted.remove(&change.key) {
                if let Some(stamp) = record(revision) {
                    out.insert(change.key, stamp);
                }
            }
        }
    }
    out
}

const INSTANCES: TableDefinition<&str, &[u8]> = TableDefinition::new("instances");
const RESOURCES: TableDefinition<&str, &[u8]> = TableDefinition::new("resources");
const REVISIONS: TableDefinition<u64, &[u8]> = TableDefinition::new("revisions");
const CHANGES: TableDefinition<u64, &[u8]> = TableDefinition::new("changes");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Blobs of the credentials: [`TOKENS_KEY`] (and, in stores written
/// before the `owners` table, [`OWNERS_KEY`]), JSON.
const ACCESS: TableDefinition<&str, &[u8]> = TableDefinition::new("access");
const TOKENS_KEY: &str = "tokens";
const OWNERS_KEY: &str = "owners";
/// Instance id → the name of the token that registered it.
const OWNERS: TableDefinition<&str, &str> = TableDefinition::new("owners");
const CURRENT_REVISION: &str = "revision";
const EPOCH: &str = "epoch";
/// The revision from which change records are complete.
const CHANGES_SINCE: &str = "changes_since";

/// A random non-zero epoch for a new store.
fn new_epoch() -> u64 {
    use std::hash::BuildHasher;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    // RandomState is seeded from the operating system's randomness. The
    // epoch stays below 2^53 so that JSON readers that use doubles keep it
    // exact.
    let random =
        std::collections::hash_map::RandomState::new().hash_one((nanos, std::process::id()));
    (random >> 11).max(1)
}

/// The store key of a resource: `Kind/namespace/name`.
fn resource_key(key: &ResourceKey) -> String {
    format!("{}/{}/{}", key.kind, key.namespace, key.name)
}

fn encode<T: Serialize>(what: &'static str, value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|source| StoreError::Encode { what, source })
}

fn write_error(err: impl Into<redb::Error>) -> StoreError {
    StoreError::Write(err.into())
}

fn decode<T: for<'de> Deserialize<'de>>(
    what: &'static str,
    key: String,
    bytes: &[u8],
) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|source| StoreError::Decode { what, key, source })
}

/// The store in `{data-dir}/meshlet.redb`.
pub struct RedbStore {
    db: redb::Database,
}

impl RedbStore {
    pub const FILE_NAME: &'static str = "meshlet.redb";

    /// Opens (or creates) the store file in `dir`; the file is made private
    /// (0600): it holds the token hashes.
    pub fn open(dir: &Path) -> Result<RedbStore, StoreError> {
        let path: PathBuf = dir.join(Self::FILE_NAME);
        let open_error = |source: redb::Error| StoreError::Open {
            path: path.clone(),
            source,
        };
        let db = redb::Database::create(&path).map_err(|e| open_error(e.into()))?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| open_error(redb::StorageError::Io(e).into()))?;
        }
        // Create the tables so that readers never meet a missing one.
        let create = || -> Result<(), redb::Error> {
            let txn = db.begin_write()?;
            txn.open_table(INSTANCES)?;
            txn.open_table(RESOURCES)?;
            txn.open_table(REVISIONS)?;
            txn.open_table(CHANGES)?;
            txn.open_table(ACCESS)?;
            {
                let mut meta = txn.open_table(META)?;
                if meta.get(EPOCH)?.is_none() {
                    meta.insert(EPOCH, new_epoch())?;
                }
                if meta.get(CHANGES_SINCE)?.is_none() {
                    // A store from before change records: only the current
                    // state (and later ones) can be rebuilt.
                    let current = meta.get(CURRENT_REVISION)?.map(|v| v.value()).unwrap_or(0);
                    meta.insert(CHANGES_SINCE, current)?;
                }
            }
            txn.commit()?;
            Ok(())
        };
        create().map_err(open_error)?;
        Ok(RedbStore { db })
    }
}

type RawRows = Vec<(String, Vec<u8>)>;

impl RedbStore {
    fn put_blob(&self, key: &str, bytes: &[u8]) -> Result<(), StoreError> {
        let write = || -> Result<(), redb::Error> {
            let mut txn = self.db.begin_write()?;
            txn.set_durability(redb::Durability::Immediate)?;
            txn.open_table(ACCESS)?.insert(key, bytes)?;
            txn.commit()?;
            Ok(())
        };
        write().map_err(StoreError::Write)
    }
}

impl Store for RedbStore {
    fn load(&self) -> Result<Loaded, StoreError> {
        type RawChanges = Vec<(u64, Vec<u8>)>;
        let read = || -> Result<(u64, u64, RawRows, RawRows, RawChanges), redb::Error> {
            let txn = self.db.begin_read()?;
            let meta = txn.open_table(META)?;
            let revision = meta.get(CURRENT_REVISION)?.map(|v| v.value()).unwrap_or(0);
            let epoch = meta.get(EPOCH)?.map(|v| v.value()).unwrap_or(0);
            let rows = |def: TableDefinition<&str, &[u8]>| -> Result<RawRows, redb::Error> {
                let table = txn.open_table(def)?;
                let mut out = Vec::new();
                for entry in table.iter()? {
                    let (k, v) = entry?;
                    out.push((k.value().to_owned(), v.value().to_vec()));
                }
                Ok(out)
            };
            let instances = rows(INSTANCES)?;
            let resources = rows(RESOURCES)?;
            let mut changes = Vec::new();
            for entry in txn.open_table(CHANGES)?.iter()?.rev() {
                let (k, v) = entry?;
                changes.push((k.value(), v.value().to_vec()));
            }
            Ok((epoch, revision, instances, resources, changes))
        };
        let (epoch, revision, instances, resources, changes) = read().map_err(StoreError::Read)?;
        let resources: Vec<Resource> = resources
            .into_iter()
            .map(|(k, v)| decode("resource", k, &v))
            .collect::<Result<_, _>>()?;
        let changes: Vec<(u64, Vec<ResourceChange>)> = changes
            .into_iter()
            .map(|(k, v)| Ok((k, decode("change", k.to_string(), &v)?)))
            .collect::<Result<_, StoreError>>()?;
        let records: BTreeMap<u64, RevisionRecord> = self
            .history(usize::MAX)?
            .into_iter()
            .map(|r| (r.revision, r))
            .collect();
        let last_changes = last_changes(&resources, changes.into_iter(), |r| {
            records.get(&r).map(ChangeStamp::of)
        });
        Ok(Loaded {
            epoch,
            revision,
            instances: instances
                .into_iter()
                .map(|(k, v)| decode("instance", k, &v))
                .collect::<Result<_, _>>()?,
            resources,
            last_changes,
        })
    }

    fn commit(&self, commit: &Commit) -> Result<(), StoreError> {
        // Encode first so that the write transaction only writes.
        let instances = commit
            .put_instances
            .iter()
            .map(|i| Ok((i.registration.id.as_str(), encode("instance", i)?)))
            .collect::<Result<Vec<_>, StoreError>>()?;
        let resources = commit
            .put_resources
            .iter()
            .map(|r| Ok((resource_key(&r.key()), encode("resource", r)?)))
            .collect::<Result<Vec<_>, StoreError>>()?;
        let record = encode("revision", &commit.record)?;
        let changes = if commit.resource_changes.is_empty() {
            None
        } else {
            Some(encode("change", &commit.resource_changes)?)
        };
        let write = || -> Result<(), redb::Error> {
            let mut txn = self.db.begin_write()?;
            txn.set_durability(redb::Durability::Immediate)?;
            {
                let mut table = txn.open_table(INSTANCES)?;
                for id in &commit.delete_instances {
                    table.remove(id.as_str())?;
                }
                for (id, bytes) in &instances {
                    table.insert(*id, bytes.as_slice())?;
                }
                let mut table = txn.open_table(RESOURCES)?;
                for key in &commit.delete_resources {
                    table.remove(resource_key(key).as_str())?;
                }
                for (key, bytes) in &resources {
                    table.insert(key.as_str(), bytes.as_slice())?;
                }
                let mut table = txn.open_table(REVISIONS)?;
                table.insert(commit.revision, record.as_slice())?;
                if commit.revision > HISTORY_LIMIT {
                    table.remove(commit.revision - HISTORY_LIMIT)?;
                }
                let mut table = txn.open_table(CHANGES)?;
                if let Some(changes) = &changes {
                    table.insert(commit.revision, changes.as_slice())?;
                }
                if commit.revision > HISTORY_LIMIT {
                    table.remove(commit.revision - HISTORY_LIMIT)?;
                }
                txn.open_table(META)?
                    .insert(CURRENT_REVISION, commit.revision)?;
            }
            txn.commit()?;
            Ok(())
        };
        write().map_err(|source| StoreError::Commit {
            revision: commit.revision,
            source,
        })
    }

    fn history(&self, limit: usize) -> Result<Vec<RevisionRecord>, StoreError> {
        let read = || -> Result<Vec<(u64, Vec<u8>)>, redb::Error> {
            let txn = self.db.begin_read()?;
            let table = txn.open_table(REVISIONS)?;
            let mut out = Vec::new();
            for entry in table.iter()?.rev().take(limit) {
                let (k, v) = entry?;
                out.push((k.value(), v.value().to_vec()));
            }
            Ok(out)
        };
        read()
            .map_err(StoreError::Read)?
            .into_iter()
            .map(|(k, v)| decode("revision", k.to_string(), &v))
            .collect()
    }

    fn rewind(&self, revision: u64) -> Result<Rewind, StoreError> {
        type Read = (u64, Option<u64>, bool, Vec<(u64, Vec<u8>)>);
        let read = || -> Result<Read, redb::Error> {
            let txn = self.db.begin_read()?;
            let meta = txn.open_table(META)?;
            let since = meta.get(CHANGES_SINCE)?.map(|v| v.value()).unwrap_or(0);
            let records = txn.open_table(REVISIONS)?;
            let oldest_record = records.first()?.map(|(k, _)| k.value());
            let known = records.get(revision)?.is_some();
            let mut changes = Vec::new();
            if known && revision >= since {
                for entry in txn.open_table(CHANGES)?.range(revision + 1..)? {
                    let (k, v) = entry?;
                    changes.push((k.value(), v.value().to_vec()));
                }
            }
            Ok((since, oldest_record, known, changes))
        };
        let (since, oldest_record, known, changes) = read().map_err(StoreError::Read)?;
        if !known || revision < since {
            let oldest = oldest_record.map(|o| o.max(since));
            return Ok(Rewind::NotRetained { oldest });
        }
        Ok(Rewind::Changes(
            changes
                .into_iter()
                .map(|(k, v)| Ok((k, decode("change", k.to_string(), &v)?)))
                .collect::<Result<_, StoreError>>()?,
        ))
    }

    fn load_access(&self) -> Result<AccessRecords, StoreError> {
        type Read = (Option<Vec<u8>>, Option<Vec<u8>>, Vec<(String, String)>);
        let read = || -> Result<Read, redb::Error> {
            let txn = self.db.begin_read()?;
            let table = txn.open_table(ACCESS)?;
            let tokens = table.get(TOKENS_KEY)?.map(|v| v.value().to_vec());
            let legacy = table.get(OWNERS_KEY)?.map(|v| v.value().to_vec());
            let mut rows = Vec::new();
            match txn.open_table(OWNERS) {
                Ok(owners) => {
                    for row in owners.iter()? {
                        let (id, holder) = row?;
                        rows.push((id.value().to_owned(), holder.value().to_owned()));
                    }
                }
                Err(redb::TableError::TableDoesNotExist(_)) => {}
                Err(err) => return Err(err.into()),
            }
            Ok((tokens, legacy, rows))
        };
        let (tokens, legacy, rows) = read().map_err(StoreError::Read)?;
        let mut owners = match legacy {
            Some(bytes) => decode("owners", OWNERS_KEY.to_owned(), &bytes)?,
            None => Owners::new(),
        };
        for (id, holder) in rows {
            owners.record(id, holder);
        }
        Ok(AccessRecords {
            tokens: match tokens {
                Some(bytes) => decode("tokens", TOKENS_KEY.to_owned(), &bytes)?,
                None => Vec::new(),
            },
            owners,
        })
    }

    fn save_tokens(&self, tokens: &[TokenRecord]) -> Result<(), StoreError> {
        self.put_blob(TOKENS_KEY, &encode("tokens", &tokens)?)
    }

    fn save_owner_changes(&self, changes: &OwnerChanges) -> Result<(), StoreError> {
        let mut txn = self.db.begin_write().map_err(write_error)?;
        txn.set_durability(redb::Durability::Immediate)
            .map_err(write_error)?;
        {
            let mut table = txn.open_table(OWNERS).map_err(write_error)?;
            // A store from before the table: move the blob in first.
            let mut access = txn.open_table(ACCESS).map_err(write_error)?;
            let legacy = access
                .remove(OWNERS_KEY)
                .map_err(write_error)?
                .map(|v| v.value().to_vec());
            if let Some(bytes) = legacy {
                let owners: Owners = decode("owners", OWNERS_KEY.to_owned(), &bytes)?;
                for (id, holder) in owners.iter() {
                    table.insert(id, holder).map_err(write_error)?;
                }
            }
            for id in &changes.released {
                table.remove(id.as_str()).map_err(write_error)?;
            }
            for (id, holder) in &changes.claimed {
                table
                    .insert(id.as_str(), holder.as_str())
                    .map_err(write_error)?;
            }
        }
        txn.commit().map_err(write_error)
    }
}

/// An in-memory store for tests; `fail_commits` makes every commit fail.
#[derive(Default)]
pub struct MemoryStore {
    inner: Mutex<MemoryInner>,
}

#[derive(Default)]
struct MemoryInner {
    epoch: u64,
    revision: u64,
    instances: BTreeMap<String, StoredInstance>,
    resources: BTreeMap<ResourceKey, Resource>,
    history: BTreeMap<u64, RevisionRecord>,
    changes: BTreeMap<u64, Vec<ResourceChange>>,
    access: AccessRecords,
    fail_commits: bool,
}

impl MemoryStore {
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    /// Makes every later commit fail (to test error paths).
    pub fn fail_commits(&self, fail: bool) {
        self.inner.lock().unwrap().fail_commits = fail;
    }
}

impl Store for MemoryStore {
    fn load(&self) -> Result<Loaded, StoreError> {
        let mut inner = self.inner.lock().unwrap();
        if inner.epoch == 0 {
            inner.epoch = new_epoch();
        }
        let resources: Vec<Resource> = inner.resources.values().cloned().collect();
        let changes = inner.changes.iter().rev().map(|(r, c)| (*r, c.clone()));
        let last_changes = last_changes(&resources, changes, |r| {
            inner.history.get(&r).map(ChangeStamp::of)
        });
        Ok(Loaded {
            epoch: inner.epoch,
            revision: inner.revision,
            instances: inner.instances.values().cloned().collect(),
            resources,
            last_changes,
        })
    }

    fn commit(&self, commit: &Commit) -> Result<(), StoreError> {
        let mut inner = self.inner.lock().unwrap();
        if inner.fail_commits {
            return Err(StoreError::Commit {
                revision: commit.revision,
                source: redb::Error::Corrupted("memory store set to fail".into()),
            });
        }
        let inner = &mut *inner;
        commit.apply_to(&mut inner.instances, &mut inner.resources);
        inner.history.insert(commit.revision, commit.record.clone());
        if !commit.resource_changes.is_empty() {
            inner
                .changes
                .insert(commit.revision, commit.resource_changes.clone());
        }
        if commit.revision > HISTORY_LIMIT {
            inner.history.remove(&(commit.revision - HISTORY_LIMIT));
            inner.changes.remove(&(commit.revision - HISTORY_LIMIT));
        }
        inner.revision = commit.revision;
        Ok(())
    }

    fn history(&self, limit: usize) -> Result<Vec<RevisionRecord>, StoreError> {
        let inner = self.inner.lock().unwrap();
        Ok(inner.history.values().rev().take(limit).cloned().collect())
    }

    fn rewind(&self, revision: u64) -> Result<Rewind, StoreError> {
        let inner = self.inner.lock().unwrap();
        if !inner.history.contains_key(&revision) {
            let oldest = inner.history.keys().next().copied();
            return Ok(Rewind::NotRetained { oldest });
        }
        Ok(Rewind::Changes(
            inner
                .changes
                .range(revision + 1..)
                .map(|(r, c)| (*r, c.clone()))
                .collect(),
        ))
    }

    fn load_access(&self) -> Result<AccessRecords, StoreError> {
        Ok(self.inner.lock().unwrap().access.clone())
    }

    fn save_tokens(&self, tokens: &[TokenRecord]) -> Result<(), StoreError> {
        self.inner.lock().unwrap().access.tokens = tokens.to_vec();
        Ok(())
    }

    fn save_owner_changes(&self, changes: &OwnerChanges) -> Result<(), StoreError> {
        changes.apply_to(&mut self.inner.lock().unwrap().access.owners);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn instance(id: &str, port: u16) -> StoredInstance {
        StoredInstance {
            registration: Registration {
                id: id.into(),
                service: "orders".into(),
                namespace: "default".into(),
                address: ([127, 0, 0, 1], port).into(),
                labels: BTreeMap::from([("version".to_owned(), "v1".to_owned())]),
                healthy: true,
                app_protocol: None,
                role: meshlet_api::mesh::InstanceRole::Sidecar,
            },
            registered_at_ms: 42,
        }
    }

    fn policy(name: &str) -> Resource {
        let text = format!(
            "apiVersion: meshlet.dev/v1alpha1\nkind: HealthCheckPolicy\nmetadata: {{name: {name}}}\nspec: {{targetRef: {{service: orders}}}}\n"
        );
        meshlet_api::parse_documents("t", &text).unwrap().remove(0)
    }

    fn record(revision: u64) -> RevisionRecord {
        RevisionRecord {
            revision,
            at_ms: revision * 10,
            actor: "registry".into(),
            changes: vec![format!("change {revision}")],
        }
    }

    fn round_trip(store: &dyn Store) {
        let empty = store.load().unwrap();
        assert_ne!(empty.epoch, 0, "a new store gets an epoch");
        assert_eq!(
            empty,
            Loaded {
                epoch: empty.epoch,
                ..Loaded::default()
            }
        );
        store
            .commit(&Commit {
                revision: 1,
                put_instances: vec![instance("a", 1), instance("b", 2)],
                put_resources: vec![policy("p1"), policy("p2")],
                record: record(1),
                ..Default::default()
            })
            .unwrap();
        store
            .commit(&Commit {
                revision: 2,
                delete_instances: vec!["a".into()],
                delete_resources: vec![policy("p1").key()],
                record: record(2),
                ..Default::default()
            })
            .unwrap();
        let loaded = store.load().unwrap();
        assert_eq!(loaded.epoch, empty.epoch, "the epoch is stable");
        assert_eq!(loaded.revision, 2);
        assert_eq!(loaded.instances, vec![instance("b", 2)]);
        assert_eq!(loaded.resources, vec![policy("p2")]);
        assert_eq!(store.history(10).unwrap(), vec![record(2), record(1)]);
        assert_eq!(store.history(1).unwrap(), vec![record(2)]);
    }

    #[test]
    fn memory_store_round_trip() {
        round_trip(&MemoryStore::new());
    }

    #[test]
    fn redb_store_round_trip_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let epoch = {
            let store = RedbStore::open(dir.path()).unwrap();
            round_trip(&store);
            store.load().unwrap().epoch
        };
        let store = RedbStore::open(dir.path()).unwrap();
        let loaded = store.load().unwrap();
        assert_eq!(loaded.epoch, epoch, "the epoch survives a reopen");
        assert_eq!(loaded.revision, 2);
        assert_eq!(loaded.instances, vec![instance("b", 2)]);
        assert_eq!(loaded.resources, vec![policy("p2")]);
        assert_eq!(store.history(5).unwrap().len(), 2);
    }

    fn owners_of(store: &dyn Store) -> Vec<(String, String)> {
        let owners = store.load_access().unwrap().owners;
        owners
            .iter()
            .map(|(id, holder)| (id.to_owned(), holder.to_owned()))
            .collect()
    }

    fn pair(id: &str, holder: &str) -> (String, String) {
        (id.to_owned(), holder.to_owned())
    }

    #[test]
    fn owner_changes_are_rows_and_a_legacy_blob_moves_into_them() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = RedbStore::open(dir.path()).unwrap();
            // A store written before the owners table: one blob.
            let mut legacy = Owners::new();
            legacy.record("old-1".into(), "tok-a".into());
            legacy.record("old-2".into(), "tok-a".into());
            store
                .put_blob(OWNERS_KEY, &encode("owners", &legacy).unwrap())
                .unwrap();
            assert_eq!(
                owners_of(&store),
                [pair("old-1", "tok-a"), pair("old-2", "tok-a")]
            );
            let changes = OwnerChanges {
                claimed: vec![pair("new-1", "tok-b")],
                released: vec!["old-1".into()],
            };
            store.save_owner_changes(&changes).unwrap();
        }
        let store = RedbStore::open(dir.path()).unwrap();
        assert_eq!(
            owners_of(&store),
            [pair("new-1", "tok-b"), pair("old-2", "tok-a")],
            "the blob's owners moved to the table, the changes applied on top"
        );
        store
            .save_owner_changes(&OwnerChanges {
                claimed: vec![],
                released: vec!["old-2".into(), "absent".into()],
            })
            .unwrap();
        assert_eq!(owners_of(&store), [pair("new-1", "tok-b")]);
        let memory = MemoryStore::new();
        memory
            .save_owner_changes(&OwnerChanges {
                claimed: vec![pair("new-1", "tok-b")],
                released: vec![],
            })
            .unwrap();
        assert_eq!(owners_of(&memory), [pair("new-1", "tok-b")]);
    }

    #[test]
    fn redb_commit_is_atomic_with_many_puts() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(dir.path()).unwrap();
        let many: Vec<_> = (0..200)
            .map(|i| instance(&format!("i{i}"), 1000 + i))
            .collect();
        store
            .commit(&Commit {
                revision: 1,
                put_instances: many.clone(),
                put_resources: vec![policy("p")],
                record: record(1),
                ..Default::default()
            })
            .unwrap();
        drop(store);
        let loaded = RedbStore::open(dir.path()).unwrap().load().unwrap();
        assert_eq!(loaded.instances.len(), 200);
        assert_eq!(loaded.resources.len(), 1);
        assert_eq!(loaded.revision, 1);
    }

    fn change(before: Option<Resource>, after: Option<Resource>) -> ResourceChange {
        let key = before.as_ref().or(after.as_ref()).unwrap().key();
        ResourceChange { key, before, after }
    }

    fn policy_with(name: &str, interval: &str) -> Resource {
        crate::registry::tests::policy(name, interval)
    }

    /// Revision 1 creates p (1s), 2 registers an instance, 3 configures p
    /// (2s) and creates q.
    fn commit_rollback_history(store: &dyn Store) {
        let p1 = policy_with("p", "1s");
        store
            .commit(&Commit {
                revision: 1,
                put_resources: vec![p1.clone()],
                resource_changes: vec![change(None, Some(p1.clone()))],
                record: record(1),
                ..Default::default()
            })
            .unwrap();
        store
            .commit(&Commit {
                revision: 2,
                put_instances: vec![instance("a", 1)],
                record: record(2),
                ..Default::default()
            })
            .unwrap();
        let p2 = policy_with("p", "2s");
        let q = policy_with("q", "1s");
        store
            .commit(&Commit {
                revision: 3,
                put_resources: vec![p2.clone(), q.clone()],
                resource_changes: vec![change(Some(p1), Some(p2)), change(None, Some(q))],
                record: record(3),
                ..Default::default()
            })
            .unwrap();
    }

    fn check_rollback_data(store: &dyn Store) {
        let Rewind::Changes(changes) = store.rewind(1).unwrap() else {
            panic!("revision 1 is retained");
        };
        assert_eq!(changes.len(), 1, "only revision 3 changed resources");
        assert_eq!(changes[0].0, 3);
        let loaded = store.load().unwrap();
        let current = loaded
            .resources
            .iter()
            .map(|r| (r.key(), r.clone()))
            .collect();
        let at_1 = crate::registry::rewind(&current, &changes);
        assert_eq!(
            at_1.into_values().collect::<Vec<_>>(),
            vec![policy_with("p", "1s")]
        );
        assert_eq!(store.rewind(3).unwrap(), Rewind::Changes(vec![]));
        assert_eq!(
            store.rewind(7).unwrap(),
            Rewind::NotRetained { oldest: Some(1) }
        );
        let stamp = &loaded.last_changes[&policy_with("q", "1s").key()];
        assert_eq!((stamp.revision, stamp.at_ms), (3, 30));
        assert_eq!(loaded.last_changes.len(), 2);
    }

    #[test]
    fn memory_store_keeps_rollback_data() {
        let store = MemoryStore::new();
        commit_rollback_history(&store);
        check_rollback_data(&store);
    }

    #[test]
    fn redb_rollback_data_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        commit_rollback_history(&RedbStore::open(dir.path()).unwrap());
        check_rollback_data(&RedbStore::open(dir.path()).unwrap());
    }

    #[test]
    fn failed_commit_records_no_rollback_data() {
        let store = MemoryStore::new();
        commit_rollback_history(&store);
        store.fail_commits(true);
        let p3 = policy_with("p", "3s");
        let failed = store.commit(&Commit {
            revision: 4,
            put_resources: vec![p3.clone()],
            resource_changes: vec![change(Some(policy_with("p", "2s")), Some(p3))],
            record: record(4),
            ..Default::default()
        });
        assert!(failed.is_err());
        store.fail_commits(false);
        check_rollback_data(&store);
    }

    #[test]
    fn rollback_data_is_trimmed_with_history() {
        let store = MemoryStore::new();
        for r in 1..=HISTORY_LIMIT + 2 {
            let p = policy_with("p", &format!("{r}ms"));
            store
                .commit(&Commit {
                    revision: r,
                    put_resources: vec![p.clone()],
                    resource_changes: vec![change(None, Some(p))],
                    record: record(r),
                    ..Default::default()
                })
                .unwrap();
        }
        assert_eq!(
            store.rewind(2).unwrap(),
            Rewind::NotRetained { oldest: Some(3) }
        );
        let Rewind::Changes(changes) = store.rewind(3).unwrap() else {
            panic!("the oldest record is retained");
        };
        assert_eq!(changes.len() as u64, HISTORY_LIMIT - 1);
    }

    #[test]
    fn store_from_before_change_records_cannot_roll_back_further() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(dir.path()).unwrap();
        commit_rollback_history(&store);
        // Simulate an old store: forget the marker, as a store created
        // before the change table would have none; reopening sets it to
        // the current revision.
        {
            let txn = store.db.begin_write().unwrap();
            txn.open_table(META).unwrap().remove(CHANGES_SINCE).unwrap();
            txn.commit().unwrap();
        }
        drop(store);
        let store = RedbStore::open(dir.path()).unwrap();
        assert_eq!(
            store.rewind(1).unwrap(),
            Rewind::NotRetained { oldest: Some(3) }
        );
        assert_eq!(store.rewind(3).unwrap(), Rewind::Changes(vec![]));
    }

    #[test]
    fn history_is_trimmed() {
        let store = MemoryStore::new();
        for r in 1..=HISTORY_LIMIT + 3 {
            store
                .commit(&Commit {
                    revision: r,
                    record: record(r),
                    ..Default::default()
                })
                .unwrap();
        }
        let all = store.history(usize::MAX).unwrap();
        assert_eq!(all.len() as u64, HISTORY_LIMIT);
        assert_eq!(all[0].revision, HISTORY_LIMIT + 3);
    }

    #[test]
    fn corrupt_file_is_an_open_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(RedbStore::FILE_NAME),
            b"not a database at all",
        )
        .unwrap();
        let err = RedbStore::open(dir.path()).err().unwrap();
        assert!(err.to_string().contains("cannot open the store"), "{err}");
    }
}
