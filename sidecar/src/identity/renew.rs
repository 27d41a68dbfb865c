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
//! a failure retries with exponential backoff from 1 s to 30 s while the
//! current certificate stays in use (after it expires too: peers then
//! refuse it, and our outbound answers `certificate_expired`). A bundle
//! whose signing root did not sign the current leaf wakes the task at
//! once (after 0–1 s of jitter).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

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
    let lifetime = leaf.not_after.duration_since(issued).unwrap_or_default();
    let fraction = 2.0 / 3.0 * (0.9 + 0.2 * fastrand::f64());
    issued + lifetime.mul_f64(fraction)
}

/// The shortest pause between two renewals (a leaf whose renewal time has
/// passed must not make the task spin).
const MIN_RENEWAL_PAUSE: Duration = Duration::from_secs(1);

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
        let mut backoff = BACKOFF_FIRST;
        let mut failing = false;
        let mut next = Duration::ZERO;
        loop {
            let woken = tokio::select! {
                _ = tokio::time::sleep(next) => false,
                _ = identity.renew_now.notified() => true,
                _ = stop.wait_for(|stop| *stop) => return,
            };
            if woken {
                // A rotation reaches every sidecar at once: spread them.
                tokio::time::sleep(Duration::from_millis(fastrand::u64(..1000))).await;
            }
            let result = tokio::select! {
                result = identity.renew_once(source.as_ref(), &instance_id, &common_name) => result,
                _ = stop.wait_for(|stop| *stop) => return,
            };
            identity.first_attempt.send_replace(true);
            match result {
                Ok(()) => {
                    if failing {
                        tracing::info!("workload certificate renewed again");
                    }
                    failing = false;
                    backoff = BACKOFF_FIRST;
                    next = identity.leaf().map_or(BACKOFF_FIRST, |leaf| {
                        renewal_time(&leaf)
                            .duration_since(SystemTime::now())
                            .unwrap_or_default()
                            .max(MIN_RENEWAL_PAUSE)
                    });
                }
                Err(error) => {
                    identity.metrics.failures.inc();
                    let expires = identity
                        .leaf()
                        .map(|leaf| humantime::format_rfc3339_seconds(leaf.not_after).to_string());
                    if failing {
                        tracing::debug!(%error, "workload certificate request failed again");
                    } else {
                        tracing::warn!(%error, current_expires = ?expires,
                            "cannot get a workload certificate; keeping the current one (if any) and retrying");
                    }
                    failing = true;
                    // Never past the current certificate's expiry.
                    let until_expiry = identity
                        .leaf()
                        .and_then(|leaf| leaf.not_after.duration_since(SystemTime::now()).ok());
                    next = until_expiry.map_or(backoff, |left| {
                        backoff.min(left.max(Duration::from_millis(100)))
                    });
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    });
}
