//! TLS termination for a gateway's external clients (`--tls-cert` /
//! `--tls-key`): the certificates, the choice among them by SNI, and
//! their reload when the files change.
//!
//! ```text
//! start:  pairs of PEM files ─► load_pair (chain, key, key matches the leaf, DNS SANs) ─► Terminator
//!         (an unreadable file or a key that is not the certificate's: StartupError naming the file)
//! accept: ClientHello ─► SniResolver::resolve: an exact SAN, else a wildcard `*.domain`, else the first pair
//!         ─► handshake (TLS 1.2 or 1.3, ALPN h2 | http/1.1) ─► listen::server serves HTTP on it
//! reload: every 2 s each pair's (mtime, length) of both files ─► changed? load_pair
//!         ─► ok: swapped in (new handshakes get it; open connections keep theirs)
//!         ─► error: logged, the old pair kept, not retried until the files change again
//!         (`meshlet_gateway_certificate_reloads_total{outcome="ok"|"error"}`)
//! ```
//!
//! Unlike the mesh hop (`identity::tls`: TLS 1.3 only, a client
//! certificate required), external clients are browsers and tools, so TLS
//! 1.2 is accepted too and no client certificate is asked for.
//!
//! **Invariant:** a handshake never reads a file: it loads the current
//! list through an `ArcSwap`; only the reload task touches the disk.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use prometheus::IntCounter;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::server::TlsStream;

use crate::identity::provider::provider;

/// How often the certificate files are checked for changes.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(2);

/// ALPN protocols offered to external clients, preferred first.
const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// One certificate chain and its private key, PEM files (re-read when they
/// change).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CertificateFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Why a certificate pair cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CertificateError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: no PEM certificate in it", path.display())]
    NoCertificate { path: PathBuf },
    #[error("{}: no usable PEM private key in it ({detail})", path.display())]
    BadKey { path: PathBuf, detail: String },
    #[error("{}: this key does not belong to the certificate in {}", key.display(), cert.display())]
    KeyMismatch { key: PathBuf, cert: PathBuf },
    #[error("{}: {detail}", path.display())]
    BadCertificate { path: PathBuf, detail: String },
}

/// The gateway's TLS: a server configuration whose certificate resolver
/// reads the current pairs, and the files to watch.
#[derive(Debug)]
pub struct Terminator {
    files: Vec<CertificateFiles>,
    resolver: Arc<SniResolver>,
    config: Arc<ServerConfig>,
}

/// Counters of the reload task (`meshlet_gateway_certificate_reloads_total`).
#[derive(Debug, Clone)]
pub struct ReloadCounters {
    pub ok: IntCounter,
    pub error: IntCounter,
}

impl Terminator {
    /// Loads every pair (at least one); the first is the default
    /// certificate.
    pub fn load(files: &[CertificateFiles]) -> Result<Self, CertificateError> {
        let served = files.iter().map(load_pair).collect::<Result<Vec<_>, _>>()?;
        let resolver = Arc::new(SniResolver {
            current: ArcSwap::from_pointee(served),
        });
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .expect("the ring provider supports TLS 1.2 and 1.3")
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(&resolver) as Arc<dyn ResolvesServerCert>);
        config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
        Ok(Terminator {
            files: files.to_vec(),
            resolver,
            config: Arc::new(config),
        })
    }

    /// The TLS handshake with an external client, bounded by `timeout`;
    /// the stream and the negotiated ALPN protocol (empty: none, HTTP/1.1).
    pub async fn accept(
        &self,
        stream: TcpStream,
        timeout: Duration,
    ) -> std::io::Result<(TlsStream<TcpStream>, Vec<u8>)> {
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::clone(&self.config));
        let stream = tokio::time::timeout(timeout, acceptor.accept(stream))
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out")
            })??;
        let alpn = stream
            .get_ref()
            .1
            .alpn_protocol()
            .unwrap_or_default()
            .to_vec();
        Ok((stream, alpn))
    }

    /// Checks the files every `interval` until `stop` and swaps in pairs
    /// whose files changed and load; a failed load keeps the old pair and
    /// is retried only when the files change again.
    pub fn spawn_reloader(
        self: &Arc<Self>,
        interval: Duration,
        counters: ReloadCounters,
        mut stop: watch::Receiver<bool>,
    ) {
        let terminator = Arc::clone(self);
        tokio::spawn(async move {
            // The stamps last tried per pair (loaded or failed).
            let mut tried: Vec<Stamps> = terminator
                .resolver
                .current
                .load()
                .iter()
                .map(|s| s.stamps)
                .collect();
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(interval) => {}
                    _ = stop.wait_for(|stop| *stop) => return,
                }
                let files = terminator.files.clone();
                let seen = tried.clone();
                let checked =
                    tokio::task::spawn_blocking(move || reload_changed(&files, &seen)).await;
                let Ok(results) = checked else { continue };
                for (index, stamps, result) in results {
                    tried[index] = stamps;
                    let files = &terminator.files[index];
                    match result {
                        Ok(served) => {
                            tracing::info!(cert = %files.cert.display(), names = ?served.names,
                                "gateway certificate reloaded");
                            terminator.resolver.replace(index, served);
                            counters.ok.inc();
                        }
                        Err(error) => {
                            tracing::error!(%error, cert = %files.cert.display(),
                                "gateway certificate reload failed; still serving the previous one");
                            counters.error.inc();
                        }
                    }
                }
            }
        });
    }

    /// The DNS names each pair's certificate is for (`/config_dump`, tests).
    pub fn names(&self) -> Vec<Vec<String>> {
        self.resolver
            .current
            .load()
            .iter()
            .map(|s| s.names.clone())
            .collect()
    }
}

/// (mtime, length) of a pair's certificate and key files; `None` for a
/// file that could not be read.
type Stamps = [Option<(SystemTime, u64)>; 2];

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

fn stamps(files: &CertificateFiles) -> Stamps {
    [stamp(&files.cert), stamp(&files.key)]
}

type Reloaded = (usize, Stamps, Result<Served, CertificateError>);

/// Loads the pairs whose files' stamps differ from `seen`.
fn reload_changed(files: &[CertificateFiles], seen: &[Stamps]) -> Vec<Reloaded> {
    files
        .iter()
        .zip(seen)
        .enumerate()
        .filter_map(|(index, (files, seen))| {
            let now = stamps(files);
            (now != *seen).then(|| (index, now, load_pair(files)))
        })
        .collect()
}

/// One loaded pair.
#[derive(Debug, Clone)]
struct Served {
    /// The leaf's DNS SANs, lower case (`*.example.com` for a wildcard).
    names: Vec<String>,
    key: Arc<CertifiedKey>,
    stamps: Stamps,
}

/// Reads, parses and checks one pair: a chain (leaf first), a private key
/// (PKCS#8, PKCS#1 or SEC1) that belongs to the leaf, the leaf's DNS names.
fn load_pair(files: &CertificateFiles) -> Result<Served, CertificateError> {
    // Stamped before reading: a change during the read is seen next time.
    let stamps = stamps(files);
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| CertificateError::Read {
            path: path.to_owned(),
            source,
        })
    };
    let (cert_pem, key_pem) = (read(&files.cert)?, read(&files.key)?);
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| CertificateError::BadCertificate {
            path: files.cert.clone(),
            detail: e.to_string(),
        })?;
    let Some(leaf) = chain.first() else {
        return Err(CertificateError::NoCertificate {
            path: files.cert.clone(),
        });
    };
    let names = dns_names(leaf).map_err(|detail| CertificateError::BadCertificate {
        path: files.cert.clone(),
        detail,
    })?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| CertificateError::BadKey {
        path: files.key.clone(),
        detail: e.to_string(),
    })?;
    let signing =
        provider()
            .key_provider
            .load_private_key(key)
            .map_err(|e| CertificateError::BadKey {
                path: files.key.clone(),
                detail: e.to_string(),
            })?;
    let certified = CertifiedKey::new(chain, signing);
    match certified.keys_match() {
        Ok(()) => {}
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            return Err(CertificateError::KeyMismatch {
                key: files.key.clone(),
                cert: files.cert.clone(),
            })
        }
        // The provider cannot tell (no public key): accepted, as rustls does.
        Err(rustls::Error::InconsistentKeys(_)) => {}
        Err(e) => {
            return Err(CertificateError::BadCertificate {
                path: files.cert.clone(),
                detail: e.to_string(),
            })
        }
    }
    Ok(Served {
        names,
        key: Arc::new(certified),
        stamps,
    })
}

/// The DNS names of a certificate's subjectAltName, lower case.
fn dns_names(der: &CertificateDer<'_>) -> Result<Vec<String>, String> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| format!("certificate: {e}"))?;
    let names = cert
        .subject_alternative_name()
        .map_err(|e| format!("subjectAltName: {e}"))?
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    x509_parser::extensions::GeneralName::DNSName(dns) => {
                        Some(dns.to_ascii_lowercase())
                    }
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(names)
}

/// Chooses the certificate for a ClientHello from the current pairs.
#[derive(Debug)]
struct SniResolver {
    current: ArcSwap<Vec<Served>>,
}

impl SniResolver {
    fn replace(&self, index: usize, served: Served) {
        // Only the reload task writes: no update is lost between load and store.
        let mut next: Vec<Served> = self.current.load().iter().cloned().collect();
        if let Some(slot) = next.get_mut(index) {
            *slot = served;
        }
        self.current.store(Arc::new(next));
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let served = self.current.load();
        let index = hello.server_name().map_or(0, |name| choose(&served, name));
        served.get(index).map(|s| Arc::clone(&s.key))
    }
}

/// The pair for `server_name`: one with the exact name, else one with a
/// wildcard covering it (`*.example.com` covers one label:
/// `shop.example.com`, not `example.com` nor `a.b.example.com`), else the
/// first (the default).
fn choose(served: &[Served], server_name: &str) -> usize {
    let exact = served.iter().position(|s| {
        s.names
            .iter()
            .any(|n| !n.starts_with("*.") && n.eq_ignore_ascii_case(server_name))
    });
    let wildcard = || {
        let (label, parent) = server_name.split_once('.')?;
        if label.is_empty() || parent.is_empty() {
            return None;
        }
        served.iter().position(|s| {
            s.names.iter().any(|n| {
                n.strip_prefix("*.")
                    .is_some_and(|domain| domain.eq_ignore_ascii_case(parent))
            })
        })
    };
    exact.or_else(wildcard).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed certificate for `names` and its key, as PEM files in
    /// `dir` named `stem.crt` / `stem.key`.
    fn write_pair(dir: &Path, stem: &str, names: &[&str]) -> CertificateFiles {
        let key = rcgen::KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let cert = rcgen::CertificateParams::new(names)
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let files = CertificateFiles {
            cert: dir.join(format!("{stem}.crt")),
            key: dir.join(format!("{stem}.key")),
        };
        std::fs::write(&files.cert, cert.pem()).unwrap();
        std::fs::write(&files.key, key.serialize_pem()).unwrap();
        files
    }

    fn served(names: &[&str]) -> Served {
        let dir = tempfile::tempdir().unwrap();
        let mut loaded = load_pair(&write_pair(dir.path(), "x", &["x.test"])).unwrap();
        loaded.names = names.iter().map(|n| n.to_string()).collect();
        loaded
    }

    #[test]
    fn sni_picks_the_exact_name_then_a_wildcard_then_the_default() {
        let pairs = [
            served(&["default.test"]),
            served(&["*.example.com"]),
            served(&["shop.example.com"]),
            served(&["api.other.test", "*.other.test"]),
        ];
        for (name, expect) in [
            ("shop.example.com", 2),
            ("SHOP.example.com", 2),
            ("blog.example.com", 1),
            ("a.b.example.com", 0),
            ("example.com", 0),
            ("api.other.test", 3),
            ("x.other.test", 3),
            ("default.test", 0),
            ("unknown.test", 0),
        ] {
            assert_eq!(choose(&pairs, name), expect, "{name}");
        }
    }

    #[test]
    fn a_pair_is_loaded_with_its_names_and_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let shop = write_pair(dir.path(), "shop", &["shop.example.com", "*.shop.test"]);
        let terminator = Terminator::load(std::slice::from_ref(&shop)).unwrap();
        assert_eq!(
            terminator.names(),
            [vec![
                "shop.example.com".to_owned(),
                "*.shop.test".to_owned()
            ]]
        );

        let other = write_pair(dir.path(), "other", &["other.test"]);
        let mismatched = CertificateFiles {
            cert: shop.cert.clone(),
            key: other.key.clone(),
        };
        let error = load_pair(&mismatched).unwrap_err().to_string();
        assert!(
            error.contains("other.key") && error.contains("does not belong"),
            "{error}"
        );

        let missing = CertificateFiles {
            cert: dir.path().join("nope.crt"),
            key: shop.key.clone(),
        };
        let error = load_pair(&missing).unwrap_err().to_string();
        assert!(
            error.contains("cannot read") && error.contains("nope.crt"),
            "{error}"
        );

        let not_pem = CertificateFiles {
            cert: shop.key.clone(),
            key: shop.key.clone(),
        };
        let error = load_pair(&not_pem).unwrap_err().to_string();
        assert!(error.contains("no PEM certificate"), "{error}");

        let no_key = CertificateFiles {
            cert: shop.cert.clone(),
            key: shop.cert.clone(),
        };
        let error = load_pair(&no_key).unwrap_err().to_string();
        assert!(
            error.contains("shop.crt") && error.contains("private key"),
            "{error}"
        );
    }

    #[tokio::test]
    async fn changed_files_are_reloaded_and_a_bad_change_keeps_the_old_pair() {
        let dir = tempfile::tempdir().unwrap();
        let files = write_pair(dir.path(), "a", &["one.test"]);
        let terminator = Arc::new(Terminator::load(std::slice::from_ref(&files)).unwrap());
        let counters = ReloadCounters {
            ok: IntCounter::new("ok", "ok").unwrap(),
            error: IntCounter::new("error", "error").unwrap(),
        };
        let (_stop, stopped) = watch::channel(false);
        terminator.spawn_reloader(Duration::from_millis(20), counters.clone(), stopped);

        // A garbage certificate: counted, the old one still served.
        std::fs::write(&files.cert, "not a certificate").unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while counters.error.get() == 0 {
            assert!(std::time::Instant::now() < deadline, "no failed reload");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(terminator.names(), [vec!["one.test".to_owned()]]);

        // A good pair replaces it.
        let replacement = write_pair(dir.path(), "b", &["two.test"]);
        std::fs::rename(&replacement.key, &files.key).unwrap();
        std::fs::rename(&replacement.cert, &files.cert).unwrap();
        while terminator.names() != [vec!["two.test".to_owned()]] {
            assert!(std::time::Instant::now() < deadline, "not reloaded");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(counters.ok.get() >= 1);
    }
}
