//! The two rustls verifiers of the mesh hop, both reading the current
//! trust bundle on every handshake (a new bundle applies to the next
//! handshake, never to an open connection).
//!
//! - [`PeerVerifier`] (client side, one per connection): the server's chain
//!   must lead to a root of the bundle (signatures, validity, `serverAuth`)
//!   AND its URI SAN must be the SPIFFE id the registry names for that
//!   endpoint. The TLS server name plays no part (the identity is the
//!   name). A wrong identity fails with [`IdentityMismatch`] inside the
//!   rustls error, so the caller can say `peer_identity_mismatch`.
//! - [`BundleClientVerifier`] (server side): a client certificate is
//!   required, verified by rustls' `WebPkiClientVerifier` over the bundle,
//!   and must carry a SPIFFE URI SAN; [`peer_identity`] reads it back for
//!   `Peer.identity`.

use std::sync::Arc;

use meshlet_api::identity::SpiffeId;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::ParsedCertificate;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error, OtherError, SignatureScheme,
};

use crate::identity::provider::provider;
use crate::identity::workload::WorkloadIdentity;

/// The server presented a valid certificate of another workload.
#[derive(Debug, Clone, thiserror::Error)]
#[error("peer presented {presented}, expected {expected}")]
pub struct IdentityMismatch {
    pub expected: String,
    pub presented: String,
}

/// The SPIFFE id in the URI SAN of a DER certificate: `Err` says why there
/// is none (not parseable, no URI SAN, not a workload SPIFFE id).
pub fn spiffe_id_of(der: &[u8]) -> Result<SpiffeId, String> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| format!("certificate: {e}"))?;
    let sans = cert
        .subject_alternative_name()
        .map_err(|e| format!("certificate SAN: {e}"))?
        .ok_or_else(|| "the certificate has no subject alternative name".to_owned())?;
    let mut uris = sans
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            x509_parser::extensions::GeneralName::URI(uri) => Some(*uri),
            _ => None,
        });
    let uri = uris
        .next()
        .ok_or_else(|| "the certificate has no URI SAN".to_owned())?;
    if uris.next().is_some() {
        return Err("the certificate has more than one URI SAN".to_owned());
    }
    SpiffeId::parse(uri).map_err(|e| e.to_string())
}

/// The verified identity of a TLS peer (its end-entity certificate).
pub fn peer_identity(certificates: Option<&[CertificateDer<'_>]>) -> Option<Arc<SpiffeId>> {
    let leaf = certificates?.first()?;
    spiffe_id_of(leaf).ok().map(Arc::new)
}

fn schemes() -> Vec<SignatureScheme> {
    provider()
        .signature_verification_algorithms
        .supported_schemes()
}

fn tls13_signature(
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, Error> {
    rustls::crypto::verify_tls13_signature(
        message,
        cert,
        dss,
        &provider().signature_verification_algorithms,
    )
}

/// The mesh hop is TLS 1.3 only (the configurations offer nothing else).
fn tls12_refused() -> Error {
    Error::General("TLS 1.2 is not used between sidecars".to_owned())
}

fn bad(reason: String) -> Error {
    Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(
        std::io::Error::other(reason),
    ))))
}

/// Client side of a mesh hop to an endpoint that must be `expected`.
#[derive(Debug)]
pub struct PeerVerifier {
    pub identity: Arc<WorkloadIdentity>,
    pub expected: Arc<SpiffeId>,
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let bundle = self.identity.bundle();
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            bundle.roots(),
            intermediates,
            now,
            provider().signature_verification_algorithms.all,
        )?;
        let presented = spiffe_id_of(end_entity).map_err(bad)?;
        if presented != *self.expected {
            return Err(Error::InvalidCertificate(CertificateError::Other(
                OtherError(Arc::new(IdentityMismatch {
                    expected: self.expected.to_string(),
                    presented: presented.to_string(),
                })),
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        Err(tls12_refused())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        schemes()
    }
}

/// Server side: client certificates are required and verified against the
/// current bundle.
#[derive(Debug)]
pub struct BundleClientVerifier {
    pub identity: Arc<WorkloadIdentity>,
}

impl ClientCertVerifier for BundleClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let bundle = self.identity.bundle();
        let verifier = bundle
            .client_verifier()
            .ok_or(Error::InvalidCertificate(CertificateError::UnknownIssuer))?;
        verifier.verify_client_cert(end_entity, intermediates, now)?;
        spiffe_id_of(end_entity).map_err(bad)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        Err(tls12_refused())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        schemes()
    }
}
