//! A client that stops taking response bytes is cut off: once writes to its
//! socket have made no progress for the limit (`--stream-idle-timeout`),
//! they fail with `TimedOut` and the server closes the connection, which
//! drops the response and with it the request's upstream connection and
//! buffers. Without this a client that sends a request for a large
//! response and never reads would hold an upstream connection for as long
//! as it liked: the response body is only polled (and its own idle timer
//! only runs) while the client takes bytes. nginx calls this
//! `send_timeout`; Envoy's stream idle timeout covers it.
//!
//! Data flow: the connection guards (`framing::FramingGuard` for HTTP/1.1,
//! `h2_guard::H2Guard` for HTTP/2) hand each poll of a write, flush or
//! shutdown of the client socket to [`WriteStall::watch`]. A ready poll
//! ends a stall; a pending one starts the clock (one timer per connection,
//! created at its first stall and re-armed at the next) and polls it, so
//! the connection's task is woken when the limit passes although the
//! socket never becomes writable. A write that completes at once — the
//! usual case — touches no timer.
//!
//! The clock measures a stall, not a slow reader: each write that takes
//! any bytes restarts it (so a client reading slowly but steadily is never
//! cut). Flow control inside HTTP/2 (a stream whose window the client
//! never opens while it keeps reading the connection) is not a socket
//! stall and is not covered here.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

/// The write-stall clock of one client connection.
#[derive(Debug)]
pub struct WriteStall {
    /// `None`: never cut (`--stream-idle-timeout 0s`).
    limit: Option<Duration>,
    /// Whether the last poll of a write was pending (the clock is running).
    stalled: bool,
    timer: Option<Pin<Box<Sleep>>>,
}

impl WriteStall {
    pub fn new(limit: Option<Duration>) -> Self {
        WriteStall {
            limit,
            stalled: false,
            timer: None,
        }
    }

    /// Passes on `polled`, the result of polling a write, flush or shutdown
    /// of the client socket, unless it has been pending for the limit: then
    /// a `TimedOut` error.
    pub fn watch<R>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<R>>,
    ) -> Poll<io::Result<R>> {
        if polled.is_ready() {
            self.stalled = false;
            return polled;
        }
        let Some(limit) = self.limit else {
            return Poll::Pending;
        };
        if !self.stalled {
            self.stalled = true;
            let deadline = Instant::now() + limit;
            match &mut self.timer {
                Some(timer) => timer.as_mut().reset(deadline),
                None => self.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
        }
        match self.timer.as_mut().map(|timer| timer.as_mut().poll(cx)) {
            Some(Poll::Ready(())) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the client took no response bytes for {limit:?}"),
            ))),
            _ => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::Wake;

    struct CountingWaker(AtomicUsize);

    impl Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn pending() -> Poll<io::Result<usize>> {
        Poll::Pending
    }

    #[tokio::test(start_paused = true)]
    async fn a_stall_fails_after_the_limit_and_progress_restarts_the_clock() {
        let woken = Arc::new(CountingWaker(AtomicUsize::new(0)));
        let waker = std::task::Waker::from(Arc::clone(&woken));
        let mut cx = Context::from_waker(&waker);
        let mut stall = WriteStall::new(Some(Duration::from_secs(10)));

        assert!(stall.watch(&mut cx, pending()).is_pending());
        tokio::time::sleep(Duration::from_secs(9)).await;
        assert!(stall.watch(&mut cx, pending()).is_pending());
        // Progress just before the limit: the clock starts again.
        assert!(matches!(
            stall.watch(&mut cx, Poll::Ready(Ok(5))),
            Poll::Ready(Ok(5))
        ));
        assert!(stall.watch(&mut cx, pending()).is_pending());
        tokio::time::sleep(Duration::from_secs(9)).await;
        assert!(
            stall.watch(&mut cx, pending()).is_pending(),
            "9 s into the second stall"
        );
        let before = woken.0.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(
            woken.0.load(Ordering::SeqCst) > before,
            "the timer wakes the connection: the socket never will"
        );
        match stall.watch(&mut cx, pending()) {
            Poll::Ready(Err(error)) => {
                assert_eq!(error.kind(), io::ErrorKind::TimedOut);
                assert!(error.to_string().contains("10s"), "{error}");
            }
            other => panic!("not timed out: {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_limit_a_stall_is_never_cut() {
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut stall = WriteStall::new(None);
        assert!(stall.watch(&mut cx, pending()).is_pending());
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert!(stall.watch(&mut cx, pending()).is_pending());
        assert!(stall.timer.is_none(), "no timer without a limit");
    }

    #[tokio::test(start_paused = true)]
    async fn writes_that_complete_at_once_arm_no_timer() {
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut stall = WriteStall::new(Some(Duration::from_secs(1)));
        for _ in 0..100 {
            assert!(stall.watch(&mut cx, Poll::Ready(Ok(1))).is_ready());
        }
        assert!(stall.timer.is_none());
    }
}
