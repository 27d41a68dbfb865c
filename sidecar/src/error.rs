//! The sidecar's errors, and the **one place** where a request-path error
//! becomes an HTTP response.
//!
//! Every response the mesh generates itself carries a status that says who
//! failed (4xx: the request; 502: the upstream; 503: the mesh has nowhere to
//! send it; 504: the upstream was too slow), a header `x-meshlet-reason`
//! with a stable machine-readable reason, and a one-line plain-text body
//! saying why in words, so that "why was my request refused" never needs a
//! debugger (the top complaint about Envoy's bare 503s).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use http::{header, HeaderValue, Response, StatusCode};

use crate::body::ProxyBody;
use crate::identity::tls::TlsFailure;

/// Header naming why the mesh answered instead of the upstream.
pub const REASON_HEADER: &str = "x-meshlet-reason";

/// How an upstream exchange failed once the request was (partly) sent:
/// on one of hyper's client connections, or of our own HTTP/1.1 client.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamFailure {
    /// hyper's own message names only the kind ("http2 error"); the
    /// causes under it say what happened, so the message carries them.
    #[error("{}", with_causes(.0))]
    Hyper(#[from] hyper::Error),
    /// An HTTP/2 request to a local app that did not declare its protocol
    /// (so it got the caller's) broke HTTP/2's framing at once: the app
    /// most likely speaks HTTP/1.1 only. The message says what to set.
    #[error("{}; the app answered something that is not HTTP/2 (it gets HTTP/2 because the caller used it and no --app-protocol is set): if it speaks HTTP/1.1 only, start the sidecar with --app-protocol http1", with_causes(.0))]
    AppNotHttp2(hyper::Error),
    #[error(transparent)]
    Http1(#[from] crate::upstream::h1_client::ExchangeError),
}

/// `error`'s message followed by each of its causes' (`a: b: c`), each
/// one left out when the one before already ends with it.
fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(next) = cause {
        let said = next.to_string();
        if !text.ends_with(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
        cause = next.source();
    }
    text
}

impl UpstreamFailure {
    /// The client's own request body failed while it was sent (bad chunked
    /// framing, a stall): hyper reports it as a "user" error. Our own
    /// client sends no bodies.
    pub fn is_request_body_failure(&self) -> bool {
        matches!(self, UpstreamFailure::Hyper(e) if e.is_user())
    }
}

/// Why a request was refused, with what the 429's headers need.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub policy: String,
    /// Requests allowed per window for this instance (`q`).
    pub quota: u32,
    /// The window in whole seconds (`w`).
    pub window_secs: u64,
    /// Whole seconds until a request may succeed (≥ 1).
    pub retry_after_secs: u64,
}

/// Errors that stop the sidecar from starting.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("cannot read config file {path}: {source}")]
    ReadConfig {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config: {0}")]
    Config(#[from] meshlet_api::ParseError),
    #[error("cannot listen on {addr} ({listener} listener): {source}")]
    Bind {
        listener: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Unsupported(String),
    #[error("{0}")]
    Usage(String),
    #[error("gateway TLS: {0}")]
    Certificate(#[from] crate::listen::terminate::CertificateError),
}

/// Why the proxy answered a request itself.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("request has no Host header or absolute URI to route by")]
    MissingHost,
    #[error("request has both Content-Length and Transfer-Encoding (ambiguous framing)")]
    AmbiguousFraming,
    #[error("request head is larger than {limit} bytes")]
    HeadTooLarge { limit: usize },
    #[error("malformed request head (not HTTP/1.x)")]
    MalformedHead,
    #[error("an HTTP/1.1 request needs exactly one valid Host header")]
    BadHost,
    #[error("request line (URI) is longer than {limit} bytes")]
    UriTooLong { limit: usize },
    #[error("request path {path:?} refused: {why}")]
    BadPath {
        path: String,
        why: crate::proxy::path::PathRefusal,
    },
    #[error("{method} is not supported on the {listener} listener")]
    MethodNotAllowed {
        method: http::Method,
        listener: &'static str,
    },
    #[error("no service named {host:?} is known to the mesh and the name does not resolve")]
    UnknownService { host: String },
    #[error("service {service:?} has no healthy endpoint")]
    NoHealthyEndpoint { service: String },
    #[error("request to {addr} would loop back into this sidecar")]
    Loop { addr: SocketAddr },
    #[error("cannot connect to upstream {addr}: {source}")]
    ConnectFailed {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("upstream {upstream} did not send response headers within {}", humantime::format_duration(*timeout))]
    UpstreamTimeout { upstream: String, timeout: Duration },
    #[error("upstream {addr} failed: {source}")]
    Upstream {
        addr: SocketAddr,
        source: UpstreamFailure,
    },
    #[error("rate limited by policy {:?} ({} requests per {}s for this instance); retry in {}s", .0.policy, .0.quota, .0.window_secs, .0.retry_after_secs)]
    RateLimited(Box<Refusal>),
    #[error("circuit breaker open for every endpoint of service {service:?} (policy {policy:?}); not sent")]
    CircuitOpen { service: String, policy: String },
    #[error("service {service:?} already has {max} requests in flight from this sidecar (circuit breaker maxConcurrentRequests); not sent")]
    Overflow { service: String, max: u32 },
    #[error("the request body failed while it was read to be retryable: {detail}")]
    RequestBodyFailed { detail: String },
    #[error("the request body did not arrive within {}", humantime::format_duration(*timeout))]
    RequestBodyTimeout { timeout: Duration },
    #[error("service {service:?} accepts only mTLS callers (MTLSPolicy strict); this connection is plaintext")]
    MtlsRequired { service: String },
    #[error("AuthorizationPolicy {policy:?} denies this request from {caller}: {}", if *.by_deny { "a DENY rule matches it" } else { "no ALLOW rule matches it" })]
    Denied {
        /// The DENY policy that matched, or the ALLOW policies (joined
        /// with `,`) of which none did.
        policy: std::sync::Arc<str>,
        by_deny: bool,
        caller: String,
    },
    #[error("this sidecar's workload certificate expired at {at} and the control plane is unreachable; not sent")]
    CertificateExpired { at: String },
    #[error("mTLS handshake with {addr} failed: {detail}")]
    TlsHandshakeFailed { addr: SocketAddr, detail: String },
    #[error("{addr} is not the workload the registry names: {detail}")]
    PeerIdentityMismatch { addr: SocketAddr, detail: String },
    #[error("no Route of gateway {gateway:?} matches host {host:?} and path {path:?}")]
    NoRoute {
        gateway: String,
        host: String,
        path: String,
    },
    #[error("fault injected by FaultInjectionPolicy {policy:?}: aborted with {}; not sent", .status.as_u16())]
    FaultInjected { policy: String, status: StatusCode },
}

impl ProxyError {
    /// A connection to `addr` that could not be made: a refused or timed
    /// out connect, or a failed mTLS hop (`identity::tls::TlsFailure`).
    pub fn connect_failed(addr: SocketAddr, source: std::io::Error) -> ProxyError {
        match TlsFailure::of(&source) {
            Some(TlsFailure::CertificateExpired { at }) => {
                ProxyError::CertificateExpired { at: at.clone() }
            }
            Some(TlsFailure::IdentityMismatch(mismatch)) => ProxyError::PeerIdentityMismatch {
                addr,
                detail: mismatch.to_string(),
            },
            Some(TlsFailure::Handshake(detail)) => ProxyError::TlsHandshakeFailed {
                addr,
                detail: detail.clone(),
            },
            None => ProxyError::ConnectFailed { addr, source },
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::MissingHost
            | ProxyError::AmbiguousFraming
            | ProxyError::MalformedHead
            | ProxyError::BadHost
            | ProxyError::BadPath { .. }
            | ProxyError::RequestBodyFailed { .. } => StatusCode::BAD_REQUEST,
            ProxyError::RequestBodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            ProxyError::HeadTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ProxyError::UriTooLong { .. } => StatusCode::URI_TOO_LONG,
            ProxyError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::NoRoute { .. } => StatusCode::NOT_FOUND,
            ProxyError::UnknownService { .. } | ProxyError::NoHealthyEndpoint { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ProxyError::Loop { .. }
            | ProxyError::ConnectFailed { .. }
            | ProxyError::Upstream { .. }
            | ProxyError::TlsHandshakeFailed { .. }
            | ProxyError::PeerIdentityMismatch { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::CertificateExpired { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::CircuitOpen { .. } | ProxyError::Overflow { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ProxyError::MtlsRequired { .. } | ProxyError::Denied { .. } => StatusCode::FORBIDDEN,
            ProxyError::FaultInjected { status, .. } => *status,
        }
    }

    /// Stable value of [`REASON_HEADER`]; documented in the README.
    pub fn reason(&self) -> &'static str {
        match self {
            ProxyError::MissingHost => "missing_host",
            ProxyError::BadPath { .. } => "bad_path",
            ProxyError::AmbiguousFraming
            | ProxyError::MalformedHead
            | ProxyError::BadHost
            | ProxyError::RequestBodyFailed { .. } => "bad_request",
            ProxyError::RequestBodyTimeout { .. } => "request_timeout",
            ProxyError::HeadTooLarge { .. } => "header_too_large",
            ProxyError::UriTooLong { .. } => "uri_too_long",
            ProxyError::MethodNotAllowed { .. } => "method_not_allowed",
            ProxyError::UnknownService { .. } => "unknown_service",
            ProxyError::NoHealthyEndpoint { .. } => "no_healthy_endpoint",
            ProxyError::Loop { .. } => "loop_detected",
            ProxyError::ConnectFailed { .. } => "upstream_connect_failed",
            ProxyError::UpstreamTimeout { .. } => "upstream_timeout",
            ProxyError::Upstream { .. } => "upstream_reset",
            ProxyError::RateLimited(_) => "rate_limited",
            ProxyError::CircuitOpen { .. } => "circuit_open",
            ProxyError::Overflow { .. } => "overflow",
            ProxyError::MtlsRequired { .. } => "mtls_required",
            ProxyError::Denied { .. } => "denied",
            ProxyError::CertificateExpired { .. } => "certificate_expired",
            ProxyError::TlsHandshakeFailed { .. } => "tls_handshake_failed",
            ProxyError::PeerIdentityMismatch { .. } => "peer_identity_mismatch",
            ProxyError::NoRoute { .. } => "no_route",
            ProxyError::FaultInjected { .. } => "fault_injected",
        }
    }

    /// The same response as raw HTTP/1.1 bytes, for the few places that
    /// answer below hyper (the framing guard).
    pub fn to_http1_bytes(&self) -> Vec<u8> {
        let status = self.status();
        let body = format!("meshlet: {self}\n");
        format!(
            "HTTP/1.1 {} {}\r\n{REASON_HEADER}: {}\r\ncontent-type: text/plain; charset=utf-8\r\n\
             connection: close\r\ncontent-length: {}\r\n\r\n{body}",
            status.as_u16(),
            status.canonical_reason().unwrap_or(""),
            self.reason(),
            body.len()
        )
        .into_bytes()
    }

    /// The response sent to the client in place of the upstream's.
    pub fn into_response(self) -> Response<ProxyBody> {
        let status = self.status();
        let body = format!("meshlet: {self}\n");
        let mut response = Response::new(ProxyBody::full(body));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(REASON_HEADER, HeaderValue::from_static(self.reason()));
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        if let ProxyError::RateLimited(refusal) = &self {
            add_rate_limit_headers(headers, refusal);
        }
        // Refusals of a well-formed request keep the connection (an
        // injected fault's 4xx says nothing about the request's framing).
        let keeps_framing = matches!(
            status,
            StatusCode::METHOD_NOT_ALLOWED
                | StatusCode::TOO_MANY_REQUESTS
                | StatusCode::FORBIDDEN
                | StatusCode::NOT_FOUND
        ) || matches!(self, ProxyError::FaultInjected { .. });
        if status.is_client_error() && !keeps_framing {
            // After a malformed request the connection's framing can't be
            // trusted: close it (RFC 9112 §6.3).
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

/// `Retry-After` and the IETF httpapi ratelimit-headers (structured-field
/// form): `RateLimit-Policy: "name";q=10;w=1`, `RateLimit: "name";r=0;t=1`.
fn add_rate_limit_headers(headers: &mut http::HeaderMap, refusal: &Refusal) {
    let values = [
        (header::RETRY_AFTER, refusal.retry_after_secs.to_string()),
        (
            http::HeaderName::from_static("ratelimit-policy"),
            format!(
                "\"{}\";q={};w={}",
                refusal.policy, refusal.quota, refusal.window_secs
            ),
        ),
        (
            http::HeaderName::from_static("ratelimit"),
            format!("\"{}\";r=0;t={}", refusal.policy, refusal.retry_after_secs),
        ),
    ];
    for (name, value) in values {
        if let Ok(value) = HeaderValue::try_from(value) {
            headers.insert(name, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;

    fn addr() -> SocketAddr {
        "10.0.0.7:8080".parse().unwrap()
    }

    fn io_error() -> std::io::Error {
        std::io::Error::from(std::io::ErrorKind::ConnectionRefused)
    }

    /// Every variant but `Upstream` (a `hyper::Error` cannot be made
    /// outside hyper; its mapping is checked by the proxy's e2e tests)
    /// with the status, reason and body line it must produce.
    fn cases() -> Vec<(ProxyError, u16, &'static str, &'static str)> {
        let refusal = Refusal {
            policy: "orders-limit".into(),
            quota: 10,
            window_secs: 1,
            retry_after_secs: 2,
        };
        vec![
            (ProxyError::MissingHost, 400, "missing_host", "request has no Host header or absolute URI to route by"),
            (ProxyError::AmbiguousFraming, 400, "bad_request", "request has both Content-Length and Transfer-Encoding (ambiguous framing)"),
            (ProxyError::HeadTooLarge { limit: 8192 }, 431, "header_too_large", "request head is larger than 8192 bytes"),
            (ProxyError::MalformedHead, 400, "bad_request", "malformed request head (not HTTP/1.x)"),
            (ProxyError::BadHost, 400, "bad_request", "an HTTP/1.1 request needs exactly one valid Host header"),
            (ProxyError::UriTooLong { limit: 8192 }, 414, "uri_too_long", "request line (URI) is longer than 8192 bytes"),
            (
                ProxyError::BadPath { path: "/a%2Fb".into(), why: crate::proxy::path::PathRefusal::EncodedSlash },
                400,
                "bad_path",
                "request path \"/a%2Fb\" refused: the path contains an encoded slash (%2F)",
            ),
            (
                ProxyError::MethodNotAllowed { method: http::Method::CONNECT, listener: "inbound" },
                405,
                "method_not_allowed",
                "CONNECT is not supported on the inbound listener",
            ),
            (
                ProxyError::UnknownService { host: "nowhere".into() },
                503,
                "unknown_service",
                "no service named \"nowhere\" is known to the mesh and the name does not resolve",
            ),
            (
                ProxyError::NoHealthyEndpoint { service: "orders".into() },
                503,
                "no_healthy_endpoint",
                "service \"orders\" has no healthy endpoint",
            ),
            (
                ProxyError::NoRoute { gateway: "edge".into(), host: "nowhere.test".into(), path: "/x".into() },
                404,
                "no_route",
                "no Route of gateway \"edge\" matches host \"nowhere.test\" and path \"/x\"",
            ),
            (ProxyError::Loop { addr: addr() }, 502, "loop_detected", "request to 10.0.0.7:8080 would loop back into this sidecar"),
            (
                ProxyError::ConnectFailed { addr: addr(), source: io_error() },
                502,
                "upstream_connect_failed",
                "cannot connect to upstream 10.0.0.7:8080: connection refused",
            ),
            (
                ProxyError::UpstreamTimeout { upstream: "orders".into(), timeout: Duration::from_millis(1500) },
                504,
                "upstream_timeout",
                "upstream orders did not send response headers within 1s 500ms",
            ),
            (
                ProxyError::RateLimited(Box::new(refusal)),
                429,
                "rate_limited",
                "rate limited by policy \"orders-limit\" (10 requests per 1s for this instance); retry in 2s",
            ),
            (
                ProxyError::CircuitOpen { service: "orders".into(), policy: "orders-breaker".into() },
                503,
                "circuit_open",
                "circuit breaker open for every endpoint of service \"orders\" (policy \"orders-breaker\"); not sent",
            ),
            (
                ProxyError::Overflow { service: "orders".into(), max: 2 },
                503,
                "overflow",
                "service \"orders\" already has 2 requests in flight from this sidecar (circuit breaker maxConcurrentRequests); not sent",
            ),
            (
                ProxyError::RequestBodyFailed { detail: "reset".into() },
                400,
                "bad_request",
                "the request body failed while it was read to be retryable: reset",
            ),
            (
                ProxyError::RequestBodyTimeout { timeout: Duration::from_secs(30) },
                408,
                "request_timeout",
                "the request body did not arrive within 30s",
            ),
            (
                ProxyError::MtlsRequired { service: "orders".into() },
                403,
                "mtls_required",
                "service \"orders\" accepts only mTLS callers (MTLSPolicy strict); this connection is plaintext",
            ),
            (
                ProxyError::Denied { policy: "orders-allow".into(), by_deny: false, caller: "web (spiffe://meshlet.local/ns/default/sa/web)".into() },
                403,
                "denied",
                "AuthorizationPolicy \"orders-allow\" denies this request from web (spiffe://meshlet.local/ns/default/sa/web): no ALLOW rule matches it",
            ),
            (
                ProxyError::Denied { policy: "no-batch".into(), by_deny: true, caller: "an unauthenticated (plaintext) caller".into() },
                403,
                "denied",
                "AuthorizationPolicy \"no-batch\" denies this request from an unauthenticated (plaintext) caller: a DENY rule matches it",
            ),
            (
                ProxyError::CertificateExpired { at: "2026-12-03T15:00:00Z".into() },
                503,
                "certificate_expired",
                "this sidecar's workload certificate expired at 2026-12-03T15:00:00Z and the control plane is unreachable; not sent",
            ),
            (
                ProxyError::TlsHandshakeFailed { addr: addr(), detail: "invalid peer certificate: Expired".into() },
                502,
                "tls_handshake_failed",
                "mTLS handshake with 10.0.0.7:8080 failed: invalid peer certificate: Expired",
            ),
            (
                ProxyError::PeerIdentityMismatch { addr: addr(), detail: "peer presented spiffe://meshlet.local/ns/default/sa/evil, expected spiffe://meshlet.local/ns/default/sa/orders".into() },
                502,
                "peer_identity_mismatch",
                "10.0.0.7:8080 is not the workload the registry names: peer presented spiffe://meshlet.local/ns/default/sa/evil, expected spiffe://meshlet.local/ns/default/sa/orders",
            ),
            (
                ProxyError::FaultInjected { policy: "orders-chaos".into(), status: StatusCode::SERVICE_UNAVAILABLE },
                503,
                "fault_injected",
                "fault injected by FaultInjectionPolicy \"orders-chaos\": aborted with 503; not sent",
            ),
        ]
    }

    #[tokio::test]
    async fn each_error_becomes_its_status_reason_and_one_line_body() {
        for (error, status, reason, message) in cases() {
            let response = error.into_response();
            assert_eq!(response.status(), status, "{reason}");
            let headers = response.headers();
            assert_eq!(headers[REASON_HEADER], reason);
            assert_eq!(headers[header::CONTENT_TYPE], "text/plain; charset=utf-8");
            let closes = headers
                .get(header::CONNECTION)
                .is_some_and(|v| v == "close");
            // After a malformed request the connection's framing cannot be
            // trusted; a 403, 404, 405 or 429 keeps it.
            let malformed = (400..500).contains(&status) && ![403, 404, 405, 429].contains(&status);
            assert_eq!(closes, malformed, "{reason}: connection: close");
            let body = response.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body, format!("meshlet: {message}\n"), "{reason}");
        }
    }

    #[test]
    fn the_framing_guard_gets_the_same_answer_as_raw_http1() {
        for (error, status, reason, message) in cases() {
            let bytes = String::from_utf8(error.to_http1_bytes()).unwrap();
            let (head, body) = bytes.split_once("\r\n\r\n").expect("a head and a body");
            assert!(head.starts_with(&format!("HTTP/1.1 {status} ")), "{head}");
            assert!(
                head.contains(&format!("\r\n{REASON_HEADER}: {reason}\r\n")),
                "{head}"
            );
            assert!(head.contains("\r\nconnection: close"), "{head}");
            assert!(
                head.contains(&format!("\r\ncontent-length: {}", body.len())),
                "{head}"
            );
            assert_eq!(body, format!("meshlet: {message}\n"));
        }
    }

    #[test]
    fn an_injected_client_error_keeps_the_connection() {
        let error = ProxyError::FaultInjected {
            policy: "chaos".into(),
            status: StatusCode::BAD_REQUEST,
        };
        let response = error.into_response();
        assert_eq!(response.status(), 400);
        assert_eq!(response.headers()[REASON_HEADER], "fault_injected");
        assert!(response.headers().get(header::CONNECTION).is_none());
    }

    #[test]
    fn a_rate_limit_refusal_says_when_to_come_back() {
        let error = ProxyError::RateLimited(Box::new(Refusal {
            policy: "orders-limit".into(),
            quota: 10,
            window_secs: 60,
            retry_after_secs: 7,
        }));
        let response = error.into_response();
        let headers = response.headers();
        assert_eq!(headers[header::RETRY_AFTER], "7");
        assert_eq!(headers["ratelimit-policy"], "\"orders-limit\";q=10;w=60");
        assert_eq!(headers["ratelimit"], "\"orders-limit\";r=0;t=7");
    }
}
