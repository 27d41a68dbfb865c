//! The policy kinds: what each sidecar enforces for a target service.
//!
//! Every policy names its target (`targetRef`) and may narrow itself to
//! some requests (`match`: a path prefix and/or methods). When several
//! policies of one kind target the same service, a request gets the most
//! specific one that matches it (longest `pathPrefix`, then one that names
//! methods), so a service-wide default and a stricter `/checkout` policy
//! can coexist.
//!
//! Each spec has documented defaults and a `validate` with the semantic
//! checks serde cannot express; errors name the field path.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::duration::HumanDuration;
use crate::limits::{self, check_len, check_str_len};

pub use crate::limits::FieldError;

fn field_error<T>(path: &str, message: impl Into<String>) -> Result<T, FieldError> {
    Err((format!("spec.{path}"), message.into()))
}

const DAY: Duration = Duration::from_secs(24 * 3600);

fn check_duration(path: &str, d: HumanDuration, max: Duration) -> Result<(), FieldError> {
    if d.get().is_zero() || d.get() > max {
        return field_error(
            path,
            format!(
                "must be greater than 0 and at most {}",
                humantime::format_duration(max)
            ),
        );
    }
    Ok(())
}

/// Which service a policy applies to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TargetRef {
    pub service: String,
    /// Defaults to the policy's own namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// Which requests of the target a policy covers (all when absent).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RouteMatch {
    /// Requests whose path starts with this (e.g. `/api`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    /// Upper-case HTTP methods (e.g. `[GET, HEAD]`); any method when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
}

impl RouteMatch {
    /// Whether a request with this method and path is covered.
    pub fn matches(&self, method: &str, path: &str) -> bool {
        let path_ok = match self.path_prefix.as_deref() {
            Some(prefix) => path.starts_with(prefix),
            None => true,
        };
        path_ok && (self.methods.is_empty() || self.methods.iter().any(|m| m == method))
    }

    /// Orders matches from general to specific: a longer path prefix wins,
    /// then naming methods.
    pub fn specificity(&self) -> (usize, bool) {
        (
            self.path_prefix.as_deref().map_or(0, str::len),
            !self.methods.is_empty(),
        )
    }

    pub(crate) fn validate(&self) -> Result<(), FieldError> {
        if let Some(prefix) = &self.path_prefix {
            check_str_len(
                "spec.match.pathPrefix",
                prefix,
                limits::MAX_PATH_LEN,
                "MAX_PATH_LEN",
            )?;
            if !prefix.starts_with('/') {
                return field_error("match.pathPrefix", "must start with '/'");
            }
        }
        check_len(
            "spec.match.methods",
            self.methods.len(),
            limits::MAX_METHODS,
            "MAX_METHODS",
            "methods",
        )?;
        for (i, method) in self.methods.iter().enumerate() {
            check_str_len(
                &format!("spec.match.methods[{i}]"),
                method,
                limits::MAX_METHOD_LEN,
                "MAX_METHOD_LEN",
            )?;
            let token = !method.is_empty()
                && method
                    .bytes()
                    .all(|b| b.is_ascii_uppercase() || b == b'-' || b == b'_');
            if !token {
                return field_error(
                    &format!("match.methods[{i}]"),
                    format!("{method:?} is not an upper-case HTTP method (GET, POST, ...)"),
                );
            }
        }
        Ok(())
    }
}

/// Whether a policy acts on its decisions (`enforce`, the default) or only
/// counts what it would have refused (`dryRun`: the request goes through,
/// counted in `meshlet_policy_would_refuse_total` and marked on its span and
/// access-log line). Shared by `RateLimitPolicy`, `CircuitBreakerPolicy`
/// and `AuthorizationPolicy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum PolicyMode {
    #[default]
    Enforce,
    DryRun,
}

impl PolicyMode {
    pub fn is_enforce(&self) -> bool {
        *self == PolicyMode::Enforce
    }

    pub fn is_dry_run(&self) -> bool {
        *self == PolicyMode::DryRun
    }
}

// ---------------------------------------------------------------- health

/// `kind: HealthCheckPolicy`: how each sidecar of the target service probes
/// its local app. Without one, the defaults below apply (the seed's
/// `/health`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HealthCheckSpec {
    pub target_ref: TargetRef,
    /// HTTP path probed with GET; a 2xx or 3xx answer is a success.
    #[serde(default = "HealthCheckSpec::default_path")]
    pub path: String,
    #[serde(default = "HealthCheckSpec::default_interval")]
    pub interval: HumanDuration,
    #[serde(default = "HealthCheckSpec::default_timeout")]
    pub timeout: HumanDuration,
    /// Consecutive failures that mark a healthy instance unhealthy.
    #[serde(default = "HealthCheckSpec::default_unhealthy")]
    pub unhealthy_threshold: u32,
    /// Consecutive successes that mark an unhealthy instance healthy.
    #[serde(default = "HealthCheckSpec::default_healthy")]
    pub healthy_threshold: u32,
}

impl HealthCheckSpec {
    fn default_path() -> String {
        "/health".to_owned()
    }
    fn default_interval() -> HumanDuration {
        HumanDuration::from_secs(5)
    }
    fn default_timeout() -> HumanDuration {
        HumanDuration::from_secs(1)
    }
    fn default_unhealthy() -> u32 {
        3
    }
    fn default_healthy() -> u32 {
        1
    }

    /// The check used when no policy targets a service.
    pub fn defaults_for(service: &str) -> Self {
        HealthCheckSpec {
            target_ref: TargetRef {
                service: service.to_owned(),
                namespace: None,
            },
            path: Self::default_path(),
            interval: Self::default_interval(),
            timeout: Self::default_timeout(),
            unhealthy_threshold: Self::default_unhealthy(),
            healthy_threshold: Self::default_healthy(),
        }
    }

    pub(crate) fn validate(&self) -> Result<(), FieldError> {
        const HOUR: Duration = Duration::from_secs(3600);
        check_str_len(
            "spec.path",
            &self.path,
            limits::MAX_PATH_LEN,
            "MAX_PATH_LEN",
        )?;
        if !self.path.starts_with('/') {
            return field_error("path", "must start with '/'");
        }
        check_duration("interval", self.interval, HOUR)?;
        check_duration("timeout", self.timeout, HOUR)?;
        if self.unhealthy_threshold == 0 {
            return field_error("unhealthyThreshold", "must be at least 1");
        }
        if self.healthy_threshold == 0 {
            return field_error("healthyThreshold", "must be at least 1");
        }
        Ok(())
    }
}

// ---------------------------------------------------------------- rate limit

/// `kind: RateLimitPolicy`, enforced on the target's inbound side.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RateLimitSpec {
    pub target_ref: TargetRef,
    #[serde(default, rename = "match", skip_serializing_if = "Option::is_none")]
    pub route: Option<RouteMatch>,
    /// Exactly one of `tokenBucket` and `slidingWindow`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_bucket: Option<TokenBucket>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<SlidingWindow>,
    /// What is counted separately: `service` (all requests together, the
    /// default), `sourceService` (per calling service), `clientIP` (per
    /// client address: a gateway's external clients; the peer, or the
    /// `x-forwarded-for` hop `--xff-trusted-hops` names), or `header:NAME`
    /// (per value of that request header).
    #[serde(default)]
    pub key: RateLimitKey,
    /// `local`: each sidecar allows the whole limit. `global` (default):
    /// the limit is for the service, divided among its healthy instances.
    #[serde(default)]
    pub scope: RateLimitScope,
    /// `enforce` (default) or `dryRun` (counts what it would refuse).
    #[serde(default, skip_serializing_if = "PolicyMode::is_enforce")]
    pub mode: PolicyMode,
}

/// `capacity` requests at once, refilled at `refillPerSecond`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TokenBucket {
    pub capacity: u32,
    pub refill_per_second: f64,
}

/// At most `requests` in any `window` (the seed: 100 per 60 s).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SlidingWindow {
    pub requests: u32,
    pub window: HumanDuration,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum RateLimitKey {
    #[default]
    Service,
    SourceService,
    /// The client's IP address (YAML `clientIP`).
    ClientIp,
    /// A lower-case header name.
    Header(String),
}

impl Serialize for RateLimitKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            RateLimitKey::Service => s.serialize_str("service"),
            RateLimitKey::SourceService => s.serialize_str("sourceService"),
            RateLimitKey::ClientIp => s.serialize_str("clientIP"),
            RateLimitKey::Header(name) => s.collect_str(&format_args!("header:{name}")),
        }
    }
}

impl<'de> Deserialize<'de> for RateLimitKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        match text.as_str() {
            "service" => Ok(RateLimitKey::Service),
            "sourceService" => Ok(RateLimitKey::SourceService),
            "clientIP" => Ok(RateLimitKey::ClientIp),
            other => match other.strip_prefix("header:") {
                Some(name)
                    if !name.is_empty()
                        && name
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') =>
                {
                    Ok(RateLimitKey::Header(name.to_ascii_lowercase()))
                }
                _ => Err(serde::de::Error::custom(format!(
                    "invalid key {other:?}: use service, sourceService, clientIP or header:NAME"
                ))),
            },
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum RateLimitScope {
    Local,
    #[default]
    Global,
}

impl RateLimitSpec {
    pub(crate) fn validate(&self) -> Result<(), FieldError> {
        if let Some(route) = &self.route {
            route.validate()?;
        }
        if let RateLimitKey::Header(name) = &self.key {
            check_str_len(
                "spec.key",
                name,
                limits::MAX_HEADER_NAME_LEN,
                "MAX_HEADER_NAME_LEN",
            )?;
        }
        match (&self.token_bucket, &self.sliding_window) {
            (Some(_), Some(_)) => field_error(
                "tokenBucket",
                "give either tokenBucket or slidingWindow, not both",
            ),
            (None, None) => field_error(
                "tokenBucket",
                "missing: give tokenBucket {capacity, refillPerSecond} or slidingWindow {requests, window}",
            ),
            (Some(bucket), None) => {
                if bucket.capacity == 0 {
                    return field_error("tokenBucket.capacity", "must be at least 1");
                }
                if !(bucket.refill_per_second >= 0.001 && bucket.refill_per_second <= 1e9) {
                    return field_error(
                        "tokenBucket.refillPerSecond",
                        "must be between 0.001 and 1e9",
                    );
                }
                Ok(())
            }
            (None, Some(window)) => {
                if window.requests == 0 {
                    return field_error("slidingWindow.requests", "must be at least 1");
                }
                check_duration("slidingWindow.window", window.window, DAY)
            }
        }
    }
}

// ---------------------------------------------------------------- breaker

/// What counts as a failure for breakers and retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailureKind {
    /// Any 5xx answer.
    #[serde(rename = "5xx")]
    ServerError,
    /// 502, 503 or 504.
    GatewayError,
    /// The connection to the endpoint could not be made.
    ConnectFailure,
    /// The connection broke before a response arrived.
    Reset,
    /// No response headers within the time allowed.
    Timeout,
}

/// `kind: CircuitBreakerPolicy`, enforced on the outbound side of every
/// caller of the target, per endpoint of the target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CircuitBreakerSpec {
    pub target_ref: TargetRef,
    #[serde(default, rename = "match", skip_serializing_if = "Option::is_none")]
    pub route: Option<RouteMatch>,
    /// Consecutive failures that open the breaker (the seed: 5).
    #[serde(default = "CircuitBreakerSpec::default_failures")]
    pub consecutive_failures: u32,
    /// How long an open breaker refuses before trying again (the seed: 60 s).
    #[serde(default = "CircuitBreakerSpec::default_open")]
    pub open_duration: HumanDuration,
    /// Trial requests let through when half-open.
    #[serde(default = "CircuitBreakerSpec::default_half_open")]
    pub half_open_requests: u32,
    /// What counts as a failure.
    #[serde(default = "CircuitBreakerSpec::default_failure_on")]
    pub failure_on: Vec<FailureKind>,
    /// Requests in flight to the target from one sidecar; more → 503
    /// `overflow` (after `maxPendingRequests` waited).
    #[serde(default = "CircuitBreakerSpec::default_max_concurrent")]
    pub max_concurrent_requests: u32,
    /// Requests allowed to wait for a free slot when the target is at
    /// `maxConcurrentRequests`.
    #[serde(default)]
    pub max_pending_requests: u32,
    /// `enforce` (default) or `dryRun`: the state machine still runs, a
    /// request it would refuse (open, overflow) is counted and sent.
    #[serde(default, skip_serializing_if = "PolicyMode::is_enforce")]
    pub mode: PolicyMode,
}

impl CircuitBreakerSpec {
    fn default_failures() -> u32 {
        5
    }
    fn default_open() -> HumanDuration {
        HumanDuration::from_secs(60)
    }
    fn default_half_open() -> u32 {
        1
    }
    fn default_failure_on() -> Vec<FailureKind> {
        vec![
            FailureKind::ServerError,
            FailureKind::ConnectFailure,
            FailureKind::Reset,
            FailureKind::Timeout,
        ]
    }
    fn default_max_concurrent() -> u32 {
        1024
    }

    pub(crate) fn validate(&self) -> Result<(), FieldError> {
        if let Some(route) = &self.route {
            route.validate()?;
        }
        if self.consecutive_failures == 0 {
            return field_error("consecutiveFailures", "must be at least 1");
        }
        check_duration("openDuration", self.open_duration, DAY)?;
        if self.half_open_requests == 0 {
            return field_error("halfOpenRequests", "must be at least 1");
        }
        check_len(
            "spec.failureOn",
            self.failure_on.len(),
            limits::MAX_FAILURE_KINDS,
            "MAX_FAILURE_KINDS",
            "failure kinds",
        )?;
        if self.failure_on.is_empty() {
            return field_error("failureOn", "name at least one failure kind");
        }
        if self.max_concurrent_requests == 0 {
            return field_error("maxConcurrentRequests", "must be at least 1");
        }
        Ok(())
    }
}

// ---------------------------------------------------------------- retry

/// `kind: RetryPolicy`, applied by callers of the target.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RetrySpec {
    pub target_ref: TargetRef,
    #[serde(default, rename = "match", skip_serializing_if = "Option::is_none")]
    pub route: Option<RouteMatch>,
    /// Tries in all, the first included (2 = one retry).
    #[serde(default = "RetrySpec::default_attempts")]
    pub attempts: u32,
    /// Deadline of each try for response headers (none: the request's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<HumanDuration>,
    #[serde(default = "RetrySpec::default_retry_on")]
    pub retry_on: Vec<FailureKind>,
    /// Retry POST, PATCH and other non-idempotent methods too.
    #[serde(default)]
    pub retry_non_idempotent: bool,
    /// Exponential backoff with full jitter between tries.
    #[serde(default)]
    pub backoff: RetryBackoff,
    /// Retries are allowed up to this share of requests, plus a minimum
    /// per second, so that retries never multiply an outage.
    #[serde(default)]
    pub budget: RetryBudget,
    /// Requests with a larger body are not retried (the body is kept in
    /// memory to be sent again).
    #[serde(default = "RetrySpec::default_max_body")]
    pub max_body_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RetryBackoff {
    pub base: HumanDuration,
    pub max: HumanDuration,
}

impl Default for RetryBackoff {
    fn default() -> Self {
        RetryBackoff {
            base: HumanDuration::from_millis(25),
            max: HumanDuration::from_millis(250),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RetryBudget {
    /// Retries as a percentage of original requests (Linkerd: 20).
    pub percent: f64,
    /// Retries always allowed per second, whatever the ratio.
    pub min_per_second: u32,
}

impl Default for RetryBudget {
    fn default() -> Self {
        RetryBudget {
            percent: 20.0,
            min_per_second: 10,
        }
    }
}

impl RetrySpec {
    fn default_attempts() -> u32 {
        2
    }
    fn default_retry_on() -> Vec<FailureKind> {
        vec![
            FailureKind::GatewayError,
            FailureKind::ConnectFailure,
            FailureKind::Reset,
        ]
    }
    fn default_max_body() -> u64 {
        64 * 1024
    }

    pub(crate) fn validate(&self) -> Result<(), FieldError> {
        if let Some(route) = &self.route {
            route.validate()?;
        }
        if !(1..=10).contains(&self.attempts) {
            return field_error("attempts", "must be between 1 and 10");
        }
        if let Some(timeout) = self.per_try_timeout {
            check_duration("perTryTimeout", timeout, DAY)?;
        }
        check_len(
            "spec.retryOn",
            self.retry_on.len(),
            limits::MAX_FAILURE_KINDS,
            "MAX_FAILURE_KINDS",
            "failure kinds",
        )?;
        if self.retry_on.is_empty() {
            return field_error("retryOn", "name at least one failure kind");
        }
        check_duration("backoff.base", self.backoff.base, DAY)?;
        check_duration("backoff.max", self.backoff.max, DAY)?;
        if self.backoff.max < self.backoff.base {
            return field_error("backoff.max", "must not be less than backoff.base");
        }
        if !(0.0..=100.0).contains(&self.budget.percent) {
            return field_error("budget.percent", "must be between 0 and 100");
        }
        Ok(())
    }
}

// ---------------------------------------------------------------- timeout

/// `kind: TimeoutPolicy`, applied by callers of the target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TimeoutSpec {
    pub target_ref: TargetRef,
    #[serde(default, rename = "match", skip_serializing_if = "Option::is_none")]
    pub route: Option<RouteMatch>,
    /// Deadline for the response headers, all tries included → 504
    /// `upstream_timeout`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<HumanDuration>,
    /// A response body that brings no data this long is failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle: Option<HumanDuration>,
}

impl TimeoutSpec {
    pub(crate) fn validate(&self) -> Result<(), FieldError> {
        if let Some(route) = &self.route {
            route.validate()?;
        }
        if self.request.is_none() && self.idle.is_none() {
            return field_error("request", "give request, idle or both");
        }
        if let Some(d) = self.request {
            check_duration("request", d, DAY)?;
        }
        if let Some(d) = self.idle {
            check_duration("idle", d, DAY)?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------- split

/// `kind: TrafficSplit`: callers send the target's traffic to subsets of
/// its instances, chosen by labels, in proportion to the weights.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TrafficSplitSpec {
    pub target_ref: TargetRef,
    pub splits: Vec<Split>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Split {
    /// Instances whose labels include all of these.
    pub labels: BTreeMap<String, String>,
    pub weight: u32,
}

impl TrafficSplitSpec {
    pub(crate) fn validate(&self) -> Result<(), FieldError> {
        if self.splits.is_empty() {
            return field_error("splits", "name at least one subset");
        }
        check_len(
            "spec.splits",
            self.splits.len(),
            limits::MAX_SPLITS,
            "MAX_SPLITS",
            "splits",
        )?;
        for (i, split) in self.splits.iter().enumerate() {
            limits::validate_labels(&format!("spec.splits[{i}].labels"), split.labels.iter())?;
            if split.labels.is_empty() {
                return field_error(
                    &format!("splits[{i}].labels"),
                    "select the subset with at least one label",
                );
            }
        }
        let total: u64 = self.splits.iter().map(|s| u64::from(s.weight)).sum();
        if total == 0 {
            return field_error("splits", "the weights must sum to more than 0");
        }
        Ok(())
    }
}

// -------------------------------------------------------------- tracing

/// `kind: TracingPolicy`: what share of the traces that *start* at the
/// target service are recorded. A request that arrives with a trace
/// context keeps that context's sampled flag, so one trace is recorded
/// whole or not at all.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TracingSpec {
    pub target_ref: TargetRef,
    /// From 0.0 (none) to 1.0 (every new trace).
    #[serde(default = "TracingSpec::default_ratio")]
    pub sampling_ratio: f64,
}

impl TracingSpec {
    /// Without a policy every trace is sampled, as in the demo.
    pub const DEFAULT_RATIO: f64 = 1.0;

    fn default_ratio() -> f64 {
        Self::DEFAULT_RATIO
    }

    pub(crate) fn validate(&self) -> Result<(), FieldError> {
        if !(0.0..=1.0).contains(&self.sampling_ratio) {
            return field_error("samplingRatio", "give a ratio from 0.0 to 1.0");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_matches_and_specificity() {
        let any = RouteMatch::default();
        let api = RouteMatch {
            path_prefix: Some("/api".into()),
            methods: vec![],
        };
        let api_get = RouteMatch {
            path_prefix: Some("/api".into()),
            methods: vec!["GET".into()],
        };
        assert!(any.matches("POST", "/x"));
        assert!(api.matches("POST", "/api/items"));
        assert!(!api.matches("GET", "/other"));
        assert!(api_get.matches("GET", "/api"));
        assert!(!api_get.matches("POST", "/api"));
        assert!(any.specificity() < api.specificity());
        assert!(api.specificity() < api_get.specificity());
    }

    #[test]
    fn rate_limit_keys_parse() {
        let key: RateLimitKey = serde_json::from_str("\"header:X-User-Id\"").unwrap();
        assert_eq!(key, RateLimitKey::Header("x-user-id".into()));
        assert_eq!(serde_json::to_string(&key).unwrap(), "\"header:x-user-id\"");
        assert!(serde_json::from_str::<RateLimitKey>("\"header:\"").is_err());
        assert!(serde_json::from_str::<RateLimitKey>("\"user\"").is_err());
    }

    #[test]
    fn dry_run_mode_parses_and_enforce_is_not_written_back() {
        let head = "apiVersion: meshlet.dev/v1alpha1\nmetadata: {name: p}\nspec:\n  targetRef: {service: orders}\n";
        let limit = format!(
            "kind: RateLimitPolicy\n{head}  tokenBucket: {{capacity: 1, refillPerSecond: 1}}\n"
        );
        let breaker = format!("kind: CircuitBreakerPolicy\n{head}");
        for (text, dry) in [
            (limit.clone(), false),
            (breaker.clone(), false),
            (format!("{limit}  mode: dryRun\n"), true),
            (format!("{breaker}  mode: dryRun\n"), true),
        ] {
            let resource = crate::parse_documents("f.yaml", &text).unwrap().remove(0);
            let mode = match &resource {
                crate::Resource::RateLimitPolicy(doc) => doc.spec.mode,
                crate::Resource::CircuitBreakerPolicy(doc) => doc.spec.mode,
                other => panic!("{other:?}"),
            };
            assert_eq!(mode.is_dry_run(), dry, "{text}");
            assert_eq!(resource.to_yaml().contains("mode: dryRun"), dry);
            assert!(!resource.to_yaml().contains("enforce"));
        }
        let err =
            crate::parse_documents("f.yaml", &format!("{breaker}  mode: dryrun\n")).unwrap_err();
        assert_eq!(err.field, "spec.mode", "{err}");
    }
}
