//! `RateLimitPolicy` enforcement on the inbound side of the target.
//!
//! Data flow: `Snapshot::build` makes one [`RateLimiter`] per policy that
//! targets this sidecar's own service (reusing the previous one when the
//! policy's identity and spec are unchanged, so buckets survive config
//! pushes) and sets its share of a `global` limit (the number of healthy
//! instances of the service in that snapshot). `proxy::Inbound` picks the
//! most specific matching limiter and calls [`RateLimiter::check`] with the
//! request's key (for `sourceService`, the caller's verified service from
//! `authz`, or one shared key for every unauthenticated caller); a refusal is counted on the limiter's `refused` counter
//! (`rate_limited_total`, resolved at build) and becomes a 429 in
//! `error.rs`.
//!
//! Two algorithms:
//!
//! - **Token bucket**: `capacity` tokens, refilled continuously at
//!   `refillPerSecond`; a request takes one.
//! - **Sliding window**: the two-bucket weighted approximation (the count
//!   of the current fixed window plus the previous window's count weighted
//!   by how much of it still overlaps the sliding window). Chosen over a
//!   ring of sub-windows because it needs two counters per key whatever the
//!   window (a 60 s window with fine sub-windows would need dozens per key,
//!   times 10 000 keys) and its error is small and smooth: it assumes the
//!   previous window's requests were evenly spread.
//!
//! State is one short `std::sync::Mutex` per limiter, never held across an
//! await; the key map holds at most [`MAX_KEYS`] keys, evicting the least
//! recently seen half when full. Keys are stored as 64-bit hashes (SipHash
//! with a random per-limiter seed, so collisions cannot be aimed at): a
//! client sending huge header values costs the same few bytes per key as
//! any other. The map uses those hashes as they are (hashing them again
//! would add nothing), and the one key of `key: service` is hashed once,
//! when the limiter is made: a request under a service-wide limit costs a
//! lock and one map lookup.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use meshlet_api::policy::{RateLimitKey, RateLimitScope, RateLimitSpec, RouteMatch};
use prometheus::IntCounter;

use crate::error::Refusal;
use crate::policy::dry_run::WouldRefuse;

/// Keys (callers, header values) tracked per limiter at most.
pub const MAX_KEYS: usize = 10_000;

/// The key used when the request has no value for the configured key.
pub const UNKNOWN_KEY: &str = "unknown";

/// What a request's key may be made of.
#[derive(Debug, Clone, Copy)]
pub struct KeySources<'a> {
    pub headers: &'a http::HeaderMap,
    /// The verified caller's service (`sourceService`).
    pub source: &'a str,
    /// The connection's peer IP, as text.
    pub peer_ip: &'a str,
    /// `--xff-trusted-hops`: proxies in front of this listener that append
    /// to `x-forwarded-for` and are trusted to.
    pub xff_trusted_hops: usize,
}

/// The client's IP for `key: clientIP`: the peer when `trusted_hops` is 0;
/// else the `trusted_hops`-th address from the right of `x-forwarded-for`
/// (every field line, in order), since each of the trusted proxies appended
/// the address it saw; entries further left were written by the client and
/// are ignored. With fewer entries, or one that is not an IP address, the
/// peer.
pub fn client_ip<'a>(headers: &'a http::HeaderMap, peer: &'a str, trusted_hops: usize) -> &'a str {
    if trusted_hops == 0 {
        return peer;
    }
    let mut entries = headers
        .get_all(http::header::HeaderName::from_static("x-forwarded-for"))
        .iter()
        .rev()
        // Split as bytes: a byte that is not ASCII in an entry the client
        // wrote spoils that entry only, not the trusted ones on its line.
        .flat_map(|line| line.as_bytes().rsplit(|&b| b == b','));
    let entry = entries
        .nth(trusted_hops - 1)
        .and_then(|entry| std::str::from_utf8(entry).ok())
        .map(str::trim);
    match entry {
        Some(ip) if ip.parse::<std::net::IpAddr>().is_ok() => ip,
        _ => peer,
    }
}

/// One policy's limiter with its per-key state.
#[derive(Debug)]
pub struct RateLimiter {
    /// `metadata.name` of the policy (shown in headers and bodies).
    pub name: String,
    pub spec: RateLimitSpec,
    pub route: RouteMatch,
    /// Healthy instances sharing a `global` limit (1 for `local`).
    share: AtomicU32,
    /// Per-key state, keyed by the hash of the key's text.
    keys: Mutex<KeyMap>,
    /// Seeds the key hash.
    hasher: RandomState,
    /// The hash of the empty key (`key: service`, and callers without a
    /// key of their own), computed once.
    empty_key: u64,
    /// `rate_limited_total{service, policy, endpoint}`, resolved at
    /// snapshot build; the request path counts each refusal on it.
    pub refused: IntCounter,
    /// `mode: dryRun`: a refusal is counted here instead (and the request
    /// goes through). [`RateLimiter::check`] takes a token only from a
    /// request it admits, so a dry-run limiter counts exactly what an
    /// enforcing one would refuse for the same traffic.
    pub dry_run: Option<WouldRefuse>,
}

/// Per-key state by the key's (already seeded, uniform) 64-bit hash.
type KeyMap = HashMap<u64, KeyState, BuildHasherDefault<HashIsKey>>;

/// A `Hasher` for keys that are hashes already: the key itself.
#[derive(Debug, Default)]
struct HashIsKey(u64);

impl Hasher for HashIsKey {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `u64` keys are hashed here (`write_u64`); fold anything
        // else in so the hasher stays correct if that ever changes.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, key: u64) {
        self.0 = key;
    }
}

#[derive(Debug, Clone, Copy)]
struct KeyState {
    last_seen: Instant,
    algo: AlgoState,
}

#[derive(Debug, Clone, Copy)]
enum AlgoState {
    Bucket {
        tokens: f64,
        refilled: Instant,
    },
    Window {
        start: Instant,
        current: u32,
        previous: u32,
    },
}

/// The effective limits after dividing a global limit.
#[derive(Debug, Clone, Copy)]
enum Effective {
    Bucket { capacity: f64, rate: f64 },
    Window { limit: f64, window: Duration },
}

impl RateLimiter {
    pub fn new(
        name: String,
        spec: RateLimitSpec,
        healthy_instances: usize,
        refused: IntCounter,
    ) -> Self {
        let hasher = RandomState::new();
        let limiter = RateLimiter {
            name,
            route: spec.route.clone().unwrap_or_default(),
            spec,
            share: AtomicU32::new(1),
            keys: Mutex::new(KeyMap::default()),
            empty_key: hasher.hash_one(""),
            hasher,
            refused,
            dry_run: None,
        };
        limiter.set_instances(healthy_instances);
        limiter
    }

    /// The limiter in `mode: dryRun`, counting on `dry_run`.
    pub fn with_dry_run(mut self, dry_run: Option<WouldRefuse>) -> Self {
        self.dry_run = dry_run;
        self
    }

    /// Re-derives the share of a global limit (at every snapshot build).
    pub fn set_instances(&self, healthy_instances: usize) {
        let share = match self.spec.scope {
            RateLimitScope::Local => 1,
            RateLimitScope::Global => healthy_instances.clamp(1, u32::MAX as usize) as u32,
        };
        self.share.store(share, Ordering::Relaxed);
    }

    pub fn share(&self) -> u32 {
        self.share.load(Ordering::Relaxed)
    }

    fn effective(&self) -> Effective {
        let share = f64::from(self.share());
        match (&self.spec.token_bucket, &self.spec.sliding_window) {
            (Some(bucket), _) => Effective::Bucket {
                capacity: (f64::from(bucket.capacity) / share).max(1.0),
                rate: bucket.refill_per_second / share,
            },
            (None, Some(window)) => Effective::Window {
                limit: (f64::from(window.requests) / share).max(1.0),
                window: window.window.get(),
            },
            // Validation guarantees one of the two.
            (None, None) => Effective::Window {
                limit: f64::MAX,
                window: Duration::from_secs(1),
            },
        }
    }

    /// The key of a request under this policy, borrowed from its headers
    /// or, for `sourceService`, the verified caller's service
    /// (`authz::Caller::rate_limit_key`, never a header a client could
    /// write), or for `clientIP` the client's address ([`client_ip`]).
    pub fn key<'a>(&self, from: &KeySources<'a>) -> &'a str {
        let value = match &self.spec.key {
            RateLimitKey::Service => return "",
            RateLimitKey::SourceService => return from.source,
            RateLimitKey::ClientIp => {
                return client_ip(from.headers, from.peer_ip, from.xff_trusted_hops)
            }
            RateLimitKey::Header(name) => from.headers.get(name.as_str()),
        };
        value
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty())
            .unwrap_or(UNKNOWN_KEY)
    }

    /// Takes one request for `key` at `now`: `Ok(remaining)` or the refusal.
    pub fn check(&self, key: &str, now: Instant) -> Result<u64, Box<Refusal>> {
        let effective = self.effective();
        let key = self.key_hash(key);
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        if keys.len() >= MAX_KEYS && !keys.contains_key(&key) {
            evict_oldest_half(&mut keys);
        }
        let state = keys.entry(key).or_insert_with(|| KeyState {
            last_seen: now,
            algo: match effective {
                Effective::Bucket { capacity, .. } => AlgoState::Bucket {
                    tokens: capacity,
                    refilled: now,
                },
                Effective::Window { .. } => AlgoState::Window {
                    start: now,
                    current: 0,
                    previous: 0,
                },
            },
        });
        state.last_seen = now;
        let decision = take(&mut state.algo, effective, now);
        drop(keys);
        decision.map_err(|retry_after| {
            let (quota, window_secs) = self.quota_and_window();
            Box::new(Refusal {
                policy: self.name.clone(),
                quota,
                window_secs,
                retry_after_secs: ceil_secs(retry_after),
            })
        })
    }

    /// The seeded hash `keys` holds `key`'s state under.
    fn key_hash(&self, key: &str) -> u64 {
        if key.is_empty() {
            self.empty_key
        } else {
            self.hasher.hash_one(key)
        }
    }

    /// `q` and `w` of the `RateLimit-Policy` header for this instance.
    pub fn quota_and_window(&self) -> (u32, u64) {
        match self.effective() {
            Effective::Bucket { capacity, rate } => {
                (capacity as u32, ceil_secs(secs_f64(capacity / rate)))
            }
            Effective::Window { limit, window } => (limit as u32, ceil_secs(window)),
        }
    }

    /// Live state for `/config_dump`.
    pub fn to_json(&self) -> serde_json::Value {
        let keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        let (quota, window) = self.quota_and_window();
        let service_key = keys.get(&self.empty_key).map(|s| match s.algo {
            AlgoState::Bucket { tokens, .. } => serde_json::json!({"tokens": tokens}),
            AlgoState::Window {
                current, previous, ..
            } => serde_json::json!({"currentWindow": current, "previousWindow": previous}),
        });
        serde_json::json!({
            "name": self.name,
            "spec": self.spec,
            "instancesSharing": self.share(),
            "quota": quota,
            "windowSeconds": window,
            "keys": keys.len(),
            "serviceKeyState": service_key,
        })
    }
}

/// Applies one request to a key's state; `Err(wait)` when refused.
fn take(state: &mut AlgoState, effective: Effective, now: Instant) -> Result<u64, Duration> {
    match (state, effective) {
        (AlgoState::Bucket { tokens, refilled }, Effective::Bucket { capacity, rate }) => {
            // With several threads, `now` may be a hair older than the
            // last refill: never move the refill time backwards.
            let now = now.max(*refilled);
            let elapsed = now.duration_since(*refilled).as_secs_f64();
            *tokens = (*tokens + elapsed * rate).min(capacity);
            *refilled = now;
            if *tokens >= 1.0 {
                *tokens -= 1.0;
                Ok(*tokens as u64)
            } else {
                Err(secs_f64((1.0 - *tokens) / rate))
            }
        }
        (
            AlgoState::Window {
                start,
                current,
                previous,
            },
            Effective::Window { limit, window },
        ) => {
            // Roll the fixed windows forward to the one containing `now`.
            let elapsed = now.saturating_duration_since(*start);
            if elapsed >= window {
                let windows = (elapsed.as_nanos() / window.as_nanos().max(1)) as u32;
                *previous = if windows == 1 { *current } else { 0 };
                *current = 0;
                *start += window * windows;
            }
            let into = now.saturating_duration_since(*start).as_secs_f64();
            let w = window.as_secs_f64();
            let overlap = 1.0 - into / w;
            let estimate = f64::from(*previous) * overlap + f64::from(*current);
            if estimate + 1.0 <= limit {
                *current += 1;
                Ok((limit - estimate - 1.0).max(0.0) as u64)
            } else {
                Err(window_wait(
                    f64::from(*previous),
                    f64::from(*current),
                    limit,
                    into,
                    w,
                ))
            }
        }
        // A spec change starts a fresh limiter, so kinds never mix; treat a
        // mismatch as allowed rather than panic.
        _ => Ok(0),
    }
}

/// How long until `previous * (1 - t/w) + current + 1 <= limit`, where `t`
/// runs from `into` (seconds into the current window).
fn window_wait(previous: f64, current: f64, limit: f64, into: f64, w: f64) -> Duration {
    let room = limit - current - 1.0;
    let t = if room >= 0.0 && previous > 0.0 {
        // Within this window, once enough of the previous one slid out.
        w * (1.0 - room / previous)
    } else {
        // Only after this window ends: then `current` becomes `previous`.
        let room_next = limit - 1.0;
        let after = if current > 0.0 && room_next < current {
            w * (1.0 - room_next / current)
        } else {
            0.0
        };
        w + after
    };
    secs_f64(t - into)
}

/// Seconds as a `Duration`, saturating instead of panicking on huge,
/// negative or non-finite values (a very slow refill rate, say).
fn secs_f64(secs: f64) -> Duration {
    Duration::try_from_secs_f64(secs.max(0.0)).unwrap_or(Duration::MAX)
}

fn ceil_secs(d: Duration) -> u64 {
    let secs = d.as_secs().saturating_add(u64::from(d.subsec_nanos() > 0));
    secs.max(1)
}

fn evict_oldest_half(keys: &mut KeyMap) {
    let mut seen: Vec<Instant> = keys.values().map(|s| s.last_seen).collect();
    let middle = seen.len() / 2;
    let (_, cutoff, _) = seen.select_nth_unstable(middle);
    let cutoff = *cutoff;
    keys.retain(|_, s| s.last_seen > cutoff);
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshlet_api::policy::{SlidingWindow, TargetRef, TokenBucket};
    use meshlet_api::HumanDuration;

    fn refused() -> IntCounter {
        IntCounter::new("rate_limited_total", "test").unwrap()
    }

    fn spec(bucket: Option<(u32, f64)>, window: Option<(u32, u64)>) -> RateLimitSpec {
        RateLimitSpec {
            target_ref: TargetRef {
                service: "orders".into(),
                namespace: None,
            },
            route: None,
            token_bucket: bucket.map(|(capacity, refill_per_second)| TokenBucket {
                capacity,
                refill_per_second,
            }),
            sliding_window: window.map(|(requests, secs)| SlidingWindow {
                requests,
                window: HumanDuration::from_secs(secs),
            }),
            key: RateLimitKey::Service,
            scope: RateLimitScope::Local,
            mode: Default::default(),
        }
    }

    #[test]
    fn token_bucket_allows_capacity_then_refills() {
        let limiter = RateLimiter::new("l".into(), spec(Some((10, 10.0)), None), 1, refused());
        let t0 = Instant::now();
        for _ in 0..10 {
            assert!(limiter.check("", t0).is_ok());
        }
        let refused = limiter.check("", t0).unwrap_err();
        assert_eq!(refused.retry_after_secs, 1);
        assert_eq!((refused.quota, refused.window_secs), (10, 1));
        // 100 ms later one token is back, not two.
        let t1 = t0 + Duration::from_millis(100);
        assert!(limiter.check("", t1).is_ok());
        assert!(limiter.check("", t1).is_err());
        // Never above capacity.
        let t2 = t1 + Duration::from_secs(60);
        for _ in 0..10 {
            assert!(limiter.check("", t2).is_ok());
        }
        assert!(limiter.check("", t2).is_err());
    }

    #[test]
    fn global_scope_divides_capacity_and_rate() {
        let mut s = spec(Some((20, 20.0)), None);
        s.scope = RateLimitScope::Global;
        let limiter = RateLimiter::new("l".into(), s, 2, refused());
        let t0 = Instant::now();
        let allowed = (0..50).filter(|_| limiter.check("", t0).is_ok()).count();
        assert_eq!(allowed, 10);
        let t1 = t0 + Duration::from_secs(1);
        let allowed = (0..50).filter(|_| limiter.check("", t1).is_ok()).count();
        assert_eq!(allowed, 10, "refilled at 10/s");
        limiter.set_instances(1);
        assert_eq!(limiter.quota_and_window().0, 20);
    }

    #[test]
    fn sliding_window_weights_the_previous_window() {
        let limiter = RateLimiter::new("w".into(), spec(None, Some((100, 60))), 1, refused());
        let t0 = Instant::now();
        for _ in 0..100 {
            assert!(limiter.check("", t0).is_ok());
        }
        let refused = limiter.check("", t0).unwrap_err();
        // Full until the window ends, then 1 of 100 slides out per 0.6 s.
        assert!((60..=61).contains(&refused.retry_after_secs), "{refused:?}");
        // A quarter into the next window, 75 of the previous still count.
        let t1 = t0 + Duration::from_secs(75);
        let allowed = (0..100).filter(|_| limiter.check("", t1).is_ok()).count();
        assert_eq!(allowed, 25);
        // Two windows of silence forget everything.
        let t2 = t1 + Duration::from_secs(180);
        let allowed = (0..200).filter(|_| limiter.check("", t2).is_ok()).count();
        assert_eq!(allowed, 100);
    }

    fn sources<'a>(headers: &'a http::HeaderMap, source: &'a str) -> KeySources<'a> {
        KeySources {
            headers,
            source,
            peer_ip: "127.0.0.9",
            xff_trusted_hops: 0,
        }
    }

    #[test]
    fn client_ip_is_the_peer_or_the_trusted_forwarded_for_hop() {
        let mut headers = http::HeaderMap::new();
        assert_eq!(client_ip(&headers, "10.0.0.1", 0), "10.0.0.1");
        assert_eq!(client_ip(&headers, "10.0.0.1", 1), "10.0.0.1", "none");
        headers.append("x-forwarded-for", "6.6.6.6, 1.2.3.4".parse().unwrap());
        headers.append("x-forwarded-for", "192.168.0.7".parse().unwrap());
        // Zero trusted hops: whatever a client wrote is ignored.
        assert_eq!(client_ip(&headers, "10.0.0.1", 0), "10.0.0.1");
        assert_eq!(client_ip(&headers, "10.0.0.1", 1), "192.168.0.7");
        assert_eq!(client_ip(&headers, "10.0.0.1", 2), "1.2.3.4");
        assert_eq!(client_ip(&headers, "10.0.0.1", 3), "6.6.6.6");
        assert_eq!(client_ip(&headers, "10.0.0.1", 4), "10.0.0.1", "fewer");
        headers.insert("x-forwarded-for", "not-an-ip".parse().unwrap());
        assert_eq!(client_ip(&headers, "10.0.0.1", 1), "10.0.0.1");
        // Attack: a byte that is not ASCII in the part the client wrote, on
        // the line the trusted proxy appended to, must not hide the
        // proxy's entry (the client would share the proxy's bucket).
        headers.insert(
            "x-forwarded-for",
            http::HeaderValue::from_bytes(b"6.6.6.\xff, 1.2.3.4").unwrap(),
        );
        assert_eq!(client_ip(&headers, "10.0.0.1", 1), "1.2.3.4");
        assert_eq!(client_ip(&headers, "10.0.0.1", 2), "10.0.0.1");

        let mut s = spec(Some((1, 0.001)), None);
        s.key = RateLimitKey::ClientIp;
        let limiter = RateLimiter::new("ip".into(), s, 1, refused());
        let headers = http::HeaderMap::new();
        let now = Instant::now();
        for (peer, expect_ok) in [
            ("127.0.0.2", true),
            ("127.0.0.3", true),
            ("127.0.0.2", false),
        ] {
            let key = limiter.key(&KeySources {
                peer_ip: peer,
                ..sources(&headers, "frontend")
            });
            assert_eq!(key, peer);
            assert_eq!(limiter.check(key, now).is_ok(), expect_ok, "{peer}");
        }
    }

    #[test]
    fn source_service_keys_are_the_verified_caller_never_a_header() {
        let mut s = spec(Some((1, 1.0)), None);
        s.key = RateLimitKey::SourceService;
        let limiter = RateLimiter::new("k".into(), s, 1, refused());
        let mut headers = http::HeaderMap::new();
        headers.insert("x-meshlet-source", "spoof-1".parse().unwrap());
        assert_eq!(limiter.key(&sources(&headers, "frontend")), "frontend");
        assert_eq!(
            limiter.key(&sources(&headers, crate::policy::authz::UNAUTHENTICATED)),
            "unauthenticated"
        );
        let now = Instant::now();
        // A spoofing plaintext client changes its header every time: it
        // still draws from the one bucket of unauthenticated callers.
        for (i, expect_ok) in [(1, true), (2, false), (3, false)] {
            headers.insert("x-meshlet-source", format!("spoof-{i}").parse().unwrap());
            let key = limiter.key(&sources(&headers, crate::policy::authz::UNAUTHENTICATED));
            assert_eq!(limiter.check(key, now).is_ok(), expect_ok, "spoof-{i}");
        }
        assert!(
            limiter.check("frontend", now).is_ok(),
            "frontend has its own"
        );
    }

    #[test]
    fn keys_are_counted_separately_and_bounded() {
        let mut s = spec(Some((1, 1.0)), None);
        s.key = RateLimitKey::Header("x-user".into());
        let limiter = RateLimiter::new("k".into(), s, 1, refused());
        let mut headers = http::HeaderMap::new();
        assert_eq!(limiter.key(&sources(&headers, "frontend")), UNKNOWN_KEY);
        headers.insert("x-user", "alice".parse().unwrap());
        assert_eq!(limiter.key(&sources(&headers, "frontend")), "alice");
        let now = Instant::now();
        assert!(limiter.check("alice", now).is_ok());
        assert!(limiter.check("alice", now).is_err());
        assert!(limiter.check("bob", now).is_ok());
        for i in 0..(MAX_KEYS + 10) {
            let _ = limiter.check(&format!("user-{i}"), now + Duration::from_millis(i as u64));
        }
        assert!(limiter.keys.lock().unwrap().len() <= MAX_KEYS);
    }

    #[test]
    fn a_very_slow_refill_refuses_without_panicking() {
        let limiter = RateLimiter::new("slow".into(), spec(Some((1, 1e-12)), None), 1, refused());
        let now = Instant::now();
        assert!(limiter.check("", now).is_ok());
        let refusal = limiter.check("", now).unwrap_err();
        assert!(refusal.retry_after_secs > 1_000_000, "{refusal:?}");
        assert_eq!(limiter.to_json()["quota"], 1);
    }

    #[test]
    fn keys_cost_the_same_whatever_their_length() {
        let limiter = RateLimiter::new("big".into(), spec(Some((1, 1.0)), None), 1, refused());
        let now = Instant::now();
        let huge = "x".repeat(60 * 1024);
        assert!(limiter.check(&huge, now).is_ok());
        assert!(
            limiter.check(&huge, now).is_err(),
            "the same key is counted"
        );
        assert!(limiter.check(&(huge + "y"), now).is_ok(), "another key");
        assert_eq!(limiter.keys.lock().unwrap().len(), 2);
    }
}
