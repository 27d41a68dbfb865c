//! meshlet's user-facing resources: the Kubernetes-style YAML kinds that
//! users write (`kind: Service`, later the policy kinds) and the one parser
//! that turns a multi-document YAML file into typed, validated resources.
//!
//! Data flow: YAML text → [`parse_documents`] (strict serde with unknown
//! fields rejected, errors carry file, document, line, column and field path)
//! → semantic validation ([`Resource::validate`]) → `Vec<Resource>`. Both the
//! sidecar (standalone `--config`) and the control plane (`meshctl apply`)
//! use this crate, so a file that one accepts the other accepts too.
//!
//! **Invariant:** nothing here does I/O or knows about networking; it only
//! describes and checks what users wrote.

mod parse;
mod resource;

pub use parse::{parse_documents, ParseError};
pub use resource::{EndpointSpec, ObjectMeta, Resource, ServiceResource, ServiceSpec, API_VERSION};
