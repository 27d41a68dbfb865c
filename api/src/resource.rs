//! The resource types, exactly as users write them in YAML.
//!
//! Every struct denies unknown fields so that a typo (`adress:`) is an error
//! with a position instead of a silently ignored setting.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::{Deserialize, Deserializer, Serialize};

use crate::duration::HumanDuration;

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

/// Which service a policy applies to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TargetRef {
    pub service: String,
    /// Defaults to the policy's own namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// `kind: HealthCheckPolicy`: how each sidecar of the target service probes
/// its local app. Without one, the defaults below apply (the seed's
/// `/health`).
pub type HealthCheckPolicy = Document<HealthCheckSpec>;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HealthCheckSpec {
    pub target_ref: TargetRef,
    /// HTTP path probed with GET; a 2xx or 3xx answer is a success.
    #[serde(default = "HealthCheckSpec::default_path")]
    pub path: String,
    #[serde(default = "HealthCheckSpec::default_interval")]
    pub interval: HumanDuration,
    #[serde(default = "HealthCheckSpec::default_timeout")]
    pub timeout: HumanDuration,
    /// Consecutive failures that mark a healthy instance unhealthy.
    #[serde(default = "HealthCheckSpec::default_unhealthy")]
    pub unhealthy_threshold: u32,
    /// Consecutive successes that mark an unhealthy instance healthy.
    #[serde(default = "HealthCheckSpec::default_healthy")]
    pub healthy_threshold: u32,
}

impl HealthCheckSpec {
    fn default_path() -> String {
        "/health".to_owned()
    }
    fn default_interval() -> HumanDuration {
        HumanDuration::from_secs(5)
    }
    fn default_timeout() -> HumanDuration {
        HumanDuration::from_secs(1)
    }
    fn default_unhealthy() -> u32 {
        3
    }
    fn default_healthy() -> u32 {
        1
    }

    /// The check used when no policy targets a service.
    pub fn defaults_for(service: &str) -> Self {
        HealthCheckSpec {
            target_ref: TargetRef {
                service: service.to_owned(),
                namespace: None,
            },
            path: Self::default_path(),
            interval: Self::default_interval(),
            timeout: Self::default_timeout(),
            unhealthy_threshold: Self::default_unhealthy(),
            healthy_threshold: Self::default_healthy(),
        }
    }

    fn validate(&self) -> Result<(), (String, String)> {
        let field = |f: &str, m: &str| Err((format!("spec.{f}"), m.to_owned()));
        if !self.path.starts_with('/') {
            return field("path", "must start with '/'");
        }
        const HOUR: std::time::Duration = std::time::Duration::from_secs(3600);
        if self.interval.get().is_zero() || self.interval.get() > HOUR {
            return field("interval", "must be greater than 0 and at most 1h");
        }
        if self.timeout.get().is_zero() || self.timeout.get() > HOUR {
            return field("timeout", "must be greater than 0 and at most 1h");
        }
        if self.unhealthy_threshold == 0 {
            return field("unhealthyThreshold", "must be at least 1");
        }
        if self.healthy_threshold == 0 {
            return field("healthyThreshold", "must be at least 1");
        }
        check_dns_label(&self.target_ref.service)
            .map_err(|m| ("spec.targetRef.service".to_owned(), m))
    }
}

/// One parsed and validated resource of any known kind.
///
/// Serializes as the document users wrote (with `kind`); deserializing
/// (from the control plane's JSON) dispatches on `kind`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Resource {
    Service(ServiceResource),
    HealthCheckPolicy(HealthCheckPolicy),
}

/// The kinds this release accepts, in the order error messages list them.
pub(crate) const KNOWN_KINDS: &[&str] = &["Service", "HealthCheckPolicy"];

/// Identifies a resource: kind, namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ResourceKey {
    pub kind: String,
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for ResourceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/{}",
            self.kind.to_ascii_lowercase(),
            if self.namespace == "default" {
                self.name.clone()
            } else {
                format!("{}.{}", self.name, self.namespace)
            }
        )
    }
}

impl Resource {
    pub fn kind(&self) -> &'static str {
        match self {
            Resource::Service(_) => "Service",
            Resource::HealthCheckPolicy(_) => "HealthCheckPolicy",
        }
    }

    pub fn metadata(&self) -> &ObjectMeta {
        match self {
            Resource::Service(doc) => &doc.metadata,
            Resource::HealthCheckPolicy(doc) => &doc.metadata,
        }
    }

    pub fn api_version(&self) -> &str {
        match self {
            Resource::Service(doc) => &doc.api_version,
            Resource::HealthCheckPolicy(doc) => &doc.api_version,
        }
    }

    pub fn key(&self) -> ResourceKey {
        let meta = self.metadata();
        ResourceKey {
            kind: self.kind().to_owned(),
            namespace: meta.namespace.clone(),
            name: meta.name.clone(),
        }
    }

    /// The service a policy targets, as `(namespace, name)`; `None` for a
    /// `Service`.
    pub fn target(&self) -> Option<(&str, &str)> {
        let (meta, target) = match self {
            Resource::Service(_) => return None,
            Resource::HealthCheckPolicy(doc) => (&doc.metadata, &doc.spec.target_ref),
        };
        let namespace = target.namespace.as_deref().unwrap_or(&meta.namespace);
        Some((namespace, &target.service))
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
            Resource::HealthCheckPolicy(doc) => doc.spec.validate(),
        }
    }
}

impl<'de> Deserialize<'de> for Resource {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let value = serde_json::Value::deserialize(d)?;
        let kind = value
            .get("kind")
            .and_then(|k| k.as_str())
            .ok_or_else(|| D::Error::missing_field("kind"))?;
        let typed = match kind {
            "Service" => serde_json::from_value(value).map(Resource::Service),
            "HealthCheckPolicy" => serde_json::from_value(value).map(Resource::HealthCheckPolicy),
            other => return Err(D::Error::custom(format!("unknown kind {other:?}"))),
        };
        typed.map_err(D::Error::custom)
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
