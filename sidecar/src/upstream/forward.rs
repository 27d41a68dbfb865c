//! Sending one prepared request to a [`ServiceTarget`] under the policies
//! that apply to it, in this order:
//!
//! ```text
//! overall deadline (TimeoutPolicy.request, else --upstream-timeout → 504)
//!  └─ injected fault (FaultInjectionPolicy: a delay within the deadline, then
//!     an abort → its status, fault_injected; not retried, nothing sent)
//!      └─ concurrency slot (breaker maxConcurrentRequests / maxPendingRequests → 503 overflow)
//!          └─ retry loop (RetryPolicy: retryOn, idempotent, budget, backoff)
//!          └─ one try (perTryTimeout): traffic-split subset → balancer pick
//!             among endpoints whose breaker admits (none → 503 circuit_open)
//!             → pool send (a refused connection: next endpoint) → outcome
//!             recorded on that endpoint's breaker
//! ```
//!
//! Retrying a refused connection on another endpoint is always safe (the
//! pool hands the unsent request back) and happens without a policy; so
//! is the pool's one re-send of work the upstream refused unprocessed
//! (GOAWAY, `REFUSED_STREAM`, a pooled connection closed before answering),
//! which `forward` never sees and the retry budget never pays for. The
//! downstream connection's stream allowance (`ClientStreams`, in the
//! request's extensions) is put back on every try's request.
//! Each connect failure, try that timed out and policy retry is counted on
//! the handles resolved at snapshot build (the target's `TargetMetrics`,
//! the `RetryPolicy`'s counter).
//! Retries of requests that reached an upstream are the `RetryPolicy`'s,
//! and only happen before any response byte went to the client.
//!
//! A breaker set in `mode: dryRun` refuses nothing: its open breakers do
//! not steer the split or the balancer, and a request it would have
//! refused (`circuit_open`: every endpoint the subset allows is open;
//! `overflow`) is counted once, marked on the trail, and sent.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use tokio::time::Instant;

use crate::body::{ProxyBody, StreamedBody};
use crate::clock;
use crate::error::ProxyError;
use crate::identity::tls::TlsFailure;
use crate::policy::breaker::{BreakerPermit, MAX_PENDING_WAIT};
use crate::policy::index::RoutePolicies;
use crate::policy::outcome::Outcome;
use crate::policy::retry::{NotReplayable, RetryPolicy};
use crate::settings::Limits;
use crate::telemetry::trail::Trail;
use crate::upstream::balance::{Endpoint, Tried};
use crate::upstream::busy_poll;
use crate::upstream::in_flight::{ClientPress, ClientStreams, StreamSlot};
use crate::upstream::pool::{Answer, SendError};
use crate::upstream::target::ServiceTarget;

/// Endpoints tried for one request before giving up on connect failures.
const MAX_CONNECT_ATTEMPTS: usize = 3;

/// (Written as a function returning an `async move` block rather than an
/// `async fn`: an `async fn` keeps a second copy of its by-value arguments
/// in its future, and every future above it embeds this one; see
/// ARCHITECTURE.md, "Future sizes".)
#[allow(clippy::manual_async_fn)] // an `async fn` would copy the request twice into its future
pub fn forward<'a>(
    target: &'a ServiceTarget,
    request: Request<ProxyBody>,
    policies: RoutePolicies<'a>,
    limits: &'a Limits,
    trail: &'a mut Trail,
) -> impl Future<Output = Result<Response<ProxyBody>, ProxyError>> + 'a {
    async move {
        let timeouts = policies.timeouts;
        let timeout = timeouts.and_then(|t| t.request).or(limits.upstream_timeout);
        // The deadline runs from arrival: time spent waiting for a slot counts.
        let deadline = timeout.map(|t| (clock::now() + t, t));
        // The policies' own waits are boxed: their futures would otherwise
        // sit (unused) inside every request's future and be copied with it.
        if let Some(fault) = policies.fault {
            Box::pin(fault.apply(&target.name, deadline, trail)).await?;
        }
        let slot = match policies.breaker {
            Some(breakers) => {
                let wait = timeout.map_or(MAX_PENDING_WAIT, |t| t.min(MAX_PENDING_WAIT));
                Box::pin(breakers.admit_or_note(&target.name, wait, trail)).await?
            }
            None => None,
        };
        let send = Send {
            target,
            policies,
            client: request.extensions().get::<ClientStreams>().cloned(),
            press: request.extensions().get::<ClientPress>().cloned(),
            idle_timeout: timeouts.and_then(|t| t.idle).or(limits.stream_idle_timeout),
            deadline,
        };
        let response = match policies.retry {
            Some(retry) => Box::pin(send.with_retries(retry, request, trail)).await,
            None => send.one_try(request, send.deadline, trail).await,
        }?;
        Ok(response.map(|body| body.with_slot(slot)))
    }
}

/// What every try of one request shares.
struct Send<'a> {
    target: &'a ServiceTarget,
    policies: RoutePolicies<'a>,
    /// The downstream connection's stream allowance (from the request's
    /// extensions; a retry's copy of the request gets it back).
    client: Option<ClientStreams>,
    /// The client side the upstream pool presses when short of streams
    /// (from the request's extensions, given back to a retry's copy like
    /// `client`).
    press: Option<ClientPress>,
    idle_timeout: Option<Duration>,
    /// The overall deadline for response headers and its duration.
    deadline: Option<(Instant, Duration)>,
}

impl<'a> Send<'a> {
    async fn with_retries(
        &self,
        retry: &RetryPolicy,
        request: Request<ProxyBody>,
        trail: &mut Trail,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        retry.budget.record_request(clock::now_std());
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
    #[allow(clippy::manual_async_fn)] // an `async fn` would copy the request twice into its future
    fn one_try<'s>(
        &'s self,
        mut request: Request<ProxyBody>,
        deadline: Option<(Instant, Duration)>,
        trail: &'s mut Trail,
    ) -> impl Future<Output = Result<Response<ProxyBody>, ProxyError>> + use<'a, 's> {
        async move {
            if let Some(client) = &self.client {
                if request.extensions().get::<ClientStreams>().is_none() {
                    request.extensions_mut().insert(client.clone());
                }
            }
            if let Some(press) = &self.press {
                if request.extensions().get::<ClientPress>().is_none() {
                    request.extensions_mut().insert(press.clone());
                }
            }
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
                let awaiting = busy_poll::awaiting_response();
                let sent = endpoint
                    .pool
                    .dispatch(request, deadline.map(|(at, _)| at))
                    .await;
                // A failure (refused, reset, timed out) is not a response:
                // neither the average wait nor the arrivals count it (nor
                // a forward dropped here because its client went away).
                if sent.is_ok() {
                    awaiting.arrived();
                } else {
                    drop(awaiting);
                }
                match self.record(sent, endpoint, permit, deadline) {
                    Sent::Answered(response, stream) => {
                        let idle = self.idle_timeout;
                        return Ok(response.map(|body| {
                            ProxyBody::streamed(body, idle)
                                .with_guard(in_flight)
                                .with_stream(stream)
                        }));
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
    }

    /// Whether endpoint `index`'s breaker (if any, and enforcing) lets a
    /// request through.
    fn breaker_admits(&self, index: usize, now: std::time::Instant) -> bool {
        self.policies.breaker.is_none_or(|b| {
            !b.enforcing()
                || b.breakers
                    .get(index)
                    .is_none_or(|breaker| breaker.allows(now))
        })
    }

    /// Phase 1: the traffic split's subset for this try (`None`: no split,
    /// every endpoint). A subset whose every endpoint's breaker is open is
    /// skipped, like one without healthy endpoints: the others take its
    /// share.
    fn pick_subset(&self) -> Option<&[usize]> {
        self.policies.split.and_then(|split| {
            let now = clock::now_std();
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
        // The clock is read only when there are breakers to ask.
        let Some(set) = self.policies.breaker else {
            let allowed = |i: usize| in_subset(subset, i);
            let Some((index, endpoint)) = self.target.balancer.pick_among(*tried, allowed) else {
                return Admission::NoneLeft;
            };
            tried.insert(index);
            trail.upstream = Some(endpoint.addr);
            return Admission::Admitted(endpoint, None);
        };
        let now = clock::now_std();
        let allowed = |i: usize| in_subset(subset, i) && self.breaker_admits(i, now);
        let Some((index, endpoint)) = self.target.balancer.pick_among(*tried, allowed) else {
            return Admission::NoneLeft;
        };
        tried.insert(index);
        trail.upstream = Some(endpoint.addr);
        match set.breakers.get(index).map(|b| b.try_acquire(now)) {
            Some(Some(permit)) => Admission::Admitted(endpoint, Some(permit)),
            None => Admission::Admitted(endpoint, None),
            Some(None) => match &set.dry_run {
                None => Admission::BreakerBusy,
                Some(dry_run) => {
                    // An enforcing set would have sent it to another
                    // endpoint if one allowed it; else refused it.
                    let any_allows = set
                        .breakers
                        .iter()
                        .enumerate()
                        .any(|(i, b)| in_subset(subset, i) && b.allows(now));
                    if !any_allows && trail.would_refuse.is_none() {
                        dry_run.circuit_open.note(trail);
                    }
                    Admission::Admitted(endpoint, None)
                }
            },
        }
    }

    /// Phase 4: the try's outcome on the endpoint's breaker and the
    /// target's counters, and what it means for the request.
    fn record(
        &self,
        sent: Result<Answer, SendError>,
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
            Ok((response, stream)) => {
                record(Outcome::Status(response.status()));
                Sent::Answered(response, stream)
            }
            Err(SendError::Connect { source, .. })
                if matches!(
                    TlsFailure::of(&source),
                    Some(TlsFailure::CertificateExpired { .. })
                ) =>
            {
                // Our own certificate, not the endpoint: no other endpoint
                // would do better, and the pool already said so in the log.
                Sent::Failed(ProxyError::connect_failed(endpoint.addr, source))
            }
            Err(SendError::Connect {
                source,
                request: unsent,
            }) => {
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
            // The client's own request body failed while it was sent (bad
            // chunked framing, a stall): the client's fault, a 400, and no
            // mark against an upstream that did nothing wrong.
            Err(SendError::Upstream(source)) if source.is_request_body_failure() => {
                Sent::Failed(ProxyError::RequestBodyFailed {
                    detail: source.to_string(),
                })
            }
            Err(SendError::Upstream(source)) => {
                record(Outcome::Reset);
                Sent::Failed(ProxyError::Upstream {
                    addr: endpoint.addr,
                    source,
                })
            }
            Err(SendError::TimedOut) => {
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
            return ProxyError::connect_failed(addr, source);
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
    /// A response, and the upstream HTTP/2 stream it holds (if any).
    Answered(Response<StreamedBody>, Option<StreamSlot>),
    Failed(ProxyError),
    /// The connection was refused; the request comes back unsent.
    Refused {
        error: std::io::Error,
        unsent: Box<Request<ProxyBody>>,
    },
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use meshlet_api::mesh::MeshState;

    use super::*;
    use crate::control::snapshot::{Own, Snapshot};
    use crate::telemetry::metrics::Metrics;
    use crate::testing::{get, refusing_addr, text, AfterResponse, Upstream};
    use crate::upstream::balance::Endpoint;

    /// A snapshot of service `orders` at `endpoints` (address, version
    /// label), with the policy documents in `policies`.
    fn mesh(endpoints: &[(SocketAddr, &str)], policies: &str) -> Snapshot {
        let endpoints: String = endpoints
            .iter()
            .map(|(addr, version)| {
                format!("  - {{address: '{addr}', labels: {{version: {version}}}}}\n")
            })
            .collect();
        let yaml = format!(
            "apiVersion: meshlet.dev/v1alpha1\nkind: Service\nmetadata: {{name: orders}}\nspec:\n  endpoints:\n{endpoints}{policies}"
        );
        let resources = meshlet_api::parse_documents("t.yaml", &yaml).unwrap();
        let own = Own {
            namespace: "default",
            service: "frontend",
            identity: None,
        };
        let limits = Arc::new(Limits::default());
        Snapshot::build(
            &MeshState::from_resources(&resources),
            "test".into(),
            None,
            own,
            &limits,
            &Metrics::new("frontend"),
        )
    }

    fn policy(kind: &str, spec: &str) -> String {
        format!("---\napiVersion: meshlet.dev/v1alpha1\nkind: {kind}\nmetadata: {{name: orders-{}}}\nspec:\n  targetRef: {{service: orders}}\n  {spec}\n", kind.to_lowercase())
    }

    /// A breaker that opens on the first failure, for a minute.
    fn breaker() -> String {
        policy(
            "CircuitBreakerPolicy",
            "consecutiveFailures: 1\n  openDuration: 60s",
        )
    }

    fn orders(snapshot: &Snapshot) -> &ServiceTarget {
        snapshot.service("orders").expect("orders is in the mesh")
    }

    fn endpoint(target: &ServiceTarget, addr: SocketAddr) -> (usize, &Arc<Endpoint>) {
        target
            .balancer
            .endpoints()
            .iter()
            .enumerate()
            .find(|(_, ep)| ep.addr == addr)
            .expect("an endpoint of the target")
    }

    /// Opens the breaker of `addr` (one connect failure).
    fn open_breaker(target: &ServiceTarget, addr: SocketAddr) {
        let (index, _) = endpoint(target, addr);
        let breakers = &target.policies.breakers[0].breakers;
        let permit = breakers[index].try_acquire(std::time::Instant::now());
        permit
            .expect("closed breaker admits")
            .record(Outcome::ConnectFailure);
        assert!(!breakers[index].allows(std::time::Instant::now()), "open");
    }

    async fn send(
        target: &ServiceTarget,
        limits: &Limits,
    ) -> (Result<Response<ProxyBody>, ProxyError>, Trail) {
        let mut trail = Trail::default();
        let policies = target.policies.for_request(&http::Method::GET, "/");
        let result = forward(target, get("/"), policies, limits, &mut trail).await;
        (result, trail)
    }

    #[tokio::test]
    async fn a_refused_connection_is_retried_on_another_endpoint() {
        let live = Upstream::http1("live", AfterResponse::KeepOpen).await;
        let refusing = refusing_addr().await;
        let snapshot = mesh(&[(live.addr, "v1"), (refusing, "v1")], "");
        let target = orders(&snapshot);
        // The live endpoint looks busier, so the balancer picks the
        // refusing one first.
        let _busy = endpoint(target, live.addr).1.start_request();
        let (result, trail) = send(target, &Limits::default()).await;
        assert_eq!(text(result.expect("answered")).await, "live");
        assert_eq!(trail.upstream, Some(live.addr));
        assert_eq!(trail.retries, 0, "a connect retry is not a policy retry");
        assert_eq!(target.metrics.connect_errors.get(), 1);
        assert!(endpoint(target, refusing).1.is_ejected());
    }

    #[tokio::test]
    async fn only_refusing_endpoints_give_the_last_connect_error() {
        let refusing = refusing_addr().await;
        let snapshot = mesh(&[(refusing, "v1")], "");
        let (result, _) = send(orders(&snapshot), &Limits::default()).await;
        let error = result.expect_err("nothing answers");
        assert!(
            matches!(error, ProxyError::ConnectFailed { addr, .. } if addr == refusing),
            "{error:?}"
        );
        assert_eq!(error.reason(), "upstream_connect_failed");
    }

    #[tokio::test]
    async fn an_endpoint_whose_breaker_is_open_is_skipped() {
        let (a, b) = (
            Upstream::http1("a", AfterResponse::KeepOpen).await,
            Upstream::http1("b", AfterResponse::KeepOpen).await,
        );
        let snapshot = mesh(&[(a.addr, "v1"), (b.addr, "v1")], &breaker());
        let target = orders(&snapshot);
        open_breaker(target, a.addr);
        for _ in 0..10 {
            let (result, _) = send(target, &Limits::default()).await;
            assert_eq!(text(result.expect("answered")).await, "b");
        }
        assert_eq!(a.requests(), 0);
        assert_eq!(b.requests(), 10);
    }

    #[tokio::test]
    async fn the_split_subset_wins_over_the_balancer() {
        let (v1, v2) = (
            Upstream::http1("v1", AfterResponse::KeepOpen).await,
            Upstream::http1("v2", AfterResponse::KeepOpen).await,
        );
        let split = policy(
            "TrafficSplit",
            "splits:\n  - {labels: {version: v2}, weight: 1}",
        );
        let snapshot = mesh(&[(v1.addr, "v1"), (v2.addr, "v2")], &split);
        let target = orders(&snapshot);
        // Least-loaded balancing alone would choose v1.
        let _busy = endpoint(target, v2.addr).1.start_request();
        for _ in 0..10 {
            let (result, _) = send(target, &Limits::default()).await;
            assert_eq!(text(result.expect("answered")).await, "v2");
        }
        assert_eq!(v1.requests(), 0);
    }

    #[tokio::test]
    async fn a_subset_whose_breakers_are_all_open_gives_its_share_to_the_others() {
        let (v1, v2) = (
            Upstream::http1("v1", AfterResponse::KeepOpen).await,
            Upstream::http1("v2", AfterResponse::KeepOpen).await,
        );
        let split = policy(
            "TrafficSplit",
            "splits:\n  - {labels: {version: v1}, weight: 1}\n  - {labels: {version: v2}, weight: 1000}",
        );
        let snapshot = mesh(&[(v1.addr, "v1"), (v2.addr, "v2")], &(split + &breaker()));
        let target = orders(&snapshot);
        open_breaker(target, v2.addr);
        for _ in 0..10 {
            let (result, _) = send(target, &Limits::default()).await;
            assert_eq!(text(result.expect("answered")).await, "v1");
        }
        assert_eq!(v2.requests(), 0);
    }

    #[tokio::test]
    async fn with_every_breaker_open_nothing_is_sent_and_the_answer_is_circuit_open() {
        let (a, b) = (
            Upstream::http1("a", AfterResponse::KeepOpen).await,
            Upstream::http1("b", AfterResponse::KeepOpen).await,
        );
        let snapshot = mesh(&[(a.addr, "v1"), (b.addr, "v1")], &breaker());
        let target = orders(&snapshot);
        open_breaker(target, a.addr);
        open_breaker(target, b.addr);
        let (result, _) = send(target, &Limits::default()).await;
        let error = result.expect_err("refused by the mesh");
        assert!(matches!(error, ProxyError::CircuitOpen { .. }), "{error:?}");
        assert_eq!(error.reason(), "circuit_open");
        assert_eq!(error.status(), 503);
        assert_eq!(a.requests() + b.requests(), 0);
    }

    #[tokio::test]
    async fn a_dry_run_breaker_sends_what_it_would_refuse_and_counts_it_once() {
        let failing = Upstream::http1("failing", AfterResponse::Garbage).await;
        let dry = policy(
            "CircuitBreakerPolicy",
            "consecutiveFailures: 2\n  openDuration: 60s\n  mode: dryRun",
        );
        let snapshot = mesh(&[(failing.addr, "v1")], &dry);
        let target = orders(&snapshot);
        let set = &target.policies.breakers[0];
        for i in 0..5 {
            let (result, trail) = send(target, &Limits::default()).await;
            let error = result.expect_err("the upstream breaks every exchange");
            assert_eq!(
                error.reason(),
                "upstream_reset",
                "try {i}: sent, never refused"
            );
            // The first two failures open it; later requests would have
            // been refused.
            let marked = trail.would_refuse.as_deref();
            if i < 2 {
                assert_eq!(marked, None, "try {i}");
            } else {
                assert_eq!(
                    marked,
                    Some("CircuitBreakerPolicy/orders-circuitbreakerpolicy:circuit_open")
                );
            }
        }
        assert_eq!(failing.requests(), 5);
        assert!(
            !set.breakers[0].allows(std::time::Instant::now()),
            "it runs"
        );
        assert_eq!(set.dry_run.as_ref().unwrap().circuit_open.get(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn an_injected_abort_is_answered_before_anything_is_sent_and_never_retried() {
        let live = Upstream::http1("live", AfterResponse::KeepOpen).await;
        let policies = policy("FaultInjectionPolicy", "abort: {status: 503}")
            + &policy("RetryPolicy", "attempts: 3\n  retryOn: [5xx]")
            + &breaker();
        let snapshot = mesh(&[(live.addr, "v1")], &policies);
        let target = orders(&snapshot);
        let (result, trail) = send(target, &Limits::default()).await;
        let error = result.expect_err("aborted");
        assert_eq!(
            (error.status().as_u16(), error.reason()),
            (503, "fault_injected")
        );
        assert_eq!(trail.retries, 0);
        assert_eq!(trail.upstream, None);
        assert_eq!(trail.fault.unwrap().to_string(), "abort 503");
        assert_eq!(live.requests(), 0);
        let breakers = &target.policies.breakers[0];
        assert_eq!(breakers.in_flight(), 0);
        assert!(
            breakers.breakers[0].allows(std::time::Instant::now()),
            "no outcome"
        );
    }

    #[tokio::test]
    async fn a_target_without_healthy_endpoints_is_no_healthy_endpoint() {
        let snapshot = mesh(&[], &breaker());
        let (result, _) = send(orders(&snapshot), &Limits::default()).await;
        let error = result.expect_err("nowhere to send");
        assert_eq!(error.reason(), "no_healthy_endpoint");
    }

    #[tokio::test]
    async fn an_upstream_that_breaks_the_exchange_is_upstream_reset_and_counts_on_its_breaker() {
        let broken = Upstream::http1("broken", AfterResponse::Garbage).await;
        let snapshot = mesh(&[(broken.addr, "v1")], &breaker());
        let target = orders(&snapshot);
        let (result, trail) = send(target, &Limits::default()).await;
        let error = result.expect_err("no HTTP answer");
        assert!(matches!(error, ProxyError::Upstream { .. }), "{error:?}");
        assert_eq!(
            (error.status().as_u16(), error.reason()),
            (502, "upstream_reset")
        );
        assert_eq!(trail.upstream, Some(broken.addr));
        let (index, _) = endpoint(target, broken.addr);
        let breaker = &target.policies.breakers[0].breakers[index];
        assert!(
            !breaker.allows(std::time::Instant::now()),
            "a reset opened it"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_upstream_times_out_at_the_deadline() {
        let silent = Upstream::http1("silent", AfterResponse::NeverAnswer).await;
        let snapshot = mesh(&[(silent.addr, "v1")], "");
        let target = orders(&snapshot);
        let limits = Limits {
            upstream_timeout: Some(Duration::from_secs(30)),
            connect_timeout: Duration::from_secs(3600),
            ..Limits::default()
        };
        let started = Instant::now();
        let (result, _) = send(target, &limits).await;
        let error = result.expect_err("no answer");
        assert!(
            matches!(error, ProxyError::UpstreamTimeout { .. }),
            "{error:?}"
        );
        assert_eq!(error.status(), 504);
        assert_eq!(started.elapsed(), Duration::from_secs(30), "(paused clock)");
        assert_eq!(target.metrics.timeouts.get(), 1);
    }
}
