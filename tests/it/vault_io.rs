//! The vault's outbound calls and the browser's way back (issue 23, items 4,
//! 6 and 12), against real local OAuth providers (tests/src/oauth_provider.rs):
//!
//! - a provider that answers slowly (which any tenant admin can register)
//!   holds no pooled database connection: 32 concurrent refreshes against it
//!   leave another tenant's ALLOW delegations and Verify answering as fast
//!   as alone, and one refresh per connection still happens on two replicas
//!   at once, a rotating provider never seeing a refresh token twice;
//! - a refresh token, a PKCE verifier and the client secret only ever go to
//!   the endpoints they were issued by or registered for: moving the token
//!   or revocation endpoint discards the tokens it did not issue, and the
//!   stored secret does not follow the endpoint;
//! - the callback page escapes what the provider put in the URL, and the
//!   callback redirects only to the tenant's registered return origins.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sea_orm::sea_query::Expr;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
use tokio::sync::Barrier;
use tonic::Code;
use vaultguard_client::{DelegationOutcome, VaultGuardClient, pb};
use vaultguard_server::clock::Clock;
use vaultguard_server::store::entities::connection;
use vaultguard_tests::oauth_provider::{FakeProvider, ProviderOptions};
use vaultguard_tests::{Backend, TestServer, expect_invalid, expect_reason};

use crate::delegations::ask;
use crate::policies::{add_rule, inbound};
use crate::vault_connections::{
    Registered, SCOPES, allow_own_exchanges, assert_working_token, callback_url, connect,
    connected, expire_access_tokens, query, register, registered, set_return_origins, start,
    start_connection, unchanged, update_provider, userinfo,
};
use vaultguard_tests::calls::{delete_connection, get_connection};

use pb::ConnectionStatus as Status;
use pb::ErrorReason as Reason;
use vaultguard_tests::Rpc;
use vaultguard_tests::require_backend;

/// Connections refreshed at once against the slow provider.
const SLOW_EXCHANGES: usize = 32;
/// How long the slow provider takes to answer a token request.
const PROVIDER_DELAY: Duration = Duration::from_millis(2_500);
/// The harness's `database_acquire_timeout_ms`: a call that waited for a
/// pooled connection this long failed.
const ACQUIRE_TIMEOUT: Duration = Duration::from_millis(1_000);
/// The bystander's rounds measured alone.
const ALONE_ROUNDS: usize = 30;

/// A client secret of a server the tokens were never issued by.
const ELSEWHERE_SECRET: &str = "elsewhere-client-secret-5b1d0c7e9a";

// ---------------------------------------------------------------------------
// Fixtures.

/// Another tenant's unrelated traffic: globex's agent asks initech for ALLOW
/// delegations, and initech verifies each token.
struct Bystander {
    agent: VaultGuardClient,
    verifier: VaultGuardClient,
    receiving: String,
}

impl Bystander {
    async fn start(server: &TestServer) -> Self {
        let globex = server.create_tenant("globex").await;
        let initech = server.create_tenant("initech").await;
        let (_, _, agent) = server.create_agent(&globex.id, "bot").await;
        agent.bearer().await.expect("globex's agent token");
        let verifier = server.admin(&initech.id, "ivy").await;
        add_rule(&verifier, inbound("stock.read", pb::Effect::Allow)).await;
        Self {
            agent,
            verifier,
            receiving: initech.id,
        }
    }

    /// One ALLOW delegation and its verification: each call's duration, or
    /// what went wrong.
    async fn round(&self) -> Result<[Duration; 2], String> {
        let started = Instant::now();
        let outcome = self
            .agent
            .request_delegation(ask(&self.receiving, "stock.read"))
            .await
            .map_err(|e| format!("RequestDelegation: {e:?}"))?;
        let asked = started.elapsed();
        let DelegationOutcome::Allowed { grant, .. } = outcome else {
            return Err(format!("not ALLOW: {outcome:?}"));
        };
        let started = Instant::now();
        let answer = self
            .verifier
            .verify(grant.token, "stock.read")
            .await
            .map_err(|e| format!("VerifyDelegationToken: {e:?}"))?;
        if !answer.active {
            return Err("a fresh token verified inactive".to_owned());
        }
        Ok([asked, started.elapsed()])
    }
}

/// The `q` quantile of `samples` (which it sorts).
fn quantile(samples: &mut [Duration], q: f64) -> Duration {
    samples.sort();
    if samples.is_empty() {
        return Duration::ZERO;
    }
    let last = samples.len() - 1;
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let index = ((last as f64) * q).round() as usize;
    samples[index.min(last)]
}

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// A provider standing for a server the tokens were never issued by (an
/// attacker's): it records everything it is sent.
async fn elsewhere() -> FakeProvider {
    FakeProvider::start(ProviderOptions {
        client_id: "elsewhere-client".to_owned(),
        client_secret: Some(ELSEWHERE_SECRET.to_owned()),
        ..ProviderOptions::default()
    })
    .await
}

/// Asserts that `elsewhere` was sent nothing at all, and above all none of
/// `provider`'s refresh tokens nor its client secret.
#[track_caller]
fn assert_sent_nothing(elsewhere: &FakeProvider, provider: &FakeProvider) {
    let mut secrets: Vec<(&str, String)> = provider
        .issued_refresh_tokens()
        .into_iter()
        .map(|token| ("a refresh token", token))
        .collect();
    if let Some(secret) = provider.client_secret() {
        secrets.push(("the client secret", secret.to_owned()));
    }
    let received = elsewhere.received();
    for request in &received {
        for (what, secret) in &secrets {
            assert!(
                !request.contains(secret),
                "{what} of the provider that issued it was sent to {} at another server",
                request.path
            );
        }
    }
    let paths: Vec<&str> = received.iter().map(|r| r.path.as_str()).collect();
    assert!(
        paths.is_empty(),
        "requests reached the other server: {paths:?}"
    );
}

// ---------------------------------------------------------------------------
// Item 4: no pooled connection across a provider call.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_provider_refreshes_leave_another_tenants_calls_as_fast_as_alone() {
    let server = TestServer::start().await;
    let acme = server.create_tenant("acme").await;
    let admin = server.admin(&acme.id, "alice").await;
    let (_, _, agent) = server.create_agent(&acme.id, "bot").await;
    // Tokens that live 0 s: every exchange refreshes.
    let clock: Arc<dyn Clock> = server.clock.clone();
    let provider = FakeProvider::start(ProviderOptions {
        access_ttl_seconds: 0,
        clock: Some(clock),
        ..ProviderOptions::default()
    })
    .await;
    let registered = register(&admin, "mail", &provider).await;
    allow_own_exchanges(&admin, &acme.id).await;
    let mut connection_ids = Vec::new();
    for _ in 0..SLOW_EXCHANGES {
        connection_ids.push(connect(&admin, &registered.id).await.id);
    }
    let bystander = Bystander::start(&server).await;

    let mut alone = Vec::new();
    for _ in 0..ALONE_ROUNDS {
        alone.extend(bystander.round().await.expect("the bystander alone"));
    }

    // The attack: a tenant admin's provider answers after 2.5 s, and 32
    // exchanges refresh at once (one per connection, so no single flight
    // folds them into one).
    provider.set_delay(PROVIDER_DELAY);
    let before = provider.refreshes();
    let barrier = Arc::new(Barrier::new(SLOW_EXCHANGES));
    let exchanges: Vec<_> = connection_ids
        .iter()
        .map(|id| {
            let (agent, id, barrier) = (agent.clone(), id.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                let started = Instant::now();
                let answer = agent.exchange(&id, &[]).await;
                (answer, started.elapsed())
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut during = Vec::new();
    let mut failures = Vec::new();
    let mut rounds = 0;
    while rounds < 3 || exchanges.iter().any(|task| !task.is_finished()) {
        rounds += 1;
        match bystander.round().await {
            Ok(times) => during.extend(times),
            Err(failure) => failures.push(failure),
        }
    }
    let mut slow = Vec::new();
    let mut refused = Vec::new();
    for task in exchanges {
        let (answer, took) = task.await.expect("exchange task");
        match answer {
            Ok(_) => slow.push(took),
            Err(err) => refused.push(format!("{err:?}")),
        }
    }

    println!(
        "bystander alone: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} calls)",
        millis(quantile(&mut alone, 0.50)),
        millis(quantile(&mut alone, 0.99)),
        millis(quantile(&mut alone, 1.0)),
        alone.len()
    );
    println!(
        "bystander during {SLOW_EXCHANGES} slow exchanges: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} calls, {} failed)",
        millis(quantile(&mut during, 0.50)),
        millis(quantile(&mut during, 0.99)),
        millis(quantile(&mut during, 1.0)),
        during.len(),
        failures.len()
    );
    println!(
        "slow exchanges: p50 {:.0} ms, max {:.0} ms ({} answered, {} refused)",
        millis(quantile(&mut slow, 0.50)),
        millis(quantile(&mut slow, 1.0)),
        slow.len(),
        refused.len()
    );
    assert!(
        failures.is_empty(),
        "another tenant's calls failed while the slow provider was called: {failures:?}"
    );
    let worst = quantile(&mut during, 1.0);
    assert!(
        worst < ACQUIRE_TIMEOUT / 2,
        "another tenant's call waited {worst:?} (the acquire timeout is {ACQUIRE_TIMEOUT:?})"
    );
    assert!(refused.is_empty(), "slow exchanges refused: {refused:?}");
    assert_eq!(
        provider.refreshes(),
        before + SLOW_EXCHANGES,
        "one refresh per connection"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_only_two_replicas_share_one_refresh_and_a_rotating_provider_never_sees_a_token_twice()
 {
    require_backend(Backend::Postgres);
    let a = TestServer::start().await;
    let b = TestServer::start_replica_of(&a).await;
    let acme = a.create_tenant("acme").await;
    let admin = a.admin(&acme.id, "alice").await;
    let (bot, secret, agent_a) = a.create_agent(&acme.id, "bot").await;
    let agent_b = b
        .anonymous()
        .await
        .with_client_credentials(bot.id.clone(), secret);
    let provider = crate::vault_connections::fake_provider(
        &a,
        ProviderOptions {
            rotate: true,
            ..ProviderOptions::default()
        },
    )
    .await;
    let registered = register(&admin, "mail", &provider).await;
    allow_own_exchanges(&admin, &acme.id).await;
    let connection_id = connect(&admin, &registered.id).await.id;
    agent_a.exchange(&connection_id, &[]).await.expect("first");
    provider.set_delay(Duration::from_millis(300));

    for round in 0..3 {
        expire_access_tokens(&a, &agent_a).await;
        agent_b.invalidate_token().await;
        let before = provider.refreshes();
        let barrier = Arc::new(Barrier::new(16));
        let calls: Vec<_> = (0..16)
            .map(|n| {
                let agent = if n % 2 == 0 {
                    agent_a.clone()
                } else {
                    agent_b.clone()
                };
                let (id, barrier) = (connection_id.clone(), barrier.clone());
                tokio::spawn(async move {
                    barrier.wait().await;
                    agent.exchange(&id, &[]).await
                })
            })
            .collect();
        let mut tokens = HashSet::new();
        for call in calls {
            let answer = call
                .await
                .expect("task")
                .unwrap_or_else(|e| panic!("round {round}: {e:?}"));
            tokens.insert(answer.access_token);
        }
        assert_eq!(
            provider.refreshes(),
            before + 1,
            "round {round}: 16 exchanges through two replicas share one refresh"
        );
        assert_eq!(tokens.len(), 1, "round {round}: every caller got one token");
    }
    // Each refresh presented the refresh token the one before it issued.
    let presented = provider.presented_refresh_tokens();
    let issued = provider.issued_refresh_tokens();
    let distinct: HashSet<&String> = presented.iter().collect();
    assert_eq!(
        distinct.len(),
        presented.len(),
        "a refresh token presented twice"
    );
    assert_eq!(presented.len(), 3);
    assert_eq!(
        presented[..],
        issued[..3],
        "always the latest refresh token"
    );
    b.stop().await;
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_holders_refresh_lease_is_waited_out_then_taken_over() {
    let (fx, connection_id) = connected().await;
    let Registered { pair, provider, .. } = &fx;
    vaultguard_tests::parts!(pair => server, agent);
    agent.exchange(&connection_id, &[]).await.expect("cached");
    expire_access_tokens(server, agent).await;
    // A replica took the lease and died before storing anything.
    let now = server.clock.now_millis();
    connection::Entity::update_many()
        .col_expr(
            connection::Column::RefreshLeaseHolder,
            Expr::value(Some("a-replica-that-died".to_owned())),
        )
        .col_expr(
            connection::Column::RefreshLeaseExpiresAt,
            Expr::value(Some(now + 15_000)),
        )
        .filter(connection::Column::Id.eq(connection_id.clone()))
        .exec(&server.state.db)
        .await
        .expect("plant a lease");
    let before = provider.refreshes();
    let waiting = {
        let (agent, id) = (agent.clone(), connection_id.clone());
        tokio::spawn(async move { agent.exchange(&id, &[]).await })
    };
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(!waiting.is_finished(), "the caller waits for the lease");
    assert_eq!(provider.refreshes(), before, "nobody refreshes under it");

    // The lease lapses on the server's clock: the waiting caller refreshes.
    server.clock.advance(16_000);
    let answer = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("the caller took the lapsed lease")
        .expect("task")
        .expect("exchange");
    assert_working_token(provider, &answer, &SCOPES).await;
    assert_eq!(provider.refreshes(), before + 1);
    let row = connection::Entity::find_by_id(connection_id.clone())
        .one(&server.state.db)
        .await
        .expect("read")
        .expect("row");
    assert_eq!(
        (row.refresh_lease_holder, row.refresh_lease_expires_at),
        (None, None),
        "the store ended the lease"
    );
    fx.pair.server.stop().await;
}

// ---------------------------------------------------------------------------
// Item 6: tokens go only where they were issued.

#[tokio::test]
async fn a_moved_endpoint_never_receives_the_refresh_token_or_the_stored_client_secret() {
    let (fx, connection_id) = connected().await;
    let Registered {
        pair,
        provider,
        registered,
    } = &fx;
    vaultguard_tests::parts!(pair => server, acme, agent, acme_admin: admin);
    agent.exchange(&connection_id, &[]).await.expect("cached");
    let elsewhere = elsewhere().await;

    // The attack: the endpoints move to another server while the stored
    // client secret stays; then a refresh and a disconnection.
    let moved = update_provider(
        admin,
        pb::UpdateOAuthProviderRequest {
            token_url: elsewhere.token_url(),
            revocation_url: elsewhere.revocation_url(),
            ..unchanged(registered)
        },
    )
    .await;
    expire_access_tokens(server, agent).await;
    let admin = server.admin(&acme.id, "alice").await;
    let exchanged = agent.exchange(&connection_id, &[]).await;
    // (Checked before the disconnection revokes the grant it belongs to.)
    let works = match &exchanged {
        Ok(answer) => userinfo(provider, &answer.access_token).await == 200,
        Err(_) => false,
    };
    let deleted = delete_connection(&admin, &connection_id).await;

    assert_sent_nothing(&elsewhere, provider);
    // The stored secret is bound to the endpoints it was registered for:
    // moving them needs it again, so nothing moved.
    expect_invalid(moved, "client_secret");
    assert!(
        works,
        "the refresh went to the provider that issued the token: {exchanged:?}"
    );
    assert!(deleted.expect("deleted").revoked_at_provider);
    assert_eq!(provider.revocations(), 1, "revoked where it was issued");
    fx.pair.server.stop().await;
}

#[tokio::test]
async fn moving_the_endpoints_discards_the_tokens_they_did_not_issue() {
    let (fx, first) = connected().await;
    let Registered {
        pair,
        provider,
        registered,
    } = &fx;
    vaultguard_tests::parts!(pair => server, acme, agent, acme_admin: admin);
    let second = connect(admin, &registered.id).await.id;
    agent.exchange(&first, &[]).await.expect("cached");
    // A flow started before the change, finished after it.
    let pending = start(admin, &registered.id).await;
    let code_exchanges = provider.code_exchanges();
    let elsewhere = elsewhere().await;

    // The admin moves both endpoints and gives the new server's secret.
    update_provider(
        admin,
        pb::UpdateOAuthProviderRequest {
            token_url: elsewhere.token_url(),
            revocation_url: elsewhere.revocation_url(),
            client_id: elsewhere.client_id().to_owned(),
            client_secret: ELSEWHERE_SECRET.to_owned(),
            ..unchanged(registered)
        },
    )
    .await
    .expect("moved with a new secret");
    let exchanged = agent.exchange(&first, &[]).await;
    let deleted = delete_connection(admin, &second).await.expect("deleted");
    let (finished, _) = crate::vault_connections::hop(
        &crate::vault_connections::provider_redirect(server, &pending.authorize_url).await,
    )
    .await;

    assert_sent_nothing(&elsewhere, provider);
    assert_eq!(
        provider.code_exchanges(),
        code_exchanges,
        "the pending flow's code went nowhere"
    );
    assert_eq!(finished, 400, "the pending flow is refused at the callback");
    assert!(!deleted.revoked_at_provider, "nothing left to revoke");
    expect_reason(exchanged, Code::FailedPrecondition, Reason::NeedsReauth);
    let reauth = get_connection(admin, &first).await.expect("get");
    assert_eq!(reauth.status(), Status::NeedsReauth);
    assert!(
        reauth.status_reason.contains("endpoint"),
        "{}",
        reauth.status_reason
    );
    assert_eq!(
        server
            .audit_count(&acme.id, "connection.needs_reauth", &first)
            .await,
        1
    );
    let row = connection::Entity::find_by_id(first.clone())
        .one(&server.state.db)
        .await
        .expect("read")
        .expect("row");
    assert!(
        row.refresh_token_ciphertext.is_none() && row.access_token_ciphertext.is_none(),
        "the sealed tokens are erased"
    );
    fx.pair.server.stop().await;
}

// ---------------------------------------------------------------------------
// Item 12: the callback page and the return URL.

/// GETs VaultGuard's callback with `pairs` as its query, following nothing.
async fn callback(server: &TestServer, pairs: &[(&str, &str)]) -> reqwest::Response {
    let mut url = url::Url::parse(&callback_url(server)).expect("callback URL");
    url.query_pairs_mut().extend_pairs(pairs);
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("http client")
        .get(url.as_str())
        .send()
        .await
        .expect("GET the callback")
}

#[tokio::test]
async fn the_callback_page_escapes_what_the_provider_sent() {
    let fx = registered(false).await;
    let (server, admin) = (&fx.pair.server, &fx.pair.acme_admin);
    let started = start(admin, &fx.registered.id).await;
    let state = query(&started.authorize_url)["state"].clone();
    let script = "<script>alert(document.cookie)</script>";
    let response = callback(
        server,
        &[
            ("state", &state),
            ("error", &format!("{script}\"'&")),
            ("error_description", "<img src=x onerror=alert(1)>"),
        ],
    )
    .await;
    assert_eq!(response.status(), 200);
    let headers = response.headers().clone();
    let body = response.text().await.expect("body");
    assert!(!body.contains("<script"), "unescaped: {body}");
    assert!(!body.contains("<img"), "unescaped: {body}");
    assert!(
        body.contains("&lt;script&gt;alert(document.cookie)&lt;/script&gt;&quot;&#x27;&amp;"),
        "the error is shown, escaped: {body}"
    );
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    assert!(header("content-type").starts_with("text/html"));
    assert!(header("content-security-policy").contains("default-src 'none'"));
    assert!(header("content-security-policy").contains("frame-ancestors 'none'"));
    assert_eq!(header("x-content-type-options"), "nosniff");
    assert_eq!(header("cache-control"), "no-store");
    assert_eq!(header("referrer-policy"), "no-referrer");
    assert_eq!(header("x-frame-options"), "DENY");
    fx.pair.server.stop().await;
}

/// StartConnection with `return_url`, as `admin`.
async fn start_returning_to(
    admin: &VaultGuardClient,
    provider_id: &str,
    return_url: &str,
) -> Result<pb::StartConnectionResponse, vaultguard_client::ClientError> {
    start_connection(
        admin,
        pb::StartConnectionRequest {
            provider_id: provider_id.to_owned(),
            return_url: return_url.to_owned(),
            ..Default::default()
        },
    )
    .await
}

#[tokio::test]
async fn a_return_url_off_the_tenants_registered_origins_is_refused() {
    let fx = registered(false).await;
    let (server, acme) = (&fx.pair.server, &fx.pair.acme);
    let (admin, provider_id) = (&fx.pair.acme_admin, fx.registered.id.as_str());
    // Nothing registered: no return URL at all.
    for hostile in [
        "https://attacker.example/steal",
        "http://localhost.attacker.example/x",
        "http://localhost/admin",
    ] {
        expect_invalid(
            start_returning_to(admin, provider_id, hostile).await,
            "return_url",
        );
    }

    // The admin registers the console's origins (normalised on the way in).
    let settings = set_return_origins(
        admin,
        &["https://Console.Acme.example:443/", "http://localhost:8443"],
    )
    .await
    .expect("register the origins");
    assert_eq!(
        settings.return_origins,
        ["https://console.acme.example", "http://localhost:8443"]
    );
    assert!(settings.update_actor.is_some() && settings.update_time.is_some());
    assert_eq!(
        server
            .audit_count(&acme.id, "vault.settings_updated", &acme.id)
            .await,
        1
    );
    let read = get_vault_settings(admin).await.expect("read them back");
    assert_eq!(read.return_origins, settings.return_origins);

    // Anything but exactly those origins is refused, naming return_url.
    for hostile in [
        "https://attacker.example/steal",
        "https://console.acme.example.attacker.example/done",
        "https://attacker.example/?r=https://console.acme.example",
        "https://console.acme.example@attacker.example/done",
        "https://attacker.example\\@console.acme.example/done",
        "https://console.acme.example:8443/done",
        "http://console.acme.example/done",
        "https://localhost:8443/done",
        "http://localhost/done",
        "https://console.acme.example/done#fragment",
        "javascript:alert(1)//console.acme.example",
    ] {
        expect_invalid(
            start_returning_to(admin, provider_id, hostile).await,
            "return_url",
        );
    }

    // A registered one works end to end: the callback sends the browser
    // there with the outcome.
    let started = start_returning_to(
        admin,
        provider_id,
        "https://CONSOLE.acme.example/done?tab=1",
    )
    .await
    .expect("a return URL on a registered origin");
    let id = started.connection.expect("connection").id;
    let redirect =
        crate::vault_connections::provider_redirect(server, &started.authorize_url).await;
    let (status, location) = crate::vault_connections::hop(&redirect).await;
    assert_eq!(status, 303);
    let location = location.expect("Location");
    assert!(
        location.starts_with("https://console.acme.example/done?tab=1&"),
        "{location}"
    );
    let back = query(&location);
    assert_eq!(back.get("connection_id"), Some(&id));
    assert_eq!(back.get("status").map(String::as_str), Some("connected"));

    // An origin removed after a flow started is not redirected to: the
    // callback shows VaultGuard's own page.
    let started = start_returning_to(admin, provider_id, "http://localhost:8443/cb")
        .await
        .expect("the second origin");
    set_return_origins(admin, &["https://console.acme.example"])
        .await
        .expect("drop the second origin");
    let redirect =
        crate::vault_connections::provider_redirect(server, &started.authorize_url).await;
    let (status, location) = crate::vault_connections::hop(&redirect).await;
    assert_eq!(
        (status, location),
        (200, None),
        "no redirect off the origins"
    );

    // Bad origins are refused naming the entry, and change nothing.
    for (bad, field) in [
        ("https://console.acme.example/path", "return_origins[1]"),
        ("https://*.acme.example", "return_origins[1]"),
        ("ftp://console.acme.example", "return_origins[1]"),
        ("https://user@console.acme.example", "return_origins[1]"),
        ("https://console.acme.example:443", "return_origins[1]"),
    ] {
        expect_invalid(
            set_return_origins(admin, &["https://console.acme.example", bad]).await,
            field,
        );
    }
    let too_many: Vec<String> = (0..33)
        .map(|n| format!("https://c{n}.acme.example"))
        .collect();
    let refs: Vec<&str> = too_many.iter().map(String::as_str).collect();
    expect_invalid(set_return_origins(admin, &refs).await, "return_origins");
    assert_eq!(
        get_vault_settings(admin).await.unwrap().return_origins,
        ["https://console.acme.example"]
    );
    // Only admins read or change them.
    expect_reason(
        get_vault_settings(&fx.pair.agent).await,
        Code::PermissionDenied,
        Reason::RoleRequired,
    );
    expect_reason(
        set_return_origins(&fx.pair.agent, &["https://attacker.example"]).await,
        Code::PermissionDenied,
        Reason::RoleRequired,
    );
    fx.pair.server.stop().await;
}

/// GetVaultSettings as `client`.
async fn get_vault_settings(
    client: &VaultGuardClient,
) -> Result<pb::VaultSettings, vaultguard_client::ClientError> {
    let response = client
        .get_vault_settings(pb::GetVaultSettingsRequest {})
        .await?;
    Ok(response.settings.expect("settings"))
}
