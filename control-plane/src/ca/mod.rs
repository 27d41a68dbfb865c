//! The mesh certificate authority (issues 13 and 14).
//!
//! What it does:
//! - [`MeshCa::create`] makes a self-signed root: ECDSA P-256, `CA:TRUE`
//!   with path length 0 (it signs leaves only), key usage keyCertSign +
//!   cRLSign + digitalSignature, valid 10 years, subject
//!   `CN=meshlet mesh CA <trust domain>, O=meshlet`. [`MeshCa::load`] reads
//!   one back from PEM, checking that it is a CA, that its self-signature
//!   holds and that the key is the certificate's.
//! - [`MeshCa::issue_server_cert`] issues the API server's certificate (a
//!   fresh P-256 key, serverAuth, the SANs given — see [`server_names`]).
//! - [`MeshCa::sign_workload_csr`] signs a sidecar's CSR (issue 14): the CSR's
//!   signature is verified and only its public key is used; the leaf carries
//!   exactly one SAN, the [`SpiffeId`] URI (`meshlet_api::identity`) the control plane decided from the
//!   sidecar's token, whatever names the CSR asked for; clientAuth +
//!   serverAuth, `CA:FALSE`.
//! - [`tls::server_tls_config`] turns a chain and key into a rustls server
//!   config (ring provider, TLS 1.3 preferred, 1.2 allowed, ALPN `http/1.1`).
//! - [`store::load_or_create`] keeps the CA in the data dir: `ca.crt`
//!   (public, 0644) and `ca.key` (0600, never leaves the data dir).
//! - [`roots::Roots`] are the workload roots in trust-bundle order (the
//!   first signs) and their rotation in three phases, persisted in
//!   `ca-roots/` (see that module). `ca.crt`/`ca.key` stay the API's CA:
//!   the root created on first start keeps issuing the API server's
//!   certificate, so `ca.crt` remains the `--ca-file` of meshctl and the
//!   sidecars after a rotation has retired it from the mesh bundle.
//!
//! Data flow: start-up → `load_or_create(DATA_DIR)` → `issue_server_cert`
//! → `server_tls_config` → the HTTPS listener. Clients (meshctl, sidecars)
//! get `ca.crt` out of band (`--ca-file`) and trust only it. Later a sidecar
//! authenticated with its token (role sidecar, `Action::SignCertificate`)
//! posts a CSR; the API builds the SPIFFE id from the token's namespace and
//! service and calls `sign_workload_csr`.
//!
//! Who may use what: only the control plane holds a [`MeshCa`] (its key);
//! `Debug` never prints the key. Validity: leaves start 5 minutes in the past
//! (clock skew) and never outlive the CA.

pub mod authority;
pub mod error;
pub mod roots;
pub mod store;
pub mod tls;

pub use authority::{
    hex, server_names, IssuedCert, MeshCa, WorkloadCert, BACKDATE, CA_VALIDITY, KUBERNETES_NAMES,
    MAX_CSR_LEN,
};
pub use error::CaError;
pub use meshlet_api::identity::SpiffeId;
pub use roots::{Phase, Roots, SharedRoots, ROOTS_DIR, ROOTS_STATE_FILE};
pub use store::{load_or_create, CaOrigin, CA_CERT_FILE, CA_KEY_FILE};
pub use tls::server_tls_config;

#[cfg(test)]
mod tests;
