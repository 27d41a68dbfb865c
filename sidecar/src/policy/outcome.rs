//! [`Outcome`]: how one try to an endpoint ended. A leaf shared by the
//! breakers (which count failures), the retry policy (which retries some)
//! and `ProxyError::outcome` (which says how a failed try ended).

use http::StatusCode;
use meshlet_api::policy::FailureKind;

use crate::error::ProxyError;

/// How one try to an endpoint ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Status(StatusCode),
    ConnectFailure,
    Reset,
    Timeout,
}

impl Outcome {
    /// How a try that failed with `error` ended (`None`: the request was
    /// refused before reaching any upstream).
    pub fn of(error: &ProxyError) -> Option<Outcome> {
        match error {
            ProxyError::ConnectFailed { .. } => Some(Outcome::ConnectFailure),
            ProxyError::Upstream { .. } => Some(Outcome::Reset),
            ProxyError::UpstreamTimeout { .. } => Some(Outcome::Timeout),
            _ => None,
        }
    }

    /// `5xx` and `gateway-error` also cover the failures that happen in
    /// the sidecar, since the client sees them as 502 or 504 too (as
    /// Envoy does): a try that timed out, was reset or could not connect.
    fn is(self, kind: FailureKind) -> bool {
        match (kind, self) {
            (FailureKind::ServerError, Outcome::Status(s)) => s.is_server_error(),
            (FailureKind::GatewayError, Outcome::Status(s)) => matches!(s.as_u16(), 502..=504),
            (
                FailureKind::ServerError | FailureKind::GatewayError,
                Outcome::Timeout | Outcome::Reset | Outcome::ConnectFailure,
            ) => true,
            (FailureKind::ConnectFailure, Outcome::ConnectFailure) => true,
            (FailureKind::Reset, Outcome::Reset) => true,
            (FailureKind::Timeout, Outcome::Timeout) => true,
            _ => false,
        }
    }

    /// Whether this outcome is any of `kinds`.
    pub fn is_any(self, kinds: &[FailureKind]) -> bool {
        kinds.iter().any(|&k| self.is(k))
    }
}
