//! Delegations: requesting (two-sided policy, idempotent), reading (only
//! the two parties), ending (revoke, relinquish, expiry), verifying tokens.
//!
//! Concurrency rules:
//! - The idempotency key is a unique index `(requesting_agent_id,
//!   idempotency_key)`; concurrent first requests race on it and the losers
//!   replay the winner's row, so one key yields one delegation and one `jti`.
//! - Every state change is a conditional UPDATE (`WHERE status = <from>`,
//!   and for ACTIVE rows `AND expires_at > now`), and its audit events are
//!   appended in the same transaction only when the UPDATE changed a row: a
//!   revoke racing another revoke or the sweeper leaves one terminal state
//!   and one event.

use std::collections::BTreeMap;

use sea_orm::sea_query::{Condition, Expr};
use sea_orm::{
    ActiveModelTrait, ActiveValue::Set, ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter,
    QueryOrder, QuerySelect, Statement,
};
use serde_json::{Value, json};
use vaultguard_proto::v1::{self as pb, DelegationStatus, ErrorReason, Role};

use crate::audit::{self, AuditCtx, NewEvent, Outcome as AuditOutcome};
use crate::auth::CallContext;
use crate::clock::Millis;
use crate::crypto::sha256_hex;
use crate::directory;
use crate::domain::authorization_details::{self as details, Detail};
use crate::domain::budgets;
use crate::domain::policies::{self, is_active};
use crate::domain::policy_engine::{self as engine, Attr, Decision, Direction, Outcome, Request};
use crate::domain::tenants::audience;
use crate::domain::{actor_json, frozen, page, step_up_queue, to_json};
use crate::error::{Error, FieldViolation, Result, Violations, is_unique_violation};
use crate::ids::{IdKind, check_id, new_id};
use crate::issuer::parse_algorithm;
use crate::state::AppState;
use crate::store::entities::{agent, delegation, step_up, tenant};
use crate::store::is_postgres;
use crate::store::lifecycle::{Lifecycle, Transitions};
use crate::validate;

/// The purpose string under which `auth_req_id`s are derived from step-up ids.
const AUTH_REQ_ID_PURPOSE: &str = "vaultguard/v1 auth_req_id";
/// The advisory lock that keeps the sweeper to one replica at a time.
const SWEEPER_LOCK: i64 = 0x7661_756c_7467_0001;
/// Rows the sweeper ends per transaction.
pub const SWEEP_BATCH: u64 = 500;
/// Largest accepted token, in bytes.
const MAX_TOKEN_BYTES: usize = 8192;

impl From<delegation::Status> for DelegationStatus {
    fn from(status: delegation::Status) -> Self {
        match status {
            delegation::Status::Pending => Self::Pending,
            delegation::Status::Active => Self::Active,
            delegation::Status::Denied => Self::Denied,
            delegation::Status::Expired => Self::Expired,
            delegation::Status::Revoked => Self::Revoked,
            delegation::Status::Relinquished => Self::Relinquished,
            delegation::Status::Blocked => Self::Blocked,
        }
    }
}

/// The stored status a ListDelegations filter names (none for UNSPECIFIED).
fn stored_status(status: DelegationStatus) -> Option<delegation::Status> {
    match status {
        DelegationStatus::Pending => Some(delegation::Status::Pending),
        DelegationStatus::Active => Some(delegation::Status::Active),
        DelegationStatus::Denied => Some(delegation::Status::Denied),
        DelegationStatus::Expired => Some(delegation::Status::Expired),
        DelegationStatus::Revoked => Some(delegation::Status::Revoked),
        DelegationStatus::Relinquished => Some(delegation::Status::Relinquished),
        DelegationStatus::Blocked => Some(delegation::Status::Blocked),
        DelegationStatus::Unspecified => None,
    }
}

/// The status with expiry applied: a row the sweeper will expire (PENDING
/// or ACTIVE) past its `expires_at` is EXPIRED before it is rewritten.
pub fn effective_status(row: &delegation::Model, now: Millis) -> delegation::Status {
    let expired = row.expires_at.is_some_and(|at| at <= now);
    if expired && row.status.can_become(delegation::Status::Expired) {
        delegation::Status::Expired
    } else {
        row.status
    }
}

/// A request's validated input, shared by RequestDelegation and
/// EvaluatePolicy.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Input {
    pub receiving_tenant_id: String,
    pub action: String,
    pub scopes: Vec<String>,
    pub resource: String,
    pub requested_ttl_seconds: u32,
    pub binding_message: String,
    pub context: BTreeMap<String, Attr>,
    /// The RFC 9396 details, in the request's order. Absent from the
    /// request hash's encoding when empty, so hashes of requests without
    /// any are what they always were.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub authorization_details: Vec<Detail>,
    /// The request is VaultGuard's own, for a vault operation (Sign, a
    /// tenant's own ExchangeToken): its `resource` names the vault object
    /// (`key:…`, `connection:…`), which the action and the reserved `vg_`
    /// attributes already judge, so rules' resource patterns do not apply
    /// to it. Not part of the request hash.
    #[serde(skip)]
    pub vault_made: bool,
}

/// The raw request fields common to RequestDelegation and EvaluatePolicy.
pub struct RawInput<'a> {
    pub receiving_tenant_id: &'a str,
    pub action: &'a str,
    pub scopes: &'a [String],
    pub resource: &'a str,
    pub requested_ttl_seconds: u32,
    pub binding_message: &'a str,
    pub context: &'a std::collections::HashMap<String, pb::AttributeValue>,
    pub authorization_details: &'a [pb::AuthorizationDetail],
}

/// Checks every field, adding violations to `v`; `None` when any failed.
pub fn check_input(raw: &RawInput<'_>, server_cap: u32, v: &mut Violations) -> Option<Input> {
    if raw.receiving_tenant_id.is_empty() {
        v.add("receiving_tenant_id", "is required");
    } else if raw.receiving_tenant_id.chars().count() > 64 {
        v.add("receiving_tenant_id", "must be at most 64 characters");
    }
    v.check(engine::check_action("action", raw.action));
    if raw.scopes.len() > 32 {
        v.add("scopes", "at most 32 scopes");
    }
    for (i, scope) in raw.scopes.iter().enumerate() {
        let field = format!("scopes[{i}]");
        v.check(engine::check_scope(&field, scope));
        if raw.scopes[..i].contains(scope) {
            v.add(field, "is a duplicate");
        }
    }
    v.check(validate::optional_text("resource", raw.resource, 512));
    if raw.requested_ttl_seconds == 0 || raw.requested_ttl_seconds > server_cap {
        v.add(
            "requested_ttl_seconds",
            format!("must be between 1 and {server_cap}"),
        );
    }
    if raw.binding_message.chars().count() > 256 {
        v.add("binding_message", "must be at most 256 characters");
    } else if raw.binding_message.chars().any(char::is_control) {
        v.add("binding_message", "must not contain control characters");
    }
    let context = match engine::check_context(raw.context) {
        Ok(context) => Some(context),
        Err(errors) => {
            errors.into_iter().for_each(|e| v.check(Err(e)));
            None
        }
    };
    let authorization_details = match details::check(raw.authorization_details) {
        Ok(details) => Some(details),
        Err(errors) => {
            errors.into_iter().for_each(|e| v.check(Err(e)));
            None
        }
    };
    let mut scopes = raw.scopes.to_vec();
    scopes.sort();
    Some(Input {
        receiving_tenant_id: raw.receiving_tenant_id.to_owned(),
        action: raw.action.to_owned(),
        scopes,
        resource: raw.resource.to_owned(),
        requested_ttl_seconds: raw.requested_ttl_seconds,
        binding_message: raw.binding_message.to_owned(),
        context: context?,
        authorization_details: authorization_details?,
        vault_made: false,
    })
}

pub(crate) fn check_idempotency_key(key: &str) -> std::result::Result<(), FieldViolation> {
    let valid = (1..=128).contains(&key.len())
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
    if valid {
        Ok(())
    } else {
        Err(FieldViolation {
            field: "idempotency_key".to_owned(),
            description: "is required: 1 to 128 characters of A-Z, a-z, 0-9, '.', '_', ':' and '-'"
                .to_owned(),
        })
    }
}

/// The receiving tenant of a request, which must exist.
async fn receiving_tenant(state: &AppState, id: &str) -> Result<tenant::Model> {
    let found = if check_id("receiving_tenant_id", id, IdKind::Tenant).is_ok() {
        state.directory.tenant(&state.db, id).await?
    } else {
        None
    };
    found.ok_or_else(|| Error::invalid("receiving_tenant_id", "names no tenant"))
}

async fn tenant_row(state: &AppState, id: &str) -> Result<tenant::Model> {
    state
        .directory
        .tenant(&state.db, id)
        .await?
        .ok_or(Error::NotFound("tenant"))
}

fn suspended() -> Error {
    Error::denied(
        ErrorReason::TenantSuspended,
        "the receiving tenant is suspended",
    )
}

/// One event per distinct party, each with the decision as that party may
/// see it.
pub(crate) fn party_events(
    audit_ctx: &AuditCtx,
    row: &delegation::Model,
    event_type: &'static str,
    outcome: AuditOutcome,
    details: &Value,
    decision: Option<&Decision>,
) -> Vec<NewEvent> {
    let mut parties = vec![row.requesting_tenant_id.clone()];
    if row.receiving_tenant_id != row.requesting_tenant_id {
        parties.push(row.receiving_tenant_id.clone());
    }
    let mut subjects = vec![row.id.clone(), row.requesting_agent_id.clone()];
    if let Some(step_up) = &row.step_up_id {
        subjects.push(step_up.clone());
    }
    parties
        .into_iter()
        .map(|tenant| {
            let mut details = details.clone();
            details["delegation_id"] = json!(row.id);
            details["requesting_tenant_id"] = json!(row.requesting_tenant_id);
            details["receiving_tenant_id"] = json!(row.receiving_tenant_id);
            details["action"] = json!(row.action);
            if let Some(decision) = decision {
                details["decision"] =
                    serde_json::to_value(decision.redacted_for(&tenant)).unwrap_or(Value::Null);
            }
            audit_ctx.event(&tenant, event_type, subjects.clone(), outcome, details)
        })
        .collect()
}

/// The claims of a delegation's token, from its row alone, so a replay
/// re-signs exactly the same claims.
fn token_claims(state: &AppState, row: &delegation::Model) -> Result<Value> {
    let activated = row
        .activated_at
        .ok_or_else(|| Error::internal("active delegation without activation time"))?;
    let expires = row
        .expires_at
        .ok_or_else(|| Error::internal("active delegation without expiry"))?;
    let scopes: Vec<String> = serde_json::from_str(&row.scopes).map_err(Error::internal)?;
    let iat = activated.div_euclid(1000);
    let mut claims = json!({
        "iss": state.keys.issuer(),
        "sub": row.requesting_agent_id,
        "client_id": row.requesting_agent_id,
        "aud": audience(&row.receiving_tenant_id),
        "iat": iat,
        "nbf": iat,
        "exp": expires.div_euclid(1000),
        "jti": row.id,
        "scope": if scopes.is_empty() { row.action.clone() } else { scopes.join(" ") },
        "action": row.action,
        "requesting_tenant_id": row.requesting_tenant_id,
        "receiving_tenant_id": row.receiving_tenant_id,
        "act": {
            "sub": row.requesting_agent_id,
            "client_id": row.requesting_agent_id,
            "tenant_id": row.requesting_tenant_id,
        },
    });
    if !row.resource.is_empty() {
        claims["resource"] = json!(row.resource);
    }
    let details = details_of(row)?;
    if !details.is_empty() {
        // RFC 9396 section 9.1: what was judged (and approved), exactly.
        claims["authorization_details"] =
            serde_json::to_value(&details).map_err(Error::internal)?;
    }
    Ok(claims)
}

pub(crate) async fn sign(state: &AppState, row: &delegation::Model) -> Result<(String, String)> {
    let algorithm = parse_algorithm(&row.token_algorithm)
        .ok_or_else(|| Error::internal("delegation has no token algorithm"))?;
    state.keys.sign(algorithm, &token_claims(state, row)?).await
}

pub(crate) fn seconds_left(until: Option<Millis>, now: Millis) -> u32 {
    until
        .map(|at| u32::try_from((at - now).max(0) / 1000).unwrap_or(u32::MAX))
        .unwrap_or_default()
}

/// What RequestDelegation answers when the outcome is not BLOCK.
pub enum Requested {
    Allowed {
        row: delegation::Model,
        token: String,
        expires_in: u32,
    },
    StepUp {
        row: delegation::Model,
        auth_req_id: String,
        expires_in: u32,
        interval: u32,
    },
}

/// Without the token: a bearer credential must not reach a log.
impl std::fmt::Debug for Requested {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Allowed {
                row, expires_in, ..
            } => f
                .debug_struct("Allowed")
                .field("delegation_id", &row.id)
                .field("expires_in", expires_in)
                .finish_non_exhaustive(),
            Self::StepUp {
                row,
                auth_req_id: _,
                expires_in,
                interval,
            } => f
                .debug_struct("StepUp")
                .field("delegation_id", &row.id)
                .field("expires_in", expires_in)
                .field("interval", interval)
                .finish_non_exhaustive(),
        }
    }
}

impl Requested {
    pub fn row(&self) -> &delegation::Model {
        match self {
            Self::Allowed { row, .. } | Self::StepUp { row, .. } => row,
        }
    }
}

pub(crate) fn parse_decision(row: &delegation::Model) -> Result<Decision> {
    serde_json::from_str(&row.decision).map_err(Error::internal)
}

/// The PERMISSION_DENIED of a BLOCK, with the requesting side's view of why.
fn blocked_error(row: &delegation::Model, decision: &Decision) -> Error {
    let mut extra = vec![("delegation_id", row.id.clone())];
    if !row.resource.is_empty() {
        extra.push(("resource", row.resource.clone()));
    }
    blocked_error_for(&row.requesting_tenant_id, decision, &extra)
}

/// The PERMISSION_DENIED of a BLOCK as `requesting_tenant_id` may see it,
/// with `extra` metadata (the id of what was blocked). The blocking side's
/// rule id and policy version are named only when that side is the
/// requester's own policy; scopes or a resource the deciding rule did not
/// grant are named (they are the request's own), with their own reason.
pub(crate) fn blocked_error_for(
    requesting_tenant_id: &str,
    decision: &Decision,
    extra: &[(&str, String)],
) -> Error {
    let visible = decision.redacted_for(requesting_tenant_id);
    let (direction, side) = visible
        .blocking_side()
        .unwrap_or((Direction::Inbound, &visible.inbound));
    let mut metadata = std::collections::HashMap::from([(
        "policy_side".to_owned(),
        direction.as_str().to_owned(),
    )]);
    if side.tenant_id == requesting_tenant_id {
        metadata.insert("rule_id".to_owned(), side.rule_id.clone());
        metadata.insert("policy_version".to_owned(), side.policy_version.to_string());
    }
    let budget_id = match direction {
        Direction::Inbound => &decision.inbound.budget_id,
        Direction::Outbound => &decision.outbound.budget_id,
    };
    let reason = if !budget_id.is_empty() {
        if side.tenant_id == requesting_tenant_id {
            metadata.insert("budget_id".to_owned(), budget_id.clone());
        }
        ErrorReason::BudgetExceeded
    } else if !side.scopes_not_granted.is_empty() {
        metadata.insert(
            "scopes_not_granted".to_owned(),
            side.scopes_not_granted.join(" "),
        );
        ErrorReason::ScopeNotGranted
    } else if side.resource_not_granted {
        ErrorReason::ResourceNotGranted
    } else if direction == Direction::Inbound && decision.inbound.rule_id.is_empty() {
        ErrorReason::NoMatchingRule
    } else {
        ErrorReason::PolicyBlocked
    };
    for (key, value) in extra {
        // `resource` (the request's own) is named only when it was refused.
        if *key != "resource" || side.resource_not_granted {
            metadata.insert((*key).to_owned(), value.clone());
        }
    }
    Error::PermissionDenied {
        reason,
        message: format!(
            "blocked by the {} policy: {}",
            direction.as_str(),
            side.explanation
        ),
        metadata,
    }
}

/// The `auth_req_id` of a step-up.
pub fn auth_req_id(state: &AppState, step_up_id: &str) -> String {
    state.master.derive_handle(AUTH_REQ_ID_PURPOSE, step_up_id)
}

/// RequestDelegation, for the calling agent.
pub async fn request(
    state: &AppState,
    ctx: &CallContext,
    req: &pb::RequestDelegationRequest,
) -> Result<Requested> {
    let agent_id = ctx
        .principal
        .agent_id()
        .ok_or_else(|| Error::denied(ErrorReason::RoleRequired, "only agents request delegations"))?
        .to_owned();
    let tenant_id = ctx.principal.tenant_id()?.to_owned();
    frozen::check_requester(state, &tenant_id, &agent_id).await?;
    let mut v = Violations::new();
    v.check(check_idempotency_key(&req.idempotency_key));
    let input = check_input(
        &RawInput {
            receiving_tenant_id: &req.receiving_tenant_id,
            action: &req.action,
            scopes: &req.scopes,
            resource: &req.resource,
            requested_ttl_seconds: req.requested_ttl_seconds,
            binding_message: &req.binding_message,
            context: &req.context,
            authorization_details: &req.authorization_details,
        },
        state.config.max_token_ttl_seconds,
        &mut v,
    );
    v.finish()?;
    let input = input.ok_or_else(|| Error::internal("validated input missing"))?;
    let request_hash = sha256_hex(to_json(&input)?.as_bytes());

    // No lookup of the idempotency key first: the unique index on (agent,
    // key) decides, and a request that loses to a stored row answers from
    // it (`replay`). The first request of a key, the common case, so costs
    // no read.
    let receiving = receiving_tenant(state, &input.receiving_tenant_id).await?;
    if !is_active(&receiving) {
        if let Some(existing) = find_by_key(state, &agent_id, &req.idempotency_key).await? {
            return replay(state, ctx, existing, &request_hash).await;
        }
        state
            .record(vec![ctx.audit().event(
                &tenant_id,
                "delegation.refused",
                vec![agent_id.clone(), receiving.id.clone()],
                AuditOutcome::Denied,
                json!({"reason": "receiving tenant suspended", "action": input.action}),
            )])
            .await?;
        return Err(suspended());
    }
    let requesting = tenant_row(state, &tenant_id).await?;
    let decision = judge_between(state, &requesting, &agent_id, &receiving, &input).await?;
    let new = NewDelegation {
        tenant_id: &tenant_id,
        agent_id: &agent_id,
        receiving: &receiving,
        input: &input,
        // The caller's order; a request naming none stores the scopes
        // the inbound rule gave it by default.
        scopes_json: if req.scopes.is_empty() {
            to_json(&decision.scopes)?
        } else {
            to_json(&req.scopes)?
        },
        idempotency_key: &req.idempotency_key,
        request_hash: &request_hash,
    };
    // Budgets apply to what the rules let through; a request no budget
    // applies to takes the path below, which reads none.
    if decision.outcome != Outcome::Block {
        let applicable = budgets::applicable(
            state,
            &requesting,
            &receiving,
            &budgets::Subject {
                requesting_tenant_id: &tenant_id,
                requesting_agent_id: &agent_id,
                receiving_tenant_id: &receiving.id,
                action: &input.action,
                context: &input.context,
                details: &input.authorization_details,
                signing_key_id: None,
                connection_id: None,
                vault_made: false,
            },
        )
        .await?;
        if !applicable.is_empty() {
            return request_charged(state, ctx, &new, decision, &applicable).await;
        }
    }

    let now = state.clock.now_millis();
    let row = new_row(state, &new, &decision, now)?;
    // Sign before committing, so the stored kid is the one used; a failed
    // commit simply discards the token.
    let signed = if decision.outcome == Outcome::Allow {
        Some(sign(state, &row).await?)
    } else {
        None
    };
    let mut row = row;
    row.signing_kid = signed.as_ref().map(|(_, kid)| kid.clone());
    let events = decided_events(ctx, &row, &decision, signed.as_ref(), None);
    let active: delegation::ActiveModel = row.clone().into();
    let stored = if decision.outcome == Outcome::StepUp {
        store_step_up(state, active, &row, events).await?
    } else {
        // ALLOW and BLOCK: the row and its events in one statement, shared
        // with whatever else is being written at the same moment.
        match state.recorder.insert_with_events(active, events).await? {
            audit::Written::Inserted => Stored::Inserted(None),
            audit::Written::Conflict => Stored::Lost,
        }
    };
    answer(state, ctx, &new, row, &decision, signed, stored).await
}

/// The audit events of a decided request: `delegation.decided` in both
/// parties' logs, and `delegation.token_issued` when a token was signed.
fn decided_events(
    ctx: &CallContext,
    row: &delegation::Model,
    decision: &Decision,
    signed: Option<&(String, String)>,
    charges: Option<Value>,
) -> Vec<NewEvent> {
    let audit_ctx = ctx.audit();
    let outcome = if decision.outcome == Outcome::Block {
        AuditOutcome::Denied
    } else {
        AuditOutcome::Success
    };
    let mut details = json!({"outcome": decision.outcome.as_str(), "requesting_agent_id": row.requesting_agent_id});
    if let Some(charges) = charges {
        details["budget_charges"] = charges;
    }
    let mut events = party_events(
        &audit_ctx,
        row,
        "delegation.decided",
        outcome,
        &details,
        Some(decision),
    );
    if let Some((_, kid)) = signed {
        events.extend(party_events(
            &audit_ctx,
            row,
            "delegation.token_issued",
            AuditOutcome::Success,
            &json!({"kid": kid, "alg": row.token_algorithm, "jti": row.id, "exp": row.expires_at.map(|e| e / 1000)}),
            None,
        ));
    }
    events
}

/// RequestDelegation's answer once its row is stored (or lost to a request
/// with the same key, which then answers).
async fn answer(
    state: &AppState,
    ctx: &CallContext,
    new: &NewDelegation<'_>,
    row: delegation::Model,
    decision: &Decision,
    signed: Option<(String, String)>,
    stored: Stored,
) -> Result<Requested> {
    let auth_req = match stored {
        Stored::Inserted(auth_req) => auth_req,
        Stored::Lost => {
            // A request with the same key was stored first: answer from it.
            // Or the requester was frozen since it was judged: the
            // storing statement refused the row.
            let Some(winner) = find_by_key(state, new.agent_id, new.idempotency_key).await? else {
                if let Some(frozen) =
                    frozen::frozen_now(&state.db, new.tenant_id, new.agent_id).await?
                {
                    return Err(frozen);
                }
                return Err(Error::Conflict("concurrent idempotent request"));
            };
            return replay(state, ctx, winner, new.request_hash).await;
        }
    };
    state.audit_committed();
    metrics::counter!("vaultguard_delegation_decisions_total", "outcome" => decision.outcome.as_str())
        .increment(1);

    match (decision.outcome, signed, auth_req) {
        (Outcome::Block, _, _) => Err(blocked_error(&row, decision)),
        (Outcome::Allow, Some((token, _)), _) => Ok(Requested::Allowed {
            expires_in: decision.max_ttl_seconds,
            row,
            token,
        }),
        (Outcome::StepUp, _, Some(auth_req_id)) => Ok(Requested::StepUp {
            expires_in: state.config.step_up_expires_in_seconds,
            interval: state.config.step_up_interval_seconds,
            row,
            auth_req_id,
        }),
        _ => Err(Error::internal("delegation outcome without its artefact")),
    }
}

/// RequestDelegation when budgets apply: in one transaction, lock the
/// budgets, add up their windows, let any the request would pass turn the
/// decision into their over-limit effect, and store the delegation with its
/// charges (held while a step-up waits), its step-up and its events.
async fn request_charged(
    state: &AppState,
    ctx: &CallContext,
    new: &NewDelegation<'_>,
    decision: Decision,
    applicable: &[budgets::Applicable],
) -> Result<Requested> {
    let now = state.clock.now_millis();
    // Signed before the transaction, as on the path without budgets (on
    // SQLite the transaction holds the one connection, and signing may read
    // the key ring); dropped if a budget turns the decision.
    let mut row = new_row(state, new, &decision, now)?;
    let mut signed = if decision.outcome == Outcome::Allow {
        Some(sign(state, &row).await?)
    } else {
        None
    };
    let txn = crate::store::begin(&state.db).await?;
    let checked = budgets::check_in(&txn, applicable, now).await?;
    let judged = budgets::apply(decision.clone(), &checked);
    let decision = if judged == decision {
        decision
    } else {
        row = new_row(state, new, &judged, now)?;
        signed = None;
        judged
    };
    row.signing_kid = signed.as_ref().map(|(_, kid)| kid.clone());
    let events = decided_events(
        ctx,
        &row,
        &decision,
        signed.as_ref(),
        Some(checked.details()),
    );
    let active: delegation::ActiveModel = row.clone().into();
    match delegation::Entity::insert(active).exec(&txn).await {
        Ok(_) => {}
        Err(err) if is_unique_violation(&err) => {
            txn.rollback().await?;
            return answer(state, ctx, new, row, &decision, signed, Stored::Lost).await;
        }
        Err(err) => return Err(err.into()),
    }
    if decision.outcome == Outcome::Allow {
        // A freeze that committed since the request was judged refuses it
        // here (a step-up's opening checks the same in insert_step_up).
        frozen::check_not_frozen_in(&txn, new.tenant_id, new.agent_id).await?;
    }
    let mut change = None;
    if decision.outcome != Outcome::Block {
        let held = (decision.outcome == Outcome::StepUp)
            .then_some(row.expires_at)
            .flatten();
        budgets::record_in(&txn, &checked, &row.id, held, now).await?;
    }
    let auth_req = if decision.outcome == Outcome::StepUp {
        let (handle, announced) = insert_step_up(state, &txn, &row).await?;
        change = Some(announced);
        Some(handle)
    } else {
        None
    };
    audit::append_all(&txn, state.clock.as_ref(), events).await?;
    txn.commit().await?;
    if let Some(change) = change {
        state.hub.committed(vec![change]);
    }
    answer(
        state,
        ctx,
        new,
        row,
        &decision,
        signed,
        Stored::Inserted(auth_req),
    )
    .await
}

/// How storing a new delegation ended.
enum Stored {
    /// Stored; the step-up's `auth_req_id` for a STEP_UP.
    Inserted(Option<String>),
    /// The idempotency key was taken by a row stored first.
    Lost,
}

/// Stores a STEP_UP delegation with its step-up and events in one
/// transaction, and announces the step-up to watchers.
async fn store_step_up(
    state: &AppState,
    active: delegation::ActiveModel,
    row: &delegation::Model,
    events: Vec<audit::NewEvent>,
) -> Result<Stored> {
    let txn = crate::store::begin(&state.db).await?;
    match delegation::Entity::insert(active).exec(&txn).await {
        Ok(_) => {}
        Err(err) if is_unique_violation(&err) => {
            txn.rollback().await?;
            return Ok(Stored::Lost);
        }
        Err(err) => return Err(err.into()),
    }
    let (handle, change) = insert_step_up(state, &txn, row).await?;
    audit::append_all(&txn, state.clock.as_ref(), events).await?;
    txn.commit().await?;
    state.hub.committed(vec![change]);
    Ok(Stored::Inserted(Some(handle)))
}

/// A judged request about to be stored as a delegation: RequestDelegation's,
/// or one a vault operation opens to stand for its step-up.
pub(crate) struct NewDelegation<'a> {
    pub tenant_id: &'a str,
    pub agent_id: &'a str,
    pub receiving: &'a tenant::Model,
    pub input: &'a Input,
    /// The scopes as requested (JSON), kept in the caller's order.
    pub scopes_json: String,
    pub idempotency_key: &'a str,
    pub request_hash: &'a str,
}

/// The row of a newly decided delegation: ACTIVE with its expiry on ALLOW,
/// PENDING until the step-up deadline on STEP_UP, BLOCKED and ended on BLOCK.
pub(crate) fn new_row(
    state: &AppState,
    new: &NewDelegation<'_>,
    decision: &Decision,
    now: Millis,
) -> Result<delegation::Model> {
    let (status, activated_at, expires_at, ended) = match decision.outcome {
        Outcome::Allow => (
            delegation::Status::Active,
            Some(now),
            Some(now + i64::from(decision.max_ttl_seconds) * 1000),
            false,
        ),
        Outcome::StepUp => (
            delegation::Status::Pending,
            None,
            Some(now + i64::from(state.config.step_up_expires_in_seconds) * 1000),
            false,
        ),
        Outcome::Block => (delegation::Status::Blocked, None, None, true),
    };
    Ok(delegation::Model {
        id: new_id(IdKind::Delegation),
        requesting_tenant_id: new.tenant_id.to_owned(),
        requesting_agent_id: new.agent_id.to_owned(),
        receiving_tenant_id: new.receiving.id.clone(),
        action: new.input.action.clone(),
        scopes: new.scopes_json.clone(),
        resource: new.input.resource.clone(),
        binding_message: new.input.binding_message.clone(),
        context: to_json(&new.input.context)?,
        authorization_details: to_json(&new.input.authorization_details)?,
        status,
        decision: to_json(decision)?,
        idempotency_key: new.idempotency_key.to_owned(),
        request_hash: new.request_hash.to_owned(),
        ttl_seconds: i64::from(new.input.requested_ttl_seconds),
        // Only a token has an algorithm; a step-up picks it when approved.
        token_algorithm: if decision.outcome == Outcome::Allow {
            new.receiving.token_algorithm.clone()
        } else {
            String::new()
        },
        signing_kid: None,
        created_at: now,
        activated_at,
        expires_at,
        ended_at: ended.then_some(now),
        ended_by: ended.then(system_actor_json).transpose()?,
        end_reason: ended.then(|| "blocked by policy".to_owned()),
        step_up_id: (decision.outcome == Outcome::StepUp).then(|| new_id(IdKind::StepUp)),
    })
}

/// Inserts the step-up of a PENDING `row` (already inserted in `txn`) and its
/// queue change, unless the pair's queue is full
/// ([`step_up_queue::check_queue_room`]: the caller then drops `txn`); returns
/// the `auth_req_id` and the change to announce after the commit.
pub(crate) async fn insert_step_up(
    state: &AppState,
    txn: &sea_orm::DatabaseTransaction,
    row: &delegation::Model,
) -> Result<(String, crate::hub::Change)> {
    let step_up_id = row
        .step_up_id
        .clone()
        .ok_or_else(|| Error::internal("pending delegation without step-up id"))?;
    // The kill switch: the freeze is read again after the row is in `txn`
    // (`kill_switch` explains why that closes the race).
    frozen::check_not_frozen_in(txn, &row.requesting_tenant_id, &row.requesting_agent_id).await?;
    step_up_queue::check_queue_room(
        state,
        txn,
        &row.requesting_tenant_id,
        &row.receiving_tenant_id,
    )
    .await?;
    let decision = parse_decision(row)?;
    let handle = auth_req_id(state, &step_up_id);
    let created = step_up::ActiveModel {
        id: Set(step_up_id),
        delegation_id: Set(row.id.clone()),
        receiving_tenant_id: Set(row.receiving_tenant_id.clone()),
        requesting_tenant_id: Set(row.requesting_tenant_id.clone()),
        requesting_agent_id: Set(row.requesting_agent_id.clone()),
        auth_req_id_hash: Set(sha256_hex(handle.as_bytes())),
        state: Set(step_up::State::Pending),
        request_hash: Set(approval_hash(row)?),
        interval_seconds: Set(i64::from(state.config.step_up_interval_seconds)),
        last_polled_at: Set(None),
        approvals_required: Set(i32::try_from(decision.approvals_required).unwrap_or(1)),
        expires_at: Set(row.expires_at.unwrap_or(row.created_at)),
        created_at: Set(row.created_at),
        updated_at: Set(row.created_at),
        decided_at: Set(None),
        redeemed_at: Set(None),
        ended_at: Set(None),
        denied_by: Set(None),
        deny_reason: Set(None),
    }
    .insert(txn)
    .await?;
    let change = step_up_queue::record_created(state, txn, &created).await?;
    Ok((handle, change))
}

/// The hash an approver echoes: the request (its own hash) together with
/// the scopes and resource the decision settled on, so an approval is bound
/// to exactly what the token will carry, defaults included.
fn approval_hash(row: &delegation::Model) -> Result<String> {
    let mut scopes: Vec<String> = serde_json::from_str(&row.scopes).map_err(Error::internal)?;
    scopes.sort();
    Ok(sha256_hex(
        to_json(&json!({
            "request": row.request_hash,
            "scopes": scopes,
            "resource": row.resource,
        }))?
        .as_bytes(),
    ))
}

/// Judges a validated request of `agent_id` (of `tenant_id`) now.
pub(crate) async fn judge_input(
    state: &AppState,
    tenant_id: &str,
    agent_id: &str,
    receiving: &tenant::Model,
    input: &Input,
) -> Result<Decision> {
    let requesting = tenant_row(state, tenant_id).await?;
    judge_between(state, &requesting, agent_id, receiving, input).await
}

/// Judges a validated request of `agent_id` between two tenant rows the
/// caller already holds (the same row twice for vault operations).
pub(crate) async fn judge_between(
    state: &AppState,
    requesting: &tenant::Model,
    agent_id: &str,
    receiving: &tenant::Model,
    input: &Input,
) -> Result<Decision> {
    policies::judge(
        state,
        requesting,
        receiving,
        &Request {
            requesting_tenant_id: &requesting.id,
            requesting_agent_id: agent_id,
            receiving_tenant_id: &receiving.id,
            action: &input.action,
            context: &input.context,
            requested_ttl_seconds: input.requested_ttl_seconds,
            scopes: &input.scopes,
            resource: (!input.vault_made && !input.resource.is_empty())
                .then_some(input.resource.as_str()),
            authorization_details: &input.authorization_details,
        },
    )
    .await
}

/// The request a step-up waits on, as the policy engine takes it.
pub(crate) fn input_of(row: &delegation::Model) -> Result<Input> {
    let context: BTreeMap<String, Attr> =
        serde_json::from_str(&row.context).map_err(Error::internal)?;
    let mut scopes: Vec<String> = serde_json::from_str(&row.scopes).map_err(Error::internal)?;
    scopes.sort();
    Ok(Input {
        receiving_tenant_id: row.receiving_tenant_id.clone(),
        action: row.action.clone(),
        scopes,
        resource: row.resource.clone(),
        requested_ttl_seconds: u32::try_from(row.ttl_seconds).unwrap_or_default(),
        binding_message: row.binding_message.clone(),
        context,
        authorization_details: details_of(row)?,
        vault_made: is_vault_made(row),
    })
}

/// A delegation's stored RFC 9396 details (none for rows older than them).
pub(crate) fn details_of(row: &delegation::Model) -> Result<Vec<Detail>> {
    if row.authorization_details.is_empty() {
        return Ok(Vec::new());
    }
    serde_json::from_str(&row.authorization_details).map_err(Error::internal)
}

/// Whether a delegation row is VaultGuard's own, standing for a vault
/// operation's step-up (its idempotency key is in the `vg/` namespace,
/// outside the alphabet of client keys).
pub(crate) fn is_vault_made(row: &delegation::Model) -> bool {
    row.idempotency_key.starts_with("vg/")
}

pub(crate) fn system_actor_json() -> Result<String> {
    actor_json(&AuditCtx::system("").actor)
}

async fn find_by_key(
    state: &AppState,
    agent_id: &str,
    key: &str,
) -> Result<Option<delegation::Model>> {
    Ok(delegation::Entity::find()
        .filter(delegation::Column::RequestingAgentId.eq(agent_id))
        .filter(delegation::Column::IdempotencyKey.eq(key))
        .one(&state.db)
        .await?)
}

/// Answers a repeated idempotency key from the stored delegation.
async fn replay(
    state: &AppState,
    ctx: &CallContext,
    row: delegation::Model,
    request_hash: &str,
) -> Result<Requested> {
    if row.request_hash != request_hash {
        return Err(Error::AlreadyExists {
            reason: Some(ErrorReason::IdempotencyConflict),
            message: "this idempotency key was used with different parameters".to_owned(),
            metadata: std::collections::HashMap::from([(
                "idempotency_key".to_owned(),
                row.idempotency_key.clone(),
            )]),
        });
    }
    let decision = parse_decision(&row)?;
    let now = state.clock.now_millis();
    match decision.outcome {
        Outcome::Block => Err(blocked_error(&row, &decision)),
        Outcome::StepUp => {
            let step_up_id = row
                .step_up_id
                .clone()
                .ok_or_else(|| Error::internal("step-up delegation without step-up"))?;
            let step = step_up::Entity::find_by_id(step_up_id.clone())
                .one(&state.db)
                .await?
                .ok_or_else(|| Error::internal("step-up row missing"))?;
            Ok(Requested::StepUp {
                auth_req_id: auth_req_id(state, &step_up_id),
                expires_in: seconds_left(Some(step.expires_at), now),
                interval: u32::try_from(step.interval_seconds).unwrap_or(5),
                row,
            })
        }
        Outcome::Allow => {
            let status = effective_status(&row, now);
            if status != delegation::Status::Active {
                return Err(ended_error(&row, status));
            }
            if !is_active(&tenant_row(state, &row.receiving_tenant_id).await?) {
                return Err(suspended());
            }
            let (token, kid) = sign(state, &row).await?;
            let events = party_events(
                &ctx.audit(),
                &row,
                "delegation.token_reissued",
                AuditOutcome::Success,
                &json!({"kid": kid, "alg": row.token_algorithm, "jti": row.id}),
                None,
            );
            state.record(events).await?;
            Ok(Requested::Allowed {
                expires_in: seconds_left(row.expires_at, now),
                row,
                token,
            })
        }
    }
}

fn ended_error(row: &delegation::Model, status: delegation::Status) -> Error {
    let mut err = Error::invalid_state(
        format!("the delegation is {status}"),
        DelegationStatus::from(status).as_str_name(),
    );
    if let Error::FailedPrecondition { metadata, .. } = &mut err {
        metadata.insert("delegation_id".to_owned(), row.id.clone());
    }
    err
}

/// Whether the caller may see `row`: its tenant is a party, and an agent
/// sees only what it requested.
fn visible_to(row: &delegation::Model, ctx: &CallContext) -> bool {
    let Some(tenant) = ctx.principal.tenant_id.as_deref() else {
        return false;
    };
    let party = row.requesting_tenant_id == tenant || row.receiving_tenant_id == tenant;
    match ctx.principal.agent_id() {
        Some(agent) => party && row.requesting_agent_id == agent,
        None => party,
    }
}

/// Loads a delegation the caller may see; anything else is NOT_FOUND, and
/// the attempt is audited in the caller's log.
async fn find_visible(
    state: &AppState,
    ctx: &CallContext,
    delegation_id: &str,
) -> Result<delegation::Model> {
    check_id("delegation_id", delegation_id, IdKind::Delegation)?;
    let row = delegation::Entity::find_by_id(delegation_id.to_owned())
        .one(&state.db)
        .await?;
    match row {
        Some(row) if visible_to(&row, ctx) => Ok(row),
        _ => {
            if let Ok(tenant) = ctx.principal.tenant_id() {
                // Debounced per caller: a probing loop leaves a bounded
                // trail that counts it (`audit::RefusalDebounce`).
                let key = format!(
                    "delegation.not_found|{}|{}",
                    ctx.principal.issuer, ctx.principal.subject
                );
                state
                    .record_refusal(
                        key,
                        vec![ctx.audit().event(
                            tenant,
                            "delegation.not_found",
                            vec![delegation_id.to_owned()],
                            AuditOutcome::Denied,
                            json!({}),
                        )],
                    )
                    .await?;
            }
            Err(Error::NotFound("delegation"))
        }
    }
}

/// GetDelegation.
pub async fn get(
    state: &AppState,
    ctx: &CallContext,
    delegation_id: &str,
) -> Result<delegation::Model> {
    find_visible(state, ctx, delegation_id).await
}

fn id_filter(field: &str, value: &str, v: &mut Violations) -> Option<String> {
    if value.is_empty() {
        None
    } else if value.chars().count() > 64 {
        v.add(field, "must be at most 64 characters");
        None
    } else {
        Some(value.to_owned())
    }
}

/// ListDelegations: newest first, only rows the caller may see.
pub async fn list(
    state: &AppState,
    ctx: &CallContext,
    req: &pb::ListDelegationsRequest,
) -> Result<(Vec<delegation::Model>, String)> {
    let tenant = ctx.principal.tenant_id()?.to_owned();
    let mut v = Violations::new();
    let side = v
        .take(validate::enum_value::<pb::DelegationSide>(
            "side", req.side, true,
        ))
        .flatten()
        .unwrap_or(pb::DelegationSide::Any);
    if req.statuses.len() > 7 {
        v.add("statuses", "at most 7 statuses");
    }
    let mut statuses = Vec::new();
    for (i, raw) in req.statuses.iter().enumerate() {
        if let Some(status) = v
            .take(validate::enum_value::<DelegationStatus>(
                &format!("statuses[{i}]"),
                *raw,
                false,
            ))
            .flatten()
            .and_then(stored_status)
        {
            statuses.push(status);
        }
    }
    if !req.action.is_empty() {
        v.check(engine::check_action("action", &req.action));
    }
    let counterpart = id_filter("counterpart_tenant_id", &req.counterpart_tenant_id, &mut v);
    let agent_filter = id_filter("requesting_agent_id", &req.requesting_agent_id, &mut v);
    let page = req.page.clone().unwrap_or_default();
    let size = v.take(validate::page_size("page.page_size", page.page_size));
    v.finish()?;
    let size = size.unwrap_or(50);
    statuses.sort_unstable_by_key(|status| status.as_str());
    statuses.dedup();
    // The page scope names the stored strings, as it always has.
    let named: Vec<&str> = statuses.iter().map(|status| status.as_str()).collect();
    let own_agent = ctx.principal.agent_id().map(str::to_owned);
    let agent_filter = own_agent.clone().or(agent_filter);
    let scope = format!(
        "delegations|{tenant}|{own_agent:?}|{side:?}|{named:?}|{}|{counterpart:?}|{agent_filter:?}",
        req.action
    );
    let after = page::decode("page.page_token", &scope, &page.page_token)?;
    if own_agent.is_some() && side == pb::DelegationSide::Receiving {
        return Ok((Vec::new(), String::new()));
    }

    use delegation::Column as C;
    let requesting_side = || {
        let mut c = Condition::all().add(C::RequestingTenantId.eq(tenant.clone()));
        if let Some(cp) = &counterpart {
            c = c.add(C::ReceivingTenantId.eq(cp.clone()));
        }
        c
    };
    let receiving_side = || {
        let mut c = Condition::all().add(C::ReceivingTenantId.eq(tenant.clone()));
        if let Some(cp) = &counterpart {
            c = c.add(C::RequestingTenantId.eq(cp.clone()));
        }
        c
    };
    let parties = match side {
        pb::DelegationSide::Requesting => requesting_side(),
        pb::DelegationSide::Receiving => receiving_side(),
        _ => Condition::any()
            .add(requesting_side())
            .add(receiving_side()),
    };
    let now = state.clock.now_millis();
    let mut query = delegation::Entity::find()
        .filter(parties)
        .order_by_desc(C::Id)
        .limit(size + 1);
    if !statuses.is_empty() {
        let mut any = Condition::any();
        // Expiry applied as `effective_status` applies it.
        use delegation::Status as S;
        for &status in &statuses {
            any = any.add(match status {
                S::Pending | S::Active => Condition::all()
                    .add(C::Status.eq(status))
                    .add(C::ExpiresAt.gt(now)),
                S::Expired => Condition::any().add(C::Status.eq(S::Expired)).add(
                    Condition::all()
                        .add(S::guard_into(S::Expired))
                        .add(C::ExpiresAt.lte(now)),
                ),
                S::Denied | S::Revoked | S::Relinquished | S::Blocked => {
                    Condition::all().add(C::Status.eq(status))
                }
            });
        }
        query = query.filter(any);
    }
    if !req.action.is_empty() {
        query = query.filter(C::Action.eq(req.action.clone()));
    }
    if let Some(agent) = &agent_filter {
        query = query.filter(C::RequestingAgentId.eq(agent.clone()));
    }
    if let Some(after) = after {
        query = query.filter(C::Id.lt(after));
    }
    let rows = query.all(&state.db).await?;
    Ok(page::finish(rows, size, &scope, |row| row.id.clone()))
}

/// Ends an ACTIVE delegation (revoke or relinquish) with a conditional
/// update; the loser of a race gets FAILED_PRECONDITION and writes nothing.
async fn end_active(
    state: &AppState,
    ctx: &CallContext,
    row: delegation::Model,
    to: delegation::Status,
    event_type: &'static str,
    reason: &str,
) -> Result<delegation::Model> {
    let now = state.clock.now_millis();
    let txn = crate::store::begin(&state.db).await?;
    let updated = delegation::Entity::update_many()
        .into_state(to)
        .col_expr(delegation::Column::EndedAt, Expr::value(now))
        .col_expr(
            delegation::Column::EndedBy,
            Expr::value(actor_json(&ctx.principal.actor())?),
        )
        .col_expr(delegation::Column::EndReason, Expr::value(reason))
        .filter(delegation::Column::Id.eq(row.id.clone()))
        .filter(delegation::Column::ExpiresAt.gt(now))
        .exec(&txn)
        .await?;
    if updated.rows_affected == 0 {
        txn.rollback().await?;
        let current = delegation::Entity::find_by_id(row.id.clone())
            .one(&state.db)
            .await?
            .ok_or(Error::NotFound("delegation"))?;
        return Err(ended_error(&current, effective_status(&current, now)));
    }
    let events = party_events(
        &ctx.audit(),
        &row,
        event_type,
        AuditOutcome::Success,
        &json!({"reason": reason}),
        None,
    );
    audit::append_all(&txn, state.clock.as_ref(), events).await?;
    // Every replica's Verify must stop accepting the token at once.
    let ended = directory::Entry::Delegation(row.id.clone());
    directory::announce(&txn, &ended).await?;
    txn.commit().await?;
    state.directory_changed(&[ended]);
    state.audit_committed();
    delegation::Entity::find_by_id(row.id.clone())
        .one(&state.db)
        .await?
        .ok_or(Error::NotFound("delegation"))
}

/// RevokeDelegation: the receiving tenant's admin ends an ACTIVE delegation.
pub async fn revoke(
    state: &AppState,
    ctx: &CallContext,
    delegation_id: &str,
    reason: &str,
) -> Result<delegation::Model> {
    let mut v = Violations::new();
    v.check(check_id("delegation_id", delegation_id, IdKind::Delegation));
    v.check(validate::required_text("reason", reason, 512));
    v.finish()?;
    let row = find_visible(state, ctx, delegation_id).await?;
    if row.receiving_tenant_id != ctx.principal.tenant_id()? {
        return Err(Error::denied(
            ErrorReason::TenantMismatch,
            "only the receiving tenant revokes; the requesting side relinquishes",
        ));
    }
    if !ctx.principal.has_role(Role::Admin) {
        return Err(Error::denied(
            ErrorReason::RoleRequired,
            "revoking needs ROLE_ADMIN",
        ));
    }
    end_active(
        state,
        ctx,
        row,
        delegation::Status::Revoked,
        "delegation.revoked",
        reason,
    )
    .await
}

/// RelinquishDelegation: the requesting agent or its tenant's admin gives
/// an ACTIVE delegation up.
pub async fn relinquish(
    state: &AppState,
    ctx: &CallContext,
    delegation_id: &str,
    reason: &str,
) -> Result<delegation::Model> {
    let mut v = Violations::new();
    v.check(check_id("delegation_id", delegation_id, IdKind::Delegation));
    v.check(validate::optional_text("reason", reason, 512));
    v.finish()?;
    let row = find_visible(state, ctx, delegation_id).await?;
    if row.requesting_tenant_id != ctx.principal.tenant_id()? {
        return Err(Error::denied(
            ErrorReason::TenantMismatch,
            "only the requesting side relinquishes; the receiving side revokes",
        ));
    }
    end_active(
        state,
        ctx,
        row,
        delegation::Status::Relinquished,
        "delegation.relinquished",
        reason,
    )
    .await
}

/// Marks PENDING and ACTIVE delegations past their expiry EXPIRED (and their
/// step-ups), at most one batch per call; returns how many it ended. On
/// PostgreSQL only one replica sweeps at a time (a transaction-scoped
/// advisory lock); the others return 0 at once.
pub async fn sweep_expired(state: &AppState, now: Millis) -> Result<u64> {
    let txn = crate::store::begin(&state.db).await?;
    if is_postgres(&state.db) {
        let row = txn
            .query_one_raw(Statement::from_sql_and_values(
                sea_orm::DbBackend::Postgres,
                "SELECT pg_try_advisory_xact_lock($1) AS locked",
                [SWEEPER_LOCK.into()],
            ))
            .await?;
        let locked = row
            .map(|r| r.try_get::<bool>("", "locked"))
            .transpose()?
            .unwrap_or(false);
        if !locked {
            txn.rollback().await?;
            return Ok(0);
        }
    }
    let due = delegation::Entity::find()
        .filter(delegation::Status::guard_into(delegation::Status::Expired))
        .filter(delegation::Column::ExpiresAt.lte(now))
        .order_by_asc(delegation::Column::ExpiresAt)
        .limit(SWEEP_BATCH)
        .all(&txn)
        .await?;
    let audit_ctx = AuditCtx::system(format!("sweeper-{now}"));
    let system = system_actor_json()?;
    let mut ended = 0;
    let mut changes = Vec::new();
    for row in due {
        let updated = delegation::Entity::update_many()
            .transition(&[row.status], delegation::Status::Expired)
            .col_expr(delegation::Column::EndedAt, Expr::value(now))
            .col_expr(delegation::Column::EndedBy, Expr::value(system.clone()))
            .col_expr(delegation::Column::EndReason, Expr::value("expired"))
            .filter(delegation::Column::Id.eq(row.id.clone()))
            .filter(delegation::Column::ExpiresAt.lte(now))
            .exec(&txn)
            .await?;
        if updated.rows_affected == 0 {
            continue;
        }
        if let Some(step) = step_up::Entity::find()
            .filter(step_up::Column::DelegationId.eq(row.id.clone()))
            .one(&txn)
            .await?
        {
            // A pending step-up leaves the queue; an approved one whose token
            // was never taken can no longer be redeemed.
            let from = if row.status == delegation::Status::Pending {
                step_up::State::Pending
            } else {
                step_up::State::Approved
            };
            let expired = step_up::Entity::update_many()
                .transition(&[from], step_up::State::Expired)
                .col_expr(step_up::Column::EndedAt, Expr::value(now))
                .col_expr(step_up::Column::UpdatedAt, Expr::value(now))
                .filter(step_up::Column::Id.eq(step.id.clone()))
                .exec(&txn)
                .await?;
            if expired.rows_affected > 0 && from == step_up::State::Pending {
                changes.push(step_up_queue::record_expired(state, &txn, &step, now).await?);
            }
        }
        let events = party_events(
            &audit_ctx,
            &row,
            "delegation.expired",
            AuditOutcome::Success,
            &json!({"previous_status": row.status.as_str()}),
            None,
        );
        audit::append_all(&txn, state.clock.as_ref(), events).await?;
        ended += 1;
    }
    txn.commit().await?;
    state.hub.committed(changes);
    if ended > 0 {
        state.audit_committed();
        metrics::counter!("vaultguard_delegations_expired_total").increment(ended);
    }
    Ok(ended)
}

/// What an active token says, for the introspection answer.
#[derive(Debug, Clone)]
pub struct Introspection {
    pub claims: std::sync::Arc<Value>,
    pub row: std::sync::Arc<delegation::Model>,
}

/// VerifyDelegationToken: `Some` only when every check passes. Each refusal
/// is audited in the caller's log, a success once per verifier and
/// delegation per window; a failure for a known delegation addressed
/// to the caller also in the requesting tenant's log.
pub async fn verify(
    state: &AppState,
    ctx: &CallContext,
    token: &str,
    required_action: &str,
) -> Result<Option<Introspection>> {
    let tenant = ctx.principal.tenant_id()?.to_owned();
    let mut v = Violations::new();
    if token.is_empty() {
        v.add("token", "is required");
    } else if token.len() > MAX_TOKEN_BYTES {
        v.add("token", format!("must be at most {MAX_TOKEN_BYTES} bytes"));
    }
    if !required_action.is_empty() {
        v.check(engine::check_action("required_action", required_action));
    }
    v.finish()?;

    let verified = state.keys.verify_shared(token, &audience(&tenant)).await;
    let (claims, kid) = match verified {
        Ok(verified) => (verified.claims, verified.kid),
        Err(err) => {
            tracing::debug!(error = %err, "delegation token refused");
            record_verification(
                state,
                ctx,
                &tenant,
                None,
                "signature, type, issuer, audience or time",
            )
            .await?;
            return Ok(None);
        }
    };
    let jti = claims["jti"].as_str().unwrap_or_default();
    // From memory on every replica (revocations invalidate it everywhere).
    let row = if check_id("jti", jti, IdKind::Delegation).is_ok() {
        state.directory.delegation(&state.db, jti).await?
    } else {
        None
    };
    let Some(row) = row else {
        record_verification(state, ctx, &tenant, None, "unknown delegation").await?;
        return Ok(None);
    };
    let now = state.clock.now_millis();
    let failure = if row.receiving_tenant_id != tenant {
        Some("addressed to another tenant")
    } else if claims["sub"].as_str() != Some(row.requesting_agent_id.as_str())
        || claims["requesting_tenant_id"].as_str() != Some(row.requesting_tenant_id.as_str())
        || claims["action"].as_str() != Some(row.action.as_str())
    {
        Some("claims do not match the delegation")
    } else if effective_status(&row, now) != delegation::Status::Active {
        Some("delegation not active")
    } else if !required_action.is_empty() && row.action != required_action {
        Some("action differs from required_action")
    } else if !standing_ok(state, &row).await? {
        Some("requesting tenant suspended or frozen, or agent disabled or frozen")
    } else {
        None
    };
    match failure {
        Some(reason) => {
            record_verification(state, ctx, &tenant, Some(row.as_ref()), reason).await?;
            Ok(None)
        }
        None => {
            metrics::counter!("vaultguard_token_verifications_total", "active" => "true")
                .increment(1);
            // One success event per verifier and delegation per window: a
            // resource server checks the same token on every request it
            // serves, and a durable event per check would make the audit
            // log, not the check, the limit. Every refusal is recorded.
            state
                .record_repeated(ctx, &row.id, false, || {
                    vec![ctx.audit().event(
                        &tenant,
                        "delegation.verified",
                        vec![row.id.clone()],
                        AuditOutcome::Success,
                        json!({"kid": kid, "action": row.action}),
                    )]
                })
                .await?;
            Ok(Some(Introspection { claims, row }))
        }
    }
}

/// The requesting tenant is active and the requesting agent enabled, and
/// neither is frozen (the freeze also revoked the delegation; this answers
/// for any row a replica still holds from before).
pub(crate) async fn standing_ok(state: &AppState, row: &delegation::Model) -> Result<bool> {
    let tenant_ok = state
        .directory
        .tenant(&state.db, &row.requesting_tenant_id)
        .await?
        .is_some_and(|t| is_active(&t) && t.traffic_frozen_at.is_none());
    if !tenant_ok {
        return Ok(false);
    }
    Ok(state
        .directory
        .agent(&state.db, &row.requesting_agent_id)
        .await?
        .is_some_and(|a| a.status == agent::Status::Active && a.frozen_at.is_none()))
}

async fn record_verification(
    state: &AppState,
    ctx: &CallContext,
    caller_tenant: &str,
    row: Option<&delegation::Model>,
    reason: &str,
) -> Result<()> {
    metrics::counter!("vaultguard_token_verifications_total", "active" => "false").increment(1);
    let details = json!({"active": false, "reason": reason});
    let events = match row {
        Some(row) if row.receiving_tenant_id == caller_tenant => party_events(
            &ctx.audit(),
            row,
            "delegation.verified",
            AuditOutcome::Denied,
            &details,
            None,
        ),
        _ => vec![ctx.audit().event(
            caller_tenant,
            "delegation.verified",
            row.map(|r| vec![r.id.clone()]).unwrap_or_default(),
            AuditOutcome::Denied,
            details,
        )],
    };
    state.record(events).await
}

/// EvaluatePolicy: what RequestDelegation would decide now, without any
/// delegation, step-up or token. Audited as `policy.evaluated` in the
/// caller's log and the receiving tenant's log. Returns the decision as the
/// caller's tenant may see it.
pub async fn evaluate(
    state: &AppState,
    ctx: &CallContext,
    req: &pb::EvaluatePolicyRequest,
) -> Result<Decision> {
    let tenant_id = ctx.principal.tenant_id()?.to_owned();
    let mut v = Violations::new();
    let input = check_input(
        &RawInput {
            receiving_tenant_id: &req.receiving_tenant_id,
            action: &req.action,
            scopes: &req.scopes,
            resource: &req.resource,
            requested_ttl_seconds: req.requested_ttl_seconds,
            binding_message: &req.binding_message,
            context: &req.context,
            authorization_details: &req.authorization_details,
        },
        state.config.max_token_ttl_seconds,
        &mut v,
    );
    let agent_id = match ctx.principal.agent_id() {
        Some(me) => {
            if !req.requesting_agent_id.is_empty() && req.requesting_agent_id != me {
                return Err(Error::denied(
                    ErrorReason::RoleRequired,
                    "an agent may evaluate only its own requests",
                ));
            }
            Some(me.to_owned())
        }
        None => {
            v.check(check_id(
                "requesting_agent_id",
                &req.requesting_agent_id,
                IdKind::Agent,
            ));
            Some(req.requesting_agent_id.clone())
        }
    };
    v.finish()?;
    let (Some(input), Some(agent_id)) = (input, agent_id) else {
        return Err(Error::internal("validated input missing"));
    };
    let agent = agent::Entity::find_by_id(agent_id.clone())
        .filter(agent::Column::TenantId.eq(tenant_id.clone()))
        .one(&state.db)
        .await?
        .ok_or(Error::NotFound("agent"))?;
    if agent.status != agent::Status::Active {
        return Err(Error::denied(
            ErrorReason::AgentDisabled,
            "the requesting agent is disabled",
        ));
    }
    let receiving = receiving_tenant(state, &input.receiving_tenant_id).await?;
    if !is_active(&receiving) {
        return Err(suspended());
    }
    let decision = judge_input(state, &tenant_id, &agent_id, &receiving, &input).await?;
    let mut logs = vec![tenant_id.clone()];
    if receiving.id != tenant_id {
        logs.push(receiving.id.clone());
    }
    let audit_ctx = ctx.audit();
    let events = logs
        .into_iter()
        .map(|log| {
            let details = json!({
                "requesting_agent_id": agent_id,
                "requesting_tenant_id": tenant_id,
                "receiving_tenant_id": receiving.id,
                "action": input.action,
                "decision": serde_json::to_value(decision.redacted_for(&log)).unwrap_or(Value::Null),
            });
            audit_ctx.event(
                &log,
                "policy.evaluated",
                vec![agent_id.clone()],
                AuditOutcome::Success,
                details,
            )
        })
        .collect();
    state.record(events).await?;
    Ok(decision.redacted_for(&tenant_id))
}

/// Property tests of the request checks (RequestDelegation and
/// EvaluatePolicy share them).
#[cfg(test)]
mod props {
    use proptest::prelude::*;

    use super::*;
    use crate::props::{PURE_CASES, config};

    fn proto_value() -> impl Strategy<Value = pb::AttributeValue> {
        use pb::attribute_value::Kind;
        prop_oneof![
            Just(pb::AttributeValue { kind: None }),
            any::<String>().prop_map(|s| pb::AttributeValue {
                kind: Some(Kind::StringValue(s))
            }),
            any::<f64>().prop_map(|n| pb::AttributeValue {
                kind: Some(Kind::NumberValue(n))
            }),
            any::<bool>().prop_map(|b| pb::AttributeValue {
                kind: Some(Kind::BoolValue(b))
            }),
        ]
    }

    proptest! {
        #![proptest_config(config(PURE_CASES))]

        #[test]
        fn idempotency_keys_are_exactly_the_documented_form(key in prop_oneof![
            "[A-Za-z0-9._:-]{0,130}".prop_map(String::from),
            any::<String>(),
        ]) {
            let expected = (1..=128).contains(&key.len())
                && key.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
            prop_assert_eq!(check_idempotency_key(&key).is_ok(), expected);
        }

        #[test]
        fn request_checks_never_panic_and_accept_only_valid_input(
            receiving in prop_oneof!["tnt_[0-9a-f]{32}".prop_map(String::from), any::<String>()],
            action in prop_oneof!["[a-z]{1,5}(\\.[a-z]{1,5}){0,2}".prop_map(String::from), any::<String>()],
            scopes in prop::collection::vec(prop_oneof!["[a-z:]{1,6}".prop_map(String::from), any::<String>()], 0..4),
            resource in any::<String>(),
            ttl in prop_oneof![0u32..1000, any::<u32>()],
            binding in any::<String>(),
            context in prop::collection::hash_map(
                prop_oneof!["[a-z]{1,4}".prop_map(String::from), any::<String>()],
                proto_value(),
                0..4,
            ),
        ) {
            let raw = RawInput {
                receiving_tenant_id: &receiving,
                action: &action,
                scopes: &scopes,
                resource: &resource,
                requested_ttl_seconds: ttl,
                binding_message: &binding,
                context: &context,
                authorization_details: &[],
            };
            let mut v = Violations::new();
            let input = check_input(&raw, 3_600, &mut v);
            if v.finish().is_ok() {
                let input = input.unwrap();
                prop_assert!(engine::check_action("action", &input.action).is_ok());
                prop_assert!((1..=3_600).contains(&input.requested_ttl_seconds));
                prop_assert!(input.scopes.iter().all(|s| engine::check_scope("s", s).is_ok()));
                prop_assert!(input.scopes.windows(2).all(|w| w[0] < w[1]), "sorted, no duplicates");
                prop_assert!(!input.binding_message.chars().any(char::is_control));
            }
        }
    }
}
