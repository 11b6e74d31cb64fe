//! The kill switch (issue 26): FreezeAgent / UnfreezeAgent and
//! FreezeTenantTraffic / UnfreezeTenantTraffic. A freeze stops the agent (or
//! every agent of the tenant, as requester) at once: its ACTIVE delegations
//! are revoked, its PENDING step-ups denied, RequestDelegation, Sign and
//! ExchangeToken refuse it, and Verify answers inactive, on every replica; a
//! request judged just before the freeze leaves nothing active behind it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sea_orm::{ConnectionTrait, Statement};
use tonic::Code;
use vaultguard_client::{ClientError, DelegationOutcome, VaultGuardClient, pb};
use vaultguard_tests::fixtures::{Pair, ask, setup_pair};
use vaultguard_tests::{
    Backend, Rpc, TestServer, expect_invalid, expect_reason, get_step_up, request_step_up,
    require_backend,
};

use crate::delegations::{assert_inactive, grant};
use crate::policies::{add_rule, inbound, with_counterpart};
use crate::vault_signing::create_key;

use pb::ErrorReason as Reason;

const REASON: &str = "incident 4711: the agent leaks orders";

async fn freeze(
    admin: &VaultGuardClient,
    agent_id: &str,
    reason: &str,
) -> Result<pb::FreezeAgentResponse, ClientError> {
    admin
        .freeze_agent(pb::FreezeAgentRequest {
            agent_id: agent_id.to_owned(),
            reason: reason.to_owned(),
        })
        .await
}

async fn unfreeze(
    admin: &VaultGuardClient,
    agent_id: &str,
    reason: &str,
) -> Result<pb::UnfreezeAgentResponse, ClientError> {
    admin
        .unfreeze_agent(pb::UnfreezeAgentRequest {
            agent_id: agent_id.to_owned(),
            reason: reason.to_owned(),
        })
        .await
}

async fn freeze_tenant(
    admin: &VaultGuardClient,
    tenant_id: &str,
    reason: &str,
) -> Result<pb::FreezeTenantTrafficResponse, ClientError> {
    admin
        .freeze_tenant_traffic(pb::FreezeTenantTrafficRequest {
            tenant_id: tenant_id.to_owned(),
            reason: reason.to_owned(),
        })
        .await
}

async fn unfreeze_tenant(
    admin: &VaultGuardClient,
    tenant_id: &str,
    reason: &str,
) -> Result<pb::UnfreezeTenantTrafficResponse, ClientError> {
    admin
        .unfreeze_tenant_traffic(pb::UnfreezeTenantTrafficRequest {
            tenant_id: tenant_id.to_owned(),
            reason: reason.to_owned(),
        })
        .await
}

async fn delegation(client: &VaultGuardClient, id: &str) -> pb::Delegation {
    client
        .raw_get_delegation(pb::GetDelegationRequest {
            delegation_id: id.to_owned(),
        })
        .await
        .expect("get delegation")
        .delegation
        .expect("delegation")
}

/// Rows of `table` matching `condition`, read from the database itself.
async fn rows(server: &TestServer, table: &str, condition: &str) -> i64 {
    let db = &server.state.db;
    let row = db
        .query_one_raw(Statement::from_string(
            db.get_database_backend(),
            format!("SELECT COUNT(*) AS n FROM {table} WHERE {condition}"),
        ))
        .await
        .expect("count query")
        .expect("count row");
    row.try_get::<i64>("", "n").expect("count value")
}

async fn active_delegations_of(server: &TestServer, agent_id: &str) -> i64 {
    rows(
        server,
        "delegations",
        &format!("requesting_agent_id = '{agent_id}' AND status = 'active'"),
    )
    .await
}

/// The signing key `name` of acme, which lets its agents sign with it.
async fn acme_signing_key(pair: &Pair, name: &str) -> pb::SigningKey {
    let key = create_key(&pair.acme_admin, name, pb::KeyAlgorithm::Ed25519, "")
        .await
        .expect("create signing key");
    let rule = with_counterpart(
        &pair.acme.id,
        inbound(&format!("sign:{name}"), pb::Effect::Allow),
    );
    add_rule(&pair.acme_admin, rule).await;
    key
}

fn sign_request(key_id: &str, message: &[u8]) -> pb::SignRequest {
    pb::SignRequest {
        key_id: key_id.to_owned(),
        payload: Some(pb::sign_request::Payload::Message(pb::SignMessage {
            data: message.to_vec(),
            scheme: pb::SigningScheme::Ed25519Pure as i32,
        })),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn freezing_an_agent_ends_what_it_holds_and_refuses_what_it_asks() {
    let pair = setup_pair().await;
    vaultguard_tests::parts!(pair => server, acme, globex, bot, agent, acme_admin, globex_admin);
    pair.globex_allows("stock.*").await;
    add_rule(globex_admin, inbound("pay.*", pb::Effect::StepUp)).await;
    let key = acme_signing_key(&pair, "treasury").await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(grant(agent, ask(&globex.id, "stock.read")).await);
    }
    let pending = request_step_up(agent, globex_admin, ask(&globex.id, "pay.invoice")).await;
    let mut watch = vaultguard_tests::watch_step_up(agent, &pending.auth_req_id, 1)
        .await
        .expect("watch");
    assert_eq!(
        vaultguard_tests::next_status(&mut watch).await.state,
        pb::StepUpState::Pending as i32
    );
    // Another agent of acme is not touched.
    let (_, _, other) = server.create_agent(&acme.id, "other").await;
    let (_, other_token) = grant(&other, ask(&globex.id, "stock.read")).await;

    let frozen = freeze(acme_admin, &bot.id, REASON).await.expect("freeze");
    assert_eq!(frozen.delegations_revoked, 3);
    assert_eq!(frozen.step_ups_denied, 1);
    let shown = frozen.agent.expect("agent");
    assert!(shown.frozen);
    assert_eq!(shown.freeze_reason, REASON);
    assert!(shown.freeze_time.is_some());
    assert_eq!(
        shown.status,
        pb::AgentStatus::Active as i32,
        "frozen, not disabled"
    );

    for (row, token) in &held {
        assert_inactive(
            globex_admin.verify(token.clone(), "").await,
            "a frozen agent's token",
        );
        let ended = delegation(globex_admin, &row.id).await;
        assert_eq!(ended.status, pb::DelegationStatus::Revoked as i32);
        assert!(ended.end_reason.contains(REASON), "{}", ended.end_reason);
        for log in pair.logs() {
            assert_eq!(
                server.audit_count(log, "delegation.revoked", &row.id).await,
                1,
                "one revocation event in each party's log"
            );
        }
    }
    let step = get_step_up(globex_admin, &pending.step_up_id)
        .await
        .unwrap();
    assert_eq!(step.state, pb::StepUpState::Denied as i32);
    // The agent's open watch hears of it.
    assert_eq!(
        vaultguard_tests::next_status(&mut watch).await.state,
        pb::StepUpState::Denied as i32
    );
    for log in pair.logs() {
        assert_eq!(
            server
                .audit_count(log, "step_up.denied", &pending.step_up_id)
                .await,
            1
        );
    }
    assert_eq!(
        server.audit_count(&acme.id, "agent.frozen", &bot.id).await,
        1
    );
    assert!(
        globex_admin.verify(other_token, "").await.unwrap().active,
        "another agent's delegation stays active"
    );

    // Whatever it asks is refused, and nothing of it is written.
    let delegations_before = server.count("delegations").await;
    let refused = agent
        .request_delegation(ask(&globex.id, "stock.read"))
        .await;
    let metadata = expect_reason(refused, Code::PermissionDenied, Reason::AgentFrozen);
    assert_eq!(metadata.get("agent_id"), Some(&bot.id));
    let refused = agent.sign(sign_request(&key.id, b"pay 10 EUR")).await;
    expect_reason(refused, Code::PermissionDenied, Reason::AgentFrozen);
    let refused = agent
        .exchange_token(pb::ExchangeTokenRequest {
            grant_type: "urn:ietf:params:oauth:grant-type:token-exchange".to_owned(),
            connection_id: "con_00000000000000000000000000000000".to_owned(),
            ..Default::default()
        })
        .await;
    expect_reason(refused, Code::PermissionDenied, Reason::AgentFrozen);
    assert_eq!(server.count("delegations").await, delegations_before);
    assert_eq!(rows(server, "signatures", "1 = 1").await, 0);

    // Freezing again is allowed: it keeps the first freeze and ends nothing
    // more.
    let again = freeze(acme_admin, &bot.id, "second thoughts")
        .await
        .unwrap();
    assert_eq!((again.delegations_revoked, again.step_ups_denied), (0, 0));
    assert_eq!(again.agent.unwrap().freeze_reason, REASON);
    assert_eq!(
        server.audit_count(&acme.id, "agent.frozen", &bot.id).await,
        2
    );
    pair.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unfreezing_restores_asking_not_the_revoked_grants() {
    let pair = setup_pair().await;
    vaultguard_tests::parts!(pair => server, acme, globex, bot, agent, acme_admin, globex_admin);
    pair.globex_allows("stock.*").await;
    let (row, token) = grant(agent, ask(&globex.id, "stock.read")).await;
    freeze(acme_admin, &bot.id, REASON).await.unwrap();

    let thawed = unfreeze(acme_admin, &bot.id, "incident 4711 closed")
        .await
        .expect("unfreeze")
        .agent
        .expect("agent");
    assert!(!thawed.frozen);
    assert_eq!(thawed.freeze_reason, "");
    assert!(thawed.freeze_time.is_none());
    assert_eq!(
        server
            .audit_count(&acme.id, "agent.unfrozen", &bot.id)
            .await,
        1
    );

    assert_inactive(
        globex_admin.verify(token, "").await,
        "a revoked grant stays revoked",
    );
    assert_eq!(
        delegation(globex_admin, &row.id).await.status,
        pb::DelegationStatus::Revoked as i32
    );
    let (_, fresh) = grant(agent, ask(&globex.id, "stock.read")).await;
    assert!(globex_admin.verify(fresh, "").await.unwrap().active);

    // Unfreezing what is not frozen is refused.
    expect_reason(
        unfreeze(acme_admin, &bot.id, "again").await,
        Code::FailedPrecondition,
        Reason::InvalidState,
    );
    pair.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn freezing_a_tenants_traffic_stops_all_its_agents_as_requesters_only() {
    let pair = setup_pair().await;
    vaultguard_tests::parts!(pair => server, acme, globex, bot, agent, acme_admin, globex_admin);
    pair.globex_allows("stock.*").await;
    add_rule(acme_admin, inbound("stock.*", pb::Effect::Allow)).await;
    let (other, _, other_agent) = server.create_agent(&acme.id, "other").await;
    let (_, bot_token) = grant(agent, ask(&globex.id, "stock.read")).await;
    let (_, other_token) = grant(&other_agent, ask(&globex.id, "stock.read")).await;
    // Globex's own agent holds a delegation addressed TO acme: not acme's
    // outbound traffic.
    let (_, _, globex_agent) = server.create_agent(&globex.id, "gbot").await;
    let (_, inbound_token) = grant(&globex_agent, ask(&acme.id, "stock.read")).await;

    // An admin names its own tenant, or none.
    let frozen = freeze_tenant(acme_admin, "", REASON).await.expect("freeze");
    assert_eq!((frozen.delegations_revoked, frozen.step_ups_denied), (2, 0));
    let tenant = frozen.tenant.expect("tenant");
    assert!(tenant.traffic_frozen);
    assert_eq!(tenant.traffic_freeze_reason, REASON);
    assert_eq!(tenant.status, pb::TenantStatus::Active as i32);
    assert_eq!(
        server
            .audit_count(&acme.id, "tenant.traffic_frozen", &acme.id)
            .await,
        1
    );

    assert_inactive(globex_admin.verify(bot_token, "").await, "bot's token");
    assert_inactive(globex_admin.verify(other_token, "").await, "other's token");
    for client in [agent, &other_agent] {
        let metadata = expect_reason(
            client
                .request_delegation(ask(&globex.id, "stock.read"))
                .await,
            Code::PermissionDenied,
            Reason::TenantTrafficFrozen,
        );
        assert_eq!(metadata.get("tenant_id"), Some(&acme.id));
    }
    let acme_verifier = server.admin(&acme.id, "vera").await;
    assert!(
        acme_verifier
            .verify(inbound_token, "")
            .await
            .unwrap()
            .active,
        "what acme receives is not its traffic"
    );
    assert!(
        globex_agent
            .request_delegation(ask(&acme.id, "stock.read"))
            .await
            .is_ok(),
        "others may still ask acme"
    );

    let thawed = unfreeze_tenant(acme_admin, &acme.id, "resolved")
        .await
        .unwrap();
    assert!(!thawed.tenant.unwrap().traffic_frozen);
    grant(agent, ask(&globex.id, "stock.read")).await;
    let _ = (bot, other);
    pair.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_the_tenants_admin_or_the_operator_may_freeze() {
    let pair = setup_pair().await;
    vaultguard_tests::parts!(pair => server, acme, globex, bot, agent, globex_admin);
    let operator = server.operator().await;

    // Another tenant's admin: the agent does not exist for it, and it may not
    // name another tenant.
    let events_before = server.count("audit_events").await;
    let not_found = freeze(globex_admin, &bot.id, REASON).await;
    vaultguard_tests::expect_code(not_found, Code::NotFound);
    let not_found = unfreeze(globex_admin, &bot.id, REASON).await;
    vaultguard_tests::expect_code(not_found, Code::NotFound);
    expect_reason(
        freeze_tenant(globex_admin, &acme.id, REASON).await,
        Code::PermissionDenied,
        Reason::TenantMismatch,
    );
    expect_reason(
        unfreeze_tenant(globex_admin, &acme.id, REASON).await,
        Code::PermissionDenied,
        Reason::TenantMismatch,
    );
    // An agent may not freeze anything, not even itself.
    expect_reason(
        freeze(agent, &bot.id, REASON).await,
        Code::PermissionDenied,
        Reason::RoleRequired,
    );
    expect_reason(
        freeze_tenant(agent, &acme.id, REASON).await,
        Code::PermissionDenied,
        Reason::RoleRequired,
    );
    assert_eq!(rows(server, "agents", "frozen_at IS NOT NULL").await, 0);
    assert_eq!(
        rows(server, "tenants", "traffic_frozen_at IS NOT NULL").await,
        0
    );
    // Only the refusals' NOT_FOUND trail was written.
    assert_eq!(
        server.count("audit_events").await - events_before,
        i64::try_from(server.not_found_methods(&globex.id).await.len()).unwrap()
    );

    // The operator may, for any tenant, and is recorded in the platform log
    // too.
    let frozen = freeze(&operator, &bot.id, REASON).await.expect("operator");
    assert!(frozen.agent.unwrap().frozen);
    unfreeze(&operator, &bot.id, "done")
        .await
        .expect("operator");
    let frozen = freeze_tenant(&operator, &acme.id, REASON).await.unwrap();
    assert!(frozen.tenant.unwrap().traffic_frozen);
    assert_eq!(
        server
            .audit_count("platform", "tenant.traffic_frozen", &acme.id)
            .await,
        1
    );
    unfreeze_tenant(&operator, &acme.id, "done").await.unwrap();
    pair.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_is_refused_naming_the_field_and_writes_nothing() {
    let pair = setup_pair().await;
    vaultguard_tests::parts!(pair => server, bot, acme_admin);
    let operator = server.operator().await;
    let events_before = server.count("audit_events").await;
    let long = "x".repeat(257);
    for reason in ["", "   ", long.as_str(), "line\nbreak", "bell\u{7}"] {
        expect_invalid(freeze(acme_admin, &bot.id, reason).await, "reason");
        expect_invalid(unfreeze(acme_admin, &bot.id, reason).await, "reason");
        expect_invalid(freeze_tenant(acme_admin, "", reason).await, "reason");
        expect_invalid(unfreeze_tenant(acme_admin, "", reason).await, "reason");
    }
    expect_invalid(freeze(acme_admin, "", REASON).await, "agent_id");
    expect_invalid(freeze(acme_admin, "agt_nope", REASON).await, "agent_id");
    expect_invalid(freeze_tenant(&operator, "", REASON).await, "tenant_id");
    expect_invalid(
        freeze_tenant(&operator, "tnt_nope", REASON).await,
        "tenant_id",
    );
    // 256 characters are enough.
    freeze(acme_admin, &bot.id, &"y".repeat(256))
        .await
        .expect("256 characters");
    assert_eq!(server.count("audit_events").await - events_before, 1);
    pair.server.stop().await;
}

/// How a frozen agent's requests may be refused: as frozen, or (refused
/// fast, it asks fast) by its rate limit.
fn refusal(err: &ClientError) -> bool {
    matches!(
        err.reason(),
        Some(Reason::AgentFrozen | Reason::RateLimited)
    )
}

/// Requests as `agent` until `stop`; answers each outcome with when it
/// started.
async fn keep_asking(
    agent: VaultGuardClient,
    receiving: String,
    stop: Arc<AtomicBool>,
) -> Vec<(Instant, Result<String, ClientError>)> {
    let mut outcomes = Vec::new();
    while !stop.load(Ordering::Acquire) {
        let started = Instant::now();
        let outcome = agent
            .request_delegation(ask(&receiving, "stock.read"))
            .await
            .map(|outcome| match outcome {
                DelegationOutcome::Allowed { grant, .. } => grant.token,
                other => panic!("expected ALLOW, got {other:?}"),
            });
        if outcome.is_err() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        outcomes.push((started, outcome));
    }
    outcomes
}

async fn keep_signing(
    agent: VaultGuardClient,
    key_id: String,
    stop: Arc<AtomicBool>,
) -> Vec<(Instant, Result<(), ClientError>)> {
    let mut outcomes = Vec::new();
    let mut n = 0_u32;
    while !stop.load(Ordering::Acquire) {
        n += 1;
        let started = Instant::now();
        let outcome = agent
            .sign(sign_request(&key_id, format!("order {n}").as_bytes()))
            .await
            .map(|_| ());
        if outcome.is_err() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        outcomes.push((started, outcome));
    }
    outcomes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_freeze_racing_requests_leaves_no_active_delegation_and_no_later_signature() {
    let pair = setup_pair().await;
    vaultguard_tests::parts!(pair => server, globex, bot, agent, acme_admin, globex_admin);
    pair.globex_allows("stock.*").await;
    let key = acme_signing_key(&pair, "treasury").await;
    let stop = Arc::new(AtomicBool::new(false));
    let mut askers = Vec::new();
    let mut signers = Vec::new();
    for _ in 0..6 {
        askers.push(tokio::spawn(keep_asking(
            agent.clone(),
            globex.id.clone(),
            stop.clone(),
        )));
    }
    for _ in 0..2 {
        signers.push(tokio::spawn(keep_signing(
            agent.clone(),
            key.id.clone(),
            stop.clone(),
        )));
    }
    // Let requests flow, then pull the switch in the middle of them.
    while active_delegations_of(server, &bot.id).await < 20 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    freeze(acme_admin, &bot.id, REASON).await.expect("freeze");
    let answered = Instant::now();
    let signatures_at_answer = rows(server, "signatures", "1 = 1").await;
    assert_eq!(
        active_delegations_of(server, &bot.id).await,
        0,
        "an ACTIVE delegation outlived the freeze's answer"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Release);

    let mut tokens = Vec::new();
    let mut refused_after = 0;
    for asker in askers {
        for (started, outcome) in asker.await.unwrap() {
            match outcome {
                Ok(token) => {
                    assert!(
                        started < answered,
                        "a request sent after the freeze answered was allowed"
                    );
                    tokens.push(token);
                }
                Err(err) => {
                    assert!(refusal(&err), "{err:?}");
                    let frozen = err.reason() == Some(Reason::AgentFrozen);
                    refused_after += usize::from(started >= answered && frozen);
                }
            }
        }
    }
    for signer in signers {
        for (started, outcome) in signer.await.unwrap() {
            if let Err(err) = outcome {
                assert!(refusal(&err), "{err:?}");
            } else {
                assert!(
                    started < answered,
                    "a Sign sent after the freeze was served"
                );
            }
        }
    }
    assert!(refused_after > 0, "no request was tried after the freeze");
    assert_eq!(active_delegations_of(server, &bot.id).await, 0);
    assert_eq!(
        rows(server, "signatures", "1 = 1").await,
        signatures_at_answer,
        "a signature was made after the freeze answered"
    );
    for token in tokens {
        assert_inactive(globex_admin.verify(token, "").await, "a token of the race");
    }
    pair.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_only_a_freeze_through_one_replica_holds_on_the_other_at_once() {
    // Replica B holds the agent, the tenants and the delegation in memory
    // (the directory); the freeze written through A must reach it by one
    // notification. Two processes share a database only on PostgreSQL.
    require_backend(Backend::Postgres);
    let pair = setup_pair().await;
    vaultguard_tests::parts!(pair => server, acme, globex, bot, agent, acme_admin);
    pair.globex_allows("stock.*").await;
    let replica = TestServer::start_replica_of(server).await;
    let agent_on_b = replica.with_bearer(&agent.bearer().await.unwrap()).await;
    let verifier_on_b = replica.admin(&globex.id, "vera").await;
    let (_, token) = grant(&agent_on_b, ask(&globex.id, "stock.read")).await;
    assert!(
        verifier_on_b
            .verify(token.clone(), "")
            .await
            .unwrap()
            .active
    );

    freeze(acme_admin, &bot.id, REASON).await.unwrap();
    let answered = Instant::now();
    loop {
        let verified = verifier_on_b.verify(token.clone(), "").await.unwrap();
        let asked = agent_on_b
            .request_delegation(ask(&globex.id, "stock.read"))
            .await;
        let refused = matches!(&asked, Err(err) if err.reason() == Some(Reason::AgentFrozen));
        if !verified.active && refused {
            break;
        }
        assert!(
            answered.elapsed() < Duration::from_secs(1),
            "replica B still serves the frozen agent: {verified:?} {asked:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let _ = acme;
    replica.stop().await;
    pair.server.stop().await;
}
