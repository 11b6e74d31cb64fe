//! Money-aware authority (issue 26): RFC 9396 authorization details that
//! policy judges, approvers see and the token carries exactly; and budgets
//! over rolling windows that concurrent requests never overspend.

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};
use tonic::Code;
use vaultguard_client::{ClientError, DelegationOutcome, VaultGuardClient, pb};
use vaultguard_tests::calls::{deny, poll};
use vaultguard_tests::fixtures::{add_rule, ask, inbound, num, setup_pair, when};
use vaultguard_tests::{
    Backend, Rpc, TestServer, approve_step_up, expect_code, expect_invalid, expect_reason,
    get_step_up, request_step_up, require_backend,
};

use pb::ConditionOperator as Op;
use pb::ErrorReason as Reason;

// ---------------------------------------------------------------------------
// Fixtures.

fn string(value: &str) -> prost_types::Value {
    prost_types::Value {
        kind: Some(prost_types::value::Kind::StringValue(value.to_owned())),
    }
}

fn object(members: &[(&str, prost_types::Value)]) -> prost_types::Value {
    prost_types::Value {
        kind: Some(prost_types::value::Kind::StructValue(prost_types::Struct {
            fields: members
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect::<BTreeMap<_, _>>(),
        })),
    }
}

/// A `payment_initiation` of `amount` `currency` to `creditor`.
fn payment(amount: &str, currency: &str, creditor: &str) -> pb::AuthorizationDetail {
    let Some(prost_types::value::Kind::StructValue(fields)) = object(&[
        (
            "instructedAmount",
            object(&[("currency", string(currency)), ("amount", string(amount))]),
        ),
        ("creditorName", string(creditor)),
    ])
    .kind
    else {
        unreachable!()
    };
    pb::AuthorizationDetail {
        r#type: "payment_initiation".into(),
        actions: vec!["initiate".into()],
        locations: vec!["https://bank.globex.example/payments".into()],
        fields: Some(fields),
        ..Default::default()
    }
}

fn paying(receiving: &str, details: Vec<pb::AuthorizationDetail>) -> pb::RequestDelegationRequest {
    pb::RequestDelegationRequest {
        authorization_details: details,
        ..ask(receiving, "payments.initiate")
    }
}

/// A condition on `path` of the `payment_initiation` details.
fn on_payment(path: &str, operator: Op, value: pb::AttributeValue) -> pb::Condition {
    pb::Condition {
        detail_type: "payment_initiation".into(),
        detail_path: path.into(),
        operator: operator as i32,
        value: Some(value),
        ..Default::default()
    }
}

fn claims(token: &str) -> Value {
    let payload = token.split('.').nth(1).expect("a JWT has a payload");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).expect("base64url")).expect("json")
}

#[track_caller]
fn granted(outcome: Result<DelegationOutcome, ClientError>) -> pb::DelegationGrant {
    match outcome {
        Ok(DelegationOutcome::Allowed { grant, .. }) => grant,
        other => panic!("expected ALLOW, got {other:?}"),
    }
}

/// A detail as JSON, the way the token's claim carries it.
fn as_claim(detail: &pb::AuthorizationDetail) -> Value {
    let mut out = serde_json::Map::new();
    out.insert("type".into(), json!(detail.r#type));
    for (name, list) in [
        ("locations", &detail.locations),
        ("actions", &detail.actions),
        ("datatypes", &detail.datatypes),
        ("privileges", &detail.privileges),
    ] {
        if !list.is_empty() {
            out.insert(name.into(), json!(list));
        }
    }
    if !detail.identifier.is_empty() {
        out.insert("identifier".into(), json!(detail.identifier));
    }
    fn value(v: &prost_types::Value) -> Value {
        use prost_types::value::Kind;
        match &v.kind {
            Some(Kind::StringValue(s)) => json!(s),
            Some(Kind::NumberValue(n)) => json!(n),
            Some(Kind::BoolValue(b)) => json!(b),
            Some(Kind::StructValue(s)) => Value::Object(
                s.fields
                    .iter()
                    .map(|(k, v)| (k.clone(), value(v)))
                    .collect(),
            ),
            Some(Kind::ListValue(l)) => Value::Array(l.values.iter().map(value).collect()),
            _ => Value::Null,
        }
    }
    if let Some(fields) = &detail.fields {
        for (k, v) in &fields.fields {
            out.insert(k.clone(), value(v));
        }
    }
    Value::Object(out)
}

fn budget(name: &str, direction: pb::RuleDirection, limit: &str, over: pb::Effect) -> pb::Budget {
    pb::Budget {
        name: name.into(),
        direction: direction as i32,
        measure: pb::BudgetMeasure::Count as i32,
        window_seconds: 3600,
        limit: limit.into(),
        over_limit: over as i32,
        ..Default::default()
    }
}

/// A SUM budget of `payment_initiation` amounts in `currency`.
fn payment_budget(name: &str, limit: &str, currency: &str, over: pb::Effect) -> pb::Budget {
    pb::Budget {
        measure: pb::BudgetMeasure::Sum as i32,
        sum_detail_type: "payment_initiation".into(),
        sum_detail_path: "instructedAmount.amount".into(),
        currency: currency.into(),
        scope: Some(pb::BudgetScope {
            action_pattern: "payments.*".into(),
            ..Default::default()
        }),
        ..budget(name, pb::RuleDirection::Outbound, limit, over)
    }
}

async fn create_budget(admin: &VaultGuardClient, budget: pb::Budget) -> pb::Budget {
    admin
        .create_budget(pb::CreateBudgetRequest {
            budget: Some(budget),
        })
        .await
        .expect("create budget")
        .budget
        .expect("budget")
}

async fn get_budget(admin: &VaultGuardClient, id: &str) -> pb::Budget {
    admin
        .get_budget(pb::GetBudgetRequest {
            budget_id: id.into(),
        })
        .await
        .expect("get budget")
        .budget
        .expect("budget")
}

// ---------------------------------------------------------------------------
// Authorization details.

/// What was judged is what is signed: the token's `authorization_details`
/// claim is the request's details, exactly, and the delegation shows them.
#[tokio::test]
async fn a_token_carries_exactly_the_authorization_details_judged() {
    let pair = setup_pair().await;
    vaultguard_tests::parts!(pair => globex, agent);
    pair.globex_allows("payments.*").await;
    let detail = payment("120.50", "EUR", "ACME Supplies");
    let grant = granted(
        agent
            .request_delegation(paying(&globex.id, vec![detail.clone()]))
            .await,
    );
    assert_eq!(
        claims(&grant.token)["authorization_details"],
        json!([as_claim(&detail)])
    );
    let delegation = grant.delegation.expect("delegation");
    assert_eq!(delegation.authorization_details, [detail]);

    // A request without details carries no claim.
    let plain = granted(
        agent
            .request_delegation(ask(&globex.id, "payments.status"))
            .await,
    );
    assert!(claims(&plain.token).get("authorization_details").is_none());
}

/// Conditions address detail fields by path. A payment over 1,000 steps up,
/// and a second, larger payment cannot hide behind a small first one.
#[tokio::test]
async fn conditions_judge_every_detail_of_their_type() {
    let pair = setup_pair().await;
    vaultguard_tests::parts!(pair => globex, agent, globex_admin);
    add_rule(globex_admin, inbound("payments.*", pb::Effect::Allow)).await;
    add_rule(
        globex_admin,
        when(
            vec![on_payment("instructedAmount.amount", Op::Gt, num(1000.0))],
            pb::Rule {
                priority: 10,
                ..inbound("payments.*", pb::Effect::StepUp)
            },
        ),
    )
    .await;
    granted(
        agent
            .request_delegation(paying(&globex.id, vec![payment("999.99", "EUR", "A")]))
            .await,
    );
    for details in [
        vec![payment("1000.01", "EUR", "A")],
        vec![payment("5", "EUR", "A"), payment("50000", "EUR", "B")],
    ] {
        let outcome = agent.request_delegation(paying(&globex.id, details)).await;
        assert!(
            matches!(outcome, Ok(DelegationOutcome::StepUp { .. })),
            "expected STEP_UP, got {outcome:?}"
        );
    }
}

/// An ALLOW rule conditioned on details matches only when every detail of
/// the type passes, and none at all does not pass.
#[tokio::test]
async fn an_allow_condition_needs_every_detail_to_pass() {
    let pair = setup_pair().await;
    vaultguard_tests::parts!(pair => globex, agent, globex_admin);
    add_rule(
        globex_admin,
        when(
            vec![on_payment(
                "instructedAmount.currency",
                Op::Eq,
                vaultguard_tests::fixtures::text("EUR"),
            )],
            inbound("payments.*", pb::Effect::Allow),
        ),
    )
    .await;
    granted(
        agent
            .request_delegation(paying(&globex.id, vec![payment("10", "EUR", "A")]))
            .await,
    );
    for details in [
        vec![payment("10", "EUR", "A"), payment("10", "USD", "B")],
        vec![],
    ] {
        expect_reason(
            agent.request_delegation(paying(&globex.id, details)).await,
            Code::PermissionDenied,
            Reason::NoMatchingRule,
        );
    }
}

/// The approver sees the details, they are bound into the request hash, and
/// the token minted at approval carries exactly what the approver saw.
#[tokio::test]
async fn a_step_up_token_carries_what_the_approver_saw() {
    let pair = setup_pair().await;
    vaultguard_tests::parts!(pair => server, globex, agent, globex_admin);
    add_rule(globex_admin, inbound("payments.*", pb::Effect::StepUp)).await;
    let approver = server.approver(&globex.id, "gus").await;
    let detail = payment("25000.00", "EUR", "Initech GmbH");
    let pending = request_step_up(agent, &approver, paying(&globex.id, vec![detail.clone()])).await;
    let shown = get_step_up(&approver, &pending.step_up_id).await.unwrap();
    assert_eq!(shown.authorization_details, std::slice::from_ref(&detail));

    // The same request with another amount has another hash.
    let other = request_step_up(
        agent,
        &approver,
        paying(&globex.id, vec![payment("25000.01", "EUR", "Initech GmbH")]),
    )
    .await;
    assert_ne!(other.request_hash, pending.request_hash);

    approve_step_up(&approver, &pending.step_up_id, &pending.request_hash)
        .await
        .unwrap();
    let token = poll(agent, &pending.auth_req_id)
        .await
        .unwrap()
        .access_token;
    let seen: Vec<Value> = shown.authorization_details.iter().map(as_claim).collect();
    assert_eq!(claims(&token)["authorization_details"], Value::Array(seen));
}

/// Bad shapes are INVALID_ARGUMENT naming the path, and nothing is written.
#[tokio::test]
async fn bad_authorization_details_name_the_path_and_write_nothing() {
    let pair = setup_pair().await;
    vaultguard_tests::parts!(pair => server, globex, agent, globex_admin);
    pair.globex_allows("payments.*").await;
    let before = server.count("delegations").await;
    let mut no_amount = payment("1", "EUR", "A");
    no_amount
        .fields
        .as_mut()
        .unwrap()
        .fields
        .remove("instructedAmount");
    let mut smuggled = payment("1", "EUR", "A");
    smuggled
        .fields
        .as_mut()
        .unwrap()
        .fields
        .insert("type".into(), string("other"));
    let cases = [
        (
            payment("1", "eur", "A"),
            "authorization_details[0].instructedAmount.currency",
        ),
        (
            payment("1e3", "EUR", "A"),
            "authorization_details[0].instructedAmount.amount",
        ),
        (
            payment("-5", "EUR", "A"),
            "authorization_details[0].instructedAmount.amount",
        ),
        (no_amount, "authorization_details[0].instructedAmount"),
        (smuggled, "authorization_details[0].type"),
        (
            pb::AuthorizationDetail {
                r#type: "bad type".into(),
                ..Default::default()
            },
            "authorization_details[0].type",
        ),
    ];
    for (detail, field) in cases {
        expect_invalid(
            agent
                .request_delegation(paying(&globex.id, vec![detail]))
                .await,
            field,
        );
    }
    expect_invalid(
        agent
            .request_delegation(paying(&globex.id, vec![payment("1", "EUR", "A"); 9]))
            .await,
        "authorization_details",
    );
    // A rule condition with a bad path is refused too.
    let bad_rule = when(
        vec![on_payment("instructedAmount..amount", Op::Gt, num(1.0))],
        inbound("x.*", pb::Effect::Allow),
    );
    expect_invalid(
        globex_admin
            .create_rule(pb::CreateRuleRequest {
                rule: Some(bad_rule),
            })
            .await,
        "rule.conditions[0].detail_path",
    );
    assert_eq!(server.count("delegations").await, before);
}

// ---------------------------------------------------------------------------
// Budgets.

/// A COUNT budget lets `limit` requests through in its window, then applies
/// its over-limit effect; GetBudget shows limit, used, remaining and when
/// capacity frees up; the block names the budget to its owner.
#[tokio::test]
async fn a_count_budget_blocks_past_its_limit_and_shows_its_use() {
    let pair = setup_pair().await;
    vaultguard_tests::parts!(pair => globex, agent, acme_admin);
    pair.globex_allows("orders.*").await;
    let orders = create_budget(
        acme_admin,
        budget(
            "orders-per-hour",
            pb::RuleDirection::Outbound,
            "3",
            pb::Effect::Block,
        ),
    )
    .await;
    assert_eq!(
        (orders.used.as_str(), orders.remaining.as_str()),
        ("0", "3")
    );
    for _ in 0..3 {
        granted(
            agent
                .request_delegation(ask(&globex.id, "orders.create"))
                .await,
        );
    }
    let metadata = expect_reason(
        agent
            .request_delegation(ask(&globex.id, "orders.create"))
            .await,
        Code::PermissionDenied,
        Reason::BudgetExceeded,
    );
    assert_eq!(metadata["budget_id"], orders.id);
    assert_eq!(metadata["policy_side"], "outbound");
    let now = get_budget(acme_admin, &orders.id).await;
    assert_eq!((now.used.as_str(), now.remaining.as_str()), ("3", "0"));
    let frees = now.next_release_time.expect("a release time").seconds;
    let created = now.create_time.unwrap().seconds;
    assert!(
        (created + 3590..=created + 3610).contains(&frees),
        "{frees} vs {created}"
    );
}

/// A receiving tenant's INBOUND budget limits a partner's agents; the
/// partner is told a budget blocked it, not which.
#[tokio::test]
async fn an_inbound_budget_limits_a_partner_without_naming_itself() {
    let pair = setup_pair().await;
    vaultguard_tests::parts!(pair => globex, agent, globex_admin);
    pair.globex_allows("orders.*").await;
    create_budget(
        globex_admin,
        budget(
            "partner-orders",
            pb::RuleDirection::Inbound,
            "1",
            pb::Effect::Block,
        ),
    )
    .await;
    granted(
        agent
            .request_delegation(ask(&globex.id, "orders.create"))
            .await,
    );
    let metadata = expect_reason(
        agent
            .request_delegation(ask(&globex.id, "orders.create"))
            .await,
        Code::PermissionDenied,
        Reason::BudgetExceeded,
    );
    assert_eq!(metadata["policy_side"], "inbound");
    assert!(!metadata.contains_key("budget_id"), "{metadata:?}");
}

/// A SUM budget over payment amounts in one currency: amounts in another
/// currency do not count; past the limit a human decides; a denied step-up
/// releases what it held and an approved one spends it.
#[tokio::test]
async fn a_payment_budget_steps_up_past_its_limit_and_holds_until_decided() {
    let pair = setup_pair().await;
    vaultguard_tests::parts!(pair => server, globex, agent, acme_admin);
    pair.globex_allows("payments.*").await;
    let acme_approver = server.approver(&pair.acme.id, "ann").await;
    let daily = create_budget(
        acme_admin,
        payment_budget("eur-per-day", "1000.00", "EUR", pb::Effect::StepUp),
    )
    .await;
    granted(
        agent
            .request_delegation(paying(&globex.id, vec![payment("600.00", "EUR", "A")]))
            .await,
    );
    // Dollars are not euros.
    granted(
        agent
            .request_delegation(paying(&globex.id, vec![payment("5000", "USD", "A")]))
            .await,
    );
    assert_eq!(get_budget(acme_admin, &daily.id).await.used, "600");
    // 600 + 500 > 1000: a human of the receiving tenant decides; the
    // request holds its 500 meanwhile, so a 300 now would pass 1000 too.
    let globex_approver = server.approver(&globex.id, "gus").await;
    let first = request_step_up(
        agent,
        &globex_approver,
        paying(&globex.id, vec![payment("500.00", "EUR", "B")]),
    )
    .await;
    assert_eq!(get_budget(acme_admin, &daily.id).await.used, "1100");
    deny(&globex_approver, &first.step_up_id, "over budget")
        .await
        .unwrap();
    assert_eq!(get_budget(acme_admin, &daily.id).await.used, "600");
    let second = request_step_up(
        agent,
        &globex_approver,
        paying(&globex.id, vec![payment("450.00", "EUR", "B")]),
    )
    .await;
    approve_step_up(&globex_approver, &second.step_up_id, &second.request_hash)
        .await
        .unwrap();
    let now = get_budget(acme_admin, &daily.id).await;
    assert_eq!((now.used.as_str(), now.remaining.as_str()), ("1050", "0"));
    let _ = acme_approver;
    // A payment request that does not state an amount cannot slip past.
    let outcome = agent
        .request_delegation(ask(&globex.id, "payments.initiate"))
        .await;
    assert!(
        matches!(outcome, Ok(DelegationOutcome::StepUp { .. })),
        "{outcome:?}"
    );
}

/// The concurrency the issue names: 64 concurrent requests against one
/// budget never sum past its limit.
#[tokio::test]
async fn concurrent_requests_never_overspend_a_budget() {
    let pair = setup_pair().await;
    vaultguard_tests::parts!(pair => globex, agent, acme_admin);
    pair.globex_allows("payments.*").await;
    let limit = create_budget(
        acme_admin,
        payment_budget("tight", "1000", "EUR", pb::Effect::Block),
    )
    .await;
    let allowed = overspend_race(vec![agent.clone()], &globex.id, 64).await;
    assert_eq!(allowed, 10, "exactly 1000 / 100 payments pass");
    assert_eq!(get_budget(acme_admin, &limit.id).await.used, "1000");
}

/// 64 payments of 100 EUR, as fast as `agents` (round-robin) can send them;
/// returns how many were allowed.
async fn overspend_race(agents: Vec<VaultGuardClient>, globex: &str, n: usize) -> usize {
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let agent = agents[i % agents.len()].clone();
        let request = paying(globex, vec![payment("100", "EUR", "A")]);
        tasks.spawn(async move { agent.request_delegation(request).await });
    }
    let mut allowed = 0;
    while let Some(result) = tasks.join_next().await {
        match result.expect("task") {
            Ok(DelegationOutcome::Allowed { .. }) => allowed += 1,
            Err(err) => assert_eq!(
                err.reason(),
                Some(Reason::BudgetExceeded),
                "only budget refusals: {err:?}"
            ),
            Ok(other) => panic!("unexpected {other:?}"),
        }
    }
    allowed
}

/// Two replicas over one PostgreSQL charge one budget: still never past it.
#[tokio::test]
async fn postgres_only_two_replicas_never_overspend_a_budget() {
    require_backend(Backend::Postgres);
    let pair = setup_pair().await;
    vaultguard_tests::parts!(pair => server, globex, acme_admin);
    pair.globex_allows("payments.*").await;
    let limit = create_budget(
        acme_admin,
        payment_budget("tight", "1000", "EUR", pb::Effect::Block),
    )
    .await;
    let replica = TestServer::start_replica_of(server).await;
    let (bot2, secret, _) = server.create_agent(&pair.acme.id, "bot2").await;
    let on_replica = replica
        .anonymous()
        .await
        .with_client_credentials(bot2.id.clone(), secret);
    let allowed = overspend_race(vec![pair.agent.clone(), on_replica], &globex.id, 64).await;
    assert_eq!(allowed, 10);
    assert_eq!(get_budget(acme_admin, &limit.id).await.used, "1000");
}

/// Budget edits are audited, versioned, and the tenant's own only.
#[tokio::test]
async fn budgets_are_audited_versioned_and_the_tenants_own() {
    let pair = setup_pair().await;
    vaultguard_tests::parts!(pair => server, acme, acme_admin, globex_admin);
    let created = create_budget(
        acme_admin,
        budget(
            "orders",
            pb::RuleDirection::Outbound,
            "10",
            pb::Effect::StepUp,
        ),
    )
    .await;
    let updated = acme_admin
        .update_budget(pb::UpdateBudgetRequest {
            budget_id: created.id.clone(),
            expected_version: 1,
            limit: "20".into(),
            window_seconds: 7200,
            over_limit: pb::Effect::Block as i32,
            description: "twenty".into(),
        })
        .await
        .unwrap()
        .budget
        .unwrap();
    assert_eq!((updated.limit.as_str(), updated.version), ("20", 2));
    expect_reason(
        acme_admin
            .update_budget(pb::UpdateBudgetRequest {
                budget_id: created.id.clone(),
                expected_version: 1,
                limit: "30".into(),
                window_seconds: 7200,
                over_limit: pb::Effect::Block as i32,
                description: String::new(),
            })
            .await,
        Code::FailedPrecondition,
        Reason::InvalidState,
    );
    expect_code(
        acme_admin
            .create_budget(pb::CreateBudgetRequest {
                budget: Some(budget(
                    "orders",
                    pb::RuleDirection::Outbound,
                    "1",
                    pb::Effect::Block,
                )),
            })
            .await,
        Code::AlreadyExists,
    );
    // Another tenant sees nothing of it.
    let id = created.id.clone();
    expect_code(
        globex_admin
            .get_budget(pb::GetBudgetRequest {
                budget_id: id.clone(),
            })
            .await,
        Code::NotFound,
    );
    expect_code(
        globex_admin
            .update_budget(pb::UpdateBudgetRequest {
                budget_id: id.clone(),
                expected_version: 2,
                limit: "1".into(),
                window_seconds: 60,
                over_limit: pb::Effect::Block as i32,
                description: String::new(),
            })
            .await,
        Code::NotFound,
    );
    expect_code(
        globex_admin
            .delete_budget(pb::DeleteBudgetRequest {
                budget_id: id.clone(),
            })
            .await,
        Code::NotFound,
    );
    let listed = globex_admin
        .list_budgets(pb::ListBudgetsRequest::default())
        .await
        .unwrap();
    assert!(listed.budgets.is_empty());
    // An agent may not read budgets.
    expect_reason(
        pair.agent
            .list_budgets(pb::ListBudgetsRequest::default())
            .await,
        Code::PermissionDenied,
        Reason::RoleRequired,
    );
    acme_admin
        .delete_budget(pb::DeleteBudgetRequest {
            budget_id: id.clone(),
        })
        .await
        .unwrap();
    for event in ["budget.created", "budget.updated", "budget.deleted"] {
        assert_eq!(server.audit_count(&acme.id, event, &id).await, 1, "{event}");
    }
}

/// Bad budgets are INVALID_ARGUMENT naming the field, and nothing is stored.
#[tokio::test]
async fn bad_budgets_name_the_field_and_store_nothing() {
    let pair = setup_pair().await;
    vaultguard_tests::parts!(pair => server, acme_admin);
    let ok = || budget("b", pb::RuleDirection::Outbound, "10", pb::Effect::Block);
    let cases = [
        (
            pb::Budget {
                name: "Bad Name".into(),
                ..ok()
            },
            "budget.name",
        ),
        (
            pb::Budget {
                limit: "0".into(),
                ..ok()
            },
            "budget.limit",
        ),
        (
            pb::Budget {
                limit: "1.5".into(),
                ..ok()
            },
            "budget.limit",
        ),
        (
            pb::Budget {
                limit: "ten".into(),
                ..ok()
            },
            "budget.limit",
        ),
        (
            pb::Budget {
                window_seconds: 10,
                ..ok()
            },
            "budget.window_seconds",
        ),
        (
            pb::Budget {
                over_limit: pb::Effect::Allow as i32,
                ..ok()
            },
            "budget.over_limit",
        ),
        (pb::Budget { measure: 0, ..ok() }, "budget.measure"),
        (
            pb::Budget {
                direction: 0,
                ..ok()
            },
            "budget.direction",
        ),
        (
            pb::Budget {
                id: "bgt_x".into(),
                ..ok()
            },
            "budget.id",
        ),
        (
            pb::Budget {
                sum_attribute: "amount".into(),
                ..ok()
            },
            "budget.sum_attribute",
        ),
        (
            pb::Budget {
                measure: pb::BudgetMeasure::Sum as i32,
                ..ok()
            },
            "budget.sum_attribute",
        ),
        (
            pb::Budget {
                scope: Some(pb::BudgetScope {
                    action_pattern: "Bad*".into(),
                    ..Default::default()
                }),
                ..ok()
            },
            "budget.scope.action_pattern",
        ),
        (
            pb::Budget {
                scope: Some(pb::BudgetScope {
                    agent_id: "agt_nope".into(),
                    ..Default::default()
                }),
                ..ok()
            },
            "budget.scope.agent_id",
        ),
        (
            pb::Budget {
                measure: pb::BudgetMeasure::Sum as i32,
                sum_detail_type: "payment_initiation".into(),
                sum_detail_path: "a..b".into(),
                ..ok()
            },
            "budget.sum_detail_path",
        ),
    ];
    for (bad, field) in cases {
        expect_invalid(
            acme_admin
                .create_budget(pb::CreateBudgetRequest { budget: Some(bad) })
                .await,
            field,
        );
    }
    assert_eq!(server.count("budgets").await, 0);
}

/// A budget on a signing key: what the key's signatures state as `amount`
/// may sum to 1,000 a day; past that a human decides. The step-up holds its
/// amount, its denial releases it, and a refused signature costs nothing.
#[tokio::test]
async fn a_budget_on_a_signing_key_limits_its_signatures() {
    use crate::vault_signing::{Party, approve, sign_message, sign_now, step_up_of, stepped_up};
    let server = TestServer::start().await;
    let acme = Party::new(&server, "acme").await;
    let key = acme.key("treasury", pb::KeyAlgorithm::Ed25519).await;
    acme.allows(&key).await;
    let cap = create_budget(
        &acme.admin,
        pb::Budget {
            measure: pb::BudgetMeasure::Sum as i32,
            sum_attribute: "amount".into(),
            scope: Some(pb::BudgetScope {
                signing_key_id: key.id.clone(),
                ..Default::default()
            }),
            window_seconds: 86_400,
            ..budget(
                "treasury-daily",
                pb::RuleDirection::Outbound,
                "1000",
                pb::Effect::StepUp,
            )
        },
    )
    .await;
    let paying = |amount: f64, idempotency_key: &str| pb::SignRequest {
        context: vaultguard_tests::fixtures::context(&[("amount", num(amount))]),
        ..sign_message(
            &key.id,
            b"pay",
            pb::SigningScheme::Ed25519Pure,
            idempotency_key,
        )
    };
    sign_now(&acme.agent, paying(600.0, "s1")).await;
    let over = stepped_up(&acme.agent.sign(paying(600.0, "s2")).await.unwrap());
    assert_eq!(get_budget(&acme.admin, &cap.id).await.used, "1200");
    let step_up = step_up_of(&acme.approver, &over).await;
    deny(&acme.approver, &step_up.step_up_id, "not today")
        .await
        .unwrap();
    assert_eq!(get_budget(&acme.admin, &cap.id).await.used, "600");
    // A request that states no amount is not let past the budget either.
    let unstated = sign_message(&key.id, b"pay", pb::SigningScheme::Ed25519Pure, "s3");
    stepped_up(&acme.agent.sign(unstated).await.unwrap());
    let approved = stepped_up(&acme.agent.sign(paying(500.0, "s4")).await.unwrap());
    approve(&acme.approver, &approved).await;
    assert_eq!(get_budget(&acme.admin, &cap.id).await.used, "1100");
}

/// A budget on a connection: its tenant's agents may exchange its token at
/// most twice an hour; the third exchange is refused, naming the budget.
#[tokio::test]
async fn a_budget_on_a_connection_limits_its_exchanges() {
    use crate::vault_connections::{connected, exchange_request};
    let (fixture, connection_id) = connected().await;
    let pair = &fixture.pair;
    let budget = create_budget(
        &pair.acme_admin,
        pb::Budget {
            scope: Some(pb::BudgetScope {
                connection_id: connection_id.clone(),
                ..Default::default()
            }),
            ..budget(
                "mail-exchanges",
                pb::RuleDirection::Outbound,
                "2",
                pb::Effect::Block,
            )
        },
    )
    .await;
    for _ in 0..2 {
        pair.agent
            .exchange_token(exchange_request(&connection_id))
            .await
            .expect("exchange within the budget");
    }
    let metadata = expect_reason(
        pair.agent
            .exchange_token(exchange_request(&connection_id))
            .await,
        Code::PermissionDenied,
        Reason::BudgetExceeded,
    );
    assert_eq!(metadata["budget_id"], budget.id);
    assert_eq!(get_budget(&pair.acme_admin, &budget.id).await.used, "2");
}
