//! Load balancing: endpoints of a service and the power-of-two-choices pick.
//!
//! Each [`Endpoint`] counts its outstanding requests (an atomic, no lock).
//! [`Balancer::pick`] samples two distinct available endpoints at random and
//! takes the one with fewer outstanding requests ("P2C least-loaded", as
//! linkerd and Envoy's LEAST_REQUEST do): it reacts to a slow or stuck
//! instance within a few requests, where round robin keeps feeding it.
//!
//! An endpoint that refused a connection is *ejected* for a short while
//! (passive health), so a killed instance stops receiving traffic after the
//! first failure instead of failing one request in N forever. If every
//! endpoint is ejected, the pick ignores ejection (better a try than a
//! certain 503), which is Envoy's "panic mode".

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crate::upstream::in_flight::{InFlight, InFlightCounter};
use crate::upstream::pool::ConnPool;

/// How long an endpoint that refused a connection is skipped.
const EJECTION: Duration = Duration::from_secs(5);

/// One instance of a service.
#[derive(Debug)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub labels: BTreeMap<String, String>,
    pub pool: Arc<ConnPool>,
    in_flight: InFlightCounter,
    /// Milliseconds since [`epoch`] until which the endpoint is skipped.
    ejected_until_ms: AtomicU64,
}

impl Endpoint {
    pub fn new(addr: SocketAddr, labels: BTreeMap<String, String>, pool: Arc<ConnPool>) -> Self {
        Endpoint {
            addr,
            labels,
            pool,
            in_flight: InFlightCounter::default(),
            ejected_until_ms: AtomicU64::new(0),
        }
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.get()
    }

    pub fn is_ejected(&self) -> bool {
        // Never ejected (0), the usual case: no clock read.
        let until = self.ejected_until_ms.load(Ordering::Relaxed);
        until != 0 && until > now_ms()
    }

    /// Marks the endpoint unusable for [`EJECTION`] (after a connect failure).
    pub fn eject(&self) {
        let until = now_ms() + EJECTION.as_millis() as u64;
        self.ejected_until_ms.store(until, Ordering::Relaxed);
    }

    /// Counts one outstanding request until the returned guard is dropped.
    pub fn start_request(&self) -> InFlight {
        self.in_flight.start()
    }
}

/// The endpoints of one service and the policy to choose among them.
#[derive(Debug, Default)]
pub struct Balancer {
    endpoints: Vec<Arc<Endpoint>>,
}

/// Indices of endpoints already tried for one request (at most 64 matter).
#[derive(Debug, Default, Clone, Copy)]
pub struct Tried(u64);

impl Tried {
    pub fn insert(&mut self, index: usize) {
        if index < 64 {
            self.0 |= 1 << index;
        }
    }

    fn contains(self, index: usize) -> bool {
        index < 64 && self.0 & (1 << index) != 0
    }
}

impl Balancer {
    pub fn new(endpoints: Vec<Arc<Endpoint>>) -> Self {
        Balancer { endpoints }
    }

    pub fn endpoints(&self) -> &[Arc<Endpoint>] {
        &self.endpoints
    }

    /// Picks an endpoint not in `tried`; returns it with its index.
    pub fn pick(&self, tried: Tried) -> Option<(usize, &Arc<Endpoint>)> {
        self.pick_among(tried, |_| true)
    }

    /// Like [`Balancer::pick`], among the endpoints whose index `allowed`
    /// accepts (a traffic split's subset, endpoints whose circuit breaker
    /// admits requests). Panic mode ignores ejection, never `allowed`.
    pub fn pick_among(
        &self,
        tried: Tried,
        allowed: impl Fn(usize) -> bool,
    ) -> Option<(usize, &Arc<Endpoint>)> {
        self.pick_where(|i, ep| !tried.contains(i) && !ep.is_ejected() && allowed(i))
            .or_else(|| self.pick_where(|i, _| !tried.contains(i) && allowed(i)))
    }

    /// Power of two choices among the endpoints `usable` accepts. One pass,
    /// evaluating `usable` once per endpoint (it may take a lock, and its
    /// answer may change meanwhile on another thread): reservoir sampling
    /// keeps two distinct usable endpoints chosen uniformly at random.
    fn pick_where(
        &self,
        usable: impl Fn(usize, &Endpoint) -> bool,
    ) -> Option<(usize, &Arc<Endpoint>)> {
        let mut chosen: [Option<usize>; 2] = [None, None];
        let mut seen = 0usize;
        for (i, endpoint) in self.endpoints.iter().enumerate() {
            if !usable(i, endpoint) {
                continue;
            }
            if seen < 2 {
                chosen[seen] = Some(i);
            } else {
                let slot = fastrand::usize(..=seen);
                if slot < 2 {
                    chosen[slot] = Some(i);
                }
            }
            seen += 1;
        }
        let pick = |i: usize| (i, &self.endpoints[i]);
        match chosen {
            [Some(a), Some(b)] => {
                let (load_a, load_b) =
                    (self.endpoints[a].in_flight(), self.endpoints[b].in_flight());
                Some(pick(match load_a.cmp(&load_b) {
                    std::cmp::Ordering::Less => a,
                    std::cmp::Ordering::Greater => b,
                    std::cmp::Ordering::Equal if fastrand::bool() => a,
                    std::cmp::Ordering::Equal => b,
                }))
            }
            [Some(a), None] => Some(pick(a)),
            _ => None,
        }
    }
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    epoch().elapsed().as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::Limits;
    use crate::upstream::pool::ConnPool;

    fn balancer(n: u16) -> Balancer {
        let limits = Arc::new(Limits::default());
        Balancer::new(
            (0..n)
                .map(|i| {
                    let addr: SocketAddr = ([127, 0, 0, 1], 9000 + i).into();
                    Arc::new(Endpoint::new(
                        addr,
                        BTreeMap::new(),
                        ConnPool::new(addr, limits.clone()),
                    ))
                })
                .collect(),
        )
    }

    #[test]
    fn spreads_over_all_endpoints() {
        let b = balancer(3);
        let mut hits = [0; 3];
        for _ in 0..300 {
            hits[b.pick(Tried::default()).unwrap().0] += 1;
        }
        assert!(hits.iter().all(|&h| h > 50), "{hits:?}");
    }

    #[test]
    fn asks_once_per_endpoint_and_is_uniform_among_the_allowed() {
        let b = balancer(6);
        let asked = std::cell::Cell::new(0);
        let mut hits = [0usize; 6];
        for _ in 0..3000 {
            asked.set(0);
            let (i, _) = b
                .pick_among(Tried::default(), |i| {
                    asked.set(asked.get() + 1);
                    i % 2 == 0
                })
                .unwrap();
            assert_eq!(asked.get(), 6, "one question per endpoint");
            hits[i] += 1;
        }
        assert_eq!(hits[1] + hits[3] + hits[5], 0, "only allowed endpoints");
        assert!([0, 2, 4].iter().all(|&i| hits[i] > 800), "{hits:?}");
    }

    #[test]
    fn prefers_the_less_loaded_endpoint() {
        let b = balancer(2);
        let _busy: Vec<_> = (0..5).map(|_| b.endpoints()[0].start_request()).collect();
        for _ in 0..50 {
            assert_eq!(b.pick(Tried::default()).unwrap().0, 1);
        }
    }

    #[test]
    fn skips_ejected_and_tried_but_falls_back_when_all_ejected() {
        let b = balancer(3);
        b.endpoints()[0].eject();
        let mut tried = Tried::default();
        tried.insert(1);
        for _ in 0..50 {
            assert_eq!(b.pick(tried).unwrap().0, 2);
        }
        b.endpoints()[2].eject();
        b.endpoints()[1].eject();
        assert!(b.pick(Tried::default()).is_some(), "panic mode still picks");
        tried.insert(0);
        tried.insert(2);
        assert!(b.pick(tried).is_none());
    }

    #[test]
    fn guard_releases_on_drop() {
        let b = balancer(1);
        let ep = &b.endpoints()[0];
        let g = ep.start_request();
        assert_eq!(ep.in_flight(), 1);
        drop(g);
        assert_eq!(ep.in_flight(), 0);
    }
}
