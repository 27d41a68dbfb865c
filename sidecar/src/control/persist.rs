//! The snapshot file: the last state the control plane pushed, kept so
//! that a sidecar restarted while the control plane is down still routes.
//!
//! The file decides where traffic goes, so only this user may have
//! written it:
//!
//! - the default location is a directory only this user can write:
//!   `$XDG_RUNTIME_DIR/meshlet/`, else `$TMPDIR/meshlet-UID/`, created
//!   0700; an existing one owned by another user, writable by group or
//!   others, or a symlink is refused (start-up error);
//! - a snapshot (at any path) not owned by this user, writable by group
//!   or others, a symlink or not a regular file is not read (a warning,
//!   and the sidecar starts empty);
//! - it is written 0600 to a temporary file in the same directory
//!   (created exclusively), synced, then renamed over the target.
//!
//! The file is kept on a clean shutdown; it cannot outlive a newer state
//! of the control plane because the watch resumes from it only within the
//! control plane's epoch (see `client`).

use std::fs::Metadata;
use std::io::Read;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use meshlet_api::mesh::MeshState;

/// Errors of the snapshot file and its directory.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a valid snapshot: {source}")]
    Decode {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("refusing {path}: {why}")]
    Unsafe { path: PathBuf, why: String },
}

fn unsafe_path(path: &Path, why: impl Into<String>) -> PersistError {
    PersistError::Unsafe {
        path: path.to_owned(),
        why: why.into(),
    }
}

/// The user this process runs as.
fn my_uid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// The directory of the default snapshot file for these environment
/// values: `XDG_RUNTIME_DIR/meshlet` when that is set (absolute), else
/// `TMPDIR/meshlet-UID`.
pub fn default_dir(xdg_runtime_dir: Option<&Path>, temp_dir: &Path, uid: u32) -> PathBuf {
    match xdg_runtime_dir.filter(|dir| dir.is_absolute()) {
        Some(dir) => dir.join("meshlet"),
        None => temp_dir.join(format!("meshlet-{uid}")),
    }
}

/// The default snapshot file of `instance_id`, in [`default_dir`] (created
/// 0700 if missing, checked by [`ensure_private_dir`]).
pub fn default_snapshot_file(instance_id: &str) -> Result<PathBuf, PersistError> {
    let xdg = std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from);
    let dir = default_dir(xdg.as_deref(), &std::env::temp_dir(), my_uid());
    ensure_private_dir(&dir)?;
    Ok(dir.join(format!("{instance_id}.snapshot.json")))
}

/// Creates `dir` 0700 if it is missing; refuses one that is a symlink, not
/// a directory, owned by another user, or writable by group or others.
pub fn ensure_private_dir(dir: &Path) -> Result<(), PersistError> {
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(source) => {
            return Err(PersistError::Write {
                path: dir.to_owned(),
                source,
            })
        }
    }
    let meta = std::fs::symlink_metadata(dir).map_err(|source| PersistError::Read {
        path: dir.to_owned(),
        source,
    })?;
    if meta.file_type().is_symlink() {
        return Err(unsafe_path(dir, "the snapshot directory is a symlink"));
    }
    if !meta.is_dir() {
        return Err(unsafe_path(dir, "not a directory"));
    }
    owned_and_private(dir, &meta, "directory")
}

/// Owned by this user and not writable by group or others.
fn owned_and_private(path: &Path, meta: &Metadata, what: &str) -> Result<(), PersistError> {
    let uid = my_uid();
    if meta.uid() != uid {
        return Err(unsafe_path(
            path,
            format!(
                "the {what} belongs to uid {}, not to this user (uid {uid})",
                meta.uid()
            ),
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(unsafe_path(
            path,
            format!(
                "the {what} is writable by group or others (mode {:o})",
                meta.mode() & 0o7777
            ),
        ));
    }
    Ok(())
}

/// Reads a snapshot file written by an earlier run (`None`: there is
/// none). A file that is a symlink, not a regular file, owned by another
/// user or writable by group or others is refused.
pub fn load_persisted(path: &Path) -> Result<Option<MeshState>, PersistError> {
    let read_error = |source| PersistError::Read {
        path: path.to_owned(),
        source,
    };
    let before = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(read_error(source)),
    };
    if before.file_type().is_symlink() {
        return Err(unsafe_path(path, "the snapshot file is a symlink"));
    }
    if !before.is_file() {
        return Err(unsafe_path(path, "not a regular file"));
    }
    owned_and_private(path, &before, "snapshot file")?;
    let mut file = std::fs::File::open(path).map_err(read_error)?;
    // The file opened must be the one checked (not swapped in between).
    let opened = file.metadata().map_err(read_error)?;
    if (opened.dev(), opened.ino()) != (before.dev(), before.ino()) {
        return Err(unsafe_path(path, "the file changed while it was opened"));
    }
    let mut text = Vec::new();
    file.read_to_end(&mut text).map_err(read_error)?;
    serde_json::from_slice(&text)
        .map(Some)
        .map_err(|source| PersistError::Decode {
            path: path.to_owned(),
            source,
        })
}

/// Writes `state` to `path` atomically, 0600.
pub fn persist(path: &Path, state: &MeshState) -> Result<(), PersistError> {
    use std::io::Write;
    let failed = |source| PersistError::Write {
        path: path.to_owned(),
        source,
    };
    // A temporary file next to the target, created exclusively (never
    // following a planted symlink) and 0600, synced, then renamed over the
    // target: a crash leaves the old file or the new one, never half of one.
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(
        ".{name}.{}.{}.tmp",
        std::process::id(),
        fastrand::u32(..)
    ));
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(&serde_json::to_vec(state)?)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        failed(e)
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn chmod(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    fn refused(result: Result<Option<MeshState>, PersistError>) -> String {
        match result {
            Err(PersistError::Unsafe { why, .. }) => why,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn the_default_dir_is_the_runtime_dir_else_a_per_user_temp_dir() {
        let tmp = Path::new("/tmp");
        assert_eq!(
            default_dir(Some(Path::new("/run/user/1000")), tmp, 1000),
            Path::new("/run/user/1000/meshlet")
        );
        assert_eq!(default_dir(None, tmp, 1000), Path::new("/tmp/meshlet-1000"));
        assert_eq!(
            default_dir(Some(Path::new("relative")), tmp, 7),
            Path::new("/tmp/meshlet-7"),
            "a relative XDG_RUNTIME_DIR is ignored"
        );
    }

    #[test]
    fn a_private_dir_is_created_0700_and_unsafe_ones_are_refused() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("meshlet-1");
        ensure_private_dir(&dir).unwrap();
        let mode = std::fs::metadata(&dir).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o700);
        ensure_private_dir(&dir).unwrap();

        chmod(&dir, 0o770);
        let err = ensure_private_dir(&dir).unwrap_err().to_string();
        assert!(err.contains("writable by group or others"), "{err}");
        chmod(&dir, 0o707);
        assert!(ensure_private_dir(&dir).is_err());
        chmod(&dir, 0o755);
        ensure_private_dir(&dir).unwrap();

        let link = root.path().join("link");
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        let err = ensure_private_dir(&link).unwrap_err().to_string();
        assert!(err.contains("symlink"), "{err}");

        let file = root.path().join("file");
        std::fs::write(&file, "").unwrap();
        assert!(ensure_private_dir(&file).is_err());
    }

    #[test]
    fn a_dir_of_another_user_is_refused() {
        // `/` belongs to root: another user unless the tests run as root.
        if my_uid() == 0 {
            return;
        }
        let err = ensure_private_dir(Path::new("/")).unwrap_err().to_string();
        assert!(err.contains("belongs to uid 0"), "{err}");
        let err = refused(load_persisted(Path::new("/etc/hostname")));
        assert!(err.contains("belongs to uid 0"), "{err}");
    }

    #[test]
    fn snapshots_are_written_0600_and_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snap.json");
        assert_eq!(load_persisted(&path).unwrap(), None);
        let state = MeshState {
            epoch: 3,
            revision: 9,
            ..Default::default()
        };
        persist(&path, &state).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        assert_eq!(load_persisted(&path).unwrap(), Some(state.clone()));
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        // Rewriting replaces it.
        let newer = MeshState {
            revision: 10,
            ..state
        };
        persist(&path, &newer).unwrap();
        assert_eq!(load_persisted(&path).unwrap(), Some(newer));
        std::fs::write(&path, "{not json").unwrap();
        assert!(matches!(
            load_persisted(&path),
            Err(PersistError::Decode { .. })
        ));
    }

    #[test]
    fn unsafe_snapshot_files_are_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snap.json");
        persist(&path, &MeshState::default()).unwrap();

        chmod(&path, 0o620);
        assert!(refused(load_persisted(&path)).contains("writable by group or others"));
        chmod(&path, 0o602);
        assert!(refused(load_persisted(&path)).contains("writable by group or others"));
        // Readable by others is no danger to routing.
        chmod(&path, 0o644);
        assert!(load_persisted(&path).unwrap().is_some());

        let link = dir.path().join("link.json");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        assert!(refused(load_persisted(&link)).contains("symlink"));

        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        assert!(refused(load_persisted(&sub)).contains("regular file"));
    }
}
