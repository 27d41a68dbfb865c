//! The bootstrap admin token file, `DATA_DIR/admin.token`.
//!
//! On first start, [`ensure_admin_token`] generates a token named `admin`
//! (role admin, no expiry), publishes its plaintext alone plus a newline in
//! `DATA_DIR/admin.token` (mode 0600, created exclusively: never over an
//! existing file or through a symlink, see
//! [`files::create_private_file`]) and
//! only then registers its hash in [`Tokens`]; the caller persists the
//! registry. Later starts read the file (no symlink, owned by this user,
//! mode without group/other bits) and keep it if it authenticates as an
//! admin.
//!
//! Recovery and rotation:
//! - the file exists but the store has no token at all named `admin`
//!   (e.g. a new store): the file's token is adopted as `admin`;
//! - the file is missing but the store has `admin`: a new admin token
//!   replaces it (so deleting the file and restarting rotates the admin
//!   token; only someone who can write the 0700 data dir can do that);
//! - the file's token is unknown while another `admin` token exists, or it
//!   is not an admin, or the file is group/other-accessible: start-up fails
//!   with an error saying what to do.
//!
//! The data directory must already exist (see
//! [`files::ensure_private_dir`]).

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::tokens::{
    new_record, unix_secs, AuthError, Role, TokenError, TokenHash, TokenRecord, Tokens,
};
use crate::files::{self, Access, FileError};

/// File name of the admin token in the data directory.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";
/// Name of the bootstrap admin token (the audit actor of its requests).
pub const ADMIN_TOKEN_NAME: &str = "admin";
/// Largest admin token file read.
const MAX_FILE_LEN: u64 = 4096;

/// What [`ensure_admin_token`] did; anything but `Kept` changed `tokens`,
/// which the caller must persist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminTokenOutcome {
    /// First start: a new token, file written.
    Created,
    /// The file's token is a valid admin token.
    Kept,
    /// The file's token was unknown and no `admin` token existed: registered.
    Adopted,
    /// The file was missing: a new `admin` token replaced the old one.
    Replaced,
}

/// Why the admin token could not be set up; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum AdminTokenError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error("{} does not hold a token (expected the token alone on one line)", path.display())]
    Malformed { path: PathBuf },
    #[error("{} holds token {name:?}, which is not an admin token", path.display())]
    NotAdmin { path: PathBuf, name: String },
    #[error("{} holds token {name:?}, which has expired; delete the file and restart to issue a new admin token", path.display())]
    Expired { path: PathBuf, name: String },
    #[error("{} holds an unknown token while another admin token exists; delete the file and restart to issue a new admin token", path.display())]
    Stale { path: PathBuf },
}

/// Path of the admin token file in `data_dir`.
pub fn admin_token_path(data_dir: &Path) -> PathBuf {
    data_dir.join(ADMIN_TOKEN_FILE)
}

/// Makes sure `DATA_DIR/admin.token` holds a working admin token; see the module docs.
pub fn ensure_admin_token(
    data_dir: &Path,
    tokens: &mut Tokens,
) -> Result<AdminTokenOutcome, AdminTokenError> {
    let path = admin_token_path(data_dir);
    let now = SystemTime::now();
    match files::read_checked(&path, Access::Private, MAX_FILE_LEN) {
        Ok(bytes) => {
            let token = std::str::from_utf8(&bytes)
                .ok()
                .map(str::trim)
                .filter(|t| !t.is_empty() && !t.contains(char::is_whitespace))
                .ok_or_else(|| AdminTokenError::Malformed { path: path.clone() })?;
            match tokens.authenticate_at(token, now) {
                Ok(p) if p.role == Role::Admin => Ok(AdminTokenOutcome::Kept),
                Ok(p) => Err(AdminTokenError::NotAdmin { path, name: p.name }),
                Err(AuthError::Expired { name }) => Err(AdminTokenError::Expired { path, name }),
                Err(_) if tokens.get(ADMIN_TOKEN_NAME).is_none() => {
                    tokens.insert_record(TokenRecord {
                        name: ADMIN_TOKEN_NAME.to_owned(),
                        role: Role::Admin,
                        created_at: unix_secs(now),
                        expires_at: None,
                        hash: TokenHash::of(token),
                    })?;
                    Ok(AdminTokenOutcome::Adopted)
                }
                Err(_) => Err(AdminTokenError::Stale { path }),
            }
        }
        Err(FileError::Io { ref source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            let (secret, record) = new_record(ADMIN_TOKEN_NAME, Role::Admin, None, now)?;
            let mut contents = secret.into_string();
            contents.push('\n');
            files::create_private_file(&path, contents.as_bytes())?;
            let outcome = if tokens.revoke(ADMIN_TOKEN_NAME).is_ok() {
                AdminTokenOutcome::Replaced
            } else {
                AdminTokenOutcome::Created
            };
            tokens.insert_record(record)?;
            Ok(outcome)
        }
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    fn read_token(dir: &Path) -> String {
        fs::read_to_string(admin_token_path(dir)).unwrap()
    }

    #[test]
    fn first_start_creates_then_keeps() {
        let dir = tempfile::tempdir().unwrap();
        let mut tokens = Tokens::new();
        assert_eq!(
            ensure_admin_token(dir.path(), &mut tokens).unwrap(),
            AdminTokenOutcome::Created
        );
        let text = read_token(dir.path());
        assert!(text.starts_with("mlt_") && text.ends_with('\n') && text.lines().count() == 1);
        let meta = fs::symlink_metadata(admin_token_path(dir.path())).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
        let p = tokens.authenticate(text.trim()).unwrap();
        assert_eq!((p.name.as_str(), p.role), ("admin", Role::Admin));

        assert_eq!(
            ensure_admin_token(dir.path(), &mut tokens).unwrap(),
            AdminTokenOutcome::Kept
        );
        assert_eq!(read_token(dir.path()), text);
    }

    #[test]
    fn adopts_a_file_when_the_store_is_new() {
        let dir = tempfile::tempdir().unwrap();
        ensure_admin_token(dir.path(), &mut Tokens::new()).unwrap();
        let text = read_token(dir.path());
        let mut fresh = Tokens::new();
        assert_eq!(
            ensure_admin_token(dir.path(), &mut fresh).unwrap(),
            AdminTokenOutcome::Adopted
        );
        assert_eq!(fresh.authenticate(text.trim()).unwrap().role, Role::Admin);
    }

    #[test]
    fn deleting_the_file_rotates_the_token() {
        let dir = tempfile::tempdir().unwrap();
        let mut tokens = Tokens::new();
        ensure_admin_token(dir.path(), &mut tokens).unwrap();
        let old = read_token(dir.path());
        fs::remove_file(admin_token_path(dir.path())).unwrap();
        assert_eq!(
            ensure_admin_token(dir.path(), &mut tokens).unwrap(),
            AdminTokenOutcome::Replaced
        );
        let new = read_token(dir.path());
        assert_ne!(old, new);
        assert!(tokens.authenticate(old.trim()).is_err());
        assert!(tokens.authenticate(new.trim()).is_ok());
        assert_eq!(tokens.len(), 1);
    }

    #[test]
    fn stale_not_admin_and_malformed_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut other = Tokens::new();
        ensure_admin_token(dir.path(), &mut other).unwrap();
        // Another store with its own admin token: the file is stale.
        let elsewhere = tempfile::tempdir().unwrap();
        let mut tokens = Tokens::new();
        ensure_admin_token(elsewhere.path(), &mut tokens).unwrap();
        assert!(matches!(
            ensure_admin_token(dir.path(), &mut tokens),
            Err(AdminTokenError::Stale { .. })
        ));

        let (viewer, _) = tokens.create("v", Role::Viewer, None).unwrap();
        let path = admin_token_path(dir.path());
        files::write_private_file(&path, format!("{}\n", viewer.as_str()).as_bytes()).unwrap();
        assert!(matches!(
            ensure_admin_token(dir.path(), &mut tokens),
            Err(AdminTokenError::NotAdmin { ref name, .. }) if name == "v"
        ));

        files::write_private_file(&path, b"\n").unwrap();
        assert!(matches!(
            ensure_admin_token(dir.path(), &mut tokens),
            Err(AdminTokenError::Malformed { .. })
        ));
    }

    #[test]
    fn an_open_or_symlinked_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut tokens = Tokens::new();
        ensure_admin_token(dir.path(), &mut tokens).unwrap();
        let path = admin_token_path(dir.path());
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = ensure_admin_token(dir.path(), &mut tokens).unwrap_err();
        assert!(
            matches!(err, AdminTokenError::File(FileError::TooOpen { .. })),
            "{err}"
        );

        let real = dir.path().join("real");
        fs::rename(&path, &real).unwrap();
        std::os::unix::fs::symlink(&real, &path).unwrap();
        let err = ensure_admin_token(dir.path(), &mut tokens).unwrap_err();
        assert!(
            matches!(
                err,
                AdminTokenError::File(FileError::NotARegularFile { .. })
            ),
            "{err}"
        );
    }
}
