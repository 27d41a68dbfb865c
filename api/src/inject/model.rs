//! What every part of injection shares (a leaf: it imports none of them):
//! the names and ports of what is added, [`InjectOptions`] and
//! [`Problem`], why a document or Pod could not be injected.

/// The proxy's UID; `init-iptables` exempts its traffic from redirection.
pub const PROXY_UID: u16 = 1337;
/// Sidecar ports (design.md).
pub const INBOUND_PORT: u16 = 15006;
pub const OUTBOUND_PORT: u16 = 15001;
pub const ADMIN_PORT: u16 = 15020;
/// Where the control plane runs in the manifests of `manifests/base`.
pub const DEFAULT_CONTROL_PLANE: &str = "https://meshlet-control-plane.meshlet.svc:15010";
/// Names of what inject adds.
pub const INIT_CONTAINER: &str = "meshlet-init";
pub const PROXY_CONTAINER: &str = "meshlet-proxy";
pub const INJECTED_ANNOTATION: &str = "meshlet.dev/injected";
/// The pod label (value `injected`) the control plane's NetworkPolicy
/// admits.
pub const SIDECAR_LABEL: &str = "meshlet.dev/sidecar";
/// The Secret holding a service's sidecar token (key `token`) is this
/// prefix and the service name.
pub const TOKEN_SECRET_PREFIX: &str = "meshlet-sidecar-";
/// The ConfigMap holding the mesh CA (key `ca.crt`).
pub const CA_CONFIG_MAP: &str = "meshlet-ca";
/// Where the proxy finds them (directories mounted read-only).
pub const TOKEN_DIR: &str = "/var/run/meshlet/token";
pub const TOKEN_FILE: &str = "/var/run/meshlet/token/token";
pub const CA_DIR: &str = "/var/run/meshlet/ca";
pub const CA_FILE: &str = "/var/run/meshlet/ca/ca.crt";
/// Pod labels that name the service, in order of preference.
pub const SERVICE_LABELS: [&str; 2] = ["app.kubernetes.io/name", "app"];

/// The default sidecar image: the one built from this version.
pub fn default_image() -> String {
    format!("meshlet/sidecar:{}", env!("CARGO_PKG_VERSION"))
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InjectOptions {
    /// Image of both added containers (the sidecar image has `iptables`).
    pub image: String,
    /// The control plane's URL as the proxy reaches it.
    pub control_plane: String,
    /// Native sidecar (init container, `restartPolicy: Always`) or a plain
    /// container.
    pub native_sidecar: bool,
}

impl Default for InjectOptions {
    fn default() -> Self {
        InjectOptions {
            image: default_image(),
            control_plane: DEFAULT_CONTROL_PLANE.to_owned(),
            native_sidecar: true,
        }
    }
}

/// Why one document could not be injected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error("invalid YAML{}: {message}", line.map(|l| format!(" at line {l}")).unwrap_or_default())]
    Yaml {
        /// 1-based line in the whole input.
        line: Option<usize>,
        message: String,
    },
    #[error("`{path}` is missing or not {expected}")]
    Shape {
        path: &'static str,
        expected: &'static str,
    },
    #[error(
        "no service name: the pod template has no label `app.kubernetes.io/name` or `app`, \
         no annotation `meshlet.dev/service` and the workload no name"
    )]
    NoServiceName,
    #[error("the service name {name:?} (from {from}) is not usable: {message}; set the annotation `meshlet.dev/service`")]
    BadServiceName {
        name: String,
        from: String,
        message: String,
    },
    #[error(
        "no container declares a containerPort and there is no annotation `meshlet.dev/app-port`; \
         the sidecar forwards inbound traffic to the app's port"
    )]
    NoAppPort,
    #[error("annotation `{key}: {value}`: expected {expected}")]
    Annotation {
        key: &'static str,
        value: String,
        expected: &'static str,
    },
}
