//! Busy polling for a response, or a next request, that is about to arrive.
//!
//! Why: between writing a request upstream and reading the response, a
//! sidecar has nothing to do, so its runtime blocks in `epoll_wait` and the
//! CPU goes idle. When the response comes a few tens of microseconds later,
//! the kernel must wake the idle CPU first. On a virtual machine that wake
//! is the largest part of a proxy hop's latency: an idle vCPU halts, and an
//! interrupt to a halted vCPU passes through the hypervisor (measured on the
//! 2-core benchmark VM: a proxy hop adds ~140 µs at p50 for nginx and the
//! sidecar alike, where the proxies' own work is ~20 µs). The same holds
//! between writing a response to a kept-alive client and reading its next
//! request: a client that sends one request after the other wakes the
//! sidecar's CPU twice per request. Linux's `busy_poll` does the same for
//! NIC queues; it cannot help loopback or veth traffic, which is what a
//! sidecar talks to.
//!
//! What: while at least one request waits for its response head, or one
//! client connection waits for its next request (a kept-alive HTTP/1.1
//! connection of the sidecar's own server, or an HTTP/2 connection between
//! requests: h2c, the mesh hop), the single-threaded runtime keeps polling its
//! sockets (`epoll_wait` with a zero timeout) instead of blocking, for up
//! to a *window* (`--busy-poll`) since the last progress. A response or a
//! request that arrives within the window is read without a wake-up.
//!
//! Cost, and how it is bounded: spinning burns CPU that blocking would
//! not, but only while something is awaited, only when it usually comes
//! within the window, and never longer than the window without progress.
//! Every guard measures how long its wait took, and each [`Wait`] kind
//! keeps its own moving average (the last ~8 waits; a wait counts at most
//! 16 windows, so that one long idle connection is forgotten after a few
//! quick ones); the spinner runs only for the kinds whose average is
//! within the window. For a next request the wait that counts is not the
//! connection's own but the time since the sidecar's previous arrival (the
//! last guard of any kind dropped: a response head or a request came in),
//! because a spin catches the next request on any connection: clients at
//! a fixed rate spread over many connections (each connection quiet for a
//! while, the sidecar not) are polled for when their requests come within
//! the window of the previous arrival, and a new connection whose request
//! is already there when it is read does not pass for a quick one. A
//! sidecar in front of a slower app, or a second hop further away, so
//! stops spinning for responses after a few of them, and one whose clients
//! pause between requests longer than the window stops spinning for
//! requests; an idle sidecar never spins. `meshlet_busy_poll_seconds_total`
//! counts the time spent spinning, `meshlet_busy_poll_total{outcome}` the
//! spins, and `meshlet_busy_poll_arrivals_total{kind,polled}` each awaited
//! arrival by whether it was read during a spin (no wake-up) or after the
//! sidecar slept: per kind, how much of the traffic the polling covers. A kind
//! is not spun for before one of its waits has been seen to end within the
//! window (the averages start just above it): a pool of new connections
//! that stay quiet costs no spin at all.
//!
//! How: one spinner task per process ([`start`]). The forwarder holds a
//! guard from sending a request until its response head arrives
//! ([`awaiting_response`]; a failed or abandoned forward cancels it), the
//! HTTP/1.1 server one while
//! a kept-alive connection reads for its next request, and
//! `listen::h2_guard` one on an HTTP/2 connection from a read that found
//! nothing with no request in flight until the next `HEADERS` frame
//! ([`awaiting_next_request`]; a connection that closes instead cancels
//! its guard, [`Awaiting::cancel`]: no arrival to count). Only the proxy
//! listeners await next requests: the admin listener's scrapes and probes
//! and the gateway's HTTPS redirect do not (`Handler::POLLS_FOR_NEXT_REQUEST`);
//! creating one wakes the spinner if it
//! sleeps. The spinner yields to the runtime in a loop; tokio's
//! current-thread scheduler, holding a yielded task, polls its I/O driver
//! without blocking, then runs every task an event made ready (the
//! response's), then the spinner again. The spinner stops when nothing
//! worth spinning for is awaited any more (caught) or when the window
//! passed without progress (missed), then sleeps until the next guard is
//! created.
//!
//! Only the single-threaded runtime (`--worker-threads 1`, the default)
//! spins: with several workers a woken worker's task may run anywhere.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::telemetry::metrics::BusyPollMetrics;

/// What an [`Awaiting`] guard waits for; each kind keeps its own count and
/// moving average.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// A request sent upstream, for its response head.
    Response,
    /// A kept-alive client connection, for its next request.
    NextRequest,
}

impl Wait {
    const ALL: [Wait; 2] = [Wait::Response, Wait::NextRequest];

    fn waits(self) -> &'static Waits {
        &STATE.waits[self as usize]
    }
}

/// The guards of one [`Wait`] kind.
struct Waits {
    /// Guards alive.
    awaiting: AtomicUsize,
    /// Moving average of their waits, in nanoseconds (from just above the
    /// window: see [`start`]).
    average_wait_ns: AtomicU64,
}

impl Waits {
    const fn new() -> Waits {
        Waits {
            awaiting: AtomicUsize::new(0),
            average_wait_ns: AtomicU64::new(0),
        }
    }
}

/// Shared between the guards and the spinner task.
struct State {
    /// Indexed by [`Wait`].
    waits: [Waits; 2],
    /// Bumped by every guard created or dropped: progress the spinner sees.
    progress: AtomicU64,
    /// When the last guard of any kind was dropped (an arrival), in
    /// nanoseconds since [`clock_base`] (0: none yet).
    last_arrival_ns: AtomicU64,
    /// The spinner waits on `wake` (a guard must notify it).
    sleeping: AtomicBool,
    /// The spinner is inside a spin: an arrival now is read without a
    /// wake-up.
    spinning: AtomicBool,
    wake: Notify,
    /// The configured window in nanoseconds (0: no spinner).
    window_ns: AtomicU64,
}

static STATE: State = State {
    waits: [Waits::new(), Waits::new()],
    progress: AtomicU64::new(0),
    last_arrival_ns: AtomicU64::new(0),
    sleeping: AtomicBool::new(false),
    spinning: AtomicBool::new(false),
    wake: Notify::const_new(),
    window_ns: AtomicU64::new(0),
};

impl State {
    /// Whether waits of `kind` usually end within the window.
    fn worth_spinning(&self, kind: Wait) -> bool {
        let window = self.window_ns.load(Ordering::Relaxed);
        window > 0 && kind.waits().average_wait_ns.load(Ordering::Relaxed) <= window
    }

    /// Whether a guard of a kind worth spinning for is alive.
    fn spinning_pays(&self) -> bool {
        Wait::ALL.into_iter().any(|kind| {
            kind.waits().awaiting.load(Ordering::Relaxed) > 0 && self.worth_spinning(kind)
        })
    }

    /// Folds one wait into its kind's moving average (weight 1/8; under
    /// several threads an update may be lost, which only slows the
    /// average). A wait counts at most 16 windows: enough to lift any
    /// average over the window at once (from 0 to twice the window), short enough to be forgotten after
    /// a few quick waits.
    fn record_wait(&self, kind: Wait, wait: Duration) {
        let sample = sample_ns(wait, self.window_ns.load(Ordering::Relaxed));
        let average = &kind.waits().average_wait_ns;
        let next = moving_average(average.load(Ordering::Relaxed), sample);
        average.store(next, Ordering::Relaxed);
    }
}

/// Every kind's average before its first wait: just above the window, so
/// that nothing is polled for before a wait of that kind ended within it.
fn starting_average(window_ns: u64) -> u64 {
    window_ns.saturating_add(1)
}

/// What a wait counts in the average: its length, at most 16 windows.
fn sample_ns(wait: Duration, window_ns: u64) -> u64 {
    let wait = u64::try_from(wait.as_nanos()).unwrap_or(u64::MAX);
    wait.min(window_ns.saturating_mul(16))
}

/// The next moving average after `sample`: 7/8 of the old plus 1/8 of it.
fn moving_average(average: u64, sample: u64) -> u64 {
    average - average / 8 + sample / 8
}

/// Set once by [`start`] (the arrivals' counters): without it the guards
/// hold nothing.
static STARTED: OnceLock<BusyPollMetrics> = OnceLock::new();

/// Held while a request waits for its response head, or a client
/// connection for its next request (see the module docs); without a
/// spinner it holds nothing (nothing to measure for).
#[must_use = "the spinner polls only while the guard lives"]
pub struct Awaiting(Option<(Wait, Instant)>);

/// Whether busy polling is on (the spinner started).
pub fn enabled() -> bool {
    STARTED.get().is_some()
}

/// Marks one request as waiting for its response head until
/// [`ResponseAwaited::arrived`]; wakes the spinner if it sleeps and
/// spinning is worth it. Dropped without it (the send failed, or the
/// client went away and the forward was dropped), the wait is cancelled.
pub fn awaiting_response() -> ResponseAwaited {
    ResponseAwaited(Some(awaiting(Wait::Response)))
}

/// A request's wait for its response head: counts as an arrival only when
/// told ([`ResponseAwaited::arrived`]); dropped otherwise, it cancels
/// ([`Awaiting::cancel`]), so a failed or abandoned forward is neither an
/// arrival nor a sample in the average.
#[must_use = "the spinner polls only while the guard lives"]
pub struct ResponseAwaited(Option<Awaiting>);

impl ResponseAwaited {
    /// The response head arrived.
    pub fn arrived(mut self) {
        drop(self.0.take());
    }
}

impl Drop for ResponseAwaited {
    fn drop(&mut self) {
        if let Some(awaiting) = self.0.take() {
            awaiting.cancel();
        }
    }
}

/// Marks one kept-alive client connection as waiting for its next request
/// until the guard is dropped (as [`awaiting_response`]).
pub fn awaiting_next_request() -> Awaiting {
    awaiting(Wait::NextRequest)
}

fn awaiting(kind: Wait) -> Awaiting {
    if STARTED.get().is_none() {
        return Awaiting(None);
    }
    kind.waits().awaiting.fetch_add(1, Ordering::Relaxed);
    STATE.progress.fetch_add(1, Ordering::Relaxed);
    if STATE.worth_spinning(kind)
        && STATE.sleeping.load(Ordering::Relaxed)
        && STATE.sleeping.swap(false, Ordering::AcqRel)
    {
        STATE.wake.notify_one();
    }
    Awaiting(Some((kind, Instant::now())))
}

impl Awaiting {
    /// Ends the wait without an arrival (the connection closed, the
    /// request was cancelled): the guard stops counting as alive, and
    /// neither the averages nor the arrivals count it.
    pub fn cancel(mut self) {
        if let Some((kind, _)) = self.0.take() {
            kind.waits().awaiting.fetch_sub(1, Ordering::Relaxed);
            STATE.progress.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Drop for Awaiting {
    fn drop(&mut self) {
        if let Some((kind, since)) = self.0 {
            // One clock read for both.
            let now = Instant::now();
            let since_previous_arrival = mark_arrival(now);
            let wait = match kind {
                Wait::Response => now.duration_since(since),
                Wait::NextRequest => since_previous_arrival,
            };
            STATE.record_wait(kind, wait);
            if let Some(metrics) = STARTED.get() {
                let polled = STATE.spinning.load(Ordering::Relaxed);
                metrics.arrivals[kind as usize][usize::from(polled)].inc();
            }
            kind.waits().awaiting.fetch_sub(1, Ordering::Relaxed);
            STATE.progress.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The process's clock for [`State::last_arrival_ns`]: set by
/// [`start`], before any guard counts.
static CLOCK_BASE: OnceLock<Instant> = OnceLock::new();

fn clock_base() -> Instant {
    *CLOCK_BASE.get_or_init(Instant::now)
}

/// Marks `now` as the latest arrival; returns the time since the previous
/// one (the first: unbounded).
fn mark_arrival(now: Instant) -> Duration {
    let now = u64::try_from(now.duration_since(clock_base()).as_nanos()).unwrap_or(u64::MAX);
    // 0 stands for "none yet"; an arrival in the clock's first nanosecond is 1.
    let previous = STATE.last_arrival_ns.swap(now.max(1), Ordering::Relaxed);
    gap_since(previous, now)
}

/// The gap between a previous mark (0: none) and `now`, in nanoseconds.
fn gap_since(previous_ns: u64, now_ns: u64) -> Duration {
    if previous_ns == 0 {
        return Duration::MAX;
    }
    Duration::from_nanos(now_ns.saturating_sub(previous_ns))
}

/// Spawns the spinner on the current (single-threaded) runtime with the
/// configured window; a zero window, or a second call, spawns nothing.
pub fn start(window: Duration, metrics: BusyPollMetrics) {
    if window.is_zero() || STARTED.get().is_some() {
        return;
    }
    let window_ns = u64::try_from(window.as_nanos()).unwrap_or(u64::MAX);
    STATE.window_ns.store(window_ns, Ordering::Relaxed);
    for kind in Wait::ALL {
        kind.waits()
            .average_wait_ns
            .store(starting_average(window_ns), Ordering::Relaxed);
    }
    clock_base();
    let _ = STARTED.set(metrics.clone());
    tokio::spawn(spin(window, metrics));
}

/// What one spin ended with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Nothing worth spinning for is awaited any more.
    Caught,
    /// The window passed without progress.
    Missed,
}

async fn spin(window: Duration, metrics: BusyPollMetrics) {
    loop {
        sleep_until_worth_it().await;
        let began = Instant::now();
        STATE.spinning.store(true, Ordering::Relaxed);
        let outcome = spin_once(window).await;
        STATE.spinning.store(false, Ordering::Relaxed);
        metrics.seconds.inc_by(began.elapsed().as_secs_f64());
        match outcome {
            Outcome::Caught => metrics.caught.inc(),
            Outcome::Missed => {
                metrics.missed.inc();
                // Guards are still alive: sleep until the next one is
                // created rather than spin again for the slow ones.
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
        if !STATE.spinning_pays() {
            return Outcome::Caught;
        }
        // Another process that is runnable on this CPU (the app, another
        // sidecar) runs now rather than at the end of our time slice: the
        // kernel lets a running task keep the CPU for a slice (~3 ms) after
        // a wake-up elsewhere, so without this two sidecars polling on one
        // core add milliseconds to each other's hops (measured: 2.1 ms p50
        // over two mTLS hops against 0.15 ms without polling). With
        // nothing else runnable it returns at once.
        let _ = nix::sched::sched_yield();
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

/// Returns once a guard is alive whose kind usually ends its wait within
/// the window.
async fn sleep_until_worth_it() {
    while !STATE.spinning_pays() {
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

    #[test]
    fn one_quick_wait_brings_an_average_that_starts_just_above_the_window_within_it() {
        let window = 200_000;
        let start = starting_average(window);
        assert!(start > window, "polled for before any wait: {start}");
        let after_one = moving_average(start, sample_ns(Duration::from_micros(60), window));
        assert!(after_one <= window, "{after_one}");
        let after_a_slow_one = moving_average(start, sample_ns(Duration::from_millis(1), window));
        assert!(after_a_slow_one > window, "{after_a_slow_one}");
    }

    #[test]
    fn the_first_arrival_has_no_gap_to_count_and_later_ones_the_time_between() {
        assert_eq!(gap_since(0, 5_000), Duration::MAX);
        assert_eq!(gap_since(1_000, 5_000), Duration::from_nanos(4_000));
        // Marks from several threads may land out of order: never negative.
        assert_eq!(gap_since(6_000, 5_000), Duration::ZERO);
    }

    #[test]
    fn a_connection_idle_for_a_minute_stops_the_spinning_once_and_is_forgotten_soon() {
        let window = 200_000; // 200 µs
        let quick = sample_ns(Duration::from_micros(60), window);
        let mut average = 0;
        for _ in 0..40 {
            average = moving_average(average, quick);
        }
        assert!(
            average <= window,
            "quick waits are worth spinning for: {average}"
        );
        average = moving_average(average, sample_ns(Duration::from_secs(60), window));
        assert!(
            average > window,
            "a long wait stops the spinning at once: {average}"
        );
        let mut quick_waits = 0;
        while average > window {
            average = moving_average(average, quick);
            quick_waits += 1;
        }
        // Uncapped, 60 s would take ~90 quick waits to be forgotten.
        assert!(
            quick_waits <= 12,
            "{quick_waits} quick waits to forget one idle minute"
        );
    }
}
