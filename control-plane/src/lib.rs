//! meshlet's control plane and its command-line client, `meshctl`.
//!
//! Control plane (binary `control-plane`), data flow:
//!
//! ```text
//! HTTP (api) ─► controller (one writer) ─► registry plans a revision
//!                    │                      store commits it (redb)
//!                    │                      registry applies it
//!                    └─► push: Published revision on a watch channel ─► watch streams
//! ```
//!
//! - [`server`]: settings, startup and graceful shutdown of the binary.
//! - [`api`]: axum routes. [`controller`]: the writer and the reaper.
//! - [`registry`]: in-memory state and the plans that change it.
//! - [`store`]: durable state (redb) behind a trait.
//! - [`push`]: published revisions, deltas, watch streams.
//! - [`traces`]: the OTLP/HTTP receiver and the in-memory trace store
//!   (`/v1/traces`, `/api/traces`). [`metrics`]: `/metrics`, read at
//!   scrape time.
//! - [`stats`]: the sidecars' stats reports (last 5 minutes, in memory)
//!   and their aggregations; [`dashboard`]: the dashboard's JSON API and
//!   the stats endpoint; [`events`]: its server-sent update events.
//! - [`ui`]: the dashboard page (`control-plane/ui/`, embedded), at `/`.
//! - [`error`]: error types.
//!
//! meshctl (binary `meshctl`): [`validate`] (offline checks), [`client`]
//! (a small HTTP client on hyper), [`commands`] (get services/endpoints,
//! describe service, apply, broadcast), [`pipeline`] (get/describe of
//! resource kinds, delete, diff, history, rollback), [`traceview`]
//! (traces, trace) and [`output`] (tables, JSON, YAML). [`wire`] holds the API types of delete, diff,
//! rollback and resource details; [`diff`] the line diff.

pub mod api;
pub mod client;
pub mod commands;
pub mod controller;
pub mod dashboard;
pub mod diff;
pub mod error;
pub mod events;
pub mod inject;
pub mod metrics;
pub mod output;
pub mod pipeline;
pub mod push;
pub mod registry;
pub mod server;
pub mod stats;
pub mod store;
pub mod traces;
pub mod traceview;
pub mod ui;
pub mod validate;
