//! The soak's mesh and what is done to it on a schedule.
//!
//! An [`Instance`] is one `demo-service` process and its sidecar process,
//! registered at the control plane (the same pairing as the demo, with the
//! app's [`Child`] kept so it can be signalled). [`Chaos`] owns the
//! churned instances and runs the schedule: every `step`, the next action
//! of a fixed cycle — SIGKILL an instance and start it again, apply a set
//! of policies, SIGTERM an instance (graceful drain) and start it again,
//! roll the policies back — and once, at the middle of the run, a
//! `RetryPolicy` (the second phase). Each action is recorded as an
//! [`Event`], and every instance that ever ran as an [`Incarnation`]: its
//! ports (which the load's outcomes name) and, if it was SIGKILLed, its
//! kill window (from the signal until the process was reaped), which is
//! what makes a failure *unavoidable*.
//!
//! A restarted instance gets new ports and a new process; the schedule
//! waits with deadlines for each step (the old process gone, the new one
//! ready, the caller's snapshot listing it, a revision pushed).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use meshlet_e2e::process::{binary, free_port};
use meshlet_e2e::{admin, meshctl, wait, ControlPlaneProcess, SidecarProcess};
use nix::sys::signal::Signal;
use tokio::process::Child;

/// The churned service (three instances).
pub const SERVICE: &str = "backend";

/// Applied and rolled back again and again: each changes the caller's or
/// the instances' snapshot (breaker, limiter, timeout, sampling) without
/// refusing anything the load sends.
const TUNING: &str = "\
apiVersion: meshlet.dev/v1alpha1
kind: TimeoutPolicy
metadata: {name: soak-timeout}
spec: {targetRef: {service: backend}, request: 10s}
---
apiVersion: meshlet.dev/v1alpha1
kind: CircuitBreakerPolicy
metadata: {name: soak-breaker}
spec: {targetRef: {service: backend}, consecutiveFailures: 1000, openDuration: 1s, maxConcurrentRequests: 1024}
---
apiVersion: meshlet.dev/v1alpha1
kind: RateLimitPolicy
metadata: {name: soak-limit}
spec: {targetRef: {service: backend}, tokenBucket: {capacity: 100000, refillPerSecond: 100000}}
---
apiVersion: meshlet.dev/v1alpha1
kind: TracingPolicy
metadata: {name: soak-tracing}
spec: {targetRef: {service: loadgen}, samplingRatio: 0.5}
";

/// The second phase's policy (the defaults: retry on 502/503/504, a
/// refused connection and a reset; GET is idempotent).
const RETRY: &str = "\
apiVersion: meshlet.dev/v1alpha1
kind: RetryPolicy
metadata: {name: soak-retry}
spec: {targetRef: {service: backend}, attempts: 3}
";

/// How long a process may take to come up, drain or die.
const PATIENCE: Duration = Duration::from_secs(40);

/// One `demo-service` with its sidecar. Both are killed on drop.
#[derive(Debug)]
pub struct Instance {
    pub label: String,
    pub sidecar: SidecarProcess,
    pub app_port: u16,
    app: Child,
}

impl Instance {
    /// Starts the app, then its sidecar (registered with `cp`), and waits
    /// until the sidecar is ready.
    pub async fn start(cp: &ControlPlaneProcess, service: &str, label: String) -> Instance {
        let app_port = free_port();
        let outbound_port = free_port();
        let app = tokio::process::Command::new(binary("demo-service"))
            .args(["--name", service, "--port", &app_port.to_string()])
            .env("HTTP_PROXY", format!("http://127.0.0.1:{outbound_port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("demo-service starts");
        let app_addr = SocketAddr::from(([127, 0, 0, 1], app_port));
        wait::until(&format!("{label}'s app listens"), PATIENCE, || async {
            tokio::net::TcpStream::connect(app_addr)
                .await
                .ok()
                .map(drop)
        })
        .await;
        let sidecar = SidecarProcess::builder(service, app_port)
            .outbound_port(outbound_port)
            .control_plane(cp)
            .start()
            .await;
        sidecar.wait_ready(PATIENCE).await;
        Instance {
            label,
            sidecar,
            app_port,
            app,
        }
    }

    fn incarnation(&self) -> Incarnation {
        Incarnation {
            label: self.label.clone(),
            inbound: self.sidecar.inbound.port(),
            app: self.app_port,
            kill_window: None,
        }
    }

    /// SIGKILL, sidecar first (so that no request meets a live sidecar in
    /// front of a dead app), then the app; returns the kill window: from
    /// the signal until the sidecar was reaped (its sockets closed).
    async fn kill9(mut self) -> (Instant, Instant) {
        let signalled = Instant::now();
        self.sidecar.signal(Signal::SIGKILL);
        self.sidecar.wait_exit(PATIENCE).await;
        let dead = Instant::now();
        let _ = self.app.start_kill();
        let _ = self.app.wait().await;
        (signalled, dead)
    }

    /// SIGTERM: the sidecar deregisters, drains and exits 0, then the app
    /// is stopped the same way.
    async fn terminate(mut self) {
        self.sidecar.signal(Signal::SIGTERM);
        let status = self.sidecar.wait_exit(PATIENCE).await;
        assert_eq!(
            status.code(),
            Some(0),
            "{} exits 0 after SIGTERM: {}",
            self.label,
            self.sidecar.log_text()
        );
        let pid = self.app.id().expect("app running") as i32;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGTERM)
            .expect("SIGTERM to the app");
        tokio::time::timeout(PATIENCE, self.app.wait())
            .await
            .expect("the app exits after SIGTERM")
            .expect("wait for the app");
    }
}

/// Every instance that ever ran, with what the load's outcomes name.
#[derive(Debug, Clone)]
pub struct Incarnation {
    pub label: String,
    /// The sidecar's inbound port (the endpoint the caller dials).
    pub inbound: u16,
    pub app: u16,
    /// SIGKILLed: from the signal until the process was reaped.
    pub kill_window: Option<(Instant, Instant)>,
}

/// What the schedule does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Kill(usize),
    Term(usize),
    Apply,
    Rollback,
    Retry,
}

/// One action, when it started and ended, and what it touched.
#[derive(Debug, Clone)]
pub struct Event {
    pub action: Action,
    pub at: Instant,
    pub done: Instant,
    pub note: String,
}

/// The churned instances and the record of the run.
pub struct Chaos<'a> {
    cp: &'a ControlPlaneProcess,
    caller_admin: SocketAddr,
    dir: PathBuf,
    /// Slot → the instance running in it (the slots the schedule churns).
    slots: Vec<Option<Instance>>,
    generation: Vec<u32>,
    pub incarnations: Vec<Incarnation>,
    pub events: Vec<Event>,
    /// The revision before the last apply of [`TUNING`] (rolled back to).
    before_tuning: Option<u64>,
}

impl<'a> Chaos<'a> {
    /// `caller_admin`: the caller sidecar's admin address (to wait until it
    /// routes with a change); `dir`: where policy files are written.
    pub fn new(cp: &'a ControlPlaneProcess, caller_admin: SocketAddr, dir: PathBuf) -> Self {
        Chaos {
            cp,
            caller_admin,
            dir,
            slots: Vec::new(),
            generation: Vec::new(),
            incarnations: Vec::new(),
            events: Vec::new(),
            before_tuning: None,
        }
    }

    /// Records an instance the schedule never touches (for attribution).
    pub fn record(&mut self, instance: &Instance) {
        self.incarnations.push(instance.incarnation());
    }

    /// Starts a churned instance in a new slot.
    pub async fn add(&mut self) {
        let slot = self.slots.len();
        self.slots.push(None);
        self.generation.push(0);
        self.start_in(slot).await;
    }

    async fn start_in(&mut self, slot: usize) {
        let generation = self.generation[slot];
        self.generation[slot] += 1;
        let label = format!("{SERVICE}-{slot}#{generation}");
        let instance = Instance::start(self.cp, SERVICE, label).await;
        let inbound = instance.sidecar.inbound.to_string();
        self.incarnations.push(instance.incarnation());
        self.slots[slot] = Some(instance);
        let caller = self.caller_admin;
        wait::until(
            &format!("the caller routes to {inbound}"),
            PATIENCE,
            || async {
                admin::endpoints_of(caller, SERVICE)
                    .await
                    .contains(&inbound)
                    .then_some(())
            },
        )
        .await;
    }

    /// Runs the schedule from `start` until `end` (no action begins in the
    /// last `step`): the cycle's next action every `step`, and the
    /// `RetryPolicy` once at `retry_at`. Returns when the retry phase began
    /// (the caller routing with the policy).
    pub async fn run(
        &mut self,
        start: Instant,
        end: Instant,
        step: Duration,
        retry_at: Instant,
    ) -> Option<Instant> {
        let slots = self.slots.len();
        assert!(slots >= 2, "the cycle churns two slots");
        let cycle = [
            Action::Kill(0),
            Action::Apply,
            Action::Term(1),
            Action::Rollback,
            Action::Kill(1),
            Action::Apply,
            Action::Term(0),
            Action::Rollback,
        ];
        let mut retry_phase = None;
        let mut next = start + step;
        let mut i = 0;
        while next + step <= end {
            tokio::time::sleep_until(next.into()).await;
            // Not between an apply and its rollback, which would undo it.
            let action = if retry_phase.is_none()
                && Instant::now() >= retry_at
                && self.before_tuning.is_none()
            {
                Action::Retry
            } else {
                i += 1;
                cycle[(i - 1) % cycle.len()]
            };
            let at = Instant::now();
            let note = self.act(action).await;
            let done = Instant::now();
            if action == Action::Retry {
                retry_phase = Some(done);
            }
            self.events.push(Event {
                action,
                at,
                done,
                note,
            });
            next = (next + step).max(Instant::now());
        }
        retry_phase
    }

    async fn act(&mut self, action: Action) -> String {
        match action {
            Action::Kill(slot) => {
                let instance = self.slots[slot].take().expect("slot running");
                let (label, inbound) = (instance.label.clone(), instance.sidecar.inbound);
                let window = instance.kill9().await;
                let record = self
                    .incarnations
                    .iter_mut()
                    .find(|i| i.label == label)
                    .expect("incarnation recorded");
                record.kill_window = Some(window);
                self.start_in(slot).await;
                format!(
                    "SIGKILL {label} ({inbound}; dead after {:?}), started {}",
                    window.1 - window.0,
                    self.slots[slot].as_ref().unwrap().label
                )
            }
            Action::Term(slot) => {
                let instance = self.slots[slot].take().expect("slot running");
                let (label, inbound) = (instance.label.clone(), instance.sidecar.inbound);
                let began = Instant::now();
                instance.terminate().await;
                let drained = began.elapsed();
                self.start_in(slot).await;
                format!(
                    "SIGTERM {label} ({inbound}; exited after {drained:?}), started {}",
                    self.slots[slot].as_ref().unwrap().label
                )
            }
            Action::Apply => {
                self.before_tuning = Some(self.latest_revision().await);
                let revision = self.apply("soak-tuning.yaml", TUNING).await;
                format!("apply timeout, breaker, rate limit, tracing → revision {revision}")
            }
            Action::Rollback => {
                let to = self.before_tuning.take().expect("an apply came first");
                let out = meshctl(self.cp, &["rollback", &to.to_string()]).await;
                assert!(out.success(), "meshctl rollback {to}: {out:?}");
                let revision = self.latest_revision().await;
                self.caller_reaches(revision).await;
                format!("rollback to {to} → revision {revision}")
            }
            Action::Retry => {
                let revision = self.apply("soak-retry.yaml", RETRY).await;
                format!("apply RetryPolicy (attempts 3) → revision {revision}")
            }
        }
    }

    /// `meshctl apply -f`, then waits until the caller routes with it.
    async fn apply(&self, file: &str, yaml: &str) -> u64 {
        self.cp.apply(&self.dir, file, yaml).await;
        let revision = self.latest_revision().await;
        self.caller_reaches(revision).await;
        revision
    }

    async fn latest_revision(&self) -> u64 {
        let history = self.cp.get_json("/api/v1/revisions?limit=1").await;
        history[0]["revision"].as_u64().expect("a revision")
    }

    async fn caller_reaches(&self, revision: u64) {
        let caller = self.caller_admin;
        wait::until(
            &format!("the caller routes with revision {revision}"),
            PATIENCE,
            || async { (admin::revision(caller).await >= revision).then_some(()) },
        )
        .await;
    }
}
