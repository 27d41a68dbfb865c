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
//! taking one piece of it per limit: [`PIECE`] bytes, or less when the app
//! sends smaller data frames (under pressure, below, bytes count instead).
//! Dropping the stream's
//! task resets the stream (h2 sends `RST_STREAM` `CANCEL`) and drops its
//! response body.
//!
//! Until the handler has answered (the request is being forwarded, perhaps
//! with a long upload that never wakes this task), the handler's deadlines
//! apply (`--upstream-timeout`, `TimeoutPolicy request`), not this one.
//!
//! Under pressure: when every upstream HTTP/2 connection an endpoint may
//! have is full (`upstream::pool`), the pool [`StreamProgress::press`]es the
//! streams it carries that wait on their clients (at a new request, and
//! once per [`PRESSED_LIMIT`] while that request waits and the connections
//! stay full); a pressed stream is
//! judged over [`PRESSED_LIMIT`] instead of the whole limit, and by bytes:
//! reset unless [`PIECE`] bytes of it left within it or its response caught
//! up with the upstream (a poll found no frame: the client takes whatever
//! a slow app sends); back to the normal limit if it is kept. Counting
//! polls there let a client keep every slot by taking 100 bytes a second
//! of an app sending small frames (found by an attack). So
//! clients that stop reading cannot keep an endpoint's every stream slot
//! for the whole `--stream-idle-timeout` (found by an attack: nine
//! connections of 100 such streams made every other request to the app
//! wait until it timed out), while streams that move are never touched.
//! Envoy's overload manager shortens its idle timeouts under pressure the
//! same way.
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
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use tokio::time::Sleep;

use crate::upstream::in_flight::Pressable;

/// The largest data frame an HTTP/2 client's response body gives at once
/// (larger ones are handed over in pieces): the grain at which its
/// progress is seen. HTTP/2's default frame size.
pub const PIECE: usize = 16 * 1024;

/// How long a pressed stream (see the module docs) may go without its body
/// being polled while it waits on its client. A client taking one piece
/// (see the module docs) per second keeps its streams under pressure too.
pub const PRESSED_LIMIT: Duration = Duration::from_secs(1);

/// How one HTTP/2 stream's response progresses; shared by the service
/// (answered), the response body (each poll) and the stream's [`Watched`]
/// task.
#[derive(Debug, Default)]
pub struct StreamProgress {
    /// Which side the response waits on.
    state: AtomicU8,
    /// Polls of the response body so far (each one: the frame before has
    /// left). Written by the body alone, like the three below.
    polls: AtomicU32,
    /// Bytes of the data frames that left (each counted at the next poll).
    bytes_left: AtomicU64,
    /// The size of the frame given at the last poll (waiting to leave).
    given: AtomicU32,
    /// Polls that found no frame: the response had caught up with the
    /// upstream, so its client was keeping up then.
    caught_up: AtomicU32,
    /// Set by [`StreamProgress::press`], taken by the stream's task.
    pressed: AtomicBool,
    /// The stream's task, woken by a press.
    task: AtomicWaker,
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
    /// a frame of `given` bytes (a trailers frame: 0), which waits to be
    /// sent, or had none yet (`None`).
    #[inline]
    pub fn body_polled(&self, given: Option<usize>) {
        let state = match given {
            Some(_) => WAITING_ON_CLIENT,
            None => {
                bump(&self.caught_up);
                WAITING_ON_UPSTREAM
            }
        };
        self.state.store(state, Ordering::Relaxed);
        bump(&self.polls);
        let left = u64::from(self.given.load(Ordering::Relaxed));
        let total = self.bytes_left.load(Ordering::Relaxed);
        self.bytes_left.store(total + left, Ordering::Relaxed);
        let given = given.map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX));
        self.given.store(given, Ordering::Relaxed);
    }

    pub(crate) fn polls(&self) -> u32 {
        self.polls.load(Ordering::Relaxed)
    }

    /// Where the response stands, for a pressed stream's judgement.
    fn moved(&self) -> Moved {
        Moved {
            bytes_left: self.bytes_left.load(Ordering::Relaxed),
            caught_up: self.caught_up.load(Ordering::Relaxed),
        }
    }

    fn waits_on_client(&self) -> bool {
        self.state.load(Ordering::Relaxed) == WAITING_ON_CLIENT
    }

    fn answered_yet(&self) -> bool {
        self.state.load(Ordering::Relaxed) != HANDLING
    }

    /// Asks the stream's task to judge it over [`PRESSED_LIMIT`] from now
    /// (its upstream is short of stream slots). Returns whether the stream
    /// waits on its client at all (one that does not is left alone).
    pub fn press(&self) -> bool {
        if !self.waits_on_client() {
            return false;
        }
        self.pressed.store(true, Ordering::Relaxed);
        self.task.wake();
        true
    }
}

/// Adds one to a counter only its owner writes (no read-modify-write).
#[inline]
fn bump(counter: &AtomicU32) {
    let n = counter.load(Ordering::Relaxed);
    counter.store(n.wrapping_add(1), Ordering::Relaxed);
}

/// A snapshot of a response's movement: a pressed stream is kept if, since
/// it was pressed, [`PIECE`] bytes of it left or it caught up with its
/// upstream.
#[derive(Debug, Clone, Copy, Default)]
struct Moved {
    bytes_left: u64,
    caught_up: u32,
}

impl Moved {
    fn enough_since(self, pressed: Moved) -> bool {
        self.bytes_left - pressed.bytes_left >= PIECE as u64 || self.caught_up != pressed.caught_up
    }
}

impl Pressable for StreamProgress {
    fn press(&self) -> bool {
        StreamProgress::press(self)
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
            pressed_at: None,
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
    /// Pressed: how the response stood then (judged by bytes, not polls).
    pressed_at: Option<Moved>,
}

impl Watch {
    /// Called first in each poll: whether the response has waited on the
    /// client for a whole limit with its body not polled once.
    fn stalled(&mut self, cx: &mut Context<'_>) -> bool {
        let pressed = &self.progress.pressed;
        if pressed.load(Ordering::Relaxed) && pressed.swap(false, Ordering::Relaxed) {
            self.pressed(cx);
        }
        let Some(timer) = &mut self.timer else {
            return false;
        };
        if timer.as_mut().poll(cx).is_pending() {
            return false;
        }
        let polls = self.progress.polls();
        let moved = match self.pressed_at.take() {
            // Pressed: a piece's worth of bytes, or caught up.
            Some(pressed) => self.progress.moved().enough_since(pressed),
            None => polls != self.polls_seen,
        };
        if !moved && self.progress.waits_on_client() {
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
    /// handler has answered (and the task can be woken by a press).
    fn waiting(&mut self, cx: &mut Context<'_>) {
        if self.timer.is_none() && self.progress.answered_yet() {
            self.progress.task.register(cx.waker());
            self.arm(self.limit, cx);
        }
    }

    /// Pressed: the stream is judged over [`PRESSED_LIMIT`] from now, unless
    /// its timer fires sooner anyway.
    fn pressed(&mut self, cx: &mut Context<'_>) {
        // A wake takes the waker: the next press needs it again.
        self.progress.task.register(cx.waker());
        let soon = tokio::time::Instant::now() + PRESSED_LIMIT.min(self.limit);
        match &self.timer {
            Some(timer) if timer.deadline() <= soon => {}
            _ => {
                self.arm(PRESSED_LIMIT.min(self.limit), cx);
                self.pressed_at = Some(self.progress.moved());
            }
        }
    }

    /// (Re)starts the timer: it fires after `after`, and the stream is
    /// judged by the body's polls from now.
    fn arm(&mut self, after: Duration, cx: &mut Context<'_>) {
        let deadline = tokio::time::Instant::now() + after;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        timer.as_mut().reset(deadline);
        let _ = timer.as_mut().poll(cx);
        self.polls_seen = self.progress.polls();
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

    /// A watched stream answered, waiting on its client, and pressed.
    async fn pressed_stream() -> (
        Arc<StreamProgress>,
        Arc<Stream>,
        tokio::task::JoinHandle<()>,
    ) {
        let progress = StreamProgress::new();
        let stream = Arc::new(Stream::default());
        let task = spawn_watched(LIMIT, &progress, &stream);
        progress.answered();
        stream.wake();
        tokio::task::yield_now().await;
        assert!(progress.press(), "a stream waiting on its client");
        (progress, stream, task)
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
                pressed_at: None,
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
        upstream.body_polled(None);
        tokio::time::sleep(6 * LIMIT).await;
        assert!(
            !waiting.is_finished(),
            "reset while the upstream was silent"
        );

        // And once the body gives a frame the client does not take, it is.
        upstream.body_polled(Some(PIECE));
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
            progress.body_polled(Some(PIECE));
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

    #[tokio::test(start_paused = true)]
    async fn a_pressed_stream_is_judged_over_the_short_limit() {
        let progress = StreamProgress::new();
        let stream = Arc::new(Stream::default());
        let task = spawn_watched(LIMIT, &progress, &stream);
        progress.answered();
        stream.wake();
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(progress.press(), "a stream waiting on its client");
        tokio::time::sleep(PRESSED_LIMIT + Duration::from_millis(1)).await;
        assert!(task.is_finished(), "not reset within the pressed limit");

        // One whose body is polled within the short limit is kept, and
        // judged over the whole limit again after it.
        let (reading, stream, task) = pressed_stream().await;
        tokio::time::sleep(PRESSED_LIMIT / 2).await;
        reading.body_polled(Some(PIECE));
        reading.body_polled(Some(PIECE));
        stream.wake();
        tokio::time::sleep(LIMIT - PRESSED_LIMIT).await;
        assert!(!task.is_finished(), "reset although its body was polled");
        tokio::time::sleep(LIMIT + PRESSED_LIMIT).await;
        assert!(task.is_finished(), "stalled for two limits after its poll");
    }

    /// Under pressure, progress is bytes: a client taking an app's small
    /// frames one by one (1 KB/s) loses its stream; a client that keeps up
    /// with a slow app (its response catches up with the upstream) keeps
    /// it. (An attack held every slot by reading 100 bytes per second of
    /// an app sending 100-byte frames.)
    #[tokio::test(start_paused = true)]
    async fn under_pressure_small_frames_taken_slowly_are_not_progress_but_keeping_up_is() {
        let (trickle, stream, task) = pressed_stream().await;
        for _ in 0..9 {
            tokio::time::sleep(PRESSED_LIMIT / 10).await;
            trickle.body_polled(Some(100));
            stream.wake();
        }
        tokio::time::sleep(PRESSED_LIMIT / 10 + Duration::from_millis(1)).await;
        assert!(
            task.is_finished(),
            "900 bytes in the pressed second kept the stream"
        );

        let (keeping_up, stream, task) = pressed_stream().await;
        tokio::time::sleep(PRESSED_LIMIT / 2).await;
        keeping_up.body_polled(None); // took everything the app had sent
        keeping_up.body_polled(Some(100)); // the app's next frame, waiting
        stream.wake();
        tokio::time::sleep(PRESSED_LIMIT).await;
        assert!(!task.is_finished(), "reset although it had caught up");
        stream.finish();
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn streams_not_waiting_on_their_clients_are_not_pressed() {
        let handling = StreamProgress::new();
        assert!(!handling.press(), "the handler has not answered");
        let upstream = StreamProgress::new();
        upstream.answered();
        upstream.body_polled(None);
        assert!(!upstream.press(), "waits on the upstream");
        let stream = Arc::new(Stream::default());
        let task = spawn_watched(LIMIT, &upstream, &stream);
        stream.wake();
        tokio::time::sleep(3 * LIMIT).await;
        assert!(!task.is_finished());
        stream.finish();
        task.await.unwrap();
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
