//! [`WouldRefuse`]: what a policy in `mode: dryRun` does instead of
//! refusing. A leaf shared by the rate limiter, the breakers and
//! authorization.
//!
//! Each dry-run policy gets, at snapshot build, one `WouldRefuse` per
//! reason it can refuse for: the `meshlet_policy_would_refuse_total`
//! handle (which the stats reporter also reads, see
//! `Metrics::would_refuse_totals`) and the mark
//! `<kind>/<name>:<reason>` for the span attribute
//! `meshlet.policy.would_refuse` and the access-log field `would_refuse`.
//! The request path calls [`WouldRefuse::note`] where an enforcing policy
//! would return its error, and goes on.

use std::sync::Arc;

use prometheus::IntCounter;

use crate::telemetry::metrics::Metrics;
use crate::telemetry::trail::Trail;

/// A dry-run policy's refusal for one reason: counted and marked.
#[derive(Debug, Clone)]
pub struct WouldRefuse {
    counter: IntCounter,
    mark: Arc<str>,
}

impl WouldRefuse {
    /// The handle of policy `kind` `namespace/name` refusing for `reason`
    /// (`rate_limited`, `circuit_open`, `overflow`, `denied`).
    pub fn new(
        metrics: &Metrics,
        kind: &'static str,
        namespace: &str,
        name: &str,
        reason: &'static str,
    ) -> Self {
        WouldRefuse {
            counter: metrics.would_refuse(kind, namespace, name, reason),
            mark: format!("{kind}/{name}:{reason}").into(),
        }
    }

    /// Counts one request that would have been refused and marks it (the
    /// first mark of a request stays).
    pub fn note(&self, trail: &mut Trail) {
        self.counter.inc();
        trail.would_refuse(&self.mark);
    }

    /// Counts without a request to mark (opaque TCP connections).
    pub fn count(&self) {
        self.counter.inc();
    }

    pub fn mark(&self) -> &Arc<str> {
        &self.mark
    }

    #[cfg(test)]
    pub fn get(&self) -> u64 {
        self.counter.get()
    }
}
