//! The accept loop on loopback sockets: plain and TLS service, deadlines,
//! eviction of unproven connections, the connection cap, draining.

use std::net::SocketAddr;
use std::time::Duration;

use axum::routing::get;
use bytes::Bytes;
use http::Method;
use http_body_util::Full;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

/// `/x` answers `ok`; `/big` 1 MiB; `/slow` tells `arrived` and answers
/// after 300 ms.
fn app(arrived: Arc<tokio::sync::Notify>) -> Router {
    Router::new()
        .route("/x", get(|| async { "ok" }))
        .route("/big", get(|| async { vec![b'a'; 1 << 20] }))
        .route(
            "/slow",
            get(move || async move {
                arrived.notify_one();
                tokio::time::sleep(Duration::from_millis(300)).await;
                "slow"
            }),
        )
}

struct Server {
    addr: SocketAddr,
    slow_arrived: Arc<tokio::sync::Notify>,
    stop: watch::Sender<bool>,
    done: tokio::task::JoinHandle<()>,
}

async fn start(limits: Limits, tls: Option<TlsAcceptor>) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = watch::channel(false);
    let slow_arrived = Arc::new(tokio::sync::Notify::new());
    let done = tokio::spawn(serve(
        listener,
        tls,
        app(slow_arrived.clone()),
        limits,
        stopped,
    ));
    Server {
        addr,
        slow_arrived,
        stop,
        done,
    }
}

async fn get_x(client: &meshlet_client::Client, addr: SocketAddr) -> Result<String, String> {
    let authority = addr.to_string();
    let request = meshlet_client::request(Method::GET, &authority, "/x")
        .body(Full::new(Bytes::new()))
        .unwrap();
    client
        .fetch(&authority, request)
        .await
        .map(|reply| reply.text())
        .map_err(|e| e.to_string())
}

/// Whether the server closes `stream` within `patience` (reads EOF or an
/// error).
async fn closed_within(stream: &mut TcpStream, patience: Duration) -> bool {
    let mut buf = [0u8; 256];
    loop {
        match tokio::time::timeout(patience, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

fn quick() -> meshlet_client::Client {
    meshlet_client::Client::new().timeout(Duration::from_secs(5))
}

#[tokio::test]
async fn serves_plain_http() {
    let server = start(Limits::default(), None).await;
    assert_eq!(get_x(&quick(), server.addr).await.unwrap(), "ok");
}

#[tokio::test]
async fn a_silent_connection_is_closed_after_the_head_deadline() {
    let limits = Limits {
        header_timeout: Duration::from_millis(200),
        idle_timeout: Duration::from_millis(200),
        ..Limits::default()
    };
    let server = start(limits, None).await;
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    // Half a request head, then nothing.
    silent
        .write_all(b"GET /x HTTP/1.1\r\nhost: a\r\n")
        .await
        .unwrap();
    assert!(closed_within(&mut silent, Duration::from_secs(5)).await);
}

#[tokio::test]
async fn a_flood_of_silent_connections_does_not_keep_a_real_client_out() {
    let limits = Limits {
        max_unproven: 8,
        header_timeout: Duration::from_secs(60),
        ..Limits::default()
    };
    let server = start(limits, None).await;
    let mut flood = Vec::new();
    for _ in 0..40 {
        let mut stream = TcpStream::connect(server.addr).await.unwrap();
        stream.write_all(b"GET /x HTTP/1.1\r\n").await.unwrap();
        flood.push(stream);
    }
    assert_eq!(get_x(&quick(), server.addr).await.unwrap(), "ok");
    // All but the newest max_unproven silent ones were evicted.
    let mut closed = 0;
    for stream in &mut flood {
        if closed_within(stream, Duration::from_millis(500)).await {
            closed += 1;
        }
    }
    assert!(
        closed >= 40 - 8,
        "only {closed} of 40 silent connections evicted"
    );
}

/// Sends `GET path` on `stream` and reads the status line.
async fn request_on(stream: &mut TcpStream, path: &str) -> String {
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nhost: a\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = [0u8; 256];
    let n = stream.read(&mut buf).await.unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test]
async fn past_the_cap_the_longest_idle_proven_connection_makes_room() {
    let limits = Limits {
        max_connections: 2,
        header_timeout: Duration::from_secs(60),
        idle_timeout: Duration::from_secs(60),
        ..Limits::default()
    };
    let stats = Arc::new(ConnectionStats::default());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_stop, stopped) = watch::channel(false);
    let arrived = Arc::new(tokio::sync::Notify::new());
    tokio::spawn(serve_counted(
        listener,
        None,
        app(arrived),
        limits,
        stopped,
        stats.clone(),
    ));
    let mut older = TcpStream::connect(addr).await.unwrap();
    assert!(request_on(&mut older, "/x")
        .await
        .starts_with("HTTP/1.1 200"));
    let mut newer = TcpStream::connect(addr).await.unwrap();
    assert!(request_on(&mut newer, "/x")
        .await
        .starts_with("HTTP/1.1 200"));
    assert_eq!(stats.open(), 2);
    // Both proven and idle: a newcomer is served, the one idle the
    // longest is closed for it.
    let mut third = TcpStream::connect(addr).await.unwrap();
    assert!(request_on(&mut third, "/x")
        .await
        .starts_with("HTTP/1.1 200"));
    assert!(closed_within(&mut older, Duration::from_secs(5)).await);
    assert_eq!(stats.evicted(), 1);
    assert!(request_on(&mut third, "/x")
        .await
        .starts_with("HTTP/1.1 200"));
}

#[tokio::test]
async fn at_the_cap_an_idle_connection_goes_before_a_client_still_proving_itself() {
    let limits = Limits {
        max_connections: 2,
        header_timeout: Duration::from_secs(60),
        idle_timeout: Duration::from_secs(60),
        ..Limits::default()
    };
    let server = start(limits, None).await;
    let mut idle = TcpStream::connect(server.addr).await.unwrap();
    assert!(request_on(&mut idle, "/x")
        .await
        .starts_with("HTTP/1.1 200"));
    // A client that has not sent its head yet (a TLS handshake, say).
    let mut fresh = TcpStream::connect(server.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut third = TcpStream::connect(server.addr).await.unwrap();
    assert!(closed_within(&mut idle, Duration::from_secs(5)).await);
    assert!(request_on(&mut fresh, "/x")
        .await
        .starts_with("HTTP/1.1 200"));
    assert!(request_on(&mut third, "/x")
        .await
        .starts_with("HTTP/1.1 200"));
}

#[tokio::test]
async fn past_the_cap_of_busy_connections_a_new_one_is_closed() {
    let limits = Limits {
        max_connections: 2,
        header_timeout: Duration::from_secs(60),
        ..Limits::default()
    };
    let server = start(limits, None).await;
    // Two connections each with a request in flight (300 ms).
    let mut busy = Vec::new();
    for _ in 0..2 {
        let mut stream = TcpStream::connect(server.addr).await.unwrap();
        stream
            .write_all(b"GET /slow HTTP/1.1\r\nhost: a\r\n\r\n")
            .await
            .unwrap();
        server.slow_arrived.notified().await;
        busy.push(stream);
    }
    let mut third = TcpStream::connect(server.addr).await.unwrap();
    assert!(closed_within(&mut third, Duration::from_secs(5)).await);
    // The busy ones were not evicted: both get their answer.
    for stream in &mut busy {
        let mut buf = [0u8; 256];
        let n = stream.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    }
    // Idle now: a newcomer gets a slot.
    let ok = crate::listener::tests::wait_until(Duration::from_secs(5), || async {
        get_x(&quick(), server.addr).await.is_ok()
    })
    .await;
    assert!(ok, "no slot for a newcomer once the busy ones went idle");
}

/// Review finding H3 of issue 16: a client that pipelines requests for
/// large answers and never reads is busy forever in hyper's eyes (a
/// response in flight), so eviction never picks it; the write deadline
/// closes it and frees its slot for others.
#[tokio::test]
async fn a_client_that_never_reads_its_responses_loses_its_slot() {
    let limits = Limits {
        max_connections: 2,
        header_timeout: Duration::from_secs(60),
        idle_timeout: Duration::from_secs(60),
        write_timeout: Duration::from_millis(300),
        ..Limits::default()
    };
    let stats = Arc::new(ConnectionStats::default());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_stop, stopped) = watch::channel(false);
    let arrived = Arc::new(tokio::sync::Notify::new());
    tokio::spawn(serve_counted(
        listener,
        None,
        app(arrived),
        limits,
        stopped,
        stats.clone(),
    ));
    let mut stuck = Vec::new();
    for _ in 0..2 {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let pipelined = "GET /big HTTP/1.1\r\nhost: a\r\n\r\n".repeat(32);
        stream.write_all(pipelined.as_bytes()).await.unwrap();
        stuck.push(stream); // never read
    }
    assert!(
        wait_until(Duration::from_secs(2), || async { stats.open() == 2 }).await,
        "both readers hold a slot"
    );
    let freed = wait_until(Duration::from_secs(10), || async { stats.open() == 0 }).await;
    assert!(
        freed,
        "{} slots still held by clients that never read",
        stats.open()
    );
    assert_eq!(
        stats.evicted(),
        0,
        "closed by the write deadline, not evicted"
    );
    assert_eq!(get_x(&quick(), addr).await.unwrap(), "ok");
    drop(stuck);
}

/// The other side of the write deadline: a client reading a large answer
/// slowly but steadily (a sidecar on a busy node taking a big snapshot)
/// keeps its connection, although the kernel leaves each of the server's
/// writes pending for longer than the limit (it wakes a writer only once a
/// third of the send buffer has drained): the clock goes by the bytes the
/// client acknowledged.
#[tokio::test]
async fn a_client_reading_a_large_answer_slowly_but_steadily_keeps_its_connection() {
    let limits = Limits {
        // Well above the client's pace below, so that only a stall of the
        // clock by acknowledged bytes, not a busy machine, cuts it off.
        write_timeout: Duration::from_secs(2),
        ..Limits::default()
    };
    let stats = Arc::new(ConnectionStats::default());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_stop, stopped) = watch::channel(false);
    let arrived = Arc::new(tokio::sync::Notify::new());
    tokio::spawn(serve_counted(
        listener,
        None,
        app(arrived),
        limits,
        stopped,
        stats.clone(),
    ));
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4 * 1024).unwrap();
    let mut stream = socket.connect(addr).await.unwrap();
    // 8 MiB asked for: more than the kernel's largest send buffer.
    let pipelined = "GET /big HTTP/1.1\r\nhost: a\r\n\r\n".repeat(8);
    stream.write_all(pipelined.as_bytes()).await.unwrap();
    // 2 KiB every 100 ms (20 KiB/s; the kernel opens the window every
    // 4 KiB) for 4 s: twice the limit.
    let mut buf = [0u8; 2048];
    let mut read = 0;
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(4) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let n = stream.read(&mut buf).await.unwrap();
        assert_ne!(n, 0, "cut off after {read} bytes, {:?}", started.elapsed());
        read += n;
    }
    assert_eq!(stats.open(), 1);
}

#[tokio::test]
async fn a_connection_without_a_first_request_is_closed_after_the_header_timeout() {
    let limits = Limits {
        header_timeout: Duration::from_millis(200),
        idle_timeout: Duration::from_secs(60),
        ..Limits::default()
    };
    let server = start(limits, None).await;
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    assert!(closed_within(&mut silent, Duration::from_secs(5)).await);
    // A proven one stays past that deadline (idle limit 60 s).
    let mut proven = TcpStream::connect(server.addr).await.unwrap();
    assert!(request_on(&mut proven, "/x")
        .await
        .starts_with("HTTP/1.1 200"));
    assert!(!closed_within(&mut proven, Duration::from_millis(600)).await);
    assert!(request_on(&mut proven, "/x")
        .await
        .starts_with("HTTP/1.1 200"));
}

#[tokio::test]
async fn limits_fit_the_open_file_limit() {
    let limits = Limits::default().within_fd_limit(1024, 64);
    assert_eq!(limits.max_connections, 960);
    assert_eq!(limits.max_unproven, 256);
    let tiny = Limits::default().within_fd_limit(100, 64);
    assert_eq!((tiny.max_connections, tiny.max_unproven), (36, 18));
    let roomy = Limits::default().within_fd_limit(1 << 20, 64);
    assert_eq!(roomy.max_connections, 2048);
}

#[tokio::test]
async fn shutdown_lets_a_request_in_flight_finish() {
    let server = start(Limits::default(), None).await;
    let authority = server.addr.to_string();
    let request = meshlet_client::request(Method::GET, &authority, "/slow")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let client = quick();
    let in_flight = tokio::spawn(async move { client.fetch(&authority, request).await });
    // Shut down once the request is being handled.
    server.slow_arrived.notified().await;
    server.stop.send_replace(true);
    let reply = in_flight.await.unwrap().unwrap();
    assert_eq!(reply.text(), "slow");
    tokio::time::timeout(Duration::from_secs(5), server.done)
        .await
        .expect("serve returns after draining")
        .unwrap();
    assert!(
        TcpStream::connect(server.addr).await.is_err(),
        "no longer accepting"
    );
}

/// A CA, and an acceptor with a certificate it signed for 127.0.0.1.
fn tls_fixture() -> (String, TlsAcceptor) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(cert.der().to_vec())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .unwrap();
    (ca.pem(), TlsAcceptor::from(Arc::new(config)))
}

#[tokio::test]
async fn serves_https_and_bounds_the_handshake() {
    let (ca_pem, acceptor) = tls_fixture();
    let limits = Limits {
        // Long enough for the TLS client's own handshake on a busy
        // machine; the silent client below is closed well within 5 s.
        handshake_timeout: Duration::from_secs(2),
        ..Limits::default()
    };
    let server = start(limits, Some(acceptor)).await;
    let config = meshlet_client::client_config_from_ca_pem(ca_pem.as_bytes(), "ca").unwrap();
    assert_eq!(
        get_x(&quick().tls(config), server.addr).await.unwrap(),
        "ok"
    );
    // Plain HTTP to the TLS port gets nothing served.
    assert!(get_x(&quick(), server.addr).await.is_err());
    // A client that never starts the handshake is closed after its deadline.
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    assert!(closed_within(&mut silent, Duration::from_secs(5)).await);
}

/// Polls `check` until it holds or `patience` passes.
pub(super) async fn wait_until<F, Fut>(patience: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
