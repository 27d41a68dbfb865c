//! Upstream connections to one endpoint: HTTP/1.1 keep-alive pool and one
//! shared HTTP/2 (h2c, prior knowledge) connection.
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

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use http::{Request, Response, Version};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use crate::body::ProxyBody;
use crate::settings::Limits;

/// HTTP/1.1 connections kept per endpoint (busy or idle).
const MAX_IDLE_PER_ENDPOINT: usize = 128;

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

/// Connections to one upstream address.
pub struct ConnPool {
    addr: SocketAddr,
    limits: Arc<Limits>,
    http1: Mutex<Vec<PooledConn>>,
    h2: Mutex<Option<http2::SendRequest<ProxyBody>>>,
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
        Arc::new(ConnPool {
            addr,
            limits,
            http1: Mutex::new(Vec::new()),
            h2: Mutex::new(None),
        })
    }

    /// Number of pooled HTTP/1.1 connections (for `/config_dump`).
    pub fn pooled_connections(&self) -> usize {
        self.http1.lock().map(|conns| conns.len()).unwrap_or(0)
    }

    /// Sends `request` to this endpoint over HTTP/2 if the request is
    /// HTTP/2, otherwise HTTP/1.1.
    pub async fn send(
        self: &Arc<Self>,
        request: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, SendError> {
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
