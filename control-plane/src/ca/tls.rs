//! rustls configuration for the API server's HTTPS listener.
//!
//! [`server_tls_config`] takes the PEM chain and key from
//! [`MeshCa::issue_server_cert`](super::MeshCa::issue_server_cert) and
//! returns a `rustls::ServerConfig` using the ring provider, TLS 1.3 and 1.2
//! (rustls picks 1.3 whenever the client offers it), no client certificates
//! (the API authenticates with bearer tokens) and ALPN `http/1.1` (the API
//! server speaks HTTP/1.1). The lead wraps it in a
//! `tokio_rustls::TlsAcceptor`. Clients build their own `ClientConfig`
//! whose root store holds only `ca.crt`.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::error::CaError;

/// The ring crypto provider every meshlet TLS config uses.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Parses a PEM certificate chain (leaf first).
pub fn parse_chain(chain_pem: &str) -> Result<Vec<CertificateDer<'static>>, CaError> {
    let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| CaError::Pem {
            what: "the certificate chain",
        })?;
    if chain.is_empty() {
        return Err(CaError::Pem {
            what: "the certificate chain",
        });
    }
    Ok(chain)
}

/// A server config for the API: the chain and key (PEM), ALPN `http/1.1`.
pub fn server_tls_config(chain_pem: &str, key_pem: &str) -> Result<rustls::ServerConfig, CaError> {
    let chain = parse_chain(chain_pem)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|_| CaError::Pem {
        what: "the server key",
    })?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}
