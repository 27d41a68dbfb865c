//! The policy index: which policies apply to a request, found with a cheap
//! lookup by method and path.
//!
//! Data flow: `Snapshot::build` calls [`OutboundPolicies::build`] for each
//! service (breakers, retries, timeouts, traffic split: enforced by
//! callers) and [`InboundPolicies::build`] for the sidecar's own service
//! (rate limits: enforced by the target). Each kind's list is sorted from
//! most to least specific (`RouteMatch::specificity`), so a lookup returns
//! the first match. Stateful parts (limiters, breakers, budgets) come from
//! a [`PolicyState`] of the previous snapshot when the policy's identity
//! (kind/namespace/name) and spec are unchanged, so swapping snapshots
//! keeps token buckets, breaker states and budgets; a changed spec starts
//! fresh.
//!
//! Per-policy metric handles (`retries_total` on each [`RetryPolicy`],
//! `rate_limited_total` on each [`RateLimiter`],
//! `meshlet_faults_injected_total` on each [`FaultPolicy`], and for
//! dry-run policies `meshlet_policy_would_refuse_total`) are resolved
//! here, once per policy and build, never per request.
//!

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::Method;
use meshlet_api::policy::{RouteMatch, TimeoutSpec};
use meshlet_api::{Resource, ResourceKey};
use serde_json::json;

use crate::policy::breaker::{BreakerDryRun, BreakerSet};
use crate::policy::dry_run::WouldRefuse;
use crate::policy::fault::FaultPolicy;
use crate::policy::ratelimit::RateLimiter;
use crate::policy::retry::RetryPolicy;
use crate::telemetry::metrics::{destination_label, Metrics};
use crate::telemetry::route_metrics::ALL_PATHS;

/// Something with a route match, kept in specificity order.
pub trait Routed {
    fn route(&self) -> &RouteMatch;
}

/// The most specific entry of `list` that matches.
pub fn lookup<'a, T: Routed>(list: &'a [Arc<T>], method: &Method, path: &str) -> Option<&'a T> {
    list.iter()
        .map(|entry| &**entry)
        .find(|entry| entry.route().matches(method.as_str(), path))
}

fn sort_by_specificity<T: Routed>(list: &mut [Arc<T>]) {
    list.sort_by_key(|entry| std::cmp::Reverse(entry.route().specificity()));
}

impl Routed for RateLimiter {
    fn route(&self) -> &RouteMatch {
        &self.route
    }
}

impl Routed for BreakerSet {
    fn route(&self) -> &RouteMatch {
        &self.route
    }
}

impl Routed for FaultPolicy {
    fn route(&self) -> &RouteMatch {
        &self.route
    }
}

impl Routed for RetryPolicy {
    fn route(&self) -> &RouteMatch {
        &self.route
    }
}

/// A `TimeoutPolicy`, resolved.
#[derive(Debug)]
pub struct Timeouts {
    pub name: String,
    pub route: RouteMatch,
    pub request: Option<Duration>,
    pub idle: Option<Duration>,
}

impl Timeouts {
    fn new(name: String, spec: &TimeoutSpec) -> Self {
        Timeouts {
            name,
            route: spec.route.clone().unwrap_or_default(),
            request: spec.request.map(|d| d.get()),
            idle: spec.idle.map(|d| d.get()),
        }
    }
}

impl Routed for Timeouts {
    fn route(&self) -> &RouteMatch {
        &self.route
    }
}

/// A `TrafficSplit` resolved against the balancer's endpoints: subsets
/// with at least one healthy endpoint, as sorted endpoint indices.
#[derive(Debug)]
pub struct SplitPlan {
    pub name: String,
    subsets: Vec<Subset>,
    total_weight: u64,
    /// routes: a `Route` backend's label subset ([`SplitPlan::only`]):
    /// its one subset takes every request, usable or not.
    strict: bool,
}

#[derive(Debug)]
struct Subset {
    labels: BTreeMap<String, String>,
    weight: u64,
    endpoints: Vec<usize>,
}

impl SplitPlan {
    fn new(
        name: String,
        splits: &[meshlet_api::policy::Split],
        endpoints: &[&BTreeMap<String, String>],
    ) -> Self {
        let subsets: Vec<Subset> = splits
            .iter()
            .map(|split| Subset {
                labels: split.labels.clone(),
                weight: u64::from(split.weight),
                endpoints: endpoints
                    .iter()
                    .enumerate()
                    .filter(|(_, labels)| {
                        split.labels.iter().all(|(k, v)| labels.get(k) == Some(v))
                    })
                    .map(|(i, _)| i)
                    .collect(),
            })
            .collect();
        // Subsets without a healthy endpoint get nothing; the others share
        // the traffic in proportion to their weights.
        let total_weight = subsets
            .iter()
            .filter(|s| !s.endpoints.is_empty())
            .map(|s| s.weight)
            .sum();
        SplitPlan {
            name,
            subsets,
            total_weight,
            strict: false,
        }
    }

    /// routes: the endpoints (balancer order) carrying `labels`, as the one
    /// subset of a plan that never falls back to the whole service: a
    /// request for a `Route` backend's subset whose endpoints are all down
    /// or open fails (`no_healthy_endpoint`, `circuit_open`) rather than
    /// reach endpoints the route did not choose.
    pub fn only(
        name: String,
        labels: &BTreeMap<String, String>,
        endpoints: &[&BTreeMap<String, String>],
    ) -> Self {
        let split = meshlet_api::policy::Split {
            labels: labels.clone(),
            weight: 1,
        };
        SplitPlan {
            strict: true,
            ..SplitPlan::new(name, std::slice::from_ref(&split), endpoints)
        }
    }

    /// Chooses a subset by weight among those that have an endpoint and
    /// that `usable` accepts (e.g. not every endpoint's breaker is open),
    /// renormalizing the weights; `None` when there is none (then the
    /// whole service is used).
    pub fn choose(&self, usable: impl Fn(&[usize]) -> bool) -> Option<&[usize]> {
        if self.strict {
            return self.subsets.first().map(|s| s.endpoints.as_slice());
        }
        let candidates = || {
            self.subsets
                .iter()
                .filter(|s| !s.endpoints.is_empty() && s.weight > 0 && usable(&s.endpoints))
        };
        let total: u64 = candidates().map(|s| s.weight).sum();
        if total == 0 {
            return None;
        }
        let mut ticket = fastrand::u64(..total);
        for subset in candidates() {
            if ticket < subset.weight {
                return Some(&subset.endpoints);
            }
            ticket -= subset.weight;
        }
        None
    }

    fn to_json(&self) -> serde_json::Value {
        json!({
            "name": self.name,
            "subsets": self.subsets.iter().map(|s| json!({
                "labels": s.labels,
                "weight": s.weight,
                "healthyEndpoints": s.endpoints.len(),
                "share": if s.endpoints.is_empty() || self.total_weight == 0 { 0.0 } else { s.weight as f64 / self.total_weight as f64 },
            })).collect::<Vec<_>>(),
        })
    }
}

/// The policies callers enforce for one target service.
#[derive(Debug, Default)]
pub struct OutboundPolicies {
    pub breakers: Vec<Arc<BreakerSet>>,
    pub retries: Vec<Arc<RetryPolicy>>,
    pub timeouts: Vec<Arc<Timeouts>>,
    pub split: Option<SplitPlan>,
    pub faults: Vec<Arc<FaultPolicy>>,
}

/// The policies that apply to one request (borrowed from its target).
#[derive(Debug, Clone, Copy, Default)]
pub struct RoutePolicies<'a> {
    pub fault: Option<&'a FaultPolicy>,
    pub breaker: Option<&'a BreakerSet>,
    pub retry: Option<&'a RetryPolicy>,
    pub timeouts: Option<&'a Timeouts>,
    pub split: Option<&'a SplitPlan>,
}

impl OutboundPolicies {
    /// Policies targeting `(namespace, service)` among `resources`, for the
    /// endpoints `endpoints` (balancer order).
    pub fn build(
        resources: &[Resource],
        namespace: &str,
        service: &str,
        endpoints: &[(SocketAddr, &BTreeMap<String, String>)],
        previous: &PolicyState,
        state: &mut PolicyState,
        metrics: &Metrics,
    ) -> Self {
        let destination = destination_label(namespace, service);
        let mut policies = OutboundPolicies::default();
        let addrs: Vec<SocketAddr> = endpoints.iter().map(|(a, _)| *a).collect();
        for resource in resources
            .iter()
            .filter(|r| r.target() == Some((namespace, service)))
        {
            let key = resource.key();
            let name = resource.metadata().name.clone();
            match resource {
                Resource::CircuitBreakerPolicy(doc) => {
                    let dry_run = doc.spec.mode.is_dry_run().then(|| {
                        let namespace = &resource.metadata().namespace;
                        let would = |reason| {
                            WouldRefuse::new(
                                metrics,
                                "CircuitBreakerPolicy",
                                namespace,
                                &name,
                                reason,
                            )
                        };
                        BreakerDryRun {
                            circuit_open: would("circuit_open"),
                            overflow: would("overflow"),
                        }
                    });
                    let set = Arc::new(
                        BreakerSet::new(
                            name,
                            doc.spec.clone(),
                            &addrs,
                            previous.breakers.get(&key).map(|b| &**b),
                        )
                        .with_dry_run(dry_run),
                    );
                    state.breakers.insert(key, Arc::clone(&set));
                    policies.breakers.push(set);
                }
                Resource::RetryPolicy(doc) => {
                    let retry = match previous.retries.get(&key) {
                        Some(old) if old.spec == doc.spec => Arc::clone(old),
                        _ => {
                            let retries = metrics.retries(&destination, &name);
                            Arc::new(RetryPolicy::new(name, doc.spec.clone(), retries))
                        }
                    };
                    state.retries.insert(key, Arc::clone(&retry));
                    policies.retries.push(retry);
                }
                Resource::FaultInjectionPolicy(doc) => {
                    let delayed = metrics.fault_injected(&destination, &name, "delay");
                    let aborted = metrics.fault_injected(&destination, &name, "abort");
                    policies.faults.push(Arc::new(FaultPolicy::new(
                        name,
                        doc.spec.clone(),
                        delayed,
                        aborted,
                    )));
                }
                Resource::TimeoutPolicy(doc) => {
                    policies
                        .timeouts
                        .push(Arc::new(Timeouts::new(name, &doc.spec)));
                }
                Resource::TrafficSplit(doc) => {
                    // One split per service; with several, the first by key.
                    let labels: Vec<_> = endpoints.iter().map(|(_, l)| *l).collect();
                    if policies.split.as_ref().is_none_or(|s| name < s.name) {
                        policies.split = Some(SplitPlan::new(name, &doc.spec.splits, &labels));
                    }
                }
                _ => {}
            }
        }
        sort_by_specificity(&mut policies.breakers);
        sort_by_specificity(&mut policies.retries);
        sort_by_specificity(&mut policies.timeouts);
        sort_by_specificity(&mut policies.faults);
        policies
    }

    pub fn is_empty(&self) -> bool {
        self.breakers.is_empty()
            && self.retries.is_empty()
            && self.timeouts.is_empty()
            && self.split.is_none()
            && self.faults.is_empty()
    }

    /// The policies for one request.
    pub fn for_request(&self, method: &Method, path: &str) -> RoutePolicies<'_> {
        if self.is_empty() {
            return RoutePolicies::default();
        }
        RoutePolicies {
            fault: lookup(&self.faults, method, path),
            breaker: lookup(&self.breakers, method, path),
            retry: lookup(&self.retries, method, path),
            timeouts: lookup(&self.timeouts, method, path),
            split: self.split.as_ref(),
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        let now = std::time::Instant::now();
        json!({
            "circuitBreakers": self.breakers.iter().map(|b| b.to_json()).collect::<Vec<_>>(),
            "retries": self.retries.iter().map(|r| {
                let (requests, retries) = r.budget.totals(now);
                json!({"name": r.name, "spec": r.spec,
                       "budget": {"windowSeconds": crate::policy::retry::BUDGET_WINDOW.as_secs(),
                                  "requests": requests, "retries": retries}})
            }).collect::<Vec<_>>(),
            "timeouts": self.timeouts.iter().map(|t| json!({
                "name": t.name, "match": t.route,
                "request": t.request.map(|d| humantime::format_duration(d).to_string()),
                "idle": t.idle.map(|d| humantime::format_duration(d).to_string()),
            })).collect::<Vec<_>>(),
            "trafficSplit": self.split.as_ref().map(SplitPlan::to_json),
            "faults": self.faults.iter().map(|f| json!({"name": f.name, "spec": f.spec})).collect::<Vec<_>>(),
        })
    }
}

/// The rate limits this sidecar enforces for its own service.
#[derive(Debug, Default)]
pub struct InboundPolicies {
    pub rate_limits: Vec<Arc<RateLimiter>>,
}

impl InboundPolicies {
    /// Rate limits targeting the own service `(namespace, service)`, with
    /// `healthy_instances` sharing a global limit.
    pub fn build(
        resources: &[Resource],
        namespace: &str,
        service: &str,
        healthy_instances: usize,
        previous: &PolicyState,
        state: &mut PolicyState,
        metrics: &Metrics,
    ) -> Self {
        let mut rate_limits = Vec::new();
        for resource in resources
            .iter()
            .filter(|r| r.target() == Some((namespace, service)))
        {
            if let Resource::RateLimitPolicy(doc) = resource {
                let key = resource.key();
                let limiter = match previous.limiters.get(&key) {
                    Some(old) if old.spec == doc.spec => {
                        old.set_instances(healthy_instances);
                        Arc::clone(old)
                    }
                    _ => {
                        let name = &resource.metadata().name;
                        let endpoint = doc
                            .spec
                            .route
                            .as_ref()
                            .and_then(|r| r.path_prefix.as_deref());
                        let dry_run = doc.spec.mode.is_dry_run().then(|| {
                            let namespace = &resource.metadata().namespace;
                            WouldRefuse::new(
                                metrics,
                                "RateLimitPolicy",
                                namespace,
                                name,
                                "rate_limited",
                            )
                        });
                        Arc::new(
                            RateLimiter::new(
                                name.clone(),
                                doc.spec.clone(),
                                healthy_instances,
                                metrics.rate_limited(name, endpoint.unwrap_or(ALL_PATHS)),
                            )
                            .with_dry_run(dry_run),
                        )
                    }
                };
                state.limiters.insert(key, Arc::clone(&limiter));
                rate_limits.push(limiter);
            }
        }
        sort_by_specificity(&mut rate_limits);
        InboundPolicies { rate_limits }
    }

    pub fn rate_limit(&self, method: &Method, path: &str) -> Option<&RateLimiter> {
        if self.rate_limits.is_empty() {
            return None;
        }
        lookup(&self.rate_limits, method, path)
    }

    pub fn to_json(&self) -> serde_json::Value {
        json!({"rateLimits": self.rate_limits.iter().map(|l| l.to_json()).collect::<Vec<_>>()})
    }
}

/// Stateful policy objects of one snapshot by policy identity, handed to
/// the next build for reuse.
#[derive(Debug, Default)]
pub struct PolicyState {
    limiters: HashMap<ResourceKey, Arc<RateLimiter>>,
    breakers: HashMap<ResourceKey, Arc<BreakerSet>>,
    retries: HashMap<ResourceKey, Arc<RetryPolicy>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> SplitPlan {
        let subset = |version: &str, weight, endpoints| Subset {
            labels: BTreeMap::from([("version".to_owned(), version.to_owned())]),
            weight,
            endpoints,
        };
        SplitPlan {
            name: "canary".into(),
            subsets: vec![subset("v1", 90, vec![0]), subset("v2", 10, vec![1])],
            total_weight: 100,
            strict: false,
        }
    }

    #[test]
    fn a_subset_that_cannot_take_requests_gives_its_share_to_the_others() {
        let plan = plan();
        let v1: &[usize] = &[0];
        let v2: &[usize] = &[1];
        // v1's breakers are all open: everything goes to v2.
        for _ in 0..200 {
            assert_eq!(plan.choose(|endpoints| endpoints != v1), Some(v2));
        }
        assert_eq!(plan.choose(|_| false), None, "then the whole service");
        let to_v2 = (0..10_000)
            .filter(|_| plan.choose(|_| true) == Some(v2))
            .count();
        assert!((700..1300).contains(&to_v2), "{to_v2} of 10000 to v2");
    }
}
