//! The gateway's HTTP → HTTPS redirect listener (`--redirect-port`):
//! every request is answered `308 Permanent Redirect` to
//! `https://HOST[:PORT]PATH?QUERY`, HOST from `:authority` / `Host` with
//! its port dropped, PORT the gateway's TLS (inbound) port unless it is
//! 443. 308 (not 301) so that a client repeats the method and body.
//!
//! Nothing is proxied and no policy applies: the answer only names the
//! same host over https, as the client asked for it (the framing guard
//! has already refused an invalid `Host`). A request without a host is
//! 400 `missing_host` (`ProxyError`). Not an error response, so no
//! `x-meshlet-reason`; counted as the listener's requests are not
//! (`active_connections{direction="redirect"}` counts its connections).

use http::{header, HeaderValue, Request, Response, StatusCode};

use crate::body::{ProxyBody, StreamedBody};
use crate::error::ProxyError;
use crate::listen::server::{Handler, Peer};
use crate::proxy::route::Authority;

/// Answers every request with a redirect to https.
#[derive(Clone, Debug)]
pub struct Redirect {
    /// The port clients reach the TLS listener on.
    https_port: u16,
}

impl Redirect {
    pub fn new(https_port: u16) -> Self {
        Redirect { https_port }
    }

    /// `https://HOST[:PORT]PATH?QUERY` for `request`, or `None` without a host.
    fn location<B>(&self, request: &Request<B>) -> Option<String> {
        let host = Authority::of(request)?.host;
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host.to_owned()
        };
        let port = match self.https_port {
            443 => String::new(),
            port => format!(":{port}"),
        };
        let target = request.uri().path_and_query().map_or("/", |pq| pq.as_str());
        // An absolute-form or asterisk target has no path of its own.
        let target = if target.starts_with('/') { target } else { "/" };
        Some(format!("https://{host}{port}{target}"))
    }
}

impl Handler for Redirect {
    // A redirected client goes on over HTTPS, not on this connection.
    const POLLS_FOR_NEXT_REQUEST: bool = false;

    async fn handle(&self, request: Request<StreamedBody>, _peer: &Peer) -> Response<ProxyBody> {
        let location = self
            .location(&request)
            .and_then(|l| HeaderValue::try_from(l).ok());
        let Some(location) = location else {
            return ProxyError::MissingHost.into_response();
        };
        let mut response = Response::new(ProxyBody::empty());
        *response.status_mut() = StatusCode::PERMANENT_REDIRECT;
        response.headers_mut().insert(header::LOCATION, location);
        response
    }

    fn admits_opaque(
        &self,
        _identity: Option<&std::sync::Arc<meshlet_api::identity::SpiffeId>>,
    ) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn location(port: u16, host: &str, target: &str) -> Option<String> {
        let mut request = Request::get(target);
        if !host.is_empty() {
            request = request.header(header::HOST, host);
        }
        Redirect::new(port).location(&request.body(()).unwrap())
    }

    #[test]
    fn the_location_is_the_same_host_over_https_on_the_tls_port() {
        let cases = [
            (
                8443,
                "shop.example.com:8080",
                "/a/b?x=1&y",
                "https://shop.example.com:8443/a/b?x=1&y",
            ),
            (443, "shop.example.com", "/", "https://shop.example.com/"),
            (
                443,
                "shop.example.com:80",
                "/cart",
                "https://shop.example.com/cart",
            ),
            (8443, "[::1]:8080", "/x", "https://[::1]:8443/x"),
            (
                8443,
                "",
                "http://shop.example.com:8080/p?q",
                "https://shop.example.com:8443/p?q",
            ),
        ];
        for (port, host, target, expect) in cases {
            assert_eq!(
                location(port, host, target).as_deref(),
                Some(expect),
                "{host} {target}"
            );
        }
        assert_eq!(location(443, "", "/"), None);
    }
}
