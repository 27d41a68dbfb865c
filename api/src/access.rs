//! The wire types of the control plane's credentials (issue 13): token
//! management (`/api/v1/tokens`, admin only), the dashboard's log-in
//! (`/api/v1/session`) and the file names of the bootstrap material in the
//! control plane's data directory. The control plane (which holds the
//! tokens, hashed) and meshctl (`meshctl token ...`) both use them.

use serde::{Deserialize, Serialize};

/// API paths of this module.
pub mod paths {
    /// `GET`: [`super::TokenList`]; `POST`: [`super::CreateToken`] →
    /// [`super::CreatedToken`]. Admin only.
    pub const TOKENS: &str = "/api/v1/tokens";

    /// `DELETE`: revoke the token named `name` → [`super::TokenInfo`].
    pub fn token(name: &str) -> String {
        format!("{TOKENS}/{name}")
    }

    /// `POST {"token": "..."}`: a viewer or admin token becomes a session
    /// cookie (the dashboard's log-in); `DELETE`: log-out.
    pub const SESSION: &str = "/api/v1/session";
}

/// Written by the control plane on first start, in its data directory: the
/// admin token alone (mode 0600).
pub const ADMIN_TOKEN_FILE: &str = "admin.token";
/// Written by the control plane on first start, in its data directory: the
/// mesh CA certificate (PEM) that clients verify the API with.
pub const CA_CERT_FILE: &str = "ca.crt";

/// `POST /api/v1/tokens`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CreateToken {
    /// Unique; the audit actor of everything done with the token.
    pub name: String,
    /// `admin`, `viewer` or `sidecar`.
    pub role: String,
    /// Sidecar tokens: the namespace they are bound to (default `default`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Sidecar tokens: the service they are bound to (required).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Lifetime in seconds; none: until revoked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds: Option<u64>,
}

/// The answer to [`CreateToken`]: the token's plaintext, shown this once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreatedToken {
    pub token: String,
    pub info: TokenInfo,
}

/// A token as listed: never its secret or hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenInfo {
    pub name: String,
    /// `admin`, `viewer` or `sidecar`.
    pub role: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Unix seconds.
    pub created_at: u64,
    /// Unix seconds; none: never expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
    pub expired: bool,
}

/// `GET /api/v1/tokens`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct TokenList {
    pub tokens: Vec<TokenInfo>,
}
