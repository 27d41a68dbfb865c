use std::fs;
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{CertificateParams, KeyPair, SanType};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use x509_parser::extensions::GeneralName;

use super::*;

const DAY: Duration = Duration::from_secs(24 * 3600);

fn parse(der: &[u8]) -> x509_parser::certificate::X509Certificate<'_> {
    x509_parser::parse_x509_certificate(der).unwrap().1
}

fn first_der(pem: &str) -> CertificateDer<'static> {
    tls::parse_chain(pem).unwrap().remove(0)
}

fn sans(cert: &x509_parser::certificate::X509Certificate<'_>) -> Vec<String> {
    cert.subject_alternative_name()
        .unwrap()
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .map(|n| match n {
                    GeneralName::DNSName(d) => format!("dns:{d}"),
                    GeneralName::URI(u) => format!("uri:{u}"),
                    GeneralName::IPAddress(b) => match b.len() {
                        4 => format!(
                            "ip:{}",
                            std::net::Ipv4Addr::from(<[u8; 4]>::try_from(*b).unwrap())
                        ),
                        16 => format!(
                            "ip:{}",
                            std::net::Ipv6Addr::from(<[u8; 16]>::try_from(*b).unwrap())
                        ),
                        _ => "ip:?".into(),
                    },
                    other => format!("{other:?}"),
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn new_ca_is_a_ten_year_p256_root() {
    let ca = MeshCa::create("meshlet.local").unwrap();
    let der = ca.cert_der().clone();
    let cert = parse(&der);
    let bc = cert.basic_constraints().unwrap().unwrap().value;
    assert!(bc.ca);
    assert_eq!(bc.path_len_constraint, Some(0));
    let ku = cert.key_usage().unwrap().unwrap().value;
    assert!(ku.key_cert_sign() && ku.crl_sign());
    assert!(
        cert.subject()
            .to_string()
            .contains("CN=meshlet mesh CA meshlet.local"),
        "{}",
        cert.subject()
    );
    assert_eq!(ca.subject(), cert.subject().to_string());
    let years = (cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp())
        / (365 * 24 * 3600);
    assert_eq!(years, 10);
    // id-ecPublicKey with the P-256 curve.
    assert_eq!(
        cert.public_key().algorithm.algorithm.to_id_string(),
        "1.2.840.10045.2.1"
    );
    cert.verify_signature(None).unwrap();
    assert!(!format!("{ca:?}").contains("PRIVATE"));
    assert!(MeshCa::create("Bad Domain").is_err());
}

#[test]
fn load_round_trip_and_refusals() {
    let ca = MeshCa::create("meshlet.local").unwrap();
    let loaded = MeshCa::load(ca.cert_pem(), &ca.key_pem()).unwrap();
    assert_eq!(loaded.cert_der(), ca.cert_der());
    // A leaf from the loaded CA verifies against the original certificate.
    let issued = loaded
        .issue_server_cert(&["localhost".into()], DAY)
        .unwrap();
    let leaf = first_der(&issued.chain_pem);
    let ca_der = ca.cert_der().clone();
    parse(&leaf)
        .verify_signature(Some(parse(&ca_der).public_key()))
        .unwrap();

    let other = MeshCa::create("meshlet.local").unwrap();
    assert!(matches!(
        MeshCa::load(ca.cert_pem(), &other.key_pem()),
        Err(CaError::KeyMismatch)
    ));
    assert!(matches!(
        MeshCa::load("junk", &ca.key_pem()),
        Err(CaError::Pem { .. })
    ));
    assert!(matches!(
        MeshCa::load(ca.cert_pem(), "junk"),
        Err(CaError::Pem { .. })
    ));
    // A leaf is not a CA.
    let leaf_pem = issued
        .chain_pem
        .split_inclusive("-----END CERTIFICATE-----\n")
        .next()
        .unwrap();
    assert!(matches!(
        MeshCa::load(leaf_pem, &issued.key_pem),
        Err(CaError::NotACa { .. })
    ));
}

#[test]
fn server_names_cover_listen_local_advertised_and_kubernetes() {
    let names = server_names(
        "10.1.2.3:15010".parse().unwrap(),
        &["cp.example.org".into(), "localhost".into()],
    );
    assert_eq!(
        names,
        [
            "10.1.2.3",
            "localhost",
            "127.0.0.1",
            "::1",
            "cp.example.org",
            "meshlet-control-plane",
            "meshlet-control-plane.meshlet",
            "meshlet-control-plane.meshlet.svc",
            "meshlet-control-plane.meshlet.svc.cluster.local"
        ]
    );
    let unspecified = server_names("0.0.0.0:15010".parse().unwrap(), &[]);
    assert_eq!(unspecified[0], "localhost");
}

#[test]
fn server_cert_has_the_sans_and_server_auth() {
    let ca = MeshCa::create("meshlet.local").unwrap();
    let names = server_names("127.0.0.1:15010".parse().unwrap(), &["cp.internal".into()]);
    let issued = ca.issue_server_cert(&names, DAY).unwrap();
    assert!(!format!("{issued:?}").contains("PRIVATE"));
    let chain = tls::parse_chain(&issued.chain_pem).unwrap();
    assert_eq!(chain.len(), 2);
    assert_eq!(&chain[1], ca.cert_der());
    let cert = parse(&chain[0]);
    let got = sans(&cert);
    for want in [
        "ip:127.0.0.1",
        "dns:localhost",
        "ip:::1",
        "dns:cp.internal",
        "dns:meshlet-control-plane.meshlet.svc.cluster.local",
    ] {
        assert!(got.contains(&want.to_string()), "{want} not in {got:?}");
    }
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && !eku.client_auth);
    assert!(!cert.basic_constraints().unwrap().unwrap().value.ca);
    let left = issued.not_after.duration_since(SystemTime::now()).unwrap();
    assert!(
        left > DAY - Duration::from_secs(60) && left <= DAY,
        "{left:?}"
    );

    for bad in [
        "",
        "*.example.com",
        "a..b",
        "under_score",
        "-x.example",
        "ex ample",
    ] {
        assert!(
            matches!(
                ca.issue_server_cert(&[bad.into()], DAY),
                Err(CaError::InvalidName { .. })
            ),
            "{bad:?}"
        );
    }
    assert!(matches!(
        ca.issue_server_cert(&[], DAY),
        Err(CaError::InvalidName { .. })
    ));
    assert!(matches!(
        ca.issue_server_cert(&names, Duration::ZERO),
        Err(CaError::InvalidTtl { .. })
    ));
}

/// A CSR from a workload key that asks for names it must not get.
fn greedy_csr(key: &KeyPair) -> String {
    let mut params = CertificateParams::new(vec!["evil.example.com".to_string()]).unwrap();
    params.subject_alt_names.push(SanType::URI(
        "spiffe://meshlet.local/ns/kube-system/sa/admin"
            .try_into()
            .unwrap(),
    ));
    params.serialize_request(key).unwrap().pem().unwrap()
}

#[test]
fn workload_cert_has_exactly_the_spiffe_id() {
    let ca = MeshCa::create("meshlet.local").unwrap();
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let id = SpiffeId::new("meshlet.local", "default", "orders").unwrap();
    let issued = ca.sign_workload_csr(&greedy_csr(&key), &id, DAY).unwrap();
    let der = first_der(&issued.cert_pem);
    let cert = parse(&der);
    assert_eq!(
        sans(&cert),
        vec!["uri:spiffe://meshlet.local/ns/default/sa/orders".to_string()]
    );
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);
    assert!(!cert.basic_constraints().unwrap().unwrap().value.ca);
    assert_eq!(
        cert.public_key().raw,
        rcgen::PublicKeyData::subject_public_key_info(&key).as_slice()
    );
    assert_eq!(
        cert.raw_serial()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>(),
        issued.serial
    );

    // rustls accepts it as a client certificate chaining to the mesh CA (issue 14's use).
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.cert_der().clone()).unwrap();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        tls::provider(),
    )
    .build()
    .unwrap();
    verifier
        .verify_client_cert(&der, &[], UnixTime::now())
        .unwrap();

    // Another CA's root does not accept it.
    let other = MeshCa::create("meshlet.local").unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(other.cert_der().clone()).unwrap();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        tls::provider(),
    )
    .build()
    .unwrap();
    assert!(verifier
        .verify_client_cert(&der, &[], UnixTime::now())
        .is_err());
}

#[test]
fn bad_csrs_are_refused() {
    let ca = MeshCa::create("meshlet.local").unwrap();
    let id = SpiffeId::new("meshlet.local", "default", "orders").unwrap();
    assert!(matches!(
        ca.sign_workload_csr("junk", &id, DAY),
        Err(CaError::InvalidCsr { .. })
    ));
    assert!(matches!(
        ca.sign_workload_csr(&"A".repeat(MAX_CSR_LEN + 1), &id, DAY),
        Err(CaError::InvalidCsr { .. })
    ));
    // A CSR whose signature does not match its key: flip a byte in the signature.
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .serialize_request(&key)
        .unwrap();
    let mut der = csr.der().to_vec();
    let n = der.len();
    der[n - 3] ^= 0x01;
    let tampered = format!(
        "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
        base64_lines(&der)
    );
    assert!(matches!(
        ca.sign_workload_csr(&tampered, &id, DAY),
        Err(CaError::InvalidCsr { .. })
    ));
    assert!(matches!(
        ca.sign_workload_csr(&csr.pem().unwrap(), &id, Duration::ZERO),
        Err(CaError::InvalidTtl { .. })
    ));
}

#[test]
fn leaf_validity_is_capped_at_the_ca() {
    let ca = MeshCa::create("meshlet.local").unwrap();
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let id = SpiffeId::new("meshlet.local", "default", "orders").unwrap();
    let issued = ca
        .sign_workload_csr(
            &greedy_csr(&key),
            &id,
            Duration::from_secs(50 * 365 * 24 * 3600),
        )
        .unwrap();
    assert_eq!(issued.not_after, ca.not_after());
}

/// Standard base64 in 64-character lines (for the tampered CSR).
fn base64_lines(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::new();
    for c in bytes.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                s.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s.as_bytes()
        .chunks(64)
        .map(|l| std::str::from_utf8(l).unwrap())
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn persists_and_reloads_with_modes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    crate::files::ensure_private_dir(&dir).unwrap();
    let (ca, origin) = load_or_create(&dir, "meshlet.local").unwrap();
    assert_eq!(origin, CaOrigin::Created);
    let mode = |f: &str| fs::metadata(dir.join(f)).unwrap().mode() & 0o777;
    assert_eq!(mode(CA_KEY_FILE), 0o600);
    assert_eq!(mode(CA_CERT_FILE), 0o644);
    assert_eq!(
        fs::read_to_string(dir.join(CA_CERT_FILE)).unwrap(),
        ca.cert_pem()
    );

    let (again, origin) = load_or_create(&dir, "meshlet.local").unwrap();
    assert_eq!(origin, CaOrigin::Loaded);
    assert_eq!(again.cert_der(), ca.cert_der());

    // Lost certificate: re-made from the key; old leaves still verify.
    let leaf = ca.issue_server_cert(&["localhost".into()], DAY).unwrap();
    fs::remove_file(dir.join(CA_CERT_FILE)).unwrap();
    let (remade, origin) = load_or_create(&dir, "meshlet.local").unwrap();
    assert_eq!(origin, CaOrigin::CertificateRecreated);
    assert_ne!(remade.cert_der(), ca.cert_der());
    let leaf_der = first_der(&leaf.chain_pem);
    let remade_der = remade.cert_der().clone();
    parse(&leaf_der)
        .verify_signature(Some(parse(&remade_der).public_key()))
        .unwrap();

    // Lost key: refused.
    fs::remove_file(dir.join(CA_KEY_FILE)).unwrap();
    assert!(matches!(
        load_or_create(&dir, "meshlet.local"),
        Err(CaError::Incomplete { .. })
    ));

    // An open key file is refused.
    let tmp2 = tempfile::tempdir().unwrap();
    load_or_create(tmp2.path(), "meshlet.local").unwrap();
    let key = tmp2.path().join(CA_KEY_FILE);
    fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    assert!(matches!(
        load_or_create(tmp2.path(), "meshlet.local"),
        Err(CaError::File(crate::files::FileError::TooOpen { .. }))
    ));
}

// ---- real TLS handshakes over loopback ----

async fn serve_once(
    config: rustls::ServerConfig,
) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        if let Ok(mut tls) = acceptor.accept(tcp).await {
            let mut buf = [0u8; 4];
            if tls.read_exact(&mut buf).await.is_ok() {
                let _ = tls.write_all(b"pong").await;
                let _ = tls.shutdown().await;
            }
        }
    });
    (addr, task)
}

/// Connects to `addr` as `name` trusting only `ca_der`; returns the
/// negotiated protocol version and ALPN, or the handshake error.
async fn connect(
    addr: std::net::SocketAddr,
    name: &str,
    ca_der: &CertificateDer<'static>,
) -> Result<(rustls::ProtocolVersion, Option<Vec<u8>>), std::io::Error> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca_der.clone()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await?;
    let server_name = ServerName::try_from(name.to_owned()).unwrap();
    let mut tls = connector.connect(server_name, tcp).await?;
    tls.write_all(b"ping").await?;
    let mut buf = [0u8; 4];
    tls.read_exact(&mut buf).await?;
    assert_eq!(&buf, b"pong");
    let (_, conn) = tls.get_ref();
    Ok((
        conn.protocol_version().unwrap(),
        conn.alpn_protocol().map(<[u8]>::to_vec),
    ))
}

/// The certificate error behind a failed client handshake.
fn cert_error(err: &std::io::Error) -> Option<&rustls::CertificateError> {
    match err.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::InvalidCertificate(e) => Some(e),
        _ => None,
    }
}

fn api_server_config(ca: &MeshCa) -> rustls::ServerConfig {
    let names = server_names("127.0.0.1:15010".parse().unwrap(), &[]);
    let issued = ca.issue_server_cert(&names, DAY).unwrap();
    server_tls_config(&issued.chain_pem, &issued.key_pem).unwrap()
}

#[tokio::test]
async fn handshake_succeeds_for_ip_and_localhost() {
    let ca = MeshCa::create("meshlet.local").unwrap();
    for name in [
        "127.0.0.1",
        "localhost",
        "meshlet-control-plane.meshlet.svc",
    ] {
        let (addr, task) = serve_once(api_server_config(&ca)).await;
        let (version, alpn) = connect(addr, name, ca.cert_der())
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(version, rustls::ProtocolVersion::TLSv1_3);
        assert_eq!(alpn.as_deref(), Some(&b"http/1.1"[..]));
        task.await.unwrap();
    }
}

#[tokio::test]
async fn handshake_fails_for_an_unlisted_name_or_another_ca() {
    let ca = MeshCa::create("meshlet.local").unwrap();

    let (addr, task) = serve_once(api_server_config(&ca)).await;
    let err = connect(addr, "evil.example.com", ca.cert_der())
        .await
        .unwrap_err();
    assert!(
        matches!(
            cert_error(&err),
            Some(
                rustls::CertificateError::NotValidForName
                    | rustls::CertificateError::NotValidForNameContext { .. }
            )
        ),
        "{err}"
    );
    task.await.unwrap();

    let other = MeshCa::create("meshlet.local").unwrap();
    let (addr, task) = serve_once(api_server_config(&ca)).await;
    let err = connect(addr, "127.0.0.1", other.cert_der())
        .await
        .unwrap_err();
    assert!(
        matches!(
            cert_error(&err),
            Some(rustls::CertificateError::UnknownIssuer | rustls::CertificateError::BadSignature)
        ),
        "{err}"
    );
    task.await.unwrap();
}

#[test]
fn server_config_refuses_bad_pem() {
    let ca = MeshCa::create("meshlet.local").unwrap();
    let issued = ca.issue_server_cert(&["localhost".into()], DAY).unwrap();
    assert!(matches!(
        server_tls_config("", &issued.key_pem),
        Err(CaError::Pem { .. })
    ));
    assert!(matches!(
        server_tls_config(&issued.chain_pem, "nope"),
        Err(CaError::Pem { .. })
    ));
    // A key that is not the certificate's.
    let other = ca.issue_server_cert(&["localhost".into()], DAY).unwrap();
    assert!(server_tls_config(&issued.chain_pem, &other.key_pem).is_err());
}
