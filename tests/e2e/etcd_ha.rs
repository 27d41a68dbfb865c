//! Control-plane replicas on etcd (issue 18): a real 3-member etcd cluster
//! (Debian's `etcd-server`) on loopback, three `control-plane --store etcd`
//! processes sharing it, real sidecars and meshctl.
//!
//! - sidecars list all three replicas (`--control-plane URL1,URL2,URL3`,
//!   each starting with another one): a policy applied through replica 1
//!   is enforced within 1 s by sidecars watching replicas 2 and 3, and
//!   `meshctl get` through replica 3 shows it; every replica names itself
//!   in `x-meshlet-replica`;
//! - SIGKILL of the replica a sidecar watches while clients send requests
//!   through both sidecars: not one request fails, the sidecar watches
//!   another replica within 2 s (resumed, no second snapshot), an
//!   instance registered during the outage reaches every sidecar, and the
//!   killed replica, started again, catches up;
//! - every replica SIGKILLed: sidecars keep routing from their snapshot,
//!   and when one replica returns they watch it again, resumed from their
//!   revision without a full snapshot, and a change through it arrives;
//! - every replica down longer than the TTL while an instance dies: etcd
//!   ends the leases with no replica to write an expiry revision; the
//!   replica that returns still tells every sidecar the dead instance is
//!   gone, and the living ones (registered again) lose no request;
//! - a SIGKILLed sidecar's instance leaves every replica's registry within
//!   TTL + 2 s (its etcd lease ends, no replica is a leader; etcd looks for
//!   expired leases every 500 ms, then commits the revoke on three members
//!   sharing one disk);
//! - one etcd member down: applies work; two down: an apply fails quickly
//!   with a clear error, sidecars keep routing; members back: nothing
//!   lost, applies work again;
//! - two replicas applying conflicting changes at the same moment, 100
//!   times: each apply succeeds or gets a clear 409, every revision in
//!   the history is whole, and the replicas converge.

use std::time::{Duration, Instant};

use meshlet_e2e::etcd::EtcdCluster;
use meshlet_e2e::metrics::Scrape;
use meshlet_e2e::traffic::Traffic;
use meshlet_e2e::{client, meshctl, wait, ControlPlaneProcess, SidecarProcess, TempDir, Upstream};

const TTL: Duration = Duration::from_secs(3);

/// Three replicas on `etcd`, started one after the other (the first
/// creates the CA and the admin token, the others copy them).
async fn replicas(dir: &TempDir, etcd: &EtcdCluster, prefix: &str) -> Vec<ControlPlaneProcess> {
    replicas_with(dir, etcd, prefix, &[]).await
}

/// [`replicas`] with extra flags for every replica.
async fn replicas_with(
    dir: &TempDir,
    etcd: &EtcdCluster,
    prefix: &str,
    extra: &[&str],
) -> Vec<ControlPlaneProcess> {
    etcd.start_replicas(dir, prefix, &[&["--ttl", "3s"], extra].concat())
        .await
}

fn doc(kind: &str, name: &str, spec: &str) -> String {
    format!("apiVersion: meshlet.dev/v1alpha1\nkind: {kind}\nmetadata: {{name: {name}}}\nspec: {spec}\n")
}

/// The registered instance ids of `service` on `cp`.
async fn instance_ids(cp: &ControlPlaneProcess, service: &str) -> Vec<String> {
    let reply = cp.get(&format!("/api/v1/services/default/{service}")).await;
    if reply.status == 404 {
        return Vec::new();
    }
    let detail: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
    let mut ids: Vec<String> = detail["instances"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|i| i["id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    ids
}

/// `--control-plane` listing every replica, starting with `cps[first]`
/// and going round: a sidecar watches its first replica while it is up
/// and fails over to the next ones.
fn all_urls(cps: &[ControlPlaneProcess], first: usize) -> String {
    (0..cps.len())
        .map(|i| cps[(first + i) % cps.len()].url())
        .collect::<Vec<_>>()
        .join(",")
}

/// A sidecar for `service` in front of `app` listing all three replicas,
/// `cps[first]` first (its token issued through that replica: tokens live
/// in etcd, every replica accepts them).
async fn sidecar_listing_all(
    cps: &[ControlPlaneProcess],
    first: usize,
    service: &str,
    app: &Upstream,
) -> SidecarProcess {
    let mut credentials = cps[first].sidecar_credentials("default", service).await;
    credentials.url = all_urls(cps, first);
    SidecarProcess::builder(service, app.port())
        .control_plane_with(&credentials)
        .start()
        .await
}

/// The replica URL `sidecar` watches now: its current replica while the
/// watch stream is open (`/config_dump`), else `None`.
async fn watched(sidecar: &SidecarProcess) -> Option<String> {
    let status = sidecar.config_dump().await["controlPlane"].clone();
    (status["connected"] == true)
        .then(|| status["current"].as_str().map(str::to_owned))
        .flatten()
}

/// Two services, each an app and a sidecar listing all three replicas:
/// `orders` watching replica 2 first, `frontend` replica 3.
async fn two_services(
    cps: &[ControlPlaneProcess],
) -> (Upstream, SidecarProcess, Upstream, SidecarProcess) {
    let orders_app = Upstream::start("orders").await;
    let orders = sidecar_listing_all(cps, 1, "orders", &orders_app).await;
    let frontend_app = Upstream::start("frontend").await;
    let frontend = sidecar_listing_all(cps, 2, "frontend", &frontend_app).await;
    wait::until(
        "both sidecars route to each other",
        Duration::from_secs(20),
        || async {
            let a = !frontend.endpoints_of("orders").await.is_empty();
            let b = !orders.endpoints_of("frontend").await.is_empty();
            (a && b).then_some(())
        },
    )
    .await;
    (orders_app, orders, frontend_app, frontend)
}

/// A fault that makes every call to `service` fail with 503.
fn abort_calls_to(service: &str) -> String {
    doc(
        "FaultInjectionPolicy",
        &format!("abort-{service}"),
        &format!("{{targetRef: {{service: {service}}}, abort: {{status: 503, percent: 100}}}}"),
    )
}

async fn status_of(sidecar: &SidecarProcess, uri: &str) -> Option<u16> {
    client::get_uri(sidecar.outbound, uri)
        .await
        .ok()
        .map(|r| r.status.as_u16())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_through_one_replica_reaches_sidecars_of_the_others_within_a_second() {
    let etcd = EtcdCluster::start(3).await;
    let dir = TempDir::new();
    let cps = replicas(&dir, &etcd, "/mesh-a").await;
    // Every replica serves with the same CA and admin token.
    let token = cps[0].admin_token();
    for cp in &cps {
        assert_eq!(cp.admin_token(), token, "one admin token for all replicas");
        assert_eq!(
            std::fs::read(cp.ca_file()).unwrap(),
            std::fs::read(cps[0].ca_file()).unwrap(),
            "one CA for all replicas"
        );
    }
    let (_orders_app, orders, _frontend_app, frontend) = two_services(&cps).await;
    assert_eq!(status_of(&frontend, "http://orders/").await, Some(200));
    assert_eq!(status_of(&orders, "http://frontend/").await, Some(200));
    // Each lists all three replicas and watches its first: none watches
    // replica 1, through which the policy goes.
    for (sidecar, replica) in [(&orders, &cps[1]), (&frontend, &cps[2])] {
        let status = sidecar.config_dump().await["controlPlane"].clone();
        assert_eq!(status["replicas"].as_array().unwrap().len(), 3, "{status}");
        wait::until(
            "the watch on its first replica",
            Duration::from_secs(5),
            || async { (watched(sidecar).await == Some(replica.url())).then_some(()) },
        )
        .await;
    }

    let yaml = format!(
        "{}---\n{}",
        abort_calls_to("orders"),
        abort_calls_to("frontend")
    );
    std::fs::write(dir.path.join("faults.yaml"), &yaml).unwrap();
    let out = meshctl(
        &cps[0],
        &[
            "apply",
            "-f",
            dir.path.join("faults.yaml").to_str().unwrap(),
        ],
    )
    .await;
    assert!(out.success(), "apply through replica 1: {out:?}");
    let applied = Instant::now();
    // Enforced by the sidecar watching replica 3 (frontend calling orders)
    // and by the one watching replica 2 (orders calling frontend).
    let enforced = wait::within(Duration::from_secs(1), || async {
        let a = status_of(&frontend, "http://orders/").await == Some(503);
        let b = status_of(&orders, "http://frontend/").await == Some(503);
        (a && b).then_some(())
    })
    .await;
    assert!(
        enforced.is_some(),
        "the policy applied through replica 1 was not enforced by both sidecars within 1s \
         (frontend→orders {:?}, orders→frontend {:?})",
        status_of(&frontend, "http://orders/").await,
        status_of(&orders, "http://frontend/").await,
    );
    let took = applied.elapsed();
    let out = meshctl(&cps[2], &["get", "FaultInjectionPolicy"]).await;
    assert!(out.success(), "{out:?}");
    assert!(
        out.stdout.contains("abort-orders") && out.stdout.contains("abort-frontend"),
        "meshctl get through replica 3: {out:?}"
    );
    // Each replica names itself; /healthz?detail and /metrics say etcd.
    for (i, cp) in cps.iter().enumerate() {
        let reply = cp.get("/healthz?detail").await;
        assert_eq!(
            reply.header("x-meshlet-replica"),
            Some(format!("replica-{}", i + 1).as_str())
        );
        let detail: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
        assert_eq!(detail["store"], "etcd", "{detail}");
        assert_eq!(detail["etcd"]["up"], true, "{detail}");
        let metrics = cp.get("/metrics").await.text();
        assert!(
            metrics.contains("meshlet_store_kind{kind=\"etcd\"} 1"),
            "{metrics}"
        );
        assert!(metrics.contains("meshlet_store_up 1"), "{metrics}");
    }
    eprintln!("policy enforced by both sidecars {took:?} after the apply returned");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_sidecar_leaves_every_replica_within_ttl_plus_two_seconds() {
    let etcd = EtcdCluster::start(3).await;
    let dir = TempDir::new();
    let cps = replicas(&dir, &etcd, "/mesh-b").await;
    let (_orders_app, orders, _frontend_app, frontend) = two_services(&cps).await;
    let orders_ids = wait::until(
        "orders registered on every replica",
        Duration::from_secs(10),
        || async {
            let mut all = Vec::new();
            for cp in &cps {
                all.push(instance_ids(cp, "orders").await);
            }
            (all.iter().all(|ids| ids.len() == 1) && all.windows(2).all(|w| w[0] == w[1]))
                .then(|| all[0].clone())
        },
    )
    .await;
    orders.signal(nix::sys::signal::Signal::SIGKILL);
    let killed = Instant::now();
    let gone = wait::within(TTL + Duration::from_secs(2), || async {
        for cp in &cps {
            if !instance_ids(cp, "orders").await.is_empty() {
                return None;
            }
        }
        Some(())
    })
    .await;
    eprintln!(
        "killed sidecar's instance gone from every replica: {gone:?}, {:?} after the SIGKILL",
        killed.elapsed()
    );
    let mut left = Vec::new();
    for cp in &cps {
        left.push(instance_ids(cp, "orders").await);
    }
    assert!(
        gone.is_some(),
        "instance {orders_ids:?} still registered {:?} after the SIGKILL (TTL 3s): {left:?}",
        killed.elapsed()
    );
    // The one that still heartbeats stays, on every replica.
    for cp in &cps {
        assert_eq!(instance_ids(cp, "frontend").await.len(), 1);
    }
    let history = cps[0].get_json("/api/v1/revisions?limit=5").await;
    let expired = history
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["changes"].to_string().contains("expired orders/"))
        .count();
    assert_eq!(
        expired, 1,
        "one expiry revision, whichever replica won: {history}"
    );
    drop(frontend);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applies_need_an_etcd_quorum_and_nothing_is_lost_when_it_returns() {
    let mut etcd = EtcdCluster::start(3).await;
    let dir = TempDir::new();
    let cps = replicas(&dir, &etcd, "/mesh-c").await;
    let (_orders_app, orders, _frontend_app, frontend) = two_services(&cps).await;
    let apply = |n: u32| {
        let path = dir.path.join(format!("p{n}.yaml"));
        std::fs::write(
            &path,
            doc(
                "RetryPolicy",
                &format!("retry-{n}"),
                "{targetRef: {service: orders}, attempts: 2}",
            ),
        )
        .unwrap();
        path
    };
    let p1 = apply(1);
    let out = meshctl(&cps[0], &["apply", "-f", p1.to_str().unwrap()]).await;
    assert!(out.success(), "{out:?}");

    // One member down: still a quorum.
    etcd.kill(0).await;
    let p2 = apply(2);
    let out = wait::until(
        "an apply with one etcd member down",
        Duration::from_secs(10),
        || async {
            let out = meshctl(&cps[1], &["apply", "-f", p2.to_str().unwrap()]).await;
            out.success().then_some(out)
        },
    )
    .await;
    assert!(out.stdout.contains("created"), "{out:?}");

    // Two down: no quorum. An apply fails, quickly, saying why.
    etcd.kill(1).await;
    let p3 = apply(3);
    let started = Instant::now();
    let before_quorum = meshctl(&cps[2], &["apply", "-f", p3.to_str().unwrap()]).await;
    let took = started.elapsed();
    assert!(
        !before_quorum.success(),
        "an apply without an etcd quorum must fail: {before_quorum:?}"
    );
    assert!(
        before_quorum.stderr.contains("etcd") && before_quorum.stderr.contains("quorum"),
        "the error says etcd has no quorum: {before_quorum:?}"
    );
    assert!(
        took < Duration::from_secs(10),
        "the apply failed after {took:?}, not promptly"
    );
    // Sidecars route from their snapshot meanwhile.
    for _ in 0..20 {
        assert_eq!(status_of(&frontend, "http://orders/").await, Some(200));
        assert_eq!(status_of(&orders, "http://frontend/").await, Some(200));
    }

    // The members come back: nothing lost, applies work again.
    etcd.restart(0).await;
    etcd.restart(1).await;
    etcd.wait_member_healthy(0).await;
    etcd.wait_member_healthy(1).await;
    let unconfirmed =
        std::sync::atomic::AtomicBool::new(before_quorum.stderr.contains("may still take effect"));
    let out = wait::until(
        "an apply after the quorum returned",
        Duration::from_secs(20),
        || async {
            let out = meshctl(&cps[0], &["apply", "-f", p3.to_str().unwrap()]).await;
            if out.stderr.contains("may still take effect") {
                unconfirmed.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            out.success().then_some(out)
        },
    )
    .await;
    // "unchanged" only when an earlier attempt was unconfirmed (its error
    // said it may still take effect) and etcd committed it when the quorum
    // returned; a refused apply never lands.
    let unconfirmed = unconfirmed.into_inner();
    assert!(
        out.stdout.contains("created") || (unconfirmed && out.stdout.contains("unchanged")),
        "outage apply: {before_quorum:?}\nafter: {out:?}"
    );
    for cp in &cps {
        wait::until(
            "every replica has the three policies",
            Duration::from_secs(5),
            || async {
                let out = meshctl(cp, &["get", "RetryPolicy"]).await;
                (out.success() && (1..=3).all(|n| out.stdout.contains(&format!("retry-{n}"))))
                    .then_some(())
            },
        )
        .await;
    }
    // The sidecars are still registered (their leases outlived the outage
    // or they registered again) and route.
    wait::until(
        "both services registered again on replica 1",
        Duration::from_secs(10),
        || async {
            let a = instance_ids(&cps[0], "orders").await.len() == 1;
            let b = instance_ids(&cps[0], "frontend").await.len() == 1;
            (a && b).then_some(())
        },
    )
    .await;
    assert_eq!(status_of(&frontend, "http://orders/").await, Some(200));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicting_applies_on_two_replicas_are_whole_or_refused() {
    let etcd = EtcdCluster::start(3).await;
    let dir = TempDir::new();
    let cps = replicas(&dir, &etcd, "/mesh-d").await;
    let file = |round: u32, replica: u32| {
        let interval = format!("{}ms", round * 10 + replica);
        let text: String = ["x", "y", "z"]
            .iter()
            .map(|name| {
                doc(
                    "HealthCheckPolicy",
                    name,
                    &format!("{{targetRef: {{service: orders}}, interval: {interval}}}"),
                )
            })
            .collect::<Vec<_>>()
            .join("---\n");
        serde_json::json!({"files": [{"name": format!("r{replica}.yaml"), "text": text}]})
    };
    let (mut applied, mut conflicts) = (0, 0);
    for round in 1..=100 {
        let (first, second) = (file(round, 1), file(round, 2));
        let (a, b) = tokio::join!(
            cps[0].post_json("/api/v1/apply", &first),
            cps[1].post_json("/api/v1/apply", &second),
        );
        for reply in [a, b] {
            match reply.status.as_u16() {
                200 => applied += 1,
                409 => {
                    assert!(reply.text().contains("conflict"), "{}", reply.text());
                    conflicts += 1;
                }
                other => panic!("round {round}: an apply answered {other}: {}", reply.text()),
            }
        }
    }
    assert_eq!(applied + conflicts, 200);
    // Every revision is whole: three lines, one interval for all three.
    let history = cps[2].get_json("/api/v1/revisions?limit=1000").await;
    let records = history.as_array().unwrap();
    let mut revisions: Vec<u64> = records
        .iter()
        .map(|r| r["revision"].as_u64().unwrap())
        .collect();
    revisions.reverse();
    assert!(
        revisions.windows(2).all(|w| w[1] == w[0] + 1),
        "gapless history: {revisions:?}"
    );
    assert_eq!(records.len(), applied, "one revision per successful apply");
    for record in records {
        let changes = record["changes"].as_array().unwrap();
        assert_eq!(changes.len(), 3, "a whole revision: {record}");
    }
    // The replicas converge on one apply's resources.
    let intervals = |text: &str| -> std::collections::BTreeSet<String> {
        text.split("\"interval\":\"")
            .skip(1)
            .map(|s| s.split('"').next().unwrap().to_owned())
            .collect()
    };
    wait::until(
        "the replicas converge on one apply",
        Duration::from_secs(5),
        || async {
            let mut seen = Vec::new();
            for cp in &cps {
                seen.push(cp.get_json("/api/v1/resources").await.to_string());
            }
            let one = seen.windows(2).all(|w| w[0] == w[1]) && intervals(&seen[0]).len() == 1;
            one.then_some(())
        },
    )
    .await;
    eprintln!("{applied} applies succeeded, {conflicts} got 409");
}

/// Full snapshots the sidecar received on its watch so far.
async fn snapshots(sidecar: &SidecarProcess) -> f64 {
    Scrape::of(sidecar.admin).await.sum(
        "meshlet_control_plane_updates_total",
        &[("type", "snapshot")],
    )
}

/// Waits until `sidecar` counts its first snapshot (and no more).
async fn first_snapshot(sidecar: &SidecarProcess) {
    wait::until(
        "the first snapshot counted",
        Duration::from_secs(5),
        || async { (snapshots(sidecar).await == 1.0).then_some(()) },
    )
    .await;
}

/// The mesh revision a replica serves (`/healthz?detail`).
async fn replica_revision(cp: &ControlPlaneProcess) -> u64 {
    let reply = cp.get("/healthz?detail").await;
    let detail: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
    detail["revision"].as_u64().unwrap_or(0)
}

/// Requests both ways between the two services of `two_services`, counted.
struct BothWays {
    to_orders: Traffic,
    to_frontend: Traffic,
}

impl BothWays {
    /// Starts the traffic and waits until both directions answered 20.
    async fn start(frontend: &SidecarProcess, orders: &SidecarProcess) -> BothWays {
        let both = BothWays {
            to_orders: Traffic::start(frontend.outbound, "orders"),
            to_frontend: Traffic::start(orders.outbound, "frontend"),
        };
        wait::until("traffic flows", Duration::from_secs(10), || async {
            (both.to_orders.ok() >= 20 && both.to_frontend.ok() >= 20).then_some(())
        })
        .await;
        both
    }

    /// Waits until both directions answered 20 more (`what`: the moment).
    async fn more(&self, what: &str) {
        let (orders, frontend) = (self.to_orders.ok(), self.to_frontend.ok());
        wait::until(what, Duration::from_secs(5), || async {
            (self.to_orders.ok() >= orders + 20 && self.to_frontend.ok() >= frontend + 20)
                .then_some(())
        })
        .await;
    }

    /// Stops both and asserts that not one request failed; the answered counts.
    async fn finish(self) -> (usize, usize) {
        (
            no_failures(self.to_orders, "frontend → orders").await,
            no_failures(self.to_frontend, "orders → frontend").await,
        )
    }
}

/// Stops `traffic` and asserts not one request failed.
async fn no_failures(traffic: Traffic, what: &str) -> usize {
    let (ok, failures) = traffic.finish().await;
    assert!(
        failures.is_empty(),
        "{what}: {} of {} requests failed: {:?}",
        failures.len(),
        ok + failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(ok > 0, "{what}: no request answered");
    ok
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_watched_replica_loses_no_request_and_no_registration() {
    let etcd = EtcdCluster::start(3).await;
    let dir = TempDir::new();
    let mut cps = replicas(&dir, &etcd, "/mesh-e").await;
    // frontend lists replica 1 first, orders replica 2: after the kill of
    // frontend's replica one sidecar fails over, the other does not.
    let orders_app = Upstream::start("orders").await;
    let orders = sidecar_listing_all(&cps, 1, "orders", &orders_app).await;
    let frontend_app = Upstream::start("frontend").await;
    let frontend = sidecar_listing_all(&cps, 0, "frontend", &frontend_app).await;
    wait::until(
        "both sidecars route to each other",
        Duration::from_secs(20),
        || async {
            let a = !frontend.endpoints_of("orders").await.is_empty();
            let b = !orders.endpoints_of("frontend").await.is_empty();
            (a && b).then_some(())
        },
    )
    .await;
    let sidecars = [&orders, &frontend];
    for sidecar in sidecars {
        first_snapshot(sidecar).await;
    }
    // Which replica each watches, from the sidecar itself.
    let victim_url = wait::until(
        "frontend watching a replica",
        Duration::from_secs(5),
        || watched(&frontend),
    )
    .await;
    let victim = cps.iter().position(|cp| cp.url() == victim_url).unwrap();
    let metric_current = Scrape::of(frontend.admin)
        .await
        .sum("meshlet_control_plane_current", &[("url", &victim_url)]);
    assert_eq!(
        metric_current, 1.0,
        "/metrics names the watched replica too"
    );
    let orders_watched = watched(&orders).await;
    assert_ne!(orders_watched.as_deref(), Some(victim_url.as_str()));

    // Requests both ways, counted.
    let traffic = BothWays::start(&frontend, &orders).await;

    cps[victim].kill9().await;
    let killed = Instant::now();
    let moved = wait::within(Duration::from_secs(2), || async {
        watched(&frontend)
            .await
            .filter(|url| *url != victim_url)
            .map(|url| (url, killed.elapsed()))
    })
    .await;
    let Some((new_url, failover_time)) = moved else {
        panic!(
            "frontend not watching another replica 2 s after replica {} was killed: {}\n{}",
            victim + 1,
            frontend.config_dump().await["controlPlane"],
            frontend.log_text()
        );
    };
    assert!(
        cps.iter().any(|cp| cp.url() == new_url),
        "{new_url} is one of the replicas"
    );
    assert!(
        Scrape::of(frontend.admin)
            .await
            .sum("meshlet_control_plane_failovers_total", &[])
            >= 1.0
    );
    // orders never watched the victim: it stays where it was.
    assert_eq!(watched(&orders).await, orders_watched);

    // A registration during the outage: a third service whose sidecar
    // lists the dead replica first.
    let payments_app = Upstream::start("payments").await;
    let survivor = (victim + 1) % 3;
    let mut credentials = cps[survivor]
        .sidecar_credentials("default", "payments")
        .await;
    credentials.url = all_urls(&cps, victim);
    let registering = Instant::now();
    let payments = SidecarProcess::builder("payments", payments_app.port())
        .control_plane_with(&credentials)
        .start()
        .await;
    let live = registering.elapsed();
    let pushed = wait::within(Duration::from_secs(10), || async {
        for sidecar in sidecars {
            if sidecar.endpoints_of("payments").await.is_empty() {
                return None;
            }
        }
        Some(registering.elapsed())
    })
    .await;
    let Some(propagation) = pushed else {
        let mut views = Vec::new();
        for sidecar in sidecars {
            views.push(sidecar.endpoints_of("payments").await);
        }
        panic!(
            "the instance registered during the outage did not reach every sidecar: {views:?}\n{}",
            payments.log_text()
        );
    };
    for sidecar in sidecars {
        assert_eq!(status_of(sidecar, "http://payments/").await, Some(200));
    }
    assert_ne!(
        watched(&payments).await.as_deref(),
        Some(victim_url.as_str()),
        "payments skipped the dead replica"
    );

    // Resumed, not resent: one snapshot each, the failover included.
    for sidecar in sidecars {
        assert_eq!(
            snapshots(sidecar).await,
            1.0,
            "resumed on another replica without a full snapshot:\n{}",
            Scrape::of(sidecar.admin).await.text
        );
    }
    traffic.more("more traffic after the failover").await;
    let (sent_to_orders, sent_to_frontend) = traffic.finish().await;

    // The killed replica starts again and catches up: the registration
    // made while it was down, the same revision as the others.
    cps[victim].restart().await;
    wait::until(
        "the restarted replica caught up",
        Duration::from_secs(10),
        || async {
            let ids = instance_ids(&cps[victim], "payments").await;
            let revision = replica_revision(&cps[victim]).await;
            let other = replica_revision(&cps[survivor]).await;
            (ids.len() == 1 && revision == other).then_some(())
        },
    )
    .await;
    // And serves changes again: a policy through it reaches every sidecar.
    std::fs::write(dir.path.join("abort.yaml"), abort_calls_to("payments")).unwrap();
    let out = meshctl(
        &cps[victim],
        &["apply", "-f", dir.path.join("abort.yaml").to_str().unwrap()],
    )
    .await;
    assert!(
        out.success(),
        "apply through the restarted replica: {out:?}"
    );
    wait::until(
        "the policy through the restarted replica",
        Duration::from_secs(5),
        || async {
            let a = status_of(&frontend, "http://payments/").await == Some(503);
            let b = status_of(&orders, "http://payments/").await == Some(503);
            (a && b).then_some(())
        },
    )
    .await;
    eprintln!(
        "failover: frontend watched {new_url} {} ms after replica {} was SIGKILLed; \
         0 failed of {sent_to_orders} + {sent_to_frontend} requests; \
         registration during the outage at every sidecar {} ms after its sidecar was spawned \
         (live after {} ms)",
        failover_time.as_millis(),
        victim + 1,
        propagation.as_millis(),
        live.as_millis()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_replica_killed_sidecars_route_and_resume_when_one_returns() {
    let etcd = EtcdCluster::start(3).await;
    let dir = TempDir::new();
    let mut cps = replicas(&dir, &etcd, "/mesh-f").await;
    let (_orders_app, orders, _frontend_app, frontend) = two_services(&cps).await;
    let sidecars = [&orders, &frontend];
    for sidecar in sidecars {
        first_snapshot(sidecar).await;
    }
    let traffic = BothWays::start(&frontend, &orders).await;
    for cp in cps.iter_mut() {
        cp.kill9().await;
    }
    // No control plane at all: the sidecars say so and route from their
    // snapshot (well within the instances' 3 s TTL: their leases outlive
    // this outage).
    for sidecar in sidecars {
        wait::until(
            "the sidecar sees no replica",
            Duration::from_secs(5),
            || async { watched(sidecar).await.is_none().then_some(()) },
        )
        .await;
    }
    traffic.more("traffic without a control plane").await;
    // Replica 3 returns (on its port, its etcd data untouched).
    cps[2].restart().await;
    let back = Instant::now();
    for sidecar in sidecars {
        wait::until(
            "the sidecar watches replica 3 again",
            Duration::from_secs(10),
            || async { (watched(sidecar).await == Some(cps[2].url())).then_some(()) },
        )
        .await;
    }
    let resumed = back.elapsed();
    traffic.more("traffic after the return").await;
    let (sent_to_orders, sent_to_frontend) = traffic.finish().await;
    // A change through it arrives, as a delta after a resumed watch.
    std::fs::write(dir.path.join("abort.yaml"), abort_calls_to("orders")).unwrap();
    let out = meshctl(
        &cps[2],
        &["apply", "-f", dir.path.join("abort.yaml").to_str().unwrap()],
    )
    .await;
    assert!(out.success(), "{out:?}");
    wait::until(
        "the policy through replica 3",
        Duration::from_secs(5),
        || async { (status_of(&frontend, "http://orders/").await == Some(503)).then_some(()) },
    )
    .await;
    for sidecar in sidecars {
        assert_eq!(
            snapshots(sidecar).await,
            1.0,
            "resumed on the returning replica without a full snapshot:\n{}",
            Scrape::of(sidecar.admin).await.text
        );
    }
    eprintln!(
        "every replica down: {sent_to_orders} + {sent_to_frontend} requests answered; \
         sidecars watching the returned replica {} ms after it served",
        resumed.as_millis()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_that_died_while_every_replica_was_down_leaves_every_sidecar() {
    let etcd = EtcdCluster::start(3).await;
    let dir = TempDir::new();
    let mut cps = replicas(&dir, &etcd, "/mesh-g").await;
    let (_orders_app, orders, _frontend_app, frontend) = two_services(&cps).await;
    let payments_app = Upstream::start("payments").await;
    let payments = sidecar_listing_all(&cps, 0, "payments", &payments_app).await;
    let sidecars = [&orders, &frontend];
    for sidecar in sidecars {
        wait::until(
            "payments at every sidecar",
            Duration::from_secs(10),
            || async { (!sidecar.endpoints_of("payments").await.is_empty()).then_some(()) },
        )
        .await;
        first_snapshot(sidecar).await;
    }
    let traffic = BothWays::start(&frontend, &orders).await;
    for cp in cps.iter_mut() {
        cp.kill9().await;
    }
    // payments dies with no replica to hear of it; every lease ends (no
    // replica renews any): etcd deletes the three instance keys.
    payments.signal(nix::sys::signal::Signal::SIGKILL);
    wait::until(
        "etcd ended every instance lease",
        Duration::from_secs(15),
        || async { (etcd.count_prefix("/mesh-g/instances/").await == Some(0)).then_some(()) },
    )
    .await;
    assert!(
        !frontend.endpoints_of("payments").await.is_empty(),
        "still the snapshot"
    );
    cps[0].restart().await;
    let back = Instant::now();
    let gone = wait::within(Duration::from_secs(15), || async {
        for sidecar in sidecars {
            if !sidecar.endpoints_of("payments").await.is_empty() {
                return None;
            }
        }
        Some(back.elapsed())
    })
    .await;
    let Some(gone) = gone else {
        panic!(
            "the instance that died during the outage is still routed to: frontend {:?}, orders {:?}; \
             replica 1 lists {:?}",
            frontend.endpoints_of("payments").await,
            orders.endpoints_of("payments").await,
            instance_ids(&cps[0], "payments").await,
        );
    };
    // The living registered again: on the replica, and in etcd.
    for service in ["orders", "frontend"] {
        assert_eq!(instance_ids(&cps[0], service).await.len(), 1, "{service}");
    }
    assert_eq!(etcd.count_prefix("/mesh-g/instances/").await, Some(2));
    traffic.more("traffic after the return").await;
    let (sent_to_orders, sent_to_frontend) = traffic.finish().await;
    eprintln!(
        "every replica down past the TTL: the dead instance left every sidecar {} ms after a \
         replica returned; 0 failed of {sent_to_orders} + {sent_to_frontend} requests",
        gone.as_millis()
    );
}
