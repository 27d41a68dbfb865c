//! How meshctl's tables and the dashboard name services and describe
//! resources in one line: `orders.shop`, the service a policy targets,
//! `10/s burst 20 per ...`. Shared so that the CLI and
//! the dashboard never word the same thing two ways.

use std::collections::BTreeMap;

use crate::policy::{PolicyMode, RouteMatch};
use crate::resource::Resource;
use crate::route::RouteSpec;
use crate::zero_trust::AuthorizationSpec;

/// A service as meshctl and the sidecars' `destination` label name it:
/// `name`, or `name.namespace` outside `default`.
pub fn service_display(namespace: &str, name: &str) -> String {
    if namespace == "default" {
        name.to_owned()
    } else {
        format!("{name}.{namespace}")
    }
}

/// The TARGET column: the service a policy targets.
pub fn target(resource: &Resource) -> String {
    match resource.target() {
        Some((ns, name)) => service_display(ns, name),
        None => "-".to_owned(),
    }
}

fn number(n: f64) -> String {
    if n.fract() == 0.0 && n.abs() < 1e15 {
        format!("{}", n as i64)
    } else {
        format!("{n}")
    }
}

fn route(route: Option<&RouteMatch>) -> String {
    let Some(route) = route else {
        return String::new();
    };
    let mut parts = Vec::new();
    if let Some(prefix) = &route.path_prefix {
        parts.push(format!("{prefix}*"));
    }
    if !route.methods.is_empty() {
        parts.push(route.methods.join(","));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!(" [{}]", parts.join(" "))
    }
}

/// One line saying what a resource does: `10/s burst 20`,
/// `90% version=v1, 10% version=v2`, ...
pub fn summary(resource: &Resource) -> String {
    match resource {
        Resource::Service(doc) => format!("{} static endpoints", doc.spec.endpoints.len()),
        Resource::HealthCheckPolicy(doc) => format!(
            "GET {} every {}, timeout {}",
            doc.spec.path, doc.spec.interval, doc.spec.timeout
        ),
        Resource::RateLimitPolicy(doc) => {
            let spec = &doc.spec;
            let limit = match (&spec.token_bucket, &spec.sliding_window) {
                (Some(bucket), _) => format!(
                    "{}/s burst {}",
                    number(bucket.refill_per_second),
                    bucket.capacity
                ),
                (None, Some(window)) => format!("{} per {}", window.requests, window.window),
                (None, None) => "-".to_owned(),
            };
            let key = serde_json::to_value(&spec.key)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default();
            let scope = serde_json::to_value(spec.scope)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default();
            format!(
                "{limit} per {key}, {scope}{}{}",
                route(spec.route.as_ref()),
                dry_run(spec.mode)
            )
        }
        Resource::CircuitBreakerPolicy(doc) => format!(
            "{} failures, open {}, max {} concurrent{}{}",
            doc.spec.consecutive_failures,
            doc.spec.open_duration,
            doc.spec.max_concurrent_requests,
            route(doc.spec.route.as_ref()),
            dry_run(doc.spec.mode)
        ),
        Resource::RetryPolicy(doc) => {
            let per_try = doc
                .spec
                .per_try_timeout
                .map(|d| format!(", {d} per try"))
                .unwrap_or_default();
            format!(
                "{} attempts{per_try}{}",
                doc.spec.attempts,
                route(doc.spec.route.as_ref())
            )
        }
        Resource::TimeoutPolicy(doc) => {
            let mut parts = Vec::new();
            if let Some(d) = doc.spec.request {
                parts.push(format!("request {d}"));
            }
            if let Some(d) = doc.spec.idle {
                parts.push(format!("idle {d}"));
            }
            format!("{}{}", parts.join(", "), route(doc.spec.route.as_ref()))
        }
        Resource::TrafficSplit(doc) => {
            let total: u64 = doc.spec.splits.iter().map(|s| u64::from(s.weight)).sum();
            doc.spec
                .splits
                .iter()
                .map(|s| {
                    let percent = (u64::from(s.weight) * 100 + total / 2)
                        .checked_div(total)
                        .unwrap_or(0);
                    format!("{percent}% {}", labels(&s.labels))
                })
                .collect::<Vec<_>>()
                .join(", ")
        }
        Resource::TracingPolicy(doc) => {
            format!("{}% of new traces", number(doc.spec.sampling_ratio * 100.0))
        }
        Resource::MtlsPolicy(doc) => match doc.spec.target_ref {
            Some(_) => doc.spec.mode.as_str().to_owned(),
            None => format!("{} (mesh-wide default)", doc.spec.mode.as_str()),
        },
        Resource::AuthorizationPolicy(doc) => authorization(&doc.spec),
        Resource::Route(doc) => route_summary(&doc.spec),
        Resource::FaultInjectionPolicy(doc) => {
            let spec = &doc.spec;
            let mut parts = Vec::new();
            if let Some(delay) = &spec.delay {
                parts.push(format!("delay {} for {}", delay.fixed, delay.percent));
            }
            if let Some(abort) = &spec.abort {
                parts.push(format!(
                    "abort {} for {}",
                    abort.status.get(),
                    abort.percent
                ));
            }
            format!("{}{}", parts.join(", "), route(spec.route.as_ref()))
        }
    }
}

/// `, dry run` for a policy in dry-run mode, else nothing.
fn dry_run(mode: PolicyMode) -> &'static str {
    match mode {
        PolicyMode::DryRun => ", dry run",
        PolicyMode::Enforce => "",
    }
}

/// `gateway/edge shop.example.com: 2 rules → orders, frontend`,
/// `service/orders: 1 rule → orders (version=v2), mirror shadow`.
fn route_summary(spec: &RouteSpec) -> String {
    let parents: Vec<String> = spec
        .parent_refs
        .iter()
        .filter_map(|p| p.parent())
        .map(|(kind, name)| format!("{}/{name}", kind.as_str()))
        .collect();
    let hosts = if spec.hostnames.is_empty() {
        String::new()
    } else {
        format!(" {}", spec.hostnames.join(","))
    };
    let rules = match spec.rules.len() {
        1 => "1 rule".to_owned(),
        n => format!("{n} rules"),
    };
    let mut to: Vec<String> = Vec::new();
    let mut push = |item: String| {
        if !to.contains(&item) {
            to.push(item);
        }
    };
    for rule in &spec.rules {
        for backend in &rule.backends {
            if backend.labels.is_empty() {
                push(backend.service.clone());
            } else {
                push(format!("{} ({})", backend.service, labels(&backend.labels)));
            }
        }
        for filter in &rule.filters {
            if let Some(redirect) = &filter.request_redirect {
                push(format!("redirect {}", redirect.status_code));
            }
            if let Some(mirror) = &filter.request_mirror {
                push(format!("mirror {}", mirror.service));
            }
        }
    }
    format!("{}{hosts}: {rules} → {}", parents.join(","), to.join(", "))
}

/// `ALLOW 2 rules (from frontend; to GET /api/*)`, `DENY 1 rule, dry run`.
fn authorization(spec: &AuthorizationSpec) -> String {
    let rules = match spec.rules.len() {
        1 => "1 rule".to_owned(),
        n => format!("{n} rules"),
    };
    let dry_run = dry_run(spec.mode);
    let mut parts = Vec::new();
    if let [rule] = spec.rules.as_slice() {
        let from: Vec<String> = rule
            .from
            .iter()
            .map(|source| {
                if source.unauthenticated {
                    return "unauthenticated".to_owned();
                }
                let mut names = source.services.clone();
                names.extend(source.namespaces.iter().map(|ns| format!("ns {ns}")));
                names.extend(source.identities.iter().cloned());
                names.join(",")
            })
            .collect();
        if !from.is_empty() {
            parts.push(format!("from {}", from.join(" | ")));
        }
        let to: Vec<String> = rule
            .to
            .iter()
            .map(|op| {
                let mut words = Vec::new();
                if !op.methods.is_empty() {
                    words.push(op.methods.join(","));
                }
                if !op.paths.is_empty() {
                    words.push(op.paths.join(","));
                }
                words.join(" ")
            })
            .collect();
        if !to.is_empty() {
            parts.push(format!("to {}", to.join(" | ")));
        }
        if !rule.when.is_empty() {
            let when: Vec<String> = rule.when.iter().map(|c| c.header.clone()).collect();
            parts.push(format!("when {}", when.join(",")));
        }
    }
    let detail = if parts.is_empty() {
        String::new()
    } else {
        format!(" ({})", parts.join("; "))
    };
    format!("{} {rules}{detail}{dry_run}", spec.action.as_str())
}

/// `k=v,k2=v2`, or `<none>`.
pub fn labels(labels: &BTreeMap<String, String>) -> String {
    if labels.is_empty() {
        return "<none>".to_owned();
    }
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}
