//! Step-ups: CIBA poll-mode human approval of STEP_UP delegations.
//!
//! States: pending → approved → redeemed; pending → denied | expired;
//! approved → expired (the delegation ran out before the agent took its
//! token). Every transition is a conditional UPDATE on the current state,
//! made under the step-up's row lock on PostgreSQL, so concurrent approvals
//! mint one token and write one approval event. Each transition also writes
//! a `step_up_changes` row (the queue feed and webhook outbox) and announces
//! it through the [`crate::hub`], in the same transaction.

use std::collections::HashMap;

use sea_orm::sea_query::{Alias, Expr, Query};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, DatabaseTransaction, DbBackend, EntityTrait,
    FromQueryResult, IntoActiveModel, JoinType, QueryFilter, QueryOrder, QuerySelect, QueryTrait,
    Statement,
};
use serde_json::json;
use vaultguard_proto::v1::{self as pb, ErrorReason, StepUpState};

use crate::audit::{self, AuditCtx, Outcome as AuditOutcome};
use crate::auth::CallContext;
use crate::clock::Millis;
use crate::crypto::sha256_hex;
use crate::domain::budgets;
use crate::domain::delegations::{
    self, effective_status, judge_input, party_events, sign, system_actor_json,
};
use crate::domain::policy_engine::{Decision, Direction, Outcome};
use crate::domain::step_up_queue::{QueueChange, record_change_with};
use crate::domain::{actor_json, page};
use crate::error::{Error, Result, Violations, is_unique_violation};
use crate::hub::Change;
use crate::ids::{IdKind, check_id};
use crate::state::AppState;
use crate::store::entities::step_up::State;
use crate::store::entities::step_up_change::Kind;
use crate::store::entities::{delegation, step_up, step_up_approval, step_up_change, tenant};
use crate::store::is_postgres;
use crate::store::lifecycle::Transitions;
use crate::validate;

/// How old a change must be before readers of the feed treat everything
/// up to it as final. On PostgreSQL ids come from a sequence and two
/// transactions can commit out of id order, so a cursor that jumped past a
/// fresh id could miss a smaller one committed a moment later; SQLite has
/// one writer and commits in id order.
pub const CHANGE_SETTLE_MILLIS: Millis = 1_000;

/// The newest `created_at` a change may have to count as settled at `now`.
pub fn settled_at(state: &AppState, now: Millis) -> Millis {
    if is_postgres(&state.db) {
        now.saturating_sub(CHANGE_SETTLE_MILLIS)
    } else {
        now
    }
}

/// Seconds added to the interval on each `slow_down`.
const SLOW_DOWN_STEP: i64 = 5;

impl From<State> for StepUpState {
    fn from(state: State) -> Self {
        match state {
            State::Pending => Self::Pending,
            State::Approved => Self::Approved,
            State::Denied => Self::Denied,
            State::Expired => Self::Expired,
            State::Redeemed => Self::Redeemed,
        }
    }
}

impl From<Kind> for pb::PendingStepUpEventType {
    fn from(kind: Kind) -> Self {
        match kind {
            Kind::Added => Self::Added,
            Kind::Updated => Self::Updated,
            Kind::Removed => Self::Removed,
        }
    }
}

/// The CIBA error string PollStepUp answers in `state` (none when approved:
/// the token).
pub fn ciba_error(state: State) -> &'static str {
    match state {
        State::Pending => "authorization_pending",
        State::Denied => "access_denied",
        State::Expired => "expired_token",
        State::Redeemed => "invalid_grant",
        State::Approved => "",
    }
}

/// A step-up with everything shown about it.
#[derive(Debug, Clone, PartialEq)]
pub struct StepUpView {
    pub step: step_up::Model,
    pub delegation: delegation::Model,
    pub approvals: Vec<step_up_approval::Model>,
    /// The state with expiry applied.
    pub state: State,
}

/// The state with expiry applied: a pending step-up past its deadline, or an
/// approved one whose delegation expired before redemption, is expired.
pub fn effective_state(step: &step_up::Model, row: &delegation::Model, now: Millis) -> State {
    match step.state {
        State::Pending if step.expires_at <= now => State::Expired,
        State::Approved if effective_status(row, now) != delegation::Status::Active => {
            State::Expired
        }
        state @ (State::Pending
        | State::Approved
        | State::Denied
        | State::Expired
        | State::Redeemed) => state,
    }
}

/// A CIBA outcome as an error: ErrorInfo `reason`, metadata `ciba_error`.
pub(crate) fn ciba(reason: ErrorReason, ciba_error: &str, extra: &[(&str, String)]) -> Error {
    let mut metadata =
        std::collections::HashMap::from([("ciba_error".to_owned(), ciba_error.to_owned())]);
    for (key, value) in extra {
        metadata.insert((*key).to_owned(), value.clone());
    }
    let message = ciba_error.to_owned();
    if reason == ErrorReason::AccessDenied {
        Error::PermissionDenied {
            reason,
            message,
            metadata,
        }
    } else {
        Error::FailedPrecondition {
            reason,
            message,
            metadata,
        }
    }
}

fn invalid_grant() -> Error {
    ciba(ErrorReason::InvalidGrant, "invalid_grant", &[])
}

/// The answer of a CIBA poll in a state that has no token (or no longer:
/// a redeemed one's, or one whose redemption lost a race).
fn poll_error(state: State, interval: i64) -> Error {
    match state {
        State::Pending => ciba(
            ErrorReason::AuthorizationPending,
            "authorization_pending",
            &[("interval", interval.to_string())],
        ),
        State::Denied => ciba(ErrorReason::AccessDenied, "access_denied", &[]),
        State::Expired => ciba(ErrorReason::ExpiredToken, "expired_token", &[]),
        State::Approved | State::Redeemed => invalid_grant(),
    }
}

fn check_auth_req_id(value: &str) -> Result<()> {
    let valid = (1..=128).contains(&value.len())
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if valid {
        Ok(())
    } else {
        Err(Error::invalid(
            "auth_req_id",
            "must be 1 to 128 characters of A-Z, a-z, 0-9, '.', '_' and '-'",
        ))
    }
}

async fn delegation_of(state: &AppState, step: &step_up::Model) -> Result<delegation::Model> {
    delegation::Entity::find_by_id(step.delegation_id.clone())
        .one(&state.db)
        .await?
        .ok_or_else(|| Error::internal("step-up without delegation"))
}

/// The step-up an `auth_req_id` names, if the calling agent requested it;
/// anything else is `invalid_grant`.
pub async fn find_for_agent(
    state: &AppState,
    ctx: &CallContext,
    auth_req_id: &str,
) -> Result<(step_up::Model, delegation::Model)> {
    check_auth_req_id(auth_req_id)?;
    let agent = ctx.principal.agent_id().ok_or_else(invalid_grant)?;
    let step = step_up::Entity::find()
        .filter(step_up::Column::AuthReqIdHash.eq(sha256_hex(auth_req_id.as_bytes())))
        .one(&state.db)
        .await?
        .filter(|step| step.requesting_agent_id == agent)
        .ok_or_else(invalid_grant)?;
    let row = delegation_of(state, &step).await?;
    Ok((step, row))
}

/// A step-up's token, handed out once.
#[derive(Clone)]
pub struct Redeemed {
    pub token: String,
    pub expires_in: u32,
    pub delegation: delegation::Model,
}

/// Without the token: a bearer credential must not reach a log.
impl std::fmt::Debug for Redeemed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redeemed")
            .field("expires_in", &self.expires_in)
            .field("delegation_id", &self.delegation.id)
            .finish_non_exhaustive()
    }
}

/// A delegation token signed for an approved step-up before anyone redeemed
/// it (see [`approve`]). Held in memory only, and handed out only by the
/// redemption that commits; a token minted but never redeemed through it
/// (the agent polled instead, or watches through another replica) is
/// dropped, and that redemption signs its own.
#[derive(Clone, PartialEq)]
pub struct Minted {
    token: String,
    kid: String,
}

impl std::fmt::Debug for Minted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Minted")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

/// An approval's outcome as its transaction left it, handed to this
/// process's watchers with the change ([`crate::hub::Change::payload`]),
/// who take it instead of re-reading the database. A decision is never
/// undone, so it cannot be overtaken by a change published after it; a
/// watcher still re-reads on every other wake.
#[derive(Debug, Clone)]
pub struct Decided {
    pub view: StepUpView,
    /// The delegation's token, signed while the approval committed, for
    /// the watcher that redeems it (the redemption then waits for no
    /// signature).
    pub minted: Option<Minted>,
}

/// Signs the token of `row`, an approved delegation, on another task.
fn mint(state: &AppState, row: &delegation::Model) -> tokio::task::JoinHandle<Option<Minted>> {
    let (state, row) = (state.clone(), row.clone());
    tokio::spawn(async move {
        match sign(&state, &row).await {
            Ok((token, kid)) => Some(Minted { token, kid }),
            Err(err) => {
                // The redemption signs again, and answers that error.
                tracing::warn!(error = %err, delegation_id = %row.id, "minting a step-up token failed");
                None
            }
        }
    })
}

/// Redeems an approved step-up: the token, exactly once. `minted` is the
/// token signed at the approval, when this process made it.
pub async fn redeem(
    state: &AppState,
    ctx: &CallContext,
    step: &step_up::Model,
    row: &delegation::Model,
    minted: Option<Minted>,
) -> Result<Redeemed> {
    let now = state.clock.now_millis();
    if effective_status(row, now) != delegation::Status::Active {
        return Err(poll_error(State::Expired, 0));
    }
    // Signed before the write, so that the event names the kid used and a
    // failed signature commits nothing; the token leaves only once the
    // redemption commits.
    let Minted { token, kid } = match minted {
        Some(minted) => minted,
        None => {
            let (token, kid) = sign(state, row).await?;
            Minted { token, kid }
        }
    };
    let events = party_events(
        &ctx.audit(),
        row,
        "step_up.redeemed",
        AuditOutcome::Success,
        &json!({"step_up_id": step.id, "kid": kid, "alg": row.token_algorithm}),
        None,
    );
    let mut update = step_up::Entity::update_many()
        .into_state(State::Redeemed)
        .col_expr(step_up::Column::RedeemedAt, Expr::value(now))
        .col_expr(step_up::Column::UpdatedAt, Expr::value(now))
        .filter(step_up::Column::Id.eq(step.id.clone()))
        .into_query();
    let redeemed = if is_postgres(&state.db) {
        // One statement, its own transaction: the events are written only
        // if the update took the step-up from approved.
        update.returning_col(step_up::Column::Id);
        let statement = audit::with_events(
            state.clock.as_ref(),
            vec![("r".to_owned(), update.into())],
            &events,
            Some("r"),
            Query::select()
                .expr_as(Expr::val(1), Alias::new("redeemed"))
                .from(Alias::new("r"))
                .to_owned(),
        )?;
        state.db.query_one_raw(statement).await?.is_some()
    } else {
        let txn = crate::store::begin(&state.db).await?;
        if txn.execute(&update).await?.rows_affected() == 0 {
            txn.rollback().await?;
            false
        } else {
            audit::append_all(&txn, state.clock.as_ref(), events).await?;
            txn.commit().await?;
            true
        }
    };
    if !redeemed {
        return Err(invalid_grant());
    }
    state.audit_committed();
    Ok(Redeemed {
        token,
        expires_in: delegations::seconds_left(row.expires_at, now),
        delegation: row.clone(),
    })
}

/// PollStepUp: the token when approved, else the CIBA error of the state.
pub async fn poll(state: &AppState, ctx: &CallContext, auth_req_id: &str) -> Result<Redeemed> {
    let (step, row) = find_for_agent(state, ctx, auth_req_id).await?;
    let now = state.clock.now_millis();
    match effective_state(&step, &row, now) {
        State::Approved => redeem(state, ctx, &step, &row, None).await,
        State::Pending => {
            let too_fast = step
                .last_polled_at
                .is_some_and(|last| now - last < step.interval_seconds * 1000);
            let interval = if too_fast {
                step.interval_seconds + SLOW_DOWN_STEP
            } else {
                step.interval_seconds
            };
            step_up::Entity::update_many()
                .col_expr(step_up::Column::LastPolledAt, Expr::value(now))
                .col_expr(step_up::Column::IntervalSeconds, Expr::value(interval))
                .filter(step_up::Column::Id.eq(step.id.clone()))
                .exec(&state.db)
                .await?;
            if too_fast {
                Err(ciba(
                    ErrorReason::SlowDown,
                    "slow_down",
                    &[("interval", interval.to_string())],
                ))
            } else {
                Err(poll_error(State::Pending, interval))
            }
        }
        other @ (State::Denied | State::Expired | State::Redeemed) => {
            Err(poll_error(other, step.interval_seconds))
        }
    }
}

/// The views of `steps`, in their order: their delegations and approvals
/// read now, in two queries whatever their number (a page of a listing or
/// of a queue snapshot, at most 500).
async fn views(state: &AppState, steps: Vec<step_up::Model>) -> Result<Vec<StepUpView>> {
    if steps.is_empty() {
        return Ok(Vec::new());
    }
    let delegation_ids: Vec<String> = steps.iter().map(|s| s.delegation_id.clone()).collect();
    let step_ids: Vec<String> = steps.iter().map(|s| s.id.clone()).collect();
    let (delegations, approvals) = tokio::try_join!(
        delegation::Entity::find()
            .filter(delegation::Column::Id.is_in(delegation_ids))
            .all(&state.db),
        step_up_approval::Entity::find()
            .filter(step_up_approval::Column::StepUpId.is_in(step_ids))
            .order_by_asc(step_up_approval::Column::CreatedAt)
            .all(&state.db),
    )?;
    let mut delegations: HashMap<String, delegation::Model> = delegations
        .into_iter()
        .map(|row| (row.id.clone(), row))
        .collect();
    let mut approvals_of: HashMap<String, Vec<step_up_approval::Model>> = HashMap::new();
    for approval in approvals {
        approvals_of
            .entry(approval.step_up_id.clone())
            .or_default()
            .push(approval);
    }
    let now = state.clock.now_millis();
    steps
        .into_iter()
        .map(|step| {
            let delegation = delegations
                .remove(&step.delegation_id)
                .ok_or_else(|| Error::internal("step-up without delegation"))?;
            Ok(StepUpView {
                state: effective_state(&step, &delegation, now),
                approvals: approvals_of.remove(&step.id).unwrap_or_default(),
                step,
                delegation,
            })
        })
        .collect()
}

/// The step-up `query` finds (`missing` when none), its delegation and its
/// approvals read in one snapshot. Read one by one, a watcher's re-read that
/// raced an approval could pair the step-up as it was before (PENDING) with
/// the approval that reached the quorum: a state that never existed.
async fn snapshot_view(
    state: &AppState,
    query: sea_orm::Select<step_up::Entity>,
    missing: fn() -> Error,
) -> Result<StepUpView> {
    let snapshot = crate::store::begin_snapshot(&state.db).await?;
    let step = query.one(&snapshot).await?.ok_or_else(missing)?;
    let delegation = delegation::Entity::find_by_id(step.delegation_id.clone())
        .one(&snapshot)
        .await?
        .ok_or_else(|| Error::internal("step-up without delegation"))?;
    let approvals = step_up_approval::Entity::find()
        .filter(step_up_approval::Column::StepUpId.eq(step.id.clone()))
        .order_by_asc(step_up_approval::Column::CreatedAt)
        .all(&snapshot)
        .await?;
    snapshot.commit().await?;
    Ok(StepUpView {
        state: effective_state(&step, &delegation, state.clock.now_millis()),
        step,
        delegation,
        approvals,
    })
}

/// The current view of the step-up an agent watches.
pub async fn agent_view(state: &AppState, step_up_id: &str) -> Result<StepUpView> {
    snapshot_view(
        state,
        step_up::Entity::find_by_id(step_up_id.to_owned()),
        invalid_grant,
    )
    .await
}

/// The query of step-up `step_up_id` if it is addressed to the caller's
/// tenant (another tenant's reads as absent).
fn receiving_query(
    ctx: &CallContext,
    step_up_id: &str,
) -> Result<sea_orm::Select<step_up::Entity>> {
    check_id("step_up_id", step_up_id, IdKind::StepUp)?;
    Ok(step_up::Entity::find_by_id(step_up_id.to_owned())
        .filter(step_up::Column::ReceivingTenantId.eq(ctx.principal.tenant_id()?)))
}

/// A step-up addressed to the caller's tenant.
async fn find_receiving(
    state: &AppState,
    ctx: &CallContext,
    step_up_id: &str,
) -> Result<step_up::Model> {
    receiving_query(ctx, step_up_id)?
        .one(&state.db)
        .await?
        .ok_or(Error::NotFound("step-up"))
}

/// GetStepUp.
pub async fn get(state: &AppState, ctx: &CallContext, step_up_id: &str) -> Result<StepUpView> {
    let query = receiving_query(ctx, step_up_id)?;
    snapshot_view(state, query, || Error::NotFound("step-up")).await
}

/// ListPendingStepUps: oldest first.
pub async fn list_pending(
    state: &AppState,
    ctx: &CallContext,
    req: &pb::ListPendingStepUpsRequest,
) -> Result<(Vec<StepUpView>, String)> {
    let tenant = ctx.principal.tenant_id()?.to_owned();
    let mut v = Violations::new();
    if req.requesting_tenant_id.chars().count() > 64 {
        v.add("requesting_tenant_id", "must be at most 64 characters");
    }
    if !req.action.is_empty() {
        v.check(crate::domain::policy_engine::check_action(
            "action",
            &req.action,
        ));
    }
    let page_req = req.page.clone().unwrap_or_default();
    let size = v.take(validate::page_size("page.page_size", page_req.page_size));
    v.finish()?;
    let size = size.unwrap_or(50);
    let scope = format!(
        "step_ups|{tenant}|{}|{}",
        req.requesting_tenant_id, req.action
    );
    let after = page::decode("page.page_token", &scope, &page_req.page_token)?;
    let now = state.clock.now_millis();
    let mut query = step_up::Entity::find()
        .filter(step_up::Column::ReceivingTenantId.eq(tenant))
        .filter(step_up::Column::State.eq(State::Pending))
        .filter(step_up::Column::ExpiresAt.gt(now))
        .order_by_asc(step_up::Column::Id)
        .limit(size + 1);
    if !req.requesting_tenant_id.is_empty() {
        query =
            query.filter(step_up::Column::RequestingTenantId.eq(req.requesting_tenant_id.clone()));
    }
    if !req.action.is_empty() {
        query = query.filter(
            step_up::Column::DelegationId.in_subquery(
                Query::select()
                    .column(delegation::Column::Id)
                    .from(delegation::Entity)
                    .and_where(delegation::Column::Action.eq(req.action.clone()))
                    .to_owned(),
            ),
        );
    }
    if let Some(after) = after {
        query = query.filter(step_up::Column::Id.gt(after));
    }
    let rows = query.all(&state.db).await?;
    let (rows, next) = page::finish(rows, size, &scope, |row| row.id.clone());
    Ok((views(state, rows).await?, next))
}

/// Checks who may decide: never the requester.
fn check_not_requester(ctx: &CallContext, step: &step_up::Model) -> Result<()> {
    if ctx.principal.subject == step.requesting_agent_id {
        return Err(Error::denied(
            ErrorReason::SelfApproval,
            "the requester cannot decide its own step-up",
        ));
    }
    Ok(())
}

/// Re-reads the step-up `step_up_id` addressed to `tenant_id` and its
/// delegation inside `txn` (under the step-up's row lock on PostgreSQL).
async fn lock_step_up(
    state: &AppState,
    txn: &DatabaseTransaction,
    tenant_id: &str,
    step_up_id: &str,
) -> Result<(step_up::Model, delegation::Model)> {
    // One round trip: the step-up joined to its delegation. On PostgreSQL
    // both rows are locked (`FOR UPDATE`), in the order every writer of a
    // step-up takes them: the step-up, then its delegation, which the
    // transaction goes on to update anyway.
    let of_step_up = step_up::Entity::belongs_to(delegation::Entity)
        .from(step_up::Column::DelegationId)
        .to(delegation::Column::Id)
        .into();
    let mut query = step_up::Entity::find_by_id(step_up_id.to_owned())
        .filter(step_up::Column::ReceivingTenantId.eq(tenant_id))
        .join(JoinType::InnerJoin, of_step_up)
        .select_also(delegation::Entity);
    if is_postgres(&state.db) {
        query = query.lock_exclusive();
    }
    match query.one(txn).await? {
        Some((step, Some(row))) => Ok((step, row)),
        Some((_, None)) => Err(Error::internal("step-up without delegation")),
        None => Err(Error::NotFound("step-up")),
    }
}

/// [`lock_step_up`], and checks that the step-up is still pending.
async fn lock_pending(
    state: &AppState,
    txn: &DatabaseTransaction,
    tenant_id: &str,
    step_up_id: &str,
) -> Result<(step_up::Model, delegation::Model)> {
    let (step, row) = lock_step_up(state, txn, tenant_id, step_up_id).await?;
    check_pending(state, &step, &row)?;
    Ok((step, row))
}

/// Whether the caller may approve `step` now: not its requester, still
/// pending, and shown the request as it stands (`request_hash`).
fn check_approvable(
    state: &AppState,
    ctx: &CallContext,
    (step, row): (&step_up::Model, &delegation::Model),
    request_hash: &str,
) -> Result<()> {
    check_not_requester(ctx, step)?;
    check_pending(state, step, row)?;
    if step.request_hash != request_hash {
        return Err(Error::invalid_state(
            "the request changed since it was shown",
            "request_hash_mismatch",
        ));
    }
    Ok(())
}

/// The policy re-check at approval: both sides' rules as they are now.
async fn judge_approval(
    state: &AppState,
    receiving: &tenant::Model,
    step: &step_up::Model,
    row: &delegation::Model,
) -> Result<Decision> {
    judge_input(
        state,
        &step.requesting_tenant_id,
        &step.requesting_agent_id,
        receiving,
        &delegations::input_of(row)?,
    )
    .await
}

/// INVALID_STATE naming the state, unless `step` is still pending.
fn check_pending(state: &AppState, step: &step_up::Model, row: &delegation::Model) -> Result<()> {
    let current = effective_state(step, row, state.clock.now_millis());
    if current != State::Pending {
        return Err(Error::invalid_state(
            format!("the step-up is {current}"),
            StepUpState::from(current).as_str_name(),
        ));
    }
    Ok(())
}

/// Who denied a step-up, why, and the policy re-check if that was the cause.
struct Denial<'a> {
    by: String,
    reason: &'a str,
    decision: Option<&'a Decision>,
}

/// Ends a pending step-up and its delegation as DENIED inside `txn`.
async fn deny_in(
    state: &AppState,
    txn: &DatabaseTransaction,
    audit_ctx: &AuditCtx,
    (step, row): (&step_up::Model, &delegation::Model),
    denial: Denial<'_>,
) -> Result<Change> {
    let Denial {
        by: denied_by,
        reason,
        decision,
    } = denial;
    let now = state.clock.now_millis();
    // What the request held of its budgets no longer counts.
    budgets::release_held(txn, &row.id).await?;
    let deny = step_up::Entity::update_many()
        .into_state(State::Denied)
        .col_expr(step_up::Column::DecidedAt, Expr::value(now))
        .col_expr(step_up::Column::EndedAt, Expr::value(now))
        .col_expr(step_up::Column::UpdatedAt, Expr::value(now))
        .col_expr(step_up::Column::DeniedBy, Expr::value(denied_by.clone()))
        .col_expr(step_up::Column::DenyReason, Expr::value(reason))
        .filter(step_up::Column::Id.eq(step.id.clone()))
        .into_query();
    let end = delegation::Entity::update_many()
        .into_state(delegation::Status::Denied)
        .col_expr(delegation::Column::EndedAt, Expr::value(now))
        .col_expr(delegation::Column::EndedBy, Expr::value(denied_by))
        .col_expr(
            delegation::Column::EndReason,
            Expr::value(if reason.is_empty() { "denied" } else { reason }),
        )
        .filter(delegation::Column::Id.eq(row.id.clone()))
        .into_query();
    let events = party_events(
        audit_ctx,
        row,
        "step_up.denied",
        AuditOutcome::Denied,
        &json!({"step_up_id": step.id, "reason": reason}),
        decision,
    );
    let queued = QueueChange {
        kind: Kind::Removed,
        state: State::Denied,
        now,
    };
    record_change_with(state, txn, step, queued, vec![deny, end], events).await
}

/// DenyStepUp.
pub async fn deny(
    state: &AppState,
    ctx: &CallContext,
    step_up_id: &str,
    reason: &str,
) -> Result<StepUpView> {
    let mut v = Violations::new();
    v.check(check_id("step_up_id", step_up_id, IdKind::StepUp));
    v.check(validate::optional_text("reason", reason, 512));
    v.finish()?;
    let found = find_receiving(state, ctx, step_up_id).await?;
    check_not_requester(ctx, &found)?;
    let txn = crate::store::begin(&state.db).await?;
    let (step, row) = lock_pending(state, &txn, &found.receiving_tenant_id, step_up_id).await?;
    let denial = Denial {
        by: actor_json(&ctx.principal.actor())?,
        reason,
        decision: None,
    };
    let change = deny_in(state, &txn, &ctx.audit(), (&step, &row), denial).await?;
    txn.commit().await?;
    state.audit_committed();
    state.hub.committed(vec![change]);
    get(state, ctx, step_up_id).await
}

fn check_request_hash(value: &str) -> Result<()> {
    if value.len() == 64
        && value
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        Ok(())
    } else {
        Err(Error::invalid(
            "request_hash",
            "must be 64 lowercase hex characters",
        ))
    }
}

/// ApproveStepUp: records the caller's approval; at the quorum, re-checks
/// the policy and activates the delegation (or denies it on BLOCK).
pub async fn approve(
    state: &AppState,
    ctx: &CallContext,
    step_up_id: &str,
    request_hash: &str,
    comment: &str,
) -> Result<(StepUpView, Decision)> {
    let mut v = Violations::new();
    v.check(check_id("step_up_id", step_up_id, IdKind::StepUp));
    if let Err(Error::InvalidArgument(errors)) = check_request_hash(request_hash) {
        errors.into_iter().for_each(|e| v.check(Err(e)));
    }
    v.check(validate::optional_text("comment", comment, 512));
    v.finish()?;
    let tenant_id = ctx.principal.tenant_id()?.to_owned();
    let receiving = state
        .directory
        .tenant(&state.db, &tenant_id)
        .await?
        .ok_or(Error::NotFound("tenant"))?;
    // The policy re-check may read the database. SQLite has one connection,
    // which the transaction holds: there the step-up is read and judged
    // before it, and checked again under it. PostgreSQL judges the rows its
    // row lock read, two round trips fewer on the way to the watcher.
    let early = if is_postgres(&state.db) {
        None
    } else {
        let found = find_receiving(state, ctx, step_up_id).await?;
        let found_row = delegation_of(state, &found).await?;
        check_approvable(state, ctx, (&found, &found_row), request_hash)?;
        Some(judge_approval(state, &receiving, &found, &found_row).await?)
    };

    let audit_ctx = ctx.audit();
    let txn = crate::store::begin(&state.db).await?;
    let (step, row) = lock_step_up(state, &txn, &tenant_id, step_up_id).await?;
    check_approvable(state, ctx, (&step, &row), request_hash)?;
    let decision = match early {
        Some(decision) => decision,
        None => judge_approval(state, &receiving, &step, &row).await?,
    };
    if decision.outcome == Outcome::Block {
        let denial = Denial {
            by: system_actor_json()?,
            reason: "blocked by policy at approval time",
            decision: Some(&decision),
        };
        let change = deny_in(state, &txn, &audit_ctx, (&step, &row), denial).await?;
        txn.commit().await?;
        state.audit_committed();
        state.hub.committed(vec![change]);
        return Err(blocked_at_approval(&decision, &tenant_id));
    }
    let now = state.clock.now_millis();
    let approval = step_up_approval::Model {
        step_up_id: step.id.clone(),
        approver_subject: ctx.principal.subject.clone(),
        decision: "approve".to_owned(),
        reason: comment.to_owned(),
        created_at: now,
        approver: actor_json(&ctx.principal.actor())?,
    };
    // Read once, with the new one: counted for the quorum and shown in the
    // answer.
    let Some(approval_rows) = add_approval(&txn, approval).await? else {
        // The same approver again: nothing changes.
        txn.rollback().await?;
        return Ok((
            get(state, ctx, step_up_id).await?,
            decision.redacted_for(&tenant_id),
        ));
    };
    let approvals = u64::try_from(approval_rows.len()).unwrap_or(u64::MAX);
    let quorum = u64::try_from(step.approvals_required.max(1)).unwrap_or(1);
    // The rows as this transaction leaves them, for the answer.
    let (mut step_after, mut row_after) = (step.clone(), row.clone());
    step_after.updated_at = now;
    let settled = approvals >= quorum;
    let mut minting = None;
    let mut change = if settled {
        // What the request held of its budgets is spent.
        budgets::spend_held(&txn, &row.id).await?;
        let expires_at = now + i64::from(decision.max_ttl_seconds) * 1000;
        row_after.status = delegation::Status::Active;
        row_after.activated_at = Some(now);
        row_after.expires_at = Some(expires_at);
        row_after
            .token_algorithm
            .clone_from(&receiving.token_algorithm);
        step_after.state = State::Approved;
        step_after.decided_at = Some(now);
        step_after.ended_at = Some(now);
        let activate = delegation::Entity::update_many()
            .into_state(delegation::Status::Active)
            .col_expr(delegation::Column::ActivatedAt, Expr::value(now))
            .col_expr(delegation::Column::ExpiresAt, Expr::value(expires_at))
            .col_expr(
                delegation::Column::TokenAlgorithm,
                Expr::value(receiving.token_algorithm.clone()),
            )
            .filter(delegation::Column::Id.eq(row.id.clone()))
            .into_query();
        let approve = step_up::Entity::update_many()
            .into_state(State::Approved)
            .col_expr(step_up::Column::DecidedAt, Expr::value(now))
            .col_expr(step_up::Column::EndedAt, Expr::value(now))
            .col_expr(step_up::Column::UpdatedAt, Expr::value(now))
            .filter(step_up::Column::Id.eq(step.id.clone()))
            .into_query();
        let events = party_events(
            &audit_ctx,
            &row,
            "step_up.approved",
            AuditOutcome::Success,
            &json!({"step_up_id": step.id, "approvals": approvals, "comment": comment, "expires_at": expires_at}),
            Some(&decision),
        );
        let queued = QueueChange {
            kind: Kind::Removed,
            state: State::Approved,
            now,
        };
        // The token is signed while the approval commits (an RS256
        // signature takes about a millisecond), so that the watcher it
        // wakes redeems at once. SQLite's one connection is this
        // transaction's, and signing may read the key ring.
        if is_postgres(&state.db) {
            minting = Some(mint(state, &row_after));
        }
        record_change_with(state, &txn, &step, queued, vec![activate, approve], events).await?
    } else {
        let events = party_events(
            &audit_ctx,
            &row,
            "step_up.approval_recorded",
            AuditOutcome::Success,
            &json!({"step_up_id": step.id, "approvals": approvals, "required": quorum, "comment": comment}),
            None,
        );
        let touch = step_up::Entity::update_many()
            .col_expr(step_up::Column::UpdatedAt, Expr::value(now))
            .filter(step_up::Column::Id.eq(step.id.clone()))
            .into_query();
        let queued = QueueChange {
            kind: Kind::Updated,
            state: State::Pending,
            now,
        };
        record_change_with(state, &txn, &step, queued, vec![touch], events).await?
    };
    // Answer with the state this approval commits (a watching agent may
    // redeem the token the moment the commit lands).
    let answer = StepUpView {
        state: effective_state(&step_after, &row_after, now),
        step: step_after,
        delegation: row_after,
        approvals: approval_rows,
    };
    txn.commit().await?;
    state.audit_committed();
    if settled {
        let minted = match minting {
            Some(minting) => minting.await.ok().flatten(),
            None => None,
        };
        let view = answer.clone();
        change.payload = Some(std::sync::Arc::new(Decided { view, minted }));
    }
    state.hub.committed(vec![change]);
    Ok((answer, decision.redacted_for(&tenant_id)))
}

/// Inserts `approval` and answers every approval of its step-up, oldest
/// first; `None` (and nothing written) when its approver had approved it
/// already. The caller holds the step-up's lock. PostgreSQL: one round trip,
/// the insert and the read of the rows before it in one statement (a
/// statement does not see its own common table expression's rows, so the
/// new row comes from `RETURNING`).
async fn add_approval(
    txn: &DatabaseTransaction,
    approval: step_up_approval::Model,
) -> Result<Option<Vec<step_up_approval::Model>>> {
    if !is_postgres(txn) {
        let step_up_id = approval.step_up_id.clone();
        return match approval.into_active_model().insert(txn).await {
            Ok(_) => Ok(Some(
                step_up_approval::Entity::find()
                    .filter(step_up_approval::Column::StepUpId.eq(step_up_id))
                    .order_by_asc(step_up_approval::Column::CreatedAt)
                    .all(txn)
                    .await?,
            )),
            Err(err) if is_unique_violation(&err) => Ok(None),
            Err(err) => Err(err.into()),
        };
    }
    let rows = txn
        .query_all_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "WITH added AS (\
               INSERT INTO step_up_approvals \
               (step_up_id, approver_subject, decision, reason, created_at, approver) \
               VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING \
               RETURNING step_up_id, approver_subject, decision, reason, created_at, approver\
             ) \
             SELECT *, TRUE AS added FROM added \
             UNION ALL \
             SELECT step_up_id, approver_subject, decision, reason, created_at, approver, FALSE \
             FROM step_up_approvals WHERE step_up_id = $1 \
             ORDER BY created_at",
            [
                approval.step_up_id.into(),
                approval.approver_subject.into(),
                approval.decision.into(),
                approval.reason.into(),
                approval.created_at.into(),
                approval.approver.into(),
            ],
        ))
        .await?;
    let mut added = false;
    let mut approvals = Vec::with_capacity(rows.len());
    for row in rows {
        added |= row.try_get::<bool>("", "added")?;
        approvals.push(step_up_approval::Model::from_query_result(&row, "")?);
    }
    Ok(added.then_some(approvals))
}

/// FAILED_PRECONDITION with ACCESS_DENIED: the re-check decided BLOCK, as
/// the approver's tenant (`viewer_tenant`) may see it: the blocking side's
/// rule id and policy version only when that side is the viewer's own.
fn blocked_at_approval(decision: &Decision, viewer_tenant: &str) -> Error {
    let visible = decision.redacted_for(viewer_tenant);
    let (direction, side) = visible
        .blocking_side()
        .unwrap_or((Direction::Inbound, &visible.inbound));
    let mut metadata = std::collections::HashMap::from([
        ("ciba_error".to_owned(), "access_denied".to_owned()),
        ("policy_side".to_owned(), direction.as_str().to_owned()),
    ]);
    if side.tenant_id == viewer_tenant {
        metadata.insert("rule_id".to_owned(), side.rule_id.clone());
        metadata.insert("policy_version".to_owned(), side.policy_version.to_string());
    }
    if !side.scopes_not_granted.is_empty() {
        metadata.insert(
            "scopes_not_granted".to_owned(),
            side.scopes_not_granted.join(" "),
        );
    }
    Error::FailedPrecondition {
        reason: ErrorReason::AccessDenied,
        message: format!(
            "the {} policy now blocks this request; the step-up is denied",
            direction.as_str()
        ),
        metadata,
    }
}

/// The newest settled change id of a tenant's queue (0 when none).
pub async fn latest_change(state: &AppState, tenant_id: &str) -> Result<i64> {
    let horizon = settled_at(state, state.clock.now_millis());
    Ok(step_up_change::Entity::find()
        .filter(step_up_change::Column::TenantId.eq(tenant_id))
        .filter(step_up_change::Column::CreatedAt.lte(horizon))
        .order_by_desc(step_up_change::Column::Id)
        .one(&state.db)
        .await?
        .map(|c| c.id)
        .unwrap_or_default())
}

/// Step-ups a queue watch's snapshot reads and sends at a time: the most a
/// snapshot holds in memory, whatever the queue's length.
pub const SNAPSHOT_PAGE: u64 = 100;

/// One page of a queue snapshot: the step-ups pending in a tenant's queue
/// now, oldest first, after the step-up `after` (none: from the first), at
/// most `limit`. A snapshot is read page by page after taking its cursor
/// with [`latest_change`]: a step-up that changes between two pages is
/// reported again by the changes after that cursor.
pub async fn pending_page(
    state: &AppState,
    tenant_id: &str,
    after: Option<&str>,
    limit: u64,
) -> Result<Vec<StepUpView>> {
    let now = state.clock.now_millis();
    let mut query = step_up::Entity::find()
        .filter(step_up::Column::ReceivingTenantId.eq(tenant_id))
        .filter(step_up::Column::State.eq(State::Pending))
        .filter(step_up::Column::ExpiresAt.gt(now))
        .order_by_asc(step_up::Column::Id)
        .limit(limit);
    if let Some(after) = after {
        query = query.filter(step_up::Column::Id.gt(after));
    }
    let rows = query.all(&state.db).await?;
    views(state, rows).await
}

/// The queue changes of a tenant after `cursor`, at most `limit`, each with
/// the step-up as it is now.
pub async fn changes_after(
    state: &AppState,
    tenant_id: &str,
    cursor: i64,
    limit: u64,
) -> Result<Vec<(step_up_change::Model, StepUpView)>> {
    let changes = step_up_change::Entity::find()
        .filter(step_up_change::Column::TenantId.eq(tenant_id))
        .filter(step_up_change::Column::Id.gt(cursor))
        .order_by_asc(step_up_change::Column::Id)
        .limit(limit)
        .all(&state.db)
        .await?;
    if changes.is_empty() {
        return Ok(Vec::new());
    }
    let step_ids: std::collections::BTreeSet<String> =
        changes.iter().map(|c| c.step_up_id.clone()).collect();
    let steps = step_up::Entity::find()
        .filter(step_up::Column::Id.is_in(step_ids))
        .all(&state.db)
        .await?;
    let views: HashMap<String, StepUpView> = views(state, steps)
        .await?
        .into_iter()
        .map(|view| (view.step.id.clone(), view))
        .collect();
    changes
        .into_iter()
        .map(|change| {
            let view = views
                .get(&change.step_up_id)
                .cloned()
                .ok_or_else(|| Error::internal("change of a missing step-up"))?;
            Ok((change, view))
        })
        .collect()
}

/// Checks a watch's heartbeat interval: 0 means 15 s, else 1 to 60 s.
pub fn heartbeat_seconds(raw: u32) -> Result<u64> {
    match raw {
        0 => Ok(15),
        1..=60 => Ok(u64::from(raw)),
        _ => Err(Error::invalid(
            "heartbeat_interval_seconds",
            "must be 0 (15 s) or 1 to 60",
        )),
    }
}
