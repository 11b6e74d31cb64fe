//! Policies: rule CRUD with rule and tenant policy versions and audit events,
//! bad input that writes nothing, isolation between tenants, roles, the
//! EvaluatePolicy dry run, the evaluation order of each side, the outbound
//! default, and why a tenant's inbound rule never speaks for a third tenant.

use sea_orm::{ColumnTrait, QueryFilter};
use tonic::Code;
use vaultguard_client::{ClientError, VaultGuardClient, pb};
use vaultguard_server::store::entities::audit_event;
use vaultguard_tests::{TestServer, expect_code, expect_invalid, expect_reason};

use crate::delegations::{ask, bad_requests, evaluation, setup_pair};
use vaultguard_tests::Rpc;
use vaultguard_tests::calls::{delete_rule, get_rule, update_rule};
pub(crate) use vaultguard_tests::fixtures::{
    add_rule, cond, context, create_rule, inbound, num, outbound, rule, text, when,
    with_counterpart,
};

type Op = pb::ConditionOperator;

// ---------------------------------------------------------------------------
// Rules and context values.

/// A membership test of `attribute` (IN, NOT_IN).
fn cond_in(attribute: &str, operator: Op, values: Vec<pb::AttributeValue>) -> pb::Condition {
    pb::Condition {
        attribute: attribute.to_owned(),
        operator: operator as i32,
        value: None,
        values,
        ..Default::default()
    }
}

/// Asserts `id` is `prefix` followed by 32 lowercase hex digits.
#[track_caller]
pub(crate) fn assert_id(id: &str, prefix: &str) {
    let rest = id
        .strip_prefix(prefix)
        .unwrap_or_else(|| panic!("{id} lacks {prefix}"));
    assert!(
        rest.len() == 32 && rest.chars().all(|c| matches!(c, '0'..='9' | 'a'..='f')),
        "{id} is not {prefix} + 32 lowercase hex digits"
    );
}

/// Asserts the optimistic-concurrency refusal: FAILED_PRECONDITION,
/// INVALID_STATE, `state` = "version_mismatch" and the current version.
#[track_caller]
fn expect_version_mismatch<T: std::fmt::Debug>(result: Result<T, ClientError>, current: &str) {
    let metadata = expect_reason(
        result,
        Code::FailedPrecondition,
        pb::ErrorReason::InvalidState,
    );
    let value = |key: &str| metadata.get(key).cloned().unwrap_or_default();
    assert_eq!(
        (value("state"), value("current_version")),
        ("version_mismatch".to_owned(), current.to_owned())
    );
}

// ---------------------------------------------------------------------------
// PolicyService calls.

async fn list_rules(
    admin: &VaultGuardClient,
    filter: pb::ListRulesRequest,
) -> Result<pb::ListRulesResponse, ClientError> {
    admin.list_rules(filter).await
}

pub(crate) async fn settings(admin: &VaultGuardClient) -> Result<pb::PolicySettings, ClientError> {
    let response = admin
        .get_policy_settings(pb::GetPolicySettingsRequest {})
        .await?;
    Ok(response.settings.expect("settings"))
}

pub(crate) async fn set_outbound_default(
    admin: &VaultGuardClient,
    outbound_default: pb::OutboundDefault,
    expected_policy_version: u64,
) -> Result<pb::PolicySettings, ClientError> {
    let response = admin
        .update_policy_settings(pb::UpdatePolicySettingsRequest {
            outbound_default: outbound_default as i32,
            expected_policy_version,
        })
        .await?;
    Ok(response.settings.expect("settings"))
}

pub(crate) async fn evaluate(
    client: &VaultGuardClient,
    input: pb::EvaluatePolicyRequest,
) -> Result<pb::PolicyDecision, ClientError> {
    let response = client.evaluate_policy(input).await?;
    Ok(response.decision.expect("decision"))
}

/// What RequestDelegation would decide for `agent_id` asking `receiving`
/// for `action` with `pairs` as context (evaluated by the caller, an admin of
/// the agent's tenant or the agent itself).
async fn judge(
    client: &VaultGuardClient,
    agent_id: &str,
    receiving: &str,
    action: &str,
    pairs: &[(&str, pb::AttributeValue)],
) -> pb::PolicyDecision {
    let request = pb::RequestDelegationRequest {
        context: context(pairs),
        ..ask(receiving, action)
    };
    evaluate(client, evaluation(agent_id, request))
        .await
        .expect("evaluate policy")
}

/// `decision` (an EvaluatePolicy answer) with each side as the tenant that
/// owns it sees it: a requester sees none of the receiving tenant's rule
/// ids, versions or caps (nor the reverse), so they are read back from the
/// owner's own `policy.evaluated` event, the newest in its log.
async fn owner_view(server: &TestServer, mut decision: pb::PolicyDecision) -> pb::PolicyDecision {
    let sides = [
        ("outbound", decision.outbound.as_mut()),
        ("inbound", decision.inbound.as_mut()),
    ];
    for (name, side) in sides {
        let Some(side) = side else { continue };
        let event = server
            .audit_events(&side.tenant_id, "policy.evaluated")
            .await
            .pop()
            .expect("the owner's policy.evaluated event");
        let details: serde_json::Value = serde_json::from_str(&event.details).expect("json");
        let owned = &details["decision"][name];
        side.rule_id = owned["rule_id"].as_str().unwrap_or_default().to_owned();
        side.policy_version = owned["policy_version"].as_u64().unwrap_or_default();
        side.max_ttl_seconds = owned["max_ttl_seconds"]
            .as_u64()
            .and_then(|t| u32::try_from(t).ok())
            .unwrap_or_default();
    }
    decision
}

#[track_caller]
fn assert_side(side: Option<&pb::SideDecision>, outcome: pb::Decision, rule_id: &str, what: &str) {
    let side = side.unwrap_or_else(|| panic!("{what}: side missing"));
    assert_eq!(
        (side.outcome, side.rule_id.as_str()),
        (outcome as i32, rule_id),
        "{what}: {side:?}"
    );
}

/// `decision`'s outbound side: `outcome`, decided by `rule_id`.
#[track_caller]
fn assert_outbound(
    decision: &pb::PolicyDecision,
    outcome: pb::Decision,
    rule_id: &str,
    what: &str,
) {
    assert_side(decision.outbound.as_ref(), outcome, rule_id, what);
}

/// `decision`'s inbound side as the receiving tenant sees it: `outcome`,
/// decided by `rule_id`.
async fn assert_inbound(
    server: &TestServer,
    decision: &pb::PolicyDecision,
    outcome: pb::Decision,
    rule_id: &str,
    what: &str,
) {
    let seen = owner_view(server, decision.clone()).await;
    assert_side(seen.inbound.as_ref(), outcome, rule_id, what);
}

/// The rule without its output-only fields.
fn mutable_part(rule: &pb::Rule) -> pb::Rule {
    pb::Rule {
        id: String::new(),
        create_time: None,
        update_time: None,
        version: 0,
        update_actor: None,
        ..rule.clone()
    }
}

/// Each PolicyService RPC but EvaluatePolicy, called by `client` on `rule`.
async fn every_policy_call(
    client: &VaultGuardClient,
    rule: &pb::Rule,
) -> Vec<(&'static str, Result<(), ClientError>)> {
    let draft = mutable_part(rule);
    vec![
        ("CreateRule", create_rule(client, draft).await.map(drop)),
        ("GetRule", get_rule(client, &rule.id).await.map(drop)),
        (
            "ListRules",
            list_rules(client, pb::ListRulesRequest::default())
                .await
                .map(drop),
        ),
        (
            "UpdateRule",
            update_rule(client, rule.clone(), rule.version)
                .await
                .map(drop),
        ),
        (
            "DeleteRule",
            delete_rule(client, &rule.id, 0).await.map(drop),
        ),
        ("GetPolicySettings", settings(client).await.map(drop)),
        (
            "UpdatePolicySettings",
            set_outbound_default(client, pb::OutboundDefault::Block, 0)
                .await
                .map(drop),
        ),
    ]
}

/// The (policy_rules, audit_events) row counts, for "nothing written".
/// Rules and audit events, apart from the `auth.not_found` trail of
/// NOT_FOUND answers (which the tests check on their own).
async fn footprint(server: &TestServer) -> (i64, i64) {
    let not_found = i64::try_from(
        <audit_event::Entity as sea_orm::EntityTrait>::find()
            .filter(audit_event::Column::EventType.eq("auth.not_found"))
            .all(&server.state.db)
            .await
            .expect("auth.not_found events")
            .len(),
    )
    .expect("count");
    (
        server.count("policy_rules").await,
        server.count("audit_events").await - not_found,
    )
}

// ---------------------------------------------------------------------------
// CRUD, versions, audit.

#[tokio::test]
async fn rule_crud_round_trip_bumps_versions_and_is_audited() {
    let pair = setup_pair().await;
    vaultguard_tests::parts!(pair => server, acme, globex, acme_admin: admin);
    assert_eq!(settings(admin).await.unwrap().policy_version, 0);

    let draft = pb::Rule {
        conditions: vec![cond("amount", Op::Lt, num(100.0))],
        time_window: Some(pb::TimeWindow {
            start_minute: 480,
            end_minute: 1080,
            days_of_week: vec![pb::Weekday::Monday as i32, pb::Weekday::Friday as i32],
        }),
        max_ttl_seconds: 600,
        priority: 5,
        approvals_required: 3,
        description: "globex may restock small amounts".into(),
        ..with_counterpart(&globex.id, inbound("stock.*", pb::Effect::Allow))
    };
    let created = create_rule(admin, draft.clone()).await.unwrap();
    assert_eq!(created.policy_version, 1);
    let rule = created.rule.unwrap();
    assert_id(&rule.id, "rul_");
    assert_eq!(rule.version, 1);
    assert_eq!(
        mutable_part(&rule),
        pb::Rule {
            approvals_required: 0,
            ..draft
        },
        "every field round-trips; approvals_required is 0 for ALLOW"
    );
    assert!(rule.create_time.is_some() && rule.update_time.is_some());
    assert_eq!(
        rule.update_actor,
        Some(pb::Actor {
            kind: pb::PrincipalKind::Human as i32,
            subject: "alice".into(),
            tenant_id: acme.id.clone(),
        })
    );
    assert_eq!(get_rule(admin, &rule.id).await.unwrap(), rule);

    // A full replacement with the current version.
    let replacement = pb::Rule {
        effect: pb::Effect::StepUp as i32,
        approvals_required: 2,
        priority: 7,
        conditions: Vec::new(),
        time_window: None,
        max_ttl_seconds: 0,
        description: String::new(),
        ..rule.clone()
    };
    let updated = update_rule(admin, replacement.clone(), 1).await.unwrap();
    assert_eq!(updated.policy_version, 2);
    let updated = updated.rule.unwrap();
    assert_eq!(updated.version, 2);
    assert_eq!(updated.id, rule.id);
    assert_eq!(updated.create_time, rule.create_time);
    assert_eq!(mutable_part(&updated), mutable_part(&replacement));
    assert_eq!(get_rule(admin, &rule.id).await.unwrap(), updated);

    // A stale version is refused and changes nothing.
    expect_version_mismatch(update_rule(admin, replacement.clone(), 1).await, "2");
    expect_invalid(
        update_rule(admin, replacement.clone(), 0).await,
        "expected_version",
    );
    let turned = pb::Rule {
        direction: pb::RuleDirection::Outbound as i32,
        ..replacement.clone()
    };
    expect_invalid(update_rule(admin, turned, 2).await, "rule.direction");
    let unknown = pb::Rule {
        id: format!("rul_{}", "0".repeat(32)),
        ..replacement
    };
    expect_code(update_rule(admin, unknown, 1).await, Code::NotFound);
    assert_eq!(get_rule(admin, &rule.id).await.unwrap(), updated);
    assert_eq!(settings(admin).await.unwrap().policy_version, 2);

    // Delete: a stale non-zero version is refused, the current one deletes.
    expect_version_mismatch(delete_rule(admin, &rule.id, 1).await, "2");
    assert_eq!(
        delete_rule(admin, &rule.id, 2)
            .await
            .unwrap()
            .policy_version,
        3
    );
    expect_code(get_rule(admin, &rule.id).await, Code::NotFound);
    expect_code(delete_rule(admin, &rule.id, 0).await, Code::NotFound);
    expect_invalid(get_rule(admin, "").await, "rule_id");

    // Expected version 0 deletes unconditionally.
    let second = create_rule(admin, outbound("*", pb::Effect::Block))
        .await
        .unwrap();
    assert_eq!(second.policy_version, 4);
    let second = second.rule.unwrap();
    assert_eq!(
        delete_rule(admin, &second.id, 0)
            .await
            .unwrap()
            .policy_version,
        5
    );
    assert_eq!(server.count("policy_rules").await, 0);

    // One event per change, in the tenant's own log only.
    for (event_type, rule_id, expected) in [
        ("rule.created", &rule.id, 1),
        ("rule.updated", &rule.id, 1),
        ("rule.deleted", &rule.id, 1),
        ("rule.created", &second.id, 1),
        ("rule.deleted", &second.id, 1),
    ] {
        assert_eq!(
            server.audit_count(&acme.id, event_type, rule_id).await,
            expected,
            "{event_type} for {rule_id}"
        );
    }
    for event_type in ["rule.created", "rule.updated", "rule.deleted"] {
        let events = server.audit_events(&acme.id, event_type).await;
        assert!(events.iter().all(|e| e.outcome == "success"), "{events:?}");
        assert!(server.audit_events(&globex.id, event_type).await.is_empty());
    }
    pair.server.stop().await;
}

#[tokio::test]
async fn policy_settings_default_to_allow_and_updates_bump_the_version() {
    let pair = setup_pair().await;
    vaultguard_tests::parts!(pair => server, acme, acme_admin: admin);

    let initial = settings(admin).await.unwrap();
    assert_eq!(initial.outbound_default, pb::OutboundDefault::Allow as i32);
    assert_eq!(initial.policy_version, 0);
    assert!(initial.update_time.is_none() && initial.update_actor.is_none());
    add_rule(admin, outbound("stock.*", pb::Effect::Allow)).await;

    expect_version_mismatch(
        set_outbound_default(admin, pb::OutboundDefault::Block, 7).await,
        "1",
    );
    expect_invalid(
        set_outbound_default(admin, pb::OutboundDefault::Unspecified, 0).await,
        "outbound_default",
    );
    assert_eq!(settings(admin).await.unwrap().policy_version, 1);

    let blocked = set_outbound_default(admin, pb::OutboundDefault::Block, 1)
        .await
        .unwrap();
    assert_eq!(blocked.outbound_default, pb::OutboundDefault::Block as i32);
    assert_eq!(blocked.policy_version, 2);
    assert!(blocked.update_time.is_some());
    assert_eq!(blocked.update_actor.as_ref().unwrap().subject, "alice");
    assert_eq!(settings(admin).await.unwrap(), blocked);

    let allowed = set_outbound_default(admin, pb::OutboundDefault::Allow, 0)
        .await
        .unwrap();
    assert_eq!(allowed.policy_version, 3);
    assert_eq!(
        server
            .audit_events(&acme.id, "policy.settings_updated")
            .await
            .len(),
        2
    );
    pair.server.stop().await;
}

#[tokio::test]
async fn rules_are_listed_in_evaluation_order_and_paged() {
    let pair = setup_pair().await;
    vaultguard_tests::parts!(pair => server, globex, acme_admin: admin, globex_admin);
    let (bot, _, _) = server.create_agent(&globex.id, "bot").await;
    let from_globex = |rule: pb::Rule| with_counterpart(&globex.id, rule);

    // Created in scrambled order; listed by the evaluation order.
    let outbound_any = add_rule(admin, outbound("*", pb::Effect::Allow)).await;
    let star = add_rule(admin, inbound("*", pb::Effect::Allow)).await;
    let stock = add_rule(admin, inbound("stock.*", pb::Effect::Allow)).await;
    let counterpart = add_rule(admin, from_globex(inbound("stock.*", pb::Effect::Allow))).await;
    let stock_block = add_rule(admin, inbound("stock.*", pb::Effect::Block)).await;
    let trade = add_rule(admin, inbound("stock.trade.*", pb::Effect::Allow)).await;
    let conditioned = add_rule(
        admin,
        when(
            vec![cond("amount", Op::Gt, num(1.0))],
            from_globex(inbound("stock.*", pb::Effect::Allow)),
        ),
    )
    .await;
    let agent_specific = add_rule(
        admin,
        pb::Rule {
            agent_id: bot.id.clone(),
            ..from_globex(inbound("stock.*", pb::Effect::Allow))
        },
    )
    .await;
    let exact = add_rule(admin, inbound("stock.write", pb::Effect::Allow)).await;
    let prioritized = add_rule(
        admin,
        pb::Rule {
            priority: 10,
            ..inbound("*", pb::Effect::Block)
        },
    )
    .await;
    let expected: Vec<String> = [
        &prioritized,    // 1. priority
        &exact,          // 2. exact action
        &trade,          // 2. more literal segments
        &agent_specific, // 3+4. counterpart and agent
        &conditioned,    // 3+5. counterpart and a condition
        &counterpart,    // 3. counterpart
        &stock_block,    // 6. tie: BLOCK before ALLOW
        &stock,
        &star,         // the lone `*` last
        &outbound_any, // INBOUND before OUTBOUND
    ]
    .iter()
    .map(|rule| rule.id.clone())
    .collect();

    let all = list_rules(admin, pb::ListRulesRequest::default())
        .await
        .unwrap();
    let ids: Vec<String> = all.rules.iter().map(|r| r.id.clone()).collect();
    assert_eq!(ids, expected);
    assert_eq!(all.policy_version, 10);
    assert!(all.page.unwrap().next_page_token.is_empty());

    // Pages of three cover the same order, then stop.
    let mut paged = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let filter = pb::ListRulesRequest {
            page: Some(pb::PageRequest {
                page_size: 3,
                page_token: token,
            }),
            ..Default::default()
        };
        let page = list_rules(admin, filter).await.unwrap();
        assert!(page.rules.len() <= 3);
        paged.extend(page.rules.into_iter().map(|r| r.id));
        pages += 1;
        token = page.page.unwrap().next_page_token;
        if token.is_empty() {
            break;
        }
    }
    assert_eq!(paged, expected);
    assert_eq!(pages, 4);

    // Filters.
    let ids_of = |response: pb::ListRulesResponse| -> Vec<String> {
        response.rules.into_iter().map(|r| r.id).collect()
    };
    let outbound_only = pb::ListRulesRequest {
        direction: pb::RuleDirection::Outbound as i32,
        ..Default::default()
    };
    assert_eq!(
        ids_of(list_rules(admin, outbound_only).await.unwrap()),
        vec![outbound_any.id.clone()]
    );
    let for_globex = pb::ListRulesRequest {
        counterpart_tenant_id: globex.id.clone(),
        ..Default::default()
    };
    assert_eq!(
        ids_of(list_rules(admin, for_globex).await.unwrap()),
        vec![
            agent_specific.id.clone(),
            conditioned.id.clone(),
            counterpart.id.clone()
        ],
        "rules for any tenant are not included"
    );
    let for_bot = pb::ListRulesRequest {
        agent_id: bot.id.clone(),
        ..Default::default()
    };
    assert_eq!(
        ids_of(list_rules(admin, for_bot).await.unwrap()),
        vec![agent_specific.id.clone()]
    );

    // Bad page requests; a token is bound to its filters and tenant.
    let first = list_rules(
        admin,
        pb::ListRulesRequest {
            page: Some(pb::PageRequest {
                page_size: 2,
                page_token: String::new(),
            }),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let token = first.page.unwrap().next_page_token;
    let with_token = |direction: pb::RuleDirection, page_token: &str| pb::ListRulesRequest {
        direction: direction as i32,
        page: Some(pb::PageRequest {
            page_size: 2,
            page_token: page_token.to_owned(),
        }),
        ..Default::default()
    };
    expect_invalid(
        list_rules(admin, with_token(pb::RuleDirection::Unspecified, "garbage")).await,
        "page.page_token",
    );
    expect_invalid(
        list_rules(admin, with_token(pb::RuleDirection::Inbound, &token)).await,
        "page.page_token",
    );
    expect_invalid(
        list_rules(
            globex_admin,
            with_token(pb::RuleDirection::Unspecified, &token),
        )
        .await,
        "page.page_token",
    );
    let oversized = pb::ListRulesRequest {
        page: Some(pb::PageRequest {
            page_size: 501,
            page_token: String::new(),
        }),
        ..Default::default()
    };
    expect_invalid(list_rules(admin, oversized).await, "page.page_size");
    pair.server.stop().await;
}

// ---------------------------------------------------------------------------
// Bad input.

/// Rules that break one limit each, with the field the violation must name
/// (`|` separates acceptable names where the contract leaves it open).
fn bad_rules(tenant_id: &str) -> Vec<(&'static str, pb::Rule)> {
    let base = || inbound("stock.write", pb::Effect::Allow);
    let pattern = |pattern: &str| pb::Rule {
        action_pattern: pattern.to_owned(),
        ..base()
    };
    let conditioned = |conditions: Vec<pb::Condition>| when(conditions, base());
    let window = |start_minute: u32, end_minute: u32, days: &[pb::Weekday]| pb::Rule {
        time_window: Some(pb::TimeWindow {
            start_minute,
            end_minute,
            days_of_week: days.iter().map(|d| *d as i32).collect(),
        }),
        ..base()
    };
    let ok_condition = cond("amount", Op::Gt, num(1.0));
    vec![
        ("rule.action_pattern", pattern("stock.wr*")),
        ("rule.action_pattern", pattern("sign:*")),
        ("rule.action_pattern", pattern("Stock.Write")),
        ("rule.action_pattern", pattern("a..b")),
        ("rule.action_pattern", pattern("")),
        ("rule.action_pattern", pattern("stock.")),
        ("rule.action_pattern", pattern(".stock")),
        ("rule.action_pattern", pattern("*.write")),
        ("rule.action_pattern", pattern("stock.*.write")),
        ("rule.action_pattern", pattern("stock write")),
        ("rule.action_pattern", pattern(&"a".repeat(65))),
        (
            "rule.action_pattern",
            pattern(&format!("{}.{}", "a".repeat(64), "b".repeat(64))),
        ),
        (
            "rule.direction",
            rule(
                pb::RuleDirection::Unspecified,
                "stock.write",
                pb::Effect::Allow,
            ),
        ),
        (
            "rule.effect",
            inbound("stock.write", pb::Effect::Unspecified),
        ),
        (
            "rule.counterpart_tenant_id",
            with_counterpart(&format!("tnt_{}", "0".repeat(32)), base()),
        ),
        (
            "rule.counterpart_tenant_id",
            with_counterpart(&"t".repeat(65), base()),
        ),
        (
            "rule.agent_id",
            pb::Rule {
                agent_id: format!("agt_{}", "0".repeat(32)),
                ..base()
            },
        ),
        (
            "rule.conditions[0].attribute",
            conditioned(vec![cond("Amount", Op::Gt, num(1.0))]),
        ),
        (
            "rule.conditions[0].attribute",
            conditioned(vec![cond(&"a".repeat(65), Op::Gt, num(1.0))]),
        ),
        (
            "rule.conditions[0].operator",
            conditioned(vec![cond("amount", Op::Unspecified, num(1.0))]),
        ),
        (
            "rule.conditions[0].value",
            conditioned(vec![cond("amount", Op::Gt, text("1000"))]),
        ),
        (
            "rule.conditions[1].value",
            conditioned(vec![
                ok_condition.clone(),
                cond_in("amount", Op::Lte, Vec::new()),
            ]),
        ),
        (
            "rule.conditions[0].value",
            conditioned(vec![pb::Condition {
                value: Some(text("EUR")),
                ..cond_in("currency", Op::In, vec![text("EUR")])
            }]),
        ),
        (
            "rule.conditions[0].values",
            conditioned(vec![cond_in("currency", Op::In, Vec::new())]),
        ),
        (
            "rule.conditions[0].values",
            conditioned(vec![cond_in(
                "currency",
                Op::NotIn,
                (0..65).map(|n| text(&format!("c{n}"))).collect(),
            )]),
        ),
        (
            "rule.conditions[0].values",
            conditioned(vec![cond_in("currency", Op::Exists, vec![text("EUR")])]),
        ),
        (
            "rule.conditions",
            conditioned(vec![ok_condition.clone(); 17]),
        ),
        ("rule.time_window.start_minute", window(1440, 60, &[])),
        ("rule.time_window.end_minute", window(60, 0, &[])),
        ("rule.time_window.end_minute", window(60, 1441, &[])),
        (
            "rule.time_window.start_minute|rule.time_window.end_minute|rule.time_window",
            window(60, 60, &[]),
        ),
        (
            "rule.time_window.days_of_week|rule.time_window.days_of_week[0]",
            window(60, 120, &[pb::Weekday::Unspecified]),
        ),
        (
            "rule.time_window.days_of_week|rule.time_window.days_of_week[1]",
            window(60, 120, &[pb::Weekday::Monday, pb::Weekday::Monday]),
        ),
        (
            "rule.max_ttl_seconds",
            pb::Rule {
                max_ttl_seconds: 30,
                ..base()
            },
        ),
        (
            "rule.max_ttl_seconds",
            pb::Rule {
                max_ttl_seconds: 86_401,
                ..base()
            },
        ),
        (
            "rule.approvals_required",
            pb::Rule {
                approvals_required: 11,
                ..inbound("stock.write", pb::Effect::StepUp)
            },
        ),
        (
            "rule.description",
            pb::Rule {
                description: "d".repeat(513),
                ..base()
            },
        ),
        (
            "rule.id",
            pb::Rule {
                id: format!("rul_{}", "1".repeat(32)),
                ..base()
            },
        ),
        (
            "rule.version",
            pb::Rule {
                version: 1,
                ..base()
            },
        ),
        (
            "rule.create_time",
            pb::Rule {
                create_time: Some(prost_types::Timestamp {
                    seconds: 1,
                    nanos: 0,
                }),
                ..base()
            },
        ),
        (
            "rule.update_time",
            pb::Rule {
                update_time: Some(prost_types::Timestamp {
                    seconds: 1,
                    nanos: 0,
                }),
                ..base()
            },
        ),
        (
            "rule.update_actor",
            pb::Rule {
                update_actor: Some(pb::Actor {
                    kind: pb::PrincipalKind::Human as i32,
                    subject: "mallory".into(),
                    tenant_id: tenant_id.to_owned(),
                }),
                ..base()
            },
        ),
    ]
}

#[tokio::test]
async fn bad_rules_are_refused_naming_the_field_and_write_nothing() {
    let pair = setup_pair().await;
    vaultguard_tests::parts!(pair => server, acme, globex, acme_admin: admin);
    let (globex_bot, _, _) = server.create_agent(&globex.id, "bot").await;
    let before = footprint(server).await;

    for (field, bad) in bad_rules(&acme.id) {
        let attempt = format!("{bad:?}");
        expect_invalid(create_rule(admin, bad).await, field);
        assert_eq!(
            footprint(server).await,
            before,
            "wrote something: {attempt}"
        );
    }
    expect_invalid(
        create_rule(admin, pb::Rule::default()).await,
        "rule.action_pattern|rule.direction|rule.effect",
    );
    let request = admin
        .request(pb::CreateRuleRequest { rule: None })
        .await
        .unwrap();
    expect_invalid(
        admin
            .policies()
            .create_rule(request)
            .await
            .map_err(ClientError::from),
        "rule",
    );

    // An outbound rule may only name one of the tenant's own agents.
    for agent_id in [globex_bot.id.clone(), format!("agt_{}", "0".repeat(32))] {
        let foreign = pb::Rule {
            agent_id,
            ..outbound("stock.write", pb::Effect::Allow)
        };
        expect_code(create_rule(admin, foreign).await, Code::NotFound);
    }
    assert_eq!(footprint(server).await, before);
    assert_eq!(
        server.not_found_methods(&acme.id).await,
        ["/vaultguard.v1.PolicyService/CreateRule"; 2]
    );
    assert_eq!(settings(admin).await.unwrap().policy_version, 0);

    // The edges of every limit are accepted.
    let valid = [
        inbound("sign:treasury-key", pb::Effect::Allow),
        inbound("exchange:github", pb::Effect::Allow),
        inbound("a_b-c:d.e0.*", pb::Effect::Allow),
        inbound(
            &format!("{}.{}", "a".repeat(64), "b".repeat(63)),
            pb::Effect::Allow,
        ),
        pb::Rule {
            max_ttl_seconds: 60,
            priority: i32::MIN,
            ..inbound("*", pb::Effect::Allow)
        },
        pb::Rule {
            max_ttl_seconds: 86_400,
            approvals_required: 10,
            description: "d".repeat(512),
            ..inbound("stock.*", pb::Effect::StepUp)
        },
        when(
            vec![cond("amount", Op::Gt, num(1.0)); 16],
            pb::Rule {
                time_window: Some(pb::TimeWindow {
                    start_minute: 1320,
                    end_minute: 120,
                    days_of_week: vec![pb::Weekday::Sunday as i32],
                }),
                ..inbound("stock.write", pb::Effect::Block)
            },
        ),
        pb::Rule {
            agent_id: globex_bot.id.clone(),
            ..with_counterpart(&globex.id, inbound("stock.write", pb::Effect::Allow))
        },
        with_counterpart(&acme.id, outbound("sign:key-1", pb::Effect::Allow)),
    ];
    for (n, rule) in valid.into_iter().enumerate() {
        let created = create_rule(admin, rule.clone()).await;
        let created = created.unwrap_or_else(|e| panic!("valid rule {rule:?} refused: {e:?}"));
        assert_eq!(created.policy_version, n as u64 + 1);
    }
    pair.server.stop().await;
}

#[tokio::test]
async fn evaluate_policy_refuses_bad_input_and_writes_nothing() {
    let pair = setup_pair().await;
    vaultguard_tests::parts!(pair => server, globex, bot, agent, acme_admin: admin);
    let before = footprint(server).await;

    for (field, bad) in bad_requests(&globex.id) {
        if field == "idempotency_key" {
            continue;
        }
        let attempt = format!("{bad:?}");
        expect_invalid(
            evaluate(admin, evaluation(&bot.id, bad.clone())).await,
            field,
        );
        expect_invalid(evaluate(agent, evaluation("", bad)).await, field);
        assert_eq!(
            footprint(server).await,
            before,
            "wrote something: {attempt}"
        );
    }
    expect_invalid(
        evaluate(admin, evaluation("", ask(&globex.id, "stock.write"))).await,
        "requesting_agent_id",
    );
    assert_eq!(footprint(server).await, before);
    pair.server.stop().await;
}

// ---------------------------------------------------------------------------
// Isolation and roles.

#[tokio::test]
async fn a_tenant_cannot_read_or_edit_another_tenants_rules() {
    let pair = setup_pair().await;
    vaultguard_tests::parts!(pair => server, acme, globex, acme_admin, globex_admin);
    let rule = add_rule(
        acme_admin,
        with_counterpart(&globex.id, inbound("stock.*", pb::Effect::Allow)),
    )
    .await;
    let before = footprint(server).await;

    expect_code(get_rule(globex_admin, &rule.id).await, Code::NotFound);
    let hijacked = pb::Rule {
        effect: pb::Effect::Block as i32,
        ..rule.clone()
    };
    expect_code(update_rule(globex_admin, hijacked, 1).await, Code::NotFound);
    expect_code(delete_rule(globex_admin, &rule.id, 0).await, Code::NotFound);
    expect_code(delete_rule(globex_admin, &rule.id, 1).await, Code::NotFound);
    let listed = list_rules(globex_admin, pb::ListRulesRequest::default())
        .await
        .unwrap();
    assert!(listed.rules.is_empty());
    assert_eq!(listed.policy_version, 0);

    assert_eq!(get_rule(acme_admin, &rule.id).await.unwrap(), rule);
    assert_eq!(settings(acme_admin).await.unwrap().policy_version, 1);
    assert_eq!(settings(globex_admin).await.unwrap().policy_version, 0);
    assert_eq!(footprint(server).await, before);
    // The attempts are in globex's own log, none in acme's.
    assert_eq!(
        server.not_found_methods(&globex.id).await,
        [
            "/vaultguard.v1.PolicyService/GetRule",
            "/vaultguard.v1.PolicyService/UpdateRule",
            "/vaultguard.v1.PolicyService/DeleteRule",
            "/vaultguard.v1.PolicyService/DeleteRule",
        ]
    );
    assert!(server.not_found_methods(&acme.id).await.is_empty());
    pair.server.stop().await;
}

#[tokio::test]
async fn only_admins_manage_policies() {
    let pair = setup_pair().await;
    vaultguard_tests::parts!(pair => server, acme, globex, bot, agent, acme_admin: admin);
    let (other_bot, _, _) = server.create_agent(&acme.id, "other-bot").await;
    let (globex_bot, _, _) = server.create_agent(&globex.id, "bot").await;
    let rule = add_rule(admin, inbound("stock.*", pb::Effect::Allow)).await;
    let before = footprint(server).await;

    let approver = server.approver(&acme.id, "ann").await;
    let auditor = server.human(&acme.id, "aud", &[pb::Role::Auditor]).await;
    let operator = server.operator().await;
    for (who, client) in [
        ("approver", &approver),
        ("auditor", &auditor),
        ("agent", agent),
        ("operator", &operator),
    ] {
        for (rpc, result) in every_policy_call(client, &rule).await {
            let err = expect_code(result, Code::PermissionDenied);
            assert_eq!(
                err.reason(),
                Some(pb::ErrorReason::RoleRequired),
                "{who} {rpc}"
            );
        }
    }
    for client in [&approver, &auditor, &operator] {
        let result = evaluate(client, evaluation(&bot.id, ask(&globex.id, "stock.write"))).await;
        let err = expect_code(result, Code::PermissionDenied);
        assert_eq!(err.reason(), Some(pb::ErrorReason::RoleRequired));
    }
    assert_eq!(footprint(server).await, before);
    assert_eq!(get_rule(admin, &rule.id).await.unwrap(), rule);

    // An agent evaluates for itself only; an admin for its own agents only.
    let request = || ask(&acme.id, "stock.write");
    let own = evaluate(agent, evaluation("", request())).await.unwrap();
    assert_eq!(own.outcome, pb::Decision::Allow as i32);
    let err = expect_code(
        evaluate(agent, evaluation(&other_bot.id, request())).await,
        Code::PermissionDenied,
    );
    assert_eq!(err.reason(), Some(pb::ErrorReason::RoleRequired));
    expect_code(
        evaluate(admin, evaluation(&globex_bot.id, request())).await,
        Code::NotFound,
    );
    expect_code(
        evaluate(
            admin,
            evaluation(&format!("agt_{}", "0".repeat(32)), request()),
        )
        .await,
        Code::NotFound,
    );
    pair.server.stop().await;
}

// ---------------------------------------------------------------------------
// EvaluatePolicy and the evaluation order.

#[tokio::test]
async fn evaluate_policy_is_a_dry_run_reporting_both_sides() {
    let pair = setup_pair().await;
    vaultguard_tests::parts!(pair => server, acme, globex, bot, agent, acme_admin, globex_admin);
    let outbound_rule = add_rule(
        acme_admin,
        pb::Rule {
            max_ttl_seconds: 300,
            ..outbound("stock.*", pb::Effect::Allow)
        },
    )
    .await;
    let inbound_rule = add_rule(
        globex_admin,
        pb::Rule {
            max_ttl_seconds: 900,
            ..when(
                vec![cond("amount", Op::Lt, num(4242.0))],
                with_counterpart(&acme.id, inbound("stock.*", pb::Effect::Allow)),
            )
        },
    )
    .await;
    add_rule(globex_admin, inbound("bank.*", pb::Effect::Allow)).await;
    set_outbound_default(acme_admin, pb::OutboundDefault::Allow, 0)
        .await
        .unwrap();
    let (rows, events) = footprint(server).await;
    let (acme_evaluated, globex_evaluated) = (
        server
            .audit_events(&acme.id, "policy.evaluated")
            .await
            .len(),
        server
            .audit_events(&globex.id, "policy.evaluated")
            .await
            .len(),
    );
    assert_eq!((acme_evaluated, globex_evaluated), (0, 0));

    let small = [("amount", num(12.0))];
    let decision = judge(acme_admin, &bot.id, &globex.id, "stock.write", &small).await;
    assert_eq!(decision.outcome, pb::Decision::Allow as i32);
    let outbound_side = decision.outbound.clone().unwrap();
    assert_eq!(outbound_side.tenant_id, acme.id);
    assert_eq!(outbound_side.rule_id, outbound_rule.id);
    assert_eq!(
        outbound_side.policy_version, 2,
        "acme: one rule, one settings update"
    );
    assert_eq!(outbound_side.max_ttl_seconds, 300);
    assert!(!outbound_side.explanation.is_empty());
    let inbound_side = decision.inbound.clone().unwrap();
    assert_eq!(inbound_side.tenant_id, globex.id);
    // Globex's rule, version and cap are globex's to see; its own log has them.
    assert_eq!(
        (
            inbound_side.rule_id.as_str(),
            inbound_side.policy_version,
            inbound_side.max_ttl_seconds
        ),
        ("", 0, 0)
    );
    let owned = owner_view(server, decision.clone()).await.inbound.unwrap();
    assert_eq!(owned.rule_id, inbound_rule.id);
    assert_eq!(owned.policy_version, 2);
    assert_eq!(owned.max_ttl_seconds, 900);
    assert!(
        !inbound_side.explanation.contains("4242"),
        "globex's condition values leak to acme: {}",
        inbound_side.explanation
    );
    assert!(inbound_side.explanation.len() <= 1024);
    assert_eq!(
        decision.max_ttl_seconds, 300,
        "min(600 requested, 300, 900)"
    );
    assert_eq!(decision.approvals_required, 0);
    assert!(decision.evaluate_time.is_some());

    // The agent evaluating for itself gets the same decision.
    let own = judge(agent, "", &globex.id, "stock.write", &small).await;
    assert_eq!((own.outcome, own.max_ttl_seconds), (decision.outcome, 300));
    assert_eq!(
        own.inbound.unwrap().rule_id,
        "",
        "globex's rule, not acme's"
    );

    // BLOCK is an answer, not an error: the condition fails here.
    let large = [("amount", num(5000.0))];
    let blocked = judge(acme_admin, &bot.id, &globex.id, "stock.write", &large).await;
    assert_eq!(blocked.outcome, pb::Decision::Block as i32);
    assert_side(
        blocked.inbound.as_ref(),
        pb::Decision::Block,
        "",
        "no inbound match",
    );
    assert_outbound(
        &blocked,
        pb::Decision::Allow,
        &outbound_rule.id,
        "outbound still judged",
    );
    assert_eq!(blocked.max_ttl_seconds, 0);

    // Nothing but one `policy.evaluated` per party log and evaluation.
    assert_eq!(server.count("delegations").await, 0);
    assert_eq!(server.count("step_ups").await, 0);
    assert_eq!(server.count("policy_rules").await, rows);
    assert_eq!(server.count("audit_events").await, events + 6);
    assert_eq!(
        server
            .audit_events(&acme.id, "policy.evaluated")
            .await
            .len(),
        3
    );
    assert_eq!(
        server
            .audit_events(&globex.id, "policy.evaluated")
            .await
            .len(),
        3
    );

    // Within one tenant there is one log to write to.
    judge(acme_admin, &bot.id, &acme.id, "stock.write", &[]).await;
    assert_eq!(
        server
            .audit_events(&acme.id, "policy.evaluated")
            .await
            .len(),
        4
    );
    assert_eq!(server.count("audit_events").await, events + 7);
    pair.server.stop().await;
}

/// The minute of the UTC day and the ISO weekday (1 = Monday) at `millis`.
fn minute_and_weekday(millis: i64) -> (u32, i32) {
    let minutes = millis.div_euclid(60_000);
    let minute = u32::try_from(minutes.rem_euclid(1440)).unwrap();
    // 1970-01-01 was a Thursday.
    let weekday = i32::try_from((minutes.div_euclid(1440) + 3).rem_euclid(7)).unwrap() + 1;
    (minute, weekday)
}

#[tokio::test]
async fn evaluation_order_decides_each_side() {
    let pair = setup_pair().await;
    vaultguard_tests::parts!(pair => server, acme, globex, bot, acme_admin, globex_admin);
    let (other_bot, _, _) = server.create_agent(&acme.id, "other-bot").await;
    let add = |rule: pb::Rule| add_rule(globex_admin, rule);
    let from_acme = |rule: pb::Rule| with_counterpart(&acme.id, rule);
    // Checks which inbound rule decides `action` for `agent` with `pairs`.
    macro_rules! decides {
        ($agent:expr, $action:expr, $pairs:expr, $outcome:expr, $rule:expr) => {{
            let decision = judge(&acme_admin, $agent, &globex.id, $action, $pairs).await;
            let decision = owner_view(server, decision).await;
            assert_side(
                decision.inbound.as_ref(),
                $outcome,
                $rule,
                &format!("{} {:?}", $action, $pairs),
            );
            assert_eq!(decision.outcome, $outcome as i32, "{}", $action);
        }};
    }
    use pb::Decision::{Allow, Block, StepUp};
    let none: &[(&str, pb::AttributeValue)] = &[];

    // 1. Priority beats specificity.
    let high = add(pb::Rule {
        priority: 1,
        ..inbound("p.*", pb::Effect::Block)
    })
    .await;
    add(inbound("p.x", pb::Effect::Allow)).await;
    decides!(&bot.id, "p.x", none, Block, &high.id);

    // 2. An exact action beats a wildcard; more literal segments beat fewer.
    let exact = add(inbound("e.x", pb::Effect::Allow)).await;
    let wildcard = add(inbound("e.*", pb::Effect::Block)).await;
    decides!(&bot.id, "e.x", none, Allow, &exact.id);
    decides!(&bot.id, "e.y", none, Block, &wildcard.id);
    decides!(&bot.id, "e.x.y", none, Block, &wildcard.id);
    let longer = add(inbound("l.a.*", pb::Effect::StepUp)).await;
    let shorter = add(inbound("l.*", pb::Effect::Allow)).await;
    decides!(&bot.id, "l.a.b", none, StepUp, &longer.id);
    decides!(&bot.id, "l.b", none, Allow, &shorter.id);
    decides!(&bot.id, "l", none, Block, "");

    // 6. On a full tie BLOCK beats STEP_UP beats ALLOW, whatever the order of creation.
    add(inbound("t.x", pb::Effect::Allow)).await;
    add(inbound("t.x", pb::Effect::StepUp)).await;
    let tie_block = add(inbound("t.x", pb::Effect::Block)).await;
    decides!(&bot.id, "t.x", none, Block, &tie_block.id);
    add(inbound("u.x", pb::Effect::Allow)).await;
    let tie_step_up = add(inbound("u.x", pb::Effect::StepUp)).await;
    decides!(&bot.id, "u.x", none, StepUp, &tie_step_up.id);

    // 3. A specific counterpart beats any tenant; 4. a specific agent beats any agent.
    add(inbound("c.x", pb::Effect::Block)).await;
    let counterpart = add(from_acme(inbound("c.x", pb::Effect::Allow))).await;
    decides!(&bot.id, "c.x", none, Allow, &counterpart.id);
    let any_agent = add(from_acme(inbound("g.x", pb::Effect::Block))).await;
    let only_bot = add(pb::Rule {
        agent_id: bot.id.clone(),
        ..from_acme(inbound("g.x", pb::Effect::Allow))
    })
    .await;
    decides!(&bot.id, "g.x", none, Allow, &only_bot.id);
    decides!(&other_bot.id, "g.x", none, Block, &any_agent.id);

    // 5 and conditions: numbers.
    let plain = add(inbound("n.x", pb::Effect::Allow)).await;
    let big = add(when(
        vec![cond("amount", Op::Gt, num(1000.0))],
        inbound("n.x", pb::Effect::StepUp),
    ))
    .await;
    decides!(&bot.id, "n.x", &[("amount", num(1200.0))], StepUp, &big.id);
    decides!(&bot.id, "n.x", &[("amount", num(1000.0))], Allow, &plain.id);
    decides!(&bot.id, "n.x", none, Allow, &plain.id);
    decides!(
        &bot.id,
        "n.x",
        &[("amount", text("1200"))],
        Allow,
        &plain.id
    );
    let small = add(when(
        vec![cond("amount", Op::Lt, num(10.0))],
        inbound("m.x", pb::Effect::Allow),
    ))
    .await;
    decides!(&bot.id, "m.x", &[("amount", num(9.5))], Allow, &small.id);
    decides!(&bot.id, "m.x", &[("amount", num(10.0))], Block, "");
    decides!(&bot.id, "m.x", none, Block, "");

    // Strings: EQ, IN, and NE on an absent attribute.
    let euro = add(when(
        vec![cond("currency", Op::Eq, text("EUR"))],
        inbound("s.x", pb::Effect::Allow),
    ))
    .await;
    let foreign = add(when(
        vec![cond_in("currency", Op::In, vec![text("USD"), text("GBP")])],
        inbound("s.x", pb::Effect::StepUp),
    ))
    .await;
    decides!(
        &bot.id,
        "s.x",
        &[("currency", text("EUR"))],
        Allow,
        &euro.id
    );
    decides!(
        &bot.id,
        "s.x",
        &[("currency", text("GBP"))],
        StepUp,
        &foreign.id
    );
    decides!(&bot.id, "s.x", &[("currency", text("JPY"))], Block, "");
    decides!(&bot.id, "s.x", &[("currency", num(1.0))], Block, "");
    decides!(&bot.id, "s.x", none, Block, "");
    let not_euro = add(when(
        vec![cond("currency", Op::Ne, text("EUR"))],
        inbound("s.y", pb::Effect::Allow),
    ))
    .await;
    decides!(
        &bot.id,
        "s.y",
        &[("currency", text("JPY"))],
        Allow,
        &not_euro.id
    );
    decides!(&bot.id, "s.y", none, Block, "");

    // Days of the week, then a time window reached by moving the server clock.
    let (minute, weekday) = minute_and_weekday(server.state.clock.now_millis());
    let whole_day = |day: i32| pb::TimeWindow {
        start_minute: 0,
        end_minute: 1440,
        days_of_week: vec![day],
    };
    let today = add(pb::Rule {
        time_window: Some(whole_day(weekday)),
        ..inbound("d.x", pb::Effect::Allow)
    })
    .await;
    add(pb::Rule {
        time_window: Some(whole_day(weekday % 7 + 1)),
        ..inbound("d.y", pb::Effect::Allow)
    })
    .await;
    decides!(&bot.id, "d.x", none, Allow, &today.id);
    decides!(&bot.id, "d.y", none, Block, "");
    let end = (minute + 8) % 1440;
    let later = add(pb::Rule {
        time_window: Some(pb::TimeWindow {
            start_minute: (minute + 3) % 1440,
            end_minute: if end == 0 { 1440 } else { end },
            days_of_week: Vec::new(),
        }),
        ..inbound("w.x", pb::Effect::Allow)
    })
    .await;
    decides!(&bot.id, "w.x", none, Block, "");
    server.clock.advance(5 * 60 * 1000);
    decides!(&bot.id, "w.x", none, Allow, &later.id);

    // The outbound side follows the same order.
    let out_wildcard = add_rule(acme_admin, outbound("o.*", pb::Effect::Block)).await;
    let out_exact = add_rule(acme_admin, outbound("o.x", pb::Effect::Allow)).await;
    add(inbound("o.*", pb::Effect::Allow)).await;
    let allowed = judge(acme_admin, &bot.id, &globex.id, "o.x", none).await;
    assert_outbound(&allowed, Allow, &out_exact.id, "outbound exact");
    let refused = judge(acme_admin, &bot.id, &globex.id, "o.y", none).await;
    assert_outbound(&refused, Block, &out_wildcard.id, "outbound wildcard");
    assert_eq!(refused.outcome, Block as i32);
    pair.server.stop().await;
}

#[tokio::test]
async fn outbound_default_and_the_stricter_side_win() {
    let pair = setup_pair().await;
    vaultguard_tests::parts!(pair => server, globex, bot, acme_admin, globex_admin);
    let (initech, initech_admin) = pair.third_tenant().await;
    let globex_any = add_rule(globex_admin, inbound("*", pb::Effect::Allow)).await;
    add_rule(&initech_admin, inbound("*", pb::Effect::Allow)).await;
    let (admin, bot_id) = (&acme_admin, bot.id.as_str());
    let to = move |receiving: &str, action: &str| {
        let (receiving, action) = (receiving.to_owned(), action.to_owned());
        async move { judge(admin, bot_id, &receiving, &action, &[]).await }
    };

    // A new tenant's agents are not stuck: no outbound rule means ALLOW.
    let open = to(&globex.id, "stock.write").await;
    assert_eq!(open.outcome, pb::Decision::Allow as i32);
    assert_outbound(&open, pb::Decision::Allow, "", "outbound default");
    assert_eq!(open.outbound.unwrap().policy_version, 0);
    assert_eq!(open.max_ttl_seconds, 600);

    // Least privilege: only what an outbound rule allows.
    set_outbound_default(acme_admin, pb::OutboundDefault::Block, 0)
        .await
        .unwrap();
    let closed = to(&globex.id, "stock.write").await;
    assert_eq!(closed.outcome, pb::Decision::Block as i32);
    assert_outbound(&closed, pb::Decision::Block, "", "least privilege");
    assert_inbound(
        server,
        &closed,
        pb::Decision::Allow,
        &globex_any.id,
        "inbound",
    )
    .await;
    assert_eq!(closed.outbound.unwrap().policy_version, 1);
    assert_eq!(closed.max_ttl_seconds, 0);
    let stock_to_globex = add_rule(
        acme_admin,
        pb::Rule {
            max_ttl_seconds: 300,
            ..with_counterpart(&globex.id, outbound("stock.*", pb::Effect::Allow))
        },
    )
    .await;
    let reopened = to(&globex.id, "stock.write").await;
    assert_eq!(reopened.outcome, pb::Decision::Allow as i32);
    assert_outbound(&reopened, pb::Decision::Allow, &stock_to_globex.id, "rule");
    assert_eq!(reopened.max_ttl_seconds, 300);
    for (receiving, action) in [(&globex.id, "bank.pay"), (&initech.id, "stock.write")] {
        let refused = to(receiving, action).await;
        assert_outbound(&refused, pb::Decision::Block, "", action);
    }

    // An outbound BLOCK overrides an inbound ALLOW.
    let no_delete = add_rule(acme_admin, outbound("stock.delete", pb::Effect::Block)).await;
    let refused = to(&globex.id, "stock.delete").await;
    assert_eq!(refused.outcome, pb::Decision::Block as i32);
    assert_outbound(&refused, pb::Decision::Block, &no_delete.id, "outbound");
    assert_inbound(
        server,
        &refused,
        pb::Decision::Allow,
        &globex_any.id,
        "inbound",
    )
    .await;

    // STEP_UP from either side; the quorum is the larger, the TTL the smaller.
    let out_step_up = add_rule(
        acme_admin,
        pb::Rule {
            approvals_required: 3,
            ..outbound("stock.move", pb::Effect::StepUp)
        },
    )
    .await;
    let in_step_up = add_rule(
        globex_admin,
        pb::Rule {
            approvals_required: 2,
            max_ttl_seconds: 120,
            ..inbound("stock.move", pb::Effect::StepUp)
        },
    )
    .await;
    let both = to(&globex.id, "stock.move").await;
    assert_eq!(both.outcome, pb::Decision::StepUp as i32);
    assert_outbound(&both, pb::Decision::StepUp, &out_step_up.id, "out");
    assert_inbound(server, &both, pb::Decision::StepUp, &in_step_up.id, "in").await;
    assert_eq!((both.approvals_required, both.max_ttl_seconds), (3, 120));
    let inbound_only = add_rule(globex_admin, inbound("stock.count", pb::Effect::StepUp)).await;
    let one = to(&globex.id, "stock.count").await;
    assert_eq!(one.outcome, pb::Decision::StepUp as i32);
    assert_outbound(&one, pb::Decision::Allow, &stock_to_globex.id, "out");
    assert_inbound(server, &one, pb::Decision::StepUp, &inbound_only.id, "in").await;
    assert_eq!(one.approvals_required, 1, "0 means 1");
    pair.server.stop().await;
}

#[tokio::test]
async fn an_inbound_rule_never_grants_access_to_a_third_tenant() {
    let server = TestServer::start().await;
    let alpha = server.create_tenant("alpha").await;
    let bravo = server.create_tenant("bravo").await;
    let charlie = server.create_tenant("charlie").await;
    let (bravo_bot, _, bravo_agent) = server.create_agent(&bravo.id, "bot").await;
    let alpha_admin = server.admin(&alpha.id, "al").await;

    // Alpha allows everything inbound, names charlie and bravo, and allows
    // its own agents everything outbound.
    let alpha_any = add_rule(&alpha_admin, inbound("*", pb::Effect::Allow)).await;
    add_rule(
        &alpha_admin,
        with_counterpart(&charlie.id, inbound("*", pb::Effect::Allow)),
    )
    .await;
    let alpha_bravo = add_rule(
        &alpha_admin,
        with_counterpart(&bravo.id, inbound("*", pb::Effect::Allow)),
    )
    .await;
    add_rule(
        &alpha_admin,
        with_counterpart(&charlie.id, outbound("*", pb::Effect::Allow)),
    )
    .await;

    // Bravo's agent into charlie: only charlie's (empty) inbound policy counts.
    let decision = judge(&bravo_agent, "", &charlie.id, "stock.write", &[]).await;
    assert_eq!(decision.outcome, pb::Decision::Block as i32);
    let side = decision.inbound.unwrap();
    assert_eq!(side.tenant_id, charlie.id);
    assert_eq!(
        (side.outcome, side.rule_id.as_str()),
        (pb::Decision::Block as i32, "")
    );
    let refused = bravo_agent
        .request_delegation(ask(&charlie.id, "stock.write"))
        .await;
    let metadata = expect_reason(
        refused,
        Code::PermissionDenied,
        pb::ErrorReason::NoMatchingRule,
    );
    assert_eq!(
        metadata.get("policy_side").map(String::as_str),
        Some("inbound")
    );
    assert_eq!(
        metadata.get("rule_id"),
        None,
        "charlie's side is not bravo's to see"
    );

    // Into alpha itself, alpha's rules do apply.
    let into_alpha = judge(&bravo_agent, &bravo_bot.id, &alpha.id, "stock.write", &[]).await;
    assert_eq!(into_alpha.outcome, pb::Decision::Allow as i32);
    let into_alpha = owner_view(&server, into_alpha).await;
    assert_eq!(
        into_alpha.inbound.unwrap().rule_id,
        alpha_bravo.id,
        "the rule naming bravo beats {}",
        alpha_any.id
    );
    server.stop().await;
}
