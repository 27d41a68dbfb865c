//! Busy polling for a response that is about to arrive.
//!
//! Why: between writing a request upstream and reading the response, a
//! sidecar has nothing to do, so its runtime blocks in `epoll_wait` and the
//! CPU goes idle. When the response comes a few tens of microseconds later,
//! the kernel must wake the idle CPU first. On a virtual machine that wake
//! is the largest part of a proxy hop's latency: an idle vCPU halts, and an
//! interrupt to a halted vCPU passes through the hypervisor (measured on the
//! 2-core benchmark VM: a proxy hop adds ~140 µs at p50 for nginx and the
//! sidecar alike, where the proxies' own work is ~20 µs). Linux's
//! `busy_poll` does the same for NIC queues; it cannot help loopback or
//! veth traffic, which is what a sidecar talks to.
//!
//! What: while at least one request waits for its response head, the
//! single-threaded runtime keeps polling its sockets (`epoll_wait` with a
//! zero timeout) instead of blocking, for up to a *window* (`--busy-poll`)
//! since the last progress. A response that arrives within
//! the window is read without a wake-up.
//!
//! Cost, and how it is bounded: spinning burns CPU that blocking would
//! not, but only while a response is awaited, only when responses usually
//! come within the window, and never longer than the window without
//! progress. Every guard measures how long its response took; the spinner
//! runs only while the moving average of those waits (the last ~8) is
//! within the window. A sidecar in front of a slower app, or a second hop
//! further away, so stops spinning after a few responses and blocks as
//! before; an idle sidecar never spins. `meshlet_busy_poll_seconds_total`
//! counts the time spent spinning, `meshlet_busy_poll_total{outcome}` the
//! spins.
//!
//! How: one spinner task per process ([`start`]). The forwarder holds an
//! [`Awaiting`] guard from sending a request until its response head (or
//! failure) arrives ([`awaiting_response`]); creating one wakes the spinner
//! if it sleeps. The spinner yields to the runtime in a loop; tokio's
//! current-thread scheduler, holding a yielded task, polls its I/O driver
//! without blocking, then runs every task an event made ready (the
//! response's), then the spinner again. The spinner stops when nothing is
//! awaited any more (caught) or when the window passed without progress
//! (missed), then sleeps until the next request goes out.
//!
//! Only the single-threaded runtime (`--worker-threads 1`, the default)
//! spins: with several workers a woken worker's task may run anywhere.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::telemetry::metrics::BusyPollMetrics;

/// Shared between the forwarders' guards and the spinner task.
struct State {
    /// Requests waiting for their response head.
    awaiting: AtomicUsize,
    /// Bumped by every guard created or dropped: progress the spinner sees.
    progress: AtomicU64,
    /// The spinner waits on `wake` (a guard must notify it).
    sleeping: AtomicBool,
    wake: Notify,
    /// The configured window in nanoseconds (0: no spinner).
    window_ns: AtomicU64,
    /// Moving average of the waits for a response head, in nanoseconds.
    average_wait_ns: AtomicU64,
}

static STATE: State = State {
    awaiting: AtomicUsize::new(0),
    progress: AtomicU64::new(0),
    sleeping: AtomicBool::new(false),
    wake: Notify::const_new(),
    window_ns: AtomicU64::new(0),
    average_wait_ns: AtomicU64::new(0),
};

impl State {
    /// Whether responses usually come within the window.
    fn worth_spinning(&self) -> bool {
        let window = self.window_ns.load(Ordering::Relaxed);
        window > 0 && self.average_wait_ns.load(Ordering::Relaxed) <= window
    }

    /// Folds one wait into the moving average (weight 1/8; under several
    /// threads an update may be lost, which only slows the average).
    fn record_wait(&self, wait: Duration) {
        let wait = u64::try_from(wait.as_nanos()).unwrap_or(u64::MAX);
        let average = self.average_wait_ns.load(Ordering::Relaxed);
        self.average_wait_ns
            .store(moving_average(average, wait), Ordering::Relaxed);
    }
}

/// The next moving average after `sample`: 7/8 of the old plus 1/8 of it.
fn moving_average(average: u64, sample: u64) -> u64 {
    average - average / 8 + sample / 8
}

/// Set once by [`start`]: without it the guards only count.
static STARTED: OnceLock<()> = OnceLock::new();

/// Held while a request waits for its response head (see the module docs);
/// `None` inside when no spinner runs (nothing to measure for).
#[must_use = "the spinner polls only while the guard lives"]
pub struct Awaiting(Option<Instant>);

/// Marks one request as waiting for its response head until the guard is
/// dropped; wakes the spinner if it sleeps and spinning is worth it.
pub fn awaiting_response() -> Awaiting {
    if STARTED.get().is_none() {
        return Awaiting(None);
    }
    STATE.awaiting.fetch_add(1, Ordering::Relaxed);
    STATE.progress.fetch_add(1, Ordering::Relaxed);
    if STATE.worth_spinning()
        && STATE.sleeping.load(Ordering::Relaxed)
        && STATE.sleeping.swap(false, Ordering::AcqRel)
    {
        STATE.wake.notify_one();
    }
    Awaiting(Some(Instant::now()))
}

impl Drop for Awaiting {
    fn drop(&mut self) {
        if let Some(since) = self.0 {
            STATE.record_wait(since.elapsed());
            STATE.awaiting.fetch_sub(1, Ordering::Relaxed);
            STATE.progress.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Spawns the spinner on the current (single-threaded) runtime with the
/// configured window; a zero window, or a second call, spawns nothing.
pub fn start(window: Duration, metrics: BusyPollMetrics) {
    if window.is_zero() || STARTED.get().is_some() {
        return;
    }
    let window_ns = u64::try_from(window.as_nanos()).unwrap_or(u64::MAX);
    STATE.window_ns.store(window_ns, Ordering::Relaxed);
    tokio::spawn(spin(window, metrics));
    let _ = STARTED.set(());
}

/// What one spin ended with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Nothing is awaited any more.
    Caught,
    /// The window passed without progress.
    Missed,
}

async fn spin(window: Duration, metrics: BusyPollMetrics) {
    loop {
        sleep_until_worth_it().await;
        let began = Instant::now();
        let outcome = spin_once(window).await;
        metrics.seconds.inc_by(began.elapsed().as_secs_f64());
        match outcome {
            Outcome::Caught => metrics.caught.inc(),
            Outcome::Missed => {
                metrics.missed.inc();
                // Requests still wait: sleep until the next one goes out
                // rather than spin again for the slow ones.
                park().await;
            }
        }
    }
}

/// Yields to the runtime until nothing is awaited or `window` passes
/// without progress.
async fn spin_once(window: Duration) -> Outcome {
    let mut seen = STATE.progress.load(Ordering::Relaxed);
    let mut since = Instant::now();
    loop {
        tokio::task::yield_now().await;
        if STATE.awaiting.load(Ordering::Relaxed) == 0 {
            return Outcome::Caught;
        }
        let now = Instant::now();
        let progress = STATE.progress.load(Ordering::Relaxed);
        if progress != seen {
            seen = progress;
            since = now;
        } else if now.duration_since(since) >= window {
            return Outcome::Missed;
        }
    }
}

/// Returns once at least one request awaits its response and responses
/// usually come within the window.
async fn sleep_until_worth_it() {
    while STATE.awaiting.load(Ordering::Relaxed) == 0 || !STATE.worth_spinning() {
        park().await;
    }
}

/// Sleeps until a guard is created (or a stored wake-up is pending).
async fn park() {
    let notified = STATE.wake.notified();
    tokio::pin!(notified);
    notified.as_mut().enable();
    STATE.sleeping.store(true, Ordering::Release);
    notified.await;
    STATE.sleeping.store(false, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_average_follows_a_new_level_within_a_few_dozen_waits() {
        let mut average = 0;
        for _ in 0..40 {
            average = moving_average(average, 800_000);
        }
        assert!(average > 790_000 && average <= 800_000, "{average}");
        for _ in 0..40 {
            average = moving_average(average, 80_000);
        }
        assert!(average < 90_000, "{average}");
    }
}
