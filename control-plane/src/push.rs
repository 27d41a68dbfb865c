//! Publishing revisions to watchers (`GET /api/v1/watch`).
//!
//! Data flow: after a revision is committed to the store and applied to the
//! registry, the controller builds an immutable [`Published`] view of it
//! (services, resources, instances, and the delta from the previous revision
//! serialized *once* as an NDJSON line) and [`Hub::publish`]es it on a tokio
//! `watch` channel. Each watcher stream ([`watch_stream`]) wakes up, and if
//! it holds the previous revision, writes the shared delta bytes; if it fell
//! behind, it asks the [`ChangeLog`] which keys changed since its revision
//! and builds a delta from that, or falls back to a snapshot (itself
//! serialized at most once per revision). Keepalive lines fill silences.
//!
//! A `Published` shares the registry's data instead of copying it: the
//! services' entries, the resource maps and the instance shards are
//! `Arc`s, so publishing a revision costs the keys it changed, however
//! large the mesh (see `registry` and `instances`).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use meshlet_api::changes::ChangeStamp;
use meshlet_api::mesh::{MeshDelta, MeshState, ServiceEntry, ServiceKey, WatchEvent};
use meshlet_api::{Resource, ResourceKey};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::instances::Instances;
use crate::registry::{Changes, Registry};

/// How many revisions' changed keys are kept for resuming watchers.
pub const CHANGE_LOG_LEN: usize = 1024;

/// One revision as readers and watchers see it. Immutable once published.
#[derive(Debug)]
pub struct Published {
    pub epoch: u64,
    pub revision: u64,
    pub services: BTreeMap<ServiceKey, Arc<ServiceEntry>>,
    /// Resources watchers get (every kind but `Service`).
    pub mesh_resources: Arc<BTreeMap<ResourceKey, Resource>>,
    /// Every applied resource, `Service`s included.
    pub resources: Arc<BTreeMap<ResourceKey, Resource>>,
    pub instances: Instances,
    /// The revision that last changed each resource.
    pub last_changes: Arc<BTreeMap<ResourceKey, ChangeStamp>>,
    /// The mesh CA's trust bundle (PEM, signing root first).
    pub trust_roots: String,
    /// The SPIFFE trust domain of instances' identities (empty: none).
    pub trust_domain: String,
    /// The delta from `revision - 1`, as one NDJSON line.
    delta_line: Option<Bytes>,
    snapshot_line: OnceLock<Bytes>,
}

/// Serializes an event as one line. Our types always serialize; should one
/// ever not, the watcher gets an empty line instead of a broken stream.
fn line(event: &WatchEvent) -> Bytes {
    let mut bytes = serde_json::to_vec(event).unwrap_or_else(|err| {
        tracing::error!(error = %err, "cannot serialize a watch event");
        Vec::new()
    });
    bytes.push(b'\n');
    Bytes::from(bytes)
}

impl Published {
    /// Every service key: registered or static (even without endpoints).
    pub fn service_keys(&self) -> BTreeSet<ServiceKey> {
        let mut keys: BTreeSet<ServiceKey> = self.services.keys().cloned().collect();
        for resource in self.resources.values() {
            if let Resource::Service(doc) = resource {
                keys.insert(ServiceKey {
                    namespace: doc.metadata.namespace.clone(),
                    name: doc.metadata.name.clone(),
                });
            }
        }
        keys
    }

    /// The view of `registry`; `changes` are the keys its latest revision
    /// touched (`None` at start, when there is no previous revision here).
    pub fn new(registry: &Registry, changes: Option<&Changes>) -> Published {
        let mut published = Published {
            epoch: registry.epoch(),
            revision: registry.revision(),
            services: registry.services().clone(),
            mesh_resources: registry.mesh_resources().clone(),
            resources: registry.resources().clone(),
            instances: registry.instances().clone(),
            last_changes: registry.last_changes().clone(),
            trust_roots: registry.trust_roots().to_owned(),
            trust_domain: registry.trust_domain().to_owned(),
            delta_line: None,
            snapshot_line: OnceLock::new(),
        };
        if let Some(changes) = changes {
            let delta = published.delta(published.revision.saturating_sub(1), changes);
            published.delta_line = Some(line(&WatchEvent::Delta(delta)));
        }
        published
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

    /// The delta from `from` to this revision, given the keys that changed
    /// in between: current values in full, vanished keys as removed.
    pub fn delta(&self, from: u64, changes: &Changes) -> MeshDelta {
        let mut delta = MeshDelta {
            from_revision: from,
            revision: self.revision,
            ..MeshDelta::default()
        };
        for key in &changes.services {
            match self.services.get(key) {
                Some(s) => delta.services.push((**s).clone()),
                None => delta.removed_services.push(key.clone()),
            }
        }
        for key in &changes.resources {
            match self.mesh_resources.get(key) {
                Some(r) => delta.resources.push(r.clone()),
                None => delta.removed_resources.push(key.clone()),
            }
        }
        if changes.trust_roots {
            delta.trust_roots = Some(self.trust_roots.clone());
        }
        delta
    }

    /// The snapshot line, serialized on first use and shared afterwards.
    pub fn snapshot_line(&self) -> Bytes {
        self.snapshot_line
            .get_or_init(|| line(&WatchEvent::Snapshot(self.mesh_state())))
            .clone()
    }
}

/// The changed keys of the last [`CHANGE_LOG_LEN`] revisions (contiguous).
#[derive(Debug, Default)]
pub struct ChangeLog {
    entries: VecDeque<(u64, Changes)>,
}

impl ChangeLog {
    pub fn push(&mut self, revision: u64, changes: Changes) {
        if self.entries.back().is_some_and(|(r, _)| *r + 1 != revision) {
            self.entries.clear();
        }
        self.entries.push_back((revision, changes));
        while self.entries.len() > CHANGE_LOG_LEN {
            self.entries.pop_front();
        }
    }

    /// The union of the changes of revisions `from+1..=to`, or `None` when
    /// the log does not cover all of them.
    pub fn since(&self, from: u64, to: u64) -> Option<Changes> {
        let (first, _) = self.entries.front()?;
        let (last, _) = self.entries.back()?;
        if from + 1 < *first || to > *last || from >= to {
            return None;
        }
        let mut union = Changes::default();
        for (_, changes) in self.entries.iter().filter(|(r, _)| *r > from && *r <= to) {
            union.extend(changes);
        }
        Some(union)
    }
}

/// The current [`Published`] revision and the change log.
pub struct Hub {
    current: watch::Sender<Arc<Published>>,
    log: Mutex<ChangeLog>,
    /// Until then, watchers from another epoch wait for their snapshot.
    warmup_until: Instant,
    /// Snapshots and deltas written to watchers (keepalives not counted).
    pushes: AtomicU64,
    /// The published revision, for observers (dashboard events, stats).
    revisions: watch::Sender<u64>,
}

impl Hub {
    pub fn new(initial: Published) -> Hub {
        Self::with_warmup(initial, Duration::ZERO)
    }

    /// A hub that makes watchers from another epoch (sidecars that held a
    /// revision of a store this control plane does not have: its data was
    /// lost) wait `warmup` from now before their first snapshot. By then
    /// those sidecars' heartbeats have been answered 404 and they have
    /// registered again, so they are not sent a registry emptied by the
    /// loss — a push that would make every sidecar drop every endpoint.
    pub fn with_warmup(initial: Published, warmup: Duration) -> Hub {
        Hub {
            revisions: watch::Sender::new(initial.revision),
            current: watch::Sender::new(Arc::new(initial)),
            log: Mutex::new(ChangeLog::default()),
            warmup_until: Instant::now() + warmup,
            pushes: AtomicU64::new(0),
        }
    }

    /// Open watch streams (each holds one receiver of the channel).
    pub fn watchers(&self) -> usize {
        self.current.receiver_count()
    }

    /// Snapshots and deltas sent to watchers since start.
    pub fn pushes(&self) -> u64 {
        self.pushes.load(Ordering::Relaxed)
    }

    /// Counts one snapshot or delta on its way to a watcher.
    fn pushed(&self, line: Bytes) -> Bytes {
        self.pushes.fetch_add(1, Ordering::Relaxed);
        line
    }

    /// A receiver that sees each newly published revision number, for
    /// observers other than watch streams (not counted in [`Hub::watchers`]).
    pub fn revisions(&self) -> watch::Receiver<u64> {
        self.revisions.subscribe()
    }

    pub fn current(&self) -> Arc<Published> {
        self.current.borrow().clone()
    }

    /// Publishes a new revision (the log first, so a watcher that sees the
    /// revision finds its changes).
    pub fn publish(&self, published: Published, changes: Changes) {
        self.log.lock().unwrap().push(published.revision, changes);
        let revision = published.revision;
        self.current.send_replace(Arc::new(published));
        self.revisions.send_replace(revision);
    }

    /// What a watcher holding `held` needs to reach `published`: nothing,
    /// one delta or a snapshot.
    pub fn catch_up(&self, held: Option<u64>, published: &Published) -> Option<Bytes> {
        let Some(held) = held else {
            return Some(published.snapshot_line());
        };
        if held == published.revision {
            return None;
        }
        if held + 1 == published.revision {
            if let Some(line) = &published.delta_line {
                return Some(line.clone());
            }
        }
        let changes = self.log.lock().unwrap().since(held, published.revision);
        match changes {
            Some(changes) => Some(line(&WatchEvent::Delta(published.delta(held, &changes)))),
            None => Some(published.snapshot_line()),
        }
    }
}

enum Wake {
    Changed,
    Keepalive,
}

/// Resolves once `shutdown` is true (or its sender is gone).
pub async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

struct Watcher {
    hub: Arc<Hub>,
    rx: watch::Receiver<Arc<Published>>,
    held: u64,
    first: Option<Bytes>,
    /// Set for a watcher from another epoch during the warm-up.
    snapshot_after: Option<Instant>,
    keepalive: Duration,
    next_keepalive: Instant,
    shutdown: watch::Receiver<bool>,
}

/// The NDJSON body of one watch request. `requested` is the revision the
/// watcher holds (`None` or 0: none) and `requested_epoch` the epoch of the
/// store it came from (`None`: not checked). Ends when `shutdown` becomes
/// true.
pub fn watch_stream(
    hub: Arc<Hub>,
    requested: Option<u64>,
    requested_epoch: Option<u64>,
    keepalive: Duration,
    shutdown: watch::Receiver<bool>,
) -> impl Stream<Item = Result<Bytes, Infallible>> + Send + 'static {
    let watcher = Watcher::start(hub, requested, requested_epoch, keepalive, shutdown);
    futures_util::stream::unfold(watcher, |mut w| async move {
        let line = w.next_line().await?;
        Some((Ok(line), w))
    })
}

impl Watcher {
    /// Where a new watcher starts: resumed from the revision it holds, or
    /// a snapshot, or (from another store during the warm-up) nothing yet.
    fn start(
        hub: Arc<Hub>,
        requested: Option<u64>,
        requested_epoch: Option<u64>,
        keepalive: Duration,
        shutdown: watch::Receiver<bool>,
    ) -> Watcher {
        let mut rx = hub.current.subscribe();
        let current = rx.borrow_and_update().clone();
        // A revision of another store must not be resumed: same numbers,
        // different history.
        let foreign = requested.is_some_and(|r| r != 0)
            && requested_epoch.is_some_and(|e| e != current.epoch);
        // A revision from the future (the control plane lost state) or 0 gets a
        // snapshot, like a revision too old for the log.
        let held = requested.filter(|r| *r != 0 && *r <= current.revision && !foreign);
        let warming_up = foreign && Instant::now() < hub.warmup_until;
        let first = if warming_up {
            None
        } else {
            hub.catch_up(held, &current)
        };
        Watcher {
            rx,
            held: current.revision,
            first,
            snapshot_after: warming_up.then_some(hub.warmup_until),
            hub,
            keepalive,
            next_keepalive: Instant::now() + keepalive,
            shutdown,
        }
    }

    /// The next line of the stream; `None` ends it (shutdown, or the hub
    /// is gone).
    async fn next_line(&mut self) -> Option<Bytes> {
        if let Some(first) = self.first.take() {
            self.next_keepalive = Instant::now() + self.keepalive;
            return Some(self.hub.pushed(first));
        }
        if let Some(at) = self.snapshot_after {
            return self.after_warmup(at).await;
        }
        self.next_change().await
    }

    /// A watcher from a lost store: keep it waiting (with keepalives)
    /// until the warm-up is over at `at`, then send the whole state.
    async fn after_warmup(&mut self, at: Instant) -> Option<Bytes> {
        let wake = tokio::select! {
            biased;
            _ = stopped(&mut self.shutdown) => return None,
            _ = tokio::time::sleep_until(at) => None,
            _ = tokio::time::sleep_until(self.next_keepalive) => {
                Some(line(&WatchEvent::Keepalive { revision: 0 }))
            }
        };
        self.next_keepalive = Instant::now() + self.keepalive;
        if let Some(keepalive) = wake {
            return Some(keepalive);
        }
        self.snapshot_after = None;
        let published = self.rx.borrow_and_update().clone();
        self.held = published.revision;
        Some(self.hub.pushed(published.snapshot_line()))
    }

    /// The delta up to the next published revision, or a keepalive when
    /// none comes within the keepalive interval.
    async fn next_change(&mut self) -> Option<Bytes> {
        loop {
            let woke = tokio::select! {
                biased;
                _ = stopped(&mut self.shutdown) => return None,
                changed = self.rx.changed() => match changed {
                    Ok(()) => Wake::Changed,
                    Err(_) => return None,
                },
                _ = tokio::time::sleep_until(self.next_keepalive) => Wake::Keepalive,
            };
            let out = match woke {
                Wake::Changed => {
                    let published = self.rx.borrow_and_update().clone();
                    let out = self.hub.catch_up(Some(self.held), &published);
                    self.held = published.revision;
                    out.map(|line| self.hub.pushed(line))
                }
                Wake::Keepalive => Some(line(&WatchEvent::Keepalive {
                    revision: self.held,
                })),
            };
            if let Some(bytes) = out {
                self.next_keepalive = Instant::now() + self.keepalive;
                return Some(bytes);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::tests::{policy, registration, run};
    use crate::registry::Plan;
    use futures_util::StreamExt;

    fn decode(bytes: &Bytes) -> WatchEvent {
        assert!(bytes.ends_with(b"\n"));
        serde_json::from_slice(bytes).unwrap()
    }

    /// A registry with a few revisions, published one by one.
    fn setup() -> (Registry, Hub, Vec<MeshState>) {
        let mut r = Registry::default();
        let hub = Hub::new(Published::new(&r, None));
        let mut states = vec![r.mesh_state()];
        let mut step = |r: &mut Registry, plan: &dyn Fn(&Registry) -> Option<Plan>| {
            let plan = run(r, plan).unwrap();
            hub.publish(Published::new(r, Some(&plan.changes)), plan.changes);
            states.push(r.mesh_state());
        };
        step(&mut r, &|r: &Registry| {
            r.plan_register(registration("o1", "orders", 8081), 1)
        });
        step(&mut r, &|r: &Registry| {
            r.plan_register(registration("o2", "orders", 8082), 1)
        });
        step(&mut r, &|r: &Registry| {
            r.plan_register(registration("p1", "payments", 9000), 1)
        });
        step(&mut r, &|r: &Registry| {
            r.plan_apply(vec![policy("a", "1s")], "me", 2).1
        });
        step(&mut r, &|r: &Registry| r.plan_health("o1", false, 3));
        step(&mut r, &|r: &Registry| r.plan_expire(&["p1".into()], 4));
        (r, hub, states)
    }

    #[test]
    fn a_new_trust_bundle_is_one_revision_in_deltas_and_snapshots() {
        let mut r = Registry::default().with_identity("meshlet.local", "OLD\n".into());
        let hub = Hub::new(Published::new(&r, None));
        let plan = run(&mut r, |r| {
            r.plan_register(registration("o1", "orders", 8081), 1)
        })
        .unwrap();
        hub.publish(Published::new(&r, Some(&plan.changes)), plan.changes);
        let endpoint = &r.mesh_state().services[0].endpoints[0];
        assert_eq!(
            endpoint.identity.as_deref(),
            Some("spiffe://meshlet.local/ns/default/sa/orders")
        );
        assert!(
            r.plan_trust_roots("OLD\n".into(), vec![], 2).is_none(),
            "unchanged: no revision"
        );
        let lines = vec!["CA rotation phase 1".to_owned()];
        let plan = run(&mut r, |r| {
            r.plan_trust_roots("OLD\nNEW\n".into(), lines, 2)
        })
        .unwrap();
        assert_eq!(plan.commit.record.actor, crate::registry::CA_ACTOR);
        hub.publish(Published::new(&r, Some(&plan.changes)), plan.changes);
        let current = hub.current();
        assert_eq!(current.revision, 2);
        let WatchEvent::Delta(delta) = decode(&hub.catch_up(Some(1), &current).unwrap()) else {
            panic!("expected a delta");
        };
        assert_eq!(delta.trust_roots.as_deref(), Some("OLD\nNEW\n"));
        assert!(delta.services.is_empty());
        // Resumed from before both revisions (one combined delta), and from nothing.
        let WatchEvent::Delta(delta) = decode(&hub.catch_up(Some(0), &current).unwrap()) else {
            panic!("expected a delta");
        };
        assert_eq!(delta.trust_roots.as_deref(), Some("OLD\nNEW\n"));
        let WatchEvent::Snapshot(s) = decode(&hub.catch_up(None, &current).unwrap()) else {
            panic!("expected a snapshot");
        };
        assert_eq!(s.trust_roots, "OLD\nNEW\n");
    }

    #[test]
    fn resuming_from_any_revision_equals_the_snapshot() {
        let (r, hub, states) = setup();
        let current = hub.current();
        assert_eq!(current.revision, 6);
        let snapshot = current.mesh_state();
        assert_eq!(snapshot, r.mesh_state());
        for (from, old) in states.iter().enumerate().take(6).skip(1) {
            let mut state = old.clone();
            let event = decode(&hub.catch_up(Some(from as u64), &current).unwrap());
            assert!(matches!(event, WatchEvent::Delta(_)), "from {from}");
            state.apply(event).unwrap();
            assert_eq!(state, snapshot, "resumed from {from}");
        }
        assert!(hub.catch_up(Some(6), &current).is_none());
    }

    #[test]
    fn delta_lists_removed_keys() {
        let (_, hub, _) = setup();
        let current = hub.current();
        // p1 (the only payments instance) expired in revision 6.
        let WatchEvent::Delta(delta) = decode(&hub.catch_up(Some(2), &current).unwrap()) else {
            panic!("expected a delta");
        };
        assert_eq!(delta.from_revision, 2);
        assert_eq!(delta.revision, 6);
        assert_eq!(delta.removed_services.len(), 1);
        assert_eq!(delta.removed_services[0].name, "payments");
        assert_eq!(delta.services.len(), 1, "orders changed health");
        assert_eq!(delta.resources.len(), 1);
        // The per-revision delta is the shared line.
        let WatchEvent::Delta(last) = decode(&hub.catch_up(Some(5), &current).unwrap()) else {
            panic!("expected a delta");
        };
        assert_eq!(last.from_revision, 5);
        assert_eq!(last.removed_services.len(), 1);
        assert!(last.services.is_empty());
    }

    #[test]
    fn old_or_unknown_revisions_get_a_snapshot() {
        let (_, hub, _) = setup();
        let current = hub.current();
        assert!(matches!(
            decode(&hub.catch_up(None, &current).unwrap()),
            WatchEvent::Snapshot(_)
        ));
        // Not covered by the log: a fresh log after a restart.
        let mut log = ChangeLog::default();
        log.push(10, Changes::default());
        assert!(log.since(5, 10).is_none());
        assert!(log.since(9, 10).is_some());
        assert!(log.since(9, 11).is_none());
        // A log that dropped its oldest entries.
        let mut log = ChangeLog::default();
        for r in 1..=(CHANGE_LOG_LEN as u64 + 10) {
            log.push(r, Changes::default());
        }
        assert!(log.since(1, 20).is_none());
        assert!(log.since(10, 20).is_some());
    }

    #[tokio::test]
    async fn stream_sends_snapshot_then_deltas_and_ends_on_shutdown() {
        let (mut r, hub, _) = setup();
        let hub = Arc::new(hub);
        let (stop, stopped) = watch::channel(false);
        let mut stream = Box::pin(watch_stream(
            hub.clone(),
            Some(0),
            None,
            Duration::from_secs(60),
            stopped.clone(),
        ));
        let first = decode(&stream.next().await.unwrap().unwrap());
        assert!(matches!(first, WatchEvent::Snapshot(ref s) if s.revision == 6));
        // A watcher that is up to date gets nothing until the next change.
        let mut current = Box::pin(watch_stream(
            hub.clone(),
            Some(6),
            None,
            Duration::from_secs(60),
            stopped,
        ));
        let plan = run(&mut r, |r| r.plan_deregister("o2", 5)).unwrap();
        hub.publish(Published::new(&r, Some(&plan.changes)), plan.changes);
        for s in [&mut stream, &mut current] {
            let WatchEvent::Delta(d) = decode(&s.next().await.unwrap().unwrap()) else {
                panic!("expected a delta");
            };
            assert_eq!((d.from_revision, d.revision), (6, 7));
        }
        stop.send_replace(true);
        assert!(stream.next().await.is_none());
        assert!(current.next().await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn keepalive_after_silence() {
        let (_, hub, _) = setup();
        let (_stop, stopped) = watch::channel(false);
        let mut stream = Box::pin(watch_stream(
            Arc::new(hub),
            Some(6),
            None,
            Duration::from_secs(5),
            stopped,
        ));
        let event = decode(&stream.next().await.unwrap().unwrap());
        assert_eq!(event, WatchEvent::Keepalive { revision: 6 });
    }

    #[tokio::test(start_paused = true)]
    async fn a_watcher_from_another_epoch_waits_out_the_warm_up_then_gets_a_snapshot() {
        let (r, _, _) = setup();
        let epoch = r.epoch();
        let hub = Arc::new(Hub::with_warmup(
            Published::new(&r, None),
            Duration::from_secs(4),
        ));
        let (_stop, stopped) = watch::channel(false);
        // Same revision number, another store: no delta, and no snapshot
        // before the warm-up is over (keepalives meanwhile).
        let started = Instant::now();
        let mut foreign = Box::pin(watch_stream(
            hub.clone(),
            Some(6),
            Some(epoch + 1),
            Duration::from_secs(3),
            stopped.clone(),
        ));
        let first = decode(&foreign.next().await.unwrap().unwrap());
        assert_eq!(first, WatchEvent::Keepalive { revision: 0 });
        let second = decode(&foreign.next().await.unwrap().unwrap());
        assert!(
            matches!(second, WatchEvent::Snapshot(ref s) if s.revision == 6 && s.epoch == epoch),
            "{second:?}"
        );
        assert!(started.elapsed() >= Duration::from_secs(4));
        // The same request with the right epoch resumes at once: it holds
        // the current revision, so nothing is sent until a keepalive.
        let mut native = Box::pin(watch_stream(
            hub,
            Some(6),
            Some(epoch),
            Duration::from_secs(3),
            stopped,
        ));
        let started = Instant::now();
        let event = decode(&native.next().await.unwrap().unwrap());
        assert_eq!(event, WatchEvent::Keepalive { revision: 6 });
        assert_eq!(started.elapsed(), Duration::from_secs(3));
    }
}
