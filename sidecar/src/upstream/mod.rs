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
//!   (carried by the response body until its last byte); a downstream
//!   connection's allowance of upstream HTTP/2 streams (`ClientStreams`)
//!   and one such stream (`StreamSlot`).
//! - `pool` — per-endpoint HTTP/1.1 keep-alive connections and a small set
//!   of shared h2 connections (a new one at the peer's stream limit or
//!   GOAWAY, one connect at a time); for a mesh endpoint with an identity
//!   the same over mTLS (`identity::tls`); for the local app, the app's
//!   protocol. Work the upstream refused unprocessed is sent again once.
//! - `h1_client` — the HTTP/1.1 exchange for requests without a body,
//!   driven from the request's own task (write the head, read the
//!   response head; the response body owns the connection and gives it
//!   back to the pool at its end); requests with a body, upgrades and
//!   CONNECT use hyper's client.
//! - `response_fields` — a plain HTTP/1.1 response head's fields kept as
//!   the lines the client gets (no `HeaderMap` unless something needs one).
//! - `slot_queue` — requests waiting for a stream on an endpoint's full
//!   set of HTTP/2 connections, served in turn per client connection (a
//!   freed stream wakes the oldest request of the client next in turn).
//! - `quick_ack` — HTTP/1.1 upstream sockets send the ACK the kernel holds
//!   when we have read a head and wait for the body (`TCP_QUICKACK`), so an
//!   app with Nagle on that writes head and body apart is not stalled 40 ms
//!   per response.
//! - `busy_poll` — while a request awaits its response head, the
//!   single-threaded runtime polls its sockets without blocking for a short,
//!   adaptive window, so a quick response is read without waking an idle
//!   CPU (`--busy-poll`).
//!
//! **Invariants:** a request whose connection failed before it was sent
//! comes back to `forward` (never lost, retried elsewhere without a
//! policy); a request the upstream refused unprocessed (GOAWAY,
//! `REFUSED_STREAM`, a pooled connection closed before answering) is sent
//! again by the pool at most once, never as a policy retry; no whole body is buffered except a retryable request body
//! within `maxBodyBytes`; locks (a pool's, a breaker's) are held for a few
//! instructions, never across an await.

pub(crate) mod balance;
pub mod busy_poll;
pub(crate) mod forward;
pub(crate) mod h1_client;
pub(crate) mod in_flight;
pub(crate) mod mirror;
pub(crate) mod pool;
pub(crate) mod quick_ack;
pub mod response_fields;
pub(crate) mod slot_queue;
pub(crate) mod target;
