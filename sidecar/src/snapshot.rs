//! The sidecar's immutable view of the mesh: which services exist and
//! where their endpoints are.
//!
//! A [`Snapshot`] is built from resources (today the `--config` file; with
//! the control plane, each pushed revision) and published through
//! [`SharedSnapshot`], an atomic pointer swap. Requests load the current
//! snapshot without locking; a new snapshot never disturbs requests that
//! already hold the old one.
//!
//! **Invariant:** building a snapshot reuses the [`Endpoint`] objects of the
//! previous one for addresses that did not change, so connection pools and
//! load counters survive config updates.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use meshlet_api::Resource;
use prometheus::IntCounter;
use serde_json::json;

use crate::balance::{Balancer, Endpoint};
use crate::metrics::{Direction, Metrics};
use crate::pool::ConnPool;
use crate::settings::Limits;

/// Where a request for one destination goes: a service of the mesh, or a
/// single passthrough address.
#[derive(Debug)]
pub struct ServiceTarget {
    pub name: String,
    pub namespace: String,
    pub balancer: Balancer,
    /// `request_total{direction="outbound",service=name}`, resolved once.
    pub requests: IntCounter,
}

#[derive(Debug, Default)]
pub struct Snapshot {
    /// 0 for a standalone config file; the control plane's revision later.
    pub revision: u64,
    /// Where this snapshot came from (file path or control plane URL).
    pub source: String,
    /// Keyed by `name` (services in namespace `default`) and `name.namespace`.
    services: HashMap<String, Arc<ServiceTarget>>,
}

pub type SharedSnapshot = Arc<ArcSwap<Snapshot>>;

impl Snapshot {
    /// Builds a snapshot from validated resources, reusing endpoints of
    /// `previous` where the address is unchanged.
    pub fn build(
        resources: &[Resource],
        revision: u64,
        source: String,
        previous: Option<&Snapshot>,
        limits: &Arc<Limits>,
        metrics: &Metrics,
    ) -> Snapshot {
        let old_endpoints: HashMap<_, _> = previous
            .into_iter()
            .flat_map(|s| s.services.values())
            .flat_map(|t| t.balancer.endpoints())
            .map(|ep| (ep.addr, Arc::clone(ep)))
            .collect();
        let mut services = HashMap::new();
        for resource in resources {
            let Resource::Service(doc) = resource else {
                continue;
            };
            let endpoints = doc
                .spec
                .endpoints
                .iter()
                .map(|spec| match old_endpoints.get(&spec.address) {
                    Some(ep) if ep.labels == spec.labels => Arc::clone(ep),
                    _ => Arc::new(Endpoint::new(
                        spec.address,
                        spec.labels.clone(),
                        ConnPool::new(spec.address, Arc::clone(limits)),
                    )),
                })
                .collect();
            let target = Arc::new(ServiceTarget {
                name: doc.metadata.name.clone(),
                namespace: doc.metadata.namespace.clone(),
                balancer: Balancer::new(endpoints),
                requests: metrics.requests(Direction::Outbound, &doc.metadata.name),
            });
            if target.namespace == "default" {
                services.insert(target.name.clone(), Arc::clone(&target));
            }
            services.insert(format!("{}.{}", target.name, target.namespace), target);
        }
        Snapshot {
            revision,
            source,
            services,
        }
    }

    /// Finds the service a host name refers to: `orders`, `orders.shop`,
    /// `orders.shop.svc` or `orders.shop.svc.cluster.local`.
    pub fn service(&self, host: &str) -> Option<&Arc<ServiceTarget>> {
        let host = host.trim_end_matches('.');
        let host = host
            .strip_suffix(".svc.cluster.local")
            .or_else(|| host.strip_suffix(".svc"))
            .unwrap_or(host);
        if host.bytes().any(|b| b.is_ascii_uppercase()) {
            return self.services.get(&host.to_ascii_lowercase());
        }
        self.services.get(host)
    }

    /// Every endpoint of every service (for housekeeping such as the idle
    /// connection sweep).
    pub fn endpoints(&self) -> impl Iterator<Item = &Arc<Endpoint>> {
        self.services.values().flat_map(|t| t.balancer.endpoints())
    }

    /// JSON for `/config_dump`.
    pub fn to_json(&self) -> serde_json::Value {
        let mut targets: Vec<_> = self
            .services
            .iter()
            .filter(|(key, t)| **key == format!("{}.{}", t.name, t.namespace))
            .map(|(_, t)| t)
            .collect();
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
                        })
                    })
                    .collect();
                json!({"name": t.name, "namespace": t.namespace, "endpoints": endpoints})
            })
            .collect();
        json!({"revision": self.revision, "source": self.source, "services": services})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resources(yaml: &str) -> Vec<Resource> {
        meshlet_api::parse_documents("t.yaml", yaml).unwrap()
    }

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
            &resources(MESH),
            0,
            "t".into(),
            None,
            &limits,
            &Metrics::new(),
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
    fn rebuild_keeps_unchanged_endpoints() {
        let limits = Arc::new(Limits::default());
        let metrics = Metrics::new();
        let first = Snapshot::build(&resources(MESH), 1, "t".into(), None, &limits, &metrics);
        let changed = MESH.replace("127.0.0.1:9002", "127.0.0.1:9009");
        let second = Snapshot::build(
            &resources(&changed),
            2,
            "t".into(),
            Some(&first),
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
}
