//! Requests a proxy must refuse without falling over (issue point 5): a
//! malformed request line, a request head over the size limit, conflicting
//! `Content-Length`/`Transfer-Encoding`, and a client that never finishes
//! its head (slowloris). Each gets the right 4xx (or, for slowloris, a
//! timely close), the connection is closed, nothing reaches the app, and
//! the sidecar goes on serving. A well-formed keep-alive connection, by
//! contrast, stays open across requests: closing happens only on errors.
//!
//! Every case is sent as raw bytes to both the inbound and the outbound
//! listener; the outbound side knows the app as service `app`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use meshlet_e2e::client::RawConnection;
use meshlet_e2e::inprocess::Sidecar;
use meshlet_e2e::{client, Upstream};

/// How long a refused connection may take to be closed by the sidecar.
const PATIENCE: Duration = Duration::from_secs(5);

/// An app and its sidecar, whose outbound listener also knows the app as
/// service `app`.
struct Mesh {
    app: Upstream,
    sidecar: Sidecar,
}

impl Mesh {
    async fn start(args: &[&str]) -> Mesh {
        let app = Upstream::start("app").await;
        let config = format!(
            "apiVersion: meshlet.dev/v1alpha1\nkind: Service\nmetadata: {{name: app}}\nspec:\n  endpoints:\n    - address: {}\n",
            app.addr
        );
        let mut builder = Sidecar::builder("app", app.port()).config(&config);
        for arg in args {
            builder = builder.arg(arg);
        }
        let sidecar = builder.start().await;
        Mesh { app, sidecar }
    }

    /// Both proxy listeners, named for assertion messages.
    fn listeners(&self) -> [(&'static str, SocketAddr); 2] {
        [
            ("inbound", self.sidecar.inbound),
            ("outbound", self.sidecar.outbound),
        ]
    }

    /// Sends `request` raw to `listener` and asserts the sidecar answers
    /// `status`, closes the connection, and the app never hears of it.
    async fn assert_refused(
        &self,
        listener: &str,
        request: &[u8],
        status: u16,
        reason: &str,
    ) -> String {
        let addr = self.listener(listener);
        let before = self.app.requests();
        let (text, closed) = client::raw(addr, request, PATIENCE).await;
        let first_line = text.lines().next().unwrap_or("");
        assert!(
            first_line.starts_with(&format!("HTTP/1.1 {status} ")),
            "{listener}: expected {status}, got {first_line:?}\n{text}"
        );
        assert!(
            closed,
            "{listener}: connection still open {PATIENCE:?} after a {status}\n{text}"
        );
        // The mesh says why, like in every response it generates.
        assert!(
            text.contains(&format!("x-meshlet-reason: {reason}\r\n")),
            "{listener}: expected reason {reason}\n{text}"
        );
        assert_eq!(
            self.app.requests(),
            before,
            "{listener}: a refused request reached the app"
        );
        text
    }

    /// A normal request through each listener still works, and /live is 200.
    async fn assert_still_serving(&self) {
        let inbound = client::get(self.sidecar.inbound, "/").await.unwrap();
        assert_eq!(
            (inbound.status.as_u16(), inbound.text().as_str()),
            (200, "hello from app")
        );
        let outbound = client::get_uri(self.sidecar.outbound, "http://app/")
            .await
            .unwrap();
        assert_eq!(
            (outbound.status.as_u16(), outbound.text().as_str()),
            (200, "hello from app")
        );
        let live = client::get(self.sidecar.admin, "/live").await.unwrap();
        assert_eq!(live.status, 200);
    }

    fn listener(&self, name: &str) -> SocketAddr {
        self.listeners()
            .into_iter()
            .find_map(|(n, addr)| (n == name).then_some(addr))
            .expect("known listener")
    }
}

/// A `GET /` whose head carries one header of `bytes` bytes.
fn request_with_header_of(bytes: usize) -> Vec<u8> {
    format!(
        "GET / HTTP/1.1\r\nHost: app\r\nX-Big: {}\r\n\r\n",
        "a".repeat(bytes)
    )
    .into_bytes()
}

#[tokio::test]
async fn a_malformed_request_line_gets_400_and_the_connection_closes() {
    let mesh = Mesh::start(&[]).await;
    for (listener, _) in mesh.listeners() {
        for request in [
            &b"GARBAGE\r\n\r\n"[..],
            b"GET / HTTP/9.9\r\nHost: app\r\n\r\n",
            b"GET /has space HTTP/1.1\r\nHost: app\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: app\r\nno colon here\r\n\r\n",
        ] {
            let text = mesh
                .assert_refused(listener, request, 400, "bad_request")
                .await;
            assert!(
                text.contains("malformed request head"),
                "{listener}: {text}"
            );
        }
    }
    mesh.assert_still_serving().await;
}

#[tokio::test]
async fn more_header_fields_than_allowed_get_431_with_a_reason() {
    let mesh = Mesh::start(&[]).await;
    let fields: String = (0..150).map(|i| format!("x-field-{i}: 1\r\n")).collect();
    let request = format!("GET / HTTP/1.1\r\nHost: app\r\n{fields}\r\n");
    for (listener, _) in mesh.listeners() {
        mesh.assert_refused(listener, request.as_bytes(), 431, "header_too_large")
            .await;
    }
    mesh.assert_still_serving().await;
}

#[tokio::test]
async fn a_head_over_the_default_64k_limit_gets_431_and_the_connection_closes() {
    let mesh = Mesh::start(&[]).await;
    for (listener, _) in mesh.listeners() {
        mesh.assert_refused(
            listener,
            &request_with_header_of(70 * 1024),
            431,
            "header_too_large",
        )
        .await;
    }
    mesh.assert_still_serving().await;
}

#[tokio::test]
async fn a_configured_header_limit_is_enforced_and_heads_under_it_pass() {
    let mesh = Mesh::start(&["--max-header-bytes", "16384"]).await;
    for (listener, addr) in mesh.listeners() {
        mesh.assert_refused(
            listener,
            &request_with_header_of(20 * 1024),
            431,
            "header_too_large",
        )
        .await;
        // 8 KB is under the configured limit: served, so the 431 above came
        // from that limit and not from some smaller one.
        let (text, _) = client::raw(
            addr,
            &[
                &request_with_header_of(8 * 1024)[..],
                b"GET / HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n",
            ]
            .concat(),
            PATIENCE,
        )
        .await;
        assert!(text.starts_with("HTTP/1.1 200 "), "{listener}: {text}");
    }
    mesh.assert_still_serving().await;
}

#[tokio::test]
async fn conflicting_content_length_and_transfer_encoding_get_400_and_never_reach_the_app() {
    let mesh = Mesh::start(&[]).await;
    for (listener, _) in mesh.listeners() {
        // Both orders: each is a request-smuggling vector on its own.
        for request in [
            &b"POST /upload HTTP/1.1\r\nHost: app\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"[..],
            b"POST /upload HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
        ] {
            let text = mesh.assert_refused(listener, request, 400, "bad_request").await;
            assert!(text.contains("Content-Length and Transfer-Encoding"), "{text}");
        }
    }
    mesh.assert_still_serving().await;
}

#[tokio::test]
async fn a_slowloris_client_is_cut_off_after_the_header_read_timeout() {
    let mesh = Mesh::start(&["--header-read-timeout", "500ms"]).await;
    for (listener, addr) in mesh.listeners() {
        let mut slow = RawConnection::open(addr).await;
        slow.send(b"GET / HTTP/1.1\r\nHost: app\r\nX-Still-Typ")
            .await;
        let stalled_at = Instant::now();

        // While that client stalls, others are served.
        mesh.assert_still_serving().await;

        let closed = slow.read_to_close(PATIENCE).await;
        let took = stalled_at.elapsed();
        assert!(
            closed.is_some(),
            "{listener}: a stalled head was still open after {PATIENCE:?}"
        );
        assert!(
            took < Duration::from_secs(3),
            "{listener}: closed only after {took:?} (timeout is 500ms)"
        );
        assert!(
            took >= Duration::from_millis(400),
            "{listener}: closed after {took:?}, before the 500ms timeout"
        );
    }
    assert_eq!(
        mesh.app.requests(),
        4,
        "only the well-formed requests arrived"
    );
    mesh.assert_still_serving().await;
}

#[tokio::test]
async fn a_keep_alive_connection_carries_two_requests_in_a_row() {
    let mesh = Mesh::start(&[]).await;
    for (listener, addr) in mesh.listeners() {
        let mut connection = RawConnection::open(addr).await;
        connection
            .send(b"GET / HTTP/1.1\r\nHost: app\r\n\r\n")
            .await;
        let first = connection.read_until("hello from app", PATIENCE).await;
        assert!(first.starts_with("HTTP/1.1 200 "), "{listener}: {first}");
        assert!(
            !first.to_ascii_lowercase().contains("connection: close"),
            "{listener}: a good request must not close the connection: {first}"
        );

        // Same connection, second request.
        connection
            .send(b"GET /headers HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n")
            .await;
        let second = connection
            .read_to_close(PATIENCE)
            .await
            .unwrap_or_else(|| panic!("{listener}: not closed after Connection: close"));
        assert!(second.starts_with("HTTP/1.1 200 "), "{listener}: {second}");
        assert!(
            second.contains(r#""upstream":"app""#),
            "{listener}: {second}"
        );
    }
    assert_eq!(mesh.app.requests(), 4);
}

#[tokio::test]
async fn a_client_that_connects_and_sends_nothing_is_cut_off() {
    let mesh = Mesh::start(&["--header-read-timeout", "500ms"]).await;
    for (listener, addr) in mesh.listeners() {
        let mut idle = RawConnection::open(addr).await;
        let started = Instant::now();
        assert!(
            idle.read_to_close(PATIENCE).await.is_some(),
            "{listener}: a silent connection was still open after {PATIENCE:?}"
        );
        assert!(
            started.elapsed() >= Duration::from_millis(400),
            "{listener}: closed too early"
        );
    }
    mesh.assert_still_serving().await;
}

#[tokio::test]
async fn a_smuggling_attempt_later_on_a_keep_alive_connection_is_refused() {
    let mesh = Mesh::start(&[]).await;
    for (listener, addr) in mesh.listeners() {
        let before = mesh.app.requests();
        let mut connection = RawConnection::open(addr).await;
        // A good request with a body, answered; then, on the same
        // connection, one with both framing headers whose "body" hides a
        // second request.
        connection
            .send(b"POST /upload HTTP/1.1\r\nHost: app\r\nContent-Length: 5\r\n\r\nhello")
            .await;
        let first = connection.read_until("\r\n\r\n5", PATIENCE).await;
        assert!(first.starts_with("HTTP/1.1 200 OK"), "{listener}: {first}");
        connection
            .send(
                b"POST /upload HTTP/1.1\r\nHost: app\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n\
                  0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: app\r\n\r\n",
            )
            .await;
        let text = connection
            .read_to_close(PATIENCE)
            .await
            .expect("connection closed");
        assert!(
            text.starts_with("HTTP/1.1 400 Bad Request"),
            "{listener}: {text}"
        );
        assert!(text.contains("x-meshlet-reason: bad_request"), "{text}");
        assert_eq!(
            mesh.app.requests(),
            before + 1,
            "{listener}: only the first request reached the app"
        );
    }
}

#[tokio::test]
async fn an_idle_keep_alive_connection_outlives_the_head_timeout_but_not_the_idle_timeout() {
    let mesh = Mesh::start(&[
        "--header-read-timeout",
        "300ms",
        "--client-idle-timeout",
        "1500ms",
    ])
    .await;
    for (listener, addr) in mesh.listeners() {
        let mut connection = RawConnection::open(addr).await;
        connection
            .send(b"GET / HTTP/1.1\r\nHost: app\r\n\r\n")
            .await;
        connection.read_until("hello from app", PATIENCE).await;
        // Idle for longer than the head timeout: that timer is for heads
        // being received, not for the quiet between requests.
        tokio::time::sleep(Duration::from_millis(600)).await;
        connection
            .send(b"GET / HTTP/1.1\r\nHost: app\r\n\r\n")
            .await;
        connection.read_until("hello from app", PATIENCE).await;
        // Then quiet for good: closed once the idle timeout has passed.
        assert_closed_when_idle(&mut connection, listener, Duration::from_millis(1200)).await;
    }
}

/// Waits for the sidecar to close `connection`, quiet from now on, and
/// asserts it was not before `at_least` of idleness.
async fn assert_closed_when_idle(
    connection: &mut RawConnection,
    listener: &str,
    at_least: Duration,
) {
    let idle_since = Instant::now();
    assert!(
        connection.read_to_close(PATIENCE).await.is_some(),
        "{listener}: idle connection never closed"
    );
    let idle = idle_since.elapsed();
    assert!(
        idle >= at_least,
        "{listener}: closed after only {idle:?} of idleness"
    );
}

/// The idle timeout is for the quiet between requests: a response that
/// streams for longer (server-sent events, a watch) is not cut off by it.
#[tokio::test]
async fn a_response_streaming_longer_than_the_idle_timeout_is_not_cut_off() {
    let mesh = Mesh::start(&["--client-idle-timeout", "800ms"]).await;
    for (listener, addr) in mesh.listeners() {
        let mut connection = RawConnection::open(addr).await;
        // Eight pieces 300 ms apart: 2.1 s of streaming, never 800 ms quiet.
        connection
            .send(b"GET /drip?ms=300&pieces=8 HTTP/1.1\r\nHost: app\r\n\r\n")
            .await;
        // The whole chunked body, up to its last chunk.
        let streamed = connection.read_until("\r\n0\r\n\r\n", PATIENCE).await;
        assert!(
            streamed.starts_with("HTTP/1.1 200 "),
            "{listener}: {streamed}"
        );
        assert!(streamed.contains("piece 7\n"), "{listener}: {streamed}");
        // The connection still serves the next request...
        connection
            .send(b"GET / HTTP/1.1\r\nHost: app\r\n\r\n")
            .await;
        connection.read_until("hello from app", PATIENCE).await;
        // ...and is closed once it has really been idle for the timeout.
        assert_closed_when_idle(&mut connection, listener, Duration::from_millis(600)).await;
    }
}

#[tokio::test]
async fn a_pipelined_smuggling_attempt_still_lets_the_earlier_request_finish() {
    let mesh = Mesh::start(&[]).await;
    for (listener, addr) in mesh.listeners() {
        let before = mesh.app.requests();
        let mut connection = RawConnection::open(addr).await;
        // Both requests in one write: the guard sees the bad head while the
        // slow first request is still in flight.
        connection
            .send(
                b"GET /slow?ms=300 HTTP/1.1\r\nHost: app\r\n\r\n\
                  POST /upload HTTP/1.1\r\nHost: app\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n\
                  0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: app\r\n\r\n",
            )
            .await;
        let text = connection
            .read_to_close(PATIENCE)
            .await
            .expect("connection closed");
        // Status lines in order (a body need not end with a newline).
        let statuses: Vec<&str> = text
            .match_indices("HTTP/1.1 ")
            .map(|(at, _)| &text[at..at + 12])
            .collect();
        assert_eq!(
            statuses,
            ["HTTP/1.1 200", "HTTP/1.1 400"],
            "{listener}: {text}"
        );
        assert!(text.contains("slow done"), "{listener}: {text}");
        assert_eq!(
            mesh.app.requests(),
            before + 1,
            "{listener}: only the first request reached the app"
        );
    }
}
