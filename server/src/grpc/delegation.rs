//! Adapter for DelegationService: RequestDelegation, the two parties' reads
//! and ends of a delegation, and VerifyDelegationToken
//! (`crate::domain::delegations`).

use tonic::{Request, Response, Status};
use vaultguard_proto::v1 as pb;
use vaultguard_proto::v1::delegation_service_server::DelegationService;

use super::{Reply, call_context, convert};
use crate::auth::CallContext;
use crate::domain::delegations::{self, Requested};
use crate::state::AppState;
use crate::store::entities::delegation;

/// DelegationService over the domain layer.
#[derive(Debug, Clone)]
pub struct DelegationApi(pub AppState);

impl DelegationApi {
    /// A delegation as the caller's tenant sees it.
    fn view(&self, ctx: &CallContext, row: delegation::Model) -> Result<pb::Delegation, Status> {
        let viewer = ctx.principal.tenant_id.clone().unwrap_or_default();
        Ok(convert::delegation(
            row,
            &viewer,
            self.0.clock.now_millis(),
        )?)
    }

    /// The decision recorded on a delegation as the caller's tenant sees it.
    fn decision_for(
        &self,
        ctx: &CallContext,
        row: &delegation::Model,
    ) -> Result<pb::PolicyDecision, Status> {
        let decision = delegations::parse_decision(row)?;
        let viewer = ctx.principal.tenant_id.clone().unwrap_or_default();
        Ok(decision.redacted_for(&viewer).to_proto())
    }
}

#[tonic::async_trait]
impl DelegationService for DelegationApi {
    async fn request_delegation(
        &self,
        request: Request<pb::RequestDelegationRequest>,
    ) -> Reply<pb::RequestDelegationResponse> {
        use pb::request_delegation_response::Outcome;
        let ctx = call_context(&request)?;
        let requested = delegations::request(&self.0, &ctx, request.get_ref()).await?;
        let decision = Some(self.decision_for(&ctx, requested.row())?);
        let outcome = match requested {
            Requested::Allowed {
                row,
                token,
                expires_in,
            } => Outcome::Allowed(pb::DelegationGrant {
                delegation: Some(self.view(&ctx, row)?),
                token,
                token_type: "Bearer".to_owned(),
                expires_in,
            }),
            Requested::StepUp {
                row,
                auth_req_id,
                expires_in,
                interval,
            } => Outcome::StepUp(pb::StepUpChallenge {
                delegation: Some(self.view(&ctx, row)?),
                auth_req_id,
                expires_in,
                interval,
            }),
        };
        Ok(Response::new(pb::RequestDelegationResponse {
            decision,
            outcome: Some(outcome),
        }))
    }

    async fn get_delegation(
        &self,
        request: Request<pb::GetDelegationRequest>,
    ) -> Reply<pb::GetDelegationResponse> {
        let ctx = call_context(&request)?;
        let row = delegations::get(&self.0, &ctx, &request.get_ref().delegation_id).await?;
        Ok(Response::new(pb::GetDelegationResponse {
            delegation: Some(self.view(&ctx, row)?),
        }))
    }

    async fn list_delegations(
        &self,
        request: Request<pb::ListDelegationsRequest>,
    ) -> Reply<pb::ListDelegationsResponse> {
        let ctx = call_context(&request)?;
        let (rows, next) = delegations::list(&self.0, &ctx, request.get_ref()).await?;
        Ok(Response::new(pb::ListDelegationsResponse {
            delegations: rows
                .into_iter()
                .map(|row| self.view(&ctx, row))
                .collect::<Result<_, _>>()?,
            page: Some(pb::PageResponse {
                next_page_token: next,
            }),
        }))
    }

    async fn revoke_delegation(
        &self,
        request: Request<pb::RevokeDelegationRequest>,
    ) -> Reply<pb::RevokeDelegationResponse> {
        let ctx = call_context(&request)?;
        let req = request.get_ref();
        let row = delegations::revoke(&self.0, &ctx, &req.delegation_id, &req.reason).await?;
        Ok(Response::new(pb::RevokeDelegationResponse {
            delegation: Some(self.view(&ctx, row)?),
        }))
    }

    async fn relinquish_delegation(
        &self,
        request: Request<pb::RelinquishDelegationRequest>,
    ) -> Reply<pb::RelinquishDelegationResponse> {
        let ctx = call_context(&request)?;
        let req = request.get_ref();
        let row = delegations::relinquish(&self.0, &ctx, &req.delegation_id, &req.reason).await?;
        Ok(Response::new(pb::RelinquishDelegationResponse {
            delegation: Some(self.view(&ctx, row)?),
        }))
    }

    async fn verify_delegation_token(
        &self,
        request: Request<pb::VerifyDelegationTokenRequest>,
    ) -> Reply<pb::VerifyDelegationTokenResponse> {
        let ctx = call_context(&request)?;
        let req = request.get_ref();
        let Some(found) =
            delegations::verify(&self.0, &ctx, &req.token, &req.required_action).await?
        else {
            return Ok(Response::new(pb::VerifyDelegationTokenResponse::default()));
        };
        Ok(Response::new(introspection(&found.claims)))
    }
}

fn text(claims: &serde_json::Value, key: &str) -> String {
    claims[key].as_str().unwrap_or_default().to_owned()
}

/// RFC 7662 fields of an active token.
fn introspection(claims: &serde_json::Value) -> pb::VerifyDelegationTokenResponse {
    let aud = match &claims["aud"] {
        serde_json::Value::Array(items) => items
            .iter()
            .filter_map(|a| a.as_str().map(str::to_owned))
            .collect(),
        serde_json::Value::String(one) => vec![one.clone()],
        _ => Vec::new(),
    };
    let mut act = Vec::new();
    let mut level = &claims["act"];
    while level.is_object() && act.len() < 16 {
        act.push(pb::ActorClaim {
            sub: text(level, "sub"),
            client_id: text(level, "client_id"),
            tenant_id: text(level, "tenant_id"),
        });
        level = &level["act"];
    }
    pb::VerifyDelegationTokenResponse {
        active: true,
        scope: text(claims, "scope"),
        client_id: text(claims, "client_id"),
        sub: text(claims, "sub"),
        aud,
        iss: text(claims, "iss"),
        exp: claims["exp"].as_i64().unwrap_or_default(),
        iat: claims["iat"].as_i64().unwrap_or_default(),
        nbf: claims["nbf"].as_i64().unwrap_or_default(),
        jti: text(claims, "jti"),
        token_type: "Bearer".to_owned(),
        requesting_tenant_id: text(claims, "requesting_tenant_id"),
        receiving_tenant_id: text(claims, "receiving_tenant_id"),
        action: text(claims, "action"),
        act,
    }
}
