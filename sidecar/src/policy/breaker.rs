//! `CircuitBreakerPolicy` enforcement on the outbound side: one breaker per
//! endpoint of the target, plus the target-wide concurrency limit.
//!
//! Data flow: `Snapshot::build` makes one [`BreakerSet`] per policy with a
//! [`Breaker`] per healthy endpoint, aligned with the balancer's endpoint
//! list (reused from the previous snapshot by address when the policy's
//! identity and spec are unchanged). `forward` first takes a concurrency
//! slot ([`BreakerSet::admit`]: `maxConcurrentRequests`, then at most
//! `maxPendingRequests` waiting for one), then asks the balancer to pick
//! only among endpoints whose breaker admits a request
//! ([`Breaker::allows`]), takes a [`BreakerPermit`] from the chosen one and
//! records the outcome on it.
//!
//! State machine (per endpoint):
//!
//! ```text
//! closed ──consecutiveFailures failures──► open ──openDuration──► half-open
//!   ▲                                       ▲                         │
//!   └──────────── a trial succeeds ─────────┼── a trial fails ────────┘
//! ```
//!
//! In `mode: dryRun` ([`BreakerSet::dry_run`]) nothing is refused: the
//! state machine runs on the outcomes as usual, the balancer ignores open
//! breakers, and a request an enforcing set would have refused is counted
//! (`WouldRefuse`) and sent: `circuit_open` when every endpoint it could
//! go to has an open breaker, `overflow` when it finds every
//! `maxConcurrentRequests` slot taken (it would have waited as a pending
//! request or been refused; a dry run cannot tell which without waiting,
//! so with `maxPendingRequests` > 0 this is an upper bound).
//!
//! Half-open lets `halfOpenRequests` trial requests through at a time.
//! The state sits behind a short `std::sync::Mutex` (a few instructions,
//! never across an await). A permit dropped without an outcome (the client
//! went away) frees its trial slot.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use meshlet_api::policy::{CircuitBreakerSpec, FailureKind, RouteMatch};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::clock;
use crate::error::ProxyError;
use crate::policy::dry_run::WouldRefuse;
use crate::policy::outcome::Outcome;
use crate::telemetry::trail::Trail;

/// The longest a request waits for a concurrency slot as a pending one.
pub const MAX_PENDING_WAIT: Duration = Duration::from_secs(1);

/// One policy's breakers for the endpoints of its target.
#[derive(Debug)]
pub struct BreakerSet {
    pub name: String,
    pub spec: CircuitBreakerSpec,
    pub route: RouteMatch,
    /// Aligned with the balancer's endpoints (same index).
    pub breakers: Vec<Arc<Breaker>>,
    /// Shared with the previous set when the spec is unchanged.
    slots: Arc<Semaphore>,
    pending: Arc<AtomicUsize>,
    /// `mode: dryRun`: what it counts instead of refusing.
    pub dry_run: Option<BreakerDryRun>,
}

/// A dry-run breaker set's two refusals.
#[derive(Debug, Clone)]
pub struct BreakerDryRun {
    pub circuit_open: WouldRefuse,
    pub overflow: WouldRefuse,
}

impl BreakerSet {
    /// A set for `endpoints`, reusing breakers (and the concurrency state)
    /// of `previous` when it is for the same spec.
    pub fn new(
        name: String,
        spec: CircuitBreakerSpec,
        endpoints: &[SocketAddr],
        previous: Option<&BreakerSet>,
    ) -> Self {
        let previous = previous.filter(|p| p.spec == spec);
        let breakers = endpoints
            .iter()
            .map(|&addr| {
                previous
                    .and_then(|p| p.breakers.iter().find(|b| b.addr == addr))
                    .map(Arc::clone)
                    .unwrap_or_else(|| Arc::new(Breaker::new(name.clone(), addr, &spec)))
            })
            .collect();
        let (slots, pending) = match previous {
            Some(p) => (Arc::clone(&p.slots), Arc::clone(&p.pending)),
            None => (
                Arc::new(Semaphore::new(spec.max_concurrent_requests as usize)),
                Arc::new(AtomicUsize::new(0)),
            ),
        };
        BreakerSet {
            name,
            route: spec.route.clone().unwrap_or_default(),
            spec,
            breakers,
            slots,
            pending,
            dry_run: None,
        }
    }

    /// The set in `mode: dryRun`, counting on `dry_run`.
    pub fn with_dry_run(mut self, dry_run: Option<BreakerDryRun>) -> Self {
        self.dry_run = dry_run;
        self
    }

    /// Whether the set refuses requests (not in dry run).
    pub fn enforcing(&self) -> bool {
        self.dry_run.is_none()
    }

    /// The concurrency slot of a request: [`BreakerSet::admit`], or in dry
    /// run a free slot if there is one, else none (counted as `overflow`
    /// and marked on `trail`); never waits, never refuses.
    pub async fn admit_or_note(
        &self,
        service: &str,
        max_wait: Duration,
        trail: &mut Trail,
    ) -> Result<Option<OwnedSemaphorePermit>, ProxyError> {
        let Some(dry_run) = &self.dry_run else {
            return self.admit(service, max_wait).await.map(Some);
        };
        match Arc::clone(&self.slots).try_acquire_owned() {
            Ok(permit) => Ok(Some(permit)),
            Err(_) => {
                dry_run.overflow.note(trail);
                Ok(None)
            }
        }
    }

    /// Takes a slot of `maxConcurrentRequests`, waiting (at most
    /// `max_wait`) only if fewer than `maxPendingRequests` already wait.
    pub async fn admit(
        &self,
        service: &str,
        max_wait: Duration,
    ) -> Result<OwnedSemaphorePermit, ProxyError> {
        if let Ok(permit) = Arc::clone(&self.slots).try_acquire_owned() {
            return Ok(permit);
        }
        let overflow = || ProxyError::Overflow {
            service: service.to_owned(),
            max: self.spec.max_concurrent_requests,
        };
        let waiting = self.pending.fetch_add(1, Ordering::Relaxed);
        let _pending = PendingGuard(&self.pending);
        if waiting >= self.spec.max_pending_requests as usize {
            return Err(overflow());
        }
        match tokio::time::timeout(max_wait, Arc::clone(&self.slots).acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(overflow()),
        }
    }

    pub fn in_flight(&self) -> usize {
        (self.spec.max_concurrent_requests as usize).saturating_sub(self.slots.available_permits())
    }

    pub fn to_json(&self) -> serde_json::Value {
        let now = Instant::now();
        serde_json::json!({
            "name": self.name,
            "spec": self.spec,
            "inFlight": self.in_flight(),
            "pending": self.pending.load(Ordering::Relaxed),
            "endpoints": self.breakers.iter().map(|b| b.to_json(now)).collect::<Vec<_>>(),
        })
    }
}

struct PendingGuard<'a>(&'a AtomicUsize);

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The breaker of one endpoint.
#[derive(Debug)]
pub struct Breaker {
    policy: String,
    pub addr: SocketAddr,
    threshold: u32,
    open_for: Duration,
    trials: u32,
    failure_on: Vec<FailureKind>,
    state: Mutex<State>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { trials_in_flight: u32 },
}

impl State {
    fn name(self) -> &'static str {
        match self {
            State::Closed { .. } => "closed",
            State::Open { .. } => "open",
            State::HalfOpen { .. } => "half-open",
        }
    }
}

impl Breaker {
    pub fn new(policy: String, addr: SocketAddr, spec: &CircuitBreakerSpec) -> Self {
        Breaker {
            policy,
            addr,
            threshold: spec.consecutive_failures,
            open_for: spec.open_duration.get(),
            trials: spec.half_open_requests,
            failure_on: spec.failure_on.clone(),
            state: Mutex::new(State::Closed { failures: 0 }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn state(&self) -> State {
        *self.lock()
    }

    /// Whether [`Breaker::try_acquire`] would let a request through now.
    pub fn allows(&self, now: Instant) -> bool {
        match *self.lock() {
            State::Closed { .. } => true,
            State::Open { until } => now >= until,
            State::HalfOpen { trials_in_flight } => trials_in_flight < self.trials,
        }
    }

    /// Lets one request through, or `None` while open.
    pub fn try_acquire(self: &Arc<Self>, now: Instant) -> Option<BreakerPermit> {
        let mut state = self.lock();
        let trial = match *state {
            State::Closed { .. } => false,
            State::Open { until } if now >= until => {
                *state = State::HalfOpen {
                    trials_in_flight: 1,
                };
                drop(state);
                tracing::info!(policy = %self.policy, endpoint = %self.addr, "circuit breaker half-open: letting a trial request through");
                true
            }
            State::Open { .. } => return None,
            State::HalfOpen { trials_in_flight } if trials_in_flight < self.trials => {
                *state = State::HalfOpen {
                    trials_in_flight: trials_in_flight + 1,
                };
                true
            }
            State::HalfOpen { .. } => return None,
        };
        Some(BreakerPermit {
            breaker: Arc::clone(self),
            trial,
            done: false,
        })
    }

    fn record(&self, failed: bool, trial: bool, now: Instant) {
        let mut state = self.lock();
        let before = *state;
        *state = match (before, failed) {
            (State::Closed { .. }, false) => State::Closed { failures: 0 },
            (State::Closed { failures }, true) if failures + 1 >= self.threshold => State::Open {
                until: now + self.open_for,
            },
            (State::Closed { failures }, true) => State::Closed {
                failures: failures + 1,
            },
            (State::HalfOpen { .. }, false) if trial => State::Closed { failures: 0 },
            (State::HalfOpen { .. }, true) if trial => State::Open {
                until: now + self.open_for,
            },
            // Outcomes of requests that started before the state changed
            // do not move an open or half-open breaker.
            (other, _) => other,
        };
        let after = *state;
        drop(state);
        if before.name() != after.name() {
            tracing::info!(policy = %self.policy, endpoint = %self.addr,
                from = before.name(), to = after.name(), "circuit breaker state changed");
        }
    }

    fn release_trial(&self) {
        let mut state = self.lock();
        if let State::HalfOpen { trials_in_flight } = *state {
            *state = State::HalfOpen {
                trials_in_flight: trials_in_flight.saturating_sub(1),
            };
        }
    }

    fn to_json(&self, now: Instant) -> serde_json::Value {
        let state = self.state();
        let mut json = serde_json::json!({"address": self.addr.to_string(), "state": state.name()});
        match state {
            State::Closed { failures } => json["consecutiveFailures"] = failures.into(),
            State::Open { until } => {
                json["reopensInMs"] =
                    (until.saturating_duration_since(now).as_millis() as u64).into()
            }
            State::HalfOpen { trials_in_flight } => {
                json["trialsInFlight"] = trials_in_flight.into()
            }
        }
        json
    }
}

/// A request let through by a breaker; record its outcome on it.
#[derive(Debug)]
pub struct BreakerPermit {
    breaker: Arc<Breaker>,
    trial: bool,
    done: bool,
}

impl BreakerPermit {
    pub fn record(mut self, outcome: Outcome) {
        self.done = true;
        let failed = outcome.is_any(&self.breaker.failure_on);
        self.breaker.record(failed, self.trial, clock::now_std());
    }

    #[cfg(test)]
    fn record_at(mut self, failed: bool, now: Instant) {
        self.done = true;
        self.breaker.record(failed, self.trial, now);
    }
}

impl Drop for BreakerPermit {
    fn drop(&mut self) {
        if !self.done && self.trial {
            self.breaker.release_trial();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(failures: u32, open_ms: u64, trials: u32) -> CircuitBreakerSpec {
        let yaml = format!(
            "targetRef: {{service: orders}}\nconsecutiveFailures: {failures}\nopenDuration: {open_ms}ms\nhalfOpenRequests: {trials}\nmaxConcurrentRequests: 2\nmaxPendingRequests: 1\n"
        );
        serde_yaml_like(&yaml)
    }

    fn serde_yaml_like(yaml: &str) -> CircuitBreakerSpec {
        // The api crate parses whole documents; wrap the spec in one.
        let doc = format!(
            "apiVersion: meshlet.dev/v1alpha1\nkind: CircuitBreakerPolicy\nmetadata: {{name: b}}\nspec:\n{}",
            yaml.lines().map(|l| format!("  {l}\n")).collect::<String>()
        );
        match meshlet_api::parse_documents("t.yaml", &doc)
            .unwrap()
            .remove(0)
        {
            meshlet_api::Resource::CircuitBreakerPolicy(doc) => doc.spec,
            other => panic!("{other:?}"),
        }
    }

    fn breaker(failures: u32, open_ms: u64, trials: u32) -> Arc<Breaker> {
        Arc::new(Breaker::new(
            "b".into(),
            "127.0.0.1:1".parse().unwrap(),
            &spec(failures, open_ms, trials),
        ))
    }

    #[test]
    fn opens_after_consecutive_failures_only() {
        let b = breaker(3, 500, 1);
        let t = Instant::now();
        b.try_acquire(t).unwrap().record_at(true, t);
        b.try_acquire(t).unwrap().record_at(true, t);
        b.try_acquire(t).unwrap().record_at(false, t);
        assert_eq!(b.state(), State::Closed { failures: 0 }, "a success resets");
        for _ in 0..3 {
            b.try_acquire(t).unwrap().record_at(true, t);
        }
        assert!(matches!(b.state(), State::Open { .. }));
        assert!(!b.allows(t));
        assert!(b.try_acquire(t + Duration::from_millis(499)).is_none());
    }

    #[test]
    fn half_open_lets_trials_through_then_closes_or_reopens() {
        let b = breaker(1, 500, 1);
        let t = Instant::now();
        b.try_acquire(t).unwrap().record_at(true, t);
        let later = t + Duration::from_millis(500);
        assert!(b.allows(later));
        let trial = b.try_acquire(later).unwrap();
        assert!(b.try_acquire(later).is_none(), "only one trial at a time");
        trial.record_at(true, later);
        assert!(
            matches!(b.state(), State::Open { .. }),
            "failed trial re-opens"
        );
        let again = later + Duration::from_millis(500);
        b.try_acquire(again).unwrap().record_at(false, again);
        assert_eq!(b.state(), State::Closed { failures: 0 });
    }

    #[test]
    fn a_dropped_trial_frees_its_slot() {
        let b = breaker(1, 10, 1);
        let t = Instant::now();
        b.try_acquire(t).unwrap().record_at(true, t);
        let later = t + Duration::from_millis(10);
        drop(b.try_acquire(later).unwrap());
        assert!(b.try_acquire(later).is_some());
    }

    #[test]
    fn outcomes_match_failure_kinds() {
        let kinds = [FailureKind::GatewayError, FailureKind::Timeout];
        assert!(Outcome::Status(http::StatusCode::BAD_GATEWAY).is_any(&kinds));
        assert!(!Outcome::Status(http::StatusCode::INTERNAL_SERVER_ERROR).is_any(&kinds));
        assert!(Outcome::Status(http::StatusCode::INTERNAL_SERVER_ERROR)
            .is_any(&[FailureKind::ServerError]));
        assert!(Outcome::Timeout.is_any(&kinds));
        // A reset reaches the client as a 502: a gateway error too.
        assert!(Outcome::Reset.is_any(&kinds));
        assert!(!Outcome::Reset.is_any(&[FailureKind::Timeout]));
        assert!(Outcome::ConnectFailure.is_any(&[FailureKind::ServerError]));
        assert!(!Outcome::Status(http::StatusCode::OK).is_any(&[FailureKind::ServerError]));
    }

    #[tokio::test]
    async fn concurrency_limit_with_pending_queue() {
        let set = BreakerSet::new("b".into(), spec(5, 100, 1), &[], None);
        assert!(set.enforcing());
        let a = set.admit("s", MAX_PENDING_WAIT).await.unwrap();
        let _b = set.admit("s", MAX_PENDING_WAIT).await.unwrap();
        // One may wait; it gets the slot freed by `a`.
        let waiter = set.admit("s", MAX_PENDING_WAIT);
        tokio::pin!(waiter);
        assert!(futures_poll_once(&mut waiter).await.is_none());
        let overflow = set.admit("s", Duration::from_millis(10)).await.unwrap_err();
        assert_eq!(overflow.reason(), "overflow");
        drop(a);
        assert!(waiter.await.is_ok());
    }

    async fn futures_poll_once<F: std::future::Future + Unpin>(f: &mut F) -> Option<F::Output> {
        tokio::select! {
            biased;
            out = f => Some(out),
            _ = std::future::ready(()) => None,
        }
    }

    #[tokio::test]
    async fn a_dry_run_set_counts_overflow_and_never_waits_or_refuses() {
        let metrics = crate::telemetry::metrics::Metrics::new("frontend");
        let would =
            |reason| WouldRefuse::new(&metrics, "CircuitBreakerPolicy", "default", "b", reason);
        let set = BreakerSet::new("b".into(), spec(5, 100, 1), &[], None).with_dry_run(Some(
            BreakerDryRun {
                circuit_open: would("circuit_open"),
                overflow: would("overflow"),
            },
        ));
        let mut trail = Trail::default();
        let wait = Duration::from_secs(3600);
        let a = set.admit_or_note("s", wait, &mut trail).await.unwrap();
        let b = set.admit_or_note("s", wait, &mut trail).await.unwrap();
        assert!(a.is_some() && b.is_some());
        assert!(trail.would_refuse.is_none());
        // Over maxConcurrentRequests: sent without a slot, counted.
        for _ in 0..3 {
            assert!(set
                .admit_or_note("s", wait, &mut trail)
                .await
                .unwrap()
                .is_none());
        }
        assert_eq!(
            trail.would_refuse.as_deref(),
            Some("CircuitBreakerPolicy/b:overflow")
        );
        assert_eq!(set.dry_run.as_ref().unwrap().overflow.get(), 3);
        drop(a);
        assert!(set
            .admit_or_note("s", wait, &mut trail)
            .await
            .unwrap()
            .is_some());
    }
}
