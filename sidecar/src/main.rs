//! The `sidecar` binary: parse flags, load config, bind, run until
//! SIGTERM/SIGINT (SIGHUP reloads a `--config` file), drain, exit. Everything else lives in the library.
//! `sidecar init-iptables ...` instead installs the transparent-mode nat
//! rules (`meshlet_sidecar::iptables`) and exits.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use meshlet_sidecar::cli::{Args, LogFormat};
use meshlet_sidecar::error::StartupError;
use meshlet_sidecar::iptables::{self, InitArgs};
use meshlet_sidecar::{run, InitialConfig, Listeners};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == "init-iptables")
    {
        // `init-iptables` stands in for the program name of its own parser.
        return iptables::main(InitArgs::parse_from(std::env::args_os().skip(1)));
    }
    let args = Args::parse();
    init_logging(args.log_format);
    let runtime = match build_runtime(args.worker_threads) {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("sidecar: error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(start(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("sidecar: error: {err}");
            // A usage error is the one line above, like clap's own.
            if !matches!(err, StartupError::Usage(_)) {
                tracing::error!(error = %err, "sidecar did not start");
            }
            match err {
                StartupError::Config(_)
                | StartupError::ReadConfig { .. }
                | StartupError::Usage(_)
                | StartupError::Certificate(_)
                | StartupError::Unsupported(_) => ExitCode::from(2),
                StartupError::Bind { .. } => ExitCode::FAILURE,
            }
        }
    }
}

async fn start(args: Args) -> Result<(), StartupError> {
    // First, so that a SIGHUP during start-up (a config management tool
    // reloading everything) does not kill the process: it reloads once
    // the sidecar runs.
    let reloads = reload_signal();
    let settings = args.settings()?;
    let initial = match &settings.control_plane {
        Some(cp) => InitialConfig::persisted(&cp.snapshot_file),
        None => InitialConfig::standalone(args.config.as_deref())?,
    };
    let listeners = Listeners::bind(&settings).await?;
    run(settings, initial, listeners, shutdown_signal(), reloads).await;
    Ok(())
}

/// One message per SIGHUP: reload the `--config` file.
fn reload_signal() -> tokio::sync::mpsc::UnboundedReceiver<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    match signal(SignalKind::hangup()) {
        Ok(mut hangup) => {
            tokio::spawn(async move {
                while hangup.recv().await.is_some() {
                    tracing::info!("SIGHUP received: reloading the configuration");
                    if tx.send(()).is_err() {
                        return;
                    }
                }
            });
        }
        Err(error) => {
            tracing::warn!(%error, "cannot listen for SIGHUP; configuration reload disabled")
        }
    }
    rx
}

/// One thread by default, like Linkerd's proxy: a sidecar shares its pod's
/// CPU with the app, and one thread avoids cross-thread wake-ups on the
/// request path (measured: ~10% less CPU per request than two threads on
/// the benchmark). `--worker-threads N` uses N threads for busy services.
fn build_runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(threads);
        builder
    };
    builder.enable_all().build()
}

/// Completes on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour only on a terminal: log files stay free of escape codes.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
