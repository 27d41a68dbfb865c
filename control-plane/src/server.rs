//! The `control-plane` binary's settings, startup and shutdown.
//!
//! Startup: the data directory (0700, `files::ensure_private_dir`) → open
//! the redb store (0600) → load it into the controller → the mesh CA
//! (`ca.crt` 0644 / `ca.key` 0600, created on first start) → the tokens
//! from the store, the bootstrap `admin.token` (0600; persisted when it
//! changed) → the server certificate for the listen address, localhost,
//! the `--advertise-name`s and the Kubernetes names (the same names are
//! the allowed `Host`s), always from `ca.crt`/`ca.key` → the workload roots
//! (`ca-roots/`, see `ca::roots`) and the controller with the trust
//! bundle → raise the open-file limit (and cap the API's connections
//! below it) → serve HTTPS through `listener::serve_counted` (connection
//! caps, eviction and deadlines from `--api-*`) with every route
//! behind the access guard, and run the reaper and the CA rotation driver
//! (`workload::Workload::run`; expiry pauses per `--expiry-pause-*`, see
//! `expiry`).
//! SIGTERM/SIGINT flips one shutdown flag that ends the watch streams, the
//! reaper and (gracefully) the HTTP server. Any startup failure is a
//! [`StartupError`] that `main` prints as one line.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use clap::{Parser, ValueEnum};
use tokio::sync::watch;

use crate::access::{Access, AllowedHosts, CookieKey, Sessions};
use crate::api::router;
use crate::auth::Tokens;
use crate::controller::Controller;
use crate::error::StartupError;
use crate::error::StoreError;
use crate::events::Activity;
use crate::peers::credential::PeerSecret;
use crate::peers::{Peers, ReplicaInfo};
use crate::rotation::SharedRotation;
use crate::state::AppState;
use crate::stats::StatsStore;
use crate::store::etcd::{Bootstrap, EtcdSettings, EtcdStore};
use crate::store::{RedbStore, Store};
use crate::traces::{TraceLimits, TraceStore};
use crate::workload::{Workload, WorkloadSettings};

fn parse_keepalive(text: &str) -> Result<Duration, String> {
    let d = parse_duration(text)?;
    if d > Duration::from_secs(10) {
        return Err("must be at most 10s (sidecars reopen a watch that is silent for 30s)".into());
    }
    Ok(d)
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if d.is_zero() {
        return Err("must be greater than 0".into());
    }
    Ok(d)
}

/// The shortest `--workload-cert-ttl`: sidecars renew at 2/3 of it with
/// jitter and back off on failures; below this they would do little else.
pub const MIN_WORKLOAD_CERT_TTL: Duration = Duration::from_secs(10);

fn parse_workload_ttl(text: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if d < MIN_WORKLOAD_CERT_TTL {
        return Err(format!(
            "must be at least 10s (got {}): sidecars renew at 2/3 of the lifetime",
            humantime::format_duration(d)
        ));
    }
    Ok(d)
}

fn parse_advertise_url(text: &str) -> Result<String, String> {
    crate::peers::authority_of(text)?;
    Ok(text.trim_end_matches('/').to_owned())
}

fn parse_capacity(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

/// Where the durable state lives (`--store`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StoreKind {
    /// One redb file in `--data-dir`: one control-plane process.
    Redb,
    /// An etcd cluster: several control-plane replicas share it.
    Etcd,
}

impl StoreKind {
    pub fn name(self) -> &'static str {
        match self {
            StoreKind::Redb => "redb",
            StoreKind::Etcd => "etcd",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Flags of `control-plane`; each is also a `MESHLET_*` environment variable.
#[derive(Debug, Clone, Parser)]
#[command(name = "control-plane", version, about = "meshlet control plane")]
pub struct Settings {
    /// Address of the HTTP API and watch stream.
    #[arg(long, env = "MESHLET_LISTEN", default_value = "127.0.0.1:15010")]
    pub listen: SocketAddr,
    /// Where the durable store (meshlet.redb), the mesh CA (ca.crt, ca.key)
    /// and the bootstrap admin.token live (mode 0700).
    #[arg(long, env = "MESHLET_DATA_DIR", default_value = "./meshlet-data")]
    pub data_dir: PathBuf,
    /// An instance without a heartbeat for this long is removed; sidecars
    /// are told to send heartbeats every ttl/3.
    #[arg(long, env = "MESHLET_TTL", default_value = "10s", value_parser = parse_duration)]
    pub ttl: Duration,
    /// A watch stream without events gets a keepalive line this often (at
    /// most 10s: sidecars reopen a watch that is silent for 30s).
    #[arg(long, env = "MESHLET_KEEPALIVE", default_value = "5s", value_parser = parse_keepalive)]
    pub keepalive: Duration,
    #[arg(long, env = "MESHLET_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Traces kept in memory at most; the least recently updated go first.
    #[arg(long, env = "MESHLET_TRACE_CAPACITY", default_value_t = 1000, value_parser = parse_capacity)]
    pub trace_capacity: usize,
    /// A trace is dropped this long after its last span arrived.
    #[arg(long, env = "MESHLET_TRACE_RETENTION", default_value = "15m", value_parser = parse_duration)]
    pub trace_retention: Duration,
    /// Estimated bytes of stored spans at most (default 64 MiB); the least
    /// recently updated traces go first.
    #[arg(long, env = "MESHLET_TRACE_MAX_BYTES", default_value_t = crate::traces::store::DEFAULT_MAX_BYTES, value_parser = parse_capacity)]
    pub trace_max_bytes: usize,
    /// The mesh's SPIFFE trust domain (the CA's name; workload identities).
    #[arg(long, env = "MESHLET_TRUST_DOMAIN", default_value = "meshlet.local")]
    pub trust_domain: String,
    /// A DNS name or IP clients reach the control plane by (repeatable):
    /// added to the server certificate and the allowed Host names. The
    /// listen IP, localhost, 127.0.0.1, ::1 and the Kubernetes Service
    /// names are always in.
    #[arg(
        long = "advertise-name",
        env = "MESHLET_ADVERTISE_NAME",
        value_delimiter = ','
    )]
    pub advertise_names: Vec<String>,
    /// Lifetime of the workload certificates sidecars get (at least 10s);
    /// they renew at about 2/3 of it.
    #[arg(long, env = "MESHLET_WORKLOAD_CERT_TTL", default_value = "24h", value_parser = parse_workload_ttl)]
    pub workload_cert_ttl: Duration,
    /// How long a CA rotation's new root is only trusted (phase 1) before
    /// it signs (phase 2): the time for every sidecar to receive it.
    #[arg(long, env = "MESHLET_CA_ROTATION_GRACE", default_value = "5s", value_parser = parse_duration)]
    pub ca_rotation_grace: Duration,
    // --- issue 16 (cp): API connection limits and expiry self-preservation.
    /// A new API connection must send its first request head within this
    /// (counted from accept, TLS handshake included).
    #[arg(long, env = "MESHLET_API_HEADER_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub api_header_timeout: Duration,
    /// An API connection with no request in flight is closed after this
    /// (sidecars keep theirs busy with heartbeats every ttl/3).
    #[arg(long, env = "MESHLET_API_IDLE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub api_idle_timeout: Duration,
    /// API connections open at once (lowered to fit the open-file limit).
    /// Past it, an unproven or idle connection is evicted for the new one;
    /// busy ones (requests in flight, watch streams) never are.
    #[arg(long, env = "MESHLET_API_MAX_CONNECTIONS", default_value_t = 2048, value_parser = parse_capacity)]
    pub api_max_connections: usize,
    /// If more than this share of the instances has not been heard for
    /// half a TTL (they would all expire within one TTL), expiry pauses:
    /// the control plane is likely the one that cannot hear them. 1 never
    /// pauses.
    #[arg(long, env = "MESHLET_EXPIRY_PAUSE_SHARE", default_value = "0.5", value_parser = crate::expiry::parse_share)]
    pub expiry_pause_share: f64,
    /// Below this many registered instances expiry never pauses (a small
    /// mesh still sees its one dead instance go).
    #[arg(long, env = "MESHLET_EXPIRY_PAUSE_MIN_INSTANCES", default_value_t = 3)]
    pub expiry_pause_min_instances: usize,
    /// The longest expiry pause: past it the silent instances expire
    /// anyway (a mesh where most services really died converges).
    #[arg(long, env = "MESHLET_EXPIRY_PAUSE_MAX", default_value = "15m", value_parser = parse_duration)]
    pub expiry_pause_max: Duration,
    /// Instances one service may have registered at once; past it a new
    /// registration gets 429 (one sidecar token cannot flood the registry).
    #[arg(long, env = "MESHLET_MAX_INSTANCES_PER_SERVICE",
          default_value_t = crate::controller::DEFAULT_MAX_INSTANCES_PER_SERVICE,
          value_parser = parse_capacity)]
    pub max_instances_per_service: usize,
    // --- issue 18: replicas on etcd.
    /// Where the durable state lives: `redb` (a file in --data-dir, one
    /// control plane) or `etcd` (shared by several replicas; --data-dir
    /// then only holds local copies of ca.crt, ca.key and admin.token).
    #[arg(long, env = "MESHLET_STORE", value_enum, default_value = "redb")]
    pub store: StoreKind,
    /// etcd client URLs (`http://` or `https://`), comma-separated.
    #[arg(long, env = "MESHLET_ETCD_ENDPOINTS", value_delimiter = ',')]
    pub etcd_endpoints: Vec<String>,
    /// Every key the mesh writes starts with this (several meshes can
    /// share one etcd).
    #[arg(long, env = "MESHLET_ETCD_PREFIX", default_value = "/meshlet")]
    pub etcd_prefix: String,
    /// CA bundle that signed etcd's server certificates.
    #[arg(long, env = "MESHLET_ETCD_CA_FILE")]
    pub etcd_ca_file: Option<PathBuf>,
    /// Client certificate for etcd (`--client-cert-auth`), with --etcd-key-file.
    #[arg(long, env = "MESHLET_ETCD_CERT_FILE", requires = "etcd_key_file")]
    pub etcd_cert_file: Option<PathBuf>,
    #[arg(long, env = "MESHLET_ETCD_KEY_FILE", requires = "etcd_cert_file")]
    pub etcd_key_file: Option<PathBuf>,
    /// etcd user (etcd `--auth`), with --etcd-password (better: MESHLET_ETCD_PASSWORD).
    #[arg(long, env = "MESHLET_ETCD_USER", requires = "etcd_password")]
    pub etcd_user: Option<String>,
    #[arg(
        long,
        env = "MESHLET_ETCD_PASSWORD",
        hide_env_values = true,
        requires = "etcd_user"
    )]
    pub etcd_password: Option<String>,
    /// This replica's name in `x-meshlet-replica`, `/healthz?detail` and
    /// `/metrics` (default: host name and API port).
    #[arg(long, env = "MESHLET_REPLICA_ID")]
    pub replica_id: Option<String>,
    /// `--store etcd`: the URL the other replicas reach this one's API at
    /// (`https://HOST[:PORT]`), registered under `PREFIX/replicas/`; its
    /// host is added to the server certificate. Default: the listen
    /// address, or with 0.0.0.0/:: the first --advertise-name, else the
    /// host name (in Kubernetes: `https://$(POD_IP):15010`).
    #[arg(long, env = "MESHLET_ADVERTISE_URL", value_parser = parse_advertise_url)]
    pub advertise_url: Option<String>,
    /// `--store etcd`: how long a mesh-wide read (traces, dashboard) waits
    /// for each other replica; one that takes longer is left out of the
    /// answer, which is marked partial (`x-meshlet-partial`).
    #[arg(long, env = "MESHLET_PEER_TIMEOUT", default_value = "1s", value_parser = parse_duration)]
    pub peer_timeout: Duration,
    // --- issue 19: the admission webhook (`POST /inject`).
    /// The sidecar image the admission webhook injects (as `meshctl
    /// inject --image`).
    #[arg(long, env = "MESHLET_INJECT_IMAGE", default_value_t = meshlet_api::inject::default_image())]
    pub inject_image: String,
    /// The control plane's URL as injected sidecars reach it (as `meshctl
    /// inject --control-plane`).
    #[arg(long, env = "MESHLET_INJECT_CONTROL_PLANE", default_value = meshlet_api::inject::DEFAULT_CONTROL_PLANE)]
    pub inject_control_plane: String,
    /// Inject the sidecar as a plain container, not a native sidecar (as
    /// `meshctl inject --no-native-sidecar`).
    #[arg(long, env = "MESHLET_INJECT_NO_NATIVE_SIDECAR")]
    pub inject_no_native_sidecar: bool,
    /// Above this much heap memory (anonymous resident, MiB), give the
    /// memory freed after a burst (e.g. every sidecar reconnecting at once)
    /// back to the system, checked every 10 s (glibc keeps it otherwise;
    /// 0 = never).
    #[arg(long, env = "MESHLET_TRIM_MEMORY_ABOVE_MIB", default_value_t = 64)]
    pub trim_memory_above_mib: u64,
}

impl Settings {
    /// The API's connection limits from the flags (before the open-file
    /// limit caps them).
    pub fn api_limits(&self) -> crate::listener::Limits {
        crate::listener::Limits {
            max_connections: self.api_max_connections,
            header_timeout: self.api_header_timeout,
            idle_timeout: self.api_idle_timeout,
            ..crate::listener::Limits::default()
        }
    }

    pub fn expiry_policy(&self) -> crate::expiry::ExpiryPolicy {
        crate::expiry::ExpiryPolicy {
            pause_share: self.expiry_pause_share,
            min_instances: self.expiry_pause_min_instances,
            max_pause: self.expiry_pause_max,
        }
    }

    /// What the admission webhook injects.
    pub fn inject_options(&self) -> meshlet_api::inject::InjectOptions {
        meshlet_api::inject::InjectOptions {
            image: self.inject_image.clone(),
            control_plane: self.inject_control_plane.clone(),
            native_sidecar: !self.inject_no_native_sidecar,
        }
    }

    pub fn trace_limits(&self) -> TraceLimits {
        TraceLimits {
            capacity: self.trace_capacity,
            retention: self.trace_retention,
            max_bytes: self.trace_max_bytes,
            ..TraceLimits::default()
        }
    }
}

/// Logs to stderr; `RUST_LOG` overrides the default level (info).
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Open files kept free of API connections: the store, logs, the data
/// directory's files, outgoing calls.
const FD_RESERVE: u64 = 64;

/// Validity of the API server's certificate (re-issued at every start).
const SERVER_CERT_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// Creates the data directory (0700) and proves it writable.
fn check_data_dir(dir: &Path) -> Result<(), StartupError> {
    let fail = |source| StartupError::DataDir {
        path: dir.to_owned(),
        source,
    };
    crate::files::ensure_private_dir(dir)?;
    let probe = dir.join(".meshlet-write-test");
    std::fs::write(&probe, b"ok").map_err(fail)?;
    std::fs::remove_file(&probe).map_err(fail)
}

/// Resolves when SIGTERM or SIGINT arrives (the binary's shutdown signal).
pub async fn signalled() -> Result<(), StartupError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(StartupError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(StartupError::Signal)?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

/// Binds `settings.listen`: the binary's listener.
pub async fn bind(settings: &Settings) -> Result<tokio::net::TcpListener, StartupError> {
    tokio::net::TcpListener::bind(settings.listen)
        .await
        .map_err(|source| StartupError::Listen {
            addr: settings.listen,
            source,
        })
}

/// Runs the control plane on an already bound `listener` until `shutdown`
/// completes, then drains (watch streams end, the server finishes its
/// requests) and returns. Tests bind `127.0.0.1:0` and run it in-process;
/// the binary passes its signal handler as `shutdown`.
pub async fn run(
    listener: tokio::net::TcpListener,
    settings: Settings,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), StartupError> {
    check_data_dir(&settings.data_dir)?;
    let listen = listener.local_addr().unwrap_or(settings.listen);
    let etcd = match settings.store {
        StoreKind::Redb => None,
        StoreKind::Etcd => {
            let etcd = Arc::new(open_etcd(&settings, listen)?);
            bootstrap_from_etcd(&etcd, &settings.data_dir, &settings.trust_domain)?;
            Some(etcd)
        }
    };
    let store: Arc<dyn Store> = match &etcd {
        Some(etcd) => etcd.clone(),
        None => Arc::new(RedbStore::open(&settings.data_dir)?),
    };
    let (ca, origin) = crate::ca::load_or_create(&settings.data_dir, &settings.trust_domain)?;
    tracing::info!(?origin, subject = ca.subject(), "mesh CA");
    let mut advertise_names = settings.advertise_names.clone();
    let advertise_url = etcd.as_ref().map(|_| advertise_url(&settings, listen));
    if let Some(host) = advertise_url.as_deref().and_then(crate::peers::host_of) {
        advertise_names.push(host);
    }
    let names = crate::ca::server_names(listen, &advertise_names);
    // Every replica derives the same peer credential from the shared CA key.
    let peer_secret = etcd
        .as_ref()
        .map(|etcd| Arc::new(PeerSecret::derive(&ca.key_pem(), etcd.prefix())));
    // ... and the same key for the dashboard's session cookies, whose
    // sessions then live in etcd (`access::sessions`).
    let shared_sessions = etcd.as_ref().map(|etcd| {
        let key = CookieKey::derive(&ca.key_pem(), etcd.prefix());
        Sessions::new(key, etcd.clone())
    });
    // ca.crt/ca.key always issue the API's certificate (see ca::roots).
    let cert = ca.issue_server_cert(&names, SERVER_CERT_TTL)?;
    // Roots: with redb from ca-roots/ in the data dir; with etcd from
    // P/ca/state (the rotation is mesh-wide, see rotation.rs).
    let (roots, shared) = match &etcd {
        None => (crate::ca::Roots::load(&settings.data_dir, ca)?, None),
        Some(etcd) => {
            let shared = Arc::new(SharedRotation::new(etcd.clone(), Arc::new(ca)));
            let (roots, etcd_revision) = shared.load().await?;
            let roots =
                roots.unwrap_or_else(|| crate::ca::Roots::single(shared.original().clone()));
            (roots, Some((shared, etcd_revision)))
        }
    };
    let mut controller = Controller::load_with_identity(
        store.clone(),
        settings.ttl,
        &settings.trust_domain,
        roots.bundle_pem(),
    )?
    .with_expiry_policy(settings.expiry_policy())
    .with_max_instances_per_service(settings.max_instances_per_service);
    if let Some(etcd) = &etcd {
        controller = controller.with_replica(etcd.clone());
    }
    let controller = Arc::new(controller);
    let started_ms = crate::clock::now_ms();
    let workload = Workload::new(
        WorkloadSettings {
            data_dir: settings.data_dir.clone(),
            trust_domain: settings.trust_domain.clone(),
            ttl: settings.workload_cert_ttl,
            grace: settings.ca_rotation_grace,
            // A CA made now signed nothing before; otherwise leaves of an
            // earlier run may be live for up to one TTL.
            // With etcd the other replicas' leaves are never known here.
            all_known_after_ms: if etcd.is_some() {
                u64::MAX
            } else if origin == crate::ca::CaOrigin::Created {
                0
            } else {
                started_ms + settings.workload_cert_ttl.as_millis() as u64
            },
        },
        roots,
    );
    let workload = Arc::new(match shared {
        Some((shared, etcd_revision)) => workload.with_shared(shared, etcd_revision),
        None => workload,
    });
    let tokens = load_tokens(&settings.data_dir, store.as_ref())?;
    let tls = crate::ca::server_tls_config(&cert.chain_pem, &cert.key_pem)?;
    let tls = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let mut limits = settings.api_limits();
    if let Some(fd_limit) = crate::listener::raise_open_file_limit() {
        limits = limits.within_fd_limit(fd_limit, FD_RESERVE);
        tracing::debug!(fd_limit, "open-file limit");
        if limits.max_connections < settings.api_max_connections {
            tracing::info!(
                fd_limit,
                max_connections = limits.max_connections,
                "API connection cap lowered to fit the open-file limit"
            );
        }
    }
    let connections = Arc::new(crate::listener::ConnectionStats::default());
    let tokens = Arc::new(RwLock::new(tokens));
    let mut access = Access::new(tokens.clone(), AllowedHosts::new(&names));
    if let Some(sessions) = shared_sessions {
        access = access.with_sessions(sessions);
    }
    let mut peers = None;
    if let (Some(etcd), Some(secret), Some(url)) = (&etcd, &peer_secret, advertise_url) {
        access = access.with_peer(secret.clone());
        peers = Some(Arc::new(open_peers(&settings, etcd, secret.clone(), url)?));
    }
    let (stop, stopped) = watch::channel(false);
    let external_stop = stop.clone();
    let external = tokio::spawn(async move {
        shutdown.await;
        tracing::info!("shutting down");
        external_stop.send_replace(true);
    });
    tracing::info!(
        listen = %listen,
        names = ?names,
        data_dir = %settings.data_dir.display(),
        revision = controller.published().revision,
        instances = controller.published().instances.len(),
        ttl = ?settings.ttl,
        "control plane ready"
    );
    let shutdown = stopped;
    meshlet_netio::memory::spawn(
        settings.trim_memory_above_mib.saturating_mul(1 << 20),
        shutdown.clone(),
    );
    let reaper = tokio::spawn(controller.clone().run_reaper(shutdown.clone()));
    // etcd: other replicas' revisions, owners and tokens.
    let ca_follower = workload.clone();
    let replication = tokio::spawn(controller.clone().run_replication(
        move |records| match Tokens::from_records(records) {
            Ok(new) => *tokens.write().unwrap() = new,
            Err(err) => tracing::error!(error = %err, "tokens from etcd are unusable"),
        },
        move |value, etcd_revision| ca_follower.apply_shared(value, etcd_revision),
        shutdown.clone(),
    ));
    let rotation = tokio::spawn(workload.clone().run(controller.clone(), shutdown.clone()));
    // etcd: the election of the replica that drives the rotation's phases.
    let election = workload
        .shared()
        .map(|shared| tokio::spawn(shared.clone().run_election(shutdown.clone())));
    let discovery = match (&etcd, &peers) {
        (Some(etcd), Some(peers)) => Some(tokio::spawn(crate::peers::registry::run(
            peers.clone(),
            etcd.client(),
            etcd.prefix().to_owned(),
            shutdown.clone(),
        ))),
        _ => None,
    };
    let taps: Arc<crate::tap::TapHub> = Default::default();
    let tap_sharing = match (&etcd, &peers) {
        (Some(etcd), Some(peers)) => Some(tokio::spawn(crate::peers::taps::run(
            peers.clone(),
            taps.clone(),
            etcd.client(),
            etcd.prefix().to_owned(),
            shutdown.clone(),
        ))),
        _ => None,
    };
    let stats = Arc::new(StatsStore::new());
    let forget = tokio::spawn(crate::dashboard::forget_departed(
        controller.clone(),
        stats.clone(),
        shutdown.clone(),
    ));
    let mut app = router(AppState {
        controller,
        stats,
        activity: Activity::default(),
        keepalive: settings.keepalive,
        shutdown: shutdown.clone(),
        traces: Arc::new(TraceStore::new(settings.trace_limits())),
        access,
        store,
        token_writer: Default::default(),
        workload,
        connections: connections.clone(),
        inject: Arc::new(settings.inject_options()),
        taps,
        peers: peers.clone(),
    });
    if let Some(etcd) = &etcd {
        app = with_replica_header(app, etcd.replica_id())?;
    }
    crate::listener::serve_counted(listener, Some(tls), app, limits, shutdown, connections).await;
    stop.send_replace(true);
    external.abort();
    let _ = reaper.await;
    let _ = replication.await;
    let _ = forget.await;
    let _ = rotation.await;
    if let Some(election) = election {
        let _ = election.await;
    }
    if let Some(tap_sharing) = tap_sharing {
        let _ = tap_sharing.await;
    }
    if let (Some(discovery), Some(etcd), Some(peers)) = (discovery, &etcd, &peers) {
        let _ = discovery.await;
        // The others drop this replica now rather than when its lease ends.
        crate::peers::registry::deregister(&mut etcd.client(), etcd.prefix(), &peers.me().id).await;
    }
    Ok(())
}

/// `--advertise-url`, or its default (see the flag).
fn advertise_url(settings: &Settings, listen: SocketAddr) -> String {
    if let Some(url) = &settings.advertise_url {
        return url.clone();
    }
    let host = if listen.ip().is_unspecified() {
        settings
            .advertise_names
            .first()
            .cloned()
            .unwrap_or_else(|| {
                std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .map(|h| h.trim().to_owned())
                    .unwrap_or_else(|_| "localhost".into())
            })
    } else {
        match listen.ip() {
            std::net::IpAddr::V6(ip) => format!("[{ip}]"),
            ip => ip.to_string(),
        }
    };
    format!("https://{host}:{}", listen.port())
}

/// `--store etcd`: this replica as the others see it, and the client that
/// reaches them (TLS trusting only the mesh CA).
fn open_peers(
    settings: &Settings,
    etcd: &EtcdStore,
    secret: Arc<PeerSecret>,
    url: String,
) -> Result<Peers, StartupError> {
    let ca_file = settings.data_dir.join(meshlet_api::access::CA_CERT_FILE);
    let tls = meshlet_client::client_config_from_ca_file(&ca_file)
        .map_err(|e| StoreError::Config(format!("peer replicas' TLS: {e}")))?;
    let me = ReplicaInfo {
        id: etcd.replica_id().to_owned(),
        url,
        started_at_ms: crate::clock::now_ms(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
    };
    tracing::info!(replica = %me.id, url = %me.url, "advertised to the other replicas");
    let client = meshlet_client::Client::new()
        .tls(tls)
        .user_agent("meshlet-control-plane-peer");
    Ok(Peers::new(me, secret, client, settings.peer_timeout))
}

/// The tokens from the store, with a working bootstrap admin token
/// (`DATA_DIR/admin.token`); saved back when that changed them.
fn load_tokens(data_dir: &Path, store: &dyn Store) -> Result<Tokens, StartupError> {
    let mut tokens = Tokens::from_records(store.load_access()?.tokens)?;
    let outcome = crate::auth::ensure_admin_token(data_dir, &mut tokens)?;
    if outcome != crate::auth::AdminTokenOutcome::Kept {
        let records: Vec<_> = tokens.records().cloned().collect();
        store.save_tokens(&records)?;
        tracing::info!(?outcome, path = %crate::auth::admin_token_path(data_dir).display(), "admin token");
    }
    Ok(tokens)
}

/// `--store etcd`: connects (see `store::etcd`).
fn open_etcd(settings: &Settings, listen: SocketAddr) -> Result<EtcdStore, StartupError> {
    let replica_id = settings.replica_id.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "localhost".into());
        format!("{host}:{}", listen.port())
    });
    let etcd = EtcdStore::open(&EtcdSettings {
        endpoints: settings.etcd_endpoints.clone(),
        prefix: settings.etcd_prefix.clone(),
        ca_file: settings.etcd_ca_file.clone(),
        cert_file: settings.etcd_cert_file.clone(),
        key_file: settings.etcd_key_file.clone(),
        user: settings.etcd_user.clone(),
        password: settings.etcd_password.clone(),
        ttl: settings.ttl,
        replica_id,
    })?;
    tracing::info!(
        endpoints = ?settings.etcd_endpoints,
        prefix = %settings.etcd_prefix,
        replica = etcd.replica_id(),
        "store: etcd"
    );
    Ok(etcd)
}

/// `--store etcd`: every replica serves with the same CA and bootstrap
/// admin token. The first replica to start stores its own (made as with
/// redb, in `data_dir`) with a create-if-absent txn; every other one (and
/// a loser of that race) copies etcd's into `data_dir`, overwriting.
fn bootstrap_from_etcd(
    etcd: &EtcdStore,
    data_dir: &Path,
    trust_domain: &str,
) -> Result<(), StartupError> {
    use meshlet_api::access::{ADMIN_TOKEN_FILE, CA_CERT_FILE};
    let key_path = data_dir.join(crate::ca::CA_KEY_FILE);
    let write = |b: &Bootstrap| -> Result<(), StartupError> {
        crate::files::write_file_atomic(
            &key_path,
            b.ca_key.as_bytes(),
            crate::files::PRIVATE_FILE_MODE,
        )?;
        crate::files::write_file_atomic(
            &data_dir.join(CA_CERT_FILE),
            b.ca_cert.as_bytes(),
            crate::files::PUBLIC_FILE_MODE,
        )?;
        crate::files::write_file_atomic(
            &data_dir.join(ADMIN_TOKEN_FILE),
            b.admin_token.as_bytes(),
            crate::files::PRIVATE_FILE_MODE,
        )?;
        Ok(())
    };
    if let Some(existing) = etcd.bootstrap()? {
        return write(&existing);
    }
    let (ca, _) = crate::ca::load_or_create(data_dir, trust_domain)?;
    crate::auth::ensure_admin_token(data_dir, &mut Tokens::default())?;
    let admin_token =
        std::fs::read_to_string(data_dir.join(ADMIN_TOKEN_FILE)).map_err(|source| {
            StartupError::DataDir {
                path: data_dir.join(ADMIN_TOKEN_FILE),
                source,
            }
        })?;
    let mine = Bootstrap {
        ca_cert: ca.cert_pem().to_owned(),
        ca_key: ca.key_pem(),
        admin_token,
    };
    if etcd.create_bootstrap(&mine)? {
        tracing::info!("stored the mesh CA and the admin token in etcd (first replica)");
        return Ok(());
    }
    match etcd.bootstrap()? {
        Some(winner) => write(&winner),
        None => Err(StoreError::Corrupt("the bootstrap keys vanished from etcd".into()).into()),
    }
}

/// The `x-meshlet-replica` header on every answer (`--store etcd`).
fn with_replica_header(app: axum::Router, replica_id: &str) -> Result<axum::Router, StartupError> {
    let value = http::HeaderValue::from_str(replica_id).map_err(|_| {
        StoreError::Config(format!(
            "--replica-id {replica_id:?} is not a valid header value"
        ))
    })?;
    Ok(app.layer(axum::middleware::map_response(
        move |mut response: axum::response::Response| {
            let value = value.clone();
            async move {
                response
                    .headers_mut()
                    .insert(meshlet_api::mesh::REPLICA_HEADER, value);
                response
            }
        },
    )))
}
