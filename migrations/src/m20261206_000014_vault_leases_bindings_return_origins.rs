//! Issue 23, items 4, 6 and 12: the vault's outbound calls.
//!
//! - `connections.refresh_lease_holder` / `refresh_lease_expires_at`: the
//!   refresh lease. A refresh takes it with a conditional UPDATE (free, or
//!   lapsed on the server's clock) and gives it back with the UPDATE that
//!   stores the new tokens, so one refresh runs at a time per connection on
//!   every replica without a transaction (and its pooled connection) held
//!   across the provider's HTTP call.
//! - `connections.issuer_token_url` / `issuer_revocation_url` /
//!   `issuer_client_id`: where the stored tokens were issued, and so the only
//!   endpoints and client they may ever be sent to. Existing rows take their
//!   provider's current settings (the ones their tokens were last used with).
//! - `oauth_states.token_url` / `client_id`: the token endpoint and client a
//!   pending authorization's code and PKCE verifier may be sent to.
//! - `vault_settings`: a tenant's registered return origins (the only places
//!   the OAuth callback redirects a browser to).

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
            ALTER TABLE connections ADD COLUMN refresh_lease_holder TEXT;
            ALTER TABLE connections ADD COLUMN refresh_lease_expires_at BIGINT;
            ALTER TABLE connections ADD COLUMN issuer_token_url TEXT NOT NULL DEFAULT '';
            ALTER TABLE connections ADD COLUMN issuer_revocation_url TEXT;
            ALTER TABLE connections ADD COLUMN issuer_client_id TEXT NOT NULL DEFAULT '';
            UPDATE connections SET
                issuer_token_url = COALESCE((SELECT p.token_url FROM oauth_providers p
                    WHERE p.id = connections.provider_id), ''),
                issuer_revocation_url = (SELECT p.revocation_url FROM oauth_providers p
                    WHERE p.id = connections.provider_id),
                issuer_client_id = COALESCE((SELECT p.client_id FROM oauth_providers p
                    WHERE p.id = connections.provider_id), '');
            ALTER TABLE oauth_states ADD COLUMN token_url TEXT NOT NULL DEFAULT '';
            ALTER TABLE oauth_states ADD COLUMN client_id TEXT NOT NULL DEFAULT '';
            UPDATE oauth_states SET
                token_url = COALESCE((SELECT p.token_url FROM oauth_providers p
                    WHERE p.id = oauth_states.provider_id), ''),
                client_id = COALESCE((SELECT p.client_id FROM oauth_providers p
                    WHERE p.id = oauth_states.provider_id), '');
            CREATE TABLE vault_settings (
                tenant_id TEXT PRIMARY KEY NOT NULL,
                return_origins TEXT NOT NULL DEFAULT '[]',
                updated_at BIGINT NOT NULL,
                updated_by TEXT NOT NULL
            )
            "#,
        )
        .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        sql::run(
            manager,
            r#"
            DROP TABLE vault_settings;
            ALTER TABLE oauth_states DROP COLUMN client_id;
            ALTER TABLE oauth_states DROP COLUMN token_url;
            ALTER TABLE connections DROP COLUMN issuer_client_id;
            ALTER TABLE connections DROP COLUMN issuer_revocation_url;
            ALTER TABLE connections DROP COLUMN issuer_token_url;
            ALTER TABLE connections DROP COLUMN refresh_lease_expires_at;
            ALTER TABLE connections DROP COLUMN refresh_lease_holder
            "#,
        )
        .await
    }
}
