//! The zero-trust policy kinds: `MTLSPolicy` (may a service be called in
//! plaintext?) and `AuthorizationPolicy` (which callers may call what).
//!
//! Both are enforced by the target's own sidecar, on its inbound side,
//! against the caller's *verified* identity (the URI SAN of the client
//! certificate on the mTLS hop), never against a header.
//!
//! ```yaml
//! kind: MTLSPolicy            # without targetRef: the mesh-wide default
//! spec: {targetRef: {service: orders}, mode: strict}   # default: permissive
//! ---
//! kind: AuthorizationPolicy
//! spec:
//!   targetRef: {service: orders}
//!   action: ALLOW                        # or DENY
//!   mode: enforce                        # or dryRun: counted, never refused
//!   rules:
//!     - from: [{services: [frontend]}]   # {namespaces}, {identities}, {unauthenticated: true}
//!       to: [{methods: [GET], paths: [/api/*]}]
//!       when: [{header: x-tenant, values: [acme]}]
//! ```
//!
//! Matching follows Istio: a rule matches when any of its `from` sources,
//! any of its `to` operations and every `when` condition match (an absent
//! list matches anything); a policy matches when any rule does, so an
//! `ALLOW` policy without rules allows nothing and `rules: [{}]` allows
//! everything. Within one source or operation, every field given must
//! match. Paths are exact (`/health`), a prefix with a trailing `*`
//! (`/api/*` matches `/api/` and below), or `*` (any path).
//!
//! The checks here are the shapes (identities are parsed with
//! [`crate::identity::SpiffeId`]); the sidecar's `policy/authz.rs` compiles
//! and evaluates them.

use serde::{Deserialize, Serialize};

use crate::identity::SpiffeId;
use crate::limits::{self, check_len, check_str_len, FieldError};
use crate::policy::{PolicyMode, TargetRef};

fn field_error<T>(path: &str, message: impl Into<String>) -> Result<T, FieldError> {
    Err((format!("spec.{path}"), message.into()))
}

// ---------------------------------------------------------------- mTLS

/// `kind: MTLSPolicy`: whether the target (or, without `targetRef`, every
/// service of the mesh) accepts plaintext callers. A policy that targets a
/// service beats the mesh-wide one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MtlsSpec {
    /// The service; absent: the mesh-wide default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_ref: Option<TargetRef>,
    #[serde(default)]
    pub mode: MtlsMode,
}

/// `permissive` (the default, so unmeshed clients keep working): mTLS and
/// plaintext callers are both served. `strict`: plaintext HTTP gets 403
/// `mtls_required`, plaintext opaque TCP is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum MtlsMode {
    #[default]
    Permissive,
    Strict,
}

impl MtlsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            MtlsMode::Permissive => "permissive",
            MtlsMode::Strict => "strict",
        }
    }
}

impl MtlsSpec {
    pub(crate) fn validate(&self) -> Result<(), FieldError> {
        Ok(())
    }
}

// ---------------------------------------------------------------- authorization

/// `kind: AuthorizationPolicy`, enforced on the target's inbound side.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuthorizationSpec {
    pub target_ref: TargetRef,
    pub action: AuthzAction,
    #[serde(default)]
    pub mode: AuthzMode,
    /// A request matches the policy when any rule matches it.
    #[serde(default)]
    pub rules: Vec<AuthzRule>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AuthzAction {
    #[serde(rename = "ALLOW")]
    Allow,
    #[serde(rename = "DENY")]
    Deny,
}

impl AuthzAction {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthzAction::Allow => "ALLOW",
            AuthzAction::Deny => "DENY",
        }
    }
}

/// `enforce` (the default) refuses; `dryRun` only counts what it would
/// have refused (`meshlet_authz_dry_run_denied_total` and
/// `meshlet_policy_would_refuse_total`). The shared [`PolicyMode`].
pub type AuthzMode = PolicyMode;

/// One rule: who (`from`), what (`to`), under which conditions (`when`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuthzRule {
    /// Any of these callers (any caller when empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<AuthzSource>,
    /// Any of these operations (any request when empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<AuthzOperation>,
    /// All of these conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub when: Vec<AuthzCondition>,
}

/// A caller, by its verified identity: the service it is (`name`, or
/// `name.namespace` outside the policy's namespace), its namespace, its
/// SPIFFE id, or no identity at all (`unauthenticated: true`). Every field
/// given must match.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuthzSource {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub identities: Vec<String>,
    /// Plaintext callers (no certificate).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unauthenticated: bool,
}

/// A request: any of `methods` and any of `paths` (each: any when empty).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuthzOperation {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// `/exact`, `/prefix/*` or `*`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
}

/// A request header whose value is one of `values` (exact).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuthzCondition {
    pub header: String,
    pub values: Vec<String>,
}

/// A path pattern of an operation, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathPattern<'a> {
    Any,
    Exact(&'a str),
    Prefix(&'a str),
}

impl<'a> PathPattern<'a> {
    /// `*` → any, `/api/*` → prefix `/api/`, `/health` → exact; `None` for
    /// anything else (a `*` elsewhere, no leading `/`).
    pub fn parse(pattern: &'a str) -> Option<PathPattern<'a>> {
        if pattern == "*" {
            return Some(PathPattern::Any);
        }
        if !pattern.starts_with('/') {
            return None;
        }
        match pattern.strip_suffix('*') {
            Some(prefix) if !prefix.contains('*') => Some(PathPattern::Prefix(prefix)),
            Some(_) => None,
            None if pattern.contains('*') => None,
            None => Some(PathPattern::Exact(pattern)),
        }
    }

    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathPattern::Any => true,
            PathPattern::Exact(exact) => path == *exact,
            PathPattern::Prefix(prefix) => path.starts_with(prefix),
        }
    }
}

/// Whether `method` is an upper-case HTTP method token.
pub(crate) fn is_method(method: &str) -> bool {
    !method.is_empty()
        && method
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b == b'-' || b == b'_')
}

fn is_header_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// A list of at most [`limits::MAX_RULE_ITEMS`] entries, not empty.
fn check_items(field: &str, len: usize, what: &str) -> Result<(), FieldError> {
    check_len(
        &format!("spec.{field}"),
        len,
        limits::MAX_RULE_ITEMS,
        "MAX_RULE_ITEMS",
        what,
    )
}

impl AuthorizationSpec {
    pub(crate) fn validate(&self) -> Result<(), FieldError> {
        check_len(
            "spec.rules",
            self.rules.len(),
            limits::MAX_RULES,
            "MAX_RULES",
            "rules",
        )?;
        for (i, rule) in self.rules.iter().enumerate() {
            rule.validate(&format!("rules[{i}]"))?;
        }
        Ok(())
    }
}

impl AuthzRule {
    fn validate(&self, at: &str) -> Result<(), FieldError> {
        check_items(&format!("{at}.from"), self.from.len(), "sources")?;
        check_items(&format!("{at}.to"), self.to.len(), "operations")?;
        check_items(&format!("{at}.when"), self.when.len(), "conditions")?;
        for (i, source) in self.from.iter().enumerate() {
            source.validate(&format!("{at}.from[{i}]"))?;
        }
        for (i, operation) in self.to.iter().enumerate() {
            operation.validate(&format!("{at}.to[{i}]"))?;
        }
        for (i, condition) in self.when.iter().enumerate() {
            condition.validate(&format!("{at}.when[{i}]"))?;
        }
        Ok(())
    }
}

impl AuthzSource {
    fn validate(&self, at: &str) -> Result<(), FieldError> {
        let named =
            !self.services.is_empty() || !self.namespaces.is_empty() || !self.identities.is_empty();
        if self.unauthenticated && named {
            return field_error(
                at,
                "unauthenticated: true names callers without an identity; \
                 give it alone, not with services, namespaces or identities",
            );
        }
        if !self.unauthenticated && !named {
            return field_error(
                at,
                "name the callers: services, namespaces, identities or unauthenticated: true",
            );
        }
        check_items(&format!("{at}.services"), self.services.len(), "services")?;
        check_items(
            &format!("{at}.namespaces"),
            self.namespaces.len(),
            "namespaces",
        )?;
        check_items(
            &format!("{at}.identities"),
            self.identities.len(),
            "identities",
        )?;
        for (i, service) in self.services.iter().enumerate() {
            let field = format!("spec.{at}.services[{i}]");
            let mut parts = service.splitn(2, '.');
            let name = parts.next().unwrap_or_default();
            limits::validate_dns_label(&field, name)
                .map_err(|(f, m)| (f, format!("{m} (a service is `name` or `name.namespace`)")))?;
            if let Some(namespace) = parts.next() {
                limits::validate_dns_label(&field, namespace).map_err(|(f, m)| {
                    (f, format!("{m} (a service is `name` or `name.namespace`)"))
                })?;
            }
        }
        for (i, namespace) in self.namespaces.iter().enumerate() {
            limits::validate_dns_label(&format!("spec.{at}.namespaces[{i}]"), namespace)?;
        }
        for (i, identity) in self.identities.iter().enumerate() {
            let field = format!("{at}.identities[{i}]");
            check_str_len(
                &format!("spec.{field}"),
                identity,
                limits::MAX_SCALAR_BYTES,
                "MAX_SCALAR_BYTES",
            )?;
            if let Err(error) = SpiffeId::parse(identity) {
                return field_error(&field, error.to_string());
            }
        }
        Ok(())
    }
}

impl AuthzOperation {
    fn validate(&self, at: &str) -> Result<(), FieldError> {
        if self.methods.is_empty() && self.paths.is_empty() {
            return field_error(at, "name methods, paths or both");
        }
        check_len(
            &format!("spec.{at}.methods"),
            self.methods.len(),
            limits::MAX_METHODS,
            "MAX_METHODS",
            "methods",
        )?;
        check_items(&format!("{at}.paths"), self.paths.len(), "paths")?;
        for (i, method) in self.methods.iter().enumerate() {
            check_str_len(
                &format!("spec.{at}.methods[{i}]"),
                method,
                limits::MAX_METHOD_LEN,
                "MAX_METHOD_LEN",
            )?;
            if !is_method(method) {
                return field_error(
                    &format!("{at}.methods[{i}]"),
                    format!(
                        "{} is not an upper-case HTTP method (GET, POST, ...)",
                        limits::shown(method)
                    ),
                );
            }
        }
        for (i, path) in self.paths.iter().enumerate() {
            check_str_len(
                &format!("spec.{at}.paths[{i}]"),
                path,
                limits::MAX_PATH_LEN,
                "MAX_PATH_LEN",
            )?;
            if PathPattern::parse(path).is_none() {
                return field_error(
                    &format!("{at}.paths[{i}]"),
                    format!(
                        "{} is not a path: give an exact path (/health), a prefix \
                         ending in * (/api/*) or * for any path",
                        limits::shown(path)
                    ),
                );
            }
        }
        Ok(())
    }
}

impl AuthzCondition {
    fn validate(&self, at: &str) -> Result<(), FieldError> {
        check_str_len(
            &format!("spec.{at}.header"),
            &self.header,
            limits::MAX_HEADER_NAME_LEN,
            "MAX_HEADER_NAME_LEN",
        )?;
        if !is_header_name(&self.header) {
            return field_error(
                &format!("{at}.header"),
                format!(
                    "{} is not a lower-case header name (letters, digits, '-', '_')",
                    limits::shown(&self.header)
                ),
            );
        }
        if self.values.is_empty() {
            return field_error(&format!("{at}.values"), "give at least one value");
        }
        check_items(&format!("{at}.values"), self.values.len(), "values")?;
        for (i, value) in self.values.iter().enumerate() {
            check_str_len(
                &format!("spec.{at}.values[{i}]"),
                value,
                limits::MAX_SCALAR_BYTES,
                "MAX_SCALAR_BYTES",
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_patterns() {
        assert_eq!(PathPattern::parse("*"), Some(PathPattern::Any));
        assert_eq!(
            PathPattern::parse("/api/*"),
            Some(PathPattern::Prefix("/api/"))
        );
        assert_eq!(
            PathPattern::parse("/health"),
            Some(PathPattern::Exact("/health"))
        );
        for bad in ["api", "/a*b", "/*/x", "**", "/a/**", ""] {
            assert_eq!(PathPattern::parse(bad), None, "{bad}");
        }
        let api = PathPattern::parse("/api/*").unwrap();
        assert!(api.matches("/api/") && api.matches("/api/items/1"));
        assert!(!api.matches("/api") && !api.matches("/apix"));
        assert!(PathPattern::parse("/health").unwrap().matches("/health"));
        assert!(!PathPattern::parse("/health").unwrap().matches("/health/x"));
    }

    use crate::resource::Resource;

    fn parse(yaml: &str) -> Result<Vec<Resource>, String> {
        crate::parse_documents("t.yaml", yaml).map_err(|e| e.to_string())
    }

    fn authz(spec: &str) -> Result<Vec<Resource>, String> {
        parse(&format!(
            "apiVersion: meshlet.dev/v1alpha1\nkind: AuthorizationPolicy\n\
             metadata: {{name: p}}\nspec:\n  targetRef: {{service: orders}}\n{spec}"
        ))
    }

    #[test]
    fn mtls_policies_parse_with_and_without_target() {
        let resources = parse(
            "apiVersion: meshlet.dev/v1alpha1\nkind: MTLSPolicy\nmetadata: {name: mesh}\nspec: {}\n\
             ---\napiVersion: meshlet.dev/v1alpha1\nkind: MTLSPolicy\nmetadata: {name: orders}\n\
             spec: {targetRef: {service: orders}, mode: strict}\n",
        )
        .unwrap();
        let Resource::MtlsPolicy(mesh) = &resources[0] else {
            panic!("not an MTLSPolicy")
        };
        assert_eq!(mesh.spec.mode, MtlsMode::Permissive, "the default");
        assert_eq!(resources[0].target(), None, "mesh-wide");
        assert_eq!(resources[1].target(), Some(("default", "orders")));
        assert_eq!(resources[1].kind(), "MTLSPolicy");
        assert_eq!(crate::display::summary(&resources[1]), "strict");
        assert_eq!(
            crate::display::summary(&resources[0]),
            "permissive (mesh-wide default)"
        );
        let yaml = resources[1].to_yaml();
        assert!(
            yaml.contains("kind: MTLSPolicy") && yaml.contains("mode: strict"),
            "{yaml}"
        );
        assert_eq!(parse(&yaml).unwrap()[0], resources[1], "round trip");
        let err = parse(
            "apiVersion: meshlet.dev/v1alpha1\nkind: MTLSPolicy\nmetadata: {name: m}\nspec: {mode: STRICT}\n",
        )
        .unwrap_err();
        assert!(err.contains("STRICT"), "{err}");
    }

    #[test]
    fn authorization_policies_parse_render_and_summarise() {
        let resources = authz(
            "  action: ALLOW\n  rules:\n\
             \x20   - from: [{services: [frontend, web.shop]}, {namespaces: [ops]}, \
             {identities: ['spiffe://meshlet.local/ns/default/sa/batch']}, {unauthenticated: true}]\n\
             \x20     to: [{methods: [GET], paths: [/api/*, /health, '*']}]\n\
             \x20     when: [{header: x-tenant, values: [acme]}]\n",
        )
        .unwrap();
        let Resource::AuthorizationPolicy(doc) = &resources[0] else {
            panic!("not an AuthorizationPolicy")
        };
        assert_eq!(doc.spec.action, AuthzAction::Allow);
        assert_eq!(doc.spec.mode, AuthzMode::Enforce, "the default");
        assert_eq!(doc.spec.rules[0].from.len(), 4);
        assert!(doc.spec.rules[0].from[3].unauthenticated);
        assert_eq!(resources[0].target(), Some(("default", "orders")));
        let yaml = resources[0].to_yaml();
        assert!(yaml.contains("action: ALLOW"), "{yaml}");
        assert!(!yaml.contains("unauthenticated: false"), "{yaml}");
        assert_eq!(parse(&yaml).unwrap()[0], resources[0], "round trip");
        assert_eq!(
            crate::display::summary(&resources[0]),
            "ALLOW 1 rule (from frontend,web.shop | ns ops | \
             spiffe://meshlet.local/ns/default/sa/batch | unauthenticated; \
             to GET /api/*,/health,*; when x-tenant)"
        );
        let dry = authz("  action: DENY\n  mode: dryRun\n  rules: [{}]\n").unwrap();
        assert_eq!(crate::display::summary(&dry[0]), "DENY 1 rule, dry run");
    }

    #[test]
    fn the_example_file_parses() {
        let text = include_str!("../../examples/policies/zero-trust.yaml");
        let resources = crate::parse_documents("zero-trust.yaml", text).unwrap();
        let kinds: Vec<&str> = resources.iter().map(Resource::kind).collect();
        assert_eq!(
            kinds,
            [
                "MTLSPolicy",
                "MTLSPolicy",
                "AuthorizationPolicy",
                "AuthorizationPolicy"
            ]
        );
    }

    #[test]
    fn authorization_policies_refuse_bad_shapes_with_the_field() {
        for (spec, field, words) in [
            ("  action: allow\n", "spec.action", "unknown variant"),
            (
                "  action: ALLOW\n  rules: [{form: []}]\n",
                "form",
                "unknown field",
            ),
            (
                "  action: ALLOW\n  mode: dryrun\n",
                "spec.mode",
                "unknown variant",
            ),
            ("  rules: []\n", "spec", "missing field `action`"),
            (
                "  action: ALLOW\n  rules: [{from: [{identities: ['spiffe://x/ns/a']}]}]\n",
                "spec.rules[0].from[0].identities[0]",
                "invalid SPIFFE id",
            ),
            (
                "  action: ALLOW\n  rules: [{from: [{services: [Frontend]}]}]\n",
                "spec.rules[0].from[0].services[0]",
                "name` or `name.namespace",
            ),
            (
                "  action: ALLOW\n  rules: [{from: [{unauthenticated: true, namespaces: [a]}]}]\n",
                "spec.rules[0].from[0]",
                "give it alone",
            ),
            (
                "  action: ALLOW\n  rules: [{from: [{}]}]\n",
                "spec.rules[0].from[0]",
                "name the callers",
            ),
            (
                "  action: ALLOW\n  rules: [{to: [{methods: [get]}]}]\n",
                "spec.rules[0].to[0].methods[0]",
                "upper-case HTTP method",
            ),
            (
                "  action: ALLOW\n  rules: [{to: [{paths: ['/a*/b']}]}]\n",
                "spec.rules[0].to[0].paths[0]",
                "a prefix ending in *",
            ),
            (
                "  action: ALLOW\n  rules: [{to: [{}]}]\n",
                "spec.rules[0].to[0]",
                "methods, paths or both",
            ),
            (
                "  action: ALLOW\n  rules: [{when: [{header: X-Tenant, values: [a]}]}]\n",
                "spec.rules[0].when[0].header",
                "lower-case header name",
            ),
            (
                "  action: ALLOW\n  rules: [{when: [{header: x-tenant, values: []}]}]\n",
                "spec.rules[0].when[0].values",
                "at least one value",
            ),
        ] {
            let err = authz(spec).unwrap_err();
            assert!(err.contains(field), "{spec}: {field} not in {err}");
            assert!(err.contains(words), "{spec}: {words} not in {err}");
        }
        let many = format!("  action: DENY\n  rules: [{}]\n", vec!["{}"; 65].join(", "));
        let err = authz(&many).unwrap_err();
        assert!(err.contains("MAX_RULES"), "{err}");
    }
}
