//! The outbound address policy (issue 23, item 9): provider endpoints,
//! webhook URLs and trusted issuers (their discovery and `jwks_uri`) never
//! reach loopback, private, link-local or metadata addresses, whether named
//! by an IP literal or by a name that resolves there, at registration or
//! later (DNS rebinding).
//!
//! Every other test server allows 127.0.0.0/8 and ::1 (its third parties
//! listen there); these start WITHOUT that allowance (`outbound_strict`),
//! as a production server runs, with real third parties on 127.0.0.1 that
//! count what reaches them. Names are answered by the test's own DNS
//! ([`TestDns`], injected as the server's name lookup), so a name can
//! resolve to a public address when it is registered and to 127.0.0.1 when
//! it is used.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tonic::Code;
use vaultguard_client::{ClientError, DelegationOutcome, pb};
use vaultguard_server::clock::{Clock, OffsetClock};
use vaultguard_server::config::{Config, TrustedIssuer};
use vaultguard_server::outbound::{LookupFuture, NameLookup};
use vaultguard_tests::oauth_provider::{FakeProvider, ProviderOptions};
use vaultguard_tests::{TestOptions, TestServer, captured_logs, expect_code, expect_invalid};

use crate::delegations::ask;
use crate::policies::{add_rule, inbound};
use vaultguard_tests::Rpc;
use vaultguard_tests::calls::create_provider;
use vaultguard_tests::calls::{set_webhook, webhook};

/// A public address a name points at while it is registered (never
/// connected to: nothing is delivered before the name is rebound).
const PUBLIC: &str = "93.184.215.14";

// ---------------------------------------------------------------------------
// The test's DNS and a counting third party.

/// Names the test answers for; any other name does not resolve.
#[derive(Debug, Default)]
struct TestDns {
    names: Mutex<HashMap<String, Vec<IpAddr>>>,
}

impl TestDns {
    /// `name` resolves to `addresses` from now on.
    fn point(&self, name: &str, addresses: &[&str]) {
        let addresses = addresses.iter().map(|a| a.parse().expect("IP")).collect();
        self.names
            .lock()
            .unwrap()
            .insert(name.to_owned(), addresses);
    }
}

impl NameLookup for TestDns {
    fn lookup(&self, host: &str) -> LookupFuture {
        let found = self.names.lock().unwrap().get(host).cloned();
        Box::pin(async move {
            found.ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no such name"))
        })
    }
}

/// A third party on 127.0.0.1 that answers 200 `{}` to anything and counts
/// the requests that reach it.
struct Counter {
    port: u16,
    hits: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Counter {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let hits = Arc::new(AtomicUsize::new(0));
        let counted = hits.clone();
        let router = Router::new().fallback(move || {
            let counted = counted.clone();
            async move {
                counted.fetch_add(1, Ordering::SeqCst);
                axum::Json(json!({}))
            }
        });
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Self { port, hits, task }
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

impl Drop for Counter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------
// Calls.

fn provider_registration(token_url: &str, revocation_url: &str) -> pb::CreateOAuthProviderRequest {
    pb::CreateOAuthProviderRequest {
        name: "mail".to_owned(),
        authorize_url: "https://accounts.example.com/authorize".to_owned(),
        token_url: token_url.to_owned(),
        revocation_url: revocation_url.to_owned(),
        client_id: "vaultguard".to_owned(),
        client_secret: "provider-secret".to_owned(),
        scopes: vec!["mail.read".to_owned()],
        extra_authorize_params: HashMap::new(),
    }
}

/// A JWT-shaped bearer claiming issuer `iss` with a `kid` no cache holds
/// (verifying it needs the issuer's keys first; its signature is junk).
fn token_of(iss: &str) -> String {
    let part = |value: serde_json::Value| URL_SAFE_NO_PAD.encode(value.to_string());
    format!(
        "{}.{}.{}",
        part(json!({"alg": "RS256", "typ": "JWT", "kid": "key-1"})),
        part(json!({"iss": iss, "aud": "vaultguard", "sub": "alice", "exp": 4_102_444_800_i64})),
        URL_SAFE_NO_PAD.encode([7u8; 256])
    )
}

async fn who_am_i(server: &TestServer, token: &str) -> Result<pb::WhoAmIResponse, ClientError> {
    let client = server.with_bearer(token).await;
    client.raw_who_am_i(pb::WhoAmIRequest {}).await
}

// ---------------------------------------------------------------------------
// Registration.

#[tokio::test]
async fn internal_outbound_urls_are_refused_at_registration_without_the_allowance() {
    let server = TestServer::start_with(TestOptions {
        outbound_strict: true,
        ..TestOptions::default()
    })
    .await;
    let acme = server.create_tenant("acme").await;
    let admin = server.admin(&acme.id, "alice").await;
    let third_party = Counter::start().await;
    let port = third_party.port;

    // IP literals in every spelling the URL parser reads as one, and a name
    // the system resolver answers with loopback.
    let internal = [
        format!("http://127.0.0.1:{port}/hooks"),
        format!("http://localhost:{port}/hooks"),
        format!("http://[::1]:{port}/hooks"),
        format!("http://[::ffff:127.0.0.1]:{port}/hooks"),
        format!("http://2130706433:{port}/hooks"),
        format!("http://0x7f.1:{port}/hooks"),
        "http://0.0.0.0/hooks".to_owned(),
        "http://169.254.169.254/latest/meta-data/".to_owned(),
        "http://[::ffff:a9fe:a9fe]/latest/meta-data/".to_owned(),
        "http://10.0.0.8/hooks".to_owned(),
        "http://172.20.1.1/hooks".to_owned(),
        "http://192.168.1.10/hooks".to_owned(),
        "http://100.64.0.1/hooks".to_owned(),
        "http://[fd00::1]/hooks".to_owned(),
        "http://[fe80::1]/hooks".to_owned(),
        "http://[64:ff9b::7f00:1]/hooks".to_owned(),
        "http://[2002:7f00:1::1]/hooks".to_owned(),
        "http://224.0.0.1/hooks".to_owned(),
        "http://198.51.100.7/hooks".to_owned(),
    ];
    for url in &internal {
        expect_invalid(set_webhook(&admin, url).await, "url");
        expect_invalid(
            create_provider(&admin, provider_registration(url, "")).await,
            "token_url",
        );
        expect_invalid(
            create_provider(
                &admin,
                provider_registration("https://accounts.example.com/token", url),
            )
            .await,
            "revocation_url",
        );
    }
    assert_eq!(server.count("tenant_webhooks").await, 0);
    assert_eq!(server.count("oauth_providers").await, 0);

    // A public address is fine (nothing is sent at registration).
    set_webhook(&admin, &format!("https://{PUBLIC}/hooks"))
        .await
        .expect("a public webhook URL");
    create_provider(
        &admin,
        provider_registration(
            &format!("https://{PUBLIC}/token"),
            &format!("https://{PUBLIC}/revoke"),
        ),
    )
    .await
    .expect("public provider endpoints");
    assert_eq!(third_party.hits(), 0, "nothing reached the loopback party");
    server.stop().await;

    // A trusted issuer on loopback is a configuration error at startup,
    // naming the entry.
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        data_dir: dir.path().to_path_buf(),
        trusted_issuers: vec![TrustedIssuer {
            issuer: format!("http://127.0.0.1:{port}"),
            audience: "vaultguard".to_owned(),
            tenant_claim: "org_id".to_owned(),
            roles_claim: "roles".to_owned(),
            role_prefix: String::new(),
            ..Default::default()
        }],
        ..Config::default()
    };
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let clock: Arc<dyn Clock> = OffsetClock::new();
    let started = tokio::time::timeout(
        Duration::from_secs(30),
        vaultguard_server::server::serve(config, clock, grpc, http, std::future::pending()),
    )
    .await
    .expect("the server refuses to start instead of serving");
    let err = started
        .expect_err("a loopback issuer is refused")
        .to_string();
    assert!(
        err.contains("trusted_issuers[0].issuer") && err.contains("outbound"),
        "{err}"
    );
    assert_eq!(third_party.hits(), 0);
}

// ---------------------------------------------------------------------------
// Connection time.

#[tokio::test]
async fn a_name_rebound_to_loopback_is_refused_at_connection_time() {
    let dns = Arc::new(TestDns::default());
    let receiver = Counter::start().await;
    let idp = Counter::start().await;
    let provider = FakeProvider::start(ProviderOptions::default()).await;
    let hooks_name = "hooks.rebind.test";
    let idp_name = "idp.rebind.test";
    let oauth_name = "oauth.rebind.test";
    let idp_url = format!("http://{idp_name}:{}", idp.port);
    let server = TestServer::start_with(TestOptions {
        outbound_strict: true,
        outbound_lookup: Some(dns.clone()),
        ..TestOptions::trusting(&idp_url)
    })
    .await;
    let acme = server.create_tenant("acme").await;
    let globex = server.create_tenant("globex").await;
    let acme_admin = server.admin(&acme.id, "alice").await;
    let globex_admin = server.admin(&globex.id, "gina").await;
    let (_, _, agent) = server.create_agent(&acme.id, "bot").await;
    add_rule(&globex_admin, inbound("pay.*", pb::Effect::StepUp)).await;

    // Registered while the names resolve to a public address: accepted.
    for name in [hooks_name, idp_name, oauth_name] {
        dns.point(name, &[PUBLIC]);
    }
    let hook_url = format!("http://{hooks_name}:{}/hooks", receiver.port);
    set_webhook(&globex_admin, &hook_url)
        .await
        .expect("the webhook, while its name is public");
    let token_url = provider.token_url().replacen("127.0.0.1", oauth_name, 1);
    let mut registration = provider_registration(&token_url, "");
    registration.authorize_url = provider.authorize_url();
    registration.client_id = provider.client_id().to_owned();
    registration.client_secret = provider.client_secret().unwrap_or_default().to_owned();
    let registered = create_provider(&acme_admin, registration)
        .await
        .expect("the provider, while its name is public");

    // A name resolving to loopback at once is refused at registration.
    dns.point("loopback.rebind.test", &["127.0.0.1"]);
    expect_invalid(
        set_webhook(&acme_admin, "http://loopback.rebind.test/hooks").await,
        "url",
    );

    // The names rebind to 127.0.0.1, where the real third parties listen.
    for name in [hooks_name, idp_name, oauth_name] {
        dns.point(name, &["127.0.0.1"]);
    }

    // The webhook delivery is refused at connection time.
    let Ok(DelegationOutcome::StepUp { .. }) = agent
        .request_delegation(ask(&globex.id, "pay.invoice"))
        .await
    else {
        panic!("expected a step-up");
    };
    let mut shown = webhook(&globex_admin).await;
    for _ in 0..100 {
        if !shown.last_failure_reason.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        shown = webhook(&globex_admin).await;
    }
    assert_eq!(shown.last_failure_reason, "forbidden address");
    assert!(shown.last_success_time.is_none());

    // The issuer's discovery is refused: the token is UNAUTHENTICATED.
    let err = expect_code(
        who_am_i(&server, &token_of(&idp_url)).await,
        Code::Unauthenticated,
    );
    assert_eq!(err.reason(), Some(pb::ErrorReason::Unauthenticated));

    // The provider's token endpoint is refused: the callback's code
    // exchange never reaches it, and the connection is not connected.
    let started = acme_admin
        .start_connection(pb::StartConnectionRequest {
            provider_id: registered.id.clone(),
            ..Default::default()
        })
        .await
        .expect("start connection");
    reqwest::get(&started.authorize_url)
        .await
        .expect("the browser's round trip");
    let connection_id = started.connection.expect("connection").id;
    let failures = server
        .audit_count(&acme.id, "connection.failed", &connection_id)
        .await;
    assert_eq!(failures, 1, "the code exchange failed");

    assert_eq!(receiver.hits(), 0, "the webhook reached loopback");
    assert_eq!(idp.hits(), 0, "the issuer's discovery reached loopback");
    assert_eq!(
        provider.code_exchanges(),
        0,
        "the token endpoint was called"
    );
    assert!(captured_logs().contains("refused by the address policy"));
    server.stop().await;
}

#[tokio::test]
async fn only_permitted_addresses_of_a_name_are_connected_to() {
    // The allowance of the harness (127.0.0.0/8) and a name that resolves
    // to the metadata address and a private one first: the connection goes
    // to the permitted address, without trying the others.
    let dns = Arc::new(TestDns::default());
    let receiver = Counter::start().await;
    let server = TestServer::start_with(TestOptions {
        outbound_lookup: Some(dns.clone()),
        ..TestOptions::default()
    })
    .await;
    let acme = server.create_tenant("acme").await;
    let globex = server.create_tenant("globex").await;
    let globex_admin = server.admin(&globex.id, "gina").await;
    let (_, _, agent) = server.create_agent(&acme.id, "bot").await;
    add_rule(&globex_admin, inbound("pay.*", pb::Effect::StepUp)).await;
    dns.point("hooks.mixed.test", &[PUBLIC]);
    set_webhook(
        &globex_admin,
        &format!("http://hooks.mixed.test:{}/hooks", receiver.port),
    )
    .await
    .expect("set webhook");
    dns.point(
        "hooks.mixed.test",
        &["169.254.169.254", "10.0.0.8", "127.0.0.1"],
    );

    let Ok(DelegationOutcome::StepUp { .. }) = agent
        .request_delegation(ask(&globex.id, "pay.invoice"))
        .await
    else {
        panic!("expected a step-up");
    };
    let started = std::time::Instant::now();
    while receiver.hits() == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "the notice did not reach the permitted address in time"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let shown = webhook(&globex_admin).await;
    assert_eq!(shown.last_failure_reason, "");
    assert!(captured_logs().contains("169.254.169.254"));
    server.stop().await;
}
