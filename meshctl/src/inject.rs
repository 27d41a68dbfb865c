//! `meshctl inject`: adds meshlet to Kubernetes workloads, like
//! `linkerd inject` or `istioctl kube-inject`, offline and as pure functions
//! over YAML text.
//!
//! For every Deployment, StatefulSet, DaemonSet, Job, CronJob (its job
//! template) and bare Pod in a multi-document stream, the pod template gets:
//!
//! - the init container `meshlet-init` (`sidecar init-iptables`), the only
//!   container with NET_ADMIN/NET_RAW and root, which redirects the pod's
//!   TCP through the proxy (UID 1337 excluded);
//! - the proxy `meshlet-proxy`: by default a *native sidecar* (an init
//!   container with `restartPolicy: Always`, Kubernetes ≥ 1.29), so it is
//!   started before the app and stopped after it, and does not keep a Job
//!   pod alive; with [`InjectOptions::native_sidecar`] off, a plain first
//!   container (see the README for that fallback's trade-offs);
//! - its environment from the downward API and the template (instance id,
//!   namespace, pod IP, service name, app port, labels), an emptyDir for
//!   its snapshot file, and the Prometheus and `meshlet.dev/injected`
//!   annotations;
//! - its credentials for the control plane's HTTPS API: `--token-file` from
//!   the Secret `meshlet-sidecar-SERVICE` (key `token`: a sidecar token
//!   bound to the service, `meshctl token create --role sidecar --service
//!   SERVICE`), `--ca-file` from the ConfigMap `meshlet-ca` (key `ca.crt`:
//!   the control plane's `DATA_DIR/ca.crt`), both in the pod's namespace
//!   (`examples/kind/up.sh` creates them); the pod's `fsGroup` (1337 if it
//!   has none) lets the non-root proxy read the 0400 token file;
//! - the pod label `meshlet.dev/sidecar: injected`, which the control
//!   plane's NetworkPolicy admits to port 15010.
//!
//! Documents are split on their `---` lines and only workloads that are
//! changed are re-serialized: every other document (Services, ConfigMaps,
//! comments, already injected workloads) is copied byte for byte, so
//! injecting twice gives the same bytes as injecting once.

use std::collections::BTreeMap;

use serde_yaml::{Mapping, Value};

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
/// The emptyDir that holds the proxy's snapshot file (its root fs is
/// read-only).
const RUN_VOLUME: &str = "meshlet-run";
const RUN_DIR: &str = "/var/run/meshlet";
const TOKEN_VOLUME: &str = "meshlet-token";
const CA_VOLUME: &str = "meshlet-ca";

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
        "the pod template has no label `app.kubernetes.io/name` or `app`; the sidecar needs one for its service name"
    )]
    NoServiceLabel,
    #[error(
        "no container declares a containerPort; the sidecar forwards inbound traffic to the app's first port"
    )]
    NoAppPort,
}

/// An error with the document it is about, printed by meshctl as one line:
/// `deploy.yaml: document 2 (Deployment orders): ...`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{source_name}: document {document}{}: {problem}", workload.as_deref().map(|w| format!(" ({w})")).unwrap_or_default())]
pub struct InjectError {
    pub source_name: String,
    /// 1-based, counting documents as YAML does.
    pub document: usize,
    /// `Kind name`, when known.
    pub workload: Option<String>,
    pub problem: Problem,
}

/// What happened to one workload (other documents are not reported).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// `deployment/orders`, as kubectl prints it.
    pub workload: String,
    pub outcome: Outcome,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Injected,
    AlreadyInjected,
}

/// The result of injecting one file: the new text and a line per workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Injected {
    pub text: String,
    pub reports: Vec<Report>,
}

/// Injects every workload of `text` (a multi-document YAML stream read
/// from `source_name`); all or nothing: the first error is returned.
pub fn inject_text(
    source_name: &str,
    text: &str,
    options: &InjectOptions,
) -> Result<Injected, InjectError> {
    let mut out = String::with_capacity(text.len() * 2);
    let mut reports = Vec::new();
    for chunk in split_documents(text) {
        let fail = |workload: Option<String>, problem: Problem| InjectError {
            source_name: source_name.to_owned(),
            document: chunk.number,
            workload,
            problem,
        };
        let mut doc: Value = serde_yaml::from_str(chunk.body).map_err(|e| {
            let line = e.location().map(|l| l.line() + chunk.body_line - 1);
            fail(None, yaml_problem(&e, line))
        })?;
        let Some((template, template_name)) = pod_template_path(&doc) else {
            out.push_str(chunk.raw);
            continue;
        };
        let workload = Workload::of(&doc);
        let pod = lookup_mut(&mut doc, template).ok_or_else(|| {
            fail(
                Some(workload.to_string()),
                shape(template_name, "a mapping"),
            )
        })?;
        let outcome = inject_pod(pod, options)
            .map_err(|problem| fail(Some(workload.to_string()), problem))?;
        match outcome {
            Outcome::AlreadyInjected => out.push_str(chunk.raw),
            Outcome::Injected => {
                if chunk.separated {
                    out.push_str("---\n");
                }
                let yaml = serde_yaml::to_string(&doc)
                    .map_err(|e| fail(Some(workload.to_string()), yaml_problem(&e, None)))?;
                out.push_str(&yaml);
            }
        }
        reports.push(Report {
            workload: workload.kubectl_name(),
            outcome,
        });
    }
    Ok(Injected { text: out, reports })
}

/// One document of the input: its raw text (with its `---` line) and the
/// YAML to parse.
struct Chunk<'a> {
    raw: &'a str,
    body: &'a str,
    /// 1-based line of `body`'s first line in the whole input.
    body_line: usize,
    number: usize,
    separated: bool,
}

fn is_separator(line: &str) -> bool {
    let line = line.trim_end_matches(['\r', '\n']);
    line == "---" || line.starts_with("--- ") || line.starts_with("---\t")
}

fn is_blank_or_comment(text: &str) -> bool {
    text.lines()
        .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
}

/// Splits at every line that starts a document (`---`). Text before the
/// first `---` is a document only if it has content, as in YAML.
fn split_documents(text: &str) -> Vec<Chunk<'_>> {
    // Byte offsets and line numbers where each chunk starts.
    let mut starts = vec![(0usize, 1usize)];
    let mut offset = 0;
    for (idx, line) in text.split_inclusive('\n').enumerate() {
        if is_separator(line) && offset > 0 {
            starts.push((offset, idx + 1));
        }
        offset += line.len();
    }
    let mut chunks = Vec::with_capacity(starts.len());
    let mut number = 0;
    for (i, &(start, line)) in starts.iter().enumerate() {
        let end = starts.get(i + 1).map_or(text.len(), |s| s.0);
        let raw = &text[start..end];
        let first = raw.split_inclusive('\n').next().unwrap_or("");
        let separated = is_separator(first);
        let (body, body_line) = if separated {
            (&raw[first.len()..], line + 1)
        } else {
            (raw, line)
        };
        if separated || !is_blank_or_comment(raw) {
            number += 1;
        }
        chunks.push(Chunk {
            raw,
            body,
            body_line,
            number: number.max(1),
            separated,
        });
    }
    chunks
}

fn yaml_problem(e: &serde_yaml::Error, line: Option<usize>) -> Problem {
    let text = e.to_string();
    let message = match text.rfind(" at line ") {
        Some(idx) if e.location().is_some() => text[..idx].to_owned(),
        _ => text,
    };
    Problem::Yaml {
        line,
        message: message.replace('\n', " "),
    }
}

fn shape(path: &'static str, expected: &'static str) -> Problem {
    Problem::Shape { path, expected }
}

/// Where the pod template of a workload kind is (keys, and as written in
/// errors); `None` for other kinds.
fn pod_template_path(doc: &Value) -> Option<(&'static [&'static str], &'static str)> {
    match doc.get("kind")?.as_str()? {
        "Deployment" | "StatefulSet" | "DaemonSet" | "Job" | "ReplicaSet" => {
            Some((&["spec", "template"], "spec.template"))
        }
        "CronJob" => Some((
            &["spec", "jobTemplate", "spec", "template"],
            "spec.jobTemplate.spec.template",
        )),
        "Pod" => Some((&[], "the Pod")),
        _ => None,
    }
}

/// A workload's kind and name, for errors (`Deployment orders`) and reports
/// (`deployment/orders`).
struct Workload {
    kind: String,
    name: String,
}

impl Workload {
    fn of(doc: &Value) -> Self {
        let text = |v: Option<&Value>, or: &str| v.and_then(Value::as_str).unwrap_or(or).to_owned();
        Workload {
            kind: text(doc.get("kind"), "?"),
            name: text(doc.get("metadata").and_then(|m| m.get("name")), "<unnamed>"),
        }
    }

    fn kubectl_name(&self) -> String {
        format!("{}/{}", self.kind.to_ascii_lowercase(), self.name)
    }
}

impl std::fmt::Display for Workload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.kind, self.name)
    }
}

fn lookup_mut<'a>(mut value: &'a mut Value, path: &[&str]) -> Option<&'a mut Value> {
    for key in path {
        value = value.get_mut(*key)?;
    }
    value.is_mapping().then_some(value)
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

fn is_injected(pod: &Value) -> bool {
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

/// What the pod template says about the app: its service name's label, its
/// port and its labels.
#[derive(Debug, Clone, PartialEq, Eq)]
struct App {
    service_label: &'static str,
    /// The service label's value.
    service: String,
    port: u64,
    labels: BTreeMap<String, String>,
}

fn app_facts(pod: &Value) -> Result<App, Problem> {
    let labels: BTreeMap<String, String> = pod
        .get("metadata")
        .and_then(|m| m.get("labels"))
        .and_then(Value::as_mapping)
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| Some((k.as_str()?.to_owned(), scalar_text(v)?)))
        .collect();
    let (service_label, service) = SERVICE_LABELS
        .into_iter()
        .find_map(|key| Some((key, labels.get(key).filter(|v| !v.is_empty())?.clone())))
        .ok_or(Problem::NoServiceLabel)?;
    let containers = pod
        .get("spec")
        .and_then(|s| s.get("containers"))
        .and_then(Value::as_sequence)
        .ok_or_else(|| shape("spec.containers", "a list"))?;
    let port = containers
        .iter()
        .filter_map(|c| c.get("ports")?.as_sequence()?.first()?.get("containerPort"))
        .find_map(Value::as_u64)
        .ok_or(Problem::NoAppPort)?;
    Ok(App {
        service_label,
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

/// Injects one pod template (`metadata` + `spec`), unless it already is.
fn inject_pod(pod: &mut Value, options: &InjectOptions) -> Result<Outcome, Problem> {
    if is_injected(pod) {
        return Ok(Outcome::AlreadyInjected);
    }
    let app = app_facts(pod)?;
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
    let proxy = proxy_container(options, &app);
    let init = child_seq(spec, "initContainers", "template.spec.initContainers")?;
    // Before the pod's own init containers: with the rules in place, their
    // traffic needs the proxy (native mode) or is redirected anyway.
    init.insert(0, init_container(options));
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
    Ok(Outcome::Injected)
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

fn init_container(options: &InjectOptions) -> Value {
    parse_template(&format!(
        r#"name: {INIT_CONTAINER}
image: {image}
imagePullPolicy: IfNotPresent
command: [sidecar]
args: [init-iptables, --proxy-uid, "{PROXY_UID}", --inbound-port, "{INBOUND_PORT}", --outbound-port, "{OUTBOUND_PORT}"]
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

fn proxy_container(options: &InjectOptions, app: &App) -> Value {
    let restart = if options.native_sidecar {
        "restartPolicy: Always\n"
    } else {
        ""
    };
    let labels: Vec<String> = app.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
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
    valueFrom: {{fieldRef: {{fieldPath: {service_field}}}}}
  - name: MESHLET_APP_PORT
    value: "{port}"
  - name: MESHLET_LABELS
    value: {labels}
  - name: MESHLET_SNAPSHOT_FILE
    value: {RUN_DIR}/snapshot.json
ports:
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
  requests: {{cpu: 50m, memory: 32Mi}}
  limits: {{cpu: "1", memory: 128Mi}}
volumeMounts:
  - {{name: {RUN_VOLUME}, mountPath: {RUN_DIR}}}
  - {{name: {TOKEN_VOLUME}, mountPath: {TOKEN_DIR}, readOnly: true}}
  - {{name: {CA_VOLUME}, mountPath: {CA_DIR}, readOnly: true}}
"#,
        image = quoted(&options.image),
        control_plane = quoted(&options.control_plane),
        service_field = quoted(&format!("metadata.labels['{}']", app.service_label)),
        port = app.port,
        labels = quoted(&labels.join(",")),
    ))
}

#[cfg(test)]
mod tests;
