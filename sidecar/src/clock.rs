//! One clock read per wake-up of a client connection's task, shared by the
//! time stamps its requests take in it.
//!
//! Why: a proxied request stamps the time six times — its arrival, its
//! deadline, the pool's idle check of the upstream connection, the app's
//! last answer, the client connection going idle, and the request's
//! duration — and each read of the clock is a `clock_gettime` call (~25 ns
//! on a VM; 1.2 % of the sidecar's CPU under load, `perf`). The stamps are
//! taken in two wake-ups of the connection's task (the request read, the
//! response read), and none of them needs to tell apart two moments of one
//! wake-up: a wake-up of the task takes microseconds, the stamps measure
//! and limit milliseconds and more.
//!
//! What: [`Stamped`] wraps a connection's task future. While it is being
//! polled, the first [`now`] reads the clock and the later ones in the same
//! poll return that reading; the poll's end forgets it (also when the poll
//! panics). Outside such a poll — other tasks, tests — [`now`] reads the
//! clock each time, as `tokio::time::Instant::now()` (so a paused test
//! clock still applies).
//!
//! Only stamps use it: a point in time compared with another one taken in
//! another wake-up. Never a loop that waits for time to pass within one
//! poll (it would not pass), nor a measurement of work done inside one
//! poll (it would read zero).
//!
//! Flow: `listen::server::serve` spawns each connection as
//! `Stamped::new(..)`; `telemetry::observe` (arrival, duration),
//! `upstream::forward` (deadline; the retry budget's first stamp, the
//! breakers' and the split's checks), `policy::breaker` (an outcome's
//! time), `upstream::h1_client` (idle checks and marks) and
//! `listen::framing` (the connection's idle mark) call [`now`].

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::time::Instant;

/// What [`now`] returns on this thread.
#[derive(Clone, Copy)]
enum Reading {
    /// Not inside a [`Stamped`] poll: read the clock each time.
    Off,
    /// Inside one, the clock not read yet.
    Unread,
    /// Inside one, read at this instant.
    At(Instant),
}

thread_local! {
    static READING: Cell<Reading> = const { Cell::new(Reading::Off) };
}

/// The time now, or the reading already taken in the current poll of a
/// [`Stamped`] future (see the module docs).
pub fn now() -> Instant {
    READING.with(|reading| match reading.get() {
        Reading::Off => Instant::now(),
        Reading::Unread => {
            let now = Instant::now();
            reading.set(Reading::At(now));
            now
        }
        Reading::At(now) => now,
    })
}

/// [`now`] as a `std` instant.
pub fn now_std() -> std::time::Instant {
    now().into_std()
}

pin_project_lite::pin_project! {
    /// A future whose polls share one clock reading (see the module docs).
    pub struct Stamped<F> {
        #[pin]
        inner: F,
    }
}

impl<F> Stamped<F> {
    pub fn new(inner: F) -> Self {
        Stamped { inner }
    }
}

impl<F: Future> Future for Stamped<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let _scope = PollScope::enter();
        self.project().inner.poll(cx)
    }
}

/// Puts back what the thread had before a poll began (nested polls keep
/// the outer reading's scope), on return and on unwind alike.
struct PollScope(Reading);

impl PollScope {
    fn enter() -> PollScope {
        PollScope(READING.with(|reading| reading.replace(Reading::Unread)))
    }
}

impl Drop for PollScope {
    fn drop(&mut self) {
        READING.with(|reading| reading.set(self.0));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Polls `f` once, inside a `Stamped` poll.
    fn poll_stamped<T>(f: impl FnOnce() -> T) -> T {
        let mut f = Some(f);
        let mut out = None;
        let mut stamped = std::pin::pin!(Stamped::new(std::future::poll_fn(|_| {
            out = Some((f.take().expect("polled once"))());
            Poll::Ready(())
        })));
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(stamped.as_mut().poll(&mut cx).is_ready());
        out.expect("ran")
    }

    #[test]
    fn one_poll_shares_one_reading() {
        let (first, second) = poll_stamped(|| {
            let first = now();
            std::thread::sleep(Duration::from_millis(5));
            (first, now())
        });
        assert_eq!(first, second);
    }

    #[test]
    fn each_poll_reads_the_clock_again() {
        let first = poll_stamped(now);
        std::thread::sleep(Duration::from_millis(5));
        let second = poll_stamped(now);
        assert!(second >= first + Duration::from_millis(5));
    }

    #[test]
    fn outside_a_stamped_poll_every_call_reads_the_clock() {
        poll_stamped(now);
        let first = now();
        std::thread::sleep(Duration::from_millis(5));
        assert!(now() >= first + Duration::from_millis(5));
    }

    #[test]
    fn a_panicking_poll_leaves_the_clock_running() {
        let panicked = std::panic::catch_unwind(|| {
            poll_stamped(|| {
                now();
                panic!("inside the poll");
            })
        });
        assert!(panicked.is_err());
        let first = now();
        std::thread::sleep(Duration::from_millis(5));
        assert!(now() >= first + Duration::from_millis(5));
    }
}
