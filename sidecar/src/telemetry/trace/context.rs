//! Trace context on the wire: reading W3C `traceparent`/`tracestate` and
//! B3 (single `b3` header, or the `X-B3-*` headers) from a request, and
//! writing `traceparent` for the next hop.
//!
//! Reading is strict, as the W3C Trace Context spec asks: a value that is
//! not exactly right (wrong lengths, upper-case hex, version `ff`, all-zero
//! ids, a second `traceparent`) is ignored as if absent, so the sidecar
//! starts a new trace instead of joining a corrupt one. `tracestate` is
//! only kept next to a valid `traceparent`, must parse as a list of
//! `key=value` members, and is cut to [`MAX_TRACESTATE_LEN`] by dropping
//! whole members (the long ones first) so what is forwarded stays valid.
//! W3C wins over B3 when both are present.

use std::fmt;

use http::{HeaderMap, HeaderName, HeaderValue};

// Header names as constants: a lookup by `&str` would parse the name on
// every request.
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
const B3: HeaderName = HeaderName::from_static("b3");
const B3_TRACE_ID: HeaderName = HeaderName::from_static("x-b3-traceid");
const B3_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-spanid");
const B3_PARENT_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-parentspanid");
const B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
const B3_FLAGS: HeaderName = HeaderName::from_static("x-b3-flags");

/// The most `tracestate` a sidecar forwards (the spec's "at least 512").
pub const MAX_TRACESTATE_LEN: usize = 512;
/// The spec's limit on `tracestate` list members.
const MAX_TRACESTATE_MEMBERS: usize = 32;
/// Members longer than this go first when `tracestate` must shrink.
const LONG_TRACESTATE_MEMBER: usize = 128;

/// A 16-byte trace id, never all zero.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceId(pub [u8; 16]);

/// An 8-byte span id, never all zero.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SpanId(pub [u8; 8]);

/// Random non-zero ids (drawn from an integer of the id's width) that
/// print as lower-case hex, in `Display` and `Debug` alike.
macro_rules! hex_id {
    ($($id:ident: $int:ident),*) => {$(
        impl $id {
            pub fn random() -> Self {
                loop {
                    let id = fastrand::$int(..).to_be_bytes();
                    if id.iter().any(|&b| b != 0) {
                        return $id(id);
                    }
                }
            }
        }

        impl fmt::Display for $id {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&hex(&self.0))
            }
        }

        impl fmt::Debug for $id {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(self, f)
            }
        }
    )*};
}

hex_id!(TraceId: u128, SpanId: u64);

/// The context a request arrived with: whose trace it belongs to, which
/// span sent it, and whether the trace is being recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incoming {
    pub trace_id: TraceId,
    /// The caller's span: the parent of the span this hop creates.
    pub parent: SpanId,
    pub sampled: bool,
    /// Forwarded unchanged (only ever present with W3C input).
    pub tracestate: Option<HeaderValue>,
    /// Read from B3 headers (which the next hop then gets as W3C).
    pub from_b3: bool,
}

impl Incoming {
    /// The request's trace context: W3C first, then B3 single, then B3
    /// multi. `None` when there is none or it is invalid.
    pub fn extract(headers: &HeaderMap) -> Option<Incoming> {
        if let Some(context) = from_w3c(headers) {
            return Some(context);
        }
        from_b3_single(headers).or_else(|| from_b3_multi(headers))
    }
}

/// The `traceparent` (version 00) naming `span` of `trace_id` as the parent
/// of whatever the next hop does.
pub fn traceparent(trace_id: TraceId, span: SpanId, sampled: bool) -> HeaderValue {
    let mut out = [0u8; 55];
    out[..3].copy_from_slice(b"00-");
    write_hex(&trace_id.0, &mut out[3..35]);
    out[35] = b'-';
    write_hex(&span.0, &mut out[36..52]);
    out[52] = b'-';
    out[53] = b'0';
    out[54] = if sampled { b'1' } else { b'0' };
    HeaderValue::from_bytes(&out).expect("hex digits and dashes are a valid header value")
}

/// Removes the B3 headers (after they were read): the next hop gets W3C.
pub fn remove_b3(headers: &mut HeaderMap) {
    for name in [
        B3,
        B3_TRACE_ID,
        B3_SPAN_ID,
        B3_PARENT_SPAN_ID,
        B3_SAMPLED,
        B3_FLAGS,
    ] {
        headers.remove(name);
    }
}

fn from_w3c(headers: &HeaderMap) -> Option<Incoming> {
    let mut values = headers.get_all(TRACEPARENT).iter();
    let value = values.next()?;
    if values.next().is_some() {
        return None; // two traceparents: which one? neither.
    }
    let (trace_id, parent, flags) = parse_traceparent(value.as_bytes())?;
    Some(Incoming {
        trace_id,
        parent,
        sampled: flags & 1 == 1,
        tracestate: tracestate(headers),
        from_b3: false,
    })
}

/// `version-traceid-parentid-flags`, lower-case hex. Version 00 must be
/// exactly 55 bytes; a later version may carry more fields after a `-`.
fn parse_traceparent(value: &[u8]) -> Option<(TraceId, SpanId, u8)> {
    if value.len() < 55 || value[2] != b'-' || value[35] != b'-' || value[52] != b'-' {
        return None;
    }
    let version = parse_hex::<1>(&value[..2])?[0];
    match version {
        0xff => return None,
        0x00 if value.len() != 55 => return None,
        _ if value.len() > 55 && value[55] != b'-' => return None,
        _ => {}
    }
    let trace_id = parse_hex::<16>(&value[3..35])?;
    let parent = parse_hex::<8>(&value[36..52])?;
    let flags = parse_hex::<1>(&value[53..55])?[0];
    if trace_id == [0; 16] || parent == [0; 8] {
        return None;
    }
    Some((TraceId(trace_id), SpanId(parent), flags))
}

/// The request's `tracestate` (several headers joined with `,`), if every
/// member is well formed; cut to [`MAX_TRACESTATE_LEN`] if longer.
fn tracestate(headers: &HeaderMap) -> Option<HeaderValue> {
    let mut members: Vec<&str> = Vec::new();
    for value in headers.get_all(TRACESTATE) {
        let text = value.to_str().ok()?;
        for member in text.split(',') {
            let member = member.trim_matches([' ', '\t']);
            if member.is_empty() {
                continue; // empty members are allowed and dropped
            }
            if !valid_tracestate_member(member) {
                return None;
            }
            members.push(member);
        }
    }
    if members.is_empty() || members.len() > MAX_TRACESTATE_MEMBERS {
        return None;
    }
    let joined_len = |m: &[&str]| m.iter().map(|s| s.len()).sum::<usize>() + m.len() - 1;
    let too_long = joined_len(&members) > MAX_TRACESTATE_LEN;
    if too_long {
        members.retain(|m| m.len() <= LONG_TRACESTATE_MEMBER);
        while !members.is_empty() && joined_len(&members) > MAX_TRACESTATE_LEN {
            members.pop();
        }
        if members.is_empty() {
            return None;
        }
    }
    // Unchanged when nothing had to go: the exact bytes received.
    let single = headers.get_all(TRACESTATE).iter().count() == 1;
    match headers.get(TRACESTATE) {
        Some(original) if single && !too_long => Some(original.clone()),
        _ => HeaderValue::from_str(&members.join(",")).ok(),
    }
}

/// `key=value` where key is `[a-z0-9][a-z0-9_\-*/]{0,255}` or
/// `tenant@system` (tenant up to 241, system up to 14 characters), and
/// value is 1-256 printable ASCII characters other than `,` and `=`, not
/// ending in a space.
fn valid_tracestate_member(member: &str) -> bool {
    let Some((key, value)) = member.split_once('=') else {
        return false;
    };
    let key_char = |c: u8| {
        c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'_' | b'-' | b'*' | b'/')
    };
    let key_start = |part: &str| {
        part.bytes()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
    };
    let key_ok = match key.split_once('@') {
        None => key_start(key) && key.len() <= 256 && key.bytes().all(key_char),
        Some((tenant, system)) => {
            key_start(tenant)
                && tenant.len() <= 241
                && tenant.bytes().all(key_char)
                && system
                    .bytes()
                    .next()
                    .is_some_and(|c| c.is_ascii_lowercase())
                && system.len() <= 14
                && system.bytes().all(key_char)
        }
    };
    let value_ok = !value.is_empty()
        && value.len() <= 256
        && !value.ends_with(' ')
        && value
            .bytes()
            .all(|c| (0x20..=0x7e).contains(&c) && c != b',' && c != b'=');
    key_ok && value_ok
}

/// `b3: {traceid}-{spanid}[-{sampling}[-{parentspanid}]]` or `b3: 0|1|d`
/// alone (a sampling decision without ids: no context to join).
fn from_b3_single(headers: &HeaderMap) -> Option<Incoming> {
    let value = headers.get(B3)?.to_str().ok()?;
    let mut parts = value.split('-');
    let trace_id = parse_b3_trace_id(parts.next()?)?;
    let parent = SpanId(parse_hex::<8>(parts.next()?.as_bytes())?);
    let sampled = match parts.next() {
        None => true, // deferred: the caller did not decide, we do
        Some("1") | Some("d") => true,
        Some("0") => false,
        Some(_) => return None,
    };
    if let Some(parent_of_parent) = parts.next() {
        parse_hex::<8>(parent_of_parent.as_bytes())?;
    }
    if parts.next().is_some() || parent.0 == [0; 8] {
        return None;
    }
    Some(Incoming {
        trace_id,
        parent,
        sampled,
        tracestate: None,
        from_b3: true,
    })
}

/// `X-B3-TraceId`, `X-B3-SpanId`, `X-B3-Sampled` (`1`/`0`, `true`/`false`),
/// `X-B3-Flags: 1` (debug: sampled).
fn from_b3_multi(headers: &HeaderMap) -> Option<Incoming> {
    let text = |name| headers.get(name).and_then(|v| v.to_str().ok());
    let trace_id = parse_b3_trace_id(text(B3_TRACE_ID)?)?;
    let parent = SpanId(parse_hex::<8>(text(B3_SPAN_ID)?.as_bytes())?);
    if parent.0 == [0; 8] {
        return None;
    }
    let debug = text(B3_FLAGS) == Some("1");
    let sampled = match text(B3_SAMPLED) {
        _ if debug => true,
        None => true,
        Some("1") | Some("true") => true,
        Some("0") | Some("false") => false,
        Some(_) => return None,
    };
    Some(Incoming {
        trace_id,
        parent,
        sampled,
        tracestate: None,
        from_b3: true,
    })
}

/// A B3 trace id: 32 or 16 hex digits (the short form is zero-extended).
fn parse_b3_trace_id(text: &str) -> Option<TraceId> {
    let id = match text.len() {
        32 => parse_hex::<16>(text.as_bytes())?,
        16 => {
            let low = parse_hex::<8>(text.as_bytes())?;
            let mut id = [0; 16];
            id[8..].copy_from_slice(&low);
            id
        }
        _ => return None,
    };
    (id != [0; 16]).then_some(TraceId(id))
}

/// Exactly `2 * N` lower-case hex digits.
fn parse_hex<const N: usize>(text: &[u8]) -> Option<[u8; N]> {
    if text.len() != 2 * N {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; N];
    for (i, pair) in text.chunks_exact(2).enumerate() {
        out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn write_hex(bytes: &[u8], out: &mut [u8]) {
    for (i, b) in bytes.iter().enumerate() {
        out[2 * i] = HEX[usize::from(b >> 4)];
        out[2 * i + 1] = HEX[usize::from(b & 0xf)];
    }
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    let mut out = vec![0u8; bytes.len() * 2];
    write_hex(bytes, &mut out);
    String::from_utf8(out).expect("hex digits are ASCII")
}

#[cfg(test)]
mod tests {
    use super::*;

    // (Names as text for the test helper; these shadow the HeaderNames.)
    const TRACEPARENT: &str = "traceparent";
    const TRACESTATE: &str = "tracestate";
    const B3: &str = "b3";
    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const PARENT: &str = "00f067aa0ba902b7";

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        map
    }

    fn w3c(value: &str) -> Option<Incoming> {
        Incoming::extract(&headers(&[(TRACEPARENT, value)]))
    }

    #[test]
    fn a_valid_traceparent_is_joined_with_its_flag() {
        let sampled = w3c(&format!("00-{TRACE}-{PARENT}-01")).unwrap();
        assert_eq!(sampled.trace_id.to_string(), TRACE);
        assert_eq!(sampled.parent.to_string(), PARENT);
        assert!(sampled.sampled);
        assert!(!w3c(&format!("00-{TRACE}-{PARENT}-00")).unwrap().sampled);
        // Other flag bits do not change sampling.
        assert!(w3c(&format!("00-{TRACE}-{PARENT}-03")).unwrap().sampled);
    }

    #[test]
    fn invalid_traceparents_are_ignored() {
        let zero_trace = "0".repeat(32);
        let zero_span = "0".repeat(16);
        for bad in [
            format!("ff-{TRACE}-{PARENT}-01"),         // forbidden version
            format!("0-{TRACE}-{PARENT}-01"),          // short version
            format!("00-{zero_trace}-{PARENT}-01"),    // all-zero trace id
            format!("00-{TRACE}-{zero_span}-01"),      // all-zero parent
            format!("00-{}-{PARENT}-01", &TRACE[1..]), // short trace id
            format!("00-{TRACE}0-{PARENT}-01"),        // long trace id
            format!("00-{TRACE}-{}-01", &PARENT[1..]), // short parent
            format!("00-{}-{PARENT}-01", TRACE.to_uppercase()), // upper-case hex
            format!("00-{TRACE}-{}-01", PARENT.to_uppercase()), // upper-case hex
            format!("00-{TRACE}-{PARENT}-0g"),         // bad flags
            format!("00-{TRACE}-{PARENT}-01-extra"),   // v00 with more
            format!("00_{TRACE}_{PARENT}_01"),         // wrong separators
            String::new(),
        ] {
            assert_eq!(w3c(&bad), None, "{bad:?} must be rejected");
        }
    }

    #[test]
    fn a_future_version_is_read_by_its_first_fields() {
        let ctx = w3c(&format!("cc-{TRACE}-{PARENT}-01-what-the-future-holds")).unwrap();
        assert_eq!(ctx.trace_id.to_string(), TRACE);
        assert_eq!(w3c(&format!("cc-{TRACE}-{PARENT}-01x")), None);
    }

    #[test]
    fn two_traceparents_are_invalid() {
        let map = headers(&[
            (TRACEPARENT, &format!("00-{TRACE}-{PARENT}-01")),
            (TRACEPARENT, &format!("00-{TRACE}-{PARENT}-00")),
        ]);
        assert_eq!(Incoming::extract(&map), None);
    }

    #[test]
    fn tracestate_is_kept_unchanged_only_with_a_valid_traceparent() {
        let state = "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7, tenant@vendor=x";
        let good = format!("00-{TRACE}-{PARENT}-01");
        let ctx = Incoming::extract(&headers(&[(TRACEPARENT, &good), (TRACESTATE, state)]));
        assert_eq!(ctx.unwrap().tracestate.unwrap(), state);
        let bad = format!("00-{}-{PARENT}-01", "0".repeat(32));
        assert_eq!(
            Incoming::extract(&headers(&[(TRACEPARENT, &bad), (TRACESTATE, state)])),
            None
        );
    }

    #[test]
    fn malformed_tracestate_is_dropped_and_long_one_cut() {
        let good = format!("00-{TRACE}-{PARENT}-01");
        let with = |state: &str| {
            Incoming::extract(&headers(&[(TRACEPARENT, &good), (TRACESTATE, state)]))
                .unwrap()
                .tracestate
        };
        assert_eq!(with("Upper=1"), None);
        assert_eq!(with("novalue"), None);
        assert_eq!(with("a=b=c"), None);
        let members: Vec<String> = (0..33).map(|i| format!("k{i}=v")).collect();
        assert_eq!(with(&members.join(",")), None, "over 32 members");
        // 20 members of 30 bytes = 619 bytes: cut to members that fit 512.
        let long: Vec<String> = (0..20)
            .map(|i| format!("key{i:02}={}", "x".repeat(24)))
            .collect();
        let cut = with(&long.join(",")).unwrap();
        assert!(cut.len() <= MAX_TRACESTATE_LEN);
        assert!(cut.to_str().unwrap().starts_with("key00="));
        assert!(cut
            .to_str()
            .unwrap()
            .split(',')
            .all(valid_tracestate_member));
        // Two headers are one list.
        let map = headers(&[
            (TRACEPARENT, &good),
            (TRACESTATE, "a=1"),
            (TRACESTATE, "b=2"),
        ]);
        assert_eq!(
            Incoming::extract(&map).unwrap().tracestate.unwrap(),
            "a=1,b=2"
        );
    }

    #[test]
    fn b3_single_and_multi_are_read() {
        let single = Incoming::extract(&headers(&[(B3, &format!("{TRACE}-{PARENT}-1"))])).unwrap();
        assert_eq!(single.trace_id.to_string(), TRACE);
        assert_eq!(single.parent.to_string(), PARENT);
        assert!(single.sampled);
        let denied = Incoming::extract(&headers(&[(B3, &format!("{TRACE}-{PARENT}-0"))])).unwrap();
        assert!(!denied.sampled);
        let short =
            Incoming::extract(&headers(&[(B3, &format!("a3ce929d0e0e4736-{PARENT}"))])).unwrap();
        assert_eq!(
            short.trace_id.to_string(),
            "0000000000000000a3ce929d0e0e4736"
        );
        assert_eq!(Incoming::extract(&headers(&[(B3, "1")])), None);
        assert_eq!(
            Incoming::extract(&headers(&[(B3, &format!("{TRACE}-{PARENT}-x"))])),
            None
        );

        let multi = Incoming::extract(&headers(&[
            ("X-B3-TraceId", TRACE),
            ("X-B3-SpanId", PARENT),
            ("X-B3-Sampled", "0"),
        ]))
        .unwrap();
        assert!(!multi.sampled);
        let debug = Incoming::extract(&headers(&[
            ("X-B3-TraceId", TRACE),
            ("X-B3-SpanId", PARENT),
            ("X-B3-Sampled", "0"),
            ("X-B3-Flags", "1"),
        ]))
        .unwrap();
        assert!(debug.sampled);
    }

    #[test]
    fn w3c_wins_over_b3() {
        let other = "11111111111111111111111111111111";
        let map = headers(&[
            (TRACEPARENT, &format!("00-{TRACE}-{PARENT}-01")),
            (B3, &format!("{other}-{PARENT}-1")),
        ]);
        assert_eq!(Incoming::extract(&map).unwrap().trace_id.to_string(), TRACE);
    }

    #[test]
    fn written_traceparent_reads_back() {
        let (trace, span) = (TraceId::random(), SpanId::random());
        let value = traceparent(trace, span, true);
        let ctx = w3c(value.to_str().unwrap()).unwrap();
        assert_eq!((ctx.trace_id, ctx.parent, ctx.sampled), (trace, span, true));
        assert!(value.to_str().unwrap().ends_with("-01"));
        assert!(traceparent(trace, span, false)
            .to_str()
            .unwrap()
            .ends_with("-00"));
    }
}
