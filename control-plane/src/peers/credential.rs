//! The peer credential: what proves that a call to a replica's internal
//! routes (`/api/v1/peer/...`) comes from another replica of the same mesh.
//!
//! Every replica of one mesh holds the same mesh CA key (`--store etcd`
//! copies `P/bootstrap/ca.key` into each data directory), so each derives
//! the same secret without storing a new one: the credential is
//! HMAC-SHA256(key = the CA key's PEM, message = [`LABEL`] + the etcd
//! prefix), sent as `x-meshlet-peer: mlp_HEX`. Whoever holds the CA key can
//! mint any certificate of the mesh anyway, so this credential grants
//! nothing new to anyone who could compute it.
//!
//! **Who may use it:** only the internal routes accept it (the access
//! guard's `Gate::Peer`), and those routes accept nothing else: an admin
//! token gets 401 there, and the peer credential is no bearer token
//! anywhere else (it is in no token table). It is checked in constant time
//! (`ring::hmac::verify`). A redb control plane has no peers and refuses
//! every internal call.
//!
//! [`derive_secret`] is the one derivation of a mesh-wide secret from the
//! CA key; each use has its own label (this credential: [`LABEL`]; the
//! dashboard sessions' cookie key: `access::sessions`), so no two uses
//! ever share a value.

use ring::hmac;

/// The header that carries the credential.
pub const PEER_HEADER: &str = "x-meshlet-peer";

/// The HMAC's message before the prefix (a version, so another use of
/// the CA key can never produce the same value).
const LABEL: &[u8] = b"meshlet control-plane peer v1\0";
const TOKEN_PREFIX: &str = "mlp_";

/// The secret of one mesh's replicas.
pub struct PeerSecret {
    key: hmac::Key,
    message: Vec<u8>,
    token: String,
}

impl std::fmt::Debug for PeerSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PeerSecret(<redacted>)")
    }
}

/// A secret every replica of one mesh computes alike and nobody without
/// the CA key can: HMAC-SHA256(key = the CA key's PEM, message = `label`
/// followed by `scope`). `label` names the use (and its version), `scope`
/// the mesh (the etcd prefix).
pub fn derive_secret(ca_key_pem: &str, label: &[u8], scope: &str) -> hmac::Tag {
    let (key, message) = keyed(ca_key_pem, label, scope);
    hmac::sign(&key, &message)
}

/// The HMAC key and message of [`derive_secret`] (the peer credential
/// keeps both to verify a presented value).
fn keyed(ca_key_pem: &str, label: &[u8], scope: &str) -> (hmac::Key, Vec<u8>) {
    let key = hmac::Key::new(hmac::HMAC_SHA256, ca_key_pem.as_bytes());
    let mut message = label.to_vec();
    message.extend_from_slice(scope.as_bytes());
    (key, message)
}

impl PeerSecret {
    /// From the mesh CA's private key (PEM) and the etcd prefix.
    pub fn derive(ca_key_pem: &str, prefix: &str) -> PeerSecret {
        let (key, message) = keyed(ca_key_pem, LABEL, prefix);
        let tag = hmac::sign(&key, &message);
        let token = format!("{TOKEN_PREFIX}{}", hex(tag.as_ref()));
        PeerSecret {
            key,
            message,
            token,
        }
    }

    /// The value this replica sends in [`PEER_HEADER`].
    pub fn token(&self) -> &str {
        &self.token
    }

    /// Whether `presented` (the header's value) is this mesh's credential.
    pub fn verify(&self, presented: &str) -> bool {
        let Some(hex_tag) = presented.trim().strip_prefix(TOKEN_PREFIX) else {
            return false;
        };
        let Some(tag) = unhex(hex_tag) else {
            return false;
        };
        hmac::verify(&self.key, &self.message, &tag).is_ok()
    }
}

/// Lower-case hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The bytes of lower- or upper-case hex (at most 64 bytes), `None` when
/// it is not hex.
pub(crate) fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || text.len() > 128 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replicas_of_one_mesh_agree_and_nothing_else_passes() {
        let a = PeerSecret::derive("KEY", "/meshlet");
        let b = PeerSecret::derive("KEY", "/meshlet");
        assert_eq!(a.token(), b.token());
        assert!(b.verify(a.token()));
        // Another mesh (prefix) or another CA: refused.
        assert!(!PeerSecret::derive("KEY", "/other").verify(a.token()));
        assert!(!PeerSecret::derive("OTHER", "/meshlet").verify(a.token()));
        // Forged, truncated, malformed.
        let mut forged = a.token().to_owned();
        forged.replace_range(forged.len() - 1.., "0");
        if forged == a.token() {
            forged.replace_range(forged.len() - 1.., "1");
        }
        assert!(!a.verify(&forged));
        assert!(!a.verify(&a.token()[..20]));
        assert!(!a.verify("mlp_zz"));
        assert!(!a.verify(""));
        assert!(!a.verify(a.token().trim_start_matches("mlp_")));
    }
}
