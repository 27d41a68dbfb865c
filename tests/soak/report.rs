//! Sorting the soak's outcomes into classes, and the table it prints.
//!
//! A failed request (not 2xx, or no answer) is **unavoidable** when it was
//! in flight on an instance at the moment that instance was SIGKILLed:
//! the port its error names belongs to an [`Incarnation`] that was
//! killed, the request started before the process was reaped and ended
//! after the signal. Nothing can save such a request without a retry (its
//! bytes may have reached the app). Every other failure is **avoidable**
//! (a drain, a policy change, a restart, a stale endpoint must lose
//! nothing) and is listed with the schedule's nearest event before it.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Instant;

use crate::chaos::{Action, Event, Incarnation};
use crate::load::Outcome;
use crate::rss::Series;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Class {
    Unavoidable,
    Avoidable,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    NoRetry,
    Retry,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::NoRetry => "no retry",
            Phase::Retry => "RetryPolicy",
        }
    }
}

/// The incarnation `port` belongs to (its inbound or its app port).
fn owner(incarnations: &[Incarnation], port: Option<u16>) -> Option<&Incarnation> {
    let port = port?;
    incarnations
        .iter()
        .find(|i| i.inbound == port || i.app == port)
}

/// The SIGKILLed incarnation `outcome` was in flight on: the one its
/// error names, or for a body cut off mid-response (which names nothing)
/// the one instance whose kill window the request overlaps.
fn killed_under<'a>(outcome: &Outcome, incarnations: &'a [Incarnation]) -> Option<&'a Incarnation> {
    let overlaps = |i: &&Incarnation| {
        i.kill_window
            .is_some_and(|(signalled, dead)| outcome.start <= dead && outcome.end >= signalled)
    };
    if outcome.port.is_none() && outcome.body_cut {
        let mut killed = incarnations.iter().filter(overlaps);
        return match (killed.next(), killed.next()) {
            (Some(one), None) => Some(one),
            _ => None,
        };
    }
    owner(incarnations, outcome.port).filter(overlaps)
}

pub fn classify(outcome: &Outcome, incarnations: &[Incarnation]) -> Class {
    match killed_under(outcome, incarnations) {
        Some(_) => Class::Unavoidable,
        None => Class::Avoidable,
    }
}

/// Counts per phase and class, and the table.
pub struct Report {
    pub text: String,
    pub total: usize,
    /// (phase, class) → failures.
    pub failures: BTreeMap<(Phase, Class), usize>,
    /// One line per avoidable failure (at most 50).
    pub avoidable: Vec<String>,
    /// Unavoidable failures per phase whose response head had not yet
    /// arrived (a retry could have saved them; a body cut it cannot).
    pub before_head: BTreeMap<Phase, usize>,
}

impl Report {
    pub fn failures(&self, phase: Option<Phase>, class: Class) -> usize {
        self.failures
            .iter()
            .filter(|((p, c), _)| *c == class && phase.is_none_or(|phase| phase == *p))
            .map(|(_, n)| n)
            .sum()
    }
}

pub struct Run<'a> {
    pub start: Instant,
    pub secs: f64,
    pub clients: usize,
    pub rate: f64,
    pub outcomes: &'a [Outcome],
    pub incarnations: &'a [Incarnation],
    pub events: &'a [Event],
    pub retry_began: Option<Instant>,
    pub rss: &'a [Series],
    /// The RSS slope is fitted from this many seconds on.
    pub rss_from: f64,
}

impl Run<'_> {
    fn at(&self, instant: Instant) -> f64 {
        instant.saturating_duration_since(self.start).as_secs_f64()
    }

    fn phase(&self, outcome: &Outcome) -> Phase {
        match self.retry_began {
            Some(began) if outcome.start >= began => Phase::Retry,
            _ => Phase::NoRetry,
        }
    }

    pub fn report(&self) -> Report {
        let mut text = String::new();
        let total = self.outcomes.len();
        let succeeded = self.outcomes.iter().filter(|o| o.succeeded()).count();
        let _ = writeln!(
            text,
            "\n=== soak: {:.0} s, {} keep-alive clients, target {:.0} req/s, achieved {:.1} req/s ===",
            self.secs,
            self.clients,
            self.rate,
            total as f64 / self.secs
        );

        let _ = writeln!(text, "\nschedule (s since start):");
        let shown = |i: usize| self.events.len() <= 40 || i < 8 || i + 4 >= self.events.len();
        for (i, event) in self.events.iter().enumerate() {
            if !shown(i) {
                if shown(i - 1) {
                    let _ = writeln!(text, "  ...");
                }
                continue;
            }
            let _ = writeln!(
                text,
                "  {:>6.1} .. {:>6.1}  {}",
                self.at(event.at),
                self.at(event.done),
                event.note
            );
        }
        for kind in ["SIGKILL", "SIGTERM", "apply", "rollback", "RetryPolicy"] {
            let of_kind: Vec<&Event> = self
                .events
                .iter()
                .filter(|e| action_kind(e.action) == kind)
                .collect();
            if of_kind.is_empty() {
                continue;
            }
            let mean = of_kind
                .iter()
                .map(|e| (e.done - e.at).as_secs_f64())
                .sum::<f64>()
                / of_kind.len() as f64;
            let _ = writeln!(
                text,
                "  {:>4} × {kind:<12} (mean {mean:.2} s each, until the caller routes with the result)",
                of_kind.len()
            );
        }
        if let Some(began) = self.retry_began {
            let _ = writeln!(
                text,
                "  RetryPolicy phase from {:.1} s (the caller routing with it)",
                self.at(began)
            );
        }

        // Phase × class.
        let mut failures: BTreeMap<(Phase, Class), usize> = BTreeMap::new();
        let mut requests: BTreeMap<Phase, usize> = BTreeMap::new();
        let mut by_status: BTreeMap<(Phase, Class, String, String), usize> = BTreeMap::new();
        let mut avoidable = Vec::new();
        let mut unavoidable = Vec::new();
        let mut before_head: BTreeMap<Phase, usize> = BTreeMap::new();
        for outcome in self.outcomes {
            let phase = self.phase(outcome);
            *requests.entry(phase).or_default() += 1;
            if outcome.succeeded() {
                continue;
            }
            let class = classify(outcome, self.incarnations);
            *failures.entry((phase, class)).or_default() += 1;
            let status = outcome.status.map_or("none".to_owned(), |s| s.to_string());
            let reason = match (&outcome.reason, outcome.body_cut) {
                (_, true) => "(body cut)".to_owned(),
                (Some(reason), false) => reason.clone(),
                (None, false) => "-".to_owned(),
            };
            if class == Class::Unavoidable && !outcome.body_cut {
                *before_head.entry(phase).or_default() += 1;
            }
            *by_status
                .entry((phase, class, status.clone(), reason.clone()))
                .or_default() += 1;
            match class {
                Class::Avoidable if avoidable.len() < 50 => {
                    avoidable.push(self.describe(outcome, &status, &reason));
                }
                Class::Unavoidable if unavoidable.len() < 50 => {
                    unavoidable.push(self.in_flight(outcome, &status, &reason));
                }
                _ => {}
            }
        }
        let _ = writeln!(
            text,
            "\n{:<12} {:>9} {:>9} {:>12} {:>10}",
            "phase", "requests", "2xx", "unavoidable", "avoidable"
        );
        for (phase, n) in &requests {
            let unavoidable = failures.get(&(*phase, Class::Unavoidable)).unwrap_or(&0);
            let avoidable = failures.get(&(*phase, Class::Avoidable)).unwrap_or(&0);
            let _ = writeln!(
                text,
                "{:<12} {:>9} {:>9} {:>12} {:>10}",
                phase.name(),
                n,
                n - unavoidable - avoidable,
                unavoidable,
                avoidable
            );
        }
        let _ = writeln!(text, "{:<12} {:>9} {:>9}", "total", total, succeeded);

        let _ = writeln!(
            text,
            "\nnot 2xx, by phase, class, status and x-meshlet-reason:"
        );
        if by_status.is_empty() {
            let _ = writeln!(text, "  (none)");
        }
        for ((phase, class, status, reason), n) in &by_status {
            let _ = writeln!(
                text,
                "  {:<12} {:<12} {:>5} {:<26} {:>6}",
                phase.name(),
                format!("{class:?}").to_lowercase(),
                status,
                reason,
                n
            );
        }
        for line in &unavoidable {
            let _ = writeln!(text, "  unavoidable: {line}");
        }
        for line in &avoidable {
            let _ = writeln!(text, "  avoidable: {line}");
        }

        // Who answered: 2xx per incarnation (by the app port).
        let _ = writeln!(text, "\n2xx per instance:");
        let served: Vec<usize> = self
            .incarnations
            .iter()
            .map(|incarnation| {
                self.outcomes
                    .iter()
                    .filter(|o| o.succeeded() && o.port == Some(incarnation.app))
                    .count()
            })
            .collect();
        let all = self.incarnations.len() <= 20;
        for (incarnation, served) in self.incarnations.iter().zip(&served) {
            let killed = incarnation.kill_window.map_or(String::new(), |(s, d)| {
                format!(
                    " (SIGKILL at {:.1} s, reaped {:.1} s)",
                    self.at(s),
                    self.at(d)
                )
            });
            if all || incarnation.label.ends_with("stable") {
                let _ = writeln!(text, "  {:<14} {:>8}{killed}", incarnation.label, served);
            }
        }
        if !all {
            let mut churned: Vec<usize> = self
                .incarnations
                .iter()
                .zip(&served)
                .filter(|(i, _)| !i.label.ends_with("stable"))
                .map(|(_, n)| *n)
                .collect();
            churned.sort_unstable();
            let _ = writeln!(
                text,
                "  {} churned instances: min {}, median {}, max {}",
                churned.len(),
                churned.first().unwrap_or(&0),
                churned.get(churned.len() / 2).unwrap_or(&0),
                churned.last().unwrap_or(&0)
            );
        }

        let _ = writeln!(
            text,
            "\nRSS (VmRSS, MiB){:>14} {:>7} {:>7} {:>8}  slope from {:.0} s (MiB/min)",
            "first", "last", "max", "samples", self.rss_from
        );
        for series in self.rss {
            let slope = series
                .slope(self.rss_from)
                .map_or("-".into(), |s| format!("{s:+.3}"));
            let _ = writeln!(
                text,
                "  {:<26} {:>7.1} {:>7.1} {:>7.1} {:>8}  {slope}",
                series.name,
                series.first_mib(),
                series.last_mib(),
                series.max_mib(),
                series.samples.len()
            );
        }
        Report {
            text,
            total,
            failures,
            avoidable,
            before_head,
        }
    }

    /// An unavoidable failure: the instance, and the request's start and
    /// end relative to the SIGKILL.
    fn in_flight(&self, outcome: &Outcome, status: &str, reason: &str) -> String {
        let Some(killed) = killed_under(outcome, self.incarnations) else {
            return String::new();
        };
        let (signalled, dead) = killed.kill_window.expect("a killed instance");
        let ms = |a: Instant, b: Instant| {
            if a >= b {
                (a - b).as_secs_f64() * 1e3
            } else {
                -(b - a).as_secs_f64() * 1e3
            }
        };
        format!(
            "{status} {reason} {}: started {:+.1} ms, failed {:+.1} ms from the SIGKILL \
             (reaped {:+.1} ms) {:?}",
            killed.label,
            ms(outcome.start, signalled),
            ms(outcome.end, signalled),
            ms(dead, signalled),
            outcome.detail
        )
    }

    /// A failure with its time, who it names, and the last event before it.
    fn describe(&self, outcome: &Outcome, status: &str, reason: &str) -> String {
        let who =
            owner(self.incarnations, outcome.port).map_or("?".to_owned(), |i| i.label.clone());
        let last = self
            .events
            .iter()
            .rev()
            .find(|e| e.at <= outcome.end)
            .map_or("no event yet".to_owned(), |e| {
                format!(
                    "{:.2} s after the start of: {}",
                    outcome.end.saturating_duration_since(e.at).as_secs_f64(),
                    e.note
                )
            });
        format!(
            "{:.3}..{:.3} s {status} {reason} {who} {:?} [{last}]",
            self.at(outcome.start),
            self.at(outcome.end),
            outcome.detail
        )
    }
}

/// How the summary names an action.
fn action_kind(action: Action) -> &'static str {
    match action {
        Action::Kill(_) => "SIGKILL",
        Action::Term(_) => "SIGTERM",
        Action::Apply => "apply",
        Action::Rollback => "rollback",
        Action::Retry => "RetryPolicy",
    }
}
