//! meshctl's commands about services and their instances: `get services`,
//! `get endpoints`, `describe service` and `broadcast` (the commands about
//! applied resources are in [`crate::resources`]). Each fetches through
//! [`ControlPlane`], formats with [`crate::output`] and returns whether it
//! fully succeeded; failures that stop a command are [`CommandError`]s.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, Method, Request};
use http_body_util::Full;
use meshlet_api::display::{labels, service_display, summary};
use meshlet_api::mesh::{paths, EndpointEntry, ServiceDetail, ServiceSummary};
use serde::Serialize;

use crate::client::{plain_client, ClientError, ControlPlane, CONNECT_TIMEOUT};
use crate::error::CommandError;
use crate::output::{age, emit, now_ms, structured, table, Format};

/// A service named on the command line: `name`, `name.namespace`, or
/// `name` with `-n namespace`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceRef {
    pub name: String,
    pub namespace: String,
}

impl ServiceRef {
    pub fn parse(arg: &str, namespace: Option<&str>) -> ServiceRef {
        match (arg.split_once('.'), namespace) {
            (Some((name, ns)), _) => ServiceRef {
                name: name.to_owned(),
                namespace: ns.to_owned(),
            },
            (None, ns) => ServiceRef {
                name: arg.to_owned(),
                namespace: ns.unwrap_or("default").to_owned(),
            },
        }
    }

    /// As users write it: `orders`, or `orders.shop` outside `default`.
    pub fn display(&self) -> String {
        service_display(&self.namespace, &self.name)
    }
}

fn print_structured<T: Serialize>(format: Format, value: &T) -> bool {
    match structured(format, value) {
        Some(text) => {
            emit(&text);
            true
        }
        None => false,
    }
}

async fn service_detail(
    cp: &ControlPlane,
    service: &ServiceRef,
) -> Result<ServiceDetail, CommandError> {
    let path = format!("{}/{}/{}", paths::SERVICES, service.namespace, service.name);
    cp.get(&path).await.map_err(|err| match err {
        ClientError::Api { status, .. } if status == http::StatusCode::NOT_FOUND => {
            CommandError::ServiceNotFound(service.display())
        }
        other => other.into(),
    })
}

/// `meshctl get services [NAME] [-n NS]`: the registry's view, all
/// services (of one namespace with `-n`) or the one named.
pub async fn get_services(
    cp: &ControlPlane,
    name: Option<&str>,
    namespace: Option<&str>,
    format: Format,
) -> Result<bool, CommandError> {
    let services: Vec<ServiceSummary> = cp.get(paths::SERVICES).await?;
    let selected = match name {
        None => services
            .into_iter()
            .filter(|s| match namespace {
                Some(ns) => s.namespace == ns,
                None => true,
            })
            .collect(),
        Some(name) => {
            let wanted = ServiceRef::parse(name, namespace);
            let one: Vec<ServiceSummary> = services
                .into_iter()
                .filter(|s| s.name == wanted.name && s.namespace == wanted.namespace)
                .collect();
            if one.is_empty() {
                return Err(CommandError::ServiceNotFound(wanted.display()));
            }
            one
        }
    };
    print_services(selected, format);
    Ok(true)
}

/// The services table (or JSON/YAML).
fn print_services(services: Vec<ServiceSummary>, format: Format) {
    if print_structured(format, &services) {
        return;
    }
    let rows: Vec<Vec<String>> = services
        .iter()
        .map(|s| {
            vec![
                s.namespace.clone(),
                s.name.clone(),
                s.instances.to_string(),
                s.healthy.to_string(),
            ]
        })
        .collect();
    emit(&table(
        &["NAMESPACE", "NAME", "INSTANCES", "HEALTHY"],
        &rows,
    ));
}

/// All endpoints of a service: registered instances, then static ones.
fn endpoints_of(detail: &ServiceDetail) -> Vec<EndpointEntry> {
    let mut endpoints: Vec<EndpointEntry> = detail
        .instances
        .iter()
        .map(|i| EndpointEntry {
            address: i.address,
            labels: i.labels.clone(),
            healthy: i.healthy,
            instance_id: Some(i.id.clone()),
            identity: i.identity.clone(),
        })
        .collect();
    endpoints.extend(detail.static_endpoints.iter().cloned());
    endpoints
}

fn health_word(healthy: bool) -> String {
    if healthy { "healthy" } else { "unhealthy" }.to_owned()
}

/// `meshctl get endpoints SERVICE`.
pub async fn get_endpoints(
    cp: &ControlPlane,
    service: &ServiceRef,
    format: Format,
) -> Result<bool, CommandError> {
    let detail = service_detail(cp, service).await?;
    let endpoints = endpoints_of(&detail);
    if print_structured(format, &endpoints) {
        return Ok(true);
    }
    let rows: Vec<Vec<String>> = endpoints
        .iter()
        .map(|e| {
            vec![
                e.address.to_string(),
                health_word(e.healthy),
                e.instance_id.clone().unwrap_or_else(|| "<static>".into()),
                labels(&e.labels),
            ]
        })
        .collect();
    emit(&table(&["ADDRESS", "HEALTH", "INSTANCE", "LABELS"], &rows));
    Ok(true)
}

/// The text of `meshctl describe service`.
pub fn describe_text(detail: &ServiceDetail, now_ms: u64) -> String {
    let healthy = detail.instances.iter().filter(|i| i.healthy).count();
    let mut out = format!(
        "Name:        {}\nNamespace:   {}\nInstances:   {} ({healthy} healthy)\n",
        detail.name,
        detail.namespace,
        detail.instances.len()
    );
    if !detail.instances.is_empty() {
        let rows: Vec<Vec<String>> = detail
            .instances
            .iter()
            .map(|i| {
                vec![
                    i.id.clone(),
                    i.address.to_string(),
                    health_word(i.healthy),
                    age(Duration::from_millis(i.last_heartbeat_ms_ago)) + " ago",
                    age(Duration::from_millis(
                        now_ms.saturating_sub(i.registered_at_ms),
                    )),
                    labels(&i.labels),
                ]
            })
            .collect();
        out.push('\n');
        out.push_str(&table(
            &[
                "INSTANCE",
                "ADDRESS",
                "HEALTH",
                "LAST HEARTBEAT",
                "AGE",
                "LABELS",
            ],
            &rows,
        ));
    }
    if detail
        .instances
        .iter()
        .any(|i| i.identity.is_some() || i.certificate.is_some())
    {
        let dash = || "-".to_owned();
        let rows: Vec<Vec<String>> = detail
            .instances
            .iter()
            .map(|i| {
                let (serial, expires) = match &i.certificate {
                    Some(c) => (c.serial.clone(), crate::ca::expiry(c.not_after_ms, now_ms)),
                    None => (
                        dash(),
                        "not issued (since the control plane started)".to_owned(),
                    ),
                };
                vec![
                    i.id.clone(),
                    i.identity.clone().unwrap_or_else(dash),
                    serial,
                    expires,
                ]
            })
            .collect();
        out.push_str(
            "
Identities:
",
        );
        out.push_str(&table(
            &["INSTANCE", "IDENTITY", "CERTIFICATE SERIAL", "EXPIRY"],
            &rows,
        ));
    }
    if !detail.static_endpoints.is_empty() {
        let rows: Vec<Vec<String>> = detail
            .static_endpoints
            .iter()
            .map(|e| vec![e.address.to_string(), labels(&e.labels)])
            .collect();
        out.push_str("\nStatic endpoints:\n");
        out.push_str(&table(&["ADDRESS", "LABELS"], &rows));
    }
    out.push_str("\nPolicies:");
    if detail.policies.is_empty() {
        out.push_str(" <none>\n");
    } else {
        out.push('\n');
        let rows: Vec<Vec<String>> = detail
            .policies
            .iter()
            .map(|p| vec![format!("  {}", p.key()), summary(p)])
            .collect();
        // The table's header line is dropped: the section title names it.
        let text = table(&["", ""], &rows);
        out.push_str(text.split_once('\n').map_or("", |(_, rest)| rest));
    }
    out
}

/// `meshctl describe service NAME`.
pub async fn describe_service(
    cp: &ControlPlane,
    service: &ServiceRef,
    format: Format,
) -> Result<bool, CommandError> {
    let detail = service_detail(cp, service).await?;
    if !print_structured(format, &detail) {
        emit(&describe_text(&detail, now_ms()));
    }
    Ok(true)
}

/// Options of `meshctl broadcast`.
#[derive(Debug, Clone)]
pub struct Broadcast {
    pub path: String,
    /// The body, or `@file`.
    pub data: String,
    pub service: Option<ServiceRef>,
    pub method: Method,
    pub timeout: Duration,
}

/// One row of the broadcast table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub service: String,
    pub instance: String,
    pub address: String,
    pub status: String,
    pub latency: String,
    pub ok: bool,
}

fn read_data(data: &str) -> Result<Bytes, CommandError> {
    match data.strip_prefix('@') {
        Some("-") => {
            let mut buf = Vec::new();
            std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf).map_err(|source| {
                CommandError::Data {
                    path: "-".into(),
                    source,
                }
            })?;
            Ok(Bytes::from(buf))
        }
        Some(path) => std::fs::read(path)
            .map(Bytes::from)
            .map_err(|source| CommandError::Data {
                path: path.to_owned(),
                source,
            }),
        None => Ok(Bytes::from(data.to_owned())),
    }
}

/// `meshctl broadcast`: the same request to every healthy instance of every
/// (or one) service, at its registered address (its sidecar's inbound
/// listener), concurrently. Returns false if any delivery failed.
pub async fn broadcast(cp: &ControlPlane, opts: &Broadcast) -> Result<bool, CommandError> {
    if !opts.path.starts_with('/') {
        return Err(CommandError::Usage(format!(
            "--path {:?} must start with '/'",
            opts.path
        )));
    }
    let body = read_data(&opts.data)?;
    let services: Vec<ServiceRef> = match &opts.service {
        Some(service) => vec![service.clone()],
        None => cp
            .get::<Vec<ServiceSummary>>(paths::SERVICES)
            .await?
            .into_iter()
            .map(|s| ServiceRef {
                name: s.name,
                namespace: s.namespace,
            })
            .collect(),
    };
    let mut tasks = tokio::task::JoinSet::new();
    // Instances are reached at their registered address (the sidecar's
    // inbound listener) in plain HTTP, without the control plane's token.
    let client = plain_client(CONNECT_TIMEOUT.min(opts.timeout), opts.timeout);
    for service in &services {
        let detail = service_detail(cp, service).await?;
        for instance in detail.instances.into_iter().filter(|i| i.healthy) {
            let request = Request::builder()
                .method(opts.method.clone())
                .uri(&opts.path)
                .header(header::HOST, &service.name)
                .header(header::CONTENT_TYPE, "application/json")
                .header(header::USER_AGENT, "meshctl")
                .body(Full::new(body.clone()))
                .map_err(|e| CommandError::Usage(format!("invalid request: {e}")))?;
            let client = client.clone();
            let service = service.display();
            tasks.spawn(async move {
                let started = Instant::now();
                let address = instance.address.to_string();
                let result = client.fetch(&address, request).await;
                let latency = format!("{}ms", started.elapsed().as_millis());
                let (status, ok) = match result {
                    Ok(reply) => (reply.status.to_string(), reply.status.is_success()),
                    Err(err) => (err.cause(), false),
                };
                Delivery {
                    service,
                    instance: instance.id,
                    address,
                    status,
                    latency,
                    ok,
                }
            });
        }
    }
    if tasks.is_empty() {
        eprintln!("meshctl: no healthy instances to broadcast to");
        return Ok(false);
    }
    let mut deliveries = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        if let Ok(delivery) = joined {
            deliveries.push(delivery);
        }
    }
    deliveries.sort_by(|a, b| (&a.service, &a.instance).cmp(&(&b.service, &b.instance)));
    emit(&broadcast_table(&deliveries));
    Ok(deliveries.iter().all(|d| d.ok))
}

pub fn broadcast_table(deliveries: &[Delivery]) -> String {
    let rows: Vec<Vec<String>> = deliveries
        .iter()
        .map(|d| {
            vec![
                d.service.clone(),
                d.instance.clone(),
                d.address.clone(),
                d.status.clone(),
                d.latency.clone(),
            ]
        })
        .collect();
    table(
        &["SERVICE", "INSTANCE", "ADDRESS", "STATUS", "LATENCY"],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshlet_api::mesh::InstanceInfo;
    use std::collections::BTreeMap;

    #[test]
    fn service_refs() {
        assert_eq!(
            ServiceRef::parse("orders", None),
            ServiceRef {
                name: "orders".into(),
                namespace: "default".into()
            }
        );
        assert_eq!(ServiceRef::parse("orders.shop", None).namespace, "shop");
        assert_eq!(ServiceRef::parse("orders", Some("shop")).namespace, "shop");
        assert_eq!(
            ServiceRef::parse("orders.shop", None).display(),
            "orders.shop"
        );
        assert_eq!(ServiceRef::parse("orders", None).display(), "orders");
    }

    #[test]
    fn describe_lists_instances_and_policies() {
        let detail = ServiceDetail {
            name: "orders".into(),
            namespace: "default".into(),
            instances: vec![InstanceInfo {
                id: "orders-1".into(),
                address: ([127, 0, 0, 1], 8081).into(),
                labels: BTreeMap::from([("version".into(), "v1".into())]),
                healthy: false,
                registered_at_ms: 1_000,
                last_heartbeat_ms_ago: 1_500,
                identity: None,
                app_protocol: None,
                role: Default::default(),
                certificate: None,
            }],
            static_endpoints: vec![],
            policies: meshlet_api::parse_documents(
                "t",
                "apiVersion: meshlet.dev/v1alpha1\nkind: HealthCheckPolicy\nmetadata: {name: hc}\nspec: {targetRef: {service: orders}}\n",
            )
            .unwrap(),
        };
        let text = describe_text(&detail, 61_000);
        assert_eq!(
            text,
            "Name:        orders\n\
             Namespace:   default\n\
             Instances:   1 (0 healthy)\n\
             \n\
             INSTANCE   ADDRESS          HEALTH      LAST HEARTBEAT   AGE    LABELS\n\
             orders-1   127.0.0.1:8081   unhealthy   1s ago           1m0s   version=v1\n\
             \n\
             Policies:\n  healthcheckpolicy/hc   GET /health every 5s, timeout 1s\n"
        );
    }

    #[test]
    fn describe_shows_identities_and_certificate_expiry() {
        let instance = |id: &str, cert: Option<meshlet_api::mesh::IssuedLeaf>| InstanceInfo {
            id: id.into(),
            address: ([127, 0, 0, 1], 8081).into(),
            labels: BTreeMap::new(),
            healthy: true,
            registered_at_ms: 1_000,
            last_heartbeat_ms_ago: 1_000,
            identity: Some("spiffe://meshlet.local/ns/default/sa/orders".into()),
            app_protocol: None,
            role: Default::default(),
            certificate: cert,
        };
        let detail = ServiceDetail {
            name: "orders".into(),
            namespace: "default".into(),
            instances: vec![
                instance(
                    "orders-1",
                    Some(meshlet_api::mesh::IssuedLeaf {
                        serial: "4f00aa".into(),
                        not_after_ms: 61_000 + 86_340_000,
                        root: "00ff".into(),
                    }),
                ),
                instance("orders-2", None),
            ],
            static_endpoints: vec![],
            policies: vec![],
        };
        let text = describe_text(&detail, 61_000);
        let section = text.split_once("Identities:\n").unwrap().1;
        let lines: Vec<&str> = section.lines().collect();
        assert!(lines[0].starts_with("INSTANCE   IDENTITY"), "{text}");
        assert!(
            lines[1].contains("spiffe://meshlet.local/ns/default/sa/orders"),
            "{text}"
        );
        assert!(
            lines[1].contains("4f00aa") && lines[1].ends_with("expires in 23h 59m"),
            "{text}"
        );
        assert!(
            lines[2].contains("orders-2") && lines[2].contains("not issued"),
            "{text}"
        );
    }

    #[test]
    fn broadcast_rows() {
        let d = Delivery {
            service: "orders".into(),
            instance: "o1".into(),
            address: "127.0.0.1:1".into(),
            status: "connection refused".into(),
            latency: "0ms".into(),
            ok: false,
        };
        assert_eq!(
            broadcast_table(&[d]),
            "SERVICE   INSTANCE   ADDRESS       STATUS               LATENCY\n\
             orders    o1         127.0.0.1:1   connection refused   0ms\n"
        );
    }
}
