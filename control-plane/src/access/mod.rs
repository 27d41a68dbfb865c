//! Who may use which API route: the one middleware in front of every route
//! of the control plane (issue 13).
//!
//! ```text
//! request ─► Host check (an IP literal or a configured name, else 421: DNS rebinding)
//!         ─► gate of the matched route (routes.rs: public, or the Action it needs)
//!         ─► credential: `Authorization: Bearer TOKEN`, or for GET/HEAD only the
//!            dashboard's session cookie (sessions.rs) ─► Principal (else 401;
//!            503 when the session store, etcd, cannot answer)
//!         ─► a request that changes state must carry a non-"simple" content type
//!            (JSON, protobuf), so no cross-site form or no-cors fetch can send it (415)
//!         ─► Principal::may(action) (else 403) ─► the handler, with the Principal
//!            as a request extension (the audit actor; instance ownership checks)
//! ```
//!
//! The peer routes (`/api/v1/peer/*`, `Gate::Peer`) take the replicas'
//! credential (`x-meshlet-peer`, see `peers::credential`) and nothing
//! else, and that credential is accepted nowhere else.
//!
//! A session cookie never authorizes a change: it is HttpOnly,
//! SameSite=Strict, Secure, and only GET/HEAD accept it, so a page on
//! another origin can neither read the API nor change anything through a
//! logged-in browser. Refusals are JSON `{"error": ...}` with an
//! `x-meshlet-reason` header (`unauthenticated`, `denied`, `unknown_host`,
//! `unsupported_media_type`, `store_unavailable`).

mod hosts;
mod routes;
mod sessions;

use std::sync::{Arc, RwLock};

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::auth::{AuthError, Principal, Tokens};
use crate::peers::credential::{PeerSecret, PEER_HEADER};

pub use hosts::AllowedHosts;
pub use routes::{gate, Gate};
pub use sessions::{CookieKey, SessionCounts, SessionError, Sessions};

/// What the middleware needs: the token registry (shared with the token
/// management routes, which persist it), the dashboard's sessions and the
/// names this server answers to.
#[derive(Clone)]
pub struct Access {
    pub tokens: Arc<RwLock<Tokens>>,
    pub sessions: Arc<Sessions>,
    pub hosts: Arc<AllowedHosts>,
    /// The replicas' shared credential (`--store etcd`); `None`: every
    /// peer route is refused.
    pub peer: Option<Arc<PeerSecret>>,
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Access").finish_non_exhaustive()
    }
}

impl Access {
    pub fn new(tokens: Arc<RwLock<Tokens>>, hosts: AllowedHosts) -> Access {
        Access {
            tokens,
            sessions: Arc::new(
                Sessions::in_memory().expect("the system's random source (a session cookie key)"),
            ),
            hosts: Arc::new(hosts),
            peer: None,
        }
    }

    /// Keeps the dashboard's sessions in `sessions` (etcd: every replica's).
    pub fn with_sessions(mut self, sessions: Sessions) -> Access {
        self.sessions = Arc::new(sessions);
        self
    }

    /// Accepts the peer credential on the peer routes.
    pub fn with_peer(mut self, secret: Arc<PeerSecret>) -> Access {
        self.peer = Some(secret);
        self
    }

    /// Whether `request` carries this mesh's peer credential.
    fn is_peer(&self, request: &Request) -> bool {
        let presented = request
            .headers()
            .get(PEER_HEADER)
            .and_then(|v| v.to_str().ok());
        match (&self.peer, presented) {
            (Some(secret), Some(presented)) => secret.verify(presented),
            _ => false,
        }
    }

    /// The principal of a bearer token.
    pub fn authenticate_bearer(&self, authorization: &str) -> Result<Principal, AuthError> {
        let tokens = self.tokens.read().unwrap_or_else(|e| e.into_inner());
        tokens.authenticate_header(Some(authorization))
    }

    /// The principal behind a request's credentials: the bearer token, else
    /// (for GET/HEAD) the session cookie.
    /// (Headers and method, not the request: its body is not `Sync`.)
    async fn principal(
        &self,
        headers: &HeaderMap,
        method: &Method,
    ) -> Result<Principal, SessionError> {
        if let Some(authorization) = headers.get(header::AUTHORIZATION) {
            let value = authorization.to_str().map_err(|_| AuthError::Malformed)?;
            return Ok(self.authenticate_bearer(value)?);
        }
        let safe = matches!(*method, Method::GET | Method::HEAD);
        match sessions::cookie(headers) {
            Some(cookie) if safe => self.sessions.principal(cookie, &self.tokens).await,
            _ => Err(AuthError::Missing.into()),
        }
    }
}

/// The middleware (`axum::middleware::from_fn_with_state(access, guard)`).
pub async fn guard(
    State(access): State<Access>,
    matched: Option<MatchedPath>,
    mut request: Request,
    next: Next,
) -> Response {
    // Every Host header must name this server (a request may not smuggle
    // a second one past the check).
    let mut hosts = request.headers().get_all(header::HOST).iter();
    if !hosts.all(|host| access.hosts.allows(host)) {
        return refusal(
            StatusCode::MISDIRECTED_REQUEST,
            "unknown_host",
            "this control plane does not answer to that Host name".to_owned(),
        );
    }
    let path = matched.as_ref().map(MatchedPath::as_str);
    let gate = gate(path);
    if gate == Gate::Public {
        return next.run(request).await;
    }
    if gate == Gate::Peer {
        if access.is_peer(&request) {
            return next.run(request).await;
        }
        return refusal(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "an internal route between control-plane replicas: only a replica of this mesh \
             may call it"
                .to_owned(),
        );
    }
    let principal = match access.principal(request.headers(), request.method()).await {
        Ok(principal) => principal,
        Err(SessionError::Refused(error)) => return unauthenticated(&request, error),
        Err(error) => return session_failure(error),
    };
    if changes_state(request.method()) && !typed_body(&request) {
        return refusal(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "a request that changes state must send Content-Type: application/json \
             (or application/x-protobuf for spans)"
                .to_owned(),
        );
    }
    if let Err(denied) = gate.check(&principal) {
        return refusal(StatusCode::FORBIDDEN, "denied", denied.to_string());
    }
    request.extensions_mut().insert(principal);
    next.run(request).await
}

fn changes_state(method: &Method) -> bool {
    !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// Whether the body's declared type is one a cross-site "simple request"
/// cannot send (those are text/plain, form-urlencoded and multipart). A
/// bodiless request (DELETE) has nothing to forge.
fn typed_body(request: &Request) -> bool {
    let Some(content_type) = request.headers().get(header::CONTENT_TYPE) else {
        let empty = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .is_none_or(|length| length == "0");
        return empty && !request.headers().contains_key(header::TRANSFER_ENCODING);
    };
    let essence = content_type
        .to_str()
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    matches!(
        essence.as_str(),
        "application/json" | "application/x-protobuf" | "application/protobuf"
    )
}

/// 401; a browser asking for the page gets the log-in page instead of JSON.
fn unauthenticated(request: &Request, error: AuthError) -> Response {
    let wants_page = request.method() == Method::GET
        && request.uri().path() == "/"
        && request
            .headers()
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|accept| accept.contains("text/html"));
    if wants_page {
        let mut response = crate::ui::login_page().into_response();
        *response.status_mut() = StatusCode::UNAUTHORIZED;
        return response;
    }
    let mut response = refusal(
        StatusCode::UNAUTHORIZED,
        "unauthenticated",
        error.to_string(),
    );
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"meshlet\""),
    );
    response
}

/// A session store that cannot answer (503, etcd down) or a failure of
/// this process (500); never a log-out.
fn session_failure(error: SessionError) -> Response {
    tracing::warn!(error = %error, "dashboard session");
    match &error {
        SessionError::Store(store) if store.is_unavailable() => refusal(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            format!("{error}; the session is kept, retry when the store is back"),
        ),
        _ => refusal(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            error.to_string(),
        ),
    }
}

/// `POST /api/v1/session {"token": "..."}` (log-in: a viewer or admin
/// token becomes a session cookie) and `DELETE` (log-out).
pub fn session_routes<S: Clone + Send + Sync + 'static>(access: Access) -> axum::Router<S> {
    use axum::routing::post;
    axum::Router::new()
        .route(routes::extra_paths::SESSION, post(log_in).delete(log_out))
        .with_state(access)
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct LogIn {
    token: String,
}

async fn log_in(State(access): State<Access>, request: Request) -> Response {
    if !typed_body(&request) {
        return refusal(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send Content-Type: application/json".to_owned(),
        );
    }
    let body = match axum::body::to_bytes(request.into_body(), 16 * 1024).await {
        Ok(body) => body,
        Err(_) => {
            return refusal(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "unreadable body".to_owned(),
            )
        }
    };
    let Ok(LogIn { token }) = serde_json::from_slice::<LogIn>(&body) else {
        return refusal(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "expected {\"token\": \"...\"}".to_owned(),
        );
    };
    let principal = {
        let tokens = access.tokens.read().unwrap_or_else(|e| e.into_inner());
        tokens.authenticate(token.trim())
    };
    let cookie = match principal {
        Ok(principal) => access.sessions.start(&principal).await,
        Err(refused) => Err(refused.into()),
    };
    match cookie {
        Ok(cookie) => with_cookie(cookie),
        Err(SessionError::Refused(_)) => refusal(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "not a valid viewer or admin token".to_owned(),
        ),
        Err(error) => session_failure(error),
    }
}

async fn log_out(State(access): State<Access>, request: Request) -> Response {
    match access
        .sessions
        .end(sessions::cookie(request.headers()))
        .await
    {
        Ok(cookie) => with_cookie(cookie),
        Err(error) => session_failure(error),
    }
}

/// 204 with `Set-Cookie`.
fn with_cookie(cookie: HeaderValue) -> Response {
    let mut response = StatusCode::NO_CONTENT.into_response();
    response.headers_mut().insert(header::SET_COOKIE, cookie);
    response
}

/// A refusal: status, `x-meshlet-reason`, JSON `{"error": message}`.
pub fn refusal(status: StatusCode, reason: &'static str, message: String) -> Response {
    let body = meshlet_api::mesh::ApiError { error: message };
    let mut response = (status, axum::Json(body)).into_response();
    response
        .headers_mut()
        .insert("x-meshlet-reason", HeaderValue::from_static(reason));
    response
}

#[cfg(test)]
mod tests;
