//! Issue 26, the kill switch: an agent can be frozen (FreezeAgent), and a
//! tenant's outbound traffic too (FreezeTenantTraffic). A frozen requester
//! can neither ask for a delegation nor sign nor exchange; the freeze ends
//! what it held. Each side keeps when it was frozen (NULL: not frozen), why,
//! and who froze it (the actor as JSON).
//!
//! The hot paths' inserts (a delegation, a signature) check these columns
//! in the statement that stores the row, by the primary keys of `agents`
//! and `tenants`: no new index is needed.

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
            ALTER TABLE agents ADD COLUMN frozen_at BIGINT;
            ALTER TABLE agents ADD COLUMN freeze_reason TEXT NOT NULL DEFAULT '';
            ALTER TABLE agents ADD COLUMN frozen_by TEXT;
            ALTER TABLE tenants ADD COLUMN traffic_frozen_at BIGINT;
            ALTER TABLE tenants ADD COLUMN traffic_freeze_reason TEXT NOT NULL DEFAULT '';
            ALTER TABLE tenants ADD COLUMN traffic_frozen_by TEXT
            "#,
        )
        .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        sql::run(
            manager,
            r#"
            ALTER TABLE tenants DROP COLUMN traffic_frozen_by;
            ALTER TABLE tenants DROP COLUMN traffic_freeze_reason;
            ALTER TABLE tenants DROP COLUMN traffic_frozen_at;
            ALTER TABLE agents DROP COLUMN frozen_by;
            ALTER TABLE agents DROP COLUMN freeze_reason;
            ALTER TABLE agents DROP COLUMN frozen_at
            "#,
        )
        .await
    }
}
