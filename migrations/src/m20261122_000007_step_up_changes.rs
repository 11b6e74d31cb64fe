//! The approval queue's change feed and webhook delivery state.
//!
//! `step_up_changes` is written in the same transaction as every change to a
//! step-up (added to a tenant's queue, updated by a partial approval,
//! removed by approval, denial or expiry). Its ids order the changes; they
//! are the cursors of `WatchPendingStepUps` and the delivery position of the
//! tenant's approval webhook, which therefore never misses a committed
//! change and needs no separate outbox.

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
            CREATE TABLE step_up_changes (
                id {SERIAL},
                tenant_id TEXT NOT NULL,
                step_up_id TEXT NOT NULL,
                delegation_id TEXT NOT NULL,
                kind TEXT NOT NULL,
                state TEXT NOT NULL,
                created_at BIGINT NOT NULL
            );
            CREATE INDEX step_up_changes_tenant ON step_up_changes (tenant_id, id);
            ALTER TABLE step_ups ADD COLUMN ended_at BIGINT;
            ALTER TABLE step_ups ADD COLUMN denied_by TEXT;
            ALTER TABLE step_ups ADD COLUMN deny_reason TEXT;
            ALTER TABLE step_up_approvals ADD COLUMN approver TEXT NOT NULL DEFAULT '{}';
            ALTER TABLE tenant_webhooks ADD COLUMN delivered_change_id BIGINT NOT NULL DEFAULT 0;
            ALTER TABLE tenant_webhooks ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;
            ALTER TABLE tenant_webhooks ADD COLUMN next_attempt_at BIGINT NOT NULL DEFAULT 0;
            ALTER TABLE tenant_webhooks ADD COLUMN last_success_at BIGINT;
            ALTER TABLE tenant_webhooks ADD COLUMN last_failure_at BIGINT;
            ALTER TABLE tenant_webhooks ADD COLUMN last_failure_reason TEXT
            "#,
        )
        .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        sql::run(
            manager,
            r#"
            ALTER TABLE tenant_webhooks DROP COLUMN last_failure_reason;
            ALTER TABLE tenant_webhooks DROP COLUMN last_failure_at;
            ALTER TABLE tenant_webhooks DROP COLUMN last_success_at;
            ALTER TABLE tenant_webhooks DROP COLUMN next_attempt_at;
            ALTER TABLE tenant_webhooks DROP COLUMN attempts;
            ALTER TABLE tenant_webhooks DROP COLUMN delivered_change_id;
            ALTER TABLE step_up_approvals DROP COLUMN approver;
            ALTER TABLE step_ups DROP COLUMN deny_reason;
            ALTER TABLE step_ups DROP COLUMN denied_by;
            ALTER TABLE step_ups DROP COLUMN ended_at;
            DROP TABLE step_up_changes
            "#,
        )
        .await
    }
}
