//! HTTP/2 responses held back by the client's flow control: a stream whose
//! response waits on the client for `--stream-idle-timeout` is reset, and
//! what it holds (the upstream connection its body reads from, the
//! request's in-flight slots) is released.
//!
//! Why a watch of its own: hyper's HTTP/2 server polls a response body only
//! when the client's flow-control window has room for it. A client that
//! advertises a window of zero and never opens it (while answering PINGs)
//! leaves nothing pending on its socket, so the write-stall clock
//! (`write_stall`) never starts, and the body's own idle timer is never
//! polled. Found by an attack: 5 connections × 100 such streams held 314 of
//! the app's connections for as long as the client liked.
//!
//! How: hyper runs each stream as a task through the connection's executor;
//! [`StreamExecutor`] spawns it inside [`Watched`]. Progress is the
//! response body being polled: hyper's HTTP/2 server asks a body for its
//! next frame only once the frame before has been handed to the client's
//! window in full (and one byte more is free), so a poll is bytes that
//! left. To make that observable at a fine grain, `ProxyBody` hands an
//! HTTP/2 client its data in pieces of at most [`PIECE`] bytes. A task
//! *wake* is not progress: a client can make h2 wake every stalled stream
//! by lending one byte of window and taking it back in the next SETTINGS
//! frame (found by an attack: 500 app connections held with 30 bytes per
//! limit), and h2 does not wake a stream at all while a piece drains.
//!
//! The stream's [`StreamProgress`] counts the body's polls and says which
//! side the response waits on: the service marks it answered when the
//! handler returns the response; the body marks each poll (a frame: it
//! waits on the client; none yet: on the upstream, whose silence the
//! body's own idle timer judges, with a route's `TimeoutPolicy idle`). One
//! timer per stream, created when the stream first waits after its answer,
//! fires once per limit: a stream whose response waited on the client and
//! whose body was not polled since the last firing is reset, between one
//! and two limits after its last progress. So a client keeps a stream by
//! taking at least [`PIECE`] bytes of it per limit. Dropping the stream's
//! task resets the stream (h2 sends `RST_STREAM` `CANCEL`) and drops its
//! response body.
//!
//! Until the handler has answered (the request is being forwarded, perhaps
//! with a long upload that never wakes this task), the handler's deadlines
//! apply (`--upstream-timeout`, `TimeoutPolicy request`), not this one.
//!
//! How the progress reaches the stream's task: hyper calls the service for
//! a new stream and spawns the stream's task right after, on the same
//! thread with nothing in between; the service leaves the progress in a
//! thread-local slot ([`hand_over`]) and [`StreamExecutor::execute`] takes
//! it. Other tasks hyper spawns through the executor (the pumps of HTTP/2
//! `CONNECT` tunnels, spawned from a stream's task) find the slot empty and
//! run unwatched.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Sleep;

/// The largest data frame an HTTP/2 client's response body gives at once
/// (larger ones are handed over in pieces): the grain at which its
/// progress is seen. HTTP/2's default frame size.
pub const PIECE: usize = 16 * 1024;

/// How one HTTP/2 stream's response progresses; shared by the service
/// (answered), the response body (each poll) and the stream's [`Watched`]
/// task.
#[derive(Debug, Default)]
pub struct StreamProgress {
    /// Which side the response waits on.
    state: AtomicU8,
    /// Polls of the response body so far (each one: the frame before has
    /// left). Written by the body alone.
    polls: AtomicU32,
}

/// The handler has not answered yet.
const HANDLING: u8 = 0;
/// The response (head or a data frame) waits to be sent to the client.
const WAITING_ON_CLIENT: u8 = 1;
/// The response body waits for the upstream's next bytes.
const WAITING_ON_UPSTREAM: u8 = 2;

impl StreamProgress {
    pub fn new() -> Arc<StreamProgress> {
        Arc::new(StreamProgress::default())
    }

    /// The handler returned the response: its head goes to the client.
    pub fn answered(&self) {
        self.state.store(WAITING_ON_CLIENT, Ordering::Relaxed);
    }

    /// The response body was polled (the frame before it has left): it gave
    /// a frame, which waits to be sent, or had none yet.
    #[inline]
    pub fn body_polled(&self, gave_a_frame: bool) {
        let state = if gave_a_frame {
            WAITING_ON_CLIENT
        } else {
            WAITING_ON_UPSTREAM
        };
        self.state.store(state, Ordering::Relaxed);
        let polls = self.polls.load(Ordering::Relaxed);
        self.polls.store(polls.wrapping_add(1), Ordering::Relaxed);
    }

    pub(crate) fn polls(&self) -> u32 {
        self.polls.load(Ordering::Relaxed)
    }

    fn waits_on_client(&self) -> bool {
        self.state.load(Ordering::Relaxed) == WAITING_ON_CLIENT
    }

    fn answered_yet(&self) -> bool {
        self.state.load(Ordering::Relaxed) != HANDLING
    }
}

thread_local! {
    /// The progress of the stream the service was called for last on this
    /// thread, until the executor takes it.
    static HANDED_OVER: Cell<Option<Arc<StreamProgress>>> = const { Cell::new(None) };
}

/// Leaves `progress` for the stream task hyper spawns next on this thread
/// (called by the service, for each new HTTP/2 stream).
pub fn hand_over(progress: Arc<StreamProgress>) {
    HANDED_OVER.with(|slot| slot.set(Some(progress)));
}

/// The executor of an HTTP/2 server connection: spawns each stream's task
/// on tokio, watched when it comes with a [`StreamProgress`] and a limit is
/// set.
#[derive(Debug, Clone, Copy)]
pub struct StreamExecutor {
    /// `None`: streams are never reset for waiting on the client.
    limit: Option<Duration>,
}

impl StreamExecutor {
    pub fn new(limit: Option<Duration>) -> Self {
        StreamExecutor { limit }
    }

    /// Whether the service should hand each stream's progress over.
    pub fn watches(&self) -> bool {
        self.limit.is_some()
    }
}

impl<F> hyper::rt::Executor<F> for StreamExecutor
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, stream: F) {
        let progress = HANDED_OVER.with(Cell::take);
        let watch = self.limit.zip(progress).map(|(limit, progress)| Watch {
            progress,
            limit,
            timer: None,
            polls_seen: 0,
        });
        tokio::spawn(Watched { stream, watch });
    }
}

/// What a watched stream keeps to judge it.
struct Watch {
    progress: Arc<StreamProgress>,
    limit: Duration,
    /// Fires once per limit while the stream waits; created at its first
    /// wait after the answer.
    timer: Option<Pin<Box<Sleep>>>,
    /// The body's polls when the timer was last (re)armed.
    polls_seen: u32,
}

impl Watch {
    /// Called first in each poll: whether the response has waited on the
    /// client for a whole limit with its body not polled once.
    fn stalled(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(timer) = &mut self.timer else {
            return false;
        };
        if timer.as_mut().poll(cx).is_pending() {
            return false;
        }
        let polls = self.progress.polls();
        if polls == self.polls_seen && self.progress.waits_on_client() {
            return true;
        }
        self.polls_seen = polls;
        let next = tokio::time::Instant::now() + self.limit;
        timer.as_mut().reset(next);
        // Registers this task with the re-armed timer.
        let _ = timer.as_mut().poll(cx);
        false
    }

    /// After a poll that left the stream waiting: the timer starts once the
    /// handler has answered.
    fn waiting(&mut self, cx: &mut Context<'_>) {
        if self.timer.is_none() && self.progress.answered_yet() {
            let mut timer = Box::pin(tokio::time::sleep(self.limit));
            let _ = timer.as_mut().poll(cx);
            self.timer = Some(timer);
            self.polls_seen = self.progress.polls();
        }
    }
}

pin_project_lite::pin_project! {
    /// One HTTP/2 stream's task, reset (dropped) when its response has
    /// waited on the client for the limit.
    struct Watched<F> {
        #[pin]
        stream: F,
        watch: Option<Watch>,
    }
}

impl<F: Future<Output = ()>> Future for Watched<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        if let Some(watch) = this.watch.as_mut() {
            if watch.stalled(cx) {
                tracing::debug!(
                    limit = ?watch.limit,
                    "HTTP/2 stream reset: its response waited on the client's flow control"
                );
                return Poll::Ready(());
            }
        }
        let polled = this.stream.poll(cx);
        if polled.is_pending() {
            if let Some(watch) = this.watch.as_mut() {
                watch.waiting(cx);
            }
        }
        polled
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;
    use std::sync::Mutex;
    use std::task::Waker;

    use super::*;

    /// A stand-in for hyper's stream task: pending until `done`; keeps its
    /// waker so that the test can wake it as a window update would.
    #[derive(Default)]
    struct Stream {
        done: AtomicBool,
        waker: Mutex<Option<Waker>>,
    }

    impl Stream {
        fn wake(&self) {
            if let Some(waker) = self.waker.lock().unwrap().take() {
                waker.wake();
            }
        }

        fn finish(&self) {
            self.done.store(true, Ordering::Relaxed);
            self.wake();
        }
    }

    fn spawn_watched(
        limit: Duration,
        progress: &Arc<StreamProgress>,
        stream: &Arc<Stream>,
    ) -> tokio::task::JoinHandle<()> {
        let task = Arc::clone(stream);
        let watched = Watched {
            stream: std::future::poll_fn(move |cx| {
                if task.done.load(Ordering::Relaxed) {
                    return Poll::Ready(());
                }
                *task.waker.lock().unwrap() = Some(cx.waker().clone());
                Poll::Pending
            }),
            watch: Some(Watch {
                progress: Arc::clone(progress),
                limit,
                timer: None,
                polls_seen: 0,
            }),
        };
        tokio::spawn(watched)
    }

    const LIMIT: Duration = Duration::from_secs(10);

    #[tokio::test(start_paused = true)]
    async fn a_response_waiting_on_the_client_for_the_limit_is_reset() {
        let progress = StreamProgress::new();
        let stream = Arc::new(Stream::default());
        let task = spawn_watched(LIMIT, &progress, &stream);
        tokio::task::yield_now().await;
        progress.answered();
        stream.wake();
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!task.is_finished());
        // Between one and two limits after its last poll.
        tokio::time::sleep(2 * LIMIT).await;
        assert!(task.is_finished(), "not reset after two limits");
        assert!(!stream.done.load(Ordering::Relaxed));
    }

    #[tokio::test(start_paused = true)]
    async fn a_handler_still_working_or_an_upstream_still_silent_is_not_its_business() {
        let progress = StreamProgress::new();
        let stream = Arc::new(Stream::default());
        let handling = spawn_watched(LIMIT, &progress, &stream);
        tokio::time::sleep(6 * LIMIT).await;
        assert!(!handling.is_finished(), "reset before the handler answered");

        let upstream = StreamProgress::new();
        let body = Arc::new(Stream::default());
        let waiting = spawn_watched(LIMIT, &upstream, &body);
        upstream.answered();
        body.wake();
        tokio::task::yield_now().await;
        upstream.body_polled(false);
        tokio::time::sleep(6 * LIMIT).await;
        assert!(
            !waiting.is_finished(),
            "reset while the upstream was silent"
        );

        // And once the body gives a frame the client does not take, it is.
        upstream.body_polled(true);
        body.wake();
        tokio::time::sleep(3 * LIMIT).await;
        assert!(
            waiting.is_finished(),
            "not reset once waiting on the client"
        );
        stream.finish();
        handling.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_whose_body_is_polled_within_each_limit_is_never_reset() {
        let progress = StreamProgress::new();
        progress.answered();
        let stream = Arc::new(Stream::default());
        let task = spawn_watched(LIMIT, &progress, &stream);
        // The client opens its window every 6 s: a frame goes out each
        // time, and the stream waits on the client again.
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_secs(6)).await;
            assert!(!task.is_finished(), "reset while the client kept reading");
            progress.body_polled(true);
            stream.wake();
        }
        stream.finish();
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn wakes_without_a_body_poll_are_not_progress() {
        // The attack: SETTINGS lending one byte of window and taking it
        // back wake the stream's task, whose capacity check then finds
        // nothing and never asks the body.
        let progress = StreamProgress::new();
        progress.answered();
        let stream = Arc::new(Stream::default());
        let task = spawn_watched(LIMIT, &progress, &stream);
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_secs(2)).await;
            stream.wake();
        }
        assert!(task.is_finished(), "kept alive by wakes alone");
    }

    #[tokio::test]
    async fn the_executor_watches_only_a_task_handed_a_progress() {
        let executor = StreamExecutor::new(Some(LIMIT));
        let (sent, received) = tokio::sync::oneshot::channel();
        hand_over(StreamProgress::new());
        hyper::rt::Executor::execute(&executor, async {
            let _ = sent.send(());
        });
        assert!(
            HANDED_OVER.with(Cell::take).is_none(),
            "the slot was not emptied"
        );
        received.await.unwrap();
    }
}
