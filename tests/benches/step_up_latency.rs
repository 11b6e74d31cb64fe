//! Approve → watcher latency of step-ups: how long after an approver sends
//! ApproveStepUp the requesting agent's open WatchStepUp stream delivers the
//! APPROVED event with its token.
//!
//! Same-replica: the approval and the watch go to one server. Cross-replica
//! (only with `VAULTGUARD_TEST_DB=postgres`): the approval goes to server A
//! and the watch to server B on the same database, so the change travels
//! through PostgreSQL LISTEN/NOTIFY. Each sample opens a watch, waits for its
//! first (PENDING) message, then times from just before ApproveStepUp is
//! sent to the APPROVED message: the approval's round trip, the fan-out, the
//! watcher's re-read and the redemption (token signing) included.
//!
//! ```sh
//! VAULTGUARD_TEST_DB=postgres CARGO_TARGET_DIR=/var/tmp/vaultguard-target \
//!   cargo bench -p vaultguard-tests --bench step_up_latency
//! ```
//!
//! `VG_BENCH_N` sets the samples per scenario (default 200).
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::time::{Duration, Instant};

use vaultguard_client::{VaultGuardClient, pb};
use vaultguard_tests::Rpc;
use vaultguard_tests::{
    Backend, TestServer, approve_step_up, backend, next_status, request_step_up, watch_step_up,
};

/// Samples taken and thrown away before each scenario's measurement.
const WARM_UP: usize = 5;

/// The parties every scenario uses, set up once on the first server.
struct Parties {
    requesting_tenant: String,
    receiving_tenant: String,
    agent_id: String,
    agent_secret: String,
}

impl Parties {
    /// Two tenants, an agent of the first, and a rule of the second making
    /// every `pay.*` request a step-up with a quorum of one.
    async fn set_up(server: &TestServer) -> Self {
        let requesting = server.create_tenant("bench-requester").await;
        let receiving = server.create_tenant("bench-receiver").await;
        let (agent, agent_secret, _) = server.create_agent(&requesting.id, "bench-bot").await;
        let admin = server.admin(&receiving.id, "bench-admin").await;
        let step_up_rule = pb::CreateRuleRequest {
            rule: Some(pb::Rule {
                direction: pb::RuleDirection::Inbound as i32,
                action_pattern: "pay.*".to_owned(),
                effect: pb::Effect::StepUp as i32,
                approvals_required: 1,
                ..Default::default()
            }),
        };
        admin
            .create_rule(step_up_rule)
            .await
            .expect("the STEP_UP rule");
        Self {
            requesting_tenant: requesting.id,
            receiving_tenant: receiving.id,
            agent_id: agent.id,
            agent_secret,
        }
    }

    /// The agent, talking to `server`.
    async fn agent_on(&self, server: &TestServer) -> VaultGuardClient {
        server
            .anonymous()
            .await
            .with_client_credentials(self.agent_id.clone(), self.agent_secret.clone())
    }

    /// An approver of the receiving tenant, talking to `server`.
    async fn approver_on(&self, server: &TestServer) -> VaultGuardClient {
        server
            .approver(&self.receiving_tenant, "bench-approver")
            .await
    }

    fn payment(&self) -> pb::RequestDelegationRequest {
        pb::RequestDelegationRequest {
            receiving_tenant_id: self.receiving_tenant.clone(),
            action: "pay.invoice".to_owned(),
            requested_ttl_seconds: 300,
            binding_message: format!("bench payment for {}", self.requesting_tenant),
            ..Default::default()
        }
    }
}

/// One approve → APPROVED latency: the agent (on the watch side) requests a
/// step-up and watches it; the approver (on the approve side) approves.
async fn sample(
    parties: &Parties,
    agent: &VaultGuardClient,
    approver: &VaultGuardClient,
) -> Duration {
    let step = request_step_up(agent, approver, parties.payment()).await;
    // Heartbeats every 60 s: only the approval can wake the watch.
    let mut watch = watch_step_up(agent, &step.auth_req_id, 60)
        .await
        .expect("open the watch");
    let first = next_status(&mut watch).await;
    assert_eq!(first.state(), pb::StepUpState::Pending, "first message");
    let started = Instant::now();
    approve_step_up(approver, &step.step_up_id, &step.request_hash)
        .await
        .expect("approve");
    let event = next_status(&mut watch).await;
    let latency = started.elapsed();
    assert_eq!(event.state(), pb::StepUpState::Approved, "after approval");
    assert!(!event.access_token.is_empty(), "APPROVED carries the token");
    latency
}

/// One row of the table.
struct Row {
    scenario: &'static str,
    n: usize,
    p50: Duration,
    p99: Duration,
    max: Duration,
}

/// The nearest-rank `percent` percentile of sorted `samples`.
fn percentile(samples: &[Duration], percent: usize) -> Duration {
    let rank = (samples.len() * percent).div_ceil(100).max(1);
    samples[rank - 1]
}

async fn scenario(
    name: &'static str,
    parties: &Parties,
    approve_on: &TestServer,
    watch_on: &TestServer,
    n: usize,
) -> Row {
    let agent = parties.agent_on(watch_on).await;
    let approver = parties.approver_on(approve_on).await;
    for _ in 0..WARM_UP {
        sample(parties, &agent, &approver).await;
    }
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        samples.push(sample(parties, &agent, &approver).await);
    }
    samples.sort();
    Row {
        scenario: name,
        n,
        p50: percentile(&samples, 50),
        p99: percentile(&samples, 99),
        max: samples[n - 1],
    }
}

fn millis(duration: Duration) -> String {
    format!("{:.2}", duration.as_secs_f64() * 1000.0)
}

async fn run() {
    let n = std::env::var("VG_BENCH_N")
        .ok()
        .map(|v| v.parse::<usize>().expect("VG_BENCH_N is a count"))
        .unwrap_or(200)
        .max(1);
    let backend = backend();
    let backend_name = match backend {
        Backend::Sqlite => "sqlite",
        Backend::Postgres => "postgres",
    };
    let first = TestServer::start().await;
    let parties = Parties::set_up(&first).await;
    let mut rows = vec![scenario("same-replica", &parties, &first, &first, n).await];
    let second = if backend == Backend::Postgres {
        let second = TestServer::start_replica_of(&first).await;
        rows.push(scenario("cross-replica", &parties, &first, &second, n).await);
        Some(second)
    } else {
        eprintln!("cross-replica: skipped (set VAULTGUARD_TEST_DB=postgres)");
        None
    };

    println!();
    println!("approve → watcher latency (ApproveStepUp sent → APPROVED received)");
    println!(
        "{:<14} {:<9} {:>5} {:>9} {:>9} {:>9}",
        "scenario", "backend", "n", "p50 ms", "p99 ms", "max ms"
    );
    for row in &rows {
        println!(
            "{:<14} {:<9} {:>5} {:>9} {:>9} {:>9}",
            row.scenario,
            backend_name,
            row.n,
            millis(row.p50),
            millis(row.p99),
            millis(row.max)
        );
    }
    println!();

    if let Some(second) = second {
        second.stop().await;
    }
    first.stop().await;
}

fn main() {
    // Warnings only: the harness's debug log (mirrored to stderr) would bury
    // the table and slow the server down. Installed first, it wins over the
    // harness's own subscriber.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("warn"))
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .try_init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(run());
}
