//! `--busy-poll` (issue 17, goal 2): while a request waits for its
//! response, the sidecar polls its sockets instead of sleeping, so that a
//! quick response is read without waking an idle CPU; and it stops doing
//! so for an app whose responses take longer than the window, so a slow
//! app does not make its sidecar burn CPU.
//!
//! What a user can check, and what these tests assert through the real
//! sidecar process: every response arrives intact either way, the spins
//! show up in `meshlet_busy_poll_total{outcome}` and
//! `meshlet_busy_poll_seconds_total`, and behind a slow app the time spent
//! spinning stays at about one window in total, not one per request.
//! The windows are chosen far from loopback timings (50 ms against a
//! response of ~1 ms; 10 ms against an app that takes 100 ms), so a busy
//! machine cannot flip an outcome.

use std::time::Duration;

use meshlet_e2e::metrics::Scrape;
use meshlet_e2e::upstream::Upstream;
use meshlet_e2e::SidecarProcess;

/// Sequential requests in each phase.
const REQUESTS: usize = 12;

async fn started(name: &str, window: &str) -> (Upstream, SidecarProcess) {
    let app = Upstream::start(name).await;
    let sidecar = SidecarProcess::builder(name, app.port())
        .arg("--busy-poll")
        .arg(window)
        .arg("--tracing")
        .arg("off")
        .start()
        .await;
    sidecar.wait_routes_to_app().await;
    (app, sidecar)
}

/// `REQUESTS` GETs one after another; each must be a 200 from the app.
async fn sequential_requests(sidecar: &SidecarProcess) {
    for i in 0..REQUESTS {
        let reply = meshlet_e2e::client::get(sidecar.inbound, "/")
            .await
            .unwrap_or_else(|e| panic!("request {i} failed through the sidecar: {e}"));
        assert_eq!(reply.status, 200, "request {i}: {reply:?}");
    }
}

struct Spins {
    caught: f64,
    missed: f64,
    seconds: f64,
}

async fn spins(sidecar: &SidecarProcess) -> Spins {
    let scrape = Scrape::of(sidecar.admin).await;
    Spins {
        caught: scrape.sum("meshlet_busy_poll_total", &[("outcome", "caught")]),
        missed: scrape.sum("meshlet_busy_poll_total", &[("outcome", "missed")]),
        seconds: scrape.sum("meshlet_busy_poll_seconds_total", &[]),
    }
}

#[tokio::test]
async fn a_quick_response_is_caught_by_polling_and_arrives_intact() {
    let (_app, sidecar) = started("quick-app", "50ms").await;
    let before = spins(&sidecar).await;
    sequential_requests(&sidecar).await;
    let after = spins(&sidecar).await;
    let caught = after.caught - before.caught;
    assert!(
        caught >= (REQUESTS / 2) as f64,
        "only {caught} of {REQUESTS} loopback responses were caught by a 50 ms busy-poll \
         window (missed: {}): the sidecar slept instead of polling",
        after.missed - before.missed
    );
    assert!(after.seconds > before.seconds, "no time spent polling");
}

#[tokio::test]
async fn behind_a_slow_app_the_sidecar_stops_spinning_after_the_first_miss() {
    let (app, sidecar) = started("slow-app", "10ms").await;
    app.set_delay(Duration::from_millis(100));
    let before = spins(&sidecar).await;
    sequential_requests(&sidecar).await;
    let after = spins(&sidecar).await;
    let missed = after.missed - before.missed;
    let spent = after.seconds - before.seconds;
    // The first slow response moves the average wait (100 ms / 8 = 12.5
    // ms) over the 10 ms window: one miss, then no more spinning. Spinning
    // on every request would be 12 misses and ~120 ms.
    assert!(
        missed <= 1.0,
        "{missed} spins missed behind an app that takes 100 ms (window 10 ms): the \
         sidecar keeps spinning for a slow app"
    );
    assert!(
        spent < 0.05,
        "{spent:.3} s spent spinning for {REQUESTS} requests to an app that takes 100 ms \
         (window 10 ms): at most about one window is expected"
    );
}
