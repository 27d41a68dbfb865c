//! Tests of the HTTP API against a whole control plane on a loopback port
//! with a temporary data directory: in this process, or the real binary
//! where a process is the point (kill -9, SIGTERM, a second instance's
//! exit). Harness in `common/`. No fixed sleeps: every wait polls a
//! condition against a deadline.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{free_port, ControlPlane, DEADLINE};
use http::{Method, StatusCode};
use meshlet_api::mesh::{
    paths, ApiError, ApplyAction, ApplyFile, ApplyReply, ApplyRequest, MeshState, ServiceSummary,
    WatchEvent,
};

fn healthy_of(state: &MeshState, id: &str) -> Option<bool> {
    state
        .services
        .iter()
        .flat_map(|s| &s.endpoints)
        .find(|e| e.instance_id.as_deref() == Some(id))
        .map(|e| e.healthy)
}

#[tokio::test]
async fn registrations_reach_watchers_as_snapshot_then_deltas() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(dir.path(), &[]).await;
    let mut watch = cp.watch(None).await;
    let first = watch.next().await.unwrap();
    assert!(
        matches!(first, WatchEvent::Snapshot(ref s) if s.revision == 0),
        "{first:?}"
    );

    let reply = cp.register("orders-1", "orders", 8081).await;
    assert_eq!(reply.revision, 1);
    assert_eq!(reply.ttl_ms, 10_000);
    assert_eq!(reply.heartbeat_interval_ms, 3_333);
    cp.register("orders-2", "orders", 8082).await;
    cp.register("orders-3", "orders", 8083).await;
    cp.register("payments-1", "payments", 9091).await;
    let events = watch.until(|s| s.revision == 4).await;
    let mut held = 0;
    for event in &events {
        let WatchEvent::Delta(d) = event else {
            panic!("expected deltas, got {event:?}");
        };
        assert_eq!(d.from_revision, held);
        assert!(d.revision > held);
        held = d.revision;
    }
    assert_eq!(watch.state.services.len(), 2);
    assert_eq!(watch.state.services[0].endpoints.len(), 3);

    // Health change: a delta with healthy=false. An unchanged heartbeat: none.
    assert_eq!(cp.heartbeat("orders-2", true).await, StatusCode::NO_CONTENT);
    assert_eq!(
        cp.heartbeat("orders-2", false).await,
        StatusCode::NO_CONTENT
    );
    let event = watch.next().await.unwrap();
    let WatchEvent::Delta(delta) = event else {
        panic!("expected a delta");
    };
    assert_eq!((delta.from_revision, delta.revision), (4, 5));
    assert_eq!(healthy_of(&watch.state, "orders-2"), Some(false));
    assert_eq!(cp.heartbeat("nobody", true).await, StatusCode::NOT_FOUND);

    // Bad bodies change nothing.
    let (status, err): (_, ApiError) = cp
        .json(Method::POST, paths::INSTANCES, Some(b"{\"id\": 1".to_vec()))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(err.error.contains("invalid request body"), "{}", err.error);
    let (status, _): (_, ApiError) = cp
        .json(
            Method::PUT,
            &paths::heartbeat("orders-1"),
            Some(b"{\"healthy\": true, \"extra\": 1}".to_vec()),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // A second watcher resuming from revision 2 gets one delta to 5.
    let mut resumed = cp.watch(Some(2)).await;
    resumed.state = MeshState {
        revision: 2,
        ..Default::default()
    };
    let WatchEvent::Delta(d) = resumed.next().await.unwrap() else {
        panic!("expected a delta");
    };
    assert_eq!((d.from_revision, d.revision), (2, 5));

    // Graceful deregistration.
    let (status, _) = cp
        .call(Method::DELETE, &paths::instance("payments-1"), None)
        .await
        .unwrap();
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = cp
        .call(Method::DELETE, &paths::instance("payments-1"), None)
        .await
        .unwrap();
    assert_eq!(status, StatusCode::NOT_FOUND);
    watch.until(|s| s.services.len() == 1).await;

    let (_, services): (_, Vec<ServiceSummary>) = cp.json(Method::GET, paths::SERVICES, None).await;
    assert_eq!(services.len(), 1);
    assert_eq!((services[0].instances, services[0].healthy), (3, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_reaches_a_thousand_watchers() {
    const WATCHERS: usize = 1000;
    let dir = tempfile::tempdir().unwrap();
    let cp = std::sync::Arc::new(ControlPlane::start(dir.path(), &[]).await);
    let ready = std::sync::Arc::new(tokio::sync::Barrier::new(WATCHERS + 1));
    // Connections still in their TLS handshake are "unproven", and the
    // listener evicts the oldest past 256 of them (slowloris guard): the
    // watchers connect at most 64 at a time.
    let connecting = std::sync::Arc::new(tokio::sync::Semaphore::new(64));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..WATCHERS {
        let (cp, ready, connecting) = (cp.clone(), ready.clone(), connecting.clone());
        tasks.spawn(async move {
            let permit = connecting.acquire().await.unwrap();
            let mut watch = cp.watch(None).await;
            assert!(matches!(watch.next().await, Some(WatchEvent::Snapshot(_))));
            drop(permit);
            ready.wait().await;
            // Connecting a thousand TLS watchers can outlast a keepalive.
            let mut event = watch.next().await;
            while matches!(event, Some(WatchEvent::Keepalive { .. })) {
                event = watch.next().await;
            }
            assert!(
                matches!(event, Some(WatchEvent::Delta(ref d)) if d.revision == 1),
                "{event:?}"
            );
            Instant::now()
        });
    }
    ready.wait().await;
    let changed = Instant::now();
    cp.register("orders-1", "orders", 8081).await;
    let mut slowest = Duration::ZERO;
    while let Some(received) = tasks.join_next().await {
        slowest = slowest.max(received.unwrap() - changed);
    }
    eprintln!("{WATCHERS} watchers got the change within {slowest:?}");
    // A generous bound for a loaded 2-core machine; typical is tens of ms.
    assert!(slowest < Duration::from_secs(3), "{slowest:?}");
}

#[tokio::test]
async fn instances_without_heartbeats_expire() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(dir.path(), &["--ttl", "1s"]).await;
    let reply = cp.register("orders-1", "orders", 8081).await;
    assert_eq!(reply.heartbeat_interval_ms, 333);
    let registered = Instant::now();
    let mut watch = cp.watch(None).await;
    watch
        .until(|s| s.revision >= 1 && s.services.is_empty())
        .await;
    let took = registered.elapsed();
    assert!(took < Duration::from_secs(2), "expired after {took:?}");
    assert!(
        took >= Duration::from_millis(900),
        "expired early: {took:?}"
    );
    assert_eq!(cp.heartbeat("orders-1", true).await, StatusCode::NOT_FOUND);
    let history = cp.revisions().await;
    assert_eq!(history[0].changes, ["expired orders/orders-1"]);
}

const POLICY: &str = "apiVersion: meshlet.dev/v1alpha1
kind: HealthCheckPolicy
metadata: {name: orders-hc}
spec: {targetRef: {service: orders}, interval: 1s}
";

fn apply_body(name: &str, text: &str) -> Vec<u8> {
    serde_json::to_vec(&ApplyRequest {
        files: vec![ApplyFile {
            name: name.into(),
            text: text.into(),
        }],
        actor: Some("tester@host".into()),
    })
    .unwrap()
}

#[tokio::test]
async fn apply_and_state_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::spawn(dir.path(), &[]).await;
    cp.register("orders-1", "orders", 8081).await;
    cp.register("orders-2", "orders", 8082).await;
    assert_eq!(
        cp.heartbeat("orders-2", false).await,
        StatusCode::NO_CONTENT
    );

    let (status, reply): (_, ApplyReply) = cp
        .json(
            Method::POST,
            paths::APPLY,
            Some(apply_body("p.yaml", POLICY)),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(reply.revision, 4);
    assert_eq!(reply.outcomes[0].action, ApplyAction::Created);
    let (_, reply): (_, ApplyReply) = cp
        .json(
            Method::POST,
            paths::APPLY,
            Some(apply_body("p.yaml", POLICY)),
        )
        .await;
    assert_eq!(
        (reply.revision, reply.outcomes[0].action),
        (4, ApplyAction::Unchanged)
    );
    let invalid = POLICY.replace("interval", "intervall");
    let (status, err): (_, ApiError) = cp
        .json(
            Method::POST,
            paths::APPLY,
            Some(apply_body("bad.yaml", &invalid)),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(err.error.contains("bad.yaml"), "{}", err.error);
    assert!(err.error.contains("intervall"), "{}", err.error);

    let history_before = cp.revisions().await;
    assert_eq!(history_before.len(), 4);
    // The actor is the token's name, whatever the client says.
    assert_eq!(history_before[0].actor, "admin");
    assert_eq!(
        history_before[0].changes,
        ["created healthcheckpolicy/orders-hc"]
    );

    cp.kill9();
    let cp = ControlPlane::start(dir.path(), &[]).await;
    let history = cp.revisions().await;
    assert_eq!(history, history_before);
    let mut watch = cp.watch(None).await;
    let Some(WatchEvent::Snapshot(state)) = watch.next().await else {
        panic!("expected a snapshot");
    };
    assert_eq!(state.revision, 4);
    assert_eq!(state.services[0].endpoints.len(), 2);
    assert_eq!(healthy_of(&state, "orders-2"), Some(false));
    assert_eq!(state.resources.len(), 1);
    // Instances loaded from the store accept heartbeats (fresh TTL).
    assert_eq!(cp.heartbeat("orders-1", true).await, StatusCode::NO_CONTENT);
    let (status, detail): (_, meshlet_api::mesh::ServiceDetail) = cp
        .json(Method::GET, "/api/v1/services/default/orders", None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(detail.instances.len(), 2);
    assert_eq!(detail.policies.len(), 1);
    let (status, _): (_, ApiError) = cp
        .json(Method::GET, "/api/v1/services/default/nope", None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn sigterm_ends_watch_streams_and_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let mut cp = ControlPlane::spawn(dir.path(), &[]).await;
    let mut watch = cp.watch(None).await;
    watch.next().await.unwrap();
    let status = Command::new("kill")
        .arg("-TERM")
        .arg(cp.child().id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
    watch.until_end().await;
    let started = Instant::now();
    loop {
        if let Some(status) = cp.child().try_wait().unwrap() {
            assert!(status.success(), "{status}");
            break;
        }
        assert!(started.elapsed() < DEADLINE, "control-plane did not exit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn second_instance_on_the_same_port_fails_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(dir.path(), &[]).await;
    let other = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_control-plane"))
        .arg("--listen")
        .arg(cp.addr.to_string())
        .arg("--data-dir")
        .arg(other.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("control-plane: error: cannot listen on"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[tokio::test]
async fn meshctl_without_a_control_plane_prints_one_line() {
    // A real CA file and token, from a control plane elsewhere.
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(dir.path(), &[]).await;
    let port = free_port();
    let out = Command::new(common::meshctl_binary())
        .args([
            "--server",
            &format!("https://127.0.0.1:{port}"),
            "get",
            "services",
        ])
        .env("MESHLET_CA_FILE", dir.path().join("ca.crt"))
        .env("MESHLET_TOKEN", cp.admin_token())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr,
        format!(
            "meshctl: error: cannot reach the control plane at https://127.0.0.1:{port}: \
             connection refused (is control-plane running? set --server or MESHLET_SERVER)\n"
        )
    );
}

/// A one-request HTTP server on a thread: answers 200 and hands back the
/// raw request it got.
fn one_shot_server() -> (u16, std::thread::JoinHandle<String>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let handle = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut raw = Vec::new();
        let mut buf = [0u8; 1024];
        loop {
            let n = conn.read(&mut buf).unwrap();
            raw.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&raw).to_string();
            if let Some(end) = text.find("\r\n\r\n") {
                let length = text
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length: ")
                            .map(|v| v.trim().parse::<usize>().unwrap())
                    })
                    .unwrap_or(0);
                if raw.len() >= end + 4 + length || n == 0 {
                    break;
                }
            }
            if n == 0 {
                break;
            }
        }
        conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
            .unwrap();
        String::from_utf8_lossy(&raw).to_string()
    });
    (port, handle)
}

#[tokio::test]
async fn meshctl_apply_get_describe_and_broadcast() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(dir.path(), &[]).await;
    let (live_port, received) = one_shot_server();
    cp.register("orders-1", "orders", live_port).await;
    cp.register("orders-2", "orders", free_port()).await;
    cp.register("orders-3", "orders", free_port()).await;
    assert_eq!(
        cp.heartbeat("orders-3", false).await,
        StatusCode::NO_CONTENT
    );

    let file = dir.path().join("policy.yaml");
    std::fs::write(&file, POLICY).unwrap();
    let file = file.to_str().unwrap();
    let (code, stdout, _) = cp.meshctl(&["apply", "-f", file]);
    assert_eq!(
        (code, stdout.as_str()),
        (0, "healthcheckpolicy/orders-hc created\n")
    );
    let (code, stdout, _) = cp.meshctl(&["apply", "-f", file]);
    assert_eq!(
        (code, stdout.as_str()),
        (0, "healthcheckpolicy/orders-hc unchanged\n")
    );
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "kind: Nope\n").unwrap();
    let (code, _, stderr) = cp.meshctl(&["apply", "-f", bad.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        stderr.starts_with("meshctl: error: ") && stderr.contains("bad.yaml"),
        "{stderr}"
    );

    let (code, stdout, _) = cp.meshctl(&["get", "services"]);
    assert_eq!(code, 0);
    assert_eq!(
        stdout,
        "NAMESPACE   NAME     INSTANCES   HEALTHY\ndefault     orders   3           2\n"
    );
    let (code, stdout, _) = cp.meshctl(&["get", "endpoints", "orders", "-o", "json"]);
    assert_eq!(code, 0);
    let endpoints: Vec<meshlet_api::mesh::EndpointEntry> = serde_json::from_str(&stdout).unwrap();
    assert_eq!(endpoints.len(), 3);
    let (code, stdout, _) = cp.meshctl(&["describe", "service", "orders.default"]);
    assert_eq!(code, 0);
    assert!(stdout.contains("Instances:   3 (2 healthy)"), "{stdout}");
    assert!(stdout.contains("healthcheckpolicy/orders-hc"), "{stdout}");
    let (code, _, stderr) = cp.meshctl(&["describe", "service", "nope"]);
    assert_eq!(
        (code, stderr.as_str()),
        (1, "meshctl: error: service \"nope\" not found\n")
    );

    let (code, stdout, _) = cp.meshctl(&[
        "broadcast",
        "--path",
        "/broadcast",
        "--data",
        r#"{"msg":"hi"}"#,
        "--timeout",
        "1s",
    ]);
    assert_eq!(code, 1, "orders-2 is down: {stdout}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines.len(),
        3,
        "header and the two healthy instances: {stdout}"
    );
    assert!(
        lines[0].starts_with("SERVICE   INSTANCE   ADDRESS"),
        "{stdout}"
    );
    assert!(
        lines[1].contains("orders-1") && lines[1].contains("200 OK"),
        "{stdout}"
    );
    assert!(
        lines[2].contains("orders-2") && lines[2].contains("connection refused"),
        "{stdout}"
    );
    let request = received.join().unwrap();
    assert!(
        request.starts_with("POST /broadcast HTTP/1.1\r\n"),
        "{request}"
    );
    assert!(
        request
            .to_ascii_lowercase()
            .contains("\r\nhost: orders\r\n"),
        "{request}"
    );
    assert!(request.contains("application/json"), "{request}");
    assert!(request.ends_with(r#"{"msg":"hi"}"#), "{request}");
}
