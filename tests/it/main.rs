//! VaultGuard's integration tests: one test binary, one module per area.
//! Every test starts the real server on 127.0.0.1:0 with a fresh database of
//! the backend named by `VAULTGUARD_TEST_DB` and talks to it over real gRPC.
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::panic,
    clippy::disallowed_methods
)]

mod audit_log;
mod audit_store;
mod authority;
mod console;
mod console_browser;
mod cookbook;
mod crash;
mod delegations;
mod failover;
mod grpcurl;
mod health;
mod identity;
mod isolation;
mod issuer_keys;
mod jwt_attacks;
mod kill_switch;
mod limits;
mod log_growth;
mod money;
mod oidc;
mod outage;
mod outbound;
mod policies;
mod polyglot;
mod replica_process;
mod replicas;
mod sdk;
mod secrets;
mod slow_body;
mod small_pool;
mod step_up_queue;
mod step_ups;
mod stream_standing;
mod sweep;
mod tls;
mod transaction_signing;
mod vault_connections;
mod vault_io;
mod vault_signing;
mod webhooks;
