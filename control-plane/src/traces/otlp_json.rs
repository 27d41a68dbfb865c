//! OTLP/JSON (the OpenTelemetry protocol's JSON encoding) for traces,
//! decoded into the protobuf types of [`meshlet_api::otlp`] so that the
//! store sees one type whatever the encoding.
//!
//! The mapping follows the OTLP specification: lowerCamelCase field names,
//! trace and span ids as hex strings (not base64), 64-bit integers as
//! decimal strings or numbers, enums as integers. Fields this module does
//! not declare (events, links, array values, ...) are ignored, as are
//! non-scalar attribute values. An id that is not hex makes the whole body
//! invalid; an id of the wrong length or all zero is left to the store's
//! checks, which reject that span alone.

use std::str::FromStr;

use meshlet_api::otlp::{
    AnyValue, ExportTraceServiceRequest, ExportTraceServiceResponse, KeyValue, Resource,
    ResourceSpans, ScopeSpans, Span, Status, Value,
};
use serde::{Deserialize, Deserializer, Serialize};

use super::model::from_hex;

/// Why an OTLP/JSON body could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum JsonDecodeError {
    #[error("invalid OTLP/JSON: {0}")]
    Syntax(#[from] serde_json::Error),
    #[error("invalid OTLP/JSON: {field} {text:?} of span {span:?} is not hex")]
    Hex {
        field: &'static str,
        text: String,
        span: String,
    },
}

/// Decodes an `ExportTraceServiceRequest` from OTLP/JSON.
pub fn decode_request(body: &[u8]) -> Result<ExportTraceServiceRequest, JsonDecodeError> {
    let request: JsonRequest = serde_json::from_slice(body)?;
    request.into_otlp()
}

/// Encodes an `ExportTraceServiceResponse` as OTLP/JSON: `{}` or
/// `{"partialSuccess": {"rejectedSpans": "N", "errorMessage": "..."}}`.
pub fn encode_response(response: &ExportTraceServiceResponse) -> Vec<u8> {
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct PartialSuccess<'a> {
        /// int64: a decimal string in the proto3 JSON mapping.
        rejected_spans: String,
        error_message: &'a str,
    }
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Response<'a> {
        #[serde(skip_serializing_if = "Option::is_none")]
        partial_success: Option<PartialSuccess<'a>>,
    }
    let response = Response {
        partial_success: response.partial_success.as_ref().map(|p| PartialSuccess {
            rejected_spans: p.rejected_spans.to_string(),
            error_message: &p.error_message,
        }),
    };
    // Plain structs of strings always serialize.
    serde_json::to_vec(&response).unwrap_or_else(|_| b"{}".to_vec())
}

/// A 64-bit integer written as a number or as a decimal string.
fn lenient_int<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr + Deserialize<'de>,
    T::Err: std::fmt::Display,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Lenient<T> {
        Number(T),
        Text(String),
    }
    match Lenient::<T>::deserialize(d)? {
        Lenient::Number(n) => Ok(n),
        Lenient::Text(text) => text
            .parse()
            .map_err(|e| serde::de::Error::custom(format!("invalid integer {text:?}: {e}"))),
    }
}

fn lenient_int_opt<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr + Deserialize<'de>,
    T::Err: std::fmt::Display,
{
    lenient_int(d).map(Some)
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct JsonRequest {
    #[serde(default)]
    resource_spans: Vec<JsonResourceSpans>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct JsonResourceSpans {
    #[serde(default)]
    resource: Option<JsonResource>,
    #[serde(default)]
    scope_spans: Vec<JsonScopeSpans>,
    #[serde(default)]
    schema_url: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct JsonResource {
    #[serde(default)]
    attributes: Vec<JsonKeyValue>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct JsonScopeSpans {
    #[serde(default)]
    spans: Vec<JsonSpan>,
    #[serde(default)]
    schema_url: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct JsonSpan {
    #[serde(default)]
    trace_id: String,
    #[serde(default)]
    span_id: String,
    #[serde(default)]
    trace_state: String,
    #[serde(default)]
    parent_span_id: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    kind: i32,
    #[serde(default, deserialize_with = "lenient_int")]
    start_time_unix_nano: u64,
    #[serde(default, deserialize_with = "lenient_int")]
    end_time_unix_nano: u64,
    #[serde(default)]
    attributes: Vec<JsonKeyValue>,
    #[serde(default)]
    dropped_attributes_count: u32,
    #[serde(default)]
    status: Option<JsonStatus>,
    #[serde(default)]
    flags: u32,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct JsonStatus {
    #[serde(default)]
    message: String,
    #[serde(default)]
    code: i32,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct JsonKeyValue {
    key: String,
    #[serde(default)]
    value: Option<JsonAnyValue>,
}

/// One of the scalar values; others (`arrayValue`, `kvlistValue`,
/// `bytesValue`) are ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct JsonAnyValue {
    string_value: Option<String>,
    bool_value: Option<bool>,
    #[serde(default, deserialize_with = "lenient_int_opt")]
    int_value: Option<i64>,
    double_value: Option<f64>,
}

impl JsonRequest {
    fn into_otlp(self) -> Result<ExportTraceServiceRequest, JsonDecodeError> {
        let resource_spans = self
            .resource_spans
            .into_iter()
            .map(JsonResourceSpans::into_otlp)
            .collect::<Result<_, _>>()?;
        Ok(ExportTraceServiceRequest { resource_spans })
    }
}

impl JsonResourceSpans {
    fn into_otlp(self) -> Result<ResourceSpans, JsonDecodeError> {
        let scope_spans = self
            .scope_spans
            .into_iter()
            .map(|scope| {
                let spans = scope
                    .spans
                    .into_iter()
                    .map(JsonSpan::into_otlp)
                    .collect::<Result<_, _>>()?;
                Ok(ScopeSpans {
                    scope: None,
                    spans,
                    schema_url: scope.schema_url,
                })
            })
            .collect::<Result<_, JsonDecodeError>>()?;
        Ok(ResourceSpans {
            resource: self.resource.map(|r| Resource {
                attributes: key_values(r.attributes),
                dropped_attributes_count: 0,
            }),
            scope_spans,
            schema_url: self.schema_url,
        })
    }
}

impl JsonSpan {
    fn into_otlp(self) -> Result<Span, JsonDecodeError> {
        let hex = |field: &'static str, text: &str| {
            from_hex(text).ok_or_else(|| JsonDecodeError::Hex {
                field,
                text: text.to_owned(),
                span: self.name.clone(),
            })
        };
        Ok(Span {
            trace_id: hex("traceId", &self.trace_id)?,
            span_id: hex("spanId", &self.span_id)?,
            parent_span_id: hex("parentSpanId", &self.parent_span_id)?,
            trace_state: self.trace_state,
            name: self.name,
            kind: self.kind,
            start_time_unix_nano: self.start_time_unix_nano,
            end_time_unix_nano: self.end_time_unix_nano,
            attributes: key_values(self.attributes),
            dropped_attributes_count: self.dropped_attributes_count,
            status: self.status.map(|s| Status {
                message: s.message,
                code: s.code,
            }),
            flags: self.flags,
        })
    }
}

fn key_values(attributes: Vec<JsonKeyValue>) -> Vec<KeyValue> {
    attributes
        .into_iter()
        .map(|kv| {
            let v = kv.value.unwrap_or_default();
            let value = v
                .string_value
                .map(Value::StringValue)
                .or(v.bool_value.map(Value::BoolValue))
                .or(v.int_value.map(Value::IntValue))
                .or(v.double_value.map(Value::DoubleValue));
            KeyValue {
                key: kv.key,
                value: Some(AnyValue { value }),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshlet_api::otlp::ExportTracePartialSuccess;

    const EXPORT: &str = r#"{
      "resourceSpans": [{
        "resource": {"attributes": [
          {"key": "service.name", "value": {"stringValue": "orders"}},
          {"key": "host.tags", "value": {"arrayValue": {"values": []}}}
        ]},
        "scopeSpans": [{
          "scope": {"name": "meshlet"},
          "spans": [{
            "traceId": "5B8EFFF798038103D269B633813FC60C",
            "spanId": "eee19b7ec3c1b174",
            "parentSpanId": "",
            "name": "GET /orders",
            "kind": 2,
            "startTimeUnixNano": "1544712660000000000",
            "endTimeUnixNano": 1544712661000000000,
            "attributes": [
              {"key": "http.response.status_code", "value": {"intValue": "200"}},
              {"key": "retries", "value": {"intValue": 2}},
              {"key": "cached", "value": {"boolValue": false}},
              {"key": "ratio", "value": {"doubleValue": 0.5}}
            ],
            "events": [{"name": "ignored"}],
            "status": {"code": 2, "message": "boom"},
            "droppedLinksCount": 3
          }]
        }]
      }]
    }"#;

    #[test]
    fn a_collector_export_decodes_into_the_protobuf_types() {
        let request = decode_request(EXPORT.as_bytes()).unwrap();
        let resource = &request.resource_spans[0];
        assert_eq!(
            resource.resource.as_ref().unwrap().attributes[0],
            KeyValue::string("service.name", "orders")
        );
        let span = &resource.scope_spans[0].spans[0];
        assert_eq!(span.trace_id[0], 0x5b);
        assert_eq!(span.trace_id.len(), 16);
        assert_eq!(span.span_id.len(), 8);
        assert!(span.parent_span_id.is_empty());
        assert_eq!(span.kind, 2);
        assert_eq!(span.start_time_unix_nano, 1_544_712_660_000_000_000);
        assert_eq!(span.end_time_unix_nano, 1_544_712_661_000_000_000);
        assert_eq!(
            span.attribute("http.response.status_code"),
            Some(&Value::IntValue(200))
        );
        assert_eq!(span.attribute("retries"), Some(&Value::IntValue(2)));
        assert_eq!(span.attribute("cached"), Some(&Value::BoolValue(false)));
        assert_eq!(span.attribute("ratio"), Some(&Value::DoubleValue(0.5)));
        assert_eq!(span.status.as_ref().unwrap().code, 2);
    }

    #[test]
    fn bad_bodies_say_why() {
        let err = decode_request(b"{\"resourceSpans\": 1}").unwrap_err();
        assert!(err.to_string().starts_with("invalid OTLP/JSON: "), "{err}");
        let body = r#"{"resourceSpans":[{"scopeSpans":[{"spans":[
            {"traceId":"zz","spanId":"01","name":"x"}]}]}]}"#;
        assert_eq!(
            decode_request(body.as_bytes()).unwrap_err().to_string(),
            "invalid OTLP/JSON: traceId \"zz\" of span \"x\" is not hex"
        );
        let body = r#"{"resourceSpans":[{"scopeSpans":[{"spans":[
            {"traceId":"01","spanId":"01","startTimeUnixNano":"soon"}]}]}]}"#;
        let err = decode_request(body.as_bytes()).unwrap_err().to_string();
        assert!(err.contains("invalid integer \"soon\""), "{err}");
    }

    #[test]
    fn responses_are_empty_or_a_partial_success() {
        assert_eq!(
            encode_response(&ExportTraceServiceResponse::default()),
            b"{}"
        );
        let partial = ExportTraceServiceResponse {
            partial_success: Some(ExportTracePartialSuccess {
                rejected_spans: 2,
                error_message: "bad id".into(),
            }),
        };
        assert_eq!(
            String::from_utf8(encode_response(&partial)).unwrap(),
            r#"{"partialSuccess":{"rejectedSpans":"2","errorMessage":"bad id"}}"#
        );
    }
}
