//! Connected accounts (the token vault): the authorization-code flow with
//! PKCE that connects an account, the exchange that hands agents short-lived
//! provider access tokens, and disconnection.
//!
//! Secrets: the refresh token, the cached access token and the PKCE verifier
//! are sealed under the master key, each bound to its table and column, the
//! tenant and the record id, so a ciphertext copied into another row (or
//! column) does not open. The `state` is stored only as its SHA-256.
//!
//! Concurrency:
//! - A `state` is consumed by a conditional UPDATE (`used_at IS NULL`), so a
//!   replayed callback loses even when it races the first one.
//! - No transaction, and no pooled database connection, is held across a
//!   provider's HTTP call (a provider answering slowly would otherwise hold
//!   the pool every tenant shares).
//! - Refreshes of one connection are single-flight: in this process behind
//!   [`crate::oauth_client::OAuthClient::flight`]; across replicas behind
//!   the refresh lease on the row (holder and expiry on the server's clock,
//!   taken by a conditional UPDATE, given back by the UPDATE that stores the
//!   result; a dead holder's lease lapses). Whoever waited re-reads the row
//!   and finds the fresh token. Every write of the tokens is conditional on
//!   `token_version`, so a disconnect racing a refresh wins cleanly, and a
//!   rotating provider never sees one refresh token twice.
//!
//! Endpoints: the tokens of a connection are bound to the token endpoint,
//! revocation endpoint and client id they were issued under
//! (`issuer_*` columns), and a pending authorization to the token endpoint
//! and client it was started for. Nothing is sent anywhere else: a
//! connection whose provider moved has its tokens dropped (NEEDS_REAUTH),
//! and a callback whose provider moved exchanges no code.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveModelTrait, ActiveValue::Set, ColumnTrait, Condition, EntityTrait, QueryFilter,
    QueryOrder, QuerySelect,
};
use serde_json::{Value, json};
use vaultguard_proto::v1::{self as pb, ConnectionStatus, ErrorReason};

use crate::audit::{self, AuditCtx, Outcome as AuditOutcome};
use crate::auth::CallContext;
use crate::clock::Millis;
use crate::crypto::{SealContext, random_token, sha256_hex};
use crate::directory::{self, Entry};
use crate::domain::budgets;
use crate::domain::delegations::{self, Input, NewDelegation};
use crate::domain::policy_engine::{Attr, Outcome};
use crate::domain::{
    actor_json, frozen, page, parse_actor, provider_reads, tenants::audience, to_json,
    vault_settings,
};
use crate::error::{Error, Result, Violations, is_unique_violation};
use crate::ids::{IdKind, check_id, new_id};
use crate::oauth_client::{ClientAuth, ProviderError, TokenGrant, tidy};
use crate::state::AppState;
use crate::store::entities::connection::Status;
use crate::store::entities::{connection, delegation, oauth_provider, oauth_state, tenant};
use crate::store::lifecycle::{Lifecycle, Transitions};
use crate::validate;

/// RFC 8693 values.
pub const GRANT_TYPE_TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
pub const TOKEN_TYPE_ACCESS_TOKEN: &str = "urn:ietf:params:oauth:token-type:access_token";

/// Largest accepted subject token, in bytes.
const MAX_SUBJECT_TOKEN_BYTES: usize = 8192;
/// Lifetime assumed for a provider access token without `expires_in`.
const DEFAULT_ACCESS_TTL_SECONDS: u64 = 300;
/// The status reason of a connection whose tokens were dropped because the
/// provider's token or revocation endpoint, or its client, changed.
pub const ENDPOINTS_CHANGED: &str = "the provider's token or revocation endpoint or client id changed since these tokens were issued; they were discarded unsent";

impl From<Status> for ConnectionStatus {
    fn from(status: Status) -> Self {
        match status {
            Status::Pending => Self::Pending,
            Status::Connected => Self::Connected,
            Status::NeedsReauth => Self::NeedsReauth,
            Status::Disconnected => Self::Disconnected,
        }
    }
}

/// The stored status a ListConnections filter names (none: any).
fn stored_status(status: ConnectionStatus) -> Option<Status> {
    match status {
        ConnectionStatus::Pending => Some(Status::Pending),
        ConnectionStatus::Connected => Some(Status::Connected),
        ConnectionStatus::NeedsReauth => Some(Status::NeedsReauth),
        ConnectionStatus::Disconnected => Some(Status::Disconnected),
        ConnectionStatus::Unspecified => None,
    }
}

/// A JSON array column as strings.
pub fn string_list(json_text: &str) -> Vec<String> {
    serde_json::from_str(json_text).unwrap_or_default()
}

// ---------------------------------------------------------------- sealing

/// Which sealed value of a connection.
#[derive(Clone, Copy)]
enum Sealed {
    RefreshToken,
    AccessToken,
    PkceVerifier,
}

impl Sealed {
    const fn table(self) -> &'static str {
        match self {
            Self::RefreshToken => "connections.refresh_token",
            Self::AccessToken => "connections.access_token",
            Self::PkceVerifier => "oauth_states.pkce_verifier",
        }
    }
}

fn seal(
    state: &AppState,
    what: Sealed,
    tenant_id: &str,
    id: &str,
    secret: &str,
) -> Result<Vec<u8>> {
    state.master.seal(
        SealContext {
            table: what.table(),
            tenant_id,
            record_id: id,
        },
        secret.as_bytes(),
    )
}

fn open(
    state: &AppState,
    what: Sealed,
    tenant_id: &str,
    id: &str,
    sealed: &[u8],
) -> Result<String> {
    let bytes = state.master.open(
        SealContext {
            table: what.table(),
            tenant_id,
            record_id: id,
        },
        sealed,
    )?;
    String::from_utf8(bytes).map_err(|_| Error::internal("sealed token is not UTF-8"))
}

// ---------------------------------------------------------------- lookups

/// The tenant's connection `id`; another tenant's or an unknown one is
/// NOT_FOUND.
async fn find_own(state: &AppState, tenant_id: &str, id: &str) -> Result<connection::Model> {
    check_id("connection_id", id, IdKind::Connection)?;
    connection::Entity::find_by_id(id.to_owned())
        .one(&state.db)
        .await?
        .filter(|row| row.tenant_id == tenant_id)
        .ok_or(Error::NotFound("connection"))
}

/// The connection `id` of `tenant_id` for an exchange, from the directory
/// (which holds CONNECTED rows); another tenant's or an unknown one is
/// NOT_FOUND.
async fn exchange_connection(
    state: &AppState,
    tenant_id: &str,
    id: &str,
) -> Result<Arc<connection::Model>> {
    state
        .directory
        .connection(&state.db, id)
        .await?
        .filter(|row| row.tenant_id == tenant_id)
        .ok_or(Error::NotFound("connection"))
}

/// After an update of connection `id` made outside a transaction (a
/// refresh): announces it to every replica and forgets it here.
async fn connection_changed(state: &AppState, id: &str) -> Result<()> {
    let changed = [Entry::Connection(id.to_owned())];
    directory::announce(&state.db, &changed[0]).await?;
    state.directory_changed(&changed);
    Ok(())
}

/// The provider of connection `row`, from the directory.
async fn provider_of(
    state: &AppState,
    row: &connection::Model,
) -> Result<Arc<oauth_provider::Model>> {
    state
        .directory
        .provider(&state.db, &row.provider_id)
        .await?
        .filter(|provider| provider.tenant_id == row.tenant_id)
        .ok_or_else(|| Error::internal("connection without its provider"))
}

/// Whether `row`'s stored tokens were issued at `provider`'s current token
/// endpoint, for its current client, while it had its current revocation
/// endpoint: only then may they (and the client secret with them) be sent
/// to those endpoints.
fn issued_by(row: &connection::Model, provider: &oauth_provider::Model) -> bool {
    row.issuer_token_url == provider.token_url
        && row.issuer_client_id == provider.client_id
        && row.issuer_revocation_url == provider.revocation_url
}

/// The provider of `row` as stored now, when `cached` (the directory's
/// copy) fails `matches`: a replica whose copy is a moment old must not
/// drop tokens or refuse a flow that the current settings allow. `None`
/// when the stored provider fails `matches` too.
async fn provider_matching(
    state: &AppState,
    row: &connection::Model,
    cached: Arc<oauth_provider::Model>,
    matches: impl Fn(&oauth_provider::Model) -> bool,
) -> Result<Option<Arc<oauth_provider::Model>>> {
    if matches(&cached) {
        return Ok(Some(cached));
    }
    Ok(oauth_provider::Entity::find_by_id(row.provider_id.clone())
        .one(&state.db)
        .await?
        .filter(|stored| stored.tenant_id == row.tenant_id && matches(stored))
        .map(Arc::new))
}

fn client_auth<'a>(provider: &'a oauth_provider::Model, secret: Option<&'a str>) -> ClientAuth<'a> {
    ClientAuth {
        client_id: &provider.client_id,
        client_secret: secret,
    }
}

/// GetConnection.
pub async fn get(state: &AppState, ctx: &CallContext, id: &str) -> Result<connection::Model> {
    find_own(state, ctx.principal.tenant_id()?, id).await
}

/// ListConnections, newest first.
pub async fn list(
    state: &AppState,
    ctx: &CallContext,
    req: &pb::ListConnectionsRequest,
) -> Result<(Vec<connection::Model>, String)> {
    let tenant_id = ctx.principal.tenant_id()?.to_owned();
    let mut v = Violations::new();
    if !req.provider_id.is_empty() {
        v.check(check_id("provider_id", &req.provider_id, IdKind::Provider));
    }
    let status = v.take(validate::enum_value::<ConnectionStatus>(
        "status", req.status, true,
    ));
    let (size, token) = page::parts(req.page.as_ref());
    let size = v.take(validate::page_size("page.page_size", size));
    v.finish()?;
    let status = status.flatten().and_then(stored_status);
    let size = size.unwrap_or(50);
    // The page scope names the stored string, as it always has.
    let named = status.map(Status::as_str);
    let scope = format!("connections|{tenant_id}|{}|{named:?}", req.provider_id);
    let after = page::decode("page.page_token", &scope, token)?;
    let mut query = connection::Entity::find()
        .filter(connection::Column::TenantId.eq(tenant_id))
        .order_by_desc(connection::Column::Id)
        .limit(size + 1);
    if !req.provider_id.is_empty() {
        query = query.filter(connection::Column::ProviderId.eq(req.provider_id.clone()));
    }
    if let Some(status) = status {
        query = query.filter(connection::Column::Status.eq(status));
    }
    if let Some(after) = after {
        query = query.filter(connection::Column::Id.lt(after));
    }
    let rows = query.all(&state.db).await?;
    Ok(page::finish(rows, size, &scope, |row| row.id.clone()))
}

// ---------------------------------------------------------------- connect

/// How long a used or expired `state` is kept (so a late replay is still
/// recognised and audited as one) before the sweeper deletes it.
const STATE_RETENTION_MILLIS: Millis = 24 * 3600 * 1000;

/// Deletes authorization states expired more than a day ago; run by the
/// sweeper. Returns how many went.
pub async fn prune_states(state: &AppState, now: Millis) -> Result<u64> {
    Ok(oauth_state::Entity::delete_many()
        .filter(oauth_state::Column::ExpiresAt.lt(now - STATE_RETENTION_MILLIS))
        .exec(&state.db)
        .await?
        .rows_affected)
}

/// What StartConnection answers.
#[derive(Debug)]
pub struct Started {
    pub connection: connection::Model,
    pub authorize_url: String,
    pub expires_at: Millis,
}

/// The `redirect_uri` VaultGuard registers with providers.
pub fn redirect_uri(state: &AppState) -> String {
    if state.config.oauth_redirect_uri.is_empty() {
        format!("{}/oauth/callback", state.keys.issuer())
    } else {
        state.config.oauth_redirect_uri.clone()
    }
}

/// StartConnection: a PENDING connection (or the one being re-authorized),
/// a single-use `state` bound to the tenant, provider, connection and
/// initiator, and the authorize URL with its PKCE challenge.
pub async fn start(
    state: &AppState,
    ctx: &CallContext,
    req: &pb::StartConnectionRequest,
) -> Result<Started> {
    let tenant_id = ctx.principal.tenant_id()?.to_owned();
    let mut v = Violations::new();
    v.check(check_id("provider_id", &req.provider_id, IdKind::Provider));
    if !req.connection_id.is_empty() {
        v.check(check_id(
            "connection_id",
            &req.connection_id,
            IdKind::Connection,
        ));
    }
    provider_reads::check_scopes("scopes", &req.scopes, &mut v);
    if !req.return_url.is_empty() {
        let settings = vault_settings::load(state, &tenant_id).await?;
        v.check(vault_settings::check_return_url(
            state.config.oauth_allow_http,
            &vault_settings::return_origins(&settings),
            &req.return_url,
        ));
    }
    v.finish()?;
    let provider = provider_reads::find(state, &tenant_id, "provider_id", &req.provider_id).await?;
    let existing = if req.connection_id.is_empty() {
        None
    } else {
        let row = find_own(state, &tenant_id, &req.connection_id).await?;
        if row.provider_id != provider.id {
            return Err(Error::invalid(
                "connection_id",
                "belongs to another provider than provider_id",
            ));
        }
        if row.status == Status::Disconnected {
            return Err(Error::invalid_state(
                "the connection is disconnected; start a new one",
                ConnectionStatus::Disconnected.as_str_name(),
            ));
        }
        Some(row)
    };
    let scopes = if req.scopes.is_empty() {
        provider_reads::scopes(&provider)
    } else {
        req.scopes.clone()
    };
    let now = state.clock.now_millis();
    let expires_at = now + i64::from(state.config.oauth_state_ttl_seconds) * 1000;
    let state_value = random_token(32)?;
    let verifier = random_token(48)?;
    let challenge = crate::crypto::pkce_challenge(&verifier);
    let redirect = redirect_uri(state);
    let state_hash = sha256_hex(state_value.as_bytes());
    let initiator = actor_json(&ctx.principal.actor())?;

    let txn = crate::store::begin(&state.db).await?;
    let row = match existing {
        Some(row) => row,
        None => {
            connection::ActiveModel {
                id: Set(new_id(IdKind::Connection)),
                tenant_id: Set(tenant_id.clone()),
                provider_id: Set(provider.id.clone()),
                status: Set(Status::Pending),
                scopes: Set(to_json(&scopes)?),
                refresh_token_ciphertext: Set(None),
                access_token_ciphertext: Set(None),
                access_token_expires_at: Set(None),
                created_by: Set(initiator.clone()),
                created_at: Set(now),
                updated_at: Set(now),
                granted_scopes: Set("[]".to_owned()),
                external_subject: Set(String::new()),
                connected_at: Set(None),
                connected_by: Set(None),
                last_refresh_at: Set(None),
                status_reason: Set(String::new()),
                token_type: Set(String::new()),
                access_token_scope: Set(String::new()),
                token_version: Set(0),
                refresh_lease_holder: Set(None),
                refresh_lease_expires_at: Set(None),
                issuer_token_url: Set(String::new()),
                issuer_revocation_url: Set(None),
                issuer_client_id: Set(String::new()),
            }
            .insert(&txn)
            .await?
        }
    };
    oauth_state::ActiveModel {
        state_hash: Set(state_hash),
        tenant_id: Set(tenant_id.clone()),
        provider_id: Set(provider.id.clone()),
        connection_id: Set(row.id.clone()),
        initiator: Set(initiator),
        pkce_verifier_ciphertext: Set(seal(
            state,
            Sealed::PkceVerifier,
            &tenant_id,
            &row.id,
            &verifier,
        )?),
        scopes: Set(to_json(&scopes)?),
        expires_at: Set(expires_at),
        used_at: Set(None),
        created_at: Set(now),
        return_url: Set(req.return_url.clone()),
        redirect_uri: Set(redirect.clone()),
        token_url: Set(provider.token_url.clone()),
        client_id: Set(provider.client_id.clone()),
    }
    .insert(&txn)
    .await?;
    audit::append(
        &txn,
        state.clock.as_ref(),
        ctx.audit().event(
            &tenant_id,
            "connection.started",
            vec![row.id.clone(), provider.id.clone()],
            AuditOutcome::Success,
            json!({
                "connection_id": row.id,
                "provider_id": provider.id,
                "provider": provider.name,
                "scopes": scopes,
                "reauthorize": !req.connection_id.is_empty(),
                "expires_at": expires_at,
            }),
        ),
    )
    .await?;
    txn.commit().await?;
    state.audit_committed();

    let mut url = reqwest::Url::parse(&provider.authorize_url)
        .map_err(|_| Error::internal("stored authorize_url does not parse"))?;
    {
        let mut query = url.query_pairs_mut();
        for (key, value) in provider_reads::extra_params(&provider) {
            query.append_pair(&key, &value);
        }
        query
            .append_pair("response_type", "code")
            .append_pair("client_id", &provider.client_id)
            .append_pair("redirect_uri", &redirect);
        if !scopes.is_empty() {
            query.append_pair("scope", &scopes.join(" "));
        }
        query
            .append_pair("state", &state_value)
            .append_pair("code_challenge", &challenge)
            .append_pair("code_challenge_method", "S256");
    }
    Ok(Started {
        connection: row,
        authorize_url: url.to_string(),
        expires_at,
    })
}

/// The query of a provider's redirect to the callback.
#[derive(Debug, Default, serde::Deserialize)]
pub struct CallbackQuery {
    #[serde(default)]
    pub code: String,
    #[serde(default)]
    pub state: String,
    #[serde(default)]
    pub error: String,
    #[serde(default)]
    pub error_description: String,
}

/// How the callback ended, for the HTTP layer to render.
#[derive(Debug, PartialEq, Eq)]
pub enum CallbackOutcome {
    /// The `state` was unknown, used or expired: 400, no redirect (the
    /// return URL of a refused state is not trusted).
    Refused(&'static str),
    /// The flow ended; `error` is empty on success.
    Finished {
        connection_id: String,
        return_url: String,
        error: String,
    },
}

/// The OAuth callback: checks and consumes the `state`, exchanges the code
/// with the PKCE verifier, stores the tokens and marks the connection
/// CONNECTED. Every refusal of a known state is audited in its tenant's log.
pub async fn callback(
    state: &AppState,
    query: &CallbackQuery,
    request_id: &str,
) -> Result<CallbackOutcome> {
    if query.state.is_empty() || query.state.len() > 512 {
        metrics::counter!("vaultguard_oauth_callbacks_total", "result" => "refused").increment(1);
        return Ok(CallbackOutcome::Refused("the request has no valid state"));
    }
    let state_hash = sha256_hex(query.state.as_bytes());
    let Some(flow) = oauth_state::Entity::find_by_id(state_hash.clone())
        .one(&state.db)
        .await?
    else {
        tracing::warn!("OAuth callback with an unknown state");
        metrics::counter!("vaultguard_oauth_callbacks_total", "result" => "refused").increment(1);
        return Ok(CallbackOutcome::Refused("unknown state"));
    };
    let audit_ctx = AuditCtx {
        actor: parse_actor(&flow.initiator).unwrap_or_else(|| AuditCtx::system("").actor),
        request_id: request_id.to_owned(),
    };
    let now = state.clock.now_millis();
    let refusal = if flow.used_at.is_some() {
        Some("state already used")
    } else if flow.expires_at <= now {
        Some("state expired")
    } else {
        None
    };
    let consumed = if refusal.is_none() {
        oauth_state::Entity::update_many()
            .col_expr(oauth_state::Column::UsedAt, Expr::value(now))
            .filter(oauth_state::Column::StateHash.eq(state_hash))
            .filter(oauth_state::Column::UsedAt.is_null())
            .exec(&state.db)
            .await?
            .rows_affected
            == 1
    } else {
        false
    };
    if !consumed {
        let reason = refusal.unwrap_or("state already used");
        metrics::counter!("vaultguard_oauth_callbacks_total", "result" => "refused").increment(1);
        // Anyone holding a spent callback URL can replay it: debounced per
        // connection (`audit::RefusalDebounce`).
        state
            .record_refusal(
                format!("connection.callback_refused|{}", flow.connection_id),
                vec![audit_ctx.event(
                    &flow.tenant_id,
                    "connection.callback_refused",
                    vec![flow.connection_id.clone(), flow.provider_id.clone()],
                    AuditOutcome::Denied,
                    json!({"connection_id": flow.connection_id, "reason": reason}),
                )],
            )
            .await?;
        return Ok(CallbackOutcome::Refused(reason));
    }
    // The return URL was on a registered origin when the flow started; it is
    // used only if it still is.
    let return_url = if flow.return_url.is_empty()
        || !vault_settings::still_allowed(state, &flow.tenant_id, &flow.return_url).await?
    {
        String::new()
    } else {
        flow.return_url.clone()
    };
    let finished = |error: &str| CallbackOutcome::Finished {
        connection_id: flow.connection_id.clone(),
        return_url: return_url.clone(),
        error: error.to_owned(),
    };
    let failed = |error: &str, description: &str| {
        audit_ctx.event(
            &flow.tenant_id,
            "connection.failed",
            vec![flow.connection_id.clone(), flow.provider_id.clone()],
            AuditOutcome::Failure,
            json!({
                "connection_id": flow.connection_id,
                "oauth_error": tidy(error, 64),
                "description": tidy(description, 200),
            }),
        )
    };
    if !query.error.is_empty() || query.code.is_empty() {
        let error = if query.error.is_empty() {
            "invalid_request".to_owned()
        } else {
            tidy(&query.error, 64)
        };
        metrics::counter!("vaultguard_oauth_callbacks_total", "result" => "failed").increment(1);
        state
            .record(vec![failed(&error, &query.error_description)])
            .await?;
        return Ok(finished(&error));
    }
    let Some(row) = connection::Entity::find_by_id(flow.connection_id.clone())
        .one(&state.db)
        .await?
        .filter(|row| row.tenant_id == flow.tenant_id && row.status.can_become(Status::Connected))
    else {
        state
            .record(vec![failed(
                "invalid_request",
                "the connection was disconnected",
            )])
            .await?;
        return Ok(finished("invalid_request"));
    };
    // The code and the PKCE verifier go only to the token endpoint the flow
    // was started for, with its client.
    let cached = provider_of(state, &row).await?;
    let Some(provider) = provider_matching(state, &row, cached, |provider| {
        flow.token_url == provider.token_url && flow.client_id == provider.client_id
    })
    .await?
    else {
        metrics::counter!("vaultguard_oauth_callbacks_total", "result" => "failed").increment(1);
        state
            .record(vec![failed(
                "invalid_request",
                "the provider's token endpoint or client id changed after the flow started",
            )])
            .await?;
        return Ok(finished("invalid_request"));
    };
    let verifier = open(
        state,
        Sealed::PkceVerifier,
        &flow.tenant_id,
        &row.id,
        &flow.pkce_verifier_ciphertext,
    )?;
    let secret = provider_reads::client_secret(state, &provider)?;
    let grant = state
        .oauth
        .token(
            &provider.token_url,
            client_auth(&provider, secret.as_deref()),
            &[
                ("grant_type", "authorization_code"),
                ("code", &query.code),
                ("redirect_uri", &flow.redirect_uri),
                ("code_verifier", &verifier),
            ],
        )
        .await;
    let grant = match grant {
        Ok(grant) => grant,
        Err(err) => {
            let (error, description) = match &err {
                ProviderError::InvalidGrant { description } => {
                    ("invalid_grant", description.clone())
                }
                ProviderError::Rejected {
                    error, description, ..
                } => (error.as_str(), description.clone()),
                ProviderError::Unavailable(detail) => ("temporarily_unavailable", detail.clone()),
            };
            tracing::warn!(connection_id = %row.id, error = %err, "code exchange failed");
            metrics::counter!("vaultguard_oauth_callbacks_total", "result" => "failed")
                .increment(1);
            state.record(vec![failed(error, &description)]).await?;
            return Ok(finished(error));
        }
    };
    let requested = string_list(&flow.scopes);
    let granted = grant
        .scope
        .as_deref()
        .map(|s| s.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| requested.clone());
    let refresh = grant
        .refresh_token
        .as_deref()
        .filter(|t| !t.is_empty())
        .map(|t| seal(state, Sealed::RefreshToken, &row.tenant_id, &row.id, t))
        .transpose()?;
    let has_refresh = refresh.is_some();
    let txn = crate::store::begin(&state.db).await?;
    let update = without_lease(connection::Entity::update_many())
        .into_state(Status::Connected)
        .col_expr(
            connection::Column::IssuerTokenUrl,
            Expr::value(provider.token_url.clone()),
        )
        .col_expr(
            connection::Column::IssuerRevocationUrl,
            Expr::value(provider.revocation_url.clone()),
        )
        .col_expr(
            connection::Column::IssuerClientId,
            Expr::value(provider.client_id.clone()),
        )
        .col_expr(
            connection::Column::Scopes,
            Expr::value(to_json(&requested)?),
        )
        .col_expr(
            connection::Column::GrantedScopes,
            Expr::value(to_json(&granted)?),
        )
        .col_expr(
            connection::Column::RefreshTokenCiphertext,
            Expr::value(refresh),
        );
    let scope = granted_scope_text(&grant, &granted);
    let updated = with_access_token(state, update, &row, &grant, &scope, now)?
        .col_expr(
            connection::Column::ExternalSubject,
            Expr::value(external_subject(grant.id_token.as_deref())),
        )
        .col_expr(connection::Column::ConnectedAt, Expr::value(Some(now)))
        .col_expr(
            connection::Column::ConnectedBy,
            Expr::value(Some(flow.initiator.clone())),
        )
        .col_expr(connection::Column::StatusReason, Expr::value(String::new()))
        .col_expr(connection::Column::UpdatedAt, Expr::value(now))
        .filter(connection::Column::Id.eq(row.id.clone()))
        .exec(&txn)
        .await?;
    if updated.rows_affected == 0 {
        txn.rollback().await?;
        state
            .record(vec![failed(
                "invalid_request",
                "the connection was disconnected",
            )])
            .await?;
        return Ok(finished("invalid_request"));
    }
    let changed = [Entry::Connection(row.id.clone())];
    directory::announce(&txn, &changed[0]).await?;
    audit::append(
        &txn,
        state.clock.as_ref(),
        audit_ctx.event(
            &row.tenant_id,
            "connection.connected",
            vec![row.id.clone(), provider.id.clone()],
            AuditOutcome::Success,
            json!({
                "connection_id": row.id,
                "provider_id": provider.id,
                "provider": provider.name,
                "granted_scopes": granted,
                "refresh_token_stored": has_refresh,
                "reauthorized": row.status != Status::Pending,
            }),
        ),
    )
    .await?;
    txn.commit().await?;
    state.directory_changed(&changed);
    state.audit_committed();
    metrics::counter!("vaultguard_oauth_callbacks_total", "result" => "connected").increment(1);
    Ok(finished(""))
}

/// Sets the cached access token's columns (sealed token, expiry, type,
/// scope) from a token response, and bumps `token_version`.
fn with_access_token(
    state: &AppState,
    update: sea_orm::UpdateMany<connection::Entity>,
    row: &connection::Model,
    grant: &TokenGrant,
    scope: &str,
    now: Millis,
) -> Result<sea_orm::UpdateMany<connection::Entity>> {
    let expires_in = grant.expires_in.unwrap_or(DEFAULT_ACCESS_TTL_SECONDS);
    let sealed = seal(
        state,
        Sealed::AccessToken,
        &row.tenant_id,
        &row.id,
        &grant.access_token,
    )?;
    Ok(update
        .col_expr(
            connection::Column::AccessTokenCiphertext,
            Expr::value(Some(sealed)),
        )
        .col_expr(
            connection::Column::AccessTokenExpiresAt,
            Expr::value(Some(now + millis_of(expires_in))),
        )
        .col_expr(
            connection::Column::TokenType,
            Expr::value(token_type(grant)),
        )
        .col_expr(
            connection::Column::AccessTokenScope,
            Expr::value(scope.to_owned()),
        )
        .col_expr(connection::Column::TokenVersion, next_token_version()))
}

/// `token_version + 1`, for the conditional writes of the stored tokens.
fn next_token_version() -> Expr {
    use sea_orm::sea_query::ExprTrait as _;
    Expr::col(connection::Column::TokenVersion).add(1)
}

fn millis_of(seconds: u64) -> Millis {
    i64::try_from(seconds.min(10 * 365 * 86_400)).unwrap_or(0) * 1000
}

fn token_type(grant: &TokenGrant) -> String {
    if grant.token_type.is_empty() {
        "Bearer".to_owned()
    } else {
        tidy(&grant.token_type, 32)
    }
}

fn granted_scope_text(grant: &TokenGrant, fallback: &[String]) -> String {
    grant
        .scope
        .as_deref()
        .filter(|s| !s.trim().is_empty())
        .map_or_else(|| fallback.join(" "), |s| tidy(s, 4096))
}

/// The connected account's `email` or `sub` from an ID token received
/// directly from the token endpoint over TLS (OIDC Core §3.1.3.7 lets a
/// client skip its signature there); shown to admins, never trusted for
/// access decisions.
fn external_subject(id_token: Option<&str>) -> String {
    let claims = id_token
        .and_then(|token| token.split('.').nth(1))
        .and_then(|payload| URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok())
        .and_then(|bytes| serde_json::from_slice::<Value>(&bytes).ok());
    let Some(claims) = claims else {
        return String::new();
    };
    let value = claims["email"]
        .as_str()
        .or_else(|| claims["sub"].as_str())
        .unwrap_or_default();
    tidy(value, 256)
}

// ---------------------------------------------------------------- disconnect

/// DeleteConnection: revokes at the provider when it can, erases the tokens,
/// DISCONNECTED. Returns the row and whether the provider confirmed.
pub async fn delete(
    state: &AppState,
    ctx: &CallContext,
    id: &str,
) -> Result<(connection::Model, bool)> {
    let tenant_id = ctx.principal.tenant_id()?.to_owned();
    let row = find_own(state, &tenant_id, id).await?;
    if row.status == Status::Disconnected {
        return Err(already_disconnected());
    }
    let cached = provider_of(state, &row).await?;
    let issuer = provider_matching(state, &row, cached.clone(), |p| issued_by(&row, p)).await?;
    let provider = issuer.clone().unwrap_or(cached);
    let (revoked, revocation_note) = match (&provider.revocation_url, &row.refresh_token_ciphertext)
    {
        (_, Some(_)) if issuer.is_none() => (
            false,
            "not revoked: the provider's endpoints or client changed since the tokens were issued"
                .to_owned(),
        ),
        (Some(url), Some(sealed)) => {
            let refresh = open(state, Sealed::RefreshToken, &row.tenant_id, &row.id, sealed)?;
            let secret = provider_reads::client_secret(state, &provider)?;
            match state
                .oauth
                .revoke(url, client_auth(&provider, secret.as_deref()), &refresh)
                .await
            {
                Ok(()) => (true, String::new()),
                Err(err) => {
                    tracing::warn!(connection_id = %row.id, error = %err, "revocation failed");
                    (
                        false,
                        tidy(&format!("revocation at the provider failed: {err}"), 256),
                    )
                }
            }
        }
        (None, Some(_)) => (false, "the provider has no revocation endpoint".to_owned()),
        _ => (false, String::new()),
    };
    let now = state.clock.now_millis();
    let txn = crate::store::begin(&state.db).await?;
    let erase = erasing(
        without_lease(connection::Entity::update_many()),
        Discard::Tokens,
    );
    let updated = erase
        .into_state(Status::Disconnected)
        .col_expr(
            connection::Column::StatusReason,
            Expr::value(revocation_note.clone()),
        )
        .col_expr(connection::Column::UpdatedAt, Expr::value(now))
        .filter(connection::Column::Id.eq(row.id.clone()))
        .exec(&txn)
        .await?;
    if updated.rows_affected == 0 {
        txn.rollback().await?;
        return Err(already_disconnected());
    }
    let changed = [Entry::Connection(row.id.clone())];
    directory::announce(&txn, &changed[0]).await?;
    oauth_state::Entity::delete_many()
        .filter(oauth_state::Column::ConnectionId.eq(row.id.clone()))
        .exec(&txn)
        .await?;
    audit::append(
        &txn,
        state.clock.as_ref(),
        ctx.audit().event(
            &tenant_id,
            "connection.disconnected",
            vec![row.id.clone(), provider.id.clone()],
            AuditOutcome::Success,
            json!({
                "connection_id": row.id,
                "provider_id": provider.id,
                "revoked_at_provider": revoked,
                "note": revocation_note,
            }),
        ),
    )
    .await?;
    txn.commit().await?;
    state.directory_changed(&changed);
    state.audit_committed();
    let row = connection::Entity::find_by_id(row.id.clone())
        .one(&state.db)
        .await?
        .ok_or(Error::NotFound("connection"))?;
    Ok((row, revoked))
}

// ---------------------------------------------------------------- exchange

/// What ExchangeToken hands out.
#[derive(Clone)]
pub struct Exchanged {
    pub access_token: String,
    pub token_type: String,
    pub expires_in: u32,
    pub scope: String,
}

impl std::fmt::Debug for Exchanged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exchanged")
            .field("token_type", &self.token_type)
            .field("expires_in", &self.expires_in)
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

/// Who may use the connection, once the subject token or the policy said so.
struct Grant {
    connection: Arc<connection::Model>,
    provider: Arc<oauth_provider::Model>,
    /// The scopes to hand out (sorted); equal to the granted ones for the
    /// cached token.
    scopes: Vec<String>,
    /// The delegation a subject token stands for.
    delegation: Option<Arc<delegation::Model>>,
}

fn invalid_subject(reason: &str) -> Error {
    tracing::info!(reason, "subject token refused");
    Error::FailedPrecondition {
        reason: ErrorReason::InvalidGrant,
        message: format!("the subject token cannot be used: {reason}"),
        metadata: HashMap::from([("oauth_error".to_owned(), "invalid_grant".to_owned())]),
    }
}

/// ExchangeToken for the calling agent.
pub async fn exchange(
    state: &AppState,
    ctx: &CallContext,
    req: &pb::ExchangeTokenRequest,
) -> Result<Exchanged> {
    let agent_id = ctx
        .principal
        .agent_id()
        .ok_or_else(|| Error::denied(ErrorReason::RoleRequired, "only agents exchange tokens"))?
        .to_owned();
    let tenant_id = ctx.principal.tenant_id()?.to_owned();
    frozen::check_requester(state, &tenant_id, &agent_id).await?;
    let mut v = Violations::new();
    if req.grant_type != GRANT_TYPE_TOKEN_EXCHANGE {
        v.add("grant_type", format!("must be {GRANT_TYPE_TOKEN_EXCHANGE}"));
    }
    if req.subject_token.is_empty() {
        if !req.subject_token_type.is_empty() {
            v.add(
                "subject_token_type",
                "must be empty without a subject_token",
            );
        }
    } else {
        if req.subject_token.len() > MAX_SUBJECT_TOKEN_BYTES {
            v.add(
                "subject_token",
                format!("must be at most {MAX_SUBJECT_TOKEN_BYTES} bytes"),
            );
        }
        if req.subject_token_type != TOKEN_TYPE_ACCESS_TOKEN {
            v.add(
                "subject_token_type",
                format!("must be {TOKEN_TYPE_ACCESS_TOKEN}"),
            );
        }
    }
    v.check(check_id(
        "connection_id",
        &req.connection_id,
        IdKind::Connection,
    ));
    provider_reads::check_scopes("scopes", &req.scopes, &mut v);
    v.finish()?;

    let grant = if req.subject_token.is_empty() {
        own_grant(state, ctx, &tenant_id, &agent_id, req).await?
    } else {
        delegated_grant(state, ctx, &agent_id, req).await?
    };
    let connection = &grant.connection;
    check_usable(connection)?;
    let granted = sorted(string_list(&connection.granted_scopes));
    let narrowed = grant.scopes != granted;
    let (token, refreshed, rotated) = if narrowed {
        let (token, rotated) = narrowed_token(state, &grant).await?;
        (token, true, rotated)
    } else {
        cached_or_refreshed(state, &grant).await?
    };

    let mut parties = vec![connection.tenant_id.clone()];
    if tenant_id != connection.tenant_id {
        parties.push(tenant_id.clone());
    }
    let details = json!({
        "connection_id": connection.id,
        "provider_id": grant.provider.id,
        "provider": grant.provider.name,
        "agent_id": agent_id,
        "requesting_tenant_id": tenant_id,
        "delegation_id": grant.delegation.as_ref().map(|d| d.id.clone()),
        "scope": token.scope,
        "refreshed": refreshed,
        "rotated": rotated,
        "expires_in": token.expires_in,
    });
    let mut subjects = vec![connection.id.clone(), agent_id.clone()];
    if let Some(delegation) = &grant.delegation {
        subjects.push(delegation.id.clone());
    }
    // A token handed again to the same agent, on the same authority,
    // discloses nothing new: recorded once per window. A refreshed or
    // narrowed token is a new token and always recorded.
    let handed = format!(
        "{}|{}|{}",
        connection.id,
        grant.delegation.as_ref().map_or("", |d| d.id.as_str()),
        sha256_hex(token.access_token.as_bytes())
    );
    state
        .record_repeated(ctx, &handed, refreshed, || {
            let audit_ctx = ctx.audit();
            parties
                .iter()
                .map(|party| {
                    audit_ctx.event(
                        party,
                        "connection.token_exchanged",
                        subjects.clone(),
                        AuditOutcome::Success,
                        details.clone(),
                    )
                })
                .collect()
        })
        .await?;
    metrics::counter!("vaultguard_token_exchanges_total", "refreshed" => if refreshed { "true" } else { "false" })
        .increment(1);
    Ok(token)
}

fn sorted(mut scopes: Vec<String>) -> Vec<String> {
    scopes.sort();
    scopes.dedup();
    scopes
}

/// The scopes to hand out: the requested ones (each within `allowed`), or
/// all of `allowed`.
fn effective_scopes(requested: &[String], allowed: &[String]) -> Result<Vec<String>> {
    let mut v = Violations::new();
    for (i, scope) in requested.iter().enumerate() {
        if !allowed.contains(scope) {
            v.add(format!("scopes[{i}]"), "is not among the granted scopes");
        }
    }
    v.finish()?;
    Ok(sorted(if requested.is_empty() {
        allowed.to_vec()
    } else {
        requested.to_vec()
    }))
}

/// `Ok` for a CONNECTED connection; otherwise the error an exchange answers:
/// NEEDS_REAUTH, or INVALID_STATE naming the state.
fn check_usable(row: &connection::Model) -> Result<()> {
    match row.status {
        Status::Connected => Ok(()),
        Status::NeedsReauth => Err(needs_reauth(row)),
        other @ (Status::Pending | Status::Disconnected) => Err(Error::invalid_state(
            format!("the connection is {other}"),
            ConnectionStatus::from(other).as_str_name(),
        )),
    }
}

/// Re-reads a connection under the refresh lock (a caller ahead may have
/// refreshed or a disconnect may have won) and checks it is still usable.
async fn reload_usable(state: &AppState, id: &str) -> Result<connection::Model> {
    let row = connection::Entity::find_by_id(id.to_owned())
        .one(&state.db)
        .await?
        .ok_or(Error::NotFound("connection"))?;
    check_usable(&row)?;
    Ok(row)
}

fn already_disconnected() -> Error {
    Error::invalid_state(
        "the connection is already disconnected",
        ConnectionStatus::Disconnected.as_str_name(),
    )
}

fn needs_reauth(row: &connection::Model) -> Error {
    Error::FailedPrecondition {
        reason: ErrorReason::NeedsReauth,
        message: "the connected account must be authorized again (StartConnection with this connection_id)".to_owned(),
        metadata: HashMap::from([
            ("connection_id".to_owned(), row.id.clone()),
            ("status_reason".to_owned(), row.status_reason.clone()),
        ]),
    }
}

/// ExchangeToken without a subject token: the caller's tenant's connection,
/// judged by its own policy for `exchange:<provider>`, whose deciding rule
/// must grant the provider scopes asked for (none asked: every scope the
/// connection holds).
async fn own_grant(
    state: &AppState,
    ctx: &CallContext,
    tenant_id: &str,
    agent_id: &str,
    req: &pb::ExchangeTokenRequest,
) -> Result<Grant> {
    let connection = exchange_connection(state, tenant_id, &req.connection_id).await?;
    let provider = provider_of(state, &connection).await?;
    let scopes = effective_scopes(&req.scopes, &string_list(&connection.granted_scopes))?;
    let own = state
        .directory
        .tenant(&state.db, tenant_id)
        .await?
        .ok_or(Error::NotFound("tenant"))?;
    let input = Input {
        receiving_tenant_id: tenant_id.to_owned(),
        action: format!("exchange:{}", provider.name),
        scopes: scopes.clone(),
        resource: format!("connection:{}", connection.id),
        requested_ttl_seconds: state
            .config
            .access_token_ttl_seconds
            .min(state.config.max_token_ttl_seconds),
        binding_message: String::new(),
        context: BTreeMap::from([(
            "vg_connection_id".to_owned(),
            Attr::String(connection.id.clone()),
        )]),
        authorization_details: Vec::new(),
        vault_made: true,
    };
    let decision = delegations::judge_between(state, &own, agent_id, &own, &input).await?;
    let decision = charge_exchange(state, &own, agent_id, &connection, &input, decision).await?;
    match decision.outcome {
        Outcome::Allow => Ok(Grant {
            connection,
            provider,
            scopes,
            delegation: None,
        }),
        Outcome::Block => {
            Err(exchange_refused(state, ctx, &connection, agent_id, &input, &decision).await?)
        }
        Outcome::StepUp => {
            Err(exchange_step_up(state, ctx, (&own, &own), agent_id, &input, &decision).await?)
        }
    }
}

/// The tenant's budgets on this connection (or on its agents' exchanges):
/// an allowed exchange is charged, in a transaction that holds the budgets'
/// locks, before the token is handed out; one that would pass a limit gets
/// the budget's over-limit effect instead.
async fn charge_exchange(
    state: &AppState,
    own: &tenant::Model,
    agent_id: &str,
    connection: &connection::Model,
    input: &Input,
    decision: crate::domain::policy_engine::Decision,
) -> Result<crate::domain::policy_engine::Decision> {
    if decision.outcome == Outcome::Block {
        return Ok(decision);
    }
    let applicable = budgets::applicable(
        state,
        own,
        own,
        &budgets::Subject {
            requesting_tenant_id: &own.id,
            requesting_agent_id: agent_id,
            receiving_tenant_id: &own.id,
            action: &input.action,
            context: &input.context,
            details: &input.authorization_details,
            signing_key_id: None,
            connection_id: Some(&connection.id),
            vault_made: true,
        },
    )
    .await?;
    if applicable.is_empty() {
        return Ok(decision);
    }
    let now = state.clock.now_millis();
    let txn = crate::store::begin(&state.db).await?;
    let checked = budgets::check_in(&txn, &applicable, now).await?;
    let decision = budgets::apply(decision, &checked);
    if decision.outcome == Outcome::Allow {
        budgets::record_in(&txn, &checked, &connection.id, None, now).await?;
        txn.commit().await?;
    } else {
        txn.rollback().await?;
    }
    Ok(decision)
}

/// Records a refused exchange in the log of the connection's tenant (and
/// the caller's, when another) and returns the caller's PERMISSION_DENIED.
async fn exchange_refused(
    state: &AppState,
    ctx: &CallContext,
    connection: &connection::Model,
    agent_id: &str,
    input: &Input,
    decision: &crate::domain::policy_engine::Decision,
) -> Result<Error> {
    let caller_tenant = ctx.principal.tenant_id()?.to_owned();
    let mut logs = vec![connection.tenant_id.clone()];
    if caller_tenant != connection.tenant_id {
        logs.push(caller_tenant.clone());
    }
    let audit_ctx = ctx.audit();
    let events = logs
        .iter()
        .map(|log| {
            audit_ctx.event(
                log,
                "connection.exchange_refused",
                vec![connection.id.clone(), agent_id.to_owned()],
                AuditOutcome::Denied,
                json!({
                    "connection_id": connection.id,
                    "action": input.action,
                    "scopes": input.scopes,
                    "decision": serde_json::to_value(decision.redacted_for(log)).unwrap_or(Value::Null),
                }),
            )
        })
        .collect();
    state.record(events).await?;
    Ok(delegations::blocked_error_for(
        &caller_tenant,
        decision,
        &[("connection_id", connection.id.clone())],
    ))
}

/// The STEP_UP answer of an exchange: the pending step-up for this agent,
/// connection and scopes, opened now unless one is still pending. Concurrent
/// callers converge on one: the idempotency key names the latest earlier
/// exchange step-up, so they all insert the same key and the losers read the
/// winner's row.
async fn exchange_step_up(
    state: &AppState,
    ctx: &CallContext,
    (requesting, receiving): (&tenant::Model, &tenant::Model),
    agent_id: &str,
    input: &Input,
    decision: &crate::domain::policy_engine::Decision,
) -> Result<Error> {
    let fingerprint = sha256_hex(to_json(&(&input.resource, &input.scopes))?.as_bytes());
    // '/' is outside the alphabet of client idempotency keys, so these keys
    // never meet RequestDelegation's.
    let prefix = format!("vg/exchange/{}/", &fingerprint[..32]);
    let now = state.clock.now_millis();
    for _ in 0..3 {
        let latest = delegation::Entity::find()
            .filter(delegation::Column::RequestingAgentId.eq(agent_id))
            .filter(delegation::Column::IdempotencyKey.starts_with(&prefix))
            .order_by_desc(delegation::Column::CreatedAt)
            .order_by_desc(delegation::Column::Id)
            .one(&state.db)
            .await?;
        if let Some(row) = &latest
            && delegations::effective_status(row, now) == delegation::Status::Pending
        {
            return step_up_required(state, row).await;
        }
        let key = format!(
            "{prefix}{}",
            latest.as_ref().map_or("first", |row| row.id.as_str())
        );
        let request_hash = sha256_hex(to_json(input)?.as_bytes());
        let row = delegations::new_row(
            state,
            &NewDelegation {
                tenant_id: &requesting.id,
                agent_id,
                receiving,
                input,
                scopes_json: to_json(&input.scopes)?,
                idempotency_key: &key,
                request_hash: &request_hash,
            },
            decision,
            now,
        )?;
        let txn = crate::store::begin(&state.db).await?;
        let active: delegation::ActiveModel = row.clone().into();
        match delegation::Entity::insert(active).exec(&txn).await {
            Ok(_) => {}
            Err(err) if is_unique_violation(&err) => {
                txn.rollback().await?;
                continue;
            }
            Err(err) => return Err(err.into()),
        }
        let (_, change) = delegations::insert_step_up(state, &txn, &row).await?;
        let events = delegations::party_events(
            &ctx.audit(),
            &row,
            "delegation.decided",
            AuditOutcome::Success,
            &json!({"outcome": "step_up", "requesting_agent_id": agent_id, "for": "exchange"}),
            Some(decision),
        );
        audit::append_all(&txn, state.clock.as_ref(), events).await?;
        txn.commit().await?;
        state.audit_committed();
        state.hub.committed(vec![change]);
        return step_up_required(state, &row).await;
    }
    Err(Error::Conflict("concurrent exchange step-ups"))
}

/// FAILED_PRECONDITION STEP_UP_REQUIRED for a pending delegation.
async fn step_up_required(state: &AppState, row: &delegation::Model) -> Result<Error> {
    let step_up_id = row
        .step_up_id
        .clone()
        .ok_or_else(|| Error::internal("pending delegation without step-up"))?;
    let step = crate::store::entities::step_up::Entity::find_by_id(step_up_id.clone())
        .one(&state.db)
        .await?
        .ok_or_else(|| Error::internal("step-up row missing"))?;
    let now = state.clock.now_millis();
    Ok(Error::FailedPrecondition {
        reason: ErrorReason::StepUpRequired,
        message: "a human must approve this exchange first; poll the auth_req_id, then exchange with the redeemed token as subject_token".to_owned(),
        metadata: HashMap::from([
            ("auth_req_id".to_owned(), delegations::auth_req_id(state, &step_up_id)),
            (
                "expires_in".to_owned(),
                delegations::seconds_left(Some(step.expires_at), now).to_string(),
            ),
            ("interval".to_owned(), step.interval_seconds.to_string()),
            ("delegation_id".to_owned(), row.id.clone()),
        ]),
    })
}

/// ExchangeToken with a delegation token: the token must be active, the
/// caller's, for `exchange:<provider>` of this connection, and addressed to
/// the connection's tenant. The provider token is narrowed to the scopes the
/// delegation granted, and the exchange itself is judged again now, as a
/// direct call would be (with the delegation's context and the reserved
/// `vg_connection_id`): a BLOCK edit, a closed time window or a per-call
/// condition wins over the delegation, and a STEP_UP is answered only by a
/// delegation a human approved. A self-delegation thus grants nothing a
/// direct call would not.
async fn delegated_grant(
    state: &AppState,
    ctx: &CallContext,
    agent_id: &str,
    req: &pb::ExchangeTokenRequest,
) -> Result<Grant> {
    let receiving = unverified_claim(&req.subject_token, "receiving_tenant_id")
        .ok_or_else(|| invalid_subject("not a delegation token"))?;
    let verified = state
        .keys
        .verify::<Value>(&req.subject_token, &audience(&receiving))
        .await
        .map_err(|_| invalid_subject("signature, type, issuer, audience or time"))?;
    let claims = verified.claims;
    let jti = claims["jti"].as_str().unwrap_or_default();
    let row = if check_id("jti", jti, IdKind::Delegation).is_ok() {
        state.directory.delegation(&state.db, jti).await?
    } else {
        None
    }
    .ok_or_else(|| invalid_subject("unknown delegation"))?;
    let now = state.clock.now_millis();
    if row.receiving_tenant_id != receiving
        || claims["sub"].as_str() != Some(row.requesting_agent_id.as_str())
        || claims["action"].as_str() != Some(row.action.as_str())
    {
        return Err(invalid_subject("claims do not match the delegation"));
    }
    if row.requesting_agent_id != agent_id {
        return Err(invalid_subject("the token was issued to another agent"));
    }
    if delegations::effective_status(&row, now) != delegation::Status::Active {
        return Err(invalid_subject("the delegation is not active"));
    }
    // Only now is the connection looked up, in the token's receiving tenant:
    // any other tenant's connection stays invisible.
    let connection =
        exchange_connection(state, &row.receiving_tenant_id, &req.connection_id).await?;
    let provider = provider_of(state, &connection).await?;
    if row.action != format!("exchange:{}", provider.name) {
        return Err(invalid_subject(
            "the token's action is not this connection's exchange",
        ));
    }
    if !row.resource.is_empty() && row.resource != format!("connection:{}", connection.id) {
        return Err(invalid_subject(
            "the token's resource is another connection",
        ));
    }
    if !delegations::standing_ok(state, &row).await? {
        return Err(invalid_subject(
            "requesting tenant suspended or agent disabled",
        ));
    }
    let receiving_tenant = state
        .directory
        .tenant(&state.db, &row.receiving_tenant_id)
        .await?
        .ok_or(Error::NotFound("tenant"))?;
    if !crate::domain::policies::is_active(&receiving_tenant) {
        return Err(Error::denied(
            ErrorReason::TenantSuspended,
            "the connection's tenant is suspended",
        ));
    }
    let scopes = delegated_scopes(
        &req.scopes,
        &string_list(&connection.granted_scopes),
        &string_list(&row.scopes),
        &row.id,
    )?;

    // The exchange, judged now.
    let requesting_tenant = state
        .directory
        .tenant(&state.db, &row.requesting_tenant_id)
        .await?
        .ok_or(Error::NotFound("tenant"))?;
    let mut input = delegations::input_of(&row)?;
    input.scopes.clone_from(&scopes);
    input.context.insert(
        "vg_connection_id".to_owned(),
        Attr::String(connection.id.clone()),
    );
    let decision = delegations::judge_between(
        state,
        &requesting_tenant,
        agent_id,
        &receiving_tenant,
        &input,
    )
    .await?;
    let approved_by_a_human = row.step_up_id.is_some();
    match decision.outcome {
        Outcome::Allow => {}
        Outcome::StepUp if approved_by_a_human => {}
        Outcome::Block => {
            return Err(
                exchange_refused(state, ctx, &connection, agent_id, &input, &decision).await?,
            );
        }
        Outcome::StepUp => {
            input.vault_made = true;
            input.resource = format!("connection:{}", connection.id);
            input.requested_ttl_seconds = state
                .config
                .access_token_ttl_seconds
                .min(state.config.max_token_ttl_seconds);
            return Err(exchange_step_up(
                state,
                ctx,
                (&requesting_tenant, &receiving_tenant),
                agent_id,
                &input,
                &decision,
            )
            .await?);
        }
    }
    Ok(Grant {
        connection,
        provider,
        scopes,
        delegation: Some(row),
    })
}

/// The provider scopes a delegated exchange hands out: those asked for, or
/// every scope both the connection holds and the delegation granted. A scope
/// the connection does not hold is INVALID_ARGUMENT; one it holds but the
/// delegation did not grant is PERMISSION_DENIED (SCOPE_NOT_GRANTED), and so
/// is a delegation that granted none of the connection's scopes: a
/// delegation never stands for the provider's full grant by default.
fn delegated_scopes(
    requested: &[String],
    held: &[String],
    granted: &[String],
    delegation_id: &str,
) -> Result<Vec<String>> {
    let allowed: Vec<String> = held
        .iter()
        .filter(|scope| granted.contains(scope))
        .cloned()
        .collect();
    let mut v = Violations::new();
    for (i, scope) in requested.iter().enumerate() {
        if !held.contains(scope) {
            v.add(format!("scopes[{i}]"), "is not among the granted scopes");
        }
    }
    v.finish()?;
    let refused: Vec<String> = requested
        .iter()
        .filter(|scope| !allowed.contains(scope))
        .cloned()
        .collect();
    if !refused.is_empty() || allowed.is_empty() {
        return Err(Error::PermissionDenied {
            reason: ErrorReason::ScopeNotGranted,
            message: if refused.is_empty() {
                "the delegation grants none of the connection's scopes".to_owned()
            } else {
                "the delegation does not grant every scope asked for".to_owned()
            },
            metadata: HashMap::from([
                ("delegation_id".to_owned(), delegation_id.to_owned()),
                ("scopes_not_granted".to_owned(), refused.join(" ")),
            ]),
        });
    }
    Ok(sorted(if requested.is_empty() {
        allowed
    } else {
        requested.to_vec()
    }))
}

fn unverified_claim(token: &str, claim: &str) -> Option<String> {
    let payload = token.split('.').nth(1)?;
    let bytes = URL_SAFE_NO_PAD.decode(payload).ok()?;
    let claims: Value = serde_json::from_slice(&bytes).ok()?;
    claims.get(claim)?.as_str().map(str::to_owned)
}

/// The cached token when it has the margin left.
fn fresh_cached(
    state: &AppState,
    row: &connection::Model,
    now: Millis,
) -> Result<Option<Exchanged>> {
    let margin = i64::from(state.config.oauth_refresh_margin_seconds) * 1000;
    match (&row.access_token_ciphertext, row.access_token_expires_at) {
        (Some(sealed), Some(expires_at)) if expires_at - margin > now => Ok(Some(Exchanged {
            access_token: open(state, Sealed::AccessToken, &row.tenant_id, &row.id, sealed)?,
            token_type: row.token_type.clone(),
            expires_in: delegations::seconds_left(Some(expires_at), now),
            scope: row.access_token_scope.clone(),
        })),
        _ => Ok(None),
    }
}

/// The cached token, or one refresh shared by every concurrent caller.
/// Returns the token, whether it was refreshed now, and whether the provider
/// rotated the refresh token.
async fn cached_or_refreshed(state: &AppState, grant: &Grant) -> Result<(Exchanged, bool, bool)> {
    let now = state.clock.now_millis();
    if let Some(token) = fresh_cached(state, &grant.connection, now)? {
        return Ok((token, false, false));
    }
    single_flight(state, grant, None).await
}

/// A token for fewer scopes than granted: a refresh with `scope` (RFC 6749
/// §6), never cached (the cache holds the full grant's token). Refreshes of
/// one connection stay serialized under the same lease, since a rotating
/// provider invalidates the refresh token each time.
async fn narrowed_token(state: &AppState, grant: &Grant) -> Result<(Exchanged, bool)> {
    let scope = grant.scopes.join(" ");
    let (token, _, rotated) = single_flight(state, grant, Some(scope)).await?;
    Ok((token, rotated))
}

/// How much longer than the provider call's own timeout a refresh lease
/// lasts: the lease's UPDATE before the call and the store after it.
const REFRESH_LEASE_MARGIN_MILLIS: u64 = 5_000;
/// The first pause between two looks at a lease another caller holds; it
/// doubles up to [`LEASE_POLL_MAX`].
const LEASE_POLL_FIRST: Duration = Duration::from_millis(20);
const LEASE_POLL_MAX: Duration = Duration::from_millis(250);

/// How long a refresh lease lasts (on the server's clock). The provider
/// call is cut at `oauth_timeout_ms`, so a live holder has always finished
/// with the old refresh token before its lease lapses; only a holder that
/// died (or stalled longer than that) gives way.
fn lease_millis(state: &AppState) -> u64 {
    state
        .config
        .oauth_timeout_ms
        .max(1)
        .saturating_add(REFRESH_LEASE_MARGIN_MILLIS)
}

/// A refresh lease this caller holds on a connection row.
struct Lease {
    /// Random per refresh, so releasing never ends another caller's lease.
    holder: String,
    /// The `token_version` the lease was taken at; the store is conditional
    /// on it.
    token_version: i64,
}

/// One refresh of a connection at a time, on every replica, and no
/// database connection held while the provider answers. In this process
/// callers queue on [`crate::oauth_client::OAuthClient::flight`] (no
/// database work while they wait); across replicas the refresh lease on the
/// row decides: it is taken by a conditional UPDATE and given back by the
/// UPDATE that stores the result. Whoever finds it held re-reads the row
/// with a bounded poll until the holder stored (it then finds the fresh
/// token) or the lease ended (it then takes it). The part under the lease
/// runs on a task of its own, so a caller that goes away mid-call does not
/// strand a rotated refresh token or leave the lease to lapse.
///
/// `scope` asks for a narrowed token (never cached); `None` for the
/// connection's cached token.
async fn single_flight(
    state: &AppState,
    grant: &Grant,
    scope: Option<String>,
) -> Result<(Exchanged, bool, bool)> {
    let flight = state.oauth.flight(&grant.connection.id);
    let in_process = flight.lock_owned().await;
    let lease_ms = lease_millis(state);
    let give_up =
        tokio::time::Instant::now() + Duration::from_millis(lease_ms) + Duration::from_secs(1);
    let mut pause = LEASE_POLL_FIRST;
    loop {
        let row = reload_usable(state, &grant.connection.id).await?;
        let now = state.clock.now_millis();
        if scope.is_none()
            && let Some(token) = fresh_cached(state, &row, now)?
        {
            return Ok((token, false, false));
        }
        if let Some(lease) = take_lease(state, &row, now, lease_ms).await? {
            let task_state = state.clone();
            let provider = grant.provider.clone();
            let task = tokio::spawn(async move {
                let _in_process = in_process;
                refresh_under_lease(&task_state, row, &provider, scope.as_deref(), &lease).await
            });
            return task
                .await
                .map_err(|_| Error::internal("the refresh task ended abnormally"))?;
        }
        if tokio::time::Instant::now() >= give_up {
            return Err(refresh_in_progress(&row));
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(LEASE_POLL_MAX);
    }
}

/// UNAVAILABLE PROVIDER_ERROR for a caller that waited a whole lease for
/// another replica's refresh of `row`.
fn refresh_in_progress(row: &connection::Model) -> Error {
    Error::Unavailable {
        reason: ErrorReason::ProviderError,
        message: "a refresh of this connection is still in progress at the provider; retry later"
            .to_owned(),
        metadata: HashMap::from([("connection_id".to_owned(), row.id.clone())]),
    }
}

/// Takes the refresh lease of `row` if it is free or lapsed and the row is
/// still CONNECTED at the version read: one conditional UPDATE, no
/// transaction.
async fn take_lease(
    state: &AppState,
    row: &connection::Model,
    now: Millis,
    lease_ms: u64,
) -> Result<Option<Lease>> {
    let holder = random_token(16)?;
    let until = now.saturating_add(i64::try_from(lease_ms).unwrap_or(i64::MAX));
    let taken = connection::Entity::update_many()
        .col_expr(
            connection::Column::RefreshLeaseHolder,
            Expr::value(Some(holder.clone())),
        )
        .col_expr(
            connection::Column::RefreshLeaseExpiresAt,
            Expr::value(Some(until)),
        )
        .filter(connection::Column::Id.eq(row.id.clone()))
        .filter(connection::Column::Status.eq(Status::Connected))
        .filter(connection::Column::TokenVersion.eq(row.token_version))
        .filter(
            Condition::any()
                .add(connection::Column::RefreshLeaseExpiresAt.is_null())
                .add(connection::Column::RefreshLeaseExpiresAt.lte(now)),
        )
        .exec(&state.db)
        .await?;
    Ok((taken.rows_affected == 1).then_some(Lease {
        holder,
        token_version: row.token_version,
    }))
}

/// Gives the lease back after a refresh that stored nothing (the provider
/// failed, or a narrowed token without rotation). A failure here only
/// leaves the lease to lapse.
async fn release_lease(state: &AppState, id: &str, lease: &Lease) {
    let released = connection::Entity::update_many()
        .col_expr(
            connection::Column::RefreshLeaseHolder,
            Expr::value(Option::<String>::None),
        )
        .col_expr(
            connection::Column::RefreshLeaseExpiresAt,
            Expr::value(Option::<i64>::None),
        )
        .filter(connection::Column::Id.eq(id))
        .filter(connection::Column::RefreshLeaseHolder.eq(lease.holder.clone()))
        .exec(&state.db)
        .await;
    if let Err(err) = released {
        tracing::warn!(connection_id = %id, error = %err, "refresh lease not released; it lapses");
    }
}

/// Sets the columns that end a refresh lease (whoever holds it: the write
/// that carries them moves `token_version`, so any other holder's store
/// fails anyway).
fn without_lease(
    update: sea_orm::UpdateMany<connection::Entity>,
) -> sea_orm::UpdateMany<connection::Entity> {
    update
        .col_expr(
            connection::Column::RefreshLeaseHolder,
            Expr::value(Option::<String>::None),
        )
        .col_expr(
            connection::Column::RefreshLeaseExpiresAt,
            Expr::value(Option::<i64>::None),
        )
}

/// Under the lease: refresh at the provider (no database connection held
/// meanwhile), then store the result and end the lease in one conditional
/// UPDATE. A cached-token refresh stores the access token (and a rotated
/// refresh token); a narrowed one stores only a rotated refresh token.
async fn refresh_under_lease(
    state: &AppState,
    row: connection::Model,
    provider: &Arc<oauth_provider::Model>,
    scope: Option<&str>,
    lease: &Lease,
) -> Result<(Exchanged, bool, bool)> {
    let (grant_result, rotated) = match refresh(state, &row, provider, scope).await {
        Ok(refreshed) => refreshed,
        Err(err) => {
            // NEEDS_REAUTH already ended the lease with the status change.
            release_lease(state, &row.id, lease).await;
            return Err(err);
        }
    };
    let now = state.clock.now_millis();
    let expires_in = grant_result
        .expires_in
        .unwrap_or(DEFAULT_ACCESS_TTL_SECONDS);
    let (token, update) = if let Some(scope) = scope {
        let requested: Vec<String> = scope.split(' ').map(str::to_owned).collect();
        let token = Exchanged {
            token_type: token_type(&grant_result),
            scope: granted_scope_text(&grant_result, &requested),
            access_token: grant_result.access_token.clone(),
            expires_in: u32::try_from(expires_in).unwrap_or(u32::MAX),
        };
        let update = rotated.is_some().then(|| {
            connection::Entity::update_many()
                .col_expr(connection::Column::TokenVersion, next_token_version())
        });
        (token, update)
    } else {
        let granted = string_list(&row.granted_scopes);
        let scope = granted_scope_text(&grant_result, &granted);
        let token = Exchanged {
            access_token: grant_result.access_token.clone(),
            token_type: token_type(&grant_result),
            expires_in: u32::try_from(expires_in).unwrap_or(u32::MAX),
            scope: scope.clone(),
        };
        let update = with_access_token(
            state,
            connection::Entity::update_many(),
            &row,
            &grant_result,
            &scope,
            now,
        )?;
        (token, Some(update))
    };
    let Some(mut update) = update else {
        release_lease(state, &row.id, lease).await;
        return Ok((token, true, false));
    };
    update =
        without_lease(update).col_expr(connection::Column::LastRefreshAt, Expr::value(Some(now)));
    if let Some(new_refresh) = rotated.as_deref() {
        update = update.col_expr(
            connection::Column::RefreshTokenCiphertext,
            Expr::value(Some(seal(
                state,
                Sealed::RefreshToken,
                &row.tenant_id,
                &row.id,
                new_refresh,
            )?)),
        );
    }
    let stored = update
        .filter(connection::Column::Id.eq(row.id.clone()))
        .filter(connection::Column::Status.eq(Status::Connected))
        .filter(connection::Column::TokenVersion.eq(lease.token_version))
        .exec(&state.db)
        .await?;
    if stored.rows_affected == 0 {
        // Disconnected, re-authorized or invalidated meanwhile: hand
        // nothing out.
        return Err(Error::Conflict("the connection changed during the refresh"));
    }
    connection_changed(state, &row.id).await?;
    Ok((token, true, rotated.is_some()))
}

/// Calls the token endpoint with the stored refresh token. `invalid_grant`
/// marks the connection NEEDS_REAUTH (audited once) and answers
/// NEEDS_REAUTH; other failures answer PROVIDER_ERROR. Returns the grant and
/// the rotated refresh token, if the provider sent a new one.
async fn refresh(
    state: &AppState,
    row: &connection::Model,
    provider: &Arc<oauth_provider::Model>,
    scope: Option<&str>,
) -> Result<(TokenGrant, Option<String>)> {
    let Some(provider) =
        provider_matching(state, row, provider.clone(), |p| issued_by(row, p)).await?
    else {
        // The provider's endpoint or client moved since these tokens were
        // issued: they may go nowhere else, so they are dropped.
        return Err(mark_needs_reauth(state, row, ENDPOINTS_CHANGED, Discard::Tokens).await?);
    };
    let Some(sealed) = &row.refresh_token_ciphertext else {
        return Err(mark_needs_reauth(
            state,
            row,
            "the provider issued no refresh token",
            Discard::AccessToken,
        )
        .await?);
    };
    let refresh_token = open(state, Sealed::RefreshToken, &row.tenant_id, &row.id, sealed)?;
    let secret = provider_reads::client_secret(state, &provider)?;
    let mut pairs = vec![
        ("grant_type", "refresh_token"),
        ("refresh_token", refresh_token.as_str()),
    ];
    if let Some(scope) = scope {
        pairs.push(("scope", scope));
    }
    metrics::counter!("vaultguard_provider_refreshes_total").increment(1);
    match state
        .oauth
        .token(
            &provider.token_url,
            client_auth(&provider, secret.as_deref()),
            &pairs,
        )
        .await
    {
        Ok(grant) => {
            let rotated = grant
                .refresh_token
                .clone()
                .filter(|new| !new.is_empty() && *new != refresh_token);
            Ok((grant, rotated))
        }
        Err(ProviderError::InvalidGrant { description }) => {
            let reason = if description.is_empty() {
                "the provider refused the refresh token (invalid_grant)".to_owned()
            } else {
                format!("the provider refused the refresh token (invalid_grant: {description})")
            };
            Err(mark_needs_reauth(state, row, &reason, Discard::AccessToken).await?)
        }
        Err(err) => {
            tracing::warn!(connection_id = %row.id, error = %err, "refresh failed");
            let mut metadata = HashMap::from([("connection_id".to_owned(), row.id.clone())]);
            if let ProviderError::Rejected { error, .. } = &err {
                metadata.insert("oauth_error".to_owned(), error.clone());
            }
            Err(match err {
                ProviderError::Rejected { error, status, .. } => Error::FailedPrecondition {
                    reason: ErrorReason::ProviderError,
                    message: format!("the provider refused the refresh: {error} (HTTP {status})"),
                    metadata,
                },
                _ => Error::Unavailable {
                    reason: ErrorReason::ProviderError,
                    message: "the provider cannot be reached or failed; retry later".to_owned(),
                    metadata,
                },
            })
        }
    }
}

/// Which sealed tokens a write erases.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Discard {
    /// Only the cached access token (the refresh token stays, for the
    /// revocation at disconnection).
    AccessToken,
    /// The refresh token too: it may not be sent anywhere any more.
    Tokens,
}

/// Erases the sealed tokens `discard` names: the cached access token and
/// its expiry always, the refresh token too for [`Discard::Tokens`].
fn erasing(
    update: sea_orm::UpdateMany<connection::Entity>,
    discard: Discard,
) -> sea_orm::UpdateMany<connection::Entity> {
    let update = update
        .col_expr(
            connection::Column::AccessTokenCiphertext,
            Expr::value(Option::<Vec<u8>>::None),
        )
        .col_expr(
            connection::Column::AccessTokenExpiresAt,
            Expr::value(Option::<i64>::None),
        );
    match discard {
        Discard::AccessToken => update,
        Discard::Tokens => update.col_expr(
            connection::Column::RefreshTokenCiphertext,
            Expr::value(Option::<Vec<u8>>::None),
        ),
    }
}

/// The UPDATE that turns connections in one of `from` NEEDS_REAUTH for
/// `reason`: it erases what `discard` names, ends any refresh lease and
/// moves `token_version`. The caller says which rows.
fn needing_reauth(
    from: &[Status],
    reason: &str,
    discard: Discard,
    now: Millis,
) -> sea_orm::UpdateMany<connection::Entity> {
    erasing(without_lease(connection::Entity::update_many()), discard)
        .transition(from, Status::NeedsReauth)
        .col_expr(connection::Column::StatusReason, Expr::value(reason))
        .col_expr(connection::Column::UpdatedAt, Expr::value(now))
        .col_expr(connection::Column::TokenVersion, next_token_version())
}

/// Marks a connection NEEDS_REAUTH (once, audited), ending any refresh
/// lease, and returns the error the caller gets.
async fn mark_needs_reauth(
    state: &AppState,
    row: &connection::Model,
    reason: &str,
    discard: Discard,
) -> Result<Error> {
    let now = state.clock.now_millis();
    let reason = tidy(reason, 256);
    let txn = crate::store::begin(&state.db).await?;
    let updated = needing_reauth(&[Status::Connected], &reason, discard, now)
        .filter(connection::Column::Id.eq(row.id.clone()))
        .filter(connection::Column::TokenVersion.eq(row.token_version))
        .exec(&txn)
        .await?;
    let changed = [Entry::Connection(row.id.clone())];
    if updated.rows_affected == 1 {
        directory::announce(&txn, &changed[0]).await?;
        audit::append(
            &txn,
            state.clock.as_ref(),
            AuditCtx::system("").event(
                &row.tenant_id,
                "connection.needs_reauth",
                vec![row.id.clone(), row.provider_id.clone()],
                AuditOutcome::Failure,
                json!({
                    "connection_id": row.id,
                    "reason": reason,
                    "refresh_token_discarded": discard == Discard::Tokens,
                }),
            ),
        )
        .await?;
    }
    txn.commit().await?;
    state.directory_changed(&changed);
    state.audit_committed();
    let mut current = row.clone();
    current.status_reason = reason;
    Ok(needs_reauth(&current))
}

/// After UpdateOAuthProvider moved provider `provider_id`'s token or
/// revocation endpoint or its client id, in its transaction: every
/// connection still holding tokens issued under the old settings turns
/// NEEDS_REAUTH with its sealed tokens erased (they may not be sent to the
/// new endpoints, and VaultGuard can no longer use them at the old ones),
/// each audited as `connection.needs_reauth` by `actor` and announced.
/// Returns the connections changed.
pub(crate) async fn discard_for_moved_provider<C: sea_orm::ConnectionTrait>(
    txn: &C,
    state: &AppState,
    actor: &AuditCtx,
    tenant_id: &str,
    provider_id: &str,
) -> Result<Vec<Entry>> {
    let holding = Condition::any()
        .add(connection::Column::RefreshTokenCiphertext.is_not_null())
        .add(connection::Column::AccessTokenCiphertext.is_not_null());
    let ids: Vec<String> = connection::Entity::find()
        .select_only()
        .column(connection::Column::Id)
        .filter(connection::Column::TenantId.eq(tenant_id))
        .filter(connection::Column::ProviderId.eq(provider_id))
        .filter(Status::guard_into(Status::NeedsReauth))
        .filter(holding.clone())
        .into_tuple()
        .all(txn)
        .await?;
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let now = state.clock.now_millis();
    let stale = Status::sources(Status::NeedsReauth);
    needing_reauth(&stale, ENDPOINTS_CHANGED, Discard::Tokens, now)
        .filter(connection::Column::Id.is_in(ids.clone()))
        .exec(txn)
        .await?;
    let mut events = Vec::with_capacity(ids.len());
    let mut changed = Vec::with_capacity(ids.len());
    for id in ids {
        events.push(actor.event(
            tenant_id,
            "connection.needs_reauth",
            vec![id.clone(), provider_id.to_owned()],
            AuditOutcome::Failure,
            json!({
                "connection_id": id,
                "reason": ENDPOINTS_CHANGED,
                "refresh_token_discarded": true,
            }),
        ));
        let entry = Entry::Connection(id);
        directory::announce(txn, &entry).await?;
        changed.push(entry);
    }
    audit::append_all(txn, state.clock.as_ref(), events).await?;
    Ok(changed)
}

/// Property tests of what connections parse from outside: the callback
/// query, provider ID tokens (unverified, display only), stored lists and
/// requested scopes.
#[cfg(test)]
mod props {
    use axum::extract::Query;
    use proptest::prelude::*;

    use super::*;
    use crate::oauth_client::form_encode;
    use crate::props::{PURE_CASES, b64, config, jws_like};

    proptest! {
        #![proptest_config(config(PURE_CASES))]

        #[test]
        fn callback_queries_parse_or_are_refused(query in prop_oneof![
            any::<String>(),
            "[a-z_=&%0-9+.;#?-]{0,40}".prop_map(String::from),
        ]) {
            if let Ok(uri) = format!("/oauth/callback?{query}").parse::<http::Uri>() {
                let _ = Query::<CallbackQuery>::try_from_uri(&uri);
            }
        }

        #[test]
        fn callback_fields_round_trip(
            code in any::<String>(),
            state in any::<String>(),
            error in any::<String>(),
        ) {
            let uri: http::Uri = format!(
                "/oauth/callback?code={}&state={}&error={}",
                form_encode(&code),
                form_encode(&state),
                form_encode(&error)
            )
            .parse()
            .unwrap();
            let Query(parsed) = Query::<CallbackQuery>::try_from_uri(&uri).unwrap();
            prop_assert_eq!(parsed.code, code);
            prop_assert_eq!(parsed.state, state);
            prop_assert_eq!(parsed.error, error);
            prop_assert_eq!(parsed.error_description, "");
        }

        #[test]
        fn provider_id_tokens_never_panic(token in prop_oneof![
            jws_like(Vec::new()),
            (any::<String>(), any::<bool>()).prop_map(|(email, padded)| {
                let payload = b64(serde_json::json!({"email": email}).to_string().as_bytes());
                format!("e30.{payload}{}.sig", if padded { "==" } else { "" })
            }),
        ]) {
            let subject = external_subject(Some(&token));
            prop_assert!(subject.chars().count() <= 256);
            prop_assert!(!subject.chars().any(char::is_control));
            let _ = unverified_claim(&token, "sub");
        }

        #[test]
        fn stored_lists_never_panic(text in any::<String>()) {
            let _ = string_list(&text);
        }

        #[test]
        fn effective_scopes_stay_within_the_grant(
            requested in prop::collection::vec("[a-c]{1,2}", 0..4),
            allowed in prop::collection::vec("[a-c]{1,2}", 0..4),
        ) {
            match effective_scopes(&requested, &allowed) {
                Ok(scopes) => {
                    prop_assert!(scopes.iter().all(|s| allowed.contains(s)));
                    prop_assert!(scopes.windows(2).all(|w| w[0] < w[1]));
                }
                Err(_) => prop_assert!(requested.iter().any(|s| !allowed.contains(s))),
            }
        }
    }
}
