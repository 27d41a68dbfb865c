//! Mesh-wide CA rotation with `--store etcd` (issue 18): the rotation
//! state lives in etcd, every replica follows it, and one elected replica
//! drives the phases.
//!
//! ```text
//! POST /api/v1/ca/rotate (any replica) ─► Workload::rotate ─► CAS P/ca/state (mod revision it holds)
//!     won ─► its roots, then a revision carrying the bundle ─► every replica's sidecars
//!     lost ─► reload P/ca/state ─► 409 (a rotation runs) ; etcd down ─► 503, nothing written
//! every replica: replication watch ─► P/ca/state put ─► Workload::apply_shared (swap the roots: signing + bundle)
//! election (P/election/ca-rotation, lease LEADER_TTL) ─► the leader's Workload::step
//!     moves the phases (switch after the grace, retire) with the same CAS
//! ```
//!
//! [`SharedRotation`] is the etcd side: reading and compare-and-swapping
//! `P/ca/state` ([`SharedRoots`] as JSON: every root's certificate and key,
//! the phase with its start time), and the leader election. The election
//! is etcd's v3election service: each replica grants a lease of
//! [`LEADER_TTL`], keeps it alive every third of it and campaigns with its
//! replica id as the value; the oldest campaign leads. A killed leader's
//! lease ends within [`LEADER_TTL`] and the next campaigner wins and
//! resumes from `P/ca/state`; a stopped leader resigns at once. A replica
//! that misses one keep-alive stops acting as leader before its lease can
//! end. Two replicas that both believe they lead (a partition) cannot both
//! move the phase: each change is a CAS on the state's mod revision.
//!
//! With redb there is no [`SharedRotation`]: the one process leads.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, LeaseKeepAliveStream, LeaseKeeper};
use tokio::sync::watch;

use crate::ca::{CaError, MeshCa, Roots, SharedRoots};
use crate::error::StoreError;
use crate::store::etcd::{CaStateValue, EtcdStore};

/// The lease of a campaign: a killed leader is replaced within it.
pub const LEADER_TTL: Duration = Duration::from_secs(5);
/// The election's name under the prefix.
pub const ELECTION: &str = "election/ca-rotation";
/// The role name in `/healthz?detail` and `meshlet_leader{role}`.
pub const ROLE: &str = "ca-rotation";

/// The rotation state and election in etcd, for one replica.
pub struct SharedRotation {
    etcd: Arc<EtcdStore>,
    /// The `ca.crt`/`ca.key` root (keeps those file names in [`Roots`]).
    original: Arc<MeshCa>,
    leader: AtomicBool,
}

/// Why the election loop started over.
#[derive(Debug, thiserror::Error)]
enum ElectionError {
    #[error("etcd: cannot {doing}: {source}")]
    Etcd {
        doing: &'static str,
        #[source]
        source: etcd_client::Error,
    },
    #[error("the campaign lease ended or was not renewed in time")]
    LeaseLost,
}

fn etcd(doing: &'static str) -> impl FnOnce(etcd_client::Error) -> ElectionError {
    move |source| ElectionError::Etcd { doing, source }
}

impl SharedRotation {
    pub fn new(etcd: Arc<EtcdStore>, original: Arc<MeshCa>) -> SharedRotation {
        SharedRotation {
            etcd,
            original,
            leader: AtomicBool::new(false),
        }
    }

    /// The `ca.crt`/`ca.key` root.
    pub fn original(&self) -> &Arc<MeshCa> {
        &self.original
    }

    /// This replica leads the rotation now.
    pub fn is_leader(&self) -> bool {
        self.leader.load(Ordering::Relaxed)
    }

    /// The roots a stored state names.
    pub fn decode(&self, value: &[u8]) -> Result<Roots, CaError> {
        let shared: SharedRoots = serde_json::from_slice(value).map_err(|e| CaError::NotACa {
            reason: format!("the CA rotation state in etcd is unreadable: {e}"),
        })?;
        Roots::from_shared(&shared, &self.original)
    }

    /// `P/ca/state` now: the roots it names (`None`: absent, the bootstrap
    /// root alone) and its mod revision.
    pub async fn load(&self) -> Result<(Option<Roots>, i64), StoreError> {
        let CaStateValue {
            value,
            mod_revision,
        } = self.etcd.ca_state().await?;
        let roots = match value {
            Some(value) => Some(
                self.decode(&value)
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?,
            ),
            None => None,
        };
        Ok((roots, mod_revision))
    }

    /// Writes `next` if the state's mod revision is still `expected`:
    /// the new mod revision, or `None` when another replica was first.
    pub async fn swap(&self, expected: i64, next: &Roots) -> Result<Option<i64>, StoreError> {
        let value = serde_json::to_vec(&next.to_shared())
            .map_err(|e| StoreError::Corrupt(format!("cannot encode the CA state: {e}")))?;
        self.etcd.swap_ca_state(expected, value).await
    }

    fn election_name(&self) -> String {
        format!("{}/{ELECTION}", self.etcd.prefix())
    }

    /// The replica id of the current leader (`/healthz?detail`); `None`
    /// when nobody leads or etcd did not answer within a second.
    pub async fn leader_id(&self) -> Option<String> {
        let mut election = self.etcd.client().election_client();
        let name = self.election_name();
        let reply = tokio::time::timeout(Duration::from_secs(1), election.leader(name))
            .await
            .ok()?
            .ok()?;
        let kv = reply.kv()?;
        Some(String::from_utf8_lossy(kv.value()).into_owned())
    }

    /// Campaigns until `shutdown`; after a lost lease or an etcd error,
    /// campaigns again a second later.
    pub async fn run_election(self: Arc<Self>, shutdown: watch::Receiver<bool>) {
        loop {
            let result = self.campaign(shutdown.clone()).await;
            self.set_leader(false);
            match result {
                Ok(()) => return,
                Err(error) => {
                    tracing::warn!(%error, "CA rotation election interrupted; again in 1s")
                }
            }
            let mut stop = shutdown.clone();
            tokio::select! {
                _ = crate::push::stopped(&mut stop) => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    fn set_leader(&self, leader: bool) {
        if self.leader.swap(leader, Ordering::Relaxed) != leader {
            tracing::info!(
                role = ROLE,
                replica = self.etcd.replica_id(),
                leader,
                "leadership changed"
            );
        }
    }

    /// One campaign: a lease, wait to lead (renewing it), lead until the
    /// lease is lost (`Err`) or `shutdown` (resign, `Ok`).
    async fn campaign(&self, mut shutdown: watch::Receiver<bool>) -> Result<(), ElectionError> {
        let mut client = self.etcd.client();
        let lease = client
            .lease_grant(LEADER_TTL.as_secs() as i64, None)
            .await
            .map_err(etcd("grant the campaign lease"))?
            .id();
        let (mut keeper, mut renewals) = client
            .lease_keep_alive(lease)
            .await
            .map_err(etcd("renew the campaign lease"))?;
        let mut tick = tokio::time::interval(LEADER_TTL / 3);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut election = client.election_client();
        let name = self.election_name();
        let id = self.etcd.replica_id().to_owned();
        let campaign = election.campaign(name, id, lease);
        tokio::pin!(campaign);
        let won = loop {
            tokio::select! {
                won = &mut campaign => break won.map_err(etcd("campaign"))?,
                _ = tick.tick() => renew(&mut keeper, &mut renewals).await?,
                _ = crate::push::stopped(&mut shutdown) => {
                    revoke(&mut client, lease).await;
                    return Ok(());
                }
            }
        };
        self.set_leader(true);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if let Err(e) = renew(&mut keeper, &mut renewals).await {
                        self.set_leader(false);
                        return Err(e);
                    }
                }
                _ = crate::push::stopped(&mut shutdown) => {
                    self.set_leader(false);
                    if let Some(key) = won.leader() {
                        let options = etcd_client::ResignOptions::new().with_leader(key.clone());
                        let _ = tokio::time::timeout(
                            Duration::from_secs(1),
                            client.election_client().resign(Some(options)),
                        )
                        .await;
                    }
                    revoke(&mut client, lease).await;
                    return Ok(());
                }
            }
        }
    }
}

/// One keep-alive, answered within a third of the TTL with a live lease.
async fn renew(
    keeper: &mut LeaseKeeper,
    renewals: &mut LeaseKeepAliveStream,
) -> Result<(), ElectionError> {
    let answer = tokio::time::timeout(LEADER_TTL / 3, async {
        keeper
            .keep_alive()
            .await
            .map_err(etcd("renew the campaign lease"))?;
        renewals
            .message()
            .await
            .map_err(etcd("renew the campaign lease"))
    })
    .await
    .map_err(|_| ElectionError::LeaseLost)??;
    match answer {
        Some(reply) if reply.ttl() > 0 => Ok(()),
        _ => Err(ElectionError::LeaseLost),
    }
}

/// Ends a lease at once (best effort, bounded): its campaign key goes.
async fn revoke(client: &mut Client, lease: i64) {
    let _ = tokio::time::timeout(Duration::from_secs(1), client.lease_revoke(lease)).await;
}
