//! `meshctl`, meshlet's command-line client: offline checks and injection
//! of resource and Kubernetes files, and the control plane's HTTP API
//! turned into tables, JSON or YAML.
//!
//! ```text
//! main ─► cli (flags, dispatch, exit codes)
//!           ├─ offline: validate (read and check files), inject (Kubernetes YAML → injected YAML)
//!           └─ online:  services · resources · traceview · tokens · check · tap ─► client (HTTPS, token) ─► control plane API
//!                          └─► output (tables, -o json|yaml) and meshlet_api::display
//! ```
//!
//! - [`cli`]: the flags and what each command runs.
//! - [`services`]: `get services|endpoints`, `describe service`, `broadcast`.
//! - [`resources`]: `apply`, `get`/`describe` of resource kinds, `delete`,
//!   `diff`, `history`, `rollback`.
//! - [`traceview`]: `traces` (a table) and `trace` (a waterfall).
//! - [`replicas`]: `get replicas` (the control plane's replicas on etcd).
//! - [`tokens`]: `token create|list|revoke`.
//! - [`ca`]: `ca status|rotate` (the mesh CA's roots, a rotation).
//! - [`check`]: `meshctl check` (the control plane's `CheckReport` judged
//!   into ✔/⚠/✖ checks with hints).
//! - [`tap`]: `meshctl tap` (the control plane's NDJSON tap stream, printed
//!   as lines or JSON until `--max`).
//! - [`validate`]: offline checks and the file reading every `-f` shares.
//! - `inject` is `meshlet_api::inject` (shared with the control plane's
//!   admission webhook); `cli` prints its YAML and its warnings.
//! - [`output`]: tables, JSON/YAML, ages, stdout. [`error`]: [`CommandError`].
//! - [`client`]: [`client::ControlPlane`], the API over the workspace's
//!   `meshlet-client` (HTTPS, mesh CA, bearer token), and its one-line errors.
//!
//! **Invariant:** meshctl speaks to the control plane only through its
//! HTTP API and the types of `meshlet_api`; it never depends on the server
//! crate (no axum, no redb in its build).

pub mod ca;
pub mod check;
pub mod cli;
pub mod client;
pub mod error;
pub mod output;
pub mod replicas;
pub mod resources;
pub mod services;
pub mod tap;
pub mod tokens;
pub mod traceview;
pub mod validate;

pub use error::CommandError;
