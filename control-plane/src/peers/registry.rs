//! Replica discovery through etcd: this replica's registration under
//! `P/replicas/{id}` (a [`ReplicaInfo`] as JSON, attached to a lease of
//! [`REGISTRATION_TTL`], renewed every third of it) and a watch of
//! `P/replicas/` that keeps [`Peers`]' live set.
//!
//! ```text
//! grant lease ─► put P/replicas/ID ─► get P/replicas/ (the live set, etcd revision R)
//!   ─► watch from R+1: put ─► upsert, delete (a lease ended: that replica died) ─► remove
//!   ─► every TTL/3 a keep-alive; the lease gone or the watch broken ─► start over after 1 s
//! shutdown ─► revoke the lease (the others drop this replica at once)
//! ```
//!
//! A killed replica leaves every live set within [`REGISTRATION_TTL`];
//! until then a read skips it after the peer timeout (a partial answer).
//! While etcd is unreachable the last live set is kept.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, EventType, GetOptions, PutOptions};
use tokio::sync::watch;

use super::{Peers, ReplicaInfo};

/// The lease of a replica's registration.
pub const REGISTRATION_TTL: Duration = Duration::from_secs(6);

/// Keeps this replica registered and the live set current until shutdown.
pub async fn run(
    peers: Arc<Peers>,
    client: Client,
    prefix: String,
    shutdown: watch::Receiver<bool>,
) {
    let folder = format!("{prefix}/replicas/");
    loop {
        let mut stop = shutdown.clone();
        let outcome = tokio::select! {
            outcome = follow(&peers, client.clone(), &folder) => outcome,
            _ = wait_stopped(&mut stop) => return,
        };
        if let Err(error) = outcome {
            tracing::warn!(%error, "replica registration in etcd interrupted; again in 1s");
        }
        let mut stop = shutdown.clone();
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = wait_stopped(&mut stop) => return,
        }
    }
}

async fn wait_stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stopped| *stopped).await;
}

/// Revokes this replica's registration (shutdown); best effort, bounded.
pub async fn deregister(client: &mut Client, prefix: &str, id: &str) {
    let key = format!("{prefix}/replicas/{id}");
    let _ = tokio::time::timeout(Duration::from_secs(1), client.delete(key, None)).await;
}

/// One registration: put, list, then watch and renew until something fails.
async fn follow(peers: &Peers, mut client: Client, folder: &str) -> Result<(), String> {
    let me = peers.me().clone();
    let key = format!("{folder}{}", me.id);
    let value = serde_json::to_string(&me).map_err(|e| e.to_string())?;
    let call = |what: &'static str| move |e: etcd_client::Error| format!("{what}: {e}");
    let lease = client
        .lease_grant(REGISTRATION_TTL.as_secs() as i64, None)
        .await
        .map_err(call("grant the registration lease"))?
        .id();
    client
        .put(
            key.clone(),
            value,
            Some(PutOptions::new().with_lease(lease)),
        )
        .await
        .map_err(call("register this replica"))?;
    let listed = client
        .get(folder, Some(GetOptions::new().with_prefix()))
        .await
        .map_err(call("list the replicas"))?;
    let at = listed.header().map(|h| h.revision()).unwrap_or(0);
    peers.set_live(
        listed
            .kvs()
            .iter()
            .filter_map(|kv| serde_json::from_slice::<ReplicaInfo>(kv.value()).ok()),
    );
    tracing::info!(replicas = ?peers.replicas().iter().map(|r| &r.id).collect::<Vec<_>>(), "replicas in etcd");
    let (mut keeper, mut renewals, mut events) = super::renew_and_watch(
        &mut client,
        lease,
        "the registration lease",
        folder,
        at,
        "the replicas",
    )
    .await?;
    let mut tick = tokio::time::interval(REGISTRATION_TTL / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                keeper.keep_alive().await.map_err(call("renew the registration lease"))?;
                match renewals.message().await.map_err(call("renew the registration lease"))? {
                    Some(reply) if reply.ttl() > 0 => {}
                    _ => return Err("the registration lease ended".into()),
                }
            }
            message = events.message() => {
                let response = message
                    .map_err(call("watch the replicas"))?
                    .ok_or("the replicas watch ended")?;
                if response.canceled() {
                    return Err("the replicas watch was cancelled".into());
                }
                for event in response.events() {
                    let Some(kv) = event.kv() else { continue };
                    let id = String::from_utf8_lossy(&kv.key()[folder.len().min(kv.key().len())..]).into_owned();
                    match event.event_type() {
                        EventType::Put => match serde_json::from_slice::<ReplicaInfo>(kv.value()) {
                            Ok(info) => {
                                tracing::info!(replica = %info.id, url = %info.url, "replica joined");
                                peers.upsert(info);
                            }
                            Err(error) => tracing::warn!(%id, %error, "unreadable replica registration"),
                        },
                        EventType::Delete => {
                            if id == me.id {
                                return Err("this replica's registration was deleted".into());
                            }
                            tracing::info!(replica = %id, "replica left");
                            peers.remove(&id);
                        }
                    }
                }
            }
        }
    }
}
