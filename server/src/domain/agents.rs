//! Agents: machine clients of a tenant, authenticated by client credentials.
//! Every operation is scoped to the calling admin's tenant; an agent id of
//! another tenant is NOT_FOUND.

use sea_orm::{
    ActiveModelTrait, ActiveValue::Set, ColumnTrait, EntityTrait, QueryFilter, QueryOrder,
    QuerySelect,
};
use serde_json::json;
use vaultguard_proto::v1::AgentStatus;

use crate::audit::{self, Outcome};
use crate::auth::CallContext;
use crate::crypto::random_token;
use crate::directory::Entry;
use crate::domain::page;
use crate::error::{Error, Result, Violations, is_unique_violation};
use crate::ids::{IdKind, check_id, new_id};
use crate::state::AppState;
use crate::store::entities::agent;
use crate::store::lifecycle::Transitions;
use crate::validate;

/// The prefix of client secrets, so that leaked secrets are recognisable by
/// secret scanners.
pub const SECRET_PREFIX: &str = "vgs_";

/// Generates a client secret: 256 random bits.
fn new_secret() -> Result<String> {
    Ok(format!("{SECRET_PREFIX}{}", random_token(32)?))
}

impl From<agent::Status> for AgentStatus {
    fn from(status: agent::Status) -> Self {
        match status {
            agent::Status::Active => Self::Active,
            agent::Status::Disabled => Self::Disabled,
        }
    }
}

/// The stored status a ListAgents filter names (none: any).
fn stored_status(status: AgentStatus) -> Option<agent::Status> {
    match status {
        AgentStatus::Active => Some(agent::Status::Active),
        AgentStatus::Disabled => Some(agent::Status::Disabled),
        AgentStatus::Unspecified => None,
    }
}

async fn find_own(state: &AppState, tenant_id: &str, agent_id: &str) -> Result<agent::Model> {
    check_id("agent_id", agent_id, IdKind::Agent)?;
    agent::Entity::find_by_id(agent_id.to_owned())
        .filter(agent::Column::TenantId.eq(tenant_id))
        .one(&state.db)
        .await?
        .ok_or(Error::NotFound("agent"))
}

/// Creates an agent; returns it with its secret, which is not stored.
pub async fn create(
    state: &AppState,
    ctx: &CallContext,
    name: &str,
    description: &str,
) -> Result<(agent::Model, String)> {
    let tenant_id = ctx.principal.tenant_id()?.to_owned();
    let mut violations = Violations::new();
    violations.check(validate::slug("name", name));
    violations.check(validate::optional_text("description", description, 500));
    violations.finish()?;

    let secret = new_secret()?;
    let now = state.clock.now_millis();
    let id = new_id(IdKind::Agent);
    let txn = crate::store::begin(&state.db).await?;
    let inserted = agent::ActiveModel {
        id: Set(id.clone()),
        tenant_id: Set(tenant_id.clone()),
        name: Set(name.to_owned()),
        description: Set(description.to_owned()),
        status: Set(agent::Status::Active),
        secret_digest: Set(state.master.secret_digest(&secret)),
        secret_rotated_at: Set(now),
        created_at: Set(now),
        updated_at: Set(now),
        frozen_at: Set(None),
        freeze_reason: Set(String::new()),
        frozen_by: Set(None),
    }
    .insert(&txn)
    .await;
    let model = match inserted {
        Ok(model) => model,
        Err(err) if is_unique_violation(&err) => {
            return Err(Error::already_exists(
                "an agent with this name exists in the tenant",
            ));
        }
        Err(err) => return Err(err.into()),
    };
    audit::append(
        &txn,
        state.clock.as_ref(),
        ctx.audit().event(
            &tenant_id,
            "agent.created",
            vec![id],
            Outcome::Success,
            json!({"name": name}),
        ),
    )
    .await?;
    txn.commit().await?;
    state.audit_committed();
    Ok((model, secret))
}

/// Returns one of the caller's tenant's agents.
pub async fn get(state: &AppState, ctx: &CallContext, agent_id: &str) -> Result<agent::Model> {
    find_own(state, ctx.principal.tenant_id()?, agent_id).await
}

/// Lists the caller's tenant's agents in creation order.
pub async fn list(
    state: &AppState,
    ctx: &CallContext,
    status: i32,
    page_size: u32,
    page_token: &str,
) -> Result<(Vec<agent::Model>, String)> {
    let tenant_id = ctx.principal.tenant_id()?.to_owned();
    let mut violations = Violations::new();
    let size = violations.take(validate::page_size("page.page_size", page_size));
    let status = violations.take(validate::enum_value::<AgentStatus>("status", status, true));
    violations.finish()?;
    let (size, status) = (size.unwrap_or(50), status.flatten());
    let scope = format!("agents|{tenant_id}|{status:?}");
    let after = page::decode("page.page_token", &scope, page_token)?;
    let mut query = agent::Entity::find()
        .filter(agent::Column::TenantId.eq(tenant_id))
        .order_by_asc(agent::Column::Id)
        .limit(size + 1);
    if let Some(after) = after {
        query = query.filter(agent::Column::Id.gt(after));
    }
    if let Some(stored) = status.and_then(stored_status) {
        query = query.filter(agent::Column::Status.eq(stored));
    }
    let rows = query.all(&state.db).await?;
    Ok(page::finish(rows, size, &scope, |row| row.id.clone()))
}

/// Disables (`disable = true`) or enables an agent, once: a second call
/// answers FAILED_PRECONDITION.
pub async fn set_disabled(
    state: &AppState,
    ctx: &CallContext,
    agent_id: &str,
    disable: bool,
) -> Result<agent::Model> {
    let tenant_id = ctx.principal.tenant_id()?.to_owned();
    let current = find_own(state, &tenant_id, agent_id).await?;
    let (to, event_type) = if disable {
        (agent::Status::Disabled, "agent.disabled")
    } else {
        (agent::Status::Active, "agent.enabled")
    };
    let txn = crate::store::begin(&state.db).await?;
    let updated = agent::Entity::update_many()
        .into_state(to)
        .col_expr(
            agent::Column::UpdatedAt,
            sea_orm::sea_query::Expr::value(state.clock.now_millis()),
        )
        .filter(agent::Column::Id.eq(current.id.clone()))
        .filter(agent::Column::TenantId.eq(tenant_id.clone()))
        .exec(&txn)
        .await?;
    if updated.rows_affected == 0 {
        return Err(Error::invalid_state(
            format!("agent is already {to}"),
            to.as_str(),
        ));
    }
    audit::append(
        &txn,
        state.clock.as_ref(),
        ctx.audit().event(
            &tenant_id,
            event_type,
            vec![current.id.clone()],
            Outcome::Success,
            json!({}),
        ),
    )
    .await?;
    let changed = [Entry::Agent(current.id.clone())];
    crate::directory::announce(&txn, &changed[0]).await?;
    txn.commit().await?;
    state.audit_committed();
    state.directory_changed(&changed);
    find_own(state, &tenant_id, agent_id).await
}

/// Replaces an agent's secret; returns the agent and the new secret.
pub async fn rotate_secret(
    state: &AppState,
    ctx: &CallContext,
    agent_id: &str,
) -> Result<(agent::Model, String)> {
    let tenant_id = ctx.principal.tenant_id()?.to_owned();
    let current = find_own(state, &tenant_id, agent_id).await?;
    let secret = new_secret()?;
    let now = state.clock.now_millis();
    let txn = crate::store::begin(&state.db).await?;
    let mut active: agent::ActiveModel = current.into();
    active.secret_digest = Set(state.master.secret_digest(&secret));
    active.secret_rotated_at = Set(now);
    active.updated_at = Set(now);
    let model = active.update(&txn).await?;
    audit::append(
        &txn,
        state.clock.as_ref(),
        ctx.audit().event(
            &tenant_id,
            "agent.secret_rotated",
            vec![model.id.clone()],
            Outcome::Success,
            json!({}),
        ),
    )
    .await?;
    let changed = [Entry::Agent(model.id.clone())];
    crate::directory::announce(&txn, &changed[0]).await?;
    txn.commit().await?;
    state.audit_committed();
    state.directory_changed(&changed);
    Ok((model, secret))
}
