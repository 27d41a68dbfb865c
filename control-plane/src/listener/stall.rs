//! [`WriteDeadline`]: an I/O wrapper that fails a write the client has
//! not let progress for a while.
//!
//! A client that asks for responses and never reads them (pipelined GETs
//! of the dashboard's script, say) fills its receive window and then the
//! server's send buffer; from then on hyper's write is pending forever,
//! the connection counts as busy (a response in flight), and a busy
//! connection is never evicted — a few hundred such clients would hold
//! every API slot (review finding H3 of issue 16). Every write and flush
//! goes through here:
//!
//! ```text
//! poll_write / poll_flush / poll_shutdown on the socket
//!   Ready            ─► the stall timer is dropped
//!   Pending          ─► a timer starts (once) and is polled with the same waker
//!   timer fired      ─► Err(TimedOut): hyper ends the connection, its slot is freed
//! ```
//!
//! Only time spent blocked on the client counts: a watch stream that
//! waits for the next event writes nothing and is never cut, and one
//! whose sidecar reads at any pace keeps its writes progressing.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// Wraps a connection's I/O; see the module docs.
pub struct WriteDeadline<IO> {
    io: IO,
    timeout: Duration,
    /// Running while a write is blocked on the client.
    stalled: Option<Pin<Box<Sleep>>>,
}

impl<IO> WriteDeadline<IO> {
    pub fn new(io: IO, timeout: Duration) -> WriteDeadline<IO> {
        WriteDeadline {
            io,
            timeout,
            stalled: None,
        }
    }

    /// What a write that returned `polled` means: progress clears the
    /// timer; pending starts it (once) and fails when it has fired.
    fn watch<T>(
        &mut self,
        polled: Poll<io::Result<T>>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<T>> {
        match polled {
            Poll::Ready(result) => {
                self.stalled = None;
                Poll::Ready(result)
            }
            Poll::Pending => {
                let timeout = self.timeout;
                let timer = self
                    .stalled
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("the client has not read its responses for {timeout:?}"),
                    ))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for WriteDeadline<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        self.watch(polled, cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.watch(polled, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_flush(cx);
        self.watch(polled, cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_shutdown(cx);
        self.watch(polled, cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// A peer that never reads: writes stall once the pipe is full, and
    /// then fail after the timeout instead of hanging.
    #[tokio::test]
    async fn a_write_the_peer_never_reads_fails_after_the_timeout() {
        let (near, _far) = tokio::io::duplex(1024);
        let mut io = WriteDeadline::new(near, Duration::from_millis(100));
        let started = std::time::Instant::now();
        let outcome = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                io.write_all(&[0u8; 4096]).await?;
            }
            #[allow(unreachable_code)]
            io::Result::Ok(())
        })
        .await
        .expect("the write failed instead of hanging");
        let err = outcome.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= Duration::from_millis(100));
    }

    /// A peer that reads, however slowly, keeps the writes going.
    #[tokio::test]
    async fn a_peer_that_reads_slowly_is_not_cut_off() {
        use tokio::io::AsyncReadExt;
        let (near, mut far) = tokio::io::duplex(64);
        let mut io = WriteDeadline::new(near, Duration::from_millis(200));
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 16];
            let mut total = 0;
            while total < 2048 {
                tokio::time::sleep(Duration::from_millis(5)).await;
                total += far.read(&mut buf).await.unwrap();
            }
        });
        io.write_all(&[1u8; 2048])
            .await
            .expect("slow reads are progress");
        reader.await.unwrap();
    }
}
