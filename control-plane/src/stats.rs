//! The stats store: the sidecars' stats reports of the last five minutes,
//! in memory, and the aggregations the dashboard shows.
//!
//! ```text
//! POST /api/v1/instances/{id}/stats ─► ingest: per instance a ring buffer of
//!     reports (deltas), bounded by WINDOW and MAX_REPORTS; breaker states
//!     kept from the latest report, with when each state was first seen
//! dashboard ─► traffic(key): per instance, the reports of the window
//!     summed by a key (service inbound, caller→destination edge, rate
//!     limit policy), rates over the last RATE_WINDOW, then summed
//! meshctl describe (resources/info) ─► traffic_over(60 s, by_would_refuse):
//!     what each dry-run policy would have refused, summed over instances
//! registry change ─► retain: instances that left are forgotten
//! ```
//!
//! Rates: each instance's count in the last 30 s is divided by the time
//! its reports in that span cover (at most 30 s), and the instances' rates
//! are added. Percentiles come from the merged latency buckets of the same
//! 30 s: the bucket holding the rank, then linear interpolation between its
//! bounds (the lower bound of the first is 0; a rank in the overflow
//! bucket answers the last bound). Only buckets with the same bounds merge
//! (every sidecar of one build has the same); others are left out.
//!
//! Nothing is durable: a restarted control plane starts empty and fills
//! within one reporting interval. Every method takes the time (`now_ms`,
//! Unix milliseconds) as a parameter, so tests drive the clock. One `std`
//! mutex, never held across an await.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;

use meshlet_api::mesh::{BreakerReport, BreakerState, RouteStats, ServiceKey, StatsReport};

/// How long reports are kept.
pub const WINDOW_MS: u64 = 5 * 60 * 1000;
/// Rates, success rates and percentiles cover this much of the window.
pub const RATE_WINDOW_MS: u64 = 30 * 1000;
/// Reports kept per instance at most (five minutes at a 200 ms interval).
pub const MAX_REPORTS: usize = 1500;
/// Routes and rate-limit entries accepted in one report.
pub const MAX_ENTRIES: usize = 512;
/// Estimated bytes of all kept reports at most (64 MiB): past it the
/// oldest report of any instance goes first. A report is counted as its
/// JSON body's length plus the bookkeeping ([`report_bytes`]).
pub const MAX_BYTES: usize = 64 << 20;

/// What one kept report is counted as: its JSON body's length (about what
/// its decoded strings and numbers take) plus the `Stored` itself.
pub fn report_bytes(body_len: usize) -> usize {
    body_len + std::mem::size_of::<Stored>()
}

/// Why a report was refused.
#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    #[error("{what}: {count} entries in one report; at most {MAX_ENTRIES}")]
    TooMany { what: &'static str, count: usize },
    #[error(
        "route {index} ({destination}): {counts} latency counts for {bounds} bucket bounds; \
         expected one count per bound plus one for the overflow"
    )]
    LatencyShape {
        index: usize,
        destination: String,
        counts: usize,
        bounds: usize,
    },
    #[error("route {index} ({destination}): latency bucket bounds must be finite and ascending")]
    LatencyBounds { index: usize, destination: String },
}

/// Requests (or refusals) of one key, merged over reports and instances.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Traffic {
    pub requests: u64,
    pub errors: u64,
    /// Per second, over the rate window.
    pub per_second: f64,
    bounds: Vec<f64>,
    counts: Vec<u64>,
}

impl Traffic {
    /// A count without latencies (rate-limit refusals).
    fn count(requests: u64) -> Traffic {
        Traffic {
            requests,
            ..Traffic::default()
        }
    }

    fn route(route: &RouteStats) -> Traffic {
        Traffic {
            requests: route.requests,
            errors: route.errors,
            per_second: 0.0,
            bounds: route.latency_buckets_ms.clone(),
            counts: route.latency_counts.clone(),
        }
    }

    fn add(&mut self, other: &Traffic) {
        self.requests += other.requests;
        self.errors += other.errors;
        self.per_second += other.per_second;
        if self.counts.is_empty() {
            self.bounds.clone_from(&other.bounds);
            self.counts.clone_from(&other.counts);
        } else if self.bounds == other.bounds {
            for (sum, n) in self.counts.iter_mut().zip(&other.counts) {
                *sum += n;
            }
        }
    }

    /// Share of requests that did not fail; `None` without requests.
    pub fn success_rate(&self) -> Option<f64> {
        (self.requests > 0).then(|| 1.0 - self.errors as f64 / self.requests as f64)
    }

    /// Share of requests that failed; `None` without requests.
    pub fn error_rate(&self) -> Option<f64> {
        (self.requests > 0).then(|| self.errors as f64 / self.requests as f64)
    }

    /// The `q` quantile (0..=1) of the latency in milliseconds, by linear
    /// interpolation within its bucket; `None` without requests.
    pub fn percentile_ms(&self, q: f64) -> Option<f64> {
        let total: u64 = self.counts.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * total as f64;
        let mut below = 0u64;
        for (i, &count) in self.counts.iter().enumerate() {
            if count > 0 && (below + count) as f64 >= rank {
                let lower = if i == 0 { 0.0 } else { self.bounds[i - 1] };
                let Some(&upper) = self.bounds.get(i) else {
                    return Some(lower);
                };
                let within = ((rank - below as f64) / count as f64).clamp(0.0, 1.0);
                return Some(lower + (upper - lower) * within);
            }
            below += count;
        }
        self.bounds.last().copied()
    }
}

/// A key's traffic: the recent part (with the rate) and the whole window.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Window {
    pub recent: Traffic,
    pub total: u64,
    /// The longest time any one instance's recent reports cover (at most
    /// the rate window): what `recent.per_second` is a rate over.
    pub recent_covered_ms: u64,
}

/// One report as kept.
#[derive(Debug)]
pub struct Stored {
    pub at_ms: u64,
    pub report: StatsReport,
    /// Counted against [`MAX_BYTES`].
    pub bytes: usize,
}

/// A breaker of one instance: its latest state and since when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BreakerStatus {
    pub instance: String,
    pub service: ServiceKey,
    pub breaker: BreakerReport,
    pub since_ms: u64,
}

#[derive(Debug)]
struct InstanceStats {
    service: ServiceKey,
    reports: VecDeque<Stored>,
    /// From the latest report, with when each state was first seen.
    breakers: Vec<(BreakerReport, u64)>,
}

impl InstanceStats {
    /// Whether this instance sent requests to `destination` in the kept
    /// window (every sidecar holds a breaker per endpoint of each service
    /// with a breaker policy, called or not).
    fn calls(&self, destination: &str) -> bool {
        self.reports.iter().any(|stored| {
            stored.report.routes.iter().any(|r| {
                r.direction == meshlet_api::mesh::StatsDirection::Outbound
                    && r.destination == destination
                    && r.requests > 0
            })
        })
    }

    fn forget_before(&mut self, oldest_ms: u64) {
        while self.reports.front().is_some_and(|r| r.at_ms < oldest_ms) {
            self.reports.pop_front();
        }
    }
}

#[derive(Debug, Default)]
pub struct StatsStore {
    instances: Mutex<HashMap<String, InstanceStats>>,
}

/// Bytes of every kept report.
fn total_bytes(instances: &HashMap<String, InstanceStats>) -> usize {
    instances
        .values()
        .flat_map(|i| i.reports.iter())
        .map(|r| r.bytes)
        .sum()
}

/// Drops the oldest reports of any instance until `total` fits `max`.
fn evict_to(instances: &mut HashMap<String, InstanceStats>, mut total: usize, max: usize) {
    while total > max {
        let oldest = instances
            .iter()
            .filter_map(|(id, i)| i.reports.front().map(|r| (r.at_ms, id.clone())))
            .min();
        let Some((_, id)) = oldest else {
            return;
        };
        if let Some(report) = instances.get_mut(&id).and_then(|i| i.reports.pop_front()) {
            total = total.saturating_sub(report.bytes);
        }
    }
}

fn validate(report: &StatsReport) -> Result<(), StatsError> {
    for (what, count) in [
        ("routes", report.routes.len()),
        ("breakers", report.breakers.len()),
        ("rateLimited", report.rate_limited.len()),
        ("wouldRefuse", report.would_refuse.len()),
    ] {
        if count > MAX_ENTRIES {
            return Err(StatsError::TooMany { what, count });
        }
    }
    for (index, route) in report.routes.iter().enumerate() {
        let bounds = &route.latency_buckets_ms;
        if route.latency_counts.len() != bounds.len() + 1 {
            return Err(StatsError::LatencyShape {
                index,
                destination: route.destination.clone(),
                counts: route.latency_counts.len(),
                bounds: bounds.len(),
            });
        }
        let ascending = bounds.windows(2).all(|w| w[0] < w[1]);
        if !ascending || bounds.iter().any(|b| !b.is_finite()) {
            return Err(StatsError::LatencyBounds {
                index,
                destination: route.destination.clone(),
            });
        }
    }
    Ok(())
}

impl StatsStore {
    pub fn new() -> StatsStore {
        StatsStore::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, InstanceStats>> {
        self.instances.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps a report of instance `id` of `service`, received at `now_ms`,
    /// counted as `bytes` (see [`report_bytes`]); the store stays within
    /// [`MAX_BYTES`].
    pub fn ingest(
        &self,
        id: &str,
        service: ServiceKey,
        report: StatsReport,
        bytes: usize,
        now_ms: u64,
    ) -> Result<(), StatsError> {
        self.ingest_within(id, service, report, bytes, now_ms, MAX_BYTES)
    }

    fn ingest_within(
        &self,
        id: &str,
        service: ServiceKey,
        report: StatsReport,
        bytes: usize,
        now_ms: u64,
        max_bytes: usize,
    ) -> Result<(), StatsError> {
        validate(&report)?;
        let mut instances = self.lock();
        let instance = instances
            .entry(id.to_owned())
            .or_insert_with(|| InstanceStats {
                service: service.clone(),
                reports: VecDeque::new(),
                breakers: Vec::new(),
            });
        if instance.service != service {
            // The id was registered again for another service.
            instance.service = service;
            instance.reports.clear();
        }
        let breakers = report
            .breakers
            .iter()
            .map(|breaker| {
                let since = instance
                    .breakers
                    .iter()
                    .find(|(old, _)| {
                        (&old.destination, &old.policy, old.address, old.state)
                            == (
                                &breaker.destination,
                                &breaker.policy,
                                breaker.address,
                                breaker.state,
                            )
                    })
                    .map_or(now_ms, |(_, since)| *since);
                (breaker.clone(), since)
            })
            .collect();
        instance.breakers = breakers;
        instance.forget_before(now_ms.saturating_sub(WINDOW_MS));
        if instance.reports.len() >= MAX_REPORTS {
            instance.reports.pop_front();
        }
        instance.reports.push_back(Stored {
            at_ms: now_ms,
            report,
            bytes,
        });
        let total = total_bytes(&instances);
        evict_to(&mut instances, total, max_bytes);
        Ok(())
    }

    /// Forgets every instance for which `registered` is false.
    pub fn retain(&self, registered: impl Fn(&str) -> bool) {
        self.lock().retain(|id, _| registered(id));
    }

    /// Instances with stats.
    pub fn instances(&self) -> usize {
        self.lock().len()
    }

    /// The traffic of the window summed by key. `entries` lists what one
    /// report of an instance of `service` counts, by key.
    pub fn traffic<K: Ord + Clone>(
        &self,
        now_ms: u64,
        entries: impl Fn(&ServiceKey, &StatsReport) -> Vec<(K, Traffic)>,
    ) -> BTreeMap<K, Window> {
        self.traffic_over(now_ms, RATE_WINDOW_MS, entries)
    }

    /// [`StatsStore::traffic`] with rates over the last `rate_window_ms`
    /// (at most [`WINDOW_MS`]) instead of [`RATE_WINDOW_MS`].
    pub fn traffic_over<K: Ord + Clone>(
        &self,
        now_ms: u64,
        rate_window_ms: u64,
        entries: impl Fn(&ServiceKey, &StatsReport) -> Vec<(K, Traffic)>,
    ) -> BTreeMap<K, Window> {
        let rate_window_ms = rate_window_ms.clamp(1, WINDOW_MS);
        let oldest = now_ms.saturating_sub(WINDOW_MS);
        let recent_from = now_ms.saturating_sub(rate_window_ms);
        let mut merged: BTreeMap<K, Window> = BTreeMap::new();
        for instance in self.lock().values() {
            let mut own: BTreeMap<K, Window> = BTreeMap::new();
            let mut covered_ms = 0u64;
            for stored in instance.reports.iter().filter(|r| r.at_ms >= oldest) {
                let recent = stored.at_ms > recent_from;
                if recent {
                    covered_ms += stored.report.interval_ms;
                }
                for (key, traffic) in entries(&instance.service, &stored.report) {
                    let window = own.entry(key).or_default();
                    window.total += traffic.requests;
                    if recent {
                        window.recent.add(&traffic);
                    }
                }
            }
            let covered_ms = covered_ms.clamp(1, rate_window_ms);
            let seconds = covered_ms as f64 / 1000.0;
            for (key, mut window) in own {
                window.recent.per_second = window.recent.requests as f64 / seconds;
                let sum = merged.entry(key).or_default();
                sum.total += window.total;
                sum.recent.add(&window.recent);
                sum.recent_covered_ms = sum.recent_covered_ms.max(covered_ms);
            }
        }
        merged
    }

    /// The inbound traffic of `service` in slots of one reporting interval
    /// (the longest interval of its latest reports), oldest first, empty
    /// slots included: `(slot end, traffic with its rate)`.
    pub fn series(&self, service: &ServiceKey, now_ms: u64) -> Vec<(u64, Traffic)> {
        let oldest = now_ms.saturating_sub(WINDOW_MS);
        let instances = self.lock();
        let reports: Vec<&Stored> = instances
            .values()
            .filter(|i| &i.service == service)
            .flat_map(|i| i.reports.iter())
            .filter(|r| r.at_ms >= oldest)
            .collect();
        let width = instances
            .values()
            .filter(|i| &i.service == service)
            .filter_map(|i| i.reports.back())
            .map(|r| r.report.interval_ms)
            .max()
            .unwrap_or(0)
            .max(100);
        let Some(first) = reports.iter().map(|r| r.at_ms / width).min() else {
            return Vec::new();
        };
        let last = now_ms / width;
        let mut slots: Vec<Traffic> = vec![Traffic::default(); (last - first + 1) as usize];
        for stored in reports {
            let slot = &mut slots[(stored.at_ms / width - first) as usize];
            for route in inbound(&stored.report) {
                slot.add(&Traffic::route(route));
            }
        }
        slots
            .into_iter()
            .enumerate()
            .map(|(i, mut traffic)| {
                traffic.per_second = traffic.requests as f64 * 1000.0 / width as f64;
                ((first + i as u64 + 1) * width, traffic)
            })
            .collect()
    }

    /// The breakers of every instance, from its latest report: those not
    /// closed, and closed ones of destinations the instance called in the
    /// window (the others are noise: breakers nobody uses).
    pub fn breakers(&self) -> Vec<BreakerStatus> {
        let mut all: Vec<BreakerStatus> = self
            .lock()
            .iter()
            .flat_map(|(id, instance)| {
                instance
                    .breakers
                    .iter()
                    .filter(|(breaker, _)| {
                        breaker.state != BreakerState::Closed
                            || instance.calls(&breaker.destination)
                    })
                    .map(|(breaker, since_ms)| BreakerStatus {
                        instance: id.clone(),
                        service: instance.service.clone(),
                        breaker: breaker.clone(),
                        since_ms: *since_ms,
                    })
            })
            .collect();
        all.sort_by(|a, b| {
            (
                &a.service,
                &a.instance,
                &a.breaker.destination,
                a.breaker.address,
            )
                .cmp(&(
                    &b.service,
                    &b.instance,
                    &b.breaker.destination,
                    b.breaker.address,
                ))
        });
        all
    }
}

/// One instance's kept stats as another replica reads them
/// (`GET /api/v1/peer/stats`, see `peers`): what [`StatsStore::merged`]
/// takes back.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InstanceDump {
    pub id: String,
    pub service: ServiceKey,
    /// `(received at, report, counted bytes)`, oldest first.
    pub reports: Vec<(u64, StatsReport, usize)>,
    /// The latest breaker states with since when each was seen.
    pub breakers: Vec<(BreakerReport, u64)>,
}

impl StatsStore {
    /// Every instance's kept reports (the mesh-wide dashboard's part from
    /// this replica).
    pub fn dump(&self) -> Vec<InstanceDump> {
        self.lock()
            .iter()
            .map(|(id, i)| InstanceDump {
                id: id.clone(),
                service: i.service.clone(),
                reports: i
                    .reports
                    .iter()
                    .map(|r| (r.at_ms, r.report.clone(), r.bytes))
                    .collect(),
                breakers: i.breakers.clone(),
            })
            .collect()
    }

    /// A store holding every part (this replica's and its peers' dumps):
    /// an instance that reported to several replicas (it failed over)
    /// gets all its reports, in time order (each report is a delta, so
    /// none counts twice), and the breakers of its latest report.
    pub fn merged(parts: impl IntoIterator<Item = InstanceDump>) -> StatsStore {
        let mut instances: HashMap<String, (InstanceStats, u64)> = HashMap::new();
        for part in parts {
            let latest = part.reports.last().map_or(0, |r| r.0);
            let entry = instances.entry(part.id).or_insert_with(|| {
                (
                    InstanceStats {
                        service: part.service.clone(),
                        reports: VecDeque::new(),
                        breakers: Vec::new(),
                    },
                    0,
                )
            });
            if latest >= entry.1 {
                entry.0.breakers = part.breakers;
                entry.0.service = part.service;
                entry.1 = latest;
            }
            entry.0.reports.extend(
                part.reports
                    .into_iter()
                    .map(|(at_ms, report, bytes)| Stored {
                        at_ms,
                        report,
                        bytes,
                    }),
            );
        }
        let instances = instances
            .into_iter()
            .map(|(id, (mut stats, _))| {
                let mut reports: Vec<Stored> = stats.reports.drain(..).collect();
                reports.sort_by_key(|r| r.at_ms);
                let skip = reports.len().saturating_sub(MAX_REPORTS);
                stats.reports = reports.into_iter().skip(skip).collect();
                (id, stats)
            })
            .collect();
        StatsStore {
            instances: Mutex::new(instances),
        }
    }
}

/// The inbound routes of a report (what the reporting service served).
pub fn inbound(report: &StatsReport) -> impl Iterator<Item = &RouteStats> {
    report
        .routes
        .iter()
        .filter(|r| r.direction == meshlet_api::mesh::StatsDirection::Inbound)
}

/// Entries of [`StatsStore::traffic`]: inbound requests by the service
/// that served them.
pub fn by_service(service: &ServiceKey, report: &StatsReport) -> Vec<(ServiceKey, Traffic)> {
    inbound(report)
        .map(|route| (service.clone(), Traffic::route(route)))
        .collect()
}

/// Entries of [`StatsStore::traffic`]: refusals by `(service, policy)`.
pub fn by_rate_limit(
    service: &ServiceKey,
    report: &StatsReport,
) -> Vec<((ServiceKey, String), Traffic)> {
    report
        .rate_limited
        .iter()
        .map(|r| {
            (
                (service.clone(), r.policy.clone()),
                Traffic::count(r.refused),
            )
        })
        .collect()
}

/// The key of a dry-run policy's would-refuse counts: `(kind, namespace,
/// name)`.
pub type PolicyKey = (String, String, String);

/// Entries of [`StatsStore::traffic`]: requests dry-run policies would
/// have refused, by policy (every reason together).
pub fn by_would_refuse(_service: &ServiceKey, report: &StatsReport) -> Vec<(PolicyKey, Traffic)> {
    report
        .would_refuse
        .iter()
        .map(|w| {
            (
                (w.kind.clone(), w.namespace.clone(), w.policy.clone()),
                Traffic::count(w.count),
            )
        })
        .collect()
}

/// Entries of [`StatsStore::traffic`]: outbound requests by `(caller,
/// destination)`, for destinations `resolve` knows as mesh services.
pub fn by_edge(
    resolve: impl Fn(&str) -> Option<ServiceKey>,
) -> impl Fn(&ServiceKey, &StatsReport) -> Vec<((ServiceKey, ServiceKey), Traffic)> {
    move |caller, report| {
        report
            .routes
            .iter()
            .filter(|r| r.direction == meshlet_api::mesh::StatsDirection::Outbound)
            .filter_map(|route| {
                let to = resolve(&route.destination)?;
                Some(((caller.clone(), to), Traffic::route(route)))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use meshlet_api::mesh::{BreakerState, RateLimitReport, StatsDirection};

    use super::*;

    const BOUNDS: [f64; 3] = [1.0, 10.0, 100.0];

    fn key(name: &str) -> ServiceKey {
        ServiceKey {
            namespace: "default".into(),
            name: name.into(),
        }
    }

    fn route(
        direction: StatsDirection,
        destination: &str,
        counts: [u64; 4],
        errors: u64,
    ) -> RouteStats {
        RouteStats {
            direction,
            destination: destination.into(),
            endpoint: "/".into(),
            requests: counts.iter().sum(),
            errors,
            latency_buckets_ms: BOUNDS.to_vec(),
            latency_counts: counts.to_vec(),
        }
    }

    fn report(interval_ms: u64, routes: Vec<RouteStats>) -> StatsReport {
        StatsReport {
            interval_ms,
            routes,
            ..StatsReport::default()
        }
    }

    fn inbound_orders(counts: [u64; 4], errors: u64) -> StatsReport {
        report(
            5000,
            vec![route(StatsDirection::Inbound, "orders", counts, errors)],
        )
    }

    const T0: u64 = 1_000_000_000;

    #[test]
    fn stores_of_several_replicas_merge_as_if_one_had_every_report() {
        // orders-1 reported to replica A, failed over, then to replica B;
        // orders-2 only to B. One store that received everything is the
        // reference.
        let (a, b, all) = (StatsStore::new(), StatsStore::new(), StatsStore::new());
        let sends = [
            (&a, "orders-1", [10, 0, 0, 0], T0 - 10_000),
            (&b, "orders-1", [0, 5, 0, 0], T0 - 5_000),
            (&b, "orders-2", [0, 0, 7, 0], T0),
        ];
        for (store, id, counts, at) in sends {
            for target in [store, &all] {
                target
                    .ingest(id, key("orders"), inbound_orders(counts, 1), 100, at)
                    .unwrap();
            }
        }
        let merged = StatsStore::merged(a.dump().into_iter().chain(b.dump()));
        assert_eq!(merged.instances(), 2);
        assert_eq!(
            merged.traffic(T0, by_service),
            all.traffic(T0, by_service),
            "rates, totals and percentiles as from one store"
        );
        assert_eq!(
            merged.series(&key("orders"), T0),
            all.series(&key("orders"), T0)
        );
        let window = &merged.traffic(T0, by_service)[&key("orders")];
        assert_eq!(window.total, 22);
        // A dump survives JSON (what a peer sends).
        let json = serde_json::to_vec(&b.dump()).unwrap();
        let back: Vec<InstanceDump> = serde_json::from_slice(&json).unwrap();
        let mut expected = b.dump();
        let mut back = back;
        expected.sort_by(|x, y| x.id.cmp(&y.id));
        back.sort_by(|x, y| x.id.cmp(&y.id));
        assert_eq!(back, expected);
    }

    #[test]
    fn services_sum_their_instances_inbound_requests_and_rates() {
        let store = StatsStore::new();
        // Two instances, 5 s reports: 10 and 20 requests in the last 30 s.
        store
            .ingest(
                "orders-1",
                key("orders"),
                inbound_orders([10, 0, 0, 0], 1),
                100,
                T0,
            )
            .unwrap();
        store
            .ingest(
                "orders-2",
                key("orders"),
                inbound_orders([0, 20, 0, 0], 0),
                100,
                T0,
            )
            .unwrap();
        let outbound = report(
            5000,
            vec![route(StatsDirection::Outbound, "orders", [5, 0, 0, 0], 0)],
        );
        store
            .ingest("frontend-1", key("frontend"), outbound, 100, T0)
            .unwrap();
        let services = store.traffic(T0 + 1, by_service);
        let orders = &services[&key("orders")];
        assert_eq!(orders.total, 30);
        assert_eq!(orders.recent.requests, 30);
        assert!((orders.recent.per_second - 6.0).abs() < 1e-9, "{orders:?}");
        assert_eq!(orders.recent.success_rate(), Some(1.0 - 1.0 / 30.0));
        assert!(
            !services.contains_key(&key("frontend")),
            "it served nothing"
        );
    }

    #[test]
    fn percentiles_interpolate_within_the_merged_buckets() {
        let store = StatsStore::new();
        store
            .ingest(
                "a",
                key("orders"),
                inbound_orders([50, 0, 0, 0], 0),
                100,
                T0,
            )
            .unwrap();
        store
            .ingest(
                "b",
                key("orders"),
                inbound_orders([0, 40, 8, 2], 0),
                100,
                T0,
            )
            .unwrap();
        let recent = &store.traffic(T0, by_service)[&key("orders")].recent;
        // Rank 50 of 100 is the last of the first bucket: its upper bound.
        assert_eq!(recent.percentile_ms(0.5), Some(1.0));
        // Rank 95: 5 of the 8 in (10, 100].
        let p95 = recent.percentile_ms(0.95).unwrap();
        assert!((p95 - (10.0 + 90.0 * 5.0 / 8.0)).abs() < 1e-9, "{p95}");
        // Rank 99 falls in the overflow bucket: the last bound.
        assert_eq!(recent.percentile_ms(0.99), Some(100.0));
        assert_eq!(Traffic::default().percentile_ms(0.5), None);
    }

    #[test]
    fn rates_cover_the_last_30_seconds_and_totals_the_window() {
        let store = StatsStore::new();
        // A report every 5 s for 100 s, 5 requests each.
        for i in 0..20 {
            store
                .ingest(
                    "a",
                    key("orders"),
                    inbound_orders([5, 0, 0, 0], 0),
                    100,
                    T0 + i * 5000,
                )
                .unwrap();
        }
        let now = T0 + 19 * 5000;
        let window = &store.traffic(now, by_service)[&key("orders")];
        assert_eq!(window.total, 100);
        // The 6 reports after now-30s: 30 requests over 30 s.
        assert_eq!(window.recent.requests, 30);
        assert!((window.recent.per_second - 1.0).abs() < 1e-9);
        // Five minutes later everything is out of the window.
        let later = store.traffic(now + WINDOW_MS + 1, by_service);
        assert!(later.is_empty(), "{later:?}");
    }

    #[test]
    fn reports_are_bounded_and_departed_instances_forgotten() {
        let store = StatsStore::new();
        for i in 0..(MAX_REPORTS as u64 + 10) {
            store
                .ingest(
                    "a",
                    key("orders"),
                    inbound_orders([1, 0, 0, 0], 0),
                    100,
                    T0 + i,
                )
                .unwrap();
        }
        let now = T0 + MAX_REPORTS as u64 + 10;
        assert_eq!(
            store.traffic(now, by_service)[&key("orders")].total,
            MAX_REPORTS as u64
        );
        // Old reports leave on the next ingest once past the window.
        store
            .ingest(
                "a",
                key("orders"),
                inbound_orders([1, 0, 0, 0], 0),
                100,
                now + WINDOW_MS,
            )
            .unwrap();
        assert_eq!(store.lock()["a"].reports.len(), 1);
        store
            .ingest(
                "b",
                key("orders"),
                inbound_orders([1, 0, 0, 0], 0),
                100,
                now,
            )
            .unwrap();
        store.retain(|id| id == "b");
        assert_eq!(store.instances(), 1);
    }

    #[test]
    fn edges_resolve_mesh_destinations_and_leave_out_others() {
        let store = StatsStore::new();
        let outbound = report(
            5000,
            vec![
                route(StatsDirection::Outbound, "orders", [3, 0, 0, 0], 1),
                route(StatsDirection::Outbound, "passthrough", [9, 0, 0, 0], 0),
            ],
        );
        store
            .ingest("f", key("frontend"), outbound, 100, T0)
            .unwrap();
        let edges = store.traffic(
            T0,
            by_edge(|label| (label == "orders").then(|| key("orders"))),
        );
        assert_eq!(edges.len(), 1);
        let edge = &edges[&(key("frontend"), key("orders"))];
        assert_eq!((edge.total, edge.recent.errors), (3, 1));
        assert_eq!(edge.recent.error_rate(), Some(1.0 / 3.0));
    }

    #[test]
    fn closed_breakers_of_destinations_never_called_are_left_out() {
        let store = StatsStore::new();
        let breaker = |destination: &str| BreakerReport {
            destination: destination.into(),
            policy: "p".into(),
            address: "127.0.0.1:9000".parse().unwrap(),
            state: BreakerState::Closed,
        };
        let mut calls_orders = report(
            5000,
            vec![route(StatsDirection::Outbound, "orders", [1, 0, 0, 0], 0)],
        );
        calls_orders.breakers = vec![breaker("orders"), breaker("payments")];
        store
            .ingest("f", key("frontend"), calls_orders, 100, T0)
            .unwrap();
        let shown: Vec<String> = store
            .breakers()
            .into_iter()
            .map(|b| b.breaker.destination)
            .collect();
        assert_eq!(shown, ["orders"]);
    }

    #[test]
    fn breakers_keep_the_time_their_state_was_first_seen() {
        let store = StatsStore::new();
        let with_breaker = |state| StatsReport {
            interval_ms: 5000,
            breakers: vec![BreakerReport {
                destination: "orders".into(),
                policy: "orders-breaker".into(),
                address: "127.0.0.1:9000".parse().unwrap(),
                state,
            }],
            rate_limited: vec![RateLimitReport {
                policy: "limit".into(),
                refused: 6,
            }],
            ..StatsReport::default()
        };
        store
            .ingest(
                "f",
                key("frontend"),
                with_breaker(BreakerState::Closed),
                100,
                T0,
            )
            .unwrap();
        store
            .ingest(
                "f",
                key("frontend"),
                with_breaker(BreakerState::Open),
                100,
                T0 + 5000,
            )
            .unwrap();
        store
            .ingest(
                "f",
                key("frontend"),
                with_breaker(BreakerState::Open),
                100,
                T0 + 10_000,
            )
            .unwrap();
        let breakers = store.breakers();
        assert_eq!(breakers.len(), 1);
        assert_eq!(breakers[0].breaker.state, BreakerState::Open);
        assert_eq!(breakers[0].since_ms, T0 + 5000);
        let limits = store.traffic(T0 + 10_000, by_rate_limit);
        let limit = &limits[&(key("frontend"), "limit".to_owned())];
        assert_eq!(limit.total, 18);
        assert!((limit.recent.per_second - 18.0 / 15.0).abs() < 1e-9);
    }

    #[test]
    fn malformed_reports_are_refused_with_the_route() {
        let store = StatsStore::new();
        let mut bad = route(StatsDirection::Inbound, "orders", [1, 0, 0, 0], 0);
        bad.latency_counts.pop();
        let err = store
            .ingest("a", key("orders"), report(5000, vec![bad]), 100, T0)
            .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("route 0 (orders): 3 latency counts"),
            "{err}"
        );
        let mut unordered = route(StatsDirection::Inbound, "orders", [1, 0, 0, 0], 0);
        unordered.latency_buckets_ms = vec![5.0, 1.0, 10.0];
        assert!(matches!(
            store.ingest("a", key("orders"), report(5000, vec![unordered]), 100, T0),
            Err(StatsError::LatencyBounds { .. })
        ));
    }

    #[test]
    fn series_has_one_point_per_interval_with_empty_ones() {
        let store = StatsStore::new();
        store
            .ingest(
                "a",
                key("orders"),
                inbound_orders([10, 0, 0, 0], 0),
                100,
                T0,
            )
            .unwrap();
        store
            .ingest(
                "a",
                key("orders"),
                inbound_orders([0, 0, 5, 0], 5),
                100,
                T0 + 10_000,
            )
            .unwrap();
        let points = store.series(&key("orders"), T0 + 10_000);
        assert_eq!(points.len(), 3, "{points:?}");
        assert_eq!(points[0].1.per_second, 2.0);
        assert_eq!(points[1].1.requests, 0);
        assert_eq!(points[2].1.success_rate(), Some(0.0));
        assert_eq!(points[2].0, T0 + 15_000);
    }

    #[test]
    fn the_store_is_bounded_in_bytes_oldest_report_first() {
        let store = StatsStore::new();
        for (n, id) in ["a", "b", "a", "b", "a"].into_iter().enumerate() {
            let report = inbound_orders([1, 0, 0, 0], 0);
            store
                .ingest_within(id, key("orders"), report, 1000, T0 + n as u64, 3000)
                .unwrap();
        }
        let instances = store.lock();
        assert_eq!(total_bytes(&instances), 3000);
        let kept: Vec<u64> = {
            let mut at: Vec<u64> = instances
                .values()
                .flat_map(|i| i.reports.iter().map(|r| r.at_ms - T0))
                .collect();
            at.sort();
            at
        };
        assert_eq!(kept, [2, 3, 4]);
    }

    #[test]
    fn would_refuse_counts_sum_over_instances_with_a_rate_over_the_chosen_window() {
        use meshlet_api::mesh::WouldRefuseReport;
        let store = StatsStore::new();
        let would = |policy: &str, count| StatsReport {
            interval_ms: 10_000,
            would_refuse: vec![WouldRefuseReport {
                kind: "RateLimitPolicy".into(),
                namespace: "default".into(),
                policy: policy.into(),
                reason: "rate_limited".into(),
                count,
            }],
            ..StatsReport::default()
        };
        let orders = ServiceKey {
            namespace: "default".into(),
            name: "orders".into(),
        };
        // Two instances, six reports each over a minute, and an older one.
        store
            .ingest("o-1", orders.clone(), would("limit", 1000), 100, T0)
            .unwrap();
        for i in 1..=6 {
            for id in ["o-1", "o-2"] {
                store
                    .ingest(
                        id,
                        orders.clone(),
                        would("limit", 30),
                        100,
                        T0 + 60_000 + i * 10_000,
                    )
                    .unwrap();
            }
        }
        let now = T0 + 120_000;
        let traffic = store.traffic_over(now, 60_000, by_would_refuse);
        let key = (
            "RateLimitPolicy".to_owned(),
            "default".to_owned(),
            "limit".to_owned(),
        );
        let window = &traffic[&key];
        assert_eq!(window.total, 1000 + 12 * 30);
        // 180 per instance over 60 s: 3/s each.
        assert!((window.recent.per_second - 6.0).abs() < 1e-9, "{window:?}");
        assert_eq!(window.recent_covered_ms, 60_000, "the rate's window");
        // Right after a start, the rate is over what the reports cover:
        // 20 refusals in one 10 s report are 2/s over 10 s, not 20/60 s.
        let fresh = StatsStore::new();
        fresh
            .ingest("fresh", orders.clone(), would("limit", 20), 100, now)
            .unwrap();
        let window = &fresh.traffic_over(now, 60_000, by_would_refuse)[&key];
        assert_eq!(window.recent_covered_ms, 10_000);
        assert!((window.recent.per_second - 2.0).abs() < 1e-9, "{window:?}");
        let too_many = StatsReport {
            would_refuse: (0..=MAX_ENTRIES)
                .map(|_| would("x", 1).would_refuse[0].clone())
                .collect(),
            ..StatsReport::default()
        };
        assert!(store.ingest("o-1", orders, too_many, 100, now).is_err());
    }
}
