//! `meshlet-cp-scale`: the control plane at scale (issue 17 goal 6), run by
//! `tests/bench/control-plane-scale.sh`.
//!
//! Starts a real `control-plane` process on loopback (found next to this
//! binary, or in `$MESHLET_BIN_DIR`) and measures three stages in one run,
//! the first being the baseline the others are compared with:
//!
//! ```text
//! A  100 endpoints, 10 watchers      (baseline)
//! B  10 000 endpoints, 10 watchers   (the endpoints registered one by one, over HTTPS)
//! C  10 000 endpoints, 1000 watchers (990 more watch streams opened)
//! ```
//!
//! In each stage: `--rounds` policy applies and `--rounds` new
//! registrations, each timed from sending the request to the arrival of
//! its revision at every watcher (p50/p99/max over all watchers and
//! rounds; the fan-out is the spread from the first watcher to the last);
//! the full snapshot a new watcher is served (request sent → last byte,
//! TLS handshake included); the control plane's RSS and CPU time. Watchers
//! are `meshlet_e2e::scale::Watcher`s: the sidecar's watch protocol, each
//! on its own connection. Prints a markdown fragment (a `###` heading, the
//! table, notes) and writes it to `--out`.

use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use meshlet_api::access::CreateToken;
use meshlet_e2e::scale::{self, Fleet, ScaleError};
use meshlet_e2e::{ControlPlaneProcess, ControlPlaneRef, CpAccess, TempDir};

#[derive(Debug, Parser)]
#[command(name = "meshlet-cp-scale", about = "the control plane at scale")]
struct Args {
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
    rss: u64,
    watchers: usize,
}

/// What happens around the stages.
#[derive(Debug, Default)]
struct Setup {
    idle_rss: u64,
    register_time: Duration,
    register_count: usize,
    register_cpu: Duration,
    open_time: Duration,
    open_count: usize,
    open_cpu: Duration,
    peak_rss: u64,
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
        // On a signal the run is dropped, and with it the control plane
        // (killed on drop) and its temporary data directory.
        tokio::select! {
            result = run(&args) => result.map_err(|e| e.to_string()),
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

async fn run(args: &Args) -> Result<String, ScaleError> {
    let dir = TempDir::new();
    let max = (args.watchers + 512).max(2048).to_string();
    let per_service_cap = (args.endpoints / args.services.max(1) + 64).to_string();
    let cp = ControlPlaneProcess::start(
        &dir.path.join("data"),
        &[
            // No heartbeats are sent: nothing may expire during the run.
            "--ttl",
            "1h",
            "--api-max-connections",
            &max,
            "--max-instances-per-service",
            &per_service_cap,
        ],
    )
    .await;
    let access: CpAccess = cp.access().clone();
    let admin = access.client();
    let token = access
        .create_token(&CreateToken {
            name: "scale-watchers".into(),
            role: "sidecar".into(),
            namespace: None,
            service: Some("watcher".into()),
            ttl_seconds: None,
        })
        .await;
    let mut fleet = Fleet::new(&access, access.client_with(&token));
    let services: Vec<String> = (0..args.services.max(1))
        .map(|s| format!("svc-{s:03}"))
        .collect();
    let per_service = (args.endpoints / services.len()).max(1);
    let mut setup = Setup {
        idle_rss: cp.rss_bytes(),
        ..Setup::default()
    };
    let mut revision;

    // A: one endpoint per service, the baseline watchers.
    eprintln!(
        "A: {} endpoints, {} watchers",
        services.len(),
        args.baseline_watchers
    );
    revision = scale::register_many(&access, &admin, &services, 0..1, args.parallel).await?;
    fleet.open(args.baseline_watchers, 8).await?;
    fleet.arrivals(revision, Instant::now(), PATIENCE).await?;
    let label = format!("{} endpoints · {} watchers", services.len(), fleet.len());
    let a = stage(label, &cp, &access, &admin, &mut fleet, args.rounds, 0).await?;

    // B: the rest of the endpoints, one registration each.
    eprintln!(
        "B: registering {} more endpoints",
        (per_service - 1) * services.len()
    );
    let (started, cpu) = (Instant::now(), cp.cpu_time());
    revision = revision.max(
        scale::register_many(&access, &admin, &services, 1..per_service, args.parallel).await?,
    );
    setup.register_time = started.elapsed();
    setup.register_cpu = cp.cpu_time().saturating_sub(cpu);
    setup.register_count = (per_service - 1) * services.len();
    fleet.arrivals(revision, Instant::now(), PATIENCE).await?;
    let endpoints = per_service * services.len();
    let label = format!(
        "{} endpoints · {} watchers",
        thousands(endpoints),
        fleet.len()
    );
    let b = stage(label, &cp, &access, &admin, &mut fleet, args.rounds, 1).await?;

    // C: the watchers of a big mesh, opened together (as after a restart).
    let more = args.watchers.saturating_sub(fleet.len());
    eprintln!("C: opening {more} more watchers");
    let (started, cpu) = (Instant::now(), cp.cpu_time());
    fleet.open(more, 32).await?;
    setup.open_time = started.elapsed();
    setup.open_cpu = cp.cpu_time().saturating_sub(cpu);
    setup.open_count = more;
    let label = format!(
        "{} endpoints · {} watchers",
        thousands(endpoints),
        thousands(fleet.len())
    );
    let c = stage(label, &cp, &access, &admin, &mut fleet, args.rounds, 2).await?;
    let distinct = fleet.revisions();
    if distinct.len() != 1 {
        eprintln!("warning: watchers hold different revisions: {distinct:?}");
    }
    setup.peak_rss = cp.peak_rss_bytes();
    Ok(report(args, &[a, b, c], &setup))
}

/// Measures one stage with the fleet as it is.
async fn stage(
    label: String,
    cp: &ControlPlaneProcess,
    access: &CpAccess,
    admin: &meshlet_client::Client,
    fleet: &mut Fleet,
    rounds: u32,
    index: u32,
) -> Result<Stage, ScaleError> {
    eprintln!("  measuring {label}");
    let mut stage = Stage {
        label,
        rss: cp.rss_bytes(),
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

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
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

fn report(args: &Args, stages: &[Stage; 3], setup: &Setup) -> String {
    let [a, b, c] = stages;
    let q = |s: &[Duration], p: f64| scale::quantile(s, p);
    let trio =
        |s: &[Duration]| format!("{} / {} / {}", ms(q(s, 0.5)), ms(q(s, 0.99)), ms(q(s, 1.0)));
    let secs = |d: Duration| d.as_secs_f64();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "### Control plane at scale ({} endpoints in {} services, {} watchers)\n",
        thousands(args.endpoints),
        args.services,
        thousands(args.watchers)
    );
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
        "| control plane RSS (idle: {}) | {} | {} | {} | {} |",
        mib(setup.idle_rss),
        mib(a.rss),
        mib(b.rss),
        mib(c.rss),
        ratio(a.rss as f64, c.rss as f64)
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
        mib(setup.peak_rss)
    );
    let _ = writeln!(
        out,
        "Setup: {} registrations one by one in {:.1} s ({:.0}/s, control plane CPU {:.1} s); {} \
         watchers opened {} at a time, each served the full snapshot, in {:.1} s (control plane \
         CPU {:.1} s).",
        thousands(setup.register_count),
        secs(setup.register_time),
        setup.register_count as f64 / secs(setup.register_time).max(1e-9),
        secs(setup.register_cpu),
        thousands(setup.open_count),
        32,
        secs(setup.open_time),
        secs(setup.open_cpu)
    );
    let _ = writeln!(
        out,
        "Watchers are simulated sidecars (the watch protocol over TLS, one connection each, in \
         this process on the same {}-core machine); reproduce: `tests/bench/control-plane-scale.sh`.",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    out
}
