//! The guard in front of a small router on a loopback socket: every role
//! against every kind of route, sessions, Host names, content types.

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use axum::routing::{get, post};
use axum::{Extension, Router};
use bytes::Bytes;
use http::Method;
use http_body_util::Full;

use super::*;
use crate::auth::{Role, Tokens};

struct Fixture {
    addr: SocketAddr,
    access: Access,
    admin: String,
    viewer: String,
    sidecar: String,
    _stop: tokio::sync::watch::Sender<bool>,
}

async fn start() -> Fixture {
    let mut tokens = Tokens::new();
    let (admin, _) = tokens.create("admin", Role::Admin, None).unwrap();
    let (viewer, _) = tokens.create("alice", Role::Viewer, None).unwrap();
    let (sidecar, _) = tokens
        .create(
            "orders-sidecar",
            Role::sidecar("default", "orders").unwrap(),
            None,
        )
        .unwrap();
    let access = Access::new(
        Arc::new(RwLock::new(tokens)),
        AllowedHosts::new(["localhost", "meshlet-control-plane.meshlet.svc"]),
    );
    let whoami = |Extension(principal): Extension<Principal>| async move { principal.name };
    let app: Router = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/", get(whoami))
        .route("/api/v1/services", get(whoami))
        .route("/api/v1/apply", post(whoami))
        .route("/api/v1/instances", post(whoami))
        .route("/api/v1/tokens", get(whoami))
        .merge(session_routes(access.clone()))
        .layer(axum::middleware::from_fn_with_state(access.clone(), guard));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(crate::listener::serve(
        listener,
        None,
        app,
        crate::listener::Limits::default(),
        stopped,
    ));
    Fixture {
        addr,
        access,
        admin: admin.into_string(),
        viewer: viewer.into_string(),
        sidecar: sidecar.into_string(),
        _stop: stop,
    }
}

/// A request: method, path, headers; answers (status, reason, body).
async fn call(
    fixture: &Fixture,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String, String) {
    let authority = fixture.addr.to_string();
    let mut request = meshlet_client::request(method, &authority, path)
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap();
    // Each given header replaces the default (Host included).
    for (name, value) in headers {
        let name = http::HeaderName::from_bytes(name.as_bytes()).unwrap();
        request.headers_mut().insert(name, value.parse().unwrap());
    }
    let reply = meshlet_client::Client::new()
        .fetch(&authority, request)
        .await
        .unwrap();
    let reason = reply.header("x-meshlet-reason").unwrap_or("").to_owned();
    (reply.status.as_u16(), reason, reply.text())
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

const JSON: (&str, &str) = ("content-type", "application/json");

#[tokio::test]
async fn without_a_token_only_healthz_answers() {
    let f = start().await;
    assert_eq!(call(&f, Method::GET, "/healthz", &[], "").await.0, 200);
    for (method, path) in [
        (Method::GET, "/api/v1/services"),
        (Method::POST, "/api/v1/apply"),
        (Method::GET, "/"),
        (Method::GET, "/no/such/path"),
    ] {
        let (status, reason, _) = call(&f, method.clone(), path, &[JSON], "{}").await;
        assert_eq!(
            (status, reason.as_str()),
            (401, "unauthenticated"),
            "{method} {path}"
        );
    }
    let (status, _, body) = call(&f, Method::GET, "/", &[("accept", "text/html")], "").await;
    assert_eq!(status, 401);
    assert!(
        body.contains("login-form"),
        "a browser gets the log-in page"
    );
    let wrong = bearer("mlt_not-a-token");
    let (status, _, _) = call(
        &f,
        Method::GET,
        "/api/v1/services",
        &[("authorization", &wrong)],
        "",
    )
    .await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn each_role_reaches_what_it_may_and_is_refused_the_rest() {
    let f = start().await;
    let cases = [
        // token, method, path, expected status
        (&f.admin, Method::GET, "/api/v1/services", 200),
        (&f.admin, Method::POST, "/api/v1/apply", 200),
        (&f.admin, Method::GET, "/api/v1/tokens", 200),
        (&f.viewer, Method::GET, "/api/v1/services", 200),
        (&f.viewer, Method::GET, "/", 200),
        (&f.viewer, Method::POST, "/api/v1/apply", 403),
        (&f.viewer, Method::POST, "/api/v1/instances", 403),
        (&f.viewer, Method::GET, "/api/v1/tokens", 403),
        (&f.sidecar, Method::POST, "/api/v1/instances", 200),
        (&f.sidecar, Method::GET, "/api/v1/services", 403),
        (&f.sidecar, Method::POST, "/api/v1/apply", 403),
        (&f.sidecar, Method::GET, "/", 403),
    ];
    for (token, method, path, expected) in cases {
        let auth = bearer(token);
        let (status, reason, body) = call(
            &f,
            method.clone(),
            path,
            &[("authorization", &auth), JSON],
            "{}",
        )
        .await;
        assert_eq!(status, expected, "{method} {path}: {body}");
        if expected == 403 {
            assert_eq!(reason, "denied");
        }
    }
    // The handler sees who called: the audit actor is the token's name.
    let auth = bearer(&f.admin);
    let (_, _, body) = call(
        &f,
        Method::POST,
        "/api/v1/apply",
        &[("authorization", &auth), JSON],
        "{}",
    )
    .await;
    assert_eq!(body, "admin");
}

#[tokio::test]
async fn a_change_needs_a_content_type_no_simple_cross_site_request_can_send() {
    let f = start().await;
    let auth = bearer(&f.admin);
    for content_type in [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
    ] {
        let (status, reason, _) = call(
            &f,
            Method::POST,
            "/api/v1/apply",
            &[("authorization", &auth), ("content-type", content_type)],
            "{}",
        )
        .await;
        assert_eq!(
            (status, reason.as_str()),
            (415, "unsupported_media_type"),
            "{content_type}"
        );
    }
    let (status, _, _) = call(
        &f,
        Method::POST,
        "/api/v1/apply",
        &[
            ("authorization", &auth),
            ("content-type", "application/json; charset=utf-8"),
        ],
        "{}",
    )
    .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn a_foreign_host_name_is_refused_and_ip_literals_and_own_names_are_served() {
    let f = start().await;
    let auth = bearer(&f.viewer);
    let port = f.addr.port();
    for (host, expected) in [
        ("attacker.rebind.example".to_owned(), 421),
        (format!("attacker.rebind.example:{port}"), 421),
        (format!("127.0.0.1:{port}"), 200),
        (format!("[::1]:{port}"), 200),
        (format!("localhost:{port}"), 200),
        ("MESHLET-CONTROL-PLANE.meshlet.svc".to_owned(), 200),
    ] {
        let (status, _, _) = call(
            &f,
            Method::GET,
            "/api/v1/services",
            &[("authorization", &auth), ("host", &host)],
            "",
        )
        .await;
        assert_eq!(status, expected, "Host: {host}");
    }
    // A second Host header cannot smuggle a foreign name past the check.
    let authority = f.addr.to_string();
    let request = meshlet_client::request(Method::GET, &authority, "/api/v1/services")
        .header("authorization", &auth)
        .header("host", "attacker.rebind.example")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let reply = meshlet_client::Client::new()
        .fetch(&authority, request)
        .await
        .unwrap();
    assert_eq!(reply.status, 421);
    // Even /healthz: a rebinding page learns nothing.
    let (status, reason, _) =
        call(&f, Method::GET, "/healthz", &[("host", "evil.example")], "").await;
    assert_eq!((status, reason.as_str()), (421, "unknown_host"));
}

/// Logs in with `token`; returns the `Cookie` header value, or the status.
async fn log_in(f: &Fixture, token: &str) -> Result<String, u16> {
    let authority = f.addr.to_string();
    let request = meshlet_client::request(Method::POST, &authority, "/api/v1/session")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(format!(
            "{{\"token\": \"{token}\"}}"
        ))))
        .unwrap();
    let reply = meshlet_client::Client::new()
        .fetch(&authority, request)
        .await
        .unwrap();
    if reply.status != 204 {
        return Err(reply.status.as_u16());
    }
    let set_cookie = reply.header("set-cookie").unwrap().to_owned();
    for attribute in ["HttpOnly", "Secure", "SameSite=Strict", "Path=/"] {
        assert!(set_cookie.contains(attribute), "{set_cookie}");
    }
    Ok(set_cookie.split(';').next().unwrap().to_owned())
}

#[tokio::test]
async fn a_session_reads_but_never_changes_and_ends_with_its_token() {
    let f = start().await;
    assert_eq!(
        log_in(&f, &f.sidecar).await,
        Err(401),
        "no session for a sidecar token"
    );
    assert_eq!(log_in(&f, "mlt_wrong").await, Err(401));

    let cookie = log_in(&f, &f.admin).await.unwrap();
    let (status, _, body) = call(
        &f,
        Method::GET,
        "/api/v1/services",
        &[("cookie", &cookie)],
        "",
    )
    .await;
    assert_eq!((status, body.as_str()), (200, "admin"));
    // Even an admin's session cannot change anything: that needs the header.
    let (status, _, _) = call(
        &f,
        Method::POST,
        "/api/v1/apply",
        &[("cookie", &cookie), JSON],
        "{}",
    )
    .await;
    assert_eq!(status, 401);

    let viewer_cookie = log_in(&f, &f.viewer).await.unwrap();
    assert_eq!(
        call(&f, Method::GET, "/", &[("cookie", &viewer_cookie)], "")
            .await
            .0,
        200
    );
    f.access.tokens.write().unwrap().revoke("alice").unwrap();
    assert_eq!(
        call(&f, Method::GET, "/", &[("cookie", &viewer_cookie)], "")
            .await
            .0,
        401,
        "revoking the token ends its sessions"
    );

    // Log-out ends the admin's session.
    let (status, _, _) = call(
        &f,
        Method::DELETE,
        "/api/v1/session",
        &[("cookie", &cookie)],
        "",
    )
    .await;
    assert_eq!(status, 204);
    assert_eq!(
        call(
            &f,
            Method::GET,
            "/api/v1/services",
            &[("cookie", &cookie)],
            ""
        )
        .await
        .0,
        401
    );
}

#[test]
fn every_api_route_has_a_gate_and_only_the_public_ones_need_nothing() {
    use meshlet_api::mesh::paths;
    for path in [paths::HEALTH, routes::extra_paths::SESSION, "/ui/app.js"] {
        assert_eq!(gate(Some(path)), Gate::Public, "{path}");
    }
    for path in [
        "/",
        paths::WATCH,
        paths::INSTANCES,
        paths::APPLY,
        "/metrics",
        "/v1/traces",
        "/api/v1/some-future-route",
    ] {
        assert_ne!(gate(Some(path)), Gate::Public, "{path}");
    }
    assert_eq!(gate(None), Gate::Authenticated);
}
