//! An upstream HTTP/1.1 response's header fields kept as the lines the
//! client will get, instead of a `HeaderMap` (issue 17: building the map
//! and writing it out again cost ~3 500 instructions of the ~26 000 a
//! proxied request takes).
//!
//! ```text
//! h1_client::parse_head ─ plain head? ─► ResponseFields (lines) in the ResponseBody,
//!                                        the response's HeaderMap left empty
//!   listen::h1_server ─► writes the map's fields (the sidecar's own), then these lines
//!   any other way out ─► ProxyBody::restore_fields: the lines go back into the map
//!                        (hyper's server: HTTP/2 clients, HTTP/1.1 after a handover;
//!                        a route's response header edits)
//! ```
//!
//! A head is *plain* when its fields need no decision beyond what the
//! client's server writes anyway: a final status other than 204 and 304,
//! not an answer to HEAD, one valid `Content-Length`, no
//! `Transfer-Encoding`, no `Trailer`, and a `Connection` field (if any)
//! naming only `close`/`keep-alive`. Any other head becomes a `HeaderMap`
//! as before. The lines hold every field but `Content-Length` (the body's
//! exact length is written from the body, as hyper does) and the
//! hop-by-hop ones (`proxy::headers::strip_hop_by_hop`'s list), each as
//! `name: value\r\n` with the name in lower case: the bytes hyper's server
//! would write for the same map, in the upstream's order.
//!
//! The lines travel in the response body, so whatever replaces a body
//! (an error response, a retry) drops them with it. Code that reads or
//! edits an upstream response's headers calls
//! [`crate::body::ProxyBody::restore_fields`] first.

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};

/// What a field's name means to the proxy, from its bytes (any case)
/// without building a `HeaderName`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FieldKind {
    ContentLength,
    TransferEncoding,
    Connection,
    Trailer,
    Date,
    /// Removed before forwarding (`proxy::headers`' hop-by-hop list, less
    /// `Connection`, `Transfer-Encoding` and `TE`).
    HopByHop,
    /// `TE`: the proxy's hop-by-hop rule keeps a `TE: trailers`, so a head
    /// with one is not plain (the map decides, as before).
    Te,
    /// A name `HeaderName` refuses (longer than 64 KiB - 1; httparse has
    /// no limit): the head is not plain, and the map refuses it as before.
    TooLong,
    Other,
}

/// The longest name `HeaderName` takes.
const MAX_NAME: usize = 65_535;

impl FieldKind {
    pub(crate) fn of(name: &[u8]) -> FieldKind {
        // `known` is lower-case letters and `-`; of the bytes a token may
        // hold, only the same letter in either case gives the same byte
        // once 0x20 is set (and only `-` gives `-`).
        let is = |known: &[u8]| name.iter().zip(known).all(|(&b, &k)| b | 0x20 == k);
        match name.len() {
            2 if is(b"te") => FieldKind::Te,
            4 if is(b"date") => FieldKind::Date,
            7 if is(b"trailer") => FieldKind::Trailer,
            7 if is(b"upgrade") => FieldKind::HopByHop,
            10 if is(b"connection") => FieldKind::Connection,
            10 if is(b"keep-alive") => FieldKind::HopByHop,
            14 if is(b"content-length") => FieldKind::ContentLength,
            16 if is(b"proxy-connection") => FieldKind::HopByHop,
            17 if is(b"transfer-encoding") => FieldKind::TransferEncoding,
            18 if is(b"proxy-authenticate") => FieldKind::HopByHop,
            19 if is(b"proxy-authorization") => FieldKind::HopByHop,
            len if len > MAX_NAME => FieldKind::TooLong,
            _ => FieldKind::Other,
        }
    }

    /// Whether a field of this kind is among a plain head's lines.
    pub(crate) fn forwarded(self) -> bool {
        matches!(self, FieldKind::Date | FieldKind::Other)
    }
}

/// A plain response head's end-to-end fields as `name: value\r\n` lines.
/// Small (a boxed slice, not `Bytes`): it rides in every response body,
/// which is copied whole each time a response moves.
#[derive(Debug, Clone)]
pub struct ResponseFields {
    lines: Box<[u8]>,
    has_date: bool,
}

impl ResponseFields {
    /// The lines for the fields of a plain head: name, value as httparse
    /// gave them (a token, and a value without surrounding whitespace) and
    /// the name's kind.
    pub(crate) fn encode<'a>(
        fields: impl Iterator<Item = (&'a [u8], &'a [u8], FieldKind)> + Clone,
    ) -> Self {
        let fields = fields.filter(|(_, _, kind)| kind.forwarded());
        // The exact size, so that the box takes the vector as it is.
        let size: usize = fields
            .clone()
            .map(|(name, value, _)| name.len() + value.len() + 4)
            .sum();
        let mut lines = Vec::with_capacity(size);
        let mut has_date = false;
        for (name, value, kind) in fields {
            has_date |= kind == FieldKind::Date;
            let start = lines.len();
            lines.extend_from_slice(name);
            lines[start..].make_ascii_lowercase();
            lines.extend_from_slice(b": ");
            lines.extend_from_slice(value);
            lines.extend_from_slice(b"\r\n");
        }
        ResponseFields {
            lines: lines.into_boxed_slice(),
            has_date,
        }
    }

    /// The lines, each ended by CRLF, to write after a status line.
    pub fn lines(&self) -> &[u8] {
        &self.lines
    }

    /// Whether the upstream sent a `Date` (the server adds one otherwise).
    pub fn has_date(&self) -> bool {
        self.has_date
    }

    /// Appends the fields to `headers` (values share the lines' buffer).
    /// A field the map would refuse is skipped; none is: httparse accepts
    /// the same bytes in names and values, and a head with a name longer
    /// than the map takes is not plain (see the tests).
    pub fn restore_into(self, headers: &mut HeaderMap) {
        let mut at = 0;
        let lines = Bytes::from(self.lines);
        while let Some(end) = lines[at..].windows(2).position(|w| w == b"\r\n") {
            let line = at..at + end;
            at += end + 2;
            let Some(colon) = lines[line.clone()].iter().position(|&b| b == b':') else {
                continue;
            };
            let name = &lines[line.start..line.start + colon];
            let value = lines.slice(line.start + colon + 2..line.end);
            if let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(name),
                HeaderValue::from_maybe_shared(value),
            ) {
                headers.append(name, value);
            } else {
                debug_assert!(false, "a line httparse accepted was refused by the map");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::headers::strip_hop_by_hop;

    #[test]
    fn kinds_agree_with_the_hop_by_hop_rule() {
        // Every name `strip_hop_by_hop` removes from a response is one the
        // lines leave out, in any case; other names are kept (`TE`, which
        // it keeps as `TE: trailers`, makes a head not plain).
        for name in [
            "connection",
            "Proxy-Connection",
            "KEEP-ALIVE",
            "te",
            "transfer-encoding",
            "Upgrade",
            "proxy-authorization",
            "proxy-authenticate",
            "server",
            "date",
            "x-te",
            "content-type",
            "trailer",
        ] {
            if FieldKind::of(name.as_bytes()) == FieldKind::Te {
                continue;
            }
            let mut map = HeaderMap::new();
            map.insert(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_static("v"),
            );
            strip_hop_by_hop(&mut map, false);
            let kind = FieldKind::of(name.as_bytes());
            let stripped = map.is_empty();
            assert_eq!(
                stripped,
                matches!(
                    kind,
                    FieldKind::HopByHop | FieldKind::Connection | FieldKind::TransferEncoding
                ),
                "{name}: {kind:?}"
            );
        }
    }

    #[test]
    fn kinds_are_known_in_any_case_and_only_by_their_whole_name() {
        assert_eq!(FieldKind::of(b"Content-Length"), FieldKind::ContentLength);
        assert_eq!(FieldKind::of(b"CONTENT-LENGTH"), FieldKind::ContentLength);
        assert_eq!(FieldKind::of(b"content_length"), FieldKind::Other);
        assert_eq!(FieldKind::of(b"content-lengthy"), FieldKind::Other);
        assert_eq!(FieldKind::of(b"DaTe"), FieldKind::Date);
        assert_eq!(FieldKind::of(b"dat"), FieldKind::Other);
        assert_eq!(FieldKind::of(b"Te"), FieldKind::Te);
        assert_eq!(FieldKind::of(&[b'a'; MAX_NAME]), FieldKind::Other);
        assert_eq!(FieldKind::of(&[b'a'; MAX_NAME + 1]), FieldKind::TooLong);
        assert!(HeaderName::from_bytes(&[b'a'; MAX_NAME]).is_ok());
        assert!(HeaderName::from_bytes(&[b'a'; MAX_NAME + 1]).is_err());
        assert_eq!(FieldKind::of(b"t\x05"), FieldKind::Other);
        assert_eq!(FieldKind::of(b"Connection"), FieldKind::Connection);
        assert_eq!(FieldKind::of(b"keep_alive"), FieldKind::Other);
    }

    #[test]
    fn lines_are_lower_case_in_order_and_come_back_as_the_map() {
        let fields = [
            (&b"Server"[..], &b"nginx"[..]),
            (b"Date", b"Sat, 05 Dec 2026 12:00:00 GMT"),
            (b"Content-Length", b"2"),
            (b"Set-Cookie", b"a=1"),
            (b"Keep-Alive", b"timeout=5"),
            (b"set-cookie", b"b=2"),
            (b"X-Empty", b""),
        ];
        let lines = ResponseFields::encode(
            fields
                .iter()
                .map(|&(name, value)| (name, value, FieldKind::of(name))),
        );
        assert_eq!(
            lines.lines(),
            b"server: nginx\r\ndate: Sat, 05 Dec 2026 12:00:00 GMT\r\nset-cookie: a=1\r\nset-cookie: b=2\r\nx-empty: \r\n"
        );
        assert!(lines.has_date());
        let mut map = HeaderMap::new();
        map.insert("x-own", HeaderValue::from_static("1"));
        lines.restore_into(&mut map);
        assert_eq!(map.len(), 6);
        assert_eq!(map["server"], "nginx");
        let cookies: Vec<_> = map.get_all("set-cookie").iter().collect();
        assert_eq!(cookies, ["a=1", "b=2"]);
        assert_eq!(map["x-empty"], "");
        assert_eq!(map["x-own"], "1");
        let other = [(&b"a"[..], &b"b"[..], FieldKind::Other)];
        assert!(!ResponseFields::encode(other.into_iter()).has_date());
    }
}
