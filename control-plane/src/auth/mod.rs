//! Credentials and authorization of the control-plane API (issue 13).
//!
//! Data flow of a request, once the API is wired to it:
//!
//! ```text
//! Authorization: Bearer mlt_…  ─► Tokens::authenticate ─► Principal { name, role }
//!                                     (SHA-256 lookup,        │
//!                                      expiry)                 ├─► Principal::may(Action) ─► 403 Denied
//!                                                              ├─► Owners::claim / check (instance ids) ─► 409/403
//!                                                              └─► audit actor = principal.name
//! ```
//!
//! - [`tokens`]: [`Role`] (admin, viewer, sidecar bound to one
//!   namespace/service), token generation (`mlt_` + 32 CSPRNG bytes, URL-safe
//!   base64), [`TokenRecord`] (hash only, what the store keeps), the
//!   [`Tokens`] registry (create, revoke, list, authenticate).
//! - [`authz`]: the API's [`Action`]s and [`Principal::may`], the role ×
//!   action table.
//! - [`owners`]: which credential registered which instance id.
//! - [`admin_file`]: the bootstrap `DATA_DIR/admin.token`.
//! - [`names`]: token-name and DNS-1123 label rules.
//!
//! Who may use what: only the control plane holds [`Tokens`] and [`Owners`];
//! only admins reach token management ([`Action::ManageTokens`]). The
//! plaintext of a token exists once, returned by [`Tokens::create`] (or in
//! `admin.token`), and is never stored or listed.

pub mod admin_file;
pub mod authz;
pub mod names;
pub mod owners;
pub mod tokens;

pub use admin_file::{admin_token_path, ensure_admin_token, AdminTokenError, AdminTokenOutcome};
pub use authz::{Action, Denied};
pub use names::{validate_dns_label, validate_token_name, InvalidName};
pub use owners::{Claim, Owners, OwnershipError};
pub use tokens::{
    bearer_token, AuthError, Principal, Role, RoleError, SecretToken, TokenError, TokenHash,
    TokenInfo, TokenRecord, Tokens,
};
