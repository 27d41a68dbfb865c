//! Sidecars and control planes inside the test process: the libraries'
//! own `run` functions (`meshlet_sidecar::run`,
//! `meshlet_control_plane::server::run`) on real loopback sockets, wired
//! the way the binaries' `main` wires them.
//!
//! The builders mirror [`crate::process`], so converting a test is mostly
//! changing a type: [`Sidecar::builder`] for `SidecarProcess::builder`,
//! [`ControlPlane::start`] for `ControlPlaneProcess::start`.
//!
//! Each instance runs on **its own runtime on its own thread**, like the
//! binary (a sidecar on a single-threaded runtime unless
//! `--worker-threads` says otherwise, the control plane on a multi-threaded
//! one), so it makes progress whatever runtime flavour the test uses, and
//! a blocked test task cannot stall it. That runtime is also what makes
//! stopping exact: `run` spawns its servers, watch streams and background
//! tasks with `tokio::spawn`, so aborting the `run` future alone would
//! leave them serving; dropping the instance's runtime ends every one of
//! them and closes every socket.
//!
//! - [`Sidecar::stop`] / [`ControlPlane::stop`]: graceful, like SIGTERM —
//!   the shutdown future passed to `run` completes, `run` deregisters and
//!   drains, and the test waits for it with a deadline.
//! - `kill9` and `Drop`: abrupt, like `kill -9` (and like the process
//!   harness's `Drop`) — the runtime is dropped without a drain, so a
//!   sidecar does not deregister and its peers see connections reset.
//!
//! Time is real: a test's `tokio::time::pause` does not reach an
//! instance's runtime, so time-driven scenarios wait on conditions with
//! deadlines, as the process tests do.
//!
//! No logs: the binaries install the global `tracing` subscriber in
//! `main`, which does not run here. Tests that assert on a log, on
//! standard output, on exit codes, signals, memory (RSS) or environment
//! variables keep using [`crate::process`].

use std::future::Future;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use tokio::sync::{mpsc, oneshot};

use crate::access::{flag_value, ControlPlaneRef, CpAccess, SidecarCredentials};
use crate::{admin, client, meshctl, TempDir};

/// How long `stop` waits for a graceful shutdown (a sidecar's default
/// drain deadline is 30 s); beyond it the test fails, and `Drop` then
/// drops the runtime.
const STOP_PATIENCE: Duration = Duration::from_secs(40);

/// The shutdown future handed to `run`: completes when the harness asks.
type Shutdown = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// One instance's thread and runtime.
struct Instance {
    what: &'static str,
    shutdown: Option<oneshot::Sender<()>>,
    kill: Option<oneshot::Sender<()>>,
    /// Completes (with the thread) once the runtime is gone.
    gone: Option<oneshot::Receiver<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// How `run` ended, once it has (`Debug` of its output).
    ended: Arc<Mutex<Option<String>>>,
}

impl std::fmt::Debug for Instance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Instance")
            .field("what", &self.what)
            .field("ended", &self.ended())
            .finish()
    }
}

impl Instance {
    /// Builds a runtime (`threads` workers; 1 = single-threaded) on a new
    /// thread and runs `serve(shutdown)` on it until it returns or the
    /// instance is killed.
    fn spawn<F, Fut, T>(what: &'static str, threads: usize, serve: F) -> Instance
    where
        F: FnOnce(Shutdown) -> Fut + Send + 'static,
        Fut: Future<Output = T> + 'static,
        T: std::fmt::Debug,
    {
        let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
        let (kill_tx, kill_rx) = oneshot::channel::<()>();
        let (gone_tx, gone_rx) = oneshot::channel::<()>();
        let ended = Arc::new(Mutex::new(None));
        let ended_in_thread = Arc::clone(&ended);
        let thread = std::thread::Builder::new()
            .name(what.to_owned())
            .spawn(move || {
                let runtime = if threads <= 1 {
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                } else {
                    tokio::runtime::Builder::new_multi_thread()
                        .worker_threads(threads)
                        .enable_all()
                        .build()
                }
                .expect("instance runtime");
                let shutdown: Shutdown = Box::pin(async move {
                    // A dropped sender (the instance is gone) also means stop.
                    let _ = shutdown_rx.await;
                });
                runtime.block_on(async move {
                    tokio::select! {
                        output = serve(shutdown) => {
                            *ended_in_thread.lock().unwrap() = Some(format!("{output:?}"));
                        }
                        _ = kill_rx => {}
                    }
                });
                // Ends every task the instance spawned and closes its
                // sockets; blocking tasks get a bounded time to finish.
                runtime.shutdown_timeout(Duration::from_secs(5));
                let _ = gone_tx.send(());
            })
            .expect("instance thread");
        Instance {
            what,
            shutdown: Some(shutdown_tx),
            kill: Some(kill_tx),
            gone: Some(gone_rx),
            thread: Some(thread),
            ended,
        }
    }

    fn ended(&self) -> Option<String> {
        self.ended.lock().unwrap().clone()
    }

    /// Waits until `path` on `addr` answers 200; panics at once if the
    /// instance ended (or its thread panicked) first.
    async fn wait_serving(&self, addr: SocketAddr, path: &str) {
        let what = format!("{} {path}", self.what);
        crate::wait::until(&what, Duration::from_secs(10), || async {
            if let Some(ended) = self.ended() {
                panic!("{} ended while starting: {ended}", self.what);
            }
            assert!(self.is_running(), "{} failed to start", self.what);
            let reply = client::get(addr, path).await.ok()?;
            (reply.status == 200).then_some(())
        })
        .await;
    }

    fn is_running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Graceful: completes the shutdown future and waits (with a deadline)
    /// for `run` to return and the runtime to go. Returns how `run` ended.
    async fn stop(&mut self) -> Option<String> {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(gone) = self.gone.take() {
            if tokio::time::timeout(STOP_PATIENCE, gone).await.is_err() {
                panic!("{} did not stop within {STOP_PATIENCE:?}", self.what);
            }
        }
        self.join();
        self.ended()
    }

    /// Abrupt: drops the runtime without a drain.
    fn kill(&mut self) {
        if let Some(kill) = self.kill.take() {
            let _ = kill.send(());
        }
        self.join();
    }

    fn join(&mut self) {
        if let Some(thread) = self.thread.take() {
            // Quick: the runtime's tasks are dropped, not drained.
            let _ = thread.join();
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A loopback listener on a port the kernel picked, already bound (so no
/// other test can take the port between choosing and binding it).
fn bind_loopback() -> StdListener {
    bind(SocketAddr::from(([127, 0, 0, 1], 0)))
}

fn bind(addr: SocketAddr) -> StdListener {
    let listener = StdListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    listener
        .set_nonblocking(true)
        .expect("non-blocking listener");
    listener
}

fn local_addr(listener: &StdListener) -> SocketAddr {
    listener.local_addr().expect("bound address")
}

/// Hands a bound listener to the runtime that is current (the instance's).
fn tokio_listener(listener: StdListener) -> tokio::net::TcpListener {
    tokio::net::TcpListener::from_std(listener).expect("listener on the instance's runtime")
}

/// An in-process sidecar (`meshlet_sidecar::run`). Killed on drop.
#[derive(Debug)]
pub struct Sidecar {
    pub inbound: SocketAddr,
    pub outbound: SocketAddr,
    pub admin: SocketAddr,
    reloads: mpsc::UnboundedSender<()>,
    instance: Instance,
    dir: TempDir,
}

/// Builds an in-process [`Sidecar`]; the same methods as
/// [`crate::SidecarBuilder`] except `env` (flags only: an in-process
/// sidecar shares the test's environment).
#[derive(Debug)]
pub struct SidecarBuilder {
    service: String,
    app_port: u16,
    config: Option<String>,
    args: Vec<String>,
    control_plane: Option<CpAccess>,
}

impl Sidecar {
    pub fn builder(service: &str, app_port: u16) -> SidecarBuilder {
        SidecarBuilder {
            service: service.to_owned(),
            app_port,
            config: None,
            args: Vec::new(),
            control_plane: None,
        }
    }

    /// The `--config` file given with [`SidecarBuilder::config`] (rewrite
    /// it and call [`Sidecar::reload`]).
    pub fn config_path(&self) -> PathBuf {
        self.dir.path.join("mesh.yaml")
    }

    /// Asks for a reload of the `--config` file: what SIGHUP does to the
    /// binary.
    pub fn reload(&self) {
        let _ = self.reloads.send(());
    }

    /// Whether `run` is still going.
    pub fn is_running(&self) -> bool {
        self.instance.is_running()
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

    /// Graceful shutdown, like SIGTERM: deregisters, drains, and returns
    /// how the drain ended (`Debug` of [`meshlet_sidecar::Drained`]).
    pub async fn stop(mut self) -> Option<String> {
        self.instance.stop().await
    }

    /// Abrupt, like `kill -9`: no deregistration, no drain.
    pub fn kill9(mut self) {
        self.instance.kill();
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

    /// Registers with and routes from `cp`, with a sidecar token for its
    /// service (created by [`SidecarBuilder::start`]) and the mesh CA. The
    /// snapshot file goes to the sidecar's temp dir unless the test passes
    /// `--snapshot-file` itself.
    pub fn control_plane(mut self, cp: &impl ControlPlaneRef) -> Self {
        self.control_plane = Some(cp.access().clone());
        self
    }

    /// `--control-plane URL --token-file F --ca-file CA` as given.
    pub fn control_plane_with(mut self, credentials: &SidecarCredentials) -> Self {
        self.args.extend(credentials.args());
        self
    }

    /// Starts the sidecar and waits until its admin `/live` answers (its
    /// listeners are bound before it starts, so they accept at once).
    pub async fn start(mut self) -> Sidecar {
        if let Some(cp) = self.control_plane.take() {
            let namespace = flag_value(&self.args, "--namespace").unwrap_or("default");
            let credentials = cp.sidecar_credentials(namespace, &self.service).await;
            self.args.extend(credentials.args());
        }
        let dir = TempDir::new();
        let [inbound, outbound, admin] = [bind_loopback(), bind_loopback(), bind_loopback()];
        let addrs = [&inbound, &outbound, &admin].map(local_addr);
        let mut argv: Vec<String> = [
            "sidecar",
            "--service",
            &self.service,
            "--app-port",
            &self.app_port.to_string(),
            "--inbound-ip",
            "127.0.0.1",
            "--inbound-port",
            &addrs[0].port().to_string(),
            "--outbound-port",
            &addrs[1].port().to_string(),
            "--admin-port",
            &addrs[2].port().to_string(),
        ]
        .map(str::to_owned)
        .into();
        argv.extend(self.args.iter().cloned());
        let has_cp = self.args.iter().any(|a| a == "--control-plane");
        if has_cp && !self.args.iter().any(|a| a == "--snapshot-file") {
            argv.push("--snapshot-file".into());
            argv.push(dir.path.join("snapshot.json").display().to_string());
        }
        if let Some(yaml) = &self.config {
            let path = dir.path.join("mesh.yaml");
            std::fs::write(&path, yaml).expect("write config");
            argv.push("--config".into());
            argv.push(path.display().to_string());
        }

        // What the binary's `start` does, minus the signals.
        let args = meshlet_sidecar::cli::Args::try_parse_from(&argv)
            .unwrap_or_else(|e| panic!("sidecar flags {argv:?}: {e}"));
        let settings = args
            .settings()
            .unwrap_or_else(|e| panic!("sidecar settings: {e}"));
        let initial = match &settings.control_plane {
            Some(cp) => meshlet_sidecar::InitialConfig::persisted(&cp.snapshot_file),
            None => meshlet_sidecar::InitialConfig::standalone(args.config.as_deref())
                .unwrap_or_else(|e| panic!("sidecar config: {e}")),
        };
        let (reload_tx, reloads) = mpsc::unbounded_channel();
        let instance = Instance::spawn("sidecar", args.worker_threads, move |shutdown| {
            let listeners = meshlet_sidecar::Listeners {
                inbound: tokio_listener(inbound),
                outbound: tokio_listener(outbound),
                admin: tokio_listener(admin),
                redirect: None,
            };
            meshlet_sidecar::run(settings, initial, listeners, shutdown, reloads)
        });
        let sidecar = Sidecar {
            inbound: addrs[0],
            outbound: addrs[1],
            admin: addrs[2],
            reloads: reload_tx,
            instance,
            dir,
        };
        sidecar.instance.wait_serving(sidecar.admin, "/live").await;
        sidecar
    }
}

/// An in-process control plane (`meshlet_control_plane::server::run`)
/// with its own data directory. Killed on drop.
#[derive(Debug)]
pub struct ControlPlane {
    access: CpAccess,
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    args: Vec<String>,
    instance: Instance,
}

impl ControlPlane {
    /// Starts a control plane on a free loopback port with `data_dir` and
    /// extra flags (e.g. `["--ttl", "2s"]`), and waits for `/healthz`.
    pub async fn start(data_dir: &Path, args: &[&str]) -> ControlPlane {
        let args = args.iter().map(|a| a.to_string()).collect();
        Self::start_on(bind_loopback(), data_dir, args).await
    }

    async fn start_on(listener: StdListener, data_dir: &Path, args: Vec<String>) -> ControlPlane {
        let addr = local_addr(&listener);
        let mut argv: Vec<String> = vec![
            "control-plane".into(),
            "--listen".into(),
            addr.to_string(),
            "--data-dir".into(),
            data_dir.display().to_string(),
        ];
        argv.extend(args.iter().cloned());
        let settings = meshlet_control_plane::server::Settings::try_parse_from(&argv)
            .unwrap_or_else(|e| panic!("control-plane flags {argv:?}: {e}"));
        // The binary's runtime: multi-threaded, one worker per core (2 here).
        let instance = Instance::spawn("control-plane", 2, move |shutdown| {
            meshlet_control_plane::server::run(tokio_listener(listener), settings, shutdown)
        });
        let cp = ControlPlane {
            access: CpAccess::new(addr, data_dir),
            addr,
            data_dir: data_dir.to_owned(),
            args,
            instance,
        };
        cp.access
            .wait_serving(|| match cp.instance.ended() {
                Some(ended) => Err(ended),
                None if !cp.instance.is_running() => Err("its thread ended".into()),
                None => Ok(()),
            })
            .await;
        cp
    }

    /// The in-process `kill -9`: drops the control plane's runtime (no
    /// drain; watch streams and connections are cut).
    pub async fn kill9(&mut self) {
        self.instance.kill();
    }

    /// Graceful shutdown, like SIGTERM; returns how `run` ended.
    pub async fn stop(&mut self) -> Option<String> {
        self.instance.stop().await
    }

    /// Kills, deletes the data directory (a lost disk), and starts again
    /// empty on the same address.
    pub async fn wipe_and_restart(&mut self) {
        self.kill9().await;
        crate::access::wipe_keeping_credentials(&self.data_dir);
        self.start_again().await;
    }

    /// Kills and starts again on the same address and data directory.
    pub async fn restart(&mut self) {
        self.kill9().await;
        self.start_again().await;
    }

    async fn start_again(&mut self) {
        let as_admin = self.access.sidecars_as_admin;
        let mut again = Self::start_on(bind(self.addr), &self.data_dir, self.args.clone()).await;
        again.access.sidecars_as_admin = as_admin;
        *self = again;
    }

    /// Sidecars started from now on get the admin token (see
    /// [`CpAccess::sidecars_as_admin`]).
    pub fn sidecars_use_the_admin_token(&mut self) {
        self.access.sidecars_as_admin = true;
    }

    /// Writes `yaml` to `dir/file` and runs `meshctl apply -f` (the real
    /// binary) on it against this control plane; asserts that it succeeded.
    pub async fn apply(&self, dir: &Path, file: &str, yaml: &str) {
        let path = dir.join(file);
        std::fs::write(&path, yaml).expect("write the file to apply");
        let out = meshctl(self, &["apply", "-f", path.to_str().unwrap()]).await;
        assert!(out.success(), "apply {file}: {out:?}");
    }
}

impl std::ops::Deref for ControlPlane {
    type Target = CpAccess;
    fn deref(&self) -> &CpAccess {
        &self.access
    }
}

impl ControlPlaneRef for ControlPlane {
    fn access(&self) -> &CpAccess {
        &self.access
    }
}

impl admin::Listening for Sidecar {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Upstream;

    /// Instances of `service` registered at `cp` (none: 404).
    async fn registered(cp: &ControlPlane, service: &str) -> usize {
        let path = format!("/api/v1/services/default/{service}");
        let reply = cp.get(&path).await;
        if reply.status == 404 {
            return 0;
        }
        let detail: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
        detail["instances"].as_array().map_or(0, Vec::len)
    }

    async fn refused(addr: SocketAddr) -> bool {
        tokio::net::TcpStream::connect(addr).await.is_err()
    }

    #[tokio::test]
    async fn stop_deregisters_drains_and_closes_the_listeners() {
        let dir = TempDir::new();
        let mut cp = ControlPlane::start(&dir.path.join("data"), &[]).await;
        let app = Upstream::start("orders").await;
        let sidecar = Sidecar::builder("orders", app.port())
            .control_plane(&cp)
            .start()
            .await;
        let listeners = [sidecar.inbound, sidecar.outbound, sidecar.admin];
        crate::wait::until("registered", Duration::from_secs(10), || async {
            (registered(&cp, "orders").await == 1).then_some(())
        })
        .await;

        assert_eq!(sidecar.stop().await.as_deref(), Some("Completely"));
        assert_eq!(registered(&cp, "orders").await, 0, "deregistered");
        for addr in listeners {
            assert!(refused(addr).await, "{addr} still accepts");
        }
        assert_eq!(cp.stop().await.as_deref(), Some("Ok(())"));
        assert!(refused(cp.addr).await);
    }

    #[tokio::test]
    async fn kill9_leaves_the_registration_and_a_restart_keeps_the_store() {
        let dir = TempDir::new();
        let mut cp = ControlPlane::start(&dir.path.join("data"), &["--ttl", "60s"]).await;
        let app = Upstream::start("orders").await;
        let sidecar = Sidecar::builder("orders", app.port())
            .control_plane(&cp)
            .start()
            .await;
        let inbound = sidecar.inbound;
        crate::wait::until("registered", Duration::from_secs(10), || async {
            (registered(&cp, "orders").await == 1).then_some(())
        })
        .await;

        sidecar.kill9();
        assert!(refused(inbound).await);
        assert_eq!(registered(&cp, "orders").await, 1, "no deregistration");
        let addr = cp.addr;
        cp.restart().await;
        assert_eq!(cp.addr, addr, "same address");
        assert_eq!(registered(&cp, "orders").await, 1, "the store survived");
    }
}
