//! Secret and private files: the data directory, tokens, keys, snapshots.
//!
//! What it does:
//! - [`ensure_private_dir`] creates a directory with mode 0700, or, if it
//!   exists and group/other can reach it, narrows it to 0700 with a warning.
//!   A directory owned by another user is refused.
//! - [`write_file_atomic`] / [`write_private_file`] write a whole file through a
//!   temporary file in the same directory (created `O_EXCL` + `O_NOFOLLOW`
//!   with its final mode, so the contents are never readable with a wider
//!   mode) → `fsync` → `rename` over the target → `fsync` of the directory.
//!   `rename` replaces a symlink at the target instead of following it.
//! - [`create_private_file`] publishes a new file only if nothing (not even a
//!   dangling symlink) is at the path: temp file as above, then `link(2)`,
//!   which fails with `EEXIST` rather than follow or overwrite. A crash never
//!   leaves a half-written target.
//! - [`read_checked`] opens with `O_NOFOLLOW`, checks the *opened* file
//!   (`fstat`, no race with a rename) with [`check_metadata`]: a regular file
//!   owned by this user (or root), not group/other-writable, and for
//!   [`Access::Private`] not group/other-accessible at all; then reads it
//!   up to a size limit.
//!
//! Who uses it: the control plane for `DATA_DIR` (0700), `admin.token` and
//! `ca.key` (0600), `ca.crt` (0644, public). The module depends only on
//! `std`, `nix` (for `getuid`), `thiserror` and `tracing`, so it can move to a
//! crate shared with the sidecar (its snapshot file: written 0600 in a
//! directory only it can write, refused on load if another user owns it or
//! others can write it).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Mode of private files (secrets, keys, the store): owner read/write only.
pub const PRIVATE_FILE_MODE: u32 = 0o600;
/// Mode of private directories (the data directory).
pub const PRIVATE_DIR_MODE: u32 = 0o700;
/// Mode of public files (the CA bundle).
pub const PUBLIC_FILE_MODE: u32 = 0o644;

/// An error on a file or directory, always naming the path and what was being done.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} is not a directory", path.display())]
    NotADirectory { path: PathBuf },
    #[error("{} is not a regular file (a symlink, directory or device is refused)", path.display())]
    NotARegularFile { path: PathBuf },
    #[error("{} is owned by uid {owner}, expected uid {expected} (or root)", path.display())]
    WrongOwner {
        path: PathBuf,
        owner: u32,
        expected: u32,
    },
    #[error("{} has mode {mode:04o}: {problem}", path.display())]
    TooOpen {
        path: PathBuf,
        mode: u32,
        problem: &'static str,
    },
    #[error("{} already exists", path.display())]
    AlreadyExists { path: PathBuf },
    #[error("{} is larger than {limit} bytes", path.display())]
    TooLarge { path: PathBuf, limit: u64 },
}

impl FileError {
    fn io(op: &'static str, path: &Path, source: io::Error) -> Self {
        FileError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// How strictly [`check_metadata`] judges a file's mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Secrets: no permission bit at all for group or other (e.g. 0600, 0400).
    Private,
    /// Readable by others, writable only by the owner (e.g. 0644), like the
    /// sidecar's snapshot or a CA bundle: what matters is that nobody else can
    /// change it.
    NotWritableByOthers,
}

/// What [`ensure_private_dir`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirOutcome {
    Created,
    /// It existed with no group/other permission.
    AlreadyPrivate,
    /// It existed with group/other permissions (the old mode); now 0700.
    Narrowed {
        old_mode: u32,
    },
}

fn current_uid() -> u32 {
    nix::unistd::getuid().as_raw()
}

/// Creates `dir` (and missing parents) so that `dir` itself has mode 0700; if
/// it exists, makes sure it is a directory owned by this user and narrows a
/// group/other-accessible mode to 0700, logging a warning. A symlink to a
/// directory is accepted (the data dir may be a link to a volume); the
/// directory it points at is what is checked.
pub fn ensure_private_dir(dir: &Path) -> Result<DirOutcome, FileError> {
    match fs::symlink_metadata(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                fs::create_dir_all(parent)
                    .map_err(|e| FileError::io("create directory", parent, e))?;
            }
            match fs::DirBuilder::new().mode(PRIVATE_DIR_MODE).create(dir) {
                Ok(()) => {}
                // Lost a race with another creator: judge what is there now.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    return ensure_private_dir(dir)
                }
                Err(e) => return Err(FileError::io("create directory", dir, e)),
            }
            // The umask may have removed bits we asked for, never added any;
            // set the mode explicitly so it is exactly 0700.
            fs::set_permissions(dir, fs::Permissions::from_mode(PRIVATE_DIR_MODE))
                .map_err(|e| FileError::io("chmod", dir, e))?;
            Ok(DirOutcome::Created)
        }
        Err(e) => Err(FileError::io("stat", dir, e)),
        Ok(_) => {
            let meta = fs::metadata(dir).map_err(|e| FileError::io("stat", dir, e))?;
            if !meta.is_dir() {
                return Err(FileError::NotADirectory {
                    path: dir.to_path_buf(),
                });
            }
            check_owner(dir, &meta)?;
            let mode = meta.mode() & 0o7777;
            if mode & 0o077 == 0 {
                return Ok(DirOutcome::AlreadyPrivate);
            }
            fs::set_permissions(dir, fs::Permissions::from_mode(PRIVATE_DIR_MODE))
                .map_err(|e| FileError::io("chmod", dir, e))?;
            tracing::warn!(
                path = %dir.display(),
                old_mode = format!("{mode:04o}"),
                "directory was accessible to group/other; narrowed to 0700"
            );
            Ok(DirOutcome::Narrowed { old_mode: mode })
        }
    }
}

fn check_owner(path: &Path, meta: &fs::Metadata) -> Result<(), FileError> {
    let expected = current_uid();
    let owner = meta.uid();
    if owner != expected && owner != 0 {
        return Err(FileError::WrongOwner {
            path: path.to_path_buf(),
            owner,
            expected,
        });
    }
    Ok(())
}

/// Checks metadata (of an opened file, or from `symlink_metadata`): a
/// regular file, owned by this user or root, and with a mode that `access`
/// allows. Never follows anything itself.
pub fn check_metadata(path: &Path, meta: &fs::Metadata, access: Access) -> Result<(), FileError> {
    if !meta.file_type().is_file() {
        return Err(FileError::NotARegularFile {
            path: path.to_path_buf(),
        });
    }
    check_owner(path, meta)?;
    let mode = meta.mode() & 0o7777;
    let (mask, problem) = match access {
        Access::Private => (0o077, "group or other may access it (want 0600)"),
        Access::NotWritableByOthers => (0o022, "group or other may write it"),
    };
    if mode & mask != 0 {
        return Err(FileError::TooOpen {
            path: path.to_path_buf(),
            mode,
            problem,
        });
    }
    Ok(())
}

/// Checks the file at `path` without following a symlink there (a symlink is
/// refused as not a regular file). See [`check_metadata`].
pub fn check_file(path: &Path, access: Access) -> Result<fs::Metadata, FileError> {
    let meta = fs::symlink_metadata(path).map_err(|e| FileError::io("stat", path, e))?;
    check_metadata(path, &meta, access)?;
    Ok(meta)
}

/// Opens `path` without following a symlink, checks the opened file with
/// [`check_metadata`] and reads it whole, refusing more than `max_len` bytes.
pub fn read_checked(path: &Path, access: Access, max_len: u64) -> Result<Vec<u8>, FileError> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(nix::libc::ELOOP) {
                FileError::NotARegularFile {
                    path: path.to_path_buf(),
                }
            } else {
                FileError::io("open", path, e)
            }
        })?;
    let meta = file
        .metadata()
        .map_err(|e| FileError::io("stat", path, e))?;
    check_metadata(path, &meta, access)?;
    if meta.len() > max_len {
        return Err(FileError::TooLarge {
            path: path.to_path_buf(),
            limit: max_len,
        });
    }
    let mut buf = Vec::with_capacity(meta.len() as usize);
    file.take(max_len + 1)
        .read_to_end(&mut buf)
        .map_err(|e| FileError::io("read", path, e))?;
    if buf.len() as u64 > max_len {
        return Err(FileError::TooLarge {
            path: path.to_path_buf(),
            limit: max_len,
        });
    }
    Ok(buf)
}

/// Writes `contents` to `path` atomically with mode 0600 (see [`write_file_atomic`]).
pub fn write_private_file(path: &Path, contents: &[u8]) -> Result<(), FileError> {
    write_file_atomic(path, contents, PRIVATE_FILE_MODE)
}

/// Replaces `path` with `contents` atomically: readers see the old file or
/// the new one, never a part. The temporary file is created with `mode` from
/// the start (then set exactly, whatever the umask), synced, renamed over
/// `path` (a symlink at `path` is replaced, not followed) and the directory
/// synced.
pub fn write_file_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), FileError> {
    let tmp = write_temp(path, contents, mode)?;
    if let Err(e) = fs::rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(FileError::io("rename into place", path, e));
    }
    sync_parent(path)
}

/// Creates `path` with `contents` and mode 0600 only if nothing is there yet
/// ([`FileError::AlreadyExists`] otherwise, also for a dangling symlink). The
/// file appears whole or not at all (temp file, then `link(2)`).
pub fn create_private_file(path: &Path, contents: &[u8]) -> Result<(), FileError> {
    create_file_exclusive(path, contents, PRIVATE_FILE_MODE)
}

/// [`create_private_file`] with another mode.
pub fn create_file_exclusive(path: &Path, contents: &[u8], mode: u32) -> Result<(), FileError> {
    let tmp = write_temp(path, contents, mode)?;
    // link(2) never follows a symlink at the new path and fails if anything is there.
    let linked = fs::hard_link(&tmp, path);
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => sync_parent(path),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Err(FileError::AlreadyExists {
            path: path.to_path_buf(),
        }),
        Err(e) => Err(FileError::io("link into place", path, e)),
    }
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Writes a synced temporary file next to `path` and returns its path.
fn write_temp(path: &Path, contents: &[u8], mode: u32) -> Result<PathBuf, FileError> {
    let name = path
        .file_name()
        .ok_or_else(|| FileError::NotARegularFile {
            path: path.to_path_buf(),
        })?
        .to_string_lossy()
        .into_owned();
    let dir = path.parent().unwrap_or_else(|| Path::new(""));
    // O_EXCL: a name that exists (file or planted symlink) is never opened; try another.
    for _ in 0..16 {
        let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let tmp = dir.join(format!(".{name}.tmp.{}.{n}.{nanos:x}", std::process::id()));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
            .open(&tmp);
        let mut file = match file {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(FileError::io("create temporary file", &tmp, e)),
        };
        let result = fill(&mut file, contents, mode);
        if let Err(e) = result {
            let _ = fs::remove_file(&tmp);
            return Err(FileError::io("write temporary file", &tmp, e));
        }
        return Ok(tmp);
    }
    Err(FileError::io(
        "create temporary file",
        path,
        io::Error::new(io::ErrorKind::AlreadyExists, "no free temporary name"),
    ))
}

fn fill(file: &mut File, contents: &[u8], mode: u32) -> io::Result<()> {
    // The umask can only have removed bits; make the mode exact.
    file.set_permissions(fs::Permissions::from_mode(mode))?;
    file.write_all(contents)?;
    file.sync_all()
}

fn sync_parent(path: &Path) -> Result<(), FileError> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| FileError::io("sync directory", dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn mode_of(path: &Path) -> u32 {
        fs::symlink_metadata(path).unwrap().mode() & 0o7777
    }

    #[test]
    fn creates_private_dir_with_parents() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b/data");
        assert_eq!(ensure_private_dir(&dir).unwrap(), DirOutcome::Created);
        assert_eq!(mode_of(&dir), 0o700);
        assert_eq!(
            ensure_private_dir(&dir).unwrap(),
            DirOutcome::AlreadyPrivate
        );
    }

    #[test]
    fn narrows_an_open_dir() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(
            ensure_private_dir(&dir).unwrap(),
            DirOutcome::Narrowed { old_mode: 0o755 }
        );
        assert_eq!(mode_of(&dir), 0o700);
    }

    #[test]
    fn refuses_a_file_as_dir() {
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("f");
        fs::write(&f, b"x").unwrap();
        assert!(matches!(
            ensure_private_dir(&f),
            Err(FileError::NotADirectory { .. })
        ));
    }

    #[test]
    fn atomic_write_is_0600_and_replaces() {
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("secret");
        write_private_file(&f, b"one").unwrap();
        assert_eq!(fs::read(&f).unwrap(), b"one");
        assert_eq!(mode_of(&f), 0o600);
        write_private_file(&f, b"two").unwrap();
        assert_eq!(fs::read(&f).unwrap(), b"two");
        // No temporary file left behind.
        let names: Vec<_> = fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[test]
    fn atomic_write_narrows_an_existing_open_file() {
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("secret");
        fs::write(&f, b"old").unwrap();
        fs::set_permissions(&f, fs::Permissions::from_mode(0o666)).unwrap();
        write_private_file(&f, b"new").unwrap();
        assert_eq!(mode_of(&f), 0o600);
    }

    #[test]
    fn atomic_write_replaces_a_symlink_instead_of_following_it() {
        let tmp = tempfile::tempdir().unwrap();
        let victim = tmp.path().join("victim");
        fs::write(&victim, b"keep me").unwrap();
        let f = tmp.path().join("secret");
        symlink(&victim, &f).unwrap();
        write_private_file(&f, b"secret").unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"keep me");
        assert!(fs::symlink_metadata(&f).unwrap().file_type().is_file());
        assert_eq!(fs::read(&f).unwrap(), b"secret");
    }

    #[test]
    fn public_mode_is_exact() {
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("ca.crt");
        write_file_atomic(&f, b"pem", PUBLIC_FILE_MODE).unwrap();
        assert_eq!(mode_of(&f), 0o644);
    }

    #[test]
    fn exclusive_create_refuses_existing_file_and_symlink() {
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("admin.token");
        create_private_file(&f, b"tok\n").unwrap();
        assert_eq!(mode_of(&f), 0o600);
        assert!(matches!(
            create_private_file(&f, b"other\n"),
            Err(FileError::AlreadyExists { .. })
        ));
        assert_eq!(fs::read(&f).unwrap(), b"tok\n");

        // A dangling symlink planted at the path is not followed.
        let target = tmp.path().join("planted-target");
        let g = tmp.path().join("g.token");
        symlink(&target, &g).unwrap();
        assert!(matches!(
            create_private_file(&g, b"x\n"),
            Err(FileError::AlreadyExists { .. })
        ));
        assert!(!target.exists());
        let names: Vec<_> = fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "only the file and the symlink: {names:?}");
    }

    #[test]
    fn read_checked_accepts_private_and_refuses_open_modes() {
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("secret");
        write_private_file(&f, b"abc").unwrap();
        assert_eq!(read_checked(&f, Access::Private, 10).unwrap(), b"abc");

        fs::set_permissions(&f, fs::Permissions::from_mode(0o640)).unwrap();
        assert!(matches!(
            read_checked(&f, Access::Private, 10),
            Err(FileError::TooOpen { mode: 0o640, .. })
        ));
        // Readable by group is fine when only writes matter.
        assert_eq!(
            read_checked(&f, Access::NotWritableByOthers, 10).unwrap(),
            b"abc"
        );

        fs::set_permissions(&f, fs::Permissions::from_mode(0o666)).unwrap();
        assert!(matches!(
            read_checked(&f, Access::NotWritableByOthers, 10),
            Err(FileError::TooOpen { .. })
        ));
        assert!(matches!(
            check_file(&f, Access::NotWritableByOthers),
            Err(FileError::TooOpen { .. })
        ));
    }

    #[test]
    fn read_checked_refuses_symlink_and_large_files() {
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("secret");
        write_private_file(&f, b"0123456789").unwrap();
        assert!(matches!(
            read_checked(&f, Access::Private, 4),
            Err(FileError::TooLarge { limit: 4, .. })
        ));
        let link = tmp.path().join("link");
        symlink(&f, &link).unwrap();
        assert!(matches!(
            read_checked(&link, Access::Private, 100),
            Err(FileError::NotARegularFile { .. })
        ));
        assert!(matches!(
            check_file(&link, Access::Private),
            Err(FileError::NotARegularFile { .. })
        ));
    }

    #[test]
    fn refuses_a_file_owned_by_someone_else() {
        // Only root can hand a file to another user; skip elsewhere.
        if current_uid() != 0 {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("snapshot");
        write_private_file(&f, b"x").unwrap();
        std::os::unix::fs::chown(&f, Some(54321), None).unwrap();
        assert!(matches!(
            read_checked(&f, Access::NotWritableByOthers, 10),
            Err(FileError::WrongOwner { owner: 54321, .. })
        ));
        let d = tmp.path().join("dir");
        fs::create_dir(&d).unwrap();
        std::os::unix::fs::chown(&d, Some(54321), None).unwrap();
        assert!(matches!(
            ensure_private_dir(&d),
            Err(FileError::WrongOwner { .. })
        ));
    }

    #[test]
    fn missing_file_is_an_io_error_naming_the_path() {
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("nope");
        let err = read_checked(&f, Access::Private, 10).unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
        assert!(
            matches!(err, FileError::Io { ref source, .. } if source.kind() == io::ErrorKind::NotFound)
        );
    }
}
