//! The request path of both listeners, each readable top to bottom in one
//! function ([`Inbound::proxy`], [`Outbound::proxy`]).
//!
//! (Ambiguous framing is refused earlier, below hyper: see `framing`.)
//!
//! Inbound: rate limit of the own service (`ratelimit`, 429) → strip
//! hop-by-hop, add `x-forwarded-*` → forward to the local app (transparent
//! mode: on the port the client was calling) → response back.
//! Outbound: `CONNECT` tunnels → find the destination
//! (absolute URI or `Host`; a mesh service or passthrough; transparent
//! mode: a `Host` naming a service, else the original destination) → the target's
//! policies for this method and path (`policy`) → strip hop-by-hop, add
//! `x-meshlet-source` → forward (concurrency limit, timeout, retries,
//! split, breakers, balancing: see `forward`) → response.
//!
//! Errors from any step travel up as [`ProxyError`] and become a response
//! in one place ([`ProxyError::into_response`]). Upgrades (WebSocket) are
//! forwarded as ordinary requests; a `101` answer splices the two
//! connections together.
//!
//! Each request has a [`RequestRecord`] (`observe`) from arrival: the
//! route it is counted under is set as soon as the path and destination
//! are known, the request body counts its bytes on that route, and the
//! record completes with the response body (or at once for a response the
//! mesh generated).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use http::header::{self, HeaderValue};
use http::uri::{PathAndQuery, Uri};
use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use meshlet_api::mesh::AppProtocol;
use prometheus::IntCounter;
use tokio::net::TcpStream;

use crate::body::ProxyBody;
use crate::control::snapshot::SharedSnapshot;
use crate::error::ProxyError;
use crate::listen::server::{Handler, Peer};
use crate::listen::transparent::app_address;
use crate::listen::tunnel;
use crate::policy::index::RoutePolicies;
use crate::proxy::headers::{add_forwarded, strip_hop_by_hop, wants_upgrade, SOURCE_HEADER};
use crate::proxy::route::{Authority, Router};
use crate::settings::Limits;
use crate::telemetry::direction::Direction;
use crate::telemetry::metrics::Metrics;
use crate::telemetry::observe::{RequestRecord, Telemetry};
use crate::telemetry::route_metrics::{RouteMetrics, RouteTable};
use crate::upstream::balance::Tried;
use crate::upstream::forward::forward;
use crate::upstream::pool::{ConnPool, Remote};
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
    let pool = ConnPool::with_remote(addr, Arc::clone(limits), Remote::App(protocol));
    ServiceTarget::single_pool(metrics.service().to_owned(), pool, target_metrics)
}

/// Transparent mode: the app on ports other than `--app-port` (a client
/// called another port of the pod), one target per port, made on first
/// use.
type OtherPorts = Arc<Mutex<HashMap<u16, Arc<ServiceTarget>>>>;

/// Traffic from other services to the local app.
#[derive(Clone)]
pub struct Inbound {
    app: Arc<ServiceTarget>,
    /// For the rate limits of the own service.
    snapshot: SharedSnapshot,
    limits: Arc<Limits>,
    metrics: Metrics,
    telemetry: Arc<Telemetry>,
    /// Where requests are counted until their route is known.
    unrouted: Arc<RouteMetrics>,
    other_ports: OtherPorts,
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
        }
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
        let target = ports.entry(addr.port()).or_insert_with(|| {
            let protocol = self.app.balancer.endpoints().first();
            let protocol = protocol.and_then(|e| e.pool.app_protocol());
            Arc::new(app_target(addr, &self.limits, &self.metrics, protocol))
        });
        Arc::clone(target)
    }

    async fn proxy(
        &self,
        request: Request<Incoming>,
        peer: &Peer,
        record: &mut RequestRecord,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        if request.method() == Method::CONNECT {
            return Err(ProxyError::MethodNotAllowed {
                method: Method::CONNECT,
                listener: "inbound",
            });
        }
        self.admit(&request, record)?;
        let version = request.version();
        let app = self.app_for(peer.original_dst);
        let app_addr = app.balancer.endpoints().first().map(|e| e.addr);
        let (mut request, downstream_upgrade) =
            prepare(request, app_addr, &self.limits, record.request_bytes());
        add_forwarded(request.headers_mut(), &peer.ip_header, "http");
        record.inject_trace(request.headers_mut());
        let no_policies = RoutePolicies::default();
        let response = forward(&app, request, no_policies, &self.limits, record.trail()).await?;
        Ok(finish(response, version, downstream_upgrade))
    }

    /// The route of the request in the current snapshot, then its rate
    /// limit (a refusal is counted on the policy).
    fn admit<B>(&self, request: &Request<B>, record: &mut RequestRecord) -> Result<(), ProxyError> {
        let snapshot = self.snapshot.load();
        let path = request.uri().path();
        record.set_route(snapshot.inbound_routes.select(path));
        if let Some(limiter) = snapshot.inbound.rate_limit(request.method(), path) {
            let key = limiter.key(request.headers());
            limiter
                .check(key, std::time::Instant::now())
                .map_err(|refusal| {
                    limiter.refused.inc();
                    ProxyError::RateLimited(refusal)
                })?;
        }
        Ok(())
    }
}

impl Handler for Inbound {
    async fn handle(&self, request: Request<Incoming>, peer: &Peer) -> Response<ProxyBody> {
        let mut record = RequestRecord::start(
            &request,
            peer.addr,
            Direction::Inbound,
            &self.unrouted,
            &self.telemetry,
        );
        let result = self.proxy(request, peer, &mut record).await;
        answer(record, result, Direction::Inbound, &self.metrics)
    }
}

/// Traffic from the local app to other services (or anywhere else).
#[derive(Clone)]
pub struct Outbound {
    router: Arc<Router>,
    limits: Arc<Limits>,
    metrics: Metrics,
    telemetry: Arc<Telemetry>,
    /// `x-meshlet-source: <own service>`, built once.
    source: Option<HeaderValue>,
    /// Where requests refused before a destination is known are counted.
    unrouted: Arc<RouteMetrics>,
}

impl Outbound {
    pub fn new(
        router: Arc<Router>,
        limits: Arc<Limits>,
        metrics: Metrics,
        telemetry: Arc<Telemetry>,
        service: &str,
    ) -> Self {
        Outbound {
            router,
            limits,
            unrouted: metrics.unrouted(Direction::Outbound),
            metrics,
            telemetry,
            source: HeaderValue::from_str(service).ok(),
        }
    }

    async fn proxy(
        &self,
        request: Request<Incoming>,
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
        let policies = target
            .policies
            .for_request(request.method(), request.uri().path());
        let fallback_authority = target.balancer.endpoints().first().map(|e| e.addr);
        let version = request.version();
        let (mut request, downstream_upgrade) = prepare(
            request,
            fallback_authority,
            &self.limits,
            record.request_bytes(),
        );
        let mesh_service = !target.namespace.is_empty();
        if let (true, Some(source)) = (mesh_service, &self.source) {
            request.headers_mut().insert(SOURCE_HEADER, source.clone());
        }
        record.inject_trace(request.headers_mut());
        let response = forward(&target, request, policies, &self.limits, record.trail()).await?;
        Ok(finish(response, version, downstream_upgrade))
    }

    /// `CONNECT host:port`: open TCP to the destination (a service endpoint
    /// or the address itself), answer 200, then splice the bytes.
    async fn tunnel(
        &self,
        mut request: Request<Incoming>,
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
    async fn handle(&self, request: Request<Incoming>, peer: &Peer) -> Response<ProxyBody> {
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
fn answer(
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

/// Turns a received request into the one sent upstream: hop-by-hop headers
/// removed, URI in the form the upstream protocol wants (origin-form for
/// HTTP/1.1, absolute for HTTP/2), body streamed as is and its bytes
/// counted on `bytes`. Returns the client's pending upgrade if the request
/// asks for one.
fn prepare(
    mut request: Request<Incoming>,
    fallback_authority: Option<SocketAddr>,
    limits: &Limits,
    bytes: IntCounter,
) -> (Request<ProxyBody>, Option<OnUpgrade>) {
    let upgrade = request.version() == Version::HTTP_11 && wants_upgrade(request.headers());
    let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut request));
    strip_hop_by_hop(request.headers_mut(), upgrade);

    if let Some(uri) = upstream_uri(&mut request, fallback_authority) {
        *request.uri_mut() = uri;
    }
    let idle_timeout = limits.stream_idle_timeout;
    (
        request.map(|body| ProxyBody::streamed(body, idle_timeout).counting(bytes)),
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
    // HTTP/1.1 upstream: it needs a Host. HTTP/1.0 clients may send none;
    // then the URI's authority, or the upstream's address, stands in.
    if !request.headers().contains_key(header::HOST) {
        let host = match request.uri().authority() {
            Some(authority) => HeaderValue::from_str(authority.as_str()).ok(),
            None => fallback_authority.and_then(|a| HeaderValue::try_from(a.to_string()).ok()),
        };
        if let Some(host) = host {
            request.headers_mut().insert(header::HOST, host);
        }
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
fn finish(
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
