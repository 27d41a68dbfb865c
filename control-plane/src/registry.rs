//! The in-memory registry: registered instances, applied resources and the
//! current revision, and the *plans* that change them.
//!
//! Data flow: a request asks the registry for a [`Plan`] (`plan_*`), which
//! describes the next revision without changing anything: the store
//! [`Commit`] and the service and resource keys it touches. The controller
//! writes the commit to the store and only then calls [`Registry::apply`],
//! so memory never runs ahead of the disk. Everything here is synchronous
//! and pure, which is what the unit tests exercise.
//!
//! Resource plans (apply, delete, rollback) stage every change through one
//! function, so the store's puts and deletes, the before/after rollback
//! records and the keys pushed to watchers always agree.
//!
//! Applying a revision costs what it changed, not the size of the mesh:
//! the registry keeps the watchers' view of each service
//! ([`Registry::services`], one `Arc<ServiceEntry>` each) and rebuilds only
//! the services the revision touched (the instances of a service are
//! found through an index by service); the instances live in
//! [`Instances`] (shards shared with published revisions) and the
//! resources behind `Arc`s that a revision without resource changes does
//! not touch. So `push::Published` takes its view of a revision by cloning
//! `Arc`s, not the registry.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use meshlet_api::mesh::{
    ApplyAction, ApplyOutcome, EndpointEntry, MeshState, Registration, RevisionRecord,
    ServiceEntry, ServiceKey,
};
use meshlet_api::{Resource, ResourceKey};

use crate::instances::Instances;
use crate::store::{Commit, Loaded, ResourceChange, StoredInstance};
use meshlet_api::changes::{ChangeStamp, DeleteAction, DeleteOutcome};

/// The actor of revisions made by registrations, health changes and expiry.
pub const REGISTRY_ACTOR: &str = "registry";
/// The actor of revisions that change the trust bundle (CA rotation).
pub const CA_ACTOR: &str = "ca";

/// `spiffe://TD/ns/NS/sa/SERVICE`: what a registered instance's sidecar
/// presents (its certificate is signed for its token's namespace and
/// service, which registration checked are the instance's).
pub fn identity_uri(trust_domain: &str, namespace: &str, service: &str) -> Option<String> {
    if trust_domain.is_empty() {
        return None;
    }
    meshlet_api::identity::SpiffeId::new(trust_domain, namespace, service)
        .ok()
        .map(|id| id.to_string())
}

/// The next revision, not yet written or applied.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub commit: Commit,
    pub changes: Changes,
    /// The new trust bundle, when this revision changes it (CA rotation).
    pub trust_roots: Option<String>,
}

/// The keys one or more revisions touched (as watchers see them: a `Service`
/// resource changes a service, not a resource).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    pub services: BTreeSet<ServiceKey>,
    pub resources: BTreeSet<ResourceKey>,
    /// The trust bundle changed.
    pub trust_roots: bool,
}

impl Changes {
    pub fn extend(&mut self, other: &Changes) {
        self.services.extend(other.services.iter().cloned());
        self.resources.extend(other.resources.iter().cloned());
        self.trust_roots |= other.trust_roots;
    }
}

#[derive(Debug, Clone, Default)]
pub struct Registry {
    epoch: u64,
    revision: u64,
    instances: Instances,
    /// The ids of each service's registered instances.
    ids_by_service: BTreeMap<ServiceKey, BTreeSet<String>>,
    /// What watchers get of each service with endpoints (see
    /// [`Registry::services`]); kept current by [`Registry::apply`].
    services: BTreeMap<ServiceKey, Arc<ServiceEntry>>,
    resources: Arc<BTreeMap<ResourceKey, Resource>>,
    /// `resources` without the `Service`s (what watchers get).
    mesh_resources: Arc<BTreeMap<ResourceKey, Resource>>,
    /// The revision that last changed each resource (when recorded).
    last_changes: Arc<BTreeMap<ResourceKey, ChangeStamp>>,
    /// The SPIFFE trust domain of registered instances' identities (empty:
    /// no identities, as in unit tests without a CA).
    trust_domain: String,
    /// The mesh CA's trust bundle (PEM, signing root first).
    trust_roots: String,
}

/// What an apply of `resource` would do given the current `old` one.
pub fn classify(old: Option<&Resource>, resource: &Resource) -> ApplyAction {
    match old {
        None => ApplyAction::Created,
        Some(old) if old != resource => ApplyAction::Configured,
        Some(_) => ApplyAction::Unchanged,
    }
}

/// The resources right after an older revision: `current` with the
/// changes of every later revision (`changes`, oldest first) undone,
/// newest first.
pub fn rewind(
    current: &BTreeMap<ResourceKey, Resource>,
    changes: &[(u64, Vec<ResourceChange>)],
) -> BTreeMap<ResourceKey, Resource> {
    let mut set = current.clone();
    for (_, revision) in changes.iter().rev() {
        for change in revision.iter().rev() {
            match &change.before {
                Some(before) => set.insert(change.key.clone(), before.clone()),
                None => set.remove(&change.key),
            };
        }
    }
    set
}

impl Plan {
    /// Adds one resource change: `after` `None` deletes it.
    fn stage(&mut self, key: ResourceKey, before: Option<Resource>, after: Option<Resource>) {
        if key.kind == "Service" {
            self.changes.services.insert(ServiceKey {
                namespace: key.namespace.clone(),
                name: key.name.clone(),
            });
        } else {
            self.changes.resources.insert(key.clone());
        }
        match &after {
            Some(resource) => self.commit.put_resources.push(resource.clone()),
            None => self.commit.delete_resources.push(key.clone()),
        }
        self.commit
            .resource_changes
            .push(ResourceChange { key, before, after });
    }
}

/// `orders/orders-1`, or `orders.shop/orders-1` outside `default`.
fn instance_label(reg: &Registration) -> String {
    if reg.namespace == "default" {
        format!("{}/{}", reg.service, reg.id)
    } else {
        format!("{}.{}/{}", reg.service, reg.namespace, reg.id)
    }
}

fn service_key_of(reg: &Registration) -> ServiceKey {
    ServiceKey {
        namespace: reg.namespace.clone(),
        name: reg.service.clone(),
    }
}

impl Registry {
    pub fn from_loaded(loaded: Loaded) -> Registry {
        let mut registry = Registry {
            epoch: loaded.epoch,
            revision: loaded.revision,
            last_changes: Arc::new(loaded.last_changes),
            ..Registry::default()
        };
        for instance in loaded.instances {
            registry.put_instance(instance);
        }
        registry.resources = Arc::new(loaded.resources.into_iter().map(|r| (r.key(), r)).collect());
        registry.resources_changed();
        registry.rebuild_services();
        registry
    }

    /// Sets the trust domain (registered instances get SPIFFE identities)
    /// and the initial trust bundle (start-up, before the first publish).
    pub fn with_identity(mut self, trust_domain: &str, trust_roots: String) -> Registry {
        self.trust_domain = trust_domain.to_owned();
        self.trust_roots = trust_roots;
        self.rebuild_services();
        self
    }

    /// Adds (or replaces) an instance and indexes it by service.
    fn put_instance(&mut self, instance: StoredInstance) {
        let key = service_key_of(&instance.registration);
        let id = instance.registration.id.clone();
        if let Some(old) = self.instances.insert(instance) {
            self.unindex(&service_key_of(&old.registration), &id);
        }
        self.ids_by_service.entry(key).or_default().insert(id);
    }

    fn remove_instance(&mut self, id: &str) {
        if let Some(old) = self.instances.remove(id) {
            self.unindex(&service_key_of(&old.registration), id);
        }
    }

    fn unindex(&mut self, key: &ServiceKey, id: &str) {
        if let Some(ids) = self.ids_by_service.get_mut(key) {
            ids.remove(id);
            if ids.is_empty() {
                self.ids_by_service.remove(key);
            }
        }
    }

    /// Recomputes `mesh_resources` after `resources` changed.
    fn resources_changed(&mut self) {
        self.mesh_resources = Arc::new(
            self.resources
                .iter()
                .filter(|(_, r)| !matches!(r, Resource::Service(_)))
                .map(|(k, r)| (k.clone(), r.clone()))
                .collect(),
        );
    }

    /// Recomputes every service's entry (start-up).
    fn rebuild_services(&mut self) {
        let mut keys: BTreeSet<ServiceKey> = self.ids_by_service.keys().cloned().collect();
        for resource in self.resources.values() {
            if let Resource::Service(doc) = resource {
                keys.insert(ServiceKey {
                    namespace: doc.metadata.namespace.clone(),
                    name: doc.metadata.name.clone(),
                });
            }
        }
        self.services.clear();
        for key in keys {
            self.refresh_service(&key);
        }
    }

    /// Recomputes the entry of `key`: its registered instances merged with
    /// the static endpoints of its `Service` resource, endpoints sorted by
    /// address; no entry without endpoints.
    fn refresh_service(&mut self, key: &ServiceKey) {
        let mut endpoints = Vec::new();
        if let Some(ids) = self.ids_by_service.get(key) {
            let identity = identity_uri(&self.trust_domain, &key.namespace, &key.name);
            for id in ids {
                let Some(instance) = self.instances.get(id) else {
                    continue;
                };
                let reg = &instance.registration;
                endpoints.push(EndpointEntry {
                    address: reg.address,
                    labels: reg.labels.clone(),
                    healthy: reg.healthy,
                    instance_id: Some(reg.id.clone()),
                    identity: identity.clone(),
                });
            }
        }
        let resource_key = ResourceKey {
            kind: "Service".to_owned(),
            namespace: key.namespace.clone(),
            name: key.name.clone(),
        };
        if let Some(Resource::Service(doc)) = self.resources.get(&resource_key) {
            endpoints.extend(doc.spec.endpoints.iter().map(|ep| EndpointEntry {
                address: ep.address,
                labels: ep.labels.clone(),
                healthy: true,
                instance_id: None,
                identity: None,
            }));
        }
        if endpoints.is_empty() {
            self.services.remove(key);
            return;
        }
        endpoints.sort_by(|a, b| (a.address, &a.instance_id).cmp(&(b.address, &b.instance_id)));
        let entry = ServiceEntry {
            name: key.name.clone(),
            namespace: key.namespace.clone(),
            endpoints,
        };
        self.services.insert(key.clone(), Arc::new(entry));
    }

    /// Instances of `namespace/service` registered now.
    pub fn instance_count(&self, namespace: &str, service: &str) -> usize {
        let key = ServiceKey {
            namespace: namespace.to_owned(),
            name: service.to_owned(),
        };
        self.ids_by_service.get(&key).map_or(0, BTreeSet::len)
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn trust_roots(&self) -> &str {
        &self.trust_roots
    }

    /// The SPIFFE URI of a registered instance of `namespace/service`
    /// (`None` without a trust domain or for names SPIFFE refuses).
    pub fn identity(&self, namespace: &str, service: &str) -> Option<String> {
        identity_uri(&self.trust_domain, namespace, service)
    }

    /// A new trust bundle as one revision (`lines`: its history record);
    /// `None` when it is the current one.
    pub fn plan_trust_roots(&self, roots: String, lines: Vec<String>, now_ms: u64) -> Option<Plan> {
        if roots == self.trust_roots {
            return None;
        }
        let mut plan = self.plan(CA_ACTOR, now_ms, lines);
        plan.changes.trust_roots = true;
        plan.trust_roots = Some(roots);
        Some(plan)
    }

    pub fn last_changes(&self) -> &Arc<BTreeMap<ResourceKey, ChangeStamp>> {
        &self.last_changes
    }

    pub fn revision(&self) -> u64 {
        self.revision
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn instances(&self) -> &Instances {
        &self.instances
    }

    pub fn instance(&self, id: &str) -> Option<&StoredInstance> {
        self.instances.get(id)
    }

    pub fn resources(&self) -> &Arc<BTreeMap<ResourceKey, Resource>> {
        &self.resources
    }

    fn plan(&self, actor: &str, at_ms: u64, changes: Vec<String>) -> Plan {
        let revision = self.revision + 1;
        Plan {
            commit: Commit {
                revision,
                record: RevisionRecord {
                    revision,
                    at_ms,
                    actor: actor.to_owned(),
                    changes,
                },
                ..Commit::default()
            },
            changes: Changes::default(),
            trust_roots: None,
        }
    }

    /// Registers or replaces an instance. `None` when the same registration
    /// is already there (nothing changes).
    pub fn plan_register(&self, registration: Registration, now_ms: u64) -> Option<Plan> {
        let old = self.instances.get(&registration.id);
        if old.is_some_and(|o| o.registration == registration) {
            return None;
        }
        Some(self.plan_reregister(registration, now_ms))
    }

    /// Registers an instance even when the same registration is there
    /// (`--store etcd`: its lease ended, the key must be written again).
    pub fn plan_reregister(&self, registration: Registration, now_ms: u64) -> Plan {
        let old = self.instances.get(&registration.id);
        let line = format!(
            "registered {} at {}",
            instance_label(&registration),
            registration.address
        );
        let mut plan = self.plan(REGISTRY_ACTOR, now_ms, vec![line]);
        if let Some(old) = old {
            plan.changes
                .services
                .insert(service_key_of(&old.registration));
        }
        plan.changes.services.insert(service_key_of(&registration));
        plan.commit.put_instances.push(StoredInstance {
            registration,
            registered_at_ms: now_ms,
        });
        plan
    }

    /// A revision another control-plane replica committed (`--store
    /// etcd`), as a plan of this registry: the services and resources it
    /// touches, computed against the current state.
    pub fn plan_remote(&self, commit: Commit, trust_roots: Option<String>) -> Plan {
        let mut changes = Changes::default();
        for id in &commit.delete_instances {
            if let Some(old) = self.instances.get(id) {
                changes.services.insert(service_key_of(&old.registration));
            }
        }
        for instance in &commit.put_instances {
            if let Some(old) = self.instances.get(&instance.registration.id) {
                changes.services.insert(service_key_of(&old.registration));
            }
            changes
                .services
                .insert(service_key_of(&instance.registration));
        }
        let keys = commit
            .resource_changes
            .iter()
            .map(|c| c.key.clone())
            .chain(commit.delete_resources.iter().cloned())
            .chain(commit.put_resources.iter().map(Resource::key));
        for key in keys {
            if key.kind == "Service" {
                changes.services.insert(ServiceKey {
                    namespace: key.namespace.clone(),
                    name: key.name.clone(),
                });
            } else {
                changes.resources.insert(key);
            }
        }
        changes.trust_roots = trust_roots.is_some();
        Plan {
            commit,
            changes,
            trust_roots,
        }
    }

    /// Graceful deregistration; `None` for an unknown id.
    pub fn plan_deregister(&self, id: &str, now_ms: u64) -> Option<Plan> {
        let old = self.instances.get(id)?;
        let line = format!("deregistered {}", instance_label(&old.registration));
        let mut plan = self.plan(REGISTRY_ACTOR, now_ms, vec![line]);
        plan.changes
            .services
            .insert(service_key_of(&old.registration));
        plan.commit.delete_instances.push(id.to_owned());
        Some(plan)
    }

    /// A heartbeat whose health differs from the stored one; `None` when the
    /// id is unknown or the health is unchanged.
    pub fn plan_health(&self, id: &str, healthy: bool, now_ms: u64) -> Option<Plan> {
        let old = self.instances.get(id)?;
        if old.registration.healthy == healthy {
            return None;
        }
        let word = if healthy { "healthy" } else { "unhealthy" };
        let line = format!("{} {word}", instance_label(&old.registration));
        let mut plan = self.plan(REGISTRY_ACTOR, now_ms, vec![line]);
        plan.changes
            .services
            .insert(service_key_of(&old.registration));
        let mut updated = old.clone();
        updated.registration.healthy = healthy;
        plan.commit.put_instances.push(updated);
        Some(plan)
    }

    /// Removes expired instances in one revision; `None` if none of the ids
    /// is registered.
    pub fn plan_expire(&self, ids: &[String], now_ms: u64) -> Option<Plan> {
        let expired: Vec<&StoredInstance> =
            ids.iter().filter_map(|id| self.instances.get(id)).collect();
        if expired.is_empty() {
            return None;
        }
        let lines = expired
            .iter()
            .map(|i| format!("expired {}", instance_label(&i.registration)))
            .collect();
        let mut plan = self.plan(REGISTRY_ACTOR, now_ms, lines);
        for i in expired {
            plan.changes
                .services
                .insert(service_key_of(&i.registration));
            plan.commit.delete_instances.push(i.registration.id.clone());
        }
        Some(plan)
    }

    /// Applies resources (already parsed and checked for duplicates): one
    /// outcome per resource, and a plan if anything changed.
    pub fn plan_apply(
        &self,
        resources: Vec<Resource>,
        actor: &str,
        now_ms: u64,
    ) -> (Vec<ApplyOutcome>, Option<Plan>) {
        let mut plan = self.plan(actor, now_ms, Vec::new());
        let mut outcomes = Vec::with_capacity(resources.len());
        for resource in resources {
            let key = resource.key();
            let old = self.resources.get(&key);
            let action = classify(old, &resource);
            if action != ApplyAction::Unchanged {
                plan.commit.record.changes.push(format!("{action} {key}"));
                plan.stage(key.clone(), old.cloned(), Some(resource));
            }
            outcomes.push(ApplyOutcome { key, action });
        }
        let plan = (!plan.commit.resource_changes.is_empty()).then_some(plan);
        (outcomes, plan)
    }

    /// Deletes resources in one revision. A key that does not exist is an
    /// error naming every missing key (nothing is deleted) unless
    /// `ignore_not_found`, when its outcome is `NotFound`.
    pub fn plan_delete(
        &self,
        keys: Vec<ResourceKey>,
        ignore_not_found: bool,
        actor: &str,
        now_ms: u64,
    ) -> Result<(Vec<DeleteOutcome>, Option<Plan>), Vec<ResourceKey>> {
        let missing: Vec<ResourceKey> = keys
            .iter()
            .filter(|k| !self.resources.contains_key(k))
            .cloned()
            .collect();
        if !missing.is_empty() && !ignore_not_found {
            return Err(missing);
        }
        let mut plan = self.plan(actor, now_ms, Vec::new());
        let mut outcomes = Vec::with_capacity(keys.len());
        for key in keys {
            let action = match self.resources.get(&key) {
                Some(old) => {
                    plan.commit.record.changes.push(format!("deleted {key}"));
                    plan.stage(key.clone(), Some(old.clone()), None);
                    DeleteAction::Deleted
                }
                None => DeleteAction::NotFound,
            };
            outcomes.push(DeleteOutcome { key, action });
        }
        let plan = (!plan.commit.resource_changes.is_empty()).then_some(plan);
        Ok((outcomes, plan))
    }

    /// Makes the resources equal to `target` (the set right after an older
    /// revision, see [`rewind`]) in one revision; `None` when they already
    /// are. Change lines say what was re-created, configured or deleted.
    pub fn plan_rollback(
        &self,
        target: BTreeMap<ResourceKey, Resource>,
        actor: &str,
        now_ms: u64,
    ) -> Option<Plan> {
        let mut plan = self.plan(actor, now_ms, Vec::new());
        let keys: BTreeSet<&ResourceKey> = self.resources.keys().chain(target.keys()).collect();
        for key in keys {
            let old = self.resources.get(key);
            let new = target.get(key);
            let word = match (old, new) {
                (None, Some(_)) => "re-created",
                (Some(o), Some(n)) if o != n => "configured",
                (Some(_), None) => "deleted",
                _ => continue,
            };
            plan.commit.record.changes.push(format!("{word} {key}"));
            plan.stage(key.clone(), old.cloned(), new.cloned());
        }
        (!plan.commit.resource_changes.is_empty()).then_some(plan)
    }

    /// Makes a committed plan the current state.
    /// Makes a committed plan the current state. Costs what the plan
    /// changes: the touched instances, the touched services' entries, and
    /// the resource maps only when resources changed.
    pub fn apply(&mut self, plan: &Plan) {
        let commit = &plan.commit;
        for id in &commit.delete_instances {
            self.remove_instance(id);
        }
        for instance in &commit.put_instances {
            self.put_instance(instance.clone());
        }
        if !commit.delete_resources.is_empty() || !commit.put_resources.is_empty() {
            let resources = Arc::make_mut(&mut self.resources);
            for key in &commit.delete_resources {
                resources.remove(key);
            }
            for r in &commit.put_resources {
                resources.insert(r.key(), r.clone());
            }
            self.resources_changed();
        }
        if !commit.resource_changes.is_empty() {
            let last_changes = Arc::make_mut(&mut self.last_changes);
            for change in &commit.resource_changes {
                if change.after.is_some() {
                    let stamp = ChangeStamp::of(&commit.record);
                    last_changes.insert(change.key.clone(), stamp);
                } else {
                    last_changes.remove(&change.key);
                }
            }
        }
        if let Some(roots) = &plan.trust_roots {
            self.trust_roots = roots.clone();
        }
        // Every service whose endpoints a plan can change is in its
        // changes (they are what watchers are told changed).
        for key in &plan.changes.services {
            self.refresh_service(key);
        }
        self.revision = commit.revision;
    }

    /// Registered instances grouped by service, merged with the static
    /// endpoints of `Service` resources; endpoints sorted by address,
    /// services without endpoints left out.
    pub fn services(&self) -> &BTreeMap<ServiceKey, Arc<ServiceEntry>> {
        &self.services
    }

    /// The resources watchers get: every kind except `Service` (whose
    /// endpoints are merged into the services).
    pub fn mesh_resources(&self) -> &Arc<BTreeMap<ResourceKey, Resource>> {
        &self.mesh_resources
    }

    pub fn mesh_state(&self) -> MeshState {
        MeshState {
            epoch: self.epoch,
            revision: self.revision,
            services: self.services.values().map(|s| (**s).clone()).collect(),
            resources: self.mesh_resources.values().cloned().collect(),
            trust_roots: self.trust_roots.clone(),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn registration(id: &str, service: &str, port: u16) -> Registration {
        Registration {
            id: id.into(),
            service: service.into(),
            namespace: "default".into(),
            address: ([127, 0, 0, 1], port).into(),
            labels: BTreeMap::new(),
            healthy: true,
            app_protocol: None,
            role: meshlet_api::mesh::InstanceRole::Sidecar,
        }
    }

    pub(crate) fn parse(text: &str) -> Vec<Resource> {
        meshlet_api::parse_documents("t.yaml", text).unwrap()
    }

    pub(crate) fn policy(name: &str, interval: &str) -> Resource {
        parse(&format!(
            "apiVersion: meshlet.dev/v1alpha1\nkind: HealthCheckPolicy\nmetadata: {{name: {name}}}\nspec: {{targetRef: {{service: orders}}, interval: {interval}}}\n"
        ))
        .remove(0)
    }

    pub(crate) fn run(
        registry: &mut Registry,
        plan: impl FnOnce(&Registry) -> Option<Plan>,
    ) -> Option<Plan> {
        let plan = plan(registry);
        if let Some(p) = &plan {
            registry.apply(p);
        }
        plan
    }

    #[test]
    fn register_creates_revisions_and_groups_services() {
        let mut r = Registry::default();
        let p = run(&mut r, |r| {
            r.plan_register(registration("o1", "orders", 8082), 1)
        })
        .unwrap();
        assert_eq!(p.commit.revision, 1);
        assert_eq!(
            p.commit.record.changes,
            ["registered orders/o1 at 127.0.0.1:8082"]
        );
        assert_eq!(p.commit.record.actor, "registry");
        run(&mut r, |r| {
            r.plan_register(registration("o2", "orders", 8081), 2)
        });
        run(&mut r, |r| {
            r.plan_register(registration("p1", "payments", 9000), 3)
        });
        assert_eq!(r.revision(), 3);
        let state = r.mesh_state();
        assert_eq!(state.services.len(), 2);
        let orders = &state.services[0];
        assert_eq!(orders.name, "orders");
        let ports: Vec<u16> = orders.endpoints.iter().map(|e| e.address.port()).collect();
        assert_eq!(ports, [8081, 8082], "sorted by address");
        assert_eq!(orders.endpoints[0].instance_id.as_deref(), Some("o2"));
        // The same registration again changes nothing.
        assert!(r
            .plan_register(registration("o1", "orders", 8082), 4)
            .is_none());
        // A changed one replaces the old one.
        let p = run(&mut r, |r| {
            r.plan_register(registration("o1", "orders", 8083), 5)
        })
        .unwrap();
        assert_eq!(p.commit.revision, 4);
        assert_eq!(r.instances().len(), 3);
    }

    #[test]
    fn heartbeat_health_changes_only_when_different() {
        let mut r = Registry::default();
        run(&mut r, |r| {
            r.plan_register(registration("o1", "orders", 8081), 1)
        });
        assert!(r.plan_health("o1", true, 2).is_none(), "unchanged health");
        assert!(r.plan_health("nope", false, 2).is_none(), "unknown id");
        let p = run(&mut r, |r| r.plan_health("o1", false, 2)).unwrap();
        assert_eq!(p.commit.revision, 2);
        assert_eq!(p.commit.record.changes, ["orders/o1 unhealthy"]);
        assert!(!r.mesh_state().services[0].endpoints[0].healthy);
        assert!(!r.instance("o1").unwrap().registration.healthy);
        assert_eq!(r.instance("o1").unwrap().registered_at_ms, 1);
    }

    #[test]
    fn expiry_and_deregistration_remove_empty_services() {
        let mut r = Registry::default();
        run(&mut r, |r| {
            r.plan_register(registration("o1", "orders", 8081), 1)
        });
        run(&mut r, |r| {
            r.plan_register(registration("o2", "orders", 8082), 1)
        });
        run(&mut r, |r| {
            r.plan_register(registration("p1", "payments", 9000), 1)
        });
        let p = run(&mut r, |r| {
            r.plan_expire(&["o1".into(), "p1".into(), "x".into()], 2)
        })
        .unwrap();
        assert_eq!(p.commit.revision, 4, "one revision per reaping pass");
        assert_eq!(
            p.commit.record.changes,
            ["expired orders/o1", "expired payments/p1"]
        );
        let names: Vec<_> = r
            .mesh_state()
            .services
            .into_iter()
            .map(|s| s.name)
            .collect();
        assert_eq!(names, ["orders"]);
        assert!(r.plan_expire(&["x".into()], 3).is_none());
        let p = run(&mut r, |r| r.plan_deregister("o2", 3)).unwrap();
        assert_eq!(p.commit.record.changes, ["deregistered orders/o2"]);
        assert!(r.mesh_state().services.is_empty());
        assert!(r.plan_deregister("o2", 4).is_none());
    }

    #[test]
    fn apply_created_configured_unchanged() {
        let mut r = Registry::default();
        let (outcomes, plan) = r.plan_apply(vec![policy("a", "1s"), policy("b", "1s")], "me@h", 1);
        assert!(outcomes.iter().all(|o| o.action == ApplyAction::Created));
        let plan = run(&mut r, |_| plan).unwrap();
        assert_eq!(plan.commit.record.actor, "me@h");
        assert_eq!(
            plan.commit.record.changes,
            ["created healthcheckpolicy/a", "created healthcheckpolicy/b"]
        );
        let (outcomes, plan) = r.plan_apply(vec![policy("a", "2s"), policy("b", "1s")], "me@h", 2);
        let actions: Vec<_> = outcomes.iter().map(|o| o.action).collect();
        assert_eq!(actions, [ApplyAction::Configured, ApplyAction::Unchanged]);
        let plan = run(&mut r, |_| plan).unwrap();
        assert_eq!(plan.commit.revision, 2);
        assert_eq!(
            plan.commit.record.changes,
            ["configured healthcheckpolicy/a"]
        );
        let (outcomes, plan) = r.plan_apply(vec![policy("a", "2s")], "me@h", 3);
        assert_eq!(outcomes[0].action, ApplyAction::Unchanged);
        assert!(plan.is_none(), "nothing changed, no revision");
        assert_eq!(r.revision(), 2);
    }

    #[test]
    fn delete_is_all_or_nothing() {
        let mut r = Registry::default();
        run(&mut r, |r| {
            r.plan_apply(vec![policy("a", "1s"), policy("b", "1s")], "me", 1)
                .1
        });
        let a = policy("a", "1s").key();
        let nope = policy("nope", "1s").key();
        let missing = r
            .plan_delete(vec![a.clone(), nope.clone()], false, "me", 2)
            .unwrap_err();
        assert_eq!(missing, std::slice::from_ref(&nope));
        let (outcomes, plan) = r.plan_delete(vec![a.clone(), nope], true, "me", 2).unwrap();
        let actions: Vec<_> = outcomes.iter().map(|o| o.action).collect();
        assert_eq!(actions, [DeleteAction::Deleted, DeleteAction::NotFound]);
        let plan = run(&mut r, |_| plan).unwrap();
        assert_eq!(plan.commit.record.changes, ["deleted healthcheckpolicy/a"]);
        assert_eq!(plan.commit.delete_resources, std::slice::from_ref(&a));
        assert_eq!(plan.commit.resource_changes[0].after, None);
        assert!(plan.changes.resources.contains(&a));
        assert_eq!(r.resources().len(), 1);
        assert!(!r.last_changes().contains_key(&a));
        let (_, plan) = r.plan_delete(vec![a], true, "me", 3).unwrap();
        assert!(plan.is_none(), "nothing deleted, no revision");
    }

    #[test]
    fn rollback_recreates_configures_and_deletes() {
        let mut r = Registry::default();
        let mut log = Vec::new();
        let mut step = |r: &mut Registry, plan: Option<Plan>| {
            let plan = run(r, |_| plan).unwrap();
            log.push((plan.commit.revision, plan.commit.resource_changes.clone()));
        };
        let p = r
            .plan_apply(vec![policy("a", "1s"), policy("b", "1s")], "me", 1)
            .1;
        step(&mut r, p); // 1: a, b
        let p = r
            .plan_apply(vec![policy("a", "2s"), policy("c", "1s")], "me", 2)
            .1;
        step(&mut r, p); // 2: a configured, c created
        let b = policy("b", "1s").key();
        let p = r.plan_delete(vec![b], false, "me", 3).unwrap().1;
        step(&mut r, p); // 3: b deleted
        let after_1: Vec<_> = log[1..].to_vec();
        let target = rewind(r.resources(), &after_1);
        let plan = r.plan_rollback(target, "rollback to 1 by me", 4).unwrap();
        assert_eq!(
            plan.commit.record.changes,
            [
                "configured healthcheckpolicy/a",
                "re-created healthcheckpolicy/b",
                "deleted healthcheckpolicy/c"
            ]
        );
        assert_eq!(plan.commit.record.actor, "rollback to 1 by me");
        run(&mut r, |_| Some(plan));
        let now: Vec<_> = r.resources().values().cloned().collect();
        assert_eq!(now, [policy("a", "1s"), policy("b", "1s")]);
        assert_eq!(r.last_changes()[&policy("a", "1s").key()].revision, 4);
        // Already equal: nothing to roll back.
        assert!(r.plan_rollback((**r.resources()).clone(), "x", 5).is_none());
    }

    #[test]
    fn diff_classification() {
        let a = policy("a", "1s");
        assert_eq!(classify(None, &a), ApplyAction::Created);
        assert_eq!(classify(Some(&a), &a), ApplyAction::Unchanged);
        assert_eq!(
            classify(Some(&policy("a", "2s")), &a),
            ApplyAction::Configured
        );
    }

    #[test]
    fn static_services_merge_with_registrations() {
        let mut r = Registry::default();
        run(&mut r, |r| {
            r.plan_register(registration("o1", "orders", 8082), 1)
        });
        let service = parse(
            "apiVersion: meshlet.dev/v1alpha1\nkind: Service\nmetadata: {name: orders}\nspec:\n  endpoints:\n  - address: 127.0.0.1:8081\n",
        );
        let plan = run(&mut r, |r| r.plan_apply(service, "me", 2).1).unwrap();
        assert!(plan.changes.resources.is_empty());
        assert_eq!(plan.changes.services.len(), 1);
        r.plan_apply(vec![policy("a", "1s")], "me", 3);
        let state = r.mesh_state();
        assert_eq!(state.services[0].endpoints.len(), 2);
        assert_eq!(state.services[0].endpoints[0].instance_id, None);
        assert!(
            state.resources.is_empty(),
            "Service resources are not listed"
        );
        assert_eq!(r.resources().len(), 1);
    }
}
