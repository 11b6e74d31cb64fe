//! Filtered audit listings that read a page, not the log (issue 28).
//!
//! ListAuditEvents pages through a tenant's sealed events by chain sequence.
//! A filter on the event's time, type or actor used to be applied to the
//! joined `audit_events` row, so a filtered page walked the chain until it
//! had found a page of matches: 262 ms at 130,000 events for a rare type,
//! about 20 s at 10 million. The chain row now carries a copy of those three
//! fields, written by the sealer with the link, and each has an index
//! ending in the sequence, so a page of one type or one actor is a range of
//! one index read in sequence order, and a time window a range of the time
//! index. The copies are not hashed (the event's own fields are);
//! VerifyAuditChain checks that each copy equals its event, so an edited
//! copy cannot hide an event from a filtered listing unnoticed.
//!
//! Rows sealed before this migration are filled in from their events; the
//! append-only guard on `audit_chain` is lifted for that one statement and
//! put back in the same transaction (PostgreSQL) or right after (SQLite).

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DatabaseBackend;

use crate::sql;

#[derive(DeriveMigrationName)]
pub struct Migration;

const BACKFILL: &str = "UPDATE audit_chain SET \
     occurred_at = (SELECT e.occurred_at FROM audit_events e WHERE e.id = audit_chain.event_row_id), \
     event_type = (SELECT e.event_type FROM audit_events e WHERE e.id = audit_chain.event_row_id), \
     actor_subject = (SELECT e.actor_subject FROM audit_events e WHERE e.id = audit_chain.event_row_id) \
     WHERE EXISTS (SELECT 1 FROM audit_events e WHERE e.id = audit_chain.event_row_id)";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        sql::run(
            manager,
            r#"
            ALTER TABLE audit_chain ADD COLUMN occurred_at BIGINT NOT NULL DEFAULT 0;
            ALTER TABLE audit_chain ADD COLUMN event_type TEXT NOT NULL DEFAULT '';
            ALTER TABLE audit_chain ADD COLUMN actor_subject TEXT NOT NULL DEFAULT ''
            "#,
        )
        .await?;
        match manager.get_database_backend() {
            DatabaseBackend::Postgres => {
                sql::run_verbatim(
                    manager,
                    "ALTER TABLE audit_chain DISABLE TRIGGER audit_chain_append_only",
                )
                .await?;
                sql::run_verbatim(manager, BACKFILL).await?;
                sql::run_verbatim(
                    manager,
                    "ALTER TABLE audit_chain ENABLE TRIGGER audit_chain_append_only",
                )
                .await?;
            }
            _ => {
                sql::run_verbatim(manager, "DROP TRIGGER audit_chain_no_update").await?;
                sql::run_verbatim(manager, BACKFILL).await?;
                sql::run_verbatim(
                    manager,
                    "CREATE TRIGGER audit_chain_no_update BEFORE UPDATE ON audit_chain \
                     BEGIN SELECT RAISE(ABORT, 'audit log is append-only: UPDATE on audit_chain refused'); END",
                )
                .await?;
            }
        }
        sql::run(
            manager,
            r#"
            CREATE INDEX audit_chain_type ON audit_chain (tenant_id, event_type, seq);
            CREATE INDEX audit_chain_actor ON audit_chain (tenant_id, actor_subject, seq);
            CREATE INDEX audit_chain_time ON audit_chain (tenant_id, occurred_at, seq)
            "#,
        )
        .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        sql::run(
            manager,
            r#"
            DROP INDEX audit_chain_time;
            DROP INDEX audit_chain_actor;
            DROP INDEX audit_chain_type;
            ALTER TABLE audit_chain DROP COLUMN actor_subject;
            ALTER TABLE audit_chain DROP COLUMN event_type;
            ALTER TABLE audit_chain DROP COLUMN occurred_at
            "#,
        )
        .await
    }
}
