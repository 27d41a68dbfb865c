//! OTLP trace messages (OpenTelemetry protocol, `opentelemetry/proto/trace/v1`
//! and `collector/trace/v1`), as protobuf structs with the official field
//! numbers.
//!
//! Only what meshlet writes and reads is declared; protobuf skips fields a
//! decoder does not know, so spans from any OpenTelemetry SDK or collector
//! decode into these types (events and links are dropped). Sidecars encode
//! an [`ExportTraceServiceRequest`] and POST it to `/v1/traces` with
//! `content-type: application/x-protobuf`; the control plane decodes it.

pub use prost::Message;

/// The path an OTLP/HTTP receiver serves traces on.
pub const TRACES_PATH: &str = "/v1/traces";
/// Content type of protobuf-encoded OTLP/HTTP bodies.
pub const PROTOBUF_CONTENT_TYPE: &str = "application/x-protobuf";
/// Content type of JSON-encoded OTLP/HTTP bodies.
pub const JSON_CONTENT_TYPE: &str = "application/json";

/// `ExportTraceServiceRequest`: the body of one export.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ExportTraceServiceRequest {
    #[prost(message, repeated, tag = "1")]
    pub resource_spans: Vec<ResourceSpans>,
}

/// `ExportTraceServiceResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ExportTraceServiceResponse {
    #[prost(message, optional, tag = "1")]
    pub partial_success: Option<ExportTracePartialSuccess>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ExportTracePartialSuccess {
    #[prost(int64, tag = "1")]
    pub rejected_spans: i64,
    #[prost(string, tag = "2")]
    pub error_message: String,
}

/// Spans of one resource (for meshlet: one sidecar, `service.name`).
#[derive(Clone, PartialEq, prost::Message)]
pub struct ResourceSpans {
    #[prost(message, optional, tag = "1")]
    pub resource: Option<Resource>,
    #[prost(message, repeated, tag = "2")]
    pub scope_spans: Vec<ScopeSpans>,
    #[prost(string, tag = "3")]
    pub schema_url: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Resource {
    #[prost(message, repeated, tag = "1")]
    pub attributes: Vec<KeyValue>,
    #[prost(uint32, tag = "2")]
    pub dropped_attributes_count: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ScopeSpans {
    #[prost(message, optional, tag = "1")]
    pub scope: Option<InstrumentationScope>,
    #[prost(message, repeated, tag = "2")]
    pub spans: Vec<Span>,
    #[prost(string, tag = "3")]
    pub schema_url: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct InstrumentationScope {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub version: String,
}

/// One span. Ids are raw bytes (16 for a trace, 8 for a span; empty
/// `parent_span_id` for a root span); times are Unix nanoseconds.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Span {
    #[prost(bytes = "vec", tag = "1")]
    pub trace_id: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    pub span_id: Vec<u8>,
    #[prost(string, tag = "3")]
    pub trace_state: String,
    #[prost(bytes = "vec", tag = "4")]
    pub parent_span_id: Vec<u8>,
    #[prost(string, tag = "5")]
    pub name: String,
    #[prost(enumeration = "SpanKind", tag = "6")]
    pub kind: i32,
    #[prost(fixed64, tag = "7")]
    pub start_time_unix_nano: u64,
    #[prost(fixed64, tag = "8")]
    pub end_time_unix_nano: u64,
    #[prost(message, repeated, tag = "9")]
    pub attributes: Vec<KeyValue>,
    #[prost(uint32, tag = "10")]
    pub dropped_attributes_count: u32,
    #[prost(message, optional, tag = "15")]
    pub status: Option<Status>,
    #[prost(fixed32, tag = "16")]
    pub flags: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum SpanKind {
    Unspecified = 0,
    Internal = 1,
    Server = 2,
    Client = 3,
    Producer = 4,
    Consumer = 5,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Status {
    #[prost(string, tag = "2")]
    pub message: String,
    #[prost(enumeration = "StatusCode", tag = "3")]
    pub code: i32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum StatusCode {
    Unset = 0,
    Ok = 1,
    Error = 2,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct KeyValue {
    #[prost(string, tag = "1")]
    pub key: String,
    #[prost(message, optional, tag = "2")]
    pub value: Option<AnyValue>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct AnyValue {
    #[prost(oneof = "Value", tags = "1, 2, 3, 4")]
    pub value: Option<Value>,
}

/// The scalar attribute values (arrays, maps and bytes are skipped on
/// decode).
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Value {
    #[prost(string, tag = "1")]
    StringValue(String),
    #[prost(bool, tag = "2")]
    BoolValue(bool),
    #[prost(int64, tag = "3")]
    IntValue(i64),
    #[prost(double, tag = "4")]
    DoubleValue(f64),
}

impl KeyValue {
    pub fn string(key: &str, value: impl Into<String>) -> Self {
        Self::new(key, Value::StringValue(value.into()))
    }

    pub fn int(key: &str, value: i64) -> Self {
        Self::new(key, Value::IntValue(value))
    }

    pub fn bool(key: &str, value: bool) -> Self {
        Self::new(key, Value::BoolValue(value))
    }

    fn new(key: &str, value: Value) -> Self {
        KeyValue {
            key: key.to_owned(),
            value: Some(AnyValue { value: Some(value) }),
        }
    }
}

impl Span {
    /// The value of attribute `key`, if it is present and scalar.
    pub fn attribute(&self, key: &str) -> Option<&Value> {
        self.attributes
            .iter()
            .find(|kv| kv.key == key)
            .and_then(|kv| kv.value.as_ref()?.value.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_round_trips_through_protobuf() {
        let span = Span {
            trace_id: vec![1; 16],
            span_id: vec![2; 8],
            parent_span_id: vec![3; 8],
            name: "GET /orders".into(),
            kind: SpanKind::Server as i32,
            start_time_unix_nano: 1_700_000_000_000_000_000,
            end_time_unix_nano: 1_700_000_000_000_250_000,
            attributes: vec![
                KeyValue::string("http.route", "/orders"),
                KeyValue::int("http.response.status_code", 200),
            ],
            flags: 1,
            ..Default::default()
        };
        let request = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![KeyValue::string("service.name", "orders")],
                    dropped_attributes_count: 0,
                }),
                scope_spans: vec![ScopeSpans {
                    spans: vec![span.clone()],
                    ..Default::default()
                }],
                schema_url: String::new(),
            }],
        };
        let bytes = request.encode_to_vec();
        let decoded = ExportTraceServiceRequest::decode(bytes.as_slice()).unwrap();
        assert_eq!(decoded, request);
        let got = &decoded.resource_spans[0].scope_spans[0].spans[0];
        assert_eq!(
            got.attribute("http.response.status_code"),
            Some(&Value::IntValue(200))
        );
    }

    #[test]
    fn unknown_fields_from_other_exporters_are_skipped() {
        // A span with a field meshlet does not declare (11: events) still
        // decodes.
        let mut bytes = Span {
            name: "x".into(),
            ..Default::default()
        }
        .encode_to_vec();
        // field 11, wire type 2 (length-delimited), length 2, payload
        bytes.extend_from_slice(&[(11 << 3) | 2, 2, 0x0a, 0x00]);
        let span = Span::decode(bytes.as_slice()).unwrap();
        assert_eq!(span.name, "x");
    }
}
