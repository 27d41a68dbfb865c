//! Workload identities: `spiffe://TRUST_DOMAIN/ns/NAMESPACE/sa/SERVICE_ACCOUNT`.
//!
//! The control plane builds a [`SpiffeId`] from a sidecar token's namespace
//! and service (outside Kubernetes the service account is the service name)
//! and puts it, alone, in the workload certificate's URI SAN; it also
//! names each registered endpoint's expected identity in the registry
//! (`mesh::EndpointEntry::identity`). Sidecars parse the peer's URI SAN back
//! with [`SpiffeId::parse`] and compare it with what the registry says.
//!
//! Rules: the trust domain is 1–255 characters of lowercase letters,
//! digits, `.`, `-` and `_` (the SPIFFE spec's set); the namespace is a
//! DNS-1123 label; the service account a DNS-1123 subdomain (labels joined
//! by `.`, at most 253 characters), as Kubernetes allows.

use std::fmt;
use std::str::FromStr;

use thiserror::Error;

/// Why a string is not a workload SPIFFE id.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("invalid SPIFFE id {id:?}: {reason}")]
pub struct SpiffeIdError {
    pub id: String,
    pub reason: &'static str,
}

/// A validated SPIFFE id of a mesh workload.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

pub fn validate_trust_domain(td: &str) -> Result<(), SpiffeIdError> {
    let ok = !td.is_empty()
        && td.len() <= 255
        && td.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        });
    if ok {
        Ok(())
    } else {
        Err(SpiffeIdError {
            id: td.to_owned(),
            reason: "the trust domain is 1-255 lowercase letters, digits, '.', '-' or '_'",
        })
    }
}

fn is_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

impl SpiffeId {
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<SpiffeId, SpiffeIdError> {
        let id = || format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}");
        validate_trust_domain(trust_domain).map_err(|_| SpiffeIdError {
            id: id(),
            reason: "the trust domain is 1-255 lowercase letters, digits, '.', '-' or '_'",
        })?;
        if !is_label(namespace) {
            return Err(SpiffeIdError {
                id: id(),
                reason: "the namespace must be a DNS-1123 label",
            });
        }
        if service_account.len() > 253 || !service_account.split('.').all(is_label) {
            return Err(SpiffeIdError {
                id: id(),
                reason: "the service account must be a DNS-1123 subdomain",
            });
        }
        Ok(SpiffeId {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        })
    }

    /// Parses `spiffe://TD/ns/NS/sa/SA` (exactly that shape).
    pub fn parse(uri: &str) -> Result<SpiffeId, SpiffeIdError> {
        let bad = |reason| SpiffeIdError {
            id: uri.chars().take(300).collect(),
            reason,
        };
        let rest = uri
            .strip_prefix("spiffe://")
            .ok_or_else(|| bad("must start with spiffe://"))?;
        let mut parts = rest.split('/');
        match (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) {
            (Some(td), Some("ns"), Some(ns), Some("sa"), Some(sa), None) => {
                SpiffeId::new(td, ns, sa)
            }
            _ => Err(bad(
                "expected spiffe://TRUST_DOMAIN/ns/NAMESPACE/sa/SERVICE_ACCOUNT",
            )),
        }
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }
    pub fn namespace(&self) -> &str {
        &self.namespace
    }
    pub fn service_account(&self) -> &str {
        &self.service_account
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SpiffeId::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let id = SpiffeId::new("meshlet.local", "default", "orders").unwrap();
        assert_eq!(
            id.to_string(),
            "spiffe://meshlet.local/ns/default/sa/orders"
        );
        assert_eq!(SpiffeId::parse(&id.to_string()).unwrap(), id);
        assert!(SpiffeId::new("td", "ns", "my.service-account").is_ok());
    }

    #[test]
    fn refuses_bad_shapes_and_names() {
        for bad in [
            "http://meshlet.local/ns/default/sa/orders",
            "spiffe://meshlet.local/ns/default/sa/orders/extra",
            "spiffe://meshlet.local/ns/default",
            "spiffe://meshlet.local/sa/orders/ns/default",
            "spiffe://Meshlet.local/ns/default/sa/orders",
            "spiffe:///ns/default/sa/orders",
            "spiffe://meshlet.local/ns/Default/sa/orders",
            "spiffe://meshlet.local/ns/default/sa/",
            "spiffe://meshlet.local/ns/default/sa/..",
            "spiffe://meshlet.local/ns/default/sa/a b",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad}");
        }
    }
}
