//! The CA's error type, shared by its modules.

use std::time::Duration;

/// A CA error, saying what was being done.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{what}: {source}")]
    Cert {
        what: &'static str,
        #[source]
        source: rcgen::Error,
    },
    /// The CSR does not parse, its signature is wrong, or it has an
    /// unsupported extension (→ 400).
    #[error("invalid certificate signing request: {reason}")]
    InvalidCsr { reason: String },
    #[error("{what} is not valid PEM")]
    Pem { what: &'static str },
    #[error("the CA certificate is not usable: {reason}")]
    NotACa { reason: String },
    #[error("the CA key does not belong to the CA certificate")]
    KeyMismatch,
    #[error("invalid certificate name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error(transparent)]
    InvalidSpiffeId(#[from] meshlet_api::identity::SpiffeIdError),
    #[error("invalid certificate ttl {ttl:?}: must be more than zero")]
    InvalidTtl { ttl: Duration },
    #[error("the CA expires at {ca_not_after}; it cannot issue certificates any more")]
    CaExpired { ca_not_after: String },
    #[error("tls configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error(transparent)]
    File(#[from] crate::files::FileError),
    #[error("{present} exists but {missing} does not; {hint}")]
    Incomplete {
        present: String,
        missing: String,
        hint: &'static str,
    },
    #[error("the system random number generator failed")]
    Random,
}

pub(crate) fn cert_err(what: &'static str) -> impl FnOnce(rcgen::Error) -> CaError {
    move |source| CaError::Cert { what, source }
}
