//! A client that stops taking response bytes is cut off: once it has
//! acknowledged no byte for the limit while the server has bytes for it,
//! writes to it fail with `TimedOut` and hyper closes the connection, which
//! drops the response and whatever it holds. Without this a client that
//! asks for a large response (or pipelines requests) and never reads holds
//! its connection for as long as it likes: the response body is only polled
//! (and its own idle timer only runs) while the client takes bytes, and a
//! connection with a response in flight counts as busy. nginx calls this
//! `send_timeout`; Envoy's stream idle timeout covers it.
//!
//! Who uses it: the sidecar wraps every HTTP client connection (plain TCP
//! or TLS) in a [`WriteStallIo`] under its guard (`FramingGuard` for
//! HTTP/1.1, `H2Guard` for HTTP/2), limit `--stream-idle-timeout`; the
//! control plane wraps every HTTPS API connection (the sidecars' watch
//! streams, `meshctl`, the dashboard), limit `Limits::write_timeout`. The
//! wrapper hands each poll of a write ([`WriteStall::watch_write`]) and of
//! a flush or shutdown ([`WriteStall::watch_flush`]) of the client socket
//! to the clock. A pending poll starts it (one timer per connection,
//! created at its first stall and re-armed at the next) and polls the
//! timer, so the connection's task is woken when the limit passes although
//! the socket never becomes writable. A write that takes bytes stops it; a
//! flush or shutdown that completes does not (hyper flushes an empty buffer
//! on every wake, which says nothing about the client). A write that
//! completes at once — the usual case — touches no timer.
//!
//! A stall is judged by the client, not by the socket's writability: Linux
//! wakes a writer only once a third of the send buffer (megabytes, when
//! autotuned) has drained, so a client reading slowly but steadily can
//! leave every write pending for longer than the limit. When the timer
//! fires, the clock therefore reads how many bytes the client has
//! acknowledged (`TCP_INFO`'s `tcpi_bytes_acked`, on the TCP socket under
//! any TLS); if that grew since the clock started, the client is reading
//! and the clock starts again. Only a whole limit without one acknowledged
//! byte cuts the connection: between one and two limits after the client's
//! kernel acknowledged its last byte (the clock's periods start when a
//! write first stalls, not at that byte).
//!
//! Under pressure: the sidecar's upstream pool, when every HTTP/2 stream
//! slot of an endpoint is taken, [`StallPress::press`]es the clients of the
//! streams it carries (`WriteStall::press_handle`, through the request). A
//! pressed clock that is running judges the connection over
//! [`PRESSED_LIMIT`] from then, by bytes: cut unless the client
//! acknowledged [`PRESSED_MIN_BYTES`] in it (or a write took bytes, which
//! stops the clock). So HTTP/1.1 clients that stop reading large responses
//! cannot hold every upstream stream slot for the whole limit (the same
//! rule as the sidecar's `stream_watch` for HTTP/2 streams).
//!
//! Flow control inside HTTP/2 (a stream whose window the client never
//! opens while it keeps reading the connection) is not a socket stall: the
//! sidecar's `listen::stream_watch` resets such streams after the same limit.

use std::future::Future;
use std::io;
use std::os::fd::RawFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::task::AtomicWaker;

use nix::libc;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// A client connection's I/O with its writes watched by a [`WriteStall`]
/// (reads pass through).
#[derive(Debug)]
pub struct WriteStallIo<T> {
    inner: T,
    clock: WriteStall,
}

impl<T> WriteStallIo<T> {
    pub fn new(inner: T, clock: WriteStall) -> Self {
        WriteStallIo { inner, clock }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for WriteStallIo<T> {
    #[inline]
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for WriteStallIo<T> {
    #[inline]
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.clock.watch_write(cx, polled)
    }

    #[inline]
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.clock.watch_write(cx, polled)
    }

    #[inline]
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    #[inline]
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_flush(cx);
        this.clock.watch_flush(cx, polled)
    }

    #[inline]
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.clock.watch_flush(cx, polled)
    }
}

/// How long a pressed clock (see the module docs) lets a stalled client
/// go, and how many bytes it must acknowledge meanwhile to keep going.
pub const PRESSED_LIMIT: Duration = Duration::from_secs(1);
/// See [`PRESSED_LIMIT`]: one HTTP/2 data frame of the default size.
pub const PRESSED_MIN_BYTES: u64 = 16 * 1024;

/// A handle on a [`WriteStall`] clock for whoever may press it (shared;
/// the clock sets `stalled` and registers its connection's task).
#[derive(Debug, Default)]
pub struct StallPress {
    /// The clock runs: the client has bytes it does not take.
    stalled: AtomicBool,
    /// Set by [`StallPress::press`], taken by the clock.
    pressed: AtomicBool,
    /// The connection's task, woken by a press.
    task: AtomicWaker,
}

impl StallPress {
    /// Asks the clock to judge its stalled connection over
    /// [`PRESSED_LIMIT`] from now. Returns whether it was stalled (one
    /// that is not is left alone).
    pub fn press(&self) -> bool {
        if !self.stalled.load(Ordering::Relaxed) {
            return false;
        }
        self.pressed.store(true, Ordering::Relaxed);
        self.task.wake();
        true
    }
}

/// The write-stall clock of one client connection.
#[derive(Debug)]
pub struct WriteStall {
    /// `None`: never cut (the sidecar's `--stream-idle-timeout 0s`).
    limit: Option<Duration>,
    /// The client's TCP socket, for the bytes it has acknowledged (owned by
    /// the wrapped I/O, which lives as long as this clock); `None` (tests,
    /// in-memory streams): only writes taking bytes count as progress.
    socket: Option<RawFd>,
    /// `Some` while the clock runs: the client's acknowledged bytes when it
    /// (re)started.
    stalled: Option<Option<u64>>,
    timer: Option<Pin<Box<Sleep>>>,
    /// The current period is a pressed one (judged by
    /// [`PRESSED_MIN_BYTES`]).
    pressed: bool,
    press: Arc<StallPress>,
}

impl WriteStall {
    /// A clock for the client connection on TCP socket `socket`.
    pub fn new(limit: Option<Duration>, socket: Option<RawFd>) -> Self {
        WriteStall {
            limit,
            socket,
            stalled: None,
            timer: None,
            pressed: false,
            press: Arc::default(),
        }
    }

    /// The handle that presses this clock.
    pub fn press_handle(&self) -> Arc<StallPress> {
        Arc::clone(&self.press)
    }

    /// Passes on `polled`, the result of polling a write to the client: one
    /// that took bytes stops the clock; a pending one runs it, and becomes a
    /// `TimedOut` error once the client has taken nothing for the limit.
    #[inline]
    pub fn watch_write(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        match polled {
            Poll::Ready(Ok(n)) if n > 0 => {
                if self.stalled.take().is_some() {
                    self.press.stalled.store(false, Ordering::Relaxed);
                    self.pressed = false;
                }
                polled
            }
            Poll::Ready(_) => polled,
            Poll::Pending => self.pending(cx),
        }
    }

    /// As [`Self::watch_write`], for a flush or shutdown: completing one is
    /// no sign of the client reading, so it leaves the clock as it is.
    #[inline]
    pub fn watch_flush(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<()>>,
    ) -> Poll<io::Result<()>> {
        match polled {
            Poll::Ready(_) => polled,
            Poll::Pending => self.pending(cx),
        }
    }

    /// A pending write, flush or shutdown: starts the clock if it is not
    /// running; `TimedOut` if the limit has passed without the client
    /// acknowledging a byte.
    fn pending<R>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<R>> {
        let Some(limit) = self.limit else {
            return Poll::Pending;
        };
        if self.stalled.is_none() {
            self.restart(limit);
            self.press.stalled.store(true, Ordering::Relaxed);
        }
        self.press.task.register(cx.waker());
        let pressed = &self.press.pressed;
        if pressed.load(Ordering::Relaxed) && pressed.swap(false, Ordering::Relaxed) {
            self.pressed_now(limit);
        }
        loop {
            let Some(timer) = self.timer.as_mut() else {
                return Poll::Pending;
            };
            if timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let acked_at_start = self.stalled.flatten();
            let enough = if self.pressed { PRESSED_MIN_BYTES } else { 1 };
            match (acked_at_start, self.socket.and_then(bytes_acked)) {
                // The client took bytes meanwhile: reading, just slowly.
                (Some(before), Some(now)) if now >= before + enough => {
                    self.pressed = false;
                    self.restart(limit);
                }
                _ if self.pressed => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("the client took under {PRESSED_MIN_BYTES} bytes in {PRESSED_LIMIT:?} while its upstream was short of streams"),
                    )))
                }
                _ => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("the client took no response bytes for {limit:?}"),
                    )))
                }
            }
        }
    }

    /// Pressed while running: the period ends [`PRESSED_LIMIT`] from now
    /// (unless it ends sooner anyway) and is judged by bytes.
    fn pressed_now(&mut self, limit: Duration) {
        let short = PRESSED_LIMIT.min(limit);
        let sooner = self
            .timer
            .as_ref()
            .is_some_and(|timer| timer.deadline() <= Instant::now() + short);
        if !sooner {
            self.restart(short);
            self.pressed = true;
        }
    }

    /// (Re)starts the clock: the limit from now, and the bytes acknowledged
    /// so far.
    fn restart(&mut self, limit: Duration) {
        self.stalled = Some(self.socket.and_then(bytes_acked));
        let deadline = Instant::now() + limit;
        match &mut self.timer {
            Some(timer) => timer.as_mut().reset(deadline),
            None => self.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
        }
    }
}

/// How many bytes the peer of TCP socket `socket` has acknowledged
/// (`tcpi_bytes_acked`, Linux 4.1 and later); `None` if the kernel does not
/// say (not a TCP socket, an older kernel).
///
/// One of the workspace's two `unsafe`s (the other: `memory::trim`):
/// neither nix nor rustix wraps
/// `TCP_INFO`, and nothing else tells whether a client is reading.
#[allow(unsafe_code)]
fn bytes_acked(socket: RawFd) -> Option<u64> {
    let mut info = std::mem::MaybeUninit::<libc::tcp_info>::zeroed();
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` is a writable buffer of `len` bytes; the kernel writes
    // at most `len` bytes into it and sets `len` to how many it wrote. An
    // fd that is not (or no longer) a socket makes the call fail, nothing
    // else: it is only read.
    let failed = unsafe {
        libc::getsockopt(
            socket,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    } != 0;
    let known = std::mem::offset_of!(libc::tcp_info, tcpi_bytes_acked) + std::mem::size_of::<u64>();
    if failed || (len as usize) < known {
        return None;
    }
    // SAFETY: zeroed, then (partly) written by the kernel; every field of
    // `tcp_info` is an integer, for which any bytes are a valid value.
    Some(unsafe { info.assume_init() }.tcpi_bytes_acked)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::Wake;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    struct CountingWaker(AtomicUsize);

    impl Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn pending() -> Poll<io::Result<usize>> {
        Poll::Pending
    }

    fn timed_out<R: std::fmt::Debug>(polled: Poll<io::Result<R>>, limit: &str) {
        match polled {
            Poll::Ready(Err(error)) => {
                assert_eq!(error.kind(), io::ErrorKind::TimedOut);
                assert!(error.to_string().contains(limit), "{error}");
            }
            other => panic!("not timed out: {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_stall_fails_after_the_limit_and_a_write_taking_bytes_restarts_the_clock() {
        let woken = Arc::new(CountingWaker(AtomicUsize::new(0)));
        let waker = std::task::Waker::from(Arc::clone(&woken));
        let mut cx = Context::from_waker(&waker);
        let mut stall = WriteStall::new(Some(Duration::from_secs(10)), None);

        assert!(stall.watch_write(&mut cx, pending()).is_pending());
        tokio::time::sleep(Duration::from_secs(9)).await;
        assert!(stall.watch_write(&mut cx, pending()).is_pending());
        // A write taking bytes just before the limit: the clock starts again.
        assert!(matches!(
            stall.watch_write(&mut cx, Poll::Ready(Ok(5))),
            Poll::Ready(Ok(5))
        ));
        assert!(stall.watch_write(&mut cx, pending()).is_pending());
        tokio::time::sleep(Duration::from_secs(9)).await;
        assert!(
            stall.watch_write(&mut cx, pending()).is_pending(),
            "9 s into the second stall"
        );
        let before = woken.0.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(
            woken.0.load(Ordering::SeqCst) > before,
            "the timer wakes the connection: the socket never will"
        );
        timed_out(stall.watch_write(&mut cx, pending()), "10s");
    }

    #[tokio::test(start_paused = true)]
    async fn a_pressed_stall_is_judged_over_a_second_and_a_clock_not_running_ignores_presses() {
        let woken = Arc::new(CountingWaker(AtomicUsize::new(0)));
        let waker = std::task::Waker::from(Arc::clone(&woken));
        let mut cx = Context::from_waker(&waker);
        let mut stall = WriteStall::new(Some(Duration::from_secs(60)), None);
        let press = stall.press_handle();
        assert!(!press.press(), "nothing stalled: nothing to press");
        assert!(stall.watch_write(&mut cx, Poll::Ready(Ok(5))).is_ready());
        assert!(!press.pressed.load(Ordering::Relaxed));

        assert!(stall.watch_write(&mut cx, pending()).is_pending());
        let before = woken.0.load(Ordering::SeqCst);
        assert!(press.press(), "a stalled connection is pressed");
        assert!(
            woken.0.load(Ordering::SeqCst) > before,
            "the press wakes the connection"
        );
        assert!(stall.watch_write(&mut cx, pending()).is_pending());
        tokio::time::sleep(PRESSED_LIMIT + Duration::from_millis(1)).await;
        timed_out(stall.watch_write(&mut cx, pending()), "short of streams");

        // A write taking bytes within the pressed second stops the clock:
        // back to the whole limit.
        let mut stall = WriteStall::new(Some(Duration::from_secs(60)), None);
        let press = stall.press_handle();
        assert!(stall.watch_write(&mut cx, pending()).is_pending());
        assert!(press.press());
        assert!(stall.watch_write(&mut cx, pending()).is_pending());
        assert!(stall.watch_write(&mut cx, Poll::Ready(Ok(5))).is_ready());
        assert!(!press.press(), "no longer stalled");
        assert!(stall.watch_write(&mut cx, pending()).is_pending());
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert!(stall.watch_write(&mut cx, pending()).is_pending());
    }

    /// hyper flushes its (empty) buffer on every wake while a refusal's
    /// write is stuck: those flushes complete at once and must not keep a
    /// stalled client alive (found by an attack on this clock).
    #[tokio::test(start_paused = true)]
    async fn completed_flushes_and_empty_writes_do_not_restart_the_clock() {
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut stall = WriteStall::new(Some(Duration::from_secs(1)), None);
        assert!(stall.watch_write(&mut cx, pending()).is_pending());
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            assert!(stall.watch_flush(&mut cx, Poll::Ready(Ok(()))).is_ready());
            assert!(stall.watch_write(&mut cx, Poll::Ready(Ok(0))).is_ready());
        }
        timed_out(stall.watch_flush(&mut cx, Poll::Pending), "1s");
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_limit_a_stall_is_never_cut() {
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut stall = WriteStall::new(None, None);
        assert!(stall.watch_write(&mut cx, pending()).is_pending());
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert!(stall.watch_write(&mut cx, pending()).is_pending());
        assert!(stall.timer.is_none(), "no timer without a limit");
    }

    #[tokio::test(start_paused = true)]
    async fn writes_that_complete_at_once_arm_no_timer() {
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut stall = WriteStall::new(Some(Duration::from_secs(1)), None);
        for _ in 0..100 {
            assert!(stall.watch_write(&mut cx, Poll::Ready(Ok(1))).is_ready());
        }
        assert!(stall.timer.is_none());
    }

    /// With the socket known, a client that acknowledged bytes during the
    /// limit is reading: the clock starts again instead of cutting it.
    /// A real loopback connection, real time (the kernel's counters).
    #[tokio::test]
    async fn a_client_acknowledging_bytes_keeps_its_connection() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (mut server, _) = listener.accept().await.unwrap();
        let base = bytes_acked(server.as_raw_fd()).expect("a TCP socket on Linux");
        server.write_all(b"hello").await.unwrap();
        let mut hello = [0u8; 5];
        client.read_exact(&mut hello).await.unwrap();

        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let limit = Duration::from_millis(200);
        let mut stall = WriteStall::new(Some(limit), Some(server.as_raw_fd()));
        assert!(stall.watch_write(&mut cx, pending()).is_pending());
        // The client acknowledges more bytes within the limit...
        server.write_all(b"more").await.unwrap();
        let mut more = [0u8; 4];
        client.read_exact(&mut more).await.unwrap();
        let acked = tokio::time::Instant::now() + Duration::from_secs(5);
        while bytes_acked(server.as_raw_fd()) != Some(base + 9) {
            assert!(tokio::time::Instant::now() < acked, "never acknowledged");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(limit + Duration::from_millis(50)).await;
        assert!(
            stall.watch_write(&mut cx, pending()).is_pending(),
            "cut although the client acknowledged bytes"
        );
        // ...and then none for a whole limit: cut.
        tokio::time::sleep(limit + Duration::from_millis(50)).await;
        timed_out(stall.watch_write(&mut cx, pending()), "200ms");
    }
}
