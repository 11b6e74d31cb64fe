//! VaultGuard: a gRPC authorization broker for AI agents in multi-tenant
//! systems. See ARCHITECTURE.md for the map of this crate.

pub mod audit;
pub mod auth;
pub mod clock;
pub mod config;
pub mod console;
pub mod crypto;
pub mod custody;
pub mod directory;
pub mod domain;
pub mod error;
pub mod ethereum;
pub mod grpc;
pub mod health;
pub mod http;
pub mod hub;
pub mod ids;
pub mod issuer;
pub mod limits;
pub mod oauth_client;
pub mod oidc;
pub mod outbound;
#[cfg(test)]
mod props;
pub mod request_body;
pub mod request_id;
pub mod server;
pub mod state;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod validate;
