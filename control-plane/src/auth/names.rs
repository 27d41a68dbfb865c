//! Name rules for credentials and identities.
//!
//! - **Token names** ([`validate_token_name`]): 1–253 characters of lowercase
//!   ASCII letters, digits, `-`, `.`, `_` and `@`, starting and ending with a
//!   letter or digit (`admin`, `alice@ops`, `sidecar.orders.default`). They
//!   are the audit actor shown in history, so they are printable, unambiguous
//!   and safe in a URL path (`DELETE /api/v1/tokens/NAME`) and a log line.
//! - **Namespaces and services** ([`validate_dns_label`]): DNS-1123 labels,
//!   1–63 characters of `[a-z0-9-]`, starting and ending with a letter or
//!   digit. So `example.com`, `127.0.0.2` or `Orders` can never be a service.

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {name:?}: {reason}")]
pub struct InvalidName {
    /// What kind of name: "token name", "namespace", "service".
    pub what: &'static str,
    pub name: String,
    pub reason: &'static str,
}

/// Longest token name.
pub const MAX_TOKEN_NAME_LEN: usize = 253;
/// Longest DNS-1123 label.
pub const MAX_LABEL_LEN: usize = 63;

fn check(
    what: &'static str,
    name: &str,
    max: usize,
    allowed: impl Fn(u8) -> bool,
    allowed_desc: &'static str,
) -> Result<(), InvalidName> {
    let fail = |reason| {
        Err(InvalidName {
            what,
            name: name.chars().take(80).collect(),
            reason,
        })
    };
    let bytes = name.as_bytes();
    if bytes.is_empty() {
        return fail("must not be empty");
    }
    if bytes.len() > max {
        return fail(if max == MAX_LABEL_LEN {
            "longer than 63 characters"
        } else {
            "longer than 253 characters"
        });
    }
    if !bytes.iter().all(|&b| allowed(b)) {
        return fail(allowed_desc);
    }
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return fail("must start and end with a lowercase letter or digit");
    }
    Ok(())
}

/// Checks a DNS-1123 label (a namespace or service name); `what` names it in the error.
pub fn validate_dns_label(what: &'static str, name: &str) -> Result<(), InvalidName> {
    check(
        what,
        name,
        MAX_LABEL_LEN,
        |b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-',
        "only lowercase letters, digits and '-' are allowed (a DNS-1123 label)",
    )
}

/// Checks a token name (see the module docs).
pub fn validate_token_name(name: &str) -> Result<(), InvalidName> {
    check(
        "token name",
        name,
        MAX_TOKEN_NAME_LEN,
        |b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'.' | b'_' | b'@'),
        "only lowercase letters, digits, '-', '.', '_' and '@' are allowed",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_labels() {
        for ok in ["orders", "a", "orders-v2", "0abc", &"a".repeat(63)] {
            assert!(validate_dns_label("service", ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "example.com",
            "127.0.0.2",
            "Orders",
            "-orders",
            "orders-",
            "or_ders",
            "orders ",
            "ordérs",
            &"a".repeat(64),
        ] {
            let err = validate_dns_label("service", bad).unwrap_err();
            assert_eq!(err.what, "service");
        }
    }

    #[test]
    fn token_names() {
        for ok in [
            "admin",
            "alice@ops",
            "sidecar.orders.default",
            "ci_bot-1",
            "a",
        ] {
            assert!(validate_token_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "Admin",
            "a b",
            "a/b",
            "-a",
            "a.",
            "@x",
            "x\n",
            &"a".repeat(254),
        ] {
            assert!(validate_token_name(bad).is_err(), "{bad:?}");
        }
    }
}
