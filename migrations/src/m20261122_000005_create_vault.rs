//! The vault: OAuth providers, connection states (PKCE), connected accounts,
//! custodied signing keys and the signature idempotency records. Every
//! secret column holds an AES-256-GCM envelope whose associated data is the
//! tenant id and the record id.

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
            CREATE TABLE oauth_providers (
                id TEXT PRIMARY KEY,
                tenant_id TEXT NOT NULL REFERENCES tenants(id),
                name TEXT NOT NULL,
                authorize_url TEXT NOT NULL,
                token_url TEXT NOT NULL,
                revocation_url TEXT,
                client_id TEXT NOT NULL,
                client_secret_ciphertext {BYTES} NOT NULL,
                scopes TEXT NOT NULL,
                extra_params TEXT NOT NULL,
                created_at BIGINT NOT NULL,
                updated_at BIGINT NOT NULL,
                UNIQUE (tenant_id, name)
            );
            CREATE TABLE oauth_states (
                state_hash TEXT PRIMARY KEY,
                tenant_id TEXT NOT NULL,
                provider_id TEXT NOT NULL REFERENCES oauth_providers(id),
                connection_id TEXT NOT NULL,
                initiator TEXT NOT NULL,
                pkce_verifier_ciphertext {BYTES} NOT NULL,
                scopes TEXT NOT NULL,
                expires_at BIGINT NOT NULL,
                used_at BIGINT,
                created_at BIGINT NOT NULL
            );
            CREATE TABLE connections (
                id TEXT PRIMARY KEY,
                tenant_id TEXT NOT NULL REFERENCES tenants(id),
                provider_id TEXT NOT NULL REFERENCES oauth_providers(id),
                status TEXT NOT NULL,
                scopes TEXT NOT NULL,
                refresh_token_ciphertext {BYTES},
                access_token_ciphertext {BYTES},
                access_token_expires_at BIGINT,
                created_by TEXT NOT NULL,
                created_at BIGINT NOT NULL,
                updated_at BIGINT NOT NULL
            );
            CREATE INDEX connections_tenant ON connections (tenant_id);
            CREATE TABLE custody_keys (
                id TEXT PRIMARY KEY,
                tenant_id TEXT NOT NULL REFERENCES tenants(id),
                name TEXT NOT NULL,
                algorithm TEXT NOT NULL,
                status TEXT NOT NULL,
                private_key_ciphertext {BYTES} NOT NULL,
                public_key {BYTES} NOT NULL,
                ethereum_address TEXT,
                created_at BIGINT NOT NULL,
                updated_at BIGINT NOT NULL,
                UNIQUE (tenant_id, name)
            );
            CREATE TABLE signatures (
                id TEXT PRIMARY KEY,
                tenant_id TEXT NOT NULL,
                key_id TEXT NOT NULL REFERENCES custody_keys(id),
                requester_subject TEXT NOT NULL,
                idempotency_key TEXT NOT NULL,
                payload_hash TEXT NOT NULL,
                status TEXT NOT NULL,
                signature {BYTES},
                delegation_id TEXT,
                created_at BIGINT NOT NULL,
                updated_at BIGINT NOT NULL,
                UNIQUE (key_id, requester_subject, idempotency_key)
            )
            "#,
        )
        .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        sql::drop_tables(
            manager,
            &[
                "signatures",
                "custody_keys",
                "connections",
                "oauth_states",
                "oauth_providers",
            ],
        )
        .await
    }
}
