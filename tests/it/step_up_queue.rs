//! The approval queue under load (issue 23, item 10): one requesting tenant
//! parks at most `max_pending_step_ups_per_pair` PENDING step-ups in another
//! tenant's queue (its own vault step-ups count against its own queue), a
//! refused request writes nothing and answers RESOURCE_EXHAUSTED with
//! ERROR_REASON_STEP_UP_QUEUE_FULL, concurrent requests (and two replicas)
//! do not overshoot the cap; the pending list pages every step-up exactly
//! once, and a queue watch's snapshot comes in bounded pages and ends with a
//! heartbeat, so a console knows when it holds the whole queue.

use std::collections::HashSet;
use std::time::Duration;

use tonic::Code;
use vaultguard_client::{ClientError, DelegationOutcome, VaultGuardClient, pb};
use vaultguard_server::config::Config;
use vaultguard_tests::{
    Backend, TestOptions, TestServer, backend, expect_invalid, expect_reason, next_message,
};

use crate::delegations::ask;
use crate::policies::{add_rule, inbound, with_counterpart};
use crate::vault_signing::{create_key, sign_message};

use pb::watch_pending_step_ups_response::Event as QueueEvent;
use vaultguard_tests::Rpc;

/// The cap of the servers in the cap tests.
const CAP: usize = 3;

fn small_cap(config: &mut Config) {
    config.max_pending_step_ups_per_pair = u32::try_from(CAP).unwrap();
}

fn cap_of_five(config: &mut Config) {
    config.max_pending_step_ups_per_pair = 5;
}

fn no_cap(config: &mut Config) {
    config.max_pending_step_ups_per_pair = 0;
}

/// acme's agents ask globex and initech; both step `pay.*` up, and acme
/// steps up requests to itself and signatures with its keys.
struct Queues {
    server: TestServer,
    acme: pb::Tenant,
    globex: pb::Tenant,
    initech: pb::Tenant,
    bot: VaultGuardClient,
    other_bot: VaultGuardClient,
    initech_bot: VaultGuardClient,
    acme_admin: VaultGuardClient,
    globex_admin: VaultGuardClient,
}

async fn queues(adjust: fn(&mut Config)) -> Queues {
    let server = TestServer::start_adjusted(adjust).await;
    let acme = server.create_tenant("acme").await;
    let globex = server.create_tenant("globex").await;
    let initech = server.create_tenant("initech").await;
    let (_, _, bot) = server.create_agent(&acme.id, "bot").await;
    let (_, _, other_bot) = server.create_agent(&acme.id, "other-bot").await;
    let (_, _, initech_bot) = server.create_agent(&initech.id, "ibot").await;
    let acme_admin = server.admin(&acme.id, "alice").await;
    let globex_admin = server.admin(&globex.id, "gina").await;
    let initech_admin = server.admin(&initech.id, "ian").await;
    // Tokens first: issuing one is audited, and the refusal tests count
    // events.
    for agent in [&bot, &other_bot, &initech_bot] {
        agent.bearer().await.expect("agent token");
    }
    for admin in [&acme_admin, &globex_admin, &initech_admin] {
        add_rule(admin, inbound("pay.*", pb::Effect::StepUp)).await;
    }
    Queues {
        server,
        acme,
        globex,
        initech,
        bot,
        other_bot,
        initech_bot,
        acme_admin,
        globex_admin,
    }
}

/// `agent` asks `receiving` for a payment under `key`.
async fn pay(
    agent: &VaultGuardClient,
    receiving: &str,
    key: &str,
) -> Result<DelegationOutcome, ClientError> {
    agent
        .request_delegation(pb::RequestDelegationRequest {
            idempotency_key: key.to_owned(),
            ..ask(receiving, "pay.invoice")
        })
        .await
}

/// The step-up id of a request that must have been decided STEP_UP.
#[track_caller]
fn stepped_up(outcome: Result<DelegationOutcome, ClientError>) -> String {
    match outcome {
        Ok(DelegationOutcome::StepUp { challenge, .. }) => {
            challenge.delegation.expect("delegation").step_up_id
        }
        other => panic!("expected STEP_UP, got {other:?}"),
    }
}

/// Asserts the queue-full refusal naming `receiving` and the cap.
#[track_caller]
fn queue_full<T: std::fmt::Debug>(result: Result<T, ClientError>, receiving: &str, cap: usize) {
    let metadata = expect_reason(
        result,
        Code::ResourceExhausted,
        pb::ErrorReason::StepUpQueueFull,
    );
    assert_eq!(
        metadata.get("receiving_tenant_id").map(String::as_str),
        Some(receiving)
    );
    assert_eq!(metadata.get("limit"), Some(&cap.to_string()));
}

/// Rows a refused request must leave as they were.
async fn ledger(server: &TestServer) -> [i64; 5] {
    [
        server.count("delegations").await,
        server.count("step_ups").await,
        server.count("step_up_changes").await,
        server.count("audit_events").await,
        server.count("signatures").await,
    ]
}

async fn deny(admin: &VaultGuardClient, step_up_id: &str) {
    vaultguard_tests::calls::deny(admin, step_up_id, "no")
        .await
        .unwrap();
}

#[tokio::test]
async fn a_requesting_tenant_parks_at_most_the_cap_in_anothers_queue() {
    let q = queues(small_cap).await;
    let mut parked = Vec::new();
    for n in 0..CAP {
        parked.push(stepped_up(
            pay(&q.bot, &q.globex.id, &format!("pay-{n}")).await,
        ));
    }

    // One more from acme, by either of its agents, is refused and leaves
    // nothing behind (no delegation, step-up, queue change or event).
    let before = ledger(&q.server).await;
    queue_full(
        pay(&q.bot, &q.globex.id, "one-too-many").await,
        &q.globex.id,
        CAP,
    );
    queue_full(
        pay(&q.other_bot, &q.globex.id, "another").await,
        &q.globex.id,
        CAP,
    );
    assert_eq!(ledger(&q.server).await, before, "a refusal wrote something");

    // Other pairs are not affected: initech asks globex, acme asks initech.
    stepped_up(pay(&q.initech_bot, &q.globex.id, "initech-1").await);
    stepped_up(pay(&q.bot, &q.initech.id, "to-initech").await);

    // A decided step-up makes room; the refused request, retried with its
    // idempotency key, goes through (nothing of it was stored).
    deny(&q.globex_admin, &parked[0]).await;
    stepped_up(pay(&q.bot, &q.globex.id, "one-too-many").await);
    queue_full(pay(&q.bot, &q.globex.id, "again").await, &q.globex.id, CAP);

    // An expired step-up makes room too.
    q.server.clock.advance(301_000);
    stepped_up(pay(&q.bot, &q.globex.id, "after-expiry").await);
    q.server.stop().await;
}

#[tokio::test]
async fn vault_step_ups_count_against_the_tenants_own_queue() {
    let q = queues(small_cap).await;
    let key = create_key(&q.acme_admin, "treasury", pb::KeyAlgorithm::Ed25519, "")
        .await
        .expect("create key");
    add_rule(
        &q.acme_admin,
        with_counterpart(
            &q.acme.id,
            inbound(&format!("sign:{}", key.name), pb::Effect::StepUp),
        ),
    )
    .await;
    let sign = |n: usize| {
        sign_message(
            &key.id,
            format!("transfer {n}").as_bytes(),
            pb::SigningScheme::Ed25519Pure,
            &format!("sign-{n}"),
        )
    };
    // Two signatures and a request to itself fill acme's own queue.
    for n in 0..2 {
        let response = q.bot.sign(sign(n)).await.expect("sign");
        assert_eq!(
            response.decision.expect("decision").outcome(),
            pb::Decision::StepUp
        );
    }
    stepped_up(pay(&q.bot, &q.acme.id, "self-1").await);

    let before = ledger(&q.server).await;
    queue_full(q.bot.sign(sign(2)).await, &q.acme.id, CAP);
    queue_full(pay(&q.bot, &q.acme.id, "self-2").await, &q.acme.id, CAP);
    assert_eq!(ledger(&q.server).await, before, "a refusal wrote something");
    // acme's queue in globex is another pair.
    stepped_up(pay(&q.bot, &q.globex.id, "to-globex").await);
    q.server.stop().await;
}

/// PENDING step-ups of the pair acme → `receiving`, counted in the database.
async fn pending_of_pair(server: &TestServer, acme: &str, receiving: &str) -> i64 {
    server
        .count(&format!(
            "step_ups WHERE state = 'pending' AND requesting_tenant_id = '{acme}' \
             AND receiving_tenant_id = '{receiving}'"
        ))
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_and_replicas_do_not_overshoot_the_cap() {
    let q = queues(cap_of_five).await;
    // On PostgreSQL half the requests go through a second replica.
    let replica = match backend() {
        Backend::Postgres => Some(
            TestServer::start_with(TestOptions {
                replica_of: Some(q.server.primary()),
                adjust_config: Some(cap_of_five),
                ..TestOptions::default()
            })
            .await,
        ),
        Backend::Sqlite => None,
    };
    let token = q.bot.bearer().await.unwrap();
    let mut clients = vec![q.server.with_bearer(&token).await];
    if let Some(replica) = &replica {
        clients.push(replica.with_bearer(&token).await);
    }
    let mut tasks = Vec::new();
    for n in 0..24 {
        let client = clients[n % clients.len()].clone();
        let globex = q.globex.id.clone();
        tasks.push(tokio::spawn(async move {
            // ABORTED is the contract's retryable conflict.
            for _ in 0..20 {
                match pay(&client, &globex, &format!("race-{n}")).await {
                    Err(err) if err.code() == Some(Code::Aborted) => {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    other => return other,
                }
            }
            panic!("still ABORTED after 20 tries")
        }));
    }
    let (mut stepped, mut refused) = (0, 0);
    for task in tasks {
        match task.await.unwrap() {
            Ok(DelegationOutcome::StepUp { .. }) => stepped += 1,
            other => {
                queue_full(other, &q.globex.id, 5);
                refused += 1;
            }
        }
    }
    assert_eq!((stepped, refused), (5, 19), "the cap was overshot");
    assert_eq!(
        pending_of_pair(&q.server, &q.acme.id, &q.globex.id).await,
        5
    );
    if let Some(replica) = replica {
        replica.stop().await;
    }
    q.server.stop().await;
}

// ---------------------------------------------------------------------------
// Paging and the snapshot.

/// Every page of ListPendingStepUps with `page_size`, concatenated.
async fn list_all(approver: &VaultGuardClient, page_size: u32) -> Vec<String> {
    let mut ids = Vec::new();
    let mut token = String::new();
    loop {
        let page = approver
            .list_pending_step_ups(pb::ListPendingStepUpsRequest {
                page: Some(pb::PageRequest {
                    page_size,
                    page_token: token.clone(),
                }),
                ..Default::default()
            })
            .await
            .unwrap();
        let limit = if page_size == 0 { 50 } else { page_size };
        assert!(page.step_ups.len() <= usize::try_from(limit).unwrap());
        ids.extend(page.step_ups.into_iter().map(|s| s.step_up_id));
        token = page.page.unwrap_or_default().next_page_token;
        if token.is_empty() {
            return ids;
        }
    }
}

/// Parks `n` step-ups of acme (and, every third, of initech) in globex's
/// queue; their ids in queue order.
async fn park(q: &Queues, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..n {
        let agent = if i % 3 == 2 { &q.initech_bot } else { &q.bot };
        ids.push(stepped_up(
            pay(agent, &q.globex.id, &format!("park-{i}")).await,
        ));
    }
    ids
}

#[tokio::test]
async fn the_pending_list_pages_every_step_up_exactly_once() {
    let q = queues(no_cap).await;
    let ids = park(&q, 23).await;
    for page_size in [1, 4, 7, 0, 500] {
        assert_eq!(
            list_all(&q.globex_admin, page_size).await,
            ids,
            "pages of {page_size}"
        );
    }
    // Step-ups decided between two pages leave the others where they were.
    let first = q
        .globex_admin
        .list_pending_step_ups(pb::ListPendingStepUpsRequest {
            page: Some(pb::PageRequest {
                page_size: 5,
                page_token: String::new(),
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    deny(&q.globex_admin, &ids[2]).await;
    deny(&q.globex_admin, &ids[7]).await;
    let mut seen: Vec<String> = first.step_ups.into_iter().map(|s| s.step_up_id).collect();
    let mut token = first.page.unwrap_or_default().next_page_token;
    while !token.is_empty() {
        let page = q
            .globex_admin
            .list_pending_step_ups(pb::ListPendingStepUpsRequest {
                page: Some(pb::PageRequest {
                    page_size: 5,
                    page_token: token.clone(),
                }),
                ..Default::default()
            })
            .await
            .unwrap();
        seen.extend(page.step_ups.into_iter().map(|s| s.step_up_id));
        token = page.page.unwrap_or_default().next_page_token;
    }
    let expected: Vec<String> = ids
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 7)
        .map(|(_, id)| id.clone())
        .collect();
    assert_eq!(seen, expected);

    let request = q
        .globex_admin
        .request(pb::ListPendingStepUpsRequest {
            page: Some(pb::PageRequest {
                page_size: 501,
                page_token: String::new(),
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    expect_invalid(
        q.globex_admin
            .step_ups()
            .list_pending_step_ups(request)
            .await,
        "page.page_size",
    );
    q.server.stop().await;
}

#[tokio::test]
async fn the_queue_snapshot_comes_in_pages_and_ends_with_a_heartbeat() {
    let q = queues(no_cap).await;
    // More than two snapshot pages.
    let ids = park(&q, 230).await;
    let mut watch = q
        .globex_admin
        .watch_pending_step_ups(pb::WatchPendingStepUpsRequest {
            cursor: String::new(),
            // Longer than the test: the heartbeat that ends the snapshot
            // comes at once, not after an idle interval.
            heartbeat_interval_seconds: 60,
        })
        .await
        .unwrap();
    let mut snapshot = Vec::new();
    let mut seen = HashSet::new();
    let end = loop {
        let message = next_message(&mut watch, Duration::from_secs(10))
            .await
            .expect("the watch goes on");
        match message.event.expect("an event") {
            QueueEvent::Change(change) => {
                assert_eq!(change.event_type(), pb::PendingStepUpEventType::Added);
                let id = change.step_up.expect("step-up").step_up_id;
                assert!(seen.insert(id.clone()), "{id} sent twice");
                snapshot.push(id);
            }
            QueueEvent::Heartbeat(_) => break message.cursor,
        }
    };
    assert_eq!(snapshot, ids, "the whole queue, oldest first, each once");
    assert!(!end.is_empty());
    // Live changes follow (on PostgreSQL after repeats of the snapshot's
    // last second, which the contract allows).
    let more = stepped_up(pay(&q.bot, &q.globex.id, "after-the-snapshot").await);
    loop {
        let message = next_message(&mut watch, Duration::from_secs(10))
            .await
            .expect("the watch goes on");
        let Some(QueueEvent::Change(change)) = message.event else {
            panic!("expected a change, got {message:?}")
        };
        let id = change.step_up.expect("step-up").step_up_id;
        if id == more {
            break;
        }
        assert!(seen.contains(&id), "an unknown step-up {id}");
    }
    q.server.stop().await;
}
