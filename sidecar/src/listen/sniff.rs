//! What protocol does a new connection speak? Decided by peeking at its
//! first bytes (nothing is consumed), before any server sees them.
//!
//! - h2c prior knowledge: the HTTP/2 connection preface.
//! - Explicit listeners: everything else is HTTP/1.x (the framing guard
//!   answers 400 to anything that is not); a client that sends nothing
//!   within the header read timeout is cut off.
//! - Transparent listeners also receive whatever TCP the app or its
//!   clients speak: HTTP/1.x is recognised by a request line that starts
//!   with a standard method and a space; anything else, and a connection
//!   silent for [`OPAQUE_AFTER`] (a server-speaks-first protocol such as
//!   MySQL or SMTP), is [`Protocol::Opaque`] and is spliced through as
//!   bytes (`transparent`).
//! - A listener that accepts mesh TLS (the inbound of a sidecar with the
//!   mTLS transport: `accept_tls`) takes a TLS handshake record (first byte
//!   `0x16`) as [`Protocol::Tls`]; elsewhere TLS is the app's own business
//!   (opaque on a transparent listener).

use std::time::Duration;

use tokio::net::TcpStream;

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Request lines of HTTP/1.x start with one of these (RFC 9110 §9, PATCH).
const METHODS: [&[u8]; 9] = [
    b"GET ",
    b"HEAD ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"CONNECT ",
    b"OPTIONS ",
    b"TRACE ",
    b"PATCH ",
];

/// How long a transparent listener waits for a client's first bytes
/// before treating the connection as opaque TCP.
pub const OPAQUE_AFTER: Duration = Duration::from_millis(200);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
    /// Not HTTP: bytes to splice.
    Opaque,
    /// A TLS ClientHello: the mesh hop (mTLS) of another sidecar.
    Tls,
}

/// The first byte of a TLS handshake record (RFC 8446 §5.1).
const TLS_HANDSHAKE: u8 = 0x16;

/// Which listener is asking: an explicit one only ever gets HTTP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    Explicit,
    Transparent,
}

/// The protocol of a connection whose first bytes are `bytes`, or `None`
/// while they are a prefix of more than one answer (wait for more).
/// `accept_tls`: a TLS handshake is the mesh hop.
pub fn classify(bytes: &[u8], listener: Listener, accept_tls: bool) -> Option<Protocol> {
    if accept_tls && bytes.first() == Some(&TLS_HANDSHAKE) {
        return Some(Protocol::Tls);
    }
    let prefix_of = |whole: &[u8]| bytes.len() < whole.len() && whole.starts_with(bytes);
    if bytes.starts_with(H2_PREFACE) {
        return Some(Protocol::Http2);
    }
    if prefix_of(H2_PREFACE) {
        return None;
    }
    if listener == Listener::Explicit {
        return Some(Protocol::Http1);
    }
    if METHODS.iter().any(|m| bytes.starts_with(m)) {
        return Some(Protocol::Http1);
    }
    if METHODS.iter().any(|m| prefix_of(m)) {
        return None;
    }
    Some(Protocol::Opaque)
}

/// Peeks until the first bytes decide ([`classify`]). An explicit listener
/// waits up to `patience` and then fails (a client that sends nothing is
/// cut off like any slow head); a transparent one decides
/// [`Protocol::Opaque`] after [`OPAQUE_AFTER`] without an answer.
pub async fn detect(
    stream: &TcpStream,
    listener: Listener,
    accept_tls: bool,
    patience: Duration,
) -> std::io::Result<Protocol> {
    let peek = async {
        let mut buf = [0u8; H2_PREFACE.len()];
        let mut seen = 0;
        loop {
            let n = stream.peek(&mut buf).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            if let Some(protocol) = classify(&buf[..n], listener, accept_tls) {
                return Ok(protocol);
            }
            if n == seen {
                // Undecided and nothing new yet: peek would return at
                // once, so wait a little before looking again.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            seen = n;
        }
    };
    let (patience, on_timeout) = match listener {
        Listener::Explicit => (patience, Err(std::io::ErrorKind::TimedOut.into())),
        Listener::Transparent => (OPAQUE_AFTER, Ok(Protocol::Opaque)),
    };
    tokio::time::timeout(patience, peek)
        .await
        .unwrap_or(on_timeout)
}

#[cfg(test)]
mod tests {
    use super::*;
    use Listener::{Explicit, Transparent};

    #[test]
    fn http_versions_on_both_kinds_of_listener() {
        for listener in [Explicit, Transparent] {
            assert_eq!(
                classify(b"GET / HTTP/1.1\r\n", listener, false),
                Some(Protocol::Http1)
            );
            assert_eq!(classify(H2_PREFACE, listener, false), Some(Protocol::Http2));
            assert_eq!(
                classify(b"PRI * HT", listener, false),
                None,
                "part of the preface"
            );
        }
        assert_eq!(
            classify(b"DELETE /x", Transparent, false),
            Some(Protocol::Http1)
        );
        assert_eq!(
            classify(b"PATCH ", Transparent, false),
            Some(Protocol::Http1)
        );
    }

    #[test]
    fn transparent_listeners_tell_opaque_tcp_from_http() {
        assert_eq!(
            classify(b"hello\n", Transparent, false),
            Some(Protocol::Opaque)
        );
        assert_eq!(
            classify(b"*1\r\n$4\r\nPING", Transparent, false),
            Some(Protocol::Opaque)
        );
        assert_eq!(
            classify(b"\x16\x03\x01\x02\x00", Transparent, false),
            Some(Protocol::Opaque),
            "TLS"
        );
        assert_eq!(
            classify(b"GETX", Transparent, false),
            Some(Protocol::Opaque)
        );
        assert_eq!(
            classify(b"get / HTTP/1.1", Transparent, false),
            Some(Protocol::Opaque)
        );
        // Still a method's prefix: wait for more.
        assert_eq!(classify(b"GE", Transparent, false), None);
        assert_eq!(classify(b"OPTI", Transparent, false), None);
        assert_eq!(classify(b"P", Transparent, false), None);
        // Only a listener of the mesh hop takes TLS as TLS.
        for listener in [Explicit, Transparent] {
            assert_eq!(
                classify(b"\x16\x03\x01\x02\x00", listener, true),
                Some(Protocol::Tls)
            );
            assert_eq!(
                classify(b"GET / HTTP/1.1", listener, true),
                Some(Protocol::Http1)
            );
        }
        assert_eq!(
            classify(b"\x16\x03\x01", Explicit, false),
            Some(Protocol::Http1),
            "the framing guard refuses it"
        );
        // An explicit listener leaves the verdict to the framing guard.
        assert_eq!(classify(b"hello\n", Explicit, false), Some(Protocol::Http1));
    }

    #[tokio::test]
    async fn a_silent_client_is_opaque_on_a_transparent_listener_only() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        let started = std::time::Instant::now();
        let verdict = detect(&accepted, Transparent, false, Duration::from_secs(10)).await;
        assert_eq!(verdict.unwrap(), Protocol::Opaque);
        assert!(started.elapsed() < Duration::from_secs(5));
        let explicit = detect(&accepted, Explicit, false, Duration::from_millis(50)).await;
        assert_eq!(explicit.unwrap_err().kind(), std::io::ErrorKind::TimedOut);
    }
}
