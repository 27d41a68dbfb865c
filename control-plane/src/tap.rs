//! Live taps (`meshctl tap`, issue 19): sessions and the directives pushed
//! to sidecars; the two routes are in `tap_routes`.
//!
//! ```text
//! meshctl ── GET /api/v1/tap?service=orders&max=20 ─► tap_routes: TapHub::open ─► Session (bounded queue)
//!    TapHub::directives (watch channel: every live TapDirective)
//!       ─► directive_stream ─► WatchEvent::Taps on each watch stream that sent x-meshlet-watch-taps
//! sidecar ── POST /api/v1/tap/{id}/events (TapBatch) ─► tap_routes: TapHub::deliver ─► the session's queue
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
//!
//! **Several replicas** (`--store etcd`): `peers::taps` writes this
//! replica's directives to etcd (`P/taps/{id}`, on a lease) and adds the
//! other replicas' to this hub ([`TapHub::upsert_remote`]), so every
//! replica pushes every tap to its own sidecars; a sidecar's batch for a
//! tap another replica holds is checked here ([`may_report`]) and
//! forwarded to that replica (`tap_routes`, `peers::routes`).

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use futures_util::Stream;
use meshlet_api::mesh::WatchEvent;
use meshlet_api::tap::{TapBatch, TapDirective, TapEvent, TapFilter};
use tokio::sync::{mpsc, watch};

use crate::auth::{Principal, Role};
use crate::error::ApiFailure;

/// Taps live at once.
pub const MAX_SESSIONS: usize = 16;
/// Events waiting for one tapper.
pub const SESSION_QUEUE: usize = 1024;
/// Events in one posted batch.
pub const MAX_BATCH_EVENTS: usize = 1000;
/// Largest batch body.
pub const BATCH_BODY_LIMIT: usize = 1 << 20;
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
    /// Every live directive: this replica's sessions and the other
    /// replicas' (what sidecars watching this replica are pushed).
    directives: watch::Sender<Arc<Vec<TapDirective>>>,
    /// This replica's sessions' directives only (shared through etcd by
    /// `peers::taps`).
    local: watch::Sender<Arc<Vec<TapDirective>>>,
    /// Other replicas' taps (`--store etcd`): id → directive and the
    /// replica that holds the session.
    remote: Mutex<HashMap<String, (TapDirective, String)>>,
}

impl Default for TapHub {
    fn default() -> TapHub {
        TapHub {
            sessions: Mutex::default(),
            directives: watch::Sender::new(Arc::new(Vec::new())),
            local: watch::Sender::new(Arc::new(Vec::new())),
            remote: Mutex::default(),
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
pub(crate) struct Session {
    hub: Arc<TapHub>,
    pub(crate) id: String,
    pub(crate) events: mpsc::Receiver<TapEvent>,
    pub(crate) dropped: Arc<AtomicU64>,
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

    pub(crate) fn open(
        self: &Arc<Self>,
        filter: TapFilter,
        headers: bool,
    ) -> Result<Session, ApiFailure> {
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
        let mut local: Vec<TapDirective> = sessions.values().map(|e| e.directive.clone()).collect();
        local.sort_by(|a, b| a.id.cmp(&b.id));
        let mut all = local.clone();
        all.extend(
            self.remote
                .lock()
                .unwrap()
                .values()
                .filter(|(d, _)| !sessions.contains_key(&d.id))
                .map(|(d, _)| d.clone()),
        );
        all.sort_by(|a, b| a.id.cmp(&b.id));
        self.local.send_replace(Arc::new(local));
        self.directives.send_replace(Arc::new(all));
    }

    /// This replica's own directives, as they change (`peers::taps`).
    pub fn subscribe_local(&self) -> watch::Receiver<Arc<Vec<TapDirective>>> {
        self.local.subscribe()
    }

    /// Another replica's tap, held by replica `holder`, is live: this
    /// replica's sidecars are pushed its directive too.
    pub fn upsert_remote(&self, directive: TapDirective, holder: String) {
        self.remote
            .lock()
            .unwrap()
            .insert(directive.id.clone(), (directive, holder));
        self.publish(&self.sessions.lock().unwrap());
    }

    /// Another replica's tap ended.
    pub fn remove_remote(&self, id: &str) {
        let removed = self.remote.lock().unwrap().remove(id).is_some();
        if removed {
            self.publish(&self.sessions.lock().unwrap());
        }
    }

    /// The directive and holder of tap `id` when another replica holds it
    /// (not this one).
    pub fn remote(&self, id: &str) -> Option<(TapDirective, String)> {
        if self.sessions.lock().unwrap().contains_key(id) {
            return None;
        }
        self.remote.lock().unwrap().get(id).cloned()
    }

    /// Hands a batch another replica forwarded (it checked the sidecar's
    /// credential against the directive) to tap `id` of this replica.
    pub(crate) fn deliver_forwarded(&self, id: &str, batch: TapBatch) -> Result<(), ApiFailure> {
        self.deliver(
            id,
            batch,
            &Principal {
                name: "peer replica".into(),
                role: Role::Admin,
            },
        )
    }

    /// Hands a sidecar's batch to tap `id` (404 if it ended; 403 if it
    /// does not select the sidecar token's service). Never waits: events
    /// that do not fit are counted as dropped.
    pub(crate) fn deliver(
        &self,
        id: &str,
        batch: TapBatch,
        principal: &Principal,
    ) -> Result<(), ApiFailure> {
        let sessions = self.sessions.lock().unwrap();
        let entry = sessions
            .get(id)
            .ok_or_else(|| ApiFailure::NotFound(format!("tap {id:?} has ended")))?;
        may_report(&entry.directive, &batch, principal)?;
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

/// Whether `principal` may post `batch` to the tap of `directive`: a
/// sidecar token only for a tap that selects its own service, and a batch
/// within [`MAX_BATCH_EVENTS`].
pub(crate) fn may_report(
    directive: &TapDirective,
    batch: &TapBatch,
    principal: &Principal,
) -> Result<(), ApiFailure> {
    let id = &directive.id;
    if let Role::Sidecar { namespace, service } = &principal.role {
        let filter = &directive.filter;
        let selects =
            filter.namespace == *namespace && filter.service.as_ref().is_none_or(|s| s == service);
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
    Ok(())
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

pub(crate) fn line<T: serde::Serialize>(value: &T) -> Bytes {
    let mut bytes = serde_json::to_vec(value).expect("serializable");
    bytes.push(b'\n');
    Bytes::from(bytes)
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
