//! Multi-document YAML → typed resources, with errors a person can act on.
//!
//! The YAML stream is read twice. Pass one only learns each document's
//! `kind` (ignoring everything else); pass two deserializes each document
//! strictly into the struct for that kind, through `serde_path_to_error` so a
//! failure names the field path (`spec.endpoints[0].address`) as well as the
//! line and column serde_yaml reports. Reading twice keeps the positions
//! (a `serde_yaml::Value` detour would lose them) and costs nothing at
//! config-file sizes.
//!
//! Before both, pass zero ([`expansion`]) measures the file as it would be
//! with its aliases expanded, without building anything, and refuses it
//! past the limits of [`crate::limits`]; so no pass ever builds more than
//! those limits allow, whatever the aliases.

use std::collections::HashSet;
use std::fmt;

use serde::de::{DeserializeOwned, IgnoredAny};
use serde::Deserialize;

#[cfg(test)]
mod bounds_tests;
mod expansion;

use crate::limits::shown;
use crate::resource::{typed_resource, Document, Resource, TypedDeserializer, KNOWN_KINDS};
use crate::API_VERSION;

/// Why a file was rejected. `Display` gives one line:
/// `FILE: document N, line L, column C: FIELD: MESSAGE`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ParseError {
    /// The file name (or `-` for stdin) as the user gave it.
    pub source_name: String,
    /// 1-based index of the YAML document inside the file; 0 when the
    /// error is about the whole file (its size).
    pub document: usize,
    /// 1-based line and column, when known.
    pub line: Option<usize>,
    pub column: Option<usize>,
    /// Dotted path of the offending field, empty for the document itself.
    pub field: String,
    pub message: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.source_name)?;
        if self.document > 0 {
            write!(f, ": document {}", self.document)?;
        }
        if let Some(line) = self.line {
            write!(f, ", line {line}")?;
            if let Some(column) = self.column {
                write!(f, ", column {column}")?;
            }
        }
        if !self.field.is_empty() {
            write!(f, ": field `{}`", self.field)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Just enough of a document to pick the type for pass two.
#[derive(Deserialize)]
struct KindProbe {
    kind: Option<String>,
}

/// Parses every document of `text` (named `source_name` in errors) and
/// validates each one. All or nothing: the first error is returned and no
/// resource is. A file over the limits of [`crate::limits`] (its size, its
/// documents, what its aliases expand to, lists, labels, strings) is
/// refused with an error naming the limit.
pub fn parse_documents(source_name: &str, text: &str) -> Result<Vec<Resource>, ParseError> {
    let starts = document_start_lines(text);
    expansion::check(&expansion::Limits::DEFAULT, source_name, text, &starts)?;
    let error =
        |document: usize, field: &str, message: String, pos: Option<(usize, usize)>| ParseError {
            source_name: source_name.to_owned(),
            document,
            line: pos
                .map(|p| p.0)
                .or_else(|| starts.get(document - 1).copied()),
            column: pos.map(|p| p.1),
            field: field.to_owned(),
            message,
        };

    // Pass one: the kind of each document (None for an empty document).
    let mut kinds = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let probe: Option<KindProbe> = Option::deserialize(doc)
            .map_err(|e| error(i + 1, "", strip_position(&e), position(&e)))?;
        kinds.push(probe.map(|p| p.kind));
    }

    // Pass two: strict typed deserialization.
    let mut resources = Vec::new();
    let mut names = HashSet::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let number = i + 1;
        let kind = match kinds.get(i) {
            Some(Some(Some(kind))) => kind.as_str(),
            Some(Some(None)) => {
                return Err(error(
                    number,
                    "kind",
                    "missing field `kind`".to_owned(),
                    None,
                ))
            }
            // An empty document (`---` at the end of a file) is harmless.
            _ => {
                let _ = IgnoredAny::deserialize(doc);
                continue;
            }
        };
        struct FromYaml<'a>(serde_yaml::Deserializer<'a>);
        impl TypedDeserializer<FieldError> for FromYaml<'_> {
            fn doc<S: DeserializeOwned>(self) -> Result<Document<S>, FieldError> {
                typed(self.0)
            }
        }
        let resource = match typed_resource(kind, FromYaml(doc)) {
            Some(result) => result.map_err(|(f, m, p)| error(number, &f, m, p))?,
            None => {
                return Err(error(
                    number,
                    "kind",
                    format!(
                        "unknown kind {}; this release knows {}",
                        shown(kind),
                        KNOWN_KINDS.join(", ")
                    ),
                    None,
                ))
            }
        };
        let api_version = resource.api_version();
        if api_version != API_VERSION {
            return Err(error(
                number,
                "apiVersion",
                format!(
                    "unsupported apiVersion {}; expected {API_VERSION:?}",
                    shown(api_version)
                ),
                None,
            ));
        }
        resource
            .validate()
            .map_err(|(field, message)| error(number, &field, message, None))?;
        let meta = resource.metadata();
        let key = (resource.kind(), meta.namespace.clone(), meta.name.clone());
        if !names.insert(key) {
            return Err(error(
                number,
                "metadata.name",
                format!(
                    "{} {}/{} is defined twice in this file",
                    resource.kind(),
                    meta.namespace,
                    meta.name
                ),
                None,
            ));
        }
        resources.push(resource);
    }
    Ok(resources)
}

/// Checks any YAML text the way [`parse_documents`] does before it builds
/// anything: its size, its number of documents, and the nodes and string
/// bytes of each document and of all of them with aliases expanded (limits
/// in [`crate::limits`]). For YAML that is not meshlet resources (e.g.
/// Kubernetes manifests) read with serde_yaml elsewhere: call this first.
pub fn check_yaml_limits(source_name: &str, text: &str) -> Result<(), ParseError> {
    expansion::check(
        &expansion::Limits::DEFAULT,
        source_name,
        text,
        &document_start_lines(text),
    )
}

type FieldError = (String, String, Option<(usize, usize)>);

fn typed<S: DeserializeOwned>(
    doc: serde_yaml::Deserializer<'_>,
) -> Result<Document<S>, FieldError> {
    serde_path_to_error::deserialize(doc).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let field = if path == "." { String::new() } else { path };
        // serde_yaml prefixes its message with (part of) the path we
        // report separately: "spec.endpoints[0]: unknown field ...".
        let message = strip_position(&inner);
        let message = match message.split_once(": ") {
            Some((head, rest)) if !field.is_empty() && field.starts_with(head) => rest.to_owned(),
            _ => message,
        };
        (field, message, position(&inner))
    })
}

fn position(e: &serde_yaml::Error) -> Option<(usize, usize)> {
    e.location().map(|l| (l.line(), l.column()))
}

/// serde_yaml appends " at line L column C" to its messages; we report the
/// position separately, so drop it from the text.
fn strip_position(e: &serde_yaml::Error) -> String {
    let text = e.to_string();
    match text.rfind(" at line ") {
        Some(idx) if e.location().is_some() => text[..idx].to_owned(),
        _ => text,
    }
}

/// The 1-based line on which each document starts, for errors found after
/// deserialization (when serde no longer knows positions).
fn document_start_lines(text: &str) -> Vec<usize> {
    let mut starts = Vec::new();
    let mut pending = Some(1);
    for (idx, line) in yaml_lines(text).enumerate() {
        let trimmed = line.trim_end();
        if trimmed == "---" || trimmed.starts_with("--- ") {
            if let Some(start) = pending.take() {
                // A leading `---` before any content does not end a document.
                if yaml_lines(text).take(idx).any(|l| !is_blank_or_comment(l)) {
                    starts.push(start);
                }
            }
            pending = Some(idx + 2);
        }
    }
    if let Some(start) = pending {
        starts.push(start);
    }
    starts
}

/// The lines of `text` as YAML (and serde_yaml's line numbers) count them:
/// a line ends at `\r\n`, `\n` or a lone `\r`.
fn yaml_lines(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = Some(text);
    std::iter::from_fn(move || {
        let current = rest?;
        match current.find(['\r', '\n']) {
            Some(end) => {
                let after = if current[end..].starts_with("\r\n") {
                    end + 2
                } else {
                    end + 1
                };
                rest = (after < current.len()).then(|| &current[after..]);
                Some(&current[..end])
            }
            None => {
                rest = None;
                (!current.is_empty()).then_some(current)
            }
        }
    })
}

fn is_blank_or_comment(line: &str) -> bool {
    let t = line.trim();
    t.is_empty() || t.starts_with('#') || t == "---"
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "\
apiVersion: meshlet.dev/v1alpha1
kind: Service
metadata: {name: orders}
spec:
  endpoints:
    - address: 127.0.0.1:8081
      labels: {version: v1}
    - address: 127.0.0.1:8082
---
apiVersion: meshlet.dev/v1alpha1
kind: Service
metadata:
  name: inventory
  namespace: shop
spec: {}
---
";

    fn check_err(text: &str, expect: &str) {
        let err = parse_documents("f.yaml", text).expect_err("should be rejected");
        assert_eq!(err.to_string(), expect);
    }

    #[test]
    fn parses_multiple_documents() {
        let resources = parse_documents("f.yaml", GOOD).unwrap();
        assert_eq!(resources.len(), 2);
        let Resource::Service(orders) = &resources[0] else {
            panic!("not a Service")
        };
        assert_eq!(orders.metadata.name, "orders");
        assert_eq!(orders.metadata.namespace, "default");
        assert_eq!(orders.spec.endpoints.len(), 2);
        assert_eq!(orders.spec.endpoints[0].labels["version"], "v1");
        assert_eq!(resources[1].metadata().namespace, "shop");
    }

    #[test]
    fn unknown_field_names_line_column_and_path() {
        let text = GOOD.replace("      labels: {version: v1}", "      lables: {version: v1}");
        let err = parse_documents("f.yaml", &text).unwrap_err();
        assert_eq!(err.document, 1);
        assert_eq!(err.line, Some(7));
        assert_eq!(err.field, "spec.endpoints[0].lables");
        assert!(err.message.starts_with("unknown field `lables`"), "{err}");
    }

    #[test]
    fn bad_address_is_located() {
        let text = GOOD.replace("127.0.0.1:8082", "not-an-address");
        let err = parse_documents("f.yaml", &text).unwrap_err();
        assert_eq!((err.document, err.line), (1, Some(8)));
        assert_eq!(err.field, "spec.endpoints[1].address");
    }

    #[test]
    fn semantic_errors_name_document_start() {
        let text = GOOD.replace("name: inventory", "name: Inventory_1");
        check_err(
            &text,
            "f.yaml: document 2, line 10: field `metadata.name`: \"Inventory_1\" is not a valid name: \
             use 1-63 lower-case letters, digits or '-', starting and ending with a letter or digit",
        );
    }

    #[test]
    fn documents_separated_after_bare_carriage_returns_are_located() {
        // YAML ends a line at a lone CR as well; the document that starts
        // after `\r---\n` is still found, and its line counted the same way
        // (found by the property test below: it had no line at all).
        let text = "apiVersion: meshlet.dev/v1alpha1\nkind: Service\nmetadata: {name: a}\nspec: {endpoints: []}\n\r---\r\napiVersion: v9\rkind: Service\nmetadata: {name: b}\nspec: {endpoints: []}\n";
        check_err(
            text,
            "f.yaml: document 2, line 7: field `apiVersion`: unsupported apiVersion \"v9\"; expected \"meshlet.dev/v1alpha1\"",
        );
        assert_eq!(
            yaml_lines("a\r\nb\rc\n\nd").collect::<Vec<_>>(),
            ["a", "b", "c", "", "d"]
        );
        assert_eq!(yaml_lines("a\n").count(), 1);
        assert_eq!(yaml_lines("").count(), 0);
    }

    #[test]
    fn unknown_kind_and_version_and_duplicates() {
        check_err(
            "apiVersion: meshlet.dev/v1alpha1\nkind: Pod\nmetadata: {name: a}\nspec: {}\n",
            "f.yaml: document 1, line 1: field `kind`: unknown kind \"Pod\"; this release knows Service, HealthCheckPolicy, RateLimitPolicy, CircuitBreakerPolicy, RetryPolicy, TimeoutPolicy, TrafficSplit, TracingPolicy, MTLSPolicy, AuthorizationPolicy, Route, FaultInjectionPolicy",
        );
        check_err(
            "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {}\n",
            "f.yaml: document 1, line 1: field `apiVersion`: unsupported apiVersion \"v1\"; expected \"meshlet.dev/v1alpha1\"",
        );
        let twice =
            "apiVersion: meshlet.dev/v1alpha1\nkind: Service\nmetadata: {name: a}\nspec: {}\n";
        let err = parse_documents("f.yaml", &format!("{twice}---\n{twice}")).unwrap_err();
        assert_eq!(err.document, 2);
        assert!(err.message.contains("defined twice"));
    }

    #[test]
    fn health_check_policy_defaults_and_checks() {
        let head =
            "apiVersion: meshlet.dev/v1alpha1\nkind: HealthCheckPolicy\nmetadata: {name: h}\n";
        let resources = parse_documents(
            "f.yaml",
            &format!("{head}spec: {{targetRef: {{service: orders}}}}\n"),
        )
        .unwrap();
        let Resource::HealthCheckPolicy(policy) = &resources[0] else {
            panic!("not a HealthCheckPolicy")
        };
        assert_eq!(policy.spec, crate::HealthCheckSpec::defaults_for("orders"));
        assert_eq!(resources[0].target(), Some(("default", "orders")));

        let err = parse_documents(
            "f.yaml",
            &format!("{head}spec:\n  targetRef: {{service: orders}}\n  interval: 5 parsecs\n"),
        )
        .unwrap_err();
        // serde_yaml places errors raised while converting a value at the
        // enclosing mapping; the field path names the value exactly.
        assert_eq!(err.field, "spec.interval", "{err}");
        assert!(err.message.contains("invalid duration"), "{err}");
        for (spec, field) in [
            ("interval: 500000000000y", "spec.interval"),
            ("timeout: 0s", "spec.timeout"),
            ("unhealthyThreshold: 0", "spec.unhealthyThreshold"),
            ("path: health", "spec.path"),
        ] {
            let text = format!("{head}spec:\n  targetRef: {{service: orders}}\n  {spec}\n");
            let err = parse_documents("f.yaml", &text).unwrap_err();
            assert_eq!(err.field, field, "{spec}: {err}");
        }
    }

    #[test]
    fn example_policies_parse() {
        let text = include_str!("../../examples/policies/orders.yaml");
        let resources = parse_documents("orders.yaml", text).unwrap();
        let kinds: Vec<&str> = resources.iter().map(Resource::kind).collect();
        assert_eq!(
            kinds,
            [
                "RateLimitPolicy",
                "RateLimitPolicy",
                "CircuitBreakerPolicy",
                "RetryPolicy",
                "TimeoutPolicy",
                "TrafficSplit",
                "TracingPolicy"
            ]
        );
        assert!(resources
            .iter()
            .all(|r| r.target() == Some(("default", "orders"))));
        // Round trip through the control plane's JSON.
        let json = serde_json::to_string(&resources).unwrap();
        let back: Vec<Resource> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, resources);
        let health = include_str!("../../examples/policies/health-checks.yaml");
        assert_eq!(
            parse_documents("health-checks.yaml", health).unwrap().len(),
            3
        );
        for (name, text) in [
            (
                "orders-canary.yaml",
                include_str!("../../examples/policies/demo/orders-canary.yaml"),
            ),
            (
                "inventory-limit.yaml",
                include_str!("../../examples/policies/demo/inventory-limit.yaml"),
            ),
            (
                "orders-breaker.yaml",
                include_str!("../../examples/policies/demo/orders-breaker.yaml"),
            ),
        ] {
            assert_eq!(parse_documents(name, text).unwrap().len(), 1, "{name}");
        }
    }

    #[test]
    fn policy_errors_name_the_field() {
        let doc = |kind: &str, spec: &str| {
            format!("apiVersion: meshlet.dev/v1alpha1\nkind: {kind}\nmetadata: {{name: p}}\nspec:\n  targetRef: {{service: orders}}\n{spec}")
        };
        for (kind, spec, field, message) in [
            (
                "RateLimitPolicy",
                "  tokenBucket: {capacity: 0, refillPerSecond: 1}\n",
                "spec.tokenBucket.capacity",
                "at least 1",
            ),
            ("RateLimitPolicy", "", "spec.tokenBucket", "missing"),
            (
                "RateLimitPolicy",
                "  slidingWindow: {requests: 5, window: 1m}\n  key: user\n",
                "spec.key",
                "invalid key",
            ),
            (
                "RateLimitPolicy",
                "  slidingWindow: {requests: 5, window: 1m}\n  scope: cluster\n",
                "spec.scope",
                "unknown variant",
            ),
            (
                "CircuitBreakerPolicy",
                "  openDuration: soon\n",
                "spec.openDuration",
                "invalid duration",
            ),
            (
                "CircuitBreakerPolicy",
                "  failureOn: [4xx]\n",
                "spec.failureOn[0]",
                "unknown variant",
            ),
            (
                "RetryPolicy",
                "  attempts: 0\n",
                "spec.attempts",
                "between 1 and 10",
            ),
            (
                "RetryPolicy",
                "  match: {methods: [get]}\n",
                "spec.match.methods[0]",
                "upper-case",
            ),
            ("TimeoutPolicy", "", "spec.request", "give request"),
            (
                "TrafficSplit",
                "  splits: [{labels: {version: v1}, weight: 0}]\n",
                "spec.splits",
                "more than 0",
            ),
            (
                "TrafficSplit",
                "  splitz: []\n",
                "spec.splitz",
                "unknown field",
            ),
            (
                "TracingPolicy",
                "  samplingRatio: 1.5\n",
                "spec.samplingRatio",
                "from 0.0 to 1.0",
            ),
            (
                "TracingPolicy",
                "  sampleRate: 0.5\n",
                "spec.sampleRate",
                "unknown field",
            ),
        ] {
            let err = parse_documents("p.yaml", &doc(kind, spec)).unwrap_err();
            assert_eq!(err.field, field, "{kind} {spec:?}: {err}");
            assert!(err.message.contains(message), "{kind} {spec:?}: {err}");
        }
        let err = parse_documents(
            "p.yaml",
            "apiVersion: meshlet.dev/v1alpha1\nkind: TimeoutPolicy\nmetadata: {name: p}\nspec: {targetRef: {service: Orders}, request: 1s}\n",
        )
        .unwrap_err();
        assert_eq!(err.field, "spec.targetRef.service", "{err}");
    }

    #[test]
    fn syntax_error_is_located() {
        let err = parse_documents("f.yaml", "kind: Service\nmetadata: {name: [\n").unwrap_err();
        assert_eq!(err.document, 1);
        assert!(err.line.is_some(), "{err}");
    }

    #[test]
    fn empty_file_is_empty() {
        assert!(parse_documents("f.yaml", "").unwrap().is_empty());
        assert!(parse_documents("f.yaml", "# nothing\n").unwrap().is_empty());
    }

    /// The YAML parser's fuzz targets: proptest, on stable Rust (nightly and
    /// `cargo fuzz` are not on the CI machine). `PROPTEST_CASES` sets the
    /// number of cases for a long run by hand; the default keeps CI short.
    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn config() -> ProptestConfig {
            let cases = std::env::var("PROPTEST_CASES")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(500);
            ProptestConfig {
                cases,
                max_shrink_iters: 4_096,
                failure_persistence: None,
                ..ProptestConfig::default()
            }
        }

        /// A valid file of several documents of different kinds.
        const SEED: &str = "apiVersion: meshlet.dev/v1alpha1\nkind: Service\nmetadata:\n  name: orders\n  labels: {team: a}\nspec:\n  endpoints:\n    - address: 127.0.0.1:8080\n    - address: 127.0.0.1:8081\n---\napiVersion: meshlet.dev/v1alpha1\nkind: Service\nmetadata: {name: users}\nspec:\n  endpoints: []\n---\n# a comment\napiVersion: meshlet.dev/v1alpha1\nkind: Service\nmetadata:\n  name: \"billing\"\nspec:\n  endpoints:\n    - address: &a 10.0.0.1:80\n";

        /// One edit of a YAML text: a character or a YAML-significant
        /// snippet inserted, a span deleted, a line duplicated or
        /// re-indented.
        #[derive(Debug, Clone)]
        enum Edit {
            Insert(prop::sample::Index, &'static str),
            Delete(prop::sample::Index, usize),
            DuplicateLine(prop::sample::Index),
            Indent(prop::sample::Index, bool),
        }

        fn edit() -> impl Strategy<Value = Edit> {
            let snippets = prop::sample::select(vec![
                ":",
                " ",
                "\n",
                "-",
                "---\n",
                "...\n",
                "\t",
                "{",
                "}",
                "[",
                "]",
                "&x ",
                "*x",
                "*a",
                "!!binary ",
                "!tag ",
                "'",
                "\"",
                "#",
                "|\n",
                ">\n",
                "? ",
                "%YAML 1.2\n",
                "<<: *a\n",
                "kind: Service\n",
                "kind: Nope\n",
                "apiVersion: v9\n",
                "metadata: {}\n",
                "\u{feff}",
                "\0",
                "\r",
                "é",
                "9999999999999999999999",
                "~",
                "null",
            ]);
            prop_oneof![
                (any::<prop::sample::Index>(), snippets).prop_map(|(i, s)| Edit::Insert(i, s)),
                (any::<prop::sample::Index>(), 1usize..12).prop_map(|(i, n)| Edit::Delete(i, n)),
                any::<prop::sample::Index>().prop_map(Edit::DuplicateLine),
                (any::<prop::sample::Index>(), any::<bool>()).prop_map(|(i, d)| Edit::Indent(i, d)),
            ]
        }

        fn apply(text: &mut String, edit: &Edit) {
            let boundaries: Vec<usize> = (0..=text.len())
                .filter(|&i| text.is_char_boundary(i))
                .collect();
            let line_starts: Vec<usize> = std::iter::once(0)
                .chain(text.match_indices('\n').map(|(i, _)| i + 1))
                .filter(|&i| i < text.len())
                .collect();
            match edit {
                Edit::Insert(at, snippet) => {
                    text.insert_str(boundaries[at.index(boundaries.len())], snippet)
                }
                Edit::Delete(at, n) => {
                    let from = at.index(boundaries.len());
                    let to = (from + n).min(boundaries.len() - 1);
                    text.replace_range(boundaries[from]..boundaries[to], "");
                }
                Edit::DuplicateLine(at) if !line_starts.is_empty() => {
                    let start = line_starts[at.index(line_starts.len())];
                    let end = text[start..]
                        .find('\n')
                        .map_or(text.len(), |e| start + e + 1);
                    let line = text[start..end].to_owned();
                    text.insert_str(start, &line);
                }
                Edit::Indent(at, deeper) if !line_starts.is_empty() => {
                    let start = line_starts[at.index(line_starts.len())];
                    if *deeper {
                        text.insert_str(start, "  ");
                    } else if text[start..].starts_with(' ') {
                        text.remove(start);
                    }
                }
                _ => {}
            }
        }

        proptest! {
            #![proptest_config(config())]

            /// Mutated valid files: never a panic; an error always names a
            /// document of the file and a line within it (or just past its
            /// end, for an error at end of input), and says so in its
            /// one-line message.
            #[test]
            fn mutated_documents_fail_with_a_document_and_line(
                edits in prop::collection::vec(edit(), 1..6),
            ) {
                let mut text = SEED.to_owned();
                for e in &edits {
                    apply(&mut text, e);
                }
                if let Err(err) = parse_documents("f.yaml", &text) {
                    let shown = err.to_string();
                    prop_assert!(err.document >= 1, "{shown}\n{text:?}");
                    // Documents are separated by `---` (or ended by `...`)
                    // lines; counting serde_yaml's documents would not end on
                    // a broken stream.
                    let all_lines: Vec<&str> = text.split(['\n', '\r']).collect();
                    // (YAML breaks lines at CR too.)
                    let documents = all_lines.iter().filter(|l| l.starts_with("---") || l.starts_with("...")).count() + 1;
                    prop_assert!(err.document <= documents + 1, "{shown}\n{text:?}");
                    let line = err.line.ok_or_else(|| TestCaseError::fail(format!("no line: {shown}\n{text:?}")))?;
                    prop_assert!(line >= 1 && line <= all_lines.len() + 1, "{shown}\n{text:?}");
                    let document_field = format!("document {}", err.document);
                    let line_field = format!("line {line}");
                    prop_assert!(shown.starts_with("f.yaml: document "), "{}", shown);
                    prop_assert!(shown.contains(&document_field) && shown.contains(&line_field), "{}", shown);
                }
            }

            /// Whatever the input, parsing returns resources or an error
            /// that names a document within the file; it never panics.
            #[test]
            fn arbitrary_text_never_panics(text in "(?s).{0,300}") {
                if let Err(err) = parse_documents("f.yaml", &text) {
                    prop_assert!(err.document >= 1);
                    prop_assert!(err.line.is_some(), "{}", err);
                }
            }

            /// Generated Service documents parse back to what was written.
            #[test]
            fn generated_services_round_trip(
                services in prop::collection::btree_map("[a-z][a-z0-9-]{0,10}[a-z0-9]", prop::collection::btree_set(1u16..65535, 0..4), 1..4)
            ) {
                let mut text = String::new();
                for (name, ports) in &services {
                    text += &format!("---\napiVersion: meshlet.dev/v1alpha1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  endpoints:\n");
                    for port in ports {
                        text += &format!("    - address: 127.0.0.1:{port}\n");
                    }
                    if ports.is_empty() {
                        text += "    []\n";
                    }
                }
                let resources = parse_documents("f.yaml", &text).map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(resources.len(), services.len());
                for (resource, (name, ports)) in resources.iter().zip(&services) {
                    let Resource::Service(doc) = resource else { panic!("not a Service") };
                    prop_assert_eq!(&doc.metadata.name, name);
                    let got: Vec<u16> = doc.spec.endpoints.iter().map(|e| e.address.port()).collect();
                    prop_assert_eq!(got, ports.iter().copied().collect::<Vec<_>>());
                }
            }
        }
    }
}
