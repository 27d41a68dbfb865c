//! The control plane with real sidecars (issue 3): registration and
//! discovery, TTL expiry after `kill -9`, health checking, restarts of the
//! control plane (durable store), sidecars surviving a control plane that
//! is down (persisted snapshot), `meshctl` against it, and broadcast.
//!
//! Every instance here is a sidecar in front of an in-process upstream,
//! registered with a control plane on loopback. Both run in-process
//! ([`meshlet_e2e::inprocess`]; `kill -9` is dropping the instance's
//! runtime), except where only a process will do: the SIGTERM test signals
//! real `sidecar` processes and reads their exit status and log, and the
//! push-latency test reports the `control-plane` process's memory (RSS) to
//! `tests/bench/push.sh`. `meshctl` is always the real binary. Waiting is
//! always on a condition with a deadline.

use std::collections::BTreeSet;
use std::future::Future;
use std::time::{Duration, Instant};

use meshlet_e2e::admin::{self, Listening};
use meshlet_e2e::inprocess::{ControlPlane, Sidecar};
use meshlet_e2e::process::free_port;
use meshlet_e2e::{
    client, meshctl, wait, ControlPlaneProcess, CpAccess, SidecarProcess, TempDir, Upstream,
};

/// Instance expiry used by these tests (heartbeats every TTL/3).
const TTL: Duration = Duration::from_secs(2);

/// A fast health check for every service of these tests: 200 ms × 2.
const HEALTH_POLICIES: &str = "\
apiVersion: meshlet.dev/v1alpha1
kind: HealthCheckPolicy
metadata: {name: orders-health}
spec: {targetRef: {service: orders}, interval: 200ms, timeout: 500ms, unhealthyThreshold: 2, healthyThreshold: 1}
---
apiVersion: meshlet.dev/v1alpha1
kind: HealthCheckPolicy
metadata: {name: frontend-health}
spec: {targetRef: {service: frontend}, interval: 200ms, timeout: 500ms}
";

/// A sidecar registered with a control plane: in-process ([`Sidecar`]) or
/// a process ([`SidecarProcess`]).
trait Registered: Listening + Sized {
    async fn start(cp: &CpAccess, service: &str, app_port: u16, labels: &str) -> Self;
}

impl Registered for Sidecar {
    async fn start(cp: &CpAccess, service: &str, app_port: u16, labels: &str) -> Self {
        Sidecar::builder(service, app_port)
            .control_plane(cp)
            .arg("--labels")
            .arg(labels)
            .start()
            .await
    }
}

impl Registered for SidecarProcess {
    async fn start(cp: &CpAccess, service: &str, app_port: u16, labels: &str) -> Self {
        SidecarProcess::builder(service, app_port)
            .control_plane(cp)
            .arg("--labels")
            .arg(labels)
            .start()
            .await
    }
}

/// An app and its sidecar (in-process unless the test needs processes).
struct Instance<S = Sidecar> {
    app: Upstream,
    sidecar: S,
}

impl<S: Registered> Instance<S> {
    async fn start(cp: &ControlPlane, service: &str, version: &str) -> Instance<S> {
        let app = Upstream::start(&format!("{service}-{version}")).await;
        let labels = format!("version={version}");
        let sidecar = S::start(cp, service, app.port(), &labels).await;
        Instance { app, sidecar }
    }

    fn address(&self) -> String {
        self.sidecar.inbound().to_string()
    }
}

/// A control plane (with the health policies applied) and a data dir.
async fn control_plane(dir: &TempDir) -> ControlPlane {
    control_plane_with_ttl(dir, "2s").await
}

/// [`control_plane`] with another instance expiry.
async fn control_plane_with_ttl(dir: &TempDir, ttl: &str) -> ControlPlane {
    let cp = ControlPlane::start(&dir.path.join("data"), &["--ttl", ttl]).await;
    cp.apply(&dir.path, "health.yaml", HEALTH_POLICIES).await;
    cp
}

/// Addresses of the registered instances of `service`, with health.
async fn registered(cp: &ControlPlane, service: &str) -> Vec<(String, bool)> {
    let reply = cp.get(&format!("/api/v1/services/default/{service}")).await;
    if reply.status == 404 {
        return Vec::new();
    }
    let detail: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
    let mut out: Vec<(String, bool)> = detail["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["address"].as_str().unwrap().to_owned(),
                i["healthy"].as_bool().unwrap(),
            )
        })
        .collect();
    out.sort();
    out
}

fn sorted(addrs: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut v: Vec<String> = addrs.into_iter().collect();
    v.sort();
    v
}

/// Sends `n` requests for `service` through `via`'s outbound listener and
/// asserts they all succeed.
async fn call_many(via: &impl Listening, service: &str, n: usize) {
    for i in 0..n {
        let reply = client::get_uri(via.outbound(), &format!("http://{service}/"))
            .await
            .expect("answer");
        assert_eq!(reply.status, 200, "request {i}: {}", reply.text());
    }
}

/// Waits until every sidecar routes `service` to exactly `expected`.
async fn converged<S: Listening>(
    sidecars: &[&S],
    service: &str,
    expected: &[String],
    patience: Duration,
) {
    wait::until(
        &format!("every sidecar routes {service} to {expected:?}"),
        patience,
        || async {
            for sidecar in sidecars {
                if admin::endpoints_of(sidecar.admin(), service).await != expected {
                    return None;
                }
            }
            Some(())
        },
    )
    .await;
}

/// Waits until the frontend's sidecar routes `orders` to exactly
/// `expected`.
async fn frontend_routes_orders_to<S: Listening>(
    frontend: &Instance<S>,
    expected: &[String],
    patience: Duration,
) {
    converged(&[&frontend.sidecar], "orders", expected, patience).await;
}

/// The sidecars of `orders` and of `frontend`.
fn sidecars_of<'a, S>(orders: &'a [Instance<S>], frontend: &'a Instance<S>) -> Vec<&'a S> {
    orders
        .iter()
        .map(|i| &i.sidecar)
        .chain([&frontend.sidecar])
        .collect()
}

/// Two `orders` instances (v1, v2) and a `frontend`, returned once the
/// frontend's sidecar routes orders to both.
async fn two_orders_and_a_frontend<S: Registered>(
    cp: &ControlPlane,
) -> (Vec<Instance<S>>, Instance<S>) {
    let orders = vec![
        Instance::start(cp, "orders", "v1").await,
        Instance::start(cp, "orders", "v2").await,
    ];
    let frontend = Instance::start(cp, "frontend", "v1").await;
    let both = sorted(orders.iter().map(Instance::address));
    frontend_routes_orders_to(&frontend, &both, Duration::from_secs(10)).await;
    (orders, frontend)
}

/// Starts an `orders` v3 and waits (5 s) until the frontend's sidecar
/// routes orders to it and to `orders`.
async fn a_newcomer_joins<S: Registered>(
    cp: &ControlPlane,
    orders: &[Instance<S>],
    frontend: &Instance<S>,
) -> Instance<S> {
    let newcomer = Instance::start(cp, "orders", "v3").await;
    let all = sorted(orders.iter().chain([&newcomer]).map(Instance::address));
    frontend_routes_orders_to(frontend, &all, Duration::from_secs(5)).await;
    newcomer
}

/// A task that runs `probe` over and over (`pause` apart, none if zero)
/// until [`Repeating::stop`], which returns every probe's result.
struct Repeating<T> {
    stopper: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<Vec<T>>,
}

fn repeatedly<T, F, Fut>(pause: Duration, mut probe: F) -> Repeating<T>
where
    T: Send + 'static,
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = T> + Send,
{
    let (stopper, mut stopped) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(async move {
        let mut results = Vec::new();
        while !*stopped.borrow_and_update() {
            results.push(probe().await);
            if !pause.is_zero() {
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = stopped.changed() => {}
                }
            }
        }
        results
    });
    Repeating { stopper, task }
}

impl<T> Repeating<T> {
    async fn stop(self) -> Vec<T> {
        self.stopper.send(true).unwrap();
        self.task.await.unwrap()
    }
}

#[tokio::test]
async fn instances_register_expire_after_kill_and_follow_their_health() {
    let dir = TempDir::new();
    let cp = control_plane(&dir).await;
    let mut orders = Vec::new();
    for version in ["v1", "v2", "v3"] {
        orders.push(Instance::<Sidecar>::start(&cp, "orders", version).await);
    }
    let frontend = Instance::<Sidecar>::start(&cp, "frontend", "v1").await;

    // 1. Everyone registers; meshctl lists the three orders endpoints.
    let all_orders = sorted(orders.iter().map(Instance::address));
    wait::until(
        "3 healthy orders instances",
        Duration::from_secs(10),
        || async {
            let got = registered(&cp, "orders").await;
            (got.len() == 3 && got.iter().all(|(_, healthy)| *healthy)).then_some(())
        },
    )
    .await;
    // frontend started last: its registration may still be on its way.
    wait::until("frontend registered", Duration::from_secs(10), || async {
        (registered(&cp, "frontend").await.len() == 1).then_some(())
    })
    .await;
    let out = meshctl(&cp, &["get", "endpoints", "orders"]).await;
    assert!(out.success(), "{out:?}");
    for address in &all_orders {
        assert!(
            out.stdout.contains(address.as_str()),
            "{address} missing:\n{}",
            out.stdout
        );
    }
    let sidecars = sidecars_of(&orders, &frontend);
    converged(&sidecars, "orders", &all_orders, Duration::from_secs(5)).await;
    frontend.sidecar.wait_ready(Duration::from_secs(5)).await;

    // Traffic through the frontend's sidecar reaches all three.
    call_many(&frontend.sidecar, "orders", 60).await;
    for instance in &orders {
        assert!(
            instance.app.requests() > 0,
            "{} got no traffic",
            instance.app.name
        );
    }

    // 3. An app whose /health fails is marked unhealthy and gets no
    // traffic within interval × threshold (200 ms × 2), then comes back.
    orders[0].app.set_healthy(false);
    let failing = orders[0].address();
    let others = sorted(orders[1..].iter().map(Instance::address));
    let started = Instant::now();
    converged(
        &sidecars,
        "orders",
        &others,
        Duration::from_millis(400) + Duration::from_secs(1),
    )
    .await;
    let took = started.elapsed();
    assert!(
        registered(&cp, "orders")
            .await
            .contains(&(failing.clone(), false)),
        "stays registered, marked unhealthy"
    );
    let before = orders[0].app.requests();
    call_many(&frontend.sidecar, "orders", 20).await;
    assert_eq!(
        orders[0].app.requests(),
        before,
        "unhealthy instance got traffic"
    );
    println!("unhealthy instance removed from every sidecar after {took:?}");
    orders[0].app.set_healthy(true);
    converged(&sidecars, "orders", &all_orders, Duration::from_secs(2)).await;
    call_many(&frontend.sidecar, "orders", 60).await;
    assert!(
        orders[0].app.requests() > before,
        "healthy again, gets traffic"
    );

    // 2. kill -9 of an instance's sidecar and app: gone from the registry
    // and from every sidecar within TTL + 1 s.
    let victim = orders.pop().unwrap();
    let victim_address = victim.address();
    let killed_at = Instant::now();
    victim.app.kill();
    drop(victim); // kill -9 of the sidecar (its runtime is dropped)
    let survivors = sorted(orders.iter().map(Instance::address));
    let sidecars = sidecars_of(&orders, &frontend);
    wait::until(
        "expired from the registry",
        TTL + Duration::from_secs(1),
        || async {
            let got = registered(&cp, "orders").await;
            (!got.iter().any(|(a, _)| *a == victim_address)).then_some(())
        },
    )
    .await;
    converged(
        &sidecars,
        "orders",
        &survivors,
        (TTL + Duration::from_secs(1)).saturating_sub(killed_at.elapsed()),
    )
    .await;
    println!(
        "killed instance gone from every sidecar after {:?}",
        killed_at.elapsed()
    );
    call_many(&frontend.sidecar, "orders", 20).await;

    // The registry's history recorded all of it.
    let history = cp.get_json("/api/v1/revisions?limit=1000").await;
    let changes: Vec<String> = history
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r["changes"].as_array().unwrap().clone())
        .map(|c| c.as_str().unwrap().to_owned())
        .collect();
    let text = changes.join("\n");
    assert!(text.contains("expired"), "{text}");
    assert!(text.contains("unhealthy"), "{text}");
}

#[tokio::test]
async fn control_plane_restart_and_outage() {
    let dir = TempDir::new();
    let mut cp = control_plane(&dir).await;
    let orders = [
        Instance::<Sidecar>::start(&cp, "orders", "v1").await,
        Instance::<Sidecar>::start(&cp, "orders", "v2").await,
    ];
    let snapshot_file = dir.path.join("frontend-snapshot.json");
    let frontend_app = Upstream::start("frontend").await;
    let cp_access = CpAccess::clone(&cp);
    let start_frontend = || {
        Sidecar::builder("frontend", frontend_app.port())
            .control_plane(&cp_access)
            .arg("--snapshot-file")
            .arg(snapshot_file.to_str().unwrap())
            .start()
    };
    let frontend = start_frontend().await;
    let all_orders = sorted(orders.iter().map(Instance::address));
    converged(&[&frontend], "orders", &all_orders, Duration::from_secs(10)).await;
    let revisions_before = cp.get_json("/api/v1/revisions?limit=1000").await;
    let services_before = registered(&cp, "orders").await;
    let revision_before = frontend.revision().await;
    assert!(revision_before > 0);

    // 5. kill -9 and restart: registry and history intact.
    cp.restart().await;
    assert_eq!(registered(&cp, "orders").await, services_before);
    let revisions_after = cp.get_json("/api/v1/revisions?limit=1000").await;
    let after = revisions_after.as_array().unwrap();
    for record in revisions_before.as_array().unwrap() {
        assert!(
            after.contains(record),
            "revision lost after restart: {record}"
        );
    }
    // Sidecars reconnect and converge on the next change.
    let newcomer = Instance::<Sidecar>::start(&cp, "orders", "v3").await;
    let with_newcomer = sorted(orders.iter().chain([&newcomer]).map(Instance::address));
    converged(
        &[&frontend, &orders[0].sidecar, &orders[1].sidecar],
        "orders",
        &with_newcomer,
        Duration::from_secs(10),
    )
    .await;
    assert!(frontend.revision().await > revision_before);

    // 6. Control plane down: existing sidecars keep routing...
    cp.kill9().await;
    call_many(&frontend, "orders", 20).await;
    let dump = frontend.config_dump().await;
    assert_eq!(dump["controlPlane"]["connected"], false, "{dump}");
    // ...and a sidecar restarted meanwhile routes from its persisted
    // snapshot.
    drop(frontend);
    let restarted = start_frontend().await;
    assert_eq!(restarted.endpoints_of("orders").await, with_newcomer);
    call_many(&restarted, "orders", 20).await;
    restarted.wait_ready(Duration::from_secs(5)).await;
    let dump = restarted.config_dump().await;
    assert!(
        dump["snapshot"]["source"]
            .as_str()
            .unwrap()
            .contains("persisted"),
        "{dump}"
    );

    // 7. meshctl against the stopped control plane: one line, exit 1.
    let out = meshctl(&cp, &["get", "services"]).await;
    assert_eq!(out.code, Some(1), "{out:?}");
    assert_eq!(out.stderr.trim().lines().count(), 1, "{:?}", out.stderr);
    assert!(
        out.stderr.contains("cannot reach the control plane"),
        "{:?}",
        out.stderr
    );
    assert!(!out.stderr.contains("panicked"));
}

#[tokio::test]
async fn broadcast_reaches_every_healthy_instance_and_reports_failures() {
    let dir = TempDir::new();
    let cp = control_plane(&dir).await;
    let orders = [
        Instance::<Sidecar>::start(&cp, "orders", "v1").await,
        Instance::<Sidecar>::start(&cp, "orders", "v2").await,
    ];
    let frontend = Instance::<Sidecar>::start(&cp, "frontend", "v1").await;
    let everyone: Vec<&Instance> = orders.iter().chain([&frontend]).collect();
    wait::until(
        "all registered and healthy",
        Duration::from_secs(10),
        || async {
            let o = registered(&cp, "orders").await;
            let f = registered(&cp, "frontend").await;
            (o.len() == 2 && f.len() == 1 && o.iter().chain(&f).all(|(_, h)| *h)).then_some(())
        },
    )
    .await;

    let message = dir.path.join("msg.json");
    std::fs::write(&message, r#"{"event":"cache-flush"}"#).unwrap();
    let data = format!("@{}", message.display());
    let out = meshctl(&cp, &["broadcast", "--path", "/echo", "--data", &data]).await;
    assert!(out.success(), "{out:?}");
    for instance in &everyone {
        assert_eq!(
            instance.app.requests(),
            1,
            "{} not reached once",
            instance.app.name
        );
        assert!(out.stdout.contains(&instance.address()), "{}", out.stdout);
    }

    // Only some services; a slow instance is reported as a failure.
    orders[1].app.set_delay(Duration::from_secs(5));
    let out = meshctl(
        &cp,
        &[
            "broadcast",
            "--service",
            "orders",
            "--path",
            "/echo",
            "--data",
            &data,
            "--timeout",
            "1s",
        ],
    )
    .await;
    assert_eq!(out.code, Some(1), "{out:?}");
    assert_eq!(frontend.app.requests(), 1, "--service orders only");
    assert_eq!(orders[0].app.requests(), 2);
    let slow_line = out
        .stdout
        .lines()
        .find(|l| l.contains(&orders[1].address()))
        .unwrap_or_else(|| panic!("no line for the slow instance:\n{}", out.stdout));
    assert!(
        slow_line.to_lowercase().contains("timeout")
            || slow_line.to_lowercase().contains("timed out"),
        "{slow_line}"
    );
}

/// 4. Push latency: with many watchers (200 by default;
/// `MESHLET_WATCHERS=1000` from the benchmark), the time from a registry
/// change until every watcher holds the new revision. Reported, and the
/// p99 must stay under a second.
#[tokio::test]
async fn a_change_reaches_every_watcher_quickly() {
    let watchers: usize = std::env::var("MESHLET_WATCHERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let dir = TempDir::new();
    let cp = ControlPlaneProcess::start(&dir.path.join("data"), &[]).await;
    let mut streams = Vec::new();
    for _ in 0..watchers {
        streams.push(client::WatchStream::open(&cp, 0).await);
    }
    let mut latencies = Vec::new();
    for round in 0..5u16 {
        let current = streams[0].revision;
        let registration = serde_json::json!({
            "id": format!("bench-{round}"),
            "service": "bench",
            "address": format!("127.0.0.1:{}", free_port()),
            "healthy": true,
        });
        let started = Instant::now();
        let reply = cp.post_json("/api/v1/instances", &registration).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        let mut set = tokio::task::JoinSet::new();
        for mut stream in streams.drain(..) {
            set.spawn(async move {
                stream.until_revision_above(current).await;
                (started.elapsed(), stream)
            });
        }
        while let Some(done) = set.join_next().await {
            let (latency, stream) = done.unwrap();
            latencies.push(latency);
            streams.push(stream);
        }
    }
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    let (p50, p99, max) = (pct(0.50), pct(0.99), *latencies.last().unwrap());
    println!(
        "push latency, {watchers} watchers × 5 changes: p50 {p50:?}, p99 {p99:?}, max {max:?}; \
         control plane RSS {:.1} MiB",
        cp.rss_bytes() as f64 / (1024.0 * 1024.0)
    );
    assert!(
        p99 < Duration::from_secs(1),
        "p99 {p99:?} with {watchers} watchers"
    );
    let distinct: BTreeSet<u64> = streams.iter().map(|s| s.revision).collect();
    assert_eq!(distinct.len(), 1, "all watchers hold one revision");
}

#[tokio::test]
async fn sigterm_deregisters_at_once_and_pushes_keep_connections() {
    let dir = TempDir::new();
    // A long TTL: only deregistration can remove an instance quickly.
    let cp = control_plane_with_ttl(&dir, "60s").await;
    // Processes: the leaving one gets a real SIGTERM (and the others are
    // of the same kind as it).
    let (mut orders, frontend) = two_orders_and_a_frontend::<SidecarProcess>(&cp).await;

    // Pooled connections and in-flight requests survive a pushed change.
    call_many(&frontend.sidecar, "orders", 20).await;
    let pooled: Vec<usize> = orders.iter().map(|i| i.app.connections()).collect();
    let slow = {
        let outbound = frontend.sidecar.outbound;
        tokio::spawn(async move {
            client::get_uri(outbound, "http://orders/slow?ms=8000")
                .await
                .expect("slow answer")
        })
    };
    let newcomer = a_newcomer_joins(&cp, &orders, &frontend).await;
    assert!(
        !slow.is_finished(),
        "the slow request is still in flight across the push"
    );
    let reply = slow.await.unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());
    call_many(&frontend.sidecar, "orders", 60).await;
    for (instance, before) in orders.iter().zip(&pooled) {
        // One more connection at most: the slow request held one busy.
        assert!(
            instance.app.connections() <= before + 1,
            "{}: {} connections after the push, {before} before: pools were rebuilt",
            instance.app.name,
            instance.app.connections()
        );
    }
    assert!(newcomer.app.requests() > 0, "the new instance gets traffic");

    // SIGTERM: the sidecar deregisters before draining, so the instance
    // leaves every sidecar long before the 60 s TTL.
    let mut leaving = orders.remove(0);
    let leaving_address = leaving.address();
    // Traffic keeps flowing through the shutdown, without a single error.
    let outbound = frontend.sidecar.outbound;
    let traffic = repeatedly(Duration::ZERO, move || async move {
        match client::get_uri(outbound, "http://orders/").await {
            Ok(reply) if reply.status == 200 => Ok(()),
            Ok(reply) => Err(format!("{} {}", reply.status, reply.text())),
            Err(e) => Err(e.to_string()),
        }
    });
    let stopped_at = Instant::now();
    leaving.sidecar.signal(nix::sys::signal::Signal::SIGTERM);
    let status = leaving.sidecar.wait_exit(Duration::from_secs(10)).await;
    assert!(status.success(), "{}", leaving.sidecar.log_text());
    assert!(
        leaving.sidecar.log_text().contains("deregistered"),
        "{}",
        leaving.sidecar.log_text()
    );
    let remaining = sorted(orders.iter().chain([&newcomer]).map(Instance::address));
    frontend_routes_orders_to(&frontend, &remaining, Duration::from_secs(3)).await;
    assert!(!registered(&cp, "orders")
        .await
        .iter()
        .any(|(a, _)| *a == leaving_address));
    println!(
        "deregistered instance gone from the frontend's sidecar after {:?}",
        stopped_at.elapsed()
    );
    let outcomes = traffic.stop().await;
    let sent = outcomes.len();
    let failed: Vec<String> = outcomes.into_iter().filter_map(Result::err).collect();
    assert!(
        failed.is_empty(),
        "{} of {sent} requests failed during the shutdown: {failed:?}",
        failed.len()
    );
    println!("{sent} requests during the shutdown, none failed");
}

#[tokio::test]
async fn a_control_plane_that_lost_its_data_gets_every_instance_back() {
    let dir = TempDir::new();
    let mut cp = control_plane(&dir).await;
    // The sidecar tokens are in the store that is lost; the admin token
    // file and the CA are kept (as an operator keeps them elsewhere).
    cp.sidecars_use_the_admin_token();
    let (orders, frontend) = two_orders_and_a_frontend::<Sidecar>(&cp).await;
    let both = sorted(orders.iter().map(Instance::address));

    // The disk is gone: the control plane starts empty. Heartbeats get 404,
    // sidecars register again, and every sidecar converges on the rebuilt
    // registry (the policies must be applied again by the operator).
    // Throughout, the frontend's sidecar never routes orders to nothing: the
    // control plane holds back its (empty) snapshot from sidecars of the
    // lost store until they have had time to register again.
    let admin = frontend.sidecar.admin;
    let watching = repeatedly(Duration::from_millis(10), move || async move {
        let reply = client::get(admin, "/config_dump").await.ok()?;
        let dump: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
        let count: usize = dump["snapshot"]["services"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["name"] == "orders")
            .map(|s| s["endpoints"].as_array().unwrap().len())
            .sum();
        Some(count)
    });
    cp.wipe_and_restart().await;
    wait::until(
        "instances registered again",
        Duration::from_secs(10),
        || async {
            (registered(&cp, "orders").await.len() == 2
                && registered(&cp, "frontend").await.len() == 1)
                .then_some(())
        },
    )
    .await;
    frontend_routes_orders_to(&frontend, &both, Duration::from_secs(5)).await;
    // Converged on the new store: a later change arrives as usual.
    let _newcomer = a_newcomer_joins(&cp, &orders, &frontend).await;
    let fewest = watching
        .stop()
        .await
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(usize::MAX);
    assert!(
        fewest >= 2,
        "orders was routed to {fewest} endpoints at some point"
    );
    call_many(&frontend.sidecar, "orders", 10).await;
}
