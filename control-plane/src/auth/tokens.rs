//! Bearer tokens: generation, hashed storage, authentication.
//!
//! A token is `mlt_` followed by 32 bytes from the system CSPRNG
//! (`ring::rand::SystemRandom`) in unpadded URL-safe base64: 47 characters,
//! safe in a header, a URL and a shell. The plaintext is returned once, by
//! [`Tokens::create`], as a [`SecretToken`] (whose `Debug` is redacted);
//! only its SHA-256 ([`TokenHash`]) is kept in a [`TokenRecord`], which is
//! what the store persists. [`Tokens::authenticate`] hashes the presented
//! token, finds the record by hash, compares the digests in constant time,
//! checks expiry and returns the [`Principal`] (name + role) that the API
//! passes to [`Principal::may`](super::Principal::may) and uses as the audit
//! actor. Finding by hash keeps lookups O(1) and leaks nothing useful through
//! timing: an attacker learns at most about the digest of a token they chose.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

use super::names::{validate_dns_label, validate_token_name, InvalidName};

/// Every token starts with this, so a leaked one is recognisable (secret scanners, logs).
pub const TOKEN_PREFIX: &str = "mlt_";
/// Random bytes in a token.
pub const TOKEN_BYTES: usize = 32;
/// Longest string [`Tokens::authenticate`] will even hash.
const MAX_PRESENTED_LEN: usize = 512;

/// What a credential may do; see [`Principal::may`](super::Principal::may).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Role {
    /// Everything, including tokens.
    Admin,
    /// Reads, traces, the dashboard.
    Viewer,
    /// One sidecar identity: instances of `service` in `namespace` it registered.
    Sidecar { namespace: String, service: String },
}

impl Role {
    /// A sidecar role, its names checked as DNS-1123 labels.
    pub fn sidecar(namespace: &str, service: &str) -> Result<Role, InvalidName> {
        let role = Role::Sidecar {
            namespace: namespace.to_owned(),
            service: service.to_owned(),
        };
        role.validate()?;
        Ok(role)
    }

    /// A role from `meshctl token create --role KIND [--namespace NS] [--service NAME]`:
    /// `sidecar` needs a service (namespace `default` if not given); `admin`
    /// and `viewer` take neither.
    pub fn from_parts(
        kind: &str,
        namespace: Option<&str>,
        service: Option<&str>,
    ) -> Result<Role, RoleError> {
        match (kind, service) {
            ("admin" | "viewer", None) if namespace.is_none() => Ok(if kind == "admin" {
                Role::Admin
            } else {
                Role::Viewer
            }),
            ("admin" | "viewer", _) => Err(RoleError::UnexpectedScope {
                kind: kind.to_owned(),
            }),
            ("sidecar", Some(service)) => {
                Ok(Role::sidecar(namespace.unwrap_or("default"), service)?)
            }
            ("sidecar", None) => Err(RoleError::SidecarNeedsService),
            _ => Err(RoleError::UnknownKind {
                kind: kind.chars().take(40).collect(),
            }),
        }
    }

    /// Checks the names a sidecar role carries.
    pub fn validate(&self) -> Result<(), InvalidName> {
        if let Role::Sidecar { namespace, service } = self {
            validate_dns_label("namespace", namespace)?;
            validate_dns_label("service", service)?;
        }
        Ok(())
    }

    /// `admin`, `viewer` or `sidecar`.
    pub fn kind(&self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Viewer => "viewer",
            Role::Sidecar { .. } => "sidecar",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Role::Sidecar { namespace, service } => write!(f, "sidecar({namespace}/{service})"),
            other => f.write_str(other.kind()),
        }
    }
}

/// SHA-256 of a token's full text (prefix included). Serialised as lowercase hex.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TokenHash([u8; 32]);

impl TokenHash {
    /// The hash of a presented or generated token.
    pub fn of(token: &str) -> TokenHash {
        let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
        let mut out = [0u8; 32];
        out.copy_from_slice(digest.as_ref());
        TokenHash(out)
    }

    /// Equality in time independent of where the digests differ.
    pub fn ct_eq(&self, other: &TokenHash) -> bool {
        let diff = self
            .0
            .iter()
            .zip(other.0.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        std::hint::black_box(diff) == 0
    }

    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn from_hex(s: &str) -> Option<TokenHash> {
        if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, chunk) in s.as_bytes().chunks(2).enumerate() {
            let pair = std::str::from_utf8(chunk).ok()?;
            out[i] = u8::from_str_radix(pair, 16).ok()?;
        }
        Some(TokenHash(out))
    }
}

impl fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenHash({}…)", &self.to_hex()[..8])
    }
}

impl Serialize for TokenHash {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for TokenHash {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        TokenHash::from_hex(&s).ok_or_else(|| serde::de::Error::custom("expected 64 hex digits"))
    }
}

/// A token's plaintext, shown once to whoever created it. `Debug` hides it.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretToken(String);

impl SecretToken {
    pub fn as_str(&self) -> &str {
        &self.0
    }
    pub fn into_string(self) -> String {
        self.0
    }
    /// Wraps a token read from a file or flag (e.g. `admin.token`).
    pub fn from_plaintext(s: impl Into<String>) -> SecretToken {
        SecretToken(s.into())
    }
}

impl fmt::Debug for SecretToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretToken(<redacted>)")
    }
}

/// A stored credential: what the store persists. Holds the hash, never the token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenRecord {
    pub name: String,
    pub role: Role,
    /// Unix seconds.
    pub created_at: u64,
    /// Unix seconds; `None`: never expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
    pub hash: TokenHash,
}

impl TokenRecord {
    pub fn is_expired_at(&self, now: SystemTime) -> bool {
        self.expires_at.is_some_and(|e| unix_secs(now) >= e)
    }
}

/// What `token list` shows: the record without its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenInfo {
    pub name: String,
    pub role: Role,
    pub created_at: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
    pub expired: bool,
}

/// An authenticated caller: the token's name (the audit actor) and role.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Principal {
    pub name: String,
    pub role: Role,
}

/// Why a request is not authenticated (all map to 401).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no credentials: send `Authorization: Bearer TOKEN`")]
    Missing,
    #[error("malformed Authorization header: expected `Bearer TOKEN`")]
    Malformed,
    #[error("unknown or revoked token")]
    Unknown,
    #[error("token {name:?} expired")]
    Expired { name: String },
}

/// Why [`Role::from_parts`] refused its arguments (→ 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RoleError {
    #[error("unknown role {kind:?}: expected admin, viewer or sidecar")]
    UnknownKind { kind: String },
    #[error("a sidecar token needs --service (and optionally --namespace)")]
    SidecarNeedsService,
    #[error("an {kind} token is not bound to a namespace or service")]
    UnexpectedScope { kind: String },
    #[error(transparent)]
    InvalidName(#[from] InvalidName),
}

/// Errors managing tokens (create, revoke, load).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error(transparent)]
    InvalidName(#[from] InvalidName),
    #[error("a token named {name:?} already exists")]
    NameTaken { name: String },
    #[error("no token named {name:?}")]
    NotFound { name: String },
    #[error("invalid ttl {ttl:?}: must be more than zero and less than 100 years")]
    InvalidTtl { ttl: Duration },
    #[error("stored tokens {first:?} and {second:?} have the same hash")]
    DuplicateHash { first: String, second: String },
    #[error("the system random number generator failed")]
    Random,
}

/// Extracts the token from an `Authorization` header value (`Bearer TOKEN`,
/// scheme case-insensitive).
pub fn bearer_token(authorization: Option<&str>) -> Result<&str, AuthError> {
    let value = authorization.ok_or(AuthError::Missing)?.trim();
    if value.is_empty() {
        return Err(AuthError::Missing);
    }
    let (scheme, token) = value.split_once(' ').ok_or(AuthError::Malformed)?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() || token.contains(' ') {
        return Err(AuthError::Malformed);
    }
    Ok(token)
}

/// The registry of tokens, in memory; the caller persists [`Tokens::records`].
#[derive(Debug, Default, Clone)]
pub struct Tokens {
    by_name: BTreeMap<String, TokenRecord>,
    by_hash: HashMap<TokenHash, String>,
}

const MAX_TTL: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

impl Tokens {
    pub fn new() -> Tokens {
        Tokens::default()
    }

    /// Rebuilds the registry from stored records (checking names and roles).
    pub fn from_records(
        records: impl IntoIterator<Item = TokenRecord>,
    ) -> Result<Tokens, TokenError> {
        let mut tokens = Tokens::new();
        for record in records {
            tokens.insert_record(record)?;
        }
        Ok(tokens)
    }

    /// Adds a record as is (loading, adopting an `admin.token`); refuses a
    /// taken name or hash.
    pub fn insert_record(&mut self, record: TokenRecord) -> Result<(), TokenError> {
        validate_token_name(&record.name)?;
        record.role.validate()?;
        if self.by_name.contains_key(&record.name) {
            return Err(TokenError::NameTaken { name: record.name });
        }
        if let Some(first) = self.by_hash.get(&record.hash) {
            return Err(TokenError::DuplicateHash {
                first: first.clone(),
                second: record.name,
            });
        }
        self.by_hash.insert(record.hash, record.name.clone());
        self.by_name.insert(record.name.clone(), record);
        Ok(())
    }

    /// Creates a token now; see [`Tokens::create_at`].
    pub fn create(
        &mut self,
        name: &str,
        role: Role,
        ttl: Option<Duration>,
    ) -> Result<(SecretToken, TokenRecord), TokenError> {
        self.create_at(name, role, ttl, SystemTime::now())
    }

    /// Creates a token named `name` (unique) with `role`, expiring `ttl` after
    /// `now` (never with `None`). Returns the plaintext, to show once, and the
    /// record, to persist.
    pub fn create_at(
        &mut self,
        name: &str,
        role: Role,
        ttl: Option<Duration>,
        now: SystemTime,
    ) -> Result<(SecretToken, TokenRecord), TokenError> {
        validate_token_name(name)?;
        role.validate()?;
        if self.by_name.contains_key(name) {
            return Err(TokenError::NameTaken {
                name: name.to_owned(),
            });
        }
        let (secret, record) = new_record(name, role, ttl, now)?;
        self.insert_record(record.clone())?;
        Ok((secret, record))
    }

    /// Removes a token; requests with it fail from now on.
    pub fn revoke(&mut self, name: &str) -> Result<TokenRecord, TokenError> {
        let record = self
            .by_name
            .remove(name)
            .ok_or_else(|| TokenError::NotFound {
                name: name.to_owned(),
            })?;
        self.by_hash.remove(&record.hash);
        Ok(record)
    }

    /// Every token, by name, without hashes.
    pub fn list(&self) -> Vec<TokenInfo> {
        self.list_at(SystemTime::now())
    }

    pub fn list_at(&self, now: SystemTime) -> Vec<TokenInfo> {
        self.by_name
            .values()
            .map(|r| TokenInfo {
                name: r.name.clone(),
                role: r.role.clone(),
                created_at: r.created_at,
                expires_at: r.expires_at,
                expired: r.is_expired_at(now),
            })
            .collect()
    }

    /// The stored records, for persisting.
    pub fn records(&self) -> impl Iterator<Item = &TokenRecord> {
        self.by_name.values()
    }

    pub fn get(&self, name: &str) -> Option<&TokenRecord> {
        self.by_name.get(name)
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// Authenticates a presented token now; see [`Tokens::authenticate_at`].
    pub fn authenticate(&self, token: &str) -> Result<Principal, AuthError> {
        self.authenticate_at(token, SystemTime::now())
    }

    /// The principal a token stands for, or why not.
    pub fn authenticate_at(&self, token: &str, now: SystemTime) -> Result<Principal, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        if token.len() > MAX_PRESENTED_LEN {
            return Err(AuthError::Unknown);
        }
        let presented = TokenHash::of(token);
        let record = self
            .by_hash
            .get(&presented)
            .and_then(|name| self.by_name.get(name))
            .ok_or(AuthError::Unknown)?;
        if !record.hash.ct_eq(&presented) {
            return Err(AuthError::Unknown);
        }
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

    /// Parses an `Authorization` header value and authenticates its token.
    pub fn authenticate_header(&self, authorization: Option<&str>) -> Result<Principal, AuthError> {
        self.authenticate(bearer_token(authorization)?)
    }

    /// Removes expired tokens; returns their names (to persist the removal).
    pub fn prune_expired(&mut self, now: SystemTime) -> Vec<String> {
        let expired: Vec<String> = self
            .by_name
            .values()
            .filter(|r| r.is_expired_at(now))
            .map(|r| r.name.clone())
            .collect();
        for name in &expired {
            let _ = self.revoke(name);
        }
        expired
    }
}

/// Generates a token and its record without registering it.
pub(crate) fn new_record(
    name: &str,
    role: Role,
    ttl: Option<Duration>,
    now: SystemTime,
) -> Result<(SecretToken, TokenRecord), TokenError> {
    if let Some(ttl) = ttl {
        if ttl.is_zero() || ttl > MAX_TTL {
            return Err(TokenError::InvalidTtl { ttl });
        }
    }
    let secret = generate()?;
    let created_at = unix_secs(now);
    let record = TokenRecord {
        name: name.to_owned(),
        role,
        created_at,
        // Round up so a 1.5 s ttl never becomes 1 s.
        expires_at: ttl.map(|t| created_at + t.as_secs() + u64::from(t.subsec_nanos() > 0)),
        hash: TokenHash::of(secret.as_str()),
    };
    Ok((secret, record))
}

/// A fresh token: prefix + 32 CSPRNG bytes in URL-safe base64.
pub fn generate() -> Result<SecretToken, TokenError> {
    let mut bytes = [0u8; TOKEN_BYTES];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| TokenError::Random)?;
    Ok(SecretToken(format!("{TOKEN_PREFIX}{}", base64url(&bytes))))
}

/// Unpadded URL-safe base64 (RFC 4648 §5).
fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        let chars = chunk.len() + 1;
        for i in 0..chars {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 0x3f) as usize] as char);
        }
    }
    out
}

pub(crate) fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t0() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    #[test]
    fn base64url_matches_rfc4648_vectors() {
        assert_eq!(base64url(b""), "");
        assert_eq!(base64url(b"f"), "Zg");
        assert_eq!(base64url(b"fo"), "Zm8");
        assert_eq!(base64url(b"foo"), "Zm9v");
        assert_eq!(base64url(b"foob"), "Zm9vYg");
        assert_eq!(base64url(b"fooba"), "Zm9vYmE");
        assert_eq!(base64url(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64url(&[0xfb, 0xff]), "-_8");
    }

    #[test]
    fn generated_tokens_are_prefixed_url_safe_and_distinct() {
        let a = generate().unwrap();
        let b = generate().unwrap();
        assert_ne!(a, b);
        assert!(a.as_str().starts_with(TOKEN_PREFIX));
        assert_eq!(a.as_str().len(), TOKEN_PREFIX.len() + 43);
        assert!(a.as_str()[4..]
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'));
        assert_eq!(format!("{a:?}"), "SecretToken(<redacted>)");
    }

    #[test]
    fn create_authenticate_revoke() {
        let mut tokens = Tokens::new();
        let (secret, record) = tokens.create_at("alice", Role::Viewer, None, t0()).unwrap();
        assert_eq!(record.hash, TokenHash::of(secret.as_str()));
        assert!(!serde_json::to_string(&record)
            .unwrap()
            .contains(secret.as_str()));
        let p = tokens.authenticate_at(secret.as_str(), t0()).unwrap();
        assert_eq!(
            p,
            Principal {
                name: "alice".into(),
                role: Role::Viewer
            }
        );

        let header = format!("Bearer {}", secret.as_str());
        assert_eq!(
            tokens.authenticate_header(Some(&header)).unwrap().name,
            "alice"
        );
        let header = format!("bearer  {}", secret.as_str());
        assert_eq!(
            tokens.authenticate_header(Some(&header)).unwrap().name,
            "alice"
        );

        tokens.revoke("alice").unwrap();
        assert_eq!(
            tokens.authenticate_at(secret.as_str(), t0()),
            Err(AuthError::Unknown)
        );
        assert_eq!(
            tokens.revoke("alice"),
            Err(TokenError::NotFound {
                name: "alice".into()
            })
        );
    }

    #[test]
    fn typed_authentication_errors() {
        let mut tokens = Tokens::new();
        let (secret, _) = tokens
            .create_at("short", Role::Admin, Some(Duration::from_secs(60)), t0())
            .unwrap();
        assert_eq!(tokens.authenticate_header(None), Err(AuthError::Missing));
        assert_eq!(
            tokens.authenticate_header(Some("  ")),
            Err(AuthError::Missing)
        );
        assert_eq!(
            tokens.authenticate_header(Some("Basic abc")),
            Err(AuthError::Malformed)
        );
        assert_eq!(
            tokens.authenticate_header(Some("Bearer")),
            Err(AuthError::Malformed)
        );
        assert_eq!(
            tokens.authenticate_header(Some("Bearer a b")),
            Err(AuthError::Malformed)
        );
        assert_eq!(
            tokens.authenticate_at("mlt_nope", t0()),
            Err(AuthError::Unknown)
        );
        assert_eq!(
            tokens.authenticate_at(&"x".repeat(10_000), t0()),
            Err(AuthError::Unknown)
        );
        // A token differing in one character is unknown.
        let mut wrong = secret.as_str().to_owned();
        let last = wrong.pop().unwrap();
        wrong.push(if last == 'A' { 'B' } else { 'A' });
        assert_eq!(
            tokens.authenticate_at(&wrong, t0()),
            Err(AuthError::Unknown)
        );

        let later = t0() + Duration::from_secs(59);
        assert!(tokens.authenticate_at(secret.as_str(), later).is_ok());
        let expired = t0() + Duration::from_secs(60);
        assert_eq!(
            tokens.authenticate_at(secret.as_str(), expired),
            Err(AuthError::Expired {
                name: "short".into()
            })
        );
        assert!(tokens.list_at(expired)[0].expired);
        assert_eq!(tokens.prune_expired(expired), vec!["short".to_string()]);
        assert!(tokens.is_empty());
    }

    #[test]
    fn names_unique_and_validated() {
        let mut tokens = Tokens::new();
        tokens.create("ci", Role::Admin, None).unwrap();
        assert_eq!(
            tokens.create("ci", Role::Viewer, None).unwrap_err(),
            TokenError::NameTaken { name: "ci".into() }
        );
        assert!(matches!(
            tokens.create("Bad Name", Role::Viewer, None),
            Err(TokenError::InvalidName(_))
        ));
        let bad_role = Role::Sidecar {
            namespace: "default".into(),
            service: "example.com".into(),
        };
        assert!(matches!(
            tokens.create("s", bad_role, None),
            Err(TokenError::InvalidName(InvalidName {
                what: "service",
                ..
            }))
        ));
        assert!(matches!(
            tokens.create("z", Role::Viewer, Some(Duration::ZERO)),
            Err(TokenError::InvalidTtl { .. })
        ));
        assert_eq!(tokens.len(), 1);
    }

    #[test]
    fn list_never_shows_hash_or_plaintext() {
        let mut tokens = Tokens::new();
        let (secret, record) = tokens
            .create("orders", Role::sidecar("default", "orders").unwrap(), None)
            .unwrap();
        let listed = serde_json::to_string(&tokens.list()).unwrap();
        assert!(!listed.contains(secret.as_str()));
        assert!(!listed.contains(&record.hash.to_hex()));
        assert!(listed.contains("\"kind\":\"sidecar\""), "{listed}");
    }

    #[test]
    fn records_round_trip_through_serde_and_reload() {
        let mut tokens = Tokens::new();
        let (secret, _) = tokens
            .create("a", Role::Admin, Some(Duration::from_secs(3600)))
            .unwrap();
        tokens
            .create("b", Role::sidecar("ns1", "orders").unwrap(), None)
            .unwrap();
        let json = serde_json::to_string(&tokens.records().collect::<Vec<_>>()).unwrap();
        let back: Vec<TokenRecord> = serde_json::from_str(&json).unwrap();
        let reloaded = Tokens::from_records(back).unwrap();
        assert_eq!(reloaded.authenticate(secret.as_str()).unwrap().name, "a");
        assert_eq!(reloaded.len(), 2);

        let rec = reloaded.get("a").unwrap().clone();
        let dup = TokenRecord {
            name: "c".into(),
            ..rec
        };
        assert!(matches!(
            Tokens::from_records(reloaded.records().cloned().chain([dup])),
            Err(TokenError::DuplicateHash { .. })
        ));
    }

    #[test]
    fn roles_from_cli_parts() {
        assert_eq!(Role::from_parts("admin", None, None), Ok(Role::Admin));
        assert_eq!(Role::from_parts("viewer", None, None), Ok(Role::Viewer));
        assert_eq!(
            Role::from_parts("sidecar", None, Some("orders")),
            Ok(Role::Sidecar {
                namespace: "default".into(),
                service: "orders".into()
            })
        );
        assert_eq!(
            Role::from_parts("sidecar", Some("prod"), Some("orders"))
                .unwrap()
                .to_string(),
            "sidecar(prod/orders)"
        );
        assert_eq!(
            Role::from_parts("sidecar", None, None),
            Err(RoleError::SidecarNeedsService)
        );
        assert!(matches!(
            Role::from_parts("viewer", None, Some("x")),
            Err(RoleError::UnexpectedScope { .. })
        ));
        assert!(matches!(
            Role::from_parts("admin", Some("ns"), None),
            Err(RoleError::UnexpectedScope { .. })
        ));
        assert!(matches!(
            Role::from_parts("root", None, None),
            Err(RoleError::UnknownKind { .. })
        ));
        assert!(matches!(
            Role::from_parts("sidecar", None, Some("example.com")),
            Err(RoleError::InvalidName(_))
        ));
    }

    #[test]
    fn ct_eq_and_hex() {
        let a = TokenHash::of("x");
        let b = TokenHash::of("y");
        assert!(a.ct_eq(&a));
        assert!(!a.ct_eq(&b));
        assert_eq!(TokenHash::from_hex(&a.to_hex()), Some(a));
        assert_eq!(TokenHash::from_hex("zz"), None);
        // SHA-256("abc")
        assert_eq!(
            TokenHash::of("abc").to_hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
