//! [`ProxyBody`]: the one body type that flows through the proxy in both
//! directions.
//!
//! It is either a streamed body from the other side ([`StreamedBody`]:
//! hyper's `Incoming`, or a response read by our own HTTP/1.1 client;
//! never buffered), a small body the mesh generated itself (error
//! responses), or empty. It can carry guards that live exactly as long as
//! the body is streaming, released when the last frame has passed (or the
//! body is dropped), not when the response headers arrive: the load
//! balancer's in-flight count for the endpoint, the upstream HTTP/2
//! stream it rides on (`StreamSlot`), the client connection's
//! count of unanswered requests (see `framing`), a circuit breaker's
//! concurrency slot, and the request's [`RequestRecord`] (whose release
//! counts the request as complete, see `observe`). A body can also count
//! its data bytes on a route's byte counter: one atomic add per frame.
//! For an HTTP/2 client's stream it tells the stream's watch of each poll
//! (whether it gave a frame or waits for the upstream) and hands its data
//! over in pieces of at most `stream_watch::PIECE` bytes, so that the watch
//! sees the client take them ([`ProxyBody::reporting_to`], see
//! `listen::stream_watch`).
//! And it can drop named fields from its trailers ([`ProxyBody::without_trailers`]:
//! the identity headers a client sent as request trailers); only a
//! trailers frame is looked at, data frames pass untouched.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::HeaderName;
use http::Response;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use prometheus::IntCounter;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::{Instant, Sleep};

use crate::listen::framing::RequestGuard;
use crate::listen::stream_watch::{StreamProgress, PIECE};
use crate::telemetry::observe::{CarriesRecord, RequestRecord};
use crate::upstream::h1_client::{KnownBody, ResponseBody};
use crate::upstream::in_flight::{InFlight, StreamSlot};
use crate::upstream::response_fields::ResponseFields;

#[derive(Debug)]
pub struct ProxyBody {
    kind: Kind,
    /// Counts data bytes as they pass.
    bytes: Option<IntCounter>,
    /// A second count of them (a gateway's request counts on its own
    /// route and on the backend's).
    more_bytes: Option<IntCounter>,
    /// Fields removed from a trailers frame.
    strip_trailers: &'static [HeaderName],
    /// Boxed, and only once there is one: a body is moved several times
    /// per request (into hyper, through the builders below), and the
    /// guards (two `RequestRecord`s among them) would make every move
    /// copy most of a kilobyte.
    guards: Option<Box<Guards>>,
}

/// What a body holds until it has been fully sent or dropped.
#[derive(Debug, Default)]
struct Guards {
    /// The upstream endpoint's outstanding request.
    in_flight: Option<InFlight>,
    /// The stream on a shared upstream HTTP/2 connection (its count, the
    /// downstream connection's permit).
    stream: Option<StreamSlot>,
    /// The client connection's unanswered request.
    request: Option<RequestGuard>,
    /// A circuit breaker's concurrency slot for the target.
    slot: Option<OwnedSemaphorePermit>,
    /// The request's record, finished when released.
    completion: Option<RequestRecord>,
    /// A gateway: the record of the request as it entered (the server
    /// span), finished after `completion` (the backend call's).
    outer_completion: Option<RequestRecord>,
    /// An HTTP/2 client's stream (see `stream_watch`).
    client_stream: Option<ClientStream>,
}

/// What a response body to an HTTP/2 client keeps for its stream's watch.
#[derive(Debug)]
struct ClientStream {
    /// Told of each poll.
    progress: Arc<StreamProgress>,
    /// The rest of a data frame larger than a piece, given before the
    /// next frame is asked for.
    rest: Bytes,
}

impl ClientStream {
    /// The next piece of a large frame already read, if any is left.
    fn next_piece(&mut self) -> Option<Bytes> {
        if self.rest.is_empty() {
            return None;
        }
        let n = self.rest.len().min(PIECE);
        Some(self.rest.split_to(n))
    }

    /// `frame`, cut to one piece if it is larger (the rest kept).
    fn first_piece(&mut self, frame: Frame<Bytes>) -> Frame<Bytes> {
        match frame.into_data() {
            Ok(mut data) if data.len() > PIECE => {
                self.rest = data.split_off(PIECE);
                Frame::data(data)
            }
            Ok(data) => Frame::data(data),
            Err(frame) => frame,
        }
    }
}

#[derive(Debug)]
enum Kind {
    Empty,
    Full(Option<Bytes>),
    Streamed(StreamedBody, Option<IdleTimer>),
}

/// A body streamed from the other side: read by hyper (requests from
/// clients, responses on hyper's client connections) or by our own
/// HTTP/1.1 client (`upstream::h1_client`); or, for a request our own
/// HTTP/1.1 server read (`listen::h1_server`), none at all or one read
/// whole together with its head.
#[derive(Debug)]
pub enum StreamedBody {
    Hyper(Incoming),
    Http1(ResponseBody),
    /// No body: ended before it began, like hyper's for a request without
    /// `Content-Length` or `Transfer-Encoding`.
    None,
    /// A `Content-Length` body that arrived whole with its head; one data
    /// frame (empty once polled). [`ProxyBody::streamed`] makes it a body
    /// the mesh holds in full.
    Whole(Bytes),
}

impl From<Incoming> for StreamedBody {
    fn from(body: Incoming) -> Self {
        StreamedBody::Hyper(body)
    }
}

impl From<ResponseBody> for StreamedBody {
    fn from(body: ResponseBody) -> Self {
        StreamedBody::Http1(body)
    }
}

impl Body for StreamedBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            StreamedBody::Hyper(body) => Pin::new(body)
                .poll_frame(cx)
                .map(|frame| frame.map(|f| f.map_err(BodyError::from))),
            StreamedBody::Http1(body) => Pin::new(body)
                .poll_frame(cx)
                .map(|frame| frame.map(|f| f.map_err(BodyError::from))),
            StreamedBody::None => Poll::Ready(None),
            StreamedBody::Whole(bytes) if bytes.is_empty() => Poll::Ready(None),
            StreamedBody::Whole(bytes) => Poll::Ready(Some(Ok(Frame::data(std::mem::take(bytes))))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            StreamedBody::Hyper(body) => body.is_end_stream(),
            StreamedBody::Http1(body) => body.is_end_stream(),
            StreamedBody::None => true,
            StreamedBody::Whole(bytes) => bytes.is_empty(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            StreamedBody::Hyper(body) => body.size_hint(),
            StreamedBody::Http1(body) => body.size_hint(),
            StreamedBody::None => SizeHint::with_exact(0),
            StreamedBody::Whole(bytes) => SizeHint::with_exact(bytes.len() as u64),
        }
    }
}

/// Errors a [`ProxyBody`] yields: the other side's, or our idle timeout.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// A stream that went quiet for longer than the stream idle timeout.
#[derive(Debug, thiserror::Error)]
#[error("no body data for {} (stream idle timeout)", humantime::format_duration(*.0))]
pub struct StreamIdle(pub Duration);

/// Fails a streamed body that makes no progress for `timeout`. The timer
/// is only created once the body actually has to wait, so bodies whose data
/// is already there (most small ones) never touch the timer wheel.
#[derive(Debug)]
struct IdleTimer {
    timeout: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
    /// A frame arrived since the timer was last set.
    progressed: bool,
}

impl IdleTimer {
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> bool {
        let deadline = Instant::now() + self.timeout;
        match &mut self.sleep {
            None => self.sleep = Some(Box::pin(tokio::time::sleep_until(deadline))),
            Some(sleep) if self.progressed => sleep.as_mut().reset(deadline),
            Some(_) => {}
        }
        self.progressed = false;
        self.sleep
            .as_mut()
            .is_some_and(|sleep| sleep.as_mut().poll(cx).is_ready())
    }
}

impl ProxyBody {
    fn of(kind: Kind) -> Self {
        ProxyBody {
            kind,
            bytes: None,
            more_bytes: None,
            strip_trailers: &[],
            guards: None,
        }
    }

    /// An HTTP/2 client's stream this (response) body reports to.
    fn client_stream(&mut self) -> Option<&mut ClientStream> {
        self.guards.as_mut()?.client_stream.as_mut()
    }

    /// Bytes of a large frame read but not handed over yet.
    fn held_back(&self) -> usize {
        self.guards
            .as_ref()
            .and_then(|g| g.client_stream.as_ref())
            .map_or(0, |stream| stream.rest.len())
    }

    /// The guards, allocated on first use.
    fn guards(&mut self) -> &mut Guards {
        self.guards.get_or_insert_with(Box::default)
    }

    pub fn empty() -> Self {
        Self::of(Kind::Empty)
    }

    /// The upstream response's header fields this body carries as lines
    /// (a plain HTTP/1.1 head; see `upstream::response_fields`), which
    /// `listen::h1_server` writes as they are.
    pub fn response_fields(&self) -> Option<&ResponseFields> {
        match &self.kind {
            Kind::Streamed(StreamedBody::Http1(body), _) => body.response_fields(),
            _ => None,
        }
    }

    /// Puts the header fields a response body carries as lines back into
    /// the response's map: for every way out but our own HTTP/1.1 server,
    /// and before the fields are read or edited.
    pub fn restore_fields(response: &mut Response<ProxyBody>) {
        let lines = match &mut response.body_mut().kind {
            Kind::Streamed(StreamedBody::Http1(body), _) => body.take_response_fields(),
            _ => None,
        };
        if let Some(lines) = lines {
            lines.restore_into(response.headers_mut());
        }
    }

    pub fn full(bytes: impl Into<Bytes>) -> Self {
        Self::of(Kind::Full(Some(bytes.into())))
    }

    /// A body streamed from the other side; with `idle_timeout`, it fails
    /// if no data arrives for that long. A body read whole with its head
    /// ([`StreamedBody::Whole`]) is held in full instead: nothing to wait
    /// for, and it can be sent again ([`ProxyBody::replay_copy`]) or
    /// written with its head ([`KnownBody::known_data`]).
    pub fn streamed(body: impl Into<StreamedBody>, idle_timeout: Option<Duration>) -> Self {
        let body = match body.into() {
            StreamedBody::Whole(bytes) if bytes.is_empty() => return Self::empty(),
            StreamedBody::Whole(bytes) => return Self::full(bytes),
            body => body,
        };
        let timer = idle_timeout.map(|timeout| IdleTimer {
            timeout,
            sleep: None,
            progressed: false,
        });
        Self::of(Kind::Streamed(body, timer))
    }

    /// Keeps `guard` alive until the body has been fully sent or dropped.
    pub fn with_guard(mut self, guard: InFlight) -> Self {
        self.guards().in_flight = Some(guard);
        self
    }

    /// Holds a stream of a shared upstream HTTP/2 connection until the
    /// body has been fully sent or dropped.
    pub fn with_stream(mut self, stream: Option<StreamSlot>) -> Self {
        if stream.is_some() {
            self.guards().stream = stream;
        }
        self
    }

    /// A copy of this (request) body for sending the request again, when
    /// every byte of it is known: empty, a streamed body already at its
    /// end, or one the mesh holds in full (a retry's buffered body). `None`
    /// for a streamed body with data still to come. The copy counts its
    /// bytes and strips trailers like the original; it carries no guards.
    pub fn replay_copy(&self) -> Option<ProxyBody> {
        let mut copy = self.known_copy()?;
        copy.bytes = self.bytes.clone();
        copy.more_bytes = self.more_bytes.clone();
        Some(copy)
    }

    /// A copy of this (request) body for another request (a mirror's),
    /// when every byte of it is known (as [`ProxyBody::replay_copy`]); it
    /// counts its bytes nowhere, since they are not the original
    /// request's, and carries no guards.
    pub fn uncounted_copy(&self) -> Option<ProxyBody> {
        self.known_copy()
    }

    /// The known bytes of this body in a new body without counters or
    /// guards.
    fn known_copy(&self) -> Option<ProxyBody> {
        let kind = match &self.kind {
            Kind::Empty => Kind::Empty,
            Kind::Full(Some(bytes)) => Kind::Full(Some(bytes.clone())),
            Kind::Full(None) => return None,
            Kind::Streamed(body, _) if body.is_end_stream() => Kind::Empty,
            Kind::Streamed(..) => return None,
        };
        Some(ProxyBody {
            kind,
            bytes: None,
            more_bytes: None,
            strip_trailers: self.strip_trailers,
            guards: None,
        })
    }

    /// Holds a concurrency slot until the body has been fully sent.
    pub fn with_slot(mut self, slot: Option<OwnedSemaphorePermit>) -> Self {
        if slot.is_some() {
            self.guards().slot = slot;
        }
        self
    }

    /// Marks the client connection's request as answered once this
    /// (response) body has been fully sent or dropped.
    pub fn with_request_guard(mut self, request: RequestGuard) -> Self {
        self.guards().request = Some(request);
        self
    }

    /// Tells `progress` of each poll of this (response) body, whether it
    /// gave a frame or waits for the upstream, and gives data in pieces of
    /// at most `PIECE` bytes (an HTTP/2 client's stream watch).
    pub fn reporting_to(mut self, progress: Arc<StreamProgress>) -> Self {
        self.guards().client_stream = Some(ClientStream {
            progress,
            rest: Bytes::new(),
        });
        self
    }

    /// Finishes the request's record once this (response) body has been
    /// fully sent or dropped. A second record (a gateway's own, given
    /// after its backend call's) is finished after the first.
    pub fn with_completion(mut self, record: RequestRecord) -> Self {
        let guards = self.guards();
        match guards.completion {
            None => guards.completion = Some(record),
            Some(_) => guards.outer_completion = Some(record),
        }
        self
    }

    /// Removes every field named in `names` from the body's trailers.
    pub fn without_trailers(mut self, names: &'static [HeaderName]) -> Self {
        self.strip_trailers = names;
        self
    }

    /// Adds the length of every data frame to `bytes` (at most two
    /// counters: a gateway's route and its backend's).
    pub fn counting(mut self, bytes: IntCounter) -> Self {
        match self.bytes {
            None => self.bytes = Some(bytes),
            Some(_) => self.more_bytes = Some(bytes),
        }
        self
    }
}

/// Every byte of a (request) body, when the mesh knows them all without
/// polling: empty, a streamed body already at its end, or one held in full
/// (read whole with its head, or a retry's buffered body). `None` while
/// data may still come. Whoever sends these bytes instead of polling the
/// body counts them ([`KnownBody::count_sent`]).
impl KnownBody for ProxyBody {
    fn known_data(&self) -> Option<&[u8]> {
        match &self.kind {
            Kind::Empty => Some(&[]),
            Kind::Full(Some(bytes)) => Some(bytes),
            // Already handed over by a poll.
            Kind::Full(None) => None,
            Kind::Streamed(body, _) if body.is_end_stream() => Some(&[]),
            Kind::Streamed(..) => None,
        }
    }

    fn count_sent(&self, len: usize) {
        if len == 0 {
            return;
        }
        for bytes in [&self.bytes, &self.more_bytes].into_iter().flatten() {
            bytes.inc_by(len as u64);
        }
    }
}

impl CarriesRecord for ProxyBody {
    fn carrying(self, bytes: IntCounter, record: RequestRecord) -> Self {
        self.counting(bytes).with_completion(record)
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        if let Some(stream) = this.client_stream() {
            if let Some(piece) = stream.next_piece() {
                stream.progress.body_polled(Some(piece.len()));
                return Poll::Ready(Some(Ok(Frame::data(piece))));
            }
        }
        let mut polled = match &mut this.kind {
            Kind::Empty => Poll::Ready(None),
            Kind::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Kind::Streamed(body, timer) => match Pin::new(body).poll_frame(cx) {
                Poll::Ready(frame) => {
                    if let Some(timer) = timer {
                        timer.progressed = true;
                    }
                    Poll::Ready(frame)
                }
                Poll::Pending => match timer {
                    Some(timer) => {
                        if timer.poll_expired(cx) {
                            Poll::Ready(Some(Err(StreamIdle(timer.timeout).into())))
                        } else {
                            Poll::Pending
                        }
                    }
                    None => Poll::Pending,
                },
            },
        };
        match &mut polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(bytes), Some(data)) = (&this.bytes, frame.data_ref()) {
                    bytes.inc_by(data.len() as u64);
                    if let Some(more) = &this.more_bytes {
                        more.inc_by(data.len() as u64);
                    }
                } else if !this.strip_trailers.is_empty() {
                    if let Some(trailers) = frame.trailers_mut() {
                        for name in this.strip_trailers {
                            trailers.remove(name);
                        }
                    }
                }
            }
            Poll::Ready(None | Some(Err(_))) => this.guards = None,
            Poll::Pending => {}
        }
        if let Some(stream) = this.client_stream() {
            if let Poll::Ready(Some(Ok(frame))) = polled {
                // Counted whole above, handed over in pieces.
                let piece = stream.first_piece(frame);
                let given = piece.data_ref().map_or(0, Bytes::len);
                stream.progress.body_polled(Some(given));
                return Poll::Ready(Some(Ok(piece)));
            }
            stream.progress.body_polled(polled.is_ready().then_some(0));
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        if self.held_back() > 0 {
            return false;
        }
        match &self.kind {
            Kind::Empty => true,
            Kind::Full(bytes) => bytes.is_none(),
            Kind::Streamed(body, _) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        let hint = match &self.kind {
            Kind::Empty => SizeHint::with_exact(0),
            Kind::Full(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Streamed(body, _) => body.size_hint(),
        };
        match self.held_back() as u64 {
            0 => hint,
            held => {
                let mut total = SizeHint::new();
                total.set_lower(hint.lower() + held);
                if let Some(upper) = hint.upper() {
                    total.set_upper(upper + held);
                }
                total
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;

    #[tokio::test]
    async fn an_http2_clients_body_comes_in_pieces_each_poll_reported() {
        let progress = StreamProgress::new();
        let data = Bytes::from(vec![7u8; 2 * PIECE + 100]);
        let mut body = ProxyBody::full(data.clone()).reporting_to(Arc::clone(&progress));
        assert_eq!(body.size_hint().exact(), Some(data.len() as u64));
        let mut sizes = Vec::new();
        let mut received = Vec::new();
        while let Some(frame) = body.frame().await {
            let piece = frame.unwrap().into_data().unwrap();
            sizes.push(piece.len());
            received.extend_from_slice(&piece);
            if sizes.len() == 1 {
                assert!(!body.is_end_stream());
                assert_eq!(body.size_hint().exact(), Some((PIECE + 100) as u64));
            }
        }
        assert_eq!(sizes, [PIECE, PIECE, 100]);
        assert_eq!(received, data);
        assert_eq!(progress.polls(), 3);
    }

    #[tokio::test]
    async fn bodies_of_other_clients_pass_whole() {
        let data = Bytes::from(vec![7u8; 2 * PIECE + 100]);
        let mut body = ProxyBody::full(data.clone());
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), data);
    }
}
