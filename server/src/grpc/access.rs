//! The role matrix: which roles may call which RPC.
//!
//! Every RPC of the contract has exactly one entry; an RPC without one is
//! refused for everybody (a test walks the descriptor to keep it complete).
//! Finer checks — "only the receiving tenant's approver", "only the agent
//! that asked" — happen in the domain layer on top of this.

use vaultguard_proto::v1::Role;

/// Who may call an RPC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// No credential needed (token issuance, JWKS, health, reflection).
    Public,
    /// Any authenticated principal holding one of these roles.
    Roles(&'static [Role]),
}

const OPERATOR: &[Role] = &[Role::Operator];
const ADMIN: &[Role] = &[Role::Admin];
const AGENT: &[Role] = &[Role::Agent];
const ADMIN_OR_AGENT: &[Role] = &[Role::Admin, Role::Agent];
const ADMIN_OR_OPERATOR: &[Role] = &[Role::Admin, Role::Operator];
const APPROVERS: &[Role] = &[Role::Admin, Role::Approver];
const AUDIT_READERS: &[Role] = &[Role::Admin, Role::Auditor];
const DELEGATION_READERS: &[Role] = &[Role::Admin, Role::Approver, Role::Auditor, Role::Agent];
const ANYONE: &[Role] = &[
    Role::Operator,
    Role::Admin,
    Role::Approver,
    Role::Auditor,
    Role::Agent,
];

/// The matrix, by full method path.
pub const MATRIX: &[(&str, Access)] = &[
    // Identity
    (
        "/vaultguard.v1.TenantService/CreateTenant",
        Access::Roles(OPERATOR),
    ),
    (
        "/vaultguard.v1.TenantService/GetTenant",
        Access::Roles(ANYONE),
    ),
    (
        "/vaultguard.v1.TenantService/ListTenants",
        Access::Roles(OPERATOR),
    ),
    (
        "/vaultguard.v1.TenantService/SuspendTenant",
        Access::Roles(OPERATOR),
    ),
    (
        "/vaultguard.v1.TenantService/ReactivateTenant",
        Access::Roles(OPERATOR),
    ),
    (
        "/vaultguard.v1.TenantService/BindExternalOrganization",
        Access::Roles(OPERATOR),
    ),
    (
        "/vaultguard.v1.TenantService/UnbindExternalOrganization",
        Access::Roles(OPERATOR),
    ),
    (
        "/vaultguard.v1.TenantService/UpdateTenantSettings",
        Access::Roles(ADMIN),
    ),
    (
        "/vaultguard.v1.TenantService/FreezeTenantTraffic",
        Access::Roles(ADMIN_OR_OPERATOR),
    ),
    (
        "/vaultguard.v1.TenantService/UnfreezeTenantTraffic",
        Access::Roles(ADMIN_OR_OPERATOR),
    ),
    (
        "/vaultguard.v1.AgentService/CreateAgent",
        Access::Roles(ADMIN),
    ),
    ("/vaultguard.v1.AgentService/GetAgent", Access::Roles(ADMIN)),
    (
        "/vaultguard.v1.AgentService/ListAgents",
        Access::Roles(ADMIN),
    ),
    (
        "/vaultguard.v1.AgentService/DisableAgent",
        Access::Roles(ADMIN),
    ),
    (
        "/vaultguard.v1.AgentService/EnableAgent",
        Access::Roles(ADMIN),
    ),
    (
        "/vaultguard.v1.AgentService/RotateAgentSecret",
        Access::Roles(ADMIN),
    ),
    (
        "/vaultguard.v1.AgentService/FreezeAgent",
        Access::Roles(ADMIN_OR_OPERATOR),
    ),
    (
        "/vaultguard.v1.AgentService/UnfreezeAgent",
        Access::Roles(ADMIN_OR_OPERATOR),
    ),
    ("/vaultguard.v1.AuthService/IssueToken", Access::Public),
    ("/vaultguard.v1.AuthService/WhoAmI", Access::Roles(ANYONE)),
    ("/vaultguard.v1.IssuerKeyService/GetJwks", Access::Public),
    (
        "/vaultguard.v1.IssuerKeyService/ListIssuerKeys",
        Access::Roles(OPERATOR),
    ),
    (
        "/vaultguard.v1.IssuerKeyService/RotateIssuerKey",
        Access::Roles(OPERATOR),
    ),
    // Policies
    (
        "/vaultguard.v1.PolicyService/CreateRule",
        Access::Roles(ADMIN),
    ),
    ("/vaultguard.v1.PolicyService/GetRule", Access::Roles(ADMIN)),
    (
        "/vaultguard.v1.PolicyService/ListRules",
        Access::Roles(ADMIN),
    ),
    (
        "/vaultguard.v1.PolicyService/UpdateRule",
        Access::Roles(ADMIN),
    ),
    (
        "/vaultguard.v1.PolicyService/DeleteRule",
        Access::Roles(ADMIN),
    ),
    (
        "/vaultguard.v1.PolicyService/EvaluatePolicy",
        Access::Roles(ADMIN_OR_AGENT),
    ),
    (
        "/vaultguard.v1.PolicyService/GetPolicySettings",
        Access::Roles(ADMIN),
    ),
    (
        "/vaultguard.v1.PolicyService/UpdatePolicySettings",
        Access::Roles(ADMIN),
    ),
    (
        "/vaultguard.v1.PolicyService/CreateBudget",
        Access::Roles(ADMIN),
    ),
    (
        "/vaultguard.v1.PolicyService/GetBudget",
        Access::Roles(AUDIT_READERS),
    ),
    (
        "/vaultguard.v1.PolicyService/ListBudgets",
        Access::Roles(AUDIT_READERS),
    ),
    (
        "/vaultguard.v1.PolicyService/UpdateBudget",
        Access::Roles(ADMIN),
    ),
    (
        "/vaultguard.v1.PolicyService/DeleteBudget",
        Access::Roles(ADMIN),
    ),
    // Delegations
    (
        "/vaultguard.v1.DelegationService/RequestDelegation",
        Access::Roles(AGENT),
    ),
    (
        "/vaultguard.v1.DelegationService/GetDelegation",
        Access::Roles(DELEGATION_READERS),
    ),
    (
        "/vaultguard.v1.DelegationService/ListDelegations",
        Access::Roles(DELEGATION_READERS),
    ),
    (
        "/vaultguard.v1.DelegationService/RevokeDelegation",
        Access::Roles(ADMIN),
    ),
    (
        "/vaultguard.v1.DelegationService/RelinquishDelegation",
        Access::Roles(ADMIN_OR_AGENT),
    ),
    (
        "/vaultguard.v1.DelegationService/VerifyDelegationToken",
        Access::Roles(ADMIN_OR_AGENT),
    ),
    // Step-up
    (
        "/vaultguard.v1.StepUpService/PollStepUp",
        Access::Roles(AGENT),
    ),
    (
        "/vaultguard.v1.StepUpService/WatchStepUp",
        Access::Roles(AGENT),
    ),
    (
        "/vaultguard.v1.StepUpService/GetStepUp",
        Access::Roles(APPROVERS),
    ),
    (
        "/vaultguard.v1.StepUpService/ListPendingStepUps",
        Access::Roles(APPROVERS),
    ),
    (
        "/vaultguard.v1.StepUpService/WatchPendingStepUps",
        Access::Roles(APPROVERS),
    ),
    (
        "/vaultguard.v1.StepUpService/ApproveStepUp",
        Access::Roles(APPROVERS),
    ),
    (
        "/vaultguard.v1.StepUpService/DenyStepUp",
        Access::Roles(APPROVERS),
    ),
    (
        "/vaultguard.v1.StepUpService/SetApprovalWebhook",
        Access::Roles(ADMIN),
    ),
    (
        "/vaultguard.v1.StepUpService/GetApprovalWebhook",
        Access::Roles(ADMIN),
    ),
    // Vault
    (
        "/vaultguard.v1.VaultService/CreateOAuthProvider",
        Access::Roles(ADMIN),
    ),
    (
        "/vaultguard.v1.VaultService/GetOAuthProvider",
        Access::Roles(ADMIN),
    ),
    (
        "/vaultguard.v1.VaultService/ListOAuthProviders",
        Access::Roles(ADMIN),
    ),
    (
        "/vaultguard.v1.VaultService/UpdateOAuthProvider",
        Access::Roles(ADMIN),
    ),
    (
        "/vaultguard.v1.VaultService/DeleteOAuthProvider",
        Access::Roles(ADMIN),
    ),
    (
        "/vaultguard.v1.VaultService/StartConnection",
        Access::Roles(ADMIN),
    ),
    (
        "/vaultguard.v1.VaultService/GetConnection",
        Access::Roles(ADMIN),
    ),
    (
        "/vaultguard.v1.VaultService/ListConnections",
        Access::Roles(ADMIN),
    ),
    (
        "/vaultguard.v1.VaultService/DeleteConnection",
        Access::Roles(ADMIN),
    ),
    (
        "/vaultguard.v1.VaultService/ExchangeToken",
        Access::Roles(AGENT),
    ),
    (
        "/vaultguard.v1.VaultService/CreateSigningKey",
        Access::Roles(ADMIN),
    ),
    (
        "/vaultguard.v1.VaultService/GetSigningKey",
        Access::Roles(ADMIN_OR_AGENT),
    ),
    (
        "/vaultguard.v1.VaultService/ListSigningKeys",
        Access::Roles(ADMIN_OR_AGENT),
    ),
    (
        "/vaultguard.v1.VaultService/UpdateSigningKey",
        Access::Roles(ADMIN),
    ),
    (
        "/vaultguard.v1.VaultService/DisableSigningKey",
        Access::Roles(ADMIN),
    ),
    ("/vaultguard.v1.VaultService/Sign", Access::Roles(AGENT)),
    (
        "/vaultguard.v1.VaultService/GetVaultSettings",
        Access::Roles(ADMIN),
    ),
    (
        "/vaultguard.v1.VaultService/UpdateVaultSettings",
        Access::Roles(ADMIN),
    ),
    // Audit
    (
        "/vaultguard.v1.AuditService/ListAuditEvents",
        Access::Roles(AUDIT_READERS),
    ),
    (
        "/vaultguard.v1.AuditService/TailAuditEvents",
        Access::Roles(AUDIT_READERS),
    ),
    (
        "/vaultguard.v1.AuditService/ExportAuditEvents",
        Access::Roles(AUDIT_READERS),
    ),
    (
        "/vaultguard.v1.AuditService/VerifyAuditChain",
        Access::Roles(AUDIT_READERS),
    ),
];

/// The access rule of a request path; `None` means the path is unknown.
pub fn access_for(path: &str) -> Option<Access> {
    if path.starts_with("/grpc.health.v1.Health/") || path.starts_with("/grpc.reflection.") {
        return Some(Access::Public);
    }
    MATRIX
        .iter()
        .find(|(method, _)| *method == path)
        .map(|(_, access)| *access)
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    #[test]
    fn every_rpc_of_the_contract_has_an_entry() {
        let set =
            prost_types::FileDescriptorSet::decode(vaultguard_proto::FILE_DESCRIPTOR_SET).unwrap();
        let mut missing = Vec::new();
        let mut count = 0;
        for file in &set.file {
            for service in &file.service {
                for method in &service.method {
                    count += 1;
                    let path = format!("/{}.{}/{}", file.package(), service.name(), method.name());
                    if access_for(&path).is_none() {
                        missing.push(path);
                    }
                }
            }
        }
        assert!(
            missing.is_empty(),
            "RPCs without an access rule: {missing:?}"
        );
        assert_eq!(
            count,
            MATRIX.len(),
            "the matrix names RPCs the contract does not have"
        );
    }
}
