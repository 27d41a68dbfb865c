//! A test stand-in for a mesh workload on the TLS side of a sidecar.
//!
//! [`TestCa::load`] reads the control plane's CA from its data dir (`ca.crt`
//! and `ca.key`, as only the control plane and the tests may), and
//! [`TestCa::workload`] mints a workload certificate for a service the way
//! the control plane would (a CSR signed by `MeshCa::sign_workload_csr`).
//! [`handshake`] opens TLS to a sidecar's inbound listener, optionally with
//! such a client certificate and ALPN protocols, and records the
//! certificate the sidecar presented ([`Presented`]: serial, URI SANs, and
//! whether it chains to the mesh CA's bundle at this moment), so tests can
//! check identities, rotation and expiry from outside the sidecar.
//! [`get_over`] sends one HTTP request over an established connection.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use meshlet_control_plane::ca::{MeshCa, SpiffeId};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// The mesh CA as a test holds it.
pub struct TestCa {
    ca: MeshCa,
    bundle_pem: String,
}

/// A minted workload certificate and its key.
pub struct Workload {
    pub identity: String,
    chain: Vec<CertificateDer<'static>>,
    key_pem: String,
}

impl TestCa {
    /// The CA in `data_dir` (the first certificate of `ca.crt` with
    /// `ca.key`; the whole `ca.crt` as the trust bundle).
    pub fn load(data_dir: &Path) -> TestCa {
        let bundle_pem = std::fs::read_to_string(data_dir.join("ca.crt")).expect("ca.crt");
        let key_pem = std::fs::read_to_string(data_dir.join("ca.key")).expect("ca.key");
        let first = pem_blocks(&bundle_pem)
            .into_iter()
            .next()
            .expect("a certificate in ca.crt");
        let ca = MeshCa::load(&first, &key_pem).expect("load the mesh CA");
        TestCa { ca, bundle_pem }
    }

    /// A certificate for `spiffe://meshlet.local/ns/default/sa/SERVICE`,
    /// valid for `ttl`.
    pub fn workload(&self, service: &str, ttl: Duration) -> Workload {
        let id = SpiffeId::new("meshlet.local", "default", service).expect("spiffe id");
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let csr = rcgen::CertificateParams::new(Vec::<String>::new())
            .expect("params")
            .serialize_request(&key)
            .expect("csr")
            .pem()
            .expect("csr pem");
        let leaf = self
            .ca
            .sign_workload_csr(&csr, &id, ttl)
            .expect("sign workload certificate");
        let chain = CertificateDer::pem_slice_iter(leaf.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .expect("leaf pem");
        Workload {
            identity: id.to_string(),
            chain,
            key_pem: key.serialize_pem(),
        }
    }

    /// The trust bundle as it was when loaded.
    pub fn roots(&self) -> RootCertStore {
        roots_of(&self.bundle_pem)
    }
}

/// The certificates of a PEM bundle as roots.
pub fn roots_of(bundle_pem: &str) -> RootCertStore {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(bundle_pem.as_bytes()) {
        roots.add(cert.expect("certificate pem")).expect("root");
    }
    roots
}

/// The root of `bundle_pem` whose SHA-256 (lowercase hex, of the DER) is
/// `fingerprint`, alone in a store.
pub fn root_with_fingerprint(bundle_pem: &str, fingerprint: &str) -> Option<RootCertStore> {
    let cert = CertificateDer::pem_slice_iter(bundle_pem.as_bytes())
        .filter_map(Result::ok)
        .find(|cert| {
            let digest = ring::digest::digest(&ring::digest::SHA256, cert);
            let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
            hex == fingerprint
        })?;
    let mut roots = RootCertStore::empty();
    roots.add(cert).ok()?;
    Some(roots)
}

fn pem_blocks(bundle: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current = String::new();
    for line in bundle.lines() {
        current.push_str(line);
        current.push('\n');
        if line.starts_with("-----END") {
            blocks.push(std::mem::take(&mut current));
        }
    }
    blocks
}

/// What a sidecar presented in a TLS handshake.
#[derive(Debug, Clone)]
pub struct Presented {
    /// Lowercase hex, without leading zero bytes' significance removed
    /// (as `x509-parser` prints the raw serial).
    pub serial: String,
    pub uri_sans: Vec<String>,
    pub issuer: String,
    /// `Ok` if the chain verified against the bundle at handshake time
    /// (including validity dates), else why not.
    pub chain: Result<(), String>,
}

/// Records the server's certificate, checks its chain against `roots`, and
/// lets the handshake go on either way (the test decides what it means).
#[derive(Debug)]
struct Recorder {
    roots: Arc<RootCertStore>,
    seen: Mutex<Option<Presented>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for Recorder {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let chain = rustls::server::ParsedCertificate::try_from(end_entity)
            .and_then(|parsed| {
                rustls::client::verify_server_cert_signed_by_trust_anchor(
                    &parsed,
                    &self.roots,
                    intermediates,
                    now,
                    self.provider.signature_verification_algorithms.all,
                )
            })
            .map_err(|e| e.to_string());
        let (_, x509) = x509_parser::parse_x509_certificate(end_entity)
            .map_err(|_| rustls::Error::General("unparsable server certificate".into()))?;
        let uri_sans = x509
            .subject_alternative_name()
            .ok()
            .flatten()
            .map(|san| {
                san.value
                    .general_names
                    .iter()
                    .filter_map(|name| match name {
                        x509_parser::extensions::GeneralName::URI(uri) => Some(uri.to_string()),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        *self.seen.lock().unwrap() = Some(Presented {
            serial: x509.raw_serial_as_string().replace(':', ""),
            uri_sans,
            issuer: x509.issuer().to_string(),
            chain,
        });
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Opens TLS 1.3 to `addr` with `client` as the client certificate (or
/// none) offering `alpn`. Returns what the server presented (if it got that
/// far) and the connection, or the handshake's error.
pub async fn handshake(
    addr: SocketAddr,
    roots: RootCertStore,
    client: Option<&Workload>,
    alpn: &[&str],
) -> (Option<Presented>, io::Result<TlsStream<TcpStream>>) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let recorder = Arc::new(Recorder {
        roots: Arc::new(roots),
        seen: Mutex::new(None),
        provider: Arc::clone(&provider),
    });
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls 1.3")
        .dangerous()
        .with_custom_certificate_verifier(recorder.clone());
    let mut config = match client {
        Some(workload) => builder
            .with_client_auth_cert(
                workload.chain.clone(),
                PrivateKeyDer::from_pem_slice(workload.key_pem.as_bytes()).expect("key pem"),
            )
            .expect("client cert"),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let result = async {
        let tcp = TcpStream::connect(addr).await?;
        let name = ServerName::try_from("sidecar.meshlet.invalid").expect("name");
        let mut tls = connector.connect(name, tcp).await?;
        // TLS 1.3: a server refusing our certificate says so after its own
        // Finished; one round trip surfaces it.
        use tokio::io::AsyncWriteExt;
        tls.flush().await?;
        Ok(tls)
    };
    let result = tokio::time::timeout(Duration::from_secs(5), result)
        .await
        .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "tls handshake")));
    let seen = recorder.seen.lock().unwrap().clone();
    (seen, result)
}

/// One `GET path` over an established TLS connection, in HTTP/2 if the
/// server chose `h2`, else HTTP/1.1. Returns status, headers and body.
pub async fn get_over(
    tls: TlsStream<TcpStream>,
    authority: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(u16, http::HeaderMap, String), String> {
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    let mut request = Request::get(if h2 {
        format!("http://{authority}{path}")
    } else {
        path.to_owned()
    });
    if !h2 {
        request = request.header("host", authority);
    }
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let io = TokioIo::new(tls);
    let response = if h2 {
        let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .map_err(|e| format!("h2 handshake: {e}"))?;
        tokio::spawn(conn);
        sender.send_request(request).await
    } else {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| format!("http/1.1 handshake: {e}"))?;
        tokio::spawn(conn);
        sender.send_request(request).await
    }
    .map_err(|e| format!("request: {e}"))?;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?
        .to_bytes();
    Ok((status, headers, String::from_utf8_lossy(&body).into_owned()))
}

/// Waits (20 s at most) until the sidecar whose outbound listener is
/// `outbound` reaches service `to` over mTLS: `to`'s app sees the
/// caller's verified identity, `spiffe://meshlet.local/ns/default/sa/FROM_NAME`.
pub async fn wait_mtls(outbound: SocketAddr, to: &str, from_name: &str) {
    let uri = format!("http://{to}/headers");
    let expected = format!("spiffe://meshlet.local/ns/default/sa/{from_name}");
    crate::wait::until(
        &format!("{from_name} → {to} over mTLS"),
        Duration::from_secs(20),
        || {
            let (uri, expected) = (uri.clone(), expected.clone());
            async move {
                let reply = crate::client::get_uri(outbound, &uri).await.ok()?;
                let json: serde_json::Value = serde_json::from_slice(&reply.body).ok()?;
                let seen = json["headers"]["x-meshlet-source-identity"][0].as_str()?;
                (seen == expected).then_some(())
            }
        },
    )
    .await;
}
