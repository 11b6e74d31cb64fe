//! The domain layer: validation, authorization within a tenant, state
//! changes and their audit events, each in one transaction. No tonic types
//! here; the gRPC adapters in `crate::grpc` translate.

pub mod agents;
pub mod audit_log;
pub mod authorization_details;
pub mod budgets;
pub mod connections;
pub mod console_sessions;
pub mod delegations;
pub mod frozen;
pub mod kill_switch;
pub mod page;
pub mod policies;
pub mod policy_cache;
pub mod policy_engine;
pub mod provider_reads;
pub mod providers;
pub mod signing_keys;
pub mod step_up_queue;
pub mod step_ups;
pub mod tenants;
pub mod tokens;
pub mod vault_settings;
pub mod webhooks;

use serde_json::{Value, json};
use vaultguard_proto::v1 as pb;

use crate::error::{Error, Result};

/// Serialises a value stored in a JSON text column.
pub fn to_json<T: serde::Serialize>(value: &T) -> Result<String> {
    serde_json::to_string(value).map_err(Error::internal)
}

/// An actor as stored in `*_by` columns.
pub fn actor_json(actor: &pb::Actor) -> Result<String> {
    to_json(&json!({"kind": actor.kind, "subject": actor.subject, "tenant_id": actor.tenant_id}))
}

/// Parses an actor stored by [`actor_json`].
pub fn parse_actor(stored: &str) -> Option<pb::Actor> {
    let value: Value = serde_json::from_str(stored).ok()?;
    Some(pb::Actor {
        kind: i32::try_from(value.get("kind")?.as_i64()?).ok()?,
        subject: value.get("subject")?.as_str()?.to_owned(),
        tenant_id: value.get("tenant_id")?.as_str()?.to_owned(),
    })
}

/// Inserts a new row and its audit event in one transaction. A unique
/// violation (a taken name) answers ALREADY_EXISTS with `taken()`.
pub(crate) async fn insert_audited<A>(
    state: &crate::state::AppState,
    active: A,
    taken: impl FnOnce() -> String,
    event: crate::audit::NewEvent,
) -> Result<()>
where
    A: sea_orm::ActiveModelTrait + Send,
{
    use sea_orm::EntityTrait;
    let txn = crate::store::begin(&state.db).await?;
    if let Err(err) = <A::Entity as EntityTrait>::insert(active).exec(&txn).await {
        return Err(if crate::error::is_unique_violation(&err) {
            Error::already_exists(taken())
        } else {
            err.into()
        });
    }
    crate::audit::append(&txn, state.clock.as_ref(), event).await?;
    txn.commit().await?;
    state.audit_committed();
    Ok(())
}
