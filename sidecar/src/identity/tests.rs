//! The mesh hop end to end in one process: a pool of a mesh endpoint
//! (client side) against an inbound listener (`listen::server::serve`)
//! with the TLS acceptor, both holding certificates of a test CA.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use http::{header, Request, Response, StatusCode, Version};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::body::{ProxyBody, StreamedBody};
use crate::error::ProxyError;
use crate::identity::renew::{key_and_csr, leaf_of, renewal_time, Now, Schedule};
use crate::identity::testing::{identity_for, spiffe, TestCa, TestSource};
use crate::identity::tls::{Acceptor, TlsFailure};
use crate::identity::workload::Leaf;
use crate::identity::{Hop, WorkloadIdentity};
use crate::listen::server::{serve, Handler, ListenerOptions, Peer};
use crate::settings::Limits;
use crate::telemetry::metrics::Metrics;
use crate::testing::text;
use crate::upstream::pool::{ConnPool, Remote, SendError, ORIG_PROTO};

/// Answers what it saw: version, `x-meshlet-orig-proto`, `Host`, URI and
/// the peer's verified identity; counts connections by client address;
/// an `Upgrade` request gets 101 and an echo of the upgraded bytes.
#[derive(Clone, Default)]
struct Echo {
    clients: Arc<Mutex<HashSet<SocketAddr>>>,
}

impl Handler for Echo {
    async fn handle(&self, mut request: Request<StreamedBody>, peer: &Peer) -> Response<ProxyBody> {
        self.clients.lock().unwrap().insert(peer.addr);
        let seen = format!(
            "{:?} orig={} host={} uri={} identity={}",
            request.version(),
            header_text(&request, ORIG_PROTO.as_str()),
            header_text(&request, "host"),
            request.uri(),
            peer.identity
                .as_ref()
                .map_or("none".to_owned(), |i| i.to_string()),
        );
        if request.headers().contains_key(header::UPGRADE) {
            let upgrade = hyper::upgrade::on(&mut request);
            tokio::spawn(async move {
                let mut io = hyper_util::rt::TokioIo::new(upgrade.await.unwrap());
                let mut buf = [0u8; 5];
                io.read_exact(&mut buf).await.unwrap();
                io.write_all(&buf).await.unwrap();
            });
            return Response::builder()
                .status(StatusCode::SWITCHING_PROTOCOLS)
                .header(header::CONNECTION, "upgrade")
                .header(header::UPGRADE, "websocket")
                .body(ProxyBody::empty())
                .unwrap();
        }
        Response::new(ProxyBody::full(seen))
    }
}

fn header_text<B>(request: &Request<B>, name: &str) -> String {
    request
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_owned()
}

/// An inbound listener of `identity` with the TLS acceptor.
async fn inbound(
    identity: &Arc<WorkloadIdentity>,
    echo: Echo,
) -> (SocketAddr, watch::Sender<bool>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = watch::channel(false);
    let acceptor = Acceptor::new(identity, addr, Duration::from_secs(1), true);
    tokio::spawn(serve(
        "inbound",
        listener,
        echo,
        Arc::new(Limits::default()),
        Metrics::new("orders").listener("inbound"),
        stopped,
        ListenerOptions {
            interception: None,
            terminate: None,
            tls: Some(Arc::new(acceptor)),
        },
    ));
    (addr, stop)
}

/// A pool of the mesh endpoint `addr` whose sidecar must be `expected`.
fn mesh_pool(local: &Arc<WorkloadIdentity>, addr: SocketAddr, expected: &str) -> Arc<ConnPool> {
    ConnPool::with_remote(
        addr,
        Arc::new(Limits::default()),
        Remote::Mesh {
            local: Arc::clone(local),
            identity: spiffe(expected),
        },
    )
}

fn http1_get(path: &str) -> Request<ProxyBody> {
    Request::get(path)
        .header(header::HOST, "orders")
        .body(ProxyBody::empty())
        .unwrap()
}

/// The error a refused send becomes.
fn refusal(pool: &ConnPool, sent: Result<Response<StreamedBody>, SendError>) -> ProxyError {
    match sent {
        Err(SendError::Connect { source, .. }) => ProxyError::connect_failed(pool.addr(), source),
        Err(SendError::Upstream(error)) => panic!("sent, then failed: {error}"),
        Err(SendError::TimedOut) => panic!("timed out"),
        Ok(response) => panic!("answered {}", response.status()),
    }
}

#[tokio::test]
async fn an_http1_request_crosses_the_hop_as_http2_with_the_callers_identity() {
    let ca = TestCa::new("mesh root");
    let (frontend, orders) = (
        identity_for(&ca, "frontend").await,
        identity_for(&ca, "orders").await,
    );
    let (addr, _stop) = inbound(&orders, Echo::default()).await;
    let pool = mesh_pool(&frontend, addr, "orders");
    let response = pool.send(http1_get("/orders/7?x=1")).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        text(response).await,
        "HTTP/2.0 orig=HTTP/1.1 host=- uri=http://orders/orders/7?x=1 \
         identity=spiffe://meshlet.local/ns/default/sa/frontend"
    );
}

#[tokio::test]
async fn a_peer_with_another_identity_is_refused() {
    let ca = TestCa::new("mesh root");
    let (frontend, evil) = (
        identity_for(&ca, "frontend").await,
        identity_for(&ca, "evil").await,
    );
    let echo = Echo::default();
    let (addr, _stop) = inbound(&evil, echo.clone()).await;
    let pool = mesh_pool(&frontend, addr, "orders");
    let error = refusal(&pool, pool.send(http1_get("/")).await);
    assert_eq!(error.reason(), "peer_identity_mismatch", "{error}");
    assert_eq!(error.status(), 502);
    assert!(error.to_string().contains("sa/evil"), "{error}");
    assert!(echo.clients.lock().unwrap().is_empty(), "nothing was sent");
}

#[tokio::test]
async fn a_peer_of_another_ca_or_with_an_expired_certificate_is_refused() {
    let ca = TestCa::new("mesh root");
    let frontend = identity_for(&ca, "frontend").await;
    // Another CA, same identity.
    let stranger = identity_for(&TestCa::new("other root"), "orders").await;
    let (addr, _stop) = inbound(&stranger, Echo::default()).await;
    let pool = mesh_pool(&frontend, addr, "orders");
    let error = refusal(&pool, pool.send(http1_get("/")).await);
    assert_eq!(error.reason(), "tls_handshake_failed", "{error}");

    // The right CA and identity, but expired.
    let expired = WorkloadIdentity::new(Metrics::new("orders").identity());
    let (key, csr) = key_and_csr("orders").unwrap();
    let past = SystemTime::now() - Duration::from_secs(3600);
    let reply = ca.sign(
        &csr,
        &spiffe("orders").to_string(),
        past,
        past + Duration::from_secs(60),
    );
    expired.set_bundle(&ca.pem);
    expired.install(leaf_of(&reply, &key).unwrap());
    let (addr, _stop) = inbound(&expired, Echo::default()).await;
    let pool = mesh_pool(&frontend, addr, "orders");
    let error = refusal(&pool, pool.send(http1_get("/")).await);
    assert_eq!(error.reason(), "tls_handshake_failed", "{error}");
    assert!(
        error.to_string().to_lowercase().contains("expired"),
        "{error}"
    );

    // Our own certificate expired: nothing is sent, 503.
    let pool = mesh_pool(&expired, addr, "orders");
    assert!(matches!(
        expired.hop(Some(&spiffe("orders"))),
        Hop::Expired(_)
    ));
    match pool.send(http1_get("/")).await {
        Err(SendError::Connect { source, .. }) => assert!(matches!(
            TlsFailure::of(&source),
            Some(TlsFailure::CertificateExpired { .. })
        )),
        other => panic!("expected a refusal, got {other:?}"),
    }
    let error = refusal(&pool, pool.send(http1_get("/")).await);
    assert_eq!(
        (error.status().as_u16(), error.reason()),
        (503, "certificate_expired")
    );
}

#[tokio::test]
async fn many_concurrent_http1_requests_share_one_h2_connection() {
    let ca = TestCa::new("mesh root");
    let (frontend, orders) = (
        identity_for(&ca, "frontend").await,
        identity_for(&ca, "orders").await,
    );
    let echo = Echo::default();
    let (addr, _stop) = inbound(&orders, echo.clone()).await;
    let pool = mesh_pool(&frontend, addr, "orders");
    let tasks: Vec<_> = (0..32)
        .map(|i| {
            let pool = Arc::clone(&pool);
            tokio::spawn(async move {
                let response = pool.send(http1_get(&format!("/{i}"))).await.unwrap();
                assert_eq!(response.status(), 200);
                text(response).await
            })
        })
        .collect();
    for task in tasks {
        assert!(task.await.unwrap().starts_with("HTTP/2.0 orig=HTTP/1.1"));
    }
    assert_eq!(echo.clients.lock().unwrap().len(), 1, "one connection");
    let handshakes = |identity: &WorkloadIdentity| {
        (
            identity.metrics.outbound_handshakes.get(),
            identity.metrics.inbound_handshakes.get(),
        )
    };
    assert_eq!(handshakes(&frontend), (1, 0), "one handshake");
    assert_eq!(handshakes(&orders), (0, 1));
    assert!(pool.has_mtls_connection());
    assert_eq!(pool.pooled_connections(), 0, "no HTTP/1.1 connection");
}

#[tokio::test]
async fn certificates_swapped_mid_traffic_fail_no_request() {
    let ca = TestCa::new("mesh root");
    let (frontend, orders) = (
        identity_for(&ca, "frontend").await,
        identity_for(&ca, "orders").await,
    );
    let echo = Echo::default();
    let (addr, _stop) = inbound(&orders, echo.clone()).await;
    let first_serial = orders.leaf().unwrap().serial.clone();
    let swapping = {
        let (frontend, orders) = (Arc::clone(&frontend), Arc::clone(&orders));
        let ca = Arc::clone(&ca);
        tokio::spawn(async move {
            for _ in 0..10 {
                for (identity, service) in [(&frontend, "frontend"), (&orders, "orders")] {
                    let source =
                        TestSource::new(&ca, &spiffe(service).to_string(), Duration::from_secs(60));
                    identity
                        .renew_once(source.as_ref(), "i", service)
                        .await
                        .unwrap();
                }
                tokio::task::yield_now().await;
            }
        })
    };
    // A shared connection (kept) and a new connection per request (each a
    // handshake with whatever certificates are current).
    let shared = mesh_pool(&frontend, addr, "orders");
    for i in 0..40 {
        let fresh = mesh_pool(&frontend, addr, "orders");
        for pool in [&shared, &fresh] {
            let response = pool.send(http1_get(&format!("/{i}"))).await.unwrap();
            assert_eq!(response.status(), 200);
        }
    }
    swapping.await.unwrap();
    assert_ne!(orders.leaf().unwrap().serial, first_serial, "renewed");
    assert!(echo.clients.lock().unwrap().len() > 10);
}

#[tokio::test]
async fn an_upgrade_crosses_the_hop_on_its_own_http1_tls_connection() {
    let ca = TestCa::new("mesh root");
    let (frontend, orders) = (
        identity_for(&ca, "frontend").await,
        identity_for(&ca, "orders").await,
    );
    let (addr, _stop) = inbound(&orders, Echo::default()).await;
    let pool = mesh_pool(&frontend, addr, "orders");
    let request = Request::get("/chat")
        .header(header::HOST, "orders")
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "websocket")
        .body(ProxyBody::empty())
        .unwrap();
    let mut response = pool.send(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    let upgraded = hyper::upgrade::on(&mut response).await.unwrap();
    let mut io = hyper_util::rt::TokioIo::new(upgraded);
    io.write_all(b"hello").await.unwrap();
    let mut echoed = [0u8; 5];
    io.read_exact(&mut echoed).await.unwrap();
    assert_eq!(&echoed, b"hello");
}

/// An app that records the head of each request it gets and answers 200.
async fn recording_app() -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let heads = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&heads);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let seen = Arc::clone(&seen);
            tokio::spawn(async move {
                let mut buffer = Vec::new();
                let mut chunk = [0u8; 1024];
                while !buffer.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buffer.extend_from_slice(&chunk[..n]),
                    }
                }
                seen.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&buffer).into_owned());
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await;
            });
        }
    });
    (addr, heads)
}

#[tokio::test]
async fn an_http1_app_gets_http1_with_a_host_from_an_h2_hop() {
    let (app, heads) = recording_app().await;
    let limits = Arc::new(Limits::default());
    let h2_request = |orig: Option<&'static str>| {
        let mut request = Request::get("http://orders.default:8080/api?q=1")
            .body(ProxyBody::empty())
            .unwrap();
        *request.version_mut() = Version::HTTP_2;
        if let Some(orig) = orig {
            request
                .headers_mut()
                .insert(ORIG_PROTO, http::HeaderValue::from_static(orig));
        }
        request
    };
    // The caller spoke HTTP/1.1: the app gets HTTP/1.1 (no declaration).
    let pool = ConnPool::with_remote(app, Arc::clone(&limits), Remote::App(None));
    let response = pool.send(h2_request(Some("HTTP/1.1"))).await.unwrap();
    assert_eq!(response.status(), 200);
    // The app declared http1: an HTTP/2 caller's request becomes HTTP/1.1.
    let declared = ConnPool::with_remote(
        app,
        limits,
        Remote::App(Some(meshlet_api::mesh::AppProtocol::Http1)),
    );
    let response = declared.send(h2_request(Some("HTTP/2"))).await.unwrap();
    assert_eq!(response.status(), 200);
    let heads = heads.lock().unwrap().clone();
    assert_eq!(heads.len(), 2);
    for head in heads {
        let lower = head.to_ascii_lowercase();
        assert!(head.starts_with("GET /api?q=1 HTTP/1.1\r\n"), "{head}");
        assert!(
            lower.contains("\r\nhost: orders.default:8080\r\n"),
            "{head}"
        );
        assert!(!lower.contains("x-meshlet-orig-proto"), "{head}");
    }
}

#[tokio::test]
async fn a_bundle_whose_signing_root_did_not_sign_the_leaf_asks_for_renewal() {
    let (old, new) = (TestCa::new("old root"), TestCa::new("new root"));
    let identity = identity_for(&old, "orders").await;
    let asked = |identity: &Arc<WorkloadIdentity>| {
        let identity = Arc::clone(identity);
        async move {
            tokio::time::timeout(Duration::from_millis(20), identity.renew_now.notified())
                .await
                .is_ok()
        }
    };
    // Phase 1: old root still signs.
    identity.set_bundle(&format!("{}{}", old.pem, new.pem));
    assert!(!asked(&identity).await);
    assert_eq!(identity.bundle().len(), 2);
    // Phase 2: the new root signs → renew.
    identity.set_bundle(&format!("{}{}", new.pem, old.pem));
    assert!(asked(&identity).await);
    // Renewed from the new root: nothing more to do.
    let source = TestSource::new(&new, &spiffe("orders").to_string(), Duration::from_secs(60));
    *source.bundle.lock().unwrap() = Some(format!("{}{}", new.pem, old.pem));
    identity
        .renew_once(source.as_ref(), "i", "orders")
        .await
        .unwrap();
    identity.set_bundle(&new.pem);
    assert!(!asked(&identity).await);
    // Phase 3 came by the watch: a reply's bundle from signing time (still
    // with the old root) does not bring the retired root back.
    identity
        .renew_once(source.as_ref(), "i", "orders")
        .await
        .unwrap();
    assert_eq!(identity.bundle().len(), 1, "the watch's bundle stays");
}

#[tokio::test]
async fn renewal_is_due_at_two_thirds_of_the_lifetime_and_failures_keep_the_certificate() {
    let ca = TestCa::new("mesh root");
    let identity = identity_for(&ca, "orders").await;
    let leaf = identity.leaf().unwrap();
    let lifetime = leaf.not_after.duration_since(leaf.received).unwrap();
    for _ in 0..100 {
        let due = renewal_time(&leaf).duration_since(leaf.received).unwrap();
        let fraction = due.as_secs_f64() / lifetime.as_secs_f64();
        assert!((0.59..=0.74).contains(&fraction), "{fraction}");
    }
    let source = TestSource::new(&ca, &spiffe("orders").to_string(), Duration::from_secs(60));
    source
        .down
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let failed = identity.renew_once(source.as_ref(), "i", "orders").await;
    assert!(failed.is_err());
    assert_eq!(identity.leaf().unwrap().serial, leaf.serial, "kept");
    assert!(matches!(identity.hop(Some(&spiffe("x"))), Hop::Mtls(_)));
    // A back-dated notBefore (the control plane's CA: 5 minutes) does not
    // make a 30 s leaf due at once.
    let (key, csr) = key_and_csr("orders").unwrap();
    let now = SystemTime::now();
    let reply = ca.sign(
        &csr,
        &spiffe("orders").to_string(),
        now - Duration::from_secs(300),
        now + Duration::from_secs(30),
    );
    let short = leaf_of(&reply, &key).unwrap();
    let due = renewal_time(&short).duration_since(now).unwrap();
    assert!(due >= Duration::from_secs(17), "{due:?}");
    assert_eq!(
        identity.hop(None),
        Hop::Plain,
        "an endpoint without identity"
    );
}

/// A leaf of `ca` valid until `lifetime` after `received`, its notBefore
/// back-dated 5 minutes as the control plane's CA does.
fn leaf_received(ca: &TestCa, received: SystemTime, lifetime: Duration) -> Leaf {
    let (key, csr) = key_and_csr("orders").unwrap();
    let reply = ca.sign(
        &csr,
        &spiffe("orders").to_string(),
        received - Duration::from_secs(300),
        received + lifetime,
    );
    Leaf {
        received,
        ..leaf_of(&reply, &key).unwrap()
    }
}

/// `base` with both clocks `after` later.
fn later(base: Now, after: Duration) -> Now {
    Now {
        wall: base.wall + after,
        mono: base.mono + after,
    }
}

#[test]
fn the_renewal_task_looks_at_both_clocks_at_least_every_tenth_of_a_lifetime() {
    let ca = TestCa::new("mesh root");
    let t0 = Now::read();
    let short = leaf_received(&ca, t0.wall, Duration::from_secs(30));
    let mut schedule = Schedule::start(t0);
    assert_eq!(schedule.sleep(None, t0), None, "the first request at once");
    schedule.succeeded(&short, t0);
    // Due at 18-22 s; the task sleeps 3 s at a time (a tenth of 30 s,
    // less what the certificate's millisecond times round off).
    let slice = schedule.sleep(Some(&short), t0).unwrap();
    assert!(
        slice > Duration::from_millis(2900) && slice <= Duration::from_secs(3),
        "{slice:?}"
    );
    let before_due = later(t0, Duration::from_secs(17));
    assert!(schedule.sleep(Some(&short), before_due).unwrap() <= Duration::from_secs(3));
    // The wall clock jumped 25 s (a suspended VM, a stepped clock) while
    // the monotonic sleep ran 3 s: the next look renews.
    let jumped = Now {
        wall: t0.wall + Duration::from_secs(25),
        mono: t0.mono + Duration::from_secs(3),
    };
    assert_eq!(schedule.sleep(Some(&short), jumped), None);
    // The wall clock stepped back an hour: the monotonic clock still says
    // when, 25 s on.
    let stepped_back = Now {
        wall: t0.wall - Duration::from_secs(3600),
        mono: t0.mono + Duration::from_secs(25),
    };
    assert_eq!(schedule.sleep(Some(&short), stepped_back), None);
    // A day-long leaf: a look a minute (the bound), not every 2.4 hours.
    let day = leaf_received(&ca, t0.wall, Duration::from_secs(86_400));
    schedule.succeeded(&day, t0);
    assert_eq!(
        schedule.sleep(Some(&day), t0),
        Some(Duration::from_secs(60))
    );
}

#[test]
fn a_failing_control_plane_is_asked_again_within_seconds_once_the_certificate_expired() {
    let ca = TestCa::new("mesh root");
    let t0 = Now::read();
    let leaf = leaf_received(&ca, t0.wall, Duration::from_secs(30));
    let mut schedule = Schedule::start(t0);
    schedule.succeeded(&leaf, t0);
    // Valid: the backoff grows to a tenth of the lifetime (3 s) and never
    // waits past the expiry.
    let mut now = later(t0, Duration::from_secs(20));
    let mut waits = Vec::new();
    while now.wall < leaf.not_after {
        let (wait, first) = schedule.failed(Some(&leaf), now);
        assert_eq!(first, waits.is_empty(), "only the first failure warns");
        assert!(wait <= Duration::from_secs(3), "{waits:?} then {wait:?}");
        assert!(
            now.wall + wait <= leaf.not_after,
            "past the expiry: {wait:?} at {now:?}"
        );
        waits.push(wait);
        now = later(now, wait);
    }
    assert!(
        waits[0] >= Duration::from_millis(800) && waits[0] <= Duration::from_millis(1200),
        "the first retry after 1 s ±20 %: {waits:?}"
    );
    // Expired: the backoff keeps doubling (to 30 s) but the waits stay at
    // 5 s at most, for as long as the outage lasts.
    for _ in 0..10 {
        now = later(now, Duration::from_secs(5));
        let (wait, _) = schedule.failed(Some(&leaf), now);
        assert!(wait <= Duration::from_secs(5), "{wait:?}");
        let slice = schedule.sleep(Some(&leaf), now).unwrap();
        assert!(slice <= wait.min(Duration::from_secs(3)), "{slice:?}");
    }
    // A success starts the backoff over.
    let renewed = leaf_received(&ca, now.wall, Duration::from_secs(30));
    schedule.succeeded(&renewed, now);
    let (wait, first) = schedule.failed(Some(&renewed), later(now, Duration::from_secs(20)));
    assert!(first);
    assert!(wait <= Duration::from_millis(1200), "{wait:?}");
    // Without any certificate, as when expired: 5 s at most.
    let mut none = Schedule::start(t0);
    let longest = (0..10).map(|_| none.failed(None, t0).0).max().unwrap();
    assert!(
        longest >= Duration::from_secs(4) && longest <= Duration::from_secs(5),
        "{longest:?}"
    );
}

#[tokio::test]
async fn opaque_tcp_over_the_hop_never_reaches_another_port_on_loopback() {
    // The splice itself (a pod's own address) is covered in network
    // namespaces by tests/e2e/transparent.rs; on loopback only the app
    // port could be reached, and it speaks HTTP.
    use crate::listen::transparent::{Interception, MeshTcp};
    use crate::telemetry::direction::Direction;

    let ca = TestCa::new("mesh root");
    let (frontend, orders) = (
        identity_for(&ca, "frontend").await,
        identity_for(&ca, "orders").await,
    );
    // The app: a line echo.
    let app = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app_addr = app.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = app.accept().await {
            tokio::spawn(async move {
                let (mut read, mut write) = stream.split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
            });
        }
    });
    // Its sidecar's inbound: the mesh hop, meshlet-tcp to the app.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let inbound_addr = listener.local_addr().unwrap();
    let (_stop, stopped) = watch::channel(false);
    tokio::spawn(serve(
        "inbound",
        listener,
        Echo::default(),
        Arc::new(Limits::default()),
        Metrics::new("orders").listener("inbound"),
        stopped,
        ListenerOptions {
            interception: None,
            terminate: None,
            tls: Some(Arc::new(Acceptor::new(
                &orders,
                app_addr,
                Duration::from_secs(1),
                true,
            ))),
        },
    ));
    // The caller's transparent outbound, the destination a meshed pod.
    let interception = Arc::new(
        Interception::outbound(
            Vec::new(),
            Duration::from_secs(1),
            Metrics::new("frontend").tcp(Direction::Outbound),
        )
        .with_mesh(Some(MeshTcp {
            identity: Arc::clone(&frontend),
            lookup: Box::new(move |_| Some((inbound_addr, spiffe("orders")))),
        })),
    );
    let intercepted = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut client = tokio::net::TcpStream::connect(intercepted.local_addr().unwrap())
        .await
        .unwrap();
    let (accepted, _) = intercepted.accept().await.unwrap();
    tokio::spawn(async move {
        interception
            .splice(accepted, Some("10.1.2.3:5432".parse().unwrap()))
            .await
    });
    let _ = client.write_all(b"hello").await;
    let mut echoed = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut echoed))
        .await
        .expect("closed in time")
        .expect("closed cleanly");
    assert!(echoed.is_empty(), "nothing echoed: {echoed:?}");
}

#[tokio::test]
async fn without_a_certificate_tls_is_closed_and_plaintext_still_served() {
    let ca = TestCa::new("mesh root");
    let frontend = identity_for(&ca, "frontend").await;
    let waiting = WorkloadIdentity::new(Metrics::new("orders").identity());
    let echo = Echo::default();
    let (addr, _stop) = inbound(&waiting, echo.clone()).await;
    let pool = mesh_pool(&frontend, addr, "orders");
    let error = refusal(&pool, pool.send(http1_get("/")).await);
    assert_eq!(error.reason(), "tls_handshake_failed", "{error}");
    // A plaintext caller (a sidecar without a certificate) still gets in.
    let plain = ConnPool::new(addr, Arc::new(Limits::default()));
    let response = plain.send(http1_get("/")).await.unwrap();
    assert_eq!(
        text(response).await,
        "HTTP/1.1 orig=- host=orders uri=/ identity=none"
    );
}

#[tokio::test]
async fn after_goaway_the_next_request_opens_a_new_connection() {
    let ca = TestCa::new("mesh root");
    let (frontend, orders) = (
        identity_for(&ca, "frontend").await,
        identity_for(&ca, "orders").await,
    );
    let (addr, stop) = inbound(&orders, Echo::default()).await;
    let pool = mesh_pool(&frontend, addr, "orders");
    assert_eq!(pool.send(http1_get("/")).await.unwrap().status(), 200);
    // The peer shuts down gracefully (GOAWAY, close) and comes back on the
    // same address.
    let _ = stop.send(true);
    tokio::time::timeout(Duration::from_secs(5), async {
        while pool.has_mtls_connection() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the connection closes");
    let listener = TcpListener::bind(addr).await.unwrap();
    let (_stop, stopped) = watch::channel(false);
    let echo = Echo::default();
    tokio::spawn(serve(
        "inbound",
        listener,
        echo.clone(),
        Arc::new(Limits::default()),
        Metrics::new("orders").listener("inbound"),
        stopped,
        ListenerOptions {
            interception: None,
            terminate: None,
            tls: Some(Arc::new(Acceptor::new(
                &orders,
                addr,
                Duration::from_secs(1),
                true,
            ))),
        },
    ));
    assert_eq!(pool.send(http1_get("/")).await.unwrap().status(), 200);
    assert_eq!(echo.clients.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn a_request_retried_after_a_failed_mesh_connect_keeps_its_original_protocol() {
    // Forwarding retries a connect failure on another endpoint with the
    // request the pool handed back; the far side must still learn that
    // the caller spoke HTTP/1.1 (else an HTTP/1 app would get h2c).
    let ca = TestCa::new("mesh root");
    let (frontend, orders) = (
        identity_for(&ca, "frontend").await,
        identity_for(&ca, "orders").await,
    );
    let dead = mesh_pool(&frontend, crate::testing::refusing_addr().await, "orders");
    let request = match dead.send(http1_get("/orders/7")).await {
        Err(SendError::Connect { request, .. }) => *request,
        other => panic!("expected a connect failure, got {other:?}"),
    };
    let (addr, _stop) = inbound(&orders, Echo::default()).await;
    let alive = mesh_pool(&frontend, addr, "orders");
    let response = alive.send(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let seen = text(response).await;
    assert!(seen.contains("orig=HTTP/1.1"), "{seen}");
}
