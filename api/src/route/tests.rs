//! `Route` parsing and validation: the example of the contract parses and
//! renders back, each check names its field (and a line and column when
//! serde still knows them).

use crate::parse_documents;
use crate::resource::Resource;
use crate::route::{PathMatchType, RouteSpec, ValueMatchType};

const HEAD: &str = "apiVersion: meshlet.dev/v1alpha1\nkind: Route\nmetadata: {name: shop}\n";

const FULL: &str = "\
apiVersion: meshlet.dev/v1alpha1
kind: Route
metadata: {name: shop, namespace: default}
spec:
  parentRefs: [{gateway: edge}]
  hostnames: [shop.example.com, \"*.example.com\"]
  rules:
    - matches:
        - path: {type: PathPrefix, value: /api}
          headers: [{name: x-canary, value: \"true\", type: Exact}]
          queryParams: [{name: v, value: \"2\", type: Exact}]
          method: GET
      backends: [{service: orders, weight: 100, labels: {version: v2}}]
      filters:
        - requestHeaderModifier: {set: [{name: x-from, value: edge}], add: [{name: a, value: b}], remove: [x-debug]}
        - responseHeaderModifier: {set: [{name: x-served-by, value: orders}]}
        - urlRewrite: {hostname: orders.internal, pathPrefix: /}
        - requestMirror: {service: shadow, percent: 100}
      timeout: 2s
    - matches: [{path: {type: RegularExpression, value: \"/v[0-9]+/.*\"}}]
      filters:
        - requestRedirect: {scheme: https, hostname: h.example.com, path: /new, port: 443, statusCode: 302}
    - backends: [{service: frontend}]
";

fn route(text: &str) -> RouteSpec {
    let resources = parse_documents("r.yaml", text).unwrap_or_else(|e| panic!("{e}"));
    match resources.into_iter().next() {
        Some(Resource::Route(doc)) => doc.spec,
        other => panic!("not a Route: {other:?}"),
    }
}

fn spec(body: &str) -> String {
    format!("{HEAD}spec:\n{body}")
}

#[test]
fn the_contract_example_parses_with_defaults() {
    let spec = route(FULL);
    assert_eq!(spec.parent_refs[0].gateway.as_deref(), Some("edge"));
    assert_eq!(spec.hostnames, ["shop.example.com", "*.example.com"]);
    let rule = &spec.rules[0];
    let m = &rule.matches[0];
    assert_eq!(m.path.as_ref().unwrap().kind, PathMatchType::PathPrefix);
    assert_eq!(m.headers[0].kind, ValueMatchType::Exact);
    assert_eq!(m.method.as_deref(), Some("GET"));
    assert_eq!(rule.backends[0].weight, 100);
    assert_eq!(rule.timeout.unwrap().get().as_secs(), 2);
    assert_eq!(rule.filters.len(), 4);
    let redirect = spec.rules[1].filters[0].request_redirect.as_ref().unwrap();
    assert_eq!(redirect.status_code, 302);
    assert!(spec.rules[1].backends.is_empty(), "a redirect needs none");
    let default = &spec.rules[2].backends[0];
    assert_eq!(default.weight, 1, "weight defaults to 1");
    assert!(spec.rules[2].matches.is_empty());
}

#[test]
fn defaults_of_path_status_and_percent() {
    let spec = route(&spec(
        "  parentRefs: [{service: orders}]\n  rules:\n    - matches: [{path: {value: /a}}, {path: {type: Exact}}]\n      filters: [{requestMirror: {service: shadow}}, {requestRedirect: {path: /b}}]\n",
    ));
    let matches = &spec.rules[0].matches;
    assert_eq!(
        matches[0].path.as_ref().unwrap().kind,
        PathMatchType::PathPrefix
    );
    assert_eq!(matches[1].path.as_ref().unwrap().value, "/");
    let filters = &spec.rules[0].filters;
    assert_eq!(filters[0].request_mirror.as_ref().unwrap().percent, 100);
    assert_eq!(
        filters[1].request_redirect.as_ref().unwrap().status_code,
        301
    );
}

#[test]
fn renders_back_to_yaml_that_parses_to_the_same_route() {
    let resources = parse_documents("r.yaml", FULL).unwrap();
    let yaml = resources[0].to_yaml();
    assert!(yaml.contains("kind: Route"), "{yaml}");
    assert!(yaml.contains("type: RegularExpression"), "{yaml}");
    assert!(!yaml.contains('!'), "no YAML tags: {yaml}");
    let again = parse_documents("again.yaml", &yaml).unwrap();
    assert_eq!(again, resources);
    // And through the control plane's JSON.
    let json = serde_json::to_string(&resources).unwrap();
    let back: Vec<Resource> = serde_json::from_str(&json).unwrap();
    assert_eq!(back, resources);
}

#[test]
fn references_name_parents_backends_and_mirrors() {
    let spec = route(FULL);
    let refs: Vec<(&str, &str)> = spec
        .references()
        .iter()
        .map(|r| (r.role, r.service))
        .collect();
    assert_eq!(
        refs,
        [
            ("backend", "frontend"),
            ("backend", "orders"),
            ("gateway", "edge"),
            ("mirror", "shadow"),
        ]
    );
}

/// Errors found while reading (unknown fields, bad regexes): a line, a
/// column and the field path.
#[test]
fn read_errors_have_line_column_and_field() {
    struct Case {
        what: &'static str,
        from: &'static str,
        to: &'static str,
        field: &'static str,
        line: usize,
        message: &'static str,
    }
    let cases = [
        Case {
            what: "unknown field in a rule",
            from: "      timeout: 2s",
            to: "      timout: 2s",
            field: "spec.rules[0].timout",
            line: 19,
            message: "unknown field `timout`",
        },
        Case {
            what: "unknown field in a header match",
            from: "type: Exact}]\n          queryParams",
            to: "kind: Exact}]\n          queryParams",
            field: "spec.rules[0].matches[0].headers[0].kind",
            line: 10,
            message: "unknown field `kind`",
        },
        Case {
            what: "unknown path match type",
            from: "type: PathPrefix",
            to: "type: Prefix",
            field: "spec.rules[0].matches[0].path.type",
            line: 9,
            message: "unknown variant `Prefix`",
        },
        Case {
            what: "bad path regex",
            from: "/v[0-9]+/.*",
            to: "/v[0-9+/.*",
            field: "spec.rules[1].matches[0].path",
            line: 20,
            message: "invalid regular expression \"/v[0-9+/.*\"",
        },
        Case {
            what: "bad header regex",
            from: "value: \"true\", type: Exact",
            to: "value: \"(tru\", type: RegularExpression",
            field: "spec.rules[0].matches[0].headers[0]",
            line: 10,
            message: "invalid regular expression \"(tru\"",
        },
        Case {
            what: "unknown filter",
            from: "- requestMirror:",
            to: "- requestMirrors:",
            field: "spec.rules[0].filters[3].requestMirrors",
            line: 18,
            message: "unknown field `requestMirrors`",
        },
    ];
    for case in cases {
        assert!(FULL.contains(case.from), "{}: fixture", case.what);
        let text = FULL.replacen(case.from, case.to, 1);
        let err = parse_documents("r.yaml", &text).expect_err(case.what);
        assert_eq!(err.field, case.field, "{}: {err}", case.what);
        assert_eq!(err.line, Some(case.line), "{}: {err}", case.what);
        assert!(err.column.is_some(), "{}: {err}", case.what);
        assert!(
            err.message.starts_with(case.message),
            "{}: {err}",
            case.what
        );
    }
}

#[test]
fn a_huge_regex_is_refused_by_its_compiled_size() {
    let text = FULL.replace("/v[0-9]+/.*", "(\\\\w{1,100}){1,100}");
    let err = parse_documents("r.yaml", &text).unwrap_err();
    assert_eq!(err.field, "spec.rules[1].matches[0].path", "{err}");
    assert!(err.message.contains("MAX_REGEX_SIZE"), "{err}");
}

/// Semantic checks (after reading, with the document's line; the path
/// checks while reading, with their own): the field path.
#[test]
fn semantic_errors_name_the_field() {
    let cases: &[(&str, &str, &str)] = &[
        ("  parentRefs: []\n  rules: [{backends: [{service: a}]}]\n", "spec.parentRefs", "at least one parent"),
        ("  parentRefs: [{gateway: a, service: b}]\n  rules: [{backends: [{service: a}]}]\n", "spec.parentRefs[0]", "exactly one of"),
        ("  parentRefs: [{}]\n  rules: [{backends: [{service: a}]}]\n", "spec.parentRefs[0]", "exactly one of"),
        ("  parentRefs: [{service: Orders}]\n  rules: [{backends: [{service: a}]}]\n", "spec.parentRefs[0].service", "not a valid name"),
        ("  parentRefs: [{service: a}]\n  rules: []\n", "spec.rules", "at least one rule"),
        ("  parentRefs: [{service: a}]\n  rules: [{}]\n", "spec.rules[0].backends", "at least one backend"),
        ("  parentRefs: [{service: a}]\n  hostnames: [\"shop.*.com\"]\n  rules: [{backends: [{service: a}]}]\n", "spec.hostnames[0]", "not a host name"),
        ("  parentRefs: [{service: a}]\n  hostnames: [Shop.example.com]\n  rules: [{backends: [{service: a}]}]\n", "spec.hostnames[0]", "not a host name"),
        ("  parentRefs: [{service: a}]\n  rules: [{backends: [{service: a.b}]}]\n", "spec.rules[0].backends[0].service", "not a valid name"),
        ("  parentRefs: [{service: a}]\n  rules: [{backends: [{service: a, labels: {version: \"v 2\"}}]}]\n", "spec.rules[0].backends[0].labels.version", "not valid"),
        ("  parentRefs: [{service: a}]\n  rules: [{backends: [{service: a, weight: 2000000}]}]\n", "spec.rules[0].backends[0].weight", "MAX_ROUTE_WEIGHT"),
        ("  parentRefs: [{service: a}]\n  rules: [{matches: [{path: {value: api}}], backends: [{service: a}]}]\n", "spec.rules[0].matches[0].path", "must start with '/'"),
        ("  parentRefs: [{service: a}]\n  rules: [{matches: [{method: get}], backends: [{service: a}]}]\n", "spec.rules[0].matches[0].method", "upper-case"),
        ("  parentRefs: [{service: a}]\n  rules: [{matches: [{headers: [{name: \"x y\", value: a}]}], backends: [{service: a}]}]\n", "spec.rules[0].matches[0].headers[0].name", "not a header name"),
        ("  parentRefs: [{service: a}]\n  rules: [{backends: [{service: a}], filters: [{}]}]\n", "spec.rules[0].filters[0]", "exactly one of"),
        ("  parentRefs: [{service: a}]\n  rules: [{backends: [{service: a}], filters: [{urlRewrite: {pathPrefix: /, fullPath: /x}}]}]\n", "spec.rules[0].filters[0].urlRewrite", "at most one"),
        ("  parentRefs: [{service: a}]\n  rules: [{backends: [{service: a}], filters: [{urlRewrite: {}}]}]\n", "spec.rules[0].filters[0].urlRewrite", "give `hostname`"),
        ("  parentRefs: [{service: a}]\n  rules: [{backends: [{service: a}], filters: [{urlRewrite: {hostname: \"*.x.com\"}}]}]\n", "spec.rules[0].filters[0].urlRewrite.hostname", "wildcard"),
        ("  parentRefs: [{service: a}]\n  rules: [{filters: [{requestRedirect: {statusCode: 200}}]}]\n", "spec.rules[0].filters[0].requestRedirect.statusCode", "not one of"),
        ("  parentRefs: [{service: a}]\n  rules: [{filters: [{requestRedirect: {scheme: ftp}}]}]\n", "spec.rules[0].filters[0].requestRedirect.scheme", "not http or https"),
        ("  parentRefs: [{service: a}]\n  rules: [{filters: [{requestRedirect: {path: /a}}, {urlRewrite: {pathPrefix: /}}]}]\n", "spec.rules[0].filters", "cannot be combined"),
        ("  parentRefs: [{service: a}]\n  rules: [{backends: [{service: a}], filters: [{requestMirror: {service: s, percent: 101}}]}]\n", "spec.rules[0].filters[0].requestMirror.percent", "between 0 and 100"),
        ("  parentRefs: [{service: a}]\n  rules: [{backends: [{service: a}], filters: [{requestHeaderModifier: {set: [{name: a, value: b}]}}, {requestHeaderModifier: {}}]}]\n", "spec.rules[0].filters[1]", "twice"),
        ("  parentRefs: [{service: a}]\n  rules: [{backends: [{service: a}], filters: [{requestHeaderModifier: {set: [{name: a, value: \"b\\n\"}]}}]}]\n", "spec.rules[0].filters[0].requestHeaderModifier.set[0].value", "not a header value"),
        ("  parentRefs: [{service: a}]\n  rules: [{backends: [{service: a}], timeout: 0s}]\n", "spec.rules[0].timeout", "greater than 0"),
        // Attack: a header modifier re-adding what the proxy strips or owns
        // (framing, hop-by-hop, Host) would let a Route break framing.
        ("  parentRefs: [{service: a}]\n  rules: [{backends: [{service: a}], filters: [{requestHeaderModifier: {set: [{name: Content-Length, value: \"5\"}]}}]}]\n", "spec.rules[0].filters[0].requestHeaderModifier.set[0].name", "framing"),
        ("  parentRefs: [{service: a}]\n  rules: [{backends: [{service: a}], filters: [{requestHeaderModifier: {add: [{name: transfer-encoding, value: chunked}]}}]}]\n", "spec.rules[0].filters[0].requestHeaderModifier.add[0].name", "framing"),
        ("  parentRefs: [{service: a}]\n  rules: [{backends: [{service: a}], filters: [{requestHeaderModifier: {set: [{name: connection, value: close}]}}]}]\n", "spec.rules[0].filters[0].requestHeaderModifier.set[0].name", "hop-by-hop"),
        ("  parentRefs: [{service: a}]\n  rules: [{backends: [{service: a}], filters: [{requestHeaderModifier: {remove: [host]}}]}]\n", "spec.rules[0].filters[0].requestHeaderModifier.remove[0]", "urlRewrite"),
        ("  parentRefs: [{service: a}]\n  rules: [{backends: [{service: a}], filters: [{responseHeaderModifier: {set: [{name: content-length, value: \"0\"}]}}]}]\n", "spec.rules[0].filters[0].responseHeaderModifier.set[0].name", "framing"),
        ("  parentRefs: [{service: a}]\n  rules: [{backends: [{service: a}], filters: [{responseHeaderModifier: {add: [{name: upgrade, value: websocket}]}}]}]\n", "spec.rules[0].filters[0].responseHeaderModifier.add[0].name", "hop-by-hop"),
    ];
    for (body, field, message) in cases {
        let err = parse_documents("r.yaml", &spec(body)).expect_err(body);
        assert_eq!(&err.field, field, "{body}: {err}");
        assert!(err.line.is_some(), "a line: {err}");
        assert!(err.message.contains(message), "{body}: {err}");
    }
}

#[test]
fn list_limits_are_enforced() {
    let rules: String = (0..65)
        .map(|_| "    - backends: [{service: a}]\n")
        .collect();
    let err = parse_documents(
        "r.yaml",
        &spec(&format!(
            "  parentRefs: [{{service: a}}]\n  rules:\n{rules}"
        )),
    )
    .unwrap_err();
    assert_eq!(err.field, "spec.rules");
    assert!(err.message.contains("MAX_ROUTE_RULES"), "{err}");
    let headers: String = (0..17)
        .map(|i| format!("{{name: h{i}, value: v}},"))
        .collect();
    let err = parse_documents(
        "r.yaml",
        &spec(&format!(
            "  parentRefs: [{{service: a}}]\n  rules: [{{matches: [{{headers: [{headers}]}}], backends: [{{service: a}}]}}]\n"
        )),
    )
    .unwrap_err();
    assert_eq!(err.field, "spec.rules[0].matches[0].headers", "{err}");
    assert!(err.message.contains("MAX_ROUTE_ITEMS"), "{err}");
}

#[test]
fn summary_says_parents_hosts_and_where_requests_go() {
    let resources = parse_documents("r.yaml", FULL).unwrap();
    assert_eq!(
        crate::display::summary(&resources[0]),
        "gateway/edge shop.example.com,*.example.com: 3 rules → orders (version=v2), \
         mirror shadow, redirect 302, frontend"
    );
    assert_eq!(crate::display::target(&resources[0]), "-");
}
