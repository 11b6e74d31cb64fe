//! Whether a requester is frozen (the kill switch, `kill_switch.rs`): the
//! refusals RequestDelegation, Sign and ExchangeToken make before judging,
//! and the re-read inside the transactions that store what they decided.
//! Below both the asking paths and the freeze itself.

use std::collections::HashMap;

use sea_orm::{ConnectionTrait, Statement};
use vaultguard_proto::v1::ErrorReason;

use crate::audit;
use crate::error::{Error, Result};
use crate::state::AppState;

/// The refusal of a frozen agent's request.
pub fn agent_frozen(agent_id: &str) -> Error {
    Error::PermissionDenied {
        reason: ErrorReason::AgentFrozen,
        message: "the agent is frozen".to_owned(),
        metadata: HashMap::from([("agent_id".to_owned(), agent_id.to_owned())]),
    }
}

/// The refusal of a request from a tenant whose outbound traffic is frozen.
pub fn tenant_traffic_frozen(tenant_id: &str) -> Error {
    Error::PermissionDenied {
        reason: ErrorReason::TenantTrafficFrozen,
        message: "the tenant's outbound traffic is frozen".to_owned(),
        metadata: HashMap::from([("tenant_id".to_owned(), tenant_id.to_owned())]),
    }
}

/// Refuses a request of `agent_id` (of `tenant_id`) while either is frozen,
/// from the rows the directory holds (kept current on every replica). The
/// statement or transaction that stores the request's rows checks again
/// (see the module docs).
pub async fn check_requester(state: &AppState, tenant_id: &str, agent_id: &str) -> Result<()> {
    let tenant_frozen = state
        .directory
        .tenant(&state.db, tenant_id)
        .await?
        .is_some_and(|t| t.traffic_frozen_at.is_some());
    if tenant_frozen {
        metrics::counter!("vaultguard_frozen_refusals_total", "scope" => "tenant").increment(1);
        return Err(tenant_traffic_frozen(tenant_id));
    }
    let agent_frozen_now = state
        .directory
        .agent(&state.db, agent_id)
        .await?
        .is_some_and(|a| a.frozen_at.is_some());
    if agent_frozen_now {
        metrics::counter!("vaultguard_frozen_refusals_total", "scope" => "agent").increment(1);
        return Err(agent_frozen(agent_id));
    }
    Ok(())
}

/// Refuses inside `txn` (after the caller inserted its rows there) when the
/// requester is frozen as the database says now: the caller drops `txn`.
pub(crate) async fn check_not_frozen_in<C: ConnectionTrait>(
    txn: &C,
    tenant_id: &str,
    agent_id: &str,
) -> Result<()> {
    match frozen_now(txn, tenant_id, agent_id).await? {
        Some(err) => Err(err),
        None => Ok(()),
    }
}

/// The refusal a frozen requester gets, read from the database (not the
/// directory); `None` when neither is frozen.
pub(crate) async fn frozen_now<C: ConnectionTrait>(
    db: &C,
    tenant_id: &str,
    agent_id: &str,
) -> Result<Option<Error>> {
    let backend = db.get_database_backend();
    let row = db
        .query_one_raw(Statement::from_sql_and_values(
            backend,
            audit::placeholders(
                backend,
                "SELECT \
                   (SELECT COUNT(*) FROM tenants WHERE id = ? AND traffic_frozen_at IS NOT NULL) AS tenant_frozen, \
                   (SELECT COUNT(*) FROM agents WHERE id = ? AND frozen_at IS NOT NULL) AS agent_frozen",
            ),
            [tenant_id.into(), agent_id.into()],
        ))
        .await?;
    let Some(row) = row else { return Ok(None) };
    if row.try_get::<i64>("", "tenant_frozen")? > 0 {
        return Ok(Some(tenant_traffic_frozen(tenant_id)));
    }
    if row.try_get::<i64>("", "agent_frozen")? > 0 {
        return Ok(Some(agent_frozen(agent_id)));
    }
    Ok(None)
}
