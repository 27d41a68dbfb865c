//! `FaultInjectionPolicy` on the outbound side of callers: injected delays
//! and aborts.
//!
//! Data flow: `Snapshot::build` makes one [`FaultPolicy`] per policy that
//! targets a service (in `OutboundPolicies`, with its two
//! `meshlet_faults_injected_total` handles resolved once); the request
//! path finds the most specific matching one (`RoutePolicies::fault`) and
//! `forward` calls [`FaultPolicy::apply`] first, before the concurrency
//! slot and the retry loop:
//!
//! ```text
//! decide (fastrand, per request: delay? abort? sampled independently)
//!  └─ delay: sleep, bounded by the request's overall deadline (past it: 504
//!     upstream_timeout, as if the upstream had been slow)
//!      └─ abort: ProxyError::FaultInjected → status, x-meshlet-reason:
//!         fault_injected (not retried, never reaches an upstream, no
//!         breaker outcome)
//! ```
//!
//! What was injected is noted in the request's `Trail` (span attribute
//! `meshlet.fault`, access-log field `fault`).

use std::time::Duration;

use http::StatusCode;
use meshlet_api::fault::FaultInjectionSpec;
use meshlet_api::policy::RouteMatch;
use prometheus::IntCounter;
use tokio::time::Instant;

use crate::error::ProxyError;
use crate::telemetry::trail::{FaultNote, Trail};

/// One `FaultInjectionPolicy`, resolved.
#[derive(Debug)]
pub struct FaultPolicy {
    /// `metadata.name`, named in the injected answer.
    pub name: String,
    pub route: RouteMatch,
    pub spec: FaultInjectionSpec,
    delay: Option<(Duration, f64)>,
    abort: Option<(StatusCode, f64)>,
    /// `meshlet_faults_injected_total{kind="delay"}` and `{kind="abort"}`.
    delayed: IntCounter,
    aborted: IntCounter,
}

/// What to inject into one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Decision {
    pub delay: Option<Duration>,
    pub abort: Option<StatusCode>,
}

/// Whether a request falls in `percent` (0..=100) of requests.
fn sampled(percent: f64) -> bool {
    percent >= 100.0 || (percent > 0.0 && fastrand::f64() * 100.0 < percent)
}

impl FaultPolicy {
    /// The policy `name` with `spec`; `delayed` and `aborted` are its
    /// `meshlet_faults_injected_total` handles.
    pub fn new(
        name: String,
        spec: FaultInjectionSpec,
        delayed: IntCounter,
        aborted: IntCounter,
    ) -> Self {
        FaultPolicy {
            route: spec.route.clone().unwrap_or_default(),
            delay: spec
                .delay
                .as_ref()
                .map(|d| (d.fixed.get(), d.percent.get())),
            abort: spec.abort.as_ref().map(|a| {
                let status =
                    StatusCode::from_u16(a.status.get()).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
                (status, a.percent.get())
            }),
            name,
            spec,
            delayed,
            aborted,
        }
    }

    /// Samples this request: each of delay and abort on its own.
    pub fn decide(&self) -> Decision {
        Decision {
            delay: self
                .delay
                .filter(|(_, percent)| sampled(*percent))
                .map(|(d, _)| d),
            abort: self
                .abort
                .filter(|(_, percent)| sampled(*percent))
                .map(|(s, _)| s),
        }
    }

    /// Samples and injects: waits out a delay (within `deadline`, the
    /// request's overall one: `upstream` timed out past it), then answers
    /// an abort. `Ok` lets the request go on. Counted and noted in `trail`.
    pub async fn apply(
        &self,
        upstream: &str,
        deadline: Option<(Instant, Duration)>,
        trail: &mut Trail,
    ) -> Result<(), ProxyError> {
        self.inject(self.decide(), upstream, deadline, trail).await
    }

    async fn inject(
        &self,
        decision: Decision,
        upstream: &str,
        deadline: Option<(Instant, Duration)>,
        trail: &mut Trail,
    ) -> Result<(), ProxyError> {
        if decision == Decision::default() {
            return Ok(());
        }
        let mut note = FaultNote::default();
        if let Some(delay) = decision.delay {
            self.delayed.inc();
            note.delay = Some(delay);
            trail.fault = Some(note);
            let until = Instant::now() + delay;
            match deadline {
                Some((at, timeout)) if at < until => {
                    tokio::time::sleep_until(at).await;
                    return Err(ProxyError::UpstreamTimeout {
                        upstream: upstream.to_owned(),
                        timeout,
                    });
                }
                _ => tokio::time::sleep_until(until).await,
            }
        }
        if let Some(status) = decision.abort {
            self.aborted.inc();
            note.abort = Some(status.as_u16());
            trail.fault = Some(note);
            return Err(ProxyError::FaultInjected {
                policy: self.name.clone(),
                status,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(spec: &str) -> FaultPolicy {
        let text = format!(
            "apiVersion: meshlet.dev/v1alpha1\nkind: FaultInjectionPolicy\nmetadata: {{name: chaos}}\n\
             spec:\n  targetRef: {{service: orders}}\n{spec}"
        );
        let meshlet_api::Resource::FaultInjectionPolicy(doc) =
            meshlet_api::parse_documents("t.yaml", &text)
                .unwrap()
                .remove(0)
        else {
            panic!("not a FaultInjectionPolicy")
        };
        let counter = |n: &str| IntCounter::new(n, "test").unwrap();
        FaultPolicy::new(doc.metadata.name, doc.spec, counter("d"), counter("a"))
    }

    #[test]
    fn percent_samples_each_fault_on_its_own() {
        let p = policy("  delay: {fixed: 1s, percent: 30}\n  abort: {status: 503, percent: 10}\n");
        let n = 20_000;
        let decisions: Vec<Decision> = (0..n).map(|_| p.decide()).collect();
        let delayed = decisions.iter().filter(|d| d.delay.is_some()).count();
        let aborted = decisions.iter().filter(|d| d.abort.is_some()).count();
        let both = decisions
            .iter()
            .filter(|d| d.delay.is_some() && d.abort.is_some())
            .count();
        // Binomial: sigma(30 %) ≈ 65, sigma(10 %) ≈ 42, sigma(3 %) ≈ 24;
        // bounds at more than 5 sigma.
        assert!((5_600..6_400).contains(&delayed), "{delayed}");
        assert!((1_750..2_250).contains(&aborted), "{aborted}");
        assert!((480..720).contains(&both), "independent: {both}");
        let always = policy("  abort: {status: 418}\n");
        assert!((0..100).all(|_| always.decide().abort == Some(StatusCode::IM_A_TEAPOT)));
        let never = policy("  delay: {fixed: 1s, percent: 0}\n");
        assert!((0..1000).all(|_| never.decide() == Decision::default()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_delay_is_served_then_an_abort_answered_and_both_noted() {
        let p = policy("  delay: {fixed: 200ms}\n  abort: {status: 503}\n");
        let mut trail = Trail::default();
        let started = Instant::now();
        let err = p.apply("orders", None, &mut trail).await.unwrap_err();
        assert_eq!(started.elapsed(), Duration::from_millis(200));
        assert_eq!(err.reason(), "fault_injected");
        assert_eq!(err.status(), 503);
        assert_eq!(trail.fault.unwrap().to_string(), "delay 200ms, abort 503");
        assert_eq!((p.delayed.get(), p.aborted.get()), (1, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_delay_counts_toward_the_request_timeout() {
        let p = policy("  delay: {fixed: 2s}\n");
        let mut trail = Trail::default();
        let started = Instant::now();
        let timeout = Duration::from_millis(500);
        let err = p
            .apply("orders", Some((started + timeout, timeout)), &mut trail)
            .await
            .unwrap_err();
        assert_eq!(started.elapsed(), timeout);
        assert_eq!(err.reason(), "upstream_timeout");
        // Within the deadline the request goes on.
        let p = policy("  delay: {fixed: 100ms}\n");
        let started = Instant::now();
        p.apply("orders", Some((started + timeout, timeout)), &mut trail)
            .await
            .unwrap();
        assert_eq!(started.elapsed(), Duration::from_millis(100));
    }
}
