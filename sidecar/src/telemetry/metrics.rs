//! Prometheus metrics served on the admin port's `/metrics`.
//!
//! [`Metrics`] owns the registry and every metric family. Handles are
//! resolved once and kept where the hot path finds them, so a request only
//! bumps atomics (no label formatting or hashing):
//!
//! - per listener at start-up ([`ListenerMetrics`]: `active_connections`,
//!   refusals below hyper);
//! - per route at snapshot build (`route_metrics`: `request_total`,
//!   `response_time_seconds`, request/response bytes), counted when a
//!   request completes (`observe`);
//! - per target at snapshot build ([`TargetMetrics`]: timeouts, upstream
//!   connect errors) and per policy at snapshot build (rate-limit refusals
//!   on each `RateLimiter`, retries on each `RetryPolicy`).
//!
//! The stats reporter (`stats`) reads the same handles: [`Metrics::routes`]
//! lists them and `RouteMetrics::totals` reads their counts.
//!
//! `circuit_breaker_state` is not stored: [`Metrics::render`] computes it
//! at scrape time from the current snapshot's breakers, so an endpoint or
//! policy that is gone leaves no stale series. Responses the mesh generated
//! are counted by reason (`meshlet_mesh_responses_total`); the
//! configuration revision, when it was applied and the control-plane
//! connection are gauges set by whoever applies or connects.
//!
//! Label values are bounded: services, policy names and path prefixes come
//! from configuration; passthrough destinations are all `passthrough`,
//! methods are normalised, paths never appear.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use prometheus::{
    Counter, Encoder, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::telemetry::direction::Direction;
use crate::telemetry::route_metrics::{RouteFamilies, RouteMetrics, RouteTable, ALL_PATHS};
use crate::telemetry::trace::export::ExportCounters;

/// The `destination` label of every passthrough destination (never the
/// raw host: any address could be asked for).
pub const PASSTHROUGH: &str = "passthrough";
/// The `destination` label of outbound requests refused before a
/// destination was known (no `Host`, unknown service, loop).
pub const UNKNOWN_DESTINATION: &str = "unknown";

/// The `destination` label of a mesh service: its name, qualified with
/// the namespace outside `default` (two namespaces may reuse a name).
pub fn destination_label(namespace: &str, service: &str) -> String {
    if namespace == "default" {
        service.to_owned()
    } else {
        format!("{service}.{namespace}")
    }
}

/// Per-listener metric handles, resolved once at start-up.
#[derive(Debug, Clone)]
pub struct ListenerMetrics {
    /// `active_connections{direction=listener}`.
    pub connections: IntGauge,
    /// Requests refused below hyper (see `framing`), by reason.
    pub bad_request: IntCounter,
    pub head_too_large: IntCounter,
    // h2limits: `meshlet_h2_connections_closed_total{listener,reason}`,
    // one handle per reason in the order of `H2_CLOSE_REASONS`.
    pub h2_closed: Arc<[IntCounter]>,
}

/// The `reason` labels of `meshlet_h2_connections_closed_total`, in the
/// order of `listen::h2_guard::CloseReason::ALL` (h2limits).
pub const H2_CLOSE_REASONS: [&str; 6] = [
    "rapid_reset",
    "continuation_flood",
    "control_frame_flood",
    "idle",
    "keepalive_timeout",
    "protocol_error",
];

/// Handles of one destination (a service target, passthrough, the local
/// app), resolved when the target is built.
#[derive(Debug)]
pub struct TargetMetrics {
    /// The `destination` label: the service name (`name.namespace` outside
    /// `default`), [`PASSTHROUGH`], or the own service for inbound.
    pub destination: String,
    /// Outbound: this target's routes. Empty for the local app, whose
    /// routes follow the own service's policies and live in the snapshot.
    pub routes: RouteTable,
    /// `timeouts_total`: tries that got no response headers in time.
    pub timeouts: IntCounter,
    /// `upstream_connect_errors_total`: connections refused or timed out.
    pub connect_errors: IntCounter,
    /// The counters of this target's connection pools.
    pub pool: PoolMetrics,
}

// --- upstream (issue 16): the connection pools' re-sends and opens ---

/// What the upstream connection pools count: requests sent again after
/// the upstream refused them unprocessed, and connections opened.
#[derive(Debug, Clone)]
pub struct PoolMetrics {
    /// `meshlet_upstream_resends_total{reason="goaway"}`: HTTP/2 streams
    /// above a GOAWAY's last stream id (or opened after it).
    pub resent_goaway: IntCounter,
    /// `...{reason="refused_stream"}`: HTTP/2 streams reset with `REFUSED_STREAM`.
    pub resent_refused_stream: IntCounter,
    /// `...{reason="connection_closed"}`: the connection closed before the
    /// request was processed (HTTP/1.1: pooled keep-alive connection closed
    /// before any response byte; HTTP/2: closed before the stream opened).
    pub resent_connection_closed: IntCounter,
    /// `meshlet_upstream_connections_opened_total{protocol="http1"}`.
    pub opened_http1: IntCounter,
    /// `...{protocol="h2c"}`.
    pub opened_h2c: IntCounter,
    /// `...{protocol="mtls"}`.
    pub opened_mtls: IntCounter,
    /// `meshlet_app_accept_queue_full_total`: connects to the local app
    /// that timed out while it answered other requests, started again.
    pub app_accept_queue_full: IntCounter,
}

impl PoolMetrics {
    fn register(r: &Register<'_>) -> Self {
        let resends = r.counter_vec(
            "meshlet_upstream_resends_total",
            "Requests sent again on another upstream connection because the upstream refused them unprocessed (not RetryPolicy retries), by reason",
            &["reason"],
        );
        let opened = r.counter_vec(
            "meshlet_upstream_connections_opened_total",
            "Upstream connections opened by the sidecar's pools, by protocol",
            &["protocol"],
        );
        let app_accept_queue_full = r.counter(
            "meshlet_app_accept_queue_full_total",
            "Connects to the local app that timed out while it answered other requests (its listen backlog overflowed and dropped the SYN), started again",
        );
        PoolMetrics {
            app_accept_queue_full,
            resent_goaway: resends.with_label_values(&["goaway"]),
            resent_refused_stream: resends.with_label_values(&["refused_stream"]),
            resent_connection_closed: resends.with_label_values(&["connection_closed"]),
            opened_http1: opened.with_label_values(&["http1"]),
            opened_h2c: opened.with_label_values(&["h2c"]),
            opened_mtls: opened.with_label_values(&["mtls"]),
        }
    }

    /// Counters registered nowhere (pools made by tests).
    #[cfg(test)]
    pub fn detached() -> Self {
        let counter = |name: &str| IntCounter::new(name, "detached").expect("valid metric");
        PoolMetrics {
            resent_goaway: counter("resent_goaway"),
            resent_refused_stream: counter("resent_refused_stream"),
            resent_connection_closed: counter("resent_connection_closed"),
            opened_http1: counter("opened_http1"),
            opened_h2c: counter("opened_h2c"),
            opened_mtls: counter("opened_mtls"),
            app_accept_queue_full: counter("app_accept_queue_full"),
        }
    }
}

/// One breaker's state at scrape time, for `circuit_breaker_state`.
#[derive(Debug, Clone, Copy)]
pub struct BreakerSample<'a> {
    pub destination: &'a str,
    pub policy: &'a str,
    pub address: SocketAddr,
    /// 0 closed, 1 half-open, 2 open.
    pub state: i64,
}

/// One `meshlet_policy_would_refuse_total` series: `(kind, namespace,
/// name, reason)`.
pub type WouldRefuseKey = (&'static str, String, String, &'static str);

#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    /// Would-refuse handles by key, for the stats reporter.
    would_refuse: Arc<Mutex<HashMap<WouldRefuseKey, IntCounter>>>,
    /// This sidecar's own service (the `service` label).
    service: Arc<str>,
    route_families: RouteFamilies,
    /// Route handles by label set, shared by every snapshot.
    routes: Arc<Mutex<HashMap<RouteKey, Arc<RouteMetrics>>>>,
    request_path: RequestPathFamilies,
    config: ConfigFamilies,
    export: ExportFamilies,
    tcp: TcpFamilies,
    identity: IdentityMetrics,
    pool: PoolMetrics,
    /// h2limits: `meshlet_h2_connections_closed_total{listener,reason}`.
    h2_closed: IntCounterVec,
    /// routes (issue 15): `Route` rules chosen and mirrored copies.
    routing: RoutingFamilies,
    /// perf (issue 17): the busy-poll spinner's time and spins.
    busy_poll: BusyPollMetrics,
}

/// `meshlet_busy_poll_seconds_total`, `meshlet_busy_poll_total{outcome}`
/// and `meshlet_busy_poll_arrivals_total{kind,polled}`
/// (`upstream::busy_poll`): what spinning costs and what it catches.
#[derive(Debug, Clone)]
pub struct BusyPollMetrics {
    pub seconds: Counter,
    pub caught: IntCounter,
    pub missed: IntCounter,
    /// Indexed by `[kind][polled]`: kind 0 a response head, 1 a next
    /// request; polled 0 read after the sidecar slept, 1 while it polled.
    pub arrivals: [[IntCounter; 2]; 2],
}

impl BusyPollMetrics {
    fn register(r: &Register<'_>) -> Self {
        let seconds = r.add(
            Counter::new(
                "meshlet_busy_poll_seconds_total",
                "Time the sidecar spent polling its sockets without blocking while a response or a next request was awaited (--busy-poll)",
            )
            .expect("valid metric"),
        );
        let spins = r.counter_vec(
            "meshlet_busy_poll_total",
            "Busy-poll spins by outcome: caught (nothing worth polling for was awaited any more) or missed (the window passed without an arrival)",
            &["outcome"],
        );
        let arrivals = r.counter_vec(
            "meshlet_busy_poll_arrivals_total",
            "Awaited arrivals while --busy-poll is on, by kind (response: an upstream response head; next_request: a kept-alive client's next request) and polled (true: read while the sidecar was polling, without a wake-up; false: read after it slept)",
            &["kind", "polled"],
        );
        let arrivals_of =
            |kind| ["false", "true"].map(|polled| arrivals.with_label_values(&[kind, polled]));
        BusyPollMetrics {
            seconds,
            caught: spins.with_label_values(&["caught"]),
            missed: spins.with_label_values(&["missed"]),
            arrivals: [arrivals_of("response"), arrivals_of("next_request")],
        }
    }
}

// --- routes (issue 15): `Route` rules and mirrors ---

/// `meshlet_route_requests_total{parent,route,rule}` and
/// `meshlet_mirror_requests_total{service,outcome}`.
#[derive(Debug, Clone)]
struct RoutingFamilies {
    route_requests: IntCounterVec,
    mirror_requests: IntCounterVec,
}

impl RoutingFamilies {
    fn register(r: &Register<'_>) -> Self {
        RoutingFamilies {
            route_requests: r.counter_vec(
                "meshlet_route_requests_total",
                "Requests that matched a Route rule, by parent (gateway/NAME or service/NAME), route and rule index",
                &["parent", "route", "rule"],
            ),
            mirror_requests: r.counter_vec(
                "meshlet_mirror_requests_total",
                "Mirrored copies of requests (requestMirror), by mirror service and outcome: sent (answered), failed (error or timeout), skipped (body not replayable, too many in flight, unknown service)",
                &["service", "outcome"],
            ),
        }
    }
}

/// The counters of one mirror service, resolved at snapshot build.
#[derive(Debug, Clone)]
pub struct MirrorCounters {
    pub sent: IntCounter,
    pub failed: IntCounter,
    pub skipped: IntCounter,
}

/// The workload certificate (`identity`): its expiry, renewals and
/// failed renewals.
#[derive(Debug, Clone)]
pub struct IdentityMetrics {
    /// `meshlet_identity_cert_expiry_timestamp_seconds` (0: no certificate).
    pub expiry: IntGauge,
    /// `meshlet_identity_cert_renewals_total` (the first certificate too).
    pub renewals: IntCounter,
    /// `meshlet_identity_cert_renewal_failures_total`.
    pub failures: IntCounter,
    /// `meshlet_tls_handshakes_total{direction="inbound"}`: mesh-hop TLS
    /// handshakes this sidecar's inbound completed.
    pub inbound_handshakes: IntCounter,
    /// `...{direction="outbound"}`: those its pools completed.
    pub outbound_handshakes: IntCounter,
}

impl IdentityMetrics {
    fn register(r: &Register<'_>) -> Self {
        let handshakes = r.counter_vec(
            "meshlet_tls_handshakes_total",
            "Completed mTLS handshakes of the hop between sidecars, by direction",
            &["direction"],
        );
        IdentityMetrics {
            expiry: r.gauge(
                "meshlet_identity_cert_expiry_timestamp_seconds",
                "Unix time at which this sidecar's workload certificate expires (0: none yet)",
            ),
            renewals: r.counter(
                "meshlet_identity_cert_renewals_total",
                "Workload certificates obtained from the control plane (the first one included)",
            ),
            failures: r.counter(
                "meshlet_identity_cert_renewal_failures_total",
                "Failed requests for a workload certificate (retried with backoff)",
            ),
            inbound_handshakes: handshakes.with_label_values(&["inbound"]),
            outbound_handshakes: handshakes.with_label_values(&["outbound"]),
        }
    }
}

/// Families the request path counts on (besides the route families).
#[derive(Debug, Clone)]
struct RequestPathFamilies {
    active_connections: IntGaugeVec,
    mesh_responses: IntCounterVec,
    rate_limited: IntCounterVec,
    retries: IntCounterVec,
    timeouts: IntCounterVec,
    connect_errors: IntCounterVec,
    authz_denied: IntCounterVec,
    authz_dry_run_denied: IntCounterVec,
    mtls_plaintext_refused: IntCounter,
    faults_injected: IntCounterVec,
    would_refuse: IntCounterVec,
}

/// The configuration this sidecar routes with, and where it came from.
#[derive(Debug, Clone)]
struct ConfigFamilies {
    revision: IntGauge,
    applied: IntGauge,
    control_plane_connected: IntGauge,
    // issue 16 (cp): pushes held by the empty-push guard (control/client.rs).
    pushes_held: IntCounter,
    // issue 18: replicas (control/replicas.rs).
    failovers: IntCounter,
    current: IntGaugeVec,
    updates: IntCounterVec,
}

/// What the span exporter and the access log dropped or sent.
#[derive(Debug, Clone)]
struct ExportFamilies {
    spans_exported: IntCounter,
    spans_dropped: IntCounterVec,
    access_log_dropped: IntCounter,
}

/// Transparent mode's opaque TCP splices.
#[derive(Debug, Clone)]
struct TcpFamilies {
    connections: IntCounterVec,
    sent_bytes: IntCounterVec,
    received_bytes: IntCounterVec,
}

/// Handles of one transparent listener's opaque TCP (non-HTTP) splices.
#[derive(Debug, Clone)]
pub struct TcpMetrics {
    /// `tcp_connections_total{direction}`: connections spliced.
    pub connections: IntCounter,
    /// `tcp_sent_bytes_total{direction}`: client → destination.
    pub sent: IntCounter,
    /// `tcp_received_bytes_total{direction}`: destination → client.
    pub received: IntCounter,
}

type RouteKey = (Direction, String, String);

/// Creates metric families and registers each in the registry as it is
/// made, so that a family cannot be forgotten.
struct Register<'r>(&'r Registry);

impl Register<'_> {
    fn add<C: prometheus::core::Collector + Clone + 'static>(&self, collector: C) -> C {
        self.0
            .register(Box::new(collector.clone()))
            .expect("metric registered once");
        collector
    }

    fn counter_vec(&self, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
        self.add(IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"))
    }

    fn counter(&self, name: &str, help: &str) -> IntCounter {
        self.add(IntCounter::new(name, help).expect("valid metric"))
    }

    fn gauge(&self, name: &str, help: &str) -> IntGauge {
        self.add(IntGauge::new(name, help).expect("valid metric"))
    }

    fn gauge_vec(&self, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
        self.add(IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric"))
    }
}

impl RequestPathFamilies {
    fn register(r: &Register<'_>) -> Self {
        RequestPathFamilies {
            active_connections: r.add(
                IntGaugeVec::new(
                    Opts::new(
                        "active_connections",
                        "Client connections currently open, by listener",
                    ),
                    &["direction"],
                )
                .expect("valid metric"),
            ),
            mesh_responses: r.counter_vec(
                "meshlet_mesh_responses_total",
                "Responses generated by the sidecar itself, by direction and x-meshlet-reason",
                &["direction", "reason"],
            ),
            rate_limited: r.counter_vec(
                "rate_limited_total",
                "Inbound requests refused with 429 by a RateLimitPolicy (endpoint: its match.pathPrefix)",
                &["service", "policy", "endpoint"],
            ),
            retries: r.counter_vec(
                "retries_total",
                "Retries sent under a RetryPolicy",
                &["destination", "policy"],
            ),
            timeouts: r.counter_vec(
                "timeouts_total",
                "Tries whose response headers did not arrive in time",
                &["direction", "destination"],
            ),
            connect_errors: r.counter_vec(
                "upstream_connect_errors_total",
                "Connections to an upstream that were refused or timed out",
                &["direction", "destination"],
            ),
            authz_denied: r.counter_vec(
                "meshlet_authz_denied_total",
                "Inbound requests refused with 403 denied by an AuthorizationPolicy (a matching DENY, or the ALLOW policies none of which matched, joined with ',')",
                &["policy"],
            ),
            authz_dry_run_denied: r.counter_vec(
                "meshlet_authz_dry_run_denied_total",
                "Inbound requests a dryRun AuthorizationPolicy would have refused (they were not refused)",
                &["policy"],
            ),
            mtls_plaintext_refused: r.counter(
                "meshlet_mtls_plaintext_refused_total",
                "Plaintext inbound requests (403 mtls_required) and opaque TCP connections (closed) refused under MTLSPolicy strict",
            ),
            faults_injected: r.counter_vec(
                "meshlet_faults_injected_total",
                "Outbound requests a FaultInjectionPolicy delayed or aborted (service: the policy's target), by kind (delay, abort)",
                &["service", "policy", "kind"],
            ),
            would_refuse: r.counter_vec(
                "meshlet_policy_would_refuse_total",
                "Requests a dryRun policy would have refused (they were sent), by policy (name, name.namespace outside default), kind and reason",
                &["policy", "kind", "reason"],
            ),
        }
    }
}

impl ConfigFamilies {
    fn register(r: &Register<'_>) -> Self {
        ConfigFamilies {
            revision: r.gauge(
                "meshlet_config_revision",
                "Revision of the mesh configuration this sidecar routes with (0: standalone)",
            ),
            applied: r.gauge(
                "meshlet_config_applied_timestamp_seconds",
                "Unix time at which the current configuration revision was applied",
            ),
            control_plane_connected: r.gauge(
                "meshlet_control_plane_connected",
                "1 while the watch stream to the control plane is open",
            ),
            // issue 16 (cp)
            pushes_held: r.counter(
                "meshlet_config_pushes_held_total",
                "Pushes that would have removed every endpoint of every service, held until a full resync confirmed them",
            ),
            failovers: r.counter(
                "meshlet_control_plane_failovers_total",
                "Moves of the watch (and every call) from one control-plane replica to the next",
            ),
            current: r.gauge_vec(
                "meshlet_control_plane_current",
                "1 for the control-plane replica calls go to (its URL, and the address for a name)",
                &["url"],
            ),
            updates: r.counter_vec(
                "meshlet_control_plane_updates_total",
                "Watch events received: full snapshots and deltas (a resumed watch gets deltas)",
                &["type"],
            ),
        }
    }
}

impl ExportFamilies {
    fn register(r: &Register<'_>) -> Self {
        ExportFamilies {
            spans_exported: r.counter("meshlet_spans_exported_total", "Spans the collector accepted"),
            spans_dropped: r.counter_vec(
                "meshlet_spans_dropped_total",
                "Spans dropped: queue_full (the export queue was full) or export_failed (the collector refused or did not answer)",
                &["reason"],
            ),
            access_log_dropped: r.counter(
                "meshlet_access_log_dropped_total",
                "Access log lines dropped because standard output could not keep up",
            ),
        }
    }
}

impl TcpFamilies {
    fn register(r: &Register<'_>) -> Self {
        TcpFamilies {
            connections: r.counter_vec(
                "tcp_connections_total",
                "Opaque (non-HTTP) TCP connections spliced through a transparent listener",
                &["direction"],
            ),
            sent_bytes: r.counter_vec(
                "tcp_sent_bytes_total",
                "Bytes of opaque TCP connections from the client to the destination (counted when the connection closes)",
                &["direction"],
            ),
            received_bytes: r.counter_vec(
                "tcp_received_bytes_total",
                "Bytes of opaque TCP connections from the destination to the client (counted when the connection closes)",
                &["direction"],
            ),
        }
    }
}

impl Metrics {
    /// The metrics of a sidecar of `service`: every family, registered.
    pub fn new(service: &str) -> Self {
        let registry = Registry::new();
        let route_families = RouteFamilies::new();
        for collector in route_families.collectors() {
            registry
                .register(collector)
                .expect("metric registered once");
        }
        let register = Register(&registry);
        Metrics {
            service: service.into(),
            route_families,
            routes: Arc::default(),
            would_refuse: Arc::default(),
            request_path: RequestPathFamilies::register(&register),
            config: ConfigFamilies::register(&register),
            export: ExportFamilies::register(&register),
            tcp: TcpFamilies::register(&register),
            identity: IdentityMetrics::register(&register),
            pool: PoolMetrics::register(&register),
            h2_closed: register.counter_vec(
                "meshlet_h2_connections_closed_total",
                "HTTP/2 client connections the sidecar closed, by listener and reason (rapid_reset, continuation_flood, control_frame_flood, idle, keepalive_timeout, protocol_error)",
                &["listener", "reason"],
            ),
            routing: RoutingFamilies::register(&register),
            busy_poll: BusyPollMetrics::register(&register),
            registry,
        }
    }

    /// routes: `meshlet_route_requests_total{parent,route,rule}` of one rule.
    pub fn route_requests(&self, parent: &str, route: &str, rule: usize) -> IntCounter {
        self.routing
            .route_requests
            .with_label_values(&[parent, route, &rule.to_string()])
    }

    /// routes: `meshlet_mirror_requests_total{service,...}` of one mirror service.
    pub fn mirror_requests(&self, service: &str) -> MirrorCounters {
        let family = &self.routing.mirror_requests;
        MirrorCounters {
            sent: family.with_label_values(&[service, "sent"]),
            failed: family.with_label_values(&[service, "failed"]),
            skipped: family.with_label_values(&[service, "skipped"]),
        }
    }

    /// The busy-poll spinner's counters.
    pub fn busy_poll(&self) -> BusyPollMetrics {
        self.busy_poll.clone()
    }

    /// The own service (the `service` label).
    pub fn service(&self) -> &str {
        &self.service
    }

    /// Records that configuration `revision` was just applied.
    pub fn set_config_revision(&self, revision: u64) {
        self.config.revision.set(revision as i64);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        self.config.applied.set(now);
    }

    /// The workload certificate's handles.
    pub fn identity(&self) -> IdentityMetrics {
        self.identity.clone()
    }

    pub fn set_control_plane_connected(&self, connected: bool) {
        self.config.control_plane_connected.set(connected as i64);
    }

    /// The configuration revision applied (tests).
    #[cfg(test)]
    pub fn config_revision(&self) -> u64 {
        self.config.revision.get() as u64
    }

    /// issue 18: the watch failed over to another control-plane replica.
    pub fn control_plane_failover(&self) {
        self.config.failovers.inc();
    }

    /// issue 18: calls go to the replica `endpoint` now (the one series).
    pub fn set_control_plane_current(&self, endpoint: &str) {
        self.config.current.reset();
        self.config.current.with_label_values(&[endpoint]).set(1);
    }

    /// issue 18: snapshots and deltas received on the watch.
    pub fn control_plane_updates(&self, snapshots: u64, deltas: u64) {
        if snapshots > 0 {
            self.config
                .updates
                .with_label_values(&["snapshot"])
                .inc_by(snapshots);
        }
        if deltas > 0 {
            self.config
                .updates
                .with_label_values(&["delta"])
                .inc_by(deltas);
        }
    }

    /// issue 16 (cp): a push that would have emptied the mesh was held.
    pub fn config_push_held(&self) {
        self.config.pushes_held.inc();
    }

    /// issue 16 (cp): pushes held so far (tests).
    #[cfg(test)]
    pub fn config_pushes_held(&self) -> u64 {
        self.config.pushes_held.get()
    }

    /// The handles of route `(direction, destination, endpoint)`: the same
    /// `Arc` every time for the same labels (snapshot builds reuse them).
    pub fn route(
        &self,
        direction: Direction,
        destination: &str,
        endpoint: &str,
    ) -> Arc<RouteMetrics> {
        let mut routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        let key = (direction, destination.to_owned(), endpoint.to_owned());
        Arc::clone(routes.entry(key).or_insert_with(|| {
            Arc::new(RouteMetrics::new(
                &self.route_families,
                direction,
                &self.service,
                destination,
                endpoint,
            ))
        }))
    }

    /// Every route's handles resolved so far (for the stats reporter).
    pub fn routes(&self) -> Vec<Arc<RouteMetrics>> {
        let routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        routes.values().cloned().collect()
    }

    /// Where outbound requests refused before a destination was known
    /// are counted (inbound: the own service, all paths).
    pub fn unrouted(&self, direction: Direction) -> Arc<RouteMetrics> {
        let destination = match direction {
            Direction::Inbound => &*self.service,
            Direction::Outbound => UNKNOWN_DESTINATION,
        };
        self.route(direction, destination, ALL_PATHS)
    }

    /// The handles of one destination, with its `routes`.
    pub fn target(
        &self,
        direction: Direction,
        destination: String,
        routes: RouteTable,
    ) -> TargetMetrics {
        let labels = [direction.as_str(), &destination];
        TargetMetrics {
            timeouts: self.request_path.timeouts.with_label_values(&labels),
            connect_errors: self.request_path.connect_errors.with_label_values(&labels),
            pool: self.pool(),
            destination,
            routes,
        }
    }

    /// The connection pools' counters.
    pub fn pool(&self) -> PoolMetrics {
        self.pool.clone()
    }

    /// `rate_limited_total` of one `RateLimitPolicy` of the own service.
    pub fn rate_limited(&self, policy: &str, endpoint: &str) -> IntCounter {
        self.request_path
            .rate_limited
            .with_label_values(&[&*self.service, policy, endpoint])
    }

    /// `meshlet_authz_denied_total{policy}`.
    pub fn authz_denied(&self, policy: &str) -> IntCounter {
        self.request_path.authz_denied.with_label_values(&[policy])
    }

    /// `meshlet_authz_dry_run_denied_total{policy}`.
    pub fn authz_dry_run_denied(&self, policy: &str) -> IntCounter {
        self.request_path
            .authz_dry_run_denied
            .with_label_values(&[policy])
    }

    /// `meshlet_faults_injected_total{service, policy, kind}` of one
    /// `FaultInjectionPolicy` targeting `service`; `kind` is `delay` or
    /// `abort`.
    pub fn fault_injected(&self, service: &str, policy: &str, kind: &str) -> IntCounter {
        self.request_path
            .faults_injected
            .with_label_values(&[service, policy, kind])
    }

    /// `meshlet_policy_would_refuse_total{policy, kind, reason}` of one
    /// dry-run policy (`policy`: its name, `name.namespace` outside
    /// `default`); the stats reporter reads the same handle.
    pub fn would_refuse(
        &self,
        kind: &'static str,
        namespace: &str,
        name: &str,
        reason: &'static str,
    ) -> IntCounter {
        let key = (kind, namespace.to_owned(), name.to_owned(), reason);
        let mut handles = self.would_refuse.lock().unwrap_or_else(|p| p.into_inner());
        handles
            .entry(key)
            .or_insert_with(|| {
                let policy = destination_label(namespace, name);
                self.request_path
                    .would_refuse
                    .with_label_values(&[&policy, kind, reason])
            })
            .clone()
    }

    /// Every would-refuse series resolved so far with its count.
    pub fn would_refuse_totals(&self) -> Vec<(WouldRefuseKey, u64)> {
        let handles = self.would_refuse.lock().unwrap_or_else(|p| p.into_inner());
        handles
            .iter()
            .map(|(key, counter)| (key.clone(), counter.get()))
            .collect()
    }

    /// `meshlet_mtls_plaintext_refused_total`.
    pub fn mtls_plaintext_refused(&self) -> IntCounter {
        self.request_path.mtls_plaintext_refused.clone()
    }

    /// `retries_total` of one `RetryPolicy` for `destination`.
    pub fn retries(&self, destination: &str, policy: &str) -> IntCounter {
        self.request_path
            .retries
            .with_label_values(&[destination, policy])
    }

    /// The span exporter's counters (both drop reasons appear at 0 from
    /// the start, so a dashboard sees the series before the first drop).
    pub fn span_counters(&self) -> ExportCounters {
        ExportCounters {
            exported: self.export.spans_exported.clone(),
            dropped_queue_full: self.export.spans_dropped.with_label_values(&["queue_full"]),
            dropped_export_failed: self
                .export
                .spans_dropped
                .with_label_values(&["export_failed"]),
        }
    }

    /// A gateway's `meshlet_gateway_certificate_reloads_total{outcome}`
    /// (`ok`, `error`), registered by the one call a gateway makes at start
    /// (other sidecars have no such series).
    pub fn gateway_certificate_reloads(&self) -> [IntCounter; 2] {
        let family = Register(&self.registry).counter_vec(
            "meshlet_gateway_certificate_reloads_total",
            "Reloads of the gateway's TLS certificate files after they changed, by outcome (error: the previous certificate is still served).",
            &["outcome"],
        );
        ["ok", "error"].map(|outcome| family.with_label_values(&[outcome]))
    }

    pub fn access_log_dropped(&self) -> IntCounter {
        self.export.access_log_dropped.clone()
    }

    /// Opaque TCP handles of a transparent listener.
    pub fn tcp(&self, direction: Direction) -> TcpMetrics {
        let labels = [direction.as_str()];
        TcpMetrics {
            connections: self.tcp.connections.with_label_values(&labels),
            sent: self.tcp.sent_bytes.with_label_values(&labels),
            received: self.tcp.received_bytes.with_label_values(&labels),
        }
    }

    /// Handles for one listener (`inbound`, `outbound` or `admin`).
    pub fn listener(&self, name: &str) -> ListenerMetrics {
        ListenerMetrics {
            connections: self
                .request_path
                .active_connections
                .with_label_values(&[name]),
            bad_request: self
                .request_path
                .mesh_responses
                .with_label_values(&[name, "bad_request"]),
            head_too_large: self
                .request_path
                .mesh_responses
                .with_label_values(&[name, "header_too_large"]),
            h2_closed: H2_CLOSE_REASONS
                .iter()
                .map(|reason| self.h2_closed.with_label_values(&[name, reason]))
                .collect(),
        }
    }

    /// Counts a response the mesh generated (errors are off the fast path).
    pub fn mesh_response(&self, direction: Direction, reason: &str) {
        self.request_path
            .mesh_responses
            .with_label_values(&[direction.as_str(), reason])
            .inc();
    }

    /// Prometheus text exposition format, with `circuit_breaker_state`
    /// computed from `breakers` (the current snapshot's) at this moment.
    pub fn render(&self, breakers: &[BreakerSample<'_>]) -> Vec<u8> {
        let mut families = self.registry.gather();
        let states = IntGaugeVec::new(
            Opts::new(
                "circuit_breaker_state",
                "Circuit breaker state per policy and endpoint: 0 closed, 1 half-open, 2 open",
            ),
            &["destination", "policy", "address"],
        )
        .expect("valid metric");
        for sample in breakers {
            let address = sample.address.to_string();
            states
                .with_label_values(&[sample.destination, sample.policy, &address])
                .set(sample.state);
        }
        if !breakers.is_empty() {
            // (The encoder refuses a family without samples.)
            families.extend(prometheus::core::Collector::collect(&states));
            families.sort_by(|a, b| a.name().cmp(b.name()));
        }
        let mut out = Vec::new();
        if let Err(error) = TextEncoder::new().encode(&families, &mut out) {
            tracing::warn!(%error, "cannot encode the metrics");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    use crate::telemetry::route_metrics::{MethodLabel, DURATION_BUCKETS};

    const POLICIES: &str = "\
apiVersion: meshlet.dev/v1alpha1
kind: RetryPolicy
metadata: {name: api-retry}
spec: {targetRef: {service: orders}, match: {pathPrefix: /api}}
---
apiVersion: meshlet.dev/v1alpha1
kind: TimeoutPolicy
metadata: {name: items-timeout}
spec: {targetRef: {service: orders}, match: {pathPrefix: /api/items, methods: [GET]}, request: 1s}
---
apiVersion: meshlet.dev/v1alpha1
kind: CircuitBreakerPolicy
metadata: {name: same-prefix}
spec: {targetRef: {service: orders}, match: {pathPrefix: /api}}
---
apiVersion: meshlet.dev/v1alpha1
kind: RateLimitPolicy
metadata: {name: other-service}
spec: {targetRef: {service: stock}, match: {pathPrefix: /stock}, tokenBucket: {capacity: 1, refillPerSecond: 1}}
";

    fn table(metrics: &Metrics) -> RouteTable {
        let resources = meshlet_api::parse_documents("t.yaml", POLICIES).unwrap();
        RouteTable::build(&resources, "default", "orders", |prefix| {
            metrics.route(Direction::Outbound, "orders", prefix)
        })
    }

    fn endpoint<'a>(table: &'a RouteTable, path: &str) -> &'a str {
        table.select(path).unwrap().endpoint()
    }

    #[test]
    fn the_most_specific_policy_prefix_labels_a_request_never_the_raw_path() {
        let metrics = Metrics::new("frontend");
        let table = table(&metrics);
        assert_eq!(endpoint(&table, "/api/items/123"), "/api/items");
        assert_eq!(endpoint(&table, "/api/orders/9"), "/api");
        assert_eq!(endpoint(&table, "/other/456"), "/");
        assert_eq!(
            endpoint(&table, "/stock/1"),
            "/",
            "another service's policy"
        );
        assert_eq!(endpoint(&table, "orders:443"), "/", "CONNECT targets too");
        assert_eq!(table.len(), 3, "one route per distinct prefix");
    }

    #[test]
    fn a_rebuilt_table_reuses_the_same_handles() {
        let metrics = Metrics::new("frontend");
        let (first, second) = (table(&metrics), table(&metrics));
        assert!(Arc::ptr_eq(
            first.select("/api").unwrap(),
            second.select("/api").unwrap()
        ));
    }

    #[test]
    fn status_counters_are_resolved_once_per_method_and_status() {
        let metrics = Metrics::new("frontend");
        let route = metrics.route(Direction::Outbound, "orders", "/");
        for _ in 0..3 {
            route.count(MethodLabel::Get, 200, Duration::from_millis(1));
        }
        route.count(MethodLabel::Post, 200, Duration::from_millis(1));
        route.count(MethodLabel::Get, 503, Duration::from_millis(1));
        assert_eq!(route.cached(), 3);
        assert_eq!(route.counter(MethodLabel::Get, 200).get(), 3);
        assert_eq!(route.duration.get_sample_count(), 5);
        let totals = route.totals();
        assert_eq!((totals.requests, totals.errors), (5, 1));
        assert_eq!(totals.latency_bounds_ms.len(), DURATION_BUCKETS.len());
        assert_eq!(totals.latency_bounds_ms[0], 0.5);
        assert_eq!(totals.latency_counts.len(), DURATION_BUCKETS.len() + 1);
        // 1 ms lands in the (0.5 ms, 1 ms] bucket.
        assert_eq!(totals.latency_counts[1], 5);
        assert_eq!(totals.latency_counts.iter().sum::<u64>(), 5);
        let text = String::from_utf8(metrics.render(&[])).unwrap();
        assert!(
            text.contains(r#"request_total{destination="orders",direction="outbound",endpoint="/",method="GET",service="frontend",status_code="200"} 3"#),
            "{text}"
        );
    }
}
