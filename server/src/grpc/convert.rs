//! Conversions from domain results to proto messages.

use std::collections::BTreeMap;

use vaultguard_proto::v1 as pb;

use crate::clock::{Millis, to_timestamp};
use crate::domain::authorization_details::Detail;
use crate::domain::delegations;
use crate::domain::parse_actor;
use crate::domain::policies::parse_rule;
use crate::domain::policy_engine::{Attr, Decision};
use crate::domain::tenants::{TenantView, audience};
use crate::error::Error;
use crate::issuer::parse_algorithm;
use crate::store::entities::{agent, delegation, issuer_key, policy_rule, step_up, tenant};

pub fn tenant(view: TenantView) -> pb::Tenant {
    let status = view.status();
    let token_algorithm = view.token_algorithm();
    let TenantView {
        tenant,
        organizations,
    } = view;
    pb::Tenant {
        audience: audience(&tenant.id),
        id: tenant.id,
        slug: tenant.slug,
        display_name: tenant.display_name,
        status: status as i32,
        settings: Some(pb::TenantSettings {
            token_algorithm: token_algorithm as i32,
        }),
        external_organizations: organizations
            .into_iter()
            .map(|org| pb::ExternalOrganization {
                issuer: org.issuer,
                organization_id: org.organization_id,
            })
            .collect(),
        create_time: Some(to_timestamp(tenant.created_at)),
        update_time: Some(to_timestamp(tenant.updated_at)),
        traffic_frozen: tenant.traffic_frozen_at.is_some(),
        traffic_freeze_reason: tenant.traffic_freeze_reason,
        traffic_freeze_time: tenant.traffic_frozen_at.map(to_timestamp),
    }
}

pub fn agent(model: agent::Model) -> pb::Agent {
    pb::Agent {
        status: pb::AgentStatus::from(model.status) as i32,
        id: model.id,
        tenant_id: model.tenant_id,
        name: model.name,
        description: model.description,
        create_time: Some(to_timestamp(model.created_at)),
        update_time: Some(to_timestamp(model.updated_at)),
        secret_rotate_time: Some(to_timestamp(model.secret_rotated_at)),
        frozen: model.frozen_at.is_some(),
        freeze_reason: model.freeze_reason,
        freeze_time: model.frozen_at.map(to_timestamp),
    }
}

impl From<issuer_key::Status> for pb::IssuerKeyStatus {
    fn from(status: issuer_key::Status) -> Self {
        match status {
            issuer_key::Status::Active => Self::Active,
            issuer_key::Status::Retired => Self::Retired,
        }
    }
}

pub fn issuer_key(model: issuer_key::Model) -> pb::IssuerKey {
    let status = pb::IssuerKeyStatus::from(model.status);
    pb::IssuerKey {
        algorithm: parse_algorithm(&model.algorithm).unwrap_or(pb::TokenAlgorithm::Rs256) as i32,
        kid: model.kid,
        status: status as i32,
        create_time: Some(to_timestamp(model.created_at)),
        retire_time: model.retired_at.map(to_timestamp),
        publish_until: model.publish_until.map(to_timestamp),
    }
}

fn actor(stored: Option<&str>) -> Option<pb::Actor> {
    stored.and_then(parse_actor)
}

pub fn rule(model: policy_rule::Model) -> Result<pb::Rule, Error> {
    let parsed = parse_rule(&model)?;
    Ok(pb::Rule {
        direction: model.direction.to_proto() as i32,
        action_pattern: model.action_pattern,
        counterpart_tenant_id: model.counterpart_tenant_id.unwrap_or_default(),
        agent_id: model.agent_id.unwrap_or_default(),
        conditions: parsed.conditions.iter().map(|c| c.to_proto()).collect(),
        time_window: parsed.time_window.as_ref().map(|w| w.to_proto()),
        effect: parsed.effect.to_effect() as i32,
        max_ttl_seconds: parsed.max_ttl_seconds,
        priority: model.priority,
        approvals_required: parsed.approvals_required,
        description: model.description,
        create_time: Some(to_timestamp(model.created_at)),
        update_time: Some(to_timestamp(model.updated_at)),
        version: u64::try_from(model.version).unwrap_or_default(),
        update_actor: actor(Some(&model.updated_by)),
        id: model.id,
        scopes: parsed.grants.scopes,
        default_scopes: parsed.grants.default_scopes,
        resources: parsed.grants.resources,
    })
}

pub fn policy_settings(model: tenant::Model) -> pb::PolicySettings {
    pb::PolicySettings {
        outbound_default: pb::OutboundDefault::from(model.outbound_default) as i32,
        policy_version: u64::try_from(model.policy_version).unwrap_or_default(),
        update_time: model.policy_updated_at.map(to_timestamp),
        update_actor: actor(model.policy_updated_by.as_deref()),
    }
}

/// A delegation as `viewer_tenant` may see it (the other side's policy
/// explanation redacted), with expiry applied at `now`.
pub fn delegation(
    row: delegation::Model,
    viewer_tenant: &str,
    now: Millis,
) -> Result<pb::Delegation, Error> {
    let status = pb::DelegationStatus::from(delegations::effective_status(&row, now));
    let decision: Decision = serde_json::from_str(&row.decision).map_err(Error::internal)?;
    let context: BTreeMap<String, Attr> =
        serde_json::from_str(&row.context).map_err(Error::internal)?;
    let scopes: Vec<String> = serde_json::from_str(&row.scopes).map_err(Error::internal)?;
    let expired_now = status == pb::DelegationStatus::Expired && row.ended_at.is_none();
    let details = delegations::details_of(&row)?;
    Ok(pb::Delegation {
        requesting_tenant_id: row.requesting_tenant_id,
        requesting_agent_id: row.requesting_agent_id,
        receiving_tenant_id: row.receiving_tenant_id,
        action: row.action,
        scopes,
        resource: row.resource,
        binding_message: row.binding_message,
        context: context
            .into_iter()
            .map(|(k, v)| (k, v.to_proto()))
            .collect(),
        requested_ttl_seconds: u32::try_from(row.ttl_seconds).unwrap_or_default(),
        status: status as i32,
        decision: Some(decision.redacted_for(viewer_tenant).to_proto()),
        step_up_id: row.step_up_id.unwrap_or_default(),
        create_time: Some(to_timestamp(row.created_at)),
        activate_time: row.activated_at.map(to_timestamp),
        expire_time: row.expires_at.map(to_timestamp),
        end_time: if expired_now {
            row.expires_at.map(to_timestamp)
        } else {
            row.ended_at.map(to_timestamp)
        },
        ended_by: if expired_now {
            Some(pb::Actor {
                kind: pb::PrincipalKind::System as i32,
                subject: "system".to_owned(),
                tenant_id: String::new(),
            })
        } else {
            actor(row.ended_by.as_deref())
        },
        end_reason: if expired_now {
            "expired".to_owned()
        } else {
            row.end_reason.unwrap_or_default()
        },
        authorization_details: details.iter().map(Detail::to_proto).collect(),
        token_algorithm: row.token_algorithm,
        id: row.id,
    })
}

/// A step-up as the receiving tenant's approvers see it.
pub fn step_up(
    view: crate::domain::step_ups::StepUpView,
    viewer_tenant: &str,
    now: Millis,
) -> Result<pb::StepUp, Error> {
    let crate::domain::step_ups::StepUpView {
        step,
        delegation,
        approvals,
        state,
    } = view;
    let decision: Decision = serde_json::from_str(&delegation.decision).map_err(Error::internal)?;
    let context: BTreeMap<String, Attr> =
        serde_json::from_str(&delegation.context).map_err(Error::internal)?;
    let scopes: Vec<String> = serde_json::from_str(&delegation.scopes).map_err(Error::internal)?;
    let details = delegations::details_of(&delegation)?;
    let expired_now = state == step_up::State::Expired && step.ended_at.is_none();
    Ok(pb::StepUp {
        step_up_id: step.id,
        delegation_id: delegation.id,
        state: pb::StepUpState::from(state) as i32,
        requesting_tenant_id: step.requesting_tenant_id,
        requesting_agent_id: step.requesting_agent_id,
        receiving_tenant_id: step.receiving_tenant_id,
        action: delegation.action,
        scopes,
        resource: delegation.resource,
        binding_message: delegation.binding_message,
        context: context
            .into_iter()
            .map(|(k, v)| (k, v.to_proto()))
            .collect(),
        requested_ttl_seconds: u32::try_from(delegation.ttl_seconds).unwrap_or_default(),
        request_hash: step.request_hash,
        decision: Some(decision.redacted_for(viewer_tenant).to_proto()),
        approvals_required: u32::try_from(step.approvals_required.max(1)).unwrap_or(1),
        approvals: approvals
            .into_iter()
            .map(|a| pb::Approval {
                approver: parse_actor(&a.approver),
                approve_time: Some(to_timestamp(a.created_at)),
                comment: a.reason,
            })
            .collect(),
        create_time: Some(to_timestamp(step.created_at)),
        expire_time: Some(to_timestamp(step.expires_at)),
        end_time: if expired_now {
            Some(to_timestamp(step.expires_at.min(now)))
        } else {
            step.ended_at.map(to_timestamp)
        },
        denied_by: step.denied_by.as_deref().and_then(parse_actor),
        deny_reason: step.deny_reason.unwrap_or_default(),
        authorization_details: details.iter().map(Detail::to_proto).collect(),
    })
}
