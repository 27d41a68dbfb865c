//! What the trace store keeps of a span, and the checks on the way in.
//!
//! Data flow: an [`ExportTraceServiceRequest`] (decoded from protobuf or
//! converted from OTLP/JSON) → [`accept_spans`] walks resource → scope →
//! span, takes `service.name` from each resource, validates the ids and
//! turns each valid span into a [`StoredSpan`] (scalar attributes only);
//! invalid spans are counted in a [`Rejections`] with the first reason.
//! All of this happens before the store's lock is taken.

use std::fmt;
use std::sync::Arc;

use meshlet_api::otlp::{
    AnyValue, ExportTraceServiceRequest, KeyValue, Resource, ResourceSpans, ScopeSpans, Span, Value,
};

use meshlet_api::traces::{AttributeValue, SpanKindName, StatusCodeName};

/// The resource attribute naming the service that emitted a span.
pub const SERVICE_NAME: &str = "service.name";
/// The service of spans whose resource does not say (OpenTelemetry's default).
pub const UNKNOWN_SERVICE: &str = "unknown_service";

/// Lowercase hex of `bytes`.
pub fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    out
}

/// Bytes of a hex string (either case); `None` if it is not hex.
pub fn from_hex(text: &str) -> Option<Vec<u8>> {
    let pairs = text.as_bytes().chunks_exact(2);
    if !pairs.remainder().is_empty() {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    pairs
        .map(|pair| Some(digit(pair[0])? << 4 | digit(pair[1])?))
        .collect()
}

/// A valid trace id: 16 bytes, not all zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TraceId(pub [u8; 16]);

/// A valid span id: 8 bytes, not all zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpanId(pub [u8; 8]);

/// Why an id is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{what} must be {expected} bytes, got {got}")]
    Length {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("{what} is all zero")]
    Zero { what: &'static str },
    #[error("{what} {text:?} must be {digits} hex digits")]
    Hex {
        what: &'static str,
        digits: usize,
        text: String,
    },
}

fn id_bytes<const N: usize>(what: &'static str, bytes: &[u8]) -> Result<[u8; N], IdError> {
    let array: [u8; N] = bytes.try_into().map_err(|_| IdError::Length {
        what,
        expected: N,
        got: bytes.len(),
    })?;
    if array == [0; N] {
        return Err(IdError::Zero { what });
    }
    Ok(array)
}

fn id_text<const N: usize>(what: &'static str, text: &str) -> Result<[u8; N], IdError> {
    let bad = || IdError::Hex {
        what,
        digits: 2 * N,
        text: text.to_owned(),
    };
    let bytes = from_hex(text).ok_or_else(bad)?;
    if bytes.len() != N {
        return Err(bad());
    }
    id_bytes(what, &bytes)
}

impl TraceId {
    pub fn from_bytes(bytes: &[u8]) -> Result<TraceId, IdError> {
        id_bytes("trace id", bytes).map(TraceId)
    }

    /// 32 hex digits, either case.
    pub fn parse(text: &str) -> Result<TraceId, IdError> {
        id_text("trace id", text).map(TraceId)
    }
}

impl SpanId {
    pub fn from_bytes(bytes: &[u8]) -> Result<SpanId, IdError> {
        id_bytes("span id", bytes).map(SpanId)
    }
}

impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&to_hex(&self.0))
    }
}

impl fmt::Display for SpanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&to_hex(&self.0))
    }
}

/// One stored span.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredSpan {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    /// `None` for a root span (an empty or all-zero parent id).
    pub parent_span_id: Option<SpanId>,
    pub name: String,
    pub kind: SpanKindName,
    /// Shared by the spans of one resource.
    pub service: Arc<str>,
    pub start_unix_nano: u64,
    pub end_unix_nano: u64,
    pub status_code: StatusCodeName,
    pub status_message: String,
    /// Scalar attributes in arrival order (arrays, maps, bytes are dropped).
    pub attributes: Vec<(String, AttributeValue)>,
}

impl StoredSpan {
    /// About what the span costs in memory: the struct, its strings and
    /// attributes (the service name is shared and not counted). What the
    /// trace store's byte cap counts.
    pub fn estimated_bytes(&self) -> usize {
        let attributes: usize = self
            .attributes
            .iter()
            .map(|(key, value)| {
                let text = match value {
                    AttributeValue::String(text) => text.len(),
                    _ => 0,
                };
                std::mem::size_of::<(String, AttributeValue)>() + key.len() + text
            })
            .sum();
        std::mem::size_of::<StoredSpan>()
            + self.name.len()
            + self.status_message.len()
            + attributes
            // The span id in the trace's id set.
            + 16
    }

    /// Validates the ids and keeps what the store needs.
    pub fn from_otlp(span: Span, service: Arc<str>) -> Result<StoredSpan, IdError> {
        let trace_id = TraceId::from_bytes(&span.trace_id)?;
        let span_id = SpanId::from_bytes(&span.span_id)?;
        let parent_span_id = match SpanId::from_bytes(&span.parent_span_id) {
            Ok(parent) => Some(parent),
            Err(IdError::Zero { .. } | IdError::Length { got: 0, .. }) => None,
            Err(IdError::Length { expected, got, .. }) => {
                return Err(IdError::Length {
                    what: "parent span id",
                    expected,
                    got,
                })
            }
            Err(other) => return Err(other),
        };
        let (status_code, status_message) = span
            .status
            .map(|s| (StatusCodeName::from_otlp(s.code), s.message))
            .unwrap_or((StatusCodeName::Unset, String::new()));
        Ok(StoredSpan {
            trace_id,
            span_id,
            parent_span_id,
            name: span.name,
            kind: SpanKindName::from_otlp(span.kind),
            service,
            start_unix_nano: span.start_time_unix_nano,
            end_unix_nano: span.end_time_unix_nano.max(span.start_time_unix_nano),
            status_code,
            status_message,
            attributes: span.attributes.into_iter().filter_map(scalar).collect(),
        })
    }

    pub fn duration_nanos(&self) -> u64 {
        self.end_unix_nano - self.start_unix_nano
    }

    pub fn attribute(&self, key: &str) -> Option<&AttributeValue> {
        self.attributes
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, value)| value)
    }
}

fn scalar(kv: KeyValue) -> Option<(String, AttributeValue)> {
    let value = match kv.value?.value? {
        Value::StringValue(s) => AttributeValue::String(s),
        Value::BoolValue(b) => AttributeValue::Bool(b),
        Value::IntValue(i) => AttributeValue::Int(i),
        Value::DoubleValue(d) => AttributeValue::Double(d),
    };
    Some((kv.key, value))
}

fn string_value(value: Option<&AnyValue>) -> Option<&str> {
    match value?.value.as_ref()? {
        Value::StringValue(s) => Some(s),
        _ => None,
    }
}

/// An export of `spans` from one service, as a sidecar sends it (one
/// resource with `service.name`, one scope).
pub fn export(service: &str, spans: Vec<Span>) -> ExportTraceServiceRequest {
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![KeyValue::string(SERVICE_NAME, service)],
                dropped_attributes_count: 0,
            }),
            scope_spans: vec![ScopeSpans {
                spans,
                ..Default::default()
            }],
            schema_url: String::new(),
        }],
    }
}

/// Spans refused by [`accept_spans`]: how many, and the first reason.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rejections {
    pub count: u64,
    pub first: Option<String>,
}

impl Rejections {
    fn add(&mut self, span_name: &str, err: &IdError) {
        self.count += 1;
        if self.first.is_none() {
            self.first = Some(format!("span {span_name:?}: {err}"));
        }
    }

    /// The `error_message` of a partial success.
    pub fn message(&self) -> String {
        let first = self.first.as_deref().unwrap_or("invalid span");
        match self.count {
            0 | 1 => first.to_owned(),
            n => format!("{first} (and {} more rejected)", n - 1),
        }
    }
}

/// The valid spans of an export, and the rejected ones.
pub fn accept_spans(request: ExportTraceServiceRequest) -> (Vec<StoredSpan>, Rejections) {
    let mut accepted = Vec::new();
    let mut rejections = Rejections::default();
    for resource_spans in request.resource_spans {
        let service: Arc<str> = resource_spans
            .resource
            .as_ref()
            .and_then(|r| r.attributes.iter().find(|kv| kv.key == SERVICE_NAME))
            .and_then(|kv| string_value(kv.value.as_ref()))
            .filter(|name| !name.is_empty())
            .unwrap_or(UNKNOWN_SERVICE)
            .into();
        for span in resource_spans.scope_spans.into_iter().flat_map(|s| s.spans) {
            let name = span.name.clone();
            match StoredSpan::from_otlp(span, service.clone()) {
                Ok(stored) => accepted.push(stored),
                Err(err) => rejections.add(&name, &err),
            }
        }
    }
    (accepted, rejections)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use meshlet_api::otlp::Status;

    /// A span of trace `trace` (its bytes all equal to `trace`) with id
    /// `id`, parent `parent` (0 for none), `start` and `end` in ns.
    pub fn span(trace: u8, id: u8, parent: u8, start: u64, end: u64) -> Span {
        Span {
            trace_id: vec![trace; 16],
            span_id: vec![id; 8],
            parent_span_id: if parent == 0 { vec![] } else { vec![parent; 8] },
            name: format!("span-{id}"),
            start_time_unix_nano: start,
            end_time_unix_nano: end,
            ..Default::default()
        }
    }

    #[test]
    fn hex_round_trips() {
        assert_eq!(to_hex(&[0x0a, 0xff, 0x10]), "0aff10");
        assert_eq!(from_hex("0AfF10"), Some(vec![0x0a, 0xff, 0x10]));
        assert_eq!(from_hex("0g"), None);
        assert_eq!(from_hex("abc"), None);
        let id = TraceId::parse(&"AB".repeat(16)).unwrap();
        assert_eq!(id.to_string(), "ab".repeat(16));
        assert_eq!(
            TraceId::parse("00").unwrap_err().to_string(),
            "trace id \"00\" must be 32 hex digits"
        );
        assert!(matches!(
            TraceId::parse(&"0".repeat(32)),
            Err(IdError::Zero { .. })
        ));
    }

    #[test]
    fn invalid_ids_are_rejected_one_by_one() {
        let mut short_trace = span(1, 2, 0, 0, 1);
        short_trace.trace_id = vec![1; 4];
        let zero_span = span(1, 0, 0, 0, 1);
        let mut bad_parent = span(1, 3, 0, 0, 1);
        bad_parent.parent_span_id = vec![1; 3];
        let mut good = span(1, 4, 0, 10, 5);
        good.parent_span_id = vec![0; 8];
        good.status = Some(Status {
            message: "boom".into(),
            code: 2,
        });
        good.attributes = vec![
            KeyValue::int("http.response.status_code", 500),
            KeyValue {
                key: "empty".into(),
                value: None,
            },
        ];
        let request = export("orders", vec![short_trace, zero_span, bad_parent, good]);
        let (accepted, rejections) = accept_spans(request);
        assert_eq!(rejections.count, 3);
        assert_eq!(
            rejections.message(),
            "span \"span-2\": trace id must be 16 bytes, got 4 (and 2 more rejected)"
        );
        assert_eq!(accepted.len(), 1);
        let good = &accepted[0];
        assert_eq!(&*good.service, "orders");
        assert_eq!(good.parent_span_id, None);
        assert_eq!(good.status_code, StatusCodeName::Error);
        // An end before the start is clamped: durations are never negative.
        assert_eq!(good.duration_nanos(), 0);
        assert_eq!(
            good.attribute("http.response.status_code"),
            Some(&AttributeValue::Int(500))
        );
        assert_eq!(good.attributes.len(), 1);
    }

    #[test]
    fn spans_without_a_service_name_get_the_default() {
        let mut request = export("", vec![span(1, 1, 0, 0, 1)]);
        request.resource_spans[0].resource = None;
        let (accepted, _) = accept_spans(request);
        assert_eq!(&*accepted[0].service, UNKNOWN_SERVICE);
    }
}
