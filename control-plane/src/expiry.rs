//! Self-preservation of the registry: when to expire silent instances and
//! when to suspect the control plane itself instead.
//!
//! A control plane that cannot hear its sidecars (starved of file
//! descriptors, CPU or network) sees *every* instance go silent at about
//! the same time; expiring them all would push an empty mesh to every
//! sidecar. So each reaper pass first asks [`Preservation::decide`]:
//!
//! ```text
//! (service, age of the last heartbeat) of every instance
//!   silent = heard longer than ttl/2 ago
//!   each service weighs 1: its silent share (silent / its instances)
//!   instances ≥ min_instances and Σ silent shares > share × services ─► Pause (nothing expires)
//!   paused for longer than max_pause                                 ─► Expire (give up, WARN)
//!   otherwise                                                        ─► Expire (those older than ttl go)
//! ```
//!
//! - **Silent** means not heard for more than half a TTL. Sidecars send a
//!   heartbeat every ttl/3, so a live one is never silent that long; and
//!   when the control plane stops hearing everyone at once, by the time
//!   the first instance is due (older than the TTL) all the others have
//!   been silent for at least 2/3 of it: the pause happens before the
//!   first expiry, not after a third of the mesh is gone.
//! - **Services weigh the same**, whatever their number of instances: a
//!   starved control plane hears *no* service, while one credential can
//!   only register instances of its own service (a sidecar token is bound
//!   to one) — a flood of fake instances that then go silent moves one
//!   service's share, never the mesh's, so it cannot pause expiry for
//!   everyone (review finding H2 of issue 16). The number of instances of
//!   one service is also capped at registration
//!   (`--max-instances-per-service`).
//! - **Pause** when at least `min_instances` are registered and the
//!   services' silent shares add up to more than `share` of the services
//!   (`--expiry-pause-share`, default 0.5; `--expiry-pause-min-instances`,
//!   default 3). A small mesh never pauses, so its one dead instance
//!   still goes.
//! - **Resume** as soon as that no longer holds: heartbeats flow again.
//!   That pass expires the instances still older than the TTL (the really
//!   dead ones). Deregistration (SIGTERM of a sidecar) is never paused.
//! - **Bounded**: a pause longer than `max_pause` (`--expiry-pause-max`,
//!   default 15 minutes) ends with the expiry it held back, so a mesh
//!   where most services really died converges at last. Sidecars still
//!   hold a push that empties every service and confirm it with a full
//!   resync before applying it (`sidecar/src/control/client.rs`).
//!
//! Everything here is pure (ages in, decision out); the controller keeps
//! the [`Preservation`] state and its counters for `/metrics`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// The thresholds (`--expiry-pause-share`, `--expiry-pause-min-instances`,
/// `--expiry-pause-max`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExpiryPolicy {
    /// More than this share of silent services pauses expiry (0..=1;
    /// 1 never pauses).
    pub pause_share: f64,
    /// Below this many registered instances expiry never pauses.
    pub min_instances: usize,
    /// The longest pause; past it the held-back expiry happens.
    pub max_pause: Duration,
}

impl Default for ExpiryPolicy {
    fn default() -> ExpiryPolicy {
        ExpiryPolicy {
            pause_share: 0.5,
            min_instances: 3,
            max_pause: Duration::from_secs(15 * 60),
        }
    }
}

/// What one reaper pass does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Expire the instances older than the TTL (possibly none).
    Expire,
    /// Too many services are silent: expire nothing.
    Pause { silent: usize, total: usize },
}

/// Whether an instance last heard `age` ago counts as silent.
pub fn is_silent(age: Duration, ttl: Duration) -> bool {
    age > ttl / 2
}

/// The pause state across reaper passes.
#[derive(Debug, Default)]
pub struct Preservation {
    pub policy: ExpiryPolicy,
    /// Since when expiry has been paused.
    paused_since: Option<Instant>,
    pauses: u64,
}

/// A change of state the caller logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    None,
    Paused,
    Resumed,
    /// The pause outlasted `max_pause`: expiry goes ahead.
    GaveUp,
}

impl Preservation {
    pub fn new(policy: ExpiryPolicy) -> Preservation {
        Preservation {
            policy,
            ..Preservation::default()
        }
    }

    pub fn paused(&self) -> bool {
        self.paused_since.is_some()
    }

    /// Pauses since start.
    pub fn pauses(&self) -> u64 {
        self.pauses
    }

    /// Decides one pass at `now` from the service (any key naming it) and
    /// the age of the last heartbeat of every registered instance, and
    /// records the state.
    pub fn decide<'s>(
        &mut self,
        instances: impl IntoIterator<Item = (&'s str, Duration)>,
        ttl: Duration,
        now: Instant,
    ) -> (Decision, Transition) {
        let mut total = 0usize;
        let mut silent = 0usize;
        // service → (instances, silent ones)
        let mut services: HashMap<&str, (usize, usize)> = HashMap::new();
        for (service, age) in instances {
            let counts = services.entry(service).or_default();
            counts.0 += 1;
            total += 1;
            if is_silent(age, ttl) {
                counts.1 += 1;
                silent += 1;
            }
        }
        let silent_services: f64 = services
            .values()
            .map(|&(all, quiet)| quiet as f64 / all as f64)
            .sum();
        let pause = total >= self.policy.min_instances
            && total > 0
            && silent_services > self.policy.pause_share * services.len() as f64;
        let (pause, transition) = match (self.paused_since, pause) {
            (None, true) => {
                self.pauses += 1;
                self.paused_since = Some(now);
                (true, Transition::Paused)
            }
            (Some(since), true) if now.saturating_duration_since(since) > self.policy.max_pause => {
                self.paused_since = None;
                (false, Transition::GaveUp)
            }
            (Some(_), true) => (true, Transition::None),
            (Some(_), false) => {
                self.paused_since = None;
                (false, Transition::Resumed)
            }
            (None, false) => (false, Transition::None),
        };
        let decision = if pause {
            Decision::Pause { silent, total }
        } else {
            Decision::Expire
        };
        (decision, transition)
    }
}

/// Parses `--expiry-pause-share`: a number from 0 to 1.
pub fn parse_share(text: &str) -> Result<f64, String> {
    let share: f64 = text.trim().parse().map_err(|e| format!("{e}"))?;
    if !(0.0..=1.0).contains(&share) {
        return Err("must be between 0 and 1".into());
    }
    Ok(share)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(6);

    /// Instances of services `a`, `b`, `c`, … in turn, with these ages.
    fn spread(secs: &[f64]) -> Vec<(&'static str, Duration)> {
        const NAMES: [&str; 6] = ["a", "b", "c", "d", "e", "f"];
        secs.iter()
            .enumerate()
            .map(|(i, s)| (NAMES[i % NAMES.len()], Duration::from_secs_f64(*s)))
            .collect()
    }

    fn of(service: &'static str, secs: &[f64]) -> Vec<(&'static str, Duration)> {
        secs.iter()
            .map(|s| (service, Duration::from_secs_f64(*s)))
            .collect()
    }

    #[test]
    fn one_silent_of_three_expires() {
        let mut p = Preservation::new(ExpiryPolicy::default());
        let (d, t) = p.decide(spread(&[7.0, 1.0, 0.5]), TTL, Instant::now());
        assert_eq!(d, Decision::Expire);
        assert_eq!(t, Transition::None);
    }

    #[test]
    fn most_silent_pauses_once_and_resumes() {
        let mut p = Preservation::new(ExpiryPolicy::default());
        let now = Instant::now();
        // 2 of 3 services silent (> ttl/2) though only one is past the TTL yet.
        let (d, t) = p.decide(spread(&[6.5, 4.0, 1.0]), TTL, now);
        assert_eq!(
            d,
            Decision::Pause {
                silent: 2,
                total: 3
            }
        );
        assert_eq!(t, Transition::Paused);
        let (_, t) = p.decide(spread(&[9.0, 7.0, 8.0]), TTL, now);
        assert_eq!(t, Transition::None, "still paused, counted once");
        assert_eq!(p.pauses(), 1);
        assert!(p.paused());
        let (d, t) = p.decide(spread(&[10.0, 0.1, 0.2]), TTL, now);
        assert_eq!((d, t), (Decision::Expire, Transition::Resumed));
        assert!(!p.paused());
    }

    #[test]
    fn exactly_the_share_does_not_pause() {
        let mut p = Preservation::new(ExpiryPolicy::default());
        let (d, _) = p.decide(spread(&[7.0, 7.0, 1.0, 1.0]), TTL, Instant::now());
        assert_eq!(d, Decision::Expire, "2 of 4 services is not more than half");
    }

    #[test]
    fn a_small_mesh_never_pauses() {
        let mut p = Preservation::new(ExpiryPolicy::default());
        for all in [spread(&[7.0]), spread(&[7.0, 8.0])] {
            assert_eq!(p.decide(all, TTL, Instant::now()).0, Decision::Expire);
        }
        assert_eq!(
            p.decide(Vec::new(), TTL, Instant::now()).0,
            Decision::Expire
        );
        assert_eq!(p.pauses(), 0);
    }

    #[test]
    fn share_one_never_pauses() {
        let mut p = Preservation::new(ExpiryPolicy {
            pause_share: 1.0,
            ..ExpiryPolicy::default()
        });
        let (d, _) = p.decide(spread(&[7.0, 7.0, 7.0]), TTL, Instant::now());
        assert_eq!(d, Decision::Expire);
    }

    /// Review finding H2: one sidecar token registers many instances of
    /// its own service and lets them go silent. By instance count they
    /// are the mesh's majority; by service they are one of three, so the
    /// dead instances of the others still expire.
    #[test]
    fn silent_fakes_of_one_service_do_not_pause_the_mesh() {
        let mut p = Preservation::new(ExpiryPolicy::default());
        let mut instances = of("attacker", &[5.0; 500]);
        instances.extend(of("orders", &[7.0, 0.5, 0.5]));
        instances.extend(of("payments", &[0.5, 0.5]));
        let (d, t) = p.decide(instances, TTL, Instant::now());
        assert_eq!((d, t), (Decision::Expire, Transition::None));
    }

    /// A starved control plane hears no service: whatever their sizes,
    /// every one is silent and expiry pauses.
    #[test]
    fn every_service_silent_pauses_whatever_their_sizes() {
        let mut p = Preservation::new(ExpiryPolicy::default());
        let mut instances = of("big", &[4.0; 50]);
        instances.extend(of("small", &[5.0]));
        instances.extend(of("tiny", &[6.5]));
        let (d, _) = p.decide(instances, TTL, Instant::now());
        assert_eq!(
            d,
            Decision::Pause {
                silent: 52,
                total: 52
            }
        );
    }

    #[test]
    fn a_pause_longer_than_the_maximum_gives_up() {
        let policy = ExpiryPolicy {
            max_pause: Duration::from_secs(60),
            ..ExpiryPolicy::default()
        };
        let mut p = Preservation::new(policy);
        let start = Instant::now();
        let dead = || spread(&[9.0, 9.0, 9.0]);
        assert_eq!(p.decide(dead(), TTL, start).1, Transition::Paused);
        let later = start + Duration::from_secs(59);
        assert_eq!(p.decide(dead(), TTL, later).1, Transition::None);
        let (d, t) = p.decide(dead(), TTL, start + Duration::from_secs(61));
        assert_eq!((d, t), (Decision::Expire, Transition::GaveUp));
        assert!(!p.paused());
    }

    #[test]
    fn share_is_checked() {
        assert_eq!(parse_share("0.5"), Ok(0.5));
        assert_eq!(parse_share("1"), Ok(1.0));
        assert!(parse_share("1.5").is_err());
        assert!(parse_share("-0.1").is_err());
        assert!(parse_share("half").is_err());
    }
}
