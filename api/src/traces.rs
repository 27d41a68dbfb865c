//! The trace API's JSON types, shared by the control plane's handlers and
//! meshctl (`traces`, `trace`): a list of [`TraceSummary`] from
//! `GET /api/traces` and one [`TraceDetail`] from `GET /api/traces/{id}`.
//! camelCase like the rest of the API; ids are lowercase hex.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Routes of the trace API (the OTLP receiver is at
/// [`crate::otlp::TRACES_PATH`]).
pub mod paths {
    /// `GET ?service=&minDuration=&limit=`: summaries, newest first.
    pub const TRACES: &str = "/api/traces";

    /// `GET`: one trace, spans sorted by start time.
    pub fn trace(id: &str) -> String {
        format!("{TRACES}/{id}")
    }
}

/// One trace in the list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TraceSummary {
    pub trace_id: String,
    /// Service and name of the span without a parent (or the earliest).
    pub root_service: String,
    pub root_name: String,
    pub start_unix_nano: u64,
    /// Latest end minus earliest start.
    pub duration_micros: f64,
    pub span_count: usize,
    /// Every service with a span in the trace, sorted.
    pub services: Vec<String>,
    /// Some span has status `error`.
    pub error: bool,
}

/// One trace with all its stored spans.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TraceDetail {
    pub trace_id: String,
    pub spans: Vec<SpanView>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SpanView {
    pub span_id: String,
    /// `None` for a root span.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_span_id: Option<String>,
    pub name: String,
    pub kind: SpanKindName,
    pub service: String,
    pub start_unix_nano: u64,
    pub end_unix_nano: u64,
    pub duration_micros: f64,
    pub status: SpanStatus,
    #[serde(default)]
    pub attributes: BTreeMap<String, AttributeValue>,
}

/// OTLP's span kinds, by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SpanKindName {
    Unspecified,
    Internal,
    Server,
    Client,
    Producer,
    Consumer,
}

impl SpanKindName {
    /// From OTLP's enum number; unknown numbers are `unspecified`.
    pub fn from_otlp(kind: i32) -> SpanKindName {
        use crate::otlp::SpanKind;
        match SpanKind::try_from(kind) {
            Ok(SpanKind::Internal) => SpanKindName::Internal,
            Ok(SpanKind::Server) => SpanKindName::Server,
            Ok(SpanKind::Client) => SpanKindName::Client,
            Ok(SpanKind::Producer) => SpanKindName::Producer,
            Ok(SpanKind::Consumer) => SpanKindName::Consumer,
            Ok(SpanKind::Unspecified) | Err(_) => SpanKindName::Unspecified,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SpanKindName::Unspecified => "unspecified",
            SpanKindName::Internal => "internal",
            SpanKindName::Server => "server",
            SpanKindName::Client => "client",
            SpanKindName::Producer => "producer",
            SpanKindName::Consumer => "consumer",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StatusCodeName {
    Unset,
    Ok,
    Error,
}

impl StatusCodeName {
    /// From OTLP's enum number; unknown numbers are `unset`.
    pub fn from_otlp(code: i32) -> StatusCodeName {
        use crate::otlp::StatusCode;
        match StatusCode::try_from(code) {
            Ok(StatusCode::Ok) => StatusCodeName::Ok,
            Ok(StatusCode::Error) => StatusCodeName::Error,
            Ok(StatusCode::Unset) | Err(_) => StatusCodeName::Unset,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpanStatus {
    pub code: StatusCodeName,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

/// A scalar attribute value, as plain JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum AttributeValue {
    Bool(bool),
    Int(i64),
    Double(f64),
    String(String),
}

impl std::fmt::Display for AttributeValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AttributeValue::Bool(v) => write!(f, "{v}"),
            AttributeValue::Int(v) => write!(f, "{v}"),
            AttributeValue::Double(v) => write!(f, "{v}"),
            AttributeValue::String(v) => f.write_str(v),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attribute_values_keep_their_json_type() {
        let values: BTreeMap<String, AttributeValue> =
            serde_json::from_str(r#"{"a": true, "b": 200, "c": 1.5, "d": "x", "e": 2.0}"#).unwrap();
        assert_eq!(values["a"], AttributeValue::Bool(true));
        assert_eq!(values["b"], AttributeValue::Int(200));
        assert_eq!(values["c"], AttributeValue::Double(1.5));
        assert_eq!(values["d"], AttributeValue::String("x".into()));
        assert_eq!(values["e"], AttributeValue::Double(2.0));
        assert_eq!(
            serde_json::to_string(&values).unwrap(),
            r#"{"a":true,"b":200,"c":1.5,"d":"x","e":2.0}"#
        );
    }

    #[test]
    fn kinds_and_codes_by_name() {
        assert_eq!(SpanKindName::from_otlp(2), SpanKindName::Server);
        assert_eq!(SpanKindName::from_otlp(99), SpanKindName::Unspecified);
        assert_eq!(StatusCodeName::from_otlp(2), StatusCodeName::Error);
        assert_eq!(
            serde_json::to_string(&SpanKindName::Client).unwrap(),
            "\"client\""
        );
    }
}
