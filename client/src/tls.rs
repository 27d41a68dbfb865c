//! TLS for the client: a rustls client configuration that trusts exactly
//! the mesh CA (the `--ca-file` PEM bundle, e.g. the control plane's
//! `DATA_DIR/ca.crt`) and no system roots, so a meshlet program only talks
//! to peers whose certificate that CA signed. The ring provider, TLS 1.3
//! and 1.2, ALPN `http/1.1`.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};

/// Why a TLS client configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the CA file {path}: {source}")]
    ReadCa {
        path: String,
        source: std::io::Error,
    },
    #[error("the CA bundle {origin} holds no PEM certificate")]
    NoCertificate { origin: String },
    #[error("the CA bundle {origin} holds an invalid certificate: {reason}")]
    BadCertificate { origin: String, reason: String },
}

/// A client configuration trusting only the certificates of the PEM bundle
/// `pem` (`origin` names it in errors: the file's path).
pub fn client_config_from_ca_pem(pem: &[u8], origin: &str) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    let mut found = 0;
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| TlsError::BadCertificate {
            origin: origin.to_owned(),
            reason: e.to_string(),
        })?;
        roots.add(cert).map_err(|e| TlsError::BadCertificate {
            origin: origin.to_owned(),
            reason: e.to_string(),
        })?;
        found += 1;
    }
    if found == 0 {
        return Err(TlsError::NoCertificate {
            origin: origin.to_owned(),
        });
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::BadCertificate {
            origin: origin.to_owned(),
            reason: e.to_string(),
        })?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Reads the PEM bundle at `path` into a client configuration.
pub fn client_config_from_ca_file(path: &std::path::Path) -> Result<Arc<ClientConfig>, TlsError> {
    let origin = path.display().to_string();
    let pem = std::fs::read(path).map_err(|source| TlsError::ReadCa {
        path: origin.clone(),
        source,
    })?;
    client_config_from_ca_pem(&pem, &origin)
}

/// The name a server's certificate must carry for `authority`
/// (`host:port`, `[v6]:port`): its host, as a DNS name or an IP address.
pub(crate) fn server_name(authority: &str) -> Option<ServerName<'static>> {
    let host = match authority.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => authority,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_owned()).ok()
}
