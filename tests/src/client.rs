//! Minimal HTTP clients for tests: one fresh connection per request, so a
//! test controls exactly which protocol and connection it uses.
//!
//! Plain HTTP/1.1 one-shots (`get`, `send`, `post_json`) go through
//! `meshlet-client` (the one the programs use) without TLS or token: for
//! sidecars, apps and collectors. The control plane is reached through
//! [`crate::access::CpAccess`] (TLS + bearer); [`WatchStream`] too. The h2c and
//! raw-socket helpers stay hand-made: they control the protocol bytes.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// A fully read response (meshlet's own client's).
pub use meshlet_client::Reply;

/// `n` GETs of `uri` through the sidecar listener `addr`, `lanes` at a
/// time (each lane one request after another): every reply with how long
/// it took. A request without an answer fails the test.
pub async fn get_many(
    addr: SocketAddr,
    uri: &str,
    n: usize,
    lanes: usize,
) -> Vec<(Reply, Duration)> {
    let tasks: Vec<_> = (0..lanes)
        .map(|lane| {
            let uri = uri.to_owned();
            let count = n / lanes + usize::from(lane < n % lanes);
            tokio::spawn(async move {
                let mut replies = Vec::with_capacity(count);
                for _ in 0..count {
                    let started = Instant::now();
                    let reply = get_uri(addr, &uri).await.expect("an answer");
                    replies.push((reply, started.elapsed()));
                }
                replies
            })
        })
        .collect();
    let mut all = Vec::with_capacity(n);
    for task in tasks {
        all.extend(task.await.expect("lane finished"));
    }
    all
}

/// `GET path` over HTTP/1.1 to `addr`.
pub async fn get(addr: SocketAddr, path: &str) -> Result<Reply, Error> {
    let request = Request::get(path)
        .header("host", addr.to_string())
        .body(Full::new(Bytes::new()))?;
    send(addr, request).await
}

/// `GET uri` over HTTP/1.1 to `addr`, sent as given (no `Host` header
/// added): through an outbound listener `uri` names the service, as in
/// `http://orders/path`.
pub async fn get_uri(addr: SocketAddr, uri: &str) -> Result<Reply, Error> {
    let request = Request::get(uri).body(Full::new(Bytes::new()))?;
    send(addr, request).await
}

/// `POST path` with a JSON body.
pub async fn post_json(addr: SocketAddr, path: &str, body: &serde_json::Value) -> Reply {
    let request = Request::post(path)
        .header("host", addr.to_string())
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("valid request");
    send(addr, request).await.expect("POST answered")
}

/// A client of the control plane's watch stream (newline-delimited JSON
/// events), tracking the revision it holds.
#[derive(Debug)]
pub struct WatchStream {
    body: hyper::body::Incoming,
    buffer: Vec<u8>,
    pub revision: u64,
    /// The event the stream opened with (a snapshot or a delta).
    pub first: serde_json::Value,
}

impl WatchStream {
    /// Opens `GET /api/v1/watch?revision=R` (TLS, admin token) and reads
    /// the first event ([`Self::first`]).
    pub async fn open(cp: &impl crate::access::ControlPlaneRef, revision: u64) -> WatchStream {
        let cp = cp.access();
        let authority = cp.authority();
        let request = meshlet_client::request(
            http::Method::GET,
            &authority,
            &format!("/api/v1/watch?revision={revision}"),
        )
        .body(Full::new(Bytes::new()))
        .expect("valid request");
        let response = cp
            .client()
            .send(&authority, request)
            .await
            .expect("watch answered");
        assert_eq!(response.status(), 200);
        let mut watch = WatchStream {
            body: response.into_body(),
            buffer: Vec::new(),
            revision,
            first: serde_json::Value::Null,
        };
        watch.first = watch.next_event().await;
        watch
    }

    /// Reads the next event and returns it; updates [`Self::revision`].
    pub async fn next_event(&mut self) -> serde_json::Value {
        loop {
            if let Some(end) = self.buffer.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buffer.drain(..=end).collect();
                let event: serde_json::Value =
                    serde_json::from_slice(&line).expect("watch event is JSON");
                if let Some(revision) = event["revision"].as_u64() {
                    self.revision = revision;
                }
                return event;
            }
            let frame = tokio::time::timeout(Duration::from_secs(30), self.body.frame())
                .await
                .expect("watch event within 30s")
                .expect("watch stream open")
                .expect("watch stream readable");
            if let Ok(data) = frame.into_data() {
                self.buffer.extend_from_slice(&data);
            }
        }
    }

    /// Reads events until the held revision is above `revision`.
    pub async fn until_revision_above(&mut self, revision: u64) {
        while self.revision <= revision {
            self.next_event().await;
        }
    }
}

/// Sends `request` over a new HTTP/1.1 connection to `addr` (plain).
pub async fn send<B>(addr: SocketAddr, request: Request<B>) -> Result<Reply, Error>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Error>,
{
    Ok(meshlet_client::Client::new()
        .fetch(&addr.to_string(), request)
        .await?)
}

/// Sends `request` over a new h2c (prior knowledge) connection to `addr`.
pub async fn send_h2(addr: SocketAddr, request: Request<Full<Bytes>>) -> Result<Reply, Error> {
    let stream = TcpStream::connect(addr).await?;
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let response = sender.send_request(request).await?;
    read_reply(response).await
}

async fn read_reply(response: http::Response<hyper::body::Incoming>) -> Result<Reply, Error> {
    let (parts, body) = response.into_parts();
    let collected = body.collect().await?;
    let trailers = collected.trailers().cloned();
    Ok(Reply {
        status: parts.status,
        version: parts.version,
        headers: parts.headers,
        body: collected.to_bytes(),
        trailers,
    })
}

/// Writes raw bytes and reads until the server closes the connection (or
/// `patience` passes). Returns what was read and whether the server closed.
pub async fn raw(addr: SocketAddr, request: &[u8], patience: Duration) -> (String, bool) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request).await.expect("write");
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    let closed = loop {
        match tokio::time::timeout(patience, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => received.extend_from_slice(&buf[..n]),
            Err(_) => break false,
        }
    };
    (String::from_utf8_lossy(&received).into_owned(), closed)
}

/// One raw TCP connection that a test reads from step by step, to see
/// whether and when the sidecar closes it.
pub struct RawConnection {
    stream: TcpStream,
    received: Vec<u8>,
}

impl RawConnection {
    pub async fn open(addr: SocketAddr) -> RawConnection {
        let stream = TcpStream::connect(addr).await.expect("connect");
        RawConnection {
            stream,
            received: Vec::new(),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
    }

    /// The next whole HTTP/1.1 response (a `content-length` or chunked
    /// body; none for 204 and 304) as text, its head as it came and its
    /// body decoded (trailers dropped). What arrived after it is kept for
    /// the next call. Panics after `patience`, on close, or on a response
    /// framed otherwise.
    pub async fn read_response(&mut self, patience: Duration) -> String {
        let deadline = Instant::now() + patience;
        loop {
            if let Some((len, text)) = whole_response(&self.received) {
                self.received.drain(..len);
                return text;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let mut buf = [0u8; 16 * 1024];
            let so_far = String::from_utf8_lossy(&self.received).into_owned();
            match tokio::time::timeout(left, self.stream.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => panic!("connection closed in a response: {so_far}"),
                Ok(Ok(n)) => self.received.extend_from_slice(&buf[..n]),
                Err(_) => panic!("no whole response within {patience:?}: {so_far}"),
            }
        }
    }

    /// Reads until `needle` has arrived (counting only what arrived since
    /// the last call), or panics after `patience` or on close.
    pub async fn read_until(&mut self, needle: &str, patience: Duration) -> String {
        self.received.clear();
        let deadline = Instant::now() + patience;
        loop {
            let text = String::from_utf8_lossy(&self.received).into_owned();
            if text.contains(needle) {
                return text;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let mut buf = [0u8; 4096];
            match tokio::time::timeout(left, self.stream.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => panic!("connection closed before {needle:?}: {text}"),
                Ok(Ok(n)) => self.received.extend_from_slice(&buf[..n]),
                Err(_) => panic!("no {needle:?} within {patience:?}: {text}"),
            }
        }
    }

    /// Reads until the peer closes. Returns what arrived, or `None` if the
    /// connection is still open after `patience`.
    pub async fn read_to_close(&mut self, patience: Duration) -> Option<String> {
        self.received.clear();
        let deadline = Instant::now() + patience;
        let mut buf = [0u8; 4096];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.stream.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => {
                    return Some(String::from_utf8_lossy(&self.received).into_owned())
                }
                Ok(Ok(n)) => self.received.extend_from_slice(&buf[..n]),
                Err(_) => return None,
            }
        }
    }
}

/// The length of the whole response at the start of `bytes` and its text
/// (head, then the decoded body), or `None` if it has not all arrived.
fn whole_response(bytes: &[u8]) -> Option<(usize, String)> {
    let end = bytes.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&bytes[..end]).into_owned();
    let lower = head.to_ascii_lowercase();
    let field = |name: &str| {
        lower
            .lines()
            .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_owned()))
    };
    let bodiless = lower.starts_with("http/1.1 204") || lower.starts_with("http/1.1 304");
    if field("transfer-encoding:").is_some_and(|v| v.ends_with("chunked")) && !bodiless {
        let mut at = end;
        let mut body = Vec::new();
        loop {
            let line_end = bytes[at..].windows(2).position(|w| w == b"\r\n")? + at;
            let size_text = String::from_utf8_lossy(&bytes[at..line_end]);
            let size_text = size_text.split(';').next().unwrap().trim().to_owned();
            let size = usize::from_str_radix(&size_text, 16)
                .unwrap_or_else(|_| panic!("bad chunk size {size_text:?}: {head}"));
            at = line_end + 2;
            if size == 0 {
                // Trailers (if any), then an empty line.
                let rest = bytes[at..].windows(2).position(|w| w == b"\r\n")?;
                if rest == 0 {
                    at += 2;
                } else {
                    at += bytes[at..].windows(4).position(|w| w == b"\r\n\r\n")? + 4;
                }
                let text = head + &String::from_utf8_lossy(&body);
                return Some((at, text));
            }
            if bytes.len() < at + size + 2 {
                return None;
            }
            body.extend_from_slice(&bytes[at..at + size]);
            at += size + 2;
        }
    }
    let length = match field("content-length:") {
        Some(v) if !bodiless => v.parse::<usize>().expect("a content-length"),
        _ if bodiless => 0,
        _ => panic!("a response framed by neither length nor chunks: {head}"),
    };
    let whole = end + length;
    (bytes.len() >= whole).then(|| (whole, String::from_utf8_lossy(&bytes[..whole]).into_owned()))
}
