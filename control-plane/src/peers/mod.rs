//! The other replicas of this control plane (`--store etcd`, issue 18):
//! who they are, and reading from all of them at once.
//!
//! ```text
//! registry.rs: P/replicas/{id} = ReplicaInfo on a lease (this replica), watch P/replicas/ ─► Peers::set_live
//! a mesh-wide read (view.rs) ─► Peers::gather(path) ─► every other live replica, concurrently:
//!      GET https://PEER/api/v1/peer/... (mesh CA, x-meshlet-peer credential), --peer-timeout each
//!   ─► answers + the replicas that did not answer (a partial answer, never an error)
//! ```
//!
//! Each replica keeps what it received in memory (spans, stats reports);
//! nothing of that goes through etcd. A read on one replica asks each other
//! live replica once (one request per peer per read) and merges
//! (`merge.rs`). The peer routes are in `routes.rs`, their credential in
//! `credential.rs`; taps are shared through etcd and their events
//! forwarded to the replica holding the session (`taps.rs`). A redb
//! control plane has no `Peers`: reads stay local.

pub mod credential;
pub mod merge;
pub mod registry;
pub mod routes;
pub mod taps;
pub mod view;

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use credential::{PeerSecret, PEER_HEADER};

/// Paths of the internal routes (the access guard's `Gate::Peer`).
pub mod paths {
    pub const TRACES: &str = "/api/v1/peer/traces";
    pub const TRACE: &str = "/api/v1/peer/traces/{id}";
    pub const STATS: &str = "/api/v1/peer/stats";
    pub const TAP_EVENTS: &str = "/api/v1/peer/tap/{id}/events";

    pub fn trace(id: &str) -> String {
        format!("{TRACES}/{id}")
    }

    pub fn tap_events(id: &str) -> String {
        format!("/api/v1/peer/tap/{id}/events")
    }
}

/// One replica as registered under `P/replicas/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaInfo {
    pub id: String,
    /// Where the other replicas reach its API (`--advertise-url`).
    pub url: String,
    pub started_at_ms: u64,
    pub version: String,
}

/// Why one peer gave no answer to a mesh-wide read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missing {
    pub replica: String,
    pub reason: String,
}

/// What a fan-out brought back: each answering peer's value (`None`: it
/// answered 404, it has nothing), and the peers that did not answer.
#[derive(Debug)]
pub struct Gathered<T> {
    pub answers: Vec<(String, Option<T>)>,
    pub missing: Vec<Missing>,
}

/// This replica, the live ones, and the client that reaches them.
pub struct Peers {
    me: ReplicaInfo,
    secret: Arc<PeerSecret>,
    client: meshlet_client::Client,
    timeout: Duration,
    live: RwLock<BTreeMap<String, ReplicaInfo>>,
}

impl std::fmt::Debug for Peers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peers")
            .field("me", &self.me)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Peers {
    /// `client` trusts the mesh CA; each call to a peer is bounded by
    /// `timeout` (connect, answer and body).
    pub fn new(
        me: ReplicaInfo,
        secret: Arc<PeerSecret>,
        client: meshlet_client::Client,
        timeout: Duration,
    ) -> Peers {
        let live = BTreeMap::from([(me.id.clone(), me.clone())]);
        Peers {
            me,
            secret,
            client: client.connect_timeout(timeout).timeout(timeout),
            timeout,
            live: RwLock::new(live),
        }
    }

    pub fn me(&self) -> &ReplicaInfo {
        &self.me
    }

    pub fn secret(&self) -> &Arc<PeerSecret> {
        &self.secret
    }

    /// Every live replica, this one included, by id.
    pub fn replicas(&self) -> Vec<ReplicaInfo> {
        let live = self.live.read().unwrap_or_else(|e| e.into_inner());
        live.values().cloned().collect()
    }

    /// The live replicas other than this one.
    pub fn others(&self) -> Vec<ReplicaInfo> {
        let live = self.live.read().unwrap_or_else(|e| e.into_inner());
        live.values()
            .filter(|r| r.id != self.me.id)
            .cloned()
            .collect()
    }

    /// Replaces the live set (from etcd); this replica is always in it.
    pub fn set_live(&self, replicas: impl IntoIterator<Item = ReplicaInfo>) {
        let mut next: BTreeMap<String, ReplicaInfo> =
            replicas.into_iter().map(|r| (r.id.clone(), r)).collect();
        next.insert(self.me.id.clone(), self.me.clone());
        *self.live.write().unwrap_or_else(|e| e.into_inner()) = next;
    }

    /// One live replica appeared or changed.
    pub fn upsert(&self, replica: ReplicaInfo) {
        let mut live = self.live.write().unwrap_or_else(|e| e.into_inner());
        live.insert(replica.id.clone(), replica);
    }

    /// One replica's registration ended (never this one).
    pub fn remove(&self, id: &str) {
        if id == self.me.id {
            return;
        }
        let mut live = self.live.write().unwrap_or_else(|e| e.into_inner());
        live.remove(id);
    }

    /// GETs `path_and_query` from every other live replica at once and
    /// decodes each JSON answer; a peer that fails, answers an error or
    /// takes longer than the peer timeout is listed as missing.
    pub async fn gather<T: DeserializeOwned + Send + 'static>(
        &self,
        path_and_query: &str,
    ) -> Gathered<T> {
        let calls = self.others().into_iter().map(|peer| {
            let path = path_and_query.to_owned();
            async move {
                let outcome = tokio::time::timeout(self.timeout, self.get::<T>(&peer, &path))
                    .await
                    .unwrap_or_else(|_| {
                        Err(format!(
                            "no answer within {}",
                            humantime::format_duration(self.timeout)
                        ))
                    });
                (peer.id, outcome)
            }
        });
        let mut gathered = Gathered {
            answers: Vec::new(),
            missing: Vec::new(),
        };
        for (replica, outcome) in futures_util::future::join_all(calls).await {
            match outcome {
                Ok(value) => gathered.answers.push((replica, value)),
                Err(reason) => {
                    tracing::debug!(%replica, %reason, "peer replica did not answer");
                    gathered.missing.push(Missing { replica, reason });
                }
            }
        }
        gathered
    }

    /// POSTs `body` as JSON to replica `replica` (a live one) within the
    /// peer timeout; its status, or why it could not be asked.
    pub async fn post_json<B: Serialize>(
        &self,
        replica: &str,
        path: &str,
        body: &B,
    ) -> Result<http::StatusCode, String> {
        let peer = self
            .replicas()
            .into_iter()
            .find(|r| r.id == replica)
            .ok_or_else(|| format!("replica {replica:?} is not live"))?;
        let authority = authority_of(&peer.url)?;
        let bytes = serde_json::to_vec(body).map_err(|e| e.to_string())?;
        let request = meshlet_client::request(http::Method::POST, &authority, path)
            .header(PEER_HEADER, self.secret.token())
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from(bytes)))
            .map_err(|e| e.to_string())?;
        let reply = tokio::time::timeout(self.timeout, self.client.fetch(&authority, request))
            .await
            .map_err(|_| "no answer in time".to_owned())?
            .map_err(|e| e.cause())?;
        Ok(reply.status)
    }

    async fn get<T: DeserializeOwned>(
        &self,
        peer: &ReplicaInfo,
        path: &str,
    ) -> Result<Option<T>, String> {
        let authority = authority_of(&peer.url)?;
        let request = meshlet_client::request(http::Method::GET, &authority, path)
            .header(PEER_HEADER, self.secret.token())
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .map_err(|e| e.to_string())?;
        let reply = self
            .client
            .fetch(&authority, request)
            .await
            .map_err(|e| e.cause())?;
        if reply.status == http::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let reply = reply.success(&authority).map_err(|e| e.cause())?;
        serde_json::from_slice(&reply.body)
            .map(Some)
            .map_err(|e| format!("unreadable answer: {e}"))
    }
}

/// `host:port` of an `https://host[:port][/]` URL (port 15010 by default).
pub fn authority_of(url: &str) -> Result<String, String> {
    let rest = url
        .strip_prefix("https://")
        .ok_or_else(|| format!("{url:?} is not an https:// URL"))?;
    let host_port = rest.trim_end_matches('/');
    if host_port.is_empty() || host_port.contains('/') {
        return Err(format!("{url:?}: expected https://HOST[:PORT]"));
    }
    let has_port = match host_port.rfind(']') {
        Some(end) => host_port[end..].contains(':'),
        None => host_port.contains(':'),
    };
    Ok(if has_port {
        host_port.to_owned()
    } else {
        format!("{host_port}:15010")
    })
}

/// The host of an `https://` URL (brackets of an IPv6 literal removed).
pub fn host_of(url: &str) -> Option<String> {
    let authority = authority_of(url).ok()?;
    let host = match authority.rfind(']') {
        Some(end) => authority[..=end].to_owned(),
        None => authority.rsplit_once(':')?.0.to_owned(),
    };
    Some(
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned(),
    )
}

/// What each etcd loop of this module holds while it lives: the keep-alive
/// stream of its lease, and a watch of `folder` from the revision after
/// the listing it started from (`listed_at`), so no change is missed or
/// seen twice. `lease_name`/`watched` name them in errors.
pub(crate) async fn renew_and_watch(
    client: &mut etcd_client::Client,
    lease: i64,
    lease_name: &str,
    folder: &str,
    listed_at: i64,
    watched: &str,
) -> Result<
    (
        etcd_client::LeaseKeeper,
        etcd_client::LeaseKeepAliveStream,
        etcd_client::WatchStream,
    ),
    String,
> {
    let (keeper, renewals) = client
        .lease_keep_alive(lease)
        .await
        .map_err(|e| format!("renew {lease_name}: {e}"))?;
    let events = client
        .watch(
            folder,
            Some(
                etcd_client::WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(listed_at + 1),
            ),
        )
        .await
        .map_err(|e| format!("watch {watched}: {e}"))?;
    Ok((keeper, renewals, events))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_give_authority_and_host() {
        assert_eq!(
            authority_of("https://10.0.0.1:15010").unwrap(),
            "10.0.0.1:15010"
        );
        assert_eq!(authority_of("https://cp-0.cp/").unwrap(), "cp-0.cp:15010");
        assert_eq!(authority_of("https://[::1]:9").unwrap(), "[::1]:9");
        assert_eq!(authority_of("https://[::1]").unwrap(), "[::1]:15010");
        assert!(authority_of("http://a:1").is_err());
        assert!(authority_of("https://a:1/x").is_err());
        assert_eq!(host_of("https://[::1]:9").unwrap(), "::1");
        assert_eq!(host_of("https://cp-0.cp").unwrap(), "cp-0.cp");
    }
}
