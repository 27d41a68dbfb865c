//! A mesh-wide view from every control-plane replica (issue 18): three
//! `control-plane --store etcd` processes on a real three-member etcd
//! cluster find each other under the prefix (`P/replicas/ID` on a lease)
//! and answer the trace API and the dashboard's data with what every live
//! replica holds.
//!
//! - every replica lists the three in `/healthz?detail` and `meshctl get
//!   replicas`;
//! - spans exported to replicas 1 and 2 (one trace split between them) are
//!   one trace through replica 3's trace API (`meshctl trace` too);
//! - stats reported to replica 1 show in replica 2's dashboard services;
//! - the internal peer routes refuse a forged credential, an admin token
//!   and no credential; the genuine credential opens nothing else;
//! - a replica that stops answering (SIGSTOP) leaves a 200 answer marked
//!   `x-meshlet-partial` within the peer timeout, never an error or a
//!   hang; SIGKILLed, it leaves the live set when its lease ends;
//! - `meshctl tap` through replica 1 sees the requests of a sidecar that
//!   watches replica 2 (the tap shared through etcd, its events forwarded
//!   to replica 1), and that sidecar stops tapping when meshctl is done.

use std::time::{Duration, Instant};

use meshlet_e2e::etcd::EtcdCluster;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use meshlet_e2e::{client, meshctl, wait, ControlPlaneProcess, SidecarProcess, TempDir, Upstream};

/// Three replicas on `etcd`, one after the other, each with `extra` flags.
async fn replicas(
    dir: &TempDir,
    etcd: &EtcdCluster,
    prefix: &str,
    extra: &[&str],
) -> Vec<ControlPlaneProcess> {
    etcd.start_replicas(dir, prefix, &[&["--ttl", "60s"], extra].concat())
        .await
}

/// The replica ids `cp` lists in `/healthz?detail`.
async fn listed_replicas(cp: &ControlPlaneProcess) -> Vec<String> {
    let detail = cp.get_json("/healthz?detail").await;
    detail["replicas"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["id"].as_str().map(str::to_owned))
        .collect()
}

async fn wait_all_listed(cps: &[ControlPlaneProcess], ids: &[&str]) {
    for cp in cps {
        wait::until(
            "every replica lists the live replicas",
            Duration::from_secs(15),
            || async { (listed_replicas(cp).await == ids).then_some(()) },
        )
        .await;
    }
}

fn now_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// An OTLP/JSON export of one span of `service`.
fn export(service: &str, trace: &str, span: &str, parent: &str, start: u64) -> serde_json::Value {
    serde_json::json!({"resourceSpans": [{
        "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": service}}]},
        "scopeSpans": [{"spans": [{
            "traceId": trace, "spanId": span, "parentSpanId": parent,
            "name": format!("GET /{service}"), "kind": 2,
            "startTimeUnixNano": start.to_string(),
            "endTimeUnixNano": (start + 5_000_000).to_string(),
        }]}]
    }]})
}

const TRACE: &str = "5b8efff798038103d269b633813fc60c";

/// Registers an instance of `service` through `cp` (admin) and reports
/// one interval of inbound traffic for it: `requests`, one error.
async fn report_stats(cp: &ControlPlaneProcess, id: &str, service: &str, requests: u64) {
    let registration = serde_json::json!({
        "id": id, "service": service, "address": "127.0.0.1:9", "healthy": true,
    });
    let reply = cp.post_json("/api/v1/instances", &registration).await;
    assert_eq!(reply.status, 200, "register: {}", reply.text());
    let report = serde_json::json!({
        "intervalMs": 5000,
        "routes": [{
            "direction": "inbound", "destination": service, "endpoint": "/",
            "requests": requests, "errors": 1,
            "latencyBucketsMs": [1.0, 10.0], "latencyCounts": [requests, 0, 0],
        }],
    });
    let reply = cp
        .post_json(&format!("/api/v1/instances/{id}/stats"), &report)
        .await;
    assert_eq!(reply.status, 204, "stats: {}", reply.text());
}

/// The dashboard's request total of `service` as `cp` answers it, with
/// the answer's `x-meshlet-merged`.
async fn dashboard_requests(cp: &ControlPlaneProcess, service: &str) -> (u64, Option<String>) {
    let reply = cp.get("/api/v1/dashboard/services").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let views: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
    let requests = views
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == service)
        .map_or(0, |v| v["requests"].as_u64().unwrap_or(0));
    (
        requests,
        reply.header("x-meshlet-merged").map(str::to_owned),
    )
}

/// The peer credential as a replica of `cp`'s mesh derives it (HMAC of
/// the CA key, see `peers::credential`): the test's genuine control.
fn genuine_peer_credential(cp: &ControlPlaneProcess, prefix: &str) -> String {
    let key = std::fs::read_to_string(cp.data_dir.join("ca.key")).unwrap();
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key.as_bytes());
    let mut message = b"meshlet control-plane peer v1\0".to_vec();
    message.extend_from_slice(prefix.as_bytes());
    let tag = ring::hmac::sign(&key, &message);
    let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("mlp_{hex}")
}

async fn get_with(
    cp: &ControlPlaneProcess,
    client: &meshlet_client::Client,
    path: &str,
    peer: Option<&str>,
) -> meshlet_client::Reply {
    let mut request = meshlet_client::request(http::Method::GET, &cp.authority(), path);
    if let Some(peer) = peer {
        request = request.header("x-meshlet-peer", peer);
    }
    let request = request
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    client.fetch(&cp.authority(), request).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_and_stats_reported_to_one_replica_are_read_through_another() {
    let etcd = EtcdCluster::start(3).await;
    let dir = TempDir::new();
    let cps = replicas(&dir, &etcd, "/view-a", &[]).await;
    let all = ["replica-1", "replica-2", "replica-3"];
    wait_all_listed(&cps, &all).await;
    let out = meshctl(&cps[0], &["get", "replicas"]).await;
    assert!(out.success(), "{out:?}");
    for id in all {
        assert!(out.stdout.contains(id), "meshctl get replicas: {out:?}");
    }

    // One trace, split: the frontend's root span reaches replica 1, the
    // orders span (its child) replica 2. Replica 3 received nothing.
    let start = now_nanos();
    let root = export("frontend", TRACE, "00000000000000a1", "", start);
    let child = export(
        "orders",
        TRACE,
        "00000000000000b2",
        "00000000000000a1",
        start + 1_000_000,
    );
    assert_eq!(cps[0].post_json("/v1/traces", &root).await.status, 200);
    assert_eq!(cps[1].post_json("/v1/traces", &child).await.status, 200);
    let reply = cps[2].get("/api/traces").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.header("x-meshlet-merged"), Some("3/3"));
    assert_eq!(reply.header("x-meshlet-partial"), None);
    let list: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 1, "one trace: {list:?}");
    assert_eq!(list[0]["traceId"], TRACE);
    assert_eq!(list[0]["spanCount"], 2, "{list:?}");
    assert_eq!(list[0]["rootService"], "frontend");
    assert_eq!(
        list[0]["services"],
        serde_json::json!(["frontend", "orders"])
    );
    let detail = cps[2].get_json(&format!("/api/traces/{TRACE}")).await;
    let spans: Vec<&str> = detail["spans"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["service"].as_str().unwrap())
        .collect();
    assert_eq!(spans, ["frontend", "orders"], "{detail}");
    let out = meshctl(&cps[2], &["trace", TRACE]).await;
    assert!(
        out.success() && out.stdout.contains("frontend") && out.stdout.contains("orders"),
        "meshctl trace through replica 3: {out:?}"
    );
    // A service filter: each replica filters its own part.
    let orders = cps[2].get_json("/api/traces?service=orders").await;
    assert_eq!(orders.as_array().unwrap().len(), 1, "{orders}");

    // Stats reported to replica 1 (12 requests) and replica 3 (30) are
    // one total through replica 2; a service nobody reported stays 0.
    report_stats(&cps[0], "orders-1", "orders", 12).await;
    report_stats(&cps[2], "orders-2", "orders", 30).await;
    let (requests, merged) = dashboard_requests(&cps[1], "orders").await;
    assert_eq!(
        requests, 42,
        "replica 2's dashboard sums every replica's reports"
    );
    assert_eq!(merged.as_deref(), Some("3/3"));
    for path in [
        "/api/v1/dashboard/topology",
        "/api/v1/dashboard/policies",
        "/api/v1/dashboard/series?service=default/orders",
        "/api/v1/resources/info",
    ] {
        let reply = cps[1].get(path).await;
        assert_eq!(reply.status, 200, "{path}: {}", reply.text());
        assert_eq!(reply.header("x-meshlet-merged"), Some("3/3"), "{path}");
    }
    let series = cps[1]
        .get_json("/api/v1/dashboard/series?service=default/orders")
        .await;
    let total: f64 = series["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["rps"].as_f64().unwrap_or(0.0))
        .sum();
    assert!(
        total > 0.0,
        "the series has the other replicas' reports: {series}"
    );

    // The internal routes: only the replicas' credential.
    let anonymous = cps[1].anonymous_client();
    let admin = cps[1].client();
    let genuine = genuine_peer_credential(&cps[1], "/view-a");
    let mut forged = genuine.clone();
    let last = forged.pop().unwrap();
    forged.push(if last == '0' { '1' } else { '0' });
    let other_mesh = genuine_peer_credential(&cps[1], "/another-mesh");
    for (who, client, peer) in [
        ("no credential", &anonymous, None),
        ("an admin token", &admin, None),
        ("a forged credential", &anonymous, Some(forged.as_str())),
        (
            "another mesh's credential",
            &anonymous,
            Some(other_mesh.as_str()),
        ),
    ] {
        for path in ["/api/v1/peer/stats", "/api/v1/peer/traces?limit=5"] {
            let reply = get_with(&cps[1], client, path, peer).await;
            assert_eq!(reply.status, 401, "{who} on {path}: {}", reply.text());
            assert_eq!(reply.header("x-meshlet-reason"), Some("unauthenticated"));
        }
    }
    let reply = get_with(&cps[1], &anonymous, "/api/v1/peer/stats", Some(&genuine)).await;
    assert_eq!(
        reply.status,
        200,
        "the genuine credential: {}",
        reply.text()
    );
    for path in [
        "/api/v1/services",
        "/api/traces",
        "/api/v1/dashboard/services",
    ] {
        let reply = get_with(&cps[1], &anonymous, path, Some(&genuine)).await;
        assert_eq!(
            reply.status,
            401,
            "the peer credential opens {path}: {}",
            reply.text()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_replica_leaves_a_partial_answer_within_the_deadline() {
    let etcd = EtcdCluster::start(3).await;
    let dir = TempDir::new();
    let mut cps = replicas(&dir, &etcd, "/view-b", &["--peer-timeout", "500ms"]).await;
    wait_all_listed(&cps, &["replica-1", "replica-2", "replica-3"]).await;
    let start = now_nanos();
    let span = |service: &str, id: &str| export(service, TRACE, id, "", start);
    assert_eq!(
        cps[1]
            .post_json("/v1/traces", &span("orders", "00000000000000c1"))
            .await
            .status,
        200
    );
    assert_eq!(
        cps[2]
            .post_json("/v1/traces", &span("payments", "00000000000000c2"))
            .await
            .status,
        200
    );
    report_stats(&cps[1], "orders-1", "orders", 7).await;

    // Replica 3 stops: its socket accepts, nothing answers.
    cps[2].signal(nix::sys::signal::Signal::SIGSTOP);
    let asked = Instant::now();
    let reply = cps[0].get("/api/traces").await;
    let took = asked.elapsed();
    cps[2].signal(nix::sys::signal::Signal::SIGCONT);
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert!(
        took < Duration::from_secs(3),
        "a partial answer within the deadline, took {took:?}"
    );
    assert_eq!(reply.header("x-meshlet-partial"), Some("replica-3"));
    assert_eq!(reply.header("x-meshlet-merged"), Some("2/3"));
    let list: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(list[0]["spanCount"], 1, "replica 2's part is there: {list}");
    let out = meshctl(&cps[0], &["traces"]).await;
    assert!(out.success(), "{out:?}");

    // SIGKILLed: partial until its registration's lease ends, then whole
    // again without it.
    cps[2].kill9().await;
    // meshctl says the answer lacks a replica's part (stderr), and still
    // prints what it got (stdout).
    let out = meshctl(&cps[0], &["traces"]).await;
    assert!(out.success(), "{out:?}");
    assert!(
        out.stderr
            .contains("meshctl: warning: partial answer: replica replica-3 did not answer"),
        "{out:?}"
    );
    assert!(out.stdout.contains("orders"), "{out:?}");
    let reply = cps[0].get("/api/v1/dashboard/services").await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("x-meshlet-partial"), Some("replica-3"));
    assert_eq!(dashboard_requests(&cps[0], "orders").await.0, 7);
    wait::until(
        "the killed replica leaves the live set (its lease ends)",
        Duration::from_secs(15),
        || async { (listed_replicas(&cps[0]).await == ["replica-1", "replica-2"]).then_some(()) },
    )
    .await;
    let (requests, merged) = dashboard_requests(&cps[0], "orders").await;
    assert_eq!((requests, merged.as_deref()), (7, Some("2/2")));
    let out = meshctl(&cps[0], &["traces"]).await;
    assert!(out.success() && !out.stderr.contains("partial"), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tap_through_one_replica_sees_sidecars_watching_another() {
    let etcd = EtcdCluster::start(3).await;
    let dir = TempDir::new();
    let cps = replicas(&dir, &etcd, "/view-c", &[]).await;
    wait_all_listed(&cps, &["replica-1", "replica-2", "replica-3"]).await;
    // orders' sidecar watches replica 2, frontend's replica 3; nothing
    // watches replica 1, where the tap is served.
    let orders_app = Upstream::start("orders").await;
    let orders = SidecarProcess::builder("orders", orders_app.port())
        .control_plane(&cps[1])
        .start()
        .await;
    let frontend_app = Upstream::start("frontend").await;
    let frontend = SidecarProcess::builder("frontend", frontend_app.port())
        .control_plane(&cps[2])
        .start()
        .await;
    wait::until(
        "frontend routes to orders",
        Duration::from_secs(20),
        || async { (!frontend.endpoints_of("orders").await.is_empty()).then_some(()) },
    )
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = {
        let stop = stop.clone();
        let outbound = frontend.outbound;
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let _ = client::get_uri(outbound, &format!("http://orders/echo?n={i}")).await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let out = meshctl(
        &cps[0],
        &["tap", "service", "orders", "--max", "10", "-o", "json"],
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    let _ = traffic.await;
    assert!(
        out.success(),
        "tap through replica 1: {} {}",
        out.stdout,
        out.stderr
    );
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 10, "{}", out.stdout);
    for line in lines {
        let event: serde_json::Value = serde_json::from_str(line).expect("an event per line");
        assert_eq!(event["service"], "orders", "{line}");
        assert_eq!(event["direction"], "inbound", "{line}");
        assert_eq!(event["path"], "/echo", "{line}");
    }
    wait::until(
        "the sidecar watching replica 2 stops tapping",
        Duration::from_secs(5),
        || async {
            let dump = orders.config_dump().await;
            (dump["controlPlane"]["liveTaps"] == 0).then_some(())
        },
    )
    .await;
}
