//! The `Host` names this control plane answers to (DNS-rebinding guard).
//!
//! A page on `attacker.example` that re-points its name at the control
//! plane's address makes the browser send `Host: attacker.example`; such a
//! request is refused. IP literals are always accepted (a rebinding attack
//! needs a name of the attacker's), as are the names in the server
//! certificate: `localhost`, the `--advertise-name`s and the Kubernetes
//! Service names.

use std::collections::BTreeSet;
use std::net::IpAddr;

use axum::http::HeaderValue;

#[derive(Debug, Clone, Default)]
pub struct AllowedHosts {
    names: BTreeSet<String>,
}

impl AllowedHosts {
    /// Accepts IP literals and `names` (case-insensitive, without port).
    pub fn new<I, S>(names: I) -> AllowedHosts
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        AllowedHosts {
            names: names
                .into_iter()
                .map(|n| n.as_ref().trim_end_matches('.').to_ascii_lowercase())
                .collect(),
        }
    }

    /// Whether a request with this `Host` header is for this server.
    pub fn allows(&self, host: &HeaderValue) -> bool {
        let Ok(host) = host.to_str() else {
            return false;
        };
        let name = strip_port(host);
        if name.parse::<IpAddr>().is_ok() {
            return true;
        }
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        self.names.contains(&name)
    }
}

/// `name:port` → `name`; `[v6]:port` and `[v6]` → `v6`.
fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}
