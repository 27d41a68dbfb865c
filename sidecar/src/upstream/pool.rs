//! Upstream connections to one endpoint: an HTTP/1.1 keep-alive pool, a
//! small set of shared HTTP/2 (h2c, prior knowledge) connections, and for
//! an endpoint of the mesh a small set of shared mTLS HTTP/2 connections.
//!
//! Why our own pool instead of hyper-util's `Client`: the proxy must know
//! *when* a request failed. A refused connection happens before the request
//! is sent, so the request (with its still unread streaming body) comes back
//! to the caller, which retries it on another endpoint. Work the upstream
//! refused unprocessed is sent again here, once, on another connection
//! (never counted as a `RetryPolicy` retry: it never reached the app):
//!
//! - HTTP/2: a stream above a GOAWAY's last stream id, or opened after the
//!   GOAWAY (h2 reports a remote GOAWAY error), or reset with
//!   `REFUSED_STREAM` (RFC 9113 §8.7: not processed, whatever the method);
//!   or a request hyper hands back because the connection closed before
//!   the request reached it.
//! - HTTP/1.1: a pooled keep-alive connection that was closed before any
//!   response byte (hyper hands the request back if it noticed before
//!   writing; else an incomplete-message or reset error; hyper does not
//!   tell an EOF in the middle of a response head from one before it, and
//!   such a partial head is taken as none).
//!
//! A request can be sent again when hyper hands it back, or when its body
//! is known in full ([`ProxyBody::replay_copy`]: empty, or buffered by a
//! retry policy), in which case the pool keeps a copy of the head while the
//! first attempt is under way. A streamed body with data still to come is
//! never re-sent. Each re-send is counted in
//! `meshlet_upstream_resends_total{reason}` (`goaway`, `refused_stream`,
//! `connection_closed`); each connection opened in
//! `meshlet_upstream_connections_opened_total{protocol}`.
//!
//! Flow (HTTP/1.1 without a request body or with one held in full, most
//! requests): `exchange_h1` → take an idle connection of our own client
//! (or connect, and take instead a connection another request gives back
//! first: `connect_or_given_back`, which also keeps a burst beyond the
//! app's accept queue from failing at the connect timeout, while
//! `connect_tcp` sends a dropped SYN to the app again sooner than the
//! kernel would) →
//! `h1_client::exchange` from this task; the response body gives the
//! connection back to the idle list when it has been read whole.
//!
//! Flow (HTTP/1.1 with a body still streaming, or an upgrade): `send_h1` →
//! take a ready
//! hyper h1 connection (or connect) → send → keep the connection in the
//! pool at once; it becomes ready again when its response has been read,
//! and only ready connections are handed out.
//!
//! Flow (HTTP/2, [`H2Set`]): the downstream connection's permit
//! ([`ClientStreams`], `--upstream-streams-per-client`, from the request's
//! extensions; waits while that client holds its whole allowance) → the
//! first open connection that is not going away and has fewer streams open
//! than the peer's `SETTINGS_MAX_CONCURRENT_STREAMS` (our own count: hyper's
//! h2 client would queue beyond the peer's limit) → else ONE caller opens a
//! new connection while the others wait for it (no racing connects, at most
//! [`MAX_H2_PER_ENDPOINT`] open; with all of them full, the caller waits
//! for a stream to end anywhere in the set, in turn with other waiters, and
//! presses the streams waiting on their clients, see `stream_watch`). The stream is counted until the response body ends
//! ([`StreamSlot`], carried by the body). The peer's stream limit is read
//! from hyper's connection object (shared with its task) at each checkout;
//! a new connection starts from the limit the endpoint last announced.
//!
//! What the pool's remote end speaks ([`Remote`]):
//! - a mesh endpoint with an identity, while this sidecar has a workload
//!   certificate: mTLS (`identity::tls`). Every HTTP request goes as HTTP/2
//!   on the shared mTLS connections (ALPN `h2`), HTTP/1.x converted
//!   (absolute URI from `Host`, no `Host`) and marked
//!   `x-meshlet-orig-proto`; an HTTP/1.1 `Upgrade` request gets its own TLS
//!   connection with ALPN `http/1.1`. Our own certificate expired: nothing
//!   is sent (`TlsFailure::CertificateExpired`).
//! - the local app: the request is converted to the app's protocol
//!   (`--app-protocol`, else the caller's `x-meshlet-orig-proto`, else as it
//!   arrived), and `x-meshlet-orig-proto` is removed.
//! - anything else: as the request arrived (h2c for HTTP/2).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

use http::header::{self, HeaderName, HeaderValue};
use http::uri::{PathAndQuery, Uri};
use http::{Request, Response, Version};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use meshlet_api::identity::SpiffeId;
use meshlet_api::mesh::AppProtocol;
use prometheus::IntCounter;
use tokio::net::TcpStream;

use crate::body::{ProxyBody, StreamedBody};
use crate::error::UpstreamFailure;
use crate::identity::tls::{self, TlsFailure};
use crate::identity::{Hop, WorkloadIdentity};
use crate::listen::stream_watch::PRESSED_LIMIT;
use crate::settings::Limits;
use crate::telemetry::metrics::PoolMetrics;
use crate::upstream::h1_client;
use crate::upstream::in_flight::{
    ClientPress, ClientStreams, InFlight, InFlightCounter, Pressable, StreamSlot,
};
use crate::upstream::quick_ack::QuickAck;
use crate::upstream::slot_queue::{self, Queued, SlotQueue};

/// HTTP/1.1 connections kept per endpoint (busy or idle).
const MAX_IDLE_PER_ENDPOINT: usize = 128;

/// How long a connect to the local app, while the app answers others, may
/// stay pending before it is started again (see `ConnPool::connect_tcp`).
const FIRST_SYN_AGAIN_AFTER: std::time::Duration = std::time::Duration::from_millis(50);

/// HTTP/2 connections open at once per endpoint and kind (h2c, mTLS).
pub const MAX_H2_PER_ENDPOINT: usize = 8;

/// Streams a new HTTP/2 connection may open before the peer's SETTINGS
/// says how many it allows, when the endpoint never said (RFC 9113
/// recommends that peers allow at least 100).
const INITIAL_MAX_STREAMS: usize = 100;

/// Streams one upstream HTTP/2 connection carries at most, whatever the
/// peer allows: with the windows below, that many streams whose clients
/// take nothing (their responses unread, their windows full) cannot take
/// the whole connection window from the connection's other streams. Past
/// it, requests go to another connection ([`MAX_H2_PER_ENDPOINT`]).
const MAX_STREAMS_PER_H2: usize = 100;

/// The receive window of each upstream HTTP/2 stream: how much of a
/// response the sidecar takes ahead of its client. hyper's 2 MiB, with its
/// 5 MiB per connection, let three clients that stopped reading stall every
/// other response on a shared connection (found by an attack). 128 KiB
/// still carries ~1 Gbit/s per stream at a 1 ms round trip.
const H2_STREAM_WINDOW: u32 = 128 * 1024;

/// The receive window of an upstream HTTP/2 connection: every stream's
/// window at once.
const H2_CONNECTION_WINDOW: u32 = H2_STREAM_WINDOW * MAX_STREAMS_PER_H2 as u32;

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
    Upstream(UpstreamFailure),
    /// No response head before the deadline (the request may have been
    /// sent; it is gone).
    TimedOut,
}

/// A response and, on a shared HTTP/2 connection, the stream it holds
/// (to be kept by the response body until its end).
pub type Answer = (Response<StreamedBody>, Option<StreamSlot>);

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

/// How an HTTP/2 connection of the pool is made.
#[derive(Clone, Copy)]
enum H2Kind<'a> {
    /// h2c, prior knowledge.
    Plain,
    /// The mesh hop: TLS with ALPN `h2` to a peer that must present `identity`.
    Mtls {
        local: &'a Arc<WorkloadIdentity>,
        identity: &'a Arc<SpiffeId>,
    },
}

/// Why the upstream refused a request unprocessed (the label of
/// `meshlet_upstream_resends_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    GoAway,
    RefusedStream,
    ConnectionClosed,
}

/// One shared HTTP/2 connection.
struct H2Conn {
    sender: http2::SendRequest<ProxyBody>,
    /// Streams open on it (counted by us, released by the response body).
    streams: InFlightCounter,
    /// The peer's current `SETTINGS_MAX_CONCURRENT_STREAMS`.
    max_streams: StreamLimit,
    /// A request on it was refused by GOAWAY: no new streams.
    going_away: AtomicBool,
}

impl H2Conn {
    fn open(&self) -> bool {
        !self.going_away.load(Ordering::Relaxed) && !self.sender.is_closed()
    }

    fn has_room(&self) -> bool {
        self.streams.get() < (self.max_streams)().min(MAX_STREAMS_PER_H2)
    }
}

/// The HTTP/2 connections of one kind to one endpoint.
struct H2Set {
    conns: Mutex<Vec<Arc<H2Conn>>>,
    /// Held while a connection is being made: one connect per endpoint at
    /// a time; callers that find no room wait for it.
    connecting: tokio::sync::Mutex<()>,
    /// The stream limit the endpoint last announced (a new connection
    /// assumes it until its own SETTINGS arrive).
    learned_max: Arc<AtomicUsize>,
    /// The watched client streams (HTTP/2 clients' `stream_watch`) whose
    /// requests went on these connections: pressed when they are full.
    watched: Mutex<WatchedStreams>,
    /// Requests waiting for a slot while every connection is full, served
    /// in turn per client; told by each `StreamSlot` that ends.
    queue: Arc<SlotQueue>,
}

/// The progress of client streams carried by an [`H2Set`], held weakly (a
/// finished stream drops its progress); dead entries are pruned as the
/// list grows.
#[derive(Default)]
struct WatchedStreams {
    streams: Vec<Weak<dyn Pressable>>,
    /// The length at which dead entries are pruned next.
    prune_at: usize,
}

impl WatchedStreams {
    fn add(&mut self, pressable: &Arc<dyn Pressable>) {
        if self.streams.len() >= self.prune_at {
            self.streams.retain(|stream| stream.strong_count() > 0);
            self.prune_at = (2 * self.streams.len()).max(64);
        }
        self.streams.push(Arc::downgrade(pressable));
    }

    /// Presses every live stream that waits on its client; returns how
    /// many.
    fn press(&mut self) -> usize {
        self.streams.retain(|stream| stream.strong_count() > 0);
        self.streams
            .iter()
            .filter_map(Weak::upgrade)
            .filter(|progress| progress.press())
            .count()
    }
}

impl H2Set {
    fn new() -> Self {
        H2Set {
            conns: Mutex::new(Vec::new()),
            connecting: tokio::sync::Mutex::new(()),
            learned_max: Arc::new(AtomicUsize::new(INITIAL_MAX_STREAMS)),
            watched: Mutex::default(),
            queue: Arc::default(),
        }
    }

    fn watched(&self) -> std::sync::MutexGuard<'_, WatchedStreams> {
        self.watched.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Arc<H2Conn>>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A stream on the first open connection with room (the oldest first,
    /// so that extra connections fall idle when load drops). Forgets closed
    /// connections.
    fn take_stream(&self) -> Option<(Arc<H2Conn>, InFlight)> {
        let mut conns = self.lock();
        conns.retain(|c| !c.sender.is_closed());
        let conn = conns.iter().find(|c| c.open() && c.has_room())?;
        Some((Arc::clone(conn), conn.streams.start()))
    }

    /// Whether an open connection has room for a stream.
    fn has_room(&self) -> bool {
        self.lock().iter().any(|c| c.open() && c.has_room())
    }

    /// Adds a new connection and starts a stream on it.
    fn add(&self, conn: H2Conn) -> (Arc<H2Conn>, InFlight) {
        let conn = Arc::new(conn);
        let stream = conn.streams.start();
        self.lock().push(Arc::clone(&conn));
        (conn, stream)
    }

    fn open_connections(&self) -> usize {
        self.lock().iter().filter(|c| c.open()).count()
    }

    /// Closes connections without streams beyond the first open one, and
    /// forgets closed ones. Returns how many were dropped.
    fn evict_idle(&self) -> usize {
        let mut conns = self.lock();
        let before = conns.len();
        let mut kept_idle = false;
        conns.retain(|c| {
            if !c.open() {
                return c.streams.get() > 0 && !c.sender.is_closed();
            }
            if c.streams.get() > 0 {
                return true;
            }
            !std::mem::replace(&mut kept_idle, true)
        });
        before - conns.len()
    }
}

/// Connections to one upstream address.
pub struct ConnPool {
    addr: SocketAddr,
    limits: Arc<Limits>,
    remote: Remote,
    metrics: PoolMetrics,
    http1: Mutex<Vec<PooledConn>>,
    /// Idle connections of our own HTTP/1.1 client.
    direct: Arc<h1_client::IdleConns>,
    /// h2c connections.
    h2: H2Set,
    /// The mesh hop's mTLS HTTP/2 connections.
    mtls: H2Set,
}

impl std::fmt::Debug for ConnPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnPool")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl ConnPool {
    /// A pool whose counters are registered nowhere (tests).
    #[cfg(test)]
    pub fn new(addr: SocketAddr, limits: Arc<Limits>) -> Arc<Self> {
        Self::with_remote(addr, limits, Remote::Plain)
    }

    /// A pool to `remote` whose counters are registered nowhere (tests).
    #[cfg(test)]
    pub fn with_remote(addr: SocketAddr, limits: Arc<Limits>, remote: Remote) -> Arc<Self> {
        Self::counted(addr, limits, remote, PoolMetrics::detached())
    }

    /// A pool to `remote` at `addr` counting on `metrics`.
    pub fn counted(
        addr: SocketAddr,
        limits: Arc<Limits>,
        remote: Remote,
        metrics: PoolMetrics,
    ) -> Arc<Self> {
        Arc::new(ConnPool {
            addr,
            limits,
            remote,
            metrics,
            http1: Mutex::new(Vec::new()),
            direct: h1_client::IdleConns::new(MAX_IDLE_PER_ENDPOINT),
            h2: H2Set::new(),
            mtls: H2Set::new(),
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
    /// Whether requests may go on shared HTTP/2 connections here: the
    /// mesh hop, or an app that speaks h2c.
    pub fn may_use_h2(&self) -> bool {
        matches!(
            self.remote,
            Remote::Mesh { .. } | Remote::App(Some(AppProtocol::H2c))
        )
    }

    pub fn app_protocol(&self) -> Option<AppProtocol> {
        match self.remote {
            Remote::App(protocol) => protocol,
            _ => None,
        }
    }

    /// Number of pooled HTTP/1.1 connections (for `/config_dump`).
    pub fn pooled_connections(&self) -> usize {
        self.http1.lock().map(|conns| conns.len()).unwrap_or(0) + self.direct.len()
    }

    /// Whether an mTLS connection is open (for `/config_dump`).
    pub fn has_mtls_connection(&self) -> bool {
        self.mtls.open_connections() > 0
    }

    /// Open HTTP/2 connections (h2c and mTLS).
    #[cfg(test)]
    pub fn h2_connections(&self) -> usize {
        self.h2.open_connections() + self.mtls.open_connections()
    }

    /// Sends `request` to this endpoint (see [`ConnPool::dispatch`]) and
    /// returns the response alone (tests, which need no stream count).
    #[cfg(test)]
    pub async fn send(
        self: &Arc<Self>,
        request: Request<ProxyBody>,
    ) -> Result<Response<StreamedBody>, SendError> {
        self.dispatch(request, None)
            .await
            .map(|(response, _)| response)
    }

    /// Sends `request` to this endpoint: over the mesh's mTLS hop when it
    /// applies, else over HTTP/2 if the request is HTTP/2 (after the app's
    /// protocol is applied), otherwise HTTP/1.1. On a shared HTTP/2
    /// connection the answer holds the request's stream, which the
    /// response body must keep until its end. With a `deadline`, the
    /// response head must come before it, connecting included
    /// ([`SendError::TimedOut`]); `exchange_h1` keeps it with its
    /// connection's lazy timer, the other exchanges under `timeout_at`.
    ///
    /// Only our own HTTP/1.1 exchange (`exchange_h1`, the common case) is
    /// part of this future; hyper's HTTP/1.1 exchange (a request whose
    /// body is still streaming), the HTTP/2 and the mTLS ones are boxed, so
    /// that every request's future (which hyper moves as a whole) does not
    /// carry their space.
    #[allow(clippy::manual_async_fn)] // an `async fn` would copy the request twice into its future
    pub fn dispatch<'p>(
        self: &'p Arc<Self>,
        mut request: Request<ProxyBody>,
        deadline: Option<tokio::time::Instant>,
    ) -> impl Future<Output = Result<Answer, SendError>> + Send + 'p {
        async move {
            match &self.remote {
                Remote::Mesh { local, identity } => match local.hop(Some(identity)) {
                    Hop::Mtls(identity) => {
                        let sent = Box::pin(self.send_mtls(request, local, &identity));
                        return within(deadline, sent)
                            .await
                            .unwrap_or(Err(SendError::TimedOut));
                    }
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
                let sent = Box::pin(self.send_h2(request, H2Kind::Plain));
                let sent = within(deadline, sent)
                    .await
                    .unwrap_or(Err(SendError::TimedOut));
                match self.remote {
                    Remote::App(None) => sent.map_err(app_not_http2),
                    _ => sent,
                }
            } else if h1_client::eligible(&request) {
                // Times itself, with a timer of the connection's.
                self.exchange_h1(request, deadline).await
            } else {
                let sent = Box::pin(self.send_h1(request));
                within(deadline, sent)
                    .await
                    .unwrap_or(Err(SendError::TimedOut))
            }
        }
    }

    /// HTTP/1.1 with a request body still streaming (or an upgrade), by
    /// hyper's client, on a
    /// pooled keep-alive connection (or a new one; a connect that timed out
    /// while the endpoint is [`behind`](ConnPool::behind): a ready
    /// connection or a new connect again). A pooled
    /// connection that was closed before it answered: once more on a new
    /// connection, if the request came back or can be replayed.
    async fn send_h1(
        self: &Arc<Self>,
        mut request: Request<ProxyBody>,
    ) -> Result<Answer, SendError> {
        *request.version_mut() = Version::HTTP_11;
        let mut resent = false;
        loop {
            let pooled = if resent { None } else { self.take_ready() };
            let (mut sender, reused) = match pooled {
                Some(sender) => (sender, true),
                None => match Box::pin(self.connect_h1()).await {
                    Ok(sender) => (sender, false),
                    // Take a connection that became ready meanwhile, or
                    // connect again (within the caller's deadline).
                    Err(source) if self.behind(&source) => continue,
                    Err(source) => {
                        return Err(SendError::Connect {
                            source,
                            request: Box::new(request),
                        })
                    }
                },
            };
            // A closed connection cannot tell "never processed" from
            // "processed, then died" (RFC 9110 §9.2.2): unless hyper hands the
            // request back, only an idempotent method is sent again.
            let replay = if reused && request.method().is_idempotent() {
                replay_copy(&request)
            } else {
                None
            };
            match sender.try_send_request(request).await {
                Ok(response) => {
                    self.keep(sender);
                    return Ok((response.map(StreamedBody::from), None));
                }
                Err(mut err) => {
                    let again = match err.take_message() {
                        Some(unsent) => Some(unsent),
                        None if closed_before_response(err.error()) => replay,
                        None => None,
                    };
                    match again {
                        Some(again) if reused => {
                            tracing::debug!(addr = %self.addr, error = %err.error(),
                                "pooled connection closed before answering; sending again on a new connection");
                            self.metrics.resent_connection_closed.inc();
                            request = again;
                            resent = true;
                        }
                        _ => return Err(SendError::Upstream(err.into_error().into())),
                    }
                }
            }
        }
    }

    /// HTTP/1.1 without a request body or with one held in full (written
    /// with the head), by our own client from this task
    /// (`h1_client`) on an idle connection of its own (or a new one). A
    /// pooled connection that was closed before it answered: once more on
    /// a new connection, if the request did not reach the upstream whole
    /// or its method is idempotent. The request is only read, so nothing
    /// needs copying for that.
    #[allow(clippy::manual_async_fn)] // an `async fn` would copy the request twice into its future
    fn exchange_h1<'p>(
        self: &'p Arc<Self>,
        request: Request<ProxyBody>,
        deadline: Option<tokio::time::Instant>,
    ) -> impl Future<Output = Result<Answer, SendError>> + 'p {
        async move {
            let mut resent = false;
            loop {
                let pooled = if resent {
                    None
                } else {
                    self.direct.take(self.limits.idle_timeout)
                };
                let (conn, reused) = match pooled {
                    Some(conn) => (conn, true),
                    // Boxed: the connect's state would otherwise grow this
                    // future, which every request moves.
                    None => {
                        match within(deadline, Box::pin(self.connect_or_given_back(resent))).await {
                            Some(Ok(taken)) => taken,
                            Some(Err(source)) => {
                                return Err(SendError::Connect {
                                    source,
                                    request: Box::new(request),
                                })
                            }
                            None => return Err(SendError::TimedOut),
                        }
                    }
                };
                match h1_client::exchange(conn, &request, &self.direct, deadline).await {
                    Ok(response) => return Ok((response.map(StreamedBody::from), None)),
                    Err(h1_client::ExchangeError::TimedOut) => return Err(SendError::TimedOut),
                    Err(error)
                        if reused
                            && error.unanswered()
                            && (error.unsent() || request.method().is_idempotent()) =>
                    {
                        tracing::debug!(addr = %self.addr, %error,
                            "pooled connection closed before answering; sending again on a new connection");
                        self.metrics.resent_connection_closed.inc();
                        resent = true;
                    }
                    Err(error) => return Err(SendError::Upstream(error.into())),
                }
            }
        }
    }

    /// A connection for `exchange_h1` (and whether it is a reused one):
    /// a new one, or, unless the request must go on a `fresh` one, one
    /// that another request gives back meanwhile, whichever comes first.
    ///
    /// Why: a burst can need more connections than the app accepts at
    /// once. A connect whose SYN the app's full accept queue dropped is
    /// tried again by the kernel only after 1 s (RFC 6298's initial
    /// timeout), when the default connect timeout has already ended it,
    /// while the connections that did get in come back as soon as the app
    /// answers. So a connect to the local app that times out while the app
    /// answers others (it is alive, only behind: [`ConnPool::behind`]) is
    /// started again and the request keeps waiting for either, within its
    /// own deadline; otherwise the timeout is an error as before. A connect
    /// that loses the race goes on in a task of its own and adds its
    /// connection to the idle list for the next request.
    async fn connect_or_given_back(
        self: &Arc<Self>,
        fresh: bool,
    ) -> io::Result<(Box<h1_client::Conn>, bool)> {
        let connect = |pool: Arc<Self>| {
            Box::pin(async move {
                let stream = pool.connect_tcp().await?;
                pool.metrics.opened_http1.inc();
                Ok::<_, io::Error>(h1_client::Conn::new(QuickAck::new(stream)))
            })
        };
        let mut connecting = connect(Arc::clone(self));
        if fresh {
            return Ok((connecting.await?, false));
        }
        loop {
            tokio::select! {
                biased;
                connected = &mut connecting => match connected {
                    Ok(conn) => return Ok((conn, false)),
                    Err(error) if self.behind(&error) => {
                        connecting = connect(Arc::clone(self));
                    }
                    Err(error) => return Err(error),
                },
                () = self.direct.given_back() => {
                    let Some(conn) = self.direct.take(self.limits.idle_timeout) else {
                        continue;
                    };
                    let idle = Arc::clone(&self.direct);
                    let addr = self.addr;
                    tokio::spawn(async move {
                        match connecting.await {
                            Ok(conn) => idle.keep(conn, Instant::now()),
                            Err(error) => tracing::debug!(%addr, %error,
                                "connect no request waits for any more failed"),
                        }
                    });
                    return Ok((conn, true));
                }
            }
        }
    }

    /// HTTP/2 on a shared connection of `kind`: the downstream connection's
    /// permit, a stream on a connection with room (or a new connection),
    /// and once more on another connection if the upstream refused the
    /// stream unprocessed.
    async fn send_h2(
        self: &Arc<Self>,
        mut request: Request<ProxyBody>,
        kind: H2Kind<'_>,
    ) -> Result<Answer, SendError> {
        // Whose turn a request waits for when every slot is taken.
        let client_id = request
            .extensions()
            .get::<ClientStreams>()
            .map_or_else(slot_queue::own_client_id, ClientStreams::id);
        let mut client = match request.extensions().get::<ClientStreams>() {
            Some(client) => {
                if client.available() == 0 {
                    tracing::debug!(addr = %self.addr, client = client.id(),
                        "client connection holds its whole upstream stream allowance; waiting");
                }
                client.acquire().await
            }
            None => None,
        };
        let press = request.extensions().get::<ClientPress>().cloned();
        let mut resent = false;
        loop {
            let (conn, slot) = match self.h2_stream(kind, client_id).await {
                // A slot from here on: however this try ends (an error, the
                // request cancelled or timed out before the answer), the
                // next request in turn is woken when it is dropped.
                Ok((conn, stream)) => {
                    let queue = Arc::clone(&self.h2_set(kind).queue);
                    (conn, StreamSlot::new(stream, Some(queue)))
                }
                Err(source) => {
                    return Err(SendError::Connect {
                        source,
                        request: Box::new(request),
                    })
                }
            };
            let replay = if resent { None } else { replay_copy(&request) };
            let mut sender = conn.sender.clone();
            match sender.try_send_request(request).await {
                Ok(response) => {
                    // One entry per stream (an HTTP/1.1 client's connection
                    // press is shared by its requests): it dies with the
                    // stream's slot.
                    let pressable = press.as_ref().map(|press| {
                        let entry: Arc<dyn Pressable> = Arc::new(press.clone());
                        self.h2_set(kind).watched().add(&entry);
                        entry
                    });
                    let slot = slot.answered(client.take(), pressable);
                    return Ok((response.map(StreamedBody::from), Some(slot)));
                }
                Err(mut err) => {
                    drop(slot);
                    let unsent = err.take_message();
                    let refusal = h2_refusal(err.error(), unsent.is_some());
                    if refusal == Some(Refusal::GoAway) {
                        conn.going_away.store(true, Ordering::Relaxed);
                    }
                    match (refusal, unsent.or(replay)) {
                        (Some(refusal), Some(again)) if !resent => {
                            tracing::debug!(addr = %self.addr, error = %err.error(), ?refusal,
                                "upstream refused the stream unprocessed; sending again on another connection");
                            self.resend_counter(refusal).inc();
                            request = again;
                            resent = true;
                        }
                        _ => return Err(SendError::Upstream(err.into_error().into())),
                    }
                }
            }
        }
    }

    fn resend_counter(&self, refusal: Refusal) -> &IntCounter {
        match refusal {
            Refusal::GoAway => &self.metrics.resent_goaway,
            Refusal::RefusedStream => &self.metrics.resent_refused_stream,
            Refusal::ConnectionClosed => &self.metrics.resent_connection_closed,
        }
    }

    fn h2_set(&self, kind: H2Kind<'_>) -> &H2Set {
        match kind {
            H2Kind::Plain => &self.h2,
            H2Kind::Mtls { .. } => &self.mtls,
        }
    }

    /// A stream on a connection of `kind` with room; else one caller
    /// connects while the others wait and then look again. With every
    /// connection slot taken and every connection full, the caller queues
    /// for a stream to end anywhere in the set (`slot_queue`: served in turn
    /// per `client`, woken by [`StreamSlot`]s as they end), and the streams
    /// waiting on their clients are pressed once per [`PRESSED_LIMIT`]
    /// meanwhile (`stream_watch`): clients not reading cannot hold every
    /// slot, a client with many waiting requests takes one slot per turn,
    /// and a request never waits behind one connection's slow streams while
    /// another has room. While requests wait, a newcomer queues behind them.
    /// Bounded by the request's deadline (the caller's).
    async fn h2_stream(
        &self,
        kind: H2Kind<'_>,
        client: u64,
    ) -> io::Result<(Arc<H2Conn>, InFlight)> {
        let set = self.h2_set(kind);
        let mut pressed_at: Option<Instant> = None;
        let mut queued: Option<Queued> = None;
        loop {
            // A slot freed while requests wait is being handed to one of
            // them: only a woken request, or one with nobody ahead, takes.
            let may_take = match &queued {
                Some(queued) => queued.woken(),
                None => !set.queue.is_waiting(),
            };
            if may_take {
                if let Some(found) = set.take_stream() {
                    if let Some(queued) = queued {
                        queued.served();
                    }
                    return Ok(found);
                }
            }
            {
                let _connecting = set.connecting.lock().await;
                if may_take {
                    if let Some(found) = set.take_stream() {
                        if let Some(queued) = queued {
                            queued.served();
                        }
                        return Ok(found);
                    }
                }
                if set.lock().len() < MAX_H2_PER_ENDPOINT {
                    let conn = Box::pin(self.connect_h2(kind, set)).await?;
                    if let Some(queued) = queued {
                        queued.served();
                    }
                    return Ok(set.add(conn));
                }
            }
            let waiting = match queued.take() {
                // Woken, but the slot was gone: first in turn again.
                Some(woken) if woken.woken() => woken.again(),
                Some(waiting) => waiting,
                None => set.queue.join(client),
            };
            // A stream that ended between the last look and joining found
            // nobody to hand its slot to.
            if set.has_room() {
                set.queue.freed();
            }
            if pressed_at.is_none_or(|at| at.elapsed() >= PRESSED_LIMIT) {
                self.press(set);
                pressed_at = Some(Instant::now());
            }
            let _ = tokio::time::timeout(PRESSED_LIMIT, waiting.turn()).await;
            queued = Some(waiting);
        }
    }

    fn press(&self, set: &H2Set) {
        let pressed = set.watched().press();
        tracing::debug!(addr = %self.addr, pressed,
            "every upstream HTTP/2 stream slot taken; streams waiting on their clients pressed");
    }

    /// The mesh hop: HTTP/2 on the shared mTLS connections, or an upgrade
    /// on a TLS connection of its own.
    async fn send_mtls(
        self: &Arc<Self>,
        mut request: Request<ProxyBody>,
        local: &Arc<WorkloadIdentity>,
        identity: &Arc<SpiffeId>,
    ) -> Result<Answer, SendError> {
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
            return self
                .send_upgrade_tls(request, local, identity)
                .await
                .map(|response| (response.map(StreamedBody::from), None));
        }
        to_http2(&mut request);
        self.send_h2(request, H2Kind::Mtls { local, identity })
            .await
    }

    /// A new HTTP/2 connection of `kind`; its task keeps the connection's
    /// (and the endpoint's) stream limit current.
    async fn connect_h2(&self, kind: H2Kind<'_>, set: &H2Set) -> io::Result<H2Conn> {
        let stream = self.connect_tcp().await?;
        let initial = set.learned_max.load(Ordering::Relaxed);
        let mut builder = http2::Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .initial_max_send_streams(initial)
            .initial_stream_window_size(H2_STREAM_WINDOW)
            .initial_connection_window_size(H2_CONNECTION_WINDOW)
            // Streams our clients cancel are reset here; h2 remembers the
            // last 50 for a second by default, answers frames still in
            // flight for older ones as protocol errors, and after 1024 of
            // those in the connection's life drops it with every other
            // stream on it (an attack cancelling streams after their head
            // got 903 requests of other clients answered 502). Remember a
            // connection's worth of resets, and no lifetime cap: the peer
            // is the app or an authenticated sidecar, and an error reset
            // is one frame we send per frame it sent.
            .max_concurrent_reset_streams(10 * MAX_STREAMS_PER_H2)
            .max_local_error_reset_streams(None);
        let learned = Arc::clone(&set.learned_max);
        let (sender, max_streams) = match kind {
            H2Kind::Plain => {
                let (sender, conn) = builder
                    .handshake(TokioIo::new(stream))
                    .await
                    .map_err(io::Error::other)?;
                self.metrics.opened_h2c.inc();
                let limit = spawn_h2(self.addr, conn, |c| c.current_max_send_streams(), learned);
                (sender, limit)
            }
            H2Kind::Mtls { local, identity } => {
                let stream = tls::connect(
                    local,
                    stream,
                    self.addr,
                    identity,
                    tls::ALPN_H2,
                    self.limits.connect_timeout,
                )
                .await?;
                let (sender, conn) = builder
                    .handshake(TokioIo::new(stream))
                    .await
                    .map_err(|e| io::Error::other(TlsFailure::Handshake(e.to_string())))?;
                self.metrics.opened_mtls.inc();
                let limit = spawn_h2(self.addr, conn, |c| c.current_max_send_streams(), learned);
                (sender, limit)
            }
        };
        Ok(H2Conn {
            sender,
            streams: InFlightCounter::default(),
            max_streams,
            going_away: AtomicBool::new(false),
        })
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
            self.metrics.opened_mtls.inc();
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
            .map_err(|e| SendError::Upstream(e.into()))
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
    /// or that have been idle past the idle timeout, and HTTP/2 connections
    /// without streams beyond one per kind. Checkouts do this too; the
    /// periodic sweep makes sure a pool nobody uses any more does not hold
    /// its sockets forever. Returns how many were dropped.
    pub fn evict_idle(&self) -> usize {
        let h2 = self.h2.evict_idle() + self.mtls.evict_idle();
        let Ok(mut conns) = self.http1.lock() else {
            return h2;
        };
        let before = conns.len();
        let idle_timeout = self.limits.idle_timeout;
        conns.retain(|c| {
            let expired = c.sender.is_ready() && c.last_used.elapsed() >= idle_timeout;
            !c.sender.is_closed() && !expired
        });
        let hyper_h1 = before - conns.len();
        drop(conns);
        h2 + hyper_h1 + self.direct.evict(idle_timeout)
    }

    /// Keeps a connection that just carried a request. It becomes ready
    /// again by itself once the response has been read (hyper's dispatcher
    /// signals it); `take_ready` only hands out ready ones. This costs no task
    /// per request, unlike waiting for readiness in a spawned task.
    fn keep(&self, sender: http1::SendRequest<ProxyBody>) {
        let now = Instant::now();
        // The app answered (for `behind`).
        self.direct.answered(now);
        if let Ok(mut conns) = self.http1.lock() {
            if conns.len() < MAX_IDLE_PER_ENDPOINT {
                conns.push(PooledConn {
                    sender,
                    last_used: now,
                });
            }
        }
    }

    /// Connects within the connect timeout. To the local app, a connect
    /// still pending after [`FIRST_SYN_AGAIN_AFTER`] (then after twice as
    /// long each time) is started again if the app answers others by then:
    /// on loopback or a pod's veth a handshake completes at once unless the
    /// app's full accept queue dropped the SYN, and the kernel would send
    /// it again only after 1 s (RFC 6298's initial timeout), while the app,
    /// answering, frees room in its queue every few milliseconds.
    /// Elsewhere, or while the app answers nothing, one connect waits the
    /// whole timeout as before.
    async fn connect_tcp(&self) -> io::Result<TcpStream> {
        let timeout = self.limits.connect_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        let local_app = matches!(self.remote, Remote::App(_));
        let mut again_after = FIRST_SYN_AGAIN_AFTER;
        let mut connect = std::pin::pin!(TcpStream::connect(self.addr));
        loop {
            let look_at = if local_app {
                deadline.min(tokio::time::Instant::now() + again_after)
            } else {
                deadline
            };
            // The connect is polled before the timer: a handshake that has
            // completed is never given up because the runtime was late.
            match tokio::time::timeout_at(look_at, connect.as_mut()).await {
                Ok(stream) => {
                    let stream = stream?;
                    stream.set_nodelay(true)?;
                    return Ok(stream);
                }
                Err(_) if look_at < deadline => {
                    if self.direct.answered_within(timeout) {
                        self.metrics.app_accept_queue_full.inc();
                        connect.set(TcpStream::connect(self.addr));
                    }
                    again_after = again_after.saturating_mul(2);
                }
                Err(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("connect timed out after {timeout:?}"),
                    ))
                }
            }
        }
    }

    /// Whether a connect that failed with `error` is worth starting again:
    /// it timed out to the local app while the app is alive and only
    /// behind in accepting (its accept queue full), which is what an app
    /// that answered a request within the last connect timeout and drops
    /// SYNs now looks like. An app that answered nothing for that long is
    /// hung or overloaded for good: the timeout is an error (502 at once,
    /// as before), and so it is after at most one more connect timeout
    /// once an app stops answering. The caller's deadline bounds the
    /// attempts. Never for another endpoint: there a timed-out connect may
    /// be a dead host whose connections hang, and the request should go to
    /// another endpoint (`forward` tries up to 3) at once.
    fn behind(&self, error: &io::Error) -> bool {
        if error.kind() != io::ErrorKind::TimedOut || !matches!(self.remote, Remote::App(_)) {
            return false;
        }
        let behind = self.direct.answered_within(self.limits.connect_timeout);
        if behind {
            self.metrics.app_accept_queue_full.inc();
            tracing::debug!(addr = %self.addr,
                "connect to the app timed out while it answers others (accept queue full?); connecting again");
        }
        behind
    }

    async fn connect_h1(&self) -> io::Result<http1::SendRequest<ProxyBody>> {
        let stream = QuickAck::new(self.connect_tcp().await?);
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(io::Error::other)?;
        self.metrics.opened_http1.inc();
        let addr = self.addr;
        tokio::spawn(async move {
            if let Err(err) = conn.with_upgrades().await {
                tracing::debug!(%addr, error = %err, "upstream http/1 connection ended with an error");
            }
        });
        Ok(sender)
    }
}

/// Reads an HTTP/2 connection's current peer stream limit.
type StreamLimit = Box<dyn Fn() -> usize + Send + Sync>;

/// Runs an HTTP/2 connection's task and returns the reader of the peer's
/// current stream limit (`max_of`; hyper's connection object answers it
/// from h2's shared state, which the SETTINGS frames update). The reader
/// also remembers it as the endpoint's `learned` limit; while the task is
/// polling, it answers the last value read.
fn spawn_h2<C>(
    addr: SocketAddr,
    conn: C,
    max_of: fn(&C) -> usize,
    learned: Arc<AtomicUsize>,
) -> StreamLimit
where
    C: Future<Output = hyper::Result<()>> + Send + 'static,
{
    let cached = Arc::new(AtomicUsize::new(learned.load(Ordering::Relaxed)));
    // The connection object is dropped as soon as it has ended: it holds
    // hyper's request queue, whose drop hands back requests still queued
    // and makes the senders report the connection closed.
    let conn = Arc::new(Mutex::new(Some(Box::pin(conn))));
    let (task_conn, task_cached) = (Arc::clone(&conn), Arc::clone(&cached));
    tokio::spawn(async move {
        let ended = std::future::poll_fn(|cx| {
            let mut slot = task_conn.lock().unwrap_or_else(|p| p.into_inner());
            let Some(conn) = slot.as_mut() else {
                return std::task::Poll::Ready(Ok(()));
            };
            let polled = conn.as_mut().poll(cx);
            task_cached.store(max_of(conn), Ordering::Relaxed);
            if polled.is_ready() {
                *slot = None;
            }
            polled
        })
        .await;
        if let Err(err) = ended {
            tracing::debug!(%addr, error = %err, "upstream h2 connection ended with an error");
        }
    });
    Box::new(move || match conn.try_lock() {
        Ok(slot) => match slot.as_ref() {
            Some(conn) => {
                let max = max_of(conn);
                cached.store(max, Ordering::Relaxed);
                learned.store(max, Ordering::Relaxed);
                max
            }
            None => 0,
        },
        Err(_) => cached.load(Ordering::Relaxed),
    })
}

/// A copy of `request` to send again if the first attempt is refused
/// unprocessed: only when its body is known in full
/// ([`ProxyBody::replay_copy`]).
fn replay_copy(request: &Request<ProxyBody>) -> Option<Request<ProxyBody>> {
    let body = request.body().replay_copy()?;
    let mut copy = Request::new(body);
    *copy.method_mut() = request.method().clone();
    *copy.uri_mut() = request.uri().clone();
    *copy.version_mut() = request.version();
    *copy.headers_mut() = request.headers().clone();
    *copy.extensions_mut() = request.extensions().clone();
    Some(copy)
}

/// Whether an HTTP/2 request failed without the upstream processing it:
/// a remote GOAWAY (h2 fails streams above the GOAWAY's last stream id,
/// and any opened after it, with that error), a remote `REFUSED_STREAM`,
/// or the request handed back by hyper (`handed_back`: the connection
/// closed before the request reached it).
fn h2_refusal(error: &hyper::Error, handed_back: bool) -> Option<Refusal> {
    let h2 = std::error::Error::source(error).and_then(|e| e.downcast_ref::<h2::Error>());
    match h2 {
        Some(e) if e.is_go_away() && e.is_remote() => Some(Refusal::GoAway),
        Some(e)
            if e.is_reset() && e.is_remote() && e.reason() == Some(h2::Reason::REFUSED_STREAM) =>
        {
            Some(Refusal::RefusedStream)
        }
        _ if handed_back => Some(Refusal::ConnectionClosed),
        _ => None,
    }
}

/// A failed HTTP/2 exchange with a local app that declared no protocol,
/// told apart when the app broke HTTP/2's framing (this side ended the
/// connection with `FRAME_SIZE_ERROR` or `PROTOCOL_ERROR`): what an
/// HTTP/1.1 server's answer to the connection preface (`HTTP/1.1 400
/// ...` read as a frame) gives. An app that closes without answering
/// stays an ordinary failure.
fn app_not_http2(error: SendError) -> SendError {
    match error {
        SendError::Upstream(UpstreamFailure::Hyper(error)) if broke_h2_framing(&error) => {
            SendError::Upstream(UpstreamFailure::AppNotHttp2(error))
        }
        other => other,
    }
}

fn broke_h2_framing(error: &hyper::Error) -> bool {
    let h2 = std::error::Error::source(error).and_then(|e| e.downcast_ref::<h2::Error>());
    h2.is_some_and(|e| {
        e.is_go_away()
            && e.is_library()
            && matches!(
                e.reason(),
                Some(h2::Reason::FRAME_SIZE_ERROR | h2::Reason::PROTOCOL_ERROR)
            )
    })
}

/// The `future`'s output, or `None` if `deadline` passes first.
async fn within<F: Future>(deadline: Option<tokio::time::Instant>, future: F) -> Option<F::Output> {
    match deadline {
        Some(at) => tokio::time::timeout_at(at, future).await.ok(),
        None => Some(future.await),
    }
}

/// Whether an HTTP/1.1 exchange failed because the connection closed
/// before the response: end of stream while waiting for it, or a
/// connection reset or broken.
fn closed_before_response(error: &hyper::Error) -> bool {
    if error.is_incomplete_message() {
        return true;
    }
    let mut source = std::error::Error::source(error);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<io::Error>() {
            return matches!(
                io.kind(),
                io::ErrorKind::ConnectionReset
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::ConnectionAborted
            );
        }
        source = e.source();
    }
    false
}

/// The local app's protocol for `request`: `declared` (`--app-protocol`),
/// else the caller's (`x-meshlet-orig-proto`), else as it arrived; the
/// mark is removed. An upgrade stays HTTP/1.1.
fn for_app(request: &mut Request<ProxyBody>, declared: Option<AppProtocol>) {
    // One pass over the names instead of two hash lookups: the mark is
    // there only after an mTLS hop, `Upgrade` only on an upgrade.
    let (mut orig, mut upgrade) = (false, false);
    for name in request.headers().keys() {
        orig |= *name == ORIG_PROTO;
        upgrade |= name == header::UPGRADE;
    }
    let orig = if orig {
        request.headers_mut().remove(ORIG_PROTO)
    } else {
        None
    };
    if upgrade {
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
    use std::sync::atomic::AtomicUsize;

    use hyper_util::rt::TokioIo;

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

    /// An app listening with an accept queue of one that accepts exactly
    /// one connection and answers each request on it `answer_after` it
    /// arrived (`None`: never). Returns its address and what says that the
    /// connection was accepted (after which two connections of the test's
    /// own fill the queue, and every SYN after is dropped).
    async fn one_connection_app(
        answer_after: Option<std::time::Duration>,
    ) -> (SocketAddr, tokio::sync::oneshot::Receiver<()>) {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(1).unwrap();
        let addr = listener.local_addr().unwrap();
        let (accepted, on_accept) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let _ = accepted.send(());
            let _listening = listener;
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            loop {
                match tokio::io::AsyncReadExt::read(&mut stream, &mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
                while let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                    head.drain(..end + 4);
                    let Some(after) = answer_after else {
                        std::future::pending::<()>().await;
                        return;
                    };
                    tokio::time::sleep(after).await;
                    let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                    if tokio::io::AsyncWriteExt::write_all(&mut stream, answer)
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        });
        (addr, on_accept)
    }

    /// `remote`'s pool with a 200 ms connect timeout to a
    /// [`one_connection_app`]: a first request on the one connection, the
    /// queue filled, then two more requests at once with a 2 s deadline;
    /// their outcomes (the body, or the error).
    async fn two_more_while_the_queue_is_full(
        remote: Remote,
        answer_after: Option<std::time::Duration>,
    ) -> Vec<Result<String, SendError>> {
        let (addr, accepted) = one_connection_app(answer_after).await;
        let limits = Limits {
            connect_timeout: std::time::Duration::from_millis(200),
            ..Limits::default()
        };
        let pool = ConnPool::with_remote(addr, Arc::new(limits), remote);
        let first = Arc::clone(&pool);
        tokio::spawn(async move {
            if let Ok(response) = first.send(get("/")).await {
                text(response).await;
            }
        });
        accepted
            .await
            .expect("the app accepts the first connection");
        let mut fillers = Vec::new();
        for _ in 0..2 {
            fillers.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        at_once(&pool, 2, std::time::Duration::from_secs(2)).await
    }

    /// `count` GET requests sent through `pool` at once, each with the
    /// same deadline `within` from now; their outcomes (the body, or the
    /// error), in order.
    async fn at_once(
        pool: &Arc<ConnPool>,
        count: usize,
        within: std::time::Duration,
    ) -> Vec<Result<String, SendError>> {
        let deadline = tokio::time::Instant::now() + within;
        let requests = (0..count).map(|_| {
            let pool = Arc::clone(pool);
            tokio::spawn(async move {
                let (response, _) = pool.dispatch(get("/"), Some(deadline)).await?;
                Ok(text(response).await)
            })
        });
        let mut outcomes = Vec::new();
        for request in requests.collect::<Vec<_>>() {
            outcomes.push(request.await.unwrap());
        }
        outcomes
    }

    fn timed_out_connect(outcome: &Result<String, SendError>) -> bool {
        matches!(outcome, Err(SendError::Connect { source, .. })
            if source.kind() == io::ErrorKind::TimedOut)
    }

    #[tokio::test]
    async fn an_answering_app_behind_in_accepting_is_waited_for_within_the_deadline() {
        // One connection answering every 150 ms: one of the two requests
        // takes it when the first gives it back; the other's connect times
        // out at 200 ms while the app answers, so it waits for the next.
        let ms150 = Some(std::time::Duration::from_millis(150));
        let outcomes = two_more_while_the_queue_is_full(Remote::App(None), ms150).await;
        for outcome in &outcomes {
            assert_eq!(
                outcome.as_ref().ok().map(String::as_str),
                Some("ok"),
                "{outcome:?}"
            );
        }
        // Another endpoint: the same looks like a dead host; the request
        // fails at the connect timeout, for the next endpoint.
        let outcomes = two_more_while_the_queue_is_full(Remote::Plain, ms150).await;
        assert!(outcomes.iter().any(timed_out_connect), "{outcomes:?}");
    }

    /// An app with an accept queue of one that serves one connection at a
    /// time: reads a head, answers it `answer_after` with `connection:
    /// close`, closes, then accepts the next.
    async fn closing_app(answer_after: std::time::Duration) -> SocketAddr {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(1).unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tokio::io::AsyncReadExt::read(&mut stream, &mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                // A connection given up by its client before it was
                // accepted has no head: on to the next.
                if head.windows(4).any(|w| w == b"\r\n\r\n") {
                    tokio::time::sleep(answer_after).await;
                    let answer =
                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok";
                    let _ = tokio::io::AsyncWriteExt::write_all(&mut stream, answer).await;
                }
            }
        });
        addr
    }

    /// Five requests at once with a 3 s deadline through `remote`'s pool
    /// (200 ms connect timeout) to a [`closing_app`] answering in 150 ms.
    async fn five_at_once_to_a_closing_app(remote: Remote) -> Vec<Result<String, SendError>> {
        let addr = closing_app(std::time::Duration::from_millis(150)).await;
        let limits = Limits {
            connect_timeout: std::time::Duration::from_millis(200),
            ..Limits::default()
        };
        let pool = ConnPool::with_remote(addr, Arc::new(limits), remote);
        at_once(&pool, 5, std::time::Duration::from_secs(3)).await
    }

    #[tokio::test]
    async fn an_app_closing_every_connection_is_waited_for_too_while_it_answers() {
        // Each request needs a connection of its own: the app takes one,
        // its queue two, the kernel drops the other SYNs. Their connects
        // time out at 200 ms while the app answers (every 150 ms, each
        // answer with `connection: close`), so they are started again.
        let outcomes = five_at_once_to_a_closing_app(Remote::App(None)).await;
        for outcome in &outcomes {
            assert_eq!(
                outcome.as_ref().ok().map(String::as_str),
                Some("ok"),
                "{outcome:?}"
            );
        }
        // Another endpoint: a dropped SYN looks like a dead host there.
        let outcomes = five_at_once_to_a_closing_app(Remote::Plain).await;
        assert!(outcomes.iter().any(timed_out_connect), "{outcomes:?}");
    }

    #[tokio::test]
    async fn a_dropped_syn_to_an_answering_app_is_sent_again_before_the_kernel_would() {
        // Five requests at once to an app that answers one connection at a
        // time every 10 ms with `connection: close`: the kernel drops the
        // SYNs that find its queue (two) full and would send them again
        // only after 1 s, past the requests' 900 ms deadline; the connect
        // timeout (5 s) is not what ends them. Restarted at 50 ms, they
        // are answered within ~100 ms: the deadline leaves a busy machine
        // most of a second.
        let addr = closing_app(std::time::Duration::from_millis(10)).await;
        let limits = Limits {
            connect_timeout: std::time::Duration::from_secs(5),
            ..Limits::default()
        };
        let pool = ConnPool::with_remote(addr, Arc::new(limits), Remote::App(None));
        let outcomes = at_once(&pool, 5, std::time::Duration::from_millis(900)).await;
        for outcome in &outcomes {
            assert_eq!(
                outcome.as_ref().ok().map(String::as_str),
                Some("ok"),
                "{outcome:?}"
            );
        }
        assert!(
            pool.metrics.app_accept_queue_full.get() >= 1,
            "no connect was started again"
        );
    }

    #[tokio::test]
    async fn a_hung_app_still_fails_at_the_connect_timeout() {
        // The app holds its one request unanswered: nothing says it is
        // alive, so the queue it does not drain fails the others at once.
        let outcomes = two_more_while_the_queue_is_full(Remote::App(None), None).await;
        assert!(outcomes.iter().all(timed_out_connect), "{outcomes:?}");
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

    /// An app that speaks only HTTP/1.1 and answers anything with a 400.
    async fn http1_only_app() -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let _ = tokio::io::AsyncReadExt::read(&mut stream, &mut buf).await;
                    let answer = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
                    let _ = tokio::io::AsyncWriteExt::write_all(&mut stream, answer).await;
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn http2_to_an_app_that_speaks_only_http1_says_which_flag_to_set() {
        let addr = http1_only_app().await;
        let mut request = get("/");
        *request.version_mut() = Version::HTTP_2;
        *request.uri_mut() = format!("http://{addr}/").parse().unwrap();
        let undeclared =
            ConnPool::with_remote(addr, Arc::new(Limits::default()), Remote::App(None));
        let error = undeclared.send(request).await.expect_err("not HTTP/2");
        let SendError::Upstream(failure) = error else {
            panic!("{error:?}");
        };
        let message = failure.to_string();
        assert!(message.contains("--app-protocol http1"), "{message}");
        assert!(message.contains("frame with invalid size"), "{message}");

        // Declared h2c: the operator chose it; the failure is told as it is.
        let mut request = get("/");
        *request.version_mut() = Version::HTTP_2;
        *request.uri_mut() = format!("http://{addr}/").parse().unwrap();
        let declared = ConnPool::with_remote(
            addr,
            Arc::new(Limits::default()),
            Remote::App(Some(AppProtocol::H2c)),
        );
        let error = declared.send(request).await.expect_err("not HTTP/2");
        let SendError::Upstream(failure) = error else {
            panic!("{error:?}");
        };
        let message = failure.to_string();
        assert!(!message.contains("--app-protocol"), "{message}");
        assert!(message.starts_with("http2 error: "), "{message}");
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

    /// An HTTP/2 request for `path` on `addr` (scheme and authority, as
    /// `proxy` sets them).
    fn h2_get(addr: SocketAddr, path: &str) -> Request<ProxyBody> {
        let mut request = get(&format!("http://{addr}{path}"));
        *request.version_mut() = Version::HTTP_2;
        request
    }

    /// Counts of what an in-process upstream saw.
    #[derive(Default)]
    struct Seen {
        connections: AtomicUsize,
        requests: AtomicUsize,
    }

    /// An h2c upstream (the h2 crate's server) that answers every stream
    /// `200 ok` and, after `goaway_after` streams on a connection, shuts
    /// that connection down with GOAWAY (as nginx does after
    /// `keepalive_requests`): streams the client opens after it are
    /// refused unprocessed.
    async fn goaway_upstream(goaway_after: usize) -> (SocketAddr, Arc<Seen>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Seen::default());
        let counts = Arc::clone(&seen);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counts.connections.fetch_add(1, Ordering::SeqCst);
                let counts = Arc::clone(&counts);
                tokio::spawn(async move {
                    let Ok(mut conn) = h2::server::handshake(stream).await else {
                        return;
                    };
                    let mut served = 0;
                    while let Some(Ok((_request, mut respond))) = conn.accept().await {
                        counts.requests.fetch_add(1, Ordering::SeqCst);
                        served += 1;
                        if let Ok(mut body) = respond.send_response(Response::new(()), false) {
                            let _ = body.send_data(bytes::Bytes::from_static(b"ok"), true);
                        }
                        if served == goaway_after {
                            conn.graceful_shutdown();
                        }
                    }
                });
            }
        });
        (addr, seen)
    }

    /// An h2c upstream (hyper's server) allowing `max_streams` concurrent
    /// streams: `/stall` answers when `release` is notified, anything else
    /// at once.
    async fn stalling_upstream(
        max_streams: u32,
        release: Arc<tokio::sync::Notify>,
    ) -> (SocketAddr, Arc<Seen>) {
        use hyper::server::conn::http2 as server;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Seen::default());
        let counts = Arc::clone(&seen);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counts.connections.fetch_add(1, Ordering::SeqCst);
                let (counts, release) = (Arc::clone(&counts), Arc::clone(&release));
                let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                    counts.requests.fetch_add(1, Ordering::SeqCst);
                    let release = Arc::clone(&release);
                    async move {
                        if request.uri().path() == "/stall" {
                            release.notified().await;
                        }
                        Ok::<_, std::convert::Infallible>(Response::new("ok".to_owned()))
                    }
                });
                tokio::spawn(
                    server::Builder::new(TokioExecutor::new())
                        .max_concurrent_streams(max_streams)
                        .serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        (addr, seen)
    }

    /// Waits (up to 5 s) until `check` holds.
    async fn eventually(what: &str, check: impl Fn() -> bool) {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        while !check() {
            assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn streams_refused_by_goaway_are_sent_again_and_none_is_lost_or_doubled() {
        let (addr, seen) = goaway_upstream(5).await;
        let pool = pool(addr);
        // Four callers, ten requests each, one after the other: requests
        // keep arriving while connections go away.
        let callers: Vec<_> = (0..4)
            .map(|_| {
                let pool = Arc::clone(&pool);
                tokio::spawn(async move {
                    for _ in 0..10 {
                        assert_eq!(send_ok(&pool, h2_get(addr, "/")).await, "ok");
                    }
                })
            })
            .collect();
        for caller in callers {
            caller.await.unwrap();
        }
        assert_eq!(
            seen.requests.load(Ordering::SeqCst),
            40,
            "each processed once"
        );
        let opened = seen.connections.load(Ordering::SeqCst);
        assert_eq!(pool.metrics.opened_h2c.get() as usize, opened);
        // Streams that reached a connection before its final GOAWAY are
        // served there, so a connection may serve more than 5.
        assert!(
            (2..=20).contains(&opened),
            "{opened} connections for 40 requests"
        );
    }

    #[tokio::test]
    async fn concurrent_first_requests_share_one_connect() {
        let release = Arc::new(tokio::sync::Notify::new());
        let (addr, seen) = stalling_upstream(100, release).await;
        let pool = pool(addr);
        let concurrent: Vec<_> = (0..50)
            .map(|_| {
                let pool = Arc::clone(&pool);
                tokio::spawn(async move { send_ok(&pool, h2_get(addr, "/")).await })
            })
            .collect();
        for task in concurrent {
            assert_eq!(task.await.unwrap(), "ok");
        }
        assert_eq!(
            seen.connections.load(Ordering::SeqCst),
            1,
            "one connect, shared"
        );
    }

    #[tokio::test]
    async fn a_connection_at_the_peers_stream_limit_gets_a_sibling_instead_of_a_queue() {
        let release = Arc::new(tokio::sync::Notify::new());
        let (addr, seen) = stalling_upstream(2, Arc::clone(&release)).await;
        let pool = pool(addr);
        let stalled: Vec<_> = (0..2)
            .map(|_| {
                let pool = Arc::clone(&pool);
                tokio::spawn(async move { send_ok(&pool, h2_get(addr, "/stall")).await })
            })
            .collect();
        eventually("both stalled streams reached the upstream", || {
            seen.requests.load(Ordering::SeqCst) == 2
        })
        .await;
        // The first connection is full (2 of 2): this one must not queue
        // behind the stalled streams.
        let fast = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            send_ok(&pool, h2_get(addr, "/fast")),
        )
        .await
        .expect("answered while the first connection is full");
        assert_eq!(fast, "ok");
        assert_eq!(seen.connections.load(Ordering::SeqCst), 2);
        assert_eq!(pool.h2_connections(), 2);
        release.notify_waiters();
        for task in stalled {
            assert_eq!(task.await.unwrap(), "ok");
        }
    }

    #[tokio::test]
    async fn streams_refused_beyond_the_peers_limit_are_sent_again() {
        // The first burst goes out before the peer's SETTINGS (limit 1)
        // arrive: the upstream refuses the excess with REFUSED_STREAM.
        let release = Arc::new(tokio::sync::Notify::new());
        let (addr, seen) = stalling_upstream(1, release).await;
        let pool = pool(addr);
        let burst: Vec<_> = (0..6)
            .map(|_| {
                let pool = Arc::clone(&pool);
                tokio::spawn(async move { send_ok(&pool, h2_get(addr, "/")).await })
            })
            .collect();
        for task in burst {
            assert_eq!(task.await.unwrap(), "ok");
        }
        assert_eq!(
            seen.requests.load(Ordering::SeqCst),
            6,
            "each processed once"
        );
        eprintln!(
            "refused_stream resends: {}, goaway: {}, connection_closed: {}",
            pool.metrics.resent_refused_stream.get(),
            pool.metrics.resent_goaway.get(),
            pool.metrics.resent_connection_closed.get()
        );
    }

    /// Clients that cancel their streams right after the response head (the
    /// upstream's data frames still in flight) do not cost other requests
    /// their shared connection: h2's defaults remembered 50 resets for a
    /// second and dropped the connection, with every stream on it, after
    /// 1024 frames for forgotten ones (an attack got 903 requests of other
    /// clients answered 502).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn streams_cancelled_after_their_head_do_not_cost_the_shared_connection() {
        use hyper::server::conn::http2 as server;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let opened = Arc::clone(&connections);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                opened.fetch_add(1, Ordering::SeqCst);
                // 4 MiB in 16 KiB frames: far more than a stream's window,
                // so frames are in flight whenever a stream is reset.
                let service = hyper::service::service_fn(|_: Request<Incoming>| async {
                    let frames = futures_util::stream::iter((0..256).map(|_| {
                        Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(
                            bytes::Bytes::from(vec![b'x'; 16 * 1024]),
                        ))
                    }));
                    Ok::<_, std::convert::Infallible>(Response::new(
                        http_body_util::StreamBody::new(frames),
                    ))
                });
                tokio::spawn(
                    server::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        let pool = pool(addr);
        // 3000 streams, 50 at a time, each dropped with its head.
        for _ in 0..60 {
            let batch: Vec<_> = (0..50)
                .map(|_| {
                    let (pool, request) = (Arc::clone(&pool), h2_get(addr, "/big"));
                    tokio::spawn(async move { pool.send(request).await.map(|r| r.status()) })
                })
                .collect();
            for task in batch {
                assert_eq!(task.await.unwrap().expect("sent"), 200);
            }
        }
        assert_eq!(
            connections.load(Ordering::SeqCst),
            1,
            "the shared connection was dropped for the cancelled streams"
        );
    }

    /// A request that gives its slot up before the answer (cancelled, timed
    /// out) wakes the next request in turn at once. Before, only an answered
    /// stream's `StreamSlot` did, and the waiter found the slot on its own
    /// one-second tick (found by an attack).
    #[tokio::test]
    async fn a_slot_given_up_before_its_answer_goes_to_the_next_request_at_once() {
        let release = Arc::new(tokio::sync::Notify::new());
        let (addr, seen) = stalling_upstream(1, Arc::clone(&release)).await;
        let pool = pool(addr);
        // Teaches the pool the upstream's limit of one stream.
        assert_eq!(send_ok(&pool, h2_get(addr, "/fast")).await, "ok");
        let stalled: Vec<_> = (0..MAX_H2_PER_ENDPOINT)
            .map(|_| {
                let (pool, request) = (Arc::clone(&pool), h2_get(addr, "/stall"));
                tokio::spawn(async move { send_ok(&pool, request).await })
            })
            .collect();
        eventually("every slot taken by a request awaiting its answer", || {
            seen.requests.load(Ordering::SeqCst) == 1 + MAX_H2_PER_ENDPOINT
        })
        .await;
        let waiting = {
            let pool = Arc::clone(&pool);
            tokio::spawn(async move { send_ok(&pool, h2_get(addr, "/fast")).await })
        };
        eventually("the request queued", || pool.h2.queue.is_waiting()).await;
        stalled[0].abort();
        // Woken at once it is answered within milliseconds; left to the
        // tick, ~1 s after it queued. 800 ms tells the two apart with room
        // for a busy machine.
        let answered = tokio::time::timeout(std::time::Duration::from_millis(800), waiting).await;
        assert!(
            matches!(&answered, Ok(Ok(body)) if body == "ok"),
            "the slot given up woke nobody: {answered:?} (a waiter looks again after 1 s)"
        );
        release.notify_waiters();
        for task in stalled.into_iter().skip(1) {
            assert_eq!(task.await.unwrap(), "ok");
        }
    }

    #[tokio::test]
    async fn one_client_at_its_stream_allowance_waits_while_another_is_answered() {
        let release = Arc::new(tokio::sync::Notify::new());
        let (addr, seen) = stalling_upstream(100, Arc::clone(&release)).await;
        let pool = pool(addr);
        let (greedy, other) = (ClientStreams::new(2), ClientStreams::new(2));
        let from = |client: &ClientStreams, path: &str| {
            let mut request = h2_get(addr, path);
            request.extensions_mut().insert(client.clone());
            request
        };
        let stalled: Vec<_> = (0..3)
            .map(|_| {
                let (pool, request) = (Arc::clone(&pool), from(&greedy, "/stall"));
                tokio::spawn(async move { send_ok(&pool, request).await })
            })
            .collect();
        eventually("two stalled streams reached the upstream", || {
            seen.requests.load(Ordering::SeqCst) == 2
        })
        .await;
        assert_eq!(greedy.available(), 0);
        let answered = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            send_ok(&pool, from(&other, "/fast")),
        )
        .await
        .expect("the other client is not blocked");
        assert_eq!(answered, "ok");
        assert_eq!(
            seen.requests.load(Ordering::SeqCst),
            3,
            "the greedy client's third request is still waiting for its allowance"
        );
        assert_eq!(seen.connections.load(Ordering::SeqCst), 1);
        // Released: the third gets one of its client's streams.
        release.notify_waiters();
        eventually("the third stalled request reached the upstream", || {
            seen.requests.load(Ordering::SeqCst) == 4
        })
        .await;
        release.notify_waiters();
        for task in stalled {
            assert_eq!(task.await.unwrap(), "ok");
        }
        assert_eq!(greedy.available(), 2, "every stream given back");
    }

    /// An HTTP/1.1 upstream that answers the first request of each
    /// connection (keep-alive) and closes the connection on reading the
    /// second request's head, answering nothing.
    async fn closes_on_second_request() -> (SocketAddr, Arc<Seen>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Seen::default());
        let counts = Arc::clone(&seen);
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                counts.connections.fetch_add(1, Ordering::SeqCst);
                let counts = Arc::clone(&counts);
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    for answered in 0.. {
                        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                            match stream.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => head.extend_from_slice(&buf[..n]),
                            }
                        }
                        head.clear();
                        counts.requests.fetch_add(1, Ordering::SeqCst);
                        if answered == 1 {
                            return;
                        }
                        let reply = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if stream.write_all(reply).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (addr, seen)
    }

    #[tokio::test]
    async fn a_pooled_connection_closed_before_answering_sends_a_get_again_once() {
        let (addr, seen) = closes_on_second_request().await;
        let pool = pool(addr);
        for _ in 0..3 {
            assert_eq!(send_ok(&pool, get("/")).await, "ok");
        }
        // 1st: new connection; 2nd: pooled, closed unanswered → again on
        // a new one; 3rd: the same.
        assert_eq!(pool.metrics.resent_connection_closed.get(), 2);
        assert_eq!(seen.connections.load(Ordering::SeqCst), 3);
        assert_eq!(pool.metrics.opened_http1.get(), 3);
    }

    #[test]
    fn only_a_body_known_in_full_is_replayed() {
        assert!(replay_copy(&get("/")).is_some(), "empty");
        let full = Request::post("/").body(ProxyBody::full("abc")).unwrap();
        let copy = replay_copy(&full).expect("buffered");
        assert_eq!(copy.method(), "POST");
        assert_eq!(http_body::Body::size_hint(copy.body()).exact(), Some(3));
    }
}
