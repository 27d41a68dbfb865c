//! In-process upstream servers on real loopback sockets, speaking HTTP/1.1
//! and h2c (auto-detected; or HTTP/1.1 only), with routes that exercise a proxy:
//!
//! | route | answer |
//! |---|---|
//! | `/` | `hello from NAME`, header `x-upstream: NAME` |
//! | `/headers` | the request's headers and version as JSON |
//! | `/hop-by-hop` | a response with `Connection: keep-alive, x-private`, `x-private`, `keep-alive`, `x-end-to-end` |
//! | `/echo` | the request body streamed back, request trailers too |
//! | `/upload` | the number of body bytes received |
//! | `/download?bytes=N` | N bytes, streamed in 64 KiB chunks |
//! | `/trailers` | a body and a trailer `x-checksum: 1234` |
//! | `/slow?ms=N` | answers after N ms |
//! | `/stall` | headers and `partial`, then nothing, ever |
//! | `/drip?ms=N&pieces=K` | K body pieces `piece I\n`, N ms apart |
//! | `/status?code=N` | that status |
//! | `/flaky?percent=N` | 500 for a random N % of requests, else 200 |
//! | `/api/...`, `/other/...` | `resource PATH` (REST-style paths with ids) |
//! | `/ws` | WebSocket echo |
//! | `/health` | 200, or 503 after [`Upstream::set_healthy`]`(false)`; not counted as a request |
//!
//! [`Upstream::kill`] closes the listener and every open connection, as a
//! crashed process would.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;

type Body = BoxBody<Bytes, hyper::Error>;

/// High bit of the request counter: set once the upstream is killed.
const KILLED: usize = 1 << (usize::BITS - 1);

#[derive(Debug)]
pub struct Upstream {
    pub name: String,
    pub addr: SocketAddr,
    /// Counters and switches, shared with the serving tasks.
    state: State,
    stop: watch::Sender<bool>,
    accept: JoinHandle<()>,
}

impl Upstream {
    pub async fn start(name: &str) -> Upstream {
        Self::start_on(name, SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    pub async fn start_on(name: &str, addr: SocketAddr) -> Upstream {
        Self::start_with(name, addr, Protocols::Both { h2_streams: None }).await
    }

    /// An app that speaks HTTP/1.1 only (an h2c preface is a protocol
    /// error to it, as to most HTTP/1.1 servers).
    pub async fn start_http1_only(name: &str) -> Upstream {
        let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
        Self::start_with(name, loopback, Protocols::Http1Only).await
    }

    /// An app whose HTTP/2 connections allow `streams` concurrent streams
    /// (`SETTINGS_MAX_CONCURRENT_STREAMS`; hyper's default is 200).
    pub async fn start_with_h2_streams(name: &str, streams: u32) -> Upstream {
        let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
        let protocols = Protocols::Both {
            h2_streams: Some(streams),
        };
        Self::start_with(name, loopback, protocols).await
    }

    async fn start_with(name: &str, addr: SocketAddr, protocols: Protocols) -> Upstream {
        let listener = TcpListener::bind(addr).await.expect("bind upstream");
        let addr = listener.local_addr().expect("local addr");
        let (stop, stopped) = watch::channel(false);
        let state = State {
            name: name.to_owned(),
            requests: Arc::default(),
            connections: Arc::default(),
            open: Arc::default(),
            delay_ms: Arc::default(),
            healthy: Arc::new(AtomicBool::new(true)),
            health_probes: Arc::default(),
        };
        let accept = tokio::spawn(accept_loop(listener, state.clone(), stopped, protocols));
        Upstream {
            name: name.to_owned(),
            addr,
            state,
            stop,
            accept,
        }
    }

    /// Makes `/health` answer 200 (true) or 503 (false).
    pub fn set_healthy(&self, healthy: bool) {
        self.state.healthy.store(healthy, Ordering::SeqCst);
    }

    /// `/health` requests received so far.
    pub fn health_probes(&self) -> usize {
        self.state.health_probes.load(Ordering::SeqCst)
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Requests received so far.
    pub fn requests(&self) -> usize {
        self.state.requests.load(Ordering::SeqCst) & !KILLED
    }

    /// Connections that carried at least one request (TCP-only health
    /// probes don't count).
    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }

    /// Connections open right now (any, including TCP-only probes).
    pub fn open_connections(&self) -> usize {
        self.state.open.load(Ordering::SeqCst)
    }

    /// Waits until every connection made to this upstream so far has
    /// ended, so that [`Upstream::requests`] counts every request that was
    /// on its way (a head still in a socket buffer, a connection still in
    /// the listen backlog). Call it once the peers are gone (a killed
    /// sidecar). How: one more connection asks `/health` (not counted) and
    /// is answered, which means the accept loop took every connection
    /// queued before it; then the open count must fall to zero. Panics
    /// after `patience`.
    pub async fn wait_settled(&self, patience: Duration) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let deadline = tokio::time::Instant::now() + patience;
        let sentinel = async {
            let mut stream = tokio::net::TcpStream::connect(self.addr).await?;
            stream
                .write_all(b"GET /health HTTP/1.1\r\nHost: settle\r\nConnection: close\r\n\r\n")
                .await?;
            let mut answer = Vec::new();
            stream.read_to_end(&mut answer).await?;
            std::io::Result::Ok(())
        };
        tokio::time::timeout_at(deadline, sentinel)
            .await
            .unwrap_or_else(|_| panic!("upstream {} did not answer /health", self.name))
            .unwrap_or_else(|e| panic!("upstream {}: /health failed: {e}", self.name));
        while self.open_connections() > 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "upstream {}: {} connections still open after {patience:?}",
                self.name,
                self.open_connections()
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Delays every answer by `delay` from now on (a struggling instance).
    pub fn set_delay(&self, delay: Duration) {
        self.state
            .delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// Closes the listener and all connections. From the moment this
    /// returns, no request is counted or answered any more (requests
    /// already inside the server are dropped unanswered), as with a crash.
    pub fn kill(&self) {
        self.state.requests.fetch_or(KILLED, Ordering::SeqCst);
        let _ = self.stop.send(true);
        self.accept.abort();
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.kill();
    }
}

#[derive(Debug, Clone)]
struct State {
    name: String,
    requests: Arc<AtomicUsize>,
    connections: Arc<AtomicUsize>,
    open: Arc<AtomicUsize>,
    delay_ms: Arc<AtomicU64>,
    healthy: Arc<AtomicBool>,
    health_probes: Arc<AtomicUsize>,
}

/// `/health`: answered before any counting, so that a sidecar's probes do
/// not show up in [`Upstream::requests`].
fn health(state: &State) -> Response<Body> {
    state.health_probes.fetch_add(1, Ordering::SeqCst);
    let (status, text) = if state.healthy.load(Ordering::SeqCst) {
        (StatusCode::OK, "healthy")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "unhealthy")
    };
    Response::builder()
        .status(status)
        .body(full(text))
        .expect("valid response")
}

/// What an app's connections speak.
#[derive(Debug, Clone, Copy)]
enum Protocols {
    Http1Only,
    /// HTTP/1.1 and h2c (prior knowledge), with hyper's stream limit
    /// unless given.
    Both {
        h2_streams: Option<u32>,
    },
}

async fn accept_loop(
    listener: TcpListener,
    state: State,
    stopped: watch::Receiver<bool>,
    protocols: Protocols,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    match protocols {
        Protocols::Http1Only => builder = builder.http1_only(),
        Protocols::Both {
            h2_streams: Some(streams),
        } => {
            builder.http2().max_concurrent_streams(streams);
        }
        Protocols::Both { h2_streams: None } => {}
    }
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let state = state.clone();
        let open = Arc::clone(&state.open);
        let first_request = std::sync::atomic::AtomicBool::new(true);
        let service = service_fn(move |request: Request<Incoming>| {
            let probe = (request.uri().path() == "/health"
                && state.requests.load(Ordering::SeqCst) & KILLED == 0)
                .then(|| health(&state));
            // Count the request unless killed, in one atomic step.
            let alive = probe.is_none()
                && state
                    .requests
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                        (n & KILLED == 0).then_some(n + 1)
                    })
                    .is_ok();
            if alive && first_request.swap(false, Ordering::SeqCst) {
                state.connections.fetch_add(1, Ordering::SeqCst);
            }
            let (name, delay) = (state.name.clone(), state.delay_ms.load(Ordering::SeqCst));
            async move {
                if let Some(response) = probe {
                    return Ok(response);
                }
                if !alive {
                    return Err("killed");
                }
                if delay > 0 {
                    tokio::time::sleep(Duration::from_millis(delay)).await;
                }
                route(name, request).await.map_err(|never| match never {})
            }
        });
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        let mut stopped = stopped.clone();
        open.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(async move {
            tokio::select! {
                _ = connection => {}
                _ = stopped.wait_for(|stop| *stop) => {}
            }
            open.fetch_sub(1, Ordering::SeqCst);
        });
    }
}

fn query_number(request: &Request<Incoming>, key: &str) -> u64 {
    request
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .find_map(|kv| kv.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn full(text: impl Into<Bytes>) -> Body {
    Full::new(text.into())
        .map_err(|never| match never {})
        .boxed()
}

async fn route(name: String, mut request: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let response = match request.uri().path() {
        "/" => Response::builder()
            .header("x-upstream", &name)
            .body(full(format!("hello from {name}"))),
        "/headers" => {
            let headers: BTreeMap<String, Vec<String>> = request
                .headers()
                .keys()
                .map(|k| (k.to_string(), values(request.headers(), k.as_str())))
                .collect();
            let json = serde_json::json!({"version": format!("{:?}", request.version()), "headers": headers, "upstream": name});
            Response::builder()
                .header("content-type", "application/json")
                .body(full(json.to_string()))
        }
        "/echo" => Response::builder().body(request.into_body().boxed()),
        "/hop-by-hop" => Response::builder()
            .header("connection", "keep-alive, x-private")
            .header("x-private", "secret")
            .header("keep-alive", "timeout=5")
            .header("x-end-to-end", "kept")
            .body(full("hop-by-hop")),
        "/upload" => {
            let mut body = request.into_body();
            let mut total: u64 = 0;
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(frame) => total += frame.data_ref().map_or(0, |d| d.len() as u64),
                    Err(err) => {
                        return Ok(Response::builder()
                            .status(400)
                            .body(full(err.to_string()))
                            .unwrap())
                    }
                }
            }
            Response::builder().body(full(total.to_string()))
        }
        "/download" => {
            let total = query_number(&request, "bytes");
            let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
            let chunks = futures_util::stream::unfold(total, move |left| {
                let chunk = chunk.clone();
                async move {
                    (left > 0).then(|| {
                        let n = left.min(chunk.len() as u64);
                        (
                            Ok::<_, hyper::Error>(Frame::data(chunk.slice(..n as usize))),
                            left - n,
                        )
                    })
                }
            });
            Response::builder().body(BodyExt::boxed(StreamBody::new(chunks)))
        }
        "/trailers" => {
            let mut trailers = HeaderMap::new();
            trailers.insert("x-checksum", "1234".parse().unwrap());
            let frames = futures_util::stream::iter([
                Ok::<_, hyper::Error>(Frame::data(Bytes::from_static(b"body with trailers"))),
                Ok(Frame::trailers(trailers)),
            ]);
            Response::builder()
                // HTTP/1.1 sends only trailer fields announced here.
                .header("trailer", "x-checksum")
                .body(BodyExt::boxed(StreamBody::new(frames)))
        }
        "/stall" => {
            // Headers and a first piece of body, then silence forever.
            let first = futures_util::stream::iter([Ok::<_, hyper::Error>(Frame::data(
                Bytes::from_static(b"partial"),
            ))]);
            Response::builder().body(BodyExt::boxed(StreamBody::new(
                first.chain(futures_util::stream::pending()),
            )))
        }
        "/drip" => {
            // `pieces` pieces of body, `ms` apart: a long-lived stream
            // (server-sent events, a watch) that is never idle for long.
            let pause = Duration::from_millis(query_number(&request, "ms"));
            let pieces = query_number(&request, "pieces");
            let drips = futures_util::stream::unfold(0, move |sent| async move {
                if sent == pieces {
                    return None;
                }
                if sent > 0 {
                    tokio::time::sleep(pause).await;
                }
                let piece = Frame::data(Bytes::from(format!("piece {sent}\n")));
                Some((Ok::<_, hyper::Error>(piece), sent + 1))
            });
            Response::builder().body(BodyExt::boxed(StreamBody::new(drips)))
        }
        "/slow" => {
            tokio::time::sleep(Duration::from_millis(query_number(&request, "ms"))).await;
            Response::builder().body(full("slow done"))
        }
        "/status" => {
            let code = StatusCode::from_u16(query_number(&request, "code") as u16)
                .unwrap_or(StatusCode::OK);
            Response::builder()
                .status(code)
                .body(full(format!("status {code}")))
        }
        "/flaky" => {
            let fail = fastrand::u64(..100) < query_number(&request, "percent");
            let (status, text) = if fail {
                (StatusCode::INTERNAL_SERVER_ERROR, "flaky: failed")
            } else {
                (StatusCode::OK, "flaky: ok")
            };
            Response::builder().status(status).body(full(text))
        }
        "/ws" => websocket_echo(&mut request),
        path if path.starts_with("/api/") || path.starts_with("/other/") => {
            Response::builder().body(full(format!("resource {path}")))
        }
        _ => Response::builder().status(404).body(full("no such route")),
    };
    Ok(response.expect("valid response"))
}

fn values(headers: &HeaderMap, name: &str) -> Vec<String> {
    headers
        .get_all(name)
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .collect()
}

fn websocket_echo(request: &mut Request<Incoming>) -> http::Result<Response<Body>> {
    let Some(key) = request.headers().get("sec-websocket-key").cloned() else {
        return Response::builder()
            .status(400)
            .body(full("not a websocket request"));
    };
    let on_upgrade = hyper::upgrade::on(request);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let mut ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        while let Some(Ok(message)) = ws.next().await {
            if message.is_close() || ws.send(message).await.is_err() {
                break;
            }
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-accept", derive_accept_key(key.as_bytes()))
        .body(full(Bytes::new()))
}
