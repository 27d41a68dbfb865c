//! Several control-plane URLs (issue 18, the client side), with real
//! `control-plane`, `sidecar` and `meshctl` processes on loopback and no
//! etcd: two control planes on one redb data directory, one after the
//! other, stand in for two replicas of one store (same epoch, same
//! revisions, same tokens and CA).
//!
//! - A sidecar given `--control-plane DEAD,LIVE` (DEAD: a loopback port
//!   that refuses) registers with LIVE, gets its configuration, routes.
//! - Failover with resume: sidecars list replicas A and B; A is killed
//!   (SIGKILL) while a client sends requests through the sidecars; B
//!   starts on the same data directory; the sidecars watch B within 2 s of
//!   it serving, resume from their revision (no second full snapshot:
//!   `meshlet_control_plane_updates_total{type="snapshot"}` stays 1), not
//!   one request fails, and a policy applied through B reaches them.
//! - `meshctl --server DEAD,LIVE` reads and applies through LIVE, says on
//!   stderr that DEAD was skipped, and with `-v` which server answered.

use std::time::{Duration, Instant};

use meshlet_e2e::metrics::Scrape;
use meshlet_e2e::process::{free_port, loopback};
use meshlet_e2e::traffic::Traffic;
use meshlet_e2e::{
    client, meshctl, meshctl_with, wait, ControlPlaneProcess, SidecarProcess, TempDir, Upstream,
};

/// A loopback URL nobody listens on (the port refuses connections).
fn dead_url() -> String {
    format!("https://127.0.0.1:{}", free_port())
}

/// A sidecar for `service` in front of `app`, listing `urls` (comma
/// separated) as its control plane, with `cp`'s credentials.
async fn sidecar(
    cp: &ControlPlaneProcess,
    service: &str,
    app: &Upstream,
    urls: &str,
) -> SidecarProcess {
    let mut credentials = cp.sidecar_credentials("default", service).await;
    credentials.url = urls.to_owned();
    SidecarProcess::builder(service, app.port())
        .control_plane_with(&credentials)
        .start()
        .await
}

/// The sidecar's control-plane status from `/config_dump`.
async fn control_status(sidecar: &SidecarProcess) -> serde_json::Value {
    sidecar.config_dump().await["controlPlane"].clone()
}

/// Waits until `sidecar` routes `service` to at least one endpoint.
async fn wait_routes(sidecar: &SidecarProcess, service: &str) {
    wait::until(
        &format!("{service} endpoints at the sidecar"),
        Duration::from_secs(15),
        || async { (!sidecar.endpoints_of(service).await.is_empty()).then_some(()) },
    )
    .await;
}

async fn metric(sidecar: &SidecarProcess, name: &str, labels: &[(&str, &str)]) -> f64 {
    Scrape::of(sidecar.admin).await.sum(name, labels)
}

#[tokio::test]
async fn a_sidecar_skips_a_dead_control_plane_url_and_routes_with_the_live_one() {
    let dir = TempDir::new();
    let cp = ControlPlaneProcess::start(&dir.path.join("data"), &[]).await;
    let urls = format!("{},{}", dead_url(), cp.url());
    let orders_app = Upstream::start("orders").await;
    let frontend_app = Upstream::start("frontend").await;
    let orders = sidecar(&cp, "orders", &orders_app, &urls).await;
    let frontend = sidecar(&cp, "frontend", &frontend_app, &urls).await;
    wait_routes(&frontend, "orders").await;
    let reply = client::get_uri(frontend.outbound, "http://orders/")
        .await
        .expect("an answer");
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(orders_app.requests(), 1);
    for sidecar in [&orders, &frontend] {
        // Registration may reach LIVE before the watch's backoff ends.
        let status = wait::until("the watch on LIVE", Duration::from_secs(5), || async {
            let status = control_status(sidecar).await;
            (status["current"] == cp.url() && status["connected"] == true).then_some(status)
        })
        .await;
        assert_eq!(status["replicas"].as_array().unwrap().len(), 2, "{status}");
        assert!(
            metric(sidecar, "meshlet_control_plane_failovers_total", &[]).await >= 1.0,
            "the dead URL was tried and left"
        );
        assert_eq!(
            metric(
                sidecar,
                "meshlet_control_plane_current",
                &[("url", &cp.url())]
            )
            .await,
            1.0
        );
    }
    // Both registered with the live replica.
    let services = cp.get_json("/api/v1/services").await;
    let text = services.to_string();
    assert!(
        text.contains("orders") && text.contains("frontend"),
        "{text}"
    );
}

const TIMEOUT_POLICY: &str = "\
apiVersion: meshlet.dev/v1alpha1
kind: TimeoutPolicy
metadata: {name: orders-timeout}
spec: {targetRef: {service: orders}, request: 5s}
";

#[tokio::test]
async fn sidecars_fail_over_to_the_next_replica_and_resume_without_a_snapshot() {
    let dir = TempDir::new();
    let data = dir.path.join("data");
    let (a_addr, b_addr) = (loopback(free_port()), loopback(free_port()));
    // Short keepalives: a resumed watch in step hears from B soon.
    let args = ["--keepalive", "300ms"];
    let mut a = ControlPlaneProcess::start_at(a_addr, &data, &args).await;
    let urls = format!("https://{a_addr},https://{b_addr}");
    let orders_app = Upstream::start("orders").await;
    let frontend_app = Upstream::start("frontend").await;
    let orders = sidecar(&a, "orders", &orders_app, &urls).await;
    let frontend = sidecar(&a, "frontend", &frontend_app, &urls).await;
    wait_routes(&frontend, "orders").await;
    let sidecars = [&orders, &frontend];
    for sidecar in sidecars {
        let status = control_status(sidecar).await;
        assert_eq!(status["current"], format!("https://{a_addr}"), "{status}");
        let snapshots = ("type", "snapshot");
        let updates = "meshlet_control_plane_updates_total";
        wait::until(
            "the first snapshot counted",
            Duration::from_secs(5),
            || async { (metric(sidecar, updates, &[snapshots]).await == 1.0).then_some(()) },
        )
        .await;
    }
    let revision_before = frontend.revision().await;

    let traffic = Traffic::start(frontend.outbound, "orders");
    wait::until("traffic flows", Duration::from_secs(10), || async {
        (traffic.ok() >= 20).then_some(())
    })
    .await;

    let killed = Instant::now();
    a.kill9().await;
    let b = ControlPlaneProcess::start_at(b_addr, &data, &args).await;
    let b_serving = Instant::now();
    // The sidecars' backoff between failed replicas grows with the time
    // they found none (200 ms doubling every second failure, at most 5 s):
    // it stays below the time without a replica, so they find B within
    // that time plus a second, and within 2 s when B came back at once.
    let down = b_serving - killed;
    let patience =
        (down + Duration::from_secs(1)).clamp(Duration::from_secs(2), Duration::from_secs(6));
    for sidecar in sidecars {
        let watching_b = wait::within(patience, || async {
            let status = control_status(sidecar).await;
            (status["current"] == b.url() && status["connected"] == true).then_some(())
        })
        .await;
        assert!(
            watching_b.is_some(),
            "not watching B {patience:?} after it started serving ({down:?} after the kill): {}\n{}",
            control_status(sidecar).await,
            sidecar.log_text()
        );
    }
    let switched = b_serving.elapsed();
    eprintln!(
        "failover: B serving {:?} after the kill; sidecars watching B {:?} after that",
        b_serving - killed,
        switched
    );
    for sidecar in sidecars {
        // A → B, and more moves only if B was tried before it served
        // (A → B → A → B ...): an odd count.
        let moves = metric(sidecar, "meshlet_control_plane_failovers_total", &[]).await;
        assert!(moves >= 1.0 && moves % 2.0 == 1.0, "{moves} failovers");
    }

    // A policy applied through B reaches both sidecars by a delta.
    let ok_before_apply = traffic.ok();
    b.apply(&dir.path, "timeout.yaml", TIMEOUT_POLICY).await;
    for sidecar in sidecars {
        wait::until(
            "the policy applied through B",
            Duration::from_secs(5),
            || async {
                let dump = sidecar.config_dump().await;
                dump.to_string().contains("orders-timeout").then_some(())
            },
        )
        .await;
        assert!(sidecar.revision().await > revision_before);
        assert_eq!(
            metric(
                sidecar,
                "meshlet_control_plane_updates_total",
                &[("type", "snapshot")]
            )
            .await,
            1.0,
            "resumed on B without a full snapshot:\n{}",
            Scrape::of(sidecar.admin).await.text
        );
        assert!(
            metric(
                sidecar,
                "meshlet_control_plane_updates_total",
                &[("type", "delta")]
            )
            .await
                >= 1.0
        );
    }
    wait::until(
        "more traffic after the apply",
        Duration::from_secs(5),
        || async { (traffic.ok() >= ok_before_apply + 20).then_some(()) },
    )
    .await;
    let (ok, failures) = traffic.finish().await;
    assert!(
        failures.is_empty(),
        "{} of {} requests failed during the failover: {:?}",
        failures.len(),
        ok + failures.len(),
        &failures[..failures.len().min(5)]
    );
    // Registration and heartbeats followed: B knows both instances.
    let services = b.get_json("/api/v1/services").await.to_string();
    assert!(
        services.contains("orders") && services.contains("frontend"),
        "{services}"
    );
}

#[tokio::test]
async fn meshctl_uses_the_next_server_when_the_first_cannot_be_reached() {
    let dir = TempDir::new();
    let cp = ControlPlaneProcess::start(&dir.path.join("data"), &[]).await;
    let dead = dead_url();
    let env = [
        ("MESHLET_SERVER", format!("{dead},{}", cp.url())),
        ("MESHLET_TOKEN", cp.admin_token()),
        ("MESHLET_CA_FILE", cp.ca_file().display().to_string()),
    ];
    let file = dir.path.join("timeout.yaml");
    std::fs::write(&file, TIMEOUT_POLICY).unwrap();
    // A change: the dead server took nothing (refused), so it goes on.
    let out = meshctl_with(&env, &["apply", "-f", file.to_str().unwrap()]).await;
    assert!(out.success(), "{out:?}");
    assert!(
        out.stderr.contains(&format!(
            "note: {dead} could not be reached (connection refused)"
        )),
        "{out:?}"
    );
    // A read, with -v: stdout is the table alone, the answering server
    // on stderr.
    let out = meshctl_with(&env, &["-v", "get", "timeoutpolicies"]).await;
    assert!(out.success(), "{out:?}");
    assert!(out.stdout.contains("orders-timeout"), "{out:?}");
    assert!(
        !out.stdout.contains("answered"),
        "stdout stays the output: {out:?}"
    );
    assert!(
        out.stderr
            .contains(&format!("meshctl: answered by {}", cp.url())),
        "{out:?}"
    );
    // The same with the live server alone: the same table (but for the
    // CHANGED column, the age of the change).
    let alone = meshctl(&cp, &["get", "timeoutpolicies"]).await;
    let without_age = |text: &str| -> Vec<String> {
        text.lines()
            .map(|line| {
                line.rsplit_once(' ')
                    .map_or(line, |(rest, _)| rest)
                    .to_owned()
            })
            .collect()
    };
    assert_eq!(without_age(&alone.stdout), without_age(&out.stdout));
    assert!(alone.stderr.is_empty(), "{alone:?}");
    // Every server dead: each is named with its cause.
    let env = [
        ("MESHLET_SERVER", format!("{dead},{}", dead_url())),
        ("MESHLET_TOKEN", cp.admin_token()),
        ("MESHLET_CA_FILE", cp.ca_file().display().to_string()),
    ];
    let out = meshctl_with(&env, &["get", "services"]).await;
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stderr.contains("cannot reach any control plane: ") && out.stderr.contains(&dead),
        "{out:?}"
    );
}
