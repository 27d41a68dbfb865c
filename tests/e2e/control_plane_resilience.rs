//! A control plane that never empties the mesh by itself, and applies that
//! stay whole through crashes (issue 16, items 3, 4 and 8):
//!
//! - starvation: a control plane under `ulimit -n 1024` (hard limit too,
//!   so it cannot raise it) with `--ttl 5s`, two sidecars with their apps,
//!   then 1100 idle TCP connections held for more than two TTLs: no
//!   instance expires, requests between the sidecars keep succeeding, and
//!   `meshctl get services` answers;
//! - a change whose connection closes after it was sent: meshctl says the
//!   request was sent and to check `meshctl history`, never "cannot
//!   reach";
//! - kill during apply: 50 times, `meshctl apply -f` of a five-document
//!   file and a SIGKILL of the control plane at a random moment around it,
//!   a restart on the same data directory, and then: the store opens,
//!   the resources are all of one apply or all of the one before, an
//!   apply meshctl reported done is there, and history is gapless with
//!   every apply revision whole.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshlet_e2e::{
    client, meshctl, meshctl_with, wait, ControlPlaneProcess, SidecarProcess, TempDir, Upstream,
};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// The contract's message after a dropped change.
const CLOSED_BEFORE_ANSWER: &str = "the request was sent; the control plane closed the connection before answering; check `meshctl history`";

/// A scrape's value of an unlabelled metric.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// The registered instance ids of `services`, sorted.
/// A control plane under `ulimit -n 1024` with `--ttl 5s`, and two
/// services (`orders`, `frontend`), each an app with its sidecar.
async fn two_services_under_1024_fds() -> (
    TempDir,
    ControlPlaneProcess,
    Upstream,
    SidecarProcess,
    Upstream,
    SidecarProcess,
) {
    let dir = TempDir::new();
    let cp = ControlPlaneProcess::start_with_open_file_limit(
        &dir.path.join("cp"),
        &["--ttl", "5s"],
        1024,
    )
    .await;
    let orders_app = Upstream::start("orders").await;
    let orders = SidecarProcess::builder("orders", orders_app.port())
        .control_plane(&cp)
        .start()
        .await;
    let frontend_app = Upstream::start("frontend").await;
    let frontend = SidecarProcess::builder("frontend", frontend_app.port())
        .control_plane(&cp)
        .start()
        .await;
    (dir, cp, orders_app, orders, frontend_app, frontend)
}

async fn instance_ids(cp: &ControlPlaneProcess, services: &[&str]) -> Vec<String> {
    let mut ids = Vec::new();
    for name in services {
        let reply = cp.get(&format!("/api/v1/services/default/{name}")).await;
        if reply.status == 404 {
            continue;
        }
        let detail: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
        for instance in detail["instances"].as_array().into_iter().flatten() {
            ids.push(instance["id"].as_str().unwrap().to_owned());
        }
    }
    ids.sort();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_starved_control_plane_keeps_every_instance_and_traffic_flows() {
    const FLOOD: usize = 1100;
    const TTL: Duration = Duration::from_secs(5);
    let own = meshlet_e2e::process::raise_open_file_limit();
    assert!(
        own >= FLOOD as u64 + 512,
        "this test needs an open-file hard limit above {} (have {own})",
        FLOOD + 512
    );
    let (_dir, cp, _orders_app, orders, _frontend_app, frontend) =
        two_services_under_1024_fds().await;
    wait::until(
        "frontend routes to orders",
        Duration::from_secs(20),
        || async { (!frontend.endpoints_of("orders").await.is_empty()).then_some(()) },
    )
    .await;
    let before = wait::until(
        "both instances registered",
        Duration::from_secs(20),
        || async {
            let ids = instance_ids(&cp, &["orders", "frontend"]).await;
            (ids.len() == 2).then_some(ids)
        },
    )
    .await;
    // The limit is real: the control plane could not raise it.
    assert!(
        cp.log_text().contains("API connection cap lowered") && cp.log_text().contains("1024"),
        "{}",
        cp.log_text()
    );
    let history_before = cp.get_json("/api/v1/revisions?limit=1000").await;
    let latest_before = history_before[0]["revision"].as_u64().unwrap();

    // The flood: 1100 silent TCP connections, held (the control plane may
    // close them; each is counted when it does).
    let stop = Arc::new(AtomicBool::new(false));
    let connected = Arc::new(AtomicUsize::new(0));
    let closed_by_server = Arc::new(AtomicUsize::new(0));
    let mut holders = Vec::new();
    let flood_started = Instant::now();
    for _ in 0..FLOOD {
        let (addr, stop) = (cp.addr, stop.clone());
        let (connected, closed) = (connected.clone(), closed_by_server.clone());
        holders.push(tokio::spawn(async move {
            let connect = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr));
            let Ok(Ok(mut stream)) = connect.await else {
                return;
            };
            connected.fetch_add(1, Ordering::Relaxed);
            let mut buf = [0u8; 64];
            loop {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                match tokio::time::timeout(Duration::from_millis(200), stream.read(&mut buf)).await
                {
                    Err(_) => continue,
                    Ok(Ok(n)) if n > 0 => continue,
                    Ok(_) => {
                        closed.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                }
            }
        }));
    }

    // Traffic between the sidecars and meshctl while the flood is held
    // for more than two TTLs.
    let hold = 2 * TTL + Duration::from_secs(2);
    let (mut ok, mut failed) = (0usize, 0usize);
    let mut failures = Vec::new();
    let mut meshctl_answers = Vec::new();
    let mut next_meshctl = Instant::now() + Duration::from_secs(1);
    while flood_started.elapsed() < hold {
        match client::get_uri(frontend.outbound, "http://orders/").await {
            Ok(reply) if reply.status == 200 => ok += 1,
            Ok(reply) => {
                failed += 1;
                failures.push(format!("{} {}", reply.status, reply.text()));
            }
            Err(error) => {
                failed += 1;
                failures.push(error.to_string());
            }
        }
        if Instant::now() >= next_meshctl {
            let started = Instant::now();
            let out = meshctl(&cp, &["get", "services"]).await;
            let took = started.elapsed();
            assert!(
                out.success(),
                "meshctl get services during the flood: {out:?}"
            );
            assert!(out.stdout.contains("orders"), "{out:?}");
            meshctl_answers.push(took);
            next_meshctl = Instant::now() + Duration::from_secs(3);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let metrics_during = cp.get("/metrics").await.text();
    stop.store(true, Ordering::Relaxed);
    for holder in holders {
        let _ = holder.await;
    }

    let after = instance_ids(&cp, &["orders", "frontend"]).await;
    let history = cp.get_json("/api/v1/revisions?limit=1000").await;
    let expired: Vec<&serde_json::Value> = history
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["revision"].as_u64().unwrap() > latest_before)
        .flat_map(|r| r["changes"].as_array().unwrap())
        .filter(|c| c.as_str().unwrap_or("").starts_with("expired"))
        .collect();
    let evicted = metric(
        &metrics_during,
        "meshlet_control_plane_api_connections_evicted_total",
    )
    .unwrap_or(-1.0);
    let open = metric(&metrics_during, "meshlet_control_plane_api_connections").unwrap_or(-1.0);
    let paused = metric(&metrics_during, "meshlet_control_plane_expiry_paused").unwrap_or(-1.0);
    eprintln!(
        "starvation: {} of {FLOOD} flood connections made, {} closed by the control plane; \
         {ok} requests ok, {failed} failed; meshctl get services answered in {meshctl_answers:?}; \
         API connections open {open}, evicted {evicted}, expiry paused {paused}; \
         instances {before:?} → {after:?}; expired lines {expired:?}",
        connected.load(Ordering::Relaxed),
        closed_by_server.load(Ordering::Relaxed),
    );
    assert!(
        connected.load(Ordering::Relaxed) >= FLOOD - 10,
        "the flood did not connect"
    );
    assert_eq!(after, before, "no instance expired");
    assert!(expired.is_empty(), "expiry in history: {expired:?}");
    assert_eq!(failed, 0, "requests failed during the flood: {failures:?}");
    assert!(ok >= 50, "too few requests made: {ok}");
    assert!(meshctl_answers.len() >= 2, "{meshctl_answers:?}");
    assert!(
        evicted > 0.0,
        "the flood was never evicted: {metrics_during}"
    );
    assert!(
        cp.log_text().lines().all(|l| !l.contains("panicked")),
        "{}",
        cp.log_text()
    );
    drop((orders, frontend));
}

/// One TLS connection to the API that asks `GET /healthz` every 3 s and
/// is idle in between; `Ok(())` once proven, then it runs until `stop` or
/// until the control plane closes it (counted in `closed`).
async fn proven_idle_connection(
    addr: std::net::SocketAddr,
    tls: tokio_rustls::TlsConnector,
    stop: Arc<AtomicBool>,
    proven: tokio::sync::oneshot::Sender<bool>,
    closed: Arc<AtomicUsize>,
) {
    use tokio::io::AsyncWriteExt;
    let request = format!("GET /healthz HTTP/1.1\r\nhost: {addr}\r\n\r\n");
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let connect = async {
        let tcp = TcpStream::connect(addr).await.ok()?;
        tls.connect(name, tcp).await.ok()
    };
    let Ok(Some(mut stream)) = tokio::time::timeout(Duration::from_secs(10), connect).await else {
        let _ = proven.send(false);
        return;
    };
    let mut buf = [0u8; 1024];
    let mut proven = Some(proven);
    loop {
        if stream.write_all(request.as_bytes()).await.is_err() {
            break;
        }
        match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => break,
        }
        if let Some(tell) = proven.take() {
            let _ = tell.send(true);
        }
        let idle_until = Instant::now() + Duration::from_secs(3);
        while Instant::now() < idle_until {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            match tokio::time::timeout(Duration::from_millis(200), stream.read(&mut buf)).await {
                Err(_) => {}
                Ok(Ok(n)) if n > 0 => {}
                Ok(_) => {
                    closed.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
        }
    }
    if let Some(tell) = proven.take() {
        let _ = tell.send(false);
    }
    closed.fetch_add(1, Ordering::Relaxed);
}

/// Past the descriptor limit with connections that did send requests and
/// keep coming back (proven, idle in between): without the cap fitted to
/// the open-file limit and the eviction of idle connections, accept would
/// fail with `EMFILE` and heartbeats would wait in the backlog until the
/// instances expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proven_idle_connections_past_the_fd_limit_do_not_lock_heartbeats_out() {
    const FLOOD: usize = 1100;
    const TTL: Duration = Duration::from_secs(5);
    let own = meshlet_e2e::process::raise_open_file_limit();
    assert!(own >= FLOOD as u64 + 512, "open-file limit {own} too low");
    let (_dir, cp, _orders_app, orders, _frontend_app, frontend) =
        two_services_under_1024_fds().await;
    let before = wait::until(
        "both instances registered",
        Duration::from_secs(20),
        || async {
            let ids = instance_ids(&cp, &["orders", "frontend"]).await;
            (ids.len() == 2).then_some(ids)
        },
    )
    .await;
    wait::until(
        "frontend routes to orders",
        Duration::from_secs(20),
        || async { (!frontend.endpoints_of("orders").await.is_empty()).then_some(()) },
    )
    .await;
    let tls = tokio_rustls::TlsConnector::from(
        meshlet_client::client_config_from_ca_file(&cp.ca_file()).unwrap(),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let closed = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    // Opened in batches of 50 (each proven before the next), so they are
    // proven rather than evicted as unproven during their handshakes.
    let mut holders = Vec::new();
    let mut proven = 0usize;
    let mut peak_open = 0.0f64;
    for _ in 0..FLOOD / 50 {
        let mut batch = Vec::new();
        for _ in 0..50 {
            let (tell, told) = tokio::sync::oneshot::channel();
            holders.push(tokio::spawn(proven_idle_connection(
                cp.addr,
                tls.clone(),
                stop.clone(),
                tell,
                closed.clone(),
            )));
            batch.push(told);
        }
        for told in batch {
            if told.await == Ok(true) {
                proven += 1;
            }
        }
        let scrape = cp.get("/metrics").await.text();
        let open = metric(&scrape, "meshlet_control_plane_api_connections").unwrap_or(0.0);
        peak_open = peak_open.max(open);
    }
    let flooded_in = started.elapsed();
    // Traffic and meshctl while the connections come back every 3 s, for
    // two TTLs.
    let (mut ok, mut failed) = (0usize, 0usize);
    let mut meshctl_answers = Vec::new();
    let until = Instant::now() + 2 * TTL;
    let mut next_meshctl = Instant::now();
    while Instant::now() < until {
        match client::get_uri(frontend.outbound, "http://orders/").await {
            Ok(reply) if reply.status == 200 => ok += 1,
            _ => failed += 1,
        }
        if Instant::now() >= next_meshctl {
            let t = Instant::now();
            let out = meshctl(&cp, &["get", "services"]).await;
            assert!(out.success(), "meshctl get services: {out:?}");
            meshctl_answers.push(t.elapsed());
            next_meshctl = Instant::now() + Duration::from_secs(3);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let scrape = cp.get("/metrics").await.text();
    stop.store(true, Ordering::Relaxed);
    for holder in holders {
        let _ = holder.await;
    }
    let after = instance_ids(&cp, &["orders", "frontend"]).await;
    let evicted = metric(
        &scrape,
        "meshlet_control_plane_api_connections_evicted_total",
    )
    .unwrap_or(-1.0);
    eprintln!(
        "proven idle flood: {proven} of {FLOOD} proven in {flooded_in:?} (peak {peak_open} API \
         connections open), {} closed by the control plane; {ok} requests ok, {failed} failed; \
         meshctl get services answered in {meshctl_answers:?}; evicted {evicted}; \
         instances {before:?} → {after:?}",
        closed.load(Ordering::Relaxed)
    );
    assert_eq!(after, before, "no instance expired");
    assert_eq!(failed, 0);
    assert!(proven > 960, "the flood never reached the cap: {proven}");
    assert!(evicted > 0.0, "nothing evicted");
    assert!(
        peak_open <= 1024.0 - 64.0 + 50.0,
        "the cap held: {peak_open}"
    );
    drop((orders, frontend));
}

/// A mesh CA (PEM) and a TLS acceptor with its certificate for 127.0.0.1.
fn tls_server() -> (String, tokio_rustls::TlsAcceptor) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(cert.der().to_vec())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .unwrap();
    (ca.pem(), tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// A TLS server that reads each request whole (head and
/// `content-length` body) and closes without answering; counts them.
async fn read_and_close() -> (std::net::SocketAddr, String, Arc<AtomicUsize>) {
    let (ca, acceptor) = tls_server();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let requests = Arc::new(AtomicUsize::new(0));
    let count = requests.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let (acceptor, count) = (acceptor.clone(), count.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(stream).await else {
                    return;
                };
                let mut seen = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    let Ok(n) = tls.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    seen.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&seen).to_lowercase();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let length: usize = text
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .map_or(0, |v| v.trim().parse().unwrap_or(0));
                        if seen.len() >= end + 4 + length {
                            break;
                        }
                    }
                }
                count.fetch_add(1, Ordering::Relaxed);
                // Close the TCP connection without a TLS close_notify, as
                // a killed process would.
                let (tcp, _) = tls.into_inner();
                drop(tcp);
            });
        }
    });
    (addr, ca, requests)
}

#[tokio::test]
async fn meshctl_says_a_change_was_sent_when_the_connection_drops_before_the_answer() {
    let (addr, ca, requests) = read_and_close().await;
    let dir = TempDir::new();
    let ca_file = dir.path.join("ca.crt");
    std::fs::write(&ca_file, ca).unwrap();
    let file = dir.path.join("policy.yaml");
    std::fs::write(
        &file,
        "apiVersion: meshlet.dev/v1alpha1\nkind: TimeoutPolicy\nmetadata: {name: t}\nspec: {targetRef: {service: orders}, request: 2s}\n",
    )
    .unwrap();
    let env = [
        ("MESHLET_SERVER", format!("https://{addr}")),
        ("MESHLET_TOKEN", "some-token".to_owned()),
        ("MESHLET_CA_FILE", ca_file.display().to_string()),
    ];
    for args in [
        vec!["apply", "-f", file.to_str().unwrap()],
        vec!["delete", "timeoutpolicy", "t"],
        vec!["rollback", "1"],
        vec!["token", "create", "--role", "viewer"],
    ] {
        let out = meshctl_with(&env, &args).await;
        assert_ne!(out.code, Some(0), "{args:?}: {out:?}");
        assert!(
            out.stderr.contains(CLOSED_BEFORE_ANSWER),
            "{args:?}: {:?}",
            out.stderr
        );
        assert!(!out.stderr.contains("cannot reach"), "{:?}", out.stderr);
    }
    assert_eq!(
        requests.load(Ordering::Relaxed),
        4,
        "each request arrived whole"
    );
    // A read has no effect to worry about: it is still "cannot reach".
    let out = meshctl_with(&env, &["get", "services"]).await;
    assert_ne!(out.code, Some(0));
    assert!(out.stderr.contains("cannot reach"), "{:?}", out.stderr);
    drop(dir);
}

/// The five documents of round `round`: every one targets the service
/// `round-N`, so the round each stored resource came from is readable.
fn round_file(round: usize) -> String {
    let kinds = [
        ("TimeoutPolicy", "request: 2s"),
        ("RetryPolicy", "attempts: 2"),
        ("CircuitBreakerPolicy", "consecutiveFailures: 5"),
        ("TracingPolicy", "samplingRatio: 1.0"),
        (
            "RateLimitPolicy",
            "tokenBucket: {capacity: 10, refillPerSecond: 10}",
        ),
    ];
    kinds
        .iter()
        .map(|(kind, spec)| {
            format!(
                "apiVersion: meshlet.dev/v1alpha1\nkind: {kind}\nmetadata: {{name: crash}}\nspec: {{targetRef: {{service: round-{round}}}, {spec}}}\n"
            )
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

/// The round each of the five `crash` resources is from (`None`: absent).
async fn stored_rounds(cp: &ControlPlaneProcess) -> Vec<Option<usize>> {
    let resources = cp.get_json("/api/v1/resources").await;
    let kinds = [
        "TimeoutPolicy",
        "RetryPolicy",
        "CircuitBreakerPolicy",
        "TracingPolicy",
        "RateLimitPolicy",
    ];
    kinds
        .iter()
        .map(|kind| {
            resources.as_array().unwrap().iter().find_map(|r| {
                if r["kind"] != *kind || r["metadata"]["name"] != "crash" {
                    return None;
                }
                let service = r["spec"]["targetRef"]["service"].as_str()?;
                service.strip_prefix("round-")?.parse().ok()
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applies_stay_whole_when_the_control_plane_is_killed_during_them() {
    const ROUNDS: usize = 50;
    let dir = TempDir::new();
    let mut cp = ControlPlaneProcess::start(&dir.path.join("cp"), &[]).await;
    let file = dir.path.join("five.yaml");
    // Round 0, not killed: how long a whole apply takes on this machine
    // (meshctl's start, TLS, the store's commit), so that the kills land
    // from before meshctl connects to after it is done on a slow one too.
    std::fs::write(&file, round_file(0)).unwrap();
    let apply_started = Instant::now();
    let out = meshctl(&cp, &["apply", "-f", &file.display().to_string()]).await;
    assert!(out.success(), "round 0: {out:?}");
    let kill_window = Duration::from_millis(80).max(apply_started.elapsed() * 3 / 2);
    let mut held = 0usize; // the round whose resources are stored
    let mut committed = 1usize; // rounds that made a revision (round 0 did)
    let (mut applied, mut dropped, mut unreachable) = (0usize, 0usize, 0usize);
    let mut dropped_committed = 0usize; // sent, unanswered, yet committed
    let started = Instant::now();
    for round in 1..=ROUNDS {
        std::fs::write(&file, round_file(round)).unwrap();
        let access = (*cp).clone();
        let path = file.display().to_string();
        let apply =
            tokio::spawn(async move { meshctl(&access, &["apply", "-f", path.as_str()]).await });
        // Somewhere from before meshctl connects to after it is done.
        let kill_after = fastrand::u64(0..=kill_window.as_millis() as u64);
        tokio::time::sleep(Duration::from_millis(kill_after)).await;
        cp.kill9().await;
        let out = apply.await.unwrap();
        cp.restart().await; // the store opens, or this fails
        let rounds = stored_rounds(&cp).await;
        let first = rounds[0];
        assert!(
            rounds.iter().all(|r| *r == first),
            "round {round}: a partial apply is stored: {rounds:?} ({out:?})"
        );
        // Round 0 was stored unkilled: some round always is.
        let now = first.expect("no round stored: an earlier apply was lost");
        assert!(
            now == held || now == round,
            "round {round}: stored round {now}, expected {held} or {round}"
        );
        if out.success() {
            applied += 1;
            assert_eq!(now, round, "round {round}: meshctl said applied: {out:?}");
        } else if out.stderr.contains(CLOSED_BEFORE_ANSWER) {
            dropped += 1;
            if now == round {
                dropped_committed += 1;
            }
        } else {
            // Killed before the request was sent whole: refused, or cut
            // during the TLS handshake. Then it cannot have committed.
            assert!(
                out.stderr.contains("cannot reach")
                    || out.stderr.contains("TLS with the control plane"),
                "round {round}: unexpected meshctl failure: {out:?}"
            );
            assert_eq!(
                now, held,
                "round {round}: a request never sent whole committed: {out:?}"
            );
            unreachable += 1;
        }
        if now != held {
            committed += 1;
        }
        held = now;
    }
    // History: revisions 1..=latest with no gap, each apply revision whole.
    let history = cp.get_json("/api/v1/revisions?limit=1000").await;
    let records = history.as_array().unwrap();
    let revisions: Vec<u64> = records
        .iter()
        .map(|r| r["revision"].as_u64().unwrap())
        .collect();
    let latest = revisions[0];
    let expected: Vec<u64> = (1..=latest).rev().collect();
    assert_eq!(revisions, expected, "history has a gap or disorder");
    let mut apply_revisions = 0;
    for record in records {
        let changes = record["changes"].as_array().unwrap();
        if record["actor"] == "registry" {
            continue;
        }
        apply_revisions += 1;
        assert_eq!(changes.len(), 5, "a partial revision: {record}");
    }
    assert_eq!(
        apply_revisions, committed,
        "every committed round is exactly one revision"
    );
    eprintln!(
        "kill during apply within {kill_window:?} of its start: {ROUNDS} rounds in {:?}: {applied} applied and reported, \
         {dropped} reported as closed before the answer ({dropped_committed} of them \
         committed), {unreachable} not sent whole (refused, or cut in the TLS handshake); \
         {apply_revisions} whole revisions, none partial",
        started.elapsed()
    );
    assert!(
        committed >= 2,
        "no killed round ever committed; the kill window ({kill_window:?}) is too early"
    );
}
