//! Spend budgets: a tenant's limits over rolling windows, and the charges
//! made against them. A charge is made in the same transaction as the
//! delegation or signature it pays for; the budget row is updated first in
//! that transaction, which serialises charges per budget across replicas.

use sea_orm_migration::prelude::*;

use crate::sql;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        sql::run(
            manager,
            "CREATE TABLE budgets (
                id TEXT PRIMARY KEY,
                tenant_id TEXT NOT NULL,
                name TEXT NOT NULL,
                description TEXT NOT NULL DEFAULT '',
                direction TEXT NOT NULL,
                measure TEXT NOT NULL,
                sum_attribute TEXT NOT NULL DEFAULT '',
                sum_detail_type TEXT NOT NULL DEFAULT '',
                sum_detail_path TEXT NOT NULL DEFAULT '',
                currency TEXT NOT NULL DEFAULT '',
                scope_agent_id TEXT NOT NULL DEFAULT '',
                scope_counterpart_tenant_id TEXT NOT NULL DEFAULT '',
                scope_action_pattern TEXT NOT NULL DEFAULT '',
                scope_signing_key_id TEXT NOT NULL DEFAULT '',
                scope_connection_id TEXT NOT NULL DEFAULT '',
                window_seconds BIGINT NOT NULL,
                limit_amount TEXT NOT NULL,
                over_limit TEXT NOT NULL,
                version BIGINT NOT NULL,
                charges BIGINT NOT NULL DEFAULT 0,
                created_at BIGINT NOT NULL,
                updated_at BIGINT NOT NULL
            )",
        )
        .await?;
        sql::run(
            manager,
            "CREATE UNIQUE INDEX budgets_tenant_name ON budgets (tenant_id, name)",
        )
        .await?;
        sql::run(
            manager,
            "CREATE TABLE budget_charges (
                id TEXT PRIMARY KEY,
                budget_id TEXT NOT NULL,
                tenant_id TEXT NOT NULL,
                amount TEXT NOT NULL,
                charged_at BIGINT NOT NULL,
                subject_id TEXT NOT NULL,
                state TEXT NOT NULL,
                hold_expires_at BIGINT
            )",
        )
        .await?;
        sql::run(
            manager,
            "CREATE INDEX budget_charges_window ON budget_charges (budget_id, charged_at)",
        )
        .await?;
        sql::run(
            manager,
            "CREATE INDEX budget_charges_subject ON budget_charges (subject_id)",
        )
        .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        sql::run(manager, "DROP TABLE budget_charges").await?;
        sql::run(manager, "DROP TABLE budgets").await
    }
}
