//! The one place where gRPC calls are authenticated and authorized.
//!
//! A tower layer in front of every service: it reads the request path and
//! the `authorization: Bearer …` metadata, authenticates the caller
//! (`crate::auth`), checks the role matrix (`super::access`), and puts a
//! [`CallContext`] into the request extensions for handlers. Refusals are
//! answered here, before any handler runs. It also records per-method
//! request counts and latency for `/metrics`.

use std::collections::HashMap;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use http::{Request, Response};
use tonic::Status;
use tonic::body::Body;
use tower::{Layer, Service};
use vaultguard_proto::v1::ErrorReason;

use super::access::{Access, access_for};
use crate::auth::{CallContext, authenticate, role_name};
use crate::error::Error;
use crate::state::AppState;

/// The request id header, set by the outer request-id layer.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

#[derive(Clone, Debug)]
pub struct AuthLayer {
    state: AppState,
}

impl AuthLayer {
    pub fn new(state: AppState) -> Self {
        Self { state }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            state: self.state.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct AuthService<S> {
    inner: S,
    state: AppState,
}

fn bearer(request: &Request<Body>) -> Option<&str> {
    let value = request
        .headers()
        .get(http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

async fn admit(state: &AppState, request: &mut Request<Body>, path: &str) -> Result<(), Status> {
    let request_id = request
        .headers()
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let Some(access) = access_for(path) else {
        return Err(Status::unimplemented("unknown method"));
    };
    let Access::Roles(allowed) = access else {
        request.extensions_mut().insert(RequestId(request_id));
        return Ok(());
    };
    let token = bearer(request).ok_or(Error::Unauthenticated("missing bearer token"))?;
    let principal = authenticate(state, token).await?;
    if !allowed.iter().any(|role| principal.has_role(*role)) {
        let required = allowed
            .iter()
            .map(|r| role_name(*r))
            .collect::<Vec<_>>()
            .join(",");
        return Err(Error::PermissionDenied {
            reason: ErrorReason::RoleRequired,
            message: "the caller's role may not call this method".to_owned(),
            metadata: HashMap::from([
                ("required_roles".to_owned(), required),
                ("method".to_owned(), path.to_owned()),
            ]),
        }
        .into());
    }
    tracing::debug!(method = path, subject = %principal.subject, tenant = ?principal.tenant_id, "call admitted");
    request
        .extensions_mut()
        .insert(RequestId(request_id.clone()));
    request.extensions_mut().insert(CallContext {
        principal,
        request_id,
    });
    Ok(())
}

/// The request id of a call, present on public calls too.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

impl<S> Service<Request<Body>> for AuthService<S>
where
    S: Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        // The clone that was made ready is the one we call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let state = self.state.clone();
        Box::pin(async move {
            let started = Instant::now();
            let path = request.uri().path().to_owned();
            let response = match admit(&state, &mut request, &path).await {
                Ok(()) => inner.call(request).await?,
                Err(status) => status.into_http(),
            };
            let code = response
                .headers()
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("streamed")
                .to_owned();
            metrics::counter!("vaultguard_grpc_requests_total", "method" => path.clone(), "code" => code).increment(1);
            metrics::histogram!("vaultguard_grpc_request_seconds", "method" => path)
                .record(started.elapsed().as_secs_f64());
            Ok(response)
        })
    }
}
