//! The API's connections: the accept loop in front of the axum router.
//!
//! ```text
//! accept ─► admit (connection cap; unproven connections evicted oldest first)
//!        ─► TLS handshake (deadline) ─► hyper HTTP/1.1 (request-head deadline,
//!           which is also the keep-alive idle limit) ─► router
//! ```
//!
//! A connection is **unproven** until its first request head has arrived:
//! until then it costs the server a socket and a task but has shown nothing.
//! Slow or silent clients (slowloris) are bounded three ways: the TLS
//! handshake and every request head must arrive within their deadlines; at
//! most [`Limits::max_unproven`] connections may be unproven at once, and a
//! new connection past that evicts the oldest unproven one (so a flood of
//! silent sockets cannot keep a real client out: the real client proves
//! itself within milliseconds, long before its turn to be evicted); and at
//! most [`Limits::max_connections`] are open at all (past that, again the
//! oldest unproven one goes, or the new one is closed when all are proven).
//!
//! Shutdown: the loop stops accepting, asks every connection to finish its
//! request in flight (hyper's graceful shutdown; watch streams end through
//! the server's own shutdown signal), and returns once all have, or after
//! [`Limits::drain_timeout`].

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio_rustls::TlsAcceptor;
use tower_service::Service;

/// Bounds on the API's connections.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections open at once.
    pub max_connections: usize,
    /// Connections open at once that have not yet sent a request head.
    pub max_unproven: usize,
    /// A TLS handshake must complete within this.
    pub handshake_timeout: Duration,
    /// A request head must arrive within this, counted from when the
    /// connection became idle (so it is also the keep-alive idle limit).
    pub header_timeout: Duration,
    /// On shutdown, requests in flight get this long to finish.
    pub drain_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_connections: 2048,
            max_unproven: 256,
            handshake_timeout: Duration::from_secs(5),
            header_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(10),
        }
    }
}

/// Serves `app` on `listener` (TLS when `tls` is set) until `shutdown`
/// turns true, then drains.
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    app: Router,
    limits: Limits,
    mut shutdown: watch::Receiver<bool>,
) {
    let tracker = Tracker::new(limits);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.wait_for(|stop| *stop) => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of file descriptors and the like: back off briefly
                // instead of spinning.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(admission) = tracker.admit() else {
            tracing::debug!(%peer, "connection refused: every connection slot is held by a proven client");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let connection = Connection {
            app: app.clone(),
            limits,
            admission,
        };
        let watcher = graceful.watcher();
        match tls.clone() {
            None => {
                tokio::spawn(connection.run(stream, None, watcher));
            }
            Some(acceptor) => {
                tokio::spawn(connection.run(stream, Some(acceptor), watcher));
            }
        }
    }
    drop(listener);
    if tokio::time::timeout(limits.drain_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(after = ?limits.drain_timeout, "connections still open after the drain timeout");
    }
}

/// One accepted connection and what it needs to be served.
struct Connection {
    app: Router,
    limits: Limits,
    admission: Admission,
}

impl Connection {
    async fn run(
        self,
        stream: TcpStream,
        tls: Option<TlsAcceptor>,
        graceful: hyper_util::server::graceful::Watcher,
    ) {
        let Connection {
            app,
            limits,
            mut admission,
        } = self;
        let Some(acceptor) = tls else {
            admission.serve(stream, app, limits, graceful).await;
            return;
        };
        let handshake = tokio::time::timeout(limits.handshake_timeout, acceptor.accept(stream));
        let stream = tokio::select! {
            done = handshake => match done {
                Ok(Ok(stream)) => stream,
                Ok(Err(error)) => {
                    tracing::debug!(%error, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!("TLS handshake timed out");
                    return;
                }
            },
            _ = admission.evicted() => return,
        };
        admission.serve(stream, app, limits, graceful).await;
    }
}

/// Counts and ranks the open connections.
#[derive(Clone)]
struct Tracker {
    inner: Arc<TrackerInner>,
}

struct TrackerInner {
    limits: Limits,
    open: AtomicUsize,
    /// Unproven connections by age (admission order): the eviction handles.
    unproven: Mutex<BTreeMap<u64, oneshot::Sender<()>>>,
    next_id: std::sync::atomic::AtomicU64,
}

impl Tracker {
    fn new(limits: Limits) -> Tracker {
        Tracker {
            inner: Arc::new(TrackerInner {
                limits,
                open: AtomicUsize::new(0),
                unproven: Mutex::new(BTreeMap::new()),
                next_id: std::sync::atomic::AtomicU64::new(0),
            }),
        }
    }

    /// Admits a new connection, evicting the oldest unproven one if a cap is
    /// reached; `None` when every slot is held by a proven connection.
    fn admit(&self) -> Option<Admission> {
        let inner = &self.inner;
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (evict, receiver) = oneshot::channel();
        let mut unproven = inner.unproven.lock().unwrap_or_else(|e| e.into_inner());
        let full = inner.open.load(Ordering::Relaxed) >= inner.limits.max_connections;
        if full || unproven.len() >= inner.limits.max_unproven {
            match unproven.pop_first() {
                // The evicted task closes its socket; its slot is counted
                // free once it has.
                Some((_, oldest)) => {
                    let _ = oldest.send(());
                }
                None if full => return None,
                None => {}
            }
        }
        unproven.insert(id, evict);
        inner.open.fetch_add(1, Ordering::Relaxed);
        Some(Admission {
            tracker: self.clone(),
            id,
            proven: Arc::new(AtomicBool::new(false)),
            evicted: Some(receiver),
        })
    }

    fn prove(&self, id: u64) {
        let mut unproven = self
            .inner
            .unproven
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        unproven.remove(&id);
    }

    fn close(&self, id: u64) {
        self.prove(id);
        self.inner.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A connection's place in the tracker; frees it on drop.
struct Admission {
    tracker: Tracker,
    id: u64,
    proven: Arc<AtomicBool>,
    evicted: Option<oneshot::Receiver<()>>,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.tracker.close(self.id);
    }
}

impl Admission {
    /// Completes when the tracker evicts this connection; never once it
    /// has proven itself.
    async fn evicted(&mut self) {
        match self.evicted.as_mut() {
            Some(receiver) => {
                if receiver.await.is_ok() {
                    return;
                }
                // Proven: the tracker dropped the eviction handle.
                self.evicted = None;
                std::future::pending().await
            }
            None => std::future::pending().await,
        }
    }

    /// Serves HTTP/1.1 on `io` until the client leaves, a deadline passes,
    /// the server shuts down, or (before its first request) eviction.
    async fn serve<IO>(
        &mut self,
        io: IO,
        app: Router,
        limits: Limits,
        graceful: hyper_util::server::graceful::Watcher,
    ) where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let tracker = self.tracker.clone();
        let id = self.id;
        let proven = self.proven.clone();
        let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
            if !proven.swap(true, Ordering::Relaxed) {
                tracker.prove(id);
            }
            let mut app = app.clone();
            async move { app.call(request).await }
        });
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout)
            .max_buf_size(64 * 1024)
            .serve_connection(TokioIo::new(io), service);
        let connection = graceful.watch(connection);
        tokio::pin!(connection);
        tokio::select! {
            result = &mut connection => {
                if let Err(error) = result {
                    tracing::debug!(%error, "API connection ended with an error");
                }
            }
            _ = self.evicted() => {
                tracing::debug!("unproven API connection evicted");
            }
        }
    }
}

/// Raises this process's open-file soft limit to its hard limit, so the
/// connection caps, not the descriptor limit, decide who is served. Returns
/// the limit in force.
pub fn raise_open_file_limit() -> Option<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        return Some(hard);
    }
    Some(soft)
}

#[cfg(test)]
mod tests;
