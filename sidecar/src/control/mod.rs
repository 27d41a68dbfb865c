//! Control.

pub(crate) mod client;
pub(crate) mod health;
pub(crate) mod snapshot;
pub(crate) mod stats;
