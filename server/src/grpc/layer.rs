//! The one place where gRPC calls are authenticated and authorized.
//!
//! A tower layer in front of every service: it reads the request path, the
//! `authorization: Bearer …` metadata and the connection's verified client
//! certificate (mTLS), authenticates the caller
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
use crate::auth::{CallContext, authenticate_call, role_name};
use crate::error::Error;
use crate::state::AppState;

/// The request id header, set by the outer request-id layer.
pub const REQUEST_ID_HEADER: &str = crate::request_id::HEADER;

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
        // Rate limits of public calls (IssueToken per presented client_id).
        state.limits.admit_public(path, request)?;
        request.extensions_mut().insert(RequestId(request_id));
        return Ok(());
    };
    let client_certificate = crate::tls::peer_certificate(request.extensions());
    let principal = authenticate_call(
        state.authenticator(),
        bearer(request),
        client_certificate.as_ref(),
    )
    .await?;
    // Rate limits and open-stream caps, before any handler or database work.
    state.limits.admit(&principal, path, request)?;
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
                Ok(()) => {
                    let caller = request.extensions().get::<CallContext>().cloned();
                    let stream_slot = crate::limits::StreamSlot::take(&mut request);
                    let response =
                        crate::limits::StreamSlot::hold(stream_slot, inner.call(request).await?);
                    match caller {
                        Some(caller) => audit_not_found(&state, &caller, &path, response).await,
                        None => response,
                    }
                }
                Err(status) => {
                    let mut response = status.into_http();
                    // A refusal past the caller's refusal budget is
                    // answered late (`OverloadLayer` waits it out).
                    crate::limits::PacedRefusal::carry(&mut request, &mut response);
                    response
                }
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

/// Methods (or whole services, by prefix) whose NOT_FOUND is not recorded
/// as `auth.not_found`: DelegationService audits its own with the id that
/// was looked up (`delegation.not_found`); GetApprovalWebhook's NOT_FOUND
/// means the caller's own tenant has no webhook, which names no object.
const NOT_FOUND_NOT_AUDITED_HERE: &[&str] = &[
    "/vaultguard.v1.DelegationService/",
    "/vaultguard.v1.StepUpService/GetApprovalWebhook",
];

/// A NOT_FOUND answered to a tenant principal is recorded in the caller's
/// own log as `auth.not_found` (the method, the request id): an attempt on
/// another tenant's object leaves a trace where the caller's tenant can see
/// it. It is recorded for every NOT_FOUND alike — the object may exist in
/// another tenant or nowhere — so the caller's log never tells the two
/// apart. Like every audited refusal, the answer waits for the event to be
/// durable; if it cannot be written the caller gets UNAVAILABLE instead.
/// Debounced per caller and method ([`crate::audit::RefusalDebounce`]): a
/// probing loop leaves a bounded trail with the count of what it tried.
async fn audit_not_found(
    state: &AppState,
    caller: &CallContext,
    path: &str,
    response: Response<Body>,
) -> Response<Body> {
    let not_found = response
        .headers()
        .get("grpc-status")
        .is_some_and(|code| code.as_bytes() == b"5");
    if !not_found
        || NOT_FOUND_NOT_AUDITED_HERE
            .iter()
            .any(|prefix| path.starts_with(prefix))
    {
        return response;
    }
    let Some(tenant) = caller.principal.tenant_id.as_deref() else {
        return response;
    };
    let event = caller.audit().event(
        tenant,
        "auth.not_found",
        Vec::new(),
        crate::audit::Outcome::Denied,
        serde_json::json!({ "method": path }),
    );
    let key = format!(
        "auth.not_found|{}|{}|{path}",
        caller.principal.issuer, caller.principal.subject
    );
    match state.record_refusal(key, vec![event]).await {
        Ok(()) => response,
        Err(err) => Status::from(err).into_http(),
    }
}

/// Property tests of the `authorization` header parsing.
#[cfg(test)]
mod props {
    use proptest::prelude::*;

    use super::*;
    use crate::props::{PURE_CASES, config};

    fn request_with(value: &[u8]) -> Option<Request<Body>> {
        let value = http::HeaderValue::from_bytes(value).ok()?;
        let mut request = Request::new(Body::empty());
        request
            .headers_mut()
            .insert(http::header::AUTHORIZATION, value);
        Some(request)
    }

    proptest! {
        #![proptest_config(config(PURE_CASES))]

        #[test]
        fn any_header_value_parses_or_is_refused(value in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..200),
            "(Bearer|bearer|BEARER|Basic|Bearer:|Bearerx)?[ \t]{0,3}[A-Za-z0-9._ -]{0,40}[ \t]{0,2}"
                .prop_map(String::into_bytes),
        ]) {
            if let Some(request) = request_with(&value)
                && let Some(token) = bearer(&request)
            {
                let text = std::str::from_utf8(&value).unwrap();
                prop_assert!(text.get(..7).is_some_and(|s| s.eq_ignore_ascii_case("bearer ")));
                prop_assert_eq!(token, token.trim());
            }
        }

        #[test]
        fn a_bearer_token_is_read_back(
            scheme in "(Bearer|bearer|BEARER|bEaReR)",
            token in "[A-Za-z0-9._~+/=-]{1,200}",
        ) {
            let request = request_with(format!("{scheme} {token}").as_bytes()).unwrap();
            prop_assert_eq!(bearer(&request), Some(token.as_str()));
        }

        #[test]
        fn other_schemes_are_not_bearers(
            scheme in "(Basic|Digest|Token|Bearerx|Beare)",
            token in "[A-Za-z0-9._-]{1,40}",
        ) {
            let request = request_with(format!("{scheme} {token}").as_bytes()).unwrap();
            prop_assert_eq!(bearer(&request), None);
        }
    }
}
