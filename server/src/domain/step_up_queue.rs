//! Writes to a tenant's step-up queue, below both the step-up flows
//! (`step_ups.rs`: approve, deny) and the requests that open step-ups
//! (`delegations.rs`: RequestDelegation and the sweeper; Sign and
//! ExchangeToken through it): each change of a step-up's place in the queue
//! is a `step_up_changes` row (the queue feed and webhook outbox) written and
//! announced through the [`crate::hub`] in the changing transaction, and a
//! pair of tenants holds at most `max_pending_step_ups_per_pair` PENDING
//! step-ups.

use std::collections::HashMap;

use sea_orm::sea_query::{Alias, Expr, Func, Query, SubQueryStatement, UpdateStatement};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, DatabaseTransaction, DbBackend, EntityTrait,
    PaginatorTrait, QueryFilter, QueryTrait, Statement,
};
use vaultguard_proto::v1::ErrorReason;

use crate::audit::{self, NewEvent};
use crate::clock::Millis;
use crate::error::{Error, Result};
use crate::hub::Change;
use crate::state::AppState;
use crate::store::entities::step_up::{self, State};
use crate::store::entities::step_up_change::{self, Kind};
use crate::store::is_postgres;

/// Writes a queue change and announces it, inside `txn`.
async fn record_change(
    state: &AppState,
    txn: &DatabaseTransaction,
    step: &step_up::Model,
    kind: Kind,
    new_state: State,
    now: Millis,
) -> Result<Change> {
    let change = QueueChange {
        kind,
        state: new_state,
        now,
    };
    record_change_with(state, txn, step, change, Vec::new(), Vec::new()).await
}

/// A change of a step-up's place in its tenant's queue.
pub(crate) struct QueueChange {
    pub kind: Kind,
    pub state: State,
    pub now: Millis,
}

/// Writes `updates`, `events` and the queue change, and announces the
/// change, inside `txn`. On PostgreSQL that is one statement (one round trip
/// on the way from a decision to its watchers), on SQLite one per write.
pub(crate) async fn record_change_with(
    state: &AppState,
    txn: &DatabaseTransaction,
    step: &step_up::Model,
    queued: QueueChange,
    updates: Vec<UpdateStatement>,
    events: Vec<NewEvent>,
) -> Result<Change> {
    let change = Change::step_up(&step.receiving_tenant_id, &step.id);
    let mut insert = step_up_change::Entity::insert(step_up_change::ActiveModel {
        tenant_id: Set(step.receiving_tenant_id.clone()),
        step_up_id: Set(step.id.clone()),
        delegation_id: Set(step.delegation_id.clone()),
        kind: Set(queued.kind),
        state: Set(queued.state),
        created_at: Set(queued.now),
        ..Default::default()
    })
    .into_query();
    if is_postgres(txn) {
        insert.returning_col(step_up_change::Column::Id);
        let mut writes: Vec<(String, SubQueryStatement)> = updates
            .into_iter()
            .enumerate()
            .map(|(index, update)| (format!("w{index}"), update.into()))
            .collect();
        writes.push(("c".to_owned(), insert.into()));
        let [channel, payload] = state.hub.notification(&change);
        let notify = Query::select()
            .expr(Func::cust("pg_notify").args([Expr::val(channel), Expr::val(payload)]))
            .from(Alias::new("c"))
            .to_owned();
        let statement = audit::with_events(state.clock.as_ref(), writes, &events, None, notify)?;
        txn.execute_raw(statement).await?;
    } else {
        for update in &updates {
            txn.execute(update).await?;
        }
        audit::append_all(txn, state.clock.as_ref(), events).await?;
        txn.execute(&insert).await?;
    }
    Ok(change)
}

/// The advisory-lock namespace of a tenant pair's queue (PostgreSQL).
const QUEUE_LOCK_NAMESPACE: &str = "vaultguard-step-up-queue:";

/// Refuses a new step-up of `requesting` in `receiving`'s queue while the
/// pair already has `max_pending_step_ups_per_pair` PENDING, unexpired
/// step-ups: RESOURCE_EXHAUSTED with ERROR_REASON_STEP_UP_QUEUE_FULL, and
/// the caller's transaction (which inserts the step-up) is dropped, so
/// nothing of the request is written. Every way a step-up is opened
/// (RequestDelegation, Sign, ExchangeToken) comes through here.
///
/// The count is exact on both backends: on PostgreSQL the transaction
/// first takes the pair's transaction-scoped advisory lock, held until it
/// commits, so concurrent requests on any number of replicas count one at a
/// time and each sees the step-ups committed before it (READ COMMITTED
/// takes a new snapshot per statement); SQLite has one writer.
pub(crate) async fn check_queue_room(
    state: &AppState,
    txn: &DatabaseTransaction,
    requesting: &str,
    receiving: &str,
) -> Result<()> {
    let cap = state.config.max_pending_step_ups_per_pair;
    if cap == 0 {
        return Ok(());
    }
    if is_postgres(txn) {
        txn.execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT pg_advisory_xact_lock(hashtext($1))",
            [format!("{QUEUE_LOCK_NAMESPACE}{requesting}|{receiving}").into()],
        ))
        .await?;
    }
    let pending = step_up::Entity::find()
        .filter(step_up::Column::RequestingTenantId.eq(requesting))
        .filter(step_up::Column::ReceivingTenantId.eq(receiving))
        .filter(step_up::Column::State.eq(State::Pending))
        .filter(step_up::Column::ExpiresAt.gt(state.clock.now_millis()))
        .count(txn)
        .await?;
    if pending < u64::from(cap) {
        return Ok(());
    }
    metrics::counter!("vaultguard_step_up_queue_full_total").increment(1);
    tracing::info!(
        requesting,
        receiving,
        cap,
        "step-up refused: the pair's queue is full"
    );
    Err(Error::ResourceExhausted {
        reason: ErrorReason::StepUpQueueFull,
        message: format!(
            "this tenant already has {cap} step-ups waiting for the receiving tenant's approvers; retry once one is decided"
        ),
        metadata: HashMap::from([
            ("receiving_tenant_id".to_owned(), receiving.to_owned()),
            ("limit".to_owned(), cap.to_string()),
        ]),
    })
}

/// Records the `added` change of a step-up created by RequestDelegation.
pub async fn record_created(
    state: &AppState,
    txn: &DatabaseTransaction,
    step: &step_up::Model,
) -> Result<Change> {
    record_change(
        state,
        txn,
        step,
        Kind::Added,
        State::Pending,
        step.created_at,
    )
    .await
}

/// Records the `removed` change of a step-up the sweeper expired.
pub async fn record_expired(
    state: &AppState,
    txn: &DatabaseTransaction,
    step: &step_up::Model,
    now: Millis,
) -> Result<Change> {
    record_change(state, txn, step, Kind::Removed, State::Expired, now).await
}
