//! Issue 13's "Done means" 1 and 2 at the API level: every route but the
//! public ones needs a token; roles; a sidecar token is bound to its
//! service and its own instances; the audit actor is the token; the
//! bootstrap files are private and survive a restart.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::ControlPlane;
use http::{Method, StatusCode};
use meshlet_api::access::{paths as access_paths, TokenList};
use meshlet_api::mesh::{paths, ApplyFile, ApplyRequest, Heartbeat, Registration, RevisionRecord};
use meshlet_client::Client;

/// Every route of the API with a request that reaches its handler (method,
/// path, whether it changes state). Public routes are listed apart.
const ROUTES: &[(&str, &str, bool)] = &[
    ("POST", "/api/v1/instances", true),
    ("DELETE", "/api/v1/instances/x", true),
    ("PUT", "/api/v1/instances/x/heartbeat", true),
    ("POST", "/api/v1/instances/x/stats", true),
    ("POST", "/api/v1/certificates", true),
    ("GET", "/api/v1/ca", false),
    ("POST", "/api/v1/ca/rotate", true),
    ("GET", "/api/v1/dashboard/services", false),
    ("GET", "/api/v1/dashboard/topology", false),
    ("GET", "/api/v1/dashboard/policies", false),
    ("GET", "/api/v1/dashboard/series", false),
    ("GET", "/api/v1/dashboard/events", false),
    ("GET", "/api/v1/watch", false),
    ("GET", "/api/v1/services", false),
    ("GET", "/api/v1/services/default/orders", false),
    ("GET", "/api/v1/resources", false),
    ("POST", "/api/v1/apply", true),
    ("POST", "/api/v1/delete", true),
    ("POST", "/api/v1/diff", false),
    ("POST", "/api/v1/rollback", true),
    ("GET", "/api/v1/resources/info", false),
    ("GET", "/api/v1/revisions", false),
    ("POST", "/v1/traces", true),
    ("GET", "/api/traces", false),
    ("GET", "/api/traces/0123456789abcdef0123456789abcdef", false),
    ("GET", "/metrics", false),
    ("GET", "/", false),
    ("GET", "/api/v1/tokens", false),
    ("POST", "/api/v1/tokens", true),
    ("DELETE", "/api/v1/tokens/x", true),
    ("GET", "/no/such/path", false),
];

fn method(name: &str) -> Method {
    Method::from_bytes(name.as_bytes()).unwrap()
}

async fn status(
    cp: &ControlPlane,
    client: &Client,
    m: &str,
    path: &str,
    body: &[u8],
) -> StatusCode {
    // Only the head of the streams (watch, dashboard events).
    if path == paths::WATCH || path == paths::DASHBOARD_EVENTS {
        let authority = cp.addr.to_string();
        let request = meshlet_client::request(method(m), &authority, path)
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        let sent = client.send(&authority, request).await;
        return sent.unwrap_or_else(|e| panic!("{m} {path}: {e}")).status();
    }
    cp.call_with(client, method(m), path, "application/json", body.to_vec())
        .await
        .unwrap()
        .0
}

fn registration(id: &str, service: &str) -> Vec<u8> {
    serde_json::to_vec(&Registration {
        id: id.into(),
        service: service.into(),
        namespace: "default".into(),
        address: ([127, 0, 0, 1], 9000).into(),
        labels: Default::default(),
        healthy: true,
        app_protocol: None,
        role: meshlet_api::mesh::InstanceRole::Sidecar,
    })
    .unwrap()
}

#[tokio::test]
async fn without_a_token_only_the_public_routes_answer() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(dir.path(), &[]).await;
    let anonymous = cp.anonymous();
    for (m, path, _) in ROUTES {
        let got = status(&cp, &anonymous, m, path, b"{}").await;
        assert_eq!(got, StatusCode::UNAUTHORIZED, "{m} {path}");
    }
    let wrong = cp.client_with("mlt_not-a-token");
    for (m, path, _) in ROUTES {
        assert_eq!(
            status(&cp, &wrong, m, path, b"{}").await,
            StatusCode::UNAUTHORIZED,
            "{m} {path}"
        );
    }
    assert_eq!(
        status(&cp, &anonymous, "GET", paths::HEALTH, b"").await,
        StatusCode::OK
    );
    assert_eq!(
        status(&cp, &anonymous, "GET", "/ui/app.js", b"").await,
        StatusCode::OK
    );
}

#[tokio::test]
async fn a_viewer_reads_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(dir.path(), &[]).await;
    let viewer = cp.client_with(&cp.create_token("ops-viewer", "viewer", None).await);
    for (m, path, changes) in ROUTES {
        let got = status(&cp, &viewer, m, path, b"{}").await;
        if *changes || path.starts_with("/api/v1/tokens") {
            assert_eq!(got, StatusCode::FORBIDDEN, "{m} {path}");
        } else {
            assert_ne!(got, StatusCode::UNAUTHORIZED, "{m} {path}");
            assert_ne!(got, StatusCode::FORBIDDEN, "{m} {path}");
        }
    }
    for path in [
        paths::SERVICES,
        paths::RESOURCES,
        paths::REVISIONS,
        "/api/traces",
        "/metrics",
    ] {
        assert_eq!(
            status(&cp, &viewer, "GET", path, b"").await,
            StatusCode::OK,
            "{path}"
        );
    }
}

#[tokio::test]
async fn a_sidecar_token_is_bound_to_its_service_and_its_instances() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(dir.path(), &[]).await;
    let orders = cp.client_with(
        &cp.create_token("sidecar-default-orders", "sidecar", Some("orders"))
            .await,
    );
    let orders2 = cp.client_with(
        &cp.create_token("orders-other", "sidecar", Some("orders"))
            .await,
    );
    let post = |client, body: Vec<u8>| {
        let cp = &cp;
        async move { status(cp, client, "POST", paths::INSTANCES, &body).await }
    };
    assert_eq!(
        post(&orders, registration("frontend-1", "frontend")).await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        post(&orders, registration("orders-1", "orders")).await,
        StatusCode::OK
    );
    // Re-registering its own id is fine; another credential may not take it over.
    assert_eq!(
        post(&orders, registration("orders-1", "orders")).await,
        StatusCode::OK
    );
    assert_eq!(
        post(&orders2, registration("orders-1", "orders")).await,
        StatusCode::CONFLICT
    );
    // Not even an admin takes over a live registration.
    assert_eq!(
        post(&cp.client, registration("orders-1", "orders")).await,
        StatusCode::CONFLICT
    );
    let beat = serde_json::to_vec(&Heartbeat::health(true)).unwrap();
    assert_eq!(
        status(&cp, &orders2, "PUT", &paths::heartbeat("orders-1"), &beat).await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        status(&cp, &orders2, "DELETE", &paths::instance("orders-1"), b"").await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        status(&cp, &orders, "PUT", &paths::heartbeat("orders-1"), &beat).await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        status(&cp, &orders, "PUT", &paths::heartbeat("nope"), &beat).await,
        StatusCode::NOT_FOUND
    );
    // Writes of resources and reads of tokens are not a sidecar's.
    assert_eq!(
        status(&cp, &orders, "POST", paths::APPLY, b"{\"files\":[]}").await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        status(&cp, &orders, "GET", access_paths::TOKENS, b"").await,
        StatusCode::FORBIDDEN
    );
    // Deregistering releases the id.
    assert_eq!(
        status(&cp, &orders, "DELETE", &paths::instance("orders-1"), b"").await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        post(&orders2, registration("orders-1", "orders")).await,
        StatusCode::OK
    );
}

#[tokio::test]
async fn names_that_are_not_dns_labels_are_refused_as_services() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(dir.path(), &[]).await;
    for service in ["example.com", "127.0.0.2"] {
        let (got, body) = cp
            .call(
                Method::POST,
                paths::INSTANCES,
                Some(registration("x-1", service)),
            )
            .await
            .unwrap();
        assert_eq!(got, StatusCode::BAD_REQUEST, "{service}");
        assert!(
            String::from_utf8_lossy(&body).contains("service"),
            "{service}"
        );
    }
}

#[tokio::test]
async fn the_history_actor_is_the_token_name_whatever_the_client_says() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(dir.path(), &[]).await;
    let ops = cp.client_with(&cp.create_token("ops", "admin", None).await);
    let body = serde_json::to_vec(&ApplyRequest {
        files: vec![ApplyFile {
            name: "p.yaml".into(),
            text: "apiVersion: meshlet.dev/v1alpha1\nkind: HealthCheckPolicy\nmetadata: {name: p}\nspec: {targetRef: {service: orders}}\n".into(),
        }],
        actor: Some("somebody-else@spoofed".into()),
    })
    .unwrap();
    assert_eq!(
        status(&cp, &ops, "POST", paths::APPLY, &body).await,
        StatusCode::OK
    );
    let (_, history): (_, Vec<RevisionRecord>) = cp.json(Method::GET, paths::REVISIONS, None).await;
    assert_eq!(history[0].actor, "ops");
}

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[tokio::test]
async fn bootstrap_files_are_private_and_a_restart_keeps_them() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let cp = ControlPlane::start(&data, &[]).await;
    assert_eq!(mode(&data), 0o700);
    assert_eq!(mode(&data.join("admin.token")), 0o600);
    assert_eq!(mode(&data.join("ca.key")), 0o600);
    assert_eq!(mode(&data.join("meshlet.redb")), 0o600);
    assert_eq!(mode(&data.join("ca.crt")), 0o644);
    let viewer = cp.create_token("keeps", "viewer", None).await;
    let admin = cp.admin_token();
    let ca = std::fs::read(data.join("ca.crt")).unwrap();
    drop(cp);

    let cp = ControlPlane::start(&data, &[]).await;
    assert_eq!(cp.admin_token(), admin);
    assert_eq!(std::fs::read(data.join("ca.crt")).unwrap(), ca);
    let viewer = cp.client_with(&viewer);
    assert_eq!(
        status(&cp, &viewer, "GET", paths::SERVICES, b"").await,
        StatusCode::OK
    );
    let (_, list): (_, TokenList) = cp.json(Method::GET, access_paths::TOKENS, None).await;
    let names: Vec<&str> = list.tokens.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["admin", "keeps"]);
    // Revoking ends the token at once, and is kept too.
    assert_eq!(
        cp.call(Method::DELETE, &access_paths::token("keeps"), None)
            .await
            .unwrap()
            .0,
        StatusCode::OK
    );
    assert_eq!(
        status(&cp, &viewer, "GET", paths::SERVICES, b"").await,
        StatusCode::UNAUTHORIZED
    );
}
