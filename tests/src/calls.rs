//! The calls many tests make, by the ids they take: each builds its request
//! from plain values, sends it with [`Rpc`] and answers the object the
//! response carries (an absent one is a malformed response, never a pass).

use vaultguard_client::{ClientError, VaultGuardClient, pb};

use crate::Rpc;

/// `value` or, if the response lacked it, a malformed-response error naming
/// `what`.
fn present<T>(value: Option<T>, what: &'static str) -> Result<T, ClientError> {
    value.ok_or(ClientError::MalformedResponse(what))
}

// ---------------------------------------------------------------------------
// AgentService.

/// GetAgent.
pub async fn get_agent(
    client: &VaultGuardClient,
    agent_id: &str,
) -> Result<pb::GetAgentResponse, ClientError> {
    let agent_id = agent_id.to_owned();
    client.get_agent(pb::GetAgentRequest { agent_id }).await
}

/// RotateAgentSecret: the agent's new secret comes back once.
pub async fn rotate_secret(
    admin: &VaultGuardClient,
    agent_id: &str,
) -> Result<pb::RotateAgentSecretResponse, ClientError> {
    let agent_id = agent_id.to_owned();
    let request = pb::RotateAgentSecretRequest { agent_id };
    admin.rotate_agent_secret(request).await
}

// ---------------------------------------------------------------------------
// IssuerKeyService.

/// RotateIssuerKey to a new key of `algorithm`, as the operator; must succeed.
pub async fn rotate_issuer_key(
    operator: &VaultGuardClient,
    algorithm: pb::TokenAlgorithm,
) -> pb::RotateIssuerKeyResponse {
    let algorithm = algorithm as i32;
    let request = pb::RotateIssuerKeyRequest { algorithm };
    operator.rotate_issuer_key(request).await.expect("rotate")
}

// ---------------------------------------------------------------------------
// PolicyService.

/// GetRule: the stored rule.
pub async fn get_rule(admin: &VaultGuardClient, rule_id: &str) -> Result<pb::Rule, ClientError> {
    let rule_id = rule_id.to_owned();
    let response = admin.get_rule(pb::GetRuleRequest { rule_id }).await?;
    present(response.rule, "GetRule without rule")
}

/// UpdateRule: `rule` replaces the stored one at `expected_version`.
pub async fn update_rule(
    admin: &VaultGuardClient,
    rule: pb::Rule,
    expected_version: u64,
) -> Result<pb::UpdateRuleResponse, ClientError> {
    let rule = Some(rule);
    let request = pb::UpdateRuleRequest {
        rule,
        expected_version,
    };
    admin.update_rule(request).await
}

/// DeleteRule at `expected_version`.
pub async fn delete_rule(
    admin: &VaultGuardClient,
    rule_id: &str,
    expected_version: u64,
) -> Result<pb::DeleteRuleResponse, ClientError> {
    let rule_id = rule_id.to_owned();
    let request = pb::DeleteRuleRequest {
        rule_id,
        expected_version,
    };
    admin.delete_rule(request).await
}

// ---------------------------------------------------------------------------
// StepUpService.

/// PollStepUp as the agent that asked.
pub async fn poll(
    agent: &VaultGuardClient,
    auth_req_id: &str,
) -> Result<pb::PollStepUpResponse, ClientError> {
    let auth_req_id = auth_req_id.to_owned();
    agent
        .poll_step_up(pb::PollStepUpRequest { auth_req_id })
        .await
}

/// GetStepUp as `approver`.
pub async fn get_step_up(
    approver: &VaultGuardClient,
    step_up_id: &str,
) -> Result<pb::StepUp, ClientError> {
    let step_up_id = step_up_id.to_owned();
    let response = approver
        .get_step_up(pb::GetStepUpRequest { step_up_id })
        .await?;
    present(response.step_up, "GetStepUp without step_up")
}

/// ApproveStepUp as `approver`, echoing `request_hash`.
pub async fn approve_step_up(
    approver: &VaultGuardClient,
    step_up_id: &str,
    request_hash: &str,
) -> Result<pb::ApproveStepUpResponse, ClientError> {
    approver
        .approve_step_up(pb::ApproveStepUpRequest {
            step_up_id: step_up_id.to_owned(),
            request_hash: request_hash.to_owned(),
            comment: String::new(),
        })
        .await
}

/// DenyStepUp as `approver` with `reason`: the denied step-up.
pub async fn deny(
    approver: &VaultGuardClient,
    step_up_id: &str,
    reason: &str,
) -> Result<pb::StepUp, ClientError> {
    let (step_up_id, reason) = (step_up_id.to_owned(), reason.to_owned());
    let request = pb::DenyStepUpRequest { step_up_id, reason };
    let response = approver.deny_step_up(request).await?;
    present(response.step_up, "DenyStepUp without step_up")
}

/// SetApprovalWebhook: the tenant's approval webhook becomes `url`.
pub async fn set_webhook(
    admin: &VaultGuardClient,
    url: &str,
) -> Result<pb::SetApprovalWebhookResponse, ClientError> {
    let url = url.to_owned();
    admin
        .set_approval_webhook(pb::SetApprovalWebhookRequest { url })
        .await
}

/// GetApprovalWebhook.
pub async fn get_webhook(
    admin: &VaultGuardClient,
) -> Result<pb::GetApprovalWebhookResponse, ClientError> {
    admin
        .get_approval_webhook(pb::GetApprovalWebhookRequest {})
        .await
}

/// The webhook as GetApprovalWebhook shows it; there must be one.
pub async fn webhook(admin: &VaultGuardClient) -> pb::ApprovalWebhook {
    let response = get_webhook(admin).await.expect("get webhook");
    response.webhook.expect("webhook")
}

// ---------------------------------------------------------------------------
// VaultService.

/// CreateOAuthProvider: the stored provider.
pub async fn create_provider(
    admin: &VaultGuardClient,
    input: pb::CreateOAuthProviderRequest,
) -> Result<pb::OAuthProvider, ClientError> {
    let response = admin.create_o_auth_provider(input).await?;
    present(response.provider, "CreateOAuthProvider without provider")
}

/// GetOAuthProvider: the stored provider.
pub async fn get_provider(
    admin: &VaultGuardClient,
    provider_id: &str,
) -> Result<pb::OAuthProvider, ClientError> {
    let provider_id = provider_id.to_owned();
    let request = pb::GetOAuthProviderRequest { provider_id };
    let response = admin.get_o_auth_provider(request).await?;
    present(response.provider, "GetOAuthProvider without provider")
}

/// DeleteOAuthProvider.
pub async fn delete_provider(
    admin: &VaultGuardClient,
    provider_id: &str,
) -> Result<(), ClientError> {
    let provider_id = provider_id.to_owned();
    let request = pb::DeleteOAuthProviderRequest { provider_id };
    admin.delete_o_auth_provider(request).await.map(drop)
}

/// GetConnection: the stored connection.
pub async fn get_connection(
    admin: &VaultGuardClient,
    connection_id: &str,
) -> Result<pb::Connection, ClientError> {
    let connection_id = connection_id.to_owned();
    let request = pb::GetConnectionRequest { connection_id };
    let response = admin.get_connection(request).await?;
    present(response.connection, "GetConnection without connection")
}

/// DeleteConnection.
pub async fn delete_connection(
    admin: &VaultGuardClient,
    connection_id: &str,
) -> Result<pb::DeleteConnectionResponse, ClientError> {
    let connection_id = connection_id.to_owned();
    let request = pb::DeleteConnectionRequest { connection_id };
    admin.delete_connection(request).await
}

/// GetSigningKey: the key as `client` sees it.
pub async fn get_key(
    client: &VaultGuardClient,
    key_id: &str,
) -> Result<pb::SigningKey, ClientError> {
    let key_id = key_id.to_owned();
    let response = client
        .get_signing_key(pb::GetSigningKeyRequest { key_id })
        .await?;
    present(response.key, "GetSigningKey without key")
}

/// UpdateSigningKey setting `disable_digest_signing`, with the reason
/// "transactions only": the key with its settings now.
pub async fn set_digest_signing_disabled(
    admin: &VaultGuardClient,
    key_id: &str,
    disabled: bool,
) -> Result<pb::SigningKey, ClientError> {
    let request = pb::UpdateSigningKeyRequest {
        key_id: key_id.to_owned(),
        disable_digest_signing: Some(disabled),
        reason: "transactions only".to_owned(),
    };
    let response = admin.update_signing_key(request).await?;
    present(response.key, "UpdateSigningKey without key")
}

/// DisableSigningKey with the reason "rotated out": the disabled key.
pub async fn disable_key(
    admin: &VaultGuardClient,
    key_id: &str,
) -> Result<pb::SigningKey, ClientError> {
    let (key_id, reason) = (key_id.to_owned(), "rotated out".to_owned());
    let request = pb::DisableSigningKeyRequest { key_id, reason };
    let response = admin.disable_signing_key(request).await?;
    present(response.key, "DisableSigningKey without key")
}
