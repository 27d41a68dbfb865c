//! What the sidecar reports: Prometheus metrics, trace spans, access log
//! lines. The request path reports through one `observe::RequestRecord`
//! per request.
//!
//! ```text
//! request ─► RequestRecord (observe) ─► finished once (Drop) ─► route counters (route_metrics)
//!                                                           ─► span ─► export queue (trace) ─► OTLP POST
//!                                                           ─► access log line (access_log)
//!                                                           ─► tap event, only while tapped (tap)
//! admin /metrics ─► metrics::Metrics::render
//! ```
//!
//! - `metrics` — the registry and every family; handles resolved once.
//! - `route_metrics` — per-route handles and the route table (`endpoint`
//!   label).
//! - `observe` — `RequestRecord` and `Telemetry` (what each record
//!   reports to).
//! - `trace/` — W3C/B3 context, the span of one hop, OTLP encoding and
//!   export.
//! - `access_log` — JSON lines from a dedicated thread.
//! - `tap` — the live taps of `meshctl tap` (a relaxed atomic load per
//!   request when nobody taps; filters and a bounded queue when one does).
//! - `direction`, `trail` — small shared types (`Direction`, `Trail`).
//!
//! **Invariants:** nothing here blocks a request: spans and log lines go
//! to bounded queues (full → dropped and counted); metric handles are
//! resolved at start or snapshot build, never formatted per request; this
//! folder imports nothing from the request path (the body type reaches
//! `observe` only through the `CarriesRecord` trait).

pub(crate) mod access_log;
pub(crate) mod direction;
pub(crate) mod metrics;
pub(crate) mod observe;
pub(crate) mod route_metrics;
pub(crate) mod tap;
pub(crate) mod trace;
pub(crate) mod trail;
