//! Tenants: creation, suspension, external organisation bindings, settings.

use sea_orm::{
    ActiveModelTrait, ActiveValue::Set, ColumnTrait, EntityTrait, QueryFilter, QueryOrder,
    QuerySelect,
};
use serde_json::json;
use vaultguard_proto::v1::{ErrorReason, Role, TenantStatus, TokenAlgorithm};

use crate::audit::{self, Outcome, PLATFORM_LOG};
use crate::auth::CallContext;
use crate::directory::Entry;
use crate::domain::page;
use crate::error::{Error, Result, Violations, is_unique_violation};
use crate::ids::{IdKind, check_id, new_id};
use crate::issuer::{algorithm_name, parse_algorithm};
use crate::state::AppState;
use crate::store::entities::{external_org, tenant};
use crate::store::lifecycle::Transitions;
use crate::validate;

impl From<tenant::Status> for TenantStatus {
    fn from(status: tenant::Status) -> Self {
        match status {
            tenant::Status::Active => Self::Active,
            tenant::Status::Suspended => Self::Suspended,
        }
    }
}

/// The stored status a ListTenants filter names (none: any).
fn stored_status(status: TenantStatus) -> Option<tenant::Status> {
    match status {
        TenantStatus::Active => Some(tenant::Status::Active),
        TenantStatus::Suspended => Some(tenant::Status::Suspended),
        TenantStatus::Unspecified => None,
    }
}

/// A tenant with its external organisation bindings.
#[derive(Debug, Clone)]
pub struct TenantView {
    pub tenant: tenant::Model,
    pub organizations: Vec<external_org::Model>,
}

impl TenantView {
    pub fn status(&self) -> TenantStatus {
        self.tenant.status.into()
    }

    pub fn token_algorithm(&self) -> TokenAlgorithm {
        parse_algorithm(&self.tenant.token_algorithm).unwrap_or(TokenAlgorithm::Rs256)
    }
}

/// The audience of delegation tokens addressed to a tenant.
pub fn audience(tenant_id: &str) -> String {
    format!("urn:vaultguard:tenant:{tenant_id}")
}

fn check_algorithm(
    field: &str,
    raw: i32,
) -> std::result::Result<TokenAlgorithm, crate::error::FieldViolation> {
    validate::enum_value::<TokenAlgorithm>(field, raw, true)
        .map(|alg| alg.unwrap_or(TokenAlgorithm::Rs256))
}

async fn view(state: &AppState, model: tenant::Model) -> Result<TenantView> {
    let organizations = external_org::Entity::find()
        .filter(external_org::Column::TenantId.eq(model.id.clone()))
        .order_by_asc(external_org::Column::Issuer)
        .order_by_asc(external_org::Column::OrganizationId)
        .all(&state.db)
        .await?;
    Ok(TenantView {
        tenant: model,
        organizations,
    })
}

/// Records an operator action on a tenant in the tenant's own log and in
/// the platform log, inside the caller's transaction.
async fn record_operator_action<C: sea_orm::ConnectionTrait>(
    txn: &C,
    state: &AppState,
    ctx: &CallContext,
    tenant_id: &str,
    event_type: &'static str,
    details: serde_json::Value,
) -> Result<()> {
    let audit_ctx = ctx.audit();
    let subjects = vec![tenant_id.to_owned()];
    let events = vec![
        audit_ctx.event(
            tenant_id,
            event_type,
            subjects.clone(),
            Outcome::Success,
            details.clone(),
        ),
        audit_ctx.event(
            PLATFORM_LOG,
            event_type,
            subjects,
            Outcome::Success,
            details,
        ),
    ];
    audit::append_all(txn, state.clock.as_ref(), events).await
}

async fn find(state: &AppState, tenant_id: &str) -> Result<tenant::Model> {
    tenant::Entity::find_by_id(tenant_id.to_owned())
        .one(&state.db)
        .await?
        .ok_or(Error::NotFound("tenant"))
}

/// Creates an ACTIVE tenant (operator).
pub async fn create(
    state: &AppState,
    ctx: &CallContext,
    slug: &str,
    display_name: &str,
    token_algorithm: i32,
) -> Result<TenantView> {
    let mut violations = Violations::new();
    violations.check(validate::slug("slug", slug));
    violations.check(validate::required_text("display_name", display_name, 200));
    let algorithm = violations.take(check_algorithm("settings.token_algorithm", token_algorithm));
    violations.finish()?;
    let algorithm = algorithm.unwrap_or(TokenAlgorithm::Rs256);

    let now = state.clock.now_millis();
    let id = new_id(IdKind::Tenant);
    let txn = crate::store::begin(&state.db).await?;
    let inserted = tenant::ActiveModel {
        id: Set(id.clone()),
        slug: Set(slug.to_owned()),
        display_name: Set(display_name.to_owned()),
        status: Set(tenant::Status::Active),
        token_algorithm: Set(algorithm_name(algorithm).to_owned()),
        outbound_default: Set(tenant::OutboundDefault::Allow),
        policy_version: Set(0),
        created_at: Set(now),
        updated_at: Set(now),
        policy_updated_at: Set(None),
        policy_updated_by: Set(None),
        traffic_frozen_at: Set(None),
        traffic_freeze_reason: Set(String::new()),
        traffic_frozen_by: Set(None),
    }
    .insert(&txn)
    .await;
    let model = match inserted {
        Ok(model) => model,
        Err(err) if is_unique_violation(&err) => {
            return Err(Error::already_exists("a tenant with this slug exists"));
        }
        Err(err) => return Err(err.into()),
    };
    let details = json!({"slug": slug, "display_name": display_name, "token_algorithm": algorithm_name(algorithm)});
    record_operator_action(&txn, state, ctx, &id, "tenant.created", details).await?;
    txn.commit().await?;
    state.audit_committed();
    Ok(TenantView {
        tenant: model,
        organizations: Vec::new(),
    })
}

/// Returns a tenant: any tenant for the operator, the caller's own for
/// tenant principals (an empty id means their own). Another tenant's id
/// answers NOT_FOUND.
pub async fn get(state: &AppState, ctx: &CallContext, tenant_id: &str) -> Result<TenantView> {
    let principal = &ctx.principal;
    let wanted = if tenant_id.is_empty() {
        principal.tenant_id()?.to_owned()
    } else {
        check_id("tenant_id", tenant_id, IdKind::Tenant)?;
        tenant_id.to_owned()
    };
    if !principal.has_role(Role::Operator)
        && principal.tenant_id.as_deref() != Some(wanted.as_str())
    {
        return Err(Error::NotFound("tenant"));
    }
    let model = find(state, &wanted).await?;
    view(state, model).await
}

/// Returns any tenant by id (the caller has checked it may see it).
pub async fn get_any(state: &AppState, tenant_id: &str) -> Result<TenantView> {
    let model = find(state, tenant_id).await?;
    view(state, model).await
}

/// Lists tenants in creation order (operator).
pub async fn list(
    state: &AppState,
    status: i32,
    page_size: u32,
    page_token: &str,
) -> Result<(Vec<TenantView>, String)> {
    let mut violations = Violations::new();
    let size = violations.take(validate::page_size("page.page_size", page_size));
    let status = violations.take(validate::enum_value::<TenantStatus>("status", status, true));
    violations.finish()?;
    let (size, status) = (size.unwrap_or(50), status.flatten());
    let stored = status.and_then(stored_status);
    let scope = format!("tenants|{status:?}");
    let after = page::decode("page.page_token", &scope, page_token)?;

    let mut query = tenant::Entity::find()
        .order_by_asc(tenant::Column::Id)
        .limit(size + 1);
    if let Some(after) = after {
        query = query.filter(tenant::Column::Id.gt(after));
    }
    if let Some(stored) = stored {
        query = query.filter(tenant::Column::Status.eq(stored));
    }
    let rows = query.all(&state.db).await?;
    let (rows, next) = page::finish(rows, size, &scope, |row| row.id.clone());
    let mut views = Vec::with_capacity(rows.len());
    for row in rows {
        views.push(view(state, row).await?);
    }
    Ok((views, next))
}

/// Suspends (`suspend = true`) or reactivates a tenant (operator). The
/// change is a conditional update, so concurrent calls change it once.
pub async fn set_suspended(
    state: &AppState,
    ctx: &CallContext,
    tenant_id: &str,
    suspend: bool,
    reason: &str,
) -> Result<TenantView> {
    let mut violations = Violations::new();
    violations.check(check_id("tenant_id", tenant_id, IdKind::Tenant));
    violations.check(validate::optional_text("reason", reason, 500));
    violations.finish()?;
    let (to, event_type) = if suspend {
        (tenant::Status::Suspended, "tenant.suspended")
    } else {
        (tenant::Status::Active, "tenant.reactivated")
    };
    let now = state.clock.now_millis();
    let txn = crate::store::begin(&state.db).await?;
    let updated = tenant::Entity::update_many()
        .into_state(to)
        .col_expr(
            tenant::Column::UpdatedAt,
            sea_orm::sea_query::Expr::value(now),
        )
        .filter(tenant::Column::Id.eq(tenant_id))
        .exec(&txn)
        .await?;
    if updated.rows_affected == 0 {
        txn.rollback().await?;
        let current = find(state, tenant_id).await?;
        return Err(Error::invalid_state(
            format!("tenant is already {}", current.status),
            current.status.as_str(),
        ));
    }
    let details = json!({"reason": reason});
    record_operator_action(&txn, state, ctx, tenant_id, event_type, details).await?;
    let changed = [Entry::Tenant(tenant_id.to_owned())];
    crate::directory::announce(&txn, &changed[0]).await?;
    txn.commit().await?;
    state.audit_committed();
    state.directory_changed(&changed);
    let model = find(state, tenant_id).await?;
    view(state, model).await
}

fn check_org(
    violations: &mut Violations,
    state: &AppState,
    issuer: Option<&str>,
    organization_id: Option<&str>,
) {
    match issuer {
        None | Some("") => violations.add("organization.issuer", "is required"),
        Some(issuer) if !state.oidc.is_trusted(issuer) => {
            violations.add(
                "organization.issuer",
                "is not one of the server's trusted issuers",
            );
        }
        Some(_) => {}
    }
    match organization_id {
        None => violations.add("organization.organization_id", "is required"),
        Some(org) => violations.check(validate::required_text(
            "organization.organization_id",
            org,
            200,
        )),
    }
}

/// Binds an external organisation to a tenant (operator).
pub async fn bind_org(
    state: &AppState,
    ctx: &CallContext,
    tenant_id: &str,
    issuer: Option<&str>,
    organization_id: Option<&str>,
) -> Result<TenantView> {
    let mut violations = Violations::new();
    violations.check(check_id("tenant_id", tenant_id, IdKind::Tenant));
    check_org(&mut violations, state, issuer, organization_id);
    violations.finish()?;
    let issuer = state
        .oidc
        .canonical_issuer(issuer.unwrap_or_default())
        .unwrap_or_default()
        .to_owned();
    let organization_id = organization_id.unwrap_or_default().to_owned();
    find(state, tenant_id).await?;
    let txn = crate::store::begin(&state.db).await?;
    let inserted = external_org::ActiveModel {
        issuer: Set(issuer.clone()),
        organization_id: Set(organization_id.clone()),
        tenant_id: Set(tenant_id.to_owned()),
        created_at: Set(state.clock.now_millis()),
    }
    .insert(&txn)
    .await;
    match inserted {
        Ok(_) => {}
        Err(err) if is_unique_violation(&err) => {
            return Err(Error::already_exists(
                "this organisation is already bound to a tenant",
            ));
        }
        Err(err) => return Err(err.into()),
    }
    let details = json!({"issuer": issuer, "organization_id": organization_id});
    record_operator_action(
        &txn,
        state,
        ctx,
        tenant_id,
        "tenant.organization_bound",
        details,
    )
    .await?;
    txn.commit().await?;
    state.audit_committed();
    let model = find(state, tenant_id).await?;
    view(state, model).await
}

/// Removes an external organisation binding (operator).
pub async fn unbind_org(
    state: &AppState,
    ctx: &CallContext,
    tenant_id: &str,
    issuer: Option<&str>,
    organization_id: Option<&str>,
) -> Result<TenantView> {
    let mut violations = Violations::new();
    violations.check(check_id("tenant_id", tenant_id, IdKind::Tenant));
    if issuer.is_none_or(str::is_empty) {
        violations.add("organization.issuer", "is required");
    }
    if organization_id.is_none_or(str::is_empty) {
        violations.add("organization.organization_id", "is required");
    }
    violations.finish()?;
    let given = issuer.unwrap_or_default();
    let issuer = state
        .oidc
        .canonical_issuer(given)
        .unwrap_or(given)
        .to_owned();
    let organization_id = organization_id.unwrap_or_default().to_owned();
    let txn = crate::store::begin(&state.db).await?;
    let deleted = external_org::Entity::delete_many()
        .filter(external_org::Column::Issuer.eq(issuer.clone()))
        .filter(external_org::Column::OrganizationId.eq(organization_id.clone()))
        .filter(external_org::Column::TenantId.eq(tenant_id))
        .exec(&txn)
        .await?;
    if deleted.rows_affected == 0 {
        return Err(Error::NotFound("organisation binding"));
    }
    // Its humans lose their standing on every replica, open streams
    // included.
    let unbound = crate::directory::Entry::organization(&issuer, &organization_id);
    crate::directory::announce(&txn, &unbound).await?;
    let details = json!({"issuer": issuer, "organization_id": organization_id});
    record_operator_action(
        &txn,
        state,
        ctx,
        tenant_id,
        "tenant.organization_unbound",
        details,
    )
    .await?;
    txn.commit().await?;
    state.directory_changed(&[unbound]);
    state.audit_committed();
    let model = find(state, tenant_id).await?;
    view(state, model).await
}

/// Replaces the caller's own tenant settings (tenant admin).
pub async fn update_settings(
    state: &AppState,
    ctx: &CallContext,
    token_algorithm: Option<i32>,
) -> Result<TenantView> {
    let tenant_id = ctx.principal.tenant_id()?.to_owned();
    let Some(raw) = token_algorithm else {
        return Err(Error::invalid("settings", "is required"));
    };
    let algorithm = check_algorithm("settings.token_algorithm", raw)?;
    let txn = crate::store::begin(&state.db).await?;
    let current = tenant::Entity::find_by_id(tenant_id.clone())
        .one(&txn)
        .await?
        .ok_or(Error::NotFound("tenant"))?;
    if current.status != tenant::Status::Active {
        return Err(Error::denied(
            ErrorReason::TenantSuspended,
            "tenant is suspended",
        ));
    }
    let previous = current.token_algorithm.clone();
    let mut active: tenant::ActiveModel = current.into();
    active.token_algorithm = Set(algorithm_name(algorithm).to_owned());
    active.updated_at = Set(state.clock.now_millis());
    let model = active.update(&txn).await?;
    audit::append(
        &txn,
        state.clock.as_ref(),
        ctx.audit().event(
            &tenant_id,
            "tenant.settings_updated",
            vec![tenant_id.clone()],
            Outcome::Success,
            json!({"token_algorithm": {"from": previous, "to": algorithm_name(algorithm)}}),
        ),
    )
    .await?;
    let changed = [Entry::Tenant(tenant_id.clone())];
    crate::directory::announce(&txn, &changed[0]).await?;
    txn.commit().await?;
    state.audit_committed();
    state.directory_changed(&changed);
    view(state, model).await
}
