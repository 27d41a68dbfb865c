//! [`WorkloadIdentity`]: this sidecar's current workload certificate and
//! trust bundle (each in an `ArcSwap`: handshakes read them without locks,
//! a renewal or a new bundle is a pointer swap), and whether a hop to an
//! endpoint is mTLS ([`Hop`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::{ArcSwap, ArcSwapOption};
use meshlet_api::identity::SpiffeId;
use meshlet_api::mesh::{CertificateReply, CertificateRequest};
use rustls::sign::CertifiedKey;
use serde_json::json;
use tokio::sync::{watch, Notify};

use crate::identity::bundle::TrustBundle;
use crate::telemetry::metrics::IdentityMetrics;

/// Where certificates come from: the control plane (`control::client`), or
/// a test CA.
pub trait CertificateSource: Send + Sync + 'static {
    fn sign(
        &self,
        request: CertificateRequest,
    ) -> Pin<Box<dyn Future<Output = Result<CertificateReply, String>> + Send + '_>>;
}

/// A workload certificate with its key, as handshakes present it.
#[derive(Debug)]
pub struct Leaf {
    pub certified: Arc<CertifiedKey>,
    pub identity: SpiffeId,
    /// Lowercase hex, as the control plane numbers it.
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// When this sidecar received it (the start of its lifetime for
    /// renewal, `notBefore` being back-dated).
    pub received: SystemTime,
}

impl Leaf {
    pub fn expired(&self, now: SystemTime) -> bool {
        now >= self.not_after
    }
}

/// What a hop to an endpoint is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hop {
    /// No certificate of our own, or an endpoint without identity.
    Plain,
    /// mTLS, the peer must present this identity.
    Mtls(Arc<SpiffeId>),
    /// We would need mTLS but our certificate expired at this time.
    Expired(SystemTime),
}

/// How often the "certificate expired" warning is logged at most.
const EXPIRED_WARNING_EVERY: Duration = Duration::from_secs(60);

/// This sidecar's certificate and trust bundle, shared by the listeners,
/// the pools, the watch task and the renewal task.
pub struct WorkloadIdentity {
    current: ArcSwapOption<Leaf>,
    bundle: ArcSwap<TrustBundle>,
    /// Wakes the renewal task at once (the bundle's signing root changed).
    pub(crate) renew_now: Notify,
    /// Turns true after the first request for a certificate ended
    /// (either way): registration waits for it.
    pub(crate) first_attempt: watch::Sender<bool>,
    pub(crate) metrics: IdentityMetrics,
    /// Unix seconds of the last "certificate expired" warning.
    warned_expired_at: AtomicU64,
    /// The watch has delivered a bundle (it then wins over replies).
    watched: AtomicBool,
}

impl std::fmt::Debug for WorkloadIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadIdentity")
            .field("current", &self.current.load().as_ref().map(|l| &l.serial))
            .finish_non_exhaustive()
    }
}

impl WorkloadIdentity {
    pub fn new(metrics: IdentityMetrics) -> Arc<Self> {
        Arc::new(WorkloadIdentity {
            current: ArcSwapOption::empty(),
            bundle: ArcSwap::from_pointee(TrustBundle::empty()),
            renew_now: Notify::new(),
            first_attempt: watch::channel(false).0,
            metrics,
            warned_expired_at: AtomicU64::new(0),
            watched: AtomicBool::new(false),
        })
    }

    /// The current certificate, if any (expired or not).
    pub fn leaf(&self) -> Option<Arc<Leaf>> {
        self.current.load_full()
    }

    pub fn bundle(&self) -> Arc<TrustBundle> {
        self.bundle.load_full()
    }

    /// Whether a hop to an endpoint whose sidecar is `peer` is mTLS.
    pub fn hop(&self, peer: Option<&Arc<SpiffeId>>) -> Hop {
        let current = self.current.load();
        let (Some(peer), Some(leaf)) = (peer, current.as_ref()) else {
            return Hop::Plain;
        };
        if leaf.expired(SystemTime::now()) {
            self.warn_expired(leaf.not_after);
            return Hop::Expired(leaf.not_after);
        }
        Hop::Mtls(Arc::clone(peer))
    }

    /// Logs that the own certificate expired, at most once a minute.
    fn warn_expired(&self, not_after: SystemTime) {
        let now = unix_secs(SystemTime::now());
        let last = self.warned_expired_at.load(Ordering::Relaxed);
        if now < last + EXPIRED_WARNING_EVERY.as_secs() {
            return;
        }
        if self
            .warned_expired_at
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            tracing::warn!(
                expired_at = %humantime::format_rfc3339_seconds(not_after),
                "this sidecar's workload certificate expired and the control plane is unreachable: \
                 calls to meshed endpoints are refused (503 certificate_expired) until a renewal succeeds"
            );
        }
    }

    /// Installs a new certificate: new handshakes present it at once.
    pub fn install(&self, leaf: Leaf) {
        self.metrics.expiry.set(unix_secs(leaf.not_after) as i64);
        tracing::info!(identity = %leaf.identity, serial = %leaf.serial,
            not_after = %humantime::format_rfc3339_seconds(leaf.not_after), "workload certificate installed");
        self.current.store(Some(Arc::new(leaf)));
    }

    /// The watch's trust bundle (the control plane's current one, pushed
    /// with every change): replaces the current bundle.
    pub fn set_bundle(&self, roots: &str) {
        if roots.is_empty() {
            return;
        }
        self.watched.store(true, Ordering::Relaxed);
        self.apply_bundle(roots);
    }

    /// A bundle from elsewhere (a certificate reply, the persisted state):
    /// used only until the watch has delivered one, which is fresher (a
    /// reply's bundle is the one at signing time, and may still hold a
    /// root a rotation has since retired).
    pub fn offer_bundle(&self, roots: &str) {
        if !roots.is_empty() && !self.watched.load(Ordering::Relaxed) {
            self.apply_bundle(roots);
        }
    }

    /// Replaces the trust bundle with the PEM `roots` (unchanged text: no
    /// work). When its first root (the signing one) did not sign the
    /// current leaf, asks the renewal task to renew now.
    fn apply_bundle(&self, roots: &str) {
        if self.bundle.load().pem() == roots {
            return;
        }
        match TrustBundle::parse(roots) {
            Ok(bundle) => {
                tracing::info!(roots = bundle.len(), "trust bundle updated");
                self.bundle.store(Arc::new(bundle));
                self.renew_if_not_signed_by_first_root();
            }
            Err(error) => {
                tracing::warn!(%error, "ignoring an invalid trust bundle; keeping the current one")
            }
        }
    }

    fn renew_if_not_signed_by_first_root(&self) {
        let Some(leaf) = self.leaf() else {
            return;
        };
        let bundle = self.bundle.load();
        if let Ok(end_entity) = leaf.certified.end_entity_cert() {
            if !bundle.first_root_signed(end_entity, leaf.not_before, leaf.not_after) {
                tracing::info!(serial = %leaf.serial, "the trust bundle's signing root did not sign this certificate (CA rotation): renewing");
                self.renew_now.notify_one();
            }
        }
    }

    /// Completes once the first request for a certificate has ended.
    pub async fn first_attempt_done(&self) {
        let mut done = self.first_attempt.subscribe();
        let _ = done.wait_for(|done| *done).await;
    }

    /// For `/config_dump`.
    pub fn to_json(&self) -> serde_json::Value {
        let bundle = self.bundle.load();
        match self.leaf() {
            Some(leaf) => json!({
                "identity": leaf.identity.to_string(),
                "serial": leaf.serial,
                "notBefore": humantime::format_rfc3339_seconds(leaf.not_before).to_string(),
                "notAfter": humantime::format_rfc3339_seconds(leaf.not_after).to_string(),
                "expired": leaf.expired(SystemTime::now()),
                "trustRoots": bundle.len(),
            }),
            None => json!({ "identity": null, "trustRoots": bundle.len() }),
        }
    }
}

pub(crate) fn unix_secs(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Unix milliseconds as a time.
pub(crate) fn from_unix_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}
