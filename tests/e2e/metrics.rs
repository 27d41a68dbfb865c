//! The sidecar's Prometheus metrics as an operator reads them from the
//! admin port's `/metrics` (the observability issue): requests counted per
//! route on both sides of a call, labelled by the policy prefix and never
//! by the raw path; refusals, breaker states, retries, timeouts and
//! connect errors with their policy or destination; and text that
//! `promtool check metrics` accepts.
//!
//! A request is counted when its response has ended, which the sidecar may
//! notice just after the client: assertions wait for the expected value
//! with a deadline ([`Scrape::wait_for`]).

use std::net::SocketAddr;

use meshlet_e2e::client::{self, Reply};
use meshlet_e2e::config::{doc, service, standalone};
use meshlet_e2e::inprocess::Sidecar;
use meshlet_e2e::metrics::{promtool_check, Scrape};
use meshlet_e2e::process::free_port;
use meshlet_e2e::Upstream;

/// Requests to `/api/items/123` and to `/other/456`.
const N: usize = 7;
const M: usize = 4;

async fn call(sidecar: &Sidecar, uri: &str) -> Reply {
    client::get_uri(sidecar.outbound, uri)
        .await
        .expect("an answer")
}

fn route<'a>(
    direction: &'a str,
    destination: &'a str,
    endpoint: &'a str,
) -> [(&'a str, &'a str); 3] {
    [
        ("direction", direction),
        ("destination", destination),
        ("endpoint", endpoint),
    ]
}

/// `route` plus method and status.
fn answered<'a>(route: [(&'a str, &'a str); 3], status: &'a str) -> Vec<(&'a str, &'a str)> {
    let mut labels = route.to_vec();
    labels.extend([("method", "GET"), ("status_code", status)]);
    labels
}

fn assert_promtool_accepts(scrape: &Scrape) {
    if let Err(problems) = promtool_check(&scrape.text) {
        panic!("{problems}\n--- /metrics:\n{}", scrape.text);
    }
}

#[tokio::test]
async fn requests_are_counted_per_route_on_both_sides_never_by_raw_path() {
    let api_timeout = doc(
        "TimeoutPolicy",
        "orders-api",
        "targetRef: {service: orders}\nmatch: {pathPrefix: /api}\nrequest: 5s",
    );
    let (_orders_app, orders) = standalone("orders", &api_timeout).await;
    let config = service("orders", &[(orders.inbound, "v1")]) + &api_timeout;
    let (_frontend_app, frontend) = standalone("frontend", &config).await;

    for _ in 0..N {
        let reply = call(&frontend, "http://orders/api/items/123").await;
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    for _ in 0..M {
        assert_eq!(call(&frontend, "http://orders/other/456").await.status, 200);
    }

    // The caller's side: outbound to orders, by policy prefix.
    let api = route("outbound", "orders", "/api");
    let all = route("outbound", "orders", "/");
    Scrape::wait_for(
        frontend.admin,
        "request_total",
        &answered(api, "200"),
        N as f64,
    )
    .await;
    // (Counters only grow: this later scrape still has the N.)
    let scrape = Scrape::wait_for(
        frontend.admin,
        "request_total",
        &answered(all, "200"),
        M as f64,
    )
    .await;
    assert_eq!(scrape.sum("response_time_seconds_count", &api), N as f64);
    assert_eq!(scrape.sum("response_time_seconds_count", &all), M as f64);
    assert_eq!(
        scrape.sum("request_total", &[("service", "frontend")]),
        (N + M) as f64,
        "service is the sidecar's own"
    );
    let body = "resource /api/items/123".len();
    assert_eq!(scrape.sum("response_bytes_total", &api), (N * body) as f64);
    assert!(!scrape.text.contains("/api/items"), "{}", scrape.text);
    assert!(!scrape.text.contains("/other/456"), "{}", scrape.text);
    assert_promtool_accepts(&scrape);

    // The receiving side: inbound to its own service, same routes.
    let api = route("inbound", "orders", "/api");
    let all = route("inbound", "orders", "/");
    Scrape::wait_for(
        orders.admin,
        "request_total",
        &answered(api, "200"),
        N as f64,
    )
    .await;
    let scrape = Scrape::wait_for(
        orders.admin,
        "request_total",
        &answered(all, "200"),
        M as f64,
    )
    .await;
    assert_eq!(scrape.sum("response_time_seconds_count", &api), N as f64);
    assert_eq!(
        scrape.sum("request_total", &[("service", "orders")]),
        (N + M) as f64
    );
    assert!(!scrape.text.contains("/api/items"), "{}", scrape.text);
    assert_promtool_accepts(&scrape);
}

#[tokio::test]
async fn a_rate_limited_request_is_counted_with_its_policy_and_its_429() {
    let limit = doc(
        "RateLimitPolicy",
        "orders-limit",
        "targetRef: {service: orders}\nmatch: {pathPrefix: /api}\ntokenBucket: {capacity: 3, refillPerSecond: 0.01}\nscope: local",
    );
    let (app, orders) = standalone("orders", &limit).await;
    let mut refused = 0;
    for _ in 0..6 {
        let reply = client::get(orders.inbound, "/api/items/1").await.unwrap();
        if reply.status == 429 {
            refused += 1;
        }
    }
    assert_eq!(
        refused,
        6 - app.requests(),
        "every request answered 200 or 429"
    );
    assert!(refused >= 2, "{refused} refused");
    let refused = refused as f64;

    let scrape = Scrape::wait_for(
        orders.admin,
        "rate_limited_total",
        &[
            ("service", "orders"),
            ("policy", "orders-limit"),
            ("endpoint", "/api"),
        ],
        refused,
    )
    .await;
    let api = route("inbound", "orders", "/api");
    assert_eq!(scrape.sum("request_total", &answered(api, "429")), refused);
    assert_eq!(
        scrape.sum("request_total", &answered(api, "200")),
        6.0 - refused
    );
    assert_eq!(
        scrape.sum(
            "meshlet_mesh_responses_total",
            &[("direction", "inbound"), ("reason", "rate_limited")]
        ),
        refused
    );
    assert_promtool_accepts(&scrape);
}

#[tokio::test]
async fn breaker_states_retries_timeouts_and_connect_errors_name_their_target() {
    let orders_app = Upstream::start("orders").await;
    let dead: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let config = service("orders", &[(orders_app.addr, "v1")])
        + &service("gone", &[(dead, "v1")])
        + &doc(
            "CircuitBreakerPolicy",
            "orders-breaker",
            "targetRef: {service: orders}\nmatch: {pathPrefix: /status}\nconsecutiveFailures: 3\nopenDuration: 60s",
        )
        + &doc(
            "RetryPolicy",
            "orders-retry",
            "targetRef: {service: orders}\nmatch: {pathPrefix: /flaky}\nattempts: 2\nretryOn: [5xx]",
        )
        + &doc(
            "TimeoutPolicy",
            "orders-slow",
            "targetRef: {service: orders}\nmatch: {pathPrefix: /slow}\nrequest: 300ms",
        );
    let (_frontend_app, frontend) = standalone("frontend", &config).await;
    let address = orders_app.addr.to_string();
    let breaker = [
        ("destination", "orders"),
        ("policy", "orders-breaker"),
        ("address", address.as_str()),
    ];

    // Closed while requests succeed.
    assert_eq!(
        call(&frontend, "http://orders/status?code=200")
            .await
            .status,
        200
    );
    let scrape = Scrape::of(frontend.admin).await;
    assert_eq!(
        scrape.matching("circuit_breaker_state", &breaker).count(),
        1
    );
    assert_eq!(scrape.sum("circuit_breaker_state", &breaker), 0.0);

    // Open after three failures in a row; the next request is refused.
    for _ in 0..3 {
        assert_eq!(
            call(&frontend, "http://orders/status?code=500")
                .await
                .status,
            500
        );
    }
    let refused = call(&frontend, "http://orders/status?code=200").await;
    assert_eq!(refused.header("x-meshlet-reason"), Some("circuit_open"));
    let status = route("outbound", "orders", "/status");
    let scrape = Scrape::wait_for(
        frontend.admin,
        "request_total",
        &answered(status, "503"),
        1.0,
    )
    .await;
    assert_eq!(scrape.sum("circuit_breaker_state", &breaker), 2.0);
    assert_eq!(scrape.sum("request_total", &answered(status, "500")), 3.0);

    // One retry of a failed try.
    assert_eq!(
        call(&frontend, "http://orders/flaky?percent=100")
            .await
            .status,
        500
    );
    assert_eq!(orders_app.requests(), 6, "the retry reached the upstream");
    // A try that timed out.
    assert_eq!(
        call(&frontend, "http://orders/slow?ms=3000").await.status,
        504
    );
    // A connection refused.
    assert_eq!(call(&frontend, "http://gone/").await.status, 502);

    let outbound_to = |destination| [("direction", "outbound"), ("destination", destination)];
    let scrape = Scrape::wait_for(
        frontend.admin,
        "request_total",
        &answered(route("outbound", "gone", "/"), "502"),
        1.0,
    )
    .await;
    assert_eq!(
        scrape.sum(
            "retries_total",
            &[("destination", "orders"), ("policy", "orders-retry")]
        ),
        1.0
    );
    assert_eq!(scrape.sum("timeouts_total", &outbound_to("orders")), 1.0);
    assert_eq!(
        scrape.sum("upstream_connect_errors_total", &outbound_to("gone")),
        1.0
    );
    assert_eq!(
        scrape.sum(
            "request_total",
            &answered(route("outbound", "orders", "/slow"), "504")
        ),
        1.0
    );
    assert_promtool_accepts(&scrape);
}
