//! The sidecar's immutable view of the mesh: which services exist and
//! where their endpoints are.
//!
//! A [`Snapshot`] is built from a [`MeshState`] (the `--config` file of a
//! standalone sidecar, or the revision the control plane pushed) and
//! published through [`SharedSnapshot`], an atomic pointer swap. Requests load the current
//! snapshot without locking; a new snapshot never disturbs requests that
//! already hold the old one.
//!
//! **Invariant:** building a snapshot reuses the [`Endpoint`] objects of the
//! previous one for addresses that did not change, so connection pools and
//! load counters survive config updates.
//!
//! Building also resolves the metric handles the request path uses: each
//! target's `TargetMetrics` with its route table, and the own service's
//! inbound route table (`route_metrics`), and the own service's zero-trust
//! policies with the map from a caller's identity to its service
//! (`policy::authz`). [`Snapshot::breaker_samples`]
//! gives `/metrics` the breakers' states at scrape time.

use std::collections::HashMap;
use std::sync::Arc;

use std::net::{IpAddr, SocketAddr};

use arc_swap::ArcSwap;
use meshlet_api::identity::SpiffeId;
use meshlet_api::mesh::{EndpointEntry, MeshState, ServiceEntry};
use meshlet_api::{HealthCheckSpec, Resource};
use serde_json::json;

use crate::identity::WorkloadIdentity;
use crate::policy::authz::ZeroTrust;
use crate::policy::breaker::State;
use crate::policy::index::{InboundPolicies, OutboundPolicies, PolicyState};
use crate::proxy::http_routes::{HttpRoutes, Parent};
use crate::settings::Limits;
use crate::telemetry::direction::Direction;
use crate::telemetry::metrics::{destination_label, BreakerSample, Metrics};
use crate::telemetry::route_metrics::RouteTable;
use crate::upstream::balance::{Balancer, Endpoint};
use crate::upstream::pool::{ConnPool, Remote};
use crate::upstream::target::ServiceTarget;

#[derive(Debug, Default)]
pub struct Snapshot {
    /// 0 for a standalone config file; the control plane's revision.
    pub revision: u64,
    /// Where this snapshot came from (file path or control plane URL).
    pub source: String,
    /// Keyed by `name` (services in namespace `default`) and `name.namespace`.
    services: HashMap<String, Arc<ServiceTarget>>,
    /// Transparent mode: services by endpoint address (healthy or not).
    by_address: HashMap<SocketAddr, Arc<ServiceTarget>>,
    /// ... and by endpoint IP (a pod IP): `None` when several services
    /// share the IP. Loopback and unspecified IPs are left out.
    by_ip: HashMap<IpAddr, Option<Arc<ServiceTarget>>>,
    /// Policies and other resources of the state, for lookups such as
    /// [`Snapshot::health_check`].
    resources: Vec<Resource>,
    /// Rate limits of this sidecar's own service (inbound side).
    pub inbound: InboundPolicies,
    /// Routes of inbound requests (the own service's policy prefixes).
    pub inbound_routes: RouteTable,
    /// The own service's mTLS mode and authorization policies, and who a
    /// verified caller identity is (`policy::authz`).
    pub zero_trust: ZeroTrust,
    /// Stateful policy objects by identity, reused by the next build.
    policy_state: PolicyState,
    /// Share of new traces started here that are recorded (the own
    /// service's `TracingPolicy`; every trace without one).
    pub sampling_ratio: f64,
    /// routes: the `Route`s naming the own service as `gateway:` parent
    /// (`None` when none does), for a gateway's handler.
    pub gateway_routes: Option<HttpRoutes>,
    /// routes: mesh routing, the `Route`s of each `service:` parent, by
    /// namespace then name ([`Snapshot::mesh_routes`]).
    mesh_routes: HashMap<String, HashMap<String, HttpRoutes>>,
}

/// The own service's `TracingPolicy` ratio (the first by name if several).
fn sampling_ratio(resources: &[Resource], own: Own<'_>) -> f64 {
    resources
        .iter()
        .filter(|r| r.target() == Some((own.namespace, own.service)))
        .filter_map(|r| match r {
            Resource::TracingPolicy(doc) => Some((&doc.metadata.name, doc.spec.sampling_ratio)),
            _ => None,
        })
        .min_by(|a, b| a.0.cmp(b.0))
        .map_or(
            meshlet_api::policy::TracingSpec::DEFAULT_RATIO,
            |(_, ratio)| ratio,
        )
}

/// Who is building a snapshot: this sidecar's own service, whose inbound
/// policies (rate limits) it enforces, and its workload identity (with a
/// control plane), with which it reaches endpoints that have one over mTLS.
#[derive(Debug, Clone, Copy)]
pub struct Own<'a> {
    pub namespace: &'a str,
    pub service: &'a str,
    pub identity: Option<&'a Arc<WorkloadIdentity>>,
}

pub type SharedSnapshot = Arc<ArcSwap<Snapshot>>;

/// What building one snapshot reads from and accumulates.
struct Build<'a> {
    state: &'a MeshState,
    /// The previous snapshot's endpoints by address, to keep their pools
    /// and counters.
    old_endpoints: HashMap<SocketAddr, Arc<Endpoint>>,
    /// The previous snapshot's policy state, to hand on what is unchanged.
    old_state: &'a PolicyState,
    policy_state: PolicyState,
    limits: &'a Arc<Limits>,
    metrics: &'a Metrics,
    /// This sidecar's identity (mTLS to endpoints that have one).
    identity: Option<&'a Arc<WorkloadIdentity>>,
}

impl Build<'_> {
    /// The pool of an endpoint: over mTLS when this sidecar has an
    /// identity and the registry names the endpoint's.
    fn pool(&self, spec: &EndpointEntry, peer: Option<Arc<SpiffeId>>) -> Arc<ConnPool> {
        let limits = Arc::clone(self.limits);
        match (self.identity, peer) {
            (Some(local), Some(identity)) => ConnPool::counted(
                spec.address,
                limits,
                Remote::Mesh {
                    local: Arc::clone(local),
                    identity,
                },
                self.metrics.pool(),
            ),
            _ => ConnPool::counted(spec.address, limits, Remote::Plain, self.metrics.pool()),
        }
    }

    /// One service's target: its healthy endpoints (kept from the previous
    /// snapshot when address and labels are unchanged), policies, routes
    /// and metric handles.
    fn target(&mut self, entry: &ServiceEntry) -> Arc<ServiceTarget> {
        let (state, metrics) = (self.state, self.metrics);
        let endpoints = entry
            .endpoints
            .iter()
            .filter(|spec| spec.healthy)
            .map(|spec| {
                let identity = self.identity.and(endpoint_identity(spec));
                match self.old_endpoints.get(&spec.address) {
                    Some(ep)
                        if ep.labels == spec.labels
                            && ep.pool.peer_identity().map(|i| &**i) == identity.as_deref() =>
                    {
                        Arc::clone(ep)
                    }
                    _ => Arc::new(Endpoint::new(
                        spec.address,
                        spec.labels.clone(),
                        self.pool(spec, identity),
                    )),
                }
            })
            .collect::<Vec<Arc<Endpoint>>>();
        let by_index: Vec<_> = endpoints.iter().map(|ep| (ep.addr, &ep.labels)).collect();
        let policies = OutboundPolicies::build(
            &state.resources,
            &entry.namespace,
            &entry.name,
            &by_index,
            self.old_state,
            &mut self.policy_state,
            metrics,
        );
        let destination = destination_label(&entry.namespace, &entry.name);
        let routes = RouteTable::build(&state.resources, &entry.namespace, &entry.name, |prefix| {
            metrics.route(Direction::Outbound, &destination, prefix)
        });
        let unhealthy = entry
            .endpoints
            .iter()
            .filter(|spec| !spec.healthy)
            .map(|spec| spec.address)
            .collect();
        Arc::new(ServiceTarget {
            name: entry.name.clone(),
            namespace: entry.namespace.clone(),
            balancer: Balancer::new(endpoints),
            unhealthy,
            metrics: metrics.target(Direction::Outbound, destination, routes),
            policies,
        })
    }

    /// The own service's inbound side: its rate limits (a global limit is
    /// shared by its healthy instances, at least this one) and routes.
    fn inbound(&mut self, own: Own<'_>) -> (InboundPolicies, RouteTable) {
        let (state, metrics) = (self.state, self.metrics);
        let healthy_instances = state
            .services
            .iter()
            .find(|e| e.namespace == own.namespace && e.name == own.service)
            .map_or(1, |e| e.endpoints.iter().filter(|ep| ep.healthy).count())
            .max(1);
        let inbound = InboundPolicies::build(
            &state.resources,
            own.namespace,
            own.service,
            healthy_instances,
            self.old_state,
            &mut self.policy_state,
            metrics,
        );
        let routes = RouteTable::build(&state.resources, own.namespace, own.service, |prefix| {
            metrics.route(Direction::Inbound, metrics.service(), prefix)
        });
        (inbound, routes)
    }
}

/// The SPIFFE id the registry names for an endpoint (an invalid one is
/// ignored, with a warning: the endpoint is then reached in plaintext).
fn endpoint_identity(spec: &EndpointEntry) -> Option<Arc<SpiffeId>> {
    let uri = spec.identity.as_deref()?;
    match SpiffeId::parse(uri) {
        Ok(id) => Some(Arc::new(id)),
        Err(error) => {
            tracing::warn!(endpoint = %spec.address, %error, "ignoring an endpoint's invalid identity");
            None
        }
    }
}

/// routes: the compiled `Route` tables: the own service's as a gateway
/// parent, and every `service:` parent's (backends and mirrors resolved to
/// the targets of `index`).
fn routes(
    state: &MeshState,
    own: Own<'_>,
    index: &Index,
    metrics: &Metrics,
) -> (
    Option<HttpRoutes>,
    HashMap<String, HashMap<String, HttpRoutes>>,
) {
    let resources = &state.resources;
    if !resources.iter().any(|r| matches!(r, Resource::Route(_))) {
        return (None, HashMap::new());
    }
    let targets =
        |namespace: &str, name: &str| index.services.get(&format!("{name}.{namespace}")).cloned();
    let gateway = HttpRoutes::build(
        resources,
        own.namespace,
        Parent::Gateway(own.service),
        &targets,
        metrics,
    );
    let mut mesh: HashMap<String, HashMap<String, HttpRoutes>> = HashMap::new();
    for (namespace, name) in HttpRoutes::service_parents(resources) {
        if let Some(table) = HttpRoutes::build(
            resources,
            &namespace,
            Parent::Service(&name),
            &targets,
            metrics,
        ) {
            mesh.entry(namespace).or_default().insert(name, table);
        }
    }
    (gateway, mesh)
}

/// The key of the services map a host name stands for: `NAME` or
/// `NAME.NS` (a slice of `host`), or `None` when the host is not one of the
/// four mesh name forms.
fn mesh_name_key(host: &str) -> Option<&str> {
    let host = host.strip_suffix('.').unwrap_or(host);
    let mut labels = host.split('.');
    let name = labels.next().filter(|l| !l.is_empty())?;
    let Some(namespace) = labels.next() else {
        return Some(name);
    };
    if namespace.is_empty() {
        return None;
    }
    // The rest, label by label: on the request path, so no allocation.
    let is = |label: Option<&str>, want: &str| label.is_some_and(|l| l.eq_ignore_ascii_case(want));
    let suffix_ok = match (labels.next(), labels.next(), labels.next(), labels.next()) {
        (None, ..) => true,
        (svc, None, ..) => is(svc, "svc"),
        (svc, cluster, local, None) => {
            is(svc, "svc") && is(cluster, "cluster") && is(local, "local")
        }
        _ => false,
    };
    suffix_ok.then(|| &host[..name.len() + 1 + namespace.len()])
}

/// The lookups of a snapshot: targets by name, by endpoint address and by
/// endpoint IP.
#[derive(Default)]
struct Index {
    services: HashMap<String, Arc<ServiceTarget>>,
    by_address: HashMap<SocketAddr, Arc<ServiceTarget>>,
    by_ip: HashMap<IpAddr, Option<Arc<ServiceTarget>>>,
}

impl Index {
    fn add(&mut self, entry: &ServiceEntry, target: Arc<ServiceTarget>) {
        for spec in &entry.endpoints {
            self.by_address.insert(spec.address, Arc::clone(&target));
            let ip = spec.address.ip();
            if ip.is_loopback() || ip.is_unspecified() {
                continue;
            }
            self.by_ip
                .entry(ip)
                .and_modify(|known| {
                    if known.as_ref().is_some_and(|t| !Arc::ptr_eq(t, &target)) {
                        *known = None;
                    }
                })
                .or_insert_with(|| Some(Arc::clone(&target)));
        }
        // Only mesh names: a service whose name or namespace is not a DNS
        // label (`example.com`, from a registration of before names were
        // validated, or a hand-written state) is reachable by no host name,
        // so such a host passes through to its real address.
        let valid = |label: &str| meshlet_api::limits::validate_dns_label("name", label).is_ok();
        if !valid(&target.name) || !valid(&target.namespace) {
            tracing::warn!(service = %target.name, namespace = %target.namespace,
                "a service whose name or namespace is not a DNS label is not routed by name");
            return;
        }
        if target.namespace == "default" {
            self.services
                .insert(target.name.clone(), Arc::clone(&target));
        }
        self.services
            .insert(format!("{}.{}", target.name, target.namespace), target);
    }
}

impl Snapshot {
    /// Builds a snapshot from a mesh state, reusing endpoints of
    /// `previous` where the address and labels are unchanged, and
    /// unchanged policies' state. Phases: the outbound targets (one per
    /// service, indexed by name, address and IP), then the own service's
    /// inbound side.
    pub fn build(
        state: &MeshState,
        source: String,
        previous: Option<&Snapshot>,
        own: Own<'_>,
        limits: &Arc<Limits>,
        metrics: &Metrics,
    ) -> Snapshot {
        let empty_state = PolicyState::default();
        let mut build = Build {
            state,
            old_endpoints: previous
                .into_iter()
                .flat_map(|s| s.services.values())
                .flat_map(|t| t.balancer.endpoints())
                .map(|ep| (ep.addr, Arc::clone(ep)))
                .collect(),
            old_state: previous.map_or(&empty_state, |p| &p.policy_state),
            policy_state: PolicyState::default(),
            limits,
            metrics,
            identity: own.identity,
        };
        let mut index = Index::default();
        for entry in &state.services {
            let target = build.target(entry);
            index.add(entry, target);
        }
        let (inbound, inbound_routes) = build.inbound(own);
        let zero_trust = ZeroTrust::build(state, own.namespace, own.service, metrics);
        let (gateway_routes, mesh_routes) = routes(state, own, &index, metrics);
        Snapshot {
            gateway_routes,
            mesh_routes,
            zero_trust,
            revision: state.revision,
            source,
            services: index.services,
            by_address: index.by_address,
            by_ip: index.by_ip,
            sampling_ratio: sampling_ratio(&state.resources, own),
            resources: state.resources.clone(),
            inbound,
            inbound_routes,
            policy_state: build.policy_state,
        }
    }

    /// routes: the `Route`s that apply to callers of `target` (mesh
    /// routing), if any names it as `service:` parent.
    pub fn mesh_routes(&self, target: &ServiceTarget) -> Option<&HttpRoutes> {
        if self.mesh_routes.is_empty() {
            return None;
        }
        self.mesh_routes.get(&target.namespace)?.get(&target.name)
    }

    /// The health check that applies to `service` in `namespace`, if a
    /// `HealthCheckPolicy` targets it.
    pub fn health_check(&self, namespace: &str, service: &str) -> Option<&HealthCheckSpec> {
        self.resources.iter().find_map(|r| match r {
            Resource::HealthCheckPolicy(doc) if r.target() == Some((namespace, service)) => {
                Some(&doc.spec)
            }
            _ => None,
        })
    }

    /// Finds the service a host name refers to. Only mesh names match:
    /// `NAME` (a service of the `default` namespace), `NAME.NS`,
    /// `NAME.NS.svc` or `NAME.NS.svc.cluster.local` (any case, a trailing
    /// dot allowed). Any other host (`example.com` is `NAME.NS` only if
    /// namespace `com` has a service `example`; `orders.svc`, `a.b.c`) is
    /// no service: it passes through to its real address.
    pub fn service(&self, host: &str) -> Option<&Arc<ServiceTarget>> {
        let key = mesh_name_key(host)?;
        if key.bytes().any(|b| b.is_ascii_uppercase()) {
            return self.services.get(&key.to_ascii_lowercase());
        }
        self.services.get(key)
    }

    /// Transparent mode: the service a connection to `addr` was meant for:
    /// the one with an endpoint at exactly `addr`, else the only one with
    /// an endpoint on its IP (a pod IP; the app called the pod's app port,
    /// the registry lists its sidecar's inbound port).
    pub fn service_at(&self, addr: SocketAddr) -> Option<&Arc<ServiceTarget>> {
        self.by_address
            .get(&addr)
            .or_else(|| self.by_ip.get(&addr.ip())?.as_ref())
    }

    /// Every endpoint of every service (for housekeeping such as the idle
    /// connection sweep).
    pub fn endpoints(&self) -> impl Iterator<Item = &Arc<Endpoint>> {
        self.targets().flat_map(|t| t.balancer.endpoints())
    }

    /// Every service once (the map holds those of `default` under two keys).
    fn targets(&self) -> impl Iterator<Item = &Arc<ServiceTarget>> {
        self.services
            .iter()
            .filter(|(key, t)| {
                let namespace = key
                    .strip_prefix(t.name.as_str())
                    .and_then(|k| k.strip_prefix('.'));
                namespace == Some(t.namespace.as_str())
            })
            .map(|(_, t)| t)
    }

    /// The state of every circuit breaker now, for `circuit_breaker_state`.
    pub fn breaker_samples(&self) -> Vec<BreakerSample<'_>> {
        let mut samples = Vec::new();
        for target in self.targets() {
            for set in &target.policies.breakers {
                samples.extend(set.breakers.iter().map(|breaker| BreakerSample {
                    destination: &target.metrics.destination,
                    policy: &set.name,
                    address: breaker.addr,
                    state: match breaker.state() {
                        State::Closed { .. } => 0,
                        State::HalfOpen { .. } => 1,
                        State::Open { .. } => 2,
                    },
                }));
            }
        }
        samples
    }

    /// JSON for `/config_dump`.
    pub fn to_json(&self) -> serde_json::Value {
        let mut targets: Vec<_> = self.targets().collect();
        targets.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        let services: Vec<_> = targets
            .into_iter()
            .map(|t| {
                let endpoints: Vec<_> = t
                    .balancer
                    .endpoints()
                    .iter()
                    .map(|ep| {
                        json!({
                            "address": ep.addr.to_string(),
                            "labels": ep.labels,
                            "inFlight": ep.in_flight(),
                            "ejected": ep.is_ejected(),
                            "pooledConnections": ep.pool.pooled_connections(),
                            "identity": ep.pool.peer_identity().map(|i| i.to_string()),
                            "mtlsConnection": ep.pool.has_mtls_connection(),
                        })
                    })
                    .collect();
                json!({
                    "name": t.name,
                    "namespace": t.namespace,
                    "endpoints": endpoints,
                    "unhealthyEndpoints": t.unhealthy.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
                    "policies": t.policies.to_json(),
                })
            })
            .collect();
        json!({
            "revision": self.revision,
            "source": self.source,
            "services": services,
            "inboundPolicies": self.inbound.to_json(),
            "zeroTrust": self.zero_trust.to_json(),
            "gatewayRoutes": self.gateway_routes.as_ref().map(HttpRoutes::to_json),
            "meshRoutes": self.mesh_routes.values().flat_map(|m| m.values()).map(HttpRoutes::to_json).collect::<Vec<_>>(),
            "resources": self.resources,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(yaml: &str) -> MeshState {
        MeshState::from_resources(&meshlet_api::parse_documents("t.yaml", yaml).unwrap())
    }

    const OWN: Own<'static> = Own {
        namespace: "default",
        service: "orders",
        identity: None,
    };

    const MESH: &str = "\
apiVersion: meshlet.dev/v1alpha1
kind: Service
metadata: {name: orders}
spec: {endpoints: [{address: '127.0.0.1:9001'}, {address: '127.0.0.1:9002'}]}
---
apiVersion: meshlet.dev/v1alpha1
kind: Service
metadata: {name: stock, namespace: shop}
spec: {endpoints: [{address: '127.0.0.1:9003'}]}
";

    #[test]
    fn looks_up_short_and_qualified_names() {
        let limits = Arc::new(Limits::default());
        let snap = Snapshot::build(
            &state(MESH),
            "t".into(),
            None,
            OWN,
            &limits,
            &Metrics::new("orders"),
        );
        assert_eq!(
            snap.service("orders").unwrap().balancer.endpoints().len(),
            2
        );
        assert!(snap.service("orders.default.svc.cluster.local").is_some());
        assert!(snap.service("Orders").is_some());
        assert!(
            snap.service("stock").is_none(),
            "not in the default namespace"
        );
        assert!(snap.service("stock.shop").is_some());
        assert!(snap.service("stock.shop.svc").is_some());
        assert!(snap.service("orders.example.com").is_none());
    }

    #[test]
    fn only_the_four_mesh_name_forms_match() {
        assert_eq!(mesh_name_key("orders"), Some("orders"));
        assert_eq!(mesh_name_key("orders."), Some("orders"));
        assert_eq!(mesh_name_key("orders.shop"), Some("orders.shop"));
        assert_eq!(mesh_name_key("orders.shop.svc"), Some("orders.shop"));
        assert_eq!(mesh_name_key("Orders.Shop.SVC"), Some("Orders.Shop"));
        assert_eq!(
            mesh_name_key("orders.shop.svc.cluster.local."),
            Some("orders.shop")
        );
        for other in [
            "",
            ".",
            ".orders",
            "orders..svc",
            "orders.shop.cluster.local",
            "orders.shop.svc.cluster",
            "orders.shop.svc.example.com",
            "orders.shop.svc.cluster.local.evil",
            "www.example.com",
            "a.b.c",
        ] {
            assert_eq!(mesh_name_key(other), None, "{other:?}");
        }

        let limits = Arc::new(Limits::default());
        let snap = Snapshot::build(
            &state(MESH),
            "t".into(),
            None,
            OWN,
            &limits,
            &Metrics::new("orders"),
        );
        // `NAME.svc` is namespace `svc`, not the default namespace.
        assert!(snap.service("orders.svc").is_none());
        assert!(snap.service("orders.svc.cluster.local").is_none());
        assert!(snap.service("stock.shop.svc.cluster.local").is_some());
        assert!(snap
            .service("stock.shop.svc.cluster.local.example.com")
            .is_none());
    }

    #[test]
    fn a_service_named_like_an_outside_host_is_not_routed_by_name() {
        // A registration that once claimed `example.com` (not a DNS label):
        // `example.com` must pass through to its real address.
        let state = MeshState {
            revision: 1,
            services: vec![
                ServiceEntry {
                    name: "example.com".into(),
                    namespace: "default".into(),
                    endpoints: vec![],
                },
                ServiceEntry {
                    name: "api".into(),
                    namespace: "example.com".into(),
                    endpoints: vec![],
                },
            ],
            ..Default::default()
        };
        let limits = Arc::new(Limits::default());
        let snap = Snapshot::build(
            &state,
            "t".into(),
            None,
            OWN,
            &limits,
            &Metrics::new("orders"),
        );
        assert!(snap.service("example.com").is_none());
        assert!(snap.service("example.com.default").is_none());
        assert!(snap.service("api.example.com").is_none());
    }

    #[test]
    fn finds_the_service_of_an_original_destination() {
        let pods = "\
apiVersion: meshlet.dev/v1alpha1
kind: Service
metadata: {name: orders}
spec: {endpoints: [{address: '10.0.0.2:15006'}, {address: '10.0.0.3:15006'}]}
---
apiVersion: meshlet.dev/v1alpha1
kind: Service
metadata: {name: a}
spec: {endpoints: [{address: '10.0.0.9:15006'}]}
---
apiVersion: meshlet.dev/v1alpha1
kind: Service
metadata: {name: b}
spec: {endpoints: [{address: '10.0.0.9:16006'}]}
";
        let limits = Arc::new(Limits::default());
        let metrics = Metrics::new("frontend");
        let snap = Snapshot::build(&state(pods), "t".into(), None, OWN, &limits, &metrics);
        let name = |addr: &str| {
            snap.service_at(addr.parse().unwrap())
                .map(|t| t.name.clone())
        };
        assert_eq!(name("10.0.0.3:15006").as_deref(), Some("orders"));
        assert_eq!(
            name("10.0.0.2:8080").as_deref(),
            Some("orders"),
            "the pod IP, any port"
        );
        assert_eq!(
            name("10.0.0.9:16006").as_deref(),
            Some("b"),
            "exact address first"
        );
        assert_eq!(
            name("10.0.0.9:8080"),
            None,
            "two services on one IP: ambiguous"
        );
        assert_eq!(name("10.0.0.4:8080"), None);
        let local = Snapshot::build(&state(MESH), "t".into(), None, OWN, &limits, &metrics);
        assert!(local
            .service_at("127.0.0.1:9001".parse().unwrap())
            .is_some());
        assert!(
            local
                .service_at("127.0.0.1:8080".parse().unwrap())
                .is_none(),
            "loopback is never matched by IP alone"
        );
    }

    #[test]
    fn rebuild_keeps_unchanged_endpoints() {
        let limits = Arc::new(Limits::default());
        let metrics = Metrics::new("orders");
        let first = Snapshot::build(&state(MESH), "t".into(), None, OWN, &limits, &metrics);
        let changed = MESH.replace("127.0.0.1:9002", "127.0.0.1:9009");
        let second = Snapshot::build(
            &state(&changed),
            "t".into(),
            Some(&first),
            OWN,
            &limits,
            &metrics,
        );
        let (a, b) = (
            first.service("orders").unwrap(),
            second.service("orders").unwrap(),
        );
        assert!(Arc::ptr_eq(
            &a.balancer.endpoints()[0],
            &b.balancer.endpoints()[0]
        ));
        assert_eq!(b.balancer.endpoints()[1].addr.port(), 9009);
    }

    #[test]
    fn breaker_samples_list_each_endpoint_once_with_its_destination() {
        let breakers = "
---
apiVersion: meshlet.dev/v1alpha1
kind: CircuitBreakerPolicy
metadata: {name: orders-breaker}
spec: {targetRef: {service: orders}}
---
apiVersion: meshlet.dev/v1alpha1
kind: CircuitBreakerPolicy
metadata: {name: stock-breaker, namespace: shop}
spec: {targetRef: {service: stock}}
";
        let limits = Arc::new(Limits::default());
        let snap = Snapshot::build(
            &state(&(MESH.to_owned() + breakers)),
            "t".into(),
            None,
            OWN,
            &limits,
            &Metrics::new("orders"),
        );
        let mut samples: Vec<_> = snap
            .breaker_samples()
            .iter()
            .map(|s| {
                (
                    s.destination.to_owned(),
                    s.policy.to_owned(),
                    s.address.port(),
                    s.state,
                )
            })
            .collect();
        samples.sort();
        let sample = |d: &str, p: &str, port| (d.to_owned(), p.to_owned(), port, 0);
        assert_eq!(
            samples,
            [
                sample("orders", "orders-breaker", 9001),
                sample("orders", "orders-breaker", 9002),
                sample("stock.shop", "stock-breaker", 9003),
            ]
        );
    }
}
