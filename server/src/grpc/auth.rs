//! Adapter for AuthService: the client-credentials grant
//! (`crate::domain::tokens`) and WhoAmI (the caller the auth layer found).

use tonic::{Request, Response};
use vaultguard_proto::v1 as pb;
use vaultguard_proto::v1::auth_service_server::AuthService;

use super::{Reply, call_context, request_id};
use crate::clock::to_timestamp;
use crate::domain::tokens;
use crate::state::AppState;

/// AuthService over the domain layer.
#[derive(Debug, Clone)]
pub struct AuthApi(pub AppState);

#[tonic::async_trait]
impl AuthService for AuthApi {
    async fn issue_token(
        &self,
        request: Request<pb::IssueTokenRequest>,
    ) -> Reply<pb::IssueTokenResponse> {
        let request_id = request_id(&request);
        let req = request.into_inner();
        let issued = tokens::client_credentials(
            &self.0,
            &request_id,
            &req.grant_type,
            &req.client_id,
            &req.client_secret,
        )
        .await?;
        Ok(Response::new(pb::IssueTokenResponse {
            access_token: issued.access_token,
            token_type: "Bearer".to_owned(),
            expires_in: issued.expires_in,
        }))
    }

    async fn who_am_i(&self, request: Request<pb::WhoAmIRequest>) -> Reply<pb::WhoAmIResponse> {
        let ctx = call_context(&request)?;
        let principal = ctx.principal;
        Ok(Response::new(pb::WhoAmIResponse {
            actor: Some(principal.actor()),
            roles: principal.roles.iter().map(|r| *r as i32).collect(),
            issuer: principal.issuer.clone(),
            expire_time: Some(to_timestamp(principal.expires_at.saturating_mul(1000))),
        }))
    }
}
