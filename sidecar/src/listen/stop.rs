//! A connection's view of the sidecar's shutdown signal, cheap to poll.
//!
//! A connection task is woken several times per request (socket readiness,
//! the upstream's answer). Racing the connection against the shutdown
//! watch channel with `select!` polls the channel on every one of those
//! wakes, which re-registers with the channel each time (a lock and a
//! waker comparison, ~450 instructions per proxied request). [`StopWatch`]
//! polls the channel with a waker of its own instead: only when that
//! waker has fired — the channel changed, or it was never polled — does the
//! next poll look at the channel; every other poll is an atomic swap.
//!
//! Flow: `server::drive` (and `drive_h2`) poll the hyper connection, then
//! [`StopWatch::poll_stopped`]; the channel's waker sets `woken` and wakes
//! the connection's task through the [`AtomicWaker`] registered there.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;
use tokio::sync::watch;

/// Completes once the shutdown signal is `true`; see the module docs.
pub struct StopWatch {
    stopped: Pin<Box<dyn Future<Output = ()> + Send>>,
    signal: Arc<Signal>,
    waker: Waker,
}

/// Set by the channel's wake-up; wakes the task that polls the watch.
struct Signal {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Signal {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl StopWatch {
    pub fn new(mut stop: watch::Receiver<bool>) -> Self {
        let signal = Arc::new(Signal {
            // Not polled yet: the first poll must register with the channel.
            woken: AtomicBool::new(true),
            task: AtomicWaker::new(),
        });
        StopWatch {
            // A closed channel (the sender dropped) stops too.
            stopped: Box::pin(async move {
                let _ = stop.wait_for(|stop| *stop).await;
            }),
            waker: Waker::from(Arc::clone(&signal)),
            signal,
        }
    }

    /// `Ready` once the signal is `true`; otherwise `cx` is woken when the
    /// channel changes.
    pub fn poll_stopped(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        self.signal.task.register(cx.waker());
        if !self.signal.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        self.stopped
            .as_mut()
            .poll(&mut Context::from_waker(&self.waker))
    }
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn completes_when_the_signal_turns_true_and_wakes_the_task() {
        let (sender, receiver) = watch::channel(false);
        let mut watch = StopWatch::new(receiver);
        let waiting = tokio::spawn(async move { poll_fn(|cx| watch.poll_stopped(cx)).await });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        sender.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("woken by the signal")
            .unwrap();
    }

    #[tokio::test]
    async fn a_signal_already_true_completes_at_once() {
        let (_sender, receiver) = watch::channel(true);
        let mut watch = StopWatch::new(receiver);
        poll_fn(|cx| watch.poll_stopped(cx)).await;
    }

    #[tokio::test]
    async fn other_wakes_do_not_poll_the_channel_and_a_false_value_is_no_stop() {
        let (sender, receiver) = watch::channel(false);
        let mut watch = StopWatch::new(receiver);
        let waker = Waker::noop();
        let mut cx = Context::from_waker(waker);
        assert!(watch.poll_stopped(&mut cx).is_pending());
        assert!(watch.poll_stopped(&mut cx).is_pending());
        // A change to false wakes the watch but is no stop; true is.
        sender.send(false).unwrap();
        assert!(watch.poll_stopped(&mut cx).is_pending());
        sender.send(true).unwrap();
        assert!(watch.poll_stopped(&mut cx).is_ready());
    }

    #[tokio::test]
    async fn a_dropped_sender_stops() {
        let (sender, receiver) = watch::channel(false);
        let mut watch = StopWatch::new(receiver);
        let mut cx = Context::from_waker(Waker::noop());
        assert!(watch.poll_stopped(&mut cx).is_pending());
        drop(sender);
        assert!(watch.poll_stopped(&mut cx).is_ready());
    }
}
