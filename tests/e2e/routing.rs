//! Outbound routing in all three styles, passthrough, and the errors the
//! mesh answers with when it cannot route (issue 2, points 1 and 6).

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use meshlet_e2e::inprocess::Sidecar;
use meshlet_e2e::process::free_port;
use meshlet_e2e::{client, Upstream};
use serde_json::Value;

fn request(uri: &str) -> http::request::Builder {
    Request::get(uri)
}

fn empty() -> Full<Bytes> {
    Full::new(Bytes::new())
}

fn empty_body() -> Full<Bytes> {
    empty()
}

fn service_yaml(name: &str, addrs: &[String]) -> String {
    let endpoints: Vec<String> = addrs
        .iter()
        .map(|a| format!("    - address: {a}\n"))
        .collect();
    format!(
        "apiVersion: meshlet.dev/v1alpha1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  endpoints:{}\n{}---\n",
        if addrs.is_empty() { " []" } else { "" },
        endpoints.concat()
    )
}

/// Two services, each with its own sidecar: frontend calls orders.
struct TwoServices {
    orders_app: Upstream,
    orders: Sidecar,
    frontend: Sidecar,
    _frontend_app: Upstream,
}

async fn two_services(extra_config: &str, frontend_args: &[&str]) -> TwoServices {
    let orders_app = Upstream::start("orders").await;
    let orders = Sidecar::builder("orders", orders_app.port()).start().await;
    let frontend_app = Upstream::start("frontend").await;
    let config = service_yaml("orders", &[orders.inbound.to_string()]) + extra_config;
    let mut builder = Sidecar::builder("frontend", frontend_app.port()).config(&config);
    for arg in frontend_args {
        builder = builder.arg(arg);
    }
    let frontend = builder.start().await;
    TwoServices {
        orders_app,
        orders,
        frontend,
        _frontend_app: frontend_app,
    }
}

fn forwarded_for(reply: &client::Reply) -> Option<String> {
    let json: Value = serde_json::from_slice(&reply.body).expect("json from /headers");
    json["headers"]["x-forwarded-for"][0]
        .as_str()
        .map(str::to_owned)
}

#[tokio::test]
async fn a_calls_b_by_name_in_all_three_outbound_styles() {
    let mesh = two_services("", &[]).await;
    let outbound = mesh.frontend.outbound;

    // (a) HTTP proxy style: absolute-form URI naming the service.
    let absolute = client::send(
        outbound,
        request("http://orders/headers").body(empty()).unwrap(),
    )
    .await
    .unwrap();
    // (b) Plain request whose Host names the service.
    let by_host = client::send(
        outbound,
        request("/headers")
            .header("host", "orders")
            .body(empty())
            .unwrap(),
    )
    .await
    .unwrap();
    for reply in [&absolute, &by_host] {
        assert_eq!(reply.status, 200, "{}", reply.text());
        let json: Value = serde_json::from_slice(&reply.body).unwrap();
        assert_eq!(json["upstream"], "orders");
        assert_eq!(json["headers"]["host"][0], "orders", "Host is preserved");
        // Only orders' inbound listener adds x-forwarded-for: the call went through it.
        assert_eq!(forwarded_for(reply).as_deref(), Some("127.0.0.1"));
        assert!(json["headers"].get("proxy-connection").is_none());
    }
    assert_eq!(mesh.orders_app.requests(), 2);

    // (c) Unknown destination (an IP:port not in the registry) passes
    // through unchanged: straight to orders' app, not via its sidecar.
    let direct = format!("http://{}/headers", mesh.orders_app.addr);
    let passthrough = client::send(outbound, request(&direct).body(empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(passthrough.status, 200);
    assert_eq!(
        forwarded_for(&passthrough),
        None,
        "passthrough must not go through orders' inbound"
    );
    assert_eq!(mesh.orders_app.requests(), 3);

    // Both sidecars counted what they proxied.
    let metrics = client::get(mesh.orders.admin, "/metrics")
        .await
        .unwrap()
        .text();
    assert!(
        metrics.contains(r#"request_total{destination="orders",direction="inbound",endpoint="/",method="GET",service="orders",status_code="200"} 2"#),
        "{metrics}"
    );
    let metrics = client::get(mesh.frontend.admin, "/metrics")
        .await
        .unwrap()
        .text();
    assert!(
        metrics.contains(r#"request_total{destination="orders",direction="outbound",endpoint="/",method="GET",service="frontend",status_code="200"} 2"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"request_total{destination="passthrough",direction="outbound",endpoint="/",method="GET",service="frontend",status_code="200"} 1"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn qualified_service_names_route_too() {
    let mesh = two_services("", &[]).await;
    for host in ["orders.default", "orders.default.svc.cluster.local"] {
        let uri = format!("http://{host}/");
        let reply = client::send(mesh.frontend.outbound, request(&uri).body(empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(
            (reply.status.as_u16(), reply.header("x-upstream")),
            (200, Some("orders")),
            "{host}"
        );
    }
}

#[tokio::test]
async fn unroutable_requests_get_a_status_and_a_reason() {
    let dead = format!("127.0.0.1:{}", free_port());
    // `gone` has an endpoint where nothing listens; `empty` has none.
    let config = service_yaml("gone", &[dead]) + &service_yaml("empty", &[]);
    let mesh = two_services(&config, &["--upstream-timeout", "300ms"]).await;
    let outbound = mesh.frontend.outbound;
    let call = |uri: &str| client::send(outbound, request(uri).body(empty()).unwrap());

    let unknown = call("http://no-such-service.invalid/").await.unwrap();
    assert_eq!(unknown.status, 503);
    assert_eq!(unknown.header("x-meshlet-reason"), Some("unknown_service"));
    assert!(
        unknown.text().contains("no-such-service.invalid"),
        "{}",
        unknown.text()
    );

    let empty = call("http://empty/").await.unwrap();
    assert_eq!(empty.status, 503);
    assert_eq!(
        empty.header("x-meshlet-reason"),
        Some("no_healthy_endpoint")
    );
    let empty_h2 = client::send_h2(
        outbound,
        request("http://empty/").body(empty_body()).unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(empty_h2.status, 503, "h2 too");

    let down = call("http://gone/").await.unwrap();
    assert_eq!(down.status, 502);
    assert_eq!(
        down.header("x-meshlet-reason"),
        Some("upstream_connect_failed")
    );
    assert!(down.text().contains("cannot connect"), "{}", down.text());

    let slow = call("http://orders/slow?ms=3000").await.unwrap();
    assert_eq!(slow.status, 504);
    assert_eq!(slow.header("x-meshlet-reason"), Some("upstream_timeout"));

    let looping = call(&format!("http://{outbound}/")).await.unwrap();
    assert_eq!(looping.status, 502);
    assert_eq!(looping.header("x-meshlet-reason"), Some("loop_detected"));

    // The app behind an inbound listener is down: 502 as well.
    mesh.orders_app.kill();
    let app_down = client::get(mesh.orders.inbound, "/").await.unwrap();
    assert_eq!(app_down.status, 502);
    assert_eq!(
        app_down.header("x-meshlet-reason"),
        Some("upstream_connect_failed")
    );

    let metrics = client::get(mesh.frontend.admin, "/metrics")
        .await
        .unwrap()
        .text();
    assert!(
        metrics.contains(r#"reason="unknown_service"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"reason="upstream_timeout"} 1"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn connect_answers_with_a_tunnel() {
    let mesh = two_services("", &[]).await;
    let target = mesh.orders_app.addr;
    let request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let (text, _) = client::raw(
        mesh.frontend.outbound,
        request.as_bytes(),
        Duration::from_secs(5),
    )
    .await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("hello from orders"), "{text}");
    // The inbound listener does not tunnel.
    let (text, _) = client::raw(
        mesh.orders.inbound,
        request.as_bytes(),
        Duration::from_secs(5),
    )
    .await;
    assert!(text.starts_with("HTTP/1.1 405"), "{text}");
    assert!(
        text.contains("x-meshlet-reason: method_not_allowed"),
        "{text}"
    );
}
