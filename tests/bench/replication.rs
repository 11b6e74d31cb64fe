//! The `replication.sync_standby` scenario (PostgreSQL only): what a
//! synchronous standby costs the ALLOW path.
//!
//! `scripts/pg-ha.sh` starts a pg_auto_failover formation on this machine
//! (a monitor, a primary and a standby, each its own PostgreSQL); one
//! `vaultguard serve` runs on its multi-host URL. ALLOW EdDSA is measured
//! with the standby asynchronous and with it synchronous (every commit
//! waits for the standby's flush: `synchronous_standby_names` set, the
//! setting issue 27's "nothing acknowledged is lost" needs), switching the
//! same formation between the two, `--peer-rounds` rounds in alternating
//! order (the second side of a pair loses a little on this machine
//! whatever it is), so both sides share the server, the database and the
//! machine. Both figures and their ratio are printed.

use anyhow::Result;
use vaultguard_tests::pg_ha::Formation;

use crate::fixture::Fixture;
use crate::server::{ServerProcess, ServerSpec};
use crate::{Args, Row, measure, print_table, scenarios, scene};

/// The formation's monitor port; its nodes take the next two.
const BASE_PORT: u16 = 56_432;

/// The scenario measured on both sides.
const SCENARIO: &str = "delegation.allow.eddsa";

pub async fn run(args: &Args, template: &ServerSpec) -> Result<()> {
    eprintln!("[postgres-ha] replication.sync_standby: starting a pg_auto_failover formation");
    let formation = Formation::up(BASE_PORT, false).await?;
    let mut spec = template.clone();
    spec.database_url = formation.url.clone();
    spec.work_dir = template.work_dir.join("ha");
    std::fs::create_dir_all(&spec.work_dir)?;
    let server = ServerProcess::start(&spec, "ha").await?;
    let fixture = Fixture::set_up(&server).await?;
    let scene = scene(args, &fixture, &server, None);
    let op = scenarios::prepare(SCENARIO, &scene).await?;

    let mut rows: Vec<Row> = Vec::new();
    let rounds = args.peer_rounds.max(1);
    for round in 0..rounds {
        let order = if round % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for synchronous in order {
            formation
                .call(&["sync", if synchronous { "on" } else { "off" }])
                .await?;
            let label = if synchronous {
                "allow.eddsa · sync standby"
            } else {
                "allow.eddsa · async standby"
            };
            eprintln!("[postgres-ha] {label} (round {})", round + 1);
            let mut row = measure(args, SCENARIO, &op, &[&server], args.warmup, None).await?;
            row.scenario = label.to_owned();
            rows.push(row);
        }
    }
    print_table(
        &format!(
            "postgres-ha (pg_auto_failover: primary + one standby on this machine) · closed loop, \
             concurrency {} · {} connections · {rounds} rounds per side, alternating · {} s \
             measured after {} s warm-up",
            args.concurrency, args.connections, args.duration, args.warmup
        ),
        &rows,
    );
    let side = |synchronous: bool| {
        rows.iter()
            .filter(move |row| row.scenario.ends_with("· sync standby") == synchronous)
    };
    let geo = |values: Vec<f64>| {
        let n = values.len().max(1) as f64;
        (values.iter().map(|v| v.max(f64::EPSILON).ln()).sum::<f64>() / n).exp()
    };
    let ops = |synchronous: bool| geo(side(synchronous).map(|r| r.measured.throughput()).collect());
    let p99 = |synchronous: bool| geo(side(synchronous).map(|r| r.measured.millis(0.99)).collect());
    println!(
        "synchronous standby: ALLOW EdDSA {:.0} vs {:.0} ops/s ({:.2}x), p99 {:.1} vs {:.1} ms \
         ({:.2}x) of the same formation with the standby asynchronous (geometric means of \
         {rounds} rounds each)",
        ops(true),
        ops(false),
        ops(true) / ops(false).max(f64::EPSILON),
        p99(true),
        p99(false),
        p99(true) / p99(false).max(f64::EPSILON),
    );
    server.stop().await?;
    drop(formation);
    Ok(())
}
