//! What tests read from a sidecar's admin listener, the same for a sidecar
//! process and an in-process sidecar.

use std::net::SocketAddr;
use std::time::Duration;

use crate::{client, wait};

/// A sidecar's three listeners, for helpers that take either kind
/// (`SidecarProcess` or `inprocess::Sidecar`, which implement it next to
/// their definitions) in test files that use both.
pub trait Listening {
    fn inbound(&self) -> SocketAddr;
    fn outbound(&self) -> SocketAddr;
    fn admin(&self) -> SocketAddr;
}

/// `/config_dump` as JSON.
pub async fn config_dump(admin: SocketAddr) -> serde_json::Value {
    let reply = client::get(admin, "/config_dump")
        .await
        .expect("config_dump answers");
    serde_json::from_slice(&reply.body).expect("config_dump is JSON")
}

/// Addresses of the healthy endpoints of `service` in the sidecar's
/// current snapshot, sorted.
pub async fn endpoints_of(admin: SocketAddr, service: &str) -> Vec<String> {
    let dump = config_dump(admin).await;
    let mut addrs: Vec<String> = dump["snapshot"]["services"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["name"] == service)
        .flat_map(|s| s["endpoints"].as_array().cloned().unwrap_or_default())
        .filter_map(|e| e["address"].as_str().map(str::to_owned))
        .collect();
    addrs.sort();
    addrs
}

/// The configuration revision the sidecar routes with.
pub async fn revision(admin: SocketAddr) -> u64 {
    config_dump(admin).await["snapshot"]["revision"]
        .as_u64()
        .expect("revision in config_dump")
}

/// Waits until `path` on `addr` answers 200.
pub async fn wait_ok(what: &str, addr: SocketAddr, path: &str, patience: Duration) {
    wait::until(what, patience, || async {
        let reply = client::get(addr, path).await.ok()?;
        (reply.status == 200).then_some(())
    })
    .await;
}
