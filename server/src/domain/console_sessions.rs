//! The console's sign-in: sessions, one-time links and OIDC sign-ins.
//!
//! A person signs in either with a trusted issuer (authorization code with
//! PKCE; the ID token's organisation and roles are mapped exactly as a
//! bearer token's) or with a one-time link printed by
//! `vaultguard console-link`. Either way they get a session: a random
//! secret in an HttpOnly cookie, stored only as its SHA-256. The console
//! never calls the API with the session itself: it asks for a short-lived
//! VaultGuard access token ([`token`]), minted for the session's tenant,
//! subject and roles only while the session still stands (unexpired, the
//! tenant active, an issuer's organisation still bound to the same tenant),
//! and calls the gRPC services with it like any other client. Every
//! sign-in, link and sign-out is in the tenant's audit log.
//!
//! Time is a parameter (`now`, milliseconds) of every function.

use sea_orm::{ActiveValue::Set, ColumnTrait, EntityTrait, QueryFilter, sea_query::Expr};
use serde_json::json;
use vaultguard_proto::v1::{Actor, PrincipalKind, Role};

use crate::audit::{AuditCtx, Outcome};
use crate::auth::{parse_role, role_name};
use crate::clock::Millis;
use crate::config::TrustedIssuer;
use crate::crypto::{SealContext, random_token, sha256_hex};
use crate::error::Error;
use crate::oauth_client::ClientAuth;
use crate::state::AppState;
use crate::store::entities::{console_link, console_login, console_session, tenant};

use super::tokens::{self, IssuedToken};

/// How long an OIDC sign-in may take between the redirect and the callback.
pub const LOGIN_TTL_MILLIS: Millis = 10 * 60 * 1000;
/// The longest console access token, whatever the configuration says.
pub const MAX_TOKEN_SECONDS: u32 = 600;
/// The roles a console session may hold.
pub const CONSOLE_ROLES: [Role; 3] = [Role::Admin, Role::Approver, Role::Auditor];
/// The longest subject a link may name.
const MAX_SUBJECT_CHARS: usize = 128;

/// Why a console sign-in step was refused. Each is said to the person in
/// plain words by the HTTP layer; none carries a secret.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// The link is unknown, used or expired (which of them is not said).
    #[error("the sign-in link is invalid, used or expired")]
    LinkInvalid,
    /// No session, or it ended (expired, signed out, tenant suspended,
    /// organisation unbound).
    #[error("the session has ended")]
    SessionEnded,
    /// No console sign-in is configured at that index.
    #[error("no such identity provider")]
    IssuerUnknown,
    /// The callback's `state` is unknown, used or expired.
    #[error("the sign-in is unknown or expired; start again")]
    LoginInvalid,
    /// The identity provider refused the sign-in or could not be reached.
    #[error("the identity provider refused the sign-in: {0}")]
    Provider(String),
    /// The person is known but may not use the console (no VaultGuard role,
    /// organisation not bound, tenant suspended).
    #[error("{0}")]
    Refused(&'static str),
    /// A request value was malformed (the CLI's arguments).
    #[error("invalid {field}: {reason}")]
    Invalid {
        field: &'static str,
        reason: &'static str,
    },
    #[error(transparent)]
    Internal(#[from] Error),
}

impl From<sea_orm::DbErr> for ConsoleError {
    fn from(err: sea_orm::DbErr) -> Self {
        Self::Internal(err.into())
    }
}

pub type Result<T, E = ConsoleError> = std::result::Result<T, E>;

/// A session just made: the secret goes into the cookie and nowhere else.
pub struct NewSession {
    pub secret: String,
    pub expires_at: Millis,
    pub tenant_id: String,
}

impl std::fmt::Debug for NewSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewSession")
            .field("tenant_id", &self.tenant_id)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

/// Who a standing session is.
#[derive(Debug, Clone)]
pub struct SessionView {
    pub tenant_id: String,
    pub tenant_name: String,
    pub subject: String,
    pub roles: Vec<Role>,
    pub expires_at: Millis,
}

/// A trusted issuer the console offers for sign-in, by its index among them.
pub struct ConsoleIssuer<'a> {
    pub index: usize,
    pub display_name: String,
    pub config: &'a TrustedIssuer,
}

/// The trusted issuers that have a console client, in configuration order.
pub fn console_issuers(state: &AppState) -> Vec<ConsoleIssuer<'_>> {
    state
        .config
        .trusted_issuers
        .iter()
        .filter(|issuer| {
            issuer
                .console_client_id
                .as_deref()
                .is_some_and(|id| !id.is_empty())
        })
        .enumerate()
        .map(|(index, config)| ConsoleIssuer {
            index,
            display_name: config.console_display_name.clone().unwrap_or_else(|| {
                reqwest::Url::parse(&config.issuer)
                    .ok()
                    .and_then(|url| url.host_str().map(str::to_owned))
                    .unwrap_or_else(|| config.issuer.clone())
            }),
            config,
        })
        .collect()
}

fn secret_id(secret: &str) -> String {
    sha256_hex(secret.as_bytes())
}

fn roles_text(roles: &[Role]) -> String {
    roles
        .iter()
        .map(|role| role_name(*role))
        .collect::<Vec<_>>()
        .join(" ")
}

fn parse_roles(text: &str) -> Vec<Role> {
    text.split_whitespace()
        .filter_map(parse_role)
        .filter(|role| CONSOLE_ROLES.contains(role))
        .collect()
}

/// The audit context of a console event done by `subject` of `tenant_id`.
fn human(tenant_id: &str, subject: &str, request_id: &str) -> AuditCtx {
    AuditCtx {
        actor: Actor {
            kind: PrincipalKind::Human as i32,
            subject: subject.to_owned(),
            tenant_id: tenant_id.to_owned(),
        },
        request_id: request_id.to_owned(),
    }
}

/// The tenant, when it exists and is active.
async fn active_tenant(state: &AppState, tenant_id: &str) -> Result<Option<tenant::Model>> {
    Ok(state
        .directory
        .tenant(&state.db, tenant_id)
        .await?
        .filter(|tenant| tenant.status == tenant::Status::Active))
}

// ------------------------------------------------------------------ links

/// `vaultguard console-link`: a one-time sign-in link's secret for `roles`
/// of `tenant_id`, usable once until `now + ttl_seconds`.
pub async fn create_link(
    state: &AppState,
    tenant_id: &str,
    subject: &str,
    roles: &[Role],
    ttl_seconds: u32,
    now: Millis,
) -> Result<String> {
    if roles.is_empty() || roles.iter().any(|role| !CONSOLE_ROLES.contains(role)) {
        return Err(ConsoleError::Invalid {
            field: "role",
            reason: "one or more of admin, approver, auditor",
        });
    }
    if subject.trim().is_empty()
        || subject.chars().count() > MAX_SUBJECT_CHARS
        || subject.chars().any(char::is_control)
    {
        return Err(ConsoleError::Invalid {
            field: "subject",
            reason: "1 to 128 printable characters",
        });
    }
    if ttl_seconds == 0 || ttl_seconds > 24 * 3600 {
        return Err(ConsoleError::Invalid {
            field: "ttl-seconds",
            reason: "1 to 86400",
        });
    }
    if active_tenant(state, tenant_id).await?.is_none() {
        return Err(ConsoleError::Invalid {
            field: "tenant",
            reason: "no active tenant has this id",
        });
    }
    let secret = random_token(32)?;
    let id = secret_id(&secret);
    let row = console_link::ActiveModel {
        id: Set(id.clone()),
        tenant_id: Set(tenant_id.to_owned()),
        subject: Set(subject.to_owned()),
        roles: Set(roles_text(roles)),
        created_at: Set(now),
        expires_at: Set(now + i64::from(ttl_seconds) * 1000),
        used_at: Set(None),
    };
    let event = AuditCtx::system(uuid::Uuid::new_v4().to_string()).event(
        tenant_id,
        "console.link_created",
        vec![],
        Outcome::Success,
        json!({"subject": subject, "roles": roles_text(roles), "link_hash": &id[..16],
               "expires_in_seconds": ttl_seconds}),
    );
    state.recorder.insert_with_events(row, vec![event]).await?;
    Ok(secret)
}

/// Redeems a link's secret (once) for a session.
pub async fn redeem_link(
    state: &AppState,
    secret: &str,
    request_id: &str,
    now: Millis,
) -> Result<NewSession> {
    if secret.is_empty() || secret.len() > 256 {
        return Err(ConsoleError::LinkInvalid);
    }
    let id = secret_id(secret);
    // The conditional UPDATE is the single use: of two redemptions racing,
    // one changes the row and the other changes nothing.
    let taken = console_link::Entity::update_many()
        .col_expr(console_link::Column::UsedAt, Expr::value(now))
        .filter(console_link::Column::Id.eq(id.as_str()))
        .filter(console_link::Column::UsedAt.is_null())
        .filter(console_link::Column::ExpiresAt.gt(now))
        .exec(&state.db)
        .await?
        .rows_affected;
    if taken != 1 {
        return Err(ConsoleError::LinkInvalid);
    }
    let link = console_link::Entity::find_by_id(id)
        .one(&state.db)
        .await?
        .ok_or(ConsoleError::LinkInvalid)?;
    if active_tenant(state, &link.tenant_id).await?.is_none() {
        return Err(ConsoleError::Refused("the tenant is suspended"));
    }
    let roles = parse_roles(&link.roles);
    start_session(
        state,
        &link.tenant_id,
        &link.subject,
        &roles,
        "",
        "",
        "link",
        request_id,
        now,
    )
    .await
}

// ------------------------------------------------------------------ OIDC

/// `issuer`'s authorization and token endpoints, or why not (logged here,
/// said to the person in plain words).
async fn endpoints(state: &AppState, issuer: &str) -> Result<crate::oidc::Endpoints> {
    state.oidc.endpoints(issuer).await.map_err(|err| {
        tracing::warn!(issuer = %issuer, error = %err, "console sign-in: discovery failed");
        ConsoleError::Provider("the identity provider cannot be reached".to_owned())
    })
}

/// A sign-in started: where to send the browser, and what the browser keeps
/// (in a cookie) to prove at the callback that it started this sign-in.
pub struct StartedLogin {
    pub authorize_url: String,
    pub browser_binding: String,
}

/// Starts a sign-in with the console issuer at `index`: stores the sealed
/// PKCE verifier and the nonce under the hash of a fresh `state`, and
/// returns the issuer's authorization URL to send the browser to.
pub async fn start_login(
    state: &AppState,
    index: usize,
    redirect_uri: &str,
    now: Millis,
) -> Result<StartedLogin> {
    let issuers = console_issuers(state);
    let issuer = issuers
        .get(index)
        .ok_or(ConsoleError::IssuerUnknown)?
        .config;
    let client_id = issuer.console_client_id.clone().unwrap_or_default();
    let endpoints = endpoints(state, &issuer.issuer).await?;
    let state_value = random_token(32)?;
    let verifier = random_token(48)?;
    let nonce = random_token(24)?;
    let id = secret_id(&state_value);
    let sealed = state.master.seal(
        SealContext {
            table: "console_logins.verifier",
            tenant_id: "",
            record_id: &id,
        },
        verifier.as_bytes(),
    )?;
    console_login::Entity::insert(console_login::ActiveModel {
        id: Set(id),
        issuer: Set(issuer.issuer.clone()),
        verifier_ciphertext: Set(sealed),
        nonce: Set(nonce.clone()),
        created_at: Set(now),
        expires_at: Set(now + LOGIN_TTL_MILLIS),
    })
    .exec_without_returning(&state.db)
    .await?;
    let mut url = reqwest::Url::parse(&endpoints.authorization_endpoint).map_err(|_| {
        ConsoleError::Provider("the identity provider's authorization endpoint is not a URL".into())
    })?;
    if !matches!(url.scheme(), "https" | "http") {
        return Err(ConsoleError::Provider(
            "the identity provider's authorization endpoint is not http(s)".into(),
        ));
    }
    let mut scopes = vec!["openid".to_owned()];
    scopes.extend(
        issuer
            .console_scopes
            .iter()
            .filter(|scope| scope.as_str() != "openid")
            .cloned(),
    );
    url.query_pairs_mut()
        .append_pair("response_type", "code")
        .append_pair("client_id", &client_id)
        .append_pair("redirect_uri", redirect_uri)
        .append_pair("scope", &scopes.join(" "))
        .append_pair("state", &state_value)
        .append_pair("nonce", &nonce)
        .append_pair("code_challenge", &crate::crypto::pkce_challenge(&verifier))
        .append_pair("code_challenge_method", "S256");
    Ok(StartedLogin {
        authorize_url: url.to_string(),
        browser_binding: state_value,
    })
}

/// The callback: takes the sign-in named by `state_value` (once, and only
/// in the browser that started it: `browser_binding` is what
/// [`start_login`] gave that browser to keep), trades
/// the code for tokens at the issuer's token endpoint with the PKCE
/// verifier, verifies the ID token (keys, issuer, audience = the console
/// client, nonce), maps organisation and roles as for bearer tokens, and
/// starts a session.
pub async fn finish_login(
    state: &AppState,
    state_value: &str,
    browser_binding: &str,
    code: &str,
    redirect_uri: &str,
    request_id: &str,
    now: Millis,
) -> Result<NewSession> {
    if state_value.is_empty()
        || state_value.len() > 256
        || code.is_empty()
        || code.len() > 4096
        || secret_id(browser_binding) != secret_id(state_value)
    {
        return Err(ConsoleError::LoginInvalid);
    }
    let id = secret_id(state_value);
    let login = console_login::Entity::find_by_id(id.clone())
        .one(&state.db)
        .await?
        .filter(|login| login.expires_at > now)
        .ok_or(ConsoleError::LoginInvalid)?;
    // Single use: whoever deletes the row owns the sign-in.
    let taken = console_login::Entity::delete_by_id(id.clone())
        .exec(&state.db)
        .await?
        .rows_affected;
    if taken != 1 {
        return Err(ConsoleError::LoginInvalid);
    }
    let issuer = state
        .config
        .trusted_issuers
        .iter()
        .find(|issuer| issuer.issuer == login.issuer && issuer.console_client_id.is_some())
        .ok_or(ConsoleError::IssuerUnknown)?;
    let client_id = issuer.console_client_id.clone().unwrap_or_default();
    let verifier = state.master.open(
        SealContext {
            table: "console_logins.verifier",
            tenant_id: "",
            record_id: &id,
        },
        &login.verifier_ciphertext,
    )?;
    let verifier = String::from_utf8(verifier)
        .map_err(|_| Error::internal("sealed PKCE verifier is not text"))?;
    let endpoints = endpoints(state, &issuer.issuer).await?;
    let grant = state
        .oauth
        .token(
            &endpoints.token_endpoint,
            ClientAuth {
                client_id: &client_id,
                client_secret: issuer.console_client_secret.as_deref(),
            },
            &[
                ("grant_type", "authorization_code"),
                ("code", code),
                ("redirect_uri", redirect_uri),
                ("code_verifier", &verifier),
            ],
        )
        .await
        .map_err(|err| {
            tracing::info!(issuer = %issuer.issuer, error = %err, "console sign-in: code not redeemed");
            ConsoleError::Provider("the sign-in code was not accepted".to_owned())
        })?;
    let id_token = grant.id_token.ok_or(ConsoleError::Provider(
        "the identity provider sent no ID token".to_owned(),
    ))?;
    let identity = state
        .oidc
        .verify_id_token(&id_token, &issuer.issuer, &client_id, &login.nonce)
        .await
        .map_err(|err| {
            tracing::info!(issuer = %issuer.issuer, error = %err, "console sign-in: ID token refused");
            ConsoleError::Provider("the identity provider's ID token was not valid".to_owned())
        })?;
    let binding = state
        .directory
        .organization(&state.db, &identity.issuer, &identity.organization_id)
        .await?
        .ok_or(ConsoleError::Refused(
            "your organisation is not connected to a VaultGuard tenant",
        ))?;
    let roles: Vec<Role> = identity
        .roles
        .iter()
        .filter_map(|role| parse_role(role))
        .filter(|role| CONSOLE_ROLES.contains(role))
        .collect();
    if roles.is_empty() {
        return Err(ConsoleError::Refused(
            "your account has no VaultGuard role (admin, approver or auditor)",
        ));
    }
    if active_tenant(state, &binding.tenant_id).await?.is_none() {
        return Err(ConsoleError::Refused("the tenant is suspended"));
    }
    start_session(
        state,
        &binding.tenant_id,
        &identity.subject,
        &roles,
        &identity.issuer,
        &identity.organization_id,
        "oidc",
        request_id,
        now,
    )
    .await
}

#[allow(clippy::too_many_arguments)]
async fn start_session(
    state: &AppState,
    tenant_id: &str,
    subject: &str,
    roles: &[Role],
    issuer: &str,
    organization_id: &str,
    method: &'static str,
    request_id: &str,
    now: Millis,
) -> Result<NewSession> {
    let secret = random_token(32)?;
    let id = secret_id(&secret);
    let expires_at = now + i64::from(state.config.console_session_seconds.max(60)) * 1000;
    let row = console_session::ActiveModel {
        id: Set(id.clone()),
        tenant_id: Set(tenant_id.to_owned()),
        subject: Set(subject.to_owned()),
        roles: Set(roles_text(roles)),
        issuer: Set(issuer.to_owned()),
        organization_id: Set(organization_id.to_owned()),
        created_at: Set(now),
        expires_at: Set(expires_at),
    };
    let event = human(tenant_id, subject, request_id).event(
        tenant_id,
        "console.signed_in",
        vec![],
        Outcome::Success,
        json!({"method": method, "issuer": issuer, "roles": roles_text(roles),
               "session_hash": &id[..16]}),
    );
    state.recorder.insert_with_events(row, vec![event]).await?;
    Ok(NewSession {
        secret,
        expires_at,
        tenant_id: tenant_id.to_owned(),
    })
}

// ------------------------------------------------------------------ sessions

/// The session `secret` names, while it still stands: unexpired, its tenant
/// active, and (for an issuer's sign-in) the organisation still bound to
/// the same tenant.
pub async fn session(state: &AppState, secret: &str, now: Millis) -> Result<SessionView> {
    if secret.is_empty() || secret.len() > 256 {
        return Err(ConsoleError::SessionEnded);
    }
    let row = console_session::Entity::find_by_id(secret_id(secret))
        .one(&state.db)
        .await?
        .filter(|row| row.expires_at > now)
        .ok_or(ConsoleError::SessionEnded)?;
    let tenant = active_tenant(state, &row.tenant_id)
        .await?
        .ok_or(ConsoleError::SessionEnded)?;
    if !row.issuer.is_empty() {
        let bound = state
            .directory
            .organization(&state.db, &row.issuer, &row.organization_id)
            .await?
            .is_some_and(|binding| binding.tenant_id == row.tenant_id);
        if !bound {
            return Err(ConsoleError::SessionEnded);
        }
    }
    Ok(SessionView {
        tenant_id: row.tenant_id,
        tenant_name: tenant.display_name,
        subject: row.subject,
        roles: parse_roles(&row.roles),
        expires_at: row.expires_at,
    })
}

/// A VaultGuard access token for the session's tenant, subject and roles,
/// living `console_token_seconds` (at most 600, and never past the
/// session's end).
pub async fn token(state: &AppState, secret: &str, now: Millis) -> Result<IssuedToken> {
    let view = session(state, secret, now).await?;
    let left = u32::try_from((view.expires_at - now) / 1000).unwrap_or(u32::MAX);
    let ttl = state
        .config
        .console_token_seconds
        .clamp(1, MAX_TOKEN_SECONDS)
        .min(left);
    if ttl == 0 || view.roles.is_empty() {
        return Err(ConsoleError::SessionEnded);
    }
    Ok(tokens::mint(
        state,
        &view.subject,
        Some(&view.tenant_id),
        &view.roles,
        None,
        ttl,
    )
    .await?)
}

/// Signs out: the session row is deleted (tokens already handed out live
/// out their few minutes). Nothing happens for an unknown secret.
pub async fn sign_out(state: &AppState, secret: &str, request_id: &str, now: Millis) -> Result<()> {
    if secret.is_empty() || secret.len() > 256 {
        return Ok(());
    }
    let id = secret_id(secret);
    let Some(row) = console_session::Entity::find_by_id(id.clone())
        .one(&state.db)
        .await?
    else {
        return Ok(());
    };
    let deleted = console_session::Entity::delete_by_id(id.clone())
        .exec(&state.db)
        .await?
        .rows_affected;
    if deleted == 1 && row.expires_at > now {
        let event = human(&row.tenant_id, &row.subject, request_id).event(
            &row.tenant_id,
            "console.signed_out",
            vec![],
            Outcome::Success,
            json!({"session_hash": &id[..16]}),
        );
        state.recorder.record(vec![event]).await?;
    }
    Ok(())
}

/// Deletes ended sessions, links and sign-ins (the sweeper).
pub async fn prune(state: &AppState, now: Millis) -> Result<u64> {
    let sessions = console_session::Entity::delete_many()
        .filter(console_session::Column::ExpiresAt.lte(now))
        .exec(&state.db)
        .await?
        .rows_affected;
    let links = console_link::Entity::delete_many()
        .filter(console_link::Column::ExpiresAt.lte(now))
        .exec(&state.db)
        .await?
        .rows_affected;
    let logins = console_login::Entity::delete_many()
        .filter(console_login::Column::ExpiresAt.lte(now))
        .exec(&state.db)
        .await?
        .rows_affected;
    Ok(sessions + links + logins)
}
