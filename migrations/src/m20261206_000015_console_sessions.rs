//! Issue 25: the console's sign-in state.
//!
//! - `console_sessions`: a signed-in person's session. The cookie holds a
//!   random secret; the row is keyed by its SHA-256, so a read of the table
//!   yields nothing that signs anyone in.
//! - `console_links`: one-time sign-in links printed by
//!   `vaultguard console-link`, keyed by the SHA-256 of their secret, used at
//!   most once (`used_at`).
//! - `console_logins`: OIDC sign-ins in progress, keyed by the SHA-256 of
//!   their `state`, with the PKCE verifier (sealed) and the nonce the ID
//!   token must carry; taken once by the callback.

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
            CREATE TABLE console_sessions (
                id TEXT PRIMARY KEY NOT NULL,
                tenant_id TEXT NOT NULL,
                subject TEXT NOT NULL,
                roles TEXT NOT NULL,
                issuer TEXT NOT NULL,
                organization_id TEXT NOT NULL,
                created_at BIGINT NOT NULL,
                expires_at BIGINT NOT NULL
            );
            CREATE INDEX console_sessions_expires ON console_sessions (expires_at);
            CREATE TABLE console_links (
                id TEXT PRIMARY KEY NOT NULL,
                tenant_id TEXT NOT NULL,
                subject TEXT NOT NULL,
                roles TEXT NOT NULL,
                created_at BIGINT NOT NULL,
                expires_at BIGINT NOT NULL,
                used_at BIGINT
            );
            CREATE INDEX console_links_expires ON console_links (expires_at);
            CREATE TABLE console_logins (
                id TEXT PRIMARY KEY NOT NULL,
                issuer TEXT NOT NULL,
                verifier_ciphertext {BYTES} NOT NULL,
                nonce TEXT NOT NULL,
                created_at BIGINT NOT NULL,
                expires_at BIGINT NOT NULL
            );
            CREATE INDEX console_logins_expires ON console_logins (expires_at)
            "#,
        )
        .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        sql::drop_tables(
            manager,
            &["console_logins", "console_links", "console_sessions"],
        )
        .await
    }
}
