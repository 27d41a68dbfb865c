//! rustls on the mesh hop: TLS 1.3 only, the ring provider, this sidecar's
//! current certificate presented by a resolver that reads the
//! [`WorkloadIdentity`]'s `ArcSwap` on each handshake (so a renewal is a
//! pointer swap: open connections keep their session, the next handshake
//! presents the new leaf, no request fails).
//!
//! ALPN says what a connection carries: [`ALPN_H2`] (all HTTP, one
//! multiplexed connection per endpoint), [`ALPN_HTTP1`] (only an HTTP/1.1
//! request asking for an `Upgrade`) and [`ALPN_TCP`] (opaque TCP of a
//! transparent listener, spliced to the app).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use meshlet_api::identity::SpiffeId;
use rustls::client::ResolvesClientCert;
use rustls::pki_types::ServerName;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, ServerConfig, SignatureScheme};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::{client, server, TlsAcceptor, TlsConnector};

use crate::identity::provider::provider;
use crate::identity::verify::{BundleClientVerifier, IdentityMismatch, PeerVerifier};
use crate::identity::workload::WorkloadIdentity;

pub const ALPN_H2: &[u8] = b"h2";
pub const ALPN_HTTP1: &[u8] = b"http/1.1";
pub const ALPN_TCP: &[u8] = b"meshlet-tcp";

/// Why a mesh hop could not be set up; carried inside the `io::Error` of a
/// failed connect so that the request path can answer with the right
/// reason (`error.rs`).
#[derive(Debug, thiserror::Error)]
pub enum TlsFailure {
    #[error(
        "this sidecar's workload certificate expired at {at} and the control plane is unreachable"
    )]
    CertificateExpired { at: String },
    #[error("the peer's certificate does not carry the identity the registry names: {0}")]
    IdentityMismatch(IdentityMismatch),
    #[error("TLS handshake failed: {0}")]
    Handshake(String),
}

impl TlsFailure {
    /// The failure inside a connect error, if it is one.
    pub fn of(error: &io::Error) -> Option<&TlsFailure> {
        error.get_ref()?.downcast_ref::<TlsFailure>()
    }

    pub fn expired(at: std::time::SystemTime) -> io::Error {
        io::Error::other(TlsFailure::CertificateExpired {
            at: humantime::format_rfc3339_seconds(at).to_string(),
        })
    }

    /// Classifies a handshake error of tokio-rustls.
    fn of_handshake(error: io::Error) -> io::Error {
        let inner = error
            .get_ref()
            .and_then(|e| e.downcast_ref::<rustls::Error>());
        if let Some(rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other))) =
            inner
        {
            if let Some(mismatch) = other.0.downcast_ref::<IdentityMismatch>() {
                return io::Error::other(TlsFailure::IdentityMismatch(mismatch.clone()));
            }
        }
        io::Error::other(TlsFailure::Handshake(error.to_string()))
    }
}

/// Presents the current leaf, on both sides of the hop.
#[derive(Debug)]
struct CurrentLeaf(Arc<WorkloadIdentity>);

impl CurrentLeaf {
    fn key(&self) -> Option<Arc<CertifiedKey>> {
        self.0.leaf().map(|leaf| Arc::clone(&leaf.certified))
    }
}

impl ResolvesServerCert for CurrentLeaf {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.key()
    }
}

impl ResolvesClientCert for CurrentLeaf {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.key()
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The inbound listener's TLS configuration (made once per listener);
/// `meshlet-tcp` is offered only with `opaque_tcp` (transparent mode,
/// where other sidecars send opaque TCP).
pub fn server_config(identity: &Arc<WorkloadIdentity>, opaque_tcp: bool) -> Arc<ServerConfig> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("the ring provider supports TLS 1.3")
        .with_client_cert_verifier(Arc::new(BundleClientVerifier {
            identity: Arc::clone(identity),
        }))
        .with_cert_resolver(Arc::new(CurrentLeaf(Arc::clone(identity))));
    config.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP1.to_vec()];
    if opaque_tcp {
        config.alpn_protocols.push(ALPN_TCP.to_vec());
    }
    Arc::new(config)
}

/// A client configuration for one connection to a peer that must be
/// `expected`, offering `alpn`.
fn client_config(
    identity: &Arc<WorkloadIdentity>,
    expected: &Arc<SpiffeId>,
    alpn: &[u8],
) -> Arc<ClientConfig> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("the ring provider supports TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PeerVerifier {
            identity: Arc::clone(identity),
            expected: Arc::clone(expected),
        }))
        .with_client_cert_resolver(Arc::new(CurrentLeaf(Arc::clone(identity))));
    config.alpn_protocols = vec![alpn.to_vec()];
    Arc::new(config)
}

/// The client side of a mesh hop over `stream` (connected to `addr`):
/// the handshake within `timeout`; a failure is an `io::Error` carrying a
/// [`TlsFailure`].
pub async fn connect(
    identity: &Arc<WorkloadIdentity>,
    stream: TcpStream,
    addr: SocketAddr,
    expected: &Arc<SpiffeId>,
    alpn: &[u8],
    timeout: Duration,
) -> io::Result<client::TlsStream<TcpStream>> {
    let connector = TlsConnector::from(client_config(identity, expected, alpn));
    // The name is not what is verified (the URI SAN is); an IP sends no SNI.
    let name = ServerName::IpAddress(addr.ip().into());
    match tokio::time::timeout(timeout, connector.connect(name, stream)).await {
        Ok(Ok(stream)) => {
            identity.metrics.outbound_handshakes.inc();
            Ok(stream)
        }
        Ok(Err(error)) => Err(TlsFailure::of_handshake(error)),
        Err(_) => Err(io::Error::other(TlsFailure::Handshake(format!(
            "no handshake within {timeout:?}"
        )))),
    }
}

/// The server side: the handshake within `timeout`; the stream, the
/// client's verified identity and the negotiated ALPN protocol.
pub async fn accept(
    tls: &Acceptor,
    stream: TcpStream,
    timeout: Duration,
) -> io::Result<(server::TlsStream<TcpStream>, Option<Arc<SpiffeId>>, Vec<u8>)> {
    let acceptor = TlsAcceptor::from(Arc::clone(&tls.config));
    let stream = tokio::time::timeout(timeout, acceptor.accept(stream))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
    tls.identity.metrics.inbound_handshakes.inc();
    let (_, session) = stream.get_ref();
    let identity = crate::identity::verify::peer_identity(session.peer_certificates());
    let alpn = session.alpn_protocol().unwrap_or_default().to_vec();
    Ok((stream, identity, alpn))
}

/// What the inbound listener needs for the mesh hop: the identity (is
/// there a certificate yet?), the server configuration, and where opaque
/// TCP (`meshlet-tcp`) goes.
#[derive(Clone)]
pub struct Acceptor {
    pub identity: Arc<WorkloadIdentity>,
    pub config: Arc<ServerConfig>,
    /// The local app, for `meshlet-tcp`.
    pub app: SocketAddr,
    pub connect_timeout: Duration,
    /// Whether `meshlet-tcp` is accepted (transparent mode only).
    pub opaque_tcp: bool,
}

impl Acceptor {
    pub fn new(
        identity: &Arc<WorkloadIdentity>,
        app: SocketAddr,
        connect_timeout: Duration,
        opaque_tcp: bool,
    ) -> Self {
        Acceptor {
            identity: Arc::clone(identity),
            config: server_config(identity, opaque_tcp),
            app,
            connect_timeout,
            opaque_tcp,
        }
    }
}

/// `meshlet-tcp`'s preamble: the port the caller's app was calling, sent
/// by the caller's sidecar right after the handshake.
pub async fn write_opaque_port<S: AsyncWrite + Unpin>(stream: &mut S, port: u16) -> io::Result<()> {
    stream.write_all(&port.to_be_bytes()).await
}

/// Reads [`write_opaque_port`]'s preamble.
pub async fn read_opaque_port<S: AsyncRead + Unpin>(stream: &mut S) -> io::Result<u16> {
    let mut port = [0u8; 2];
    stream.read_exact(&mut port).await?;
    Ok(u16::from_be_bytes(port))
}
