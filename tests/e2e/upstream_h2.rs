//! Upstream connections under load, against a real nginx (issue 16, "Done
//! means" 1 and 2): the sidecar binary in front of nginx, driven by h2load
//! and wrk.
//!
//! - h2c: nginx closes each HTTP/2 connection with GOAWAY after
//!   `keepalive_requests` (1000) requests; streams it refused unprocessed
//!   are sent again by the sidecar, so `h2load -n 3000 -c 4 -m 10` through
//!   an inbound sidecar (`--app-protocol h2c`) and through outbound →
//!   inbound all succeed.
//! - HTTP/1.1: nginx with `keepalive_requests 100` under wrk: no non-2xx,
//!   no socket error.
//! - One client holding 200 stalled streams (POSTs whose bodies never
//!   arrive) through the sidecar: nginx holds only its allowance
//!   (`--upstream-streams-per-client`, 100), another client's requests
//!   answer in < 100 ms (median), and nginx accepts ≤ 10 connections for
//!   5000 more requests.
//!
//! nginx runs as a child process (no daemon, one process) with its own
//! prefix directory and a free loopback port; killed on drop. nginx,
//! h2load and wrk must be installed (`tests/run.sh` installs them); a
//! missing one fails the test with a message saying which.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use meshlet_e2e::metrics::Scrape;
use meshlet_e2e::process::{free_port, SidecarProcess, TempDir};
use meshlet_e2e::{client, wait};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

/// A program the tests need, or a failure naming its Debian package.
fn tool(name: &str, candidates: &[&str], package: &str) -> PathBuf {
    candidates
        .iter()
        .map(PathBuf::from)
        .find(|path| path.exists())
        .or_else(|| {
            std::env::var_os("PATH").and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|dir| dir.join(name))
                    .find(|path| path.exists())
            })
        })
        .unwrap_or_else(|| {
            panic!("`{name}` is not installed: `apt-get install {package}` (tests/run.sh does)")
        })
}

/// What nginx speaks on its main port.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Speaks {
    /// HTTP/2 prior knowledge (`listen ... http2` without TLS).
    H2c,
    /// HTTP/1.1.
    Http1,
}

/// An nginx child process: `/` answers `200 ok`, `/upload` reads the whole
/// request body first (proxied to its own second server), and a status port
/// serves `stub_status`.
struct Nginx {
    child: Child,
    addr: SocketAddr,
    status: SocketAddr,
    /// `stub_status` requests made (each is a connection nginx accepts).
    status_calls: std::sync::atomic::AtomicU64,
    dir: TempDir,
}

impl Nginx {
    async fn start(speaks: Speaks, keepalive_requests: u32) -> Nginx {
        let nginx = tool("nginx", &["/usr/sbin/nginx"], "nginx");
        let dir = TempDir::new();
        let (port, status, backend) = (free_port(), free_port(), free_port());
        let prefix = dir.path.display().to_string();
        let listen = match speaks {
            Speaks::H2c => format!("127.0.0.1:{port} http2"),
            Speaks::Http1 => format!("127.0.0.1:{port}"),
        };
        let config = format!(
            r#"daemon off;
master_process off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 2048; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    keepalive_requests {keepalive_requests};
    http2_max_concurrent_streams 128;
    client_body_timeout 120s;
    server {{
        listen {listen};
        location / {{ return 200 "ok\n"; }}
        location /upload {{ proxy_pass http://127.0.0.1:{backend}/; }}
    }}
    server {{
        listen 127.0.0.1:{backend};
        location / {{ return 200 "stored\n"; }}
    }}
    server {{
        listen 127.0.0.1:{status};
        location = /status {{ stub_status; }}
    }}
}}
"#
        );
        let conf = dir.path.join("nginx.conf");
        std::fs::write(&conf, config).expect("nginx.conf written");
        let child = Command::new(nginx)
            .arg("-p")
            .arg(&dir.path)
            .arg("-c")
            .arg(&conf)
            .arg("-e")
            .arg(dir.path.join("error.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path.join("stderr.log")).expect("stderr file"))
            .kill_on_drop(true)
            .spawn()
            .expect("nginx starts");
        let mut nginx = Nginx {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            status: SocketAddr::from(([127, 0, 0, 1], status)),
            status_calls: Default::default(),
            dir,
        };
        let status_addr = nginx.status;
        let ready = wait::within(Duration::from_secs(10), || async move {
            client::get(status_addr, "/status")
                .await
                .ok()
                .filter(|r| r.status == 200)
        })
        .await;
        if ready.is_none() || !matches!(nginx.child.try_wait(), Ok(None)) {
            panic!("nginx did not start:\n{}", nginx.logs());
        }
        nginx
    }

    fn logs(&self) -> String {
        let read =
            |name: &str| std::fs::read_to_string(self.dir.path.join(name)).unwrap_or_default();
        format!("{}{}", read("stderr.log"), read("error.log"))
    }

    /// `stub_status`: (connections accepted on the main port, requests
    /// being written). Accepted connections exclude the status requests'
    /// own; writing includes this one's request.
    async fn status(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering;
        let calls = self.status_calls.fetch_add(1, Ordering::SeqCst) + 1;
        let reply = client::get(self.status, "/status")
            .await
            .expect("stub_status");
        let text = reply.text();
        let lines: Vec<&str> = text.lines().collect();
        let accepts = lines
            .get(2)
            .and_then(|l| l.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("stub_status: {text}"));
        let writing = text
            .split_whitespace()
            .skip_while(|w| *w != "Writing:")
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("stub_status: {text}"));
        let accepts: u64 = accepts;
        (accepts - calls, writing)
    }
}

/// h2load's summary: (succeeded, failed, 2xx).
struct H2load {
    succeeded: u64,
    failed: u64,
    ok: u64,
    output: String,
}

/// Runs `h2load -n N -c 4 -m 10 URL` (h2c prior knowledge) with `extra`
/// arguments.
async fn h2load(url: &str, requests: u32, extra: &[&str]) -> H2load {
    let h2load = tool("h2load", &["/usr/bin/h2load"], "nghttp2-client");
    let output = Command::new(h2load)
        .args(["-n", &requests.to_string(), "-c", "4", "-m", "10"])
        .args(extra)
        .arg(url)
        .output()
        .await
        .expect("h2load runs");
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    // "requests: 3000 total, 3000 started, 3000 done, 3000 succeeded, 0 failed, ..."
    // "status codes: 3000 2xx, 0 3xx, 0 4xx, 0 5xx"
    let number_before = |line_start: &str, word: &str| -> u64 {
        let line = text
            .lines()
            .find(|l| l.starts_with(line_start))
            .unwrap_or_else(|| panic!("no `{line_start}` in h2load's output:\n{text}"));
        let words: Vec<&str> = line.split([' ', ',']).filter(|w| !w.is_empty()).collect();
        words
            .windows(2)
            .find(|w| w[1] == word)
            .and_then(|w| w[0].parse().ok())
            .unwrap_or_else(|| panic!("no `{word}` in {line:?}"))
    };
    H2load {
        succeeded: number_before("requests:", "succeeded"),
        failed: number_before("requests:", "failed"),
        ok: number_before("status codes:", "2xx"),
        output: text,
    }
}

/// A standalone inbound sidecar in front of `app`.
async fn sidecar_for(app: SocketAddr, protocol: &str, extra: &[&str]) -> SidecarProcess {
    let mut builder = SidecarProcess::builder("web", app.port())
        .arg("--app-protocol")
        .arg(protocol)
        .arg("--upstream-timeout")
        .arg("60s");
    for arg in extra {
        builder = builder.arg(arg);
    }
    builder.start().await
}

fn counter(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape.sum(name, labels)
}

fn resends(scrape: &Scrape) -> String {
    ["goaway", "refused_stream", "connection_closed"]
        .iter()
        .map(|reason| {
            format!(
                "{reason}={}",
                counter(
                    scrape,
                    "meshlet_upstream_resends_total",
                    &[("reason", reason)]
                )
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[tokio::test]
async fn h2load_through_the_inbound_to_an_h2c_nginx_that_sends_goaway_loses_nothing() {
    // nginx's default: GOAWAY after 1000 requests on a connection.
    let nginx = Nginx::start(Speaks::H2c, 1000).await;
    let inbound = sidecar_for(nginx.addr, "h2c", &[]).await;
    let (accepts_before, _) = nginx.status().await;
    let run = h2load(&format!("http://{}/", inbound.inbound), 3000, &[]).await;
    let (accepts_after, _) = nginx.status().await;
    let scrape = Scrape::of(inbound.admin).await;
    let opened = accepts_after - accepts_before;
    eprintln!(
        "inbound: {} succeeded, {} failed, {} 2xx; nginx accepted {opened} connections; resends: {}",
        run.succeeded,
        run.failed,
        run.ok,
        resends(&scrape)
    );
    assert_eq!(
        (run.succeeded, run.failed, run.ok),
        (3000, 0, 3000),
        "{}",
        run.output
    );
    // 3000 requests, 1000 per connection: 3 needed; no racing connects.
    assert!(
        opened <= 6,
        "nginx accepted {opened} connections for 3000 requests"
    );
    assert_eq!(
        counter(
            &scrape,
            "meshlet_upstream_connections_opened_total",
            &[("protocol", "h2c")]
        ),
        opened as f64
    );
}

#[tokio::test]
async fn h2load_through_outbound_and_inbound_to_an_h2c_nginx_loses_nothing() {
    let nginx = Nginx::start(Speaks::H2c, 1000).await;
    let inbound = sidecar_for(nginx.addr, "h2c", &[]).await;
    let config = format!(
        "apiVersion: meshlet.dev/v1alpha1\nkind: Service\nmetadata: {{name: web}}\nspec:\n  endpoints:\n    - address: '{}'\n",
        inbound.inbound
    );
    let caller = SidecarProcess::builder("caller", free_port())
        .config(&config)
        .arg("--upstream-timeout")
        .arg("60s")
        .start()
        .await;
    // Routed by the authority: the service's name.
    let url = format!("http://{}/", caller.outbound);
    let run = h2load(&url, 3000, &["-H", ":authority: web"]).await;
    let (out, into) = (
        Scrape::of(caller.admin).await,
        Scrape::of(inbound.admin).await,
    );
    eprintln!(
        "outbound → inbound: {} succeeded, {} failed, {} 2xx; resends outbound: {}; inbound: {}",
        run.succeeded,
        run.failed,
        run.ok,
        resends(&out),
        resends(&into)
    );
    assert_eq!(
        (run.succeeded, run.failed, run.ok),
        (3000, 0, 3000),
        "{}",
        run.output
    );
}

#[tokio::test]
async fn wrk_through_the_inbound_to_an_http1_nginx_closing_every_100_requests_sees_no_error() {
    let wrk = tool("wrk", &["/usr/bin/wrk"], "wrk");
    let nginx = Nginx::start(Speaks::Http1, 100).await;
    let inbound = sidecar_for(nginx.addr, "http1", &[]).await;
    let output = Command::new(wrk)
        .args(["-t", "2", "-c", "16", "-d", "5s"])
        .arg(format!("http://{}/", inbound.inbound))
        .output()
        .await
        .expect("wrk runs");
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    let requests: u64 = text
        .lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no request count in wrk's output:\n{text}"));
    let scrape = Scrape::of(inbound.admin).await;
    let opened = counter(
        &scrape,
        "meshlet_upstream_connections_opened_total",
        &[("protocol", "http1")],
    );
    eprintln!(
        "wrk: {requests} requests, {opened} upstream connections; resends: {}\n{text}",
        resends(&scrape)
    );
    assert!(output.status.success(), "{text}");
    assert!(requests > 100, "{text}");
    assert!(!text.contains("Non-2xx or 3xx responses"), "{text}");
    assert!(!text.contains("Socket errors"), "{text}");
}

/// Opens an h2c connection to `addr` and starts `streams` POSTs to
/// `/upload` whose bodies never arrive. They stay open until the returned
/// runtime handle's tasks are dropped (with the connection).
async fn stalled_client(addr: SocketAddr, streams: usize) -> Vec<tokio::task::JoinHandle<()>> {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2 handshake");
    let mut tasks = vec![tokio::spawn(async move {
        let _ = connection.await;
    })];
    for _ in 0..streams {
        let mut sender = sender.clone();
        tasks.push(tokio::spawn(async move {
            let never = futures_util::stream::pending::<Result<Frame<Bytes>, std::io::Error>>();
            let request = Request::post("http://web/upload")
                .body(StreamBody::new(never))
                .expect("request");
            let _ = sender.send_request(request).await;
        }));
    }
    tasks
}

/// The median latency of `n` GETs, one after another, on one new h2c
/// connection to `addr`.
async fn median_get_latency(addr: SocketAddr, n: usize) -> Duration {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2 handshake");
    tokio::spawn(connection);
    let mut latencies = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        let request = Request::get("http://web/")
            .body(Empty::<Bytes>::new())
            .expect("request");
        let response = tokio::time::timeout(Duration::from_secs(20), sender.send_request(request))
            .await
            .expect("answered within 20 s")
            .expect("response");
        assert_eq!(response.status(), 200);
        response.into_body().collect().await.expect("body");
        latencies.push(started.elapsed());
    }
    latencies.sort();
    latencies[n / 2]
}

#[tokio::test]
async fn a_client_holding_200_stalled_streams_does_not_block_another() {
    let nginx = Nginx::start(Speaks::H2c, 1000).await;
    let inbound = sidecar_for(nginx.addr, "h2c", &[]).await;
    let idle = median_get_latency(inbound.inbound, 20).await;
    let (accepts_before, _) = nginx.status().await;

    let stalled = stalled_client(inbound.inbound, 200).await;
    // nginx counts a request waiting for its body as "writing"; the
    // status request is one more. The client may hold 100 of them.
    let held = wait::until(
        "100 stalled uploads held by nginx",
        Duration::from_secs(20),
        || {
            let nginx = &nginx;
            async move {
                let (_, writing) = nginx.status().await;
                (writing > 100).then_some(writing - 1)
            }
        },
    )
    .await;

    let busy = median_get_latency(inbound.inbound, 20).await;
    let run = h2load(&format!("http://{}/", inbound.inbound), 5000, &[]).await;
    let (accepts_after, writing) = nginx.status().await;
    let opened = accepts_after - accepts_before;
    let scrape = Scrape::of(inbound.admin).await;
    eprintln!(
        "stalled uploads held by nginx: {held} (then {}); median GET idle {idle:?}, next to 200 stalled streams {busy:?}; \
         h2load: {} succeeded, {} failed; nginx accepted {opened} connections; resends: {}",
        writing - 1,
        run.succeeded,
        run.failed,
        resends(&scrape)
    );
    assert_eq!(held, 100, "the client's allowance, not nginx's 128");
    assert!(
        busy < Duration::from_millis(100),
        "median {busy:?} (idle {idle:?})"
    );
    assert_eq!(
        (run.succeeded, run.failed, run.ok),
        (5000, 0, 5000),
        "{}",
        run.output
    );
    assert!(
        opened <= 10,
        "nginx accepted {opened} connections for 5000 requests"
    );
    assert_eq!(writing - 1, 100, "still only the allowance held");
    for task in stalled {
        task.abort();
    }
}
