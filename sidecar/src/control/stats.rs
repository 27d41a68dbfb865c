//! The stats reporter: what this sidecar observed, sent to the control
//! plane every `--stats-interval` for its dashboard (no Prometheus needed).
//!
//! ```text
//! every interval: Metrics::routes ─► RouteMetrics::totals ─┐
//!                 snapshot: rate limiters' refusals ────────┼─► Reading (totals since start)
//!                 snapshot: breaker states ─────────────────┤        │ minus the Baseline
//!                 dry-run policies' would-refuse counts ────┘        │
//!                                                                     ▼
//!                 POST /api/v1/instances/{id}/stats  ◄── StatsReport (deltas)
//!                 accepted → the reading becomes the baseline
//! ```
//!
//! Nothing here touches the request path: the reporter only reads the
//! counters and histograms the requests already update. A report that
//! fails (control plane down, or 404 while the instance re-registers) is
//! logged at debug and the baseline stays, so the next report carries its
//! counts too. That carry is bounded in time: once the oldest unreported
//! count is older than [`MAX_CARRY`] (what the control plane keeps
//! anyway), the baseline moves to the current reading and those counts are
//! dropped. In size it is bounded by the number of routes and policies.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::Method;
use meshlet_api::mesh::{
    paths, BreakerReport, BreakerState, RateLimitReport, RouteStats, StatsDirection, StatsReport,
    WouldRefuseReport,
};
use tokio::sync::watch;

use crate::control::snapshot::{SharedSnapshot, Snapshot};
use crate::settings::ControlPlaneSettings;
use crate::telemetry::metrics::{Metrics, WouldRefuseKey};
use crate::telemetry::route_metrics::RouteTotals;

/// Unreported counts older than this are dropped (the control plane keeps
/// five minutes of reports).
pub const MAX_CARRY: Duration = Duration::from_secs(300);
/// Deadline of one report call.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// A route's labels: `(direction, destination, endpoint)`.
type RouteKey = (StatsDirection, String, String);

/// Totals since start, read at one moment.
#[derive(Debug, Default, Clone)]
struct Reading {
    routes: HashMap<RouteKey, RouteTotals>,
    /// `RateLimitPolicy` name → requests refused since start.
    refused: HashMap<String, u64>,
    breakers: Vec<BreakerReport>,
    /// Dry-run policies' would-refuse counts since start.
    would_refuse: HashMap<WouldRefuseKey, u64>,
}

impl Reading {
    fn take(metrics: &Metrics, snapshot: &Snapshot) -> Reading {
        let routes = metrics
            .routes()
            .iter()
            .map(|route| {
                let direction = match route.direction() {
                    "inbound" => StatsDirection::Inbound,
                    _ => StatsDirection::Outbound,
                };
                let key = (
                    direction,
                    route.destination().to_string(),
                    route.endpoint().to_owned(),
                );
                (key, route.totals())
            })
            .collect();
        let mut refused = HashMap::new();
        for limiter in &snapshot.inbound.rate_limits {
            *refused.entry(limiter.name.clone()).or_default() += limiter.refused.get();
        }
        let breakers = snapshot
            .breaker_samples()
            .iter()
            .map(|sample| BreakerReport {
                destination: sample.destination.to_owned(),
                policy: sample.policy.to_owned(),
                address: sample.address,
                state: match sample.state {
                    0 => BreakerState::Closed,
                    1 => BreakerState::HalfOpen,
                    _ => BreakerState::Open,
                },
            })
            .collect();
        Reading {
            routes,
            refused,
            breakers,
            would_refuse: metrics.would_refuse_totals().into_iter().collect(),
        }
    }

    /// The report of what `self` counted beyond `baseline` (the reading of
    /// the last accepted report). Routes and policies without new counts
    /// are left out.
    fn report_since(&self, baseline: &Reading, interval: Duration) -> StatsReport {
        let empty = RouteTotals::default();
        let mut routes: Vec<RouteStats> = self
            .routes
            .iter()
            .filter_map(|((direction, destination, endpoint), now)| {
                let before = baseline
                    .routes
                    .get(&(*direction, destination.clone(), endpoint.clone()))
                    .unwrap_or(&empty);
                let requests = now.requests.saturating_sub(before.requests);
                (requests > 0).then(|| RouteStats {
                    direction: *direction,
                    destination: destination.clone(),
                    endpoint: endpoint.clone(),
                    requests,
                    errors: now.errors.saturating_sub(before.errors),
                    latency_buckets_ms: now.latency_bounds_ms.clone(),
                    latency_counts: now
                        .latency_counts
                        .iter()
                        .enumerate()
                        .map(|(i, n)| {
                            n.saturating_sub(before.latency_counts.get(i).copied().unwrap_or(0))
                        })
                        .collect(),
                })
            })
            .collect();
        routes.sort_by(|a, b| {
            (a.direction, &a.destination, &a.endpoint).cmp(&(
                b.direction,
                &b.destination,
                &b.endpoint,
            ))
        });
        let mut rate_limited: Vec<RateLimitReport> = self
            .refused
            .iter()
            .map(|(policy, now)| RateLimitReport {
                policy: policy.clone(),
                refused: now.saturating_sub(baseline.refused.get(policy).copied().unwrap_or(0)),
            })
            .filter(|r| r.refused > 0)
            .collect();
        rate_limited.sort_by(|a, b| a.policy.cmp(&b.policy));
        let mut would_refuse: Vec<WouldRefuseReport> = self
            .would_refuse
            .iter()
            .filter_map(|(key, now)| {
                let before = baseline.would_refuse.get(key).copied().unwrap_or(0);
                let count = now.saturating_sub(before);
                let (kind, namespace, policy, reason) = key;
                (count > 0).then(|| WouldRefuseReport {
                    kind: (*kind).to_owned(),
                    namespace: namespace.clone(),
                    policy: policy.clone(),
                    reason: (*reason).to_owned(),
                    count,
                })
            })
            .collect();
        would_refuse.sort_by(|a, b| {
            (&a.kind, &a.namespace, &a.policy, &a.reason).cmp(&(
                &b.kind,
                &b.namespace,
                &b.policy,
                &b.reason,
            ))
        });
        StatsReport {
            interval_ms: interval.as_millis() as u64,
            routes,
            breakers: self.breakers.clone(),
            rate_limited,
            would_refuse,
        }
    }
}

/// The reporter's state between two reports.
struct Reporter {
    client: meshlet_client::Client,
    /// The replica each report goes to is the current one.
    replicas: Arc<crate::control::replicas::Replicas>,
    path: String,
    metrics: Metrics,
    snapshot: SharedSnapshot,
    /// The reading of the last accepted report (empty at start: the first
    /// report carries everything since start).
    baseline: Reading,
    /// When the baseline was read.
    since: Instant,
}

impl Reporter {
    /// Reads the counters and sends one report; moves the baseline on
    /// success, or when the unreported counts are too old to keep.
    async fn report_once(&mut self) {
        let reading = Reading::take(&self.metrics, &self.snapshot.load());
        let now = Instant::now();
        let report = reading.report_since(&self.baseline, now - self.since);
        let body = serde_json::to_vec(&report).expect("serializable");
        let endpoint = self.replicas.current();
        let sent = crate::control::call(
            &endpoint.client(&self.client),
            &endpoint.authority,
            Method::POST,
            &self.path,
            Some(body),
            CALL_TIMEOUT,
        )
        .await;
        match sent {
            Ok(_) => self.rebase(reading, now),
            Err(error) => {
                tracing::debug!(%error, "stats report failed; its counts go with the next one");
                if now - self.since > MAX_CARRY {
                    tracing::debug!("dropping unreported stats older than {MAX_CARRY:?}");
                    self.rebase(reading, now);
                }
            }
        }
    }

    fn rebase(&mut self, reading: Reading, at: Instant) {
        self.baseline = reading;
        self.since = at;
    }
}

/// Starts the reporter of a sidecar with a control plane whose stats
/// interval is set; it ends when `stop` turns true.
pub fn spawn(
    cp: &ControlPlaneSettings,
    interval: Duration,
    metrics: Metrics,
    snapshot: SharedSnapshot,
    mut stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let mut reporter = Reporter {
        client: cp.client.clone(),
        replicas: Arc::clone(&cp.replicas),
        path: paths::stats(&cp.instance_id),
        metrics,
        snapshot: Arc::clone(&snapshot),
        baseline: Reading::default(),
        since: Instant::now(),
    };
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = stop.wait_for(|stop| *stop) => return,
            }
            reporter.report_once().await;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::direction::Direction;
    use crate::telemetry::route_metrics::MethodLabel;

    fn reading(metrics: &Metrics) -> Reading {
        Reading::take(metrics, &Snapshot::default())
    }

    #[test]
    fn a_report_carries_the_counts_since_the_baseline_only() {
        let metrics = Metrics::new("frontend");
        let orders = metrics.route(Direction::Outbound, "orders", "/");
        let _idle = metrics.route(Direction::Inbound, "frontend", "/");
        for _ in 0..3 {
            orders.count(MethodLabel::Get, 200, Duration::from_millis(2));
        }
        let first = reading(&metrics).report_since(&Reading::default(), Duration::from_secs(1));
        assert_eq!(first.interval_ms, 1000);
        assert_eq!(
            first.routes.len(),
            1,
            "routes without requests are left out"
        );
        let route = &first.routes[0];
        assert_eq!(
            (route.direction, route.destination.as_str(), route.requests),
            (StatsDirection::Outbound, "orders", 3)
        );
        assert_eq!(
            route.latency_counts.len(),
            route.latency_buckets_ms.len() + 1
        );
        assert_eq!(route.latency_counts.iter().sum::<u64>(), 3);

        let baseline = reading(&metrics);
        orders.count(MethodLabel::Get, 503, Duration::from_secs(20));
        orders.count(MethodLabel::Post, 0, Duration::from_millis(1));
        let second = reading(&metrics).report_since(&baseline, Duration::from_secs(1));
        let route = &second.routes[0];
        assert_eq!((route.requests, route.errors), (2, 2));
        assert_eq!(route.latency_counts.iter().sum::<u64>(), 2);
        assert_eq!(
            *route.latency_counts.last().unwrap(),
            1,
            "20 s is above 10 s"
        );
    }

    #[test]
    fn a_failed_report_leaves_its_counts_for_the_next() {
        let metrics = Metrics::new("frontend");
        let orders = metrics.route(Direction::Outbound, "orders", "/");
        let baseline = reading(&metrics);
        orders.count(MethodLabel::Get, 200, Duration::from_millis(1));
        // (This reading's report failed: the baseline stays.)
        let _failed = reading(&metrics).report_since(&baseline, Duration::from_secs(1));
        orders.count(MethodLabel::Get, 200, Duration::from_millis(1));
        let next = reading(&metrics).report_since(&baseline, Duration::from_secs(2));
        assert_eq!(next.routes[0].requests, 2);
    }

    #[test]
    fn would_refuse_counts_travel_as_deltas() {
        let metrics = Metrics::new("orders");
        let would =
            metrics.would_refuse("RateLimitPolicy", "default", "orders-limit", "rate_limited");
        would.inc_by(5);
        let baseline = reading(&metrics);
        assert_eq!(
            baseline
                .report_since(&Reading::default(), Duration::from_secs(1))
                .would_refuse,
            [WouldRefuseReport {
                kind: "RateLimitPolicy".into(),
                namespace: "default".into(),
                policy: "orders-limit".into(),
                reason: "rate_limited".into(),
                count: 5,
            }]
        );
        would.inc_by(2);
        let next = reading(&metrics).report_since(&baseline, Duration::from_secs(1));
        assert_eq!(next.would_refuse[0].count, 2);
        let quiet = reading(&metrics).report_since(&reading(&metrics), Duration::from_secs(1));
        assert!(quiet.would_refuse.is_empty(), "nothing new: left out");
    }
}
