//! The admin listener (127.0.0.1:15020 by default): `/live`, `/ready`,
//! `/config_dump`, `/metrics`.
//!
//! `/ready` is true once the config is loaded (it is, before this listener
//! starts) and the local app accepts TCP connections; a background task
//! probes the app once a second. Kubernetes' readiness probe and the local
//! demo both wait on it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{header, HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::json;
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::body::ProxyBody;
use crate::metrics::Metrics;
use crate::server::{Handler, Peer};
use crate::settings::Settings;
use crate::snapshot::SharedSnapshot;

const APP_PROBE_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Clone)]
pub struct Admin {
    settings: Arc<Settings>,
    snapshot: SharedSnapshot,
    metrics: Metrics,
    app_reachable: Arc<AtomicBool>,
}

impl Admin {
    pub fn new(settings: Arc<Settings>, snapshot: SharedSnapshot, metrics: Metrics) -> Self {
        Admin {
            settings,
            snapshot,
            metrics,
            app_reachable: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Probes the app's port until shutdown, updating readiness.
    pub fn spawn_app_probe(&self, mut shutdown: watch::Receiver<bool>) {
        let (addr, reachable) = (self.settings.app_addr, Arc::clone(&self.app_reachable));
        tokio::spawn(async move {
            loop {
                let ok = probe(addr).await;
                if reachable.swap(ok, Ordering::Relaxed) != ok {
                    tracing::info!(app = %addr, reachable = ok, "local app reachability changed");
                }
                tokio::select! {
                    _ = tokio::time::sleep(APP_PROBE_INTERVAL) => {}
                    _ = shutdown.wait_for(|stop| *stop) => return,
                }
            }
        });
    }

    fn config_dump(&self) -> serde_json::Value {
        json!({
            "settings": &*self.settings,
            "snapshot": self.snapshot.load().to_json(),
            "appReachable": self.app_reachable.load(Ordering::Relaxed),
        })
    }
}

async fn probe(addr: SocketAddr) -> bool {
    matches!(
        tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(addr)).await,
        Ok(Ok(_))
    )
}

impl Handler for Admin {
    async fn handle(&self, request: Request<Incoming>, _peer: &Peer) -> Response<ProxyBody> {
        match request.uri().path() {
            "/live" => text(StatusCode::OK, "live\n"),
            "/ready" if self.app_reachable.load(Ordering::Relaxed) => {
                text(StatusCode::OK, "ready\n")
            }
            "/ready" => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready: local app is not reachable\n",
            ),
            "/config_dump" => {
                let body = serde_json::to_vec_pretty(&self.config_dump()).unwrap_or_default();
                with_type(Response::new(ProxyBody::full(body)), "application/json")
            }
            "/metrics" => with_type(
                Response::new(ProxyBody::full(self.metrics.render())),
                "text/plain; version=0.0.4; charset=utf-8",
            ),
            _ => text(
                StatusCode::NOT_FOUND,
                "not found; try /live, /ready, /config_dump, /metrics\n",
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
