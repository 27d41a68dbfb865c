//! The HTTP API (axum): thin handlers that decode a request, call the
//! [`Controller`](crate::controller::Controller) or read the current
//! published revision (`push::Published`), and encode the
//! answer. Every failure leaves through [`ApiFailure`] as a JSON `ApiError`.
//!
//! Writes go through the controller (one writer); reads never wait for it:
//! they use the latest published revision.
//!
//! Traces take another path: OTLP exports (`POST /v1/traces`, handled by
//! [`crate::traces::receiver`]) and trace queries go to the in-memory
//! [`TraceStore`](crate::traces::TraceStore), never to the controller. `/metrics` reads both.
//! The sidecars' stats reports and the dashboard's API are in
//! `dashboard`.
//!
//! The dashboard page (`/`, `/ui/...`) comes from `ui`. Every request
//! runs in a `request` span (see [`router`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Extension, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use meshlet_api::changes::{self, DeleteRequest, ResourceInfo, RollbackRequest, WouldRefuseRate};
use meshlet_api::mesh::{
    paths, ApplyRequest, Heartbeat, InstanceInfo, Registration, ServiceDetail, ServiceKey,
    ServiceSummary,
};
use meshlet_api::otlp::TRACES_PATH;
use meshlet_api::traces::{self as trace_wire, TraceDetail, TraceSummary};
use meshlet_api::Resource;
use serde::Deserialize;
use tracing::Instrument;

use crate::auth::{Action, Principal};
use crate::clock::now_ms;
use crate::dashboard;
use crate::error::{ApiFailure, StoreError};
use crate::extract::{json_body, query};
use crate::push::watch_stream;
use crate::state::AppState;
use crate::traces::model::TraceId;
use crate::traces::receiver::{self, MAX_BODY};
use crate::traces::TraceQuery;

/// Default and maximum of `GET /api/v1/revisions?limit=`.
const DEFAULT_HISTORY: usize = 100;
const MAX_HISTORY: usize = 10_000;
/// Largest stats report accepted (a few hundred routes).
const STATS_BODY_LIMIT: usize = 1 << 20;

/// Every route, behind the access guard (`access::guard`: Host names,
/// credentials, the route's gate; see `access`), in a `request` span.
pub fn router(state: AppState) -> Router {
    let access = state.access.clone();
    Router::new()
        .route(paths::HEALTH, get(healthz))
        .route(paths::INSTANCES, post(register))
        .route(
            &format!("{}/{{id}}", paths::INSTANCES),
            axum::routing::delete(deregister),
        )
        .route(
            &format!("{}/{{id}}/heartbeat", paths::INSTANCES),
            put(heartbeat),
        )
        .route(
            &paths::stats("{id}"),
            post(dashboard::ingest).layer(DefaultBodyLimit::max(STATS_BODY_LIMIT)),
        )
        .route(paths::DASHBOARD_SERVICES, get(dashboard::services))
        .route(paths::DASHBOARD_TOPOLOGY, get(dashboard::topology))
        .route(paths::DASHBOARD_POLICIES, get(dashboard::policies))
        .route(paths::DASHBOARD_SERIES, get(dashboard::series))
        .route(paths::DASHBOARD_EVENTS, get(dashboard::events))
        .route(paths::WATCH, get(watch))
        .route(paths::SERVICES, get(services))
        .route(
            &format!("{}/{{namespace}}/{{name}}", paths::SERVICES),
            get(service_detail),
        )
        .route(paths::RESOURCES, get(resources))
        .route(paths::APPLY, post(apply))
        .route(changes::paths::DELETE, post(delete))
        .route(changes::paths::DIFF, post(diff))
        .route(changes::paths::ROLLBACK, post(rollback))
        .route(changes::paths::RESOURCE_INFO, get(resource_info))
        .route(paths::REVISIONS, get(revisions))
        .route(
            TRACES_PATH,
            post(receiver::receive).layer(DefaultBodyLimit::max(MAX_BODY)),
        )
        .route(trace_wire::paths::TRACES, get(traces))
        .route(&trace_wire::paths::trace("{id}"), get(trace))
        .route("/metrics", get(metrics))
        .merge(crate::ui::routes())
        .merge(crate::token_routes::routes())
        .merge(crate::cert_routes::routes())
        .merge(crate::webhook::routes(state.inject.clone()))
        .merge(crate::tap_routes::routes())
        .merge(crate::peers::routes::routes())
        .route(meshlet_api::check::paths::CHECK, get(crate::check::check))
        .merge(crate::access::session_routes(access.clone()))
        .fallback(|| async { ApiFailure::NotFound("no such API path".into()) })
        .method_not_allowed_fallback(|| async {
            let body = meshlet_api::mesh::ApiError {
                error: "method not allowed on this path".into(),
            };
            (StatusCode::METHOD_NOT_ALLOWED, Json(body))
        })
        .layer(axum::middleware::from_fn_with_state(
            access,
            crate::access::guard,
        ))
        .layer(axum::middleware::from_fn(request_span))
        .with_state(state)
}

/// Runs each request in a `request` span (a process-wide id, method,
/// path), so whatever a handler or the store logs on its behalf says which
/// request it was.
async fn request_span(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    static NEXT_ID: AtomicU64 = AtomicU64::new(1);
    let span = tracing::info_span!(
        "request",
        id = NEXT_ID.fetch_add(1, Ordering::Relaxed),
        method = %request.method(),
        path = %request.uri().path(),
    );
    next.run(request).instrument(span).await
}

/// Runs a state change to completion even if the client goes away.
///
/// axum drops a handler's future when its client disconnects; a change cut
/// off between the store commit and the in-memory apply would leave disk
/// and memory apart. A spawned task is not cancelled with the request.
async fn detached<T: Send + 'static>(
    change: impl std::future::Future<Output = Result<T, ApiFailure>> + Send + 'static,
) -> Result<T, ApiFailure> {
    tokio::spawn(change.in_current_span())
        .await
        .map_err(|e| ApiFailure::Store(StoreError::Task(e.to_string())))?
}

/// Validates the registration (400), checks the caller's role may register
/// its service (403); the controller claims the id (409).
async fn register(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiFailure> {
    let registration: Registration = json_body(body)?;
    registration.validate().map_err(|(field, message)| {
        ApiFailure::BadRequest(format!("invalid registration: {field}: {message}"))
    })?;
    principal
        .may(Action::RegisterInstance {
            namespace: &registration.namespace,
            service: &registration.service,
        })
        .map_err(|denied| ApiFailure::Forbidden(denied.to_string()))?;
    let controller = state.controller.clone();
    let reply =
        detached(async move { controller.register(registration, &principal).await }).await?;
    Ok(Json(reply).into_response())
}

async fn heartbeat(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<StatusCode, ApiFailure> {
    let heartbeat: Heartbeat = json_body(body)?;
    let controller = state.controller.clone();
    detached(async move { controller.heartbeat(&id, heartbeat, &principal).await }).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn deregister(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiFailure> {
    let controller = state.controller.clone();
    detached(async move { controller.deregister(&id, &principal).await }).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WatchParams {
    revision: Option<u64>,
    /// The epoch of the store the watcher's revision came from.
    epoch: Option<u64>,
}

/// The watch stream; a watcher that sends `x-meshlet-watch-taps` also gets
/// the live taps (`WatchEvent::Taps`, see `tap`) interleaved, and the
/// stream still ends when the revisions' stream ends.
async fn watch(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
    params: Result<Query<WatchParams>, QueryRejection>,
) -> Result<Response, ApiFailure> {
    use futures_util::StreamExt;
    let params = query(params)?;
    let stream = watch_stream(
        state.controller.hub().clone(),
        params.revision,
        params.epoch,
        state.keepalive,
        state.shutdown.clone(),
    );
    let body = if headers.contains_key(meshlet_api::tap::WATCH_TAPS_HEADER) {
        let revisions = stream
            .map(Some)
            .chain(futures_util::stream::once(async { None }));
        let taps = crate::tap::directive_stream(state.taps.subscribe()).map(Some);
        let merged = futures_util::stream::select(revisions, taps)
            .take_while(|item| std::future::ready(item.is_some()))
            .filter_map(std::future::ready);
        Body::from_stream(merged)
    } else {
        Body::from_stream(stream)
    };
    Ok((
        [
            (header::CONTENT_TYPE, "application/x-ndjson"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response())
}

async fn services(State(state): State<AppState>) -> Json<Vec<ServiceSummary>> {
    let published = state.controller.published();
    let summaries = published
        .service_keys()
        .into_iter()
        .map(|key| {
            let endpoints = published
                .services
                .get(&key)
                .map(|s| s.endpoints.as_slice())
                .unwrap_or_default();
            ServiceSummary {
                instances: endpoints.len(),
                healthy: endpoints.iter().filter(|e| e.healthy).count(),
                name: key.name,
                namespace: key.namespace,
            }
        })
        .collect();
    Json(summaries)
}

async fn service_detail(
    State(state): State<AppState>,
    Path((namespace, name)): Path<(String, String)>,
) -> Result<Json<ServiceDetail>, ApiFailure> {
    let published = state.controller.published();
    let key = ServiceKey { namespace, name };
    if !published.service_keys().contains(&key) {
        return Err(ApiFailure::NotFound(format!(
            "service {:?} not found in namespace {:?}",
            key.name, key.namespace
        )));
    }
    let now = now_ms();
    let instances = published
        .instances
        .values()
        .filter(|i| i.registration.service == key.name && i.registration.namespace == key.namespace)
        .map(|i| {
            let reg = &i.registration;
            InstanceInfo {
                id: reg.id.clone(),
                address: reg.address,
                labels: reg.labels.clone(),
                healthy: reg.healthy,
                registered_at_ms: i.registered_at_ms,
                last_heartbeat_ms_ago: state
                    .controller
                    .last_heartbeat_ago(&reg.id)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or_else(|| now.saturating_sub(i.registered_at_ms)),
                identity: crate::registry::identity_uri(
                    state.workload.trust_domain(),
                    &reg.namespace,
                    &reg.service,
                ),
                app_protocol: reg.app_protocol,
                role: reg.role,
                certificate: state.workload.certificate_of(&reg.id),
            }
        })
        .collect();
    let static_endpoints = published
        .services
        .get(&key)
        .map(|s| {
            s.endpoints
                .iter()
                .filter(|e| e.instance_id.is_none())
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    let policies = published
        .resources
        .values()
        .filter(|r| r.target() == Some((key.namespace.as_str(), key.name.as_str())))
        .cloned()
        .collect();
    Ok(Json(ServiceDetail {
        name: key.name,
        namespace: key.namespace,
        instances,
        static_endpoints,
        policies,
    }))
}

async fn resources(State(state): State<AppState>) -> Json<Vec<Resource>> {
    let published = state.controller.published();
    Json(published.resources.values().cloned().collect())
}

/// The revision's actor is the caller's token name; a client's `actor`
/// field is accepted (older meshctl sends one) and ignored.
async fn apply(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiFailure> {
    let request: ApplyRequest = json_body(body)?;
    let controller = state.controller.clone();
    let reply = detached(async move { controller.apply(request, &principal.name).await }).await?;
    Ok(Json(reply).into_response())
}

/// Every applied resource with its last change and, for a dry-run
/// policy, what it would have refused (from the stats reports).
async fn resource_info(State(state): State<AppState>) -> Response {
    let published = state.controller.published();
    let window_ms = WouldRefuseRate::RATE_WINDOW_SECS * 1000;
    let (stats, coverage) = crate::peers::view::stats(&state).await;
    let would_refuse = stats.traffic_over(now_ms(), window_ms, crate::stats::by_would_refuse);
    let infos = published
        .resources
        .iter()
        .map(|(key, resource)| ResourceInfo {
            resource: resource.clone(),
            last_change: published.last_changes.get(key).cloned(),
            would_refuse: is_dry_run(resource).then(|| {
                let policy = (key.kind.clone(), key.namespace.clone(), key.name.clone());
                let window = would_refuse.get(&policy).cloned().unwrap_or_default();
                WouldRefuseRate {
                    per_second: window.recent.per_second,
                    rate_window_secs: window.recent_covered_ms as f64 / 1000.0,
                    total: window.total,
                }
            }),
        })
        .collect::<Vec<ResourceInfo>>();
    coverage.apply(Json(infos).into_response())
}

/// Whether `resource` is a policy in `mode: dryRun`.
fn is_dry_run(resource: &Resource) -> bool {
    match resource {
        Resource::RateLimitPolicy(doc) => doc.spec.mode.is_dry_run(),
        Resource::CircuitBreakerPolicy(doc) => doc.spec.mode.is_dry_run(),
        Resource::AuthorizationPolicy(doc) => doc.spec.mode.is_dry_run(),
        _ => false,
    }
}

async fn delete(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiFailure> {
    let request: DeleteRequest = json_body(body)?;
    let controller = state.controller.clone();
    let reply = detached(async move { controller.delete(request, &principal.name).await }).await?;
    Ok(Json(reply).into_response())
}

/// Changes nothing, so it needs no detaching.
async fn diff(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiFailure> {
    let request: ApplyRequest = json_body(body)?;
    Ok(Json(state.controller.diff(&request)?).into_response())
}

async fn rollback(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiFailure> {
    let request: RollbackRequest = json_body(body)?;
    let controller = state.controller.clone();
    let reply =
        detached(async move { controller.rollback(request, &principal.name).await }).await?;
    Ok(Json(reply).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RevisionParams {
    limit: Option<usize>,
    /// Leave out the registry's revisions.
    #[serde(default)]
    resources_only: bool,
}

async fn revisions(
    State(state): State<AppState>,
    params: Result<Query<RevisionParams>, QueryRejection>,
) -> Result<Response, ApiFailure> {
    let params = query(params)?;
    let limit = params.limit.unwrap_or(DEFAULT_HISTORY).min(MAX_HISTORY);
    let records = state
        .controller
        .history(limit, params.resources_only)
        .await?;
    Ok(Json(records).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct TraceParams {
    service: Option<String>,
    /// `10ms`, `1s`, ...
    min_duration: Option<String>,
    limit: Option<usize>,
}

impl TraceParams {
    fn into_query(self) -> Result<TraceQuery, ApiFailure> {
        let min_duration = self
            .min_duration
            .map(|text| {
                humantime::parse_duration(&text).map_err(|e| {
                    ApiFailure::BadRequest(format!(
                        "invalid minDuration {text:?}: {e} (examples: 10ms, 1s)"
                    ))
                })
            })
            .transpose()?;
        let limit = match self.limit {
            Some(0) => return Err(ApiFailure::BadRequest("limit must be at least 1".into())),
            Some(n) => n.min(crate::traces::store::MAX_LIMIT),
            None => crate::traces::store::DEFAULT_LIMIT,
        };
        Ok(TraceQuery {
            service: self.service.filter(|s| !s.is_empty()),
            min_duration,
            limit,
        })
    }
}

/// Mesh-wide with replicas: every live replica's traces, merged
/// (`peers::view`; `x-meshlet-partial` names a replica that did not answer).
async fn traces(
    State(state): State<AppState>,
    params: Result<Query<TraceParams>, QueryRejection>,
) -> Result<Response, ApiFailure> {
    let query = query(params)?.into_query()?;
    let (list, coverage): (Vec<TraceSummary>, _) = crate::peers::view::traces(&state, &query).await;
    Ok(coverage.apply(Json(list).into_response()))
}

async fn trace(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiFailure> {
    let trace_id = TraceId::parse(&id).map_err(|e| ApiFailure::BadRequest(e.to_string()))?;
    let (detail, coverage): (Option<TraceDetail>, _) =
        crate::peers::view::trace(&state, trace_id).await;
    let response = match detail {
        Some(detail) => Json(detail).into_response(),
        None => ApiFailure::NotFound(format!("trace {trace_id} not found")).into_response(),
    };
    Ok(coverage.apply(response))
}

/// `/healthz` answers `ok` (liveness); with `?detail` a JSON object with
/// the store kind, the published revision and, with etcd, the replica id,
/// the live replicas registered in etcd (`peers::registry`: id, URL,
/// start time, version), the replica leading each elected role
/// (`"leader": {"ca-rotation": id or null}`, asked of etcd with a 1 s
/// deadline; `rotation.rs`) and etcd's health as this replica last saw it.
async fn healthz(
    State(state): State<AppState>,
    axum::extract::RawQuery(raw): axum::extract::RawQuery,
) -> Response {
    let detail = raw.is_some_and(|q| {
        q.split('&')
            .any(|p| p == "detail" || p.starts_with("detail="))
    });
    if !detail {
        return "ok".into_response();
    }
    let revision = state.controller.published().revision;
    let replicas = state.peers.as_ref().map(|peers| peers.replicas());
    let rotation_leader = match state.workload.shared() {
        Some(shared) => shared.leader_id().await,
        None => None,
    };
    let body = match state.controller.replica() {
        Some(etcd) => serde_json::json!({
            "status": "ok",
            "store": "etcd",
            "replica": etcd.replica_id(),
            "advertiseUrl": state.peers.as_ref().map(|p| p.me().url.clone()),
            "replicas": replicas,
            "revision": revision,
            "leader": {crate::rotation::ROLE: rotation_leader},
            "etcd": {
                "up": etcd.health().up(),
                "endpoints": etcd.endpoints(),
                "prefix": etcd.prefix(),
                "errors": etcd.health().errors(),
                "lastError": etcd.health().last_error(),
            },
        }),
        None => serde_json::json!({"status": "ok", "store": "redb", "revision": revision}),
    };
    Json(body).into_response()
}

async fn metrics(State(state): State<AppState>) -> Result<Response, ApiFailure> {
    let text = crate::metrics::render(
        &state.controller,
        &state.traces,
        &state.workload,
        &state.connections,
        state.access.sessions.counts(),
        Instant::now(),
    )
    .map_err(|e| ApiFailure::Internal(format!("cannot encode metrics: {e}")))?;
    Ok(([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response())
}
