//! Active health checking of the local app.
//!
//! The prober sends `GET {path}` to the app every `interval` (a fresh
//! connection each time, like a kubelet probe) and counts consecutive
//! results: `unhealthyThreshold` failures in a row mark a healthy app
//! unhealthy, `healthyThreshold` successes mark it healthy again. A 2xx or
//! 3xx answer within `timeout` is a success; anything else is a failure.
//!
//! The check comes from the `HealthCheckPolicy` that targets this service
//! in the current snapshot (re-read before every probe, so an applied
//! policy takes effect at the next probe), else the defaults (`/health`
//! every 5 s). The result is published on a `watch` channel: the admin
//! listener's `/ready` reads it, and the control-plane client sends a
//! heartbeat as soon as it changes, so the registry learns within one
//! probe interval × threshold.
//!
//! The app starts unhealthy until its first successful probe(s).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use http::Method;
use meshlet_api::HealthCheckSpec;
use tokio::sync::watch;

use crate::control::snapshot::SharedSnapshot;

/// Longest wait before the policy is looked up again.
const RECHECK: Duration = Duration::from_millis(500);

/// What the prober currently believes about the app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppHealth {
    pub healthy: bool,
    /// The last probe's outcome in words (`200 OK`, `connection refused`).
    pub last_result: String,
    /// The path being probed.
    pub path: String,
}

/// Consecutive-result counting with thresholds.
#[derive(Debug, Default)]
struct Thresholds {
    healthy: bool,
    successes: u32,
    failures: u32,
}

impl Thresholds {
    /// Records one probe result; returns the (possibly new) state.
    fn record(&mut self, success: bool, spec: &HealthCheckSpec) -> bool {
        if success {
            self.successes += 1;
            self.failures = 0;
            if !self.healthy && self.successes >= spec.healthy_threshold {
                self.healthy = true;
            }
        } else {
            self.failures += 1;
            self.successes = 0;
            // An app never seen healthy stays unhealthy; a healthy one gets
            // `unhealthyThreshold` chances.
            if self.healthy && self.failures >= spec.unhealthy_threshold {
                self.healthy = false;
            }
        }
        self.healthy
    }
}

/// A gateway has no app: always healthy (it is ready once configured),
/// and nothing is probed. The channel stays open until `stop`.
pub fn no_app(mut stop: watch::Receiver<bool>) -> watch::Receiver<AppHealth> {
    let (tx, rx) = watch::channel(AppHealth {
        healthy: true,
        last_result: "no app (gateway)".to_owned(),
        path: "-".to_owned(),
    });
    tokio::spawn(async move {
        let _ = stop.wait_for(|stop| *stop).await;
        drop(tx);
    });
    rx
}

/// Starts the prober; returns the channel with the app's health.
pub fn spawn_prober(
    app: SocketAddr,
    namespace: String,
    service: String,
    snapshot: SharedSnapshot,
    mut stop: watch::Receiver<bool>,
) -> watch::Receiver<AppHealth> {
    let (tx, rx) = watch::channel(AppHealth {
        healthy: false,
        last_result: "not probed yet".to_owned(),
        path: String::new(),
    });
    let authority = app.to_string();
    tokio::spawn(async move {
        let mut counts = Thresholds::default();
        let mut last_probe: Option<Instant> = None;
        loop {
            let spec = snapshot
                .load()
                .health_check(&namespace, &service)
                .cloned()
                .unwrap_or_else(|| HealthCheckSpec::defaults_for(&service));
            // Wake at least every RECHECK so that a newly pushed policy with
            // a shorter interval applies without waiting out the old one.
            if let Some(at) = last_probe {
                // Validation bounds the interval; never panic on overflow.
                let due = at.checked_add(spec.interval.get()).unwrap_or(at + RECHECK);
                let now = Instant::now();
                if now < due {
                    tokio::select! {
                        _ = tokio::time::sleep((due - now).min(RECHECK)) => {}
                        _ = stop.wait_for(|stop| *stop) => return,
                    }
                    continue;
                }
            }
            last_probe = Some(Instant::now());
            let (success, last_result) = probe(&authority, &spec).await;
            let healthy = counts.record(success, &spec);
            tx.send_if_modified(|state| {
                let changed = state.healthy != healthy;
                if changed {
                    tracing::info!(app = %authority, path = %spec.path, healthy, result = %last_result, "app health changed");
                }
                *state = AppHealth {
                    healthy,
                    last_result,
                    path: spec.path.clone(),
                };
                changed
            });
        }
    });
    rx
}

async fn probe(authority: &str, spec: &HealthCheckSpec) -> (bool, String) {
    let request = meshlet_client::request(Method::GET, authority, &spec.path)
        .body(http_body_util::Empty::<bytes::Bytes>::new());
    let request = match request {
        Ok(request) => request,
        Err(error) => return (false, format!("invalid probe of {authority}: {error}")),
    };
    // The local app: plain HTTP, no token.
    let client = meshlet_client::Client::new()
        .user_agent("meshlet-sidecar")
        .timeout(spec.timeout.get());
    match client.send(authority, request).await {
        Ok(response) => {
            let status = response.status();
            (
                status.is_success() || status.is_redirection(),
                status.to_string(),
            )
        }
        Err(err) => (false, err.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_need_consecutive_results() {
        let mut spec = HealthCheckSpec::defaults_for("a");
        spec.unhealthy_threshold = 3;
        spec.healthy_threshold = 2;
        let mut t = Thresholds::default();
        assert!(!t.record(true, &spec), "one success is not enough");
        assert!(t.record(true, &spec));
        assert!(t.record(false, &spec));
        assert!(t.record(false, &spec));
        assert!(t.record(true, &spec), "a success resets the failure count");
        assert!(t.record(false, &spec));
        assert!(t.record(false, &spec));
        assert!(!t.record(false, &spec), "third failure in a row");
        assert!(!t.record(true, &spec));
        assert!(t.record(true, &spec));
    }
}
