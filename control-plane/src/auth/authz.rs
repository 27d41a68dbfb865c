//! Authorization as data: every API action a route performs, and which roles
//! may perform it.
//!
//! | action                          | admin | viewer | sidecar (ns, svc)       |
//! |---------------------------------|-------|--------|-------------------------|
//! | `ReadResources`                 | yes   | yes    | no                      |
//! | `WriteResources`                | yes   | no     | no                      |
//! | `ReadRegistry`                  | yes   | yes    | no                      |
//! | `RegisterInstance{ns, svc}`     | yes   | no     | only its own ns and svc |
//! | `HeartbeatInstance{ns, svc}`    | yes   | no     | only its own ns and svc |
//! | `DeregisterInstance{ns, svc}`   | yes   | no     | only its own ns and svc |
//! | `SignCertificate{ns, svc}`      | yes   | no     | only its own ns and svc |
//! | `Watch`                         | yes   | yes    | yes                     |
//! | `ReportStats`                   | yes   | no     | yes                     |
//! | `ExportSpans`                   | yes   | no     | yes                     |
//! | `ReadTraces`                    | yes   | yes    | no                      |
//! | `Dashboard`                     | yes   | yes    | no                      |
//! | `ManageTokens`                  | yes   | no     | no                      |
//! | `ReadCa`                        | yes   | yes    | no                      |
//! | `RotateCa`                      | yes   | no     | no                      |
//!
//! Which route is which action is the API's mapping: `ReadResources` covers
//! get/describe/history/diff (diff changes nothing), `WriteResources`
//! apply/delete/rollback, `ReadRegistry` the services/endpoints/instances
//! reads, `Watch` the push stream (a read of routing state, so viewers may
//! watch too), `Dashboard` the page, its JSON and events.
//!
//! `may` checks the role only. Heartbeat and deregister also name an
//! instance id: whether *this* credential registered it is the separate
//! [`Owners`](super::Owners) check, done by the API after `may`.

use std::fmt;

use super::tokens::{Principal, Role};

/// One thing a request asks to do. Namespace/service fields are those of the
/// instance or identity the request is about (from its body or the instance
/// record), never the caller's claim about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action<'a> {
    ReadResources,
    WriteResources,
    ReadRegistry,
    RegisterInstance {
        namespace: &'a str,
        service: &'a str,
    },
    HeartbeatInstance {
        namespace: &'a str,
        service: &'a str,
    },
    DeregisterInstance {
        namespace: &'a str,
        service: &'a str,
    },
    Watch,
    ReportStats,
    ExportSpans,
    ReadTraces,
    Dashboard,
    ManageTokens,
    SignCertificate {
        namespace: &'a str,
        service: &'a str,
    },
    /// `GET /api/v1/ca`: the roots and their live leaves.
    ReadCa,
    /// `POST /api/v1/ca/rotate`: a new root for the whole mesh.
    RotateCa,
    /// `GET /api/v1/tap`: watch live requests (`meshctl tap`); a viewer's
    /// tap carries no header values.
    Tap,
    /// `POST /api/v1/tap/{id}/events`: a tapped sidecar's events (the
    /// handler checks the tap selects the token's service).
    ReportTap,
}

impl Action<'_> {
    /// A short stable name for logs, metrics and error bodies.
    pub fn name(&self) -> &'static str {
        match self {
            Action::ReadResources => "read-resources",
            Action::WriteResources => "write-resources",
            Action::ReadRegistry => "read-registry",
            Action::RegisterInstance { .. } => "register-instance",
            Action::HeartbeatInstance { .. } => "heartbeat-instance",
            Action::DeregisterInstance { .. } => "deregister-instance",
            Action::Watch => "watch",
            Action::ReportStats => "report-stats",
            Action::ExportSpans => "export-spans",
            Action::ReadTraces => "read-traces",
            Action::Dashboard => "dashboard",
            Action::ManageTokens => "manage-tokens",
            Action::SignCertificate { .. } => "sign-certificate",
            Action::ReadCa => "read-ca",
            Action::RotateCa => "rotate-ca",
            Action::Tap => "tap",
            Action::ReportTap => "report-tap",
        }
    }

    /// The namespace/service an action is about, if it is about one.
    pub fn target(&self) -> Option<(&str, &str)> {
        match *self {
            Action::RegisterInstance { namespace, service }
            | Action::HeartbeatInstance { namespace, service }
            | Action::DeregisterInstance { namespace, service }
            | Action::SignCertificate { namespace, service } => Some((namespace, service)),
            _ => None,
        }
    }

    fn is_viewer_read(&self) -> bool {
        matches!(
            self,
            Action::ReadResources
                | Action::ReadRegistry
                | Action::Watch
                | Action::ReadTraces
                | Action::Dashboard
                | Action::ReadCa
                | Action::Tap
        )
    }
}

impl fmt::Display for Action<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.target() {
            Some((ns, svc)) => write!(f, "{} {ns}/{svc}", self.name()),
            None => f.write_str(self.name()),
        }
    }
}

/// A refusal (403), saying who was refused what and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("token {principal:?} ({role}) may not {action}: {reason}")]
pub struct Denied {
    pub principal: String,
    pub role: String,
    pub action: String,
    pub reason: &'static str,
}

impl Principal {
    /// Whether this principal's role allows `action` (see the module table).
    pub fn may(&self, action: Action<'_>) -> Result<(), Denied> {
        let deny = |reason| {
            Err(Denied {
                principal: self.name.clone(),
                role: self.role.to_string(),
                action: action.to_string(),
                reason,
            })
        };
        match &self.role {
            Role::Admin => Ok(()),
            Role::Viewer => {
                if action.is_viewer_read() {
                    Ok(())
                } else {
                    deny("a viewer token may only read")
                }
            }
            Role::Sidecar { namespace, service } => match action {
                Action::Watch | Action::ReportStats | Action::ExportSpans | Action::ReportTap => {
                    Ok(())
                }
                Action::RegisterInstance { .. }
                | Action::HeartbeatInstance { .. }
                | Action::DeregisterInstance { .. }
                | Action::SignCertificate { .. } => {
                    let (ns, svc) = action.target().unwrap_or_default();
                    if ns == namespace && svc == service {
                        Ok(())
                    } else {
                        deny("a sidecar token acts only for its own namespace and service")
                    }
                }
                _ => deny("a sidecar token may only register, watch and report"),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal(role: Role) -> Principal {
        Principal {
            name: "p".into(),
            role,
        }
    }

    /// Every action, once about the sidecar's own identity and once about others.
    fn all_actions() -> Vec<(Action<'static>, &'static str)> {
        let own = ("default", "orders");
        let other_svc = ("default", "frontend");
        let other_ns = ("prod", "orders");
        let mut v = vec![
            (Action::ReadResources, "-"),
            (Action::WriteResources, "-"),
            (Action::ReadRegistry, "-"),
            (Action::Watch, "-"),
            (Action::ReportStats, "-"),
            (Action::ExportSpans, "-"),
            (Action::ReadTraces, "-"),
            (Action::Dashboard, "-"),
            (Action::ManageTokens, "-"),
            (Action::ReadCa, "-"),
            (Action::RotateCa, "-"),
            (Action::Tap, "-"),
            (Action::ReportTap, "-"),
        ];
        for (which, (namespace, service)) in [
            ("own", own),
            ("other-svc", other_svc),
            ("other-ns", other_ns),
        ] {
            v.push((Action::RegisterInstance { namespace, service }, which));
            v.push((Action::HeartbeatInstance { namespace, service }, which));
            v.push((Action::DeregisterInstance { namespace, service }, which));
            v.push((Action::SignCertificate { namespace, service }, which));
        }
        v
    }

    /// The expected table, written out independently of `may`.
    fn expected(role: &str, action: &Action<'_>, which: &str) -> bool {
        use Action::*;
        match role {
            "admin" => true,
            "viewer" => matches!(
                action,
                ReadResources | ReadRegistry | Watch | ReadTraces | Dashboard | ReadCa | Tap
            ),
            "sidecar" => match action {
                Watch | ReportStats | ExportSpans | ReportTap => true,
                RegisterInstance { .. }
                | HeartbeatInstance { .. }
                | DeregisterInstance { .. }
                | SignCertificate { .. } => which == "own",
                ReadResources | WriteResources | ReadRegistry | ReadTraces | Dashboard
                | ManageTokens | ReadCa | RotateCa | Tap => false,
            },
            _ => unreachable!(),
        }
    }

    #[test]
    fn every_role_times_every_action() {
        let roles = [
            ("admin", Role::Admin),
            ("viewer", Role::Viewer),
            ("sidecar", Role::sidecar("default", "orders").unwrap()),
        ];
        let mut checked = 0;
        for (role_name, role) in roles {
            let p = principal(role);
            for (action, which) in all_actions() {
                let want = expected(role_name, &action, which);
                let got = p.may(action);
                assert_eq!(got.is_ok(), want, "{role_name} {action} ({which}): {got:?}");
                checked += 1;
            }
        }
        assert_eq!(checked, 3 * 25);
    }

    #[test]
    fn denial_names_principal_action_and_reason() {
        let p = Principal {
            name: "orders-sidecar".into(),
            role: Role::sidecar("default", "orders").unwrap(),
        };
        let err = p
            .may(Action::RegisterInstance {
                namespace: "default",
                service: "frontend",
            })
            .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("orders-sidecar"), "{msg}");
        assert!(msg.contains("register-instance default/frontend"), "{msg}");
        assert!(msg.contains("sidecar(default/orders)"), "{msg}");

        let v = principal(Role::Viewer);
        assert_eq!(
            v.may(Action::WriteResources).unwrap_err().action,
            "write-resources"
        );
    }
}
