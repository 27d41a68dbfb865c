//! The dashboard's JSON API and the sidecars' stats reports (contract:
//! `notes/dashboard-api.md`).
//!
//! ```text
//! sidecar ── POST /api/v1/instances/{id}/stats ─► StatsStore::ingest ─► Activity
//! UI ── GET /api/v1/dashboard/services ─► registry (Published) + inbound traffic
//!    ── GET /api/v1/dashboard/topology ─► services + outbound traffic by edge
//!    ── GET /api/v1/dashboard/policies ─► resources, history (store), breakers, refusals
//!    ── GET /api/v1/dashboard/series   ─► one service's traffic per interval
//!    ── GET /api/v1/dashboard/events   ─► events::stream
//! ```
//!
//! Handlers only join the published registry with the stats store's
//! aggregations ([`crate::stats`]) and shape the answer types of
//! `meshlet_api::dashboard`; they never wait for the controller.
//! [`forget_departed`] drops the stats of instances that left the registry.
//! With replicas (`--store etcd`) the stats are every live replica's
//! (`peers::view::stats`: one request per other replica per read; a
//! replica that does not answer in time is named in `x-meshlet-partial`).
//! Zero trust (issue 14): instances carry their SPIFFE identity, and a
//! topology edge is `mtls` when both its services have registered
//! instances with identities (the UI draws a padlock on it).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use meshlet_api::dashboard::{
    BreakerView, Golden, HistoryEntry, InstanceView, PoliciesView, RateLimitView, ResourceView,
    Series, SeriesPoint, ServiceView, Topology, TopologyEdge, TopologyNode,
};
use meshlet_api::display::{service_display, summary, target};
use meshlet_api::mesh::{InstanceRole, ServiceKey, StatsReport};
use serde::Deserialize;
use tokio::sync::watch;

use crate::clock::now_ms;
use crate::controller::Controller;
use crate::error::ApiFailure;
use crate::extract::{json_body, query};
use crate::push::{stopped, Published};
use crate::state::AppState;
use crate::stats::{by_edge, by_rate_limit, by_service, StatsStore, Traffic};

/// Revisions listed in the policies view.
const HISTORY: usize = 20;

/// `namespace/name`, the id of a service in the dashboard.
fn id(key: &ServiceKey) -> String {
    format!("{}/{}", key.namespace, key.name)
}

fn golden(traffic: &Traffic) -> Golden {
    Golden {
        rps: traffic.per_second,
        success_rate: traffic.success_rate(),
        p50_ms: traffic.percentile_ms(0.50),
        p95_ms: traffic.percentile_ms(0.95),
        p99_ms: traffic.percentile_ms(0.99),
    }
}

/// The registered instances of each service.
fn instances_by_service(
    published: &Published,
    controller: &Controller,
    now: u64,
) -> BTreeMap<ServiceKey, Vec<InstanceView>> {
    let mut out: BTreeMap<ServiceKey, Vec<InstanceView>> = BTreeMap::new();
    for instance in published.instances.values() {
        let reg = &instance.registration;
        let last_heartbeat_ms = controller
            .last_heartbeat_ago(&reg.id)
            .map_or(instance.registered_at_ms, |ago| {
                now.saturating_sub(ago.as_millis() as u64)
            });
        out.entry(ServiceKey {
            namespace: reg.namespace.clone(),
            name: reg.service.clone(),
        })
        .or_default()
        .push(InstanceView {
            id: reg.id.clone(),
            address: reg.address,
            labels: reg.labels.clone(),
            healthy: reg.healthy,
            last_heartbeat_ms,
            identity: crate::registry::identity_uri(
                &published.trust_domain,
                &reg.namespace,
                &reg.service,
            ),
        });
    }
    out
}

/// `POST /api/v1/instances/{id}/stats`.
/// Only the instance's holder (or an admin) may report its stats.
pub async fn ingest(
    State(state): State<AppState>,
    axum::extract::Extension(principal): axum::extract::Extension<crate::auth::Principal>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<StatusCode, ApiFailure> {
    state
        .controller
        .check_instance(&id, &principal, crate::controller::InstanceUse::Stats)?;
    let body = body.map(|b| {
        let len = b.len();
        (b, len)
    });
    let (bytes, len) = match body {
        Ok((b, len)) => (Ok(b), len),
        Err(e) => (Err(e), 0),
    };
    let report: StatsReport = json_body(bytes)?;
    let published = state.controller.published();
    let instance = published.instances.get(&id).ok_or_else(|| {
        ApiFailure::NotFound(format!(
            "instance {id:?} is not registered; register it before reporting stats"
        ))
    })?;
    let service = ServiceKey {
        namespace: instance.registration.namespace.clone(),
        name: instance.registration.service.clone(),
    };
    state
        .stats
        .ingest(
            &id,
            service,
            report,
            crate::stats::report_bytes(len),
            now_ms(),
        )
        .map_err(|e| ApiFailure::BadRequest(format!("invalid stats report: {e}")))?;
    state.activity.notify();
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /api/v1/dashboard/services`.
pub async fn services(State(state): State<AppState>) -> Response {
    let (stats, coverage) = crate::peers::view::stats(&state).await;
    let now = now_ms();
    let published = state.controller.published();
    let mut instances = instances_by_service(&published, &state.controller, now);
    let traffic = stats.traffic(now, by_service);
    let views = published
        .service_keys()
        .into_iter()
        .map(|key| {
            let instances = instances.remove(&key).unwrap_or_default();
            let window = traffic.get(&key).cloned().unwrap_or_default();
            ServiceView {
                healthy: !instances.is_empty() && instances.iter().all(|i| i.healthy),
                namespace: key.namespace,
                name: key.name,
                instances,
                golden: golden(&window.recent),
                requests: window.total,
            }
        })
        .collect::<Vec<ServiceView>>();
    coverage.apply(Json(views).into_response())
}

/// `GET /api/v1/dashboard/topology`.
pub async fn topology(State(state): State<AppState>) -> Response {
    let (stats, coverage) = crate::peers::view::stats(&state).await;
    let now = now_ms();
    let published = state.controller.published();
    let keys = published.service_keys();
    let instances = instances_by_service(&published, &state.controller, now);
    let labels: BTreeMap<String, ServiceKey> = keys
        .iter()
        .map(|key| (service_display(&key.namespace, &key.name), key.clone()))
        .collect();
    let edges = stats.traffic(now, by_edge(|label| labels.get(label).cloned()));
    let gateways: std::collections::BTreeSet<ServiceKey> = published
        .instances
        .values()
        .map(|i| &i.registration)
        .filter(|reg| reg.role == InstanceRole::Gateway)
        .map(|reg| ServiceKey {
            namespace: reg.namespace.clone(),
            name: reg.service.clone(),
        })
        .collect();
    let nodes = keys
        .iter()
        .map(|key| TopologyNode {
            role: if gateways.contains(key) {
                InstanceRole::Gateway
            } else {
                InstanceRole::Sidecar
            },
            id: id(key),
            namespace: key.namespace.clone(),
            name: key.name.clone(),
            healthy: instances
                .get(key)
                .is_some_and(|list| !list.is_empty() && list.iter().all(|i| i.healthy)),
        })
        .collect();
    // An edge is mTLS when both ends have registered instances with
    // identities: their sidecars hold workload certificates and always
    // speak mTLS to each other.
    let identified = |key: &ServiceKey| {
        instances
            .get(key)
            .is_some_and(|list| list.iter().any(|i| i.identity.is_some()))
    };
    let edges = edges
        .into_iter()
        .map(|((from, to), window)| TopologyEdge {
            mtls: identified(&from) && identified(&to),
            from: id(&from),
            to: id(&to),
            rps: window.recent.per_second,
            error_rate: window.recent.error_rate(),
            p99_ms: window.recent.percentile_ms(0.99),
            requests: window.total,
        })
        .collect();
    coverage.apply(Json(Topology { nodes, edges }).into_response())
}

/// `GET /api/v1/dashboard/policies`.
pub async fn policies(State(state): State<AppState>) -> Result<Response, ApiFailure> {
    let (stats, coverage) = crate::peers::view::stats(&state).await;
    let now = now_ms();
    let published = state.controller.published();
    let resources = published
        .resources
        .iter()
        .map(|(key, resource)| {
            let stamp = published.last_changes.get(key);
            ResourceView {
                kind: key.kind.clone(),
                namespace: key.namespace.clone(),
                name: key.name.clone(),
                target: target(resource),
                summary: summary(resource),
                revision: stamp.map_or(0, |s| s.revision),
                at_ms: stamp.map_or(0, |s| s.at_ms),
            }
        })
        .collect();
    let history = state
        .controller
        .history(HISTORY, true)
        .await?
        .into_iter()
        .map(|r| HistoryEntry {
            revision: r.revision,
            at_ms: r.at_ms,
            actor: r.actor,
            changes: r.changes,
        })
        .collect();
    let breakers = stats
        .breakers()
        .into_iter()
        .map(|b| BreakerView {
            service: b.service.name,
            namespace: b.service.namespace,
            instance: b.instance,
            destination: b.breaker.destination,
            policy: b.breaker.policy,
            address: b.breaker.address,
            state: b.breaker.state,
            since_ms: b.since_ms,
        })
        .collect();
    let rate_limits = stats
        .traffic(now, by_rate_limit)
        .into_iter()
        .map(|((service, policy), window)| RateLimitView {
            namespace: service.namespace,
            service: service.name,
            policy,
            refused_per_second: window.recent.per_second,
            refused: window.total,
        })
        .collect();
    Ok(coverage.apply(
        Json(PoliciesView {
            revision: published.revision,
            resources,
            history,
            breakers,
            rate_limits,
        })
        .into_response(),
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeriesParams {
    /// `namespace/name`.
    service: String,
}

/// `GET /api/v1/dashboard/series?service=NS/NAME`.
pub async fn series(
    State(state): State<AppState>,
    params: Result<Query<SeriesParams>, QueryRejection>,
) -> Result<Response, ApiFailure> {
    let params = query(params)?;
    let key = match params.service.split_once('/') {
        Some((namespace, name)) if !namespace.is_empty() && !name.is_empty() => ServiceKey {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        },
        _ => {
            return Err(ApiFailure::BadRequest(format!(
                "service {:?}: expected NAMESPACE/NAME, e.g. default/orders",
                params.service
            )))
        }
    };
    let (stats, coverage) = crate::peers::view::stats(&state).await;
    let points = stats
        .series(&key, now_ms())
        .into_iter()
        .map(|(at_ms, traffic)| SeriesPoint {
            at_ms,
            rps: traffic.per_second,
            success_rate: traffic.success_rate(),
            p99_ms: traffic.percentile_ms(0.99),
        })
        .collect();
    Ok(coverage.apply(Json(Series { points }).into_response()))
}

/// `GET /api/v1/dashboard/events`.
pub async fn events(State(state): State<AppState>) -> impl IntoResponse {
    crate::events::stream(
        state.controller.hub().clone(),
        &state.activity,
        state.shutdown.clone(),
    )
}

/// Forgets the stats of each instance as it leaves the registry, until
/// shutdown.
pub async fn forget_departed(
    controller: Arc<Controller>,
    stats: Arc<StatsStore>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut revisions = controller.hub().revisions();
    loop {
        revisions.mark_unchanged();
        let published = controller.published();
        stats.retain(|id| published.instances.contains_key(id));
        tokio::select! {
            _ = stopped(&mut shutdown) => return,
            changed = revisions.changed() => if changed.is_err() { return },
        }
    }
}
