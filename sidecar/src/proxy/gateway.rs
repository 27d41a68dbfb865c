//! The ingress gateway's request path (`--mode gateway`): external
//! clients → the `Route`s whose `parentRefs` name this gateway → a mesh
//! service, called exactly as the outbound listener calls one.
//!
//! ```text
//! RequestRecord (inbound, service = the gateway: the server span)
//!   ─► CONNECT refused ─► path normalised (400 bad_path)
//!   ─► admit as the inbound does (route label, authorization for an
//!      unauthenticated caller, rate limit: `key: clientIP` is the peer or
//!      the `--xff-trusted-hops`-th x-forwarded-for entry); no mTLS check:
//!      clients outside the mesh never have a workload identity
//!   ─► host (`:authority` / `Host`, port dropped) + request ─► the gateway's
//!      routes (`HttpRoutes::select` on the snapshot's gateway routes); none → 404 no_route
//!   ─► RequestRecord (outbound, destination = the backend: the client span,
//!      child of the server span)
//!   ─► the rule: counted; a `requestRedirect` answers here; else its
//!      backend (weighted choice, label subset)
//!   ─► header rules: hop-by-hop dropped, every identity header the client
//!      sent removed (x-meshlet-source*, x-meshlet-orig-proto),
//!      x-forwarded-for appended, x-forwarded-proto set; then the rule's
//!      request filters (header set/add/remove, URL rewrite), mirrors sent
//!   ─► forward (the backend target's policies: timeouts, retries, breakers,
//!      balancing, mTLS with the gateway's own identity; the rule's timeout)
//!   ─► the rule's response filters ─► response
//! ```
//!
//! Telemetry names the gateway twice, like a sidecar whose app is the
//! mesh: the request as it entered is `direction="inbound"` with
//! `service`/`destination` the gateway's service (its route label from the
//! gateway service's own policies), and the backend call is
//! `direction="outbound"` with `destination` the backend service. The
//! stats reported to the control plane therefore show an edge from the
//! gateway to each backend, and traces a server span `GET /…` of the
//! gateway with the backend's client span under it. Both records finish
//! with the response body (the backend's first).

use std::sync::Arc;

use http::{Method, Request, Response};

use crate::body::{ProxyBody, StreamedBody};
use crate::control::snapshot::SharedSnapshot;
use crate::error::ProxyError;
use crate::listen::server::{Handler, Peer};
use crate::policy::index::RoutePolicies;
use crate::proxy::handlers::{admit, answer, finish, normalize_path, prepare, Admission};
use crate::proxy::headers::{add_forwarded, remove_source_headers};
use crate::proxy::http_routes::Selected;
use crate::proxy::route::Authority;
use crate::settings::Limits;
use crate::telemetry::direction::Direction;
use crate::telemetry::metrics::Metrics;
use crate::telemetry::observe::{RequestRecord, Telemetry};
use crate::telemetry::route_metrics::RouteMetrics;
use crate::upstream::forward::forward;
use crate::upstream::mirror::Mirrors;
use crate::upstream::pool::ORIG_PROTO;
use crate::upstream::target::ServiceTarget;

/// The gateway's inbound handler.
#[derive(Clone)]
pub struct Gateway {
    snapshot: SharedSnapshot,
    limits: Arc<Limits>,
    metrics: Metrics,
    telemetry: Arc<Telemetry>,
    /// Where requests are counted until their route is known.
    unrouted: Arc<RouteMetrics>,
    /// Where backend calls are counted until their route is known.
    unrouted_backend: Arc<RouteMetrics>,
    /// `--xff-trusted-hops`, for `key: clientIP`.
    xff_trusted_hops: usize,
    /// `x-forwarded-proto`: `https` when the gateway terminates TLS.
    scheme: &'static str,
    /// The sender of `requestMirror` copies (bounded in flight).
    mirrors: Mirrors,
}

impl Gateway {
    pub fn new(
        snapshot: SharedSnapshot,
        limits: Arc<Limits>,
        metrics: Metrics,
        telemetry: Arc<Telemetry>,
        xff_trusted_hops: usize,
        tls: bool,
    ) -> Self {
        Gateway {
            snapshot,
            limits,
            unrouted: metrics.unrouted(Direction::Inbound),
            unrouted_backend: metrics.unrouted(Direction::Outbound),
            metrics,
            telemetry,
            xff_trusted_hops,
            scheme: if tls { "https" } else { "http" },
            mirrors: Mirrors::default(),
        }
    }

    async fn proxy(
        &self,
        request: Request<StreamedBody>,
        peer: &Peer,
        record: &mut RequestRecord,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        if request.method() == Method::CONNECT {
            return Err(ProxyError::MethodNotAllowed {
                method: Method::CONNECT,
                listener: "gateway",
            });
        }
        let mut request = request;
        normalize_path(&mut request)?;
        let snapshot = self.snapshot.load_full();
        let admission = Admission {
            service: self.metrics.service(),
            mtls: false,
            xff_trusted_hops: self.xff_trusted_hops,
        };
        admit(&snapshot, &request, peer, record, &admission)?;
        let selected = snapshot
            .gateway_routes
            .as_ref()
            .and_then(|routes| routes.select(None, &request))
            .ok_or_else(|| self.no_route(&request))?;
        selected.count();
        tracing::debug!(
            route = selected.route(),
            rule = selected.rule_index(),
            "gateway route"
        );
        if let Some(redirect) = selected.redirect(&request, self.scheme) {
            return Ok(redirect);
        }
        // Every backend of the rule weighs 0.
        let backend = selected
            .backend
            .ok_or_else(|| ProxyError::NoHealthyEndpoint {
                service: format!("route {}", selected.route()),
            })?;
        let target = backend
            .target
            .as_ref()
            .ok_or_else(|| ProxyError::UnknownService {
                host: backend.service.clone(),
            })?;
        self.call(target, &selected, request, peer, record).await
    }

    fn no_route<B>(&self, request: &Request<B>) -> ProxyError {
        ProxyError::NoRoute {
            gateway: self.metrics.service().to_owned(),
            host: Authority::of(request).map_or("", |a| a.host).to_owned(),
            path: request.uri().path().to_owned(),
        }
    }

    /// The backend call: its own record (the client span, joined to the
    /// gateway's server span), the rule's request filters and mirrors, the
    /// outbound's header rules, `forward` under the backend's policies (its
    /// label subset, the rule's timeout), the rule's response filters.
    async fn call(
        &self,
        target: &Arc<ServiceTarget>,
        selected: &Selected<'_>,
        mut request: Request<StreamedBody>,
        peer: &Peer,
        record: &mut RequestRecord,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        // The gateway's span is the parent of the backend call's.
        record.inject_trace(request.headers_mut());
        let mut call = RequestRecord::start(
            &request,
            peer.addr,
            Direction::Outbound,
            &self.unrouted_backend,
            &self.telemetry,
        );
        call.set_route(target.metrics.routes.select(request.uri().path()));
        let policies = match selected.backend {
            Some(backend) => {
                backend.policies(request.method(), request.uri().path(), selected.timeouts())
            }
            None => RoutePolicies::default(),
        };
        let version = request.version();
        let fallback_authority = target.balancer.endpoints().first().map(|e| e.addr);
        let (request, downstream_upgrade) = prepare(
            request,
            fallback_authority,
            &self.limits,
            call.request_bytes(),
        );
        let mut request = request.map(|body| body.counting(record.request_bytes()));
        // Clients are outside the mesh: no identity header and no protocol
        // choice of theirs goes further.
        remove_source_headers(request.headers_mut());
        request.headers_mut().remove(ORIG_PROTO);
        add_forwarded(request.headers_mut(), &peer.ip_header, self.scheme);
        selected.apply_request(&mut request);
        call.inject_trace(request.headers_mut());
        for mirror in selected.mirrors() {
            self.mirrors
                .send(mirror, &request, &self.limits, selected.rule.timeout);
        }
        match forward(target, request, policies, &self.limits, call.trail()).await {
            Ok(mut response) => {
                selected.apply_response(&mut response);
                Ok(call.respond(finish(response, version, downstream_upgrade)))
            }
            Err(err) => {
                call.answered_by_mesh(err.reason(), err.status());
                Err(err)
            }
        }
    }
}

impl Handler for Gateway {
    async fn handle(&self, request: Request<StreamedBody>, peer: &Peer) -> Response<ProxyBody> {
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

    /// A gateway serves HTTP only.
    fn admits_opaque(&self, _identity: Option<&Arc<meshlet_api::identity::SpiffeId>>) -> bool {
        false
    }
}
