//! The `control-plane` binary's settings, startup and shutdown.
//!
//! Startup: check the data directory → open the redb store → load it into
//! the controller → bind the listener → serve the API (with the OTLP
//! receiver and its in-memory trace store) and run the reaper.
//! SIGTERM/SIGINT flips one shutdown flag that ends the watch streams, the
//! reaper and (gracefully) the HTTP server. Any startup failure is a
//! [`StartupError`] that `main` prints as one line.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use tokio::sync::watch;

use crate::api::router;
use crate::controller::Controller;
use crate::error::StartupError;
use crate::events::Activity;
use crate::state::AppState;
use crate::stats::StatsStore;
use crate::store::RedbStore;
use crate::traces::{TraceLimits, TraceStore};

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

fn parse_capacity(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
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
    /// Where the durable store (meshlet.redb) lives.
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
}

impl Settings {
    pub fn trace_limits(&self) -> TraceLimits {
        TraceLimits {
            capacity: self.trace_capacity,
            retention: self.trace_retention,
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

/// Creates the data directory and proves it writable.
fn check_data_dir(dir: &Path) -> Result<(), StartupError> {
    let fail = |source| StartupError::DataDir {
        path: dir.to_owned(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(fail)?;
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
    let store = RedbStore::open(&settings.data_dir)?;
    let controller = Arc::new(Controller::load(Arc::new(store), settings.ttl)?);
    let (stop, stopped) = watch::channel(false);
    let external_stop = stop.clone();
    let external = tokio::spawn(async move {
        shutdown.await;
        tracing::info!("shutting down");
        external_stop.send_replace(true);
    });
    let listen = listener.local_addr().unwrap_or(settings.listen);
    tracing::info!(
        listen = %listen,
        data_dir = %settings.data_dir.display(),
        revision = controller.published().revision,
        instances = controller.published().instances.len(),
        ttl = ?settings.ttl,
        "control plane ready"
    );
    let shutdown = stopped;
    let reaper = tokio::spawn(controller.clone().run_reaper(shutdown.clone()));
    let stats = Arc::new(StatsStore::new());
    let forget = tokio::spawn(crate::dashboard::forget_departed(
        controller.clone(),
        stats.clone(),
        shutdown.clone(),
    ));
    let app = router(AppState {
        controller,
        stats,
        activity: Activity::default(),
        keepalive: settings.keepalive,
        shutdown: shutdown.clone(),
        traces: Arc::new(TraceStore::new(settings.trace_limits())),
    });
    let mut server_shutdown = shutdown;
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            crate::push::stopped(&mut server_shutdown).await;
        })
        .await
        .map_err(StartupError::Serve);
    stop.send_replace(true);
    external.abort();
    let _ = reaper.await;
    let _ = forget.await;
    served
}
