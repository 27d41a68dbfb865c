//! [`MeshCa`]: the root certificate and key, and the certificates it issues.
//! See the [`ca`](crate::ca) module docs for what each certificate holds.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use ring::rand::{SecureRandom, SystemRandom};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use time::OffsetDateTime;

use super::error::{cert_err, CaError};
use meshlet_api::identity::{self as spiffe, SpiffeId, SpiffeIdError};

/// Validity of a new CA.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// How far in the past a leaf's validity starts, for clocks slightly behind.
pub const BACKDATE: Duration = Duration::from_secs(5 * 60);
/// Largest CSR accepted (PEM text).
pub const MAX_CSR_LEN: usize = 16 * 1024;
/// The Kubernetes Service names of the control plane, always in the server certificate.
pub const KUBERNETES_NAMES: [&str; 4] = [
    "meshlet-control-plane",
    "meshlet-control-plane.meshlet",
    "meshlet-control-plane.meshlet.svc",
    "meshlet-control-plane.meshlet.svc.cluster.local",
];

/// A certificate and its private key, both PEM; `Debug` hides the key.
#[derive(Clone)]
pub struct IssuedCert {
    /// Leaf first, then the CA certificate.
    pub chain_pem: String,
    /// PKCS#8 PEM.
    pub key_pem: String,
    pub not_after: SystemTime,
}

impl fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedCert")
            .field("not_after", &self.not_after)
            .field("key_pem", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// A signed workload certificate (the sidecar keeps its own key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadCert {
    /// The leaf alone, PEM.
    pub cert_pem: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// Serial number, lowercase hex (for logs and `meshctl describe`).
    pub serial: String,
}

/// The mesh CA: its certificate and the key that signs with it.
pub struct MeshCa {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    subject: String,
    not_after: OffsetDateTime,
    /// SHA-256 of the DER certificate, lowercase hex.
    fingerprint: String,
    /// The certificate's serial number, lowercase hex.
    serial: String,
}

impl fmt::Debug for MeshCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MeshCa")
            .field("subject", &self.subject)
            .field("not_after", &self.not_after)
            .field("fingerprint", &self.fingerprint)
            .field("key", &"<redacted>")
            .finish()
    }
}

impl MeshCa {
    /// A new self-signed CA for `trust_domain`.
    pub fn create(trust_domain: &str) -> Result<MeshCa, CaError> {
        spiffe::validate_trust_domain(trust_domain)?;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(cert_err("generate CA key"))?;
        Self::self_sign(trust_domain, key)
    }

    /// A new self-signed CA certificate for an existing key (used when
    /// `ca.crt` was lost but `ca.key` is there: leaves signed before still verify).
    pub(crate) fn self_sign(trust_domain: &str, key: KeyPair) -> Result<MeshCa, CaError> {
        let now = OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "meshlet");
        dn.push(
            DnType::CommonName,
            format!("meshlet mesh CA {trust_domain}"),
        );
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = now - BACKDATE;
        params.not_after = now + CA_VALIDITY;
        params.serial_number = Some(random_serial()?);
        let cert = params
            .self_signed(&key)
            .map_err(cert_err("self-sign the CA certificate"))?;
        Self::from_parts(cert.pem(), key)
    }

    /// Loads a CA from its certificate and PKCS#8 key (both PEM).
    pub fn load(cert_pem: &str, key_pem: &str) -> Result<MeshCa, CaError> {
        let key = KeyPair::from_pem(key_pem).map_err(|_| CaError::Pem { what: "the CA key" })?;
        Self::from_parts(cert_pem.to_owned(), key)
    }

    fn from_parts(cert_pem: String, key: KeyPair) -> Result<MeshCa, CaError> {
        let cert_der =
            CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|_| CaError::Pem {
                what: "the CA certificate",
            })?;
        let (subject, not_after, serial) = {
            let (_, x509) =
                x509_parser::parse_x509_certificate(&cert_der).map_err(|e| CaError::NotACa {
                    reason: format!("does not parse: {e}"),
                })?;
            let not_ca = |reason: &str| CaError::NotACa {
                reason: reason.to_owned(),
            };
            let bc = x509
                .basic_constraints()
                .map_err(|_| not_ca("bad basic constraints"))?
                .ok_or_else(|| not_ca("no basic constraints"))?;
            if !bc.value.ca {
                return Err(not_ca("CA:FALSE"));
            }
            if let Some(ku) = x509.key_usage().map_err(|_| not_ca("bad key usage"))? {
                if !ku.value.key_cert_sign() {
                    return Err(not_ca("key usage lacks keyCertSign"));
                }
            }
            x509.verify_signature(None)
                .map_err(|_| not_ca("its self-signature does not verify"))?;
            let spki = rcgen::PublicKeyData::subject_public_key_info(&key);
            if x509.public_key().raw != spki.as_slice() {
                return Err(CaError::KeyMismatch);
            }
            (
                x509.subject().to_string(),
                x509.validity().not_after.to_datetime(),
                hex(x509.raw_serial()),
            )
        };
        let fingerprint = hex(ring::digest::digest(&ring::digest::SHA256, &cert_der).as_ref());
        let issuer = Issuer::from_ca_cert_der(&cert_der, key)
            .map_err(cert_err("read the CA certificate"))?;
        Ok(MeshCa {
            cert_pem,
            cert_der,
            issuer,
            subject,
            not_after,
            fingerprint,
            serial,
        })
    }

    /// The CA certificate, PEM: what clients trust (`ca.crt`).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The CA's private key, PKCS#8 PEM, for writing `ca.key` (0600) only.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// The CA certificate's subject, e.g. `O=meshlet, CN=meshlet mesh CA meshlet.local`.
    pub fn subject(&self) -> &str {
        &self.subject
    }

    pub fn not_after(&self) -> SystemTime {
        to_system_time(self.not_after)
    }

    /// SHA-256 of the DER certificate, lowercase hex: how roots are named
    /// in `CaStatus`, `IssuedLeaf::root` and `ca-roots/`.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The CA certificate's serial number, lowercase hex.
    pub fn serial(&self) -> &str {
        &self.serial
    }

    /// Issues the API server's certificate for `names` (DNS names or IP
    /// addresses, see [`server_names`]), valid for `ttl`.
    pub fn issue_server_cert(
        &self,
        names: &[String],
        ttl: Duration,
    ) -> Result<IssuedCert, CaError> {
        if names.is_empty() {
            return Err(CaError::InvalidName {
                name: String::new(),
                reason: "a server certificate needs at least one name",
            });
        }
        let mut params = self.leaf_params(ttl)?;
        params.subject_alt_names = names
            .iter()
            .map(|n| server_san(n))
            .collect::<Result<_, _>>()?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "meshlet");
        dn.push(DnType::CommonName, "meshlet control plane");
        params.distinguished_name = dn;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(cert_err("generate server key"))?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(cert_err("sign the server certificate"))?;
        Ok(IssuedCert {
            chain_pem: format!("{}{}", cert.pem(), self.cert_pem),
            key_pem: key.serialize_pem(),
            not_after: to_system_time(params.not_after),
        })
    }

    /// Signs a workload's CSR for `id`: the leaf's only SAN is `id`'s URI,
    /// whatever the CSR asks for. The CSR's own signature must verify.
    pub fn sign_workload_csr(
        &self,
        csr_pem: &str,
        id: &SpiffeId,
        ttl: Duration,
    ) -> Result<WorkloadCert, CaError> {
        if csr_pem.len() > MAX_CSR_LEN {
            return Err(CaError::InvalidCsr {
                reason: format!("larger than {MAX_CSR_LEN} bytes"),
            });
        }
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| {
            CaError::InvalidCsr {
                reason: e.to_string(),
            }
        })?;
        let mut params = self.leaf_params(ttl)?;
        let uri = id.to_string();
        params.subject_alt_names = vec![SanType::URI(uri.as_str().try_into().map_err(|_| {
            CaError::InvalidSpiffeId(SpiffeIdError {
                id: uri.clone(),
                reason: "not ASCII",
            })
        })?)];
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "meshlet");
        dn.push(DnType::OrganizationalUnitName, id.namespace());
        dn.push(DnType::CommonName, id.service_account());
        params.distinguished_name = dn;
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let serial = params
            .serial_number
            .as_ref()
            .map(|s| hex(s.to_bytes().as_slice()))
            .unwrap_or_default();
        let cert = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(cert_err("sign the workload certificate"))?;
        Ok(WorkloadCert {
            cert_pem: cert.pem(),
            not_before: to_system_time(params.not_before),
            not_after: to_system_time(params.not_after),
            serial,
        })
    }

    /// Common leaf settings: validity (backdated, capped at the CA's end),
    /// random serial, `CA:FALSE`, digitalSignature, authority key id.
    fn leaf_params(&self, ttl: Duration) -> Result<CertificateParams, CaError> {
        if ttl.is_zero() {
            return Err(CaError::InvalidTtl { ttl });
        }
        let now = OffsetDateTime::now_utc();
        if now >= self.not_after {
            return Err(CaError::CaExpired {
                ca_not_after: self.not_after.to_string(),
            });
        }
        let ttl = time::Duration::try_from(ttl).map_err(|_| CaError::InvalidTtl { ttl })?;
        let mut params = CertificateParams::default();
        params.not_before = now - BACKDATE;
        params.not_after = now
            .checked_add(ttl)
            .map_or(self.not_after, |t| t.min(self.not_after));
        params.serial_number = Some(random_serial()?);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        Ok(params)
    }
}

/// The names for the API server's certificate: the `--listen` IP (unless
/// unspecified), `localhost`, `127.0.0.1`, `::1`, the `--advertise-name`s and
/// the Kubernetes Service names, without duplicates, in that order.
pub fn server_names(listen: SocketAddr, advertise: &[String]) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    let mut push = |n: String| {
        if !names.contains(&n) {
            names.push(n);
        }
    };
    if !listen.ip().is_unspecified() {
        push(listen.ip().to_string());
    }
    push("localhost".into());
    push("127.0.0.1".into());
    push("::1".into());
    for n in advertise {
        push(n.trim().to_ascii_lowercase());
    }
    for n in KUBERNETES_NAMES {
        push(n.into());
    }
    names
}

/// One server SAN: an IP address or a DNS name (letters, digits, `-`, `.`; no wildcard).
fn server_san(name: &str) -> Result<SanType, CaError> {
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let bad = |reason| CaError::InvalidName {
        name: name.to_owned(),
        reason,
    };
    if name.is_empty() || name.len() > 253 {
        return Err(bad("a DNS name has 1 to 253 characters"));
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(bad("each DNS label has 1 to 63 characters"));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            || label.starts_with('-')
            || label.ends_with('-')
        {
            return Err(bad("not an IP address or a DNS name"));
        }
    }
    Ok(SanType::DnsName(
        name.to_ascii_lowercase()
            .try_into()
            .map_err(|_| bad("not ASCII"))?,
    ))
}

/// 16 random bytes, positive and without a leading zero byte (minimal DER).
fn random_serial() -> Result<SerialNumber, CaError> {
    let mut bytes = [0u8; 16];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| CaError::Random)?;
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

fn to_system_time(t: OffsetDateTime) -> SystemTime {
    let secs = t.unix_timestamp();
    if secs >= 0 {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs as u64)
    } else {
        SystemTime::UNIX_EPOCH
    }
}
