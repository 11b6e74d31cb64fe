//! Losing the PostgreSQL primary (PostgreSQL only). A real pg_auto_failover
//! formation runs on this machine (`scripts/pg-ha.sh`: a monitor, a primary
//! and a synchronous standby, each its own PostgreSQL with its own data
//! directory and port). Two VaultGuard replicas (the real binary, separate
//! processes) are configured with the libpq multi-host URL of both nodes and
//! serve the crash test's mixed load: ALLOW, revoke, STEP_UP with approval
//! and token pick-up through a watch, Sign; clients alternate between the
//! replicas and retry what was not answered with the same idempotency key.
//! Then, several times, the primary's machine dies (its keeper and its
//! postmaster SIGKILLed at once, so nothing restarts it), the monitor
//! promotes the standby, and both replicas must find it by themselves: the
//! time from SIGKILL until a write through each replica succeeds is
//! measured. A step-up watch held open on each replica across the failover
//! must deliver the approval made afterwards through the other replica.
//! The dead node then rejoins as the new synchronous standby.
//!
//! Afterwards the crash test's checks run ([`assert_nothing_lost`]): every
//! call a client saw succeed is there with its audit events (synchronous
//! replication: nothing acknowledged was lost), nothing is half-written,
//! every retried key replays its one delegation and token id, both chains
//! are gapless and verify.
//!
//! `VAULTGUARD_FAILOVERS` sets how many failovers (2 by default, so the
//! suite stays quick; the closing figures use more).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic::transport::Endpoint;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use vaultguard_client::{DelegationOutcome, pb};
use vaultguard_tests::pg_ha::Formation;
use vaultguard_tests::{
    Backend, PendingStepUp, StepUpWatch, approve_step_up, get_step_up, request_step_up,
    require_backend, watch_step_up,
};

use crate::crash::{Checked, Fixture, Load, allow_request, assert_nothing_lost, jitter};
use crate::outage::{next_status_within, overall_health};

/// Failovers when `VAULTGUARD_FAILOVERS` is not set.
const DEFAULT_FAILOVERS: usize = 2;

/// The formation's monitor port; the nodes take the next two.
const BASE_PORT: u16 = 55_432;

/// When replica `replica`'s health first said NOT_SERVING after the kill
/// (if the probe saw the outage at all), and when a write through it first
/// succeeded again.
struct Recovery {
    not_serving: Option<Duration>,
    /// When health said SERVING again after NOT_SERVING.
    serving: Option<Duration>,
    writable: Duration,
}

async fn recovery(fx: &Fixture, replica: usize, killed_at: Instant, round: usize) -> Recovery {
    let channel = Endpoint::from_shared(fx.grpc_url(replica))
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let mut health = HealthClient::new(channel);
    let agent = fx.reader_on(replica).await;
    let mut not_serving = None;
    let mut serving = None;
    for attempt in 0.. {
        assert!(
            killed_at.elapsed() < Duration::from_secs(90),
            "replica {replica} took no write within 90 s of the kill"
        );
        if overall_health(&mut health).await == ServingStatus::NotServing {
            not_serving.get_or_insert(killed_at.elapsed());
        } else {
            if not_serving.is_some() {
                serving.get_or_insert(killed_at.elapsed());
            }
            let key = format!("probe-{round}-{replica}-{attempt}");
            let wrote = tokio::time::timeout(
                Duration::from_secs(10),
                agent.request_delegation(allow_request(&fx.globex, &key)),
            )
            .await
            .expect("a probe write hung for 10 s");
            if let Ok(DelegationOutcome::Allowed { .. }) = wrote {
                return Recovery {
                    not_serving,
                    serving,
                    writable: killed_at.elapsed(),
                };
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    unreachable!()
}

/// A step-up pending on replica `replica` with a watch open on it.
async fn held_watch(fx: &Fixture, replica: usize, round: usize) -> (PendingStepUp, StepUpWatch) {
    let agent = fx.stepper_on(replica).await;
    let approver = fx.human_on(replica, &fx.globex_approver).await;
    let request = pb::RequestDelegationRequest {
        action: "stock.write".to_owned(),
        ..allow_request(&fx.globex, &format!("held-{round}-{replica}"))
    };
    let pending = request_step_up(&agent, &approver, request).await;
    let mut watch = watch_step_up(&agent, &pending.auth_req_id, 1)
        .await
        .expect("open the watch");
    assert_eq!(
        next_status_within(&mut watch, Duration::from_secs(5))
            .await
            .state(),
        pb::StepUpState::Pending
    );
    (pending, watch)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_only_losing_the_primary_loses_nothing_acknowledged() {
    require_backend(Backend::Postgres);
    let failovers = std::env::var("VAULTGUARD_FAILOVERS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(DEFAULT_FAILOVERS);
    let started = Instant::now();
    let formation = Formation::up(BASE_PORT, true)
        .await
        .expect("a pg_auto_failover formation");
    let formed = started.elapsed();
    let fx = Arc::new(Fixture::set_up_on(Some(formation.url.clone()), 2).await);
    let _replicas = [fx.spawn(0).await, fx.spawn(1).await];

    let load = Load::start(&fx);

    let mut recovered: Vec<Duration> = Vec::new();
    let mut serving_again: Vec<Duration> = Vec::new();
    let mut noticed = 0;
    let mut promoted: Vec<String> = Vec::new();
    let mut rejoins: Vec<String> = Vec::new();
    let mut watches_resumed = 0;
    for round in 0..failovers {
        tokio::time::sleep(jitter(2_000, 4_000)).await;
        let held = [
            held_watch(&fx, 0, round).await,
            held_watch(&fx, 1, round).await,
        ];

        let killed_at = Instant::now();
        let node = formation
            .call(&["kill-primary"])
            .await
            .expect("kill the primary");
        let promotion = async {
            formation
                .call(&["wait-primary"])
                .await
                .expect("the standby promoted")
        };
        let (a, b, promotion) = tokio::join!(
            recovery(&fx, 0, killed_at, round),
            recovery(&fx, 1, killed_at, round),
            promotion
        );
        promoted.push(promotion);
        for replica in [a, b] {
            noticed += usize::from(replica.not_serving.is_some());
            serving_again.extend(replica.serving);
            recovered.push(replica.writable);
        }

        // Each held watch survived the failover: an approval made through
        // the other replica after it reaches the watch, with its token.
        for (replica, (pending, mut watch)) in held.into_iter().enumerate() {
            let approver = fx.human_on(1 - replica, &fx.globex_approver).await;
            let shown = get_step_up(&approver, &pending.step_up_id)
                .await
                .expect("GetStepUp after the failover");
            approve_step_up(&approver, &pending.step_up_id, &shown.request_hash)
                .await
                .expect("approve after the failover");
            let status = next_status_within(&mut watch, Duration::from_secs(10)).await;
            assert_eq!(status.state(), pb::StepUpState::Approved, "{status:?}");
            assert!(
                !status.access_token.is_empty(),
                "the watch carries the token"
            );
            watches_resumed += 1;
        }
        rejoins.push(
            formation
                .call(&["rejoin", &node])
                .await
                .expect("the old primary rejoins"),
        );
    }

    tokio::time::sleep(Duration::from_secs(2)).await;
    let seen = load.finish().await;
    let Checked {
        delegations,
        active,
        replayed,
        signatures,
        acme_links,
        globex_links,
        ..
    } = assert_nothing_lost(&fx, &seen).await;

    recovered.sort();
    serving_again.sort();
    let acknowledged = seen.allowed.len()
        + seen.revoked.len()
        + seen.stepped_up.len()
        + seen.approved.len()
        + seen.signed.len();
    eprintln!(
        "failover: {failovers} primary losses (SIGKILL of keeper and postmaster), formation up in \
         {formed:?}, total {total:?}\n  \
         SIGKILL → a write succeeds through the replica (both replicas, {n} samples): p50 \
         {p50:?}, p99 {p99:?}, max {max:?}; health NOT_SERVING seen {noticed} of {n} times, SERVING again \
         after p50 {s50:?}, p99 {s99:?}\n  \
         promotion seen by the monitor after (s): {promoted:?}; rejoin as synchronous standby \
         (s): {rejoins:?}\n  \
         acknowledged writes: {acknowledged} ({allowed} ALLOW, {revoked} revokes, {stepped} \
         STEP_UP, {approved} approvals, {signed} signatures), 0 lost; idempotent retries: {retried} \
         replayed identically ({replayed} had committed before the loss); {watches_resumed} held \
         watches delivered the approval after the failover; {attempts} attempts met no primary\n  \
         database: {delegations} delegations ({active} ACTIVE), {signatures} signatures, chains \
         acme {acme_links} / globex {globex_links} events, gapless and verified",
        total = started.elapsed(),
        n = recovered.len(),
        p50 = percentile(&recovered, 0.50),
        p99 = percentile(&recovered, 0.99),
        max = recovered.last().copied().unwrap_or_default(),
        s50 = percentile(&serving_again, 0.50),
        s99 = percentile(&serving_again, 0.99),
        allowed = seen.allowed.len(),
        revoked = seen.revoked.len(),
        stepped = seen.stepped_up.len(),
        approved = seen.approved.len(),
        signed = seen.signed.len(),
        retried = seen.retried.len(),
        attempts = seen.failed_attempts,
    );
    assert!(
        seen.failed_attempts > 0,
        "the failovers interrupted calls (else the test proved nothing)"
    );
    assert!(!seen.allowed.is_empty() && !seen.signed.is_empty() && !seen.approved.is_empty());
}
