//! The trust bundle: the mesh CA's roots (PEM, one or more; two during a
//! rotation, the signing root first), parsed once per change into what
//! the verifiers need.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::RootCertStore;

use crate::identity::provider::provider;

/// The roots peers are verified against.
pub struct TrustBundle {
    pem: String,
    /// Every root (peers may hold a leaf of any of them).
    roots: Arc<RootCertStore>,
    /// The first root alone: the one that signs new leaves.
    first: Option<RootCertStore>,
    /// The server side's verifier of client certificates over `roots`.
    client_verifier: Option<Arc<dyn ClientCertVerifier>>,
}

impl TrustBundle {
    /// No roots: every peer certificate is refused.
    pub fn empty() -> Self {
        TrustBundle {
            pem: String::new(),
            roots: Arc::new(RootCertStore::empty()),
            first: None,
            client_verifier: None,
        }
    }

    /// Parses a PEM bundle (at least one certificate).
    pub fn parse(pem: &str) -> Result<Self, String> {
        let mut roots = RootCertStore::empty();
        let mut first = None;
        for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            let cert = cert.map_err(|e| format!("trust bundle: {e}"))?;
            if first.is_none() {
                let mut alone = RootCertStore::empty();
                alone
                    .add(cert.clone())
                    .map_err(|e| format!("trust bundle: {e}"))?;
                first = Some(alone);
            }
            roots.add(cert).map_err(|e| format!("trust bundle: {e}"))?;
        }
        if first.is_none() {
            return Err("trust bundle: no PEM certificate".to_owned());
        }
        let roots = Arc::new(roots);
        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::clone(&roots), provider())
                .build()
                .map_err(|e| format!("trust bundle: {e}"))?;
        Ok(TrustBundle {
            pem: pem.to_owned(),
            roots,
            first,
            client_verifier: Some(client_verifier),
        })
    }

    pub fn pem(&self) -> &str {
        &self.pem
    }

    pub fn len(&self) -> usize {
        self.roots.len()
    }

    pub fn roots(&self) -> &RootCertStore {
        &self.roots
    }

    pub fn client_verifier(&self) -> Option<&Arc<dyn ClientCertVerifier>> {
        self.client_verifier.as_ref()
    }

    /// Whether the first root signed `leaf` (valid from `not_before` to
    /// `not_after`): its chain is checked at a time inside its validity,
    /// so an expired leaf is still attributed to its issuer.
    pub fn first_root_signed(
        &self,
        leaf: &CertificateDer<'_>,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> bool {
        let Some(first) = &self.first else {
            return false;
        };
        let Ok(parsed) = ParsedCertificate::try_from(leaf) else {
            return false;
        };
        let latest = not_after
            .checked_sub(Duration::from_secs(1))
            .unwrap_or(not_after);
        let at = SystemTime::now().min(latest).max(not_before);
        let at = UnixTime::since_unix_epoch(at.duration_since(UNIX_EPOCH).unwrap_or_default());
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            first,
            &[],
            at,
            provider().signature_verification_algorithms.all,
        )
        .is_ok()
    }
}
