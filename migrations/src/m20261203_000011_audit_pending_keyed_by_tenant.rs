//! Keys `audit_pending` by `(tenant_id, event_row_id)`, its only index.
//!
//! Every audited write inserts a pending row and the sealer deletes it
//! moments later, and each of those touched two indexes: the primary key on
//! `event_row_id` and `(tenant_id, event_row_id)`. Every read the sealer
//! makes goes by tenant (which tenants have pending rows, a tenant's oldest
//! ones, the ones it just sealed), so the second index alone serves them
//! all; as the primary key it also keeps the table one index lighter. (A
//! plan made on a young database also preferred the first index with a
//! filter on the tenant, which reads every tenant's pending rows.)
//!
//! SQLite cannot change a primary key in place, so there the table is
//! rebuilt (it holds only the events not sealed yet).

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DatabaseBackend;

use crate::sql;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() == DatabaseBackend::Postgres {
            return sql::run(
                manager,
                r#"
                ALTER TABLE audit_pending DROP CONSTRAINT audit_pending_pkey;
                DROP INDEX audit_pending_tenant;
                ALTER TABLE audit_pending ADD PRIMARY KEY (tenant_id, event_row_id)
                "#,
            )
            .await;
        }
        sql::run(
            manager,
            r#"
            CREATE TABLE audit_pending_next (
                event_row_id BIGINT NOT NULL REFERENCES audit_events(id),
                tenant_id TEXT NOT NULL,
                PRIMARY KEY (tenant_id, event_row_id)
            );
            INSERT INTO audit_pending_next (event_row_id, tenant_id)
                SELECT event_row_id, tenant_id FROM audit_pending;
            DROP TABLE audit_pending;
            ALTER TABLE audit_pending_next RENAME TO audit_pending
            "#,
        )
        .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() == DatabaseBackend::Postgres {
            return sql::run(
                manager,
                r#"
                ALTER TABLE audit_pending DROP CONSTRAINT audit_pending_pkey;
                ALTER TABLE audit_pending ADD PRIMARY KEY (event_row_id);
                CREATE INDEX audit_pending_tenant ON audit_pending (tenant_id, event_row_id)
                "#,
            )
            .await;
        }
        sql::run(
            manager,
            r#"
            CREATE TABLE audit_pending_previous (
                event_row_id BIGINT PRIMARY KEY REFERENCES audit_events(id),
                tenant_id TEXT NOT NULL
            );
            INSERT INTO audit_pending_previous (event_row_id, tenant_id)
                SELECT event_row_id, tenant_id FROM audit_pending;
            DROP TABLE audit_pending;
            ALTER TABLE audit_pending_previous RENAME TO audit_pending;
            CREATE INDEX audit_pending_tenant ON audit_pending (tenant_id, event_row_id)
            "#,
        )
        .await
    }
}
