//! Thin gRPC adapters: take the request apart, call the domain layer, convert
//! the result (`map_err(Status::from)`). No SeaORM query lives here.

pub mod access;
mod audit;
mod convert;
mod identity;
pub mod layer;
mod policy;
mod step_up;
mod stream;
mod vault;

use tonic::{Request, Status};

pub use audit::AuditApi;
pub use identity::{AgentApi, AuthApi, IssuerKeyApi, TenantApi};
pub use policy::{DelegationApi, PolicyApi};
pub use step_up::StepUpApi;
pub use vault::VaultApi;

use crate::auth::CallContext;
use crate::error::Error;
use layer::RequestId;

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
