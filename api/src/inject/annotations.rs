//! The annotations that steer injection, read from a pod template's
//! `metadata` (and `meshlet.dev/inject` also from a Namespace's), each
//! checked when read: a bad value is a [`Problem::Annotation`] naming the
//! key, the value and what was expected, and the workload is left as it is.
//!
//! | annotation | value | effect |
//! |---|---|---|
//! | `meshlet.dev/inject` | `enabled` \| `disabled` | injected or not (a pod template's wins over its Namespace's; also read as a label) |
//! | `meshlet.dev/service` | a DNS-1123 label | the service name when no `app.kubernetes.io/name`/`app` label names it |
//! | `meshlet.dev/app-port` | 1-65535 | the app's port when no container declares one |
//! | `meshlet.dev/proxy-cpu-request`, `-memory-request`, `-cpu-limit`, `-memory-limit` | a Kubernetes quantity | the proxy's resources (defaults 50m, 32Mi, 1, 128Mi) |
//! | `meshlet.dev/skip-inbound-ports` | `22,9100` | inbound ports iptables leaves alone |
//! | `meshlet.dev/skip-outbound-ports` | `5432` | outbound destination ports iptables leaves alone |
//! | `meshlet.dev/log-level` | `error` \| `warn` \| `info` \| `debug` \| `trace` | the proxy's `RUST_LOG` |

use std::sync::OnceLock;

use serde_yaml::Value;

use super::model::Problem;

pub const INJECT: &str = "meshlet.dev/inject";
pub const SERVICE: &str = "meshlet.dev/service";
pub const APP_PORT: &str = "meshlet.dev/app-port";
pub const PROXY_CPU_REQUEST: &str = "meshlet.dev/proxy-cpu-request";
pub const PROXY_MEMORY_REQUEST: &str = "meshlet.dev/proxy-memory-request";
pub const PROXY_CPU_LIMIT: &str = "meshlet.dev/proxy-cpu-limit";
pub const PROXY_MEMORY_LIMIT: &str = "meshlet.dev/proxy-memory-limit";
pub const SKIP_INBOUND_PORTS: &str = "meshlet.dev/skip-inbound-ports";
pub const SKIP_OUTBOUND_PORTS: &str = "meshlet.dev/skip-outbound-ports";
pub const LOG_LEVEL: &str = "meshlet.dev/log-level";

/// The proxy's resources when no annotation says otherwise.
pub const DEFAULT_CPU_REQUEST: &str = "50m";
pub const DEFAULT_MEMORY_REQUEST: &str = "32Mi";
pub const DEFAULT_CPU_LIMIT: &str = "1";
pub const DEFAULT_MEMORY_LIMIT: &str = "128Mi";

/// What the annotations of one pod template ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overrides {
    pub service: Option<String>,
    pub app_port: Option<u16>,
    pub cpu_request: String,
    pub memory_request: String,
    pub cpu_limit: String,
    pub memory_limit: String,
    pub skip_inbound_ports: Vec<u16>,
    pub skip_outbound_ports: Vec<u16>,
    pub log_level: Option<String>,
}

/// A string annotation of `metadata`.
fn annotation<'a>(metadata: Option<&'a Value>, key: &str) -> Option<&'a str> {
    metadata?.get("annotations")?.get(key)?.as_str()
}

fn bad(key: &'static str, value: &str, expected: &'static str) -> Problem {
    Problem::Annotation {
        key,
        value: value.to_owned(),
        expected,
    }
}

/// `meshlet.dev/inject` of an object's `metadata` (annotation, else label):
/// `Some(true)` enabled, `Some(false)` disabled, `None` unset.
pub fn inject_setting(metadata: &Value) -> Result<Option<bool>, Problem> {
    let value = annotation(Some(metadata), INJECT).or_else(|| {
        metadata
            .get("labels")
            .and_then(|l| l.get(INJECT))
            .and_then(Value::as_str)
    });
    match value {
        None => Ok(None),
        Some("enabled") => Ok(Some(true)),
        Some("disabled") => Ok(Some(false)),
        Some(other) => Err(bad(INJECT, other, "`enabled` or `disabled`")),
    }
}

impl Overrides {
    /// Reads and checks the annotations of a pod template's `metadata`.
    pub fn read(metadata: Option<&Value>) -> Result<Overrides, Problem> {
        let get = |key| annotation(metadata, key);
        let quantity = |key: &'static str, default: &str| -> Result<String, Problem> {
            match get(key) {
                None => Ok(default.to_owned()),
                Some(value) if is_quantity(value) => Ok(value.to_owned()),
                Some(value) => Err(bad(
                    key,
                    value,
                    "a Kubernetes quantity such as 100m, 0.5, 64Mi or 1G",
                )),
            }
        };
        let service = match get(SERVICE) {
            None => None,
            Some(value) => {
                crate::limits::check_dns_label(value).map_err(|_| {
                    bad(
                        SERVICE,
                        value,
                        "a DNS-1123 label (1-63 lower-case letters, digits or '-')",
                    )
                })?;
                Some(value.to_owned())
            }
        };
        let app_port = match get(APP_PORT) {
            None => None,
            Some(value) => Some(port(value).ok_or_else(|| bad(APP_PORT, value, "a port 1-65535"))?),
        };
        let log_level = match get(LOG_LEVEL) {
            None => None,
            Some(value @ ("error" | "warn" | "info" | "debug" | "trace")) => Some(value.to_owned()),
            Some(value) => {
                return Err(bad(
                    LOG_LEVEL,
                    value,
                    "one of error, warn, info, debug, trace",
                ))
            }
        };
        Ok(Overrides {
            service,
            app_port,
            cpu_request: quantity(PROXY_CPU_REQUEST, DEFAULT_CPU_REQUEST)?,
            memory_request: quantity(PROXY_MEMORY_REQUEST, DEFAULT_MEMORY_REQUEST)?,
            cpu_limit: quantity(PROXY_CPU_LIMIT, DEFAULT_CPU_LIMIT)?,
            memory_limit: quantity(PROXY_MEMORY_LIMIT, DEFAULT_MEMORY_LIMIT)?,
            skip_inbound_ports: ports(SKIP_INBOUND_PORTS, get(SKIP_INBOUND_PORTS))?,
            skip_outbound_ports: ports(SKIP_OUTBOUND_PORTS, get(SKIP_OUTBOUND_PORTS))?,
            log_level,
        })
    }
}

fn port(text: &str) -> Option<u16> {
    text.trim().parse::<u16>().ok().filter(|p| *p != 0)
}

/// `22, 9100` → `[22, 9100]`; empty → none.
fn ports(key: &'static str, value: Option<&str>) -> Result<Vec<u16>, Problem> {
    let Some(value) = value else {
        return Ok(Vec::new());
    };
    if value.trim().is_empty() {
        return Ok(Vec::new());
    }
    value
        .split(',')
        .map(|p| port(p).ok_or_else(|| bad(key, value, "comma-separated ports 1-65535")))
        .collect()
}

/// Kubernetes' quantity syntax (a number, optional exponent or suffix).
fn is_quantity(value: &str) -> bool {
    static QUANTITY: OnceLock<regex::Regex> = OnceLock::new();
    QUANTITY
        .get_or_init(|| {
            regex::Regex::new(
                r"^\+?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+|[numkMGTPE]|Ki|Mi|Gi|Ti|Pi|Ei)?$",
            )
            .expect("the quantity pattern compiles")
        })
        .is_match(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metadata(yaml: &str) -> Value {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn defaults_without_annotations() {
        let o = Overrides::read(None).unwrap();
        assert_eq!(
            (o.cpu_request.as_str(), o.memory_limit.as_str()),
            ("50m", "128Mi")
        );
        assert!(o.skip_inbound_ports.is_empty() && o.log_level.is_none());
    }

    #[test]
    fn every_annotation_is_read_and_checked() {
        let m = metadata(
            "annotations: {meshlet.dev/proxy-cpu-request: 100m, meshlet.dev/proxy-memory-limit: 1Gi, \
             meshlet.dev/skip-inbound-ports: '22, 9100', meshlet.dev/skip-outbound-ports: '5432', \
             meshlet.dev/log-level: debug, meshlet.dev/service: billing, meshlet.dev/app-port: '8443'}",
        );
        let o = Overrides::read(Some(&m)).unwrap();
        assert_eq!(o.cpu_request, "100m");
        assert_eq!(o.memory_limit, "1Gi");
        assert_eq!(o.skip_inbound_ports, [22, 9100]);
        assert_eq!(o.skip_outbound_ports, [5432]);
        assert_eq!(o.log_level.as_deref(), Some("debug"));
        assert_eq!(o.service.as_deref(), Some("billing"));
        assert_eq!(o.app_port, Some(8443));
        for (key, value) in [
            (PROXY_CPU_LIMIT, "lots"),
            (SKIP_INBOUND_PORTS, "22,x"),
            (SKIP_OUTBOUND_PORTS, "70000"),
            (LOG_LEVEL, "verbose"),
            (SERVICE, "Billing.svc"),
            (APP_PORT, "0"),
        ] {
            let m = metadata(&format!("annotations: {{{key}: '{value}'}}"));
            let err = Overrides::read(Some(&m)).unwrap_err();
            assert!(
                matches!(&err, Problem::Annotation { key: k, value: v, .. } if *k == key && v == value),
                "{err}"
            );
        }
    }

    #[test]
    fn inject_setting_from_annotation_or_label() {
        assert_eq!(inject_setting(&metadata("name: x")), Ok(None));
        assert_eq!(
            inject_setting(&metadata("annotations: {meshlet.dev/inject: disabled}")),
            Ok(Some(false))
        );
        assert_eq!(
            inject_setting(&metadata("labels: {meshlet.dev/inject: enabled}")),
            Ok(Some(true))
        );
        assert!(inject_setting(&metadata("annotations: {meshlet.dev/inject: 'yes'}")).is_err());
    }

    #[test]
    fn quantities() {
        for good in ["1", "0.5", "100m", "64Mi", "1G", "1e3", ".5", "+2"] {
            assert!(is_quantity(good), "{good}");
        }
        for bad in ["", "1 Gi", "Mi", "1MiB", "-1", "1..2"] {
            assert!(!is_quantity(bad), "{bad}");
        }
    }
}
