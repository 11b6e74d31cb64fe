//! Thin gRPC adapters: take the request apart, call the domain layer, convert
//! the result (`map_err(Status::from)`). No SeaORM query lives here.

pub mod access;
mod agent;
mod audit;
mod auth;
mod convert;
mod delegation;
mod issuer_key;
pub mod layer;
mod policy;
mod step_up;
mod stream;
mod tenant;
mod vault;

use tonic::{Request, Response, Status};

pub use agent::AgentApi;
pub use audit::AuditApi;
pub use auth::AuthApi;
pub use delegation::DelegationApi;
pub use issuer_key::IssuerKeyApi;
pub use policy::PolicyApi;
pub use step_up::StepUpApi;
pub use tenant::TenantApi;
pub use vault::VaultApi;

use crate::auth::CallContext;
use crate::error::Error;
use layer::RequestId;

/// What every RPC answers.
type Reply<T> = Result<Response<T>, Status>;

/// The authenticated caller of a request, put there by the auth layer.
fn call_context<T>(request: &Request<T>) -> Result<CallContext, Status> {
    request
        .extensions()
        .get::<CallContext>()
        .cloned()
        .ok_or_else(|| Status::from(Error::Unauthenticated("no principal on request")))
}

/// The request id of a public request.
fn request_id<T>(request: &Request<T>) -> String {
    request
        .extensions()
        .get::<RequestId>()
        .map(|id| id.0.clone())
        .unwrap_or_default()
}
