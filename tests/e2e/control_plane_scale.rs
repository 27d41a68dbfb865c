//! The control plane with many watchers (issue 17 goal 6, at a CI-sized
//! scale): 200 simulated sidecars watch a control plane with 300
//! endpoints; a policy apply, a registration and a deregistration each
//! reach every one of them, none is dropped or left behind a gap, and they
//! end on the control plane's revision. Timing is the benchmark's business
//! (`tests/bench/control-plane-scale.sh`), not asserted here.

use std::time::{Duration, Instant};

use meshlet_api::access::CreateToken;
use meshlet_e2e::inprocess::ControlPlane;
use meshlet_e2e::scale::{self, Fleet};
use meshlet_e2e::{ControlPlaneRef, CpAccess, TempDir};

const WATCHERS: usize = 200;
const PATIENCE: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_one_of_200_watchers_gets_every_change() {
    let dir = TempDir::new();
    let cp = ControlPlane::start(&dir.path.join("data"), &["--ttl", "10m"]).await;
    let access: CpAccess = cp.access().clone();
    let admin = access.client();
    let services: Vec<String> = (0..30).map(|s| format!("svc-{s:02}")).collect();
    let mut revision = scale::register_many(&access, &admin, &services, 0..10, 8)
        .await
        .expect("300 registrations");

    let token = access
        .create_token(&CreateToken {
            name: "watchers".into(),
            role: "sidecar".into(),
            namespace: None,
            service: Some("watcher".into()),
            ttl_seconds: None,
        })
        .await;
    let mut fleet = Fleet::new(&access, access.client_with(&token));
    let snapshots = fleet.open(WATCHERS, 16).await.expect("200 watchers open");
    assert_eq!(fleet.len(), WATCHERS);
    assert!(
        snapshots.iter().all(|s| s.revision >= revision),
        "every watcher starts from a snapshot of every registration"
    );
    revision = revision.max(snapshots.iter().map(|s| s.revision).max().unwrap());
    let with_300 = snapshots[0].bytes;

    // A policy apply.
    let sent = Instant::now();
    let applied = scale::apply_policy(&access, &admin, "check", "svc-00", 3)
        .await
        .expect("apply");
    assert!(applied > revision);
    let arrivals = fleet
        .arrivals(applied, sent, PATIENCE)
        .await
        .expect("apply reaches all");
    assert_eq!(arrivals.len(), WATCHERS);

    // A new instance, then its deregistration: deltas on top of deltas.
    let registered = scale::register(&access, &admin, &scale::registration("svc-01", 99, 31_999))
        .await
        .expect("register");
    fleet
        .arrivals(registered, Instant::now(), PATIENCE)
        .await
        .expect("registration reaches all");
    let reply = access
        .call(
            &admin,
            http::Method::DELETE,
            &meshlet_api::mesh::paths::instance("svc-01-99"),
            None,
        )
        .await;
    assert!(reply.status.is_success(), "{}", reply.text());
    let published = access.get_json("/api/v1/revisions?limit=1").await;
    let last = published[0]["revision"].as_u64().expect("a revision");
    assert!(last > registered);
    fleet
        .arrivals(last, Instant::now(), PATIENCE)
        .await
        .expect("deregistration reaches all");
    assert_eq!(
        fleet.revisions().into_iter().collect::<Vec<_>>(),
        [last],
        "every watcher holds the control plane's revision"
    );

    // A watcher that joins now gets the whole state in its snapshot.
    let late = fleet.open(1, 1).await.expect("one more watcher").remove(0);
    assert_eq!(late.revision, last);
    assert!(late.bytes >= with_300, "{} < {with_300} bytes", late.bytes);
}
