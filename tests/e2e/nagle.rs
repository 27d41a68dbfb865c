//! An app with Nagle's algorithm on is not stalled by the sidecar's delayed
//! ACK (issue 17, goal 3).
//!
//! The app is Python's `http.server` (tests/e2e/fixtures/nagle_app.py):
//! HTTP/1.1 keep-alive, no `TCP_NODELAY`, head and body written in two
//! segments. On a reused connection the body waits in the app's kernel
//! until the head is acknowledged, and a receiver in delayed-ACK mode
//! holds that ACK for 40 ms or more: every request through a proxy that
//! lets it happen takes ~40 ms (nginx does). What a user notices is the
//! time per request, so that is what the test asserts: 20 sequential
//! requests on one kept-alive client connection through the real sidecar
//! process, all carried by one upstream connection, with a median well
//! under the 40 ms stall.

use std::process::Stdio;
use std::time::{Duration, Instant};

use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use meshlet_e2e::metrics::Scrape;
use meshlet_e2e::process::free_port;
use meshlet_e2e::SidecarProcess;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

/// Requests measured on the kept-alive connection.
const REQUESTS: usize = 20;
/// Well under the 40 ms minimum of Linux's delayed-ACK timer, well over
/// what a request takes on loopback (~1 ms) even on a busy machine.
const MEDIAN_LIMIT: Duration = Duration::from_millis(15);

/// The Python app, answering `200 ok\n` on 127.0.0.1:`port`; killed on drop.
async fn start_nagle_app(port: u16) -> Child {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/e2e/fixtures/nagle_app.py");
    let mut child = Command::new("python3")
        .arg(script)
        .arg(port.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python3 runs (it is needed by this test)");
    let stdout = child.stdout.take().expect("piped stdout");
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .expect("the Python app starts within 10s")
        .expect("read its output");
    assert_eq!(
        line.as_deref(),
        Some(format!("listening {port}").as_str()),
        "the Python app did not start"
    );
    child
}

/// Sends `REQUESTS` GETs one after another on one kept-alive connection to
/// `addr` (after one warm-up request that opens the connections) and
/// returns each one's time, sorted.
async fn timed_requests(addr: std::net::SocketAddr) -> Vec<Duration> {
    let stream = TcpStream::connect(addr).await.expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(connection);
    let mut times = Vec::with_capacity(REQUESTS);
    for i in 0..=REQUESTS {
        let request = Request::get("/")
            .header("host", "nagle-app")
            .body(Empty::<Bytes>::new())
            .expect("request");
        sender.ready().await.expect("connection kept alive");
        let start = Instant::now();
        let response = sender.send_request(request).await.expect("response");
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        let took = start.elapsed();
        assert_eq!((status.as_u16(), &body[..]), (200, &b"ok\n"[..]));
        if i > 0 {
            times.push(took); // the first one opened the upstream connection
        }
    }
    times.sort();
    times
}

fn median(sorted: &[Duration]) -> Duration {
    sorted[sorted.len() / 2]
}

#[tokio::test]
async fn a_nagle_app_answers_without_the_delayed_ack_stall_on_a_kept_alive_connection() {
    let app_port = free_port();
    let _app = start_nagle_app(app_port).await;
    let app = std::net::SocketAddr::from(([127, 0, 0, 1], app_port));
    let sidecar = SidecarProcess::builder("nagle-app", app_port)
        .arg("--tracing")
        .arg("off")
        .start()
        .await;
    sidecar.wait_routes_to_app().await;

    let direct = timed_requests(app).await;
    let through = timed_requests(sidecar.inbound).await;

    // The stall only happens on a reused upstream connection: check that
    // the measured requests shared one (the readiness check above opened
    // it, or the warm-up request did; the pool keeps it).
    let opened = Scrape::of(sidecar.admin).await.sum(
        "meshlet_upstream_connections_opened_total",
        &[("protocol", "http1")],
    );
    assert!(
        opened <= 2.0,
        "the sidecar opened {opened} upstream connections for {} sequential requests: \
         the pool did not reuse them, so this test measures nothing",
        REQUESTS + 2
    );
    assert!(
        median(&through) < MEDIAN_LIMIT,
        "through the sidecar, requests to an app with Nagle on take {:?} (median; \
         all: {through:?}); directly {:?} (median). The sidecar holds its ACK of the \
         response head, so the app's body waits for the delayed-ACK timer.",
        median(&through),
        median(&direct),
    );
}
