//! `meshlet-cp-scale`: the control plane at scale (issue 17 goal 6, issue
//! 18 goal 6), run by `tests/bench/control-plane-scale.sh`.
//!
//! Runs the same measurements against two meshes, one after the other in
//! one run (`--store both`, the default; `redb` or `etcd` for one):
//!
//! - **redb**: one real `control-plane` process on its embedded store (the
//!   default deployment; the baseline);
//! - **etcd**: a real 3-member etcd cluster (Debian's `etcd`, see
//!   `meshlet_e2e::etcd`) and 3 `control-plane --store etcd` replicas; the
//!   watchers are spread evenly over the replicas (watcher `i` watches
//!   replica `i % 3`), changes and registrations go through replica 1, so
//!   two thirds of the watchers get each change one etcd watch hop later.
//!
//! The binaries are found next to this one, or in `$MESHLET_BIN_DIR`. In
//! each mesh three stages, the first being the baseline the others are
//! compared with:
//!
//! ```text
//! A  100 endpoints, 10 watchers      (baseline)
//! B  10 000 endpoints, 10 watchers   (the endpoints registered one by one, over HTTPS)
//! C  10 000 endpoints, 1000 watchers (990 more watch streams opened)
//! H  C + 1000 of the instances heartbeating at the sidecar's default interval
//! ```
//!
//! In each stage: `--rounds` policy applies and `--rounds` new
//! registrations, each timed from sending the request to the arrival of
//! its revision at every watcher (p50/p99/max over all watchers and
//! rounds; the fan-out is the spread from the first watcher to the last);
//! the full snapshot a new watcher is served (request sent → last byte,
//! TLS handshake included); each control plane's RSS and CPU time. Watchers
//! are `meshlet_e2e::scale::Watcher`s: the sidecar's watch protocol, each
//! on its own connection.
//!
//! H: `--heartbeaters` instances each send a heartbeat every
//! `--heartbeat-interval` (default 3.33 s: the sidecar's interval under the
//! default `--ttl 10s`), staggered evenly, each on a fresh HTTPS connection
//! like a sidecar's, instance `i` to replica `i % replicas`. After one
//! interval of warm-up, a `--heartbeat-window` is measured: heartbeat
//! latency, failures, control-plane CPU, and with etcd the deltas of etcd's
//! own counters from each member's `/metrics` (see [`EtcdCounters`]).
//!
//! Prints a markdown fragment (per mesh its stage table, then redb and etcd
//! side by side) and writes it to `--out`.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use meshlet_api::access::CreateToken;
use meshlet_e2e::etcd::EtcdCluster;
use meshlet_e2e::scale::{self, Fleet, ScaleError};
use meshlet_e2e::{wait, ControlPlaneProcess, ControlPlaneRef, CpAccess, TempDir};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum StoreChoice {
    Redb,
    Etcd,
    Both,
}

#[derive(Debug, Parser)]
#[command(name = "meshlet-cp-scale", about = "the control plane at scale")]
struct Args {
    /// Which mesh(es) to measure: redb (one process), etcd (3 replicas on
    /// a 3-member etcd cluster), or both side by side.
    #[arg(long, value_enum, default_value = "both")]
    store: StoreChoice,
    /// Control-plane replicas with etcd.
    #[arg(long, default_value_t = 3)]
    replicas: usize,
    /// etcd members.
    #[arg(long, default_value_t = 3)]
    etcd_members: usize,
    /// Endpoints registered in stages B and C.
    #[arg(long, default_value_t = 10_000)]
    endpoints: usize,
    /// Services the endpoints are spread over.
    #[arg(long, default_value_t = 100)]
    services: usize,
    /// Watchers in stage C.
    #[arg(long, default_value_t = 1000)]
    watchers: usize,
    /// Watchers in stages A and B.
    #[arg(long, default_value_t = 10)]
    baseline_watchers: usize,
    /// Policy applies and registrations timed per stage.
    #[arg(long, default_value_t = 5)]
    rounds: u32,
    /// Registrations in flight while the endpoints are registered.
    #[arg(long, default_value_t = 16)]
    parallel: usize,
    /// Instances heartbeating in stage H (0: skip it).
    #[arg(long, default_value_t = 1000)]
    heartbeaters: usize,
    /// Each instance's heartbeat interval in stage H, in milliseconds
    /// (the sidecar's default: ttl/3 with the default --ttl 10s).
    #[arg(long, default_value_t = 3333)]
    heartbeat_interval_ms: u64,
    /// How long stage H is measured (after one interval of warm-up), seconds.
    #[arg(long, default_value_t = 20)]
    heartbeat_window: u64,
    /// Where the markdown fragment is written.
    #[arg(long, default_value = "target/bench/control-plane-scale.md")]
    out: std::path::PathBuf,
}

/// What one stage measured.
#[derive(Debug, Default)]
struct Stage {
    label: String,
    apply: Vec<Duration>,
    register: Vec<Duration>,
    /// Per change: last arrival − first arrival.
    fan_out: Vec<Duration>,
    snapshot: Duration,
    snapshot_bytes: usize,
    /// Per replica.
    rss: Vec<u64>,
    watchers: usize,
}

/// What happens around the stages.
#[derive(Debug, Default)]
struct Setup {
    /// Per replica, right after start.
    idle_rss: Vec<u64>,
    register_time: Duration,
    register_count: usize,
    /// Summed over the replicas.
    register_cpu: Duration,
    /// etcd's counters over the registrations.
    register_etcd: Option<EtcdDelta>,
    open_time: Duration,
    open_count: usize,
    open_cpu: Duration,
    /// Per replica.
    peak_rss: Vec<u64>,
}

/// Stage H.
#[derive(Debug, Default)]
struct Heartbeats {
    instances: usize,
    interval: Duration,
    window: Duration,
    /// Sent within the window, and of those, not answered 204.
    sent: usize,
    failed: usize,
    /// Sorted.
    latency: Vec<Duration>,
    /// Per replica, over the window.
    cp_cpu: Vec<Duration>,
    etcd: Option<EtcdDelta>,
    /// Per replica, at the end.
    rss: Vec<u64>,
}

/// One mesh's run.
struct StoreRun {
    name: &'static str,
    what: String,
    stages: [Stage; 3],
    setup: Setup,
    heartbeats: Option<Heartbeats>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    // The control plane sits next to this binary unless told otherwise.
    if std::env::var_os("MESHLET_BIN_DIR").is_none() {
        if let Some(dir) = std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(Into::into))
        {
            std::env::set_var::<_, std::path::PathBuf>("MESHLET_BIN_DIR", dir);
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let outcome = runtime.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        // On a signal the run is dropped, and with it the control planes
        // and etcd members (killed on drop) and their temporary data.
        tokio::select! {
            result = run_all(&args) => result.map_err(|e| e.to_string()),
            _ = tokio::signal::ctrl_c() => Err("interrupted".to_owned()),
            _ = term.recv() => Err("terminated".to_owned()),
        }
    });
    runtime.shutdown_timeout(Duration::from_secs(1));
    match outcome {
        Ok(markdown) => {
            print!("{markdown}");
            if let Some(dir) = args.out.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            if let Err(err) = std::fs::write(&args.out, &markdown) {
                eprintln!(
                    "meshlet-cp-scale: error: write {}: {err}",
                    args.out.display()
                );
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("meshlet-cp-scale: error: {err}");
            ExitCode::FAILURE
        }
    }
}

const PATIENCE: Duration = Duration::from_secs(30);

async fn run_all(args: &Args) -> Result<String, ScaleError> {
    let mut runs = Vec::new();
    if matches!(args.store, StoreChoice::Redb | StoreChoice::Both) {
        eprintln!("== redb: one control plane");
        let mesh = Mesh::redb(args).await;
        runs.push(run(args, &mesh, "redb").await?);
    }
    if matches!(args.store, StoreChoice::Etcd | StoreChoice::Both) {
        eprintln!(
            "== etcd: {} members, {} control-plane replicas",
            args.etcd_members, args.replicas
        );
        let mesh = Mesh::etcd(args).await;
        runs.push(run(args, &mesh, "etcd").await?);
    }
    let mut out = String::new();
    for r in &runs {
        out.push_str(&report(args, r));
        out.push('\n');
    }
    if let [redb, etcd] = &runs[..] {
        out.push_str(&compare(args, redb, etcd));
    }
    Ok(out)
}

/// The processes of one mesh (killed, and their data removed, on drop).
struct Mesh {
    replicas: Vec<ControlPlaneProcess>,
    etcd: Option<EtcdCluster>,
    _dir: TempDir,
}

/// Flags every control plane of the bench gets.
fn common_flags(args: &Args) -> Vec<String> {
    let max = (args.watchers + args.heartbeaters + 512).max(2048);
    let per_service_cap = args.endpoints / args.services.max(1) + 64;
    vec![
        // Heartbeats come only in stage H: nothing may expire.
        "--ttl".into(),
        "1h".into(),
        "--api-max-connections".into(),
        max.to_string(),
        "--max-instances-per-service".into(),
        per_service_cap.to_string(),
    ]
}

impl Mesh {
    async fn redb(args: &Args) -> Mesh {
        let dir = TempDir::new();
        let flags = common_flags(args);
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let cp = ControlPlaneProcess::start(&dir.path.join("data"), &flags).await;
        Mesh {
            replicas: vec![cp],
            etcd: None,
            _dir: dir,
        }
    }

    /// The members first, then the replicas one after the other (the
    /// first creates the CA and the admin token, the others copy them).
    async fn etcd(args: &Args) -> Mesh {
        let dir = TempDir::new();
        let etcd = EtcdCluster::start(args.etcd_members.max(1)).await;
        let endpoints = etcd.endpoints();
        let mut replicas = Vec::new();
        for i in 1..=args.replicas.max(1) {
            let id = format!("replica-{i}");
            let mut flags = common_flags(args);
            flags.extend(
                [
                    "--store",
                    "etcd",
                    "--etcd-endpoints",
                    &endpoints,
                    "--etcd-prefix",
                    "/scale",
                    "--replica-id",
                    &id,
                ]
                .map(String::from),
            );
            let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
            replicas.push(ControlPlaneProcess::start(&dir.path.join(&id), &flags).await);
        }
        Mesh {
            replicas,
            etcd: Some(etcd),
            _dir: dir,
        }
    }

    fn rss(&self) -> Vec<u64> {
        self.replicas.iter().map(|cp| cp.rss_bytes()).collect()
    }

    fn cpu(&self) -> Vec<Duration> {
        self.replicas.iter().map(|cp| cp.cpu_time()).collect()
    }

    fn cpu_sum(&self) -> Duration {
        self.cpu().into_iter().sum()
    }

    async fn etcd_counters(&self) -> Result<Option<EtcdCounters>, ScaleError> {
        match &self.etcd {
            Some(etcd) => Ok(Some(EtcdCounters::read(etcd).await?)),
            None => Ok(None),
        }
    }
}

async fn run(args: &Args, mesh: &Mesh, name: &'static str) -> Result<StoreRun, ScaleError> {
    let first: &CpAccess = mesh.replicas[0].access();
    let admin = first.client();
    let token = first
        .create_token(&CreateToken {
            name: "scale-watchers".into(),
            role: "sidecar".into(),
            namespace: None,
            service: Some("watcher".into()),
            ttl_seconds: None,
        })
        .await;
    // The token reaches the other replicas through etcd's watch.
    let mut targets = Vec::new();
    for cp in &mesh.replicas {
        let access = cp.access().clone();
        let client = access.client_with(&token);
        token_known(&access, &client).await;
        targets.push((access, client));
    }
    let mut fleet = Fleet::spread(targets);
    let services: Vec<String> = (0..args.services.max(1))
        .map(|s| format!("svc-{s:03}"))
        .collect();
    let per_service = (args.endpoints / services.len()).max(1);
    let mut setup = Setup {
        idle_rss: mesh.rss(),
        ..Setup::default()
    };
    let mut revision;

    // A: one endpoint per service, the baseline watchers.
    eprintln!(
        "A: {} endpoints, {} watchers",
        services.len(),
        args.baseline_watchers
    );
    revision = scale::register_many(first, &admin, &services, 0..1, args.parallel).await?;
    fleet.open(args.baseline_watchers, 8).await?;
    fleet.arrivals(revision, Instant::now(), PATIENCE).await?;
    let label = format!("{} endpoints · {} watchers", services.len(), fleet.len());
    let a = stage(label, mesh, &admin, &mut fleet, args.rounds, 0).await?;

    // B: the rest of the endpoints, one registration each.
    eprintln!(
        "B: registering {} more endpoints",
        (per_service - 1) * services.len()
    );
    let (started, cpu) = (Instant::now(), mesh.cpu_sum());
    let counters = mesh.etcd_counters().await?;
    revision = revision
        .max(scale::register_many(first, &admin, &services, 1..per_service, args.parallel).await?);
    setup.register_time = started.elapsed();
    setup.register_cpu = mesh.cpu_sum().saturating_sub(cpu);
    setup.register_count = (per_service - 1) * services.len();
    if let (Some(before), Some(after)) = (counters, mesh.etcd_counters().await?) {
        setup.register_etcd = Some(after.since(&before, setup.register_time));
    }
    fleet.arrivals(revision, Instant::now(), PATIENCE).await?;
    let endpoints = per_service * services.len();
    let label = format!(
        "{} endpoints · {} watchers",
        thousands(endpoints),
        fleet.len()
    );
    let b = stage(label, mesh, &admin, &mut fleet, args.rounds, 1).await?;

    // C: the watchers of a big mesh, opened together (as after a restart).
    let more = args.watchers.saturating_sub(fleet.len());
    eprintln!("C: opening {more} more watchers");
    let (started, cpu) = (Instant::now(), mesh.cpu_sum());
    fleet.open(more, 32).await?;
    setup.open_time = started.elapsed();
    setup.open_cpu = mesh.cpu_sum().saturating_sub(cpu);
    setup.open_count = more;
    let label = format!(
        "{} endpoints · {} watchers",
        thousands(endpoints),
        thousands(fleet.len())
    );
    let c = stage(label, mesh, &admin, &mut fleet, args.rounds, 2).await?;
    let distinct = fleet.revisions();
    if distinct.len() != 1 {
        eprintln!("warning: watchers hold different revisions: {distinct:?}");
    }

    // H: heartbeats of already registered instances, the watchers open.
    let heartbeats = if args.heartbeaters > 0 {
        let ids: Vec<String> = (0..per_service)
            .flat_map(|index| services.iter().map(move |s| format!("{s}-{index}")))
            .take(args.heartbeaters)
            .collect();
        Some(heartbeat_stage(args, mesh, ids).await?)
    } else {
        None
    };
    setup.peak_rss = mesh
        .replicas
        .iter()
        .map(ControlPlaneProcess::peak_rss_bytes)
        .collect();
    let what = match &mesh.etcd {
        None => "one control plane on redb".to_owned(),
        Some(_) => format!(
            "{} control-plane replicas on a {}-member etcd cluster, watchers spread evenly, \
             changes through replica 1",
            mesh.replicas.len(),
            args.etcd_members
        ),
    };
    Ok(StoreRun {
        name,
        what,
        stages: [a, b, c],
        setup,
        heartbeats,
    })
}

/// Waits until `client`'s token is accepted by `cp` (401 until the token
/// record arrived there).
async fn token_known(cp: &CpAccess, client: &meshlet_client::Client) {
    wait::until(
        "the watchers' token is known to every replica",
        PATIENCE,
        || async {
            let reply = cp.call(client, http::Method::GET, "/api/v1/ca", None).await;
            (reply.status != 401).then_some(())
        },
    )
    .await;
}

/// Measures one stage with the fleet as it is.
async fn stage(
    label: String,
    mesh: &Mesh,
    admin: &meshlet_client::Client,
    fleet: &mut Fleet,
    rounds: u32,
    index: u32,
) -> Result<Stage, ScaleError> {
    eprintln!("  measuring {label}");
    let access = mesh.replicas[0].access();
    let mut stage = Stage {
        label,
        rss: mesh.rss(),
        watchers: fleet.len(),
        ..Stage::default()
    };
    // A new watcher's snapshot, alone (the fleet is idle): the median of 3.
    let keep = fleet.len();
    let mut snapshots = Vec::new();
    for _ in 0..3 {
        let first = fleet.open(1, 1).await?.remove(0);
        stage.snapshot_bytes = first.bytes;
        snapshots.push(first.elapsed);
        fleet.truncate(keep);
    }
    snapshots.sort();
    stage.snapshot = snapshots[1];
    for round in 0..rounds {
        // A policy for the first service, configured anew each round.
        let sent = Instant::now();
        let seconds = 1 + index * rounds + round;
        let revision =
            scale::apply_policy(access, admin, "scale-check", "svc-000", seconds).await?;
        let arrivals = fleet.arrivals(revision, sent, PATIENCE).await?;
        record(&mut stage.fan_out, &arrivals);
        stage.apply.extend(arrivals);
        // A new instance of the first service.
        let n = 100_000 + (index * rounds + round) as usize;
        let registration = scale::registration("svc-000", n, 60_000 + n as u16 % 5000);
        let sent = Instant::now();
        let revision = scale::register(access, admin, &registration).await?;
        let arrivals = fleet.arrivals(revision, sent, PATIENCE).await?;
        record(&mut stage.fan_out, &arrivals);
        stage.register.extend(arrivals);
    }
    stage.apply.sort();
    stage.register.sort();
    stage.fan_out.sort();
    Ok(stage)
}

/// Stage H: `ids` heartbeat, instance `i` through replica `i % replicas`,
/// staggered evenly over the interval; one interval of warm-up, then the
/// window is measured.
async fn heartbeat_stage(
    args: &Args,
    mesh: &Mesh,
    ids: Vec<String>,
) -> Result<Heartbeats, ScaleError> {
    let interval = Duration::from_millis(args.heartbeat_interval_ms.max(10));
    let window = Duration::from_secs(args.heartbeat_window.max(1));
    eprintln!(
        "H: {} instances heartbeating every {interval:?}, measured over {window:?}",
        ids.len()
    );
    let start = tokio::time::Instant::now();
    let measure_from = start + interval;
    let measure_to = measure_from + window;
    // (sent, latency, status) of every heartbeat.
    let log: Arc<Mutex<Vec<(tokio::time::Instant, Duration, u16)>>> = Arc::default();
    let clients: Vec<(CpAccess, meshlet_client::Client)> = mesh
        .replicas
        .iter()
        .map(|cp| (cp.access().clone(), cp.access().client()))
        .collect();
    let count = ids.len();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, id) in ids.into_iter().enumerate() {
        let (cp, client) = clients[i % clients.len()].clone();
        let log = log.clone();
        let offset = interval.mul_f64(i as f64 / count as f64);
        tasks.spawn(async move {
            let mut ticks = tokio::time::interval_at(start + offset, interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let sent = ticks.tick().await;
                if sent >= measure_to {
                    return;
                }
                let began = tokio::time::Instant::now();
                let status = scale::heartbeat(&cp, &client, &id).await.unwrap_or(0);
                log.lock().unwrap().push((began, began.elapsed(), status));
            }
        });
    }
    tokio::time::sleep_until(measure_from).await;
    let (cpu, counters) = (mesh.cpu(), mesh.etcd_counters().await?);
    let began = Instant::now();
    tokio::time::sleep_until(measure_to).await;
    let elapsed = began.elapsed();
    let (cpu_after, counters_after) = (mesh.cpu(), mesh.etcd_counters().await?);
    while tasks.join_next().await.is_some() {}
    let mut h = Heartbeats {
        instances: count,
        interval,
        window: elapsed,
        cp_cpu: cpu_after
            .iter()
            .zip(&cpu)
            .map(|(a, b)| a.saturating_sub(*b))
            .collect(),
        rss: mesh.rss(),
        ..Heartbeats::default()
    };
    if let (Some(before), Some(after)) = (counters, counters_after) {
        h.etcd = Some(after.since(&before, elapsed));
    }
    for (sent, latency, status) in log.lock().unwrap().iter() {
        if *sent < measure_from || *sent >= measure_to {
            continue;
        }
        h.sent += 1;
        if *status != 204 {
            h.failed += 1;
        }
        h.latency.push(*latency);
    }
    h.latency.sort();
    Ok(h)
}

/// etcd's own counters, from each member's `/metrics` on its client URL.
///
/// - `etcd_server_proposals_committed_total`: Raft entries committed — every
///   write (a txn, a put, a lease grant or revoke) is one, and each costs a
///   WAL append and fsync on every member. It is *the* write rate; a lease
///   renewal is not one (the leader renews in memory). Every member commits
///   every entry: the highest member's value is taken.
/// - `etcd_mvcc_put_total`: keys put by applied entries (a txn of many puts
///   counts each); the highest member's value.
/// - `etcd_disk_wal_fsync_duration_seconds_count`: WAL fsyncs, summed over
///   the members (the disk cost of those writes).
/// - `etcd_debugging_lease_renewed_total`: lease renewals seen by the leader
///   (the heartbeats), summed over the members.
#[derive(Debug, Clone, Default)]
struct EtcdCounters {
    proposals: f64,
    puts: f64,
    fsyncs: f64,
    renewals: f64,
    /// CPU time of the members, summed.
    cpu: Duration,
    /// Per member.
    rss: Vec<u64>,
}

/// Rates between two [`EtcdCounters`] readings.
#[derive(Debug, Clone, Default)]
struct EtcdDelta {
    proposals: f64,
    proposals_per_s: f64,
    puts_per_s: f64,
    fsyncs_per_s: f64,
    renewals_per_s: f64,
    /// etcd CPU seconds per second (all members).
    cpu_per_s: f64,
    rss: Vec<u64>,
}

impl EtcdCounters {
    async fn read(etcd: &EtcdCluster) -> Result<EtcdCounters, ScaleError> {
        let mut c = EtcdCounters::default();
        for addr in etcd.client_addrs() {
            let text = metrics_text(addr).await?;
            c.proposals = c
                .proposals
                .max(metric_sum(&text, "etcd_server_proposals_committed_total"));
            c.puts = c.puts.max(metric_sum(&text, "etcd_mvcc_put_total"));
            c.fsyncs += metric_sum(&text, "etcd_disk_wal_fsync_duration_seconds_count");
            c.renewals += metric_sum(&text, "etcd_debugging_lease_renewed_total");
        }
        for pid in etcd.pids() {
            c.cpu += proc_cpu(pid);
            c.rss.push(proc_rss(pid));
        }
        Ok(c)
    }

    fn since(&self, before: &EtcdCounters, over: Duration) -> EtcdDelta {
        let s = over.as_secs_f64().max(1e-9);
        EtcdDelta {
            proposals: self.proposals - before.proposals,
            proposals_per_s: (self.proposals - before.proposals) / s,
            puts_per_s: (self.puts - before.puts) / s,
            fsyncs_per_s: (self.fsyncs - before.fsyncs) / s,
            renewals_per_s: (self.renewals - before.renewals) / s,
            cpu_per_s: self.cpu.saturating_sub(before.cpu).as_secs_f64() / s,
            rss: self.rss.clone(),
        }
    }
}

async fn metrics_text(addr: SocketAddr) -> Result<String, ScaleError> {
    let reply = meshlet_e2e::client::get(addr, "/metrics")
        .await
        .map_err(|e| ScaleError::Etcd(format!("GET {addr}/metrics: {e}")))?;
    if reply.status != 200 {
        return Err(ScaleError::Etcd(format!(
            "GET {addr}/metrics answered {}",
            reply.status
        )));
    }
    Ok(reply.text())
}

/// The sum of every sample of `name` (all label sets) in Prometheus text.
fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            if !(rest.starts_with(' ') || rest.starts_with('{')) {
                return None;
            }
            rest.rsplit(' ').next()?.parse::<f64>().ok()
        })
        .sum()
}

fn proc_cpu(pid: u32) -> Duration {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Duration::ZERO;
    };
    let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let fields: Vec<u64> = after
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    let ticks = fields.get(10).copied().unwrap_or(0) + fields.get(11).copied().unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

fn proc_rss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

fn record(fan_out: &mut Vec<Duration>, arrivals: &[Duration]) {
    let first = arrivals.iter().min().copied().unwrap_or_default();
    let last = arrivals.iter().max().copied().unwrap_or_default();
    fan_out.push(last - first);
}

fn ms(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1000.0;
    if ms >= 100.0 {
        format!("{ms:.0} ms")
    } else {
        format!("{ms:.1} ms")
    }
}

/// Per-replica sizes: `12.0 MiB` or `12.0 + 11.8 + 11.9 MiB`.
fn mibs(bytes: &[u64]) -> String {
    let each: Vec<String> = bytes
        .iter()
        .map(|b| format!("{:.1}", *b as f64 / (1024.0 * 1024.0)))
        .collect();
    format!("{} MiB", each.join(" + "))
}

fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(' ');
        }
        out.push(c);
    }
    out
}

fn ratio(base: f64, value: f64) -> String {
    if base <= 0.0 {
        return "–".into();
    }
    format!("{:.1}×", value / base)
}

fn q(s: &[Duration], p: f64) -> Duration {
    scale::quantile(s, p)
}

fn trio(s: &[Duration]) -> String {
    format!("{} / {} / {}", ms(q(s, 0.5)), ms(q(s, 0.99)), ms(q(s, 1.0)))
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn report(args: &Args, run: &StoreRun) -> String {
    let [a, b, c] = &run.stages;
    let setup = &run.setup;
    let max_rss = |s: &Stage| s.rss.iter().copied().max().unwrap_or(0);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "### Control plane at scale, {} ({} endpoints in {} services, {} watchers)\n",
        run.name,
        thousands(args.endpoints),
        args.services,
        thousands(args.watchers)
    );
    let _ = writeln!(out, "{}.\n", run.what);
    let _ = writeln!(
        out,
        "| change → every watcher | {} (baseline) | {} | {} | C ÷ baseline (p99) |",
        a.label, b.label, c.label
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|");
    let _ = writeln!(
        out,
        "| policy apply p50 / p99 / max | {} | {} | {} | {} |",
        trio(&a.apply),
        trio(&b.apply),
        trio(&c.apply),
        ratio(secs(q(&a.apply, 0.99)), secs(q(&c.apply, 0.99)))
    );
    let _ = writeln!(
        out,
        "| registration p50 / p99 / max | {} | {} | {} | {} |",
        trio(&a.register),
        trio(&b.register),
        trio(&c.register),
        ratio(secs(q(&a.register, 0.99)), secs(q(&c.register, 0.99)))
    );
    let _ = writeln!(
        out,
        "| fan-out, first → last watcher (median / max) | {} / {} | {} / {} | {} / {} | {} |",
        ms(q(&a.fan_out, 0.5)),
        ms(q(&a.fan_out, 1.0)),
        ms(q(&b.fan_out, 0.5)),
        ms(q(&b.fan_out, 1.0)),
        ms(q(&c.fan_out, 0.5)),
        ms(q(&c.fan_out, 1.0)),
        ratio(secs(q(&a.fan_out, 0.5)), secs(q(&c.fan_out, 0.5)))
    );
    let _ = writeln!(
        out,
        "| full snapshot to one new watcher | {} ({} KiB) | {} ({} KiB) | {} ({} KiB) | {} |",
        ms(a.snapshot),
        a.snapshot_bytes / 1024,
        ms(b.snapshot),
        b.snapshot_bytes / 1024,
        ms(c.snapshot),
        c.snapshot_bytes / 1024,
        ratio(secs(a.snapshot), secs(c.snapshot))
    );
    let _ = writeln!(
        out,
        "| control plane RSS, each replica (idle: {}) | {} | {} | {} | {} |",
        mibs(&setup.idle_rss),
        mibs(&a.rss),
        mibs(&b.rss),
        mibs(&c.rss),
        ratio(max_rss(a) as f64, max_rss(c) as f64)
    );
    let all_p99 = q(&c.apply, 0.99).max(q(&c.register, 0.99));
    let verdict = if all_p99 < Duration::from_secs(1) {
        "met"
    } else {
        "**not met**"
    };
    let _ = writeln!(
        out,
        "\nGoal p99 < 1 s with {} watchers: {verdict} ({}). Each change is timed from sending its \
         request (HTTPS, one connection per call, store commit included) to the last byte of its \
         line at each watcher; {} applies + {} registrations per stage; peak RSS {}.",
        thousands(c.watchers),
        ms(all_p99),
        args.rounds,
        args.rounds,
        mibs(&setup.peak_rss)
    );
    let etcd_writes = setup
        .register_etcd
        .as_ref()
        .map(|d| {
            format!(
                ", {:.1} etcd Raft writes per registration",
                d.proposals / setup.register_count.max(1) as f64
            )
        })
        .unwrap_or_default();
    let _ = writeln!(
        out,
        "Setup: {} registrations one by one ({} in flight) in {:.1} s ({:.0}/s, control plane \
         CPU {:.1} s{etcd_writes}); {} watchers opened 32 at a time, each served the full \
         snapshot, in {:.1} s (control plane CPU {:.1} s).",
        thousands(setup.register_count),
        args.parallel,
        secs(setup.register_time),
        setup.register_count as f64 / secs(setup.register_time).max(1e-9),
        secs(setup.register_cpu),
        thousands(setup.open_count),
        secs(setup.open_time),
        secs(setup.open_cpu)
    );
    if let Some(h) = &run.heartbeats {
        let cpu: Duration = h.cp_cpu.iter().sum();
        let _ = writeln!(
            out,
            "Heartbeats: {} instances every {} ({:.0}/s sent, {} failed), latency p50 / p99 / \
             max {}; control plane CPU {:.2} s per s (all replicas), RSS after {}{}.",
            thousands(h.instances),
            ms(h.interval),
            h.sent as f64 / secs(h.window).max(1e-9),
            h.failed,
            trio(&h.latency),
            secs(cpu) / secs(h.window).max(1e-9),
            mibs(&h.rss),
            h.etcd
                .as_ref()
                .map(|d| format!(
                    "; etcd {:.1} Raft writes/s, {:.1} key puts/s, {:.1} WAL fsyncs/s, {:.0} \
                     lease renewals/s, CPU {:.2} s per s (all members)",
                    d.proposals_per_s, d.puts_per_s, d.fsyncs_per_s, d.renewals_per_s, d.cpu_per_s
                ))
                .unwrap_or_default()
        );
    }
    out
}

/// redb and etcd side by side at full scale (stage C and H).
fn compare(args: &Args, redb: &StoreRun, etcd: &StoreRun) -> String {
    let (r, e) = (&redb.stages[2], &etcd.stages[2]);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "### redb vs etcd, same run ({} endpoints · {} watchers)\n",
        thousands(args.endpoints),
        thousands(args.watchers)
    );
    let _ = writeln!(
        out,
        "| | redb: 1 control plane | etcd: {} replicas, {} members | etcd ÷ redb |",
        etcd.stages[2].rss.len(),
        args.etcd_members
    );
    let _ = writeln!(out, "|---|---:|---:|---:|");
    let p99 = |s: &[Duration]| secs(q(s, 0.99));
    let _ = writeln!(
        out,
        "| policy apply → every watcher p50 / p99 / max | {} | {} | {} |",
        trio(&r.apply),
        trio(&e.apply),
        ratio(p99(&r.apply), p99(&e.apply))
    );
    let _ = writeln!(
        out,
        "| registration → every watcher p50 / p99 / max | {} | {} | {} |",
        trio(&r.register),
        trio(&e.register),
        ratio(p99(&r.register), p99(&e.register))
    );
    let _ = writeln!(
        out,
        "| full snapshot to one new watcher | {} | {} | {} |",
        ms(r.snapshot),
        ms(e.snapshot),
        ratio(secs(r.snapshot), secs(e.snapshot))
    );
    let rate = |s: &Setup| s.register_count as f64 / secs(s.register_time).max(1e-9);
    let _ = writeln!(
        out,
        "| registrations/s (one by one, {} in flight) | {:.0} | {:.0} | {} |",
        args.parallel,
        rate(&redb.setup),
        rate(&etcd.setup),
        ratio(rate(&redb.setup), rate(&etcd.setup))
    );
    let sum = |v: &[u64]| v.iter().sum::<u64>();
    let _ = writeln!(
        out,
        "| control plane RSS idle (each replica) | {} | {} | {} |",
        mibs(&redb.setup.idle_rss),
        mibs(&etcd.setup.idle_rss),
        ratio(
            sum(&redb.setup.idle_rss) as f64,
            sum(&etcd.setup.idle_rss) as f64
        )
    );
    let _ = writeln!(
        out,
        "| control plane RSS after (each replica; ratio: total) | {} | {} | {} |",
        mibs(&r.rss),
        mibs(&e.rss),
        ratio(sum(&r.rss) as f64, sum(&e.rss) as f64)
    );
    if let (Some(rh), Some(eh)) = (&redb.heartbeats, &etcd.heartbeats) {
        let lat =
            |h: &Heartbeats| format!("{} / {}", ms(q(&h.latency, 0.5)), ms(q(&h.latency, 0.99)));
        let _ = writeln!(
            out,
            "| {} heartbeating instances: heartbeats/s (failed) | {:.0} ({}) | {:.0} ({}) | – |",
            thousands(rh.instances),
            rh.sent as f64 / secs(rh.window).max(1e-9),
            rh.failed,
            eh.sent as f64 / secs(eh.window).max(1e-9),
            eh.failed
        );
        let _ = writeln!(
            out,
            "| heartbeat latency p50 / p99 | {} | {} | {} |",
            lat(rh),
            lat(eh),
            ratio(p99(&rh.latency), p99(&eh.latency))
        );
        let cpu = |h: &Heartbeats| secs(h.cp_cpu.iter().sum()) / secs(h.window).max(1e-9);
        let _ = writeln!(
            out,
            "| control plane CPU s per s while heartbeating (all replicas) | {:.2} | {:.2} | {} |",
            cpu(rh),
            cpu(eh),
            ratio(cpu(rh), cpu(eh))
        );
        if let Some(d) = &eh.etcd {
            let _ = writeln!(
                out,
                "| etcd Raft writes/s while heartbeating (`etcd_server_proposals_committed_total`) | – | {:.1} | – |",
                d.proposals_per_s
            );
            let _ = writeln!(
                out,
                "| etcd key puts/s · WAL fsyncs/s (all members) · lease renewals/s | – | {:.1} · {:.1} · {:.0} | – |",
                d.puts_per_s, d.fsyncs_per_s, d.renewals_per_s
            );
            let _ = writeln!(
                out,
                "| etcd CPU s per s (all members) · RSS each member | – | {:.2} · {} | – |",
                d.cpu_per_s,
                mibs(&d.rss)
            );
        }
    }
    let _ = writeln!(
        out,
        "\nBoth meshes measured one after the other in this run, on loopback, on the same {}-core \
         machine as the simulated sidecars and (for etcd) the etcd members; reproduce: \
         `tests/bench/control-plane-scale.sh` (`--store redb|etcd|both`, `--help`).",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    out
}
