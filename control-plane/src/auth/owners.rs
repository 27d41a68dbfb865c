//! Instance ownership: which credential registered which instance id.
//!
//! Flow: on register the API calls [`Owners::claim`] after
//! [`Principal::may`](super::Principal::may); a new id is recorded for the
//! caller's token name, an id the caller already holds is accepted again (a
//! re-registration after a restart), and an id held by another credential is
//! refused with [`OwnershipError::HeldByOther`] (409), even for an admin:
//! taking over a live registration is the hijack issue 13 measured. On
//! heartbeat and deregister the API calls [`Owners::check`]: the holder may
//! act, an admin may act on any instance (to clean up), anyone else gets
//! [`OwnershipError::NotHolder`] (403). When an instance is deregistered or
//! expires the API calls [`Owners::release`]; when a token is revoked,
//! [`Owners::release_all_of`] frees its ids.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::tokens::{Principal, Role};

/// Why a principal may not use an instance id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OwnershipError {
    /// Register with an id another credential holds (→ 409 Conflict).
    #[error("instance {id:?} is registered by another credential")]
    HeldByOther { id: String, holder: String },
    /// Heartbeat/deregister of an instance the caller did not register (→ 403).
    #[error("token {principal:?} did not register instance {id:?}")]
    NotHolder { id: String, principal: String },
    /// Heartbeat/deregister of an id nobody holds (→ 404).
    #[error("instance {id:?} is not registered")]
    Unknown { id: String },
}

/// What [`Owners::claim`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// The id was free and is now the caller's.
    New,
    /// The caller already held it.
    Renewed,
}

/// Instance id → name of the token that registered it. Serialisable, so the
/// store can keep it with the instances.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Owners {
    by_id: BTreeMap<String, String>,
}

impl Owners {
    pub fn new() -> Owners {
        Owners::default()
    }

    /// Every `(id, token name)`.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> + '_ {
        self.by_id
            .iter()
            .map(|(id, holder)| (id.as_str(), holder.as_str()))
    }

    /// Records `holder` (a token name) for `id` as stored (loading).
    pub fn record(&mut self, id: String, holder: String) {
        self.by_id.insert(id, holder);
    }

    /// Records `principal` as the holder of `id`, unless another credential holds it.
    pub fn claim(&mut self, id: &str, principal: &Principal) -> Result<Claim, OwnershipError> {
        match self.by_id.get(id) {
            Some(holder) if *holder == principal.name => Ok(Claim::Renewed),
            Some(holder) => Err(OwnershipError::HeldByOther {
                id: id.to_owned(),
                holder: holder.clone(),
            }),
            None => {
                self.by_id.insert(id.to_owned(), principal.name.clone());
                Ok(Claim::New)
            }
        }
    }

    /// Whether `principal` may heartbeat or deregister `id`: its holder, or an admin.
    pub fn check(&self, id: &str, principal: &Principal) -> Result<(), OwnershipError> {
        match self.by_id.get(id) {
            None => Err(OwnershipError::Unknown { id: id.to_owned() }),
            Some(holder) if *holder == principal.name || principal.role == Role::Admin => Ok(()),
            Some(_) => Err(OwnershipError::NotHolder {
                id: id.to_owned(),
                principal: principal.name.clone(),
            }),
        }
    }

    /// Forgets `id` (deregistered or expired); returns its holder.
    pub fn release(&mut self, id: &str) -> Option<String> {
        self.by_id.remove(id)
    }

    /// Forgets every id a token holds (the token was revoked); returns the ids.
    pub fn release_all_of(&mut self, token_name: &str) -> Vec<String> {
        let ids: Vec<String> = self
            .by_id
            .iter()
            .filter(|(_, holder)| *holder == token_name)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &ids {
            self.by_id.remove(id);
        }
        ids
    }

    /// Keeps only the ids for which `keep` holds (on load: the ids still
    /// registered).
    pub fn retain(&mut self, mut keep: impl FnMut(&str) -> bool) {
        self.by_id.retain(|id, _| keep(id));
    }

    pub fn holder(&self, id: &str) -> Option<&str> {
        self.by_id.get(id).map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sidecar(name: &str) -> Principal {
        Principal {
            name: name.into(),
            role: Role::sidecar("default", "orders").unwrap(),
        }
    }

    #[test]
    fn claim_new_renew_and_refuse_takeover() {
        let mut owners = Owners::new();
        let a = sidecar("orders-a");
        let b = sidecar("orders-b");
        assert_eq!(owners.claim("i1", &a), Ok(Claim::New));
        assert_eq!(owners.claim("i1", &a), Ok(Claim::Renewed));
        assert_eq!(
            owners.claim("i1", &b),
            Err(OwnershipError::HeldByOther {
                id: "i1".into(),
                holder: "orders-a".into()
            })
        );
        // Not even an admin takes over a live registration.
        let admin = Principal {
            name: "admin".into(),
            role: Role::Admin,
        };
        assert!(matches!(
            owners.claim("i1", &admin),
            Err(OwnershipError::HeldByOther { .. })
        ));
        assert_eq!(owners.holder("i1"), Some("orders-a"));
    }

    #[test]
    fn check_holder_admin_and_others() {
        let mut owners = Owners::new();
        let a = sidecar("orders-a");
        let b = sidecar("orders-b");
        let admin = Principal {
            name: "admin".into(),
            role: Role::Admin,
        };
        let viewer = Principal {
            name: "v".into(),
            role: Role::Viewer,
        };
        owners.claim("i1", &a).unwrap();
        assert_eq!(owners.check("i1", &a), Ok(()));
        assert_eq!(owners.check("i1", &admin), Ok(()));
        assert_eq!(
            owners.check("i1", &b),
            Err(OwnershipError::NotHolder {
                id: "i1".into(),
                principal: "orders-b".into()
            })
        );
        assert!(matches!(
            owners.check("i1", &viewer),
            Err(OwnershipError::NotHolder { .. })
        ));
        assert_eq!(
            owners.check("nope", &a),
            Err(OwnershipError::Unknown { id: "nope".into() })
        );
    }

    #[test]
    fn release_frees_the_id() {
        let mut owners = Owners::new();
        let a = sidecar("orders-a");
        let b = sidecar("orders-b");
        owners.claim("i1", &a).unwrap();
        owners.claim("i2", &a).unwrap();
        owners.claim("i3", &b).unwrap();
        assert_eq!(owners.release("i1"), Some("orders-a".into()));
        assert_eq!(owners.claim("i1", &b), Ok(Claim::New));
        assert_eq!(owners.release_all_of("orders-a"), vec!["i2".to_string()]);
        assert_eq!(owners.len(), 2);
        let json = serde_json::to_string(&owners).unwrap();
        assert_eq!(json, r#"{"i1":"orders-b","i3":"orders-b"}"#);
        assert_eq!(serde_json::from_str::<Owners>(&json).unwrap(), owners);
    }
}
