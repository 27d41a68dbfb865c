//! Span export: finished spans go into a bounded queue; one task takes
//! them out in batches, turns them into an OTLP
//! `ExportTraceServiceRequest` and POSTs it (protobuf) to the collector,
//! by default the control plane's `/v1/traces`.
//!
//! ```text
//! request path ── SpanExporter::submit ──► queue (bounded; full → drop + count)
//!                                            │
//!     exporter task: up to BATCH spans or FLUSH_INTERVAL ─► OTLP protobuf ─► POST
//!                                                     (fails → drop batch + count)
//! ```
//!
//! The request path never waits: a slow or dead collector fills the queue
//! and further spans are dropped and counted in
//! `meshlet_spans_dropped_total{reason="queue_full"}`, so memory stays
//! bounded by the queue capacity and latency does not change.

use std::sync::Arc;
use std::time::Duration;

use http::Uri;
use meshlet_api::otlp;
use prometheus::IntCounter;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::encode::{self, ResourceAttributes};
use super::SpanRecord;

/// Spans per export request at most.
const BATCH: usize = 512;
/// How long a span waits for its batch to fill before it is sent anyway.
const FLUSH_INTERVAL: Duration = Duration::from_millis(500);
/// How often a filling batch takes what is queued (at 50 000 spans/s,
/// 500 spans: well within the default queue of 2048).
const POLL: Duration = Duration::from_millis(10);
/// How long one export may take before the batch is given up.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// How often repeated export failures are logged.
const FAILURE_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// Where spans are sent: an OTLP/HTTP traces URL, and the client that
/// sends them (plain HTTP for a collector, the control plane's TLS client
/// with the sidecar's token for the control plane).
#[derive(Debug, Clone, serde::Serialize)]
pub struct ExportEndpoint {
    /// `host:port`.
    pub authority: String,
    pub path: String,
    /// HTTPS with the mesh CA and the token (the control plane).
    pub tls: bool,
    #[serde(skip)]
    client: meshlet_client::Client,
    /// For the control plane: where each export goes now (the replica
    /// the sidecar uses; `authority` is the first one's).
    #[serde(skip)]
    follow: Option<Follow>,
}

/// The `host:port` and pinned address of the replica to export to now
/// (the control plane's replicas, as the sidecar's control client sees
/// them; a closure so that telemetry imports nothing of `control`).
#[derive(Clone)]
pub struct Follow(std::sync::Arc<dyn Fn() -> (String, Option<std::net::SocketAddr>) + Send + Sync>);

impl std::fmt::Debug for Follow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Follow(the current control-plane replica)")
    }
}

impl ExportEndpoint {
    /// An `http://` URL. One with no path gets OTLP's `/v1/traces`, like
    /// an OpenTelemetry SDK's base endpoint; one with a path is used as is.
    pub fn parse(url: &str) -> Result<Self, String> {
        let uri: Uri = url
            .parse()
            .map_err(|e| format!("{url:?} is not a URL: {e}"))?;
        if uri.scheme_str() != Some("http") {
            return Err(format!(
                "{url:?}: only http:// trace endpoints are supported"
            ));
        }
        let authority = uri
            .authority()
            .ok_or_else(|| format!("{url:?} has no host"))?;
        let host_port = match authority.port_u16() {
            Some(_) => authority.to_string(),
            None => format!("{}:80", authority.host()),
        };
        let path = match uri.path() {
            "" | "/" => otlp::TRACES_PATH.to_owned(),
            path => path.to_owned(),
        };
        Ok(ExportEndpoint {
            authority: host_port,
            path,
            tls: false,
            client: meshlet_client::Client::new().user_agent("meshlet-sidecar"),
            follow: None,
        })
    }

    /// The control plane's `/v1/traces` at `authority`, through its
    /// `client` (TLS with the mesh CA, the sidecar's token).
    pub fn control_plane(authority: &str, client: meshlet_client::Client) -> Self {
        ExportEndpoint {
            authority: authority.to_owned(),
            path: otlp::TRACES_PATH.to_owned(),
            tls: client.is_tls(),
            client,
            follow: None,
        }
    }

    /// Each export goes where `current` says (the control plane's
    /// current replica) instead of `authority`.
    pub fn following(
        mut self,
        current: impl Fn() -> (String, Option<std::net::SocketAddr>) + Send + Sync + 'static,
    ) -> Self {
        self.follow = Some(Follow(std::sync::Arc::new(current)));
        self
    }
}

impl std::fmt::Display for ExportEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.tls { "https" } else { "http" };
        write!(f, "{scheme}://{}{}", self.authority, self.path)
    }
}

/// Who exports: the OTLP resource attributes of this sidecar's spans.
#[derive(Debug, Clone)]
pub struct ExporterIdentity {
    pub service: String,
    pub namespace: String,
    pub instance_id: String,
}

/// The counters the exporter keeps.
#[derive(Debug, Clone)]
pub struct ExportCounters {
    pub exported: IntCounter,
    pub dropped_queue_full: IntCounter,
    pub dropped_export_failed: IntCounter,
}

/// The request path's handle: cheap to clone, never blocks.
#[derive(Debug, Clone)]
pub struct SpanExporter {
    queue: mpsc::Sender<SpanRecord>,
    dropped_queue_full: IntCounter,
}

impl SpanExporter {
    /// Queues `span`, or drops and counts it when the queue is full.
    pub fn submit(&self, span: SpanRecord) {
        if self.queue.try_send(span).is_err() {
            self.dropped_queue_full.inc();
        }
    }
}

/// Starts the exporter task; when `stop` turns true it sends what is
/// queued, then ends (await the handle to let it finish).
pub fn spawn(
    endpoint: ExportEndpoint,
    identity: ExporterIdentity,
    queue_capacity: usize,
    counters: ExportCounters,
    stop: watch::Receiver<bool>,
) -> (SpanExporter, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(queue_capacity.max(1));
    let exporter = SpanExporter {
        queue: tx,
        dropped_queue_full: counters.dropped_queue_full.clone(),
    };
    let task = ExportTask {
        endpoint,
        resource: Arc::new(resource(&identity)),
        counters,
        last_failure_log: None,
    };
    (exporter, tokio::spawn(task.run(rx, stop)))
}

struct ExportTask {
    endpoint: ExportEndpoint,
    resource: Arc<ResourceAttributes>,
    counters: ExportCounters,
    last_failure_log: Option<Instant>,
}

impl ExportTask {
    async fn run(mut self, mut queue: mpsc::Receiver<SpanRecord>, mut stop: watch::Receiver<bool>) {
        let mut batch = Vec::with_capacity(BATCH);
        loop {
            // Wait for a first span, then give the batch FLUSH_INTERVAL to fill.
            tokio::select! {
                received = queue.recv_many(&mut batch, BATCH) => {
                    if received == 0 {
                        return;
                    }
                }
                _ = stop.wait_for(|stop| *stop) => break,
            }
            // Then collect without being woken per span (a wake-up per
            // span costs the proxy thread more than the span itself):
            // look at the queue every POLL until the batch is full or
            // FLUSH_INTERVAL has passed.
            let flush_at = Instant::now() + FLUSH_INTERVAL;
            loop {
                while batch.len() < BATCH {
                    match queue.try_recv() {
                        Ok(span) => batch.push(span),
                        Err(_) => break,
                    }
                }
                let now = Instant::now();
                if batch.len() >= BATCH || now >= flush_at {
                    break;
                }
                tokio::time::sleep_until(flush_at.min(now + POLL)).await;
            }
            self.export(&mut batch).await;
        }
        // Shutting down: send what is already queued, once.
        while let Ok(span) = queue.try_recv() {
            batch.push(span);
            if batch.len() == BATCH {
                self.export(&mut batch).await;
            }
        }
        if !batch.is_empty() {
            self.export(&mut batch).await;
        }
    }

    async fn export(&mut self, batch: &mut Vec<SpanRecord>) {
        let count = batch.len() as u64;
        // Encoding a full batch takes a few hundred microseconds: off the
        // thread that proxies.
        let spans = std::mem::replace(batch, Vec::with_capacity(BATCH));
        let resource = Arc::clone(&self.resource);
        let encoded =
            tokio::task::spawn_blocking(move || encode::export_request(&resource, &spans)).await;
        let Ok(body) = encoded else {
            self.counters.dropped_export_failed.inc_by(count);
            return;
        };
        let sent = self.post(body).await;
        let failure = match sent {
            Ok(status) if status.is_success() => {
                self.counters.exported.inc_by(count);
                if self.last_failure_log.take().is_some() {
                    tracing::info!(endpoint = %self.endpoint, "span export works again");
                }
                return;
            }
            Ok(status) => format!("collector answered {status}"),
            Err(error) => error.to_string(),
        };
        self.counters.dropped_export_failed.inc_by(count);
        let log_now = self
            .last_failure_log
            .is_none_or(|at| at.elapsed() >= FAILURE_LOG_INTERVAL);
        if log_now {
            tracing::warn!(endpoint = %self.endpoint, spans = count, error = %failure,
                "span export failed; dropping the batch (counted in meshlet_spans_dropped_total)");
            self.last_failure_log = Some(Instant::now());
        }
    }
}

impl ExportTask {
    /// POSTs one encoded batch; the status once the whole answer was read.
    async fn post(&self, body: Vec<u8>) -> Result<http::StatusCode, meshlet_client::ClientError> {
        let endpoint = &self.endpoint;
        let (authority, addr) = match &endpoint.follow {
            Some(Follow(current)) => current(),
            None => (endpoint.authority.clone(), None),
        };
        let request = meshlet_client::request(http::Method::POST, &authority, &endpoint.path)
            .header(http::header::CONTENT_TYPE, otlp::PROTOBUF_CONTENT_TYPE)
            .body(http_body_util::Full::new(bytes::Bytes::from(body)))
            .map_err(|source| meshlet_client::ClientError::Request {
                authority: authority.clone(),
                source,
            })?;
        let reply = endpoint
            .client
            .clone()
            .connect_to(addr)
            .timeout(EXPORT_TIMEOUT)
            .fetch(&authority, request)
            .await?;
        Ok(reply.status)
    }
}

fn resource(identity: &ExporterIdentity) -> ResourceAttributes {
    ResourceAttributes(vec![
        ("service.name", identity.service.clone()),
        ("service.namespace", identity.namespace.clone()),
        ("service.instance.id", identity.instance_id.clone()),
        ("telemetry.sdk.name", "meshlet-sidecar".to_owned()),
        (
            "telemetry.sdk.version",
            env!("CARGO_PKG_VERSION").to_owned(),
        ),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_like_an_otlp_sdk() {
        let base = ExportEndpoint::parse("http://127.0.0.1:15010").unwrap();
        assert_eq!(base.authority, "127.0.0.1:15010");
        assert_eq!(base.path, "/v1/traces");
        let full = ExportEndpoint::parse("http://collector:4318/custom/traces").unwrap();
        assert_eq!(
            (full.authority.as_str(), full.path.as_str()),
            ("collector:4318", "/custom/traces")
        );
        assert_eq!(
            ExportEndpoint::parse("http://collector/")
                .unwrap()
                .authority,
            "collector:80"
        );
        assert!(ExportEndpoint::parse("https://collector:4318").is_err());
        assert!(ExportEndpoint::parse("not a url").is_err());
    }
}
