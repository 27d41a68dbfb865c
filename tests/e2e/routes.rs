//! `Route`s for the callers of a service (issue 15, done-means 4 and the
//! mirror part of 5): path and header routing to a label subset, rewrite
//! and header filters the app sees, mirroring (every copy arrives; a
//! hanging mirror does not slow the caller), and the apply-time errors of
//! a bad route. Real sockets: in-process sidecars, upstream apps, the
//! control plane and the `meshctl` binary for the apply.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use meshlet_e2e::client::{self, Reply};
use meshlet_e2e::config::{doc, service};
use meshlet_e2e::inprocess::{ControlPlane, Sidecar};
use meshlet_e2e::metrics::Scrape;
use meshlet_e2e::{meshctl, wait, TempDir, Upstream};
use serde_json::Value;
use tokio::net::TcpStream;

/// orders v1 and v2 (each an app with its sidecar), a `shadow` app (a
/// mirror target, no sidecar), and a caller `frontend` whose standalone
/// sidecar knows them and the `routes`.
struct Mesh {
    v1: Upstream,
    v2: Upstream,
    shadow: Upstream,
    frontend: Sidecar,
    _sidecars: Vec<Sidecar>,
    _frontend_app: Upstream,
}

async fn mesh(routes: &str) -> Mesh {
    let v1 = Upstream::start("orders-v1").await;
    let v2 = Upstream::start("orders-v2").await;
    let shadow = Upstream::start("shadow").await;
    let v1_sidecar = Sidecar::builder("orders", v1.port()).start().await;
    let v2_sidecar = Sidecar::builder("orders", v2.port()).start().await;
    let frontend_app = Upstream::start("frontend").await;
    let frontend = caller(
        &frontend_app,
        &[(v1_sidecar.inbound, "v1"), (v2_sidecar.inbound, "v2")],
        shadow.addr,
        routes,
    )
    .await;
    Mesh {
        v1,
        v2,
        shadow,
        frontend,
        _sidecars: vec![v1_sidecar, v2_sidecar],
        _frontend_app: frontend_app,
    }
}

/// A `frontend` sidecar that knows `orders` at `endpoints`, `shadow` at
/// `shadow`, and `routes`.
async fn caller(
    app: &Upstream,
    endpoints: &[(SocketAddr, &str)],
    shadow: SocketAddr,
    routes: &str,
) -> Sidecar {
    let config = service("orders", endpoints) + &service("shadow", &[(shadow, "v1")]) + routes;
    Sidecar::builder("frontend", app.port())
        .config(&config)
        .start()
        .await
}

/// A `Route` for the callers of orders with `rules` (YAML under `rules:`).
fn orders_route(name: &str, rules: &str) -> String {
    doc(
        "Route",
        name,
        &format!("parentRefs: [{{service: orders}}]\nrules:\n{rules}"),
    )
}

/// GET `path` from the frontend app's point of view: to its outbound
/// listener, `Host: orders`, with `headers`.
async fn call(mesh: &Mesh, path: &str, headers: &[(&str, &str)]) -> Reply {
    let mut request = Request::get(path).header("host", "orders");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    client::send(
        mesh.frontend.outbound,
        request.body(Full::new(Bytes::new())).unwrap(),
    )
    .await
    .expect("an answer through the mesh")
}

#[tokio::test]
async fn a_route_for_the_callers_of_orders_sends_v2_paths_to_v2_only() {
    let mesh = mesh(&orders_route(
        "orders-v2",
        "  - matches: [{path: {type: PathPrefix, value: /api/v2}}]\n    backends: [{service: orders, labels: {version: v2}}]\n",
    ))
    .await;
    for i in 0..200 {
        let reply = call(&mesh, &format!("/api/v2/orders/{i}"), &[]).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(reply.text(), format!("resource /api/v2/orders/{i}"));
    }
    assert_eq!(mesh.v2.requests(), 200);
    assert_eq!(mesh.v1.requests(), 0, "no /api/v2 request reached v1");

    // A path no rule matches goes to orders as before: both versions.
    // `/api/v2x` is not under the prefix `/api/v2` (whole segments).
    for i in 0..40 {
        let path = if i % 2 == 0 {
            "/api/v2x/1".to_owned()
        } else {
            format!("/other/{i}")
        };
        assert_eq!(call(&mesh, &path, &[]).await.status, 200);
    }
    assert!(mesh.v1.requests() > 0, "unrouted requests reach v1 too");
    assert_eq!(mesh.v1.requests() + mesh.v2.requests(), 240);

    Scrape::wait_for(
        mesh.frontend.admin,
        "meshlet_route_requests_total",
        &[
            ("parent", "service/orders"),
            ("route", "orders-v2"),
            ("rule", "0"),
        ],
        200.0,
    )
    .await;
}

#[tokio::test]
async fn a_canary_header_goes_to_v2_and_the_rest_to_v1() {
    let mesh = mesh(&orders_route(
        "orders-canary",
        "  - matches: [{headers: [{name: x-canary, value: \"true\"}]}]\n    backends: [{service: orders, labels: {version: v2}}]\n  - backends: [{service: orders, labels: {version: v1}}]\n",
    ))
    .await;
    for i in 0..100 {
        let reply = call(&mesh, &format!("/api/{i}"), &[("x-canary", "true")]).await;
        assert_eq!(reply.status, 200);
    }
    assert_eq!((mesh.v1.requests(), mesh.v2.requests()), (0, 100));
    for i in 0..100 {
        let canary = if i % 2 == 0 { "false" } else { "TRUE" };
        let reply = call(&mesh, &format!("/api/{i}"), &[("x-canary", canary)]).await;
        assert_eq!(reply.status, 200);
        assert_eq!(call(&mesh, "/other/x", &[]).await.status, 200);
    }
    assert_eq!((mesh.v1.requests(), mesh.v2.requests()), (200, 100));
}

#[tokio::test]
async fn a_rewrite_and_header_filters_are_what_the_app_sees() {
    let mesh = mesh(&orders_route(
        "orders-rewrite",
        "  - matches: [{path: {value: /shop}}]\n    backends: [{service: orders, labels: {version: v1}}]\n    filters:\n      - requestHeaderModifier: {set: [{name: x-from, value: edge}], add: [{name: x-tag, value: routed}], remove: [x-debug]}\n      - responseHeaderModifier: {set: [{name: x-route, value: orders-rewrite}]}\n      - urlRewrite: {pathPrefix: /}\n",
    ))
    .await;
    let reply = call(
        &mesh,
        "/shop/headers?q=1",
        &[("x-from", "app"), ("x-debug", "1"), ("x-tag", "app")],
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.headers["x-route"], "orders-rewrite");
    let json: Value = serde_json::from_slice(&reply.body).unwrap();
    let headers = &json["headers"];
    assert_eq!(headers["x-from"], serde_json::json!(["edge"]), "{json}");
    assert_eq!(
        headers["x-tag"],
        serde_json::json!(["app", "routed"]),
        "{json}"
    );
    assert!(headers.get("x-debug").is_none(), "{json}");
    assert_eq!(headers["host"][0], "orders", "{json}");
    // `/shop/headers` reached the app as `/headers`: the route above
    // answers only there.
    assert_eq!(mesh.v1.requests(), 1);
    let redirect_free = call(&mesh, "/shop", &[]).await;
    assert_eq!(
        redirect_free.status,
        200,
        "/shop → / : {}",
        redirect_free.text()
    );
    assert_eq!(redirect_free.text(), "hello from orders-v1");
}

#[tokio::test]
async fn mirror_100_percent_the_mirror_receives_every_request() {
    let mesh = mesh(&orders_route(
        "orders-mirror",
        "  - backends: [{service: orders, labels: {version: v1}}]\n    filters: [{requestMirror: {service: shadow, percent: 100}}]\n",
    ))
    .await;
    for i in 0..100 {
        let reply = call(&mesh, &format!("/api/{i}"), &[]).await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.text(), format!("resource /api/{i}"));
    }
    assert_eq!(mesh.v1.requests(), 100);
    wait::until(
        "every copy at the mirror",
        Duration::from_secs(10),
        || async { (mesh.shadow.requests() == 100).then_some(()) },
    )
    .await;
    Scrape::wait_for(
        mesh.frontend.admin,
        "meshlet_mirror_requests_total",
        &[("service", "shadow"), ("outcome", "sent")],
        100.0,
    )
    .await;
}

/// A POST whose body came whole with its head is mirrored with its body
/// (held in full), and the caller's request bytes count it once: the
/// copy's bytes are not the caller's.
#[tokio::test]
async fn a_mirrored_body_reaches_the_mirror_and_is_counted_once() {
    let mesh = mesh(&orders_route(
        "orders-mirror",
        "  - backends: [{service: orders, labels: {version: v1}}]\n    filters: [{requestMirror: {service: shadow, percent: 100}}]\n",
    ))
    .await;
    let mut conn = meshlet_e2e::client::RawConnection::open(mesh.frontend.outbound).await;
    let body = "m".repeat(1000);
    for _ in 0..10 {
        let post = format!(
            "POST /upload HTTP/1.1\r\nHost: orders\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        conn.send(post.as_bytes()).await;
        let reply = conn.read_response(Duration::from_secs(10)).await;
        assert!(reply.ends_with("\r\n\r\n1000"), "{reply}");
    }
    wait::until(
        "every copy at the mirror",
        Duration::from_secs(10),
        || async { (mesh.shadow.requests() == 10).then_some(()) },
    )
    .await;
    let scrape = Scrape::of(mesh.frontend.admin).await;
    assert_eq!(
        scrape.sum("request_bytes_total", &[("destination", "orders")]),
        10_000.0,
        "the caller's bytes, once"
    );
}

/// A keep-alive HTTP/1.1 connection to a sidecar's outbound listener.
struct KeepAlive {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

impl KeepAlive {
    async fn open(addr: SocketAddr) -> KeepAlive {
        let stream = TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(connection);
        KeepAlive { sender }
    }

    /// One request's latency (the whole answer read).
    async fn time(&mut self, path: &str) -> Duration {
        let request = Request::get(path)
            .header("host", "orders")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let started = Instant::now();
        self.sender.ready().await.unwrap();
        let response = self.sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), 200);
        response.into_body().collect().await.unwrap();
        started.elapsed()
    }
}

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    samples[((samples.len() as f64 * p).ceil() as usize).clamp(1, samples.len()) - 1]
}

/// The same route with and without a mirror to a service that never
/// answers, measured side by side in one run (alternating requests, one
/// keep-alive connection each): the caller's p50 and p99 stay within
/// noise of the route without one, and no request waits for its copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_mirror_does_not_slow_the_caller() {
    const REQUESTS: usize = 1000;
    let v1 = Upstream::start("orders-v1").await;
    let hanging = Upstream::start("hanging").await;
    hanging.set_delay(Duration::from_secs(3600));
    let v1_sidecar = Sidecar::builder("orders", v1.port()).start().await;
    let endpoints = [(v1_sidecar.inbound, "v1")];
    let rule = "  - backends: [{service: orders}]\n";
    let mirrored =
        format!("{rule}    filters: [{{requestMirror: {{service: shadow, percent: 100}}}}]\n");
    let (app_a, app_b) = (Upstream::start("a").await, Upstream::start("b").await);
    let with_mirror = caller(
        &app_a,
        &endpoints,
        hanging.addr,
        &orders_route("r", &mirrored),
    )
    .await;
    let without = caller(&app_b, &endpoints, hanging.addr, &orders_route("r", rule)).await;
    let (mut a, mut b) = (
        KeepAlive::open(with_mirror.outbound).await,
        KeepAlive::open(without.outbound).await,
    );
    // Warm-up: connections to the upstreams on both sides.
    for _ in 0..50 {
        a.time("/").await;
        b.time("/").await;
    }
    let (mut with_times, mut without_times) = (Vec::new(), Vec::new());
    for i in 0..REQUESTS {
        if i % 2 == 0 {
            with_times.push(a.time("/").await);
            without_times.push(b.time("/").await);
        } else {
            without_times.push(b.time("/").await);
            with_times.push(a.time("/").await);
        }
    }
    let p50 = (
        percentile(&mut with_times, 0.50),
        percentile(&mut without_times, 0.50),
    );
    let p99 = (
        percentile(&mut with_times, 0.99),
        percentile(&mut without_times, 0.99),
    );
    let scrape = Scrape::of(with_mirror.admin).await;
    let skipped = scrape.sum(
        "meshlet_mirror_requests_total",
        &[("service", "shadow"), ("outcome", "skipped")],
    );
    println!(
        "hanging mirror: p50 {:?} vs {:?} without; p99 {:?} vs {:?} without; \
         copies at the mirror {}, skipped (64 in flight) {skipped}",
        p50.0,
        p50.1,
        p99.0,
        p99.1,
        hanging.requests()
    );
    assert!(
        hanging.requests() > 0,
        "copies did reach the hanging mirror"
    );
    assert!(skipped > 0.0, "beyond 64 in flight, copies are skipped");
    // A caller that waited for its copy would wait the hour the mirror
    // hangs; one slowed by the copies
    // in flight would move the whole distribution. Each p99 is the 10th
    // slowest of 1000 on a shared machine, so their gap alone is noise
    // of a few ms: the bound is a ratio with a floor, and the worst
    // request must stay far from a hang.
    assert!(
        p99.0 <= p99.1 * 2 + Duration::from_millis(10),
        "p99 with a hanging mirror {:?}, without {:?}",
        p99.0,
        p99.1
    );
    let worst = with_times.iter().max().copied().unwrap_or_default();
    assert!(
        worst < Duration::from_secs(1),
        "slowest request with a hanging mirror {worst:?}"
    );
    assert!(
        p50.0 <= p50.1 * 2 + Duration::from_millis(1),
        "p50 with a hanging mirror {:?}, without {:?}",
        p50.0,
        p50.1
    );
}

#[tokio::test]
async fn a_bad_regex_or_an_unknown_field_is_refused_at_apply_with_line_and_column() {
    let dir = TempDir::new();
    let cp = ControlPlane::start(&dir.path.join("data"), &[]).await;
    let good = "apiVersion: meshlet.dev/v1alpha1
kind: Route
metadata: {name: shop}
spec:
  parentRefs: [{gateway: edge}]
  rules:
    - matches:
        - path: {type: RegularExpression, value: \"/v[0-9]+/.*\"}
      backends: [{service: orders}]
";
    let cases = [
        (
            good.replace("/v[0-9]+/.*", "/v[0-9+/.*"),
            "line 8, column",
            "field `spec.rules[0].matches[0].path`: invalid regular expression",
        ),
        (
            good.replace("      backends:", "      backend:"),
            "line 9, column",
            "field `spec.rules[0].backend`: unknown field `backend`",
        ),
    ];
    for (i, (yaml, position, message)) in cases.iter().enumerate() {
        let file = dir.path.join(format!("bad-{i}.yaml"));
        std::fs::write(&file, yaml).unwrap();
        let out = meshctl(&cp, &["apply", "-f", file.to_str().unwrap()]).await;
        assert!(!out.success(), "{out:?}");
        assert!(out.stderr.contains(position), "{}", out.stderr);
        assert!(out.stderr.contains(message), "{}", out.stderr);
    }
    // The good one is accepted, with a warning for the unknown gateway and
    // backend on stderr.
    let file = dir.path.join("good.yaml");
    std::fs::write(&file, good).unwrap();
    let out = meshctl(&cp, &["apply", "-f", file.to_str().unwrap()]).await;
    assert!(out.success(), "{out:?}");
    assert!(out.stdout.contains("route/shop created"), "{}", out.stdout);
    assert!(
        out.stderr
            .contains("warning: route/shop: gateway edge names no known service yet"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr
            .contains("warning: route/shop: backend orders names no known service yet"),
        "{}",
        out.stderr
    );
}
