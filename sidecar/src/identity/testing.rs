//! Test-only: a small CA (rcgen) that signs the sidecar's CSRs like the
//! control plane does (URI SAN only, serverAuth + clientAuth), and a
//! [`CertificateSource`] over it.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use meshlet_api::identity::SpiffeId;
use meshlet_api::mesh::{CertificateReply, CertificateRequest};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};

use crate::identity::workload::{CertificateSource, WorkloadIdentity};
use crate::telemetry::metrics::Metrics;

/// A root that signs leaves.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    pub pem: String,
    serial: AtomicU64,
}

fn ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

impl TestCa {
    pub fn new(name: &str) -> Arc<TestCa> {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).unwrap();
        Arc::new(TestCa {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
            serial: AtomicU64::new(1),
        })
    }

    /// Signs `csr` for `identity`, valid from `not_before` to `not_after`.
    pub fn sign(
        &self,
        csr: &str,
        identity: &str,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> CertificateReply {
        let mut request = CertificateSigningRequestParams::from_pem(csr).unwrap();
        let serial = self.serial.fetch_add(1, Ordering::Relaxed);
        let params = &mut request.params;
        params.subject_alt_names = vec![SanType::URI(identity.try_into().unwrap())];
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.serial_number = Some(SerialNumber::from(serial));
        params.not_before = time::OffsetDateTime::from(not_before);
        params.not_after = time::OffsetDateTime::from(not_after);
        let cert = request.signed_by(&self.issuer).unwrap();
        CertificateReply {
            identity: identity.to_owned(),
            certificate: cert.pem(),
            trust_roots: self.pem.clone(),
            serial: format!("{serial:x}"),
            not_before_ms: ms(not_before),
            not_after_ms: ms(not_after),
        }
    }
}

/// Signs every request with the current CA for one identity and TTL;
/// can be told to fail (a control plane that is down).
pub struct TestSource {
    pub ca: Mutex<Arc<TestCa>>,
    /// The bundle sent with each reply (default: the CA's root).
    pub bundle: Mutex<Option<String>>,
    pub identity: String,
    pub ttl: Duration,
    pub down: AtomicBool,
    pub calls: AtomicUsize,
}

impl TestSource {
    pub fn new(ca: &Arc<TestCa>, identity: &str, ttl: Duration) -> Arc<TestSource> {
        Arc::new(TestSource {
            ca: Mutex::new(Arc::clone(ca)),
            bundle: Mutex::new(None),
            identity: identity.to_owned(),
            ttl,
            down: AtomicBool::new(false),
            calls: AtomicUsize::new(0),
        })
    }
}

impl CertificateSource for TestSource {
    fn sign(
        &self,
        request: CertificateRequest,
    ) -> Pin<Box<dyn Future<Output = Result<CertificateReply, String>> + Send + '_>> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let result = if self.down.load(Ordering::Relaxed) {
            Err("control plane down".to_owned())
        } else {
            let now = SystemTime::now() - Duration::from_secs(1);
            let ca = Arc::clone(&self.ca.lock().unwrap());
            let mut reply = ca.sign(&request.csr, &self.identity, now, now + self.ttl);
            if let Some(bundle) = self.bundle.lock().unwrap().clone() {
                reply.trust_roots = bundle;
            }
            Ok(reply)
        };
        Box::pin(async move { result })
    }
}

pub fn spiffe(service: &str) -> Arc<SpiffeId> {
    Arc::new(SpiffeId::new("meshlet.local", "default", service).unwrap())
}

/// A workload identity holding a certificate for `service` from `ca`.
pub async fn identity_for(ca: &Arc<TestCa>, service: &str) -> Arc<WorkloadIdentity> {
    let identity = WorkloadIdentity::new(Metrics::new(service).identity());
    let source = TestSource::new(ca, &spiffe(service).to_string(), Duration::from_secs(3600));
    identity
        .renew_once(source.as_ref(), "test-instance", service)
        .await
        .unwrap();
    identity
}
