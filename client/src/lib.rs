//! meshlet's one HTTP/1.1 client, for the calls meshlet's programs make
//! themselves: a sidecar's registration, heartbeats, watch stream, stats
//! reports, span exports and health probes of its app; every `meshctl`
//! command; the tests' plain requests. Proxied traffic never comes here: the
//! sidecar's upstream pool (`sidecar/src/upstream/`) owns those connections.
//!
//! Each call opens a fresh connection (these calls are rare, and a fresh
//! connection means no stale keep-alive connection to retry around):
//!
//! ```text
//! Client::send(authority, request)
//!   resolve authority ─► connect (connect timeout, first address that answers)
//!   ─► hyper http1 handshake, connection driven by its own task
//!   ─► request (User-Agent added when set) ─► response head    } all within
//! Client::fetch = send ─► read the whole body and trailers     } the timeout
//! ```
//!
//! With [`Client::tls`] every connection is TLS, verified against the
//! mesh CA only ([`client_config_from_ca_file`]), with the server name
//! taken from the authority's host; [`Client::bearer`] sends
//! `Authorization: Bearer TOKEN` on every request that has none.
//! [`Client::connect_to`] pins the address to connect to (one replica of
//! several behind one name) while the authority still names the peer.
//!
//! A request whose body hyper has taken in full, answered by the peer
//! closing or resetting the connection before any response byte, is
//! [`ClientError::ClosedBeforeAnswer`]: unlike a connect failure, it may
//! have taken effect (meshctl says so for applies and other changes).
//!
//! Errors are one [`ClientError`] carrying the authority, so a caller's log
//! line or CLI message says which peer failed and how; [`ClientError::cause`]
//! gives the short form (`connection refused`, `timeout`) for messages that
//! name the peer themselves.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::{Body, Incoming};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::Instant;

mod tls;

pub use tls::{client_config_from_ca_file, client_config_from_ca_pem, TlsError};

/// The error type bodies sent through the client may have.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a call failed.
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
    #[error("cannot connect to {authority} within {after:?}")]
    ConnectTimeout { authority: String, after: Duration },
    #[error("{authority} did not answer within {after:?}")]
    Timeout { authority: String, after: Duration },
    #[error("TLS handshake with {authority} failed: {source}")]
    Tls {
        authority: String,
        source: std::io::Error,
    },
    #[error("HTTP error talking to {authority}: {source}")]
    Http {
        authority: String,
        source: hyper::Error,
    },
    #[error("invalid request to {authority}: {source}")]
    Request {
        authority: String,
        source: http::Error,
    },
    /// The whole request was handed to the connection, then the peer
    /// closed (or reset) it before any byte of an answer: the request may
    /// or may not have taken effect.
    #[error("{authority} closed the connection after the request was sent, before answering")]
    ClosedBeforeAnswer { authority: String },
    /// A non-2xx answer, from [`Reply::success`].
    #[error("{authority} answered {status}: {body}")]
    Status {
        authority: String,
        status: StatusCode,
        body: String,
    },
}

impl ClientError {
    /// The status of a [`ClientError::Status`].
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ClientError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// What went wrong, without the peer's name: `connection refused`,
    /// `connect timeout`, `timeout`, or the underlying error's text.
    pub fn cause(&self) -> String {
        match self {
            ClientError::Connect { source, .. }
                if source.kind() == std::io::ErrorKind::ConnectionRefused =>
            {
                "connection refused".to_owned()
            }
            ClientError::Resolve { source, .. } | ClientError::Connect { source, .. } => {
                source.to_string()
            }
            ClientError::ConnectTimeout { .. } => "connect timeout".to_owned(),
            ClientError::Tls { source, .. } => format!("TLS handshake failed: {source}"),
            ClientError::Timeout { .. } => "timeout".to_owned(),
            ClientError::Http { source, .. } => source.to_string(),
            ClientError::ClosedBeforeAnswer { .. } => {
                "connection closed after the request was sent, before an answer".to_owned()
            }
            ClientError::Request { source, .. } => format!("invalid request: {source}"),
            ClientError::Status { status, body, .. } => format!("{status}: {body}"),
        }
    }
}

/// A fully read answer.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub trailers: Option<HeaderMap>,
}

impl Reply {
    /// The body as text (invalid UTF-8 replaced).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// A header's value, if present and visible ASCII.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// A trailer's value, if the body ended with trailers holding it.
    pub fn trailer(&self, name: &str) -> Option<&str> {
        self.trailers
            .as_ref()?
            .get(name)
            .and_then(|v| v.to_str().ok())
    }

    /// The reply itself if its status is 2xx, else [`ClientError::Status`]
    /// with the body's text.
    pub fn success(self, authority: &str) -> Result<Reply, ClientError> {
        if self.status.is_success() {
            return Ok(self);
        }
        Err(ClientError::Status {
            authority: authority.to_owned(),
            status: self.status,
            body: self.text().trim().to_owned(),
        })
    }
}

/// A request builder for `method path` with `Host: authority`.
pub fn request(method: Method, authority: &str, path_and_query: &str) -> http::request::Builder {
    Request::builder()
        .method(method)
        .uri(path_and_query)
        .header(header::HOST, authority)
}

/// How calls are made: timeouts and the `User-Agent`. Cheap to clone; no
/// connection is kept between calls.
#[derive(Clone, Default)]
pub struct Client {
    connect_timeout: Option<Duration>,
    timeout: Option<Duration>,
    user_agent: Option<HeaderValue>,
    authorization: Option<HeaderValue>,
    tls: Option<tokio_rustls::TlsConnector>,
    /// Connect here instead of resolving the authority (which still names
    /// the peer: `Host`, the TLS server name, errors).
    connect_to: Option<SocketAddr>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token.
        f.debug_struct("Client")
            .field("connect_timeout", &self.connect_timeout)
            .field("timeout", &self.timeout)
            .field("user_agent", &self.user_agent)
            .field("bearer", &self.authorization.is_some())
            .field("tls", &self.tls.is_some())
            .field("connect_to", &self.connect_to)
            .finish()
    }
}

impl Client {
    /// A client without timeouts or `User-Agent`.
    pub fn new() -> Client {
        Client::default()
    }

    /// Bounds the TCP connect (→ [`ClientError::ConnectTimeout`]).
    pub fn connect_timeout(mut self, after: Duration) -> Client {
        self.connect_timeout = Some(after);
        self
    }

    /// Bounds the whole call: up to the response head for [`Client::send`],
    /// up to the last body byte for [`Client::fetch`] (→
    /// [`ClientError::Timeout`]).
    pub fn timeout(mut self, after: Duration) -> Client {
        self.timeout = Some(after);
        self
    }

    /// Sent as `User-Agent` unless the request has one.
    pub fn user_agent(mut self, agent: &'static str) -> Client {
        self.user_agent = Some(HeaderValue::from_static(agent));
        self
    }

    /// Every connection is TLS with `config` (see
    /// [`client_config_from_ca_file`]); the server's certificate must name
    /// the authority's host.
    pub fn tls(mut self, config: std::sync::Arc<rustls::ClientConfig>) -> Client {
        self.tls = Some(tokio_rustls::TlsConnector::from(config));
        self
    }

    /// Connects to `addr` instead of resolving the authority: one address
    /// of a name that resolves to several (a control plane's replicas
    /// behind one DNS name). The authority still gives `Host`, the TLS
    /// server name the certificate must carry, and the name in errors.
    pub fn connect_to(mut self, addr: Option<SocketAddr>) -> Client {
        self.connect_to = addr;
        self
    }

    /// Whether connections are TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Sent as `Authorization: Bearer TOKEN` unless the request has an
    /// `Authorization` header. Fails on a token that is not a valid header
    /// value (control characters).
    pub fn bearer(mut self, token: &str) -> Result<Client, http::header::InvalidHeaderValue> {
        let mut value = HeaderValue::from_str(&format!("Bearer {}", token.trim()))?;
        value.set_sensitive(true);
        self.authorization = Some(value);
        Ok(self)
    }

    /// Sends `request` over a new connection to `authority` (`host:port`)
    /// and returns the response head with its body still streaming.
    pub async fn send<B>(
        &self,
        authority: &str,
        request: Request<B>,
    ) -> Result<Response<Incoming>, ClientError>
    where
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let deadline = self.deadline();
        self.within(authority, deadline, self.exchange(authority, request))
            .await
    }

    /// Like [`Client::send`], then reads the whole body (and trailers).
    pub async fn fetch<B>(&self, authority: &str, request: Request<B>) -> Result<Reply, ClientError>
    where
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let deadline = self.deadline();
        let call = async {
            let response = self.exchange(authority, request).await?;
            read_reply(authority, response).await
        };
        self.within(authority, deadline, call).await
    }

    fn deadline(&self) -> Option<Instant> {
        self.timeout.map(|after| Instant::now() + after)
    }

    async fn exchange<B>(
        &self,
        authority: &str,
        mut request: Request<B>,
    ) -> Result<Response<Incoming>, ClientError>
    where
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        for (name, value) in [
            (header::USER_AGENT, &self.user_agent),
            (header::AUTHORIZATION, &self.authorization),
        ] {
            if let Some(value) = value {
                let headers = request.headers_mut();
                if !headers.contains_key(&name) {
                    headers.insert(name, value.clone());
                }
            }
        }
        let stream = self.connect(authority).await?;
        let Some(tls) = &self.tls else {
            return over(authority, stream, request).await;
        };
        let tls_error = |source| ClientError::Tls {
            authority: authority.to_owned(),
            source,
        };
        let name = tls::server_name(authority).ok_or_else(|| {
            tls_error(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "the host is not a valid DNS name or IP address",
            ))
        })?;
        let stream = tls.connect(name, stream).await.map_err(tls_error)?;
        over(authority, stream, request).await
    }

    /// Connects to the first address of `authority` that accepts.
    /// (Or to the address of [`Client::connect_to`].)
    async fn connect(&self, authority: &str) -> Result<TcpStream, ClientError> {
        let addrs: Vec<SocketAddr> = match self.connect_to {
            Some(addr) => vec![addr],
            None => tokio::net::lookup_host(authority)
                .await
                .map_err(|source| ClientError::Resolve {
                    authority: authority.to_owned(),
                    source,
                })?
                .collect(),
        };
        let attempt = async {
            let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "no address");
            for addr in addrs {
                match TcpStream::connect(addr).await {
                    Ok(stream) => {
                        let _ = stream.set_nodelay(true);
                        return Ok(stream);
                    }
                    Err(error) => last = error,
                }
            }
            Err(ClientError::Connect {
                authority: authority.to_owned(),
                source: last,
            })
        };
        match self.connect_timeout {
            None => attempt.await,
            Some(after) => tokio::time::timeout(after, attempt).await.map_err(|_| {
                ClientError::ConnectTimeout {
                    authority: authority.to_owned(),
                    after,
                }
            })?,
        }
    }

    async fn within<T>(
        &self,
        authority: &str,
        deadline: Option<Instant>,
        call: impl std::future::Future<Output = Result<T, ClientError>>,
    ) -> Result<T, ClientError> {
        let (Some(deadline), Some(after)) = (deadline, self.timeout) else {
            return call.await;
        };
        tokio::time::timeout_at(deadline, call)
            .await
            .map_err(|_| ClientError::Timeout {
                authority: authority.to_owned(),
                after,
            })?
    }
}

/// Sends `request` over the connected `io` (plain or TLS).
async fn over<IO, B>(
    authority: &str,
    io: IO,
    request: Request<B>,
) -> Result<Response<Incoming>, ClientError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let http = |source| ClientError::Http {
        authority: authority.to_owned(),
        source,
    };
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(http)?;
    // The connection task ends once the sender and the response body are
    // dropped, or the peer closes.
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let sent = Arc::new(AtomicBool::new(false));
    let request = request.map(|body| SentBody {
        inner: Box::pin(body),
        sent: sent.clone(),
    });
    sender.send_request(request).await.map_err(|source| {
        if sent.load(Ordering::Relaxed) && closed_by_peer(&source) {
            ClientError::ClosedBeforeAnswer {
                authority: authority.to_owned(),
            }
        } else {
            http(source)
        }
    })
}

/// Whether `error` is the peer closing or resetting the connection (an
/// HTTP/1 message cut short, EOF without TLS close_notify, a reset).
fn closed_by_peer(error: &hyper::Error) -> bool {
    if error.is_incomplete_message() {
        return true;
    }
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::UnexpectedEof
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
            );
        }
        source = cause.source();
    }
    false
}

/// A request body that records when hyper has taken all of it (so a
/// connection closed afterwards is [`ClientError::ClosedBeforeAnswer`],
/// not a failure to send).
struct SentBody<B> {
    inner: std::pin::Pin<Box<B>>,
    sent: Arc<AtomicBool>,
}

impl<B: Body> Body for SentBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let polled = self.inner.as_mut().poll_frame(cx);
        if matches!(polled, std::task::Poll::Ready(None)) || self.inner.is_end_stream() {
            self.sent.store(true, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        let end = self.inner.is_end_stream();
        if end {
            self.sent.store(true, Ordering::Relaxed);
        }
        end
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Reads a response's whole body and trailers.
pub async fn read_reply(
    authority: &str,
    response: Response<Incoming>,
) -> Result<Reply, ClientError> {
    let (parts, body) = response.into_parts();
    let collected = body.collect().await.map_err(|source| ClientError::Http {
        authority: authority.to_owned(),
        source,
    })?;
    let trailers = collected.trailers().cloned();
    Ok(Reply {
        status: parts.status,
        version: parts.version,
        headers: parts.headers,
        body: collected.to_bytes(),
        trailers,
    })
}

#[cfg(test)]
mod tests;
