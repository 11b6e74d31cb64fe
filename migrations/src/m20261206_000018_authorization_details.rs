//! RFC 9396 authorization details on delegations: the JSON array judged,
//! shown to approvers and signed into the token. Existing rows get `[]`.

use sea_orm_migration::prelude::*;

use crate::sql;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        sql::run(
            manager,
            "ALTER TABLE delegations ADD COLUMN authorization_details TEXT NOT NULL DEFAULT '[]'",
        )
        .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        sql::run(
            manager,
            "ALTER TABLE delegations DROP COLUMN authorization_details",
        )
        .await
    }
}
