//! The client against raw loopback servers that answer (or stall) exactly
//! as each test needs.

use std::time::Duration;

use http::{Method, StatusCode};
use http_body_util::Full;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::*;

/// A server that reads one request head, hands it to the test and writes
/// `answer` (then keeps the connection open for `linger`).
async fn serve_once(
    answer: &'static [u8],
    linger: Duration,
) -> (String, tokio::sync::oneshot::Receiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let authority = listener.local_addr().unwrap().to_string();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = stream.read(&mut buf).await.unwrap();
            if n == 0 {
                return;
            }
            head.extend_from_slice(&buf[..n]);
        }
        let _ = tx.send(String::from_utf8_lossy(&head).into_owned());
        stream.write_all(answer).await.unwrap();
        tokio::time::sleep(linger).await;
    });
    (authority, rx)
}

fn get(authority: &str, path: &str) -> Request<Full<Bytes>> {
    request(Method::GET, authority, path)
        .body(Full::new(Bytes::new()))
        .unwrap()
}

#[tokio::test]
async fn fetch_reads_status_headers_and_body_and_sends_host_and_agent() {
    let (authority, head) = serve_once(
        b"HTTP/1.1 201 Created\r\ncontent-length: 5\r\nx-a: b\r\n\r\nhello",
        Duration::ZERO,
    )
    .await;
    let client = Client::new().user_agent("meshlet-test");
    let reply = client
        .fetch(&authority, get(&authority, "/x?y=1"))
        .await
        .unwrap();
    assert_eq!(reply.status, StatusCode::CREATED);
    assert_eq!(reply.header("x-a"), Some("b"));
    assert_eq!(reply.text(), "hello");
    let head = head.await.unwrap().to_ascii_lowercase();
    assert!(head.starts_with("get /x?y=1 http/1.1\r\n"), "{head}");
    assert!(head.contains(&format!("host: {authority}\r\n")), "{head}");
    assert!(head.contains("user-agent: meshlet-test\r\n"), "{head}");
}

#[tokio::test]
async fn a_request_s_own_user_agent_is_kept() {
    let (authority, head) = serve_once(b"HTTP/1.1 204 No Content\r\n\r\n", Duration::ZERO).await;
    let request = request(Method::GET, &authority, "/")
        .header("user-agent", "mine")
        .body(Full::new(Bytes::new()))
        .unwrap();
    Client::new()
        .user_agent("meshlet-test")
        .fetch(&authority, request)
        .await
        .unwrap();
    let head = head.await.unwrap().to_ascii_lowercase();
    assert!(head.contains("user-agent: mine\r\n"), "{head}");
    assert!(!head.contains("meshlet-test"), "{head}");
}

#[tokio::test]
async fn success_turns_a_non_2xx_answer_into_a_status_error() {
    let (authority, _head) = serve_once(
        b"HTTP/1.1 409 Conflict\r\ncontent-length: 6\r\n\r\ntaken\n",
        Duration::ZERO,
    )
    .await;
    let reply = Client::new()
        .fetch(&authority, get(&authority, "/"))
        .await
        .unwrap();
    let err = reply.success(&authority).unwrap_err();
    assert_eq!(err.status(), Some(StatusCode::CONFLICT));
    assert_eq!(
        err.to_string(),
        format!("{authority} answered 409 Conflict: taken")
    );
}

#[tokio::test]
async fn a_refused_connection_names_the_peer_and_has_a_short_cause() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let authority = format!("127.0.0.1:{port}");
    let err = Client::new()
        .connect_timeout(Duration::from_secs(5))
        .fetch(&authority, get(&authority, "/"))
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::Connect { .. }), "{err:?}");
    assert_eq!(err.cause(), "connection refused");
    assert!(err
        .to_string()
        .starts_with(&format!("cannot connect to {authority}: ")));
}

#[tokio::test]
async fn an_unresolvable_authority_is_a_resolve_error() {
    let err = Client::new()
        .fetch("no-port-here", get("no-port-here", "/"))
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::Resolve { .. }), "{err:?}");
}

#[tokio::test]
async fn send_returns_at_the_head_and_fetch_times_out_on_a_stalled_body() {
    // The head promises 10 bytes; 2 arrive, then nothing.
    const STALLED: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhi";
    // Long enough for connect and head on a busy machine; the stalled body
    // (the server lingers 30 s) is what times out.
    let client = Client::new().timeout(Duration::from_secs(2));

    let (authority, _head) = serve_once(STALLED, Duration::from_secs(30)).await;
    let response = client.send(&authority, get(&authority, "/")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);

    let (authority, _head) = serve_once(STALLED, Duration::from_secs(30)).await;
    let err = client
        .fetch(&authority, get(&authority, "/"))
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::Timeout { .. }), "{err:?}");
    assert_eq!(err.cause(), "timeout");
}

#[tokio::test]
async fn a_server_that_never_answers_times_out() {
    let (authority, _head) = serve_once(b"", Duration::from_secs(30)).await;
    let err = Client::new()
        .timeout(Duration::from_millis(200))
        .send(&authority, get(&authority, "/"))
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("{authority} did not answer within 200ms")
    );
}

/// A CA and a loopback HTTPS server with a certificate for `sans` that it
/// signed. The server answers one request with `200 secure` and hands its
/// request head to the test.
struct TlsFixture {
    ca_pem: String,
    authority: String,
    head: tokio::sync::oneshot::Receiver<String>,
}

async fn tls_server(sans: &[&str]) -> TlsFixture {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate().unwrap();
    let names: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
    let leaf = CertificateParams::new(names)
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();

    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(leaf.der().to_vec())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, head) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let Ok(mut stream) = acceptor.accept(tcp).await else {
            return;
        };
        let mut received = Vec::new();
        let mut buf = [0u8; 1024];
        while !received.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = stream.read(&mut buf).await.unwrap();
            if n == 0 {
                return;
            }
            received.extend_from_slice(&buf[..n]);
        }
        let _ = tx.send(String::from_utf8_lossy(&received).into_owned());
        let _ = stream
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nsecure")
            .await;
        let _ = stream.shutdown().await;
    });
    TlsFixture {
        ca_pem: ca_cert.pem(),
        authority: format!("127.0.0.1:{port}"),
        head,
    }
}

#[tokio::test]
async fn tls_to_a_server_the_ca_signed_with_a_bearer_token() {
    let fixture = tls_server(&["127.0.0.1", "localhost"]).await;
    let config = client_config_from_ca_pem(fixture.ca_pem.as_bytes(), "test CA").unwrap();
    let client = Client::new().tls(config).bearer("s3cret").unwrap();
    assert!(format!("{client:?}").contains("bearer: true"));
    assert!(
        !format!("{client:?}").contains("s3cret"),
        "Debug never shows the token"
    );
    let authority = &fixture.authority;
    let reply = client
        .fetch(authority, get(authority, "/api"))
        .await
        .unwrap();
    assert_eq!(reply.text(), "secure");
    let head = fixture.head.await.unwrap().to_ascii_lowercase();
    assert!(head.contains("authorization: bearer s3cret\r\n"), "{head}");
}

#[tokio::test]
async fn tls_refuses_a_certificate_from_another_ca() {
    let fixture = tls_server(&["127.0.0.1"]).await;
    let other = tls_server(&["127.0.0.1"]).await;
    let config = client_config_from_ca_pem(other.ca_pem.as_bytes(), "other CA").unwrap();
    let authority = &fixture.authority;
    let err = Client::new()
        .tls(config)
        .fetch(authority, get(authority, "/"))
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::Tls { .. }), "{err:?}");
    assert!(
        err.to_string().contains("invalid peer certificate"),
        "{err}"
    );
}

#[tokio::test]
async fn tls_refuses_a_certificate_for_another_name() {
    let fixture = tls_server(&["orders.example"]).await;
    let config = client_config_from_ca_pem(fixture.ca_pem.as_bytes(), "test CA").unwrap();
    let authority = &fixture.authority;
    let err = Client::new()
        .tls(config)
        .fetch(authority, get(authority, "/"))
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::Tls { .. }), "{err:?}");
    assert!(err.to_string().contains("not valid for name"), "{err}");
}

#[tokio::test]
async fn connect_to_pins_the_address_and_tls_still_verifies_the_name() {
    // A certificate for a DNS name only; the client connects to the
    // server's address but verifies (and sends `Host`) for the name.
    let fixture = tls_server(&["cp.example"]).await;
    let config = client_config_from_ca_pem(fixture.ca_pem.as_bytes(), "test CA").unwrap();
    let addr: std::net::SocketAddr = fixture.authority.parse().unwrap();
    let authority = format!("cp.example:{}", addr.port());
    let reply = Client::new()
        .tls(config.clone())
        .connect_to(Some(addr))
        .fetch(&authority, get(&authority, "/"))
        .await
        .unwrap();
    assert_eq!(reply.text(), "secure");
    let head = fixture.head.await.unwrap().to_ascii_lowercase();
    assert!(head.contains(&format!("host: {authority}\r\n")), "{head}");
    // The same address under another name: the certificate does not fit.
    let other = tls_server(&["cp.example"]).await;
    let config = client_config_from_ca_pem(other.ca_pem.as_bytes(), "test CA").unwrap();
    let addr: std::net::SocketAddr = other.authority.parse().unwrap();
    let wrong = format!("other.example:{}", addr.port());
    let err = Client::new()
        .tls(config)
        .connect_to(Some(addr))
        .fetch(&wrong, get(&wrong, "/"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not valid for name"), "{err}");
}

#[test]
fn a_ca_bundle_without_certificates_is_refused() {
    let err = client_config_from_ca_pem(b"not pem at all", "ca.crt").unwrap_err();
    assert_eq!(
        err.to_string(),
        "the CA bundle ca.crt holds no PEM certificate"
    );
    let err = client_config_from_ca_file(std::path::Path::new("/nonexistent/ca.crt")).unwrap_err();
    assert!(err
        .to_string()
        .starts_with("cannot read the CA file /nonexistent/ca.crt"));
}

#[test]
fn server_names_come_from_the_authority_s_host() {
    use rustls::pki_types::ServerName;
    let name = |a: &str| tls::server_name(a).map(|n| n.to_str().into_owned());
    assert_eq!(name("cp.meshlet:15010").as_deref(), Some("cp.meshlet"));
    assert_eq!(name("127.0.0.1:15010").as_deref(), Some("127.0.0.1"));
    assert_eq!(name("[::1]:15010").as_deref(), Some("::1"));
    assert!(matches!(
        tls::server_name("[::1]:1"),
        Some(ServerName::IpAddress(_))
    ));
    assert_eq!(name("bad name:1"), None);
}

/// A server that reads one whole request (head and `content-length` body),
/// then closes without a byte of answer.
async fn read_then_close() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let authority = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 1024];
        loop {
            let n = stream.read(&mut buf).await.unwrap();
            seen.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&seen).to_lowercase();
            if let Some(end) = text.find("\r\n\r\n") {
                let length: usize = text
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map_or(0, |v| v.trim().parse().unwrap());
                if seen.len() >= end + 4 + length {
                    break;
                }
            }
            assert!(n > 0, "client closed first");
        }
        drop(stream);
    });
    authority
}

#[tokio::test]
async fn a_connection_closed_after_the_request_is_not_a_connect_failure() {
    let authority = read_then_close().await;
    let request = request(Method::POST, &authority, "/apply")
        .body(Full::new(Bytes::from_static(b"{\"files\":[]}")))
        .unwrap();
    let err = Client::new()
        .timeout(Duration::from_secs(5))
        .fetch(&authority, request)
        .await
        .unwrap_err();
    assert!(
        matches!(err, ClientError::ClosedBeforeAnswer { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("before answering"), "{err}");
    // Without a body too.
    let authority = read_then_close().await;
    let err = Client::new()
        .fetch(&authority, get(&authority, "/x"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, ClientError::ClosedBeforeAnswer { .. }),
        "{err:?}"
    );
}
