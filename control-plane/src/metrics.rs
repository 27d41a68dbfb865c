//! The control plane's `/metrics` (Prometheus text format).
//!
//! Nothing is counted here: every value is read at scrape time from where
//! it already lives — the published revision (revision, instances,
//! resources), the push hub (open watch streams, an atomic count of
//! snapshots and deltas sent) and the trace store's counters (one short
//! lock), and the workload CA (roots, rotation phase, an atomic count of
//! leaves issued), the controller's expiry pause state and the
//! listener's connection counters (atomics), the dashboard sessions'
//! counters (atomics, `access::sessions`). Each scrape builds fresh metric objects and encodes them, so the
//! push and receive paths carry no metrics code beyond that one atomic.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use prometheus::core::Collector;
use prometheus::proto::MetricFamily;
use prometheus::{IntCounterVec, IntGaugeVec, Opts, TextEncoder};

use crate::access::SessionCounts;
use crate::controller::Controller;
use crate::listener::ConnectionStats;
use crate::traces::TraceStore;
use crate::workload::Workload;

/// The `content-type` of the text format.
pub const CONTENT_TYPE: &str = prometheus::TEXT_FORMAT;

/// Metric families under construction.
#[derive(Default)]
struct Families(Vec<MetricFamily>);

impl Families {
    fn add(&mut self, collector: impl Collector) {
        self.0.extend(collector.collect());
    }

    /// A gauge with one series per `(label value, value)`; no label if
    /// `label` is empty.
    fn gauge(
        &mut self,
        name: &str,
        help: &str,
        label: &str,
        series: &[(&str, i64)],
    ) -> prometheus::Result<()> {
        let labels: &[&str] = if label.is_empty() { &[] } else { &[label] };
        let gauge = IntGaugeVec::new(Opts::new(name, help), labels)?;
        for (value, v) in series {
            gauge.with_label_values(&label_values(label, value)).set(*v);
        }
        self.add(gauge);
        Ok(())
    }

    /// A counter, like [`Families::gauge`].
    fn counter(
        &mut self,
        name: &str,
        help: &str,
        label: &str,
        series: &[(&str, u64)],
    ) -> prometheus::Result<()> {
        let labels: &[&str] = if label.is_empty() { &[] } else { &[label] };
        let counter = IntCounterVec::new(Opts::new(name, help), labels)?;
        for (value, v) in series {
            counter
                .with_label_values(&label_values(label, value))
                .inc_by(*v);
        }
        self.add(counter);
        Ok(())
    }
}

fn label_values<'a>(label: &str, value: &'a str) -> Vec<&'a str> {
    if label.is_empty() {
        vec![]
    } else {
        vec![value]
    }
}

fn count(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The whole `/metrics` page.
pub fn render(
    controller: &Controller,
    traces: &TraceStore,
    workload: &Workload,
    connections: &ConnectionStats,
    sessions: &SessionCounts,
    now: Instant,
) -> prometheus::Result<String> {
    let mut f = Families::default();
    mesh_families(&mut f, controller)?;
    resilience_families(&mut f, controller, connections)?;
    ca_families(&mut f, workload)?;
    trace_families(&mut f, traces, now)?;
    store_families(&mut f, controller)?;
    session_families(&mut f, sessions)?;
    TextEncoder::new().encode_to_string(&f.0)
}

/// The dashboard's cookie requests: refused by reason, and the session
/// reads they cost (etcd gets with `--store etcd`). A forged cookie counts
/// under `mac` and costs no read.
fn session_families(f: &mut Families, sessions: &SessionCounts) -> prometheus::Result<()> {
    let read = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
    f.counter(
        "meshlet_sessions_rejected_total",
        "Dashboard session cookies refused: mac (not signed by this mesh, no store read), \
         unknown (ended or expired), token (its token revoked or expired).",
        "reason",
        &[
            ("mac", read(&sessions.rejected_mac)),
            ("unknown", read(&sessions.rejected_unknown)),
            ("token", read(&sessions.rejected_token)),
        ],
    )?;
    f.counter(
        "meshlet_session_lookups_total",
        "Dashboard session reads from the session store (etcd gets with --store etcd).",
        "",
        &[("", read(&sessions.lookups))],
    )
}

/// `--store etcd`: the store kind, this replica, etcd's health and its
/// failed requests (nothing with redb, whose output stays as it was).
fn store_families(f: &mut Families, controller: &Controller) -> prometheus::Result<()> {
    let Some(etcd) = controller.replica() else {
        return Ok(());
    };
    f.gauge(
        "meshlet_store_kind",
        "The durable store this control plane runs on (info: always 1).",
        "kind",
        &[("etcd", 1)],
    )?;
    f.gauge(
        "meshlet_replica_info",
        "This control-plane replica's id (info: always 1).",
        "replica",
        &[(etcd.replica_id(), 1)],
    )?;
    f.gauge(
        "meshlet_store_up",
        "1 when the last etcd request of this replica succeeded.",
        "",
        &[("", i64::from(etcd.health().up()))],
    )?;
    f.counter(
        "meshlet_store_errors_total",
        "etcd requests of this replica that failed (unreachable, no quorum, timeout).",
        "",
        &[("", etcd.health().errors())],
    )?;
    Ok(())
}

/// The workload CA: roots in the bundle, the rotation phase, leaves issued.
fn ca_families(f: &mut Families, workload: &Workload) -> prometheus::Result<()> {
    let roots = workload.roots();
    let phase = match roots.phase() {
        crate::ca::Phase::Stable => 0,
        crate::ca::Phase::Adding { .. } => 1,
        crate::ca::Phase::Retiring { .. } => 2,
    };
    f.gauge(
        "meshlet_ca_roots",
        "Roots in the trust bundle pushed to sidecars (2 during a rotation).",
        "",
        &[("", count(roots.all().len()))],
    )?;
    f.gauge(
        "meshlet_ca_rotation_phase",
        "0: no rotation; 1: new root trusted, old signs; 2: new root signs, old retiring.",
        "",
        &[("", phase)],
    )?;
    f.gauge(
        "meshlet_leader",
        "1 where this replica leads the role (with redb the one process always does), else 0.",
        "role",
        &[(crate::rotation::ROLE, i64::from(workload.is_leader()))],
    )?;
    f.counter(
        "meshlet_workload_certificates_issued_total",
        "Workload certificates signed since start.",
        "",
        &[("", workload.issued())],
    )
}

/// The published revision and the push hub.
fn mesh_families(f: &mut Families, controller: &Controller) -> prometheus::Result<()> {
    let published = controller.published();
    let hub = controller.hub();
    let healthy = published
        .instances
        .iter_unordered()
        .filter(|i| i.registration.healthy)
        .count();
    let unhealthy = published.instances.len() - healthy;
    let revision = i64::try_from(published.revision).unwrap_or(i64::MAX);

    f.gauge(
        "meshlet_control_plane_revision",
        "The current revision of the mesh state.",
        "",
        &[("", revision)],
    )?;
    f.gauge(
        "meshlet_control_plane_instances",
        "Registered service instances, by reported health.",
        "state",
        &[("healthy", count(healthy)), ("unhealthy", count(unhealthy))],
    )?;
    f.gauge(
        "meshlet_control_plane_resources",
        "Applied resources (policies and static services).",
        "",
        &[("", count(published.resources.len()))],
    )?;
    f.gauge(
        "meshlet_control_plane_watchers",
        "Open watch streams (connected sidecars).",
        "",
        &[("", count(hub.watchers()))],
    )?;
    f.counter(
        "meshlet_control_plane_pushes_total",
        "Snapshots and deltas sent to watchers.",
        "",
        &[("", hub.pushes())],
    )?;
    Ok(())
}

/// Issue 16 (cp): expiry self-preservation and the API's connections.
fn resilience_families(
    f: &mut Families,
    controller: &Controller,
    connections: &ConnectionStats,
) -> prometheus::Result<()> {
    let (paused, pauses) = controller.expiry_paused();
    f.gauge(
        "meshlet_control_plane_expiry_paused",
        "1 while instance expiry is paused because most instances went silent at once.",
        "",
        &[("", i64::from(paused))],
    )?;
    f.counter(
        "meshlet_control_plane_expiry_pauses_total",
        "Times instance expiry paused since start.",
        "",
        &[("", pauses)],
    )?;
    f.gauge(
        "meshlet_control_plane_api_connections",
        "Open connections to the API.",
        "",
        &[("", count(connections.open()))],
    )?;
    f.counter(
        "meshlet_control_plane_api_connections_evicted_total",
        "API connections closed to make room: unproven or idle ones, or to free a descriptor.",
        "",
        &[("", connections.evicted())],
    )
}

/// The trace store's counters.
fn trace_families(f: &mut Families, traces: &TraceStore, now: Instant) -> prometheus::Result<()> {
    let spans = traces.stats(now);
    f.counter(
        "meshlet_spans_received_total",
        "Spans received in OTLP exports, valid or not.",
        "",
        &[("", spans.spans_received)],
    )?;
    f.counter(
        "meshlet_spans_rejected_total",
        "Spans rejected for an invalid trace, span or parent id.",
        "",
        &[("", spans.spans_rejected)],
    )?;
    f.counter(
        "meshlet_spans_dropped_total",
        "Valid spans not kept: their trace was full, they were sent twice, or their trace was evicted for capacity.",
        "reason",
        &[
            ("trace_full", spans.spans_dropped_trace_full),
            ("duplicate", spans.spans_dropped_duplicate),
            ("capacity", spans.spans_dropped_capacity),
        ],
    )?;
    f.counter(
        "meshlet_traces_removed_total",
        "Traces removed from the store: past retention, or evicted for capacity.",
        "reason",
        &[
            ("expired", spans.traces_expired),
            ("evicted", spans.traces_evicted),
        ],
    )?;
    f.gauge(
        "meshlet_traces_stored",
        "Traces held in the trace store.",
        "",
        &[("", count(spans.traces_stored))],
    )?;
    Ok(())
}
