//! Upstream HTTP/1.1 sockets that never make the app wait for our ACK of a
//! response head.
//!
//! Why: an app with Nagle's algorithm on (no `TCP_NODELAY`, e.g. Python's
//! `http.server`) that writes a response in two segments (head, then body)
//! holds the second one in its kernel until the first is acknowledged. On a
//! kept-alive connection Linux's receive side is in delayed-ACK
//! ("ping-pong") mode, because request and response alternate, so the ACK of
//! the head waits for the delayed-ACK timer (40 ms minimum) — the proxy has
//! nothing to send back while it waits for the body. Every response on a
//! reused upstream connection then pays ~40 ms, through nginx as well.
//!
//! What: [`QuickAck`] wraps an upstream `TcpStream`. When the last read
//! that returned data ended exactly at the end of a head (`\r\n\r\n`) and
//! the next read would block (we have the head and wait for the body), it
//! sets `TCP_QUICKACK`. The option is not sticky (the kernel leaves
//! quick-ACK mode again by itself), but setting it sends the ACK the
//! kernel is holding at once; so the app's second segment follows without
//! the stall.
//!
//! Why only after a head: flushing the ACK whenever a read would block
//! (after every response, also complete ones) costs a `setsockopt` and a
//! pure ACK packet per request, which the next request would otherwise
//! carry for free — measured at ~20 % of the sidecar's CPU per request
//! (tests/bench/all.sh, the baseline row). A response read whole leaves
//! nothing to flush; the extra ACK is paid only when the data read so far
//! ends with a head: a response whose body has not come (the Nagle case),
//! or one without a body (204, 304, `Content-Length: 0`), or the end of a
//! chunked body. Not covered: an app with Nagle on that writes a body in
//! several small pieces (the later pieces wait as before); the head/body
//! split is the common case.
//!
//! Flow: `pool::connect_h1` → `QuickAck::new(stream)` → hyper's HTTP/1.1
//! client reads and writes through it. Writes pass through untouched
//! (vectored writes included). Elsewhere than Linux the option does not
//! exist; the wrapper only passes the reads and writes through.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// A `TcpStream` that flushes a held ACK when it starts waiting for more
/// data right after having read a head (see the module docs).
#[derive(Debug)]
pub struct QuickAck {
    inner: TcpStream,
    /// The last read that returned data ended with `\r\n\r\n`, and the
    /// ACK has not been flushed since.
    after_head: bool,
}

impl QuickAck {
    pub fn new(inner: TcpStream) -> QuickAck {
        QuickAck {
            inner,
            after_head: false,
        }
    }

    /// The socket (to look at its readiness).
    pub fn get_ref(&self) -> &TcpStream {
        &self.inner
    }

    /// Sends the ACK the kernel may be delaying, now. Errors are ignored:
    /// the worst outcome is the delay this avoids.
    fn flush_ack(&self) {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        {
            let _ = socket2::SockRef::from(&self.inner).set_tcp_quickack(true);
        }
    }
}

impl AsyncRead for QuickAck {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        match &polled {
            Poll::Ready(Ok(())) if buf.filled().len() > before => {
                this.after_head = ends_a_head(&buf.filled()[before..]);
            }
            Poll::Pending if this.after_head => {
                this.after_head = false;
                this.flush_ack();
            }
            _ => {}
        }
        polled
    }
}

/// Whether `read` ends exactly where an HTTP/1 head (or a chunked body)
/// ends.
fn ends_a_head(read: &[u8]) -> bool {
    read.ends_with(b"\r\n\r\n")
}

impl AsyncWrite for QuickAck {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::ends_a_head;

    #[test]
    fn only_a_read_that_ends_with_a_head_asks_for_the_ack() {
        assert!(ends_a_head(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n"));
        assert!(!ends_a_head(
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n"
        ));
        assert!(!ends_a_head(b"\r\n"));
        assert!(!ends_a_head(b""));
    }
}
