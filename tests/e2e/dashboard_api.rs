//! The dashboard's JSON API (issue 7), everything in-process
//! ([`meshlet_e2e::inprocess`]): a control plane, a caller (`frontend`)
//! and an upstream (`orders`), each app with its sidecar reporting stats
//! every 200 ms.
//!
//! After exactly N requests from the caller to orders, the numbers the API
//! shows match within the reporting interval (waited for with a deadline):
//! orders served N, the edge frontend → orders carried N. A breaker the
//! caller opens shows up as `open`, and the event stream announces
//! reports as they arrive.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use meshlet_e2e::inprocess::{ControlPlane, Sidecar};
use meshlet_e2e::{client, wait, TempDir, Upstream};
use serde_json::Value;

/// Requests sent from frontend to orders.
const N: u64 = 25;
/// Generous: a report every 200 ms, a registry push within milliseconds.
const PATIENCE: Duration = Duration::from_secs(15);

const BREAKER: &str = "\
apiVersion: meshlet.dev/v1alpha1
kind: CircuitBreakerPolicy
metadata: {name: orders-breaker}
spec: {targetRef: {service: orders}, consecutiveFailures: 2, openDuration: 60s}
";

async fn instance(cp: &ControlPlane, service: &str) -> (Upstream, Sidecar) {
    let app = Upstream::start(service).await;
    let sidecar = Sidecar::builder(service, app.port())
        .control_plane(&cp)
        .arg("--stats-interval")
        .arg("200ms")
        .start()
        .await;
    (app, sidecar)
}

/// The entry of `list` whose `field` is `value`.
fn find<'a>(list: &'a Value, field: &str, value: &str) -> Option<&'a Value> {
    list.as_array()?.iter().find(|v| v[field] == value)
}

/// Waits until `GET path` answers JSON for which `check` is true; returns it.
async fn wait_json(
    cp: &ControlPlane,
    what: &str,
    path: &str,
    check: impl Fn(&Value) -> bool,
) -> Value {
    let last = std::cell::RefCell::new(Value::Null);
    let found = wait::within(PATIENCE, || async {
        let json = cp.get_json(path).await;
        let ok = check(&json);
        *last.borrow_mut() = json.clone();
        ok.then_some(json)
    })
    .await;
    found.unwrap_or_else(|| {
        panic!(
            "timed out waiting for {what}; last {path}: {:#}",
            last.borrow()
        )
    })
}

/// An open `text/event-stream` response.
struct EventStream {
    body: hyper::body::Incoming,
    buffer: String,
}

impl EventStream {
    async fn open(cp: &ControlPlane, path: &str) -> EventStream {
        let request = meshlet_client::request(http::Method::GET, &cp.authority(), path)
            .body(Full::new(Bytes::new()))
            .expect("valid request");
        let response = cp
            .client()
            .send(&cp.authority(), request)
            .await
            .expect("answered");
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        EventStream {
            body: response.into_body(),
            buffer: String::new(),
        }
    }

    /// The next event (blank-line terminated) as `(event name, data)`;
    /// comments are skipped.
    async fn next(&mut self) -> (String, String) {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let (mut name, mut data) = (String::new(), String::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        name = v.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim());
                    }
                }
                if !name.is_empty() || !data.is_empty() {
                    return (name, data);
                }
                continue;
            }
            let frame = tokio::time::timeout(PATIENCE, self.body.frame())
                .await
                .expect("an event in time")
                .expect("stream open")
                .expect("stream readable");
            if let Ok(data) = frame.into_data() {
                self.buffer
                    .push_str(std::str::from_utf8(&data).expect("UTF-8"));
            }
        }
    }
}

#[tokio::test]
async fn the_dashboard_shows_what_the_sidecars_counted() {
    let dir = TempDir::new();
    let cp = ControlPlane::start(&dir.path.join("data"), &[]).await;
    let (_orders_app, _orders) = instance(&cp, "orders").await;
    let (_frontend_app, frontend) = instance(&cp, "frontend").await;
    wait::until("frontend routes to orders", PATIENCE, || async {
        (!frontend.endpoints_of("orders").await.is_empty()).then_some(())
    })
    .await;

    let mut events = EventStream::open(&cp, "/api/v1/dashboard/events").await;

    for i in 0..N {
        let reply = client::get_uri(frontend.outbound, "http://orders/")
            .await
            .expect("an answer");
        assert_eq!(reply.status, 200, "request {i}: {}", reply.text());
    }

    let services = wait_json(
        &cp,
        "orders to have served N requests",
        "/api/v1/dashboard/services",
        |s| find(s, "name", "orders").is_some_and(|o| o["requests"] == N),
    )
    .await;
    let orders = find(&services, "name", "orders").unwrap();
    assert_eq!(orders["namespace"], "default");
    assert_eq!(orders["healthy"], true, "{orders:#}");
    assert_eq!(orders["instances"].as_array().unwrap().len(), 1);
    assert!(orders["instances"][0]["lastHeartbeatMs"].as_u64().unwrap() > 0);
    assert_eq!(
        orders["instances"][0]["identity"], "spiffe://meshlet.local/ns/default/sa/orders",
        "{orders:#}"
    );
    assert!(orders["rps"].as_f64().unwrap() > 0.0, "{orders:#}");
    assert_eq!(orders["successRate"], 1.0);
    assert!(orders["p50Ms"].as_f64().unwrap() > 0.0, "{orders:#}");
    let frontend_view = find(&services, "name", "frontend").expect("frontend listed");
    assert_eq!(frontend_view["requests"], 0, "frontend served nothing");
    assert_eq!(frontend_view["successRate"], Value::Null);

    let topology = wait_json(
        &cp,
        "the edge frontend -> orders with N requests",
        "/api/v1/dashboard/topology",
        |t| {
            t["edges"].as_array().is_some_and(|edges| {
                edges.iter().any(|e| {
                    e["from"] == "default/frontend"
                        && e["to"] == "default/orders"
                        && e["requests"] == N
                })
            })
        },
    )
    .await;
    assert_eq!(
        topology["edges"].as_array().unwrap().len(),
        1,
        "{topology:#}"
    );
    assert!(find(&topology["nodes"], "id", "default/orders").is_some());
    // Both ends are registered sidecars with identities: mTLS.
    assert_eq!(topology["edges"][0]["mtls"], true, "{topology:#}");

    // A report arrived since the stream opened: an update announces it.
    let (name, data) = events.next().await;
    assert_eq!(name, "update");
    let update: Value = serde_json::from_str(&data).expect("JSON data");
    assert!(update["revision"].as_u64().unwrap() > 0, "{update}");
    assert!(update["atMs"].as_u64().unwrap() > 0, "{update}");

    // The caller's breaker opens after two failures.
    cp.apply(&dir.path, "breaker.yaml", BREAKER).await;
    wait_json(
        &cp,
        "the caller's breaker to be reported",
        "/api/v1/dashboard/policies",
        |p| find(&p["breakers"], "policy", "orders-breaker").is_some(),
    )
    .await;
    for _ in 0..2 {
        let reply = client::get_uri(frontend.outbound, "http://orders/status?code=500")
            .await
            .expect("an answer");
        assert_eq!(reply.status, 500);
    }
    let policies = wait_json(
        &cp,
        "the breaker to show open",
        "/api/v1/dashboard/policies",
        |p| find(&p["breakers"], "policy", "orders-breaker").is_some_and(|b| b["state"] == "open"),
    )
    .await;
    let breaker = find(&policies["breakers"], "policy", "orders-breaker").unwrap();
    assert_eq!(breaker["service"], "frontend");
    assert_eq!(breaker["destination"], "orders");
    assert!(breaker["sinceMs"].as_u64().unwrap() > 0);
    let resource = find(&policies["resources"], "name", "orders-breaker").expect("listed");
    assert_eq!(resource["kind"], "CircuitBreakerPolicy");
    assert_eq!(resource["revision"], policies["revision"]);
    assert!(policies["history"]
        .as_array()
        .is_some_and(|h| !h.is_empty()));

    let series = cp
        .get_json("/api/v1/dashboard/series?service=default/orders")
        .await;
    let served: f64 = series["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["rps"].as_f64().unwrap())
        .sum();
    assert!(served > 0.0, "{series:#}");
}
