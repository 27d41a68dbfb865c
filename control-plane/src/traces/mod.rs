//! Traces: the control plane's OTLP/HTTP receiver and in-memory trace store.
//!
//! ```text
//! POST /v1/traces ─► receiver (content type, size, decode: protobuf or otlp_json)
//!                      └─► store.ingest: model::accept_spans (validate, outside the lock)
//!                                       └─► add under a short mutex, expire, evict
//! GET /api/traces[/{id}] ─► store.list / store.get ─► wire types (JSON) ─► meshctl
//! ```
//!
//! - [`receiver`]: the HTTP handler of OTLP exports.
//! - [`otlp_json`]: the OTLP/JSON encoding, converted into the protobuf types.
//! - [`model`]: ids, the stored span, validation of incoming spans.
//! - [`store`]: the bounded store and its queries.
//!
//! The API's JSON types are in [`meshlet_api::traces`], shared with meshctl.

pub mod model;
pub mod otlp_json;
pub mod receiver;
pub mod store;

pub use store::{TraceLimits, TraceQuery, TraceStats, TraceStore};
