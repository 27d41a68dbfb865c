//! The malformed-HTTP corpus (issue 16, item 6): request-smuggling
//! variants (CL.TE, TE.CL, TE.TE obfuscations), field syntax errors
//! (obs-fold, bare CR/LF, NUL and control characters), chunked framing
//! errors, `Host` rules, absolute-form targets, methods, overlong URIs,
//! pipelining after a valid request, HTTP/0.9 and `Expect` edge cases.
//!
//! The cases are data: one table, [`CASES`], each row the raw bytes a
//! client sends and what must happen, with the RFC 9110/9112 section the
//! expectation follows. One test runs every row against the inbound and
//! the outbound listener of an in-process sidecar (the outbound side knows
//! the app as service `app`, so every request says `Host: app`).
//!
//! How a row is run: the bytes are written on a fresh connection followed
//! by a *probe*, `GET / ... Connection: close`, in the same write. Then
//! everything is read until the sidecar closes the connection. So a row
//! that must keep the connection usable expects the probe's `200` as its
//! last status, and a row that must close it expects no answer to the
//! probe (and the app must not see it). Checked for each row: the status
//! lines in order (`1xx` interim responses are left out: a server MAY
//! send `100 Continue` or not, RFC 9110 §10.1.1), the `x-meshlet-reason` of
//! the first error response, that the connection was closed, how many
//! requests reached the app (the test app counts them,
//! `meshlet_e2e::Upstream::requests`), strings the answer must or must not
//! contain, and afterwards that the proxy still serves normal requests.
//! Every run has its own app and sidecar: once it is over the sidecar is
//! killed and the app settles (`Upstream::wait_settled`), so a request the
//! sidecar forwarded just before refusing the rest is counted in its own
//! run, never in the next one.

use std::time::Duration;

use meshlet_e2e::inprocess::Sidecar;
use meshlet_e2e::{client, Upstream};

/// How long a case may take to be answered and closed.
const PATIENCE: Duration = Duration::from_secs(5);

/// Requests [`Mesh::assert_still_serving`] sends to the app.
const STILL_SERVING_REQUESTS: usize = 2;

/// Sent after every case's bytes, in the same write.
const PROBE: &[u8] = b"GET / HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n";

/// Where a case runs.
#[derive(Debug, Clone, Copy, PartialEq)]
enum On {
    Both,
    Inbound,
    Outbound,
}

/// The bytes of a case: literal, or built (the long ones).
#[derive(Clone, Copy)]
enum Bytes {
    Raw(&'static [u8]),
    Built(fn() -> Vec<u8>),
}

/// One row of the corpus.
struct Case {
    name: &'static str,
    /// The rule the expectation follows.
    rfc: &'static str,
    on: On,
    bytes: Bytes,
    /// Final status lines in order, the probe's included when it must be
    /// answered; empty: closed without any response.
    statuses: &'static [u16],
    /// `x-meshlet-reason` of the first response with status >= 400.
    reason: Option<&'static str>,
    /// Requests the app receives, at least and at most (the probe
    /// included when answered).
    app: (usize, usize),
    /// Substrings the answer must contain / must not contain.
    contains: &'static [&'static str],
    lacks: &'static [&'static str],
}

/// The mesh refuses the request itself: `status` with `reason`, the
/// connection closed, nothing reaches the app.
const fn refused(
    name: &'static str,
    rfc: &'static str,
    bytes: &'static [u8],
    status: u16,
    reason: &'static str,
) -> Case {
    Case {
        name,
        rfc,
        on: On::Both,
        bytes: Bytes::Raw(bytes),
        statuses: match status {
            400 => &[400],
            414 => &[414],
            _ => &[431],
        },
        reason: Some(reason),
        app: (0, 0),
        contains: &[],
        lacks: &[],
    }
}

/// A request that is valid (or that the mesh may accept): served, and the
/// connection stays usable (the probe is answered too).
const fn served(name: &'static str, rfc: &'static str, bytes: &'static [u8]) -> Case {
    Case {
        name,
        rfc,
        on: On::Both,
        bytes: Bytes::Raw(bytes),
        statuses: &[200, 200],
        reason: None,
        app: (2, 2),
        contains: &[],
        lacks: &[],
    }
}

/// A valid request, then a smuggling attempt on the same connection: the
/// first is answered and reaches the app, the second is refused with
/// `400 bad_request`, the connection closed.
const fn after_valid(name: &'static str, rfc: &'static str, bytes: &'static [u8]) -> Case {
    Case {
        name,
        rfc,
        on: On::Both,
        bytes: Bytes::Raw(bytes),
        statuses: &[200, 400],
        reason: Some("bad_request"),
        app: (1, 1),
        contains: &[],
        lacks: &["smuggled"],
    }
}

/// A head that is fine followed by chunked framing hyper cannot decode.
/// The body streams, so the app may see the request start (if the head
/// was flushed before the body failed) but never a complete body; the mesh
/// answers `400 bad_request` (the request body failed: the client's fault,
/// not the upstream's) and closes the connection: what follows the broken
/// framing (the probe) is never read as a request (the guard cuts hyper's
/// input there).
const fn broken_body(name: &'static str, rfc: &'static str, bytes: &'static [u8]) -> Case {
    Case {
        name,
        rfc,
        on: On::Both,
        bytes: Bytes::Raw(bytes),
        statuses: &[400],
        reason: Some("bad_request"),
        app: (0, 1),
        contains: &[],
        lacks: &[],
    }
}

fn overlong_uri() -> Vec<u8> {
    format!(
        "GET /{} HTTP/1.1\r\nHost: app\r\n\r\n",
        "a".repeat(70 * 1024)
    )
    .into_bytes()
}

fn oversized_chunk_size_line() -> Vec<u8> {
    // A chunk-size line of 20 KB (an extension that never ends): hyper
    // caps extensions, so the body fails.
    format!(
        "POST /upload HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n5;{}\r\nhello\r\n0\r\n\r\n",
        "x".repeat(20 * 1024)
    )
    .into_bytes()
}

#[rustfmt::skip]
const CASES: &[Case] = &[
    // --- CL.TE / TE.CL: both framing headers (RFC 9112 §6.3 item 3: "ought
    // to be handled as an error"; the mesh refuses, as Envoy and nginx do).
    refused("cl_te", "RFC 9112 §6.3 (3), §11.2",
        b"POST /upload HTTP/1.1\r\nHost: app\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nX", 400, "bad_request"),
    refused("te_cl", "RFC 9112 §6.3 (3), §11.2",
        b"POST /upload HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n8\r\nSMUGGLED\r\n0\r\n\r\n", 400, "bad_request"),
    refused("te_trailing_space_with_cl", "RFC 9112 §6.3 (3); OWS is not part of the value (RFC 9110 §5.5)",
        b"POST /upload HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked \r\nContent-Length: 5\r\n\r\n0\r\n\r\n", 400, "bad_request"),
    refused("te_tab_with_cl", "RFC 9112 §6.3 (3); HTAB is OWS",
        b"POST /upload HTTP/1.1\r\nHost: app\r\nTransfer-Encoding:\tchunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n", 400, "bad_request"),
    refused("cl_te_te_ignored_name_case", "RFC 9110 §5.1: field names are case-insensitive",
        b"POST /upload HTTP/1.1\r\nHost: app\r\ncOnTeNt-LeNgTh: 5\r\ntRaNsFeR-eNcOdInG: CHUNKED\r\n\r\n0\r\n\r\n", 400, "bad_request"),
    // --- TE.TE: obfuscated Transfer-Encoding. Anything whose final coding
    // is not exactly one `chunked` is invalid framing in a request: "the
    // server MUST respond with the 400 (Bad Request) status code and then
    // close the connection" (RFC 9112 §6.3 (4)); chunked once (§6.1).
    refused("te_xchunked", "RFC 9112 §6.3 (4)",
        b"POST /upload HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: xchunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", 400, "bad_request"),
    refused("te_chunked_identity", "RFC 9112 §6.3 (4): chunked must be the final coding",
        b"POST /upload HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked, identity\r\n\r\n5\r\nhello\r\n0\r\n\r\n", 400, "bad_request"),
    refused("te_duplicated", "RFC 9112 §6.1: chunked MUST NOT be applied twice; field lines combine (RFC 9110 §5.3)",
        b"POST /upload HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", 400, "bad_request"),
    refused("te_chunked_then_identity_line", "RFC 9112 §6.3 (4) with RFC 9110 §5.3 field order",
        b"POST /upload HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n5\r\nhello\r\n0\r\n\r\n", 400, "bad_request"),
    refused("te_quoted", "RFC 9112 §7: transfer-coding is a token, not a quoted string",
        b"POST /upload HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: \"chunked\"\r\n\r\n5\r\nhello\r\n0\r\n\r\n", 400, "bad_request"),
    refused("te_space_before_colon", "RFC 9112 §5.1: whitespace between name and colon MUST get 400",
        b"POST /upload HTTP/1.1\r\nHost: app\r\nTransfer-Encoding : chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n", 400, "bad_request"),
    refused("te_in_http_1_0", "RFC 9112 §6.1: Transfer-Encoding was added in HTTP/1.1; a 1.0 message with it has faulty framing",
        b"POST /upload HTTP/1.0\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", 400, "bad_request"),
    Case { name: "te_tab_is_ows", rfc: "RFC 9110 §5.6.3: OWS includes HTAB; RFC 9112 §7.1",
        bytes: Bytes::Raw(b"POST /upload HTTP/1.1\r\nHost: app\r\nTransfer-Encoding:\tchunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
        contains: &["\r\n\r\n5"], ..served("", "", b"") },
    // --- Content-Length syntax (RFC 9110 §8.6: 1*DIGIT; RFC 9112 §6.3 (5):
    // invalid → 400 and close).
    refused("cl_plus_sign", "RFC 9110 §8.6; RFC 9112 §6.3 (5)",
        b"POST /upload HTTP/1.1\r\nHost: app\r\nContent-Length: +5\r\n\r\nhello", 400, "bad_request"),
    refused("cl_negative", "RFC 9110 §8.6; RFC 9112 §6.3 (5)",
        b"POST /upload HTTP/1.1\r\nHost: app\r\nContent-Length: -1\r\n\r\n", 400, "bad_request"),
    refused("cl_conflicting_duplicates", "RFC 9112 §6.3 (5)",
        b"POST /upload HTTP/1.1\r\nHost: app\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!", 400, "bad_request"),
    refused("cl_list", "RFC 9110 §8.6: a recipient MAY reject a list of identical values (chosen)",
        b"POST /upload HTTP/1.1\r\nHost: app\r\nContent-Length: 5, 5\r\n\r\nhello", 400, "bad_request"),
    refused("cl_overflow", "RFC 9110 §8.6: anticipate large numerals and prevent overflow",
        b"POST /upload HTTP/1.1\r\nHost: app\r\nContent-Length: 184467440737095516160\r\n\r\n", 400, "bad_request"),
    // --- Field syntax.
    refused("obs_fold", "RFC 9112 §5.2: a server MUST reject obs-fold with 400 (or replace it)",
        b"GET / HTTP/1.1\r\nHost: app\r\nX-Folded: a\r\n b\r\n\r\n", 400, "bad_request"),
    refused("obs_fold_hiding_te", "RFC 9112 §5.2",
        b"POST /upload HTTP/1.1\r\nHost: app\r\nContent-Length: 5\r\nX: y\r\n Transfer-Encoding: chunked\r\n\r\nhello", 400, "bad_request"),
    refused("whitespace_before_first_field", "RFC 9112 §2.2: reject, or ignore such lines",
        b"GET / HTTP/1.1\r\n Host: app\r\nHost: app\r\n\r\n", 400, "bad_request"),
    refused("bare_cr_in_value", "RFC 9112 §2.2: a bare CR MUST be treated as invalid (or replaced by SP)",
        b"GET / HTTP/1.1\r\nHost: app\r\nX-Cr: a\rb\r\n\r\n", 400, "bad_request"),
    refused("nul_in_value", "RFC 9110 §5.5: CR, LF, NUL in a value MUST be rejected (or replaced by SP)",
        b"GET / HTTP/1.1\r\nHost: app\r\nX-Nul: a\0b\r\n\r\n", 400, "bad_request"),
    refused("nul_in_name", "RFC 9110 §5.1: field-name is a token",
        b"GET / HTTP/1.1\r\nHost: app\r\nX-N\0ul: a\r\n\r\n", 400, "bad_request"),
    refused("control_char_in_value", "RFC 9110 §5.5: field-vchar excludes CTLs",
        b"GET / HTTP/1.1\r\nHost: app\r\nX-Ctl: a\x01b\r\n\r\n", 400, "bad_request"),
    refused("del_in_name", "RFC 9110 §5.1: field-name is a token",
        b"GET / HTTP/1.1\r\nHost: app\r\nX-D\x7fel: a\r\n\r\n", 400, "bad_request"),
    refused("space_in_name", "RFC 9110 §5.1: field-name is a token",
        b"GET / HTTP/1.1\r\nHost: app\r\nX Space: a\r\n\r\n", 400, "bad_request"),
    refused("empty_name", "RFC 9110 §5.1: field-name is 1*tchar",
        b"GET / HTTP/1.1\r\nHost: app\r\n: a\r\n\r\n", 400, "bad_request"),
    served("bare_lf_line_ends", "RFC 9112 §2.2: a recipient MAY recognize a single LF as a line terminator (the mesh forwards CRLF)",
        b"GET / HTTP/1.1\nHost: app\n\n"),
    served("leading_empty_lines", "RFC 9112 §2.2: SHOULD ignore at least one empty line before the request-line",
        b"\r\n\r\nGET / HTTP/1.1\r\nHost: app\r\n\r\n"),
    served("empty_field_value", "RFC 9110 §5.5: field-value may be empty",
        b"GET / HTTP/1.1\r\nHost: app\r\nX-Empty:\r\n\r\n"),
    // --- Chunked framing (RFC 9112 §7.1).
    broken_body("chunk_size_not_hex", "RFC 9112 §7.1: chunk-size = 1*HEXDIG",
        b"POST /upload HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"),
    broken_body("chunk_size_0x_prefix", "RFC 9112 §7.1: chunk-size = 1*HEXDIG",
        b"POST /upload HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n"),
    broken_body("chunk_size_negative", "RFC 9112 §7.1: chunk-size = 1*HEXDIG",
        b"POST /upload HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n"),
    broken_body("chunk_size_overflow", "RFC 9112 §7.1: anticipate large hex numerals, prevent overflow",
        b"POST /upload HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n10000000000000005\r\nhello\r\n0\r\n\r\n"),
    broken_body("chunk_size_bare_lf", "RFC 9112 §7.1: the chunk-size line ends in CRLF (bare LF is only for start-line and fields, §2.2)",
        b"POST /upload HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n"),
    broken_body("chunk_extension_with_lf", "RFC 9112 §7.1.1: chunk-ext has no LF",
        b"POST /upload HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n5;a\nb\r\nhello\r\n0\r\n\r\n"),
    broken_body("chunk_data_without_crlf", "RFC 9112 §7.1: chunk = chunk-size [ chunk-ext ] CRLF chunk-data CRLF",
        b"POST /upload HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n"),
    Case { name: "chunk_size_line_oversized", rfc: "RFC 9112 §7.1.1: a server limits chunk extensions",
        bytes: Bytes::Built(oversized_chunk_size_line), ..broken_body("", "", b"") },
    Case { name: "chunk_extensions_and_leading_zeros", rfc: "RFC 9112 §7.1, §7.1.1: valid",
        bytes: Bytes::Raw(b"POST /upload HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n0005;name=\"v\";x \r\nhello\r\n0\r\n\r\n"),
        contains: &["\r\n\r\n5"], ..served("", "", b"") },
    // Regression (bug fixed with this corpus): leading zeros made the guard
    // give up on the body while hyper decoded it, so a smuggled head after
    // it reached hyper unchecked.
    after_valid("leading_zero_chunk_then_cl_te", "RFC 9112 §7.1 (hyper accepts leading zeros) + §6.3",
        b"POST /upload HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n00000000000000000005\r\nhello\r\n0\r\n\r\n\
          POST /smuggled HTTP/1.1\r\nHost: app\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    // Regression (bug fixed with this corpus): a bare LF inside a trailer
    // line ended the message for the guard but not for hyper, so the guard
    // took the trailer lines for a head with an 85-byte body and let the
    // 85-byte CL.TE head after them through unchecked.
    Case { name: "trailer_bare_lf_desync", rfc: "RFC 9112 §7.1.2 trailer fields end with CRLF CRLF",
        bytes: Bytes::Raw(b"POST /upload HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nx: 1\n\r\n\
          GET /smuggled HTTP/1.1\r\nHost: app\r\nContent-Length: 85\r\n\r\n\
          POST /smuggled HTTP/1.1\r\nHost: app\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"),
        statuses: &[200, 400], reason: Some("bad_request"), app: (1, 1), contains: &[], lacks: &["smuggled"], on: On::Both },
    // --- Host (RFC 9112 §3.2: "A server MUST respond with a 400 (Bad
    // Request) status code to any HTTP/1.1 request message that lacks a
    // Host header field and to any request message that contains more than
    // one Host header field line or a Host header field with an invalid
    // field value").
    refused("host_duplicate", "RFC 9112 §3.2",
        b"GET / HTTP/1.1\r\nHost: app\r\nHost: evil\r\n\r\n", 400, "bad_request"),
    refused("host_duplicate_same", "RFC 9112 §3.2",
        b"GET / HTTP/1.1\r\nHost: app\r\nHost: app\r\n\r\n", 400, "bad_request"),
    served("host_omitted_with_absolute_form", "RFC 9112 §3.2 says 400; deliberate leniency: the target's authority is unambiguous (§3.2.2)",
        b"GET http://app/ HTTP/1.1\r\n\r\n"),
    refused("host_with_userinfo", "RFC 9112 §3.2; RFC 9110 §7.2 (uri-host [\":\" port])",
        b"GET / HTTP/1.1\r\nHost: user@app\r\n\r\n", 400, "bad_request"),
    refused("host_with_space", "RFC 9112 §3.2",
        b"GET / HTTP/1.1\r\nHost: app evil\r\n\r\n", 400, "bad_request"),
    refused("host_bad_port", "RFC 9112 §3.2; RFC 3986 §3.2.3 port = *DIGIT",
        b"GET / HTTP/1.1\r\nHost: app:80x\r\n\r\n", 400, "bad_request"),
    // --- Absolute form (RFC 9112 §3.2.2: the target's authority wins; a
    // proxy "MUST ignore the received Host header field ... and instead
    // replace it with the host information of the request-target").
    Case { name: "absolute_form_host_mismatch", rfc: "RFC 9112 §3.2.2",
        bytes: Bytes::Raw(b"GET http://app/headers HTTP/1.1\r\nHost: evil\r\n\r\n"),
        contains: &["\"host\":[\"app\"]"], lacks: &["evil"], ..served("", "", b"") },
    Case { name: "absolute_form_routes_by_target_not_host", rfc: "RFC 9112 §3.2.2",
        on: On::Outbound,
        bytes: Bytes::Raw(b"GET http://127.0.0.1:1/ HTTP/1.1\r\nHost: app\r\n\r\n"),
        statuses: &[502, 200], reason: Some("upstream_connect_failed"), app: (1, 1), contains: &[], lacks: &[] },
    // --- Methods (RFC 9110 §9.1: method = token, case-sensitive).
    refused("method_with_at_sign", "RFC 9110 §9.1: method is a token", b"G@T / HTTP/1.1\r\nHost: app\r\n\r\n", 400, "bad_request"),
    refused("method_with_control_char", "RFC 9110 §9.1", b"GE\x01T / HTTP/1.1\r\nHost: app\r\n\r\n", 400, "bad_request"),
    refused("method_empty", "RFC 9112 §3: request-line = method SP request-target SP HTTP-version", b" / HTTP/1.1\r\nHost: app\r\n\r\n", 400, "bad_request"),
    refused("request_line_tabs", "RFC 9112 §3: single SP separators (parsing on other whitespace is a MAY, not taken)",
        b"GET\t/\tHTTP/1.1\r\nHost: app\r\n\r\n", 400, "bad_request"),
    served("method_extension_token", "RFC 9110 §9.1, §16.1: unknown methods are forwarded; the origin decides (501 or not)",
        b"PURGE / HTTP/1.1\r\nHost: app\r\n\r\n"),
    // --- Overlong URI (RFC 9112 §3: "MUST respond with a 414 (URI Too Long)").
    Case { name: "overlong_uri", rfc: "RFC 9112 §3; RFC 9110 §15.5.15",
        bytes: Bytes::Built(overlong_uri), ..refused("", "", b"", 414, "uri_too_long") },
    // --- Pipelined smuggling after a valid request (RFC 9112 §9.3.2: the
    // first is answered in order; the bad one is refused, the rest never
    // read).
    after_valid("pipelined_cl_te", "RFC 9112 §9.3.2, §6.3",
        b"GET / HTTP/1.1\r\nHost: app\r\n\r\nPOST /upload HTTP/1.1\r\nHost: app\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: app\r\n\r\n"),
    after_valid("pipelined_after_body_te_obfuscated", "RFC 9112 §9.3.2, §6.3 (4)",
        b"POST /upload HTTP/1.1\r\nHost: app\r\nContent-Length: 5\r\n\r\nhelloPOST /upload HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: xchunked\r\n\r\n5\r\nGET /smuggled HTTP/1.1\r\n\r\n"),
    after_valid("pipelined_cl_body_overrun", "RFC 9112 §6.3 (6): the body is exactly Content-Length bytes; what follows is a new request",
        b"POST /upload HTTP/1.1\r\nHost: app\r\nContent-Length: 5\r\n\r\nhelloGARBAGE /smuggled\r\n\r\n"),
    after_valid("pipelined_obs_fold", "RFC 9112 §9.3.2, §5.2",
        b"GET / HTTP/1.1\r\nHost: app\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: app\r\nX: a\r\n b\r\n\r\n"),
    // --- HTTP/0.9 and versions (RFC 9112 §2.3, Appendix C.1: no HTTP/0.9).
    refused("http_0_9", "RFC 9112 §2.3: HTTP-version is required; 0.9 is not supported",
        b"GET /\r\n\r\n", 400, "bad_request"),
    // --- Expect (RFC 9110 §10.1.1).
    Case { name: "expect_100_continue_with_body", rfc: "RFC 9110 §10.1.1: the server MAY send 100 or omit it when the content is there",
        bytes: Bytes::Raw(b"POST /upload HTTP/1.1\r\nHost: app\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\nhello"),
        contains: &["\r\n\r\n5"], ..served("", "", b"") },
    served("expect_100_continue_without_body", "RFC 9110 §10.1.1: no content framed, no 100 needed",
        b"GET / HTTP/1.1\r\nHost: app\r\nExpect: 100-continue\r\n\r\n"),
    served("expect_unknown", "RFC 9110 §10.1.1: a server MAY answer 417 to an unknown expectation; the mesh forwards, the app decides",
        b"GET / HTTP/1.1\r\nHost: app\r\nExpect: fancy-feature\r\n\r\n"),
    refused("expect_100_continue_cl_te", "RFC 9112 §6.3 (3) before any 100 is sent",
        b"POST /upload HTTP/1.1\r\nHost: app\r\nExpect: 100-continue\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n", 400, "bad_request"),
];

/// An app and its sidecar, whose outbound listener also knows the app as
/// service `app`.
struct Mesh {
    app: Upstream,
    sidecar: Sidecar,
}

impl Mesh {
    async fn start() -> Mesh {
        let app = Upstream::start("app").await;
        let config = format!(
            "apiVersion: meshlet.dev/v1alpha1\nkind: Service\nmetadata: {{name: app}}\nspec:\n  endpoints:\n    - address: {}\n",
            app.addr
        );
        let sidecar = Sidecar::builder("app", app.port())
            .config(&config)
            .start()
            .await;
        Mesh { app, sidecar }
    }

    /// A normal request through each listener works (two requests reach
    /// the app: [`STILL_SERVING_REQUESTS`]).
    async fn assert_still_serving(&self, after: &str) {
        let inbound = client::get(self.sidecar.inbound, "/").await.unwrap();
        assert_eq!(inbound.status, 200, "inbound broken after {after}");
        let outbound = client::get_uri(self.sidecar.outbound, "http://app/")
            .await
            .unwrap();
        assert_eq!(outbound.status, 200, "outbound broken after {after}");
    }

    /// Runs one case on one listener of a fresh mesh; returns what went
    /// wrong, if anything. The mesh is used once: after the case and the
    /// still-serving check its sidecar is killed and the app settles, so
    /// the app's count holds exactly this run's requests, late ones
    /// included (a head the sidecar wrote just before it answered 400
    /// would otherwise be counted by the next run).
    async fn run(self, case: &Case, on: On, listener: &str) -> Result<(), String> {
        let addr = match on {
            On::Inbound => self.sidecar.inbound,
            _ => self.sidecar.outbound,
        };
        let mut bytes = match case.bytes {
            Bytes::Raw(b) => b.to_vec(),
            Bytes::Built(f) => f(),
        };
        bytes.extend_from_slice(PROBE);
        let (text, closed) = client::raw(addr, &bytes, PATIENCE).await;
        self.assert_still_serving(case.name).await;
        self.sidecar.kill9();
        self.app.wait_settled(PATIENCE).await;
        let app = self.app.requests() - STILL_SERVING_REQUESTS;
        let statuses = final_statuses(&text);
        let mut wrong = Vec::new();
        if statuses != case.statuses {
            wrong.push(format!(
                "statuses {statuses:?}, expected {:?}",
                case.statuses
            ));
        }
        if !closed {
            wrong.push(format!("connection still open after {PATIENCE:?}"));
        }
        if app < case.app.0 || app > case.app.1 {
            wrong.push(format!(
                "the app saw {app} requests, expected {:?}",
                case.app
            ));
        }
        if let Some(reason) = case.reason {
            let first_error = text
                .split("HTTP/1.")
                .find(|r| {
                    r.get(2..5)
                        .and_then(|s| s.parse::<u16>().ok())
                        .is_some_and(|s| s >= 400)
                })
                .unwrap_or("");
            if !first_error.contains(&format!("x-meshlet-reason: {reason}\r\n")) {
                wrong.push(format!("no x-meshlet-reason: {reason} on the first error"));
            }
        }
        for needle in case.contains {
            if !text.contains(needle) {
                wrong.push(format!("answer lacks {needle:?}"));
            }
        }
        for needle in case.lacks {
            if text.contains(needle) {
                wrong.push(format!("answer contains {needle:?}"));
            }
        }
        if wrong.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "{} on {listener} ({}): {}\n--- answer:\n{}",
                case.name,
                case.rfc,
                wrong.join("; "),
                text.chars().take(1500).collect::<String>()
            ))
        }
    }
}

/// Status codes of the final (non-1xx) responses, in order. A status line
/// is `HTTP/1.x NNN ` wherever it starts (a body without a final newline
/// runs into the next response).
fn final_statuses(text: &str) -> Vec<u16> {
    text.match_indices("HTTP/1.")
        .filter_map(|(at, _)| {
            let line = text.get(at + 7..at + 13)?.as_bytes();
            let status_line = matches!(line[0], b'0' | b'1')
                && line[1] == b' '
                && line[2..5].iter().all(u8::is_ascii_digit)
                && line[5] == b' ';
            status_line.then(|| text[at + 9..at + 12].parse::<u16>().ok())?
        })
        .filter(|status| *status >= 200)
        .collect()
}

#[tokio::test]
async fn every_corpus_case_gets_the_answer_the_rfcs_require_on_both_listeners() {
    assert!(CASES.len() >= 30, "the corpus has {} cases", CASES.len());
    let mut names: Vec<&str> = CASES.iter().map(|c| c.name).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), CASES.len(), "case names are unique");

    let mut failures = Vec::new();
    for case in CASES {
        for (on, listener) in [(On::Inbound, "inbound"), (On::Outbound, "outbound")] {
            if case.on == On::Both || case.on == on {
                let mesh = Mesh::start().await;
                if let Err(failure) = mesh.run(case, on, listener).await {
                    failures.push(failure);
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} corpus runs failed:\n\n{}",
        failures.len(),
        CASES.len(),
        failures.join("\n\n")
    );
}
