//! The in-memory trace store: spans grouped by trace, bounded three ways.
//!
//! Data flow: [`TraceStore::ingest`] validates an export outside the lock
//! ([`accept_spans`]), then takes the mutex once to expire old traces, add
//! the spans and evict over capacity. Queries take the same mutex, copy out
//! what they answer and build the API types after releasing it. No await
//! ever happens while it is held.
//!
//! Bounds: a trace expires `retention` after its last span arrived; when
//! more than `capacity` traces are held, the ones whose last span arrived
//! longest ago go first; a trace keeps at most `max_spans` spans (later
//! ones are dropped and counted, like duplicates of a stored span id).
//! Each trace keeps its summary (start, end, services, error, root) up to
//! date as spans arrive, so listing never walks spans.
//!
//! Time is passed in (`now`), so tests move the clock instead of sleeping.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use meshlet_api::otlp::ExportTraceServiceRequest;

use super::model::{accept_spans, Rejections, SpanId, StoredSpan, TraceId};
use meshlet_api::traces::{SpanStatus, SpanView, StatusCodeName, TraceDetail, TraceSummary};

/// Default of `limit` in [`TraceQuery`], and its maximum.
pub const DEFAULT_LIMIT: usize = 20;
pub const MAX_LIMIT: usize = 1000;

/// The store's bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceLimits {
    /// Traces held at most.
    pub capacity: usize,
    /// How long a trace is kept after its last span arrived.
    pub retention: Duration,
    /// Spans kept per trace.
    pub max_spans: usize,
    /// Estimated bytes of all stored spans at most (see
    /// [`StoredSpan::estimated_bytes`]); the least recently updated traces
    /// go first. Bounds memory whatever the spans' sizes.
    pub max_bytes: usize,
}

/// Default of [`TraceLimits::max_bytes`] (`--trace-max-bytes`): 64 MiB.
pub const DEFAULT_MAX_BYTES: usize = 64 << 20;

impl Default for TraceLimits {
    fn default() -> Self {
        TraceLimits {
            capacity: 1000,
            retention: Duration::from_secs(15 * 60),
            max_spans: 1000,
            max_bytes: DEFAULT_MAX_BYTES,
        }
    }
}

/// Filters of the trace list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceQuery {
    /// Only traces with a span of this service.
    pub service: Option<String>,
    /// Only traces at least this long (latest end − earliest start).
    pub min_duration: Option<Duration>,
    pub limit: usize,
}

impl Default for TraceQuery {
    fn default() -> Self {
        TraceQuery {
            service: None,
            min_duration: None,
            limit: DEFAULT_LIMIT,
        }
    }
}

/// Counters since start, and the traces held now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TraceStats {
    /// Every span of every export, valid or not.
    pub spans_received: u64,
    /// Spans with an invalid trace, span or parent id.
    pub spans_rejected: u64,
    /// Valid spans not kept because their trace was full.
    pub spans_dropped_trace_full: u64,
    /// Valid spans whose id the trace already held (a re-sent export).
    pub spans_dropped_duplicate: u64,
    /// Spans of traces evicted for capacity before their retention ended.
    pub spans_dropped_capacity: u64,
    pub traces_expired: u64,
    pub traces_evicted: u64,
    pub traces_stored: usize,
}

/// What one export did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IngestOutcome {
    pub stored: u64,
    pub rejected: Rejections,
    pub dropped: u64,
}

#[derive(Debug)]
struct Trace {
    spans: Vec<StoredSpan>,
    span_ids: HashSet<SpanId>,
    services: BTreeSet<Arc<str>>,
    start: u64,
    end: u64,
    error: bool,
    /// Index of the first span without a parent.
    root: Option<usize>,
    /// Index of the earliest-starting span.
    earliest: usize,
    last_arrival: Instant,
    /// Key in `Inner::order`; grows with every arrival.
    seq: u64,
    /// Estimated bytes of its spans.
    bytes: usize,
}

impl Trace {
    fn new(now: Instant) -> Trace {
        Trace {
            spans: Vec::new(),
            span_ids: HashSet::new(),
            services: BTreeSet::new(),
            start: u64::MAX,
            end: 0,
            error: false,
            root: None,
            earliest: 0,
            last_arrival: now,
            seq: 0,
            bytes: 0,
        }
    }

    fn push(&mut self, span: StoredSpan) {
        let index = self.spans.len();
        if span.parent_span_id.is_none() && self.root.is_none() {
            self.root = Some(index);
        }
        if span.start_unix_nano < self.start {
            self.earliest = index;
        }
        self.start = self.start.min(span.start_unix_nano);
        self.end = self.end.max(span.end_unix_nano);
        self.error |= span.status_code == StatusCodeName::Error;
        self.services.insert(span.service.clone());
        self.span_ids.insert(span.span_id);
        self.bytes += span.estimated_bytes();
        self.spans.push(span);
    }

    fn duration(&self) -> Duration {
        Duration::from_nanos(self.end.saturating_sub(self.start))
    }

    fn summary(&self, id: TraceId) -> TraceSummary {
        let root = &self.spans[self.root.unwrap_or(self.earliest)];
        TraceSummary {
            trace_id: id.to_string(),
            root_service: root.service.to_string(),
            root_name: root.name.clone(),
            start_unix_nano: self.start,
            duration_micros: micros(self.end.saturating_sub(self.start)),
            span_count: self.spans.len(),
            services: self.services.iter().map(|s| s.to_string()).collect(),
            error: self.error,
        }
    }
}

fn micros(nanos: u64) -> f64 {
    nanos as f64 / 1000.0
}

#[derive(Debug, Default)]
struct Inner {
    traces: HashMap<TraceId, Trace>,
    /// Traces by the arrival of their last span, oldest first.
    order: BTreeMap<u64, TraceId>,
    next_seq: u64,
    stats: TraceStats,
    /// Estimated bytes of every stored trace.
    bytes: usize,
}

impl Inner {
    fn remove_oldest(&mut self) -> Option<Trace> {
        let (_, id) = self.order.pop_first()?;
        let trace = self.traces.remove(&id)?;
        self.bytes = self.bytes.saturating_sub(trace.bytes);
        Some(trace)
    }

    fn expire(&mut self, now: Instant, retention: Duration) {
        while let Some(id) = self.order.first_key_value().map(|(_, id)| *id) {
            let last = self.traces[&id].last_arrival;
            if now.saturating_duration_since(last) < retention {
                break;
            }
            self.remove_oldest();
            self.stats.traces_expired += 1;
        }
    }

    fn evict_over(&mut self, capacity: usize, max_bytes: usize) {
        while self.traces.len() > capacity || self.bytes > max_bytes {
            let Some(trace) = self.remove_oldest() else {
                break;
            };
            self.stats.traces_evicted += 1;
            self.stats.spans_dropped_capacity += trace.spans.len() as u64;
        }
    }

    /// Adds one span; false if it was dropped.
    fn add(&mut self, span: StoredSpan, now: Instant, max_spans: usize) -> bool {
        let seq = self.next_seq;
        let trace = self
            .traces
            .entry(span.trace_id)
            .or_insert_with(|| Trace::new(now));
        if trace.span_ids.contains(&span.span_id) {
            self.stats.spans_dropped_duplicate += 1;
            return false;
        }
        if trace.spans.len() >= max_spans {
            self.stats.spans_dropped_trace_full += 1;
            return false;
        }
        let id = span.trace_id;
        self.bytes += span.estimated_bytes();
        trace.push(span);
        // Move the trace to the back of the eviction order.
        self.order.remove(&trace.seq);
        trace.seq = seq;
        trace.last_arrival = now;
        self.order.insert(seq, id);
        self.next_seq += 1;
        true
    }
}

/// The trace store; share it behind an `Arc`.
#[derive(Debug)]
pub struct TraceStore {
    limits: TraceLimits,
    inner: Mutex<Inner>,
}

impl TraceStore {
    pub fn new(limits: TraceLimits) -> TraceStore {
        TraceStore {
            limits,
            inner: Mutex::new(Inner {
                // Sequence 0 would collide with a new trace's initial `seq`.
                next_seq: 1,
                ..Inner::default()
            }),
        }
    }

    pub fn limits(&self) -> TraceLimits {
        self.limits
    }

    fn lock(&self, now: Instant) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves consistent-enough data
        // (at worst one span's aggregates); keep serving.
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.expire(now, self.limits.retention);
        inner
    }

    /// Validates and stores the spans of one export.
    pub fn ingest(&self, request: ExportTraceServiceRequest, now: Instant) -> IngestOutcome {
        let (spans, rejected) = accept_spans(request);
        let received = spans.len() as u64 + rejected.count;
        let mut inner = self.lock(now);
        inner.stats.spans_received += received;
        inner.stats.spans_rejected += rejected.count;
        let mut stored = 0;
        for span in spans {
            stored += u64::from(inner.add(span, now, self.limits.max_spans));
        }
        inner.evict_over(self.limits.capacity, self.limits.max_bytes);
        IngestOutcome {
            stored,
            dropped: received - rejected.count - stored,
            rejected,
        }
    }

    /// Summaries of the matching traces, newest (latest start) first.
    pub fn list(&self, query: &TraceQuery, now: Instant) -> Vec<TraceSummary> {
        let inner = self.lock(now);
        let mut matching: Vec<(&TraceId, &Trace)> = inner
            .traces
            .iter()
            .filter(|(_, t)| match (&query.service, query.min_duration) {
                (Some(service), _) if !t.services.contains(service.as_str()) => false,
                (_, Some(min)) => t.duration() >= min,
                _ => true,
            })
            .collect();
        matching.sort_by(|a, b| (b.1.start, b.0).cmp(&(a.1.start, a.0)));
        matching
            .into_iter()
            .take(query.limit.min(MAX_LIMIT))
            .map(|(id, t)| t.summary(*id))
            .collect()
    }

    /// One trace, its spans sorted by start time (a parent before a child
    /// that starts at the same instant).
    pub fn get(&self, id: TraceId, now: Instant) -> Option<TraceDetail> {
        let mut spans = self.lock(now).traces.get(&id)?.spans.clone();
        spans.sort_by(|a, b| {
            (a.start_unix_nano, b.end_unix_nano).cmp(&(b.start_unix_nano, a.end_unix_nano))
        });
        Some(TraceDetail {
            trace_id: id.to_string(),
            spans: spans.into_iter().map(span_view).collect(),
        })
    }

    pub fn stats(&self, now: Instant) -> TraceStats {
        let inner = self.lock(now);
        TraceStats {
            traces_stored: inner.traces.len(),
            ..inner.stats
        }
    }
}

fn span_view(span: StoredSpan) -> SpanView {
    SpanView {
        span_id: span.span_id.to_string(),
        parent_span_id: span.parent_span_id.map(|p| p.to_string()),
        duration_micros: micros(span.duration_nanos()),
        name: span.name,
        kind: span.kind,
        service: span.service.to_string(),
        start_unix_nano: span.start_unix_nano,
        end_unix_nano: span.end_unix_nano,
        status: SpanStatus {
            code: span.status_code,
            message: span.status_message,
        },
        attributes: span.attributes.into_iter().collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::traces::model::export;
    use crate::traces::model::tests::span;
    use meshlet_api::otlp::Status;

    const MS: u64 = 1_000_000;

    fn store(capacity: usize, retention_secs: u64, max_spans: usize) -> TraceStore {
        TraceStore::new(TraceLimits {
            capacity,
            retention: Duration::from_secs(retention_secs),
            max_spans,
            max_bytes: DEFAULT_MAX_BYTES,
        })
    }

    fn ids(summaries: &[TraceSummary]) -> Vec<String> {
        summaries
            .iter()
            .map(|s| s.trace_id[..2].to_owned())
            .collect()
    }

    fn all() -> TraceQuery {
        TraceQuery::default()
    }

    #[test]
    fn over_capacity_the_least_recently_updated_trace_goes() {
        let s = store(2, 60, 10);
        let t0 = Instant::now();
        s.ingest(export("a", vec![span(1, 1, 0, 0, MS)]), t0);
        s.ingest(export("a", vec![span(2, 1, 0, MS, 2 * MS)]), t0);
        // Trace 1 gets a new span: now trace 2 is the oldest.
        s.ingest(export("a", vec![span(1, 2, 1, 0, MS)]), t0);
        s.ingest(export("a", vec![span(3, 1, 0, 2 * MS, 3 * MS)]), t0);
        assert_eq!(ids(&s.list(&all(), t0)), ["03", "01"]);
        let stats = s.stats(t0);
        assert_eq!(stats.traces_evicted, 1);
        assert_eq!(stats.spans_dropped_capacity, 1);
        assert_eq!(stats.traces_stored, 2);
        assert!(s.get(TraceId([2; 16]), t0).is_none());
    }

    #[test]
    fn traces_expire_after_retention_since_their_last_span() {
        let s = store(10, 60, 10);
        let t0 = Instant::now();
        s.ingest(export("a", vec![span(1, 1, 0, 0, MS)]), t0);
        s.ingest(export("a", vec![span(2, 1, 0, 0, MS)]), t0);
        let t30 = t0 + Duration::from_secs(30);
        s.ingest(export("a", vec![span(2, 2, 1, 0, MS)]), t30);
        let t60 = t0 + Duration::from_secs(60);
        assert_eq!(ids(&s.list(&all(), t60)), ["02"]);
        assert_eq!(s.stats(t60).traces_expired, 1);
        let t90 = t30 + Duration::from_secs(60);
        assert!(s.list(&all(), t90).is_empty());
        assert_eq!(s.stats(t90).traces_stored, 0);
    }

    #[test]
    fn a_full_trace_drops_further_spans_and_duplicates() {
        let s = store(10, 60, 2);
        let t0 = Instant::now();
        let outcome = s.ingest(
            export(
                "a",
                vec![
                    span(1, 1, 0, 0, MS),
                    span(1, 1, 0, 0, MS),
                    span(1, 2, 1, 0, MS),
                    span(1, 3, 2, 0, MS),
                ],
            ),
            t0,
        );
        assert_eq!((outcome.stored, outcome.dropped), (2, 2));
        let stats = s.stats(t0);
        assert_eq!(stats.spans_received, 4);
        assert_eq!(stats.spans_dropped_duplicate, 1);
        assert_eq!(stats.spans_dropped_trace_full, 1);
        assert_eq!(s.get(TraceId([1; 16]), t0).unwrap().spans.len(), 2);
    }

    #[test]
    fn list_filters_by_service_and_duration_newest_first() {
        let s = store(10, 60, 10);
        let t0 = Instant::now();
        // Trace 1: frontend → orders, 30ms, an error in orders.
        let mut failed = span(1, 2, 1, 5 * MS, 25 * MS);
        failed.status = Some(Status {
            message: "boom".into(),
            code: 2,
        });
        s.ingest(export("frontend", vec![span(1, 1, 0, 0, 30 * MS)]), t0);
        s.ingest(export("orders", vec![failed]), t0);
        // Trace 2: orders alone, 2ms, later.
        s.ingest(
            export("orders", vec![span(2, 1, 0, 100 * MS, 102 * MS)]),
            t0,
        );
        // Trace 3: payments, no root span seen yet: the earliest stands in.
        s.ingest(
            export(
                "payments",
                vec![
                    span(3, 2, 9, 60 * MS, 70 * MS),
                    span(3, 3, 9, 50 * MS, 55 * MS),
                ],
            ),
            t0,
        );

        assert_eq!(ids(&s.list(&all(), t0)), ["02", "03", "01"]);
        let orders = TraceQuery {
            service: Some("orders".into()),
            ..all()
        };
        assert_eq!(ids(&s.list(&orders, t0)), ["02", "01"]);
        let slow = TraceQuery {
            min_duration: Some(Duration::from_millis(20)),
            ..all()
        };
        assert_eq!(ids(&s.list(&slow, t0)), ["03", "01"]);
        let one = TraceQuery { limit: 1, ..all() };
        assert_eq!(ids(&s.list(&one, t0)), ["02"]);

        let first = &s.list(&slow, t0)[1];
        assert_eq!(first.root_service, "frontend");
        assert_eq!(first.root_name, "span-1");
        assert_eq!(first.duration_micros, 30_000.0);
        assert_eq!(first.services, ["frontend", "orders"]);
        assert!(first.error);
        assert_eq!(first.span_count, 2);
        let orphan = &s.list(&slow, t0)[0];
        assert_eq!(orphan.root_name, "span-3");
        assert!(!orphan.error);
    }

    #[test]
    fn a_trace_comes_back_sorted_by_start() {
        let s = store(10, 60, 10);
        let t0 = Instant::now();
        s.ingest(
            export(
                "a",
                vec![
                    span(1, 3, 2, 2 * MS, 3 * MS),
                    span(1, 2, 1, 0, 4 * MS),
                    span(1, 1, 0, 0, 5 * MS),
                ],
            ),
            t0,
        );
        let trace = s.get(TraceId([1; 16]), t0).unwrap();
        let names: Vec<&str> = trace.spans.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["span-1", "span-2", "span-3"]);
        assert_eq!(trace.spans[0].parent_span_id, None);
        assert_eq!(
            trace.spans[1].parent_span_id.as_deref(),
            Some("0101010101010101")
        );
        assert_eq!(trace.spans[2].duration_micros, 1000.0);
    }

    #[test]
    fn the_store_is_bounded_in_bytes() {
        let store = TraceStore::new(TraceLimits {
            max_bytes: 4096,
            ..TraceLimits::default()
        });
        let now = Instant::now();
        for trace in 1..=200u8 {
            store.ingest(export("a", vec![span(trace, 1, 0, 0, MS)]), now);
        }
        let inner = store.inner.lock().unwrap();
        assert!(inner.bytes <= 4096, "{}", inner.bytes);
        let sum: usize = inner.traces.values().map(|t| t.bytes).sum();
        assert_eq!(sum, inner.bytes);
        assert!(inner.traces.len() < 200 && !inner.traces.is_empty());
        assert!(inner.stats.traces_evicted > 0);
    }
}
