//! Connected accounts (the VaultService's Token Vault half) end to end
//! against a real local OAuth 2.0 provider (tests/src/oauth_provider.rs):
//! provider CRUD with a write-only client secret and bad input that writes
//! nothing; the authorization-code flow with PKCE through the provider and
//! VaultGuard's HTTP callback (with and without a return URL); ExchangeToken
//! handing out working provider tokens from a cache, with one refresh for
//! 50 concurrent callers and rotated refresh tokens kept; NEEDS_REAUTH on
//! `invalid_grant` and reconnecting under the same id; provider outages;
//! replayed, expired and unknown `state`s and refusals at the provider;
//! isolation between tenants and delegated exchanges across them;
//! ciphertexts bound to their row; scope narrowing and bad exchange input;
//! disconnection with revocation at the provider; and the policy check
//! (no rule, STEP_UP and its redemption). Refresh tokens never leave
//! VaultGuard: not in responses, logs, audit events or database rows.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use sea_orm::{ConnectionTrait, EntityTrait, Statement};
use tonic::Code;
use vaultguard_client::{ClientError, DelegationOutcome, VaultGuardClient, pb};
use vaultguard_server::clock::Clock;
use vaultguard_server::store::entities::{audit_event, connection, oauth_provider, oauth_state};
use vaultguard_tests::oauth_provider::{ClientAuth, FakeProvider, ProviderOptions};
use vaultguard_tests::{
    TestServer, approve_step_up, captured_logs, expect_code, expect_invalid, expect_reason,
};

use crate::delegations::{Pair, ask, setup_pair};
use crate::policies::{add_rule, assert_id, inbound, with_counterpart};

use pb::ConnectionStatus as Status;
use pb::ErrorReason as Reason;
use vaultguard_tests::Rpc;
use vaultguard_tests::calls::create_provider;
use vaultguard_tests::calls::{delete_connection, delete_provider, get_connection, get_provider};

/// RFC 8693's grant type, the only one ExchangeToken takes.
const TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
/// RFC 8693's access-token type.
const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";
/// Where an admin console wants the browser back after connecting.
const RETURN_URL: &str = "http://localhost/admin/connections/done";
/// The default scopes every test provider is registered with.
pub(crate) const SCOPES: [&str; 2] = ["mail.read", "mail.send"];
/// The lifetime of the fake provider's access tokens, in seconds.
const ACCESS_TTL: u64 = 3600;

// ---------------------------------------------------------------------------
// Fixtures.

pub(crate) fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

/// A fake provider whose tokens expire on the server's clock.
pub(crate) async fn fake_provider(server: &TestServer, options: ProviderOptions) -> FakeProvider {
    let clock: Arc<dyn Clock> = server.clock.clone();
    FakeProvider::start(ProviderOptions {
        clock: Some(clock),
        access_ttl_seconds: ACCESS_TTL,
        ..options
    })
    .await
}

/// `provider` registered as `name` with [`SCOPES`] and `access_type=offline`.
pub(crate) fn registration(name: &str, provider: &FakeProvider) -> pb::CreateOAuthProviderRequest {
    let offline = [("access_type".to_owned(), "offline".to_owned())];
    pb::CreateOAuthProviderRequest {
        extra_authorize_params: HashMap::from(offline),
        ..provider.registration(name, &SCOPES)
    }
}

/// The update that keeps every setting of `provider` (and its secret).
pub(crate) fn unchanged(provider: &pb::OAuthProvider) -> pb::UpdateOAuthProviderRequest {
    pb::UpdateOAuthProviderRequest {
        provider_id: provider.id.clone(),
        authorize_url: provider.authorize_url.clone(),
        token_url: provider.token_url.clone(),
        revocation_url: provider.revocation_url.clone(),
        client_id: provider.client_id.clone(),
        client_secret: String::new(),
        clear_client_secret: false,
        scopes: provider.scopes.clone(),
        extra_authorize_params: provider.extra_authorize_params.clone(),
    }
}

/// VaultGuard's OAuth callback, the `redirect_uri` it sends providers.
pub(crate) fn callback_url(server: &TestServer) -> String {
    format!("{}/oauth/callback", server.http_url())
}

/// The policy action of an exchange on the provider every test registers
/// (`mail`).
pub(crate) const EXCHANGE_MAIL: &str = "exchange:mail";

/// Lets the tenant's own agents exchange tokens of its `mail` provider,
/// for any of the provider's scopes ([`SCOPES`]) on any of its connections.
pub(crate) async fn allow_own_exchanges(admin: &VaultGuardClient, tenant_id: &str) -> pb::Rule {
    add_rule(admin, mail_exchanges(tenant_id, pb::Effect::Allow)).await
}

/// An inbound rule for [`EXCHANGE_MAIL`] by `counterpart`'s agents granting
/// every scope of [`SCOPES`] on any connection.
pub(crate) fn mail_exchanges(counterpart: &str, effect: pb::Effect) -> pb::Rule {
    pb::Rule {
        scopes: strings(&SCOPES),
        resources: strings(&["connection:*"]),
        ..with_counterpart(counterpart, inbound(EXCHANGE_MAIL, effect))
    }
}

/// Moves the server's clock (and so the provider's) `seconds` forward and
/// makes `agent` fetch a new VaultGuard token (its old one expired on the
/// server's clock).
async fn advance(server: &TestServer, agent: &VaultGuardClient, seconds: i64) {
    server.clock.advance(seconds * 1000);
    agent.invalidate_token().await;
}

/// Moves past the provider access token's expiry (and the refresh margin).
pub(crate) async fn expire_access_tokens(server: &TestServer, agent: &VaultGuardClient) {
    advance(server, agent, i64::try_from(ACCESS_TTL).expect("ttl") + 5).await;
}

/// A pair whose tenant acme registered a fake provider (on the server's
/// clock) as `mail`.
pub(crate) struct Registered {
    pub(crate) pair: Pair,
    pub(crate) provider: FakeProvider,
    pub(crate) registered: pb::OAuthProvider,
}

/// [`setup_pair`] and acme's `mail` provider; with `allow_exchanges`, acme
/// also lets its own agents exchange its tokens.
pub(crate) async fn registered(allow_exchanges: bool) -> Registered {
    let pair = setup_pair().await;
    let provider = fake_provider(&pair.server, ProviderOptions::default()).await;
    let registered = register(&pair.acme_admin, "mail", &provider).await;
    if allow_exchanges {
        allow_own_exchanges(&pair.acme_admin, &pair.acme.id).await;
    }
    Registered {
        pair,
        provider,
        registered,
    }
}

/// [`registered`] with exchanges allowed and a CONNECTED account of acme;
/// returns the fixture and the connection's id.
pub(crate) async fn connected() -> (Registered, String) {
    let fixture = registered(true).await;
    let connection_id = connect(&fixture.pair.acme_admin, &fixture.registered.id)
        .await
        .id;
    (fixture, connection_id)
}

// ---------------------------------------------------------------------------
// VaultService calls.

async fn list_providers(admin: &VaultGuardClient) -> Result<Vec<pb::OAuthProvider>, ClientError> {
    let response = admin
        .list_o_auth_providers(pb::ListOAuthProvidersRequest::default())
        .await?;
    Ok(response.providers)
}

pub(crate) async fn update_provider(
    admin: &VaultGuardClient,
    input: pb::UpdateOAuthProviderRequest,
) -> Result<pb::OAuthProvider, ClientError> {
    let response = admin.update_o_auth_provider(input).await?;
    Ok(response.provider.expect("provider"))
}

/// Registers `provider` as `name`; returns the stored provider.
pub(crate) async fn register(
    admin: &VaultGuardClient,
    name: &str,
    provider: &FakeProvider,
) -> pb::OAuthProvider {
    create_provider(admin, registration(name, provider))
        .await
        .expect("register the provider")
}

pub(crate) async fn start_connection(
    admin: &VaultGuardClient,
    input: pb::StartConnectionRequest,
) -> Result<pb::StartConnectionResponse, ClientError> {
    admin.start_connection(input).await
}

/// StartConnection for `provider_id` with its default scopes; must succeed.
pub(crate) async fn start(
    admin: &VaultGuardClient,
    provider_id: &str,
) -> pb::StartConnectionResponse {
    start_connection(
        admin,
        pb::StartConnectionRequest {
            provider_id: provider_id.to_owned(),
            ..Default::default()
        },
    )
    .await
    .expect("start connection")
}

/// The ids ListConnections answers for `filter`.
async fn listed_connections(
    admin: &VaultGuardClient,
    filter: pb::ListConnectionsRequest,
) -> Result<Vec<String>, ClientError> {
    let response = admin.list_connections(filter).await?;
    Ok(response.connections.into_iter().map(|c| c.id).collect())
}

/// UpdateVaultSettings: the tenant's return origins become `origins`.
pub(crate) async fn set_return_origins(
    admin: &VaultGuardClient,
    origins: &[&str],
) -> Result<pb::VaultSettings, ClientError> {
    let response = admin
        .update_vault_settings(pb::UpdateVaultSettingsRequest {
            return_origins: strings(origins),
        })
        .await?;
    Ok(response.settings.expect("settings"))
}

/// A well-formed own-token ExchangeToken for `connection_id`.
pub(crate) fn exchange_request(connection_id: &str) -> pb::ExchangeTokenRequest {
    pb::ExchangeTokenRequest {
        grant_type: TOKEN_EXCHANGE.to_owned(),
        connection_id: connection_id.to_owned(),
        ..Default::default()
    }
}

/// ExchangeToken without the SDK (to send what the SDK never would).
async fn exchange_raw(
    agent: &VaultGuardClient,
    input: pb::ExchangeTokenRequest,
) -> Result<pb::ExchangeTokenResponse, ClientError> {
    agent.exchange_token(input).await
}

/// `agent.exchange`, retrying the retryable ABORTED answer as the contract
/// allows (how a storage conflict between concurrent callers may surface).
pub(crate) async fn exchange_retrying(
    agent: &VaultGuardClient,
    connection_id: &str,
) -> Result<pb::ExchangeTokenResponse, ClientError> {
    for _ in 0..20 {
        match agent.exchange(connection_id, &[]).await {
            Err(err) if err.code() == Some(Code::Aborted) => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => return other,
        }
    }
    agent.exchange(connection_id, &[]).await
}

// ---------------------------------------------------------------------------
// The browser's side of the flow.

/// One GET without following redirects: the status and the `Location`.
pub(crate) async fn hop(url: &str) -> (u16, Option<String>) {
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("http client");
    let response = client.get(url).send().await.expect("GET");
    let location = response
        .headers()
        .get(reqwest::header::LOCATION)
        .map(|l| l.to_str().expect("ascii location").to_owned());
    (response.status().as_u16(), location)
}

/// Opens `authorize_url` as a browser would, following every redirect
/// (provider, then VaultGuard's callback); returns the final status.
pub(crate) async fn follow(authorize_url: &str) -> u16 {
    reqwest::get(authorize_url)
        .await
        .expect("follow the authorize URL")
        .status()
        .as_u16()
}

/// The query of `url` as a map (the last value of a repeated name wins).
pub(crate) fn query(url: &str) -> HashMap<String, String> {
    url::Url::parse(url)
        .unwrap_or_else(|e| panic!("{url} is not a URL: {e}"))
        .query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// `url` without its query.
fn without_query(url: &str) -> String {
    let mut url = url::Url::parse(url).unwrap_or_else(|e| panic!("{url} is not a URL: {e}"));
    url.set_query(None);
    url.to_string()
}

/// The provider's redirect to VaultGuard's callback for `authorize_url`.
pub(crate) async fn provider_redirect(server: &TestServer, authorize_url: &str) -> String {
    let (status, location) = hop(authorize_url).await;
    assert_eq!(status, 302, "the provider redirects back");
    let location = location.expect("the provider's Location");
    assert_eq!(without_query(&location), callback_url(server));
    location
}

/// Starts a connection of `provider_id` and completes the flow through the
/// provider; asserts it is CONNECTED and returns it.
pub(crate) async fn connect(admin: &VaultGuardClient, provider_id: &str) -> pb::Connection {
    let started = start(admin, provider_id).await;
    assert_eq!(follow(&started.authorize_url).await, 200, "the result page");
    let id = started.connection.expect("connection").id;
    let connected = get_connection(admin, &id).await.expect("get connection");
    assert_eq!(connected.status(), Status::Connected, "{connected:?}");
    connected
}

/// GETs the provider's userinfo with `access_token`; returns the status.
pub(crate) async fn userinfo(provider: &FakeProvider, access_token: &str) -> u16 {
    reqwest::Client::new()
        .get(provider.userinfo_url())
        .bearer_auth(access_token)
        .send()
        .await
        .expect("userinfo")
        .status()
        .as_u16()
}

// ---------------------------------------------------------------------------
// Checks.

/// Asserts FAILED_PRECONDITION INVALID_STATE whose metadata `state` names
/// `state` (case-insensitive, so `disconnected` and `DISCONNECTED` pass).
#[track_caller]
fn expect_connection_state<T: std::fmt::Debug>(result: Result<T, ClientError>, state: &str) {
    let metadata = expect_reason(result, Code::FailedPrecondition, Reason::InvalidState);
    let named = metadata.get("state").map(|s| s.to_lowercase());
    assert!(
        named.as_deref().is_some_and(|s| s.contains(state)),
        "metadata `state` should name {state}: {metadata:?}"
    );
}

/// Asserts the delegated exchange was refused as an inactive or mismatched
/// subject token.
#[track_caller]
fn expect_invalid_grant<T: std::fmt::Debug>(result: Result<T, ClientError>, what: &str) {
    let metadata = expect_reason(result, Code::FailedPrecondition, Reason::InvalidGrant);
    assert_eq!(
        metadata.get("oauth_error").map(String::as_str),
        Some("invalid_grant"),
        "{what}: {metadata:?}"
    );
}

/// The scopes of a space-separated `scope`.
fn scope_set(scope: &str) -> HashSet<&str> {
    scope.split(' ').filter(|s| !s.is_empty()).collect()
}

/// Asserts `response` is a proper RFC 8693 answer carrying one of
/// `provider`'s access tokens for exactly `scopes`, and that the token works
/// at the provider.
pub(crate) async fn assert_working_token(
    provider: &FakeProvider,
    response: &pb::ExchangeTokenResponse,
    scopes: &[&str],
) {
    assert_eq!(response.issued_token_type, ACCESS_TOKEN_TYPE);
    assert_eq!(response.token_type, "Bearer");
    assert!(
        (1..=3600).contains(&response.expires_in),
        "expires_in {}",
        response.expires_in
    );
    assert_eq!(
        scope_set(&response.scope),
        scopes.iter().copied().collect::<HashSet<_>>()
    );
    assert!(
        provider
            .issued_access_tokens()
            .contains(&response.access_token),
        "not one of the provider's access tokens"
    );
    assert_eq!(
        userinfo(provider, &response.access_token).await,
        200,
        "the exchanged token works at the provider"
    );
}

/// Whether `needle` occurs in `haystack`.
fn contains_bytes(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// Every text and byte column of the vault's OAuth tables and of the whole
/// audit log, row by row, labelled for failure messages.
async fn stored_rows(server: &TestServer) -> Vec<(String, Vec<u8>)> {
    let db = &server.state.db;
    let mut rows = Vec::new();
    for row in connection::Entity::find()
        .all(db)
        .await
        .expect("connections")
    {
        let mut bytes = format!("{row:?}").into_bytes();
        for blob in [&row.refresh_token_ciphertext, &row.access_token_ciphertext]
            .into_iter()
            .flatten()
        {
            bytes.extend_from_slice(blob);
        }
        rows.push((format!("connections {}", row.id), bytes));
    }
    for row in oauth_state::Entity::find().all(db).await.expect("states") {
        let mut bytes = format!("{row:?}").into_bytes();
        bytes.extend_from_slice(&row.pkce_verifier_ciphertext);
        rows.push((format!("oauth_states {}", row.state_hash), bytes));
    }
    for row in oauth_provider::Entity::find()
        .all(db)
        .await
        .expect("providers")
    {
        let mut bytes = format!("{row:?}").into_bytes();
        bytes.extend_from_slice(&row.client_secret_ciphertext);
        rows.push((format!("oauth_providers {}", row.id), bytes));
    }
    for row in audit_event::Entity::find().all(db).await.expect("audit") {
        rows.push((
            format!("audit event {} ({})", row.id, row.event_type),
            format!("{row:?}").into_bytes(),
        ));
    }
    rows
}

/// Asserts that none of `secrets` occurs in the server's log, in any stored
/// row of the vault's tables or the audit log, or in `responses` (the Debug
/// text of every answer a client got).
async fn assert_never_leaked(
    server: &TestServer,
    secrets: &[(&str, String)],
    responses: &[String],
) {
    let logs = captured_logs();
    let rows = stored_rows(server).await;
    for (kind, secret) in secrets {
        assert!(secret.len() >= 16, "{kind} is too short to scan for");
        assert!(!logs.contains(secret.as_str()), "{kind} is in the log");
        for (label, bytes) in &rows {
            assert!(
                !contains_bytes(bytes, secret.as_bytes()),
                "{kind} is stored in plaintext in {label}"
            );
        }
        for response in responses {
            assert!(
                !response.contains(secret.as_str()),
                "{kind} was returned: {response}"
            );
        }
    }
}

/// Asserts that no refresh token `provider` issued, nor its client secret,
/// was logged, stored in plaintext, audited or returned in `answers`.
pub(crate) async fn assert_provider_secrets_kept(
    server: &TestServer,
    provider: &FakeProvider,
    answers: &[String],
) {
    let mut secrets: Vec<(&str, String)> = provider
        .issued_refresh_tokens()
        .into_iter()
        .map(|token| ("a refresh token", token))
        .collect();
    assert!(!secrets.is_empty(), "the provider issued a refresh token");
    if let Some(secret) = provider.client_secret() {
        secrets.push(("the client secret", secret.to_owned()));
    }
    assert_never_leaked(server, &secrets, answers).await;
}

/// The `connection.token_exchanged` events of `connection_id`: how many,
/// and how many say they refreshed.
async fn exchanges_logged(
    server: &TestServer,
    tenant_id: &str,
    connection_id: &str,
) -> (usize, usize) {
    let events = server
        .audit_events(tenant_id, "connection.token_exchanged")
        .await;
    let mut total = 0;
    let mut refreshed = 0;
    for event in events {
        let details: serde_json::Value =
            serde_json::from_str(&event.details).expect("details are JSON");
        if details["connection_id"] != connection_id {
            continue;
        }
        total += 1;
        match details["refreshed"].as_bool() {
            Some(true) => refreshed += 1,
            Some(false) => {}
            None => panic!("token_exchanged without a `refreshed` bool: {details}"),
        }
    }
    (total, refreshed)
}

// ---------------------------------------------------------------------------
// Providers.

#[tokio::test]
async fn provider_crud_round_trip_never_returns_the_client_secret() {
    let pair = setup_pair().await;
    vaultguard_tests::parts!(pair => server, acme, acme_admin: admin);
    let provider = fake_provider(server, ProviderOptions::default()).await;
    let secret = provider.client_secret().expect("a confidential client");
    let mut answers = Vec::new();

    let created = create_provider(admin, registration("zeta-mail", &provider))
        .await
        .unwrap();
    answers.push(format!("{created:?}"));
    assert_id(&created.id, "prv_");
    assert_eq!(
        (
            created.name.as_str(),
            created.authorize_url.as_str(),
            created.token_url.as_str(),
            created.revocation_url.as_str(),
            created.client_id.as_str()
        ),
        (
            "zeta-mail",
            provider.authorize_url().as_str(),
            provider.token_url().as_str(),
            provider.revocation_url().as_str(),
            provider.client_id()
        )
    );
    assert!(created.client_secret_set);
    assert_eq!(created.scopes, strings(&SCOPES));
    assert_eq!(
        created.extra_authorize_params,
        HashMap::from([("access_type".to_owned(), "offline".to_owned())])
    );
    assert!(created.create_time.is_some() && created.update_time.is_some());
    assert_eq!(get_provider(admin, &created.id).await.unwrap(), created);
    assert_eq!(
        server
            .audit_count(&acme.id, "provider.created", &created.id)
            .await,
        1
    );

    // Names are unique in the tenant.
    let providers_before = server.count("oauth_providers").await;
    let duplicate = pb::CreateOAuthProviderRequest {
        client_id: "another-client".to_owned(),
        ..registration("zeta-mail", &provider)
    };
    expect_code(create_provider(admin, duplicate).await, Code::AlreadyExists);
    assert_eq!(server.count("oauth_providers").await, providers_before);

    // A public client has no secret.
    let public = create_provider(
        admin,
        pb::CreateOAuthProviderRequest {
            client_secret: String::new(),
            ..registration("alpha-cal", &provider)
        },
    )
    .await
    .unwrap();
    assert!(!public.client_secret_set);
    let listed = list_providers(admin).await.unwrap();
    answers.push(format!("{listed:?}"));
    assert_eq!(
        listed.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(),
        ["alpha-cal", "zeta-mail"],
        "listed by name"
    );
    assert_eq!(listed[1], created);

    // The stored secret is bound to the endpoints and client it was given
    // for: moving them without giving it again is refused, and changes
    // nothing.
    let moved = pb::UpdateOAuthProviderRequest {
        revocation_url: String::new(),
        client_id: "rotated-client".to_owned(),
        ..unchanged(&created)
    };
    expect_invalid(update_provider(admin, moved.clone()).await, "client_secret");
    assert_eq!(get_provider(admin, &created.id).await.unwrap(), created);

    // An update without a secret keeps the stored one; the name stays.
    let kept = update_provider(
        admin,
        pb::UpdateOAuthProviderRequest {
            scopes: strings(&["mail.read"]),
            extra_authorize_params: HashMap::new(),
            ..unchanged(&created)
        },
    )
    .await
    .unwrap();
    answers.push(format!("{kept:?}"));
    assert_eq!(
        (
            kept.id.as_str(),
            kept.name.as_str(),
            kept.revocation_url.as_str(),
            kept.client_id.as_str()
        ),
        (
            created.id.as_str(),
            "zeta-mail",
            created.revocation_url.as_str(),
            created.client_id.as_str()
        )
    );
    assert!(kept.client_secret_set, "an empty client_secret keeps it");
    assert_eq!(kept.scopes, strings(&["mail.read"]));
    assert!(kept.extra_authorize_params.is_empty());
    assert_eq!(kept.create_time, created.create_time);
    assert_eq!(get_provider(admin, &created.id).await.unwrap(), kept);

    // Clearing the secret lets the endpoints and client move.
    let cleared = update_provider(
        admin,
        pb::UpdateOAuthProviderRequest {
            clear_client_secret: true,
            scopes: strings(&["mail.read"]),
            extra_authorize_params: HashMap::new(),
            ..moved
        },
    )
    .await
    .unwrap();
    assert!(!cleared.client_secret_set, "cleared");
    assert_eq!(
        (cleared.revocation_url.as_str(), cleared.client_id.as_str()),
        ("", "rotated-client")
    );
    let new_secret = "replacement-client-secret-5d1e0b";
    let replaced = update_provider(
        admin,
        pb::UpdateOAuthProviderRequest {
            client_secret: new_secret.to_owned(),
            ..unchanged(&cleared)
        },
    )
    .await
    .unwrap();
    answers.push(format!("{cleared:?} {replaced:?}"));
    assert!(replaced.client_secret_set, "a new secret is stored");
    assert_eq!(
        server
            .audit_count(&acme.id, "provider.updated", &created.id)
            .await,
        3
    );
    assert_never_leaked(
        server,
        &[
            ("the client secret", secret.to_owned()),
            ("the new client secret", new_secret.to_owned()),
        ],
        &answers,
    )
    .await;

    // A connection that is not DISCONNECTED keeps the provider.
    let pending = start(admin, &created.id).await.connection.unwrap();
    assert_eq!(pending.status(), Status::Pending);
    assert_eq!(pending.requested_scopes, strings(&["mail.read"]));
    let metadata = expect_reason(
        delete_provider(admin, &created.id).await,
        Code::FailedPrecondition,
        Reason::InvalidState,
    );
    assert_eq!(
        metadata.get("state").map(String::as_str),
        Some("has_connections")
    );
    assert_eq!(get_provider(admin, &created.id).await.unwrap(), replaced);

    let disconnected = delete_connection(admin, &pending.id).await.unwrap();
    assert_eq!(
        disconnected.connection.unwrap().status(),
        Status::Disconnected
    );
    assert!(
        !disconnected.revoked_at_provider,
        "nothing to revoke, and no revocation endpoint"
    );
    delete_provider(admin, &created.id).await.unwrap();
    expect_code(get_provider(admin, &created.id).await, Code::NotFound);
    expect_code(delete_provider(admin, &created.id).await, Code::NotFound);
    let left: Vec<_> = list_providers(admin)
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.id)
        .collect();
    assert_eq!(left, [public.id.as_str()]);
    assert_eq!(
        server
            .audit_count(&acme.id, "provider.deleted", &created.id)
            .await,
        1
    );
    pair.server.stop().await;
}

/// Registrations that break one rule each, with the field the violation
/// names (`|` separates names the contract leaves open).
fn bad_registrations(
    provider: &FakeProvider,
) -> Vec<(&'static str, pb::CreateOAuthProviderRequest)> {
    let base = || registration("mail", provider);
    let named = |name: &str| pb::CreateOAuthProviderRequest {
        name: name.to_owned(),
        ..base()
    };
    let authorize = |url: &str| pb::CreateOAuthProviderRequest {
        authorize_url: url.to_owned(),
        ..base()
    };
    let scoped = |scopes: &[&str]| pb::CreateOAuthProviderRequest {
        scopes: strings(scopes),
        ..base()
    };
    let extra = |key: &str| pb::CreateOAuthProviderRequest {
        extra_authorize_params: HashMap::from([(key.to_owned(), "x".to_owned())]),
        ..base()
    };
    vec![
        ("name", named("")),
        ("name", named("Mail")),
        ("name", named("1mail")),
        ("name", named("mail_box")),
        ("name", named(&"m".repeat(65))),
        ("authorize_url", authorize("")),
        ("authorize_url", authorize("not a url")),
        ("authorize_url", authorize("ftp://127.0.0.1/authorize")),
        (
            "authorize_url",
            authorize(&format!("{}#fragment", provider.authorize_url())),
        ),
        (
            "authorize_url",
            authorize(&format!("https://example.com/{}", "a".repeat(2048))),
        ),
        (
            "token_url",
            pb::CreateOAuthProviderRequest {
                token_url: "/token".to_owned(),
                ..base()
            },
        ),
        (
            "revocation_url",
            pb::CreateOAuthProviderRequest {
                revocation_url: "gopher://127.0.0.1/revoke".to_owned(),
                ..base()
            },
        ),
        (
            "client_id",
            pb::CreateOAuthProviderRequest {
                client_id: String::new(),
                ..base()
            },
        ),
        (
            "client_id",
            pb::CreateOAuthProviderRequest {
                client_id: "c".repeat(257),
                ..base()
            },
        ),
        (
            "client_secret",
            pb::CreateOAuthProviderRequest {
                client_secret: "s".repeat(1025),
                ..base()
            },
        ),
        ("scopes[1]", scoped(&["mail.read", "mail send"])),
        ("scopes[0]", scoped(&[""])),
        (
            "extra_authorize_params.state|extra_authorize_params",
            extra("state"),
        ),
        (
            "extra_authorize_params.redirect_uri|extra_authorize_params",
            extra("redirect_uri"),
        ),
        (
            "extra_authorize_params.code_challenge|extra_authorize_params",
            extra("code_challenge"),
        ),
    ]
}

#[tokio::test]
async fn bad_provider_input_is_refused_naming_the_field_and_writes_nothing() {
    let pair = setup_pair().await;
    vaultguard_tests::parts!(pair => server, acme, acme_admin: admin);
    let provider = fake_provider(server, ProviderOptions::default()).await;
    let footprint = async || {
        (
            server.count("oauth_providers").await,
            server.count("audit_events").await,
        )
    };

    let before = footprint().await;
    for (field, input) in bad_registrations(&provider) {
        let name = input.name.clone();
        let result = create_provider(admin, input).await;
        assert!(result.is_err(), "{field} ({name:.20}) was accepted");
        expect_invalid(result, field);
    }
    assert_eq!(footprint().await, before, "a refused create writes nothing");

    let stored = register(admin, "mail", &provider).await;
    let before = footprint().await;
    let bad_updates = [
        (
            "clear_client_secret|client_secret",
            pb::UpdateOAuthProviderRequest {
                client_secret: "a-new-secret-value".to_owned(),
                clear_client_secret: true,
                ..unchanged(&stored)
            },
        ),
        (
            "authorize_url",
            pb::UpdateOAuthProviderRequest {
                authorize_url: "ftp://127.0.0.1/authorize".to_owned(),
                ..unchanged(&stored)
            },
        ),
        (
            "extra_authorize_params.state|extra_authorize_params",
            pb::UpdateOAuthProviderRequest {
                extra_authorize_params: HashMap::from([("state".to_owned(), "x".to_owned())]),
                ..unchanged(&stored)
            },
        ),
        (
            "scopes[0]",
            pb::UpdateOAuthProviderRequest {
                scopes: strings(&["two words"]),
                ..unchanged(&stored)
            },
        ),
    ];
    for (field, input) in bad_updates {
        expect_invalid(update_provider(admin, input).await, field);
    }
    assert_eq!(footprint().await, before, "a refused update writes nothing");
    assert_eq!(get_provider(admin, &stored.id).await.unwrap(), stored);
    assert_eq!(
        server
            .audit_count(&acme.id, "provider.updated", &stored.id)
            .await,
        0
    );
    pair.server.stop().await;
}

// ---------------------------------------------------------------------------
// Connecting.

#[tokio::test]
async fn a_connection_completes_through_the_provider_and_the_callback() {
    let fx = registered(false).await;
    let (pair, provider, registered) = (&fx.pair, &fx.provider, &fx.registered);
    vaultguard_tests::parts!(pair => server, acme, acme_admin: admin);

    let started = start(admin, &registered.id).await;
    let pending = started.connection.clone().unwrap();
    assert_id(&pending.id, "con_");
    assert_eq!(pending.provider_id, registered.id);
    assert_eq!(pending.status(), Status::Pending);
    assert_eq!(pending.requested_scopes, strings(&SCOPES));
    assert!(pending.granted_scopes.is_empty() && pending.connected_by.is_none());
    assert!(pending.connect_time.is_none());
    let ttl = started.expire_time.unwrap().seconds - pending.create_time.unwrap().seconds;
    assert!((599..=600).contains(&ttl), "the state lives 600 s: {ttl}");

    // The authorize URL carries everything the provider needs.
    assert_eq!(
        without_query(&started.authorize_url),
        provider.authorize_url()
    );
    let params = query(&started.authorize_url);
    let param = |name: &str| params.get(name).map_or("<absent>", String::as_str);
    assert_eq!(param("response_type"), "code");
    assert_eq!(param("client_id"), provider.client_id());
    assert_eq!(param("redirect_uri"), callback_url(server));
    assert_eq!(scope_set(param("scope")), SCOPES.into_iter().collect());
    assert_eq!(param("code_challenge_method"), "S256");
    assert_eq!(param("code_challenge").len(), 43, "BASE64URL(SHA-256)");
    assert!(param("state").len() >= 16, "state {}", param("state"));
    assert_eq!(param("access_type"), "offline");

    // The browser goes to the provider, which sends it to the callback.
    assert_eq!(follow(&started.authorize_url).await, 200);
    assert_eq!(
        (provider.authorize_calls(), provider.code_exchanges()),
        (1, 1)
    );
    assert_eq!(
        provider.token_client_auth(),
        [ClientAuth::Basic],
        "the code is exchanged with HTTP Basic client authentication"
    );
    let connected = get_connection(admin, &pending.id).await.unwrap();
    assert_eq!(connected.id, pending.id);
    assert_eq!(connected.status(), Status::Connected);
    assert_eq!(connected.granted_scopes, strings(&SCOPES));
    let by = connected.connected_by.clone().expect("connected_by");
    assert_eq!(
        (by.kind(), by.subject.as_str(), by.tenant_id.as_str()),
        (pb::PrincipalKind::Human, "alice", acme.id.as_str())
    );
    assert!(connected.connect_time.is_some());
    assert!(
        [provider.subject(), provider.email()].contains(&connected.external_subject.as_str()),
        "external_subject {:?}",
        connected.external_subject
    );
    assert_eq!(connected.status_reason, "");
    for event in ["connection.started", "connection.connected"] {
        assert_eq!(
            server.audit_count(&acme.id, event, &pending.id).await,
            1,
            "{event}"
        );
    }

    // With a return URL on a registered origin, the callback's last hop is
    // a 303 to it.
    set_return_origins(admin, &["http://localhost"])
        .await
        .expect("register the console's origin");
    let started = start_connection(
        admin,
        pb::StartConnectionRequest {
            provider_id: registered.id.clone(),
            return_url: RETURN_URL.to_owned(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let second = started.connection.unwrap().id;
    assert_ne!(second, pending.id, "a new connection");
    let callback = provider_redirect(server, &started.authorize_url).await;
    let (status, location) = hop(&callback).await;
    assert_eq!(status, 303, "See Other to the return URL");
    let location = location.expect("Location");
    assert_eq!(without_query(&location), RETURN_URL);
    let back = query(&location);
    assert_eq!(
        (
            back.get("connection_id").map(String::as_str),
            back.get("status").map(String::as_str)
        ),
        (Some(second.as_str()), Some("connected"))
    );
    assert_eq!(
        get_connection(admin, &second).await.unwrap().status(),
        Status::Connected
    );
    assert_eq!(
        server
            .audit_count(&acme.id, "connection.connected", &second)
            .await,
        1
    );

    // Newest first, filtered by state and provider.
    let all = pb::ListConnectionsRequest::default();
    assert_eq!(
        listed_connections(admin, all.clone()).await.unwrap(),
        [second.clone(), pending.id.clone()]
    );
    let pending_only = pb::ListConnectionsRequest {
        status: Status::Pending as i32,
        ..all.clone()
    };
    assert!(
        listed_connections(admin, pending_only)
            .await
            .unwrap()
            .is_empty()
    );
    let of_provider = pb::ListConnectionsRequest {
        provider_id: registered.id.clone(),
        status: Status::Connected as i32,
        ..all
    };
    assert_eq!(
        listed_connections(admin, of_provider).await.unwrap().len(),
        2
    );
    fx.pair.server.stop().await;
}

// ---------------------------------------------------------------------------
// Exchanging.

#[tokio::test]
async fn exchange_hands_out_working_cached_tokens_and_never_the_refresh_token() {
    let (fx, connection_id) = connected().await;
    let (pair, provider, registered) = (&fx.pair, &fx.provider, &fx.registered);
    vaultguard_tests::parts!(pair => server, acme, globex, agent, acme_admin: admin);
    let connected = get_connection(admin, &connection_id).await.unwrap();
    let listed = listed_connections(admin, pb::ListConnectionsRequest::default())
        .await
        .unwrap();
    let mut answers = vec![
        format!("{registered:?}"),
        format!("{connected:?}"),
        format!("{listed:?}"),
    ];

    let first = agent.exchange(&connection_id, &[]).await.unwrap();
    answers.push(format!("{first:?}"));
    assert_working_token(provider, &first, &SCOPES).await;
    let refreshes = provider.refreshes();

    // The second exchange is served from the cache.
    let second = agent.exchange(&connection_id, &[]).await.unwrap();
    answers.push(format!("{second:?}"));
    assert_eq!(second.access_token, first.access_token, "cached");
    assert_eq!(
        provider.refreshes(),
        refreshes,
        "no refresh for a cached token"
    );
    assert!(second.expires_in <= first.expires_in);
    let (total, refreshed) = exchanges_logged(server, &acme.id, &connection_id).await;
    assert_eq!(
        total, 1,
        "the same token handed again to the same agent is audited once per window"
    );
    assert_eq!(refreshed, refreshes, "one refreshed exchange per refresh");

    assert_provider_secrets_kept(server, provider, &answers).await;
    // Access tokens are handed to agents but never logged, audited or
    // stored in plaintext.
    let access: Vec<(&str, String)> = provider
        .issued_access_tokens()
        .into_iter()
        .map(|token| ("an access token", token))
        .collect();
    assert_never_leaked(server, &access, &[]).await;
    for tenant in [&acme.id, &globex.id] {
        for event in server
            .audit_events(tenant, "connection.token_exchanged")
            .await
        {
            assert!(
                !event.details.contains(&first.access_token),
                "audit details hold a token"
            );
        }
    }
    fx.pair.server.stop().await;
}

#[tokio::test]
async fn fifty_concurrent_exchanges_share_one_refresh_and_keep_the_rotated_token() {
    let (fx, connection_id) = connected().await;
    let Registered { pair, provider, .. } = &fx;
    vaultguard_tests::parts!(pair => server, acme, agent);
    let cached = agent.exchange(&connection_id, &[]).await.unwrap();
    let original = provider.issued_refresh_tokens();
    assert_eq!(original.len(), 1);

    provider.set_rotate(true);
    provider.set_delay(Duration::from_millis(200));
    expire_access_tokens(server, agent).await;
    let before = provider.refreshes();
    let calls = (0..50).map(|_| {
        let agent = agent.clone();
        let connection_id = connection_id.clone();
        tokio::spawn(async move { exchange_retrying(&agent, &connection_id).await })
    });
    let answers: Vec<pb::ExchangeTokenResponse> = futures::future::join_all(calls)
        .await
        .into_iter()
        .map(|joined| joined.expect("task").expect("exchange"))
        .collect();
    assert_eq!(
        provider.refreshes(),
        before + 1,
        "50 concurrent exchanges share one refresh"
    );
    let tokens: HashSet<&str> = answers.iter().map(|a| a.access_token.as_str()).collect();
    assert_eq!(tokens.len(), 1, "every caller got the same token");
    let fresh = answers[0].clone();
    assert_ne!(fresh.access_token, cached.access_token, "refreshed");
    assert_working_token(provider, &fresh, &SCOPES).await;
    assert_eq!(provider.presented_refresh_tokens(), original);

    // The rotated refresh token was stored: the next refresh presents it
    // (the old one is spent at the provider).
    let issued = provider.issued_refresh_tokens();
    assert_eq!(issued.len(), 2, "rotated once");
    provider.set_delay(Duration::ZERO);
    expire_access_tokens(server, agent).await;
    let later = agent.exchange(&connection_id, &[]).await.unwrap();
    assert_working_token(provider, &later, &SCOPES).await;
    assert_eq!(provider.refreshes(), before + 2);
    assert_eq!(
        provider.presented_refresh_tokens().last(),
        Some(&issued[1]),
        "the rotated token, not the old one"
    );
    let admin = server.admin(&acme.id, "alice").await;
    assert_eq!(
        get_connection(&admin, &connection_id)
            .await
            .unwrap()
            .status(),
        Status::Connected
    );
    let (total, refreshed) = exchanges_logged(server, &acme.id, &connection_id).await;
    assert_eq!(
        refreshed,
        provider.refreshes(),
        "one refreshed event per refresh"
    );
    // Each refresh hands out a new token and is always audited; callers
    // handed a token the agent already got are audited once per window
    // (callers racing the first record may each be).
    assert!(
        (refreshed + 1..=52).contains(&total),
        "{total} token_exchanged events for 52 exchanges, {refreshed} refreshed"
    );
    let shown: Vec<String> = answers
        .iter()
        .chain([&later])
        .map(|answer| format!("{answer:?}"))
        .collect();
    assert_provider_secrets_kept(server, provider, &shown).await;
    fx.pair.server.stop().await;
}

#[tokio::test]
async fn invalid_grant_marks_the_connection_needs_reauth_until_reconnected() {
    let (fx, connection_id) = connected().await;
    let (pair, provider, registered) = (&fx.pair, &fx.provider, &fx.registered);
    vaultguard_tests::parts!(pair => server, acme, agent);
    agent.exchange(&connection_id, &[]).await.unwrap();

    expire_access_tokens(server, agent).await;
    let admin = server.admin(&acme.id, "alice").await;
    provider.set_invalid_grant(true);
    let before = provider.refreshes();
    expect_reason(
        agent.exchange(&connection_id, &[]).await,
        Code::FailedPrecondition,
        Reason::NeedsReauth,
    );
    assert_eq!(provider.refreshes(), before + 1, "the refresh was tried");
    let marked = get_connection(&admin, &connection_id).await.unwrap();
    assert_eq!(marked.status(), Status::NeedsReauth);
    assert!(!marked.status_reason.is_empty(), "the reason is shown");
    assert_eq!(
        server
            .audit_count(&acme.id, "connection.needs_reauth", &connection_id)
            .await,
        1
    );

    // The next exchange fails the same way without asking the provider.
    expect_reason(
        agent.exchange(&connection_id, &[]).await,
        Code::FailedPrecondition,
        Reason::NeedsReauth,
    );
    assert_eq!(provider.refreshes(), before + 1, "no second provider call");
    assert_eq!(
        server
            .audit_count(&acme.id, "connection.needs_reauth", &connection_id)
            .await,
        1,
        "audited once"
    );
    let needing = pb::ListConnectionsRequest {
        status: Status::NeedsReauth as i32,
        ..Default::default()
    };
    assert_eq!(
        listed_connections(&admin, needing).await.unwrap(),
        [connection_id.as_str()]
    );

    // Reconnecting keeps the id.
    provider.set_invalid_grant(false);
    let again = start_connection(
        &admin,
        pb::StartConnectionRequest {
            provider_id: registered.id.clone(),
            connection_id: connection_id.clone(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let current = again.connection.clone().unwrap();
    assert_eq!(current.id, connection_id);
    assert_eq!(
        current.status(),
        Status::NeedsReauth,
        "in its current state"
    );
    assert_eq!(follow(&again.authorize_url).await, 200);
    let reconnected = get_connection(&admin, &connection_id).await.unwrap();
    assert_eq!(reconnected.status(), Status::Connected);
    let answer = agent.exchange(&connection_id, &[]).await.unwrap();
    assert_working_token(provider, &answer, &SCOPES).await;
    assert_eq!(
        server
            .audit_count(&acme.id, "connection.connected", &connection_id)
            .await,
        2
    );
    assert_eq!(server.count("connections").await, 1, "no second connection");
    let shown = [
        format!("{marked:?}"),
        format!("{again:?}"),
        format!("{answer:?}"),
    ];
    assert_provider_secrets_kept(server, provider, &shown).await;
    fx.pair.server.stop().await;
}

#[tokio::test]
async fn a_provider_outage_is_unavailable_and_keeps_the_connection() {
    let (fx, connection_id) = connected().await;
    let Registered { pair, provider, .. } = &fx;
    vaultguard_tests::parts!(pair => server, acme, agent);
    agent.exchange(&connection_id, &[]).await.unwrap();

    expire_access_tokens(server, agent).await;
    provider.set_fail_5xx(true);
    let before = provider.refreshes();
    expect_reason(
        agent.exchange(&connection_id, &[]).await,
        Code::Unavailable,
        Reason::ProviderError,
    );
    assert_eq!(provider.refreshes(), before + 1);
    let admin = server.admin(&acme.id, "alice").await;
    let kept = get_connection(&admin, &connection_id).await.unwrap();
    assert_eq!(
        kept.status(),
        Status::Connected,
        "an outage is not a reauth"
    );
    assert_eq!(
        server
            .audit_count(&acme.id, "connection.needs_reauth", &connection_id)
            .await,
        0
    );

    // Once the provider is back, the same refresh token works.
    provider.set_fail_5xx(false);
    let answer = agent.exchange(&connection_id, &[]).await.unwrap();
    assert_working_token(provider, &answer, &SCOPES).await;
    assert_provider_secrets_kept(server, provider, &[format!("{kept:?}")]).await;
    fx.pair.server.stop().await;
}

// ---------------------------------------------------------------------------
// The callback's state.

#[tokio::test]
async fn replayed_expired_and_unknown_states_are_refused_at_the_callback() {
    let fx = registered(true).await;
    let (pair, provider, registered) = (&fx.pair, &fx.provider, &fx.registered);
    vaultguard_tests::parts!(pair => server, acme, agent, acme_admin: admin);
    let refused = async || {
        server
            .audit_events(&acme.id, "connection.callback_refused")
            .await
    };

    // Replay: the same code and state a second time.
    let started = start(admin, &registered.id).await;
    let first = started.connection.unwrap().id;
    let callback = provider_redirect(server, &started.authorize_url).await;
    assert_eq!(hop(&callback).await.0, 200);
    assert_eq!(
        get_connection(admin, &first).await.unwrap().status(),
        Status::Connected
    );
    assert_eq!(hop(&callback).await, (400, None), "a used state");
    assert_eq!(
        provider.code_exchanges(),
        1,
        "the replay reached no provider"
    );
    let events = refused().await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].outcome, "denied");
    assert_eq!(
        get_connection(admin, &first).await.unwrap().status(),
        Status::Connected,
        "the replay changed nothing"
    );

    // Expiry: the flow completes after the state's 600 s.
    let started = start(admin, &registered.id).await;
    let second = started.connection.unwrap().id;
    let callback = provider_redirect(server, &started.authorize_url).await;
    advance(server, agent, 601).await;
    assert_eq!(hop(&callback).await, (400, None), "an expired state");
    assert_eq!(provider.code_exchanges(), 1);
    let events = refused().await;
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(events[1].outcome, "denied");
    let admin = server.admin(&acme.id, "alice").await;
    assert_eq!(
        get_connection(&admin, &second).await.unwrap().status(),
        Status::Pending
    );
    expect_connection_state(agent.exchange(&second, &[]).await, "pending");

    // A state VaultGuard never issued, or none at all.
    let base = callback_url(server);
    for url in [
        format!("{base}?code=made-up-code&state=never-issued-state-0123456789"),
        format!("{base}?code=made-up-code"),
        base.clone(),
    ] {
        assert_eq!(hop(&url).await.0, 400, "{url}");
    }
    assert_eq!(provider.code_exchanges(), 1);
    fx.pair.server.stop().await;
}

#[tokio::test]
async fn a_refusal_or_failed_code_exchange_fails_the_connection() {
    let fx = registered(false).await;
    let (pair, provider, registered) = (&fx.pair, &fx.provider, &fx.registered);
    vaultguard_tests::parts!(pair => server, acme, acme_admin: admin);

    // The user says no at the provider.
    provider.set_deny(true);
    set_return_origins(admin, &["http://localhost"])
        .await
        .expect("register the console's origin");
    let started = start_connection(
        admin,
        pb::StartConnectionRequest {
            provider_id: registered.id.clone(),
            return_url: RETURN_URL.to_owned(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let denied = started.connection.unwrap().id;
    let callback = provider_redirect(server, &started.authorize_url).await;
    assert_eq!(
        query(&callback).get("error").map(String::as_str),
        Some("access_denied")
    );
    let (status, location) = hop(&callback).await;
    assert_eq!(status, 303);
    let back = query(&location.expect("Location"));
    let value = |name: &str| back.get(name).map_or("<absent>", String::as_str);
    assert_eq!(
        (value("connection_id"), value("status"), value("error")),
        (denied.as_str(), "error", "access_denied")
    );
    assert_ne!(
        get_connection(admin, &denied).await.unwrap().status(),
        Status::Connected
    );
    assert_eq!(provider.code_exchanges(), 0);
    assert_eq!(
        server
            .audit_count(&acme.id, "connection.failed", &denied)
            .await,
        1
    );
    assert_eq!(
        server
            .audit_count(&acme.id, "connection.connected", &denied)
            .await,
        0
    );

    // The provider refuses the code exchange (a wrong client secret).
    provider.set_deny(false);
    let mut wrong = unchanged(registered);
    wrong.client_secret = "not-the-providers-secret".to_owned();
    update_provider(admin, wrong).await.unwrap();
    let started = start(admin, &registered.id).await;
    let failed = started.connection.unwrap().id;
    follow(&started.authorize_url).await;
    assert_eq!(provider.code_exchanges(), 1, "the exchange was tried");
    assert_ne!(
        get_connection(admin, &failed).await.unwrap().status(),
        Status::Connected
    );
    assert_eq!(
        server
            .audit_count(&acme.id, "connection.failed", &failed)
            .await,
        1
    );
    fx.pair.server.stop().await;
}

// ---------------------------------------------------------------------------
// Tenants.

#[tokio::test]
async fn another_tenant_sees_nothing_and_exchanges_only_with_a_delegation() {
    let pair = setup_pair().await;
    // Globex owns the connection; acme (its admin and its agent `bot`) is
    // the other tenant.
    vaultguard_tests::parts!(pair => server, acme, globex, agent: bot, acme_admin, globex_admin);
    let provider = fake_provider(server, ProviderOptions::default()).await;
    let registered = register(globex_admin, "mail", &provider).await;
    allow_own_exchanges(globex_admin, &globex.id).await;
    allow_own_exchanges(acme_admin, &acme.id).await;
    let connection = connect(globex_admin, &registered.id).await;
    let connection_id = connection.id.clone();

    expect_code(bot.exchange(&connection_id, &[]).await, Code::NotFound);
    let calls: Vec<(&str, Result<(), ClientError>)> = vec![
        (
            "GetOAuthProvider",
            get_provider(acme_admin, &registered.id).await.map(drop),
        ),
        (
            "UpdateOAuthProvider",
            update_provider(acme_admin, unchanged(&registered))
                .await
                .map(drop),
        ),
        (
            "DeleteOAuthProvider",
            delete_provider(acme_admin, &registered.id).await,
        ),
        (
            "StartConnection",
            start_connection(
                acme_admin,
                pb::StartConnectionRequest {
                    provider_id: registered.id.clone(),
                    ..Default::default()
                },
            )
            .await
            .map(drop),
        ),
        (
            "GetConnection",
            get_connection(acme_admin, &connection_id).await.map(drop),
        ),
        (
            "DeleteConnection",
            delete_connection(acme_admin, &connection_id)
                .await
                .map(drop),
        ),
    ];
    for (rpc, result) in calls {
        assert_eq!(
            result.as_ref().err().and_then(ClientError::code),
            Some(Code::NotFound),
            "{rpc}: {result:?}"
        );
    }
    assert!(list_providers(acme_admin).await.unwrap().is_empty());
    assert!(
        listed_connections(acme_admin, pb::ListConnectionsRequest::default())
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        get_provider(globex_admin, &registered.id).await.unwrap(),
        registered,
        "untouched"
    );
    assert_eq!(
        get_connection(globex_admin, &connection_id).await.unwrap(),
        connection,
        "untouched"
    );

    // With a delegation from globex for this connection, the bot exchanges.
    for action in [EXCHANGE_MAIL, "exchange:calendar"] {
        add_rule(
            globex_admin,
            pb::Rule {
                scopes: strings(&SCOPES),
                default_scopes: strings(&SCOPES),
                resources: strings(&["connection:*"]),
                ..with_counterpart(&acme.id, inbound(action, pb::Effect::Allow))
            },
        )
        .await;
    }
    let delegated = async |action: &str, resource: &str| -> String {
        let request = pb::RequestDelegationRequest {
            resource: resource.to_owned(),
            ..ask(&globex.id, action)
        };
        match bot.request_delegation(request).await {
            Ok(DelegationOutcome::Allowed { grant, .. }) => grant.token,
            other => panic!("expected ALLOW for {action} on {resource}: {other:?}"),
        }
    };
    let resource = format!("connection:{connection_id}");
    let token = delegated(EXCHANGE_MAIL, &resource).await;
    let answer = bot
        .exchange_delegated(&token, &connection_id, &[])
        .await
        .unwrap();
    assert_working_token(&provider, &answer, &SCOPES).await;

    let other_action = delegated("exchange:calendar", &resource).await;
    expect_invalid_grant(
        bot.exchange_delegated(&other_action, &connection_id, &[])
            .await,
        "another action",
    );
    let other_resource =
        delegated(EXCHANGE_MAIL, &format!("connection:con_{}", "0".repeat(32))).await;
    expect_invalid_grant(
        bot.exchange_delegated(&other_resource, &connection_id, &[])
            .await,
        "another connection",
    );
    let (_, _, other_agent) = server.create_agent(&acme.id, "other-bot").await;
    expect_invalid_grant(
        other_agent
            .exchange_delegated(&token, &connection_id, &[])
            .await,
        "presented by another agent",
    );
    assert_provider_secrets_kept(server, &provider, &[format!("{answer:?}")]).await;
    pair.server.stop().await;
}

#[tokio::test]
async fn a_ciphertext_copied_to_another_tenants_row_does_not_decrypt() {
    let pair = setup_pair().await;
    vaultguard_tests::parts!(pair => server, acme, globex, agent: acme_agent, acme_admin, globex_admin);
    let acme_provider = fake_provider(server, ProviderOptions::default()).await;
    let globex_provider = fake_provider(server, ProviderOptions::default()).await;
    let acme_registered = register(acme_admin, "mail", &acme_provider).await;
    let globex_registered = register(globex_admin, "mail", &globex_provider).await;
    allow_own_exchanges(acme_admin, &acme.id).await;
    allow_own_exchanges(globex_admin, &globex.id).await;
    let acme_connection = connect(acme_admin, &acme_registered.id).await.id;
    let globex_connection = connect(globex_admin, &globex_registered.id).await.id;
    let (_, _, globex_agent) = server.create_agent(&globex.id, "gbot").await;
    acme_agent.exchange(&acme_connection, &[]).await.unwrap();
    // globex's agent has not exchanged yet: the server holds CONNECTED rows
    // in memory once read, and the copy below goes behind its back.

    // Both ids are `con_` + hex, so they can be spliced into SQL.
    assert_id(&acme_connection, "con_");
    assert_id(&globex_connection, "con_");
    let db = &server.state.db;
    let copied = db
        .execute_raw(Statement::from_string(
            db.get_database_backend(),
            format!(
                "UPDATE connections SET \
                 refresh_token_ciphertext = (SELECT refresh_token_ciphertext FROM connections WHERE id = '{acme_connection}'), \
                 access_token_ciphertext = (SELECT access_token_ciphertext FROM connections WHERE id = '{acme_connection}') \
                 WHERE id = '{globex_connection}'"
            ),
        ))
        .await
        .expect("copy the ciphertexts");
    assert_eq!(copied.rows_affected(), 1);

    let acme_tokens: Vec<String> = acme_provider
        .issued_refresh_tokens()
        .into_iter()
        .chain(acme_provider.issued_access_tokens())
        .collect();
    let acme_refreshes = acme_provider.refreshes();
    let refused = |what: &str, result: Result<pb::ExchangeTokenResponse, ClientError>| {
        let err = expect_code(result, Code::Internal);
        let shown = format!("{err} {err:?}");
        for token in &acme_tokens {
            assert!(!shown.contains(token.as_str()), "{what}: {shown}");
        }
    };
    // The cached access token, then (once it expired) the refresh token.
    refused(
        "cached token",
        globex_agent.exchange(&globex_connection, &[]).await,
    );
    expire_access_tokens(server, &globex_agent).await;
    refused(
        "refresh token",
        globex_agent.exchange(&globex_connection, &[]).await,
    );
    assert_eq!(
        acme_provider.refreshes(),
        acme_refreshes,
        "acme's provider saw nothing"
    );
    for presented in globex_provider.presented_refresh_tokens() {
        assert!(!acme_tokens.contains(&presented), "acme's token was used");
    }

    // Acme's own row still works.
    acme_agent.invalidate_token().await;
    let answer = acme_agent.exchange(&acme_connection, &[]).await.unwrap();
    assert_working_token(&acme_provider, &answer, &SCOPES).await;
    assert_provider_secrets_kept(server, &acme_provider, &[]).await;
    assert_provider_secrets_kept(server, &globex_provider, &[]).await;
    pair.server.stop().await;
}

// ---------------------------------------------------------------------------
// Exchange input.

#[tokio::test]
async fn scopes_narrow_the_token_and_bad_exchange_input_is_refused() {
    let (fx, connection_id) = connected().await;
    let Registered { pair, provider, .. } = &fx;
    vaultguard_tests::parts!(pair => server, agent);

    let narrowed = agent
        .exchange(&connection_id, &strings(&["mail.read"]))
        .await
        .unwrap();
    assert_working_token(provider, &narrowed, &["mail.read"]).await;
    assert_eq!(
        provider.last_refresh_scope(),
        Some(Some("mail.read".to_owned())),
        "the refresh asked the provider for the subset"
    );
    let full = agent.exchange(&connection_id, &[]).await.unwrap();
    assert_working_token(provider, &full, &SCOPES).await;

    let before = (provider.refreshes(), server.count("audit_events").await);
    expect_invalid(
        agent
            .exchange(&connection_id, &strings(&["mail.delete"]))
            .await,
        "scopes[0]",
    );
    expect_invalid(
        agent
            .exchange(&connection_id, &strings(&["mail.read", "contacts.read"]))
            .await,
        "scopes[1]",
    );
    let bad = [
        (
            "grant_type",
            pb::ExchangeTokenRequest {
                grant_type: "client_credentials".to_owned(),
                ..exchange_request(&connection_id)
            },
        ),
        (
            "grant_type",
            pb::ExchangeTokenRequest {
                grant_type: String::new(),
                ..exchange_request(&connection_id)
            },
        ),
        (
            "subject_token_type",
            pb::ExchangeTokenRequest {
                subject_token_type: ACCESS_TOKEN_TYPE.to_owned(),
                ..exchange_request(&connection_id)
            },
        ),
        (
            "subject_token_type",
            pb::ExchangeTokenRequest {
                subject_token: "a.b.c".to_owned(),
                subject_token_type: "urn:ietf:params:oauth:token-type:jwt".to_owned(),
                ..exchange_request(&connection_id)
            },
        ),
    ];
    for (field, input) in bad {
        expect_invalid(exchange_raw(agent, input).await, field);
    }
    assert_eq!(
        (provider.refreshes(), server.count("audit_events").await),
        before,
        "refused input reaches no provider and is not audited as an exchange"
    );
    fx.pair.server.stop().await;
}

// ---------------------------------------------------------------------------
// Disconnecting.

#[tokio::test]
async fn delete_connection_revokes_at_the_provider_and_erases_the_tokens() {
    let (fx, connection_id) = connected().await;
    let (pair, provider, registered) = (&fx.pair, &fx.provider, &fx.registered);
    vaultguard_tests::parts!(pair => server, acme, agent, acme_admin: admin);
    let answer = agent.exchange(&connection_id, &[]).await.unwrap();
    assert_eq!(userinfo(provider, &answer.access_token).await, 200);

    let deleted = delete_connection(admin, &connection_id).await.unwrap();
    assert!(deleted.revoked_at_provider, "{deleted:?}");
    let gone = deleted.connection.clone().unwrap();
    assert_eq!(
        (gone.id.as_str(), gone.status()),
        (connection_id.as_str(), Status::Disconnected)
    );
    assert_eq!(provider.revocations(), 1);
    assert_eq!(
        provider.revoked_tokens(),
        provider.issued_refresh_tokens(),
        "the refresh token was revoked"
    );
    assert_eq!(
        userinfo(provider, &answer.access_token).await,
        401,
        "the provider ended the grant"
    );
    assert_eq!(
        get_connection(admin, &connection_id)
            .await
            .unwrap()
            .status(),
        Status::Disconnected
    );
    let row = connection::Entity::find_by_id(connection_id.clone())
        .one(&server.state.db)
        .await
        .unwrap()
        .expect("the row stays");
    assert!(
        row.refresh_token_ciphertext.is_none_or(|c| c.is_empty())
            && row.access_token_ciphertext.is_none_or(|c| c.is_empty()),
        "the stored tokens are erased"
    );

    let refreshes = provider.refreshes();
    expect_connection_state(agent.exchange(&connection_id, &[]).await, "disconnected");
    assert_eq!(provider.refreshes(), refreshes);
    expect_reason(
        delete_connection(admin, &connection_id).await,
        Code::FailedPrecondition,
        Reason::InvalidState,
    );
    expect_reason(
        start_connection(
            admin,
            pb::StartConnectionRequest {
                provider_id: registered.id.clone(),
                connection_id: connection_id.clone(),
                ..Default::default()
            },
        )
        .await,
        Code::FailedPrecondition,
        Reason::InvalidState,
    );
    assert_eq!(provider.revocations(), 1, "revoked once");
    assert_eq!(
        server
            .audit_count(&acme.id, "connection.disconnected", &connection_id)
            .await,
        1
    );
    assert_provider_secrets_kept(server, provider, &[format!("{deleted:?}")]).await;
    fx.pair.server.stop().await;
}

// ---------------------------------------------------------------------------
// Policy.

#[tokio::test]
async fn exchange_needs_an_inbound_rule_and_a_step_up_is_redeemed_with_poll() {
    let fx = registered(false).await;
    let (pair, provider, registered) = (&fx.pair, &fx.provider, &fx.registered);
    vaultguard_tests::parts!(pair => server, acme, bot, agent, acme_admin: admin);
    let connection_id = connect(admin, &registered.id).await.id;
    let refreshes = provider.refreshes();

    expect_reason(
        agent.exchange(&connection_id, &[]).await,
        Code::PermissionDenied,
        Reason::NoMatchingRule,
    );

    add_rule(admin, mail_exchanges(&acme.id, pb::Effect::StepUp)).await;
    let first = expect_reason(
        agent.exchange(&connection_id, &[]).await,
        Code::FailedPrecondition,
        Reason::StepUpRequired,
    );
    let auth_req_id = first.get("auth_req_id").cloned().unwrap_or_default();
    assert!(!auth_req_id.is_empty(), "metadata {first:?}");
    for key in ["expires_in", "interval"] {
        assert!(
            first.get(key).and_then(|v| v.parse::<u32>().ok()).is_some(),
            "numeric {key} in {first:?}"
        );
    }
    let again = expect_reason(
        agent.exchange(&connection_id, &[]).await,
        Code::FailedPrecondition,
        Reason::StepUpRequired,
    );
    assert_eq!(
        again.get("auth_req_id"),
        Some(&auth_req_id),
        "the pending step-up is reused"
    );
    assert_eq!(provider.refreshes(), refreshes, "no provider call yet");

    // A human approver of acme approves; the bot redeems and exchanges.
    let ann = server.approver(&acme.id, "ann").await;
    let queue = ann
        .list_pending_step_ups(pb::ListPendingStepUpsRequest {
            action: EXCHANGE_MAIL.to_owned(),
            ..Default::default()
        })
        .await
        .unwrap()
        .step_ups;
    assert_eq!(queue.len(), 1, "{queue:?}");
    let step_up = &queue[0];
    assert_eq!(
        (
            step_up.requesting_agent_id.as_str(),
            step_up.receiving_tenant_id.as_str()
        ),
        (bot.id.as_str(), acme.id.as_str())
    );
    approve_step_up(&ann, &step_up.step_up_id, &step_up.request_hash)
        .await
        .unwrap();
    let granted = agent
        .poll_step_up(pb::PollStepUpRequest {
            auth_req_id: auth_req_id.clone(),
        })
        .await
        .expect("the approved step-up is redeemed");
    let answer = agent
        .exchange_delegated(&granted.access_token, &connection_id, &[])
        .await
        .unwrap();
    assert_working_token(provider, &answer, &SCOPES).await;
    assert_provider_secrets_kept(server, provider, &[format!("{answer:?}")]).await;
    fx.pair.server.stop().await;
}
