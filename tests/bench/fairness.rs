//! The `fairness` scenario: does a tenant flooding the server beyond its
//! tenant rate limit slow down another tenant?
//!
//! A server of its own with a per-tenant limit (`--tenant-limit`), three
//! fresh tenants: the victim, the flooder and a receiver whose inbound rule
//! allows `bench.*`. The victim's agent asks for ALLOW delegations at a
//! fixed arrival rate (`--victim-rate`, under the limit) twice: alone, then
//! while the flooder's agent asks for the same in a closed loop at
//! `--flood-concurrency` (far beyond its limit, so most of its calls are
//! refused with RESOURCE_EXHAUSTED). The flooder ignores RetryInfo (the
//! hostile case), so past its refusal budget the server paces its refusals
//! (`server/src/limits.rs`). Prints the victim's latency in both phases, the
//! ratio of the p99s (the issue asks for at most 2) and how many of the
//! flooder's refusals were paced (from the server's `/metrics`).

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use vaultguard_client::{DelegationOutcome, VaultGuardClient, pb};

use crate::fixture::{ALLOW_ACTION, Tenant, create_rule, create_tenant};
use crate::load::{self, Measured, Mode, Op, op};
use crate::server::{Backend, ServerProcess, ServerSpec};
use vaultguard_tests::Rpc;

/// What the scenario is run with.
pub struct Settings {
    /// Calls per second (and burst) each tenant may make.
    pub tenant_limit: u32,
    /// The victim's arrival rate, ops/s.
    pub victim_rate: f64,
    /// The flooder's closed-loop workers.
    pub flood_concurrency: usize,
    pub connections: usize,
    pub duration: f64,
    pub warmup: f64,
}

/// An agent of a fresh tenant `slug` on `connections` channels.
pub(crate) async fn agent_pool(
    server: &ServerProcess,
    operator: &VaultGuardClient,
    slug: &str,
    connections: usize,
) -> Result<Arc<Vec<VaultGuardClient>>> {
    let tenant = create_tenant(server, operator, slug, pb::TokenAlgorithm::Eddsa).await?;
    agent_clients(server, &tenant, &format!("{slug}-bot"), connections).await
}

/// A new agent `name` of `tenant` on `connections` channels, each holding
/// a token.
pub(crate) async fn agent_clients(
    server: &ServerProcess,
    tenant: &Tenant,
    name: &str,
    connections: usize,
) -> Result<Arc<Vec<VaultGuardClient>>> {
    let created = tenant
        .admin
        .create_agent(pb::CreateAgentRequest {
            name: name.to_owned(),
            description: String::new(),
        })
        .await?;
    let agent_id = created.agent.context("no agent")?.id;
    let mut clients = Vec::new();
    for _ in 0..connections.max(1) {
        let client = server
            .anonymous()
            .await?
            .with_client_credentials(agent_id.clone(), created.client_secret.clone());
        client.bearer().await?;
        clients.push(client);
    }
    Ok(Arc::new(clients))
}

/// The operator, a fresh receiving tenant `{prefix}-receiver` whose inbound
/// rule allows `bench.*`, and the ALLOW delegations a pool of
/// `{prefix}-victim` agents asks of it: the victim of every fairness
/// scenario.
pub(crate) async fn victim_of(
    server: &ServerProcess,
    prefix: &str,
    connections: usize,
) -> Result<(VaultGuardClient, String, Op)> {
    let operator = server.human("operator", None).await?;
    let algorithm = pb::TokenAlgorithm::Eddsa;
    let slug = format!("{prefix}-receiver");
    let receiver = create_tenant(server, &operator, &slug, algorithm).await?;
    create_rule(&receiver, "bench.*", pb::Effect::Allow, "").await?;
    let victim = agent_pool(server, &operator, &format!("{prefix}-victim"), connections).await?;
    let receiver_id = receiver.id.clone();
    Ok((operator, receiver_id.clone(), allow_op(victim, receiver_id)))
}

/// ALLOW delegations to `receiver` by the agents of `pool`, round-robin.
pub(crate) fn allow_op(pool: Arc<Vec<VaultGuardClient>>, receiver: String) -> Op {
    op(move |seq| {
        let (pool, receiver) = (pool.clone(), receiver.clone());
        async move {
            let index = usize::try_from(seq)? % pool.len();
            let agent = pool.get(index).context("empty pool")?;
            let outcome = agent
                .request_delegation(pb::RequestDelegationRequest {
                    receiving_tenant_id: receiver,
                    action: ALLOW_ACTION.to_owned(),
                    requested_ttl_seconds: 600,
                    ..Default::default()
                })
                .await?;
            ensure!(
                matches!(outcome, DelegationOutcome::Allowed { .. }),
                "not ALLOW"
            );
            Ok(None)
        }
    })
}

/// Refusals the server has paced so far (every scope), from `/metrics`.
async fn paced_refusals(server: &ServerProcess) -> Result<f64> {
    let text = reqwest::get(format!("http://{}/metrics", server.http_addr))
        .await?
        .error_for_status()?
        .text()
        .await?;
    let mut total = 0.0;
    for line in text.lines() {
        if line.starts_with("vaultguard_limit_paced_refusals_total")
            && let Some((_, value)) = line.rsplit_once(' ')
        {
            total += value.parse::<f64>().context("a counter's value")?;
        }
    }
    Ok(total)
}

/// A victim table: the header (`first` names the first column), then a
/// [`line`] per measurement.
pub(crate) fn table(first: &str, rows: &[(&str, &Measured)]) {
    println!(
        "{:<28} {:>8} {:>9} {:>8} {:>8} {:>8} {:>8}",
        first, "ops", "ops/s", "p50 ms", "p99 ms", "p999 ms", "errors"
    );
    for (name, m) in rows {
        line(name, m);
    }
}

/// One row of a victim table: ops, ops/s, p50/p99/p999 ms, errors.
pub(crate) fn line(name: &str, m: &Measured) {
    println!(
        "{:<28} {:>8} {:>9.0} {:>8.2} {:>8.2} {:>8.2} {:>8}",
        name,
        m.ops,
        m.throughput(),
        m.millis(0.50),
        m.millis(0.99),
        m.millis(0.999),
        m.errors
    );
}

/// Runs the scenario on a server of its own (`spec` with the tenant limit).
pub async fn run(backend: Backend, spec: &ServerSpec, settings: &Settings) -> Result<()> {
    let mut spec = spec.clone();
    spec.tenant_limit = Some((settings.tenant_limit, settings.tenant_limit));
    let server = ServerProcess::start(&spec, "fairness").await?;
    eprintln!(
        "[{}] fairness: tenant limit {}/s, victim at {} ops/s, flood at concurrency {}",
        backend.name(),
        settings.tenant_limit,
        settings.victim_rate,
        settings.flood_concurrency
    );
    let (operator, receiver_id, victim_op) =
        victim_of(&server, "fair", settings.connections).await?;
    let flooder = agent_pool(&server, &operator, "fair-flooder", settings.connections).await?;
    let flood_op = allow_op(flooder, receiver_id);
    let victim_mode = Mode::Open {
        rate: settings.victim_rate,
    };
    let duration = Duration::from_secs_f64(settings.duration);
    let warmup = Duration::from_secs_f64(settings.warmup);
    let seq = Arc::new(AtomicU64::new(0));

    // CPU cores busy in a phase: the server's and this load tool's
    // (victim and flooder alike), from /proc, over the phase's wall time.
    let own = || crate::server::cpu_seconds(std::process::id());
    let cores = |server_cpu: f64, load_cpu: f64, m: &Measured| {
        let wall = m.elapsed.as_secs_f64().max(f64::EPSILON);
        (server_cpu / wall, load_cpu / wall)
    };

    load::run(&victim_op, victim_mode, warmup, &seq).await?;
    let (server_before, load_before) = (server.cpu_seconds()?, own()?);
    let alone = load::run(&victim_op, victim_mode, duration, &seq).await?;
    let alone_cores = cores(
        server.cpu_seconds()? - server_before,
        own()? - load_before,
        &alone,
    );

    let paced_before = paced_refusals(&server).await?;
    let flood = {
        let (flood_op, seq) = (flood_op.clone(), seq.clone());
        let mode = Mode::Closed {
            concurrency: settings.flood_concurrency,
        };
        tokio::spawn(async move { load::run(&flood_op, mode, warmup + duration, &seq).await })
    };
    tokio::time::sleep(warmup).await;
    let (server_before, load_before) = (server.cpu_seconds()?, own()?);
    let flooded = load::run(&victim_op, victim_mode, duration, &seq).await?;
    let flooded_cores = cores(
        server.cpu_seconds()? - server_before,
        own()? - load_before,
        &flooded,
    );
    let flood = flood.await??;
    let paced = paced_refusals(&server).await? - paced_before;

    println!();
    println!(
        "{} · fairness · tenant limit {}/s (burst {}) · victim open loop {} ops/s · flooder \
         closed loop, concurrency {} · {} s measured after {} s warm-up",
        backend.name(),
        settings.tenant_limit,
        settings.tenant_limit,
        settings.victim_rate,
        settings.flood_concurrency,
        settings.duration,
        settings.warmup
    );
    table(
        "delegation.allow",
        &[
            ("victim, alone", &alone),
            ("victim, during the flood", &flooded),
            ("flooder (errors = refused)", &flood),
        ],
    );
    if let Some(error) = &flood.first_error {
        println!("  flooder's first error: {error}");
    }
    for (name, m) in [("alone", &alone), ("flooded", &flooded)] {
        if let Some(error) = &m.first_error {
            println!("  victim ({name}) first error: {error}");
        }
    }
    println!(
        "cores busy (of {}): alone server {:.2} + load tool {:.2}; during the flood server {:.2} + \
         load tool {:.2} (PostgreSQL not counted)",
        std::thread::available_parallelism().map_or(0, usize::from),
        alone_cores.0,
        alone_cores.1,
        flooded_cores.0,
        flooded_cores.1
    );
    let ratio = flooded.millis(0.99) / alone.millis(0.99).max(f64::EPSILON);
    let flood_seconds = flood.elapsed.as_secs_f64().max(f64::EPSILON);
    println!(
        "victim p99 during the flood / alone: {:.2} / {:.2} ms = {ratio:.2}x \
         (flooder admitted {:.0}/s, refused {:.0}/s, of which paced {:.0}/s)",
        flooded.millis(0.99),
        alone.millis(0.99),
        flood.throughput(),
        flood.errors as f64 / flood_seconds,
        paced / flood_seconds
    );
    server.stop().await
}
