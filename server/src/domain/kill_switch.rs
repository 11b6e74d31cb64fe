//! The kill switch: FreezeAgent / UnfreezeAgent and FreezeTenantTraffic /
//! UnfreezeTenantTraffic.
//!
//! A freeze marks the requester (an agent, or a tenant for every one of its
//! agents as requester) and, in the same transaction, ends what it holds:
//! its PENDING step-ups are denied and its ACTIVE delegations revoked, each
//! with one statement per kind (plus the audit events, a few hundred per
//! statement), whatever their number. One directory notification per
//! requester makes every replica forget the requester's standing and its
//! delegations, so Verify answers inactive everywhere.
//!
//! The race with requests judged just before the freeze is closed where the
//! rows are stored, not where they are judged (the hot paths keep reading
//! the requester's standing from memory):
//! - an ACTIVE delegation or a signature is stored by one statement (the
//!   recorder's group commit) that inserts only rows whose requester is not
//!   frozen as that statement sees it (`audit::requester_gate`); a step-up
//!   opens (and an approved signature is made) in a transaction that
//!   re-reads the freeze after writing its rows
//!   (`frozen::check_not_frozen_in`); an approval locks its step-up, which
//!   the freeze's denial locks too;
//! - SQLite has one writer: each of those is wholly before the freeze (and
//!   swept by it) or wholly after (and sees it);
//! - on PostgreSQL a statement whose snapshot predates the freeze's commit
//!   may still commit after it. So after committing, the freeze waits until
//!   no other session of the database holds a snapshot or a transaction id
//!   older than its commit ([`wait_for_older_writers`], the wait `CREATE
//!   INDEX CONCURRENTLY` makes), then sweeps again. Whatever such a statement
//!   stored is ended before FreezeAgent answers; anything later sees the
//!   freeze.

use std::collections::HashMap;
use std::time::Duration;

use sea_orm::sea_query::{Condition, Expr, SimpleExpr};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseTransaction, DbBackend, EntityTrait, QueryFilter, Select,
    Statement, UpdateMany,
};
use serde_json::json;
use vaultguard_proto::v1::{ErrorReason, Role};

use crate::audit::{self, AuditCtx, NewEvent, Outcome as AuditOutcome};
use crate::auth::CallContext;
use crate::clock::Millis;
use crate::directory::{self, Entry};
use crate::domain::actor_json;
use crate::domain::delegations::party_events;
use crate::domain::step_up_queue::{self, QueueChange};
use crate::domain::tenants::{self, TenantView};
use crate::error::{Error, Result, Violations};
use crate::ids::{IdKind, check_id};
use crate::state::AppState;
use crate::store::entities::step_up_change::Kind;
use crate::store::entities::{agent, delegation, step_up, tenant};
use crate::store::is_postgres;
use crate::store::lifecycle::{Lifecycle, Transitions};

/// Longest freeze reason, in characters.
const MAX_REASON_CHARS: usize = 256;
/// Events appended per statement while sweeping.
const EVENTS_PER_STATEMENT: usize = 250;
/// How long a freeze waits on PostgreSQL for writers that started before it
/// committed.
const OLDER_WRITERS_TIMEOUT: Duration = Duration::from_secs(10);

/// What a freeze ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Swept {
    pub delegations_revoked: u32,
    pub step_ups_denied: u32,
}

impl Swept {
    fn add(&mut self, other: Self) {
        self.delegations_revoked = self
            .delegations_revoked
            .saturating_add(other.delegations_revoked);
        self.step_ups_denied = self.step_ups_denied.saturating_add(other.step_ups_denied);
    }
}

/// Whose requests a freeze stops.
#[derive(Debug, Clone, Copy)]
enum Requester<'a> {
    Agent(&'a str),
    Tenant(&'a str),
}

impl Requester<'_> {
    fn delegations(self) -> SimpleExpr {
        match self {
            Self::Agent(id) => delegation::Column::RequestingAgentId.eq(id),
            Self::Tenant(id) => delegation::Column::RequestingTenantId.eq(id),
        }
    }

    fn step_ups(self) -> SimpleExpr {
        match self {
            Self::Agent(id) => step_up::Column::RequestingAgentId.eq(id),
            Self::Tenant(id) => step_up::Column::RequestingTenantId.eq(id),
        }
    }

    /// The directory entries a freeze of this requester invalidates.
    fn entries(self) -> [Entry; 2] {
        match self {
            Self::Agent(id) => [
                Entry::Agent(id.to_owned()),
                Entry::AgentDelegations(id.to_owned()),
            ],
            Self::Tenant(id) => [
                Entry::Tenant(id.to_owned()),
                Entry::TenantDelegations(id.to_owned()),
            ],
        }
    }

    fn kind(self) -> &'static str {
        match self {
            Self::Agent(_) => "agent",
            Self::Tenant(_) => "tenant",
        }
    }
}

/// A freeze or unfreeze reason: 1 to 256 characters, no control characters.
fn check_reason(v: &mut Violations, reason: &str) {
    if reason.trim().is_empty() {
        v.add("reason", "is required");
    } else if reason.chars().count() > MAX_REASON_CHARS {
        v.add(
            "reason",
            format!("must be at most {MAX_REASON_CHARS} characters"),
        );
    } else if reason.chars().any(char::is_control) {
        v.add("reason", "must not contain control characters");
    }
}

/// The agent `agent_id` as the caller may act on it: any tenant's for the
/// operator, the caller's own tenant's for an admin (another tenant's answers
/// NOT_FOUND).
async fn find_agent(state: &AppState, ctx: &CallContext, agent_id: &str) -> Result<agent::Model> {
    let mut query = agent::Entity::find_by_id(agent_id.to_owned());
    if !ctx.principal.has_role(Role::Operator) {
        query = query.filter(agent::Column::TenantId.eq(ctx.principal.tenant_id()?));
    }
    query.one(&state.db).await?.ok_or(Error::NotFound("agent"))
}

/// The tenant a tenant freeze names: the operator names any tenant; an admin
/// its own (or none, meaning its own); another tenant's admin is refused.
async fn find_tenant(
    state: &AppState,
    ctx: &CallContext,
    tenant_id: &str,
) -> Result<tenant::Model> {
    let principal = &ctx.principal;
    let wanted = if principal.has_role(Role::Operator) {
        tenant_id.to_owned()
    } else {
        let own = principal.tenant_id()?;
        if !tenant_id.is_empty() && tenant_id != own {
            return Err(Error::denied(
                ErrorReason::TenantMismatch,
                "a tenant admin freezes only its own tenant's traffic",
            ));
        }
        own.to_owned()
    };
    tenant::Entity::find_by_id(wanted)
        .one(&state.db)
        .await?
        .ok_or(Error::NotFound("tenant"))
}

/// The audit events of a freeze or unfreeze of `subject` (an agent or a
/// tenant) of `tenant_id`: in the tenant's log, and in the platform log too
/// when the operator did it (as every operator action is).
fn subject_events(
    ctx: &CallContext,
    tenant_id: &str,
    subject: &str,
    event_type: &'static str,
    details: &serde_json::Value,
) -> Vec<NewEvent> {
    let audit_ctx = ctx.audit();
    let mut logs = vec![tenant_id.to_owned()];
    if ctx.principal.has_role(Role::Operator) {
        logs.push(audit::PLATFORM_LOG.to_owned());
    }
    logs.into_iter()
        .map(|log| {
            audit_ctx.event(
                &log,
                event_type,
                vec![subject.to_owned()],
                AuditOutcome::Success,
                details.clone(),
            )
        })
        .collect()
}

/// A freeze just marked in its transaction.
struct Freeze<'a> {
    requester: Requester<'a>,
    reason: &'a str,
    by: &'a str,
    now: Millis,
    /// Whether this call froze it (not already frozen).
    newly: bool,
}

/// The rest of a freeze once its mark is written in `txn`: the sweep, the
/// freeze's own event (`event`, in `log`'s log, about `subject`), the
/// commit and the sweep after it.
async fn sweep_and_record(
    state: &AppState,
    ctx: &CallContext,
    txn: sea_orm::DatabaseTransaction,
    freeze: &Freeze<'_>,
    (log, subject, event): (&str, &str, &'static str),
) -> Result<Swept> {
    let Freeze {
        requester,
        reason,
        by,
        now,
        newly,
    } = *freeze;
    let mut swept = sweep(state, &txn, &ctx.audit(), requester, reason, by, now).await?;
    let details = json!({
        "reason": reason,
        "already_frozen": !newly,
        "delegations_revoked": swept.counts.delegations_revoked,
        "step_ups_denied": swept.counts.step_ups_denied,
    });
    let events = subject_events(ctx, log, subject, event, &details);
    audit::append_all(&txn, state.clock.as_ref(), events).await?;
    finish(state, txn, requester, swept.changes).await?;
    swept
        .counts
        .add(after_commit(state, ctx, requester, reason, by).await?);
    Ok(swept.counts)
}

/// FreezeAgent.
pub async fn freeze_agent(
    state: &AppState,
    ctx: &CallContext,
    agent_id: &str,
    reason: &str,
) -> Result<(agent::Model, Swept)> {
    let mut v = Violations::new();
    v.check(check_id("agent_id", agent_id, IdKind::Agent));
    check_reason(&mut v, reason);
    v.finish()?;
    let current = find_agent(state, ctx, agent_id).await?;
    let now = state.clock.now_millis();
    let by = actor_json(&ctx.principal.actor())?;
    let requester = Requester::Agent(&current.id);
    let txn = crate::store::begin(&state.db).await?;
    let newly = agent::Entity::update_many()
        .col_expr(agent::Column::FrozenAt, Expr::value(now))
        .col_expr(agent::Column::FreezeReason, Expr::value(reason))
        .col_expr(agent::Column::FrozenBy, Expr::value(by.clone()))
        .col_expr(agent::Column::UpdatedAt, Expr::value(now))
        .filter(agent::Column::Id.eq(current.id.clone()))
        .filter(agent::Column::FrozenAt.is_null())
        .exec(&txn)
        .await?
        .rows_affected
        > 0;
    let freeze = Freeze {
        requester,
        reason,
        by: &by,
        now,
        newly,
    };
    let swept = sweep_and_record(
        state,
        ctx,
        txn,
        &freeze,
        (&current.tenant_id, &current.id, "agent.frozen"),
    )
    .await?;
    let agent = agent::Entity::find_by_id(current.id.clone())
        .one(&state.db)
        .await?
        .ok_or(Error::NotFound("agent"))?;
    Ok((agent, swept))
}

/// UnfreezeAgent.
pub async fn unfreeze_agent(
    state: &AppState,
    ctx: &CallContext,
    agent_id: &str,
    reason: &str,
) -> Result<agent::Model> {
    let mut v = Violations::new();
    v.check(check_id("agent_id", agent_id, IdKind::Agent));
    check_reason(&mut v, reason);
    v.finish()?;
    let current = find_agent(state, ctx, agent_id).await?;
    let now = state.clock.now_millis();
    let txn = crate::store::begin(&state.db).await?;
    let updated = agent::Entity::update_many()
        .col_expr(agent::Column::FrozenAt, Expr::value(Option::<i64>::None))
        .col_expr(agent::Column::FreezeReason, Expr::value(""))
        .col_expr(agent::Column::FrozenBy, Expr::value(Option::<String>::None))
        .col_expr(agent::Column::UpdatedAt, Expr::value(now))
        .filter(agent::Column::Id.eq(current.id.clone()))
        .filter(agent::Column::FrozenAt.is_not_null())
        .exec(&txn)
        .await?;
    if updated.rows_affected == 0 {
        txn.rollback().await?;
        return Err(Error::invalid_state(
            "the agent is not frozen",
            "not_frozen",
        ));
    }
    let details = json!({
        "reason": reason,
        "frozen_since": current.frozen_at,
        "freeze_reason": current.freeze_reason,
    });
    let events = subject_events(
        ctx,
        &current.tenant_id,
        &current.id,
        "agent.unfrozen",
        &details,
    );
    audit::append_all(&txn, state.clock.as_ref(), events).await?;
    let changed = [Entry::Agent(current.id.clone())];
    directory::announce(&txn, &changed[0]).await?;
    txn.commit().await?;
    state.audit_committed();
    state.directory_changed(&changed);
    agent::Entity::find_by_id(current.id.clone())
        .one(&state.db)
        .await?
        .ok_or(Error::NotFound("agent"))
}

/// FreezeTenantTraffic.
pub async fn freeze_tenant(
    state: &AppState,
    ctx: &CallContext,
    tenant_id: &str,
    reason: &str,
) -> Result<(TenantView, Swept)> {
    let mut v = Violations::new();
    if !tenant_id.is_empty() || ctx.principal.has_role(Role::Operator) {
        v.check(check_id("tenant_id", tenant_id, IdKind::Tenant));
    }
    check_reason(&mut v, reason);
    v.finish()?;
    let current = find_tenant(state, ctx, tenant_id).await?;
    let now = state.clock.now_millis();
    let by = actor_json(&ctx.principal.actor())?;
    let requester = Requester::Tenant(&current.id);
    let txn = crate::store::begin(&state.db).await?;
    let newly = tenant::Entity::update_many()
        .col_expr(tenant::Column::TrafficFrozenAt, Expr::value(now))
        .col_expr(tenant::Column::TrafficFreezeReason, Expr::value(reason))
        .col_expr(tenant::Column::TrafficFrozenBy, Expr::value(by.clone()))
        .col_expr(tenant::Column::UpdatedAt, Expr::value(now))
        .filter(tenant::Column::Id.eq(current.id.clone()))
        .filter(tenant::Column::TrafficFrozenAt.is_null())
        .exec(&txn)
        .await?
        .rows_affected
        > 0;
    let freeze = Freeze {
        requester,
        reason,
        by: &by,
        now,
        newly,
    };
    let swept = sweep_and_record(
        state,
        ctx,
        txn,
        &freeze,
        (&current.id, &current.id, "tenant.traffic_frozen"),
    )
    .await?;
    let view = tenants::get_any(state, &current.id).await?;
    Ok((view, swept))
}

/// UnfreezeTenantTraffic.
pub async fn unfreeze_tenant(
    state: &AppState,
    ctx: &CallContext,
    tenant_id: &str,
    reason: &str,
) -> Result<TenantView> {
    let mut v = Violations::new();
    if !tenant_id.is_empty() || ctx.principal.has_role(Role::Operator) {
        v.check(check_id("tenant_id", tenant_id, IdKind::Tenant));
    }
    check_reason(&mut v, reason);
    v.finish()?;
    let current = find_tenant(state, ctx, tenant_id).await?;
    let now = state.clock.now_millis();
    let txn = crate::store::begin(&state.db).await?;
    let updated = tenant::Entity::update_many()
        .col_expr(
            tenant::Column::TrafficFrozenAt,
            Expr::value(Option::<i64>::None),
        )
        .col_expr(tenant::Column::TrafficFreezeReason, Expr::value(""))
        .col_expr(
            tenant::Column::TrafficFrozenBy,
            Expr::value(Option::<String>::None),
        )
        .col_expr(tenant::Column::UpdatedAt, Expr::value(now))
        .filter(tenant::Column::Id.eq(current.id.clone()))
        .filter(tenant::Column::TrafficFrozenAt.is_not_null())
        .exec(&txn)
        .await?;
    if updated.rows_affected == 0 {
        txn.rollback().await?;
        return Err(Error::invalid_state(
            "the tenant's traffic is not frozen",
            "not_frozen",
        ));
    }
    let details = json!({
        "reason": reason,
        "frozen_since": current.traffic_frozen_at,
        "freeze_reason": current.traffic_freeze_reason,
    });
    let events = subject_events(
        ctx,
        &current.id,
        &current.id,
        "tenant.traffic_unfrozen",
        &details,
    );
    audit::append_all(&txn, state.clock.as_ref(), events).await?;
    let changed = [Entry::Tenant(current.id.clone())];
    directory::announce(&txn, &changed[0]).await?;
    txn.commit().await?;
    state.audit_committed();
    state.directory_changed(&changed);
    tenants::get_any(state, &current.id).await
}

/// What one sweep ended, and the queue changes to announce after commit.
struct Sweep {
    counts: Swept,
    changes: Vec<crate::hub::Change>,
}

/// Announces the requester's entries in `txn`, commits it, and forgets them
/// and announces the queue changes locally.
async fn finish(
    state: &AppState,
    txn: DatabaseTransaction,
    requester: Requester<'_>,
    changes: Vec<crate::hub::Change>,
) -> Result<()> {
    let entries = requester.entries();
    for entry in &entries {
        directory::announce(&txn, entry).await?;
    }
    txn.commit().await?;
    state.audit_committed();
    state.directory_changed(&entries);
    state.hub.committed(changes);
    Ok(())
}

/// PostgreSQL: waits for the writers that may have judged the requester
/// before the freeze committed, then ends what they stored. SQLite has one
/// writer: nothing can be in flight.
async fn after_commit(
    state: &AppState,
    ctx: &CallContext,
    requester: Requester<'_>,
    reason: &str,
    by: &str,
) -> Result<Swept> {
    if !is_postgres(&state.db) {
        return Ok(Swept::default());
    }
    wait_for_older_writers(state).await?;
    let now = state.clock.now_millis();
    let txn = crate::store::begin(&state.db).await?;
    let swept = sweep(state, &txn, &ctx.audit(), requester, reason, by, now).await?;
    let counts = swept.counts;
    finish(state, txn, requester, swept.changes).await?;
    if counts != Swept::default() {
        tracing::info!(
            requester = requester.kind(),
            revoked = counts.delegations_revoked,
            denied = counts.step_ups_denied,
            "freeze: ended rows stored by requests judged before it"
        );
    }
    Ok(counts)
}

/// PostgreSQL: returns once no other client session of this database holds
/// a snapshot or a transaction id older than now (the caller's commit): every
/// statement that could have read the requester as not frozen has ended, and
/// its rows are visible to the next statement.
async fn wait_for_older_writers(state: &AppState) -> Result<()> {
    // A transaction id assigned now is newer than every one assigned
    // before, running or not (a snapshot's `xmax` is not: it is the newest
    // *completed* one, and a writer can hold an id past it).
    let horizon = state
        .db
        .query_one_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT (pg_current_xact_id()::text::bigint % 4294967296)::text AS horizon",
        ))
        .await?
        .ok_or_else(|| Error::internal("no snapshot horizon"))?
        .try_get::<String>("", "horizon")?;
    let started = std::time::Instant::now();
    let mut pause = Duration::from_micros(200);
    loop {
        let older = state
            .db
            .query_one_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                "SELECT COUNT(*) AS older FROM pg_stat_activity \
                 WHERE datname = current_database() AND pid <> pg_backend_pid() \
                   AND backend_type = 'client backend' \
                   AND (age(backend_xmin) > age($1::xid) OR age(backend_xid) > age($1::xid))",
                [horizon.clone().into()],
            ))
            .await?
            .map(|row| row.try_get::<i64>("", "older"))
            .transpose()?
            .unwrap_or(0);
        if older == 0 {
            return Ok(());
        }
        if started.elapsed() > OLDER_WRITERS_TIMEOUT {
            tracing::warn!(
                older,
                "freeze: writers older than the freeze did not end in time"
            );
            return Err(Error::Unavailable {
                reason: ErrorReason::Unavailable,
                message: "the freeze is recorded, but writers that started before it are still running; call it again".to_owned(),
                metadata: HashMap::new(),
            });
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(5));
    }
}

/// Ends, inside `txn`, what `requester` holds: its PENDING step-ups are
/// denied (with their delegations), then its ACTIVE delegations revoked.
/// Denials go first: an approval racing the freeze holds its step-up's lock,
/// and once it commits its delegation is ACTIVE for the revocation's fresh
/// snapshot to end.
async fn sweep(
    state: &AppState,
    txn: &DatabaseTransaction,
    audit_ctx: &AuditCtx,
    requester: Requester<'_>,
    reason: &str,
    by: &str,
    now: Millis,
) -> Result<Sweep> {
    let end_reason = format!("frozen: {reason}");
    // PENDING step-ups (and their PENDING delegations).
    let pending = Condition::all()
        .add(step_up::State::guard_into(step_up::State::Denied))
        .add(requester.step_ups())
        .add(step_up::Column::ExpiresAt.gt(now));
    let deny = step_up::Entity::update_many()
        .into_state(step_up::State::Denied)
        .col_expr(step_up::Column::DecidedAt, Expr::value(now))
        .col_expr(step_up::Column::EndedAt, Expr::value(now))
        .col_expr(step_up::Column::UpdatedAt, Expr::value(now))
        .col_expr(step_up::Column::DeniedBy, Expr::value(by))
        .col_expr(step_up::Column::DenyReason, Expr::value(end_reason.clone()))
        .filter(pending.clone());
    let denied = update_returning(txn, deny, step_up::Entity::find().filter(pending)).await?;
    let mut events = Vec::new();
    let mut changes = Vec::with_capacity(denied.len());
    let mut denied_rows = Vec::with_capacity(denied.len());
    for chunk in denied.chunks(500) {
        let ids: Vec<String> = chunk.iter().map(|s| s.delegation_id.clone()).collect();
        let of_step_ups = Condition::all()
            .add(delegation::Status::guard_into(delegation::Status::Denied))
            .add(delegation::Column::Id.is_in(ids));
        let end = delegation::Entity::update_many()
            .into_state(delegation::Status::Denied)
            .col_expr(delegation::Column::EndedAt, Expr::value(now))
            .col_expr(delegation::Column::EndedBy, Expr::value(by))
            .col_expr(
                delegation::Column::EndReason,
                Expr::value(end_reason.clone()),
            )
            .filter(of_step_ups.clone());
        let rows =
            update_returning(txn, end, delegation::Entity::find().filter(of_step_ups)).await?;
        denied_rows.extend(rows);
    }
    let by_id: HashMap<&str, &delegation::Model> = denied_rows
        .iter()
        .map(|row| (row.id.as_str(), row))
        .collect();
    for step in &denied {
        if let Some(row) = by_id.get(step.delegation_id.as_str()) {
            events.extend(party_events(
                audit_ctx,
                row,
                "step_up.denied",
                AuditOutcome::Denied,
                &json!({"step_up_id": step.id, "reason": end_reason, "kill_switch": requester.kind()}),
                None,
            ));
        }
        let queued = QueueChange {
            kind: Kind::Removed,
            state: step_up::State::Denied,
            now,
        };
        changes.push(
            step_up_queue::record_change_with(state, txn, step, queued, Vec::new(), Vec::new())
                .await?,
        );
    }
    // ACTIVE delegations.
    let active = Condition::all()
        .add(delegation::Status::guard_into(delegation::Status::Revoked))
        .add(requester.delegations())
        .add(delegation::Column::ExpiresAt.gt(now));
    let revoke = delegation::Entity::update_many()
        .into_state(delegation::Status::Revoked)
        .col_expr(delegation::Column::EndedAt, Expr::value(now))
        .col_expr(delegation::Column::EndedBy, Expr::value(by))
        .col_expr(
            delegation::Column::EndReason,
            Expr::value(end_reason.clone()),
        )
        .filter(active.clone());
    let revoked = update_returning(txn, revoke, delegation::Entity::find().filter(active)).await?;
    for row in &revoked {
        events.extend(party_events(
            audit_ctx,
            row,
            "delegation.revoked",
            AuditOutcome::Success,
            &json!({"reason": end_reason, "kill_switch": requester.kind()}),
            None,
        ));
    }
    for chunk in events.chunks(EVENTS_PER_STATEMENT) {
        audit::append_all(txn, state.clock.as_ref(), chunk.to_vec()).await?;
    }
    let counts = Swept {
        delegations_revoked: u32::try_from(revoked.len()).unwrap_or(u32::MAX),
        step_ups_denied: u32::try_from(denied.len()).unwrap_or(u32::MAX),
    };
    Ok(Sweep { counts, changes })
}

/// Runs `update` and answers the rows it changed: with `RETURNING` on
/// PostgreSQL; on SQLite (one writer, so nothing moves in between) the rows
/// `matching` (the update's own condition) reads first, as they were.
async fn update_returning<E>(
    txn: &DatabaseTransaction,
    update: UpdateMany<E>,
    matching: Select<E>,
) -> Result<Vec<E::Model>>
where
    E: EntityTrait,
{
    if is_postgres(txn) {
        return Ok(update.exec_with_returning(txn).await?);
    }
    let rows = matching.all(txn).await?;
    update.exec(txn).await?;
    Ok(rows)
}
