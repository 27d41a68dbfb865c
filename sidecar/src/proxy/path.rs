//! The inbound side's request path normalisation, before authorization
//! and the rate-limit route match see the path (as Envoy's
//! `normalize_path` + `merge_slashes`, Istio's default).
//!
//! An app or framework that normalises paths itself (decodes `%73`,
//! collapses `//`, resolves `./` and `../`) would otherwise serve a
//! resource a `paths:` rule denies, under a spelling the rule does not
//! match. So the inbound normalises once, authorizes the normalised path,
//! and forwards that same path to the app: the policy and the app see the
//! same path.
//!
//! [`normalize`]:
//! - decodes percent-encoded *unreserved* characters (`ALPHA DIGIT - . _ ~`,
//!   RFC 3986 §2.3) and upper-cases the hex of every other escape;
//! - merges repeated slashes (`//` → `/`);
//! - removes dot segments (RFC 3986 §5.2.4; a `..` above the root stays
//!   at the root);
//! - refuses ([`PathRefusal`], 400 `bad_path`) an encoded `/` (`%2F`),
//!   `\` (`%5C`) or NUL (`%00`), a raw backslash, a malformed escape, and
//!   a path that is not origin-form (does not start with `/`; `*`, the
//!   `OPTIONS` asterisk-form, is left as is).
//!
//! The query is not part of the path and is never touched. `;params` are
//! not stripped (a rule should not rely on an app ignoring them).

use std::borrow::Cow;

/// Why a path was refused (400 `bad_path`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathRefusal {
    #[error("the path contains an encoded slash (%2F)")]
    EncodedSlash,
    #[error("the path contains an encoded backslash (%5C)")]
    EncodedBackslash,
    #[error("the path contains an encoded NUL (%00)")]
    EncodedNul,
    #[error("the path contains a backslash")]
    Backslash,
    #[error("the path contains a malformed percent-encoding")]
    BadEscape,
    #[error("the path does not start with '/'")]
    NotOriginForm,
}

/// The normalised form of `path` (the path only, without the query);
/// borrowed when nothing changed, the common case.
pub fn normalize(path: &str) -> Result<Cow<'_, str>, PathRefusal> {
    if path == "*" {
        return Ok(Cow::Borrowed(path));
    }
    if !path.starts_with('/') {
        return Err(PathRefusal::NotOriginForm);
    }
    let bytes = path.as_bytes();
    if !needs_work(bytes)? {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = decode_unreserved(bytes)?;
    let merged = merge_slashes(&decoded);
    let normalized = remove_dot_segments(&merged);
    if normalized == path {
        Ok(Cow::Borrowed(path))
    } else {
        Ok(Cow::Owned(normalized))
    }
}

/// Whether `path` (starting with `/`) has anything to normalise: an
/// escape, an empty segment (`//`) or a dot segment; a backslash refuses
/// it. One pass over the bytes (this runs for every request).
fn needs_work(path: &[u8]) -> Result<bool, PathRefusal> {
    let mut found = false;
    let mut segment_start = 0;
    for (at, &b) in path.iter().enumerate() {
        match b {
            b'\\' => return Err(PathRefusal::Backslash),
            b'%' => found = true,
            b'/' => {
                found |= at > 0 && is_empty_or_dots(&path[segment_start..at]);
                segment_start = at + 1;
            }
            _ => {}
        }
    }
    Ok(found || matches!(&path[segment_start..], b"." | b".."))
}

/// A segment between two slashes that normalising removes or resolves.
fn is_empty_or_dots(segment: &[u8]) -> bool {
    matches!(segment, b"" | b"." | b"..")
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Decodes escapes of unreserved characters, upper-cases the others';
/// refuses `%2F`, `%5C`, `%00` and malformed escapes.
fn decode_unreserved(bytes: &[u8]) -> Result<String, PathRefusal> {
    let mut out = String::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b != b'%' {
            // The input is a &str and only ASCII is consumed here one byte
            // at a time; copy whole runs to keep non-ASCII intact.
            let start = i;
            while i < bytes.len() && bytes[i] != b'%' {
                i += 1;
            }
            // `start..i` ends at '%' (ASCII) or the end: a char boundary.
            out.push_str(std::str::from_utf8(&bytes[start..i]).unwrap_or_default());
            continue;
        }
        let (Some(hi), Some(lo)) = (
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) else {
            return Err(PathRefusal::BadEscape);
        };
        let value = hi << 4 | lo;
        match value {
            b'/' => return Err(PathRefusal::EncodedSlash),
            b'\\' => return Err(PathRefusal::EncodedBackslash),
            0 => return Err(PathRefusal::EncodedNul),
            v if is_unreserved(v) => out.push(char::from(v)),
            v => {
                out.push('%');
                out.push_str(&format!("{v:02X}"));
            }
        }
        i += 3;
    }
    Ok(out)
}

fn merge_slashes(path: &str) -> Cow<'_, str> {
    if !path.contains("//") {
        return Cow::Borrowed(path);
    }
    let mut out = String::with_capacity(path.len());
    let mut previous_slash = false;
    for c in path.chars() {
        if c == '/' && previous_slash {
            continue;
        }
        previous_slash = c == '/';
        out.push(c);
    }
    Cow::Owned(out)
}

/// RFC 3986 §5.2.4 on an absolute path (starts with `/`): `.` segments
/// go, `..` removes the segment before it (none above the root); a path
/// ending in `.` or `..` keeps its trailing slash.
fn remove_dot_segments(path: &str) -> String {
    let mut output: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path[1..].split('/').collect();
    let last = segments.len() - 1;
    let mut trailing_slash = false;
    for (i, segment) in segments.iter().enumerate() {
        match *segment {
            "." => trailing_slash = i == last,
            ".." => {
                output.pop();
                trailing_slash = i == last;
            }
            s => {
                output.push(s);
                trailing_slash = false;
            }
        }
    }
    let mut out = String::with_capacity(path.len());
    for segment in &output {
        out.push('/');
        out.push_str(segment);
    }
    if trailing_slash || out.is_empty() {
        out.push('/');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_every_spelling_of_a_path() {
        let cases = [
            // Unchanged (borrowed).
            ("/", "/"),
            ("/api/secret", "/api/secret"),
            ("/api/secret/", "/api/secret/"),
            ("*", "*"),
            ("/api/secret;a", "/api/secret;a"),
            ("/caf\u{e9}", "/caf\u{e9}"),
            ("/a.b/..c/.d", "/a.b/..c/.d"),
            // The F3 bypasses.
            ("/api/./secret", "/api/secret"),
            ("/api//secret", "/api/secret"),
            ("/api/%73ecret", "/api/secret"),
            ("/api/%73%65cret", "/api/secret"),
            ("/api//admin/x", "/api/admin/x"),
            ("/api/x/../admin/x", "/api/admin/x"),
            ("/api/../admin", "/admin"),
            ("/api/secret.", "/api/secret."),
            ("/./admin", "/admin"),
            ("/x/../admin", "/admin"),
            ("//admin", "/admin"),
            ("/%61dmin", "/admin"),
            ("/api/%2e/secret", "/api/secret"),
            ("/api/%2E%2E/admin", "/admin"),
            ("/api/.%2e/admin", "/admin"),
            // Dot segments above the root stay at the root.
            ("/..", "/"),
            ("/../../etc/passwd", "/etc/passwd"),
            ("/a/b/..", "/a/"),
            ("/a/b/.", "/a/b/"),
            ("/a/./", "/a/"),
            ("///", "/"),
            // Other escapes stay encoded, hex upper-cased.
            ("/a%20b", "/a%20b"),
            ("/a%3fb%c3%a9", "/a%3Fb%C3%A9"),
        ];
        for (input, expected) in cases {
            assert_eq!(normalize(input).unwrap(), *expected, "{input}");
        }
        assert!(matches!(normalize("/api/secret"), Ok(Cow::Borrowed(_))));
    }

    #[test]
    fn refuses_ambiguous_paths() {
        let cases = [
            ("/api/x/..%2fsecret", PathRefusal::EncodedSlash),
            ("/api%2Fsecret", PathRefusal::EncodedSlash),
            ("/api/%5csecret", PathRefusal::EncodedBackslash),
            ("/api/secret%00", PathRefusal::EncodedNul),
            ("/api\\secret", PathRefusal::Backslash),
            ("/api/%zz", PathRefusal::BadEscape),
            ("/api/%7", PathRefusal::BadEscape),
            ("api/secret", PathRefusal::NotOriginForm),
            ("", PathRefusal::NotOriginForm),
        ];
        for (input, expected) in cases {
            assert_eq!(normalize(input), Err(expected), "{input}");
        }
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// The first, three-pass form of the check `needs_work` makes in
        /// one pass.
        fn needs_work_by_searches(path: &str) -> Result<bool, PathRefusal> {
            if path.as_bytes().contains(&b'\\') {
                return Err(PathRefusal::Backslash);
            }
            Ok(path.contains('%')
                || path.contains("//")
                || path
                    .split('/')
                    .any(|segment| segment == "." || segment == ".."))
        }

        proptest! {
            #![proptest_config(crate::testing::proptest_config(5_000))]

            /// The one-pass check agrees with the searches it replaced on
            /// paths made of the bytes that matter.
            #[test]
            fn the_one_pass_check_agrees_with_the_searches(
                rest in "[/.%a\\\\]{0,12}",
            ) {
                let path = format!("/{rest}");
                prop_assert_eq!(needs_work(path.as_bytes()), needs_work_by_searches(&path));
            }
        }
    }
}
