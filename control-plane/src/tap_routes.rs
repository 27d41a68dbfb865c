//! The routes of `meshctl tap` (issue 19): `GET /api/v1/tap` (`Action::Tap`:
//! admin, viewer) streams a session's NDJSON `TapLine`s, and
//! `POST /api/v1/tap/{id}/events` (`Action::ReportTap`: sidecars for a tap
//! that selects their service, admins) hands a sidecar's batch to it. The
//! sessions, their bounds and who sees headers are described in `tap`.

use std::convert::Infallible;
use std::sync::atomic::Ordering;

use axum::body::{Body, Bytes};
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Extension, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use meshlet_api::tap::{paths, TapBatch, TapLine, TapQuery, REDACTED};
use tokio::sync::watch;

use crate::auth::{Principal, Role};
use crate::error::ApiFailure;
use crate::extract::{json_body, query};
use crate::push::stopped;
use crate::state::AppState;
use crate::tap::{line, Session, BATCH_BODY_LIMIT, KEEPALIVE};

/// `GET /api/v1/tap` and `POST /api/v1/tap/{id}/events`.
pub fn routes() -> Router<AppState> {
    Router::new().route(paths::TAP, get(tap_stream)).route(
        &paths::events("{id}"),
        post(events).layer(DefaultBodyLimit::max(BATCH_BODY_LIMIT)),
    )
}

async fn tap_stream(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    params: Result<Query<TapQuery>, QueryRejection>,
) -> Result<Response, ApiFailure> {
    let params = query(params)?;
    let filter = params
        .filter()
        .map_err(|e| ApiFailure::BadRequest(format!("invalid tap: {e}")))?;
    // The route's gate let only admins and viewers through.
    let headers = matches!(principal.role, Role::Admin);
    let published = state.controller.published();
    let sidecars = published
        .instances
        .iter_unordered()
        .filter(|i| {
            let r = &i.registration;
            filter.selects_sidecar(&r.namespace, &r.service, &r.labels)
        })
        .count();
    let session = state.taps.open(filter, headers)?;
    tracing::info!(tap = %session.id, principal = %principal.name, sidecars, "tap started");
    let started = TapLine::Started {
        id: session.id.clone(),
        sidecars,
    };
    let tapping = Tapping {
        started: Some(started),
        session,
        max: params.max,
        sent: 0,
        redact: !headers,
        shutdown: state.shutdown.clone(),
    };
    let stream = futures_util::stream::unfold(tapping, |mut t| async move {
        let line = t.next_line().await?;
        Some((Ok::<_, Infallible>(line), t))
    });
    Ok((
        [
            (header::CONTENT_TYPE, "application/x-ndjson"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}

struct Tapping {
    started: Option<TapLine>,
    session: Session,
    max: Option<u64>,
    sent: u64,
    redact: bool,
    shutdown: watch::Receiver<bool>,
}

impl Tapping {
    async fn next_line(&mut self) -> Option<Bytes> {
        if let Some(started) = self.started.take() {
            return Some(line(&started));
        }
        if self.max.is_some_and(|max| self.sent >= max) {
            tracing::info!(tap = %self.session.id, events = self.sent, "tap reached its maximum");
            return None;
        }
        tokio::select! {
            biased;
            _ = stopped(&mut self.shutdown) => None,
            event = self.session.events.recv() => {
                let mut event = event?;
                if self.redact {
                    for (_, value) in &mut event.headers {
                        *value = REDACTED.to_owned();
                    }
                }
                self.sent += 1;
                Some(line(&TapLine::Event(event)))
            }
            _ = tokio::time::sleep(KEEPALIVE) => {
                let dropped = self.session.dropped.swap(0, Ordering::Relaxed);
                Some(line(&if dropped > 0 {
                    TapLine::Dropped { count: dropped }
                } else {
                    TapLine::Keepalive
                }))
            }
        }
    }
}

async fn events(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<StatusCode, ApiFailure> {
    let batch: TapBatch = json_body(body)?;
    // Another replica's tap (`--store etcd`): checked here, delivered there.
    if let (Some(peers), Some((directive, holder))) = (&state.peers, state.taps.remote(&id)) {
        crate::tap::may_report(&directive, &batch, &principal)?;
        let path = crate::peers::paths::tap_events(&id);
        return match peers.post_json(&holder, &path, &batch).await {
            Ok(status) if status.is_success() => Ok(StatusCode::NO_CONTENT),
            Ok(StatusCode::NOT_FOUND) => Err(ApiFailure::NotFound(format!("tap {id:?} has ended"))),
            Ok(status) => Err(ApiFailure::Internal(format!(
                "replica {holder:?} holding tap {id:?} answered {status}"
            ))),
            Err(reason) => Err(ApiFailure::Internal(format!(
                "cannot reach replica {holder:?} holding tap {id:?}: {reason}"
            ))),
        };
    }
    state.taps.deliver(&id, batch, &principal)?;
    Ok(StatusCode::NO_CONTENT)
}
