//! Indexes the approval queue the way it is read (issue 23, item 10).
//!
//! - `step_ups_queue (receiving_tenant_id, state, id)` replaces
//!   `(receiving_tenant_id, state, created_at)`: ListPendingStepUps and a
//!   queue watch's snapshot page through a tenant's pending step-ups in id
//!   order (ids are time-ordered), so a page now reads its own rows from the
//!   index instead of every pending step-up of the tenant, sorted.
//! - `step_ups_pair (requesting_tenant_id, receiving_tenant_id, state)`: a
//!   new step-up counts the pending ones of its tenant pair against
//!   `max_pending_step_ups_per_pair`, reading at most that many entries.

use sea_orm_migration::prelude::*;

use crate::sql;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        sql::run(
            manager,
            r#"
            CREATE INDEX step_ups_queue ON step_ups (receiving_tenant_id, state, id);
            CREATE INDEX step_ups_pair ON step_ups (requesting_tenant_id, receiving_tenant_id, state);
            DROP INDEX step_ups_pending
            "#,
        )
        .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        sql::run(
            manager,
            r#"
            CREATE INDEX step_ups_pending ON step_ups (receiving_tenant_id, state, created_at);
            DROP INDEX step_ups_pair;
            DROP INDEX step_ups_queue
            "#,
        )
        .await
    }
}
