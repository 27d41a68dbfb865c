//! Header rules a proxy must apply (RFC 9110 §7.6): hop-by-hop headers are
//! removed before forwarding, `Upgrade` survives only for a real upgrade,
//! and the inbound side records the client in `x-forwarded-*`.
//!
//! The caller's identity headers (`x-meshlet-source`,
//! `x-meshlet-source-identity`) are the mesh's word, never a client's:
//! both sides remove every copy a client sent ([`remove_source_headers`]),
//! and only the inbound side sets them, from the identity its peer proved
//! with a certificate ([`set_source_headers`]). A plaintext caller reaches
//! the app with neither.

/// The calling service (`name`, or `name.namespace` outside `default`),
/// set by the inbound side from the verified peer identity.
pub const SOURCE_HEADER: HeaderName = HeaderName::from_static("x-meshlet-source");
/// The calling workload's SPIFFE id, set with [`SOURCE_HEADER`].
pub const SOURCE_IDENTITY_HEADER: HeaderName = HeaderName::from_static("x-meshlet-source-identity");

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// The identity headers, as names a request body drops from its trailers
/// (`ProxyBody::without_trailers`): a client's copy sent as a trailer
/// never reaches the app either.
pub static SOURCE_HEADERS: [HeaderName; 2] = [SOURCE_HEADER, SOURCE_IDENTITY_HEADER];

const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

const HTTP2_SETTINGS: HeaderName = HeaderName::from_static("http2-settings");

/// `Upgrade: h2c` is not an upgrade for the mesh (as Envoy by default):
/// after the app's `101` every request on the connection would pass
/// unseen by authorization and the identity-header rule. `h2c` is dropped
/// from the `Upgrade` list (the header goes if nothing else is left) and
/// `HTTP2-Settings` is removed, so the request is forwarded as an
/// ordinary one. Call before [`wants_upgrade`].
pub fn drop_h2c_upgrade(headers: &mut HeaderMap) {
    let [settings, upgrade] = present(headers, [&HTTP2_SETTINGS, &header::UPGRADE]);
    if settings {
        headers.remove(HTTP2_SETTINGS);
    }
    if !upgrade {
        return;
    }
    let mut h2c = false;
    let mut kept: Vec<String> = Vec::new();
    for value in headers.get_all(header::UPGRADE) {
        let Ok(value) = value.to_str() else {
            // Not a readable protocol list: forward no upgrade at all.
            h2c = true;
            kept.clear();
            break;
        };
        for protocol in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let name = protocol.split('/').next().unwrap_or_default().trim();
            if name.eq_ignore_ascii_case("h2c") {
                h2c = true;
            } else {
                kept.push(protocol.to_owned());
            }
        }
    }
    if !h2c {
        return;
    }
    headers.remove(header::UPGRADE);
    if !kept.is_empty() {
        if let Ok(value) = HeaderValue::from_str(&kept.join(", ")) {
            headers.insert(header::UPGRADE, value);
        }
    }
}

/// Is this an HTTP/1.1 upgrade request (`Connection: upgrade` + `Upgrade`)?
pub fn wants_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE) && connection_has(headers, "upgrade")
}

fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// The hop-by-hop fields removed whether or not `Connection` names them
/// (RFC 9110 §7.6.1, and the legacy ones proxies still see).
static HOP_BY_HOP: [HeaderName; HOP_BY_HOP_COUNT] = [
    header::CONNECTION,
    PROXY_CONNECTION,
    KEEP_ALIVE,
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
];
const HOP_BY_HOP_COUNT: usize = 8;
const CONNECTION_AT: usize = 0;
const TE_AT: usize = 3;
const UPGRADE_AT: usize = 5;

/// Removes hop-by-hop headers in place. With `keep_upgrade`, `Upgrade` is
/// kept and `Connection: upgrade` restored so the next hop sees the upgrade.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // One pass over the names (cheap comparisons of well-known names) finds
    // which of them the message has; only those are removed, so the common
    // message (none, or a response's `Connection: keep-alive`) hashes no
    // name it does not carry.
    let mut present = [false; HOP_BY_HOP_COUNT];
    for name in headers.keys() {
        if let Some(at) = hop_by_hop_at(name) {
            present[at] = true;
        }
    }
    if !present.contains(&true) {
        return;
    }
    if present[CONNECTION_AT] {
        // Fields named by Connection are hop-by-hop too (those of the list
        // above are removed with it, except `TE`: named there, even a
        // `TE: trailers` goes). Collect first: the map can't be changed
        // while its Connection values are borrowed.
        for name in named_by_connection(headers) {
            headers.remove(name);
        }
    }
    let keep_te_trailers = present[TE_AT]
        && headers
            .get(header::TE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
            });
    for (at, name) in HOP_BY_HOP.iter().enumerate() {
        if present[at] && at != UPGRADE_AT {
            headers.remove(name);
        }
    }
    if keep_te_trailers {
        // `TE: trailers` is the one TE value that must reach the origin
        // (gRPC relies on it) and is allowed in HTTP/2.
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else if present[UPGRADE_AT] {
        headers.remove(header::UPGRADE);
    }
}

/// Removes every copy of the identity headers a client sent.
pub fn remove_source_headers(headers: &mut HeaderMap) {
    // One pass over the names instead of hashing two names the request
    // almost never has; `remove` drops every value of the name.
    let [source, identity] = present(headers, [&SOURCE_HEADER, &SOURCE_IDENTITY_HEADER]);
    if source {
        headers.remove(SOURCE_HEADER);
    }
    if identity {
        headers.remove(SOURCE_IDENTITY_HEADER);
    }
}

/// Which of `names` the map has, found in one pass over its names
/// (comparisons of names, no hashing). Cheaper than a `contains_key` or
/// `remove` per name for the few fields a request has, and the names
/// looked for are usually absent.
pub fn present<const N: usize>(headers: &HeaderMap, names: [&HeaderName; N]) -> [bool; N] {
    let mut found = [false; N];
    for name in headers.keys() {
        if let Some(at) = names.iter().position(|n| *n == name) {
            found[at] = true;
        }
    }
    found
}

/// Where `name` is in [`HOP_BY_HOP`]: one `match` on the lowercase name
/// (a length switch, then one comparison), where comparing with each
/// `HeaderName` of the list cost ~900 instructions per message (callgrind,
/// `tests/bench/profile.sh`). `hop_by_hop_at_agrees_with_the_list` keeps the
/// two in step.
fn hop_by_hop_at(name: &HeaderName) -> Option<usize> {
    match name.as_str() {
        "connection" => Some(CONNECTION_AT),
        "proxy-connection" => Some(1),
        "keep-alive" => Some(2),
        "te" => Some(TE_AT),
        "transfer-encoding" => Some(4),
        "upgrade" => Some(UPGRADE_AT),
        "proxy-authorization" => Some(6),
        "proxy-authenticate" => Some(7),
        _ => None,
    }
}

/// The fields `Connection` names beyond [`HOP_BY_HOP`] (and `TE`, which
/// must go when named even as `TE: trailers`). The usual values
/// (`keep-alive`, `upgrade`) name none of their own: read as bytes, they
/// cost no allocation and no `HeaderName` parse. A token that is not a valid
/// field name names nothing.
fn named_by_connection(headers: &HeaderMap) -> Vec<HeaderName> {
    let mut named = Vec::new();
    for value in headers.get_all(header::CONNECTION) {
        for token in value.as_bytes().split(|&b| b == b',') {
            let token = token.trim_ascii();
            if token.is_empty() || in_fixed_list(token) {
                continue;
            }
            if let Ok(name) = HeaderName::from_bytes(token) {
                if name == header::TE || !HOP_BY_HOP.contains(&name) {
                    named.push(name);
                }
            }
        }
    }
    named
}

/// Whether a `Connection` token names a field of [`HOP_BY_HOP`] other than
/// `TE` (removed with the list anyway).
fn in_fixed_list(token: &[u8]) -> bool {
    HOP_BY_HOP
        .iter()
        .any(|name| *name != header::TE && token.eq_ignore_ascii_case(name.as_str().as_bytes()))
}

/// Replaces the identity headers with the verified caller's (`None`: a
/// plaintext caller, the headers are only removed).
pub fn set_source_headers(headers: &mut HeaderMap, verified: Option<(&HeaderValue, &HeaderValue)>) {
    remove_source_headers(headers);
    if let Some((service, identity)) = verified {
        headers.insert(SOURCE_HEADER, service.clone());
        headers.insert(SOURCE_IDENTITY_HEADER, identity.clone());
    }
}

/// Appends the client's address to `x-forwarded-for` and sets
/// `x-forwarded-proto` (inbound side).
/// `client_ip` is the client's address as a header value (built once per
/// connection), so the common case — no prior `x-forwarded-for` — copies
/// nothing.
pub fn add_forwarded(headers: &mut HeaderMap, client_ip: &HeaderValue, proto: &'static str) {
    let [prior] = present(headers, [&X_FORWARDED_FOR]);
    let prior = if prior {
        headers.get(&X_FORWARDED_FOR)
    } else {
        None
    };
    let value = match prior {
        Some(prior) => {
            let mut joined = Vec::with_capacity(prior.len() + 2 + client_ip.len());
            joined.extend_from_slice(prior.as_bytes());
            joined.extend_from_slice(b", ");
            joined.extend_from_slice(client_ip.as_bytes());
            HeaderValue::from_bytes(&joined).ok()
        }
        None => Some(client_ip.clone()),
    };
    if let Some(value) = value {
        headers.insert(X_FORWARDED_FOR, value);
    }
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (k, v) in pairs {
            headers.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        headers
    }

    fn names(headers: &HeaderMap) -> Vec<String> {
        let mut names: Vec<_> = headers.keys().map(|k| k.to_string()).collect();
        names.sort();
        names
    }

    #[test]
    fn hop_by_hop_at_agrees_with_the_list() {
        for (at, name) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_by_hop_at(name), Some(at), "{name}");
        }
        for other in [
            "host",
            "x-connection",
            "connections",
            "tes",
            "trailer",
            "content-length",
        ] {
            let name = HeaderName::from_static(other);
            assert_eq!(hop_by_hop_at(&name), None, "{other}");
        }
    }

    #[test]
    fn strips_hop_by_hop_and_connection_named_fields() {
        let mut h = map(&[
            ("connection", "keep-alive, x-secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("transfer-encoding", "chunked"),
            ("proxy-authorization", "Basic x"),
            ("upgrade", "websocket"),
            ("te", "gzip"),
            ("x-kept", "yes"),
            ("host", "orders"),
        ]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(names(&h), ["host", "x-kept"]);
    }

    #[test]
    fn every_connection_line_and_token_is_read_in_any_case() {
        let mut h = map(&[
            ("connection", " Keep-Alive ,, X-One"),
            ("connection", "x-two,TE"),
            ("x-one", "1"),
            ("x-two", "2"),
            ("te", "trailers"),
            ("x-kept", "yes"),
        ]);
        strip_hop_by_hop(&mut h, false);
        // TE named by Connection goes even as `TE: trailers`.
        assert_eq!(names(&h), ["x-kept"]);

        let mut h = map(&[("connection", "keep-alive"), ("te", "trailers")]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(names(&h), ["te"]);
    }

    #[test]
    fn keeps_te_trailers_and_upgrade_when_upgrading() {
        let mut h = map(&[
            ("te", "trailers, deflate"),
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
        ]);
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h["te"], "trailers");
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
    }

    #[test]
    fn detects_upgrade_requests() {
        assert!(wants_upgrade(&map(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket")
        ])));
        assert!(!wants_upgrade(&map(&[("upgrade", "websocket")])));
    }

    #[test]
    fn an_h2c_upgrade_is_forwarded_as_an_ordinary_request() {
        let mut h = map(&[
            ("connection", "Upgrade, HTTP2-Settings"),
            ("upgrade", "h2c"),
            ("http2-settings", "AAMAAABkAAQAoAAAAAIAAAAA"),
            ("host", "orders"),
        ]);
        drop_h2c_upgrade(&mut h);
        assert!(!wants_upgrade(&h));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(names(&h), ["host"]);

        // HTTP2-Settings goes even when Connection does not name it.
        let mut h = map(&[
            ("connection", "upgrade"),
            ("upgrade", "H2C"),
            ("http2-settings", "AAMAAABkAAQAoAAAAAIAAAAA"),
        ]);
        drop_h2c_upgrade(&mut h);
        assert!(!wants_upgrade(&h));
        assert!(!h.contains_key("http2-settings") && !h.contains_key("upgrade"));

        // Several protocols: only h2c is dropped.
        let mut h = map(&[
            ("connection", "upgrade"),
            ("upgrade", "h2c, websocket"),
            ("upgrade", "foo/2"),
        ]);
        drop_h2c_upgrade(&mut h);
        assert!(wants_upgrade(&h));
        assert_eq!(h["upgrade"], "websocket, foo/2");
        assert_eq!(h.get_all("upgrade").iter().count(), 1);

        // A WebSocket upgrade is left alone.
        let mut h = map(&[("connection", "upgrade"), ("upgrade", "websocket")]);
        drop_h2c_upgrade(&mut h);
        assert!(wants_upgrade(&h));
        assert_eq!(h["upgrade"], "websocket");
    }

    #[test]
    fn every_client_copy_of_the_identity_headers_is_replaced() {
        let mut h = map(&[
            ("x-meshlet-source", "evil"),
            ("x-meshlet-source", "frontend"),
            (
                "X-Meshlet-Source-Identity",
                "spiffe://meshlet.local/ns/default/sa/admin",
            ),
            ("x-kept", "yes"),
        ]);
        remove_source_headers(&mut h);
        assert_eq!(names(&h), ["x-kept"]);

        let mut h = map(&[("x-meshlet-source", "evil"), ("x-meshlet-source", "evil2")]);
        let service = HeaderValue::from_static("frontend");
        let identity = HeaderValue::from_static("spiffe://meshlet.local/ns/default/sa/frontend");
        set_source_headers(&mut h, Some((&service, &identity)));
        let sources: Vec<_> = h.get_all(SOURCE_HEADER).iter().collect();
        assert_eq!(sources, [&service]);
        assert_eq!(h[SOURCE_IDENTITY_HEADER], identity);

        let mut h = map(&[("x-meshlet-source", "evil")]);
        set_source_headers(&mut h, None);
        assert!(h.is_empty(), "a plaintext caller gets neither header");
    }

    #[test]
    fn appends_forwarded_for() {
        let mut h = map(&[("x-forwarded-for", "10.0.0.1")]);
        add_forwarded(&mut h, &HeaderValue::from_static("127.0.0.2"), "http");
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 127.0.0.2");
        assert_eq!(h["x-forwarded-proto"], "http");
    }
}
