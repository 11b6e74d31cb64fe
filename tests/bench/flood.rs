//! The `flood.slow_body` scenario (issue 23, item 3): does an
//! unauthenticated slow-body flood slow down an authenticated caller?
//!
//! A server of its own with every limit at its default (1,024 concurrent
//! requests, 256 streams per connection, a 10 s request-body deadline),
//! two fresh tenants: the victim and a receiver whose inbound rule allows
//! `bench.*`. The victim's agent asks for ALLOW delegations at a fixed
//! arrival rate (`--victim-rate`) twice: alone, then while a raw HTTP/2
//! client holds `--flood-connections` × `--flood-streams` IssueToken calls
//! (5 × 256 by default: the flood of the issue), each sending its headers
//! and a gRPC frame prefix announcing 100 bytes that never come, and
//! opening a new one whenever the server answers one. Before the fix the
//! flood held every concurrency slot and the victim got UNAVAILABLE; the
//! issue asks for the victim's p99 during the flood within 2× its p99
//! alone. Prints both, their ratio, the flood's answers and the server's
//! CPU and resident memory in each phase.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Result;
use vaultguard_tests::slow_body::{Flood, FloodSpec};

use crate::fairness::{table, victim_of};
use crate::load::{self, Measured, Mode};
use crate::server::{Backend, ServerProcess, ServerSpec};

/// What the scenario is run with.
pub struct Settings {
    /// The victim's arrival rate, ops/s.
    pub victim_rate: f64,
    /// The victim's gRPC channels.
    pub connections: usize,
    /// HTTP/2 connections of the flood.
    pub flood_connections: usize,
    /// Calls the flood holds on each connection.
    pub flood_streams: usize,
    pub duration: f64,
    pub warmup: f64,
}

/// A phase's server CPU (cores busy) and resident memory at its end.
struct Phase {
    measured: Measured,
    server_cores: f64,
    rss_mib: f64,
}

async fn phase(
    server: &ServerProcess,
    op: &load::Op,
    mode: Mode,
    duration: Duration,
    seq: &Arc<AtomicU64>,
) -> Result<Phase> {
    let before = server.cpu_seconds()?;
    let measured = load::run(op, mode, duration, seq).await?;
    let wall = measured.elapsed.as_secs_f64().max(f64::EPSILON);
    Ok(Phase {
        server_cores: (server.cpu_seconds()? - before) / wall,
        rss_mib: server.rss_mib()?,
        measured,
    })
}

/// Runs the scenario on a server of its own (`spec` with default limits).
pub async fn run(backend: Backend, spec: &ServerSpec, settings: &Settings) -> Result<()> {
    let mut spec = spec.clone();
    spec.default_limits = true;
    let server = ServerProcess::start(&spec, "flood").await?;
    let total = settings.flood_connections * settings.flood_streams;
    eprintln!(
        "[{}] flood.slow_body: victim at {} ops/s, flood of {} × {} IssueToken calls",
        backend.name(),
        settings.victim_rate,
        settings.flood_connections,
        settings.flood_streams
    );
    let (_, _, victim_op) = victim_of(&server, "flood", settings.connections).await?;
    let mode = Mode::Open {
        rate: settings.victim_rate,
    };
    let duration = Duration::from_secs_f64(settings.duration);
    let warmup = Duration::from_secs_f64(settings.warmup);
    let seq = Arc::new(AtomicU64::new(0));

    load::run(&victim_op, mode, warmup, &seq).await?;
    let alone = phase(&server, &victim_op, mode, duration, &seq).await?;

    let flood = Flood::start(FloodSpec::issue_token(
        server.grpc_addr,
        settings.flood_connections,
        settings.flood_streams,
    ))
    .await?;
    flood.wait_open(Duration::from_secs(60)).await?;
    // The flood's calls are all open and waiting: warm up again under it.
    load::run(&victim_op, mode, warmup, &seq).await?;
    let opened_before = flood.counts.opened.load(Ordering::Relaxed);
    let flooded = phase(&server, &victim_op, mode, duration, &seq).await?;
    let opened = flood.counts.opened.load(Ordering::Relaxed) - opened_before;
    let answers = flood.counts.snapshot();
    flood.stop().await;

    println!();
    println!(
        "{} · flood.slow_body · every limit at its default · victim open loop {} ops/s · flood \
         {} connections × {} IssueToken calls ({total}) with a 5-byte prefix announcing 100 \
         bytes, reopened when answered · {} s measured after {} s warm-up",
        backend.name(),
        settings.victim_rate,
        settings.flood_connections,
        settings.flood_streams,
        settings.duration,
        settings.warmup
    );
    table(
        "delegation.allow",
        &[
            ("victim, alone", &alone.measured),
            ("victim, during the flood", &flooded.measured),
        ],
    );
    for (name, p) in [("alone", &alone), ("flooded", &flooded)] {
        if let Some(error) = &p.measured.first_error {
            println!("  victim ({name}) first error: {error}");
        }
    }
    println!(
        "server: alone {:.2} cores, RSS {:.1} MiB; during the flood {:.2} cores, RSS {:.1} MiB",
        alone.server_cores, alone.rss_mib, flooded.server_cores, flooded.rss_mib
    );
    println!(
        "flood: {total} calls held open; {opened} opened during the measurement; answers so \
         far by grpc-status: {answers:?} (4 = DEADLINE_EXCEEDED)"
    );
    let ratio = flooded.measured.millis(0.99) / alone.measured.millis(0.99).max(f64::EPSILON);
    println!(
        "victim p99 during the flood / alone: {:.2} / {:.2} ms = {ratio:.2}x",
        flooded.measured.millis(0.99),
        alone.measured.millis(0.99),
    );
    server.stop().await
}
