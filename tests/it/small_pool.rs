//! A server on the smallest database pool it accepts still serves every hot
//! path at once: group-committed ALLOW delegations from several tenants, the
//! sealer sealing several tenants' chains at a time, step-up approvals (a
//! transaction and a token signed beside it) watched to the token, and
//! Verify. Nothing may wait for a second connection while it holds the only
//! free one (that would stall until the acquire timeout and fail the call).

use std::time::Duration;

use vaultguard_client::{DelegationOutcome, VaultGuardClient, pb};
use vaultguard_server::config::Config;
use vaultguard_server::store::{self, MIN_POSTGRES_CONNECTIONS};
use vaultguard_tests::{TestServer, approve_step_up, next_status, request_step_up, watch_step_up};

use crate::crash::{assert_chain_intact, wait_all_sealed};
use crate::delegations::ask;
use crate::limits::no_limits;
use crate::policies::{add_rule, inbound};

/// The smallest pool the server accepts, and no rate limit to refuse a
/// call for another reason.
fn small_pool(config: &mut Config) {
    no_limits(config);
    config.database_max_connections = MIN_POSTGRES_CONNECTIONS;
}

const REQUESTERS: usize = 4;
const ALLOWS_PER_AGENT: usize = 25;
const STEP_UPS: usize = 4;

#[tokio::test]
async fn every_hot_path_runs_at_once_on_the_smallest_pool() {
    let server = TestServer::start_adjusted(small_pool).await;
    let globex = server.create_tenant("globex").await;
    let globex_admin = server.admin(&globex.id, "gina").await;
    add_rule(&globex_admin, inbound("stock.read", pb::Effect::Allow)).await;
    add_rule(&globex_admin, inbound("pay.*", pb::Effect::StepUp)).await;
    let approver = server.approver(&globex.id, "ann").await;

    let mut requesters: Vec<(pb::Tenant, VaultGuardClient, VaultGuardClient)> = Vec::new();
    for n in 0..REQUESTERS {
        let tenant = server.create_tenant(&format!("req{n}")).await;
        let (_, _, agent) = server.create_agent(&tenant.id, "bot").await;
        let admin = server.admin(&tenant.id, "admin").await;
        requesters.push((tenant, agent, admin));
    }

    // Each requesting tenant's agent asks for ALLOW delegations and verifies
    // nothing itself; globex verifies each token as it arrives.
    let mut tasks = Vec::new();
    for (_, agent, _) in &requesters {
        let (agent, verifier, receiving) = (agent.clone(), globex_admin.clone(), globex.id.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..ALLOWS_PER_AGENT {
                let outcome = agent
                    .request_delegation(ask(&receiving, "stock.read"))
                    .await
                    .expect("RequestDelegation on the small pool");
                let DelegationOutcome::Allowed { grant, .. } = outcome else {
                    panic!("stock.read was not allowed: {outcome:?}");
                };
                let answer = verifier
                    .verify(grant.token.clone(), "stock.read")
                    .await
                    .expect("VerifyDelegationToken on the small pool");
                assert!(answer.active, "a fresh token verifies active");
            }
        }));
    }
    // Meanwhile step-ups are approved and watched to their tokens.
    let (_, first_agent, _) = &requesters[0];
    let (agent, approver, receiving) = (first_agent.clone(), approver.clone(), globex.id.clone());
    tasks.push(tokio::spawn(async move {
        for n in 0..STEP_UPS {
            let step = request_step_up(
                &agent,
                &approver,
                pb::RequestDelegationRequest {
                    binding_message: format!("pay invoice {n}"),
                    ..ask(&receiving, "pay.invoice")
                },
            )
            .await;
            let mut watch = watch_step_up(&agent, &step.auth_req_id, 1)
                .await
                .expect("WatchStepUp on the small pool");
            assert_eq!(
                next_status(&mut watch).await.state(),
                pb::StepUpState::Pending
            );
            approve_step_up(&approver, &step.step_up_id, &step.request_hash)
                .await
                .expect("ApproveStepUp on the small pool");
            let approved = next_status(&mut watch).await;
            assert_eq!(approved.state(), pb::StepUpState::Approved);
            assert!(
                !approved.access_token.is_empty(),
                "the watch hands the token"
            );
        }
    }));
    for task in tasks {
        task.await.expect("a task on the small pool");
    }

    let db = &server.state.db;
    wait_all_sealed(db, Duration::from_secs(30)).await;
    let allows = u64::try_from(REQUESTERS * ALLOWS_PER_AGENT).expect("count");
    let mut requesting_links = 0;
    for (tenant, _, admin) in &requesters {
        requesting_links += assert_chain_intact(db, admin, &tenant.id).await;
    }
    let receiving_links = assert_chain_intact(db, &globex_admin, &globex.id).await;
    // Each ALLOW is decided and its token issued in both parties' logs.
    assert!(
        requesting_links >= 2 * allows,
        "{requesting_links} links in the requesting logs for {allows} ALLOWs"
    );
    assert!(
        receiving_links >= 2 * allows,
        "{receiving_links} links in the receiving log for {allows} ALLOWs"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_postgres_pool_below_the_smallest_is_refused_before_connecting() {
    for size in 0..MIN_POSTGRES_CONNECTIONS {
        let config = Config {
            // Nothing listens on port 1: the refusal comes before any
            // connection is tried.
            database_url: "postgres://postgres@127.0.0.1:1/none".to_owned(),
            database_max_connections: size,
            ..Config::default()
        };
        let refusal = store::connect(&config)
            .await
            .expect_err("a pool that small is refused")
            .to_string();
        assert!(
            refusal.contains("database_max_connections must be at least 2"),
            "the refusal names the setting and its floor: {refusal}"
        );
    }
}

/// A BEGIN cut short (the caller's future dropped once BEGIN is on the
/// wire: a client that cancels, a deadline, a dropped stream) must not
/// leave the server-side transaction open on a pooled connection. If it
/// did, the next callers' statements would run inside it: an autocommit
/// write answered OK would stay uncommitted until someone else's COMMIT
/// (or be lost with the connection), and after one failed statement every
/// later one fails with `in_failed_sql_transaction` (seen in the failover
/// test as "there is already a transaction in progress" and INTERNAL).
#[tokio::test]
async fn postgres_only_a_cancelled_begin_leaves_no_transaction_open_on_the_pool() {
    use sea_orm::sqlx::Executor;
    vaultguard_tests::require_backend(vaultguard_tests::Backend::Postgres);
    let server = TestServer::start_adjusted(small_pool).await;
    let db = server.state.db.clone();
    let pool = db.get_postgres_connection_pool().clone();
    let mut cut = 0;
    for round in 0..120 {
        // Polled a few times (a different number each round): the
        // connection is taken and BEGIN sent, then the caller goes away
        // before the answer.
        let mut begin = Box::pin(store::begin(&db));
        let mut finished = false;
        for _ in 0..=(round % 12) {
            if futures::poll!(begin.as_mut()).is_ready() {
                finished = true;
                break;
            }
            tokio::task::yield_now().await;
        }
        drop(begin);
        cut += usize::from(!finished);
        tokio::time::sleep(Duration::from_millis(20)).await;
        // Every connection of the pool at once. SAVEPOINT works only inside
        // a transaction block: it fails on a clean connection.
        let mut held = Vec::new();
        for _ in 0..MIN_POSTGRES_CONNECTIONS {
            held.push(pool.acquire().await.expect("a connection"));
        }
        for connection in &mut held {
            let inside = connection.execute("SAVEPOINT vg_probe").await.is_ok();
            assert!(
                !inside,
                "round {round}: a pooled connection is inside a transaction nobody owns \
                 ({cut} BEGINs cut short so far)"
            );
        }
    }
    assert!(cut > 0, "no BEGIN was cut short");
    server.stop().await;
}
