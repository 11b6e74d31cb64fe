//! Delegations, their step-ups (CIBA), approvals, and the webhook outbox.
//! Tokens are never stored: a delegation's id is its token's `jti`.

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
            CREATE TABLE delegations (
                id TEXT PRIMARY KEY,
                requesting_tenant_id TEXT NOT NULL REFERENCES tenants(id),
                requesting_agent_id TEXT NOT NULL REFERENCES agents(id),
                receiving_tenant_id TEXT NOT NULL REFERENCES tenants(id),
                action TEXT NOT NULL,
                scopes TEXT NOT NULL,
                resource TEXT NOT NULL,
                binding_message TEXT NOT NULL,
                context TEXT NOT NULL,
                status TEXT NOT NULL,
                decision TEXT NOT NULL,
                idempotency_key TEXT NOT NULL,
                request_hash TEXT NOT NULL,
                ttl_seconds BIGINT NOT NULL,
                token_algorithm TEXT NOT NULL,
                signing_kid TEXT,
                created_at BIGINT NOT NULL,
                activated_at BIGINT,
                expires_at BIGINT,
                ended_at BIGINT,
                ended_by TEXT,
                end_reason TEXT,
                UNIQUE (requesting_agent_id, idempotency_key)
            );
            CREATE INDEX delegations_requesting ON delegations (requesting_tenant_id, created_at);
            CREATE INDEX delegations_receiving ON delegations (receiving_tenant_id, created_at);
            CREATE INDEX delegations_expiry ON delegations (status, expires_at);
            CREATE TABLE step_ups (
                id TEXT PRIMARY KEY,
                delegation_id TEXT NOT NULL UNIQUE REFERENCES delegations(id),
                receiving_tenant_id TEXT NOT NULL,
                requesting_tenant_id TEXT NOT NULL,
                requesting_agent_id TEXT NOT NULL,
                auth_req_id_hash TEXT NOT NULL UNIQUE,
                state TEXT NOT NULL,
                request_hash TEXT NOT NULL,
                interval_seconds BIGINT NOT NULL,
                last_polled_at BIGINT,
                approvals_required INTEGER NOT NULL,
                expires_at BIGINT NOT NULL,
                created_at BIGINT NOT NULL,
                updated_at BIGINT NOT NULL,
                decided_at BIGINT,
                redeemed_at BIGINT
            );
            CREATE INDEX step_ups_pending ON step_ups (receiving_tenant_id, state, created_at);
            CREATE TABLE step_up_approvals (
                step_up_id TEXT NOT NULL REFERENCES step_ups(id),
                approver_subject TEXT NOT NULL,
                decision TEXT NOT NULL,
                reason TEXT NOT NULL,
                created_at BIGINT NOT NULL,
                PRIMARY KEY (step_up_id, approver_subject)
            );
            CREATE TABLE tenant_webhooks (
                tenant_id TEXT PRIMARY KEY REFERENCES tenants(id),
                url TEXT NOT NULL,
                secret_ciphertext {BYTES} NOT NULL,
                created_at BIGINT NOT NULL,
                updated_at BIGINT NOT NULL
            );
            CREATE TABLE webhook_outbox (
                id {SERIAL},
                tenant_id TEXT NOT NULL,
                payload TEXT NOT NULL,
                attempts INTEGER NOT NULL DEFAULT 0,
                next_attempt_at BIGINT NOT NULL,
                delivered_at BIGINT,
                last_error TEXT,
                created_at BIGINT NOT NULL
            );
            CREATE INDEX webhook_outbox_due ON webhook_outbox (delivered_at, next_attempt_at)
            "#,
        )
        .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        sql::drop_tables(
            manager,
            &[
                "webhook_outbox",
                "tenant_webhooks",
                "step_up_approvals",
                "step_ups",
                "delegations",
            ],
        )
        .await
    }
}
