//! The sidecar's workload identity and the mTLS transport between sidecars.
//!
//! ```text
//! renew (task): P-256 key in memory ─► CSR ─► CertificateSource (control plane:
//!   POST /api/v1/certificates) ─► Leaf ─► ArcSwap ──► resolvers (tls) ─► every new handshake
//! watch stream (control::client) ─► MeshState.trust_roots ─► set_bundle ─► ArcSwap<TrustBundle>
//!   └─ first root did not sign the current leaf (CA rotation) ─► renew now (0–1 s jitter)
//! listen::server ─► tls::accept (client cert required, URI SAN → Peer.identity)
//! upstream::pool ─► tls::connect (chain against the bundle AND URI SAN == the endpoint's identity)
//! ```
//!
//! - `workload` — [`WorkloadIdentity`]: the current certificate ([`Leaf`])
//!   and trust bundle, each in an `ArcSwap`, read without locks by every
//!   handshake; [`Hop`], whether a hop to an endpoint is mTLS;
//!   [`CertificateSource`], who signs.
//! - `provider` — the rustls crypto provider (ring), made once.
//! - `bundle` — [`bundle::TrustBundle`]: the PEM roots parsed once per
//!   change, with the verifier state built from them.
//! - `verify` — rustls verifiers: the client side checks the server's chain
//!   and that its URI SAN is the identity the registry names; the server
//!   side requires a client certificate from the bundle.
//! - `tls` — the rustls configurations (TLS 1.3 only, ring), the
//!   certificate resolvers that read the current leaf (hot swap: new
//!   handshakes use the new certificate, open connections keep theirs),
//!   `accept`, `connect`, and [`tls::TlsFailure`] (why a hop failed).
//! - `renew` — the key and CSR, the renewal task (2/3 of the lifetime ±10 %,
//!   backoff 1 s → 30 s on failure, the current certificate kept until it
//!   expires).
//!
//! **Invariants:** the private key never leaves the process (never
//! written, never logged); no request waits on the control plane (a
//! renewal swaps a pointer); a sidecar without a certificate (standalone,
//! or the control plane never answered) speaks plaintext exactly as before.
//! Nothing here imports the request path (`listen`, `proxy`, `upstream`) or
//! `control`: the control plane is reached through [`CertificateSource`].

pub(crate) mod bundle;
pub(crate) mod provider;
pub(crate) mod renew;
pub(crate) mod tls;
pub(crate) mod verify;
pub(crate) mod workload;

pub use workload::{CertificateSource, Hop, WorkloadIdentity};

#[cfg(test)]
pub(crate) mod testing;
#[cfg(test)]
mod tests;
