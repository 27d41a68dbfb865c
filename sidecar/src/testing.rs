//! Test helpers for the request path's unit tests: upstreams on real
//! loopback sockets that count what reaches them, and small request and
//! response helpers. Test-only; imports nothing from the crate except the
//! body type. Also [`proptest_config`], the case count of the crate's
//! property tests (its fuzz targets).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::body::ProxyBody;

/// How a test upstream treats a connection after answering a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterResponse {
    /// Keep the connection open for the next request (keep-alive).
    KeepOpen,
    /// Close it without saying so (no `connection: close`): the client's
    /// pooled connection dies while idle.
    CloseSilently,
    /// Never answer (the client's deadline must fire).
    NeverAnswer,
    /// Answer with bytes that are not HTTP, then close.
    Garbage,
}

/// An HTTP/1.1 upstream on loopback answering `200` with its name as the
/// body; it counts the connections it accepted and the requests it read.
#[derive(Debug)]
pub struct Upstream {
    pub addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
}

impl Upstream {
    pub async fn http1(name: &'static str, after: AfterResponse) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream = Upstream {
            addr: listener.local_addr().unwrap(),
            connections: Arc::default(),
            requests: Arc::default(),
        };
        let (connections, requests) = (
            Arc::clone(&upstream.connections),
            Arc::clone(&upstream.requests),
        );
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                connections.fetch_add(1, Ordering::SeqCst);
                let requests = Arc::clone(&requests);
                tokio::spawn(serve_http1(stream, name, after, requests));
            }
        });
        upstream
    }

    /// An h2c (prior knowledge) upstream answering `200` with `name`.
    pub async fn http2(name: &'static str) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream = Upstream {
            addr: listener.local_addr().unwrap(),
            connections: Arc::default(),
            requests: Arc::default(),
        };
        let (connections, requests) = (
            Arc::clone(&upstream.connections),
            Arc::clone(&upstream.requests),
        );
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                connections.fetch_add(1, Ordering::SeqCst);
                let requests = Arc::clone(&requests);
                let service = service_fn(move |_: Request<Incoming>| {
                    requests.fetch_add(1, Ordering::SeqCst);
                    async move { Ok::<_, Infallible>(Response::new(name.to_owned())) }
                });
                tokio::spawn(
                    http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        upstream
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

/// Reads request heads (no bodies: tests send GETs) and answers each.
async fn serve_http1(
    mut stream: TcpStream,
    name: &'static str,
    after: AfterResponse,
    requests: Arc<AtomicUsize>,
) {
    let mut buffer = Vec::new();
    loop {
        let head_end = loop {
            if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            let mut chunk = [0u8; 1024];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            }
        };
        buffer.drain(..head_end);
        requests.fetch_add(1, Ordering::SeqCst);
        if after == AfterResponse::NeverAnswer {
            // Hold the connection open without a word.
            let _ = stream.read(&mut [0u8; 1]).await;
            return;
        }
        let response = match after {
            AfterResponse::Garbage => "SSH-2.0-not-http\r\n\r\n".to_owned(),
            _ => format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{name}",
                name.len()
            ),
        };
        if stream.write_all(response.as_bytes()).await.is_err() {
            return;
        }
        if matches!(after, AfterResponse::CloseSilently | AfterResponse::Garbage) {
            return;
        }
    }
}

/// An address on loopback where nothing listens (connections are
/// refused).
pub async fn refusing_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

/// `GET uri` with an empty body.
pub fn get(uri: &str) -> Request<ProxyBody> {
    Request::get(uri).body(ProxyBody::empty()).unwrap()
}

/// The whole body of `response` as text.
pub async fn text<B>(response: Response<B>) -> String
where
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(bytes.to_vec()).unwrap()
}

/// Configuration of the crate's property tests, which are its fuzz
/// targets: proptest runs on stable Rust, while `cargo fuzz` needs nightly,
/// which the CI machine does not have. `ci_cases` keeps a CI run to a few
/// seconds; `PROPTEST_CASES=200000` makes a long run by hand. Shrinking is
/// bounded so a long run's failure is reported in reasonable time.
pub fn proptest_config(ci_cases: u32) -> proptest::prelude::ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(ci_cases);
    proptest::prelude::ProptestConfig {
        cases,
        max_shrink_iters: 4_096,
        failure_persistence: None,
        ..proptest::prelude::ProptestConfig::default()
    }
}
