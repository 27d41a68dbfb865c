//! Heartbeats on `--store etcd` (issue 18): a real etcd member, two
//! `control-plane --store etcd` replicas with a 2 s TTL, an instance
//! registered through one and heartbeating through both.
//!
//! - every heartbeat answers 204 promptly (each renews the instance's
//!   etcd lease; a renewal that waited for an answer never coming used to
//!   answer 503 after 3 s, and the lease ran out between heartbeats);
//! - across three TTLs of heartbeats the instance stays registered with no
//!   new revision (no expiry, no registration again);
//! - once heartbeats stop, the lease ends: the instance leaves both
//!   replicas and a late heartbeat answers 404 (so a sidecar registers
//!   again), after which registering and heartbeating work again.

use std::time::{Duration, Instant};

use http::Method;
use meshlet_e2e::etcd::EtcdCluster;
use meshlet_e2e::scale;
use meshlet_e2e::{wait, ControlPlaneProcess, ControlPlaneRef, TempDir};

const TTL: Duration = Duration::from_secs(2);

async fn revision(cp: &ControlPlaneProcess) -> u64 {
    let published = cp.access().get_json("/api/v1/revisions?limit=1").await;
    published[0]["revision"].as_u64().expect("a revision")
}

async fn registered(cp: &ControlPlaneProcess, id: &str) -> bool {
    let reply = cp.access().get("/api/v1/services/default/svc").await;
    reply.status == 200 && reply.text().contains(&format!("\"{id}\""))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_keep_an_instance_alive_on_etcd_and_a_late_one_answers_404() {
    let etcd = EtcdCluster::start(1).await;
    let dir = TempDir::new();
    let endpoints = etcd.endpoints();
    let mut cps = Vec::new();
    for i in 1..=2 {
        let id = format!("replica-{i}");
        let flags = [
            "--store",
            "etcd",
            "--etcd-endpoints",
            &endpoints,
            "--etcd-prefix",
            "/hb",
            "--replica-id",
            &id,
            "--ttl",
            "2s",
        ];
        cps.push(ControlPlaneProcess::start(&dir.path.join(&id), &flags).await);
    }
    let registration = scale::registration("svc", 1, 40_001);
    let id = "svc-1";
    let first = scale::register(cps[0].access(), &cps[0].access().client(), &registration)
        .await
        .expect("register");
    wait::until(
        "both replicas know the instance",
        Duration::from_secs(10),
        || async { (registered(&cps[0], id).await && registered(&cps[1], id).await).then_some(()) },
    )
    .await;
    let before = revision(&cps[0]).await;
    assert!(before >= first);

    // Three TTLs of heartbeats, every TTL/4, alternating replicas.
    let until = Instant::now() + TTL * 3;
    let mut n = 0;
    while Instant::now() < until {
        let cp = cps[n % 2].access();
        let sent = Instant::now();
        let status = scale::heartbeat(cp, &cp.client(), id)
            .await
            .expect("heartbeat answered");
        let took = sent.elapsed();
        assert_eq!(status, 204, "heartbeat {n} through replica {}", n % 2 + 1);
        assert!(
            took < TTL / 2,
            "heartbeat {n} took {took:?}: a renewal must not wait for the call deadline"
        );
        n += 1;
        tokio::time::sleep(TTL / 4).await;
    }
    for cp in &cps {
        assert!(registered(cp, id).await, "the instance stayed registered");
        assert_eq!(
            revision(cp).await,
            before,
            "no expiry and no registration again while heartbeats flowed"
        );
    }

    // Silence: etcd ends the lease, every replica drops the instance.
    wait::until(
        "the instance leaves both replicas after its lease ends",
        TTL * 3 + Duration::from_secs(2),
        || async {
            (!registered(&cps[0], id).await && !registered(&cps[1], id).await).then_some(())
        },
    )
    .await;
    for cp in &cps {
        let status = scale::heartbeat(cp.access(), &cp.access().client(), id)
            .await
            .expect("heartbeat answered");
        assert_eq!(status, 404, "a heartbeat after the lease ended");
    }

    // Registering again gives a new lease that heartbeats renew.
    scale::register(cps[1].access(), &cps[1].access().client(), &registration)
        .await
        .expect("register again");
    wait::until(
        "both replicas know the instance again",
        Duration::from_secs(10),
        || async { (registered(&cps[0], id).await && registered(&cps[1], id).await).then_some(()) },
    )
    .await;
    for cp in &cps {
        let reply = cp
            .access()
            .call(
                &cp.access().client(),
                Method::PUT,
                &meshlet_api::mesh::paths::heartbeat(id),
                Some(&serde_json::json!({"healthy": true})),
            )
            .await;
        assert_eq!(reply.status, 204, "{}", reply.text());
    }
}
