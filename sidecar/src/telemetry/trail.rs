//! [`Trail`]: what forwarding did for one request (retries, the upstream
//! it ended on, an injected fault, what a dry-run policy would have
//! refused). `upstream::forward` and the request path fill it, `observe`
//! reads it into the span and the access log line; a leaf so that neither
//! imports the other.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// What happened while forwarding one request, for its span and access
/// log line.
#[derive(Debug, Default, Clone)]
pub struct Trail {
    /// Tries sent after the first (`RetryPolicy`).
    pub retries: u32,
    /// The endpoint the last try went to.
    pub upstream: Option<SocketAddr>,
    /// What a `FaultInjectionPolicy` did to the request.
    pub fault: Option<FaultNote>,
    /// The first dry-run policy that would have refused the request:
    /// `<kind>/<name>:<reason>` (e.g. `RateLimitPolicy/orders:rate_limited`).
    pub would_refuse: Option<Arc<str>>,
}

/// An injected fault: the delay served and/or the status answered.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FaultNote {
    pub delay: Option<Duration>,
    pub abort: Option<u16>,
}

impl std::fmt::Display for FaultNote {
    /// `delay 200ms`, `abort 503`, `delay 200ms, abort 503`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(delay) = self.delay {
            write!(f, "delay {}", humantime::format_duration(delay))?;
            if self.abort.is_some() {
                f.write_str(", ")?;
            }
        }
        if let Some(status) = self.abort {
            write!(f, "abort {status}")?;
        }
        Ok(())
    }
}

impl Trail {
    /// Notes that `mark` (`<kind>/<name>:<reason>`) would have refused the
    /// request; the first one stays.
    pub fn would_refuse(&mut self, mark: &Arc<str>) {
        if self.would_refuse.is_none() {
            self.would_refuse = Some(Arc::clone(mark));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fault_note_reads_like_the_span_attribute() {
        let delay = FaultNote {
            delay: Some(Duration::from_millis(200)),
            abort: None,
        };
        assert_eq!(delay.to_string(), "delay 200ms");
        let both = FaultNote {
            abort: Some(503),
            ..delay
        };
        assert_eq!(both.to_string(), "delay 200ms, abort 503");
    }
}
