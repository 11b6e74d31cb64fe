//! The append-only audit log.
//!
//! `audit_events` rows are inserted in the same transaction as the change they
//! record, without any per-tenant lock. A sealer later links them into the
//! per-tenant hash chain in commit order by inserting `audit_chain` rows
//! (gapless `seq`, `prev_hash`, `hash`) and moving `audit_heads`;
//! `audit_pending` is the sealer's work queue (one row per unsealed event). Both
//! `audit_events` and `audit_chain` refuse UPDATE and DELETE in the database
//! itself, on both backends.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DatabaseBackend;

use crate::sql;

#[derive(DeriveMigrationName)]
pub struct Migration;

const APPEND_ONLY_TABLES: [&str; 2] = ["audit_events", "audit_chain"];

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        sql::run(
            manager,
            r#"
            CREATE TABLE audit_events (
                id {SERIAL},
                event_id TEXT NOT NULL UNIQUE,
                tenant_id TEXT NOT NULL,
                occurred_at BIGINT NOT NULL,
                actor_kind TEXT NOT NULL,
                actor_subject TEXT NOT NULL,
                actor_tenant_id TEXT NOT NULL,
                event_type TEXT NOT NULL,
                subject_ids TEXT NOT NULL,
                outcome TEXT NOT NULL,
                request_id TEXT NOT NULL,
                details TEXT NOT NULL
            );
            CREATE INDEX audit_events_tenant_time ON audit_events (tenant_id, occurred_at);
            CREATE TABLE audit_chain (
                tenant_id TEXT NOT NULL,
                seq BIGINT NOT NULL,
                event_row_id BIGINT NOT NULL UNIQUE REFERENCES audit_events(id),
                prev_hash TEXT NOT NULL,
                hash TEXT NOT NULL,
                sealed_at BIGINT NOT NULL,
                PRIMARY KEY (tenant_id, seq)
            );
            CREATE TABLE audit_pending (
                event_row_id BIGINT PRIMARY KEY REFERENCES audit_events(id),
                tenant_id TEXT NOT NULL
            );
            CREATE INDEX audit_pending_tenant ON audit_pending (tenant_id, event_row_id);
            CREATE TABLE audit_heads (
                tenant_id TEXT PRIMARY KEY,
                seq BIGINT NOT NULL,
                hash TEXT NOT NULL,
                updated_at BIGINT NOT NULL
            )
            "#,
        )
        .await?;

        match manager.get_database_backend() {
            DatabaseBackend::Postgres => {
                sql::run_verbatim(
                    manager,
                    r#"
                    CREATE FUNCTION vaultguard_refuse_audit_change() RETURNS trigger
                    LANGUAGE plpgsql AS $$
                    BEGIN
                        RAISE EXCEPTION 'audit log is append-only: % on % refused', TG_OP, TG_TABLE_NAME
                            USING ERRCODE = 'insufficient_privilege';
                    END;
                    $$
                    "#,
                )
                .await?;
                for table in APPEND_ONLY_TABLES {
                    sql::run_verbatim(
                        manager,
                        &format!(
                            "CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON {table} \
                             FOR EACH STATEMENT EXECUTE FUNCTION vaultguard_refuse_audit_change()"
                        ),
                    )
                    .await?;
                }
            }
            _ => {
                // `INSERT OR REPLACE` deletes the conflicting row without firing
                // DELETE triggers (recursive_triggers is off by default), so an
                // insert that would replace an existing row is refused too.
                let replace_guards = [
                    ("audit_events", "id = NEW.id OR event_id = NEW.event_id"),
                    (
                        "audit_chain",
                        "(tenant_id = NEW.tenant_id AND seq = NEW.seq) OR event_row_id = NEW.event_row_id",
                    ),
                ];
                for (table, conflict) in replace_guards {
                    sql::run_verbatim(
                        manager,
                        &format!(
                            "CREATE TRIGGER {table}_no_replace BEFORE INSERT ON {table} \
                             WHEN EXISTS (SELECT 1 FROM {table} WHERE {conflict}) \
                             BEGIN SELECT RAISE(ABORT, 'audit log is append-only: REPLACE on {table} refused'); END"
                        ),
                    )
                    .await?;
                }
                for table in APPEND_ONLY_TABLES {
                    for operation in ["UPDATE", "DELETE"] {
                        let lower = operation.to_lowercase();
                        sql::run_verbatim(
                            manager,
                            &format!(
                                "CREATE TRIGGER {table}_no_{lower} BEFORE {operation} ON {table} \
                                 BEGIN SELECT RAISE(ABORT, 'audit log is append-only: {operation} on {table} refused'); END"
                            ),
                        )
                        .await?;
                    }
                }
            }
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        sql::drop_tables(
            manager,
            &[
                "audit_heads",
                "audit_pending",
                "audit_chain",
                "audit_events",
            ],
        )
        .await?;
        if manager.get_database_backend() == DatabaseBackend::Postgres {
            sql::run_verbatim(
                manager,
                "DROP FUNCTION IF EXISTS vaultguard_refuse_audit_change()",
            )
            .await?;
        }
        Ok(())
    }
}
