//! Access tokens: the client-credentials grant for agents, and tokens minted
//! by the CLI for operators and tenant humans.

use sea_orm::EntityTrait;
use serde_json::json;
use vaultguard_proto::v1::{Actor, PrincipalKind, Role, TokenAlgorithm};

use crate::audit::{AuditCtx, Outcome};
use crate::auth::{API_AUDIENCE, AccessClaims, role_name};
use crate::error::{Error, Result, Violations};
use crate::ids::{IdKind, check_id};
use crate::state::AppState;
use crate::store::entities::{agent, tenant};

/// An issued access token.
#[derive(Clone)]
pub struct IssuedToken {
    pub access_token: String,
    pub expires_in: u32,
}

/// Without the token: a bearer credential must not reach a log.
impl std::fmt::Debug for IssuedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedToken")
            .field("expires_in", &self.expires_in)
            .finish_non_exhaustive()
    }
}

/// Signs an API access token.
pub async fn mint(
    state: &AppState,
    subject: &str,
    tenant_id: Option<&str>,
    roles: &[Role],
    client_id: Option<&str>,
    ttl_seconds: u32,
) -> Result<IssuedToken> {
    let now = state.clock.now_seconds();
    let claims = AccessClaims {
        iss: state.keys.issuer().to_owned(),
        sub: subject.to_owned(),
        aud: API_AUDIENCE.to_owned(),
        iat: now,
        nbf: now,
        exp: now + i64::from(ttl_seconds),
        jti: uuid::Uuid::new_v4().simple().to_string(),
        tid: tenant_id.map(str::to_owned),
        roles: roles.iter().map(|r| role_name(*r).to_owned()).collect(),
        client_id: client_id.map(str::to_owned),
    };
    let value = serde_json::to_value(&claims).map_err(Error::internal)?;
    let (access_token, _kid) = state.keys.sign(TokenAlgorithm::Rs256, &value).await?;
    Ok(IssuedToken {
        access_token,
        expires_in: ttl_seconds,
    })
}

/// The OAuth 2.0 client-credentials grant. Every refusal is the same
/// UNAUTHENTICATED to the caller; when the agent exists, its tenant's audit
/// log records the refusal and why (at most `refusal_audit_events_per_window`
/// events per `client_id` and window, see [`crate::audit::RefusalDebounce`]).
pub async fn client_credentials(
    state: &AppState,
    request_id: &str,
    grant_type: &str,
    client_id: &str,
    client_secret: &str,
) -> Result<IssuedToken> {
    let mut violations = Violations::new();
    if grant_type != "client_credentials" {
        violations.add("grant_type", "must be \"client_credentials\"");
    }
    violations.check(check_id("client_id", client_id, IdKind::Agent));
    if client_secret.is_empty() {
        violations.add("client_secret", "is required");
    } else if client_secret.len() > 256 {
        violations.add("client_secret", "must be at most 256 characters");
    }
    violations.finish()?;

    let Some(agent) = agent::Entity::find_by_id(client_id.to_owned())
        .one(&state.db)
        .await?
    else {
        return Err(Error::Unauthenticated("unknown client_id"));
    };
    let tenant = tenant::Entity::find_by_id(agent.tenant_id.clone())
        .one(&state.db)
        .await?
        .ok_or(Error::Unauthenticated("agent without tenant"))?;
    let refusal = if !state
        .master
        .verify_secret(client_secret, &agent.secret_digest)
    {
        Some("invalid_client_secret")
    } else if agent.status != agent::Status::Active {
        Some("agent_disabled")
    } else if tenant.status != tenant::Status::Active {
        Some("tenant_suspended")
    } else {
        None
    };
    let audit_ctx = AuditCtx {
        actor: Actor {
            kind: PrincipalKind::Agent as i32,
            subject: agent.id.clone(),
            tenant_id: agent.tenant_id.clone(),
        },
        request_id: request_id.to_owned(),
    };
    if let Some(reason) = refusal {
        // Anyone who knows a client_id can be refused: debounced per
        // client_id, so that a guessing loop cannot grow the tenant's log
        // without bound (the count of the refusals not written is in the
        // next event written).
        state
            .record_refusal(
                format!("auth.token_refused|{}", agent.id),
                vec![audit_ctx.event(
                    &agent.tenant_id,
                    "auth.token_refused",
                    vec![agent.id.clone()],
                    Outcome::Denied,
                    json!({"reason": reason}),
                )],
            )
            .await?;
        return Err(Error::Unauthenticated(reason));
    }
    let ttl = state.config.access_token_ttl_seconds;
    let issued = mint(
        state,
        &agent.id,
        Some(&agent.tenant_id),
        &[Role::Agent],
        Some(&agent.id),
        ttl,
    )
    .await?;
    state
        .record(vec![audit_ctx.event(
            &agent.tenant_id,
            "auth.token_issued",
            vec![agent.id.clone()],
            Outcome::Success,
            json!({"expires_in": ttl}),
        )])
        .await?;
    Ok(issued)
}

#[cfg(test)]
mod tests {
    use super::IssuedToken;

    #[test]
    fn an_issued_token_never_prints_its_token() {
        let issued = IssuedToken {
            access_token: "eyJ.secret.sig".to_owned(),
            expires_in: 900,
        };
        let printed = format!("{issued:?}");
        assert!(!printed.contains("secret"), "{printed}");
        assert!(printed.contains("900"), "{printed}");
    }
}
