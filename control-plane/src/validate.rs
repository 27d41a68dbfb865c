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

/// Reads `path` (a file, a directory of `*.yaml`/`*.yml`, or `-` for
/// stdin) and returns every resource, or the first error.
pub fn validate_path(path: &Path) -> Result<Vec<Resource>, ValidateError> {
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
        return Ok(parse_documents("-", &text)?);
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
        let mut all = Vec::new();
        for file in files {
            all.extend(parse_documents(&file.display().to_string(), &read(&file)?)?);
        }
        return Ok(all);
    }
    Ok(parse_documents(&path.display().to_string(), &read(path)?)?)
}
