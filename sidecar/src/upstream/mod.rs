//! Sending one request to a [`target::ServiceTarget`] under the policies
//! that apply to it, and the connections that carry it.
//!
//! ```text
//! forward: concurrency slot ─► deadline ─► retry loop ─► one try:
//!          split subset ─► admit (balance pick among endpoints whose breaker allows)
//!          ─► send (pool) ─► record the outcome on the breaker
//!          (a refused connection comes back unsent ─► next endpoint)
//! ```
//!
//! - `forward` — the order of the policies for one request and the phases
//!   of one try.
//! - `target` — `ServiceTarget`: a destination's endpoints, policies and
//!   metric handles.
//! - `balance` — `Endpoint` (in-flight count, passive ejection) and the
//!   power-of-two-choices pick.
//! - `in_flight` — an endpoint's outstanding-request counter and its guard
//!   (carried by the response body until its last byte).
//! - `pool` — per-endpoint HTTP/1.1 keep-alive connections and one shared
//!   h2 connection; for a mesh endpoint with an identity one shared mTLS
//!   h2 connection (`identity::tls`); for the local app, the app's protocol.
//!
//! **Invariants:** a request whose connection failed before it was sent
//! comes back to `forward` (never lost, retried elsewhere without a
//! policy); no whole body is buffered except a retryable request body
//! within `maxBodyBytes`; locks (a pool's, a breaker's) are held for a few
//! instructions, never across an await.

pub(crate) mod balance;
pub(crate) mod forward;
pub(crate) mod in_flight;
pub(crate) mod pool;
pub(crate) mod target;
