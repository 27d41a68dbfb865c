//! Sidecar injection, the one implementation behind `meshctl inject` (YAML
//! files, offline) and the control plane's admission webhook `POST /inject`
//! (one Pod at a time): pure functions, no I/O.
//!
//! ```text
//! meshctl inject -f FILE ─► inject_text: split documents ─► Namespaces' meshlet.dev/inject
//!                           ─► per workload: its pod template ─► pod::inject_pod ─► YAML
//! API server ─► POST /inject ─► admission::review: the Pod ─► pod::inject_pod
//!                           ─► json_patch::diff(before, after) ─► AdmissionReview (base64 JSONPatch)
//! ```
//!
//! For every Deployment, StatefulSet, DaemonSet, ReplicaSet, Job, CronJob
//! (its job template) and bare Pod, the pod template gets (see [`pod`]):
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
//! The service name is, in order: the pod template's label
//! `app.kubernetes.io/name` or `app`, its annotation `meshlet.dev/service`,
//! the workload's name (for a bare Pod: its controller's name, a
//! ReplicaSet's without the `pod-template-hash`, else the Pod's name or
//! `generateName`). The pod template's annotations tune the proxy
//! ([`annotations`]); `meshlet.dev/inject: disabled` on the template,
//! or on a Namespace of the same file, leaves a workload alone.
//!
//! A file is never refused as a whole: a document that cannot be injected
//! (invalid YAML, a pod template without a container port, a bad
//! annotation) is copied unchanged and reported as
//! [`Outcome::NotInjected`] with why, and the others are injected.
//! Documents are split on their `---` lines and only workloads that are
//! changed are re-serialized: every other document (Services, ConfigMaps,
//! comments, already injected workloads) is copied byte for byte, so
//! injecting twice gives the same bytes as injecting once.

pub mod admission;
pub mod annotations;
mod model;
pub mod pod;

use std::collections::BTreeMap;

use serde_yaml::Value;

pub use model::*;
pub use pod::{inject_pod, pod_workload_name, PodOutcome, Skipped};

/// A document that was not injected, with where it is: printed by meshctl
/// as one warning line, `deploy.yaml: document 2 (Deployment orders): ...`.
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

/// What happened to one workload, or to a document that could not be read
/// (other documents are not reported).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// `deployment/orders`, as kubectl prints it (`document N` for a
    /// document that is not valid YAML).
    pub workload: String,
    pub outcome: Outcome,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Injected,
    AlreadyInjected,
    /// `meshlet.dev/inject: disabled`, on the pod template or its
    /// Namespace; copied unchanged.
    Disabled(Skipped),
    /// Could not be injected; copied unchanged (meshctl warns).
    NotInjected(InjectError),
}

impl Outcome {
    /// How meshctl words it after the workload's name.
    pub fn describe(&self) -> String {
        match self {
            Outcome::Injected => "injected".to_owned(),
            Outcome::AlreadyInjected => "already injected, unchanged".to_owned(),
            Outcome::Disabled(why) => format!("not injected ({why}), unchanged"),
            Outcome::NotInjected(error) => {
                format!("NOT injected, passed through unchanged: {}", error.problem)
            }
        }
    }
}

/// The result of injecting one file: the new text and a line per workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Injected {
    pub text: String,
    pub reports: Vec<Report>,
}

impl Injected {
    /// The documents that could not be injected (meshctl's warnings).
    pub fn problems(&self) -> impl Iterator<Item = &InjectError> {
        self.reports.iter().filter_map(|r| match &r.outcome {
            Outcome::NotInjected(error) => Some(error),
            _ => None,
        })
    }
}

/// Injects every workload of `text` (a multi-document YAML stream read
/// from `source_name`). Never fails as a whole: a document that cannot be
/// injected is copied unchanged and reported.
pub fn inject_text(source_name: &str, text: &str, options: &InjectOptions) -> Injected {
    let chunks = split_documents(text);
    let parsed: Vec<Result<Value, Problem>> = chunks
        .iter()
        .map(|chunk| {
            serde_yaml::from_str(chunk.body).map_err(|e| {
                let line = e.location().map(|l| l.line() + chunk.body_line - 1);
                yaml_problem(&e, line)
            })
        })
        .collect();
    let namespaces = namespace_settings(parsed.iter().filter_map(|doc| doc.as_ref().ok()));

    let mut out = String::with_capacity(text.len() * 2);
    let mut reports = Vec::new();
    for (chunk, doc) in chunks.iter().zip(parsed) {
        let fail = |workload: Option<String>, problem: Problem| {
            Outcome::NotInjected(InjectError {
                source_name: source_name.to_owned(),
                document: chunk.number,
                workload,
                problem,
            })
        };
        let mut doc = match doc {
            Ok(doc) => doc,
            Err(problem) => {
                out.push_str(chunk.raw);
                reports.push(Report {
                    workload: format!("document {}", chunk.number),
                    outcome: fail(None, problem),
                });
                continue;
            }
        };
        let Some((template, template_name)) = pod_template_path(&doc) else {
            out.push_str(chunk.raw);
            continue;
        };
        let workload = Workload::of(&doc);
        let namespace = workload
            .namespace
            .as_deref()
            .and_then(|ns| Some((ns, *namespaces.get(ns)?)));
        let outcome = match lookup_mut(&mut doc, template) {
            None => fail(
                Some(workload.to_string()),
                Problem::Shape {
                    path: template_name,
                    expected: "a mapping",
                },
            ),
            Some(pod) => {
                // A bare Pod is named like the webhook names it; a
                // template after its workload.
                let name = if template.is_empty() {
                    pod_workload_name(pod)
                } else {
                    workload.name.clone()
                };
                match inject_pod(pod, name.as_deref(), namespace, options) {
                    Ok(PodOutcome::Injected) => Outcome::Injected,
                    Ok(PodOutcome::AlreadyInjected) => Outcome::AlreadyInjected,
                    Ok(PodOutcome::Disabled(why)) => Outcome::Disabled(why),
                    Err(problem) => fail(Some(workload.to_string()), problem),
                }
            }
        };
        match &outcome {
            Outcome::Injected => match serde_yaml::to_string(&doc) {
                Ok(yaml) => {
                    if chunk.separated {
                        out.push_str("---\n");
                    }
                    out.push_str(&yaml);
                }
                Err(e) => {
                    out.push_str(chunk.raw);
                    reports.push(Report {
                        workload: workload.kubectl_name(),
                        outcome: fail(Some(workload.to_string()), yaml_problem(&e, None)),
                    });
                    continue;
                }
            },
            _ => out.push_str(chunk.raw),
        }
        reports.push(Report {
            workload: workload.kubectl_name(),
            outcome,
        });
    }
    Injected { text: out, reports }
}

/// `meshlet.dev/inject` of every Namespace in the file (annotation, else
/// label): `enabled` or `disabled`; other values are ignored.
fn namespace_settings<'a>(docs: impl Iterator<Item = &'a Value>) -> BTreeMap<String, bool> {
    docs.filter(|doc| doc.get("kind").and_then(Value::as_str) == Some("Namespace"))
        .filter_map(|doc| {
            let metadata = doc.get("metadata")?;
            let name = metadata.get("name")?.as_str()?;
            let enabled = annotations::inject_setting(metadata).ok()??;
            Some((name.to_owned(), enabled))
        })
        .collect()
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

/// A workload's kind, name and namespace, for errors (`Deployment
/// orders`), reports (`deployment/orders`), the service name's fallback
/// and its Namespace's setting.
struct Workload {
    kind: String,
    name: Option<String>,
    namespace: Option<String>,
}

impl Workload {
    fn of(doc: &Value) -> Self {
        let text = |key: &str| {
            doc.get("metadata")
                .and_then(|m| m.get(key))
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
        };
        Workload {
            kind: doc
                .get("kind")
                .and_then(Value::as_str)
                .unwrap_or("?")
                .to_owned(),
            name: text("name"),
            namespace: text("namespace"),
        }
    }

    fn shown_name(&self) -> &str {
        self.name.as_deref().unwrap_or("<unnamed>")
    }

    fn kubectl_name(&self) -> String {
        format!("{}/{}", self.kind.to_ascii_lowercase(), self.shown_name())
    }
}

impl std::fmt::Display for Workload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.kind, self.shown_name())
    }
}

fn lookup_mut<'a>(mut value: &'a mut Value, path: &[&str]) -> Option<&'a mut Value> {
    for key in path {
        value = value.get_mut(*key)?;
    }
    value.is_mapping().then_some(value)
}

#[cfg(test)]
mod tests;
