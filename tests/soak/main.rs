//! The soak (issue 16, item 9): constant load through a caller sidecar to
//! three instances of a service while instances are SIGKILLed and
//! restarted, SIGTERMed (graceful drain) and restarted, and policies are
//! applied and rolled back with `meshctl` — all real processes.
//!
//! ```text
//!  load (8 keep-alive clients, paced) ─► loadgen's sidecar (outbound) ══mTLS h2══► backend-N's sidecar ─► demo-service
//!                                                                        (3 instances: one never touched,
//!                                         control plane ◄─ register,      two churned by chaos.rs)
//!                                         heartbeats, watch ─► every sidecar
//!  meshctl apply / rollback ─► control plane
//! ```
//!
//! - `load.rs` — the clients and each request's [`load::Outcome`] (times,
//!   status, `x-meshlet-reason`, the port that answered or failed).
//! - `chaos.rs` — the instances and the schedule (SIGKILL, apply, SIGTERM,
//!   rollback, ..., and a `RetryPolicy` at the middle of the run: the
//!   first half shows what is lost without one, the second what a retry
//!   saves).
//! - `rss.rs` — VmRSS of the caller sidecar, the untouched instance's
//!   sidecar and the control plane every 2 s, and least-squares slopes.
//! - `report.rs` — unavoidable vs avoidable failures, and the table.
//!
//! Duration: `MESHLET_SOAK_SECS` (default 60: the version `tests/run.sh`
//! runs in release); by hand, `MESHLET_SOAK_SECS=600 cargo test --release
//! -p meshlet-e2e --test soak -- --nocapture`. Also `MESHLET_SOAK_RPS`
//! (total request rate, default 250) and `MESHLET_SOAK_STEP_SECS` (the
//! schedule's period, default 4). The table goes to stdout (shown with
//! `--nocapture`, and by cargo whenever the test fails).
//!
//! It asserts: no avoidable failure (a drain, a policy change, a restart
//! lose nothing; only requests in flight on a SIGKILLed instance may
//! fail) and none at all once the `RetryPolicy` applies, every kind of
//! event happened, the load ran, and flat RSS.

mod chaos;
mod load;
mod report;
mod rss;

use std::sync::Arc;
use std::time::{Duration, Instant};

use meshlet_e2e::metrics::Scrape;
use meshlet_e2e::{wait, ControlPlaneProcess, TempDir};

use chaos::{Action, Chaos, Instance, SERVICE};
use report::{Class, Phase};

const CLIENTS: usize = 8;
const RSS_EVERY: Duration = Duration::from_secs(2);
const CONTROL_PLANE: &str = "control plane";

/// The RSS slope a process may show over the second half of the run, in
/// MiB/min, for a fitted window of `window_secs`.
///
/// 1 MiB/min for a window of 5 minutes or more (the 10-minute soak): a
/// leak of 70 bytes per request at the default 250 req/s is 1 MiB/min,
/// and any leak worth the name is far above it (a leaked connection,
/// snapshot or span is kilobytes, at hundreds per second or once per
/// event). Noise stays well under it once caches are full: measured in
/// a 600 s release run, second-half slopes of -0.02 (caller sidecar),
/// +0.01 (the stable instance's sidecar) and +0.08 (control plane).
///
/// Shorter windows fall into the fill-up: the control plane's stats store
/// keeps 5 minutes of reports per instance (`stats::WINDOW_MS`), so its
/// RSS rises for the first 5 minutes by design (10 → 18 MiB, levelling
/// off), and a 0.5 MiB allocator step in a 30 s window is already a
/// 1 MiB/min slope. So the bound scales with 300 s / window for the
/// control plane and 120 s / window for sidecars (60 s run: 10 and 4
/// MiB/min; measured in debug: up to 2.4 and 0.7), which still fails a
/// per-request leak of a few hundred bytes.
fn rss_slope_bound(window_secs: f64, fill_up_secs: f64) -> f64 {
    const PER_MINUTE: f64 = 1.0;
    PER_MINUTE * (fill_up_secs / window_secs).max(1.0)
}

fn env_or(name: &str, default: f64) -> f64 {
    match std::env::var(name) {
        Ok(text) => text
            .parse()
            .unwrap_or_else(|_| panic!("{name}={text:?} is not a number")),
        Err(_) => default,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn constant_load_through_kills_drains_and_policy_changes_loses_only_in_flight_requests() {
    let secs = env_or("MESHLET_SOAK_SECS", 60.0);
    let rate = env_or("MESHLET_SOAK_RPS", 250.0);
    let step = Duration::from_secs_f64(env_or("MESHLET_SOAK_STEP_SECS", 4.0));
    assert!(secs >= 20.0, "MESHLET_SOAK_SECS must be at least 20");

    let dir = TempDir::new();
    let cp = Arc::new(ControlPlaneProcess::start(&dir.path.join("data"), &[]).await);
    let caller = Arc::new(Instance::start(&cp, "loadgen", "loadgen".into()).await);
    let stable = Arc::new(Instance::start(&cp, SERVICE, format!("{SERVICE}-stable")).await);
    let mut chaos = Chaos::new(&cp, caller.sidecar.admin, dir.path.clone());
    chaos.record(&stable);
    chaos.add().await;
    chaos.add().await;
    let caller_admin = caller.sidecar.admin;
    wait::until(
        "the caller routes to 3 instances",
        Duration::from_secs(30),
        || async {
            let routed = meshlet_e2e::admin::endpoints_of(caller_admin, SERVICE).await;
            (routed.len() == 3).then_some(())
        },
    )
    .await;

    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    let tracked: Vec<(String, rss::Reader)> = vec![
        ("caller sidecar (loadgen)".into(), {
            let caller = caller.clone();
            Box::new(move || caller.sidecar.rss_bytes())
        }),
        (format!("sidecar of {SERVICE}-stable"), {
            let stable = stable.clone();
            Box::new(move || stable.sidecar.rss_bytes())
        }),
        (CONTROL_PLANE.into(), {
            let cp = cp.clone();
            Box::new(move || cp.rss_bytes())
        }),
    ];
    let sampler = rss::Sampler::start(start, RSS_EVERY, tracked);
    let load = load::Load::start(caller.sidecar.outbound, SERVICE, CLIENTS, rate);

    let retry_began = chaos
        .run(
            start,
            end,
            step,
            start + Duration::from_secs_f64(secs / 2.0),
        )
        .await;
    tokio::time::sleep_until(end.into()).await;
    let outcomes = load.finish().await;
    let rss = sampler.finish().await;

    let rss_from = secs / 2.0;
    let run = report::Run {
        start,
        secs,
        clients: CLIENTS,
        rate,
        outcomes: &outcomes,
        incarnations: &chaos.incarnations,
        events: &chaos.events,
        retry_began,
        rss: &rss,
        rss_from,
    };
    let report = run.report();
    let mut text = report.text.clone();
    text.push_str(&mesh_responses(&caller, &stable).await);
    println!("{text}");

    // What the schedule did.
    let count = |f: fn(&Action) -> bool| chaos.events.iter().filter(|e| f(&e.action)).count();
    let kills = count(|a| matches!(a, Action::Kill(_)));
    let terms = count(|a| matches!(a, Action::Term(_)));
    let applies = count(|a| matches!(a, Action::Apply));
    let rollbacks = count(|a| matches!(a, Action::Rollback));
    assert!(
        kills >= 1 && terms >= 1 && applies >= 1 && rollbacks >= 1 && retry_began.is_some(),
        "the schedule ran every kind of event ({kills} SIGKILL, {terms} SIGTERM, {applies} \
         apply, {rollbacks} rollback, RetryPolicy {retry_began:?}){text}"
    );
    // The load ran (generous: the machine is shared).
    assert!(
        report.total as f64 >= 0.25 * rate * secs,
        "only {} requests in {secs} s at a target of {rate}/s{text}",
        report.total
    );
    assert_eq!(
        report.failures(None, Class::Avoidable),
        0,
        "avoidable failures (a drain, a policy change or a restart lost requests):\n{}{text}",
        report.avoidable.join("\n")
    );
    // With the RetryPolicy even the requests in flight on a killed
    // instance are tried again elsewhere (GET is idempotent; the budget
    // allows at least 10 retries per second, more than the clients ever
    // have in flight) — unless the response head was already passed on
    // and the body broke off: no retry can take that back.
    let unsaved = report.before_head.get(&Phase::Retry).copied().unwrap_or(0);
    assert_eq!(
        unsaved, 0,
        "requests lost on killed instances although a RetryPolicy applied{text}"
    );

    let window = secs - rss_from;
    for series in &rss {
        let fill_up = if series.name == CONTROL_PLANE {
            300.0
        } else {
            120.0
        };
        let bound = rss_slope_bound(window, fill_up);
        let slope = series
            .slope(rss_from)
            .unwrap_or_else(|| panic!("too few RSS samples of {}{text}", series.name));
        assert!(
            slope < bound,
            "{} grows {slope:.3} MiB/min over the last {window:.0} s (bound {bound:.2}){text}",
            series.name
        );
    }
}

/// The mesh's own answers as the two long-lived sidecars count them
/// (`meshlet_mesh_responses_total`), to cross-check the client's view.
async fn mesh_responses(caller: &Instance, stable: &Instance) -> String {
    let mut text = String::from("\nmeshlet_mesh_responses_total (sidecar, direction, reason):\n");
    for (name, admin) in [
        ("loadgen", caller.sidecar.admin),
        ("backend-stable", stable.sidecar.admin),
    ] {
        let scrape = Scrape::of(admin).await;
        let samples = scrape.matching("meshlet_mesh_responses_total", &[]);
        for sample in samples.filter(|s| s.value > 0.0) {
            text.push_str(&format!(
                "  {name:<15} {:<9} {:<26} {:>6}\n",
                sample.labels.get("direction").map_or("", String::as_str),
                sample.labels.get("reason").map_or("", String::as_str),
                sample.value
            ));
        }
    }
    text
}
