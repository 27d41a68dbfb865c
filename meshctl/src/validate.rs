//! `meshctl validate -f FILE|DIR|-`: parse and validate resource files
//! without changing anything, printing `kind/name valid` per resource or
//! the first error with its file, document, line, column and field.

use std::io::Read;
use std::path::{Path, PathBuf};

use meshlet_api::{parse_documents, ParseError, Resource};

#[derive(Debug, thiserror::Error)]
pub enum ValidateError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(#[from] ParseError),
    #[error("{path}: no .yaml or .yml files found")]
    EmptyDirectory { path: PathBuf },
}

/// One resource file as read: the name errors refer to, and its text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceFile {
    pub name: String,
    pub text: String,
}

/// Reads `path` (a file, a directory of `*.yaml`/`*.yml` in name order, or
/// `-` for stdin) without parsing it.
pub fn read_files(path: &Path) -> Result<Vec<SourceFile>, ValidateError> {
    let read = |p: &Path| {
        std::fs::read_to_string(p).map_err(|source| ValidateError::Read {
            path: p.to_owned(),
            source,
        })
    };
    if path == Path::new("-") {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|source| ValidateError::Read {
                path: path.to_owned(),
                source,
            })?;
        return Ok(vec![SourceFile {
            name: "-".to_owned(),
            text,
        }]);
    }
    if path.is_dir() {
        let entries = std::fs::read_dir(path).map_err(|source| ValidateError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
            .collect();
        if files.is_empty() {
            return Err(ValidateError::EmptyDirectory {
                path: path.to_owned(),
            });
        }
        files.sort();
        return files
            .iter()
            .map(|file| {
                Ok(SourceFile {
                    name: file.display().to_string(),
                    text: read(file)?,
                })
            })
            .collect();
    }
    Ok(vec![SourceFile {
        name: path.display().to_string(),
        text: read(path)?,
    }])
}

/// Reads `path` (see [`read_files`]) and returns every resource, or the
/// first error.
pub fn validate_path(path: &Path) -> Result<Vec<Resource>, ValidateError> {
    let mut all = Vec::new();
    for file in read_files(path)? {
        all.extend(parse_documents(&file.name, &file.text)?);
    }
    Ok(all)
}
