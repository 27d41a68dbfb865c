//! meshlet's user-facing resources and the wire types of its control plane.
//!
//! - [`resource`]: the Kubernetes-style YAML kinds users write (`Service`
//!   and the policies) and [`policy`]: the policies' specs, defaults and
//!   checks.
//! - [`parse_documents`]: the one parser that turns a multi-document YAML
//!   file into typed, validated resources (strict serde with unknown fields
//!   rejected; errors carry file, document, line, column and field path),
//!   then semantic validation ([`Resource::validate`]).
//! - [`mesh`]: what the control plane, sidecars and meshctl exchange
//!   (registration, heartbeats, the revisioned watch stream, stats
//!   reports, API answers); [`changes`]: what only the control plane and
//!   meshctl speak (delete, diff, rollback, each resource's last change);
//!   [`traces`]: the trace API's answers; [`dashboard`]: the dashboard
//!   API's answers; [`check`]: what `meshctl check` reads
//!   (`/api/v1/check`); [`tap`]: live request taps (`meshctl tap`): the
//!   filter, the directive pushed to sidecars and the events they send.
//! - [`access`]: token management and log-in wire types, and the names of
//!   the bootstrap files (`admin.token`, `ca.crt`) in the data directory.
//! - [`identity`]: workload identities (`spiffe://TD/ns/NS/sa/SA`), shared
//!   by the control plane's CA and the sidecars' peer checks.
//! - [`zero_trust`]: the `MTLSPolicy` and `AuthorizationPolicy` specs
//!   (enforced by the target's sidecar against verified identities).
//! - [`route`]: the `Route` kind (HTTP routing by host, path, headers,
//!   query and method for a gateway or for the callers of a service;
//!   filters, weighted backends with label subsets, mirrors).
//! - [`fault`]: the `FaultInjectionPolicy` spec (delays and aborts the
//!   callers' sidecars inject).
//! - [`display`]: how meshctl and the dashboard word services and
//!   resources (one-line summaries).
//! - [`inject`]: sidecar injection of Kubernetes workloads, shared by
//!   `meshctl inject` (YAML files) and the control plane's admission
//!   webhook (`AdmissionReview` in, [`json_patch`] out).
//! - [`otlp`]: the subset of OpenTelemetry's OTLP trace messages that
//!   sidecars export and the control plane receives (protobuf).
//!
//! The sidecar (standalone `--config`), the control plane and meshctl all
//! use this crate, so a file that one accepts the others accept too, and
//! the two ends of the API cannot disagree on its types.
//!
//! **Invariant:** nothing here does I/O or knows about networking (no
//! runtime, no HTTP, no storage); it only describes and checks data.

pub mod access;
pub mod changes;
pub mod check;
pub mod dashboard;
pub mod display;
mod duration;
pub mod fault;
pub mod identity;
pub mod inject;
pub mod json_patch;
pub mod limits;
pub mod mesh;
pub mod otlp;
mod parse;
pub mod policy;
pub mod resource;
pub mod route;
pub mod tap;
pub mod traces;
pub mod zero_trust;

pub use duration::HumanDuration;
pub use parse::{parse_documents, ParseError};
pub use policy::{HealthCheckSpec, RouteMatch, TargetRef};
pub use resource::{AuthorizationPolicy, FaultInjectionPolicy, MtlsPolicy, Route};
pub use resource::{
    CircuitBreakerPolicy, EndpointSpec, HealthCheckPolicy, ObjectMeta, RateLimitPolicy, Resource,
    ResourceKey, RetryPolicy, ServiceResource, ServiceSpec, TimeoutPolicy, TracingPolicy,
    TrafficSplit, API_VERSION, KNOWN_KINDS,
};
