//! The request path of each listener.

pub(crate) mod handlers;
pub(crate) mod headers;
pub(crate) mod route;
