//! Route matching and precedence (table-driven), backend choice, filters
//! and redirects.

use std::sync::Arc;

use meshlet_api::mesh::MeshState;

use super::*;
use crate::control::snapshot::{Own, Snapshot};
use crate::settings::Limits;

const HEAD: &str = "apiVersion: meshlet.dev/v1alpha1\nkind: Route\n";

/// A route document: `name`, its `hostnames` (YAML flow list or empty)
/// and its rules (YAML, indented under `rules:`). Every rule's backend
/// names the rule so a test can tell which was chosen.
fn route(name: &str, hostnames: &str, rules: &str) -> String {
    format!(
        "---\n{HEAD}metadata: {{name: {name}}}\nspec:\n  parentRefs: [{{gateway: edge}}]\n  hostnames: [{hostnames}]\n  rules:\n{rules}"
    )
}

fn table(docs: &str) -> HttpRoutes {
    let resources = meshlet_api::parse_documents("t.yaml", docs).unwrap_or_else(|e| panic!("{e}"));
    HttpRoutes::build(
        &resources,
        "default",
        Parent::Gateway("edge"),
        &|_, _| None,
        &Metrics::new("edge"),
    )
    .expect("routes for the gateway")
}

fn request(method: &str, uri: &str, headers: &[(&str, &str)]) -> Request<()> {
    let mut builder = Request::builder().method(method).uri(uri);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder.body(()).unwrap()
}

/// Which backend (`route/rule` spelled as the backend's service) a
/// request gets, or `-` for none.
fn chosen(
    table: &HttpRoutes,
    host: &str,
    method: &str,
    uri: &str,
    headers: &[(&str, &str)],
) -> String {
    let request = request(method, uri, headers);
    match table.select(Some(host), &request) {
        Some(selected) => selected
            .backend
            .map_or_else(|| "redirect".to_owned(), |b| b.service.clone()),
        None => "-".to_owned(),
    }
}

fn rule(backend: &str, matches: &str) -> String {
    format!("    - matches: [{matches}]\n      backends: [{{service: {backend}}}]\n")
}

#[test]
fn path_prefix_matches_whole_segments() {
    let t = table(&route(
        "r",
        "",
        &rule("api", "{path: {type: PathPrefix, value: /api}}"),
    ));
    for (path, want) in [
        ("/api", "api"),
        ("/api/", "api"),
        ("/api/x/y", "api"),
        ("/api?x=1", "api"),
        ("/apix", "-"),
        ("/ap", "-"),
        ("/", "-"),
        ("/v1/api", "-"),
    ] {
        assert_eq!(chosen(&t, "h", "GET", path, &[]), want, "{path}");
    }
    let t = table(&route(
        "r",
        "",
        &rule("api", "{path: {type: PathPrefix, value: /api/}}"),
    ));
    assert_eq!(
        chosen(&t, "h", "GET", "/api", &[]),
        "api",
        "a trailing / is ignored"
    );
    assert_eq!(chosen(&t, "h", "GET", "/apix", &[]), "-");
    let t = table(&route("r", "", "    - backends: [{service: all}]\n"));
    assert_eq!(
        chosen(&t, "h", "GET", "/anything", &[]),
        "all",
        "no matches: everything"
    );
}

#[test]
fn exact_and_regex_paths_match_the_whole_path() {
    let t = table(&route(
        "r",
        "",
        &(rule("exact", "{path: {type: Exact, value: /a}}")
            + &rule(
                "regex",
                "{path: {type: RegularExpression, value: \"/v[0-9]+/.*\"}}",
            )),
    ));
    for (path, want) in [
        ("/a", "exact"),
        ("/a/", "-"),
        ("/a/b", "-"),
        ("/v2/x", "regex"),
        ("/v2/", "regex"),
        ("/x/v2/x", "-"),
        ("/v2", "-"),
    ] {
        assert_eq!(chosen(&t, "h", "GET", path, &[]), want, "{path}");
    }
}

/// The precedence of the contract, one pair of competing rules per row:
/// the first rule is listed second in the route (or in a route sorted
/// later) and must still win.
#[test]
fn precedence_table() {
    struct Case {
        what: &'static str,
        docs: String,
        host: &'static str,
        uri: &'static str,
        method: &'static str,
        headers: &'static [(&'static str, &'static str)],
        want: &'static str,
    }
    let case = |what, docs: String, uri, want| Case {
        what,
        docs,
        host: "shop.example.com",
        uri,
        method: "GET",
        headers: &[],
        want,
    };
    let cases = vec![
        case(
            "exact host beats wildcard beats no host",
            route("a", "", &rule("none", ""))
                + &route("b", "\"*.example.com\"", &rule("wild", ""))
                + &route("c", "shop.example.com", &rule("exact", "")),
            "/",
            "exact",
        ),
        case(
            "longer wildcard first",
            route("a", "\"*.com\"", &rule("short", ""))
                + &route("b", "\"*.example.com\"", &rule("long", "")),
            "/",
            "long",
        ),
        case(
            "a host tier without a matching rule falls to the next",
            route(
                "a",
                "shop.example.com",
                &rule("exact", "{path: {value: /only}}"),
            ) + &route("b", "", &rule("any", "")),
            "/other",
            "any",
        ),
        case(
            "Exact path beats a longer prefix",
            route(
                "a",
                "",
                &(rule("prefix", "{path: {value: /api/orders/x}}")
                    + &rule("exact", "{path: {type: Exact, value: /api/orders/x}}")),
            ),
            "/api/orders/x",
            "exact",
        ),
        case(
            "longest prefix first",
            route(
                "a",
                "",
                &(rule("short", "{path: {value: /api}}")
                    + &rule("long", "{path: {value: /api/orders}}")),
            ),
            "/api/orders/1",
            "long",
        ),
        case(
            "a prefix beats a regex",
            route(
                "a",
                "",
                &(rule(
                    "regex",
                    "{path: {type: RegularExpression, value: \"/api/.*\"}}",
                ) + &rule("prefix", "{path: {value: /}}")),
            ),
            "/api/x",
            "prefix",
        ),
        case(
            "a method beats none",
            route(
                "a",
                "",
                &(rule("any", "{path: {value: /api}}")
                    + &rule("get", "{path: {value: /api}, method: GET}")),
            ),
            "/api",
            "get",
        ),
        Case {
            headers: &[("a", "1"), ("b", "2")],
            ..case(
                "more header matches first",
                route(
                    "a",
                    "",
                    &(rule("one", "{headers: [{name: a, value: \"1\"}]}")
                        + &rule(
                            "two",
                            "{headers: [{name: a, value: \"1\"}, {name: b, value: \"2\"}]}",
                        )),
                ),
                "/",
                "two",
            )
        },
        case(
            "more query matches first",
            route(
                "a",
                "",
                &(rule("one", "{queryParams: [{name: a, value: \"1\"}]}")
                    + &rule(
                        "two",
                        "{queryParams: [{name: a, value: \"1\"}, {name: b, value: \"2\"}]}",
                    )),
            ),
            "/?a=1&b=2",
            "two",
        ),
        case(
            "then route name order",
            route("zeta", "", &rule("zeta", "")) + &route("alpha", "", &rule("alpha", "")),
            "/",
            "alpha",
        ),
        case(
            "then rule order",
            route("a", "", &(rule("first", "") + &rule("second", ""))),
            "/",
            "first",
        ),
    ];
    for c in cases {
        let t = table(&c.docs);
        assert_eq!(
            chosen(&t, c.host, c.method, c.uri, c.headers),
            c.want,
            "{}",
            c.what
        );
    }
}

#[test]
fn hosts_wildcards_ports_and_case() {
    let t = table(
        &(route("a", "shop.example.com", &rule("exact", ""))
            + &route("b", "\"*.example.com\"", &rule("wild", ""))),
    );
    for (host, want) in [
        ("shop.example.com", "exact"),
        ("SHOP.Example.com", "exact"),
        ("shop.example.com:8080", "exact"),
        ("shop.example.com.", "exact"),
        ("a.example.com", "wild"),
        ("a.b.example.com", "wild"),
        ("example.com", "-"),
        ("example.org", "-"),
        // Attack: case and a trailing dot together (both allowed alone).
        ("SHOP.EXAMPLE.COM.", "exact"),
        ("A.Example.COM.:443", "wild"),
        // Attack: an empty label is no label for a wildcard to stand for.
        (".example.com", "-"),
        ("x..example.com", "-"),
        ("..example.com", "-"),
    ] {
        assert_eq!(chosen(&t, host, "GET", "/", &[]), want, "{host}");
    }
    // Without an explicit host: the URI's authority, else `Host`.
    let by_uri = request("GET", "http://shop.example.com/", &[]);
    assert!(t.select(None, &by_uri).is_some());
    let by_header = request("GET", "/", &[("host", "x.example.com:80")]);
    assert_eq!(
        t.select(None, &by_header).unwrap().backend.unwrap().service,
        "wild"
    );
    let none = request("GET", "/", &[]);
    assert!(t.select(None, &none).is_none());
}

#[test]
fn headers_query_and_method_matches() {
    let t = table(&route(
        "r",
        "",
        &(rule(
            "canary",
            "{headers: [{name: X-Canary, value: \"true\"}], queryParams: [{name: v, value: \"2\"}], method: POST}",
        ) + &rule("regex", "{headers: [{name: x-user, value: \"u[0-9]+\", type: RegularExpression}]}")),
    ));
    type Case<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)], &'a str);
    let cases: &[Case] = &[
        ("POST", "/?v=2", &[("x-canary", "true")], "canary"),
        (
            "POST",
            "/?a=b&v=2",
            &[("x-canary", "false"), ("x-canary", "true")],
            "canary",
        ),
        ("GET", "/?v=2", &[("x-canary", "true")], "-"),
        ("POST", "/?v=3", &[("x-canary", "true")], "-"),
        ("POST", "/?v=2", &[("x-canary", "TRUE")], "-"),
        ("POST", "/?v=2", &[], "-"),
        ("GET", "/", &[("x-user", "u42")], "regex"),
        ("GET", "/", &[("x-user", "xu42")], "-"),
        ("GET", "/", &[("x-user", "u42x")], "-"),
    ];
    for (method, uri, headers, want) in cases {
        assert_eq!(
            chosen(&t, "h", method, uri, headers),
            *want,
            "{method} {uri} {headers:?}"
        );
    }
}

#[test]
fn filters_rewrite_and_edit_headers() {
    let t = table(&route(
        "r",
        "",
        "    - matches: [{path: {value: /api}}]\n      backends: [{service: a}]\n      filters:\n        - requestHeaderModifier: {set: [{name: x-from, value: edge}], add: [{name: x-add, value: \"2\"}], remove: [x-debug]}\n        - responseHeaderModifier: {set: [{name: x-served, value: r}], remove: [server]}\n        - urlRewrite: {hostname: orders.internal, pathPrefix: /v2}\n    - matches: [{path: {type: Exact, value: /old}}]\n      backends: [{service: a}]\n      filters: [{urlRewrite: {fullPath: /new}}]\n",
    ));
    for (uri, want_path) in [
        ("/api", "/v2"),
        ("/api/", "/v2"),
        ("/api/x?q=1", "/v2/x?q=1"),
        ("/old?q=1", "/new?q=1"),
    ] {
        let mut req = request(
            "GET",
            uri,
            &[
                ("host", "shop"),
                ("x-debug", "1"),
                ("x-from", "app"),
                ("x-add", "1"),
            ],
        );
        let selected = t.select(Some("shop"), &req).expect(uri);
        selected.apply_request(&mut req);
        assert_eq!(req.uri().to_string(), want_path, "{uri}");
        if uri.starts_with("/api") {
            assert_eq!(req.headers()["host"], "orders.internal");
            assert_eq!(req.headers()["x-from"], "edge");
            assert!(!req.headers().contains_key("x-debug"));
            let added: Vec<_> = req.headers().get_all("x-add").iter().collect();
            assert_eq!(added, ["1", "2"]);
            let mut response = Response::builder()
                .header("server", "app")
                .body(ProxyBody::empty())
                .unwrap();
            selected.apply_response(&mut response);
            assert_eq!(response.headers()["x-served"], "r");
            assert!(!response.headers().contains_key("server"));
        }
    }
    // An absolute URI gets the new authority too.
    let mut req = request("GET", "http://shop:8080/api/x", &[]);
    t.select(Some("shop"), &req)
        .unwrap()
        .apply_request(&mut req);
    assert_eq!(req.uri().to_string(), "http://orders.internal/v2/x");
    // The rewrite to `/` of the contract.
    assert_eq!(replace_prefix("/", "/x"), "/x");
    assert_eq!(replace_prefix("/", ""), "/");
    assert_eq!(replace_prefix("/v2/", "/x"), "/v2/x");
}

#[test]
fn redirects_keep_what_they_do_not_replace() {
    let t = table(&route(
        "r",
        "",
        "    - matches: [{path: {value: /secure}}]\n      filters: [{requestRedirect: {scheme: https}}]\n    - matches: [{path: {value: /moved}}]\n      filters: [{requestRedirect: {hostname: new.example.com, path: /here, port: 8443, statusCode: 308}}]\n",
    ));
    let cases = [
        (
            "http://shop:8080/secure/x?q=1",
            301,
            "https://shop/secure/x?q=1",
        ),
        ("http://shop:443/secure", 301, "https://shop/secure"),
        (
            "http://shop:8080/moved?q=1",
            308,
            "http://new.example.com:8443/here?q=1",
        ),
    ];
    for (uri, status, location) in cases {
        let req = request("GET", uri, &[]);
        let selected = t.select(None, &req).expect(uri);
        assert!(selected.backend.is_none());
        let response = selected.redirect(&req, "http").expect("a redirect");
        assert_eq!(response.status().as_u16(), status, "{uri}");
        assert_eq!(response.headers()["location"], location, "{uri}");
    }
    // Attack: an IPv6 literal in `Host`, with and without a port, stays a
    // bracketed literal in the Location (it was cut at its first colon).
    for (host, location) in [
        ("[::1]", "https://[::1]/secure"),
        ("[::1]:8443", "https://[::1]:8443/secure"),
        ("[2001:db8::7]:443", "https://[2001:db8::7]/secure"),
    ] {
        let req = request("GET", "/secure", &[("host", host)]);
        let selected = t.select(None, &req).expect(host);
        let response = selected.redirect(&req, "https").expect("a redirect");
        assert_eq!(response.headers()["location"], location, "{host}");
    }
}

/// Mesh routing through a snapshot: backends resolve to targets, a label
/// subset only ever picks its endpoints, weights share the traffic.
#[test]
fn backends_resolve_to_targets_with_label_subsets_and_weights() {
    let yaml = "\
apiVersion: meshlet.dev/v1alpha1
kind: Service
metadata: {name: orders}
spec: {endpoints: [{address: '127.0.0.1:9001', labels: {version: v1}}, {address: '127.0.0.1:9002', labels: {version: v2}}]}
---
apiVersion: meshlet.dev/v1alpha1
kind: Route
metadata: {name: orders-v2}
spec:
  parentRefs: [{service: orders}]
  rules:
    - matches: [{path: {value: /v2}}]
      backends: [{service: orders, labels: {version: v2}}]
      timeout: 3s
      filters: [{requestMirror: {service: shadow}}]
    - matches: [{path: {value: /split}}]
      backends: [{service: orders, weight: 3, labels: {version: v1}}, {service: orders, weight: 1, labels: {version: v2}}]
    - matches: [{path: {value: /nowhere}}]
      backends: [{service: nowhere}]
";
    let resources = meshlet_api::parse_documents("t.yaml", yaml).unwrap();
    let own = Own {
        namespace: "default",
        service: "frontend",
        identity: None,
    };
    let limits = Arc::new(Limits::default());
    let snapshot = Snapshot::build(
        &MeshState::from_resources(&resources),
        "t".into(),
        None,
        own,
        &limits,
        &Metrics::new("frontend"),
    );
    assert!(snapshot.gateway_routes.is_none());
    let orders = snapshot.service("orders").unwrap();
    let routes = snapshot.mesh_routes(orders).expect("orders has routes");
    assert_eq!(routes.parent, "service/orders");

    let v2 = request("GET", "/v2/x", &[("host", "orders")]);
    let selected = routes.select(None, &v2).unwrap();
    assert_eq!((selected.route(), selected.rule_index()), ("orders-v2", 0));
    let backend = selected.backend.unwrap();
    let policies = backend.policies(v2.method(), v2.uri().path(), selected.timeouts());
    assert_eq!(
        policies.timeouts.unwrap().request,
        Some(Duration::from_secs(3))
    );
    let subset = policies.split.unwrap();
    let endpoints = backend.target.as_ref().unwrap().balancer.endpoints();
    for _ in 0..50 {
        let chosen = subset.choose(|_| false).expect("strict: always the subset");
        assert_eq!(chosen.len(), 1);
        assert_eq!(endpoints[chosen[0]].addr.port(), 9002);
    }
    assert_eq!(selected.mirrors().len(), 1);
    assert!(selected.mirrors()[0].target.is_none(), "no service shadow");

    let split = request("GET", "/split", &[]);
    let to_v2 = (0..4000)
        .filter(|_| {
            let backend = routes
                .select(Some("orders"), &split)
                .unwrap()
                .backend
                .unwrap();
            backend.labels["version"] == "v2"
        })
        .count();
    assert!(
        (800..1200).contains(&to_v2),
        "{to_v2} of 4000 to v2 (weight 1 of 4)"
    );

    let nowhere = request("GET", "/nowhere", &[]);
    let backend = routes
        .select(Some("orders"), &nowhere)
        .unwrap()
        .backend
        .unwrap();
    assert!(backend.target.is_none());
    assert!(routes
        .select(Some("orders"), &request("GET", "/other", &[]))
        .is_none());
}

#[test]
fn rule_counters_are_labelled_by_parent_route_and_rule() {
    let resources = meshlet_api::parse_documents(
        "t.yaml",
        &route(
            "shop",
            "",
            &(rule("a", "{path: {value: /a}}") + &rule("b", "")),
        ),
    )
    .unwrap();
    let metrics = Metrics::new("edge");
    let t = HttpRoutes::build(
        &resources,
        "default",
        Parent::Gateway("edge"),
        &|_, _| None,
        &metrics,
    )
    .unwrap();
    t.select(Some("h"), &request("GET", "/b", &[]))
        .unwrap()
        .count();
    assert_eq!(metrics.route_requests("gateway/edge", "shop", 1).get(), 1);
    assert_eq!(metrics.route_requests("gateway/edge", "shop", 0).get(), 0);
}
