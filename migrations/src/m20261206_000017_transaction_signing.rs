//! Issue 26, transaction-aware signing: `custody_keys.disable_digest_signing`.
//!
//! A key with it set refuses caller-computed digests, so a policy written
//! over decoded Ethereum transactions cannot be bypassed by asking for the
//! transaction's hash as a digest. Existing keys keep signing digests.

use sea_orm_migration::prelude::*;

use crate::sql;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        sql::run(
            manager,
            "ALTER TABLE custody_keys ADD COLUMN disable_digest_signing BOOLEAN NOT NULL \
             DEFAULT FALSE",
        )
        .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        sql::run(
            manager,
            "ALTER TABLE custody_keys DROP COLUMN disable_digest_signing",
        )
        .await
    }
}
