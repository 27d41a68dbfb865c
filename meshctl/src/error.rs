//! [`CommandError`]: what stops a command, printed by `main` as one line
//! (`meshctl: error: ...`) with exit code 1 (2 for `diff`).

use crate::client::ClientError;
use crate::validate::ValidateError;

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("service {0:?} not found")]
    ServiceNotFound(String),
    #[error("trace {0} not found")]
    TraceNotFound(String),
    #[error(transparent)]
    Files(#[from] ValidateError),
    #[error("cannot read {path}: {source}")]
    Data {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Usage(String),
}
