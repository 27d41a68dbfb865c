//! Sending a request upstream.

pub(crate) mod balance;
pub(crate) mod forward;
pub(crate) mod in_flight;
pub(crate) mod pool;
pub(crate) mod target;
