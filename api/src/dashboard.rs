//! The dashboard's JSON answers (`GET /api/v1/dashboard/...`, contract in
//! `notes/dashboard-api.md`), shared by the control plane that computes
//! them and any client that reads them.
//!
//! The numbers come from the sidecars' stats reports
//! ([`crate::mesh::StatsReport`]) that the control plane keeps for the last
//! five minutes: rates, success rates and percentiles cover the last 30 s
//! of reports, `requests` counts the whole window. A value that needs
//! requests is `null` when there were none. Times are Unix milliseconds.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::mesh::{BreakerState, InstanceRole};

/// One entry of `GET /api/v1/dashboard/services`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceView {
    pub namespace: String,
    pub name: String,
    /// Every instance healthy, and at least one.
    pub healthy: bool,
    pub instances: Vec<InstanceView>,
    #[serde(flatten)]
    pub golden: Golden,
    /// Inbound requests of the service in the whole window.
    pub requests: u64,
}

/// A registered instance of a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InstanceView {
    pub id: String,
    pub address: SocketAddr,
    pub labels: BTreeMap<String, String>,
    pub healthy: bool,
    pub last_heartbeat_ms: u64,
    /// The SPIFFE id its sidecar presents (`None`: no mesh CA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
}

/// The golden metrics of a set of requests.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Golden {
    pub rps: f64,
    /// 0..1; `null` without requests.
    pub success_rate: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

/// `GET /api/v1/dashboard/topology`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Topology {
    pub nodes: Vec<TopologyNode>,
    pub edges: Vec<TopologyEdge>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TopologyNode {
    /// `namespace/name`.
    pub id: String,
    pub namespace: String,
    pub name: String,
    pub healthy: bool,
    /// `gateway` when an instance of the service registered as an ingress
    /// gateway: the mesh's entry, drawn first (leftmost) by the page.
    #[serde(default)]
    pub role: InstanceRole,
}

/// Calls from one service to another, as the callers' sidecars saw them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TopologyEdge {
    /// `namespace/name` of the caller and of the destination.
    pub from: String,
    pub to: String,
    pub rps: f64,
    /// 0..1; `null` without requests in the last 30 s.
    pub error_rate: Option<f64>,
    pub p99_ms: Option<f64>,
    /// Requests in the whole window.
    pub requests: u64,
    /// The calls are mutual TLS: both services have registered instances
    /// with identities (sidecars that both hold workload certificates
    /// always speak mTLS to each other). The dashboard draws a padlock.
    #[serde(default)]
    pub mtls: bool,
}

/// `GET /api/v1/dashboard/policies`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PoliciesView {
    pub revision: u64,
    pub resources: Vec<ResourceView>,
    /// The last 20 revisions that changed resources, newest first.
    pub history: Vec<HistoryEntry>,
    pub breakers: Vec<BreakerView>,
    pub rate_limits: Vec<RateLimitView>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResourceView {
    pub kind: String,
    pub namespace: String,
    pub name: String,
    /// The target service (`namespace/name`), empty for a `Service`.
    pub target: String,
    /// The kind's main settings in one line (as `meshctl get` shows them).
    pub summary: String,
    /// The revision that last changed it and when (0 when unknown).
    pub revision: u64,
    pub at_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HistoryEntry {
    pub revision: u64,
    pub at_ms: u64,
    pub actor: String,
    pub changes: Vec<String>,
}

/// One circuit breaker of one caller instance, from its latest report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BreakerView {
    /// The caller service and its namespace.
    pub service: String,
    pub namespace: String,
    /// The caller instance whose sidecar holds the breaker.
    pub instance: String,
    pub destination: String,
    pub policy: String,
    pub address: SocketAddr,
    pub state: BreakerState,
    /// When the control plane first saw this state (the report's arrival).
    pub since_ms: u64,
}

/// Refusals of one `RateLimitPolicy`, summed over the instances of the
/// service that enforces it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitView {
    pub namespace: String,
    pub service: String,
    pub policy: String,
    /// Over the last 30 s.
    pub refused_per_second: f64,
    /// In the whole window.
    pub refused: u64,
}

/// `GET /api/v1/dashboard/series?service=NS/NAME`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Series {
    pub points: Vec<SeriesPoint>,
}

/// The service's inbound requests in one report interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SeriesPoint {
    /// The end of the interval.
    pub at_ms: u64,
    pub rps: f64,
    pub success_rate: Option<f64>,
    pub p99_ms: Option<f64>,
}

/// The data of an `update` event of `GET /api/v1/dashboard/events`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UpdateEvent {
    /// The published revision of the registry and resources.
    pub revision: u64,
    pub at_ms: u64,
}
