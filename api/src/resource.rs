//! The resource types, exactly as users write them in YAML.
//!
//! Every struct denies unknown fields so that a typo (`adress:`) is an error
//! with a position instead of a silently ignored setting.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::{Deserialize, Deserializer, Serialize};

use crate::fault::FaultInjectionSpec;
use crate::limits;
use crate::policy::{
    CircuitBreakerSpec, HealthCheckSpec, RateLimitSpec, RetrySpec, TargetRef, TimeoutSpec,
    TracingSpec, TrafficSplitSpec,
};
use crate::route::RouteSpec;
use crate::zero_trust::{AuthorizationSpec, MtlsSpec};

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

/// `kind: HealthCheckPolicy`.
pub type HealthCheckPolicy = Document<HealthCheckSpec>;
/// `kind: RateLimitPolicy`.
pub type RateLimitPolicy = Document<RateLimitSpec>;
/// `kind: CircuitBreakerPolicy`.
pub type CircuitBreakerPolicy = Document<CircuitBreakerSpec>;
/// `kind: RetryPolicy`.
pub type RetryPolicy = Document<RetrySpec>;
/// `kind: TimeoutPolicy`.
pub type TimeoutPolicy = Document<TimeoutSpec>;
/// `kind: TrafficSplit`.
pub type TrafficSplit = Document<TrafficSplitSpec>;
/// `kind: TracingPolicy`.
pub type TracingPolicy = Document<TracingSpec>;
/// `kind: MTLSPolicy`.
pub type MtlsPolicy = Document<MtlsSpec>;
/// `kind: AuthorizationPolicy`.
pub type AuthorizationPolicy = Document<AuthorizationSpec>;
/// `kind: Route`.
pub type Route = Document<RouteSpec>;
/// `kind: FaultInjectionPolicy`.
pub type FaultInjectionPolicy = Document<FaultInjectionSpec>;

/// One parsed and validated resource of any known kind.
///
/// Serializes as the document users wrote (with `kind`); deserializing
/// (from the control plane's JSON) dispatches on `kind`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Resource {
    Service(ServiceResource),
    HealthCheckPolicy(HealthCheckPolicy),
    RateLimitPolicy(RateLimitPolicy),
    CircuitBreakerPolicy(CircuitBreakerPolicy),
    RetryPolicy(RetryPolicy),
    TimeoutPolicy(TimeoutPolicy),
    TrafficSplit(TrafficSplit),
    TracingPolicy(TracingPolicy),
    MtlsPolicy(MtlsPolicy),
    AuthorizationPolicy(AuthorizationPolicy),
    Route(Route),
    FaultInjectionPolicy(FaultInjectionPolicy),
}

/// The kinds this release accepts, in the order error messages list them.
pub const KNOWN_KINDS: &[&str] = &[
    "Service",
    "HealthCheckPolicy",
    "RateLimitPolicy",
    "CircuitBreakerPolicy",
    "RetryPolicy",
    "TimeoutPolicy",
    "TrafficSplit",
    "TracingPolicy",
    "MTLSPolicy",
    "AuthorizationPolicy",
    "Route",
    "FaultInjectionPolicy",
];

/// Evaluates `$body` with `$doc` bound to the document of any kind.
macro_rules! each_kind {
    ($resource:expr, $doc:ident => $body:expr) => {
        match $resource {
            Resource::Service($doc) => $body,
            Resource::HealthCheckPolicy($doc) => $body,
            Resource::RateLimitPolicy($doc) => $body,
            Resource::CircuitBreakerPolicy($doc) => $body,
            Resource::RetryPolicy($doc) => $body,
            Resource::TimeoutPolicy($doc) => $body,
            Resource::TrafficSplit($doc) => $body,
            Resource::TracingPolicy($doc) => $body,
            Resource::MtlsPolicy($doc) => $body,
            Resource::AuthorizationPolicy($doc) => $body,
            Resource::Route($doc) => $body,
            Resource::FaultInjectionPolicy($doc) => $body,
        }
    };
}

/// Turns one document of a known kind into a [`Resource`] through
/// `deserialize` (strict, typed per kind); `None` for an unknown kind.
pub(crate) fn typed_resource<E>(
    kind: &str,
    deserialize: impl TypedDeserializer<E>,
) -> Option<Result<Resource, E>> {
    Some(match kind {
        "Service" => deserialize.doc().map(Resource::Service),
        "HealthCheckPolicy" => deserialize.doc().map(Resource::HealthCheckPolicy),
        "RateLimitPolicy" => deserialize.doc().map(Resource::RateLimitPolicy),
        "CircuitBreakerPolicy" => deserialize.doc().map(Resource::CircuitBreakerPolicy),
        "RetryPolicy" => deserialize.doc().map(Resource::RetryPolicy),
        "TimeoutPolicy" => deserialize.doc().map(Resource::TimeoutPolicy),
        "TrafficSplit" => deserialize.doc().map(Resource::TrafficSplit),
        "TracingPolicy" => deserialize.doc().map(Resource::TracingPolicy),
        "MTLSPolicy" => deserialize.doc().map(Resource::MtlsPolicy),
        "AuthorizationPolicy" => deserialize.doc().map(Resource::AuthorizationPolicy),
        "Route" => deserialize.doc().map(Resource::Route),
        "FaultInjectionPolicy" => deserialize.doc().map(Resource::FaultInjectionPolicy),
        _ => return None,
    })
}

/// Something that can deserialize one document into any `Document<S>`.
pub(crate) trait TypedDeserializer<E> {
    fn doc<S: serde::de::DeserializeOwned>(self) -> Result<Document<S>, E>;
}

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
            Resource::RateLimitPolicy(_) => "RateLimitPolicy",
            Resource::CircuitBreakerPolicy(_) => "CircuitBreakerPolicy",
            Resource::RetryPolicy(_) => "RetryPolicy",
            Resource::TimeoutPolicy(_) => "TimeoutPolicy",
            Resource::TrafficSplit(_) => "TrafficSplit",
            Resource::TracingPolicy(_) => "TracingPolicy",
            Resource::MtlsPolicy(_) => "MTLSPolicy",
            Resource::AuthorizationPolicy(_) => "AuthorizationPolicy",
            Resource::Route(_) => "Route",
            Resource::FaultInjectionPolicy(_) => "FaultInjectionPolicy",
        }
    }

    pub fn metadata(&self) -> &ObjectMeta {
        each_kind!(self, doc => &doc.metadata)
    }

    pub fn api_version(&self) -> &str {
        each_kind!(self, doc => &doc.api_version)
    }

    pub fn key(&self) -> ResourceKey {
        let meta = self.metadata();
        ResourceKey {
            kind: self.kind().to_owned(),
            namespace: meta.namespace.clone(),
            name: meta.name.clone(),
        }
    }

    /// The resource as users write it, in YAML (what `meshctl get -o yaml`
    /// prints and the control plane's diffs compare).
    pub fn to_yaml(&self) -> String {
        serde_yaml::to_string(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }

    /// The service a policy targets, as `(namespace, name)`; `None` for a
    /// `Service`, a `Route` (see `RouteSpec::references`) and a mesh-wide
    /// `MTLSPolicy` (no `targetRef`).
    pub fn target(&self) -> Option<(&str, &str)> {
        let target = self.target_ref()?;
        let meta = self.metadata();
        let namespace = target.namespace.as_deref().unwrap_or(&meta.namespace);
        Some((namespace, &target.service))
    }

    fn target_ref(&self) -> Option<&TargetRef> {
        Some(match self {
            // A route names its parents and backends itself.
            Resource::Service(_) | Resource::Route(_) => return None,
            Resource::HealthCheckPolicy(doc) => &doc.spec.target_ref,
            Resource::RateLimitPolicy(doc) => &doc.spec.target_ref,
            Resource::CircuitBreakerPolicy(doc) => &doc.spec.target_ref,
            Resource::RetryPolicy(doc) => &doc.spec.target_ref,
            Resource::TimeoutPolicy(doc) => &doc.spec.target_ref,
            Resource::TrafficSplit(doc) => &doc.spec.target_ref,
            Resource::TracingPolicy(doc) => &doc.spec.target_ref,
            Resource::MtlsPolicy(doc) => return doc.spec.target_ref.as_ref(),
            Resource::AuthorizationPolicy(doc) => &doc.spec.target_ref,
            Resource::FaultInjectionPolicy(doc) => &doc.spec.target_ref,
        })
    }

    /// Semantic checks that the type system cannot express, and the bounds
    /// of [`crate::limits`] (names are DNS-1123 labels, label maps, list
    /// lengths, string lengths). Returns the offending field path and a
    /// message. Also for resources read back from storage, so that a
    /// rollback to one over today's limits can be refused.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let meta = self.metadata();
        limits::validate_dns_label("metadata.name", &meta.name)?;
        limits::validate_dns_label("metadata.namespace", &meta.namespace)?;
        limits::validate_labels("metadata.labels", meta.labels.iter())?;
        if let Some(target) = self.target_ref() {
            limits::validate_dns_label("spec.targetRef.service", &target.service)?;
            if let Some(ns) = &target.namespace {
                limits::validate_dns_label("spec.targetRef.namespace", ns)?;
            }
        }
        match self {
            Resource::Service(doc) => {
                let endpoints = &doc.spec.endpoints;
                limits::check_len(
                    "spec.endpoints",
                    endpoints.len(),
                    limits::MAX_ENDPOINTS,
                    "MAX_ENDPOINTS",
                    "endpoints",
                )?;
                let mut seen = std::collections::HashSet::new();
                for (i, ep) in endpoints.iter().enumerate() {
                    limits::validate_labels(
                        &format!("spec.endpoints[{i}].labels"),
                        ep.labels.iter(),
                    )?;
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
            Resource::RateLimitPolicy(doc) => doc.spec.validate(),
            Resource::CircuitBreakerPolicy(doc) => doc.spec.validate(),
            Resource::RetryPolicy(doc) => doc.spec.validate(),
            Resource::TimeoutPolicy(doc) => doc.spec.validate(),
            Resource::TrafficSplit(doc) => doc.spec.validate(),
            Resource::TracingPolicy(doc) => doc.spec.validate(),
            Resource::MtlsPolicy(doc) => doc.spec.validate(),
            Resource::AuthorizationPolicy(doc) => doc.spec.validate(),
            Resource::Route(doc) => doc.spec.validate(),
            Resource::FaultInjectionPolicy(doc) => doc.spec.validate(),
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
            .ok_or_else(|| D::Error::missing_field("kind"))?
            .to_owned();
        struct FromValue(serde_json::Value);
        impl TypedDeserializer<serde_json::Error> for FromValue {
            fn doc<S: serde::de::DeserializeOwned>(self) -> Result<Document<S>, serde_json::Error> {
                serde_json::from_value(self.0)
            }
        }
        typed_resource(&kind, FromValue(value))
            .ok_or_else(|| D::Error::custom(format!("unknown kind {kind:?}")))?
            .map_err(D::Error::custom)
    }
}
