//! The dashboard's static page: `control-plane/ui/` (HTML, plain JS, CSS;
//! no build step) embedded in the binary and served at `/` and `/ui/...`.
//!
//! The page is one client of the JSON API (`/api/v1/dashboard/...`,
//! `/api/traces`); this module only hands out its three files. Each answer
//! carries its content type, `cache-control: no-cache` and an `ETag` (a
//! hash of the file, computed at compile time), so a browser revalidates
//! on every load and gets a bodiless 304 while the binary is unchanged.

use axum::http::header::{self, HeaderMap, HeaderValue};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

/// Where the page's script and stylesheet are served (`index.html` names
/// these paths).
pub mod paths {
    pub const INDEX: &str = "/";
    pub const SCRIPT: &str = "/ui/app.js";
    pub const STYLE: &str = "/ui/app.css";
    pub const LOGIN_SCRIPT: &str = "/ui/login.js";
}

/// The page allows only its own origin (scripts, styles, fetches, the
/// event stream) and a `data:` favicon.
const CONTENT_SECURITY_POLICY: &str =
    "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'";

/// One embedded file and how it is served.
#[derive(Debug, Clone, Copy)]
struct Asset {
    body: &'static str,
    content_type: &'static str,
    /// The quoted entity tag: FNV-1a of the body, in hex.
    etag: &'static str,
}

/// FNV-1a (64 bit): a stable fingerprint of a file for its `ETag`.
const fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < bytes.len() {
        hash ^= bytes[i] as u64;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    hash
}

/// `"` + 16 hex digits + `"`, built at compile time.
const fn quoted_hex(hash: u64) -> [u8; 18] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = [b'"'; 18];
    let mut i = 0;
    while i < 16 {
        out[16 - i] = DIGITS[((hash >> (4 * i)) & 0xf) as usize];
        i += 1;
    }
    out
}

/// Declares an embedded asset with its compile-time entity tag.
macro_rules! asset {
    ($file:literal, $content_type:literal) => {{
        const BODY: &str = include_str!(concat!("../ui/", $file));
        const TAG: [u8; 18] = quoted_hex(fnv1a(BODY.as_bytes()));
        Asset {
            body: BODY,
            content_type: $content_type,
            etag: match std::str::from_utf8(&TAG) {
                Ok(tag) => tag,
                Err(_) => panic!("an entity tag is ASCII"),
            },
        }
    }};
}

const INDEX: Asset = asset!("index.html", "text/html; charset=utf-8");
const SCRIPT: Asset = asset!("app.js", "text/javascript; charset=utf-8");
const STYLE: Asset = asset!("app.css", "text/css; charset=utf-8");
const LOGIN: Asset = asset!("login.html", "text/html; charset=utf-8");
const LOGIN_SCRIPT: Asset = asset!("login.js", "text/javascript; charset=utf-8");

/// The log-in page, which the access guard answers (with 401) to a browser
/// asking for `/` without a session.
pub fn login_page() -> Response {
    LOGIN.serve(&HeaderMap::new())
}

impl Asset {
    /// 304 when the browser's copy is current, else the file.
    fn serve(self, request: &HeaderMap) -> Response {
        let fresh = request
            .get(header::IF_NONE_MATCH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|tags| tags.split(',').any(|t| t.trim() == self.etag));
        let mut headers = HeaderMap::new();
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        headers.insert(header::ETAG, HeaderValue::from_static(self.etag));
        headers.insert(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        );
        if fresh {
            return (StatusCode::NOT_MODIFIED, headers).into_response();
        }
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(self.content_type),
        );
        if self.content_type.starts_with("text/html") {
            headers.insert(
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(CONTENT_SECURITY_POLICY),
            );
        }
        (headers, self.body).into_response()
    }
}

/// The page's routes, to merge into the API router.
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    let serve = |asset: Asset| get(move |request: HeaderMap| async move { asset.serve(&request) });
    Router::new()
        .route(paths::INDEX, serve(INDEX))
        .route(paths::SCRIPT, serve(SCRIPT))
        .route(paths::STYLE, serve(STYLE))
        .route(paths::LOGIN_SCRIPT, serve(LOGIN_SCRIPT))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(response: &Response, name: header::HeaderName) -> &str {
        response.headers()[name].to_str().unwrap()
    }

    #[test]
    fn each_file_is_served_with_its_type_and_revalidated_by_etag() {
        for (asset, kind) in [
            (INDEX, "text/html"),
            (SCRIPT, "text/javascript"),
            (STYLE, "text/css"),
            (LOGIN, "text/html"),
            (LOGIN_SCRIPT, "text/javascript"),
        ] {
            let response = asset.serve(&HeaderMap::new());
            assert_eq!(response.status(), StatusCode::OK);
            assert!(header(&response, header::CONTENT_TYPE).starts_with(kind));
            assert_eq!(header(&response, header::CACHE_CONTROL), "no-cache");
            let etag = header(&response, header::ETAG).to_owned();
            assert_eq!(etag.len(), 18);

            let mut request = HeaderMap::new();
            let other = format!("\"x\", {etag}");
            request.insert(header::IF_NONE_MATCH, other.parse().unwrap());
            let response = asset.serve(&request);
            assert_eq!(response.status(), StatusCode::NOT_MODIFIED);
            assert!(response.headers().get(header::CONTENT_TYPE).is_none());
        }
        let mut stale = HeaderMap::new();
        stale.insert(header::IF_NONE_MATCH, "\"0\"".parse().unwrap());
        assert_eq!(SCRIPT.serve(&stale).status(), StatusCode::OK);
    }

    #[test]
    fn the_page_names_the_served_assets_and_the_tags_differ() {
        assert!(INDEX.body.contains(&format!("src=\"{}\"", paths::SCRIPT)));
        assert!(INDEX.body.contains(&format!("href=\"{}\"", paths::STYLE)));
        assert_ne!(SCRIPT.etag, STYLE.etag);
        assert!(LOGIN
            .body
            .contains(&format!("src=\"{}\"", paths::LOGIN_SCRIPT)));
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(&quoted_hex(0x0123_4567_89ab_cdef), b"\"0123456789abcdef\"");
    }

    #[test]
    fn the_page_stays_small() {
        let total = INDEX.body.len()
            + SCRIPT.body.len()
            + STYLE.body.len()
            + LOGIN.body.len()
            + LOGIN_SCRIPT.body.len();
        assert!(
            total < 100 * 1024,
            "the dashboard's files are {total} bytes"
        );
    }
}
