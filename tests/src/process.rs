//! Starting the real binaries on free ports and stopping them.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::process::{Child, Command};

use crate::{client, wait};

/// Path of a workspace binary built by `cargo build --bins`.
pub fn binary(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("MESHLET_BIN_DIR") {
        return PathBuf::from(dir).join(name);
    }
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let path = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target dir")
        .join(name);
    assert!(
        path.exists(),
        "{} not built: run `cargo build --bins` (same profile) first",
        path.display()
    );
    path
}

/// A loopback port that was free a moment ago.
///
/// Ports come from 15000-31999, below Linux's ephemeral range (32768+), so
/// they don't collide with the client side of the tests' own connections,
/// and each test process walks its own sequence (seeded by its pid), so
/// tests running in parallel don't pick the same one.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const FIRST: u32 = 15000;
    const SPAN: u32 = 17000;
    let seed = std::process::id().wrapping_mul(7919) % SPAN;
    for _ in 0..SPAN {
        let port = (FIRST + (seed + NEXT.fetch_add(1, Ordering::Relaxed)) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {FIRST}..{}", FIRST + SPAN);
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A running `sidecar` process. Killed on drop.
#[derive(Debug)]
pub struct SidecarProcess {
    child: Child,
    pub inbound: SocketAddr,
    pub outbound: SocketAddr,
    pub admin: SocketAddr,
    pub log: PathBuf,
    _dir: TempDir,
}

#[derive(Debug)]
pub struct SidecarBuilder {
    service: String,
    app_port: u16,
    config: Option<String>,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

impl SidecarProcess {
    pub fn builder(service: &str, app_port: u16) -> SidecarBuilder {
        SidecarBuilder {
            service: service.to_owned(),
            app_port,
            config: None,
            args: Vec::new(),
            env: Vec::new(),
        }
    }

    /// Sends a signal (e.g. SIGTERM) to the process.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = self.child.id().expect("process still running") as i32;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal).expect("signal sent");
    }

    /// Waits for the process to exit, at most `patience`.
    pub async fn wait_exit(&mut self, patience: Duration) -> ExitStatus {
        tokio::time::timeout(patience, self.child.wait())
            .await
            .expect("sidecar exits in time")
            .expect("wait for sidecar")
    }

    /// Resident memory (VmRSS) in bytes, from /proc.
    pub fn rss_bytes(&self) -> u64 {
        let pid = self.child.id().expect("process running");
        proc_status_kb(pid, "VmRSS:") * 1024
    }

    /// Peak resident memory (VmHWM) in bytes, from /proc.
    pub fn peak_rss_bytes(&self) -> u64 {
        let pid = self.child.id().expect("process running");
        proc_status_kb(pid, "VmHWM:") * 1024
    }

    /// The process's log so far (stderr), for assertion messages.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

fn proc_status_kb(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("field in /proc status")
}

impl Drop for SidecarProcess {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

impl SidecarBuilder {
    /// Standalone config (YAML text), written to a temp file.
    pub fn config(mut self, yaml: &str) -> Self {
        self.config = Some(yaml.to_owned());
        self
    }

    pub fn arg(mut self, arg: &str) -> Self {
        self.args.push(arg.to_owned());
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Spawns the process without waiting for it (for start-up failures).
    pub fn spawn(self) -> SidecarProcess {
        let dir = TempDir::new();
        let (inbound, outbound, admin) = (free_port(), free_port(), free_port());
        let log = dir.path.join("sidecar.log");
        let mut command = Command::new(binary("sidecar"));
        command
            .args([
                "--service",
                &self.service,
                "--app-port",
                &self.app_port.to_string(),
            ])
            .args([
                "--inbound-ip",
                "127.0.0.1",
                "--inbound-port",
                &inbound.to_string(),
            ])
            .args([
                "--outbound-port",
                &outbound.to_string(),
                "--admin-port",
                &admin.to_string(),
            ])
            .args(&self.args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .kill_on_drop(true);
        if let Some(yaml) = &self.config {
            let path = dir.path.join("mesh.yaml");
            std::fs::write(&path, yaml).expect("write config");
            command.arg("--config").arg(path);
        }
        let child = command.spawn().expect("spawn sidecar");
        SidecarProcess {
            child,
            inbound: loopback(inbound),
            outbound: loopback(outbound),
            admin: loopback(admin),
            log,
            _dir: dir,
        }
    }

    /// Spawns the process and waits until its admin `/live` answers and its
    /// listeners accept connections.
    pub async fn start(self) -> SidecarProcess {
        let mut sidecar = self.spawn();
        let admin = sidecar.admin;
        wait::until("sidecar /live", Duration::from_secs(10), || async {
            match client::get(admin, "/live").await {
                Ok(response) if response.status == 200 => Some(()),
                _ => None,
            }
        })
        .await;
        assert!(
            sidecar.is_running(),
            "sidecar exited: {}",
            sidecar.log_text()
        );
        sidecar
    }
}

/// A temporary directory removed on drop.
#[derive(Debug)]
pub struct TempDir {
    pub path: PathBuf,
}

impl TempDir {
    pub fn new() -> Self {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "meshlet-e2e-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir { path }
    }
}

impl Default for TempDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}
