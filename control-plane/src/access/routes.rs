//! The gate of every API route, in one table: public, or the [`Action`] a
//! caller's role must allow (`Principal::may`). Routes about one instance
//! (register, heartbeat, deregister, certificates) let admins and sidecars
//! through here; their handlers then check the namespace/service the token
//! is bound to and who holds the instance id (certificates go to sidecar
//! tokens only: the identity is the token's binding).
//! `GET /api/v1/ca` is `ReadCa` (admin, viewer), `POST /api/v1/ca/rotate`
//! `RotateCa` (admin). `GET /api/v1/check` is `ReadRegistry` (admin,
//! viewer); `GET /api/v1/tap` is `Tap` (admin, viewer; sidecars refused),
//! `POST /api/v1/tap/{id}/events` `ReportTap` (sidecars, admins).
//! `/api/v1/peer/*` (mesh-wide reads between replicas) is `Peer`: the peer
//! credential only.
//!
//! A path no route matched (`None`) still needs a credential, so an
//! unauthenticated caller learns nothing, not even which paths exist.

use meshlet_api::mesh::paths;

use crate::auth::{Action, Denied, Principal, Role};

/// What a route requires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// No credential: `/healthz`, the log-in, the page's static files, the
    /// admission webhook `/inject`.
    Public,
    /// Any authenticated caller (paths no route matched).
    Authenticated,
    /// A caller whose role allows this action.
    Action(Action<'static>),
    /// An admin, or a sidecar for the instance's own service (checked
    /// again by the handler, which knows the service).
    Instance,
    /// Another control-plane replica of this mesh, with the peer
    /// credential (`peers::credential`) and nothing else: the guard checks
    /// it before (and instead of) any token or session.
    Peer,
}

impl Gate {
    pub fn check(&self, principal: &Principal) -> Result<(), Denied> {
        match self {
            Gate::Public | Gate::Authenticated => Ok(()),
            // The guard answers a peer route itself; no principal passes.
            Gate::Peer => Err(Denied {
                principal: principal.name.clone(),
                role: principal.role.to_string(),
                action: "peer-read".to_owned(),
                reason: "only another control-plane replica may use this route",
            }),
            Gate::Action(action) => principal.may(*action),
            Gate::Instance => match principal.role {
                Role::Admin | Role::Sidecar { .. } => Ok(()),
                Role::Viewer => Err(Denied {
                    principal: principal.name.clone(),
                    role: principal.role.to_string(),
                    action: "change-instance".to_owned(),
                    reason: "a viewer token may only read",
                }),
            },
        }
    }
}

/// Route patterns that `meshlet_api` has no constant for (the session and
/// token paths come from `meshlet_api::access::paths`).
pub mod extra_paths {
    pub use meshlet_api::access::paths::{SESSION, TOKENS};
    pub const TOKEN: &str = "/api/v1/tokens/{name}";
    pub const OTLP_TRACES: &str = "/v1/traces";
    pub const TRACES: &str = "/api/traces";
    pub const TRACE: &str = "/api/traces/{id}";
    pub const METRICS: &str = "/metrics";
    pub use meshlet_api::check::paths::CHECK;
    pub use meshlet_api::tap::paths::TAP;
    pub const TAP_EVENTS: &str = "/api/v1/tap/{id}/events";
}

/// The gate of the route pattern `path` (axum's matched path,
/// e.g. `/api/v1/instances/{id}`), `None` when no route matched.
pub fn gate(path: Option<&str>) -> Gate {
    use extra_paths::*;
    let Some(path) = path else {
        return Gate::Authenticated;
    };
    match path {
        paths::HEALTH | "/ui/app.js" | "/ui/app.css" | "/ui/login.js" => Gate::Public,
        // Log-in checks the token in its body; log-out only ends the
        // caller's own session.
        SESSION => Gate::Public,
        // The admission webhook: the Kubernetes API server calls it with no
        // meshlet credential; it only computes a patch from the body and
        // changes nothing (see webhook.rs).
        meshlet_api::inject::admission::PATH => Gate::Public,
        "/"
        | paths::DASHBOARD_SERVICES
        | paths::DASHBOARD_TOPOLOGY
        | paths::DASHBOARD_POLICIES
        | paths::DASHBOARD_SERIES
        | paths::DASHBOARD_EVENTS => Gate::Action(Action::Dashboard),
        paths::INSTANCES
        | "/api/v1/instances/{id}"
        | "/api/v1/instances/{id}/heartbeat"
        | paths::CERTIFICATES => Gate::Instance,
        // The CA's roots and leaves: a read of mesh state.
        paths::CA => Gate::Action(Action::ReadCa),
        // A new root, pushed to every sidecar: admins only.
        paths::CA_ROTATE => Gate::Action(Action::RotateCa),
        "/api/v1/instances/{id}/stats" => Gate::Action(Action::ReportStats),
        paths::WATCH => Gate::Action(Action::Watch),
        // `meshctl check`'s data: a read of the registry.
        paths::SERVICES | "/api/v1/services/{namespace}/{name}" | METRICS | CHECK => {
            Gate::Action(Action::ReadRegistry)
        }
        paths::RESOURCES | paths::REVISIONS | "/api/v1/resources/info" | "/api/v1/diff" => {
            Gate::Action(Action::ReadResources)
        }
        paths::APPLY | "/api/v1/delete" | "/api/v1/rollback" => {
            Gate::Action(Action::WriteResources)
        }
        OTLP_TRACES => Gate::Action(Action::ExportSpans),
        // `meshctl tap`: admins (with header values) and viewers (redacted);
        // sidecar tokens are refused.
        TAP => Gate::Action(Action::Tap),
        // Tapped sidecars' events: sidecars (for their own service, checked
        // by the handler) and admins.
        TAP_EVENTS => Gate::Action(Action::ReportTap),
        TRACES | TRACE => Gate::Action(Action::ReadTraces),
        TOKENS | TOKEN => Gate::Action(Action::ManageTokens),
        // Mesh-wide reads between replicas (`peers::routes`).
        crate::peers::paths::TRACES
        | crate::peers::paths::TRACE
        | crate::peers::paths::STATS
        | crate::peers::paths::TAP_EVENTS => Gate::Peer,
        // A route added without a gate here: admins only, until it gets one.
        _ => Gate::Action(Action::ManageTokens),
    }
}
