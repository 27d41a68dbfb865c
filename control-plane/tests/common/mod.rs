//! The harness shared by the control plane's integration tests (`api.rs`,
//! `pipeline.rs`, `traces.rs`): a control plane on a loopback port with a
//! temporary data directory, driven over HTTP and through `meshctl`.
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
use http::{Method, Request, StatusCode};
use http_body_util::Full;
use meshlet_api::mesh::{
    paths, Heartbeat, MeshState, Registration, RegistrationReply, RevisionRecord, WatchEvent,
};
use meshlet_client::{Client, ClientError};
use meshlet_control_plane::server::{self, Settings};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

pub const DEADLINE: Duration = Duration::from_secs(10);

/// The `meshctl` binary, a crate of its own: `MESHLET_BIN_DIR`, else next
/// to this test's executable (`target/<profile>/meshctl`), built by
/// `cargo build --bins` (or any `cargo test` that includes `-p meshctl`).
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
        ControlPlane { addr, server }.ready().await
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
        ControlPlane {
            addr,
            server: Server::Process(child),
        }
        .ready()
        .await
    }

    /// Waits until `/healthz` answers 200; panics if the server ended.
    async fn ready(mut self) -> ControlPlane {
        let started = Instant::now();
        loop {
            if let Ok((StatusCode::OK, _)) = self.call(Method::GET, paths::HEALTH, None).await {
                return self;
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
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header("host", self.addr.to_string())
            .header("content-type", content_type)
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        let reply = Client::new()
            .connect_timeout(Duration::from_secs(2))
            .timeout(DEADLINE)
            .fetch(&self.addr.to_string(), request)
            .await?;
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
    pub async fn register(&self, id: &str, service: &str, port: u16) -> RegistrationReply {
        let reg = Registration {
            id: id.into(),
            service: service.into(),
            namespace: "default".into(),
            address: ([127, 0, 0, 1], port).into(),
            labels: Default::default(),
            healthy: true,
        };
        let body = serde_json::to_vec(&reg).unwrap();
        let (status, reply) = self.json(Method::POST, paths::INSTANCES, Some(body)).await;
        assert_eq!(status, StatusCode::OK);
        reply
    }

    #[allow(dead_code)] // used by api.rs only
    pub async fn heartbeat(&self, id: &str, healthy: bool) -> StatusCode {
        let body = serde_json::to_vec(&Heartbeat { healthy }).unwrap();
        let (status, _) = self
            .call(Method::PUT, &paths::heartbeat(id), Some(body))
            .await
            .unwrap();
        status
    }

    /// Opens `GET /api/v1/watch[?revision=N]`, checks the head (200,
    /// NDJSON) and returns the stream positioned at the first event.
    pub async fn watch(&self, revision: Option<u64>) -> Watch {
        let mut stream = TcpStream::connect(self.addr).await.unwrap();
        let query = revision
            .map(|r| format!("?revision={r}"))
            .unwrap_or_default();
        let head = format!("GET {}{query} HTTP/1.0\r\n\r\n", paths::WATCH);
        stream.write_all(head.as_bytes()).await.unwrap();
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        reader.read_line(&mut line).await.unwrap();
        assert!(line.contains(" 200 "), "{line}");
        let mut saw_ndjson = false;
        loop {
            line.clear();
            reader.read_line(&mut line).await.unwrap();
            saw_ndjson |= line.eq_ignore_ascii_case("content-type: application/x-ndjson\r\n");
            if line == "\r\n" {
                break;
            }
        }
        assert!(saw_ndjson);
        Watch {
            reader,
            state: MeshState::default(),
        }
    }

    /// `meshctl --server http://ADDR ARGS` (as tester@box) → (exit code,
    /// stdout, stderr).
    pub fn meshctl(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(meshctl_binary())
            .arg("--server")
            .arg(format!("http://{}", self.addr))
            .args(args)
            .env("USER", "tester")
            .env("HOSTNAME", "box")
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
    pub reader: BufReader<TcpStream>,
    pub state: MeshState,
}

impl Watch {
    /// The next event (within the deadline), applied to the held state.
    pub async fn next(&mut self) -> Option<WatchEvent> {
        let mut line = String::new();
        let read = tokio::time::timeout(DEADLINE, self.reader.read_line(&mut line))
            .await
            .expect("no watch event within the deadline")
            .unwrap();
        if read == 0 {
            return None;
        }
        let event: WatchEvent = serde_json::from_str(&line).unwrap();
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
