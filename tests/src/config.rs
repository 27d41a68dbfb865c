//! Standalone set-ups: YAML documents for a sidecar's `--config`, written
//! the way users write them, and an app with its standalone sidecar.

use std::net::SocketAddr;

use crate::inprocess::Sidecar;
use crate::{SidecarProcess, Upstream};

/// An app `service` (an [`Upstream`]) and its standalone in-process
/// sidecar with `config`.
pub async fn standalone(service: &str, config: &str) -> (Upstream, Sidecar) {
    let app = Upstream::start(service).await;
    let sidecar = Sidecar::builder(service, app.port())
        .config(config)
        .start()
        .await;
    (app, sidecar)
}

/// [`standalone`] with a sidecar process, for tests that read its log or
/// send it signals.
pub async fn standalone_process(service: &str, config: &str) -> (Upstream, SidecarProcess) {
    let app = Upstream::start(service).await;
    let sidecar = SidecarProcess::builder(service, app.port())
        .config(config)
        .start()
        .await;
    (app, sidecar)
}

/// One document of `kind` named `name`, with `spec` (YAML, one field per
/// line, indented here).
pub fn doc(kind: &str, name: &str, spec: &str) -> String {
    let spec: String = spec.lines().map(|l| format!("  {l}\n")).collect();
    format!("---\napiVersion: meshlet.dev/v1alpha1\nkind: {kind}\nmetadata: {{name: {name}}}\nspec:\n{spec}")
}

/// A `Service` with `(address, version label)` endpoints.
pub fn service(name: &str, endpoints: &[(SocketAddr, &str)]) -> String {
    let list: String = endpoints
        .iter()
        .map(|(addr, version)| {
            format!("  - {{address: '{addr}', labels: {{version: {version}}}}}\n")
        })
        .collect();
    doc("Service", name, &format!("endpoints:\n{list}"))
}
