//! Injection of one pod template (`metadata` + `spec`) as a YAML value:
//! what `meshctl inject` does to each workload's template and the admission
//! webhook to each Pod, so both add exactly the same containers, volumes,
//! labels and annotations.
//!
//! ```text
//! pod ─► already injected? (annotation or a meshlet container) ─► AlreadyInjected
//!     ─► meshlet.dev/inject: pod template, else its Namespace's ─► Disabled
//!     ─► App: service name (label → annotation → workload name), port, labels,
//!        Overrides (annotations.rs) ─► init container, proxy, volumes, labels, annotations
//! ```
//!
//! The pod is changed only when everything succeeded (the work is done on
//! a copy), so a [`Problem`] leaves it as it was.

use std::collections::BTreeMap;

use serde_yaml::{Mapping, Value};

use super::annotations::{self, Overrides};
use super::model::{
    InjectOptions, Problem, ADMIN_PORT, CA_CONFIG_MAP, CA_DIR, CA_FILE, INBOUND_PORT,
    INIT_CONTAINER, INJECTED_ANNOTATION, OUTBOUND_PORT, PROXY_CONTAINER, PROXY_UID, SERVICE_LABELS,
    SIDECAR_LABEL, TOKEN_DIR, TOKEN_FILE, TOKEN_SECRET_PREFIX,
};

/// The emptyDir that holds the proxy's snapshot file (its root fs is
/// read-only).
const RUN_VOLUME: &str = "meshlet-run";
const RUN_DIR: &str = "/var/run/meshlet";
const TOKEN_VOLUME: &str = "meshlet-token";
const CA_VOLUME: &str = "meshlet-ca";

/// What [`inject_pod`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodOutcome {
    Injected,
    AlreadyInjected,
    Disabled(Skipped),
}

/// Why a pod was left alone on purpose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skipped {
    /// `meshlet.dev/inject: disabled` on the pod template.
    PodTemplate,
    /// `meshlet.dev/inject: disabled` on its Namespace (in the same file).
    Namespace(String),
}

impl std::fmt::Display for Skipped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Skipped::PodTemplate => write!(f, "meshlet.dev/inject: disabled on the pod template"),
            Skipped::Namespace(ns) => write!(f, "meshlet.dev/inject: disabled on namespace {ns}"),
        }
    }
}

/// Injects one pod template unless it already is or is disabled.
///
/// `workload_name` is the service name's last fallback (the workload's
/// name; for a bare Pod [`pod_workload_name`]); `namespace` the name and
/// `meshlet.dev/inject` setting (true: enabled) of its Namespace when
/// known.
pub fn inject_pod(
    pod: &mut Value,
    workload_name: Option<&str>,
    namespace: Option<(&str, bool)>,
    options: &InjectOptions,
) -> Result<PodOutcome, Problem> {
    if is_injected(pod) {
        return Ok(PodOutcome::AlreadyInjected);
    }
    let metadata = pod.get("metadata");
    let own = match metadata {
        Some(m) => annotations::inject_setting(m)?,
        None => None,
    };
    match (own, namespace) {
        (Some(false), _) => return Ok(PodOutcome::Disabled(Skipped::PodTemplate)),
        (None, Some((ns, false))) => {
            return Ok(PodOutcome::Disabled(Skipped::Namespace(ns.to_owned())))
        }
        _ => {}
    }
    let overrides = Overrides::read(metadata)?;
    let app = app_facts(pod, &overrides, workload_name)?;
    let mut work = pod.clone();
    add_mesh(&mut work, &app, &overrides, options)?;
    *pod = work;
    Ok(PodOutcome::Injected)
}

/// The workload a bare Pod belongs to, for its service name's fallback:
/// its controller (a ReplicaSet's name without `-<pod-template-hash>`, so
/// a Deployment's Pods are named after the Deployment; a Job's, a
/// StatefulSet's, a DaemonSet's name as it is), else its name, else its
/// `generateName` without the trailing `-`. `None` when it has none.
pub fn pod_workload_name(pod: &Value) -> Option<String> {
    let metadata = pod.get("metadata")?;
    fn text(v: Option<&Value>) -> Option<&str> {
        v.and_then(Value::as_str).filter(|s| !s.is_empty())
    }
    let owners = metadata.get("ownerReferences").and_then(Value::as_sequence);
    let controller = owners.and_then(|owners| {
        owners
            .iter()
            .find(|o| o.get("controller").and_then(Value::as_bool) == Some(true))
    });
    if let Some(owner) = controller {
        if let Some(name) = text(owner.get("name")) {
            let hash = text(
                metadata
                    .get("labels")
                    .and_then(|l| l.get("pod-template-hash")),
            );
            let from_replica_set = text(owner.get("kind")) == Some("ReplicaSet");
            let name = match hash {
                Some(hash) if from_replica_set => name
                    .strip_suffix(hash)
                    .and_then(|n| n.strip_suffix('-'))
                    .filter(|n| !n.is_empty())
                    .unwrap_or(name),
                _ => name,
            };
            return Some(name.to_owned());
        }
    }
    if let Some(name) = text(metadata.get("name")) {
        return Some(name.to_owned());
    }
    text(metadata.get("generateName"))
        .map(|g| g.trim_end_matches('-'))
        .filter(|g| !g.is_empty())
        .map(str::to_owned)
}

fn shape(path: &'static str, expected: &'static str) -> Problem {
    Problem::Shape { path, expected }
}

/// The value at `key` of `map`; `empty` when absent or null.
fn child<'a>(map: &'a mut Mapping, key: &str, empty: Value) -> &'a mut Value {
    let entry = map.entry(Value::from(key)).or_insert(Value::Null);
    if entry.is_null() {
        *entry = empty;
    }
    entry
}

fn child_map<'a>(
    map: &'a mut Mapping,
    key: &str,
    path: &'static str,
) -> Result<&'a mut Mapping, Problem> {
    child(map, key, Value::Mapping(Mapping::new()))
        .as_mapping_mut()
        .ok_or_else(|| shape(path, "a mapping"))
}

fn child_seq<'a>(
    map: &'a mut Mapping,
    key: &str,
    path: &'static str,
) -> Result<&'a mut Vec<Value>, Problem> {
    child(map, key, Value::Sequence(Vec::new()))
        .as_sequence_mut()
        .ok_or_else(|| shape(path, "a list"))
}

fn has_container(containers: Option<&Value>, names: &[&str]) -> bool {
    containers
        .and_then(Value::as_sequence)
        .into_iter()
        .flatten()
        .filter_map(|c| c.get("name")?.as_str())
        .any(|name| names.contains(&name))
}

/// Whether a pod already has meshlet: the `meshlet.dev/injected: "true"`
/// annotation, or a container named like the ones inject adds.
pub fn is_injected(pod: &Value) -> bool {
    let annotated = pod
        .get("metadata")
        .and_then(|m| m.get("annotations"))
        .and_then(|a| a.get(INJECTED_ANNOTATION))
        .and_then(Value::as_str)
        == Some("true");
    let spec = pod.get("spec");
    let names = [INIT_CONTAINER, PROXY_CONTAINER];
    annotated
        || has_container(spec.and_then(|s| s.get("initContainers")), &names)
        || has_container(spec.and_then(|s| s.get("containers")), &names)
}

/// Where the proxy's service name comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ServiceSource {
    /// A pod label, read through the downward API.
    Label(&'static str),
    /// The `meshlet.dev/service` annotation, read through the downward API.
    Annotation,
    /// The workload's name, written as a value.
    WorkloadName,
}

/// What the pod template says about the app: its service name and where
/// it comes from, its port and its labels.
#[derive(Debug, Clone, PartialEq, Eq)]
struct App {
    source: ServiceSource,
    service: String,
    port: u64,
    labels: BTreeMap<String, String>,
}

fn app_facts(
    pod: &Value,
    overrides: &Overrides,
    workload_name: Option<&str>,
) -> Result<App, Problem> {
    let labels: BTreeMap<String, String> = pod
        .get("metadata")
        .and_then(|m| m.get("labels"))
        .and_then(Value::as_mapping)
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| Some((k.as_str()?.to_owned(), scalar_text(v)?)))
        .collect();
    let from_label = SERVICE_LABELS.into_iter().find_map(|key| {
        let value = labels.get(key).filter(|v| !v.is_empty())?;
        Some((ServiceSource::Label(key), value.clone()))
    });
    let (source, service) = from_label
        .or_else(|| Some((ServiceSource::Annotation, overrides.service.clone()?)))
        .or_else(|| Some((ServiceSource::WorkloadName, workload_name?.to_owned())))
        .ok_or(Problem::NoServiceName)?;
    crate::limits::check_dns_label(&service).map_err(|message| Problem::BadServiceName {
        name: service.clone(),
        from: match source {
            ServiceSource::Label(key) => format!("the label `{key}`"),
            ServiceSource::Annotation => format!("the annotation `{}`", annotations::SERVICE),
            ServiceSource::WorkloadName => "the workload's name".to_owned(),
        },
        message,
    })?;
    let containers = pod
        .get("spec")
        .and_then(|s| s.get("containers"))
        .and_then(Value::as_sequence)
        .ok_or_else(|| shape("spec.containers", "a list"))?;
    let declared = containers
        .iter()
        .filter_map(|c| c.get("ports")?.as_sequence()?.first()?.get("containerPort"))
        .find_map(Value::as_u64);
    let port = overrides
        .app_port
        .map(u64::from)
        .or(declared)
        .ok_or(Problem::NoAppPort)?;
    Ok(App {
        source,
        service,
        port,
        labels,
    })
}

fn scalar_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Adds the containers, volumes, labels and annotations to `pod`.
fn add_mesh(
    pod: &mut Value,
    app: &App,
    overrides: &Overrides,
    options: &InjectOptions,
) -> Result<(), Problem> {
    let pod = pod
        .as_mapping_mut()
        .ok_or_else(|| shape("template", "a mapping"))?;

    let metadata = child_map(pod, "metadata", "template.metadata")?;
    let labels = child_map(metadata, "labels", "template.metadata.labels")?;
    labels.insert(Value::from(SIDECAR_LABEL), Value::from("injected"));
    let annotations = child_map(metadata, "annotations", "template.metadata.annotations")?;
    for (key, value) in [
        ("prometheus.io/scrape", "true".to_owned()),
        ("prometheus.io/port", ADMIN_PORT.to_string()),
        ("prometheus.io/path", "/metrics".to_owned()),
        (INJECTED_ANNOTATION, "true".to_owned()),
    ] {
        annotations.insert(Value::from(key), Value::from(value));
    }

    let spec = child_map(pod, "spec", "template.spec")?;
    // Secret files are root's; with an fsGroup they are also the group's
    // (read-only), and every container, the proxy too, is in that group.
    let security = child_map(spec, "securityContext", "template.spec.securityContext")?;
    if matches!(security.get("fsGroup"), None | Some(Value::Null)) {
        security.insert(Value::from("fsGroup"), Value::from(PROXY_UID));
    }
    let proxy = proxy_container(options, app, overrides);
    let init = child_seq(spec, "initContainers", "template.spec.initContainers")?;
    // Before the pod's own init containers: with the rules in place, their
    // traffic needs the proxy (native mode) or is redirected anyway.
    init.insert(0, init_container(options, overrides));
    if options.native_sidecar {
        init.insert(1, proxy);
    } else {
        let containers = child_seq(spec, "containers", "template.spec.containers")?;
        // First, so that the kubelet starts it first (it does not wait).
        containers.insert(0, proxy);
    }
    let volumes = child_seq(spec, "volumes", "template.spec.volumes")?;
    volumes.push(parse_template(&format!(
        "name: {RUN_VOLUME}\nemptyDir: {{medium: Memory, sizeLimit: 8Mi}}\n"
    )));
    // defaultMode 256 is 0400.
    volumes.push(parse_template(&format!(
        "name: {TOKEN_VOLUME}\nsecret: {{secretName: {secret}, defaultMode: 256, items: [{{key: token, path: token}}]}}\n",
        secret = quoted(&format!("{TOKEN_SECRET_PREFIX}{}", app.service)),
    )));
    volumes.push(parse_template(&format!(
        "name: {CA_VOLUME}\nconfigMap: {{name: {CA_CONFIG_MAP}, items: [{{key: ca.crt, path: ca.crt}}]}}\n"
    )));
    Ok(())
}

/// A YAML double-quoted scalar (JSON strings are valid YAML).
fn quoted(text: &str) -> String {
    serde_json::to_string(text).unwrap_or_else(|_| "\"\"".to_owned())
}

/// Parses one of this module's container templates (a unit test checks
/// each parses for any option).
fn parse_template(yaml: &str) -> Value {
    serde_yaml::from_str(yaml).expect("inject's templates are valid YAML")
}

fn port_list(ports: &[u16]) -> String {
    let list: Vec<String> = ports.iter().map(u16::to_string).collect();
    quoted(&list.join(","))
}

fn init_container(options: &InjectOptions, overrides: &Overrides) -> Value {
    let mut skips = String::new();
    if !overrides.skip_inbound_ports.is_empty() {
        skips.push_str(&format!(
            ", --exclude-inbound-ports, {}",
            port_list(&overrides.skip_inbound_ports)
        ));
    }
    if !overrides.skip_outbound_ports.is_empty() {
        skips.push_str(&format!(
            ", --exclude-outbound-ports, {}",
            port_list(&overrides.skip_outbound_ports)
        ));
    }
    parse_template(&format!(
        r#"name: {INIT_CONTAINER}
image: {image}
imagePullPolicy: IfNotPresent
command: [sidecar]
args: [init-iptables, --proxy-uid, "{PROXY_UID}", --inbound-port, "{INBOUND_PORT}", --outbound-port, "{OUTBOUND_PORT}"{skips}]
securityContext:
  runAsUser: 0
  runAsNonRoot: false
  allowPrivilegeEscalation: false
  capabilities:
    add: [NET_ADMIN, NET_RAW]
    drop: [ALL]
resources:
  requests: {{cpu: 10m, memory: 16Mi}}
  limits: {{cpu: 100m, memory: 32Mi}}
"#,
        image = quoted(&options.image),
    ))
}

fn proxy_container(options: &InjectOptions, app: &App, overrides: &Overrides) -> Value {
    let restart = if options.native_sidecar {
        "restartPolicy: Always\n"
    } else {
        ""
    };
    let labels: Vec<String> = app.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let service = match &app.source {
        ServiceSource::Label(key) => format!(
            "valueFrom: {{fieldRef: {{fieldPath: {}}}}}",
            quoted(&format!("metadata.labels['{key}']"))
        ),
        ServiceSource::Annotation => format!(
            "valueFrom: {{fieldRef: {{fieldPath: {}}}}}",
            quoted(&format!("metadata.annotations['{}']", annotations::SERVICE))
        ),
        ServiceSource::WorkloadName => format!("value: {}", quoted(&app.service)),
    };
    let log_level = match &overrides.log_level {
        Some(level) => format!("  - name: RUST_LOG\n    value: {}\n", quoted(level)),
        None => String::new(),
    };
    // A native sidecar's startup probe gates the app's start, so it asks
    // /started (listening and configured), not /ready (which also waits
    // for the app's health).
    parse_template(&format!(
        r#"name: {PROXY_CONTAINER}
image: {image}
imagePullPolicy: IfNotPresent
{restart}command: [sidecar]
args: [--mode, transparent, --control-plane, {control_plane}, --token-file, {TOKEN_FILE}, --ca-file, {CA_FILE}, --admin-ip, 0.0.0.0, --inbound-port, "{INBOUND_PORT}", --outbound-port, "{OUTBOUND_PORT}", --admin-port, "{ADMIN_PORT}", --log-format, json]
env:
  - name: MESHLET_INSTANCE_ID
    valueFrom: {{fieldRef: {{fieldPath: metadata.name}}}}
  - name: MESHLET_NAMESPACE
    valueFrom: {{fieldRef: {{fieldPath: metadata.namespace}}}}
  - name: MESHLET_ADVERTISE_IP
    valueFrom: {{fieldRef: {{fieldPath: status.podIP}}}}
  - name: MESHLET_SERVICE
    {service}
  - name: MESHLET_APP_PORT
    value: "{port}"
  - name: MESHLET_LABELS
    value: {labels}
  - name: MESHLET_SNAPSHOT_FILE
    value: {RUN_DIR}/snapshot.json
{log_level}ports:
  - {{name: meshlet-admin, containerPort: {ADMIN_PORT}, protocol: TCP}}
startupProbe:
  httpGet: {{path: /started, port: {ADMIN_PORT}}}
  periodSeconds: 1
  failureThreshold: 60
readinessProbe:
  httpGet: {{path: /ready, port: {ADMIN_PORT}}}
  periodSeconds: 2
  failureThreshold: 3
livenessProbe:
  httpGet: {{path: /live, port: {ADMIN_PORT}}}
  periodSeconds: 10
  failureThreshold: 3
securityContext:
  runAsUser: {PROXY_UID}
  runAsGroup: {PROXY_UID}
  runAsNonRoot: true
  readOnlyRootFilesystem: true
  allowPrivilegeEscalation: false
  capabilities: {{drop: [ALL]}}
  seccompProfile: {{type: RuntimeDefault}}
resources:
  requests: {{cpu: {cpu_request}, memory: {memory_request}}}
  limits: {{cpu: {cpu_limit}, memory: {memory_limit}}}
volumeMounts:
  - {{name: {RUN_VOLUME}, mountPath: {RUN_DIR}}}
  - {{name: {TOKEN_VOLUME}, mountPath: {TOKEN_DIR}, readOnly: true}}
  - {{name: {CA_VOLUME}, mountPath: {CA_DIR}, readOnly: true}}
"#,
        image = quoted(&options.image),
        control_plane = quoted(&options.control_plane),
        port = app.port,
        labels = quoted(&labels.join(",")),
        cpu_request = quoted(&overrides.cpu_request),
        memory_request = quoted(&overrides.memory_request),
        cpu_limit = quoted(&overrides.cpu_limit),
        memory_limit = quoted(&overrides.memory_limit),
    ))
}
