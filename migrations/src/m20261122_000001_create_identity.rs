//! Tenants, their external OIDC organisations, agents, and VaultGuard's own
//! issuer keys. Times are milliseconds since the Unix epoch (BIGINT) on both
//! backends, so that the domain layer's `Clock` is the only source of time.

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
            CREATE TABLE tenants (
                id TEXT PRIMARY KEY,
                slug TEXT NOT NULL UNIQUE,
                display_name TEXT NOT NULL,
                status TEXT NOT NULL,
                token_algorithm TEXT NOT NULL,
                outbound_default TEXT NOT NULL DEFAULT 'allow',
                policy_version BIGINT NOT NULL DEFAULT 0,
                created_at BIGINT NOT NULL,
                updated_at BIGINT NOT NULL
            );
            CREATE TABLE tenant_external_orgs (
                issuer TEXT NOT NULL,
                organization_id TEXT NOT NULL,
                tenant_id TEXT NOT NULL REFERENCES tenants(id),
                created_at BIGINT NOT NULL,
                PRIMARY KEY (issuer, organization_id)
            );
            CREATE INDEX tenant_external_orgs_tenant ON tenant_external_orgs (tenant_id);
            CREATE TABLE agents (
                id TEXT PRIMARY KEY,
                tenant_id TEXT NOT NULL REFERENCES tenants(id),
                name TEXT NOT NULL,
                description TEXT NOT NULL,
                status TEXT NOT NULL,
                secret_digest {BYTES} NOT NULL,
                secret_rotated_at BIGINT NOT NULL,
                created_at BIGINT NOT NULL,
                updated_at BIGINT NOT NULL,
                UNIQUE (tenant_id, name)
            );
            CREATE TABLE issuer_keys (
                kid TEXT PRIMARY KEY,
                algorithm TEXT NOT NULL,
                status TEXT NOT NULL,
                private_key_ciphertext {BYTES} NOT NULL,
                public_jwk TEXT NOT NULL,
                created_at BIGINT NOT NULL,
                retired_at BIGINT,
                publish_until BIGINT
            );
            CREATE UNIQUE INDEX issuer_keys_one_active ON issuer_keys (algorithm) WHERE status = 'active'
            "#,
        )
        .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        sql::drop_tables(
            manager,
            &["issuer_keys", "agents", "tenant_external_orgs", "tenants"],
        )
        .await
    }
}
