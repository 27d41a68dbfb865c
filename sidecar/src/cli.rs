//! The sidecar's command line. Every flag can also be set through an
//! environment variable `MESHLET_*` (design.md), which is how the Kubernetes
//! injector will configure it.
//!
//! The CLI is parsed once in `main` and turned into a [`crate::Settings`];
//! nothing else in the crate reads flags or the environment, so tests build
//! `Settings` directly.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Parser, ValueEnum};
use meshlet_api::mesh::AppProtocol;

use crate::error::StartupError;
use crate::listen::terminate::Terminator;
use crate::settings::{
    CertificateFiles, ControlPlaneSettings, GatewaySettings, Limits, Observability, Settings,
};
use crate::telemetry::trace::export::ExportEndpoint;

pub use crate::settings::Mode;

/// The longest `--busy-poll` window: longer ones only burn CPU (a response
/// that takes longer is not worth spinning for).
const MAX_BUSY_POLL: Duration = Duration::from_millis(100);

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
    /// Port where the local app listens; inbound traffic is forwarded there
    /// (required except with `--mode gateway`, which has no app).
    #[arg(long, env = "MESHLET_APP_PORT")]
    pub app_port: Option<u16>,
    /// Address of the local app.
    #[arg(long, env = "MESHLET_APP_HOST", default_value_t = IpAddr::V4(Ipv4Addr::LOCALHOST))]
    pub app_host: IpAddr,
    /// What the app speaks: `http1` or `h2c` (registered with the control
    /// plane). Requests are converted to it; unset, the app gets the
    /// protocol the original caller used.
    #[arg(long, env = "MESHLET_APP_PROTOCOL")]
    pub app_protocol: Option<AppProtocol>,

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

    /// Control plane URL, `https://HOST[:PORT]` (port 15010 by default):
    /// register this instance there and route with the configuration it
    /// pushes. Several replicas: `URL1,URL2,...` (and a name resolving to
    /// several addresses is one replica per address); the sidecar fails
    /// over to the next when one is unreachable. Needs a token
    /// (`--token-file` or `--token`) and `--ca-file`.
    #[arg(long, env = "MESHLET_CONTROL_PLANE", conflicts_with = "config")]
    pub control_plane: Option<String>,
    /// File holding this sidecar's token for the control plane (read once
    /// at start, surrounding whitespace ignored), e.g. a mounted Secret.
    #[arg(long, env = "MESHLET_TOKEN_FILE", conflicts_with = "token")]
    pub token_file: Option<PathBuf>,
    /// This sidecar's token for the control plane (prefer `--token-file`:
    /// a flag is visible in the process list).
    #[arg(long, env = "MESHLET_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// PEM file of the mesh CA (the control plane's `DATA_DIR/ca.crt`):
    /// the only authority trusted for the control plane's certificate.
    #[arg(long, env = "MESHLET_CA_FILE")]
    pub ca_file: Option<PathBuf>,
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
    /// XDG_RUNTIME_DIR/meshlet/INSTANCE_ID.snapshot.json, else
    /// TMPDIR/meshlet-UID/INSTANCE_ID.snapshot.json, a directory only this
    /// user may write].
    #[arg(long, env = "MESHLET_SNAPSHOT_FILE")]
    pub snapshot_file: Option<PathBuf>,
    /// With a control plane: how often this sidecar reports its request
    /// counts, latencies, breaker states and rate-limit refusals there
    /// (for the dashboard; 0s = never).
    #[arg(long, env = "MESHLET_STATS_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    pub stats_interval: Duration,
    /// How outbound traffic reaches the sidecar; `gateway`: an ingress
    /// gateway (no app; the inbound listener takes external clients and
    /// routes by the `Route`s naming this service).
    #[arg(long, env = "MESHLET_MODE", value_enum, default_value_t = Mode::Explicit)]
    pub mode: Mode,
    /// Gateway: a PEM certificate chain the inbound listener presents
    /// (repeatable, paired in order with `--tls-key`; the first pair is the
    /// default, SNI chooses among them by their DNS names; re-read when the
    /// files change). Without it the gateway listens in plaintext.
    #[arg(long, env = "MESHLET_TLS_CERT", value_delimiter = ',')]
    pub tls_cert: Vec<PathBuf>,
    /// Gateway: the PEM private key of the `--tls-cert` in the same position.
    #[arg(long, env = "MESHLET_TLS_KEY", value_delimiter = ',')]
    pub tls_key: Vec<PathBuf>,
    /// Gateway with `--tls-cert`: also listen on this port (plaintext HTTP)
    /// and answer every request with a 308 redirect to https on the inbound port.
    #[arg(long, env = "MESHLET_REDIRECT_PORT")]
    pub redirect_port: Option<u16>,
    /// Proxies in front of the inbound listener that append the address
    /// they saw to `x-forwarded-for` (0: the connection's peer is the
    /// client): `RateLimitPolicy` `key: clientIP` takes the N-th address
    /// from the right, or the peer when there are fewer.
    #[arg(long, env = "MESHLET_XFF_TRUSTED_HOPS", default_value_t = 0)]
    pub xff_trusted_hops: usize,

    /// Time allowed to establish an upstream TCP connection.
    #[arg(long, env = "MESHLET_CONNECT_TIMEOUT", default_value = "1s", value_parser = parse_duration)]
    pub connect_timeout: Duration,
    /// Time allowed for an upstream to send response headers (0s = none).
    #[arg(long, env = "MESHLET_UPSTREAM_TIMEOUT", default_value = "15s", value_parser = parse_duration)]
    pub upstream_timeout: Duration,
    /// Time a client has to send a complete request head (slowloris guard).
    #[arg(long, env = "MESHLET_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub header_read_timeout: Duration,
    /// How long a client connection may sit idle between requests (HTTP/2:
    /// with no open stream; closed with GOAWAY).
    #[arg(long, env = "MESHLET_CLIENT_IDLE_TIMEOUT", default_value = "5m", value_parser = parse_duration)]
    pub client_idle_timeout: Duration,
    /// Largest request head accepted, in bytes (431 beyond).
    #[arg(long, env = "MESHLET_MAX_HEADER_BYTES", default_value_t = 64 * 1024)]
    pub max_header_bytes: usize,
    /// How long an idle pooled upstream connection is kept.
    #[arg(long, env = "MESHLET_IDLE_TIMEOUT", default_value = "90s", value_parser = parse_duration)]
    pub idle_timeout: Duration,
    /// A body (either direction) that brings no data this long is failed,
    /// a client that takes no response bytes this long is disconnected,
    /// and an HTTP/2 stream whose response waits this long on the client's
    /// flow-control window is reset (0s = never).
    #[arg(long, env = "MESHLET_STREAM_IDLE_TIMEOUT", default_value = "5m", value_parser = parse_duration)]
    pub stream_idle_timeout: Duration,
    /// Streams one client connection may hold at once on shared upstream
    /// HTTP/2 connections; beyond it its requests wait (within their own
    /// timeouts) and other clients are unaffected.
    #[arg(long, env = "MESHLET_UPSTREAM_STREAMS_PER_CLIENT", default_value_t = 100, value_parser = parse_positive)]
    pub upstream_streams_per_client: usize,
    /// HTTP/2 clients (both listeners): streams one connection may have open
    /// at once (SETTINGS_MAX_CONCURRENT_STREAMS).
    #[arg(long, env = "MESHLET_H2_MAX_CONCURRENT_STREAMS", default_value_t = 100)]
    pub h2_max_concurrent_streams: u32,
    /// HTTP/2: streams a client may reset (RST_STREAM) per second on one
    /// connection; beyond it the connection is closed with GOAWAY (rapid
    /// reset, CVE-2023-44487; 0 = no limit).
    #[arg(long, env = "MESHLET_H2_MAX_RESETS_PER_SECOND", default_value_t = 100)]
    pub h2_max_resets_per_second: u32,
    /// HTTP/2: CONTINUATION frames allowed in one header block; beyond it
    /// the connection is closed (h2's own cap, derived from
    /// --max-header-bytes, also applies; 0 = only that one).
    #[arg(long, env = "MESHLET_H2_MAX_CONTINUATION_FRAMES", default_value_t = 16)]
    pub h2_max_continuation_frames: u32,
    /// HTTP/2: SETTINGS and PING frames a client may send per second on
    /// one connection; beyond it the connection is closed (0 = no limit).
    #[arg(
        long,
        env = "MESHLET_H2_MAX_CONTROL_FRAMES_PER_SECOND",
        default_value_t = 100
    )]
    pub h2_max_control_frames_per_second: u32,
    /// HTTP/2: send a keep-alive PING on a client connection that has been
    /// quiet this long (0s = off).
    #[arg(long, env = "MESHLET_H2_KEEPALIVE_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    pub h2_keepalive_interval: Duration,
    /// HTTP/2: close a client connection whose keep-alive PING is not
    /// answered within this.
    #[arg(long, env = "MESHLET_H2_KEEPALIVE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub h2_keepalive_timeout: Duration,
    /// On SIGTERM/SIGINT, how long in-flight requests may take to finish.
    #[arg(long, env = "MESHLET_DRAIN_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub drain_timeout: Duration,

    /// Threads that serve traffic (1 = a single-threaded runtime).
    #[arg(long, env = "MESHLET_WORKER_THREADS", default_value_t = 1)]
    pub worker_threads: usize,

    /// While a request awaits its response, or a kept-alive client its
    /// next request, poll the sockets without blocking for up to this long
    /// (adaptive; 0 = never), so that a quick response or request is read
    /// without waking an idle CPU. Single-threaded runtime only.
    #[arg(long, env = "MESHLET_BUSY_POLL", default_value = "0s", value_parser = parse_duration)]
    pub busy_poll: Duration,

    /// Above this much heap memory (anonymous resident, MiB), give the
    /// memory freed after a burst back to the system, checked every 10 s
    /// (glibc keeps it otherwise; 0 = never).
    #[arg(long, env = "MESHLET_TRIM_MEMORY_ABOVE_MIB", default_value_t = 32)]
    pub trim_memory_above_mib: u64,

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

/// A count of at least one.
fn parse_positive(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) => Err("must be at least 1".to_owned()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
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

/// Reads a token file: its content without surrounding whitespace. An
/// unreadable or empty file is an error; one that group or others may read
/// is only warned about (a Kubernetes Secret volume is 0644 unless its
/// `defaultMode` says otherwise).
pub fn read_token_file(path: &Path) -> Result<String, StartupError> {
    let failed =
        |why: String| StartupError::Usage(format!("--token-file {}: {why}", path.display()));
    let text = std::fs::read_to_string(path).map_err(|e| failed(format!("cannot read it: {e}")))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(failed("the file is empty; it must hold the token".into()));
    }
    if let Ok(meta) = std::fs::metadata(path) {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode();
        if mode & 0o044 != 0 {
            tracing::warn!(file = %path.display(), mode = format!("{:o}", mode & 0o777),
                "the token file is readable by other users; make it 0600 (Kubernetes: defaultMode: 0400 on the Secret volume)");
        }
    }
    Ok(token.to_owned())
}

/// The client for every call to the control plane: TLS trusting only the
/// CA of `ca_file`, and the token as a bearer credential.
fn control_plane_client(
    token: &str,
    ca_file: &Path,
) -> Result<meshlet_client::Client, StartupError> {
    let tls = meshlet_client::client_config_from_ca_file(ca_file)
        .map_err(|e| StartupError::Usage(format!("--ca-file: {e}")))?;
    meshlet_client::Client::new()
        .user_agent(concat!("meshlet-sidecar/", env!("CARGO_PKG_VERSION")))
        .tls(tls)
        .bearer(token)
        .map_err(|_| StartupError::Usage("the token holds characters a header cannot carry".into()))
}

impl Args {
    /// The flags as `Settings`, in phases: the control plane (identity,
    /// snapshot file, credentials), observability, limits.
    pub fn settings(&self) -> Result<Settings, StartupError> {
        let control_plane = match &self.control_plane {
            None => None,
            Some(url) => Some(self.control_plane_settings(url)?),
        };
        let observability = self.observability(control_plane.as_ref())?;
        let gateway = self.gateway()?;
        if self.busy_poll > MAX_BUSY_POLL {
            return Err(StartupError::Usage(format!(
                "--busy-poll {}: at most {} (it is how long the sidecar may poll instead of sleeping \
                 while a response or a next request is awaited; a few hundred microseconds is the useful \
                 range)",
                humantime::format_duration(self.busy_poll),
                humantime::format_duration(MAX_BUSY_POLL),
            )));
        }
        let app_port =
            match (self.app_port, self.mode) {
                (Some(port), _) => port,
                (None, Mode::Gateway) => 0,
                (None, _) => return Err(StartupError::Usage(
                    "--app-port PORT (MESHLET_APP_PORT) is required, except with --mode gateway"
                        .into(),
                )),
            };
        Ok(Settings {
            mode: self.mode,
            xff_trusted_hops: self.xff_trusted_hops,
            gateway,
            observability,
            service: self.service.clone(),
            namespace: self.namespace.clone(),
            labels: self.labels.iter().cloned().collect(),
            control_plane,
            app_addr: SocketAddr::new(self.app_host, app_port),
            app_protocol: self.app_protocol,
            inbound_addr: SocketAddr::new(self.inbound_ip, self.inbound_port),
            outbound_addr: SocketAddr::new(self.outbound_ip, self.outbound_port),
            admin_addr: SocketAddr::new(self.admin_ip, self.admin_port),
            drain_timeout: self.drain_timeout,
            busy_poll: self.busy_poll,
            trim_memory_above_bytes: self.trim_memory_above_mib.saturating_mul(1 << 20),
            limits: self.limits(),
        })
    }

    /// Gateway mode: the certificate pairs and the redirect listener; the
    /// gateway's flags anywhere else are an error.
    fn gateway(&self) -> Result<Option<GatewaySettings>, StartupError> {
        if self.mode != Mode::Gateway {
            if !self.tls_cert.is_empty() || !self.tls_key.is_empty() {
                return Err(StartupError::Usage(
                    "--tls-cert/--tls-key are for --mode gateway (the mesh hop's TLS needs no files)".into(),
                ));
            }
            if self.redirect_port.is_some() {
                return Err(StartupError::Usage(
                    "--redirect-port is for --mode gateway".into(),
                ));
            }
            return Ok(None);
        }
        if self.tls_cert.len() != self.tls_key.len() {
            return Err(StartupError::Usage(format!(
                "{} --tls-cert and {} --tls-key: give them in pairs (certificate, then its key)",
                self.tls_cert.len(),
                self.tls_key.len()
            )));
        }
        if self.redirect_port.is_some() && self.tls_cert.is_empty() {
            return Err(StartupError::Usage(
                "--redirect-port sends clients to https: it needs --tls-cert and --tls-key".into(),
            ));
        }
        if self.redirect_port == Some(self.inbound_port) {
            return Err(StartupError::Usage(
                "--redirect-port must differ from --inbound-port".into(),
            ));
        }
        let certificates: Vec<CertificateFiles> = self
            .tls_cert
            .iter()
            .zip(&self.tls_key)
            .map(|(cert, key)| CertificateFiles {
                cert: cert.clone(),
                key: key.clone(),
            })
            .collect();
        let tls = match certificates.is_empty() {
            true => None,
            false => Some(std::sync::Arc::new(Terminator::load(&certificates)?)),
        };
        Ok(Some(GatewaySettings {
            tls,
            certificates,
            redirect_addr: self
                .redirect_port
                .map(|port| SocketAddr::new(self.inbound_ip, port)),
        }))
    }

    /// Where this instance registers, as what, with which credentials, and
    /// where it keeps its last configuration.
    fn control_plane_settings(&self, url: &str) -> Result<ControlPlaneSettings, StartupError> {
        let ip = self
            .advertise_ip
            .unwrap_or(if self.inbound_ip.is_unspecified() {
                IpAddr::V4(Ipv4Addr::LOCALHOST)
            } else {
                self.inbound_ip
            });
        let advertise_addr = SocketAddr::new(ip, self.inbound_port);
        let instance_id = self.instance_id.clone().unwrap_or_else(|| {
            format!("{}-{}-{}", self.service, ip, self.inbound_port).replace([':', '.'], "-")
        });
        if !meshlet_api::mesh::valid_instance_id(&instance_id) {
            return Err(StartupError::Usage(format!(
                "--instance-id {instance_id:?}: use 1-253 characters from A-Z a-z 0-9 . _ -"
            )));
        }
        let snapshot_file = match &self.snapshot_file {
            Some(file) => file.clone(),
            None => crate::control::persist::default_snapshot_file(&instance_id).map_err(|e| {
                StartupError::Usage(format!(
                    "the default snapshot directory: {e}; remove it, or choose a file with --snapshot-file"
                ))
            })?,
        };
        let urls = crate::control::replicas::parse_urls(url)
            .map_err(|e| StartupError::Usage(e.to_string()))?;
        let authority = urls[0].authority.clone();
        let (token, ca_file) = self.credentials()?;
        let client = control_plane_client(&token, &ca_file)?;
        Ok(ControlPlaneSettings {
            url: url.to_owned(),
            authority,
            replicas: std::sync::Arc::new(crate::control::replicas::Replicas::new(urls)),
            ca_file,
            token_file: self.token_file.clone(),
            client,
            instance_id,
            advertise_addr,
            snapshot_file,
            stats_interval: (!self.stats_interval.is_zero()).then_some(self.stats_interval),
        })
    }

    /// The token (from `--token-file`, else `--token`) and the CA file a
    /// control plane needs.
    fn credentials(&self) -> Result<(String, PathBuf), StartupError> {
        let token = match (&self.token_file, &self.token) {
            (Some(file), _) => read_token_file(file)?,
            (None, Some(token)) if !token.trim().is_empty() => token.trim().to_owned(),
            _ => {
                return Err(StartupError::Usage(
                    "--control-plane needs a token: --token-file FILE (MESHLET_TOKEN_FILE) or --token TOKEN (MESHLET_TOKEN)".into(),
                ))
            }
        };
        let Some(ca_file) = self.ca_file.clone() else {
            return Err(StartupError::Usage(
                "--control-plane needs --ca-file FILE (MESHLET_CA_FILE): the mesh CA, the control plane's DATA_DIR/ca.crt".into(),
            ));
        };
        Ok((token, ca_file))
    }

    /// Tracing, the span exporter's endpoint and the access log. A
    /// collector of the user's choice is plain HTTP and never gets the
    /// token; the default, the control plane, gets the same TLS client.
    fn observability(
        &self,
        control_plane: Option<&ControlPlaneSettings>,
    ) -> Result<Observability, StartupError> {
        let trace_endpoint = match self.trace_endpoint.as_deref() {
            Some("none") => None,
            Some(url) => Some(
                ExportEndpoint::parse(url)
                    .map_err(|why| StartupError::Usage(format!("--trace-endpoint {why}")))?,
            ),
            // Spans follow the replica the sidecar uses.
            None => control_plane.map(|cp| {
                let replicas = std::sync::Arc::clone(&cp.replicas);
                ExportEndpoint::control_plane(&cp.authority, cp.client.clone()).following(
                    move || {
                        let current = replicas.current();
                        (current.authority, current.addr)
                    },
                )
            }),
        };
        Ok(Observability {
            tracing: self.tracing == Switch::On,
            trace_endpoint,
            trace_queue: self.trace_queue,
            access_log: self.access_log,
        })
    }

    /// Deadlines and sizes of the request path (`0s` = none where allowed).
    fn limits(&self) -> Limits {
        let nonzero = |d: Duration| (!d.is_zero()).then_some(d);
        Limits {
            connect_timeout: self.connect_timeout,
            upstream_timeout: nonzero(self.upstream_timeout),
            header_read_timeout: self.header_read_timeout,
            client_idle_timeout: self.client_idle_timeout,
            max_header_bytes: self.max_header_bytes,
            idle_timeout: self.idle_timeout,
            stream_idle_timeout: nonzero(self.stream_idle_timeout),
            upstream_streams_per_client: self.upstream_streams_per_client,
            h2_max_concurrent_streams: self.h2_max_concurrent_streams,
            h2_max_resets_per_second: self.h2_max_resets_per_second,
            h2_max_continuation_frames: self.h2_max_continuation_frames,
            h2_max_control_frames_per_second: self.h2_max_control_frames_per_second,
            h2_keepalive_interval: nonzero(self.h2_keepalive_interval),
            h2_keepalive_timeout: self.h2_keepalive_timeout,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory with a CA PEM (`ca.crt`) and a token file (`token`, 0600).
    fn credentials() -> tempfile::TempDir {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = params.self_signed(&key).unwrap();
        std::fs::write(dir.path().join("ca.crt"), ca.pem()).unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "  s3cret-token\n").unwrap();
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
        dir
    }

    fn args(extra: &[&str]) -> Result<Args, clap::Error> {
        // An explicit snapshot file: the default would create a directory
        // in this user's runtime or temporary directory.
        let mut argv = vec![
            "sidecar",
            "--service",
            "orders",
            "--app-port",
            "8080",
            "--snapshot-file",
            "/nonexistent/snapshot.json",
        ];
        argv.extend_from_slice(extra);
        Args::try_parse_from(argv)
    }

    fn usage(result: Result<Settings, StartupError>) -> String {
        match result {
            Err(StartupError::Usage(message)) => message,
            other => panic!("expected a usage error, got {other:?}"),
        }
    }

    #[test]
    fn a_busy_poll_window_over_100ms_is_a_usage_error() {
        let ok = args(&["--busy-poll", "200us"]).unwrap().settings().unwrap();
        assert_eq!(ok.busy_poll, Duration::from_micros(200));
        let off = args(&[]).unwrap().settings().unwrap();
        assert_eq!(off.busy_poll, Duration::ZERO, "off by default");
        let long = usage(args(&["--busy-poll", "2s"]).unwrap().settings());
        assert!(long.contains("--busy-poll 2s: at most 100ms"), "{long}");
        assert!(args(&["--busy-poll", "fast"]).is_err());
    }

    #[test]
    fn control_plane_url_forms() {
        let authority = |url: &str| {
            crate::control::replicas::parse_urls(url)
                .map(|urls| urls[0].authority.clone())
                .map_err(|e| e.to_string())
        };
        assert_eq!(
            authority("https://127.0.0.1:15010").unwrap(),
            "127.0.0.1:15010"
        );
        assert_eq!(
            authority("https://meshlet-control-plane.meshlet").unwrap(),
            "meshlet-control-plane.meshlet:15010"
        );
        assert_eq!(authority("https://[::1]:9000/").unwrap(), "[::1]:9000");
        let http = authority("http://cp:9000").unwrap_err();
        assert!(http.contains("only HTTPS"), "{http}");
        assert!(authority("cp:9000").is_err(), "no scheme");
        assert!(authority("https://").is_err());
        assert!(authority("https://cp:9000/api").is_err());
        assert!(authority("https://user@cp:9000").is_err());
    }

    #[test]
    fn several_control_planes_are_one_flag_separated_by_commas() {
        let dir = credentials();
        let token = dir.path().join("token");
        let ca = dir.path().join("ca.crt");
        let list = "https://127.0.0.1:15010,https://127.0.0.2:15010, https://cp.mesh";
        let settings = args(&[
            "--control-plane",
            list,
            "--token-file",
            token.to_str().unwrap(),
            "--ca-file",
            ca.to_str().unwrap(),
        ])
        .unwrap()
        .settings()
        .unwrap();
        let cp = settings.control_plane.unwrap();
        assert_eq!(cp.url, list);
        let authorities: Vec<&str> = cp
            .replicas
            .urls()
            .iter()
            .map(|u| u.authority.as_str())
            .collect();
        assert_eq!(
            authorities,
            ["127.0.0.1:15010", "127.0.0.2:15010", "cp.mesh:15010"]
        );
        assert_eq!(cp.replicas.current().authority, "127.0.0.1:15010");
        let bad = "https://127.0.0.1:15010,http://cp:1";
        let message = usage(
            args(&[
                "--control-plane",
                bad,
                "--token-file",
                token.to_str().unwrap(),
                "--ca-file",
                ca.to_str().unwrap(),
            ])
            .unwrap()
            .settings(),
        );
        assert!(message.contains("\"http://cp:1\""), "{message}");
    }

    #[test]
    fn defaults_derive_instance_id_and_advertise_address() {
        let dir = credentials();
        let token = dir.path().join("token");
        let ca = dir.path().join("ca.crt");
        let args = args(&[
            "--inbound-port",
            "18006",
            "--control-plane",
            "https://127.0.0.1:15010",
            "--token-file",
            token.to_str().unwrap(),
            "--ca-file",
            ca.to_str().unwrap(),
            "--labels",
            "version=v2,zone=a",
        ])
        .unwrap();
        let settings = args.settings().unwrap();
        let cp = settings.control_plane.unwrap();
        assert_eq!(cp.instance_id, "orders-127-0-0-1-18006");
        assert_eq!(cp.authority, "127.0.0.1:15010");
        assert_eq!(cp.advertise_addr.to_string(), "127.0.0.1:18006");
        assert!(cp.client.is_tls());
        assert_eq!(settings.labels["version"], "v2");
        assert_eq!(settings.labels["zone"], "a");
        assert_eq!(cp.stats_interval, Some(Duration::from_secs(5)));
        // Spans go to the control plane over the same TLS client.
        let traces = settings.observability.trace_endpoint.unwrap();
        assert_eq!(traces.to_string(), "https://127.0.0.1:15010/v1/traces");
        assert!(args_fail(&["--labels", "novalue"]));
    }

    fn args_fail(extra: &[&str]) -> bool {
        args(extra).is_err()
    }

    #[test]
    fn upstream_streams_per_client_defaults_to_100_and_is_at_least_1() {
        assert_eq!(args(&[]).unwrap().limits().upstream_streams_per_client, 100);
        let set = args(&["--upstream-streams-per-client", "7"]).unwrap();
        assert_eq!(set.limits().upstream_streams_per_client, 7);
        assert!(args_fail(&["--upstream-streams-per-client", "0"]));
    }

    #[test]
    fn a_control_plane_needs_https_a_token_and_a_ca() {
        let dir = credentials();
        let token = dir.path().join("token");
        let ca = dir.path().join("ca.crt");
        let (token, ca) = (token.to_str().unwrap(), ca.to_str().unwrap());
        let cp = ["--control-plane", "https://cp:15010"];

        let no_token = usage(args(&[cp[0], cp[1], "--ca-file", ca]).unwrap().settings());
        assert!(no_token.contains("needs a token"), "{no_token}");
        let no_ca = usage(
            args(&[cp[0], cp[1], "--token-file", token])
                .unwrap()
                .settings(),
        );
        assert!(no_ca.contains("--ca-file"), "{no_ca}");
        let blank = usage(
            args(&[cp[0], cp[1], "--token", "  ", "--ca-file", ca])
                .unwrap()
                .settings(),
        );
        assert!(blank.contains("needs a token"), "{blank}");
        let http = usage(
            args(&[
                "--control-plane",
                "http://cp:15010",
                "--token",
                "t",
                "--ca-file",
                ca,
            ])
            .unwrap()
            .settings(),
        );
        assert!(http.contains("only HTTPS"), "{http}");
        let bad_ca = usage(
            args(&[cp[0], cp[1], "--token", "t", "--ca-file", token])
                .unwrap()
                .settings(),
        );
        assert!(bad_ca.contains("--ca-file"), "{bad_ca}");
        // One token source only.
        assert!(args_fail(&[
            cp[0],
            cp[1],
            "--token",
            "t",
            "--token-file",
            token
        ]));
        // The value form works too.
        let settings = args(&[cp[0], cp[1], "--token", "t", "--ca-file", ca])
            .unwrap()
            .settings()
            .unwrap();
        assert_eq!(settings.control_plane.unwrap().token_file, None);
        // Without a control plane, neither is needed.
        assert!(args(&[])
            .unwrap()
            .settings()
            .unwrap()
            .control_plane
            .is_none());
    }

    #[test]
    fn a_collector_endpoint_stays_plain_and_gets_no_token() {
        let dir = credentials();
        let token = dir.path().join("token");
        let ca = dir.path().join("ca.crt");
        let settings = args(&[
            "--control-plane",
            "https://cp:15010",
            "--token-file",
            token.to_str().unwrap(),
            "--ca-file",
            ca.to_str().unwrap(),
            "--trace-endpoint",
            "http://collector:4318",
        ])
        .unwrap()
        .settings()
        .unwrap();
        let traces = settings.observability.trace_endpoint.unwrap();
        assert!(!traces.tls);
        assert_eq!(traces.to_string(), "http://collector:4318/v1/traces");
        assert!(!format!("{traces:?}").contains("bearer: true"));
    }

    /// A TLS server for `127.0.0.1` whose certificate a fresh CA signed:
    /// answers one request with `{}` and hands over the request head.
    async fn tls_control_plane() -> (String, String, tokio::sync::oneshot::Receiver<String>) {
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from(cert.der().to_vec())],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("https://{}", listener.local_addr().unwrap());
        let (tx, head) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut stream = acceptor.accept(tcp).await.unwrap();
            let mut received = Vec::new();
            let mut buf = [0u8; 4096];
            while !received.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = stream.read(&mut buf).await.unwrap();
                assert!(n > 0, "the client closed early");
                received.extend_from_slice(&buf[..n]);
            }
            let _ = tx.send(String::from_utf8_lossy(&received).to_ascii_lowercase());
            let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}";
            stream.write_all(answer).await.unwrap();
            let _ = stream.shutdown().await;
        });
        (url, ca_pem, head)
    }

    #[tokio::test]
    async fn calls_to_the_control_plane_use_tls_and_the_token() {
        let (url, ca_pem, head) = tls_control_plane().await;
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.crt");
        std::fs::write(&ca, ca_pem).unwrap();
        let settings = args(&[
            "--control-plane",
            &url,
            "--token",
            "t0ken",
            "--ca-file",
            ca.to_str().unwrap(),
        ])
        .unwrap()
        .settings()
        .unwrap();
        let cp = settings.control_plane.unwrap();
        let body = crate::control::call(
            &cp.client,
            &cp.authority,
            http::Method::POST,
            "/api/v1/instances",
            Some(b"{}".to_vec()),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        assert_eq!(&body[..], b"{}");
        let head = head.await.unwrap();
        assert!(
            head.starts_with("post /api/v1/instances http/1.1"),
            "{head}"
        );
        assert!(head.contains("authorization: bearer t0ken\r\n"), "{head}");
        assert!(head.contains("content-type: application/json"), "{head}");
    }

    #[test]
    fn token_files_are_read_trimmed_and_must_hold_a_token() {
        use std::os::unix::fs::PermissionsExt;
        let dir = credentials();
        let path = dir.path().join("token");
        assert_eq!(read_token_file(&path).unwrap(), "s3cret-token");
        // Readable by others: read all the same (a warning is logged).
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(read_token_file(&path).unwrap(), "s3cret-token");
        std::fs::write(&path, " \n\t\n").unwrap();
        let empty = read_token_file(&path).unwrap_err().to_string();
        assert!(empty.contains("empty"), "{empty}");
        let missing = read_token_file(&dir.path().join("nope"))
            .unwrap_err()
            .to_string();
        assert!(missing.contains("cannot read"), "{missing}");
    }
}
