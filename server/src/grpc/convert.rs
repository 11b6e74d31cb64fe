//! Conversions from domain results to proto messages.

use vaultguard_proto::v1 as pb;

use crate::clock::to_timestamp;
use crate::domain::agents::status_of;
use crate::domain::tenants::{TenantView, audience};
use crate::issuer::parse_algorithm;
use crate::store::entities::{agent, issuer_key};

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
    }
}

pub fn agent(model: agent::Model) -> pb::Agent {
    pb::Agent {
        status: status_of(&model) as i32,
        id: model.id,
        tenant_id: model.tenant_id,
        name: model.name,
        description: model.description,
        create_time: Some(to_timestamp(model.created_at)),
        update_time: Some(to_timestamp(model.updated_at)),
        secret_rotate_time: Some(to_timestamp(model.secret_rotated_at)),
    }
}

pub fn issuer_key(model: issuer_key::Model) -> pb::IssuerKey {
    let status = if model.status == "active" {
        pb::IssuerKeyStatus::Active
    } else {
        pb::IssuerKeyStatus::Retired
    };
    pb::IssuerKey {
        algorithm: parse_algorithm(&model.algorithm).unwrap_or(pb::TokenAlgorithm::Rs256) as i32,
        kid: model.kid,
        status: status as i32,
        create_time: Some(to_timestamp(model.created_at)),
        retire_time: model.retired_at.map(to_timestamp),
        publish_until: model.publish_until.map(to_timestamp),
    }
}
