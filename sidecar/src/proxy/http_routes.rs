//! The compiled `Route` table of one parent (a gateway, or a service whose
//! callers it routes), and what a chosen rule does to a request.
//!
//! Data flow: `Snapshot::build` compiles [`HttpRoutes`] once per parent
//! ([`HttpRoutes::build`]): every `Route` naming the parent, its regular
//! expressions compiled, its header names and values parsed, its backends
//! and mirrors resolved to the snapshot's [`ServiceTarget`]s (a label
//! subset as a strict [`SplitPlan`], the machinery `TrafficSplit` uses),
//! and one `meshlet_route_requests_total{parent,route,rule}` handle per
//! rule. A handler then calls [`HttpRoutes::select`] per request and, with
//! the [`Selected`] rule: [`Selected::redirect`] (answer at once), or
//! [`Selected::apply_request`] → mirrors → forward to
//! [`Selected::backend`] under [`Backend::policies`] →
//! [`Selected::apply_response`].
//!
//! ## Precedence (Gateway API's)
//!
//! Host names first: a route listing the request's host exactly, then a
//! route with a matching wildcard (`*.example.com` matches
//! `a.example.com` and `a.b.example.com`, not `example.com` nor a host
//! with an empty label such as `.example.com`; the longer
//! wildcard first), then routes without host names. Within one host tier,
//! among every (route, rule, match): an `Exact` path, then the longest
//! `PathPrefix`, then a `RegularExpression`; then a match naming a method;
//! then more header matches; then more query matches; then the route's
//! (namespace, name); then rule order, then match order. The first match
//! that fits the request wins; when none in a tier fits, the next tier is
//! tried.
//!
//! Matching: `PathPrefix` by whole segments (`/api` matches `/api`,
//! `/api/` and `/api/x`, not `/apix`; a trailing `/` of the prefix is
//! ignored); `Exact` byte for byte; regular expressions match the whole
//! path (or value). Host names are compared without case, a port or a
//! trailing dot. Header names are case-insensitive and any of a
//! header's values may match; query parameters are compared as they are
//! written in the URI (no decoding), any occurrence may match. The method
//! is compared exactly.
//!
//! Filters: request headers are removed, then set, then added; a rewrite's
//! `pathPrefix` replaces the matched prefix (the whole path when the rule
//! matched by `Exact` or a regular expression), `fullPath` the whole path,
//! the query is kept; `hostname` replaces `Host` (and an absolute URI's
//! authority). A redirect keeps what it does not replace (the query
//! always) and has no body. A rule's `timeout` replaces the
//! `TimeoutPolicy`'s request timeout of the backend.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Uri};
use http::{Method, Request, Response, StatusCode};
use meshlet_api::policy::RouteMatch;
use meshlet_api::route::{
    compile_regex, HeaderModifier, HttpMatch, ParentKind, PathMatchType, RouteRule, RouteSpec,
    ValueMatch, ValueMatchType,
};
use meshlet_api::Resource;
use prometheus::IntCounter;
use regex::Regex;

use crate::body::ProxyBody;
use crate::policy::index::{RoutePolicies, SplitPlan, Timeouts};
use crate::telemetry::metrics::{destination_label, Metrics};
use crate::upstream::mirror::MirrorTarget;
use crate::upstream::target::ServiceTarget;

/// What a route table belongs to: a gateway (by its service name) or a
/// service whose callers it routes (mesh routing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parent<'a> {
    Gateway(&'a str),
    Service(&'a str),
}

impl Parent<'_> {
    fn kind(self) -> ParentKind {
        match self {
            Parent::Gateway(_) => ParentKind::Gateway,
            Parent::Service(_) => ParentKind::Service,
        }
    }

    fn name(self) -> String {
        match self {
            Parent::Gateway(name) | Parent::Service(name) => name.to_owned(),
        }
    }
}

/// The compiled routes of one parent.
#[derive(Debug, Default)]
pub struct HttpRoutes {
    /// `gateway/NAME` or `service/NAME` (the metric's `parent` label).
    pub parent: String,
    rules: Vec<Rule>,
    /// Entries by exact host name.
    exact: HashMap<String, Vec<Entry>>,
    /// Entries by the domain of a wildcard (`*.example.com` → `example.com`).
    wildcard: HashMap<String, Vec<Entry>>,
    /// Entries of routes without host names.
    any: Vec<Entry>,
}

/// One compiled rule of a route.
#[derive(Debug)]
pub struct Rule {
    /// The route's name (`name`, or `name.namespace` outside `default`).
    pub route: String,
    /// 0-based index of the rule in its route.
    pub index: usize,
    request_headers: Option<HeaderEdit>,
    response_headers: Option<HeaderEdit>,
    rewrite: Option<Rewrite>,
    redirect: Option<Redirect>,
    pub mirrors: Vec<MirrorTarget>,
    /// The rule's `timeout`: replaces the backend's `TimeoutPolicy`.
    pub timeout: Option<Duration>,
    timeouts: Option<Timeouts>,
    backends: Vec<Backend>,
    total_weight: u64,
    /// `meshlet_route_requests_total{parent,route,rule}`.
    pub requests: IntCounter,
}

/// Where a rule sends requests: a service, maybe only a label subset.
#[derive(Debug)]
pub struct Backend {
    /// The service (`name`, or `name.namespace` outside `default`).
    pub service: String,
    pub labels: BTreeMap<String, String>,
    pub weight: u32,
    /// The service's target in the snapshot; `None`: unknown service.
    pub target: Option<Arc<ServiceTarget>>,
    /// The label subset as a strict split plan over the target's endpoints.
    subset: Option<SplitPlan>,
}

impl Backend {
    /// The policies for one request to this backend: the target's own
    /// (breaker, retry, timeout for the method and path), its label subset
    /// instead of the target's `TrafficSplit` when it names labels, and
    /// `rule_timeout` (the rule's, [`Selected::timeouts`]) instead of the
    /// target's `TimeoutPolicy`.
    pub fn policies<'a>(
        &'a self,
        method: &Method,
        path: &str,
        rule_timeout: Option<&'a Timeouts>,
    ) -> RoutePolicies<'a> {
        let Some(target) = &self.target else {
            return RoutePolicies::default();
        };
        let mut policies = target.policies.for_request(method, path);
        if let Some(subset) = &self.subset {
            policies.split = Some(subset);
        }
        if let Some(timeouts) = rule_timeout {
            policies.timeouts = Some(timeouts);
        }
        policies
    }
}

/// One match of one rule, compiled, with its precedence.
#[derive(Debug)]
struct Entry {
    key: SortKey,
    rule: usize,
    path: PathMatcher,
    method: Option<Method>,
    headers: Vec<(HeaderName, ValueMatcher)>,
    query: Vec<(String, ValueMatcher)>,
}

/// Sorts ascending = most specific first.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct SortKey {
    /// 0 Exact, 1 PathPrefix, 2 RegularExpression.
    path_kind: u8,
    /// `usize::MAX - prefix length`: longer prefixes first.
    path_len: usize,
    /// false (a method) before true (none).
    no_method: bool,
    fewer_headers: usize,
    fewer_query: usize,
    route: (String, String),
    rule: usize,
    matched: usize,
}

#[derive(Debug)]
enum PathMatcher {
    Exact(String),
    /// Without a trailing `/`; empty for `/` (every path).
    Prefix(String),
    Regex(Regex),
}

impl PathMatcher {
    fn matches(&self, path: &str) -> bool {
        match self {
            PathMatcher::Exact(exact) => path == exact,
            PathMatcher::Prefix(prefix) => {
                path.starts_with(prefix.as_str())
                    && matches!(path.as_bytes().get(prefix.len()), None | Some(b'/'))
            }
            PathMatcher::Regex(regex) => regex.is_match(path),
        }
    }
}

#[derive(Debug)]
enum ValueMatcher {
    Exact(String),
    Regex(Regex),
}

impl ValueMatcher {
    fn compile(m: &ValueMatch) -> Option<ValueMatcher> {
        Some(match m.kind {
            ValueMatchType::Exact => ValueMatcher::Exact(m.value.clone()),
            ValueMatchType::RegularExpression => ValueMatcher::Regex(compile_regex(&m.value).ok()?),
        })
    }

    fn matches(&self, value: &[u8]) -> bool {
        match self {
            ValueMatcher::Exact(exact) => value == exact.as_bytes(),
            ValueMatcher::Regex(regex) => {
                std::str::from_utf8(value).is_ok_and(|v| regex.is_match(v))
            }
        }
    }
}

impl Entry {
    fn matches<B>(&self, request: &Request<B>) -> bool {
        if self.method.as_ref().is_some_and(|m| m != request.method()) {
            return false;
        }
        if !self.path.matches(request.uri().path()) {
            return false;
        }
        let headers_ok = self.headers.iter().all(|(name, value)| {
            request
                .headers()
                .get_all(name)
                .iter()
                .any(|v| value.matches(v.as_bytes()))
        });
        if !headers_ok {
            return false;
        }
        if self.query.is_empty() {
            return true;
        }
        let query = request.uri().query().unwrap_or("");
        self.query.iter().all(|(name, value)| {
            query
                .split('&')
                .filter_map(|pair| {
                    let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                    (k == name).then_some(v)
                })
                .any(|v| value.matches(v.as_bytes()))
        })
    }
}

/// Header edits, parsed once: removed, then set, then added.
#[derive(Debug, Default)]
struct HeaderEdit {
    remove: Vec<HeaderName>,
    set: Vec<(HeaderName, HeaderValue)>,
    add: Vec<(HeaderName, HeaderValue)>,
}

impl HeaderEdit {
    fn compile(modifier: &HeaderModifier) -> HeaderEdit {
        let pair = |h: &meshlet_api::route::HttpHeader| {
            Some((
                HeaderName::try_from(h.name.as_str()).ok()?,
                HeaderValue::try_from(h.value.as_str()).ok()?,
            ))
        };
        HeaderEdit {
            remove: modifier
                .remove
                .iter()
                .filter_map(|n| HeaderName::try_from(n.as_str()).ok())
                .collect(),
            set: modifier.set.iter().filter_map(pair).collect(),
            add: modifier.add.iter().filter_map(pair).collect(),
        }
    }

    fn apply(&self, headers: &mut HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (name, value) in &self.set {
            headers.insert(name, value.clone());
        }
        for (name, value) in &self.add {
            headers.append(name, value.clone());
        }
    }
}

#[derive(Debug)]
struct Rewrite {
    hostname: Option<HeaderValue>,
    path: Option<PathRewrite>,
}

#[derive(Debug)]
enum PathRewrite {
    Prefix(String),
    Full(String),
}

#[derive(Debug)]
struct Redirect {
    scheme: Option<String>,
    hostname: Option<String>,
    path: Option<String>,
    port: Option<u16>,
    status: StatusCode,
}

/// The rule chosen for a request.
#[derive(Debug, Clone, Copy)]
pub struct Selected<'a> {
    pub rule: &'a Rule,
    /// The weighted choice among the rule's backends (`None`: a redirect
    /// rule, or every weight is 0).
    pub backend: Option<&'a Backend>,
    /// The prefix the request matched by `PathPrefix` (without a trailing
    /// `/`), for a rewrite's `pathPrefix`.
    matched_prefix: Option<&'a str>,
}

impl HttpRoutes {
    /// The services some `Route` names as `service:` parent, as
    /// `(namespace, name)`.
    pub fn service_parents(resources: &[Resource]) -> BTreeSet<(String, String)> {
        resources
            .iter()
            .filter_map(|r| match r {
                Resource::Route(doc) => Some(doc),
                _ => None,
            })
            .flat_map(|doc| {
                doc.spec
                    .parent_refs
                    .iter()
                    .filter_map(|p| match p.parent() {
                        Some((ParentKind::Service, name)) => {
                            Some((doc.metadata.namespace.clone(), name.to_owned()))
                        }
                        _ => None,
                    })
            })
            .collect()
    }

    /// The routes of `parent` in `namespace` among `resources`, compiled;
    /// `None` when no route names it. `targets(namespace, name)` finds a
    /// service's target in the snapshot being built.
    pub fn build(
        resources: &[Resource],
        namespace: &str,
        parent: Parent<'_>,
        targets: &dyn Fn(&str, &str) -> Option<Arc<ServiceTarget>>,
        metrics: &Metrics,
    ) -> Option<HttpRoutes> {
        let mut routes: Vec<(&str, &str, &RouteSpec)> = resources
            .iter()
            .filter_map(|r| match r {
                Resource::Route(doc) if doc.metadata.namespace == namespace => Some(doc),
                _ => None,
            })
            .filter(|doc| {
                doc.spec
                    .parent_refs
                    .iter()
                    .any(|p| p.parent() == Some((parent.kind(), &parent.name())))
            })
            .map(|doc| {
                (
                    doc.metadata.namespace.as_str(),
                    doc.metadata.name.as_str(),
                    &doc.spec,
                )
            })
            .collect();
        if routes.is_empty() {
            return None;
        }
        routes.sort_by_key(|(ns, name, _)| (*ns, *name));
        let mut table = HttpRoutes {
            parent: format!("{}/{}", parent.kind().as_str(), parent.name()),
            ..HttpRoutes::default()
        };
        for (ns, name, spec) in routes {
            let route_label = destination_label(ns, name);
            for (index, rule) in spec.rules.iter().enumerate() {
                let compiled = Rule::compile(
                    rule,
                    route_label.clone(),
                    index,
                    ns,
                    &|ns, name| targets(ns, name),
                    metrics,
                    &table.parent,
                );
                let rule_at = table.rules.len();
                table.rules.push(compiled);
                let matches: Vec<HttpMatch> = if rule.matches.is_empty() {
                    vec![HttpMatch::default()]
                } else {
                    rule.matches.clone()
                };
                for (matched, m) in matches.iter().enumerate() {
                    let Some(entry) = Entry::compile(m, (ns, name), index, matched, rule_at) else {
                        // Validated at apply; a resource read back that no
                        // longer compiles is skipped, with a warning.
                        tracing::warn!(route = %name, rule = index, "a route match does not compile; skipped");
                        continue;
                    };
                    table.place(spec, entry);
                }
            }
        }
        for entries in table
            .exact
            .values_mut()
            .chain(table.wildcard.values_mut())
            .chain(std::iter::once(&mut table.any))
        {
            entries.sort_by(|a, b| a.key.cmp(&b.key));
        }
        Some(table)
    }

    /// Files `entry` under each of the route's host names.
    fn place(&mut self, spec: &RouteSpec, entry: Entry) {
        if spec.hostnames.is_empty() {
            self.any.push(entry);
            return;
        }
        let mut entry = Some(entry);
        for (i, host) in spec.hostnames.iter().enumerate() {
            let one = if i + 1 == spec.hostnames.len() {
                entry.take()
            } else {
                entry.as_ref().map(Entry::duplicate)
            };
            let Some(one) = one else { continue };
            match host.strip_prefix("*.") {
                Some(domain) => self
                    .wildcard
                    .entry(domain.to_owned())
                    .or_default()
                    .push(one),
                None => self.exact.entry(host.clone()).or_default().push(one),
            }
        }
    }

    /// The rule for a request, by the precedence above. `host` is the
    /// host to match (a gateway's TLS server name, say); `None`: the
    /// request's URI authority, else its `Host` header. A port is ignored.
    pub fn select<'a, B>(
        &'a self,
        host: Option<&str>,
        request: &Request<B>,
    ) -> Option<Selected<'a>> {
        let host = host
            .or_else(|| request.uri().authority().map(Authority::as_str))
            .or_else(|| {
                request
                    .headers()
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
            })
            .map(strip_port);
        // A trailing dot (the absolute form) is dropped, with or without
        // upper case in the name.
        let host = host.map(|h| h.strip_suffix('.').unwrap_or(h));
        let lowered;
        let host = match host {
            Some(h) if h.bytes().any(|b| b.is_ascii_uppercase()) => {
                lowered = h.to_ascii_lowercase();
                Some(lowered.as_str())
            }
            other => other,
        };
        let mut tiers: Vec<&[Entry]> = Vec::with_capacity(4);
        if let Some(host) = host {
            if let Some(entries) = self.exact.get(host) {
                tiers.push(entries);
            }
            // A wildcard stands for labels, never for an empty one
            // (`.example.com`, `x..example.com`).
            let labels_ok = !host.starts_with('.') && !host.contains("..");
            if !self.wildcard.is_empty() && labels_ok {
                // Longest wildcard domain first: a.b.example.com tries
                // b.example.com, then example.com, then com.
                for (i, b) in host.bytes().enumerate() {
                    if b == b'.' {
                        if let Some(entries) = self.wildcard.get(&host[i + 1..]) {
                            tiers.push(entries);
                        }
                    }
                }
            }
        }
        tiers.push(&self.any);
        let entry = tiers
            .into_iter()
            .flat_map(|tier| tier.iter())
            .find(|entry| entry.matches(request))?;
        let rule = &self.rules[entry.rule];
        Some(Selected {
            rule,
            backend: rule.choose_backend(),
            matched_prefix: match &entry.path {
                PathMatcher::Prefix(prefix) => Some(prefix),
                _ => None,
            },
        })
    }

    /// JSON for `/config_dump`: the rules in route order with their
    /// backends and mirrors (known or not).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "parent": self.parent,
            "rules": self.rules.iter().map(|rule| serde_json::json!({
                "route": rule.route,
                "rule": rule.index,
                "timeout": rule.timeout.map(|d| humantime::format_duration(d).to_string()),
                "redirect": rule.redirect.is_some(),
                "backends": rule.backends.iter().map(|b| serde_json::json!({
                    "service": b.service,
                    "labels": b.labels,
                    "weight": b.weight,
                    "known": b.target.is_some(),
                })).collect::<Vec<_>>(),
                "mirrors": rule.mirrors.iter().map(|m| serde_json::json!({
                    "service": m.service,
                    "percent": m.percent,
                    "known": m.target.is_some(),
                })).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        })
    }
}

/// `host[:port]` or `[v6][:port]` → (host, port); an IPv6 literal keeps
/// its brackets (a Location needs them), a port that is not a number is
/// dropped.
fn split_authority(authority: &str) -> (&str, Option<u16>) {
    if authority.starts_with('[') {
        return match authority.find(']') {
            Some(end) => (
                &authority[..=end],
                authority[end + 1..]
                    .strip_prefix(':')
                    .and_then(|p| p.parse().ok()),
            ),
            None => (authority, None),
        };
    }
    match authority.rsplit_once(':') {
        Some((host, port)) => (host, port.parse().ok()),
        None => (authority, None),
    }
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.split_once(']').map_or(host, |(h, _)| &h[1..]);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

impl Entry {
    fn compile(
        m: &HttpMatch,
        route: (&str, &str),
        rule: usize,
        matched: usize,
        rule_at: usize,
    ) -> Option<Entry> {
        let (kind, value) = m
            .path
            .as_ref()
            .map_or((PathMatchType::PathPrefix, "/"), |p| {
                (p.kind, p.value.as_str())
            });
        let (path, path_kind, len) = match kind {
            PathMatchType::Exact => (PathMatcher::Exact(value.to_owned()), 0, value.len()),
            PathMatchType::PathPrefix => {
                let prefix = value.trim_end_matches('/').to_owned();
                let len = prefix.len();
                (PathMatcher::Prefix(prefix), 1, len)
            }
            PathMatchType::RegularExpression => {
                (PathMatcher::Regex(compile_regex(value).ok()?), 2, 0)
            }
        };
        let headers = m
            .headers
            .iter()
            .map(|h| {
                Some((
                    HeaderName::try_from(h.name.as_str()).ok()?,
                    ValueMatcher::compile(h)?,
                ))
            })
            .collect::<Option<Vec<_>>>()?;
        let query = m
            .query_params
            .iter()
            .map(|q| Some((q.name.clone(), ValueMatcher::compile(q)?)))
            .collect::<Option<Vec<_>>>()?;
        let method = match &m.method {
            Some(method) => Some(Method::from_bytes(method.as_bytes()).ok()?),
            None => None,
        };
        Some(Entry {
            key: SortKey {
                path_kind,
                path_len: usize::MAX - len,
                no_method: method.is_none(),
                fewer_headers: usize::MAX - headers.len(),
                fewer_query: usize::MAX - query.len(),
                route: (route.0.to_owned(), route.1.to_owned()),
                rule,
                matched,
            },
            rule: rule_at,
            path,
            method,
            headers,
            query,
        })
    }

    /// A copy for another host name of the same route.
    fn duplicate(&self) -> Entry {
        let value = |v: &ValueMatcher| match v {
            ValueMatcher::Exact(s) => ValueMatcher::Exact(s.clone()),
            ValueMatcher::Regex(r) => ValueMatcher::Regex(r.clone()),
        };
        Entry {
            key: self.key.clone(),
            rule: self.rule,
            path: match &self.path {
                PathMatcher::Exact(s) => PathMatcher::Exact(s.clone()),
                PathMatcher::Prefix(s) => PathMatcher::Prefix(s.clone()),
                PathMatcher::Regex(r) => PathMatcher::Regex(r.clone()),
            },
            method: self.method.clone(),
            headers: self
                .headers
                .iter()
                .map(|(n, v)| (n.clone(), value(v)))
                .collect(),
            query: self
                .query
                .iter()
                .map(|(n, v)| (n.clone(), value(v)))
                .collect(),
        }
    }
}

impl Rule {
    fn compile(
        rule: &RouteRule,
        route: String,
        index: usize,
        namespace: &str,
        targets: &dyn Fn(&str, &str) -> Option<Arc<ServiceTarget>>,
        metrics: &Metrics,
        parent: &str,
    ) -> Rule {
        let mut compiled = Rule {
            requests: metrics.route_requests(parent, &route, index),
            timeout: rule.timeout.map(|t| t.get()),
            timeouts: rule.timeout.map(|t| Timeouts {
                name: format!("route {route} rule {index}"),
                route: RouteMatch::default(),
                request: Some(t.get()),
                idle: None,
            }),
            route,
            index,
            request_headers: None,
            response_headers: None,
            rewrite: None,
            redirect: None,
            mirrors: Vec::new(),
            backends: Vec::new(),
            total_weight: 0,
        };
        for filter in &rule.filters {
            if let Some(m) = &filter.request_header_modifier {
                compiled.request_headers = Some(HeaderEdit::compile(m));
            }
            if let Some(m) = &filter.response_header_modifier {
                compiled.response_headers = Some(HeaderEdit::compile(m));
            }
            if let Some(r) = &filter.url_rewrite {
                compiled.rewrite = Some(Rewrite {
                    hostname: r
                        .hostname
                        .as_deref()
                        .and_then(|h| HeaderValue::try_from(h).ok()),
                    path: match (&r.path_prefix, &r.full_path) {
                        (Some(prefix), _) => Some(PathRewrite::Prefix(prefix.clone())),
                        (None, Some(full)) => Some(PathRewrite::Full(full.clone())),
                        (None, None) => None,
                    },
                });
            }
            if let Some(r) = &filter.request_redirect {
                compiled.redirect = Some(Redirect {
                    scheme: r.scheme.clone(),
                    hostname: r.hostname.clone(),
                    path: r.path.clone(),
                    port: r.port,
                    status: StatusCode::from_u16(r.status_code)
                        .unwrap_or(StatusCode::MOVED_PERMANENTLY),
                });
            }
            if let Some(m) = &filter.request_mirror {
                let service = destination_label(namespace, &m.service);
                compiled.mirrors.push(MirrorTarget {
                    counters: metrics.mirror_requests(&service),
                    service,
                    percent: m.percent,
                    target: targets(namespace, &m.service),
                });
            }
        }
        for backend in &rule.backends {
            let target = targets(namespace, &backend.service);
            let subset = match (&target, backend.labels.is_empty()) {
                (Some(target), false) => {
                    let endpoints: Vec<_> = target
                        .balancer
                        .endpoints()
                        .iter()
                        .map(|e| &e.labels)
                        .collect();
                    Some(SplitPlan::only(
                        format!("route {} rule {index}", compiled.route),
                        &backend.labels,
                        &endpoints,
                    ))
                }
                _ => None,
            };
            compiled.total_weight += u64::from(backend.weight);
            compiled.backends.push(Backend {
                service: destination_label(namespace, &backend.service),
                labels: backend.labels.clone(),
                weight: backend.weight,
                target,
                subset,
            });
        }
        compiled
    }

    /// A backend by weight (`None`: none, or all weights 0).
    fn choose_backend(&self) -> Option<&Backend> {
        match self.backends.as_slice() {
            [] => None,
            [only] => (only.weight > 0).then_some(only),
            backends => {
                if self.total_weight == 0 {
                    return None;
                }
                let mut ticket = fastrand::u64(..self.total_weight);
                for backend in backends {
                    let weight = u64::from(backend.weight);
                    if ticket < weight {
                        return Some(backend);
                    }
                    ticket -= weight;
                }
                None
            }
        }
    }
}

impl<'a> Selected<'a> {
    /// The route's name (`name`, `name.namespace` outside `default`).
    pub fn route(&self) -> &'a str {
        &self.rule.route
    }

    /// The rule's 0-based index in its route.
    pub fn rule_index(&self) -> usize {
        self.rule.index
    }

    /// The rule's timeout as a `Timeouts` for [`Backend::policies`].
    pub fn timeouts(&self) -> Option<&'a Timeouts> {
        self.rule.timeouts.as_ref()
    }

    /// The mirrors to send a copy of the (filtered) request to.
    pub fn mirrors(&self) -> &'a [MirrorTarget] {
        &self.rule.mirrors
    }

    /// Counts the request on `meshlet_route_requests_total`.
    pub fn count(&self) {
        self.rule.requests.inc();
    }

    /// The redirect the rule answers with, if it has one. `scheme` is the
    /// request's (`http`, or `https` on a TLS listener).
    pub fn redirect<B>(&self, request: &Request<B>, scheme: &str) -> Option<Response<ProxyBody>> {
        let redirect = self.rule.redirect.as_ref()?;
        let uri = request.uri();
        let authority = uri
            .authority()
            .map(Authority::as_str)
            .or_else(|| {
                request
                    .headers()
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
            })
            .unwrap_or("");
        let (host, port) = split_authority(authority);
        let new_scheme = redirect.scheme.as_deref().unwrap_or(scheme);
        let host = redirect.hostname.as_deref().unwrap_or(host);
        // A port given replaces; none given keeps the request's only while
        // the scheme is unchanged. A scheme's default port is left out.
        let port = redirect
            .port
            .or(if new_scheme == scheme { port } else { None })
            .filter(|p| !matches!((new_scheme, *p), ("http", 80) | ("https", 443)));
        let path = redirect.path.as_deref().unwrap_or(uri.path());
        let mut location = format!("{new_scheme}://{host}");
        if let Some(port) = port {
            location.push_str(&format!(":{port}"));
        }
        location.push_str(path);
        if let Some(query) = uri.query() {
            location.push('?');
            location.push_str(query);
        }
        let mut response = Response::new(ProxyBody::empty());
        *response.status_mut() = redirect.status;
        let headers = response.headers_mut();
        if let Ok(value) = HeaderValue::try_from(location) {
            headers.insert(header::LOCATION, value);
        }
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
        Some(response)
    }

    /// The rule's request filters: header edits, then the URL rewrite.
    pub fn apply_request<B>(&self, request: &mut Request<B>) {
        if let Some(edit) = &self.rule.request_headers {
            edit.apply(request.headers_mut());
        }
        let Some(rewrite) = &self.rule.rewrite else {
            return;
        };
        if let Some(host) = &rewrite.hostname {
            request.headers_mut().insert(header::HOST, host.clone());
        }
        let new_path = rewrite.path.as_ref().map(|p| match p {
            PathRewrite::Full(full) => full.clone(),
            PathRewrite::Prefix(prefix) => {
                let path = request.uri().path();
                let rest = match self.matched_prefix {
                    Some(matched) => &path[matched.len().min(path.len())..],
                    None => "",
                };
                replace_prefix(prefix, rest)
            }
        });
        let uri = request.uri();
        let host_changes = rewrite.hostname.is_some() && uri.authority().is_some();
        if new_path.is_none() && !host_changes {
            return;
        }
        let mut parts = uri.clone().into_parts();
        if let Some(path) = new_path {
            let path_and_query = match uri.query() {
                Some(query) => format!("{path}?{query}"),
                None => path,
            };
            parts.path_and_query = PathAndQuery::try_from(path_and_query).ok();
        }
        if host_changes {
            if let Some(host) = rewrite.hostname.as_ref().and_then(|h| h.to_str().ok()) {
                parts.authority = Authority::try_from(host).ok();
            }
        }
        if let Ok(rewritten) = Uri::from_parts(parts) {
            *request.uri_mut() = rewritten;
        }
    }

    /// The rule's response filter: header edits.
    pub fn apply_response(&self, response: &mut Response<ProxyBody>) {
        if let Some(edit) = &self.rule.response_headers {
            ProxyBody::restore_fields(response);
            edit.apply(response.headers_mut());
        }
    }
}

/// `prefix` + `rest` with exactly one `/` between them (`/` + `/x` is
/// `/x`, `/v2` + `` is `/v2`, `/` + `` is `/`).
fn replace_prefix(prefix: &str, rest: &str) -> String {
    let prefix = prefix.trim_end_matches('/');
    let rest = rest.trim_start_matches('/');
    match (prefix.is_empty(), rest.is_empty()) {
        (true, true) => "/".to_owned(),
        (true, false) => format!("/{rest}"),
        (false, true) => prefix.to_owned(),
        (false, false) => format!("{prefix}/{rest}"),
    }
}

#[cfg(test)]
mod tests;
