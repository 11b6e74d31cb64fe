//! Drops the `(tenant, created_at)` indexes of delegations. Listings page
//! over `(tenant, id)` (ids are time-ordered) and no query reads the
//! creation-time ones, while every delegation written paid for both: on the
//! ALLOW path, two of its seven index insertions.

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
            DROP INDEX delegations_requesting;
            DROP INDEX delegations_receiving
            "#,
        )
        .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        sql::run(
            manager,
            r#"
            CREATE INDEX delegations_requesting ON delegations (requesting_tenant_id, created_at);
            CREATE INDEX delegations_receiving ON delegations (receiving_tenant_id, created_at)
            "#,
        )
        .await
    }
}
