//! Policies.

pub(crate) mod breaker;
pub(crate) mod index;
pub(crate) mod outcome;
pub(crate) mod ratelimit;
pub(crate) mod retry;
