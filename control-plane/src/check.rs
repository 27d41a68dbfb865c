//! `GET /api/v1/check` (`Action::ReadRegistry`: admin, viewer): the
//! control plane's view of the mesh's health for `meshctl check`, one
//! [`CheckReport`].
//!
//! Data flow: the published revision (instances, resources, services),
//! the controller's liveness (each sidecar's last heartbeat, acknowledged
//! revision, version, clock skew; recently expired instances), the CA's
//! roots and leaves (`workload`), and one read of the store (its latest
//! history record, on the blocking pool) ─► `CheckReport` JSON. Nothing is
//! judged here: meshctl applies the thresholds.

use std::time::Duration;

use axum::extract::State;
use axum::Json;
use meshlet_api::check::{CheckReport, ComponentHealth, PolicyTarget, EXPIRED_WINDOW_MS};
use meshlet_api::mesh::ServiceKey;

use crate::clock::now_ms;
use crate::state::AppState;

/// How long the store read may take before the store counts as unhealthy.
const STORE_READ_DEADLINE: Duration = Duration::from_secs(2);

pub async fn check(State(state): State<AppState>) -> Json<CheckReport> {
    let store = store_health(&state).await;
    let published = state.controller.published();
    let (mut sidecars, expired) = state
        .controller
        .check_view(Duration::from_millis(EXPIRED_WINDOW_MS));
    for sidecar in &mut sidecars {
        if sidecar.cert_not_after_ms.is_none() {
            sidecar.cert_not_after_ms = state
                .workload
                .certificate_of(&sidecar.id)
                .map(|leaf| leaf.not_after_ms);
        }
    }
    let policies_without_instances = published
        .resources
        .iter()
        .filter_map(|(key, resource)| {
            let (namespace, service) = resource.target()?;
            let target = ServiceKey {
                namespace: namespace.to_owned(),
                name: service.to_owned(),
            };
            let has_endpoints = published
                .services
                .get(&target)
                .is_some_and(|s| !s.endpoints.is_empty());
            (!has_endpoints).then(|| PolicyTarget {
                kind: key.kind.clone(),
                namespace: key.namespace.clone(),
                name: key.name.clone(),
                target_namespace: target.namespace,
                target_service: target.name,
            })
        })
        .collect();
    let now = now_ms();
    Json(CheckReport {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        now_ms: now,
        revision: published.revision,
        heartbeat_interval_ms: state.controller.heartbeat_interval().as_millis() as u64,
        ttl_ms: state.controller.ttl().as_millis() as u64,
        store,
        ca: state.workload.status(now),
        sidecars,
        expired,
        policies_without_instances,
    })
}

/// Reads the latest history record (a read transaction of the store).
async fn store_health(state: &AppState) -> ComponentHealth {
    let store = state.store.clone();
    let read = tokio::task::spawn_blocking(move || store.history(1));
    match tokio::time::timeout(STORE_READ_DEADLINE, read).await {
        Ok(Ok(Ok(records))) => ComponentHealth {
            ok: true,
            detail: match records.first() {
                Some(r) => format!("read the latest revision record ({})", r.revision),
                None => "read the (empty) revision history".to_owned(),
            },
        },
        Ok(Ok(Err(error))) => ComponentHealth {
            ok: false,
            detail: format!("reading the revision history failed: {error}"),
        },
        Ok(Err(error)) => ComponentHealth {
            ok: false,
            detail: format!("the store read panicked: {error}"),
        },
        Err(_) => ComponentHealth {
            ok: false,
            detail: format!("reading the revision history took over {STORE_READ_DEADLINE:?}"),
        },
    }
}
