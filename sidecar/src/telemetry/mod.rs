//! Telemetry.

pub(crate) mod access_log;
pub(crate) mod direction;
pub(crate) mod metrics;
pub(crate) mod observe;
pub(crate) mod route_metrics;
pub(crate) mod trace;
pub(crate) mod trail;
