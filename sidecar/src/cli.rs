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

use crate::error::StartupError;
use crate::settings::{ControlPlaneSettings, Limits, Observability, Settings};
use crate::telemetry::trace::export::ExportEndpoint;

pub use crate::settings::Mode;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// meshlet sidecar: proxies a service's inbound and outbound HTTP.
#[derive(Debug, Parser)]
#[command(
    name = "sidecar",
    version,
    after_help = "Transparent mode: `sidecar init-iptables --help` for the nat rules that redirect a pod's TCP here."
)]
pub struct Args {
    /// Name of the service this sidecar stands next to.
    #[arg(long, env = "MESHLET_SERVICE")]
    pub service: String,
    /// Namespace of the service.
    #[arg(long, env = "MESHLET_NAMESPACE", default_value = "default")]
    pub namespace: String,
    /// Labels of this instance, e.g. `version=v2,zone=a` (registered with
    /// the control plane; traffic splits select on them).
    #[arg(long, env = "MESHLET_LABELS", value_delimiter = ',', value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
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

    /// Control plane URL, e.g. http://127.0.0.1:15010: register this
    /// instance there and route with the configuration it pushes.
    #[arg(long, env = "MESHLET_CONTROL_PLANE", conflicts_with = "config")]
    pub control_plane: Option<String>,
    /// Standalone mode: YAML file with `kind: Service` resources and
    /// policies (reloaded on SIGHUP).
    #[arg(long, env = "MESHLET_CONFIG")]
    pub config: Option<PathBuf>,
    /// Id of this instance in the registry [default: SERVICE-IP-PORT of
    /// the advertised address; the pod name on Kubernetes].
    #[arg(long, env = "MESHLET_INSTANCE_ID")]
    pub instance_id: Option<String>,
    /// IP other sidecars use to reach this one [default: the inbound IP,
    /// or 127.0.0.1 when that is 0.0.0.0; the pod IP on Kubernetes].
    #[arg(long, env = "MESHLET_ADVERTISE_IP")]
    pub advertise_ip: Option<IpAddr>,
    /// Where the last configuration from the control plane is kept, so a
    /// restart while the control plane is down still routes [default:
    /// TMPDIR/meshlet-INSTANCE_ID.snapshot.json].
    #[arg(long, env = "MESHLET_SNAPSHOT_FILE")]
    pub snapshot_file: Option<PathBuf>,
    /// With a control plane: how often this sidecar reports its request
    /// counts, latencies, breaker states and rate-limit refusals there
    /// (for the dashboard; 0s = never).
    #[arg(long, env = "MESHLET_STATS_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    pub stats_interval: Duration,
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

    /// Trace requests: join or start W3C traces, pass `traceparent` on,
    /// record spans (`off`: headers pass through untouched).
    #[arg(long, env = "MESHLET_TRACING", value_enum, default_value_t = Switch::On)]
    pub tracing: Switch,

    /// OTLP/HTTP collector for spans (`http://HOST:PORT[/path]`; no path
    /// means `/v1/traces`). Default: the control plane. `none`: keep no spans.
    #[arg(long, env = "MESHLET_TRACE_ENDPOINT")]
    pub trace_endpoint: Option<String>,

    /// Spans waiting for export at most; more are dropped and counted.
    #[arg(long, env = "MESHLET_TRACE_QUEUE", default_value_t = 2048)]
    pub trace_queue: usize,

    /// Print one JSON line per request to standard output.
    #[arg(long, env = "MESHLET_ACCESS_LOG")]
    pub access_log: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Switch {
    On,
    Off,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("{e} (examples: 250ms, 2s, 1m)"))
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.trim().is_empty() => {
            Ok((key.trim().to_owned(), value.trim().to_owned()))
        }
        _ => Err(format!("{text:?} is not a label; write key=value")),
    }
}

/// `http://host:port` (or `host:port`) → `host:port`.
fn control_plane_authority(url: &str) -> Result<String, StartupError> {
    let invalid = |why: &str| StartupError::Usage(format!("--control-plane {url:?}: {why}"));
    let uri: http::Uri = url
        .parse()
        .map_err(|_| invalid("not a URL; expected http://HOST:PORT"))?;
    match uri.scheme_str() {
        None | Some("http") => {}
        Some(other) => {
            return Err(invalid(&format!(
                "scheme {other}:// is not supported; use http://"
            )))
        }
    }
    let authority = uri
        .authority()
        .ok_or_else(|| invalid("no host; expected http://HOST:PORT"))?;
    Ok(format!(
        "{}:{}",
        authority.host(),
        authority.port_u16().unwrap_or(15010)
    ))
}

impl Args {
    pub fn settings(&self) -> Result<Settings, StartupError> {
        let inbound_addr = SocketAddr::new(self.inbound_ip, self.inbound_port);
        let control_plane = match &self.control_plane {
            None => None,
            Some(url) => {
                let ip = self
                    .advertise_ip
                    .unwrap_or(if self.inbound_ip.is_unspecified() {
                        IpAddr::V4(Ipv4Addr::LOCALHOST)
                    } else {
                        self.inbound_ip
                    });
                let advertise_addr = SocketAddr::new(ip, self.inbound_port);
                let instance_id = self.instance_id.clone().unwrap_or_else(|| {
                    format!("{}-{}-{}", self.service, ip, self.inbound_port)
                        .replace([':', '.'], "-")
                });
                if !meshlet_api::mesh::valid_instance_id(&instance_id) {
                    return Err(StartupError::Usage(format!(
                        "--instance-id {instance_id:?}: use 1-253 characters from A-Z a-z 0-9 . _ -"
                    )));
                }
                let snapshot_file = self.snapshot_file.clone().unwrap_or_else(|| {
                    std::env::temp_dir().join(format!("meshlet-{instance_id}.snapshot.json"))
                });
                Some(ControlPlaneSettings {
                    url: url.clone(),
                    authority: control_plane_authority(url)?,
                    instance_id,
                    advertise_addr,
                    snapshot_file,
                    stats_interval: (!self.stats_interval.is_zero()).then_some(self.stats_interval),
                })
            }
        };
        let trace_endpoint = match self.trace_endpoint.as_deref() {
            Some("none") => None,
            Some(url) => Some(url.to_owned()),
            None => control_plane
                .as_ref()
                .map(|cp| format!("http://{}", cp.authority)),
        };
        let trace_endpoint = trace_endpoint
            .map(|url| {
                ExportEndpoint::parse(&url)
                    .map_err(|why| StartupError::Usage(format!("--trace-endpoint {why}")))
            })
            .transpose()?;
        let observability = Observability {
            tracing: self.tracing == Switch::On,
            trace_endpoint,
            trace_queue: self.trace_queue,
            access_log: self.access_log,
        };
        Ok(Settings {
            mode: self.mode,
            observability,
            service: self.service.clone(),
            namespace: self.namespace.clone(),
            labels: self.labels.iter().cloned().collect(),
            control_plane,
            app_addr: SocketAddr::new(self.app_host, self.app_port),
            inbound_addr,
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
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_plane_url_forms() {
        assert_eq!(
            control_plane_authority("http://127.0.0.1:15010").unwrap(),
            "127.0.0.1:15010"
        );
        assert_eq!(
            control_plane_authority("http://meshlet-control-plane.meshlet").unwrap(),
            "meshlet-control-plane.meshlet:15010"
        );
        assert_eq!(control_plane_authority("cp:9000").unwrap(), "cp:9000");
        assert!(control_plane_authority("https://cp:9000").is_err());
        assert!(control_plane_authority("http://").is_err());
    }

    #[test]
    fn defaults_derive_instance_id_and_advertise_address() {
        let args = Args::parse_from([
            "sidecar",
            "--service",
            "orders",
            "--app-port",
            "8080",
            "--inbound-port",
            "18006",
            "--control-plane",
            "http://127.0.0.1:15010",
            "--labels",
            "version=v2,zone=a",
        ]);
        let settings = args.settings().unwrap();
        let cp = settings.control_plane.unwrap();
        assert_eq!(cp.instance_id, "orders-127-0-0-1-18006");
        assert_eq!(cp.advertise_addr.to_string(), "127.0.0.1:18006");
        assert_eq!(settings.labels["version"], "v2");
        assert_eq!(settings.labels["zone"], "a");
        assert_eq!(cp.stats_interval, Some(Duration::from_secs(5)));
        assert!(Args::try_parse_from([
            "sidecar",
            "--service",
            "a",
            "--app-port",
            "1",
            "--labels",
            "novalue"
        ])
        .is_err());
    }
}
