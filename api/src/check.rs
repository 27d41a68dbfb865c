//! What `meshctl check` reads: `GET /api/v1/check` (viewer or admin) answers
//! one [`CheckReport`], the control plane's view of the mesh's health; the
//! judging (thresholds, ✔/⚠/✖, hints) is meshctl's.
//!
//! Data flow:
//!
//! ```text
//! sidecar ── heartbeat {healthy, revision, watching, version, sentAtMs, certNotAfterMs} ─► control plane
//!                                                   (liveness: last seen, acknowledged revision, skew)
//! meshctl check ── GET /api/v1/check ─► CheckReport ─► meshctl's checks ─► ✔/⚠/✖ lines or JSON
//! ```

use serde::{Deserialize, Serialize};

use crate::mesh::{CaStatus, InstanceRole};

pub mod paths {
    /// `GET`: [`super::CheckReport`] (`Action::ReadRegistry`: admin, viewer).
    pub const CHECK: &str = "/api/v1/check";
}

/// The control plane's view of the mesh, for `meshctl check`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CheckReport {
    /// The control plane's version.
    pub version: String,
    /// The control plane's wall clock when it answered (Unix ms).
    pub now_ms: u64,
    /// The published revision.
    pub revision: u64,
    pub heartbeat_interval_ms: u64,
    pub ttl_ms: u64,
    /// A read of the store (its latest history record) succeeded.
    pub store: ComponentHealth,
    /// The CA's roots (the signing one and any in rotation).
    pub ca: CaStatus,
    /// Every registered instance (sidecars and gateways).
    pub sidecars: Vec<SidecarStatus>,
    /// Instances removed by expiry (no heartbeat for the TTL) in the last
    /// [`EXPIRED_WINDOW_MS`], newest first.
    #[serde(default)]
    pub expired: Vec<ExpiredInstance>,
    /// Applied policies whose target service has no registered instance
    /// and no static endpoint.
    #[serde(default)]
    pub policies_without_instances: Vec<PolicyTarget>,
}

/// How long an expired instance stays in [`CheckReport::expired`].
pub const EXPIRED_WINDOW_MS: u64 = 10 * 60 * 1000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ComponentHealth {
    pub ok: bool,
    /// What was tried and what happened.
    pub detail: String,
}

/// One registered instance as the control plane last heard from it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SidecarStatus {
    pub id: String,
    pub service: String,
    pub namespace: String,
    pub role: InstanceRole,
    /// The app's health as the last heartbeat said.
    pub healthy: bool,
    /// Since the last heartbeat (or the registration).
    pub last_seen_ms_ago: u64,
    /// The revision the sidecar said it applied (`None`: an older sidecar
    /// that does not say, or no heartbeat yet).
    pub revision: Option<u64>,
    /// Revisions between the acknowledged one and the published one.
    pub revisions_behind: Option<u64>,
    /// How long its heartbeats have acknowledged an older revision than the
    /// published one (0 when up to date).
    pub behind_for_ms: Option<u64>,
    /// Whether its watch stream is open, as it said.
    pub watching: Option<bool>,
    pub version: Option<String>,
    /// The sidecar's clock minus the control plane's, from the last
    /// heartbeat's send time (positive: the sidecar is ahead; includes the
    /// heartbeat's transit time).
    pub clock_skew_ms: Option<i64>,
    /// When its workload certificate expires (Unix ms).
    pub cert_not_after_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExpiredInstance {
    pub id: String,
    pub service: String,
    pub namespace: String,
    pub expired_ms_ago: u64,
}

/// A policy and the service it targets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyTarget {
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub target_namespace: String,
    pub target_service: String,
}
