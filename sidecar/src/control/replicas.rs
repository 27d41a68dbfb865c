//! The control plane's replicas as a sidecar knows them: the URLs of
//! `--control-plane URL1,URL2,...`, each expanded into the addresses its
//! host resolves to, and which one the sidecar uses now.
//!
//! ```text
//! --control-plane https://a:15010,https://cp.mesh:15010
//!   parse ─► [a:15010, cp.mesh:15010] ─► resolve ─► endpoints [a 10.0.0.1, cp.mesh 10.0.0.7, cp.mesh 10.0.0.8]
//!   current() ─► one Endpoint (url, authority, pinned address, generation)
//!   failed(endpoint) ─► next endpoint (once per generation; a whole round re-resolves)
//! ```
//!
//! Every call to the control plane (watch, registration, heartbeats,
//! certificates, stats) asks [`Replicas::current`] for its endpoint, so
//! they all follow the replica the sidecar uses. Only the watch task
//! moves on ([`Replicas::failed`]): its stream is what says that a
//! replica is gone (refused, unreachable, closed or stalled stream). The
//! generation makes a failure reported twice for the same endpoint move
//! on once.
//!
//! An address is pinned per endpoint (`meshlet_client::Client::connect_to`)
//! while the URL's host stays the TLS server name, so the certificate
//! is verified for the name the user wrote. A host that is an IP address
//! is one endpoint; a name that does not resolve stays one endpoint
//! without an address (its calls then fail with the resolver's error).
//! With one URL naming one address the rotation is that endpoint alone:
//! exactly the single control plane of before.
//!
//! [`FailoverBackoff`] paces the attempts: equal jitter over a ceiling
//! that doubles after each whole round of failed endpoints (200 ms up to
//! 5 s), so a sidecar tries each replica once quickly before slowing
//! down, and a fleet never reconnects in step.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

/// The control plane's default port, when a URL names none.
pub const DEFAULT_PORT: u16 = 15010;

/// One `--control-plane` URL, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlPlaneUrl {
    /// As the user gave it (`https://cp:15010`).
    pub url: String,
    /// `host:port` (the `Host` header, the TLS server name's host).
    pub authority: String,
}

/// Why a `--control-plane` value was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("--control-plane {url:?}: {why}")]
pub struct BadUrl {
    pub url: String,
    pub why: String,
}

/// `URL1,URL2,...` (spaces around commas allowed) → the checked URLs, in
/// order, duplicates removed. Each is `https://HOST[:PORT]` (port 15010
/// when none is given), no path, no user information.
pub fn parse_urls(list: &str) -> Result<Vec<ControlPlaneUrl>, BadUrl> {
    let mut urls: Vec<ControlPlaneUrl> = Vec::new();
    for url in list.split(',').map(str::trim) {
        if url.is_empty() {
            return Err(BadUrl {
                url: list.to_owned(),
                why: "an empty URL in the list; write https://HOST:PORT[,https://HOST:PORT...]"
                    .into(),
            });
        }
        let parsed = ControlPlaneUrl {
            url: url.to_owned(),
            authority: authority(url)?,
        };
        if !urls.iter().any(|u| u.authority == parsed.authority) {
            urls.push(parsed);
        }
    }
    Ok(urls)
}

/// `https://HOST[:PORT]` → `HOST:PORT`.
fn authority(url: &str) -> Result<String, BadUrl> {
    let invalid = |why: &str| BadUrl {
        url: url.to_owned(),
        why: why.to_owned(),
    };
    let uri: http::Uri = url
        .parse()
        .map_err(|_| invalid("not a URL; expected https://HOST:PORT"))?;
    match uri.scheme_str() {
        Some("https") => {}
        Some("http") => {
            return Err(invalid(
                "the control plane speaks only HTTPS; use https://HOST:PORT",
            ))
        }
        Some(other) => {
            return Err(invalid(&format!(
                "scheme {other}:// is not supported; use https://HOST:PORT"
            )))
        }
        None => return Err(invalid("no scheme; expected https://HOST:PORT")),
    }
    if uri.path_and_query().is_some_and(|p| p.as_str() != "/") {
        return Err(invalid("a path is not allowed; expected https://HOST:PORT"));
    }
    let authority = uri
        .authority()
        .ok_or_else(|| invalid("no host; expected https://HOST:PORT"))?;
    if authority.as_str().contains('@') {
        return Err(invalid("user information is not allowed"));
    }
    if authority.host().is_empty() {
        return Err(invalid("no host; expected https://HOST:PORT"));
    }
    Ok(format!(
        "{}:{}",
        authority.host(),
        authority.port_u16().unwrap_or(DEFAULT_PORT)
    ))
}

/// Where one call goes: a URL, and the address of it to connect to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub url: String,
    pub authority: String,
    /// `None`: resolve the authority at connect time.
    pub addr: Option<SocketAddr>,
    /// The rotation's generation when this endpoint was handed out.
    pub generation: u64,
}

impl Endpoint {
    /// The URL, and the address when the host is a name (one of the
    /// addresses it resolves to).
    pub fn describe(&self) -> String {
        match self.addr {
            Some(addr) if literal_addr(&self.authority).is_none() => {
                format!("{} ({addr})", self.url)
            }
            _ => self.url.clone(),
        }
    }

    /// The client for this endpoint: `client` connecting to its address.
    pub fn client(&self, client: &meshlet_client::Client) -> meshlet_client::Client {
        client.clone().connect_to(self.addr)
    }
}

/// The rotation over every replica.
#[derive(Debug)]
pub struct Replicas {
    urls: Vec<ControlPlaneUrl>,
    rotation: Mutex<Rotation>,
}

#[derive(Debug)]
struct Rotation {
    endpoints: Vec<(usize, Option<SocketAddr>)>,
    index: usize,
    generation: u64,
    /// Endpoints moved on from since the last [`Replicas::resolve`].
    moved: usize,
    failovers: u64,
}

impl Replicas {
    /// The replicas of `urls` (at least one), unresolved: each URL is one
    /// endpoint until [`Replicas::resolve`] expands it.
    pub fn new(urls: Vec<ControlPlaneUrl>) -> Replicas {
        assert!(!urls.is_empty(), "at least one control-plane URL");
        let endpoints = (0..urls.len())
            .map(|i| (i, literal_addr(&urls[i].authority)))
            .collect();
        Replicas {
            urls,
            rotation: Mutex::new(Rotation {
                endpoints,
                index: 0,
                generation: 0,
                moved: 0,
                failovers: 0,
            }),
        }
    }

    pub fn urls(&self) -> &[ControlPlaneUrl] {
        &self.urls
    }

    /// The endpoint calls go to now.
    pub fn current(&self) -> Endpoint {
        let rotation = self.rotation.lock().unwrap();
        let (url, addr) = rotation.endpoints[rotation.index];
        Endpoint {
            url: self.urls[url].url.clone(),
            authority: self.urls[url].authority.clone(),
            addr,
            generation: rotation.generation,
        }
    }

    /// Failovers so far (moves from one endpoint to another).
    pub fn failovers(&self) -> u64 {
        self.rotation.lock().unwrap().failovers
    }

    /// Moves on from `failed` to the next endpoint, unless someone already
    /// did (its generation is past). True when this call moved; then
    /// [`Replicas::round_done`] says whether every endpoint was tried.
    pub fn failed(&self, failed: &Endpoint) -> bool {
        let mut rotation = self.rotation.lock().unwrap();
        if rotation.generation != failed.generation {
            return false;
        }
        rotation.generation += 1;
        rotation.moved += 1;
        if rotation.endpoints.len() > 1 {
            rotation.index = (rotation.index + 1) % rotation.endpoints.len();
            rotation.failovers += 1;
        }
        true
    }

    /// Whether every endpoint failed since the last resolution (time to
    /// resolve the names again).
    pub fn round_done(&self) -> bool {
        let rotation = self.rotation.lock().unwrap();
        rotation.moved >= rotation.endpoints.len()
    }

    /// Resolves every URL's host again: each name becomes one endpoint per
    /// address (in the resolver's order); an IP address or a name that
    /// does not resolve stays one endpoint. The current endpoint stays
    /// current when it is still there, else the rotation goes on from the
    /// same position.
    pub async fn resolve(&self) {
        let mut endpoints = Vec::new();
        for (i, url) in self.urls.iter().enumerate() {
            if let Some(addr) = literal_addr(&url.authority) {
                endpoints.push((i, Some(addr)));
                continue;
            }
            let addrs: Vec<SocketAddr> = match tokio::net::lookup_host(&url.authority).await {
                Ok(addrs) => addrs.collect(),
                Err(error) => {
                    tracing::debug!(control_plane = %url.url, %error, "cannot resolve");
                    Vec::new()
                }
            };
            let mut seen = Vec::new();
            for addr in addrs {
                if !seen.contains(&addr) {
                    seen.push(addr);
                    endpoints.push((i, Some(addr)));
                }
            }
            if seen.is_empty() {
                endpoints.push((i, None));
            }
        }
        self.replace(endpoints);
    }

    fn replace(&self, endpoints: Vec<(usize, Option<SocketAddr>)>) {
        let mut rotation = self.rotation.lock().unwrap();
        let current = rotation.endpoints[rotation.index];
        let index = endpoints
            .iter()
            .position(|e| *e == current)
            .unwrap_or(rotation.index % endpoints.len());
        if endpoints != rotation.endpoints || index != rotation.index {
            rotation.generation += 1;
        }
        rotation.endpoints = endpoints;
        rotation.index = index;
        rotation.moved = 0;
    }

    /// How many endpoints the rotation has.
    pub fn len(&self) -> usize {
        self.rotation.lock().unwrap().endpoints.len()
    }
}

/// The address of an authority whose host is an IP address.
fn literal_addr(authority: &str) -> Option<SocketAddr> {
    authority.parse().ok()
}

/// Exponential backoff with equal jitter over rounds of endpoints: the
/// ceiling starts at 200 ms and doubles after every `endpoints` failures,
/// up to 5 s; a delay is between half the ceiling and the ceiling. With
/// one endpoint it is the plain backoff of a single control plane.
#[derive(Debug, Default)]
pub struct FailoverBackoff {
    pub attempts: u32,
}

impl FailoverBackoff {
    pub const BASE: Duration = Duration::from_millis(200);
    pub const MAX: Duration = Duration::from_secs(5);

    /// The ceiling of the next delay when the rotation has `endpoints`.
    pub fn ceiling(&self, endpoints: usize) -> Duration {
        let rounds = self.attempts / endpoints.max(1) as u32;
        Self::BASE
            .saturating_mul(1 << rounds.min(10))
            .min(Self::MAX)
    }

    /// The next delay, counting one more failure.
    pub fn next_delay(&mut self, endpoints: usize) -> Duration {
        let ceiling = self.ceiling(endpoints);
        self.attempts += 1;
        // Equal jitter (half fixed, half random) keeps a fleet of sidecars
        // from reconnecting in step after a control plane restart, and
        // never retries at once.
        let ms = ceiling.as_millis() as u64;
        Duration::from_millis(ms / 2 + fastrand::u64(0..=ms / 2))
    }

    pub fn reset(&mut self) {
        self.attempts = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_lists_parse_in_order_without_duplicates() {
        let urls = parse_urls("https://a:1, https://b ,https://[::1]:9/,https://a:1").unwrap();
        let authorities: Vec<&str> = urls.iter().map(|u| u.authority.as_str()).collect();
        assert_eq!(authorities, ["a:1", "b:15010", "[::1]:9"]);
        assert_eq!(urls[1].url, "https://b");
        let one = parse_urls("https://meshlet-control-plane.meshlet").unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].authority, "meshlet-control-plane.meshlet:15010");
    }

    #[test]
    fn a_bad_url_anywhere_in_the_list_is_refused_by_name() {
        let cases = [
            ("https://a:1,http://b:2", "http://b:2", "speaks only HTTPS"),
            (
                "https://a:1,,https://c",
                "https://a:1,,https://c",
                "empty URL",
            ),
            ("https://a:1,", "https://a:1,", "empty URL"),
            ("cp:9000", "cp:9000", "no scheme"),
            ("https://cp:9000/api", "https://cp:9000/api", "path"),
            (
                "https://user@cp:9000",
                "https://user@cp:9000",
                "user information",
            ),
            ("https://", "https://", "URL"),
        ];
        for (list, url, why) in cases {
            let err = parse_urls(list).unwrap_err();
            assert_eq!(err.url, url, "{list}");
            assert!(err.to_string().contains(why), "{list}: {err}");
        }
    }

    fn replicas(list: &str) -> Replicas {
        Replicas::new(parse_urls(list).unwrap())
    }

    #[test]
    fn a_failure_moves_on_once_per_generation_and_wraps() {
        let r = replicas("https://127.0.0.1:1,https://127.0.0.1:2,https://127.0.0.1:3");
        let first = r.current();
        assert_eq!(first.authority, "127.0.0.1:1");
        assert_eq!(first.addr, Some(([127, 0, 0, 1], 1).into()));
        assert!(r.failed(&first));
        // The same failure seen by another task: no second move.
        assert!(!r.failed(&first));
        assert_eq!(r.current().authority, "127.0.0.1:2");
        assert!(!r.round_done());
        assert!(r.failed(&r.current()));
        assert!(r.failed(&r.current()));
        assert!(r.round_done());
        assert_eq!(r.current().authority, "127.0.0.1:1", "wrapped around");
        assert_eq!(r.failovers(), 3);
    }

    #[test]
    fn one_url_is_one_endpoint_and_never_a_failover() {
        let r = replicas("https://127.0.0.1:15010");
        let only = r.current();
        assert!(r.failed(&only));
        assert_eq!(r.current().authority, only.authority);
        assert!(r.round_done());
        assert_eq!(r.failovers(), 0);
    }

    #[tokio::test]
    async fn a_name_with_several_addresses_is_several_endpoints() {
        // `localhost` resolves to 127.0.0.1 (and ::1 where configured):
        // each address is an endpoint of the same URL and authority.
        let r = replicas("https://127.0.0.2:7,https://localhost:9");
        r.resolve().await;
        let mut seen = vec![r.current()];
        for _ in 1..r.len() {
            r.failed(&r.current());
            seen.push(r.current());
        }
        assert_eq!(seen[0].addr, Some(([127, 0, 0, 2], 7).into()));
        let local: Vec<&Endpoint> = seen[1..].iter().collect();
        assert!(!local.is_empty());
        for endpoint in &local {
            assert_eq!(
                endpoint.authority, "localhost:9",
                "the name is kept for TLS"
            );
            assert!(endpoint.addr.unwrap().ip().is_loopback());
        }
        assert!(local
            .iter()
            .any(|e| e.addr == Some(([127, 0, 0, 1], 9).into())));
    }

    #[tokio::test]
    async fn resolving_again_keeps_the_current_endpoint() {
        let r = replicas("https://127.0.0.1:1,https://127.0.0.1:2");
        r.failed(&r.current());
        let before = r.current();
        r.resolve().await;
        let after = r.current();
        assert_eq!(after.authority, before.authority);
        assert_eq!(after.generation, before.generation, "nothing changed");
        assert!(!r.round_done(), "a fresh round");
    }

    #[tokio::test]
    async fn a_name_that_does_not_resolve_stays_one_endpoint_without_address() {
        let r = replicas("https://no-such-host.invalid:1");
        r.resolve().await;
        assert_eq!(r.len(), 1);
        assert_eq!(r.current().addr, None);
    }

    #[test]
    fn backoff_tries_each_endpoint_quickly_then_slows_down_to_a_cap() {
        let mut backoff = FailoverBackoff::default();
        // Three replicas: the first round stays at the 200 ms ceiling.
        for _ in 0..3 {
            let delay = backoff.next_delay(3);
            assert!(delay >= Duration::from_millis(100) && delay <= Duration::from_millis(200));
        }
        assert_eq!(backoff.ceiling(3), Duration::from_millis(400));
        for _ in 0..60 {
            let delay = backoff.next_delay(3);
            assert!(delay <= FailoverBackoff::MAX, "{delay:?}");
        }
        let late = backoff.next_delay(3);
        assert!(late >= FailoverBackoff::MAX / 2, "{late:?}");
        backoff.reset();
        assert!(backoff.next_delay(3) <= Duration::from_millis(200));
    }

    #[test]
    fn with_one_endpoint_the_backoff_doubles_at_every_failure() {
        let mut backoff = FailoverBackoff::default();
        let ceilings: Vec<u128> = (0..7)
            .map(|_| {
                let c = backoff.ceiling(1).as_millis();
                backoff.next_delay(1);
                c
            })
            .collect();
        assert_eq!(ceilings, [200, 400, 800, 1600, 3200, 5000, 5000]);
    }
}
