//! What happens when a request completes: one [`RequestRecord`] per
//! request, finished exactly once.
//!
//! Data flow: a listener's `Handler::handle` (`proxy`) starts a record as
//! the request arrives (direction, arrival time, normalised method, the
//! route it is counted under until a better one is known, and, with
//! tracing on, the request's [`Hop`]: the trace it joins or starts). The
//! request path sets the route once it knows it ([`RequestRecord::set_route`]),
//! writes the trace context into the request it sends on
//! ([`RequestRecord::inject_trace`]) and lets `forward` note retries and
//! the upstream in [`RequestRecord::trail`]; then either
//!
//! - [`RequestRecord::respond`]: the response goes to the client and the
//!   record rides in its body (`ProxyBody::with_completion`) until the
//!   last frame has been sent or the body is dropped, or
//! - [`RequestRecord::refused`]: the mesh answered itself; finished at once.
//!
//! Finishing is the record's `Drop`, so it happens exactly once whatever
//! path the request took; a record dropped before any response (the client
//! went away) finishes with status 0. [`RequestRecord::finish`] is the one
//! place that records a completed request: `request_total`,
//! `response_time_seconds`, the span (sampled traces, to the exporter),
//! the access log line (`--access-log`) and, with debug logging on, one
//! log line, and while a tap is live (`meshctl tap`) the tap event. Request
//! details (method, URI, peer) are only copied when one of the last four
//! needs them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use http::{HeaderMap, Method, Request, Response, Uri, Version};
use prometheus::IntCounter;

use crate::clock;
use crate::telemetry::access_log::{AccessLog, AccessRecord};
use crate::telemetry::direction::Direction;
use crate::telemetry::route_metrics::{MethodLabel, RouteMetrics};
use crate::telemetry::tap::Tap;
use crate::telemetry::trace::export::SpanExporter;
use crate::telemetry::trace::{self, Hop, SpanDetails};
use crate::telemetry::trail::Trail;
use meshlet_api::tap::{TapDirection, TapEvent};

/// What every request of one sidecar reports to, besides metrics.
#[derive(Debug)]
pub struct Telemetry {
    /// Join or start traces and pass `traceparent` on.
    pub tracing: bool,
    /// Where sampled spans go (`None`: nowhere, headers still flow).
    pub exporter: Option<SpanExporter>,
    pub access_log: Option<AccessLog>,
    /// The own service's sampling ratio now (read from the current
    /// snapshot; a function so that telemetry does not depend on it).
    pub sampling_ratio: SamplingRatio,
    /// The live taps (`meshctl tap`); shared with the control client,
    /// which sets them, and the tap sender, which drains their queue.
    pub tap: Arc<Tap>,
}

/// Reads the share of new traces to record, when a request starts one.
pub struct SamplingRatio(pub Box<dyn Fn() -> f64 + Send + Sync>);

impl std::fmt::Debug for SamplingRatio {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SamplingRatio")
    }
}

/// A response body that can carry a request's record until its last
/// byte, counting its data bytes (implemented by `ProxyBody`; a trait so
/// that this module does not depend on the body type).
pub trait CarriesRecord {
    fn carrying(self, bytes: IntCounter, record: RequestRecord) -> Self;
}

impl Telemetry {
    /// Neither tracing nor an access log (tests, tools).
    pub fn off() -> Self {
        Telemetry {
            tracing: false,
            exporter: None,
            access_log: None,
            sampling_ratio: SamplingRatio(Box::new(|| 1.0)),
            tap: Arc::default(),
        }
    }
}

/// One request from arrival to the end of its response.
#[derive(Debug)]
pub struct RequestRecord {
    direction: Direction,
    started: Instant,
    method: MethodLabel,
    route: Arc<RouteMetrics>,
    /// The status sent to the client, once there is a response.
    status: Option<u16>,
    /// `x-meshlet-reason` when the mesh answered itself.
    reason: Option<&'static str>,
    trail: Trail,
    hop: Option<Hop>,
    /// Copied only when a span, the access log or debug logging needs it
    /// (boxed, and what only it needs is in it: the record moves with the
    /// request, and at 296 bytes each move was a `memcpy` call).
    detail: Option<Box<Detail>>,
    telemetry: Arc<Telemetry>,
}

#[derive(Debug)]
struct Detail {
    method: Method,
    uri: Uri,
    version: Version,
    peer: SocketAddr,
    /// Request headers, only while an admin's tap is live.
    headers: Vec<(String, String)>,
    /// Inbound: the verified caller (SPIFFE id, service).
    source: Option<(Arc<str>, Arc<str>)>,
    /// The `AuthorizationPolicy` that refused the request.
    authz_policy: Option<Arc<str>>,
}

impl RequestRecord {
    /// Starts the record of `request` from `peer`, counted under `route`
    /// unless [`RequestRecord::set_route`] finds a better one.
    pub fn start<B>(
        request: &Request<B>,
        peer: SocketAddr,
        direction: Direction,
        route: &Arc<RouteMetrics>,
        telemetry: &Arc<Telemetry>,
    ) -> Self {
        let started = clock::now_std();
        let hop = telemetry.tracing.then(|| {
            Hop::start(request.headers(), started, || {
                trace::sample((telemetry.sampling_ratio.0)())
            })
        });
        let span_wanted = telemetry.exporter.is_some() && hop.as_ref().is_some_and(|h| h.sampled);
        let tapped = telemetry.tap.active();
        let wants_detail = span_wanted
            || telemetry.access_log.is_some()
            || tapped
            || tracing::enabled!(tracing::Level::DEBUG);
        let detail = wants_detail.then(|| {
            Box::new(Detail {
                method: request.method().clone(),
                uri: request.uri().clone(),
                version: request.version(),
                peer,
                headers: if tapped && telemetry.tap.wants_headers() {
                    tap_headers(request.headers())
                } else {
                    Vec::new()
                },
                source: None,
                authz_policy: None,
            })
        });
        RequestRecord {
            direction,
            started,
            method: MethodLabel::of(request.method()),
            route: Arc::clone(route),
            status: None,
            reason: None,
            trail: Trail::default(),
            hop,
            detail,
            telemetry: Arc::clone(telemetry),
        }
    }

    /// When the request arrived (read once, when the record started).
    pub fn started(&self) -> Instant {
        self.started
    }

    /// The caller's verified identity and service (inbound), for the span
    /// and the access log.
    pub fn set_source(&mut self, identity: &Arc<str>, service: &Arc<str>) {
        if let Some(detail) = &mut self.detail {
            detail.source = Some((Arc::clone(identity), Arc::clone(service)));
        }
    }

    /// The `AuthorizationPolicy` that refused the request.
    pub fn set_authz_policy(&mut self, policy: &Arc<str>) {
        if let Some(detail) = &mut self.detail {
            detail.authz_policy = Some(Arc::clone(policy));
        }
    }

    /// The route of the request, once known (`None`: keep the current).
    pub fn set_route(&mut self, route: Option<&Arc<RouteMetrics>>) {
        if let Some(route) = route {
            if !Arc::ptr_eq(route, &self.route) {
                self.route = Arc::clone(route);
            }
        }
    }

    /// The counter of request body bytes of this request's route.
    pub fn request_bytes(&self) -> IntCounter {
        self.route.request_bytes.clone()
    }

    /// Writes this hop's trace context into the request sent on (nothing
    /// with tracing off: the headers pass through untouched).
    pub fn inject_trace(&self, headers: &mut HeaderMap) {
        if let Some(hop) = &self.hop {
            hop.inject(headers);
        }
    }

    /// Where `forward` notes retries and the upstream it used.
    pub fn trail(&mut self) -> &mut Trail {
        &mut self.trail
    }

    /// Hands `response` to the client: its body counts response bytes and
    /// carries this record until it ends.
    pub fn respond<B: CarriesRecord>(mut self, response: Response<B>) -> Response<B> {
        self.status = Some(response.status().as_u16());
        let bytes = self.route.response_bytes.clone();
        response.map(|body| body.carrying(bytes, self))
    }

    /// A response the mesh generated for `reason`: finished now.
    pub fn refused<B>(mut self, reason: &'static str, response: Response<B>) -> Response<B> {
        self.status = Some(response.status().as_u16());
        self.reason = Some(reason);
        response
    }

    /// The mesh answered `status` for `reason` in place of this hop's
    /// upstream (a gateway's backend call that failed: the response is
    /// made and counted by the gateway's own record); finished now.
    pub fn answered_by_mesh(mut self, reason: &'static str, status: http::StatusCode) {
        self.status = Some(status.as_u16());
        self.reason = Some(reason);
    }

    /// Records the completed request (from `Drop`, so exactly once).
    fn finish(&mut self) {
        let elapsed = clock::now_std().saturating_duration_since(self.started);
        let status = self.status.unwrap_or(0);
        self.route.count(self.method, status, elapsed);
        let Some(detail) = self.detail.take() else {
            return;
        };
        let trace_ids = self.hop.as_ref().map(|h| (h.trace_id, h.span_id));
        if self.telemetry.tap.active() {
            self.offer_tap(
                &detail,
                status,
                elapsed,
                trace_ids.map(|(t, _)| t.to_string()),
            );
        }
        if let (Some(hop), Some(exporter)) = (self.hop.take(), &self.telemetry.exporter) {
            let span = hop.finish(SpanDetails {
                direction: self.direction,
                method: detail.method.clone(),
                route: Arc::clone(self.route.endpoint_label()),
                uri: detail.uri.clone(),
                status,
                peer: Some(detail.peer),
                destination: Arc::clone(self.route.destination()),
                upstream: self.trail.upstream,
                retries: self.trail.retries,
                reason: self.reason,
                source_identity: detail.source.as_ref().map(|(id, _)| Arc::clone(id)),
                source_service: detail.source.as_ref().map(|(_, svc)| Arc::clone(svc)),
                authz_policy: detail.authz_policy.clone(),
                fault: self.trail.fault.map(|note| note.to_string()),
                would_refuse: self.trail.would_refuse.clone(),
            });
            if let Some(span) = span {
                exporter.submit(span);
            }
        }
        if let Some(access_log) = &self.telemetry.access_log {
            access_log.log(AccessRecord {
                timestamp: SystemTime::now() - elapsed,
                direction: self.direction.as_str(),
                service: self.route.service().to_owned(),
                destination: self.route.destination().to_string(),
                method: detail.method.to_string(),
                path: detail.uri.path().to_owned(),
                route: self.route.endpoint().to_owned(),
                status,
                duration_us: u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
                peer: Some(detail.peer),
                upstream: self.trail.upstream,
                trace_id: trace_ids.map(|(trace, _)| trace.to_string()),
                span_id: trace_ids.map(|(_, span)| span.to_string()),
                reason: self.reason,
                retries: self.trail.retries,
                source_identity: detail.source.as_ref().map(|(id, _)| id.to_string()),
                source_service: detail.source.as_ref().map(|(_, svc)| svc.to_string()),
                authz_policy: detail.authz_policy.as_deref().map(str::to_owned),
                fault: self.trail.fault.map(|note| note.to_string()),
                would_refuse: self.trail.would_refuse.as_deref().map(str::to_owned),
            });
        }
        tracing::debug!(
            direction = self.direction.as_str(),
            method = %detail.method,
            uri = %detail.uri,
            version = ?detail.version,
            status,
            reason = self.reason,
            source = detail.source.as_ref().map(|(id, _)| &**id),
            authz_policy = detail.authz_policy.as_deref(),
            endpoint = self.route.endpoint(),
            retries = self.trail.retries,
            elapsed_us = elapsed.as_micros() as u64,
            "proxied"
        );
    }
}

impl RequestRecord {
    /// Offers this request to the live taps (their filters decide).
    fn offer_tap(
        &mut self,
        detail: &Detail,
        status: u16,
        elapsed: std::time::Duration,
        trace_id: Option<String>,
    ) {
        let path = detail.uri.path();
        let tap = Arc::clone(&self.telemetry.tap);
        tap.offer(detail.method.as_str(), path, status, || {
            let peer = match (self.direction, &detail.source) {
                (Direction::Inbound, Some((identity, _))) => identity.to_string(),
                (Direction::Inbound, None) => detail.peer.to_string(),
                (Direction::Outbound, _) => match self.trail.upstream {
                    Some(upstream) => format!("{} ({upstream})", self.route.destination()),
                    None => self.route.destination().to_string(),
                },
            };
            let at = SystemTime::now() - elapsed;
            TapEvent {
                at_ms: at
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64),
                instance: String::new(),
                service: self.route.service().to_owned(),
                direction: match self.direction {
                    Direction::Inbound => TapDirection::Inbound,
                    Direction::Outbound => TapDirection::Outbound,
                },
                peer,
                method: detail.method.to_string(),
                path: path.to_owned(),
                status,
                latency_ms: elapsed.as_secs_f64() * 1000.0,
                reason: self.reason.map(str::to_owned),
                trace_id,
                headers: detail.headers.clone(),
            }
        });
    }
}

/// The request headers an admin's tap shows (bounded).
fn tap_headers(headers: &HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .take(crate::telemetry::tap::MAX_HEADERS)
        .map(|(name, value)| {
            let value = String::from_utf8_lossy(value.as_bytes());
            let mut value = value.into_owned();
            if value.len() > crate::telemetry::tap::MAX_HEADER_VALUE {
                let mut cut = crate::telemetry::tap::MAX_HEADER_VALUE;
                while !value.is_char_boundary(cut) {
                    cut -= 1;
                }
                value.truncate(cut);
            }
            (name.as_str().to_owned(), value)
        })
        .collect()
}

impl Drop for RequestRecord {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::metrics::Metrics;

    fn request() -> Request<()> {
        Request::get("/api/items/1").body(()).unwrap()
    }

    fn telemetry() -> Arc<Telemetry> {
        Arc::new(Telemetry::off())
    }

    /// A body that only holds the record (as `ProxyBody` does until its
    /// last byte).
    #[derive(Default)]
    struct Held {
        _record: Option<RequestRecord>,
    }

    impl CarriesRecord for Held {
        fn carrying(self, _bytes: IntCounter, record: RequestRecord) -> Self {
            Held {
                _record: Some(record),
            }
        }
    }

    fn start(route: &Arc<RouteMetrics>, telemetry: &Arc<Telemetry>) -> RequestRecord {
        let peer = "127.0.0.1:40000".parse().unwrap();
        RequestRecord::start(&request(), peer, Direction::Inbound, route, telemetry)
    }

    #[test]
    fn a_response_is_counted_when_its_body_is_done_a_refusal_at_once() {
        let metrics = Metrics::new("orders");
        let route = metrics.route(Direction::Inbound, "orders", "/");
        let telemetry = telemetry();
        let response = start(&route, &telemetry).respond(Response::new(Held::default()));
        assert_eq!(
            route.counter(MethodLabel::Get, 200).get(),
            0,
            "body not sent"
        );
        drop(response);
        assert_eq!(route.counter(MethodLabel::Get, 200).get(), 1);
        assert_eq!(route.response_bytes.get(), 0, "dropped unsent");

        let mut refusal = Response::new(Held::default());
        *refusal.status_mut() = http::StatusCode::TOO_MANY_REQUESTS;
        let refusal = start(&route, &telemetry).refused("rate_limited", refusal);
        assert_eq!(route.counter(MethodLabel::Get, 429).get(), 1);
        drop(refusal);
        assert_eq!(
            route.counter(MethodLabel::Get, 429).get(),
            1,
            "exactly once"
        );

        drop(start(&route, &telemetry));
        assert_eq!(route.counter(MethodLabel::Get, 0).get(), 1, "client left");
        assert_eq!(route.duration.get_sample_count(), 3);
    }

    /// The caller and the refusing policy reach the access log (they are
    /// kept with the record's detail, which exists only when something
    /// will read them).
    #[test]
    fn the_access_log_names_the_caller_and_the_refusing_policy() {
        let metrics = Metrics::new("orders");
        let route = metrics.route(Direction::Inbound, "orders", "/");
        let lines = crate::telemetry::access_log::tests::Shared::default();
        let telemetry = Arc::new(Telemetry {
            access_log: Some(AccessLog::spawn_to(
                lines.clone(),
                prometheus::IntCounter::new("dropped", "dropped").unwrap(),
            )),
            ..Telemetry::off()
        });
        let mut record = start(&route, &telemetry);
        record.set_source(
            &Arc::from("spiffe://meshlet.local/ns/default/sa/web"),
            &Arc::from("web"),
        );
        record.set_authz_policy(&Arc::from("deny-web"));
        drop(record.refused("forbidden", Response::new(Held::default())));
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        let line = loop {
            let written = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
            if written.ends_with('\n') {
                break written;
            }
            assert!(Instant::now() < deadline, "no access log line");
            std::thread::sleep(std::time::Duration::from_millis(5));
        };
        let json: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
        assert_eq!(
            json["source_identity"], "spiffe://meshlet.local/ns/default/sa/web",
            "{json}"
        );
        assert_eq!(json["source_service"], "web", "{json}");
        assert_eq!(json["authz_policy"], "deny-web", "{json}");
    }

    #[test]
    fn with_tracing_off_the_headers_pass_through_untouched() {
        let metrics = Metrics::new("orders");
        let route = metrics.route(Direction::Inbound, "orders", "/");
        let record = start(&route, &telemetry());
        let mut headers = HeaderMap::new();
        headers.insert("b3", http::HeaderValue::from_static("1"));
        record.inject_trace(&mut headers);
        assert!(headers.get("traceparent").is_none());
        assert!(headers.get("b3").is_some());
    }
}
