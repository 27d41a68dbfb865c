//! Request-smuggling guard for HTTP/1.1 server connections.
//!
//! hyper, like RFC 9112 §6.3 allows, accepts a request carrying both
//! `Content-Length` and `Transfer-Encoding`: it drops the length, decodes the
//! chunked body and closes the connection afterwards. That is safe, but such a
//! request is almost always an attack or a broken client, and Envoy and nginx
//! refuse it; so do we. hyper gives no hook before it resolves the conflict,
//! so [`FramingGuard`] sits between the socket and hyper and inspects every
//! request head *before* hyper sees a byte of it.
//!
//! How bytes flow: reads fill a small per-connection buffer; the
//! [`Scanner`] walks it and marks bytes *cleared* — a complete request head that passed the
//! check, or body bytes whose extent the head announced (`Content-Length`,
//! chunked framing). Only cleared bytes are handed to hyper. While a body of
//! known remaining length is being read, reads go straight into hyper's
//! buffer (no copy). A head with both headers is never handed over: hyper
//! sees a clean end of input (once every earlier request on the connection
//! has been answered), finishes what it was doing and shuts the
//! connection down, and the guard writes a `400` with
//! `x-meshlet-reason: bad_request` just before the shutdown. A head longer
//! than the limit is refused the same way with `431` and
//! `x-meshlet-reason: header_too_large` (`414`, `uri_too_long`, when the
//! request line alone is over it): the guard is the one component
//! that sees a head before it is complete, so it enforces the size too.
//!
//! Because it sees a head arrive, the guard also times it: a head must be
//! complete within the header read timeout of its first byte (slowloris).
//! It also ends a connection that has waited for its next request for the
//! client idle timeout with none in flight ([`InFlightRequests`]: a
//! response body still streaming counts), by ending hyper's input. That
//! timer is lazy (armed once per connection, checked when it fires), so a
//! request costs no timer registration.
//!
//! The guard also refuses, with `400` and `x-meshlet-reason: bad_request`,
//! heads whose framing hyper would read differently from a strict
//! RFC 9112 reader: a `Content-Length` that is not `1*DIGIT` (§6.3; Rust's
//! integer parser would take `+5`), `chunked` anywhere but once at the end
//! of `Transfer-Encoding` (§6.1, §6.3), and a request with more than one
//! `Host` or an invalid one (§3.2: "MUST respond with a 400").
//!
//! The guard only needs to find where messages start; it leaves every other
//! judgement to hyper. An upgraded or `CONNECT` connection switches it to
//! *opaque*: from then on bytes pass through untouched. Its chunked decoder
//! follows exactly the grammar hyper's accepts (CRLF only, optional
//! whitespace and extensions after the size, leading zeros, trailers ended
//! by an empty CRLF line): where hyper would fail the body, the guard
//! *cuts* the input there (hyper sees the end of input mid-body and fails
//! the request), so no byte after framing the two could read differently
//! ever reaches hyper. Its property tests in this file are the framing
//! fuzz target (proptest, stable Rust; see `testing::proptest_config`).

use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll, Waker};
use std::time::Duration;

use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::clock;

/// Initial size of the per-connection buffer used while looking for a head
/// (most heads are far smaller; it grows for larger ones, up to the limit).
const READ_CHUNK: usize = 4 * 1024;

/// Requests of one client connection that have not been fully answered.
/// The guard must not end hyper's input while one is in flight (hyper would
/// abandon it), so on a refusal it waits for this to reach zero.
#[derive(Debug, Default)]
pub struct InFlightRequests {
    count: AtomicUsize,
    /// Requests started since the connection opened.
    started: AtomicUsize,
    waiting_reader: Mutex<Option<Waker>>,
    /// When the count last went to zero (`None`: not since the connection
    /// opened); HTTP/2's idle limit reads it (`h2_guard`).
    went_idle: Mutex<Option<Instant>>,
}

impl InFlightRequests {
    /// Counts one request until the returned guard is dropped (with the
    /// response body, once sent).
    pub fn start(self: &Arc<Self>) -> RequestGuard {
        self.started.fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::AcqRel);
        RequestGuard(Arc::clone(self))
    }

    /// Requests started since the connection opened.
    pub fn started(&self) -> usize {
        self.started.load(Ordering::Relaxed)
    }

    /// True if none is in flight and at least `started` requests have been
    /// started (so all of them answered); otherwise registers `cx` to be
    /// woken when the last one in flight is answered.
    pub(crate) fn all_answered_or_wake_later(&self, started: usize, cx: &Context<'_>) -> bool {
        if let Ok(mut slot) = self.waiting_reader.lock() {
            *slot = Some(cx.waker().clone());
        }
        // After the waker is stored: a request that ends now wakes it.
        self.count.load(Ordering::Acquire) == 0 && self.started() >= started
    }

    /// `None` while a request is in flight; else since when none has been
    /// (the last answer, or `opened` if there never was one).
    pub fn idle_since(&self, opened: Instant) -> Option<Instant> {
        if self.count.load(Ordering::Acquire) != 0 {
            return None;
        }
        let went_idle = self.went_idle.lock().ok().and_then(|at| *at);
        Some(went_idle.map_or(opened, |at| at.max(opened)))
    }

    /// True if none is in flight; otherwise registers `cx` to be woken
    /// when the last one is answered.
    fn none_or_wake_later(&self, cx: &Context<'_>) -> bool {
        if self.count.load(Ordering::Acquire) == 0 {
            return true;
        }
        if let Ok(mut slot) = self.waiting_reader.lock() {
            *slot = Some(cx.waker().clone());
        }
        // Re-check: the last request may have ended before the waker was stored.
        self.count.load(Ordering::Acquire) == 0
    }
}

/// One request in flight on a client connection; see [`InFlightRequests`].
#[derive(Debug)]
pub struct RequestGuard(Arc<InFlightRequests>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            if let Ok(mut at) = self.0.went_idle.lock() {
                *at = Some(clock::now());
            }
            if let Some(waker) = self.0.waiting_reader.lock().ok().and_then(|mut w| w.take()) {
                waker.wake();
            }
        }
    }
}

/// The client idle limit between requests: true once no request of the
/// connection has been in flight for the limit (the guard's, and
/// `h1_server`'s before a handover).
///
/// The timer is lazy: armed once, it is not moved when a request comes and
/// goes (that would be a timer registration and removal per request); when
/// it fires it checks whether the connection has really been idle that
/// long ([`InFlightRequests::idle_since`]), and if not re-arms for when it
/// would be (or for one limit later while a request is in flight). So a
/// connection's timer fires at most about once per idle limit.
#[derive(Debug)]
pub(crate) struct IdleTimer {
    limit: Duration,
    /// When the connection was accepted (idle since then if no request came).
    opened: Instant,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl IdleTimer {
    pub(crate) fn new(limit: Duration) -> Self {
        IdleTimer {
            limit,
            opened: Instant::now(),
            sleep: None,
        }
    }

    /// True once no request has been in flight for the limit; else `cx`
    /// is woken when it next may be.
    pub(crate) fn expired(&mut self, in_flight: &InFlightRequests, cx: &mut Context<'_>) -> bool {
        let Some(sleep) = &mut self.sleep else {
            let mut sleep = Box::pin(tokio::time::sleep(self.limit));
            // Registers the waker; a fresh deadline in the future is pending.
            let _ = sleep.as_mut().poll(cx);
            self.sleep = Some(sleep);
            return false;
        };
        while sleep.as_mut().poll(cx).is_ready() {
            let now = Instant::now();
            let deadline = match in_flight.idle_since(self.opened) {
                Some(since) if since + self.limit <= now => return true,
                Some(since) => since + self.limit,
                None => now + self.limit,
            };
            sleep.as_mut().reset(deadline);
        }
        false
    }
}

/// Wraps a server-side connection; see the module docs.
#[derive(Debug)]
pub struct FramingGuard<T> {
    inner: T,
    /// `buf[start..end]`: read from the socket, not yet handed to hyper.
    /// The buffer stays initialized (allocated on first use, reused), so a
    /// read never pays for zeroing memory.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    scanner: Scanner,
    config: Arc<GuardConfig>,
    /// Once refused: the refusal and how much of its response is written.
    refusal: Option<(Refusal, usize)>,
    /// Deadline for the head being received; only armed while a head is
    /// incomplete, so a head that arrives in one read costs no timer.
    head_timer: Option<Pin<Box<Sleep>>>,
    head_timer_armed: bool,
    /// When the first head's first byte came, if before the guard was
    /// made (`h1_server` hands it a head it has begun to read).
    head_started: Option<Instant>,
    /// Wakes the connection to check its idleness; see [`Self::idle_expired`].
    idle: IdleTimer,
    in_flight: Arc<InFlightRequests>,
}

/// Why the guard refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `Content-Length` together with `Transfer-Encoding`.
    AmbiguousFraming,
    /// The head is longer than the limit, or has more header fields than
    /// hyper accepts.
    HeadTooLarge,
    /// The head is not HTTP/1.x (bad request line, version, field syntax).
    MalformedHead,
    /// An HTTP/1.1 request without exactly one valid `Host` (RFC 9112 §3.2).
    BadHost,
    /// The request line alone is over the head limit (RFC 9112 §3: "MUST
    /// respond with a 414 (URI Too Long)").
    UriTooLong,
}

/// Per-listener settings of the guard, shared by its connections.
#[derive(Debug)]
pub struct GuardConfig {
    /// Longest request head accepted, in bytes.
    pub max_head: usize,
    /// Time from a head's first byte to its end (slowloris guard).
    pub head_timeout: Duration,
    /// Time a connection may wait for its next request with none in flight
    /// (none being answered, no response body being sent).
    pub idle_timeout: Duration,
    pub ambiguous_framing: RefusalAnswer,
    pub head_too_large: RefusalAnswer,
    pub malformed_head: RefusalAnswer,
    pub bad_host: RefusalAnswer,
    pub uri_too_long: RefusalAnswer,
}

/// What the guard sends for one kind of refusal, and the counter it bumps
/// (`meshlet_mesh_responses_total{reason=...}`).
#[derive(Debug)]
pub struct RefusalAnswer {
    /// A complete HTTP/1.1 response (see `ProxyError::to_http1_bytes`).
    pub response: Vec<u8>,
    pub count: IntCounter,
}

impl GuardConfig {
    fn answer(&self, refusal: Refusal) -> &RefusalAnswer {
        match refusal {
            Refusal::AmbiguousFraming => &self.ambiguous_framing,
            Refusal::HeadTooLarge => &self.head_too_large,
            Refusal::MalformedHead => &self.malformed_head,
            Refusal::BadHost => &self.bad_host,
            Refusal::UriTooLong => &self.uri_too_long,
        }
    }
}

impl<T> FramingGuard<T> {
    pub fn new(inner: T, config: Arc<GuardConfig>, in_flight: Arc<InFlightRequests>) -> Self {
        let idle = IdleTimer::new(config.idle_timeout);
        FramingGuard {
            inner,
            buf: Vec::new(),
            start: 0,
            end: 0,
            scanner: Scanner::new(config.max_head),
            config,
            refusal: None,
            head_timer: None,
            head_timer_armed: false,
            head_started: None,
            idle,
            in_flight,
        }
    }
}

impl<T> FramingGuard<T> {
    /// Times the first head from `started` (its first byte, read before
    /// the guard was made) rather than from when the guard sees it.
    pub fn head_started_at(mut self, started: Option<Instant>) -> Self {
        self.head_started = started;
        self
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for FramingGuard<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            let cleared = this.scanner.cleared;
            if cleared > 0 {
                let n = cleared.min(out.remaining());
                out.put_slice(&this.buf[this.start..this.start + n]);
                this.start += n;
                this.scanner.cleared -= n;
                if this.start == this.end {
                    (this.start, this.end) = (0, 0);
                }
                return Poll::Ready(Ok(()));
            }
            if this.scanner.state == State::Cut {
                // Framing hyper would fail: it sees the end of input here.
                return Poll::Ready(Ok(()));
            }
            if this.refusal.is_some() {
                // End of input, as far as hyper knows; but only once every
                // earlier (pipelined) request has been answered.
                return if this.in_flight.none_or_wake_later(cx) {
                    Poll::Ready(Ok(()))
                } else {
                    Poll::Pending
                };
            }
            if this.start == this.end {
                if let Some(limit) = this.scanner.direct_read_limit() {
                    return this.read_direct(cx, out, limit);
                }
            }
            // Slow path: read into our buffer and scan.
            if this.head_expired(cx) {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "request head not received within the header read timeout",
                )));
            }
            this.make_room();
            let mut spare = ReadBuf::new(&mut this.buf[this.end..]);
            if Pin::new(&mut this.inner)
                .poll_read(cx, &mut spare)?
                .is_pending()
            {
                if this.idle_expired(cx) {
                    // End of input for hyper, between requests: it closes
                    // the connection as if the client had.
                    tracing::debug!("client connection idle for the idle timeout, closing it");
                    this.scanner.state = State::Cut;
                    return Poll::Ready(Ok(()));
                }
                return Poll::Pending;
            }
            let read = spare.filled().len();
            if read == 0 {
                // End of input: hand over whatever is left (a truncated
                // head) and let hyper report it.
                this.scanner.cleared = this.end - this.start;
                this.scanner.state = State::Opaque;
                if this.scanner.cleared == 0 {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            this.end += read;
            if let Err(refusal) = this.scanner.scan(&this.buf[this.start..this.end]) {
                tracing::debug!(?refusal, "refusing a request below hyper");
                this.config.answer(refusal).count.inc();
                this.refusal = Some((refusal, 0));
            }
        }
    }
}

impl<T> FramingGuard<T> {
    /// True once a head that has started has taken longer than allowed.
    /// Arms the timer when a head is incomplete, disarms it otherwise.
    fn head_expired(&mut self, cx: &mut Context<'_>) -> bool {
        let head_pending = self.scanner.state == State::Head && self.start < self.end;
        if !head_pending {
            self.head_timer_armed = false;
            return false;
        }
        if !self.head_timer_armed {
            self.head_timer_armed = true;
            let started = self.head_started.take().unwrap_or_else(Instant::now);
            let deadline = started + self.config.head_timeout;
            match &mut self.head_timer {
                Some(timer) => timer.as_mut().reset(deadline),
                None => self.head_timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
        }
        self.head_timer
            .as_mut()
            .is_some_and(|timer| timer.as_mut().poll(cx).is_ready())
    }

    /// True once no request has been in flight and no byte of a next one
    /// has arrived for the idle timeout (see [`IdleTimer`]). Called only
    /// when the socket has nothing to read.
    fn idle_expired(&mut self, cx: &mut Context<'_>) -> bool {
        if self.scanner.state != State::Head || self.start < self.end {
            return false; // a head or a body is arriving: not idle
        }
        self.idle.expired(&self.in_flight, cx)
    }

    /// Ensures free space after `end`: move pending bytes to the front, or
    /// grow (a head larger than the buffer; the scanner bounds it).
    fn make_room(&mut self) {
        if self.end < self.buf.len() {
            return;
        }
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            (self.start, self.end) = (0, self.end - self.start);
        } else {
            let grow = self.buf.len().max(READ_CHUNK);
            self.buf.resize(self.buf.len() + grow, 0);
        }
    }
}

impl<T: AsyncRead + Unpin> FramingGuard<T> {
    /// Reads body bytes of known extent straight into hyper's buffer.
    fn read_direct(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
        limit: u64,
    ) -> Poll<io::Result<()>> {
        let before = out.filled().len();
        if limit >= out.remaining() as u64 {
            ready!(Pin::new(&mut self.inner).poll_read(cx, out))?;
        } else {
            let window = out.initialize_unfilled_to(limit as usize);
            let mut limited = ReadBuf::new(window);
            ready!(Pin::new(&mut self.inner).poll_read(cx, &mut limited))?;
            let n = limited.filled().len();
            out.advance(n);
        }
        let n = out.filled().len() - before;
        if n == 0 {
            self.scanner.state = State::Opaque;
        } else {
            self.scanner.consume_direct(n as u64);
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for FramingGuard<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    /// hyper shuts the connection down after the end of input it was shown;
    /// the refusal goes out first.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Some((refusal, written)) = &mut this.refusal {
            let response = &this.config.answer(*refusal).response;
            while *written < response.len() {
                match ready!(Pin::new(&mut this.inner).poll_write(cx, &response[*written..])) {
                    Ok(0) | Err(_) => break, // the client is gone; nothing to tell it
                    Ok(n) => *written += n,
                }
            }
            *written = response.len();
            ready!(Pin::new(&mut this.inner).poll_flush(cx))?;
        }
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

/// Where in the byte stream of a connection we are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Looking for (the end of) a request head.
    Head,
    /// Inside a body with this many bytes left.
    Fixed(u64),
    /// Inside a chunked body.
    Chunked(Chunk),
    /// Not (or no longer) HTTP/1 we understand: pass everything.
    Opaque,
    /// Chunked framing hyper would refuse: nothing more is passed, hyper
    /// sees the end of input (and fails the request) here.
    Cut,
}

/// Position inside chunked framing (RFC 9112 §7.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    Size {
        size: u64,
        digits: u8,
    },
    /// Whitespace after the size (hyper allows it): no more digits.
    SizeLws {
        size: u64,
    },
    Extension {
        size: u64,
    },
    SizeLf {
        size: u64,
    },
    Data(u64),
    DataCr,
    DataLf,
    /// After the last chunk, or a trailer line: CR ends the message, any
    /// other byte starts a trailer line.
    TrailerLineStart,
    /// Inside a trailer line, up to its CR (a bare LF is a field byte
    /// here, as in hyper).
    TrailerLine,
    TrailerLf,
    FinalLf,
}

/// Splits a connection's byte stream into heads and bodies.
#[derive(Debug)]
struct Scanner {
    state: State,
    /// Bytes at the front of the pending buffer that may go to hyper.
    cleared: usize,
    /// Where to resume looking for the end of the current head.
    head_search_from: usize,
    max_head: usize,
    /// Every head cleared, for the property tests' oracle.
    #[cfg(test)]
    accepted: Vec<Vec<u8>>,
}

impl Scanner {
    fn new(max_head: usize) -> Self {
        Scanner {
            state: State::Head,
            cleared: 0,
            head_search_from: 0,
            max_head,
            #[cfg(test)]
            accepted: Vec::new(),
        }
    }

    /// How many bytes may be read straight into hyper's buffer now.
    fn direct_read_limit(&self) -> Option<u64> {
        match self.state {
            State::Opaque => Some(u64::MAX),
            State::Fixed(n) | State::Chunked(Chunk::Data(n)) => Some(n),
            _ => None,
        }
    }

    fn consume_direct(&mut self, n: u64) {
        self.state = match self.state {
            State::Fixed(left) if left > n => State::Fixed(left - n),
            State::Fixed(_) => State::Head,
            State::Chunked(Chunk::Data(left)) if left > n => State::Chunked(Chunk::Data(left - n)),
            State::Chunked(Chunk::Data(_)) => State::Chunked(Chunk::DataCr),
            other => other,
        };
    }

    /// Advances over `pending` (everything not yet handed to hyper),
    /// clearing what may pass, or refuses the next head.
    fn scan(&mut self, pending: &[u8]) -> Result<(), Refusal> {
        loop {
            let rest = &pending[self.cleared..];
            if rest.is_empty() {
                return Ok(());
            }
            match self.state {
                State::Opaque => self.cleared = pending.len(),
                State::Cut => return Ok(()),
                State::Fixed(left) => {
                    let n = left.min(rest.len() as u64);
                    self.cleared += n as usize;
                    self.state = if n == left {
                        State::Head
                    } else {
                        State::Fixed(left - n)
                    };
                }
                State::Chunked(chunk) => {
                    let (used, next) = chunk_step(chunk, rest);
                    self.cleared += used;
                    self.state = next;
                }
                State::Head => {
                    // Empty lines between messages are allowed (RFC 9112 §2.2).
                    if rest[0] == b'\r' || rest[0] == b'\n' {
                        self.cleared += 1;
                        continue;
                    }
                    match find_head_end(rest, self.head_search_from) {
                        Some(len) if len > self.max_head => return Err(self.too_large(rest)),
                        Some(len) => {
                            self.state = self.inspect_head(&rest[..len])?;
                            #[cfg(test)]
                            self.accepted.push(rest[..len].to_vec());
                            self.cleared += len;
                            self.head_search_from = 0;
                        }
                        None if rest.len() > self.max_head => return Err(self.too_large(rest)),
                        None => {
                            self.head_search_from = rest.len().saturating_sub(3);
                            return Ok(());
                        }
                    }
                }
            }
        }
    }

    /// A head over the limit: 414 if its request line alone is (the
    /// request-target is what makes it long), else 431.
    fn too_large(&self, head: &[u8]) -> Refusal {
        match head.iter().position(|&b| b == b'\n') {
            Some(end) if end <= self.max_head => Refusal::HeadTooLarge,
            _ => Refusal::UriTooLong,
        }
    }

    /// Decides how the message after this complete head is framed.
    fn inspect_head(&self, head: &[u8]) -> Result<State, Refusal> {
        // hyper's default limit on header fields; beyond it hyper answers 431.
        // Left uninitialised: httparse writes the fields it finds (100
        // empty fields would be 3.2 KB written per request for nothing).
        let mut headers = [MaybeUninit::<httparse::Header<'_>>::uninit(); 100];
        let mut request = httparse::Request::new(&mut []);
        match request.parse_with_uninit_headers(head, &mut headers) {
            Ok(httparse::Status::Complete(_)) => {}
            // Complete for us but not for httparse: hyper would read past
            // where we think the head ends. Never let the two disagree.
            Ok(httparse::Status::Partial) => return Err(Refusal::MalformedHead),
            // hyper parses with httparse's defaults too, so it would refuse
            // these the same way, but without saying why.
            Err(httparse::Error::TooManyHeaders) => return Err(Refusal::HeadTooLarge),
            Err(_) => return Err(Refusal::MalformedHead),
        }
        let (mut length, mut has_te, mut chunked, mut upgrade, mut hosts) =
            (None, false, false, false, 0);
        let mut te_codings = 0;
        for header in request.headers.iter() {
            let name = header.name;
            if name.eq_ignore_ascii_case("content-length") {
                // RFC 9110 §8.6: `1*DIGIT`. Unparsable, or a second one
                // that disagrees: hyper refuses these too (RFC 9112 §6.3),
                // we say why.
                let this_length = decimal(header.value.trim_ascii());
                if this_length.is_none() || (length.is_some() && this_length != length) {
                    return Err(Refusal::MalformedHead);
                }
                length = this_length;
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                has_te = true;
                // RFC 9112 §6.1: several field lines are one list; chunked
                // must be its last coding, applied once (§6.3: otherwise
                // the framing is invalid).
                for coding in header.value.split(|&b| b == b',') {
                    let coding = coding.trim_ascii();
                    if chunked {
                        return Err(Refusal::MalformedHead); // something after chunked
                    }
                    chunked = coding.eq_ignore_ascii_case(b"chunked");
                    te_codings += 1;
                }
            } else if name.eq_ignore_ascii_case("upgrade") {
                upgrade = true;
            } else if name.eq_ignore_ascii_case("host") {
                hosts += 1;
                if !valid_host(header.value) {
                    return Err(Refusal::BadHost);
                }
            }
        }
        if length.is_some() && has_te {
            return Err(Refusal::AmbiguousFraming);
        }
        // Transfer-Encoding must end in chunked, and does not exist in HTTP/1.0.
        if has_te && (!chunked || te_codings == 0 || request.version == Some(0)) {
            return Err(Refusal::MalformedHead);
        }
        // RFC 9112 §3.2: more than one Host is refused (an invalid one is,
        // above). A missing Host in HTTP/1.1 is not refused here (yet): an
        // end-to-end scenario of the demo mesh still sends one without it.
        if hosts > 1 {
            return Err(Refusal::BadHost);
        }
        Ok(if upgrade || request.method == Some("CONNECT") {
            State::Opaque // after the head, the bytes may stop being HTTP
        } else if has_te {
            State::Chunked(Chunk::Size { size: 0, digits: 0 })
        } else {
            match length {
                None | Some(0) => State::Head,
                Some(n) => State::Fixed(n),
            }
        })
    }
}

/// `1*DIGIT` as a number, `None` if anything else or too large.
fn decimal(text: &[u8]) -> Option<u64> {
    if text.is_empty() {
        return None;
    }
    text.iter().try_fold(0u64, |n, &b| {
        if b.is_ascii_digit() {
            n.checked_mul(10)?.checked_add(u64::from(b - b'0'))
        } else {
            None
        }
    })
}

/// A `Host` value (RFC 9110 §7.2: `uri-host [ ":" port ]`, or empty): a
/// reg-name, IPv4 or bracketed IP literal, no userinfo, digits as port.
pub(crate) fn valid_host(value: &[u8]) -> bool {
    let (host, port) = match value.iter().rposition(|&b| b == b':') {
        Some(colon) if !value[colon..].contains(&b']') => {
            (&value[..colon], Some(&value[colon + 1..]))
        }
        _ => (value, None),
    };
    let host_ok = if let Some(literal) = host.strip_prefix(b"[") {
        literal.strip_suffix(b"]").is_some_and(|inner| {
            !inner.is_empty()
                && inner
                    .iter()
                    .all(|&b| b.is_ascii_hexdigit() || matches!(b, b':' | b'.'))
        })
    } else {
        // reg-name: unreserved / pct-encoded / sub-delims (RFC 3986 §3.2.2).
        host.iter().all(|&b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'-' | b'.'
                        | b'_'
                        | b'~'
                        | b'%'
                        | b'!'
                        | b'$'
                        | b'&'
                        | b'\''
                        | b'('
                        | b')'
                        | b'*'
                        | b'+'
                        | b','
                        | b';'
                        | b'='
                )
        })
    };
    let port_ok = port.is_none_or(|p| p.iter().all(u8::is_ascii_digit) && p.len() <= 5);
    host_ok && port_ok && (port.is_none() || !host.is_empty())
}

/// Length of the head at the start of `bytes` (through its empty line), if
/// complete. Accepts bare `\n` line ends as httparse does.
fn find_head_end(bytes: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    while let Some(lf) = next_lf(bytes, i) {
        match bytes.get(lf + 1) {
            Some(b'\n') => return Some(lf + 2),
            Some(b'\r') if bytes.get(lf + 2) == Some(&b'\n') => return Some(lf + 3),
            _ => {}
        }
        i = lf + 1;
    }
    None
}

/// The index of the first `\n` in `bytes` at or after `from`, looked for
/// eight bytes at a time (a head has one every few dozen bytes).
fn next_lf(bytes: &[u8], from: usize) -> Option<usize> {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);
    const LFS: u64 = u64::from_ne_bytes([b'\n'; 8]);
    let mut i = from;
    while let Some(word) = bytes.get(i..i + 8) {
        let mut eight = [0; 8];
        eight.copy_from_slice(word);
        // A zero byte of `x` is a `\n` of the word; the lowest byte flagged
        // by this classic test is exactly the first zero byte (a false flag
        // can only sit above a true one).
        let x = u64::from_le_bytes(eight) ^ LFS;
        let flagged = x.wrapping_sub(ONES) & !x & HIGHS;
        if flagged != 0 {
            return Some(i + (flagged.trailing_zeros() / 8) as usize);
        }
        i += 8;
    }
    bytes
        .get(i..)?
        .iter()
        .position(|&b| b == b'\n')
        .map(|at| i + at)
}

/// Advances through chunked framing (RFC 9112 §7.1, as hyper's decoder
/// reads it); returns bytes used and the new state, [`State::Cut`] where
/// hyper would fail the body.
fn chunk_step(mut chunk: Chunk, bytes: &[u8]) -> (usize, State) {
    let cut = |used| (used, State::Cut);
    let mut used = 0;
    while used < bytes.len() {
        let byte = bytes[used];
        chunk = match chunk {
            Chunk::Data(left) => {
                let n = left.min((bytes.len() - used) as u64);
                used += n as usize;
                chunk = if n == left {
                    Chunk::DataCr
                } else {
                    Chunk::Data(left - n)
                };
                continue;
            }
            Chunk::Size { size, digits } => match byte {
                b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                    let value = (byte as char).to_digit(16).unwrap_or(0) as u64;
                    // Leading zeros are fine (hyper takes them); a value
                    // over 64 bits is not.
                    match size.checked_mul(16).and_then(|s| s.checked_add(value)) {
                        Some(size) => Chunk::Size {
                            size,
                            digits: digits.saturating_add(1),
                        },
                        None => return cut(used),
                    }
                }
                b' ' | b'\t' if digits > 0 => Chunk::SizeLws { size },
                b';' if digits > 0 => Chunk::Extension { size },
                b'\r' if digits > 0 => Chunk::SizeLf { size },
                _ => return cut(used),
            },
            Chunk::SizeLws { size } => match byte {
                b' ' | b'\t' => Chunk::SizeLws { size },
                b';' => Chunk::Extension { size },
                b'\r' => Chunk::SizeLf { size },
                _ => return cut(used),
            },
            Chunk::Extension { size } => match byte {
                b'\r' => Chunk::SizeLf { size },
                b'\n' => return cut(used),
                _ => Chunk::Extension { size },
            },
            Chunk::SizeLf { size } if byte == b'\n' => after_size_line(size),
            Chunk::DataCr if byte == b'\r' => Chunk::DataLf,
            Chunk::DataLf if byte == b'\n' => Chunk::Size { size: 0, digits: 0 },
            Chunk::TrailerLineStart if byte == b'\r' => Chunk::FinalLf,
            Chunk::TrailerLineStart => Chunk::TrailerLine,
            Chunk::TrailerLine if byte == b'\r' => Chunk::TrailerLf,
            Chunk::TrailerLine => Chunk::TrailerLine,
            Chunk::TrailerLf if byte == b'\n' => Chunk::TrailerLineStart,
            Chunk::FinalLf if byte == b'\n' => return (used + 1, State::Head),
            Chunk::SizeLf { .. }
            | Chunk::DataCr
            | Chunk::DataLf
            | Chunk::TrailerLf
            | Chunk::FinalLf => return cut(used),
        };
        used += 1;
    }
    (used, State::Chunked(chunk))
}

fn after_size_line(size: u64) -> Chunk {
    if size == 0 {
        Chunk::TrailerLineStart
    } else {
        Chunk::Data(size)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use meshlet_netio::{WriteStall, WriteStallIo};

    fn guard_config(idle_timeout: Duration) -> Arc<GuardConfig> {
        let answer = || RefusalAnswer {
            response: Vec::new(),
            count: IntCounter::new("refused", "test counter").unwrap(),
        };
        Arc::new(GuardConfig {
            max_head: 1024,
            head_timeout: Duration::from_secs(1),
            idle_timeout,
            ambiguous_framing: answer(),
            head_too_large: answer(),
            malformed_head: answer(),
            bad_host: answer(),
            uri_too_long: answer(),
        })
    }

    /// The idle clock runs only while no request is in flight (a response
    /// body may stream for longer than the idle timeout); then input ends
    /// one idle timeout after the last request was answered.
    #[tokio::test(start_paused = true)]
    async fn the_idle_timeout_counts_only_time_without_a_request_in_flight() {
        let (mut client, server) = tokio::io::duplex(1024);
        let in_flight = Arc::new(InFlightRequests::default());
        let idle = Duration::from_secs(10);
        let mut guard = FramingGuard::new(server, guard_config(idle), Arc::clone(&in_flight));
        let head = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        client.write_all(head).await.unwrap();
        let mut buf = [0u8; 256];
        assert_eq!(guard.read(&mut buf).await.unwrap(), head.len());
        let answered = in_flight.start();
        // Two and a half idle timeouts with the request in flight: no end.
        let streaming = tokio::time::timeout(idle * 5 / 2, guard.read(&mut buf)).await;
        assert!(
            streaming.is_err(),
            "input ended while a request was in flight"
        );
        drop(answered);
        let idle_from = Instant::now();
        assert_eq!(guard.read(&mut buf).await.unwrap(), 0, "input ends");
        assert_eq!(idle_from.elapsed(), idle);
        // And stays ended, even if the client sends more.
        client.write_all(head).await.unwrap();
        assert_eq!(guard.read(&mut buf).await.unwrap(), 0);
    }

    /// A head whose first byte came before the guard was made (read by
    /// `h1_server`) is timed from that byte.
    #[tokio::test(start_paused = true)]
    async fn a_head_begun_before_the_guard_is_timed_from_its_first_byte() {
        let (mut client, server) = tokio::io::duplex(1024);
        let started = Instant::now();
        tokio::time::sleep(Duration::from_millis(800)).await;
        let in_flight = Arc::new(InFlightRequests::default());
        let mut guard = FramingGuard::new(server, guard_config(Duration::from_secs(60)), in_flight)
            .head_started_at(Some(started));
        client.write_all(b"GET / HTTP/1.1\r\nHo").await.unwrap();
        let mut buf = [0u8; 256];
        let read = guard.read(&mut buf).await;
        assert_eq!(read.unwrap_err().kind(), io::ErrorKind::TimedOut);
        assert_eq!(
            started.elapsed(),
            Duration::from_secs(1),
            "the head timeout, from its first byte"
        );
    }

    /// A client that never reads the guard's refusal is cut off after the
    /// write-stall limit, although hyper's flushes (of its own, empty
    /// buffer) keep completing meanwhile (found by an attack: a refusal
    /// that did not fit the socket buffers held the connection for ever).
    #[tokio::test(start_paused = true)]
    async fn a_refusal_the_client_never_reads_is_cut_off_after_the_write_stall_limit() {
        let (mut client, server) = tokio::io::duplex(64);
        let mut config = guard_config(Duration::from_secs(300));
        Arc::get_mut(&mut config)
            .unwrap()
            .ambiguous_framing
            .response = vec![b'x'; 4096];
        let limit = Duration::from_secs(2);
        let mut guard = FramingGuard::new(
            WriteStallIo::new(server, WriteStall::new(Some(limit), None)),
            config,
            Arc::new(InFlightRequests::default()),
        );
        // Sends a smuggling attempt, then never reads (and stays connected).
        let sender = tokio::spawn(async move {
            client
                .write_all(
                    b"POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
                )
                .await
                .unwrap();
            std::future::pending::<()>().await;
            drop(client);
        });
        let mut buf = [0u8; 256];
        assert_eq!(
            guard.read(&mut buf).await.unwrap(),
            0,
            "refused: end of input"
        );
        let started = Instant::now();
        // What hyper does on each wake: flush its buffer, then shut down
        // (which writes the refusal first).
        let shut = std::future::poll_fn(|cx| {
            let _ = Pin::new(&mut guard).poll_flush(cx);
            Pin::new(&mut guard).poll_shutdown(cx)
        });
        // The refusal is given up on and the shutdown completes: hyper
        // then drops (closes) the connection.
        let outcome = tokio::time::timeout(limit * 10, shut).await;
        assert!(outcome.is_ok(), "never cut off");
        assert_eq!(started.elapsed(), limit);
        sender.abort();
    }

    /// A head that has started arriving is timed by the head timeout, not
    /// the idle one.
    #[tokio::test(start_paused = true)]
    async fn an_incomplete_head_is_not_idle() {
        let (mut client, server) = tokio::io::duplex(1024);
        let in_flight = Arc::new(InFlightRequests::default());
        let mut guard =
            FramingGuard::new(server, guard_config(Duration::from_millis(100)), in_flight);
        client.write_all(b"GET / HT").await.unwrap();
        let mut buf = [0u8; 256];
        let started = Instant::now();
        let err = guard.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(1));
    }

    /// Feeds `stream` to a scanner in pieces of `piece` bytes (as reads
    /// would deliver it) and returns the bytes cleared, or the refusal.
    fn scan_in_pieces(stream: &[u8], piece: usize) -> Result<usize, Refusal> {
        let mut scanner = Scanner::new(1024);
        let mut handed = 0;
        let mut end = 0;
        while end < stream.len() {
            end = (end + piece).min(stream.len());
            scanner.scan(&stream[handed..end])?;
            handed += scanner.cleared;
            scanner.cleared = 0;
        }
        Ok(handed)
    }

    fn check(stream: &str, expect: Result<usize, Refusal>) {
        for piece in 1..=stream.len() {
            assert_eq!(
                scan_in_pieces(stream.as_bytes(), piece),
                expect,
                "piece size {piece}: {stream:?}"
            );
        }
    }

    #[test]
    fn the_word_at_a_time_line_feed_search_agrees_with_a_byte_loop() {
        // Line feeds at every offset within a word, bytes just around `\n`
        // (0x09, 0x0b, 0x8a) and high bytes that could fake a match.
        let text: &[u8] =
            b"GET / HTTP/1.1\r\nHost: a\r\n\nx\n\n\x8a\x0b\x09\xff\n0123456789abcdef\n\x0a\x01";
        for end in 0..=text.len() {
            let bytes = &text[..end];
            for from in 0..=end + 1 {
                let expected = bytes
                    .get(from..)
                    .and_then(|rest| rest.iter().position(|&b| b == b'\n'))
                    .map(|at| from + at);
                assert_eq!(next_lf(bytes, from), expected, "{bytes:?} from {from}");
            }
        }
    }

    #[test]
    fn clears_complete_messages_and_holds_back_partial_heads() {
        let get = "GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        check(get, Ok(get.len()));
        check(
            &format!("{get}{get}GET /partial HTTP/1.1\r\nHost: a\r\nHo"),
            Ok(2 * get.len()),
        );
        let post = "POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello";
        check(&format!("{post}{get}"), Ok(post.len() + get.len()));
        // The body is cleared even before the next head is complete.
        check(&format!("{post}GET"), Ok(post.len()));
        // Bare LF line ends and blank lines between messages.
        let lf = "GET / HTTP/1.1\nHost: a\n\n";
        check(&format!("\r\n{lf}"), Ok(lf.len() + 2));
    }

    #[test]
    fn follows_chunked_framing_with_extensions_and_trailers() {
        let chunked = "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n\
                       5;ext=1\r\nhello\r\nA\r\n0123456789\r\n0\r\nx-sum: 1\r\n\r\n";
        let get = "GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        check(&format!("{chunked}{get}"), Ok(chunked.len() + get.len()));
        // A smuggled second head inside a chunk is body, not a head.
        let hidden = "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n\
                      30\r\nGET /x HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Enc\r\n0\r\n\r\n";
        check(hidden, Ok(hidden.len()));
    }

    #[test]
    fn refuses_content_length_with_transfer_encoding_in_either_order() {
        check(
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            Err(Refusal::AmbiguousFraming),
        );
        check(
            "POST / HTTP/1.1\r\nHost: a\r\ntransfer-encoding: chunked\r\ncontent-length: 5\r\n\r\n",
            Err(Refusal::AmbiguousFraming),
        );
        // ... also when it is the second message on the connection.
        check("GET / HTTP/1.1\r\nHost: a\r\n\r\nPOST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", Err(Refusal::AmbiguousFraming));
    }

    #[test]
    fn passes_upgraded_and_tunnelled_bytes_untouched() {
        // After an upgrade or CONNECT head the bytes are no longer HTTP.
        for stream in [
            "GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n\x01\x05hello",
            "CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n\x16\x03\x01",
        ] {
            check(stream, Ok(stream.len()));
        }
    }

    #[test]
    fn refuses_heads_that_are_not_http() {
        for head in [
            "GARBAGE\r\n\r\n",
            "GET / HTTP/9.9\r\n\r\n",
            "GET /a b HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nbad header\r\n\r\n",
        ] {
            check(head, Err(Refusal::MalformedHead));
        }
        // Framing hyper would refuse as well.
        for head in [
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5x\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n",
            "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            check(head, Err(Refusal::MalformedHead));
        }
        let twice =
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok";
        check(twice, Ok(twice.len()));
        let many: String = (0..101).map(|i| format!("x{i}: 1\r\n")).collect();
        check(
            &format!("GET / HTTP/1.1\r\nHost: a\r\n{many}\r\n"),
            Err(Refusal::HeadTooLarge),
        );
    }

    #[test]
    fn a_request_line_over_the_limit_is_uri_too_long() {
        let long = format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "a".repeat(2000));
        assert_eq!(
            scan_in_pieces(long.as_bytes(), 4096),
            Err(Refusal::UriTooLong)
        );
        assert_eq!(
            scan_in_pieces(&long.as_bytes()[..1500], 4096),
            Err(Refusal::UriTooLong)
        );
    }

    #[test]
    fn refuses_heads_over_the_limit_complete_or_not() {
        let long = format!("GET / HTTP/1.1\r\nHost: a\r\nx: {}\r\n", "a".repeat(2000));
        assert_eq!(
            scan_in_pieces(long.as_bytes(), 4096),
            Err(Refusal::HeadTooLarge)
        );
        let complete = format!("{long}\r\n");
        assert_eq!(
            scan_in_pieces(complete.as_bytes(), 4096),
            Err(Refusal::HeadTooLarge)
        );
        let fits = format!(
            "GET / HTTP/1.1\r\nHost: a\r\nx: {}\r\n\r\n",
            "a".repeat(900)
        );
        check(&fits, Ok(fits.len()));
    }

    #[test]
    fn direct_reads_follow_body_extent() {
        let mut scanner = Scanner::new(1024);
        scanner
            .scan(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n")
            .unwrap();
        assert_eq!(scanner.direct_read_limit(), Some(10));
        scanner.consume_direct(4);
        assert_eq!(scanner.direct_read_limit(), Some(6));
        scanner.consume_direct(6);
        assert_eq!(scanner.state, State::Head);
        assert_eq!(scanner.direct_read_limit(), None);
    }

    #[test]
    fn chunked_framing_is_read_as_hyper_reads_it() {
        let get = "GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        // Leading zeros (hyper takes them) and whitespace after the size.
        let zeros = "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n\
                     00000000000000000005 \t;x=1\r\nhello\r\n0000000000000000000\r\n\r\n";
        check(&format!("{zeros}{get}"), Ok(zeros.len() + get.len()));
        // A trailer line with a bare LF inside is one field line to hyper
        // (it ends at CRLF), so the message does not end at "\n\r\n".
        let trailer = "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n\
                       0\r\nx: 1\n\r\nGET / HTTP/1.1\r\nContent-Length: 9\r\n\r\n";
        assert_eq!(scan_in_pieces(trailer.as_bytes(), 4096), Ok(trailer.len()));
        let mut scanner = Scanner::new(1024);
        scanner.scan(trailer.as_bytes()).unwrap();
        assert_eq!(scanner.accepted.len(), 1, "the trailer is not a head");
    }

    #[test]
    fn chunked_framing_hyper_would_fail_cuts_the_input() {
        let head = "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n";
        for body in [
            "zz\r\n",                // not a size
            "5\nhello\r\n",          // bare LF after the size
            "5;a\nhello\r\n",        // LF in an extension
            "5 5\r\nhello\r\n",      // digits after whitespace
            "5\r\nhelloXX",          // no CRLF after the data
            "10000000000000000\r\n", // over 64 bits
            "0\r\nx: 1\r\r",         // trailer line without LF
        ] {
            let stream = format!("{head}{body}GET / HTTP/1.1\r\nHost: a\r\n\r\n");
            for piece in 1..=stream.len() {
                let cleared = scan_in_pieces(stream.as_bytes(), piece).unwrap();
                assert!(
                    cleared >= head.len() && cleared < head.len() + body.len(),
                    "{body:?} piece {piece}: cleared {cleared}"
                );
            }
        }
    }

    #[test]
    fn framing_headers_must_be_exact() {
        let refused = |head: &str, why| check(head, Err(why));
        // RFC 9110 §8.6: Content-Length is 1*DIGIT.
        for value in ["+5", "-1", "5 5", "0x5", "5,5", "", "99999999999999999999"] {
            refused(
                &format!("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: {value}\r\n\r\n"),
                Refusal::MalformedHead,
            );
        }
        // RFC 9112 §6.1/§6.3: chunked once, last.
        for te in [
            "Transfer-Encoding: chunked, identity",
            "Transfer-Encoding: xchunked",
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked",
            "Transfer-Encoding: chunked, chunked",
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: gzip",
            "Transfer-Encoding: ,",
        ] {
            refused(
                &format!("POST / HTTP/1.1\r\nHost: a\r\n{te}\r\n\r\n"),
                Refusal::MalformedHead,
            );
        }
        let ok = "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding:\tChunked \r\n\r\n0\r\n\r\n";
        check(ok, Ok(ok.len()));
        // RFC 9112 §3.2: exactly one valid Host in HTTP/1.1.
        for head in [
            "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: u@a\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a:80x\r\n\r\n",
            "GET / HTTP/1.0\r\nHost: a\r\nHost: a\r\n\r\n",
        ] {
            refused(head, Refusal::BadHost);
        }
        for head in [
            "GET / HTTP/1.0\r\n\r\n",
            "GET http://a/ HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost:\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a.example:80\r\n\r\n",
        ] {
            check(head, Ok(head.len()));
        }
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;
        use proptest::test_runner::TestCaseError;

        fn config() -> ProptestConfig {
            crate::testing::proptest_config(1_000)
        }

        /// Feeds `stream` in reads ending at `ends`; returns the verdict
        /// (bytes cleared, or the refusal) and the heads let through.
        fn scan_recording(stream: &[u8], ends: &[usize]) -> (Result<usize, Refusal>, Vec<Vec<u8>>) {
            let mut scanner = Scanner::new(1024);
            let mut handed = 0;
            for &end in ends {
                if let Err(refusal) = scanner.scan(&stream[handed..end]) {
                    return (Err(refusal), scanner.accepted);
                }
                handed += scanner.cleared;
                scanner.cleared = 0;
            }
            (Ok(handed), scanner.accepted)
        }

        /// An independent strict reading of a head the scanner let
        /// through: framing must be unambiguous (RFC 9112 §6.1, §6.3,
        /// RFC 9110 §8.6) and an HTTP/1.1 request has one Host (§3.2).
        fn oracle(head: &[u8]) -> Result<(), &'static str> {
            let mut fields = [httparse::EMPTY_HEADER; 100];
            let mut request = httparse::Request::new(&mut fields);
            if !matches!(request.parse(head), Ok(httparse::Status::Complete(n)) if n == head.len())
            {
                return Err("not exactly one complete head");
            }
            let named = |name: &str| {
                request
                    .headers
                    .iter()
                    .filter(|h| h.name.eq_ignore_ascii_case(name))
                    .map(|h| h.value)
                    .collect::<Vec<_>>()
            };
            let (lengths, codings, hosts) = (
                named("content-length"),
                named("transfer-encoding"),
                named("host"),
            );
            if !lengths.is_empty() && !codings.is_empty() {
                return Err("Content-Length with Transfer-Encoding");
            }
            if lengths.iter().any(|v| {
                v.trim_ascii().is_empty() || !v.trim_ascii().iter().all(u8::is_ascii_digit)
            }) || lengths
                .windows(2)
                .any(|w| w[0].trim_ascii() != w[1].trim_ascii())
            {
                return Err("invalid or conflicting Content-Length");
            }
            if !codings.is_empty() {
                let list: Vec<String> = codings
                    .iter()
                    .flat_map(|v| v.split(|&b| b == b','))
                    .map(|c| String::from_utf8_lossy(c.trim_ascii()).to_ascii_lowercase())
                    .collect();
                let chunked = list.iter().filter(|c| *c == "chunked").count();
                if list.last().map(String::as_str) != Some("chunked") || chunked != 1 {
                    return Err("Transfer-Encoding not ending in one chunked");
                }
                if request.version != Some(1) {
                    return Err("Transfer-Encoding in HTTP/1.0");
                }
            }
            if hosts.len() > 1 {
                return Err("not exactly one Host");
            }
            Ok(())
        }

        /// One change to a byte stream, in terms that matter to framing.
        #[derive(Debug, Clone)]
        enum Mutation {
            InsertByte(prop::sample::Index, u8),
            Delete(prop::sample::Index),
            InsertLine(prop::sample::Index, &'static str),
            DuplicateLine(prop::sample::Index),
            Flip(prop::sample::Index),
        }

        impl Mutation {
            fn apply(&self, stream: &mut Vec<u8>) {
                let line_starts: Vec<usize> = std::iter::once(0)
                    .chain(
                        stream
                            .iter()
                            .enumerate()
                            .filter(|(_, &b)| b == b'\n')
                            .map(|(i, _)| i + 1),
                    )
                    .filter(|&i| i < stream.len())
                    .collect();
                match self {
                    Mutation::InsertByte(at, b) => {
                        let at = at.index(stream.len() + 1);
                        stream.insert(at, *b);
                    }
                    Mutation::Delete(at) if !stream.is_empty() => {
                        let at = at.index(stream.len());
                        stream.remove(at);
                    }
                    Mutation::InsertLine(at, line) if !line_starts.is_empty() => {
                        let at = line_starts[at.index(line_starts.len())];
                        stream.splice(at..at, line.bytes());
                    }
                    Mutation::DuplicateLine(at) if !line_starts.is_empty() => {
                        let start = line_starts[at.index(line_starts.len())];
                        let end = stream[start..]
                            .iter()
                            .position(|&b| b == b'\n')
                            .map_or(stream.len(), |e| start + e + 1);
                        let line = stream[start..end].to_vec();
                        stream.splice(start..start, line);
                    }
                    Mutation::Flip(at) if !stream.is_empty() => {
                        let at = at.index(stream.len());
                        let b = stream[at];
                        stream[at] = if b.is_ascii_uppercase() {
                            b.to_ascii_lowercase()
                        } else {
                            b.to_ascii_uppercase()
                        };
                    }
                    _ => {}
                }
            }
        }

        fn mutation() -> impl Strategy<Value = Mutation> {
            let bytes = prop::sample::select(&b"\r\n\0 \t:;,x0\x0b\x7f\xff"[..]);
            let lines = prop::sample::select(vec![
                "Transfer-Encoding: chunked\r\n",
                "Transfer-Encoding: xchunked\r\n",
                "Transfer-Encoding: chunked, identity\r\n",
                "Transfer-Encoding:\tchunked\r\n",
                "Transfer-Encoding : chunked\r\n",
                " Transfer-Encoding: chunked\r\n",
                "Transfer-Encoding: chunked \r\n",
                "Content-Length: 5\r\n",
                "Content-Length: +5\r\n",
                "Content-Length: 0\r\n",
                "Host: b\r\n",
                "Upgrade: x\r\n",
                "X-Fold: a\r\n b\r\n",
                "\r\n",
                "0\r\n\r\n",
                "5;ext\r\nhello\r\n",
                "GET /smuggled HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            ]);
            prop_oneof![
                (any::<prop::sample::Index>(), bytes).prop_map(|(i, b)| Mutation::InsertByte(i, b)),
                any::<prop::sample::Index>().prop_map(Mutation::Delete),
                (any::<prop::sample::Index>(), lines).prop_map(|(i, l)| Mutation::InsertLine(i, l)),
                any::<prop::sample::Index>().prop_map(Mutation::DuplicateLine),
                any::<prop::sample::Index>().prop_map(Mutation::Flip),
            ]
        }

        /// One well-formed request: a GET, a sized POST, or a chunked POST
        /// with random chunk sizes, extensions and trailers.
        fn message() -> impl Strategy<Value = String> {
            let path = "/[a-z0-9]{0,12}";
            let body = "[a-zA-Z0-9 ]{0,40}";
            prop_oneof![
                path.prop_map(|p| format!("GET {p} HTTP/1.1\r\nHost: a\r\n\r\n")),
                (path, body).prop_map(|(p, b)| format!(
                    "POST {p} HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n{b}",
                    b.len()
                )),
                (path, prop::collection::vec(body, 0..4), any::<bool>()).prop_map(
                    |(p, chunks, trailer)| {
                        let mut m = format!(
                            "POST {p} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                        );
                        for c in chunks.iter().filter(|c| !c.is_empty()) {
                            m += &format!("{:x};ext=1\r\n{c}\r\n", c.len());
                        }
                        m += if trailer {
                            "0\r\nx-sum: 1\r\n\r\n"
                        } else {
                            "0\r\n\r\n"
                        };
                        m
                    }
                ),
            ]
        }

        proptest! {
            #![proptest_config(config())]

            /// However reads split a stream of valid requests, everything
            /// is cleared, and nothing is cleared early: the cleared prefix
            /// always ends on a message boundary or inside a body.
            #[test]
            fn valid_streams_pass_whole_in_any_pieces(
                messages in prop::collection::vec(message(), 1..5),
                piece in 1usize..64,
            ) {
                let stream = messages.concat();
                prop_assert_eq!(scan_in_pieces(stream.as_bytes(), piece), Ok(stream.len()));
            }

            /// Any bytes at all: the scanner neither panics nor clears more
            /// than it was given.
            #[test]
            fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512), piece in 1usize..64) {
                if let Ok(cleared) = scan_in_pieces(&bytes, piece) {
                    prop_assert!(cleared <= bytes.len());
                }
            }

            /// Structured mutations of valid streams (bytes and header lines
            /// that matter to framing, inserted, deleted, duplicated): the
            /// scanner never panics, every head it lets through has
            /// unambiguous framing, and its verdict does not depend on how
            /// reads split the input.
            #[test]
            fn mutated_streams_never_pass_ambiguous_framing(
                messages in prop::collection::vec(message(), 1..4),
                mutations in prop::collection::vec(mutation(), 1..4),
                split in any::<prop::sample::Index>(),
                piece in 1usize..64,
            ) {
                let mut stream = messages.concat().into_bytes();
                for m in &mutations {
                    m.apply(&mut stream);
                }
                let whole = scan_recording(&stream, &[stream.len()]);
                let at = split.index(stream.len() + 1);
                prop_assert_eq!(&scan_recording(&stream, &[at, stream.len()]).0, &whole.0);
                prop_assert_eq!(scan_in_pieces(&stream, piece), whole.0);
                for head in &whole.1 {
                    if let Err(why) = oracle(head) {
                        return Err(TestCaseError::fail(format!(
                            "{why}: {:?}", String::from_utf8_lossy(head)
                        )));
                    }
                }
            }

            /// Arbitrary bytes split at any one point: the same verdict as
            /// in one piece, and any head let through passes the oracle.
            #[test]
            fn arbitrary_bytes_verdict_is_stable_under_splitting(
                bytes in prop::collection::vec(prop_oneof![
                    4 => any::<u8>(),
                    6 => prop::sample::select(&b"\r\n :;,\t0aAGET/H1.TCLHchunked"[..]),
                ], 0..400),
                split in any::<prop::sample::Index>(),
            ) {
                let mut stream = b"POST / HTTP/1.1\r\nHost: a\r\n".to_vec();
                stream.extend_from_slice(&bytes);
                let whole = scan_recording(&stream, &[stream.len()]);
                let at = split.index(stream.len() + 1);
                prop_assert_eq!(&scan_recording(&stream, &[at, stream.len()]).0, &whole.0);
                for head in &whole.1 {
                    prop_assert!(oracle(head).is_ok(), "{:?}", String::from_utf8_lossy(head));
                }
            }

            /// Every message our own HTTP/1.1 server takes (it bypasses
            /// the guard: a head without a body, or with a sized body read
            /// whole) is one the guard clears whole, at the same length,
            /// ending on a message boundary, its head passing the oracle;
            /// anything else it leaves for the guard and hyper.
            #[test]
            fn messages_the_h1_server_takes_are_whole_messages_the_guard_clears(
                messages in prop::collection::vec(message(), 1..3),
                mutations in prop::collection::vec(mutation(), 0..4),
                max_head in prop::sample::select(vec![40usize, 64, 4096]),
            ) {
                let mut stream = messages.concat().into_bytes();
                for m in &mutations {
                    m.apply(&mut stream);
                }
                if let Some(len) = crate::listen::h1_server::takes(&stream, max_head) {
                    let mut scanner = Scanner::new(max_head);
                    let scanned = scanner.scan(&stream[..len]);
                    prop_assert!(scanned.is_ok(), "{:?}: {:?}", scanned, String::from_utf8_lossy(&stream[..len]));
                    prop_assert_eq!(scanner.cleared, len, "{:?}", String::from_utf8_lossy(&stream[..len]));
                    prop_assert_eq!(scanner.state, State::Head, "{:?}", String::from_utf8_lossy(&stream[..len]));
                    let mut fields = [httparse::EMPTY_HEADER; 128];
                    let head = match httparse::Request::new(&mut fields).parse(&stream[..len]) {
                        Ok(httparse::Status::Complete(head)) => head,
                        other => return Err(TestCaseError::fail(format!("{other:?}"))),
                    };
                    prop_assert!(oracle(&stream[..head]).is_ok());
                }
            }

            /// A smuggling head is refused wherever it sits in the stream.
            #[test]
            fn ambiguous_heads_are_refused_after_valid_messages(
                messages in prop::collection::vec(message(), 0..4),
                piece in 1usize..64,
            ) {
                let bad = "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n";
                let stream = messages.concat() + bad;
                prop_assert_eq!(scan_in_pieces(stream.as_bytes(), piece), Err(Refusal::AmbiguousFraming));
            }
        }
    }
}
