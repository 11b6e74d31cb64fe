//! Authority is exactly what policy granted (issue 23, items 1, 5 and 13).
//!
//! - Scopes and resources are part of the policy: a token never carries a
//!   scope or resource the deciding rules did not grant, a request naming
//!   none gets the inbound rule's defaults, an outbound rule limits its
//!   agents, an approval is bound to what the token will carry and the
//!   re-check at approval judges it again, and a delegated ExchangeToken is
//!   narrowed to what the delegation granted.
//! - Every vault operation is judged when it runs, whatever delegation it
//!   presents: a self-delegation grants nothing a direct call would not, and
//!   an approved signature is judged again when it is made.
//! - No answer or decision shown to one party carries the other party's rule
//!   ids, policy versions or lifetime caps.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::Value;
use tonic::Code;
use vaultguard_client::{ClientError, DelegationOutcome, VaultGuardClient, pb};
use vaultguard_tests::oauth_provider::ProviderOptions;
use vaultguard_tests::{
    approve_step_up, expect_invalid, expect_reason, get_step_up, request_step_up,
};

use crate::delegations::{Pair, ask, setup_pair};
use crate::policies::{
    add_rule, cond, create_rule, evaluate, inbound, outbound, text, when, with_counterpart,
};
use crate::vault_connections::{EXCHANGE_MAIL, SCOPES, connect, fake_provider, register};
use vaultguard_tests::calls::update_rule;

use pb::ConditionOperator as Op;
use pb::ErrorReason as Reason;

// ---------------------------------------------------------------------------
// Fixtures.

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

/// `rule` granting `scopes` (patterns), `defaults` and `resources`.
fn granting(scopes: &[&str], defaults: &[&str], resources: &[&str], rule: pb::Rule) -> pb::Rule {
    pb::Rule {
        scopes: strings(scopes),
        default_scopes: strings(defaults),
        resources: strings(resources),
        ..rule
    }
}

/// The claims of a JWT, read without verifying it (the delegation tests
/// verify signatures; here only what was signed matters).
fn claims(token: &str) -> Value {
    let payload = token.split('.').nth(1).expect("a JWT has a payload");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).expect("base64url")).expect("json")
}

/// The delegation of an ALLOW, and the claims of its token.
#[track_caller]
fn allowed(outcome: Result<DelegationOutcome, ClientError>) -> (pb::Delegation, Value) {
    let grant = granted(outcome);
    let claims = claims(&grant.token);
    (grant.delegation.expect("delegation"), claims)
}

#[track_caller]
fn granted(outcome: Result<DelegationOutcome, ClientError>) -> pb::DelegationGrant {
    match outcome {
        Ok(DelegationOutcome::Allowed { grant, .. }) => grant,
        other => panic!("expected ALLOW, got {other:?}"),
    }
}

fn asking(
    receiving: &str,
    action: &str,
    scopes: &[&str],
    resource: &str,
) -> pb::RequestDelegationRequest {
    pb::RequestDelegationRequest {
        scopes: strings(scopes),
        resource: resource.to_owned(),
        ..ask(receiving, action)
    }
}

/// How many delegation tokens were ever issued in `tenant_id`'s log.
async fn tokens_issued(pair: &Pair, tenant_id: &str) -> usize {
    pair.server
        .audit_events(tenant_id, "delegation.token_issued")
        .await
        .len()
}

// ---------------------------------------------------------------------------
// Item 1: scopes and resources are part of the policy.

/// The probe's exploit: with only an inbound rule ALLOW `crm.read`, a request
/// for `crm.read` with scopes `contacts:write admin` used to be ALLOWed and
/// signed with `scope: "contacts:write admin"`. Now it is BLOCK, naming the
/// scopes, with a BLOCKED record and no token; the resource likewise.
#[tokio::test]
async fn scopes_and_resources_no_rule_granted_are_refused_not_signed() {
    let pair = setup_pair().await;
    vaultguard_tests::parts!(pair => globex, agent);
    pair.globex_allows("crm.read").await;

    let metadata = expect_reason(
        agent
            .request_delegation(asking(
                &globex.id,
                "crm.read",
                &["contacts:write", "admin"],
                "",
            ))
            .await,
        Code::PermissionDenied,
        Reason::ScopeNotGranted,
    );
    assert_eq!(metadata["scopes_not_granted"], "admin contacts:write");
    assert_eq!(metadata["policy_side"], "inbound");
    let blocked = agent
        .get_delegation(&metadata["delegation_id"])
        .await
        .unwrap();
    assert_eq!(blocked.status, pb::DelegationStatus::Blocked as i32);
    let inbound = blocked.decision.unwrap().inbound.unwrap();
    assert_eq!(inbound.scopes_not_granted, ["admin", "contacts:write"]);

    let metadata = expect_reason(
        agent
            .request_delegation(asking(
                &globex.id,
                "crm.read",
                &[],
                "https://globex.example/admin",
            ))
            .await,
        Code::PermissionDenied,
        Reason::ResourceNotGranted,
    );
    assert_eq!(metadata["resource"], "https://globex.example/admin");

    // Nothing was signed for either; a request naming neither still works.
    assert_eq!(tokens_issued(&pair, &globex.id).await, 0);
    let (delegation, claims) = allowed(agent.request_delegation(ask(&globex.id, "crm.read")).await);
    assert!(delegation.scopes.is_empty());
    assert_eq!(
        claims["scope"], "crm.read",
        "no scope: the action stands for it"
    );
    assert!(claims.get("resource").is_none());
    pair.server.stop().await;
}

#[tokio::test]
async fn rules_grant_scopes_and_resources_by_pattern_with_defaults() {
    let pair = setup_pair().await;
    vaultguard_tests::parts!(pair => globex, agent, globex_admin, bot);
    let rule = add_rule(
        globex_admin,
        granting(
            &["contacts:*", "profile"],
            &["profile"],
            &["https://crm.globex.example/*"],
            inbound("crm.*", pb::Effect::Allow),
        ),
    )
    .await;
    assert_eq!(rule.scopes, ["contacts:*", "profile"]);
    assert_eq!(rule.default_scopes, ["profile"]);
    assert_eq!(rule.resources, ["https://crm.globex.example/*"]);

    let (delegation, claims) = allowed(
        agent
            .request_delegation(asking(
                &globex.id,
                "crm.read",
                &["contacts:read", "profile"],
                "https://crm.globex.example/people",
            ))
            .await,
    );
    assert_eq!(delegation.scopes, ["contacts:read", "profile"]);
    assert_eq!(claims["scope"], "contacts:read profile");
    assert_eq!(claims["resource"], "https://crm.globex.example/people");
    let decision = delegation.decision.unwrap();
    assert_eq!(decision.scopes, ["contacts:read", "profile"]);
    assert_eq!(decision.resource, "https://crm.globex.example/people");

    // No scope asked: the rule's defaults, signed and recorded.
    let (delegation, claims) = allowed(agent.request_delegation(ask(&globex.id, "crm.read")).await);
    assert_eq!(delegation.scopes, ["profile"]);
    assert_eq!(claims["scope"], "profile");

    // A prefix grants whole segments only; anything else is named.
    for (scopes, refused) in [
        (vec!["contacts"], "contacts"),
        (vec!["contacts:read", "admin"], "admin"),
        (vec!["profile:extra"], "profile:extra"),
    ] {
        let metadata = expect_reason(
            agent
                .request_delegation(asking(&globex.id, "crm.read", &scopes, ""))
                .await,
            Code::PermissionDenied,
            Reason::ScopeNotGranted,
        );
        assert_eq!(metadata["scopes_not_granted"], refused);
    }
    expect_reason(
        agent
            .request_delegation(asking(
                &globex.id,
                "crm.read",
                &[],
                "https://crm.globex.example",
            ))
            .await,
        Code::PermissionDenied,
        Reason::ResourceNotGranted,
    );

    // The dry run explains the same without side effects.
    let decision = evaluate(
        globex_admin,
        pb::EvaluatePolicyRequest {
            requesting_agent_id: bot.id.clone(),
            receiving_tenant_id: globex.id.clone(),
            action: "crm.read".into(),
            scopes: strings(&["admin"]),
            requested_ttl_seconds: 60,
            ..Default::default()
        },
    )
    .await;
    assert!(
        decision.is_err(),
        "globex's admin cannot evaluate for acme's agent"
    );
    let decision = evaluate(
        agent,
        pb::EvaluatePolicyRequest {
            receiving_tenant_id: globex.id.clone(),
            action: "crm.read".into(),
            scopes: strings(&["admin", "contacts:read"]),
            requested_ttl_seconds: 60,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(decision.outcome, pb::Decision::Block as i32);
    let inbound = decision.inbound.unwrap();
    assert_eq!(inbound.scopes_not_granted, ["admin"]);
    assert_eq!(
        inbound.explanation, "decided by the receiving tenant's policy",
        "acme's agent sees none of globex's rule"
    );
    assert_eq!((inbound.rule_id.as_str(), inbound.policy_version), ("", 0));
    pair.server.stop().await;
}

#[tokio::test]
async fn bad_grants_are_refused_naming_the_field_and_write_nothing() {
    let pair = setup_pair().await;
    let admin = &pair.globex_admin;
    let before = pair.server.count("policy_rules").await;
    let allow = || inbound("crm.*", pb::Effect::Allow);
    let cases = vec![
        ("rule.scopes[0]", granting(&["read*"], &[], &[], allow())),
        ("rule.scopes[0]", granting(&[":*"], &[], &[], allow())),
        (
            "rule.scopes[0]",
            granting(&["has space"], &[], &[], allow()),
        ),
        ("rule.scopes[1]", granting(&["a", "a"], &[], &[], allow())),
        (
            "rule.default_scopes[0]",
            granting(&["contacts:*"], &["admin"], &[], allow()),
        ),
        (
            "rule.default_scopes[0]",
            granting(&["contacts:*"], &["contacts:*"], &[], allow()),
        ),
        (
            "rule.default_scopes",
            granting(&["a"], &["a"], &[], outbound("crm.*", pb::Effect::Allow)),
        ),
        ("rule.resources[0]", granting(&[], &[], &["a*b"], allow())),
        ("rule.resources[0]", granting(&[], &[], &[""], allow())),
        (
            "rule.resources[0]",
            granting(&[], &[], &["line\nbreak"], allow()),
        ),
        (
            "rule.scopes",
            pb::Rule {
                scopes: (0..33).map(|n| format!("s{n}")).collect(),
                ..allow()
            },
        ),
    ];
    for (field, rule) in cases {
        expect_invalid(create_rule(admin, rule).await, field);
    }
    assert_eq!(pair.server.count("policy_rules").await, before);
    pair.server.stop().await;
}

#[tokio::test]
async fn an_outbound_rule_limits_what_its_agents_may_ask_for() {
    let pair = setup_pair().await;
    vaultguard_tests::parts!(pair => globex, agent, globex_admin, acme_admin);
    add_rule(
        globex_admin,
        granting(
            &["*"],
            &["contacts:write"],
            &["*"],
            inbound("crm.*", pb::Effect::Allow),
        ),
    )
    .await;
    let limit = add_rule(
        acme_admin,
        granting(
            &["contacts:read"],
            &[],
            &["https://crm.globex.example/*"],
            outbound("crm.*", pb::Effect::Allow),
        ),
    )
    .await;

    allowed(
        agent
            .request_delegation(asking(&globex.id, "crm.read", &["contacts:read"], ""))
            .await,
    );
    let metadata = expect_reason(
        agent
            .request_delegation(asking(&globex.id, "crm.read", &["contacts:write"], ""))
            .await,
        Code::PermissionDenied,
        Reason::ScopeNotGranted,
    );
    assert_eq!(metadata["policy_side"], "outbound");
    assert_eq!(
        metadata["rule_id"], limit.id,
        "acme's own rule is named to acme"
    );
    // The inbound rule's defaults are limited too.
    let metadata = expect_reason(
        agent.request_delegation(ask(&globex.id, "crm.read")).await,
        Code::PermissionDenied,
        Reason::ScopeNotGranted,
    );
    assert_eq!(metadata["scopes_not_granted"], "contacts:write");
    expect_reason(
        agent
            .request_delegation(asking(
                &globex.id,
                "crm.read",
                &["contacts:read"],
                "https://elsewhere.example/",
            ))
            .await,
        Code::PermissionDenied,
        Reason::ResourceNotGranted,
    );
    pair.server.stop().await;
}

#[tokio::test]
async fn an_approval_is_bound_to_the_granted_scopes_and_the_recheck_judges_them() {
    let pair = setup_pair().await;
    vaultguard_tests::parts!(pair => globex, agent, globex_admin);
    let approver = pair.server.approver(&globex.id, "ann").await;
    let rule = add_rule(
        globex_admin,
        granting(
            &["contacts:*"],
            &["contacts:read"],
            &[],
            inbound("crm.*", pb::Effect::StepUp),
        ),
    )
    .await;

    // The approver sees what the token would carry: the defaults.
    let first = request_step_up(agent, &approver, ask(&globex.id, "crm.read")).await;
    let shown = get_step_up(&approver, &first.step_up_id).await.unwrap();
    assert_eq!(shown.scopes, ["contacts:read"]);
    assert_eq!(shown.decision.as_ref().unwrap().scopes, ["contacts:read"]);
    // Two requests differing only in what their rule filled in are two
    // different approvals.
    let explicit = request_step_up(
        agent,
        &approver,
        asking(&globex.id, "crm.read", &["contacts:write"], ""),
    )
    .await;
    assert_ne!(first.request_hash, explicit.request_hash);

    // The rule stops granting the scope: approving now is refused and denies.
    update_rule(
        globex_admin,
        granting(&["profile"], &[], &[], pb::Rule { ..rule.clone() }),
        rule.version,
    )
    .await
    .unwrap();
    let metadata = expect_reason(
        approve_step_up(&approver, &first.step_up_id, &first.request_hash).await,
        Code::FailedPrecondition,
        Reason::AccessDenied,
    );
    assert_eq!(metadata["scopes_not_granted"], "contacts:read");
    assert_eq!(
        metadata["rule_id"], rule.id,
        "globex's own rule, named to globex"
    );
    let denied = get_step_up(&approver, &first.step_up_id).await.unwrap();
    assert_eq!(denied.state, pb::StepUpState::Denied as i32);
    assert_eq!(tokens_issued(&pair, &globex.id).await, 0);
    pair.server.stop().await;
}

// ---------------------------------------------------------------------------
// Item 1 (vault) and item 5: exchanges are narrowed to the delegation's
// scopes and judged when they run.

/// Globex owns a connected `mail` account (scopes [`SCOPES`]); returns the
/// fixture's provider and the connection id.
async fn globex_mailbox(pair: &Pair) -> (vaultguard_tests::oauth_provider::FakeProvider, String) {
    let provider = fake_provider(&pair.server, ProviderOptions::default()).await;
    let registered = register(&pair.globex_admin, "mail", &provider).await;
    let connection = connect(&pair.globex_admin, &registered.id).await;
    (provider, connection.id)
}

/// The probe's exploit: a delegation naming no scope used to exchange for
/// the provider's full grant. It now grants none of them.
#[tokio::test]
async fn a_delegated_exchange_never_defaults_to_the_providers_full_grant() {
    let pair = setup_pair().await;
    let (provider, connection_id) = globex_mailbox(&pair).await;
    let resource = format!("connection:{connection_id}");
    add_rule(
        &pair.globex_admin,
        granting(
            &[],
            &[],
            &["connection:*"],
            with_counterpart(&pair.acme.id, inbound(EXCHANGE_MAIL, pb::Effect::Allow)),
        ),
    )
    .await;
    let grant = granted(
        pair.agent
            .request_delegation(asking(&pair.globex.id, EXCHANGE_MAIL, &[], &resource))
            .await,
    );
    assert!(grant.delegation.unwrap().scopes.is_empty());
    let refreshes = provider.refreshes();
    let metadata = expect_reason(
        pair.agent
            .exchange_delegated(&grant.token, &connection_id, &[])
            .await,
        Code::PermissionDenied,
        Reason::ScopeNotGranted,
    );
    assert_eq!(metadata["scopes_not_granted"], "");
    expect_reason(
        pair.agent
            .exchange_delegated(&grant.token, &connection_id, &strings(&["mail.send"]))
            .await,
        Code::PermissionDenied,
        Reason::ScopeNotGranted,
    );
    assert_eq!(
        provider.refreshes(),
        refreshes,
        "the provider was never asked"
    );
    pair.server.stop().await;
}

/// A fresh delegation token of `pair`'s agent for [`EXCHANGE_MAIL`] on
/// `resource`, which globex's rules must allow.
async fn delegated_token(pair: &Pair, resource: &str) -> String {
    granted(
        pair.agent
            .request_delegation(asking(&pair.globex.id, EXCHANGE_MAIL, &[], resource))
            .await,
    )
    .token
}

#[tokio::test]
async fn a_delegated_exchange_is_narrowed_to_the_scopes_the_delegation_granted() {
    let pair = setup_pair().await;
    let (provider, connection_id) = globex_mailbox(&pair).await;
    let resource = format!("connection:{connection_id}");
    add_rule(
        &pair.globex_admin,
        granting(
            &["mail.*"],
            &["mail.read"],
            &["connection:*"],
            with_counterpart(&pair.acme.id, inbound(EXCHANGE_MAIL, pb::Effect::Allow)),
        ),
    )
    .await;
    let token = delegated_token(&pair, &resource).await;
    assert_eq!(claims(&token)["scope"], "mail.read");
    let answer = pair
        .agent
        .exchange_delegated(&token, &connection_id, &[])
        .await
        .unwrap();
    assert_eq!(answer.scope, "mail.read");
    assert_eq!(
        provider.last_refresh_scope(),
        Some(Some("mail.read".to_owned())),
        "the provider was asked for the delegation's scope only"
    );
    expect_reason(
        pair.agent
            .exchange_delegated(&token, &connection_id, &strings(&["mail.send"]))
            .await,
        Code::PermissionDenied,
        Reason::ScopeNotGranted,
    );
    // A scope the connection never held is bad input.
    expect_invalid(
        pair.agent
            .exchange_delegated(&token, &connection_id, &strings(&["calendar"]))
            .await,
        "scopes[0]",
    );
    assert_eq!(SCOPES.len(), 2);
    pair.server.stop().await;
}

/// The reviewer's finding: a self-delegation (RequestDelegation to one's own
/// tenant) for `exchange:<provider>` was accepted by ExchangeToken without
/// judging the call again, so a per-call condition on `vg_connection_id`
/// and a later BLOCK edit were bypassed.
#[tokio::test]
async fn a_self_delegation_grants_nothing_a_direct_exchange_would_not() {
    let pair = setup_pair().await;
    vaultguard_tests::parts!(pair => acme, agent, acme_admin, server);
    let provider = fake_provider(server, ProviderOptions::default()).await;
    let registered = register(acme_admin, "mail", &provider).await;
    let everyday = connect(acme_admin, &registered.id).await.id;
    let treasury = connect(acme_admin, &registered.id).await.id;
    let own = |rule: pb::Rule| with_counterpart(&acme.id, rule);
    // The treasury mailbox is never exchanged; any other is.
    add_rule(
        acme_admin,
        pb::Rule {
            priority: 10,
            ..when(
                vec![cond("vg_connection_id", Op::Eq, text(&treasury))],
                own(inbound(EXCHANGE_MAIL, pb::Effect::Block)),
            )
        },
    )
    .await;
    let allow = add_rule(
        acme_admin,
        granting(
            &["mail.*"],
            &[],
            &["connection:*"],
            own(inbound(EXCHANGE_MAIL, pb::Effect::Allow)),
        ),
    )
    .await;
    expect_reason(
        agent.exchange(&treasury, &[]).await,
        Code::PermissionDenied,
        Reason::PolicyBlocked,
    );
    agent.exchange(&everyday, &[]).await.unwrap();

    // A self-delegation asks without `vg_connection_id`, so the BLOCK rule
    // does not match it and the ALLOW rule grants it…
    let any_mailbox_token = granted(
        agent
            .request_delegation(asking(&acme.id, EXCHANGE_MAIL, &["mail.read"], ""))
            .await,
    )
    .token;
    assert_eq!(claims(&any_mailbox_token)["scope"], "mail.read");
    // …but the exchange itself is judged as a direct call: BLOCK.
    let before = provider.refreshes();
    expect_reason(
        agent
            .exchange_delegated(&any_mailbox_token, &treasury, &[])
            .await,
        Code::PermissionDenied,
        Reason::PolicyBlocked,
    );
    assert_eq!(provider.refreshes(), before);
    let refused = server
        .audit_events(&acme.id, "connection.exchange_refused")
        .await;
    assert_eq!(refused.len(), 2, "the direct and the delegated refusal");
    // The everyday mailbox exchanges with it, until the rule says BLOCK.
    agent
        .exchange_delegated(&any_mailbox_token, &everyday, &[])
        .await
        .unwrap();
    set_effect(acme_admin, &allow, pb::Effect::Block, allow.version).await;
    expect_reason(
        agent
            .exchange_delegated(&any_mailbox_token, &everyday, &[])
            .await,
        Code::PermissionDenied,
        Reason::PolicyBlocked,
    );
    pair.server.stop().await;
}

/// A rule that now asks a human for an exchange is not answered by a
/// delegation no human approved: the exchange opens its own step-up.
#[tokio::test]
async fn a_delegation_no_human_approved_does_not_answer_a_step_up_now() {
    let pair = setup_pair().await;
    let (_provider, connection_id) = globex_mailbox(&pair).await;
    let resource = format!("connection:{connection_id}");
    let rule = add_rule(
        &pair.globex_admin,
        granting(
            &["mail.*"],
            &["mail.read"],
            &["connection:*"],
            with_counterpart(&pair.acme.id, inbound(EXCHANGE_MAIL, pb::Effect::Allow)),
        ),
    )
    .await;
    let token = delegated_token(&pair, &resource).await;
    set_effect(&pair.globex_admin, &rule, pb::Effect::StepUp, rule.version).await;
    let metadata = expect_reason(
        pair.agent
            .exchange_delegated(&token, &connection_id, &[])
            .await,
        Code::FailedPrecondition,
        Reason::StepUpRequired,
    );
    assert!(metadata.contains_key("auth_req_id"), "{metadata:?}");
    // The step-up waits in globex's queue, for globex's approvers.
    let approver = pair.server.approver(&pair.globex.id, "ann").await;
    let pending = get_delegation_as(&approver, &metadata["delegation_id"]).await;
    assert_eq!(pending.receiving_tenant_id, pair.globex.id);
    assert_eq!(pending.scopes, ["mail.read"]);
    pair.server.stop().await;
}

/// Turns `rule` (at `version`) into one deciding `effect`, as its admin.
async fn set_effect(admin: &VaultGuardClient, rule: &pb::Rule, effect: pb::Effect, version: u64) {
    let changed = pb::Rule {
        effect: effect as i32,
        ..rule.clone()
    };
    update_rule(admin, changed, version)
        .await
        .expect("update the rule");
}

async fn get_delegation_as(client: &VaultGuardClient, id: &str) -> pb::Delegation {
    client.get_delegation(id).await.expect("delegation")
}

// ---------------------------------------------------------------------------
// Item 5: an approved signature is judged again when it is made.

#[tokio::test]
async fn an_approved_signature_is_judged_again_when_it_is_made() {
    let pair = setup_pair().await;
    vaultguard_tests::parts!(pair => acme, agent, acme_admin, server);
    let key =
        crate::vault_signing::create_key(acme_admin, "treasury", pb::KeyAlgorithm::Ed25519, "")
            .await
            .unwrap();
    let rule = add_rule(
        acme_admin,
        with_counterpart(&acme.id, inbound("sign:treasury", pb::Effect::StepUp)),
    )
    .await;
    let request = crate::vault_signing::sign_message(
        &key.id,
        b"pay 10 ETH",
        pb::SigningScheme::Ed25519Pure,
        "pay-1",
    );
    let answer = agent.sign(request.clone()).await.unwrap();
    let Some(pb::sign_response::Outcome::StepUp(pending)) = answer.outcome else {
        panic!("expected a step-up: {answer:?}")
    };
    let approver = server.approver(&acme.id, "ann").await;
    crate::vault_signing::approve(&approver, &pending).await;
    // Between the approval and the signature the rule turns to BLOCK.
    set_effect(acme_admin, &rule, pb::Effect::Block, rule.version).await;
    expect_reason(
        agent.sign(request.clone()).await,
        Code::PermissionDenied,
        Reason::PolicyBlocked,
    );
    assert_eq!(server.audit_events(&acme.id, "key.signed").await.len(), 0);
    // Back to STEP_UP: the approval given answers it, and it signs.
    set_effect(acme_admin, &rule, pb::Effect::StepUp, rule.version + 1).await;
    let answer = agent.sign(request).await.unwrap();
    assert!(
        matches!(answer.outcome, Some(pb::sign_response::Outcome::Signed(_))),
        "{answer:?}"
    );
    pair.server.stop().await;
}

// ---------------------------------------------------------------------------
// Item 13: nothing of the other side's rules in answers.

/// The probe's finding: a BLOCK answer and a decision shown to the other
/// party carried the counterpart's `rule_id` and `policy_version`.
#[tokio::test]
async fn no_answer_names_the_counterparts_rules() {
    let pair = setup_pair().await;
    vaultguard_tests::parts!(pair => acme, globex, agent, acme_admin, globex_admin, server);
    let blocking = add_rule(globex_admin, inbound("crm.delete", pb::Effect::Block)).await;
    let metadata = expect_reason(
        agent
            .request_delegation(ask(&globex.id, "crm.delete"))
            .await,
        Code::PermissionDenied,
        Reason::PolicyBlocked,
    );
    assert_eq!(metadata["policy_side"], "inbound");
    assert!(
        !metadata.contains_key("rule_id") && !metadata.contains_key("policy_version"),
        "globex's rule leaked to acme: {metadata:?}"
    );
    let blocked = acme_admin
        .get_delegation(&metadata["delegation_id"])
        .await
        .unwrap();
    let inbound_side = blocked.decision.unwrap().inbound.unwrap();
    assert_eq!(
        (
            inbound_side.rule_id.as_str(),
            inbound_side.policy_version,
            inbound_side.max_ttl_seconds
        ),
        ("", 0, 0)
    );
    // Globex, the owner of the rule, sees it.
    let seen = globex_admin
        .get_delegation(&metadata["delegation_id"])
        .await
        .unwrap();
    assert_eq!(seen.decision.unwrap().inbound.unwrap().rule_id, blocking.id);

    // The other way round: acme's outbound rule, seen by globex's approver.
    let acme_rule = add_rule(
        acme_admin,
        pb::Rule {
            max_ttl_seconds: 120,
            ..outbound("crm.*", pb::Effect::StepUp)
        },
    )
    .await;
    pair.globex_allows("crm.read").await;
    let approver = server.approver(&globex.id, "ann").await;
    let pending = request_step_up(agent, &approver, ask(&globex.id, "crm.read")).await;
    let shown = get_step_up(&approver, &pending.step_up_id).await.unwrap();
    let outbound_side = shown.decision.unwrap().outbound.unwrap();
    assert_eq!(
        (
            outbound_side.rule_id.as_str(),
            outbound_side.policy_version,
            outbound_side.max_ttl_seconds
        ),
        ("", 0, 0)
    );
    // Acme's outbound rule turns to BLOCK: the approval's refusal does not
    // name it to globex.
    set_effect(acme_admin, &acme_rule, pb::Effect::Block, acme_rule.version).await;
    let metadata = expect_reason(
        approve_step_up(&approver, &pending.step_up_id, &pending.request_hash).await,
        Code::FailedPrecondition,
        Reason::AccessDenied,
    );
    assert_eq!(metadata["policy_side"], "outbound");
    assert!(
        !metadata.contains_key("rule_id") && !metadata.contains_key("policy_version"),
        "acme's rule leaked to globex: {metadata:?}"
    );
    // Neither party's audit log holds the other's rule ids.
    server.wait_sealed().await;
    for (log, foreign) in [(&globex.id, &acme_rule.id), (&acme.id, &blocking.id)] {
        for event in server.audit_events(log, "delegation.decided").await {
            assert!(
                !event.details.contains(foreign.as_str()),
                "{}",
                event.details
            );
        }
    }
    pair.server.stop().await;
}
