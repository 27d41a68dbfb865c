//! Tracing end to end: W3C trace context joined or started per the spec,
//! spans exported over OTLP/HTTP, sampling, a collector that is down or
//! hung, the access log, and one trace across three services assembled
//! by the control plane.
//!
//! The trace-context and sampling tests run their sidecar in-process
//! ([`meshlet_e2e::inprocess`]); the others start the binaries because they
//! read what only a process has: its memory (RSS) under a hung collector,
//! its standard output (the access log), and the demo app with its
//! sidecars (`demo-service` processes).

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use meshlet_e2e::collector::{Collector, HungCollector, ReceivedSpan};
use meshlet_e2e::demo::DemoService;
use meshlet_e2e::inprocess::Sidecar;
use meshlet_e2e::process::free_port;
use meshlet_e2e::{client, meshctl, wait, ControlPlaneProcess, SidecarProcess, TempDir, Upstream};

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";

/// A standalone sidecar for `orders` (its app: `app`) that also knows
/// `orders` as a mesh service (outbound), exporting spans to `endpoint`.
async fn sidecar_for(app: &Upstream, endpoint: &str, extra_yaml: &str) -> Sidecar {
    let config = format!(
        "apiVersion: meshlet.dev/v1alpha1\nkind: Service\nmetadata: {{name: orders}}\n\
         spec:\n  endpoints:\n    - address: 127.0.0.1:{}\n{extra_yaml}",
        app.port()
    );
    Sidecar::builder("orders", app.port())
        .config(&config)
        .arg("--trace-endpoint")
        .arg(endpoint)
        .start()
        .await
}

/// Sends `GET /headers` to `addr` (with `uri`) carrying `headers`; returns
/// the request headers the app received.
async fn headers_seen_by_app(
    addr: std::net::SocketAddr,
    uri: &str,
    headers: &[(&str, &str)],
) -> HashMap<String, String> {
    let mut request = Request::get(uri).header("host", "orders");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(Full::new(Bytes::new())).unwrap();
    let reply = client::send(addr, request).await.expect("proxied");
    assert_eq!(reply.status, 200, "{}", reply.text());
    let json: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
    json["headers"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v[0].as_str().unwrap_or_default().to_owned()))
        .collect()
}

/// `(trace id, parent id, flags)` of a `traceparent` the app received,
/// checked to be a well-formed version-00 value.
fn parts(traceparent: &str) -> (String, String, String) {
    let fields: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(fields.len(), 4, "{traceparent:?}");
    assert_eq!(fields[0], "00");
    assert_eq!(fields[1].len(), 32);
    assert_eq!(fields[2].len(), 16);
    assert!(traceparent
        .bytes()
        .all(|b| b == b'-' || b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
    (fields[1].into(), fields[2].into(), fields[3].into())
}

/// Waits until the collector holds a span with `span_id`.
async fn span_with_id(collector: &Collector, span_id: &str) -> ReceivedSpan {
    wait::until(
        "the span reaches the collector",
        Duration::from_secs(10),
        || async {
            collector
                .spans()
                .into_iter()
                .find(|s| s.span_id() == span_id)
        },
    )
    .await
}

#[tokio::test]
async fn a_valid_traceparent_is_joined_and_an_invalid_one_starts_a_new_trace() {
    let app = Upstream::start("orders").await;
    let collector = Collector::start().await;
    let sidecar = sidecar_for(&app, &collector.url(), "").await;
    let state = "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7";

    // Valid and sampled: same trace, a new parent (the sidecar's server
    // span), the flag kept, tracestate unchanged.
    let seen = headers_seen_by_app(
        sidecar.inbound,
        "/headers",
        &[
            ("traceparent", &format!("00-{TRACE}-{PARENT}-01")),
            ("tracestate", state),
        ],
    )
    .await;
    let (trace, parent, flags) = parts(&seen["traceparent"]);
    assert_eq!((trace.as_str(), flags.as_str()), (TRACE, "01"));
    assert_ne!(parent, PARENT, "the app's parent is the sidecar's span");
    assert_eq!(seen["tracestate"], state);
    let span = span_with_id(&collector, &parent).await;
    assert_eq!(span.trace_id(), TRACE);
    assert_eq!(span.parent_id(), PARENT);
    assert_eq!(span.service, "orders");
    assert_eq!(span.span.kind, 2, "server span");
    assert_eq!(span.int_attribute("http.response.status_code"), Some(200));

    // Valid, not sampled: joined, flag kept, no span recorded.
    let unsampled = "11111111111111111111111111111111";
    let seen = headers_seen_by_app(
        sidecar.inbound,
        "/headers",
        &[("traceparent", &format!("00-{unsampled}-{PARENT}-00"))],
    )
    .await;
    let (trace, _, flags) = parts(&seen["traceparent"]);
    assert_eq!((trace.as_str(), flags.as_str()), (unsampled, "00"));

    // Invalid values: a new trace each time, tracestate dropped.
    let zeros = "0".repeat(32);
    let invalid = [
        format!("ff-{TRACE}-{PARENT}-01"),
        format!("00-{zeros}-{PARENT}-01"),
        format!("00-{TRACE}-{}-01", "0".repeat(16)),
        format!("00-{}-{PARENT}-01", &TRACE[2..]),
        format!("00-{TRACE}-{PARENT}1-01"),
        format!("00-{}-{PARENT}-01", TRACE.to_uppercase()),
        "garbage".to_owned(),
    ];
    let mut new_traces = Vec::new();
    for value in &invalid {
        let seen = headers_seen_by_app(
            sidecar.inbound,
            "/headers",
            &[("traceparent", value), ("tracestate", state)],
        )
        .await;
        let (trace, parent, flags) = parts(&seen["traceparent"]);
        assert_ne!(trace, TRACE, "{value:?} must start a new trace");
        // Sampled (no TracingPolicy), and the id is random (Level 2 flag 0x02).
        assert_eq!(flags, "03", "new traces are sampled with a random id");
        assert!(
            !seen.contains_key("tracestate"),
            "{value:?}: tracestate dropped"
        );
        let span = span_with_id(&collector, &parent).await;
        assert!(
            span.span.parent_span_id.is_empty(),
            "a new trace's root span"
        );
        new_traces.push(trace);
    }
    new_traces.sort();
    new_traces.dedup();
    assert_eq!(
        new_traces.len(),
        invalid.len(),
        "each new trace has its own id"
    );

    // B3 (single and multi header) is read; the app gets W3C.
    let seen = headers_seen_by_app(
        sidecar.inbound,
        "/headers",
        &[("b3", &format!("{TRACE}-{PARENT}-1"))],
    )
    .await;
    assert_eq!(parts(&seen["traceparent"]).0, TRACE);
    assert!(!seen.contains_key("b3"));
    let seen = headers_seen_by_app(
        sidecar.inbound,
        "/headers",
        &[
            ("x-b3-traceid", TRACE),
            ("x-b3-spanid", PARENT),
            ("x-b3-sampled", "1"),
        ],
    )
    .await;
    assert_eq!(parts(&seen["traceparent"]).0, TRACE);

    // The unsampled trace left no span behind.
    let all = wait::until("spans exported", Duration::from_secs(10), || async {
        let spans = collector.spans();
        (spans.len() >= 2 + invalid.len()).then_some(spans)
    })
    .await;
    assert!(all.iter().all(|s| s.trace_id() != unsampled));
}

#[tokio::test]
async fn an_outbound_call_gets_a_client_span_under_the_apps_context() {
    let app = Upstream::start("orders").await;
    let collector = Collector::start().await;
    let sidecar = sidecar_for(&app, &collector.url(), "").await;
    // The app copies the traceparent it received (parent = its inbound
    // server span) onto its call to orders.
    let server_span = "a1a2a3a4a5a6a7a8";
    let seen = headers_seen_by_app(
        sidecar.outbound,
        "http://orders/headers",
        &[("traceparent", &format!("00-{TRACE}-{server_span}-01"))],
    )
    .await;
    let (trace, client_span, _) = parts(&seen["traceparent"]);
    assert_eq!(trace, TRACE);
    let span = span_with_id(&collector, &client_span).await;
    assert_eq!(span.span.kind, 3, "client span");
    assert_eq!(span.parent_id(), server_span);
    assert_eq!(span.string_attribute("meshlet.destination"), Some("orders"));
    assert_eq!(
        span.string_attribute("server.address"),
        Some(format!("127.0.0.1:{}", app.port()).as_str())
    );
    assert!(span.span.end_time_unix_nano >= span.span.start_time_unix_nano);
}

#[tokio::test]
async fn a_tracing_policy_ratio_of_zero_records_no_new_traces_but_honours_sampled_callers() {
    let app = Upstream::start("orders").await;
    let collector = Collector::start().await;
    let policy = "---\napiVersion: meshlet.dev/v1alpha1\nkind: TracingPolicy\n\
                  metadata: {name: orders-tracing}\n\
                  spec: {targetRef: {service: orders}, samplingRatio: 0.0}\n";
    let sidecar = sidecar_for(&app, &collector.url(), policy).await;
    for _ in 0..20 {
        let seen = headers_seen_by_app(sidecar.inbound, "/headers", &[]).await;
        assert_eq!(
            parts(&seen["traceparent"]).2,
            "02", // not sampled; random trace id (Level 2 flag 0x02)
            "new traces are not sampled"
        );
    }
    let seen = headers_seen_by_app(
        sidecar.inbound,
        "/headers",
        &[("traceparent", &format!("00-{TRACE}-{PARENT}-01"))],
    )
    .await;
    let (_, parent, flags) = parts(&seen["traceparent"]);
    assert_eq!(flags, "01");
    span_with_id(&collector, &parent).await;
    assert_eq!(collector.spans().len(), 1, "only the caller-sampled trace");
}

/// A counter's value from Prometheus text (summing every series of it that
/// carries `label`).
fn counter(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with('{') && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn a_hung_or_dead_collector_drops_spans_without_holding_requests() {
    let app = Upstream::start("orders").await;
    let hung = HungCollector::start().await;
    let sidecar = SidecarProcess::builder("orders", app.port())
        .arg("--trace-endpoint")
        .arg(&hung.url())
        .arg("--trace-queue")
        .arg("64")
        .start()
        .await;
    let send_many = |n: usize| {
        let addr = sidecar.inbound;
        async move {
            let tasks: Vec<_> = (0..8)
                .map(|_| {
                    tokio::spawn(async move {
                        for _ in 0..n / 8 {
                            let reply = client::get(addr, "/").await.expect("answered");
                            assert_eq!(reply.status, 200);
                        }
                    })
                })
                .collect();
            for task in tasks {
                task.await.unwrap();
            }
        }
    };
    // Every request is answered while the collector holds the exporter
    // (its timeout is 5 s; these take far less in total).
    send_many(800).await;
    let rss_before = sidecar.rss_bytes();
    send_many(4000).await;
    let rss_after = sidecar.rss_bytes();
    let metrics = client::get(sidecar.admin, "/metrics").await.unwrap().text();
    let dropped = counter(&metrics, "meshlet_spans_dropped_total", "queue_full");
    assert!(
        dropped >= 4000.0,
        "spans beyond the queue are dropped and counted: {dropped}\n{metrics}"
    );
    assert!(
        rss_after < rss_before + 8 * 1024 * 1024,
        "memory stays bounded: {rss_before} → {rss_after} bytes"
    );

    // A dead collector (nothing listens): batches fail and are counted.
    let dead_port = free_port();
    let dead = SidecarProcess::builder("orders", app.port())
        .arg("--trace-endpoint")
        .arg(&format!("http://127.0.0.1:{dead_port}"))
        .start()
        .await;
    for _ in 0..10 {
        assert_eq!(client::get(dead.inbound, "/").await.unwrap().status, 200);
    }
    wait::until(
        "failed exports counted",
        Duration::from_secs(10),
        || async {
            let metrics = client::get(dead.admin, "/metrics").await.ok()?.text();
            (counter(&metrics, "meshlet_spans_dropped_total", "export_failed") >= 10.0)
                .then_some(())
        },
    )
    .await;
}

/// The sidecar's JSON access-log lines (its stdout), once there are at
/// least `count` of them.
async fn access_log_lines(sidecar: &SidecarProcess, count: usize) -> Vec<serde_json::Value> {
    wait::until("the access log lines", Duration::from_secs(5), || async {
        let lines: Vec<serde_json::Value> = sidecar
            .stdout_text()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        (lines.len() >= count).then_some(lines)
    })
    .await
}

#[tokio::test]
async fn the_access_log_has_one_json_line_per_request_with_trace_and_reason() {
    let app = Upstream::start("orders").await;
    let limit = "apiVersion: meshlet.dev/v1alpha1\nkind: RateLimitPolicy\n\
                 metadata: {name: orders-limit}\n\
                 spec: {targetRef: {service: orders}, tokenBucket: {capacity: 2, refillPerSecond: 0.001}}\n";
    let sidecar = SidecarProcess::builder("orders", app.port())
        .config(limit)
        .arg("--access-log")
        .arg("--trace-endpoint")
        .arg("none")
        .start()
        .await;
    let mut statuses = Vec::new();
    for _ in 0..3 {
        let request = Request::get("/api/items/1")
            .header("host", "orders")
            .header("traceparent", format!("00-{TRACE}-{PARENT}-01"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        statuses.push(
            client::send(sidecar.inbound, request)
                .await
                .unwrap()
                .status
                .as_u16(),
        );
    }
    assert_eq!(statuses, [200, 200, 429]);
    let lines = access_log_lines(&sidecar, 3).await;
    assert_eq!(lines.len(), 3);
    for (line, status) in lines.iter().zip(statuses) {
        assert_eq!(line["status"], status);
        assert_eq!(line["direction"], "inbound");
        assert_eq!(line["method"], "GET");
        assert_eq!(line["path"], "/api/items/1");
        assert_eq!(line["trace_id"], TRACE);
    }
    assert!(lines[0].get("reason").is_none());
    assert_eq!(lines[2]["reason"], "rate_limited");
}

#[tokio::test]
async fn a_dry_run_limit_marks_the_access_log_line_of_what_it_would_refuse() {
    let app = Upstream::start("orders").await;
    let limit = "apiVersion: meshlet.dev/v1alpha1\nkind: RateLimitPolicy\n\
                 metadata: {name: orders-limit}\n\
                 spec: {targetRef: {service: orders}, mode: dryRun, tokenBucket: {capacity: 2, refillPerSecond: 0.001}}\n";
    let sidecar = SidecarProcess::builder("orders", app.port())
        .config(limit)
        .arg("--access-log")
        .arg("--trace-endpoint")
        .arg("none")
        .start()
        .await;
    let mut statuses = Vec::new();
    for _ in 0..3 {
        let reply = client::get(sidecar.inbound, "/api/items/1").await.unwrap();
        statuses.push(reply.status.as_u16());
    }
    assert_eq!(statuses, [200, 200, 200], "a dry run refuses nothing");
    let lines = access_log_lines(&sidecar, 3).await;
    assert_eq!(lines.len(), 3);
    assert!(lines[0].get("would_refuse").is_none(), "{}", lines[0]);
    assert!(lines[1].get("would_refuse").is_none(), "{}", lines[1]);
    assert_eq!(
        lines[2]["would_refuse"], "RateLimitPolicy/orders-limit:rate_limited",
        "{}",
        lines[2]
    );
    assert_eq!(lines[2]["status"], 200);
    assert!(lines[2].get("reason").is_none(), "{}", lines[2]);
}

#[tokio::test]
async fn a_call_through_three_services_is_one_trace_of_six_spans_in_the_control_plane() {
    let dir = TempDir::new();
    let cp = ControlPlaneProcess::start(&dir.path.join("data"), &[]).await;
    let _inventory = DemoService::start(&cp, "inventory", None).await;
    let orders = DemoService::start(&cp, "orders", Some("inventory")).await;
    let frontend = DemoService::start(&cp, "frontend", Some("orders")).await;
    // The caller: a load generator with a sidecar (its app is not called).
    let loadgen = SidecarProcess::builder("loadgen", free_port())
        .control_plane(&cp)
        .start()
        .await;
    for (sidecar, service) in [
        (&loadgen, "frontend"),
        (&frontend.sidecar, "orders"),
        (&orders.sidecar, "inventory"),
    ] {
        wait::until("routes converge", Duration::from_secs(10), || async {
            (!sidecar.endpoints_of(service).await.is_empty()).then_some(())
        })
        .await;
    }
    let reply = client::get_uri(loadgen.outbound, "http://frontend/work")
        .await
        .expect("answered");
    assert_eq!(reply.status, 200, "{}", reply.text());

    let trace_id = wait::until(
        "the trace is assembled",
        Duration::from_secs(15),
        || async {
            let list = cp.get_json("/api/traces?service=loadgen").await;
            list.as_array()?
                .iter()
                .find(|t| t["spanCount"] == 6)
                .and_then(|t| t["traceId"].as_str().map(str::to_owned))
        },
    )
    .await;
    let trace = cp.get_json(&format!("/api/traces/{trace_id}")).await;
    let spans = trace["spans"].as_array().expect("spans");
    assert_eq!(spans.len(), 6, "{trace:#}");
    // Walk the chain from the root: each span's only child is the next hop.
    let expected = [
        ("loadgen", "client"),
        ("frontend", "server"),
        ("frontend", "client"),
        ("orders", "server"),
        ("orders", "client"),
        ("inventory", "server"),
    ];
    let mut parent: Option<&serde_json::Value> = None;
    for (service, kind) in expected {
        let parent_id = parent.map(|p| p["spanId"].clone());
        let children: Vec<_> = spans
            .iter()
            .filter(|s| match &parent_id {
                None => s.get("parentSpanId").is_none_or(|p| p.is_null()),
                Some(id) => s["parentSpanId"] == *id,
            })
            .collect();
        assert_eq!(children.len(), 1, "one child of {parent_id:?}: {trace:#}");
        let span = children[0];
        assert_eq!(
            (span["service"].as_str(), span["kind"].as_str()),
            (Some(service), Some(kind))
        );
        let (start, end) = (
            span["startUnixNano"].as_u64().unwrap(),
            span["endUnixNano"].as_u64().unwrap(),
        );
        assert!(end > start, "{span}");
        if let Some(parent) = parent {
            // Within the parent. The spans come from different processes
            // and each ends at its own clock read after the last byte is
            // written: a process preempted between the two on a shared
            // machine ends its span late (20 ms of slack; a wrong unit or
            // a span of another request is off by far more).
            let slack = 20_000_000;
            assert!(
                start + slack >= parent["startUnixNano"].as_u64().unwrap(),
                "{trace:#}"
            );
            assert!(
                end <= parent["endUnixNano"].as_u64().unwrap() + slack,
                "{trace:#}"
            );
        }
        parent = Some(span);
    }
    let root_us = trace["spans"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["durationMicros"].as_f64().unwrap())
        .fold(0.0, f64::max);
    assert!(
        root_us > 0.0 && root_us < 10_000_000.0,
        "plausible: {root_us} µs"
    );

    // meshctl shows it as a waterfall: six lines, each hop indented deeper.
    let shown = meshctl(&cp, &["trace", &trace_id]).await;
    assert!(shown.success(), "{}", shown.stderr);
    let rows: Vec<&str> = shown
        .stdout
        .lines()
        .filter(|l| l.contains(" /") && (l.contains("GET")))
        .collect();
    assert_eq!(rows.len(), 6, "{}", shown.stdout);
    let indents: Vec<usize> = rows.iter().map(|l| l.find("GET").unwrap()).collect();
    assert!(indents.windows(2).all(|w| w[0] < w[1]), "{}", shown.stdout);
    let listed = meshctl(&cp, &["traces", "--service", "inventory"]).await;
    assert!(listed.stdout.contains(&trace_id), "{}", listed.stdout);
}
