//! Self-preservation of the registry: when to expire silent instances and
//! when to suspect the control plane itself instead.
//!
//! A control plane that cannot hear its sidecars (starved of file
//! descriptors, CPU or network) sees *every* instance go silent at about
//! the same time; expiring them all would push an empty mesh to every
//! sidecar. So each reaper pass first asks [`Preservation::decide`]:
//!
//! ```text
//! ages of the last heartbeats ─► silent = heard longer than ttl/2 ago
//!   n ≥ min_instances and silent > share × n ─► Pause   (nothing expires)
//!   otherwise                                ─► Expire  (those older than ttl go)
//! ```
//!
//! - **Silent** means not heard for more than half a TTL. Sidecars send a
//!   heartbeat every ttl/3, so a live one is never silent that long; and
//!   when the control plane stops hearing everyone at once, by the time
//!   the first instance is due (older than the TTL) all the others have
//!   been silent for at least 2/3 of it: the pause happens before the
//!   first expiry, not after a third of the mesh is gone.
//! - **Pause** when at least `min_instances` are registered and more than
//!   `share` of them are silent (`--expiry-pause-share`, default 0.5;
//!   `--expiry-pause-min-instances`, default 3). A small mesh never
//!   pauses, so its one dead instance still goes.
//! - **Resume** as soon as that no longer holds: heartbeats flow again,
//!   so the share of instances heard within the last ttl/2 is back above
//!   `1 − share`. That pass expires the instances still older than the
//!   TTL (the really dead ones). Deregistration (SIGTERM of a sidecar)
//!   is never paused.
//!
//! A known limit, as with Eureka's self-preservation: if more than `share`
//! of the instances really die at once, expiry stays paused until enough
//! of them come back or are deregistered; the WARN log and
//! `meshlet_control_plane_expiry_paused` say so.
//!
//! Everything here is pure (ages in, decision out); the controller keeps
//! the [`Preservation`] state and its counters for `/metrics`.

use std::time::Duration;

/// The thresholds (`--expiry-pause-share`, `--expiry-pause-min-instances`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExpiryPolicy {
    /// More than this share of silent instances pauses expiry (0..=1;
    /// 1 never pauses).
    pub pause_share: f64,
    /// Below this many registered instances expiry never pauses.
    pub min_instances: usize,
}

impl Default for ExpiryPolicy {
    fn default() -> ExpiryPolicy {
        ExpiryPolicy {
            pause_share: 0.5,
            min_instances: 3,
        }
    }
}

/// What one reaper pass does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Expire the instances older than the TTL (possibly none).
    Expire,
    /// Too many instances are silent: expire nothing.
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
    paused: bool,
    pauses: u64,
}

/// A change of state the caller logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    None,
    Paused,
    Resumed,
}

impl Preservation {
    pub fn new(policy: ExpiryPolicy) -> Preservation {
        Preservation {
            policy,
            ..Preservation::default()
        }
    }

    pub fn paused(&self) -> bool {
        self.paused
    }

    /// Pauses since start.
    pub fn pauses(&self) -> u64 {
        self.pauses
    }

    /// Decides one pass from the ages of every registered instance's last
    /// heartbeat, and records the state.
    pub fn decide(
        &mut self,
        ages: impl IntoIterator<Item = Duration>,
        ttl: Duration,
    ) -> (Decision, Transition) {
        let mut total = 0usize;
        let mut silent = 0usize;
        for age in ages {
            total += 1;
            if is_silent(age, ttl) {
                silent += 1;
            }
        }
        let pause = total >= self.policy.min_instances
            && total > 0
            && silent as f64 > self.policy.pause_share * total as f64;
        let transition = match (self.paused, pause) {
            (false, true) => {
                self.pauses += 1;
                Transition::Paused
            }
            (true, false) => Transition::Resumed,
            _ => Transition::None,
        };
        self.paused = pause;
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

    fn ages(secs: &[f64]) -> Vec<Duration> {
        secs.iter().map(|s| Duration::from_secs_f64(*s)).collect()
    }

    #[test]
    fn one_silent_of_three_expires() {
        let mut p = Preservation::new(ExpiryPolicy::default());
        let (d, t) = p.decide(ages(&[7.0, 1.0, 0.5]), TTL);
        assert_eq!(d, Decision::Expire);
        assert_eq!(t, Transition::None);
    }

    #[test]
    fn most_silent_pauses_once_and_resumes() {
        let mut p = Preservation::new(ExpiryPolicy::default());
        // 2 of 3 silent (> ttl/2) though only one is past the TTL yet.
        let (d, t) = p.decide(ages(&[6.5, 4.0, 1.0]), TTL);
        assert_eq!(
            d,
            Decision::Pause {
                silent: 2,
                total: 3
            }
        );
        assert_eq!(t, Transition::Paused);
        let (_, t) = p.decide(ages(&[9.0, 7.0, 8.0]), TTL);
        assert_eq!(t, Transition::None, "still paused, counted once");
        assert_eq!(p.pauses(), 1);
        assert!(p.paused());
        let (d, t) = p.decide(ages(&[10.0, 0.1, 0.2]), TTL);
        assert_eq!((d, t), (Decision::Expire, Transition::Resumed));
        assert!(!p.paused());
    }

    #[test]
    fn exactly_the_share_does_not_pause() {
        let mut p = Preservation::new(ExpiryPolicy::default());
        let (d, _) = p.decide(ages(&[7.0, 7.0, 1.0, 1.0]), TTL);
        assert_eq!(d, Decision::Expire, "2 of 4 is not more than half");
    }

    #[test]
    fn a_small_mesh_never_pauses() {
        let mut p = Preservation::new(ExpiryPolicy::default());
        for all in [ages(&[7.0]), ages(&[7.0, 8.0])] {
            assert_eq!(p.decide(all, TTL).0, Decision::Expire);
        }
        assert_eq!(p.decide(Vec::new(), TTL).0, Decision::Expire);
        assert_eq!(p.pauses(), 0);
    }

    #[test]
    fn share_one_never_pauses() {
        let mut p = Preservation::new(ExpiryPolicy {
            pause_share: 1.0,
            min_instances: 3,
        });
        assert_eq!(p.decide(ages(&[7.0, 7.0, 7.0]), TTL).0, Decision::Expire);
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
