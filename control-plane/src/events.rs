//! The dashboard's live updates: `GET /api/v1/dashboard/events`, a
//! server-sent event stream.
//!
//! ```text
//! stats report ─┐
//! new spans ────┼─► Activity (a counter on a watch channel) ─┐
//! revision ─────┴──── Hub (published revisions) ─────────────┴─► per client:
//!     wait for either, send `update` {revision, atMs}, then hold back for
//!     COALESCE (changes meanwhile become the next event)
//! ```
//!
//! A client gets at most one `update` per [`COALESCE`] and a `: keepalive`
//! comment every [`KEEPALIVE`] (axum's keep-alive). The stream ends on
//! shutdown. The event says only that something changed: the client
//! refetches what it shows.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::Stream;
use meshlet_api::dashboard::UpdateEvent;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::clock::now_ms;
use crate::push::{stopped, Hub};

/// At most one event per this long, per client.
pub const COALESCE: Duration = Duration::from_secs(1);
/// A comment line this often keeps proxies from closing a quiet stream.
pub const KEEPALIVE: Duration = Duration::from_secs(15);

/// Something the dashboard shows changed outside the revisions (a stats
/// report, new spans). Cheap to clone and to notify.
#[derive(Debug, Clone)]
pub struct Activity {
    changes: Arc<watch::Sender<u64>>,
}

impl Default for Activity {
    fn default() -> Self {
        Activity {
            changes: Arc::new(watch::Sender::new(0)),
        }
    }
}

impl Activity {
    pub fn notify(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }
}

struct Client {
    hub: Arc<Hub>,
    revisions: watch::Receiver<u64>,
    activity: watch::Receiver<u64>,
    shutdown: watch::Receiver<bool>,
    /// When the last event went out.
    sent: Option<Instant>,
}

/// The event stream of one client.
pub fn stream(
    hub: Arc<Hub>,
    activity: &Activity,
    shutdown: watch::Receiver<bool>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let mut revisions = hub.revisions();
    revisions.mark_unchanged();
    let mut activity = activity.subscribe();
    activity.mark_unchanged();
    let client = Client {
        hub,
        revisions,
        activity,
        shutdown,
        sent: None,
    };
    let events = futures_util::stream::unfold(client, |mut c| async move {
        if let Some(sent) = c.sent {
            tokio::select! {
                _ = stopped(&mut c.shutdown) => return None,
                _ = tokio::time::sleep_until(sent + COALESCE) => {}
            }
        }
        tokio::select! {
            _ = stopped(&mut c.shutdown) => return None,
            changed = c.revisions.changed() => changed.ok()?,
            changed = c.activity.changed() => changed.ok()?,
        }
        c.revisions.mark_unchanged();
        c.activity.mark_unchanged();
        c.sent = Some(Instant::now());
        let update = UpdateEvent {
            revision: c.hub.current().revision,
            at_ms: now_ms(),
        };
        let event = Event::default()
            .event("update")
            .json_data(update)
            .expect("serializable");
        Some((Ok(event), c))
    });
    Sse::new(events).keep_alive(KeepAlive::new().interval(KEEPALIVE).text("keepalive"))
}
