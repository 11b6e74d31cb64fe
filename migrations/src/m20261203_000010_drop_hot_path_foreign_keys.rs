//! PostgreSQL: drops the foreign keys that every delegation, signature and
//! audit event paid for, on rows that are never deleted.
//!
//! A foreign key check is a query per referenced row, run by a trigger at
//! the end of the statement, and it takes a `FOR KEY SHARE` lock on that
//! row. The ALLOW path made eleven of them (the delegation's two tenants and
//! its agent; each event's pending row and, when sealed, its chain link),
//! and because every concurrent delegation of a tenant pair locks the same
//! tenant and agent rows, PostgreSQL turned those locks into MultiXacts,
//! written to the rows' pages. Under `scripts/bench.sh` the checks were
//! about a sixth of PostgreSQL's CPU on that path (`AfterTriggerEndQuery`).
//!
//! What they guarded cannot happen: tenants, agents, custody keys and audit
//! events are never deleted (they are suspended, disabled, destroyed by
//! status, or kept forever), and each referencing row is written with ids
//! the server has just read or inserted — a delegation's tenants and agent
//! from the verified caller and the directory, a pending row and a chain
//! link in the statement that inserts or reads their event. The chain
//! itself is checked end to end by `VerifyAuditChain`.
//!
//! SQLite keeps them: it writes one transaction at a time, so they cost it
//! nothing of note, and the SQLite phase of the test suite keeps checking
//! that no code path writes a dangling reference. (SQLite cannot drop a
//! constraint without rebuilding the table, either.)

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DatabaseBackend;

use crate::sql;

#[derive(DeriveMigrationName)]
pub struct Migration;

/// `(table, column, referenced table)` of each dropped key; PostgreSQL names
/// an inline `REFERENCES` constraint `<table>_<column>_fkey`.
const KEYS: [(&str, &str, &str); 6] = [
    ("delegations", "requesting_tenant_id", "tenants"),
    ("delegations", "requesting_agent_id", "agents"),
    ("delegations", "receiving_tenant_id", "tenants"),
    ("signatures", "key_id", "custody_keys"),
    ("audit_pending", "event_row_id", "audit_events"),
    ("audit_chain", "event_row_id", "audit_events"),
];

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() != DatabaseBackend::Postgres {
            return Ok(());
        }
        let ddl = KEYS
            .iter()
            .map(|(table, column, _)| {
                format!("ALTER TABLE {table} DROP CONSTRAINT IF EXISTS {table}_{column}_fkey")
            })
            .collect::<Vec<_>>()
            .join(";\n");
        sql::run(manager, &ddl).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() != DatabaseBackend::Postgres {
            return Ok(());
        }
        let ddl = KEYS
            .iter()
            .map(|(table, column, referenced)| {
                format!(
                    "ALTER TABLE {table} ADD CONSTRAINT {table}_{column}_fkey \
                     FOREIGN KEY ({column}) REFERENCES {referenced}(id)"
                )
            })
            .collect::<Vec<_>>()
            .join(";\n");
        sql::run(manager, &ddl).await
    }
}
