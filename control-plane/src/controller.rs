//! The controller: the one writer of the mesh state.
//!
//! Data flow of every change (register, deregister, health change, expiry,
//! apply, delete, rollback): take the writer lock → the registry plans the next revision →
//! the store commits it (on the blocking pool) → the registry applies it →
//! the hub publishes it to watchers. A failed commit changes nothing.
//!
//! Instance ownership (issue 13): the controller also keeps the
//! [`Owners`] of instance ids. Register claims the id for the caller's
//! token (409 if another holds it) under the writer lock, before the
//! revision; heartbeat, deregister and stats check the caller holds it
//! (or is an admin; 403, 404 for an unknown id) and that its role allows
//! the action for the *stored* instance's namespace/service. Deregister and
//! expiry release the id. Owners are saved to the store after each change.
//!
//! Heartbeats that do not change health never take the writer lock: they
//! only refresh the instance's deadline in the in-memory liveness table,
//! which the reaper scans to expire instances.
//!
//! `diff` changes nothing and reads the latest published revision. A
//! rollback asks the store for the change records after the target
//! revision (under the writer lock, so no revision lands in between),
//! rebuilds the resources at that revision with `registry::rewind` and plans the
//! difference to the current ones as one new revision.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use meshlet_api::check::{ExpiredInstance, SidecarStatus};
use meshlet_api::mesh::{
    valid_instance_id, ApplyAction, ApplyReply, ApplyRequest, Heartbeat, Registration,
    RegistrationReply, RevisionRecord,
};
use meshlet_api::{parse_documents, Resource, ResourceKey};
use tokio::sync::watch;

use crate::auth::{Action, Claim, Owners, OwnershipError, Principal};
use crate::clock::now_ms;
use crate::error::{ApiFailure, StoreError};
use crate::expiry::{Decision, ExpiryPolicy, Preservation, Transition};
use crate::push::{Hub, Published};
use crate::registry::{classify, rewind, Plan, Registry};
use crate::store::etcd::{EtcdStore, RevisionEntry, WatchBatch, WatchedKey};
use crate::store::{OwnerChanges, Rewind, Store};
use meshlet_api::changes::{
    DeleteReply, DeleteRequest, DiffOutcome, DiffReply, RollbackReply, RollbackRequest,
};

#[derive(Debug, Clone)]
struct Liveness {
    last_heartbeat: Instant,
    healthy: bool,
    /// `namespace/service`: self-preservation weighs services, not
    /// instances (`expiry`).
    service: Arc<str>,
    /// What the last heartbeat said beyond health (`meshctl check`).
    reported: Reported,
}

/// What a sidecar's heartbeats said about it, for `meshctl check`.
#[derive(Debug, Clone, Default)]
struct Reported {
    revision: Option<u64>,
    watching: Option<bool>,
    version: Option<Arc<str>>,
    clock_skew_ms: Option<i64>,
    cert_not_after_ms: Option<u64>,
    /// Since when its heartbeats acknowledge an older revision than the
    /// published one.
    behind_since: Option<Instant>,
}

impl Reported {
    /// Notes `heartbeat`, received at `now` (`now_ms` on the wall clock)
    /// while `published` is the control plane's revision.
    fn note(&mut self, heartbeat: &Heartbeat, now: Instant, now_ms: u64, published: u64) {
        self.revision = heartbeat.revision.or(self.revision);
        self.watching = heartbeat.watching.or(self.watching);
        if let Some(version) = &heartbeat.version {
            if self.version.as_deref() != Some(version.as_str()) {
                self.version = Some(version.as_str().into());
            }
        }
        if let Some(sent) = heartbeat.sent_at_ms {
            self.clock_skew_ms = Some(sent as i64 - now_ms as i64);
        }
        self.cert_not_after_ms = heartbeat.cert_not_after_ms.or(self.cert_not_after_ms);
        match heartbeat.revision {
            Some(acked) if acked < published => {
                self.behind_since.get_or_insert(now);
            }
            Some(_) => self.behind_since = None,
            None => {}
        }
    }
}

/// An instance the reaper removed, kept for `meshctl check`.
#[derive(Debug, Clone)]
struct Expired {
    id: String,
    service: Arc<str>,
    at: Instant,
}

/// Expired instances kept (the oldest go first).
const EXPIRED_KEPT: usize = 256;

/// The key [`Liveness::service`] and the per-service cap use.
fn service_key(registration: &Registration) -> Arc<str> {
    format!("{}/{}", registration.namespace, registration.service).into()
}

pub struct Controller {
    writer: tokio::sync::Mutex<Registry>,
    store: Arc<dyn Store>,
    hub: Arc<Hub>,
    liveness: Mutex<HashMap<String, Liveness>>,
    /// Instances the reaper removed lately, newest last (`meshctl check`).
    expired: Mutex<std::collections::VecDeque<Expired>>,
    /// Who registered which instance id; changed under the writer lock.
    owners: Mutex<Owners>,
    ttl: Duration,
    /// Self-preservation: whether the reaper may expire (see `expiry`).
    preservation: Mutex<Preservation>,
    /// Instances one service may have registered at once
    /// (`--max-instances-per-service`).
    max_instances_per_service: usize,
    /// `--store etcd`: the shared store, for what only it does (CAS
    /// commits, leases, the watch of other replicas' revisions).
    replica: Option<Arc<EtcdStore>>,
}

/// How often a change that lost the revision race to another replica is
/// planned again (against the caught-up state) before the caller gets 409.
const CONFLICT_RETRIES: usize = 8;

/// The default of `--max-instances-per-service`.
pub const DEFAULT_MAX_INSTANCES_PER_SERVICE: usize = 1000;

/// What a caller wants to do with a registered instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstanceUse {
    Heartbeat,
    Deregister,
    /// Report its stats (the route's gate already checked the role).
    Stats,
}

fn ownership_failure(error: OwnershipError) -> ApiFailure {
    match error {
        OwnershipError::HeldByOther { .. } => ApiFailure::Conflict(error.to_string()),
        OwnershipError::NotHolder { .. } => ApiFailure::Forbidden(error.to_string()),
        OwnershipError::Unknown { .. } => ApiFailure::NotFound(error.to_string()),
    }
}

impl Controller {
    /// Loads the store (blocking) and gives every loaded instance a fresh
    /// TTL.
    pub fn load(store: Arc<dyn Store>, ttl: Duration) -> Result<Controller, StoreError> {
        Self::load_with_identity(store, ttl, "", String::new())
    }

    /// [`Controller::load`] for a mesh with a CA: registered instances get
    /// SPIFFE identities in `trust_domain`, watchers the trust bundle
    /// `trust_roots` (PEM, signing root first).
    pub fn load_with_identity(
        store: Arc<dyn Store>,
        ttl: Duration,
        trust_domain: &str,
        trust_roots: String,
    ) -> Result<Controller, StoreError> {
        let registry =
            Registry::from_loaded(store.load()?).with_identity(trust_domain, trust_roots);
        let mut owners = store.load_access()?.owners;
        owners.retain(|id| registry.instance(id).is_some());
        let now = Instant::now();
        let liveness = registry
            .instances()
            .iter_unordered()
            .map(|i| {
                let live = Liveness {
                    last_heartbeat: now,
                    healthy: i.registration.healthy,
                    service: service_key(&i.registration),
                    reported: Reported::default(),
                };
                (i.registration.id.clone(), live)
            })
            .collect();
        // Sidecars that survived a lost store re-register within one
        // heartbeat interval (their heartbeat gets 404); a second on top
        // covers the call itself.
        let warmup = ttl / 3 + Duration::from_secs(1);
        let hub = Arc::new(Hub::with_warmup(Published::new(&registry, None), warmup));
        Ok(Controller {
            writer: tokio::sync::Mutex::new(registry),
            store,
            hub,
            liveness: Mutex::new(liveness),
            expired: Mutex::default(),
            owners: Mutex::new(owners),
            ttl,
            preservation: Mutex::new(Preservation::default()),
            max_instances_per_service: DEFAULT_MAX_INSTANCES_PER_SERVICE,
            replica: None,
        })
    }

    /// `--store etcd`: `replica` is the store this controller loaded from;
    /// commits go through its compare-and-swap, heartbeats renew leases,
    /// and [`Controller::run_replication`] applies other replicas' revisions.
    pub fn with_replica(mut self, replica: Arc<EtcdStore>) -> Controller {
        self.replica = Some(replica);
        self
    }

    /// The etcd store, when the control plane runs on one.
    pub fn replica(&self) -> Option<&Arc<EtcdStore>> {
        self.replica.as_ref()
    }

    /// Sets the expiry pause thresholds (`--expiry-pause-share`,
    /// `--expiry-pause-min-instances`).
    pub fn with_expiry_policy(self, policy: ExpiryPolicy) -> Controller {
        *self.preservation.lock().unwrap() = Preservation::new(policy);
        self
    }

    /// Caps the instances one service may have registered at once
    /// (`--max-instances-per-service`).
    pub fn with_max_instances_per_service(mut self, max: usize) -> Controller {
        self.max_instances_per_service = max;
        self
    }

    /// Refuses a new instance of a service that already has the maximum:
    /// one credential (a sidecar token is bound to one service) cannot
    /// flood the registry, every sidecar's snapshot and the expiry
    /// decision with instances.
    fn check_instance_cap(
        &self,
        registry: &Registry,
        registration: &Registration,
    ) -> Result<(), ApiFailure> {
        let registered = registry.instance_count(&registration.namespace, &registration.service);
        if registered >= self.max_instances_per_service {
            return Err(ApiFailure::LimitReached(format!(
                "service {}/{} already has {registered} instances registered \
                 (--max-instances-per-service {}); deregister some or raise the limit",
                registration.namespace, registration.service, self.max_instances_per_service
            )));
        }
        Ok(())
    }

    /// Whether expiry is paused now, and how many times it paused since
    /// start (for `/metrics`).
    pub fn expiry_paused(&self) -> (bool, u64) {
        let p = self.preservation.lock().unwrap();
        (p.paused(), p.pauses())
    }

    /// Saves what changed in the instance owners (on the blocking pool).
    async fn save_owners(&self, changes: OwnerChanges) -> Result<(), StoreError> {
        if changes.is_empty() {
            return Ok(());
        }
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.save_owner_changes(&changes))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?
    }

    /// Whether `principal` may use instance `id` this way: it holds the id
    /// (or is an admin) and its role allows the action for the stored
    /// instance's namespace and service.
    pub fn check_instance(
        &self,
        id: &str,
        principal: &Principal,
        use_: InstanceUse,
    ) -> Result<(), ApiFailure> {
        self.owners
            .lock()
            .unwrap()
            .check(id, principal)
            .map_err(ownership_failure)?;
        let published = self.published();
        let Some(instance) = published.instances.get(id) else {
            return Err(ApiFailure::NotFound(format!(
                "instance {id:?} is not registered"
            )));
        };
        let (namespace, service) = (
            instance.registration.namespace.as_str(),
            instance.registration.service.as_str(),
        );
        let action = match use_ {
            InstanceUse::Heartbeat => Action::HeartbeatInstance { namespace, service },
            InstanceUse::Deregister => Action::DeregisterInstance { namespace, service },
            InstanceUse::Stats => return Ok(()),
        };
        principal
            .may(action)
            .map_err(|denied| ApiFailure::Forbidden(denied.to_string()))
    }

    /// Who holds instance `id` (tests, diagnostics).
    pub fn owner_of(&self, id: &str) -> Option<String> {
        self.owners.lock().unwrap().holder(id).map(str::to_owned)
    }

    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    pub fn published(&self) -> Arc<Published> {
        self.hub.current()
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    pub fn heartbeat_interval(&self) -> Duration {
        self.ttl / 3
    }

    /// Every registered instance as its heartbeats described it, and the
    /// instances expired within `window`, newest first (`meshctl check`).
    pub fn check_view(&self, window: Duration) -> (Vec<SidecarStatus>, Vec<ExpiredInstance>) {
        let published = self.published();
        let now = Instant::now();
        let liveness = self.liveness.lock().unwrap();
        let sidecars = published
            .instances
            .values()
            .map(|i| {
                let reg = &i.registration;
                let live = liveness.get(&reg.id);
                let reported = live.map(|l| l.reported.clone()).unwrap_or_default();
                let revisions_behind = reported
                    .revision
                    .map(|r| published.revision.saturating_sub(r));
                SidecarStatus {
                    id: reg.id.clone(),
                    service: reg.service.clone(),
                    namespace: reg.namespace.clone(),
                    role: reg.role,
                    healthy: reg.healthy,
                    last_seen_ms_ago: live
                        .map(|l| now.saturating_duration_since(l.last_heartbeat).as_millis() as u64)
                        .unwrap_or_default(),
                    revision: reported.revision,
                    revisions_behind,
                    behind_for_ms: reported.revision.map(|_| {
                        reported
                            .behind_since
                            .filter(|_| revisions_behind.unwrap_or(0) > 0)
                            .map_or(0, |since| {
                                now.saturating_duration_since(since).as_millis() as u64
                            })
                    }),
                    watching: reported.watching,
                    version: reported.version.as_deref().map(str::to_owned),
                    clock_skew_ms: reported.clock_skew_ms,
                    cert_not_after_ms: reported.cert_not_after_ms,
                }
            })
            .collect();
        drop(liveness);
        let expired = self
            .expired
            .lock()
            .unwrap()
            .iter()
            .rev()
            .filter(|e| now.saturating_duration_since(e.at) <= window)
            .filter(|e| !published.instances.contains_key(&e.id))
            .map(|e| {
                let (namespace, service) = e.service.split_once('/').unwrap_or(("", &e.service));
                ExpiredInstance {
                    id: e.id.clone(),
                    service: service.to_owned(),
                    namespace: namespace.to_owned(),
                    expired_ms_ago: now.saturating_duration_since(e.at).as_millis() as u64,
                }
            })
            .collect();
        (sidecars, expired)
    }

    /// How long ago the instance's last heartbeat (or registration, or the
    /// control plane's start) was.
    pub fn last_heartbeat_ago(&self, id: &str) -> Option<Duration> {
        let liveness = self.liveness.lock().unwrap();
        liveness.get(id).map(|l| l.last_heartbeat.elapsed())
    }

    /// Writes a plan, applies it and publishes it; returns the revision.
    async fn commit(&self, registry: &mut Registry, plan: Plan) -> Result<u64, StoreError> {
        self.commit_guarded(registry, plan, &[]).await
    }

    /// [`Controller::commit`]; with etcd, `absent` instance keys must not
    /// exist (an expiry), and a lost revision race catches this registry
    /// up before [`StoreError::Conflict`] is returned (so planning again
    /// starts from the new state).
    async fn commit_guarded(
        &self,
        registry: &mut Registry,
        plan: Plan,
        absent: &[String],
    ) -> Result<u64, StoreError> {
        match &self.replica {
            Some(replica) => {
                let result = replica
                    .commit_plan(&plan.commit, plan.trust_roots.clone(), absent)
                    .await;
                if let Err(err) = result {
                    if err.is_conflict() {
                        if let Err(e) = self.catch_up(registry, replica).await {
                            tracing::warn!(error = %e, "catching up after a conflict failed");
                        }
                    }
                    return Err(err);
                }
            }
            None => {
                let store = self.store.clone();
                let commit = plan.commit.clone();
                tokio::task::spawn_blocking(move || store.commit(&commit))
                    .await
                    .map_err(|e| StoreError::Task(e.to_string()))??;
            }
        }
        self.publish_plan(registry, plan);
        Ok(registry.revision())
    }

    /// Applies a committed plan to the registry and publishes it.
    fn publish_plan(&self, registry: &mut Registry, plan: Plan) {
        registry.apply(&plan);
        let published = Published::new(registry, Some(&plan.changes));
        self.hub.publish(published, plan.changes);
        tracing::info!(
            revision = plan.commit.revision,
            actor = %plan.commit.record.actor,
            changes = ?plan.commit.record.changes,
            "revision"
        );
    }

    /// Applies the revisions other replicas committed after this
    /// registry's (etcd), oldest first.
    async fn catch_up(
        &self,
        registry: &mut Registry,
        replica: &EtcdStore,
    ) -> Result<(), StoreError> {
        let entries = replica.entries_after(registry.revision()).await?;
        for entry in entries {
            self.apply_remote(registry, entry);
        }
        Ok(())
    }

    /// Applies one revision another replica committed, if it is the next
    /// one; updates the liveness table for the instances it touches.
    fn apply_remote(&self, registry: &mut Registry, entry: RevisionEntry) -> bool {
        if entry.record.revision != registry.revision() + 1 {
            return false;
        }
        let (commit, trust_roots) = entry.into_commit();
        {
            let mut liveness = self.liveness.lock().unwrap();
            for id in &commit.delete_instances {
                liveness.remove(id);
            }
            for instance in &commit.put_instances {
                // What this replica heard in heartbeats (`meshctl check`)
                // survives another replica's update of the registration.
                let reported = liveness
                    .remove(&instance.registration.id)
                    .map(|live| live.reported)
                    .unwrap_or_default();
                liveness.insert(
                    instance.registration.id.clone(),
                    Liveness {
                        last_heartbeat: Instant::now(),
                        healthy: instance.registration.healthy,
                        service: service_key(&instance.registration),
                        reported,
                    },
                );
            }
        }
        let plan = registry.plan_remote(commit, trust_roots);
        self.publish_plan(registry, plan);
        true
    }

    /// Publishes a new trust bundle as one revision (actor `ca`, `lines`
    /// in its history record); nothing when it is already the current one.
    /// Returns the revision that carries it.
    pub async fn set_trust_roots(
        &self,
        roots: String,
        lines: Vec<String>,
    ) -> Result<u64, StoreError> {
        let mut registry = self.writer.lock().await;
        let mut attempt = 0;
        loop {
            let plan = registry.plan_trust_roots(roots.clone(), lines.clone(), now_ms());
            match plan {
                Some(plan) => match self.commit(&mut registry, plan).await {
                    Err(e) if e.is_conflict() && attempt < CONFLICT_RETRIES => attempt += 1,
                    result => return result,
                },
                None => return Ok(registry.revision()),
            }
        }
    }

    /// Registers (or re-registers) an instance for `principal`, whose role
    /// the caller has checked against the registration's service; the id
    /// is claimed for its token (409 when another credential holds it).
    pub async fn register(
        &self,
        registration: Registration,
        principal: &Principal,
    ) -> Result<RegistrationReply, ApiFailure> {
        check_registration(&registration)?;
        let mut registry = self.writer.lock().await;
        let id = registration.id.clone();
        let healthy = registration.healthy;
        let service = service_key(&registration);
        if registry.instance(&id).is_none() {
            self.check_instance_cap(&registry, &registration)?;
        }
        let claim = self
            .owners
            .lock()
            .unwrap()
            .claim(&id, principal)
            .map_err(ownership_failure)?;
        // With etcd, an unchanged registration whose lease ended (or
        // that only this replica's memory still has) is written again.
        let mut forced = false;
        if let Some(replica) = &self.replica {
            if registry.instance(&id).is_some() {
                forced = !replica.keep_alive(&id).await.unwrap_or(false);
            }
        }
        let mut attempt = 0;
        let revision = loop {
            let planned = if forced {
                Some(registry.plan_reregister(registration.clone(), now_ms()))
            } else {
                registry.plan_register(registration.clone(), now_ms())
            };
            match planned {
                Some(plan) => match self.commit(&mut registry, plan).await {
                    Ok(revision) => break revision,
                    Err(err) if err.is_conflict() && attempt < CONFLICT_RETRIES => attempt += 1,
                    Err(err) => {
                        if claim == Claim::New {
                            self.owners.lock().unwrap().release(&id);
                        }
                        return Err(err.into());
                    }
                },
                None => break registry.revision(),
            }
        };
        if claim == Claim::New {
            let changes = OwnerChanges {
                claimed: vec![(id.clone(), principal.name.clone())],
                released: Vec::new(),
            };
            self.save_owners(changes).await?;
        }
        self.liveness.lock().unwrap().insert(
            id,
            Liveness {
                last_heartbeat: Instant::now(),
                healthy,
                service,
                reported: Reported::default(),
            },
        );
        Ok(RegistrationReply {
            heartbeat_interval_ms: self.heartbeat_interval().as_millis() as u64,
            ttl_ms: self.ttl.as_millis() as u64,
            revision,
        })
    }

    /// A heartbeat of instance `id` by `principal` (see [`Controller::check_instance`]).
    pub async fn heartbeat(
        &self,
        id: &str,
        heartbeat: Heartbeat,
        principal: &Principal,
    ) -> Result<(), ApiFailure> {
        self.heartbeat_at(id, heartbeat, principal, Instant::now())
            .await
    }

    /// [`Controller::heartbeat`] received at `now` (tests drive the clock).
    pub(crate) async fn heartbeat_at(
        &self,
        id: &str,
        heartbeat: Heartbeat,
        principal: &Principal,
        now: Instant,
    ) -> Result<(), ApiFailure> {
        self.check_instance(id, principal, InstanceUse::Heartbeat)?;
        let not_found = || ApiFailure::NotFound(format!("instance {id:?} is not registered"));
        if let Some(replica) = &self.replica {
            // etcd decides liveness: the heartbeat renews the lease.
            if !replica.keep_alive(id).await? {
                return Err(not_found());
            }
            let unchanged = self
                .published()
                .instances
                .get(id)
                .is_some_and(|i| i.registration.healthy == heartbeat.healthy);
            if !unchanged {
                let mut registry = self.writer.lock().await;
                let mut attempt = 0;
                while let Some(plan) = registry.plan_health(id, heartbeat.healthy, now_ms()) {
                    match self.commit(&mut registry, plan).await {
                        Ok(_) => break,
                        Err(e) if e.is_conflict() && attempt < CONFLICT_RETRIES => attempt += 1,
                        Err(e) => return Err(e.into()),
                    }
                }
            }
            let published = self.published();
            if let Some(registration) = published.instances.get(id).map(|i| &i.registration) {
                let mut liveness = self.liveness.lock().unwrap();
                let live = liveness.entry(id.to_owned()).or_insert_with(|| Liveness {
                    last_heartbeat: now,
                    healthy: heartbeat.healthy,
                    service: service_key(registration),
                    reported: Reported::default(),
                });
                live.last_heartbeat = now;
                live.healthy = heartbeat.healthy;
                live.service = service_key(registration);
                live.reported
                    .note(&heartbeat, now, now_ms(), published.revision);
            }
            return Ok(());
        }
        {
            let published = self.published().revision;
            let mut liveness = self.liveness.lock().unwrap();
            let live = liveness.get_mut(id).ok_or_else(not_found)?;
            live.reported.note(&heartbeat, now, now_ms(), published);
            if live.healthy == heartbeat.healthy {
                live.last_heartbeat = now;
                return Ok(());
            }
        }
        let mut registry = self.writer.lock().await;
        if registry.instance(id).is_none() {
            return Err(not_found());
        }
        if let Some(plan) = registry.plan_health(id, heartbeat.healthy, now_ms()) {
            self.commit(&mut registry, plan).await?;
        }
        let mut liveness = self.liveness.lock().unwrap();
        if let Some(live) = liveness.get_mut(id) {
            live.healthy = heartbeat.healthy;
            live.last_heartbeat = now;
        }
        Ok(())
    }

    /// Removes instance `id` for `principal` (see
    /// [`Controller::check_instance`]) and releases its id.
    pub async fn deregister(&self, id: &str, principal: &Principal) -> Result<(), ApiFailure> {
        let mut registry = self.writer.lock().await;
        self.check_instance(id, principal, InstanceUse::Deregister)?;
        let mut attempt = 0;
        loop {
            let plan = registry.plan_deregister(id, now_ms()).ok_or_else(|| {
                ApiFailure::NotFound(format!("instance {id:?} is not registered"))
            })?;
            match self.commit(&mut registry, plan).await {
                Ok(_) => break,
                Err(e) if e.is_conflict() && attempt < CONFLICT_RETRIES => attempt += 1,
                Err(e) => return Err(e.into()),
            }
        }
        self.liveness.lock().unwrap().remove(id);
        self.owners.lock().unwrap().release(id);
        let changes = OwnerChanges {
            claimed: Vec::new(),
            released: vec![id.to_owned()],
        };
        self.save_owners(changes).await?;
        Ok(())
    }

    /// Whether this pass may expire anything: asks the self-preservation
    /// rule (`expiry`) with the ages of every instance's last heartbeat,
    /// and logs a pause or a resume.
    fn may_expire(&self, now: Instant) -> bool {
        let (decision, transition) = {
            let liveness = self.liveness.lock().unwrap();
            let ages = liveness
                .values()
                .map(|l| (&*l.service, now.saturating_duration_since(l.last_heartbeat)));
            self.preservation
                .lock()
                .unwrap()
                .decide(ages, self.ttl, now)
        };
        match (transition, &decision) {
            (Transition::Paused, Decision::Pause { silent, total }) => tracing::warn!(
                silent,
                total,
                ttl = ?self.ttl,
                "expiry paused: {silent} of {total} instances have not been heard for half a TTL; \
                 the control plane is likely the one that cannot hear them, so none is removed \
                 until heartbeats flow again"
            ),
            (Transition::GaveUp, _) => tracing::warn!(
                max_pause = ?self.preservation.lock().unwrap().policy.max_pause,
                "expiry pause outlasted --expiry-pause-max: the silent instances expire now"
            ),
            (Transition::Resumed, _) => {
                tracing::info!("expiry resumed: heartbeats flow again; instances still silent past the TTL expire now")
            }
            _ => {}
        }
        decision == Decision::Expire
    }

    /// Removes every instance whose last heartbeat is older than the TTL at
    /// `now`, in one revision, unless self-preservation pauses expiry (see
    /// `expiry`). Returns how many expired.
    pub async fn reap(&self, now: Instant) -> Result<usize, StoreError> {
        if !self.may_expire(now) {
            return Ok(0);
        }
        let expired = |liveness: &HashMap<String, Liveness>| -> Vec<String> {
            let mut ids: Vec<String> = liveness
                .iter()
                .filter(|(_, l)| now.saturating_duration_since(l.last_heartbeat) > self.ttl)
                .map(|(id, _)| id.clone())
                .collect();
            ids.sort();
            ids
        };
        if expired(&self.liveness.lock().unwrap()).is_empty() {
            return Ok(0);
        }
        let mut registry = self.writer.lock().await;
        // Look again under the writer lock (a heartbeat may have come in)
        // and forget the expired ids in the same step: from here on their
        // heartbeats get 404 and the sidecars register again (after this
        // revision, as registering waits for the writer lock). Were a
        // heartbeat acknowledged while the expiry commits, its instance
        // would vanish with the sidecar believing it registered.
        let ids = {
            let mut liveness = self.liveness.lock().unwrap();
            let ids = expired(&liveness);
            let mut gone = self.expired.lock().unwrap();
            for id in &ids {
                if let Some(live) = liveness.remove(id) {
                    if gone.len() == EXPIRED_KEPT {
                        gone.pop_front();
                    }
                    gone.push_back(Expired {
                        id: id.clone(),
                        service: live.service,
                        at: now,
                    });
                }
            }
            ids
        };
        let Some(plan) = registry.plan_expire(&ids, now_ms()) else {
            return Ok(0);
        };
        let count = plan.commit.delete_instances.len();
        // Should the commit fail, the instances stay registered without a
        // liveness entry: their next heartbeat gets 404 and they register
        // again.
        self.commit(&mut registry, plan).await?;
        {
            let mut owners = self.owners.lock().unwrap();
            for id in &ids {
                owners.release(id);
            }
        }
        let changes = OwnerChanges {
            claimed: Vec::new(),
            released: ids,
        };
        self.save_owners(changes).await?;
        Ok(count)
    }

    /// `--store etcd`: removes, in one revision, the instances among `ids`
    /// whose keys etcd deleted (their lease ended). Every replica may try;
    /// the compare-and-swap lets one win, the others catch up and find
    /// nothing left to do. An id registered again meanwhile has a key
    /// again: the txn's "key absent" compare fails and it is dropped.
    pub async fn expire_absent(&self, ids: Vec<String>) -> Result<usize, StoreError> {
        let Some(replica) = self.replica.clone() else {
            return Ok(0);
        };
        let mut registry = self.writer.lock().await;
        let mut ids = ids;
        for _ in 0..=CONFLICT_RETRIES {
            ids.retain(|id| registry.instance(id).is_some());
            if ids.is_empty() {
                return Ok(0);
            }
            ids = replica.absent_instances(ids).await?;
            let Some(plan) = registry.plan_expire(&ids, now_ms()) else {
                return Ok(0);
            };
            let count = plan.commit.delete_instances.len();
            match self.commit_guarded(&mut registry, plan, &ids).await {
                Ok(_) => {
                    {
                        let mut liveness = self.liveness.lock().unwrap();
                        let mut owners = self.owners.lock().unwrap();
                        for id in &ids {
                            liveness.remove(id);
                            owners.release(id);
                        }
                    }
                    drop(registry);
                    self.save_owners(OwnerChanges {
                        claimed: Vec::new(),
                        released: ids,
                    })
                    .await?;
                    return Ok(count);
                }
                Err(e) if e.is_conflict() => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(0)
    }

    /// `--store etcd`'s reaper: every ttl/2, the registered instances
    /// whose keys etcd no longer has are expired (the watch's delete
    /// events do it at once; this pass covers a replica that missed them,
    /// e.g. while its watch reconnected). The etcd health is probed on the
    /// same tick. The instances whose lease ended while no replica ran
    /// ([`EtcdStore::absent_at_load`]) wait one TTL after the start: the
    /// living among them heartbeat, get 404 and register again first, so
    /// only the dead are expired (as the redb reaper pauses after a start).
    async fn run_lease_sweep(
        self: Arc<Self>,
        replica: Arc<EtcdStore>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let held = replica.absent_at_load();
        let grace_until = Instant::now() + self.ttl;
        let period = (self.ttl / 2).max(Duration::from_millis(250));
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = crate::push::stopped(&mut shutdown) => return,
                _ = tick.tick() => {
                    if replica.probe().await.is_err() {
                        continue;
                    }
                    let ids: Vec<String> = self.published().instances.keys().cloned().collect();
                    let mut absent = match replica.absent_instances(ids).await {
                        Ok(absent) => absent,
                        Err(_) => continue,
                    };
                    if Instant::now() < grace_until {
                        absent.retain(|id| !held.contains(id));
                    }
                    if !absent.is_empty() {
                        if let Err(err) = self.expire_absent(absent).await {
                            tracing::warn!(error = %err, "expiring instances whose lease ended failed");
                        }
                    }
                }
            }
        }
    }

    /// `--store etcd`: watches the prefix and applies what other replicas
    /// wrote — revisions (to the registry, published to this replica's
    /// watchers), instance owners, tokens (`on_tokens`), the CA rotation
    /// state (`on_ca_state`: its JSON and mod revision, in watch order, so
    /// before any later revision carrying its bundle) — and expires the
    /// instances whose lease etcd ended. Reconnects after a failure and
    /// catches up from the revision log. Ends on `shutdown`.
    pub async fn run_replication(
        self: Arc<Self>,
        on_tokens: impl Fn(Vec<crate::auth::TokenRecord>) + Send + Sync + 'static,
        on_ca_state: impl Fn(&[u8], i64) + Send + Sync + 'static,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let Some(replica) = self.replica.clone() else {
            return;
        };
        let mut from = replica.loaded_at() + 1;
        loop {
            let mut batches = match replica.watch(from).await {
                Ok(batches) => batches,
                Err(err) => {
                    tracing::warn!(error = %err, "cannot watch etcd; retrying");
                    tokio::select! {
                        _ = crate::push::stopped(&mut shutdown) => return,
                        _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
                    }
                }
            };
            {
                let mut registry = self.writer.lock().await;
                if let Err(err) = self.catch_up(&mut registry, &replica).await {
                    tracing::warn!(error = %err, "catching up from etcd failed");
                }
            }
            loop {
                let batch = tokio::select! {
                    _ = crate::push::stopped(&mut shutdown) => return,
                    batch = batches.recv() => batch,
                };
                let Some(batch) = batch else { break };
                from = batch.etcd_revision + 1;
                self.clone()
                    .on_batch(&replica, batch, &on_tokens, &on_ca_state)
                    .await;
            }
            // The watch ended (etcd member lost, compaction): watch again
            // from the last revision seen (0 after a compaction: now; the
            // catch-up and the sweep cover the gap).
            if from <= 1 {
                from = 0;
            }
            tokio::select! {
                _ = crate::push::stopped(&mut shutdown) => return,
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
    }

    async fn on_batch(
        self: Arc<Self>,
        replica: &Arc<EtcdStore>,
        batch: WatchBatch,
        on_tokens: &(impl Fn(Vec<crate::auth::TokenRecord>) + Send + Sync),
        on_ca_state: &(impl Fn(&[u8], i64) + Send + Sync),
    ) {
        let mut entries = Vec::new();
        let mut deleted = Vec::new();
        for key in batch.keys {
            match key {
                WatchedKey::Revision(entry) => entries.push(*entry),
                WatchedKey::InstancePut { id, lease } => replica.note_lease(&id, Some(lease)),
                WatchedKey::InstanceDeleted { id } => {
                    replica.note_lease(&id, None);
                    deleted.push(id);
                }
                WatchedKey::OwnerPut { id, holder } => {
                    self.owners.lock().unwrap().record(id, holder);
                }
                WatchedKey::OwnerDeleted { id } => {
                    self.owners.lock().unwrap().release(&id);
                }
                WatchedKey::Tokens(records) => on_tokens(records),
                WatchedKey::CaState {
                    value,
                    mod_revision,
                } => on_ca_state(&value, mod_revision),
            }
        }
        if !entries.is_empty() {
            let mut registry = self.writer.lock().await;
            for entry in entries {
                let revision = entry.record.revision;
                if revision <= registry.revision() {
                    continue;
                }
                if !self.apply_remote(&mut registry, entry) {
                    if let Err(err) = self.catch_up(&mut registry, replica).await {
                        tracing::warn!(error = %err, "catching up from etcd failed");
                    }
                }
            }
        }
        // Deletes no revision explains: leases that ended.
        let published = self.published();
        deleted.retain(|id| published.instances.contains_key(id));
        if !deleted.is_empty() {
            tokio::spawn(async move {
                if let Err(err) = self.expire_absent(deleted).await {
                    tracing::warn!(error = %err, "expiring instances whose lease ended failed");
                }
            });
        }
    }

    /// Runs [`Controller::reap`] every ttl/10 (at least every 50 ms apart)
    /// until `shutdown`.
    pub async fn run_reaper(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        if let Some(replica) = self.replica.clone() {
            return self.run_lease_sweep(replica, shutdown).await;
        }
        let period = (self.ttl / 10).max(Duration::from_millis(50));
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = crate::push::stopped(&mut shutdown) => return,
                _ = tick.tick() => {
                    if let Err(err) = self.reap(Instant::now()).await {
                        tracing::error!(error = %err, "expiring instances failed");
                    }
                }
            }
        }
    }

    /// `POST /api/v1/apply`: parse everything first, then one revision for
    /// all changes (or none).
    /// `actor`: the caller's token name (a client's `actor` field is ignored).
    pub async fn apply(
        &self,
        request: ApplyRequest,
        actor: &str,
    ) -> Result<ApplyReply, ApiFailure> {
        let resources = parse_request(&request)?;
        let actor = actor_of(actor);
        let mut registry = self.writer.lock().await;
        let mut attempt = 0;
        loop {
            let (outcomes, plan) = registry.plan_apply(resources.clone(), &actor, now_ms());
            let revision = match plan {
                Some(plan) => match self.commit(&mut registry, plan).await {
                    Ok(revision) => revision,
                    Err(e) if e.is_conflict() && attempt < CONFLICT_RETRIES => {
                        attempt += 1;
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                },
                None => registry.revision(),
            };
            return Ok(ApplyReply { revision, outcomes });
        }
    }

    /// `POST /api/v1/delete`: the resources named by the files (parsed and
    /// validated like an apply) and the keys, in one revision.
    pub async fn delete(
        &self,
        request: DeleteRequest,
        actor: &str,
    ) -> Result<DeleteReply, ApiFailure> {
        let mut keys: Vec<ResourceKey> = parse_request(&ApplyRequest {
            files: request.files,
            actor: None,
        })?
        .iter()
        .map(Resource::key)
        .collect();
        for key in request.keys {
            if !meshlet_api::KNOWN_KINDS.contains(&key.kind.as_str()) {
                return Err(ApiFailure::BadRequest(format!(
                    "unknown kind {:?}: expected one of {}",
                    key.kind,
                    meshlet_api::KNOWN_KINDS.join(", ")
                )));
            }
            if !keys.contains(&key) {
                keys.push(key);
            }
        }
        if keys.is_empty() {
            return Err(ApiFailure::BadRequest("nothing to delete".into()));
        }
        let actor = actor_of(actor);
        let mut registry = self.writer.lock().await;
        let mut attempt = 0;
        loop {
            let (outcomes, plan) = registry
                .plan_delete(keys.clone(), request.ignore_not_found, &actor, now_ms())
                .map_err(|missing| {
                    let names: Vec<String> =
                        missing.iter().map(|k| format!("{k} not found")).collect();
                    ApiFailure::NotFound(format!("{}; nothing was deleted", names.join(", ")))
                })?;
            let revision = match plan {
                Some(plan) => match self.commit(&mut registry, plan).await {
                    Ok(revision) => revision,
                    Err(e) if e.is_conflict() && attempt < CONFLICT_RETRIES => {
                        attempt += 1;
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                },
                None => registry.revision(),
            };
            return Ok(DeleteReply { revision, outcomes });
        }
    }

    /// `POST /api/v1/diff`: what an apply of the request would do, with a
    /// YAML line diff for each configured resource. Changes nothing.
    pub fn diff(&self, request: &ApplyRequest) -> Result<DiffReply, ApiFailure> {
        let resources = parse_request(request)?;
        let published = self.published();
        let outcomes = resources
            .iter()
            .map(|resource| {
                let key = resource.key();
                let old = published.resources.get(&key);
                let action = classify(old, resource);
                let diff = match (action, old) {
                    (ApplyAction::Configured, Some(old)) => {
                        Some(crate::diff::line_diff(&old.to_yaml(), &resource.to_yaml()))
                    }
                    (ApplyAction::Created, _) => {
                        Some(crate::diff::line_diff("", &resource.to_yaml()))
                    }
                    _ => None,
                };
                DiffOutcome { key, action, diff }
            })
            .collect();
        Ok(DiffReply {
            revision: published.revision,
            outcomes,
        })
    }

    /// `POST /api/v1/rollback`: the resources as right after
    /// `request.revision`, as one new revision (instances are untouched).
    /// Refuses (400) a target whose resources fail today's validation.
    pub async fn rollback(
        &self,
        request: RollbackRequest,
        actor: &str,
    ) -> Result<RollbackReply, ApiFailure> {
        let to = request.revision;
        let actor = format!("rollback to {to} by {}", actor_of(actor));
        let mut registry = self.writer.lock().await;
        let current = registry.revision();
        if to == 0 || to > current {
            return Err(ApiFailure::NotFound(format!(
                "revision {to} does not exist (the latest is {current})"
            )));
        }
        let store = self.store.clone();
        let rewound = tokio::task::spawn_blocking(move || store.rewind(to))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))??;
        let changes = match rewound {
            Rewind::Changes(changes) => changes,
            Rewind::NotRetained { oldest } => {
                let hint = match oldest {
                    Some(oldest) => format!("the oldest revision to roll back to is {oldest}"),
                    None => "no revision is retained".to_owned(),
                };
                return Err(ApiFailure::BadRequest(format!(
                    "revision {to} is no longer retained ({hint})"
                )));
            }
        };
        let target = rewind(registry.resources(), &changes);
        for resource in target.values() {
            if let Err((field, message)) = resource.validate() {
                return Err(ApiFailure::BadRequest(format!(
                    "revision {to} cannot be restored: {} is no longer valid: {field}: {message}",
                    resource.key()
                )));
            }
        }
        match registry.plan_rollback(target, &actor, now_ms()) {
            Some(plan) => {
                let lines = plan.commit.record.changes.clone();
                let revision = self.commit(&mut registry, plan).await?;
                Ok(RollbackReply {
                    revision,
                    rolled_back: true,
                    changes: lines,
                })
            }
            None => Ok(RollbackReply {
                revision: current,
                rolled_back: false,
                changes: Vec::new(),
            }),
        }
    }

    /// The newest `limit` revision records; with `resources_only`, records
    /// of the registry (registrations, health, expiry) are skipped.
    pub async fn history(
        &self,
        limit: usize,
        resources_only: bool,
    ) -> Result<Vec<RevisionRecord>, StoreError> {
        let store = self.store.clone();
        let fetch = if resources_only { usize::MAX } else { limit };
        let records = tokio::task::spawn_blocking(move || store.history(fetch))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))??;
        Ok(records
            .into_iter()
            .filter(|r| !resources_only || r.actor != crate::registry::REGISTRY_ACTOR)
            .take(limit)
            .collect())
    }
}

fn actor_of(actor: &str) -> String {
    if actor.trim().is_empty() {
        "unknown".to_owned()
    } else {
        actor.to_owned()
    }
}

/// A registration needs an id, a service name and a real port.
fn check_registration(registration: &Registration) -> Result<(), ApiFailure> {
    let bad = |m: &str| Err(ApiFailure::BadRequest(format!("invalid registration: {m}")));
    if !valid_instance_id(&registration.id) {
        return bad("id must be 1-253 characters from A-Z a-z 0-9 . _ -");
    }
    if registration.service.trim().is_empty() || registration.namespace.trim().is_empty() {
        return bad("service and namespace must be non-empty");
    }
    if registration.address.port() == 0 {
        return bad("address port must not be 0");
    }
    Ok(())
}

/// Parses every file of an apply request; a parse error or a resource
/// defined twice is a bad request.
pub fn parse_request(request: &ApplyRequest) -> Result<Vec<Resource>, ApiFailure> {
    let mut seen: BTreeMap<ResourceKey, &str> = BTreeMap::new();
    let mut all = Vec::new();
    for file in &request.files {
        let resources = parse_documents(&file.name, &file.text)
            .map_err(|e| ApiFailure::BadRequest(e.to_string()))?;
        for resource in resources {
            let key = resource.key();
            if let Some(first) = seen.insert(key.clone(), &file.name) {
                let message = if first == file.name {
                    format!("{key} is defined twice in {first}")
                } else {
                    format!("{key} is defined in both {first} and {}", file.name)
                };
                return Err(ApiFailure::BadRequest(message));
            }
            all.push(resource);
        }
    }
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::tests::registration;
    use crate::store::MemoryStore;
    use meshlet_api::mesh::ApplyFile;

    fn admin() -> Principal {
        Principal {
            name: "me@host".into(),
            role: crate::auth::Role::Admin,
        }
    }

    fn controller(store: Arc<MemoryStore>) -> Controller {
        Controller::load(store, Duration::from_secs(10)).unwrap()
    }

    const POLICY: &str = "apiVersion: meshlet.dev/v1alpha1\nkind: HealthCheckPolicy\nmetadata: {name: p}\nspec: {targetRef: {service: orders}}\n";

    #[tokio::test]
    async fn heartbeats_refresh_or_change_health() {
        let store = Arc::new(MemoryStore::new());
        let c = controller(store.clone());
        let reply = c
            .register(registration("o1", "orders", 8081), &admin())
            .await
            .unwrap();
        assert_eq!(reply.revision, 1);
        assert_eq!(reply.heartbeat_interval_ms, 3333);
        assert_eq!(reply.ttl_ms, 10_000);
        c.heartbeat("o1", Heartbeat::health(true), &admin())
            .await
            .unwrap();
        assert_eq!(
            c.published().revision,
            1,
            "unchanged heartbeat: no revision"
        );
        assert_eq!(store.history(10).unwrap().len(), 1);
        c.heartbeat("o1", Heartbeat::health(false), &admin())
            .await
            .unwrap();
        assert_eq!(c.published().revision, 2);
        assert!(!c.published().instances["o1"].registration.healthy);
        let err = c
            .heartbeat("x", Heartbeat::health(true), &admin())
            .await
            .unwrap_err();
        assert!(matches!(err, ApiFailure::NotFound(_)));
    }

    #[tokio::test]
    async fn reaper_expires_in_one_revision() {
        let store = Arc::new(MemoryStore::new());
        let c = controller(store.clone());
        c.register(registration("o1", "orders", 8081), &admin())
            .await
            .unwrap();
        c.register(registration("o2", "orders", 8082), &admin())
            .await
            .unwrap();
        assert_eq!(c.reap(Instant::now()).await.unwrap(), 0);
        let later = Instant::now() + Duration::from_secs(11);
        assert_eq!(c.reap(later).await.unwrap(), 2);
        assert_eq!(c.published().revision, 3);
        assert!(c.published().services.is_empty());
        assert!(c.last_heartbeat_ago("o1").is_none());
        let history = store.history(1).unwrap();
        assert_eq!(
            history[0].changes,
            ["expired orders/o1", "expired orders/o2"]
        );
    }

    /// A controller (TTL 10 s) with `ids` registered at `start`.
    async fn registered(ids: &[&str]) -> (Controller, Instant) {
        let c = controller(Arc::new(MemoryStore::new()));
        for (n, id) in ids.iter().enumerate() {
            c.register(registration(id, "orders", 8081 + n as u16), &admin())
                .await
                .unwrap();
        }
        (c, Instant::now())
    }

    async fn beat(c: &Controller, ids: &[&str], at: Instant) {
        for id in ids {
            c.heartbeat_at(id, Heartbeat::health(true), &admin(), at)
                .await
                .unwrap();
        }
    }

    fn instances(c: &Controller) -> Vec<String> {
        c.published().instances.keys().cloned().collect()
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[tokio::test]
    async fn one_dead_instance_of_three_expires() {
        let (c, t0) = registered(&["a", "b", "c"]).await;
        // b and c beat every 3 s; a never again.
        for s in [3, 6, 9] {
            beat(&c, &["b", "c"], t0 + secs(s)).await;
        }
        assert_eq!(c.reap(t0 + secs(11)).await.unwrap(), 1);
        assert_eq!(instances(&c), ["b", "c"]);
        assert_eq!(c.expiry_paused(), (false, 0));
    }

    #[tokio::test]
    async fn all_silent_pauses_expiry_and_heartbeats_resume_it() {
        let (c, t0) = registered(&["a", "b", "c", "d"]).await;
        // Nobody is heard (a starved control plane): reaper passes every
        // second for three TTLs expire nothing.
        for s in 1..=30 {
            assert_eq!(c.reap(t0 + secs(s)).await.unwrap(), 0, "pass at {s}s");
        }
        assert_eq!(instances(&c), ["a", "b", "c", "d"]);
        assert_eq!(c.expiry_paused(), (true, 1), "paused once");
        // Heartbeats flow again for b, c, d; a is really dead.
        beat(&c, &["b"], t0 + secs(31)).await;
        assert_eq!(
            c.reap(t0 + secs(31)).await.unwrap(),
            0,
            "3 of 4 still silent"
        );
        assert!(c.expiry_paused().0);
        beat(&c, &["c", "d"], t0 + secs(32)).await;
        assert_eq!(
            c.reap(t0 + secs(32)).await.unwrap(),
            1,
            "resumed: a expires"
        );
        assert_eq!(instances(&c), ["b", "c", "d"]);
        assert_eq!(c.expiry_paused(), (false, 1));
        // A later outage pauses again and is counted.
        assert_eq!(c.reap(t0 + secs(60)).await.unwrap(), 0);
        assert_eq!(c.expiry_paused(), (true, 2));
    }

    /// Review finding H2 of issue 16: one credential cannot register
    /// more than the cap of instances for its service; re-registering a
    /// known id is always allowed, other services are not affected.
    #[tokio::test]
    async fn a_service_at_its_instance_cap_gets_429_for_a_new_instance() {
        let c = controller(Arc::new(MemoryStore::new())).with_max_instances_per_service(3);
        for n in 0..3u16 {
            c.register(registration(&format!("o{n}"), "orders", 8081 + n), &admin())
                .await
                .unwrap();
        }
        let err = c
            .register(registration("o3", "orders", 8084), &admin())
            .await
            .unwrap_err();
        assert_eq!(
            err.status(),
            axum::http::StatusCode::TOO_MANY_REQUESTS,
            "{err}"
        );
        assert!(
            err.to_string().contains("--max-instances-per-service 3"),
            "{err}"
        );
        c.register(registration("o1", "orders", 8082), &admin())
            .await
            .expect("a known instance re-registers");
        c.register(registration("p0", "payments", 9000), &admin())
            .await
            .expect("another service is not capped by orders' instances");
    }

    #[tokio::test]
    async fn a_small_mesh_never_pauses() {
        let (c, t0) = registered(&["a", "b"]).await;
        assert_eq!(c.reap(t0 + secs(11)).await.unwrap(), 2);
        assert!(instances(&c).is_empty());
        assert_eq!(c.expiry_paused(), (false, 0));
        let c = controller(Arc::new(MemoryStore::new())).with_expiry_policy(ExpiryPolicy {
            pause_share: 0.5,
            min_instances: 5,
            ..ExpiryPolicy::default()
        });
        for (n, id) in ["a", "b", "c", "d"].iter().enumerate() {
            c.register(registration(id, "orders", 9000 + n as u16), &admin())
                .await
                .unwrap();
        }
        assert_eq!(c.reap(Instant::now() + secs(11)).await.unwrap(), 4);
        assert_eq!(c.expiry_paused(), (false, 0));
    }

    #[tokio::test]
    async fn failed_commit_changes_nothing() {
        let store = Arc::new(MemoryStore::new());
        let c = controller(store.clone());
        store.fail_commits(true);
        let err = c
            .register(registration("o1", "orders", 8081), &admin())
            .await
            .unwrap_err();
        assert!(matches!(err, ApiFailure::Store(_)));
        assert_eq!(c.published().revision, 0);
        assert!(c.last_heartbeat_ago("o1").is_none());
        store.fail_commits(false);
        assert_eq!(
            c.register(registration("o1", "orders", 8081), &admin())
                .await
                .unwrap()
                .revision,
            1
        );
    }

    #[tokio::test]
    async fn apply_checks_everything_first() {
        let c = controller(Arc::new(MemoryStore::new()));
        let file = |name: &str, text: &str| ApplyFile {
            name: name.into(),
            text: text.into(),
        };
        let request = |files| ApplyRequest {
            files,
            actor: Some("me@host".into()),
        };
        let bad = c
            .apply(
                request(vec![file("a.yaml", POLICY), file("b.yaml", "kind: Nope\n")]),
                "me@host",
            )
            .await
            .unwrap_err();
        assert!(
            matches!(bad, ApiFailure::BadRequest(ref m) if m.contains("b.yaml")),
            "{bad}"
        );
        let twice = c
            .apply(
                request(vec![file("a.yaml", POLICY), file("b.yaml", POLICY)]),
                "me@host",
            )
            .await
            .unwrap_err();
        assert_eq!(
            twice.to_string(),
            "healthcheckpolicy/p is defined in both a.yaml and b.yaml"
        );
        assert_eq!(c.published().revision, 0);
        let reply = c
            .apply(request(vec![file("a.yaml", POLICY)]), "me@host")
            .await
            .unwrap();
        assert_eq!(reply.revision, 1);
        assert_eq!(reply.outcomes[0].action, ApplyAction::Created);
        let reply = c
            .apply(request(vec![file("a.yaml", POLICY)]), "me@host")
            .await
            .unwrap();
        assert_eq!(reply.revision, 1);
        assert_eq!(reply.outcomes[0].action, ApplyAction::Unchanged);
        let history = c.history(10, false).await.unwrap();
        assert_eq!(history[0].actor, "me@host");
    }
}
