//! End-to-end test harness: sidecars and control planes on free loopback
//! ports, real upstream servers (in-process hyper servers on real
//! sockets), and small clients.
//!
//! A test reads like a sentence:
//!
//! ```text
//! let app = Upstream::start("orders").await;
//! let sidecar = Sidecar::builder("orders", app.port()).start().await;
//! let response = client::get(sidecar.inbound, "/").await;
//! ```
//!
//! ## The control plane's credentials
//!
//! A control plane serves HTTPS only and wants a bearer token on every
//! route but `/healthz` (issue 13). Both kinds dereference to a
//! [`CpAccess`]: `cp.url()` is `https://127.0.0.1:PORT`, `cp.ca_file()` and
//! `cp.admin_token()` come from its data dir (start waits for them),
//! `cp.client()` is a `meshlet_client::Client` with the CA and the admin
//! token, `cp.get_json(path)` / `cp.post_json(..)` / `cp.call(..)` use it,
//! and `cp.sidecar_token_file(ns, service)` issues a sidecar token into a
//! 0600 file. `.control_plane(&cp)` on a sidecar builder passes
//! `--control-plane URL --token-file F --ca-file CA`; [`meshctl`] sets
//! `MESHLET_SERVER`, `MESHLET_TOKEN` and `MESHLET_CA_FILE`.
//!
//! ## In-process or a process
//!
//! Two harnesses with the same builder API (`builder(service, app_port)`,
//! `.config(yaml)`, `.arg(..)`, `.control_plane(&cp)`, `.start().await`;
//! `ControlPlane*::start(data_dir, args)`, `url`, `apply`, `get_json`,
//! `restart`, `kill9`, ...), so moving a test between them is changing a
//! type:
//!
//! - [`inprocess::Sidecar`] and [`inprocess::ControlPlane`] run the
//!   libraries' `run` functions inside the test process, on real loopback
//!   sockets, each on its own runtime thread (see [`inprocess`] for why).
//!   Routing, balancing, protocols, malformed requests, policies, metrics,
//!   trace context, the control plane's registry/health/restart scenarios
//!   and the dashboard's JSON API use them. They start in milliseconds
//!   and need no `cargo build --bins` (only `meshctl`, which tests still
//!   run as the real CLI).
//! - [`SidecarProcess`] and [`ControlPlaneProcess`] spawn the real binaries.
//!   Kept for what only a process has: its log (stderr) and standard
//!   output (the access log), exit codes, signals (SIGTERM drain and
//!   deregistration, SIGHUP reload), memory (RSS: streaming, a hung
//!   collector, the push benchmark's report), environment variables
//!   (`MESHLET_*`), and whole-program set-ups: `lifecycle.rs`,
//!   `transparent.rs` (network namespaces, iptables), `dashboard.rs` (a
//!   browser against the demo mesh), `meshctl.rs` (the CLI), `manifests.rs`,
//!   and the demo app ([`demo::DemoService`]).
//!
//! **Process-global state** (checked so that several in-process
//! instances can share one process): none that breaks it. The global
//! `tracing` subscriber and the signal handlers are installed by the
//! binaries' `main` only (so in-process instances log nothing); a
//! sidecar's metrics registry is its own and the control plane builds its
//! metrics per scrape; `clap` reads `MESHLET_*` variables from
//! the test's environment exactly as a spawned binary inherits them (tests
//! never set them in-process); the default snapshot file is under
//! `$TMPDIR` (the harness always passes `--snapshot-file`) and the control
//! plane's default data dir is relative to the current directory (the
//! harness always passes `--data-dir`). The only statics are a process-wide
//! monotonic epoch in the balancer (relative times only) and the
//! `std::process::id()` in temporary file names and the store's random
//! epoch seed, all harmless when shared. The one exclusive resource is
//! the control plane's redb file: a restart on the same data dir first
//! drops the old instance's runtime (which closes the database), as a
//! process restart first waits for the old process to die.
//!
//! Binaries (for the process harness and `meshctl`) are found next to the
//! test executable's `deps/` folder (`target/<profile>/sidecar`) or in
//! `$MESHLET_BIN_DIR`; the test command builds them first (`cargo build
//! --bins` before `cargo test`). Waiting is always on a condition with a
//! deadline ([`wait::until`]), never a bare sleep.
//!
//! [`demo::DemoService`] is one app of the demo mesh with its sidecar;
//! [`browser::Browser`] drives a headless chromium over the DevTools
//! protocol (the dashboard test).

pub mod access;
pub mod admin;
pub mod browser;
pub mod client;
pub mod collector;
pub mod config;
pub mod demo;
pub mod etcd;
pub mod inprocess;
pub mod k8s;
pub mod layout;
pub mod metrics;
pub mod mtls;
pub mod netns;
pub mod process;
pub mod scale;
pub mod stats;
pub mod traffic;
pub mod upstream;
pub mod wait;

pub use access::{ControlPlaneRef, CpAccess, SidecarCredentials};
pub use process::{
    meshctl, meshctl_with, ControlPlaneProcess, SidecarBuilder, SidecarProcess, TempDir,
};
pub use upstream::Upstream;
