//! The limits of [`crate::limits`] as `parse_documents` applies them: the
//! alias bombs that motivated them, and each structural limit at its value
//! (accepted) and one over (refused, naming the field and the limit).

use std::fmt::Write as _;
use std::time::Instant;

use super::*;
use crate::limits::*;

const HEAD: &str = "apiVersion: meshlet.dev/v1alpha1\n";

/// The file: a `TrafficSplit` whose 1000 splits all alias one
/// 1000-entry `labels` map (49 KB; 2 million nodes expanded).
fn split_bomb() -> String {
    let mut text = format!("{HEAD}kind: TrafficSplit\nmetadata: {{name: bomb}}\nspec:\n  targetRef: {{service: orders}}\n  splits:\n    - weight: 1\n      labels: &L\n");
    for i in 0..1000 {
        writeln!(text, "        k{i}: v{i}").unwrap();
    }
    for _ in 1..1000 {
        text += "    - {weight: 1, labels: *L}\n";
    }
    text
}

/// Billion laughs: nine levels of ten aliases each, 10^9 scalars expanded.
fn billion_laughs() -> String {
    let mut text = format!("{HEAD}kind: Service\nmetadata: {{name: laughs}}\nspec:\n  endpoints: []\n  lol:\n    a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
    let names = ["a", "b", "c", "d", "e", "f", "g", "h", "i"];
    for pair in names.windows(2) {
        let refs = vec![format!("*{}", pair[0]); 10].join(", ");
        writeln!(text, "    {}: &{} [{refs}]", pair[1], pair[1]).unwrap();
    }
    text
}

/// The process' peak resident set (`VmHWM`) in KiB, where /proc has it.
fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Runs `test` (a test of this module) alone in a child process of the
/// test binary, so that its peak RSS is its own; in the child (marked by
/// an environment variable) returns true and the caller does the work.
fn in_own_process(test: &str) -> bool {
    const CHILD: &str = "MESHLET_API_BOUNDS_CHILD";
    if std::env::var_os(CHILD).is_some() {
        return true;
    }
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            &format!("parse::bounds_tests::{test}"),
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, "1")
        .status()
        .unwrap();
    assert!(status.success(), "{test} failed in its own process");
    false
}

fn assert_refused_flat(name: &str, text: &str, expect: &str) {
    let before = peak_rss_kib();
    let started = Instant::now();
    let err = parse_documents(name, text).expect_err("an alias bomb must be refused");
    let elapsed = started.elapsed();
    let after = peak_rss_kib();
    eprintln!(
        "{name}: {} bytes refused in {elapsed:?}, peak RSS {before:?} -> {after:?} KiB: {err}",
        text.len()
    );
    assert_eq!(err.document, 1, "{err}");
    assert!(err.line.is_some(), "{err}");
    assert!(err.message.contains(expect), "{err}");
    if let (Some(before), Some(after)) = (before, after) {
        // Building the expansion takes hundreds of megabytes; counting it
        // takes nothing beyond serde_yaml's events for the text.
        assert!(
            after.saturating_sub(before) < 16 * 1024,
            "peak RSS grew from {before} to {after} KiB"
        );
    }
}

#[test]
fn the_split_alias_bomb_is_refused_with_flat_memory() {
    if !in_own_process("the_split_alias_bomb_is_refused_with_flat_memory") {
        return;
    }
    let text = split_bomb();
    assert!(text.len() < 50_000, "{}", text.len());
    assert_refused_flat(
        "bomb.yaml",
        &text,
        "document expands to more than 100000 nodes (aliases expanded); limit: 100000 (MAX_DOCUMENT_NODES)",
    );
}

#[test]
fn billion_laughs_is_refused_with_flat_memory() {
    if !in_own_process("billion_laughs_is_refused_with_flat_memory") {
        return;
    }
    assert_refused_flat(
        "laughs.yaml",
        &billion_laughs(),
        "limit: 100000 (MAX_DOCUMENT_NODES)",
    );
}

#[test]
fn the_yaml_check_is_public_for_other_yaml() {
    let err = check_yaml_limits("bomb.yaml", &split_bomb()).unwrap_err();
    assert!(err.message.contains("MAX_DOCUMENT_NODES"), "{err}");
    assert_eq!(
        check_yaml_limits("ok.yaml", "a: [1, 2]\n---\nb: c\n"),
        Ok(())
    );
    // Syntax errors are reported, located.
    let err = check_yaml_limits("bad.yaml", "a: [\n").unwrap_err();
    assert!(err.line.is_some(), "{err}");
}

/// A `Service` whose endpoints list makes the document exactly `nodes`
/// nodes (13 for the rest, 3 per endpoint).
fn service_of_nodes(nodes: usize) -> String {
    assert_eq!((nodes - 13) % 3, 0);
    let mut text = format!("{HEAD}kind: Service\nmetadata: {{name: big}}\nspec:\n  endpoints:\n");
    for _ in 0..(nodes - 13) / 3 {
        text += "  - {address: 127.0.0.1:1}\n";
    }
    text
}

#[test]
fn document_nodes_at_the_limit_pass_the_count() {
    // At the limit the document is counted and built, then refused for
    // its endpoints (a structural limit), not for its size.
    let err = parse_documents("f.yaml", &service_of_nodes(MAX_DOCUMENT_NODES)).unwrap_err();
    assert_eq!(err.field, "spec.endpoints", "{err}");
    assert_eq!(err.message, "33329 endpoints; limit: 1000 (MAX_ENDPOINTS)");
    let err = parse_documents("f.yaml", &service_of_nodes(MAX_DOCUMENT_NODES + 3)).unwrap_err();
    assert!(err.message.contains("(MAX_DOCUMENT_NODES)"), "{err}");
    // The field is where the count stopped.
    assert_eq!(err.field, "spec.endpoints[33329]", "{err}");
}

fn service(name: &str) -> String {
    format!("{HEAD}kind: Service\nmetadata: {{name: {name}}}\nspec: {{}}\n")
}

#[test]
fn documents_per_file_at_the_limit_and_one_over() {
    let docs: Vec<String> = (0..MAX_DOCUMENTS)
        .map(|i| service(&format!("s{i}")))
        .collect();
    let text = docs.join("---\n");
    assert_eq!(
        parse_documents("f.yaml", &text).unwrap().len(),
        MAX_DOCUMENTS
    );
    let over = format!("{text}---\n{}", service("one-more"));
    let err = parse_documents("f.yaml", &over).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("f.yaml: document 1001, line {}: more than 1000 documents in one file; limit: 1000 (MAX_DOCUMENTS)", 5 * 1000 + 1)
    );
}

#[test]
fn file_size_at_the_limit_and_one_over() {
    let text = format!("#{}", " ".repeat(MAX_TEXT_BYTES - 1));
    assert_eq!(parse_documents("f.yaml", &text), Ok(vec![]));
    let err = parse_documents("f.yaml", &format!("{text} ")).unwrap_err();
    assert_eq!(
        err.to_string(),
        "f.yaml: the file is 2097153 bytes; limit: 2097152 (MAX_TEXT_BYTES)"
    );
}

#[test]
fn one_string_at_the_limit_and_one_over() {
    let doc = |len: usize| {
        format!(
            "{HEAD}kind: Service\nmetadata:\n  name: s\n  labels: {{k: {}}}\nspec: {{}}\n",
            "v".repeat(len)
        )
    };
    // 4096 bytes pass the count, then the label-value limit refuses them.
    let err = parse_documents("f.yaml", &doc(MAX_SCALAR_BYTES)).unwrap_err();
    assert_eq!(err.field, "metadata.labels.k", "{err}");
    let err = parse_documents("f.yaml", &doc(MAX_SCALAR_BYTES + 1)).unwrap_err();
    assert_eq!(
        err.message,
        "a string of 4097 bytes; limit: 4096 (MAX_SCALAR_BYTES)"
    );
    assert_eq!((err.document, err.line), (1, Some(5)), "{err}");
}

/// `doc(n)` at `n = limit` parses; at `limit + 1` it is refused at `field`
/// with a message containing `message`.
fn at_limit_and_one_over(limit: usize, doc: impl Fn(usize) -> String, field: &str, message: &str) {
    let text = doc(limit);
    if let Err(err) = parse_documents("f.yaml", &text) {
        panic!("at the limit {limit}: {err}\n{text}");
    }
    let err = parse_documents("f.yaml", &doc(limit + 1)).unwrap_err();
    assert_eq!(err.field, field, "{err}");
    assert!(err.message.contains(message), "{err}");
}

fn labels(n: usize) -> String {
    let entries: Vec<String> = (0..n).map(|i| format!("k{i}: v")).collect();
    format!("{{{}}}", entries.join(", "))
}

fn policy(kind: &str, spec: &str) -> String {
    format!("{HEAD}kind: {kind}\nmetadata: {{name: p}}\nspec:\n  targetRef: {{service: orders}}\n{spec}")
}

#[test]
fn list_limits() {
    at_limit_and_one_over(
        MAX_SPLITS,
        |n| {
            let splits: Vec<String> = (0..n)
                .map(|i| format!("    - {{labels: {{v: s{i}}}, weight: 1}}\n"))
                .collect();
            policy("TrafficSplit", &format!("  splits:\n{}", splits.concat()))
        },
        "spec.splits",
        "101 splits; limit: 100 (MAX_SPLITS)",
    );
    at_limit_and_one_over(
        MAX_ENDPOINTS,
        |n| {
            let endpoints: Vec<String> = (0..n)
                .map(|i| format!("    - {{address: 127.0.0.1:{}}}\n", 1000 + i))
                .collect();
            format!(
                "{HEAD}kind: Service\nmetadata: {{name: s}}\nspec:\n  endpoints:\n{}",
                endpoints.concat()
            )
        },
        "spec.endpoints",
        "1001 endpoints; limit: 1000 (MAX_ENDPOINTS)",
    );
    at_limit_and_one_over(
        MAX_METHODS,
        |n| {
            policy(
                "RetryPolicy",
                &format!("  match: {{methods: [{}]}}\n", vec!["GET"; n].join(", ")),
            )
        },
        "spec.match.methods",
        "17 methods; limit: 16 (MAX_METHODS)",
    );
    at_limit_and_one_over(
        MAX_FAILURE_KINDS,
        |n| {
            policy(
                "CircuitBreakerPolicy",
                &format!("  failureOn: [{}]\n", vec!["5xx"; n].join(", ")),
            )
        },
        "spec.failureOn",
        "17 failure kinds; limit: 16 (MAX_FAILURE_KINDS)",
    );
    at_limit_and_one_over(
        MAX_FAILURE_KINDS,
        |n| {
            policy(
                "RetryPolicy",
                &format!("  retryOn: [{}]\n", vec!["reset"; n].join(", ")),
            )
        },
        "spec.retryOn",
        "17 failure kinds; limit: 16 (MAX_FAILURE_KINDS)",
    );
}

#[test]
fn label_limits() {
    at_limit_and_one_over(
        MAX_LABELS,
        |n| {
            format!(
                "{HEAD}kind: Service\nmetadata: {{name: s, labels: {}}}\nspec: {{}}\n",
                labels(n)
            )
        },
        "metadata.labels",
        "65 labels; limit: 64 (MAX_LABELS)",
    );
    at_limit_and_one_over(
        MAX_LABELS,
        |n| {
            format!("{HEAD}kind: Service\nmetadata: {{name: s}}\nspec:\n  endpoints: [{{address: 127.0.0.1:80, labels: {}}}]\n", labels(n))
        },
        "spec.endpoints[0].labels",
        "65 labels; limit: 64 (MAX_LABELS)",
    );
    at_limit_and_one_over(
        MAX_LABELS,
        |n| {
            policy(
                "TrafficSplit",
                &format!("  splits: [{{weight: 1, labels: {}}}]\n", labels(n)),
            )
        },
        "spec.splits[0].labels",
        "65 labels; limit: 64 (MAX_LABELS)",
    );
    let meta_labels = |labels: String| {
        move |n: usize| {
            format!(
                "{HEAD}kind: Service\nmetadata: {{name: s, labels: {}}}\nspec: {{}}\n",
                labels.replace('N', &"x".repeat(n))
            )
        }
    };
    at_limit_and_one_over(
        MAX_LABEL_VALUE_LEN,
        meta_labels("{version: N}".into()),
        "metadata.labels.version",
        "64 characters long; limit: 63 (MAX_LABEL_VALUE_LEN)",
    );
    at_limit_and_one_over(
        MAX_LABEL_NAME_LEN,
        meta_labels("{example.com/N: v}".into()),
        "metadata.labels",
        "the name is 64 characters long; limit: 63 (MAX_LABEL_NAME_LEN)",
    );
    // A prefix of 253 characters: DNS labels of 63 joined by dots.
    let prefix = |n: usize| {
        let mut p = String::new();
        while p.len() < n {
            if !p.is_empty() && p.len() % 64 == 63 {
                p.push('.');
            } else {
                p.push('p');
            }
        }
        p
    };
    at_limit_and_one_over(
        MAX_LABEL_PREFIX_LEN,
        |n| {
            format!(
                "{HEAD}kind: Service\nmetadata: {{name: s, labels: {{{}/app: v}}}}\nspec: {{}}\n",
                prefix(n)
            )
        },
        "metadata.labels",
        "the prefix is 254 characters long; limit: 253 (MAX_LABEL_PREFIX_LEN)",
    );
    // Kubernetes' own labels are fine.
    let text = format!("{HEAD}kind: Service\nmetadata: {{name: s, labels: {{app.kubernetes.io/name: orders, version: v1.2_3}}}}\nspec: {{}}\n");
    parse_documents("f.yaml", &text).unwrap();
}

#[test]
fn string_limits() {
    at_limit_and_one_over(
        MAX_PATH_LEN,
        |n| {
            policy(
                "HealthCheckPolicy",
                &format!("  path: /{}\n", "h".repeat(n - 1)),
            )
        },
        "spec.path",
        "1025 bytes long; limit: 1024 (MAX_PATH_LEN)",
    );
    at_limit_and_one_over(
        MAX_PATH_LEN,
        |n| {
            policy(
                "TimeoutPolicy",
                &format!(
                    "  request: 1s\n  match: {{pathPrefix: /{}}}\n",
                    "p".repeat(n - 1)
                ),
            )
        },
        "spec.match.pathPrefix",
        "1025 bytes long; limit: 1024 (MAX_PATH_LEN)",
    );
    at_limit_and_one_over(
        MAX_METHOD_LEN,
        |n| {
            policy(
                "TimeoutPolicy",
                &format!("  request: 1s\n  match: {{methods: [{}]}}\n", "M".repeat(n)),
            )
        },
        "spec.match.methods[0]",
        "33 bytes long; limit: 32 (MAX_METHOD_LEN)",
    );
    at_limit_and_one_over(
        MAX_HEADER_NAME_LEN,
        |n| {
            policy(
                "RateLimitPolicy",
                &format!(
                    "  slidingWindow: {{requests: 5, window: 1m}}\n  key: header:{}\n",
                    "x".repeat(n)
                ),
            )
        },
        "spec.key",
        "257 bytes long; limit: 256 (MAX_HEADER_NAME_LEN)",
    );
}

#[test]
fn names_are_dns_labels() {
    at_limit_and_one_over(
        MAX_NAME_LEN,
        |n| service(&"n".repeat(n)),
        "metadata.name",
        "64 characters long; limit: 63 (MAX_NAME_LEN)",
    );
    let with_namespace = |ns: &str| {
        format!("{HEAD}kind: Service\nmetadata: {{name: s, namespace: {ns}}}\nspec: {{}}\n")
    };
    at_limit_and_one_over(
        MAX_NAME_LEN,
        |n| with_namespace(&"n".repeat(n)),
        "metadata.namespace",
        "limit: 63 (MAX_NAME_LEN)",
    );
    for bad in ["example.com", "127.0.0.2", "Orders", "a_b", "\"\""] {
        let err = parse_documents("f.yaml", &service(bad)).unwrap_err();
        assert_eq!(err.field, "metadata.name", "{bad}: {err}");
        let err = parse_documents("f.yaml", &with_namespace(bad)).unwrap_err();
        assert_eq!(err.field, "metadata.namespace", "{bad}: {err}");
        let target = |field: &str| {
            format!("{HEAD}kind: TimeoutPolicy\nmetadata: {{name: p}}\nspec: {{targetRef: {{service: orders, {field}: {bad}}}, request: 1s}}\n")
        };
        let err = parse_documents("f.yaml", &target("namespace")).unwrap_err();
        assert_eq!(err.field, "spec.targetRef.namespace", "{bad}: {err}");
        let text = target("namespace").replace("service: orders, namespace", "service");
        let err = parse_documents("f.yaml", &text).unwrap_err();
        assert_eq!(err.field, "spec.targetRef.service", "{bad}: {err}");
    }
    let err = parse_documents("f.yaml", &service("example.com")).unwrap_err();
    assert_eq!(
        err.to_string(),
        "f.yaml: document 1, line 1: field `metadata.name`: \"example.com\" is not a valid name: \
         use 1-63 lower-case letters, digits or '-', starting and ending with a letter or digit \
         (a name is one DNS label: no dots, so neither a host name nor an IP address)"
    );
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    /// Nodes and string bytes of a value, aliases expanded (serde_yaml's
    /// `Value` holds the expansion).
    fn size(value: &serde_yaml::Value) -> (usize, usize) {
        use serde_yaml::Value;
        match value {
            Value::String(s) => (1, s.len()),
            Value::Sequence(items) => items
                .iter()
                .map(size)
                .fold((1, 0), |a, b| (a.0 + b.0, a.1 + b.1)),
            Value::Mapping(map) => map
                .iter()
                .flat_map(|(k, v)| [size(k), size(v)])
                .fold((1, 0), |a, b| (a.0 + b.0, a.1 + b.1)),
            Value::Tagged(tagged) => {
                let (n, b) = size(&tagged.value);
                (n + 1, b + tagged.tag.to_string().len() - 1)
            }
            _ => (1, 0),
        }
    }

    /// A document of anchored sequences, each holding scalars and aliases
    /// of the ones before it, under unique keys of a root mapping.
    fn aliased_doc() -> impl Strategy<Value = String> {
        prop::collection::vec(
            (
                prop::collection::vec("[a-z]{1,6}", 0..4),
                prop::collection::vec(any::<prop::sample::Index>(), 0..5),
            ),
            1..6,
        )
        .prop_map(|levels| {
            let mut text = String::new();
            for (i, (scalars, refs)) in levels.iter().enumerate() {
                let mut items: Vec<String> = scalars.clone();
                if i > 0 {
                    items.extend(refs.iter().map(|r| format!("*a{}", r.index(i))));
                }
                writeln!(text, "k{i}: &a{i} [{}]", items.join(", ")).unwrap();
            }
            text
        })
    }

    proptest! {
        /// Pass zero counts exactly what the expansion holds: a limit equal
        /// to the expanded size passes, one less refuses.
        #[test]
        fn counts_match_the_expansion(text in aliased_doc()) {
            let value: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
            let (nodes, bytes) = size(&value);
            let lines = document_start_lines(&text);
            let limits = |document_nodes, document_scalar_bytes| expansion::Limits {
                document_nodes,
                document_scalar_bytes,
                ..expansion::Limits::DEFAULT
            };
            prop_assert!(expansion::check(&limits(nodes, bytes), "f", &text, &lines).is_ok());
            let err = expansion::check(&limits(nodes - 1, bytes), "f", &text, &lines).unwrap_err();
            prop_assert!(err.message.contains("MAX_DOCUMENT_NODES"), "{}", err);
            if bytes > 0 {
                let err = expansion::check(&limits(nodes, bytes - 1), "f", &text, &lines).unwrap_err();
                prop_assert!(err.message.contains("MAX_DOCUMENT_SCALAR_BYTES"), "{}", err);
            }
        }
    }
}
