//! Error types of the control plane.
//!
//! - [`StoreError`]: a durable-store operation failed; carries what was being
//!   done (opening which file, committing which revision).
//! - [`StartupError`]: the `control-plane` binary could not start (data dir,
//!   store, files, CA, admin token, listener); `main` prints it as one line and exits non-zero.
//! - [`ApiFailure`]: what an HTTP handler answers instead of a success; it is
//!   the one place a failure becomes a status code and an `ApiError` body.

use std::net::SocketAddr;
use std::path::PathBuf;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use meshlet_api::mesh::ApiError;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the store {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: redb::Error,
    },
    #[error("cannot read the store: {0}")]
    Read(#[source] redb::Error),
    #[error("cannot write the credentials to the store: {0}")]
    Write(#[source] redb::Error),
    #[error("cannot commit revision {revision} to the store: {source}")]
    Commit {
        revision: u64,
        #[source]
        source: redb::Error,
    },
    #[error("the store holds an unreadable {what} record {key:?}: {source}")]
    Decode {
        what: &'static str,
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot encode a {what} record: {source}")]
    Encode {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("the store task failed: {0}")]
    Task(String),
    /// `--store etcd`: an etcd request failed.
    #[error("etcd: cannot {doing}: {source} (is a quorum of the etcd members up and reachable?)")]
    Etcd {
        doing: String,
        #[source]
        source: etcd_client::Error,
    },
    /// `--store etcd`: an etcd request got no answer in time (typically: no quorum).
    #[error("etcd: cannot {doing}: no answer within {after:?} (no quorum, or etcd unreachable)")]
    EtcdTimeout {
        doing: String,
        after: std::time::Duration,
    },
    /// `--store etcd`: a revision's transaction was sent but etcd did not
    /// confirm it in time. Unlike a refused request its outcome is unknown:
    /// a proposal etcd accepted before losing its quorum commits when the
    /// quorum returns, and every replica then applies it from its watch.
    #[error(
        "etcd: revision {revision} was sent but not confirmed within {after:?} (no quorum, or \
         etcd unreachable): it may still take effect when the etcd quorum returns; \
         `meshctl history` shows whether it did"
    )]
    EtcdUnconfirmed {
        revision: u64,
        after: std::time::Duration,
    },
    /// `--store etcd`: another replica committed this revision number first.
    #[error(
        "conflict: another control-plane replica committed revision {revision} first \
         (the store is at revision {current}); nothing of this change was written, retry it"
    )]
    Conflict { revision: u64, current: u64 },
    #[error("the store holds an unreadable value: {0}")]
    Corrupt(String),
    #[error("store configuration: {0}")]
    Config(String),
}

impl StoreError {
    /// Another replica won the revision (the caller may plan again).
    pub fn is_conflict(&self) -> bool {
        matches!(self, StoreError::Conflict { .. })
    }

    /// The store cannot be reached or has no quorum (503).
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            StoreError::Etcd { .. }
                | StoreError::EtcdTimeout { .. }
                | StoreError::EtcdUnconfirmed { .. }
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("data directory {path} is not usable: {source}")]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("data directory: {0}")]
    Files(#[from] crate::files::FileError),
    #[error("mesh CA: {0}")]
    Ca(#[from] crate::ca::CaError),
    #[error("admin token: {0}")]
    AdminToken(#[from] crate::auth::AdminTokenError),
    #[error("stored tokens: {0}")]
    Tokens(#[from] crate::auth::TokenError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot install the signal handler: {0}")]
    Signal(#[source] std::io::Error),
}

/// A failed API request: status and message of the `ApiError` body.
#[derive(Debug, thiserror::Error)]
pub enum ApiFailure {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    /// The caller's token may not do this.
    #[error("{0}")]
    Forbidden(String),
    /// Another credential holds the instance id.
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    /// A cap on what one caller may hold was reached (429).
    #[error("{0}")]
    LimitReached(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("{0}")]
    Store(#[from] StoreError),
    /// A bug or an unexpected condition; logged.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiFailure {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiFailure::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiFailure::NotFound(_) => StatusCode::NOT_FOUND,
            ApiFailure::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiFailure::Conflict(_) => StatusCode::CONFLICT,
            ApiFailure::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiFailure::LimitReached(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiFailure::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiFailure::Store(e) if e.is_conflict() => StatusCode::CONFLICT,
            ApiFailure::Store(e) if e.is_unavailable() => StatusCode::SERVICE_UNAVAILABLE,
            ApiFailure::Store(_) | ApiFailure::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for ApiFailure {
    fn into_response(self) -> Response {
        match &self {
            ApiFailure::Store(err) => tracing::error!(error = %err, "store failure"),
            ApiFailure::Internal(err) => tracing::error!(error = %err, "internal error"),
            _ => {}
        }
        let body = ApiError {
            error: self.to_string(),
        };
        (self.status(), Json(body)).into_response()
    }
}
