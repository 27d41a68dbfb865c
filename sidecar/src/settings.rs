//! Runtime settings of one sidecar, independent of where they came from
//! (flags, environment, tests). Built once at start-up and shared read-only.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use meshlet_api::mesh::AppProtocol;
use serde::Serialize;

pub use crate::listen::terminate::CertificateFiles;
pub use crate::telemetry::trace::export::ExportEndpoint;

/// How traffic reaches the sidecar.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The app sends its outgoing calls to the outbound listener itself
    /// (HTTP_PROXY, or a plain request whose Host names a service).
    #[default]
    Explicit,
    /// iptables (`sidecar init-iptables`) redirects all TCP in and out
    /// through the listeners, which read the original destination.
    Transparent,
    /// An ingress gateway: no app; the inbound listener takes external
    /// clients (plaintext, or TLS with `--tls-cert`) and routes them by the
    /// `Route`s whose `parentRefs` name this service (`proxy::gateway`).
    Gateway,
}

/// Everything the sidecar needs to know about itself.
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    /// Explicit or transparent.
    pub mode: Mode,
    /// The service this sidecar stands next to.
    pub service: String,
    pub namespace: String,
    /// Labels of this instance (e.g. `version`), sent with its registration.
    pub labels: BTreeMap<String, String>,
    /// Where the local app listens (gateway mode: no app; unused).
    pub app_addr: SocketAddr,
    /// What the app speaks (`--app-protocol`); `None`: what the original
    /// caller spoke (`x-meshlet-orig-proto` on an mTLS hop), else the
    /// version the request arrived in.
    pub app_protocol: Option<AppProtocol>,
    pub inbound_addr: SocketAddr,
    pub outbound_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// How long in-flight requests may take to finish after SIGTERM.
    #[serde(with = "humantime_serde_compat")]
    pub drain_timeout: Duration,
    /// `--busy-poll`: how long the single-threaded runtime polls without
    /// blocking while a response is awaited (zero: never; `upstream::busy_poll`).
    #[serde(with = "humantime_serde_compat")]
    pub busy_poll: Duration,
    /// `--trim-memory-above-mib` in bytes: above this anonymous memory,
    /// memory freed after a burst is given back (zero: never;
    /// `meshlet_netio::memory`).
    pub trim_memory_above_bytes: u64,
    pub limits: Limits,
    /// `None` runs standalone from `--config`.
    pub control_plane: Option<ControlPlaneSettings>,
    pub observability: Observability,
    /// `--xff-trusted-hops`: proxies in front of the inbound listener
    /// trusted to append to `x-forwarded-for` (0: the peer is the client),
    /// for `RateLimitPolicy` `key: clientIP`.
    pub xff_trusted_hops: usize,
    /// Gateway mode: TLS termination and the redirect listener.
    pub gateway: Option<GatewaySettings>,
}

impl Settings {
    /// What this instance registers as.
    pub fn role(&self) -> meshlet_api::mesh::InstanceRole {
        match self.mode {
            Mode::Gateway => meshlet_api::mesh::InstanceRole::Gateway,
            Mode::Explicit | Mode::Transparent => meshlet_api::mesh::InstanceRole::Sidecar,
        }
    }
}

/// What only a gateway has.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GatewaySettings {
    /// `--tls-cert`/`--tls-key` pairs in order (the first is the default
    /// certificate); empty: the inbound listener is plaintext.
    pub certificates: Vec<CertificateFiles>,
    /// `--redirect-port`: a plaintext listener answering 308 to https.
    pub redirect_addr: Option<SocketAddr>,
    /// The certificates loaded at start (`None`: plaintext).
    #[serde(skip)]
    pub tls: Option<std::sync::Arc<crate::listen::terminate::Terminator>>,
}

/// Tracing and access logging.
#[derive(Debug, Clone, Serialize)]
pub struct Observability {
    /// Join/start traces and pass `traceparent` on.
    pub tracing: bool,
    /// Where spans are exported; `None` keeps no spans.
    pub trace_endpoint: Option<ExportEndpoint>,
    /// Spans waiting for export at most.
    pub trace_queue: usize,
    /// One JSON line per request on standard output.
    pub access_log: bool,
}

impl Default for Observability {
    fn default() -> Self {
        Observability {
            tracing: true,
            trace_endpoint: None,
            trace_queue: 2048,
            access_log: false,
        }
    }
}

/// How this sidecar reaches and announces itself to the control plane.
#[derive(Debug, Clone, Serialize)]
pub struct ControlPlaneSettings {
    /// As the user gave it (`https://127.0.0.1:15010`, or several
    /// separated by commas).
    pub url: String,
    /// `host:port` of the first URL.
    pub authority: String,
    /// Every URL, and which replica calls go to now (see
    /// `control::replicas`): every call asks it for its endpoint.
    #[serde(skip)]
    pub replicas: std::sync::Arc<crate::control::replicas::Replicas>,
    /// The mesh CA bundle the control plane's certificate must chain to.
    pub ca_file: PathBuf,
    /// Where the token was read from (`None`: given as a flag or variable).
    pub token_file: Option<PathBuf>,
    /// TLS with the mesh CA only, `Authorization: Bearer` with this
    /// sidecar's token; every call to the control plane goes through it
    /// (callers add their own timeouts). Never dumped: it holds the token.
    #[serde(skip)]
    pub client: meshlet_client::Client,
    /// This instance's id in the registry.
    pub instance_id: String,
    /// Where other sidecars reach this one (its inbound listener).
    pub advertise_addr: SocketAddr,
    /// Where the last applied state is kept across restarts.
    pub snapshot_file: PathBuf,
    /// How often stats are reported (`stats`); `None`: never.
    #[serde(with = "humantime_serde_compat::option")]
    pub stats_interval: Option<Duration>,
}

/// Protective limits and timeouts applied on both listeners.
#[derive(Debug, Clone, Serialize)]
pub struct Limits {
    #[serde(with = "humantime_serde_compat")]
    pub connect_timeout: Duration,
    /// Deadline for response headers from the upstream; `None` waits forever.
    #[serde(with = "humantime_serde_compat::option")]
    pub upstream_timeout: Option<Duration>,
    #[serde(with = "humantime_serde_compat")]
    pub header_read_timeout: Duration,
    /// An idle client keep-alive connection (HTTP/2: one with no open
    /// stream) is closed after this.
    #[serde(with = "humantime_serde_compat")]
    pub client_idle_timeout: Duration,
    pub max_header_bytes: usize,
    #[serde(with = "humantime_serde_compat")]
    pub idle_timeout: Duration,
    /// A request or response body that brings no data for this long is
    /// failed (the connection is reset), and a client connection whose
    /// writes take no bytes for this long is closed (`meshlet_netio::write_stall`);
    /// `None` waits forever.
    #[serde(with = "humantime_serde_compat::option")]
    pub stream_idle_timeout: Option<Duration>,
    // upstream (issue 16)
    /// Streams one downstream connection may hold at once on shared
    /// upstream HTTP/2 connections; beyond it its requests wait.
    pub upstream_streams_per_client: usize,
    // h2limits: HTTP/2 server limits of both listeners (`listen::h2_guard`).
    /// `SETTINGS_MAX_CONCURRENT_STREAMS` advertised to HTTP/2 clients.
    pub h2_max_concurrent_streams: u32,
    /// `RST_STREAM` frames a client may send per second and connection (0 = no limit).
    pub h2_max_resets_per_second: u32,
    /// `CONTINUATION` frames in one header block (0 = h2's own cap only).
    pub h2_max_continuation_frames: u32,
    /// `SETTINGS` + `PING` frames a client may send per second and connection (0 = no limit).
    pub h2_max_control_frames_per_second: u32,
    /// Interval of the keep-alive PING on HTTP/2 client connections (`None`: off).
    #[serde(with = "humantime_serde_compat::option")]
    pub h2_keepalive_interval: Option<Duration>,
    /// A keep-alive PING unanswered this long closes the connection.
    #[serde(with = "humantime_serde_compat")]
    pub h2_keepalive_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            connect_timeout: Duration::from_secs(1),
            upstream_timeout: Some(Duration::from_secs(15)),
            header_read_timeout: Duration::from_secs(10),
            client_idle_timeout: Duration::from_secs(300),
            max_header_bytes: 64 * 1024,
            idle_timeout: Duration::from_secs(90),
            stream_idle_timeout: Some(Duration::from_secs(300)),
            upstream_streams_per_client: 100,
            h2_max_concurrent_streams: 100,
            h2_max_resets_per_second: 100,
            h2_max_continuation_frames: 16,
            h2_max_control_frames_per_second: 100,
            h2_keepalive_interval: Some(Duration::from_secs(30)),
            h2_keepalive_timeout: Duration::from_secs(10),
        }
    }
}

/// Durations appear in `/config_dump` the way users write them (`1s`).
mod humantime_serde_compat {
    use std::time::Duration;

    use serde::Serializer;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(*d))
    }

    pub mod option {
        use super::*;

        pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
            match d {
                Some(d) => super::serialize(d, s),
                None => s.serialize_none(),
            }
        }
    }
}
