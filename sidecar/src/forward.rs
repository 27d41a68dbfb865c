//! Sending one prepared request to a [`ServiceTarget`]: pick an endpoint,
//! send over its pool, retry a refused connection on another endpoint, and
//! bound the wait for response headers.
//!
//! Retrying here is always safe: a connect failure means nothing was sent,
//! and the pool hands the untouched request back. Retries of requests that
//! reached an upstream (5xx, resets) are policy, not this module's business.

use http::{Request, Response};

use crate::balance::Tried;
use crate::body::ProxyBody;
use crate::error::ProxyError;
use crate::pool::SendError;
use crate::settings::Limits;
use crate::snapshot::ServiceTarget;

/// Endpoints tried for one request before giving up on connect failures.
const MAX_CONNECT_ATTEMPTS: usize = 3;

pub async fn forward(
    target: &ServiceTarget,
    request: Request<ProxyBody>,
    limits: &Limits,
) -> Result<Response<ProxyBody>, ProxyError> {
    let Some(timeout) = limits.upstream_timeout else {
        return send_to_some_endpoint(target, request, limits).await;
    };
    match tokio::time::timeout(timeout, send_to_some_endpoint(target, request, limits)).await {
        Ok(result) => result,
        Err(_) => Err(ProxyError::UpstreamTimeout {
            upstream: target.name.clone(),
            timeout,
        }),
    }
}

async fn send_to_some_endpoint(
    target: &ServiceTarget,
    mut request: Request<ProxyBody>,
    limits: &Limits,
) -> Result<Response<ProxyBody>, ProxyError> {
    let mut tried = Tried::default();
    let mut last_refusal = None;
    for _ in 0..MAX_CONNECT_ATTEMPTS {
        let Some((index, endpoint)) = target.balancer.pick(tried) else {
            break;
        };
        tried.insert(index);
        let in_flight = endpoint.start_request();
        match endpoint.pool.send(request).await {
            Ok(response) => {
                return Ok(response.map(|body| {
                    ProxyBody::streamed(body, limits.stream_idle_timeout).with_guard(in_flight)
                }))
            }
            Err(SendError::Connect {
                source,
                request: unsent,
            }) => {
                tracing::warn!(target = %target.name, endpoint = %endpoint.addr, error = %source,
                    "upstream connect failed; endpoint ejected");
                endpoint.eject();
                last_refusal = Some((endpoint.addr, source));
                request = *unsent;
            }
            Err(SendError::Upstream(source)) => {
                return Err(ProxyError::Upstream {
                    addr: endpoint.addr,
                    source,
                });
            }
        }
    }
    Err(match last_refusal {
        Some((addr, source)) => ProxyError::ConnectFailed { addr, source },
        None => ProxyError::NoHealthyEndpoint {
            service: target.name.clone(),
        },
    })
}
