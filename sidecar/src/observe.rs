//! What happens when a request completes: one [`RequestRecord`] per
//! request, finished exactly once.
//!
//! Data flow: a listener's `Handler::handle` (`proxy`) starts a record as
//! the request arrives (direction, arrival time, normalised method, the
//! route it is counted under until a better one is known), the request
//! path sets the route once it knows it ([`RequestRecord::set_route`]),
//! then either
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
//! `response_time_seconds` and, with debug logging on, one log line.

use std::sync::Arc;
use std::time::Instant;

use http::{Method, Request, Response, Uri, Version};
use prometheus::IntCounter;

use crate::body::ProxyBody;
use crate::error::REASON_HEADER;
use crate::metrics::Direction;
use crate::route_metrics::{MethodLabel, RouteMetrics};

/// One request from arrival to the end of its response.
#[derive(Debug)]
pub struct RequestRecord {
    direction: Direction,
    started: Instant,
    method: MethodLabel,
    route: Arc<RouteMetrics>,
    /// The status sent to the client, once there is a response.
    status: Option<u16>,
    /// Captured only when debug logging is on.
    log: Option<Box<LogDetail>>,
}

#[derive(Debug)]
struct LogDetail {
    method: Method,
    uri: Uri,
    version: Version,
    reason: Option<String>,
}

impl RequestRecord {
    /// Starts the record of `request`, counted under `route` unless
    /// [`RequestRecord::set_route`] finds a better one.
    pub fn start<B>(request: &Request<B>, direction: Direction, route: &Arc<RouteMetrics>) -> Self {
        let log = tracing::enabled!(tracing::Level::DEBUG).then(|| {
            Box::new(LogDetail {
                method: request.method().clone(),
                uri: request.uri().clone(),
                version: request.version(),
                reason: None,
            })
        });
        RequestRecord {
            direction,
            started: Instant::now(),
            method: MethodLabel::of(request.method()),
            route: Arc::clone(route),
            status: None,
            log,
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

    /// Hands `response` to the client: its body counts response bytes and
    /// carries this record until it ends.
    pub fn respond(mut self, response: Response<ProxyBody>) -> Response<ProxyBody> {
        self.note_response(&response);
        let bytes = self.route.response_bytes.clone();
        response.map(|body| body.counting(bytes).with_completion(self))
    }

    /// A response the mesh generated: finished now.
    pub fn refused(mut self, response: Response<ProxyBody>) -> Response<ProxyBody> {
        self.note_response(&response);
        response
    }

    fn note_response(&mut self, response: &Response<ProxyBody>) {
        self.status = Some(response.status().as_u16());
        if let Some(log) = &mut self.log {
            log.reason = response
                .headers()
                .get(REASON_HEADER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
        }
    }

    /// Records the completed request (from `Drop`, so exactly once).
    fn finish(&mut self) {
        let elapsed = self.started.elapsed();
        let status = self.status.unwrap_or(0);
        self.route.count(self.method, status, elapsed);
        if let Some(log) = &self.log {
            tracing::debug!(
                direction = self.direction.as_str(),
                method = %log.method,
                uri = %log.uri,
                version = ?log.version,
                status,
                reason = log.reason.as_deref(),
                endpoint = self.route.endpoint(),
                elapsed_us = elapsed.as_micros() as u64,
                "proxied"
            );
        }
    }
}

impl Drop for RequestRecord {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    fn request() -> Request<()> {
        Request::get("/api/items/1").body(()).unwrap()
    }

    #[test]
    fn a_response_is_counted_when_its_body_is_done_a_refusal_at_once() {
        let metrics = Metrics::new("orders");
        let route = metrics.route(Direction::Inbound, "orders", "/");
        let response = RequestRecord::start(&request(), Direction::Inbound, &route)
            .respond(Response::new(ProxyBody::full("hello")));
        assert_eq!(
            route.counter(MethodLabel::Get, 200).get(),
            0,
            "body not sent"
        );
        drop(response);
        assert_eq!(route.counter(MethodLabel::Get, 200).get(), 1);
        assert_eq!(route.response_bytes.get(), 0, "dropped unsent");

        let mut refusal = Response::new(ProxyBody::empty());
        *refusal.status_mut() = http::StatusCode::TOO_MANY_REQUESTS;
        let refusal = RequestRecord::start(&request(), Direction::Inbound, &route).refused(refusal);
        assert_eq!(route.counter(MethodLabel::Get, 429).get(), 1);
        drop(refusal);
        assert_eq!(
            route.counter(MethodLabel::Get, 429).get(),
            1,
            "exactly once"
        );

        drop(RequestRecord::start(&request(), Direction::Inbound, &route));
        assert_eq!(route.counter(MethodLabel::Get, 0).get(), 1, "client left");
        assert_eq!(route.duration.get_sample_count(), 3);
    }
}
