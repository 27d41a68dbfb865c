//! Request decoding shared by the handlers: a JSON body decoded strictly
//! and a query string, each failure a 400 ([`ApiFailure::BadRequest`])
//! that names the problem.

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::Query;
use serde::de::DeserializeOwned;

use crate::error::ApiFailure;

/// Decodes a JSON body strictly; any problem is a 400 naming it, a body
/// past the route's limit a 413.
pub fn json_body<T: DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiFailure> {
    let body = body.map_err(|e| {
        if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
            ApiFailure::PayloadTooLarge(format!("request body too large: {e}"))
        } else {
            ApiFailure::BadRequest(format!("cannot read the body: {e}"))
        }
    })?;
    serde_json::from_slice(&body)
        .map_err(|e| ApiFailure::BadRequest(format!("invalid request body: {e}")))
}

pub fn query<T>(query: Result<Query<T>, QueryRejection>) -> Result<T, ApiFailure> {
    query
        .map(|Query(q)| q)
        .map_err(|e| ApiFailure::BadRequest(format!("invalid query: {}", e.body_text())))
}
