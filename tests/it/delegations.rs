//! Delegations end to end through the SDK: the three outcomes, token
//! lifetimes, idempotency under concurrency, revocation races with each other
//! and with the sweeper, offline verification with an independent JWT
//! library (PyJWT), the Verify RPC, key rotation, visibility between tenants,
//! listing, expiry on read, bad input and suspended tenants.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};
use tonic::Code;
use vaultguard_client::{ClientError, DelegationOutcome, VaultGuardClient, pb};
use vaultguard_server::domain::delegations::sweep_expired;
use vaultguard_server::error::Error;
use vaultguard_server::state::AppState;
use vaultguard_tests::{Backend, TestServer, expect_code, expect_invalid, expect_reason};

pub(crate) use vaultguard_tests::fixtures::{Pair, ask, setup_pair};

use crate::policies::{
    add_rule, assert_id, cond, context, evaluate, inbound, num, outbound, set_outbound_default,
    text, when, with_counterpart,
};

use pb::DelegationStatus as Status;
use vaultguard_tests::Rpc;
use vaultguard_tests::require_backend;

// ---------------------------------------------------------------------------
// Requests.

fn keyed(key: &str, request: pb::RequestDelegationRequest) -> pb::RequestDelegationRequest {
    pb::RequestDelegationRequest {
        idempotency_key: key.to_owned(),
        ..request
    }
}

fn for_seconds(ttl: u32, request: pb::RequestDelegationRequest) -> pb::RequestDelegationRequest {
    pb::RequestDelegationRequest {
        requested_ttl_seconds: ttl,
        ..request
    }
}

/// The EvaluatePolicy input equivalent to `request` by `agent_id`.
pub(crate) fn evaluation(
    agent_id: &str,
    request: pb::RequestDelegationRequest,
) -> pb::EvaluatePolicyRequest {
    pb::EvaluatePolicyRequest {
        requesting_agent_id: agent_id.to_owned(),
        receiving_tenant_id: request.receiving_tenant_id,
        action: request.action,
        scopes: request.scopes,
        resource: request.resource,
        requested_ttl_seconds: request.requested_ttl_seconds,
        binding_message: request.binding_message,
        context: request.context,
        authorization_details: request.authorization_details,
    }
}

/// Requests that break one limit each, with the field the violation names
/// (`|` separates acceptable names where the contract leaves it open).
pub(crate) fn bad_requests(receiving: &str) -> Vec<(&'static str, pb::RequestDelegationRequest)> {
    let valid = |receiving: &str, action: &str| keyed("bad-input", ask(receiving, action));
    let base = || valid(receiving, "stock.write");
    let with_context = |pairs: Vec<(String, pb::AttributeValue)>| pb::RequestDelegationRequest {
        context: pairs.into_iter().collect(),
        ..base()
    };
    let one = |key: &str, value: pb::AttributeValue| with_context(vec![(key.to_owned(), value)]);
    let with_scopes = |scopes: Vec<String>| pb::RequestDelegationRequest { scopes, ..base() };
    let long_action = format!("{}.{}", "a".repeat(64), "b".repeat(64));
    vec![
        (
            "receiving_tenant_id",
            valid(&format!("tnt_{}", "0".repeat(32)), "stock.write"),
        ),
        ("receiving_tenant_id", valid("", "stock.write")),
        ("receiving_tenant_id", valid(&"t".repeat(65), "stock.write")),
        ("action", valid(receiving, "")),
        ("action", valid(receiving, "stock.*")),
        ("action", valid(receiving, "*")),
        ("action", valid(receiving, "Stock.Write")),
        ("action", valid(receiving, "a..b")),
        ("action", valid(receiving, &long_action)),
        ("requested_ttl_seconds", for_seconds(0, base())),
        ("requested_ttl_seconds", for_seconds(86_401, base())),
        (
            "context",
            with_context(
                (0..33)
                    .map(|n| (format!("k{n}"), num(f64::from(n))))
                    .collect(),
            ),
        ),
        ("context.note", one("note", text(&"x".repeat(300)))),
        (
            "context.vg_payload_hash",
            one("vg_payload_hash", text("abc")),
        ),
        ("context.Amount|context", one("Amount", num(1.0))),
        ("context.amount", one("amount", num(f64::NAN))),
        ("scopes[1]", with_scopes(vec!["read".into(), "read".into()])),
        ("scopes[0]", with_scopes(vec!["has space".into()])),
        ("scopes[0]", with_scopes(vec![String::new()])),
        (
            "scopes",
            with_scopes((0..33).map(|n| format!("scope-{n}")).collect()),
        ),
        (
            "resource",
            pb::RequestDelegationRequest {
                resource: "r".repeat(513),
                ..base()
            },
        ),
        (
            "binding_message",
            pb::RequestDelegationRequest {
                binding_message: "m".repeat(257),
                ..base()
            },
        ),
        (
            "binding_message",
            pb::RequestDelegationRequest {
                binding_message: "line\nbreak".into(),
                ..base()
            },
        ),
        ("idempotency_key", keyed("", base())),
        ("idempotency_key", keyed("bad key!", base())),
        ("idempotency_key", keyed(&"k".repeat(129), base())),
    ]
}

/// RequestDelegation without the SDK's help (it would fill an empty key).
async fn raw_request(
    client: &VaultGuardClient,
    request: pb::RequestDelegationRequest,
) -> Result<pb::RequestDelegationResponse, ClientError> {
    client.raw_request_delegation(request).await
}

#[track_caller]
fn granted(outcome: Result<DelegationOutcome, ClientError>) -> pb::DelegationGrant {
    match outcome {
        Ok(DelegationOutcome::Allowed { grant, .. }) => grant,
        other => panic!("expected ALLOW, got {other:?}"),
    }
}

fn challenge_delegation_id(outcome: &DelegationOutcome) -> String {
    outcome
        .delegation()
        .map(|d| d.id.clone())
        .unwrap_or_default()
}

#[track_caller]
fn challenged(outcome: Result<DelegationOutcome, ClientError>) -> pb::StepUpChallenge {
    match outcome {
        Ok(DelegationOutcome::StepUp { challenge, .. }) => challenge,
        other => panic!("expected STEP_UP, got {other:?}"),
    }
}

/// Requests a delegation that must be allowed; returns it and its token.
pub(crate) async fn grant(
    agent: &VaultGuardClient,
    request: pb::RequestDelegationRequest,
) -> (pb::Delegation, String) {
    let grant = granted(agent.request_delegation(request).await);
    (grant.delegation.expect("delegation"), grant.token)
}

async fn list(
    client: &VaultGuardClient,
    filter: pb::ListDelegationsRequest,
) -> Result<pb::ListDelegationsResponse, ClientError> {
    client.list_delegations(filter).await
}

async fn listed_ids(client: &VaultGuardClient, filter: pb::ListDelegationsRequest) -> Vec<String> {
    list(client, filter)
        .await
        .expect("list delegations")
        .delegations
        .into_iter()
        .map(|d| d.id)
        .collect()
}

/// Revokes, retrying the retryable ABORTED answer as the contract allows.
async fn revoke_retrying(
    admin: VaultGuardClient,
    delegation_id: String,
    reason: &'static str,
) -> Result<pb::Delegation, ClientError> {
    for _ in 0..5 {
        match admin.revoke(delegation_id.clone(), reason).await {
            Err(err) if err.code() == Some(Code::Aborted) => continue,
            other => return other,
        }
    }
    admin.revoke(delegation_id, reason).await
}

/// Runs the sweeper once at `now`. A storage conflict (SQLite BUSY: the test's
/// own connection competes with the server's) changed nothing and is retried,
/// as the server's background sweeper retries on its next tick.
async fn sweep(state: AppState, now: i64) -> u64 {
    for _ in 0..50 {
        match sweep_expired(&state, now).await {
            Err(Error::Storage(_) | Error::Conflict(_)) => {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            other => return other.expect("sweep"),
        }
    }
    panic!("the sweep kept conflicting")
}

#[track_caller]
fn metadata_value<'a>(metadata: &'a HashMap<String, String>, key: &str) -> &'a str {
    metadata.get(key).map_or("<absent>", String::as_str)
}

#[track_caller]
pub(crate) fn assert_inactive(
    response: Result<pb::VerifyDelegationTokenResponse, ClientError>,
    what: &str,
) {
    let response = response.unwrap_or_else(|e| panic!("{what}: verify failed: {e:?}"));
    assert_eq!(
        response,
        pb::VerifyDelegationTokenResponse::default(),
        "{what}: an inactive answer says nothing else"
    );
}

/// How many `event_type` events in each of the two logs name `subject_id`.
pub(crate) async fn in_both_logs(
    server: &TestServer,
    tenants: [&str; 2],
    event_type: &str,
    subject_id: &str,
) -> [usize; 2] {
    [
        server.audit_count(tenants[0], event_type, subject_id).await,
        server.audit_count(tenants[1], event_type, subject_id).await,
    ]
}

/// Asserts how many events of each type name `subject_id` in each party's
/// log (requesting tenant first).
pub(crate) async fn assert_logged(pair: &Pair, subject_id: &str, expected: &[(&str, [usize; 2])]) {
    for (event_type, counts) in expected {
        assert_eq!(
            in_both_logs(&pair.server, pair.logs(), event_type, subject_id).await,
            *counts,
            "{event_type}"
        );
    }
}

// ---------------------------------------------------------------------------
// Tokens.

fn b64(value: &Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(value).expect("json"))
}

/// The decoded header (0) or claims (1) of a compact JWT, unverified.
pub(crate) fn jwt_part(token: &str, index: usize) -> Value {
    let part = token.split('.').nth(index).expect("jwt part");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).expect("base64url")).expect("json")
}

/// `token` with its claims edited and its signature kept.
pub(crate) fn with_claims(token: &str, edit: impl FnOnce(&mut Value)) -> String {
    let mut claims = jwt_part(token, 1);
    edit(&mut claims);
    let parts: Vec<&str> = token.split('.').collect();
    format!("{}.{}.{}", parts[0], b64(&claims), parts[2])
}

pub(crate) async fn jwks(server: &TestServer) -> Value {
    reqwest::get(format!("{}/.well-known/jwks.json", server.http_url()))
        .await
        .expect("jwks")
        .json()
        .await
        .expect("jwks json")
}

fn jwks_kids(jwks: &Value) -> Vec<String> {
    jwks["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .map(|k| k["kid"].as_str().expect("kid").to_owned())
        .collect()
}

/// Verifies `token` offline with PyJWT (tests/py/verify_jwt.py): signature
/// against the JWKS, `typ: at+jwt`, issuer, audience, expiry. Returns the
/// header and claims PyJWT accepted, or its reason for refusing.
fn pyjwt(token: &str, jwks: &Value, issuer: &str, audience: &str) -> Result<Value, String> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/py/verify_jwt.py");
    let mut child = Command::new("python3")
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 with PyJWT (pip install 'pyjwt[crypto]')");
    let input = json!({"token": token, "jwks": jwks, "issuer": issuer, "audience": audience});
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.to_string().as_bytes())
        .expect("write to python");
    let output = child.wait_with_output().expect("python output");
    if output.status.success() {
        Ok(serde_json::from_slice(&output.stdout).expect("python json"))
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

/// Checks the header and every claim of `token` against `delegation`;
/// returns the claims.
#[track_caller]
fn assert_token(
    server: &TestServer,
    token: &str,
    delegation: &pb::Delegation,
    audience: &str,
    algorithm: &str,
) -> Value {
    let header = jwt_part(token, 0);
    assert_eq!(header["alg"], algorithm);
    assert_eq!(header["typ"], "at+jwt");
    assert!(header["kid"].as_str().is_some_and(|kid| !kid.is_empty()));
    let claims = jwt_part(token, 1);
    let agent = delegation.requesting_agent_id.as_str();
    assert_eq!(claims["iss"], server.http_url());
    assert_eq!(claims["sub"], agent);
    assert_eq!(claims["client_id"], agent);
    assert!(
        claims["aud"] == json!(audience) || claims["aud"] == json!([audience]),
        "aud {}",
        claims["aud"]
    );
    assert_eq!(claims["jti"], delegation.id.as_str());
    assert_eq!(claims["action"], delegation.action.as_str());
    let scope: HashSet<&str> = claims["scope"]
        .as_str()
        .expect("scope")
        .split(' ')
        .collect();
    let expected: HashSet<&str> = if delegation.scopes.is_empty() {
        HashSet::from([delegation.action.as_str()])
    } else {
        delegation.scopes.iter().map(String::as_str).collect()
    };
    assert_eq!(scope, expected);
    assert_eq!(
        claims["requesting_tenant_id"],
        delegation.requesting_tenant_id.as_str()
    );
    assert_eq!(
        claims["receiving_tenant_id"],
        delegation.receiving_tenant_id.as_str()
    );
    assert_eq!(
        claims["act"],
        json!({"sub": agent, "client_id": agent, "tenant_id": delegation.requesting_tenant_id})
    );
    let (iat, nbf, exp) = lifetime(&claims);
    assert!(nbf <= iat && iat < exp, "iat {iat} nbf {nbf} exp {exp}");
    assert_eq!(Some(exp), delegation.expire_time.map(|t| t.seconds));
    claims
}

/// The `iat`, `nbf` and `exp` claims.
fn lifetime(claims: &Value) -> (i64, i64, i64) {
    let second = |name: &str| claims[name].as_i64().unwrap_or_else(|| panic!("{name}"));
    (second("iat"), second("nbf"), second("exp"))
}

fn seconds_between(
    from: Option<prost_types::Timestamp>,
    to: Option<prost_types::Timestamp>,
) -> i64 {
    to.expect("to").seconds - from.expect("from").seconds
}

// ---------------------------------------------------------------------------
// The three outcomes.

#[tokio::test]
async fn allow_issues_an_active_delegation_and_its_token() {
    let pair = setup_pair().await;
    vaultguard_tests::parts!(pair => server, acme, globex, bot, agent, acme_admin, globex_admin);
    let rule = add_rule(
        globex_admin,
        pb::Rule {
            scopes: vec!["inventory:*".into()],
            resources: vec!["https://globex.example/api/*".into()],
            ..with_counterpart(&acme.id, inbound("stock.*", pb::Effect::Allow))
        },
    )
    .await;
    let request = pb::RequestDelegationRequest {
        scopes: vec!["inventory:write".into(), "inventory:read".into()],
        resource: "https://globex.example/api/stock".into(),
        binding_message: "restock 12 widgets".into(),
        context: context(&[("amount", num(12.0)), ("currency", text("EUR"))]),
        ..ask(&globex.id, "stock.write")
    };
    let outcome = agent.request_delegation(request.clone()).await.unwrap();
    let decision = outcome.decision().clone();
    let DelegationOutcome::Allowed { grant, .. } = outcome else {
        panic!("expected ALLOW")
    };
    assert_eq!(decision.outcome, pb::Decision::Allow as i32);
    // Globex's rule is globex's business: acme's agent sees only the outcome.
    assert_eq!(decision.inbound.as_ref().unwrap().rule_id, "");
    assert_eq!(decision.outbound.as_ref().unwrap().rule_id, "");
    assert_eq!(decision.scopes, ["inventory:read", "inventory:write"]);
    assert_eq!(decision.resource, "https://globex.example/api/stock");
    assert_eq!(decision.max_ttl_seconds, 600);
    assert_eq!(grant.token_type, "Bearer");
    assert!(
        (599..=600).contains(&grant.expires_in),
        "{}",
        grant.expires_in
    );

    let delegation = grant.delegation.clone().unwrap();
    assert_id(&delegation.id, "dlg_");
    let seen_by_globex = globex_admin.get_delegation(&delegation.id).await.unwrap();
    assert_eq!(
        seen_by_globex.decision.unwrap().inbound.unwrap().rule_id,
        rule.id
    );
    assert_eq!(delegation.requesting_tenant_id, acme.id);
    assert_eq!(delegation.requesting_agent_id, bot.id);
    assert_eq!(delegation.receiving_tenant_id, globex.id);
    assert_eq!(delegation.action, "stock.write");
    assert_eq!(delegation.scopes, request.scopes);
    assert_eq!(delegation.resource, request.resource);
    assert_eq!(delegation.binding_message, request.binding_message);
    assert_eq!(delegation.context, request.context);
    assert_eq!(delegation.requested_ttl_seconds, 600);
    assert_eq!(delegation.status, Status::Active as i32);
    assert_eq!(delegation.step_up_id, "");
    assert_eq!(delegation.token_algorithm, "RS256");
    assert_eq!(
        delegation.decision.as_ref().map(|d| d.outcome),
        Some(pb::Decision::Allow as i32)
    );
    assert!(delegation.end_time.is_none() && delegation.ended_by.is_none());
    assert_eq!(
        seconds_between(delegation.activate_time, delegation.expire_time),
        600
    );
    let claims = assert_token(server, &grant.token, &delegation, &globex.audience, "RS256");
    let (iat, _, exp) = lifetime(&claims);
    assert_eq!(exp - iat, 600);

    // Every reader of both parties sees it.
    let readers = [
        agent.clone(),
        acme_admin.clone(),
        globex_admin.clone(),
        server.human(&acme.id, "aud", &[pb::Role::Auditor]).await,
        server.human(&globex.id, "aud", &[pb::Role::Auditor]).await,
        server.approver(&globex.id, "ann").await,
    ];
    for reader in &readers {
        let seen = reader.get_delegation(&delegation.id).await.unwrap();
        assert_eq!(
            (seen.id.as_str(), seen.status),
            (delegation.id.as_str(), Status::Active as i32)
        );
    }

    // The token is never stored.
    use sea_orm::EntityTrait;
    let row =
        vaultguard_server::store::entities::delegation::Entity::find_by_id(delegation.id.clone())
            .one(&server.state.db)
            .await
            .unwrap()
            .expect("delegation row");
    let signature = grant.token.rsplit('.').next().unwrap();
    assert!(
        !format!("{row:?}").contains(signature),
        "token stored: {row:?}"
    );

    // Decision and issuance are audited in both logs.
    for event_type in ["delegation.decided", "delegation.token_issued"] {
        assert_eq!(
            in_both_logs(server, pair.logs(), event_type, &delegation.id).await,
            [1, 1],
            "{event_type}"
        );
    }

    // with_delegation hands the work a token the receiving tenant accepts.
    let verified = agent
        .with_delegation(ask(&globex.id, "stock.read"), |token| async move {
            globex_admin.verify(token, "stock.read").await
        })
        .await
        .unwrap()
        .unwrap();
    assert!(verified.active);
    assert_eq!(verified.action, "stock.read");
    pair.server.stop().await;
}

#[tokio::test]
async fn step_up_leaves_a_pending_delegation_and_a_challenge() {
    let pair = setup_pair().await;
    vaultguard_tests::parts!(pair => server, globex, agent, globex_admin);
    pair.globex_allows("pay.*").await;
    let large = add_rule(
        globex_admin,
        pb::Rule {
            approvals_required: 2,
            ..when(
                vec![cond("amount", pb::ConditionOperator::Gt, num(1000.0))],
                inbound("pay.*", pb::Effect::StepUp),
            )
        },
    )
    .await;
    let request = |amount: f64| pb::RequestDelegationRequest {
        context: context(&[("amount", num(amount))]),
        binding_message: "pay invoice 7".into(),
        ..ask(&globex.id, "pay.invoice")
    };

    let outcome = agent
        .request_delegation(keyed("pay-1", request(1200.0)))
        .await
        .unwrap();
    let decision = outcome.decision().clone();
    assert_eq!(decision.outcome, pb::Decision::StepUp as i32);
    assert_eq!(decision.approvals_required, 2);
    // The deciding rule is globex's: acme's agent sees the outcome only.
    assert_eq!(decision.inbound.as_ref().unwrap().rule_id, "");
    assert_eq!(
        globex_admin
            .get_delegation(&challenge_delegation_id(&outcome))
            .await
            .unwrap()
            .decision
            .unwrap()
            .inbound
            .unwrap()
            .rule_id,
        large.id
    );
    let challenge = challenged(Ok(outcome));
    assert_eq!((challenge.expires_in, challenge.interval), (300, 5));
    let auth_req_id = &challenge.auth_req_id;
    assert!(
        (22..=128).contains(&auth_req_id.len())
            && auth_req_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')),
        "auth_req_id {auth_req_id}"
    );
    let delegation = challenge.delegation.clone().unwrap();
    assert_eq!(delegation.status, Status::Pending as i32);
    assert!(delegation.step_up_id.starts_with("stp_"));
    assert_ne!(&delegation.step_up_id, auth_req_id);
    assert!(delegation.activate_time.is_none());
    assert_eq!(
        seconds_between(delegation.create_time, delegation.expire_time),
        300
    );
    assert_eq!(server.count("step_ups").await, 1);
    assert_eq!(
        in_both_logs(server, pair.logs(), "delegation.decided", &delegation.id).await,
        [1, 1]
    );
    assert_eq!(
        in_both_logs(
            server,
            pair.logs(),
            "delegation.token_issued",
            &delegation.id
        )
        .await,
        [0, 0]
    );

    // A replay returns the same challenge and writes nothing new.
    let again = challenged(
        agent
            .request_delegation(keyed("pay-1", request(1200.0)))
            .await,
    );
    assert_eq!(&again.auth_req_id, auth_req_id);
    assert_eq!(again.delegation.unwrap().id, delegation.id);
    assert!((295..=300).contains(&again.expires_in));
    assert_eq!(again.interval, 5);
    assert_eq!(server.count("step_ups").await, 1);
    assert_eq!(server.count("delegations").await, 1);
    let seen = globex_admin.get_delegation(&delegation.id).await.unwrap();
    assert_eq!(seen.status, Status::Pending as i32);
    assert_eq!(seen.step_up_id, delegation.step_up_id);

    // The condition decides: a small amount is allowed at once.
    granted(agent.request_delegation(request(500.0)).await);

    // with_delegation waits for a human; at the caller's deadline it says
    // a human must approve first, and runs nothing.
    let err = agent
        .with_delegation_within(
            request(5000.0),
            Some(std::time::Duration::from_millis(300)),
            |token| async move { token },
        )
        .await
        .unwrap_err();
    let ClientError::StepUpRequired {
        delegation_id,
        auth_req_id,
        expires_in,
        interval,
    } = err
    else {
        panic!("expected StepUpRequired, got {err:?}")
    };
    assert_id(&delegation_id, "dlg_");
    assert!(auth_req_id.len() >= 22);
    assert_eq!((expires_in, interval), (300, 5));
    assert_eq!(server.count("step_ups").await, 2);

    // It never had a token, so it has no token algorithm either.
    assert_eq!(delegation.token_algorithm, "", "PENDING delegation");
    pair.server.stop().await;
}

#[tokio::test]
async fn block_is_refused_with_its_reason_and_leaves_a_blocked_record() {
    let pair = setup_pair().await;
    vaultguard_tests::parts!(pair => server, globex, agent, acme_admin, globex_admin);

    // No inbound rule at all.
    let metadata = expect_reason(
        agent
            .request_delegation(ask(&globex.id, "stock.write"))
            .await,
        Code::PermissionDenied,
        pb::ErrorReason::NoMatchingRule,
    );
    assert_eq!(metadata_value(&metadata, "policy_side"), "inbound");
    // Globex's side: its rule id and version are not acme's to see.
    assert_eq!(metadata_value(&metadata, "rule_id"), "<absent>");
    assert_eq!(metadata_value(&metadata, "policy_version"), "<absent>");
    let blocked_id = metadata_value(&metadata, "delegation_id").to_owned();
    assert_id(&blocked_id, "dlg_");
    for reader in [acme_admin, globex_admin, agent] {
        let blocked = reader.get_delegation(&blocked_id).await.unwrap();
        assert_eq!(blocked.status, Status::Blocked as i32);
        assert_eq!(blocked.token_algorithm, "");
        assert!(blocked.expire_time.is_none() && blocked.activate_time.is_none());
        assert!(blocked.end_time.is_some());
        assert_eq!(
            blocked.decision.map(|d| d.outcome),
            Some(pb::Decision::Block as i32)
        );
    }
    assert_eq!(
        in_both_logs(server, pair.logs(), "delegation.decided", &blocked_id).await,
        [1, 1]
    );

    // An inbound BLOCK rule.
    let wall = add_rule(globex_admin, inbound("stock.*", pb::Effect::Block)).await;
    let metadata = expect_reason(
        agent
            .request_delegation(ask(&globex.id, "stock.delete"))
            .await,
        Code::PermissionDenied,
        pb::ErrorReason::PolicyBlocked,
    );
    assert_eq!(metadata_value(&metadata, "policy_side"), "inbound");
    assert_eq!(metadata_value(&metadata, "rule_id"), "<absent>");
    let seen = globex_admin
        .get_delegation(metadata_value(&metadata, "delegation_id"))
        .await
        .unwrap();
    let inbound_side = seen.decision.unwrap().inbound.unwrap();
    assert_eq!(
        (inbound_side.rule_id, inbound_side.policy_version),
        (wall.id, 1)
    );

    // An outbound BLOCK overrides an inbound ALLOW.
    add_rule(
        globex_admin,
        pb::Rule {
            priority: 5,
            ..inbound("*", pb::Effect::Allow)
        },
    )
    .await;
    let no_bank = add_rule(acme_admin, outbound("bank.*", pb::Effect::Block)).await;
    let bank = keyed("bank-1", ask(&globex.id, "bank.pay"));
    let refused = agent.request_delegation(bank.clone()).await;
    let metadata = expect_reason(
        refused,
        Code::PermissionDenied,
        pb::ErrorReason::PolicyBlocked,
    );
    assert_eq!(metadata_value(&metadata, "policy_side"), "outbound");
    assert_eq!(metadata_value(&metadata, "rule_id"), no_bank.id);
    assert_eq!(metadata_value(&metadata, "policy_version"), "1");
    // A replay answers the same refusal about the same record.
    let replayed = agent.request_delegation(bank).await;
    let replayed = expect_reason(
        replayed,
        Code::PermissionDenied,
        pb::ErrorReason::PolicyBlocked,
    );
    assert_eq!(replayed, metadata);

    // Least privilege blocks with no rule to name.
    set_outbound_default(acme_admin, pb::OutboundDefault::Block, 0)
        .await
        .unwrap();
    let metadata = expect_reason(
        agent
            .request_delegation(ask(&globex.id, "stock.read"))
            .await,
        Code::PermissionDenied,
        pb::ErrorReason::PolicyBlocked,
    );
    assert_eq!(metadata_value(&metadata, "policy_side"), "outbound");
    assert_eq!(metadata_value(&metadata, "rule_id"), "");
    assert_eq!(metadata_value(&metadata, "policy_version"), "2");

    // with_delegation passes the refusal on without running the work.
    let err = agent
        .with_delegation(ask(&globex.id, "bank.pay"), |token| async move { token })
        .await;
    expect_reason(err, Code::PermissionDenied, pb::ErrorReason::PolicyBlocked);

    // Five BLOCKED records, no token ever.
    assert_eq!(server.count("delegations").await, 5);
    let blocked = pb::ListDelegationsRequest {
        statuses: vec![Status::Blocked as i32],
        ..Default::default()
    };
    assert_eq!(listed_ids(acme_admin, blocked).await.len(), 5);
    for log in pair.logs() {
        assert!(
            server
                .audit_events(log, "delegation.token_issued")
                .await
                .is_empty()
        );
    }
    pair.server.stop().await;
}

#[tokio::test]
async fn wildcard_and_agent_specific_rules_decide_per_agent() {
    let pair = setup_pair().await;
    vaultguard_tests::parts!(pair => server, acme, globex, bot, agent, globex_admin);
    let (_, _, other_agent) = server.create_agent(&acme.id, "other-bot").await;
    let from_acme = |rule: pb::Rule| with_counterpart(&acme.id, rule);
    let wall = add_rule(globex_admin, from_acme(inbound("*", pb::Effect::Block))).await;
    let door = add_rule(
        globex_admin,
        pb::Rule {
            agent_id: bot.id.clone(),
            ..from_acme(inbound("stock.*", pb::Effect::Allow))
        },
    )
    .await;

    // Which of globex's rules decided is globex's to see.
    let deciding_rule = async |delegation_id: &str| {
        let seen = globex_admin.get_delegation(delegation_id).await.unwrap();
        seen.decision.unwrap().inbound.unwrap().rule_id
    };
    for action in ["stock.write", "stock.write.bulk"] {
        let (delegation, _) = grant(agent, ask(&globex.id, action)).await;
        assert_eq!(deciding_rule(&delegation.id).await, door.id, "{action}");
    }
    for (client, action) in [
        (other_agent, "stock.write"),
        (agent.clone(), "bank.pay"),
        (agent.clone(), "stock"),
    ] {
        let metadata = expect_reason(
            client.request_delegation(ask(&globex.id, action)).await,
            Code::PermissionDenied,
            pb::ErrorReason::PolicyBlocked,
        );
        assert_eq!(metadata_value(&metadata, "rule_id"), "<absent>", "{action}");
        assert_eq!(metadata_value(&metadata, "policy_side"), "inbound");
        let blocked = metadata_value(&metadata, "delegation_id");
        assert_eq!(deciding_rule(blocked).await, wall.id, "{action}");
    }
    pair.server.stop().await;
}

#[tokio::test]
async fn token_lifetime_is_the_smallest_of_request_rules_and_cap() {
    let pair = setup_pair().await;
    vaultguard_tests::parts!(pair => globex, agent, acme_admin, globex_admin);
    let capped = |max_ttl_seconds: u32, rule: pb::Rule| pb::Rule {
        max_ttl_seconds,
        ..rule
    };
    add_rule(
        globex_admin,
        capped(900, inbound("stock.*", pb::Effect::Allow)),
    )
    .await;
    pair.globex_allows("bulk.*").await;
    add_rule(
        acme_admin,
        capped(120, outbound("stock.read", pb::Effect::Allow)),
    )
    .await;

    for (action, requested, expected) in [
        ("stock.write", 600, 600),
        ("stock.write", 3600, 900),
        ("stock.read", 3600, 120),
        ("bulk.load", 86_400, 86_400),
        ("bulk.load", 1, 1),
    ] {
        let outcome = agent
            .request_delegation(for_seconds(requested, ask(&globex.id, action)))
            .await;
        let what = format!("{action} for {requested} s");
        let decision = outcome.as_ref().map(|o| o.decision().max_ttl_seconds);
        assert_eq!(decision.ok(), Some(expected), "{what}: decision");
        let grant = granted(outcome);
        let delegation = grant.delegation.unwrap();
        let (iat, _, exp) = lifetime(&jwt_part(&grant.token, 1));
        assert_eq!(exp - iat, i64::from(expected), "{what}: token");
        assert_eq!(
            seconds_between(delegation.activate_time, delegation.expire_time),
            i64::from(expected),
            "{what}: delegation"
        );
        assert_eq!(delegation.requested_ttl_seconds, requested);
        assert!((expected.saturating_sub(1)..=expected).contains(&grant.expires_in));
    }
    pair.server.stop().await;
}

#[tokio::test]
async fn a_delegation_within_one_tenant_is_judged_and_audited_once() {
    let pair = setup_pair().await;
    vaultguard_tests::parts!(pair => server, acme, agent, acme_admin);
    let own = add_rule(
        acme_admin,
        with_counterpart(&acme.id, inbound("sign:key-1", pb::Effect::Allow)),
    )
    .await;
    let (delegation, token) = grant(agent, ask(&acme.id, "sign:key-1")).await;
    let decision = delegation.decision.clone().unwrap();
    assert_eq!(decision.outbound.unwrap().tenant_id, acme.id);
    let inbound_side = decision.inbound.unwrap();
    assert_eq!(
        (inbound_side.tenant_id, inbound_side.rule_id),
        (acme.id.clone(), own.id)
    );
    assert_token(server, &token, &delegation, &acme.audience, "RS256");
    for event_type in ["delegation.decided", "delegation.token_issued"] {
        assert_eq!(
            server
                .audit_count(&acme.id, event_type, &delegation.id)
                .await,
            1,
            "{event_type}"
        );
    }
    assert!(
        acme_admin
            .verify(&token, "sign:key-1")
            .await
            .unwrap()
            .active
    );
    let revoked = acme_admin.revoke(&delegation.id, "rotate").await.unwrap();
    assert_eq!(revoked.status, Status::Revoked as i32);
    assert_eq!(
        server
            .audit_count(&acme.id, "delegation.revoked", &delegation.id)
            .await,
        1
    );
    pair.server.stop().await;
}

// ---------------------------------------------------------------------------
// Idempotency and races.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_with_one_key_make_one_delegation() {
    let pair = setup_pair().await;
    vaultguard_tests::parts!(pair => server, acme, globex, agent);
    pair.globex_allows_any_scope("stock.*").await;
    let request = pb::RequestDelegationRequest {
        scopes: vec!["a".into(), "b".into()],
        ..keyed("restock-42", ask(&globex.id, "stock.write"))
    };

    let tasks: Vec<_> = (0..32)
        .map(|_| {
            let agent = agent.clone();
            let request = request.clone();
            tokio::spawn(async move { agent.request_delegation(request).await })
        })
        .collect();
    let mut grants = Vec::new();
    for task in tasks {
        grants.push(granted(task.await.unwrap()));
    }
    let ids: HashSet<String> = grants
        .iter()
        .map(|g| g.delegation.as_ref().unwrap().id.clone())
        .collect();
    assert_eq!(ids.len(), 1, "one delegation: {ids:?}");
    let id = ids.into_iter().next().unwrap();
    let claims: HashSet<(String, (i64, i64, i64))> = grants
        .iter()
        .map(|g| {
            let claims = jwt_part(&g.token, 1);
            (
                claims["jti"].as_str().unwrap().to_owned(),
                lifetime(&claims),
            )
        })
        .collect();
    assert_eq!(claims.len(), 1, "one jti and one lifetime: {claims:?}");
    assert_eq!(claims.into_iter().next().unwrap().0, id);
    assert_eq!(server.count("delegations").await, 1);
    for (event_type, expected) in [
        ("delegation.decided", 1),
        ("delegation.token_issued", 1),
        ("delegation.token_reissued", 31),
    ] {
        assert_eq!(
            in_both_logs(server, pair.logs(), event_type, &id).await,
            [expected, expected],
            "{event_type}"
        );
    }

    // Scopes compare as a set: the same scopes in another order are a replay.
    let reordered = pb::RequestDelegationRequest {
        scopes: vec!["b".into(), "a".into()],
        ..request.clone()
    };
    let (replayed, _) = grant(agent, reordered).await;
    assert_eq!(replayed.id, id);

    // The same key with any other parameter is refused.
    for changed in [
        pb::RequestDelegationRequest {
            action: "stock.read".into(),
            ..request.clone()
        },
        for_seconds(601, request.clone()),
        pb::RequestDelegationRequest {
            scopes: vec!["a".into()],
            ..request.clone()
        },
        pb::RequestDelegationRequest {
            context: context(&[("amount", num(1.0))]),
            ..request.clone()
        },
        pb::RequestDelegationRequest {
            binding_message: "other".into(),
            ..request.clone()
        },
    ] {
        let what = format!("{changed:?}");
        let metadata = expect_reason(
            agent.request_delegation(changed).await,
            Code::AlreadyExists,
            pb::ErrorReason::IdempotencyConflict,
        );
        assert_eq!(
            metadata_value(&metadata, "idempotency_key"),
            "restock-42",
            "{what}"
        );
    }
    assert_eq!(server.count("delegations").await, 1);

    // The key belongs to the agent: another agent's same key is its own.
    let (_, _, other_agent) = server.create_agent(&acme.id, "other-bot").await;
    let (other, _) = grant(&other_agent, request.clone()).await;
    assert_ne!(other.id, id);
    assert_eq!(server.count("delegations").await, 2);
    pair.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_revokes_leave_one_terminal_state_and_one_event() {
    let pair = setup_pair().await;
    vaultguard_tests::parts!(pair => server, globex, agent, globex_admin);
    pair.globex_allows("stock.*").await;

    for round in 0..4 {
        let request = keyed(&format!("revoke-{round}"), ask(&globex.id, "stock.write"));
        let (delegation, token) = grant(agent, request.clone()).await;
        let id = delegation.id.clone();
        let first = tokio::spawn(revoke_retrying(globex_admin.clone(), id.clone(), "first"));
        let second = tokio::spawn(revoke_retrying(globex_admin.clone(), id.clone(), "second"));
        let (first, second) = (first.await.unwrap(), second.await.unwrap());
        let (winner, loser) = match (first, second) {
            (Ok(winner), Err(loser)) | (Err(loser), Ok(winner)) => (winner, loser),
            other => panic!("expected exactly one revoke to succeed: {other:?}"),
        };
        let metadata = expect_reason(
            Err::<(), _>(loser),
            Code::FailedPrecondition,
            pb::ErrorReason::InvalidState,
        );
        assert!(
            metadata_value(&metadata, "state").contains("REVOKED"),
            "{metadata:?}"
        );
        assert_eq!(winner.status, Status::Revoked as i32);
        assert!(["first", "second"].contains(&winner.end_reason.as_str()));
        assert!(winner.end_time.is_some());
        assert_eq!(
            winner.ended_by,
            Some(pb::Actor {
                kind: pb::PrincipalKind::Human as i32,
                subject: "gina".into(),
                tenant_id: globex.id.clone(),
            })
        );
        assert_eq!(
            in_both_logs(server, pair.logs(), "delegation.revoked", &id).await,
            [1, 1],
            "round {round}"
        );
        let seen = globex_admin.get_delegation(&id).await.unwrap();
        assert_eq!(seen.status, Status::Revoked as i32);
        assert_eq!(seen.end_reason, winner.end_reason);
        assert_inactive(globex_admin.verify(&token, "").await, "revoked");

        // A replay of the request cannot resurrect it.
        let metadata = expect_reason(
            agent.request_delegation(request).await,
            Code::FailedPrecondition,
            pb::ErrorReason::InvalidState,
        );
        assert_eq!(metadata_value(&metadata, "delegation_id"), id);
        assert!(
            metadata_value(&metadata, "state").contains("REVOKED"),
            "{metadata:?}"
        );
    }

    // A revoke needs a reason.
    let (delegation, _) = grant(agent, ask(&globex.id, "stock.write")).await;
    expect_invalid(globex_admin.revoke(&delegation.id, "").await, "reason");
    expect_invalid(
        globex_admin.revoke(&delegation.id, "r".repeat(513)).await,
        "reason",
    );
    let still = globex_admin.get_delegation(&delegation.id).await.unwrap();
    assert_eq!(still.status, Status::Active as i32);
    pair.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_revoke_racing_the_sweeper_ends_each_delegation_once() {
    const COUNT: usize = 16;
    let pair = setup_pair().await;
    vaultguard_tests::parts!(pair => server, globex, agent, globex_admin);
    pair.globex_allows("stock.*").await;
    let mut ids = Vec::new();
    for _ in 0..COUNT {
        let (delegation, _) = grant(agent, for_seconds(60, ask(&globex.id, "stock.write"))).await;
        ids.push(delegation.id);
    }

    let finished = Arc::new(AtomicUsize::new(0));
    let revoke = |id: &String| {
        let (admin, id, finished) = (globex_admin.clone(), id.clone(), finished.clone());
        tokio::spawn(async move {
            let result = revoke_retrying(admin, id, "race").await;
            finished.fetch_add(1, Ordering::SeqCst);
            result
        })
    };
    // One revoke lands before anything expires. Half of the others start
    // next; once one of them has landed too, the clock jumps past every
    // expiry and the sweepers start while the rest are in flight; the last
    // half start after the jump.
    let mut results = vec![revoke(&ids[0]).await.unwrap()];
    let mut revokes = Vec::new();
    let mut sweepers = Vec::new();
    for (n, id) in ids.iter().enumerate().skip(1) {
        revokes.push(revoke(id));
        if n == COUNT / 2 {
            for _ in 0..10_000 {
                if finished.load(Ordering::SeqCst) >= 2 {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            server.clock.advance(61_000);
            let now = server.state.clock.now_millis();
            for _ in 0..3 {
                sweepers.push(tokio::spawn(sweep(server.state.clone(), now)));
            }
        }
    }
    for revoke in revokes {
        results.push(revoke.await.unwrap());
    }
    let mut swept = 0;
    for sweeper in sweepers {
        swept += sweeper.await.unwrap();
    }
    let now = server.state.clock.now_millis();
    assert_eq!(sweep(server.state.clone(), now).await, 0, "all swept");

    let mut revoked = 0;
    for (id, result) in ids.iter().zip(&results) {
        let status = globex_admin.get_delegation(id).await.unwrap().status;
        match result {
            Ok(delegation) => {
                assert_eq!(delegation.status, Status::Revoked as i32);
                assert_eq!(status, Status::Revoked as i32, "{id}");
                revoked += 1;
            }
            Err(err) => {
                assert_eq!(
                    (err.code(), err.reason()),
                    (
                        Some(Code::FailedPrecondition),
                        Some(pb::ErrorReason::InvalidState)
                    ),
                    "{err:?}"
                );
                assert_eq!(status, Status::Expired as i32, "{id}");
            }
        }
        let expected = if status == Status::Revoked as i32 {
            ([1, 1], [0, 0])
        } else {
            ([0, 0], [1, 1])
        };
        let events = (
            in_both_logs(server, pair.logs(), "delegation.revoked", id).await,
            in_both_logs(server, pair.logs(), "delegation.expired", id).await,
        );
        assert_eq!(events, expected, "{id}: (revoked, expired) events per log");
    }
    assert!(results[0].is_ok(), "revoked before the clock jump");
    assert!(
        revoked < COUNT,
        "revokes started after the jump find it expired"
    );
    assert!(
        swept <= u64::try_from(COUNT - revoked).unwrap(),
        "swept {swept}, expired {}",
        COUNT - revoked
    );
    eprintln!("race: {revoked} revoked, {} expired", COUNT - revoked);
    pair.server.stop().await;
}

// ---------------------------------------------------------------------------
// Verification.

async fn set_token_algorithm(
    admin: &VaultGuardClient,
    algorithm: pb::TokenAlgorithm,
) -> pb::Tenant {
    admin
        .update_tenant_settings(pb::UpdateTenantSettingsRequest {
            settings: Some(pb::TenantSettings {
                token_algorithm: algorithm as i32,
            }),
        })
        .await
        .unwrap()
        .tenant
        .unwrap()
}

#[tokio::test]
async fn tokens_verify_offline_with_pyjwt_for_every_algorithm() {
    let server = TestServer::start().await;
    let acme = server.create_tenant("acme").await;
    let (_, _, agent) = server.create_agent(&acme.id, "bot").await;
    let issuer = server.http_url();

    for (slug, algorithm, alg) in [
        ("rsa-shop", pb::TokenAlgorithm::Rs256, "RS256"),
        ("ecdsa-shop", pb::TokenAlgorithm::Es256, "ES256"),
        ("eddsa-shop", pb::TokenAlgorithm::Eddsa, "EdDSA"),
    ] {
        let tenant = server.create_tenant(slug).await;
        let admin = server.admin(&tenant.id, "root").await;
        let updated = set_token_algorithm(&admin, algorithm).await;
        assert_eq!(updated.settings.unwrap().token_algorithm, algorithm as i32);
        add_rule(&admin, inbound("*", pb::Effect::Allow)).await;
        let (delegation, token) = grant(&agent, ask(&tenant.id, "stock.write")).await;
        assert_eq!(delegation.token_algorithm, alg);
        let claims = assert_token(&server, &token, &delegation, &tenant.audience, alg);

        let keys = jwks(&server).await;
        let verified = pyjwt(&token, &keys, &issuer, &tenant.audience)
            .unwrap_or_else(|reason| panic!("{alg}: PyJWT refused the token: {reason}"));
        assert_eq!(verified["claims"], claims, "{alg}");
        assert_eq!(verified["header"]["typ"], "at+jwt");

        // The same library refuses a forged payload, another audience, another issuer.
        let forged = with_claims(&token, |c| c["action"] = json!("stock.delete"));
        assert!(
            pyjwt(&forged, &keys, &issuer, &tenant.audience).is_err(),
            "{alg} forged"
        );
        assert!(
            pyjwt(&token, &keys, &issuer, &acme.audience).is_err(),
            "{alg} audience"
        );
        assert!(
            pyjwt(&token, &keys, "https://evil.example", &tenant.audience).is_err(),
            "{alg} issuer"
        );
        assert!(
            admin.verify(&token, "stock.write").await.unwrap().active,
            "{alg} online"
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn verify_introspects_active_tokens_and_says_nothing_about_others() {
    let pair = setup_pair().await;
    vaultguard_tests::parts!(pair => server, acme, globex, bot, agent, acme_admin, globex_admin);
    let (initech, initech_admin) = pair.third_tenant().await;
    let (_, _, globex_agent) = server.create_agent(&globex.id, "gate").await;
    pair.globex_allows_any_scope("stock.*").await;
    let (delegation, token) = grant(
        agent,
        pb::RequestDelegationRequest {
            scopes: vec!["inventory:write".into()],
            ..ask(&globex.id, "stock.write")
        },
    )
    .await;
    let (iat, nbf, exp) = lifetime(&jwt_part(&token, 1));
    let expected = pb::VerifyDelegationTokenResponse {
        active: true,
        scope: "inventory:write".into(),
        client_id: bot.id.clone(),
        sub: bot.id.clone(),
        aud: vec![globex.audience.clone()],
        iss: server.http_url(),
        exp,
        iat,
        nbf,
        jti: delegation.id.clone(),
        token_type: "Bearer".into(),
        requesting_tenant_id: acme.id.clone(),
        receiving_tenant_id: globex.id.clone(),
        action: "stock.write".into(),
        act: vec![pb::ActorClaim {
            sub: bot.id.clone(),
            client_id: bot.id.clone(),
            tenant_id: acme.id.clone(),
        }],
    };
    assert_eq!(globex_agent.verify(&token, "").await.unwrap(), expected);
    assert_eq!(
        globex_admin.verify(&token, "stock.write").await.unwrap(),
        expected
    );
    // The same verifier again within the audit window: still answered in
    // full, but not audited a second time (counted below).
    assert_eq!(globex_admin.verify(&token, "").await.unwrap(), expected);

    // Every failed check answers `active: false` and nothing else.
    let header = jwt_part(&token, 0);
    let payload = token.split('.').nth(1).unwrap();
    let unsigned = format!(
        "{}.{payload}.",
        b64(&json!({"alg": "none", "typ": "at+jwt", "kid": header["kid"]}))
    );
    let forged = with_claims(&token, |c| c["action"] = json!("stock.delete"));
    let truncated = token[..token.len() - 4].to_owned();
    for (what, client, candidate, required_action) in [
        (
            "another required action",
            globex_admin,
            token.clone(),
            "stock.read",
        ),
        (
            "a prefix of the action",
            globex_admin,
            token.clone(),
            "stock",
        ),
        ("a forged payload", globex_admin, forged, ""),
        ("alg none", globex_admin, unsigned, ""),
        ("garbage", globex_admin, "garbage".to_owned(), ""),
        ("three garbage parts", globex_admin, "a.b.c".to_owned(), ""),
        ("a truncated signature", globex_admin, truncated, ""),
        ("the requesting tenant", acme_admin, token.clone(), ""),
        ("the requesting agent", agent, token.clone(), ""),
        ("a third tenant", &initech_admin, token.clone(), ""),
    ] {
        assert_inactive(client.verify(candidate, required_action).await, what);
    }
    let events = server.count("audit_events").await;
    expect_invalid(globex_admin.verify("", "").await, "token");
    expect_invalid(globex_admin.verify("a".repeat(8193), "").await, "token");
    expect_invalid(
        globex_admin.verify(&token, "Stock.*").await,
        "required_action",
    );
    assert_eq!(
        server.count("audit_events").await,
        events,
        "bad input writes nothing"
    );

    // Revoked: inactive online, though offline verifiers accept it until exp.
    globex_admin
        .revoke(&delegation.id, "compromised")
        .await
        .unwrap();
    assert_inactive(globex_admin.verify(&token, "").await, "revoked");
    assert_inactive(globex_agent.verify(&token, "stock.write").await, "revoked");
    let keys = jwks(server).await;
    assert!(pyjwt(&token, &keys, &server.http_url(), &globex.audience).is_ok());

    // Each failed verification is audited in the caller's log; a success
    // once per verifier and delegation per window.
    let outcomes = |tenant: String| async move {
        let events = server.audit_events(&tenant, "delegation.verified").await;
        let success = events.iter().filter(|e| e.outcome == "success").count();
        (success, events.len() - success)
    };
    assert_eq!(
        outcomes(globex.id.clone()).await,
        (2, 9),
        "globex: (success, denied)"
    );
    assert_eq!(outcomes(initech.id.clone()).await, (0, 1), "initech");
    assert!(outcomes(acme.id.clone()).await.1 >= 2, "acme");
    pair.server.stop().await;
}

#[tokio::test]
async fn tokens_survive_issuer_key_rotation() {
    let pair = setup_pair().await;
    vaultguard_tests::parts!(pair => server, globex, agent, globex_admin);
    pair.globex_allows("*").await;
    let issuer = server.http_url();
    let (_, old_token) = grant(agent, ask(&globex.id, "stock.write")).await;
    let old_kid = jwt_part(&old_token, 0)["kid"].as_str().unwrap().to_owned();

    let operator = server.operator().await;
    let rotated =
        vaultguard_tests::calls::rotate_issuer_key(&operator, pb::TokenAlgorithm::Rs256).await;
    let new_kid = rotated.key.unwrap().kid;
    assert_eq!(rotated.retired.unwrap().kid, old_kid);

    let keys = jwks(server).await;
    let published = jwks_kids(&keys);
    assert!(published.contains(&old_kid) && published.contains(&new_kid));
    assert!(
        globex_admin
            .verify(&old_token, "stock.write")
            .await
            .unwrap()
            .active
    );
    pyjwt(&old_token, &keys, &issuer, &globex.audience)
        .unwrap_or_else(|reason| panic!("old token refused offline: {reason}"));

    let (_, new_token) = grant(agent, ask(&globex.id, "stock.read")).await;
    assert_eq!(jwt_part(&new_token, 0)["kid"], new_kid.as_str());
    assert!(globex_admin.verify(&new_token, "").await.unwrap().active);
    pyjwt(&new_token, &keys, &issuer, &globex.audience)
        .unwrap_or_else(|reason| panic!("new token refused offline: {reason}"));
    pair.server.stop().await;
}

// ---------------------------------------------------------------------------
// Visibility, ending, listing.

#[tokio::test]
async fn only_the_two_parties_see_or_end_a_delegation() {
    let pair = setup_pair().await;
    vaultguard_tests::parts!(pair => server, acme, globex, agent, acme_admin, globex_admin);
    let (initech, initech_admin) = pair.third_tenant().await;
    pair.globex_allows("stock.*").await;
    let (delegation, token) = grant(agent, ask(&globex.id, "stock.write")).await;
    let id = delegation.id.as_str();

    // A third tenant: NOT_FOUND, an empty list, an inactive token.
    expect_code(initech_admin.get_delegation(id).await, Code::NotFound);
    expect_code(initech_admin.revoke(id, "mine now").await, Code::NotFound);
    expect_code(initech_admin.relinquish(id, "").await, Code::NotFound);
    assert!(
        listed_ids(&initech_admin, pb::ListDelegationsRequest::default())
            .await
            .is_empty()
    );
    assert_inactive(initech_admin.verify(&token, "").await, "third tenant");
    assert_eq!(
        server
            .audit_events(&initech.id, "delegation.not_found")
            .await
            .len(),
        3,
        "each attempt is audited in the caller's log"
    );
    for log in pair.logs() {
        assert!(
            server
                .audit_events(log, "delegation.not_found")
                .await
                .is_empty()
        );
    }
    let unknown = format!("dlg_{}", "0".repeat(32));
    expect_code(globex_admin.get_delegation(&unknown).await, Code::NotFound);

    // The operator is no party.
    let operator = server.operator().await;
    let err = expect_code(operator.get_delegation(id).await, Code::PermissionDenied);
    assert_eq!(err.reason(), Some(pb::ErrorReason::RoleRequired));

    // Each party ends it from its own side only.
    expect_reason(
        acme_admin.revoke(id, "not ours to revoke").await,
        Code::PermissionDenied,
        pb::ErrorReason::TenantMismatch,
    );
    expect_reason(
        globex_admin.relinquish(id, "not ours to give up").await,
        Code::PermissionDenied,
        pb::ErrorReason::TenantMismatch,
    );

    // Agents see only what they requested.
    let (_, _, other_agent) = server.create_agent(&acme.id, "other-bot").await;
    let (_, _, globex_agent) = server.create_agent(&globex.id, "gate").await;
    for client in [&other_agent, &globex_agent] {
        expect_code(client.get_delegation(id).await, Code::NotFound);
        assert!(
            listed_ids(client, pb::ListDelegationsRequest::default())
                .await
                .is_empty()
        );
    }
    expect_code(other_agent.relinquish(id, "").await, Code::NotFound);

    // Approvers and auditors of both parties read it; it is still active.
    for (tenant, role) in [
        (&acme.id, pb::Role::Auditor),
        (&acme.id, pb::Role::Approver),
        (&globex.id, pb::Role::Auditor),
        (&globex.id, pb::Role::Approver),
    ] {
        let reader = server.human(tenant, "reader", &[role]).await;
        let seen = reader.get_delegation(id).await.unwrap();
        assert_eq!(seen.status, Status::Active as i32);
    }
    assert!(globex_admin.verify(&token, "").await.unwrap().active);
    pair.server.stop().await;
}

#[tokio::test]
async fn relinquish_ends_a_delegation_from_the_requesting_side() {
    let pair = setup_pair().await;
    vaultguard_tests::parts!(pair => server, acme, globex, bot, agent, acme_admin, globex_admin);
    pair.globex_allows("stock.*").await;
    let (delegation, token) = grant(agent, ask(&globex.id, "stock.write")).await;

    let ended = agent.relinquish(&delegation.id, "done").await.unwrap();
    assert_eq!(ended.status, Status::Relinquished as i32);
    assert_eq!(ended.end_reason, "done");
    assert!(ended.end_time.is_some());
    assert_eq!(
        ended.ended_by,
        Some(pb::Actor {
            kind: pb::PrincipalKind::Agent as i32,
            subject: bot.id.clone(),
            tenant_id: acme.id.clone(),
        })
    );
    assert_eq!(
        in_both_logs(
            server,
            pair.logs(),
            "delegation.relinquished",
            &delegation.id
        )
        .await,
        [1, 1]
    );
    assert_inactive(globex_admin.verify(&token, "").await, "relinquished");
    for result in [
        agent.relinquish(&delegation.id, "again").await,
        globex_admin.revoke(&delegation.id, "too late").await,
    ] {
        expect_reason(
            result,
            Code::FailedPrecondition,
            pb::ErrorReason::InvalidState,
        );
    }

    // The requesting tenant's admin may give it up too.
    let (second, _) = grant(agent, ask(&globex.id, "stock.read")).await;
    let ended = acme_admin.relinquish(&second.id, "").await.unwrap();
    assert_eq!(ended.status, Status::Relinquished as i32);
    assert_eq!(ended.ended_by.unwrap().subject, "alice");

    // A pending delegation is neither relinquished nor revoked.
    add_rule(globex_admin, inbound("pay.*", pb::Effect::StepUp)).await;
    let pending = challenged(
        agent
            .request_delegation(ask(&globex.id, "pay.invoice"))
            .await,
    );
    let pending_id = pending.delegation.unwrap().id;
    for result in [
        agent.relinquish(&pending_id, "").await,
        globex_admin.revoke(&pending_id, "no").await,
    ] {
        expect_reason(
            result,
            Code::FailedPrecondition,
            pb::ErrorReason::InvalidState,
        );
    }
    pair.server.stop().await;
}

#[tokio::test]
async fn list_delegations_filters_and_pages() {
    let pair = setup_pair().await;
    vaultguard_tests::parts!(pair => server, acme, globex, bot, agent, acme_admin, globex_admin);
    pair.globex_allows("stock.*").await;
    let (gate, _, globex_agent) = server.create_agent(&globex.id, "gate").await;
    let (initech, initech_admin) = pair.third_tenant().await;
    add_rule(&initech_admin, inbound("*", pb::Effect::Allow)).await;
    add_rule(acme_admin, inbound("*", pb::Effect::Allow)).await;

    // Oldest first: d1 … d5; the clock moves so create times differ.
    let mut ids = Vec::new();
    for (client, receiving, action) in [
        (agent, &globex.id, "stock.write"),
        (agent, &globex.id, "stock.read"),
        (agent, &globex.id, "bank.pay"),
        (agent, &initech.id, "stock.write"),
        (&globex_agent, &acme.id, "stock.write"),
    ] {
        server.clock.advance(5);
        let id = match client.request_delegation(ask(receiving, action)).await {
            Ok(outcome) => outcome.delegation().unwrap().id.clone(),
            blocked => {
                let metadata = expect_reason(
                    blocked,
                    Code::PermissionDenied,
                    pb::ErrorReason::NoMatchingRule,
                );
                metadata_value(&metadata, "delegation_id").to_owned()
            }
        };
        ids.push(id);
    }
    globex_admin.revoke(&ids[1], "enough").await.unwrap();
    let [d1, d2, d3, d4, d5] = <[String; 5]>::try_from(ids).unwrap();
    let newest_first =
        |picked: &[&String]| -> Vec<String> { picked.iter().map(|id| (*id).clone()).collect() };
    let filter = |side: pb::DelegationSide| pb::ListDelegationsRequest {
        side: side as i32,
        ..Default::default()
    };
    use pb::DelegationSide::{Any, Receiving, Requesting, Unspecified};
    let statuses = |statuses: &[Status]| pb::ListDelegationsRequest {
        statuses: statuses.iter().map(|s| *s as i32).collect(),
        ..Default::default()
    };

    for (what, client, request, expected) in [
        (
            "any",
            acme_admin,
            filter(Unspecified),
            newest_first(&[&d5, &d4, &d3, &d2, &d1]),
        ),
        (
            "any, explicit",
            acme_admin,
            filter(Any),
            newest_first(&[&d5, &d4, &d3, &d2, &d1]),
        ),
        (
            "requesting",
            acme_admin,
            filter(Requesting),
            newest_first(&[&d4, &d3, &d2, &d1]),
        ),
        (
            "receiving",
            acme_admin,
            filter(Receiving),
            newest_first(&[&d5]),
        ),
        (
            "blocked",
            acme_admin,
            statuses(&[Status::Blocked]),
            newest_first(&[&d3]),
        ),
        (
            "active",
            acme_admin,
            statuses(&[Status::Active]),
            newest_first(&[&d5, &d4, &d1]),
        ),
        (
            "revoked or blocked",
            acme_admin,
            statuses(&[Status::Revoked, Status::Blocked]),
            newest_first(&[&d3, &d2]),
        ),
        (
            "action",
            acme_admin,
            pb::ListDelegationsRequest {
                action: "stock.write".into(),
                ..Default::default()
            },
            newest_first(&[&d5, &d4, &d1]),
        ),
        (
            "counterpart globex",
            acme_admin,
            pb::ListDelegationsRequest {
                counterpart_tenant_id: globex.id.clone(),
                ..Default::default()
            },
            newest_first(&[&d5, &d3, &d2, &d1]),
        ),
        (
            "counterpart initech",
            acme_admin,
            pb::ListDelegationsRequest {
                counterpart_tenant_id: initech.id.clone(),
                ..Default::default()
            },
            newest_first(&[&d4]),
        ),
        (
            "requesting agent",
            acme_admin,
            pb::ListDelegationsRequest {
                requesting_agent_id: gate.id.clone(),
                ..Default::default()
            },
            newest_first(&[&d5]),
        ),
        (
            "all filters",
            acme_admin,
            pb::ListDelegationsRequest {
                side: Requesting as i32,
                statuses: vec![Status::Active as i32],
                action: "stock.write".into(),
                counterpart_tenant_id: globex.id.clone(),
                requesting_agent_id: bot.id.clone(),
                page: None,
            },
            newest_first(&[&d1]),
        ),
        (
            "globex",
            globex_admin,
            filter(Any),
            newest_first(&[&d5, &d3, &d2, &d1]),
        ),
        ("initech", &initech_admin, filter(Any), newest_first(&[&d4])),
        (
            "the agent",
            agent,
            filter(Any),
            newest_first(&[&d4, &d3, &d2, &d1]),
        ),
        ("the agent, receiving", agent, filter(Receiving), Vec::new()),
        (
            "the agent ignores the agent filter",
            agent,
            pb::ListDelegationsRequest {
                requesting_agent_id: gate.id.clone(),
                ..Default::default()
            },
            newest_first(&[&d4, &d3, &d2, &d1]),
        ),
    ] {
        assert_eq!(listed_ids(client, request).await, expected, "{what}");
    }

    // Pages of two, in the same order; a token is bound to tenant and filters.
    let page = |page_token: String| pb::ListDelegationsRequest {
        page: Some(pb::PageRequest {
            page_size: 2,
            page_token,
        }),
        ..Default::default()
    };
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut tokens = Vec::new();
    loop {
        let response = list(acme_admin, page(token)).await.unwrap();
        assert!(response.delegations.len() <= 2);
        seen.extend(response.delegations.into_iter().map(|d| d.id));
        token = response.page.unwrap().next_page_token;
        if token.is_empty() {
            break;
        }
        tokens.push(token.clone());
    }
    assert_eq!(seen, newest_first(&[&d5, &d4, &d3, &d2, &d1]));
    assert_eq!(tokens.len(), 2);
    let elsewhere = pb::ListDelegationsRequest {
        side: Requesting as i32,
        ..page(tokens[0].clone())
    };
    expect_invalid(list(acme_admin, elsewhere).await, "page.page_token");
    expect_invalid(
        list(globex_admin, page(tokens[0].clone())).await,
        "page.page_token",
    );
    expect_invalid(
        list(acme_admin, page("garbage".into())).await,
        "page.page_token",
    );
    expect_invalid(
        list(acme_admin, statuses(&[Status::Unspecified])).await,
        "statuses[0]|statuses",
    );
    pair.server.stop().await;
}

// ---------------------------------------------------------------------------
// Expiry, bad input, suspension.

#[tokio::test]
async fn expiry_applies_on_read_before_the_sweeper_runs() {
    let pair = setup_pair().await;
    vaultguard_tests::parts!(pair => server, globex, agent, globex_admin);
    pair.globex_allows("stock.*").await;
    add_rule(globex_admin, inbound("pay.*", pb::Effect::StepUp)).await;
    let (delegation, token) = grant(agent, for_seconds(60, ask(&globex.id, "stock.write"))).await;
    let pending = challenged(
        agent
            .request_delegation(ask(&globex.id, "pay.invoice"))
            .await,
    );
    let pending_id = pending.delegation.unwrap().id;

    server.clock.advance(61_000);
    for reader in [agent, globex_admin] {
        let seen = reader.get_delegation(&delegation.id).await.unwrap();
        assert_eq!(seen.status, Status::Expired as i32);
    }
    let expired_only = pb::ListDelegationsRequest {
        statuses: vec![Status::Expired as i32],
        ..Default::default()
    };
    assert_eq!(
        listed_ids(globex_admin, expired_only).await,
        vec![delegation.id.clone()]
    );
    assert_inactive(globex_admin.verify(&token, "").await, "expired");
    let metadata = expect_reason(
        globex_admin.revoke(&delegation.id, "late").await,
        Code::FailedPrecondition,
        pb::ErrorReason::InvalidState,
    );
    assert!(
        metadata_value(&metadata, "state").contains("EXPIRED"),
        "{metadata:?}"
    );

    // The sweeper (or the read itself) rewrites the row exactly once.
    let now = server.state.clock.now_millis();
    assert!(sweep(server.state.clone(), now).await <= 1);
    assert_eq!(sweep(server.state.clone(), now).await, 0);
    let swept = globex_admin.get_delegation(&delegation.id).await.unwrap();
    assert_eq!(swept.status, Status::Expired as i32);
    assert!(swept.end_time.is_some());
    assert_eq!(swept.end_reason, "expired");
    assert_eq!(
        swept.ended_by.map(|actor| actor.kind),
        Some(pb::PrincipalKind::System as i32)
    );
    assert_eq!(
        in_both_logs(server, pair.logs(), "delegation.expired", &delegation.id).await,
        [1, 1]
    );

    // A step-up waits 300 seconds for its approvers, then expires too.
    let still = agent.get_delegation(&pending_id).await.unwrap();
    assert_eq!(still.status, Status::Pending as i32);
    server.clock.advance(240_000);
    let expired = agent.get_delegation(&pending_id).await.unwrap();
    assert_eq!(expired.status, Status::Expired as i32);
    sweep(server.state.clone(), server.state.clock.now_millis()).await;
    assert_eq!(
        in_both_logs(server, pair.logs(), "delegation.expired", &pending_id).await,
        [1, 1]
    );
    pair.server.stop().await;
}

#[tokio::test]
async fn bad_requests_are_refused_naming_the_field_and_write_nothing() {
    let pair = setup_pair().await;
    vaultguard_tests::parts!(pair => server, globex, agent);
    pair.globex_allows("*").await;
    let footprint = || async {
        (
            server.count("delegations").await,
            server.count("step_ups").await,
            server.count("audit_events").await,
        )
    };
    let before = footprint().await;
    for (field, bad) in bad_requests(&globex.id) {
        let attempt = format!("{bad:?}");
        expect_invalid(raw_request(agent, bad).await, field);
        assert_eq!(footprint().await, before, "wrote something: {attempt}");
    }
    // The same request with its limits respected goes through.
    let valid = keyed("bad-input", ask(&globex.id, "stock.write"));
    raw_request(agent, valid).await.unwrap();
    assert_eq!(server.count("delegations").await, 1);
    pair.server.stop().await;
}

/// Suspends (or reactivates) `tenant_id` as the operator.
pub(crate) async fn set_suspended(operator: &VaultGuardClient, tenant_id: &str, suspended: bool) {
    let tenant_id = tenant_id.to_owned();
    let reason = "test".to_owned();
    if suspended {
        operator
            .suspend_tenant(pb::SuspendTenantRequest { tenant_id, reason })
            .await
            .unwrap();
    } else {
        operator
            .reactivate_tenant(pb::ReactivateTenantRequest { tenant_id, reason })
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn a_suspended_tenant_can_neither_receive_nor_request() {
    let pair = setup_pair().await;
    vaultguard_tests::parts!(pair => server, acme, globex, bot, agent, acme_admin);
    pair.globex_allows("*").await;
    let operator = server.operator().await;

    set_suspended(&operator, &globex.id, true).await;
    expect_reason(
        agent
            .request_delegation(ask(&globex.id, "stock.write"))
            .await,
        Code::PermissionDenied,
        pb::ErrorReason::TenantSuspended,
    );
    expect_reason(
        evaluate(
            acme_admin,
            evaluation(&bot.id, ask(&globex.id, "stock.write")),
        )
        .await,
        Code::PermissionDenied,
        pb::ErrorReason::TenantSuspended,
    );
    assert_eq!(server.count("delegations").await, 0);

    set_suspended(&operator, &globex.id, false).await;
    grant(agent, ask(&globex.id, "stock.write")).await;

    set_suspended(&operator, &acme.id, true).await;
    expect_reason(
        agent
            .request_delegation(ask(&globex.id, "stock.write"))
            .await,
        Code::PermissionDenied,
        pb::ErrorReason::TenantSuspended,
    );
    assert_eq!(server.count("delegations").await, 1);
    pair.server.stop().await;
}

/// Polls `call` until it fails with `reason`; returns how long that took.
async fn refused_within<F, Fut>(reason: pb::ErrorReason, mut call: F) -> std::time::Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<DelegationOutcome, ClientError>>,
{
    let started = std::time::Instant::now();
    loop {
        match call().await {
            Err(err) if err.reason() == Some(reason) => return started.elapsed(),
            outcome => assert!(
                started.elapsed() < std::time::Duration::from_secs(5),
                "still not refused with {reason:?} after 5 s: {outcome:?}"
            ),
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_only_standing_changed_through_one_replica_is_enforced_by_the_other_within_a_second()
 {
    // Replica B holds tenant and agent rows in memory (the directory); a
    // suspension or a disabled agent written through replica A must reach it
    // by notification. Two processes share a database only on PostgreSQL.
    require_backend(Backend::Postgres);
    let pair = setup_pair().await;
    vaultguard_tests::parts!(pair => server, globex, bot, agent, acme_admin);
    pair.globex_allows("*").await;
    let replica = TestServer::start_replica_of(server).await;
    let agent_on_b = replica.with_bearer(&agent.bearer().await.unwrap()).await;
    // B has read (and now holds) both tenants and the agent.
    assert!(matches!(
        agent_on_b
            .request_delegation(ask(&globex.id, "stock.write"))
            .await
            .unwrap(),
        DelegationOutcome::Allowed { .. }
    ));

    let operator = server.operator().await;
    set_suspended(&operator, &globex.id, true).await;
    let took = refused_within(pb::ErrorReason::TenantSuspended, || {
        agent_on_b.request_delegation(ask(&globex.id, "stock.write"))
    })
    .await;
    assert!(
        took < std::time::Duration::from_secs(1),
        "suspension reached B after {took:?}"
    );
    set_suspended(&operator, &globex.id, false).await;

    acme_admin
        .disable_agent(pb::DisableAgentRequest {
            agent_id: bot.id.clone(),
        })
        .await
        .unwrap();
    let took = refused_within(pb::ErrorReason::AgentDisabled, || {
        agent_on_b.request_delegation(ask(&globex.id, "stock.write"))
    })
    .await;
    assert!(
        took < std::time::Duration::from_secs(1),
        "disabling reached B after {took:?}"
    );
    replica.stop().await;
    pair.server.stop().await;
}
