//! Reaching a control plane the way issue 13 requires: HTTPS verified
//! against the mesh CA (`DATA_DIR/ca.crt`) and a bearer token (the admin
//! token from `DATA_DIR/admin.token`, or a sidecar token the harness
//! creates through `POST /api/v1/tokens`).
//!
//! Both control-plane kinds ([`crate::ControlPlaneProcess`] and
//! [`crate::inprocess::ControlPlane`]) dereference to a [`CpAccess`], so
//! `cp.url()`, `cp.admin_token()`, `cp.ca_file()`, `cp.client()`,
//! `cp.get_json(path)` and `cp.sidecar_token_file(ns, service)` read the
//! same on either; builders and [`crate::meshctl`] take any
//! [`ControlPlaneRef`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http::Method;
use http_body_util::Full;
use meshlet_api::access::{CreateToken, CreatedToken, ADMIN_TOKEN_FILE, CA_CERT_FILE};
use meshlet_client::{Client, Reply};

/// Where a control plane listens and keeps its files.
#[derive(Debug, Clone)]
pub struct CpAccess {
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    /// Sidecars get the admin token instead of a sidecar token of their
    /// own: for the data-loss scenario, where the store (and every token
    /// issued from it) is gone but `admin.token` and the CA survive.
    pub sidecars_as_admin: bool,
}

/// Anything that names a control plane: both harness kinds and
/// [`CpAccess`] itself.
pub trait ControlPlaneRef {
    fn access(&self) -> &CpAccess;
}

impl ControlPlaneRef for CpAccess {
    fn access(&self) -> &CpAccess {
        self
    }
}

/// What a sidecar needs to talk to a control plane: `--control-plane`,
/// `--token-file`, `--ca-file`.
#[derive(Debug, Clone)]
pub struct SidecarCredentials {
    pub url: String,
    pub token_file: PathBuf,
    pub ca_file: PathBuf,
}

impl SidecarCredentials {
    /// The three flags.
    pub fn args(&self) -> Vec<String> {
        vec![
            "--control-plane".into(),
            self.url.clone(),
            "--token-file".into(),
            self.token_file.display().to_string(),
            "--ca-file".into(),
            self.ca_file.display().to_string(),
        ]
    }
}

impl CpAccess {
    pub fn new(addr: SocketAddr, data_dir: &Path) -> CpAccess {
        CpAccess {
            addr,
            data_dir: data_dir.to_owned(),
            sidecars_as_admin: false,
        }
    }

    /// `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// `127.0.0.1:PORT`.
    pub fn authority(&self) -> String {
        self.addr.to_string()
    }

    /// `DATA_DIR/ca.crt`.
    pub fn ca_file(&self) -> PathBuf {
        self.data_dir.join(CA_CERT_FILE)
    }

    /// `DATA_DIR/admin.token`.
    pub fn admin_token_file(&self) -> PathBuf {
        self.data_dir.join(ADMIN_TOKEN_FILE)
    }

    /// The admin token (the control plane writes it on first start).
    pub fn admin_token(&self) -> String {
        std::fs::read_to_string(self.admin_token_file())
            .unwrap_or_else(|e| panic!("read {}: {e}", self.admin_token_file().display()))
            .trim()
            .to_owned()
    }

    /// A client that trusts the mesh CA only, without a token.
    pub fn anonymous_client(&self) -> Client {
        let tls = meshlet_client::client_config_from_ca_file(&self.ca_file())
            .unwrap_or_else(|e| panic!("CA {}: {e}", self.ca_file().display()));
        Client::new()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(30))
            .tls(tls)
    }

    /// A client with the CA and `token`.
    pub fn client_with(&self, token: &str) -> Client {
        self.anonymous_client()
            .bearer(token)
            .expect("token is a header value")
    }

    /// A client with the CA and the admin token.
    pub fn client(&self) -> Client {
        self.client_with(&self.admin_token())
    }

    /// Sends `method path` (JSON `body` if any) with `client`.
    pub async fn call(
        &self,
        client: &Client,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Reply {
        let mut request = meshlet_client::request(method.clone(), &self.authority(), path);
        let body = match body {
            Some(json) => {
                request = request.header("content-type", "application/json");
                Bytes::from(json.to_string())
            }
            None => Bytes::new(),
        };
        let request = request.body(Full::new(body)).expect("valid request");
        client
            .fetch(&self.authority(), request)
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    /// `GET path` as admin.
    pub async fn get(&self, path: &str) -> Reply {
        self.call(&self.client(), Method::GET, path, None).await
    }

    /// `POST path` with a JSON body as admin.
    pub async fn post_json(&self, path: &str, body: &serde_json::Value) -> Reply {
        self.call(&self.client(), Method::POST, path, Some(body))
            .await
    }

    /// GET an API path as admin and decode JSON (asserts 200).
    pub async fn get_json(&self, path: &str) -> serde_json::Value {
        let reply = self.get(path).await;
        assert_eq!(reply.status, 200, "GET {path}: {}", reply.text());
        serde_json::from_slice(&reply.body).expect("API answers JSON")
    }

    /// Creates a token through `POST /api/v1/tokens` (as admin) and returns
    /// its secret.
    pub async fn create_token(&self, create: &CreateToken) -> String {
        let body = serde_json::to_value(create).expect("CreateToken is JSON");
        let reply = self
            .post_json(meshlet_api::access::paths::TOKENS, &body)
            .await;
        assert!(
            reply.status.is_success(),
            "create token {}: {} {}",
            create.name,
            reply.status,
            reply.text()
        );
        let created: CreatedToken = serde_json::from_slice(&reply.body).expect("CreatedToken");
        created.token
    }

    /// A sidecar token for `namespace/service` in a 0600 file next to the
    /// data directory (created once per control plane and service; later
    /// calls return the same file).
    pub async fn sidecar_token_file(&self, namespace: &str, service: &str) -> PathBuf {
        let dir = self.data_dir.with_extension("tokens");
        let path = dir.join(format!("{namespace}-{service}.token"));
        if path.exists() {
            return path;
        }
        let token = self
            .create_token(&CreateToken {
                name: format!("sidecar-{namespace}-{service}-{}", fastrand::u32(..)),
                role: "sidecar".into(),
                namespace: Some(namespace.into()),
                service: Some(service.into()),
                ttl_seconds: None,
            })
            .await;
        write_private(&path, &token);
        path
    }

    /// What a sidecar of `namespace/service` passes to reach this control
    /// plane.
    pub async fn sidecar_credentials(&self, namespace: &str, service: &str) -> SidecarCredentials {
        let token_file = if self.sidecars_as_admin {
            self.admin_token_file()
        } else {
            self.sidecar_token_file(namespace, service).await
        };
        SidecarCredentials {
            url: self.url(),
            token_file,
            ca_file: self.ca_file(),
        }
    }

    /// Waits until the control plane wrote its CA and admin token and
    /// answers `GET /healthz` over TLS; `alive` is asked on every round (a
    /// dead control plane fails at once).
    pub async fn wait_serving(&self, mut alive: impl FnMut() -> Result<(), String>) {
        crate::wait::until(
            "control-plane https /healthz",
            Duration::from_secs(15),
            || {
                let up = alive();
                async move {
                    if let Err(why) = up {
                        panic!("control plane ended while starting: {why}");
                    }
                    let token = std::fs::read_to_string(self.admin_token_file()).ok()?;
                    if token.trim().is_empty() || !self.ca_file().exists() {
                        return None;
                    }
                    let client = self.anonymous_client().timeout(Duration::from_secs(2));
                    let request =
                        meshlet_client::request(Method::GET, &self.authority(), "/healthz")
                            .body(Full::new(Bytes::new()))
                            .ok()?;
                    let reply = client.fetch(&self.authority(), request).await.ok()?;
                    (reply.status == 200).then_some(())
                }
            },
        )
        .await;
    }
}

/// Deletes the data directory (a lost disk) but keeps the credentials an
/// operator keeps elsewhere: the CA (`ca.crt`, `ca.key`) and
/// `admin.token`, which the control plane adopts again on start. Every
/// other token was in the store and is gone.
pub fn wipe_keeping_credentials(data_dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let kept: Vec<(String, Vec<u8>, u32)> = [CA_CERT_FILE, "ca.key", ADMIN_TOKEN_FILE]
        .into_iter()
        .filter_map(|name| {
            let path = data_dir.join(name);
            let bytes = std::fs::read(&path).ok()?;
            let mode = std::fs::metadata(&path).ok()?.permissions().mode();
            Some((name.to_owned(), bytes, mode))
        })
        .collect();
    std::fs::remove_dir_all(data_dir).expect("remove data dir");
    std::fs::create_dir_all(data_dir).expect("create data dir");
    std::fs::set_permissions(data_dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    for (name, bytes, mode) in kept {
        let path = data_dir.join(name);
        std::fs::write(&path, bytes).expect("restore a credential");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    }
}

/// Writes `text` to `path` with mode 0600 (parents created).
pub fn write_private(path: &Path, text: &str) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).expect("create token dir");
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    file.write_all(text.as_bytes()).expect("write token");
    file.write_all(b"\n").expect("write token");
}

impl<T: ControlPlaneRef + ?Sized> ControlPlaneRef for &T {
    fn access(&self) -> &CpAccess {
        (**self).access()
    }
}

/// The value after `flag` in `args`, if there.
pub fn flag_value<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    let at = args.iter().position(|a| a == flag)?;
    args.get(at + 1).map(String::as_str)
}
