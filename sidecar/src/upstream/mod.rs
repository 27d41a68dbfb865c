//! Sending a request upstream.

pub(crate) mod balance;
pub(crate) mod forward;
pub(crate) mod pool;
