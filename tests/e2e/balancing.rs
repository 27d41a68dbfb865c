//! Load balancing over the endpoints of one service, and what happens when
//! one of them dies (issue 2, point 2).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use meshlet_e2e::inprocess::Sidecar;
use meshlet_e2e::{client, wait, Upstream};

async fn three_endpoints() -> (Vec<Upstream>, Sidecar) {
    let endpoints = vec![
        Upstream::start("e1").await,
        Upstream::start("e2").await,
        Upstream::start("e3").await,
    ];
    let addresses: String = endpoints
        .iter()
        .map(|e| format!("    - address: {}\n", e.addr))
        .collect();
    let config = format!(
        "apiVersion: meshlet.dev/v1alpha1\nkind: Service\nmetadata: {{name: orders}}\nspec:\n  endpoints:\n{addresses}"
    );
    let app = Upstream::start("frontend").await;
    let sidecar = Sidecar::builder("frontend", app.port())
        .config(&config)
        .start()
        .await;
    std::mem::forget(app); // keeps the frontend app's listener for the test's lifetime
    (endpoints, sidecar)
}

async fn call(sidecar: &Sidecar, path: &str) -> Option<String> {
    let uri = format!("http://orders{path}");
    let reply = client::send(
        sidecar.outbound,
        Request::get(uri).body(Full::new(Bytes::new())).unwrap(),
    )
    .await;
    match reply {
        Ok(reply) if reply.status == 200 => reply
            .header("x-upstream")
            .map(str::to_owned)
            .or(Some(String::new())),
        _ => None,
    }
}

/// [`call`], or why it failed: the status and `x-meshlet-reason`, or the
/// client's error.
async fn call_or_why(sidecar: &Sidecar, path: &str) -> Result<(), String> {
    let uri = format!("http://orders{path}");
    let request = Request::get(uri).body(Full::new(Bytes::new())).unwrap();
    match client::send(sidecar.outbound, request).await {
        Ok(reply) if reply.status == 200 => Ok(()),
        Ok(reply) => Err(format!(
            "{} {}",
            reply.status,
            reply.header("x-meshlet-reason").unwrap_or("-")
        )),
        Err(error) => Err(error.to_string()),
    }
}

#[tokio::test]
async fn requests_spread_over_all_three_endpoints() {
    let (endpoints, sidecar) = three_endpoints().await;
    for _ in 0..90 {
        assert!(call(&sidecar, "/").await.is_some());
    }
    let counts: Vec<usize> = endpoints.iter().map(Upstream::requests).collect();
    assert_eq!(counts.iter().sum::<usize>(), 90);
    // Uniform would be 30 each; P2C with equal load is a fair coin per pair.
    assert!(counts.iter().all(|&c| c >= 10), "uneven spread: {counts:?}");
}

#[tokio::test]
async fn a_slow_endpoint_gets_less_traffic() {
    let (endpoints, sidecar) = three_endpoints().await;
    // e1 struggles: every answer takes 200 ms, the others answer at once.
    // Round robin would still send it a third of the requests; least-loaded
    // P2C sees its outstanding requests pile up and steers away.
    endpoints[0].set_delay(Duration::from_millis(200));
    let sidecar = Arc::new(sidecar);
    let mut workers = Vec::new();
    for _ in 0..6 {
        let sidecar = Arc::clone(&sidecar);
        workers.push(tokio::spawn(async move {
            for _ in 0..30 {
                assert!(call(&sidecar, "/").await.is_some());
            }
        }));
    }
    for worker in workers {
        worker.await.unwrap();
    }
    let counts: Vec<usize> = endpoints.iter().map(Upstream::requests).collect();
    assert_eq!(counts.iter().sum::<usize>(), 180);
    // Round robin would give it 60 (a third); allow up to 20% before
    // calling it not steered, and it must trail both healthy endpoints.
    assert!(
        counts[0] * 5 < 180 && counts[0] < counts[1].min(counts[2]),
        "slow endpoint got {} of 180 requests: {counts:?}",
        counts[0]
    );
}

#[tokio::test]
async fn killed_endpoint_costs_at_most_the_in_flight_requests() {
    let (endpoints, sidecar) = three_endpoints().await;
    let sidecar = Arc::new(sidecar);
    let ok = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
    const WORKERS: usize = 4;
    const PER_WORKER: usize = 100;
    let mut workers = Vec::new();
    for _ in 0..WORKERS {
        let (sidecar, ok, failures) =
            (Arc::clone(&sidecar), Arc::clone(&ok), Arc::clone(&failures));
        workers.push(tokio::spawn(async move {
            for _ in 0..PER_WORKER {
                match call_or_why(&sidecar, "/slow?ms=2").await {
                    Ok(()) => {
                        ok.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(why) => failures.lock().unwrap().push(why),
                }
            }
        }));
    }
    wait::until("traffic flowing", Duration::from_secs(10), || async {
        (ok.load(Ordering::SeqCst) >= 100).then_some(())
    })
    .await;
    endpoints[1].kill();
    let killed_at = endpoints[1].requests();
    for worker in workers {
        worker.await.unwrap();
    }
    let failures = failures.lock().unwrap().clone();
    let failed = failures.len();
    // A refused connection always goes to another endpoint: no request
    // fails for it. What may fail was sent: the requests in flight at the
    // kill, and a few written to a connection the kill closed before the
    // sidecar saw it close (sent, so not retried without a policy).
    assert!(
        !failures
            .iter()
            .any(|why| why.contains("upstream_connect_failed")),
        "a refused connection failed a request: {failures:?}"
    );
    assert!(
        failed <= 2 * WORKERS,
        "{failed} requests failed ({failures:?}); at most about the {WORKERS} in flight may"
    );
    assert_eq!(ok.load(Ordering::SeqCst) + failed, WORKERS * PER_WORKER);
    assert_eq!(
        endpoints[1].requests(),
        killed_at,
        "no request reached the killed endpoint afterwards"
    );
    let dump = client::get(sidecar.admin, "/config_dump")
        .await
        .unwrap()
        .text();
    assert!(
        dump.contains("\"ejected\": true"),
        "killed endpoint is ejected: {dump}"
    );
}
