//! Upstream sockets that never make the upstream wait for our ACK.
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
//! What: [`QuickAck`] wraps an upstream `TcpStream`. When a read that
//! returned data is followed by a read that would block (we have taken what
//! the peer sent and now wait for more), it sets `TCP_QUICKACK`. The option
//! is not sticky (the kernel leaves quick-ACK mode again by itself), but
//! setting it sends an ACK the kernel is holding at once; so the ACK
//! of the head leaves as soon as we have read the head, and the app's
//! second segment follows without the stall. One `setsockopt` per response
//! (not per read), and none on connections that only wait. Writes pass
//! through untouched (vectored writes included).
//!
//! Flow: `pool::connect_tcp` → `QuickAck::new(stream)` → hyper's h1/h2
//! client (or TLS, then h2) reads and writes through it.
//!
//! Elsewhere than Linux the option does not exist; the wrapper only passes
//! the reads and writes through.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// A `TcpStream` that flushes a held ACK whenever it starts waiting for
/// more data after having read some (see the module docs).
#[derive(Debug)]
pub struct QuickAck {
    inner: TcpStream,
    /// A read returned data since the last flush of the ACK.
    read_data: bool,
}

impl QuickAck {
    pub fn new(inner: TcpStream) -> QuickAck {
        QuickAck {
            inner,
            read_data: false,
        }
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
            Poll::Ready(Ok(())) if buf.filled().len() > before => this.read_data = true,
            Poll::Pending if this.read_data => {
                this.read_data = false;
                this.flush_ack();
            }
            _ => {}
        }
        polled
    }
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
