//! [`ServiceTarget`]: what `forward` sends a request to. Built by the
//! snapshot for each mesh service; by the request path for the one-endpoint
//! targets (the local app, a passthrough address) with
//! [`ServiceTarget::single`].

use std::net::SocketAddr;
use std::sync::Arc;

use crate::policy::index::OutboundPolicies;
use crate::settings::Limits;
use crate::telemetry::metrics::TargetMetrics;
use crate::upstream::balance::{Balancer, Endpoint};
use crate::upstream::pool::ConnPool;

/// Where a request for one destination goes: a service of the mesh, or a
/// single passthrough address.
#[derive(Debug)]
pub struct ServiceTarget {
    pub name: String,
    pub namespace: String,
    /// The healthy endpoints; only they get traffic.
    pub balancer: Balancer,
    /// Registered endpoints whose app failed its health check.
    pub unhealthy: Vec<SocketAddr>,
    /// Metric handles: destination label, routes, error counters.
    pub metrics: TargetMetrics,
    /// Breakers, retries, timeouts and split that callers apply.
    pub policies: OutboundPolicies,
}

impl ServiceTarget {
    /// A target of one address without policies: the local app, or a
    /// passthrough destination. `name` is shown in errors and
    /// `/config_dump`.
    pub fn single(
        name: String,
        addr: SocketAddr,
        limits: &Arc<Limits>,
        metrics: TargetMetrics,
    ) -> Self {
        let pool = ConnPool::counted(
            addr,
            Arc::clone(limits),
            crate::upstream::pool::Remote::Plain,
            metrics.pool.clone(),
        );
        Self::single_pool(name, pool, metrics)
    }

    /// A target of one endpoint reached through `pool` (the local app's,
    /// which speaks the app's protocol).
    pub fn single_pool(name: String, pool: Arc<ConnPool>, metrics: TargetMetrics) -> Self {
        let endpoint = Endpoint::new(pool.addr(), Default::default(), pool);
        ServiceTarget {
            name,
            namespace: String::new(),
            balancer: Balancer::new(vec![Arc::new(endpoint)]),
            unhealthy: Vec::new(),
            metrics,
            policies: Default::default(),
        }
    }
}
