//! Wire types between the control plane, the sidecars and meshctl.
//!
//! Data flow:
//!
//! ```text
//! sidecar ── POST /api/v1/instances (Registration) ──────────► control plane
//!         ── PUT  /api/v1/instances/{id}/heartbeat (Heartbeat) ►   (registry)
//!         ◄─ GET  /api/v1/watch?revision=N (NDJSON WatchEvents) ─  (push)
//! ```
//!
//! The control plane numbers every change of the mesh with a revision. A
//! watcher gets a [`MeshState`] (everything) on its first connect or when
//! it is too far behind, then one [`MeshDelta`] per revision: the services
//! and resources that changed since the revision it holds, each in full.
//! A sidecar applies an event to its [`MeshState`] and rebuilds its routing
//! snapshot from it; it also persists the state so that a restart with the
//! control plane down still routes.
//!
//! JSON field names are camelCase like the YAML resources.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::resource::{Resource, ResourceKey};

/// Paths of the control plane's HTTP API (v1).
pub mod paths {
    pub const INSTANCES: &str = "/api/v1/instances";
    pub const WATCH: &str = "/api/v1/watch";
    pub const SERVICES: &str = "/api/v1/services";
    pub const RESOURCES: &str = "/api/v1/resources";
    pub const APPLY: &str = "/api/v1/apply";
    pub const REVISIONS: &str = "/api/v1/revisions";
    /// `GET`: `ok`; `GET /healthz?detail`: JSON with the store kind, the
    /// replica and etcd's health (`--store etcd`).
    pub const HEALTH: &str = "/healthz";
    /// `POST` a [`super::CertificateRequest`] (sidecar token of that
    /// service) → [`super::CertificateReply`].
    pub const CERTIFICATES: &str = "/api/v1/certificates";
    /// `GET` the CA's roots ([`super::CaStatus`], admin or viewer).
    pub const CA: &str = "/api/v1/ca";
    /// `POST` (admin): add a new root and sign new leaves with it
    /// ([`super::CaStatus`] after the change).
    pub const CA_ROTATE: &str = "/api/v1/ca/rotate";

    /// `PUT` target of a heartbeat.
    pub fn heartbeat(instance_id: &str) -> String {
        format!("{INSTANCES}/{instance_id}/heartbeat")
    }

    /// `DELETE` target of a graceful deregistration.
    pub fn instance(instance_id: &str) -> String {
        format!("{INSTANCES}/{instance_id}")
    }

    /// `POST` target of a sidecar's stats report.
    pub fn stats(instance_id: &str) -> String {
        format!("{INSTANCES}/{instance_id}/stats")
    }

    /// The dashboard's JSON API (`crate::dashboard` types).
    pub const DASHBOARD_SERVICES: &str = "/api/v1/dashboard/services";
    pub const DASHBOARD_TOPOLOGY: &str = "/api/v1/dashboard/topology";
    pub const DASHBOARD_POLICIES: &str = "/api/v1/dashboard/policies";
    pub const DASHBOARD_SERIES: &str = "/api/v1/dashboard/series";
    /// Server-sent events: `update` whenever something the dashboard shows
    /// changed.
    pub const DASHBOARD_EVENTS: &str = "/api/v1/dashboard/events";
}

/// Whether `id` is usable as an instance id: 1-253 characters from
/// `A-Z a-z 0-9 . _ -` (it appears in URL paths and in metrics).
pub fn valid_instance_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 253
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// A sidecar announcing its app instance (`POST /api/v1/instances`).
/// Registering an id that exists replaces it (a restarted sidecar).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Registration {
    /// Unique per instance; stable across restarts of the same instance.
    pub id: String,
    pub service: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// Where other sidecars reach this instance (its sidecar's inbound
    /// listener).
    pub address: SocketAddr,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The app's health as the sidecar's own probe last saw it.
    pub healthy: bool,
    /// What the app speaks (`--app-protocol`); `None`: whatever the
    /// original caller spoke.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_protocol: Option<AppProtocol>,
    /// What the instance is: a sidecar next to an app (the default, so
    /// sidecars that predate the field still register) or an ingress
    /// gateway (`sidecar --mode gateway`), the mesh's entry.
    #[serde(default)]
    pub role: InstanceRole,
}

/// What a registered instance is (`Registration::role`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InstanceRole {
    /// A sidecar in front of an app.
    #[default]
    Sidecar,
    /// An ingress gateway: no app; external clients enter the mesh here.
    Gateway,
}

impl InstanceRole {
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceRole::Sidecar => "sidecar",
            InstanceRole::Gateway => "gateway",
        }
    }
}

/// The protocol an app speaks on its port. Between sidecars every hop is
/// HTTP/2 over mTLS; the inbound sidecar speaks this to its app.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AppProtocol {
    /// HTTP/1.1 (and 1.0).
    Http1,
    /// HTTP/2 over cleartext with prior knowledge.
    H2c,
}

impl AppProtocol {
    pub fn as_str(self) -> &'static str {
        match self {
            AppProtocol::Http1 => "http1",
            AppProtocol::H2c => "h2c",
        }
    }
}

impl std::str::FromStr for AppProtocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "http1" => Ok(AppProtocol::Http1),
            "h2c" => Ok(AppProtocol::H2c),
            other => Err(format!("unknown app protocol {other:?}: use http1 or h2c")),
        }
    }
}

impl Registration {
    /// Checks what a sidecar may claim: a valid instance id, a service and
    /// namespace that are DNS-1123 labels (so never an outside host such as
    /// `example.com` or an IP address) and labels as in Kubernetes, within
    /// [`crate::limits`]. Returns the offending field (JSON name) and a
    /// message.
    pub fn validate(&self) -> Result<(), (String, String)> {
        if !valid_instance_id(&self.id) {
            return Err((
                "id".to_owned(),
                format!(
                    "{} is not a valid instance id: use 1-253 letters, digits, '.', '_' or '-'",
                    crate::limits::shown(&self.id)
                ),
            ));
        }
        crate::limits::validate_dns_label("service", &self.service)?;
        crate::limits::validate_dns_label("namespace", &self.namespace)?;
        crate::limits::validate_labels("labels", self.labels.iter())
    }
}

/// The control plane's answer to a registration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegistrationReply {
    /// How often the sidecar must send heartbeats.
    pub heartbeat_interval_ms: u64,
    /// An instance without a heartbeat for this long is removed.
    pub ttl_ms: u64,
    /// The revision that includes this registration.
    pub revision: u64,
}

/// `PUT /api/v1/instances/{id}/heartbeat`. The control plane answers 404
/// for an id it does not know (expired or never registered); the sidecar
/// then registers again.
///
/// Besides health, a heartbeat says what the sidecar runs and holds, for
/// `meshctl check` (issue 19): every field but `healthy` is optional, so a
/// heartbeat of an older sidecar is still accepted. (An older control
/// plane refuses the new fields: upgrade the control plane first.)
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Heartbeat {
    pub healthy: bool,
    /// The revision of the state the sidecar applied (its snapshot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<u64>,
    /// Whether its watch stream is open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watching: Option<bool>,
    /// The sidecar's version (`CARGO_PKG_VERSION`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// The sidecar's wall clock when it sent the heartbeat (Unix ms): the
    /// control plane compares it with its own to estimate clock skew.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent_at_ms: Option<u64>,
    /// When the sidecar's workload certificate expires (Unix ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_not_after_ms: Option<u64>,
}

impl Heartbeat {
    /// A heartbeat that says only whether the app is healthy.
    pub fn health(healthy: bool) -> Heartbeat {
        Heartbeat {
            healthy,
            ..Heartbeat::default()
        }
    }
}

/// A service and all of its registered endpoints, healthy or not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceEntry {
    pub name: String,
    pub namespace: String,
    pub endpoints: Vec<EndpointEntry>,
}

impl ServiceEntry {
    pub fn key(&self) -> ServiceKey {
        ServiceKey {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceKey {
    pub namespace: String,
    pub name: String,
}

/// One instance of a service as sidecars see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointEntry {
    pub address: SocketAddr,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Unhealthy endpoints are listed but get no traffic.
    pub healthy: bool,
    /// The registered instance id; `None` for static endpoints from a
    /// `Service` resource.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
    /// The SPIFFE id (`spiffe://TD/ns/NS/sa/SA`) this endpoint's sidecar
    /// must present: the control plane sets it from the registering
    /// sidecar's token. A caller with a workload certificate connects to an
    /// endpoint that has one over mTLS and refuses any other peer
    /// certificate; `None` (static endpoints, standalone sidecars): plain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
}

/// Everything a sidecar needs at one revision.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MeshState {
    /// Identity of the control plane's store (random, fixed when the store
    /// is created; 0 for a standalone config). A watcher resuming with an
    /// epoch that is not the control plane's held its revision from another
    /// store (one that was lost), so it gets a snapshot, never a delta.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub epoch: u64,
    pub revision: u64,
    /// Sorted by (namespace, name).
    pub services: Vec<ServiceEntry>,
    /// Every applied resource other than registrations (policies, static
    /// `Service`s), sorted by key.
    pub resources: Vec<Resource>,
    /// The mesh CA's trust bundle (PEM, one or more roots; two during a
    /// rotation). Empty for a standalone config.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub trust_roots: String,
}

/// What changed between `from_revision` and `revision`: changed or new
/// services and resources in full, removed ones by key.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MeshDelta {
    pub from_revision: u64,
    pub revision: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<ServiceEntry>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed_services: Vec<ServiceKey>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resources: Vec<Resource>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed_resources: Vec<ResourceKey>,
    /// The new trust bundle, when it changed in this revision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust_roots: Option<String>,
}

/// One line of the watch stream (newline-delimited JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum WatchEvent {
    /// The whole state; replaces whatever the watcher held.
    Snapshot(MeshState),
    /// Changes on top of the revision the watcher holds.
    Delta(MeshDelta),
    /// Sent when nothing changed for a while, so that a watcher can tell a
    /// quiet control plane from a dead connection.
    Keepalive { revision: u64 },
    /// The live taps (`meshctl tap`), all of them, each time the set
    /// changes (and once when the stream opens). Sent only to a watcher
    /// that asked with the [`crate::tap::WATCH_TAPS_HEADER`] header, so an
    /// older sidecar never sees this event.
    Taps { taps: Vec<crate::tap::TapDirective> },
}

/// Why an event could not be applied: the watcher must reconnect and ask
/// for a full snapshot.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("delta from revision {delta_from} does not apply to revision {held}")]
pub struct RevisionGap {
    pub held: u64,
    pub delta_from: u64,
}

impl MeshState {
    /// Applies one watch event. A snapshot replaces the state; a delta must
    /// start at the held revision; a keepalive changes nothing. Returns
    /// whether the state changed.
    pub fn apply(&mut self, event: WatchEvent) -> Result<bool, RevisionGap> {
        match event {
            WatchEvent::Snapshot(state) => {
                let changed = *self != state;
                *self = state;
                Ok(changed)
            }
            WatchEvent::Keepalive { .. } | WatchEvent::Taps { .. } => Ok(false),
            WatchEvent::Delta(delta) => {
                if delta.from_revision != self.revision {
                    return Err(RevisionGap {
                        held: self.revision,
                        delta_from: delta.from_revision,
                    });
                }
                let mut services: BTreeMap<ServiceKey, ServiceEntry> =
                    std::mem::take(&mut self.services)
                        .into_iter()
                        .map(|s| (s.key(), s))
                        .collect();
                for key in delta.removed_services {
                    services.remove(&key);
                }
                for service in delta.services {
                    services.insert(service.key(), service);
                }
                self.services = services.into_values().collect();
                let mut resources: BTreeMap<ResourceKey, Resource> =
                    std::mem::take(&mut self.resources)
                        .into_iter()
                        .map(|r| (r.key(), r))
                        .collect();
                for key in delta.removed_resources {
                    resources.remove(&key);
                }
                for resource in delta.resources {
                    resources.insert(resource.key(), resource);
                }
                self.resources = resources.into_values().collect();
                if let Some(roots) = delta.trust_roots {
                    self.trust_roots = roots;
                }
                self.revision = delta.revision;
                Ok(true)
            }
        }
    }

    /// The state a standalone sidecar builds from its `--config` file:
    /// `Service` resources become services with healthy endpoints, the rest
    /// are kept as resources.
    pub fn from_resources(resources: &[Resource]) -> MeshState {
        let mut services = Vec::new();
        let mut others = Vec::new();
        for resource in resources {
            match resource {
                Resource::Service(doc) => services.push(ServiceEntry {
                    name: doc.metadata.name.clone(),
                    namespace: doc.metadata.namespace.clone(),
                    endpoints: doc
                        .spec
                        .endpoints
                        .iter()
                        .map(|ep| EndpointEntry {
                            address: ep.address,
                            labels: ep.labels.clone(),
                            healthy: true,
                            instance_id: None,
                            identity: None,
                        })
                        .collect(),
                }),
                other => others.push(other.clone()),
            }
        }
        services.sort_by_key(ServiceEntry::key);
        others.sort_by_key(Resource::key);
        MeshState {
            epoch: 0,
            revision: 0,
            services,
            resources: others,
            trust_roots: String::new(),
        }
    }
}

/// A sidecar asking for its workload certificate (`POST
/// /api/v1/certificates`, with its sidecar token). The key stays in the
/// sidecar; only the CSR travels. The control plane ignores any name in
/// the CSR and signs the SPIFFE id it derives from the token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CertificateRequest {
    /// The registering instance (so the control plane knows which leaf is
    /// whose, for `describe` and for retiring an old root).
    pub instance_id: String,
    /// PKCS#10 CSR, PEM.
    pub csr: String,
}

/// The signed workload certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertificateReply {
    /// `spiffe://TD/ns/NS/sa/SA`, the leaf's only SAN.
    pub identity: String,
    /// The leaf, PEM (signed directly by a root of `trust_roots`).
    pub certificate: String,
    /// The trust bundle at signing time (PEM).
    pub trust_roots: String,
    /// The leaf's serial number, lowercase hex.
    pub serial: String,
    /// Unix milliseconds.
    pub not_before_ms: u64,
    pub not_after_ms: u64,
}

/// One root of the mesh CA (`GET /api/v1/ca`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CaRoot {
    pub subject: String,
    /// Lowercase hex.
    pub serial: String,
    /// SHA-256 of the DER certificate, lowercase hex.
    pub fingerprint: String,
    pub not_after_ms: u64,
    /// New leaves are signed by this root (exactly one root signs).
    pub signing: bool,
    /// Unexpired leaves it signed that are still their instance's newest.
    pub live_leaves: usize,
}

/// The CA as the control plane holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CaStatus {
    pub trust_domain: String,
    pub workload_cert_ttl_ms: u64,
    pub roots: Vec<CaRoot>,
    /// A rotation in progress, in words (its phase and what it waits for);
    /// `None` outside a rotation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation: Option<String>,
}

/// A service as `GET /api/v1/services` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSummary {
    pub name: String,
    pub namespace: String,
    pub instances: usize,
    pub healthy: usize,
}

/// One registered instance with what the registry knows about it
/// (`GET /api/v1/services/{namespace}/{name}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InstanceInfo {
    pub id: String,
    pub address: SocketAddr,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub healthy: bool,
    /// Unix time in milliseconds of the registration.
    pub registered_at_ms: u64,
    /// Milliseconds since the last heartbeat, as the control plane answers.
    pub last_heartbeat_ms_ago: u64,
    /// The SPIFFE id its sidecar presents (see [`EndpointEntry::identity`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_protocol: Option<AppProtocol>,
    /// A sidecar or a gateway ([`Registration::role`]).
    #[serde(default)]
    pub role: InstanceRole,
    /// The newest workload certificate issued to this instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<IssuedLeaf>,
}

/// A workload certificate as the control plane remembers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IssuedLeaf {
    pub serial: String,
    pub not_after_ms: u64,
    /// Fingerprint of the root that signed it ([`CaRoot::fingerprint`]).
    pub root: String,
}

/// `GET /api/v1/services/{namespace}/{name}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceDetail {
    pub name: String,
    pub namespace: String,
    pub instances: Vec<InstanceInfo>,
    /// Static endpoints from an applied `Service` resource, if any.
    #[serde(default)]
    pub static_endpoints: Vec<EndpointEntry>,
    /// Applied policies that target this service.
    #[serde(default)]
    pub policies: Vec<Resource>,
}

/// One file of a `meshctl apply -f` request (`POST /api/v1/apply`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ApplyFile {
    /// The name errors refer to (as the user typed it).
    pub name: String,
    /// The YAML text.
    pub text: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ApplyRequest {
    pub files: Vec<ApplyFile>,
    /// Who applied (shown by `meshctl history`); meshctl sends `$USER@host`.
    #[serde(default)]
    pub actor: Option<String>,
}

/// What an apply did to one resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ApplyAction {
    Created,
    Configured,
    Unchanged,
}

impl std::fmt::Display for ApplyAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ApplyAction::Created => "created",
            ApplyAction::Configured => "configured",
            ApplyAction::Unchanged => "unchanged",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApplyOutcome {
    pub key: ResourceKey,
    pub action: ApplyAction,
}

/// `POST /api/v1/apply` answer: the revision the apply created (the
/// current one when nothing changed) and one outcome per resource.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApplyReply {
    pub revision: u64,
    pub outcomes: Vec<ApplyOutcome>,
}

/// One entry of `GET /api/v1/revisions` (newest first).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RevisionRecord {
    pub revision: u64,
    /// Unix time in milliseconds.
    pub at_ms: u64,
    /// `registry` for registrations, heartbeats' health changes and
    /// expiries; the applying user otherwise.
    pub actor: String,
    /// One line per change, e.g. `registered orders/orders-1 at 127.0.0.1:8081`.
    pub changes: Vec<String>,
}

/// `POST /api/v1/instances/{id}/stats`: what a sidecar observed since its
/// previous accepted report (counters are deltas, never totals). The
/// control plane answers 204, or 404 for an instance it does not know (the
/// sidecar keeps the deltas for its next report).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct StatsReport {
    /// The time the deltas cover, in milliseconds.
    pub interval_ms: u64,
    #[serde(default)]
    pub routes: Vec<RouteStats>,
    /// Every circuit breaker of the sidecar now (states, not deltas).
    #[serde(default)]
    pub breakers: Vec<BreakerReport>,
    #[serde(default)]
    pub rate_limited: Vec<RateLimitReport>,
    /// Requests a dry-run policy would have refused since the previous
    /// report (they were sent).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub would_refuse: Vec<WouldRefuseReport>,
}

/// The requests of one route (`request_total` and `response_time_seconds`
/// of one `direction, destination, endpoint` label set) in a report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RouteStats {
    pub direction: StatsDirection,
    /// The `destination` label: a service (`name`, `name.namespace`
    /// outside `default`), `passthrough` or `unknown`; inbound: the own
    /// service.
    pub destination: String,
    pub endpoint: String,
    pub requests: u64,
    /// Requests answered with a status >= 500, or with none (status 0).
    pub errors: u64,
    /// Upper bounds of the latency buckets, in milliseconds, ascending.
    pub latency_buckets_ms: Vec<f64>,
    /// Requests per bucket (not cumulative): `latency_counts[i]` took at
    /// most `latency_buckets_ms[i]` and more than the bound before it;
    /// one more count at the end for those above the last bound.
    pub latency_counts: Vec<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum StatsDirection {
    Inbound,
    Outbound,
}

/// One circuit breaker (a `CircuitBreakerPolicy` on one endpoint of the
/// destination) of the reporting sidecar.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BreakerReport {
    pub destination: String,
    pub policy: String,
    pub address: SocketAddr,
    pub state: BreakerState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

/// Requests a `RateLimitPolicy` of the reporting sidecar refused since the
/// previous report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RateLimitReport {
    pub policy: String,
    pub refused: u64,
}

/// Requests one dry-run policy (`mode: dryRun`) of the reporting sidecar
/// would have refused since the previous report, by reason
/// (`meshlet_policy_would_refuse_total`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WouldRefuseReport {
    /// The policy's kind (`RateLimitPolicy`, `CircuitBreakerPolicy`,
    /// `AuthorizationPolicy`), namespace and name.
    pub kind: String,
    pub namespace: String,
    pub policy: String,
    /// `rate_limited`, `circuit_open`, `overflow` or `denied`.
    pub reason: String,
    pub count: u64,
}

/// The body of every error answer of the API: `{"error": "..."}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    pub error: String,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn default_namespace() -> String {
    "default".to_owned()
}

/// Response header naming the control-plane replica that answered
/// (`--store etcd`, where several replicas serve the same mesh).
pub const REPLICA_HEADER: &str = "x-meshlet-replica";

/// On a mesh-wide read with several replicas (the trace API, the
/// dashboard's data): the replicas whose part is missing because they did
/// not answer within the peer timeout, comma-separated. Absent when the
/// answer is whole.
pub const PARTIAL_HEADER: &str = "x-meshlet-partial";

/// On a mesh-wide read with several replicas: how many live replicas'
/// data the answer merges, `ANSWERED/LIVE` (this replica included).
pub const MERGED_HEADER: &str = "x-meshlet-merged";

#[cfg(test)]
mod tests {
    use super::*;

    fn registration(service: &str, namespace: &str) -> Registration {
        Registration {
            id: "orders-1".into(),
            service: service.into(),
            namespace: namespace.into(),
            address: SocketAddr::from(([127, 0, 0, 1], 15006)),
            labels: [("version".to_owned(), "v1".to_owned())].into(),
            healthy: true,
            app_protocol: None,
            role: InstanceRole::Sidecar,
        }
    }

    #[test]
    fn registrations_claim_mesh_names_only() {
        assert_eq!(registration("orders", "default").validate(), Ok(()));
        assert_eq!(registration(&"a".repeat(63), "shop-2").validate(), Ok(()));
        for bad in [
            "example.com",
            "127.0.0.2",
            "Orders",
            "a_b",
            "",
            "-x",
            &"a".repeat(64),
        ] {
            let (field, message) = registration(bad, "default").validate().unwrap_err();
            assert_eq!(field, "service", "{bad}");
            assert!(message.contains("lower-case letters"), "{bad}: {message}");
            let (field, _) = registration("orders", bad).validate().unwrap_err();
            assert_eq!(field, "namespace", "{bad}");
        }
        let (_, message) = registration("example.com", "default")
            .validate()
            .unwrap_err();
        assert!(
            message.contains("neither a host name nor an IP address"),
            "{message}"
        );
    }

    #[test]
    fn registration_ids_and_labels_are_checked() {
        let mut reg = registration("orders", "default");
        reg.id = "a/b".into();
        assert_eq!(reg.validate().unwrap_err().0, "id");
        reg.id = "x".repeat(254);
        let (field, message) = reg.validate().unwrap_err();
        assert_eq!(field, "id");
        assert!(message.len() < 300, "{message}");

        let mut reg = registration("orders", "default");
        reg.labels = (0..crate::limits::MAX_LABELS)
            .map(|i| (format!("app.kubernetes.io/k{i}"), "v".to_owned()))
            .collect();
        assert_eq!(reg.validate(), Ok(()));
        reg.labels.insert("one-more".into(), "v".into());
        assert_eq!(
            reg.validate(),
            Err((
                "labels".to_owned(),
                "65 labels; limit: 64 (MAX_LABELS)".to_owned()
            ))
        );
        let mut reg = registration("orders", "default");
        reg.labels.insert("version".into(), "v 2".into());
        assert_eq!(reg.validate().unwrap_err().0, "labels.version");
    }

    fn service(name: &str, ports: &[u16]) -> ServiceEntry {
        ServiceEntry {
            name: name.into(),
            namespace: "default".into(),
            endpoints: ports
                .iter()
                .map(|p| EndpointEntry {
                    address: SocketAddr::from(([127, 0, 0, 1], *p)),
                    labels: BTreeMap::new(),
                    healthy: true,
                    instance_id: Some(format!("{name}-{p}")),
                    identity: None,
                })
                .collect(),
        }
    }

    #[test]
    fn delta_applies_on_its_base_revision_only() {
        let mut state = MeshState {
            epoch: 1,
            revision: 3,
            services: vec![service("a", &[1]), service("b", &[2])],
            resources: vec![],
            trust_roots: String::new(),
        };
        let delta = WatchEvent::Delta(MeshDelta {
            from_revision: 3,
            revision: 5,
            services: vec![service("c", &[3]), service("a", &[1, 4])],
            removed_services: vec![service("b", &[]).key()],
            ..Default::default()
        });
        assert_eq!(state.apply(delta.clone()), Ok(true));
        assert_eq!(state.revision, 5);
        let names: Vec<_> = state.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["a", "c"]);
        assert_eq!(state.services[0].endpoints.len(), 2);
        assert_eq!(
            state.apply(delta),
            Err(RevisionGap {
                held: 5,
                delta_from: 3
            })
        );
    }

    #[test]
    fn events_round_trip_as_json_lines() {
        let event = WatchEvent::Snapshot(MeshState {
            epoch: 42,
            revision: 7,
            services: vec![service("a", &[1])],
            resources: crate::parse_documents(
                "t",
                "apiVersion: meshlet.dev/v1alpha1\nkind: HealthCheckPolicy\nmetadata: {name: a}\nspec: {targetRef: {service: a}, interval: 200ms}\n",
            )
            .unwrap(),
            trust_roots: String::new(),
        });
        let line = serde_json::to_string(&event).unwrap();
        assert!(!line.contains('\n'));
        assert!(
            line.starts_with(r#"{"type":"snapshot","epoch":42,"revision":7"#),
            "{line}"
        );
        let back: WatchEvent = serde_json::from_str(&line).unwrap();
        assert_eq!(back, event);
        let keepalive: WatchEvent =
            serde_json::from_str(r#"{"type":"keepalive","revision":7}"#).unwrap();
        assert_eq!(keepalive, WatchEvent::Keepalive { revision: 7 });
    }
}
