//! Per-route metric handles: which `endpoint` label a request is counted
//! under, and the handles of that label set, resolved once.
//!
//! A *route* is a `(direction, destination, endpoint)` label set. The
//! `endpoint` label is never the raw path (ids in paths would explode the
//! number of series): it is the most specific `match.pathPrefix` among the
//! policies that target the destination (any kind with a route match) that
//! the request path starts with, else `/` (all paths).
//!
//! Data flow: `Snapshot::build` makes a [`RouteTable`] per target service
//! (outbound) and one for the own service (inbound). Each entry is an
//! `Arc<RouteMetrics>` from `Metrics::route`, which keeps one per label set,
//! so a rebuilt snapshot gets the same handles (and their warm caches). On
//! the request path: [`RouteTable::select`] (a few `starts_with` on the
//! prefixes), byte counters bumped per body frame, and when the request
//! completes (`observe`) [`RouteMetrics::count`] finds the
//! `request_total` counter of `(method, status)` in a small lock-free
//! copy-on-write list. Only the first request of a new `(method, status)`
//! pair formats labels and hashes them (under a mutex). The list is bounded
//! by construction: methods are normalised to [`MethodLabel`]'s ten values
//! and status codes are 0 or 100..=999.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::Method;
use meshlet_api::Resource;
use prometheus::{Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts};

use crate::telemetry::direction::Direction;

/// The `endpoint` label of requests no policy prefix matches.
pub const ALL_PATHS: &str = "/";

/// `response_time_seconds` buckets: 0.5 ms (a local hop) to 10 s.
pub(crate) const DURATION_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The `method` label: standard methods as they are, anything else
/// `other` (a client must not be able to mint series).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum MethodLabel {
    Get,
    Head,
    Post,
    Put,
    Delete,
    Connect,
    Options,
    Trace,
    Patch,
    Other,
}

impl MethodLabel {
    pub fn of(method: &Method) -> Self {
        match *method {
            Method::GET => MethodLabel::Get,
            Method::HEAD => MethodLabel::Head,
            Method::POST => MethodLabel::Post,
            Method::PUT => MethodLabel::Put,
            Method::DELETE => MethodLabel::Delete,
            Method::CONNECT => MethodLabel::Connect,
            Method::OPTIONS => MethodLabel::Options,
            Method::TRACE => MethodLabel::Trace,
            Method::PATCH => MethodLabel::Patch,
            _ => MethodLabel::Other,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            MethodLabel::Get => "GET",
            MethodLabel::Head => "HEAD",
            MethodLabel::Post => "POST",
            MethodLabel::Put => "PUT",
            MethodLabel::Delete => "DELETE",
            MethodLabel::Connect => "CONNECT",
            MethodLabel::Options => "OPTIONS",
            MethodLabel::Trace => "TRACE",
            MethodLabel::Patch => "PATCH",
            MethodLabel::Other => "other",
        }
    }
}

/// The four metric families every route has a handle in, registered once
/// by `Metrics`.
#[derive(Debug, Clone)]
pub struct RouteFamilies {
    /// `request_total{direction,service,destination,endpoint,method,status_code}`.
    pub requests: IntCounterVec,
    /// `response_time_seconds{direction,service,destination,endpoint}`.
    pub durations: HistogramVec,
    /// `request_bytes_total{direction,service,destination,endpoint}`.
    pub request_bytes: IntCounterVec,
    /// `response_bytes_total{direction,service,destination,endpoint}`.
    pub response_bytes: IntCounterVec,
}

const ROUTE_LABELS: &[&str] = &["direction", "service", "destination", "endpoint"];

impl RouteFamilies {
    pub fn new() -> Self {
        let counter = |name: &str, help: &str, labels: &[&str]| {
            IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric")
        };
        let mut request_labels = ROUTE_LABELS.to_vec();
        request_labels.extend(["method", "status_code"]);
        RouteFamilies {
            requests: counter(
                "request_total",
                "Requests answered, by route, method and the status sent to the client (0: the client left before a response)",
                &request_labels,
            ),
            durations: HistogramVec::new(
                HistogramOpts::new(
                    "response_time_seconds",
                    "Time from request arrival to the end of the response, by route",
                )
                .buckets(DURATION_BUCKETS.to_vec()),
                ROUTE_LABELS,
            )
            .expect("valid metric"),
            request_bytes: counter(
                "request_bytes_total",
                "Request body bytes proxied, by route",
                ROUTE_LABELS,
            ),
            response_bytes: counter(
                "response_bytes_total",
                "Response body bytes proxied, by route",
                ROUTE_LABELS,
            ),
        }
    }

    pub fn collectors(&self) -> [Box<dyn prometheus::core::Collector>; 4] {
        [
            Box::new(self.requests.clone()),
            Box::new(self.durations.clone()),
            Box::new(self.request_bytes.clone()),
            Box::new(self.response_bytes.clone()),
        ]
    }
}

impl Default for RouteFamilies {
    fn default() -> Self {
        Self::new()
    }
}

/// The handles of one route, resolved once (see the module docs).
#[derive(Debug)]
pub struct RouteMetrics {
    /// `[direction, service, destination, endpoint]` (shared with spans).
    labels: [Arc<str>; 4],
    pub duration: Histogram,
    pub request_bytes: IntCounter,
    pub response_bytes: IntCounter,
    requests: IntCounterVec,
    /// `request_total` counters by [`status_key`], copied on insert.
    counters: ArcSwap<Vec<(u32, IntCounter)>>,
    /// Serialises the rare inserts into `counters`.
    inserting: Mutex<()>,
}

/// One `u32` for a `(method, status)` pair.
fn status_key(method: MethodLabel, status: u16) -> u32 {
    (method as u32) << 16 | u32::from(status)
}

impl RouteMetrics {
    pub fn new(
        families: &RouteFamilies,
        direction: Direction,
        service: &str,
        destination: &str,
        endpoint: &str,
    ) -> Self {
        let labels = [direction.as_str(), service, destination, endpoint].map(Arc::<str>::from);
        RouteMetrics {
            duration: families.durations.with_label_values(&labels),
            request_bytes: families.request_bytes.with_label_values(&labels),
            response_bytes: families.response_bytes.with_label_values(&labels),
            requests: families.requests.clone(),
            labels,
            counters: ArcSwap::from_pointee(Vec::new()),
            inserting: Mutex::new(()),
        }
    }

    /// The `endpoint` label.
    pub fn endpoint(&self) -> &str {
        &self.labels[3]
    }

    /// The `destination` label.
    pub fn destination(&self) -> &Arc<str> {
        &self.labels[2]
    }

    /// The `endpoint` label, shared.
    pub fn endpoint_label(&self) -> &Arc<str> {
        &self.labels[3]
    }

    /// The `service` label (the own service).
    pub fn service(&self) -> &str {
        &self.labels[1]
    }

    /// Counts one completed request (`status` 0: no response was sent).
    pub fn count(&self, method: MethodLabel, status: u16, elapsed: Duration) {
        self.duration.observe(elapsed.as_secs_f64());
        let key = status_key(method, status);
        let counters = self.counters.load();
        match counters.iter().find(|(k, _)| *k == key) {
            Some((_, counter)) => counter.inc(),
            None => {
                drop(counters);
                self.insert(method, status).inc();
            }
        }
    }

    /// The `request_total` counter for `(method, status)`.
    pub fn counter(&self, method: MethodLabel, status: u16) -> IntCounter {
        match find(&self.counters.load(), status_key(method, status)) {
            Some(counter) => counter,
            None => self.insert(method, status),
        }
    }

    /// Resolves the counter of a pair not seen before (the rare path).
    fn insert(&self, method: MethodLabel, status: u16) -> IntCounter {
        let key = status_key(method, status);
        let _inserting = self.inserting.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.counters.load_full();
        if let Some(counter) = find(&current, key) {
            return counter;
        }
        let [direction, service, destination, endpoint] = &self.labels;
        let status = status.to_string();
        let counter = self.requests.with_label_values(&[
            direction,
            service,
            destination,
            endpoint,
            method.as_str(),
            &status,
        ]);
        let mut next = Vec::with_capacity(current.len() + 1);
        next.extend(current.iter().cloned());
        next.push((key, counter.clone()));
        self.counters.store(Arc::new(next));
        counter
    }

    /// The `direction` label.
    pub fn direction(&self) -> &str {
        &self.labels[0]
    }

    /// What this route has counted since start, read off the request path
    /// (the stats reporter diffs two of these).
    pub fn totals(&self) -> RouteTotals {
        let mut totals = RouteTotals::default();
        for (key, counter) in self.counters.load().iter() {
            let count = counter.get();
            totals.requests += count;
            let status = key & 0xffff;
            if status == 0 || status >= 500 {
                totals.errors += count;
            }
        }
        let histogram = prometheus::core::Metric::metric(&self.duration);
        let histogram = histogram.get_histogram();
        let mut below = 0;
        for bucket in histogram.get_bucket() {
            let cumulative = bucket.cumulative_count();
            totals.latency_bounds_ms.push(bucket.upper_bound() * 1000.0);
            totals.latency_counts.push(cumulative.saturating_sub(below));
            below = cumulative;
        }
        totals
            .latency_counts
            .push(histogram.get_sample_count().saturating_sub(below));
        totals
    }

    /// Distinct `(method, status)` pairs seen so far.
    pub fn cached(&self) -> usize {
        self.counters.load().len()
    }
}

/// A route's counts since start: requests, errors (status >= 500 or 0)
/// and the latency histogram as per-bucket (not cumulative) counts, with
/// one more count for requests above the last bound.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RouteTotals {
    pub requests: u64,
    pub errors: u64,
    pub latency_bounds_ms: Vec<f64>,
    pub latency_counts: Vec<u64>,
}

fn find(counters: &[(u32, IntCounter)], key: u32) -> Option<IntCounter> {
    counters
        .iter()
        .find(|(k, _)| *k == key)
        .map(|(_, counter)| counter.clone())
}

/// The routes of one destination, most specific prefix first, ending with
/// [`ALL_PATHS`] (empty only for a target whose requests are counted
/// elsewhere: the local app's inbound routes live in the snapshot).
#[derive(Debug, Default)]
pub struct RouteTable {
    routes: Vec<(String, Arc<RouteMetrics>)>,
}

impl RouteTable {
    /// The routes of `(namespace, service)`: one per distinct
    /// `match.pathPrefix` of the policies targeting it, plus `/`.
    pub fn build(
        resources: &[Resource],
        namespace: &str,
        service: &str,
        mut route: impl FnMut(&str) -> Arc<RouteMetrics>,
    ) -> Self {
        let mut prefixes: Vec<&str> = resources
            .iter()
            .filter(|r| r.target() == Some((namespace, service)))
            .filter_map(path_prefix)
            .chain([ALL_PATHS])
            .collect();
        // Longest first: the first match is the most specific one.
        prefixes.sort_by(|a, b| b.len().cmp(&a.len()).then(a.cmp(b)));
        prefixes.dedup();
        RouteTable {
            routes: prefixes
                .into_iter()
                .map(|prefix| (prefix.to_owned(), route(prefix)))
                .collect(),
        }
    }

    /// How many distinct routes the table has.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.routes.len()
    }

    /// A table with one route for all paths.
    pub fn single(route: Arc<RouteMetrics>) -> Self {
        RouteTable {
            routes: vec![(ALL_PATHS.to_owned(), route)],
        }
    }

    /// The route of a request for `path`: the most specific matching
    /// prefix, else the catch-all (also for paths such as a `CONNECT`
    /// target that do not start with `/`).
    pub fn select(&self, path: &str) -> Option<&Arc<RouteMetrics>> {
        self.routes
            .iter()
            .find(|(prefix, _)| path.starts_with(prefix.as_str()))
            .or(self.routes.last())
            .map(|(_, route)| route)
    }
}

/// `match.pathPrefix` of a policy of any kind that has a route match.
fn path_prefix(resource: &Resource) -> Option<&str> {
    let route = match resource {
        Resource::RateLimitPolicy(doc) => doc.spec.route.as_ref(),
        Resource::CircuitBreakerPolicy(doc) => doc.spec.route.as_ref(),
        Resource::RetryPolicy(doc) => doc.spec.route.as_ref(),
        Resource::TimeoutPolicy(doc) => doc.spec.route.as_ref(),
        _ => None,
    };
    route?.path_prefix.as_deref()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_are_normalised_to_a_bounded_set() {
        assert_eq!(MethodLabel::of(&Method::GET).as_str(), "GET");
        assert_eq!(MethodLabel::of(&Method::PATCH).as_str(), "PATCH");
        let custom = Method::from_bytes(b"PURGE").unwrap();
        assert_eq!(MethodLabel::of(&custom).as_str(), "other");
    }
}
