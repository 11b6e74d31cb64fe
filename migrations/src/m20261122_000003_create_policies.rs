//! Per-tenant policy rules, inbound and outbound.

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
            CREATE TABLE policy_rules (
                id TEXT PRIMARY KEY,
                tenant_id TEXT NOT NULL REFERENCES tenants(id),
                direction TEXT NOT NULL,
                action_pattern TEXT NOT NULL,
                counterpart_tenant_id TEXT,
                agent_id TEXT,
                conditions TEXT NOT NULL,
                time_window TEXT,
                effect TEXT NOT NULL,
                max_ttl_seconds BIGINT NOT NULL,
                priority INTEGER NOT NULL,
                approvals_required INTEGER NOT NULL,
                description TEXT NOT NULL,
                version BIGINT NOT NULL,
                created_at BIGINT NOT NULL,
                updated_at BIGINT NOT NULL
            );
            CREATE INDEX policy_rules_tenant ON policy_rules (tenant_id, direction)
            "#,
        )
        .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        sql::drop_tables(manager, &["policy_rules"]).await
    }
}
