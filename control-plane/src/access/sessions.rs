//! The dashboard's log-in sessions: a viewer or admin token, given once on
//! the log-in page, becomes a random session id in an HttpOnly,
//! SameSite=Strict, Secure cookie, so the page's script never holds the
//! token. Only GET/HEAD accept a session (see the module above).
//!
//! ```text
//! log-in:  token ─► Principal ─► id = random ─► store.put_session(sha256(id), {token name, created, expires})
//!                                            ─► Set-Cookie: meshlet_session=ID.TAG
//! request: cookie ID.TAG ─► TAG == HMAC(key, ID)? (else 401, reason "mac": no store call)
//!                        ─► store.session(sha256(ID)) (else 401 "unknown"; store down: 503)
//!                        ─► its token still valid? (else 401 "token") ─► Principal
//! log-out: cookie ─► MAC ─► store.delete_session(sha256(ID)) ─► Set-Cookie clearing it
//! ```
//!
//! **Where sessions live** ([`SessionStore`]): with redb, in this
//! process's memory ([`MemorySessions`]; a restart logs everyone out);
//! with `--store etcd`, in etcd under `P/sessions/` on a lease of the
//! session TTL (`store::etcd`), so a session started on one replica works
//! on every replica and survives the one that started it, and a log-out
//! through any replica ends it everywhere at once: nothing is cached, every
//! cookie request reads etcd (one linearizable get; dashboard rates are
//! low). A session is as good as its token: revoking or expiring the
//! token ends it, and it lasts at most [`SESSION_TTL`].
//!
//! **Cost control**: the cookie carries a MAC, `ID.TAG` with TAG =
//! HMAC-SHA256(key, ID) in hex, so a forged or garbled cookie is refused
//! here, in constant time, with no store read: a flood of random cookies
//! costs one HMAC each, never an etcd get. With etcd the key is derived
//! from the mesh CA key every replica shares (`peers::credential::
//! derive_secret`, label [`KEY_LABEL`], scope the etcd prefix); with redb
//! it is random per process (its sessions die with it anyway).
//!
//! **Bound**: at most [`MAX_SESSIONS`] per store (per mesh with etcd, give
//! or take log-ins racing on several replicas), the oldest dropped first.
//!
//! **Store down** (etcd without quorum): log-in, log-out and every cookie
//! request answer 503 saying so; nothing is logged out by it (a failed
//! log-out keeps the cookie, so it can be retried).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use axum::http::{header, HeaderMap, HeaderValue};
use ring::hmac;
use ring::rand::SystemRandom;

use crate::auth::{AuthError, Principal, Role, TokenHash, Tokens};
use crate::error::StoreError;
use crate::peers::credential::{derive_secret, hex, unhex};
use crate::store::{SessionFuture, SessionStore, StoredSession};

pub const SESSION_COOKIE: &str = "meshlet_session";
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
pub const MAX_SESSIONS: usize = 1024;

/// The label of the cookie key's derivation from the CA key (a version,
/// so it never equals the peer credential or a later key).
pub const KEY_LABEL: &[u8] = b"meshlet dashboard session cookie v1\0";

/// The cookie that ends a session in the browser.
const CLEARED: &str = "meshlet_session=; Path=/; HttpOnly; Secure; SameSite=Strict; Max-Age=0";

/// Why a session did not give a principal.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// No session for this cookie (forged, ended, expired), or its token
    /// no longer valid: 401.
    #[error(transparent)]
    Refused(#[from] AuthError),
    /// The session store cannot answer (etcd down): 503.
    #[error("dashboard sessions are unavailable: {0}")]
    Store(#[from] StoreError),
    #[error("cannot draw a random session id")]
    Random,
}

/// Signs and checks cookie values (`ID.TAG`).
pub struct CookieKey(hmac::Key);

impl std::fmt::Debug for CookieKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CookieKey(<redacted>)")
    }
}

impl CookieKey {
    /// The key every replica of the mesh under `prefix` derives alike
    /// from the CA key.
    pub fn derive(ca_key_pem: &str, prefix: &str) -> CookieKey {
        let secret = derive_secret(ca_key_pem, KEY_LABEL, prefix);
        CookieKey(hmac::Key::new(hmac::HMAC_SHA256, secret.as_ref()))
    }

    /// A key of this process alone.
    pub fn random() -> Result<CookieKey, SessionError> {
        hmac::Key::generate(hmac::HMAC_SHA256, &SystemRandom::new())
            .map(CookieKey)
            .map_err(|_| SessionError::Random)
    }

    /// The cookie value of session `id`.
    fn sign(&self, id: &str) -> String {
        format!("{id}.{}", hex(hmac::sign(&self.0, id.as_bytes()).as_ref()))
    }

    /// The session id of a cookie value this key signed, else `None`.
    fn verify<'a>(&self, value: &'a str) -> Option<&'a str> {
        let (id, tag) = value.rsplit_once('.')?;
        let tag = unhex(tag)?;
        hmac::verify(&self.0, id.as_bytes(), &tag).ok()?;
        Some(id)
    }
}

/// Cookie requests this replica refused or looked up (`/metrics`).
#[derive(Debug, Default)]
pub struct SessionCounts {
    /// A cookie without this mesh's MAC (no store read).
    pub rejected_mac: AtomicU64,
    /// A well-signed cookie the store no longer holds (ended, expired).
    pub rejected_unknown: AtomicU64,
    /// A session whose token was revoked or expired.
    pub rejected_token: AtomicU64,
    /// Session reads from the store (etcd gets with `--store etcd`).
    pub lookups: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// The sessions: the cookie key, the store, the counts.
pub struct Sessions {
    key: CookieKey,
    store: Arc<dyn SessionStore>,
    counts: SessionCounts,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions")
            .field("counts", &self.counts)
            .finish_non_exhaustive()
    }
}

impl Sessions {
    /// Sessions in `store`, cookies signed with `key`.
    pub fn new(key: CookieKey, store: Arc<dyn SessionStore>) -> Sessions {
        Sessions {
            key,
            store,
            counts: SessionCounts::default(),
        }
    }

    /// This process's memory, a random key (redb, tests).
    pub fn in_memory() -> Result<Sessions, SessionError> {
        Ok(Sessions::new(
            CookieKey::random()?,
            Arc::new(MemorySessions::default()),
        ))
    }

    pub fn counts(&self) -> &SessionCounts {
        &self.counts
    }

    /// Starts a session for `principal` (viewer or admin only); returns the
    /// `Set-Cookie` value.
    pub async fn start(&self, principal: &Principal) -> Result<HeaderValue, SessionError> {
        if matches!(principal.role, Role::Sidecar { .. }) {
            return Err(AuthError::Unknown.into());
        }
        let id = crate::auth::tokens::generate().map_err(|_| SessionError::Random)?;
        let now = crate::clock::now_ms();
        let session = StoredSession {
            token_name: principal.name.clone(),
            created_ms: now,
            expires_ms: now + SESSION_TTL.as_millis() as u64,
        };
        self.store
            .put_session(TokenHash::of(id.as_str()), session, MAX_SESSIONS)
            .await?;
        let cookie = format!(
            "{SESSION_COOKIE}={}; Path=/; HttpOnly; Secure; SameSite=Strict; Max-Age={}",
            self.key.sign(id.as_str()),
            SESSION_TTL.as_secs()
        );
        HeaderValue::from_str(&cookie).map_err(|_| AuthError::Malformed.into())
    }

    /// Ends the session of cookie value `cookie` (log-out); the
    /// `Set-Cookie` that clears it. A cookie without a valid MAC names no
    /// session: nothing to end.
    pub async fn end(&self, cookie: Option<&str>) -> Result<HeaderValue, SessionError> {
        if let Some(id) = cookie.and_then(|value| self.key.verify(value)) {
            self.store.delete_session(TokenHash::of(id)).await?;
        }
        Ok(HeaderValue::from_static(CLEARED))
    }

    /// The principal of cookie value `cookie`, if its MAC, its session and
    /// its token are all still valid.
    pub async fn principal(
        &self,
        cookie: &str,
        tokens: &RwLock<Tokens>,
    ) -> Result<Principal, SessionError> {
        let Some(id) = self.key.verify(cookie) else {
            bump(&self.counts.rejected_mac);
            return Err(AuthError::Unknown.into());
        };
        bump(&self.counts.lookups);
        let now = crate::clock::now_ms();
        let session = self
            .store
            .session(TokenHash::of(id))
            .await?
            .filter(|s| s.expires_ms > now);
        let Some(session) = session else {
            bump(&self.counts.rejected_unknown);
            return Err(AuthError::Unknown.into());
        };
        let tokens = tokens.read().unwrap_or_else(|e| e.into_inner());
        let checked = match tokens.get(&session.token_name) {
            None => Err(AuthError::Unknown),
            Some(record) if record.is_expired_at(SystemTime::now()) => Err(AuthError::Expired {
                name: record.name.clone(),
            }),
            Some(record) => Ok(Principal {
                name: record.name.clone(),
                role: record.role.clone(),
            }),
        };
        checked.map_err(|refused| {
            bump(&self.counts.rejected_token);
            refused.into()
        })
    }
}

/// Sessions in this process's memory (redb): at most `cap`, the oldest
/// dropped first; expired ones are swept at each log-in.
#[derive(Debug, Default)]
pub struct MemorySessions {
    by_id: Mutex<HashMap<TokenHash, StoredSession>>,
}

impl SessionStore for MemorySessions {
    fn put_session(
        &self,
        id: TokenHash,
        session: StoredSession,
        cap: usize,
    ) -> SessionFuture<'_, ()> {
        let now = crate::clock::now_ms();
        let mut sessions = self.by_id.lock().unwrap_or_else(|e| e.into_inner());
        sessions.retain(|_, s| s.expires_ms > now);
        while sessions.len() >= cap.max(1) {
            let Some(oldest) = sessions
                .iter()
                .min_by_key(|(_, s)| s.created_ms)
                .map(|(id, _)| *id)
            else {
                break;
            };
            sessions.remove(&oldest);
        }
        sessions.insert(id, session);
        Box::pin(std::future::ready(Ok(())))
    }

    fn session(&self, id: TokenHash) -> SessionFuture<'_, Option<StoredSession>> {
        let sessions = self.by_id.lock().unwrap_or_else(|e| e.into_inner());
        Box::pin(std::future::ready(Ok(sessions.get(&id).cloned())))
    }

    fn delete_session(&self, id: TokenHash) -> SessionFuture<'_, ()> {
        self.by_id
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        Box::pin(std::future::ready(Ok(())))
    }
}

/// The session cookie's value in a request's `Cookie` headers.
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

#[cfg(test)]
mod tests {
    use super::*;

    const CA_KEY: &str = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";

    /// A store that counts its reads and may be "down" (etcd without quorum).
    #[derive(Default)]
    struct Probe {
        inner: MemorySessions,
        reads: AtomicU64,
        down: std::sync::atomic::AtomicBool,
    }

    impl Probe {
        fn check(&self) -> Result<(), StoreError> {
            if self.down.load(Ordering::Relaxed) {
                return Err(StoreError::EtcdTimeout {
                    doing: "read a dashboard session".into(),
                    after: Duration::from_secs(3),
                });
            }
            Ok(())
        }
    }

    impl SessionStore for Probe {
        fn put_session(
            &self,
            id: TokenHash,
            session: StoredSession,
            cap: usize,
        ) -> SessionFuture<'_, ()> {
            match self.check() {
                Ok(()) => self.inner.put_session(id, session, cap),
                Err(e) => Box::pin(std::future::ready(Err(e))),
            }
        }
        fn session(&self, id: TokenHash) -> SessionFuture<'_, Option<StoredSession>> {
            bump(&self.reads);
            match self.check() {
                Ok(()) => self.inner.session(id),
                Err(e) => Box::pin(std::future::ready(Err(e))),
            }
        }
        fn delete_session(&self, id: TokenHash) -> SessionFuture<'_, ()> {
            match self.check() {
                Ok(()) => self.inner.delete_session(id),
                Err(e) => Box::pin(std::future::ready(Err(e))),
            }
        }
    }

    fn tokens() -> RwLock<Tokens> {
        let mut tokens = Tokens::new();
        tokens.create("admin", Role::Admin, None).unwrap();
        tokens.create("alice", Role::Viewer, None).unwrap();
        tokens
            .create("orders", Role::sidecar("default", "orders").unwrap(), None)
            .unwrap();
        // Expired a minute ago.
        tokens
            .create_at(
                "old",
                Role::Viewer,
                Some(Duration::from_secs(60)),
                SystemTime::now() - Duration::from_secs(120),
            )
            .unwrap();
        RwLock::new(tokens)
    }

    fn principal(name: &str, tokens: &RwLock<Tokens>) -> Principal {
        let tokens = tokens.read().unwrap();
        let record = tokens.get(name).unwrap();
        Principal {
            name: record.name.clone(),
            role: record.role.clone(),
        }
    }

    /// The cookie value of a `Set-Cookie` header.
    fn value(set_cookie: &HeaderValue) -> String {
        let text = set_cookie.to_str().unwrap();
        let pair = text.split(';').next().unwrap();
        pair.strip_prefix("meshlet_session=").unwrap().to_owned()
    }

    /// Two replicas of one mesh: the same derived key, one shared store.
    fn replicas(store: &Arc<Probe>) -> (Sessions, Sessions) {
        let a = Sessions::new(CookieKey::derive(CA_KEY, "/meshlet"), store.clone());
        let b = Sessions::new(CookieKey::derive(CA_KEY, "/meshlet"), store.clone());
        (a, b)
    }

    /// A shared store, two replicas on it and the tokens.
    fn mesh() -> (Arc<Probe>, Sessions, Sessions, RwLock<Tokens>) {
        let store = Arc::new(Probe::default());
        let (a, b) = replicas(&store);
        (store, a, b, tokens())
    }

    /// Logs `name` in through `sessions`: the cookie value.
    async fn log_in(sessions: &Sessions, name: &str, tokens: &RwLock<Tokens>) -> String {
        value(&sessions.start(&principal(name, tokens)).await.unwrap())
    }

    fn is_refused(result: Result<Principal, SessionError>) -> bool {
        matches!(result, Err(SessionError::Refused(_)))
    }

    #[test]
    fn a_cookie_passes_only_with_its_own_mac() {
        let key = CookieKey::derive(CA_KEY, "/meshlet");
        let cookie = key.sign("mlt_abc");
        assert_eq!(key.verify(&cookie), Some("mlt_abc"));
        // Same CA key and prefix: another replica agrees.
        assert_eq!(
            CookieKey::derive(CA_KEY, "/meshlet").verify(&cookie),
            Some("mlt_abc")
        );
        // Another mesh (prefix), another CA, a random key: refused.
        assert_eq!(CookieKey::derive(CA_KEY, "/other").verify(&cookie), None);
        assert_eq!(CookieKey::derive("OTHER", "/meshlet").verify(&cookie), None);
        assert_eq!(CookieKey::random().unwrap().verify(&cookie), None);
        // The peer credential's derivation uses another label.
        let peer = crate::peers::credential::PeerSecret::derive(CA_KEY, "/meshlet");
        assert!(!cookie.ends_with(peer.token().trim_start_matches("mlp_")));
        // Forged tag, another id, truncated, garbled, missing.
        let (id, tag) = cookie.rsplit_once('.').unwrap();
        let flipped = if tag.ends_with('0') { "1" } else { "0" };
        let forged = format!("{id}.{}{flipped}", &tag[..tag.len() - 1]);
        for bad in [
            forged.as_str(),
            &format!("mlt_abd.{tag}"),
            &cookie[..cookie.len() - 2],
            &cookie[..cookie.len() - 1],
            id,
            &format!("{id}."),
            &format!("{id}.zz{}", &tag[2..]),
            &format!(".{tag}"),
            "",
            ".",
        ] {
            assert_eq!(key.verify(bad), None, "{bad:?}");
        }
    }

    #[tokio::test]
    async fn a_session_started_on_one_replica_works_and_ends_on_every_replica() {
        let (_, a, b, tokens) = mesh();
        let cookie = log_in(&a, "alice", &tokens).await;
        let on_b = b.principal(&cookie, &tokens).await.unwrap();
        assert_eq!(on_b.name, "alice");
        assert_eq!(a.principal(&cookie, &tokens).await.unwrap().name, "alice");
        // Log-out through b: a refuses it at once.
        let cleared = b.end(Some(&cookie)).await.unwrap();
        assert!(cleared.to_str().unwrap().contains("Max-Age=0"));
        assert!(is_refused(a.principal(&cookie, &tokens).await));
        assert_eq!(a.counts().rejected_unknown.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn a_forged_cookie_is_refused_without_reading_the_store() {
        let (store, a, _, tokens) = mesh();
        let cookie = log_in(&a, "admin", &tokens).await;
        let (id, _) = cookie.rsplit_once('.').unwrap();
        let forged = format!("{id}.{}", "0".repeat(64));
        let other_mesh = Sessions::new(CookieKey::derive(CA_KEY, "/other"), store.clone());
        let foreign = log_in(&other_mesh, "admin", &tokens).await;
        for bad in [forged.as_str(), id, "garbage", foreign.as_str()] {
            assert!(is_refused(a.principal(bad, &tokens).await), "{bad}");
            // Log-out with it ends nothing (and reads nothing).
            a.end(Some(bad)).await.unwrap();
        }
        assert_eq!(store.reads.load(Ordering::Relaxed), 0);
        assert_eq!(a.counts().rejected_mac.load(Ordering::Relaxed), 4);
        assert_eq!(a.counts().lookups.load(Ordering::Relaxed), 0);
        // The genuine session survived the forged log-outs.
        assert!(a.principal(&cookie, &tokens).await.is_ok());
        assert_eq!(store.reads.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn a_session_is_only_as_good_as_its_token() {
        let (_, a, _, tokens) = mesh();
        assert!(
            matches!(
                a.start(&principal("orders", &tokens)).await,
                Err(SessionError::Refused(_))
            ),
            "no session for a sidecar token"
        );
        let alice = log_in(&a, "alice", &tokens).await;
        let old = log_in(&a, "old", &tokens).await;
        assert!(matches!(
            a.principal(&old, &tokens).await,
            Err(SessionError::Refused(AuthError::Expired { .. }))
        ));
        tokens.write().unwrap().revoke("alice").unwrap();
        assert!(is_refused(a.principal(&alice, &tokens).await));
        assert_eq!(a.counts().rejected_token.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn a_store_that_cannot_answer_is_an_error_never_a_log_out() {
        let (store, a, _, tokens) = mesh();
        let cookie = log_in(&a, "admin", &tokens).await;
        store.down.store(true, Ordering::Relaxed);
        for result in [
            a.principal(&cookie, &tokens).await.map(|_| ()),
            a.end(Some(&cookie)).await.map(|_| ()),
            a.start(&principal("admin", &tokens)).await.map(|_| ()),
        ] {
            match result {
                Err(SessionError::Store(e)) => assert!(e.is_unavailable(), "{e}"),
                other => panic!("expected a store error, got {other:?}"),
            }
        }
        store.down.store(false, Ordering::Relaxed);
        assert_eq!(a.principal(&cookie, &tokens).await.unwrap().name, "admin");
    }

    #[tokio::test]
    async fn memory_keeps_at_most_the_cap_and_drops_the_oldest_and_the_expired() {
        let store = MemorySessions::default();
        let session = |created_ms: u64, expires_ms: u64| StoredSession {
            token_name: "admin".into(),
            created_ms,
            expires_ms,
        };
        let now = crate::clock::now_ms();
        let far = now + 3_600_000;
        let ids: Vec<TokenHash> = (0..4).map(|i| TokenHash::of(&format!("s{i}"))).collect();
        store.put_session(ids[0], session(1, far), 2).await.unwrap();
        store
            .put_session(ids[1], session(2, now - 1), 2)
            .await
            .unwrap();
        // ids[1] expired: swept, so ids[0] stays.
        store.put_session(ids[2], session(3, far), 2).await.unwrap();
        assert!(store.session(ids[0]).await.unwrap().is_some());
        assert!(store.session(ids[1]).await.unwrap().is_none());
        // Full: the oldest (ids[0]) goes.
        store.put_session(ids[3], session(4, far), 2).await.unwrap();
        assert!(store.session(ids[0]).await.unwrap().is_none());
        assert!(store.session(ids[2]).await.unwrap().is_some());
        assert!(store.session(ids[3]).await.unwrap().is_some());
    }
}
