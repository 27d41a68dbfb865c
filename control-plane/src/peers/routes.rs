//! The internal routes other replicas call for a mesh-wide read (see
//! `view.rs`): this replica's own part only, never a fan-out of its own
//! (so one read costs one request per peer, never a cascade).
//!
//! - `GET /api/v1/peer/traces?limit=&service=&minDurationMicros=` — this
//!   replica's trace summaries (`TraceStore::list`);
//! - `GET /api/v1/peer/traces/{id}` — its part of one trace (404: none);
//! - `GET /api/v1/peer/stats` — its kept stats reports (`StatsStore::dump`);
//! - `POST /api/v1/peer/tap/{id}/events` — a sidecar's tap batch that
//!   another replica received for a tap this one holds (`taps.rs`).
//!
//! **Who may use them:** only a replica of the same mesh, with the peer
//! credential (`credential.rs`) in `x-meshlet-peer`; the access guard's
//! `Gate::Peer` accepts nothing else (no admin token, no session).

use std::time::{Duration, Instant};

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::routing::get;
use axum::{Json, Router};
use meshlet_api::traces::{TraceDetail, TraceSummary};
use serde::Deserialize;

use super::paths;
use crate::error::ApiFailure;
use crate::extract::query;
use crate::state::AppState;
use crate::stats::InstanceDump;
use crate::traces::model::TraceId;
use crate::traces::TraceQuery;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route(paths::TRACES, get(traces))
        .route(paths::TRACE, get(trace))
        .route(paths::STATS, get(stats))
        .route(
            paths::TAP_EVENTS,
            axum::routing::post(tap_events).layer(axum::extract::DefaultBodyLimit::max(
                crate::tap::BATCH_BODY_LIMIT,
            )),
        )
}

/// A batch a sidecar posted to another replica for a tap this one holds
/// (that replica checked the sidecar's token against the tap).
async fn tap_events(
    State(state): State<AppState>,
    Path(id): Path<String>,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<axum::http::StatusCode, ApiFailure> {
    let batch: meshlet_api::tap::TapBatch = crate::extract::json_body(body)?;
    state.taps.deliver_forwarded(&id, batch)?;
    Ok(axum::http::StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PeerTraceParams {
    limit: usize,
    service: Option<String>,
    min_duration_micros: Option<u64>,
}

async fn traces(
    State(state): State<AppState>,
    params: Result<Query<PeerTraceParams>, QueryRejection>,
) -> Result<Json<Vec<TraceSummary>>, ApiFailure> {
    let params = query(params)?;
    let query = TraceQuery {
        service: params.service,
        min_duration: params.min_duration_micros.map(Duration::from_micros),
        limit: params.limit.clamp(1, crate::traces::store::MAX_LIMIT),
    };
    Ok(Json(state.traces.list(&query, Instant::now())))
}

async fn trace(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<TraceDetail>, ApiFailure> {
    let id = TraceId::parse(&id).map_err(|e| ApiFailure::BadRequest(e.to_string()))?;
    state
        .traces
        .get(id, Instant::now())
        .map(Json)
        .ok_or_else(|| ApiFailure::NotFound(format!("trace {id} not on this replica")))
}

async fn stats(State(state): State<AppState>) -> Json<Vec<InstanceDump>> {
    Json(state.stats.dump())
}
