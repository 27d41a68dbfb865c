//! `RetryPolicy` enforcement on the outbound side: which requests may be
//! retried, the backoff between tries, and the retry budget.
//!
//! Data flow: `Snapshot::build` makes one [`RetryPolicy`] per policy (its
//! [`Budget`] reused from the previous snapshot when identity and spec are
//! unchanged). `forward` asks [`RetryPolicy::replayable`] whether a
//! request may be retried (idempotent method or `retryNonIdempotent`, and a
//! body of at most `maxBodyBytes` that is then kept in memory), records
//! every original request in the budget, and before each retry checks the
//! outcome against `retryOn`, withdraws from the budget and sleeps the
//! backoff (each retry counted on the policy's `retries_total` handle).
//! Retries happen only before the response is handed to the client, so no
//! byte of a failed try ever reached it.
//!
//! **Budget** (Linkerd/Finagle style): over a sliding window of
//! [`BUDGET_WINDOW`] (ten one-second buckets), retries are allowed while
//! `retries < percent% × requests + minPerSecond × 10`. With an upstream
//! that fails every request, retries therefore add at most `percent`% load
//! (plus the small fixed minimum), instead of multiplying an outage.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Uri, Version};
use http_body_util::BodyExt;
use meshlet_api::policy::{RetrySpec, RouteMatch};
use prometheus::IntCounter;

use crate::body::ProxyBody;
use crate::error::ProxyError;
use crate::policy::outcome::Outcome;

/// The sliding window of the retry budget.
pub const BUDGET_WINDOW: Duration = Duration::from_secs(10);
const BUCKETS: usize = 10;

#[derive(Debug)]
pub struct RetryPolicy {
    pub name: String,
    pub spec: RetrySpec,
    pub route: RouteMatch,
    pub budget: Budget,
    /// `retries_total{destination, policy}`, resolved at snapshot build.
    pub retries: IntCounter,
}

impl RetryPolicy {
    pub fn new(name: String, spec: RetrySpec, retries: IntCounter) -> Self {
        RetryPolicy {
            name,
            route: spec.route.clone().unwrap_or_default(),
            budget: Budget::new(spec.budget.percent, spec.budget.min_per_second),
            spec,
            retries,
        }
    }

    /// Whether `method` may be retried under this policy.
    pub fn method_allowed(&self, method: &Method) -> bool {
        self.spec.retry_non_idempotent
            || matches!(
                *method,
                Method::GET
                    | Method::HEAD
                    | Method::OPTIONS
                    | Method::PUT
                    | Method::DELETE
                    | Method::TRACE
            )
    }

    /// Whether a failed try with `outcome` is worth another.
    pub fn retries_on(&self, outcome: Outcome) -> bool {
        outcome.is_any(&self.spec.retry_on)
    }

    /// The delay before retry number `retry` (1-based): full jitter over
    /// `[0, min(max, base × 2^(retry-1))]`.
    pub fn backoff(&self, retry: u32) -> Duration {
        let base = self.spec.backoff.base.get();
        let cap = self.spec.backoff.max.get();
        let ceiling = base
            .checked_mul(1u32 << (retry.saturating_sub(1)).min(16))
            .unwrap_or(cap)
            .min(cap);
        ceiling.mul_f64(fastrand::f64())
    }

    /// Turns `request` into a [`Replayable`] one when it may be retried:
    /// the method allows it and the body is empty or announces at most
    /// `maxBodyBytes` (then it is read into memory, within `deadline`).
    pub async fn replayable(
        &self,
        request: Request<ProxyBody>,
        deadline: Option<(tokio::time::Instant, Duration)>,
    ) -> Result<Replayable, NotReplayable> {
        if !self.method_allowed(request.method()) {
            return Err(NotReplayable::Stream(Box::new(request)));
        }
        let body_len = http_body::Body::size_hint(request.body()).exact();
        let small = http_body::Body::is_end_stream(request.body())
            || body_len.is_some_and(|len| len <= self.spec.max_body_bytes);
        if !small {
            return Err(NotReplayable::Stream(Box::new(request)));
        }
        let (parts, body) = request.into_parts();
        let collect = body.collect();
        let collected = match deadline {
            Some((at, timeout)) => tokio::time::timeout_at(at, collect)
                .await
                .map_err(|_| NotReplayable::Failed(ProxyError::RequestBodyTimeout { timeout }))?,
            None => collect.await,
        };
        let body = collected
            .map_err(|e| {
                NotReplayable::Failed(ProxyError::RequestBodyFailed {
                    detail: e.to_string(),
                })
            })?
            .to_bytes();
        Ok(Replayable {
            method: parts.method,
            uri: parts.uri,
            version: parts.version,
            headers: parts.headers,
            body,
        })
    }
}

/// Why a request is not made replayable.
#[derive(Debug)]
pub enum NotReplayable {
    /// It may not be retried (method, body size): send it once, streamed.
    Stream(Box<Request<ProxyBody>>),
    /// Its body failed or stalled while being read: answer with this.
    Failed(ProxyError),
}

/// A request kept so that it can be sent more than once.
#[derive(Debug)]
pub struct Replayable {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
    body: Bytes,
}

impl Replayable {
    /// A copy for one try.
    pub fn request(&self) -> Request<ProxyBody> {
        let mut request = Request::new(if self.body.is_empty() {
            ProxyBody::empty()
        } else {
            ProxyBody::full(self.body.clone())
        });
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = self.uri.clone();
        *request.version_mut() = self.version;
        *request.headers_mut() = self.headers.clone();
        request
    }
}

/// Retries allowed as a share of requests over a sliding window.
#[derive(Debug)]
pub struct Budget {
    ratio: f64,
    reserve: f64,
    window: Mutex<Window>,
}

#[derive(Debug)]
struct Window {
    start: Instant,
    /// (second since `start`, requests, retries) per bucket.
    buckets: [(u64, u64, u64); BUCKETS],
}

impl Budget {
    pub fn new(percent: f64, min_per_second: u32) -> Self {
        Budget {
            ratio: percent / 100.0,
            reserve: f64::from(min_per_second) * BUDGET_WINDOW.as_secs_f64(),
            window: Mutex::new(Window {
                start: Instant::now(),
                buckets: [(u64::MAX, 0, 0); BUCKETS],
            }),
        }
    }

    fn with_bucket<T>(
        &self,
        now: Instant,
        f: impl FnOnce(&mut (u64, u64, u64), (u64, u64)) -> T,
    ) -> T {
        let mut window = self.window.lock().unwrap_or_else(|p| p.into_inner());
        let second = now.saturating_duration_since(window.start).as_secs();
        let (mut requests, mut retries) = (0, 0);
        for bucket in &window.buckets {
            if bucket.0 != u64::MAX && bucket.0 + (BUCKETS as u64) > second {
                requests += bucket.1;
                retries += bucket.2;
            }
        }
        let slot = &mut window.buckets[(second % BUCKETS as u64) as usize];
        if slot.0 != second {
            if slot.0 != u64::MAX && slot.0 + (BUCKETS as u64) > second {
                requests -= slot.1;
                retries -= slot.2;
            }
            *slot = (second, 0, 0);
        }
        f(slot, (requests, retries))
    }

    /// Counts an original request.
    pub fn record_request(&self, now: Instant) {
        self.with_bucket(now, |slot, _| slot.1 += 1);
    }

    /// Takes one retry from the budget if there is room.
    pub fn try_withdraw(&self, now: Instant) -> bool {
        self.with_bucket(now, |slot, (requests, retries)| {
            let allowed = (retries + 1) as f64 <= self.ratio * requests as f64 + self.reserve;
            if allowed {
                slot.2 += 1;
            }
            allowed
        })
    }

    /// (requests, retries) in the window, for `/config_dump`.
    pub fn totals(&self, now: Instant) -> (u64, u64) {
        self.with_bucket(now, |_, totals| totals)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_caps_retries_at_the_ratio_plus_reserve() {
        let budget = Budget::new(20.0, 1);
        let t = Instant::now();
        let mut retries = 0;
        for _ in 0..1000 {
            budget.record_request(t);
            if budget.try_withdraw(t) {
                retries += 1;
            }
        }
        // 20% of 1000 plus 1/s over the 10 s window.
        assert!((200..=210).contains(&retries), "{retries}");
        assert_eq!(budget.totals(t), (1000, retries));
    }

    #[test]
    fn budget_window_slides() {
        let budget = Budget::new(0.0, 1);
        let t = Instant::now();
        let granted = (0..50).filter(|_| budget.try_withdraw(t)).count();
        assert_eq!(granted, 10, "only the reserve");
        assert!(!budget.try_withdraw(t + Duration::from_secs(9)));
        let later = t + Duration::from_secs(10);
        assert!(budget.try_withdraw(later), "the first second slid out");
        assert_eq!(budget.totals(later).1, 1);
    }

    #[test]
    fn backoff_is_jittered_under_an_exponential_cap() {
        let spec: RetrySpec = serde_json::from_value(serde_json::json!({
            "targetRef": {"service": "s"}, "backoff": {"base": "10ms", "max": "40ms"}
        }))
        .unwrap();
        let retries = IntCounter::new("retries_total", "test").unwrap();
        let policy = RetryPolicy::new("r".into(), spec, retries);
        for _ in 0..100 {
            assert!(policy.backoff(1) <= Duration::from_millis(10));
            assert!(policy.backoff(2) <= Duration::from_millis(20));
            assert!(policy.backoff(9) <= Duration::from_millis(40));
        }
        assert!(policy.method_allowed(&Method::PUT));
        assert!(!policy.method_allowed(&Method::POST));
    }
}
