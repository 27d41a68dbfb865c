//! The request path of both listeners, each readable top to bottom in one
//! function ([`Inbound::proxy`], [`Outbound::proxy`]).
//!
//! (Ambiguous framing is refused earlier, below hyper: see `framing`.)
//!
//! Inbound: the path normalised (`path`: what authorization, the rate
//! limit's route and the app all see; 400 `bad_path`) → who the caller is (its verified certificate identity, never a
//! header: `authz`) → mTLS (`MTLSPolicy strict` refuses a plaintext
//! caller: 403 `mtls_required`) → authorization (`AuthorizationPolicy`:
//! 403 `denied`) → rate limit of the own service (`ratelimit`, 429; a
//! dry-run policy only counts and marks the request: `dry_run`;
//! `sourceService` keys are the verified caller) → strip hop-by-hop, add
//! `x-forwarded-*`, replace the identity headers with the verified
//! caller's → forward to the local app (transparent mode: a port other
//! than the app port goes to the pod's own address, so a port the app
//! bound only on localhost stays private) → response back.
//! Outbound: `CONNECT` tunnels → find the destination
//! (absolute URI or `Host`; a mesh service or passthrough; transparent
//! mode: a `Host` naming a service, else the original destination) → the target's
//! policies for this method and path (`policy`) → strip hop-by-hop and
//! every identity header the app sent → forward (injected faults, concurrency limit,
//! timeout, retries, split, breakers, balancing: see `forward`) → response.
//!
//! Errors from any step travel up as [`ProxyError`] and become a response
//! in one place ([`ProxyError::into_response`]). Upgrades (WebSocket) are
//! forwarded as ordinary requests; a `101` answer splices the two
//! connections together (only the opening request was authorised). An
//! `h2c` upgrade is none: `Upgrade: h2c` and `HTTP2-Settings` are dropped
//! (`headers::drop_h2c_upgrade`). Identity headers a client sent as
//! request trailers are dropped on both sides (`ProxyBody::without_trailers`).
//!
//! Each request has a [`RequestRecord`] (`observe`) from arrival: the
//! route it is counted under is set as soon as the path and destination
//! are known, the request body counts its bytes on that route, and the
//! record completes with the response body (or at once for a response the
//! mesh generated).

use std::borrow::Cow;
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use http::header::{self, HeaderValue};
use http::uri::{PathAndQuery, Uri};
use http::{Method, Request, Response, StatusCode, Version};
use hyper::upgrade::OnUpgrade;
use meshlet_api::identity::SpiffeId;
use meshlet_api::mesh::AppProtocol;
use prometheus::IntCounter;
use tokio::net::TcpStream;

use crate::body::{ProxyBody, StreamedBody};
use crate::control::snapshot::{SharedSnapshot, Snapshot};
use crate::error::ProxyError;
use crate::listen::server::{Handler, Peer};
use crate::listen::transparent::app_address;
use crate::listen::tunnel;
use crate::policy::authz::{self, Caller};
use crate::policy::index::RoutePolicies;
use crate::policy::ratelimit::KeySources;
use crate::proxy::headers::{
    add_forwarded, drop_h2c_upgrade, remove_source_headers, set_source_headers, strip_hop_by_hop,
    wants_upgrade, SOURCE_HEADERS,
};
use crate::proxy::path;
use crate::proxy::route::{Authority, Router};
use crate::settings::Limits;
use crate::telemetry::direction::Direction;
use crate::telemetry::metrics::Metrics;
use crate::telemetry::observe::{RequestRecord, Telemetry};
use crate::telemetry::route_metrics::{RouteMetrics, RouteTable};
use crate::upstream::balance::Tried;
use crate::upstream::forward::forward;
use crate::upstream::mirror::Mirrors;
use crate::upstream::pool::{ConnPool, Remote, ORIG_PROTO};
use crate::upstream::target::ServiceTarget;

/// The local app at `addr` as a forwarding target (one endpoint, its
/// pool, which speaks the app's `protocol`); counted as inbound traffic of
/// the own service.
pub fn app_target(
    addr: SocketAddr,
    limits: &Arc<Limits>,
    metrics: &Metrics,
    protocol: Option<AppProtocol>,
) -> ServiceTarget {
    // Inbound routes follow the own service's policies: in the snapshot.
    let target_metrics = metrics.target(
        Direction::Inbound,
        metrics.service().to_owned(),
        RouteTable::default(),
    );
    let pool = ConnPool::counted(
        addr,
        Arc::clone(limits),
        Remote::App(protocol),
        metrics.pool(),
    );
    ServiceTarget::single_pool(metrics.service().to_owned(), pool, target_metrics)
}

/// Transparent mode: the app on ports other than `--app-port` (a client
/// called another port of the pod), one target per original destination
/// (the pod's address and that port), made on first use.
type OtherPorts = Arc<Mutex<HashMap<SocketAddr, Arc<ServiceTarget>>>>;

/// Traffic from other services to the local app.
#[derive(Clone)]
pub struct Inbound {
    app: Arc<ServiceTarget>,
    /// For the own service's mTLS mode, authorization and rate limits.
    snapshot: SharedSnapshot,
    limits: Arc<Limits>,
    metrics: Metrics,
    telemetry: Arc<Telemetry>,
    /// Where requests are counted until their route is known.
    unrouted: Arc<RouteMetrics>,
    other_ports: OtherPorts,
    /// `--xff-trusted-hops`, for `key: clientIP`.
    xff_trusted_hops: usize,
}

impl Inbound {
    pub fn new(
        app: Arc<ServiceTarget>,
        snapshot: SharedSnapshot,
        limits: Arc<Limits>,
        metrics: Metrics,
        telemetry: Arc<Telemetry>,
    ) -> Self {
        Inbound {
            app,
            snapshot,
            limits,
            unrouted: metrics.unrouted(Direction::Inbound),
            metrics,
            telemetry,
            other_ports: OtherPorts::default(),
            xff_trusted_hops: 0,
        }
    }

    /// Takes a `clientIP` rate-limit key from the `hops`-th address from
    /// the right of `x-forwarded-for` (`--xff-trusted-hops`).
    pub fn with_xff_trusted_hops(mut self, hops: usize) -> Self {
        self.xff_trusted_hops = hops;
        self
    }

    /// The app target for a connection that was going to `original`.
    fn app_for(&self, original: Option<SocketAddr>) -> Arc<ServiceTarget> {
        let Some(configured) = self.app.balancer.endpoints().first().map(|e| e.addr) else {
            return Arc::clone(&self.app);
        };
        let addr = app_address(configured, original);
        if addr == configured {
            return Arc::clone(&self.app);
        }
        let mut ports = self
            .other_ports
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let target = ports.entry(addr).or_insert_with(|| {
            let protocol = self.app.balancer.endpoints().first();
            let protocol = protocol.and_then(|e| e.pool.app_protocol());
            Arc::new(app_target(addr, &self.limits, &self.metrics, protocol))
        });
        Arc::clone(target)
    }

    /// Everything before the app is called: admission, then the request
    /// as the app gets it. Synchronous, so that none of its intermediate
    /// requests is kept in the request's future (see `handle`).
    fn to_app(
        &self,
        mut request: Request<StreamedBody>,
        peer: &Peer,
        record: &mut RequestRecord,
    ) -> Result<ToApp, ProxyError> {
        if request.method() == Method::CONNECT {
            return Err(ProxyError::MethodNotAllowed {
                method: Method::CONNECT,
                listener: "inbound",
            });
        }
        normalize_path(&mut request)?;
        let caller = self.admit(&request, peer, record)?;
        let version = request.version();
        let app = self.app_for(peer.original_dst);
        let app_addr = app.balancer.endpoints().first().map(|e| e.addr);
        let (mut request, downstream_upgrade) =
            prepare(request, app_addr, &self.limits, record.request_bytes());
        add_forwarded(request.headers_mut(), &peer.ip_header, "http");
        set_source_headers(request.headers_mut(), caller.source_headers());
        record.inject_trace(request.headers_mut());
        lend_press(&mut request, peer, &app);
        Ok(ToApp {
            app,
            request,
            version,
            downstream_upgrade,
        })
    }

    /// Whether the request may reach the app, in the current snapshot
    /// (see [`admit`]). Returns the caller.
    fn admit<B>(
        &self,
        request: &Request<B>,
        peer: &Peer,
        record: &mut RequestRecord,
    ) -> Result<Caller, ProxyError> {
        let snapshot = self.snapshot.load();
        let admission = Admission {
            service: self.metrics.service(),
            mtls: true,
            xff_trusted_hops: self.xff_trusted_hops,
        };
        admit(&snapshot, request, peer, record, &admission)
    }
}

/// An admitted inbound request, ready for the app (no route policies:
/// those of the own service were applied on admission).
struct ToApp {
    app: Arc<ServiceTarget>,
    request: Request<ProxyBody>,
    /// The client's HTTP version (the response goes back in it).
    version: Version,
    downstream_upgrade: Option<OnUpgrade>,
}

/// How [`admit`] judges a request: for which service, and whether
/// `MTLSPolicy strict` applies (not on a gateway: its clients are outside
/// the mesh, never mTLS).
pub(crate) struct Admission<'a> {
    pub service: &'a str,
    pub mtls: bool,
    /// `--xff-trusted-hops`, for `key: clientIP`.
    pub xff_trusted_hops: usize,
}

/// The inbound side's admission of a request to the own service: its
/// route label, then who the caller is (`Peer.identity`), then mTLS →
/// authorization → rate limit (each refusal is counted on its policy).
/// Returns the caller. Shared by the inbound and the gateway.
pub(crate) fn admit<B>(
    snapshot: &Snapshot,
    request: &Request<B>,
    peer: &Peer,
    record: &mut RequestRecord,
    how: &Admission<'_>,
) -> Result<Caller, ProxyError> {
    let (method, path) = (request.method(), request.uri().path());
    record.set_route(snapshot.inbound_routes.select(path));
    let zero_trust = &snapshot.zero_trust;
    let caller = zero_trust.callers.resolve(peer.identity.as_ref());
    if let Some(service) = &caller.service {
        record.set_source(&service.uri, &service.label);
    }
    if how.mtls && zero_trust.refuses_plaintext(&caller) {
        return Err(ProxyError::MtlsRequired {
            service: how.service.to_owned(),
        });
    }
    let asked = authz::Request {
        caller: &caller,
        http: Some(authz::HttpRequest {
            method,
            path,
            headers: request.headers(),
        }),
    };
    match zero_trust.authorize(&asked) {
        Ok(None) => {}
        // A dry-run policy would have refused: marked, and on we go.
        Ok(Some(mark)) => record.trail().would_refuse(&mark),
        Err(denial) => {
            record.set_authz_policy(&denial.policy);
            return Err(ProxyError::Denied {
                policy: denial.policy,
                by_deny: denial.by_deny,
                caller: caller.describe(),
            });
        }
    }
    if let Some(limiter) = snapshot.inbound.rate_limit(method, path) {
        let key = limiter.key(&KeySources {
            headers: request.headers(),
            source: caller.rate_limit_key(),
            peer_ip: peer.ip_text(),
            xff_trusted_hops: how.xff_trusted_hops,
        });
        // The request's arrival stands for now (a few microseconds ago):
        // one clock read fewer per request.
        if let Err(refusal) = limiter.check(key, record.started()) {
            match &limiter.dry_run {
                // A dry-run limit would have refused: marked, and on we go.
                Some(would) => would.note(record.trail()),
                None => {
                    limiter.refused.inc();
                    return Err(ProxyError::RateLimited(refusal));
                }
            }
        }
    }
    Ok(caller)
}

/// Normalises the request's path (`path::normalize`) in place, so that
/// authorization, the route match and the app all see the same path; the
/// query is kept as is. A path the mesh will not interpret is refused
/// (400 `bad_path`). In place: a request is a few hundred bytes, and each
/// move of it by value is a `memcpy` call.
pub(super) fn normalize_path<B>(request: &mut Request<B>) -> Result<(), ProxyError> {
    let uri = request.uri();
    let normalized = match path::normalize(uri.path()) {
        Ok(Cow::Borrowed(_)) => return Ok(()),
        Ok(Cow::Owned(normalized)) => normalized,
        Err(why) => {
            return Err(ProxyError::BadPath {
                path: uri.path().to_owned(),
                why,
            })
        }
    };
    let path_and_query = match uri.query() {
        Some(query) => format!("{normalized}?{query}"),
        None => normalized,
    };
    let mut parts = uri.clone().into_parts();
    let rebuilt = PathAndQuery::try_from(path_and_query)
        .ok()
        .and_then(|pq| {
            parts.path_and_query = Some(pq);
            Uri::from_parts(parts).ok()
        })
        .ok_or_else(|| ProxyError::BadPath {
            path: request.uri().path().to_owned(),
            why: path::PathRefusal::BadEscape,
        })?;
    *request.uri_mut() = rebuilt;
    Ok(())
}

impl Handler for Inbound {
    /// A function returning an `async move` block, not an `async fn`, and
    /// the work before the app is called done synchronously (`to_app`):
    /// the future then holds the request once, not once per step, and
    /// hyper moves that future with every request (ARCHITECTURE.md,
    /// "Future sizes").
    fn handle(
        &self,
        request: Request<StreamedBody>,
        peer: &Peer,
    ) -> impl Future<Output = Response<ProxyBody>> + Send {
        let mut record = RequestRecord::start(
            &request,
            peer.addr,
            Direction::Inbound,
            &self.unrouted,
            &self.telemetry,
        );
        let to_app = self.to_app(request, peer, &mut record);
        async move {
            // Sent from here, not from a method of `ToApp`: one future
            // less to build and move.
            let result = match to_app {
                Ok(ToApp {
                    app,
                    request,
                    version,
                    downstream_upgrade,
                }) => {
                    let no_policies = RoutePolicies::default();
                    forward(&app, request, no_policies, &self.limits, record.trail())
                        .await
                        .map(|response| finish(response, version, downstream_upgrade))
                }
                Err(refused) => Err(refused),
            };
            answer(record, result, Direction::Inbound, &self.metrics)
        }
    }

    /// An opaque TCP connection (plaintext: `identity` is `None`; or the
    /// mesh hop's `meshlet-tcp`): refused under `MTLSPolicy strict` when
    /// plaintext (counted), and by the `AuthorizationPolicy`s evaluated
    /// without HTTP attributes (an ALLOW rule with `to`/`when` cannot match,
    /// a DENY rule matches on its sources; counted on the policy). Asked
    /// once per connection.
    fn admits_opaque(&self, identity: Option<&Arc<SpiffeId>>) -> bool {
        let snapshot = self.snapshot.load();
        let zero_trust = &snapshot.zero_trust;
        let caller = zero_trust.callers.resolve(identity);
        if zero_trust.refuses_plaintext(&caller) {
            return false;
        }
        let asked = authz::Request {
            caller: &caller,
            http: None,
        };
        match zero_trust.authorize(&asked) {
            Ok(_) => true,
            Err(denial) => {
                tracing::debug!(policy = %denial.policy, caller = %caller.describe(),
                    "opaque TCP refused by an AuthorizationPolicy");
                false
            }
        }
    }
}

/// Traffic from the local app to other services (or anywhere else).
#[derive(Clone)]
pub struct Outbound {
    router: Arc<Router>,
    limits: Arc<Limits>,
    metrics: Metrics,
    telemetry: Arc<Telemetry>,
    /// Where requests refused before a destination is known are counted.
    unrouted: Arc<RouteMetrics>,
    /// routes: the sender of `requestMirror` copies (bounded in flight).
    mirrors: Mirrors,
}

impl Outbound {
    pub fn new(
        router: Arc<Router>,
        limits: Arc<Limits>,
        metrics: Metrics,
        telemetry: Arc<Telemetry>,
    ) -> Self {
        Outbound {
            router,
            limits,
            unrouted: metrics.unrouted(Direction::Outbound),
            metrics,
            telemetry,
            mirrors: Mirrors::default(),
        }
    }

    async fn proxy(
        &self,
        request: Request<StreamedBody>,
        peer: &Peer,
        record: &mut RequestRecord,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let target = match peer.original_dst {
            Some(original) => self
                .router
                .resolve_intercepted(Authority::of(&request), original)?,
            None => {
                let authority = Authority::of(&request).ok_or(ProxyError::MissingHost)?;
                self.router.resolve(&authority).await?
            }
        };
        record.set_route(target.metrics.routes.select(request.uri().path()));
        if request.method() == Method::CONNECT {
            return self.tunnel(request, &target).await;
        }
        // routes: mesh routing. A `Route` whose parent is the resolved
        // service picks the rule; its backend (a service, maybe a label
        // subset) replaces the target. No matching rule: the service as
        // before. The snapshot is held (as an `Arc`) only when it has
        // routes for this service.
        let snapshot = self.router.snapshot();
        let snapshot = (snapshot.mesh_routes(&target).is_some())
            .then(|| arc_swap::Guard::into_inner(snapshot));
        let selected = snapshot
            .as_deref()
            .and_then(|s| s.mesh_routes(&target))
            .and_then(|routes| routes.select(None, &request));
        if let Some(selected) = &selected {
            selected.count();
            tracing::debug!(
                route = selected.route(),
                rule = selected.rule_index(),
                "mesh route"
            );
            if let Some(redirect) = selected.redirect(&request, "http") {
                return Ok(redirect);
            }
        }
        let (target, policies) = match &selected {
            Some(selected) => {
                let backend = selected
                    .backend
                    .ok_or_else(|| ProxyError::NoHealthyEndpoint {
                        service: target.name.clone(),
                    })?;
                let routed =
                    backend
                        .target
                        .as_ref()
                        .ok_or_else(|| ProxyError::NoHealthyEndpoint {
                            service: backend.service.clone(),
                        })?;
                let policies =
                    backend.policies(request.method(), request.uri().path(), selected.timeouts());
                (routed, policies)
            }
            None => {
                let policies = target
                    .policies
                    .for_request(request.method(), request.uri().path());
                (&target, policies)
            }
        };
        let fallback_authority = target.balancer.endpoints().first().map(|e| e.addr);
        let version = request.version();
        let (mut request, downstream_upgrade) = prepare(
            request,
            fallback_authority,
            &self.limits,
            record.request_bytes(),
        );
        if let Some(selected) = &selected {
            selected.apply_request(&mut request);
        }
        // Who is calling is the inbound side's word, from this sidecar's
        // certificate: nothing the app wrote survives; nor may it choose
        // the protocol the far side speaks to its app.
        remove_source_headers(request.headers_mut());
        request.headers_mut().remove(ORIG_PROTO);
        record.inject_trace(request.headers_mut());
        if let Some(selected) = &selected {
            for mirror in selected.mirrors() {
                self.mirrors
                    .send(mirror, &request, &self.limits, selected.rule.timeout);
            }
        }
        lend_press(&mut request, peer, target);
        let mut response = forward(target, request, policies, &self.limits, record.trail()).await?;
        if let Some(selected) = &selected {
            selected.apply_response(&mut response);
        }
        Ok(finish(response, version, downstream_upgrade))
    }

    /// `CONNECT host:port`: open TCP to the destination (a service endpoint
    /// or the address itself), answer 200, then splice the bytes.
    async fn tunnel(
        &self,
        mut request: Request<StreamedBody>,
        target: &ServiceTarget,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        if request.version() != Version::HTTP_11 {
            return Err(ProxyError::MethodNotAllowed {
                method: Method::CONNECT,
                listener: "outbound (HTTP/2)",
            });
        }
        let (_, endpoint) = target.balancer.pick(Tried::default()).ok_or_else(|| {
            ProxyError::NoHealthyEndpoint {
                service: target.name.clone(),
            }
        })?;
        let addr = endpoint.addr;
        let connected =
            tokio::time::timeout(self.limits.connect_timeout, TcpStream::connect(addr)).await;
        let stream = match connected {
            Ok(Ok(stream)) => stream,
            Ok(Err(source)) => {
                target.metrics.connect_errors.inc();
                return Err(ProxyError::ConnectFailed { addr, source });
            }
            Err(_) => {
                target.metrics.connect_errors.inc();
                let source = std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out");
                return Err(ProxyError::ConnectFailed { addr, source });
            }
        };
        tunnel::splice_connect(hyper::upgrade::on(&mut request), stream);
        Ok(Response::new(ProxyBody::empty()))
    }
}

impl Handler for Outbound {
    async fn handle(&self, request: Request<StreamedBody>, peer: &Peer) -> Response<ProxyBody> {
        let mut record = RequestRecord::start(
            &request,
            peer.addr,
            Direction::Outbound,
            &self.unrouted,
            &self.telemetry,
        );
        let result = self.proxy(request, peer, &mut record).await;
        answer(record, result, Direction::Outbound, &self.metrics)
    }
}

/// The response to the client, and the request's record completed with it.
pub(super) fn answer(
    record: RequestRecord,
    result: Result<Response<ProxyBody>, ProxyError>,
    direction: Direction,
    metrics: &Metrics,
) -> Response<ProxyBody> {
    match result {
        Ok(response) => record.respond(response),
        Err(err) => record.refused(err.reason(), refuse(err, direction, metrics)),
    }
}

/// Puts an HTTP/1.1 client's write-stall clock (`Peer::press`) in a
/// request that may travel on a shared upstream HTTP/2 connection (the
/// mesh hop, an h2c app): the pool presses it when every stream slot is
/// taken. Other requests skip the extension (an allocation).
fn lend_press(request: &mut Request<ProxyBody>, peer: &Peer, target: &ServiceTarget) {
    if let Some(press) = &peer.press {
        if target
            .balancer
            .endpoints()
            .iter()
            .any(|e| e.pool.may_use_h2())
        {
            request.extensions_mut().insert(press.clone());
        }
    }
}

/// Turns a received request into the one sent upstream: hop-by-hop headers
/// removed, URI in the form the upstream protocol wants (origin-form for
/// HTTP/1.1, absolute for HTTP/2), body streamed as is and its bytes
/// counted on `bytes`, the identity headers removed from its trailers
/// (both sides: only the inbound sets them, as headers). Returns the client's pending upgrade if the request
/// asks for one.
pub(super) fn prepare(
    mut request: Request<StreamedBody>,
    fallback_authority: Option<SocketAddr>,
    limits: &Limits,
    bytes: IntCounter,
) -> (Request<ProxyBody>, Option<OnUpgrade>) {
    drop_h2c_upgrade(request.headers_mut());
    let upgrade = request.version() == Version::HTTP_11 && wants_upgrade(request.headers());
    let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut request));
    strip_hop_by_hop(request.headers_mut(), upgrade);

    if let Some(uri) = upstream_uri(&mut request, fallback_authority) {
        *request.uri_mut() = uri;
    }
    let idle_timeout = limits.stream_idle_timeout;
    (
        request.map(|body| {
            ProxyBody::streamed(body, idle_timeout)
                .counting(bytes)
                .without_trailers(&SOURCE_HEADERS)
        }),
        downstream_upgrade,
    )
}

/// The URI in the form the upstream protocol wants, or `None` if the
/// request's URI is already right (the common HTTP/1.1 origin-form case):
/// HTTP/1.1 gets origin-form and always a `Host`; HTTP/2 gets an absolute
/// URI.
fn upstream_uri<B>(
    request: &mut Request<B>,
    fallback_authority: Option<SocketAddr>,
) -> Option<Uri> {
    if request.version() == Version::HTTP_2 {
        let authority = request
            .uri()
            .authority()
            .map(|a| a.to_string())
            .or_else(|| {
                request
                    .headers()
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_owned)
            })
            .or_else(|| fallback_authority.map(|a| a.to_string()))
            .unwrap_or_else(|| "localhost".to_owned());
        let path = request
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        return Uri::builder()
            .scheme("http")
            .authority(authority)
            .path_and_query(path)
            .build()
            .ok();
    }
    // HTTP/1.1 upstream: it needs a Host. An absolute-form target's
    // authority replaces any Host received (RFC 9112 §3.2.2: a proxy "MUST
    // ignore the received Host header field (if any) and instead replace it
    // with the host information of the request-target"), so the upstream
    // sees the host the request was routed by. HTTP/1.0 clients may send
    // none; then the upstream's address stands in.
    let host = match request.uri().authority() {
        Some(authority) => HeaderValue::from_str(authority.as_str()).ok(),
        None if !request.headers().contains_key(header::HOST) => {
            fallback_authority.and_then(|a| HeaderValue::try_from(a.to_string()).ok())
        }
        None => None,
    };
    if let Some(host) = host {
        request.headers_mut().insert(header::HOST, host);
    }
    let origin_form =
        request.uri().authority().is_none() && request.uri().path_and_query().is_some();
    if origin_form {
        return None;
    }
    let path = request
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    Uri::builder().path_and_query(path).build().ok()
}

/// Prepares the upstream's response for the client, in the client's HTTP
/// version (an HTTP/1.0 app must not end a client's keep-alive); on `101`
/// splices the two upgraded connections.
pub(super) fn finish(
    mut response: Response<ProxyBody>,
    client_version: Version,
    downstream_upgrade: Option<OnUpgrade>,
) -> Response<ProxyBody> {
    *response.version_mut() = client_version;
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(downstream) = downstream_upgrade {
            let upstream = hyper::upgrade::on(&mut response);
            tunnel::splice_upgrade(downstream, upstream);
            strip_hop_by_hop(response.headers_mut(), true);
            return response;
        }
    }
    strip_hop_by_hop(response.headers_mut(), false);
    response
}

fn refuse(err: ProxyError, direction: Direction, metrics: &Metrics) -> Response<ProxyBody> {
    let reason = err.reason();
    // An expired own certificate is logged by `identity` once a minute,
    // not once per request.
    let logged_elsewhere = matches!(err, ProxyError::CertificateExpired { .. });
    if err.status().is_server_error() && !logged_elsewhere {
        // At the default level the request and connection spans are off,
        // so this line names its direction itself.
        tracing::warn!(direction = direction.as_str(), reason, error = %err, "request refused by the mesh");
    } else {
        // Debug: inside the request and connection spans (listener, peer,
        // request id, method, uri).
        tracing::debug!(reason, error = %err, "bad request");
    }
    metrics.mesh_response(direction, reason);
    err.into_response()
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use arc_swap::ArcSwap;
    use http_body_util::BodyExt;
    use hyper::body::Incoming;
    use hyper_util::rt::TokioIo;
    use meshlet_api::mesh::MeshState;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio::sync::watch;

    use super::*;
    use crate::control::snapshot::{Own, Snapshot};
    use crate::listen::server::serve;

    /// An app that answers with the identity headers it received, one
    /// `name: value` line each, then the same for its request trailers
    /// (`trailer name: value`), then `uri: <the request target>`.
    async fn header_echo() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let service = hyper::service::service_fn(|request: Request<Incoming>| async move {
                    let mut lines = String::new();
                    for (name, value) in request.headers() {
                        if name.as_str().starts_with("x-meshlet-source") {
                            lines.push_str(&format!("{name}: {}\n", value.to_str().unwrap()));
                        }
                    }
                    let uri = request.uri().to_string();
                    let body = request.into_body().collect().await.unwrap();
                    for (name, value) in body.trailers().into_iter().flatten() {
                        lines.push_str(&format!("trailer {name}: {}\n", value.to_str().unwrap()));
                    }
                    lines.push_str(&format!("uri: {uri}\n"));
                    Ok::<_, Infallible>(Response::new(ProxyBody::full(lines)))
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        addr
    }

    /// The inbound handler with the peer identity a verified mTLS
    /// connection would give it (the listener's Peer is plaintext here).
    #[derive(Clone)]
    struct Verified(Inbound, Option<Arc<SpiffeId>>);

    impl Handler for Verified {
        async fn handle(&self, request: Request<StreamedBody>, peer: &Peer) -> Response<ProxyBody> {
            let peer = Peer {
                identity: self.1.clone(),
                ..peer.clone()
            };
            self.0.handle(request, &peer).await
        }
    }

    struct Sidecar {
        metrics: Metrics,
        plaintext: SocketAddr,
        frontend: SocketAddr,
        _stop: watch::Sender<bool>,
    }

    /// An inbound sidecar of `orders` with `yaml`'s policies in front of
    /// the header echo app: one listener for plaintext callers, one for
    /// callers verified as `frontend`.
    async fn sidecar(yaml: &str) -> Sidecar {
        let state =
            MeshState::from_resources(&meshlet_api::parse_documents("t.yaml", yaml).unwrap());
        let limits = Arc::new(Limits::default());
        let metrics = Metrics::new("orders");
        let own = Own {
            namespace: "default",
            service: "orders",
            identity: None,
        };
        let snapshot = Snapshot::build(&state, "t".into(), None, own, &limits, &metrics);
        let app = Arc::new(app_target(header_echo().await, &limits, &metrics, None));
        let inbound = Inbound::new(
            app,
            Arc::new(ArcSwap::from_pointee(snapshot)),
            Arc::clone(&limits),
            metrics.clone(),
            Arc::new(Telemetry::off()),
        );
        let frontend = SpiffeId::parse("spiffe://meshlet.local/ns/default/sa/frontend").unwrap();
        let (stop, stopped) = watch::channel(false);
        let mut addrs = Vec::new();
        for identity in [None, Some(Arc::new(frontend))] {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            addrs.push(listener.local_addr().unwrap());
            tokio::spawn(serve(
                "inbound",
                listener,
                Verified(inbound.clone(), identity),
                Arc::clone(&limits),
                metrics.listener("inbound"),
                stopped.clone(),
                crate::listen::server::ListenerOptions::default(),
            ));
        }
        Sidecar {
            metrics,
            plaintext: addrs[0],
            frontend: addrs[1],
            _stop: stop,
        }
    }

    /// `GET path` with `headers`; the whole raw answer.
    async fn call(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)]) -> String {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let mut head = format!("{method} {path} HTTP/1.1\r\nhost: orders\r\nconnection: close\r\n");
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes()).await.unwrap();
        let mut reply = String::new();
        stream.read_to_string(&mut reply).await.unwrap();
        reply
    }

    const SPOOFED: &[(&str, &str)] = &[
        ("x-meshlet-source", "evil"),
        ("x-meshlet-source", "frontend"),
        (
            "x-meshlet-source-identity",
            "spiffe://meshlet.local/ns/default/sa/admin",
        ),
    ];

    #[tokio::test]
    async fn the_app_sees_only_the_verified_identity_never_a_clients_headers() {
        let sidecar = sidecar("").await;
        let reply = call(sidecar.plaintext, "GET", "/", SPOOFED).await;
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        assert!(
            !reply.contains("x-meshlet-source"),
            "plaintext: none\n{reply}"
        );

        let reply = call(sidecar.frontend, "GET", "/", SPOOFED).await;
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        assert!(
            reply.contains("\r\n\r\nx-meshlet-source: frontend\n"),
            "{reply}"
        );
        assert!(
            reply.contains(
                "x-meshlet-source-identity: spiffe://meshlet.local/ns/default/sa/frontend\n"
            ),
            "{reply}"
        );
        assert!(
            !reply.contains("evil") && !reply.contains("sa/admin"),
            "{reply}"
        );
    }

    #[tokio::test]
    async fn strict_mtls_refuses_plaintext_callers_with_403_mtls_required() {
        let sidecar = sidecar(
            "apiVersion: meshlet.dev/v1alpha1\nkind: MTLSPolicy\nmetadata: {name: orders}\n\
             spec: {targetRef: {service: orders}, mode: strict}\n",
        )
        .await;
        let reply = call(sidecar.plaintext, "GET", "/", &[]).await;
        assert!(reply.starts_with("HTTP/1.1 403"), "{reply}");
        assert!(reply.contains("x-meshlet-reason: mtls_required"), "{reply}");
        assert!(reply.contains("accepts only mTLS callers"), "{reply}");
        assert_eq!(sidecar.metrics.mtls_plaintext_refused().get(), 1);
        let reply = call(sidecar.frontend, "GET", "/", &[]).await;
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    }

    #[tokio::test]
    async fn an_authorization_refusal_is_403_denied_naming_the_policy() {
        let sidecar = sidecar(
            "apiVersion: meshlet.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: orders-allow}\n\
             spec:\n  targetRef: {service: orders}\n  action: ALLOW\n  rules:\n  \
             - from: [{services: [frontend]}]\n    to: [{methods: [GET], paths: ['/api/*']}]\n",
        )
        .await;
        let reply = call(sidecar.frontend, "GET", "/api/items", &[]).await;
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        let reply = call(
            sidecar.frontend,
            "POST",
            "/api/items",
            &[("content-length", "0")],
        )
        .await;
        assert!(reply.starts_with("HTTP/1.1 403"), "{reply}");
        assert!(reply.contains("x-meshlet-reason: denied"), "{reply}");
        assert!(
            reply.contains("AuthorizationPolicy \"orders-allow\""),
            "{reply}"
        );
        // A plaintext caller claiming to be frontend is no one.
        let reply = call(sidecar.plaintext, "GET", "/api/items", SPOOFED).await;
        assert!(reply.contains("x-meshlet-reason: denied"), "{reply}");
        assert_eq!(sidecar.metrics.authz_denied("orders-allow").get(), 2);
    }

    #[tokio::test]
    async fn a_source_service_limit_cannot_be_escaped_or_spent_with_a_header() {
        let sidecar = sidecar(
            "apiVersion: meshlet.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {name: per-caller}\n\
             spec:\n  targetRef: {service: orders}\n  tokenBucket: {capacity: 2, refillPerSecond: 0.001}\n  \
             key: sourceService\n",
        )
        .await;
        let mut statuses = Vec::new();
        for i in 0..5 {
            let spoof = if i == 4 {
                "frontend".to_owned()
            } else {
                format!("spoof-{i}")
            };
            let reply = call(
                sidecar.plaintext,
                "GET",
                "/",
                &[("x-meshlet-source", &spoof)],
            )
            .await;
            statuses.push(reply[9..12].to_owned());
        }
        assert_eq!(
            statuses,
            ["200", "200", "429", "429", "429"],
            "one bucket for plaintext callers"
        );
        // Spoofing "frontend" spent nothing of the real frontend's bucket.
        for _ in 0..2 {
            let reply = call(sidecar.frontend, "GET", "/", &[]).await;
            assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        }
    }

    #[tokio::test]
    async fn a_dry_run_limit_refuses_nothing_and_counts_what_it_would_refuse() {
        let limit = |mode: &str| {
            format!(
                "apiVersion: meshlet.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {{name: limit}}\n\
                 spec:\n  targetRef: {{service: orders}}\n  tokenBucket: {{capacity: 2, refillPerSecond: 0.001}}\n  \
                 mode: {mode}\n"
            )
        };
        let (enforcing, dry) = (
            sidecar(&limit("enforce")).await,
            sidecar(&limit("dryRun")).await,
        );
        let mut refused = 0;
        for _ in 0..5 {
            let reply = call(enforcing.plaintext, "GET", "/", &[]).await;
            refused += usize::from(reply.starts_with("HTTP/1.1 429"));
            let reply = call(dry.plaintext, "GET", "/", &[]).await;
            assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        }
        assert_eq!(refused, 3);
        let would = dry
            .metrics
            .would_refuse("RateLimitPolicy", "default", "limit", "rate_limited");
        assert_eq!(would.get(), 3);
        assert_eq!(dry.metrics.rate_limited("limit", "/").get(), 0);
        let text = String::from_utf8(dry.metrics.render(&[])).unwrap();
        assert!(
            text.contains(r#"meshlet_policy_would_refuse_total{kind="RateLimitPolicy",policy="limit",reason="rate_limited"} 3"#),
            "{text}"
        );
    }

    const DENY_SECRET: &str = "apiVersion: meshlet.dev/v1alpha1\nkind: AuthorizationPolicy\n\
        metadata: {name: no-secret}\nspec:\n  targetRef: {service: orders}\n  action: DENY\n  \
        rules:\n  - to: [{paths: [/api/secret, '/api/admin/*']}]\n";

    #[tokio::test]
    async fn authorization_and_the_app_see_the_normalised_path() {
        let sidecar = sidecar(DENY_SECRET).await;
        for path in [
            "/api/secret",
            "/api/./secret",
            "/api//secret",
            "/api/%73ecret",
            "/api/%73%65cret?x=1",
            "/api/x/../secret",
            "/x/../../api/secret",
            "/api//admin/x",
            "/api/x/../admin/x",
        ] {
            let reply = call(sidecar.frontend, "GET", path, &[]).await;
            assert!(reply.starts_with("HTTP/1.1 403"), "{path}: {reply}");
            assert!(
                reply.contains("x-meshlet-reason: denied"),
                "{path}: {reply}"
            );
        }
        // Allowed, and the app gets the path that was authorised (the
        // query untouched).
        let reply = call(sidecar.frontend, "GET", "/api/./items//%31?q=%2F..//", &[]).await;
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        assert!(reply.contains("uri: /api/items/1?q=%2F..//\n"), "{reply}");
        let reply = call(sidecar.frontend, "GET", "/api/items", &[]).await;
        assert!(reply.contains("uri: /api/items\n"), "{reply}");
    }

    #[tokio::test]
    async fn an_ambiguous_path_is_refused_with_400_bad_path() {
        let sidecar = sidecar(DENY_SECRET).await;
        for (path, why) in [
            ("/api/x/..%2fsecret", "encoded slash"),
            ("/api/%5csecret", "encoded backslash"),
            ("/api/secret%00", "encoded NUL"),
            ("/api\\secret", "backslash"),
        ] {
            let reply = call(sidecar.frontend, "GET", path, &[]).await;
            assert!(reply.starts_with("HTTP/1.1 400"), "{path}: {reply}");
            assert!(
                reply.contains("x-meshlet-reason: bad_path"),
                "{path}: {reply}"
            );
            assert!(reply.contains(why), "{path}: {reply}");
        }
    }

    #[tokio::test]
    async fn identity_headers_sent_as_request_trailers_never_reach_the_app() {
        let sidecar = sidecar("").await;
        let mut stream = TcpStream::connect(sidecar.frontend).await.unwrap();
        stream
            .write_all(
                b"POST /x HTTP/1.1\r\nhost: orders\r\ntransfer-encoding: chunked\r\n\
                  te: trailers\r\ntrailer: x-meshlet-source, x-meshlet-source-identity, x-kept\r\n\
                  connection: close\r\n\r\n3\r\nabc\r\n0\r\nx-meshlet-source: admin\r\n\
                  x-meshlet-source-identity: spiffe://meshlet.local/ns/default/sa/admin\r\n\
                  x-kept: yes\r\n\r\n",
            )
            .await
            .unwrap();
        let mut reply = String::new();
        stream.read_to_string(&mut reply).await.unwrap();
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        assert!(reply.contains("x-meshlet-source: frontend\n"), "{reply}");
        assert!(!reply.contains("admin"), "{reply}");
        assert!(reply.contains("trailer x-kept: yes\n"), "{reply}");
    }
}
