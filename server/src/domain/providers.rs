//! OAuth providers: a tenant admin's registrations of the authorization
//! servers its connected accounts live at. The client secret is sealed under
//! the master key (bound to the table, tenant and provider id) and is never
//! returned, logged or audited.

use std::collections::BTreeMap;

use sea_orm::{
    ActiveModelTrait, ActiveValue::Set, ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter,
    QueryOrder, QuerySelect,
};
use serde_json::json;
use vaultguard_proto::v1 as pb;

use crate::audit::{self, Outcome as AuditOutcome};
use crate::auth::CallContext;
use crate::directory::{self, Entry};
use crate::domain::provider_reads::{check_scopes, find, id_violation, scopes, seal_context};
use crate::domain::{actor_json, connections, insert_audited, page, to_json};
use crate::error::{Error, Result, Violations};
use crate::ids::{IdKind, new_id};
use crate::state::AppState;
use crate::store::entities::{connection, oauth_provider, oauth_state};
use crate::validate;

/// Authorize parameters VaultGuard sets itself.
const RESERVED_PARAMS: [&str; 7] = [
    "response_type",
    "client_id",
    "redirect_uri",
    "scope",
    "state",
    "code_challenge",
    "code_challenge_method",
];

/// The settings of a create or update, validated.
struct Settings {
    authorize_url: String,
    token_url: String,
    revocation_url: Option<String>,
    client_id: String,
    scopes: Vec<String>,
    extra_params: BTreeMap<String, String>,
}

fn check_extra_params(
    params: &std::collections::HashMap<String, String>,
    v: &mut Violations,
) -> BTreeMap<String, String> {
    if params.len() > 16 {
        v.add("extra_authorize_params", "at most 16 entries");
    }
    let mut out = BTreeMap::new();
    for (key, value) in params {
        let field = format!(
            "extra_authorize_params.{}",
            key.chars().take(64).collect::<String>()
        );
        let key_ok = (1..=64).contains(&key.chars().count())
            && key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
        if !key_ok {
            v.add(
                field,
                "keys are 1 to 64 characters of A-Z, a-z, 0-9, '_', '-' and '.'",
            );
        } else if RESERVED_PARAMS.contains(&key.as_str()) {
            v.add(field, "is set by VaultGuard itself");
        } else if value.chars().count() > 512 || value.chars().any(char::is_control) {
            v.add(
                field,
                "values are at most 512 characters without control characters",
            );
        } else {
            out.insert(key.clone(), value.clone());
        }
    }
    out
}

#[allow(clippy::too_many_arguments)]
fn check_settings(
    state: &AppState,
    v: &mut Violations,
    authorize_url: &str,
    token_url: &str,
    revocation_url: &str,
    client_id: &str,
    client_secret: &str,
    scopes: &[String],
    extra: &std::collections::HashMap<String, String>,
) -> Settings {
    let http = state.config.oauth_allow_http;
    v.check(validate::url("authorize_url", authorize_url, http, false).map(|_| ()));
    v.check(validate::url("token_url", token_url, http, false).map(|_| ()));
    if !revocation_url.is_empty() {
        v.check(validate::url("revocation_url", revocation_url, http, false).map(|_| ()));
    }
    if client_id.is_empty() {
        v.add("client_id", "is required");
    } else {
        v.check(validate::optional_text("client_id", client_id, 256));
    }
    if client_secret.chars().count() > 1024 {
        v.add("client_secret", "must be at most 1024 characters");
    }
    check_scopes("scopes", scopes, v);
    let extra_params = check_extra_params(extra, v);
    Settings {
        authorize_url: authorize_url.to_owned(),
        token_url: token_url.to_owned(),
        revocation_url: (!revocation_url.is_empty()).then(|| revocation_url.to_owned()),
        client_id: client_id.to_owned(),
        scopes: scopes.to_vec(),
        extra_params,
    }
}

/// The outbound address policy's early check of the endpoints VaultGuard
/// calls itself (token and revocation; the authorize URL is the browser's):
/// a forbidden IP literal, or a name resolving now to a forbidden address,
/// is a violation of its field ([`crate::outbound`]).
async fn check_endpoints(
    state: &AppState,
    v: &mut Violations,
    token_url: &str,
    revocation_url: &str,
) {
    let http = state.config.oauth_allow_http;
    for (field, value) in [("token_url", token_url), ("revocation_url", revocation_url)] {
        if let Ok(url) = validate::url(field, value, http, false) {
            v.check(state.outbound.check_registered_url(field, &url).await);
        }
    }
}

fn seal_secret(state: &AppState, tenant_id: &str, id: &str, secret: &str) -> Result<Vec<u8>> {
    if secret.is_empty() {
        Ok(Vec::new())
    } else {
        state
            .master
            .seal(seal_context(tenant_id, id), secret.as_bytes())
    }
}

/// Audit details of a provider: its settings, never the secret.
fn details(row: &oauth_provider::Model) -> serde_json::Value {
    json!({
        "provider_id": row.id,
        "name": row.name,
        "authorize_url": row.authorize_url,
        "token_url": row.token_url,
        "revocation_url": row.revocation_url,
        "client_id": row.client_id,
        "client_secret_set": !row.client_secret_ciphertext.is_empty(),
        "scopes": scopes(row),
    })
}

/// CreateOAuthProvider.
pub async fn create(
    state: &AppState,
    ctx: &CallContext,
    req: &pb::CreateOAuthProviderRequest,
) -> Result<oauth_provider::Model> {
    let tenant_id = ctx.principal.tenant_id()?.to_owned();
    let mut v = Violations::new();
    v.check(validate::name("name", &req.name));
    let settings = check_settings(
        state,
        &mut v,
        &req.authorize_url,
        &req.token_url,
        &req.revocation_url,
        &req.client_id,
        &req.client_secret,
        &req.scopes,
        &req.extra_authorize_params,
    );
    check_endpoints(state, &mut v, &req.token_url, &req.revocation_url).await;
    v.finish()?;
    let now = state.clock.now_millis();
    let id = new_id(IdKind::Provider);
    let row = oauth_provider::Model {
        client_secret_ciphertext: seal_secret(state, &tenant_id, &id, &req.client_secret)?,
        id,
        tenant_id: tenant_id.clone(),
        name: req.name.clone(),
        authorize_url: settings.authorize_url,
        token_url: settings.token_url,
        revocation_url: settings.revocation_url,
        client_id: settings.client_id,
        scopes: to_json(&settings.scopes)?,
        extra_params: to_json(&settings.extra_params)?,
        created_at: now,
        updated_at: now,
        created_by: actor_json(&ctx.principal.actor())?,
    };
    let event = ctx.audit().event(
        &tenant_id,
        "provider.created",
        vec![row.id.clone()],
        AuditOutcome::Success,
        details(&row),
    );
    let active: oauth_provider::ActiveModel = row.clone().into();
    insert_audited(
        state,
        active,
        || format!("a provider named {} exists", req.name),
        event,
    )
    .await?;
    Ok(row)
}

/// GetOAuthProvider.
pub async fn get(state: &AppState, ctx: &CallContext, id: &str) -> Result<oauth_provider::Model> {
    find(state, ctx.principal.tenant_id()?, "provider_id", id).await
}

/// ListOAuthProviders, by name.
pub async fn list(
    state: &AppState,
    ctx: &CallContext,
    page_req: Option<&pb::PageRequest>,
) -> Result<(Vec<oauth_provider::Model>, String)> {
    let tenant_id = ctx.principal.tenant_id()?.to_owned();
    let (size, token) = page::parts(page_req);
    let size = validate::page_size("page.page_size", size)?;
    let scope = format!("providers|{tenant_id}");
    let after = page::decode("page.page_token", &scope, token)?;
    let mut query = oauth_provider::Entity::find()
        .filter(oauth_provider::Column::TenantId.eq(tenant_id))
        .order_by_asc(oauth_provider::Column::Name)
        .limit(size + 1);
    if let Some(after) = after {
        query = query.filter(oauth_provider::Column::Name.gt(after));
    }
    let rows = query.all(&state.db).await?;
    Ok(page::finish(rows, size, &scope, |row| row.name.clone()))
}

/// UpdateOAuthProvider: replaces the mutable settings.
pub async fn update(
    state: &AppState,
    ctx: &CallContext,
    req: &pb::UpdateOAuthProviderRequest,
) -> Result<oauth_provider::Model> {
    let tenant_id = ctx.principal.tenant_id()?.to_owned();
    let mut v = Violations::new();
    if let Some(violation) = id_violation("provider_id", &req.provider_id) {
        v.check(Err(violation));
    }
    let settings = check_settings(
        state,
        &mut v,
        &req.authorize_url,
        &req.token_url,
        &req.revocation_url,
        &req.client_id,
        &req.client_secret,
        &req.scopes,
        &req.extra_authorize_params,
    );
    check_endpoints(state, &mut v, &req.token_url, &req.revocation_url).await;
    if req.clear_client_secret && !req.client_secret.is_empty() {
        v.add(
            "clear_client_secret",
            "cannot be set together with client_secret",
        );
    }
    v.finish()?;
    let current = find(state, &tenant_id, "provider_id", &req.provider_id).await?;
    // Where the stored secret and tokens may be sent: the token and
    // revocation endpoints, for the client id.
    let moved = settings.token_url != current.token_url
        || settings.revocation_url != current.revocation_url
        || settings.client_id != current.client_id;
    // Where a pending authorization's code and verifier may be sent, and
    // where its user was sent to log in.
    let flows_moved = moved || settings.authorize_url != current.authorize_url;
    if moved
        && !current.client_secret_ciphertext.is_empty()
        && req.client_secret.is_empty()
        && !req.clear_client_secret
    {
        return Err(Error::invalid(
            "client_secret",
            "must be given again (or cleared with clear_client_secret) when token_url, \
             revocation_url or client_id changes: the stored secret is only ever sent to the \
             endpoints it was registered for",
        ));
    }
    let now = state.clock.now_millis();
    let secret = if req.clear_client_secret {
        Vec::new()
    } else if req.client_secret.is_empty() {
        current.client_secret_ciphertext.clone()
    } else {
        seal_secret(state, &tenant_id, &current.id, &req.client_secret)?
    };
    let txn = crate::store::begin(&state.db).await?;
    let updated = oauth_provider::ActiveModel {
        id: Set(current.id.clone()),
        authorize_url: Set(settings.authorize_url),
        token_url: Set(settings.token_url),
        revocation_url: Set(settings.revocation_url),
        client_id: Set(settings.client_id),
        client_secret_ciphertext: Set(secret),
        scopes: Set(to_json(&settings.scopes)?),
        extra_params: Set(to_json(&settings.extra_params)?),
        updated_at: Set(now),
        ..Default::default()
    }
    .update(&txn)
    .await?;
    let mut changed = vec![Entry::Provider(updated.id.clone())];
    directory::announce(&txn, &changed[0]).await?;
    let audit_ctx = ctx.audit();
    let invalidated = if moved {
        connections::discard_for_moved_provider(&txn, state, &audit_ctx, &tenant_id, &updated.id)
            .await?
    } else {
        Vec::new()
    };
    let cancelled = if flows_moved {
        oauth_state::Entity::delete_many()
            .filter(oauth_state::Column::ProviderId.eq(updated.id.clone()))
            .filter(oauth_state::Column::UsedAt.is_null())
            .exec(&txn)
            .await?
            .rows_affected
    } else {
        0
    };
    let mut event = details(&updated);
    event["client_secret_changed"] =
        json!(req.clear_client_secret || !req.client_secret.is_empty());
    event["connections_needing_reauth"] = json!(invalidated.len());
    event["pending_authorizations_cancelled"] = json!(cancelled);
    changed.extend(invalidated);
    audit::append(
        &txn,
        state.clock.as_ref(),
        audit_ctx.event(
            &tenant_id,
            "provider.updated",
            vec![updated.id.clone()],
            AuditOutcome::Success,
            event,
        ),
    )
    .await?;
    txn.commit().await?;
    state.directory_changed(&changed);
    state.audit_committed();
    Ok(updated)
}

/// DeleteOAuthProvider: only once every connection is DISCONNECTED. The
/// disconnected connections and any unused authorization states go with it.
pub async fn delete(state: &AppState, ctx: &CallContext, id: &str) -> Result<()> {
    let tenant_id = ctx.principal.tenant_id()?.to_owned();
    let current = find(state, &tenant_id, "provider_id", id).await?;
    let txn = crate::store::begin(&state.db).await?;
    let live = connection::Entity::find()
        .filter(connection::Column::ProviderId.eq(current.id.clone()))
        .filter(connection::Column::Status.ne(connection::Status::Disconnected))
        .count(&txn)
        .await?;
    if live > 0 {
        txn.rollback().await?;
        return Err(Error::invalid_state(
            "the provider still has connections; disconnect them first",
            "has_connections",
        ));
    }
    crate::store::entities::oauth_state::Entity::delete_many()
        .filter(crate::store::entities::oauth_state::Column::ProviderId.eq(current.id.clone()))
        .exec(&txn)
        .await?;
    connection::Entity::delete_many()
        .filter(connection::Column::ProviderId.eq(current.id.clone()))
        .filter(connection::Column::Status.eq(connection::Status::Disconnected))
        .exec(&txn)
        .await?;
    let deleted = oauth_provider::Entity::delete_many()
        .filter(oauth_provider::Column::Id.eq(current.id.clone()))
        .filter(oauth_provider::Column::TenantId.eq(tenant_id.clone()))
        .exec(&txn)
        .await?;
    if deleted.rows_affected == 0 {
        txn.rollback().await?;
        return Err(Error::NotFound("provider"));
    }
    let changed = [Entry::Provider(current.id.clone())];
    directory::announce(&txn, &changed[0]).await?;
    audit::append(
        &txn,
        state.clock.as_ref(),
        ctx.audit().event(
            &tenant_id,
            "provider.deleted",
            vec![current.id.clone()],
            AuditOutcome::Success,
            details(&current),
        ),
    )
    .await?;
    txn.commit().await?;
    state.directory_changed(&changed);
    state.audit_committed();
    Ok(())
}
