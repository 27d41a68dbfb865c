//! Sending one prepared request to a [`ServiceTarget`] under the policies
//! that apply to it, in this order:
//!
//! ```text
//! concurrency slot (breaker maxConcurrentRequests / maxPendingRequests → 503 overflow)
//!  └─ overall deadline (TimeoutPolicy.request, else --upstream-timeout → 504)
//!      └─ retry loop (RetryPolicy: retryOn, idempotent, budget, backoff)
//!          └─ one try (perTryTimeout): traffic-split subset → balancer pick
//!             among endpoints whose breaker admits (none → 503 circuit_open)
//!             → pool send (a refused connection: next endpoint) → outcome
//!             recorded on that endpoint's breaker
//! ```
//!
//! Retrying a refused connection on another endpoint is always safe (the
//! pool hands the unsent request back) and happens without a policy.
//! Each connect failure, try that timed out and policy retry is counted on
//! the handles resolved at snapshot build (the target's `TargetMetrics`,
//! the `RetryPolicy`'s counter).
//! Retries of requests that reached an upstream are the `RetryPolicy`'s,
//! and only happen before any response byte went to the client.

use std::time::Duration;

use http::{Request, Response};
use tokio::time::Instant;

use crate::body::ProxyBody;
use crate::error::ProxyError;
use crate::policy::breaker::{BreakerPermit, MAX_PENDING_WAIT};
use crate::policy::index::RoutePolicies;
use crate::policy::outcome::Outcome;
use crate::policy::retry::{NotReplayable, RetryPolicy};
use crate::settings::Limits;
use crate::telemetry::trail::Trail;
use crate::upstream::balance::Tried;
use crate::upstream::pool::SendError;
use crate::upstream::target::ServiceTarget;

/// Endpoints tried for one request before giving up on connect failures.
const MAX_CONNECT_ATTEMPTS: usize = 3;

pub async fn forward(
    target: &ServiceTarget,
    request: Request<ProxyBody>,
    policies: RoutePolicies<'_>,
    limits: &Limits,
    trail: &mut Trail,
) -> Result<Response<ProxyBody>, ProxyError> {
    let timeouts = policies.timeouts;
    let timeout = timeouts.and_then(|t| t.request).or(limits.upstream_timeout);
    // The deadline runs from arrival: time spent waiting for a slot counts.
    let deadline = timeout.map(|t| (Instant::now() + t, t));
    let slot = match policies.breaker {
        Some(breakers) => {
            let wait = timeout.map_or(MAX_PENDING_WAIT, |t| t.min(MAX_PENDING_WAIT));
            Some(breakers.admit(&target.name, wait).await?)
        }
        None => None,
    };
    let send = Send {
        target,
        policies,
        idle_timeout: timeouts.and_then(|t| t.idle).or(limits.stream_idle_timeout),
        deadline,
    };
    let response = match policies.retry {
        Some(retry) => send.with_retries(retry, request, trail).await,
        None => send.one_try(request, send.deadline, trail).await,
    }?;
    Ok(response.map(|body| body.with_slot(slot)))
}

/// What every try of one request shares.
struct Send<'a> {
    target: &'a ServiceTarget,
    policies: RoutePolicies<'a>,
    idle_timeout: Option<Duration>,
    /// The overall deadline for response headers and its duration.
    deadline: Option<(Instant, Duration)>,
}

impl Send<'_> {
    async fn with_retries(
        &self,
        retry: &RetryPolicy,
        request: Request<ProxyBody>,
        trail: &mut Trail,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        retry.budget.record_request(std::time::Instant::now());
        let replay = match retry.replayable(request, self.deadline).await {
            Ok(replay) => replay,
            Err(NotReplayable::Stream(request)) => {
                return self.one_try(*request, self.deadline, trail).await
            }
            Err(NotReplayable::Failed(error)) => return Err(error),
        };
        let per_try = retry.spec.per_try_timeout.map(|t| t.get());
        let mut tries = 0;
        loop {
            tries += 1;
            let try_deadline = match (per_try, self.deadline) {
                (Some(t), Some(overall)) if Instant::now() + t < overall.0 => {
                    Some((Instant::now() + t, t))
                }
                (Some(t), None) => Some((Instant::now() + t, t)),
                (_, overall) => overall,
            };
            trail.retries = tries - 1;
            let result = self.one_try(replay.request(), try_deadline, trail).await;
            let outcome = match &result {
                Ok(response) => Some(Outcome::Status(response.status())),
                Err(err) => Outcome::of(err),
            };
            let again = tries < retry.spec.attempts && outcome.is_some_and(|o| retry.retries_on(o));
            if !again {
                return result;
            }
            let pause = retry.backoff(tries);
            let out_of_time = self
                .deadline
                .is_some_and(|(deadline, _)| Instant::now() + pause >= deadline);
            if out_of_time || !retry.budget.try_withdraw(std::time::Instant::now()) {
                return result;
            }
            tracing::debug!(target = %self.target.name, policy = %retry.name, try_number = tries + 1, ?outcome, "retrying");
            retry.retries.inc();
            drop(result);
            tokio::time::sleep(pause).await;
        }
    }

    /// One try: pick an endpoint the split and the breakers allow, send,
    /// retry a refused connection on another endpoint, record the outcome.
    async fn one_try(
        &self,
        mut request: Request<ProxyBody>,
        deadline: Option<(Instant, Duration)>,
        trail: &mut Trail,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let target = self.target;
        let breakers = self.policies.breaker;
        let admits = |i: usize, now| {
            breakers.is_none_or(|b| b.breakers.get(i).is_none_or(|b| b.allows(now)))
        };
        // A subset whose every endpoint's breaker is open is skipped, like
        // one without healthy endpoints: the others take its share.
        let chosen_at = std::time::Instant::now();
        let subset = self.policies.split.and_then(|split| {
            split.choose(|endpoints| endpoints.iter().any(|&i| admits(i, chosen_at)))
        });
        let in_subset = |i: usize| subset.is_none_or(|s| s.binary_search(&i).is_ok());
        let mut tried = Tried::default();
        let mut last_refusal = None;
        for _ in 0..MAX_CONNECT_ATTEMPTS {
            let now = std::time::Instant::now();
            let allowed = |i: usize| in_subset(i) && admits(i, now);
            let Some((index, endpoint)) = target.balancer.pick_among(tried, allowed) else {
                break;
            };
            tried.insert(index);
            trail.upstream = Some(endpoint.addr);
            let permit: Option<BreakerPermit> = match breakers.and_then(|b| b.breakers.get(index)) {
                Some(breaker) => match breaker.try_acquire(now) {
                    Some(permit) => Some(permit),
                    None => continue,
                },
                None => None,
            };
            let in_flight = endpoint.start_request();
            let sent = match deadline {
                Some((at, _)) => tokio::time::timeout_at(at, endpoint.pool.send(request)).await,
                None => Ok(endpoint.pool.send(request).await),
            };
            let record = |outcome| {
                if let Some(permit) = permit {
                    permit.record(outcome);
                }
            };
            match sent {
                Ok(Ok(response)) => {
                    record(Outcome::Status(response.status()));
                    let idle = self.idle_timeout;
                    return Ok(
                        response.map(|body| ProxyBody::streamed(body, idle).with_guard(in_flight))
                    );
                }
                Ok(Err(SendError::Connect {
                    source,
                    request: unsent,
                })) => {
                    record(Outcome::ConnectFailure);
                    target.metrics.connect_errors.inc();
                    tracing::warn!(target = %target.name, endpoint = %endpoint.addr, error = %source,
                        "upstream connect failed; endpoint ejected");
                    endpoint.eject();
                    last_refusal = Some((endpoint.addr, source));
                    request = *unsent;
                }
                Ok(Err(SendError::Upstream(source))) => {
                    record(Outcome::Reset);
                    return Err(ProxyError::Upstream {
                        addr: endpoint.addr,
                        source,
                    });
                }
                Err(_elapsed) => {
                    record(Outcome::Timeout);
                    target.metrics.timeouts.inc();
                    let timeout = deadline.map_or(Duration::ZERO, |(_, t)| t);
                    return Err(ProxyError::UpstreamTimeout {
                        upstream: target.name.clone(),
                        timeout,
                    });
                }
            }
        }
        if let Some((addr, source)) = last_refusal {
            return Err(ProxyError::ConnectFailed { addr, source });
        }
        match breakers {
            Some(b)
                if target
                    .balancer
                    .pick_among(Tried::default(), in_subset)
                    .is_some() =>
            {
                Err(ProxyError::CircuitOpen {
                    service: target.name.clone(),
                    policy: b.name.clone(),
                })
            }
            _ => Err(ProxyError::NoHealthyEndpoint {
                service: target.name.clone(),
            }),
        }
    }
}
