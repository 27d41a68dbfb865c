//! meshctl's HTTP client: one request per connection over hyper's HTTP/1
//! client on a tokio `TcpStream`, with a connect timeout and an overall
//! request timeout. [`send`] is the plain transport (also used by
//! `broadcast` to reach instances); [`ControlPlane`] adds the API: JSON
//! bodies, `ApiError` answers, and the one-line "cannot reach" error.

use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use meshlet_api::mesh::ApiError;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::TcpStream;

pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a request got no answer. Displays short: `connection refused`,
/// `timeout`, ...
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("connection refused")]
    Refused,
    #[error("connect timeout")]
    ConnectTimeout,
    #[error("timeout")]
    Timeout,
    #[error("{0}")]
    Connect(std::io::Error),
    #[error("{0}")]
    Http(#[from] hyper::Error),
    #[error("invalid request: {0}")]
    Request(#[from] http::Error),
}

/// One request: connects to `authority` (`host:port`), sends, reads the
/// whole answer. `connect_timeout` bounds the connect, `timeout` the whole.
pub async fn send(
    authority: &str,
    request: Request<Full<Bytes>>,
    connect_timeout: Duration,
    timeout: Duration,
) -> Result<(StatusCode, Bytes), HttpError> {
    let exchange = async {
        let stream = tokio::time::timeout(connect_timeout, TcpStream::connect(authority))
            .await
            .map_err(|_| HttpError::ConnectTimeout)?
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::ConnectionRefused => HttpError::Refused,
                _ => HttpError::Connect(e),
            })?;
        let _ = stream.set_nodelay(true);
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        let driver = tokio::spawn(connection);
        let response = sender.send_request(request).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        driver.abort();
        Ok((status, body))
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| HttpError::Timeout)?
}

/// What went wrong talking to the control plane.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid --server {server:?}: {reason}")]
    BadServer { server: String, reason: String },
    #[error(
        "cannot reach the control plane at {server}: {source} \
         (is control-plane running? set --server or MESHLET_SERVER)"
    )]
    Unreachable {
        server: String,
        #[source]
        source: HttpError,
    },
    /// The API answered with an error (`ApiError`).
    #[error("{message}")]
    Api { status: StatusCode, message: String },
    #[error("unexpected answer from the control plane ({status}): {reason}")]
    Decode { status: StatusCode, reason: String },
}

/// The control plane's API at `--server`.
#[derive(Debug, Clone)]
pub struct ControlPlane {
    server: String,
    authority: String,
}

impl ControlPlane {
    /// `server` is `http://host[:port]` (no path).
    pub fn new(server: &str) -> Result<ControlPlane, ClientError> {
        let bad = |reason: &str| ClientError::BadServer {
            server: server.to_owned(),
            reason: reason.to_owned(),
        };
        let uri: Uri = server
            .parse()
            .map_err(|_| bad("expected http://HOST:PORT"))?;
        if uri.scheme_str() != Some("http") {
            return Err(bad("only http:// is supported"));
        }
        let host = uri.host().ok_or_else(|| bad("no host"))?;
        let port = uri.port_u16().unwrap_or(80);
        Ok(ControlPlane {
            server: server.trim_end_matches('/').to_owned(),
            authority: format!("{host}:{port}"),
        })
    }

    pub fn server(&self) -> &str {
        &self.server
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let mut builder = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, &self.authority)
            .header(header::USER_AGENT, "meshctl");
        if body.is_some() {
            builder = builder.header(header::CONTENT_TYPE, "application/json");
        }
        let request = builder
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| ClientError::BadServer {
                server: self.server.clone(),
                reason: e.to_string(),
            })?;
        send(&self.authority, request, CONNECT_TIMEOUT, REQUEST_TIMEOUT)
            .await
            .map_err(|source| ClientError::Unreachable {
                server: self.server.clone(),
                source,
            })
    }

    fn decode<T: DeserializeOwned>(status: StatusCode, body: &[u8]) -> Result<T, ClientError> {
        if !status.is_success() {
            let message = serde_json::from_slice::<ApiError>(body)
                .map(|e| e.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(body).trim().to_owned());
            return Err(ClientError::Api { status, message });
        }
        serde_json::from_slice(body).map_err(|e| ClientError::Decode {
            status,
            reason: e.to_string(),
        })
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let (status, body) = self.call(Method::GET, path, None).await?;
        Self::decode(status, &body)
    }

    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let bytes = serde_json::to_vec(body).map_err(|e| ClientError::Decode {
            status: StatusCode::OK,
            reason: format!("cannot encode the request: {e}"),
        })?;
        let (status, body) = self.call(Method::POST, path, Some(bytes)).await?;
        Self::decode(status, &body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_urls() {
        let cp = ControlPlane::new("http://127.0.0.1:15010/").unwrap();
        assert_eq!(cp.authority, "127.0.0.1:15010");
        assert_eq!(cp.server(), "http://127.0.0.1:15010");
        assert_eq!(ControlPlane::new("http://cp").unwrap().authority, "cp:80");
        assert!(ControlPlane::new("https://cp").is_err());
        assert!(ControlPlane::new("not a url").is_err());
    }

    #[tokio::test]
    async fn refused_connection_is_one_short_line() {
        // Bind and drop to find a port nobody listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let cp = ControlPlane::new(&format!("http://127.0.0.1:{port}")).unwrap();
        let err = cp.get::<Vec<String>>("/x").await.unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "cannot reach the control plane at http://127.0.0.1:{port}: connection refused \
                 (is control-plane running? set --server or MESHLET_SERVER)"
            )
        );
    }
}
