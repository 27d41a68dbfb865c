//! meshctl's trace commands: `traces` (the list of recent traces as a
//! table) and `trace ID` (one trace as a waterfall).
//!
//! Data flow: the filters become the query of `GET /api/traces`, or the id
//! the path of `GET /api/traces/{id}`; the answers (the
//! [`meshlet_api::traces`] types) are printed as JSON/YAML with `-o`, or
//! formatted here: the waterfall orders spans as a tree (children under
//! their parent, siblings by start time; spans whose parent is not in the
//! trace start their own tree) and draws each span's place in the trace as
//! a bar of [`BAR_WIDTH`] columns.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::client::{ClientError, ControlPlane};
use crate::error::CommandError;
use crate::output::{age, duration_us, emit, structured, table, Format};
use meshlet_api::traces::{
    paths, AttributeValue, SpanView, StatusCodeName, TraceDetail, TraceSummary,
};

/// Width of the waterfall's bars, in characters.
pub const BAR_WIDTH: usize = 40;
/// The span attribute whose value the STATUS column shows.
pub const HTTP_STATUS: &str = "http.response.status_code";

/// Filters of `meshctl traces`.
#[derive(Debug, Clone, Default)]
pub struct TraceFilter {
    pub service: Option<String>,
    pub min_duration: Option<Duration>,
    pub limit: Option<usize>,
}

/// Percent-encodes a query value (everything but RFC 3986's unreserved
/// characters).
fn query_value(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl TraceFilter {
    /// The path and query of the list request.
    pub fn path(&self) -> String {
        let mut params = Vec::new();
        if let Some(service) = &self.service {
            params.push(format!("service={}", query_value(service)));
        }
        if let Some(min) = self.min_duration {
            params.push(format!("minDuration={}ns", min.as_nanos()));
        }
        if let Some(limit) = self.limit {
            params.push(format!("limit={limit}"));
        }
        if params.is_empty() {
            paths::TRACES.to_owned()
        } else {
            format!("{}?{}", paths::TRACES, params.join("&"))
        }
    }
}

/// The wall clock in Unix nanoseconds (the spans' time base).
pub fn now_unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The table of `meshctl traces`; ages are relative to `now_nanos`.
pub fn traces_table(traces: &[TraceSummary], now_nanos: u64) -> String {
    let rows: Vec<Vec<String>> = traces
        .iter()
        .map(|t| {
            vec![
                t.trace_id.clone(),
                format!("{} {}", t.root_service, t.root_name),
                t.span_count.to_string(),
                duration_us(t.duration_micros),
                age(Duration::from_nanos(
                    now_nanos.saturating_sub(t.start_unix_nano),
                )),
                t.services.join(","),
                if t.error { "yes" } else { "no" }.to_owned(),
            ]
        })
        .collect();
    table(
        &[
            "TRACE ID", "ROOT", "SPANS", "DURATION", "AGE", "SERVICES", "ERROR",
        ],
        &rows,
    )
}

/// `meshctl traces`.
pub async fn traces(
    cp: &ControlPlane,
    filter: &TraceFilter,
    format: Format,
) -> Result<bool, CommandError> {
    let traces: Vec<TraceSummary> = cp.get(&filter.path()).await?;
    match structured(format, &traces) {
        Some(text) => emit(&text),
        None if traces.is_empty() => eprintln!("meshctl: no traces found"),
        None => emit(&traces_table(&traces, now_unix_nanos())),
    }
    Ok(true)
}

/// `meshctl trace ID`.
pub async fn trace(cp: &ControlPlane, id: &str, format: Format) -> Result<bool, CommandError> {
    let detail: TraceDetail = cp.get(&paths::trace(id)).await.map_err(|err| match err {
        ClientError::Api { status, .. } if status == http::StatusCode::NOT_FOUND => {
            CommandError::TraceNotFound(id.to_ascii_lowercase())
        }
        other => other.into(),
    })?;
    match structured(format, &detail) {
        Some(text) => emit(&text),
        None => emit(&waterfall(&detail)),
    }
    Ok(true)
}

/// The spans in tree order with their depth: each root (no parent, or a
/// parent not in the trace) by start time, its children under it, siblings
/// by start time. Spans caught in a parent cycle come last, as roots.
pub fn tree_order(spans: &[SpanView]) -> Vec<(usize, &SpanView)> {
    let mut by_start: Vec<&SpanView> = spans.iter().collect();
    by_start.sort_by_key(|s| (s.start_unix_nano, std::cmp::Reverse(s.end_unix_nano)));
    let ids: HashSet<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
    let mut children: HashMap<&str, Vec<&SpanView>> = HashMap::new();
    let mut roots = Vec::new();
    for span in &by_start {
        match span.parent_span_id.as_deref().filter(|p| ids.contains(p)) {
            Some(parent) => children.entry(parent).or_default().push(span),
            None => roots.push(*span),
        }
    }
    let mut order = Vec::with_capacity(spans.len());
    let mut seen = HashSet::new();
    // Unvisited spans after the roots' trees are in cycles; each starts one.
    for start in roots.into_iter().chain(by_start.iter().copied()) {
        let mut stack = vec![(0, start)];
        while let Some((depth, span)) = stack.pop() {
            if !seen.insert(span.span_id.as_str()) {
                continue;
            }
            order.push((depth, span));
            if let Some(kids) = children.get(span.span_id.as_str()) {
                stack.extend(kids.iter().rev().map(|kid| (depth + 1, *kid)));
            }
        }
    }
    order
}

/// `█` where the span runs within the trace, `─` elsewhere.
pub fn bar(start: u64, end: u64, trace_start: u64, trace_end: u64) -> String {
    let total = trace_end.saturating_sub(trace_start);
    let (from, width) = if total == 0 {
        (0, BAR_WIDTH)
    } else {
        let scale = |nanos: u64| nanos as f64 / total as f64 * BAR_WIDTH as f64;
        let from = (scale(start.saturating_sub(trace_start)) as usize).min(BAR_WIDTH - 1);
        let width = (scale(end.saturating_sub(start)).round() as usize).clamp(1, BAR_WIDTH - from);
        (from, width)
    };
    let mut out = "─".repeat(from);
    out.push_str(&"█".repeat(width));
    out.push_str(&"─".repeat(BAR_WIDTH - from - width));
    out
}

fn status(span: &SpanView) -> String {
    match (span.attributes.get(HTTP_STATUS), span.status.code) {
        (Some(AttributeValue::Int(code)), _) => code.to_string(),
        (Some(AttributeValue::String(code)), _) => code.clone(),
        (_, StatusCodeName::Error) => "error".into(),
        (_, StatusCodeName::Ok) => "ok".into(),
        (_, StatusCodeName::Unset) => "-".into(),
    }
}

/// The text of `meshctl trace ID`: a title line, then one row per span.
pub fn waterfall(detail: &TraceDetail) -> String {
    let start = detail.spans.iter().map(|s| s.start_unix_nano).min();
    let end = detail.spans.iter().map(|s| s.end_unix_nano).max();
    let (start, end) = (start.unwrap_or(0), end.unwrap_or(0));
    let mut services: Vec<&str> = detail.spans.iter().map(|s| s.service.as_str()).collect();
    services.sort_unstable();
    services.dedup();
    let rows: Vec<Vec<String>> = tree_order(&detail.spans)
        .into_iter()
        .map(|(depth, span)| {
            vec![
                format!("{}{}", "  ".repeat(depth), span.name),
                span.service.clone(),
                span.kind.as_str().to_owned(),
                status(span),
                duration_us(span.duration_micros),
                bar(span.start_unix_nano, span.end_unix_nano, start, end),
            ]
        })
        .collect();
    let mut out = format!(
        "Trace {}: {} spans, {}, services: {}\n\n",
        detail.trace_id,
        detail.spans.len(),
        duration_us(end.saturating_sub(start) as f64 / 1000.0),
        services.join(", ")
    );
    out.push_str(&table(
        &["SPAN", "SERVICE", "KIND", "STATUS", "DURATION", "TIMELINE"],
        &rows,
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshlet_api::traces::{SpanKindName, SpanStatus};
    use std::collections::BTreeMap;

    fn span(id: &str, parent: Option<&str>, service: &str, start_us: u64, end_us: u64) -> SpanView {
        SpanView {
            span_id: id.into(),
            parent_span_id: parent.map(Into::into),
            name: format!("op-{id}"),
            kind: SpanKindName::Server,
            service: service.into(),
            start_unix_nano: start_us * 1000,
            end_unix_nano: end_us * 1000,
            duration_micros: (end_us - start_us) as f64,
            status: SpanStatus {
                code: StatusCodeName::Unset,
                message: String::new(),
            },
            attributes: BTreeMap::new(),
        }
    }

    #[test]
    fn filters_become_the_query() {
        assert_eq!(TraceFilter::default().path(), "/api/traces");
        let filter = TraceFilter {
            service: Some("a b&c".into()),
            min_duration: Some(Duration::from_millis(10)),
            limit: Some(5),
        };
        assert_eq!(
            filter.path(),
            "/api/traces?service=a%20b%26c&minDuration=10000000ns&limit=5"
        );
    }

    #[test]
    fn spans_are_ordered_as_a_tree() {
        let spans = vec![
            span("c2", Some("b"), "x", 50, 60),
            span("b", Some("a"), "x", 10, 90),
            span("c1", Some("b"), "x", 20, 30),
            span("a", None, "x", 0, 100),
            span("orphan", Some("gone"), "y", 5, 6),
            // A cycle is still shown, once.
            span("p", Some("q"), "z", 1, 2),
            span("q", Some("p"), "z", 3, 4),
        ];
        let order: Vec<(usize, &str)> = tree_order(&spans)
            .into_iter()
            .map(|(depth, s)| (depth, s.span_id.as_str()))
            .collect();
        assert_eq!(
            order,
            [
                (0, "a"),
                (1, "b"),
                (2, "c1"),
                (2, "c2"),
                (0, "orphan"),
                (0, "p"),
                (1, "q")
            ]
        );
    }

    #[test]
    fn bars_place_and_scale_spans() {
        assert_eq!(bar(0, 100, 0, 100), "█".repeat(40));
        assert_eq!(
            bar(50, 75, 0, 100),
            format!("{}{}{}", "─".repeat(20), "█".repeat(10), "─".repeat(10))
        );
        // Too short to see still shows one column, never past the end.
        assert_eq!(bar(100, 100, 0, 100), format!("{}█", "─".repeat(39)));
        assert_eq!(bar(5, 5, 5, 5), "█".repeat(40));
    }

    #[test]
    fn the_waterfall_indents_children_and_shows_http_status() {
        let mut root = span("a", None, "frontend", 0, 1230);
        root.attributes
            .insert(HTTP_STATUS.into(), AttributeValue::Int(200));
        let mut child = span("b", Some("a"), "orders", 615, 1230);
        child.kind = SpanKindName::Client;
        child.status.code = StatusCodeName::Error;
        let detail = TraceDetail {
            trace_id: "ab".repeat(16),
            spans: vec![root, child],
        };
        let text = waterfall(&detail);
        let expected = format!(
            "Trace {}: 2 spans, 1.23ms, services: frontend, orders\n\n\
             SPAN     SERVICE    KIND     STATUS   DURATION   TIMELINE\n\
             op-a     frontend   server   200      1.23ms     {}\n  \
             op-b   orders     client   error    615µs      {}{}\n",
            "ab".repeat(16),
            "█".repeat(40),
            "─".repeat(20),
            "█".repeat(20)
        );
        assert_eq!(text, expected);
    }

    #[test]
    fn the_list_is_a_table() {
        let summary = TraceSummary {
            trace_id: "ab".repeat(16),
            root_service: "frontend".into(),
            root_name: "GET /".into(),
            start_unix_nano: 1_000_000_000,
            duration_micros: 850.0,
            span_count: 6,
            services: vec!["frontend".into(), "orders".into()],
            error: false,
        };
        assert_eq!(
            traces_table(&[summary], 13_000_000_000),
            format!(
                "TRACE ID{}   ROOT             SPANS   DURATION   AGE   SERVICES          ERROR\n\
                 {}   frontend GET /   6       850µs      12s   frontend,orders   no\n",
                " ".repeat(24),
                "ab".repeat(16)
            )
        );
    }
}
