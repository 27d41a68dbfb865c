//! meshctl's commands for applied resources: `apply` (with warnings for
//! policies whose target service is not registered yet), `get KIND [NAME]`,
//! `describe KIND NAME`, `delete`, `diff`, `history` and `rollback`.
//!
//! Data flow: kinds typed on the command line are resolved by
//! [`resolve_kind`] (any case, singular, plural or a short name); resource
//! lists come from `GET /api/v1/resources/info` (each resource with the
//! revision that last changed it) and are filtered here; changes go to
//! the control plane's `delete`, `diff` and `rollback` routes, which do the
//! validation and planning; this module only formats.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, UNIX_EPOCH};

use meshlet_api::changes::{
    self, ChangeStamp, DeleteAction, DeleteReply, DeleteRequest, DiffReply, ResourceInfo,
    RollbackReply, RollbackRequest, WouldRefuseRate,
};
use meshlet_api::display::{service_display, summary, target};
use meshlet_api::mesh::{
    paths, ApplyAction, ApplyFile, ApplyReply, ApplyRequest, RevisionRecord, ServiceSummary,
};
use meshlet_api::{Resource, ResourceKey};

use crate::client::ControlPlane;
use crate::error::CommandError;
use crate::output::{age, emit, now_ms, structured, table, Format};
use crate::validate::read_files;

/// What a kind argument names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KindArg {
    /// The registry's view of services (`get services` keeps its table).
    Services,
    /// The endpoints of one service.
    Endpoints,
    /// The control plane's replicas (`--store etcd`).
    Replicas,
    /// An applied resource kind (its canonical name, e.g. `RateLimitPolicy`).
    Resource(&'static str),
}

/// Canonical kind, plural, short name.
const KINDS: &[(&str, &str, &str)] = &[
    ("HealthCheckPolicy", "healthcheckpolicies", "hcp"),
    ("RateLimitPolicy", "ratelimitpolicies", "rlp"),
    ("CircuitBreakerPolicy", "circuitbreakerpolicies", "cbp"),
    ("RetryPolicy", "retrypolicies", "rp"),
    ("TimeoutPolicy", "timeoutpolicies", "tp"),
    ("TrafficSplit", "trafficsplits", "ts"),
    ("TracingPolicy", "tracingpolicies", "trp"),
    ("MTLSPolicy", "mtlspolicies", "mtls"),
    ("AuthorizationPolicy", "authorizationpolicies", "ap"),
    ("Route", "routes", "rt"),
    ("FaultInjectionPolicy", "faultinjectionpolicies", "fip"),
];

/// Resolves `ratelimitpolicy`, `RateLimitPolicies`, `rlp`, ... (any case).
pub fn resolve_kind(arg: &str) -> Result<KindArg, CommandError> {
    let lower = arg.to_ascii_lowercase();
    match lower.as_str() {
        "service" | "services" | "svc" => return Ok(KindArg::Services),
        "endpoint" | "endpoints" | "ep" => return Ok(KindArg::Endpoints),
        "replica" | "replicas" => return Ok(KindArg::Replicas),
        _ => {}
    }
    KINDS
        .iter()
        .find(|(kind, plural, short)| {
            kind.eq_ignore_ascii_case(&lower) || *plural == lower || *short == lower
        })
        .map(|(kind, _, _)| KindArg::Resource(kind))
        .ok_or_else(|| {
            CommandError::Usage(format!(
                "unknown kind {arg:?}: use services, endpoints, replicas, healthcheckpolicies (hcp), \
                 ratelimitpolicies (rlp), circuitbreakerpolicies (cbp), retrypolicies (rp), \
                 timeoutpolicies (tp), trafficsplits (ts), tracingpolicies (trp), \
                 mtlspolicies (mtls), authorizationpolicies (ap), routes (rt) or \
                 faultinjectionpolicies (fip)"
            ))
        })
}

/// A name argument: `name`, or `name.namespace`; `-n` otherwise, then
/// `default`.
fn name_and_namespace(arg: &str, namespace: Option<&str>) -> (String, String) {
    match arg.split_once('.') {
        Some((name, ns)) => (name.to_owned(), ns.to_owned()),
        None => (arg.to_owned(), namespace.unwrap_or("default").to_owned()),
    }
}

/// The header of the kind-specific summary column.
pub fn summary_header(kind: &str) -> &'static str {
    match kind {
        "HealthCheckPolicy" => "CHECK",
        "RateLimitPolicy" => "LIMIT",
        "CircuitBreakerPolicy" => "BREAKER",
        "RetryPolicy" => "RETRY",
        "TimeoutPolicy" => "TIMEOUTS",
        "TrafficSplit" => "SPLIT",
        "TracingPolicy" => "SAMPLING",
        "MTLSPolicy" => "MODE",
        "AuthorizationPolicy" => "RULES",
        "Route" => "ROUTES",
        "FaultInjectionPolicy" => "FAULTS",
        _ => "SUMMARY",
    }
}

/// `3m ago (2026-01-02 10:04:05 UTC)`.
pub fn when(at_ms: u64, now_ms: u64) -> String {
    let at = UNIX_EPOCH + Duration::from_millis(at_ms);
    let utc = humantime::format_rfc3339_seconds(at)
        .to_string()
        .replace('T', " ")
        .replace('Z', " UTC");
    format!(
        "{} ago ({utc})",
        age(Duration::from_millis(now_ms.saturating_sub(at_ms)))
    )
}

/// Resources as users write them: YAML documents separated by `---`
/// (re-appliable), or JSON (an object for one, an array otherwise).
fn print_resources(format: Format, resources: &[&Resource], single: bool) -> bool {
    match format {
        Format::Table => false,
        Format::Yaml => {
            let docs: Vec<String> = resources.iter().map(|r| r.to_yaml()).collect();
            emit(&docs.join("---\n"));
            true
        }
        Format::Json => {
            let text = if single && resources.len() == 1 {
                structured(Format::Json, resources[0])
            } else {
                structured(Format::Json, &resources)
            };
            emit(&text.unwrap_or_default());
            true
        }
    }
}

async fn resource_infos(cp: &ControlPlane) -> Result<Vec<ResourceInfo>, CommandError> {
    Ok(cp.get(changes::paths::RESOURCE_INFO).await?)
}

fn not_found(kind: &str, name: &str, namespace: &str) -> CommandError {
    let key = ResourceKey {
        kind: kind.to_owned(),
        namespace: namespace.to_owned(),
        name: name.to_owned(),
    };
    CommandError::Usage(format!("{key} not found"))
}

/// `meshctl get KIND [NAME]` for applied resource kinds. Without `-n` and
/// a name, every namespace is listed.
pub async fn get_resources(
    cp: &ControlPlane,
    kind: &str,
    name: Option<&str>,
    namespace: Option<&str>,
    format: Format,
) -> Result<bool, CommandError> {
    let infos = resource_infos(cp).await?;
    let wanted = name.map(|n| name_and_namespace(n, namespace));
    let selected: Vec<&ResourceInfo> = infos
        .iter()
        .filter(|i| i.resource.kind() == kind)
        .filter(|i| {
            let meta = i.resource.metadata();
            match (&wanted, namespace) {
                (Some((name, ns)), _) => &meta.name == name && &meta.namespace == ns,
                (None, Some(ns)) => meta.namespace == ns,
                (None, None) => true,
            }
        })
        .collect();
    if let Some((name, ns)) = &wanted {
        if selected.is_empty() {
            return Err(not_found(kind, name, ns));
        }
    }
    let resources: Vec<&Resource> = selected.iter().map(|i| &i.resource).collect();
    if print_resources(format, &resources, wanted.is_some()) {
        return Ok(true);
    }
    let now = now_ms();
    let rows: Vec<Vec<String>> = selected
        .iter()
        .map(|i| {
            let meta = i.resource.metadata();
            let (revision, changed) = match &i.last_change {
                Some(c) => (
                    c.revision.to_string(),
                    age(Duration::from_millis(now.saturating_sub(c.at_ms))),
                ),
                None => ("-".to_owned(), "-".to_owned()),
            };
            vec![
                meta.name.clone(),
                meta.namespace.clone(),
                target(&i.resource),
                summary(&i.resource),
                revision,
                changed,
            ]
        })
        .collect();
    emit(&table(
        &[
            "NAME",
            "NAMESPACE",
            "TARGET",
            summary_header(kind),
            "REVISION",
            "CHANGED",
        ],
        &rows,
    ));
    Ok(true)
}

/// The text of `meshctl describe KIND NAME`.
pub fn describe_resource_text(info: &ResourceInfo, now_ms: u64) -> String {
    let r = &info.resource;
    let meta = r.metadata();
    let changed = match &info.last_change {
        Some(ChangeStamp {
            revision,
            at_ms,
            actor,
        }) => format!("revision {revision}, {} by {actor}", when(*at_ms, now_ms)),
        None => "<not recorded>".to_owned(),
    };
    let would_refuse = match &info.would_refuse {
        Some(rate) => format!("Would refuse:  {}\n", would_refuse_text(rate)),
        None => String::new(),
    };
    format!(
        "Kind:          {}\nName:          {}\nNamespace:     {}\nTarget:        {}\nSummary:       {}\nLast changed:  {changed}\n{would_refuse}\n{}",
        r.kind(),
        meta.name,
        meta.namespace,
        target(r),
        summary(r),
        r.to_yaml()
    )
}

/// `12.3/s over the last minute, 740 in the last 5m` (a dry-run policy's
/// would-refuse rate, from the sidecars' stats reports).
pub fn would_refuse_text(rate: &WouldRefuseRate) -> String {
    let total = WouldRefuseRate::TOTAL_WINDOW_SECS;
    let full = WouldRefuseRate::RATE_WINDOW_SECS as f64;
    // The rate is over what the reports cover: less than the full window
    // right after the policy or its sidecars started.
    let covered = match rate.rate_window_secs {
        secs if secs <= 0.0 || secs >= full - 0.5 => full,
        secs => secs,
    };
    let window = if covered == 60.0 {
        "the last minute".to_owned()
    } else if covered >= 10.0 {
        // Whole seconds: the rate times the window is still the count
        // within 5 %. Below 10 s a rounded second would be up to a third
        // off (1.5 s shown as 1s or 2s).
        format!("the last {covered:.0}s")
    } else {
        format!("the last {covered:.1}s")
    };
    format!(
        "{:.1}/s over {window}, {} in the last {}m",
        rate.per_second,
        rate.total,
        total / 60
    )
}

/// `meshctl describe KIND NAME` for applied resource kinds.
pub async fn describe_resource(
    cp: &ControlPlane,
    kind: &str,
    name: &str,
    namespace: Option<&str>,
    format: Format,
) -> Result<bool, CommandError> {
    let (name, ns) = name_and_namespace(name, namespace);
    let infos = resource_infos(cp).await?;
    let info = infos
        .iter()
        .find(|i| {
            let meta = i.resource.metadata();
            i.resource.kind() == kind && meta.name == name && meta.namespace == ns
        })
        .ok_or_else(|| not_found(kind, &name, &ns))?;
    if !print_resources(format, &[&info.resource], true) {
        emit(&describe_resource_text(info, now_ms()));
    }
    Ok(true)
}

fn apply_files(path: &Path) -> Result<Vec<ApplyFile>, CommandError> {
    Ok(read_files(path)?
        .into_iter()
        .map(|f| ApplyFile {
            name: f.name,
            text: f.text,
        })
        .collect())
}

/// `meshctl apply -f FILE|DIR|-`.
pub async fn apply(cp: &ControlPlane, path: &Path) -> Result<bool, CommandError> {
    let request = ApplyRequest {
        files: apply_files(path)?,
        // The server records the token's name as the actor.
        actor: None,
    };
    let reply: ApplyReply = cp.post(paths::APPLY, &request).await?;
    for outcome in &reply.outcomes {
        emit(&format!("{} {}\n", outcome.key, outcome.action));
    }
    // Policies may name services that register later; say so, but the
    // apply stands. A failure to list services only skips the warnings.
    if let Ok(services) = cp.get::<Vec<ServiceSummary>>(paths::SERVICES).await {
        for warning in target_warnings(&request.files, &services) {
            eprintln!("{warning}");
        }
    }
    Ok(true)
}

fn print_deleted(reply: &DeleteReply) {
    for outcome in &reply.outcomes {
        if outcome.action == DeleteAction::Deleted {
            emit(&format!("{} deleted\n", outcome.key));
        }
    }
}

/// `meshctl delete -f FILE|DIR|-`: the resources the files define, in one
/// revision; nothing if any is missing (unless `ignore_not_found`).
pub async fn delete_files(
    cp: &ControlPlane,
    path: &Path,
    ignore_not_found: bool,
) -> Result<bool, CommandError> {
    let request = DeleteRequest {
        files: apply_files(path)?,
        keys: Vec::new(),
        // The server records the token's name as the actor.
        actor: None,
        ignore_not_found,
    };
    let reply: DeleteReply = cp.post(changes::paths::DELETE, &request).await?;
    print_deleted(&reply);
    Ok(true)
}

/// `meshctl delete KIND NAME...`.
pub async fn delete_names(
    cp: &ControlPlane,
    kind: &str,
    names: &[String],
    namespace: Option<&str>,
    ignore_not_found: bool,
) -> Result<bool, CommandError> {
    let keys = names
        .iter()
        .map(|n| {
            let (name, namespace) = name_and_namespace(n, namespace);
            ResourceKey {
                kind: kind.to_owned(),
                namespace,
                name,
            }
        })
        .collect();
    let request = DeleteRequest {
        files: Vec::new(),
        keys,
        // The server records the token's name as the actor.
        actor: None,
        ignore_not_found,
    };
    let reply: DeleteReply = cp.post(changes::paths::DELETE, &request).await?;
    print_deleted(&reply);
    Ok(true)
}

/// The text of `meshctl diff`: per resource `key action`, and the diff
/// lines (indented) of created and configured ones.
pub fn diff_text(reply: &DiffReply) -> String {
    let mut out = String::new();
    for outcome in &reply.outcomes {
        out.push_str(&format!("{} {}\n", outcome.key, outcome.action));
        if let Some(diff) = &outcome.diff {
            for line in diff.lines() {
                out.push_str("    ");
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

/// `meshctl diff -f`: `Ok(true)` when an apply would change something.
pub async fn diff(cp: &ControlPlane, path: &Path) -> Result<bool, CommandError> {
    let request = ApplyRequest {
        files: apply_files(path)?,
        actor: None,
    };
    let reply: DiffReply = cp.post(changes::paths::DIFF, &request).await?;
    emit(&diff_text(&reply));
    Ok(reply
        .outcomes
        .iter()
        .any(|o| o.action != ApplyAction::Unchanged))
}

/// The `meshctl history` table: one row per change line.
pub fn history_table(records: &[RevisionRecord], now_ms: u64) -> String {
    let mut rows = Vec::new();
    for record in records {
        let mut lines = record.changes.iter();
        let first = lines.next().cloned().unwrap_or_default();
        rows.push(vec![
            record.revision.to_string(),
            when(record.at_ms, now_ms),
            record.actor.clone(),
            first,
        ]);
        for line in lines {
            rows.push(vec![
                String::new(),
                String::new(),
                String::new(),
                line.clone(),
            ]);
        }
    }
    table(&["REVISION", "WHEN", "WHO", "WHAT CHANGED"], &rows)
}

/// `meshctl history`.
pub async fn history(
    cp: &ControlPlane,
    limit: usize,
    resources_only: bool,
    format: Format,
) -> Result<bool, CommandError> {
    let path = format!(
        "{}?limit={limit}&resourcesOnly={resources_only}",
        paths::REVISIONS
    );
    let records: Vec<RevisionRecord> = cp.get(&path).await?;
    if let Some(text) = structured(format, &records) {
        emit(&text);
    } else {
        emit(&history_table(&records, now_ms()));
    }
    Ok(true)
}

/// `meshctl rollback REVISION`.
pub async fn rollback(cp: &ControlPlane, revision: u64) -> Result<bool, CommandError> {
    let request = RollbackRequest {
        revision,
        // The server records the token's name as the actor.
        actor: None,
    };
    let reply: RollbackReply = cp.post(changes::paths::ROLLBACK, &request).await?;
    if !reply.rolled_back {
        emit("nothing to roll back\n");
        return Ok(true);
    }
    let mut out = format!(
        "rolled back to revision {revision} as revision {}\n",
        reply.revision
    );
    for line in &reply.changes {
        out.push_str(&format!("  {line}\n"));
    }
    emit(&out);
    Ok(true)
}

/// Warnings for applied policies whose target service is not known to the
/// control plane yet, and for routes naming an unknown gateway, backend or
/// mirror service (accepted: services may register later).
pub fn target_warnings(files: &[ApplyFile], services: &[ServiceSummary]) -> Vec<String> {
    let known: BTreeSet<(&str, &str)> = services
        .iter()
        .map(|s| (s.namespace.as_str(), s.name.as_str()))
        .collect();
    let mut missing = BTreeSet::new();
    let mut route_refs = BTreeSet::new();
    for file in files {
        let Ok(resources) = meshlet_api::parse_documents(&file.name, &file.text) else {
            continue;
        };
        for resource in &resources {
            if let Some((ns, name)) = resource.target() {
                if !known.contains(&(ns, name)) {
                    missing.insert(service_display(ns, name));
                }
            }
            if let Resource::Route(route) = resource {
                let ns = route.metadata.namespace.as_str();
                for reference in route.spec.references() {
                    if !known.contains(&(ns, reference.service)) {
                        route_refs.insert((
                            resource.key().to_string(),
                            reference.role,
                            service_display(ns, reference.service),
                        ));
                    }
                }
            }
        }
    }
    let targets = missing
        .into_iter()
        .map(|s| format!("warning: no service {s} is registered yet"));
    let routes = route_refs.into_iter().map(|(route, role, service)| {
        format!("warning: {route}: {role} {service} names no known service yet")
    });
    targets.chain(routes).collect()
}

#[cfg(test)]
mod would_refuse_tests {
    use super::*;

    #[test]
    fn describe_shows_a_dry_run_policys_would_refuse_rate() {
        let resource = meshlet_api::parse_documents(
            "f.yaml",
            "apiVersion: meshlet.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {name: limit}\n\
             spec:\n  targetRef: {service: orders}\n  tokenBucket: {capacity: 1, refillPerSecond: 1}\n  mode: dryRun\n",
        )
        .unwrap()
        .remove(0);
        let mut info = ResourceInfo {
            resource,
            last_change: None,
            would_refuse: None,
        };
        for (per_second, rate_window_secs, total, shown) in [
            (
                12.34,
                60.0,
                740,
                "12.3/s over the last minute, 740 in the last 5m",
            ),
            // Right after the start, the rate is over what the reports cover.
            (2.0, 10.0, 20, "2.0/s over the last 10s, 20 in the last 5m"),
            // Within the first seconds the window keeps a decimal: 14.3/s
            // over "1s" would say 14 were refused instead of 20.
            (
                20.0 / 1.4,
                1.4,
                20,
                "14.3/s over the last 1.4s, 20 in the last 5m",
            ),
        ] {
            info.would_refuse = Some(WouldRefuseRate {
                per_second,
                rate_window_secs,
                total,
            });
            let text = describe_resource_text(&info, 0);
            assert!(
                text.contains(&format!("\nWould refuse:  {shown}\n")),
                "{text}"
            );
            assert!(text.contains("dry run"), "{text}");
        }
        info.would_refuse = None;
        assert!(!describe_resource_text(&info, 0).contains("Would refuse"));
    }
}
