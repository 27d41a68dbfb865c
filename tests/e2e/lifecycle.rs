//! A sidecar's life from start to exit: SIGTERM drains in-flight requests
//! while refusing new connections and exits 0, and gives up at the drain
//! deadline (issue point 7); an invalid `--config` stops it before it binds
//! anything, with exit code 2 and a message naming the line and the field
//! (point 8); `/ready` follows the local app's health check.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use meshlet_e2e::client::RawConnection;
use meshlet_e2e::process::free_port;
use meshlet_e2e::{client, wait, ControlPlaneProcess, SidecarProcess, TempDir, Upstream};
use nix::sys::signal::Signal;
use tokio::net::TcpStream;

async fn refuses_connections(addr: SocketAddr) -> bool {
    matches!(
        TcpStream::connect(addr).await,
        Err(err) if err.kind() == std::io::ErrorKind::ConnectionRefused
    )
}

/// A valid `Service` document whose 7th line is `endpoint_line`.
fn config_with_endpoint(endpoint_line: &str) -> String {
    format!(
        "apiVersion: meshlet.dev/v1alpha1\n\
         kind: Service\n\
         metadata:\n  \
           name: orders\n\
         spec:\n  \
           endpoints:\n\
         {endpoint_line}\n"
    )
}

/// Starts a sidecar on `config`, which it must reject: exit code 2 before
/// binding any listener. Returns its stderr.
async fn rejected_config(config: &str) -> String {
    let app = Upstream::start("orders").await;
    let mut sidecar = SidecarProcess::builder("orders", app.port())
        .config(config)
        .spawn();
    let status = sidecar.wait_exit(Duration::from_secs(10)).await;
    let log = sidecar.log_text();
    assert_eq!(status.code(), Some(2), "exit status {status}; log:\n{log}");
    for (name, addr) in [
        ("inbound", sidecar.inbound),
        ("outbound", sidecar.outbound),
        ("admin", sidecar.admin),
    ] {
        assert!(
            refuses_connections(addr).await,
            "{name} {addr} accepts connections"
        );
    }
    assert!(
        !log.contains("sidecar started"),
        "it started before rejecting the config:\n{log}"
    );
    assert_eq!(app.requests(), 0);
    log
}

#[tokio::test]
async fn sigterm_lets_the_slow_request_finish_refuses_new_connections_and_exits_0() {
    let app = Upstream::start("app").await;
    let mut sidecar = SidecarProcess::builder("app", app.port())
        .arg("--drain-timeout")
        .arg("10s")
        .start()
        .await;
    let inbound = sidecar.inbound;
    let slow = tokio::spawn(client::get(inbound, "/slow?ms=1500"));
    wait::until(
        "the app receives the slow request",
        Duration::from_secs(5),
        || async { (app.requests() == 1).then_some(()) },
    )
    .await;

    sidecar.signal(Signal::SIGTERM);
    for addr in [sidecar.inbound, sidecar.outbound] {
        wait::until(
            &format!("{addr} refuses connections"),
            Duration::from_secs(5),
            || async { refuses_connections(addr).await.then_some(()) },
        )
        .await;
    }
    assert!(
        !slow.is_finished(),
        "the listeners must close while the slow request is still in flight"
    );

    let reply = slow
        .await
        .unwrap()
        .expect("the in-flight request completes");
    assert_eq!(
        (reply.status.as_u16(), reply.text().as_str()),
        (200, "slow done")
    );
    let status = sidecar.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(0), "{}", sidecar.log_text());
    assert_eq!(app.requests(), 1);
}

/// An idle keep-alive connection is closed at SIGTERM, not kept open
/// until the drain deadline: the sidecar exits as soon as it is.
#[tokio::test]
async fn sigterm_closes_idle_keep_alive_connections_at_once() {
    let app = Upstream::start("app").await;
    let mut sidecar = SidecarProcess::builder("app", app.port())
        .arg("--drain-timeout")
        .arg("20s")
        .start()
        .await;
    let mut idle = Vec::new();
    for _ in 0..2 {
        let mut connection = RawConnection::open(sidecar.inbound).await;
        connection
            .send(b"GET / HTTP/1.1\r\nHost: app\r\n\r\n")
            .await;
        connection
            .read_until("hello from app", Duration::from_secs(5))
            .await;
        idle.push(connection);
    }
    // And an h2c one (prior knowledge), answered once and kept.
    let stream = TcpStream::connect(sidecar.inbound).await.unwrap();
    let (mut sender, h2_connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    let h2_closed = tokio::spawn(h2_connection);
    let request = http::Request::get("http://app/")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    response.into_body().collect().await.unwrap();

    let signalled = Instant::now();
    sidecar.signal(Signal::SIGTERM);
    for connection in &mut idle {
        assert!(
            connection
                .read_to_close(Duration::from_secs(5))
                .await
                .is_some(),
            "an idle keep-alive connection was still open 5 s after SIGTERM"
        );
    }
    tokio::time::timeout(Duration::from_secs(5), h2_closed)
        .await
        .expect("the idle h2c connection was still open 5 s after SIGTERM")
        .unwrap()
        .ok();
    let status = sidecar.wait_exit(Duration::from_secs(5)).await;
    assert_eq!(status.code(), Some(0), "{}", sidecar.log_text());
    assert!(
        signalled.elapsed() < Duration::from_secs(5),
        "exited {:?} after SIGTERM",
        signalled.elapsed()
    );
}

#[tokio::test]
async fn sigterm_gives_up_on_a_request_at_the_drain_deadline() {
    let app = Upstream::start("app").await;
    let mut sidecar = SidecarProcess::builder("app", app.port())
        .arg("--drain-timeout")
        .arg("300ms")
        .start()
        .await;
    let slow = tokio::spawn(client::get(sidecar.inbound, "/slow?ms=5000"));
    wait::until(
        "the app receives the slow request",
        Duration::from_secs(5),
        || async { (app.requests() == 1).then_some(()) },
    )
    .await;

    let signalled = Instant::now();
    sidecar.signal(Signal::SIGTERM);
    let status = sidecar.wait_exit(Duration::from_secs(4)).await;
    let took = signalled.elapsed();
    assert_eq!(status.code(), Some(0), "{}", sidecar.log_text());
    assert!(
        took < Duration::from_secs(2),
        "exited {took:?} after SIGTERM with a 300ms drain deadline"
    );
    assert!(
        slow.await.unwrap().is_err(),
        "the request cut off at the deadline cannot have been answered"
    );
}

#[tokio::test]
async fn a_misspelled_config_field_is_named_with_its_line() {
    let log = rejected_config(&config_with_endpoint("    - adress: 127.0.0.1:8081")).await;
    assert!(log.contains("line 7"), "{log}");
    assert!(log.contains("spec.endpoints[0].adress"), "{log}");
    assert!(log.contains("unknown field"), "{log}");
}

#[tokio::test]
async fn an_invalid_address_is_named_with_its_line() {
    let log = rejected_config(&config_with_endpoint("    - address: not-an-address")).await;
    assert!(log.contains("line 7"), "{log}");
    assert!(log.contains("spec.endpoints[0].address"), "{log}");
}

#[tokio::test]
async fn an_unknown_kind_is_named_with_its_document_and_line() {
    // The bad kind opens document 2, on line 9.
    let config = config_with_endpoint("    - address: 127.0.0.1:8081")
        + "---\nkind: Pod\napiVersion: meshlet.dev/v1alpha1\nmetadata: {name: web}\nspec: {}\n";
    let log = rejected_config(&config).await;
    assert!(log.contains("document 2"), "{log}");
    assert!(log.contains("line 9"), "{log}");
    assert!(log.contains("field `kind`"), "{log}");
    assert!(log.contains("\"Pod\""), "{log}");
}

/// A fast health check so that the tests below see state changes quickly.
const FAST_HEALTH_CHECK: &str = "\
apiVersion: meshlet.dev/v1alpha1
kind: HealthCheckPolicy
metadata: {name: app-health}
spec: {targetRef: {service: app}, interval: 100ms, timeout: 500ms, unhealthyThreshold: 2}
";

#[tokio::test]
async fn ready_is_503_until_the_app_is_healthy_then_200() {
    let app_addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let sidecar = SidecarProcess::builder("app", app_addr.port())
        .config(FAST_HEALTH_CHECK)
        .start()
        .await;
    let admin = sidecar.admin;
    let ready = client::get(admin, "/ready").await.unwrap();
    assert_eq!(ready.status, 503, "{}", ready.text());
    assert!(ready.text().contains("not healthy"), "{}", ready.text());
    assert!(ready.text().contains("GET /health"), "{}", ready.text());

    // /started ignores the app (a native sidecar's startup probe: the app
    // is started only once it passes); standalone, the sidecar can route.
    let started = client::get(admin, "/started").await.unwrap();
    assert_eq!(started.status, 200, "{}", started.text());

    let app = Upstream::start_on("app", app_addr).await;
    wait::until("/ready turns 200", Duration::from_secs(5), || async {
        let ready = client::get(admin, "/ready").await.ok()?;
        (ready.status == 200).then_some(())
    })
    .await;
    assert!(app.health_probes() >= 1);

    // The app's /health failing makes the sidecar unready, with the reason.
    app.set_healthy(false);
    let text = wait::until("/ready turns 503", Duration::from_secs(5), || async {
        let ready = client::get(admin, "/ready").await.ok()?;
        (ready.status == 503).then(|| ready.text())
    })
    .await;
    assert!(text.contains("503"), "{text}");
    app.set_healthy(true);
    wait::until("/ready turns 200 again", Duration::from_secs(5), || async {
        let ready = client::get(admin, "/ready").await.ok()?;
        (ready.status == 200).then_some(())
    })
    .await;

    // And back to 503 when the app goes away.
    app.kill();
    wait::until("/ready turns 503", Duration::from_secs(5), || async {
        let ready = client::get(admin, "/ready").await.ok()?;
        (ready.status == 503).then_some(())
    })
    .await;
}

#[tokio::test]
async fn started_waits_for_a_configuration_from_the_control_plane() {
    // Nothing listens where the control plane should be, and no snapshot
    // was persisted: the sidecar is up but cannot route yet.
    // (Its CA and a token come from a control plane that is gone.)
    let dir = TempDir::new();
    let mut cp = ControlPlaneProcess::start(&dir.path.join("data"), &[]).await;
    let credentials = cp.sidecar_credentials("default", "app").await;
    cp.kill9().await;
    let sidecar = SidecarProcess::builder("app", free_port())
        .control_plane_with(&credentials)
        .start()
        .await;
    let started = client::get(sidecar.admin, "/started").await.unwrap();
    assert_eq!(started.status, 503, "{}", started.text());
    assert!(
        started
            .text()
            .contains("no configuration from the control plane"),
        "{}",
        started.text()
    );
    let live = client::get(sidecar.admin, "/live").await.unwrap();
    assert_eq!(live.status, 200);
}
