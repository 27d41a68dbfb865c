//! Distributed tracing in the sidecar: every proxied request becomes one
//! span (a server span on the inbound listener, a client span on the
//! outbound one), joined into the caller's trace through W3C Trace
//! Context, so services get traces without changing their code.
//!
//! ```text
//! request headers ─► context::Incoming::extract (traceparent | b3)
//!                      │ none/invalid: new trace, sampled by the own
//!                      │ service's TracingPolicy ratio
//!                      ▼
//!                    Hop { trace, new span id, parent, sampled }
//!                      │ inject: traceparent(trace, span) + tracestate
//!                      ▼  ... request proxied ...
//!   response complete ─► Hop::finish ─► SpanRecord ─► export::SpanExporter
//!                                          (bounded queue, OTLP/HTTP batches)
//! ```
//!
//! An app that copies the `traceparent` it received onto its outgoing
//! calls keeps the chain: its outbound sidecar parents the client span on
//! the inbound server span. The hot path only generates ids, parses and
//! writes one header and, for sampled requests, queues a plain record;
//! building OTLP messages happens in the exporter task.

pub mod context;
pub mod encode;
pub mod export;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, HeaderValue, Method, Uri};

pub use context::{Incoming, SpanId, TraceId};

use crate::telemetry::direction::Direction;

/// The span one request makes at this sidecar, from arrival to response.
#[derive(Debug)]
pub struct Hop {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    /// The caller's span; `None` when this hop starts the trace.
    pub parent: Option<SpanId>,
    pub sampled: bool,
    /// W3C Level 2 `random-trace-id` flag: as received when joining a
    /// trace, set for a trace started here (its id is random).
    pub random: bool,
    tracestate: Option<HeaderValue>,
    /// The context came in B3 headers, to be replaced by W3C.
    from_b3: bool,
    /// When the request arrived. The span's wall-clock start is derived
    /// from it when the span is finished (now minus the time since), so
    /// an unsampled request never reads the wall clock.
    started: Instant,
}

impl Hop {
    /// Joins the request's trace, or starts one, for a request that
    /// arrived at `started`; `sample_new` decides whether a new trace is
    /// recorded (an existing one keeps its flag).
    pub fn start(headers: &HeaderMap, started: Instant, sample_new: impl FnOnce() -> bool) -> Hop {
        let (trace_id, parent, sampled, random, tracestate, from_b3) =
            match Incoming::extract(headers) {
                Some(ctx) => (
                    ctx.trace_id,
                    Some(ctx.parent),
                    ctx.sampled,
                    ctx.random,
                    ctx.tracestate,
                    ctx.from_b3,
                ),
                None => (TraceId::random(), None, sample_new(), true, None, false),
            };
        Hop {
            trace_id,
            span_id: SpanId::random(),
            parent,
            sampled,
            random,
            tracestate,
            from_b3,
            started,
        }
    }

    /// Writes this hop's context for the next one: `traceparent` naming
    /// this span as the parent, the `tracestate` received (or none), and
    /// no B3 headers (the next hop reads W3C).
    pub fn inject(&self, headers: &mut HeaderMap) {
        headers.insert(
            context::TRACEPARENT,
            context::traceparent(self.trace_id, self.span_id, self.sampled, self.random),
        );
        match &self.tracestate {
            Some(state) => {
                headers.insert(context::TRACESTATE, state.clone());
            }
            // One that came with an invalid traceparent, or was invalid.
            // (A scan of the names: no hashing for the usual absent one.)
            None if headers.keys().any(|name| *name == context::TRACESTATE) => {
                headers.remove(context::TRACESTATE);
            }
            None => {}
        }
        if self.from_b3 {
            context::remove_b3(headers);
        }
    }

    /// The finished span, or `None` when the trace is not sampled.
    pub fn finish(self, details: SpanDetails) -> Option<SpanRecord> {
        if !self.sampled {
            return None;
        }
        let elapsed = self.started.elapsed();
        let end_unix_nanos = unix_nanos(SystemTime::now());
        Some(SpanRecord {
            trace_id: self.trace_id,
            span_id: self.span_id,
            parent: self.parent,
            tracestate: self.tracestate,
            start_unix_nanos: end_unix_nanos
                .saturating_sub(u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX)),
            end_unix_nanos,
            details,
        })
    }
}

/// What a span says about its request (becomes OTLP attributes).
#[derive(Debug, Clone)]
pub struct SpanDetails {
    pub direction: Direction,
    pub method: Method,
    /// The bounded route label (`/api`, or `/` for all paths).
    pub route: Arc<str>,
    /// The request's URI (its path becomes `url.path`).
    pub uri: Uri,
    /// The status sent to the client.
    pub status: u16,
    /// The client of this hop (inbound: the caller; outbound: the app).
    pub peer: Option<SocketAddr>,
    /// The service the request went to (inbound: this service).
    pub destination: Arc<str>,
    /// The address that answered (an endpoint, or the app).
    pub upstream: Option<SocketAddr>,
    /// Tries after the first.
    pub retries: u32,
    /// `x-meshlet-reason` when the mesh answered itself.
    pub reason: Option<&'static str>,
    /// Inbound: the caller's verified SPIFFE id and the service it is
    /// (`None`: a plaintext caller, or outbound).
    pub source_identity: Option<Arc<str>>,
    pub source_service: Option<Arc<str>>,
    /// The `AuthorizationPolicy` that refused the request.
    pub authz_policy: Option<Arc<str>>,
    /// An injected fault (`delay 200ms`, `abort 503`): `meshlet.fault`.
    pub fault: Option<String>,
    /// A dry-run policy that would have refused the request
    /// (`<kind>/<name>:<reason>`): `meshlet.policy.would_refuse`.
    pub would_refuse: Option<Arc<str>>,
}

/// A finished, sampled span, queued for export.
#[derive(Debug, Clone)]
pub struct SpanRecord {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub parent: Option<SpanId>,
    pub tracestate: Option<HeaderValue>,
    pub start_unix_nanos: u64,
    pub end_unix_nanos: u64,
    pub details: SpanDetails,
}

fn unix_nanos(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Whether a new trace is recorded, for a ratio from 0.0 to 1.0.
pub fn sample(ratio: f64) -> bool {
    ratio >= 1.0 || (ratio > 0.0 && fastrand::f64() < ratio)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hop_continues_the_callers_trace_and_names_itself_parent() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "traceparent",
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        headers.insert("tracestate", HeaderValue::from_static("rojo=1"));
        let hop = Hop::start(&headers, Instant::now(), || {
            panic!("an existing trace is not re-sampled")
        });
        assert_eq!(hop.trace_id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(hop.parent.unwrap().to_string(), "00f067aa0ba902b7");
        hop.inject(&mut headers);
        let next = Incoming::extract(&headers).unwrap();
        assert_eq!(next.trace_id, hop.trace_id);
        assert_eq!(next.parent, hop.span_id);
        assert_eq!(next.tracestate.unwrap(), "rojo=1");
    }

    #[test]
    fn a_new_trace_follows_the_sampling_decision() {
        let hop = Hop::start(&HeaderMap::new(), Instant::now(), || false);
        assert!(hop.parent.is_none() && !hop.sampled);
        let details = SpanDetails {
            direction: Direction::Inbound,
            method: Method::GET,
            route: "/".into(),
            uri: Uri::from_static("/"),
            status: 200,
            peer: None,
            destination: "orders".into(),
            upstream: None,
            retries: 0,
            reason: None,
            source_identity: None,
            source_service: None,
            authz_policy: None,
            fault: None,
            would_refuse: None,
        };
        assert!(hop.finish(details.clone()).is_none());
        let hop = Hop::start(&HeaderMap::new(), Instant::now(), || true);
        let span = hop.finish(details).unwrap();
        assert!(span.end_unix_nanos >= span.start_unix_nanos);
        assert!(!sample(0.0) && sample(1.0));
    }
}
