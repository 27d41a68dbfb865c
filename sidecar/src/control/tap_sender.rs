//! Sends tapped requests' events to the control plane (`meshctl tap`).
//!
//! ```text
//! telemetry::tap queue ─► (first event, then up to FLUSH or MAX_BATCH more) ─► one TapBatch per tap
//!   ─► POST /api/v1/tap/{id}/events (the sidecar's token) ─► 404: the tap ended ─► Tap::end
//! ```
//!
//! One task, started with the control client; it sleeps on the queue and
//! costs nothing while nobody taps. A batch that fails to send is dropped
//! (logged at debug): a tap is a best-effort view, and the request path
//! never waits for it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, StatusCode};
use meshlet_api::tap::{paths, TapBatch, TapEvent};
use tokio::sync::watch;

use crate::control::call;
use crate::settings::ControlPlaneSettings;
use crate::telemetry::tap::Tap;

/// How long events gather before a batch is sent.
const FLUSH: Duration = Duration::from_millis(50);
/// Events in one batch, at most (the control plane's limit).
const MAX_BATCH: usize = 500;
/// Deadline of one POST.
const POST_TIMEOUT: Duration = Duration::from_secs(2);

pub fn spawn(cp: Arc<ControlPlaneSettings>, tap: Arc<Tap>, mut stop: watch::Receiver<bool>) {
    let Some(mut queue) = tap.take_receiver() else {
        return;
    };
    tokio::spawn(async move {
        loop {
            let first = tokio::select! {
                event = queue.recv() => event,
                _ = stop.wait_for(|stop| *stop) => return,
            };
            let Some((id, event)) = first else {
                return;
            };
            let mut batches: BTreeMap<Arc<str>, Vec<TapEvent>> = BTreeMap::new();
            batches.entry(id).or_default().push(event);
            let mut count = 1;
            let flush_at = tokio::time::Instant::now() + FLUSH;
            while count < MAX_BATCH {
                tokio::select! {
                    event = queue.recv() => match event {
                        Some((id, event)) => {
                            batches.entry(id).or_default().push(event);
                            count += 1;
                        }
                        None => break,
                    },
                    _ = tokio::time::sleep_until(flush_at) => break,
                }
            }
            let mut dropped = tap.take_dropped();
            for (id, mut events) in batches {
                for event in &mut events {
                    event.instance.clone_from(&cp.instance_id);
                }
                let batch = TapBatch {
                    events,
                    dropped: std::mem::take(&mut dropped),
                };
                send(&cp, &tap, &id, &batch).await;
            }
        }
    });
}

async fn send(cp: &ControlPlaneSettings, tap: &Tap, id: &str, batch: &TapBatch) {
    let body = serde_json::to_vec(batch).expect("serializable");
    // The replica this sidecar watches now: taps live in the memory of the
    // replica that pushed them (they are not shared through the store).
    let replica = cp.replicas.current();
    let sent = call(
        &replica.client(&cp.client),
        &replica.authority,
        Method::POST,
        &paths::events(id),
        Some(body),
        POST_TIMEOUT,
    )
    .await;
    match sent {
        Ok(_) => {}
        Err(error) if error.status() == Some(StatusCode::NOT_FOUND) => {
            tracing::info!(tap = id, "tap ended");
            tap.end(id);
        }
        Err(error) => {
            tracing::debug!(tap = id, %error, events = batch.events.len(), "tap events not sent");
        }
    }
}
