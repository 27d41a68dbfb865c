//! `kind: Route`: HTTP routing by host, path, headers, query and method,
//! for a gateway (`parentRefs: [{gateway: edge}]`) or, GAMMA-style, for
//! every caller of a service (`parentRefs: [{service: orders}]`).
//!
//! ```yaml
//! kind: Route
//! metadata: {name: shop}
//! spec:
//!   parentRefs: [{gateway: edge}]                # each: exactly one of gateway | service
//!   hostnames: [shop.example.com, "*.example.com"]   # optional; empty = any host
//!   rules:                                       # 1..=64
//!     - matches:                                 # optional; empty = everything
//!         - path: {type: PathPrefix, value: /api}    # Exact | PathPrefix (default) | RegularExpression
//!           headers: [{name: x-canary, value: "true", type: Exact}]
//!           queryParams: [{name: v, value: "2"}]
//!           method: GET
//!       backends: [{service: orders, weight: 100, labels: {version: v2}}]
//!       filters:
//!         - requestHeaderModifier: {set: [{name: x-from, value: edge}], add: [...], remove: [x-debug]}
//!         - responseHeaderModifier: {set: [...], add: [...], remove: [...]}
//!         - urlRewrite: {hostname: orders.internal, pathPrefix: /}   # or fullPath
//!         - requestRedirect: {scheme: https, hostname: h, path: /new, port: 443, statusCode: 302}
//!         - requestMirror: {service: shadow, percent: 100}
//!       timeout: 2s
//! ```
//!
//! Shapes only: what a field may hold, checked at apply (and again for a
//! resource read back from storage, [`RouteSpec::validate`]). A regular
//! expression is compiled here, with [`limits::MAX_REGEX_SIZE`] as the
//! compiled size limit, while the YAML is read, so a bad one is reported
//! with its line and column like a type error. Regular expressions match
//! the whole value (path, header or query value), as Envoy's `safe_regex`.
//! The sidecar's `proxy/http_routes.rs` compiles and evaluates routes.
//!
//! Names (`gateway`, `service`, backends, mirrors) are services of the
//! route's own namespace. A reference to a service nobody knows is not an
//! error (it may register later): meshctl warns ([`RouteSpec::references`]).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::duration::HumanDuration;
use crate::limits::{self, check_len, check_str_len, shown, FieldError};

fn field_error<T>(path: &str, message: impl Into<String>) -> Result<T, FieldError> {
    Err((format!("spec.{path}"), message.into()))
}

/// `kind: Route`'s spec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RouteSpec {
    pub parent_refs: Vec<ParentRef>,
    /// Host names the route answers (exact, or `*.` + a domain); any host
    /// when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hostnames: Vec<String>,
    pub rules: Vec<RouteRule>,
}

/// What a route attaches to: exactly one of `gateway` (the gateway's
/// service name) and `service` (mesh routing for the callers of that
/// service).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ParentRef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
}

/// A parent, as [`ParentRef::parent`] reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ParentKind {
    Gateway,
    Service,
}

impl ParentKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ParentKind::Gateway => "gateway",
            ParentKind::Service => "service",
        }
    }
}

impl ParentRef {
    /// The parent's kind and name (a validated ref has exactly one).
    pub fn parent(&self) -> Option<(ParentKind, &str)> {
        match (&self.gateway, &self.service) {
            (Some(g), None) => Some((ParentKind::Gateway, g)),
            (None, Some(s)) => Some((ParentKind::Service, s)),
            _ => None,
        }
    }
}

/// One rule: requests matching any of `matches` go to `backends` (by
/// weight) after `filters`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RouteRule {
    /// Any of these; every request when empty (`PathPrefix /`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<HttpMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<RouteBackend>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<RouteFilter>,
    /// Overrides the target's `TimeoutPolicy` request timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<HumanDuration>,
}

/// One match: every field given must match.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpMatch {
    /// `PathPrefix /` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<ValueMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub query_params: Vec<ValueMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
}

/// How a path is matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum PathMatchType {
    Exact,
    /// Whole segments: `/api` matches `/api`, `/api/` and `/api/x`, not
    /// `/apix`.
    #[default]
    PathPrefix,
    /// The whole path matches the expression.
    RegularExpression,
}

/// `{type, value}`; the regular expression is compiled while it is read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawPathMatch", rename_all = "camelCase")]
pub struct PathMatch {
    #[serde(rename = "type")]
    pub kind: PathMatchType,
    pub value: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawPathMatch {
    #[serde(default, rename = "type")]
    kind: PathMatchType,
    #[serde(default = "root")]
    value: String,
}

fn root() -> String {
    "/".to_owned()
}

impl TryFrom<RawPathMatch> for PathMatch {
    type Error = String;

    fn try_from(raw: RawPathMatch) -> Result<Self, String> {
        let path = PathMatch {
            kind: raw.kind,
            value: raw.value,
        };
        path.check()?;
        Ok(path)
    }
}

impl PathMatch {
    fn check(&self) -> Result<(), String> {
        if self.value.len() > limits::MAX_PATH_LEN {
            return Err(format!(
                "value is {} bytes long; limit: {} (MAX_PATH_LEN)",
                self.value.len(),
                limits::MAX_PATH_LEN
            ));
        }
        match self.kind {
            PathMatchType::RegularExpression => compile_regex(&self.value).map(drop),
            PathMatchType::Exact | PathMatchType::PathPrefix => {
                if !self.value.starts_with('/') {
                    return Err(format!("path {} must start with '/'", shown(&self.value)));
                }
                if self.value.contains(['?', '#']) {
                    return Err(format!(
                        "path {} must not contain '?' or '#'",
                        shown(&self.value)
                    ));
                }
                Ok(())
            }
        }
    }
}

/// How a header or query value is matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum ValueMatchType {
    #[default]
    Exact,
    /// The whole value matches the expression.
    RegularExpression,
}

/// A header (`headers`: names are case-insensitive) or query parameter
/// (`queryParams`: names are exact) with a value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawValueMatch", rename_all = "camelCase")]
pub struct ValueMatch {
    pub name: String,
    pub value: String,
    #[serde(rename = "type")]
    pub kind: ValueMatchType,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawValueMatch {
    name: String,
    value: String,
    #[serde(default, rename = "type")]
    kind: ValueMatchType,
}

impl TryFrom<RawValueMatch> for ValueMatch {
    type Error = String;

    fn try_from(raw: RawValueMatch) -> Result<Self, String> {
        let matched = ValueMatch {
            name: raw.name,
            value: raw.value,
            kind: raw.kind,
        };
        matched.check()?;
        Ok(matched)
    }
}

impl ValueMatch {
    fn check(&self) -> Result<(), String> {
        if self.name.is_empty() || self.name.len() > limits::MAX_HEADER_NAME_LEN {
            return Err(format!(
                "name must have 1 to {} bytes (MAX_HEADER_NAME_LEN)",
                limits::MAX_HEADER_NAME_LEN
            ));
        }
        if self.value.len() > limits::MAX_ROUTE_VALUE_LEN {
            return Err(format!(
                "value is {} bytes long; limit: {} (MAX_ROUTE_VALUE_LEN)",
                self.value.len(),
                limits::MAX_ROUTE_VALUE_LEN
            ));
        }
        match self.kind {
            ValueMatchType::RegularExpression => compile_regex(&self.value).map(drop),
            ValueMatchType::Exact => Ok(()),
        }
    }
}

/// Compiles `pattern` as the sidecar does: anchored at both ends (a whole
/// value must match), with [`limits::MAX_REGEX_SIZE`] as the size limit of
/// the compiled program. The error is a message for the user.
pub fn compile_regex(pattern: &str) -> Result<regex::Regex, String> {
    regex::RegexBuilder::new(&format!("^(?:{pattern})$"))
        .size_limit(limits::MAX_REGEX_SIZE)
        .dfa_size_limit(limits::MAX_REGEX_SIZE)
        .build()
        .map_err(|e| match e {
            regex::Error::CompiledTooBig(limit) => format!(
                "regular expression {} is too large once compiled; limit: {limit} bytes (MAX_REGEX_SIZE)",
                shown(pattern)
            ),
            // The syntax error's text is several lines (pattern, caret,
            // message); its last line says what is wrong.
            other => {
                let text = other.to_string();
                let why = text
                    .lines()
                    .rev()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or("invalid")
                    .trim()
                    .trim_start_matches("error: ")
                    .to_owned();
                format!("invalid regular expression {}: {why}", shown(pattern))
            }
        })
}

/// Where matching requests go: a service, optionally only its endpoints
/// with these labels, with a relative weight (0: none).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RouteBackend {
    pub service: String,
    #[serde(default = "one")]
    pub weight: u32,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

fn one() -> u32 {
    1
}

/// One filter: exactly one of its fields.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RouteFilter {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_header_modifier: Option<HeaderModifier>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_header_modifier: Option<HeaderModifier>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_rewrite: Option<UrlRewrite>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_redirect: Option<RequestRedirect>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_mirror: Option<RequestMirror>,
}

impl RouteFilter {
    /// The filter's name as written (`requestMirror`, ...), when it has
    /// exactly one field.
    fn which(&self) -> Vec<&'static str> {
        let mut set = Vec::new();
        if self.request_header_modifier.is_some() {
            set.push("requestHeaderModifier");
        }
        if self.response_header_modifier.is_some() {
            set.push("responseHeaderModifier");
        }
        if self.url_rewrite.is_some() {
            set.push("urlRewrite");
        }
        if self.request_redirect.is_some() {
            set.push("requestRedirect");
        }
        if self.request_mirror.is_some() {
            set.push("requestMirror");
        }
        set
    }
}

/// Headers set (replacing), added (appended) and removed, in that order
/// of application: remove, then set, then add.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HeaderModifier {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub set: Vec<HttpHeader>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub add: Vec<HttpHeader>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpHeader {
    pub name: String,
    pub value: String,
}

/// Rewrites the request sent on: its `Host` (`hostname`) and its path,
/// either the matched prefix replaced (`pathPrefix`) or the whole path
/// (`fullPath`); the query is kept.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct UrlRewrite {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub full_path: Option<String>,
}

/// Answers with a redirect instead of forwarding: each part given
/// replaces the request's (the query is kept).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RequestRedirect {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default = "RequestRedirect::default_status")]
    pub status_code: u16,
}

impl RequestRedirect {
    fn default_status() -> u16 {
        301
    }
}

/// A copy of each matching request (`percent` of them) sent to `service`,
/// fire-and-forget.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RequestMirror {
    pub service: String,
    #[serde(default = "RequestMirror::default_percent")]
    pub percent: u32,
}

impl RequestMirror {
    fn default_percent() -> u32 {
        100
    }
}

/// A service a route names, for apply-time warnings.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Reference<'a> {
    /// `gateway`, `service`, `backend` or `mirror`.
    pub role: &'static str,
    pub service: &'a str,
}

impl RouteSpec {
    /// Every service the route names (parents, backends, mirrors), in the
    /// route's namespace.
    pub fn references(&self) -> Vec<Reference<'_>> {
        let mut refs = Vec::new();
        for parent in &self.parent_refs {
            if let Some((kind, name)) = parent.parent() {
                refs.push(Reference {
                    role: kind.as_str(),
                    service: name,
                });
            }
        }
        for rule in &self.rules {
            for backend in &rule.backends {
                refs.push(Reference {
                    role: "backend",
                    service: &backend.service,
                });
            }
            for filter in &rule.filters {
                if let Some(mirror) = &filter.request_mirror {
                    refs.push(Reference {
                        role: "mirror",
                        service: &mirror.service,
                    });
                }
            }
        }
        refs.sort();
        refs.dedup();
        refs
    }

    pub(crate) fn validate(&self) -> Result<(), FieldError> {
        if self.parent_refs.is_empty() {
            return field_error("parentRefs", "at least one parent is needed");
        }
        check_len(
            "spec.parentRefs",
            self.parent_refs.len(),
            limits::MAX_ROUTE_ITEMS,
            "MAX_ROUTE_ITEMS",
            "parents",
        )?;
        for (i, parent) in self.parent_refs.iter().enumerate() {
            let Some((kind, name)) = parent.parent() else {
                return field_error(
                    &format!("parentRefs[{i}]"),
                    "give exactly one of `gateway` and `service`",
                );
            };
            limits::validate_dns_label(&format!("spec.parentRefs[{i}].{}", kind.as_str()), name)?;
        }
        check_len(
            "spec.hostnames",
            self.hostnames.len(),
            limits::MAX_ROUTE_ITEMS,
            "MAX_ROUTE_ITEMS",
            "host names",
        )?;
        for (i, host) in self.hostnames.iter().enumerate() {
            check_hostname(host, true).map_err(|m| (format!("spec.hostnames[{i}]"), m))?;
        }
        if self.rules.is_empty() {
            return field_error("rules", "at least one rule is needed");
        }
        check_len(
            "spec.rules",
            self.rules.len(),
            limits::MAX_ROUTE_RULES,
            "MAX_ROUTE_RULES",
            "rules",
        )?;
        for (i, rule) in self.rules.iter().enumerate() {
            rule.validate(&format!("rules[{i}]"))?;
        }
        Ok(())
    }
}

impl RouteRule {
    fn validate(&self, at: &str) -> Result<(), FieldError> {
        check_len(
            &format!("spec.{at}.matches"),
            self.matches.len(),
            limits::MAX_ROUTE_ITEMS,
            "MAX_ROUTE_ITEMS",
            "matches",
        )?;
        for (i, m) in self.matches.iter().enumerate() {
            m.validate(&format!("{at}.matches[{i}]"))?;
        }
        check_len(
            &format!("spec.{at}.filters"),
            self.filters.len(),
            limits::MAX_ROUTE_ITEMS,
            "MAX_ROUTE_ITEMS",
            "filters",
        )?;
        let mut seen: Vec<&str> = Vec::new();
        let mut redirect = false;
        for (i, filter) in self.filters.iter().enumerate() {
            let here = format!("{at}.filters[{i}]");
            let which = filter.which();
            let [name] = which.as_slice() else {
                return field_error(
                    &here,
                    "give exactly one of requestHeaderModifier, responseHeaderModifier, \
                     urlRewrite, requestRedirect, requestMirror",
                );
            };
            // Mirrors may repeat (several shadows); every other filter once.
            if *name != "requestMirror" && seen.contains(name) {
                return field_error(&here, format!("{name} is given twice in this rule"));
            }
            seen.push(name);
            if let Some(m) = &filter.request_header_modifier {
                m.validate(&format!("{here}.requestHeaderModifier"))?;
            }
            if let Some(m) = &filter.response_header_modifier {
                m.validate(&format!("{here}.responseHeaderModifier"))?;
            }
            if let Some(r) = &filter.url_rewrite {
                r.validate(&format!("{here}.urlRewrite"))?;
            }
            if let Some(r) = &filter.request_redirect {
                r.validate(&format!("{here}.requestRedirect"))?;
                redirect = true;
            }
            if let Some(m) = &filter.request_mirror {
                limits::validate_dns_label(
                    &format!("spec.{here}.requestMirror.service"),
                    &m.service,
                )?;
                if m.percent > 100 {
                    return field_error(
                        &format!("{here}.requestMirror.percent"),
                        "must be between 0 and 100",
                    );
                }
            }
        }
        if redirect && seen.contains(&"urlRewrite") {
            return field_error(
                &format!("{at}.filters"),
                "requestRedirect and urlRewrite cannot be combined",
            );
        }
        check_len(
            &format!("spec.{at}.backends"),
            self.backends.len(),
            limits::MAX_ROUTE_ITEMS,
            "MAX_ROUTE_ITEMS",
            "backends",
        )?;
        if self.backends.is_empty() && !redirect {
            return field_error(
                &format!("{at}.backends"),
                "at least one backend is needed (unless the rule redirects)",
            );
        }
        for (i, backend) in self.backends.iter().enumerate() {
            let here = format!("spec.{at}.backends[{i}]");
            limits::validate_dns_label(&format!("{here}.service"), &backend.service)?;
            limits::validate_labels(&format!("{here}.labels"), backend.labels.iter())?;
            if backend.weight > limits::MAX_ROUTE_WEIGHT {
                return Err((
                    format!("{here}.weight"),
                    format!(
                        "{}; limit: {} (MAX_ROUTE_WEIGHT)",
                        backend.weight,
                        limits::MAX_ROUTE_WEIGHT
                    ),
                ));
            }
        }
        if let Some(timeout) = self.timeout {
            let max = Duration::from_secs(24 * 3600);
            if timeout.get().is_zero() || timeout.get() > max {
                return field_error(
                    &format!("{at}.timeout"),
                    "must be greater than 0 and at most 1day",
                );
            }
        }
        Ok(())
    }
}

impl HttpMatch {
    fn validate(&self, at: &str) -> Result<(), FieldError> {
        if let Some(path) = &self.path {
            path.check().map_err(|m| (format!("spec.{at}.path"), m))?;
        }
        for (list, what) in [
            (&self.headers, "headers"),
            (&self.query_params, "queryParams"),
        ] {
            check_len(
                &format!("spec.{at}.{what}"),
                list.len(),
                limits::MAX_ROUTE_ITEMS,
                "MAX_ROUTE_ITEMS",
                what,
            )?;
            for (i, m) in list.iter().enumerate() {
                let here = format!("spec.{at}.{what}[{i}]");
                m.check().map_err(|msg| (here.clone(), msg))?;
                if what == "headers" && http_token(&m.name).is_err() {
                    return Err((
                        format!("{here}.name"),
                        format!("{} is not a header name", shown(&m.name)),
                    ));
                }
                if m.kind == ValueMatchType::Exact && what == "headers" {
                    header_value(&m.value).map_err(|msg| (format!("{here}.value"), msg))?;
                }
            }
        }
        if let Some(method) = &self.method {
            check_str_len(
                &format!("spec.{at}.method"),
                method,
                limits::MAX_METHOD_LEN,
                "MAX_METHOD_LEN",
            )?;
            let token = !method.is_empty()
                && method
                    .bytes()
                    .all(|b| b.is_ascii_uppercase() || b == b'-' || b == b'_');
            if !token {
                return field_error(
                    &format!("{at}.method"),
                    format!(
                        "{} is not an upper-case HTTP method (GET, POST, ...)",
                        shown(method)
                    ),
                );
            }
        }
        Ok(())
    }
}

impl HeaderModifier {
    fn validate(&self, at: &str) -> Result<(), FieldError> {
        for (list, what) in [(&self.set, "set"), (&self.add, "add")] {
            check_len(
                &format!("spec.{at}.{what}"),
                list.len(),
                limits::MAX_ROUTE_ITEMS,
                "MAX_ROUTE_ITEMS",
                "headers",
            )?;
            for (i, header) in list.iter().enumerate() {
                let here = format!("spec.{at}.{what}[{i}]");
                http_token(&header.name)
                    .and_then(|()| not_reserved(&header.name))
                    .map_err(|m| (format!("{here}.name"), m))?;
                header_value(&header.value).map_err(|m| (format!("{here}.value"), m))?;
            }
        }
        check_len(
            &format!("spec.{at}.remove"),
            self.remove.len(),
            limits::MAX_ROUTE_ITEMS,
            "MAX_ROUTE_ITEMS",
            "headers",
        )?;
        for (i, name) in self.remove.iter().enumerate() {
            http_token(name)
                .and_then(|()| not_reserved(name))
                .map_err(|m| (format!("spec.{at}.remove[{i}]"), m))?;
        }
        Ok(())
    }
}

impl UrlRewrite {
    fn validate(&self, at: &str) -> Result<(), FieldError> {
        if self.path_prefix.is_some() && self.full_path.is_some() {
            return field_error(at, "give at most one of `pathPrefix` and `fullPath`");
        }
        if self.hostname.is_none() && self.path_prefix.is_none() && self.full_path.is_none() {
            return field_error(at, "give `hostname`, `pathPrefix` or `fullPath`");
        }
        if let Some(host) = &self.hostname {
            check_hostname(host, false).map_err(|m| (format!("spec.{at}.hostname"), m))?;
        }
        for (path, what) in [
            (&self.path_prefix, "pathPrefix"),
            (&self.full_path, "fullPath"),
        ] {
            if let Some(path) = path {
                check_path(path).map_err(|m| (format!("spec.{at}.{what}"), m))?;
            }
        }
        Ok(())
    }
}

impl RequestRedirect {
    fn validate(&self, at: &str) -> Result<(), FieldError> {
        if let Some(scheme) = &self.scheme {
            if scheme != "http" && scheme != "https" {
                return field_error(
                    &format!("{at}.scheme"),
                    format!("{} is not http or https", shown(scheme)),
                );
            }
        }
        if let Some(host) = &self.hostname {
            check_hostname(host, false).map_err(|m| (format!("spec.{at}.hostname"), m))?;
        }
        if let Some(path) = &self.path {
            check_path(path).map_err(|m| (format!("spec.{at}.path"), m))?;
        }
        if self.port == Some(0) {
            return field_error(&format!("{at}.port"), "must not be 0");
        }
        if ![301, 302, 303, 307, 308].contains(&self.status_code) {
            return field_error(
                &format!("{at}.statusCode"),
                format!("{} is not one of 301, 302, 303, 307, 308", self.status_code),
            );
        }
        Ok(())
    }
}

/// A host name: lower-case DNS labels separated by dots (at most 253
/// bytes); with `wildcard`, `*.` followed by one may lead.
fn check_hostname(host: &str, wildcard: bool) -> Result<(), String> {
    let name = match host.strip_prefix("*.") {
        Some(rest) if wildcard => rest,
        Some(_) => return Err(format!("{}: a wildcard is not allowed here", shown(host))),
        None => host,
    };
    if host.len() > limits::MAX_HOSTNAME_LEN {
        return Err(format!(
            "{} is {} bytes long; limit: {} (MAX_HOSTNAME_LEN)",
            shown(host),
            host.len(),
            limits::MAX_HOSTNAME_LEN
        ));
    }
    let label_ok = |label: &str| {
        !label.is_empty()
            && label.len() <= limits::MAX_NAME_LEN
            && label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-')
    };
    if !name.split('.').all(label_ok) {
        let hint = if wildcard {
            " (a wildcard only as a leading \"*.\")"
        } else {
            ""
        };
        return Err(format!(
            "{} is not a host name: lower-case DNS labels separated by dots{hint}",
            shown(host)
        ));
    }
    Ok(())
}

/// A path for a rewrite or a redirect: starts with '/', visible ASCII,
/// no query or fragment.
fn check_path(path: &str) -> Result<(), String> {
    if path.len() > limits::MAX_PATH_LEN {
        return Err(format!(
            "{} bytes long; limit: {} (MAX_PATH_LEN)",
            path.len(),
            limits::MAX_PATH_LEN
        ));
    }
    if !path.starts_with('/') {
        return Err(format!("path {} must start with '/'", shown(path)));
    }
    if !path.bytes().all(|b| b.is_ascii_graphic()) || path.contains(['?', '#']) {
        return Err(format!(
            "path {} must be visible ASCII without '?' or '#'",
            shown(path)
        ));
    }
    Ok(())
}

/// An HTTP field name (RFC 9110 token characters).
fn http_token(name: &str) -> Result<(), String> {
    let tchar = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if name.is_empty() || name.len() > limits::MAX_HEADER_NAME_LEN || !name.bytes().all(tchar) {
        return Err(format!(
            "{} is not a header name (1 to {} token characters)",
            shown(name),
            limits::MAX_HEADER_NAME_LEN
        ));
    }
    Ok(())
}

/// Header names a `requestHeaderModifier` / `responseHeaderModifier`
/// may not touch: the message framing (`content-length`,
/// `transfer-encoding`), the hop-by-hop fields the proxy strips and
/// rebuilds for each hop (RFC 9110 §7.6.1), and `host` (the request's
/// routing; `urlRewrite.hostname` changes it). The filters run after the
/// proxy prepared the message for the next hop, so such an edit would go
/// out as is and could desynchronise the two ends of a connection.
pub const RESERVED_HEADERS: [(&str, &str); 10] = [
    ("content-length", "framing"),
    ("transfer-encoding", "framing"),
    ("connection", "hop-by-hop"),
    ("keep-alive", "hop-by-hop"),
    ("proxy-connection", "hop-by-hop"),
    ("te", "hop-by-hop"),
    ("trailer", "hop-by-hop"),
    ("upgrade", "hop-by-hop"),
    ("http2-settings", "hop-by-hop"),
    ("host", "routing"),
];

/// `name` (a token) is not one of [`RESERVED_HEADERS`].
fn not_reserved(name: &str) -> Result<(), String> {
    match RESERVED_HEADERS
        .iter()
        .find(|(reserved, _)| reserved.eq_ignore_ascii_case(name))
    {
        None => Ok(()),
        Some((_, "routing")) => Err(format!(
            "{} cannot be modified by a header filter: use urlRewrite.hostname",
            shown(name)
        )),
        Some((_, why)) => Err(format!(
            "{} is a {why} header the mesh manages per hop; a filter cannot modify it",
            shown(name)
        )),
    }
}

/// An HTTP field value: visible ASCII and spaces/tabs inside, at most
/// [`limits::MAX_ROUTE_VALUE_LEN`] bytes.
fn header_value(value: &str) -> Result<(), String> {
    if value.len() > limits::MAX_ROUTE_VALUE_LEN {
        return Err(format!(
            "{} bytes long; limit: {} (MAX_ROUTE_VALUE_LEN)",
            value.len(),
            limits::MAX_ROUTE_VALUE_LEN
        ));
    }
    let ok = value
        .bytes()
        .all(|b| b.is_ascii_graphic() || b == b' ' || b == b'\t')
        && !value.starts_with([' ', '\t'])
        && !value.ends_with([' ', '\t']);
    if !ok {
        return Err(format!(
            "{} is not a header value (visible ASCII, inner spaces)",
            shown(value)
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
