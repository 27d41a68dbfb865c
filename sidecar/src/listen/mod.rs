//! Listeners and connections.

pub(crate) mod framing;
pub(crate) mod original_dst;
pub(crate) mod server;
pub(crate) mod sniff;
pub(crate) mod transparent;
pub(crate) mod tunnel;
