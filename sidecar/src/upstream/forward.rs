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

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use tokio::time::error::Elapsed;
use tokio::time::Instant;

use crate::body::ProxyBody;
use crate::error::ProxyError;
use crate::policy::breaker::{BreakerPermit, MAX_PENDING_WAIT};
use crate::policy::index::RoutePolicies;
use crate::policy::outcome::Outcome;
use crate::policy::retry::{NotReplayable, RetryPolicy};
use crate::settings::Limits;
use crate::telemetry::trail::Trail;
use crate::upstream::balance::{Endpoint, Tried};
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

    /// One try, in four phases: pick the split's subset, admit an
    /// endpoint (balancer pick among those the subset and the breakers
    /// allow), send, record the outcome. A refused connection comes back
    /// unsent and goes to another endpoint (at most
    /// [`MAX_CONNECT_ATTEMPTS`]); with nothing sent, [`Send::nothing_sent`]
    /// says why.
    async fn one_try(
        &self,
        mut request: Request<ProxyBody>,
        deadline: Option<(Instant, Duration)>,
        trail: &mut Trail,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let subset = self.pick_subset();
        let mut tried = Tried::default();
        let mut last_refusal = None;
        for _ in 0..MAX_CONNECT_ATTEMPTS {
            let (endpoint, permit) = match self.admit(subset, &mut tried, trail) {
                Admission::Admitted(endpoint, permit) => (endpoint, permit),
                Admission::BreakerBusy => continue,
                Admission::NoneLeft => break,
            };
            // Phase 3: send, within the try's deadline.
            let in_flight = endpoint.start_request();
            let sent = match deadline {
                Some((at, _)) => tokio::time::timeout_at(at, endpoint.pool.send(request)).await,
                None => Ok(endpoint.pool.send(request).await),
            };
            match self.record(sent, endpoint, permit, deadline) {
                Sent::Answered(response) => {
                    let idle = self.idle_timeout;
                    return Ok(
                        response.map(|body| ProxyBody::streamed(body, idle).with_guard(in_flight))
                    );
                }
                Sent::Failed(error) => return Err(error),
                Sent::Refused { error, unsent } => {
                    last_refusal = Some((endpoint.addr, error));
                    request = *unsent;
                }
            }
        }
        Err(self.nothing_sent(subset, last_refusal))
    }

    /// Whether endpoint `index`'s breaker (if any) lets a request through.
    fn breaker_admits(&self, index: usize, now: std::time::Instant) -> bool {
        self.policies.breaker.is_none_or(|b| {
            b.breakers
                .get(index)
                .is_none_or(|breaker| breaker.allows(now))
        })
    }

    /// Phase 1: the traffic split's subset for this try (`None`: no split,
    /// every endpoint). A subset whose every endpoint's breaker is open is
    /// skipped, like one without healthy endpoints: the others take its
    /// share.
    fn pick_subset(&self) -> Option<&[usize]> {
        let now = std::time::Instant::now();
        self.policies.split.and_then(|split| {
            split.choose(|endpoints| endpoints.iter().any(|&i| self.breaker_admits(i, now)))
        })
    }

    /// Phase 2: the balancer's pick among the untried endpoints of the
    /// subset whose breakers allow a request, and that breaker's permit.
    fn admit<'t>(
        &'t self,
        subset: Option<&[usize]>,
        tried: &mut Tried,
        trail: &mut Trail,
    ) -> Admission<'t> {
        let now = std::time::Instant::now();
        let allowed = |i: usize| in_subset(subset, i) && self.breaker_admits(i, now);
        let Some((index, endpoint)) = self.target.balancer.pick_among(*tried, allowed) else {
            return Admission::NoneLeft;
        };
        tried.insert(index);
        trail.upstream = Some(endpoint.addr);
        match self.policies.breaker.and_then(|b| b.breakers.get(index)) {
            Some(breaker) => match breaker.try_acquire(now) {
                Some(permit) => Admission::Admitted(endpoint, Some(permit)),
                None => Admission::BreakerBusy,
            },
            None => Admission::Admitted(endpoint, None),
        }
    }

    /// Phase 4: the try's outcome on the endpoint's breaker and the
    /// target's counters, and what it means for the request.
    fn record(
        &self,
        sent: Result<Result<Response<Incoming>, SendError>, Elapsed>,
        endpoint: &Endpoint,
        permit: Option<BreakerPermit>,
        deadline: Option<(Instant, Duration)>,
    ) -> Sent {
        let target = self.target;
        let record = |outcome| {
            if let Some(permit) = permit {
                permit.record(outcome);
            }
        };
        match sent {
            Ok(Ok(response)) => {
                record(Outcome::Status(response.status()));
                Sent::Answered(response)
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
                Sent::Refused {
                    error: source,
                    unsent,
                }
            }
            Ok(Err(SendError::Upstream(source))) => {
                record(Outcome::Reset);
                Sent::Failed(ProxyError::Upstream {
                    addr: endpoint.addr,
                    source,
                })
            }
            Err(_elapsed) => {
                record(Outcome::Timeout);
                target.metrics.timeouts.inc();
                let timeout = deadline.map_or(Duration::ZERO, |(_, t)| t);
                Sent::Failed(ProxyError::UpstreamTimeout {
                    upstream: target.name.clone(),
                    timeout,
                })
            }
        }
    }

    /// Why a try sent nothing: the last refused connection; else every
    /// endpoint the subset allows has an open breaker (`circuit_open`);
    /// else there is no healthy endpoint.
    fn nothing_sent(
        &self,
        subset: Option<&[usize]>,
        last_refusal: Option<(SocketAddr, std::io::Error)>,
    ) -> ProxyError {
        let target = self.target;
        if let Some((addr, source)) = last_refusal {
            return ProxyError::ConnectFailed { addr, source };
        }
        match self.policies.breaker {
            Some(b)
                if target
                    .balancer
                    .pick_among(Tried::default(), |i| in_subset(subset, i))
                    .is_some() =>
            {
                ProxyError::CircuitOpen {
                    service: target.name.clone(),
                    policy: b.name.clone(),
                }
            }
            _ => ProxyError::NoHealthyEndpoint {
                service: target.name.clone(),
            },
        }
    }
}

/// Whether endpoint `index` is in the split's subset (`None`: all are).
fn in_subset(subset: Option<&[usize]>, index: usize) -> bool {
    subset.is_none_or(|s| s.binary_search(&index).is_ok())
}

/// Phase 2's answer.
enum Admission<'t> {
    Admitted(&'t Arc<Endpoint>, Option<BreakerPermit>),
    /// The picked endpoint's half-open breaker has no trial left: try
    /// another (this counts as an attempt).
    BreakerBusy,
    /// No endpoint left that the subset and the breakers allow.
    NoneLeft,
}

/// Phase 4's answer.
enum Sent {
    Answered(Response<Incoming>),
    Failed(ProxyError),
    /// The connection was refused; the request comes back unsent.
    Refused {
        error: std::io::Error,
        unsent: Box<Request<ProxyBody>>,
    },
}
