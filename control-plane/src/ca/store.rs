//! Keeping the CA in the data directory: `ca.crt` (PEM, 0644, public: what
//! `--ca-file` points at) and `ca.key` (PKCS#8 PEM, 0600, never leaves the
//! data dir).
//!
//! - Neither file: a new CA; the key is created exclusively (never over a
//!   file or through a symlink), then the certificate is written atomically.
//! - Both: loaded; the key must be private (no group/other bits) and owned
//!   by this user, the certificate not writable by others.
//! - Only the key (the certificate was lost, or a crash between the two
//!   writes): a new self-signed certificate for the same key and subject,
//!   so certificates signed before still verify.
//! - Only the certificate: refused; without its key the CA cannot sign, and
//!   a new CA would invalidate every certificate clients trust. The error
//!   says to remove `ca.crt` to start a new CA.
//!
//! The data directory must already exist with mode 0700
//! ([`files::ensure_private_dir`]).

use std::io;
use std::path::Path;

use rcgen::KeyPair;

use super::authority::MeshCa;
use super::error::CaError;
use crate::files::{self, Access, FileError};

pub const CA_CERT_FILE: &str = "ca.crt";
pub const CA_KEY_FILE: &str = "ca.key";
const MAX_PEM_LEN: u64 = 64 * 1024;

/// What [`load_or_create`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaOrigin {
    Created,
    Loaded,
    /// `ca.crt` was missing and was re-made from `ca.key`.
    CertificateRecreated,
}

fn exists(path: &Path) -> Result<bool, CaError> {
    match std::fs::symlink_metadata(path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(FileError::Io {
            op: "stat",
            path: path.to_path_buf(),
            source: e,
        }
        .into()),
    }
}

fn read_text(path: &Path, access: Access) -> Result<String, CaError> {
    let bytes = files::read_checked(path, access, MAX_PEM_LEN)?;
    String::from_utf8(bytes).map_err(|_| CaError::Pem {
        what: if access == Access::Private {
            "the CA key"
        } else {
            "the CA certificate"
        },
    })
}

/// Loads the CA from `data_dir`, or creates it (see the module docs).
pub fn load_or_create(data_dir: &Path, trust_domain: &str) -> Result<(MeshCa, CaOrigin), CaError> {
    let cert_path = data_dir.join(CA_CERT_FILE);
    let key_path = data_dir.join(CA_KEY_FILE);
    match (exists(&cert_path)?, exists(&key_path)?) {
        (true, true) => {
            let key = read_text(&key_path, Access::Private)?;
            let cert = read_text(&cert_path, Access::NotWritableByOthers)?;
            Ok((MeshCa::load(&cert, &key)?, CaOrigin::Loaded))
        }
        (false, false) => {
            let ca = MeshCa::create(trust_domain)?;
            files::create_private_file(&key_path, ca.key_pem().as_bytes())?;
            files::write_file_atomic(&cert_path, ca.cert_pem().as_bytes(), files::PUBLIC_FILE_MODE)?;
            Ok((ca, CaOrigin::Created))
        }
        (false, true) => {
            let key_pem = read_text(&key_path, Access::Private)?;
            let key = KeyPair::from_pem(&key_pem).map_err(|_| CaError::Pem { what: "the CA key" })?;
            let ca = MeshCa::self_sign(trust_domain, key)?;
            files::write_file_atomic(&cert_path, ca.cert_pem().as_bytes(), files::PUBLIC_FILE_MODE)?;
            tracing::warn!(path = %cert_path.display(), "CA certificate was missing; re-created it from the CA key");
            Ok((ca, CaOrigin::CertificateRecreated))
        }
        (true, false) => Err(CaError::Incomplete {
            present: cert_path.display().to_string(),
            missing: key_path.display().to_string(),
            hint: "restore the key, or remove the certificate to create a new CA (every client must then trust the new ca.crt)",
        }),
    }
}
