//! [`ProxyBody`]: the one body type that flows through the proxy in both
//! directions.
//!
//! It is either a streamed body from the other side (`hyper::body::Incoming`,
//! never buffered), a small body the mesh generated itself (error
//! responses), or empty. It can carry guards that live exactly as long as
//! the body is streaming, released when the last frame has passed (or the
//! body is dropped), not when the response headers arrive: the load
//! balancer's in-flight count for the endpoint, and the client
//! connection's count of unanswered requests (see `framing`).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::balance::InFlight;
use crate::framing::RequestGuard;

#[derive(Debug)]
pub struct ProxyBody {
    kind: Kind,
    /// The upstream endpoint's outstanding request.
    guard: Option<InFlight>,
    /// The client connection's unanswered request.
    request: Option<RequestGuard>,
}

#[derive(Debug)]
enum Kind {
    Empty,
    Full(Option<Bytes>),
    Streamed(Incoming),
}

impl ProxyBody {
    pub fn empty() -> Self {
        ProxyBody {
            kind: Kind::Empty,
            guard: None,
            request: None,
        }
    }

    pub fn full(bytes: impl Into<Bytes>) -> Self {
        ProxyBody {
            kind: Kind::Full(Some(bytes.into())),
            guard: None,
            request: None,
        }
    }

    pub fn streamed(body: Incoming) -> Self {
        ProxyBody {
            kind: Kind::Streamed(body),
            guard: None,
            request: None,
        }
    }

    /// Keeps `guard` alive until the body has been fully sent or dropped.
    pub fn with_guard(mut self, guard: InFlight) -> Self {
        self.guard = Some(guard);
        self
    }

    /// Marks the client connection's request as answered once this
    /// (response) body has been fully sent or dropped.
    pub fn with_request_guard(mut self, request: RequestGuard) -> Self {
        self.request = Some(request);
        self
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let polled = match &mut this.kind {
            Kind::Empty => Poll::Ready(None),
            Kind::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Kind::Streamed(body) => Pin::new(body).poll_frame(cx),
        };
        if let Poll::Ready(None) | Poll::Ready(Some(Err(_))) = &polled {
            this.guard = None;
            this.request = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Empty => true,
            Kind::Full(bytes) => bytes.is_none(),
            Kind::Streamed(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Empty => SizeHint::with_exact(0),
            Kind::Full(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Streamed(body) => body.size_hint(),
        }
    }
}
