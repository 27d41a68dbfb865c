//! The HTTP/2 frame guard: a passive observer of the frames a client sends
//! on an HTTP/2 connection (h2c or the mesh hop's `h2`), for the abuse
//! limits h2 itself does not count per second.
//!
//! ```text
//! socket (or TLS stream) ─► H2Guard::poll_read ─► hyper/h2
//!                               │ FrameObserver: the 9-byte frame headers only
//!                               │ (type, flags, stream id); payloads skipped
//!                               ▼ limit breached
//!                         Tripped (reason) ─► server::drive_h2: graceful shutdown
//!                                             (GOAWAY), a short grace, dropped
//! ```
//!
//! The bytes are handed to hyper unchanged and unbuffered: the observer
//! keeps only the state of the frame it is in (header bytes seen so far,
//! payload bytes left), so a frame split across reads, padding and big
//! DATA frames cost nothing more. Per frame header it does a few integer
//! operations; the clock is read only for the frames that are rate
//! limited (`RST_STREAM`, `SETTINGS`, `PING`).
//!
//! Limits (`settings::Limits`, each 0 = off):
//! - `RST_STREAM` frames from the client per second (rapid reset,
//!   CVE-2023-44487): `--h2-max-resets-per-second`;
//! - `CONTINUATION` frames in one header block:
//!   `--h2-max-continuation-frames` (h2 also has its own cap, derived from
//!   the header list size; whichever is lower acts first);
//! - `SETTINGS` + `PING` frames per second: `--h2-max-control-frames-per-second`.
//!
//! On a breach the frame that broke the limit is withheld from hyper (the
//! read is cut at its first byte), no further bytes are read, and
//! [`Tripped`] wakes the connection's driver, which asks hyper for a
//! graceful shutdown (GOAWAY) and drops the connection after
//! [`ABUSE_GRACE`]. Windows are fixed one-second windows per connection
//! (at most twice the limit can pass across a window boundary), which is
//! enough to separate a flood (thousands per second) from any client.
//!
//! `--busy-poll` (`upstream::busy_poll`): the guard also sees when the
//! connection waits for a request. From a read that finds nothing while
//! no request of the connection is in flight (its last response sent)
//! until the next `HEADERS` frame it holds a next-request guard, so the
//! sidecar polls for an HTTP/2 client's next request (an h2c client, or
//! another sidecar over the mesh hop) as it does for a kept-alive
//! HTTP/1.1 client's. A read that finds nothing while requests are in
//! flight asks to be woken when the last one ends, to start the guard
//! then; a connection that closes while waiting cancels its guard (no
//! arrival counted).

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;

use crate::listen::framing::InFlightRequests;
use crate::upstream::busy_poll;

/// How long an abusive connection's in-flight streams may still run after
/// the GOAWAY before the connection is dropped.
pub const ABUSE_GRACE: Duration = Duration::from_millis(500);

/// The client connection preface (RFC 9113 §3.4), skipped before frames.
const PREFACE_LEN: usize = 24;
const FRAME_HEADER_LEN: usize = 9;

const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PUSH_PROMISE: u8 = 0x5;
const PING: u8 = 0x6;
const CONTINUATION: u8 = 0x9;
const END_HEADERS: u8 = 0x4;

/// Why an HTTP/2 connection was closed by the sidecar: the `reason` label
/// of `meshlet_h2_connections_closed_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum CloseReason {
    RapidReset = 1,
    ContinuationFlood = 2,
    ControlFrameFlood = 3,
    Idle = 4,
    KeepaliveTimeout = 5,
    ProtocolError = 6,
}

impl CloseReason {
    pub const ALL: [CloseReason; 6] = [
        CloseReason::RapidReset,
        CloseReason::ContinuationFlood,
        CloseReason::ControlFrameFlood,
        CloseReason::Idle,
        CloseReason::KeepaliveTimeout,
        CloseReason::ProtocolError,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::RapidReset => "rapid_reset",
            CloseReason::ContinuationFlood => "continuation_flood",
            CloseReason::ControlFrameFlood => "control_frame_flood",
            CloseReason::Idle => "idle",
            CloseReason::KeepaliveTimeout => "keepalive_timeout",
            CloseReason::ProtocolError => "protocol_error",
        }
    }

    /// Index into [`CloseReason::ALL`].
    pub fn index(self) -> usize {
        self as usize - 1
    }

    fn from_u8(value: u8) -> Option<Self> {
        CloseReason::ALL
            .get(usize::from(value).checked_sub(1)?)
            .copied()
    }
}

/// The observer's limits (0 = off).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameLimits {
    pub resets_per_second: u32,
    pub continuation_frames: u32,
    pub control_frames_per_second: u32,
}

/// A count per fixed one-second window.
#[derive(Debug, Default)]
struct Rate {
    window_start: Option<Instant>,
    count: u32,
}

impl Rate {
    /// Counts one at `now`; true if that makes more than `max` in the
    /// current window (`max` 0: never).
    fn exceeded(&mut self, now: Instant, max: u32) -> bool {
        if max == 0 {
            return false;
        }
        match self.window_start {
            Some(start) if now.saturating_duration_since(start) < Duration::from_secs(1) => {}
            _ => {
                self.window_start = Some(now);
                self.count = 0;
            }
        }
        self.count += 1;
        self.count > max
    }
}

/// A limit broken: `at` is where the offending frame starts in the bytes
/// given to [`FrameObserver::observe`] (0 if it began in an earlier read).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Breach {
    pub at: usize,
    pub reason: CloseReason,
}

/// Follows the frame headers of a client's byte stream; see the module docs.
#[derive(Debug)]
pub struct FrameObserver {
    limits: FrameLimits,
    preface_left: usize,
    /// A frame header split across reads: its bytes so far.
    header: [u8; FRAME_HEADER_LEN],
    header_len: usize,
    /// Payload bytes of the current frame not seen yet.
    payload_left: usize,
    /// `CONTINUATION` frames of the open header block; `None`: no block open.
    continuations: Option<u32>,
    resets: Rate,
    control: Rate,
    /// A `HEADERS` frame began since [`FrameObserver::take_headers_seen`].
    headers_seen: bool,
}

impl FrameObserver {
    pub fn new(limits: FrameLimits) -> Self {
        FrameObserver {
            limits,
            preface_left: PREFACE_LEN,
            header: [0; FRAME_HEADER_LEN],
            header_len: 0,
            payload_left: 0,
            continuations: None,
            resets: Rate::default(),
            control: Rate::default(),
            headers_seen: false,
        }
    }

    /// Whether a `HEADERS` frame (a new request, or a request's trailers)
    /// began since the last call.
    pub fn take_headers_seen(&mut self) -> bool {
        std::mem::take(&mut self.headers_seen)
    }

    /// Whether a header block (HEADERS or PUSH_PROMISE without
    /// END_HEADERS) is open, waiting for CONTINUATION frames.
    pub fn in_header_block(&self) -> bool {
        self.continuations.is_some()
    }

    /// Observes the next `bytes` of the stream; `now` is read at most once
    /// per call, and only for a rate-limited frame.
    pub fn observe(
        &mut self,
        bytes: &[u8],
        now: &mut impl FnMut() -> Instant,
    ) -> Result<(), Breach> {
        let mut at = 0;
        if self.preface_left > 0 {
            let skip = self.preface_left.min(bytes.len());
            self.preface_left -= skip;
            at = skip;
        }
        let mut clock = None;
        while at < bytes.len() {
            if self.payload_left > 0 {
                let skip = self.payload_left.min(bytes.len() - at);
                self.payload_left -= skip;
                at += skip;
                continue;
            }
            // A frame header: whole in this read (the usual case), or
            // completed from the bytes kept from earlier reads.
            let header_start = at.saturating_sub(self.header_len);
            let header: [u8; FRAME_HEADER_LEN] =
                if self.header_len == 0 && bytes.len() - at >= FRAME_HEADER_LEN {
                    let header = bytes[at..at + FRAME_HEADER_LEN]
                        .try_into()
                        .expect("nine bytes");
                    at += FRAME_HEADER_LEN;
                    header
                } else {
                    let take = (FRAME_HEADER_LEN - self.header_len).min(bytes.len() - at);
                    self.header[self.header_len..self.header_len + take]
                        .copy_from_slice(&bytes[at..at + take]);
                    self.header_len += take;
                    at += take;
                    if self.header_len < FRAME_HEADER_LEN {
                        break;
                    }
                    self.header_len = 0;
                    self.header
                };
            self.payload_left =
                usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2]);
            let (kind, flags) = (header[3], header[4]);
            let mut now = || *clock.get_or_insert_with(&mut *now);
            if let Some(reason) = self.frame(kind, flags, &mut now) {
                return Err(Breach {
                    at: header_start,
                    reason,
                });
            }
        }
        Ok(())
    }

    /// Counts one frame of type `kind`; the reason if a limit is broken.
    fn frame(
        &mut self,
        kind: u8,
        flags: u8,
        now: &mut impl FnMut() -> Instant,
    ) -> Option<CloseReason> {
        match kind {
            HEADERS | PUSH_PROMISE => {
                self.headers_seen |= kind == HEADERS;
                self.continuations = (flags & END_HEADERS == 0).then_some(0);
            }
            CONTINUATION => {
                let count = self.continuations.unwrap_or(0) + 1;
                let max = self.limits.continuation_frames;
                if max != 0 && count > max {
                    return Some(CloseReason::ContinuationFlood);
                }
                self.continuations = (flags & END_HEADERS == 0).then_some(count);
            }
            RST_STREAM if self.resets.exceeded(now(), self.limits.resets_per_second) => {
                return Some(CloseReason::RapidReset);
            }
            SETTINGS | PING
                if self
                    .control
                    .exceeded(now(), self.limits.control_frames_per_second) =>
            {
                return Some(CloseReason::ControlFrameFlood);
            }
            _ => {}
        }
        None
    }
}

/// Shared between a connection's [`H2Guard`] and its driver: why (if) the
/// guard tripped, and whether a header block is open (to tell h2's own
/// CONTINUATION cap from its other ENHANCE_YOUR_CALM closes).
#[derive(Debug, Default)]
pub struct Tripped {
    reason: AtomicU8,
    in_header_block: AtomicBool,
    notify: Notify,
}

impl Tripped {
    /// The reason the guard tripped, if it did.
    pub fn reason(&self) -> Option<CloseReason> {
        CloseReason::from_u8(self.reason.load(Ordering::Acquire))
    }

    /// Completes once the guard has tripped.
    pub async fn wait(&self) -> CloseReason {
        loop {
            let notified = self.notify.notified();
            if let Some(reason) = self.reason() {
                return reason;
            }
            notified.await;
        }
    }

    /// Whether the client was in the middle of a header block.
    pub fn in_header_block(&self) -> bool {
        self.in_header_block.load(Ordering::Relaxed)
    }

    fn trip(&self, reason: CloseReason) {
        let _ = self
            .reason
            .compare_exchange(0, reason as u8, Ordering::AcqRel, Ordering::Acquire);
        self.notify.notify_one();
    }
}

/// Wraps the I/O of an HTTP/2 server connection; see the module docs.
pub struct H2Guard<T> {
    inner: T,
    observer: FrameObserver,
    tripped: Arc<Tripped>,
    /// The connection's requests in flight (a next request is awaited
    /// only when none is).
    in_flight: Arc<InFlightRequests>,
    /// Requests started when the last `HEADERS` frame arrived, plus one:
    /// until that many have started and none is in flight, the request of
    /// that frame (hyper starts it after this read) is still to answer.
    answered_after: usize,
    /// `--busy-poll`: held from a read that found nothing with no request
    /// in flight until a `HEADERS` frame arrives.
    awaiting: Option<busy_poll::Awaiting>,
    /// Whether next requests are polled for at all (not on the admin
    /// listener).
    polls_for_next_requests: bool,
}

impl<T> Drop for H2Guard<T> {
    fn drop(&mut self) {
        if let Some(awaiting) = self.awaiting.take() {
            awaiting.cancel();
        }
    }
}

impl<T> std::fmt::Debug for H2Guard<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2Guard")
            .field("observer", &self.observer)
            .field("awaiting", &self.awaiting.is_some())
            .finish_non_exhaustive()
    }
}

impl<T> H2Guard<T> {
    pub fn new(
        inner: T,
        limits: FrameLimits,
        tripped: Arc<Tripped>,
        in_flight: Arc<InFlightRequests>,
    ) -> Self {
        H2Guard {
            inner,
            observer: FrameObserver::new(limits),
            tripped,
            in_flight,
            answered_after: 0,
            awaiting: None,
            polls_for_next_requests: true,
        }
    }

    /// With `--busy-poll`: whether the client's next request is polled for
    /// once every request is answered (see
    /// [`crate::listen::server::Handler`]); yes unless told.
    pub fn polls_for_next_requests(mut self, polls: bool) -> Self {
        self.polls_for_next_requests = polls;
        self
    }

    /// A read found nothing: with busy polling on and no request in
    /// flight, the connection now waits for its next request.
    fn nothing_to_read(&mut self, cx: &Context<'_>) {
        if self.awaiting.is_none()
            && self.polls_for_next_requests
            && busy_poll::enabled()
            && self
                .in_flight
                .all_answered_or_wake_later(self.answered_after, cx)
        {
            self.awaiting = Some(busy_poll::awaiting_next_request());
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for H2Guard<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.tripped.reason().is_some() {
            // The driver closes the connection; read nothing more of it.
            return Poll::Pending;
        }
        let before = buf.filled().len();
        let read = Pin::new(&mut this.inner).poll_read(cx, buf);
        if read.is_pending() {
            this.nothing_to_read(cx);
            return Poll::Pending;
        }
        std::task::ready!(read)?;
        let was_in_block = this.observer.in_header_block();
        let result = this
            .observer
            .observe(&buf.filled()[before..], &mut Instant::now);
        if this.observer.take_headers_seen() {
            // A request arrived: the wait for it ends here.
            this.awaiting = None;
            this.answered_after = this.in_flight.started() + 1;
        }
        if this.observer.in_header_block() != was_in_block {
            this.tripped
                .in_header_block
                .store(this.observer.in_header_block(), Ordering::Relaxed);
        }
        if let Err(breach) = result {
            tracing::debug!(reason = breach.reason.as_str(), "HTTP/2 limit broken");
            buf.set_filled(before + breach.at);
            this.tripped.trip(breach.reason);
            if breach.at == 0 {
                // Nothing to hand over; an empty read would look like EOF.
                return Poll::Pending;
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for H2Guard<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Classifies an error that ended an HTTP/2 server connection: the
/// reason to count, or `None` for what the client did to itself (closed,
/// reset, sent GOAWAY) or an I/O error.
pub fn classify(error: &hyper::Error, tripped: &Tripped) -> Option<CloseReason> {
    if error.is_timeout() {
        // hyper's keep-alive PING got no answer in time.
        return Some(CloseReason::KeepaliveTimeout);
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(err) = source {
        if let Some(h2) = err.downcast_ref::<h2::Error>() {
            if !(h2.is_go_away() && h2.is_library()) {
                return None;
            }
            return Some(match h2.reason() {
                Some(h2::Reason::ENHANCE_YOUR_CALM) if tripped.in_header_block() => {
                    CloseReason::ContinuationFlood
                }
                // h2's own caps: resets of streams not yet accepted, or
                // streams it had to reset itself for the client's errors.
                Some(h2::Reason::ENHANCE_YOUR_CALM) => CloseReason::RapidReset,
                _ => CloseReason::ProtocolError,
            });
        }
        source = err.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut bytes = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        bytes.extend_from_slice(&stream.to_be_bytes());
        bytes.extend_from_slice(payload);
        bytes
    }

    fn limits(resets: u32, continuations: u32, control: u32) -> FrameLimits {
        FrameLimits {
            resets_per_second: resets,
            continuation_frames: continuations,
            control_frames_per_second: control,
        }
    }

    /// Feeds `bytes` in chunks of `chunk` bytes at time `now`.
    fn feed(
        observer: &mut FrameObserver,
        bytes: &[u8],
        chunk: usize,
        now: Instant,
    ) -> Result<(), (usize, CloseReason)> {
        for (i, piece) in bytes.chunks(chunk).enumerate() {
            observer
                .observe(piece, &mut || now)
                .map_err(|b| (i * chunk + b.at, b.reason))?;
        }
        Ok(())
    }

    /// Where a breach at the frame starting at `start` is reported when
    /// the stream comes in chunks of `chunk` bytes: its start, or the
    /// start of the read that completed its header.
    fn reported(start: usize, chunk: usize) -> usize {
        start.max((start + FRAME_HEADER_LEN - 1) / chunk * chunk)
    }

    fn resets(n: u32) -> Vec<u8> {
        (0..n)
            .flat_map(|i| {
                let mut f = frame(HEADERS, 0x5, 2 * i + 1, &[0x82, 0x86, 0x84]);
                f.extend(frame(RST_STREAM, 0, 2 * i + 1, &8u32.to_be_bytes()));
                f
            })
            .collect()
    }

    #[test]
    fn well_behaved_traffic_split_anywhere_passes() {
        let mut stream = PREFACE.to_vec();
        stream.extend(frame(SETTINGS, 0, 0, &[0, 3, 0, 0, 0, 100]));
        stream.extend(frame(SETTINGS, 1, 0, &[]));
        // HEADERS with padding, two CONTINUATIONs, a big DATA frame whose
        // payload looks like frame headers (it must be skipped).
        stream.extend(frame(HEADERS, 0x8, 1, &[4, 0x82, 0x86, 0, 0, 0, 0]));
        stream.extend(frame(CONTINUATION, 0, 1, &[0x84]));
        stream.extend(frame(CONTINUATION, END_HEADERS, 1, &[0x41, 1, b'x']));
        let fake_headers = frame(RST_STREAM, 0, 1, &[0, 0, 0, 8]).repeat(2000);
        stream.extend(frame(0x0, 0x1, 1, &fake_headers));
        stream.extend(frame(PING, 0, 0, &[0; 8]));
        stream.extend(resets(3));
        let now = Instant::now();
        for chunk in [1, 2, 7, 9, 10, 100, 16_384, stream.len()] {
            let mut observer = FrameObserver::new(limits(3, 2, 3));
            assert_eq!(
                feed(&mut observer, &stream, chunk, now),
                Ok(()),
                "chunk {chunk}"
            );
            assert!(!observer.in_header_block());
            assert_eq!(observer.payload_left, 0);
            assert_eq!(observer.header_len, 0);
        }
    }

    #[test]
    fn resets_beyond_the_rate_break_at_the_offending_frame() {
        let now = Instant::now();
        let mut stream = PREFACE.to_vec();
        stream.extend(resets(11));
        let offending = stream.len() - 13;
        for chunk in [1, 5, 9, 64, stream.len()] {
            let mut observer = FrameObserver::new(limits(10, 0, 0));
            assert_eq!(
                feed(&mut observer, &stream, chunk, now),
                Err((reported(offending, chunk), CloseReason::RapidReset)),
                "chunk {chunk}"
            );
        }
        // Ten per second, every second, pass: the window restarts.
        let mut observer = FrameObserver::new(limits(10, 0, 0));
        observer.observe(PREFACE, &mut || now).unwrap();
        for second in 0..5 {
            let at = now + Duration::from_millis(1000 * second + 10);
            assert_eq!(feed(&mut observer, &resets(10), 50, at), Ok(()));
        }
        // 0 = off.
        let mut observer = FrameObserver::new(limits(0, 0, 0));
        let mut stream = PREFACE.to_vec();
        stream.extend(resets(1000));
        assert_eq!(feed(&mut observer, &stream, 4096, now), Ok(()));
    }

    #[test]
    fn continuation_frames_are_counted_per_header_block() {
        let now = Instant::now();
        let block = |continuations: usize| {
            let mut bytes = frame(HEADERS, 0, 1, &[0x82]);
            for _ in 1..continuations {
                bytes.extend(frame(CONTINUATION, 0, 1, &[0x86]));
            }
            bytes.extend(frame(CONTINUATION, END_HEADERS, 1, &[0x84]));
            bytes
        };
        let mut stream = PREFACE.to_vec();
        // Two blocks at the limit pass: the count restarts per block.
        stream.extend(block(4));
        stream.extend(frame(HEADERS, END_HEADERS, 3, &[0x82]));
        stream.extend(block(4));
        let mut observer = FrameObserver::new(limits(0, 4, 0));
        assert_eq!(feed(&mut observer, &stream, 3, now), Ok(()));
        // The fifth CONTINUATION breaks it, and never reaches hyper.
        let mut observer = FrameObserver::new(limits(0, 4, 0));
        let flood = [PREFACE.to_vec(), block(5)].concat();
        let fifth = flood.len() - 10;
        assert_eq!(
            feed(&mut observer, &flood, flood.len(), now),
            Err((fifth, CloseReason::ContinuationFlood))
        );
        assert!(observer.in_header_block());
    }

    #[test]
    fn settings_and_ping_floods_are_counted_together() {
        let now = Instant::now();
        let mut stream = PREFACE.to_vec();
        for i in 0..6 {
            if i % 2 == 0 {
                stream.extend(frame(SETTINGS, 0, 0, &[]));
            } else {
                stream.extend(frame(PING, 0, 0, &[i; 8]));
            }
        }
        let mut observer = FrameObserver::new(limits(0, 0, 5));
        let sixth = stream.len() - 17;
        assert_eq!(
            feed(&mut observer, &stream, 8, now),
            Err((reported(sixth, 8), CloseReason::ControlFrameFlood))
        );
        let mut observer = FrameObserver::new(limits(0, 0, 6));
        assert_eq!(feed(&mut observer, &stream, 8, now), Ok(()));
    }

    #[test]
    fn close_reasons_match_the_metric_labels() {
        let labels: Vec<&str> = CloseReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(labels, crate::telemetry::metrics::H2_CLOSE_REASONS);
        for (i, reason) in CloseReason::ALL.into_iter().enumerate() {
            assert_eq!(reason.index(), i);
            assert_eq!(CloseReason::from_u8(reason as u8), Some(reason));
        }
        assert_eq!(CloseReason::from_u8(0), None);
    }

    /// The cost of watching: frames per second through the observer, for
    /// small frames (the worst case: one header per 9 + 8 bytes) and 16 KiB
    /// DATA frames. Run by hand (`--ignored --nocapture`, best with
    /// `--release`).
    #[test]
    #[ignore]
    fn observer_throughput() {
        let small = frame(0x0, 0, 1, &[0; 8]).repeat(4096);
        let big = frame(0x0, 0, 1, &[0; 16_384]).repeat(64);
        for (name, bytes, frames) in [("8-byte DATA", &small, 4096), ("16 KiB DATA", &big, 64)] {
            let mut observer = FrameObserver::new(limits(100, 16, 100));
            observer.observe(PREFACE, &mut Instant::now).unwrap();
            let rounds = 2000;
            let started = Instant::now();
            for _ in 0..rounds {
                for read in bytes.chunks(16 * 1024) {
                    observer.observe(read, &mut Instant::now).unwrap();
                }
            }
            let elapsed = started.elapsed();
            let per_frame = elapsed / (rounds * frames);
            let gbps = (bytes.len() as f64 * f64::from(rounds)) / elapsed.as_secs_f64() / 1e9;
            eprintln!("{name}: {per_frame:?} per frame, {gbps:.1} GB/s");
        }
    }

    #[tokio::test]
    async fn the_guard_withholds_the_offending_frame_and_trips() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let tripped = Arc::new(Tripped::default());
        let mut guard = H2Guard::new(
            server,
            limits(2, 0, 0),
            Arc::clone(&tripped),
            Arc::default(),
        );
        let mut stream = PREFACE.to_vec();
        stream.extend(resets(3));
        client.write_all(&stream).await.unwrap();
        let mut seen = vec![0; stream.len()];
        let n = guard.read(&mut seen).await.unwrap();
        assert_eq!(n, stream.len() - 13, "the third RST_STREAM is withheld");
        assert_eq!(tripped.wait().await, CloseReason::RapidReset);
        client.write_all(&frame(PING, 0, 0, &[0; 8])).await.unwrap();
        let more = tokio::time::timeout(Duration::from_millis(50), guard.read(&mut seen)).await;
        assert!(more.is_err(), "nothing more is read after a breach");
    }
}
