//! `meshctl check`: the mesh's health as a list of checks, each ✔ (ok),
//! ⚠ (warning) or ✖ (error) with a one-line hint, like `linkerd check`.
//!
//! ```text
//! GET /api/v1/check ─► CheckReport ─► judge(report, thresholds) ─► [Check] ─► lines or JSON; exit 1 on any ✖
//! ```
//!
//! The control plane reports facts (last heartbeat, acknowledged revision,
//! versions, clock skew, certificate expiry, the store's and CA's health,
//! policies whose target has no instance); the thresholds and the wording
//! are here, in [`judge`], a pure function the unit tests drive.

use std::time::Duration;

use meshlet_api::check::{paths, CheckReport};
use serde::Serialize;

use crate::client::ControlPlane;
use crate::output::{age, emit, now_ms, Format};

/// What `meshctl check` compares against.
#[derive(Debug, Clone, Copy)]
pub struct Thresholds {
    /// A CA root expiring sooner than this is a warning.
    pub ca_expiry_warning: Duration,
    /// A sidecar clock this far from the control plane's is a warning...
    pub clock_skew_warning: Duration,
    /// ...and this far an error.
    pub clock_skew_error: Duration,
}

impl Default for Thresholds {
    fn default() -> Thresholds {
        Thresholds {
            ca_expiry_warning: Duration::from_secs(30 * 86_400),
            clock_skew_warning: Duration::from_secs(1),
            clock_skew_error: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Warning,
    Error,
}

impl Status {
    fn mark(self) -> &'static str {
        match self {
            Status::Ok => "✔",
            Status::Warning => "⚠",
            Status::Error => "✖",
        }
    }
}

/// One check's verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub status: Status,
    /// What was found (for a warning or error: what is wrong, per item).
    pub message: String,
    /// What to do about it (empty when ok).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub hint: String,
}

impl Check {
    fn ok(name: &'static str, message: impl Into<String>) -> Check {
        Check {
            name,
            status: Status::Ok,
            message: message.into(),
            hint: String::new(),
        }
    }

    /// Ok when `problems` is empty, else `status` with them listed.
    fn from_problems(
        name: &'static str,
        ok: impl Into<String>,
        status: Status,
        problems: Vec<String>,
        hint: &str,
    ) -> Check {
        if problems.is_empty() {
            return Check::ok(name, ok);
        }
        Check {
            name,
            status,
            message: list(&problems),
            hint: hint.to_owned(),
        }
    }
}

/// Up to five problems, then how many more.
fn list(problems: &[String]) -> String {
    let mut text = problems
        .iter()
        .take(5)
        .cloned()
        .collect::<Vec<_>>()
        .join("; ");
    if problems.len() > 5 {
        text.push_str(&format!("; and {} more", problems.len() - 5));
    }
    text
}

#[derive(Debug, Serialize)]
struct Outcome<'a> {
    ok: bool,
    server: &'a str,
    checks: &'a [Check],
}

/// Runs `meshctl check`: prints the checks; `Ok(false)` (exit 1) if any
/// is an error.
pub async fn run(
    cp: &ControlPlane,
    thresholds: Thresholds,
    format: Format,
) -> Result<bool, crate::CommandError> {
    let checks = match cp.get::<CheckReport>(paths::CHECK).await {
        Ok(report) => {
            let mut checks = vec![Check::ok(
                "control plane reachable",
                format!("{} answered (version {})", cp.server(), report.version),
            )];
            checks.extend(judge(&report, now_ms(), thresholds));
            checks
        }
        Err(error) => vec![Check {
            name: "control plane reachable",
            status: Status::Error,
            message: error.to_string(),
            hint: "check --server, --ca-file and the token (MESHLET_SERVER, MESHLET_CA_FILE, MESHLET_TOKEN), and that the control plane runs".into(),
        }],
    };
    let ok = checks.iter().all(|c| c.status != Status::Error);
    match format {
        Format::Table => emit(&render(&checks)),
        other => {
            let outcome = Outcome {
                ok,
                server: &cp.server(),
                checks: &checks,
            };
            emit(&crate::output::structured(other, &outcome).unwrap_or_default());
        }
    }
    Ok(ok)
}

/// The checks as text: one line each, a hint line under a warning or error,
/// and a summary.
pub fn render(checks: &[Check]) -> String {
    let mut out = String::new();
    for check in checks {
        out.push_str(&format!(
            "{} {}: {}\n",
            check.status.mark(),
            check.name,
            check.message
        ));
        if !check.hint.is_empty() {
            out.push_str(&format!("    hint: {}\n", check.hint));
        }
    }
    let errors = checks.iter().filter(|c| c.status == Status::Error).count();
    let warnings = checks
        .iter()
        .filter(|c| c.status == Status::Warning)
        .count();
    out.push_str(&match (errors, warnings) {
        (0, 0) => "Status check results are ✔\n".to_owned(),
        (0, w) => format!("Status check results are ✔ with {w} warning(s)\n"),
        (e, _) => format!("Status check results are ✖ ({e} failed)\n"),
    });
    out
}

/// The checks after "reachable", from `report` at `now_ms` (meshctl's clock).
pub fn judge(report: &CheckReport, now_ms: u64, thresholds: Thresholds) -> Vec<Check> {
    let interval = Duration::from_millis(report.heartbeat_interval_ms);
    // Two missed heartbeats and a second of slack: silent.
    let silent_after = interval * 2 + Duration::from_secs(1);
    let mut checks = vec![
        Check::ok(
            "control plane healthy",
            format!(
                "revision {}, {} instance(s) registered",
                report.revision,
                report.sidecars.len()
            ),
        ),
        if report.store.ok {
            Check::ok("store healthy", report.store.detail.clone())
        } else {
            Check {
                name: "store healthy",
                status: Status::Error,
                message: report.store.detail.clone(),
                hint: "look at the control plane's log and its data directory (disk full? permissions?)".into(),
            }
        },
        ca_check(report, now_ms, thresholds),
        workload_certs(report, now_ms),
    ];

    let mut silent = Vec::new();
    for s in &report.sidecars {
        let seen = Duration::from_millis(s.last_seen_ms_ago);
        if seen > silent_after {
            silent.push(format!(
                "{} ({}.{}) silent for {} (heartbeats every {})",
                s.id,
                s.service,
                s.namespace,
                age(seen),
                age(interval)
            ));
        } else if s.watching == Some(false) {
            silent.push(format!(
                "{} ({}.{}) has no watch stream open",
                s.id, s.service, s.namespace
            ));
        }
    }
    let mut connected = Check::from_problems(
        "sidecars connected",
        format!("{} sidecar(s) heartbeating and watching", report.sidecars.len()),
        Status::Error,
        silent,
        "a silent sidecar is frozen, overloaded or cut off: look at its /live and log; it is removed after the TTL",
    );
    if connected.status == Status::Ok && !report.expired.is_empty() {
        let gone: Vec<String> = report
            .expired
            .iter()
            .map(|e| {
                format!(
                    "{} ({}.{}) expired {} ago without deregistering",
                    e.id,
                    e.service,
                    e.namespace,
                    age(Duration::from_millis(e.expired_ms_ago))
                )
            })
            .collect();
        connected = Check {
            name: "sidecars connected",
            status: Status::Warning,
            message: list(&gone),
            hint: "a sidecar stopped heartbeating (killed, frozen or partitioned) and was removed after the TTL".into(),
        };
    }
    checks.push(connected);

    let mut behind = Vec::new();
    let mut silent_about_revision = 0;
    for s in &report.sidecars {
        match (s.revisions_behind, s.behind_for_ms) {
            (None, _) => silent_about_revision += 1,
            (Some(n), Some(ms)) if n > 0 && Duration::from_millis(ms) >= interval * 2 => {
                behind.push(format!(
                    "{} ({}.{}) at revision {} ({n} behind for {})",
                    s.id,
                    s.service,
                    s.namespace,
                    s.revision.unwrap_or_default(),
                    age(Duration::from_millis(ms))
                ));
            }
            _ => {}
        }
    }
    let mut latest = Check::from_problems(
        "sidecars on the latest revision",
        format!("every sidecar acknowledged revision {} or is catching up", report.revision),
        Status::Error,
        behind,
        "a sidecar that stays behind cannot apply what it was sent: look at its log (watch errors, held empty pushes)",
    );
    if latest.status == Status::Ok && silent_about_revision > 0 {
        latest = Check {
            name: "sidecars on the latest revision",
            status: Status::Warning,
            message: format!("{silent_about_revision} sidecar(s) have not reported a revision yet"),
            hint:
                "older sidecars do not report one, and a new one reports with its first heartbeat"
                    .into(),
        };
    }
    checks.push(latest);

    let skewed_versions: Vec<String> = report
        .sidecars
        .iter()
        .filter_map(|s| {
            let v = s.version.as_deref()?;
            (v != report.version)
                .then(|| format!("{} ({}.{}) runs {v}", s.id, s.service, s.namespace))
        })
        .collect();
    checks.push(Check::from_problems(
        "version skew",
        format!(
            "sidecars run the control plane's version {}",
            report.version
        ),
        Status::Warning,
        skewed_versions,
        &format!(
            "upgrade sidecars to {} (restart their pods after the control plane upgrade)",
            report.version
        ),
    ));

    let mut skew_status = Status::Ok;
    let mut skewed = Vec::new();
    for s in &report.sidecars {
        let Some(ms) = s.clock_skew_ms else { continue };
        let skew = Duration::from_millis(ms.unsigned_abs());
        let status = if skew >= thresholds.clock_skew_error {
            Status::Error
        } else if skew >= thresholds.clock_skew_warning {
            Status::Warning
        } else {
            continue;
        };
        skew_status = skew_status.max(status);
        let way = if ms > 0 { "ahead" } else { "behind" };
        skewed.push(format!(
            "{} ({}.{}) is {} {way}",
            s.id,
            s.service,
            s.namespace,
            age(skew)
        ));
    }
    checks.push(Check::from_problems(
        "clock skew",
        format!(
            "sidecar clocks within {} of the control plane's",
            age(thresholds.clock_skew_warning)
        ),
        skew_status,
        skewed,
        "synchronise clocks (NTP/chrony): certificates and traces depend on them",
    ));

    let orphans: Vec<String> = report
        .policies_without_instances
        .iter()
        .map(|p| {
            format!(
                "{} {}/{} targets {}.{}, which has no instances",
                p.kind, p.namespace, p.name, p.target_service, p.target_namespace
            )
        })
        .collect();
    checks.push(Check::from_problems(
        "policies target services with instances",
        "every policy's target has instances",
        Status::Error,
        orphans,
        "check the policy's targetRef (service name and namespace: `meshctl get services`), or start the service",
    ));
    checks
}

fn ca_check(report: &CheckReport, now_ms: u64, thresholds: Thresholds) -> Check {
    let name = "CA healthy";
    let Some(signing) = report.ca.roots.iter().find(|r| r.signing) else {
        return Check {
            name,
            status: Status::Error,
            message: "no signing root".into(),
            hint: "the control plane cannot sign workload certificates: look at its log and data directory".into(),
        };
    };
    let left = Duration::from_millis(signing.not_after_ms.saturating_sub(now_ms));
    if signing.not_after_ms <= now_ms {
        return Check {
            name,
            status: Status::Error,
            message: format!("the signing root {} has expired", signing.subject),
            hint: "rotate the CA now: `meshctl ca rotate`".into(),
        };
    }
    if left < thresholds.ca_expiry_warning {
        return Check {
            name,
            status: Status::Warning,
            message: format!(
                "the signing root {} expires in {}",
                signing.subject,
                age(left)
            ),
            hint: "rotate the CA before it expires: `meshctl ca rotate`".into(),
        };
    }
    Check::ok(
        name,
        format!("signing root {} valid for {}", signing.subject, age(left)),
    )
}

fn workload_certs(report: &CheckReport, now_ms: u64) -> Check {
    let ttl = report.ca.workload_cert_ttl_ms;
    let mut status = Status::Ok;
    let mut problems = Vec::new();
    let mut counted = 0;
    for s in &report.sidecars {
        let Some(not_after) = s.cert_not_after_ms else {
            continue;
        };
        counted += 1;
        let who = format!("{} ({}.{})", s.id, s.service, s.namespace);
        if not_after <= now_ms {
            status = Status::Error;
            problems.push(format!("{who}: certificate expired"));
        } else if not_after - now_ms < ttl / 4 {
            status = status.max(Status::Warning);
            problems.push(format!(
                "{who}: certificate expires in {} (renewal overdue)",
                age(Duration::from_millis(not_after - now_ms))
            ));
        }
    }
    Check::from_problems(
        "workload certificates",
        format!("{counted} certificate(s) valid, none near expiry"),
        status,
        problems,
        "sidecars renew at half-life: one that does not cannot reach the control plane (look at its log)",
    )
}

#[cfg(test)]
mod tests {
    use meshlet_api::check::{ComponentHealth, PolicyTarget, SidecarStatus};
    use meshlet_api::mesh::{CaRoot, CaStatus, InstanceRole};

    use super::*;

    const NOW: u64 = 1_000_000_000_000;

    fn sidecar(id: &str) -> SidecarStatus {
        SidecarStatus {
            id: id.into(),
            service: "orders".into(),
            namespace: "default".into(),
            role: InstanceRole::Sidecar,
            healthy: true,
            last_seen_ms_ago: 500,
            revision: Some(7),
            revisions_behind: Some(0),
            behind_for_ms: Some(0),
            watching: Some(true),
            version: Some("0.1.0".into()),
            clock_skew_ms: Some(3),
            cert_not_after_ms: Some(NOW + 20 * 3_600_000),
        }
    }

    fn report() -> CheckReport {
        CheckReport {
            version: "0.1.0".into(),
            now_ms: NOW,
            revision: 7,
            heartbeat_interval_ms: 3000,
            ttl_ms: 9000,
            store: ComponentHealth {
                ok: true,
                detail: "read".into(),
            },
            ca: CaStatus {
                trust_domain: "meshlet.local".into(),
                workload_cert_ttl_ms: 24 * 3_600_000,
                roots: vec![CaRoot {
                    subject: "meshlet root".into(),
                    serial: "1".into(),
                    fingerprint: "ab".into(),
                    not_after_ms: NOW + 365 * 86_400_000,
                    signing: true,
                    live_leaves: 2,
                }],
                rotation: None,
            },
            sidecars: vec![sidecar("o1"), sidecar("o2")],
            expired: Vec::new(),
            policies_without_instances: Vec::new(),
        }
    }

    fn statuses(report: &CheckReport) -> Vec<(&'static str, Status)> {
        judge(report, NOW, Thresholds::default())
            .into_iter()
            .map(|c| (c.name, c.status))
            .filter(|(_, s)| *s != Status::Ok)
            .collect()
    }

    #[test]
    fn a_healthy_report_is_all_ok() {
        assert_eq!(statuses(&report()), vec![]);
        assert!(render(&judge(&report(), NOW, Thresholds::default())).ends_with("results are ✔\n"));
    }

    #[test]
    fn each_problem_fails_its_own_check() {
        let mut r = report();
        r.sidecars[0].last_seen_ms_ago = 7_500;
        r.sidecars[1].revisions_behind = Some(2);
        r.sidecars[1].behind_for_ms = Some(6_000);
        r.sidecars[1].clock_skew_ms = Some(-6_000);
        r.sidecars[1].version = Some("0.0.9".into());
        r.policies_without_instances.push(PolicyTarget {
            kind: "RateLimitPolicy".into(),
            namespace: "default".into(),
            name: "ghost-limit".into(),
            target_namespace: "default".into(),
            target_service: "ghost".into(),
        });
        assert_eq!(
            statuses(&r),
            vec![
                ("sidecars connected", Status::Error),
                ("sidecars on the latest revision", Status::Error),
                ("version skew", Status::Warning),
                ("clock skew", Status::Error),
                ("policies target services with instances", Status::Error),
            ]
        );
        let text = render(&judge(&r, NOW, Thresholds::default()));
        assert!(
            text.contains("✖ sidecars connected: o1 (orders.default) silent for 7s"),
            "{text}"
        );
        assert!(text.contains("ghost-limit targets ghost.default"), "{text}");
    }

    #[test]
    fn briefly_behind_is_catching_up_and_expiry_is_warned() {
        let mut r = report();
        r.sidecars[0].revisions_behind = Some(1);
        r.sidecars[0].behind_for_ms = Some(1_000);
        r.ca.roots[0].not_after_ms = NOW + 86_400_000;
        r.sidecars[1].cert_not_after_ms = Some(NOW + 3_600_000);
        assert_eq!(
            statuses(&r),
            vec![
                ("CA healthy", Status::Warning),
                ("workload certificates", Status::Warning)
            ]
        );
    }
}
