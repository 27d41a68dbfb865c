//! The sidecar's command line. Every flag can also be set through an
//! environment variable `MESHLET_*` (design.md), which is how the Kubernetes
//! injector will configure it.
//!
//! The CLI is parsed once in `main` and turned into a [`crate::Settings`];
//! nothing else in the crate reads flags or the environment, so tests build
//! `Settings` directly.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use crate::settings::{Limits, Settings};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// The app sends its outgoing calls to the outbound listener itself
    /// (HTTP_PROXY, or a plain request whose Host names a service).
    Explicit,
    /// iptables redirects all TCP through the sidecar (not yet implemented).
    Transparent,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// meshlet sidecar: proxies a service's inbound and outbound HTTP.
#[derive(Debug, Parser)]
#[command(name = "sidecar", version)]
pub struct Args {
    /// Name of the service this sidecar stands next to.
    #[arg(long, env = "MESHLET_SERVICE")]
    pub service: String,
    /// Port where the local app listens; inbound traffic is forwarded there.
    #[arg(long, env = "MESHLET_APP_PORT")]
    pub app_port: u16,
    /// Address of the local app.
    #[arg(long, env = "MESHLET_APP_HOST", default_value_t = IpAddr::V4(Ipv4Addr::LOCALHOST))]
    pub app_host: IpAddr,

    /// Inbound listener port (traffic to the app).
    #[arg(long, env = "MESHLET_INBOUND_PORT", default_value_t = 15006)]
    pub inbound_port: u16,
    /// Address the inbound listener binds to.
    #[arg(long, env = "MESHLET_INBOUND_IP", default_value_t = IpAddr::V4(Ipv4Addr::UNSPECIFIED))]
    pub inbound_ip: IpAddr,
    /// Outbound listener port (the app's outgoing traffic).
    #[arg(long, env = "MESHLET_OUTBOUND_PORT", default_value_t = 15001)]
    pub outbound_port: u16,
    /// Address the outbound listener binds to (local app only by default).
    #[arg(long, env = "MESHLET_OUTBOUND_IP", default_value_t = IpAddr::V4(Ipv4Addr::LOCALHOST))]
    pub outbound_ip: IpAddr,
    /// Admin port: /live, /ready, /config_dump, /metrics.
    #[arg(long, env = "MESHLET_ADMIN_PORT", default_value_t = 15020)]
    pub admin_port: u16,
    /// Address the admin listener binds to (localhost by default).
    #[arg(long, env = "MESHLET_ADMIN_IP", default_value_t = IpAddr::V4(Ipv4Addr::LOCALHOST))]
    pub admin_ip: IpAddr,

    /// Control plane URL (arrives with the control plane; see README).
    #[arg(long, env = "MESHLET_CONTROL_PLANE")]
    pub control_plane: Option<String>,
    /// Standalone mode: YAML file with `kind: Service` resources.
    #[arg(long, env = "MESHLET_CONFIG")]
    pub config: Option<PathBuf>,
    /// How outbound traffic reaches the sidecar.
    #[arg(long, env = "MESHLET_MODE", value_enum, default_value_t = Mode::Explicit)]
    pub mode: Mode,

    /// Time allowed to establish an upstream TCP connection.
    #[arg(long, env = "MESHLET_CONNECT_TIMEOUT", default_value = "1s", value_parser = parse_duration)]
    pub connect_timeout: Duration,
    /// Time allowed for an upstream to send response headers (0s = none).
    #[arg(long, env = "MESHLET_UPSTREAM_TIMEOUT", default_value = "15s", value_parser = parse_duration)]
    pub upstream_timeout: Duration,
    /// Time a client has to send a complete request head (slowloris guard).
    #[arg(long, env = "MESHLET_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub header_read_timeout: Duration,
    /// How long a client connection may sit idle between requests.
    #[arg(long, env = "MESHLET_CLIENT_IDLE_TIMEOUT", default_value = "5m", value_parser = parse_duration)]
    pub client_idle_timeout: Duration,
    /// Largest request head accepted, in bytes (431 beyond).
    #[arg(long, env = "MESHLET_MAX_HEADER_BYTES", default_value_t = 64 * 1024)]
    pub max_header_bytes: usize,
    /// How long an idle pooled upstream connection is kept.
    #[arg(long, env = "MESHLET_IDLE_TIMEOUT", default_value = "90s", value_parser = parse_duration)]
    pub idle_timeout: Duration,
    /// A body (either direction) that brings no data this long is failed (0s = never).
    #[arg(long, env = "MESHLET_STREAM_IDLE_TIMEOUT", default_value = "5m", value_parser = parse_duration)]
    pub stream_idle_timeout: Duration,
    /// On SIGTERM/SIGINT, how long in-flight requests may take to finish.
    #[arg(long, env = "MESHLET_DRAIN_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub drain_timeout: Duration,

    /// Threads that serve traffic (1 = a single-threaded runtime).
    #[arg(long, env = "MESHLET_WORKER_THREADS", default_value_t = 1)]
    pub worker_threads: usize,

    /// Log format (filter with RUST_LOG, e.g. RUST_LOG=debug).
    #[arg(long, env = "MESHLET_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("{e} (examples: 250ms, 2s, 1m)"))
}

impl Args {
    pub fn settings(&self) -> Settings {
        Settings {
            service: self.service.clone(),
            app_addr: SocketAddr::new(self.app_host, self.app_port),
            inbound_addr: SocketAddr::new(self.inbound_ip, self.inbound_port),
            outbound_addr: SocketAddr::new(self.outbound_ip, self.outbound_port),
            admin_addr: SocketAddr::new(self.admin_ip, self.admin_port),
            drain_timeout: self.drain_timeout,
            limits: Limits {
                connect_timeout: self.connect_timeout,
                upstream_timeout: (!self.upstream_timeout.is_zero())
                    .then_some(self.upstream_timeout),
                header_read_timeout: self.header_read_timeout,
                client_idle_timeout: self.client_idle_timeout,
                max_header_bytes: self.max_header_bytes,
                idle_timeout: self.idle_timeout,
                stream_idle_timeout: (!self.stream_idle_timeout.is_zero())
                    .then_some(self.stream_idle_timeout),
            },
        }
    }
}
