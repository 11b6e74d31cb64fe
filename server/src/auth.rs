//! Who is calling: bearer-token authentication and the caller's standing.
//!
//! A bearer is either a VaultGuard access token (agents, CLI-minted admin and
//! operator tokens) or a JWT of a trusted OIDC issuer (tenant humans). The
//! unverified `iss` only chooses which verifier runs; nothing else in the
//! token is trusted before its signature is checked. The caller's tenant
//! comes from the verified credential only.
//!
//! Standing (the credential unexpired, an OIDC human's organisation still
//! bound, the tenant active, the agent enabled) is checked when a call is
//! admitted, and again by [`check_still_standing`] at every step of an open
//! server stream (`grpc/stream.rs`), with the same checks in the same order,
//! so a stream ends with the status a new call would get.

use serde::{Deserialize, Serialize};
use vaultguard_proto::v1::{Actor, ErrorReason, PrincipalKind, Role};

use sea_orm::DatabaseConnection;

use crate::audit::AuditCtx;
use crate::clock::Clock;
use crate::directory::Directory;
use crate::error::{Error, Result};
use crate::issuer::IssuerKeys;
use crate::oidc::OidcVerifier;
use crate::store::entities::{agent, tenant};

/// The `aud` of VaultGuard API access tokens. Delegation tokens carry the
/// receiving tenant's audience instead, so one can never stand for the other.
pub const API_AUDIENCE: &str = "vaultguard";

/// Tokens longer than this are refused before any parsing.
const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// What authentication reads: the handles it is given for one call (from
/// `AppState::authenticator`, borrowed, so nothing is cloned per call).
#[derive(Clone, Copy)]
pub struct Authenticator<'a> {
    pub db: &'a DatabaseConnection,
    pub clock: &'a dyn Clock,
    /// VaultGuard's own tokens.
    pub keys: &'a IssuerKeys,
    /// Trusted external issuers' JWTs.
    pub oidc: &'a OidcVerifier,
    /// Tenant, agent and organisation-binding rows, for the standing.
    pub directory: &'a Directory,
}

/// The claims of a VaultGuard API access token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AccessClaims {
    pub iss: String,
    pub sub: String,
    pub aud: String,
    pub iat: i64,
    pub nbf: i64,
    pub exp: i64,
    pub jti: String,
    /// The tenant of the principal; absent for the operator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tid: Option<String>,
    /// Role names: `operator`, `admin`, `approver`, `auditor`, `agent`.
    pub roles: Vec<String>,
    /// The agent's client id, for agent tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
}

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct Principal {
    pub kind: PrincipalKind,
    pub subject: String,
    pub tenant_id: Option<String>,
    pub roles: Vec<Role>,
    pub issuer: String,
    /// When the bearer (or, without one, the client certificate) expires,
    /// in seconds.
    pub expires_at: i64,
    /// For an OIDC human: the external organisation whose binding names
    /// its tenant.
    pub organization_id: Option<String>,
    /// For a call on a connection with a verified agent certificate: the
    /// certificate's `notAfter`, in seconds.
    pub certificate_expires_at: Option<i64>,
}

impl Principal {
    /// The caller as audit events record it.
    pub fn actor(&self) -> Actor {
        Actor {
            kind: self.kind as i32,
            subject: self.subject.clone(),
            tenant_id: self.tenant_id.clone().unwrap_or_default(),
        }
    }

    /// The caller's tenant; a principal without one (the operator) is refused.
    pub fn tenant_id(&self) -> Result<&str> {
        self.tenant_id.as_deref().ok_or_else(|| {
            Error::denied(
                ErrorReason::RoleRequired,
                "this call needs a tenant principal",
            )
        })
    }

    pub fn has_role(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }

    /// The agent id when the caller is an agent.
    pub fn agent_id(&self) -> Option<&str> {
        (self.kind == PrincipalKind::Agent).then_some(self.subject.as_str())
    }
}

/// The principal and request id of one call, placed in request extensions by
/// the authentication layer.
#[derive(Debug, Clone)]
pub struct CallContext {
    pub principal: Principal,
    pub request_id: String,
}

impl CallContext {
    pub fn audit(&self) -> AuditCtx {
        AuditCtx {
            actor: self.principal.actor(),
            request_id: self.request_id.clone(),
        }
    }
}

/// Parses a role name as used in tokens.
pub fn parse_role(name: &str) -> Option<Role> {
    match name {
        "operator" => Some(Role::Operator),
        "admin" => Some(Role::Admin),
        "approver" => Some(Role::Approver),
        "auditor" => Some(Role::Auditor),
        "agent" => Some(Role::Agent),
        _ => None,
    }
}

/// The name of a role as used in tokens.
pub fn role_name(role: Role) -> &'static str {
    match role {
        Role::Operator => "operator",
        Role::Admin => "admin",
        Role::Approver => "approver",
        Role::Auditor => "auditor",
        Role::Agent => "agent",
        Role::Unspecified => "unspecified",
    }
}

fn unverified_issuer(token: &str) -> Option<String> {
    use base64::Engine;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    // Only `iss` is read: serde skips the other claims without building
    // them (this runs on every call).
    #[derive(serde::Deserialize)]
    struct Issuer {
        iss: String,
    }
    serde_json::from_slice::<Issuer>(&bytes).ok().map(|c| c.iss)
}

/// Authenticates a bearer token and checks the caller's standing (tenant
/// active, agent enabled).
pub async fn authenticate(auth: Authenticator<'_>, token: &str) -> Result<Principal> {
    if token.is_empty() || token.len() > MAX_TOKEN_BYTES || token.split('.').count() != 3 {
        return Err(Error::Unauthenticated("malformed bearer token"));
    }
    let issuer = unverified_issuer(token).ok_or(Error::Unauthenticated("token has no issuer"))?;
    let principal = if issuer == auth.keys.issuer() {
        principal_from_access_token(auth, token).await?
    } else if auth.oidc.is_trusted(&issuer) {
        principal_from_oidc(auth, token, &issuer).await?
    } else {
        return Err(Error::Unauthenticated("issuer not trusted"));
    };
    check_standing(auth, &principal).await?;
    Ok(principal)
}

/// Authenticates one gRPC call from its bearer token and the client
/// certificate verified on its connection (mTLS, see `crate::tls`).
///
/// - a bearer alone: [`authenticate`];
/// - a certificate naming an agent, alone: that agent, its tenant read from
///   the agent row, its standing checked as for a bearer;
/// - both: the bearer must stand for the agent the certificate names, or the
///   call is refused (UNAUTHENTICATED), so one connection never carries two
///   identities;
/// - a certificate naming no agent leaves the bearer to decide.
pub async fn authenticate_call(
    auth: Authenticator<'_>,
    bearer: Option<&str>,
    client_certificate: Option<&rustls::pki_types::CertificateDer<'_>>,
) -> Result<Principal> {
    let certified = match client_certificate {
        Some(der) => crate::tls::certificate_agent(der, auth.clock.now_seconds())?,
        None => None,
    };
    match (bearer, certified) {
        (None, None) => Err(Error::Unauthenticated("missing bearer token")),
        (Some(token), None) => authenticate(auth, token).await,
        (None, Some(certified)) => principal_from_certificate(auth, certified).await,
        (Some(token), Some(certified)) => {
            let mut principal = authenticate(auth, token).await?;
            if principal.agent_id() != Some(certified.agent_id.as_str()) {
                return Err(Error::Unauthenticated(
                    "bearer token and client certificate name different callers",
                ));
            }
            principal.certificate_expires_at = Some(certified.expires_at);
            Ok(principal)
        }
    }
}

/// The agent a verified client certificate names, with its tenant from the
/// agent row; refuses an unknown agent and checks the standing.
async fn principal_from_certificate(
    auth: Authenticator<'_>,
    certified: crate::tls::CertificateAgent,
) -> Result<Principal> {
    let agent = auth
        .directory
        .agent(auth.db, &certified.agent_id)
        .await?
        .ok_or(Error::Unauthenticated(
            "client certificate names an unknown agent",
        ))?;
    let principal = Principal {
        kind: PrincipalKind::Agent,
        subject: agent.id,
        tenant_id: Some(agent.tenant_id),
        roles: vec![Role::Agent],
        issuer: certified.issuer,
        expires_at: certified.expires_at,
        organization_id: None,
        certificate_expires_at: Some(certified.expires_at),
    };
    check_standing(auth, &principal).await?;
    Ok(principal)
}

async fn principal_from_access_token(auth: Authenticator<'_>, token: &str) -> Result<Principal> {
    let verified = auth
        .keys
        .verify::<AccessClaims>(token, API_AUDIENCE)
        .await?;
    let claims = verified.claims;
    let roles: Vec<Role> = claims.roles.iter().filter_map(|r| parse_role(r)).collect();
    let kind = if roles.contains(&Role::Operator) {
        PrincipalKind::Operator
    } else if roles.contains(&Role::Agent) {
        PrincipalKind::Agent
    } else {
        PrincipalKind::Human
    };
    if kind != PrincipalKind::Operator && claims.tid.is_none() {
        return Err(Error::Unauthenticated("tenant principal without tenant"));
    }
    Ok(Principal {
        kind,
        subject: claims.sub,
        tenant_id: if kind == PrincipalKind::Operator {
            None
        } else {
            claims.tid
        },
        roles,
        issuer: claims.iss,
        expires_at: claims.exp,
        organization_id: None,
        certificate_expires_at: None,
    })
}

async fn principal_from_oidc(
    auth: Authenticator<'_>,
    token: &str,
    issuer: &str,
) -> Result<Principal> {
    let identity = auth.oidc.verify(token, issuer).await?;
    let tenant_id = bound_tenant(auth, &identity.issuer, &identity.organization_id).await?;
    // Humans from an external issuer get tenant roles only, never operator or agent.
    let roles: Vec<Role> = identity
        .roles
        .iter()
        .filter_map(|r| parse_role(r))
        .filter(|r| matches!(r, Role::Admin | Role::Approver | Role::Auditor))
        .collect();
    Ok(Principal {
        kind: PrincipalKind::Human,
        subject: identity.subject,
        tenant_id: Some(tenant_id),
        roles,
        issuer: identity.issuer,
        expires_at: identity.expires_at,
        organization_id: Some(identity.organization_id),
        certificate_expires_at: None,
    })
}

/// The tenant `issuer`'s organisation `organization_id` is bound to;
/// UNAUTHENTICATED with ERROR_REASON_UNKNOWN_ORGANIZATION when none.
async fn bound_tenant(
    auth: Authenticator<'_>,
    issuer: &str,
    organization_id: &str,
) -> Result<String> {
    let binding = auth
        .directory
        .organization(auth.db, issuer, organization_id)
        .await?
        .ok_or(Error::UnauthenticatedReason {
            reason: ErrorReason::UnknownOrganization,
            detail: "organisation not bound to a tenant",
        })?;
    Ok(binding.tenant_id)
}

/// Whether `principal`, authenticated when its call was admitted, still
/// stands now: what a new call with the same credential would check, in
/// the same order and with the same errors — the bearer (and the client
/// certificate) unexpired on the injected clock, an OIDC human's
/// organisation still bound to the same tenant, then [`check_standing`].
/// Open server streams call it before every message and while idle.
pub async fn check_still_standing(auth: Authenticator<'_>, principal: &Principal) -> Result<()> {
    let now = auth.clock.now_seconds();
    if principal.certificate_expires_at.is_some_and(|at| at <= now) {
        return Err(Error::Unauthenticated("client certificate expired"));
    }
    if principal.expires_at <= now {
        return Err(Error::Unauthenticated("token expired"));
    }
    if let Some(organization_id) = principal.organization_id.as_deref() {
        let tenant_id = bound_tenant(auth, &principal.issuer, organization_id).await?;
        if principal.tenant_id.as_deref() != Some(tenant_id.as_str()) {
            // Unbound and bound to another tenant since: this credential no
            // longer stands for the tenant the stream serves.
            return Err(Error::UnauthenticatedReason {
                reason: ErrorReason::UnknownOrganization,
                detail: "organisation no longer bound to the stream's tenant",
            });
        }
    }
    check_standing(auth, principal).await
}

/// Refuses principals of a suspended or unknown tenant, and disabled or
/// deleted agents, on every call (and, through [`check_still_standing`],
/// at every step of a stream).
async fn check_standing(auth: Authenticator<'_>, principal: &Principal) -> Result<()> {
    let Some(tenant_id) = principal.tenant_id.as_deref() else {
        return Ok(());
    };
    let tenant = auth
        .directory
        .tenant(auth.db, tenant_id)
        .await?
        .ok_or(Error::Unauthenticated("token names an unknown tenant"))?;
    if tenant.status != tenant::Status::Active {
        return Err(Error::denied(
            ErrorReason::TenantSuspended,
            "tenant is suspended",
        ));
    }
    if let Some(agent_id) = principal.agent_id() {
        let agent = auth
            .directory
            .agent(auth.db, agent_id)
            .await?
            .filter(|agent| agent.tenant_id == tenant_id)
            .ok_or(Error::Unauthenticated("token names an unknown agent"))?;
        if agent.status != agent::Status::Active {
            return Err(Error::denied(
                ErrorReason::AgentDisabled,
                "agent is disabled",
            ));
        }
    }
    Ok(())
}

/// Property tests of the unverified `iss` peek that picks a verifier.
#[cfg(test)]
mod props {
    use proptest::prelude::*;

    use super::*;
    use crate::props::{PURE_CASES, b64, config, jws_like};

    proptest! {
        #![proptest_config(config(PURE_CASES))]

        #[test]
        fn the_issuer_peek_never_panics(token in jws_like(Vec::new())) {
            let _ = unverified_issuer(&token);
        }

        #[test]
        fn the_issuer_peek_reads_iss_only_from_the_payload(iss in any::<String>(), header in any::<String>()) {
            let token = format!(
                "{}.{}.sig",
                b64(header.as_bytes()),
                b64(serde_json::json!({"iss": iss}).to_string().as_bytes())
            );
            prop_assert_eq!(unverified_issuer(&token), Some(iss));
        }

        #[test]
        fn role_names_round_trip(name in prop_oneof![
            "(operator|admin|approver|auditor|agent|Admin|ADMIN|unspecified)".prop_map(String::from),
            any::<String>(),
        ]) {
            if let Some(role) = parse_role(&name) {
                prop_assert_eq!(role_name(role), name.as_str());
            }
        }
    }
}
