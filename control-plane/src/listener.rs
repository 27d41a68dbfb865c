//! The API's connections: the accept loop in front of the axum router.
//!
//! ```text
//! accept ─► admit (caps; evict: an unproven one older than 1 s, else the
//!           longest idle proven one, else the oldest unproven; never a
//!           busy one)
//!        ─► TLS handshake (deadline) ─► first request head (deadline from
//!           accept) ─► hyper HTTP/1.1 (keep-alive idle deadline) ─► router
//! ```
//!
//! A connection is **unproven** until its first request head has arrived:
//! until then it costs the server a socket and a task but has shown nothing.
//! Once proven it is **busy** while a request or its response (a watch
//! stream, say) is in flight, **idle** in between. Slow or silent clients
//! (slowloris) are bounded four ways: the TLS handshake
//! ([`Limits::handshake_timeout`]) and the first request head
//! ([`Limits::header_timeout`], from accept) must arrive within their
//! deadlines, and a proven connection idle for [`Limits::idle_timeout`]
//! is closed (hyper's head-read timer, which runs from the moment the
//! connection becomes idle, so it also bounds later heads); at most
//! [`Limits::max_unproven`] connections may be unproven at once, and a new
//! connection past that evicts the oldest unproven one (a flood of silent
//! sockets cannot keep a real client out: the real client proves itself
//! within milliseconds, long before its turn to be evicted); and at most
//! [`Limits::max_connections`] are open at all: past that the oldest
//! unproven one that has had a second to prove itself goes, else the
//! proven connection idle the longest (closed gracefully: hyper lets a
//! request that just started finish), else the oldest unproven one, and
//! only when every connection is busy is the new one closed. So a sidecar's
//! heartbeat connection is never evicted before an idle or unproven one.
//!
//! A client that stops reading its responses cannot hold a slot as
//! "busy" forever either: once it has acknowledged no response byte for
//! [`Limits::write_timeout`] while writes to it are pending, they fail and
//! the connection ends (`meshlet_netio::write_stall`, the sidecar's clock;
//! a client reading slowly but steadily is never cut), and an evicted connection that does not finish within
//! two seconds of its graceful shutdown is dropped.
//!
//! Out of file descriptors (`EMFILE`/`ENFILE` from accept, e.g. under
//! `ulimit -n 1024`): the loop evicts one connection the same way and
//! backs off for a few milliseconds, so it neither spins nor stalls; the
//! server also caps [`Limits::max_connections`] below its descriptor limit
//! (`server.rs`), so this is the exception.
//!
//! [`ConnectionStats`] counts open connections and evictions for
//! `/metrics` (`meshlet_control_plane_api_connections`,
//! `meshlet_control_plane_api_connections_evicted_total`).
//!
//! Shutdown: the loop stops accepting, asks every connection to finish its
//! request in flight (hyper's graceful shutdown; watch streams end through
//! the server's own shutdown signal), and returns once all have, or after
//! [`Limits::drain_timeout`].

use std::collections::{BTreeMap, HashMap};
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use meshlet_netio::{WriteStall, WriteStallIo};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};
use tokio_rustls::TlsAcceptor;
use tower_service::Service;

/// How long a new connection may take to send its first request head
/// before, at the connection cap, it is evicted ahead of idle proven ones.
const UNPROVEN_GRACE: Duration = Duration::from_secs(1);

/// How long an evicted proven connection may take to finish gracefully
/// (a request that just started) before it is dropped.
const EVICTION_GRACE: Duration = Duration::from_secs(2);

/// Bounds on the API's connections (`--api-max-connections`,
/// `--api-header-timeout`, `--api-idle-timeout`; the others are fixed).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections open at once.
    pub max_connections: usize,
    /// Connections open at once that have not yet sent a request head.
    pub max_unproven: usize,
    /// A TLS handshake must complete within this.
    pub handshake_timeout: Duration,
    /// The first request head must arrive within this, counted from accept.
    pub header_timeout: Duration,
    /// A proven connection with no request in flight is closed after this;
    /// a later request head must also arrive within it.
    pub idle_timeout: Duration,
    /// On shutdown, requests in flight get this long to finish.
    pub drain_timeout: Duration,
    /// A client that acknowledges no response byte for this long while
    /// writes to it are pending is disconnected
    /// (`meshlet_netio::write_stall`).
    pub write_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_connections: 2048,
            max_unproven: 256,
            handshake_timeout: Duration::from_secs(5),
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(10),
        }
    }
}

impl Limits {
    /// Caps the connections below an open-file limit of `fd_limit`,
    /// keeping `reserve` descriptors for the store, logs and outgoing
    /// calls; returns the new limits.
    pub fn within_fd_limit(mut self, fd_limit: u64, reserve: u64) -> Limits {
        let room = usize::try_from(fd_limit.saturating_sub(reserve)).unwrap_or(usize::MAX);
        self.max_connections = self.max_connections.min(room.max(16));
        self.max_unproven = self.max_unproven.min((self.max_connections / 2).max(1));
        self
    }
}

/// Counters of the API's connections, read by `/metrics`.
#[derive(Debug, Default)]
pub struct ConnectionStats {
    open: AtomicUsize,
    evicted: AtomicU64,
}

impl ConnectionStats {
    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Connections evicted since start (unproven or idle ones closed to
    /// make room, or to free a descriptor).
    pub fn evicted(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }
}

/// Serves `app` on `listener` (TLS when `tls` is set) until `shutdown`
/// turns true, then drains (tests; the server counts with
/// [`serve_counted`]).
#[cfg(test)]
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    app: Router,
    limits: Limits,
    shutdown: watch::Receiver<bool>,
) {
    serve_counted(listener, tls, app, limits, shutdown, Arc::default()).await
}

/// Whether an accept error means "out of descriptors or buffers".
fn out_of_descriptors(error: &std::io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(nix::libc::EMFILE | nix::libc::ENFILE | nix::libc::ENOBUFS | nix::libc::ENOMEM)
    )
}

/// [`serve`], counting into `stats`.
pub async fn serve_counted(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    app: Router,
    limits: Limits,
    mut shutdown: watch::Receiver<bool>,
    stats: Arc<ConnectionStats>,
) {
    let tracker = Tracker::new(limits, stats.clone());
    let mut last_warning: Option<Instant> = None;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.wait_for(|stop| *stop) => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                let starved = out_of_descriptors(&error);
                // Free a descriptor the way a new connection would, then
                // back off briefly: neither spin nor stall.
                let evicted = starved && tracker.evict_one();
                if last_warning.is_none_or(|at| at.elapsed() >= Duration::from_secs(1)) {
                    last_warning = Some(Instant::now());
                    tracing::warn!(%error, evicted, open = stats.open(), "accept failed");
                }
                let pause = if evicted { 5 } else { 50 };
                tokio::time::sleep(Duration::from_millis(pause)).await;
                continue;
            }
        };
        let Some(slot) = tracker.admit() else {
            tracing::debug!(%peer, "connection refused: every connection slot is busy");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let connection = Connection {
            app: app.clone(),
            limits,
            slot,
            shutdown: shutdown.clone(),
        };
        tokio::spawn(connection.run(stream, tls.clone()));
    }
    drop(listener);
    let deadline = Instant::now() + limits.drain_timeout;
    while stats.open() > 0 {
        if Instant::now() >= deadline {
            tracing::warn!(after = ?limits.drain_timeout, open = stats.open(), "connections still open after the drain timeout");
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One accepted connection and what it needs to be served.
struct Connection {
    app: Router,
    limits: Limits,
    slot: Slot,
    shutdown: watch::Receiver<bool>,
}

impl Connection {
    async fn run(self, stream: TcpStream, tls: Option<TlsAcceptor>) {
        let Connection {
            app,
            limits,
            slot,
            mut shutdown,
        } = self;
        let head_deadline = tokio::time::Instant::now() + limits.header_timeout;
        let Some(acceptor) = tls else {
            slot.serve(stream, app, limits, head_deadline, shutdown)
                .await;
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
            _ = slot.state.evict.notified() => return,
            _ = shutdown.wait_for(|stop| *stop) => return,
        };
        slot.serve(stream, app, limits, head_deadline, shutdown)
            .await;
    }
}

/// What the tracker and a connection's task share about it.
#[derive(Default)]
struct ConnState {
    /// Told to leave (unproven: at once; proven: gracefully).
    evict: Notify,
    proven: AtomicBool,
    /// Requests whose response is not yet fully sent.
    in_flight: AtomicUsize,
}

/// Counts and ranks the open connections.
#[derive(Clone)]
struct Tracker {
    inner: Arc<TrackerInner>,
}

struct TrackerInner {
    limits: Limits,
    stats: Arc<ConnectionStats>,
    ranks: Mutex<Ranks>,
    next_id: AtomicU64,
}

/// The eviction candidates, oldest first.
#[derive(Default)]
struct Ranks {
    /// Unproven connections by admission order, with their admission time.
    unproven: BTreeMap<u64, (Instant, Arc<ConnState>)>,
    /// Proven connections with nothing in flight, by when they became idle
    /// (a sequence number) → their id.
    idle: BTreeMap<u64, (u64, Arc<ConnState>)>,
    /// id → its key in `idle`.
    idle_key: HashMap<u64, u64>,
    next_idle: u64,
}

impl Ranks {
    /// Tells the best candidate to leave. Only unproven ones
    /// (`idle_too` false: the unproven cap): the oldest. Otherwise (the
    /// connection cap): the oldest unproven one that has had
    /// [`UNPROVEN_GRACE`] to prove itself, else the proven one idle the
    /// longest, else the oldest unproven one; so a client still in its
    /// handshake is not dropped for a connection that has been idle.
    fn evict_one(&mut self, idle_too: bool, now: Instant) -> bool {
        let stale = self
            .unproven
            .first_key_value()
            .is_some_and(|(_, (admitted, _))| now.duration_since(*admitted) >= UNPROVEN_GRACE);
        if idle_too && !stale {
            if let Some((_, (id, idlest))) = self.idle.pop_first() {
                self.idle_key.remove(&id);
                idlest.evict.notify_one();
                return true;
            }
        }
        if let Some((_, (_, oldest))) = self.unproven.pop_first() {
            oldest.evict.notify_one();
            return true;
        }
        false
    }
}

impl Tracker {
    fn new(limits: Limits, stats: Arc<ConnectionStats>) -> Tracker {
        Tracker {
            inner: Arc::new(TrackerInner {
                limits,
                stats,
                ranks: Mutex::new(Ranks::default()),
                next_id: AtomicU64::new(0),
            }),
        }
    }

    fn ranks(&self) -> std::sync::MutexGuard<'_, Ranks> {
        self.inner.ranks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admits a new connection, evicting one if a cap is reached; `None`
    /// when every connection is busy.
    fn admit(&self) -> Option<Slot> {
        let inner = &self.inner;
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        let state = Arc::new(ConnState::default());
        let mut ranks = self.ranks();
        let full = inner.stats.open() >= inner.limits.max_connections;
        if full || ranks.unproven.len() >= inner.limits.max_unproven {
            // The evicted task closes its socket; its slot is counted
            // free once it has.
            if ranks.evict_one(full, Instant::now()) {
                inner.stats.evicted.fetch_add(1, Ordering::Relaxed);
            } else if full {
                return None;
            }
        }
        ranks.unproven.insert(id, (Instant::now(), state.clone()));
        inner.stats.open.fetch_add(1, Ordering::Relaxed);
        Some(Slot {
            tracker: self.clone(),
            id,
            state,
        })
    }

    /// Evicts one unproven or idle connection (out of descriptors);
    /// whether there was one.
    fn evict_one(&self) -> bool {
        let evicted = self.ranks().evict_one(true, Instant::now());
        if evicted {
            self.inner.stats.evicted.fetch_add(1, Ordering::Relaxed);
        }
        evicted
    }

    /// A request started on connection `id`: it is proven and busy.
    fn request_started(&self, id: u64, state: &ConnState) {
        let first = !state.proven.swap(true, Ordering::Relaxed);
        let was_idle = state.in_flight.fetch_add(1, Ordering::Relaxed) == 0;
        if first || was_idle {
            let mut ranks = self.ranks();
            ranks.unproven.remove(&id);
            if let Some(key) = ranks.idle_key.remove(&id) {
                ranks.idle.remove(&key);
            }
        }
    }

    /// A response on connection `id` was sent (or dropped).
    fn request_finished(&self, id: u64, state: &Arc<ConnState>) {
        if state.in_flight.fetch_sub(1, Ordering::Relaxed) == 1 {
            let mut ranks = self.ranks();
            // Busy again already (pipelining)? Then it is not idle.
            if state.in_flight.load(Ordering::Relaxed) == 0 && !ranks.idle_key.contains_key(&id) {
                let key = ranks.next_idle;
                ranks.next_idle += 1;
                ranks.idle.insert(key, (id, state.clone()));
                ranks.idle_key.insert(id, key);
            }
        }
    }

    fn close(&self, id: u64) {
        {
            let mut ranks = self.ranks();
            ranks.unproven.remove(&id);
            if let Some(key) = ranks.idle_key.remove(&id) {
                ranks.idle.remove(&key);
            }
        }
        self.inner.stats.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A connection's place in the tracker; frees it on drop.
struct Slot {
    tracker: Tracker,
    id: u64,
    state: Arc<ConnState>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.tracker.close(self.id);
    }
}

/// Marks its request finished when the response body is done or dropped.
struct InFlight {
    tracker: Tracker,
    id: u64,
    state: Arc<ConnState>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.tracker.request_finished(self.id, &self.state);
    }
}

/// A response body that keeps its connection counted busy until sent.
struct TrackedBody {
    inner: axum::body::Body,
    _in_flight: InFlight,
}

impl Body for TrackedBody {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Slot {
    /// Serves HTTP/1.1 on `io` until the client leaves, a deadline passes,
    /// the server shuts down, or eviction (at once before the first
    /// request, gracefully after).
    async fn serve<IO>(
        &self,
        io: IO,
        app: Router,
        limits: Limits,
        head_deadline: tokio::time::Instant,
        mut shutdown: watch::Receiver<bool>,
    ) where
        IO: AsyncRead + AsyncWrite + AsRawFd + Unpin + Send + 'static,
    {
        let tracker = self.tracker.clone();
        let id = self.id;
        let state = self.state.clone();
        let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
            tracker.request_started(id, &state);
            let in_flight = InFlight {
                tracker: tracker.clone(),
                id,
                state: state.clone(),
            };
            let mut app = app.clone();
            async move {
                let response = app.call(request).await?;
                Ok::<_, std::convert::Infallible>(response.map(|inner| TrackedBody {
                    inner,
                    _in_flight: in_flight,
                }))
            }
        });
        // A client that stops reading its responses is cut off; its TCP
        // socket (under the TLS) says whether it reads at all.
        let write_stall = WriteStall::new(Some(limits.write_timeout), Some(io.as_raw_fd()));
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.idle_timeout)
            .max_buf_size(64 * 1024)
            .serve_connection(TokioIo::new(WriteStallIo::new(io, write_stall)), service);
        tokio::pin!(connection);
        let mut leaving = false;
        // Set when evicted: past it the connection is dropped, finished or not.
        let mut evicted_at: Option<tokio::time::Instant> = None;
        loop {
            let proven = self.state.proven.load(Ordering::Relaxed);
            tokio::select! {
                result = &mut connection => {
                    if let Err(error) = result {
                        tracing::debug!(%error, "API connection ended with an error");
                    }
                    return;
                }
                _ = self.state.evict.notified(), if !leaving => {
                    if !self.state.proven.load(Ordering::Relaxed) {
                        tracing::debug!("unproven API connection evicted");
                        return;
                    }
                    tracing::debug!("idle API connection evicted");
                    leaving = true;
                    evicted_at = Some(tokio::time::Instant::now() + EVICTION_GRACE);
                    connection.as_mut().graceful_shutdown();
                }
                _ = tokio::time::sleep_until(evicted_at.unwrap_or_else(tokio::time::Instant::now)), if evicted_at.is_some() => {
                    tracing::debug!("evicted API connection did not finish within the grace; dropped");
                    return;
                }
                _ = tokio::time::sleep_until(head_deadline), if !proven => {
                    if !self.state.proven.load(Ordering::Relaxed) {
                        tracing::debug!("no request head within the deadline");
                        return;
                    }
                }
                _ = shutdown.wait_for(|stop| *stop), if !leaving => {
                    leaving = true;
                    connection.as_mut().graceful_shutdown();
                }
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
