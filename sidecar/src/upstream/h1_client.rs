//! The HTTP/1.1 exchange with an upstream, driven from the request's own
//! task, for requests without a body (most reads: GET, HEAD, DELETE ...)
//! or with one the proxy holds in full (a small `POST` our server read
//! whole with its head, a retry's buffered body): [`eligible`].
//!
//! Why not hyper's client here: hyper runs each upstream connection as a
//! task of its own, and a request travels to it through a channel and its
//! response back through a oneshot; the connection task is woken and
//! polled for every request, and the request is copied once more in case
//! it must be sent again. Profiling (callgrind, `tests/bench/profile.sh`)
//! put that hand-off, the task's polls and the replay copy at a quarter of
//! the sidecar's instructions per request. Here the request's task writes
//! the head, reads the response head and hands the connection to the
//! response body, which reads the rest and puts the connection back into
//! the pool at the body's end. Requests whose body is still streaming,
//! upgrades and CONNECT keep using hyper's client (`pool::send_h1`).
//!
//! What is parsed where: the response head with `httparse` (the same
//! parser hyper uses); its framing per RFC 9112 §6.3 exactly as hyper's
//! client decides it (1xx skipped, 101 refused, HEAD/204/304 without body,
//! `Transfer-Encoding` chunked or else read to close, one valid
//! `Content-Length`, else read to close), chunked bodies with trailers
//! ([`Chunked`]). A plain head's fields are not put into a `HeaderMap` but
//! kept as the lines the client gets (`upstream::response_fields`).
//!
//! ```text
//! pool::exchange_h1 ─► exchange(conn, request)
//!   write head (+ body) ─► read until the head parses (1xx skipped) ─► Response
//!   ResponseBody::poll_frame ─► data / trailers from the buffer, reads more
//!   at the end: connection reusable and nothing left over ─► pool (idle)
//! ```
//!
//! Where it knowingly differs from hyper's client (found by an attack
//! with ~200 scripted responses, both builds side by side): a 101 to a
//! request without `Upgrade` is a 502 (hyper passed a bare 101 on and
//! closed); a trailer section ended by bare LFs is accepted (hyper stalled
//! until the idle timeout); a response carrying both `Transfer-Encoding`
//! and `Content-Length` loses the latter (RFC 9112 §6.3; hyper kept it and
//! the client saw a broken message). Limits are hyper's: 100 header
//! fields, ~408 KiB of head, 16 KiB of trailers and of chunk extensions.
//!
//! The deadline for the response head (the upstream or `TimeoutPolicy`
//! timeout, from `forward`) is kept by one lazily re-armed timer per
//! connection ([`Conn::poll_deadline`]), not a timer per request.
//!
//! A connection that fails, is closed by the upstream, says
//! `Connection: close`, is read to its close, has bytes beyond the
//! response, or whose body is dropped before its end is dropped (closed).

use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use tokio::io::AsyncWrite;
use tokio::time::Sleep;

use crate::clock;
use crate::upstream::quick_ack::QuickAck;
use crate::upstream::response_fields::{FieldKind, ResponseFields};

/// Header fields accepted in a response head (hyper's default).
const MAX_HEADERS: usize = 100;

/// Largest response head (or trailer section) read, as hyper's default
/// read buffer limit.
pub const MAX_HEAD_BYTES: usize = 8192 + 4096 * 100;

/// Smallest and largest read.
const MIN_READ: usize = 8 * 1024;
const MAX_READ: usize = 128 * 1024;

/// Longest chunk-size line (with extensions) accepted.
const MAX_CHUNK_LINE: usize = 4096;

/// Chunk extensions over a whole body, and the trailer section: at most
/// this many bytes (hyper's limits).
const MAX_CHUNK_EXTENSIONS: usize = 16 * 1024;
const MAX_TRAILER_BYTES: usize = 16 * 1024;

/// An upstream HTTP/1.1 connection and what has been read from it but not
/// yet consumed.
#[derive(Debug)]
pub struct Conn {
    io: QuickAck,
    buf: BytesMut,
    /// Bytes the next read asks for (grows while reads fill it).
    read_size: usize,
    /// The request head being written, kept for the next request (no
    /// allocation per request unless a head outgrows it).
    head: Vec<u8>,
    /// Where a response head's field names and value ranges are noted while
    /// it is parsed (reused likewise).
    fields: Vec<(HeaderName, usize, usize)>,
    /// When it last finished a response (for the idle timeout).
    pub last_used: Instant,
    /// Wakes an exchange whose response-head deadline may have passed;
    /// see [`Conn::poll_deadline`]. Created by the first exchange with a
    /// deadline, kept for the connection's life.
    deadline_timer: Option<Pin<Box<Sleep>>>,
    /// The response being read lets the connection carry another request.
    /// Here, like the next field, rather than in `ResponseBody`: every
    /// byte of a response body is copied each time a response moves.
    keep_alive: bool,
    /// Chunk extension bytes of the response being read (bounded like
    /// hyper's).
    extension_bytes: usize,
}

/// A reused request head buffer larger than this is given back.
const KEEP_HEAD_BUFFER: usize = 8 * 1024;

/// A request body up to this long is copied behind its head (one write);
/// a longer one is written from its own buffer after it.
const COPY_BODY_LIMIT: usize = 8 * 1024;

impl Conn {
    /// A connection, boxed for its whole life: it moves between the pool,
    /// the exchange and the response body, a pointer each time.
    pub fn new(io: QuickAck) -> Box<Conn> {
        Box::new(Conn {
            io,
            buf: BytesMut::new(),
            read_size: MIN_READ,
            head: Vec::new(),
            fields: Vec::new(),
            last_used: Instant::now(),
            deadline_timer: None,
            keep_alive: false,
            extension_bytes: 0,
        })
    }

    /// Whether the upstream may still take a request on this idle
    /// connection: nothing (no EOF, no stray bytes) has arrived since its
    /// last response. Costs no system call unless the socket has signalled
    /// something since.
    pub fn still_open(&self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let stream = self.io.get_ref();
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match stream.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            // Readable: EOF, stray bytes, or readiness left from a read
            // that filled its buffer. Only "would block" means open.
            Poll::Ready(Ok(())) => matches!(
                stream.try_read(&mut [0u8; 1]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock
            ),
        }
    }

    /// Reads more into the buffer; `Ok(0)` at EOF.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        self.buf.reserve(self.read_size);
        let n = ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut self.io),
            cx,
            &mut self.buf
        ))?;
        if n >= self.read_size {
            self.read_size = (self.read_size * 2).min(MAX_READ);
        }
        Poll::Ready(Ok(n))
    }

    /// `Ready` once `deadline` has passed, else `Pending` with `cx` to be
    /// woken then (or a little earlier).
    ///
    /// The timer is lazy: one per connection, armed at the first deadline
    /// and moved only to an earlier one. When it fires before this
    /// exchange's deadline (it was armed for an earlier request) it is
    /// re-armed for it. Requests on a kept-alive connection thus cost no
    /// timer registration and removal each (tokio's `timeout` did), only a
    /// poll of the armed timer while waiting.
    fn poll_deadline(&mut self, cx: &mut Context<'_>, deadline: tokio::time::Instant) -> Poll<()> {
        let timer = self
            .deadline_timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if timer.deadline() > deadline {
            timer.as_mut().reset(deadline);
        }
        while timer.as_mut().poll(cx).is_ready() {
            if tokio::time::Instant::now() >= deadline {
                return Poll::Ready(());
            }
            timer.as_mut().reset(deadline);
        }
        Poll::Pending
    }

    /// Writes the request head (`head`, with a short body copied behind
    /// it) and then `body`, unless `deadline` passes first.
    fn poll_write_request(
        &mut self,
        cx: &mut Context<'_>,
        body: &[u8],
        written: &mut usize,
        deadline: Option<tokio::time::Instant>,
    ) -> Poll<Result<(), ExchangeError>> {
        let head = self.head.len();
        while *written < head + body.len() {
            let rest = match self.head.get(*written..) {
                Some(rest) if !rest.is_empty() => rest,
                _ => &body[*written - head..],
            };
            match Pin::new(&mut self.io).poll_write(cx, rest) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(ExchangeError::Write(io::ErrorKind::WriteZero.into())))
                }
                Poll::Ready(Ok(n)) => *written += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(ExchangeError::Write(e))),
                Poll::Pending => return self.poll_timed_out(cx, deadline),
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Reads more into the buffer (`Ok(0)` at EOF), unless `deadline`
    /// passes first (`Err(None)`).
    fn poll_fill_within(
        &mut self,
        cx: &mut Context<'_>,
        deadline: Option<tokio::time::Instant>,
    ) -> Poll<Result<usize, Option<io::Error>>> {
        match self.poll_fill(cx) {
            Poll::Ready(read) => Poll::Ready(read.map_err(Some)),
            Poll::Pending => self.poll_timed_out(cx, deadline).map(|_| Err(None)),
        }
    }

    /// `Pending` without a deadline; with one, whether it has passed.
    fn poll_timed_out(
        &mut self,
        cx: &mut Context<'_>,
        deadline: Option<tokio::time::Instant>,
    ) -> Poll<Result<(), ExchangeError>> {
        match deadline {
            Some(at) => self
                .poll_deadline(cx, at)
                .map(|()| Err(ExchangeError::TimedOut)),
            None => Poll::Pending,
        }
    }
}

/// An endpoint's idle connections (busy ones are owned by the response
/// body reading from them), at most `max`. A request waiting for a
/// connection to be established can take one given back meanwhile
/// ([`IdleConns::given_back`]).
#[derive(Debug)]
pub struct IdleConns {
    // Boxed on purpose: a connection keeps its one allocation while it
    // moves between this list, an exchange and a response body.
    #[allow(clippy::vec_box)]
    conns: Mutex<Vec<Box<Conn>>>,
    max: usize,
    /// Notified once per connection kept; with nobody waiting it holds one
    /// notification, so a waiter that registers late still looks.
    kept: tokio::sync::Notify,
    /// When a connection was last kept (an answer read whole), in
    /// nanoseconds after `epoch`; 0: never.
    last_kept: AtomicU64,
    epoch: Instant,
}

impl IdleConns {
    pub fn new(max: usize) -> Arc<IdleConns> {
        Arc::new(IdleConns {
            conns: Mutex::new(Vec::new()),
            max,
            kept: tokio::sync::Notify::new(),
            last_kept: AtomicU64::new(0),
            epoch: Instant::now(),
        })
    }

    /// Notes that the endpoint answered a request `at` (a connection kept
    /// does so by itself; hyper's client's answers are noted by the pool).
    pub fn answered(&self, at: Instant) {
        let since = at.saturating_duration_since(self.epoch).as_nanos() as u64;
        self.last_kept.store(since.max(1), Ordering::Relaxed);
    }

    /// Whether the endpoint answered a request within the last `window`.
    pub fn answered_within(&self, window: Duration) -> bool {
        match self.last_kept.load(Ordering::Relaxed) {
            0 => false,
            at => {
                self.epoch
                    .elapsed()
                    .saturating_sub(Duration::from_nanos(at))
                    <= window
            }
        }
    }

    /// Completes when a connection may have been kept since the last
    /// [`IdleConns::take`] (waiters in turn, first come first served); the
    /// connection may be gone again by then, so the waiter takes and, if
    /// that finds none, waits again.
    pub fn given_back(&self) -> tokio::sync::futures::Notified<'_> {
        self.kept.notified()
    }

    #[allow(clippy::vec_box)]
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Box<Conn>>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The most recently used connection that is still open and was idle
    /// less than `idle_timeout`; drops (closes) the others it meets.
    pub fn take(&self, idle_timeout: Duration) -> Option<Box<Conn>> {
        let mut conns = self.lock();
        while let Some(conn) = conns.pop() {
            let idle = clock::now_std().saturating_duration_since(conn.last_used);
            if idle < idle_timeout && conn.still_open() {
                return Some(conn);
            }
        }
        None
    }

    /// Keeps a connection whose response has been read whole: the endpoint
    /// [`answered`](IdleConns::answered) too.
    fn keep_answered(&self, conn: Box<Conn>) {
        let now = clock::now_std();
        self.answered(now);
        self.keep(conn, now);
    }

    /// Keeps a connection, idle since `now` (also one just established
    /// for a request that took another meanwhile).
    pub fn keep(&self, mut conn: Box<Conn>, now: Instant) {
        conn.last_used = now;
        let mut conns = self.lock();
        if conns.len() < self.max {
            conns.push(conn);
            drop(conns);
            self.kept.notify_one();
        }
    }

    /// Drops connections idle for `idle_timeout` or closed by the
    /// upstream; returns how many.
    pub fn evict(&self, idle_timeout: Duration) -> usize {
        let mut conns = self.lock();
        let before = conns.len();
        conns.retain(|c| c.last_used.elapsed() < idle_timeout && c.still_open());
        before - conns.len()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }
}

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    #[error("writing the request failed: {0}")]
    Write(#[source] io::Error),
    #[error("the connection closed before any response byte")]
    ClosedBeforeResponse,
    #[error("reading the response failed before any response byte: {0}")]
    ResetBeforeResponse(#[source] io::Error),
    #[error("reading the response head failed: {0}")]
    Read(#[source] io::Error),
    #[error("the connection closed in the middle of the response head")]
    IncompleteHead,
    #[error("response head larger than {MAX_HEAD_BYTES} bytes")]
    HeadTooLarge,
    #[error("invalid response head: {0}")]
    Malformed(#[from] httparse::Error),
    #[error("invalid response head: {0}")]
    InvalidHead(&'static str),
    /// The deadline for the response head passed (the request may have
    /// been processed: never sent again).
    #[error("no response head before the deadline")]
    TimedOut,
}

impl ExchangeError {
    /// Whether the connection failed before a whole final response head
    /// came (nothing, a 1xx, or part of a head): only then may a pooled
    /// connection's request be sent again — whatever its method if it was
    /// not written whole ([`ExchangeError::unsent`]), else only an
    /// idempotent one (RFC 9110 §9.2.2; hyper's client, which cannot tell
    /// a partial head from none, resent those too). A malformed or too
    /// large head is an answer: never sent again.
    pub fn unanswered(&self) -> bool {
        matches!(
            self,
            ExchangeError::Write(_)
                | ExchangeError::ClosedBeforeResponse
                | ExchangeError::ResetBeforeResponse(_)
                | ExchangeError::IncompleteHead
                | ExchangeError::Read(_)
        )
    }

    /// Whether the request never fully reached the upstream (so it may be
    /// sent again whatever its method).
    pub fn unsent(&self) -> bool {
        matches!(self, ExchangeError::Write(_))
    }
}

/// A request body whose every byte is known without polling it (the
/// proxy's body: empty, or held in full), so that [`exchange`] writes it
/// with the head.
pub trait KnownBody {
    /// The body's bytes; `None` while data may still come.
    fn known_data(&self) -> Option<&[u8]>;

    /// Counts `len` of its bytes as sent (on the body's byte counters, as
    /// polling them would have).
    fn count_sent(&self, len: usize);
}

/// Whether `request` goes through [`exchange`]: HTTP/1.x in origin form,
/// a body known in full (most often none) whose length every
/// `Content-Length` field states (none needed for no body), no
/// `Transfer-Encoding`, no upgrade, not CONNECT, no `Expect`.
pub fn eligible<B: KnownBody>(request: &Request<B>) -> bool {
    let uri = request.uri();
    let Some(data) = request.body().known_data() else {
        return false;
    };
    if request.method() == Method::CONNECT
        || request.version() == Version::HTTP_2
        || uri.scheme().is_some()
        || uri.path_and_query().is_none()
    {
        return false;
    }
    // The names first (most requests have no length to check).
    let headers = request.headers();
    let mut stated = false;
    for name in headers.keys() {
        match *name {
            header::UPGRADE | header::TRANSFER_ENCODING | header::EXPECT => return false,
            header::CONTENT_LENGTH => stated = true,
            _ => {}
        }
    }
    if !stated {
        return data.is_empty();
    }
    let mut digits = itoa::Buffer::new();
    let length = digits.format(data.len()).as_bytes();
    headers
        .get_all(header::CONTENT_LENGTH)
        .iter()
        .all(|value| value.as_bytes() == length)
}

/// Sends `request` (see [`eligible`]) on `conn`, its body (if any) with
/// the head (counted once written whole: a resend counts again, as a
/// replayed body polled by hyper's client does), and reads the response
/// head. The response body reads the
/// rest and gives `conn` back to `idle` when the connection can carry
/// another request.
pub async fn exchange<B: KnownBody>(
    mut conn: Box<Conn>,
    request: &Request<B>,
    idle: &Arc<IdleConns>,
    deadline: Option<tokio::time::Instant>,
) -> Result<Response<ResponseBody>, ExchangeError> {
    encode_head(request, &mut conn.head);
    let mut body = request.body().known_data().unwrap_or_default();
    let body_len = body.len();
    if body.len() <= COPY_BODY_LIMIT {
        conn.head.extend_from_slice(body);
        body = &[];
    }
    let mut written = 0;
    std::future::poll_fn(|cx| conn.poll_write_request(cx, body, &mut written, deadline)).await?;
    request.body().count_sent(body_len);
    if conn.head.capacity() > KEEP_HEAD_BUFFER {
        conn.head = Vec::new();
    }
    let mut got_bytes = false;
    loop {
        if !conn.buf.is_empty() {
            got_bytes = true;
            if let Some(parsed) = parse_head(
                &mut conn.buf,
                &mut conn.fields,
                request.method() != Method::HEAD,
            )? {
                return respond(parsed, request.method(), conn, idle);
            }
            if conn.buf.len() > MAX_HEAD_BYTES {
                return Err(ExchangeError::HeadTooLarge);
            }
        }
        match std::future::poll_fn(|cx| conn.poll_fill_within(cx, deadline)).await {
            Ok(0) if got_bytes => return Err(ExchangeError::IncompleteHead),
            Ok(0) => return Err(ExchangeError::ClosedBeforeResponse),
            Ok(_) => {}
            Err(None) => return Err(ExchangeError::TimedOut),
            Err(Some(e)) if got_bytes => return Err(ExchangeError::Read(e)),
            Err(Some(e)) => return Err(ExchangeError::ResetBeforeResponse(e)),
        }
    }
}

/// The request line and header fields into `head` (cleared first), as
/// hyper's client writes them for a request without a body (lower-case
/// names, HTTP/1.1).
fn encode_head<B>(request: &Request<B>, head: &mut Vec<u8>) {
    let target = request.uri().path_and_query().map_or("/", |pq| pq.as_str());
    let headers = request.headers();
    head.clear();
    head.reserve(64 + target.len() + headers.len() * 32);
    head.extend_from_slice(request.method().as_str().as_bytes());
    head.push(b' ');
    head.extend_from_slice(target.as_bytes());
    head.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in headers {
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
}

/// A response head taken off the buffer.
struct ParsedHead {
    status: StatusCode,
    version: Version,
    reason: Option<Bytes>,
    /// Empty when the fields are kept as `lines`.
    headers: HeaderMap,
    /// A plain head's fields (see `response_fields`).
    lines: Option<ResponseFields>,
    framing: FramingFields,
}

/// What a head's framing fields say, noted while its fields are read (no
/// lookups in the map afterwards).
#[derive(Debug, Default)]
struct FramingFields {
    /// `Transfer-Encoding` is present; whether its last coding is chunked.
    transfer_encoding: Option<bool>,
    /// `Content-Length`: the one length all fields state, or `Err` when one
    /// is not a number or two differ.
    content_length: Option<Result<u64, ()>>,
    connection_close: bool,
    connection_keep_alive: bool,
    /// A `Connection` field names other fields (hop-by-hop too).
    connection_names_others: bool,
    trailer: bool,
    /// A field no plain head has (`TE`, a name too long for a map).
    not_plain: bool,
}

impl FramingFields {
    /// Notes a field of the head.
    fn see(&mut self, kind: FieldKind, value: &[u8]) {
        match kind {
            FieldKind::ContentLength => {
                self.content_length = Some(match self.content_length {
                    None => content_length(value, None),
                    Some(Ok(earlier)) => content_length(value, Some(earlier)),
                    Some(Err(())) => Err(()),
                });
            }
            FieldKind::TransferEncoding => {
                // The last field's last coding is the last coding.
                let last = value.rsplit(|&b| b == b',').next().unwrap_or_default();
                self.transfer_encoding = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
            }
            FieldKind::Connection => {
                for token in value.split(|&b| b == b',') {
                    match connection_option(token) {
                        Some(ConnectionOption::Close) => self.connection_close = true,
                        Some(ConnectionOption::KeepAlive) => self.connection_keep_alive = true,
                        Some(ConnectionOption::Nothing) => {}
                        None => self.connection_names_others = true,
                    }
                }
            }
            FieldKind::Trailer => self.trailer = true,
            FieldKind::Te | FieldKind::TooLong => self.not_plain = true,
            FieldKind::Date | FieldKind::HopByHop | FieldKind::Other => {}
        }
    }

    /// Whether the fields leave the client's server nothing to decide
    /// beyond the body's length (see `response_fields`).
    fn plain(&self) -> bool {
        matches!(self.content_length, Some(Ok(_)))
            && self.transfer_encoding.is_none()
            && !self.trailer
            && !self.connection_names_others
            && !self.not_plain
    }

    /// Whether the connection may carry another request after this response
    /// (HTTP/1.1 unless `Connection: close`; HTTP/1.0 only with `keep-alive`).
    fn keep_alive(&self, version: Version) -> bool {
        !self.connection_close && (version == Version::HTTP_11 || self.connection_keep_alive)
    }
}

/// Whether a `Connection` value names fields other than `close` and
/// `keep-alive`. One that does not is about this connection alone: acted
/// on here and not put into the response's map (the proxy would remove it
/// as hop-by-hop anyway; one that names others is kept, so the proxy
/// removes those too).
fn names_others(value: &[u8]) -> bool {
    value
        .split(|&b| b == b',')
        .any(|token| connection_option(token).is_none())
}

/// What one element of a `Connection` list says about the connection:
/// `None` for a field name (an empty element says nothing either).
fn connection_option(token: &[u8]) -> Option<ConnectionOption> {
    let token = token.trim_ascii();
    if token.eq_ignore_ascii_case(b"keep-alive") {
        Some(ConnectionOption::KeepAlive)
    } else if token.eq_ignore_ascii_case(b"close") {
        Some(ConnectionOption::Close)
    } else if token.is_empty() {
        Some(ConnectionOption::Nothing)
    } else {
        None
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConnectionOption {
    Close,
    KeepAlive,
    Nothing,
}

/// Parses (and removes) one response head at the start of `buf`;
/// informational (1xx but 101) heads are removed and skipped. `None`: not
/// complete yet. A plain head's fields become lines (see
/// `response_fields`) when `lines_allowed` (not for an answer to HEAD,
/// whose `Content-Length` is kept as sent).
fn parse_head(
    buf: &mut BytesMut,
    spans: &mut Vec<(HeaderName, usize, usize)>,
    lines_allowed: bool,
) -> Result<Option<ParsedHead>, ExchangeError> {
    loop {
        let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut response = httparse::Response::new(&mut []);
        let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut response,
            buf,
            &mut fields,
        )? {
            httparse::Status::Complete(len) => len,
            httparse::Status::Partial => return Ok(None),
        };
        let code = response.code.unwrap_or_default();
        let status = StatusCode::from_u16(code)
            .map_err(|_| ExchangeError::InvalidHead("invalid status code"))?;
        if status.is_informational() && code != 101 {
            buf.advance(len);
            continue;
        }
        let version = if response.version == Some(0) {
            Version::HTTP_10
        } else {
            Version::HTTP_11
        };
        let reason = response
            .reason
            .filter(|reason| Some(*reason) != status.canonical_reason())
            .map(|reason| Bytes::copy_from_slice(reason.as_bytes()));
        let mut framing = FramingFields::default();
        let mut kinds = [FieldKind::Other; MAX_HEADERS];
        for (field, kind) in response.headers.iter().zip(kinds.iter_mut()) {
            *kind = FieldKind::of(field.name.as_bytes());
            framing.see(*kind, field.value);
        }
        let plain = lines_allowed && framing.plain() && !matches!(code, 101 | 204 | 304);
        if plain {
            let lines = ResponseFields::encode(
                response
                    .headers
                    .iter()
                    .zip(kinds)
                    .map(|(field, kind)| (field.name.as_bytes(), field.value, kind)),
            );
            buf.advance(len);
            return Ok(Some(ParsedHead {
                status,
                version,
                reason,
                headers: HeaderMap::new(),
                lines: Some(lines),
                framing,
            }));
        }
        // Names now (they are copied or static); values as slices of the
        // head once it is split off the buffer.
        let base = buf.as_ptr() as usize;
        spans.clear();
        for field in response.headers.iter() {
            let name = HeaderName::from_bytes(field.name.as_bytes())
                .map_err(|_| ExchangeError::InvalidHead("invalid header name"))?;
            if name == header::CONNECTION && !names_others(field.value) {
                continue;
            }
            let start = field.value.as_ptr() as usize - base;
            spans.push((name, start, start + field.value.len()));
        }
        let head = buf.split_to(len).freeze();
        let mut headers = HeaderMap::with_capacity(spans.len());
        for (name, start, end) in spans.drain(..) {
            let value = HeaderValue::from_maybe_shared(head.slice(start..end))
                .map_err(|_| ExchangeError::InvalidHead("invalid header value"))?;
            headers.append(name, value);
        }
        return Ok(Some(ParsedHead {
            status,
            version,
            reason,
            headers,
            lines: None,
            framing,
        }));
    }
}

/// The response for a parsed head, its body framed per RFC 9112 §6.3.
fn respond(
    head: ParsedHead,
    method: &Method,
    conn: Box<Conn>,
    idle: &Arc<IdleConns>,
) -> Result<Response<ResponseBody>, ExchangeError> {
    let ParsedHead {
        status,
        version,
        reason,
        headers,
        lines,
        framing: fields,
    } = head;
    if status == StatusCode::SWITCHING_PROTOCOLS {
        return Err(ExchangeError::InvalidHead(
            "101 Switching Protocols to a request without Upgrade",
        ));
    }
    let mut keep_alive = fields.keep_alive(version);
    let mut headers = headers;
    let framing = if status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
        || method == Method::HEAD
    {
        Framing::Length(0)
    } else if let Some(chunked) = fields.transfer_encoding {
        if version == Version::HTTP_10 {
            return Err(ExchangeError::InvalidHead(
                "Transfer-Encoding in an HTTP/1.0 response",
            ));
        }
        // RFC 9112 §6.3: Transfer-Encoding overrides Content-Length, which
        // a proxy must remove before forwarding.
        if fields.content_length.is_some() {
            headers.remove(header::CONTENT_LENGTH);
        }
        if chunked {
            Framing::Chunked(Chunked::Size)
        } else {
            keep_alive = false;
            Framing::UntilClose
        }
    } else if let Some(length) = fields.content_length {
        Framing::Length(length.map_err(|()| ExchangeError::InvalidHead("invalid Content-Length"))?)
    } else {
        keep_alive = false;
        Framing::UntilClose
    };
    let mut conn = conn;
    conn.keep_alive = keep_alive;
    conn.extension_bytes = 0;
    let mut body = ResponseBody {
        conn: Some(conn),
        framing,
        idle: Arc::clone(idle),
        lines,
    };
    if matches!(body.framing, Framing::Length(0)) {
        body.finish();
    }
    let mut response = Response::new(body);
    *response.status_mut() = status;
    *response.version_mut() = version;
    *response.headers_mut() = headers;
    if let Some(reason) = reason {
        if let Ok(reason) = hyper::ext::ReasonPhrase::try_from(reason) {
            response.extensions_mut().insert(reason);
        }
    }
    Ok(response)
}

/// The length a `Content-Length` field states (every list element the
/// same, and the same as `seen`, the earlier fields'); `Err` if an element
/// is not a number or two differ.
fn content_length(value: &[u8], seen: Option<u64>) -> Result<u64, ()> {
    let mut length = seen;
    for element in value.split(|&b| b == b',') {
        let element = element.trim_ascii();
        if element.is_empty() || !element.iter().all(u8::is_ascii_digit) {
            return Err(());
        }
        let n = element
            .iter()
            .try_fold(0u64, |n, d| {
                n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
            })
            .ok_or(())?;
        match length {
            Some(earlier) if earlier != n => return Err(()),
            _ => length = Some(n),
        }
    }
    length.ok_or(())
}

/// How the body of a response ends.
#[derive(Debug)]
enum Framing {
    /// After this many more bytes.
    Length(u64),
    Chunked(Chunked),
    /// When the upstream closes the connection.
    UntilClose,
    /// Ended.
    Done,
}

/// Where a chunked body's decoding is.
#[derive(Debug)]
enum Chunked {
    /// At a chunk-size line.
    Size,
    /// Inside a chunk's data, this many bytes left.
    Data(u64),
    /// At the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: the trailer section.
    Trailers,
}

/// Why a response body failed.
#[derive(Debug, thiserror::Error)]
pub enum BodyReadError {
    #[error("the upstream closed the connection before the response body ended")]
    Incomplete,
    #[error("reading the response body failed: {0}")]
    Read(#[source] io::Error),
    #[error("invalid chunked response body: {0}")]
    Chunked(&'static str),
    #[error("response trailers larger than {MAX_TRAILER_BYTES} bytes")]
    TrailersTooLarge,
    #[error("invalid response trailers: {0}")]
    Trailers(#[from] httparse::Error),
}

/// A response body read from its connection, which it owns until the end.
#[derive(Debug)]
pub struct ResponseBody {
    /// `None` once given back (or dropped).
    conn: Option<Box<Conn>>,
    framing: Framing,
    /// Where the connection goes back to.
    idle: Arc<IdleConns>,
    /// The response's header fields, for a plain head (its `HeaderMap` is
    /// empty then; see `response_fields`).
    lines: Option<ResponseFields>,
}

impl ResponseBody {
    /// The response's header fields as lines, if its head was plain.
    pub fn response_fields(&self) -> Option<&ResponseFields> {
        self.lines.as_ref()
    }

    /// Takes the lines out (to put them into the response's map).
    pub fn take_response_fields(&mut self) -> Option<ResponseFields> {
        self.lines.take()
    }

    /// The body has ended: the connection goes back to the pool if it can
    /// carry another request and nothing beyond the response arrived.
    /// Either way the endpoint answered (an app that closes every
    /// connection answers too: `ConnPool::behind` asks).
    fn finish(&mut self) {
        self.framing = Framing::Done;
        if let Some(conn) = self.conn.take() {
            if conn.keep_alive && conn.buf.is_empty() {
                self.idle.keep_answered(conn);
            } else {
                self.idle.answered(clock::now_std());
            }
        }
    }

    fn fail(&mut self, error: BodyReadError) -> Poll<Option<Result<Frame<Bytes>, BodyReadError>>> {
        self.framing = Framing::Done;
        self.conn = None;
        Poll::Ready(Some(Err(error)))
    }

    /// The next frame from what is buffered.
    fn decode(&mut self) -> Decoded {
        let ResponseBody { conn, framing, .. } = self;
        let Some(conn) = conn.as_mut() else {
            return Decoded::End;
        };
        let Conn {
            buf,
            extension_bytes,
            ..
        } = &mut **conn;
        let (decoded, ended) = match framing {
            Framing::Done => (Decoded::End, false),
            Framing::Length(0) => (Decoded::End, true),
            Framing::Length(left) if !buf.is_empty() => {
                let n = (*left).min(buf.len() as u64);
                *left -= n;
                let data = buf.split_to(n as usize).freeze();
                (Decoded::Frame(Frame::data(data)), *left == 0)
            }
            Framing::UntilClose if !buf.is_empty() => {
                (Decoded::Frame(Frame::data(buf.split().freeze())), false)
            }
            Framing::Length(_) | Framing::UntilClose => (Decoded::NeedMore, false),
            Framing::Chunked(state) => decode_chunked(state, extension_bytes, buf),
        };
        if ended {
            self.finish();
        }
        decoded
    }
}

/// What [`ResponseBody::decode`] found in the buffer.
enum Decoded {
    Frame(Frame<Bytes>),
    End,
    NeedMore,
    Failed(BodyReadError),
}

/// The next frame of a chunked body from `buf`, and whether the body ended
/// with it.
fn decode_chunked(
    state: &mut Chunked,
    extension_bytes: &mut usize,
    buf: &mut BytesMut,
) -> (Decoded, bool) {
    loop {
        match state {
            Chunked::Size => match chunk_size(buf) {
                None => return (Decoded::NeedMore, false),
                Some(Err(e)) => return (Decoded::Failed(e), false),
                Some(Ok((size, extension))) => {
                    *extension_bytes += extension;
                    if *extension_bytes > MAX_CHUNK_EXTENSIONS {
                        let error = BodyReadError::Chunked("chunk extensions too large");
                        return (Decoded::Failed(error), false);
                    }
                    *state = if size == 0 {
                        Chunked::Trailers
                    } else {
                        Chunked::Data(size)
                    };
                }
            },
            Chunked::Data(left) => {
                if buf.is_empty() {
                    return (Decoded::NeedMore, false);
                }
                let n = (*left).min(buf.len() as u64);
                *left -= n;
                if *left == 0 {
                    *state = Chunked::DataEnd;
                }
                return (
                    Decoded::Frame(Frame::data(buf.split_to(n as usize).freeze())),
                    false,
                );
            }
            Chunked::DataEnd => {
                if buf.len() < 2 {
                    return (Decoded::NeedMore, false);
                }
                if &buf[..2] != b"\r\n" {
                    let error = BodyReadError::Chunked("no CRLF after chunk data");
                    return (Decoded::Failed(error), false);
                }
                let _ = buf.split_to(2);
                *state = Chunked::Size;
            }
            Chunked::Trailers => {
                return match trailers(buf) {
                    None => (Decoded::NeedMore, false),
                    Some(Err(e)) => (Decoded::Failed(e), false),
                    Some(Ok(Some(trailers))) => (Decoded::Frame(Frame::trailers(trailers)), true),
                    Some(Ok(None)) => (Decoded::End, true),
                };
            }
        }
    }
}

/// A chunk-size line at the start of `buf` (hex size, extensions ignored),
/// removed; `None`: the line is not complete yet.
fn chunk_size(buf: &mut BytesMut) -> Option<Result<(u64, usize), BodyReadError>> {
    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
        return (buf.len() > MAX_CHUNK_LINE)
            .then_some(Err(BodyReadError::Chunked("chunk-size line too long")));
    };
    let line = buf.split_to(end + 2);
    let line = &line[..end];
    let digits = line
        .iter()
        .position(|b| !b.is_ascii_hexdigit())
        .unwrap_or(line.len());
    let size = line[..digits].iter().try_fold(0u64, |n, &d| {
        let digit = u64::from(char::from(d).to_digit(16).unwrap_or(0));
        n.checked_mul(16).map(|n| n | digit)
    });
    let Some(size) = size.filter(|_| digits > 0) else {
        return Some(Err(BodyReadError::Chunked("invalid chunk size")));
    };
    // Optional whitespace (SP, HTAB), then nothing or `;` extensions.
    let rest = &line[digits..];
    let after_space = rest
        .iter()
        .position(|&b| b != b' ' && b != b'\t')
        .unwrap_or(rest.len());
    let extension = &rest[after_space..];
    if !(extension.is_empty() || extension[0] == b';')
        || extension.iter().any(|&b| b == b'\n' || b == b'\r')
    {
        return Some(Err(BodyReadError::Chunked("invalid chunk size line")));
    }
    Some(Ok((size, extension.len())))
}

/// The trailer section at the start of `buf` (after the last chunk),
/// removed: `Some(None)` when there is none. `None`: not complete yet.
fn trailers(buf: &mut BytesMut) -> Option<Result<Option<HeaderMap>, BodyReadError>> {
    if buf.starts_with(b"\r\n") {
        let _ = buf.split_to(2);
        return Some(Ok(None));
    }
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    match httparse::parse_headers(buf, &mut fields) {
        Ok(httparse::Status::Partial) => {
            (buf.len() > MAX_TRAILER_BYTES).then_some(Err(BodyReadError::TrailersTooLarge))
        }
        Err(e) => Some(Err(e.into())),
        Ok(httparse::Status::Complete((len, _))) if len > MAX_TRAILER_BYTES => {
            Some(Err(BodyReadError::TrailersTooLarge))
        }
        Ok(httparse::Status::Complete((len, fields))) => {
            let mut map = HeaderMap::with_capacity(fields.len());
            for field in fields {
                let (Ok(name), Ok(value)) = (
                    HeaderName::from_bytes(field.name.as_bytes()),
                    HeaderValue::from_bytes(field.value),
                ) else {
                    return Some(Err(BodyReadError::Chunked("invalid trailer field")));
                };
                map.append(name, value);
            }
            let _ = buf.split_to(len);
            Some(Ok(Some(map)))
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BodyReadError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyReadError>>> {
        let this = &mut *self;
        loop {
            match this.decode() {
                Decoded::Frame(frame) => return Poll::Ready(Some(Ok(frame))),
                Decoded::End => return Poll::Ready(None),
                Decoded::Failed(e) => return this.fail(e),
                Decoded::NeedMore => {}
            }
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match ready!(conn.poll_fill(cx)) {
                Ok(0) if matches!(this.framing, Framing::UntilClose) => {
                    this.framing = Framing::Done;
                    this.conn = None;
                    return Poll::Ready(None);
                }
                Ok(0) => return this.fail(BodyReadError::Incomplete),
                Ok(_) => {}
                Err(e) => return this.fail(BodyReadError::Read(e)),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.framing, Framing::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Done => SizeHint::with_exact(0),
            Framing::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;
    use crate::body::ProxyBody;
    use crate::settings::Limits;
    use crate::testing::get;
    use crate::upstream::pool::{Answer, ConnPool, SendError};

    /// What the scripted upstream does with one request.
    #[derive(Clone)]
    enum Step {
        /// Writes these pieces (a pause between them, so that they arrive
        /// apart), and keeps the connection.
        Reply(Vec<&'static [u8]>),
        /// The same, then closes the connection.
        ReplyAndClose(Vec<&'static [u8]>),
        /// Closes without answering.
        Close,
        /// Waits this long (a slow upstream), then replies as `Reply`.
        After(Duration, Vec<&'static [u8]>),
    }

    /// An upstream that answers the n-th request it reads (over all its
    /// connections) with `steps[n]`; counts connections.
    async fn scripted(steps: Vec<Step>) -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let (count, steps) = (Arc::clone(&connections), Arc::new(steps));
        let next = Arc::new(AtomicUsize::new(0));
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let (steps, next) = (Arc::clone(&steps), Arc::clone(&next));
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 4096];
                    loop {
                        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                            match stream.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => head.extend_from_slice(&buf[..n]),
                            }
                        }
                        head.clear();
                        let step = steps.get(next.fetch_add(1, Ordering::SeqCst)).cloned();
                        let (pieces, close) = match step {
                            Some(Step::Reply(pieces)) => (pieces, false),
                            Some(Step::After(pause, pieces)) => {
                                tokio::time::sleep(pause).await;
                                (pieces, false)
                            }
                            Some(Step::ReplyAndClose(pieces)) => (pieces, true),
                            Some(Step::Close) | None => return,
                        };
                        for piece in pieces {
                            if stream.write_all(piece).await.is_err() {
                                return;
                            }
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                        if close {
                            return;
                        }
                    }
                });
            }
        });
        (addr, connections)
    }

    fn pool(addr: SocketAddr) -> Arc<ConnPool> {
        ConnPool::new(addr, Arc::new(Limits::default()))
    }

    /// Status, body and trailers of one request through the pool.
    async fn fetch(
        pool: &Arc<ConnPool>,
        request: Request<ProxyBody>,
    ) -> (u16, String, Option<HeaderMap>) {
        let response = pool.send(request).await.expect("answered");
        let status = response.status().as_u16();
        let collected = response.into_body().collect().await.expect("whole body");
        let trailers = collected.trailers().cloned();
        let body = String::from_utf8(collected.to_bytes().to_vec()).unwrap();
        (status, body, trailers)
    }

    async fn body_error(pool: &Arc<ConnPool>, request: Request<ProxyBody>) -> String {
        let response = pool.send(request).await.expect("answered");
        let error = response
            .into_body()
            .collect()
            .await
            .expect_err("body fails");
        error.to_string()
    }

    fn exchange_error(sent: Result<Response<crate::body::StreamedBody>, SendError>) -> String {
        match sent {
            Err(SendError::Upstream(error)) => error.to_string(),
            Err(other) => panic!("other failure: {other:?}"),
            Ok(response) => panic!("answered {}", response.status()),
        }
    }

    /// The response-head deadline, kept with one lazy timer per connection:
    /// a timer armed for an earlier request that fires while a later one
    /// waits is re-armed for it, a shorter deadline moves it earlier, and a
    /// passed deadline fails the exchange (the connection is dropped).
    /// The times leave a busy machine a second or more of slack at every
    /// step; a timer left at an earlier deadline would be seconds off.
    #[tokio::test]
    async fn the_response_head_deadline_holds_with_one_timer_per_connection() {
        let ok = &b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"[..];
        let (addr, connections) = scripted(vec![
            Step::Reply(vec![ok]),
            Step::After(Duration::from_millis(2400), vec![ok]),
            Step::After(Duration::from_secs(20), vec![ok]),
            // Part of a head, then nothing.
            Step::Reply(vec![b"HTTP/1.1 200 OK\r\ncontent-le"]),
        ])
        .await;
        let pool = pool(addr);
        let within = |ms| Some(tokio::time::Instant::now() + Duration::from_millis(ms));
        let body = |sent: Result<Answer, SendError>| async move {
            let (response, _) = sent.expect("answered");
            let body = response.into_body().collect().await.expect("whole body");
            String::from_utf8(body.to_bytes().to_vec()).unwrap()
        };
        // Arms the connection's timer 1.2 s from now.
        assert_eq!(
            body(pool.dispatch(get("/"), within(1200)).await).await,
            "ok"
        );
        // It fires while this one (6 s allowed) waits 2.4 s for its answer.
        let started = Instant::now();
        assert_eq!(
            body(pool.dispatch(get("/"), within(6000)).await).await,
            "ok"
        );
        assert!(started.elapsed() >= Duration::from_millis(2300));
        // 800 ms allowed, the answer takes 20 s: the timer moves earlier.
        let started = Instant::now();
        match pool.dispatch(get("/"), within(800)).await {
            Err(SendError::TimedOut) => {}
            Err(other) => panic!("failed otherwise: {other:?}"),
            Ok((response, _)) => panic!("answered {}", response.status()),
        }
        let waited = started.elapsed();
        assert!(
            // The timer left at the second request's deadline would fire
            // ~3.6 s after this one started.
            waited >= Duration::from_millis(790) && waited < Duration::from_millis(2500),
            "timed out after {waited:?}"
        );
        assert_eq!(connections.load(Ordering::SeqCst), 1);
        assert_eq!(
            pool.pooled_connections(),
            0,
            "a timed-out connection is dropped"
        );
        // A head that stops halfway is timed out too (new connection).
        let started = Instant::now();
        assert!(matches!(
            pool.dispatch(get("/"), within(800)).await,
            Err(SendError::TimedOut)
        ));
        assert!(started.elapsed() < Duration::from_millis(3000));
        assert_eq!(connections.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_length_framed_response_in_pieces_arrives_whole_and_the_connection_is_reused() {
        let reply = vec![
            &b"HTTP/1.1 200 OK\r\ncontent-len"[..],
            b"gth: 11\r\n\r\nhello",
            b" world",
        ];
        let (addr, connections) =
            scripted(vec![Step::Reply(reply.clone()), Step::Reply(reply)]).await;
        let pool = pool(addr);
        for _ in 0..2 {
            assert_eq!(
                fetch(&pool, get("/")).await,
                (200, "hello world".into(), None)
            );
        }
        assert_eq!(connections.load(Ordering::SeqCst), 1);
        assert_eq!(pool.pooled_connections(), 1);
    }

    #[tokio::test]
    async fn a_chunked_response_is_decoded_with_extensions_and_trailers() {
        let chunked = vec![
            &b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x-sum\r\n\r\n"[..],
            b"5;name=value\r\nhello\r\n",
            b"6\r\n world\r",
            b"\n0\r\nx-sum: 42\r\n\r\n",
        ];
        let plain =
            vec![&b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"[..]];
        let (addr, connections) = scripted(vec![Step::Reply(chunked), Step::Reply(plain)]).await;
        let pool = pool(addr);
        let (status, body, trailers) = fetch(&pool, get("/")).await;
        assert_eq!((status, body.as_str()), (200, "hello world"));
        assert_eq!(trailers.unwrap()["x-sum"], "42");
        assert_eq!(fetch(&pool, get("/")).await, (200, "ok".into(), None));
        assert_eq!(
            connections.load(Ordering::SeqCst),
            1,
            "reused after a chunked body"
        );
    }

    #[tokio::test]
    async fn a_response_without_length_is_read_to_the_close_and_its_connection_not_reused() {
        let (addr, connections) = scripted(vec![
            Step::ReplyAndClose(vec![b"HTTP/1.1 200 OK\r\n\r\nuntil ", b"the close"]),
            Step::Reply(vec![
                b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok",
            ]),
            Step::Reply(vec![b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok"]),
            Step::Reply(vec![b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"]),
        ])
        .await;
        let pool = pool(addr);
        assert_eq!(fetch(&pool, get("/")).await.1, "until the close");
        assert_eq!(fetch(&pool, get("/")).await.1, "ok");
        assert_eq!(fetch(&pool, get("/")).await.1, "ok");
        assert_eq!(
            pool.pooled_connections(),
            0,
            "close, connection: close, HTTP/1.0"
        );
        assert_eq!(fetch(&pool, get("/")).await.1, "ok");
        assert_eq!(connections.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn bodiless_responses_end_at_their_head_informational_ones_are_skipped() {
        let (addr, connections) = scripted(vec![
            Step::Reply(vec![b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"]),
            Step::Reply(vec![b"HTTP/1.1 204 No Content\r\n\r\n"]),
            Step::Reply(vec![
                b"HTTP/1.1 304 Not Modified\r\ncontent-length: 9\r\n\r\n",
            ]),
            Step::Reply(vec![
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n",
                b"HTTP/1.1 201 Made\r\ncontent-length: 2\r\n\r\nok",
            ]),
        ])
        .await;
        let pool = pool(addr);
        let head = Request::head("/").body(ProxyBody::empty()).unwrap();
        assert_eq!(fetch(&pool, head).await, (200, String::new(), None));
        assert_eq!(fetch(&pool, get("/")).await, (204, String::new(), None));
        assert_eq!(fetch(&pool, get("/")).await, (304, String::new(), None));
        let response = pool.send(get("/")).await.unwrap();
        assert_eq!(response.status(), 201);
        let reason = response.extensions().get::<hyper::ext::ReasonPhrase>();
        assert_eq!(
            reason.map(|r| r.as_bytes()),
            Some(&b"Made"[..]),
            "custom reason kept"
        );
        assert_eq!(
            response.into_body().collect().await.unwrap().to_bytes(),
            "ok"
        );
        assert_eq!(connections.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn broken_heads_are_upstream_failures() {
        let mut long_name_head = b"HTTP/1.1 200 OK\r\nx-before: 1\r\n".to_vec();
        long_name_head.extend(std::iter::repeat_n(b'm', 65_536));
        long_name_head.extend_from_slice(b": v\r\ncontent-length: 2\r\n\r\nok");
        let long_name_head: &'static [u8] = Box::leak(long_name_head.into_boxed_slice());
        for reply in [
            &b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nok"[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: +2\r\n\r\nok",
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\n",
            b"HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nbad header\r\n\r\n",
            b"SSH-2.0-OpenSSH\r\n\r\n",
            // A name longer than a header map takes (the attack on the
            // response lines found it forwarded by them).
            long_name_head,
        ] {
            let (addr, _) = scripted(vec![Step::Reply(vec![reply])]).await;
            let error = exchange_error(pool(addr).send(get("/")).await);
            assert!(error.contains("invalid response head"), "{error}");
        }
        let (addr, _) = scripted(vec![Step::ReplyAndClose(vec![b"HTTP/1.1 200 OK\r\ncont"])]).await;
        let error = exchange_error(pool(addr).send(get("/")).await);
        assert!(error.contains("middle of the response head"), "{error}");
    }

    #[tokio::test]
    async fn broken_bodies_fail_the_body_and_close_the_connection() {
        let cases: [(&'static [u8], &str); 4] = [
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhalf",
                "before the response body ended",
            ),
            (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
                "invalid chunk size",
            ),
            (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nokXX",
                "no CRLF",
            ),
            (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n",
                "before the response body ended",
            ),
        ];
        for (reply, expected) in cases {
            let (addr, _) = scripted(vec![Step::ReplyAndClose(vec![reply])]).await;
            let pool = pool(addr);
            let error = body_error(&pool, get("/")).await;
            assert!(error.contains(expected), "{error}");
            assert_eq!(pool.pooled_connections(), 0);
        }
    }

    #[tokio::test]
    async fn bytes_beyond_the_response_keep_the_connection_out_of_the_pool() {
        let (addr, connections) = scripted(vec![
            Step::Reply(vec![
                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n",
            ]),
            Step::Reply(vec![b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"]),
        ])
        .await;
        let pool = pool(addr);
        assert_eq!(fetch(&pool, get("/")).await.1, "ok");
        assert_eq!(fetch(&pool, get("/")).await.1, "ok");
        assert_eq!(connections.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_pooled_get_cut_off_in_its_response_head_is_sent_again_once() {
        let ok = Step::Reply(vec![b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"]);
        let partial = Step::ReplyAndClose(vec![b"HTTP/1.1 200 OK\r\ncont"]);
        let informational = Step::ReplyAndClose(vec![b"HTTP/1.1 100 Continue\r\n\r\n"]);
        let (addr, connections) =
            scripted(vec![ok.clone(), partial, ok.clone(), informational, ok]).await;
        let pool = pool(addr);
        for _ in 0..3 {
            assert_eq!(fetch(&pool, get("/")).await.1, "ok");
        }
        assert_eq!(connections.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn transfer_encoding_overrides_and_removes_content_length() {
        let reply = &b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 100\r\n\r\n5\r\nhello\r\n0\r\n\r\n"[..];
        let (addr, _) = scripted(vec![Step::Reply(vec![reply])]).await;
        let response = pool(addr).send(get("/")).await.unwrap();
        assert!(!response.headers().contains_key(header::CONTENT_LENGTH));
        assert_eq!(
            response.into_body().collect().await.unwrap().to_bytes(),
            "hello"
        );
    }

    #[tokio::test]
    async fn oversized_trailers_and_chunk_extensions_fail_the_body() {
        let big_trailer: &'static [u8] = Box::leak(
            format!("0\r\nx-big: {}\r\n\r\n", "a".repeat(MAX_TRAILER_BYTES))
                .into_bytes()
                .into_boxed_slice(),
        );
        let chunk = format!("1;{}\r\nA\r\n", "e".repeat(1000));
        let many_extensions: &'static [u8] = Box::leak(
            format!("{}0\r\n\r\n", chunk.repeat(20))
                .into_bytes()
                .into_boxed_slice(),
        );
        let head = &b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"[..];
        for (body, expected) in [
            (big_trailer, "trailers larger"),
            (many_extensions, "chunk extensions too large"),
        ] {
            let (addr, _) = scripted(vec![Step::ReplyAndClose(vec![head, body])]).await;
            let error = body_error(&pool(addr), get("/")).await;
            assert!(error.contains(expected), "{error}");
        }
    }

    #[tokio::test]
    async fn a_post_on_a_connection_closed_before_answering_is_not_sent_again() {
        let ok = Step::Reply(vec![b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"]);
        let (addr, connections) = scripted(vec![ok.clone(), Step::Close, ok]).await;
        let pool = pool(addr);
        assert_eq!(fetch(&pool, get("/")).await.1, "ok");
        let post = Request::post("/orders").body(ProxyBody::empty()).unwrap();
        let error = exchange_error(pool.send(post).await);
        assert!(error.contains("closed before any response byte"), "{error}");
        assert_eq!(connections.load(Ordering::SeqCst), 1, "not sent again");
    }

    /// Requests an upstream read (each whole, as read), and its
    /// connections.
    #[derive(Default)]
    struct Recorded {
        requests: Mutex<Vec<Vec<u8>>>,
        connections: AtomicUsize,
    }

    /// An upstream that reads requests framed by `content-length` (none:
    /// no body), keeps each as read and answers `ok` on the same
    /// connection; the request numbered `close_at` (from 0, over all
    /// connections) it reads whole and then closes its connection without
    /// answering.
    async fn recording(close_at: Option<usize>) -> (SocketAddr, Arc<Recorded>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Recorded::default());
        let record = Arc::clone(&seen);
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                record.connections.fetch_add(1, Ordering::SeqCst);
                let record = Arc::clone(&record);
                tokio::spawn(async move {
                    let mut input = Vec::new();
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let whole = loop {
                            if let Some(end) = input.windows(4).position(|w| w == b"\r\n\r\n") {
                                let head = String::from_utf8_lossy(&input[..end]).to_lowercase();
                                let length = head
                                    .lines()
                                    .find_map(|l| l.strip_prefix("content-length: "))
                                    .map_or(0, |v| v.trim().parse::<usize>().unwrap());
                                if input.len() >= end + 4 + length {
                                    break end + 4 + length;
                                }
                            }
                            match stream.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => input.extend_from_slice(&buf[..n]),
                            }
                        };
                        let request: Vec<u8> = input.drain(..whole).collect();
                        let closing = {
                            let mut seen = record.requests.lock().unwrap();
                            seen.push(request);
                            close_at == Some(seen.len() - 1)
                        };
                        if closing {
                            return;
                        }
                        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if stream.write_all(ok).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (addr, seen)
    }

    #[tokio::test]
    async fn a_body_known_in_full_goes_out_after_its_head_and_is_counted_once() {
        // Copied behind the head, at the copy limit, and written after it.
        for size in [5, COPY_BODY_LIMIT, COPY_BODY_LIMIT + 1, 200_000] {
            let (addr, seen) = recording(None).await;
            let pool = pool(addr);
            let data: Bytes = (0..size).map(|i| b'a' + (i % 26) as u8).collect();
            let counted = prometheus::IntCounter::new("sent", "sent").unwrap();
            for _ in 0..2 {
                let request = Request::post("/orders")
                    .header("host", "orders")
                    .header("content-length", size.to_string())
                    .body(ProxyBody::full(data.clone()).counting(counted.clone()))
                    .unwrap();
                assert!(eligible(&request));
                assert_eq!(fetch(&pool, request).await.1, "ok");
            }
            let head =
                format!("POST /orders HTTP/1.1\r\nhost: orders\r\ncontent-length: {size}\r\n\r\n");
            let mut want = head.into_bytes();
            want.extend_from_slice(&data);
            let requests = seen.requests.lock().unwrap();
            assert_eq!(requests.len(), 2, "{size}");
            assert!(
                requests.iter().all(|got| *got == want),
                "{size}: the request as sent"
            );
            let connections = seen.connections.load(Ordering::SeqCst);
            assert_eq!(connections, 1, "{size}: one connection, kept");
            assert_eq!(
                counted.get(),
                2 * size as u64,
                "{size}: counted once per request"
            );
        }
    }

    /// Counted as written: a resend again, a body the upstream read and
    /// never answered too.
    #[tokio::test]
    async fn a_body_known_in_full_is_sent_again_only_for_an_idempotent_method() {
        for (method, sent) in [(Method::PUT, 2), (Method::POST, 1)] {
            // The second request finds the first one's connection in the
            // pool, and the upstream closes it having read it whole.
            let (addr, seen) = recording(Some(1)).await;
            let pool = pool(addr);
            assert_eq!(fetch(&pool, get("/warm")).await.1, "ok");
            let counted = prometheus::IntCounter::new("sent", "sent").unwrap();
            let request = Request::builder()
                .method(method.clone())
                .uri("/orders/7")
                .header("content-length", "4")
                .body(ProxyBody::full("data").counting(counted.clone()))
                .unwrap();
            let answer = pool.send(request).await;
            let requests = seen.requests.lock().unwrap();
            assert_eq!(requests.len(), 1 + sent, "{method}");
            assert!(
                requests[1..].iter().all(|r| r.ends_with(b"\r\n\r\ndata")),
                "{method}"
            );
            assert_eq!(
                answer.is_ok(),
                sent == 2,
                "{method}: answered on a new connection"
            );
            assert_eq!(seen.connections.load(Ordering::SeqCst), sent, "{method}");
            assert_eq!(
                counted.get(),
                4 * sent as u64,
                "{method}: counted as written"
            );
        }
    }

    #[test]
    fn only_origin_form_requests_with_a_body_known_in_full_take_this_client() {
        let with = |name: &str, value: &str| {
            Request::get("/")
                .header(name, value)
                .body(ProxyBody::empty())
                .unwrap()
        };
        let post = |lengths: &[&str]| {
            let mut request = Request::post("/");
            for length in lengths {
                request = request.header("content-length", *length);
            }
            request.body(ProxyBody::full("abc")).unwrap()
        };
        assert!(eligible(&get("/a?b=c")));
        assert!(eligible(&with("content-length", "0")));
        assert!(!eligible(&with("upgrade", "websocket")));
        assert!(!eligible(&with("transfer-encoding", "chunked")));
        assert!(!eligible(&with("expect", "100-continue")));
        assert!(!eligible(&with("content-length", "3")));
        assert!(eligible(&post(&["3"])));
        assert!(eligible(&post(&["3", "3"])));
        // The head must state the body's length, as the body is.
        assert!(!eligible(&post(&[])));
        assert!(!eligible(&post(&["4"])));
        assert!(!eligible(&post(&["3", "4"])));
        assert!(!eligible(&post(&["03"])));
        // A body some of which has been handed over is not known in full.
        let mut polled = post(&["3"]);
        let first = std::pin::pin!(polled.body_mut().frame());
        assert!(futures_util::FutureExt::now_or_never(first).is_some());
        assert!(!eligible(&polled));
        assert!(!eligible(&get("http://orders/absolute")));
        let connect = Request::connect("orders:80")
            .body(ProxyBody::empty())
            .unwrap();
        assert!(!eligible(&connect));
    }

    #[test]
    fn the_head_is_written_as_hypers_client_writes_it() {
        let request = Request::delete("/orders/7?force=1")
            .header("host", "orders")
            .header("x-Trace", "a")
            .header("x-trace", "b")
            .body(ProxyBody::empty())
            .unwrap();
        assert_eq!(
            String::from_utf8({
                let mut head = b"stale".to_vec();
                encode_head(&request, &mut head);
                head
            })
            .unwrap(),
            "DELETE /orders/7?force=1 HTTP/1.1\r\nhost: orders\r\nx-trace: a\r\nx-trace: b\r\n\r\n"
        );
    }

    #[test]
    fn chunk_size_lines() {
        let size =
            |line: &[u8]| chunk_size(&mut BytesMut::from(line)).map(|r| r.ok().map(|(n, _)| n));
        assert_eq!(size(b"a\r\n"), Some(Some(10)));
        assert_eq!(size(b"FF;ext=\"x\"\r\n"), Some(Some(255)));
        assert_eq!(size(b"1 ;ext\r\n"), Some(Some(1)));
        assert_eq!(size(b"5 \r\n"), Some(Some(5)), "whitespace before the CRLF");
        assert_eq!(size(b"5\t \r\n"), Some(Some(5)));
        assert_eq!(
            size(b"00000000000000005\r\n"),
            Some(Some(5)),
            "leading zeros"
        );
        assert_eq!(size(b"ffffffffffffffff\r\n"), Some(Some(u64::MAX)));
        assert_eq!(size(b"10"), None, "incomplete");
        for bad in [
            &b"\r\n"[..],
            b"x\r\n",
            b"1x\r\n",
            b"-1\r\n",
            b"11111111111111111\r\n",
            b"1\n\r\n",
            b"5 x\r\n",
        ] {
            assert_eq!(size(bad), Some(None), "{:?}", String::from_utf8_lossy(bad));
        }
        let long = vec![b'1'; MAX_CHUNK_LINE + 1];
        assert_eq!(size(&long), Some(None), "line too long");
    }

    #[test]
    fn content_lengths_must_agree() {
        let lengths = |values: &[&str]| {
            let mut fields = FramingFields::default();
            for v in values {
                fields.see(FieldKind::ContentLength, v.as_bytes());
            }
            fields.content_length.and_then(Result::ok)
        };
        assert_eq!(lengths(&["42"]), Some(42));
        assert_eq!(lengths(&["5, 5", "5"]), Some(5));
        assert_eq!(lengths(&["5", "6"]), None);
        assert_eq!(
            lengths(&["+5", "5"]),
            None,
            "an invalid field stays invalid"
        );
        assert_eq!(lengths(&["5", "+5"]), None);
        assert_eq!(lengths(&[""]), None);
        assert_eq!(lengths(&["99999999999999999999"]), None, "overflows u64");
        assert_eq!(lengths(&["00000000000000000005"]), Some(5), "leading zeros");
    }

    #[test]
    fn the_last_coding_and_connection_tokens_decide() {
        let fields = |pairs: &[(HeaderName, &str)]| {
            let mut fields = FramingFields::default();
            for (name, value) in pairs {
                fields.see(FieldKind::of(name.as_str().as_bytes()), value.as_bytes());
            }
            fields
        };
        let te = header::TRANSFER_ENCODING;
        assert_eq!(
            fields(&[(te.clone(), "gzip, chunked")]).transfer_encoding,
            Some(true)
        );
        assert_eq!(
            fields(&[(te.clone(), "chunked, gzip")]).transfer_encoding,
            Some(false)
        );
        assert_eq!(
            fields(&[(te.clone(), "chunked"), (te, "gzip")]).transfer_encoding,
            Some(false)
        );
        let conn = header::CONNECTION;
        assert!(fields(&[]).keep_alive(Version::HTTP_11));
        assert!(!fields(&[]).keep_alive(Version::HTTP_10));
        assert!(fields(&[(conn.clone(), "Keep-Alive")]).keep_alive(Version::HTTP_10));
        let closing = fields(&[(conn.clone(), "close"), (conn.clone(), "keep-alive")]);
        assert!(!closing.keep_alive(Version::HTTP_11), "close wins");

        // Connection options alone are consumed; a field naming another
        // field stays in the map for the proxy's hop-by-hop removal (and
        // makes the head not plain).
        assert!(!names_others(b" Keep-Alive ,close"));
        assert!(names_others(b"keep-alive, x-private"));
        let length = (header::CONTENT_LENGTH, "2");
        assert!(fields(&[(conn.clone(), "close"), length.clone()]).plain());
        assert!(!fields(&[(conn, "x-private"), length.clone()]).plain());
        assert!(!fields(&[(header::TRAILER, "x-sum"), length.clone()]).plain());
        assert!(!fields(&[(header::TRANSFER_ENCODING, "gzip"), length]).plain());
        assert!(!fields(&[]).plain(), "no length: read to the close");
    }

    mod properties {
        use std::collections::BTreeMap;

        use proptest::prelude::*;

        use super::*;
        use crate::proxy::headers::strip_hop_by_hop;

        /// Names of every kind, in mixed case, and random tokens.
        fn name() -> impl Strategy<Value = String> {
            prop_oneof![
                prop::sample::select(vec![
                    "Server",
                    "date",
                    "DATE",
                    "Set-Cookie",
                    "x-a",
                    "X-A",
                    "content-type",
                    "Keep-Alive",
                    "TE",
                    "Upgrade",
                    "proxy-connection",
                    "Proxy-Authenticate",
                    "proxy-authorization",
                    "Connection",
                    "Trailer",
                    "Transfer-Encoding",
                    "x-te",
                    "connections",
                ])
                .prop_map(str::to_owned),
                "[!#$%&'*+.^_`|~0-9A-Za-z-]{1,12}",
            ]
        }

        /// Values httparse takes (trimmed), obs-text included; lists of
        /// connection options too.
        fn value() -> impl Strategy<Value = Vec<u8>> {
            prop_oneof![
                prop::sample::select(vec![
                    "close",
                    "keep-alive",
                    "Keep-Alive, close",
                    "x-a",
                    "chunked",
                    "",
                    "trailers",
                    "gzip, trailers",
                ])
                .prop_map(|v| v.as_bytes().to_vec()),
                prop::collection::vec(
                    prop_oneof![0x21u8..=0x7e, 0x80u8..=0xff, Just(b' '), Just(b'\t')],
                    0..20
                )
                .prop_map(|mut v| {
                    while v.first().is_some_and(|b| matches!(b, b' ' | b'\t')) {
                        v.remove(0);
                    }
                    while v.last().is_some_and(|b| matches!(b, b' ' | b'\t')) {
                        v.pop();
                    }
                    v
                }),
            ]
        }

        fn by_name(headers: &HeaderMap) -> BTreeMap<String, Vec<Vec<u8>>> {
            let mut named: BTreeMap<String, Vec<Vec<u8>>> = BTreeMap::new();
            for (name, value) in headers {
                named
                    .entry(name.as_str().to_owned())
                    .or_default()
                    .push(value.as_bytes().to_vec());
            }
            named
        }

        proptest! {
            #![proptest_config(crate::testing::proptest_config(2_000))]

            /// A head taken as lines gives the client the same fields as
            /// the map the proxy forwarded before (hop-by-hop fields
            /// removed, the length written from the body): every head
            /// that can be plain is, and the lines always go back into a
            /// map whole.
            #[test]
            fn a_plain_heads_lines_are_the_fields_the_proxy_forwards(
                fields in prop::collection::vec((name(), value()), 0..10),
                length in 0u64..1000,
                status in prop::sample::select(vec![200u16, 201, 204, 304, 404, 503]),
            ) {
                let mut head = format!("HTTP/1.1 {status} X\r\n").into_bytes();
                for (name, value) in &fields {
                    head.extend_from_slice(name.as_bytes());
                    head.extend_from_slice(b": ");
                    head.extend_from_slice(value);
                    head.extend_from_slice(b"\r\n");
                }
                head.extend_from_slice(format!("Content-Length: {length}\r\n\r\n").as_bytes());
                let parse = |lines_allowed| {
                    let mut buf = BytesMut::from(&head[..]);
                    parse_head(&mut buf, &mut Vec::new(), lines_allowed)
                };
                let Ok(Some(as_map)) = parse(false) else {
                    // An invalid length (a field above said otherwise).
                    prop_assert!(parse(true).is_err());
                    return Ok(());
                };
                let as_lines = parse(true).unwrap().unwrap();
                let kind = |k| fields.iter().any(|(n, _)| FieldKind::of(n.as_bytes()) == k);
                let names_other_fields = fields.iter().any(|(n, v)| {
                    FieldKind::of(n.as_bytes()) == FieldKind::Connection && names_others(v)
                });
                let may_be_plain = !(kind(FieldKind::TransferEncoding)
                    || kind(FieldKind::Trailer)
                    || kind(FieldKind::Te)
                    || names_other_fields
                    || matches!(status, 204 | 304));
                prop_assert_eq!(as_lines.lines.is_some(), may_be_plain);
                let Some(lines) = as_lines.lines else {
                    return Ok(());
                };
                prop_assert!(as_lines.headers.is_empty());
                let has_date = lines.has_date();
                let mut restored = HeaderMap::new();
                lines.restore_into(&mut restored);
                let mut forwarded = as_map.headers;
                strip_hop_by_hop(&mut forwarded, false);
                forwarded.remove(header::CONTENT_LENGTH);
                prop_assert_eq!(by_name(&restored), by_name(&forwarded));
                prop_assert_eq!(has_date, forwarded.contains_key(header::DATE));
            }
        }
    }
}
