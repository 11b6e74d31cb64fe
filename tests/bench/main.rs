//! `vaultguard-bench`: starts the real `vaultguard serve` as a child process
//! on a fresh database, sets up tenants, agents, rules, keys and a connected
//! account over gRPC, then drives each scenario with the SDK in a closed
//! loop (`--concurrency`) or at a fixed arrival rate (`--rate`) and prints
//! one table per backend: throughput, latency percentiles, errors and the
//! server's CPU-seconds per 1,000 operations (utime + stime of
//! `/proc/<pid>/stat`, before and after each measured run).
//!
//! ```sh
//! scripts/bench.sh --duration 5
//! vaultguard-bench --backend sqlite --scenarios token.issue,verify --rate 500
//! ```

mod fairness;
mod fixture;
mod flood;
mod freeze;
mod load;
mod peer;
mod replication;
mod scale;
mod scenarios;
mod server;
mod slow_provider;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;

use crate::fixture::Fixture;
use crate::load::{Measured, Mode};
use crate::server::{Backend, PgDatabase, ServerProcess, ServerSpec};

#[derive(Parser, Debug)]
#[command(name = "vaultguard-bench", about = "VaultGuard load benchmarks")]
struct Args {
    /// Backends to run, in order.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "postgres,sqlite"
    )]
    backend: Vec<Backend>,
    /// Scenarios to run (default: all); see --list.
    #[arg(long, value_delimiter = ',')]
    scenarios: Vec<String>,
    /// Lists the scenarios and exits.
    #[arg(long)]
    list: bool,
    /// Closed loop: operations in flight at once.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Open loop: operations per second (fixed arrival rate; latency from
    /// each operation's scheduled send time). Overrides --concurrency.
    #[arg(long)]
    rate: Option<f64>,
    /// Measured seconds per scenario.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Unmeasured seconds before each scenario.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// gRPC channels (HTTP/2 connections) the load is spread over.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Step-up flows in flight at once, closed loop even with --rate (the
    /// latency is approve → notified).
    #[arg(long, default_value_t = 1)]
    stepup_concurrency: usize,
    /// Delegation tokens in the Verify pool (1% of them revoked).
    #[arg(long, default_value_t = 10_000)]
    verify_pool: usize,
    /// The server binary (default: `vaultguard` next to this one).
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// PostgreSQL without a database name; a fresh database
    /// `vaultguard_bench_<random>` is created there and dropped after.
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432")]
    pg_url: String,
    /// Connection options the server's database URL gets. The cluster is on
    /// loopback, where TLS only burns CPU on both ends; pass
    /// `--pg-options sslmode=require` to measure with it.
    #[arg(long, default_value = "sslmode=disable")]
    pg_options: String,
    /// Also run the peer (node oidc-provider, tests/bench/peer) and compare
    /// token.issue and delegation.allow.* with it, interleaved A/B/A/B.
    #[arg(long)]
    peer: bool,
    /// node processes of the peer (node:cluster workers on one port).
    #[arg(long, default_value_t = 2)]
    peer_workers: usize,
    /// A/B rounds per compared scenario (each round `--duration` seconds).
    #[arg(long, default_value_t = 2)]
    peer_rounds: usize,
    /// WatchPendingStepUps streams held open at once at the end of each
    /// backend's run, to report the server's RSS with them (0 skips).
    #[arg(long, default_value_t = 10_000)]
    watch_streams: usize,
    /// The server's RUST_LOG.
    #[arg(long, default_value = "warn")]
    server_log: String,
    /// A line of TOML added to every server's config, e.g.
    /// `--server-config 'audit_group_overlap_min = 4'` (repeatable).
    #[arg(long)]
    server_config: Vec<String>,
    /// fairness: the per-tenant rate limit (calls per second, and burst).
    #[arg(long, default_value_t = 200)]
    tenant_limit: u32,
    /// fairness, flood.slow_body: the victim tenant's arrival rate, ops/s.
    #[arg(long, default_value_t = 50.0)]
    victim_rate: f64,
    /// fairness: the flooding tenant's closed-loop workers.
    #[arg(long, default_value_t = 64)]
    flood_concurrency: usize,
    /// vault.slow_provider: how long the slow tenant's provider takes to
    /// answer a token request, ms.
    #[arg(long, default_value_t = 2_000)]
    provider_delay_ms: u64,
    /// vault.slow_provider: exchanges in flight at once against it, each on
    /// a connection of its own.
    #[arg(long, default_value_t = 32)]
    slow_exchanges: usize,
    /// flood.slow_body: HTTP/2 connections of the slow-body flood.
    #[arg(long, default_value_t = 5)]
    flood_connections: usize,
    /// flood.slow_body: IssueToken calls the flood holds on each connection.
    #[arg(long, default_value_t = 256)]
    flood_streams: usize,
    /// freeze.cross_replica: freezes measured.
    #[arg(long, default_value_t = 30)]
    freeze_rounds: usize,
    /// freeze.cross_replica: ACTIVE delegations the agent holds at each
    /// freeze.
    #[arg(long, default_value_t = 1_000)]
    freeze_delegations: usize,
    /// Scale mode (PostgreSQL only; see tests/bench/scale.rs): the audit
    /// log sizes to measure at, e.g. `1e5,1e6,1e7`. Each level also seeds
    /// L/10 delegations, L/100 agents and L/1000 tenants in all; the hot
    /// scenarios (or --scenarios) and the audit reads are measured empty
    /// and at each level, then printed as one table.
    #[arg(long, value_delimiter = ',', value_parser = scale::parse_count)]
    scale: Vec<u64>,
    /// Scale mode: inbound rules of the EdDSA receiver for the rules
    /// measurement (ALLOW EdDSA with 10 rules, then with this many; 0 skips).
    /// The rules stay for the rest of the run.
    #[arg(long, default_value_t = 10_000)]
    scale_rules: usize,
    /// Scale mode: how many times each ListAuditEvents query runs per level
    /// (sequentially; at most 30 s per query and level).
    #[arg(long, default_value_t = 100)]
    scale_list_rounds: usize,
    /// Scale mode: measure the empty level only (its events are the seeded
    /// events' templates), then seed each level and restart the server,
    /// printing the seeding rates, time to SERVING and RSS.
    #[arg(long)]
    scale_seed_only: bool,
    /// Scale mode: keep the seeded database under this name instead of
    /// dropping it (to look at query plans, or to serve it:
    /// `postgres://postgres@127.0.0.1:5432/<name>`); an existing database of
    /// that name is replaced.
    #[arg(long)]
    scale_keep: Option<String>,
}

/// One line of a table.
struct Row {
    scenario: String,
    measured: Measured,
    server_cpu: f64,
    load_cpu: f64,
    /// CPU seconds of every PostgreSQL process (0 when it served nothing).
    db_cpu: f64,
    /// The whole machine's CPU over the measurement.
    machine: server::MachineCpu,
    /// How long the sealer took, after the last operation, to chain the
    /// audit events left (part of the measurement's time).
    sealing: Duration,
}

fn per_thousand(cpu: f64, ops: u64) -> String {
    if ops == 0 {
        "-".to_owned()
    } else {
        format!("{:.3}", cpu * 1000.0 / ops as f64)
    }
}

fn percent(part: f64, whole: f64) -> f64 {
    if whole > 0.0 {
        100.0 * part / whole
    } else {
        0.0
    }
}

/// A scenario's setting on `server` (and `replica`), with a fresh nonce.
fn scene<'a>(
    args: &Args,
    fixture: &'a Fixture,
    server: &'a ServerProcess,
    replica: Option<&'a ServerProcess>,
) -> scenarios::Scene<'a> {
    scenarios::Scene {
        fixture,
        server,
        replica,
        connections: args.connections,
        concurrency: args.concurrency,
        verify_pool: args.verify_pool,
        nonce: uuid::Uuid::new_v4().simple().to_string(),
    }
}

fn print_table(title: &str, rows: &[Row]) {
    print_rows(title, &rows.iter().collect::<Vec<_>>());
}

fn print_rows(title: &str, rows: &[&Row]) {
    println!();
    println!("{title}");
    println!(
        "{:<26} {:>8} {:>9} {:>8} {:>8} {:>8} {:>7} {:>12} {:>12} {:>11} {:>12} {:>6} {:>6} {:>7}",
        "scenario",
        "ops",
        "ops/s",
        "p50 ms",
        "p99 ms",
        "p999 ms",
        "errors",
        "srv CPU-s/1k",
        "load CPU-s/1k",
        "db CPU-s/1k",
        "all CPU-s/1k",
        "busy%",
        "steal%",
        "seal s"
    );
    for row in rows {
        let m = &row.measured;
        println!(
            "{:<26} {:>8} {:>9.0} {:>8.2} {:>8.2} {:>8.2} {:>7} {:>12} {:>12} {:>11} {:>12} {:>6.0} {:>6.1} {:>7.2}",
            row.scenario,
            m.ops,
            m.throughput(),
            m.millis(0.50),
            m.millis(0.99),
            m.millis(0.999),
            m.errors,
            per_thousand(row.server_cpu, m.ops),
            per_thousand(row.load_cpu, m.ops),
            per_thousand(row.db_cpu, m.ops),
            per_thousand(row.machine.busy, m.ops),
            percent(row.machine.busy, row.machine.total),
            percent(row.machine.steal, row.machine.total),
            row.sealing.as_secs_f64(),
        );
    }
    for row in rows {
        if let Some(error) = &row.measured.first_error {
            println!("  {}: first error: {error}", row.scenario);
        }
    }
}

/// ALLOW with a budget check beside the same ALLOW without one, when both
/// ran: the budget's cost as ratios of the same run.
fn print_budget_overhead(rows: &[Row]) {
    let find = |name: &str| rows.iter().find(|row| row.scenario == name);
    if let (Some(with), Some(without)) = (
        find("delegation.allow.eddsa.budget"),
        find("delegation.allow.eddsa"),
    ) {
        let cpu = |row: &Row| row.server_cpu / row.measured.ops.max(1) as f64;
        println!(
            "budget check: ops/s {:.2}x, p99 {:.2}x, server CPU per op {:.2}x of ALLOW EdDSA without one",
            with.measured.throughput() / without.measured.throughput().max(f64::EPSILON),
            with.measured.millis(0.99) / without.measured.millis(0.99).max(f64::EPSILON),
            cpu(with) / cpu(without).max(f64::EPSILON),
        );
    }
}

fn server_binary(args: &Args) -> Result<PathBuf> {
    let binary = match &args.server_bin {
        Some(path) => path.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("no directory of the bench binary")?
            .join("vaultguard"),
    };
    if !binary.exists() {
        bail!(
            "{} is missing: cargo build --release -p vaultguard-server --bin vaultguard",
            binary.display()
        );
    }
    Ok(binary)
}

/// The scenarios to run, checked against [`scenarios::ALL`].
fn selected(args: &Args, backend: Backend) -> Result<Vec<String>> {
    let mut names: Vec<String> = if args.scenarios.is_empty() {
        scenarios::ALL.iter().map(|s| (*s).to_owned()).collect()
    } else {
        args.scenarios.clone()
    };
    for name in &names {
        if !scenarios::ALL.contains(&name.as_str()) {
            bail!(
                "unknown scenario {name}; known: {}",
                scenarios::ALL.join(", ")
            );
        }
    }
    if backend == Backend::Sqlite {
        // One process per SQLite file: there is no second replica.
        names.retain(|name| {
            !matches!(
                name.as_str(),
                "stepup.cross_replica" | "freeze.cross_replica" | "replication.sync_standby"
            )
        });
    }
    Ok(names)
}

fn mode_of(args: &Args, name: &str) -> Mode {
    // Step-ups time one part of a longer flow: always closed loop.
    match (args.rate, name.starts_with("stepup.")) {
        (_, true) => Mode::Closed {
            concurrency: args.stepup_concurrency,
        },
        (Some(rate), false) => Mode::Open { rate },
        (None, false) => Mode::Closed {
            concurrency: args.concurrency,
        },
    }
}

/// Something whose CPU time a measurement charges to the operations.
trait CpuSource {
    fn cpu_seconds(&self) -> Result<f64>;
}

impl CpuSource for ServerProcess {
    fn cpu_seconds(&self) -> Result<f64> {
        ServerProcess::cpu_seconds(self)
    }
}

impl CpuSource for peer::Peer {
    fn cpu_seconds(&self) -> Result<f64> {
        peer::Peer::cpu_seconds(self)
    }
}

fn total_cpu(sources: &[&dyn CpuSource]) -> Result<f64> {
    sources.iter().map(|s| s.cpu_seconds()).sum()
}

/// How long a measurement waits for the audit log to be sealed.
const SEAL_LIMIT: Duration = Duration::from_secs(120);

/// Measures `op` for `--duration` (after `warm_up`), charging the CPU time
/// of `sources` and of this process to it. With `backlog`, the measurement
/// starts on a sealed audit log and ends once the sealer has chained every
/// event the operations wrote: sealing is part of what an operation costs,
/// and a rate the sealer cannot follow is not a rate the server sustains.
async fn measure(
    args: &Args,
    name: &str,
    op: &load::Op,
    sources: &[&dyn CpuSource],
    warm_up: f64,
    backlog: Option<&server::AuditBacklog>,
) -> Result<Row> {
    let mode = mode_of(args, name);
    let seq = Arc::new(AtomicU64::new(0));
    if warm_up > 0.0 {
        load::run(op, mode, Duration::from_secs_f64(warm_up), &seq).await?;
    }
    if let Some(backlog) = backlog {
        backlog.drain(SEAL_LIMIT).await?;
    }
    let own = || server::cpu_seconds(std::process::id());
    let (server_before, load_before) = (total_cpu(sources)?, own()?);
    let db_before = server::postgres_cpu_seconds()?;
    let machine_before = server::machine_cpu_seconds()?;
    let mut measured = load::run(op, mode, Duration::from_secs_f64(args.duration), &seq).await?;
    let sealing = match backlog {
        Some(backlog) => backlog.drain(SEAL_LIMIT).await?,
        None => Duration::ZERO,
    };
    measured.elapsed += sealing;
    let machine = server::machine_cpu_seconds()? - machine_before;
    let db_cpu = (server::postgres_cpu_seconds()? - db_before).max(0.0);
    Ok(Row {
        scenario: name.to_owned(),
        server_cpu: total_cpu(sources)? - server_before,
        load_cpu: own()? - load_before,
        db_cpu,
        machine,
        sealing,
        measured,
    })
}

/// Adds `other` (a later round of the same scenario) to `total`.
fn accumulate(total: &mut Option<Row>, other: Row) -> Result<()> {
    match total {
        None => *total = Some(other),
        Some(row) => {
            row.measured.elapsed += other.measured.elapsed;
            row.measured.merge(other.measured)?;
            row.server_cpu += other.server_cpu;
            row.load_cpu += other.load_cpu;
            row.db_cpu += other.db_cpu;
            row.machine += other.machine;
            row.sealing += other.sealing;
        }
    }
    Ok(())
}

/// Ours against the peer, A/B/A/B, for the scenarios both can run.
async fn compare_with_peer(
    args: &Args,
    backend: Backend,
    scene: &scenarios::Scene<'_>,
    names: &[String],
    backlog: &server::AuditBacklog,
) -> Result<()> {
    let peer = peer::Peer::start(args.peer_workers).await?;
    eprintln!(
        "[{}] peer: oidc-provider on port {} (pids {:?})",
        backend.name(),
        peer.port,
        peer.pids
    );
    let pairs = [
        ("token.issue", "rs256"),
        ("delegation.allow.rs256", "rs256"),
        ("delegation.allow.es256", "es256"),
        ("delegation.allow.eddsa", "eddsa"),
    ];
    let mut lines = Vec::new();
    for (ours_name, algorithm) in pairs {
        if !names.iter().any(|n| n == ours_name) {
            continue;
        }
        eprintln!(
            "[{}] {ours_name} vs peer {algorithm}, A/B/A/B",
            backend.name()
        );
        let ours = scenarios::prepare(ours_name, scene).await?;
        let theirs = peer.token_op(algorithm);
        let (mut a, mut b) = (None, None);
        for round in 0..args.peer_rounds.max(1) {
            let warm_up = if round == 0 { args.warmup } else { 0.0 };
            let row = measure(
                args,
                ours_name,
                &ours,
                &[scene.server],
                warm_up,
                Some(backlog),
            )
            .await?;
            accumulate(&mut a, row)?;
            let peer_name = format!("peer.{algorithm}");
            let row = measure(args, &peer_name, &theirs, &[&peer], warm_up, None).await?;
            accumulate(&mut b, row)?;
        }
        if let (Some(a), Some(b)) = (a, b) {
            lines.push((a, b));
        }
    }
    peer.stop().await?;

    let rows: Vec<&Row> = lines.iter().flat_map(|(a, b)| [a, b]).collect();
    print_rows(
        &format!(
            "{} · ours vs peer (node oidc-provider, {} workers, JWT access tokens, nothing \
             persisted) · {} rounds A/B of {} s each, merged",
            backend.name(),
            args.peer_workers,
            args.peer_rounds,
            args.duration
        ),
        &rows,
    );
    println!(
        "{:<26} {:>12} {:>12} {:>14}",
        "ours / peer", "ops/s ratio", "p99 ratio", "CPU/1k ratio"
    );
    for (a, b) in &lines {
        let cpu_a = a.server_cpu / a.measured.ops.max(1) as f64;
        let cpu_b = b.server_cpu / b.measured.ops.max(1) as f64;
        println!(
            "{:<26} {:>12.2} {:>12.2} {:>14.2}",
            a.scenario,
            a.measured.throughput() / b.measured.throughput().max(f64::EPSILON),
            a.measured.millis(0.99) / b.measured.millis(0.99).max(f64::EPSILON),
            cpu_a / cpu_b.max(f64::EPSILON)
        );
    }
    Ok(())
}

async fn run_backend(args: &Args, backend: Backend, binary: PathBuf) -> Result<()> {
    let names = selected(args, backend)?;
    let work_dir = tempfile::tempdir()?;
    let database = match backend {
        Backend::Postgres => Some(PgDatabase::create(&args.pg_url).await?),
        Backend::Sqlite => None,
    };
    let url = database
        .as_ref()
        .map(|db| db.url(&args.pg_options))
        .unwrap_or_default();
    let mut spec = ServerSpec::new(binary, work_dir.path(), url)?;
    spec.log_filter = args.server_log.clone();
    spec.extra_config = args.server_config.clone();
    // fairness runs on a server of its own, with a tenant limit, and so do
    // vault.slow_provider and flood.slow_body (the latter with the default
    // limits).
    let (fair, names): (Vec<String>, Vec<String>) =
        names.into_iter().partition(|name| name == "fairness");
    let (slow, names): (Vec<String>, Vec<String>) = names
        .into_iter()
        .partition(|name| name == "vault.slow_provider");
    let (slow_body, names): (Vec<String>, Vec<String>) = names
        .into_iter()
        .partition(|name| name == "flood.slow_body");
    let (freezes, names): (Vec<String>, Vec<String>) = names
        .into_iter()
        .partition(|name| name == "freeze.cross_replica");
    let (replication, names): (Vec<String>, Vec<String>) = names
        .into_iter()
        .partition(|name| name == "replication.sync_standby");
    let mut outcome = if names.is_empty() {
        Ok(())
    } else {
        run_on(args, backend, &spec, &names).await
    };
    if outcome.is_ok() && !fair.is_empty() {
        let settings = fairness::Settings {
            tenant_limit: args.tenant_limit,
            victim_rate: args.victim_rate,
            flood_concurrency: args.flood_concurrency,
            connections: args.connections,
            duration: args.duration,
            warmup: args.warmup,
        };
        outcome = fairness::run(backend, &spec, &settings).await;
    }
    if outcome.is_ok() && !slow.is_empty() {
        let settings = slow_provider::Settings {
            provider_delay: Duration::from_millis(args.provider_delay_ms),
            slow_exchanges: args.slow_exchanges,
            victim_rate: args.victim_rate,
            connections: args.connections,
            duration: args.duration,
            warmup: args.warmup,
        };
        outcome = slow_provider::run(backend, &spec, &settings).await;
    }
    if outcome.is_ok() && !slow_body.is_empty() {
        let settings = flood::Settings {
            victim_rate: args.victim_rate,
            connections: args.connections,
            flood_connections: args.flood_connections,
            flood_streams: args.flood_streams,
            duration: args.duration,
            warmup: args.warmup,
        };
        outcome = flood::run(backend, &spec, &settings).await;
    }
    if outcome.is_ok() && !freezes.is_empty() {
        let settings = freeze::Settings {
            rounds: args.freeze_rounds,
            delegations: args.freeze_delegations,
            concurrency: args.concurrency,
        };
        outcome = freeze::run(backend, &spec, &settings).await;
    }
    if outcome.is_ok() && !replication.is_empty() {
        outcome = replication::run(args, &spec).await;
    }
    if let Some(database) = database {
        database.drop_now().await?;
    }
    if outcome.is_err() {
        eprintln!("server logs in {} (kept)", work_dir.keep().display());
    }
    outcome
}

async fn run_on(args: &Args, backend: Backend, spec: &ServerSpec, names: &[String]) -> Result<()> {
    let server = ServerProcess::start(spec, "primary").await?;
    // Idle: let startup's background work (sealer, sweeper, health) settle.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle_rss = server.rss_mib()?;
    eprintln!(
        "[{}] server pid {} (gRPC {}, HTTP {}) SERVING after {:.0} ms, idle RSS {idle_rss:.1} MiB",
        backend.name(),
        server.pid,
        server.grpc_addr,
        server.http_addr,
        server.startup.as_secs_f64() * 1000.0
    );
    let mut fixture = Fixture::set_up(&server).await?;
    let backlog = server::AuditBacklog::connect(&spec.database_url).await?;
    if names.iter().any(|n| n == "exchange.cached") {
        fixture.connect_account().await?;
    }
    let replica = if names.iter().any(|n| n == "stepup.cross_replica") {
        Some(ServerProcess::start(spec, "replica").await?)
    } else {
        None
    };
    let mut rows = Vec::new();
    for name in names {
        let scene = scene(args, &fixture, &server, replica.as_ref());
        eprintln!("[{}] {name}", backend.name());
        let op = scenarios::prepare(name, &scene).await?;
        let mut servers: Vec<&dyn CpuSource> = vec![&server];
        if name == "stepup.cross_replica"
            && let Some(replica) = &replica
        {
            servers.push(replica);
        }
        rows.push(measure(args, name, &op, &servers, args.warmup, Some(&backlog)).await?);
    }
    let load = match args.rate {
        Some(rate) => format!("open loop at {rate} ops/s"),
        None => format!(
            "closed loop, concurrency {} (step-up {})",
            args.concurrency, args.stepup_concurrency
        ),
    };
    print_table(
        &format!(
            "{} · {load} · {} connections · {} s measured after {} s warm-up · \
             startup to SERVING {:.0} ms · idle RSS {idle_rss:.1} MiB · RSS now {:.1} MiB",
            backend.name(),
            args.connections,
            args.duration,
            args.warmup,
            server.startup.as_secs_f64() * 1000.0,
            server.rss_mib()?
        ),
        &rows,
    );
    print_budget_overhead(&rows);
    if args.peer {
        let scene = scene(args, &fixture, &server, None);
        compare_with_peer(args, backend, &scene, names, &backlog).await?;
    }
    if args.watch_streams > 0 {
        hold_watch_streams(backend, &server, &fixture, args.watch_streams).await?;
    }
    if let Some(replica) = replica {
        replica.stop().await?;
    }
    backlog.close().await;
    server.stop().await?;
    Ok(())
}

/// Opens `count` approval-queue watches (100 per HTTP/2 connection, under
/// the server's per-connection stream limit), holds them, and prints the
/// server's RSS before and with them.
async fn hold_watch_streams(
    backend: Backend,
    server: &ServerProcess,
    fixture: &Fixture,
    count: usize,
) -> Result<()> {
    use futures::{StreamExt, TryStreamExt};
    const PER_CONNECTION: usize = 100;
    eprintln!("[{}] {count} watch streams", backend.name());
    let token = fixture.approver.bearer().await?;
    let mut clients = Vec::new();
    for _ in 0..count.div_ceil(PER_CONNECTION) {
        clients.push(server.anonymous().await?.with_bearer(token.clone()));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = server.rss_mib()?;
    let started = std::time::Instant::now();
    let clients = &clients;
    let streams: Vec<_> = futures::stream::iter(0..count)
        .map(|index| async move {
            let client = clients
                .get(index / PER_CONNECTION)
                .context("no connection for the stream")?;
            let request = client
                .request(vaultguard_client::pb::WatchPendingStepUpsRequest {
                    cursor: String::new(),
                    heartbeat_interval_seconds: 60,
                })
                .await?;
            // Answered headers: the server holds the stream.
            let stream = client
                .step_ups()
                .watch_pending_step_ups(request)
                .await?
                .into_inner();
            Ok::<_, anyhow::Error>(stream)
        })
        .buffer_unordered(256)
        .try_collect()
        .await?;
    let opened = started.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let held = server.rss_mib()?;
    println!(
        "{} · {} WatchPendingStepUps streams held open over {} connections (opened in {:.1} s) · \
         server RSS {before:.1} MiB before, {held:.1} MiB with them",
        backend.name(),
        streams.len(),
        clients.len(),
        opened.as_secs_f64()
    );
    drop(streams);
    Ok(())
}

async fn run(args: Args) -> Result<()> {
    if args.list {
        for name in scenarios::ALL {
            println!("{name}");
        }
        return Ok(());
    }
    let binary = server_binary(&args)?;
    if !args.scale.is_empty() {
        if !args.backend.contains(&Backend::Postgres) {
            bail!("--scale runs on PostgreSQL only: use --backend postgres");
        }
        if args.backend.contains(&Backend::Sqlite) {
            eprintln!("--scale: PostgreSQL only, sqlite skipped");
        }
        return scale::run(&args, binary).await;
    }
    for backend in &args.backend {
        run_backend(&args, *backend, binary.clone()).await?;
    }
    println!();
    println!(
        "stepup.* latency is ApproveStepUp sent → APPROVED received on the watch; \
         ops/s there counts whole request/approve/watch flows."
    );
    println!(
        "CPU-s/1k = CPU seconds (user + system) the server process (srv) or this \
         load tool (load) spent per 1,000 successful operations; db = every \
         PostgreSQL process (every replica's connections, the WAL writer, the \
         checkpointer); all = the whole machine (server, load tool, PostgreSQL, \
         kernel); busy% = the machine's \
         CPU in use (100 = every core saturated, so all CPU-s/1k bounds ops/s at \
         cores / all)."
    );
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    // The load tool gets the same two cores as the server; two workers keep
    // it from oversubscribing them.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(run(args))
}
