//! [`AppState`]: what every handler of the API shares (the controller,
//! the trace and stats stores, the shutdown signal, the access guard's
//! state). A leaf: handlers
//! import it, it imports no handler.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::FromRef;
use tokio::sync::watch;

use crate::access::Access;
use crate::controller::Controller;
use crate::events::Activity;
use crate::listener::ConnectionStats;
use crate::peers::Peers;
use crate::stats::StatsStore;
use crate::store::Store;
use crate::tap::TapHub;
use crate::traces::TraceStore;
use crate::workload::Workload;

#[derive(Clone)]
pub struct AppState {
    pub controller: Arc<Controller>,
    pub keepalive: Duration,
    /// Becomes true on shutdown; ends every watch stream.
    pub shutdown: watch::Receiver<bool>,
    pub traces: Arc<TraceStore>,
    /// The sidecars' stats reports, for the dashboard.
    pub stats: Arc<StatsStore>,
    /// Wakes the dashboard's event streams.
    pub activity: Activity,
    /// The tokens, sessions and Host names the access guard checks.
    pub access: Access,
    /// Where token changes are persisted (the controller's store).
    pub store: Arc<dyn Store>,
    /// One token change at a time (copy, persist, swap).
    pub token_writer: Arc<tokio::sync::Mutex<()>>,
    /// Workload certificates, the CA's roots and their rotation.
    pub workload: Arc<Workload>,
    /// The API's open connections and evictions (`/metrics`).
    pub connections: Arc<ConnectionStats>,
    /// What the admission webhook (`POST /inject`) injects: image and
    /// control-plane URL (`--inject-image`, `--inject-control-plane`).
    pub inject: Arc<meshlet_api::inject::InjectOptions>,
    /// Live taps (`meshctl tap`).
    pub taps: Arc<TapHub>,
    /// The other replicas (`--store etcd`), for mesh-wide reads; `None`
    /// with redb: every read is local.
    pub peers: Option<Arc<Peers>>,
}

impl FromRef<AppState> for Arc<TraceStore> {
    fn from_ref(state: &AppState) -> Arc<TraceStore> {
        state.traces.clone()
    }
}

impl FromRef<AppState> for Activity {
    fn from_ref(state: &AppState) -> Activity {
        state.activity.clone()
    }
}
