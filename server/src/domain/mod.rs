//! The domain layer: validation, authorization within a tenant, state
//! changes and their audit events, each in one transaction. No tonic types
//! here; the gRPC adapters in `crate::grpc` translate.

pub mod agents;
pub mod delegations;
pub mod page;
pub mod policies;
pub mod policy_engine;
pub mod tenants;
pub mod tokens;
