//! Runs portable DDL on either backend.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DatabaseBackend;

/// Executes `;`-separated statements after substituting `{BYTES}` (binary
/// column) and `{SERIAL}` (auto-increment 64-bit primary key) for the backend.
pub async fn run(manager: &SchemaManager<'_>, ddl: &str) -> Result<(), DbErr> {
    let backend = manager.get_database_backend();
    let (bytes, serial) = match backend {
        DatabaseBackend::Postgres => ("BYTEA", "BIGSERIAL PRIMARY KEY"),
        _ => ("BLOB", "INTEGER PRIMARY KEY AUTOINCREMENT"),
    };
    let ddl = ddl.replace("{BYTES}", bytes).replace("{SERIAL}", serial);
    for statement in ddl.split(';').map(str::trim).filter(|s| !s.is_empty()) {
        manager
            .get_connection()
            .execute_unprepared(statement)
            .await?;
    }
    Ok(())
}

/// Executes one statement verbatim (used for triggers, whose bodies contain
/// semicolons).
pub async fn run_verbatim(manager: &SchemaManager<'_>, statement: &str) -> Result<(), DbErr> {
    manager
        .get_connection()
        .execute_unprepared(statement)
        .await?;
    Ok(())
}

/// Drops tables in the order given.
pub async fn drop_tables(manager: &SchemaManager<'_>, tables: &[&str]) -> Result<(), DbErr> {
    for table in tables {
        manager
            .get_connection()
            .execute_unprepared(&format!("DROP TABLE IF EXISTS {table}"))
            .await?;
    }
    Ok(())
}
