//! Workload certificates and CA rotation (issue 14) against a whole
//! control plane: who gets a certificate and for which identity, what
//! `describe` and the watch stream say of it, the three phases of a
//! rotation and what a restart keeps. Harness in `common/`.

mod common;

use std::time::{Duration, Instant};

use common::{ControlPlane, DEADLINE};
use http::{Method, StatusCode};
use meshlet_api::access::CA_CERT_FILE;
use meshlet_api::mesh::{
    paths, CaStatus, CertificateReply, CertificateRequest, Registration, ServiceDetail,
};
use meshlet_client::Client;

/// A CSR for a fresh P-256 key that asks for a name it will not get.
fn csr() -> String {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params =
        rcgen::CertificateParams::new(vec!["spiffe-wannabe.example".to_owned()]).unwrap();
    params.subject_alt_names.push(rcgen::SanType::URI(
        "spiffe://evil/ns/default/sa/payments".try_into().unwrap(),
    ));
    params.serialize_request(&key).unwrap().pem().unwrap()
}

fn request(instance_id: &str, csr: String) -> Vec<u8> {
    serde_json::to_vec(&CertificateRequest {
        instance_id: instance_id.into(),
        csr,
    })
    .unwrap()
}

async fn post(
    cp: &ControlPlane,
    client: &Client,
    path: &str,
    body: Vec<u8>,
) -> (StatusCode, String) {
    let (status, body) = cp
        .call_with(client, Method::POST, path, "application/json", body)
        .await
        .unwrap();
    (status, String::from_utf8_lossy(&body).into_owned())
}

async fn certificate(cp: &ControlPlane, client: &Client, id: &str) -> CertificateReply {
    let (status, body) = post(cp, client, paths::CERTIFICATES, request(id, csr())).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    serde_json::from_str(&body).unwrap()
}

fn uri_sans(pem: &str) -> Vec<String> {
    let der = rustls_pemfile_der(pem);
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    let san = cert.subject_alternative_name().unwrap().unwrap();
    san.value
        .general_names
        .iter()
        .map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) => format!("URI:{u}"),
            other => format!("{other:?}"),
        })
        .collect()
}

fn rustls_pemfile_der(pem: &str) -> Vec<u8> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
    pem.contents
}

/// The roots of a PEM bundle, as DER, in order.
fn bundle(pem: &str) -> Vec<Vec<u8>> {
    x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes())
        .map(|p| p.unwrap().contents)
        .collect()
}

fn register_body(id: &str, service: &str) -> Vec<u8> {
    serde_json::to_vec(&Registration {
        id: id.into(),
        service: service.into(),
        namespace: "default".into(),
        address: ([127, 0, 0, 1], 9000).into(),
        labels: Default::default(),
        healthy: true,
        app_protocol: Some(meshlet_api::mesh::AppProtocol::Http1),
        role: meshlet_api::mesh::InstanceRole::Sidecar,
    })
    .unwrap()
}

async fn ca_status(cp: &ControlPlane) -> CaStatus {
    let (status, ca) = cp.json::<CaStatus>(Method::GET, paths::CA, None).await;
    assert_eq!(status, StatusCode::OK);
    ca
}

/// Polls the CA status until `done`, within the deadline.
async fn ca_until(cp: &ControlPlane, what: &str, done: impl Fn(&CaStatus) -> bool) -> CaStatus {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let ca = ca_status(cp).await;
        if done(&ca) {
            return ca;
        }
        assert!(Instant::now() < deadline, "{what}: {ca:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_sidecar_gets_a_leaf_for_its_token_identity_and_describe_shows_it() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(dir.path(), &["--workload-cert-ttl", "1h"]).await;
    let orders = cp.client_with(
        &cp.create_token("orders-sidecar", "sidecar", Some("orders"))
            .await,
    );

    // Asked before registering, as sidecars do at start.
    let reply = certificate(&cp, &orders, "orders-1").await;
    assert_eq!(
        reply.identity,
        "spiffe://meshlet.local/ns/default/sa/orders"
    );
    // Only the identity the token is bound to, whatever the CSR asked for.
    assert_eq!(
        uri_sans(&reply.certificate),
        ["URI:spiffe://meshlet.local/ns/default/sa/orders"]
    );
    let lifetime = reply.not_after_ms - reply.not_before_ms;
    assert_eq!(
        lifetime,
        3_600_000 + 300_000,
        "1h plus the 5 minutes backdated"
    );
    let ca_crt = std::fs::read_to_string(dir.path().join(CA_CERT_FILE)).unwrap();
    assert_eq!(bundle(&reply.trust_roots), bundle(&ca_crt));
    assert!(!reply.serial.is_empty() && reply.serial.bytes().all(|b| b.is_ascii_hexdigit()));

    // Registered: the watch and describe carry the identity, describe the leaf.
    let (status, body) = post(
        &cp,
        &orders,
        paths::INSTANCES,
        register_body("orders-1", "orders"),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let mut watch = cp.watch(None).await;
    watch.next().await.unwrap();
    assert_eq!(bundle(&watch.state.trust_roots), bundle(&ca_crt));
    let endpoint = &watch.state.services[0].endpoints[0];
    assert_eq!(endpoint.identity.as_deref(), Some(reply.identity.as_str()));

    let (status, detail) = cp
        .json::<ServiceDetail>(Method::GET, "/api/v1/services/default/orders", None)
        .await;
    assert_eq!(status, StatusCode::OK);
    let instance = &detail.instances[0];
    assert_eq!(instance.identity.as_deref(), Some(reply.identity.as_str()));
    assert_eq!(
        instance.app_protocol,
        Some(meshlet_api::mesh::AppProtocol::Http1)
    );
    let leaf = instance
        .certificate
        .as_ref()
        .expect("the leaf is remembered");
    assert_eq!(leaf.serial, reply.serial);
    assert_eq!(leaf.not_after_ms, reply.not_after_ms);
    let ca = ca_status(&cp).await;
    assert_eq!(ca.roots.len(), 1);
    assert_eq!(leaf.root, ca.roots[0].fingerprint);
    assert_eq!(ca.roots[0].live_leaves, 1);
    assert!(ca.roots[0].signing);
    assert_eq!(ca.workload_cert_ttl_ms, 3_600_000);
    assert_eq!(ca.rotation, None);

    // A renewal replaces the remembered leaf.
    let renewed = certificate(&cp, &orders, "orders-1").await;
    assert_ne!(renewed.serial, reply.serial);
    assert_eq!(ca_status(&cp).await.roots[0].live_leaves, 1);
    let (_, metrics) = cp.call(Method::GET, "/metrics", None).await.unwrap();
    let metrics = String::from_utf8_lossy(&metrics);
    for line in [
        "meshlet_workload_certificates_issued_total 2",
        "meshlet_ca_roots 1",
        "meshlet_ca_rotation_phase 0",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line}: {metrics}");
    }

    // meshctl describe shows identity, serial and expiry; ca status the root.
    let (code, out, err) = cp.meshctl(&["describe", "service", "orders"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("spiffe://meshlet.local/ns/default/sa/orders"),
        "{out}"
    );
    assert!(out.contains(&renewed.serial), "{out}");
    assert!(
        out.contains("expires in 59m") || out.contains("expires in 1h"),
        "{out}"
    );
    let (code, out, err) = cp.meshctl(&["ca", "status"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&ca.roots[0].fingerprint[..16]), "{out}");
    assert!(out.contains("yes"), "signing column: {out}");
}

#[tokio::test]
async fn certificates_are_refused_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(dir.path(), &[]).await;
    let orders = cp.client_with(&cp.create_token("orders-a", "sidecar", Some("orders")).await);
    let orders_b = cp.client_with(&cp.create_token("orders-b", "sidecar", Some("orders")).await);
    let viewer = cp.client_with(&cp.create_token("ro", "viewer", None).await);
    let anonymous = cp.anonymous();
    let ok = || request("orders-1", csr());

    let cases: Vec<(&str, &Client, Vec<u8>, StatusCode, &str)> = vec![
        ("no token", &anonymous, ok(), StatusCode::UNAUTHORIZED, ""),
        ("viewer", &viewer, ok(), StatusCode::FORBIDDEN, "viewer"),
        (
            "admin",
            &cp.client,
            ok(),
            StatusCode::FORBIDDEN,
            "only sidecar tokens",
        ),
        (
            "bad id",
            &orders,
            request("a/b", csr()),
            StatusCode::BAD_REQUEST,
            "invalid instanceId",
        ),
        (
            "bad csr",
            &orders,
            request(
                "orders-1",
                "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
                    .into(),
            ),
            StatusCode::BAD_REQUEST,
            "certificate signing request",
        ),
        (
            "huge csr",
            &orders,
            request("orders-1", "A".repeat(17 * 1024)),
            StatusCode::PAYLOAD_TOO_LARGE,
            "at most",
        ),
        (
            "unknown field",
            &orders,
            br#"{"instanceId":"x","csr":"y","identity":"spiffe://x"}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            "identity",
        ),
    ];
    for (what, client, body, want, reason) in cases {
        let (status, text) = post(&cp, client, paths::CERTIFICATES, body).await;
        assert_eq!(status, want, "{what}: {text}");
        assert!(text.contains(reason), "{what}: {text}");
    }

    // An instance id registered by another credential is not its to certify.
    let (status, body) = post(
        &cp,
        &orders,
        paths::INSTANCES,
        register_body("orders-1", "orders"),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, text) = post(&cp, &orders_b, paths::CERTIFICATES, ok()).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{text}");
    assert!(text.contains("another credential"), "{text}");
    certificate(&cp, &orders, "orders-1").await;

    // Rotation is an admin's; viewers may read the CA.
    let (status, _) = post(&cp, &viewer, paths::CA_ROTATE, Vec::new()).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = post(&cp, &orders, paths::CA_ROTATE, Vec::new()).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = cp
        .call_with(
            &viewer,
            Method::GET,
            paths::CA,
            "application/json",
            Vec::new(),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    let (status, _) = cp
        .call_with(
            &orders,
            Method::GET,
            paths::CA,
            "application/json",
            Vec::new(),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn a_rotation_adds_switches_and_retires_roots_and_a_restart_keeps_them() {
    let dir = tempfile::tempdir().unwrap();
    let flags = ["--ca-rotation-grace", "300ms"];
    let cp = ControlPlane::start(dir.path(), &flags).await;
    let orders = cp.client_with(
        &cp.create_token("orders-sidecar", "sidecar", Some("orders"))
            .await,
    );
    let first = certificate(&cp, &orders, "orders-1").await;
    let (status, body) = post(
        &cp,
        &orders,
        paths::INSTANCES,
        register_body("orders-1", "orders"),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let old = ca_status(&cp).await.roots[0].fingerprint.clone();
    let mut watch = cp.watch(None).await;
    watch.next().await.unwrap();
    let old_der = bundle(&watch.state.trust_roots);
    assert_eq!(old_der.len(), 1);

    // Phase 1: [old (signing), new].
    let (status, body) = post(&cp, &cp.client, paths::CA_ROTATE, Vec::new()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let rotated: CaStatus = serde_json::from_str(&body).unwrap();
    assert_eq!(rotated.roots.len(), 2);
    assert_eq!(rotated.roots[0].fingerprint, old);
    assert!(rotated.roots[0].signing && !rotated.roots[1].signing);
    assert!(
        rotated.rotation.as_deref().unwrap().contains("phase 1"),
        "{rotated:?}"
    );
    let new = rotated.roots[1].fingerprint.clone();
    watch.until(|s| bundle(&s.trust_roots).len() == 2).await;
    assert_eq!(bundle(&watch.state.trust_roots)[0], old_der[0]);

    // A second rotation meanwhile: 409 with a reason.
    let (status, body) = post(&cp, &cp.client, paths::CA_ROTATE, Vec::new()).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(body.contains("already in progress"), "{body}");

    // Phase 2 after the grace: the new root first and signing; the old
    // one stays while orders-1's leaf from it lives.
    watch
        .until(|s| {
            let b = bundle(&s.trust_roots);
            b.len() == 2 && b[1] == old_der[0]
        })
        .await;
    let phase2 = ca_status(&cp).await;
    assert_eq!(phase2.roots[0].fingerprint, new);
    assert!(phase2.roots[0].signing);
    assert_eq!(phase2.roots[1].live_leaves, 1);
    assert!(phase2.rotation.as_deref().unwrap().contains("phase 2"));
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        ca_status(&cp).await.roots.len(),
        2,
        "a live leaf keeps the old root"
    );

    // The sidecar renews: its leaf comes from the new root; phase 3.
    let renewed = certificate(&cp, &orders, "orders-1").await;
    assert_ne!(renewed.serial, first.serial);
    assert_eq!(bundle(&renewed.trust_roots)[1], old_der[0]);
    watch.until(|s| bundle(&s.trust_roots).len() == 1).await;
    assert_ne!(bundle(&watch.state.trust_roots)[0], old_der[0]);
    let done = ca_until(&cp, "phase 3", |ca| ca.roots.len() == 1).await;
    assert_eq!(done.roots[0].fingerprint, new);
    assert_eq!(done.roots[0].live_leaves, 1);
    assert_eq!(done.rotation, None);
    let lines: Vec<String> = cp
        .revisions()
        .await
        .into_iter()
        .filter(|r| r.actor == "ca")
        .flat_map(|r| r.changes)
        .collect();
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert!(
        lines.iter().all(|l| l.starts_with("CA rotation phase")),
        "{lines:?}"
    );

    // The new root's key is private; ca.crt still is the API's CA.
    let key = std::fs::read_dir(dir.path().join("ca-roots"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "key"))
        .expect("the new root's key");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    drop(watch);
    drop(cp);

    // A restart keeps the new root (and the API still trusts ca.crt).
    let cp = ControlPlane::start(dir.path(), &flags).await;
    let after = ca_status(&cp).await;
    assert_eq!(after.roots.len(), 1);
    assert_eq!(after.roots[0].fingerprint, new);
    let mut watch = cp.watch(None).await;
    watch.next().await.unwrap();
    assert_eq!(bundle(&watch.state.trust_roots).len(), 1);
    assert_ne!(bundle(&watch.state.trust_roots)[0], old_der[0]);
    // meshctl ca rotate starts the next one and prints it.
    let (code, out, err) = cp.meshctl(&["ca", "rotate"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("phase 1"), "{out}");
}

#[test]
fn a_workload_cert_ttl_under_10s_is_refused() {
    use clap::Parser;
    use meshlet_control_plane::server::Settings;
    for bad in ["0s", "9s", "500ms"] {
        let err = Settings::try_parse_from(["control-plane", "--workload-cert-ttl", bad])
            .unwrap_err()
            .to_string();
        assert!(err.contains("at least 10s"), "{bad}: {err}");
    }
    let ok = Settings::try_parse_from(["control-plane", "--workload-cert-ttl", "30s"]).unwrap();
    assert_eq!(ok.workload_cert_ttl, Duration::from_secs(30));
    let default = Settings::try_parse_from(["control-plane"]).unwrap();
    assert_eq!(default.workload_cert_ttl, Duration::from_secs(24 * 3600));
    assert_eq!(default.ca_rotation_grace, Duration::from_secs(5));
}

#[tokio::test]
async fn a_rotation_in_progress_survives_a_restart_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let slow = ["--ca-rotation-grace", "1h"];
    let cp = ControlPlane::start(dir.path(), &slow).await;
    let (status, body) = post(&cp, &cp.client, paths::CA_ROTATE, Vec::new()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let phase1: CaStatus = serde_json::from_str(&body).unwrap();
    drop(cp);

    // Still phase 1 after a restart, and still one rotation at a time.
    let cp = ControlPlane::start(dir.path(), &slow).await;
    let ca = ca_status(&cp).await;
    assert_eq!(ca.roots, phase1.roots);
    assert!(
        ca.rotation.as_deref().unwrap().contains("phase 1"),
        "{ca:?}"
    );
    let (status, body) = post(&cp, &cp.client, paths::CA_ROTATE, Vec::new()).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    drop(cp);

    // With a short grace it moves on: phase 2, then (no instance holds a
    // leaf of the old root) phase 3 with the new root alone.
    let cp = ControlPlane::start(dir.path(), &["--ca-rotation-grace", "100ms"]).await;
    let done = ca_until(&cp, "the rotation to finish", |ca| ca.roots.len() == 1).await;
    assert_eq!(done.roots[0].fingerprint, phase1.roots[1].fingerprint);
    assert!(done.roots[0].signing);
}
