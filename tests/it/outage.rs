//! A database outage under load (PostgreSQL only; one SQLite file has no
//! network between the server and its database to cut).
//!
//! Replica A reaches PostgreSQL through a [`Proxy`] the test cuts for 12 s
//! (every established connection dropped, new ones refused, as from a
//! stopped PostgreSQL — stopping the real cluster would break every other
//! test running in parallel against it); replica B reaches it directly.
//! While A's database is gone, A's calls that need it fail fast with
//! UNAVAILABLE (within the configured acquire timeout plus a margin), its
//! health is NOT_SERVING, and nothing half-written is left; open step-up
//! watches on A stay open. After the restore A recovers by itself: health
//! SERVING, calls succeed, its LISTEN connection is back (an approval made
//! through B after the outage reaches a watch on A), and an approval made
//! through B DURING the outage is not lost (the watch on A that was open
//! throughout delivers it, with its token).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tonic::Code;
use tonic::transport::Endpoint;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use vaultguard_client::{ClientError, DelegationOutcome, VaultGuardClient, pb};
use vaultguard_server::store::entities::delegation;
use vaultguard_tests::{
    Backend, PendingStepUp, Proxy, StepUpWatch, TestOptions, TestServer, approve_step_up,
    request_step_up, watch_step_up,
};

use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};

use crate::crash::{
    AuditIndex, assert_chain_intact, assert_no_half_written_delegation, wait_all_sealed,
};
use crate::delegations::ask;
use crate::policies::{add_rule, inbound};
use vaultguard_tests::Rpc;
use vaultguard_tests::require_backend;

/// How long the database stays unreachable.
const OUTAGE: Duration = Duration::from_secs(12);
/// What a failing call may take beyond the configured acquire timeout.
const MARGIN: Duration = Duration::from_millis(1_500);

/// One call of the load: when it started and ended (relative to the test's
/// start) and how it ended.
#[derive(Debug, Clone)]
struct Call {
    what: &'static str,
    key: String,
    started: Duration,
    took: Duration,
    code: Option<Code>,
}

type Calls = Arc<Mutex<Vec<Call>>>;

fn record(
    calls: &Calls,
    what: &'static str,
    key: String,
    t0: Instant,
    started: Instant,
    code: Option<Code>,
) {
    calls.lock().expect("calls").push(Call {
        what,
        key,
        started: started - t0,
        took: started.elapsed(),
        code,
    });
}

fn code_of<T>(result: &Result<T, ClientError>) -> Option<Code> {
    match result {
        Ok(_) => None,
        Err(err) => Some(err.code().unwrap_or(Code::Unknown)),
    }
}

/// RequestDelegation ALLOW with a fresh key, over and over.
async fn allow_load(
    agent: VaultGuardClient,
    receiving: String,
    lane: usize,
    t0: Instant,
    stop: Arc<AtomicBool>,
    calls: Calls,
) {
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        let key = format!("load-{lane}-{n}");
        n += 1;
        let request = pb::RequestDelegationRequest {
            idempotency_key: key.clone(),
            ..ask(&receiving, "stock.read")
        };
        let started = Instant::now();
        let result =
            tokio::time::timeout(Duration::from_secs(30), agent.request_delegation(request))
                .await
                .expect("RequestDelegation hung for 30 s");
        if let Ok(outcome) = &result {
            assert!(matches!(outcome, DelegationOutcome::Allowed { .. }));
        }
        record(
            &calls,
            "RequestDelegation",
            key,
            t0,
            started,
            code_of(&result),
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// PollStepUp on a step-up nobody decides: AUTHORIZATION_PENDING or
/// SLOW_DOWN (FAILED_PRECONDITION) while the database answers.
async fn poll_load(
    agent: VaultGuardClient,
    auth_req_id: String,
    t0: Instant,
    stop: Arc<AtomicBool>,
    calls: Calls,
) {
    while !stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        let request = pb::PollStepUpRequest {
            auth_req_id: auth_req_id.clone(),
        };
        let result = tokio::time::timeout(Duration::from_secs(30), agent.poll_step_up(request))
            .await
            .expect("PollStepUp hung for 30 s");
        let code = code_of(&result);
        assert_ne!(code, None, "nobody approved the polled step-up");
        // A pending answer is the database answering.
        let code = code.filter(|c| *c != Code::FailedPrecondition);
        record(&calls, "PollStepUp", String::new(), t0, started, code);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Opens WatchStepUp on a pending step-up and reads its first status, over
/// and over.
async fn watch_load(
    agent: VaultGuardClient,
    auth_req_id: String,
    t0: Instant,
    stop: Arc<AtomicBool>,
    calls: Calls,
) {
    while !stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        let result = tokio::time::timeout(Duration::from_secs(30), async {
            let mut watch = watch_step_up(&agent, &auth_req_id, 1).await?;
            Ok::<_, ClientError>(watch.message().await?)
        })
        .await
        .expect("WatchStepUp hung for 30 s");
        record(
            &calls,
            "WatchStepUp",
            String::new(),
            t0,
            started,
            code_of(&result),
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub(crate) async fn overall_health(
    health: &mut HealthClient<tonic::transport::Channel>,
) -> ServingStatus {
    let response = health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("the health service answers without the database")
        .into_inner();
    ServingStatus::try_from(response.status).expect("a serving status")
}

/// Waits until A's overall health is `wanted`; returns how long it took.
async fn wait_health(
    health: &mut HealthClient<tonic::transport::Channel>,
    wanted: ServingStatus,
) -> Duration {
    let started = Instant::now();
    while overall_health(health).await != wanted {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "health did not turn {wanted:?} within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    started.elapsed()
}

/// The next status of a watch that must stay open, skipping heartbeats;
/// panics when it ends, fails or says nothing for `within`.
pub(crate) async fn next_status_within(
    watch: &mut StepUpWatch,
    within: Duration,
) -> pb::StepUpStatus {
    use pb::watch_step_up_response::Event;
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let message = tokio::time::timeout(left, watch.message())
            .await
            .unwrap_or_else(|_| panic!("no status within {within:?}"));
        match message {
            Ok(Some(pb::WatchStepUpResponse {
                event: Some(Event::Status(status)),
            })) => return status,
            Ok(Some(_)) => {}
            Ok(None) => panic!("the watch ended"),
            Err(status) => panic!("the watch failed: {:?}", ClientError::from(status)),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_only_a_database_outage_fails_fast_and_the_server_recovers_by_itself() {
    require_backend(Backend::Postgres);
    let proxy = Proxy::to_postgres().await;
    let a = TestServer::start_with(TestOptions {
        database_proxy: Some(proxy.addr),
        ..TestOptions::default()
    })
    .await;
    let b = TestServer::start_replica_of(&a).await;
    let acquire = Duration::from_millis(a.state.config.database_acquire_timeout_ms);
    let bound = acquire + MARGIN;

    let acme = a.create_tenant("acme").await;
    let globex = a.create_tenant("globex").await;
    let globex_admin = a.admin(&globex.id, "gina").await;
    add_rule(&globex_admin, inbound("stock.read", pb::Effect::Allow)).await;
    add_rule(&globex_admin, inbound("pay.*", pb::Effect::StepUp)).await;
    let (bot, _, agent_a) = a.create_agent(&acme.id, "bot").await;
    agent_a.bearer().await.expect("agent token");
    let approver_a = a.approver(&globex.id, "ann").await;
    let approver_b = b.approver(&globex.id, "bob").await;

    // Three step-ups: one decided during the outage, one after it, one never.
    let pay = |n: u32| ask(&globex.id, &format!("pay.n{n}"));
    let during: PendingStepUp = request_step_up(&agent_a, &approver_a, pay(1)).await;
    let after: PendingStepUp = request_step_up(&agent_a, &approver_a, pay(2)).await;
    let never: PendingStepUp = request_step_up(&agent_a, &approver_a, pay(3)).await;
    let mut watch_during = watch_step_up(&agent_a, &during.auth_req_id, 1)
        .await
        .unwrap();
    let mut watch_after = watch_step_up(&agent_a, &after.auth_req_id, 1)
        .await
        .unwrap();
    for watch in [&mut watch_during, &mut watch_after] {
        assert_eq!(
            next_status_within(watch, Duration::from_secs(5))
                .await
                .state(),
            pb::StepUpState::Pending
        );
    }
    let mut health = HealthClient::new(
        Endpoint::from_shared(a.grpc_url())
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    wait_health(&mut health, ServingStatus::Serving).await;

    // The load, on A.
    let t0 = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let calls: Calls = Arc::default();
    let mut load = Vec::new();
    for lane in 0..3 {
        load.push(tokio::spawn(allow_load(
            agent_a.clone(),
            globex.id.clone(),
            lane,
            t0,
            stop.clone(),
            calls.clone(),
        )));
    }
    load.push(tokio::spawn(poll_load(
        agent_a.clone(),
        never.auth_req_id.clone(),
        t0,
        stop.clone(),
        calls.clone(),
    )));
    load.push(tokio::spawn(watch_load(
        agent_a.clone(),
        never.auth_req_id.clone(),
        t0,
        stop.clone(),
        calls.clone(),
    )));
    tokio::time::sleep(Duration::from_secs(1)).await;

    // The outage.
    let cut_at = t0.elapsed();
    proxy.cut();
    let noticed = wait_health(&mut health, ServingStatus::NotServing).await;
    assert_eq!(
        reqwest::get(format!("{}/healthz", a.http_url()))
            .await
            .unwrap()
            .status(),
        reqwest::StatusCode::SERVICE_UNAVAILABLE
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    // A decision through B, which still reaches the database; A's watch
    // stays open meanwhile and must not lose it.
    approve_step_up(&approver_b, &during.step_up_id, &during.request_hash)
        .await
        .expect("approve through B during the outage");
    tokio::time::sleep(OUTAGE.saturating_sub(Duration::from_secs(2) + noticed)).await;
    let restore_at = t0.elapsed();
    proxy.restore();
    let recovered = wait_health(&mut health, ServingStatus::Serving).await;
    let recovered_at = t0.elapsed();

    // The decision made during the outage reaches A's watch, with a token.
    let status = next_status_within(&mut watch_during, Duration::from_secs(5)).await;
    assert_eq!(status.state(), pb::StepUpState::Approved, "{status:?}");
    assert!(
        !status.access_token.is_empty(),
        "the approved watch carries the token"
    );
    let resumed = t0.elapsed() - restore_at;
    // A decision after it reaches A through NOTIFY again, at once.
    let approved = Instant::now();
    approve_step_up(&approver_b, &after.step_up_id, &after.request_hash)
        .await
        .expect("approve through B after the outage");
    let status = next_status_within(&mut watch_after, Duration::from_secs(2)).await;
    assert_eq!(status.state(), pb::StepUpState::Approved);
    let notified = approved.elapsed();
    assert!(
        notified < Duration::from_secs(1),
        "NOTIFY after the outage took {notified:?}"
    );

    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await.expect("a load task failed");
    }
    let calls = calls.lock().expect("calls").clone();

    // Every call, whenever it ran, answered within the bound; while the
    // database was gone, every call failed with UNAVAILABLE; once health
    // said SERVING again, every call succeeded.
    let grace = Duration::from_millis(200);
    let (mut before, mut during_outage, mut after_outage, mut slowest_failure) =
        (0, 0, 0, Duration::ZERO);
    for call in &calls {
        assert!(call.took < bound, "{call:?} took longer than {bound:?}");
        if call.code.is_some() {
            slowest_failure = slowest_failure.max(call.took);
        }
        let ended = call.started + call.took;
        if call.started >= cut_at + grace && ended <= restore_at {
            during_outage += 1;
            assert_eq!(
                call.code,
                Some(Code::Unavailable),
                "during the outage: {call:?}"
            );
        } else if call.started >= recovered_at {
            after_outage += 1;
            assert_eq!(call.code, None, "after recovery: {call:?}");
        } else if ended <= cut_at {
            before += 1;
            assert_eq!(call.code, None, "before the outage: {call:?}");
        } else {
            // Straddling the cut or the restore: either answer, in time.
            assert!(
                matches!(call.code, None | Some(Code::Unavailable)),
                "around the cut or restore: {call:?}"
            );
        }
    }
    for what in ["RequestDelegation", "PollStepUp", "WatchStepUp"] {
        assert!(
            calls
                .iter()
                .any(|c| c.what == what && c.code == Some(Code::Unavailable)),
            "{what} failed during the outage"
        );
        assert!(
            calls
                .iter()
                .any(|c| c.what == what && c.code.is_none() && c.started >= recovered_at),
            "{what} succeeded after it"
        );
    }

    // No partial writes: a RequestDelegation that failed left nothing, or
    // (committed before the connection dropped) a complete delegation.
    wait_all_sealed(&a.state.db, Duration::from_secs(20)).await;
    let logs = [acme.id.as_str(), globex.id.as_str()];
    let audit = AuditIndex::load(&a.state.db, &logs).await;
    let (mut failed, mut committed_anyway) = (0, 0);
    for call in calls
        .iter()
        .filter(|c| c.what == "RequestDelegation" && c.code.is_some())
    {
        failed += 1;
        let rows = delegation::Entity::find()
            .filter(delegation::Column::RequestingAgentId.eq(bot.id.clone()))
            .filter(delegation::Column::IdempotencyKey.eq(call.key.clone()))
            .all(&a.state.db)
            .await
            .unwrap();
        if let Some(row) = rows.first() {
            committed_anyway += 1;
            assert_eq!(
                audit.in_both(logs, "delegation.token_issued", &row.id),
                [1, 1],
                "{call:?}"
            );
        }
    }
    let (delegations, active) = assert_no_half_written_delegation(&a.state.db, &audit, logs).await;
    let acme_admin = b.admin(&acme.id, "alice").await;
    let acme_links = assert_chain_intact(&a.state.db, &acme_admin, &acme.id).await;
    let globex_links = assert_chain_intact(&a.state.db, &globex_admin, &globex.id).await;

    eprintln!(
        "database outage (PostgreSQL, acquire timeout {acquire:?}): {outage:?} cut; NOT_SERVING \
         after {noticed:?}, SERVING {recovered:?} after the restore; {total} calls on A \
         ({before} before, {during_outage} during — all UNAVAILABLE, {after_outage} after — all \
         OK), slowest failure {slowest_failure:?} (bound {bound:?}); {failed} failed \
         RequestDelegations, {committed_anyway} of them committed whole; the approval made \
         during the outage reached A's open watch {resumed:?} after the restore, one made after \
         it in {notified:?}; {delegations} delegations ({active} ACTIVE), chains {acme_links} / \
         {globex_links} events, gapless and verified",
        outage = restore_at - cut_at,
        total = calls.len(),
    );
    b.stop().await;
    a.stop().await;
    proxy.stop();
}
