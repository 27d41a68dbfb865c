//! The OTLP/HTTP trace receiver, `POST /v1/traces`.
//!
//! Data flow: `content-type` picks the encoding (protobuf or JSON; anything
//! else is 415) → the body (at most [`MAX_BODY`], else 413) is decoded into
//! an `ExportTraceServiceRequest` (400 if it cannot be; bodies over 64 KiB
//! on the blocking pool) → the [`TraceStore`] validates and stores its
//! spans under a short lock → the
//! answer is an `ExportTraceServiceResponse` in the request's encoding,
//! with a partial success when some spans were rejected. Failures are
//! [`ApiFailure`]s, so they carry the API's JSON error body.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use meshlet_api::otlp::{
    ExportTracePartialSuccess, ExportTraceServiceRequest, ExportTraceServiceResponse, Message,
    JSON_CONTENT_TYPE, PROTOBUF_CONTENT_TYPE,
};

use super::otlp_json;
use super::store::TraceStore;
use crate::error::ApiFailure;
use crate::events::Activity;

/// The largest export body accepted.
pub const MAX_BODY: usize = 4 * 1024 * 1024;
/// Larger bodies are decoded on the blocking pool.
const INLINE_DECODE: usize = 64 * 1024;

/// The two encodings of OTLP/HTTP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Protobuf,
    Json,
}

impl Encoding {
    /// From a `content-type` value (parameters such as `charset` ignored).
    pub fn from_content_type(value: &str) -> Option<Encoding> {
        let essence = value.split(';').next().unwrap_or("").trim();
        if essence.eq_ignore_ascii_case(PROTOBUF_CONTENT_TYPE) {
            Some(Encoding::Protobuf)
        } else if essence.eq_ignore_ascii_case(JSON_CONTENT_TYPE) {
            Some(Encoding::Json)
        } else {
            None
        }
    }

    fn content_type(self) -> &'static str {
        match self {
            Encoding::Protobuf => PROTOBUF_CONTENT_TYPE,
            Encoding::Json => JSON_CONTENT_TYPE,
        }
    }

    fn decode(self, body: &[u8]) -> Result<ExportTraceServiceRequest, ApiFailure> {
        match self {
            Encoding::Protobuf => ExportTraceServiceRequest::decode(body)
                .map_err(|e| ApiFailure::BadRequest(format!("invalid OTLP protobuf: {e}"))),
            Encoding::Json => {
                otlp_json::decode_request(body).map_err(|e| ApiFailure::BadRequest(e.to_string()))
            }
        }
    }

    fn encode(self, response: &ExportTraceServiceResponse) -> Vec<u8> {
        match self {
            Encoding::Protobuf => response.encode_to_vec(),
            Encoding::Json => otlp_json::encode_response(response),
        }
    }
}

/// The request's encoding; 415 for a missing or other content type, or a
/// compressed body (not supported).
fn encoding_of(headers: &HeaderMap) -> Result<Encoding, ApiFailure> {
    let unsupported = |what: String| {
        ApiFailure::UnsupportedMediaType(format!(
            "{what}: send OTLP as {PROTOBUF_CONTENT_TYPE} or {JSON_CONTENT_TYPE}, uncompressed"
        ))
    };
    if let Some(coding) = headers.get(header::CONTENT_ENCODING) {
        if !coding.as_bytes().eq_ignore_ascii_case(b"identity") {
            return Err(unsupported(format!(
                "content-encoding {:?} is not supported",
                String::from_utf8_lossy(coding.as_bytes())
            )));
        }
    }
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .ok_or_else(|| unsupported("no content-type".into()))?;
    let text = String::from_utf8_lossy(content_type.as_bytes());
    Encoding::from_content_type(&text)
        .ok_or_else(|| unsupported(format!("content-type {text:?} is not supported")))
}

/// `POST /v1/traces`.
pub async fn receive(
    State(store): State<Arc<TraceStore>>,
    State(activity): State<Activity>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiFailure> {
    let encoding = encoding_of(&headers)?;
    let body = body.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiFailure::PayloadTooLarge(format!(
            "the export is larger than {} MiB; send smaller batches",
            MAX_BODY >> 20
        )),
        _ => ApiFailure::BadRequest(format!("cannot read the body: {e}")),
    })?;
    let body_len = body.len();
    let work = move || {
        let request = encoding.decode(&body)?;
        Ok::<_, ApiFailure>(store.ingest(request, Instant::now()))
    };
    // Decoding a large export takes milliseconds: off the API's threads.
    let outcome = if body_len > INLINE_DECODE {
        tokio::task::spawn_blocking(work)
            .await
            .map_err(|e| ApiFailure::Internal(format!("the decoding task failed: {e}")))??
    } else {
        work()?
    };
    if outcome.stored > 0 {
        activity.notify();
    }
    let response = ExportTraceServiceResponse {
        partial_success: (outcome.rejected.count > 0).then(|| ExportTracePartialSuccess {
            rejected_spans: outcome.rejected.count as i64,
            error_message: outcome.rejected.message(),
        }),
    };
    Ok((
        [(header::CONTENT_TYPE, encoding.content_type())],
        encoding.encode(&response),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_types() {
        assert_eq!(
            Encoding::from_content_type("application/x-protobuf"),
            Some(Encoding::Protobuf)
        );
        assert_eq!(
            Encoding::from_content_type("Application/JSON; charset=utf-8"),
            Some(Encoding::Json)
        );
        assert_eq!(Encoding::from_content_type("text/plain"), None);
        let mut headers = HeaderMap::new();
        assert!(matches!(
            encoding_of(&headers),
            Err(ApiFailure::UnsupportedMediaType(_))
        ));
        headers.insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
        assert_eq!(encoding_of(&headers).unwrap(), Encoding::Json);
        headers.insert(header::CONTENT_ENCODING, "gzip".parse().unwrap());
        let err = encoding_of(&headers).unwrap_err().to_string();
        assert!(
            err.starts_with("content-encoding \"gzip\" is not supported"),
            "{err}"
        );
    }
}
