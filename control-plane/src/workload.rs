//! Workload certificates and CA rotation (issue 14): the control plane's
//! side of the sidecars' mTLS identities.
//!
//! ```text
//! sidecar ── POST /api/v1/certificates (CSR, sidecar token) ─► Workload::sign
//!             signing root (Roots, first of the bundle) ─► leaf ─► remembered per instance id
//! admin ── POST /api/v1/ca/rotate ─► Workload::rotate ─► Roots phase 1 ─► Controller::set_trust_roots
//! Workload::run (every 250 ms, on the leader only): phase 1 + grace ─► phase 2; no live leaf of the old root ─► phase 3
//!             each phase: ca-roots/ written (etcd: CAS of P/ca/state), then a revision whose MeshDelta carries trust_roots
//! etcd watch ─► P/ca/state ─► Workload::apply_shared (every replica signs with the new roots)
//! ```
//!
//! With `--store etcd` the roots are not files but `P/ca/state`
//! ([`SharedRotation`], `rotation.rs`): a phase change is a
//! compare-and-swap from the mod revision this replica holds (a lost one
//! reloads the state and answers 409), the phase driver acts only on the
//! elected leader, and the other replicas take each new state from the
//! replication watch. With redb the process is the leader.
//!
//! [`Workload`] holds the current [`Roots`] (swapped whole, never mutated)
//! and, per instance id, the newest leaf it issued ([`IssuedLeaf`]: serial,
//! expiry, the root's fingerprint). That memory is **not durable**: a
//! restarted control plane forgets it (sidecars tell it again when they
//! renew, at 2/3 of the lifetime or when a rotation changes the signing
//! root), so `describe` shows no certificate for an instance until then.
//!
//! A root is *live* while it signed an unexpired leaf that is still its
//! instance's newest. Phase 3 (retire the old root) waits until the old
//! root has no live leaf, and, because leaves issued before this process
//! started are unknown to it, also until every registered instance has a
//! leaf from the new root — unless this process created the CA or has run
//! for longer than the TTL (then every leaf is known), or a whole TTL has
//! passed since phase 2 began (every old leaf has expired by then).
//! Leaves of instances that deregistered or expired are dropped (a leaf
//! asked for before registering is kept for a minute, the time to register).
//! With etcd each replica knows only the leaves it signed, so the leader
//! never assumes it knows every leaf (it retires once every registered
//! instance has a leaf from the new root that it signed, or a TTL after
//! phase 2 began).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use meshlet_api::identity::SpiffeId;
use meshlet_api::mesh::{CaRoot, CaStatus, CertificateReply, IssuedLeaf};
use tokio::sync::watch;

use crate::ca::{CaError, Phase, Roots, BACKDATE};
use crate::controller::Controller;
use crate::error::ApiFailure;
use crate::rotation::SharedRotation;

/// How often the rotation driver looks at the phase and the leaves.
pub const TICK: Duration = Duration::from_millis(250);
/// A leaf asked for before its instance registered is kept this long
/// without a registration.
pub const UNREGISTERED_GRACE_MS: u64 = 60_000;
/// Instances whose leaves are remembered at most (a sidecar token asking
/// for certificates under made-up instance ids cannot grow the map past
/// it; past it, leaves of new ids are issued but not remembered).
pub const MAX_REMEMBERED_LEAVES: usize = 65_536;

/// What the control plane remembers of a leaf it issued.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Leaf {
    issued: IssuedLeaf,
    issued_at_ms: u64,
    /// The instance was seen registered since the leaf was issued.
    seen_registered: bool,
}

/// Settings of the workload CA (from the control plane's flags).
#[derive(Debug, Clone)]
pub struct WorkloadSettings {
    pub data_dir: PathBuf,
    pub trust_domain: String,
    /// Lifetime of a workload certificate (`--workload-cert-ttl`).
    pub ttl: Duration,
    /// Phase 1's length (`--ca-rotation-grace`).
    pub grace: Duration,
    /// Leaves issued before this (ms) may exist unknown to this process.
    pub all_known_after_ms: u64,
}

/// The roots in use and, with etcd, the mod revision of `P/ca/state`
/// they came from (0: the key is absent).
struct Current {
    roots: Arc<Roots>,
    etcd_revision: i64,
}

/// How a phase change moves the roots.
#[derive(Debug, Clone, Copy)]
enum Step {
    Begin,
    Switch,
    Retire,
}

/// Workload certificates, the roots and their rotation.
pub struct Workload {
    settings: WorkloadSettings,
    current: RwLock<Current>,
    /// `--store etcd`: the state in etcd and the election (`rotation.rs`).
    shared: Option<Arc<SharedRotation>>,
    leaves: Mutex<HashMap<String, Leaf>>,
    /// One phase change at a time.
    rotating: tokio::sync::Mutex<()>,
    /// Leaves signed since start (`/metrics`).
    issued: AtomicU64,
}

fn ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn ca_failure(e: CaError) -> ApiFailure {
    match e {
        CaError::InvalidCsr { .. } | CaError::InvalidSpiffeId(_) => {
            ApiFailure::BadRequest(e.to_string())
        }
        other => ApiFailure::Internal(format!("cannot sign: {other}")),
    }
}

fn short(fingerprint: &str) -> &str {
    &fingerprint[..fingerprint.len().min(16)]
}

impl Workload {
    pub fn new(settings: WorkloadSettings, roots: Roots) -> Workload {
        Workload {
            settings,
            current: RwLock::new(Current {
                roots: Arc::new(roots),
                etcd_revision: 0,
            }),
            shared: None,
            leaves: Mutex::new(HashMap::new()),
            rotating: tokio::sync::Mutex::new(()),
            issued: AtomicU64::new(0),
        }
    }

    /// A workload CA with a fresh in-memory root (unit tests).
    #[cfg(test)]
    pub fn for_tests() -> Workload {
        let ca = crate::ca::MeshCa::create("meshlet.local").unwrap();
        Workload::new(
            WorkloadSettings {
                data_dir: std::env::temp_dir(),
                trust_domain: "meshlet.local".into(),
                ttl: Duration::from_secs(3600),
                grace: Duration::from_secs(5),
                all_known_after_ms: 0,
            },
            Roots::single(ca),
        )
    }

    /// `--store etcd`: the rotation state is `shared` (whose mod
    /// revision `etcd_revision` the roots given to [`Workload::new`] have).
    pub fn with_shared(mut self, shared: Arc<SharedRotation>, etcd_revision: i64) -> Workload {
        self.current.get_mut().unwrap().etcd_revision = etcd_revision;
        self.shared = Some(shared);
        self
    }

    pub fn shared(&self) -> Option<&Arc<SharedRotation>> {
        self.shared.as_ref()
    }

    /// This replica drives the phases (always with redb).
    pub fn is_leader(&self) -> bool {
        self.shared.as_ref().is_none_or(|s| s.is_leader())
    }

    pub fn roots(&self) -> Arc<Roots> {
        self.current.read().unwrap().roots.clone()
    }

    fn current(&self) -> (Arc<Roots>, i64) {
        let current = self.current.read().unwrap();
        (current.roots.clone(), current.etcd_revision)
    }

    /// Takes `roots` of etcd mod revision `etcd_revision` unless newer
    /// ones are in use; answers whether it did.
    fn adopt(&self, roots: Roots, etcd_revision: i64) -> bool {
        let mut current = self.current.write().unwrap();
        if etcd_revision <= current.etcd_revision {
            return false;
        }
        *current = Current {
            roots: Arc::new(roots),
            etcd_revision,
        };
        true
    }

    /// A `P/ca/state` the replication watch saw (`--store etcd`): its
    /// roots sign and make the bundle from now on. The bundle reaches this
    /// replica's sidecars with the revision the writer committed.
    pub fn apply_shared(&self, value: &[u8], etcd_revision: i64) {
        let Some(shared) = &self.shared else { return };
        match shared.decode(value) {
            Ok(roots) => {
                let phase = roots.phase();
                let signing = short(roots.signing().fingerprint()).to_owned();
                if self.adopt(roots, etcd_revision) {
                    tracing::info!(?phase, signing = %signing, etcd_revision, "CA rotation state from etcd");
                }
            }
            Err(error) => tracing::error!(%error, "CA rotation state in etcd is unusable"),
        }
    }

    /// Reads `P/ca/state` again (after a lost compare-and-swap).
    async fn reload(&self, shared: &SharedRotation) -> Result<(), ApiFailure> {
        let (roots, etcd_revision) = shared.load().await?;
        if let Some(roots) = roots {
            self.adopt(roots, etcd_revision);
        }
        Ok(())
    }

    /// Leaves signed since start.
    pub fn issued(&self) -> u64 {
        self.issued.load(Ordering::Relaxed)
    }

    pub fn trust_domain(&self) -> &str {
        &self.settings.trust_domain
    }

    pub fn ttl(&self) -> Duration {
        self.settings.ttl
    }

    /// Signs `csr_pem` for instance `instance_id` of `namespace/service` (the
    /// caller's token binding) and remembers the leaf. Runs the signature
    /// on the blocking pool.
    pub async fn sign(
        self: &Arc<Self>,
        instance_id: &str,
        csr_pem: String,
        namespace: &str,
        service: &str,
        now_ms: u64,
    ) -> Result<CertificateReply, ApiFailure> {
        let id = SpiffeId::new(&self.settings.trust_domain, namespace, service)
            .map_err(|e| ApiFailure::BadRequest(e.to_string()))?;
        let roots = self.roots();
        let ttl = self.settings.ttl;
        let (cert, id, roots) = tokio::task::spawn_blocking(move || {
            let cert = roots.signing().sign_workload_csr(&csr_pem, &id, ttl);
            (cert, id, roots)
        })
        .await
        .map_err(|e| ApiFailure::Internal(format!("signing task failed: {e}")))?;
        let cert = cert.map_err(ca_failure)?;
        self.issued.fetch_add(1, Ordering::Relaxed);
        let issued = IssuedLeaf {
            serial: cert.serial.clone(),
            not_after_ms: ms(cert.not_after),
            root: roots.signing().fingerprint().to_owned(),
        };
        {
            let mut leaves = self.leaves.lock().unwrap();
            if leaves.len() < MAX_REMEMBERED_LEAVES || leaves.contains_key(instance_id) {
                let seen_registered = leaves.get(instance_id).is_some_and(|l| l.seen_registered);
                leaves.insert(
                    instance_id.to_owned(),
                    Leaf {
                        issued,
                        issued_at_ms: now_ms,
                        seen_registered,
                    },
                );
            } else {
                tracing::warn!(
                    instance = instance_id,
                    limit = MAX_REMEMBERED_LEAVES,
                    "too many instances with certificates; this leaf is not remembered"
                );
            }
        }
        tracing::info!(
            instance = instance_id,
            identity = %id,
            serial = %cert.serial,
            root = short(roots.signing().fingerprint()),
            "workload certificate issued"
        );
        Ok(CertificateReply {
            identity: id.to_string(),
            certificate: cert.cert_pem,
            trust_roots: roots.bundle_pem(),
            serial: cert.serial,
            not_before_ms: ms(cert.not_before),
            not_after_ms: ms(cert.not_after),
        })
    }

    /// The newest leaf issued to instance `id` (since this process started).
    pub fn certificate_of(&self, id: &str) -> Option<IssuedLeaf> {
        self.leaves
            .lock()
            .unwrap()
            .get(id)
            .map(|l| l.issued.clone())
    }

    /// Unexpired newest leaves per root fingerprint.
    fn live_leaves(&self, now_ms: u64) -> HashMap<String, usize> {
        let mut live: HashMap<String, usize> = HashMap::new();
        for leaf in self.leaves.lock().unwrap().values() {
            if leaf.issued.not_after_ms > now_ms {
                *live.entry(leaf.issued.root.clone()).or_default() += 1;
            }
        }
        live
    }

    /// Drops the leaves of instances that left the registry (see the
    /// module docs) and marks the others as seen registered.
    pub fn forget_departed(&self, instances: &crate::instances::Instances, now_ms: u64) {
        self.leaves.lock().unwrap().retain(|id, leaf| {
            if instances.contains_key(id) {
                leaf.seen_registered = true;
                return true;
            }
            !leaf.seen_registered
                && now_ms.saturating_sub(leaf.issued_at_ms) < UNREGISTERED_GRACE_MS
        });
    }

    /// `GET /api/v1/ca`.
    pub fn status(&self, now_ms: u64) -> CaStatus {
        let roots = self.roots();
        let live = self.live_leaves(now_ms);
        CaStatus {
            trust_domain: self.settings.trust_domain.clone(),
            workload_cert_ttl_ms: self.settings.ttl.as_millis() as u64,
            roots: roots
                .all()
                .iter()
                .enumerate()
                .map(|(i, ca)| CaRoot {
                    subject: ca.subject().to_owned(),
                    serial: ca.serial().to_owned(),
                    fingerprint: ca.fingerprint().to_owned(),
                    not_after_ms: ms(ca.not_after()),
                    signing: i == 0,
                    live_leaves: live.get(ca.fingerprint()).copied().unwrap_or(0),
                })
                .collect(),
            rotation: self.describe_phase(&roots, now_ms),
        }
    }

    fn describe_phase(&self, roots: &Roots, now_ms: u64) -> Option<String> {
        let fp = |i: usize| short(roots.all()[i].fingerprint()).to_owned();
        match roots.phase() {
            Phase::Stable => None,
            Phase::Adding { since_ms } => {
                let at = since_ms + self.settings.grace.as_millis() as u64;
                Some(format!(
                    "phase 1 of 3: new root {} is trusted but does not sign yet; it becomes the signing root in {} ms",
                    fp(1),
                    at.saturating_sub(now_ms)
                ))
            }
            Phase::Retiring { .. } => Some(format!(
                "phase 2 of 3: new root {} signs; old root {} is retired once no live leaf depends on it",
                fp(0),
                fp(1)
            )),
        }
    }

    /// Whether phase 2's old root may leave the bundle (module docs).
    fn may_retire(
        &self,
        roots: &Roots,
        since_ms: u64,
        instances: &crate::instances::Instances,
        now_ms: u64,
    ) -> bool {
        let (Some(new), Some(old)) = (roots.all().first(), roots.all().get(1)) else {
            return true;
        };
        let every_old_leaf_expired =
            now_ms >= since_ms + (self.settings.ttl + BACKDATE).as_millis() as u64;
        if every_old_leaf_expired {
            return true;
        }
        let leaves = self.leaves.lock().unwrap();
        let old_live = leaves
            .values()
            .any(|l| l.issued.root == old.fingerprint() && l.issued.not_after_ms > now_ms);
        if old_live {
            return false;
        }
        now_ms >= self.settings.all_known_after_ms
            || instances.iter_unordered().all(|i| {
                let id = &i.registration.id;
                leaves
                    .get(id)
                    .is_some_and(|l| l.issued.root == new.fingerprint())
            })
    }

    /// The roots after `step`: with redb written to `ca-roots/` (on the
    /// blocking pool), with etcd only in memory (`P/ca/state` is the copy).
    async fn next_roots(
        &self,
        roots: Arc<Roots>,
        step: Step,
        now_ms: u64,
    ) -> Result<Roots, ApiFailure> {
        let data_dir = self.settings.data_dir.clone();
        let td = self.settings.trust_domain.clone();
        let local = self.shared.is_none();
        tokio::task::spawn_blocking(move || match (step, local) {
            (Step::Begin, true) => roots.begin_rotation(&data_dir, &td, now_ms),
            (Step::Begin, false) => Ok(roots.adding(crate::ca::MeshCa::create(&td)?, now_ms)),
            (Step::Switch, true) => roots.switch(&data_dir, now_ms),
            (Step::Switch, false) => Ok(roots.switched(now_ms)),
            (Step::Retire, true) => roots.retire(&data_dir),
            (Step::Retire, false) => Ok(roots.retired()),
        })
        .await
        .map_err(|e| ApiFailure::Internal(format!("rotation task failed: {e}")))?
        .map_err(|e| ApiFailure::Internal(format!("cannot change the CA roots ({step:?}): {e}")))
    }

    /// Phase changes go through here: the roots are written (files, or
    /// the CAS of `P/ca/state` from `etcd_revision`), swapped in, and the
    /// bundle published as a revision. A lost CAS reloads the state and
    /// answers 409 (another replica moved the rotation first).
    async fn change(
        &self,
        controller: &Controller,
        (next, etcd_revision): (Roots, i64),
        line: String,
    ) -> Result<(), ApiFailure> {
        let bundle = next.bundle_pem();
        match &self.shared {
            None => self.current.write().unwrap().roots = Arc::new(next),
            Some(shared) => match shared.swap(etcd_revision, &next).await? {
                Some(written) => {
                    self.adopt(next, written);
                }
                None => {
                    self.reload(shared).await?;
                    return Err(ApiFailure::Conflict(
                        "another control-plane replica changed the CA rotation first; nothing was written (see `meshctl ca status`)".into(),
                    ));
                }
            },
        }
        tracing::info!("{line}");
        controller
            .set_trust_roots(bundle, vec![line])
            .await
            .map_err(ApiFailure::from)?;
        Ok(())
    }

    /// `POST /api/v1/ca/rotate`: phase 1 (409 while a rotation runs).
    pub async fn rotate(
        &self,
        controller: &Controller,
        now_ms: u64,
    ) -> Result<CaStatus, ApiFailure> {
        let _one = self.rotating.lock().await;
        let (roots, etcd_revision) = self.current();
        if roots.phase() != Phase::Stable {
            return Err(ApiFailure::Conflict(format!(
                "a CA rotation is already in progress ({}); wait until `meshctl ca status` shows one root",
                self.describe_phase(&roots, now_ms).unwrap_or_default()
            )));
        }
        let next = self.next_roots(roots, Step::Begin, now_ms).await?;
        let line = format!(
            "CA rotation phase 1: added root {} to the trust bundle (root {} still signs)",
            short(next.all()[1].fingerprint()),
            short(next.all()[0].fingerprint())
        );
        match self.change(controller, (next, etcd_revision), line).await {
            // Lost to another replica's rotate: today's 409 for a running rotation.
            Err(ApiFailure::Conflict(_)) => Err(ApiFailure::Conflict(format!(
                "a CA rotation is already in progress (another replica began it); {}",
                self.describe_phase(&self.roots(), now_ms)
                    .unwrap_or_default()
            ))),
            Err(e) => Err(e),
            Ok(()) => Ok(self.status(now_ms)),
        }
    }

    /// One step of the rotation driver at `now_ms`: drop departed leaves;
    /// on the leader only (with etcd: the elected replica), re-publish the
    /// bundle if the published one differs (a failed commit) and move to
    /// the next phase when due.
    pub async fn step(&self, controller: &Controller, now_ms: u64) -> Result<(), ApiFailure> {
        let published = controller.published();
        self.forget_departed(&published.instances, now_ms);
        if !self.is_leader() {
            return Ok(());
        }
        let _one = self.rotating.lock().await;
        let (roots, etcd_revision) = self.current();
        if published.trust_roots != roots.bundle_pem() {
            controller
                .set_trust_roots(
                    roots.bundle_pem(),
                    vec!["trust bundle re-published".to_owned()],
                )
                .await?;
        }
        match roots.phase() {
            Phase::Stable => Ok(()),
            Phase::Adding { since_ms } => {
                if now_ms < since_ms + self.settings.grace.as_millis() as u64 {
                    return Ok(());
                }
                let next = self.next_roots(roots, Step::Switch, now_ms).await?;
                let line = format!(
                    "CA rotation phase 2: root {} signs, root {} still trusted",
                    short(next.all()[0].fingerprint()),
                    short(next.all()[1].fingerprint())
                );
                self.change(controller, (next, etcd_revision), line).await
            }
            Phase::Retiring { since_ms } => {
                if !self.may_retire(&roots, since_ms, &published.instances, now_ms) {
                    return Ok(());
                }
                let next = self.next_roots(roots.clone(), Step::Retire, now_ms).await?;
                let line = format!(
                    "CA rotation phase 3: retired root {} (no live leaf); the bundle is root {}",
                    short(roots.all()[1].fingerprint()),
                    short(next.all()[0].fingerprint())
                );
                self.change(controller, (next, etcd_revision), line).await
            }
        }
    }

    /// Runs [`Workload::step`] every [`TICK`] until `shutdown`.
    pub async fn run(
        self: Arc<Self>,
        controller: Arc<Controller>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = crate::push::stopped(&mut shutdown) => return,
                _ = tick.tick() => {
                    if let Err(err) = self.step(&controller, crate::clock::now_ms()).await {
                        tracing::error!(error = %err, "CA rotation step failed");
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::tests::registration;
    use crate::store::StoredInstance;

    fn instances(ids: &[&str]) -> crate::instances::Instances {
        ids.iter()
            .map(|id| StoredInstance {
                registration: registration(id, "orders", 8080),
                registered_at_ms: 0,
            })
            .collect()
    }

    fn leaf(w: &Workload, id: &str, root: &str, not_after_ms: u64) {
        w.leaves.lock().unwrap().insert(
            id.into(),
            Leaf {
                issued: IssuedLeaf {
                    serial: "01".into(),
                    not_after_ms,
                    root: root.into(),
                },
                issued_at_ms: 0,
                seen_registered: false,
            },
        );
    }

    /// A workload CA in phase 2 (new, old), whose process may not know
    /// every leaf until `all_known_after_ms`.
    fn retiring(dir: &std::path::Path, all_known_after_ms: u64) -> (Workload, String, String) {
        crate::files::ensure_private_dir(dir).unwrap();
        let (ca, _) = crate::ca::load_or_create(dir, "meshlet.local").unwrap();
        let roots = Roots::single(ca)
            .begin_rotation(dir, "meshlet.local", 0)
            .unwrap()
            .switch(dir, 1_000)
            .unwrap();
        let new = roots.all()[0].fingerprint().to_owned();
        let old = roots.all()[1].fingerprint().to_owned();
        let w = Workload::new(
            WorkloadSettings {
                data_dir: dir.to_owned(),
                trust_domain: "meshlet.local".into(),
                ttl: Duration::from_secs(60),
                grace: Duration::from_secs(5),
                all_known_after_ms,
            },
            roots,
        );
        (w, new, old)
    }

    #[test]
    fn the_old_root_retires_when_no_live_leaf_needs_it() {
        let tmp = tempfile::tempdir().unwrap();
        let (w, new, old) = retiring(tmp.path(), 0);
        let roots = w.roots();
        let registered = instances(&["a", "b"]);
        leaf(&w, "a", &old, 50_000);
        leaf(&w, "b", &new, 50_000);
        assert!(
            !w.may_retire(&roots, 1_000, &registered, 10_000),
            "a's leaf is live"
        );
        // a renews: its newest leaf is from the new root.
        leaf(&w, "a", &new, 70_000);
        assert!(w.may_retire(&roots, 1_000, &registered, 10_000));
        // An expired old leaf does not count.
        leaf(&w, "a", &old, 9_000);
        assert!(w.may_retire(&roots, 1_000, &registered, 10_000));
        assert_eq!(w.status(10_000).roots[1].live_leaves, 0);
    }

    #[test]
    fn after_a_restart_unknown_leaves_hold_the_old_root_until_renewed_or_expired() {
        let tmp = tempfile::tempdir().unwrap();
        let (w, new, _) = retiring(tmp.path(), u64::MAX);
        let roots = w.roots();
        let registered = instances(&["a", "b"]);
        leaf(&w, "a", &new, 70_000);
        // b may hold a leaf from the old root that this process never saw.
        assert!(!w.may_retire(&roots, 1_000, &registered, 10_000));
        leaf(&w, "b", &new, 70_000);
        assert!(w.may_retire(&roots, 1_000, &registered, 10_000));
        // A whole TTL (and the backdating) after phase 2 began, every old leaf expired.
        w.leaves.lock().unwrap().remove("b");
        let expired = 1_000 + (Duration::from_secs(60) + BACKDATE).as_millis() as u64;
        assert!(!w.may_retire(&roots, 1_000, &registered, expired - 1));
        assert!(w.may_retire(&roots, 1_000, &registered, expired));
    }

    #[test]
    fn only_a_newer_etcd_state_replaces_the_roots_and_redb_always_leads() {
        let w = Workload::for_tests();
        assert!(w.is_leader(), "with redb the process is the leader");
        let first = w.roots().signing().fingerprint().to_owned();
        let rotated = w
            .roots()
            .adding(crate::ca::MeshCa::create("meshlet.local").unwrap(), 1_000);
        assert!(w.adopt(rotated.clone(), 7));
        assert_eq!(w.roots().all().len(), 2);
        // A watch event older than a CAS this replica already won.
        assert!(!w.adopt(Roots::single(w.roots().all()[1].clone()), 5));
        assert!(!w.adopt(rotated.switched(2_000), 7));
        assert_eq!(w.roots().signing().fingerprint(), first);
        assert!(w.adopt(rotated.switched(2_000), 9));
        assert_ne!(w.roots().signing().fingerprint(), first);
    }

    #[test]
    fn leaves_of_departed_instances_are_forgotten() {
        let w = Workload::for_tests();
        leaf(&w, "a", "r", u64::MAX);
        leaf(&w, "early", "r", u64::MAX);
        w.forget_departed(&instances(&["a"]), 1_000);
        assert!(w.certificate_of("a").is_some());
        assert!(
            w.certificate_of("early").is_some(),
            "asked before registering"
        );
        w.forget_departed(&instances(&[]), 2_000);
        assert!(w.certificate_of("a").is_none(), "deregistered");
        w.forget_departed(&instances(&[]), UNREGISTERED_GRACE_MS + 1);
        assert!(w.certificate_of("early").is_none(), "never registered");
    }
}
