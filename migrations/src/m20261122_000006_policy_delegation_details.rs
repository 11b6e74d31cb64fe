//! Who last changed a rule or a tenant's policy settings, the step-up of a
//! delegation, and the indexes that delegation listings page over (newest
//! id first, per party).

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
            ALTER TABLE policy_rules ADD COLUMN updated_by TEXT NOT NULL DEFAULT '{}';
            ALTER TABLE tenants ADD COLUMN policy_updated_at BIGINT;
            ALTER TABLE tenants ADD COLUMN policy_updated_by TEXT;
            ALTER TABLE delegations ADD COLUMN step_up_id TEXT;
            CREATE INDEX delegations_requesting_id ON delegations (requesting_tenant_id, id);
            CREATE INDEX delegations_receiving_id ON delegations (receiving_tenant_id, id)
            "#,
        )
        .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        sql::run(
            manager,
            r#"
            DROP INDEX delegations_receiving_id;
            DROP INDEX delegations_requesting_id;
            ALTER TABLE delegations DROP COLUMN step_up_id;
            ALTER TABLE tenants DROP COLUMN policy_updated_by;
            ALTER TABLE tenants DROP COLUMN policy_updated_at;
            ALTER TABLE policy_rules DROP COLUMN updated_by
            "#,
        )
        .await
    }
}
