//! The dashboard's log-in sessions: a viewer or admin token, given once on
//! the log-in page, becomes a random session id in an HttpOnly,
//! SameSite=Strict, Secure cookie, so the page's script never holds the
//! token. A session is as good as its token: revoking or expiring the token
//! ends it, and it lasts at most [`SESSION_TTL`]. Sessions live in memory
//! (a restart logs everyone out), at most [`MAX_SESSIONS`], the oldest
//! dropped first. Only GET/HEAD accept a session (see the module above).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use axum::http::{header, HeaderMap, HeaderValue};

use crate::auth::{AuthError, Principal, Role, TokenHash, Tokens};

pub const SESSION_COOKIE: &str = "meshlet_session";
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
pub const MAX_SESSIONS: usize = 1024;

#[derive(Debug, Clone)]
struct Session {
    token_name: String,
    expires: SystemTime,
    created: SystemTime,
}

/// Session ids (hashed, like tokens) → the token they stand for.
#[derive(Debug, Default)]
pub struct Sessions {
    by_hash: Mutex<HashMap<TokenHash, Session>>,
}

impl Sessions {
    /// Starts a session for `principal` (viewer or admin only); returns the
    /// `Set-Cookie` value.
    pub fn start(&self, principal: &Principal) -> Result<HeaderValue, AuthError> {
        if matches!(principal.role, Role::Sidecar { .. }) {
            return Err(AuthError::Unknown);
        }
        let id = crate::auth::tokens::generate().map_err(|_| AuthError::Unknown)?;
        let now = SystemTime::now();
        let mut sessions = self.by_hash.lock().unwrap_or_else(|e| e.into_inner());
        sessions.retain(|_, s| s.expires > now);
        if sessions.len() >= MAX_SESSIONS {
            if let Some(oldest) = sessions
                .iter()
                .min_by_key(|(_, s)| s.created)
                .map(|(hash, _)| *hash)
            {
                sessions.remove(&oldest);
            }
        }
        sessions.insert(
            TokenHash::of(id.as_str()),
            Session {
                token_name: principal.name.clone(),
                expires: now + SESSION_TTL,
                created: now,
            },
        );
        let cookie = format!(
            "{SESSION_COOKIE}={}; Path=/; HttpOnly; Secure; SameSite=Strict; Max-Age={}",
            id.as_str(),
            SESSION_TTL.as_secs()
        );
        HeaderValue::from_str(&cookie).map_err(|_| AuthError::Malformed)
    }

    /// Ends the session `id` (log-out); the `Set-Cookie` that clears it.
    pub fn end(&self, id: Option<&str>) -> HeaderValue {
        if let Some(id) = id {
            let mut sessions = self.by_hash.lock().unwrap_or_else(|e| e.into_inner());
            sessions.remove(&TokenHash::of(id));
        }
        HeaderValue::from_static(
            "meshlet_session=; Path=/; HttpOnly; Secure; SameSite=Strict; Max-Age=0",
        )
    }

    /// The principal of session `id`, if it and its token are still valid.
    pub fn principal(&self, id: &str, tokens: &Tokens) -> Result<Principal, AuthError> {
        let now = SystemTime::now();
        let session = {
            let sessions = self.by_hash.lock().unwrap_or_else(|e| e.into_inner());
            sessions.get(&TokenHash::of(id)).cloned()
        };
        let session = session
            .filter(|s| s.expires > now)
            .ok_or(AuthError::Unknown)?;
        let record = tokens.get(&session.token_name).ok_or(AuthError::Unknown)?;
        if record.is_expired_at(now) {
            return Err(AuthError::Expired {
                name: record.name.clone(),
            });
        }
        Ok(Principal {
            name: record.name.clone(),
            role: record.role.clone(),
        })
    }
}

/// The session id in a request's `Cookie` headers.
pub fn cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == SESSION_COOKIE)
        .map(|(_, value)| value)
}
