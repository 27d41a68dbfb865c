//! A mesh-wide CA rotation (issue 18): three `control-plane --store etcd`
//! replicas on a real etcd share the rotation state (`P/ca/state`) and
//! elect the one replica that moves its phases.
//!
//! - a rotation begun through replica 1 shows in every replica's trust
//!   bundle (the watch snapshot sidecars get) and CA status;
//! - a second rotation through replica 2 meanwhile is refused (409);
//! - SIGKILLing the election leader during the grace hands the leadership
//!   to another replica (`/healthz?detail`, `meshlet_leader`), which
//!   switches the signing root when the grace ends;
//! - two sidecars watching different replicas end with leaves from the
//!   new root, and mTLS traffic between them never failed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use meshlet_e2e::client::{self, WatchStream};
use meshlet_e2e::etcd::EtcdCluster;
use meshlet_e2e::mtls::{self, TestCa};
use meshlet_e2e::{meshctl, wait, ControlPlaneProcess, SidecarProcess, TempDir, Upstream};

const GRACE: &str = "20s";

/// Replica `i` (1-based) of the mesh under `prefix`.
async fn replica(dir: &TempDir, etcd: &EtcdCluster, prefix: &str, i: usize) -> ControlPlaneProcess {
    let id = format!("replica-{i}");
    let mut args = etcd.replica_args(prefix, &id);
    args.extend(["--ttl", "60s", "--ca-rotation-grace", GRACE].map(str::to_owned));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    ControlPlaneProcess::start(&dir.path.join(&id), &args).await
}

/// The rotation leader `cp` names in `/healthz?detail`.
async fn leader_seen_by(cp: &ControlPlaneProcess) -> Option<String> {
    let detail = cp.get_json("/healthz?detail").await;
    detail["leader"]["ca-rotation"].as_str().map(str::to_owned)
}

/// `meshlet_leader{role="ca-rotation"}` on `cp`.
async fn leader_metric(cp: &ControlPlaneProcess) -> Option<u8> {
    let text = cp.get("/metrics").await.text();
    text.lines()
        .find(|l| l.starts_with("meshlet_leader{role=\"ca-rotation\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// The root fingerprints of `cp`'s `GET /api/v1/ca`, signing first.
async fn fingerprints(cp: &ControlPlaneProcess) -> Vec<String> {
    let status = cp.get_json("/api/v1/ca").await;
    status["roots"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["fingerprint"].as_str().map(str::to_owned))
        .collect()
}

/// The trust bundle a sidecar watching `cp` gets (its snapshot's PEM).
async fn bundle_of(cp: &ControlPlaneProcess) -> String {
    let watch = WatchStream::open(cp, 0).await;
    watch.first["trustRoots"].as_str().unwrap_or("").to_owned()
}

fn certificates_in(pem: &str) -> usize {
    pem.matches("-----BEGIN CERTIFICATE-----").count()
}

/// Requests `from`'s outbound → service `to` until `stop`: (ok, failures).
fn traffic(
    outbound: std::net::SocketAddr,
    to: &'static str,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(u64, Vec<String>)> {
    tokio::spawn(async move {
        let (mut ok, mut failures) = (0, Vec::new());
        let uri = format!("http://{to}/headers");
        while !stop.load(Ordering::SeqCst) {
            match client::get_uri(outbound, &uri).await {
                Ok(reply) if reply.status == 200 => ok += 1,
                Ok(reply) => failures.push(format!("{} {}", reply.status, reply.text())),
                Err(err) => failures.push(err.to_string()),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (ok, failures)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_through_one_replica_survives_its_leader_and_reaches_every_sidecar() {
    let etcd = EtcdCluster::start(1).await;
    let dir = TempDir::new();
    let prefix = "/rotation";
    // Replica 1 starts first and campaigns first: it leads.
    let mut cps = vec![replica(&dir, &etcd, prefix, 1).await];
    wait::until("replica 1 leads", Duration::from_secs(20), || async {
        (leader_seen_by(&cps[0]).await.as_deref() == Some("replica-1")).then_some(())
    })
    .await;
    cps.push(replica(&dir, &etcd, prefix, 2).await);
    cps.push(replica(&dir, &etcd, prefix, 3).await);
    for cp in &cps {
        assert_eq!(leader_seen_by(cp).await.as_deref(), Some("replica-1"));
    }
    assert_eq!(leader_metric(&cps[0]).await, Some(1));
    assert_eq!(leader_metric(&cps[1]).await, Some(0));
    assert_eq!(leader_metric(&cps[2]).await, Some(0));

    // b watches replica 2, a watches replica 3; a calls b.
    let app_b = Upstream::start("b").await;
    let b = SidecarProcess::builder("b", app_b.port())
        .control_plane(&cps[1])
        .start()
        .await;
    let app_a = Upstream::start("a").await;
    let a = SidecarProcess::builder("a", app_a.port())
        .control_plane(&cps[2])
        .start()
        .await;
    mtls::wait_mtls(a.outbound, "b", "a").await;
    let old = fingerprints(&cps[0]).await;
    assert_eq!(old.len(), 1, "one root before the rotation");
    let stop = Arc::new(AtomicBool::new(false));
    let load = traffic(a.outbound, "b", stop.clone());

    // Rotate through replica 1; a second rotation through replica 2 is refused.
    let rotated_at = std::time::Instant::now();
    let rotated = meshctl(&cps[0], &["ca", "rotate"]).await;
    assert!(rotated.success(), "{rotated:?}");
    let again = meshctl(&cps[1], &["ca", "rotate"]).await;
    assert!(!again.success(), "a second rotation meanwhile: {again:?}");
    assert!(again.stderr.contains("in progress"), "{again:?}");
    let both = wait::until(
        "replica 1 shows both roots",
        Duration::from_secs(10),
        || async {
            let roots = fingerprints(&cps[0]).await;
            (roots.len() == 2).then_some(roots)
        },
    )
    .await;
    assert_eq!(both[0], old[0], "the old root still signs in phase 1");
    let new = both[1].clone();
    for cp in &cps {
        wait::until(
            "every replica's CA status and trust bundle hold both roots",
            Duration::from_secs(10),
            || async {
                let bundle = bundle_of(cp).await;
                (fingerprints(cp).await == both && certificates_in(&bundle) == 2).then_some(())
            },
        )
        .await;
    }

    eprintln!(
        "every replica had both roots {:?} after the rotate",
        rotated_at.elapsed()
    );
    // SIGKILL the leader during the grace: another replica takes over.
    cps[0].kill9().await;
    let killed_at = std::time::Instant::now();
    let status = cps[1].get_json("/api/v1/ca").await;
    assert!(
        status["rotation"]
            .as_str()
            .unwrap_or("")
            .contains("phase 1"),
        "the leader died during the grace: {status}"
    );
    let survivors = &cps[1..];
    let successor = wait::until("another replica leads", Duration::from_secs(30), || async {
        let seen = leader_seen_by(&survivors[0]).await?;
        (seen != "replica-1").then_some(seen)
    })
    .await;
    eprintln!(
        "{successor} leads {:?} after the SIGKILL",
        killed_at.elapsed()
    );
    assert_eq!(
        leader_seen_by(&survivors[1]).await.as_deref(),
        Some(successor.as_str())
    );
    let mut metrics = Vec::new();
    for cp in survivors {
        metrics.push(leader_metric(cp).await);
    }
    assert_eq!(
        metrics.iter().filter(|m| **m == Some(1)).count(),
        1,
        "one leader among the survivors: {metrics:?}"
    );

    // The successor switches after the grace; every survivor follows.
    for cp in survivors {
        wait::until(
            "the new root signs on every replica",
            Duration::from_secs(60),
            || async { (fingerprints(cp).await.first() == Some(&new)).then_some(()) },
        )
        .await;
    }
    eprintln!("switched {:?} after the rotate", rotated_at.elapsed());
    let bundle = bundle_of(&survivors[0]).await;
    let only_new = mtls::root_with_fingerprint(&bundle, &new).expect("the bundle has the new root");
    let probe = TestCa::load(&survivors[0].data_dir).workload("probe", Duration::from_secs(3600));
    for (name, sidecar) in [("a", &a), ("b", &b)] {
        wait::until(
            &format!("{name} presents a leaf from the new root"),
            Duration::from_secs(30),
            || async {
                let (seen, _) =
                    mtls::handshake(sidecar.inbound, only_new.clone(), Some(&probe), &["h2"]).await;
                (seen?.chain == Ok(())).then_some(())
            },
        )
        .await;
    }
    mtls::wait_mtls(a.outbound, "b", "a").await;
    stop.store(true, Ordering::SeqCst);
    let (ok, failures) = load.await.unwrap();
    eprintln!("traffic a → b: {ok} ok, {} failed", failures.len());
    assert!(ok > 100, "traffic ran: {ok}");
    assert!(
        failures.is_empty(),
        "{} of {} failed: {:?}",
        failures.len(),
        ok + failures.len() as u64,
        &failures[..failures.len().min(5)]
    );
}
