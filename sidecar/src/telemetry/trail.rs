//! [`Trail`]: what forwarding did for one request (retries, the upstream
//! it ended on). `upstream::forward` fills it, `observe` reads it into the
//! span and the access log line; a leaf so that neither imports the other.

use std::net::SocketAddr;

/// What happened while forwarding one request, for its span and access
/// log line.
#[derive(Debug, Default, Clone, Copy)]
pub struct Trail {
    /// Tries sent after the first (`RetryPolicy`).
    pub retries: u32,
    /// The endpoint the last try went to.
    pub upstream: Option<SocketAddr>,
}
