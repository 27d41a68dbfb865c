//! The resource types, exactly as users write them in YAML.
//!
//! Every struct denies unknown fields so that a typo (`adress:`) is an error
//! with a position instead of a silently ignored setting.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// The only `apiVersion` this release understands.
pub const API_VERSION: &str = "meshlet.dev/v1alpha1";

fn default_namespace() -> String {
    "default".to_owned()
}

/// `metadata:` of every resource.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ObjectMeta {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// A whole resource document: `apiVersion`, `kind`, `metadata`, `spec`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Document<S> {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: S,
}

/// `kind: Service`: a named service and, for standalone sidecars, its static
/// endpoints.
pub type ServiceResource = Document<ServiceSpec>;

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceSpec {
    /// Where instances of the service listen (their sidecar's inbound
    /// listener, or the app itself when it has no sidecar).
    #[serde(default)]
    pub endpoints: Vec<EndpointSpec>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EndpointSpec {
    pub address: SocketAddr,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// One parsed and validated resource of any known kind.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Resource {
    Service(ServiceResource),
}

/// The kinds this release accepts, in the order error messages list them.
pub(crate) const KNOWN_KINDS: &[&str] = &["Service"];

impl Resource {
    pub fn kind(&self) -> &'static str {
        match self {
            Resource::Service(_) => "Service",
        }
    }

    pub fn metadata(&self) -> &ObjectMeta {
        match self {
            Resource::Service(doc) => &doc.metadata,
        }
    }

    /// Semantic checks that the type system cannot express. Returns the
    /// offending field path and a message.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let meta = self.metadata();
        check_dns_label(&meta.name).map_err(|m| ("metadata.name".to_owned(), m))?;
        check_dns_label(&meta.namespace).map_err(|m| ("metadata.namespace".to_owned(), m))?;
        match self {
            Resource::Service(doc) => {
                let mut seen = std::collections::HashSet::new();
                for (i, ep) in doc.spec.endpoints.iter().enumerate() {
                    if ep.address.port() == 0 {
                        return Err((
                            format!("spec.endpoints[{i}].address"),
                            "port must not be 0".to_owned(),
                        ));
                    }
                    if !seen.insert(ep.address) {
                        return Err((
                            format!("spec.endpoints[{i}].address"),
                            format!("duplicate endpoint {}", ep.address),
                        ));
                    }
                }
                Ok(())
            }
        }
    }
}

/// Names follow Kubernetes' DNS-1123 label rule so that a service name is
/// also a valid host name (`http://orders/`).
fn check_dns_label(value: &str) -> Result<(), String> {
    let ok_chars = value
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    let ok_ends = !value.starts_with('-') && !value.ends_with('-');
    if value.is_empty() || value.len() > 63 || !ok_chars || !ok_ends {
        return Err(format!(
            "{value:?} is not a valid name: use 1-63 lower-case letters, digits or '-', \
             starting and ending with a letter or digit"
        ));
    }
    Ok(())
}
