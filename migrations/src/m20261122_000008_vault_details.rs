//! The vault's columns beyond the first sketch in 000005: who did what and
//! when, the connection's granted scopes and cached-token bookkeeping, the
//! key's description and disablement, and a signature's request hash,
//! scheme and decision (so an idempotent retry can be told apart from a
//! conflicting one).
//!
//! `connections.token_version` is the optimistic-concurrency counter of the
//! stored tokens: every write of a refresh or access token is a conditional
//! UPDATE on it, so two replicas refreshing at once cannot both store a
//! rotated refresh token.

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
            ALTER TABLE oauth_providers ADD COLUMN created_by TEXT NOT NULL DEFAULT '{}';
            ALTER TABLE oauth_states ADD COLUMN return_url TEXT NOT NULL DEFAULT '';
            ALTER TABLE oauth_states ADD COLUMN redirect_uri TEXT NOT NULL DEFAULT '';
            ALTER TABLE connections ADD COLUMN granted_scopes TEXT NOT NULL DEFAULT '[]';
            ALTER TABLE connections ADD COLUMN external_subject TEXT NOT NULL DEFAULT '';
            ALTER TABLE connections ADD COLUMN connected_at BIGINT;
            ALTER TABLE connections ADD COLUMN connected_by TEXT;
            ALTER TABLE connections ADD COLUMN last_refresh_at BIGINT;
            ALTER TABLE connections ADD COLUMN status_reason TEXT NOT NULL DEFAULT '';
            ALTER TABLE connections ADD COLUMN token_type TEXT NOT NULL DEFAULT '';
            ALTER TABLE connections ADD COLUMN access_token_scope TEXT NOT NULL DEFAULT '';
            ALTER TABLE connections ADD COLUMN token_version BIGINT NOT NULL DEFAULT 0;
            CREATE INDEX connections_provider ON connections (provider_id);
            CREATE INDEX oauth_states_expiry ON oauth_states (expires_at);
            ALTER TABLE custody_keys ADD COLUMN description TEXT NOT NULL DEFAULT '';
            ALTER TABLE custody_keys ADD COLUMN created_by TEXT NOT NULL DEFAULT '{}';
            ALTER TABLE custody_keys ADD COLUMN disabled_at BIGINT;
            ALTER TABLE custody_keys ADD COLUMN disabled_by TEXT;
            ALTER TABLE custody_keys ADD COLUMN disable_reason TEXT NOT NULL DEFAULT '';
            ALTER TABLE signatures ADD COLUMN request_hash TEXT NOT NULL DEFAULT '';
            ALTER TABLE signatures ADD COLUMN scheme TEXT NOT NULL DEFAULT '';
            ALTER TABLE signatures ADD COLUMN decision TEXT NOT NULL DEFAULT '{}';
            ALTER TABLE signatures ADD COLUMN recovery_id INTEGER;
            ALTER TABLE signatures ADD COLUMN signed_at BIGINT
            "#,
        )
        .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        sql::run(
            manager,
            r#"
            ALTER TABLE signatures DROP COLUMN signed_at;
            ALTER TABLE signatures DROP COLUMN recovery_id;
            ALTER TABLE signatures DROP COLUMN decision;
            ALTER TABLE signatures DROP COLUMN scheme;
            ALTER TABLE signatures DROP COLUMN request_hash;
            ALTER TABLE custody_keys DROP COLUMN disable_reason;
            ALTER TABLE custody_keys DROP COLUMN disabled_by;
            ALTER TABLE custody_keys DROP COLUMN disabled_at;
            ALTER TABLE custody_keys DROP COLUMN created_by;
            ALTER TABLE custody_keys DROP COLUMN description;
            DROP INDEX oauth_states_expiry;
            DROP INDEX connections_provider;
            ALTER TABLE connections DROP COLUMN token_version;
            ALTER TABLE connections DROP COLUMN access_token_scope;
            ALTER TABLE connections DROP COLUMN token_type;
            ALTER TABLE connections DROP COLUMN status_reason;
            ALTER TABLE connections DROP COLUMN last_refresh_at;
            ALTER TABLE connections DROP COLUMN connected_by;
            ALTER TABLE connections DROP COLUMN connected_at;
            ALTER TABLE connections DROP COLUMN external_subject;
            ALTER TABLE connections DROP COLUMN granted_scopes;
            ALTER TABLE oauth_states DROP COLUMN redirect_uri;
            ALTER TABLE oauth_states DROP COLUMN return_url;
            ALTER TABLE oauth_providers DROP COLUMN created_by
            "#,
        )
        .await
    }
}
