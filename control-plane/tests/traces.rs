//! Tests of the trace pipeline: OTLP exports (protobuf and JSON) posted to
//! a control plane running in this process, read back through
//! `/api/traces` and `meshctl traces`/`trace`, and `/metrics` checked with
//! `promtool` (harness in `common/`).

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::ControlPlane;
use http::{Method, StatusCode};
use meshctl::traceview::now_unix_nanos;
use meshlet_api::mesh::ApiError;
use meshlet_api::otlp::{
    ExportTraceServiceRequest, ExportTraceServiceResponse, KeyValue, Message, Span, SpanKind,
    Status, JSON_CONTENT_TYPE, PROTOBUF_CONTENT_TYPE, TRACES_PATH,
};
use meshlet_api::traces::{
    paths, AttributeValue, SpanKindName, StatusCodeName, TraceDetail, TraceSummary,
};
use meshlet_control_plane::traces::model::{export, to_hex};
use serde_json::json;

const MS: u64 = 1_000_000;

/// One hop of the 3-hop trace: a span of `service` with id `[id; 8]`.
struct Hop {
    service: &'static str,
    name: &'static str,
    kind: SpanKind,
    id: u8,
    parent: u8,
    /// Offsets from the trace start, in ms.
    start: u64,
    end: u64,
}

/// frontend → orders → payments, each hop a client span in the caller and
/// a server span in the callee: six spans, each the parent of the next.
const HOPS: [Hop; 6] = [
    Hop {
        service: "frontend",
        name: "GET /checkout",
        kind: SpanKind::Server,
        id: 1,
        parent: 0,
        start: 0,
        end: 40,
    },
    Hop {
        service: "frontend",
        name: "POST orders",
        kind: SpanKind::Client,
        id: 2,
        parent: 1,
        start: 2,
        end: 38,
    },
    Hop {
        service: "orders",
        name: "POST /orders",
        kind: SpanKind::Server,
        id: 3,
        parent: 2,
        start: 4,
        end: 36,
    },
    Hop {
        service: "orders",
        name: "POST payments",
        kind: SpanKind::Client,
        id: 4,
        parent: 3,
        start: 10,
        end: 30,
    },
    Hop {
        service: "payments",
        name: "POST /pay",
        kind: SpanKind::Server,
        id: 5,
        parent: 4,
        start: 12,
        end: 28,
    },
    Hop {
        service: "payments",
        name: "INSERT payment",
        kind: SpanKind::Internal,
        id: 6,
        parent: 5,
        start: 14,
        end: 20,
    },
];

fn hop_span(trace: [u8; 16], t0: u64, hop: &Hop) -> Span {
    Span {
        trace_id: trace.to_vec(),
        span_id: vec![hop.id; 8],
        parent_span_id: if hop.parent == 0 {
            vec![]
        } else {
            vec![hop.parent; 8]
        },
        name: hop.name.into(),
        kind: hop.kind as i32,
        start_time_unix_nano: t0 + hop.start * MS,
        end_time_unix_nano: t0 + hop.end * MS,
        attributes: vec![KeyValue::int("http.response.status_code", 200)],
        status: Some(Status {
            message: String::new(),
            code: 1,
        }),
        ..Default::default()
    }
}

/// Posts `request` as protobuf; asserts 200 and a response without a
/// partial success.
async fn post_protobuf(cp: &ControlPlane, request: &ExportTraceServiceRequest) {
    let (status, body) = cp
        .call_as(
            Method::POST,
            TRACES_PATH,
            PROTOBUF_CONTENT_TYPE,
            request.encode_to_vec(),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    let response = ExportTraceServiceResponse::decode(body.as_ref()).unwrap();
    assert_eq!(response.partial_success, None);
}

/// Sends the 3-hop trace as three exports (one per service, the last hop
/// first) and returns its id in hex.
async fn send_three_hops(cp: &ControlPlane, trace: [u8; 16], t0: u64) -> String {
    for service in ["payments", "orders", "frontend"] {
        let spans = HOPS
            .iter()
            .filter(|h| h.service == service)
            .map(|h| hop_span(trace, t0, h))
            .collect();
        post_protobuf(cp, &export(service, spans)).await;
    }
    to_hex(&trace)
}

async fn list(cp: &ControlPlane, query: &str) -> Vec<TraceSummary> {
    let (status, list) = cp
        .json(Method::GET, &format!("{}{query}", paths::TRACES), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    list
}

async fn api_error(
    cp: &ControlPlane,
    path: &str,
    content_type: &str,
    body: Vec<u8>,
) -> (StatusCode, String) {
    let method = if body.is_empty() {
        Method::GET
    } else {
        Method::POST
    };
    let (status, bytes) = cp.call_as(method, path, content_type, body).await.unwrap();
    let err: ApiError = serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("{status}: {e}: {}", String::from_utf8_lossy(&bytes)));
    (status, err.error)
}

#[tokio::test]
async fn a_three_hop_trace_comes_back_as_a_tree_in_the_api_and_meshctl() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(dir.path(), &[]).await;
    let t0 = now_unix_nanos();
    let id = send_three_hops(&cp, [0xab; 16], t0).await;

    let traces = list(&cp, "").await;
    assert_eq!(traces.len(), 1);
    let summary = &traces[0];
    assert_eq!(summary.trace_id, id);
    assert_eq!(
        (summary.root_service.as_str(), summary.root_name.as_str()),
        ("frontend", "GET /checkout")
    );
    assert_eq!(summary.span_count, 6);
    assert_eq!(summary.duration_micros, 40_000.0);
    assert_eq!(summary.services, ["frontend", "orders", "payments"]);
    assert_eq!(summary.start_unix_nano, t0);
    assert!(!summary.error);

    let (status, detail): (_, TraceDetail) = cp.json(Method::GET, &paths::trace(&id), None).await;
    assert_eq!(status, StatusCode::OK);
    let names: Vec<&str> = detail.spans.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, HOPS.map(|h| h.name));
    assert_eq!(detail.spans[0].parent_span_id, None);
    for pair in detail.spans.windows(2) {
        assert_eq!(pair[1].parent_span_id.as_ref(), Some(&pair[0].span_id));
    }
    let db = &detail.spans[5];
    assert_eq!(
        (db.service.as_str(), db.kind),
        ("payments", SpanKindName::Internal)
    );
    assert_eq!(db.duration_micros, 6_000.0);
    assert_eq!(db.status.code, StatusCodeName::Ok);
    assert_eq!(
        db.attributes["http.response.status_code"],
        AttributeValue::Int(200)
    );

    // The waterfall: one line per span, indented two spaces per depth.
    let (code, out, err) = cp.meshctl(&["trace", &id]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with(&format!("Trace {id}: 6 spans, 40.00ms")),
        "{out}"
    );
    let rows: Vec<&str> = out.lines().skip(3).collect();
    assert_eq!(rows.len(), 6, "{out}");
    for (depth, (row, hop)) in rows.iter().zip(&HOPS).enumerate() {
        let indent = "  ".repeat(depth);
        assert!(row.starts_with(&format!("{indent}{}", hop.name)), "{out}");
        assert!(row.contains(hop.service) && row.contains("200"), "{out}");
        assert!(row.contains('█'), "{out}");
    }
    assert!(rows[0].ends_with(&"█".repeat(40)), "{out}");
    assert!(rows[5].contains("6.00ms"), "{out}");
    // Uppercase ids work too.
    let (code, _, _) = cp.meshctl(&["trace", &id.to_uppercase()]);
    assert_eq!(code, 0);

    // The list, filtered.
    let (code, out, err) = cp.meshctl(&["traces", "--service", "payments"]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("TRACE ID"), "{out}");
    assert_eq!(lines.len(), 2, "{out}");
    assert!(lines[1].starts_with(&id), "{out}");
    assert!(
        lines[1].contains("frontend GET /checkout") && lines[1].contains("40.00ms"),
        "{out}"
    );
    let (code, out, _) = cp.meshctl(&["traces", "--service", "nobody", "-o", "json"]);
    assert_eq!((code, out.as_str()), (0, "[]\n"));
    let (code, out, _) = cp.meshctl(&["traces", "--min-duration", "1s"]);
    assert_eq!((code, out.as_str()), (0, ""));

    // An unknown trace: exit 1, one line.
    let unknown = "cd".repeat(16);
    let (code, out, err) = cp.meshctl(&["trace", &unknown]);
    assert_eq!(code, 1);
    assert_eq!(out, "");
    assert_eq!(err, format!("meshctl: error: trace {unknown} not found\n"));
}

#[tokio::test]
async fn json_exports_are_stored_and_filtered() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(dir.path(), &[]).await;
    let t0 = now_unix_nanos();
    let body = json!({
        "resourceSpans": [{
            "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "orders"}}]},
            "scopeSpans": [{"scope": {"name": "otel"}, "spans": [
                {"traceId": "0AF7651916CD43DD8448EB211C80319C", "spanId": "b7ad6b7169203331",
                 "name": "slow", "kind": 2, "startTimeUnixNano": t0.to_string(),
                 "endTimeUnixNano": (t0 + 250 * MS).to_string(),
                 "status": {"code": 2, "message": "boom"},
                 "attributes": [{"key": "http.response.status_code", "value": {"intValue": "503"}}],
                 "events": []},
                {"traceId": "1af7651916cd43dd8448eb211c80319c", "spanId": "c7ad6b7169203331",
                 "name": "fast", "kind": 3, "startTimeUnixNano": t0 + 500 * MS,
                 "endTimeUnixNano": t0 + 502 * MS},
                {"traceId": "00000000000000000000000000000000", "spanId": "d7ad6b7169203331",
                 "name": "zero"}
            ]}]
        }]
    });
    let (status, reply) = cp
        .call_as(
            Method::POST,
            TRACES_PATH,
            "application/json; charset=utf-8",
            body.to_string().into_bytes(),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    let reply: serde_json::Value = serde_json::from_slice(&reply).unwrap();
    assert_eq!(
        reply,
        json!({"partialSuccess": {"rejectedSpans": "1", "errorMessage": "span \"zero\": trace id is all zero"}})
    );

    let all = list(&cp, "").await;
    let ids: Vec<&str> = all.iter().map(|t| &t.trace_id[..4]).collect();
    assert_eq!(ids, ["1af7", "0af7"], "newest first");
    assert!(all[1].error && !all[0].error);
    let slow = list(&cp, "?minDuration=100ms").await;
    assert_eq!(slow.len(), 1);
    assert_eq!(slow[0].root_name, "slow");
    assert_eq!(list(&cp, "?minDuration=1s").await, []);
    assert_eq!(list(&cp, "?service=orders&limit=1").await.len(), 1);
    assert_eq!(list(&cp, "?service=payments").await, []);

    let (status, detail): (_, TraceDetail) = cp
        .json(
            Method::GET,
            &paths::trace("0AF7651916CD43DD8448EB211C80319C"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(detail.trace_id, "0af7651916cd43dd8448eb211c80319c");
    let span = &detail.spans[0];
    assert_eq!(
        (span.status.code, span.status.message.as_str()),
        (StatusCodeName::Error, "boom")
    );
    assert_eq!(
        span.attributes["http.response.status_code"],
        AttributeValue::Int(503)
    );
    assert_eq!(span.duration_micros, 250_000.0);

    // JSON answer of an export with nothing rejected.
    let (status, reply) = cp
        .call_as(
            Method::POST,
            TRACES_PATH,
            JSON_CONTENT_TYPE,
            b"{\"resourceSpans\": []}".to_vec(),
        )
        .await
        .unwrap();
    assert_eq!((status, reply.as_ref()), (StatusCode::OK, b"{}".as_ref()));
}

#[tokio::test]
async fn bad_exports_and_queries_are_refused_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(dir.path(), &[]).await;
    let (status, err) = api_error(&cp, TRACES_PATH, "text/plain", b"hello".to_vec()).await;
    // The access guard refuses a "simple" content type before the receiver.
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert!(err.contains("Content-Type"), "{err}");
    let (status, err) = api_error(
        &cp,
        TRACES_PATH,
        PROTOBUF_CONTENT_TYPE,
        b"\xff\xff".to_vec(),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(err.starts_with("invalid OTLP protobuf"), "{err}");
    let (status, err) = api_error(
        &cp,
        TRACES_PATH,
        JSON_CONTENT_TYPE,
        b"{\"resourceSpans\": {}}".to_vec(),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(err.starts_with("invalid OTLP/JSON"), "{err}");
    let huge = vec![0u8; 4 * 1024 * 1024 + 1];
    let (status, err) = api_error(&cp, TRACES_PATH, PROTOBUF_CONTENT_TYPE, huge).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(err.contains("4 MiB"), "{err}");

    let (status, err) = api_error(
        &cp,
        &format!("{}?minDuration=soon", paths::TRACES),
        "",
        vec![],
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(err.starts_with("invalid minDuration \"soon\""), "{err}");
    let (status, err) = api_error(&cp, &format!("{}?color=red", paths::TRACES), "", vec![]).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(err.contains("color"), "{err}");
    let (status, err) = api_error(&cp, &paths::trace("xyz"), "", vec![]).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(err, "trace id \"xyz\" must be 32 hex digits");
    let (status, err) = api_error(&cp, &paths::trace(&"12".repeat(16)), "", vec![]).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(err, format!("trace {} not found", "12".repeat(16)));
}

/// Runs `promtool check metrics` on `text`; `None` if promtool is not
/// installed.
fn promtool_check(text: &str) -> Option<(bool, String)> {
    let mut child = match Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => panic!("cannot run promtool: {e}"),
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Some((out.status.success(), report))
}

#[tokio::test]
async fn metrics_count_spans_and_watchers_and_pass_promtool() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(dir.path(), &[]).await;
    send_three_hops(&cp, [7; 16], now_unix_nanos()).await;
    let mut invalid = hop_span([7; 16], 0, &HOPS[0]);
    invalid.span_id = vec![1; 3];
    let (status, _) = cp
        .call_as(
            Method::POST,
            TRACES_PATH,
            PROTOBUF_CONTENT_TYPE,
            export("frontend", vec![invalid]).encode_to_vec(),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    // A resent span is a duplicate.
    post_protobuf(
        &cp,
        &export("frontend", vec![hop_span([7; 16], 0, &HOPS[0])]),
    )
    .await;
    cp.register("orders-1", "orders", 8081).await;
    let mut watch = cp.watch(None).await;
    watch.until(|s| s.revision == 1).await;

    let (status, body) = cp.call(Method::GET, "/metrics", None).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    let text = String::from_utf8(body.to_vec()).unwrap();
    for line in [
        "meshlet_control_plane_revision 1",
        "meshlet_control_plane_instances{state=\"healthy\"} 1",
        "meshlet_control_plane_instances{state=\"unhealthy\"} 0",
        "meshlet_control_plane_watchers 1",
        "meshlet_control_plane_pushes_total 1",
        "meshlet_spans_received_total 8",
        "meshlet_spans_rejected_total 1",
        "meshlet_spans_dropped_total{reason=\"duplicate\"} 1",
        "meshlet_spans_dropped_total{reason=\"trace_full\"} 0",
        "meshlet_traces_stored 1",
    ] {
        assert!(text.lines().any(|l| l == line), "no {line:?} in:\n{text}");
    }
    for family in text.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
        let name = family.split(' ').next().unwrap();
        assert!(
            text.contains(&format!("# HELP {name} ")),
            "{name} has no HELP"
        );
    }

    match promtool_check(&text) {
        Some((ok, report)) => assert!(ok, "promtool check metrics failed:\n{report}\n{text}"),
        None if std::env::var("MESHLET_SKIP_PROMTOOL").as_deref() == Ok("1") => {
            eprintln!("promtool not found; skipped (MESHLET_SKIP_PROMTOOL=1)");
        }
        None => panic!(
            "promtool is not on PATH: apt-get install prometheus \
             (or set MESHLET_SKIP_PROMTOOL=1 to skip this check)"
        ),
    }
}

#[tokio::test]
async fn a_large_export_is_stored_up_to_the_span_cap() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(dir.path(), &[]).await;
    let t0 = now_unix_nanos();
    let spans: Vec<Span> = (1..=1500u64)
        .map(|i| Span {
            trace_id: vec![9; 16],
            span_id: i.to_be_bytes().to_vec(),
            name: format!("batch item {i} {}", "x".repeat(60)),
            start_time_unix_nano: t0 + i,
            end_time_unix_nano: t0 + i + 1,
            ..Default::default()
        })
        .collect();
    let request = export("batch", spans);
    assert!(
        request.encoded_len() > 64 * 1024,
        "decoded off the API threads"
    );
    post_protobuf(&cp, &request).await;
    let traces = list(&cp, "?service=batch").await;
    assert_eq!(traces.len(), 1);
    assert_eq!(traces[0].span_count, 1000);
    let (_, body) = cp.call(Method::GET, "/metrics", None).await.unwrap();
    let text = String::from_utf8_lossy(&body);
    assert!(
        text.contains("meshlet_spans_dropped_total{reason=\"trace_full\"} 500"),
        "{text}"
    );
}
