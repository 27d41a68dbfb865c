//! A piece of the demo mesh: one `demo-service` app (the example app that
//! calls the next service through its sidecar and can be told to fail)
//! with its sidecar, registered at a control plane.

use std::net::SocketAddr;
use std::time::Duration;

use crate::process::{binary, free_port};
use crate::{client, wait, ControlPlaneProcess, SidecarProcess};

/// A running `demo-service` and its sidecar. Both are killed on drop.
#[derive(Debug)]
pub struct DemoService {
    pub sidecar: SidecarProcess,
    /// The app's own address (for `POST /fail`, `/recover`, ...).
    pub app: SocketAddr,
    _app: tokio::process::Child,
}

impl DemoService {
    /// Version `v1`, calling `calls` (if any) on `GET /work`.
    pub async fn start(cp: &ControlPlaneProcess, name: &str, calls: Option<&str>) -> DemoService {
        Self::start_with(cp, name, "v1", calls, &[]).await
    }

    /// With a version (the app's and the instance's `version` label) and
    /// extra sidecar flags; waits until the sidecar is ready.
    ///
    /// The app starts first (it is told its sidecar's outbound port in
    /// advance) and the sidecar once the app accepts connections, so the
    /// sidecar's first health probe finds the app up: started the other way
    /// round, `/ready` waited for the second probe, 5 s later.
    pub async fn start_with(
        cp: &ControlPlaneProcess,
        name: &str,
        version: &str,
        calls: Option<&str>,
        sidecar_args: &[&str],
    ) -> DemoService {
        let app_port = free_port();
        let outbound_port = free_port();
        let mut app = tokio::process::Command::new(binary("demo-service"));
        app.args(["--name", name, "--port", &app_port.to_string()])
            .args(["--version", version])
            .env("HTTP_PROXY", format!("http://127.0.0.1:{outbound_port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true);
        if let Some(next) = calls {
            app.args(["--calls", next]);
        }
        let app = app.spawn().expect("demo-service starts");
        let app_addr = SocketAddr::from(([127, 0, 0, 1], app_port));
        wait::until("demo-service listens", Duration::from_secs(10), || async {
            tokio::net::TcpStream::connect(app_addr)
                .await
                .ok()
                .map(drop)
        })
        .await;
        let mut sidecar = SidecarProcess::builder(name, app_port)
            .outbound_port(outbound_port)
            .control_plane(cp)
            .arg("--labels")
            .arg(&format!("version={version}"));
        for arg in sidecar_args {
            sidecar = sidecar.arg(arg);
        }
        let sidecar = sidecar.start().await;
        sidecar.wait_ready(Duration::from_secs(10)).await;
        DemoService {
            sidecar,
            app: app_addr,
            _app: app,
        }
    }

    /// `POST /fail`: the app answers `/` and `/work` with 500 from now on.
    pub async fn fail(&self) {
        self.post("/fail").await;
    }

    /// `POST /recover`: the app answers normally again.
    pub async fn recover(&self) {
        self.post("/recover").await;
    }

    async fn post(&self, path: &str) {
        let reply = client::post_json(self.app, path, &serde_json::json!({})).await;
        assert_eq!(reply.status, 200, "POST {path}: {}", reply.text());
    }
}
