//! A registered OAuth provider as the connection flows read it: looked up
//! within the caller's tenant, its default scopes and extra authorize
//! parameters, its client secret opened; and the scope-list check both
//! registration and connections apply. Below both `connections.rs` and
//! `providers.rs` (registration, whose update also reaches the connections).

use std::collections::BTreeMap;

use sea_orm::EntityTrait;

use crate::crypto::SealContext;
use crate::error::{Error, FieldViolation, Result, Violations};
use crate::ids::{IdKind, check_id};
use crate::state::AppState;
use crate::store::entities::oauth_provider;

/// The table a client secret is sealed to.
const TABLE: &str = "oauth_providers";

/// Checks an OAuth scope list field: at most 64 scopes of 1 to 256 printable
/// ASCII characters without spaces, no duplicates.
pub(crate) fn check_scopes(field: &str, scopes: &[String], v: &mut Violations) {
    if scopes.len() > 64 {
        v.add(field, "at most 64 scopes");
        return;
    }
    for (i, scope) in scopes.iter().enumerate() {
        let valid = (1..=256).contains(&scope.len())
            && scope
                .bytes()
                .all(|b| (0x21..=0x7e).contains(&b) && b != b'"' && b != b'\\');
        if !valid {
            v.add(
                format!("{field}[{i}]"),
                "must be 1 to 256 printable ASCII characters without space, '\"' or '\\'",
            );
        } else if scopes[..i].contains(scope) {
            v.add(format!("{field}[{i}]"), "is a duplicate");
        }
    }
}

/// What a provider's client secret is sealed to: its table, tenant and id.
pub(crate) fn seal_context<'a>(tenant_id: &'a str, provider_id: &'a str) -> SealContext<'a> {
    SealContext {
        table: TABLE,
        tenant_id,
        record_id: provider_id,
    }
}

/// The provider's client secret, if it has one.
pub(crate) fn client_secret(
    state: &AppState,
    row: &oauth_provider::Model,
) -> Result<Option<String>> {
    if row.client_secret_ciphertext.is_empty() {
        return Ok(None);
    }
    let bytes = state.master.open(
        seal_context(&row.tenant_id, &row.id),
        &row.client_secret_ciphertext,
    )?;
    String::from_utf8(bytes)
        .map(Some)
        .map_err(|_| Error::internal("client secret is not UTF-8"))
}

/// The default scopes of a provider.
pub fn scopes(row: &oauth_provider::Model) -> Vec<String> {
    serde_json::from_str(&row.scopes).unwrap_or_default()
}

/// The extra authorize parameters of a provider.
pub fn extra_params(row: &oauth_provider::Model) -> BTreeMap<String, String> {
    serde_json::from_str(&row.extra_params).unwrap_or_default()
}

/// The violation of `field` when `id` is not a provider id.
pub(crate) fn id_violation(field: &str, id: &str) -> Option<FieldViolation> {
    check_id(field, id, IdKind::Provider).err()
}

/// The tenant's provider `id`; another tenant's or an unknown one is
/// NOT_FOUND.
pub(crate) async fn find(
    state: &AppState,
    tenant_id: &str,
    field: &str,
    id: &str,
) -> Result<oauth_provider::Model> {
    if let Some(violation) = id_violation(field, id) {
        return Err(violation.into());
    }
    oauth_provider::Entity::find_by_id(id.to_owned())
        .one(&state.db)
        .await?
        .filter(|row| row.tenant_id == tenant_id)
        .ok_or(Error::NotFound("provider"))
}
