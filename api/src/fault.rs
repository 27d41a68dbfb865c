//! `kind: FaultInjectionPolicy`: delays and aborts injected on the
//! outbound side of every caller of the target, to test how callers cope
//! with a slow or failing service without breaking it.
//!
//! ```yaml
//! kind: FaultInjectionPolicy
//! spec:
//!   targetRef: {service: orders}
//!   match: {pathPrefix: /api, methods: [GET]}   # optional, as on every policy
//!   delay: {fixed: 200ms, percent: 50}          # percent 0..=100, default 100
//!   abort: {status: 503, percent: 10}           # status 400..=599
//! ```
//!
//! At least one of `delay` and `abort`. Each is sampled on its own per
//! request (as in Istio); a request chosen for both is delayed, then
//! aborted. The sidecar's `policy/fault.rs` applies it; the injected answer
//! carries `x-meshlet-reason: fault_injected`.
//!
//! `percent` and `status` are checked while deserializing ([`Percent`],
//! [`AbortStatus`]), so a bad value is reported with its line and column,
//! not only its document.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

use crate::duration::HumanDuration;
use crate::limits::FieldError;
use crate::policy::{RouteMatch, TargetRef};

/// The longest delay a policy may inject.
pub const MAX_DELAY: Duration = Duration::from_secs(3600);

fn field_error<T>(path: &str, message: impl Into<String>) -> Result<T, FieldError> {
    Err((format!("spec.{path}"), message.into()))
}

/// `kind: FaultInjectionPolicy`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FaultInjectionSpec {
    pub target_ref: TargetRef,
    #[serde(default, rename = "match", skip_serializing_if = "Option::is_none")]
    pub route: Option<RouteMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<FaultDelay>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<FaultAbort>,
}

/// Hold the request `fixed` before sending it, for `percent` of requests.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FaultDelay {
    pub fixed: HumanDuration,
    #[serde(default)]
    pub percent: Percent,
}

/// Answer `status` instead of sending, for `percent` of requests.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FaultAbort {
    pub status: AbortStatus,
    #[serde(default)]
    pub percent: Percent,
}

/// A share of requests from 0 to 100 (a float: `0.5` is one in 200);
/// 100 when absent.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd, Serialize)]
pub struct Percent(f64);

impl Percent {
    pub fn get(self) -> f64 {
        self.0
    }

    /// `percent` as a [`Percent`], `None` outside 0..=100 (or NaN).
    pub fn new(percent: f64) -> Option<Percent> {
        (0.0..=100.0).contains(&percent).then_some(Percent(percent))
    }
}

impl Default for Percent {
    fn default() -> Self {
        Percent(100.0)
    }
}

impl fmt::Display for Percent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.fract() == 0.0 {
            write!(f, "{}%", self.0 as u32)
        } else {
            write!(f, "{}%", self.0)
        }
    }
}

impl<'de> Deserialize<'de> for Percent {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = f64::deserialize(d)?;
        Percent::new(value).ok_or_else(|| {
            serde::de::Error::custom(format!("percent {value} is out of range: give 0 to 100"))
        })
    }
}

/// An HTTP status from 400 to 599.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct AbortStatus(u16);

impl AbortStatus {
    pub fn get(self) -> u16 {
        self.0
    }

    pub fn new(status: u16) -> Option<AbortStatus> {
        (400..=599).contains(&status).then_some(AbortStatus(status))
    }
}

impl<'de> Deserialize<'de> for AbortStatus {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = i64::deserialize(d)?;
        u16::try_from(value)
            .ok()
            .and_then(AbortStatus::new)
            .ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "status {value} is not an error status: give 400 to 599"
                ))
            })
    }
}

impl FaultInjectionSpec {
    pub(crate) fn validate(&self) -> Result<(), FieldError> {
        if let Some(route) = &self.route {
            route.validate()?;
        }
        if self.delay.is_none() && self.abort.is_none() {
            return field_error("delay", "give delay, abort or both");
        }
        if let Some(delay) = &self.delay {
            let d = delay.fixed.get();
            if d.is_zero() || d > MAX_DELAY {
                return field_error(
                    "delay.fixed",
                    format!(
                        "must be greater than 0 and at most {}",
                        humantime::format_duration(MAX_DELAY)
                    ),
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::{parse_documents, Resource};

    const HEAD: &str =
        "apiVersion: meshlet.dev/v1alpha1\nkind: FaultInjectionPolicy\nmetadata: {name: f}\nspec:\n  targetRef: {service: orders}\n";

    fn parse(spec: &str) -> Result<Vec<Resource>, crate::ParseError> {
        parse_documents("f.yaml", &format!("{HEAD}{spec}"))
    }

    #[test]
    fn the_contracts_example_parses_with_defaults() {
        let resources = parse(
            "  match: {pathPrefix: /api, methods: [GET]}\n  delay: {fixed: 200ms, percent: 50}\n  abort: {status: 503}\n",
        )
        .unwrap();
        let Resource::FaultInjectionPolicy(doc) = &resources[0] else {
            panic!("not a FaultInjectionPolicy")
        };
        let delay = doc.spec.delay.as_ref().unwrap();
        assert_eq!(delay.fixed.get().as_millis(), 200);
        assert_eq!(delay.percent.get(), 50.0);
        let abort = doc.spec.abort.as_ref().unwrap();
        assert_eq!((abort.status.get(), abort.percent.get()), (503, 100.0));
        assert_eq!(resources[0].target(), Some(("default", "orders")));
        // Round trip through the control plane's JSON.
        let json = serde_json::to_string(&resources).unwrap();
        let back: Vec<Resource> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, resources);
    }

    #[test]
    fn a_bad_percent_or_status_is_located_by_line_and_column() {
        for (spec, field, line, words) in [
            (
                "  abort: {status: 503, percent: 101}\n",
                "spec.abort.percent",
                6,
                "out of range",
            ),
            (
                "  delay:\n    fixed: 1s\n    percent: -1\n",
                "spec.delay.percent",
                7,
                "out of range",
            ),
            (
                "  abort: {status: 200}\n",
                "spec.abort.status",
                6,
                "400 to 599",
            ),
            (
                "  abort:\n    status: 600\n",
                "spec.abort.status",
                7,
                "400 to 599",
            ),
        ] {
            let err = parse(spec).unwrap_err();
            assert_eq!(err.field, field, "{spec}: {err}");
            assert_eq!(err.line, Some(line), "{spec}: {err}");
            assert!(err.column.is_some(), "{spec}: {err}");
            assert!(err.message.contains(words), "{spec}: {err}");
        }
    }

    #[test]
    fn semantic_checks_name_the_field() {
        for (spec, field) in [
            ("", "spec.delay"),
            ("  delay: {fixed: 0s}\n", "spec.delay.fixed"),
            ("  delay: {fixed: 2h}\n", "spec.delay.fixed"),
            (
                "  abort: {status: 503, percent: 10, extra: 1}\n",
                "spec.abort.extra",
            ),
            (
                "  match: {pathPrefix: api}\n  abort: {status: 503}\n",
                "spec.match.pathPrefix",
            ),
        ] {
            let err = parse(spec).unwrap_err();
            assert_eq!(err.field, field, "{spec}: {err}");
        }
    }
}
