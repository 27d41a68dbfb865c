//! Policies enforced by real sidecars (issue 4): rate limits (token bucket,
//! sliding window, global share), circuit breakers, retries with a budget,
//! timeouts, traffic split, a policy pushed by the control plane while a
//! long request keeps going, SIGHUP reload of a standalone config, and the
//! zero-trust policies as a plaintext caller meets them (`MTLSPolicy`,
//! `AuthorizationPolicy` with dry run, identity headers).
//!
//! The sidecars and the control plane run in-process
//! ([`meshlet_e2e::inprocess`]), except in the two tests that read a
//! sidecar's log (the breaker's state changes, a failed reload) and send
//! it SIGHUP: those start the `sidecar` binary.
//!
//! Waiting is on conditions with deadlines. The only timed assertions are
//! the ones the acceptance list asks for (breaker refusal latency, timeout
//! window, push-to-effect time), with generous bounds.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use meshlet_e2e::admin::Listening;
use meshlet_e2e::client::{self, Reply};
use meshlet_e2e::config::{doc, service, standalone, standalone_process};
use meshlet_e2e::inprocess::{ControlPlane, Sidecar};
use meshlet_e2e::metrics::Scrape;
use meshlet_e2e::{meshctl, stats, wait, TempDir, Upstream};

async fn get(addr: SocketAddr, uri: &str) -> Reply {
    client::get_uri(addr, uri).await.expect("an answer")
}

/// A request through `sidecar`'s outbound listener to a mesh service.
async fn call(sidecar: &impl Listening, uri: &str) -> Reply {
    get(sidecar.outbound(), uri).await
}

/// A request to `sidecar`'s inbound listener (as another service would).
async fn inbound(sidecar: &impl Listening, path: &str) -> Reply {
    let request = Request::get(path)
        .header("host", "orders")
        .body(Full::new(Bytes::new()))
        .expect("valid request");
    client::send(sidecar.inbound(), request)
        .await
        .expect("an answer")
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// `method path` to `sidecar`'s inbound listener with `headers`.
async fn inbound_with(
    sidecar: &impl Listening,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Reply {
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "orders");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request
        .body(Full::new(Bytes::new()))
        .expect("valid request");
    client::send(sidecar.inbound(), request)
        .await
        .expect("an answer")
}

// ---------------------------------------------------------------- zero trust

/// A standalone sidecar has no certificates, so every caller is plaintext
/// (unauthenticated): what the policies do to such callers, end to end.
#[tokio::test]
async fn authorization_policies_refuse_with_403_denied_and_dry_runs_only_count() {
    let config = doc(
        "AuthorizationPolicy",
        "orders-allow",
        "targetRef: {service: orders}
action: ALLOW
rules:
- from: [{unauthenticated: true}]
  to: [{methods: [GET], paths: ['/api/*']}]",
    ) + &doc(
        "AuthorizationPolicy",
        "orders-audit",
        "targetRef: {service: orders}
action: DENY
mode: dryRun
rules:
- to: [{paths: ['/api/admin/*']}]",
    ) + &doc(
        "AuthorizationPolicy",
        "no-debug",
        "targetRef: {service: orders}
action: DENY
rules:
- when: [{header: x-debug, values: ['1']}]",
    );
    let (app, sidecar) = standalone("orders", &config).await;

    assert_eq!(
        inbound_with(&sidecar, "GET", "/api/items", &[])
            .await
            .status,
        200
    );
    let post = inbound_with(&sidecar, "POST", "/api/items", &[]).await;
    assert_eq!(post.status, 403, "{}", post.text());
    assert_eq!(post.header("x-meshlet-reason"), Some("denied"));
    assert!(post.text().contains("\"orders-allow\""), "{}", post.text());
    let other = inbound_with(&sidecar, "GET", "/other", &[]).await;
    assert_eq!(other.header("x-meshlet-reason"), Some("denied"));
    let debug = inbound_with(&sidecar, "GET", "/api/items", &[("x-debug", "1")]).await;
    assert_eq!(debug.status, 403);
    assert!(debug.text().contains("\"no-debug\""), "{}", debug.text());
    // The dry run would refuse this one: served, and counted.
    let audited = inbound_with(&sidecar, "GET", "/api/admin/users", &[]).await;
    assert_eq!(audited.status, 200, "{}", audited.text());
    assert_eq!(app.requests(), 2, "refused requests never reach the app");

    let scrape = Scrape::wait_for(
        sidecar.admin(),
        "meshlet_authz_dry_run_denied_total",
        &[("policy", "orders-audit")],
        1.0,
    )
    .await;
    assert_eq!(
        scrape.sum("meshlet_authz_denied_total", &[("policy", "orders-allow")]),
        2.0
    );
    assert_eq!(
        scrape.sum("meshlet_authz_denied_total", &[("policy", "no-debug")]),
        1.0
    );
}

#[tokio::test]
async fn strict_mtls_refuses_a_plaintext_caller_and_no_caller_can_claim_an_identity() {
    let (_app, sidecar) = standalone("orders", "").await;
    // Permissive (the default): served, and the identity headers a client
    // wrote never reach the app (the inbound sets them only from a
    // verified certificate).
    let reply = inbound_with(
        &sidecar,
        "GET",
        "/headers",
        &[
            ("x-meshlet-source", "frontend"),
            (
                "x-meshlet-source-identity",
                "spiffe://meshlet.local/ns/default/sa/frontend",
            ),
        ],
    )
    .await;
    assert_eq!(reply.status, 200);
    let seen: serde_json::Value = serde_json::from_slice(&reply.body).expect("JSON");
    let headers = seen["headers"].as_object().expect("headers");
    assert!(headers.contains_key("x-forwarded-for"), "{seen}");
    assert!(
        !headers.keys().any(|k| k.starts_with("x-meshlet-source")),
        "a plaintext caller reaches the app with no identity headers: {seen}"
    );
    // The outbound side removes them too, whatever the app wrote.
    let config = service("orders", &[(sidecar.inbound(), "v1")]);
    let (_caller_app, caller) = standalone("frontend", &config).await;
    let request = Request::get("http://orders/headers")
        .header("x-meshlet-source", "admin")
        .body(Full::new(Bytes::new()))
        .expect("valid request");
    let reply = client::send(caller.outbound(), request)
        .await
        .expect("an answer");
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert!(
        !reply.text().contains("x-meshlet-source"),
        "{}",
        reply.text()
    );

    let strict = doc("MTLSPolicy", "mesh-strict", "mode: strict");
    let (app, sidecar) = standalone("orders", &strict).await;
    let refused = inbound_with(&sidecar, "GET", "/", &[]).await;
    assert_eq!(refused.status, 403, "{}", refused.text());
    assert_eq!(refused.header("x-meshlet-reason"), Some("mtls_required"));
    assert!(
        refused.text().contains("MTLSPolicy strict"),
        "{}",
        refused.text()
    );
    assert_eq!(app.requests(), 0);
    Scrape::wait_for(
        sidecar.admin(),
        "meshlet_mtls_plaintext_refused_total",
        &[],
        1.0,
    )
    .await;
}

// ---------------------------------------------------------------- rate limits

#[tokio::test]
async fn token_bucket_allows_its_capacity_plus_refill_then_429s_with_headers() {
    let config = doc(
        "RateLimitPolicy",
        "orders-limit",
        "targetRef: {service: orders}\ntokenBucket: {capacity: 10, refillPerSecond: 10}\nscope: local",
    );
    let (app, sidecar) = standalone("orders", &config).await;

    let started = Instant::now();
    let mut replies = Vec::new();
    for _ in 0..100 {
        replies.push(inbound(&sidecar, "/").await);
    }
    let elapsed = started.elapsed();
    let ok = replies.iter().filter(|r| r.status == 200).count();
    println!("100 requests in {elapsed:?}: {ok} accepted");
    // The capacity, plus what refilled while the burst ran (at most 21 for
    // a burst of up to 1 s, as the acceptance asks; the bound follows the
    // measured time so that a slow machine does not fail the test).
    let refilled = (10.0 * elapsed.as_secs_f64()).ceil() as usize;
    assert!(
        (10..=11 + refilled).contains(&ok),
        "{ok} accepted in {elapsed:?}"
    );
    assert_eq!(app.requests(), ok, "refused requests never reach the app");

    let refused = replies.iter().find(|r| r.status == 429).expect("a 429");
    assert_eq!(refused.header("x-meshlet-reason"), Some("rate_limited"));
    assert_eq!(refused.header("retry-after"), Some("1"));
    assert_eq!(
        refused.header("ratelimit-policy"),
        Some("\"orders-limit\";q=10;w=1")
    );
    assert_eq!(
        refused.header("ratelimit"),
        Some("\"orders-limit\";r=0;t=1")
    );
    assert!(
        refused.text().contains("orders-limit"),
        "{}",
        refused.text()
    );
    assert!(
        replies.iter().all(|r| r.status == 200 || r.status == 429),
        "only 200s and 429s"
    );
}

#[tokio::test]
async fn sliding_window_allows_n_then_refuses_until_the_window_slides() {
    let config = doc(
        "RateLimitPolicy",
        "orders-window",
        "targetRef: {service: orders}\nslidingWindow: {requests: 5, window: 2s}\nkey: header:x-user\nscope: local",
    );
    let (_app, sidecar) = standalone("orders", &config).await;
    let as_user = |user: &'static str| {
        let addr = sidecar.inbound;
        async move {
            let request = Request::get("/")
                .header("host", "orders")
                .header("x-user", user)
                .body(Full::new(Bytes::new()))
                .unwrap();
            client::send(addr, request).await.expect("an answer")
        }
    };
    for i in 0..5 {
        assert_eq!(as_user("alice").await.status, 200, "request {i}");
    }
    let refused = as_user("alice").await;
    assert_eq!(refused.status, 429);
    assert_eq!(
        refused.header("ratelimit-policy"),
        Some("\"orders-window\";q=5;w=2")
    );
    let retry_after: u64 = refused.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=4).contains(&retry_after), "Retry-After {retry_after}");
    // Another key has its own window.
    assert_eq!(as_user("bob").await.status, 200);
    // Alice gets in again once enough of her window has slid by.
    let started = Instant::now();
    wait::until("alice allowed again", Duration::from_secs(10), || async {
        (as_user("alice").await.status == 200).then_some(())
    })
    .await;
    println!("alice allowed again after {:?}", started.elapsed());
    let dump = sidecar.config_dump().await;
    let limit = &dump["snapshot"]["inboundPolicies"]["rateLimits"][0];
    assert_eq!(limit["keys"], 2, "{limit}");
}

/// Instance expiry and fast health checks for the control-plane tests.
const HEALTH: &str = "\
apiVersion: meshlet.dev/v1alpha1
kind: HealthCheckPolicy
metadata: {name: orders-health}
spec: {targetRef: {service: orders}, interval: 200ms, timeout: 500ms, unhealthyThreshold: 2, healthyThreshold: 1}
";

async fn control_plane(dir: &TempDir) -> ControlPlane {
    let cp = ControlPlane::start(&dir.path.join("data"), &["--ttl", "2s"]).await;
    cp.apply(&dir.path, "health.yaml", HEALTH).await;
    cp
}

struct Instance {
    app: Upstream,
    sidecar: Sidecar,
}

async fn instance(cp: &ControlPlane, service: &str) -> Instance {
    let app = Upstream::start(service).await;
    let sidecar = Sidecar::builder(service, app.port())
        .control_plane(&cp)
        .start()
        .await;
    sidecar.wait_ready(Duration::from_secs(10)).await;
    Instance { app, sidecar }
}

#[tokio::test]
async fn a_global_limit_is_shared_by_the_healthy_instances() {
    let dir = TempDir::new();
    let cp = control_plane(&dir).await;
    let orders = [instance(&cp, "orders").await, instance(&cp, "orders").await];
    let policy = doc(
        "RateLimitPolicy",
        "orders-global",
        "targetRef: {service: orders}\ntokenBucket: {capacity: 20, refillPerSecond: 20}\nscope: global",
    );
    cp.apply(&dir.path, "limit.yaml", &policy).await;
    for i in &orders {
        wait::until(
            "both instances share the limit",
            Duration::from_secs(10),
            || async {
                let dump = i.sidecar.config_dump().await;
                let limit = &dump["snapshot"]["inboundPolicies"]["rateLimits"][0];
                (limit["instancesSharing"] == 2 && limit["quota"] == 10).then_some(())
            },
        )
        .await;
    }

    let run_for = Duration::from_secs(3);
    let started = Instant::now();
    let loops = orders.iter().map(|i| async move {
        let (mut ok, mut refused) = (0u32, 0u32);
        while started.elapsed() < run_for {
            match inbound(&i.sidecar, "/").await.status.as_u16() {
                200 => ok += 1,
                429 => refused += 1,
                other => panic!("unexpected status {other}"),
            }
        }
        (ok, refused)
    });
    let results = futures_util::future::join_all(loops).await;
    let elapsed = started.elapsed().as_secs_f64();
    let accepted: u32 = results.iter().map(|r| r.0).sum();
    let refused: u32 = results.iter().map(|r| r.1).sum();
    // The initial burst (20 in all) plus 20/s.
    let expected = 20.0 + 20.0 * elapsed;
    println!(
        "global 20/s over 2 instances for {elapsed:.2}s: accepted {accepted} (per instance {:?}), refused {refused}, expected ≈{expected:.0}",
        results.iter().map(|r| r.0).collect::<Vec<_>>()
    );
    assert!(refused > 0, "traffic exceeded the limit");
    let ratio = f64::from(accepted) / expected;
    assert!(
        (0.8..=1.2).contains(&ratio),
        "accepted {accepted}, expected {expected:.0} ± 20%"
    );
    let app_total: usize = orders.iter().map(|i| i.app.requests()).sum();
    assert_eq!(app_total, accepted as usize);
}

// ---------------------------------------------------------------- breaker

#[tokio::test]
async fn breaker_opens_after_5_failures_refuses_fast_then_half_opens_and_closes() {
    let orders = Upstream::start("orders").await;
    let config = service("orders", &[(orders.addr, "v1")])
        + &doc(
            "CircuitBreakerPolicy",
            "orders-breaker",
            "targetRef: {service: orders}\nconsecutiveFailures: 5\nopenDuration: 3s\nhalfOpenRequests: 1",
        );
    let (_frontend, sidecar) = standalone_process("frontend", &config).await;

    for i in 0..5 {
        let reply = call(&sidecar, "http://orders/status?code=500").await;
        assert_eq!(reply.status, 500, "failure {i} passes through");
    }
    let seen = orders.requests();
    assert_eq!(seen, 5);
    let mut latencies = Vec::new();
    for _ in 0..20 {
        let started = Instant::now();
        let reply = call(&sidecar, "http://orders/").await;
        latencies.push(started.elapsed());
        assert_eq!(reply.status, 503, "{}", reply.text());
        assert_eq!(reply.header("x-meshlet-reason"), Some("circuit_open"));
        assert!(
            reply.text().contains("circuit breaker open"),
            "{}",
            reply.text()
        );
    }
    println!(
        "circuit_open refusals: median {:?}, max {:?}",
        median(latencies.clone()),
        latencies.iter().max().unwrap()
    );
    // Measured by the client, connection set-up to the sidecar process
    // included; the sidecar's own refusal takes microseconds (see the
    // printed median). The bounds are far above what a shared 2-core CI
    // machine adds, and far below any wait on an upstream or a timeout.
    assert!(
        median(latencies.clone()) < Duration::from_millis(20),
        "{latencies:?}"
    );
    assert!(
        latencies.iter().all(|l| *l < Duration::from_millis(500)),
        "{latencies:?}"
    );
    assert_eq!(orders.requests(), seen, "the upstream saw none of them");
    let dump = sidecar.config_dump().await;
    let breakers = &dump["snapshot"]["services"][0]["policies"]["circuitBreakers"][0];
    assert_eq!(breakers["endpoints"][0]["state"], "open", "{breakers}");

    // After openDuration one trial passes; the upstream is fine now, so
    // the breaker closes and traffic flows again.
    wait::until(
        "a trial request passes",
        Duration::from_secs(10),
        || async { (call(&sidecar, "http://orders/").await.status == 200).then_some(()) },
    )
    .await;
    assert_eq!(orders.requests(), seen + 1, "exactly one trial request");
    for _ in 0..5 {
        assert_eq!(call(&sidecar, "http://orders/").await.status, 200);
    }
    let dump = sidecar.config_dump().await;
    let breakers = &dump["snapshot"]["services"][0]["policies"]["circuitBreakers"][0];
    assert_eq!(breakers["endpoints"][0]["state"], "closed", "{breakers}");
    let log = sidecar.log_text();
    assert!(log.contains("circuit breaker state changed"), "{log}");
}

#[tokio::test]
async fn max_concurrent_requests_overflow_is_503() {
    let orders = Upstream::start("orders").await;
    let config = service("orders", &[(orders.addr, "v1")])
        + &doc(
            "CircuitBreakerPolicy",
            "orders-breaker",
            "targetRef: {service: orders}\nmaxConcurrentRequests: 2\nmaxPendingRequests: 0",
        );
    let (_frontend, sidecar) = standalone("frontend", &config).await;
    let slow: Vec<_> = (0..2)
        .map(|_| {
            let outbound = sidecar.outbound;
            tokio::spawn(async move { get(outbound, "http://orders/slow?ms=1500").await })
        })
        .collect();
    wait::until(
        "two slow requests upstream",
        Duration::from_secs(5),
        || async { (orders.requests() == 2).then_some(()) },
    )
    .await;
    let reply = call(&sidecar, "http://orders/").await;
    assert_eq!(reply.status, 503);
    assert_eq!(reply.header("x-meshlet-reason"), Some("overflow"));
    for task in slow {
        assert_eq!(task.await.unwrap().status, 200);
    }
    assert_eq!(call(&sidecar, "http://orders/").await.status, 200);
}

// ---------------------------------------------------------------- retries

#[tokio::test]
async fn retries_raise_the_success_rate_and_the_budget_caps_extra_load() {
    let orders = Upstream::start("orders").await;
    let config = service("orders", &[(orders.addr, "v1")])
        + &doc(
            "RetryPolicy",
            "orders-flaky",
            "targetRef: {service: orders}\nmatch: {pathPrefix: /flaky}\nattempts: 2\nretryOn: [5xx]\nbackoff: {base: 1ms, max: 5ms}\nbudget: {percent: 100, minPerSecond: 1000}",
        )
        + &doc(
            "RetryPolicy",
            "orders-broken",
            "targetRef: {service: orders}\nmatch: {pathPrefix: /status}\nattempts: 3\nretryOn: [5xx]\nbackoff: {base: 1ms, max: 5ms}\nbudget: {percent: 20, minPerSecond: 1}",
        );
    let (_frontend, sidecar) = standalone("frontend", &config).await;

    // With the budget untouched: a failing GET is retried (3 tries), a
    // failing POST (not idempotent) is not.
    assert_eq!(
        call(&sidecar, "http://orders/status?code=500").await.status,
        500
    );
    assert_eq!(orders.requests(), 3, "GET tried 3 times");
    let request = Request::post("http://orders/status?code=500")
        .body(Full::new(Bytes::from_static(b"x")))
        .unwrap();
    let reply = client::send(sidecar.outbound, request).await.unwrap();
    assert_eq!(reply.status, 500);
    assert_eq!(orders.requests(), 4, "POST tried once");

    // 50% failing upstream, two tries: ~75% succeed (5 sigmas of 1000:
    // 68 %–82 %; without retries it would be 50 %).
    let n = 1000;
    let mut ok = 0;
    for _ in 0..n {
        if call(&sidecar, "http://orders/flaky?percent=50")
            .await
            .status
            == 200
        {
            ok += 1;
        }
    }
    let rate = f64::from(ok) / f64::from(n);
    let upstream = orders.requests();
    println!(
        "50% failing upstream, attempts 2: {ok}/{n} succeeded ({:.1}%), upstream saw {upstream} requests",
        rate * 100.0
    );
    assert!(
        stats::within_sigmas(ok as usize, n as usize, 0.75, 5.0),
        "success rate {rate}"
    );

    // 100% failing upstream: the budget allows 20% + 1/s × 10 s.
    let before = orders.requests();
    let n = 300;
    for _ in 0..n {
        assert_eq!(
            call(&sidecar, "http://orders/status?code=500").await.status,
            500
        );
    }
    let extra = orders.requests() - before - n;
    println!("100% failing upstream, budget 20% + 1/s: {n} requests caused {extra} retries");
    assert!(extra >= 10, "some retries happened ({extra})");
    assert!(extra <= n / 5 + 10, "{extra} retries for {n} requests");
}

// ---------------------------------------------------------------- timeouts

#[tokio::test]
async fn timeout_policy_answers_504_at_its_deadline() {
    let orders = Upstream::start("orders").await;
    let config = service("orders", &[(orders.addr, "v1")])
        + &doc(
            "TimeoutPolicy",
            "orders-timeout",
            "targetRef: {service: orders}\nrequest: 200ms",
        );
    let (_frontend, sidecar) = standalone("frontend", &config).await;
    let started = Instant::now();
    let reply = call(&sidecar, "http://orders/slow?ms=2000").await;
    let elapsed = started.elapsed();
    println!("504 after {elapsed:?}");
    assert_eq!(reply.status, 504);
    assert_eq!(reply.header("x-meshlet-reason"), Some("upstream_timeout"));
    assert!(reply.text().contains("200ms"), "{}", reply.text());
    assert!(
        elapsed >= Duration::from_millis(150) && elapsed < Duration::from_secs(1),
        "{elapsed:?}"
    );
}

// ---------------------------------------------------------------- split

#[tokio::test]
async fn traffic_split_sends_about_10_percent_to_v2() {
    let v1 = Upstream::start("orders-v1").await;
    let v2 = Upstream::start("orders-v2").await;
    let config = service("orders", &[(v1.addr, "v1"), (v2.addr, "v2")])
        + &doc(
            "TrafficSplit",
            "orders-canary",
            "targetRef: {service: orders}\nsplits:\n- {labels: {version: v1}, weight: 90}\n- {labels: {version: v2}, weight: 10}",
        );
    let (_frontend, sidecar) = standalone("frontend", &config).await;
    // Each request is a fresh draw: at 3000, sigma is 0.55 points, and
    // 5 sigmas (7.3 %–12.7 %) fail a correct split once in ~1.7 million
    // runs, one off by 4 points in ~98 % of runs, an even one always.
    // (1000 requests within 7 %–13 % failed a correct run once in CI:
    // 13.2 %.)
    let n = 3000;
    let replies = client::get_many(sidecar.outbound(), "http://orders/", n, 20).await;
    assert!(replies.iter().all(|(reply, _)| reply.status == 200));
    println!(
        "v2 got {} of {n} ({:.2} %)",
        v2.requests(),
        v2.requests() as f64 * 100.0 / n as f64
    );
    assert_eq!(v1.requests() + v2.requests(), n);
    assert!(
        stats::within_sigmas(v2.requests(), n, 0.1, 5.0),
        "v2 got {} of {n}",
        v2.requests()
    );
}

#[tokio::test]
async fn a_split_subset_whose_breakers_are_open_gives_its_share_to_the_others() {
    let v1 = Upstream::start("orders-v1").await;
    let v2 = Upstream::start("orders-v2").await;
    let config = service("orders", &[(v1.addr, "v1"), (v2.addr, "v2")])
        + &doc(
            "TrafficSplit",
            "orders-half",
            "targetRef: {service: orders}\nsplits:\n- {labels: {version: v1}, weight: 50}\n- {labels: {version: v2}, weight: 50}",
        )
        + &doc(
            "CircuitBreakerPolicy",
            "orders-breaker",
            "targetRef: {service: orders}\nconsecutiveFailures: 2\nopenDuration: 60s",
        );
    let (_frontend, sidecar) = standalone("frontend", &config).await;
    v2.kill();
    let mut failed = 0;
    for _ in 0..200 {
        if call(&sidecar, "http://orders/").await.status != 200 {
            failed += 1;
        }
    }
    println!("v2 down, 50/50 split: {failed} of 200 failed");
    // Only the tries that opened v2's breaker fail; then v1 takes it all.
    assert!(failed <= 2, "{failed} of 200 failed");
    assert_eq!(v1.requests(), 200 - failed);
}

// ---------------------------------------------------------------- push

#[tokio::test]
async fn a_pushed_policy_takes_effect_within_a_second_while_a_long_request_continues() {
    let dir = TempDir::new();
    let cp = control_plane(&dir).await;
    let orders = instance(&cp, "orders").await;
    let frontend = instance(&cp, "frontend").await;
    let expected = vec![orders.sidecar.inbound.to_string()];
    wait::until("frontend knows orders", Duration::from_secs(10), || async {
        (frontend.sidecar.endpoints_of("orders").await == expected).then_some(())
    })
    .await;
    assert_eq!(call(&frontend.sidecar, "http://orders/").await.status, 200);

    let long = {
        let outbound = frontend.sidecar.outbound;
        tokio::spawn(async move { get(outbound, "http://orders/slow?ms=3000").await })
    };
    wait::until(
        "the long request reached orders",
        Duration::from_secs(5),
        || async { (orders.app.requests() == 2).then_some(()) },
    )
    .await;

    let policy = doc(
        "RateLimitPolicy",
        "orders-tight",
        "targetRef: {service: orders}\ntokenBucket: {capacity: 1, refillPerSecond: 0.01}\nscope: local",
    );
    cp.apply(&dir.path, "tight.yaml", &policy).await;
    let applied = Instant::now();
    let reply = wait::until(
        "the pushed limit refuses",
        Duration::from_secs(5),
        || async {
            let reply = call(&frontend.sidecar, "http://orders/").await;
            (reply.status == 429).then_some(reply)
        },
    )
    .await;
    let took = applied.elapsed();
    println!("pushed rate limit in effect {took:?} after meshctl apply returned");
    assert_eq!(reply.header("x-meshlet-reason"), Some("rate_limited"));
    assert!(took < Duration::from_secs(1), "{took:?}");
    assert!(!long.is_finished(), "the long request is still going");
    let long = long.await.unwrap();
    assert_eq!(long.status, 200);
    assert_eq!(long.text(), "slow done");
}

// ---------------------------------------------------------------- SIGHUP

#[tokio::test]
async fn sighup_reloads_a_valid_config_and_keeps_the_old_on_error() {
    let generous = doc(
        "RateLimitPolicy",
        "orders-limit",
        "targetRef: {service: orders}\ntokenBucket: {capacity: 1000, refillPerSecond: 1000}\nscope: local",
    );
    let (app, mut sidecar) = standalone_process("orders", &generous).await;
    for _ in 0..5 {
        assert_eq!(inbound(&sidecar, "/").await.status, 200);
    }

    // A valid change: a tight limit.
    let tight = doc(
        "RateLimitPolicy",
        "orders-limit",
        "targetRef: {service: orders}\ntokenBucket: {capacity: 2, refillPerSecond: 0.01}\nscope: local",
    );
    std::fs::write(sidecar.config_path(), &tight).unwrap();
    sidecar.signal(nix::sys::signal::Signal::SIGHUP);
    wait::until("the reload applied", Duration::from_secs(5), || async {
        let dump = sidecar.config_dump().await;
        (dump["snapshot"]["inboundPolicies"]["rateLimits"][0]["quota"] == 2).then_some(())
    })
    .await;
    let statuses: Vec<u16> = futures_util::future::join_all((0..3).map(|_| inbound(&sidecar, "/")))
        .await
        .iter()
        .map(|r| r.status.as_u16())
        .collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        1,
        "{statuses:?}"
    );

    // An unrelated change keeps the limiter's state (still empty).
    let with_service = tight.clone() + &service("inventory", &[(app.addr, "v1")]);
    std::fs::write(sidecar.config_path(), &with_service).unwrap();
    sidecar.signal(nix::sys::signal::Signal::SIGHUP);
    wait::until(
        "the second reload applied",
        Duration::from_secs(5),
        || async { (!sidecar.endpoints_of("inventory").await.is_empty()).then_some(()) },
    )
    .await;
    assert_eq!(
        inbound(&sidecar, "/").await.status,
        429,
        "bucket state kept"
    );

    // An invalid file: logged, old config kept, process alive.
    std::fs::write(sidecar.config_path(), "kind: RateLimitPolicy\nspec: [oops").unwrap();
    sidecar.signal(nix::sys::signal::Signal::SIGHUP);
    wait::until(
        "the reload error is logged",
        Duration::from_secs(5),
        || async {
            sidecar
                .log_text()
                .contains("configuration reload failed")
                .then_some(())
        },
    )
    .await;
    assert!(sidecar.is_running(), "{}", sidecar.log_text());
    assert_eq!(inbound(&sidecar, "/").await.status, 429, "old config kept");
    assert!(!sidecar.endpoints_of("inventory").await.is_empty());
}

#[tokio::test]
async fn a_rollback_restores_the_earlier_policy_in_every_sidecar() {
    let dir = TempDir::new();
    let cp = control_plane(&dir).await;
    let _orders = instance(&cp, "orders").await;
    let frontend = instance(&cp, "frontend").await;
    let timeout = |request: &str| {
        doc(
            "TimeoutPolicy",
            "orders-timeout",
            &format!("targetRef: {{service: orders}}\nrequest: {request}"),
        )
    };
    // Revision A: a 200 ms timeout; revision B: 5 s.
    cp.apply(&dir.path, "timeout.yaml", &timeout("200ms")).await;
    let revision_a = cp.get_json("/api/v1/revisions?limit=1").await[0]["revision"]
        .as_u64()
        .unwrap();
    cp.apply(&dir.path, "timeout.yaml", &timeout("5s")).await;
    let slow = "http://orders/slow?ms=600";
    wait::until(
        "the 5 s timeout is in force",
        Duration::from_secs(5),
        || async { (call(&frontend.sidecar, slow).await.status == 200).then_some(()) },
    )
    .await;

    let out = meshctl(&cp, &["rollback", &revision_a.to_string()]).await;
    assert!(out.success(), "{out:?}");
    assert!(
        out.stdout
            .contains("configured timeoutpolicy/orders-timeout"),
        "{}",
        out.stdout
    );
    // The frontend's sidecar follows: the 600 ms request times out again.
    let reply = wait::until(
        "the 200 ms timeout is back",
        Duration::from_secs(5),
        || async {
            let reply = call(&frontend.sidecar, slow).await;
            (reply.status == 504).then_some(reply)
        },
    )
    .await;
    assert_eq!(reply.header("x-meshlet-reason"), Some("upstream_timeout"));
    let listed = meshctl(
        &cp,
        &["get", "timeoutpolicy", "orders-timeout", "-o", "yaml"],
    )
    .await;
    assert!(
        listed.stdout.contains("request: 200ms"),
        "{}",
        listed.stdout
    );
}
