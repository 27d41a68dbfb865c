//! Control-plane replicas on etcd (issue 18): a real 3-member etcd cluster
//! (Debian's `etcd-server`) on loopback, three `control-plane --store etcd`
//! processes sharing it, real sidecars and meshctl.
//!
//! - a policy applied through replica 1 is enforced within 1 s by sidecars
//!   watching replicas 2 and 3, and `meshctl get` through replica 3 shows
//!   it; every replica names itself in `x-meshlet-replica`;
//! - a SIGKILLed sidecar's instance leaves every replica's registry within
//!   TTL + 1 s (its etcd lease ends, no replica is a leader);
//! - one etcd member down: applies work; two down: an apply fails quickly
//!   with a clear error, sidecars keep routing; members back: nothing
//!   lost, applies work again;
//! - two replicas applying conflicting changes at the same moment, 100
//!   times: each apply succeeds or gets a clear 409, every revision in
//!   the history is whole, and the replicas converge.

use std::time::{Duration, Instant};

use meshlet_e2e::etcd::EtcdCluster;
use meshlet_e2e::{client, meshctl, wait, ControlPlaneProcess, SidecarProcess, TempDir, Upstream};

const TTL: Duration = Duration::from_secs(3);

/// Three replicas on `etcd`, started one after the other (the first
/// creates the CA and the admin token, the others copy them).
async fn replicas(dir: &TempDir, etcd: &EtcdCluster, prefix: &str) -> Vec<ControlPlaneProcess> {
    let endpoints = etcd.endpoints();
    let mut out = Vec::new();
    for i in 1..=3 {
        let id = format!("replica-{i}");
        let cp = ControlPlaneProcess::start(
            &dir.path.join(&id),
            &[
                "--store",
                "etcd",
                "--etcd-endpoints",
                &endpoints,
                "--etcd-prefix",
                prefix,
                "--replica-id",
                &id,
                "--ttl",
                "3s",
            ],
        )
        .await;
        out.push(cp);
    }
    out
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

/// Two services, each an app and a sidecar: `orders` watching replica 2,
/// `frontend` watching replica 3.
async fn two_services(
    cps: &[ControlPlaneProcess],
) -> (Upstream, SidecarProcess, Upstream, SidecarProcess) {
    let orders_app = Upstream::start("orders").await;
    let orders = SidecarProcess::builder("orders", orders_app.port())
        .control_plane(&cps[1])
        .start()
        .await;
    let frontend_app = Upstream::start("frontend").await;
    let frontend = SidecarProcess::builder("frontend", frontend_app.port())
        .control_plane(&cps[2])
        .start()
        .await;
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
async fn a_killed_sidecar_leaves_every_replica_within_ttl_plus_a_second() {
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
    let gone = wait::within(TTL + Duration::from_secs(1), || async {
        for cp in &cps {
            if !instance_ids(cp, "orders").await.is_empty() {
                return None;
            }
        }
        Some(())
    })
    .await;
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
    let out = meshctl(&cps[2], &["apply", "-f", p3.to_str().unwrap()]).await;
    let took = started.elapsed();
    assert!(
        !out.success(),
        "an apply without an etcd quorum must fail: {out:?}"
    );
    assert!(
        out.stderr.contains("etcd") && out.stderr.contains("quorum"),
        "the error says etcd has no quorum: {out:?}"
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
    let out = wait::until(
        "an apply after the quorum returned",
        Duration::from_secs(20),
        || async {
            let out = meshctl(&cps[0], &["apply", "-f", p3.to_str().unwrap()]).await;
            out.success().then_some(out)
        },
    )
    .await;
    assert!(out.stdout.contains("created"), "{out:?}");
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
