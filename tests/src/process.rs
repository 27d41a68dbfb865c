//! Starting the real binaries on free ports and stopping them.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::process::{Child, Command};

use crate::access::{flag_value, ControlPlaneRef, CpAccess, SidecarCredentials};
use crate::{admin, client, wait};

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

/// `127.0.0.1:port`.
pub fn loopback(port: u16) -> SocketAddr {
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
    /// `None`: a gateway (`--mode gateway`, no app).
    app_port: Option<u16>,
    config: Option<String>,
    args: Vec<String>,
    env: Vec<(String, String)>,
    outbound_port: Option<u16>,
    control_plane: Option<CpAccess>,
}

impl SidecarProcess {
    /// Waits (10 s at most) until a `GET /` through the inbound listener
    /// is answered 200 by the app: the sidecar routes to it.
    pub async fn wait_routes_to_app(&self) {
        wait::until(
            "sidecar routes to the app",
            Duration::from_secs(10),
            || async {
                let reply = client::get(self.inbound, "/").await.ok()?;
                (reply.status == 200).then_some(())
            },
        )
        .await;
    }

    pub fn builder(service: &str, app_port: u16) -> SidecarBuilder {
        SidecarBuilder {
            service: service.to_owned(),
            app_port: Some(app_port),
            config: None,
            args: Vec::new(),
            env: Vec::new(),
            outbound_port: None,
            control_plane: None,
        }
    }

    /// An ingress gateway for `service`: `--mode gateway`, no `--app-port`.
    pub fn gateway(service: &str) -> SidecarBuilder {
        SidecarBuilder {
            app_port: None,
            args: vec!["--mode".to_owned(), "gateway".to_owned()],
            ..SidecarProcess::builder(service, 0)
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

    /// The `--config` file given with [`SidecarBuilder::config`] (rewrite
    /// it and send SIGHUP to reload).
    pub fn config_path(&self) -> PathBuf {
        self._dir.path.join("mesh.yaml")
    }

    /// The process's log so far (stderr), for assertion messages.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// What the sidecar wrote to standard output (the access log).
    pub fn stdout_text(&self) -> String {
        std::fs::read_to_string(self._dir.path.join("stdout.log")).unwrap_or_default()
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// `/config_dump` as JSON.
    pub async fn config_dump(&self) -> serde_json::Value {
        admin::config_dump(self.admin).await
    }

    /// Addresses of the healthy endpoints of `service` in this sidecar's
    /// current snapshot, sorted.
    pub async fn endpoints_of(&self, service: &str) -> Vec<String> {
        admin::endpoints_of(self.admin, service).await
    }

    /// The configuration revision the sidecar routes with.
    pub async fn revision(&self) -> u64 {
        admin::revision(self.admin).await
    }

    /// Waits until `/ready` answers 200.
    pub async fn wait_ready(&self, patience: Duration) {
        admin::wait_ok("sidecar /ready", self.admin, "/ready", patience).await;
    }
}

/// A running `control-plane` process with its own data directory. Killed
/// on drop (the data directory goes with its [`TempDir`]).
#[derive(Debug)]
pub struct ControlPlaneProcess {
    child: Child,
    access: CpAccess,
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    args: Vec<String>,
    /// `ulimit -n` (soft and hard) the process starts under, if any.
    open_file_limit: Option<u64>,
}

impl ControlPlaneProcess {
    /// Starts a control plane on a free port with `data_dir` and extra
    /// flags (e.g. `["--ttl", "2s"]`), and waits for `/healthz`.
    pub async fn start(data_dir: &std::path::Path, args: &[&str]) -> ControlPlaneProcess {
        let addr = loopback(free_port());
        Self::start_on(
            addr,
            data_dir,
            args.iter().map(|a| a.to_string()).collect(),
            None,
        )
        .await
    }

    /// [`ControlPlaneProcess::start`] on `addr` (a port the test chose
    /// beforehand, e.g. a second replica's that sidecars already list).
    pub async fn start_at(
        addr: SocketAddr,
        data_dir: &std::path::Path,
        args: &[&str],
    ) -> ControlPlaneProcess {
        let args = args.iter().map(|a| a.to_string()).collect();
        Self::start_on(addr, data_dir, args, None).await
    }

    /// [`ControlPlaneProcess::start`] under `ulimit -n limit` (soft and
    /// hard, so the control plane cannot raise it).
    pub async fn start_with_open_file_limit(
        data_dir: &std::path::Path,
        args: &[&str],
        limit: u64,
    ) -> ControlPlaneProcess {
        let addr = loopback(free_port());
        let args = args.iter().map(|a| a.to_string()).collect();
        Self::start_on(addr, data_dir, args, Some(limit)).await
    }

    async fn start_on(
        addr: SocketAddr,
        data_dir: &std::path::Path,
        args: Vec<String>,
        open_file_limit: Option<u64>,
    ) -> Self {
        let log = data_dir.with_extension(format!("{}.log", addr.port()));
        let mut command = match open_file_limit {
            None => Command::new(binary("control-plane")),
            Some(limit) => {
                let mut sh = Command::new("sh");
                sh.arg("-c")
                    .arg(format!("ulimit -n {limit} && exec \"$0\" \"$@\""))
                    .arg(binary("control-plane"));
                sh
            }
        };
        let child = command
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--data-dir")
            .arg(data_dir)
            .args(&args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log)
                    .expect("log file"),
            )
            .kill_on_drop(true)
            .spawn()
            .expect("spawn control-plane");
        let mut cp = ControlPlaneProcess {
            child,
            access: CpAccess::new(addr, data_dir),
            addr,
            data_dir: data_dir.to_owned(),
            log,
            args,
            open_file_limit,
        };
        let access = cp.access.clone();
        let log = cp.log.clone();
        let child = &mut cp.child;
        access
            .wait_serving(|| match child.try_wait() {
                Ok(None) => Ok(()),
                _ => Err(std::fs::read_to_string(&log).unwrap_or_default()),
            })
            .await;
        cp
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

    /// CPU time (user + system) the process used so far, from
    /// `/proc/PID/stat` (clock ticks of 10 ms, Linux's `USER_HZ`).
    pub fn cpu_time(&self) -> Duration {
        let pid = self.child.id().expect("process running");
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc stat");
        // The fields after the command name (which may hold spaces):
        // state is the 3rd field (skipped), utime the 14th, stime the 15th.
        let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
        let fields: Vec<u64> = after
            .split_whitespace()
            .skip(1)
            .map(|f| f.parse().unwrap_or(0))
            .collect();
        let ticks = fields.get(10).copied().unwrap_or(0) + fields.get(11).copied().unwrap_or(0);
        Duration::from_millis(ticks * 10)
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends `signal` (e.g. SIGSTOP: a replica that accepts connections
    /// and never answers).
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        if let Some(pid) = self.child.id() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal);
        }
    }

    /// `kill -9`, and wait for the process to be gone.
    pub async fn kill9(&mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }

    /// `kill -9`, deletes the data directory (a lost disk), and starts
    /// again empty on the same address.
    pub async fn wipe_and_restart(&mut self) {
        self.kill9().await;
        crate::access::wipe_keeping_credentials(&self.data_dir);
        self.start_again().await;
    }

    /// Starts again on the same address and data directory.
    pub async fn restart(&mut self) {
        self.kill9().await;
        self.start_again().await;
    }

    async fn start_again(&mut self) {
        let as_admin = self.access.sidecars_as_admin;
        let mut again = Self::start_on(
            self.addr,
            &self.data_dir,
            self.args.clone(),
            self.open_file_limit,
        )
        .await;
        again.access.sidecars_as_admin = as_admin;
        *self = again;
    }

    /// Sidecars started from now on get the admin token (see
    /// [`CpAccess::sidecars_as_admin`]).
    pub fn sidecars_use_the_admin_token(&mut self) {
        self.access.sidecars_as_admin = true;
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Writes `yaml` to `dir/file` and runs `meshctl apply -f` on it
    /// against this control plane; asserts that it succeeded.
    pub async fn apply(&self, dir: &std::path::Path, file: &str, yaml: &str) {
        let path = dir.join(file);
        std::fs::write(&path, yaml).expect("write the file to apply");
        let out = meshctl(self, &["apply", "-f", path.to_str().unwrap()]).await;
        assert!(out.success(), "apply {file}: {out:?}");
    }
}

impl std::ops::Deref for ControlPlaneProcess {
    type Target = CpAccess;
    fn deref(&self) -> &CpAccess {
        &self.access
    }
}

impl ControlPlaneRef for ControlPlaneProcess {
    fn access(&self) -> &CpAccess {
        &self.access
    }
}

impl Drop for ControlPlaneProcess {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// What a `meshctl` run printed and how it exited.
#[derive(Debug)]
pub struct MeshctlOutput {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl MeshctlOutput {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

/// Runs `meshctl ARGS` against `cp`: `MESHLET_SERVER`, `MESHLET_TOKEN`
/// (the admin token) and `MESHLET_CA_FILE` set for it.
pub async fn meshctl(cp: &impl ControlPlaneRef, args: &[&str]) -> MeshctlOutput {
    let cp = cp.access();
    let token = cp.admin_token();
    let ca = cp.ca_file().display().to_string();
    let env = [
        ("MESHLET_SERVER", cp.url()),
        ("MESHLET_TOKEN", token),
        ("MESHLET_CA_FILE", ca),
    ];
    meshctl_with(&env, args).await
}

/// Runs `meshctl ARGS` with exactly the `MESHLET_*` variables in `env`
/// (the test's own `MESHLET_*` are removed).
pub async fn meshctl_with(env: &[(&str, String)], args: &[&str]) -> MeshctlOutput {
    let mut command = Command::new(binary("meshctl"));
    for (key, _) in std::env::vars() {
        if key.starts_with("MESHLET_") {
            command.env_remove(key);
        }
    }
    command.envs(env.iter().map(|(k, v)| (k, v)));
    let output = tokio::time::timeout(
        Duration::from_secs(30),
        command.args(args).stdin(Stdio::null()).output(),
    )
    .await
    .expect("meshctl finishes within 30s")
    .expect("run meshctl");
    MeshctlOutput {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
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

    /// The outbound listener's port, for an app that must know it before
    /// the sidecar starts (default: a free port).
    pub fn outbound_port(mut self, port: u16) -> Self {
        self.outbound_port = Some(port);
        self
    }

    /// Registers with and routes from `cp`, with a sidecar token for its
    /// service (created by [`SidecarBuilder::start`]) and the mesh CA. The
    /// snapshot file goes to the sidecar's temp dir unless the test passes
    /// `--snapshot-file` itself.
    pub fn control_plane(mut self, cp: &impl ControlPlaneRef) -> Self {
        self.control_plane = Some(cp.access().clone());
        self
    }

    /// `--control-plane URL --token-file F --ca-file CA` as given (a
    /// control plane that is not there, or credentials a test made).
    pub fn control_plane_with(mut self, credentials: &SidecarCredentials) -> Self {
        self.args.extend(credentials.args());
        self
    }

    /// Spawns the process without waiting for it (for start-up failures).
    /// A [`SidecarBuilder::control_plane`] needs [`SidecarBuilder::start`]
    /// (its token is created first).
    pub fn spawn(self) -> SidecarProcess {
        assert!(
            self.control_plane.is_none(),
            "control_plane(&cp) needs start() (or control_plane_with + spawn)"
        );
        let dir = TempDir::new();
        let outbound = self.outbound_port.unwrap_or_else(free_port);
        let (inbound, admin) = (free_port(), free_port());
        let log = dir.path.join("sidecar.log");
        let mut command = Command::new(binary("sidecar"));
        command.args(["--service", &self.service]);
        if let Some(port) = self.app_port {
            command.args(["--app-port", &port.to_string()]);
        }
        command
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
            .stdout(std::fs::File::create(dir.path.join("stdout.log")).expect("stdout file"))
            .stderr(std::fs::File::create(&log).expect("log file"))
            .kill_on_drop(true);
        let has_cp = self.args.iter().any(|a| a == "--control-plane");
        if has_cp && !self.args.iter().any(|a| a == "--snapshot-file") {
            command
                .arg("--snapshot-file")
                .arg(dir.path.join("snapshot.json"));
        }
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
    pub async fn start(mut self) -> SidecarProcess {
        if let Some(cp) = self.control_plane.take() {
            let namespace = flag_value(&self.args, "--namespace").unwrap_or("default");
            let credentials = cp.sidecar_credentials(namespace, &self.service).await;
            self.args.extend(credentials.args());
        }
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

impl admin::Listening for SidecarProcess {
    fn inbound(&self) -> SocketAddr {
        self.inbound
    }
    fn outbound(&self) -> SocketAddr {
        self.outbound
    }
    fn admin(&self) -> SocketAddr {
        self.admin
    }
}

/// Raises this test process's open-file soft limit to its hard limit (the
/// processes it starts inherit it: tests that hold a thousand connections
/// need it on machines whose soft limit is 1024); returns the soft limit
/// in force.
pub fn raise_open_file_limit() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).expect("setrlimit");
        return hard;
    }
    soft
}
