//! A minimal HTTP/1.1 client for the sidecar's own calls: health probes of
//! the local app, the control plane API and span exports. One fresh connection per call
//! (these calls are rare; proxied traffic uses [`crate::upstream::pool`] instead).

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Why a call failed before a response arrived.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot resolve {authority}: {source}")]
    Resolve {
        authority: String,
        source: std::io::Error,
    },
    #[error("cannot connect to {authority}: {source}")]
    Connect {
        authority: String,
        source: std::io::Error,
    },
    #[error("{authority} did not answer within {after:?}")]
    Timeout { authority: String, after: Duration },
    #[error("HTTP error talking to {authority}: {source}")]
    Http {
        authority: String,
        source: hyper::Error,
    },
    #[error("{authority} answered {status}: {body}")]
    Status {
        authority: String,
        status: StatusCode,
        body: String,
    },
    #[error("invalid request to {authority}: {source}")]
    Request {
        authority: String,
        source: http::Error,
    },
}

impl ClientError {
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ClientError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// Sends one request to `authority` (`host:port`) and returns the response
/// head with a streaming body. `timeout` bounds connect + response head.
pub async fn send(
    authority: &str,
    method: Method,
    path_and_query: &str,
    body: Option<Vec<u8>>,
    timeout: Duration,
) -> Result<Response<Incoming>, ClientError> {
    let body = body.map(|bytes| (HeaderValue::from_static("application/json"), bytes));
    send_typed(authority, method, path_and_query, body, timeout).await
}

/// POSTs `body` of `content_type` and returns the status once the whole
/// answer was read (an exporter's call: the answer's body is not needed).
pub async fn post(
    authority: &str,
    path: &str,
    content_type: &'static str,
    body: Vec<u8>,
    timeout: Duration,
) -> Result<StatusCode, ClientError> {
    let exchange = async {
        let body = Some((HeaderValue::from_static(content_type), body));
        let response = send_typed(authority, Method::POST, path, body, timeout).await?;
        let status = response.status();
        response
            .into_body()
            .collect()
            .await
            .map_err(|source| ClientError::Http {
                authority: authority.to_owned(),
                source,
            })?;
        Ok(status)
    };
    within(authority, timeout, exchange).await
}

async fn send_typed(
    authority: &str,
    method: Method,
    path_and_query: &str,
    body: Option<(HeaderValue, Vec<u8>)>,
    timeout: Duration,
) -> Result<Response<Incoming>, ClientError> {
    let exchange = async {
        let stream = connect(authority).await?;
        let _ = stream.set_nodelay(true);
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|source| ClientError::Http {
                authority: authority.to_owned(),
                source,
            })?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let mut request = Request::builder()
            .method(method)
            .uri(path_and_query)
            .header(header::HOST, authority)
            .header(header::USER_AGENT, "meshlet-sidecar");
        let body = match body {
            Some((content_type, bytes)) => {
                request = request.header(header::CONTENT_TYPE, content_type);
                bytes
            }
            None => Vec::new(),
        };
        let request = request
            .body(Full::new(Bytes::from(body)))
            .map_err(|source| ClientError::Request {
                authority: authority.to_owned(),
                source,
            })?;
        sender
            .send_request(request)
            .await
            .map_err(|source| ClientError::Http {
                authority: authority.to_owned(),
                source,
            })
    };
    within(authority, timeout, exchange).await
}

/// Like [`send`], but reads the whole body and turns a non-2xx answer into
/// [`ClientError::Status`].
pub async fn call(
    authority: &str,
    method: Method,
    path: &str,
    body: Option<Vec<u8>>,
    timeout: Duration,
) -> Result<Bytes, ClientError> {
    let read = async {
        let response = send(authority, method, path, body, timeout).await?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|source| ClientError::Http {
                authority: authority.to_owned(),
                source,
            })?
            .to_bytes();
        if !status.is_success() {
            return Err(ClientError::Status {
                authority: authority.to_owned(),
                status,
                body: String::from_utf8_lossy(&bytes).trim().to_owned(),
            });
        }
        Ok(bytes)
    };
    within(authority, timeout, read).await
}

async fn connect(authority: &str) -> Result<TcpStream, ClientError> {
    let addrs =
        tokio::net::lookup_host(authority)
            .await
            .map_err(|source| ClientError::Resolve {
                authority: authority.to_owned(),
                source,
            })?;
    let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "no address");
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(stream) => return Ok(stream),
            Err(e) => last = e,
        }
    }
    Err(ClientError::Connect {
        authority: authority.to_owned(),
        source: last,
    })
}

/// `call` bounded by `timeout`, which becomes [`ClientError::Timeout`].
async fn within<T>(
    authority: &str,
    timeout: Duration,
    call: impl std::future::Future<Output = Result<T, ClientError>>,
) -> Result<T, ClientError> {
    tokio::time::timeout(timeout, call)
        .await
        .map_err(|_| ClientError::Timeout {
            authority: authority.to_owned(),
            after: timeout,
        })?
}
