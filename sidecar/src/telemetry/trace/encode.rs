//! OTLP protobuf written straight from [`SpanRecord`]s: one
//! `ExportTraceServiceRequest` per batch, without building the message
//! structs of `meshlet_api::otlp` first.
//!
//! At full sampling a busy sidecar exports tens of thousands of spans a
//! second; building each as a message tree costs some twenty small
//! allocations per span (attribute keys and values, ids, the name), which
//! showed up in the benchmark. Here a span is a few appends to a reused
//! buffer. The field numbers are OTLP's (`opentelemetry/proto/trace/v1`);
//! the tests decode the output with the `otlp` types to keep the two in
//! step.
//!
//! ```text
//! ExportTraceServiceRequest { 1: ResourceSpans {
//!     1: Resource { 1: KeyValue* }                         (service.name, ...)
//!     2: ScopeSpans { 1: InstrumentationScope, 2: Span* } } }
//! ```

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use super::SpanRecord;
use crate::telemetry::direction::Direction;

/// Protobuf wire types.
const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LENGTH_DELIMITED: u8 = 2;
const FIXED32: u8 = 5;

/// OTLP span kinds and status codes.
const KIND_SERVER: u64 = 2;
const KIND_CLIENT: u64 = 3;
const STATUS_UNSET: u64 = 0;
const STATUS_ERROR: u64 = 2;
/// W3C trace flags of an exported span: sampled.
const FLAGS_SAMPLED: u32 = 1;

/// The resource attributes of this sidecar's spans.
#[derive(Debug, Clone)]
pub struct ResourceAttributes(pub Vec<(&'static str, String)>);

/// One export request holding `spans`.
pub fn export_request(resource: &ResourceAttributes, spans: &[SpanRecord]) -> Vec<u8> {
    let mut span = Vec::with_capacity(512);
    let mut scope_spans = Vec::with_capacity(spans.len() * 400 + 64);
    // ScopeSpans.scope (1): InstrumentationScope { name: 1, version: 2 }
    let mut scope = Vec::new();
    string_field(&mut scope, 1, "meshlet-sidecar");
    string_field(&mut scope, 2, env!("CARGO_PKG_VERSION"));
    message_field(&mut scope_spans, 1, &scope);
    for record in spans {
        span.clear();
        write_span(&mut span, record);
        message_field(&mut scope_spans, 2, &span);
    }
    let mut resource_message = Vec::new();
    for (key, value) in &resource.0 {
        string_attribute(&mut resource_message, 1, key, value);
    }
    let mut resource_spans = Vec::with_capacity(scope_spans.len() + resource_message.len() + 16);
    message_field(&mut resource_spans, 1, &resource_message);
    message_field(&mut resource_spans, 2, &scope_spans);
    let mut request = Vec::with_capacity(resource_spans.len() + 8);
    message_field(&mut request, 1, &resource_spans);
    request
}

/// A span, with OpenTelemetry's HTTP attribute names where one exists and
/// `meshlet.*` for the mesh's own.
fn write_span(out: &mut Vec<u8>, span: &SpanRecord) {
    let d = &span.details;
    bytes_field(out, 1, &span.trace_id.0);
    bytes_field(out, 2, &span.span_id.0);
    if let Some(state) = &span.tracestate {
        bytes_field(out, 3, state.as_bytes());
    }
    if let Some(parent) = span.parent {
        bytes_field(out, 4, &parent.0);
    }
    // name (5): "{method} {route}"
    let (method, route) = (d.method.as_str(), &*d.route);
    key(out, 5, LENGTH_DELIMITED);
    varint(out, (method.len() + 1 + route.len()) as u64);
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(route.as_bytes());
    let kind = match d.direction {
        Direction::Inbound => KIND_SERVER,
        Direction::Outbound => KIND_CLIENT,
    };
    key(out, 6, VARINT);
    varint(out, kind);
    key(out, 7, FIXED64);
    out.extend_from_slice(&span.start_unix_nanos.to_le_bytes());
    key(out, 8, FIXED64);
    out.extend_from_slice(&span.end_unix_nanos.to_le_bytes());

    // attributes (9)
    const ATTRIBUTES: u32 = 9;
    string_attribute(out, ATTRIBUTES, "meshlet.direction", d.direction.as_str());
    string_attribute(out, ATTRIBUTES, "http.request.method", method);
    string_attribute(out, ATTRIBUTES, "http.route", route);
    string_attribute(out, ATTRIBUTES, "url.path", d.uri.path());
    int_attribute(
        out,
        ATTRIBUTES,
        "http.response.status_code",
        i64::from(d.status),
    );
    string_attribute(out, ATTRIBUTES, "meshlet.destination", &d.destination);
    int_attribute(out, ATTRIBUTES, "meshlet.retries", i64::from(d.retries));
    if let Some(peer) = d.peer {
        let peer_ip = AddressText::ip(peer.ip());
        string_attribute(out, ATTRIBUTES, "client.address", peer_ip.as_str());
    }
    if let Some(upstream) = d.upstream {
        let upstream = AddressText::socket(upstream);
        string_attribute(out, ATTRIBUTES, "server.address", upstream.as_str());
    }
    if let Some(reason) = d.reason {
        string_attribute(out, ATTRIBUTES, "meshlet.reason", reason);
        match reason {
            "rate_limited" => bool_attribute(out, ATTRIBUTES, "meshlet.rate_limited", true),
            "circuit_open" => bool_attribute(out, ATTRIBUTES, "meshlet.circuit_open", true),
            _ => {}
        }
    }
    let security = [
        ("meshlet.source.identity", &d.source_identity),
        ("meshlet.source.service", &d.source_service),
        ("meshlet.authz.policy", &d.authz_policy),
    ];
    for (name, value) in security {
        if let Some(value) = value {
            string_attribute(out, ATTRIBUTES, name, value);
        }
    }
    if let Some(fault) = &d.fault {
        string_attribute(out, ATTRIBUTES, "meshlet.fault", fault);
    }
    if let Some(mark) = &d.would_refuse {
        string_attribute(out, ATTRIBUTES, "meshlet.policy.would_refuse", mark);
    }

    // status (15): Status { message: 2, code: 3 }
    let failed = d.status >= 500 || d.reason.is_some();
    let message = d.reason.unwrap_or_default();
    let code = if failed { STATUS_ERROR } else { STATUS_UNSET };
    let message_len = if message.is_empty() {
        0
    } else {
        1 + varint_len(message.len() as u64) + message.len()
    };
    let status_len = message_len + 1 + varint_len(code);
    key(out, 15, LENGTH_DELIMITED);
    varint(out, status_len as u64);
    if !message.is_empty() {
        string_field(out, 2, message);
    }
    key(out, 3, VARINT);
    varint(out, code);
    // flags (16)
    key(out, 16, FIXED32);
    out.extend_from_slice(&FLAGS_SAMPLED.to_le_bytes());
}

/// An address as text, on the stack. IPv4 addresses and ports are written
/// digit by digit: std's `Display` goes through the formatting machinery,
/// which cost ~1 700 instructions per address, about a third of a span's
/// encoding (callgrind, tests/bench/profile.sh `policies`). IPv6 (rare in
/// the mesh) goes through `Display`; the text is the same either way.
struct AddressText {
    bytes: [u8; 64],
    len: usize,
}

impl AddressText {
    fn ip(ip: IpAddr) -> AddressText {
        let mut text = AddressText::empty();
        match ip {
            IpAddr::V4(v4) => text.push_ipv4(v4),
            IpAddr::V6(v6) => text.push_display(format_args!("{v6}")),
        }
        text
    }

    /// `a.b.c.d:port`, or `[v6]:port`.
    fn socket(addr: SocketAddr) -> AddressText {
        let mut text = AddressText::empty();
        match addr {
            SocketAddr::V4(v4) => {
                text.push_ipv4(*v4.ip());
                text.push(b':');
                text.push_decimal(v4.port());
            }
            SocketAddr::V6(v6) => text.push_display(format_args!("{v6}")),
        }
        text
    }

    fn empty() -> AddressText {
        AddressText {
            bytes: [0; 64],
            len: 0,
        }
    }

    fn as_str(&self) -> &str {
        // Only ASCII digits, dots, colons and brackets are ever written.
        std::str::from_utf8(&self.bytes[..self.len]).unwrap_or_default()
    }

    fn push_ipv4(&mut self, ip: Ipv4Addr) {
        for (i, octet) in ip.octets().into_iter().enumerate() {
            if i > 0 {
                self.push(b'.');
            }
            self.push_decimal(u16::from(octet));
        }
    }

    fn push_decimal(&mut self, value: u16) {
        let mut digits = [0u8; 5];
        let mut start = digits.len();
        let mut rest = value;
        loop {
            start -= 1;
            digits[start] = b'0' + (rest % 10) as u8;
            rest /= 10;
            if rest == 0 {
                break;
            }
        }
        for &digit in &digits[start..] {
            self.push(digit);
        }
    }

    fn push(&mut self, byte: u8) {
        // At most 21 bytes for IPv4 with a port; the buffer has 64.
        if let Some(slot) = self.bytes.get_mut(self.len) {
            *slot = byte;
            self.len += 1;
        }
    }

    /// `args` written through `Display` (IPv6: at most 47 bytes with a
    /// port and scope id, within the buffer).
    fn push_display(&mut self, args: std::fmt::Arguments<'_>) {
        let mut cursor = std::io::Cursor::new(&mut self.bytes[self.len..]);
        let _ = cursor.write_fmt(args);
        self.len += cursor.position() as usize;
    }
}

/// A `KeyValue { key: 1, value: 2 AnyValue { string_value: 1 } }` field.
fn string_attribute(out: &mut Vec<u8>, tag: u32, name: &str, value: &str) {
    let any_len = 1 + varint_len(value.len() as u64) + value.len();
    attribute_head(out, tag, name, any_len);
    string_field(out, 1, value);
}

/// `AnyValue { int_value: 3 }`.
fn int_attribute(out: &mut Vec<u8>, tag: u32, name: &str, value: i64) {
    let value = value as u64; // int64 is a two's complement varint
    attribute_head(out, tag, name, 1 + varint_len(value));
    key(out, 3, VARINT);
    varint(out, value);
}

/// `AnyValue { bool_value: 2 }`.
fn bool_attribute(out: &mut Vec<u8>, tag: u32, name: &str, value: bool) {
    attribute_head(out, tag, name, 2);
    key(out, 2, VARINT);
    varint(out, u64::from(value));
}

/// A KeyValue's tag, length, key, and the head of its AnyValue of
/// `any_len` bytes.
fn attribute_head(out: &mut Vec<u8>, tag: u32, name: &str, any_len: usize) {
    let key_len = 1 + varint_len(name.len() as u64) + name.len();
    let kv_len = key_len + 1 + varint_len(any_len as u64) + any_len;
    key(out, tag, LENGTH_DELIMITED);
    varint(out, kv_len as u64);
    string_field(out, 1, name);
    key(out, 2, LENGTH_DELIMITED);
    varint(out, any_len as u64);
}

fn message_field(out: &mut Vec<u8>, tag: u32, message: &[u8]) {
    bytes_field(out, tag, message);
}

fn string_field(out: &mut Vec<u8>, tag: u32, value: &str) {
    bytes_field(out, tag, value.as_bytes());
}

fn bytes_field(out: &mut Vec<u8>, tag: u32, value: &[u8]) {
    key(out, tag, LENGTH_DELIMITED);
    varint(out, value.len() as u64);
    out.extend_from_slice(value);
}

fn key(out: &mut Vec<u8>, tag: u32, wire_type: u8) {
    varint(out, u64::from(tag) << 3 | u64::from(wire_type));
}

fn varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn varint_len(value: u64) -> usize {
    // 7 bits per byte, at least one byte.
    (64 - (value | 1).leading_zeros() as usize).div_ceil(7)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::trace::{Hop, SpanDetails};
    use http::{HeaderMap, HeaderValue, Method};
    use meshlet_api::otlp::{self, Message};

    fn record(direction: Direction, status: u16, reason: Option<&'static str>) -> SpanRecord {
        let mut headers = HeaderMap::new();
        headers.insert(
            "traceparent",
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        headers.insert("tracestate", HeaderValue::from_static("rojo=1"));
        Hop::start(&headers, std::time::Instant::now(), || true)
            .finish(SpanDetails {
                direction,
                method: Method::POST,
                route: "/api".into(),
                uri: "/api/orders/17?x=1".parse().unwrap(),
                status,
                peer: Some("10.1.2.3:5000".parse().unwrap()),
                destination: "orders".into(),
                upstream: Some("127.0.0.1:8081".parse().unwrap()),
                retries: 300,
                reason,
                source_identity: None,
                source_service: None,
                authz_policy: None,
                fault: None,
                would_refuse: None,
            })
            .unwrap()
    }

    #[test]
    fn an_inbound_span_names_the_verified_caller_and_the_refusing_policy() {
        let mut span = record(Direction::Inbound, 403, Some("denied"));
        span.details.source_identity = Some("spiffe://meshlet.local/ns/default/sa/web".into());
        span.details.source_service = Some("web".into());
        span.details.authz_policy = Some("orders-allow".into());
        span.details.fault = Some("delay 200ms".into());
        span.details.would_refuse = Some("RateLimitPolicy/orders:rate_limited".into());
        let resource = ResourceAttributes(vec![("service.name", "orders".to_owned())]);
        let bytes = export_request(&resource, &[span]);
        let request = otlp::ExportTraceServiceRequest::decode(bytes.as_slice()).unwrap();
        let span = &request.resource_spans[0].scope_spans[0].spans[0];
        let attributes = attributes(span);
        let text = |s: &str| otlp::Value::StringValue(s.to_owned());
        for (key, value) in [
            (
                "meshlet.source.identity",
                "spiffe://meshlet.local/ns/default/sa/web",
            ),
            ("meshlet.source.service", "web"),
            ("meshlet.authz.policy", "orders-allow"),
            ("meshlet.reason", "denied"),
            ("meshlet.fault", "delay 200ms"),
            (
                "meshlet.policy.would_refuse",
                "RateLimitPolicy/orders:rate_limited",
            ),
        ] {
            assert!(
                attributes.contains(&(key.to_owned(), text(value))),
                "{key} missing: {attributes:?}"
            );
        }
    }

    fn attributes(span: &otlp::Span) -> Vec<(String, otlp::Value)> {
        span.attributes
            .iter()
            .map(|kv| {
                let value = kv.value.clone().unwrap().value.unwrap();
                (kv.key.clone(), value)
            })
            .collect()
    }

    #[test]
    fn addresses_read_exactly_as_their_display() {
        let ips: [IpAddr; 7] = [
            "0.0.0.0".parse().unwrap(),
            "127.0.0.1".parse().unwrap(),
            "10.1.20.255".parse().unwrap(),
            "255.255.255.255".parse().unwrap(),
            "::1".parse().unwrap(),
            "::ffff:10.0.0.1".parse().unwrap(),
            "fe80::1:2:3:4".parse().unwrap(),
        ];
        for ip in ips {
            assert_eq!(AddressText::ip(ip).as_str(), ip.to_string());
            for port in [0, 7, 80, 8080, 65535] {
                let addr = SocketAddr::new(ip, port);
                assert_eq!(AddressText::socket(addr).as_str(), addr.to_string());
            }
        }
        let scoped: SocketAddr = "[fe80::1%3]:443".parse().unwrap();
        assert_eq!(AddressText::socket(scoped).as_str(), scoped.to_string());
    }

    #[test]
    fn varint_lengths_match_the_encoding() {
        for value in [
            0,
            1,
            127,
            128,
            300,
            16_383,
            16_384,
            u64::from(u32::MAX),
            u64::MAX,
        ] {
            let mut out = Vec::new();
            varint(&mut out, value);
            assert_eq!(out.len(), varint_len(value), "{value}");
        }
    }

    #[test]
    fn the_request_decodes_as_otlp_with_every_field() {
        let resource = ResourceAttributes(vec![("service.name", "frontend".to_owned())]);
        let spans = [
            record(Direction::Inbound, 200, None),
            record(Direction::Outbound, 503, Some("circuit_open")),
        ];
        let bytes = export_request(&resource, &spans);
        let request = otlp::ExportTraceServiceRequest::decode(bytes.as_slice()).unwrap();
        let resource_spans = &request.resource_spans[0];
        let resource_attrs = &resource_spans.resource.as_ref().unwrap().attributes;
        assert_eq!(
            resource_attrs[0],
            otlp::KeyValue::string("service.name", "frontend")
        );
        let scope = &resource_spans.scope_spans[0];
        assert_eq!(scope.scope.as_ref().unwrap().name, "meshlet-sidecar");
        assert_eq!(scope.spans.len(), 2);

        let (server, client) = (&scope.spans[0], &scope.spans[1]);
        assert_eq!(server.trace_id, spans[0].trace_id.0);
        assert_eq!(server.span_id, spans[0].span_id.0);
        assert_eq!(server.parent_span_id, spans[0].parent.unwrap().0);
        assert_eq!(server.trace_state, "rojo=1");
        assert_eq!(server.name, "POST /api");
        assert_eq!(server.kind, otlp::SpanKind::Server as i32);
        assert_eq!(client.kind, otlp::SpanKind::Client as i32);
        assert_eq!(server.start_time_unix_nano, spans[0].start_unix_nanos);
        assert_eq!(server.end_time_unix_nano, spans[0].end_unix_nanos);
        assert_eq!(server.flags, 1);
        assert_eq!(
            server.status.as_ref().unwrap().code,
            otlp::StatusCode::Unset as i32
        );
        let status = client.status.as_ref().unwrap();
        assert_eq!(
            (status.code, status.message.as_str()),
            (otlp::StatusCode::Error as i32, "circuit_open")
        );

        let text = |s: &str| otlp::Value::StringValue(s.to_owned());
        let expected = vec![
            ("meshlet.direction".to_owned(), text("outbound")),
            ("http.request.method".to_owned(), text("POST")),
            ("http.route".to_owned(), text("/api")),
            ("url.path".to_owned(), text("/api/orders/17")),
            (
                "http.response.status_code".to_owned(),
                otlp::Value::IntValue(503),
            ),
            ("meshlet.destination".to_owned(), text("orders")),
            ("meshlet.retries".to_owned(), otlp::Value::IntValue(300)),
            ("client.address".to_owned(), text("10.1.2.3")),
            ("server.address".to_owned(), text("127.0.0.1:8081")),
            ("meshlet.reason".to_owned(), text("circuit_open")),
            (
                "meshlet.circuit_open".to_owned(),
                otlp::Value::BoolValue(true),
            ),
        ];
        assert_eq!(attributes(client), expected);
        assert_eq!(
            attributes(server).len(),
            expected.len() - 2,
            "no reason, no outcome"
        );
    }
}
