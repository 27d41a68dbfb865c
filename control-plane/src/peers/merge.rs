//! Merging what several replicas hold into one answer (pure functions).
//!
//! A trace's spans may sit on several replicas (each sidecar exports to the
//! replica it currently talks to):
//!
//! - a trace list: summaries of one trace id are combined (earliest start,
//!   latest end, span counts added, services united, error if any; the
//!   root named by the part that starts first), then sorted newest first
//!   and cut to the limit, like one store's list. A filter
//!   (`service`, `minDuration`) is applied by each replica to its own part,
//!   so a trace matches when one replica's part matches.
//! - one trace: the spans of every part, one per span id, in the store's
//!   order (start time, a parent before a child that starts with it).
//!
//! The stats reports merge in `stats.rs` (`StatsStore::merged`).

use std::collections::{BTreeMap, BTreeSet, HashSet};

use meshlet_api::traces::{TraceDetail, TraceSummary};

/// One list from the parts of each replica, newest first, at most `limit`.
pub fn trace_lists(parts: Vec<Vec<TraceSummary>>, limit: usize) -> Vec<TraceSummary> {
    let mut by_id: BTreeMap<String, TraceSummary> = BTreeMap::new();
    for summary in parts.into_iter().flatten() {
        match by_id.remove(&summary.trace_id) {
            None => {
                by_id.insert(summary.trace_id.clone(), summary);
            }
            Some(seen) => {
                let merged = combine(seen, summary);
                by_id.insert(merged.trace_id.clone(), merged);
            }
        }
    }
    let mut all: Vec<TraceSummary> = by_id.into_values().collect();
    all.sort_by(|a, b| (b.start_unix_nano, &b.trace_id).cmp(&(a.start_unix_nano, &a.trace_id)));
    all.truncate(limit);
    all
}

fn end_nanos(s: &TraceSummary) -> u64 {
    s.start_unix_nano + (s.duration_micros * 1000.0).round() as u64
}

fn combine(a: TraceSummary, b: TraceSummary) -> TraceSummary {
    let end = end_nanos(&a).max(end_nanos(&b));
    let (first, second) =
        if (b.start_unix_nano, &b.root_service) < (a.start_unix_nano, &a.root_service) {
            (b, a)
        } else {
            (a, b)
        };
    let services: BTreeSet<String> = first
        .services
        .iter()
        .chain(second.services.iter())
        .cloned()
        .collect();
    TraceSummary {
        duration_micros: end.saturating_sub(first.start_unix_nano) as f64 / 1000.0,
        span_count: first.span_count + second.span_count,
        services: services.into_iter().collect(),
        error: first.error || second.error,
        ..first
    }
}

/// One trace from the parts of each replica (`None` when no replica has it).
pub fn trace_details(parts: Vec<TraceDetail>) -> Option<TraceDetail> {
    let trace_id = parts.first()?.trace_id.clone();
    let mut seen = HashSet::new();
    let mut spans: Vec<_> = parts
        .into_iter()
        .flat_map(|p| p.spans)
        .filter(|s| seen.insert(s.span_id.clone()))
        .collect();
    spans.sort_by(|a, b| {
        (a.start_unix_nano, b.end_unix_nano).cmp(&(b.start_unix_nano, a.end_unix_nano))
    });
    Some(TraceDetail { trace_id, spans })
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshlet_api::traces::{SpanKindName, SpanStatus, SpanView, StatusCodeName};

    fn summary(
        id: &str,
        root: &str,
        start: u64,
        micros: f64,
        spans: usize,
        services: &[&str],
    ) -> TraceSummary {
        TraceSummary {
            trace_id: id.into(),
            root_service: root.into(),
            root_name: format!("{root} op"),
            start_unix_nano: start,
            duration_micros: micros,
            span_count: spans,
            services: services.iter().map(|s| s.to_string()).collect(),
            error: false,
        }
    }

    fn span(id: &str, parent: Option<&str>, start: u64, end: u64) -> SpanView {
        SpanView {
            span_id: id.into(),
            parent_span_id: parent.map(Into::into),
            name: id.into(),
            kind: SpanKindName::Server,
            service: "s".into(),
            start_unix_nano: start,
            end_unix_nano: end,
            duration_micros: (end - start) as f64 / 1000.0,
            status: SpanStatus {
                code: StatusCodeName::Unset,
                message: String::new(),
            },
            attributes: Default::default(),
        }
    }

    #[test]
    fn a_trace_split_over_replicas_is_one_summary() {
        // Replica A has the frontend's spans (the root), B the orders part.
        let a = vec![
            summary("t1", "frontend", 1_000, 50.0, 2, &["frontend"]),
            summary("t2", "frontend", 5_000, 10.0, 1, &["frontend"]),
        ];
        let b = vec![summary("t1", "orders", 2_000, 80.0, 2, &["orders"])];
        let merged = trace_lists(vec![a, b], 10);
        assert_eq!(merged.len(), 2);
        assert_eq!(merged[0].trace_id, "t2", "newest first");
        let t1 = &merged[1];
        assert_eq!(
            t1.root_service, "frontend",
            "the part that starts first names the root"
        );
        assert_eq!(t1.span_count, 4);
        assert_eq!(t1.services, vec!["frontend", "orders"]);
        assert_eq!(t1.start_unix_nano, 1_000);
        // Ends at 2_000 + 80_000 ns: 81 µs after the start.
        assert_eq!(t1.duration_micros, 81.0);
    }

    #[test]
    fn the_merged_list_keeps_the_limit_and_the_error_flag() {
        let mut failed = summary("t3", "x", 3, 1.0, 1, &["x"]);
        failed.error = true;
        let a = vec![
            summary("t1", "x", 1, 1.0, 1, &["x"]),
            summary("t3", "x", 3, 1.0, 1, &["x"]),
        ];
        let b = vec![summary("t2", "y", 2, 1.0, 1, &["y"]), failed];
        let merged = trace_lists(vec![a, b], 2);
        let ids: Vec<_> = merged.iter().map(|s| s.trace_id.as_str()).collect();
        assert_eq!(ids, ["t3", "t2"]);
        assert!(merged[0].error);
        assert!(trace_lists(vec![], 5).is_empty());
    }

    #[test]
    fn trace_parts_are_united_once_per_span_in_order() {
        let a = TraceDetail {
            trace_id: "t".into(),
            spans: vec![span("root", None, 0, 100), span("c2", Some("root"), 50, 60)],
        };
        let b = TraceDetail {
            trace_id: "t".into(),
            // c2 arrived at both (an export retried on another replica).
            spans: vec![
                span("c1", Some("root"), 10, 40),
                span("c2", Some("root"), 50, 60),
            ],
        };
        let merged = trace_details(vec![a, b]).unwrap();
        let ids: Vec<_> = merged.spans.iter().map(|s| s.span_id.as_str()).collect();
        assert_eq!(ids, ["root", "c1", "c2"]);
        assert!(trace_details(vec![]).is_none());
    }
}
