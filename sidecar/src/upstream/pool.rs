//! Upstream connections to one endpoint: HTTP/1.1 keep-alive pool, one
//! shared HTTP/2 (h2c, prior knowledge) connection, and for an endpoint
//! of the mesh one shared mTLS HTTP/2 connection.
//!
//! Why our own pool instead of hyper-util's `Client`: the proxy must know
//! *when* a request failed. A refused connection happens before the request
//! is sent, so the request (with its still unread streaming body) comes back
//! to the caller, which retries it on another endpoint. A pooled keep-alive
//! connection that the upstream closed while idle is detected by
//! `try_send_request`, which also hands the request back, and we retry on a
//! fresh connection. Neither case costs the user a failed request.
//!
//! Flow: `send` → take a ready h1 connection (or connect) → send → keep the
//! connection in the pool at once; it becomes ready again when its response
//! has been read, and only ready connections are handed out. HTTP/2
//! requests share one multiplexed connection per endpoint.
//!
//! What the pool's remote end speaks ([`Remote`]):
//! - a mesh endpoint with an identity, while this sidecar has a workload
//!   certificate: mTLS (`identity::tls`). Every HTTP request goes as HTTP/2
//!   on ONE connection (ALPN `h2`, made by one caller while the others
//!   wait), HTTP/1.x converted (absolute URI from `Host`, no `Host`) and
//!   marked `x-meshlet-orig-proto`; an HTTP/1.1 `Upgrade` request gets its
//!   own TLS connection with ALPN `http/1.1`. A connection that got GOAWAY
//!   or closed is replaced by the next request. Our own certificate
//!   expired: nothing is sent (`TlsFailure::CertificateExpired`).
//! - the local app: the request is converted to the app's protocol
//!   (`--app-protocol`, else the caller's `x-meshlet-orig-proto`, else as it
//!   arrived), and `x-meshlet-orig-proto` is removed.
//! - anything else: as the request arrived (h2c for HTTP/2).

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use http::header::{self, HeaderName, HeaderValue};
use http::uri::{PathAndQuery, Uri};
use http::{Request, Response, Version};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use meshlet_api::identity::SpiffeId;
use meshlet_api::mesh::AppProtocol;
use tokio::net::TcpStream;

use crate::body::ProxyBody;
use crate::identity::tls::{self, TlsFailure};
use crate::identity::{Hop, WorkloadIdentity};
use crate::settings::Limits;

/// HTTP/1.1 connections kept per endpoint (busy or idle).
const MAX_IDLE_PER_ENDPOINT: usize = 128;

/// The caller's HTTP version on an mTLS hop (set by the outbound sidecar,
/// read and removed by the inbound one).
pub const ORIG_PROTO: HeaderName = HeaderName::from_static("x-meshlet-orig-proto");

/// Why a request could not be sent.
#[derive(Debug)]
pub enum SendError {
    /// No connection could be made; the request was not sent and is returned.
    Connect {
        source: io::Error,
        request: Box<Request<ProxyBody>>,
    },
    /// The request was (at least partly) sent; it is gone.
    Upstream(hyper::Error),
}

struct PooledConn {
    sender: http1::SendRequest<ProxyBody>,
    last_used: Instant,
}

/// Who is at the other end of a pool.
#[derive(Clone)]
pub enum Remote {
    /// A passthrough address, or an endpoint without identity.
    Plain,
    /// The local app and the protocol it declared.
    App(Option<AppProtocol>),
    /// A mesh endpoint whose sidecar must present `identity`; `local` is
    /// this sidecar's own.
    Mesh {
        local: Arc<WorkloadIdentity>,
        identity: Arc<SpiffeId>,
    },
}

/// Connections to one upstream address.
pub struct ConnPool {
    addr: SocketAddr,
    limits: Arc<Limits>,
    remote: Remote,
    http1: Mutex<Vec<PooledConn>>,
    h2: Mutex<Option<http2::SendRequest<ProxyBody>>>,
    /// The shared mTLS HTTP/2 connection and its number (each new one
    /// gets the next), so that callers whose connection failed make one
    /// new connection, not one each.
    mtls: Mutex<Option<(u64, http2::SendRequest<ProxyBody>)>>,
    /// Held while the mTLS connection is being made, so that concurrent
    /// first requests share one connection.
    connecting: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for ConnPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnPool")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl ConnPool {
    pub fn new(addr: SocketAddr, limits: Arc<Limits>) -> Arc<Self> {
        Self::with_remote(addr, limits, Remote::Plain)
    }

    pub fn with_remote(addr: SocketAddr, limits: Arc<Limits>, remote: Remote) -> Arc<Self> {
        Arc::new(ConnPool {
            addr,
            limits,
            remote,
            http1: Mutex::new(Vec::new()),
            h2: Mutex::new(None),
            mtls: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The identity a mesh endpoint's sidecar must present.
    pub fn peer_identity(&self) -> Option<&Arc<SpiffeId>> {
        match &self.remote {
            Remote::Mesh { identity, .. } => Some(identity),
            _ => None,
        }
    }

    /// The protocol the local app declared (an app pool).
    pub fn app_protocol(&self) -> Option<AppProtocol> {
        match self.remote {
            Remote::App(protocol) => protocol,
            _ => None,
        }
    }

    /// Number of pooled HTTP/1.1 connections (for `/config_dump`).
    pub fn pooled_connections(&self) -> usize {
        self.http1.lock().map(|conns| conns.len()).unwrap_or(0)
    }

    /// Whether an mTLS connection is open (for `/config_dump`).
    pub fn has_mtls_connection(&self) -> bool {
        self.current_mtls().is_some()
    }

    /// Sends `request` to this endpoint: over the mesh's mTLS hop when it
    /// applies, else over HTTP/2 if the request is HTTP/2 (after the app's
    /// protocol is applied), otherwise HTTP/1.1.
    pub async fn send(
        self: &Arc<Self>,
        mut request: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, SendError> {
        match &self.remote {
            Remote::Mesh { local, identity } => match local.hop(Some(identity)) {
                Hop::Mtls(identity) => return self.send_mtls(request, local, &identity).await,
                Hop::Expired(at) => {
                    return Err(SendError::Connect {
                        source: TlsFailure::expired(at),
                        request: Box::new(request),
                    })
                }
                Hop::Plain => {}
            },
            Remote::App(protocol) => for_app(&mut request, *protocol),
            Remote::Plain => {}
        }
        if request.version() == Version::HTTP_2 {
            self.send_h2(request).await
        } else {
            self.send_h1(request).await
        }
    }

    async fn send_h1(
        self: &Arc<Self>,
        mut request: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, SendError> {
        *request.version_mut() = Version::HTTP_11;
        loop {
            let (mut sender, reused) = match self.take_ready() {
                Some(sender) => (sender, true),
                None => match Box::pin(self.connect_h1()).await {
                    Ok(sender) => (sender, false),
                    Err(source) => {
                        return Err(SendError::Connect {
                            source,
                            request: Box::new(request),
                        })
                    }
                },
            };
            match sender.try_send_request(request).await {
                Ok(response) => {
                    self.keep(sender);
                    return Ok(response);
                }
                Err(mut err) => match err.take_message() {
                    // The pooled connection died while idle; the request was
                    // not sent, so try again on another connection.
                    Some(unsent) if reused => request = unsent,
                    _ => return Err(SendError::Upstream(err.into_error())),
                },
            }
        }
    }

    async fn send_h2(
        self: &Arc<Self>,
        request: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, SendError> {
        let shared = self
            .h2
            .lock()
            .ok()
            .and_then(|h2| h2.as_ref().filter(|s| !s.is_closed()).cloned());
        let mut sender = match shared {
            Some(sender) => sender,
            None => match Box::pin(self.connect_h2()).await {
                Ok(sender) => {
                    if let Ok(mut slot) = self.h2.lock() {
                        *slot = Some(sender.clone());
                    }
                    sender
                }
                Err(source) => {
                    return Err(SendError::Connect {
                        source,
                        request: Box::new(request),
                    })
                }
            },
        };
        if let Err(err) = sender.ready().await {
            return Err(SendError::Upstream(err));
        }
        sender
            .send_request(request)
            .await
            .map_err(SendError::Upstream)
    }

    /// The mesh hop: HTTP/2 on the shared mTLS connection, or an upgrade
    /// on a TLS connection of its own.
    async fn send_mtls(
        self: &Arc<Self>,
        mut request: Request<ProxyBody>,
        local: &Arc<WorkloadIdentity>,
        identity: &Arc<SpiffeId>,
    ) -> Result<Response<Incoming>, SendError> {
        // Marked once: a request handed back unsent (connect failure) and
        // retried here was converted to HTTP/2 already, and keeps the mark
        // of the caller's own protocol (the outbound removed any a client
        // sent).
        if !request.headers().contains_key(ORIG_PROTO) {
            let orig = match request.version() {
                Version::HTTP_2 => "HTTP/2",
                Version::HTTP_10 => "HTTP/1.0",
                _ => "HTTP/1.1",
            };
            request
                .headers_mut()
                .insert(ORIG_PROTO, HeaderValue::from_static(orig));
        }
        if request.version() != Version::HTTP_2 && request.headers().contains_key(header::UPGRADE) {
            return self.send_upgrade_tls(request, local, identity).await;
        }
        to_http2(&mut request);
        // A connection that went away (GOAWAY, closed) hands the request
        // back unsent: once more on a fresh connection.
        let mut failed = None;
        loop {
            let (number, mut sender) = match self.mtls_sender(local, identity, failed).await {
                Ok(sender) => sender,
                Err(source) => {
                    return Err(SendError::Connect {
                        source,
                        request: Box::new(request),
                    })
                }
            };
            let ready = sender.ready().await;
            if ready.is_err() && failed.is_none() {
                failed = Some(number);
                continue;
            }
            if let Err(err) = ready {
                return Err(SendError::Upstream(err));
            }
            match sender.try_send_request(request).await {
                Ok(response) => return Ok(response),
                Err(mut err) => match err.take_message() {
                    Some(unsent) if failed.is_none() => {
                        request = unsent;
                        failed = Some(number);
                    }
                    _ => return Err(SendError::Upstream(err.into_error())),
                },
            }
        }
    }

    fn current_mtls(&self) -> Option<(u64, http2::SendRequest<ProxyBody>)> {
        self.mtls
            .lock()
            .ok()
            .and_then(|slot| slot.as_ref().filter(|(_, s)| !s.is_closed()).cloned())
    }

    /// The shared mTLS connection and its number, made if there is none
    /// or the current one is the `failed` one. One caller connects; the
    /// others wait for it and share its connection.
    async fn mtls_sender(
        &self,
        local: &Arc<WorkloadIdentity>,
        identity: &Arc<SpiffeId>,
        failed: Option<u64>,
    ) -> io::Result<(u64, http2::SendRequest<ProxyBody>)> {
        let usable = |current: Option<(u64, http2::SendRequest<ProxyBody>)>| {
            current.filter(|(number, _)| Some(*number) != failed)
        };
        if let Some(current) = usable(self.current_mtls()) {
            return Ok(current);
        }
        let _connecting = self.connecting.lock().await;
        if let Some(current) = usable(self.current_mtls()) {
            return Ok(current);
        }
        let stream = self.connect_tcp().await?;
        let stream = tls::connect(
            local,
            stream,
            self.addr,
            identity,
            tls::ALPN_H2,
            self.limits.connect_timeout,
        )
        .await?;
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| io::Error::other(TlsFailure::Handshake(e.to_string())))?;
        let addr = self.addr;
        tokio::spawn(async move {
            if let Err(err) = conn.await {
                tracing::debug!(%addr, error = %err, "upstream mTLS h2 connection ended with an error");
            }
        });
        let mut slot = self.mtls.lock().unwrap_or_else(|p| p.into_inner());
        let number = slot.as_ref().map_or(0, |(n, _)| n + 1);
        *slot = Some((number, sender.clone()));
        Ok((number, sender))
    }

    /// An HTTP/1.1 upgrade (WebSocket) over its own TLS connection (ALPN
    /// `http/1.1`); the 101's connection becomes the tunnel.
    async fn send_upgrade_tls(
        &self,
        mut request: Request<ProxyBody>,
        local: &Arc<WorkloadIdentity>,
        identity: &Arc<SpiffeId>,
    ) -> Result<Response<Incoming>, SendError> {
        *request.version_mut() = Version::HTTP_11;
        let connected = async {
            let stream = self.connect_tcp().await?;
            let stream = tls::connect(
                local,
                stream,
                self.addr,
                identity,
                tls::ALPN_HTTP1,
                self.limits.connect_timeout,
            )
            .await?;
            let (sender, conn) = http1::Builder::new()
                .handshake(TokioIo::new(stream))
                .await
                .map_err(|e| io::Error::other(TlsFailure::Handshake(e.to_string())))?;
            let addr = self.addr;
            tokio::spawn(async move {
                if let Err(err) = conn.with_upgrades().await {
                    tracing::debug!(%addr, error = %err, "upstream mTLS http/1 connection ended with an error");
                }
            });
            Ok::<_, io::Error>(sender)
        };
        let mut sender = match connected.await {
            Ok(sender) => sender,
            Err(source) => {
                return Err(SendError::Connect {
                    source,
                    request: Box::new(request),
                })
            }
        };
        sender
            .send_request(request)
            .await
            .map_err(SendError::Upstream)
    }

    /// Takes a connection that is ready for a request, dropping (and so
    /// closing) connections that are closed or were idle too long. Busy
    /// connections (a response still streaming) stay for later.
    fn take_ready(&self) -> Option<http1::SendRequest<ProxyBody>> {
        let mut conns = self.http1.lock().ok()?;
        let mut i = conns.len();
        while i > 0 {
            i -= 1;
            let conn = &conns[i];
            if conn.sender.is_closed() {
                conns.swap_remove(i);
            } else if conn.sender.is_ready() {
                let conn = conns.swap_remove(i);
                if conn.last_used.elapsed() < self.limits.idle_timeout {
                    return Some(conn.sender);
                }
            }
        }
        None
    }

    /// Drops (and so closes) HTTP/1.1 connections that the upstream closed
    /// or that have been idle past the idle timeout. Checkouts do this too;
    /// the periodic sweep makes sure a pool nobody uses any more does not
    /// hold its sockets forever. Returns how many were dropped.
    pub fn evict_idle(&self) -> usize {
        let Ok(mut conns) = self.http1.lock() else {
            return 0;
        };
        let before = conns.len();
        let idle_timeout = self.limits.idle_timeout;
        conns.retain(|c| {
            let expired = c.sender.is_ready() && c.last_used.elapsed() >= idle_timeout;
            !c.sender.is_closed() && !expired
        });
        before - conns.len()
    }

    /// Keeps a connection that just carried a request. It becomes ready
    /// again by itself once the response has been read (hyper's dispatcher
    /// signals it); `take_ready` only hands out ready ones. This costs no task
    /// per request, unlike waiting for readiness in a spawned task.
    fn keep(&self, sender: http1::SendRequest<ProxyBody>) {
        if let Ok(mut conns) = self.http1.lock() {
            if conns.len() < MAX_IDLE_PER_ENDPOINT {
                conns.push(PooledConn {
                    sender,
                    last_used: Instant::now(),
                });
            }
        }
    }

    async fn connect_tcp(&self) -> io::Result<TcpStream> {
        let stream =
            tokio::time::timeout(self.limits.connect_timeout, TcpStream::connect(self.addr))
                .await
                .map_err(|_| {
                    io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("connect timed out after {:?}", self.limits.connect_timeout),
                    )
                })??;
        stream.set_nodelay(true)?;
        Ok(stream)
    }

    async fn connect_h1(&self) -> io::Result<http1::SendRequest<ProxyBody>> {
        let stream = self.connect_tcp().await?;
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(io::Error::other)?;
        let addr = self.addr;
        tokio::spawn(async move {
            if let Err(err) = conn.with_upgrades().await {
                tracing::debug!(%addr, error = %err, "upstream http/1 connection ended with an error");
            }
        });
        Ok(sender)
    }

    async fn connect_h2(&self) -> io::Result<http2::SendRequest<ProxyBody>> {
        let stream = self.connect_tcp().await?;
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(TokioIo::new(stream))
            .await
            .map_err(io::Error::other)?;
        let addr = self.addr;
        tokio::spawn(async move {
            if let Err(err) = conn.await {
                tracing::debug!(%addr, error = %err, "upstream h2 connection ended with an error");
            }
        });
        Ok(sender)
    }
}

/// The local app's protocol for `request`: `declared` (`--app-protocol`),
/// else the caller's (`x-meshlet-orig-proto`), else as it arrived; the
/// mark is removed. An upgrade stays HTTP/1.1.
fn for_app(request: &mut Request<ProxyBody>, declared: Option<AppProtocol>) {
    let orig = request.headers_mut().remove(ORIG_PROTO);
    if request.headers().contains_key(header::UPGRADE) {
        return;
    }
    let http2 = match (declared, orig.as_ref().map(|v| v.as_bytes())) {
        (Some(AppProtocol::H2c), _) => true,
        (Some(AppProtocol::Http1), _) => false,
        (None, Some(b"HTTP/2")) => true,
        (None, Some(b"HTTP/1.1" | b"HTTP/1.0")) => false,
        (None, _) => request.version() == Version::HTTP_2,
    };
    if http2 {
        to_http2(request);
    } else {
        to_http1(request);
    }
}

/// An HTTP/1.x request as HTTP/2: an absolute URI (authority from the URI
/// or `Host`, which is removed), no connection-specific headers (the
/// proxy removed the hop-by-hop ones already).
pub fn to_http2<B>(request: &mut Request<B>) {
    if request.version() == Version::HTTP_2 {
        return;
    }
    let host = request.headers_mut().remove(header::HOST);
    let authority = request
        .uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            host.as_ref()
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "localhost".to_owned());
    let path = request
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let scheme = request.uri().scheme_str().unwrap_or("http").to_owned();
    if let Ok(uri) = Uri::builder()
        .scheme(scheme.as_str())
        .authority(authority)
        .path_and_query(path)
        .build()
    {
        *request.uri_mut() = uri;
    }
    for name in [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
    ] {
        request.headers_mut().remove(name);
    }
    // HTTP/2 allows `te` only as `trailers` (RFC 9113 §8.2.2).
    if request.headers().contains_key(header::TE) {
        request
            .headers_mut()
            .insert(header::TE, HeaderValue::from_static("trailers"));
    }
    *request.version_mut() = Version::HTTP_2;
}

/// An HTTP/2 request as HTTP/1.1: `Host` from the `:authority` (unless the
/// request has one), origin-form URI.
pub fn to_http1<B>(request: &mut Request<B>) {
    if request.version() != Version::HTTP_2 {
        return;
    }
    if !request.headers().contains_key(header::HOST) {
        if let Some(host) = request
            .uri()
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        {
            request.headers_mut().insert(header::HOST, host);
        }
    }
    let path = request
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    if let Ok(uri) = Uri::builder().path_and_query(path).build() {
        *request.uri_mut() = uri;
    }
    *request.version_mut() = Version::HTTP_11;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{get, refusing_addr, text, AfterResponse, Upstream};

    fn pool(addr: SocketAddr) -> Arc<ConnPool> {
        ConnPool::new(addr, Arc::new(Limits::default()))
    }

    async fn send_ok(pool: &Arc<ConnPool>, request: Request<ProxyBody>) -> String {
        let response = pool.send(request).await.expect("sent");
        assert_eq!(response.status(), 200);
        text(response).await
    }

    #[tokio::test]
    async fn http1_requests_reuse_one_keep_alive_connection() {
        let upstream = Upstream::http1("orders", AfterResponse::KeepOpen).await;
        let pool = pool(upstream.addr);
        for _ in 0..5 {
            assert_eq!(send_ok(&pool, get("/")).await, "orders");
        }
        assert_eq!(upstream.requests(), 5);
        assert_eq!(upstream.connections(), 1, "one connection, reused");
        assert_eq!(pool.pooled_connections(), 1);
    }

    #[tokio::test]
    async fn a_connection_the_upstream_closed_while_idle_is_not_reused() {
        let upstream = Upstream::http1("orders", AfterResponse::CloseSilently).await;
        let pool = pool(upstream.addr);
        for _ in 0..3 {
            // Each request finds its pooled connection dead (closed, or
            // failing before the request was sent) and gets a new one.
            assert_eq!(send_ok(&pool, get("/")).await, "orders");
        }
        assert_eq!(upstream.requests(), 3);
        assert_eq!(upstream.connections(), 3);
    }

    #[tokio::test]
    async fn h2_requests_share_one_connection() {
        let upstream = Upstream::http2("orders").await;
        let pool = pool(upstream.addr);
        let h2 = || {
            // h2 requests carry scheme and authority (`proxy` sets them).
            let mut request = get(&format!("http://{}/", upstream.addr));
            *request.version_mut() = Version::HTTP_2;
            request
        };
        assert_eq!(send_ok(&pool, h2()).await, "orders");
        let concurrent: Vec<_> = (0..4)
            .map(|_| {
                let (pool, request) = (Arc::clone(&pool), h2());
                tokio::spawn(async move { send_ok(&pool, request).await })
            })
            .collect();
        for task in concurrent {
            assert_eq!(task.await.unwrap(), "orders");
        }
        assert_eq!(upstream.requests(), 5);
        assert_eq!(upstream.connections(), 1, "multiplexed on one connection");
        assert_eq!(pool.pooled_connections(), 0, "no HTTP/1.1 connection");
    }

    #[tokio::test]
    async fn a_refused_connection_hands_the_unsent_request_back() {
        let pool = pool(refusing_addr().await);
        match pool.send(get("/orders/7")).await {
            Err(SendError::Connect { source, request }) => {
                assert_eq!(source.kind(), io::ErrorKind::ConnectionRefused);
                assert_eq!(request.uri(), "/orders/7", "the same request, unsent");
            }
            other => panic!("expected a connect error, got {other:?}"),
        }
    }
}
