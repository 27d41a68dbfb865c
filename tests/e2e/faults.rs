//! Fault injection and dry-run policies (issue 15) through real sidecars:
//! a `FaultInjectionPolicy`'s delay and abort figures as a caller sees
//! them (and the delay in the caller's span), a dry-run rate limit measured
//! against an enforcing twin given the same traffic, a dry-run breaker in
//! front of a failing backend, the would-refuse rate in `meshctl describe`,
//! and a bad percent or status refused at apply with its line and column.
//!
//! The sidecars and the control plane run in-process
//! ([`meshlet_e2e::inprocess`]); `meshctl` is the real binary. Waiting is
//! on conditions with deadlines. The figures are counts, bounded with a
//! binomial tolerance (more than 4 sigma), never the timing of a whole run.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use meshlet_e2e::client::{self, Reply};
use meshlet_e2e::config::{doc, service, standalone};
use meshlet_e2e::inprocess::{ControlPlane, Sidecar};
use meshlet_e2e::metrics::Scrape;
use meshlet_e2e::{meshctl, stats, wait, TempDir, Upstream};

async fn get(addr: SocketAddr, uri: &str) -> Reply {
    client::get_uri(addr, uri).await.expect("an answer")
}

/// `GET path` to a sidecar's inbound listener, as a caller of orders.
async fn inbound(addr: SocketAddr, path: &str) -> Reply {
    let request = Request::get(path)
        .header("host", "orders")
        .body(Full::new(Bytes::new()))
        .expect("valid request");
    client::send(addr, request).await.expect("an answer")
}

// ---------------------------------------------------------------- faults

#[tokio::test]
async fn a_200ms_delay_at_50_percent_slows_about_half_the_requests() {
    let orders = Upstream::start("orders").await;
    let config = service("orders", &[(orders.addr, "v1")])
        + &doc(
            "FaultInjectionPolicy",
            "orders-delay",
            "targetRef: {service: orders}\nmatch: {pathPrefix: /api}\ndelay: {fixed: 200ms, percent: 50}",
        );
    let (_frontend, sidecar) = standalone("frontend", &config).await;

    // Outside the match: never delayed (the baseline). The sidecar's own
    // count says so exactly; the caller's clock only roughly (a stalled
    // machine slows every request in flight at once).
    let baseline = client::get_many(sidecar.outbound, "http://orders/other/1", 100, 20).await;
    let slow_baseline = baseline
        .iter()
        .filter(|(_, took)| *took >= Duration::from_millis(200))
        .count();
    let delays = |scrape: Scrape| {
        scrape.sum(
            "meshlet_faults_injected_total",
            &[
                ("policy", "orders-delay"),
                ("kind", "delay"),
                ("service", "orders"),
            ],
        )
    };
    let injected_outside = delays(Scrape::of(sidecar.admin).await);
    let n = 800;
    let replies = client::get_many(sidecar.outbound, "http://orders/api/items", n, 80).await;
    assert!(replies.iter().all(|(r, _)| r.status == 200));
    let slowed = replies
        .iter()
        .filter(|(_, took)| *took >= Duration::from_millis(200))
        .count();
    let injected = delays(Scrape::of(sidecar.admin).await) as usize;
    println!(
        "delay 200ms at 50%: {slowed} of {n} took ≥ 200 ms ({injected} delays injected); baseline: {slow_baseline} of 100"
    );
    assert_eq!(injected_outside, 0.0, "unmatched requests are not delayed");
    assert!(
        slow_baseline <= 5,
        "{slow_baseline} of 100 unmatched requests took ≥ 200 ms"
    );
    // The draws: sigma = 14 of 800, 5 sigmas either side (41 %–59 %).
    assert!(
        stats::within_sigmas(injected, n, 0.5, 5.0),
        "{injected} of {n} delayed"
    );
    // Every delayed request was slowed by at least the delay, as its
    // caller sees it; a request not delayed is not that slow, but for a
    // few caught in a stall of a shared machine.
    assert!(
        injected <= slowed && slowed <= injected + n / 50,
        "{slowed} slowed, {injected} delays injected"
    );
    assert_eq!(
        orders.requests(),
        n + 100,
        "a delay still sends the request"
    );
}

#[tokio::test]
async fn a_503_abort_at_10_percent_is_10_percent_and_never_reaches_the_upstream() {
    let orders = Upstream::start("orders").await;
    let config = service("orders", &[(orders.addr, "v1")])
        + &doc(
            "FaultInjectionPolicy",
            "orders-abort",
            "targetRef: {service: orders}\nabort: {status: 503, percent: 10}",
        )
        // An injected abort is not retried (a 503 otherwise would be).
        + &doc(
            "RetryPolicy",
            "orders-retry",
            "targetRef: {service: orders}\nattempts: 3\nretryOn: [5xx]",
        );
    let (_frontend, sidecar) = standalone("frontend", &config).await;

    // sigma = sqrt(0.1 · 0.9 / 3000) = 0.55 %: ±3 % is 5.5 sigma.
    let n = 3000;
    let replies = client::get_many(sidecar.outbound, "http://orders/", n, 50).await;
    let aborted: Vec<&Reply> = replies
        .iter()
        .map(|(r, _)| r)
        .filter(|r| r.status != 200)
        .collect();
    let share = aborted.len() as f64 / n as f64;
    println!(
        "abort 503 at 10%: {} of {n} aborted ({:.2} %), upstream saw {}",
        aborted.len(),
        share * 100.0,
        orders.requests()
    );
    assert!((0.07..=0.13).contains(&share), "{share}");
    for reply in &aborted {
        assert_eq!(reply.status, 503);
        assert_eq!(reply.header("x-meshlet-reason"), Some("fault_injected"));
        assert!(
            reply.text().contains("\"orders-abort\""),
            "{}",
            reply.text()
        );
    }
    assert_eq!(
        orders.requests(),
        n - aborted.len(),
        "aborted requests never reach the upstream, nor are retried"
    );
    let scrape = Scrape::of(sidecar.admin).await;
    assert_eq!(
        scrape.sum(
            "meshlet_faults_injected_total",
            &[("policy", "orders-abort"), ("kind", "abort")]
        ),
        aborted.len() as f64
    );
    assert_eq!(
        scrape.sum("retries_total", &[("policy", "orders-retry")]),
        0.0
    );
}

// ---------------------------------------------------------------- dry run

fn limit(mode: &str) -> String {
    doc(
        "RateLimitPolicy",
        "orders-limit",
        &format!(
            "targetRef: {{service: orders}}\ntokenBucket: {{capacity: 10, refillPerSecond: 50}}\nscope: local\nmode: {mode}"
        ),
    )
}

#[tokio::test]
async fn a_dry_run_limit_refuses_nothing_and_would_refuse_what_its_enforcing_twin_refuses() {
    let (enforcing_app, enforcing) = standalone("orders", &limit("enforce")).await;
    let (dry_app, dry) = standalone("orders", &limit("dryRun")).await;

    // The same sequence to both twins, side by side: each step sends one
    // request to each at once; 8 lanes, a step every 80 ms each, for 2 s:
    // about 100/s against a limit of 50/s after a burst of 10, so about
    // half would be refused.
    let run_for = Duration::from_secs(2);
    let started = Instant::now();
    let lanes: Vec<_> = (0..8u64)
        .map(|lane| {
            let (a, b) = (enforcing.inbound, dry.inbound);
            tokio::spawn(async move {
                let (mut sent, mut refused, mut dry_refused) = (0u32, 0u32, 0u32);
                tokio::time::sleep(Duration::from_millis(10 * lane)).await;
                let mut pace = tokio::time::interval(Duration::from_millis(80));
                while started.elapsed() < run_for {
                    pace.tick().await;
                    let (x, y) = tokio::join!(inbound(a, "/"), inbound(b, "/"));
                    sent += 1;
                    refused += u32::from(x.status == 429);
                    dry_refused += u32::from(y.status != 200);
                }
                (sent, refused, dry_refused)
            })
        })
        .collect();
    let (mut sent, mut refused, mut dry_refused) = (0, 0, 0);
    for lane in lanes {
        let (s, r, d) = lane.await.expect("lane finished");
        sent += s;
        refused += r;
        dry_refused += d;
    }
    let scrape = Scrape::of(dry.admin).await;
    let would = scrape.sum(
        "meshlet_policy_would_refuse_total",
        &[
            ("policy", "orders-limit"),
            ("kind", "RateLimitPolicy"),
            ("reason", "rate_limited"),
        ],
    );
    println!(
        "{sent} requests to each twin: enforcing refused {refused}, dry run would refuse {would} (refused {dry_refused})"
    );
    assert_eq!(dry_refused, 0, "a dry run returns no 429");
    assert_eq!(dry_app.requests(), sent as usize);
    assert_eq!(enforcing_app.requests(), (sent - refused) as usize);
    assert!(
        refused > 30 && refused < sent,
        "the traffic was over the limit, not only: {refused} of {sent}"
    );
    let ratio = would / f64::from(refused);
    assert!(
        (0.9..=1.1).contains(&ratio),
        "would {would}, refused {refused}"
    );
    assert_eq!(scrape.sum("rate_limited_total", &[]), 0.0);
}

#[tokio::test]
async fn a_dry_run_breaker_sends_everything_to_a_failing_backend_and_counts_what_it_would_refuse() {
    let orders = Upstream::start("orders").await;
    let config = service("orders", &[(orders.addr, "v1")])
        + &doc(
            "CircuitBreakerPolicy",
            "orders-breaker",
            "targetRef: {service: orders}\nconsecutiveFailures: 3\nopenDuration: 60s\nmode: dryRun",
        );
    let (_frontend, sidecar) = standalone("frontend", &config).await;
    for i in 0..20 {
        let reply = get(sidecar.outbound, "http://orders/status?code=500").await;
        assert_eq!(reply.status, 500, "request {i}: the backend's own answer");
        assert_eq!(reply.header("x-meshlet-reason"), None, "never circuit_open");
    }
    assert_eq!(orders.requests(), 20);
    let scrape = Scrape::of(sidecar.admin).await;
    assert_eq!(
        scrape.sum(
            "meshlet_policy_would_refuse_total",
            &[
                ("policy", "orders-breaker"),
                ("kind", "CircuitBreakerPolicy"),
                ("reason", "circuit_open")
            ]
        ),
        17.0,
        "open after the third failure: the 17 after it would have been refused"
    );
    // The state machine ran: the breaker is open.
    let dump = sidecar.config_dump().await;
    let breakers = &dump["snapshot"]["services"][0]["policies"]["circuitBreakers"][0];
    assert_eq!(breakers["endpoints"][0]["state"], "open", "{breakers}");
}

// ---------------------------------------------------------------- control plane

#[tokio::test]
async fn meshctl_describe_shows_a_dry_run_policys_would_refuse_rate() {
    let dir = TempDir::new();
    let cp = ControlPlane::start(&dir.path.join("data"), &[]).await;
    let app = Upstream::start("orders").await;
    let sidecar = Sidecar::builder("orders", app.port())
        .control_plane(&cp)
        .arg("--stats-interval")
        .arg("200ms")
        .start()
        .await;
    sidecar.wait_ready(Duration::from_secs(10)).await;
    let policy = doc(
        "RateLimitPolicy",
        "orders-limit",
        "targetRef: {service: orders}\ntokenBucket: {capacity: 5, refillPerSecond: 0.001}\nmode: dryRun",
    );
    cp.apply(&dir.path, "limit.yaml", &policy).await;
    wait::until(
        "the dry-run limit reached the sidecar",
        Duration::from_secs(10),
        || async {
            let dump = sidecar.config_dump().await;
            let limits = &dump["snapshot"]["inboundPolicies"]["rateLimits"];
            (limits[0]["spec"]["mode"] == "dryRun").then_some(())
        },
    )
    .await;
    for _ in 0..25 {
        assert_eq!(inbound(sidecar.inbound, "/").await.status, 200);
    }
    // 5 tokens: 20 would have been refused.
    let out = wait::until(
        "describe shows the 20 in its total",
        Duration::from_secs(10),
        || async {
            let out = meshctl(&cp, &["describe", "ratelimitpolicy", "orders-limit"]).await;
            out.stdout.contains(", 20 in the last 5m").then_some(out)
        },
    )
    .await;
    println!("{}", out.stdout);
    let line = out
        .stdout
        .lines()
        .find(|l| l.starts_with("Would refuse:"))
        .expect("a would-refuse line");
    // `R/s over the last minute` or, this soon after the start, over the
    // part of it the reports cover (`over the last 0.4s`): either way the
    // rate times its window is the 20, all refused within it.
    let text = line.trim_start_matches("Would refuse:").trim();
    let (rate, rest) = text.split_once("/s over the last ").expect("a rate");
    let rate: f64 = rate.parse().expect("a number");
    let window = rest.split(',').next().expect("a window");
    let secs: f64 = match window {
        "minute" => 60.0,
        secs => secs.trim_end_matches('s').parse().expect("seconds"),
    };
    let counted = rate * secs;
    assert!(
        (16.0..=24.0).contains(&counted),
        "rate × window = {counted}: {line}"
    );
    assert!(out.stdout.contains("dry run"), "{}", out.stdout);
}

#[tokio::test]
async fn an_injected_delay_shows_in_the_callers_span_in_the_control_plane() {
    let dir = TempDir::new();
    let cp = ControlPlane::start(&dir.path.join("data"), &[]).await;
    let orders_app = Upstream::start("orders").await;
    let orders = Sidecar::builder("orders", orders_app.port())
        .control_plane(&cp)
        .start()
        .await;
    orders.wait_ready(Duration::from_secs(10)).await;
    let frontend_app = Upstream::start("frontend").await;
    let frontend = Sidecar::builder("frontend", frontend_app.port())
        .control_plane(&cp)
        .start()
        .await;
    let fault = doc(
        "FaultInjectionPolicy",
        "orders-delay",
        "targetRef: {service: orders}\ndelay: {fixed: 200ms}",
    );
    cp.apply(&dir.path, "fault.yaml", &fault).await;
    wait::until(
        "the frontend routes to orders under the fault",
        Duration::from_secs(10),
        || async {
            let dump = frontend.config_dump().await;
            let services = dump["snapshot"]["services"].as_array()?;
            let orders = services.iter().find(|s| s["name"] == "orders")?;
            let faults = orders["policies"]["faults"].as_array()?;
            (!faults.is_empty() && !frontend.endpoints_of("orders").await.is_empty()).then_some(())
        },
    )
    .await;
    let started = Instant::now();
    let reply = get(frontend.outbound, "http://orders/").await;
    assert_eq!(reply.status, 200);
    assert!(started.elapsed() >= Duration::from_millis(200));

    let span = wait::until(
        "the frontend's client span reaches the control plane",
        Duration::from_secs(15),
        || async {
            let list = cp.get_json("/api/traces?service=frontend").await;
            let trace_id = list.as_array()?.first()?["traceId"].as_str()?.to_owned();
            let trace = cp.get_json(&format!("/api/traces/{trace_id}")).await;
            trace["spans"]
                .as_array()?
                .iter()
                .find(|s| s["service"] == "frontend" && s["kind"] == "client")
                .cloned()
        },
    )
    .await;
    assert_eq!(
        span["attributes"]["meshlet.fault"], "delay 200ms",
        "{span:#}"
    );
    let micros = span["durationMicros"].as_f64().expect("a duration");
    assert!(micros >= 200_000.0, "{span:#}");
}

#[tokio::test]
async fn a_bad_percent_or_status_is_refused_at_apply_with_line_and_column() {
    let dir = TempDir::new();
    let cp = ControlPlane::start(&dir.path.join("data"), &[]).await;
    for (spec, field) in [
        (
            "targetRef: {service: orders}\nabort:\n  status: 503\n  percent: 150",
            "spec.abort.percent",
        ),
        (
            "targetRef: {service: orders}\ndelay: {fixed: 1s}\nabort: {status: 302}",
            "spec.abort.status",
        ),
    ] {
        let path = dir.path.join("fault.yaml");
        std::fs::write(&path, doc("FaultInjectionPolicy", "chaos", spec)).unwrap();
        let out = meshctl(&cp, &["apply", "-f", path.to_str().unwrap()]).await;
        assert!(!out.success(), "{out:?}");
        let said = format!("{}{}", out.stdout, out.stderr);
        assert!(said.contains(", line "), "{said}");
        assert!(said.contains(", column "), "{said}");
        assert!(said.contains(field), "{said}");
    }
    let listed = meshctl(&cp, &["get", "faultinjectionpolicy"]).await;
    assert!(!listed.stdout.contains("chaos"), "{listed:?}");
}
