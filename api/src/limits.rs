//! The bounds on everything users and sidecars send: YAML files, the
//! resources in them, and registrations.
//!
//! A small file must not be able to become a large object anywhere in the
//! mesh (YAML aliases let 22 KB expand to millions of nodes), and a name
//! must be a mesh name, never an outside host. Every bound is a `pub const`
//! here; an input over one is refused with an error naming the field and
//! the limit (`... limit: 100 (MAX_SPLITS)`).
//!
//! ## Files (checked by [`crate::parse_documents`] before any typed value is built)
//!
//! | constant | value | what is limited |
//! |---|---|---|
//! | [`MAX_TEXT_BYTES`] | 2 MiB | size of one YAML file (the text itself) |
//! | [`MAX_DOCUMENTS`] | 1000 | non-empty YAML documents in one file |
//! | [`MAX_DOCUMENT_NODES`] | 100 000 | nodes of one document, aliases expanded |
//! | [`MAX_DOCUMENT_SCALAR_BYTES`] | 1 MiB | bytes of string scalars (keys included) of one document, aliases expanded |
//! | [`MAX_FILE_NODES`] | 500 000 | nodes of all documents of a file, aliases expanded |
//! | [`MAX_FILE_SCALAR_BYTES`] | 4 MiB | bytes of string scalars of all documents, aliases expanded |
//! | [`MAX_SCALAR_BYTES`] | 4096 | one string scalar (a key or a value) |
//!
//! A node is every scalar, mapping and sequence, keys included: `{a: b}` is
//! three nodes. An alias counts as a copy of what it names, every time it
//! is used. Counting stops at the first node over a limit, so an alias bomb
//! costs the time to count past the limit, with no memory beyond the
//! file's own parse events.
//!
//! ## Names and labels
//!
//! | constant | value | what is limited |
//! |---|---|---|
//! | [`MAX_NAME_LEN`] | 63 | `metadata.name`, `metadata.namespace`, service and namespace references, registrations' `service`/`namespace`: a DNS-1123 label ([`validate_dns_label`]) |
//! | [`MAX_LABELS`] | 64 | entries of one label map (`metadata.labels`, endpoint, split and registration labels) |
//! | [`MAX_LABEL_PREFIX_LEN`] | 253 | the optional `prefix/` of a label key (a DNS-1123 subdomain), as in Kubernetes |
//! | [`MAX_LABEL_NAME_LEN`] | 63 | a label key's name part, as in Kubernetes |
//! | [`MAX_LABEL_VALUE_LEN`] | 63 | a label value (may be empty), as in Kubernetes |
//!
//! ## Lists and strings in resources
//!
//! | constant | value | what is limited |
//! |---|---|---|
//! | [`MAX_ENDPOINTS`] | 1000 | `spec.endpoints` of a `Service` |
//! | [`MAX_SPLITS`] | 100 | `spec.splits` of a `TrafficSplit` |
//! | [`MAX_METHODS`] | 16 | `spec.match.methods` of a policy |
//! | [`MAX_METHOD_LEN`] | 32 | one HTTP method name |
//! | [`MAX_FAILURE_KINDS`] | 16 | `spec.failureOn` / `spec.retryOn` |
//! | [`MAX_PATH_LEN`] | 1024 | HTTP paths and path prefixes (`spec.path`, `spec.match.pathPrefix`) |
//! | [`MAX_HEADER_NAME_LEN`] | 256 | a header name (`key: header:NAME`, an `AuthorizationPolicy`'s `when.header`) |
//! | [`MAX_RULES`] | 64 | `spec.rules` of an `AuthorizationPolicy` |
//! | [`MAX_RULE_ITEMS`] | 64 | each list inside an `AuthorizationPolicy` rule (`from`, `to`, `when`, `services`, `namespaces`, `identities`, `paths`, `values`) |
//! | [`MAX_ROUTE_RULES`] | 64 | `spec.rules` of a `Route` |
//! | [`MAX_ROUTE_ITEMS`] | 16 | each other list of a `Route` (`parentRefs`, `hostnames`, a rule's `matches`, `backends`, `filters`, a match's `headers`, `queryParams`, a modifier's `set`, `add`, `remove`) |
//! | [`MAX_ROUTE_VALUE_LEN`] | 1024 | a header or query value of a `Route` (matched or set) |
//! | [`MAX_HOSTNAME_LEN`] | 253 | a host name of a `Route` (`hostnames`, rewrite and redirect `hostname`) |
//! | [`MAX_ROUTE_WEIGHT`] | 1 000 000 | a `Route` backend's `weight` |
//! | [`MAX_REGEX_SIZE`] | 64 KiB | a `Route` regular expression once compiled (the `regex` crate's size limit) |
//!
//! The values are generous for hand-written configuration (the examples use
//! a few entries of each) and small enough that the largest file accepted
//! stays a few tens of megabytes once parsed.

pub use crate::parse::check_yaml_limits;

/// A field error: the dotted path under `spec` and a message.
pub type FieldError = (String, String);

/// Size of one YAML file given to [`crate::parse_documents`].
pub const MAX_TEXT_BYTES: usize = 2 * 1024 * 1024;
/// Non-empty documents in one YAML file.
pub const MAX_DOCUMENTS: usize = 1000;
/// Nodes (scalars, mappings, sequences; keys included) of one document,
/// aliases expanded.
pub const MAX_DOCUMENT_NODES: usize = 100_000;
/// Bytes of the string scalars of one document, aliases expanded.
pub const MAX_DOCUMENT_SCALAR_BYTES: usize = 1024 * 1024;
/// Nodes of all documents of one file, aliases expanded.
pub const MAX_FILE_NODES: usize = 500_000;
/// Bytes of the string scalars of all documents of one file, aliases
/// expanded.
pub const MAX_FILE_SCALAR_BYTES: usize = 4 * 1024 * 1024;
/// Bytes of one string scalar (a mapping key or a value).
pub const MAX_SCALAR_BYTES: usize = 4096;

/// A DNS-1123 label: names, namespaces and service references.
pub const MAX_NAME_LEN: usize = 63;
/// Entries of one label map.
pub const MAX_LABELS: usize = 64;
/// The optional `prefix/` of a label key (a DNS-1123 subdomain).
pub const MAX_LABEL_PREFIX_LEN: usize = 253;
/// The name part of a label key.
pub const MAX_LABEL_NAME_LEN: usize = 63;
/// A label value.
pub const MAX_LABEL_VALUE_LEN: usize = 63;

/// Static endpoints of one `Service`.
pub const MAX_ENDPOINTS: usize = 1000;
/// Subsets of one `TrafficSplit`.
pub const MAX_SPLITS: usize = 100;
/// Methods of one route match.
pub const MAX_METHODS: usize = 16;
/// One HTTP method name.
pub const MAX_METHOD_LEN: usize = 32;
/// Entries of `failureOn` / `retryOn`.
pub const MAX_FAILURE_KINDS: usize = 16;
/// HTTP paths and path prefixes.
pub const MAX_PATH_LEN: usize = 1024;
/// A header name.
pub const MAX_HEADER_NAME_LEN: usize = 256;
/// `spec.rules` of an `AuthorizationPolicy`.
pub const MAX_RULES: usize = 64;
/// Each list inside an `AuthorizationPolicy` rule.
pub const MAX_RULE_ITEMS: usize = 64;
/// `spec.rules` of a `Route`.
pub const MAX_ROUTE_RULES: usize = 64;
/// Each other list of a `Route`.
pub const MAX_ROUTE_ITEMS: usize = 16;
/// A header or query value of a `Route`.
pub const MAX_ROUTE_VALUE_LEN: usize = 1024;
/// A host name of a `Route`.
pub const MAX_HOSTNAME_LEN: usize = 253;
/// A `Route` backend's weight.
pub const MAX_ROUTE_WEIGHT: u32 = 1_000_000;
/// A `Route` regular expression once compiled, in bytes.
pub const MAX_REGEX_SIZE: usize = 64 * 1024;

/// At most this many characters of a refused value are quoted back in an
/// error message.
const SHOWN_CHARS: usize = 64;

/// `value` quoted for an error message, cut to a readable length.
pub(crate) fn shown(value: &str) -> String {
    if value.chars().count() <= SHOWN_CHARS {
        format!("{value:?}")
    } else {
        let head: String = value.chars().take(SHOWN_CHARS).collect();
        format!("{head:?}... ({} bytes)", value.len())
    }
}

/// Checks that `value` is a DNS-1123 label: 1-63 lower-case letters,
/// digits or `-`, starting and ending with a letter or digit. Service names
/// and namespaces must be, so that a service name is a mesh name and never
/// an outside host: `example.com`, `127.0.0.2`, `Orders` and `a_b` are
/// refused. The error is `(field, message)`.
pub fn validate_dns_label(field: &str, value: &str) -> Result<(), FieldError> {
    check_dns_label(value).map_err(|message| (field.to_owned(), message))
}

/// [`validate_dns_label`] without the field: the message alone.
pub(crate) fn check_dns_label(value: &str) -> Result<(), String> {
    const RULE: &str = "use 1-63 lower-case letters, digits or '-', \
                        starting and ending with a letter or digit";
    if value.is_empty() {
        return Err(format!("the name is empty: {RULE}"));
    }
    if value.len() > MAX_NAME_LEN {
        return Err(format!(
            "{} is {} characters long; limit: {MAX_NAME_LEN} (MAX_NAME_LEN): {RULE}",
            shown(value),
            value.len()
        ));
    }
    if !is_dns_label(value) {
        let hint = if value.contains('.') {
            " (a name is one DNS label: no dots, so neither a host name nor an IP address)"
        } else {
            ""
        };
        return Err(format!(
            "{} is not a valid name: {RULE}{hint}",
            shown(value)
        ));
    }
    Ok(())
}

fn is_dns_label(value: &str) -> bool {
    let bytes = value.as_bytes();
    let inner = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-';
    let end = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    !bytes.is_empty()
        && bytes.len() <= MAX_NAME_LEN
        && bytes.iter().all(inner)
        && bytes.first().is_some_and(end)
        && bytes.last().is_some_and(end)
}

/// Kubernetes' label-name syntax (a key's name part, and any non-empty
/// value): alphanumerics, `-`, `_` and `.`, starting and ending with an
/// alphanumeric.
fn is_label_token(value: &str) -> bool {
    let bytes = value.as_bytes();
    let end = |b: &u8| b.is_ascii_alphanumeric();
    !bytes.is_empty()
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && bytes.first().is_some_and(end)
        && bytes.last().is_some_and(end)
}

/// Checks one label key: `[prefix/]name` as in Kubernetes. The error is the
/// message alone.
pub(crate) fn check_label_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    if let Some(prefix) = prefix {
        if prefix.len() > MAX_LABEL_PREFIX_LEN {
            return Err(format!(
                "label key {}: the prefix is {} characters long; limit: {MAX_LABEL_PREFIX_LEN} (MAX_LABEL_PREFIX_LEN)",
                shown(key),
                prefix.len()
            ));
        }
        if !prefix.split('.').all(is_dns_label) {
            return Err(format!(
                "label key {}: the prefix before '/' must be a DNS subdomain \
                 (lower-case labels separated by dots, e.g. example.com/tier)",
                shown(key)
            ));
        }
    }
    if name.len() > MAX_LABEL_NAME_LEN {
        return Err(format!(
            "label key {}: the name is {} characters long; limit: {MAX_LABEL_NAME_LEN} (MAX_LABEL_NAME_LEN)",
            shown(key),
            name.len()
        ));
    }
    if !is_label_token(name) {
        return Err(format!(
            "label key {} is not valid: use [prefix/]name where name has 1-63 letters, digits, \
             '-', '_' or '.', starting and ending with a letter or digit",
            shown(key)
        ));
    }
    Ok(())
}

/// Checks one label value (may be empty). The error is the message alone.
pub(crate) fn check_label_value(value: &str) -> Result<(), String> {
    if value.len() > MAX_LABEL_VALUE_LEN {
        return Err(format!(
            "label value {} is {} characters long; limit: {MAX_LABEL_VALUE_LEN} (MAX_LABEL_VALUE_LEN)",
            shown(value),
            value.len()
        ));
    }
    if !value.is_empty() && !is_label_token(value) {
        return Err(format!(
            "label value {} is not valid: use up to 63 letters, digits, '-', '_' or '.', \
             starting and ending with a letter or digit",
            shown(value)
        ));
    }
    Ok(())
}

/// Checks a label map at `field` (e.g. `spec.endpoints[0].labels`): at most
/// [`MAX_LABELS`] entries, each key and value as in Kubernetes. A key error
/// names the map, a value error names `field.KEY`.
pub fn validate_labels<'a>(
    field: &str,
    labels: impl ExactSizeIterator<Item = (&'a String, &'a String)>,
) -> Result<(), FieldError> {
    check_len(field, labels.len(), MAX_LABELS, "MAX_LABELS", "labels")?;
    for (key, value) in labels {
        check_label_key(key).map_err(|m| (field.to_owned(), m))?;
        check_label_value(value).map_err(|m| (format!("{field}.{key}"), m))?;
    }
    Ok(())
}

/// Refuses a list at `field` with more than `max` entries (`what` names
/// them in the message, `name` is the constant).
pub(crate) fn check_len(
    field: &str,
    len: usize,
    max: usize,
    name: &str,
    what: &str,
) -> Result<(), FieldError> {
    if len > max {
        return Err((
            field.to_owned(),
            format!("{len} {what}; limit: {max} ({name})"),
        ));
    }
    Ok(())
}

/// Refuses a string at `field` longer than `max` bytes.
pub(crate) fn check_str_len(
    field: &str,
    value: &str,
    max: usize,
    name: &str,
) -> Result<(), FieldError> {
    if value.len() > max {
        return Err((
            field.to_owned(),
            format!(
                "{} is {} bytes long; limit: {max} ({name})",
                shown(value),
                value.len()
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn dns_labels() {
        for good in ["a", "orders", "orders-v2", "0", "9lives", &"a".repeat(63)] {
            assert_eq!(validate_dns_label("service", good), Ok(()), "{good}");
        }
        for bad in [
            "",
            "example.com",
            "127.0.0.2",
            "Orders",
            "a_b",
            "-a",
            "a-",
            "a b",
            "orders.default",
            "ordérs",
            "::1",
            &"a".repeat(64),
        ] {
            let (field, message) = validate_dns_label("service", bad).unwrap_err();
            assert_eq!(field, "service");
            assert!(
                message.contains("1-63 lower-case letters"),
                "{bad}: {message}"
            );
        }
        let (_, message) = validate_dns_label("service", "example.com").unwrap_err();
        assert_eq!(
            message,
            "\"example.com\" is not a valid name: use 1-63 lower-case letters, digits or '-', \
             starting and ending with a letter or digit (a name is one DNS label: no dots, so \
             neither a host name nor an IP address)"
        );
        let (_, message) = validate_dns_label("service", &"a".repeat(64)).unwrap_err();
        assert!(
            message.contains("64 characters long; limit: 63 (MAX_NAME_LEN)"),
            "{message}"
        );
    }

    #[test]
    fn long_values_are_cut_in_messages() {
        let huge = "X".repeat(100_000);
        let (_, message) = validate_dns_label("metadata.name", &huge).unwrap_err();
        assert!(message.len() < 300, "{message}");
        assert!(message.contains("(100000 bytes)"), "{message}");
    }

    #[test]
    fn label_keys_and_values_follow_kubernetes() {
        for good in [
            "version",
            "app.kubernetes.io/name",
            "example.com/tier",
            "A_b.c-D",
            &"k".repeat(63),
            &format!(
                "{}/k",
                [
                    "a".repeat(63),
                    "b".repeat(63),
                    "c".repeat(63),
                    "d".repeat(61)
                ]
                .join(".")
            ),
        ] {
            assert_eq!(check_label_key(good), Ok(()), "{good}");
        }
        for bad in [
            "",
            "/name",
            "Example.com/x",
            "a/b/c",
            "-x",
            "x-",
            "a b",
            "ex_ample.com/x",
            &"k".repeat(64),
            &format!(
                "{}/k",
                [
                    "a".repeat(63),
                    "b".repeat(63),
                    "c".repeat(63),
                    "d".repeat(62)
                ]
                .join(".")
            ),
        ] {
            assert!(check_label_key(bad).is_err(), "{bad}");
        }
        for good in ["", "v1", "1.2.3", "A_b-c", &"v".repeat(63)] {
            assert_eq!(check_label_value(good), Ok(()), "{good}");
        }
        for bad in ["-v", "v.", "a b", "x/y", &"v".repeat(64)] {
            assert!(check_label_value(bad).is_err(), "{bad}");
        }
        assert!(check_label_value(&"v".repeat(64))
            .unwrap_err()
            .contains("64 characters long; limit: 63 (MAX_LABEL_VALUE_LEN)"));
    }

    #[test]
    fn label_maps_are_counted_and_checked() {
        let map = |n: usize| -> BTreeMap<String, String> {
            (0..n).map(|i| (format!("k{i}"), "v".to_owned())).collect()
        };
        assert_eq!(validate_labels("labels", map(MAX_LABELS).iter()), Ok(()));
        assert_eq!(
            validate_labels("labels", map(MAX_LABELS + 1).iter()),
            Err((
                "labels".to_owned(),
                "65 labels; limit: 64 (MAX_LABELS)".to_owned()
            ))
        );
        let bad_value: BTreeMap<String, String> = [("version".to_owned(), "v 1".to_owned())].into();
        let (field, _) = validate_labels("spec.labels", bad_value.iter()).unwrap_err();
        assert_eq!(field, "spec.labels.version");
        let bad_key: BTreeMap<String, String> = [("ver sion".to_owned(), "v1".to_owned())].into();
        let (field, _) = validate_labels("spec.labels", bad_key.iter()).unwrap_err();
        assert_eq!(field, "spec.labels");
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// The checker agrees with the rule written as a regex.
            #[test]
            fn dns_label_matches_the_rule(value in "[a-z0-9.A-Z_-]{0,70}") {
                let rule = !value.is_empty()
                    && value.len() <= 63
                    && value.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && !value.starts_with('-')
                    && !value.ends_with('-');
                prop_assert_eq!(validate_dns_label("f", &value).is_ok(), rule);
            }

            /// Generated valid labels are accepted.
            #[test]
            fn generated_dns_labels_pass(value in "[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?") {
                prop_assert_eq!(validate_dns_label("f", &value), Ok(()));
            }
        }
    }
}
