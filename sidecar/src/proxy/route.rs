//! Outbound destination resolution: which [`ServiceTarget`] does a request
//! of the app go to?
//!
//! The destination host comes from the absolute-form URI (HTTP proxy style)
//! or else the `Host` header. A host that is a mesh name of a service of
//! the current snapshot (`NAME` in `default`, `NAME.NS`, `NAME.NS.svc`,
//! `NAME.NS.svc.cluster.local`; see `Snapshot::service`) goes to that
//! service's endpoints; any other host (`example.com`) passes through
//! unchanged to the address it names (an IP literal, or a name resolved by
//! DNS, cached for a few seconds). A name that is neither a service nor
//! resolvable is answered with 503 `unknown_service`. A destination that is
//! one of this sidecar's own listeners is refused (502 `loop_detected`)
//! rather than proxied forever. Every passthrough destination is counted
//! under the one `destination="passthrough"` label, never its address.
//!
//! Transparent mode ([`Router::resolve_intercepted`]) also knows where the
//! connection was going (`SO_ORIGINAL_DST`): a `Host` naming a service
//! still wins, then the service whose endpoint is at that address, else
//! passthrough to the address.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{header, Request};

use crate::control::snapshot::{SharedSnapshot, Snapshot};
use crate::error::ProxyError;
use crate::listen::transparent::loops_back;
use crate::settings::Limits;
use crate::telemetry::direction::Direction;
use crate::telemetry::metrics::{Metrics, PASSTHROUGH};
use crate::telemetry::route_metrics::{RouteTable, ALL_PATHS};
use crate::upstream::target::ServiceTarget;

/// Passthrough destinations kept (with their connection pools) at most.
const MAX_PASSTHROUGH_TARGETS: usize = 1024;

/// The host and port a request is addressed to, borrowed from the request
/// (routing a request allocates nothing for it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Authority<'a> {
    pub host: &'a str,
    pub port: u16,
}

impl<'a> Authority<'a> {
    /// From the absolute-form URI, else the `Host` header; port 80 if none.
    pub fn of<B>(request: &'a Request<B>) -> Option<Authority<'a>> {
        let (host, port) = match request.uri().authority() {
            Some(authority) => (authority.host(), authority.port_u16()),
            None => split_host_port(request.headers().get(header::HOST)?.to_str().ok()?)?,
        };
        // `[::1]` arrives bracketed; the bare form parses as an address.
        let host = host.trim_start_matches('[').trim_end_matches(']');
        (!host.is_empty()).then_some(Authority {
            host,
            port: port.unwrap_or(80),
        })
    }
}

/// `host`, `host:port`, `[v6]` or `[v6]:port` (a `Host` header value).
fn split_host_port(value: &str) -> Option<(&str, Option<u16>)> {
    let (host, port) = if value.starts_with('[') {
        let end = value.find(']')? + 1;
        (&value[..end], value[end..].strip_prefix(':'))
    } else {
        match value.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (value, None),
        }
    };
    match port {
        Some(port) => Some((host, Some(port.parse().ok()?))),
        None => Some((host, None)),
    }
}

#[derive(Debug)]
pub struct Router {
    snapshot: SharedSnapshot,
    /// Addresses of this sidecar's own listeners, to refuse loops.
    own_listeners: Vec<SocketAddr>,
    limits: Arc<Limits>,
    metrics: Metrics,
    passthrough: Mutex<HashMap<SocketAddr, Arc<ServiceTarget>>>,
    dns: DnsCache,
}

impl Router {
    pub fn new(
        snapshot: SharedSnapshot,
        own_listeners: Vec<SocketAddr>,
        limits: Arc<Limits>,
        metrics: Metrics,
    ) -> Self {
        Router {
            snapshot,
            own_listeners,
            limits,
            metrics,
            passthrough: Mutex::new(HashMap::new()),
            dns: DnsCache::default(),
        }
    }

    /// The current snapshot (routes: its `Route` tables).
    pub fn snapshot(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.snapshot.load()
    }

    pub async fn resolve(
        &self,
        authority: &Authority<'_>,
    ) -> Result<Arc<ServiceTarget>, ProxyError> {
        if let Some(target) = self.snapshot.load().service(authority.host) {
            return Ok(Arc::clone(target));
        }
        let addr = match authority.host.parse::<IpAddr>() {
            Ok(ip) => SocketAddr::new(ip, authority.port),
            Err(_) => {
                self.dns
                    .lookup(authority)
                    .await
                    .ok_or_else(|| ProxyError::UnknownService {
                        host: authority.host.to_owned(),
                    })?
            }
        };
        if self.is_own_listener(addr) {
            return Err(ProxyError::Loop { addr });
        }
        Ok(self.passthrough_target(addr))
    }

    /// Transparent mode: the destination of a request whose connection was
    /// going to `original`. A `Host` (or absolute URI) naming a service
    /// wins (the app asked for it by name); else a service one of whose
    /// endpoints is at `original` (`Snapshot::service_at`); else the
    /// original address itself, passed through (never a DNS lookup of the
    /// `Host`: the app already resolved it).
    pub fn resolve_intercepted(
        &self,
        authority: Option<Authority<'_>>,
        original: SocketAddr,
    ) -> Result<Arc<ServiceTarget>, ProxyError> {
        let snapshot = self.snapshot.load();
        let by_name = authority.and_then(|a| snapshot.service(a.host));
        if let Some(target) = by_name.or_else(|| snapshot.service_at(original)) {
            return Ok(Arc::clone(target));
        }
        if self.is_own_listener(original) {
            return Err(ProxyError::Loop { addr: original });
        }
        Ok(self.passthrough_target(original))
    }

    /// Closes idle connections of passthrough destinations and forgets the
    /// destinations left with none.
    pub fn sweep_passthrough(&self) {
        let mut map = self
            .passthrough
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        map.retain(|_, target| {
            target.balancer.endpoints().iter().any(|ep| {
                ep.pool.evict_idle();
                ep.pool.pooled_connections() > 0 || ep.in_flight() > 0
            })
        });
    }

    fn is_own_listener(&self, addr: SocketAddr) -> bool {
        loops_back(&self.own_listeners, addr)
    }

    /// One pool per passthrough address, so keep-alive works there too.
    fn passthrough_target(&self, addr: SocketAddr) -> Arc<ServiceTarget> {
        let mut map = match self.passthrough.lock() {
            Ok(map) => map,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(target) = map.get(&addr) {
            return Arc::clone(target);
        }
        if map.len() >= MAX_PASSTHROUGH_TARGETS {
            // Bounded memory beats perfect reuse for a long tail of hosts.
            map.clear();
        }
        let metrics = self.metrics.target(
            Direction::Outbound,
            PASSTHROUGH.to_owned(),
            RouteTable::single(
                self.metrics
                    .route(Direction::Outbound, PASSTHROUGH, ALL_PATHS),
            ),
        );
        let target = Arc::new(ServiceTarget::single(
            addr.to_string(),
            addr,
            &self.limits,
            metrics,
        ));
        map.insert(addr, Arc::clone(&target));
        target
    }
}

/// Passthrough host names resolved recently. Without it every request to a
/// host name would cost a `getaddrinfo` on the blocking pool; with it, one
/// per name per [`DNS_TTL`]. Failures are remembered briefly too, so a
/// flood of requests to an unknown name does not become a flood of lookups.
#[derive(Debug, Default)]
struct DnsCache {
    entries: Mutex<HashMap<HostPort, Resolved>>,
}

type HostPort = (String, u16);
/// The address (none if the name did not resolve) and when to forget it.
type Resolved = (Option<SocketAddr>, Instant);

const DNS_TTL: Duration = Duration::from_secs(10);
const DNS_NEGATIVE_TTL: Duration = Duration::from_secs(2);
const DNS_MAX_ENTRIES: usize = 1024;

impl DnsCache {
    async fn lookup(&self, authority: &Authority<'_>) -> Option<SocketAddr> {
        let key = (authority.host.to_owned(), authority.port);
        if let Some((addr, expires)) = self.lock().get(&key) {
            if *expires > Instant::now() {
                return *addr;
            }
        }
        let addr = tokio::net::lookup_host((authority.host, authority.port))
            .await
            .ok()
            .and_then(|mut addrs| addrs.next());
        let ttl = if addr.is_some() {
            DNS_TTL
        } else {
            DNS_NEGATIVE_TTL
        };
        let mut entries = self.lock();
        if entries.len() >= DNS_MAX_ENTRIES {
            entries.clear();
        }
        entries.insert(key, (addr, Instant::now() + ttl));
        addr
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<HostPort, Resolved>> {
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn authority(uri: &str, host: Option<&str>) -> Option<(String, u16)> {
        let mut builder = Request::builder().uri(uri);
        if let Some(host) = host {
            builder = builder.header("host", host);
        }
        let request = builder.body(()).unwrap();
        Authority::of(&request).map(|a| (a.host.to_owned(), a.port))
    }

    #[test]
    fn authority_from_uri_then_host_header() {
        let a = |h: &str, p| Some((h.to_owned(), p));
        assert_eq!(
            authority("http://orders/x", Some("ignored")),
            a("orders", 80)
        );
        assert_eq!(
            authority("http://10.1.2.3:8080/x", None),
            a("10.1.2.3", 8080)
        );
        assert_eq!(authority("/x", Some("orders:81")), a("orders", 81));
        assert_eq!(authority("/x", Some("[::1]:81")), a("::1", 81));
        assert_eq!(authority("/x", Some("[::1]")), a("::1", 80));
        assert_eq!(authority("/x", Some("orders:nope")), None);
        assert_eq!(authority("/x", None), None);
    }
}

#[cfg(test)]
mod intercepted_tests {
    use super::*;
    use crate::control::snapshot::{Own, Snapshot};
    use arc_swap::ArcSwap;
    use meshlet_api::mesh::MeshState;

    fn router() -> Router {
        let yaml = "\
apiVersion: meshlet.dev/v1alpha1
kind: Service
metadata: {name: orders}
spec: {endpoints: [{address: '10.0.0.2:15006'}]}
";
        let state =
            MeshState::from_resources(&meshlet_api::parse_documents("t.yaml", yaml).unwrap());
        let (limits, metrics) = (Arc::new(Limits::default()), Metrics::new("frontend"));
        let own = Own {
            namespace: "default",
            service: "frontend",
            identity: None,
        };
        let snapshot = Snapshot::build(&state, "t".into(), None, own, &limits, &metrics);
        let own_listeners = vec![
            "127.0.0.1:15001".parse().unwrap(),
            "0.0.0.0:15006".parse().unwrap(),
        ];
        Router::new(
            Arc::new(ArcSwap::from_pointee(snapshot)),
            own_listeners,
            limits,
            metrics,
        )
    }

    fn resolve(router: &Router, host: Option<&str>, original: &str) -> Result<String, String> {
        let authority = host.map(|host| Authority { host, port: 80 });
        router
            .resolve_intercepted(authority, original.parse().unwrap())
            .map(|t| t.name.clone())
            .map_err(|e| e.reason().to_owned())
    }

    #[test]
    fn host_then_endpoint_address_then_passthrough_never_a_loop() {
        let router = router();
        let to = |host, original| resolve(&router, host, original);
        assert_eq!(to(Some("orders"), "10.9.9.9:80"), Ok("orders".into()));
        assert_eq!(to(None, "10.0.0.2:8080"), Ok("orders".into()), "the pod IP");
        assert_eq!(to(Some("10.0.0.2"), "10.0.0.2:8080"), Ok("orders".into()));
        assert_eq!(
            to(Some("example.com"), "10.0.0.7:9000"),
            Ok("10.0.0.7:9000".into()),
            "passthrough to the original address, not the Host's"
        );
        assert_eq!(to(None, "127.0.0.1:15001"), Err("loop_detected".into()));
        assert_eq!(to(None, "10.0.0.5:15006"), Err("loop_detected".into()));
    }

    #[test]
    fn only_mesh_names_route_to_a_service() {
        let router = router();
        let to = |host| resolve(&router, Some(host), "10.0.0.9:80");
        for mesh_name in [
            "orders",
            "orders.default",
            "orders.default.svc",
            "ORDERS.default.svc.cluster.local.",
        ] {
            assert_eq!(to(mesh_name), Ok("orders".into()), "{mesh_name}");
        }
        for other in [
            "orders.svc",
            "orders.default.svc.cluster",
            "orders.default.example.com",
            "orders.example.com",
            "example.com",
        ] {
            assert_eq!(
                to(other),
                Ok("10.0.0.9:80".into()),
                "{other} passes through"
            );
        }
    }
}
