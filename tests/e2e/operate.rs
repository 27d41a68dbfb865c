//! Operating the mesh (issue 19, done-means 3 and 4), with the real
//! binaries on loopback: a control plane and two services (`frontend`,
//! `orders`), each a test app behind its sidecar process.
//!
//! - `meshctl check` is all ✔ on the healthy mesh and exits 0; with the
//!   orders sidecar frozen (SIGSTOP) and a policy for a service with no
//!   instances it prints those two ✖ lines and exits 1; `-o json` parses.
//! - `meshctl tap service orders --max 20` while traffic flows prints
//!   exactly 20 events with their fields and exits 0; the sidecars stop
//!   tapping afterwards; a viewer's tap has header values redacted; a
//!   sidecar token is refused with 403 and a message.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshlet_api::access::CreateToken;
use meshlet_e2e::process::{meshctl, meshctl_with, ControlPlaneProcess, SidecarProcess, TempDir};
use meshlet_e2e::{client, wait, ControlPlaneRef, Upstream};
use nix::sys::signal::Signal;

struct Mesh {
    cp: ControlPlaneProcess,
    frontend: SidecarProcess,
    orders: SidecarProcess,
    _apps: (Upstream, Upstream),
    _dir: TempDir,
}

/// A control plane (`cp_args`) and two services behind sidecars, both
/// ready and registered.
async fn mesh(cp_args: &[&str]) -> Mesh {
    let dir = TempDir::new();
    let cp = ControlPlaneProcess::start(&dir.path.join("data"), cp_args).await;
    let orders_app = Upstream::start("orders").await;
    let frontend_app = Upstream::start("frontend").await;
    let orders = SidecarProcess::builder("orders", orders_app.port())
        .control_plane(&cp)
        .start()
        .await;
    let frontend = SidecarProcess::builder("frontend", frontend_app.port())
        .control_plane(&cp)
        .start()
        .await;
    orders.wait_ready(Duration::from_secs(15)).await;
    frontend.wait_ready(Duration::from_secs(15)).await;
    let outbound = frontend.outbound;
    wait::until(
        "frontend reaches orders",
        Duration::from_secs(15),
        || async move {
            let reply = client::get_uri(outbound, "http://orders/echo").await.ok()?;
            (reply.status == 200).then_some(())
        },
    )
    .await;
    Mesh {
        cp,
        frontend,
        orders,
        _apps: (orders_app, frontend_app),
        _dir: dir,
    }
}

/// SIGSTOPs a process and SIGCONTs it when dropped, panic or not.
struct Frozen<'a>(&'a SidecarProcess);

impl<'a> Frozen<'a> {
    fn freeze(sidecar: &'a SidecarProcess) -> Frozen<'a> {
        sidecar.signal(Signal::SIGSTOP);
        Frozen(sidecar)
    }
}

impl Drop for Frozen<'_> {
    fn drop(&mut self) {
        self.0.signal(Signal::SIGCONT);
    }
}

/// The line of check `name`, if printed.
fn check_line<'a>(stdout: &'a str, name: &str) -> Option<&'a str> {
    stdout.lines().find(|l| l.contains(&format!(" {name}: ")))
}

const CHECKS: [&str; 10] = [
    "control plane reachable",
    "control plane healthy",
    "store healthy",
    "CA healthy",
    "workload certificates",
    "sidecars connected",
    "sidecars on the latest revision",
    "version skew",
    "clock skew",
    "policies target services with instances",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_is_green_then_names_a_frozen_sidecar_and_a_policy_without_instances() {
    // TTL 20s: heartbeats every 6.7s, a sidecar is silent after two missed
    // (14.3s) and expires at 20s, so the frozen one is seen silent first.
    let mesh = mesh(&["--ttl", "20s"]).await;
    let orders_id = mesh.orders.config_dump().await["controlPlane"]["instanceId"]
        .as_str()
        .expect("instance id")
        .to_owned();

    // Healthy: every check ✔ once both sidecars reported their revision.
    let green = wait::until("meshctl check all ✔", Duration::from_secs(30), || async {
        let out = meshctl(&mesh.cp, &["check"]).await;
        (out.success() && !out.stdout.contains('⚠') && !out.stdout.contains('✖')).then_some(out)
    })
    .await;
    for name in CHECKS {
        let line =
            check_line(&green.stdout, name).unwrap_or_else(|| panic!("{name}: {}", green.stdout));
        assert!(line.starts_with('✔'), "{line}");
    }

    // A frozen sidecar and a policy whose target has no instances.
    let frozen = Frozen::freeze(&mesh.orders);
    let dir = TempDir::new();
    let policy = "apiVersion: meshlet.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {name: ghost-limit}\nspec:\n  targetRef: {service: ghost}\n  tokenBucket: {capacity: 10, refillPerSecond: 10}\n";
    mesh.cp.apply(&dir.path, "ghost.yaml", policy).await;
    let red = wait::until(
        "meshctl check names the frozen sidecar",
        Duration::from_secs(40),
        || async {
            let out = meshctl(&mesh.cp, &["check"]).await;
            let connected = check_line(&out.stdout, "sidecars connected")?;
            (connected.starts_with('✖') && connected.contains(&orders_id)).then_some(out)
        },
    )
    .await;
    assert_eq!(red.code, Some(1), "{}", red.stdout);
    let connected = check_line(&red.stdout, "sidecars connected").unwrap();
    assert!(
        connected.contains("(orders.default) silent for"),
        "{connected}"
    );
    assert!(
        !connected.contains("frontend"),
        "the frontend heartbeats: {connected}"
    );
    let orphan = check_line(&red.stdout, "policies target services with instances").unwrap();
    assert!(orphan.starts_with('✖'), "{orphan}");
    assert!(
        orphan.contains(
            "RateLimitPolicy default/ghost-limit targets ghost.default, which has no instances"
        ),
        "{orphan}"
    );
    for healthy in ["control plane healthy", "store healthy", "CA healthy"] {
        assert!(
            check_line(&red.stdout, healthy).unwrap().starts_with('✔'),
            "{}",
            red.stdout
        );
    }
    // Every ✖ has its hint on the next line.
    let lines: Vec<&str> = red.stdout.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        if line.starts_with('✖') {
            assert!(lines[i + 1].starts_with("    hint: "), "{}", red.stdout);
        }
    }

    let json = meshctl(&mesh.cp, &["check", "-o", "json"]).await;
    assert_eq!(json.code, Some(1));
    let parsed: serde_json::Value =
        serde_json::from_str(&json.stdout).expect("check -o json parses");
    assert_eq!(parsed["ok"], false);
    let checks = parsed["checks"].as_array().expect("checks");
    let status_of = |name: &str| {
        checks
            .iter()
            .find(|c| c["name"] == name)
            .map(|c| c["status"].as_str().unwrap().to_owned())
    };
    assert_eq!(
        status_of("policies target services with instances").as_deref(),
        Some("error")
    );
    assert_eq!(status_of("store healthy").as_deref(), Some("ok"));
    drop(frozen);
    drop(mesh.frontend);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tap_streams_twenty_requests_then_stops_and_honours_roles() {
    let mesh = mesh(&[]).await;
    // Traffic frontend → orders until the test ends.
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = {
        let stop = stop.clone();
        let outbound = mesh.frontend.outbound;
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let _ = client::get_uri(outbound, &format!("http://orders/echo?n={i}")).await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    let started = Instant::now();
    let out = meshctl(
        &mesh.cp,
        &["tap", "service", "orders", "--max", "20", "-o", "json"],
    )
    .await;
    assert!(out.success(), "{} {}", out.stdout, out.stderr);
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "tap took {:?}",
        started.elapsed()
    );
    assert!(
        out.stderr.contains("tapping 1 sidecar(s)"),
        "{}",
        out.stderr
    );
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 20, "{}", out.stdout);
    for line in &lines {
        let event: serde_json::Value = serde_json::from_str(line).expect("an event per line");
        assert_eq!(event["service"], "orders", "{line}");
        assert_eq!(event["direction"], "inbound", "{line}");
        assert_eq!(event["method"], "GET", "{line}");
        assert_eq!(event["path"], "/echo", "{line}");
        assert_eq!(event["status"], 200, "{line}");
        assert!(event["latencyMs"].as_f64().is_some(), "{line}");
        assert_eq!(
            event["peer"], "spiffe://meshlet.local/ns/default/sa/frontend",
            "{line}"
        );
        assert_eq!(event["traceId"].as_str().map(str::len), Some(32), "{line}");
        assert!(
            event["instance"].as_str().is_some_and(|i| !i.is_empty()),
            "{line}"
        );
        // An admin's tap carries header values.
        let traceparent = event["headers"]
            .as_array()
            .and_then(|h| h.iter().find(|p| p[0] == "traceparent"))
            .unwrap_or_else(|| panic!("a traceparent header: {line}"));
        let value = traceparent[1].as_str().unwrap();
        assert!(value.contains(event["traceId"].as_str().unwrap()), "{line}");
    }
    // The tap ends in the sidecar once meshctl is gone.
    wait::until(
        "the orders sidecar stops tapping",
        Duration::from_secs(5),
        || async {
            let dump = mesh.orders.config_dump().await;
            (dump["controlPlane"]["liveTaps"] == 0).then_some(())
        },
    )
    .await;

    // The text form has every field on one line.
    let text = meshctl(
        &mesh.cp,
        &["tap", "service", "orders", "--max", "3", "--path", "/echo"],
    )
    .await;
    assert!(text.success(), "{}", text.stderr);
    assert_eq!(text.stdout.lines().count(), 3, "{}", text.stdout);
    for line in text.stdout.lines() {
        assert!(line.contains(" in  "), "{line}");
        assert!(
            line.contains("src=spiffe://meshlet.local/ns/default/sa/frontend GET /echo 200 "),
            "{line}"
        );
        assert!(line.contains(" trace="), "{line}");
    }

    // A viewer taps with header values redacted.
    let viewer = mesh
        .cp
        .access()
        .create_token(&CreateToken {
            name: "tap-viewer".into(),
            role: "viewer".into(),
            namespace: None,
            service: None,
            ttl_seconds: None,
        })
        .await;
    let env = |token: String| {
        [
            ("MESHLET_SERVER", mesh.cp.access().url()),
            ("MESHLET_TOKEN", token),
            (
                "MESHLET_CA_FILE",
                mesh.cp.access().ca_file().display().to_string(),
            ),
        ]
    };
    let viewed = meshctl_with(
        &env(viewer),
        &["tap", "svc", "orders", "--max", "5", "-o", "json"],
    )
    .await;
    assert!(viewed.success(), "{}", viewed.stderr);
    assert_eq!(viewed.stdout.lines().count(), 5);
    for line in viewed.stdout.lines() {
        let event: serde_json::Value = serde_json::from_str(line).unwrap();
        let headers = event["headers"].as_array().cloned().unwrap_or_default();
        assert!(
            headers.iter().all(|h| h[1] == "<redacted>"),
            "a viewer sees no header value: {line}"
        );
    }

    // A sidecar token cannot tap.
    let sidecar_token = std::fs::read_to_string(
        mesh.cp
            .access()
            .sidecar_token_file("default", "orders")
            .await,
    )
    .unwrap();
    let refused = meshctl_with(
        &env(sidecar_token.trim().to_owned()),
        &["tap", "service", "orders", "--max", "1"],
    )
    .await;
    assert_eq!(refused.code, Some(1), "{}", refused.stdout);
    assert!(refused.stderr.contains("may not tap"), "{}", refused.stderr);
    let raw = mesh
        .cp
        .access()
        .call(
            &mesh.cp.access().client_with(sidecar_token.trim()),
            http::Method::GET,
            "/api/v1/tap?service=orders",
            None,
        )
        .await;
    assert_eq!(raw.status, 403);
    assert!(
        raw.text()
            .contains("a sidecar token may only register, watch and report"),
        "{}",
        raw.text()
    );

    stop.store(true, Ordering::Relaxed);
    traffic.await.unwrap();
}
