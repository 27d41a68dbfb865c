//! Trace context on the wire: reading W3C `traceparent`/`tracestate` and
//! B3 (single `b3` header, or the `X-B3-*` headers) from a request, and
//! writing `traceparent` for the next hop.
//!
//! Reading is strict, as the W3C Trace Context spec asks: a value that is
//! not exactly right (wrong lengths, upper-case hex, version `ff`, all-zero
//! ids, a second `traceparent`) is ignored as if absent, so the sidecar
//! starts a new trace instead of joining a corrupt one. `tracestate` is
//! only kept next to a valid `traceparent`, and is cut to
//! [`MAX_TRACESTATE_LEN`] by dropping whole members (the long ones first)
//! so what is forwarded stays valid. W3C wins over B3 when both are
//! present.
//!
//! Trace Context Level 2 (W3C Candidate Recommendation; section names
//! below are the spec's, `§` the section of "Trace Context HTTP Request
//! Headers Format" and of "Processing Model"):
//!
//! - **trace-flags** (§ trace-flags): two flags are defined, `sampled`
//!   (0x01) and `random-trace-id` (0x02). A continued trace keeps the
//!   random flag exactly as received (§ Random Trace ID Flag: "If the flag
//!   is set in the incoming `traceparent` header, it MUST also be set in
//!   all outgoing `traceparent` headers which use the same `trace-id`", and
//!   unset likewise). Every other bit is dropped on output (§ Other Flags:
//!   "Vendors MUST set those to zero"; Processing Model: "Vendors will set
//!   all unparsed / unknown `trace-flags` to 0 on outgoing requests"), but
//!   an unknown bit does not make a version-00 value invalid. A trace this
//!   sidecar starts has a fully random id ([`TraceId::random`]), so it sets
//!   the random flag, as the SHOULD in § Random Trace ID Flag asks; a
//!   trace id read from B3 carries no such promise, so the flag stays 0.
//! - **tracestate keys** (§ list-members, Key): one grammar,
//!   `key = ( lcalpha / DIGIT ) 0*255 ( keychar )` with
//!   `keychar = lcalpha / DIGIT / "_" / "-" / "*" / "/" / "@"`: up to 256
//!   characters, and `@` may appear anywhere after the first character,
//!   any number of times (`foo@=1`, `foo@@bar=1`, `tenant@system=1` with a
//!   tenant of any length). Level 1's separate `tenant@system` form (241 +
//!   14 characters, one `@`) is gone.
//! - **an invalid member** (Processing Model, step 3: "If the `tracestate`
//!   header cannot be parsed the vendor MAY discard the entire header.
//!   Invalid `tracestate` entries MAY also be discarded."): the spec allows
//!   either; this sidecar drops only the invalid members and forwards the
//!   valid ones, in order, so one bad vendor entry does not break every
//!   other vendor's correlation. The whole header is discarded only when it
//!   cannot be read as a list at all: bytes outside visible ASCII, or more
//!   than 32 members (§ tracestate Header Field Values: "a maximum of 32
//!   `list-member`s"). A `tracestate` without a valid `traceparent` is
//!   always discarded (Processing Model: "MUST NOT attempt to parse
//!   `tracestate`").

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
    /// The caller's `random-trace-id` flag (0x02), kept for the next hop;
    /// always false from B3.
    pub random: bool,
    /// Forwarded unchanged (only ever present with W3C input).
    pub tracestate: Option<HeaderValue>,
    /// Read from B3 headers (which the next hop then gets as W3C).
    pub from_b3: bool,
}

impl Incoming {
    /// The request's trace context: W3C first, then B3 single, then B3
    /// multi. `None` when there is none or it is invalid.
    pub fn extract(headers: &HeaderMap) -> Option<Incoming> {
        // Most requests carry no context at all: one pass over the names
        // (comparisons, no hashing) says which lookups can find anything.
        let (mut w3c, mut b3_single, mut b3_multi) = (false, false, false);
        for name in headers.keys() {
            w3c |= *name == TRACEPARENT;
            b3_single |= *name == B3;
            b3_multi |= *name == B3_TRACE_ID;
        }
        if w3c {
            if let Some(context) = from_w3c(headers) {
                return Some(context);
            }
        }
        if b3_single {
            if let Some(context) = from_b3_single(headers) {
                return Some(context);
            }
        }
        if b3_multi {
            return from_b3_multi(headers);
        }
        None
    }
}

/// `trace-flags` bit: the caller may have recorded trace data.
pub const FLAG_SAMPLED: u8 = 0x01;
/// `trace-flags` bit (Level 2): at least the right-most 7 bytes of the
/// trace id are random.
pub const FLAG_RANDOM: u8 = 0x02;

/// The `traceparent` (version 00) naming `span` of `trace_id` as the parent
/// of whatever the next hop does, with the `sampled` and `random-trace-id`
/// flags and no other bit set (§ Other Flags).
pub fn traceparent(trace_id: TraceId, span: SpanId, sampled: bool, random: bool) -> HeaderValue {
    let mut out = [0u8; 55];
    out[..3].copy_from_slice(b"00-");
    write_hex(&trace_id.0, &mut out[3..35]);
    out[35] = b'-';
    write_hex(&span.0, &mut out[36..52]);
    out[52] = b'-';
    let flags = (u8::from(sampled) * FLAG_SAMPLED) | (u8::from(random) * FLAG_RANDOM);
    out[53] = b'0';
    out[54] = HEX[usize::from(flags)];
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
        sampled: flags & FLAG_SAMPLED != 0,
        random: flags & FLAG_RANDOM != 0,
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

/// The request's `tracestate` (several headers joined with `,`, RFC 9110
/// §5.3), with invalid members dropped (see the module docs) and cut to
/// [`MAX_TRACESTATE_LEN`] if longer; `None` when no valid member is left or
/// the header cannot be read as a list.
fn tracestate(headers: &HeaderMap) -> Option<HeaderValue> {
    let mut members: Vec<&str> = Vec::new();
    let mut dropped = false;
    let mut seen = 0;
    for value in headers.get_all(TRACESTATE) {
        let text = value.to_str().ok()?;
        for member in text.split(',') {
            // "Spaces and horizontal tabs surrounding list-members are
            // ignored"; empty members are allowed and dropped.
            let member = member.trim_matches([' ', '\t']);
            if member.is_empty() {
                continue;
            }
            seen += 1;
            if seen > MAX_TRACESTATE_MEMBERS {
                return None;
            }
            if valid_tracestate_member(member) {
                members.push(member);
            } else {
                dropped = true;
            }
        }
    }
    if members.is_empty() {
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
        Some(original) if single && !too_long && !dropped => Some(original.clone()),
        _ => HeaderValue::from_str(&members.join(",")).ok(),
    }
}

/// `key=value` (§ list-members): key is `[a-z0-9][a-z0-9_\-*/@]{0,255}`
/// (Level 2: `@` is an ordinary key character after the first), value is
/// 1-256 printable ASCII characters other than `,` and `=`, not ending in
/// a space.
fn valid_tracestate_member(member: &str) -> bool {
    let Some((key, value)) = member.split_once('=') else {
        return false;
    };
    valid_tracestate_key(key) && valid_tracestate_value(value)
}

/// § Key: `key = ( lcalpha / DIGIT ) 0*255 ( keychar )`.
fn valid_tracestate_key(key: &str) -> bool {
    let keychar = |c: u8| {
        c.is_ascii_lowercase()
            || c.is_ascii_digit()
            || matches!(c, b'_' | b'-' | b'*' | b'/' | b'@')
    };
    key.len() <= 256
        && key
            .bytes()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && key.bytes().all(keychar)
}

/// § Value: `value = 0*255(chr) nblk-chr`, `nblk-chr = %x21-2B / %x2D-3C /
/// %x3E-7E`, `chr = %x20 / nblk-chr`.
fn valid_tracestate_value(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= 256
        && !value.ends_with(' ')
        && value
            .bytes()
            .all(|c| (0x20..=0x7e).contains(&c) && c != b',' && c != b'=')
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
        random: false,
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
        random: false,
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
        let value = traceparent(trace, span, true, false);
        let ctx = w3c(value.to_str().unwrap()).unwrap();
        assert_eq!((ctx.trace_id, ctx.parent, ctx.sampled), (trace, span, true));
        assert!(value.to_str().unwrap().ends_with("-01"));
        for (sampled, random, flags) in [
            (false, false, "-00"),
            (true, false, "-01"),
            (false, true, "-02"),
            (true, true, "-03"),
        ] {
            let value = traceparent(trace, span, sampled, random);
            assert!(value.to_str().unwrap().ends_with(flags), "{value:?}");
        }
    }

    // --- Trace Context Level 2, one test per rule ---

    /// § Random Trace ID Flag: the flag is read, and kept on the way out
    /// (set stays set, unset stays unset).
    #[test]
    fn the_random_trace_id_flag_is_read_and_kept() {
        for (flags, sampled, random) in [
            ("00", false, false),
            ("01", true, false),
            ("02", false, true),
            ("03", true, true),
        ] {
            let ctx = w3c(&format!("00-{TRACE}-{PARENT}-{flags}")).unwrap();
            assert_eq!((ctx.sampled, ctx.random), (sampled, random), "{flags}");
            let out = traceparent(ctx.trace_id, SpanId::random(), ctx.sampled, ctx.random);
            assert!(out.to_str().unwrap().ends_with(&format!("-{flags}")));
        }
    }

    /// § Other Flags: unknown bits do not invalidate a version-00 value
    /// (the bit field is masked), and are zero on output.
    #[test]
    fn unknown_flag_bits_are_accepted_and_cleared_on_output() {
        for (flags, expect_out) in [("ff", "03"), ("fc", "00"), ("06", "02"), ("09", "01")] {
            let ctx = w3c(&format!("00-{TRACE}-{PARENT}-{flags}")).unwrap();
            let out = traceparent(ctx.trace_id, ctx.parent, ctx.sampled, ctx.random);
            assert_eq!(
                out.to_str().unwrap(),
                format!("00-{TRACE}-{PARENT}-{expect_out}"),
                "{flags}"
            );
        }
    }

    /// § Versioning of traceparent: a higher version's flags are read the
    /// same way (the random bit too), and the output is version 00.
    #[test]
    fn a_higher_version_keeps_its_random_flag() {
        let ctx = w3c(&format!("01-{TRACE}-{PARENT}-02-more")).unwrap();
        assert!(ctx.random && !ctx.sampled);
    }

    /// B3 promises nothing about how its ids were made: no random flag.
    #[test]
    fn b3_input_has_no_random_flag() {
        let ctx = Incoming::extract(&headers(&[(B3, &format!("{TRACE}-{PARENT}-1"))])).unwrap();
        assert!(!ctx.random);
    }

    fn state_with(state: &str) -> Option<HeaderValue> {
        let good = format!("00-{TRACE}-{PARENT}-01");
        Incoming::extract(&headers(&[(TRACEPARENT, &good), (TRACESTATE, state)]))
            .unwrap()
            .tracestate
    }

    /// § Key: `@` is a key character anywhere after the first one, any
    /// number of times.
    #[test]
    fn keys_may_contain_at_signs_anywhere_after_the_first_character() {
        for state in [
            "foo@=1",
            "foo@@bar=1",
            "tenant@system=1",
            "a@b@c=1",
            "0@x=1",
            "t/e*n_a-n@t@s-y/s*t_e=1",
        ] {
            assert_eq!(state_with(state).unwrap(), state, "{state} must be kept");
        }
        for state in ["@foo=1", "@=1"] {
            assert_eq!(state_with(state), None, "{state} must be refused");
        }
    }

    /// § Key: up to 256 characters, starting with a lower-case letter or
    /// digit; the Level 1 tenant (241) and system (14) limits are gone.
    #[test]
    fn keys_are_up_to_256_characters_of_the_key_alphabet() {
        let longest = format!("{}=1", "k".repeat(256));
        assert_eq!(state_with(&longest).unwrap(), longest.as_str());
        assert_eq!(state_with(&format!("{}=1", "k".repeat(257))), None);
        let long_tenant = format!("{}@{}=1", "t".repeat(250), "s".repeat(5));
        assert_eq!(state_with(&long_tenant).unwrap(), long_tenant.as_str());
        let long_system = format!("t@{}=1", "s".repeat(100));
        assert_eq!(state_with(&long_system).unwrap(), long_system.as_str());
        for bad in [
            "Key=1",
            "_k=1",
            "-k=1",
            "*k=1",
            "/k=1",
            "k.x=1",
            "k x=1",
            "=1",
            "k\u{e9}=1",
        ] {
            assert_eq!(state_with(bad), None, "{bad:?} must be refused");
        }
        assert_eq!(state_with("9lives=1").unwrap(), "9lives=1");
    }

    /// § Value: 1-256 printable ASCII characters but `,` and `=`, not
    /// ending in a space (trailing spaces are OWS, leading ones are kept).
    #[test]
    fn values_follow_the_value_grammar() {
        let longest = format!("k={}", "v".repeat(256));
        assert_eq!(state_with(&longest).unwrap(), longest.as_str());
        assert_eq!(state_with(&format!("k={}", "v".repeat(257))), None);
        assert_eq!(state_with("k= lead").unwrap(), "k= lead");
        assert_eq!(state_with("k=trail ").unwrap(), "k=trail ");
        for bad in ["k=", "k=a=b", "k=a\tb"] {
            assert_eq!(state_with(bad), None, "{bad:?} must be refused");
        }
    }

    /// Processing Model step 3: invalid entries MAY be discarded (chosen
    /// here) instead of the whole header; valid ones keep their order.
    #[test]
    fn an_invalid_member_drops_only_itself() {
        assert_eq!(
            state_with("congo=1,Bad=2,rojo=3").unwrap(),
            "congo=1,rojo=3"
        );
        assert_eq!(state_with("a=1,novalue,b=2").unwrap(), "a=1,b=2");
        assert_eq!(state_with("Bad=2"), None, "nothing valid left");
        // Two headers: an invalid member in one spares the other.
        let good = format!("00-{TRACE}-{PARENT}-01");
        let map = headers(&[
            (TRACEPARENT, &good),
            (TRACESTATE, "a=1,@x=2"),
            (TRACESTATE, "b=2"),
        ]);
        assert_eq!(
            Incoming::extract(&map).unwrap().tracestate.unwrap(),
            "a=1,b=2"
        );
    }

    /// § tracestate Header Field Values: empty and whitespace-only members
    /// are allowed; more than 32 members is not a list: discarded whole.
    #[test]
    fn empty_members_are_allowed_and_33_members_are_not() {
        assert_eq!(state_with("a=1, ,\t,b=2").unwrap(), "a=1, ,\t,b=2");
        assert_eq!(state_with(" , "), None);
        let members: Vec<String> = (0..32).map(|i| format!("k{i}=v")).collect();
        assert!(state_with(&members.join(",")).is_some());
        let members: Vec<String> = (0..33).map(|i| format!("k{i}=v")).collect();
        assert_eq!(state_with(&members.join(",")), None);
    }

    /// Property tests (proptest: stable Rust; nightly and `cargo fuzz` are
    /// not on the CI machine). Case count: `PROPTEST_CASES`, else a CI-
    /// sized default.
    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn config() -> ProptestConfig {
            crate::testing::proptest_config(2_000)
        }

        fn hex_id(len: usize) -> impl Strategy<Value = String> {
            prop::collection::vec(0u8..16, len)
                .prop_filter("not all zero", |d| d.iter().any(|&x| x != 0))
                .prop_map(|d| d.iter().map(|&x| HEX[usize::from(x)] as char).collect())
        }

        /// Short keys of every key character, and some near the 256 limit
        /// (padded, as a regex of that length is slow to generate).
        fn key() -> impl Strategy<Value = String> {
            (
                "[a-z0-9][a-z0-9_*/@-]{0,20}",
                prop::option::weighted(0.1, 210usize..=235),
            )
                .prop_map(|(k, pad)| k + &"@".repeat(pad.unwrap_or(0)))
        }

        fn value() -> impl Strategy<Value = String> {
            "[ -+--<>-~]{0,30}[!-+--<>-~]"
        }

        fn member() -> impl Strategy<Value = String> {
            (key(), value()).prop_map(|(k, v)| format!("{k}={v}"))
        }

        proptest! {
            #![proptest_config(config())]

            /// Any header bytes at all: no panic; whatever is accepted is
            /// well formed.
            #[test]
            fn arbitrary_headers_never_panic(
                parent in prop::collection::vec(any::<u8>(), 0..80),
                state in prop::collection::vec(any::<u8>(), 0..600),
            ) {
                let mut map = HeaderMap::new();
                if let Ok(v) = HeaderValue::from_bytes(&parent) {
                    map.insert(super::TRACEPARENT, v);
                }
                if let Ok(v) = HeaderValue::from_bytes(&state) {
                    map.insert(super::TRACESTATE, v);
                }
                if let Some(ctx) = Incoming::extract(&map) {
                    prop_assert!(ctx.trace_id.0 != [0; 16] && ctx.parent.0 != [0; 8]);
                    if let Some(state) = ctx.tracestate {
                        let text = state.to_str().unwrap();
                        prop_assert!(text.len() <= MAX_TRACESTATE_LEN);
                        for m in text.split(',').map(|m| m.trim_matches([' ', '\t'])) {
                            prop_assert!(m.is_empty() || valid_tracestate_member(m), "{:?}", m);
                        }
                    }
                }
            }

            /// Valid traceparents read back exactly and are written back
            /// with the same ids and the two known flags only.
            #[test]
            fn valid_traceparents_round_trip(
                trace in hex_id(32),
                parent in hex_id(16),
                flags in any::<u8>(),
            ) {
                let value = format!("00-{trace}-{parent}-{flags:02x}");
                let ctx = w3c(&value).unwrap();
                prop_assert_eq!(ctx.trace_id.to_string(), trace.clone());
                prop_assert_eq!(ctx.parent.to_string(), parent.clone());
                prop_assert_eq!(ctx.sampled, flags & 1 != 0);
                prop_assert_eq!(ctx.random, flags & 2 != 0);
                let out = traceparent(ctx.trace_id, ctx.parent, ctx.sampled, ctx.random);
                prop_assert_eq!(out.to_str().unwrap(), format!("00-{trace}-{parent}-{:02x}", flags & 3));
            }

            /// One corrupted character (not lower-case hex where hex is
            /// due, not `-` where a dash is due) or a changed length: never
            /// accepted as version 00.
            #[test]
            fn corrupted_traceparents_are_never_accepted(
                trace in hex_id(32),
                parent in hex_id(16),
                at in 0usize..55,
                replacement in any::<u8>(),
                cut in 0usize..55,
                extra in "[0-9a-f-]{1,4}",
                which in 0u8..3,
            ) {
                let good = format!("00-{trace}-{parent}-01");
                let dash = matches!(at, 2 | 35 | 52);
                let hex = replacement.is_ascii_digit() || (b'a'..=b'f').contains(&replacement);
                let bad = match which {
                    0 if (dash && replacement != b'-') || (!dash && !hex) => {
                        let mut b = good.clone().into_bytes();
                        b[at] = replacement;
                        b
                    }
                    1 => good.as_bytes()[..cut].to_vec(),
                    _ => format!("{good}{extra}").into_bytes(),
                };
                if let Ok(value) = HeaderValue::from_bytes(&bad) {
                    let mut map = HeaderMap::new();
                    map.insert(super::TRACEPARENT, value);
                    prop_assert_eq!(Incoming::extract(&map), None, "{:?}", String::from_utf8_lossy(&bad));
                }
            }

            /// A list of valid members (≤ 32, fitting 512) is forwarded
            /// byte for byte; inserting invalid members drops just those.
            #[test]
            fn valid_tracestates_round_trip_and_invalid_members_drop_alone(
                members in prop::collection::vec(member(), 1..32),
                bad in prop::collection::vec("[A-Z@_*/-][a-z]{0,5}=x|[a-z]{1,5}|[a-z]{1,5}=|[a-z]{1,3}=a=b", 0..3),
                at in any::<prop::sample::Index>(),
            ) {
                let mut fitting: Vec<String> = Vec::new();
                for m in members {
                    if fitting.iter().map(|f| f.len() + 1).sum::<usize>() + m.len() <= MAX_TRACESTATE_LEN {
                        fitting.push(m);
                    }
                }
                let joined = fitting.join(",");
                prop_assert_eq!(state_with(&joined), Some(HeaderValue::from_str(&joined).unwrap()));
                let mut mixed = fitting.clone();
                for b in &bad {
                    if mixed.len() < MAX_TRACESTATE_MEMBERS {
                        mixed.insert(at.index(mixed.len() + 1), b.clone());
                    }
                }
                prop_assert_eq!(state_with(&mixed.join(",")), Some(HeaderValue::from_str(&joined).unwrap()));
            }
        }
    }
}
