//! meshlet's control plane (binary `control-plane`): the service registry,
//! the applied resources in a durable store, every change numbered as a
//! revision and pushed to every sidecar; also the OTLP trace receiver and
//! store, the sidecars' stats and the dashboard. Its command-line client,
//! `meshctl`, is a crate of its own that speaks only the HTTP API; the
//! types both sides share are in `meshlet_api`.
//!
//! Data flow:
//!
//! ```text
//! HTTP (api) ─► controller (one writer) ─► registry plans a revision
//!                    │                      store commits it (redb)
//!                    │                      registry applies it
//!                    └─► push: Published revision on a watch channel ─► watch streams
//! ```
//!
//! - [`server`]: settings, logging, startup and graceful shutdown
//!   (`run(listener, settings, shutdown)`).
//! - [`api`]: the axum routes and thin handlers; [`state`]: what every
//!   handler shares; `extract`: strict body and query decoding.
//! - [`controller`]: the one writer and the reaper; [`expiry`]: the
//!   reaper's self-preservation (expiry pauses when most instances go
//!   silent at once). `registry`: in-memory state and the plans that
//!   change it; `instances`: the instances by id in shards shared between
//!   revisions; `diff`: the line diff of
//!   `/api/v1/diff`.
//! - [`store`]: durable state (redb) behind a trait.
//! - `push`: published revisions, deltas, watch streams.
//! - [`traces`]: the OTLP/HTTP receiver and the in-memory trace store
//!   (`/v1/traces`, `/api/traces`). `metrics`: `/metrics`, read at scrape
//!   time.
//! - `stats`: the sidecars' stats reports (last 5 minutes, in memory) and
//!   their aggregations; `dashboard`: the dashboard's JSON API and the
//!   stats endpoint; `events`: its server-sent update events; `ui`: the
//!   dashboard page (`control-plane/ui/`, embedded), at `/`.
//! - [`error`]: error types. `clock`: the wall clock in milliseconds.
//! - Security (issue 13): `access` (the guard in front of every route:
//!   Host names, credentials, the route's gate; log-in sessions),
//!   [`auth`] (tokens, roles, instance owners, `admin.token`),
//!   `token_routes` (`/api/v1/tokens`), [`ca`] (the mesh CA and the server
//!   certificate), [`files`] (private data dir and files), `listener`
//!   (the HTTPS accept loop with connection caps and deadlines).
//! - Zero trust (issue 14): `workload` (workload certificates signed from
//!   sidecars' CSRs, the newest leaf per instance, CA rotation in three
//!   phases pushed as trust-bundle revisions) and `cert_routes`
//!   (`/api/v1/certificates`, `/api/v1/ca`, `/api/v1/ca/rotate`).
//! - Operating (issue 19): `webhook` (the mutating admission webhook
//!   `POST /inject`: `meshlet_api::inject` behind an AdmissionReview).
//!
//! - Operating the mesh (issue 19): `check` (`/api/v1/check`, what
//!   `meshctl check` judges: liveness, acknowledged revisions, versions,
//!   clock skew, the store and the CA), [`tap`] (live taps: sessions and
//!   the directives pushed on the watch streams) and `tap_routes` (the tap
//!   stream to `meshctl tap` and the sidecars' events).
//!
//! Public modules are those the binary and the integration tests use,
//! plus [`auth`] (its types are in the [`store::Store`] trait), [`ca`]
//! (the CA, its roots and signing) and [`files`]
//! (to be shared with the sidecar).

pub(crate) mod access;
pub mod api;
pub mod auth;
pub mod ca;
#[cfg(test)]
mod cancelled_request_tests;
pub(crate) mod cert_routes;
pub(crate) mod check;
pub(crate) mod clock;
pub mod controller;
pub(crate) mod dashboard;
pub(crate) mod diff;
pub mod error;
pub(crate) mod events;
pub mod expiry;
pub(crate) mod extract;
pub mod files;
pub(crate) mod instances;
pub(crate) mod listener;
pub(crate) mod metrics;
pub(crate) mod peers;
pub(crate) mod push;
pub(crate) mod registry;
pub(crate) mod rotation;
pub mod server;
pub mod state;
pub(crate) mod stats;
pub mod store;
pub mod tap;
pub(crate) mod tap_routes;
pub(crate) mod token_routes;
pub mod traces;
pub(crate) mod ui;
pub(crate) mod webhook;
pub(crate) mod workload;
