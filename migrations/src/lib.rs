//! SeaORM migrations for every VaultGuard table, on PostgreSQL and SQLite.
//!
//! The DDL is written once as portable SQL; [`sql::run`] substitutes the few
//! per-backend types (`{BYTES}`, `{SERIAL}`) before executing it. Triggers are
//! written per backend because their languages differ.

use sea_orm_migration::prelude::*;

mod m20261122_000001_create_identity;
mod m20261122_000002_create_audit;
mod m20261122_000003_create_policies;
mod m20261122_000004_create_delegations;
mod m20261122_000005_create_vault;
mod m20261122_000006_policy_delegation_details;
mod m20261122_000007_step_up_changes;
mod m20261122_000008_vault_details;
mod m20261202_000009_drop_unused_delegation_indexes;
mod m20261203_000010_drop_hot_path_foreign_keys;
mod m20261203_000011_audit_pending_keyed_by_tenant;
mod m20261204_000012_index_step_up_queues;
mod m20261206_000013_rule_grants;
mod m20261206_000014_vault_leases_bindings_return_origins;
mod m20261206_000015_console_sessions;
mod m20261206_000016_kill_switch;
mod m20261206_000017_transaction_signing;
mod m20261206_000018_authorization_details;
mod m20261206_000019_budgets;
mod m20261207_000020_audit_chain_filters;
mod sql;

pub use sea_orm_migration::MigratorTrait;

/// Applies and reverts VaultGuard's schema, in date order.
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261122_000001_create_identity::Migration),
            Box::new(m20261122_000002_create_audit::Migration),
            Box::new(m20261122_000003_create_policies::Migration),
            Box::new(m20261122_000004_create_delegations::Migration),
            Box::new(m20261122_000005_create_vault::Migration),
            Box::new(m20261122_000006_policy_delegation_details::Migration),
            Box::new(m20261122_000007_step_up_changes::Migration),
            Box::new(m20261122_000008_vault_details::Migration),
            Box::new(m20261202_000009_drop_unused_delegation_indexes::Migration),
            Box::new(m20261203_000010_drop_hot_path_foreign_keys::Migration),
            Box::new(m20261203_000011_audit_pending_keyed_by_tenant::Migration),
            Box::new(m20261204_000012_index_step_up_queues::Migration),
            Box::new(m20261206_000013_rule_grants::Migration),
            Box::new(m20261206_000014_vault_leases_bindings_return_origins::Migration),
            Box::new(m20261206_000015_console_sessions::Migration),
            Box::new(m20261206_000016_kill_switch::Migration),
            Box::new(m20261206_000017_transaction_signing::Migration),
            Box::new(m20261206_000018_authorization_details::Migration),
            Box::new(m20261206_000019_budgets::Migration),
            Box::new(m20261207_000020_audit_chain_filters::Migration),
        ]
    }
}
