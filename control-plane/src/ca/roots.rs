//! The mesh's workload roots and their rotation (issue 14), kept in the
//! data directory.
//!
//! [`Roots`] is the list of roots in **trust-bundle order: the first one
//! signs** new workload certificates, every one is trusted by the sidecars.
//! Outside a rotation there is one root. A rotation goes through three
//! phases, each a new immutable [`Roots`] written to disk *before* it is
//! used:
//!
//! 1. [`Roots::begin_rotation`] — a new root is created and appended:
//!    `[old (signing), new]`. Sidecars learn to trust the new root before
//!    any leaf signed by it exists.
//! 2. [`Roots::switch`] (after the grace, `--ca-rotation-grace`) —
//!    `[new (signing), old]`: sidecars see that the first root is not their
//!    leaf's issuer and renew.
//! 3. [`Roots::retire`] (when the old root has no live leaf) — `[new]`.
//!
//! Files (redb; all in `DATA_DIR`, mode 0700):
//!
//! - `ca.crt` / `ca.key` — the root created on first start. It also issues
//!   the API server's certificate at every start, so `ca.crt` stays what
//!   meshctl and sidecars use as `--ca-file` for the **API**, even after a
//!   rotation retired it from the **mesh** trust bundle (its key stays:
//!   it signs the API certificate). Rotating the API's CA is a separate,
//!   manual operation (replace both files, redistribute `ca.crt`).
//! - `ca-roots/root-<fingerprint prefix>.crt` (0644) and `.key` (0600,
//!   created exclusively): roots made by rotations. Retired ones are
//!   removed at phase 3.
//! - `ca-roots/roots.json` (0600): the bundle order (file names) and the
//!   phase with its start time. Absent: the bundle is `[ca.crt]`, no
//!   rotation. A restart resumes a rotation where it was.
//!
//! With `--store etcd` none of `ca-roots/` is used: the phases are the
//! pure [`Roots::adding`], [`Roots::switched`], [`Roots::retired`], and
//! the roots travel as [`SharedRoots`] (every root's certificate and key
//! PEM, the phase) in etcd (`rotation.rs`); [`Roots::from_shared`] turns
//! them back, keeping the `ca.crt`/`ca.key` names for the bootstrap root.

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::authority::MeshCa;
use super::error::CaError;
use super::store::{CA_CERT_FILE, CA_KEY_FILE};
use crate::files::{self, Access, FileError};

/// The directory of rotated roots and the bundle's state, in `DATA_DIR`.
pub const ROOTS_DIR: &str = "ca-roots";
/// The bundle's state file, in [`ROOTS_DIR`].
pub const ROOTS_STATE_FILE: &str = "roots.json";
const MAX_FILE_LEN: u64 = 64 * 1024;

/// Where a rotation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "camelCase")]
pub enum Phase {
    /// One root, no rotation.
    Stable,
    /// Phase 1: `[old (signing), new]` since `since_ms`.
    #[serde(rename_all = "camelCase")]
    Adding { since_ms: u64 },
    /// Phase 2: `[new (signing), old]` since `since_ms`.
    #[serde(rename_all = "camelCase")]
    Retiring { since_ms: u64 },
}

/// A root's certificate and key files, relative to the data directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RootFiles {
    cert: String,
    key: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    roots: Vec<RootFiles>,
    phase: Phase,
}

/// The roots in bundle order (first signs), their files and the phase.
#[derive(Debug, Clone)]
pub struct Roots {
    roots: Vec<Arc<MeshCa>>,
    files: Vec<RootFiles>,
    phase: Phase,
}

/// A path in the state file: relative, inside the data directory.
fn relative(data_dir: &Path, name: &str) -> Result<PathBuf, CaError> {
    let path = Path::new(name);
    if path.is_absolute()
        || path
            .components()
            .any(|c| !matches!(c, Component::Normal(_)))
        || name.is_empty()
    {
        return Err(CaError::NotACa {
            reason: format!(
                "{ROOTS_DIR}/{ROOTS_STATE_FILE} names {name:?}, not a file in the data directory"
            ),
        });
    }
    Ok(data_dir.join(path))
}

fn read_text(path: &Path, access: Access) -> Result<String, CaError> {
    let bytes = files::read_checked(path, access, MAX_FILE_LEN)?;
    String::from_utf8(bytes).map_err(|_| CaError::Pem {
        what: "a CA root file",
    })
}

impl Roots {
    /// One root and no rotation (tests; a fresh data directory).
    pub fn single(ca: impl Into<Arc<MeshCa>>) -> Roots {
        Roots {
            roots: vec![ca.into()],
            files: vec![RootFiles {
                cert: CA_CERT_FILE.into(),
                key: CA_KEY_FILE.into(),
            }],
            phase: Phase::Stable,
        }
    }

    /// The roots of `data_dir`: `ca-roots/roots.json` if it exists (the
    /// `ca.crt`/`ca.key` root, already loaded, is `original`), else
    /// `[original]`.
    pub fn load(data_dir: &Path, original: MeshCa) -> Result<Roots, CaError> {
        let state_path = data_dir.join(ROOTS_DIR).join(ROOTS_STATE_FILE);
        if std::fs::symlink_metadata(&state_path).is_err() {
            return Ok(Roots::single(original));
        }
        let state: StateFile = serde_json::from_str(&read_text(&state_path, Access::Private)?)
            .map_err(|e| CaError::NotACa {
                reason: format!("{}: {e}", state_path.display()),
            })?;
        if state.roots.is_empty() || state.roots.len() > 2 {
            return Err(CaError::NotACa {
                reason: format!(
                    "{} lists {} roots (1 or 2 expected)",
                    state_path.display(),
                    state.roots.len()
                ),
            });
        }
        let mut original = Some(original);
        let mut roots = Vec::with_capacity(state.roots.len());
        for f in &state.roots {
            let ca = if f.cert == CA_CERT_FILE && f.key == CA_KEY_FILE {
                original.take().ok_or_else(|| CaError::NotACa {
                    reason: format!("{} lists ca.crt twice", state_path.display()),
                })?
            } else {
                let cert = read_text(&relative(data_dir, &f.cert)?, Access::NotWritableByOthers)?;
                let key = read_text(&relative(data_dir, &f.key)?, Access::Private)?;
                MeshCa::load(&cert, &key)?
            };
            roots.push(Arc::new(ca));
        }
        Ok(Roots {
            roots,
            files: state.roots,
            phase: state.phase,
        })
    }

    /// The root that signs new leaves (the bundle's first).
    pub fn signing(&self) -> &Arc<MeshCa> {
        &self.roots[0]
    }

    /// Every root, bundle order.
    pub fn all(&self) -> &[Arc<MeshCa>] {
        &self.roots
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The trust bundle: every root's PEM, the signing one first.
    pub fn bundle_pem(&self) -> String {
        let mut pem = String::new();
        for ca in &self.roots {
            pem.push_str(ca.cert_pem());
            if !pem.ends_with('\n') {
                pem.push('\n');
            }
        }
        pem
    }

    fn save(&self, data_dir: &Path) -> Result<(), CaError> {
        let dir = data_dir.join(ROOTS_DIR);
        files::ensure_private_dir(&dir)?;
        let state = StateFile {
            roots: self.files.clone(),
            phase: self.phase,
        };
        let text = serde_json::to_string_pretty(&state).map_err(|e| CaError::NotACa {
            reason: format!("cannot encode the roots' state: {e}"),
        })?;
        files::write_private_file(&dir.join(ROOTS_STATE_FILE), text.as_bytes())?;
        Ok(())
    }

    /// The file names a rotated root gets in the data directory.
    fn files_of(ca: &MeshCa) -> RootFiles {
        let stem = format!("{ROOTS_DIR}/root-{}", &ca.fingerprint()[..16]);
        RootFiles {
            cert: format!("{stem}.crt"),
            key: format!("{stem}.key"),
        }
    }

    /// Phase 1 in memory: `ca` appended after the signing root.
    pub fn adding(&self, ca: MeshCa, now_ms: u64) -> Roots {
        let entry = Roots::files_of(&ca);
        Roots {
            roots: vec![self.roots[0].clone(), Arc::new(ca)],
            files: vec![self.files[0].clone(), entry],
            phase: Phase::Adding { since_ms: now_ms },
        }
    }

    /// Phase 2 in memory: the new root first (it signs), the old one
    /// still trusted.
    pub fn switched(&self, now_ms: u64) -> Roots {
        let mut next = self.clone();
        next.roots.reverse();
        next.files.reverse();
        next.phase = Phase::Retiring { since_ms: now_ms };
        next
    }

    /// Phase 3 in memory: only the signing root.
    pub fn retired(&self) -> Roots {
        Roots {
            roots: vec![self.roots[0].clone()],
            files: vec![self.files[0].clone()],
            phase: Phase::Stable,
        }
    }

    /// Phase 1: a new root for `trust_domain`, written to `ca-roots/`
    /// (key 0600, exclusively), appended after the signing root. Only from
    /// [`Phase::Stable`] (the caller answers 409 otherwise).
    pub fn begin_rotation(
        &self,
        data_dir: &Path,
        trust_domain: &str,
        now_ms: u64,
    ) -> Result<Roots, CaError> {
        debug_assert_eq!(self.phase, Phase::Stable);
        let ca = MeshCa::create(trust_domain)?;
        let dir = data_dir.join(ROOTS_DIR);
        files::ensure_private_dir(&dir)?;
        let entry = Roots::files_of(&ca);
        files::create_private_file(&data_dir.join(&entry.key), ca.key_pem().as_bytes())?;
        files::write_file_atomic(
            &data_dir.join(&entry.cert),
            ca.cert_pem().as_bytes(),
            files::PUBLIC_FILE_MODE,
        )?;
        let next = self.adding(ca, now_ms);
        next.save(data_dir)?;
        Ok(next)
    }

    /// Phase 2 ([`Roots::switched`]), saved.
    pub fn switch(&self, data_dir: &Path, now_ms: u64) -> Result<Roots, CaError> {
        let next = self.switched(now_ms);
        next.save(data_dir)?;
        Ok(next)
    }

    /// Phase 3 ([`Roots::retired`]), saved. The retired root's files are
    /// removed unless they are `ca.crt`/`ca.key` (the API's CA).
    pub fn retire(&self, data_dir: &Path) -> Result<Roots, CaError> {
        let next = self.retired();
        next.save(data_dir)?;
        for f in self.files.iter().skip(1) {
            if f.cert == CA_CERT_FILE {
                continue;
            }
            for name in [&f.key, &f.cert] {
                if let Ok(path) = relative(data_dir, name) {
                    if let Err(e) = std::fs::remove_file(&path) {
                        let e = FileError::Io {
                            op: "remove a retired root",
                            path: path.clone(),
                            source: e,
                        };
                        tracing::warn!(error = %e, "retired root file left behind");
                    }
                }
            }
        }
        Ok(next)
    }

    /// The roots as `--store etcd` keeps them (`P/ca/state`): every root's
    /// certificate and key PEM, bundle order, and the phase.
    pub fn to_shared(&self) -> SharedRoots {
        SharedRoots {
            roots: self
                .roots
                .iter()
                .map(|ca| SharedRoot {
                    cert: ca.cert_pem().to_owned(),
                    key: ca.key_pem(),
                })
                .collect(),
            phase: self.phase,
        }
    }

    /// The roots of `shared` (from etcd). A root that is `original` (the
    /// `ca.crt`/`ca.key` root, same fingerprint) keeps those file names;
    /// nothing is written: with etcd the data directory holds no
    /// `ca-roots/` (a replica reloads the state from etcd at start).
    pub fn from_shared(shared: &SharedRoots, original: &Arc<MeshCa>) -> Result<Roots, CaError> {
        if shared.roots.is_empty() || shared.roots.len() > 2 {
            return Err(CaError::NotACa {
                reason: format!(
                    "the shared CA state lists {} roots (1 or 2 expected)",
                    shared.roots.len()
                ),
            });
        }
        let mut roots = Vec::with_capacity(shared.roots.len());
        let mut files = Vec::with_capacity(shared.roots.len());
        for root in &shared.roots {
            let ca = MeshCa::load(&root.cert, &root.key)?;
            if ca.fingerprint() == original.fingerprint() {
                files.push(RootFiles {
                    cert: CA_CERT_FILE.into(),
                    key: CA_KEY_FILE.into(),
                });
                roots.push(original.clone());
            } else {
                files.push(Roots::files_of(&ca));
                roots.push(Arc::new(ca));
            }
        }
        Ok(Roots {
            roots,
            files,
            phase: shared.phase,
        })
    }
}

/// One root in [`SharedRoots`] (PEM).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SharedRoot {
    pub cert: String,
    pub key: String,
}

/// The mesh-wide rotation state (`--store etcd`, `P/ca/state`, JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SharedRoots {
    pub roots: Vec<SharedRoot>,
    pub phase: Phase,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fingerprints(roots: &Roots) -> Vec<String> {
        roots
            .all()
            .iter()
            .map(|c| c.fingerprint().to_owned())
            .collect()
    }

    fn original(dir: &Path) -> MeshCa {
        files::ensure_private_dir(dir).unwrap();
        crate::ca::load_or_create(dir, "meshlet.local").unwrap().0
    }

    #[test]
    fn each_phase_is_written_before_use_and_reloaded_as_it_was() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        let start = Roots::load(&dir, original(&dir)).unwrap();
        assert_eq!(start.phase(), Phase::Stable);
        let old = fingerprints(&start);
        assert_eq!(old.len(), 1);

        let adding = start.begin_rotation(&dir, "meshlet.local", 1_000).unwrap();
        assert_eq!(adding.phase(), Phase::Adding { since_ms: 1_000 });
        assert_eq!(fingerprints(&adding)[0], old[0], "the old root still signs");
        let new = fingerprints(&adding)[1].clone();
        let reloaded = Roots::load(&dir, original(&dir)).unwrap();
        assert_eq!(fingerprints(&reloaded), fingerprints(&adding));
        assert_eq!(reloaded.phase(), adding.phase());
        assert_eq!(reloaded.bundle_pem(), adding.bundle_pem());
        let key = dir.join(format!("{ROOTS_DIR}/root-{}.key", &new[..16]));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );

        let retiring = reloaded.switch(&dir, 2_000).unwrap();
        assert_eq!(fingerprints(&retiring), [new.clone(), old[0].clone()]);
        let reloaded = Roots::load(&dir, original(&dir)).unwrap();
        assert_eq!(reloaded.phase(), Phase::Retiring { since_ms: 2_000 });
        assert_eq!(reloaded.signing().fingerprint(), new);

        // ca.crt/ca.key stay: they are the API's CA.
        let done = reloaded.retire(&dir).unwrap();
        assert_eq!(fingerprints(&done), vec![new.clone()]);
        assert!(dir.join(CA_CERT_FILE).exists() && dir.join(CA_KEY_FILE).exists());
        let reloaded = Roots::load(&dir, original(&dir)).unwrap();
        assert_eq!(fingerprints(&reloaded), vec![new.clone()]);
        assert_eq!(reloaded.phase(), Phase::Stable);

        // A second rotation retires a root of ca-roots/: its files go.
        let next = reloaded
            .begin_rotation(&dir, "meshlet.local", 3_000)
            .unwrap()
            .switch(&dir, 4_000)
            .unwrap()
            .retire(&dir)
            .unwrap();
        assert_eq!(next.all().len(), 1);
        assert_ne!(next.signing().fingerprint(), new);
        assert!(!key.exists(), "the retired root's key is removed");
    }

    #[test]
    fn the_shared_form_round_trips_each_phase_without_touching_the_data_dir() {
        let original = Arc::new(MeshCa::create("meshlet.local").unwrap());
        let start = Roots::single(original.clone());
        let adding = start.adding(MeshCa::create("meshlet.local").unwrap(), 1_000);
        let retiring = adding.switched(2_000);
        let done = retiring.retired();
        for roots in [&start, &adding, &retiring, &done] {
            let json = serde_json::to_vec(&roots.to_shared()).unwrap();
            let shared: SharedRoots = serde_json::from_slice(&json).unwrap();
            let back = Roots::from_shared(&shared, &original).unwrap();
            assert_eq!(fingerprints(&back), fingerprints(roots));
            assert_eq!(back.phase(), roots.phase());
            assert_eq!(back.bundle_pem(), roots.bundle_pem());
            // The bootstrap root keeps its file names (the API's CA).
            for (f, ca) in back.files.iter().zip(back.all()) {
                let is_original = ca.fingerprint() == original.fingerprint();
                assert_eq!(f.cert == CA_CERT_FILE, is_original, "{f:?}");
            }
        }
        assert_eq!(fingerprints(&retiring)[1], original.fingerprint());
        assert_ne!(fingerprints(&done)[0], original.fingerprint());
        let empty = SharedRoots {
            roots: Vec::new(),
            phase: Phase::Stable,
        };
        assert!(Roots::from_shared(&empty, &original).is_err());
    }

    #[test]
    fn a_state_file_naming_files_outside_the_data_dir_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        let ca = original(&dir);
        files::ensure_private_dir(&dir.join(ROOTS_DIR)).unwrap();
        let text = r#"{"roots":[{"cert":"../x.crt","key":"ca.key"}],"phase":{"phase":"stable"}}"#;
        files::write_private_file(&dir.join(ROOTS_DIR).join(ROOTS_STATE_FILE), text.as_bytes())
            .unwrap();
        let err = Roots::load(&dir, ca).unwrap_err().to_string();
        assert!(err.contains("not a file in the data directory"), "{err}");
    }
}
