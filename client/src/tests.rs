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
    let client = Client::new().timeout(Duration::from_millis(300));

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
