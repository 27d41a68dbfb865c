//! End-to-end test harness: real `sidecar` processes on free loopback ports,
//! real upstream servers (in-process hyper servers on real sockets), and
//! small clients.
//!
//! A test reads like a sentence:
//!
//! ```text
//! let app = Upstream::start("orders").await;
//! let sidecar = SidecarProcess::builder("orders", app.port()).start().await;
//! let response = client::get(sidecar.inbound, "/").await;
//! ```
//!
//! Binaries are found next to the test executable's `deps/` folder
//! (`target/<profile>/sidecar`) or in `$MESHLET_BIN_DIR`; the test command
//! builds them first (`cargo build --bins` before `cargo test`). Waiting is
//! always on a condition with a deadline ([`wait::until`]), never a bare
//! sleep.
//!
//! [`demo::DemoService`] is one app of the demo mesh with its sidecar;
//! [`browser::Browser`] drives a headless chromium over the DevTools
//! protocol (the dashboard test).

pub mod admin;
pub mod browser;
pub mod client;
pub mod collector;
pub mod config;
pub mod demo;
pub mod inprocess;
pub mod metrics;
pub mod netns;
pub mod process;
pub mod upstream;
pub mod wait;

pub use process::{meshctl, ControlPlaneProcess, SidecarBuilder, SidecarProcess, TempDir};
pub use upstream::Upstream;
