//! The harness shared by the control plane's integration tests (`api.rs`,
//! `pipeline.rs`, `traces.rs`, `access.rs`, `certificates.rs`): a control plane on a loopback
//! port with a temporary data directory, driven over HTTPS (trusting
//! `DATA_DIR/ca.crt`, with the admin token from `DATA_DIR/admin.token`)
//! and through `meshctl` (`MESHLET_CA_FILE`, `MESHLET_TOKEN`).
//! [`ControlPlane::start`] runs it in this process (`server::run` on its
//! own thread and runtime, so a test may block on a `meshctl` process
//! meanwhile); [`ControlPlane::spawn`] runs the real `control-plane`
//! binary, for what only a process has (signals, `kill -9`, exit codes).
//! No fixed sleeps: every wait polls a condition against a deadline.
//!
//! Each test file is its own crate and compiles this module again, so an
//! item that one of them does not use would be reported as dead code there;
//! those items carry `#[allow(dead_code)]`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use http::{Method, StatusCode};
use http_body_util::BodyExt;
use http_body_util::Full;
use meshlet_api::access::{
    paths as access_paths, CreateToken, CreatedToken, ADMIN_TOKEN_FILE, CA_CERT_FILE,
};
use meshlet_api::mesh::{
    paths, Heartbeat, MeshState, Registration, RegistrationReply, RevisionRecord, WatchEvent,
};
use meshlet_client::{client_config_from_ca_file, Client, ClientError};
use meshlet_control_plane::server::{self, Settings};

pub const DEADLINE: Duration = Duration::from_secs(10);

/// The `meshctl` binary, a crate of its own: `MESHLET_BIN_DIR`, else next
/// to this test's executable (`target/<profile>/meshctl`), built by
/// `cargo build --bins` (or any `cargo test` that includes `-p meshctl`).
#[allow(dead_code)] // not used by access.rs
pub fn meshctl_binary() -> PathBuf {
    if let Some(dir) = std::env::var_os("MESHLET_BIN_DIR") {
        return PathBuf::from(dir).join("meshctl");
    }
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> → target/<profile>/meshctl
    let path = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target dir")
        .join("meshctl");
    assert!(
        path.exists(),
        "{} not built: run `cargo build --bins` (same profile) first",
        path.display()
    );
    path
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running control plane; stopped (in-process) or killed (process)
/// when dropped.
pub struct ControlPlane {
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    /// HTTPS trusting the mesh CA, as the bootstrap admin.
    pub client: Client,
    server: Server,
}

enum Server {
    Process(Child),
    InProcess(InProcess),
}

/// `server::run` on a thread of its own with its own runtime.
struct InProcess {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    done: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
    thread: std::thread::JoinHandle<()>,
}

impl ControlPlane {
    /// A token made through `POST /api/v1/tokens` with the admin token.
    #[allow(dead_code)] // used by access.rs and certificates.rs
    pub async fn create_token(&self, name: &str, role: &str, service: Option<&str>) -> String {
        let request = CreateToken {
            name: name.into(),
            role: role.into(),
            namespace: None,
            service: service.map(str::to_owned),
            ttl_seconds: None,
        };
        let (status, body) = self
            .call(
                Method::POST,
                access_paths::TOKENS,
                Some(serde_json::to_vec(&request).unwrap()),
            )
            .await
            .unwrap();
        assert_eq!(
            status,
            StatusCode::CREATED,
            "{}",
            String::from_utf8_lossy(&body)
        );
        serde_json::from_slice::<CreatedToken>(&body).unwrap().token
    }

    /// Runs the control plane in this process on `127.0.0.1:0` with
    /// `data_dir` and `extra` flags (parsed like the binary's), and waits
    /// until `/healthz` answers 200.
    pub async fn start(data_dir: &Path, extra: &[&str]) -> ControlPlane {
        let mut args = vec![
            "control-plane".to_owned(),
            "--listen".to_owned(),
            "127.0.0.1:0".to_owned(),
            "--data-dir".to_owned(),
            data_dir.display().to_string(),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        let settings = Settings::try_parse_from(args).expect("control-plane flags");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (finished, done) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            let served = runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                server::run(listener, settings, async {
                    let _ = stopped.await;
                })
                .await
            });
            // The runtime's tasks hold the store; it closes with them.
            drop(runtime);
            let _ = finished.send(());
            served.expect("control plane (in-process) failed");
        });
        let server = Server::InProcess(InProcess {
            stop: Some(stop),
            done: std::sync::Mutex::new(done),
            thread,
        });
        ControlPlane::starting(addr, data_dir, server).ready().await
    }

    fn starting(addr: SocketAddr, data_dir: &Path, server: Server) -> ControlPlane {
        ControlPlane {
            addr,
            data_dir: data_dir.to_owned(),
            client: Client::new(),
            server,
        }
    }

    /// A client trusting this control plane's CA (no token).
    pub fn anonymous(&self) -> Client {
        let tls = client_config_from_ca_file(&self.data_dir.join(CA_CERT_FILE)).expect("ca.crt");
        Client::new()
            .connect_timeout(Duration::from_secs(2))
            .timeout(DEADLINE)
            .tls(tls)
    }

    /// A client trusting this control plane's CA, sending `token`.
    pub fn client_with(&self, token: &str) -> Client {
        self.anonymous().bearer(token).expect("token")
    }

    /// The bootstrap admin token (`DATA_DIR/admin.token`).
    pub fn admin_token(&self) -> String {
        std::fs::read_to_string(self.data_dir.join(ADMIN_TOKEN_FILE))
            .expect("admin.token")
            .trim()
            .to_owned()
    }

    /// Starts the `control-plane` binary on a free port with `data_dir`
    /// and `extra` arguments, and waits until `/healthz` answers 200.
    #[allow(dead_code)] // not used by traces.rs
    pub async fn spawn(data_dir: &Path, extra: &[&str]) -> ControlPlane {
        let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let child = Command::new(env!("CARGO_BIN_EXE_control-plane"))
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--data-dir")
            .arg(data_dir)
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("start control-plane");
        ControlPlane::starting(addr, data_dir, Server::Process(child))
            .ready()
            .await
    }

    /// Waits until `ca.crt` and `admin.token` exist and `/healthz`
    /// answers 200 over HTTPS; panics if the server ended.
    async fn ready(mut self) -> ControlPlane {
        let started = Instant::now();
        loop {
            let files = [CA_CERT_FILE, ADMIN_TOKEN_FILE];
            if files.iter().all(|f| self.data_dir.join(f).exists()) {
                self.client = self.client_with(&self.admin_token());
                if let Ok((StatusCode::OK, _)) = self.call(Method::GET, paths::HEALTH, None).await {
                    return self;
                }
            }
            match &mut self.server {
                Server::Process(child) => {
                    if let Ok(Some(status)) = child.try_wait() {
                        panic!("control-plane exited early: {status}");
                    }
                }
                Server::InProcess(server) => {
                    assert!(!server.thread.is_finished(), "control-plane ended early");
                }
            }
            assert!(started.elapsed() < DEADLINE, "control-plane not ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The process of [`ControlPlane::spawn`].
    #[allow(dead_code)] // used by api.rs only
    pub fn child(&mut self) -> &mut Child {
        match &mut self.server {
            Server::Process(child) => child,
            Server::InProcess(_) => panic!("an in-process control plane has no process"),
        }
    }

    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        self.call_as(method, path, "application/json", body.unwrap_or_default())
            .await
    }

    /// A request with a body of any `content_type`.
    pub async fn call_as(
        &self,
        method: Method,
        path: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        self.call_with(&self.client, method, path, content_type, body)
            .await
    }

    /// A request through `client` (another token, or none).
    pub async fn call_with(
        &self,
        client: &Client,
        method: Method,
        path: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let authority = self.addr.to_string();
        let request = meshlet_client::request(method, &authority, path)
            .header("content-type", content_type)
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        let reply = client.fetch(&authority, request).await?;
        Ok((reply.status, reply.body))
    }

    /// `call`, with the answer parsed as JSON (panics, with the body, if
    /// it is not a `T`).
    pub async fn json<T: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> (StatusCode, T) {
        let (status, bytes) = self.call(method, path, body).await.unwrap();
        let value = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            panic!("{status} {path}: {e}: {}", String::from_utf8_lossy(&bytes))
        });
        (status, value)
    }

    /// The revision history, newest first.
    #[allow(dead_code)] // not used by traces.rs
    pub async fn revisions(&self) -> Vec<RevisionRecord> {
        self.json(Method::GET, paths::REVISIONS, None).await.1
    }

    /// Registers a healthy instance at 127.0.0.1:`port` in `default`;
    /// asserts 200.
    #[allow(dead_code)] // not used by access.rs
    pub async fn register(&self, id: &str, service: &str, port: u16) -> RegistrationReply {
        let reg = Registration {
            id: id.into(),
            service: service.into(),
            namespace: "default".into(),
            address: ([127, 0, 0, 1], port).into(),
            labels: Default::default(),
            healthy: true,
            app_protocol: None,
            role: meshlet_api::mesh::InstanceRole::Sidecar,
        };
        let body = serde_json::to_vec(&reg).unwrap();
        let (status, reply) = self.json(Method::POST, paths::INSTANCES, Some(body)).await;
        assert_eq!(status, StatusCode::OK);
        reply
    }

    #[allow(dead_code)] // used by api.rs only
    pub async fn heartbeat(&self, id: &str, healthy: bool) -> StatusCode {
        let body = serde_json::to_vec(&Heartbeat::health(healthy)).unwrap();
        let (status, _) = self
            .call(Method::PUT, &paths::heartbeat(id), Some(body))
            .await
            .unwrap();
        status
    }

    /// Opens `GET /api/v1/watch[?revision=N]` as the admin, checks the
    /// head (200, NDJSON) and returns the stream positioned at the first
    /// event.
    #[allow(dead_code)] // not used by access.rs
    pub async fn watch(&self, revision: Option<u64>) -> Watch {
        let query = revision
            .map(|r| format!("?revision={r}"))
            .unwrap_or_default();
        let authority = self.addr.to_string();
        let request =
            meshlet_client::request(Method::GET, &authority, &format!("{}{query}", paths::WATCH))
                .body(http_body_util::Empty::<Bytes>::new())
                .unwrap();
        // No overall timeout: the stream stays open.
        let tls = client_config_from_ca_file(&self.data_dir.join(CA_CERT_FILE)).unwrap();
        let client = Client::new()
            .connect_timeout(Duration::from_secs(2))
            .tls(tls)
            .bearer(&self.admin_token())
            .unwrap();
        let response = client.send(&authority, request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response.headers()["content-type"].to_str().unwrap(),
            "application/x-ndjson"
        );
        Watch {
            body: response.into_body(),
            buffer: Vec::new(),
            state: MeshState::default(),
        }
    }

    /// `meshctl --server https://ADDR ARGS` (as tester@box, with the CA
    /// and the admin token) → (exit code, stdout, stderr).
    #[allow(dead_code)] // not used by access.rs
    pub fn meshctl(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(meshctl_binary())
            .arg("--server")
            .arg(format!("https://{}", self.addr))
            .args(args)
            .env("USER", "tester")
            .env("HOSTNAME", "box")
            .env("MESHLET_CA_FILE", self.data_dir.join(CA_CERT_FILE))
            .env("MESHLET_TOKEN", self.admin_token())
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    }

    /// SIGKILL, no chance to flush or clean up (a [`ControlPlane::spawn`]ed
    /// one).
    #[allow(dead_code)] // not used by traces.rs
    pub fn kill9(mut self) {
        let child = self.child();
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        match &mut self.server {
            Server::Process(child) => {
                let _ = child.kill();
                let _ = child.wait();
            }
            // Asks for a graceful stop and waits for it (bounded), so that
            // the store is closed before a restart on the same directory.
            Server::InProcess(server) => {
                if let Some(stop) = server.stop.take() {
                    let _ = stop.send(());
                }
                if let Ok(done) = server.done.lock() {
                    let _ = done.recv_timeout(DEADLINE);
                }
            }
        }
    }
}

/// A watch stream and the state its events build up.
pub struct Watch {
    body: hyper::body::Incoming,
    buffer: Vec<u8>,
    pub state: MeshState,
}

impl Watch {
    /// The next line of the stream (within the deadline); `None` at its end.
    async fn line(&mut self) -> Option<Vec<u8>> {
        loop {
            if let Some(end) = self.buffer.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buffer.drain(..=end).collect();
                return Some(line);
            }
            let frame = tokio::time::timeout(DEADLINE, self.body.frame())
                .await
                .expect("no watch event within the deadline");
            match frame {
                None | Some(Err(_)) => return None,
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buffer.extend_from_slice(&data);
                    }
                }
            }
        }
    }

    /// Reads until the stream ends (each line within the deadline).
    #[allow(dead_code)] // used by api.rs only
    pub async fn until_end(&mut self) {
        while self.line().await.is_some() {}
    }

    /// The next event (within the deadline), applied to the held state.
    pub async fn next(&mut self) -> Option<WatchEvent> {
        let line = self.line().await?;
        let event: WatchEvent = serde_json::from_slice(&line).unwrap();
        self.state.apply(event.clone()).expect("event applies");
        Some(event)
    }

    /// Reads events until `done(state)`; returns the events read.
    #[allow(dead_code)] // used by api.rs only
    pub async fn until(&mut self, done: impl Fn(&MeshState) -> bool) -> Vec<WatchEvent> {
        let mut events = Vec::new();
        while !done(&self.state) {
            events.push(self.next().await.expect("stream ended"));
        }
        events
    }
}
