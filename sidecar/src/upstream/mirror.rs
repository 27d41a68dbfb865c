//! `requestMirror`: a copy of a request sent to another service,
//! fire-and-forget (Istio's and Envoy's shadowing).
//!
//! Data flow: the handler that chose a `Route` rule calls
//! [`Mirrors::send`] for each of its mirrors *before* it forwards the
//! request itself. The copy is made only when every byte of the body is
//! already known ([`ProxyBody::replay_copy`]: an empty body, or one the
//! mesh holds); a request whose body is still streaming is not copied
//! (no body is buffered for a mirror). The copy's `Host` gets a `-shadow`
//! suffix, as Envoy does, so the mirror target can tell copies from real
//! traffic. It is sent on a task of its own through `forward` (balancing,
//! pools; no retries, no breakers), bounded by a semaphore of
//! [`MAX_IN_FLIGHT`] copies per sidecar and by a deadline (the caller's
//! request timeout, else the upstream timeout, else
//! [`DEFAULT_DEADLINE`]); its response body is read and dropped.
//!
//! **Invariant:** the caller never waits for a mirror: `send` does not
//! await, a copy that cannot get a permit at once is skipped, and a
//! mirror's failure or slowness only shows in
//! `meshlet_mirror_requests_total{service,outcome}` (`sent`, `failed`,
//! `skipped`).

use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderValue};
use http::uri::{Authority, Uri};
use http::Request;
use http_body_util::BodyExt;
use tokio::sync::Semaphore;

use crate::body::ProxyBody;
use crate::policy::index::RoutePolicies;
use crate::settings::Limits;
use crate::telemetry::metrics::MirrorCounters;
use crate::telemetry::trail::Trail;
use crate::upstream::forward::forward;
use crate::upstream::target::ServiceTarget;

/// Mirrored copies in flight at once, per sidecar; more are skipped.
pub const MAX_IN_FLIGHT: usize = 64;

/// How long a copy may take when neither the request nor the sidecar has
/// a timeout.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(15);

/// Where one `requestMirror` sends its copies, resolved at snapshot build.
#[derive(Debug)]
pub struct MirrorTarget {
    /// The mirror service as the metric names it (`name`, `name.ns`).
    pub service: String,
    /// Share of matching requests copied, 0..=100.
    pub percent: u32,
    /// `None`: no such service in the snapshot (every copy is skipped).
    pub target: Option<Arc<ServiceTarget>>,
    pub counters: MirrorCounters,
}

impl MirrorTarget {
    /// Whether this request is one of the `percent` copied.
    fn chosen(&self) -> bool {
        self.percent >= 100 || fastrand::u32(0..100) < self.percent
    }
}

/// The sidecar's mirror sender: the in-flight bound shared by every
/// handler.
#[derive(Debug, Clone)]
pub struct Mirrors {
    permits: Arc<Semaphore>,
}

impl Default for Mirrors {
    fn default() -> Self {
        Mirrors::new(MAX_IN_FLIGHT)
    }
}

impl Mirrors {
    pub fn new(max_in_flight: usize) -> Self {
        Mirrors {
            permits: Arc::new(Semaphore::new(max_in_flight)),
        }
    }

    /// Sends a copy of `request` (as it will be forwarded: filters
    /// applied) to `mirror`'s service, unless the request is not among
    /// the mirror's `percent` or cannot be copied; returns at once.
    /// `timeout` is the caller's request timeout, if any.
    pub fn send(
        &self,
        mirror: &MirrorTarget,
        request: &Request<ProxyBody>,
        limits: &Arc<Limits>,
        timeout: Option<Duration>,
    ) {
        if !mirror.chosen() {
            return;
        }
        let Some(target) = &mirror.target else {
            mirror.counters.skipped.inc();
            return;
        };
        let Some(copy) = shadow_copy(request) else {
            mirror.counters.skipped.inc();
            return;
        };
        let Ok(permit) = Arc::clone(&self.permits).try_acquire_owned() else {
            mirror.counters.skipped.inc();
            return;
        };
        let deadline = timeout
            .or(limits.upstream_timeout)
            .unwrap_or(DEFAULT_DEADLINE);
        let (target, limits, counters) = (
            Arc::clone(target),
            Arc::clone(limits),
            mirror.counters.clone(),
        );
        tokio::spawn(async move {
            let _permit = permit;
            let exchange = async {
                let mut trail = Trail::default();
                let response =
                    forward(&target, copy, RoutePolicies::default(), &limits, &mut trail).await?;
                // Read the answer to its end so that the connection goes
                // back to the pool; its bytes are dropped.
                response.into_body().collect().await.map(drop).map_err(|e| {
                    crate::error::ProxyError::RequestBodyFailed {
                        detail: e.to_string(),
                    }
                })
            };
            match tokio::time::timeout(deadline, exchange).await {
                Ok(Ok(())) => counters.sent.inc(),
                Ok(Err(error)) => {
                    tracing::debug!(mirror = %target.name, %error, "mirrored request failed");
                    counters.failed.inc();
                }
                Err(_) => {
                    tracing::debug!(mirror = %target.name, "mirrored request timed out");
                    counters.failed.inc();
                }
            }
        });
    }
}

/// The copy of `request` a mirror gets: same method, URI, version and
/// headers, the body when it is known in full, and `-shadow` appended to
/// the host (before any port) in `Host` and in an absolute URI. `None`
/// when the body is still streaming.
pub fn shadow_copy(request: &Request<ProxyBody>) -> Option<Request<ProxyBody>> {
    let body = request.body().uncounted_copy()?;
    let mut copy = Request::new(body);
    *copy.method_mut() = request.method().clone();
    *copy.version_mut() = request.version();
    *copy.headers_mut() = request.headers().clone();
    let mut uri = request.uri().clone();
    if let Some(authority) = uri.authority().and_then(|a| shadow_host(a.as_str())) {
        let mut parts = uri.clone().into_parts();
        parts.authority = Authority::try_from(authority).ok();
        if let Ok(shadowed) = Uri::from_parts(parts) {
            uri = shadowed;
        }
    }
    *copy.uri_mut() = uri;
    let host = copy
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .and_then(shadow_host)
        .and_then(|h| HeaderValue::try_from(h).ok());
    if let Some(host) = host {
        copy.headers_mut().insert(header::HOST, host);
    }
    Some(copy)
}

/// `orders:8080` → `orders-shadow:8080`, `orders` → `orders-shadow`,
/// `[::1]:80` → unchanged (`None`: an IP literal has no name to suffix).
fn shadow_host(authority: &str) -> Option<String> {
    if authority.starts_with('[') {
        return None;
    }
    Some(match authority.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => {
            format!("{host}-shadow:{port}")
        }
        _ => format!("{authority}-shadow"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shadow_host_keeps_the_port() {
        assert_eq!(shadow_host("orders").as_deref(), Some("orders-shadow"));
        assert_eq!(
            shadow_host("orders.shop:8080").as_deref(),
            Some("orders.shop-shadow:8080")
        );
        assert_eq!(shadow_host("[::1]:80"), None);
    }

    #[test]
    fn a_copys_body_counts_nowhere() {
        let counted = prometheus::IntCounter::new("sent", "sent").unwrap();
        let request = Request::post("http://orders/x")
            .header("host", "orders")
            .body(ProxyBody::full("payload").counting(counted.clone()))
            .unwrap();
        let copy = shadow_copy(&request).expect("a known body is copied");
        let body = futures_util::FutureExt::now_or_never(copy.into_body().collect())
            .expect("ready")
            .expect("whole");
        assert_eq!(body.to_bytes(), "payload");
        assert_eq!(
            counted.get(),
            0,
            "the original request's counter is untouched"
        );
    }

    #[test]
    fn a_copy_has_the_shadow_host_and_the_known_body() {
        let request = Request::builder()
            .method("POST")
            .uri("http://orders:8080/a?b=1")
            .header("host", "orders:8080")
            .header("x-user", "u1")
            .body(ProxyBody::full("payload"))
            .unwrap();
        let copy = shadow_copy(&request).expect("a known body is copied");
        assert_eq!(copy.method(), "POST");
        assert_eq!(copy.uri().to_string(), "http://orders-shadow:8080/a?b=1");
        assert_eq!(copy.headers()["host"], "orders-shadow:8080");
        assert_eq!(copy.headers()["x-user"], "u1");
        assert_eq!(
            request.headers()["host"],
            "orders:8080",
            "the original is untouched"
        );
    }
}
