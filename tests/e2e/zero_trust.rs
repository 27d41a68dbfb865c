//! Issue 14's "Done means", with the real binaries over real sockets:
//! workload certificates with SPIFFE ids, mTLS between sidecars (HTTP/2 on
//! the wire, the app's own protocol behind), `MTLSPolicy strict`, caller
//! identity that a client cannot forge, `AuthorizationPolicy`, certificate
//! renewal and CA rotation under traffic, and an expired certificate.
//!
//! Every mesh here is a control plane and sidecars `a`, `b` (and `c`) in
//! namespace `default`, so their identities are
//! `spiffe://meshlet.local/ns/default/sa/NAME`. The test plays a mesh
//! workload itself where it must look at the TLS side (`mtls.rs`): it mints
//! a certificate from the control plane's CA and records what a sidecar
//! presents.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::Request;
use http_body_util::Full;
use meshlet_e2e::metrics::Scrape;
use meshlet_e2e::mtls::{self, TestCa};
use meshlet_e2e::{client, meshctl, wait, ControlPlaneProcess, SidecarProcess, TempDir, Upstream};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

fn identity(service: &str) -> String {
    format!("spiffe://meshlet.local/ns/default/sa/{service}")
}

/// A control plane and meshed services, each an app and its sidecar.
struct Mesh {
    dir: TempDir,
    cp: ControlPlaneProcess,
    apps: Vec<Upstream>,
    sidecars: Vec<SidecarProcess>,
}

impl Mesh {
    async fn start(cp_args: &[&str]) -> Mesh {
        let dir = TempDir::new();
        let cp = ControlPlaneProcess::start(&dir.path.join("data"), cp_args).await;
        Mesh {
            dir,
            cp,
            apps: Vec::new(),
            sidecars: Vec::new(),
        }
    }

    /// Adds service `name` (an app and its sidecar with `args`); returns
    /// its index.
    async fn add(&mut self, name: &str, app: Upstream, args: &[&str]) -> usize {
        let mut builder = SidecarProcess::builder(name, app.port()).control_plane(&self.cp);
        for arg in args {
            builder = builder.arg(arg);
        }
        self.sidecars.push(builder.start().await);
        self.apps.push(app);
        self.sidecars.len() - 1
    }

    fn sidecar(&self, i: usize) -> &SidecarProcess {
        &self.sidecars[i]
    }

    /// Waits until `from` reaches service `to` over mTLS: `to`'s app sees
    /// the caller's verified identity.
    async fn wait_mtls(&self, from: usize, to: &str, from_name: &str) {
        mtls::wait_mtls(self.sidecar(from).outbound, to, from_name).await;
    }

    async fn apply(&self, file: &str, yaml: &str) {
        self.cp.apply(&self.dir.path, file, yaml).await;
    }
}

/// The certificate a sidecar's inbound presents, once it has one.
async fn presented_by(ca: &TestCa, sidecar: &SidecarProcess) -> mtls::Presented {
    let probe = ca.workload("probe", Duration::from_secs(3600));
    let inbound = sidecar.inbound;
    wait::until(
        "the sidecar presents a certificate",
        Duration::from_secs(20),
        || {
            let (roots, probe) = (ca.roots(), &probe);
            async move {
                let (presented, _) = mtls::handshake(inbound, roots, Some(probe), &["h2"]).await;
                presented
            }
        },
    )
    .await
}

fn reason(reply: &client::Reply) -> Option<&str> {
    reply.header("x-meshlet-reason")
}

#[tokio::test]
async fn sidecars_speak_mtls_with_spiffe_ids_and_strict_refuses_plaintext() {
    let mut mesh = Mesh::start(&[]).await;
    let b = mesh.add("b", Upstream::start("b").await, &[]).await;
    let a = mesh.add("a", Upstream::start("a").await, &[]).await;
    let ca = TestCa::load(&mesh.cp.data_dir);

    let presented = presented_by(&ca, mesh.sidecar(b)).await;
    assert_eq!(presented.uri_sans, vec![identity("b")], "{presented:?}");
    assert_eq!(presented.chain, Ok(()), "signed by the mesh CA, valid now");

    mesh.wait_mtls(a, "b", "a").await;

    // Permissive (the default): a plaintext client still gets through.
    let plain = client::get(mesh.sidecar(b).inbound, "/").await.unwrap();
    assert_eq!(plain.status, 200, "{}", plain.text());

    mesh.apply(
        "strict.yaml",
        "apiVersion: meshlet.dev/v1alpha1\nkind: MTLSPolicy\nmetadata: {name: b-strict}\nspec: {targetRef: {service: b}, mode: strict}\n",
    )
    .await;
    let inbound = mesh.sidecar(b).inbound;
    let refused = wait::until(
        "plaintext refused",
        Duration::from_secs(10),
        || async move {
            let reply = client::get(inbound, "/").await.ok()?;
            (reply.status == 403).then_some(reply)
        },
    )
    .await;
    assert_eq!(
        reason(&refused),
        Some("mtls_required"),
        "{}",
        refused.text()
    );

    let through = client::get_uri(mesh.sidecar(a).outbound, "http://b/")
        .await
        .unwrap();
    assert_eq!(through.status, 200, "A → B over mTLS: {}", through.text());
    assert_eq!(through.text(), "hello from b");
}

#[tokio::test]
async fn a_caller_cannot_forge_its_identity_or_escape_a_source_limit() {
    let mut mesh = Mesh::start(&[]).await;
    let b = mesh.add("b", Upstream::start("b").await, &[]).await;
    let a = mesh.add("a", Upstream::start("a").await, &[]).await;
    mesh.wait_mtls(a, "b", "a").await;
    let outbound = mesh.sidecar(a).outbound;

    let forged = Request::get("http://b/headers")
        .header("x-meshlet-source", "evil")
        .header("x-meshlet-source-identity", identity("evil"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let reply = client::send(outbound, forged).await.unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());
    let json: Value = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(
        json["headers"]["x-meshlet-source"],
        serde_json::json!(["a"])
    );
    assert_eq!(
        json["headers"]["x-meshlet-source-identity"],
        serde_json::json!([identity("a")])
    );

    // Straight to B's inbound in plaintext: no identity at all.
    let direct = Request::get("/headers")
        .header("host", "b")
        .header("x-meshlet-source", "a")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let reply = client::send(mesh.sidecar(b).inbound, direct).await.unwrap();
    let json: Value = serde_json::from_slice(&reply.body).unwrap();
    assert!(
        json["headers"].get("x-meshlet-source").is_none(),
        "a plaintext caller's header is dropped: {json}"
    );

    mesh.apply(
        "limit.yaml",
        "apiVersion: meshlet.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {name: b-per-source}\nspec:\n  targetRef: {service: b}\n  tokenBucket: {capacity: 5, refillPerSecond: 0.1}\n  key: sourceService\n",
    )
    .await;
    let revision = mesh.cp.get_json("/api/v1/revisions").await;
    let wanted = revision[0]["revision"].as_u64().unwrap_or(0);
    let admin = mesh.sidecar(b).admin;
    wait::until("b has the limit", Duration::from_secs(10), || async move {
        (meshlet_e2e::admin::revision(admin).await >= wanted).then_some(())
    })
    .await;
    let mut passed = 0;
    for n in 0..40 {
        let spoofed = Request::get("http://b/")
            .header("x-meshlet-source", format!("spoof-{n}"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let reply = client::send(outbound, spoofed).await.unwrap();
        match reply.status.as_u16() {
            200 => passed += 1,
            429 => assert_eq!(reason(&reply), Some("rate_limited")),
            other => panic!("unexpected {other}: {}", reply.text()),
        }
    }
    assert!(
        passed <= 6,
        "40 spoofed sources share a's bucket of 5: {passed} passed"
    );
}

#[tokio::test]
async fn authorization_allows_a_to_read_b_and_refuses_the_rest() {
    let mut mesh = Mesh::start(&[]).await;
    let b = mesh.add("b", Upstream::start("b").await, &[]).await;
    let a = mesh.add("a", Upstream::start("a").await, &[]).await;
    let c = mesh.add("c", Upstream::start("c").await, &[]).await;
    mesh.wait_mtls(a, "b", "a").await;
    mesh.wait_mtls(c, "b", "c").await;

    mesh.apply(
        "allow.yaml",
        "apiVersion: meshlet.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: b-allow-a}\nspec:\n  targetRef: {service: b}\n  action: ALLOW\n  rules:\n    - from: [{services: [a]}]\n      to: [{methods: [GET], paths: [/api/*]}]\n",
    )
    .await;
    let c_out = mesh.sidecar(c).outbound;
    let denied = wait::until("c is denied", Duration::from_secs(10), || async move {
        let reply = client::get_uri(c_out, "http://b/api/orders").await.ok()?;
        (reply.status == 403).then_some(reply)
    })
    .await;
    assert_eq!(reason(&denied), Some("denied"), "{}", denied.text());
    assert!(denied.text().contains("b-allow-a") || denied.text().contains("denied"));

    let a_out = mesh.sidecar(a).outbound;
    let ok = client::get_uri(a_out, "http://b/api/orders").await.unwrap();
    assert_eq!(ok.status, 200, "{}", ok.text());
    let post = Request::post("http://b/api/orders")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let posted = client::send(a_out, post).await.unwrap();
    assert_eq!(posted.status, 403, "{}", posted.text());
    assert_eq!(reason(&posted), Some("denied"));
    let outside = client::get_uri(a_out, "http://b/other/1").await.unwrap();
    assert_eq!(outside.status, 403, "only /api/* is allowed");

    let b_admin = mesh.sidecar(b).admin;
    let scrape = Scrape::of(b_admin).await;
    assert!(
        scrape.sum("meshlet_authz_denied_total", &[("policy", "b-allow-a")]) >= 3.0,
        "{}",
        scrape.text
    );

    // A dry-run DENY of everything: counted, never refused.
    mesh.apply(
        "allow.yaml",
        "apiVersion: meshlet.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: b-allow-a}\nspec:\n  targetRef: {service: b}\n  action: ALLOW\n  mode: dryRun\n  rules:\n    - from: [{services: [a]}]\n---\napiVersion: meshlet.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: b-deny-all}\nspec:\n  targetRef: {service: b}\n  action: DENY\n  mode: dryRun\n  rules:\n    - from: [{namespaces: [default]}, {unauthenticated: true}]\n",
    )
    .await;
    wait::until(
        "c gets through again",
        Duration::from_secs(10),
        || async move {
            let reply = client::get_uri(c_out, "http://b/api/orders").await.ok()?;
            (reply.status == 200).then_some(())
        },
    )
    .await;
    let before = Scrape::of(b_admin).await.sum(
        "meshlet_authz_dry_run_denied_total",
        &[("policy", "b-deny-all")],
    );
    for out in [a_out, c_out] {
        let reply = client::get_uri(out, "http://b/other/2").await.unwrap();
        assert_eq!(reply.status, 200, "dry run never refuses: {}", reply.text());
    }
    let after = Scrape::of(b_admin).await.sum(
        "meshlet_authz_dry_run_denied_total",
        &[("policy", "b-deny-all")],
    );
    assert!(
        after >= before + 2.0,
        "would-deny counted: {before} → {after}"
    );
}

#[tokio::test]
async fn an_h2c_client_reaches_an_http1_app_over_one_multiplexed_connection() {
    let mut mesh = Mesh::start(&[]).await;
    let b = mesh
        .add(
            "b",
            Upstream::start_http1_only("b").await,
            &["--app-protocol", "http1"],
        )
        .await;
    let a = mesh.add("a", Upstream::start("a").await, &[]).await;
    mesh.wait_mtls(a, "b", "a").await;
    let a_out = mesh.sidecar(a).outbound;

    let request = Request::get("http://b/headers")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let reply = client::send_h2(a_out, request).await.unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());
    let json: Value = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(
        json["version"], "HTTP/1.1",
        "b's app is spoken to in HTTP/1.1"
    );

    // WebSocket through both sidecars (an HTTP/1.1 upgrade on the mTLS hop).
    let stream = TcpStream::connect(a_out).await.unwrap();
    let (mut ws, response) = tokio_tungstenite::client_async("ws://b/ws", stream)
        .await
        .expect("websocket handshake through both sidecars");
    assert_eq!(response.status(), 101);
    ws.send(Message::text("over mtls")).await.unwrap();
    let echoed = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("echo in time")
        .expect("a message")
        .unwrap();
    assert_eq!(echoed, Message::text("over mtls"));
    ws.close(None).await.unwrap();

    // 32 concurrent clients: one HTTP/2 connection from a's sidecar to b's.
    let b_admin = mesh.sidecar(b).admin;
    let peak = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (peak, done) = (Arc::clone(&peak), Arc::clone(&done));
        tokio::spawn(async move {
            while !done.load(Ordering::SeqCst) {
                let open = Scrape::of(b_admin)
                    .await
                    .sum("active_connections", &[("direction", "inbound")]);
                peak.fetch_max(open as usize, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let clients: Vec<_> = (0..32)
        .map(|_| {
            tokio::spawn(async move {
                let reply = client::get_uri(a_out, "http://b/slow?ms=400")
                    .await
                    .unwrap();
                reply.status.as_u16()
            })
        })
        .collect();
    for task in clients {
        assert_eq!(task.await.unwrap(), 200);
    }
    done.store(true, Ordering::SeqCst);
    watcher.await.unwrap();
    // The watcher's own scrape goes to the admin listener, not the inbound.
    assert_eq!(
        peak.load(Ordering::SeqCst),
        1,
        "b's inbound saw one connection from a's sidecar"
    );
}

/// Requests from `a` to `b` until `stop`, counting failures.
fn traffic(
    outbound: std::net::SocketAddr,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(usize, Vec<String>)> {
    tokio::spawn(async move {
        let (mut ok, mut failures) = (0, Vec::new());
        while !stop.load(Ordering::SeqCst) {
            match client::get_uri(outbound, "http://b/").await {
                Ok(reply) if reply.status == 200 => ok += 1,
                Ok(reply) => failures.push(format!("{} {}", reply.status, reply.text())),
                Err(err) => failures.push(err.to_string()),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (ok, failures)
    })
}

/// The last `lines` lines of a log, for an assertion message.
fn tail(log: &str, lines: usize) -> String {
    let all: Vec<&str> = log.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[tokio::test]
async fn certificates_renew_and_the_ca_rotates_under_traffic_without_a_failed_request() {
    let mut mesh = Mesh::start(&["--workload-cert-ttl", "30s"]).await;
    let b = mesh.add("b", Upstream::start("b").await, &[]).await;
    let a = mesh.add("a", Upstream::start("a").await, &[]).await;
    mesh.wait_mtls(a, "b", "a").await;
    let ca = TestCa::load(&mesh.cp.data_dir);
    let stop = Arc::new(AtomicBool::new(false));
    let load = traffic(mesh.sidecar(a).outbound, Arc::clone(&stop));

    let serials = Arc::new(Mutex::new(BTreeSet::new()));
    let inbound = mesh.sidecar(b).inbound;
    let probe = ca.workload("probe", Duration::from_secs(3600));
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(180) {
        if let (Some(seen), _) = mtls::handshake(inbound, ca.roots(), Some(&probe), &["h2"]).await {
            assert_eq!(
                seen.chain,
                Ok(()),
                "b's certificate is always valid; b's log:\n{}\ncontrol plane's log:\n{}",
                tail(&mesh.sidecar(b).log_text(), 40),
                tail(&mesh.cp.log_text(), 40)
            );
            serials.lock().unwrap().insert(seen.serial);
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let distinct = serials.lock().unwrap().len();
    assert!(
        distinct >= 4,
        "30 s certificates over 3 minutes: {distinct} serials"
    );

    let rotated = meshctl(&mesh.cp, &["ca", "rotate"]).await;
    assert!(rotated.success(), "{rotated:?}");
    let cp = &mesh.cp;
    let status = wait::until(
        "the old root is retired",
        Duration::from_secs(90),
        || async move {
            let status = cp.get_json("/api/v1/ca").await;
            (status["roots"].as_array()?.len() == 1).then_some(status)
        },
    )
    .await;
    let new_root = status["roots"][0]["fingerprint"]
        .as_str()
        .unwrap()
        .to_owned();
    stop.store(true, Ordering::SeqCst);
    let (ok, failures) = load.await.unwrap();
    assert!(ok > 1000, "traffic ran: {ok}");
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );

    // Roots made by a rotation live in DATA_DIR/ca-roots/ (`ca.crt` stays
    // the API's CA).
    let mut bundle = String::new();
    for entry in std::fs::read_dir(mesh.cp.data_dir.join("ca-roots")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "crt") {
            bundle.push_str(&std::fs::read_to_string(path).unwrap());
        }
    }
    let only_new =
        mtls::root_with_fingerprint(&bundle, &new_root).expect("ca-roots/ holds the new root");
    let (seen, _) = mtls::handshake(inbound, only_new, Some(&probe), &["h2"]).await;
    let seen = seen.expect("b presents a certificate");
    assert_eq!(seen.chain, Ok(()), "b's leaf comes from the new root");
}

#[tokio::test]
async fn an_expired_certificate_is_refused_with_a_reason() {
    let mut mesh = Mesh::start(&["--workload-cert-ttl", "12s"]).await;
    let b = mesh.add("b", Upstream::start("b").await, &[]).await;
    let a = mesh.add("a", Upstream::start("a").await, &[]).await;
    mesh.wait_mtls(a, "b", "a").await;
    let ca = TestCa::load(&mesh.cp.data_dir);
    mesh.cp.kill9().await;
    let killed = Instant::now();

    let a_out = mesh.sidecar(a).outbound;
    let refused = wait::until(
        "a's certificate expires",
        Duration::from_secs(40),
        || async move {
            let reply = client::get_uri(a_out, "http://b/").await.ok()?;
            (reply.status != 200).then_some(reply)
        },
    )
    .await;
    assert_eq!(refused.status, 503, "{}", refused.text());
    assert_eq!(
        reason(&refused),
        Some("certificate_expired"),
        "{}",
        refused.text()
    );
    let log = mesh.sidecar(a).log_text();
    assert!(log.contains("expired"), "a clear log line: {log}");

    // A peer with a valid certificate refuses b's expired one.
    let probe = ca.workload("probe", Duration::from_secs(3600));
    let b_inbound = mesh.sidecar(b).inbound;
    let expired = wait::until("b's certificate expired", Duration::from_secs(20), || {
        let (roots, probe) = (ca.roots(), &probe);
        async move {
            let (seen, _) = mtls::handshake(b_inbound, roots, Some(probe), &["h2"]).await;
            seen.filter(|s| s.chain.is_err())
        }
    })
    .await;
    assert!(
        expired
            .chain
            .as_ref()
            .unwrap_err()
            .to_lowercase()
            .contains("expired"),
        "{expired:?}"
    );

    // An expired certificate is an outage: the sidecars keep asking every
    // few seconds, so the mesh is back soon after the control plane, even
    // after 40 s without it (an uncapped backoff would be at 30 s by then).
    tokio::time::sleep_until((killed + Duration::from_secs(40)).into()).await;
    mesh.cp.restart().await;
    let recovered = wait::within(Duration::from_secs(15), || async move {
        let reply = client::get_uri(a_out, "http://b/").await.ok()?;
        (reply.status == 200).then_some(())
    })
    .await;
    assert!(
        recovered.is_some(),
        "a does not reach b 15 s after the control plane is back; a's log:\n{}",
        tail(&mesh.sidecar(a).log_text(), 30)
    );
}

/// Reads what comes back on `stream` until it closes (at most 5 s).
async fn read_to_close<S: tokio::io::AsyncRead + Unpin>(stream: &mut S) -> String {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut buf)).await;
    String::from_utf8_lossy(&buf).into_owned()
}

#[tokio::test]
async fn opaque_tcp_cannot_bypass_authorization_or_carry_a_forged_identity() {
    use tokio::io::AsyncWriteExt;
    let mut mesh = Mesh::start(&[]).await;
    let ca = TestCa::load(&mesh.cp.data_dir);
    let web = ca.workload("web", Duration::from_secs(3600));
    let forged = "GET /api/x HTTP/1.1\r\nhost: t\r\nx-meshlet-source: frontend\r\n\r\n";

    // An explicit-mode sidecar offers no opaque TCP on the mesh hop.
    let b = mesh.add("b", Upstream::start("b").await, &[]).await;
    presented_by(&ca, mesh.sidecar(b)).await;
    let (_, hop) = mtls::handshake(
        mesh.sidecar(b).inbound,
        ca.roots(),
        Some(&web),
        &["meshlet-tcp"],
    )
    .await;
    assert!(hop.is_err(), "no meshlet-tcp on an explicit sidecar");

    // A transparent one (its inbound listener, called directly) with an
    // ALLOW for frontend's GETs: opaque TCP has no method or path, so no
    // caller gets an opaque connection through it.
    let t = mesh
        .add("t", Upstream::start("t").await, &["--mode", "transparent"])
        .await;
    mesh.apply(
        "allow.yaml",
        "apiVersion: meshlet.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: t-allow}\nspec:\n  targetRef: {service: t}\n  action: ALLOW\n  rules:\n    - from: [{services: [frontend]}]\n      to: [{methods: [GET], paths: [/api/*, /headers]}]\n",
    )
    .await;
    let inbound = mesh.sidecar(t).inbound;
    wait::until("t has the policy", Duration::from_secs(10), || async move {
        let reply = client::get(inbound, "/api/x").await.ok()?;
        (reply.status == 403).then_some(())
    })
    .await;
    presented_by(&ca, mesh.sidecar(t)).await;

    // Plaintext, silent for longer than protocol detection waits: the app
    // port speaks HTTP, so it is still a request, and refused.
    let mut plain = TcpStream::connect(inbound).await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let _ = plain.write_all(with_close(forged).as_bytes()).await;
    let answer = read_to_close(&mut plain).await;
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer:?}");

    // The mesh hop's opaque TCP to the app port: served as HTTP with the
    // caller's verified identity (web: refused; frontend: its own name).
    let app_port = mesh.apps[1].port();
    let (_, hop) = mtls::handshake(inbound, ca.roots(), Some(&web), &["meshlet-tcp"]).await;
    let mut hop = hop.expect("meshlet-tcp offered in transparent mode");
    let _ = hop.write_all(&app_port.to_be_bytes()).await;
    let _ = hop.write_all(with_close(forged).as_bytes()).await;
    let answer = read_to_close(&mut hop).await;
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer:?}");
    assert_eq!(mesh.apps[1].requests(), 0, "nothing reached t's app");

    let frontend = ca.workload("frontend", Duration::from_secs(3600));
    let (_, hop) = mtls::handshake(inbound, ca.roots(), Some(&frontend), &["meshlet-tcp"]).await;
    let mut hop = hop.expect("meshlet-tcp offered in transparent mode");
    let _ = hop.write_all(&app_port.to_be_bytes()).await;
    let request = "GET /headers HTTP/1.1\r\nhost: t\r\nx-meshlet-source: evil\r\n\r\n";
    let _ = hop.write_all(with_close(request).as_bytes()).await;
    let answer = read_to_close(&mut hop).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    assert!(
        answer.contains(r#""x-meshlet-source":["frontend"]"#),
        "the verified caller, not the forged one: {answer}"
    );
}

/// `request` (a head ending in an empty line) asking to close after it.
fn with_close(request: &str) -> String {
    request.replacen("\r\n\r\n", "\r\nconnection: close\r\n\r\n", 1)
}
