//! Live request taps (`meshctl tap`, issue 19): which requests a tap
//! selects ([`TapFilter`]), what the control plane pushes to sidecars
//! ([`TapDirective`]), what a sidecar sends back ([`TapBatch`] of
//! [`TapEvent`]s) and what meshctl reads ([`TapLine`]).
//!
//! Data flow (see the README's "meshctl tap" and ARCHITECTURE.md):
//!
//! ```text
//! meshctl ── GET /api/v1/tap?service=…&path=…  (admin, viewer) ─► control plane: a tap session
//! control plane ── WatchEvent::Taps {all live directives} ─► watch streams that sent x-meshlet-watch-taps
//! matching sidecar: each completed request ─► filter ─► bounded queue ─► POST /api/v1/tap/{id}/events
//! control plane ─► the session's bounded queue ─► NDJSON TapLines ─► meshctl
//! ```
//!
//! A tap ends when meshctl goes away (or `max` events were sent): the
//! session is dropped, the next `Taps` event leaves it out, and a sidecar
//! still posting gets 404 and stops.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub mod paths {
    /// `GET` with [`super::TapQuery`]: the NDJSON stream of [`super::TapLine`]s.
    pub const TAP: &str = "/api/v1/tap";

    /// `POST` a [`super::TapBatch`] (sidecar tokens, for their own service).
    pub fn events(tap_id: &str) -> String {
        format!("{TAP}/{tap_id}/events")
    }
}

/// The watch request header with which a sidecar asks for `Taps` events.
pub const WATCH_TAPS_HEADER: &str = "x-meshlet-watch-taps";

/// What replaces a header value for a viewer.
pub const REDACTED: &str = "<redacted>";

/// Which sidecars and which of their requests a tap selects.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TapFilter {
    pub namespace: String,
    /// Sidecars of this service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Sidecars of this workload: label `app`, `app.kubernetes.io/name` or
    /// `meshlet.dev/workload` equal to it, or (a local sidecar without
    /// labels) the service name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deploy: Option<String>,
    /// Requests whose path starts with this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    /// Requests with this method (upper case).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// Responses with this status (`503`) or class (`5xx`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<StatusFilter>,
}

impl TapFilter {
    /// Whether a sidecar of `namespace/service` with `labels` is tapped.
    pub fn selects_sidecar(
        &self,
        namespace: &str,
        service: &str,
        labels: &BTreeMap<String, String>,
    ) -> bool {
        if namespace != self.namespace {
            return false;
        }
        if let Some(wanted) = &self.service {
            if wanted != service {
                return false;
            }
        }
        if let Some(deploy) = &self.deploy {
            let by_label = ["app", "app.kubernetes.io/name", "meshlet.dev/workload"]
                .iter()
                .any(|key| labels.get(*key) == Some(deploy));
            if !by_label && deploy != service {
                return false;
            }
        }
        true
    }

    /// Whether a completed request is tapped.
    pub fn selects_request(&self, method: &str, path: &str, status: u16) -> bool {
        self.method.as_deref().is_none_or(|m| m == method)
            && self
                .path_prefix
                .as_deref()
                .is_none_or(|p| path.starts_with(p))
            && self.status.is_none_or(|s| s.matches(status))
    }

    /// Checks what a user typed: a service or a deploy, a path that starts
    /// with `/`, a method of letters.
    pub fn validate(&self) -> Result<(), String> {
        match (&self.service, &self.deploy) {
            (None, None) => return Err("name a service or a deploy to tap".into()),
            (Some(_), Some(_)) => return Err("name a service or a deploy, not both".into()),
            _ => {}
        }
        if let Some(path) = &self.path_prefix {
            if !path.starts_with('/') {
                return Err(format!("path {path:?} must start with /"));
            }
        }
        if let Some(method) = &self.method {
            if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
                return Err(format!("method {method:?} must be upper-case letters"));
            }
        }
        Ok(())
    }
}

/// A status (`503`) or a class (`5xx`), inclusive range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusFilter {
    pub low: u16,
    pub high: u16,
}

impl StatusFilter {
    pub fn matches(self, status: u16) -> bool {
        (self.low..=self.high).contains(&status)
    }
}

impl std::str::FromStr for StatusFilter {
    type Err = String;

    fn from_str(text: &str) -> Result<StatusFilter, String> {
        let bad = || format!("status {text:?}: write a status (503) or a class (5xx)");
        let bytes = text.as_bytes();
        match bytes {
            [d @ b'1'..=b'5', b'x' | b'X', b'x' | b'X'] => {
                let low = u16::from(d - b'0') * 100;
                Ok(StatusFilter {
                    low,
                    high: low + 99,
                })
            }
            _ => {
                let status: u16 = text.parse().map_err(|_| bad())?;
                if (100..=599).contains(&status) {
                    Ok(StatusFilter {
                        low: status,
                        high: status,
                    })
                } else {
                    Err(bad())
                }
            }
        }
    }
}

impl std::fmt::Display for StatusFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.low == self.high {
            write!(f, "{}", self.low)
        } else {
            write!(f, "{}xx", self.low / 100)
        }
    }
}

impl Serialize for StatusFilter {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for StatusFilter {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<StatusFilter, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// The query of `GET /api/v1/tap`: the filter's fields, and `max`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TapQuery {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deploy: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// The session ends after this many events (the control plane caps it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<u64>,
}

impl TapQuery {
    /// The filter it describes, checked.
    pub fn filter(&self) -> Result<TapFilter, String> {
        let filter = TapFilter {
            namespace: self
                .namespace
                .clone()
                .unwrap_or_else(|| "default".to_owned()),
            service: self.service.clone(),
            deploy: self.deploy.clone(),
            path_prefix: self.path.clone(),
            method: self.method.as_ref().map(|m| m.to_ascii_uppercase()),
            status: self.status.as_deref().map(str::parse).transpose()?,
        };
        filter.validate()?;
        Ok(filter)
    }
}

/// One live tap as the control plane pushes it to sidecars.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TapDirective {
    /// Random, unguessable: the path sidecars post events to.
    pub id: String,
    pub filter: TapFilter,
    /// Whether the tapper may see header values (admin); a sidecar sends
    /// none otherwise.
    pub headers: bool,
}

/// Which way a tapped request went through its sidecar.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TapDirection {
    Inbound,
    Outbound,
}

/// One completed request seen by a tapped sidecar.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TapEvent {
    /// When the request arrived (Unix ms).
    pub at_ms: u64,
    /// The sidecar's instance id and service.
    pub instance: String,
    pub service: String,
    pub direction: TapDirection,
    /// Inbound: the caller's verified identity (SPIFFE id) or its address;
    /// outbound: the destination service (and upstream address).
    pub peer: String,
    pub method: String,
    pub path: String,
    /// 0 when the client went away before a response.
    pub status: u16,
    pub latency_ms: f64,
    /// `x-meshlet-reason` when the mesh answered itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    /// Request headers (values [`REDACTED`] for a viewer's tap).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<(String, String)>,
}

/// `POST /api/v1/tap/{id}/events`: events since the last batch, and how
/// many the sidecar dropped because its queue was full.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TapBatch {
    pub events: Vec<TapEvent>,
    #[serde(default)]
    pub dropped: u64,
}

/// One line of the tap stream meshctl reads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum TapLine {
    /// The session is live: the sidecars it reached.
    Started {
        id: String,
        sidecars: usize,
    },
    Event(TapEvent),
    /// Events lost since the last such line (a full queue in a sidecar or
    /// in the control plane).
    Dropped {
        count: u64,
    },
    /// Nothing happened for a while (lets the control plane notice a
    /// tapper that went away).
    Keepalive,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_filters_parse_and_match() {
        let class: StatusFilter = "5xx".parse().unwrap();
        assert!(class.matches(503) && class.matches(500) && !class.matches(404));
        let one: StatusFilter = "404".parse().unwrap();
        assert!(one.matches(404) && !one.matches(403));
        assert_eq!(class.to_string(), "5xx");
        for bad in ["6xx", "abc", "99", "600", ""] {
            assert!(bad.parse::<StatusFilter>().is_err(), "{bad}");
        }
    }

    #[test]
    fn filters_select_sidecars_and_requests() {
        let query = TapQuery {
            deploy: Some("orders-v2".into()),
            path: Some("/api".into()),
            method: Some("get".into()),
            status: Some("5xx".into()),
            ..TapQuery::default()
        };
        let filter = query.filter().unwrap();
        let labels: BTreeMap<String, String> = [("app".to_owned(), "orders-v2".to_owned())].into();
        assert!(filter.selects_sidecar("default", "orders", &labels));
        assert!(!filter.selects_sidecar("default", "orders", &BTreeMap::new()));
        assert!(!filter.selects_sidecar("prod", "orders", &labels));
        assert!(filter.selects_request("GET", "/api/x", 503));
        assert!(!filter.selects_request("POST", "/api/x", 503));
        assert!(!filter.selects_request("GET", "/x", 503));
        assert!(!filter.selects_request("GET", "/api/x", 200));
        assert!(TapQuery::default().filter().is_err());
    }
}
