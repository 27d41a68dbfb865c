//! Live taps (`meshctl tap`, issue 19): sessions, the directives pushed to
//! sidecars, and the two routes.
//!
//! ```text
//! meshctl ── GET /api/v1/tap?service=orders&max=20 ─► tap_stream: TapHub::open ─► Session (bounded queue)
//!    TapHub::directives (watch channel: every live TapDirective)
//!       ─► directive_stream ─► WatchEvent::Taps on each watch stream that sent x-meshlet-watch-taps
//! sidecar ── POST /api/v1/tap/{id}/events (TapBatch) ─► events: TapHub::deliver ─► the session's queue
//! Session ─► NDJSON TapLines (Started, Event…, Dropped, Keepalive) ─► meshctl
//! ```
//!
//! **Who may tap.** `GET /api/v1/tap` is `Action::Tap`: admins, whose taps
//! carry request header values, and viewers, whose taps carry none (the
//! directive tells sidecars to send none, and every value is replaced by
//! `<redacted>` here again before it is written); sidecar tokens get 403.
//! `POST …/events` is `Action::ReportTap`: sidecar tokens, and only for a
//! tap that selects their own namespace and service (so one service cannot
//! feed another's tap), and admins. Tap ids are random (128 bits).
//!
//! **Bounds.** At most [`MAX_SESSIONS`] taps at once (429 beyond); each
//! session's queue holds [`SESSION_QUEUE`] events, and a batch that does
//! not fit is dropped and counted (a `Dropped` line), never waited on; a
//! batch carries at most [`MAX_BATCH_EVENTS`] events. A session ends when
//! its client goes away (a write fails: a keepalive line goes out every
//! [`KEEPALIVE`]), after `max` events, or at shutdown; dropping it removes
//! its directive, the watch streams push the new set, and a sidecar still
//! posting to it gets 404 and stops.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Extension, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use futures_util::Stream;
use meshlet_api::mesh::WatchEvent;
use meshlet_api::tap::{
    paths, TapBatch, TapDirective, TapEvent, TapFilter, TapLine, TapQuery, REDACTED,
};
use tokio::sync::{mpsc, watch};

use crate::auth::{Principal, Role};
use crate::error::ApiFailure;
use crate::extract::{json_body, query};
use crate::push::stopped;
use crate::state::AppState;

/// Taps live at once.
pub const MAX_SESSIONS: usize = 16;
/// Events waiting for one tapper.
pub const SESSION_QUEUE: usize = 1024;
/// Events in one posted batch.
pub const MAX_BATCH_EVENTS: usize = 1000;
/// Largest batch body.
const BATCH_BODY_LIMIT: usize = 1 << 20;
/// A line to the tapper at least this often.
pub const KEEPALIVE: Duration = Duration::from_secs(1);

struct Entry {
    directive: TapDirective,
    events: mpsc::Sender<TapEvent>,
    dropped: Arc<AtomicU64>,
}

/// The live taps.
pub struct TapHub {
    sessions: Mutex<HashMap<String, Entry>>,
    directives: watch::Sender<Arc<Vec<TapDirective>>>,
}

impl Default for TapHub {
    fn default() -> TapHub {
        TapHub {
            sessions: Mutex::default(),
            directives: watch::Sender::new(Arc::new(Vec::new())),
        }
    }
}

impl std::fmt::Debug for TapHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TapHub")
            .field("sessions", &self.sessions.lock().unwrap().len())
            .finish()
    }
}

/// One tapper's session; dropping it ends the tap.
struct Session {
    hub: Arc<TapHub>,
    id: String,
    events: mpsc::Receiver<TapEvent>,
    dropped: Arc<AtomicU64>,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.hub.close(&self.id);
    }
}

impl TapHub {
    /// The live directives, for watch streams.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Vec<TapDirective>>> {
        self.directives.subscribe()
    }

    /// How many taps are live (`/metrics`, tests).
    pub fn live(&self) -> usize {
        self.sessions.lock().unwrap().len()
    }

    fn open(self: &Arc<Self>, filter: TapFilter, headers: bool) -> Result<Session, ApiFailure> {
        let id = random_id();
        let (tx, rx) = mpsc::channel(SESSION_QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        {
            let mut sessions = self.sessions.lock().unwrap();
            if sessions.len() >= MAX_SESSIONS {
                return Err(ApiFailure::LimitReached(format!(
                    "{MAX_SESSIONS} taps are live already; end one first"
                )));
            }
            let directive = TapDirective {
                id: id.clone(),
                filter,
                headers,
            };
            sessions.insert(
                id.clone(),
                Entry {
                    directive,
                    events: tx,
                    dropped: dropped.clone(),
                },
            );
            self.publish(&sessions);
        }
        Ok(Session {
            hub: self.clone(),
            id,
            events: rx,
            dropped,
        })
    }

    fn close(&self, id: &str) {
        let mut sessions = self.sessions.lock().unwrap();
        if sessions.remove(id).is_some() {
            self.publish(&sessions);
        }
    }

    fn publish(&self, sessions: &HashMap<String, Entry>) {
        let mut all: Vec<TapDirective> = sessions.values().map(|e| e.directive.clone()).collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        self.directives.send_replace(Arc::new(all));
    }

    /// Hands a sidecar's batch to tap `id` (404 if it ended; 403 if it
    /// does not select the sidecar token's service). Never waits: events
    /// that do not fit are counted as dropped.
    fn deliver(&self, id: &str, batch: TapBatch, principal: &Principal) -> Result<(), ApiFailure> {
        let sessions = self.sessions.lock().unwrap();
        let entry = sessions
            .get(id)
            .ok_or_else(|| ApiFailure::NotFound(format!("tap {id:?} has ended")))?;
        if let Role::Sidecar { namespace, service } = &principal.role {
            let filter = &entry.directive.filter;
            let selects = filter.namespace == *namespace
                && filter.service.as_ref().is_none_or(|s| s == service);
            if !selects {
                return Err(ApiFailure::Forbidden(format!(
                    "token {:?} is for {namespace}/{service}, which tap {id:?} does not select",
                    principal.name
                )));
            }
        }
        if batch.events.len() > MAX_BATCH_EVENTS {
            return Err(ApiFailure::BadRequest(format!(
                "a tap batch holds at most {MAX_BATCH_EVENTS} events"
            )));
        }
        let mut lost = batch.dropped;
        for event in batch.events {
            if entry.events.try_send(event).is_err() {
                lost += 1;
            }
        }
        if lost > 0 {
            entry.dropped.fetch_add(lost, Ordering::Relaxed);
        }
        Ok(())
    }
}

fn random_id() -> String {
    use std::fmt::Write;
    let mut bytes = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .expect("system randomness");
    bytes.iter().fold(String::with_capacity(32), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

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

fn line<T: serde::Serialize>(value: &T) -> Bytes {
    let mut bytes = serde_json::to_vec(value).expect("serializable");
    bytes.push(b'\n');
    Bytes::from(bytes)
}

async fn events(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<StatusCode, ApiFailure> {
    let batch: TapBatch = json_body(body)?;
    state.taps.deliver(&id, batch, &principal)?;
    Ok(StatusCode::NO_CONTENT)
}

/// The `Taps` events of one watch stream: the live set now, then each
/// time it changes.
pub fn directive_stream(
    directives: watch::Receiver<Arc<Vec<TapDirective>>>,
) -> impl Stream<Item = Result<Bytes, Infallible>> + Send + 'static {
    futures_util::stream::unfold((directives, true), |(mut rx, first)| async move {
        if !first {
            rx.changed().await.ok()?;
        }
        let taps = rx.borrow_and_update().as_ref().clone();
        Some((Ok(line(&WatchEvent::Taps { taps })), (rx, false)))
    })
}
