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
//! `x-meshlet-reason: header_too_large`: the guard is the one component
//! that sees a head before it is complete, so it enforces the size too.
//!
//! Because it sees a head arrive, the guard also times it: a head must be
//! complete within the header read timeout of its first byte (slowloris),
//! while an idle connection between requests is hyper's business (its head
//! timer, set to the longer client idle timeout).
//!
//! The guard only needs to find where messages start; it leaves every other
//! judgement to hyper. Anything it does not understand (a head hyper will
//! reject anyway, an upgraded or `CONNECT` connection) switches it to
//! *opaque*: from then on bytes pass through untouched.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll, Waker};
use std::time::Duration;

use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// Initial size of the per-connection buffer used while looking for a head
/// (most heads are far smaller; it grows for larger ones, up to the limit).
const READ_CHUNK: usize = 4 * 1024;

/// Requests of one client connection that have not been fully answered.
/// The guard must not end hyper's input while one is in flight (hyper would
/// abandon it), so on a refusal it waits for this to reach zero.
#[derive(Debug, Default)]
pub struct InFlightRequests {
    count: AtomicUsize,
    waiting_reader: Mutex<Option<Waker>>,
    /// When the count last went to zero (`None`: not since the connection
    /// opened); HTTP/2's idle limit reads it (`h2_guard`).
    went_idle: Mutex<Option<Instant>>,
}

impl InFlightRequests {
    /// Counts one request until the returned guard is dropped (with the
    /// response body, once sent).
    pub fn start(self: &Arc<Self>) -> RequestGuard {
        self.count.fetch_add(1, Ordering::AcqRel);
        RequestGuard(Arc::clone(self))
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
                *at = Some(Instant::now());
            }
            if let Some(waker) = self.0.waiting_reader.lock().ok().and_then(|mut w| w.take()) {
                waker.wake();
            }
        }
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
}

/// Per-listener settings of the guard, shared by its connections.
#[derive(Debug)]
pub struct GuardConfig {
    /// Longest request head accepted, in bytes.
    pub max_head: usize,
    /// Time from a head's first byte to its end (slowloris guard).
    pub head_timeout: Duration,
    pub ambiguous_framing: RefusalAnswer,
    pub head_too_large: RefusalAnswer,
    pub malformed_head: RefusalAnswer,
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
        }
    }
}

impl<T> FramingGuard<T> {
    pub fn new(inner: T, config: Arc<GuardConfig>, in_flight: Arc<InFlightRequests>) -> Self {
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
            in_flight,
        }
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
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut spare))?;
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
            let deadline = Instant::now() + self.config.head_timeout;
            match &mut self.head_timer {
                Some(timer) => timer.as_mut().reset(deadline),
                None => self.head_timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
        }
        self.head_timer
            .as_mut()
            .is_some_and(|timer| timer.as_mut().poll(cx).is_ready())
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
}

/// Position inside chunked framing (RFC 9112 §7.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    Size { size: u64, digits: u8 },
    Extension { size: u64 },
    SizeLf { size: u64 },
    Data(u64),
    DataCr,
    DataLf,
    TrailerLineStart,
    TrailerLine,
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
}

impl Scanner {
    fn new(max_head: usize) -> Self {
        Scanner {
            state: State::Head,
            cleared: 0,
            head_search_from: 0,
            max_head,
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
                        Some(len) if len > self.max_head => return Err(Refusal::HeadTooLarge),
                        Some(len) => {
                            self.state = self.inspect_head(&rest[..len])?;
                            self.cleared += len;
                            self.head_search_from = 0;
                        }
                        None if rest.len() > self.max_head => return Err(Refusal::HeadTooLarge),
                        None => {
                            self.head_search_from = rest.len().saturating_sub(3);
                            return Ok(());
                        }
                    }
                }
            }
        }
    }

    /// Decides how the message after this complete head is framed.
    fn inspect_head(&self, head: &[u8]) -> Result<State, Refusal> {
        // hyper's default limit on header fields; beyond it hyper answers 431.
        let mut headers = [httparse::EMPTY_HEADER; 100];
        let mut request = httparse::Request::new(&mut headers);
        match request.parse(head) {
            Ok(httparse::Status::Complete(_)) => {}
            Ok(httparse::Status::Partial) => return Ok(State::Opaque),
            // hyper parses with httparse's defaults too, so it would refuse
            // these the same way, but without saying why.
            Err(httparse::Error::TooManyHeaders) => return Err(Refusal::HeadTooLarge),
            Err(_) => return Err(Refusal::MalformedHead),
        }
        let (mut length, mut has_length, mut has_te, mut chunked, mut upgrade) =
            (None, false, false, false, false);
        for header in request.headers.iter() {
            let name = header.name;
            if name.eq_ignore_ascii_case("content-length") {
                let this_length = std::str::from_utf8(header.value)
                    .ok()
                    .and_then(|v| v.trim().parse::<u64>().ok());
                // Unparsable, or a second one that disagrees: hyper refuses
                // these too (RFC 9112 §6.3), we say why.
                if this_length.is_none() || (has_length && this_length != length) {
                    return Err(Refusal::MalformedHead);
                }
                has_length = true;
                length = this_length;
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                has_te = true;
                chunked = header
                    .value
                    .rsplit(|&b| b == b',')
                    .next()
                    .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
            } else if name.eq_ignore_ascii_case("upgrade") {
                upgrade = true;
            }
        }
        if has_length && has_te {
            return Err(Refusal::AmbiguousFraming);
        }
        // Transfer-Encoding must end in chunked, and does not exist in HTTP/1.0.
        if has_te && (!chunked || request.version == Some(0)) {
            return Err(Refusal::MalformedHead);
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

/// Length of the head at the start of `bytes` (through its empty line), if
/// complete. Accepts bare `\n` line ends as httparse does.
fn find_head_end(bytes: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    while i < bytes.len() {
        if bytes[i] == b'\n' {
            match bytes.get(i + 1) {
                Some(b'\n') => return Some(i + 2),
                Some(b'\r') if bytes.get(i + 2) == Some(&b'\n') => return Some(i + 3),
                _ => {}
            }
        }
        i += 1;
    }
    None
}

/// Advances through chunked framing; returns bytes used and the new state.
fn chunk_step(mut chunk: Chunk, bytes: &[u8]) -> (usize, State) {
    let malformed = |used| (used, State::Opaque); // hyper reports it
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
                b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' if digits < 16 => {
                    let value = (byte as char).to_digit(16).unwrap_or(0) as u64;
                    Chunk::Size {
                        size: size * 16 + value,
                        digits: digits + 1,
                    }
                }
                b';' | b' ' | b'\t' if digits > 0 => Chunk::Extension { size },
                b'\r' if digits > 0 => Chunk::SizeLf { size },
                b'\n' if digits > 0 => after_size_line(size),
                _ => return malformed(used),
            },
            Chunk::Extension { size } => match byte {
                b'\r' => Chunk::SizeLf { size },
                b'\n' => after_size_line(size),
                _ => Chunk::Extension { size },
            },
            Chunk::SizeLf { size } if byte == b'\n' => after_size_line(size),
            Chunk::DataCr if byte == b'\r' => Chunk::DataLf,
            Chunk::DataCr | Chunk::DataLf if byte == b'\n' => Chunk::Size { size: 0, digits: 0 },
            Chunk::TrailerLineStart => match byte {
                b'\r' => Chunk::FinalLf,
                b'\n' => return (used + 1, State::Head),
                _ => Chunk::TrailerLine,
            },
            Chunk::TrailerLine if byte == b'\n' => Chunk::TrailerLineStart,
            Chunk::TrailerLine => Chunk::TrailerLine,
            Chunk::FinalLf if byte == b'\n' => return (used + 1, State::Head),
            Chunk::SizeLf { .. } | Chunk::DataCr | Chunk::DataLf | Chunk::FinalLf => {
                return malformed(used)
            }
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
    use super::*;

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
    fn clears_complete_messages_and_holds_back_partial_heads() {
        let get = "GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        check(get, Ok(get.len()));
        check(
            &format!("{get}{get}GET /partial HTTP/1.1\r\nHo"),
            Ok(2 * get.len()),
        );
        let post = "POST /x HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello";
        check(&format!("{post}{get}"), Ok(post.len() + get.len()));
        // The body is cleared even before the next head is complete.
        check(&format!("{post}GET"), Ok(post.len()));
        // Bare LF line ends and blank lines between messages.
        let lf = "GET / HTTP/1.1\nHost: a\n\n";
        check(&format!("\r\n{lf}"), Ok(lf.len() + 2));
    }

    #[test]
    fn follows_chunked_framing_with_extensions_and_trailers() {
        let chunked = "POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n\
                       5;ext=1\r\nhello\r\nA\r\n0123456789\r\n0\r\nx-sum: 1\r\n\r\n";
        let get = "GET / HTTP/1.1\r\n\r\n";
        check(&format!("{chunked}{get}"), Ok(chunked.len() + get.len()));
        // A smuggled second head inside a chunk is body, not a head.
        let hidden = "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n\
                      30\r\nGET /x HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Enc\r\n0\r\n\r\n";
        check(hidden, Ok(hidden.len()));
    }

    #[test]
    fn refuses_content_length_with_transfer_encoding_in_either_order() {
        check(
            "POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            Err(Refusal::AmbiguousFraming),
        );
        check(
            "POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\ncontent-length: 5\r\n\r\n",
            Err(Refusal::AmbiguousFraming),
        );
        // ... also when it is the second message on the connection.
        check("GET / HTTP/1.1\r\n\r\nPOST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", Err(Refusal::AmbiguousFraming));
    }

    #[test]
    fn passes_upgraded_and_tunnelled_bytes_untouched() {
        // After an upgrade or CONNECT head the bytes are no longer HTTP.
        for stream in [
            "GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n\x01\x05hello",
            "CONNECT a:443 HTTP/1.1\r\n\r\n\x16\x03\x01",
        ] {
            check(stream, Ok(stream.len()));
        }
    }

    #[test]
    fn refuses_heads_that_are_not_http() {
        for head in [
            "GARBAGE\r\n\r\n",
            "GET / HTTP/9.9\r\n\r\n",
            "GET /a b HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nbad header\r\n\r\n",
        ] {
            check(head, Err(Refusal::MalformedHead));
        }
        // Framing hyper would refuse as well.
        for head in [
            "POST / HTTP/1.1\r\nContent-Length: 5x\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
            "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            check(head, Err(Refusal::MalformedHead));
        }
        let twice = "POST / HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok";
        check(twice, Ok(twice.len()));
        let many: String = (0..101).map(|i| format!("x{i}: 1\r\n")).collect();
        check(
            &format!("GET / HTTP/1.1\r\n{many}\r\n"),
            Err(Refusal::HeadTooLarge),
        );
    }

    #[test]
    fn refuses_heads_over_the_limit_complete_or_not() {
        let long = format!("GET / HTTP/1.1\r\nx: {}\r\n", "a".repeat(2000));
        assert_eq!(
            scan_in_pieces(long.as_bytes(), 4096),
            Err(Refusal::HeadTooLarge)
        );
        let complete = format!("{long}\r\n");
        assert_eq!(
            scan_in_pieces(complete.as_bytes(), 4096),
            Err(Refusal::HeadTooLarge)
        );
        let fits = format!("GET / HTTP/1.1\r\nx: {}\r\n\r\n", "a".repeat(900));
        check(&fits, Ok(fits.len()));
    }

    #[test]
    fn direct_reads_follow_body_extent() {
        let mut scanner = Scanner::new(1024);
        scanner
            .scan(b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\n")
            .unwrap();
        assert_eq!(scanner.direct_read_limit(), Some(10));
        scanner.consume_direct(4);
        assert_eq!(scanner.direct_read_limit(), Some(6));
        scanner.consume_direct(6);
        assert_eq!(scanner.state, State::Head);
        assert_eq!(scanner.direct_read_limit(), None);
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// One well-formed request: a GET, a sized POST, or a chunked POST
        /// with random chunk sizes, extensions and trailers.
        fn message() -> impl Strategy<Value = String> {
            let path = "/[a-z0-9]{0,12}";
            let body = "[a-zA-Z0-9 ]{0,40}";
            prop_oneof![
                path.prop_map(|p| format!("GET {p} HTTP/1.1\r\nHost: a\r\n\r\n")),
                (path, body).prop_map(|(p, b)| format!(
                    "POST {p} HTTP/1.1\r\nContent-Length: {}\r\n\r\n{b}",
                    b.len()
                )),
                (path, prop::collection::vec(body, 0..4), any::<bool>()).prop_map(
                    |(p, chunks, trailer)| {
                        let mut m =
                            format!("POST {p} HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n");
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

            /// A smuggling head is refused wherever it sits in the stream.
            #[test]
            fn ambiguous_heads_are_refused_after_valid_messages(
                messages in prop::collection::vec(message(), 0..4),
                piece in 1usize..64,
            ) {
                let bad = "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n";
                let stream = messages.concat() + bad;
                prop_assert_eq!(scan_in_pieces(stream.as_bytes(), piece), Err(Refusal::AmbiguousFraming));
            }
        }
    }
}
