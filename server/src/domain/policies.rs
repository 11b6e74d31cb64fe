//! A tenant's policy: rules (inbound and outbound), its outbound default and
//! its version; and judging a request by both tenants' policies.
//!
//! Every edit runs in one transaction that changes the rule, bumps the
//! tenant's `policy_version` and appends the audit event, so the version a
//! decision reports names exactly the rules it saw.

use std::sync::Arc;

use sea_orm::sea_query::{Expr, ExprTrait};
use sea_orm::{
    ActiveModelTrait, ActiveValue::Set, ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter,
};
use serde_json::{Value, json};
use vaultguard_proto::v1 as pb;

use crate::audit::{self, Outcome as AuditOutcome};
use crate::auth::CallContext;
use crate::clock::Millis;
use crate::directory::Entry;
use crate::domain::policy_engine::{
    self as engine, Condition, Decision, Direction, Grants, Outcome, Request, TimeWindow,
};
use crate::domain::{actor_json, page, to_json};
use crate::error::{Error, FieldViolation, Result, Violations};
use crate::ids::{IdKind, check_id, new_id};
use crate::state::AppState;
use crate::store::entities::{agent, policy_rule, tenant};
use crate::validate;

impl From<tenant::OutboundDefault> for pb::OutboundDefault {
    fn from(default: tenant::OutboundDefault) -> Self {
        match default {
            tenant::OutboundDefault::Allow => Self::Allow,
            tenant::OutboundDefault::Block => Self::Block,
        }
    }
}

impl From<tenant::OutboundDefault> for Outcome {
    fn from(default: tenant::OutboundDefault) -> Self {
        match default {
            tenant::OutboundDefault::Allow => Self::Allow,
            tenant::OutboundDefault::Block => Self::Block,
        }
    }
}

/// The longest tenant or agent id accepted in a selector.
const MAX_ID_LEN: usize = 64;

/// The validated, mutable fields of a rule.
#[derive(Debug, Clone)]
struct RuleSpec {
    direction: Direction,
    action_pattern: String,
    counterpart_tenant_id: Option<String>,
    agent_id: Option<String>,
    conditions: Vec<Condition>,
    time_window: Option<TimeWindow>,
    effect: Outcome,
    max_ttl_seconds: u32,
    priority: i32,
    approvals_required: u32,
    description: String,
    grants: Grants,
}

fn short_id(field: &str, value: &str) -> std::result::Result<Option<String>, FieldViolation> {
    if value.is_empty() {
        return Ok(None);
    }
    if value.chars().count() > MAX_ID_LEN {
        return Err(FieldViolation {
            field: field.to_owned(),
            description: format!("must be at most {MAX_ID_LEN} characters"),
        });
    }
    Ok(Some(value.to_owned()))
}

/// Checks every field of `rule` (reporting all bad fields at once), then the
/// references that need the database: the counterpart tenant must exist and
/// an outbound agent must be the tenant's own.
async fn check_rule(state: &AppState, tenant_id: &str, rule: &pb::Rule) -> Result<RuleSpec> {
    let mut v = Violations::new();
    let direction = v
        .take(validate::enum_value::<pb::RuleDirection>(
            "rule.direction",
            rule.direction,
            false,
        ))
        .flatten()
        .and_then(Direction::from_proto);
    v.check(engine::check_pattern(
        "rule.action_pattern",
        &rule.action_pattern,
    ));
    let counterpart = v
        .take(short_id(
            "rule.counterpart_tenant_id",
            &rule.counterpart_tenant_id,
        ))
        .flatten();
    let agent_id = v.take(short_id("rule.agent_id", &rule.agent_id)).flatten();
    if direction == Some(Direction::Inbound) && agent_id.is_some() && counterpart.is_none() {
        v.add(
            "rule.agent_id",
            "an inbound rule may name an agent only together with counterpart_tenant_id",
        );
    }
    if let Some(agent) = &agent_id {
        v.check(check_id("rule.agent_id", agent, IdKind::Agent));
    }
    if rule.conditions.len() > engine::MAX_CONDITIONS {
        v.add(
            "rule.conditions",
            format!("at most {} conditions", engine::MAX_CONDITIONS),
        );
    }
    let mut conditions = Vec::new();
    for (i, c) in rule.conditions.iter().enumerate() {
        match Condition::from_proto(&format!("rule.conditions[{i}]"), c) {
            Ok(c) => conditions.push(c),
            Err(errors) => errors.into_iter().for_each(|e| v.check(Err(e))),
        }
    }
    let time_window = match &rule.time_window {
        None => None,
        Some(w) => match TimeWindow::from_proto("rule.time_window", w) {
            Ok(w) => Some(w),
            Err(errors) => {
                errors.into_iter().for_each(|e| v.check(Err(e)));
                None
            }
        },
    };
    let effect = v
        .take(validate::enum_value::<pb::Effect>(
            "rule.effect",
            rule.effect,
            false,
        ))
        .flatten()
        .and_then(Outcome::from_effect);
    if rule.max_ttl_seconds != 0 && !(60..=86_400).contains(&rule.max_ttl_seconds) {
        v.add("rule.max_ttl_seconds", "must be 0 or 60 to 86400");
    }
    if rule.approvals_required > 10 {
        v.add("rule.approvals_required", "must be at most 10");
    }
    v.check(validate::optional_text(
        "rule.description",
        &rule.description,
        512,
    ));
    let grants = match Grants::from_proto(
        direction,
        &rule.scopes,
        &rule.default_scopes,
        &rule.resources,
    ) {
        Ok(grants) => grants,
        Err(errors) => {
            errors.into_iter().for_each(|e| v.check(Err(e)));
            Grants::default()
        }
    };
    v.finish()?;
    let (Some(direction), Some(effect)) = (direction, effect) else {
        return Err(Error::internal("validated rule lacks direction or effect"));
    };

    if let Some(counterpart) = &counterpart
        && tenant::Entity::find_by_id(counterpart.clone())
            .one(&state.db)
            .await?
            .is_none()
    {
        return Err(Error::invalid(
            "rule.counterpart_tenant_id",
            "names no tenant",
        ));
    }
    if direction == Direction::Outbound
        && let Some(agent_id) = &agent_id
        && agent::Entity::find_by_id(agent_id.clone())
            .filter(agent::Column::TenantId.eq(tenant_id))
            .one(&state.db)
            .await?
            .is_none()
    {
        return Err(Error::NotFound("agent"));
    }
    Ok(RuleSpec {
        direction,
        action_pattern: rule.action_pattern.clone(),
        counterpart_tenant_id: counterpart,
        agent_id,
        conditions,
        time_window,
        approvals_required: if effect == Outcome::StepUp {
            rule.approvals_required
        } else {
            0
        },
        max_ttl_seconds: if effect == Outcome::Block {
            0
        } else {
            rule.max_ttl_seconds
        },
        // Like the lifetime cap, grants mean nothing to a BLOCK.
        grants: if effect == Outcome::Block {
            Grants::default()
        } else {
            grants
        },
        effect,
        priority: rule.priority,
        description: rule.description.clone(),
    })
}

/// The engine's view of a stored rule.
pub fn parse_rule(model: &policy_rule::Model) -> Result<engine::Rule> {
    let conditions: Vec<Condition> =
        serde_json::from_str(&model.conditions).map_err(Error::internal)?;
    let time_window = model
        .time_window
        .as_deref()
        .map(serde_json::from_str::<TimeWindow>)
        .transpose()
        .map_err(Error::internal)?;
    let grants: Grants = serde_json::from_str(&model.grants).map_err(Error::internal)?;
    Ok(engine::Rule {
        id: model.id.clone(),
        action_pattern: model.action_pattern.clone(),
        counterpart_tenant_id: model.counterpart_tenant_id.clone(),
        agent_id: model.agent_id.clone(),
        conditions,
        time_window,
        effect: model.effect.into(),
        max_ttl_seconds: u32::try_from(model.max_ttl_seconds).unwrap_or_default(),
        priority: model.priority,
        approvals_required: u32::try_from(model.approvals_required).unwrap_or_default(),
        created_at: model.created_at,
        grants,
    })
}

/// A rule as audit events record it.
fn rule_details(model: &policy_rule::Model) -> Value {
    let grants: Grants = serde_json::from_str(&model.grants).unwrap_or_default();
    json!({
        "id": model.id,
        "direction": model.direction.as_str(),
        "action_pattern": model.action_pattern,
        "counterpart_tenant_id": model.counterpart_tenant_id,
        "agent_id": model.agent_id,
        "conditions": serde_json::from_str::<Value>(&model.conditions).unwrap_or(Value::Null),
        "time_window": model.time_window.as_deref().and_then(|w| serde_json::from_str::<Value>(w).ok()),
        "effect": model.effect.as_str(),
        "max_ttl_seconds": model.max_ttl_seconds,
        "priority": model.priority,
        "approvals_required": model.approvals_required,
        "description": model.description,
        // What the rule grants, field by field as the proto names them.
        "scopes": grants.scopes,
        "default_scopes": grants.default_scopes,
        "resources": grants.resources,
        "version": model.version,
    })
}

/// Bumps the tenant's policy version inside `txn`, optionally only from
/// `expected`; returns the new version.
async fn bump_version<C: ConnectionTrait>(
    txn: &C,
    tenant_id: &str,
    expected: Option<i64>,
    settings: Option<(tenant::OutboundDefault, Millis, String)>,
) -> Result<i64> {
    let mut update = tenant::Entity::update_many()
        .col_expr(
            tenant::Column::PolicyVersion,
            Expr::col(tenant::Column::PolicyVersion).add(1),
        )
        .filter(tenant::Column::Id.eq(tenant_id));
    if let Some((outbound_default, now, actor)) = settings {
        update = update
            .col_expr(
                tenant::Column::OutboundDefault,
                Expr::value(outbound_default),
            )
            .col_expr(tenant::Column::PolicyUpdatedAt, Expr::value(now))
            .col_expr(tenant::Column::PolicyUpdatedBy, Expr::value(actor));
    }
    if let Some(expected) = expected {
        update = update.filter(tenant::Column::PolicyVersion.eq(expected));
    }
    let result = update.exec(txn).await?;
    crate::directory::announce(txn, &Entry::Tenant(tenant_id.to_owned())).await?;
    let current = tenant::Entity::find_by_id(tenant_id.to_owned())
        .one(txn)
        .await?
        .ok_or(Error::NotFound("tenant"))?;
    if result.rows_affected == 0 {
        return Err(version_mismatch(current.policy_version));
    }
    Ok(current.policy_version)
}

fn version_mismatch(current: i64) -> Error {
    let mut err = Error::invalid_state("the version changed since it was read", "version_mismatch");
    if let Error::FailedPrecondition { metadata, .. } = &mut err {
        metadata.insert("current_version".to_owned(), current.to_string());
    }
    err
}

fn positive(value: u64, field: &str) -> Result<i64> {
    i64::try_from(value).map_err(|_| Error::invalid(field, "is out of range"))
}

async fn find_rule(state: &AppState, tenant_id: &str, rule_id: &str) -> Result<policy_rule::Model> {
    check_id("rule_id", rule_id, IdKind::Rule)?;
    policy_rule::Entity::find_by_id(rule_id.to_owned())
        .filter(policy_rule::Column::TenantId.eq(tenant_id))
        .one(&state.db)
        .await?
        .ok_or(Error::NotFound("rule"))
}

/// Finishes a rule edit inside `txn`: bumps the tenant's policy version,
/// audits the edit with that version, commits. Returns the new version.
pub(crate) async fn commit_edit(
    txn: sea_orm::DatabaseTransaction,
    state: &AppState,
    ctx: &CallContext,
    tenant_id: &str,
    event_type: &'static str,
    rule_id: &str,
    mut details: Value,
) -> Result<i64> {
    let version = bump_version(&txn, tenant_id, None, None).await?;
    details["policy_version"] = json!(version);
    audit::append(
        &txn,
        state.clock.as_ref(),
        ctx.audit().event(
            tenant_id,
            event_type,
            vec![rule_id.to_owned()],
            AuditOutcome::Success,
            details,
        ),
    )
    .await?;
    txn.commit().await?;
    state.audit_committed();
    state.directory_changed(&[Entry::Tenant(tenant_id.to_owned())]);
    Ok(version)
}

fn refuse_output_only(rule: &pb::Rule) -> Result<()> {
    let mut v = Violations::new();
    if !rule.id.is_empty() {
        v.add("rule.id", "is output only");
    }
    if rule.create_time.is_some() {
        v.add("rule.create_time", "is output only");
    }
    if rule.update_time.is_some() {
        v.add("rule.update_time", "is output only");
    }
    if rule.version != 0 {
        v.add("rule.version", "is output only");
    }
    if rule.update_actor.is_some() {
        v.add("rule.update_actor", "is output only");
    }
    v.finish()
}

/// Creates a rule in the caller's tenant; returns it and the new policy version.
pub async fn create_rule(
    state: &AppState,
    ctx: &CallContext,
    rule: Option<&pb::Rule>,
) -> Result<(policy_rule::Model, i64)> {
    let tenant_id = ctx.principal.tenant_id()?.to_owned();
    let rule = rule.ok_or_else(|| Error::invalid("rule", "is required"))?;
    refuse_output_only(rule)?;
    let spec = check_rule(state, &tenant_id, rule).await?;
    let now = state.clock.now_millis();
    let model = policy_rule::ActiveModel {
        id: Set(new_id(IdKind::Rule)),
        tenant_id: Set(tenant_id.clone()),
        direction: Set(spec.direction),
        action_pattern: Set(spec.action_pattern),
        counterpart_tenant_id: Set(spec.counterpart_tenant_id),
        agent_id: Set(spec.agent_id),
        conditions: Set(to_json(&spec.conditions)?),
        time_window: Set(spec.time_window.as_ref().map(to_json).transpose()?),
        effect: Set(spec.effect.into()),
        max_ttl_seconds: Set(i64::from(spec.max_ttl_seconds)),
        priority: Set(spec.priority),
        approvals_required: Set(i32::try_from(spec.approvals_required).unwrap_or(10)),
        description: Set(spec.description),
        version: Set(1),
        created_at: Set(now),
        updated_at: Set(now),
        updated_by: Set(actor_json(&ctx.principal.actor())?),
        grants: Set(to_json(&spec.grants)?),
    };
    let txn = crate::store::begin(&state.db).await?;
    let model = model.insert(&txn).await?;
    let details = json!({"rule": rule_details(&model)});
    let version = commit_edit(
        txn,
        state,
        ctx,
        &tenant_id,
        "rule.created",
        &model.id,
        details,
    )
    .await?;
    Ok((model, version))
}

/// Reads one rule of the caller's tenant.
pub async fn get_rule(
    state: &AppState,
    ctx: &CallContext,
    rule_id: &str,
) -> Result<policy_rule::Model> {
    find_rule(state, ctx.principal.tenant_id()?, rule_id).await
}

/// Lists the caller's tenant's rules in evaluation order (inbound first).
/// Returns the page, the next page token and the policy version.
pub async fn list_rules(
    state: &AppState,
    ctx: &CallContext,
    request: &pb::ListRulesRequest,
) -> Result<(Vec<policy_rule::Model>, String, i64)> {
    let tenant_id = ctx.principal.tenant_id()?.to_owned();
    let mut v = Violations::new();
    let direction = v
        .take(validate::enum_value::<pb::RuleDirection>(
            "direction",
            request.direction,
            true,
        ))
        .flatten()
        .and_then(Direction::from_proto);
    let counterpart = v
        .take(short_id(
            "counterpart_tenant_id",
            &request.counterpart_tenant_id,
        ))
        .flatten();
    let agent_id = v.take(short_id("agent_id", &request.agent_id)).flatten();
    let page = request.page.clone().unwrap_or_default();
    let size = v.take(validate::page_size("page.page_size", page.page_size));
    v.finish()?;
    let size = usize::try_from(size.unwrap_or(50)).unwrap_or(50);
    let scope = format!("rules|{tenant_id}|{direction:?}|{counterpart:?}|{agent_id:?}");
    let after = page::decode("page.page_token", &scope, &page.page_token)?;

    let mut query =
        policy_rule::Entity::find().filter(policy_rule::Column::TenantId.eq(&tenant_id));
    if let Some(direction) = direction {
        query = query.filter(policy_rule::Column::Direction.eq(direction));
    }
    if let Some(counterpart) = &counterpart {
        query = query.filter(policy_rule::Column::CounterpartTenantId.eq(counterpart.clone()));
    }
    if let Some(agent_id) = &agent_id {
        query = query.filter(policy_rule::Column::AgentId.eq(agent_id.clone()));
    }
    let txn = crate::store::begin(&state.db).await?;
    let rows = query.all(&txn).await?;
    let version = tenant::Entity::find_by_id(tenant_id.clone())
        .one(&txn)
        .await?
        .map(|t| t.policy_version)
        .unwrap_or_default();
    txn.commit().await?;

    let mut ordered = rows
        .into_iter()
        .map(|row| parse_rule(&row).map(|rule| (row, rule)))
        .collect::<Result<Vec<_>>>()?;
    ordered.sort_by(|(a_row, a), (b_row, b)| {
        a_row
            .direction
            .as_str()
            .cmp(b_row.direction.as_str())
            .then_with(|| a.evaluation_order(b))
    });
    // The cursor is "position:id"; the id re-anchors it when rules moved.
    let start = match after {
        None => 0,
        Some(cursor) => {
            let (position, id) = cursor.split_once(':').unwrap_or(("0", cursor.as_str()));
            match ordered.iter().position(|(row, _)| row.id == id) {
                Some(found) => found + 1,
                None => position.parse::<usize>().unwrap_or(0),
            }
        }
    };
    let rest: Vec<policy_rule::Model> = ordered
        .into_iter()
        .skip(start)
        .map(|(row, _)| row)
        .collect();
    let next = if rest.len() > size {
        rest.get(size - 1)
            .map(|last| page::encode(&scope, &format!("{}:{}", start + size, last.id)))
            .unwrap_or_default()
    } else {
        String::new()
    };
    Ok((rest.into_iter().take(size).collect(), next, version))
}

/// Replaces a rule's mutable fields, guarded by its version.
pub async fn update_rule(
    state: &AppState,
    ctx: &CallContext,
    rule: Option<&pb::Rule>,
    expected_version: u64,
) -> Result<(policy_rule::Model, i64)> {
    let tenant_id = ctx.principal.tenant_id()?.to_owned();
    let rule = rule.ok_or_else(|| Error::invalid("rule", "is required"))?;
    let mut v = Violations::new();
    v.check(check_id("rule.id", &rule.id, IdKind::Rule));
    if expected_version == 0 {
        v.add("expected_version", "is required");
    }
    v.finish()?;
    let expected = positive(expected_version, "expected_version")?;
    let spec = check_rule(state, &tenant_id, rule).await?;
    let current = find_rule(state, &tenant_id, &rule.id)
        .await
        .map_err(|err| match err {
            Error::InvalidArgument(_) => Error::invalid("rule.id", "is not a rule id"),
            other => other,
        })?;
    if current.direction != spec.direction {
        return Err(Error::invalid("rule.direction", "cannot be changed"));
    }
    if current.version != expected {
        return Err(version_mismatch(current.version));
    }
    let now = state.clock.now_millis();
    let txn = crate::store::begin(&state.db).await?;
    let updated = policy_rule::Entity::update_many()
        .col_expr(
            policy_rule::Column::ActionPattern,
            Expr::value(spec.action_pattern),
        )
        .col_expr(
            policy_rule::Column::CounterpartTenantId,
            Expr::value(spec.counterpart_tenant_id),
        )
        .col_expr(policy_rule::Column::AgentId, Expr::value(spec.agent_id))
        .col_expr(
            policy_rule::Column::Conditions,
            Expr::value(to_json(&spec.conditions)?),
        )
        .col_expr(
            policy_rule::Column::TimeWindow,
            Expr::value(spec.time_window.as_ref().map(to_json).transpose()?),
        )
        .col_expr(
            policy_rule::Column::Effect,
            Expr::value(policy_rule::Effect::from(spec.effect)),
        )
        .col_expr(
            policy_rule::Column::MaxTtlSeconds,
            Expr::value(i64::from(spec.max_ttl_seconds)),
        )
        .col_expr(policy_rule::Column::Priority, Expr::value(spec.priority))
        .col_expr(
            policy_rule::Column::ApprovalsRequired,
            Expr::value(i32::try_from(spec.approvals_required).unwrap_or(10)),
        )
        .col_expr(
            policy_rule::Column::Description,
            Expr::value(spec.description),
        )
        .col_expr(
            policy_rule::Column::Grants,
            Expr::value(to_json(&spec.grants)?),
        )
        .col_expr(
            policy_rule::Column::Version,
            Expr::col(policy_rule::Column::Version).add(1),
        )
        .col_expr(policy_rule::Column::UpdatedAt, Expr::value(now))
        .col_expr(
            policy_rule::Column::UpdatedBy,
            Expr::value(actor_json(&ctx.principal.actor())?),
        )
        .filter(policy_rule::Column::Id.eq(current.id.clone()))
        .filter(policy_rule::Column::TenantId.eq(tenant_id.clone()))
        .filter(policy_rule::Column::Version.eq(expected))
        .exec(&txn)
        .await?;
    if updated.rows_affected == 0 {
        txn.rollback().await?;
        let latest = find_rule(state, &tenant_id, &current.id).await?;
        return Err(version_mismatch(latest.version));
    }
    let model = policy_rule::Entity::find_by_id(current.id.clone())
        .one(&txn)
        .await?
        .ok_or(Error::NotFound("rule"))?;
    let details = json!({"before": rule_details(&current), "rule": rule_details(&model)});
    let version = commit_edit(
        txn,
        state,
        ctx,
        &tenant_id,
        "rule.updated",
        &model.id,
        details,
    )
    .await?;
    Ok((model, version))
}

/// Deletes a rule, optionally guarded by its version; returns the new
/// policy version.
pub async fn delete_rule(
    state: &AppState,
    ctx: &CallContext,
    rule_id: &str,
    expected_version: u64,
) -> Result<i64> {
    let tenant_id = ctx.principal.tenant_id()?.to_owned();
    let expected = positive(expected_version, "expected_version")?;
    let current = find_rule(state, &tenant_id, rule_id).await?;
    let txn = crate::store::begin(&state.db).await?;
    let mut delete = policy_rule::Entity::delete_many()
        .filter(policy_rule::Column::Id.eq(current.id.clone()))
        .filter(policy_rule::Column::TenantId.eq(tenant_id.clone()));
    if expected != 0 {
        delete = delete.filter(policy_rule::Column::Version.eq(expected));
    }
    let deleted = delete.exec(&txn).await?;
    if deleted.rows_affected == 0 {
        txn.rollback().await?;
        let latest = find_rule(state, &tenant_id, rule_id).await?;
        return Err(version_mismatch(latest.version));
    }
    let details = json!({"rule": rule_details(&current)});
    commit_edit(
        txn,
        state,
        ctx,
        &tenant_id,
        "rule.deleted",
        &current.id,
        details,
    )
    .await
}

/// The caller's tenant row (its settings and version).
pub async fn settings(state: &AppState, ctx: &CallContext) -> Result<tenant::Model> {
    tenant::Entity::find_by_id(ctx.principal.tenant_id()?.to_owned())
        .one(&state.db)
        .await?
        .ok_or(Error::NotFound("tenant"))
}

/// Changes the outbound default, optionally guarded by the policy version.
pub async fn update_settings(
    state: &AppState,
    ctx: &CallContext,
    outbound_default: i32,
    expected_policy_version: u64,
) -> Result<tenant::Model> {
    let tenant_id = ctx.principal.tenant_id()?.to_owned();
    let mut v = Violations::new();
    let default = v
        .take(validate::enum_value::<pb::OutboundDefault>(
            "outbound_default",
            outbound_default,
            false,
        ))
        .flatten();
    v.finish()?;
    let expected = positive(expected_policy_version, "expected_policy_version")?;
    let default = match default {
        Some(pb::OutboundDefault::Block) => tenant::OutboundDefault::Block,
        Some(pb::OutboundDefault::Allow | pb::OutboundDefault::Unspecified) | None => {
            tenant::OutboundDefault::Allow
        }
    };
    let txn = crate::store::begin(&state.db).await?;
    let version = bump_version(
        &txn,
        &tenant_id,
        (expected != 0).then_some(expected),
        Some((
            default,
            state.clock.now_millis(),
            actor_json(&ctx.principal.actor())?,
        )),
    )
    .await?;
    audit::append(
        &txn,
        state.clock.as_ref(),
        ctx.audit().event(
            &tenant_id,
            "policy.settings_updated",
            vec![tenant_id.clone()],
            AuditOutcome::Success,
            json!({"outbound_default": default.as_str(), "policy_version": version}),
        ),
    )
    .await?;
    txn.commit().await?;
    state.audit_committed();
    state.directory_changed(&[Entry::Tenant(tenant_id.clone())]);
    settings(state, ctx).await
}

async fn side_rules<C: ConnectionTrait>(
    conn: &C,
    tenant_id: &str,
    direction: Direction,
) -> Result<Vec<engine::Rule>> {
    policy_rule::Entity::find()
        .filter(policy_rule::Column::TenantId.eq(tenant_id))
        .filter(policy_rule::Column::Direction.eq(direction))
        .all(conn)
        .await?
        .iter()
        .map(parse_rule)
        .collect()
}

/// One side's rules at `current`'s version: from the cache, or read with the
/// version before and after (equal versions prove no edit committed in
/// between, whatever the isolation level), then cached. Returns the tenant
/// row the rules belong to.
async fn side_at(
    state: &AppState,
    current: tenant::Model,
    direction: Direction,
) -> Result<(tenant::Model, Arc<engine::RuleSet>)> {
    if let Some(rules) = state.policy_cache.get(&current, direction) {
        return Ok((current, rules));
    }
    let mut before = current;
    for _ in 0..3 {
        let rules = side_rules(&state.db, &before.id, direction).await?;
        let after = tenant::Entity::find_by_id(before.id.clone())
            .one(&state.db)
            .await?
            .ok_or(Error::NotFound("tenant"))?;
        let rules = Arc::new(engine::RuleSet::new(rules));
        if after.policy_version == before.policy_version {
            state.policy_cache.put(&after, direction, rules.clone());
            return Ok((after, rules));
        }
        before = after;
    }
    Err(Error::Conflict("the policy changed while it was read"))
}

/// Judges `request` by the requesting tenant's outbound rules and the
/// receiving tenant's inbound rules, each side's rules matching its
/// recorded version (see [`PolicyCache`](crate::domain::policy_cache::PolicyCache)). The tenant rows are the
/// directory's (`crate::directory`), read by the caller for this request.
pub async fn judge(
    state: &AppState,
    requesting: &tenant::Model,
    receiving: &tenant::Model,
    request: &Request<'_>,
) -> Result<Decision> {
    let now = state.clock.now_millis();
    let (requesting, outbound_rules) =
        side_at(state, requesting.clone(), Direction::Outbound).await?;
    let (receiving, inbound_rules) = side_at(state, receiving.clone(), Direction::Inbound).await?;
    let outbound_default = Outcome::from(requesting.outbound_default);
    // The inbound side first: it settles the scopes (the request's, or its
    // deciding rule's defaults), which the outbound side then limits.
    let inbound = engine::judge_side(
        &receiving.id,
        u64::try_from(receiving.policy_version).unwrap_or_default(),
        Direction::Inbound,
        inbound_rules.candidates(request.action),
        request,
        Outcome::Block,
        now,
    );
    let settled = Request {
        scopes: &inbound.scopes,
        ..request.clone()
    };
    let outbound = engine::judge_side(
        &requesting.id,
        u64::try_from(requesting.policy_version).unwrap_or_default(),
        Direction::Outbound,
        outbound_rules.candidates(request.action),
        &settled,
        outbound_default,
        now,
    );
    Ok(engine::combine(
        outbound,
        inbound,
        request.resource,
        request.requested_ttl_seconds,
        state.config.max_token_ttl_seconds,
        now,
    ))
}

/// A rule the legacy upgrade gave `*` grants: its tenant, id and new rule
/// version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LegacyGrant {
    pub tenant_id: String,
    pub rule_id: String,
    pub rule_version: i64,
}

/// The upgrade an operator may choose after scopes and resources became
/// part of the policy: every inbound ALLOW or STEP_UP rule that grants
/// nothing (as every rule written before did) is made to grant any scope and
/// any resource (`*`), which is what its tokens carried before. Each rule is
/// one audited edit (`rule.updated`, actor `system`, request id
/// `grant-legacy-scopes`) bumping its tenant's policy version; `tenant_id`
/// limits it to one tenant; `dry_run` lists without writing.
pub async fn grant_legacy_scopes(
    state: &AppState,
    tenant_id: Option<&str>,
    dry_run: bool,
) -> Result<Vec<LegacyGrant>> {
    let mut query = policy_rule::Entity::find()
        .filter(policy_rule::Column::Direction.eq(Direction::Inbound))
        .filter(policy_rule::Column::Effect.ne(policy_rule::Effect::Block));
    if let Some(tenant_id) = tenant_id {
        query = query.filter(policy_rule::Column::TenantId.eq(tenant_id));
    }
    let legacy = Grants {
        scopes: vec!["*".to_owned()],
        default_scopes: Vec::new(),
        resources: vec!["*".to_owned()],
    };
    let audit_ctx = crate::audit::AuditCtx::system("grant-legacy-scopes");
    let mut granted = Vec::new();
    for current in query.all(&state.db).await? {
        if parse_rule(&current)?.grants != Grants::default() {
            continue;
        }
        if dry_run {
            granted.push(LegacyGrant {
                tenant_id: current.tenant_id.clone(),
                rule_id: current.id.clone(),
                rule_version: current.version,
            });
            continue;
        }
        let now = state.clock.now_millis();
        let txn = crate::store::begin(&state.db).await?;
        let updated = policy_rule::Entity::update_many()
            .col_expr(policy_rule::Column::Grants, Expr::value(to_json(&legacy)?))
            .col_expr(
                policy_rule::Column::Version,
                Expr::col(policy_rule::Column::Version).add(1),
            )
            .col_expr(policy_rule::Column::UpdatedAt, Expr::value(now))
            .col_expr(
                policy_rule::Column::UpdatedBy,
                Expr::value(actor_json(&audit_ctx.actor)?),
            )
            .filter(policy_rule::Column::Id.eq(current.id.clone()))
            .filter(policy_rule::Column::Version.eq(current.version))
            .exec(&txn)
            .await?;
        if updated.rows_affected == 0 {
            // Edited meanwhile: its admin has chosen.
            txn.rollback().await?;
            continue;
        }
        let model = policy_rule::Entity::find_by_id(current.id.clone())
            .one(&txn)
            .await?
            .ok_or(Error::NotFound("rule"))?;
        let version = bump_version(&txn, &current.tenant_id, None, None).await?;
        audit::append(
            &txn,
            state.clock.as_ref(),
            audit_ctx.event(
                &current.tenant_id,
                "rule.updated",
                vec![current.id.clone()],
                AuditOutcome::Success,
                json!({
                    "before": rule_details(&current),
                    "rule": rule_details(&model),
                    "policy_version": version,
                    "reason": "grant-legacy-scopes",
                }),
            ),
        )
        .await?;
        txn.commit().await?;
        state.audit_committed();
        state.directory_changed(&[Entry::Tenant(current.tenant_id.clone())]);
        granted.push(LegacyGrant {
            tenant_id: model.tenant_id,
            rule_id: model.id,
            rule_version: model.version,
        });
    }
    Ok(granted)
}

/// Whether a tenant row is active.
pub fn is_active(model: &tenant::Model) -> bool {
    model.status == tenant::Status::Active
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::policy_cache::PolicyCache;

    fn tenant_at(version: i64) -> tenant::Model {
        tenant::Model {
            id: "tnt_1".to_owned(),
            slug: "acme".to_owned(),
            display_name: "Acme".to_owned(),
            status: tenant::Status::Active,
            token_algorithm: "RS256".to_owned(),
            outbound_default: tenant::OutboundDefault::Allow,
            policy_version: version,
            created_at: 0,
            updated_at: 0,
            policy_updated_at: None,
            policy_updated_by: None,
            traffic_frozen_at: None,
            traffic_freeze_reason: String::new(),
            traffic_frozen_by: None,
        }
    }

    #[test]
    fn the_cache_answers_only_at_the_version_it_was_read_with() {
        let cache = PolicyCache::default();
        let rules = Arc::new(engine::RuleSet::default());
        cache.put(&tenant_at(3), Direction::Inbound, rules.clone());
        assert!(cache.get(&tenant_at(3), Direction::Inbound).is_some());
        assert!(cache.get(&tenant_at(4), Direction::Inbound).is_none());
        assert!(cache.get(&tenant_at(3), Direction::Outbound).is_none());
        // A slower reader's older rules never replace newer ones.
        cache.put(&tenant_at(2), Direction::Inbound, rules);
        assert!(cache.get(&tenant_at(3), Direction::Inbound).is_some());
        assert!(cache.get(&tenant_at(2), Direction::Inbound).is_none());
    }
}
