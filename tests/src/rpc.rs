//! Every RPC as one call on an authenticated [`VaultGuardClient`]: the
//! message goes in, the response (or the stream) comes out, and both a
//! failure to obtain the caller's token and the server's status come back as
//! [`ClientError`] — what `client.request(message)` followed by
//! `client.<service>().<rpc>(request).into_inner()` answers, in one line.
//!
//! The methods bear tonic's names. Where the SDK already has a method of the
//! same name with its own help (an idempotency key filled in, the
//! delegation taken out of the response), the plain RPC is `raw_<name>`.

use std::future::Future;

use vaultguard_client::{ClientError, VaultGuardClient, pb};

/// What a call needs from its caller: the generated stubs (on the channel)
/// and the request carrying the caller's credentials and metadata.
pub trait Caller: Sync {
    /// The client whose channel and stubs the call uses.
    fn client(&self) -> &VaultGuardClient;

    /// `message` as a request of this caller.
    fn prepare<T: Send>(
        &self,
        message: T,
    ) -> impl Future<Output = Result<tonic::Request<T>, ClientError>> + Send;
}

impl Caller for VaultGuardClient {
    fn client(&self) -> &VaultGuardClient {
        self
    }

    async fn prepare<T: Send>(&self, message: T) -> Result<tonic::Request<T>, ClientError> {
        self.request(message).await
    }
}

/// A client whose calls carry `x-request-id` (see [`Tag::tagged`]).
pub struct Tagged<'a> {
    client: &'a VaultGuardClient,
    request_id: String,
}

impl Caller for Tagged<'_> {
    fn client(&self) -> &VaultGuardClient {
        self.client
    }

    async fn prepare<T: Send>(&self, message: T) -> Result<tonic::Request<T>, ClientError> {
        let mut request = self.client.request(message).await?;
        let value = self.request_id.parse().expect("an ASCII request id");
        request.metadata_mut().insert("x-request-id", value);
        Ok(request)
    }
}

/// Calls that name themselves in the audit log.
pub trait Tag {
    /// This client, its calls carrying `x-request-id: request_id`.
    fn tagged(&self, request_id: impl Into<String>) -> Tagged<'_>;
}

impl Tag for VaultGuardClient {
    fn tagged(&self, request_id: impl Into<String>) -> Tagged<'_> {
        Tagged {
            client: self,
            request_id: request_id.into(),
        }
    }
}

macro_rules! rpcs {
    ($($name:ident => $service:ident . $rpc:ident ($request:ty) -> $response:ty;)*) => {
        /// One method per RPC; see the module's documentation.
        pub trait Rpc {
            $(
                #[doc = concat!("`", stringify!($rpc), "` as this client.")]
                fn $name(
                    &self,
                    message: $request,
                ) -> impl Future<Output = Result<$response, ClientError>> + Send;
            )*
        }

        impl<C: Caller> Rpc for C {
            $(
                async fn $name(&self, message: $request) -> Result<$response, ClientError> {
                    let request = self.prepare(message).await?;
                    Ok(self.client().$service().$rpc(request).await?.into_inner())
                }
            )*
        }
    };
}

rpcs! {
    create_agent => agents.create_agent(pb::CreateAgentRequest) -> pb::CreateAgentResponse;
    get_agent => agents.get_agent(pb::GetAgentRequest) -> pb::GetAgentResponse;
    list_agents => agents.list_agents(pb::ListAgentsRequest) -> pb::ListAgentsResponse;
    disable_agent => agents.disable_agent(pb::DisableAgentRequest) -> pb::DisableAgentResponse;
    enable_agent => agents.enable_agent(pb::EnableAgentRequest) -> pb::EnableAgentResponse;
    rotate_agent_secret => agents.rotate_agent_secret(pb::RotateAgentSecretRequest) -> pb::RotateAgentSecretResponse;
    freeze_agent => agents.freeze_agent(pb::FreezeAgentRequest) -> pb::FreezeAgentResponse;
    unfreeze_agent => agents.unfreeze_agent(pb::UnfreezeAgentRequest) -> pb::UnfreezeAgentResponse;
    list_audit_events => audit.list_audit_events(pb::ListAuditEventsRequest) -> pb::ListAuditEventsResponse;
    tail_audit_events => audit.tail_audit_events(pb::TailAuditEventsRequest) -> tonic::Streaming<pb::TailAuditEventsResponse>;
    export_audit_events => audit.export_audit_events(pb::ExportAuditEventsRequest) -> tonic::Streaming<pb::ExportAuditEventsResponse>;
    verify_audit_chain => audit.verify_audit_chain(pb::VerifyAuditChainRequest) -> pb::VerifyAuditChainResponse;
    raw_issue_token => auth.issue_token(pb::IssueTokenRequest) -> pb::IssueTokenResponse;
    raw_who_am_i => auth.who_am_i(pb::WhoAmIRequest) -> pb::WhoAmIResponse;
    raw_request_delegation => delegations.request_delegation(pb::RequestDelegationRequest) -> pb::RequestDelegationResponse;
    raw_get_delegation => delegations.get_delegation(pb::GetDelegationRequest) -> pb::GetDelegationResponse;
    list_delegations => delegations.list_delegations(pb::ListDelegationsRequest) -> pb::ListDelegationsResponse;
    revoke_delegation => delegations.revoke_delegation(pb::RevokeDelegationRequest) -> pb::RevokeDelegationResponse;
    relinquish_delegation => delegations.relinquish_delegation(pb::RelinquishDelegationRequest) -> pb::RelinquishDelegationResponse;
    verify_delegation_token => delegations.verify_delegation_token(pb::VerifyDelegationTokenRequest) -> pb::VerifyDelegationTokenResponse;
    get_jwks => issuer_keys.get_jwks(pb::GetJwksRequest) -> pb::GetJwksResponse;
    list_issuer_keys => issuer_keys.list_issuer_keys(pb::ListIssuerKeysRequest) -> pb::ListIssuerKeysResponse;
    rotate_issuer_key => issuer_keys.rotate_issuer_key(pb::RotateIssuerKeyRequest) -> pb::RotateIssuerKeyResponse;
    create_rule => policies.create_rule(pb::CreateRuleRequest) -> pb::CreateRuleResponse;
    get_rule => policies.get_rule(pb::GetRuleRequest) -> pb::GetRuleResponse;
    list_rules => policies.list_rules(pb::ListRulesRequest) -> pb::ListRulesResponse;
    update_rule => policies.update_rule(pb::UpdateRuleRequest) -> pb::UpdateRuleResponse;
    delete_rule => policies.delete_rule(pb::DeleteRuleRequest) -> pb::DeleteRuleResponse;
    evaluate_policy => policies.evaluate_policy(pb::EvaluatePolicyRequest) -> pb::EvaluatePolicyResponse;
    get_policy_settings => policies.get_policy_settings(pb::GetPolicySettingsRequest) -> pb::GetPolicySettingsResponse;
    update_policy_settings => policies.update_policy_settings(pb::UpdatePolicySettingsRequest) -> pb::UpdatePolicySettingsResponse;
    create_budget => policies.create_budget(pb::CreateBudgetRequest) -> pb::CreateBudgetResponse;
    get_budget => policies.get_budget(pb::GetBudgetRequest) -> pb::GetBudgetResponse;
    list_budgets => policies.list_budgets(pb::ListBudgetsRequest) -> pb::ListBudgetsResponse;
    update_budget => policies.update_budget(pb::UpdateBudgetRequest) -> pb::UpdateBudgetResponse;
    delete_budget => policies.delete_budget(pb::DeleteBudgetRequest) -> pb::DeleteBudgetResponse;
    poll_step_up => step_ups.poll_step_up(pb::PollStepUpRequest) -> pb::PollStepUpResponse;
    watch_step_up => step_ups.watch_step_up(pb::WatchStepUpRequest) -> tonic::Streaming<pb::WatchStepUpResponse>;
    get_step_up => step_ups.get_step_up(pb::GetStepUpRequest) -> pb::GetStepUpResponse;
    list_pending_step_ups => step_ups.list_pending_step_ups(pb::ListPendingStepUpsRequest) -> pb::ListPendingStepUpsResponse;
    watch_pending_step_ups => step_ups.watch_pending_step_ups(pb::WatchPendingStepUpsRequest) -> tonic::Streaming<pb::WatchPendingStepUpsResponse>;
    approve_step_up => step_ups.approve_step_up(pb::ApproveStepUpRequest) -> pb::ApproveStepUpResponse;
    deny_step_up => step_ups.deny_step_up(pb::DenyStepUpRequest) -> pb::DenyStepUpResponse;
    set_approval_webhook => step_ups.set_approval_webhook(pb::SetApprovalWebhookRequest) -> pb::SetApprovalWebhookResponse;
    get_approval_webhook => step_ups.get_approval_webhook(pb::GetApprovalWebhookRequest) -> pb::GetApprovalWebhookResponse;
    create_tenant => tenants.create_tenant(pb::CreateTenantRequest) -> pb::CreateTenantResponse;
    get_tenant => tenants.get_tenant(pb::GetTenantRequest) -> pb::GetTenantResponse;
    list_tenants => tenants.list_tenants(pb::ListTenantsRequest) -> pb::ListTenantsResponse;
    suspend_tenant => tenants.suspend_tenant(pb::SuspendTenantRequest) -> pb::SuspendTenantResponse;
    reactivate_tenant => tenants.reactivate_tenant(pb::ReactivateTenantRequest) -> pb::ReactivateTenantResponse;
    bind_external_organization => tenants.bind_external_organization(pb::BindExternalOrganizationRequest) -> pb::BindExternalOrganizationResponse;
    unbind_external_organization => tenants.unbind_external_organization(pb::UnbindExternalOrganizationRequest) -> pb::UnbindExternalOrganizationResponse;
    update_tenant_settings => tenants.update_tenant_settings(pb::UpdateTenantSettingsRequest) -> pb::UpdateTenantSettingsResponse;
    freeze_tenant_traffic => tenants.freeze_tenant_traffic(pb::FreezeTenantTrafficRequest) -> pb::FreezeTenantTrafficResponse;
    unfreeze_tenant_traffic => tenants.unfreeze_tenant_traffic(pb::UnfreezeTenantTrafficRequest) -> pb::UnfreezeTenantTrafficResponse;
    create_o_auth_provider => vault.create_o_auth_provider(pb::CreateOAuthProviderRequest) -> pb::CreateOAuthProviderResponse;
    get_o_auth_provider => vault.get_o_auth_provider(pb::GetOAuthProviderRequest) -> pb::GetOAuthProviderResponse;
    list_o_auth_providers => vault.list_o_auth_providers(pb::ListOAuthProvidersRequest) -> pb::ListOAuthProvidersResponse;
    update_o_auth_provider => vault.update_o_auth_provider(pb::UpdateOAuthProviderRequest) -> pb::UpdateOAuthProviderResponse;
    delete_o_auth_provider => vault.delete_o_auth_provider(pb::DeleteOAuthProviderRequest) -> pb::DeleteOAuthProviderResponse;
    start_connection => vault.start_connection(pb::StartConnectionRequest) -> pb::StartConnectionResponse;
    get_connection => vault.get_connection(pb::GetConnectionRequest) -> pb::GetConnectionResponse;
    list_connections => vault.list_connections(pb::ListConnectionsRequest) -> pb::ListConnectionsResponse;
    delete_connection => vault.delete_connection(pb::DeleteConnectionRequest) -> pb::DeleteConnectionResponse;
    exchange_token => vault.exchange_token(pb::ExchangeTokenRequest) -> pb::ExchangeTokenResponse;
    create_signing_key => vault.create_signing_key(pb::CreateSigningKeyRequest) -> pb::CreateSigningKeyResponse;
    get_signing_key => vault.get_signing_key(pb::GetSigningKeyRequest) -> pb::GetSigningKeyResponse;
    list_signing_keys => vault.list_signing_keys(pb::ListSigningKeysRequest) -> pb::ListSigningKeysResponse;
    update_signing_key => vault.update_signing_key(pb::UpdateSigningKeyRequest) -> pb::UpdateSigningKeyResponse;
    disable_signing_key => vault.disable_signing_key(pb::DisableSigningKeyRequest) -> pb::DisableSigningKeyResponse;
    raw_sign => vault.sign(pb::SignRequest) -> pb::SignResponse;
    get_vault_settings => vault.get_vault_settings(pb::GetVaultSettingsRequest) -> pb::GetVaultSettingsResponse;
    update_vault_settings => vault.update_vault_settings(pb::UpdateVaultSettingsRequest) -> pb::UpdateVaultSettingsResponse;
}
