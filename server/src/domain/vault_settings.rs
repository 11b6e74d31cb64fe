//! A tenant's vault settings: the return origins the OAuth callback may send
//! a browser back to. StartConnection refuses a `return_url` on any other
//! origin, and the callback checks again before it redirects, so the
//! callback is never an open redirect a tenant admin aims wherever they
//! like, and removing an origin takes effect at once.
//!
//! An origin is compared exactly, in the normal form the `url` crate gives
//! it (WHATWG origin serialisation): lowercase scheme and host, IDNA hosts
//! in ASCII, the default port left out. `https` only, except `http` for
//! `localhost` (a console on the admin's own machine) or when the server
//! allows plain-HTTP OAuth endpoints (`oauth_allow_http`, development).

use sea_orm::sea_query::OnConflict;
use sea_orm::{ActiveValue::Set, EntityTrait};
use serde_json::json;

use crate::audit::{self, Outcome as AuditOutcome};
use crate::auth::CallContext;
use crate::domain::{actor_json, to_json};
use crate::error::{FieldViolation, Result, Violations};
use crate::state::AppState;
use crate::store::entities::vault_settings;
use crate::validate;

/// The most return origins a tenant registers.
pub const MAX_RETURN_ORIGINS: usize = 32;
/// The longest return origin accepted, in bytes.
const MAX_ORIGIN_BYTES: usize = 512;

/// The settings of a tenant that never changed them.
fn defaults(tenant_id: &str) -> vault_settings::Model {
    vault_settings::Model {
        tenant_id: tenant_id.to_owned(),
        return_origins: "[]".to_owned(),
        updated_at: 0,
        updated_by: String::new(),
    }
}

/// The stored origins of a settings row.
pub fn return_origins(row: &vault_settings::Model) -> Vec<String> {
    serde_json::from_str(&row.return_origins).unwrap_or_default()
}

/// The settings of `tenant_id` (the defaults when never set).
pub(crate) async fn load(state: &AppState, tenant_id: &str) -> Result<vault_settings::Model> {
    Ok(vault_settings::Entity::find_by_id(tenant_id.to_owned())
        .one(&state.db)
        .await?
        .unwrap_or_else(|| defaults(tenant_id)))
}

/// Whether plain `http` is acceptable for `url`: the server allows it
/// (`oauth_allow_http`), or the host is `localhost` (the admin's own
/// machine).
fn http_allowed(allow_http: bool, url: &reqwest::Url) -> bool {
    allow_http || url.host_str() == Some("localhost")
}

/// A host an origin may name: an IP literal, or a domain of letters,
/// digits, `-` and `.` (after IDNA): no wildcard, no `_`.
fn plain_host(url: &reqwest::Url) -> bool {
    match url.domain() {
        Some(domain) => {
            !domain.is_empty()
                && domain
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        }
        None => url.host().is_some(),
    }
}

fn violation(field: &str, description: impl Into<String>) -> FieldViolation {
    FieldViolation {
        field: field.to_owned(),
        description: description.into(),
    }
}

/// Parses `value` as a URL acceptable in `field` (a return origin or a
/// return URL): absolute, `https` (or `http` where allowed), a plain host,
/// no credentials, no fragment, at most 2048 characters.
fn parse(allow_http: bool, field: &str, value: &str) -> Result<reqwest::Url, FieldViolation> {
    let http = reqwest::Url::parse(value)
        .ok()
        .is_some_and(|url| http_allowed(allow_http, &url));
    let url = validate::url(field, value, http, false)?;
    if !plain_host(&url) {
        return Err(violation(
            field,
            "must name a host of letters, digits, '-' and '.' (no wildcard)",
        ));
    }
    Ok(url)
}

/// Checks a return origin; returns its normal form.
pub(crate) fn parse_origin(
    allow_http: bool,
    field: &str,
    value: &str,
) -> Result<String, FieldViolation> {
    if value.len() > MAX_ORIGIN_BYTES {
        return Err(violation(
            field,
            format!("must be at most {MAX_ORIGIN_BYTES} characters"),
        ));
    }
    let url = parse(allow_http, field, value)?;
    if url.path() != "/" || url.query().is_some() {
        return Err(violation(
            field,
            "must be an origin, scheme://host[:port], without path or query",
        ));
    }
    Ok(url.origin().ascii_serialization())
}

/// Checks StartConnection's `return_url` against the tenant's `origins`
/// (normal forms).
pub(crate) fn check_return_url(
    allow_http: bool,
    origins: &[String],
    value: &str,
) -> Result<(), FieldViolation> {
    let url = parse(allow_http, "return_url", value)?;
    let origin = url.origin().ascii_serialization();
    if origins.contains(&origin) {
        return Ok(());
    }
    Err(violation(
        "return_url",
        "must be on one of the tenant's registered return origins \
         (VaultSettings.return_origins, UpdateVaultSettings)",
    ))
}

/// Whether `return_url`, stored with an authorization of `tenant_id`, is
/// still on one of the tenant's origins (the callback's check before it
/// redirects).
pub(crate) async fn still_allowed(
    state: &AppState,
    tenant_id: &str,
    return_url: &str,
) -> Result<bool> {
    let origins = return_origins(&load(state, tenant_id).await?);
    Ok(check_return_url(state.config.oauth_allow_http, &origins, return_url).is_ok())
}

/// GetVaultSettings.
pub async fn get(state: &AppState, ctx: &CallContext) -> Result<vault_settings::Model> {
    load(state, ctx.principal.tenant_id()?).await
}

/// UpdateVaultSettings: replaces the settings, audited with the origins
/// before and after.
pub async fn update(
    state: &AppState,
    ctx: &CallContext,
    origins: &[String],
) -> Result<vault_settings::Model> {
    let tenant_id = ctx.principal.tenant_id()?.to_owned();
    let mut v = Violations::new();
    if origins.len() > MAX_RETURN_ORIGINS {
        v.add(
            "return_origins",
            format!("at most {MAX_RETURN_ORIGINS} origins"),
        );
    }
    let mut normal: Vec<String> = Vec::with_capacity(origins.len());
    for (i, value) in origins.iter().enumerate().take(MAX_RETURN_ORIGINS) {
        let field = format!("return_origins[{i}]");
        match parse_origin(state.config.oauth_allow_http, &field, value) {
            Ok(origin) if normal.contains(&origin) => {
                v.add(field, "names the same origin as an earlier entry");
            }
            Ok(origin) => normal.push(origin),
            Err(violation) => v.check(Err(violation)),
        }
    }
    v.finish()?;
    let now = state.clock.now_millis();
    let row = vault_settings::Model {
        tenant_id: tenant_id.clone(),
        return_origins: to_json(&normal)?,
        updated_at: now,
        updated_by: actor_json(&ctx.principal.actor())?,
    };
    let txn = crate::store::begin(&state.db).await?;
    let before = vault_settings::Entity::find_by_id(tenant_id.clone())
        .one(&txn)
        .await?
        .map(|row| return_origins(&row))
        .unwrap_or_default();
    let active = vault_settings::ActiveModel {
        tenant_id: Set(row.tenant_id.clone()),
        return_origins: Set(row.return_origins.clone()),
        updated_at: Set(row.updated_at),
        updated_by: Set(row.updated_by.clone()),
    };
    vault_settings::Entity::insert(active)
        .on_conflict(
            OnConflict::column(vault_settings::Column::TenantId)
                .update_columns([
                    vault_settings::Column::ReturnOrigins,
                    vault_settings::Column::UpdatedAt,
                    vault_settings::Column::UpdatedBy,
                ])
                .to_owned(),
        )
        .exec(&txn)
        .await?;
    audit::append(
        &txn,
        state.clock.as_ref(),
        ctx.audit().event(
            &tenant_id,
            "vault.settings_updated",
            vec![tenant_id.clone()],
            AuditOutcome::Success,
            json!({"return_origins": {"from": before, "to": normal}}),
        ),
    )
    .await?;
    txn.commit().await?;
    state.audit_committed();
    Ok(row)
}

/// Property tests of the origin and return-URL checks.
#[cfg(test)]
mod props {
    use proptest::prelude::*;

    use super::*;
    use crate::props::{PURE_CASES, config};

    #[test]
    fn origins_are_normalised_and_refused_with_their_reason() {
        let ok = |value: &str| parse_origin(false, "o", value).unwrap();
        assert_eq!(
            ok("https://Console.Example.COM"),
            "https://console.example.com"
        );
        assert_eq!(
            ok("https://console.example.com:443/"),
            "https://console.example.com"
        );
        assert_eq!(
            ok("https://console.example.com:8443"),
            "https://console.example.com:8443"
        );
        assert_eq!(ok("http://localhost:3000"), "http://localhost:3000");
        assert_eq!(
            ok("https://bücher.example"),
            "https://xn--bcher-kva.example"
        );
        for refused in [
            "http://console.example.com",
            "https://console.example.com/path",
            "https://console.example.com/?q",
            "https://console.example.com/#f",
            "https://user@console.example.com",
            "https://*.example.com",
            "https://under_score.example",
            "ftp://console.example.com",
            "console.example.com",
            "",
        ] {
            assert!(parse_origin(false, "o", refused).is_err(), "{refused}");
        }
        assert_eq!(
            parse_origin(true, "o", "http://console.example.com").unwrap(),
            "http://console.example.com"
        );
    }

    #[test]
    fn return_urls_match_their_origin_exactly() {
        let origins = vec![
            "https://console.example.com".to_owned(),
            "http://localhost:3000".to_owned(),
        ];
        for ok in [
            "https://console.example.com/done?x=1",
            "https://CONSOLE.example.com:443/done",
            "http://localhost:3000/cb",
        ] {
            assert!(check_return_url(false, &origins, ok).is_ok(), "{ok}");
        }
        for refused in [
            "https://console.example.com.attacker.example/",
            "https://attacker.example/?https://console.example.com",
            "https://console.example.com@attacker.example/",
            "https://console.example.com:444/",
            "http://console.example.com/",
            "http://localhost:3001/cb",
            "http://localhost/cb",
            "https://attacker.example\\@console.example.com/",
            "https://console.example.com/#frag",
        ] {
            assert!(
                check_return_url(false, &origins, refused).is_err(),
                "{refused}"
            );
        }
    }

    proptest! {
        #![proptest_config(config(PURE_CASES))]

        /// A return URL is accepted exactly when its scheme, host and port
        /// are those of the registered origin, whatever is put between the
        /// registered host and the rest.
        #[test]
        fn a_return_url_matches_only_its_exact_origin(
            host in "[a-z]{1,8}\\.example",
            other in "[a-z]{1,8}\\.(example|test)",
            port in prop_oneof![Just(None), (1u16..).prop_map(Some)],
            path in "(/[a-zA-Z0-9._~-]{0,8}){0,3}",
            trick in prop_oneof![
                Just(String::new()),
                Just("@".to_owned()),
                Just(".".to_owned()),
                Just("%2e".to_owned()),
                Just("\\".to_owned()),
                Just(":443@".to_owned()),
                Just("/".to_owned()),
                Just("?".to_owned()),
            ],
        ) {
            let registered = match port {
                Some(port) => format!("https://{host}:{port}"),
                None => format!("https://{host}"),
            };
            let origins = vec![parse_origin(false, "o", &registered).unwrap()];
            let candidate = format!("https://{host}{trick}{other}{path}");
            let accepted = check_return_url(false, &origins, &candidate).is_ok();
            let expected = reqwest::Url::parse(&candidate).ok().is_some_and(|url| {
                let wanted = reqwest::Url::parse(&registered).unwrap();
                url.username().is_empty()
                    && url.host_str() == wanted.host_str()
                    && url.port_or_known_default() == wanted.port_or_known_default()
            });
            prop_assert_eq!(accepted, expected, "{} against {}", candidate, registered);
        }

        /// Any text: the checks never panic, and an accepted origin is an
        /// https or http origin without path, query or credentials, already
        /// in normal form.
        #[test]
        fn origins_parse_or_are_refused(value in any::<String>(), http in any::<bool>()) {
            if let Ok(origin) = parse_origin(http, "o", &value) {
                let url = reqwest::Url::parse(&origin).unwrap();
                prop_assert!(url.scheme() == "https" || url.scheme() == "http");
                prop_assert!(url.username().is_empty() && url.password().is_none());
                prop_assert_eq!(url.origin().ascii_serialization(), origin.clone());
                prop_assert_eq!(parse_origin(http, "o", &origin).unwrap(), origin);
            }
            let _ = check_return_url(http, &[], &value);
        }
    }
}
