//! Taps across replicas (`--store etcd`): a `meshctl tap` served by one
//! replica reaches the sidecars watching every replica.
//!
//! ```text
//! replica A: TapHub (A's sessions) ─► subscribe_local ─► put P/taps/{id} = {directive, holder: A} (A's lease)
//! every replica: watch P/taps/ ─► TapHub::upsert_remote / remove_remote ─► WatchEvent::Taps to its sidecars
//! sidecar watching B ── POST B/api/v1/tap/{id}/events ─► B: may_report (its token) ─► Peers::post
//!     ─► A: POST /api/v1/peer/tap/{id}/events (peer credential) ─► TapHub::deliver_forwarded ─► A's session
//! ```
//!
//! A tap's keys share one lease per replica, so when a replica dies its
//! taps leave every replica within [`TAP_TTL`]; a tap that ends deletes its
//! key at once. Costs: two etcd writes per tap (start, end), one keep-alive
//! every third of [`TAP_TTL`], and one extra hop per batch of events from a
//! sidecar that watches another replica than the tap's.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, EventType, GetOptions, PutOptions};
use meshlet_api::tap::TapDirective;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::Peers;
use crate::tap::TapHub;

/// The lease of a replica's tap keys.
pub const TAP_TTL: Duration = Duration::from_secs(6);

/// `P/taps/{id}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SharedTap {
    directive: TapDirective,
    /// The replica that holds the session (where events go).
    holder: String,
}

/// Shares this replica's taps and follows the others' until shutdown.
pub async fn run(
    peers: Arc<Peers>,
    hub: Arc<TapHub>,
    client: Client,
    prefix: String,
    shutdown: watch::Receiver<bool>,
) {
    let folder = format!("{prefix}/taps/");
    loop {
        let mut stop = shutdown.clone();
        let outcome = tokio::select! {
            outcome = follow(&peers, &hub, client.clone(), &folder) => outcome,
            _ = stop.wait_for(|s| *s) => return,
        };
        if let Err(error) = outcome {
            tracing::warn!(%error, "sharing taps through etcd interrupted; again in 1s");
        }
        let mut stop = shutdown.clone();
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

async fn follow(
    peers: &Peers,
    hub: &TapHub,
    mut client: Client,
    folder: &str,
) -> Result<(), String> {
    let me = peers.me().id.clone();
    let call = |what: &'static str| move |e: etcd_client::Error| format!("{what}: {e}");
    let lease = client
        .lease_grant(TAP_TTL.as_secs() as i64, None)
        .await
        .map_err(call("grant the taps' lease"))?
        .id();
    let listed = client
        .get(folder, Some(GetOptions::new().with_prefix()))
        .await
        .map_err(call("list the taps"))?;
    let at = listed.header().map(|h| h.revision()).unwrap_or(0);
    let mine_before: Vec<String> = listed
        .kvs()
        .iter()
        .filter_map(|kv| serde_json::from_slice::<SharedTap>(kv.value()).ok())
        .filter_map(|tap| {
            if tap.holder == me {
                Some(tap.directive.id)
            } else {
                hub.upsert_remote(tap.directive, tap.holder);
                None
            }
        })
        .collect();
    // Keys of an earlier run of this loop (their sessions may have ended).
    let mut written: HashSet<String> = mine_before.into_iter().collect();
    let (mut keeper, mut renewals, mut events) = super::renew_and_watch(
        &mut client,
        lease,
        "the taps' lease",
        folder,
        at,
        "the taps",
    )
    .await?;
    let mut local = hub.subscribe_local();
    local.mark_changed();
    let mut tick = tokio::time::interval(TAP_TTL / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                keeper.keep_alive().await.map_err(call("renew the taps' lease"))?;
                match renewals.message().await.map_err(call("renew the taps' lease"))? {
                    Some(reply) if reply.ttl() > 0 => {}
                    _ => return Err("the taps' lease ended".into()),
                }
            }
            changed = local.changed() => {
                changed.map_err(|_| "the tap hub is gone".to_owned())?;
                let now: Vec<TapDirective> = local.borrow_and_update().as_ref().clone();
                let ids: HashSet<String> = now.iter().map(|d| d.id.clone()).collect();
                let fresh: Vec<TapDirective> = now.into_iter().filter(|d| !written.contains(&d.id)).collect();
                for directive in fresh {
                    let id = directive.id.clone();
                    let value = serde_json::to_vec(&SharedTap { directive, holder: me.clone() })
                        .map_err(|e| e.to_string())?;
                    client
                        .put(format!("{folder}{id}"), value, Some(PutOptions::new().with_lease(lease)))
                        .await
                        .map_err(call("share a tap"))?;
                    written.insert(id);
                }
                let ended: Vec<String> = written.difference(&ids).cloned().collect();
                for id in ended {
                    client
                        .delete(format!("{folder}{id}"), None)
                        .await
                        .map_err(call("end a shared tap"))?;
                    written.remove(&id);
                }
            }
            message = events.message() => {
                let response = message
                    .map_err(call("watch the taps"))?
                    .ok_or("the taps watch ended")?;
                if response.canceled() {
                    return Err("the taps watch was cancelled".into());
                }
                for event in response.events() {
                    let Some(kv) = event.kv() else { continue };
                    let id = String::from_utf8_lossy(&kv.key()[folder.len().min(kv.key().len())..]).into_owned();
                    match event.event_type() {
                        EventType::Put => match serde_json::from_slice::<SharedTap>(kv.value()) {
                            Ok(tap) if tap.holder != me => hub.upsert_remote(tap.directive, tap.holder),
                            Ok(_) => {}
                            Err(error) => tracing::warn!(%id, %error, "unreadable shared tap"),
                        },
                        EventType::Delete => hub.remove_remote(&id),
                    }
                }
            }
        }
    }
}
