//! meshctl's view of the control plane's API on top of the workspace's
//! one HTTP client (`meshlet-client`): [`ControlPlane`] holds an HTTPS
//! [`meshlet_client::Client`] (trusting only the mesh CA of `--ca-file`,
//! sending the `--token` as a bearer token) and adds the API: JSON bodies,
//! `ApiError` answers, and one-line errors that say what to fix
//! ([`ClientError`]): an unreachable server, a failed TLS handshake, a
//! missing or refused token (401), a denied action (403), and a change
//! sent whole whose connection closed before the answer
//! ([`CLOSED_BEFORE_ANSWER`]: it may have been committed, so never
//! "cannot reach").
//!
//! Several servers (`--server URL1,URL2`, a control plane's replicas):
//! each call goes to the first that accepts a connection, in order.
//! A connection that could not be made sent nothing, so any request moves
//! on to the next server; a read (GET) also moves on when the answer
//! failed after it was sent; a change (POST, PUT, DELETE) that may have
//! reached a server is never sent again: [`CLOSED_BEFORE_ANSWER`] or
//! the failure itself. [`ControlPlane::answered`] records which server
//! and replica (`x-meshlet-replica`) answered and which were skipped,
//! for `-v` and the skipped-server note on stderr.
//!
//! `broadcast` reaches instances through [`plain_client`] (plain HTTP to
//! the sidecars' inbound listeners; no token, no TLS).

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, StatusCode, Uri};
use http_body_util::Full;
use meshlet_api::mesh::{ApiError, PARTIAL_HEADER};
use meshlet_client::Client;
use serde::de::DeserializeOwned;
use serde::Serialize;

pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// `--server`'s default: the control plane's default `--listen`.
pub const DEFAULT_SERVER: &str = "https://127.0.0.1:15010";

/// The hint of every "unreachable" line.
const REACH_HINT: &str = "is control-plane running? set --server or MESHLET_SERVER";
/// What meshctl says when a change was sent and the connection dropped
/// before the answer (issue 16's contract).
pub const CLOSED_BEFORE_ANSWER: &str = "the request was sent; the control plane closed the \
     connection before answering; check `meshctl history`";
/// The hint of every TLS failure.
const CA_HINT: &str = "set --ca-file or MESHLET_CA_FILE to the control plane's DATA_DIR/ca.crt";
/// The hint of a 401.
const TOKEN_HINT: &str = "set --token, MESHLET_TOKEN or --token-file to a token, \
                          e.g. the control plane's DATA_DIR/admin.token";

/// What went wrong talking to the control plane. Each displays as one line
/// that names the server and, where it helps, what to set.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid --server {server:?}: {reason} (expected https://HOST[:PORT])")]
    BadServer { server: String, reason: String },
    #[error("cannot reach the control plane at {server}: {cause} ({REACH_HINT})")]
    Unreachable { server: String, cause: String },
    /// Several servers, none reachable: each with its cause.
    #[error("cannot reach any control plane: {tried} ({REACH_HINT})")]
    NoneReachable { tried: String },
    /// A change (POST, PUT, DELETE) was sent whole and the connection
    /// closed before any answer: it may have been committed.
    #[error("{CLOSED_BEFORE_ANSWER}")]
    ClosedBeforeAnswer,
    #[error("no CA to verify the control plane at {server} with ({CA_HINT})")]
    NoCa { server: String },
    #[error("{reason} ({CA_HINT})")]
    CaFile { reason: String },
    #[error("TLS with the control plane at {server} failed: {cause} ({CA_HINT})")]
    Tls { server: String, cause: String },
    #[error(
        "cannot read the token file {path}: {reason} (set --token-file or MESHLET_TOKEN_FILE)"
    )]
    TokenFile { path: String, reason: String },
    #[error("the token {origin} is empty or not a valid header value")]
    BadToken { origin: String },
    /// 401: no token, or one the control plane does not know (revoked,
    /// expired, mistyped).
    #[error("the control plane at {server} refused the {what}: {message} ({TOKEN_HINT})")]
    Unauthenticated {
        server: String,
        what: &'static str,
        message: String,
    },
    /// 403: the token's role may not do this.
    #[error("permission denied: {message}")]
    Denied { message: String },
    /// Any other error answer of the API (`ApiError`).
    #[error("{message}")]
    Api { status: StatusCode, message: String },
    #[error("unexpected answer from the control plane ({status}): {reason}")]
    Decode { status: StatusCode, reason: String },
}

/// How meshctl authenticates: the global `--token`/`--token-file` and
/// `--ca-file` flags (or their environment variables).
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    pub token: Option<String>,
    pub token_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
}

impl Credentials {
    /// The token: `--token` wins over `--token-file` (whose content is
    /// trimmed); none if neither is set.
    pub fn load_token(&self) -> Result<Option<(String, String)>, ClientError> {
        if let Some(token) = self.token.as_deref().filter(|t| !t.trim().is_empty()) {
            return Ok(Some((token.trim().to_owned(), "of --token".to_owned())));
        }
        let Some(path) = &self.token_file else {
            return Ok(None);
        };
        let text = read_token_file(path)?;
        Ok(Some((text, format!("in {}", path.display()))))
    }
}

fn read_token_file(path: &Path) -> Result<String, ClientError> {
    let text = std::fs::read_to_string(path).map_err(|e| ClientError::TokenFile {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(ClientError::TokenFile {
            path: path.display().to_string(),
            reason: "the file is empty".to_owned(),
        });
    }
    Ok(token.to_owned())
}

/// The client `broadcast` reaches instances with: plain HTTP, no token.
pub fn plain_client(connect_timeout: Duration, timeout: Duration) -> Client {
    Client::new()
        .connect_timeout(connect_timeout)
        .timeout(timeout)
        .user_agent("meshctl")
}

/// The control plane's API at `--server` (one or several replicas).
#[derive(Debug)]
pub struct ControlPlane {
    /// The servers in order: (URL, `HOST:PORT`).
    servers: Vec<(String, String)>,
    client: Client,
    has_token: bool,
    answered: std::sync::Mutex<Answered>,
}

/// Who answered the calls so far.
#[derive(Debug, Default, Clone)]
pub struct Answered {
    /// The server that answered the last call.
    pub server: Option<String>,
    /// Its `x-meshlet-replica` header, if it sent one.
    pub replica: Option<String>,
    /// Servers skipped (unreachable) with why, each once.
    pub skipped: Vec<(String, String)>,
    /// Replicas a mesh-wide read had to leave out (`x-meshlet-partial`:
    /// they did not answer the replica that did in time), each once.
    pub partial: Vec<String>,
}

/// The header a replicated control plane names itself in.
pub const REPLICA_HEADER: &str = "x-meshlet-replica";

/// `https://A,https://B` → each server parsed by [`parse_server`],
/// duplicates dropped.
pub fn parse_servers(list: &str) -> Result<Vec<(String, String)>, ClientError> {
    let mut servers: Vec<(String, String)> = Vec::new();
    for server in list.split(',').map(str::trim) {
        if server.is_empty() {
            return Err(ClientError::BadServer {
                server: list.to_owned(),
                reason: "an empty URL in the list".to_owned(),
            });
        }
        let parsed = parse_server(server)?;
        if !servers.iter().any(|s| s.1 == parsed.1) {
            servers.push(parsed);
        }
    }
    Ok(servers)
}

/// `https://HOST[:PORT]` (no path) → (the URL without a trailing `/`,
/// `HOST:PORT`, port 443 by default).
pub fn parse_server(server: &str) -> Result<(String, String), ClientError> {
    let bad = |reason: &str| ClientError::BadServer {
        server: server.to_owned(),
        reason: reason.to_owned(),
    };
    let trimmed = server.trim_end_matches('/');
    let uri: Uri = trimmed.parse().map_err(|_| bad("not a URL"))?;
    match uri.scheme_str() {
        Some("https") => {}
        Some("http") => {
            return Err(bad(
                "the control plane speaks only HTTPS; use https:// and --ca-file",
            ))
        }
        _ => return Err(bad("no https:// scheme")),
    }
    if uri.path_and_query().is_some_and(|p| p.as_str() != "/") {
        return Err(bad("a path is not allowed"));
    }
    let authority = uri.authority().ok_or_else(|| bad("no host"))?;
    if authority.as_str().contains('@') {
        return Err(bad("user info is not allowed"));
    }
    let host = authority.host();
    if host.is_empty() {
        return Err(bad("no host"));
    }
    let port = authority.port_u16().unwrap_or(443);
    Ok((trimmed.to_owned(), format!("{host}:{port}")))
}

impl ControlPlane {
    /// `server` is `https://HOST[:PORT]`; the CA file is required (the
    /// API is always HTTPS), the token is not (the server's 401 says so).
    pub fn new(server: &str, credentials: &Credentials) -> Result<ControlPlane, ClientError> {
        let servers = parse_servers(server)?;
        let ca_file = credentials
            .ca_file
            .as_deref()
            .ok_or_else(|| ClientError::NoCa {
                server: servers[0].0.clone(),
            })?;
        let tls = meshlet_client::client_config_from_ca_file(ca_file).map_err(|e| {
            ClientError::CaFile {
                reason: e.to_string(),
            }
        })?;
        let mut client = Client::new()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .user_agent("meshctl")
            .tls(tls);
        let token = credentials.load_token()?;
        let has_token = token.is_some();
        if let Some((token, origin)) = token {
            client = client
                .bearer(&token)
                .map_err(|_| ClientError::BadToken { origin })?;
        }
        Ok(ControlPlane {
            servers,
            client,
            has_token,
            answered: Default::default(),
        })
    }

    /// The server answers are expected from (the first of the list, the
    /// one that answered once one did).
    pub fn server(&self) -> String {
        let answered = self.answered.lock().unwrap();
        answered
            .server
            .clone()
            .unwrap_or_else(|| self.servers[0].0.clone())
    }

    /// Who answered so far (for `-v` and the note on skipped servers).
    pub fn answered(&self) -> Answered {
        self.answered.lock().unwrap().clone()
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let changes = !matches!(method, Method::GET | Method::HEAD);
        let has_body = body.is_some();
        let body = Bytes::from(body.unwrap_or_default());
        let mut tried = Vec::new();
        for (server, authority) in &self.servers {
            let mut builder = meshlet_client::request(method.clone(), authority, path);
            if has_body {
                builder = builder.header(header::CONTENT_TYPE, "application/json");
            }
            let request =
                builder
                    .body(Full::new(body.clone()))
                    .map_err(|e| ClientError::BadServer {
                        server: server.clone(),
                        reason: e.to_string(),
                    })?;
            let err = match self.client.fetch(authority, request).await {
                Ok(reply) => {
                    let mut answered = self.answered.lock().unwrap();
                    answered.server = Some(server.clone());
                    answered.replica = reply.header(REPLICA_HEADER).map(str::to_owned);
                    let missing = reply.header(PARTIAL_HEADER).unwrap_or_default();
                    for replica in missing.split(',').map(str::trim).filter(|r| !r.is_empty()) {
                        if !answered.partial.iter().any(|known| known == replica) {
                            answered.partial.push(replica.to_owned());
                        }
                    }
                    return Ok((reply.status, reply.body));
                }
                Err(err) => err,
            };
            let next = match &err {
                // Nothing was sent: any request may go to the next one.
                meshlet_client::ClientError::Resolve { .. }
                | meshlet_client::ClientError::Connect { .. }
                | meshlet_client::ClientError::ConnectTimeout { .. } => true,
                // Sent, maybe taken: only a read is asked again.
                meshlet_client::ClientError::ClosedBeforeAnswer { .. }
                | meshlet_client::ClientError::Timeout { .. }
                | meshlet_client::ClientError::Http { .. } => !changes,
                _ => false,
            };
            if !next {
                return Err(match err {
                    err @ meshlet_client::ClientError::Tls { .. } => ClientError::Tls {
                        server: server.clone(),
                        cause: tls_cause(&err),
                    },
                    meshlet_client::ClientError::ClosedBeforeAnswer { .. } if changes => {
                        ClientError::ClosedBeforeAnswer
                    }
                    err => ClientError::Unreachable {
                        server: server.clone(),
                        cause: err.cause(),
                    },
                });
            }
            let mut answered = self.answered.lock().unwrap();
            if !answered.skipped.iter().any(|(s, _)| s == server) {
                answered.skipped.push((server.clone(), err.cause()));
            }
            tried.push((server.clone(), err));
        }
        Err(match tried.len() {
            1 => {
                let (server, err) = tried.pop().expect("one");
                ClientError::Unreachable {
                    server,
                    cause: err.cause(),
                }
            }
            _ => ClientError::NoneReachable {
                tried: tried
                    .iter()
                    .map(|(server, err)| format!("{server}: {}", err.cause()))
                    .collect::<Vec<_>>()
                    .join("; "),
            },
        })
    }

    /// `GET path` whose answer streams (`meshctl tap`): the body as it
    /// comes, once the head says 2xx (the request deadline bounds the head
    /// only). An error answer is read whole and turned into its error.
    pub async fn stream(&self, path: &str) -> Result<hyper::body::Incoming, ClientError> {
        let mut tried = Vec::new();
        for (server, authority) in &self.servers {
            let request = meshlet_client::request(Method::GET, authority, path)
                .body(Full::new(Bytes::new()))
                .map_err(|e| ClientError::BadServer {
                    server: server.clone(),
                    reason: e.to_string(),
                })?;
            let response = match self.client.send(authority, request).await {
                Ok(response) => response,
                Err(err @ meshlet_client::ClientError::Tls { .. }) => {
                    return Err(ClientError::Tls {
                        server: server.clone(),
                        cause: tls_cause(&err),
                    })
                }
                // Nothing was sent: the next replica may take it.
                Err(
                    err @ (meshlet_client::ClientError::Resolve { .. }
                    | meshlet_client::ClientError::Connect { .. }
                    | meshlet_client::ClientError::ConnectTimeout { .. }),
                ) => {
                    tried.push((server.clone(), err.cause()));
                    continue;
                }
                Err(err) => {
                    return Err(ClientError::Unreachable {
                        server: server.clone(),
                        cause: err.cause(),
                    })
                }
            };
            {
                let mut answered = self.answered.lock().unwrap();
                answered.server = Some(server.clone());
                answered.replica = response
                    .headers()
                    .get(REPLICA_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
            }
            let status = response.status();
            if !status.is_success() {
                let body = meshlet_client::read_reply(authority, response)
                    .await
                    .map(|reply| reply.body)
                    .unwrap_or_default();
                return Err(error_answer(server, self.has_token, status, &body));
            }
            return Ok(response.into_body());
        }
        Err(match tried.len() {
            1 => {
                let (server, cause) = tried.pop().expect("one");
                ClientError::Unreachable { server, cause }
            }
            _ => ClientError::NoneReachable {
                tried: tried
                    .iter()
                    .map(|(server, cause)| format!("{server}: {cause}"))
                    .collect::<Vec<_>>()
                    .join("; "),
            },
        })
    }

    /// An answer's body as `T`, or the error it stands for.
    fn decode<T: DeserializeOwned>(
        &self,
        status: StatusCode,
        body: &[u8],
    ) -> Result<T, ClientError> {
        if !status.is_success() {
            return Err(error_answer(&self.server(), self.has_token, status, body));
        }
        serde_json::from_slice(body).map_err(|e| ClientError::Decode {
            status,
            reason: e.to_string(),
        })
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let (status, body) = self.call(Method::GET, path, None).await?;
        self.decode(status, &body)
    }

    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let (status, body) = self.call(Method::DELETE, path, None).await?;
        self.decode(status, &body)
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
        self.decode(status, &body)
    }
}

/// The TLS error without the client's "TLS handshake with ADDR failed:"
/// prefix (the message names the server itself).
fn tls_cause(err: &meshlet_client::ClientError) -> String {
    match err {
        meshlet_client::ClientError::Tls { source, .. } => source.to_string(),
        other => other.cause(),
    }
}

/// The error a non-2xx answer stands for: its `ApiError` message (or its
/// text), with a hint for 401 and 403.
pub fn error_answer(server: &str, has_token: bool, status: StatusCode, body: &[u8]) -> ClientError {
    let message = serde_json::from_slice::<ApiError>(body)
        .map(|e| e.error)
        .unwrap_or_else(|_| String::from_utf8_lossy(body).trim().to_owned());
    match status {
        StatusCode::UNAUTHORIZED => ClientError::Unauthenticated {
            server: server.to_owned(),
            what: if has_token {
                "token"
            } else {
                "request without a token"
            },
            message,
        },
        StatusCode::FORBIDDEN => ClientError::Denied { message },
        _ => ClientError::Api { status, message },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_urls() {
        let (server, authority) = parse_server("https://127.0.0.1:15010/").unwrap();
        assert_eq!(server, "https://127.0.0.1:15010");
        assert_eq!(authority, "127.0.0.1:15010");
        assert_eq!(parse_server("https://cp").unwrap().1, "cp:443");
        assert_eq!(parse_server("https://[::1]:9").unwrap().1, "[::1]:9");
        let http = parse_server("http://127.0.0.1:15010")
            .unwrap_err()
            .to_string();
        assert!(http.contains("speaks only HTTPS"), "{http}");
        assert!(parse_server("not a url").is_err());
        assert!(parse_server("https://cp:1/api").is_err());
        assert!(parse_server("127.0.0.1:15010").is_err());
    }

    #[test]
    fn server_lists() {
        let servers = parse_servers("https://a:1, https://b:2/,https://a:1").unwrap();
        assert_eq!(
            servers,
            [
                ("https://a:1".to_owned(), "a:1".to_owned()),
                ("https://b:2".to_owned(), "b:2".to_owned())
            ]
        );
        let err = parse_servers("https://a:1,http://b:2")
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"http://b:2\""), "{err}");
        assert!(parse_servers("https://a:1,").is_err());
    }

    #[tokio::test]
    async fn several_unreachable_servers_are_each_named_with_their_cause() {
        // Two free ports, both bound while the second is chosen (else the
        // kernel may hand out the first again), then closed: refused.
        let bind = || std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let (first, second) = (bind(), bind());
        let port = |l: &std::net::TcpListener| l.local_addr().unwrap().port();
        let (a, b) = (port(&first), port(&second));
        drop((first, second));
        let dir = std::env::temp_dir().join(format!("meshctl-ca2-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = dir.join("ca.crt");
        std::fs::write(&ca, TEST_CA).unwrap();
        let list = format!("https://127.0.0.1:{a},https://127.0.0.1:{b}");
        let cp = ControlPlane::new(&list, &credentials(&ca)).unwrap();
        let err = cp
            .post::<_, serde_json::Value>("/x", &serde_json::json!({}))
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "cannot reach any control plane: https://127.0.0.1:{a}: connection refused; \
                 https://127.0.0.1:{b}: connection refused \
                 (is control-plane running? set --server or MESHLET_SERVER)"
            )
        );
        assert_eq!(cp.answered().skipped.len(), 2);
        assert_eq!(cp.answered().server, None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn credentials(ca: &Path) -> Credentials {
        Credentials {
            ca_file: Some(ca.to_owned()),
            ..Credentials::default()
        }
    }

    #[test]
    fn a_missing_ca_says_which_flag_to_set() {
        let err = ControlPlane::new(DEFAULT_SERVER, &Credentials::default()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "no CA to verify the control plane at https://127.0.0.1:15010 with \
             (set --ca-file or MESHLET_CA_FILE to the control plane's DATA_DIR/ca.crt)"
        );
        let err = ControlPlane::new(
            DEFAULT_SERVER,
            &credentials(Path::new("/nonexistent/ca.crt")),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("cannot read the CA file /nonexistent/ca.crt: "),
            "{err}"
        );
        assert!(err.ends_with("DATA_DIR/ca.crt)"), "{err}");
    }

    #[test]
    fn tokens_come_from_the_flag_or_the_file() {
        let dir = std::env::temp_dir().join(format!("meshctl-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("token");
        std::fs::write(&file, "  from-file \n").unwrap();
        let mut c = Credentials {
            token_file: Some(file.clone()),
            ..Credentials::default()
        };
        assert_eq!(c.load_token().unwrap().unwrap().0, "from-file");
        c.token = Some("from-flag".into());
        assert_eq!(c.load_token().unwrap().unwrap().0, "from-flag");
        std::fs::write(&file, "\n").unwrap();
        c.token = None;
        let err = c.load_token().unwrap_err().to_string();
        assert!(err.contains("the file is empty"), "{err}");
        assert!(Credentials::default().load_token().unwrap().is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn answers_401_and_403_are_one_line_with_a_hint() {
        let body = br#"{"error":"missing bearer token"}"#;
        let err = error_answer(DEFAULT_SERVER, false, StatusCode::UNAUTHORIZED, body);
        assert_eq!(
            err.to_string(),
            "the control plane at https://127.0.0.1:15010 refused the request without a token: \
             missing bearer token (set --token, MESHLET_TOKEN or --token-file to a token, \
             e.g. the control plane's DATA_DIR/admin.token)"
        );
        let err = error_answer(DEFAULT_SERVER, true, StatusCode::UNAUTHORIZED, b"nope");
        assert!(
            err.to_string().contains("refused the token: nope ("),
            "{err}"
        );
        let body = br#"{"error":"a viewer token may not apply resources"}"#;
        let err = error_answer(DEFAULT_SERVER, true, StatusCode::FORBIDDEN, body);
        assert_eq!(
            err.to_string(),
            "permission denied: a viewer token may not apply resources"
        );
        let err = error_answer(
            DEFAULT_SERVER,
            true,
            StatusCode::NOT_FOUND,
            b"{\"error\":\"x\"}",
        );
        assert!(matches!(err, ClientError::Api { status, .. } if status == StatusCode::NOT_FOUND));
    }

    #[tokio::test]
    async fn refused_connection_is_one_short_line() {
        // Bind and drop to find a port nobody listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = std::env::temp_dir().join(format!("meshctl-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = dir.join("ca.crt");
        std::fs::write(&ca, TEST_CA).unwrap();
        let cp =
            ControlPlane::new(&format!("https://127.0.0.1:{port}"), &credentials(&ca)).unwrap();
        let err = cp.get::<Vec<String>>("/x").await.unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "cannot reach the control plane at https://127.0.0.1:{port}: connection refused \
                 (is control-plane running? set --server or MESHLET_SERVER)"
            )
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A self-signed CA certificate (its key thrown away): the client only
    /// loads it; no server here presents a certificate.
    const TEST_CA: &str = "-----BEGIN CERTIFICATE-----
MIIBijCCATGgAwIBAgIUFSG6Dzf256L6T5UZs9YtN20YbIUwCgYIKoZIzj0EAwIw
GjEYMBYGA1UEAwwPbWVzaGN0bC10ZXN0LWNhMCAXDTI2MTIwMzEzMDUwNFoYDzIx
MjYxMTA5MTMwNTA0WjAaMRgwFgYDVQQDDA9tZXNoY3RsLXRlc3QtY2EwWTATBgcq
hkjOPQIBBggqhkjOPQMBBwNCAAQOMNFdvuRKFhll7rQFfGVv7o/Q82/xzMP/m6tB
0iPeTY1dAtN5bK0bXMjDzk0Kz1wJo/aJz/LusPNv4OTNi+BTo1MwUTAdBgNVHQ4E
FgQUCZZeXwEATOp7wQt5iNdrgGwcTU0wHwYDVR0jBBgwFoAUCZZeXwEATOp7wQt5
iNdrgGwcTU0wDwYDVR0TAQH/BAUwAwEB/zAKBggqhkjOPQQDAgNHADBEAiBiIcSY
DWkOaS+ee9JZ/azDkDu2MuwTGlMB32P4gCEp6QIgCkTxIDCKDl/9rj0t/pQI/GbY
iK0lLVM6dMX/oFc6tpQ=
-----END CERTIFICATE-----
";
}
