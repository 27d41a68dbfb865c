//! Configuration and the control plane: the snapshot the request path
//! reads, how it is replaced, and what the sidecar tells the control
//! plane.
//!
//! ```text
//! control plane ══ watch (snapshot, deltas) ══► client: MeshState::apply ─► Snapshot::build ─► ArcSwap::store ─► persist
//! control plane ◄═ register, heartbeat {healthy}, deregister ══ client ◄─ health (probe of the app)
//! control plane ◄═ StatsReport every --stats-interval ══ stats ◄─ route handles, limiters, breakers
//! control plane ◄═ TapBatch (only while tapped) ══ tap_sender ◄─ telemetry::tap queue
//! ```
//!
//! - `snapshot` — the immutable mesh view (`Snapshot`, `SharedSnapshot`)
//!   and its build from a `MeshState`.
//! - `client` — the control-plane client: registration, heartbeats,
//!   watch, backoff, the epoch rule of resuming.
//! - `replicas` — the control plane's replicas (`--control-plane
//!   URL1,URL2`, names with several addresses): which one calls go to,
//!   failing over to the next, the backoff over rounds of replicas.
//! - `persist` — the snapshot file: a private directory, owner and mode
//!   checks before reading, atomic 0600 writes.
//! - `health` — the prober of the local app (plain HTTP).
//! - `stats` — the stats reporter.
//! - `tap_sender` — tapped requests' events to the control plane
//!   (`meshctl tap`; the taps themselves arrive on the watch stream).
//!
//! Every call goes through `meshlet_client`: to the control plane with the
//! client of `ControlPlaneSettings` (TLS trusting only the mesh CA, the
//! sidecar's bearer token), to the local app without either.
//!
//! **Invariants:** nothing here is on the request path: a failing control
//! plane costs only freshness (requests keep the last snapshot); a new
//! snapshot is swapped in whole, never mutated; rebuilding keeps unchanged
//! endpoints (pools, counters) and unchanged policies' state.

pub(crate) mod client;
pub(crate) mod health;
pub mod persist;
pub mod replicas;
pub(crate) mod snapshot;
pub(crate) mod stats;
pub(crate) mod tap_sender;

/// One call to the control plane through `client` within `timeout`: a JSON
/// `body` if any; the whole answer's body, or [`ClientError::Status`] for a
/// non-2xx answer. Errors name the control plane's authority.
pub(crate) async fn call(
    client: &meshlet_client::Client,
    authority: &str,
    method: http::Method,
    path: &str,
    body: Option<Vec<u8>>,
    timeout: std::time::Duration,
) -> Result<bytes::Bytes, meshlet_client::ClientError> {
    let mut request = meshlet_client::request(method, authority, path);
    if body.is_some() {
        request = request.header(http::header::CONTENT_TYPE, "application/json");
    }
    let request = request
        .body(http_body_util::Full::new(bytes::Bytes::from(
            body.unwrap_or_default(),
        )))
        .map_err(|source| meshlet_client::ClientError::Request {
            authority: authority.to_owned(),
            source,
        })?;
    let reply = client
        .clone()
        .timeout(timeout)
        .fetch(authority, request)
        .await?;
    Ok(reply.success(authority)?.body)
}
