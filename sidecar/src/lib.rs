//! meshlet's sidecar: the per-service proxy of the data plane.
//!
//! Three listeners share one immutable view of the mesh
//! (`control::snapshot`). The folders follow a request:
//!
//! ```text
//!  other services ─► inbound :15006 ─┐
//!  local app ──────► outbound :15001 ┴► listen (accept, sniff, framing guard)
//!                                       ─► proxy (route, policies for the request, headers)
//!                                       ─► upstream (forward: split, breakers, retries, balance, pool)
//!                                       ─► local app | service endpoint | passthrough
//!  operator ───────► admin :15020 ─────► admin (/live /ready /started /config_dump /metrics)
//!  control plane ──► control (register, heartbeat, watch) ─► snapshot swap
//!  control plane ◄── control::stats (request counts, latencies, breakers, refusals)
//!  local app ◄────── control::health (probe) ─► /ready and heartbeats
//! ```
//!
//! `identity` holds the workload certificate (renewed from the control
//! plane) and the mTLS hop between sidecars (rustls);
//! `policy` holds each policy's state and the index that finds the ones
//! for a request; `telemetry` what every request reports (metrics, spans,
//! access log). `body` (the one body type) and `error` (the one place a
//! request error becomes a response) are shared by the request path.
//!
//! [`run`] wires them together from already bound [`Listeners`], serves
//! until the shutdown future completes, deregisters from the control plane,
//! then drains in-flight requests up to the drain deadline. `main.rs` only
//! parses flags and waits for signals.
//!
//! **Architecture invariant:** nothing on the request path waits on
//! configuration loading or the control plane; requests read the current
//! snapshot through an atomic pointer.
//!
//! **Architecture invariant:** no import cycles: a module never imports
//! one that imports it back, directly or through others (checked by the
//! `no_import_cycles` test).

pub(crate) mod admin;
pub(crate) mod body;
pub mod cli;
pub(crate) mod clock;
pub(crate) mod control;
pub mod error;
pub(crate) mod identity;
pub mod iptables;
pub(crate) mod listen;
pub(crate) mod policy;
pub(crate) mod proxy;
pub mod settings;
pub(crate) mod telemetry;
#[cfg(test)]
mod testing;
pub(crate) mod upstream;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use meshlet_api::mesh::MeshState;
use meshlet_api::Resource;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use crate::control::snapshot::{Own, Snapshot};
use crate::error::StartupError;
use crate::telemetry::direction::Direction;
use crate::telemetry::metrics::{destination_label, Metrics};
use crate::upstream::target::ServiceTarget;

pub use crate::settings::{Limits, Mode, Settings};

/// Reads and validates a standalone config file (`--config`).
pub fn load_config(path: &Path) -> Result<Vec<Resource>, StartupError> {
    let text = std::fs::read_to_string(path).map_err(|source| StartupError::ReadConfig {
        path: path.to_owned(),
        source,
    })?;
    Ok(meshlet_api::parse_documents(
        &path.display().to_string(),
        &text,
    )?)
}

/// The bound listeners: three, and a gateway's redirect listener.
#[derive(Debug)]
pub struct Listeners {
    pub inbound: TcpListener,
    pub outbound: TcpListener,
    pub admin: TcpListener,
    /// Gateway `--redirect-port` (plaintext, answers 308 to https).
    pub redirect: Option<TcpListener>,
}

impl Listeners {
    pub async fn bind(settings: &Settings) -> Result<Self, StartupError> {
        async fn bind(
            listener: &'static str,
            addr: SocketAddr,
        ) -> Result<TcpListener, StartupError> {
            TcpListener::bind(addr)
                .await
                .map_err(|source| StartupError::Bind {
                    listener,
                    addr,
                    source,
                })
        }
        Ok(Listeners {
            inbound: bind("inbound", settings.inbound_addr).await?,
            outbound: bind("outbound", settings.outbound_addr).await?,
            admin: bind("admin", settings.admin_addr).await?,
            redirect: match settings.gateway.as_ref().and_then(|g| g.redirect_addr) {
                Some(addr) => Some(bind("redirect", addr).await?),
                None => None,
            },
        })
    }
}

/// How the drain after shutdown ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drained {
    /// Every in-flight request finished.
    Completely,
    /// The drain deadline passed with connections still open.
    DeadlineReached,
}

/// How long shutdown waits for the deregistration call.
const DEREGISTER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);
/// How long a deregistered sidecar keeps serving before its listeners
/// close, for the change to reach the other sidecars.
const DEREGISTER_GRACE: std::time::Duration = std::time::Duration::from_millis(500);

/// Where the first configuration comes from.
#[derive(Debug)]
pub struct InitialConfig {
    pub state: MeshState,
    /// Shown in `/config_dump` (file path, or the persisted snapshot).
    pub source: String,
    /// With a control plane: whether `state` is a persisted one (the
    /// sidecar can route before the control plane answers).
    pub persisted: bool,
    /// Standalone: the `--config` file, re-read on each reload request.
    pub config_file: Option<PathBuf>,
}

impl InitialConfig {
    /// A standalone sidecar's configuration: the `--config` file, if any.
    pub fn standalone(config: Option<&Path>) -> Result<Self, StartupError> {
        Ok(match config {
            Some(path) => InitialConfig {
                state: MeshState::from_resources(&load_config(path)?),
                source: path.display().to_string(),
                persisted: false,
                config_file: Some(path.to_owned()),
            },
            None => InitialConfig {
                state: MeshState::default(),
                source: "none (no --config: every destination passes through)".to_owned(),
                persisted: false,
                config_file: None,
            },
        })
    }

    /// A sidecar with a control plane starts from its persisted snapshot
    /// when there is a readable one, else empty until the first push.
    pub fn persisted(snapshot_file: &Path) -> Self {
        match control::persist::load_persisted(snapshot_file) {
            Ok(Some(state)) => {
                tracing::info!(file = %snapshot_file.display(), revision = state.revision, "starting from the persisted snapshot");
                InitialConfig {
                    state,
                    source: format!("persisted snapshot {}", snapshot_file.display()),
                    persisted: true,
                    config_file: None,
                }
            }
            Ok(None) => InitialConfig {
                state: MeshState::default(),
                source: "none yet (waiting for the control plane)".to_owned(),
                persisted: false,
                config_file: None,
            },
            Err(error) => {
                tracing::warn!(%error, "ignoring the persisted snapshot");
                InitialConfig {
                    state: MeshState::default(),
                    source: "none yet (waiting for the control plane)".to_owned(),
                    persisted: false,
                    config_file: None,
                }
            }
        }
    }
}

/// Runs the sidecar until `shutdown` completes, then drains. Each message
/// on `reloads` (SIGHUP in `main.rs`) re-reads a standalone `--config`.
///
/// Three phases: `start` (configuration, background tasks, listeners),
/// serve until `shutdown`, then `Running::shut_down` (deregister, stop
/// the listeners, drain, flush the last spans).
pub async fn run(
    settings: Settings,
    initial: InitialConfig,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
    reloads: mpsc::UnboundedReceiver<()>,
) -> Drained {
    let running = start(settings, initial, listeners, reloads);
    shutdown.await;
    running.shut_down().await
}

/// What a started sidecar needs to shut down.
struct Running {
    settings: Arc<Settings>,
    /// One task per listener; each yields its connections' drain.
    servers: Vec<tokio::task::JoinHandle<listen::server::Drain>>,
    /// Stops the listeners and the background tasks.
    stop: watch::Sender<bool>,
    /// With a control plane: the registration task and its deregister
    /// signal.
    registration: Option<Registration>,
    flush_spans: watch::Sender<bool>,
    span_export: Option<tokio::task::JoinHandle<()>>,
}

/// The registration task (heartbeats, deregistration at shutdown) and
/// the signal that makes it deregister.
type Registration = (tokio::task::JoinHandle<()>, watch::Sender<bool>);

/// The state every part of a sidecar shares.
struct Shared {
    settings: Arc<Settings>,
    limits: Arc<Limits>,
    metrics: Metrics,
    snapshot: control::snapshot::SharedSnapshot,
    /// With a control plane: the workload certificate and trust bundle.
    identity: Option<Arc<identity::WorkloadIdentity>>,
}

/// Start: builds the first snapshot, the request path's handlers and the
/// background tasks (config reloader, memory trimming, idle sweep, span
/// export, health prober, control-plane client), then serves the three
/// listeners.
fn start(
    settings: Settings,
    initial: InitialConfig,
    listeners: Listeners,
    reloads: mpsc::UnboundedReceiver<()>,
) -> Running {
    let shared = Shared::new(settings, &initial);
    let Shared {
        settings,
        limits,
        metrics,
        snapshot,
        identity,
    } = &shared;
    let (stop_tx, stop_rx) = watch::channel(false);
    if tokio::runtime::Handle::current().runtime_flavor()
        == tokio::runtime::RuntimeFlavor::CurrentThread
    {
        upstream::busy_poll::start(settings.busy_poll, metrics.busy_poll());
    } else if !settings.busy_poll.is_zero() {
        tracing::warn!(
            "--busy-poll is for the single-threaded runtime (--worker-threads 1); ignored"
        );
    }
    spawn_config_reloader(
        initial.config_file.clone(),
        reloads,
        Arc::clone(settings),
        Arc::clone(snapshot),
        Arc::clone(limits),
        metrics.clone(),
    );
    meshlet_netio::memory::spawn(settings.trim_memory_above_bytes, stop_rx.clone());
    let (flush_spans, flush_spans_rx) = watch::channel(false);
    let (telemetry, span_export) = start_telemetry(settings, snapshot, metrics, flush_spans_rx);
    let (inbound, outbound) = shared.handlers(&listeners, Arc::clone(&telemetry), &stop_rx);
    let [inbound_interception, outbound_interception] =
        interceptions(settings, &listeners, metrics, identity.as_ref(), snapshot);
    let health = match &settings.gateway {
        Some(_) => control::health::no_app(stop_rx.clone()),
        None => control::health::spawn_prober(
            settings.app_addr,
            settings.namespace.clone(),
            settings.service.clone(),
            Arc::clone(snapshot),
            stop_rx.clone(),
        ),
    };
    let (control, registration) =
        shared.start_control(initial, &health, &stop_rx, Arc::clone(&telemetry.tap));
    let admin = admin::Admin::new(
        Arc::clone(settings),
        Arc::clone(snapshot),
        metrics.clone(),
        health,
        control,
    )
    .with_identity(identity.clone());
    let servers = Servers {
        limits,
        metrics,
        stop: &stop_rx,
    };
    // Where the redirect listener sends clients: the TLS listener's port.
    let https_port = listeners
        .inbound
        .local_addr()
        .map_or(settings.inbound_addr.port(), |a| a.port());
    let inbound = match &settings.gateway {
        Some(gateway) => servers.spawn_gateway(
            gateway,
            listeners.inbound,
            proxy::gateway::Gateway::new(
                Arc::clone(snapshot),
                Arc::clone(limits),
                metrics.clone(),
                telemetry,
                settings.xff_trusted_hops,
                gateway.tls.is_some(),
            ),
        ),
        None => servers.spawn(
            "inbound",
            listeners.inbound,
            inbound.with_xff_trusted_hops(settings.xff_trusted_hops),
            listen::server::ListenerOptions {
                interception: inbound_interception,
                tls: identity.as_ref().map(|identity| {
                    Arc::new(identity::tls::Acceptor::new(
                        identity,
                        settings.app_addr,
                        limits.connect_timeout,
                        settings.mode == Mode::Transparent,
                    ))
                }),
                terminate: None,
            },
        ),
    };
    let mut servers_running = vec![
        inbound,
        servers.spawn(
            "outbound",
            listeners.outbound,
            outbound,
            listen::server::ListenerOptions {
                interception: outbound_interception,
                ..Default::default()
            },
        ),
        servers.spawn(
            "admin",
            listeners.admin,
            admin,
            listen::server::ListenerOptions::default(),
        ),
    ];
    if let Some(redirect) = listeners.redirect {
        servers_running.push(servers.spawn(
            "redirect",
            redirect,
            proxy::redirect::Redirect::new(https_port),
            listen::server::ListenerOptions::default(),
        ));
    }
    let servers = servers_running;
    tracing::info!(service = %settings.service, app = %settings.app_addr, mode = ?settings.mode, "sidecar started");
    Running {
        settings: Arc::clone(settings),
        servers,
        stop: stop_tx,
        registration,
        flush_spans,
        span_export,
    }
}

impl Shared {
    /// The request path: the inbound handler (to the local app's target)
    /// and the outbound one (through the router); and the sweep of idle
    /// connections in their pools.
    fn handlers(
        &self,
        listeners: &Listeners,
        telemetry: Arc<telemetry::observe::Telemetry>,
        stop: &watch::Receiver<bool>,
    ) -> (proxy::handlers::Inbound, proxy::handlers::Outbound) {
        let Shared {
            settings,
            limits,
            metrics,
            snapshot,
            ..
        } = self;
        let app = Arc::new(proxy::handlers::app_target(
            settings.app_addr,
            limits,
            metrics,
            settings.app_protocol,
        ));
        let own_listeners = [&listeners.inbound, &listeners.outbound]
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect();
        let router = Arc::new(proxy::route::Router::new(
            Arc::clone(snapshot),
            own_listeners,
            Arc::clone(limits),
            metrics.clone(),
        ));
        spawn_idle_sweep(&app, snapshot, &router, limits.idle_timeout, stop.clone());
        let inbound = proxy::handlers::Inbound::new(
            app,
            Arc::clone(snapshot),
            Arc::clone(limits),
            metrics.clone(),
            Arc::clone(&telemetry),
        );
        let outbound =
            proxy::handlers::Outbound::new(router, Arc::clone(limits), metrics.clone(), telemetry);
        (inbound, outbound)
    }

    /// Settings, metrics and the first snapshot (from `initial`).
    fn new(settings: Settings, initial: &InitialConfig) -> Self {
        let settings = Arc::new(settings);
        let limits = Arc::new(settings.limits.clone());
        let metrics = Metrics::new(&destination_label(&settings.namespace, &settings.service));
        metrics.set_config_revision(initial.state.revision);
        let identity = settings
            .control_plane
            .is_some()
            .then(|| identity::WorkloadIdentity::new(metrics.identity()));
        if let Some(identity) = &identity {
            // A persisted state's bundle verifies peers until the first push.
            identity.offer_bundle(&initial.state.trust_roots);
        }
        let snapshot = Arc::new(ArcSwap::from_pointee(Snapshot::build(
            &initial.state,
            initial.source.clone(),
            None,
            Own {
                namespace: &settings.namespace,
                service: &settings.service,
                identity: identity.as_ref(),
            },
            &limits,
            &metrics,
        )));
        Shared {
            settings,
            limits,
            metrics,
            snapshot,
            identity,
        }
    }

    /// With a control plane: the client's watch, the stats reporter and
    /// the registration (whose task deregisters when told to, during
    /// shutdown).
    fn start_control(
        &self,
        initial: InitialConfig,
        health: &watch::Receiver<control::health::AppHealth>,
        stop: &watch::Receiver<bool>,
        tap: Arc<telemetry::tap::Tap>,
    ) -> (Option<control::client::ControlClient>, Option<Registration>) {
        let Some(cp) = self.settings.control_plane.clone() else {
            return (None, None);
        };
        let client = control::client::ControlClient::new(
            Arc::clone(&self.settings),
            cp,
            Arc::clone(&self.snapshot),
            Arc::clone(&self.limits),
            self.metrics.clone(),
            initial.persisted,
        )
        .with_identity(self.identity.clone())
        .with_tap(tap);
        if let Some(identity) = &self.identity {
            // The first certificate is asked for at once; registration
            // waits for that first answer (bounded), so that peers which
            // learn of this instance can reach it over mTLS.
            identity::renew::spawn(
                Arc::clone(identity),
                Arc::new(client.clone()),
                client.cp_settings().instance_id.clone(),
                self.settings.service.clone(),
                stop.clone(),
            );
        }
        client.spawn_watch(initial.state, stop.clone());
        client.spawn_tap_sender(stop.clone());
        if let Some(interval) = client.cp_settings().stats_interval {
            control::stats::spawn(
                client.cp_settings(),
                interval,
                self.metrics.clone(),
                Arc::clone(&self.snapshot),
                stop.clone(),
            );
        }
        let (deregister_tx, deregister_rx) = watch::channel(false);
        let registration = client.spawn_registration(health.clone(), deregister_rx);
        (Some(client), Some((registration, deregister_tx)))
    }
}

impl Running {
    /// Shut down: deregister (while still serving), then stop the
    /// listeners and drain up to the drain deadline, then flush the last
    /// spans.
    async fn shut_down(self) -> Drained {
        let settings = &self.settings;
        tracing::info!(deadline = ?settings.drain_timeout, "shutting down: draining in-flight requests");
        if let Some((registration, deregister)) = self.registration {
            // Deregister first and keep serving a moment, so that other
            // sidecars get the change (pushed within milliseconds) and stop
            // sending here before the listeners close.
            let _ = deregister.send(true);
            let _ = tokio::time::timeout(DEREGISTER_TIMEOUT, registration).await;
            tokio::time::sleep(DEREGISTER_GRACE.min(settings.drain_timeout)).await;
        }
        let _ = self.stop.send(true);
        let all_drained = async {
            for server in self.servers {
                if let Ok(drain) = server.await {
                    drain.wait().await;
                }
            }
        };
        let drained = match tokio::time::timeout(settings.drain_timeout, all_drained).await {
            Ok(()) => {
                tracing::info!("drained; exiting");
                Drained::Completely
            }
            Err(_) => {
                tracing::warn!("drain deadline reached with requests still in flight; exiting");
                Drained::DeadlineReached
            }
        };
        // The spans of the last requests go out before the process ends.
        let _ = self.flush_spans.send(true);
        if let Some(export) = self.span_export {
            let _ = tokio::time::timeout(SPAN_FLUSH_TIMEOUT, export).await;
        }
        drained
    }
}

/// Transparent mode: what the inbound and outbound listeners do with
/// redirected connections (original destinations, opaque TCP); explicit
/// mode: nothing.
fn interceptions(
    settings: &Settings,
    listeners: &Listeners,
    metrics: &Metrics,
    identity: Option<&Arc<identity::WorkloadIdentity>>,
    snapshot: &control::snapshot::SharedSnapshot,
) -> [Option<Arc<listen::transparent::Interception>>; 2] {
    if settings.mode != Mode::Transparent {
        return [None, None];
    }
    let connect_timeout = settings.limits.connect_timeout;
    let own_listeners = [&listeners.inbound, &listeners.outbound]
        .iter()
        .filter_map(|l| l.local_addr().ok())
        .collect();
    [
        Some(Arc::new(listen::transparent::Interception::inbound(
            settings.app_addr,
            connect_timeout,
            metrics.tcp(Direction::Inbound),
        ))),
        Some(Arc::new(
            listen::transparent::Interception::outbound(
                own_listeners,
                connect_timeout,
                metrics.tcp(Direction::Outbound),
            )
            .with_mesh(identity.map(|identity| mesh_tcp(identity, snapshot))),
        )),
    ]
}

/// Opaque TCP to a mesh endpoint: the endpoint of the service at the
/// destination on the destination's IP (the pod), with its identity.
fn mesh_tcp(
    identity: &Arc<identity::WorkloadIdentity>,
    snapshot: &control::snapshot::SharedSnapshot,
) -> listen::transparent::MeshTcp {
    let snapshot = Arc::clone(snapshot);
    listen::transparent::MeshTcp {
        identity: Arc::clone(identity),
        lookup: Box::new(move |destination| {
            let snapshot = snapshot.load();
            let target = snapshot.service_at(destination)?;
            let endpoints = target.balancer.endpoints();
            let endpoint = endpoints
                .iter()
                .find(|e| e.addr == destination)
                .or_else(|| endpoints.iter().find(|e| e.addr.ip() == destination.ip()))?;
            Some((endpoint.addr, Arc::clone(endpoint.pool.peer_identity()?)))
        }),
    }
}

/// How long the exit waits for the last spans to be exported.
const SPAN_FLUSH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// The tracing and access-log side of the request path: the span exporter
/// (when tracing is on and there is an endpoint) and the access log
/// writer (`--access-log`). Returns the exporter task to await at exit.
fn start_telemetry(
    settings: &Settings,
    snapshot: &control::snapshot::SharedSnapshot,
    metrics: &Metrics,
    flush: watch::Receiver<bool>,
) -> (
    Arc<telemetry::observe::Telemetry>,
    Option<tokio::task::JoinHandle<()>>,
) {
    let observability = &settings.observability;
    let endpoint = observability
        .trace_endpoint
        .clone()
        .filter(|_| observability.tracing);
    let (exporter, task) = match endpoint {
        Some(endpoint) => {
            let identity = telemetry::trace::export::ExporterIdentity {
                service: settings.service.clone(),
                namespace: settings.namespace.clone(),
                instance_id: settings.control_plane.as_ref().map_or_else(
                    || format!("{}-{}", settings.service, settings.inbound_addr),
                    |cp| cp.instance_id.clone(),
                ),
            };
            tracing::info!(%endpoint, "exporting spans (OTLP/HTTP)");
            let (exporter, task) = telemetry::trace::export::spawn(
                endpoint,
                identity,
                observability.trace_queue,
                metrics.span_counters(),
                flush,
            );
            (Some(exporter), Some(task))
        }
        None => (None, None),
    };
    let access_log = observability
        .access_log
        .then(|| telemetry::access_log::AccessLog::spawn(metrics.access_log_dropped()));
    let telemetry = telemetry::observe::Telemetry {
        tracing: observability.tracing,
        exporter,
        access_log,
        sampling_ratio: {
            let snapshot = Arc::clone(snapshot);
            telemetry::observe::SamplingRatio(Box::new(move || snapshot.load().sampling_ratio))
        },
        tap: Arc::default(),
    };
    (Arc::new(telemetry), task)
}

/// Re-reads the standalone config file on each reload request: a valid
/// file replaces the snapshot (policies whose spec did not change keep
/// their state, endpoints their connections); an invalid one is logged and
/// the running configuration stays. With a control plane (no file) a
/// reload request is only logged.
fn spawn_config_reloader(
    config_file: Option<PathBuf>,
    mut reloads: mpsc::UnboundedReceiver<()>,
    settings: Arc<Settings>,
    snapshot: control::snapshot::SharedSnapshot,
    limits: Arc<Limits>,
    metrics: Metrics,
) {
    tokio::spawn(async move {
        while reloads.recv().await.is_some() {
            let Some(path) = &config_file else {
                tracing::info!("reload requested, but there is no --config file (the control plane pushes configuration); ignored");
                continue;
            };
            let read = {
                let path = path.clone();
                tokio::task::spawn_blocking(move || load_config(&path)).await
            };
            match read {
                Ok(Ok(resources)) => {
                    let state = MeshState::from_resources(&resources);
                    let previous = snapshot.load_full();
                    let next = Snapshot::build(
                        &state,
                        path.display().to_string(),
                        Some(&previous),
                        Own {
                            namespace: &settings.namespace,
                            service: &settings.service,
                            identity: None,
                        },
                        &limits,
                        &metrics,
                    );
                    snapshot.store(Arc::new(next));
                    metrics.set_config_revision(state.revision);
                    tracing::info!(file = %path.display(), resources = resources.len(), "configuration reloaded");
                }
                Ok(Err(error)) => {
                    tracing::error!(file = %path.display(), %error, "configuration reload failed; keeping the running configuration");
                }
                Err(error) => {
                    tracing::error!(%error, "configuration reload failed; keeping the running configuration");
                }
            }
        }
    });
}

/// Closes idle upstream connections of every pool (app, services,
/// passthrough) twice per idle timeout, until shutdown.
fn spawn_idle_sweep(
    app: &Arc<ServiceTarget>,
    snapshot: &control::snapshot::SharedSnapshot,
    router: &Arc<proxy::route::Router>,
    idle_timeout: std::time::Duration,
    mut stop: watch::Receiver<bool>,
) {
    let (app, snapshot, router) = (Arc::clone(app), Arc::clone(snapshot), Arc::clone(router));
    let period = (idle_timeout / 2).max(std::time::Duration::from_millis(100));
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(period) => {}
                _ = stop.wait_for(|stop| *stop) => return,
            }
            let mut closed = 0;
            for endpoint in app
                .balancer
                .endpoints()
                .iter()
                .chain(snapshot.load().endpoints())
            {
                closed += endpoint.pool.evict_idle();
            }
            router.sweep_passthrough();
            if closed > 0 {
                tracing::debug!(closed, "closed idle upstream connections");
            }
        }
    });
}

/// What every listener's server shares.
struct Servers<'a> {
    limits: &'a Arc<Limits>,
    metrics: &'a Metrics,
    stop: &'a watch::Receiver<bool>,
}

impl Servers<'_> {
    /// A gateway's inbound listener: TLS terminated when it has
    /// certificates (re-read when their files change).
    fn spawn_gateway(
        &self,
        gateway: &settings::GatewaySettings,
        listener: TcpListener,
        handler: proxy::gateway::Gateway,
    ) -> tokio::task::JoinHandle<listen::server::Drain> {
        if let Some(tls) = &gateway.tls {
            let [ok, error] = self.metrics.gateway_certificate_reloads();
            tls.spawn_reloader(
                listen::terminate::RELOAD_INTERVAL,
                listen::terminate::ReloadCounters { ok, error },
                self.stop.clone(),
            );
        }
        let options = listen::server::ListenerOptions {
            terminate: gateway.tls.clone(),
            ..Default::default()
        };
        self.spawn("inbound", listener, handler, options)
    }

    fn spawn<H: listen::server::Handler>(
        &self,
        name: &'static str,
        listener: TcpListener,
        handler: H,
        options: listen::server::ListenerOptions,
    ) -> tokio::task::JoinHandle<listen::server::Drain> {
        tokio::spawn(listen::server::serve(
            name,
            listener,
            handler,
            Arc::clone(self.limits),
            self.metrics.listener(name),
            self.stop.clone(),
            options,
        ))
    }
}
