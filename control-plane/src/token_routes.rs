//! Token management (`/api/v1/tokens`, admin only: the access guard's
//! gate): list, create (the plaintext is answered once), revoke. Every
//! change is persisted through the store before it is answered; a revoked
//! token fails from its next request on, and the dashboard sessions made
//! with it end with it (a session checks its token on every request). The
//! instances a revoked sidecar token registered stay registered until they
//! expire or an admin deregisters them.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::{Json, Router};
use meshlet_api::access::{paths, CreateToken, CreatedToken, TokenInfo, TokenList};

use crate::auth::{self, Role, TokenError, TokenRecord, Tokens};
use crate::error::{ApiFailure, StoreError};
use crate::extract::json_body;
use crate::state::AppState;

/// `GET`/`POST /api/v1/tokens`, `DELETE /api/v1/tokens/{name}`.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route(paths::TOKENS, get(list).post(create))
        .route(&paths::token("{name}"), delete(revoke))
}

/// The wire form of a stored token.
fn info(record: &TokenRecord, now: std::time::SystemTime) -> TokenInfo {
    let (namespace, service) = match &record.role {
        Role::Sidecar { namespace, service } => (Some(namespace.clone()), Some(service.clone())),
        Role::Admin | Role::Viewer => (None, None),
    };
    TokenInfo {
        name: record.name.clone(),
        role: record.role.kind().to_owned(),
        namespace,
        service,
        created_at: record.created_at,
        expires_at: record.expires_at,
        expired: record.is_expired_at(now),
    }
}

fn token_failure(error: TokenError) -> ApiFailure {
    match error {
        TokenError::NotFound { .. } => ApiFailure::NotFound(error.to_string()),
        TokenError::NameTaken { .. } => ApiFailure::Conflict(error.to_string()),
        TokenError::Random => ApiFailure::Internal(error.to_string()),
        _ => ApiFailure::BadRequest(error.to_string()),
    }
}

/// Saves every token record (on the blocking pool).
async fn persist(state: &AppState, tokens: &Tokens) -> Result<(), StoreError> {
    let records: Vec<TokenRecord> = tokens.records().cloned().collect();
    let store = state.store.clone();
    tokio::task::spawn_blocking(move || store.save_tokens(&records))
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
}

async fn list(State(state): State<AppState>) -> Json<TokenList> {
    let now = std::time::SystemTime::now();
    let tokens = state
        .access
        .tokens
        .read()
        .unwrap_or_else(|e| e.into_inner());
    Json(TokenList {
        tokens: tokens.records().map(|r| info(r, now)).collect(),
    })
}

/// One change at a time: the registry is copied, changed, persisted and
/// only then swapped in, so a failed save changes nothing.
async fn change<T>(
    state: &AppState,
    edit: impl FnOnce(&mut Tokens) -> Result<T, ApiFailure>,
) -> Result<T, ApiFailure> {
    let _one_writer = state.token_writer.lock().await;
    let mut next = state
        .access
        .tokens
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let out = edit(&mut next)?;
    persist(state, &next).await?;
    *state
        .access
        .tokens
        .write()
        .unwrap_or_else(|e| e.into_inner()) = next;
    Ok(out)
}

async fn create(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiFailure> {
    let request: CreateToken = json_body(body)?;
    let role = Role::from_parts(
        &request.role,
        request.namespace.as_deref(),
        request.service.as_deref(),
    )
    .map_err(|e| ApiFailure::BadRequest(e.to_string()))?;
    let ttl = match request.ttl_seconds {
        Some(0) => {
            return Err(ApiFailure::BadRequest(
                "ttlSeconds must be at least 1".into(),
            ))
        }
        ttl => ttl.map(Duration::from_secs),
    };
    let (secret, record) = change(&state, |tokens| {
        tokens
            .create(&request.name, role, ttl)
            .map_err(token_failure)
    })
    .await?;
    tracing::info!(token = %record.name, role = %record.role, "token created");
    let reply = CreatedToken {
        token: secret.into_string(),
        info: info(&record, std::time::SystemTime::now()),
    };
    Ok((StatusCode::CREATED, Json(reply)).into_response())
}

async fn revoke(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<TokenInfo>, ApiFailure> {
    if name == auth::admin_file::ADMIN_TOKEN_NAME {
        return Err(ApiFailure::BadRequest(
            "the bootstrap admin token is not revoked through the API: delete DATA_DIR/admin.token and restart to rotate it".into(),
        ));
    }
    let record = change(&state, |tokens| tokens.revoke(&name).map_err(token_failure)).await?;
    tracing::info!(token = %record.name, "token revoked");
    Ok(Json(info(&record, std::time::SystemTime::now())))
}
