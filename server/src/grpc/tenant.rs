//! Adapter for TenantService: tenants, their settings and their external
//! organisation bindings (`crate::domain::tenants`).

use tonic::{Request, Response};
use vaultguard_proto::v1 as pb;
use vaultguard_proto::v1::tenant_service_server::TenantService;

use super::{Reply, call_context, convert};
use crate::domain::{kill_switch, tenants};
use crate::state::AppState;

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

    async fn freeze_tenant_traffic(
        &self,
        request: Request<pb::FreezeTenantTrafficRequest>,
    ) -> Reply<pb::FreezeTenantTrafficResponse> {
        let ctx = call_context(&request)?;
        let req = request.into_inner();
        let (view, swept) =
            kill_switch::freeze_tenant(&self.0, &ctx, &req.tenant_id, &req.reason).await?;
        Ok(Response::new(pb::FreezeTenantTrafficResponse {
            tenant: Some(convert::tenant(view)),
            delegations_revoked: swept.delegations_revoked,
            step_ups_denied: swept.step_ups_denied,
        }))
    }

    async fn unfreeze_tenant_traffic(
        &self,
        request: Request<pb::UnfreezeTenantTrafficRequest>,
    ) -> Reply<pb::UnfreezeTenantTrafficResponse> {
        let ctx = call_context(&request)?;
        let req = request.into_inner();
        let view = kill_switch::unfreeze_tenant(&self.0, &ctx, &req.tenant_id, &req.reason).await?;
        Ok(Response::new(pb::UnfreezeTenantTrafficResponse {
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
