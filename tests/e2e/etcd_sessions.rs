//! Dashboard log-in sessions shared by every control-plane replica
//! (issue 18): three `control-plane --store etcd` processes on one real
//! etcd member, the dashboard's own log-in (`POST /api/v1/session`).
//!
//! - a session started through replica 1 reads the dashboard through
//!   replicas 2 and 3; its log-out through replica 3 ends it on 1 and 2
//!   at once (its key under `P/sessions/` is gone);
//! - a forged or garbled cookie gets 401 and costs no etcd read
//!   (`meshlet_sessions_rejected_total{reason="mac"}` counts it,
//!   `meshlet_session_lookups_total` does not move; a genuine cookie
//!   does move it, so the counter is live);
//! - a session outlives the replica that started it (SIGKILL);
//! - with etcd down, a cookie request and a log-in get 503
//!   `store_unavailable`, and the session works again once etcd is back;
//! - the 1025th session of the mesh ends the oldest (started on another
//!   replica), and etcd holds 1024.

use std::time::{Duration, Instant};

use http::Method;
use meshlet_api::access::CreateToken;
use meshlet_client::Reply;
use meshlet_e2e::etcd::EtcdCluster;
use meshlet_e2e::metrics::Scrape;
use meshlet_e2e::{wait, ControlPlaneProcess, TempDir};

const PREFIX: &str = "/sessions-e2e";
const DASHBOARD: &str = "/api/v1/dashboard/services";

/// Three replicas on `etcd`, one after the other.
async fn replicas(dir: &TempDir, etcd: &EtcdCluster) -> Vec<ControlPlaneProcess> {
    let endpoints = etcd.endpoints();
    let mut out = Vec::new();
    for i in 1..=3 {
        let id = format!("replica-{i}");
        let args = [
            "--store",
            "etcd",
            "--etcd-endpoints",
            &endpoints,
            "--etcd-prefix",
            PREFIX,
            "--replica-id",
            &id,
        ];
        out.push(ControlPlaneProcess::start(&dir.path.join(&id), &args).await);
    }
    out
}

/// The dashboard's log-in through `cp`: the reply (204 and a cookie, or
/// a refusal).
async fn log_in(cp: &ControlPlaneProcess, token: &str) -> Reply {
    let body = serde_json::json!({ "token": token });
    cp.call(
        &cp.anonymous_client(),
        Method::POST,
        "/api/v1/session",
        Some(&body),
    )
    .await
}

/// The `name=value` pair of a log-in's `Set-Cookie`.
fn cookie_of(reply: &Reply) -> String {
    assert_eq!(reply.status, 204, "log-in: {}", reply.text());
    let set_cookie = reply.header("set-cookie").expect("a session cookie");
    set_cookie.split(';').next().unwrap().to_owned()
}

/// `method path` through `cp` with only `cookie` as credential.
async fn with_cookie(cp: &ControlPlaneProcess, method: Method, path: &str, cookie: &str) -> Reply {
    let request = meshlet_client::request(method, &cp.authority(), path)
        .header("cookie", cookie)
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    cp.anonymous_client()
        .fetch(&cp.authority(), request)
        .await
        .expect("the replica answers")
}

/// `cp`'s session counters: (refused for their MAC, store reads).
async fn session_counts(cp: &ControlPlaneProcess) -> (f64, f64) {
    let reply = cp.get("/metrics").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let scrape = Scrape::parse(&reply.text());
    (
        scrape.sum("meshlet_sessions_rejected_total", &[("reason", "mac")]),
        scrape.sum("meshlet_session_lookups_total", &[]),
    )
}

/// Figures, not assertions (a shared machine): the median of 20 dashboard
/// reads with the cookie (one etcd get each) and with the bearer token.
async fn report_latency(cp: &ControlPlaneProcess, cookie: &str, token: &str) {
    fn median_ms(mut samples: Vec<Duration>) -> f64 {
        samples.sort();
        samples[samples.len() / 2].as_secs_f64() * 1000.0
    }
    let (mut by_cookie, mut by_token) = (Vec::new(), Vec::new());
    let client = cp.client_with(token);
    for _ in 0..20 {
        let started = Instant::now();
        assert_eq!(
            with_cookie(cp, Method::GET, DASHBOARD, cookie).await.status,
            200
        );
        by_cookie.push(started.elapsed());
        let started = Instant::now();
        assert_eq!(
            cp.call(&client, Method::GET, DASHBOARD, None).await.status,
            200
        );
        by_token.push(started.elapsed());
    }
    eprintln!(
        "dashboard read, median of 20 (new TLS connection each): cookie {:.2} ms, bearer {:.2} ms",
        median_ms(by_cookie),
        median_ms(by_token)
    );
}

async fn sessions_in_etcd(etcd: &EtcdCluster) -> Option<u64> {
    etcd.count_prefix(&format!("{PREFIX}/sessions/")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_started_on_one_replica_is_honoured_and_ended_on_every_replica() {
    let mut etcd = EtcdCluster::start(1).await;
    let dir = TempDir::new();
    let mut cps = replicas(&dir, &etcd).await;

    // A viewer token, made through replica 1; every replica learns it
    // (the token table replicates through etcd).
    let viewer = cps[0]
        .create_token(&CreateToken {
            name: "alice".into(),
            role: "viewer".into(),
            namespace: None,
            service: None,
            ttl_seconds: None,
        })
        .await;
    for cp in &cps {
        wait::until(
            "every replica knows the viewer token",
            Duration::from_secs(15),
            || async {
                let client = cp.client_with(&viewer);
                let reply = cp.call(&client, Method::GET, DASHBOARD, None).await;
                (reply.status == 200).then_some(())
            },
        )
        .await;
    }

    // Log in through replica 1, read through 2 and 3.
    let cookie = cookie_of(&log_in(&cps[0], &viewer).await);
    assert_eq!(sessions_in_etcd(&etcd).await, Some(1));
    for (i, cp) in cps.iter().enumerate() {
        let reply = with_cookie(cp, Method::GET, DASHBOARD, &cookie).await;
        assert_eq!(reply.status, 200, "replica {}: {}", i + 1, reply.text());
    }

    // Forged and garbled cookies: 401 on replica 2 with no etcd read.
    let (mac_before, reads_before) = session_counts(&cps[1]).await;
    let (id, tag) = cookie.rsplit_once('.').expect("ID.TAG");
    let last = tag.chars().last().unwrap();
    let flipped = if last == '0' { '1' } else { '0' };
    let forged = format!("{id}.{}{flipped}", &tag[..tag.len() - 1]);
    let unsigned = id.to_owned();
    let random = "meshlet_session=mlt_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA.00".to_owned();
    for bad in [&forged, &unsigned, &random] {
        let reply = with_cookie(&cps[1], Method::GET, DASHBOARD, bad).await;
        assert_eq!(reply.status, 401, "{bad}: {}", reply.text());
        assert_eq!(reply.header("x-meshlet-reason"), Some("unauthenticated"));
    }
    let (mac_after, reads_after) = session_counts(&cps[1]).await;
    assert_eq!(mac_after - mac_before, 3.0, "three MAC refusals");
    assert_eq!(
        reads_after, reads_before,
        "a forged cookie costs no etcd read"
    );
    // The counter is live: a genuine cookie is one read.
    assert_eq!(
        with_cookie(&cps[1], Method::GET, DASHBOARD, &cookie)
            .await
            .status,
        200
    );
    assert_eq!(session_counts(&cps[1]).await.1, reads_before + 1.0);
    report_latency(&cps[1], &cookie, &viewer).await;

    // Log-out through replica 3 ends it on 1 and 2 at once.
    let reply = with_cookie(&cps[2], Method::DELETE, "/api/v1/session", &cookie).await;
    assert_eq!(reply.status, 204, "log-out: {}", reply.text());
    assert!(reply
        .header("set-cookie")
        .is_some_and(|c| c.contains("Max-Age=0")));
    assert_eq!(sessions_in_etcd(&etcd).await, Some(0));
    for cp in &cps[..2] {
        let reply = with_cookie(cp, Method::GET, DASHBOARD, &cookie).await;
        assert_eq!(reply.status, 401, "after log-out: {}", reply.text());
    }

    // A session outlives the replica that started it.
    let cookie = cookie_of(&log_in(&cps[0], &viewer).await);
    cps[0].kill9().await;
    for cp in &cps[1..] {
        let reply = with_cookie(cp, Method::GET, DASHBOARD, &cookie).await;
        assert_eq!(reply.status, 200, "replica 1 is gone: {}", reply.text());
    }

    // etcd down: a clear 503, never a log-out; back, the session works.
    etcd.kill(0).await;
    let reply = with_cookie(&cps[1], Method::GET, DASHBOARD, &cookie).await;
    assert_eq!(reply.status, 503, "etcd down: {}", reply.text());
    assert_eq!(reply.header("x-meshlet-reason"), Some("store_unavailable"));
    assert!(reply.text().contains("etcd"), "{}", reply.text());
    let reply = log_in(&cps[2], &viewer).await;
    assert_eq!(reply.status, 503, "log-in with etcd down: {}", reply.text());
    etcd.restart(0).await;
    etcd.wait_member_healthy(0).await;
    wait::until(
        "the session works again once etcd is back",
        Duration::from_secs(30),
        || async {
            let reply = with_cookie(&cps[1], Method::GET, DASHBOARD, &cookie).await;
            (reply.status == 200).then_some(())
        },
    )
    .await;
}

/// The mesh-wide bound: the log-in that makes 1025 sessions revokes the
/// oldest one's lease (etcd deletes its key), whichever replica started it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_in_beyond_the_cap_ends_the_oldest_session_of_the_mesh() {
    const CAP: u64 = 1024;
    let etcd = EtcdCluster::start(1).await;
    let dir = TempDir::new();
    let cps = replicas(&dir, &etcd).await;
    let admin = cps[0].admin_token();
    let oldest = cookie_of(&log_in(&cps[0], &admin).await);
    let second = cookie_of(&log_in(&cps[1], &admin).await);
    for i in 2..CAP {
        let reply = log_in(&cps[(i % 3) as usize], &admin).await;
        assert_eq!(reply.status, 204, "log-in {i}: {}", reply.text());
    }
    assert_eq!(sessions_in_etcd(&etcd).await, Some(CAP));
    assert_eq!(
        with_cookie(&cps[2], Method::GET, DASHBOARD, &oldest)
            .await
            .status,
        200
    );
    let newest = cookie_of(&log_in(&cps[2], &admin).await);
    assert_eq!(sessions_in_etcd(&etcd).await, Some(CAP));
    for (cookie, status) in [(&oldest, 401), (&second, 200), (&newest, 200)] {
        let reply = with_cookie(&cps[1], Method::GET, DASHBOARD, cookie).await;
        assert_eq!(reply.status, status, "{}", reply.text());
    }
}
