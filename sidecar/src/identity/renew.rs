//! Getting and renewing the workload certificate.
//!
//! Each request makes a new P-256 key in memory (rcgen; never written,
//! never sent), a CSR for it, and asks the [`CertificateSource`] (the
//! control plane, with the sidecar token: the control plane signs the
//! identity it derives from the token, whatever the CSR says). The reply's
//! leaf and key become a [`Leaf`]; its trust bundle is used until the
//! watch delivers the control plane's current one.
//!
//! The task: first request at once; then renew at 2/3 of the lifetime
//! ±10 % (jitter, so a fleet started together does not renew together);
//! a failure retries with exponential backoff from 1 s (±20 % jitter)
//! while the current certificate stays in use (after it expires too: peers
//! then refuse it, and our outbound answers `certificate_expired`). The
//! backoff is capped at a tenth of the leaf's lifetime (1–30 s) while it
//! is valid, never waits past its expiry, and at 5 s once it has expired
//! (or before the first one): without a valid certificate every mesh hop
//! fails, so the task keeps asking often and is back within seconds of
//! the control plane. A bundle whose signing root did not sign the current
//! leaf wakes the task at once (after 0–1 s of jitter).
//!
//! Certificates expire by the wall clock, sleeps run on the monotonic one,
//! and the two part when a VM is suspended or its clock is stepped. So
//! [`Schedule`] keeps the next attempt on both clocks and acts at
//! whichever comes first; the task sleeps towards it in slices of at most
//! a tenth of the lifetime (1–60 s), looking at both after each: a wall
//! clock that jumped past the renewal time is noticed within a slice, not
//! a lifetime later, and one stepped back does not delay the attempt.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use meshlet_api::mesh::{CertificateReply, CertificateRequest};
use rcgen::{CertificateParams, DnType, KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;
use tokio::sync::watch;

use crate::identity::provider::provider;
use crate::identity::verify::spiffe_id_of;
use crate::identity::workload::{from_unix_ms, CertificateSource, Leaf, WorkloadIdentity};

const BACKOFF_FIRST: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// The longest wait between two attempts once the certificate expired.
const EXPIRED_RETRY_MAX: Duration = Duration::from_secs(5);
/// The shortest wait before asking again when a leaf is about to expire.
const LAST_MOMENT: Duration = Duration::from_millis(100);
/// Bounds of the slice the task sleeps before looking at the wall clock.
const SLICE_MIN: Duration = Duration::from_secs(1);
const SLICE_MAX: Duration = Duration::from_secs(60);

/// A fresh key and its CSR (PEM).
pub fn key_and_csr(common_name: &str) -> Result<(KeyPair, String), String> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| e.to_string())?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(|e| e.to_string())?;
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    let csr = params
        .serialize_request(&key)
        .and_then(|csr| csr.pem())
        .map_err(|e| e.to_string())?;
    Ok((key, csr))
}

/// The leaf of `reply` with `key`: the certificate must parse, carry a
/// SPIFFE URI SAN and match the key.
pub fn leaf_of(reply: &CertificateReply, key: &KeyPair) -> Result<Leaf, String> {
    let chain = CertificateDer::pem_slice_iter(reply.certificate.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("certificate: {e}"))?;
    let leaf = chain
        .first()
        .ok_or_else(|| "the reply holds no certificate".to_owned())?;
    let identity = spiffe_id_of(leaf)?;
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let signing = provider()
        .key_provider
        .load_private_key(der)
        .map_err(|e| format!("key: {e}"))?;
    let certified = CertifiedKey::new(chain, signing);
    certified
        .keys_match()
        .map_err(|e| format!("the certificate is not for this key: {e}"))?;
    Ok(Leaf {
        certified: Arc::new(certified),
        identity,
        serial: reply.serial.clone(),
        not_before: from_unix_ms(reply.not_before_ms),
        not_after: from_unix_ms(reply.not_after_ms),
        received: SystemTime::now(),
    })
}

/// When to renew `leaf`: at 2/3 of its lifetime ±10 %. The lifetime runs
/// from when it was issued: a CA back-dates `notBefore` (minutes, for
/// clock skew), which must not make a short-lived leaf look mostly spent.
pub fn renewal_time(leaf: &Leaf) -> SystemTime {
    let issued = leaf.not_before.max(leaf.received);
    let fraction = 2.0 / 3.0 * (0.9 + 0.2 * fastrand::f64());
    issued + lifetime(leaf).mul_f64(fraction)
}

/// The shortest pause between two renewals (a leaf whose renewal time has
/// passed must not make the task spin).
const MIN_RENEWAL_PAUSE: Duration = Duration::from_secs(1);

/// How long `leaf` is valid from when it was issued (see [`renewal_time`]).
fn lifetime(leaf: &Leaf) -> Duration {
    let issued = leaf.not_before.max(leaf.received);
    leaf.not_after.duration_since(issued).unwrap_or_default()
}

/// A reading of both clocks.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Now {
    pub wall: SystemTime,
    pub mono: Instant,
}

impl Now {
    pub(crate) fn read() -> Now {
        Now {
            wall: SystemTime::now(),
            mono: Instant::now(),
        }
    }
}

/// When the renewal task acts next, on both clocks (see the module doc),
/// and the backoff of a failing control plane.
#[derive(Debug)]
pub(crate) struct Schedule {
    next: SystemTime,
    next_mono: Instant,
    backoff: Duration,
    failing: bool,
}

impl Schedule {
    /// The first attempt: at once.
    pub(crate) fn start(now: Now) -> Schedule {
        Schedule {
            next: now.wall,
            next_mono: now.mono,
            backoff: BACKOFF_FIRST,
            failing: false,
        }
    }

    /// The next attempt `wait` after `now` on both clocks.
    fn plan(&mut self, now: Now, wait: Duration) {
        self.next = now.wall + wait;
        self.next_mono = now.mono + wait;
    }

    /// How long to sleep before looking at the clocks again; `None` when
    /// the next attempt is due by either. A slice is a tenth of `leaf`'s
    /// lifetime (1–60 s; 1 s without a leaf).
    pub(crate) fn sleep(&self, leaf: Option<&Leaf>, now: Now) -> Option<Duration> {
        let by_wall = self.next.duration_since(now.wall).unwrap_or_default();
        let by_mono = self.next_mono.saturating_duration_since(now.mono);
        let left = Some(by_wall.min(by_mono)).filter(|left| !left.is_zero())?;
        let slice = leaf.map_or(SLICE_MIN, |leaf| {
            (lifetime(leaf) / 10).clamp(SLICE_MIN, SLICE_MAX)
        });
        Some(left.min(slice))
    }

    /// A renewal installed `leaf`: the next one at its renewal time.
    pub(crate) fn succeeded(&mut self, leaf: &Leaf, now: Now) {
        self.failing = false;
        self.backoff = BACKOFF_FIRST;
        let wait = renewal_time(leaf)
            .duration_since(now.wall)
            .unwrap_or_default()
            .max(MIN_RENEWAL_PAUSE);
        self.plan(now, wait);
    }

    /// A request failed while `leaf` (if any) is current: the next attempt
    /// after the backoff, capped as the module doc says. Returns the wait
    /// and whether this is the first failure of a run.
    pub(crate) fn failed(&mut self, leaf: Option<&Leaf>, now: Now) -> (Duration, bool) {
        let jittered = self.backoff.mul_f64(0.8 + 0.4 * fastrand::f64());
        let left = leaf.and_then(|leaf| {
            let left = leaf.not_after.duration_since(now.wall).ok()?;
            (!left.is_zero()).then_some((leaf, left))
        });
        let wait = match left {
            Some((leaf, left)) => {
                let cap = (lifetime(leaf) / 10).clamp(BACKOFF_FIRST, BACKOFF_MAX);
                jittered.min(cap).min(left.max(LAST_MOMENT))
            }
            // No valid certificate: every mesh hop fails meanwhile.
            None => jittered.min(EXPIRED_RETRY_MAX),
        };
        let first = !self.failing;
        self.failing = true;
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        self.plan(now, wait);
        (wait, first)
    }

    /// Whether the last attempt failed.
    pub(crate) fn failing(&self) -> bool {
        self.failing
    }
}

impl WorkloadIdentity {
    /// One request for a certificate; installs it and its bundle.
    pub async fn renew_once(
        &self,
        source: &dyn CertificateSource,
        instance_id: &str,
        common_name: &str,
    ) -> Result<(), String> {
        let (key, csr) = key_and_csr(common_name)?;
        let reply = source
            .sign(CertificateRequest {
                instance_id: instance_id.to_owned(),
                csr,
            })
            .await?;
        let leaf = leaf_of(&reply, &key)?;
        // The leaf first: the bundle's check of which root signed the
        // current leaf must see the new one.
        self.install(leaf);
        self.offer_bundle(&reply.trust_roots);
        self.metrics.renewals.inc();
        Ok(())
    }
}

/// Starts the renewal task (until `stop`).
pub fn spawn(
    identity: Arc<WorkloadIdentity>,
    source: Arc<dyn CertificateSource>,
    instance_id: String,
    common_name: String,
    mut stop: watch::Receiver<bool>,
) {
    tokio::spawn(async move {
        let mut schedule = Schedule::start(Now::read());
        loop {
            let leaf = identity.leaf();
            if let Some(slice) = schedule.sleep(leaf.as_deref(), Now::read()) {
                let woken = tokio::select! {
                    _ = tokio::time::sleep(slice) => false,
                    _ = identity.renew_now.notified() => true,
                    _ = stop.wait_for(|stop| *stop) => return,
                };
                if !woken {
                    continue;
                }
                // A rotation reaches every sidecar at once: spread them.
                tokio::time::sleep(Duration::from_millis(fastrand::u64(..1000))).await;
            }
            let result = tokio::select! {
                result = identity.renew_once(source.as_ref(), &instance_id, &common_name) => result,
                _ = stop.wait_for(|stop| *stop) => return,
            };
            identity.first_attempt.send_replace(true);
            let leaf = identity.leaf();
            match (result, leaf) {
                (Ok(()), Some(leaf)) => {
                    if schedule.failing() {
                        tracing::info!("workload certificate renewed again");
                    }
                    schedule.succeeded(&leaf, Now::read());
                }
                (result, leaf) => {
                    let error = result
                        .err()
                        .unwrap_or_else(|| "no certificate installed".into());
                    identity.metrics.failures.inc();
                    let (wait, first) = schedule.failed(leaf.as_deref(), Now::read());
                    let expires = leaf
                        .map(|leaf| humantime::format_rfc3339_seconds(leaf.not_after).to_string());
                    if first {
                        tracing::warn!(%error, current_expires = ?expires, retry_in = ?wait,
                            "cannot get a workload certificate; keeping the current one (if any) and retrying");
                    } else {
                        tracing::debug!(%error, retry_in = ?wait, "workload certificate request failed again");
                    }
                }
            }
        }
    });
}
