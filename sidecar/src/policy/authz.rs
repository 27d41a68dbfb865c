//! Zero trust on the inbound side: who the caller is (from its verified
//! certificate, never from a header), whether it may call in plaintext
//! (`MTLSPolicy`) and whether it may make this request
//! (`AuthorizationPolicy`).
//!
//! Data flow: `Snapshot::build` makes the own service's [`ZeroTrust`]:
//! the effective mTLS mode (a policy that targets the service beats the
//! mesh-wide one; among equals `strict` wins), the compiled authorization
//! policies with their metric handles, and [`Callers`], the map from a
//! SPIFFE id to the service the registry says it is (its endpoints'
//! `identity`), falling back to the id's own namespace and service
//! account. `proxy::Inbound` resolves the connection's `Peer.identity` to
//! a [`Caller`] once per request, then: [`ZeroTrust::refuses_plaintext`] →
//! [`ZeroTrust::authorize`] → rate limit (keyed by
//! [`Caller::rate_limit_key`]) → the `x-meshlet-source*` headers for the
//! app ([`Caller::source_headers`]).
//!
//! Evaluation is Istio's: every dry-run policy is evaluated first and
//! counts what it would refuse (`meshlet_authz_dry_run_denied_total`, and
//! `meshlet_policy_would_refuse_total{kind="AuthorizationPolicy",
//! reason="denied"}` on each policy concerned, a debug log line), never
//! refusing, and [`ZeroTrust::authorize`] hands back the mark for the span
//! and the access log; then any matching enforced `DENY`
//! refuses; then, if any enforced `ALLOW` policy selects the service, a
//! request that no enforced `ALLOW` matches is refused (named after those
//! policies). Refusals are counted on `meshlet_authz_denied_total{policy}`.
//!
//! Opaque TCP (`Handler::admits_opaque`: a transparent inbound's
//! plaintext non-HTTP connection, or the mesh hop's `meshlet-tcp`) is asked
//! once per connection with no HTTP attributes ([`Request::http`] `None`),
//! failing closed like Istio: an ALLOW rule with `to`/`when` cannot match
//! it, a DENY rule matches on its sources alone.
//!
//! **Invariant:** policies are compiled at snapshot build (paths parsed,
//! identities parsed, header names made, counters resolved); a request
//! only compares strings.

use std::collections::HashMap;
use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue, Method};
use meshlet_api::identity::SpiffeId;
use meshlet_api::mesh::MeshState;
use meshlet_api::zero_trust::{
    AuthorizationSpec, AuthzAction, AuthzMode, AuthzRule, MtlsMode, PathPattern,
};
use meshlet_api::Resource;
use prometheus::IntCounter;
use serde_json::json;

use crate::policy::dry_run::WouldRefuse;
use crate::telemetry::metrics::{destination_label, Metrics};

/// The rate-limit key (`sourceService`) and the name of every caller
/// without a verified identity: they share one bucket.
pub const UNAUTHENTICATED: &str = "unauthenticated";

/// The service a verified identity is, with the header values the app
/// gets, made once per identity and snapshot.
#[derive(Debug)]
pub struct CallerService {
    pub namespace: String,
    pub name: String,
    /// `name`, or `name.namespace` outside `default` (the `x-meshlet-source`
    /// value and the rate-limit key).
    pub label: Arc<str>,
    /// The SPIFFE id as text (`x-meshlet-source-identity`).
    pub uri: Arc<str>,
    source_header: Option<HeaderValue>,
    identity_header: Option<HeaderValue>,
}

impl CallerService {
    fn new(identity: &SpiffeId, namespace: &str, name: &str) -> Self {
        let label = destination_label(namespace, name);
        let uri = identity.to_string();
        CallerService {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            source_header: HeaderValue::from_str(&label).ok(),
            identity_header: HeaderValue::from_str(&uri).ok(),
            label: label.into(),
            uri: uri.into(),
        }
    }
}

/// Who made a request: its verified identity and the service that is
/// (`None` for both: a plaintext caller).
#[derive(Debug, Clone, Default)]
pub struct Caller {
    pub identity: Option<Arc<SpiffeId>>,
    pub service: Option<Arc<CallerService>>,
}

impl Caller {
    /// The key of a `sourceService` rate limit: the verified service, or
    /// [`UNAUTHENTICATED`].
    pub fn rate_limit_key(&self) -> &str {
        self.service.as_ref().map_or(UNAUTHENTICATED, |s| &s.label)
    }

    /// `(x-meshlet-source, x-meshlet-source-identity)` for the app; `None`
    /// for a plaintext caller.
    pub fn source_headers(&self) -> Option<(&HeaderValue, &HeaderValue)> {
        let service = self.service.as_ref()?;
        Some((
            service.source_header.as_ref()?,
            service.identity_header.as_ref()?,
        ))
    }

    /// How refusals and logs name the caller.
    pub fn describe(&self) -> String {
        match &self.service {
            Some(service) => format!("{} ({})", service.label, service.uri),
            None => "an unauthenticated (plaintext) caller".to_owned(),
        }
    }
}

/// SPIFFE id → the service the registry says it is.
#[derive(Debug, Default)]
pub struct Callers {
    by_identity: HashMap<SpiffeId, Arc<CallerService>>,
}

impl Callers {
    /// From every endpoint's `identity` in the registry (ids that do not
    /// parse are skipped; the first service listed wins an id claimed by
    /// two).
    pub fn build(state: &MeshState) -> Self {
        let mut by_identity = HashMap::new();
        for service in &state.services {
            for endpoint in &service.endpoints {
                let Some(id) = endpoint.identity.as_deref() else {
                    continue;
                };
                let Ok(id) = SpiffeId::parse(id) else {
                    tracing::debug!(identity = id, "endpoint identity is not a SPIFFE id");
                    continue;
                };
                by_identity.entry(id.clone()).or_insert_with(|| {
                    Arc::new(CallerService::new(&id, &service.namespace, &service.name))
                });
            }
        }
        Callers { by_identity }
    }

    /// The caller of a connection with this verified identity.
    pub fn resolve(&self, identity: Option<&Arc<SpiffeId>>) -> Caller {
        let Some(identity) = identity else {
            return Caller::default();
        };
        let service = match self.by_identity.get(identity) {
            Some(service) => Arc::clone(service),
            // Not (or no longer) in the registry: the id names its
            // namespace and service account, which is the service name.
            None => Arc::new(CallerService::new(
                identity,
                identity.namespace(),
                identity.service_account(),
            )),
        };
        Caller {
            identity: Some(Arc::clone(identity)),
            service: Some(service),
        }
    }
}

/// One caller pattern of a rule, compiled.
#[derive(Debug)]
struct Source {
    /// `(namespace, name)`.
    services: Vec<(String, String)>,
    namespaces: Vec<String>,
    identities: Vec<SpiffeId>,
    unauthenticated: bool,
}

impl Source {
    fn matches(&self, caller: &Caller) -> bool {
        let (Some(identity), Some(service)) = (&caller.identity, &caller.service) else {
            return self.unauthenticated;
        };
        if self.unauthenticated {
            return false;
        }
        (self.services.is_empty()
            || self
                .services
                .iter()
                .any(|(ns, name)| *ns == service.namespace && *name == service.name))
            && (self.namespaces.is_empty()
                || self.namespaces.iter().any(|ns| *ns == service.namespace))
            && (self.identities.is_empty() || self.identities.iter().any(|id| **identity == *id))
    }
}

#[derive(Debug)]
enum Path {
    Any,
    Exact(String),
    Prefix(String),
}

#[derive(Debug)]
struct Operation {
    methods: Vec<Method>,
    paths: Vec<Path>,
}

impl Operation {
    fn matches(&self, method: &Method, path: &str) -> bool {
        (self.methods.is_empty() || self.methods.contains(method))
            && (self.paths.is_empty()
                || self.paths.iter().any(|p| match p {
                    Path::Any => true,
                    Path::Exact(exact) => path == exact,
                    Path::Prefix(prefix) => path.starts_with(prefix.as_str()),
                }))
    }
}

#[derive(Debug)]
struct Condition {
    header: HeaderName,
    values: Vec<String>,
}

impl Condition {
    fn matches(&self, headers: &HeaderMap) -> bool {
        headers.get_all(&self.header).iter().any(|v| {
            self.values
                .iter()
                .any(|want| v.as_bytes() == want.as_bytes())
        })
    }
}

#[derive(Debug)]
struct Rule {
    from: Vec<Source>,
    to: Vec<Operation>,
    when: Vec<Condition>,
}

impl Rule {
    fn compile(rule: &AuthzRule, policy_namespace: &str) -> Self {
        let from = rule
            .from
            .iter()
            .map(|s| Source {
                services: s
                    .services
                    .iter()
                    .map(|svc| match svc.split_once('.') {
                        Some((name, ns)) => (ns.to_owned(), name.to_owned()),
                        None => (policy_namespace.to_owned(), svc.clone()),
                    })
                    .collect(),
                namespaces: s.namespaces.clone(),
                // Validated when the resource was parsed.
                identities: s
                    .identities
                    .iter()
                    .filter_map(|id| SpiffeId::parse(id).ok())
                    .collect(),
                unauthenticated: s.unauthenticated,
            })
            .collect();
        let to = rule
            .to
            .iter()
            .map(|op| Operation {
                methods: op
                    .methods
                    .iter()
                    .filter_map(|m| Method::from_bytes(m.as_bytes()).ok())
                    .collect(),
                paths: op
                    .paths
                    .iter()
                    .filter_map(|p| match PathPattern::parse(p)? {
                        PathPattern::Any => Some(Path::Any),
                        PathPattern::Exact(exact) => Some(Path::Exact(exact.to_owned())),
                        PathPattern::Prefix(prefix) => Some(Path::Prefix(prefix.to_owned())),
                    })
                    .collect(),
            })
            .collect();
        let when = rule
            .when
            .iter()
            .filter_map(|c| {
                Some(Condition {
                    header: HeaderName::from_bytes(c.header.as_bytes()).ok()?,
                    values: c.values.clone(),
                })
            })
            .collect();
        Rule { from, to, when }
    }

    fn matches(&self, request: &Request<'_>, action: AuthzAction) -> bool {
        let from = self.from.is_empty() || self.from.iter().any(|s| s.matches(request.caller));
        let Some(http) = &request.http else {
            // Opaque TCP has no method, path or headers. Fail closed, as
            // Istio does: an ALLOW rule that needs them cannot match; a
            // DENY rule matches on its sources alone.
            let needs_http = !(self.to.is_empty() && self.when.is_empty());
            return from && (action == AuthzAction::Deny || !needs_http);
        };
        from && (self.to.is_empty() || self.to.iter().any(|op| op.matches(http.method, http.path)))
            && self.when.iter().all(|c| c.matches(http.headers))
    }
}

/// What a policy is asked about: a caller, and its HTTP request (`None`
/// for an opaque TCP connection, checked once when it opens).
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub caller: &'a Caller,
    pub http: Option<HttpRequest<'a>>,
}

/// The HTTP attributes rules can match.
#[derive(Debug, Clone, Copy)]
pub struct HttpRequest<'a> {
    pub method: &'a Method,
    pub path: &'a str,
    pub headers: &'a HeaderMap,
}

impl Request<'_> {
    /// `method path` for log lines, or `opaque TCP`.
    fn describe(&self) -> String {
        match &self.http {
            Some(http) => format!("{} {}", http.method, http.path),
            None => "opaque TCP".to_owned(),
        }
    }
}

/// One `AuthorizationPolicy` of the own service, compiled.
#[derive(Debug)]
pub struct AuthzPolicy {
    /// `metadata.name` (the `policy` label, named in refusals).
    pub name: String,
    pub action: AuthzAction,
    pub mode: AuthzMode,
    rules: Vec<Rule>,
    /// Dry run: its `meshlet_policy_would_refuse_total` handle and mark.
    would_refuse: Option<WouldRefuse>,
}

impl AuthzPolicy {
    pub fn compile(name: String, namespace: &str, spec: &AuthorizationSpec) -> Self {
        AuthzPolicy {
            name,
            action: spec.action,
            mode: spec.mode,
            rules: spec
                .rules
                .iter()
                .map(|r| Rule::compile(r, namespace))
                .collect(),
            would_refuse: None,
        }
    }

    /// Whether any rule matches (no rules: none does).
    pub fn matches(&self, request: &Request<'_>) -> bool {
        self.rules
            .iter()
            .any(|rule| rule.matches(request, self.action))
    }
}

/// A refusal by an authorization policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    /// The DENY policy that matched, or the ALLOW policies of which none
    /// did (joined with `,`).
    pub policy: Arc<str>,
    /// `true`: a DENY rule matched; `false`: no ALLOW rule did.
    pub by_deny: bool,
}

/// Policies of one action and mode, with the counter of their refusals.
#[derive(Debug, Default)]
struct Group {
    policies: Vec<(AuthzPolicy, IntCounter)>,
    /// The names joined (`a,b`) and the counter for "none matched" (ALLOW).
    none_matched: Option<(Arc<str>, IntCounter)>,
}

impl Group {
    fn first_match(&self, request: &Request<'_>) -> Option<&(AuthzPolicy, IntCounter)> {
        self.policies.iter().find(|(p, _)| p.matches(request))
    }

    fn any_match(&self, request: &Request<'_>) -> bool {
        self.first_match(request).is_some()
    }

    fn seal(&mut self, counter: impl Fn(&str) -> IntCounter) {
        if self.policies.is_empty() {
            return;
        }
        let names: Vec<&str> = self.policies.iter().map(|(p, _)| p.name.as_str()).collect();
        let joined = names.join(",");
        self.none_matched = Some((joined.as_str().into(), counter(&joined)));
    }
}

/// The own service's zero-trust policies in one snapshot.
#[derive(Debug, Default)]
pub struct ZeroTrust {
    /// The effective `MTLSPolicy` mode.
    pub mtls: MtlsMode,
    /// `meshlet_mtls_plaintext_refused_total`.
    plaintext_refused: Option<IntCounter>,
    deny: Group,
    allow: Group,
    dry_run_deny: Group,
    dry_run_allow: Group,
    pub callers: Callers,
}

impl ZeroTrust {
    /// The own service's policies among `state.resources`, and the caller
    /// map of `state`'s registry.
    pub fn build(state: &MeshState, namespace: &str, service: &str, metrics: &Metrics) -> Self {
        let mut zt = ZeroTrust {
            mtls: effective_mtls(&state.resources, namespace, service),
            plaintext_refused: Some(metrics.mtls_plaintext_refused()),
            callers: Callers::build(state),
            ..ZeroTrust::default()
        };
        let mut policies: Vec<_> = state
            .resources
            .iter()
            .filter(|r| r.target() == Some((namespace, service)))
            .filter_map(|r| match r {
                Resource::AuthorizationPolicy(doc) => Some(doc),
                _ => None,
            })
            .collect();
        policies.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        for doc in policies {
            let name = doc.metadata.name.clone();
            let mut policy = AuthzPolicy::compile(name, &doc.metadata.namespace, &doc.spec);
            if policy.mode.is_dry_run() {
                policy.would_refuse = Some(WouldRefuse::new(
                    metrics,
                    "AuthorizationPolicy",
                    &doc.metadata.namespace,
                    &policy.name,
                    "denied",
                ));
            }
            let (group, counter) = match (policy.action, policy.mode) {
                (AuthzAction::Deny, AuthzMode::Enforce) => {
                    (&mut zt.deny, metrics.authz_denied(&policy.name))
                }
                (AuthzAction::Allow, AuthzMode::Enforce) => {
                    (&mut zt.allow, metrics.authz_denied(&policy.name))
                }
                (AuthzAction::Deny, AuthzMode::DryRun) => (
                    &mut zt.dry_run_deny,
                    metrics.authz_dry_run_denied(&policy.name),
                ),
                (AuthzAction::Allow, AuthzMode::DryRun) => (
                    &mut zt.dry_run_allow,
                    metrics.authz_dry_run_denied(&policy.name),
                ),
            };
            group.policies.push((policy, counter));
        }
        zt.allow.seal(|names| metrics.authz_denied(names));
        zt.dry_run_allow
            .seal(|names| metrics.authz_dry_run_denied(names));
        zt
    }

    /// Whether a plaintext caller may be served (`false` under `strict`).
    pub fn allows_plaintext(&self) -> bool {
        self.mtls != MtlsMode::Strict
    }

    /// Whether `caller` must be refused for calling in plaintext under
    /// `strict` (counted when so).
    pub fn refuses_plaintext(&self, caller: &Caller) -> bool {
        let refused = caller.identity.is_none() && !self.allows_plaintext();
        if refused {
            self.count_plaintext_refused();
        }
        refused
    }

    /// Counts one plaintext connection or request refused under `strict`.
    pub fn count_plaintext_refused(&self) {
        if let Some(counter) = &self.plaintext_refused {
            counter.inc();
        }
    }

    /// Whether any authorization policy selects the service (the request
    /// path skips [`ZeroTrust::authorize`] otherwise).
    pub fn has_authorization(&self) -> bool {
        !(self.deny.policies.is_empty()
            && self.allow.policies.is_empty()
            && self.dry_run_deny.policies.is_empty()
            && self.dry_run_allow.policies.is_empty())
    }

    /// Istio's evaluation (see the module docs); dry-run policies only
    /// count. A refusal is counted on its policy. `Ok(Some(mark))`: a
    /// dry-run policy would have refused (`AuthorizationPolicy/NAME:denied`,
    /// for the span and the access log).
    pub fn authorize(&self, request: &Request<'_>) -> Result<Option<Arc<str>>, Denial> {
        if !self.has_authorization() {
            return Ok(None);
        }
        let would_refuse = self.dry_run(request);
        if let Some((policy, counter)) = self.deny.first_match(request) {
            counter.inc();
            return Err(Denial {
                policy: policy.name.as_str().into(),
                by_deny: true,
            });
        }
        if let Some((names, counter)) = &self.allow.none_matched {
            if !self.allow.any_match(request) {
                counter.inc();
                return Err(Denial {
                    policy: Arc::clone(names),
                    by_deny: false,
                });
            }
        }
        Ok(would_refuse)
    }

    /// What the dry-run policies would have refused: counted and logged;
    /// the mark of the first.
    fn dry_run(&self, request: &Request<'_>) -> Option<Arc<str>> {
        let mut mark = None;
        if let Some((policy, counter)) = self.dry_run_deny.first_match(request) {
            counter.inc();
            if let Some(would) = &policy.would_refuse {
                would.count();
                mark = Some(Arc::clone(would.mark()));
            }
            tracing::debug!(policy = %policy.name, caller = %request.caller.describe(),
                request = %request.describe(),
                "dry-run AuthorizationPolicy would deny (a DENY rule matches)");
        }
        if let Some((names, counter)) = &self.dry_run_allow.none_matched {
            if !self.dry_run_allow.any_match(request) {
                counter.inc();
                // Each ALLOW policy of the group refused it together.
                for (policy, _) in &self.dry_run_allow.policies {
                    if let Some(would) = &policy.would_refuse {
                        would.count();
                        mark.get_or_insert_with(|| Arc::clone(would.mark()));
                    }
                }
                tracing::debug!(policy = %names, caller = %request.caller.describe(),
                    request = %request.describe(),
                    "dry-run AuthorizationPolicy would deny (no ALLOW rule matches)");
            }
        }
        mark
    }

    /// For `/config_dump`.
    pub fn to_json(&self) -> serde_json::Value {
        let names = |group: &Group| {
            group
                .policies
                .iter()
                .map(|(p, _)| p.name.clone())
                .collect::<Vec<_>>()
        };
        json!({
            "mtlsMode": self.mtls.as_str(),
            "authorization": {
                "deny": names(&self.deny),
                "allow": names(&self.allow),
                "dryRunDeny": names(&self.dry_run_deny),
                "dryRunAllow": names(&self.dry_run_allow),
            },
            "knownIdentities": self.callers.by_identity.len(),
        })
    }
}

/// The mode of the `MTLSPolicy` that targets `(namespace, service)`, else
/// of a mesh-wide one (no `targetRef`), else permissive. Among policies of
/// the same reach, `strict` wins.
pub fn effective_mtls(resources: &[Resource], namespace: &str, service: &str) -> MtlsMode {
    let mut targeted = None;
    let mut mesh_wide = None;
    for resource in resources {
        let Resource::MtlsPolicy(doc) = resource else {
            continue;
        };
        let slot = match resource.target() {
            Some(target) if target == (namespace, service) => &mut targeted,
            Some(_) => continue,
            None => &mut mesh_wide,
        };
        *slot = Some(match *slot {
            Some(MtlsMode::Strict) => MtlsMode::Strict,
            _ => doc.spec.mode,
        });
    }
    targeted.or(mesh_wide).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(yaml: &str) -> MeshState {
        MeshState::from_resources(&meshlet_api::parse_documents("t.yaml", yaml).unwrap())
    }

    fn policies(yaml: &str) -> (ZeroTrust, Metrics) {
        let metrics = Metrics::new("orders");
        (
            ZeroTrust::build(&state(yaml), "default", "orders", &metrics),
            metrics,
        )
    }

    fn authz(name: &str, spec: &str) -> String {
        format!(
            "---\napiVersion: meshlet.dev/v1alpha1\nkind: AuthorizationPolicy\n\
             metadata: {{name: {name}}}\nspec:\n  targetRef: {{service: orders}}\n{spec}"
        )
    }

    fn caller(ns: &str, sa: &str) -> Caller {
        let id = Arc::new(SpiffeId::new("meshlet.local", ns, sa).unwrap());
        Callers::default().resolve(Some(&id))
    }

    /// Asks `zt` about `method path` from `caller` with `headers`.
    fn ask(
        zt: &ZeroTrust,
        caller: &Caller,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<Option<Arc<str>>, Denial> {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        zt.authorize(&Request {
            caller,
            http: Some(HttpRequest {
                method: &method,
                path,
                headers: &map,
            }),
        })
    }

    fn denied_by<T>(result: Result<T, Denial>) -> Option<String> {
        result.err().map(|d| d.policy.to_string())
    }

    #[test]
    fn without_policies_everything_is_allowed_and_plaintext_accepted() {
        let (zt, _) = policies("");
        assert!(!zt.has_authorization());
        assert_eq!(zt.mtls, MtlsMode::Permissive);
        assert!(!zt.refuses_plaintext(&Caller::default()));
        assert!(ask(&zt, &Caller::default(), Method::POST, "/x", &[]).is_ok());
    }

    #[test]
    fn an_allow_policy_admits_only_what_it_matches() {
        let (zt, metrics) = policies(&authz(
            "orders-allow",
            "  action: ALLOW\n  rules:\n  - from: [{services: [frontend]}]\n    to: [{methods: [GET], paths: ['/api/*']}]\n",
        ));
        let frontend = caller("default", "frontend");
        let other = caller("default", "batch");
        assert!(ask(&zt, &frontend, Method::GET, "/api/items", &[]).is_ok());
        assert_eq!(
            denied_by(ask(&zt, &frontend, Method::POST, "/api/items", &[])),
            Some("orders-allow".into()),
            "method"
        );
        assert!(
            ask(&zt, &frontend, Method::GET, "/admin", &[]).is_err(),
            "path"
        );
        assert!(
            ask(&zt, &frontend, Method::GET, "/api", &[]).is_err(),
            "prefix is /api/"
        );
        assert!(
            ask(&zt, &other, Method::GET, "/api/items", &[]).is_err(),
            "caller"
        );
        assert!(
            ask(&zt, &Caller::default(), Method::GET, "/api/items", &[]).is_err(),
            "unauthenticated"
        );
        // The same service name in another namespace is another service.
        assert!(ask(&zt, &caller("shop", "frontend"), Method::GET, "/api/x", &[]).is_err());
        assert_eq!(metrics.authz_denied("orders-allow").get(), 6);
    }

    /// An opaque TCP connection from `caller`.
    fn ask_connection(zt: &ZeroTrust, caller: &Caller) -> Result<(), Denial> {
        zt.authorize(&Request { caller, http: None }).map(|_| ())
    }

    #[test]
    fn opaque_tcp_is_judged_without_http_attributes_failing_closed() {
        // ALLOW rules that need a method, path or header cannot match a
        // connection; a source-only ALLOW rule can.
        let (zt, _) = policies(&authz(
            "orders-allow",
            "  action: ALLOW\n  rules:\n  - from: [{services: [frontend]}]\n    to: [{methods: [GET], paths: ['/api/*']}]\n",
        ));
        let frontend = caller("default", "frontend");
        assert!(ask_connection(&zt, &frontend).is_err());
        assert!(ask_connection(&zt, &Caller::default()).is_err());
        let (zt, _) = policies(&authz(
            "orders-allow",
            "  action: ALLOW\n  rules:\n  - from: [{services: [frontend]}]\n",
        ));
        assert!(ask_connection(&zt, &frontend).is_ok());
        assert!(ask_connection(&zt, &caller("default", "web")).is_err());
        // A DENY rule matches a connection on its sources alone, even if it
        // names paths: its paths cannot be checked on opaque bytes.
        let (zt, metrics) = policies(&authz(
            "no-secret",
            "  action: DENY\n  rules:\n  - from: [{services: [web]}]\n    to: [{paths: [/secret]}]\n",
        ));
        let denial = ask_connection(&zt, &caller("default", "web")).unwrap_err();
        assert_eq!(&*denial.policy, "no-secret");
        assert!(ask_connection(&zt, &frontend).is_ok());
        assert_eq!(metrics.authz_denied("no-secret").get(), 1);
    }

    #[test]
    fn a_deny_refuses_before_any_allow_and_names_itself() {
        let yaml = authz("allow-all", "  action: ALLOW\n  rules: [{}]\n")
            + &authz(
                "no-admin",
                "  action: DENY\n  rules:\n  - to: [{paths: [/admin, '/admin/*']}]\n",
            );
        let (zt, metrics) = policies(&yaml);
        let web = caller("default", "web");
        assert!(ask(&zt, &web, Method::GET, "/", &[]).is_ok());
        let denial = ask(&zt, &web, Method::GET, "/admin/users", &[]).unwrap_err();
        assert_eq!(&*denial.policy, "no-admin");
        assert!(denial.by_deny);
        assert_eq!(metrics.authz_denied("no-admin").get(), 1);
        assert_eq!(metrics.authz_denied("allow-all").get(), 0);
    }

    #[test]
    fn an_allow_policy_without_rules_allows_nothing_a_deny_without_rules_nothing_either() {
        let (zt, _) = policies(&authz("nothing", "  action: ALLOW\n"));
        assert!(ask(&zt, &caller("default", "web"), Method::GET, "/", &[]).is_err());
        let (zt, _) = policies(&authz("nothing", "  action: DENY\n"));
        assert!(ask(&zt, &caller("default", "web"), Method::GET, "/", &[]).is_ok());
    }

    #[test]
    fn sources_by_namespace_identity_and_unauthenticated() {
        let yaml = authz(
            "allow",
            "  action: ALLOW\n  rules:\n  - from:\n    - {namespaces: [ops]}\n    \
             - {identities: ['spiffe://meshlet.local/ns/default/sa/batch']}\n    \
             - {services: [web.shop]}\n",
        ) + &authz(
            "no-plaintext-writes",
            "  action: DENY\n  rules:\n  - from: [{unauthenticated: true}]\n    to: [{methods: [POST, PUT, DELETE]}]\n",
        );
        let (zt, _) = policies(&yaml);
        assert!(ask(&zt, &caller("ops", "anything"), Method::GET, "/", &[]).is_ok());
        assert!(ask(&zt, &caller("default", "batch"), Method::GET, "/", &[]).is_ok());
        assert!(ask(&zt, &caller("shop", "web"), Method::GET, "/", &[]).is_ok());
        assert!(ask(&zt, &caller("default", "web"), Method::GET, "/", &[]).is_err());
        assert!(
            ask(&zt, &caller("other", "batch"), Method::GET, "/", &[]).is_err(),
            "identity is exact"
        );
        let plaintext = Caller::default();
        assert_eq!(
            denied_by(ask(&zt, &plaintext, Method::POST, "/", &[])),
            Some("no-plaintext-writes".into())
        );
        assert_eq!(
            denied_by(ask(&zt, &plaintext, Method::GET, "/", &[])),
            Some("allow".into()),
            "not a write, but no ALLOW names plaintext callers"
        );
    }

    #[test]
    fn several_allow_policies_any_one_admits_a_refusal_names_them_all() {
        let yaml = authz(
            "b-allow",
            "  action: ALLOW\n  rules: [{from: [{services: [web]}]}]\n",
        ) + &authz(
            "a-allow",
            "  action: ALLOW\n  rules: [{to: [{paths: [/health]}]}]\n",
        );
        let (zt, metrics) = policies(&yaml);
        assert!(ask(&zt, &caller("default", "web"), Method::GET, "/x", &[]).is_ok());
        assert!(ask(&zt, &Caller::default(), Method::GET, "/health", &[]).is_ok());
        assert_eq!(
            denied_by(ask(&zt, &Caller::default(), Method::GET, "/x", &[])),
            Some("a-allow,b-allow".into())
        );
        assert_eq!(metrics.authz_denied("a-allow,b-allow").get(), 1);
    }

    #[test]
    fn when_conditions_compare_header_values_exactly() {
        let (zt, _) = policies(&authz(
            "tenants",
            "  action: ALLOW\n  rules:\n  - when: [{header: x-tenant, values: [acme, globex]}, {header: x-env, values: [prod]}]\n",
        ));
        let web = caller("default", "web");
        let ok = [("x-tenant", "globex"), ("x-env", "prod")];
        assert!(ask(&zt, &web, Method::GET, "/", &ok).is_ok());
        assert!(
            ask(&zt, &web, Method::GET, "/", &[("x-tenant", "acme")]).is_err(),
            "all conditions"
        );
        assert!(
            ask(
                &zt,
                &web,
                Method::GET,
                "/",
                &[("x-tenant", "ACME"), ("x-env", "prod")]
            )
            .is_err(),
            "exact"
        );
    }

    #[test]
    fn dry_run_policies_count_what_they_would_deny_and_refuse_nothing() {
        let yaml = authz(
            "audit-deny",
            "  action: DENY\n  mode: dryRun\n  rules: [{to: [{methods: [DELETE]}]}]\n",
        ) + &authz(
            "audit-allow",
            "  action: ALLOW\n  mode: dryRun\n  rules: [{from: [{services: [web]}]}]\n",
        );
        let (zt, metrics) = policies(&yaml);
        assert!(zt.has_authorization());
        let web = caller("default", "web");
        let batch = caller("default", "batch");
        assert_eq!(ask(&zt, &web, Method::GET, "/", &[]), Ok(None));
        assert_eq!(
            ask(&zt, &web, Method::DELETE, "/", &[]).unwrap().as_deref(),
            Some("AuthorizationPolicy/audit-deny:denied")
        );
        assert!(ask(&zt, &batch, Method::DELETE, "/", &[]).is_ok());
        assert_eq!(
            ask(&zt, &batch, Method::GET, "/", &[]).unwrap().as_deref(),
            Some("AuthorizationPolicy/audit-allow:denied")
        );
        assert_eq!(metrics.authz_dry_run_denied("audit-deny").get(), 2);
        assert_eq!(metrics.authz_dry_run_denied("audit-allow").get(), 2);
        assert_eq!(metrics.authz_denied("audit-deny").get(), 0);
        let would = |name| {
            metrics
                .would_refuse("AuthorizationPolicy", "default", name, "denied")
                .get()
        };
        assert_eq!((would("audit-deny"), would("audit-allow")), (2, 2));
    }

    #[test]
    fn the_targeted_mtls_policy_beats_the_mesh_wide_one() {
        let mtls = |name: &str, spec: &str| {
            format!(
                "---\napiVersion: meshlet.dev/v1alpha1\nkind: MTLSPolicy\nmetadata: {{name: {name}}}\nspec: {spec}\n"
            )
        };
        let (zt, metrics) = policies(&mtls("mesh", "{mode: strict}"));
        assert_eq!(zt.mtls, MtlsMode::Strict, "mesh-wide");
        assert!(zt.refuses_plaintext(&Caller::default()));
        assert!(!zt.refuses_plaintext(&caller("default", "web")));
        assert_eq!(metrics.mtls_plaintext_refused().get(), 1);
        let both = mtls("mesh", "{mode: strict}")
            + &mtls("orders", "{targetRef: {service: orders}, mode: permissive}");
        assert_eq!(policies(&both).0.mtls, MtlsMode::Permissive);
        let other = mtls("mesh", "{mode: permissive}")
            + &mtls("stock", "{targetRef: {service: stock}, mode: strict}");
        assert_eq!(policies(&other).0.mtls, MtlsMode::Permissive, "not ours");
    }

    #[test]
    fn a_verified_identity_is_the_registry_service_that_carries_it() {
        let mut mesh = state("");
        let id = "spiffe://meshlet.local/ns/shop/sa/web-sa";
        mesh.services.push(meshlet_api::mesh::ServiceEntry {
            namespace: "shop".into(),
            name: "web".into(),
            endpoints: vec![meshlet_api::mesh::EndpointEntry {
                address: "10.0.0.5:15006".parse().unwrap(),
                labels: Default::default(),
                healthy: true,
                instance_id: Some("i-1".into()),
                identity: Some(id.into()),
            }],
        });
        let callers = Callers::build(&mesh);
        let caller = callers.resolve(Some(&Arc::new(SpiffeId::parse(id).unwrap())));
        let service = caller.service.as_ref().unwrap();
        assert_eq!((&*service.namespace, &*service.name), ("shop", "web"));
        assert_eq!(caller.rate_limit_key(), "web.shop");
        let (source, identity) = caller.source_headers().unwrap();
        assert_eq!(source, "web.shop");
        assert_eq!(identity, id);
        // Not in the registry: the id's namespace and service account.
        let unknown = SpiffeId::parse("spiffe://meshlet.local/ns/default/sa/batch").unwrap();
        let caller = callers.resolve(Some(&Arc::new(unknown)));
        assert_eq!(caller.rate_limit_key(), "batch");
        let plaintext = callers.resolve(None);
        assert_eq!(plaintext.rate_limit_key(), UNAUTHENTICATED);
        assert!(plaintext.source_headers().is_none());
    }
}
