//! Configuration and the control plane: the snapshot the request path
//! reads, how it is replaced, and what the sidecar tells the control
//! plane.
//!
//! ```text
//! control plane ══ watch (snapshot, deltas) ══► client: MeshState::apply ─► Snapshot::build ─► ArcSwap::store ─► persist
//! control plane ◄═ register, heartbeat {healthy}, deregister ══ client ◄─ health (probe of the app)
//! control plane ◄═ StatsReport every --stats-interval ══ stats ◄─ route handles, limiters, breakers
//! ```
//!
//! - `snapshot` — the immutable mesh view (`Snapshot`, `SharedSnapshot`)
//!   and its build from a `MeshState`.
//! - `client` — the control-plane client: registration, heartbeats,
//!   watch, backoff, the persisted snapshot file.
//! - `health` — the prober of the local app.
//! - `stats` — the stats reporter.
//!
//! **Invariants:** nothing here is on the request path: a failing control
//! plane costs only freshness (requests keep the last snapshot); a new
//! snapshot is swapped in whole, never mutated; rebuilding keeps unchanged
//! endpoints (pools, counters) and unchanged policies' state.

pub(crate) mod client;
pub(crate) mod health;
pub(crate) mod snapshot;
pub(crate) mod stats;
