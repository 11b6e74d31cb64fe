//! What a policy rule grants besides its effect: scope patterns, default
//! scopes and resource patterns, as one JSON object (like `conditions`).
//! Existing rules get `{}`: they grant no scope and no resource until an
//! operator chooses otherwise (`vaultguard grant-legacy-scopes`, README
//! "Upgrading to scoped rules").

use sea_orm_migration::prelude::*;

use crate::sql;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        sql::run(
            manager,
            "ALTER TABLE policy_rules ADD COLUMN grants TEXT NOT NULL DEFAULT '{}'",
        )
        .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        sql::run(manager, "ALTER TABLE policy_rules DROP COLUMN grants").await
    }
}
