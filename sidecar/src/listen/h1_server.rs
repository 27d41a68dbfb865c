//! Our own HTTP/1.1 server connection for the common request; hyper's for
//! everything else.
//!
//! Most requests through a mesh are HTTP/1.1 without a body (`GET`,
//! `HEAD`, `DELETE`...) or with a small one that arrives with its head
//! (an API's `POST` of some JSON), and for them hyper's server, behind the
//! framing guard, cost more than the work needs: the guard's parse of each
//! head, hyper's dispatcher, its second parse and its encoder (issue 17
//! measured them at ~5.4k of 28.3k instructions per request). [`serve`]
//! reads the socket itself, parses each head once, hands such requests to
//! the handler as `Request<StreamedBody>` (body [`StreamedBody::None`], or
//! [`StreamedBody::Whole`] for a `Content-Length` body of at most
//! [`MAX_WHOLE_BODY`] read whole: what the socket has with the head, and
//! the rest within the header read timeout) and writes the responses. At
//! the first request that is anything else — a body not whole within the
//! header read timeout, chunked or larger, `Expect`, an upgrade or
//! `CONNECT`, trailers asked for (`TE`), HTTP/1.0, a head not whole in
//! what was read, or one the framing guard would refuse (a second or invalid
//! `Host`, a second `Content-Length`, a head over the limit, bad syntax)
//! — it hands the connection, with the bytes read so far in a [`Rewind`]
//! and the time the head began, to a fresh framing guard and hyper
//! (`server.rs`), which see it as if they had read it from the start of
//! that request; from then on the connection is theirs. The framing
//! guard's property tests check that every message [`parse`] takes is one
//! the guard clears whole, at the same length, ending on a message
//! boundary.
//!
//! Flow per request: socket → [`parse`] (httparse; the guard's checks for
//! the heads it takes; the body, if any, sliced off the same buffer) →
//! the handler's future, raced against the
//! client's socket (pipelined bytes are kept and the next head is timed
//! from its first byte, [`HeadClock`]; an end of input with nothing else
//! sent cancels the request, as hyper does — but it is seen only after the
//! handler's first poll, so a request whose client shuts its side right
//! behind it has usually reached the app already, where hyper, reading
//! ahead, had usually cancelled it first) → [`encode_head`] → the body's
//! frames, coalesced with the head into one write when they are ready →
//! next request, or close. Between requests the client idle limit runs on
//! the guard's lazy timer ([`IdleTimer`]).
//!
//! What goes out follows hyper's server byte for byte where a client could
//! tell: the status line (a custom reason phrase from
//! [`hyper::ext::ReasonPhrase`]), `content-length` or `transfer-encoding:
//! chunked` chosen the same way, no body for `HEAD`, 204 and 304,
//! `connection: close` when the connection will close, and a `date` field
//! when the response has none. An upstream's plain response head comes as
//! lines (`upstream::response_fields`), written after the map's fields (the
//! sidecar's own) instead of through a map; its length is the body's.

use std::future::{poll_fn, Future};
use std::io::{self, IoSlice, Write as _};
use std::mem::MaybeUninit;
use std::pin::{pin, Pin};
use std::task::{Context, Poll};
use std::time::SystemTime;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::watch;
use tokio::time::{Duration, Instant};

use crate::body::{ProxyBody, StreamedBody};
use crate::listen::framing::{valid_host, IdleTimer, InFlightRequests};
use crate::listen::stop::StopWatch;
use crate::upstream::busy_poll;

/// Header fields a head may have for [`parse`] (hyper's default limit).
const MAX_HEADERS: usize = 100;

/// Bytes of pipelined requests buffered while one is answered; beyond it
/// the socket is not read until the answer is out.
const READ_AHEAD: usize = 64 * 1024;

/// Largest request body [`parse`] takes (read whole with its head; no
/// more than is read ahead anyway).
const MAX_WHOLE_BODY: usize = READ_AHEAD;

/// A data frame at least this large is written from its own buffer rather
/// than copied behind the head or a chunk size line.
const COPY_LIMIT: usize = 8 * 1024;

/// How a connection left [`serve`].
pub enum Served<T> {
    /// Closed (by either side, or at shutdown).
    Closed,
    /// A request [`serve`] does not answer itself; hyper goes on from it.
    /// With when the first byte of its head came, if it has begun (the
    /// framing guard times the head from then).
    Handover(Rewind<T>, Option<Instant>),
}

/// What [`serve`] enforces itself (the framing guard's limits, for the
/// requests it takes).
#[derive(Debug, Clone, Copy)]
pub struct Http1Limits {
    /// Longest head taken; a longer one goes to the guard, which refuses it.
    pub max_head: usize,
    /// Time a connection may wait for its next request with none in flight.
    pub idle_timeout: Duration,
    /// Time from a head's first byte to its end.
    pub head_timeout: Duration,
    /// With `--busy-poll`: whether the next request of a kept-alive client
    /// is polled for (see [`crate::listen::server::Handler`]).
    pub polls_for_next_request: bool,
}

/// Serves the connection `io` until it closes or needs hyper; see the
/// module docs. `respond` answers one request; `stop` asks for a graceful
/// close (the request being answered finishes first, with `connection:
/// close`). `in_flight` counts the connection's unanswered requests (its
/// responses' bodies hold them), for the idle limit.
pub async fn serve<T, R, F>(
    mut io: T,
    respond: R,
    stop: watch::Receiver<bool>,
    limits: Http1Limits,
    in_flight: &InFlightRequests,
) -> io::Result<Served<T>>
where
    T: AsyncRead + AsyncWrite + Unpin,
    R: Fn(Request<StreamedBody>) -> F,
    F: Future<Output = Response<ProxyBody>>,
{
    let mut stop = StopWatch::new(stop);
    let mut stopping = false;
    let mut idle = IdleTimer::new(limits.idle_timeout);
    let mut client = ClientInput::default();
    let mut fields = Vec::new();
    let mut out = Vec::new();
    loop {
        let (request, asked) = loop {
            let parsed = parse(&mut client.input, &mut fields, limits.max_head);
            if let Parsed::Request(..) = parsed {
                if client.head.late(limits.head_timeout) {
                    tracing::debug!("request head not received within the header read timeout");
                    return close(io).await;
                }
            }
            match parsed {
                Parsed::Request(request, asked) => break (request, asked),
                // The client has ended its input after the requests it sent.
                Parsed::Partial if client.ended => return close(io).await,
                // Part of a head: the guard times the rest of it.
                Parsed::Partial if !client.input.is_empty() => return Ok(client.hand_over(io)),
                Parsed::Partial => {}
                // The rest of the body: what the socket has at once (it
                // came in more than one read's worth), else what comes
                // within the header read timeout; then hyper takes it over.
                Parsed::BodyToCome(whole) => {
                    if read_ready(&mut io, &mut client.input, whole) {
                        continue;
                    }
                    let until =
                        client.head.first_byte.unwrap_or_else(Instant::now) + limits.head_timeout;
                    if wait_for_body(&mut io, &mut client.input, whole, until).await {
                        continue;
                    }
                    tracing::debug!("request body not whole within the header read timeout, handing it to hyper");
                    return Ok(client.hand_over(io));
                }
                Parsed::Other => return Ok(client.hand_over(io)),
            }
            // `--busy-poll`: a client that sends its next request right
            // after our answer is read without a wake-up.
            let awaiting = limits
                .polls_for_next_request
                .then(busy_poll::awaiting_next_request);
            let read = poll_fn(|cx| {
                if !stopping && stop.poll_stopped(cx).is_ready() {
                    stopping = true;
                }
                if stopping {
                    return Poll::Ready(None);
                }
                match read_more(&mut io, &mut client.input, cx) {
                    Poll::Pending if idle.expired(in_flight, cx) => {
                        tracing::debug!("client connection idle for the idle timeout, closing it");
                        Poll::Ready(None)
                    }
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(read) => Poll::Ready(Some(read)),
                }
            })
            .await;
            match read {
                Some(Ok(read)) if read > 0 => drop(awaiting),
                // Closed, idle, stopping or failed: nothing arrived.
                _ => {
                    if let Some(awaiting) = awaiting {
                        awaiting.cancel();
                    }
                }
            }
            match read {
                None | Some(Ok(0)) => return close(io).await,
                // A head read here is parsed at once (whole) or handed
                // over (begun now): no clock needed.
                Some(Ok(_)) => {}
                Some(Err(error)) => return Err(error),
            }
        };
        // What is left may be the next head: it is timed from now.
        client.head = HeadClock::default();
        if !client.input.is_empty() {
            client.head.arrived(&client.input);
        }

        // The answer, while watching the client: its end of input cancels
        // the request (hyper's behaviour) unless it sent more requests
        // first; pipelined bytes are kept.
        let answering = pin!(respond(request));
        let response =
            watching_client(answering, &mut io, &mut client, &mut stop, &mut stopping).await?;
        let Some(response) = response else {
            return Ok(Served::Closed); // the client is gone
        };

        let keep_alive = asked.keep_alive && !stopping;
        let (parts, body) = response.into_parts();
        let (encoder, keep_alive) = encode_head(&mut out, parts, &body, &asked, keep_alive);
        let complete = write_body(&mut io, &mut out, body, encoder, &mut client).await?;
        if !(complete && keep_alive) {
            return close(io).await;
        }
    }
}

/// What a connection has read from its client and not yet served.
#[derive(Default)]
struct ClientInput {
    /// Bytes read, not yet taken as requests.
    input: BytesMut,
    /// The client has ended its input (half-closed) after `input`.
    ended: bool,
    /// When the next head began arriving.
    head: HeadClock,
}

impl ClientInput {
    /// The rest of the connection, for the guard and hyper.
    fn hand_over<T>(self, io: T) -> Served<T> {
        let begun = match self.head.first_byte {
            None if !self.input.is_empty() => Some(Instant::now()),
            begun => begun,
        };
        Served::Handover(Rewind::new(self.input.freeze(), io), begun)
    }
}

/// When the next request's head began to arrive and when it was whole,
/// as far as reads tell (the framing guard's slowloris limit, for heads
/// read while another request is answered).
#[derive(Debug, Default, Clone, Copy)]
struct HeadClock {
    first_byte: Option<Instant>,
    whole_at: Option<Instant>,
}

impl HeadClock {
    /// Notes a read that left `input` (not empty) waiting to be parsed.
    fn arrived(&mut self, input: &[u8]) {
        if self.whole_at.is_some() {
            return;
        }
        let now = Instant::now();
        self.first_byte.get_or_insert(now);
        if head_is_whole(input) {
            self.whole_at = Some(now);
        }
    }

    /// Whether the head, whole now, took longer than `limit`.
    fn late(&self, limit: Duration) -> bool {
        match self.first_byte {
            None => false,
            Some(first) => self.whole_at.unwrap_or_else(Instant::now) - first > limit,
        }
    }
}

/// Whether `input` starts with a whole head (or something that is not one:
/// either way there is nothing more to wait for).
fn head_is_whole(input: &[u8]) -> bool {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut head = httparse::Request::new(&mut []);
    !matches!(
        httparse::ParserConfig::default()
            .parse_request_with_uninit_headers(&mut head, input, &mut slots),
        Ok(httparse::Status::Partial)
    )
}

/// Shuts the connection down (after the framing guard's refusal, if it
/// refused something) and reports it closed.
async fn close<T: AsyncWrite + Unpin>(mut io: T) -> io::Result<Served<T>> {
    let _ = io.shutdown().await;
    Ok(Served::Closed)
}

/// Reads what the socket has into `input` (growing it as needed).
fn read_more<T: AsyncRead + Unpin>(
    io: &mut T,
    input: &mut BytesMut,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    if input.capacity() - input.len() < 1024 {
        input.reserve(4096);
    }
    tokio_util::io::poll_read_buf(Pin::new(io), cx, input)
}

/// Reads what the socket has at once, without waiting, until `input`
/// holds `whole` bytes; whether it got there. (Polled with a waker that
/// does nothing: when the socket has no more, whoever reads it next
/// registers its own.)
fn read_ready<T: AsyncRead + Unpin>(io: &mut T, input: &mut BytesMut, whole: usize) -> bool {
    input.reserve(whole.saturating_sub(input.len()));
    let mut cx = Context::from_waker(std::task::Waker::noop());
    while input.len() < whole {
        match tokio_util::io::poll_read_buf(Pin::new(&mut *io), &mut cx, input) {
            Poll::Ready(Ok(n)) if n > 0 => {}
            _ => return false,
        }
    }
    true
}

/// Reads into `input` until it holds `whole` bytes; `false` if `until`
/// passes first or the client ends its input or fails (hyper then reads
/// what is left, and sees the same).
async fn wait_for_body<T: AsyncRead + Unpin>(
    io: &mut T,
    input: &mut BytesMut,
    whole: usize,
    until: Instant,
) -> bool {
    let mut deadline = pin!(tokio::time::sleep_until(until));
    poll_fn(|cx| loop {
        if input.len() >= whole {
            return Poll::Ready(true);
        }
        if deadline.as_mut().poll(cx).is_ready() {
            return Poll::Ready(false);
        }
        match tokio_util::io::poll_read_buf(Pin::new(&mut *io), cx, input) {
            Poll::Ready(Ok(n)) if n > 0 => {}
            Poll::Ready(_) => return Poll::Ready(false),
            Poll::Pending => return Poll::Pending,
        }
    })
    .await
}

/// Polls `answering` to its response; meanwhile reads pipelined bytes
/// into the client's input (up to [`READ_AHEAD`]) and notes a stop. `None`:
/// the client ended its input with no other request sent (the answer is
/// dropped, cancelling it).
async fn watching_client<T, F>(
    mut answering: Pin<&mut F>,
    io: &mut T,
    client: &mut ClientInput,
    stop: &mut StopWatch,
    stopping: &mut bool,
) -> io::Result<Option<Response<ProxyBody>>>
where
    T: AsyncRead + Unpin,
    F: Future<Output = Response<ProxyBody>>,
{
    poll_fn(|cx| {
        // The stop first: an answer ready in the same wake-up then says
        // `connection: close`.
        if !*stopping && stop.poll_stopped(cx).is_ready() {
            *stopping = true;
        }
        if let Poll::Ready(response) = answering.as_mut().poll(cx) {
            return Poll::Ready(Ok(Some(response)));
        }
        match watch_client(io, client, cx) {
            Poll::Ready(Ok(())) => Poll::Ready(Ok(None)),
            Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

/// `Ready(Ok)` once the client has ended its input without sending
/// anything more; reads what it sends meanwhile into its input, up to
/// [`READ_AHEAD`]. A client that ends its input after more requests
/// (pipelined, then half-closed) has them answered first (`ended`).
fn watch_client<T: AsyncRead + Unpin>(
    io: &mut T,
    client: &mut ClientInput,
    cx: &mut Context<'_>,
) -> Poll<io::Result<()>> {
    while !client.ended && client.input.len() < READ_AHEAD {
        match read_more(io, &mut client.input, cx) {
            Poll::Ready(Ok(0)) if client.input.is_empty() => return Poll::Ready(Ok(())),
            Poll::Ready(Ok(0)) => client.ended = true,
            Poll::Ready(Ok(_)) => client.head.arrived(&client.input),
            Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
            Poll::Pending => break,
        }
    }
    Poll::Pending
}

/// What the client's head asked of the answer.
#[derive(Debug, Clone, Copy)]
struct Asked {
    /// `HEAD`: the answer has no body.
    head: bool,
    /// No `Connection: close`.
    keep_alive: bool,
}

// Returned once per request and taken apart at once: a box would be an
// allocation per request.
#[allow(clippy::large_enum_variant)]
enum Parsed {
    Request(Request<StreamedBody>, Asked),
    /// Not a whole head yet.
    Partial,
    /// A whole head whose body [`parse`] would take, not all read yet:
    /// the message is this long (the body is waited for, within the
    /// header read timeout).
    BodyToCome(usize),
    /// A request for hyper (see the module docs).
    Other,
}

/// Room for the fields the proxy adds to a request (forwarding, tracing,
/// identity) without growing its header map.
const ADDED_FIELDS: usize = 8;

/// Takes the next request's head off `input` if it is one [`serve`]
/// answers itself; leaves `input` alone otherwise.
/// `fields` is room for the field positions, reused from one request to
/// the next.
fn parse(
    input: &mut BytesMut,
    fields: &mut Vec<(HeaderName, usize, usize)>,
    max_head: usize,
) -> Parsed {
    if input.is_empty() {
        return Parsed::Partial;
    }
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut head = httparse::Request::new(&mut []);
    let len = match httparse::ParserConfig::default()
        .parse_request_with_uninit_headers(&mut head, input, &mut slots)
    {
        // Over the limit: the guard refuses it (431 or 414).
        Ok(httparse::Status::Complete(len)) if len > max_head => return Parsed::Other,
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if input.len() > max_head => return Parsed::Other,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::Other,
    };
    if head.version != Some(1) {
        return Parsed::Other;
    }
    let Some(method) = head
        .method
        .and_then(|m| Method::from_bytes(m.as_bytes()).ok())
    else {
        return Parsed::Other;
    };
    if method == Method::CONNECT {
        return Parsed::Other;
    }
    let Some(path) = head.path else {
        return Parsed::Other;
    };
    let base = input.as_ptr() as usize;
    let path_at = path.as_ptr() as usize - base;
    let path_range = path_at..path_at + path.len();
    let mut keep_alive = true;
    let mut hosts = 0;
    let mut length = None;
    // Names now; values as slices of the head once it is split off.
    fields.clear();
    for field in head.headers.iter() {
        let Ok(name) = HeaderName::from_bytes(field.name.as_bytes()) else {
            return Parsed::Other;
        };
        match name {
            // One `Content-Length` at most (hyper merges equal repeats;
            // the guard takes them), of 1*DIGIT (RFC 9110 §8.6).
            header::CONTENT_LENGTH if length.is_some() => return Parsed::Other,
            header::CONTENT_LENGTH => match body_length(field.value) {
                Some(declared) => length = Some(declared),
                None => return Parsed::Other,
            },
            header::TRANSFER_ENCODING | header::EXPECT | header::UPGRADE | header::TE => {
                return Parsed::Other
            }
            header::CONNECTION if has_token(field.value, b"close") => keep_alive = false,
            // RFC 9112 §3.2: one valid Host at most; the guard refuses
            // others (400).
            header::HOST if hosts > 0 || !valid_host(field.value) => return Parsed::Other,
            header::HOST => hosts += 1,
            _ => {}
        }
        let at = field.value.as_ptr() as usize - base;
        fields.push((name, at, at + field.value.len()));
    }
    // A body (at most what is read ahead anyway) is taken once it is all
    // there; until then the caller reads or waits for the rest.
    let length = length.unwrap_or(0);
    if input.len() - len < length {
        return Parsed::BodyToCome(len + length);
    }
    let message = input.split_to(len + length).freeze();
    let Ok(uri) = Uri::from_maybe_shared(message.slice(path_range)) else {
        return put_back(message, input);
    };
    let mut headers = HeaderMap::with_capacity(fields.len() + ADDED_FIELDS);
    for (name, start, end) in fields.drain(..) {
        let Ok(value) = HeaderValue::from_maybe_shared(message.slice(start..end)) else {
            return put_back(message, input);
        };
        headers.append(name, value);
    }
    let body = match length {
        0 => StreamedBody::None,
        _ => StreamedBody::Whole(message.slice(len..)),
    };
    let asked = Asked {
        head: method == Method::HEAD,
        keep_alive,
    };
    let mut request = Request::new(body);
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = Version::HTTP_11;
    *request.headers_mut() = headers;
    Parsed::Request(request, asked)
}

/// How many bytes of `stream` [`parse`] takes as the next request, if it
/// takes one (for the framing guard's property test).
#[cfg(test)]
pub(crate) fn takes(stream: &[u8], max_head: usize) -> Option<usize> {
    let mut input = BytesMut::from(stream);
    match parse(&mut input, &mut Vec::new(), max_head) {
        Parsed::Request(..) => Some(stream.len() - input.len()),
        Parsed::Partial | Parsed::BodyToCome(_) | Parsed::Other => None,
    }
}

/// The value of a `Content-Length` field [`parse`] takes: 1*DIGIT (as the
/// framing guard wants it) of at most [`MAX_WHOLE_BODY`]. Anything else,
/// valid or not, is for the guard and hyper.
fn body_length(value: &[u8]) -> Option<usize> {
    // Enough digits for the limit, with room for a few leading zeros.
    if value.is_empty() || value.len() > 12 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let length = value
        .iter()
        .fold(0u64, |n, digit| n * 10 + u64::from(digit - b'0'));
    usize::try_from(length)
        .ok()
        .filter(|&length| length <= MAX_WHOLE_BODY)
}

/// A message found unfit only once split off `input`: put back in front
/// of it, for hyper.
fn put_back(message: Bytes, input: &mut BytesMut) -> Parsed {
    let mut whole = BytesMut::with_capacity(message.len() + input.len());
    whole.extend_from_slice(&message);
    whole.extend_from_slice(input);
    *input = whole;
    Parsed::Other
}

/// Whether the comma-separated `value` has `token` (ASCII case-insensitive).
fn has_token(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|&b| b == b',')
        .any(|item| item.trim_ascii().eq_ignore_ascii_case(token))
}

/// How the body goes out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoder {
    /// Exactly this many bytes still to send.
    Length(u64),
    Chunked,
    /// Until the connection closes.
    UntilClose,
}

/// Writes the status line and the fields of a response into `out` and
/// says how its body goes out and whether the connection stays open after
/// it, the way hyper's server does (see the module docs).
fn encode_head(
    out: &mut Vec<u8>,
    mut parts: http::response::Parts,
    body: &ProxyBody,
    asked: &Asked,
    keep_alive: bool,
) -> (Encoder, bool) {
    let mut keep_alive = keep_alive;
    let informational = parts.status.is_informational();
    if informational {
        // Not a final answer; hyper sends a 500 instead.
        parts.status = StatusCode::INTERNAL_SERVER_ERROR;
        parts.headers.clear();
        keep_alive = false;
    }
    let status = parts.status;
    let http10 = parts.version == Version::HTTP_10;
    let can_body =
        !(asked.head || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED);
    let can_length = !(status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED);
    let can_chunk = can_body && !http10;
    // hyper's view of the body: none, a known length, or unknown.
    let length = if body.is_end_stream() {
        Some(0)
    } else {
        body.size_hint().exact()
    };

    let reason = parts.extensions.get::<hyper::ext::ReasonPhrase>();
    if !http10 && status == StatusCode::OK && reason.is_none() {
        out.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
    } else {
        out.extend_from_slice(if http10 { b"HTTP/1.0 " } else { b"HTTP/1.1 " });
        out.extend_from_slice(status.as_str().as_bytes());
        out.push(b' ');
        match reason {
            Some(reason) => out.extend_from_slice(reason.as_bytes()),
            None => out.extend_from_slice(status.canonical_reason().unwrap_or("<none>").as_bytes()),
        }
        out.extend_from_slice(b"\r\n");
    }

    let mut encoder = None;
    let mut wrote_date = false;
    let mut has_connection = false;
    // The fields hyper joins into one line: the line left open, to be
    // continued by the next value of the same name.
    let mut open = Open::None;
    let mut previous: Option<&HeaderName> = None;
    for (name, value) in parts.headers.iter() {
        let same = previous == Some(name);
        previous = Some(name);
        if !same {
            open.end(out);
        }
        let value = value.as_bytes();
        match *name {
            header::CONTENT_LENGTH => {
                // Kept for HEAD and 304 (the length the representation
                // has), as hyper does; a 204 has none (RFC 9110 §8.6).
                if same || encoder.is_some() || status == StatusCode::NO_CONTENT {
                    continue;
                }
                let declared = std::str::from_utf8(value)
                    .ok()
                    .and_then(|text| text.trim().parse::<u64>().ok());
                match (length, declared) {
                    // An empty body: the implicit `content-length: 0` below
                    // (kept as sent for HEAD).
                    (Some(0), _) if !asked.head => continue,
                    (Some(known), _) => encoder = Some(Encoder::Length(known)),
                    (None, Some(declared)) => encoder = Some(Encoder::Length(declared)),
                    // Not a length: framed by the body instead.
                    (None, None) => continue,
                }
                field(out, b"content-length", value);
            }
            header::TRANSFER_ENCODING => {
                if !can_chunk || (!same && encoder.is_some()) {
                    continue;
                }
                open.continue_or_start(out, b"transfer-encoding", value, same);
                open = Open::Chunked {
                    last_chunked: is_chunked(value),
                };
                encoder = Some(Encoder::Chunked);
            }
            header::CONNECTION => {
                has_connection = true;
                if has_token(value, b"close") {
                    keep_alive = false;
                }
                open.continue_or_start(out, b"connection", value, same);
                open = Open::Line;
            }
            header::TRAILER => {
                if can_chunk {
                    open.continue_or_start(out, b"trailer", value, same);
                    open = Open::Line;
                }
            }
            _ => {
                if *name == header::DATE {
                    wrote_date = true;
                }
                field(out, name.as_str().as_bytes(), value);
            }
        }
    }
    open.end(out);
    // An upstream's plain head: its fields as the lines to write (the
    // map holds only what the sidecar added; see `response_fields`).
    if let Some(lines) = body.response_fields() {
        if !informational {
            out.extend_from_slice(lines.lines());
            wrote_date |= lines.has_date();
        }
    }

    let mut encoder = match encoder {
        Some(encoder) => encoder,
        None => match length {
            None if can_chunk => {
                out.extend_from_slice(b"transfer-encoding: chunked\r\n");
                Encoder::Chunked
            }
            None => Encoder::UntilClose,
            Some(0) => {
                if can_length && !asked.head {
                    out.extend_from_slice(b"content-length: 0\r\n");
                }
                Encoder::Length(0)
            }
            Some(known) => {
                if can_length {
                    out.extend_from_slice(b"content-length: ");
                    out.extend_from_slice(itoa::Buffer::new().format(known).as_bytes());
                    out.extend_from_slice(b"\r\n");
                }
                Encoder::Length(known)
            }
        },
    };
    if !can_body {
        encoder = Encoder::Length(0);
    }
    if encoder == Encoder::UntilClose {
        keep_alive = false;
    }
    if !keep_alive && !has_connection && !http10 {
        out.extend_from_slice(b"connection: close\r\n");
    }
    if !wrote_date {
        out.extend_from_slice(b"date: ");
        date::extend(out);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    (encoder, keep_alive)
}

/// `name: value\r\n`.
fn field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// A field line [`encode_head`] has begun and not ended: the values of
/// one name it joins with `, ` (as hyper does for the fields it reads).
#[derive(Debug, Clone, Copy)]
enum Open {
    None,
    Line,
    /// `transfer-encoding`: ends with `, chunked` unless its last value
    /// already does.
    Chunked {
        last_chunked: bool,
    },
}

impl Open {
    /// `value` joined to the open line (`same`: of the same name), or a
    /// new line for it.
    fn continue_or_start(self, out: &mut Vec<u8>, name: &[u8], value: &[u8], same: bool) {
        if same && !matches!(self, Open::None) {
            out.extend_from_slice(b", ");
        } else {
            out.extend_from_slice(name);
            out.extend_from_slice(b": ");
        }
        out.extend_from_slice(value);
    }

    fn end(&mut self, out: &mut Vec<u8>) {
        match *self {
            Open::None => return,
            Open::Line | Open::Chunked { last_chunked: true } => {}
            Open::Chunked {
                last_chunked: false,
            } => out.extend_from_slice(b", chunked"),
        }
        out.extend_from_slice(b"\r\n");
        *self = Open::None;
    }
}

/// Whether a `Transfer-Encoding` value ends with `chunked`.
fn is_chunked(value: &[u8]) -> bool {
    value
        .rsplit(|&b| b == b',')
        .next()
        .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"))
}

/// Sends `out` (the head) and then the body as `encoder` frames it,
/// coalescing what is ready into one write. `Ok(false)`: the body could not
/// be sent whole (it failed, or did not match its length); the connection
/// must close. The client's pipelined bytes keep going into its input while
/// the body waits on the upstream, and its end of input (with no other
/// request sent) stops the body.
async fn write_body<T>(
    io: &mut T,
    out: &mut Vec<u8>,
    body: ProxyBody,
    encoder: Encoder,
    client: &mut ClientInput,
) -> io::Result<bool>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let mut encoder = encoder;
    if encoder == Encoder::Length(0) {
        drop(body);
        let sent = write_all(io, out, &[]).await;
        out.clear();
        sent?;
        io.flush().await?;
        return Ok(true);
    }
    let mut body = pin!(body);
    let complete = loop {
        let frame = match poll_fn(|cx| Poll::Ready(body.as_mut().poll_frame(cx))).await {
            Poll::Ready(frame) => frame,
            Poll::Pending => {
                // Nothing more yet: what is ready goes out, then wait.
                let sent = write_all(io, out, &[]).await;
                out.clear();
                sent?;
                io.flush().await?;
                let waited = poll_fn(|cx| {
                    if let Poll::Ready(frame) = body.as_mut().poll_frame(cx) {
                        return Poll::Ready(Ok(frame));
                    }
                    match watch_client(io, client, cx) {
                        Poll::Ready(Ok(())) => Poll::Ready(Err(None)),
                        Poll::Ready(Err(error)) => Poll::Ready(Err(Some(error))),
                        Poll::Pending => Poll::Pending,
                    }
                })
                .await;
                match waited {
                    Ok(frame) => frame,
                    Err(None) => return Ok(false), // the client is gone
                    Err(Some(error)) => return Err(error),
                }
            }
        };
        let data = match frame {
            None => break true,
            Some(Err(error)) => {
                tracing::debug!(%error, "response body failed; closing the connection");
                break false;
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => data,
                // Trailers: not asked for (a `TE: trailers` request goes
                // to hyper), so not sent.
                Err(_) => continue,
            },
        };
        if data.is_empty() {
            continue;
        }
        match &mut encoder {
            Encoder::Length(left) => {
                if data.len() as u64 > *left {
                    tracing::debug!("response body longer than its content-length; closing");
                    break false;
                }
                *left -= data.len() as u64;
                send(io, out, &data).await?;
            }
            Encoder::Chunked => {
                write!(out, "{:X}\r\n", data.len())?;
                send(io, out, &data).await?;
                out.extend_from_slice(b"\r\n");
            }
            Encoder::UntilClose => send(io, out, &data).await?,
        }
    };
    let complete = complete
        && match encoder {
            Encoder::Length(left) => left == 0,
            Encoder::Chunked => {
                out.extend_from_slice(b"0\r\n\r\n");
                true
            }
            Encoder::UntilClose => false,
        };
    let sent = write_all(io, out, &[]).await;
    out.clear();
    sent?;
    io.flush().await?;
    Ok(complete)
}

/// Puts `data` after what `out` holds: copied if small, else written
/// together with it (one vectored write) and `out` emptied.
async fn send<T: AsyncWrite + Unpin>(
    io: &mut T,
    out: &mut Vec<u8>,
    data: &Bytes,
) -> io::Result<()> {
    if data.len() < COPY_LIMIT {
        out.extend_from_slice(data);
        return Ok(());
    }
    let sent = write_all(io, out, data).await;
    out.clear();
    sent
}

/// Writes `first` then `second` whole, vectored.
async fn write_all<T: AsyncWrite + Unpin>(
    io: &mut T,
    first: &[u8],
    second: &[u8],
) -> io::Result<()> {
    let (mut first, mut second) = (first, second);
    while !first.is_empty() || !second.is_empty() {
        let n = poll_fn(|cx| {
            if first.is_empty() {
                Pin::new(&mut *io).poll_write(cx, second)
            } else if second.is_empty() {
                Pin::new(&mut *io).poll_write(cx, first)
            } else {
                Pin::new(&mut *io)
                    .poll_write_vectored(cx, &[IoSlice::new(first), IoSlice::new(second)])
            }
        })
        .await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        if n >= first.len() {
            second = &second[n - first.len()..];
            first = &[];
        } else {
            first = &first[n..];
        }
    }
    Ok(())
}

/// The `date` field's value, formatted once a second.
mod date {
    use std::cell::RefCell;

    use super::SystemTime;

    thread_local! {
        static CACHED: RefCell<(u64, Vec<u8>)> = const { RefCell::new((0, Vec::new())) };
    }

    /// Appends the current date (RFC 9110 IMF-fixdate) to `out`.
    pub(super) fn extend(out: &mut Vec<u8>) {
        let now = SystemTime::now();
        let second = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |since| since.as_secs());
        CACHED.with(|cached| {
            let mut cached = cached.borrow_mut();
            if cached.0 != second || cached.1.is_empty() {
                cached.0 = second;
                cached.1.clear();
                cached
                    .1
                    .extend_from_slice(httpdate::fmt_http_date(now).as_bytes());
            }
            out.extend_from_slice(&cached.1);
        });
    }
}

pin_project_lite::pin_project! {
    /// A connection with bytes already read from it put back in front.
    pub struct Rewind<T> {
        prefix: Bytes,
        #[pin]
        inner: T,
    }
}

impl<T> Rewind<T> {
    fn new(prefix: Bytes, inner: T) -> Self {
        Rewind { prefix, inner }
    }
}

impl<T: AsyncRead> AsyncRead for Rewind<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix.split_to(n));
            return Poll::Ready(Ok(()));
        }
        this.inner.poll_read(cx, buf)
    }
}

impl<T: AsyncWrite> AsyncWrite for Rewind<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use tokio::io::{AsyncReadExt, DuplexStream};

    use super::*;

    /// Runs [`serve`] on one end of an in-memory connection with `respond`;
    /// the other end, the stop sender and the server's task are returned.
    fn serving<R, F>(
        respond: R,
    ) -> (
        DuplexStream,
        watch::Sender<bool>,
        tokio::task::JoinHandle<io::Result<Served<DuplexStream>>>,
    )
    where
        R: Fn(Request<StreamedBody>) -> F + Send + Sync + 'static,
        F: Future<Output = Response<ProxyBody>> + Send + 'static,
    {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let (stop, stopped) = watch::channel(false);
        let limits = Http1Limits {
            max_head: 8 * 1024,
            idle_timeout: Duration::from_secs(60),
            head_timeout: Duration::from_secs(2),
            polls_for_next_request: true,
        };
        let task = tokio::spawn(async move {
            // Each answer counts as in flight until its body is sent, as the
            // listener's do.
            let in_flight = Arc::new(InFlightRequests::default());
            let counted = |request| {
                let answered = in_flight.start();
                let answering = respond(request);
                async move {
                    answering
                        .await
                        .map(|body| body.with_request_guard(answered))
                }
            };
            serve(server, counted, stopped, limits, &in_flight).await
        });
        (client, stop, task)
    }

    /// Answers with the request's method and path.
    async fn echo(request: Request<StreamedBody>) -> Response<ProxyBody> {
        dated(format!("{} {}", request.method(), request.uri()).into_bytes())
    }

    /// A 200 with `text` and a fixed `date`.
    fn dated(text: Vec<u8>) -> Response<ProxyBody> {
        let mut response = Response::new(ProxyBody::full(text));
        response.headers_mut().insert(
            header::DATE,
            HeaderValue::from_static("Thu, 03 Dec 2026 10:00:00 GMT"),
        );
        response
    }

    /// Ends the client's side and checks that [`serve`] answered every
    /// request itself: it ends `Closed`, never handing over.
    async fn closes_without_handing_over(
        client: DuplexStream,
        task: tokio::task::JoinHandle<io::Result<Served<DuplexStream>>>,
    ) {
        drop(client);
        assert!(
            matches!(task.await.unwrap(), Ok(Served::Closed)),
            "handed over to hyper"
        );
    }

    /// Reads from `client` until `want` responses' ends (`\r\n\r\n` plus
    /// a body of the content-length) have arrived; returns all of it.
    async fn read_until(client: &mut DuplexStream, needle: &str) -> String {
        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        tokio::time::timeout(Duration::from_secs(5), async {
            while !String::from_utf8_lossy(&got).contains(needle) {
                let n = client.read(&mut chunk).await.unwrap();
                assert!(
                    n > 0,
                    "closed before {needle:?}; got {:?}",
                    String::from_utf8_lossy(&got)
                );
                got.extend_from_slice(&chunk[..n]);
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no {needle:?}; got {:?}", String::from_utf8_lossy(&got)));
        String::from_utf8(got).unwrap()
    }

    /// Everything the server sends until it closes the connection, once
    /// [`serve`] has ended with it closed.
    async fn answers_until_closed(
        client: &mut DuplexStream,
        task: tokio::task::JoinHandle<io::Result<Served<DuplexStream>>>,
    ) -> String {
        let mut got = String::new();
        client.read_to_string(&mut got).await.unwrap();
        assert!(matches!(task.await.unwrap(), Ok(Served::Closed)), "{got}");
        got
    }

    #[tokio::test]
    async fn pipelined_requests_are_answered_in_order_on_one_connection() {
        let (mut client, _stop, _task) = serving(echo);
        client
            .write_all(b"GET /one HTTP/1.1\r\nHost: a\r\n\r\nHEAD /two HTTP/1.1\r\nHost: a\r\n\r\nDELETE /three HTTP/1.1\r\nHost: a\r\ncontent-length: 0\r\n\r\n")
            .await
            .unwrap();
        let got = read_until(&mut client, "DELETE /three").await;
        let date = "date: Thu, 03 Dec 2026 10:00:00 GMT\r\n";
        assert_eq!(
            got,
            format!(
                "HTTP/1.1 200 OK\r\n{date}content-length: 8\r\n\r\nGET /one\
                 HTTP/1.1 200 OK\r\n{date}content-length: 9\r\n\r\n\
                 HTTP/1.1 200 OK\r\n{date}content-length: 13\r\n\r\nDELETE /three"
            ),
            "HEAD gets the length and no body"
        );
    }

    #[tokio::test]
    async fn connection_close_is_answered_with_close_and_the_connection_ends() {
        let (mut client, _stop, task) = serving(echo);
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let got = answers_until_closed(&mut client, task).await;
        assert!(got.contains("\r\nconnection: close\r\n"), "{got}");
        assert!(got.ends_with("\r\n\r\nGET /"), "{got}");
    }

    /// Answers with the request's method, path and body.
    async fn echo_body(request: Request<StreamedBody>) -> Response<ProxyBody> {
        use http_body_util::BodyExt;
        let line = format!("{} {} ", request.method(), request.uri());
        let body = request.into_body().collect().await.unwrap().to_bytes();
        let mut text = line.into_bytes();
        text.extend_from_slice(&body);
        dated(text)
    }

    #[tokio::test]
    async fn sized_bodies_read_whole_with_their_heads_are_answered_here_in_order() {
        let (mut client, _stop, task) = serving(echo_body);
        client
            .write_all(
                b"POST /one HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello\
                  GET /two HTTP/1.1\r\nHost: a\r\n\r\n\
                  PUT /three HTTP/1.1\r\nHost: a\r\ncontent-length: 0011\r\n\r\nGET /x HTTP\
                  POST /four HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n",
            )
            .await
            .unwrap();
        let got = read_until(&mut client, "POST /four ").await;
        let date = "date: Thu, 03 Dec 2026 10:00:00 GMT\r\n";
        assert_eq!(
            got,
            format!(
                "HTTP/1.1 200 OK\r\n{date}content-length: 15\r\n\r\nPOST /one hello\
                 HTTP/1.1 200 OK\r\n{date}content-length: 9\r\n\r\nGET /two \
                 HTTP/1.1 200 OK\r\n{date}content-length: 22\r\n\r\nPUT /three GET /x HTTP\
                 HTTP/1.1 200 OK\r\n{date}content-length: 11\r\n\r\nPOST /four "
            ),
            "each body is its own, and the bytes after it are the next request"
        );
        closes_without_handing_over(client, task).await;
    }

    #[tokio::test]
    async fn a_body_longer_than_a_read_is_taken_when_the_socket_has_it_all() {
        let (mut client, _stop, task) = serving(echo_body);
        let body = "b".repeat(40 * 1024) + "end";
        let request = format!(
            "PUT /big HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        client.write_all(request.as_bytes()).await.unwrap();
        let got = read_until(&mut client, "bend").await;
        assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{}", &got[..100]);
        assert!(
            got.ends_with(&format!("\r\n\r\nPUT /big {body}")),
            "the body whole"
        );
        closes_without_handing_over(client, task).await;
    }

    #[tokio::test]
    async fn a_body_that_comes_after_its_head_within_the_head_timeout_is_taken_here() {
        let (mut client, _stop, task) = serving(echo_body);
        client
            .write_all(b"POST /late HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nfirst")
            .await
            .unwrap();
        // Until the rest comes, nothing is answered and nothing handed over.
        let mut early = [0u8; 1];
        let waited =
            tokio::time::timeout(Duration::from_millis(200), client.read(&mut early)).await;
        assert!(
            waited.is_err(),
            "answered or closed before the body was whole"
        );
        assert!(!task.is_finished(), "handed over before the head timeout");
        client.write_all(b"-rest").await.unwrap();
        let got = read_until(&mut client, "first-rest").await;
        assert!(got.ends_with("\r\n\r\nPOST /late first-rest"), "{got}");
        closes_without_handing_over(client, task).await;
    }

    /// (After the head timeout, 2 s here, from when the head came.)
    #[tokio::test]
    async fn a_body_not_all_there_goes_to_hyper_with_every_byte_not_yet_answered() {
        let (mut client, _stop, task) = serving(echo);
        let rest = b"POST /b HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhel";
        let mut sent = b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n".to_vec();
        sent.extend_from_slice(rest);
        client.write_all(&sent).await.unwrap();
        read_until(&mut client, "GET /a").await;
        let Ok(Served::Handover(mut rewind, _)) = task.await.unwrap() else {
            panic!("not handed over");
        };
        let mut handed = vec![0u8; rest.len()];
        rewind.read_exact(&mut handed).await.unwrap();
        assert_eq!(handed, rest);
    }

    #[tokio::test]
    async fn requests_the_fast_path_does_not_take_are_handed_over_untouched() {
        for head in [
            "GET / HTTP/1.0\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nTE: trailers\r\n\r\n",
            "CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nX-Bad: \x01\r\n\r\n",
            // What the framing guard refuses: two Hosts, a bad one, a
            // head over the limit; and what it times: a head not whole.
            "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a@b\r\n\r\n",
            &format!(
                "GET / HTTP/1.1\r\nHost: a\r\nX-Long: {}\r\n\r\n",
                "x".repeat(8192)
            ),
            "GET / HTTP/1.1\r\nHost: a\r\n",
            // A body not all there yet, or larger than is read ahead.
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhell",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 65537\r\n\r\nhello",
            // Lengths the guard refuses or reads: not 1*DIGIT, too many
            // digits, two (hyper forwards one of two equal lengths).
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\nhello",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0000000000005\r\n\r\nhello",
            "GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\nhello",
        ] {
            let (mut client, _stop, task) = serving(echo);
            client.write_all(head.as_bytes()).await.unwrap();
            let Ok(Served::Handover(mut rewind, _)) = task.await.unwrap() else {
                panic!("{head:?} not handed over");
            };
            let mut handed = vec![0u8; head.len()];
            rewind.read_exact(&mut handed).await.unwrap();
            assert_eq!(handed, head.as_bytes(), "{head:?}");
        }
    }

    #[tokio::test]
    async fn a_client_that_leaves_cancels_its_request() {
        let dropped = Arc::new(AtomicUsize::new(0));
        struct CountDrop(Arc<AtomicUsize>);
        impl Drop for CountDrop {
            fn drop(&mut self) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let seen = Arc::clone(&dropped);
        let (mut client, _stop, task) = serving(move |_| {
            let guard = CountDrop(Arc::clone(&seen));
            async move {
                let _guard = guard;
                std::future::pending::<Response<ProxyBody>>().await
            }
        });
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        client.shutdown().await.unwrap();
        let served = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap();
        assert!(matches!(served.unwrap(), Ok(Served::Closed)));
        assert_eq!(
            dropped.load(Ordering::SeqCst),
            1,
            "the handler's future was dropped"
        );
    }

    #[tokio::test]
    async fn a_stop_closes_an_idle_connection_and_ends_a_busy_one_after_its_answer() {
        let (_client, stop, task) = serving(echo);
        stop.send(true).unwrap();
        let served = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap();
        assert!(matches!(served.unwrap(), Ok(Served::Closed)));

        let (answer, answered) = tokio::sync::oneshot::channel::<()>();
        let answered = Arc::new(tokio::sync::Mutex::new(Some(answered)));
        let (started, mut handling) = tokio::sync::mpsc::unbounded_channel::<()>();
        let (mut client, stop, task) = serving(move |request| {
            let (answered, started) = (Arc::clone(&answered), started.clone());
            async move {
                let _ = started.send(());
                let wait = answered.lock().await.take().unwrap();
                let _ = wait.await;
                echo(request).await
            }
        });
        client
            .write_all(b"GET /busy HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        handling.recv().await.unwrap(); // the request is being answered
        stop.send(true).unwrap();
        answer.send(()).unwrap();
        let got = answers_until_closed(&mut client, task).await;
        assert!(got.contains("\r\nconnection: close\r\n"), "{got}");
        assert!(got.ends_with("GET /busy"), "{got}");
    }

    /// Found by an attack: a client that pipelines requests and then
    /// ends its input (`nc -N`, batch scripts) got none of them answered.
    #[tokio::test]
    async fn requests_sent_before_the_client_ends_its_input_are_all_answered() {
        let (mut client, _stop, task) = serving(echo);
        client
            .write_all(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\nGET /3 HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        client.shutdown().await.unwrap();
        let got = answers_until_closed(&mut client, task).await;
        assert_eq!(got.matches("HTTP/1.1 200 OK").count(), 3, "{got}");
        assert!(got.ends_with("GET /3"), "{got}");
    }

    /// Found by an attack: a head read while another request was answered
    /// was not timed (slowloris through a slow upstream).
    #[tokio::test(start_paused = true)]
    async fn a_head_that_arrives_slowly_during_a_slow_answer_is_timed_out() {
        let slow = |request: Request<StreamedBody>| async move {
            if request.uri().path() == "/slow" {
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
            echo(request).await
        };
        // Whole after 3 s of its first byte, during the 5 s answer: the
        // limit is 2 s, so the connection ends after the first answer.
        let (mut client, _stop, task) = serving(slow);
        client
            .write_all(b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\nGET /next HTTP/1.1\r\n")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(3)).await;
        client.write_all(b"Host: a\r\n\r\n").await.unwrap();
        let got = answers_until_closed(&mut client, task).await;
        assert!(got.ends_with("GET /slow"), "{got}");

        // Whole within 1 s of its first byte: answered after the first.
        let (mut client, _stop, _task) = serving(slow);
        client
            .write_all(b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\nGET /next HTTP/1.1\r\n")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        client.write_all(b"Host: a\r\n\r\n").await.unwrap();
        read_until(&mut client, "GET /next").await;

        // Never whole: handed over with the time of its first byte.
        let (mut client, _stop, task) = serving(slow);
        let begun = tokio::time::Instant::now();
        client
            .write_all(b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\nGET /next HTTP/1.1\r\n")
            .await
            .unwrap();
        let Ok(Served::Handover(_, Some(started))) = task.await.unwrap() else {
            panic!("not handed over with its start");
        };
        assert_eq!(started, begun);
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_idle_for_the_limit_is_closed() {
        let (mut client, _stop, task) = serving(echo);
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        read_until(&mut client, "GET /").await;
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert!(!task.is_finished(), "closed before the idle limit");
        client
            .write_all(b"GET /again HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        read_until(&mut client, "GET /again").await;
        tokio::time::sleep(Duration::from_secs(59)).await;
        assert!(
            !task.is_finished(),
            "the second request did not count as activity"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        let served = tokio::time::timeout(Duration::from_secs(1), task)
            .await
            .unwrap();
        assert!(matches!(served.unwrap(), Ok(Served::Closed)));
    }

    /// The head [`encode_head`] writes for `response` to a GET (or HEAD).
    fn head_of(response: Response<ProxyBody>, head: bool) -> (String, Encoder, bool) {
        let mut out = Vec::new();
        let (parts, body) = response.into_parts();
        let asked = Asked {
            head,
            keep_alive: true,
        };
        let (encoder, keep_alive) = encode_head(&mut out, parts, &body, &asked, true);
        (String::from_utf8(out).unwrap(), encoder, keep_alive)
    }

    #[test]
    fn heads_are_framed_the_way_hyper_frames_them() {
        let dated = |mut response: Response<ProxyBody>| {
            response
                .headers_mut()
                .insert(header::DATE, HeaderValue::from_static("x"));
            response
        };
        // An empty 204: no length at all.
        let mut no_content = Response::new(ProxyBody::empty());
        *no_content.status_mut() = StatusCode::NO_CONTENT;
        let (head, encoder, _) = head_of(dated(no_content), false);
        assert_eq!(head, "HTTP/1.1 204 No Content\r\ndate: x\r\n\r\n");
        assert_eq!(encoder, Encoder::Length(0));

        // A declared transfer-encoding is completed with chunked, values
        // of one name are joined, and close is honoured.
        let response = Response::builder()
            .header(header::TRANSFER_ENCODING, "gzip")
            .header(header::CONNECTION, "x-hop")
            .header(header::CONNECTION, "close")
            .header("x-multi", "1")
            .header("x-multi", "2")
            .body(ProxyBody::full("abc"))
            .unwrap();
        let (head, encoder, keep_alive) = head_of(dated(response), false);
        assert_eq!(
            head,
            "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\nconnection: x-hop, close\r\n\
             x-multi: 1\r\nx-multi: 2\r\ndate: x\r\n\r\n"
        );
        assert_eq!((encoder, keep_alive), (Encoder::Chunked, false));

        // A custom reason phrase, and a date added when there is none.
        let mut teapot = Response::new(ProxyBody::full("t"));
        *teapot.status_mut() = StatusCode::IM_A_TEAPOT;
        teapot
            .extensions_mut()
            .insert(hyper::ext::ReasonPhrase::from_static(b"Short And Stout"));
        let (head, encoder, _) = head_of(teapot, false);
        assert!(
            head.starts_with("HTTP/1.1 418 Short And Stout\r\ncontent-length: 1\r\ndate: "),
            "{head}"
        );
        assert!(head.ends_with(" GMT\r\n\r\n"), "{head}");
        assert_eq!(encoder, Encoder::Length(1));

        // HEAD keeps the declared length and sends no body.
        let response = Response::builder()
            .header(header::CONTENT_LENGTH, "42")
            .body(ProxyBody::empty())
            .unwrap();
        let (head, encoder, _) = head_of(dated(response), true);
        assert_eq!(
            head,
            "HTTP/1.1 200 OK\r\ncontent-length: 42\r\ndate: x\r\n\r\n"
        );
        assert_eq!(encoder, Encoder::Length(0));
    }
}
