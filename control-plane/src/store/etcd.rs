//! `--store etcd`: the durable store in an etcd cluster, shared by every
//! control-plane replica.
//!
//! Data layout under the prefix `P` (`--etcd-prefix`, default `/meshlet`;
//! several meshes can share one etcd under different prefixes):
//!
//! | key | value |
//! |---|---|
//! | `P/meta/epoch` | the store's epoch (decimal), created once with a create-if-absent txn |
//! | `P/meta/revision` | the current mesh revision (decimal): **the compare-and-swap key** |
//! | `P/rev/{revision:020}` | one [`RevisionEntry`] (JSON): the whole revision — its history record, the instances and resources it put or deleted, its rollback records, a new trust bundle; the last [`HISTORY_LIMIT`] are kept |
//! | `P/instances/{id}` | a [`StoredInstance`] (JSON), attached to an etcd lease with the TTL |
//! | `P/registered/{id}` | the same, without a lease: the registry as of `P/meta/revision` (see below) |
//! | `P/resources/{Kind/namespace/name}` | a resource (JSON) |
//! | `P/owners/{id}` | the name of the token that registered the instance |
//! | `P/tokens` | the token records (hashes only), JSON, replaced whole |
//! | `P/sessions/{sha256 hex of the id}` | a dashboard log-in [`StoredSession`] (JSON), attached to a lease of the session's TTL of its own |
//! | `P/bootstrap/{ca.crt,ca.key,admin.token}` | the mesh CA and the bootstrap admin token, created once by the first replica |
//! | `P/ca/state` | the workload roots (PEM certificates and keys, bundle order) and the rotation phase, written only by compare-and-swap on its mod revision ([`EtcdStore::swap_ca_state`]; see `rotation.rs`) |
//! | `P/election/ca-rotation/…` | the etcd v3election keys of the replicas campaigning to drive the rotation (each on its own lease) |
//!
//! **A revision is one etcd transaction**: `if P/meta/revision == N-1 then
//! put P/meta/revision = N, put P/rev/N, the puts and deletes, trim P/rev/(N-10000)
//! else get P/meta/revision`. Two replicas planning revision N at once:
//! etcd serialises the two transactions, the second one's compare fails and
//! nothing of it is written; [`EtcdStore::commit_plan`] then answers
//! [`StoreError::Conflict`] and the controller catches up and plans again
//! (or answers 409). An expiry adds one compare per instance: its key is
//! absent (the lease really ended and nobody registered it again).
//!
//! **How replicas learn revisions**: every replica watches the prefix from
//! the etcd revision it loaded at ([`EtcdStore::watch`]); the controller
//! applies each `P/rev/N` it has not applied yet to its in-memory registry
//! and publishes it to its own watching sidecars (see
//! `Controller::run_replication`).
//!
//! **Liveness**: each put of an instance grants a lease of the TTL
//! (rounded up to seconds) and attaches the key to it; a heartbeat on any
//! replica renews the lease ([`EtcdStore::keep_alive`], the lease id from
//! a cache the watch keeps, else read from the key). When the lease ends
//! etcd deletes the key and every replica's watch sees the delete.
//! `P/registered/{id}` is written and deleted in the same transactions as
//! `P/instances/{id}` but outlives the lease: a lease that ends while no
//! replica runs leaves no expiry revision behind, and a replica starting
//! then loads the instance from `registered/` (the revision's registry,
//! which the sidecars resuming at that revision hold) with its lease
//! absent ([`EtcdStore::absent_at_load`]); the lease sweep writes the
//! expiry revision after a grace of one TTL (time for the instances
//! still alive to heartbeat and register again), so every watcher is told.
//!
//! **Dashboard sessions** ([`SessionStore`], used by `access::sessions`):
//! a log-in grants a lease of the session TTL and puts the record on it,
//! counting the sessions in the same txn; beyond the cap the oldest (by
//! create revision) lose their lease. A cookie request is one
//! linearizable get, a log-out one delete (with the previous key, whose
//! lease is then revoked), so a log-out through any replica is seen by
//! the next request on every other.
//!
//! **Bridging the sync `Store` trait to async etcd**: the store owns a
//! small tokio runtime of its own (one worker thread, `meshlet-etcd`).
//! Every etcd call runs there; the sync trait methods hand the call over
//! and wait on a channel (they are called on the blocking pool, or once at
//! start-up), and the async methods the controller uses await the spawned
//! task. The caller's runtime never runs etcd's client tasks, so blocking
//! a caller never starves them. Each unary call has a deadline
//! ([`CALL_TIMEOUT`]), and the client requires a leader, so a cluster
//! without quorum answers an error quickly instead of hanging.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions,
    Identity, LeaseKeepAliveStream, LeaseKeeper, PutOptions, SortOrder, SortTarget, TlsOptions,
    Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use meshlet_api::mesh::RevisionRecord;
use meshlet_api::{Resource, ResourceKey};
use serde::{Deserialize, Serialize};

use super::{
    last_changes, resource_key, AccessRecords, Commit, Loaded, OwnerChanges, ResourceChange,
    Rewind, SessionFuture, SessionStore, Store, StoredInstance, StoredSession, HISTORY_LIMIT,
};
use crate::auth::{Owners, TokenHash, TokenRecord};
use crate::error::StoreError;

/// The rotation state's key under the prefix (see `rotation.rs`).
pub const CA_STATE_KEY: &str = "ca/state";

/// The deadline of one etcd request (a txn, a get, a lease call).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// How long a heartbeat waits for the answer on a reused keep-alive
/// stream before it drops the stream (a member gone silently) and opens a
/// new one within the rest of [`CALL_TIMEOUT`].
const REUSED_STREAM_PATIENCE: Duration = Duration::from_secs(1);

/// One lease's keep-alive stream (etcd-client's keeper renews the one
/// lease id it was opened for); `None` until opened or after it broke.
type KeepAliveSlot = Arc<tokio::sync::Mutex<Option<(LeaseKeeper, LeaseKeepAliveStream)>>>;

/// Operations per etcd transaction at most when a batch can be split
/// (owner changes); etcd's `--max-txn-ops` defaults to 128.
const TXN_CHUNK: usize = 100;

/// How to reach etcd (`--etcd-*` flags).
#[derive(Debug, Clone, Default)]
pub struct EtcdSettings {
    pub endpoints: Vec<String>,
    /// Key prefix, e.g. `/meshlet` (a trailing `/` is ignored).
    pub prefix: String,
    /// CA bundle that signed etcd's server certificates (https endpoints).
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key for etcd's `--client-cert-auth`.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// etcd user and password (`--auth`).
    pub user: Option<String>,
    pub password: Option<String>,
    /// The instances' TTL: each registration's lease.
    pub ttl: Duration,
    /// This replica's name (`x-meshlet-replica`, logs, metrics).
    pub replica_id: String,
}

/// One revision as stored at `P/rev/N` (everything another replica needs
/// to apply it, and the history and rollback records).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RevisionEntry {
    pub record: RevisionRecord,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub put_instances: Vec<StoredInstance>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub delete_instances: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub put_resources: Vec<Resource>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub delete_resources: Vec<ResourceKey>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resource_changes: Vec<ResourceChange>,
    /// The new trust bundle, when the revision changes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust_roots: Option<String>,
}

impl RevisionEntry {
    fn of(commit: &Commit, trust_roots: Option<String>) -> RevisionEntry {
        RevisionEntry {
            record: commit.record.clone(),
            put_instances: commit.put_instances.clone(),
            delete_instances: commit.delete_instances.clone(),
            put_resources: commit.put_resources.clone(),
            delete_resources: commit.delete_resources.clone(),
            resource_changes: commit.resource_changes.clone(),
            trust_roots,
        }
    }

    /// The revision as a [`Commit`] (and its trust bundle).
    pub fn into_commit(self) -> (Commit, Option<String>) {
        let commit = Commit {
            revision: self.record.revision,
            put_instances: self.put_instances,
            delete_instances: self.delete_instances,
            put_resources: self.put_resources,
            delete_resources: self.delete_resources,
            resource_changes: self.resource_changes,
            record: self.record,
        };
        (commit, self.trust_roots)
    }
}

/// What the bootstrap keys hold (`P/bootstrap/*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bootstrap {
    pub ca_cert: String,
    pub ca_key: String,
    pub admin_token: String,
}

/// One change under the prefix, as the watch delivers it.
#[derive(Debug, Clone)]
pub enum WatchedKey {
    Revision(Box<RevisionEntry>),
    InstancePut {
        id: String,
        lease: i64,
    },
    InstanceDeleted {
        id: String,
    },
    OwnerPut {
        id: String,
        holder: String,
    },
    OwnerDeleted {
        id: String,
    },
    Tokens(Vec<TokenRecord>),
    /// `P/ca/state` was put: the rotation state (JSON, decoded by the
    /// workload CA) and the key's mod revision (the next CAS expects it).
    CaState {
        value: Vec<u8>,
        mod_revision: i64,
    },
}

/// `P/ca/state` as read: its value and mod revision (0: absent).
#[derive(Debug, Clone, Default)]
pub struct CaStateValue {
    pub value: Option<Vec<u8>>,
    pub mod_revision: i64,
}

/// The events of one etcd watch response (never split across responses).
#[derive(Debug, Clone)]
pub struct WatchBatch {
    /// The etcd revision of the response (resume after it).
    pub etcd_revision: i64,
    pub keys: Vec<WatchedKey>,
}

/// etcd's health as this replica sees it (`/healthz?detail`, `/metrics`).
#[derive(Debug, Default)]
pub struct StoreHealth {
    up: AtomicBool,
    errors: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl StoreHealth {
    pub fn up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().unwrap().clone()
    }
    fn ok(&self) {
        self.up.store(true, Ordering::Relaxed);
    }
    fn failed(&self, error: &StoreError) {
        self.up.store(false, Ordering::Relaxed);
        self.errors.fetch_add(1, Ordering::Relaxed);
        *self.last_error.lock().unwrap() = Some(error.to_string());
    }
}

pub struct EtcdStore {
    /// The runtime every etcd call runs on; taken on drop (it must not be
    /// dropped inside the caller's runtime).
    runtime: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
    client: Client,
    prefix: String,
    ttl_secs: i64,
    replica_id: String,
    endpoints: Vec<String>,
    /// The etcd revision `load` read at: the watch starts after it.
    loaded_at: AtomicI64,
    /// Instance id → its lease (from commits, loads and the watch).
    leases: Mutex<HashMap<String, i64>>,
    /// The instances `load` found under `registered/` without a live key
    /// under `instances/` (their lease ended while no replica ran).
    absent_at_load: Mutex<Vec<String>>,
    /// Lease → its open keep-alive stream, reused by every heartbeat of
    /// the instance on this replica (see [`EtcdStore::keep_alive`]);
    /// dropped when the instance's lease changes or ends.
    keepers: Arc<Mutex<HashMap<i64, KeepAliveSlot>>>,
    health: StoreHealth,
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

fn etcd_error(doing: impl Into<String>) -> impl FnOnce(etcd_client::Error) -> StoreError {
    let doing = doing.into();
    move |source| StoreError::Etcd { doing, source }
}

fn decode_etcd<T: for<'de> Deserialize<'de>>(
    what: &'static str,
    key: &[u8],
    bytes: &[u8],
) -> Result<T, StoreError> {
    super::decode(what, String::from_utf8_lossy(key).into_owned(), bytes)
}

fn parse_u64(key: &[u8], bytes: &[u8]) -> Result<u64, StoreError> {
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            StoreError::Corrupt(format!("{} is not a number", String::from_utf8_lossy(key)))
        })
}

impl EtcdStore {
    /// Connects to etcd (checking it answers) and makes sure the store has
    /// an epoch (create-if-absent: the first replica's wins).
    pub fn open(settings: &EtcdSettings) -> Result<EtcdStore, StoreError> {
        if settings.endpoints.is_empty() {
            return Err(StoreError::Config(
                "--store etcd needs --etcd-endpoints URL,...".into(),
            ));
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("meshlet-etcd")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Config(format!("cannot start the etcd runtime: {e}")))?;
        let handle = runtime.handle().clone();
        let mut options = ConnectOptions::new()
            .with_connect_timeout(CALL_TIMEOUT)
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
            .with_require_leader(true);
        if let (Some(user), Some(password)) = (&settings.user, &settings.password) {
            options = options.with_user(user.clone(), password.clone());
        }
        if settings.ca_file.is_some() || settings.cert_file.is_some() {
            let mut tls = TlsOptions::new();
            if let Some(path) = &settings.ca_file {
                let pem = read_file(path)?;
                tls = tls.ca_certificate(Certificate::from_pem(pem));
            }
            match (&settings.cert_file, &settings.key_file) {
                (Some(cert), Some(key)) => {
                    tls = tls.identity(Identity::from_pem(read_file(cert)?, read_file(key)?));
                }
                (None, None) => {}
                _ => {
                    return Err(StoreError::Config(
                        "--etcd-cert-file and --etcd-key-file go together".into(),
                    ))
                }
            }
            options = options.with_tls(tls);
        }
        let endpoints = settings.endpoints.clone();
        let connect_endpoints = endpoints.clone();
        let client = block_on(&handle, async move {
            tokio::time::timeout(
                CALL_TIMEOUT,
                Client::connect(connect_endpoints, Some(options)),
            )
            .await
            .map_err(|_| StoreError::EtcdTimeout {
                doing: "connect".into(),
                after: CALL_TIMEOUT,
            })?
            .map_err(etcd_error("connect"))
        })??;
        let store = EtcdStore {
            runtime: Some(runtime),
            handle,
            client,
            prefix: settings.prefix.trim_end_matches('/').to_owned(),
            ttl_secs: settings.ttl.as_secs_f64().ceil().max(1.0) as i64,
            replica_id: settings.replica_id.clone(),
            endpoints,
            loaded_at: AtomicI64::new(0),
            leases: Mutex::new(HashMap::new()),
            absent_at_load: Mutex::new(Vec::new()),
            keepers: Arc::default(),
            health: StoreHealth::default(),
        };
        let epoch_key = store.key("meta/epoch");
        let mut client = store.client.clone();
        store.block(async move {
            let txn = Txn::new()
                .when([Compare::version(epoch_key.clone(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(epoch_key, super::new_epoch().to_string(), None)]);
            client
                .txn(txn)
                .await
                .map_err(etcd_error("create the store epoch"))
        })?;
        Ok(store)
    }

    pub fn replica_id(&self) -> &str {
        &self.replica_id
    }

    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn health(&self) -> &StoreHealth {
        &self.health
    }

    /// A handle on the etcd client (replica discovery, `peers::registry`,
    /// uses it for its own keys under the prefix).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// The etcd revision the last `load` read at.
    pub fn loaded_at(&self) -> i64 {
        self.loaded_at.load(Ordering::Relaxed)
    }

    fn key(&self, rest: &str) -> String {
        format!("{}/{rest}", self.prefix)
    }

    fn rev_key(&self, revision: u64) -> String {
        format!("{}/rev/{revision:020}", self.prefix)
    }

    fn instance_key(&self, id: &str) -> String {
        format!("{}/instances/{id}", self.prefix)
    }

    fn registered_key(&self, id: &str) -> String {
        format!("{}/registered/{id}", self.prefix)
    }

    /// The instances the last `load` found registered (as of its revision)
    /// whose lease had ended without an expiry revision.
    pub fn absent_at_load(&self) -> Vec<String> {
        self.absent_at_load.lock().unwrap().clone()
    }

    fn owner_key(&self, id: &str) -> String {
        format!("{}/owners/{id}", self.prefix)
    }

    fn session_key(&self, id: &TokenHash) -> String {
        format!("{}/sessions/{}", self.prefix, id.to_hex())
    }

    /// Runs `f` on the store's runtime with the call deadline, recording
    /// etcd's health.
    fn spawn<T: Send + 'static>(
        &self,
        doing: &'static str,
        f: impl Future<Output = Result<T, StoreError>> + Send + 'static,
    ) -> impl Future<Output = Result<T, StoreError>> + Send + 'static {
        let task = self.handle.spawn(async move {
            match tokio::time::timeout(CALL_TIMEOUT, f).await {
                Ok(result) => result,
                Err(_) => Err(StoreError::EtcdTimeout {
                    doing: doing.into(),
                    after: CALL_TIMEOUT,
                }),
            }
        });
        async move {
            task.await
                .map_err(|e| StoreError::Task(e.to_string()))
                .and_then(|r| r)
        }
    }

    /// [`EtcdStore::spawn`] for the sync trait: waits on this thread.
    fn block<T: Send + 'static>(
        &self,
        f: impl Future<Output = Result<T, StoreError>> + Send + 'static,
    ) -> Result<T, StoreError> {
        let result = block_on(&self.handle, self.spawn("call etcd", f))?;
        self.record(&result);
        result
    }

    fn record<T>(&self, result: &Result<T, StoreError>) {
        match result {
            Ok(_) => self.health.ok(),
            Err(StoreError::Conflict { .. }) => self.health.ok(),
            Err(e) => self.health.failed(e),
        }
    }

    /// Async entry points record health too.
    async fn run<T: Send + 'static>(
        &self,
        doing: &'static str,
        f: impl Future<Output = Result<T, StoreError>> + Send + 'static,
    ) -> Result<T, StoreError> {
        let result = self.spawn(doing, f).await;
        self.record(&result);
        result
    }

    /// Commits one revision with compare-and-swap on `P/meta/revision`
    /// (see the module docs); `absent`: instance ids whose keys must not
    /// exist (an expiry). Grants a lease per instance it puts.
    pub async fn commit_plan(
        &self,
        commit: &Commit,
        trust_roots: Option<String>,
        absent: &[String],
    ) -> Result<(), StoreError> {
        let txn = self.commit_txn(commit, trust_roots, absent)?;
        let granted = self
            .run("commit a revision", txn)
            .await
            .map_err(|err| match err {
                StoreError::EtcdTimeout { after, .. } => StoreError::EtcdUnconfirmed {
                    revision: commit.revision,
                    after,
                },
                err => err,
            })?;
        self.note_granted(commit, granted);
        Ok(())
    }

    fn note_granted(&self, commit: &Commit, granted: Vec<(String, i64)>) {
        let mut replaced = Vec::new();
        let mut leases = self.leases.lock().unwrap();
        for id in &commit.delete_instances {
            replaced.extend(leases.remove(id));
        }
        for (id, lease) in granted {
            replaced.extend(leases.insert(id, lease));
        }
        drop(leases);
        self.forget_keepers(replaced);
    }

    /// Closes the keep-alive streams of leases no instance uses any more.
    fn forget_keepers(&self, leases: impl IntoIterator<Item = i64>) {
        let mut open: Vec<i64> = {
            let keepers = self.keepers.lock().unwrap();
            leases
                .into_iter()
                .filter(|l| keepers.contains_key(l))
                .collect()
        };
        if open.is_empty() {
            return;
        }
        // A lease another instance still uses keeps its stream.
        let leases = self.leases.lock().unwrap();
        open.retain(|l| !leases.values().any(|v| v == l));
        drop(leases);
        let mut keepers = self.keepers.lock().unwrap();
        for lease in open {
            keepers.remove(&lease);
        }
    }

    /// The etcd work of one revision (leases, then the txn), owning
    /// everything it needs; answers the leases it granted.
    fn commit_txn(
        &self,
        commit: &Commit,
        trust_roots: Option<String>,
        absent: &[String],
    ) -> Result<
        impl Future<Output = Result<Vec<(String, i64)>, StoreError>> + Send + 'static,
        StoreError,
    > {
        let entry = super::encode("revision", &RevisionEntry::of(commit, trust_roots))?;
        let rev_key = self.key("meta/revision");
        let expected = commit.revision.saturating_sub(1);
        let mut compares = vec![if expected == 0 {
            Compare::version(rev_key.clone(), CompareOp::Equal, 0)
        } else {
            Compare::value(rev_key.clone(), CompareOp::Equal, expected.to_string())
        }];
        for id in absent {
            compares.push(Compare::version(self.instance_key(id), CompareOp::Equal, 0));
        }
        let mut ops = vec![
            TxnOp::put(rev_key.clone(), commit.revision.to_string(), None),
            TxnOp::put(self.rev_key(commit.revision), entry, None),
        ];
        if commit.revision > HISTORY_LIMIT {
            ops.push(TxnOp::delete(
                self.rev_key(commit.revision - HISTORY_LIMIT),
                None,
            ));
        }
        for id in &commit.delete_instances {
            ops.push(TxnOp::delete(self.instance_key(id), None));
            ops.push(TxnOp::delete(self.registered_key(id), None));
        }
        let mut instance_puts = Vec::new();
        for instance in &commit.put_instances {
            let bytes = super::encode("instance", instance)?;
            let id = &instance.registration.id;
            ops.push(TxnOp::put(self.registered_key(id), bytes.clone(), None));
            instance_puts.push((id.clone(), bytes));
        }
        for key in &commit.delete_resources {
            ops.push(TxnOp::delete(
                self.key(&format!("resources/{}", resource_key(key))),
                None,
            ));
        }
        for resource in &commit.put_resources {
            let key = self.key(&format!("resources/{}", resource_key(&resource.key())));
            ops.push(TxnOp::put(key, super::encode("resource", resource)?, None));
        }
        let revision = commit.revision;
        let prefix = self.prefix.clone();
        let ttl = self.ttl_secs;
        let mut client = self.client.clone();
        Ok(async move {
            let mut granted = Vec::new();
            for (id, bytes) in instance_puts {
                let lease = client
                    .lease_grant(ttl, None)
                    .await
                    .map_err(etcd_error("grant an instance lease"))?
                    .id();
                let key = format!("{prefix}/instances/{id}");
                ops.push(TxnOp::put(
                    key,
                    bytes,
                    Some(PutOptions::new().with_lease(lease)),
                ));
                granted.push((id, lease));
            }
            let txn = Txn::new()
                .when(compares)
                .and_then(ops)
                .or_else([TxnOp::get(rev_key.clone(), None)]);
            let response = client.txn(txn).await.map_err(|source| StoreError::Etcd {
                doing: format!("commit revision {revision}"),
                source,
            })?;
            if response.succeeded() {
                return Ok(granted);
            }
            let mut current = 0;
            for op in response.op_responses() {
                if let TxnOpResponse::Get(get) = op {
                    if let Some(kv) = get.kvs().first() {
                        current = parse_u64(kv.key(), kv.value())?;
                    }
                }
            }
            Err(StoreError::Conflict { revision, current })
        })
    }

    /// The revisions after `revision`, oldest first (a replica catching up).
    pub async fn entries_after(&self, revision: u64) -> Result<Vec<RevisionEntry>, StoreError> {
        let from = self.rev_key(revision + 1);
        let end = self.key("rev0");
        let mut client = self.client.clone();
        self.run("read revisions", async move {
            let response = client
                .get(from, Some(GetOptions::new().with_range(end)))
                .await
                .map_err(etcd_error("read revisions"))?;
            response
                .kvs()
                .iter()
                .map(|kv| decode_etcd("revision", kv.key(), kv.value()))
                .collect()
        })
        .await
    }

    /// Renews instance `id`'s lease: `false` when it has none any more
    /// (expired, or never registered through etcd).
    ///
    /// etcd renews leases only over a `LeaseKeepAlive` stream, and
    /// etcd-client's keeper sends one lease id per stream; so each lease
    /// heartbeating through this replica keeps one stream open, and each
    /// heartbeat is one request and one answer on it (no stream set-up per
    /// heartbeat). A stream that breaks or stays silent for
    /// [`REUSED_STREAM_PATIENCE`] is dropped and a new one opened.
    pub async fn keep_alive(&self, id: &str) -> Result<bool, StoreError> {
        let cached = self.leases.lock().unwrap().get(id).copied();
        let key = self.instance_key(id);
        let mut client = self.client.clone();
        let keepers = self.keepers.clone();
        let alive = self
            .run("renew an instance lease", async move {
                let lease = match cached {
                    Some(lease) => lease,
                    None => {
                        let response = client
                            .get(key, None)
                            .await
                            .map_err(etcd_error("read an instance"))?;
                        match response.kvs().first() {
                            Some(kv) if kv.lease() != 0 => kv.lease(),
                            _ => return Ok((false, 0)),
                        }
                    }
                };
                let slot = keepers.lock().unwrap().entry(lease).or_default().clone();
                let mut open = slot.lock().await;
                if let Some((keeper, stream)) = open.as_mut() {
                    let renewed = tokio::time::timeout(REUSED_STREAM_PATIENCE, async {
                        keeper.keep_alive().await?;
                        stream.message().await
                    })
                    .await;
                    match renewed {
                        Ok(Ok(Some(reply))) => return Ok((reply.ttl() > 0, lease)),
                        // Broken, ended or silent: open a new stream.
                        _ => *open = None,
                    }
                }
                // `lease_keep_alive` opens the stream, sends one request
                // and reads its answer itself (a TTL of 0, "lease not
                // found", is an error there).
                match client.lease_keep_alive(lease).await {
                    Ok(pair) => {
                        *open = Some(pair);
                        Ok((true, lease))
                    }
                    Err(etcd_client::Error::LeaseKeepAliveError(_)) => Ok((false, lease)),
                    Err(err) => Err(etcd_error("renew an instance lease")(err)),
                }
            })
            .await?;
        let mut leases = self.leases.lock().unwrap();
        if alive.0 {
            leases.insert(id.to_owned(), alive.1);
        } else {
            leases.remove(id);
            drop(leases);
            // The lease ended: its stream goes.
            self.keepers.lock().unwrap().remove(&alive.1);
        }
        Ok(alive.0)
    }

    /// Which of `ids` have no key under `P/instances/` (their lease ended).
    pub async fn absent_instances(&self, ids: Vec<String>) -> Result<Vec<String>, StoreError> {
        let prefix = self.key("instances/");
        let mut client = self.client.clone();
        self.run("list instances", async move {
            let response = client
                .get(
                    prefix.clone(),
                    Some(GetOptions::new().with_prefix().with_keys_only()),
                )
                .await
                .map_err(etcd_error("list instances"))?;
            let present: std::collections::HashSet<&[u8]> = response
                .kvs()
                .iter()
                .map(|kv| &kv.key()[prefix.len()..])
                .collect();
            Ok(ids
                .into_iter()
                .filter(|id| !present.contains(id.as_bytes()))
                .collect())
        })
        .await
    }

    /// A cheap linearizable read (needs a quorum): etcd's health.
    pub async fn probe(&self) -> Result<(), StoreError> {
        let key = self.key("meta/revision");
        let mut client = self.client.clone();
        self.run("check etcd", async move {
            client
                .get(key, None)
                .await
                .map(|_| ())
                .map_err(etcd_error("check etcd"))
        })
        .await
    }

    /// Reads `P/ca/state` (linearizable).
    pub async fn ca_state(&self) -> Result<CaStateValue, StoreError> {
        let key = self.key(CA_STATE_KEY);
        let mut client = self.client.clone();
        self.run("read the CA rotation state", async move {
            let response = client
                .get(key, None)
                .await
                .map_err(etcd_error("read the CA rotation state"))?;
            Ok(match response.kvs().first() {
                Some(kv) => CaStateValue {
                    value: Some(kv.value().to_vec()),
                    mod_revision: kv.mod_revision(),
                },
                None => CaStateValue::default(),
            })
        })
        .await
    }

    /// Puts `P/ca/state` if its mod revision is still `expected` (0: the
    /// key is absent): one txn, so a stale replica writes nothing. Answers
    /// the new mod revision, or `None` when another replica changed the
    /// state first.
    pub async fn swap_ca_state(
        &self,
        expected: i64,
        value: Vec<u8>,
    ) -> Result<Option<i64>, StoreError> {
        let key = self.key(CA_STATE_KEY);
        let mut client = self.client.clone();
        self.run("write the CA rotation state", async move {
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    key.clone(),
                    CompareOp::Equal,
                    expected,
                )])
                .and_then([TxnOp::put(key, value, None)]);
            let response = client
                .txn(txn)
                .await
                .map_err(etcd_error("write the CA rotation state"))?;
            Ok(response
                .succeeded()
                .then(|| response.header().map(|h| h.revision()).unwrap_or(0)))
        })
        .await
    }

    /// The bootstrap material, if a replica stored it.
    pub fn bootstrap(&self) -> Result<Option<Bootstrap>, StoreError> {
        let prefix = self.key("bootstrap/");
        let mut client = self.client.clone();
        self.block(async move {
            let response = client
                .get(prefix.clone(), Some(GetOptions::new().with_prefix()))
                .await
                .map_err(etcd_error("read the bootstrap keys"))?;
            let mut found = BTreeMap::new();
            for kv in response.kvs() {
                let name = String::from_utf8_lossy(&kv.key()[prefix.len()..]).into_owned();
                found.insert(name, String::from_utf8_lossy(kv.value()).into_owned());
            }
            Ok(
                match (
                    found.remove("ca.crt"),
                    found.remove("ca.key"),
                    found.remove("admin.token"),
                ) {
                    (Some(ca_cert), Some(ca_key), Some(admin_token)) => Some(Bootstrap {
                        ca_cert,
                        ca_key,
                        admin_token,
                    }),
                    _ => None,
                },
            )
        })
    }

    /// Stores the bootstrap material unless a replica already did;
    /// `true` when this one's was stored.
    pub fn create_bootstrap(&self, bootstrap: &Bootstrap) -> Result<bool, StoreError> {
        let (cert, key, token) = (
            self.key("bootstrap/ca.crt"),
            self.key("bootstrap/ca.key"),
            self.key("bootstrap/admin.token"),
        );
        let b = bootstrap.clone();
        let mut client = self.client.clone();
        self.block(async move {
            let txn = Txn::new()
                .when([Compare::version(key.clone(), CompareOp::Equal, 0)])
                .and_then([
                    TxnOp::put(cert, b.ca_cert, None),
                    TxnOp::put(key, b.ca_key, None),
                    TxnOp::put(token, b.admin_token, None),
                ]);
            let response = client
                .txn(txn)
                .await
                .map_err(etcd_error("store the bootstrap keys"))?;
            Ok(response.succeeded())
        })
    }

    /// Watches the prefix from etcd revision `from` (0: now): batches of
    /// decoded changes until the stream ends or fails (then the channel
    /// closes and the caller watches again).
    pub async fn watch(
        &self,
        from: i64,
    ) -> Result<tokio::sync::mpsc::Receiver<WatchBatch>, StoreError> {
        let prefix = format!("{}/", self.prefix);
        let mut client = self.client.clone();
        let mut options = WatchOptions::new().with_prefix();
        if from > 0 {
            options = options.with_start_revision(from);
        }
        let watch_prefix = prefix.clone();
        let mut stream = self
            .run("watch the prefix", async move {
                client
                    .watch(watch_prefix, Some(options))
                    .await
                    .map_err(etcd_error("watch the prefix"))
            })
            .await?;
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        self.handle.spawn(async move {
            loop {
                let response = match stream.message().await {
                    Ok(Some(response)) => response,
                    Ok(None) => return,
                    Err(err) => {
                        tracing::warn!(error = %err, "etcd watch ended; watching again");
                        return;
                    }
                };
                if response.canceled() || response.compact_revision() > 0 {
                    tracing::warn!(
                        compacted = response.compact_revision(),
                        "etcd watch cancelled; watching again"
                    );
                    return;
                }
                let etcd_revision = response.header().map(|h| h.revision()).unwrap_or(0);
                let mut keys = Vec::new();
                for event in response.events() {
                    let Some(kv) = event.kv() else { continue };
                    let rest =
                        String::from_utf8_lossy(&kv.key()[prefix.len().min(kv.key().len())..])
                            .into_owned();
                    let put = event.event_type() == EventType::Put;
                    let decoded = if let Some(id) = rest.strip_prefix("instances/") {
                        Some(if put {
                            WatchedKey::InstancePut {
                                id: id.to_owned(),
                                lease: kv.lease(),
                            }
                        } else {
                            WatchedKey::InstanceDeleted { id: id.to_owned() }
                        })
                    } else if let Some(id) = rest.strip_prefix("owners/") {
                        Some(if put {
                            WatchedKey::OwnerPut {
                                id: id.to_owned(),
                                holder: String::from_utf8_lossy(kv.value()).into_owned(),
                            }
                        } else {
                            WatchedKey::OwnerDeleted { id: id.to_owned() }
                        })
                    } else if rest.starts_with("rev/") && put {
                        match decode_etcd("revision", kv.key(), kv.value()) {
                            Ok(entry) => Some(WatchedKey::Revision(Box::new(entry))),
                            Err(err) => {
                                tracing::error!(error = %err, "unreadable revision in etcd");
                                None
                            }
                        }
                    } else if rest == CA_STATE_KEY && put {
                        Some(WatchedKey::CaState {
                            value: kv.value().to_vec(),
                            mod_revision: kv.mod_revision(),
                        })
                    } else if rest == "tokens" && put {
                        match decode_etcd("tokens", kv.key(), kv.value()) {
                            Ok(tokens) => Some(WatchedKey::Tokens(tokens)),
                            Err(err) => {
                                tracing::error!(error = %err, "unreadable tokens in etcd");
                                None
                            }
                        }
                    } else {
                        None
                    };
                    keys.extend(decoded);
                }
                if tx
                    .send(WatchBatch {
                        etcd_revision,
                        keys,
                    })
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
        Ok(rx)
    }

    /// Remembers an instance's lease (from the watch).
    pub fn note_lease(&self, id: &str, lease: Option<i64>) {
        let mut leases = self.leases.lock().unwrap();
        let replaced = match lease {
            Some(lease) if lease != 0 => leases.insert(id.to_owned(), lease),
            _ => leases.remove(id),
        };
        drop(leases);
        self.forget_keepers(replaced);
    }

    fn get_prefix_op(&self, rest: &str) -> TxnOp {
        TxnOp::get(self.key(rest), Some(GetOptions::new().with_prefix()))
    }
}

fn read_file(path: &PathBuf) -> Result<Vec<u8>, StoreError> {
    std::fs::read(path)
        .map_err(|e| StoreError::Config(format!("cannot read {}: {e}", path.display())))
}

/// Waits on this thread for `f`, which runs on `handle`'s runtime (works
/// inside and outside a runtime: the wait is a plain channel).
fn block_on<T: Send + 'static>(
    handle: &tokio::runtime::Handle,
    f: impl Future<Output = T> + Send + 'static,
) -> Result<T, StoreError> {
    let (tx, rx) = std::sync::mpsc::channel();
    handle.spawn(async move {
        let _ = tx.send(f.await);
    });
    rx.recv()
        .map_err(|_| StoreError::Task("the etcd runtime stopped".into()))
}

fn gets(op: &TxnOpResponse) -> &[etcd_client::KeyValue] {
    match op {
        TxnOpResponse::Get(get) => get.kvs(),
        _ => &[],
    }
}

impl Store for EtcdStore {
    fn load(&self) -> Result<Loaded, StoreError> {
        let ops = vec![
            TxnOp::get(self.key("meta/epoch"), None),
            TxnOp::get(self.key("meta/revision"), None),
            self.get_prefix_op("instances/"),
            self.get_prefix_op("resources/"),
            self.get_prefix_op("rev/"),
            self.get_prefix_op("registered/"),
        ];
        let mut client = self.client.clone();
        let response = self.block(async move {
            client
                .txn(Txn::new().and_then(ops))
                .await
                .map_err(etcd_error("load the store"))
        })?;
        let ops = response.op_responses();
        let number = |i: usize| -> Result<u64, StoreError> {
            match gets(&ops[i]).first() {
                Some(kv) => parse_u64(kv.key(), kv.value()),
                None => Ok(0),
            }
        };
        let epoch = number(0)?;
        let revision = number(1)?;
        let mut instances = Vec::new();
        let mut leases = HashMap::new();
        for kv in gets(&ops[2]) {
            let instance: StoredInstance = decode_etcd("instance", kv.key(), kv.value())?;
            leases.insert(instance.registration.id.clone(), kv.lease());
            instances.push(instance);
        }
        // Registered as of the revision, lease ended since: loaded, so
        // that the expiry becomes a revision every watcher hears of.
        let mut absent = Vec::new();
        for kv in gets(&ops[5]) {
            let instance: StoredInstance = decode_etcd("instance", kv.key(), kv.value())?;
            if !leases.contains_key(&instance.registration.id) {
                absent.push(instance.registration.id.clone());
                instances.push(instance);
            }
        }
        *self.absent_at_load.lock().unwrap() = absent;
        let mut resources = Vec::new();
        for kv in gets(&ops[3]) {
            resources.push(decode_etcd::<Resource>("resource", kv.key(), kv.value())?);
        }
        let mut entries = Vec::new();
        for kv in gets(&ops[4]) {
            entries.push(decode_etcd::<RevisionEntry>(
                "revision",
                kv.key(),
                kv.value(),
            )?);
        }
        let records: HashMap<u64, RevisionRecord> = entries
            .iter()
            .map(|e| (e.record.revision, e.record.clone()))
            .collect();
        let newest_first = entries
            .iter()
            .rev()
            .map(|e| (e.record.revision, e.resource_changes.clone()));
        let last_changes = last_changes(&resources, newest_first, |r| {
            records.get(&r).map(meshlet_api::changes::ChangeStamp::of)
        });
        *self.leases.lock().unwrap() = leases;
        // Streams of leases the store no longer holds close.
        let open: Vec<i64> = self.keepers.lock().unwrap().keys().copied().collect();
        self.forget_keepers(open);
        let at = response.header().map(|h| h.revision()).unwrap_or(0);
        self.loaded_at.store(at, Ordering::Relaxed);
        Ok(Loaded {
            epoch,
            revision,
            instances,
            resources,
            last_changes,
        })
    }

    fn commit(&self, commit: &Commit) -> Result<(), StoreError> {
        let txn = self.commit_txn(commit, None, &[])?;
        let granted = self.block(txn)?;
        self.note_granted(commit, granted);
        Ok(())
    }

    fn history(&self, limit: usize) -> Result<Vec<RevisionRecord>, StoreError> {
        let prefix = self.key("rev/");
        let limit = limit.min(HISTORY_LIMIT as usize) as i64;
        let mut client = self.client.clone();
        self.block(async move {
            let options = GetOptions::new()
                .with_prefix()
                .with_sort(SortTarget::Key, SortOrder::Descend)
                .with_limit(limit);
            let response = client
                .get(prefix, Some(options))
                .await
                .map_err(etcd_error("read the history"))?;
            response
                .kvs()
                .iter()
                .map(|kv| {
                    decode_etcd::<RevisionEntry>("revision", kv.key(), kv.value()).map(|e| e.record)
                })
                .collect()
        })
    }

    fn rewind(&self, revision: u64) -> Result<Rewind, StoreError> {
        let target = self.rev_key(revision);
        let prefix = self.key("rev/");
        let mut client = self.client.clone();
        let (exists, oldest, after) = self.block(async move {
            let ops = vec![
                TxnOp::get(target.clone(), Some(GetOptions::new().with_keys_only())),
                TxnOp::get(
                    prefix.clone(),
                    Some(
                        GetOptions::new()
                            .with_prefix()
                            .with_keys_only()
                            .with_limit(1),
                    ),
                ),
                TxnOp::get(target, Some(GetOptions::new().with_from_key())),
            ];
            let response = client
                .txn(Txn::new().and_then(ops))
                .await
                .map_err(etcd_error("read rollback records"))?;
            let ops = response.op_responses();
            let exists = !gets(&ops[0]).is_empty();
            let oldest = gets(&ops[1]).first().and_then(|kv| {
                std::str::from_utf8(&kv.key()[prefix.len()..])
                    .ok()?
                    .parse()
                    .ok()
            });
            let mut after = Vec::new();
            for kv in gets(&ops[2]) {
                if !kv.key().starts_with(prefix.as_bytes()) {
                    continue;
                }
                after.push(decode_etcd::<RevisionEntry>(
                    "revision",
                    kv.key(),
                    kv.value(),
                )?);
            }
            Ok((exists, oldest, after))
        })?;
        if !exists {
            return Ok(Rewind::NotRetained { oldest });
        }
        Ok(Rewind::Changes(
            after
                .into_iter()
                .filter(|e| e.record.revision > revision && !e.resource_changes.is_empty())
                .map(|e| (e.record.revision, e.resource_changes))
                .collect(),
        ))
    }

    fn load_access(&self) -> Result<AccessRecords, StoreError> {
        let ops = vec![
            TxnOp::get(self.key("tokens"), None),
            self.get_prefix_op("owners/"),
        ];
        let owners_prefix = self.key("owners/");
        let mut client = self.client.clone();
        let response = self.block(async move {
            client
                .txn(Txn::new().and_then(ops))
                .await
                .map_err(etcd_error("load the tokens"))
        })?;
        let ops = response.op_responses();
        let tokens = match gets(&ops[0]).first() {
            Some(kv) => decode_etcd("tokens", kv.key(), kv.value())?,
            None => Vec::new(),
        };
        let mut owners = Owners::new();
        for kv in gets(&ops[1]) {
            let id = String::from_utf8_lossy(&kv.key()[owners_prefix.len()..]).into_owned();
            owners.record(id, String::from_utf8_lossy(kv.value()).into_owned());
        }
        Ok(AccessRecords { tokens, owners })
    }

    fn save_tokens(&self, tokens: &[TokenRecord]) -> Result<(), StoreError> {
        let bytes = super::encode("tokens", &tokens)?;
        let key = self.key("tokens");
        let mut client = self.client.clone();
        self.block(async move {
            client
                .put(key, bytes, None)
                .await
                .map(|_| ())
                .map_err(etcd_error("save the tokens"))
        })
    }

    fn save_owner_changes(&self, changes: &OwnerChanges) -> Result<(), StoreError> {
        let mut ops = Vec::new();
        for id in &changes.released {
            ops.push(TxnOp::delete(self.owner_key(id), None));
        }
        for (id, holder) in &changes.claimed {
            ops.push(TxnOp::put(self.owner_key(id), holder.clone(), None));
        }
        let mut client = self.client.clone();
        self.block(async move {
            while !ops.is_empty() {
                let rest = ops.split_off(ops.len().min(TXN_CHUNK));
                client
                    .txn(Txn::new().and_then(std::mem::replace(&mut ops, rest)))
                    .await
                    .map_err(etcd_error("save the instance owners"))?;
            }
            Ok(())
        })
    }
}

impl SessionStore for EtcdStore {
    /// A lease of the session's TTL, then one txn: the put on that lease
    /// and a count of the sessions; beyond `cap`, the oldest sessions'
    /// leases are revoked (etcd deletes their keys). Concurrent log-ins
    /// on several replicas may each see the count below the cap, so the
    /// mesh may hold a few more than `cap` until the next log-in.
    fn put_session(
        &self,
        id: TokenHash,
        session: StoredSession,
        cap: usize,
    ) -> SessionFuture<'_, ()> {
        let key = self.session_key(&id);
        let prefix = self.key("sessions/");
        let ttl_secs = session
            .expires_ms
            .saturating_sub(session.created_ms)
            .div_ceil(1000)
            .max(1) as i64;
        let mut client = self.client.clone();
        Box::pin(async move {
            let bytes = super::encode("session", &session)?;
            self.run("store a dashboard session", async move {
                let lease = client
                    .lease_grant(ttl_secs, None)
                    .await
                    .map_err(etcd_error("grant a session lease"))?
                    .id();
                let txn = Txn::new().and_then([
                    TxnOp::put(key, bytes, Some(PutOptions::new().with_lease(lease))),
                    TxnOp::get(
                        prefix.clone(),
                        Some(GetOptions::new().with_prefix().with_count_only()),
                    ),
                ]);
                let response = client
                    .txn(txn)
                    .await
                    .map_err(etcd_error("store a dashboard session"))?;
                let count = response
                    .op_responses()
                    .iter()
                    .find_map(|op| match op {
                        TxnOpResponse::Get(get) => Some(get.count()),
                        _ => None,
                    })
                    .unwrap_or(0);
                let excess = count.saturating_sub(cap as i64);
                if excess <= 0 {
                    return Ok(());
                }
                let oldest = client
                    .get(
                        prefix,
                        Some(
                            GetOptions::new()
                                .with_prefix()
                                .with_keys_only()
                                .with_sort(SortTarget::Create, SortOrder::Ascend)
                                .with_limit(excess),
                        ),
                    )
                    .await
                    .map_err(etcd_error("list the oldest dashboard sessions"))?;
                for kv in oldest.kvs() {
                    revoke_quietly(&mut client, kv.lease()).await;
                }
                Ok(())
            })
            .await
        })
    }

    fn session(&self, id: TokenHash) -> SessionFuture<'_, Option<StoredSession>> {
        let key = self.session_key(&id);
        let mut client = self.client.clone();
        Box::pin(self.run("read a dashboard session", async move {
            let response = client
                .get(key, None)
                .await
                .map_err(etcd_error("read a dashboard session"))?;
            response
                .kvs()
                .first()
                .map(|kv| decode_etcd("session", kv.key(), kv.value()))
                .transpose()
        }))
    }

    fn delete_session(&self, id: TokenHash) -> SessionFuture<'_, ()> {
        let key = self.session_key(&id);
        let mut client = self.client.clone();
        Box::pin(self.run("end a dashboard session", async move {
            let response = client
                .delete(key, Some(DeleteOptions::new().with_prev_key()))
                .await
                .map_err(etcd_error("end a dashboard session"))?;
            // The key is gone (the log-out holds); its lease would end by
            // itself at the session's TTL, but need not live that long.
            for kv in response.prev_kvs() {
                revoke_quietly(&mut client, kv.lease()).await;
            }
            Ok(())
        }))
    }
}

/// Revokes `lease` (etcd deletes its keys); a failure only leaves the
/// lease to end at its TTL, so it is logged, not returned.
async fn revoke_quietly(client: &mut Client, lease: i64) {
    if lease == 0 {
        return;
    }
    if let Err(err) = client.lease_revoke(lease).await {
        tracing::debug!(lease, error = %err, "cannot revoke a session lease; it ends at its TTL");
    }
}
