//! The ingress gateway (issue 15, done-means 1–3), the real `sidecar`
//! binary in `--mode gateway` in front of upstream apps on loopback:
//!
//! 1. Routes for `shop.example.com`: `/api/*` → orders, `/` → frontend,
//!    `x-canary: true` → orders v2 only (1000 requests, none to v1); an
//!    unknown host → 404 `no_route`; a rewrite and a header set visible to
//!    the app, identity headers a client sent are not.
//! 2. TLS: curl with `--cacert` and SNI `shop.example.com` gets 200 and that
//!    name's certificate, a second name its own; a replaced certificate
//!    file is served without a restart; `--redirect-port` answers 308.
//! 3. A `key: clientIP` rate limit: clients on 127.0.0.2 and 127.0.0.3 have
//!    separate buckets; retries and a breaker apply to a failing backend.
//!
//! Attacks: hosts a client picks (upper case + trailing dot, empty
//! labels, an IPv6 literal in a redirect) route as the README says.
//!
//! And with a control plane: the gateway registers as `role: gateway`, the
//! dashboard's topology marks it as the entry node, and it calls a backend
//! sidecar over mTLS with its own identity.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use meshlet_e2e::config::{doc, service};
use meshlet_e2e::process::SidecarProcess;
use meshlet_e2e::{wait, TempDir, Upstream};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;

const PATIENCE: Duration = Duration::from_secs(15);

/// The shop's routes on gateway `edge`: a canary by header, `/api` with a
/// rewrite and a header set, everything else to the frontend.
const SHOP_ROUTE: &str = "\
parentRefs: [{gateway: edge}]
hostnames: [shop.example.com]
rules:
  - matches: [{path: {type: PathPrefix, value: /api}, headers: [{name: x-canary, value: \"true\"}]}]
    backends: [{service: orders, labels: {version: v2}}]
  - matches: [{path: {type: PathPrefix, value: /api}}]
    backends: [{service: orders}]
    filters:
      - requestHeaderModifier: {set: [{name: x-from, value: edge}]}
      - urlRewrite: {pathPrefix: /}
  - backends: [{service: frontend}]";

/// A parsed HTTP/1.1 answer.
#[derive(Debug)]
struct Answer {
    status: u16,
    head: String,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.eq_ignore_ascii_case(name).then(|| value.trim())
        })
    }
}

/// One request on a fresh connection from `source` (a loopback address
/// the client socket binds to), `connection: close`.
async fn send_from(
    source: IpAddr,
    gateway: SocketAddr,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Answer {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(source, 0)).unwrap();
    let mut stream = socket
        .connect(gateway)
        .await
        .expect("connect to the gateway");
    let mut head = format!("{method} {path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut raw))
        .await
        .expect("answered in time")
        .unwrap();
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {raw:?}"));
    Answer {
        status,
        head: head.to_owned(),
        body: body.to_owned(),
    }
}

async fn send(gateway: SocketAddr, host: &str, path: &str, headers: &[(&str, &str)]) -> Answer {
    let loopback = IpAddr::from([127, 0, 0, 1]);
    send_from(loopback, gateway, "GET", host, path, headers).await
}

/// A gateway `edge` from `config` (standalone), ready.
async fn gateway(config: &str, args: &[&str]) -> SidecarProcess {
    let mut builder = SidecarProcess::gateway("edge").config(config);
    for arg in args {
        builder = builder.arg(arg);
    }
    let gateway = builder.start().await;
    gateway.wait_ready(PATIENCE).await;
    gateway
}

// ---------------------------------------------------------------- routing

#[tokio::test]
async fn routes_by_host_path_and_header_rewrite_and_set_headers_and_404_no_route() {
    let orders_v1 = Upstream::start("orders-v1").await;
    let orders_v2 = Upstream::start("orders-v2").await;
    let frontend = Upstream::start("frontend").await;
    let config = service("orders", &[(orders_v1.addr, "v1"), (orders_v2.addr, "v2")])
        + &service("frontend", &[(frontend.addr, "v1")])
        + &doc("Route", "shop", SHOP_ROUTE);
    let gateway = gateway(&config, &[]).await;
    let edge = gateway.inbound;

    // `/` → frontend.
    let home = send(edge, "shop.example.com", "/", &[]).await;
    assert_eq!(home.status, 200, "{home:?}");
    assert_eq!(home.body, "hello from frontend");

    // `/api/...` → orders (either version), rewritten to `/...`, with the
    // header the route sets and x-forwarded-*; the identity headers a
    // client sent are gone.
    let spoofed = [
        ("x-meshlet-source", "admin"),
        (
            "x-meshlet-source-identity",
            "spiffe://meshlet.local/ns/default/sa/admin",
        ),
        ("x-from", "client"),
    ];
    let api = send(edge, "shop.example.com:8080", "/api/headers", &spoofed).await;
    assert_eq!(api.status, 200, "{api:?}");
    let seen: Value = serde_json::from_str(&api.body).unwrap();
    assert!(
        seen["upstream"].as_str().unwrap().starts_with("orders-"),
        "{seen}"
    );
    assert_eq!(
        seen["headers"]["x-from"],
        serde_json::json!(["edge"]),
        "{seen}"
    );
    assert_eq!(
        seen["headers"]["x-forwarded-for"],
        serde_json::json!(["127.0.0.1"])
    );
    assert_eq!(
        seen["headers"]["x-forwarded-proto"],
        serde_json::json!(["http"])
    );
    assert!(seen["headers"].get("x-meshlet-source").is_none(), "{seen}");
    assert!(
        seen["headers"].get("x-meshlet-source-identity").is_none(),
        "{seen}"
    );

    // The canary: 1000 requests with `x-canary: true`, all to v2.
    let (v1_before, v2_before) = (orders_v1.requests(), orders_v2.requests());
    let statuses = keep_alive_requests(
        edge,
        "shop.example.com",
        "/api/items/7",
        ("x-canary", "true"),
        1000,
    )
    .await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(
        orders_v1.requests() - v1_before,
        0,
        "no canary request reached v1"
    );
    assert_eq!(orders_v2.requests() - v2_before, 1000);

    // Unknown host: 404 no_route, nothing reached any app.
    let total = orders_v1.requests() + orders_v2.requests() + frontend.requests();
    let unknown = send(edge, "unknown.example.org", "/api/items", &[]).await;
    assert_eq!(unknown.status, 404, "{unknown:?}");
    assert_eq!(unknown.header("x-meshlet-reason"), Some("no_route"));
    assert!(
        unknown.body.contains("no Route of gateway \"edge\""),
        "{unknown:?}"
    );
    assert_eq!(
        orders_v1.requests() + orders_v2.requests() + frontend.requests(),
        total
    );

    // The gateway counts itself inbound (service edge) and its backend
    // calls outbound (destination orders).
    let metrics = meshlet_e2e::client::get(gateway.admin, "/metrics")
        .await
        .unwrap()
        .text();
    assert!(
        metrics.lines().any(|l| l.starts_with("request_total{")
            && l.contains("direction=\"outbound\"")
            && l.contains("destination=\"orders\"")),
        "{metrics}"
    );
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("meshlet_mesh_responses_total{")
                && l.contains("reason=\"no_route\"")),
        "{metrics}"
    );
}

/// `count` GETs on one keep-alive HTTP/1.1 connection; their statuses.
async fn keep_alive_requests(
    addr: SocketAddr,
    host: &str,
    path: &str,
    header: (&str, &str),
    count: usize,
) -> Vec<u16> {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    let mut statuses = Vec::with_capacity(count);
    for _ in 0..count {
        let request = Request::get(path)
            .header("host", host)
            .header(header.0, header.1)
            .body(Full::new(Bytes::new()))
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        statuses.push(response.status().as_u16());
        response.into_body().collect().await.unwrap();
    }
    statuses
}

// ---------------------------------------------------------------- TLS

/// A CA and leaf certificates it signs, written as PEM files.
struct Pki {
    dir: TempDir,
    ca_params: rcgen::CertificateParams,
    ca_key: rcgen::KeyPair,
}

impl Pki {
    fn new() -> Pki {
        let dir = TempDir::new();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "gateway test CA");
        let ca = ca_params.self_signed(&ca_key).unwrap();
        std::fs::write(dir.path.join("ca.crt"), ca.pem()).unwrap();
        Pki {
            dir,
            ca_params,
            ca_key,
        }
    }

    fn ca_file(&self) -> String {
        self.dir.path.join("ca.crt").display().to_string()
    }

    /// A leaf for `name` whose subject CN is `label`, written to
    /// `stem.crt`/`stem.key` (replacing them by rename, as a certificate
    /// manager does); the two paths.
    fn leaf(&self, stem: &str, name: &str, label: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec![name.to_owned()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, label);
        let issuer = rcgen::Issuer::new(self.ca_params.clone(), &self.ca_key);
        let cert = params.signed_by(&key, &issuer).unwrap();
        let path = |ext: &str| self.dir.path.join(format!("{stem}.{ext}"));
        for (ext, pem) in [("key", key.serialize_pem()), ("crt", cert.pem())] {
            let tmp = path(&format!("{ext}.tmp"));
            std::fs::write(&tmp, pem).unwrap();
            std::fs::rename(&tmp, path(ext)).unwrap();
        }
        (
            path("crt").display().to_string(),
            path("key").display().to_string(),
        )
    }
}

/// `curl --cacert CA --resolve NAME:PORT:127.0.0.1 https://NAME:PORT/`:
/// the status and the subject CN of the certificate it was shown. (Run
/// without blocking: the upstreams answer on this test's runtime.)
async fn curl(ca: &str, name: &str, port: u16, path: &str) -> (u16, String) {
    let output = tokio::process::Command::new("curl")
        .args(["-sS", "-v", "--max-time", "10", "--cacert", ca, "--resolve"])
        .arg(format!("{name}:{port}:127.0.0.1"))
        .arg(format!("https://{name}:{port}{path}"))
        .args(["-o", "/dev/null", "-w", "%{http_code}"])
        .output()
        .await
        .expect("curl runs");
    let status = String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    let log = String::from_utf8_lossy(&output.stderr);
    let subject = log
        .lines()
        .find_map(|l| l.split_once("subject: ").map(|(_, s)| s.trim().to_owned()))
        .unwrap_or_else(|| format!("no subject in curl's log: {log}"));
    if status != 200 {
        eprintln!("curl {name}: {log}");
    }
    (status, subject)
}

#[tokio::test]
async fn tls_by_sni_with_a_certificate_reloaded_without_restart_and_a_redirect() {
    let frontend = Upstream::start("frontend").await;
    let api = Upstream::start("api").await;
    let route = |name: &str, host: &str, backend: &str| {
        doc(
            "Route",
            name,
            &format!("parentRefs: [{{gateway: edge}}]\nhostnames: [{host}]\nrules:\n  - backends: [{{service: {backend}}}]"),
        )
    };
    let config = service("frontend", &[(frontend.addr, "v1")])
        + &service("api", &[(api.addr, "v1")])
        + &route("shop", "shop.example.com", "frontend")
        + &route("api", "api.example.com", "api");
    let pki = Pki::new();
    let (shop_crt, shop_key) = pki.leaf("shop", "shop.example.com", "shop generation 1");
    let (api_crt, api_key) = pki.leaf("api", "api.example.com", "api generation 1");
    let redirect = meshlet_e2e::process::free_port().to_string();
    let gateway = gateway(
        &config,
        &[
            "--tls-cert",
            &shop_crt,
            "--tls-key",
            &shop_key,
            "--tls-cert",
            &api_crt,
            "--tls-key",
            &api_key,
            "--redirect-port",
            &redirect,
        ],
    )
    .await;
    let port = gateway.inbound.port();
    let ca = pki.ca_file();

    let (status, subject) = curl(&ca, "shop.example.com", port, "/").await;
    assert_eq!((status, subject.as_str()), (200, "CN=shop generation 1"));
    let (status, subject) = curl(&ca, "api.example.com", port, "/").await;
    assert_eq!((status, subject.as_str()), (200, "CN=api generation 1"));
    assert_eq!(api.requests(), 1);
    assert_eq!(frontend.requests(), 1);

    // A new certificate in the same files is served within a few seconds
    // (the files are polled every 2 s), no restart.
    let replaced = std::time::Instant::now();
    pki.leaf("shop", "shop.example.com", "shop generation 2");
    wait::until("the replaced certificate is served", PATIENCE, || async {
        let (status, subject) = curl(&ca, "shop.example.com", port, "/").await;
        (status == 200 && subject == "CN=shop generation 2").then_some(())
    })
    .await;
    eprintln!(
        "the replaced certificate was served after {:?}",
        replaced.elapsed()
    );
    let metrics = meshlet_e2e::client::get(gateway.admin, "/metrics")
        .await
        .unwrap()
        .text();
    assert!(
        metrics.contains("meshlet_gateway_certificate_reloads_total{outcome=\"ok\"}"),
        "{metrics}"
    );

    // Plaintext on the TLS port is closed unanswered; the redirect port
    // sends clients to https.
    let mut plain = tokio::net::TcpStream::connect(gateway.inbound)
        .await
        .unwrap();
    plain
        .write_all(b"GET / HTTP/1.1\r\nhost: shop.example.com\r\n\r\n")
        .await
        .unwrap();
    let mut nothing = Vec::new();
    let read = tokio::time::timeout(PATIENCE, plain.read_to_end(&mut nothing)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "closed: {nothing:?}"
    );
    let to_redirect: SocketAddr = format!("127.0.0.1:{redirect}").parse().unwrap();
    let moved = send(to_redirect, "shop.example.com:80", "/cart?id=7", &[]).await;
    assert_eq!(moved.status, 308, "{moved:?}");
    assert_eq!(
        moved.header("location"),
        Some(format!("https://shop.example.com:{port}/cart?id=7").as_str())
    );
}

#[tokio::test]
async fn unusable_certificate_files_stop_the_start_naming_the_file() {
    let pki = Pki::new();
    let (shop_crt, _) = pki.leaf("shop", "shop.example.com", "shop");
    let (_, other_key) = pki.leaf("other", "other.example.com", "other");
    let missing = pki.dir.path.join("missing.crt").display().to_string();
    for (cert, key, expect) in [
        (
            shop_crt.as_str(),
            other_key.as_str(),
            "does not belong to the certificate",
        ),
        (missing.as_str(), other_key.as_str(), "missing.crt"),
    ] {
        let mut gateway = SidecarProcess::gateway("edge")
            .arg("--tls-cert")
            .arg(cert)
            .arg("--tls-key")
            .arg(key)
            .spawn();
        let status = gateway.wait_exit(PATIENCE).await;
        assert_eq!(status.code(), Some(2), "{}", gateway.log_text());
        assert!(
            gateway.log_text().contains(expect),
            "{}",
            gateway.log_text()
        );
    }
}

// ---------------------------------------------------------------- policies

#[tokio::test]
async fn client_ip_buckets_are_separate_and_retries_and_a_breaker_protect_a_failing_backend() {
    let frontend = Upstream::start("frontend").await;
    let failing = Upstream::start("failing").await;
    let config = service("frontend", &[(frontend.addr, "v1")])
        + &service("failing", &[(failing.addr, "v1")])
        + &doc(
            "Route",
            "shop",
            "parentRefs: [{gateway: edge}]\nrules:\n  - matches: [{path: {type: PathPrefix, value: /status}}]\n    backends: [{service: failing}]\n  - backends: [{service: frontend}]",
        )
        + &doc(
            "RateLimitPolicy",
            "per-client",
            "targetRef: {service: edge}\nmatch: {pathPrefix: /api}\ntokenBucket: {capacity: 2, refillPerSecond: 0.001}\nkey: clientIP\nscope: local",
        )
        + &doc(
            "RetryPolicy",
            "failing-retry",
            "targetRef: {service: failing}\nattempts: 3\nretryOn: [5xx]\nbackoff: {base: 1ms, max: 5ms}\nbudget: {percent: 100, minPerSecond: 1000}",
        )
        + &doc(
            "CircuitBreakerPolicy",
            "failing-breaker",
            "targetRef: {service: failing}\nconsecutiveFailures: 6\nopenDuration: 60s",
        );
    let gateway = gateway(&config, &[]).await;
    let edge = gateway.inbound;

    // Two client addresses, two buckets of 2.
    let mut statuses = Vec::new();
    for last in [2, 3, 2, 3, 2, 3] {
        let source = IpAddr::from([127, 0, 0, last]);
        let answer = send_from(source, edge, "GET", "shop.example.com", "/api/x", &[]).await;
        if answer.status == 429 {
            assert_eq!(answer.header("x-meshlet-reason"), Some("rate_limited"));
        }
        statuses.push((last, answer.status));
    }
    assert_eq!(
        statuses,
        [(2, 200), (3, 200), (2, 200), (3, 200), (2, 429), (3, 429)]
    );

    // Retries: each failing request is tried 3 times; the breaker opens
    // after 6 consecutive failures and then refuses without a try.
    for round in 1..=2 {
        let answer = send(edge, "shop.example.com", "/status?code=500", &[]).await;
        assert_eq!(answer.status, 500, "round {round}: {answer:?}");
        assert_eq!(failing.requests(), 3 * round, "3 tries per request");
    }
    let refused = send(edge, "shop.example.com", "/status?code=500", &[]).await;
    assert_eq!(refused.status, 503, "{refused:?}");
    assert_eq!(refused.header("x-meshlet-reason"), Some("circuit_open"));
    assert_eq!(failing.requests(), 6, "an open breaker sends nothing");
}

// ---------------------------------------------------------------- mesh

#[tokio::test]
async fn with_a_control_plane_the_gateway_is_the_entry_node_and_calls_over_mtls_as_itself() {
    let data = TempDir::new();
    let cp = meshlet_e2e::inprocess::ControlPlane::start(&data.path, &[]).await;
    let orders_app = Upstream::start("orders").await;
    let _orders = meshlet_e2e::inprocess::Sidecar::builder("orders", orders_app.port())
        .control_plane(&cp)
        .start()
        .await;
    let gateway = SidecarProcess::gateway("edge")
        .control_plane(&cp)
        .arg("--stats-interval")
        .arg("200ms")
        .start()
        .await;
    gateway.wait_ready(PATIENCE).await;
    let route = doc(
        "Route",
        "shop",
        "parentRefs: [{gateway: edge}]\nhostnames: [shop.example.com]\nrules:\n  - backends: [{service: orders}]",
    );
    cp.apply(&data.path, "route.yaml", &route).await;

    // Routed over mTLS: the orders sidecar tells its app who called, from
    // the certificate the gateway presented.
    let answer = wait::until("the route reaches orders", PATIENCE, || async {
        let answer = send(gateway.inbound, "shop.example.com", "/headers", &[]).await;
        (answer.status == 200).then_some(answer)
    })
    .await;
    let seen: Value = serde_json::from_str(&answer.body).unwrap();
    assert_eq!(
        seen["headers"]["x-meshlet-source"],
        serde_json::json!(["edge"]),
        "{seen}"
    );

    // Registered as a gateway; the topology's entry node, with its edge.
    let services = cp.get_json("/api/v1/services/default/edge").await;
    assert_eq!(services["instances"][0]["role"], "gateway", "{services}");
    let topology = wait::until("the gateway's edge in the topology", PATIENCE, || async {
        let topology = cp.get_json("/api/v1/dashboard/topology").await;
        let edge_seen = topology["edges"].as_array().is_some_and(|edges| {
            edges
                .iter()
                .any(|e| e["from"] == "default/edge" && e["to"] == "default/orders")
        });
        edge_seen.then_some(topology)
    })
    .await;
    let node = |name: &str| {
        topology["nodes"]
            .as_array()
            .and_then(|nodes| nodes.iter().find(|n| n["name"] == name).cloned())
            .unwrap_or_else(|| panic!("no node {name}: {topology}"))
    };
    assert_eq!(node("edge")["role"], "gateway");
    assert_eq!(node("orders")["role"], "sidecar");

    // The gateway starts the trace: its server span is the root, its
    // client span (the backend call) the parent of orders' server span.
    let trace_id = wait::until("the gateway's trace is assembled", PATIENCE, || async {
        let list = cp.get_json("/api/traces?service=edge").await;
        list.as_array()?
            .iter()
            .find(|t| t["spanCount"] == 3)
            .and_then(|t| t["traceId"].as_str().map(str::to_owned))
    })
    .await;
    let trace = cp.get_json(&format!("/api/traces/{trace_id}")).await;
    let spans = trace["spans"].as_array().expect("spans");
    let span = |service: &str, kind: &str| {
        spans
            .iter()
            .find(|s| s["service"] == service && s["kind"] == kind)
            .unwrap_or_else(|| panic!("no {kind} span of {service}: {trace:#}"))
    };
    let (root, call, backend) = (
        span("edge", "server"),
        span("edge", "client"),
        span("orders", "server"),
    );
    assert!(root.get("parentSpanId").is_none(), "{trace:#}");
    assert_eq!(call["parentSpanId"], root["spanId"], "{trace:#}");
    assert_eq!(backend["parentSpanId"], call["spanId"], "{trace:#}");
}

// ---------------------------------------------------------------- attacks

/// Hosts a client chooses, through the real gateway: upper case with a
/// trailing dot still finds its wildcard route, an empty label finds none,
/// and a redirect for an IPv6 literal `Host` keeps the brackets.
#[tokio::test]
async fn hostile_hosts_route_and_redirect_as_written_down() {
    let frontend = Upstream::start("frontend").await;
    let config = service("frontend", &[(frontend.addr, "v1")])
        + &doc(
            "Route",
            "wild",
            "parentRefs: [{gateway: edge}]\nhostnames: [\"*.wild.example\"]\nrules:\n  - backends: [{service: frontend}]",
        )
        + &doc(
            "Route",
            "secure",
            "parentRefs: [{gateway: edge}]\nrules:\n  - filters: [{requestRedirect: {scheme: https}}]",
        );
    let gateway = gateway(&config, &[]).await;
    let edge = gateway.inbound;

    let shouting = send(edge, "SHOP.WILD.EXAMPLE.", "/", &[]).await;
    assert_eq!(shouting.status, 200, "{shouting:?}");
    assert_eq!(shouting.body, "hello from frontend");

    // No label for the wildcard: the host-less redirect route answers.
    for host in [".wild.example", "x..wild.example"] {
        let empty = send(edge, host, "/", &[]).await;
        assert_eq!(empty.status, 301, "{host}: {empty:?}");
    }

    for (host, location) in [
        ("[::1]", "https://[::1]/p?q=1"),
        // The scheme changes, so the request's port is not kept.
        ("[::1]:8443", "https://[::1]/p?q=1"),
    ] {
        let moved = send(edge, host, "/p?q=1", &[]).await;
        assert_eq!(moved.status, 301, "{moved:?}");
        assert_eq!(moved.header("location"), Some(location), "{host}");
    }
}
