//! The admin listener (127.0.0.1:15020 by default): `/live`, `/started`,
//! `/ready`, `/config_dump`, `/metrics`.
//!
//! `/started` answers 200 once the sidecar can route: its listeners are up
//! and, with a control plane, it holds a configuration. It ignores the
//! app, which has not started yet when a Kubernetes native sidecar's
//! startup probe asks (the app container starts only after it passes).
//!
//! `/ready` follows the local app's health as the prober sees it
//! ([`crate::control::health`]) and, with a control plane, also needs a
//! configuration (pushed, or the persisted one): a sidecar that cannot
//! route yet is not ready. Kubernetes' readiness probe and the local demo
//! both wait on it.
//!
//! `/metrics` renders the registry plus the current snapshot's breaker
//! states (computed at scrape time, see `metrics`).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use http::{header, HeaderValue, Request, Response, StatusCode};
use serde_json::json;
use tokio::sync::watch;

use crate::body::{ProxyBody, StreamedBody};
use crate::control::client::ControlClient;
use crate::control::health::AppHealth;
use crate::control::snapshot::SharedSnapshot;
use crate::identity::WorkloadIdentity;
use crate::listen::server::{Handler, Peer};
use crate::settings::Settings;
use crate::telemetry::metrics::Metrics;

#[derive(Clone)]
pub struct Admin {
    settings: Arc<Settings>,
    snapshot: SharedSnapshot,
    metrics: Metrics,
    health: watch::Receiver<AppHealth>,
    control: Option<ControlClient>,
    identity: Option<Arc<WorkloadIdentity>>,
}

impl Admin {
    pub fn new(
        settings: Arc<Settings>,
        snapshot: SharedSnapshot,
        metrics: Metrics,
        health: watch::Receiver<AppHealth>,
        control: Option<ControlClient>,
    ) -> Self {
        Admin {
            settings,
            snapshot,
            metrics,
            health,
            control,
            identity: None,
        }
    }

    /// `/config_dump` shows the workload certificate.
    pub fn with_identity(mut self, identity: Option<Arc<WorkloadIdentity>>) -> Self {
        self.identity = identity;
        self
    }

    /// Standalone, or a configuration from the control plane (pushed or
    /// persisted) is loaded.
    fn configured(&self) -> bool {
        self.control
            .as_ref()
            .is_none_or(|control| control.status.has_state.load(Ordering::Relaxed))
    }

    /// `Ok` once the sidecar can route, else why not.
    fn started(&self) -> Result<(), String> {
        if !self.configured() {
            return Err("not started: no configuration from the control plane yet\n".to_owned());
        }
        Ok(())
    }

    /// `Ok` when ready, else why not.
    fn readiness(&self) -> Result<(), String> {
        let health = self.health.borrow();
        if !health.healthy {
            return Err(format!(
                "not ready: local app is not healthy (GET {} on {}: {})\n",
                health.path, self.settings.app_addr, health.last_result
            ));
        }
        if !self.configured() {
            return Err("not ready: no configuration from the control plane yet\n".to_owned());
        }
        Ok(())
    }

    fn config_dump(&self) -> serde_json::Value {
        let health = self.health.borrow().clone();
        json!({
            "settings": &*self.settings,
            "snapshot": self.snapshot.load().to_json(),
            "app": {
                "healthy": health.healthy,
                "healthCheckPath": health.path,
                "lastProbe": health.last_result,
            },
            "controlPlane": self.control.as_ref().map(ControlClient::to_json),
            "identity": self.identity.as_ref().map(|i| i.to_json()),
        })
    }
}

impl Handler for Admin {
    // Scrapes and probes come seconds apart.
    const POLLS_FOR_NEXT_REQUEST: bool = false;

    async fn handle(&self, request: Request<StreamedBody>, _peer: &Peer) -> Response<ProxyBody> {
        match request.uri().path() {
            "/live" => text(StatusCode::OK, "live\n"),
            "/started" => check(self.started(), "started\n"),
            "/ready" => check(self.readiness(), "ready\n"),
            "/config_dump" => {
                let body = serde_json::to_vec_pretty(&self.config_dump()).unwrap_or_default();
                with_type(Response::new(ProxyBody::full(body)), "application/json")
            }
            "/metrics" => with_type(
                Response::new(ProxyBody::full(
                    self.metrics.render(&self.snapshot.load().breaker_samples()),
                )),
                "text/plain; version=0.0.4; charset=utf-8",
            ),
            _ => text(
                StatusCode::NOT_FOUND,
                "not found; try /live, /started, /ready, /config_dump, /metrics\n",
            ),
        }
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<ProxyBody> {
    let mut response = with_type(
        Response::new(ProxyBody::full(body)),
        "text/plain; charset=utf-8",
    );
    *response.status_mut() = status;
    response
}

fn with_type(mut response: Response<ProxyBody>, content_type: &'static str) -> Response<ProxyBody> {
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// 200 with `ok`, or 503 saying why not.
fn check(result: Result<(), String>, ok: &'static str) -> Response<ProxyBody> {
    match result {
        Ok(()) => text(StatusCode::OK, ok),
        Err(why) => {
            let mut response = text(StatusCode::SERVICE_UNAVAILABLE, "");
            *response.body_mut() = ProxyBody::full(why);
            response
        }
    }
}
