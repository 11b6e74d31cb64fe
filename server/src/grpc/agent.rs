//! Adapter for AgentService: a tenant's agents and their client secrets
//! (`crate::domain::agents`).

use tonic::{Request, Response};
use vaultguard_proto::v1 as pb;
use vaultguard_proto::v1::agent_service_server::AgentService;

use super::{Reply, call_context, convert};
use crate::domain::{agents, kill_switch};
use crate::state::AppState;

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

    async fn freeze_agent(
        &self,
        request: Request<pb::FreezeAgentRequest>,
    ) -> Reply<pb::FreezeAgentResponse> {
        let ctx = call_context(&request)?;
        let req = request.into_inner();
        let (agent, swept) =
            kill_switch::freeze_agent(&self.0, &ctx, &req.agent_id, &req.reason).await?;
        Ok(Response::new(pb::FreezeAgentResponse {
            agent: Some(convert::agent(agent)),
            delegations_revoked: swept.delegations_revoked,
            step_ups_denied: swept.step_ups_denied,
        }))
    }

    async fn unfreeze_agent(
        &self,
        request: Request<pb::UnfreezeAgentRequest>,
    ) -> Reply<pb::UnfreezeAgentResponse> {
        let ctx = call_context(&request)?;
        let req = request.into_inner();
        let agent = kill_switch::unfreeze_agent(&self.0, &ctx, &req.agent_id, &req.reason).await?;
        Ok(Response::new(pb::UnfreezeAgentResponse {
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
