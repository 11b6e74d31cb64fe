//! Adapters for TenantService, AgentService, AuthService and IssuerKeyService.

use tonic::{Request, Response, Status};
use vaultguard_proto::v1 as pb;
use vaultguard_proto::v1::agent_service_server::AgentService;
use vaultguard_proto::v1::auth_service_server::AuthService;
use vaultguard_proto::v1::issuer_key_service_server::IssuerKeyService;
use vaultguard_proto::v1::tenant_service_server::TenantService;

use super::{call_context, convert, request_id};
use crate::clock::to_timestamp;
use crate::domain::{agents, tenants, tokens};
use crate::error::Error;
use crate::state::AppState;
use crate::validate;

type Reply<T> = Result<Response<T>, Status>;

/// TenantService over the domain layer.
#[derive(Debug, Clone)]
pub struct TenantApi(pub AppState);

#[tonic::async_trait]
impl TenantService for TenantApi {
    async fn create_tenant(
        &self,
        request: Request<pb::CreateTenantRequest>,
    ) -> Reply<pb::CreateTenantResponse> {
        let ctx = call_context(&request)?;
        let req = request.into_inner();
        let algorithm = req.settings.map(|s| s.token_algorithm).unwrap_or_default();
        let view = tenants::create(&self.0, &ctx, &req.slug, &req.display_name, algorithm).await?;
        Ok(Response::new(pb::CreateTenantResponse {
            tenant: Some(convert::tenant(view)),
        }))
    }

    async fn get_tenant(
        &self,
        request: Request<pb::GetTenantRequest>,
    ) -> Reply<pb::GetTenantResponse> {
        let ctx = call_context(&request)?;
        let view = tenants::get(&self.0, &ctx, &request.get_ref().tenant_id).await?;
        Ok(Response::new(pb::GetTenantResponse {
            tenant: Some(convert::tenant(view)),
        }))
    }

    async fn list_tenants(
        &self,
        request: Request<pb::ListTenantsRequest>,
    ) -> Reply<pb::ListTenantsResponse> {
        let req = request.into_inner();
        let page = req.page.unwrap_or_default();
        let (views, next) =
            tenants::list(&self.0, req.status, page.page_size, &page.page_token).await?;
        Ok(Response::new(pb::ListTenantsResponse {
            tenants: views.into_iter().map(convert::tenant).collect(),
            page: Some(pb::PageResponse {
                next_page_token: next,
            }),
        }))
    }

    async fn suspend_tenant(
        &self,
        request: Request<pb::SuspendTenantRequest>,
    ) -> Reply<pb::SuspendTenantResponse> {
        let ctx = call_context(&request)?;
        let req = request.into_inner();
        let view = tenants::set_suspended(&self.0, &ctx, &req.tenant_id, true, &req.reason).await?;
        Ok(Response::new(pb::SuspendTenantResponse {
            tenant: Some(convert::tenant(view)),
        }))
    }

    async fn reactivate_tenant(
        &self,
        request: Request<pb::ReactivateTenantRequest>,
    ) -> Reply<pb::ReactivateTenantResponse> {
        let ctx = call_context(&request)?;
        let req = request.into_inner();
        let view =
            tenants::set_suspended(&self.0, &ctx, &req.tenant_id, false, &req.reason).await?;
        Ok(Response::new(pb::ReactivateTenantResponse {
            tenant: Some(convert::tenant(view)),
        }))
    }

    async fn bind_external_organization(
        &self,
        request: Request<pb::BindExternalOrganizationRequest>,
    ) -> Reply<pb::BindExternalOrganizationResponse> {
        let ctx = call_context(&request)?;
        let req = request.into_inner();
        let org = req.organization.as_ref();
        let view = tenants::bind_org(
            &self.0,
            &ctx,
            &req.tenant_id,
            org.map(|o| o.issuer.as_str()),
            org.map(|o| o.organization_id.as_str()),
        )
        .await?;
        Ok(Response::new(pb::BindExternalOrganizationResponse {
            tenant: Some(convert::tenant(view)),
        }))
    }

    async fn unbind_external_organization(
        &self,
        request: Request<pb::UnbindExternalOrganizationRequest>,
    ) -> Reply<pb::UnbindExternalOrganizationResponse> {
        let ctx = call_context(&request)?;
        let req = request.into_inner();
        let org = req.organization.as_ref();
        let view = tenants::unbind_org(
            &self.0,
            &ctx,
            &req.tenant_id,
            org.map(|o| o.issuer.as_str()),
            org.map(|o| o.organization_id.as_str()),
        )
        .await?;
        Ok(Response::new(pb::UnbindExternalOrganizationResponse {
            tenant: Some(convert::tenant(view)),
        }))
    }

    async fn update_tenant_settings(
        &self,
        request: Request<pb::UpdateTenantSettingsRequest>,
    ) -> Reply<pb::UpdateTenantSettingsResponse> {
        let ctx = call_context(&request)?;
        let req = request.into_inner();
        let view = tenants::update_settings(&self.0, &ctx, req.settings.map(|s| s.token_algorithm))
            .await?;
        Ok(Response::new(pb::UpdateTenantSettingsResponse {
            tenant: Some(convert::tenant(view)),
        }))
    }
}

/// AgentService over the domain layer.
#[derive(Debug, Clone)]
pub struct AgentApi(pub AppState);

#[tonic::async_trait]
impl AgentService for AgentApi {
    async fn create_agent(
        &self,
        request: Request<pb::CreateAgentRequest>,
    ) -> Reply<pb::CreateAgentResponse> {
        let ctx = call_context(&request)?;
        let req = request.into_inner();
        let (agent, client_secret) =
            agents::create(&self.0, &ctx, &req.name, &req.description).await?;
        Ok(Response::new(pb::CreateAgentResponse {
            agent: Some(convert::agent(agent)),
            client_secret,
        }))
    }

    async fn get_agent(
        &self,
        request: Request<pb::GetAgentRequest>,
    ) -> Reply<pb::GetAgentResponse> {
        let ctx = call_context(&request)?;
        let agent = agents::get(&self.0, &ctx, &request.get_ref().agent_id).await?;
        Ok(Response::new(pb::GetAgentResponse {
            agent: Some(convert::agent(agent)),
        }))
    }

    async fn list_agents(
        &self,
        request: Request<pb::ListAgentsRequest>,
    ) -> Reply<pb::ListAgentsResponse> {
        let ctx = call_context(&request)?;
        let req = request.into_inner();
        let page = req.page.unwrap_or_default();
        let (rows, next) =
            agents::list(&self.0, &ctx, req.status, page.page_size, &page.page_token).await?;
        Ok(Response::new(pb::ListAgentsResponse {
            agents: rows.into_iter().map(convert::agent).collect(),
            page: Some(pb::PageResponse {
                next_page_token: next,
            }),
        }))
    }

    async fn disable_agent(
        &self,
        request: Request<pb::DisableAgentRequest>,
    ) -> Reply<pb::DisableAgentResponse> {
        let ctx = call_context(&request)?;
        let agent = agents::set_disabled(&self.0, &ctx, &request.get_ref().agent_id, true).await?;
        Ok(Response::new(pb::DisableAgentResponse {
            agent: Some(convert::agent(agent)),
        }))
    }

    async fn enable_agent(
        &self,
        request: Request<pb::EnableAgentRequest>,
    ) -> Reply<pb::EnableAgentResponse> {
        let ctx = call_context(&request)?;
        let agent = agents::set_disabled(&self.0, &ctx, &request.get_ref().agent_id, false).await?;
        Ok(Response::new(pb::EnableAgentResponse {
            agent: Some(convert::agent(agent)),
        }))
    }

    async fn rotate_agent_secret(
        &self,
        request: Request<pb::RotateAgentSecretRequest>,
    ) -> Reply<pb::RotateAgentSecretResponse> {
        let ctx = call_context(&request)?;
        let (agent, client_secret) =
            agents::rotate_secret(&self.0, &ctx, &request.get_ref().agent_id).await?;
        Ok(Response::new(pb::RotateAgentSecretResponse {
            agent: Some(convert::agent(agent)),
            client_secret,
        }))
    }
}

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

/// IssuerKeyService over the key ring.
#[derive(Debug, Clone)]
pub struct IssuerKeyApi(pub AppState);

#[tonic::async_trait]
impl IssuerKeyService for IssuerKeyApi {
    async fn get_jwks(&self, _request: Request<pb::GetJwksRequest>) -> Reply<pb::GetJwksResponse> {
        let jwks_json = self.0.keys.jwks_json().await?;
        Ok(Response::new(pb::GetJwksResponse { jwks_json }))
    }

    async fn list_issuer_keys(
        &self,
        _request: Request<pb::ListIssuerKeysRequest>,
    ) -> Reply<pb::ListIssuerKeysResponse> {
        let keys = self.0.keys.list().await?;
        Ok(Response::new(pb::ListIssuerKeysResponse {
            keys: keys.into_iter().map(convert::issuer_key).collect(),
        }))
    }

    async fn rotate_issuer_key(
        &self,
        request: Request<pb::RotateIssuerKeyRequest>,
    ) -> Reply<pb::RotateIssuerKeyResponse> {
        let ctx = call_context(&request)?;
        let algorithm = validate::enum_value::<pb::TokenAlgorithm>(
            "algorithm",
            request.get_ref().algorithm,
            true,
        )
        .map_err(|v| Status::from(Error::from(v)))?
        .unwrap_or(pb::TokenAlgorithm::Rs256);
        let (key, retired) = self.0.keys.rotate(algorithm, &ctx.audit()).await?;
        self.0.audit_committed();
        Ok(Response::new(pb::RotateIssuerKeyResponse {
            key: Some(convert::issuer_key(key)),
            retired: retired.map(convert::issuer_key),
        }))
    }
}
