//! Transport security: both listeners over TLS, and agents authenticated by
//! client certificates (mTLS). Every CA, server and client certificate is
//! generated here with rcgen; the server reads them from PEM files as in
//! production.

use std::path::PathBuf;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use tonic::Code;
use vaultguard_client::{DelegationOutcome, TlsOptions, VaultGuardClient, pb};
use vaultguard_tests::{
    TestOptions, TestServer, TestTls, expect_code, expect_reason, next_status, watch_step_up,
};

use crate::delegations::{ask, set_suspended};
use crate::policies::{add_rule, inbound};
use vaultguard_tests::Rpc;

/// A certificate authority of the test.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("ca key");
        Self {
            issuer: CertifiedIssuer::self_signed(params, key).expect("self-signed ca"),
        }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A certificate and key (PEM) with `sans`, for `usage`.
    fn leaf(&self, name: &str, sans: Vec<SanType>, usage: ExtendedKeyUsagePurpose) -> Pair {
        self.leaf_with(name, sans, usage, |_| {})
    }

    /// [`Ca::leaf`], with `adjust` applied to its parameters.
    fn leaf_with(
        &self,
        name: &str,
        sans: Vec<SanType>,
        usage: ExtendedKeyUsagePurpose,
        adjust: impl FnOnce(&mut CertificateParams),
    ) -> Pair {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("leaf params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.subject_alt_names = sans;
        params.extended_key_usages = vec![usage];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        adjust(&mut params);
        let key = KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign leaf");
        Pair {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }

    /// The server certificate for 127.0.0.1 and localhost.
    fn server(&self) -> Pair {
        self.leaf(
            "vaultguard test server",
            vec![
                SanType::IpAddress([127, 0, 0, 1].into()),
                SanType::DnsName("localhost".try_into().expect("dns name")),
            ],
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    /// A client certificate naming each of `agent_ids` by its agent URI.
    fn agent(&self, agent_ids: &[&str]) -> Pair {
        let sans = agent_ids
            .iter()
            .map(|id| {
                SanType::URI(
                    format!("urn:vaultguard:agent:{id}")
                        .try_into()
                        .expect("uri"),
                )
            })
            .collect();
        self.leaf("agent", sans, ExtendedKeyUsagePurpose::ClientAuth)
    }

    /// A client certificate that names no agent (an operator's workstation).
    fn plain_client(&self) -> Pair {
        self.leaf(
            "ops workstation",
            vec![SanType::URI(
                "https://ops.example/workstation".try_into().expect("uri"),
            )],
            ExtendedKeyUsagePurpose::ClientAuth,
        )
    }
}

/// A certificate and its private key, PEM.
struct Pair {
    cert: String,
    key: String,
}

/// A TLS server and the PKI it trusts.
struct Tls {
    server: TestServer,
    ca: Ca,
    _dir: tempfile::TempDir,
}

/// How the test server verifies client certificates.
enum Mtls {
    Off,
    Optional,
    /// Required; the harness's own clients present a certificate that names
    /// no agent, so their bearers decide who they are.
    Required,
}

/// A TLS server with a fresh CA that signed its certificate and, with mTLS,
/// the client certificates it accepts.
async fn start(mtls: Mtls) -> Tls {
    let ca = Ca::new("VaultGuard Test CA");
    let dir = tempfile::tempdir().expect("temp dir");
    let write = |name: &str, text: &str| -> PathBuf {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write pem");
        path
    };
    let server_pair = ca.server();
    let cert_file = write("server.pem", &server_pair.cert);
    let key_file = write("server.key", &server_pair.key);
    let ca_file = write("ca.pem", &ca.pem());
    let mut client = TlsOptions::new(ca.pem());
    let (client_ca_file, client_auth) = match mtls {
        Mtls::Off => (None, "optional"),
        Mtls::Optional => (Some(ca_file), "optional"),
        Mtls::Required => {
            let ops = ca.plain_client();
            client = client.with_identity(ops.cert, ops.key);
            (Some(ca_file), "required")
        }
    };
    let server = TestServer::start_with(TestOptions {
        tls: Some(TestTls {
            cert_file,
            key_file,
            client_ca_file,
            client_auth: client_auth.to_owned(),
            client,
        }),
        ..TestOptions::default()
    })
    .await;
    Tls {
        server,
        ca,
        _dir: dir,
    }
}

impl Tls {
    /// A client over TLS presenting `pair` as its certificate.
    async fn with_certificate(&self, pair: &Pair) -> VaultGuardClient {
        VaultGuardClient::connect_tls(
            self.server.grpc_url(),
            TlsOptions::new(self.ca.pem()).with_identity(pair.cert.clone(), pair.key.clone()),
        )
        .await
        .expect("connect with a client certificate")
    }
}

/// Asserts that a gRPC call with `tls` to `url` fails at the transport: the
/// connection is refused, or its first call fails without any answer of
/// VaultGuard's.
async fn assert_transport_refused(url: String, tls: TlsOptions) {
    let Ok(client) = VaultGuardClient::connect_tls(url, tls).await else {
        return;
    };
    let result = client.issuer_keys().get_jwks(pb::GetJwksRequest {}).await;
    let status = result.expect_err("the call went through");
    assert!(
        matches!(status.code(), Code::Unavailable | Code::Unknown),
        "not a transport failure: {status:?}"
    );
}

/// An agent of a new tenant whose inbound rules allow `stock.*` to anyone.
async fn tenant_with_agent(server: &TestServer, slug: &str) -> (pb::Tenant, pb::Agent) {
    let tenant = server.create_tenant(slug).await;
    let admin = server.admin(&tenant.id, "admin@test").await;
    add_rule(&admin, inbound("stock.*", pb::Effect::Allow)).await;
    let (agent, _, _) = server.create_agent(&tenant.id, "bot").await;
    (tenant, agent)
}

#[tokio::test]
async fn tls_client_trusting_the_ca_authenticates_with_a_bearer() {
    let tls = start(Mtls::Off).await;
    let server = &tls.server;
    assert!(server.grpc_url().starts_with("https://"));

    // The harness's own clients (operator, admin, agent) go over TLS.
    let tenant = server.create_tenant("acme").await;
    let (agent, _, agent_client) = server.create_agent(&tenant.id, "bot").await;
    let me = agent_client.who_am_i().await.expect("who am i over tls");
    let actor = me.actor.expect("actor");
    assert_eq!(actor.subject, agent.id);
    assert_eq!(actor.tenant_id, tenant.id);
    // With TLS on, the default issuer is the HTTP listener's https URL.
    assert_eq!(me.issuer, format!("https://{}", server.http_addr));

    let anonymous = server.anonymous().await;
    expect_code(
        anonymous.auth().who_am_i(pb::WhoAmIRequest {}).await,
        Code::Unauthenticated,
    );
    tls.server.stop().await;
}

#[tokio::test]
async fn plaintext_and_untrusting_clients_cannot_talk_to_the_tls_listener() {
    let tls = start(Mtls::Off).await;
    let server = &tls.server;

    // Plaintext HTTP/2 to the TLS listener.
    match VaultGuardClient::connect(format!("http://{}", server.grpc_addr)).await {
        Err(_) => {}
        Ok(client) => {
            let status = client
                .issuer_keys()
                .get_jwks(pb::GetJwksRequest {})
                .await
                .expect_err("a plaintext call was answered");
            assert!(
                matches!(
                    status.code(),
                    Code::Unavailable | Code::Unknown | Code::Internal
                ),
                "not a transport failure: {status:?}"
            );
        }
    }

    // A client trusting another CA, and one checking another name.
    let stranger = Ca::new("Some Other CA");
    assert_transport_refused(server.grpc_url(), TlsOptions::new(stranger.pem())).await;
    assert_transport_refused(
        server.grpc_url(),
        TlsOptions::new(tls.ca.pem()).with_domain_name("vaultguard.example"),
    )
    .await;

    // The same listener still answers a client that trusts the CA.
    let trusting = server.anonymous().await;
    trusting
        .issuer_keys()
        .get_jwks(pb::GetJwksRequest {})
        .await
        .expect("a trusting client is answered");
    tls.server.stop().await;
}

#[tokio::test]
async fn http_listener_serves_jwks_and_discovery_over_https_only() {
    let tls = start(Mtls::Off).await;
    let server = &tls.server;
    let trusting = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(tls.ca.pem().as_bytes()).expect("ca")])
        .build()
        .expect("https client");

    let jwks: serde_json::Value = trusting
        .get(format!("{}/.well-known/jwks.json", server.http_url()))
        .send()
        .await
        .expect("jwks over https")
        .error_for_status()
        .expect("jwks status")
        .json()
        .await
        .expect("jwks json");
    let keys = jwks["keys"].as_array().expect("keys");
    assert!(!keys.is_empty(), "no keys published: {jwks}");

    let discovery: serde_json::Value = trusting
        .get(format!(
            "{}/.well-known/openid-configuration",
            server.http_url()
        ))
        .send()
        .await
        .expect("discovery over https")
        .json()
        .await
        .expect("discovery json");
    let issuer = format!("https://{}", server.http_addr);
    assert_eq!(discovery["issuer"], issuer.as_str());
    assert_eq!(
        discovery["jwks_uri"],
        format!("{issuer}/.well-known/jwks.json").as_str()
    );

    // Plain HTTP to the same port gets no answer.
    let plain = reqwest::Client::new()
        .get(format!("http://{}/.well-known/jwks.json", server.http_addr))
        .send()
        .await;
    assert!(plain.is_err(), "plaintext was answered: {plain:?}");

    // A client that does not trust the CA fails the handshake.
    let stranger = Ca::new("Some Other CA");
    let untrusting = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(stranger.pem().as_bytes()).expect("ca")])
        .build()
        .expect("https client");
    let refused = untrusting
        .get(format!("{}/.well-known/jwks.json", server.http_url()))
        .send()
        .await;
    assert!(
        refused.is_err(),
        "an untrusting client was answered: {refused:?}"
    );
    tls.server.stop().await;
}

#[tokio::test]
async fn mtls_agent_certificate_authenticates_without_a_bearer() {
    let tls = start(Mtls::Optional).await;
    let server = &tls.server;
    let (tenant, agent) = tenant_with_agent(server, "acme").await;
    let pair = tls.ca.agent(&[&agent.id]);
    let client = tls.with_certificate(&pair).await;

    let me = client.who_am_i().await.expect("who am i by certificate");
    let actor = me.actor.expect("actor");
    assert_eq!(actor.kind, pb::PrincipalKind::Agent as i32);
    assert_eq!(actor.subject, agent.id);
    assert_eq!(
        actor.tenant_id, tenant.id,
        "the tenant comes from the agent row"
    );
    assert_eq!(me.roles, vec![pb::Role::Agent as i32]);
    assert!(
        me.issuer.contains("VaultGuard Test CA"),
        "issuer is the certificate's: {}",
        me.issuer
    );

    let outcome = client
        .request_delegation(ask(&tenant.id, "stock.read"))
        .await
        .expect("request delegation by certificate");
    let DelegationOutcome::Allowed { grant, .. } = outcome else {
        panic!("not allowed: {outcome:?}")
    };
    let delegation = grant.delegation.expect("delegation");
    assert_eq!(delegation.requesting_agent_id, agent.id);
    assert_eq!(delegation.requesting_tenant_id, tenant.id);
    // The audit log records the agent, authenticated by its certificate.
    let issued = server
        .audit_events(&tenant.id, "delegation.token_issued")
        .await
        .into_iter()
        .find(|event| event.subject_ids.contains(&delegation.id))
        .expect("the token_issued event");
    assert_eq!(issued.actor_subject, agent.id);
    assert_eq!(issued.actor_tenant_id, tenant.id);

    // The same certificate with the agent's own bearer is accepted too.
    let both = tls
        .with_certificate(&pair)
        .await
        .with_bearer(client_token(server, &agent).await);
    let me = both.who_am_i().await.expect("certificate and own bearer");
    assert_eq!(me.actor.expect("actor").subject, agent.id);

    // Without a certificate the same listener still wants a bearer.
    expect_code(
        server
            .anonymous()
            .await
            .auth()
            .who_am_i(pb::WhoAmIRequest {})
            .await,
        Code::Unauthenticated,
    );
    tls.server.stop().await;
}

/// A fresh access token of `agent`, minted as IssueToken mints it.
async fn client_token(server: &TestServer, agent: &pb::Agent) -> String {
    vaultguard_server::domain::tokens::mint(
        &server.state,
        &agent.id,
        Some(&agent.tenant_id),
        &[pb::Role::Agent],
        Some(&agent.id),
        600,
    )
    .await
    .expect("mint agent token")
    .access_token
}

#[tokio::test]
async fn mtls_refuses_certificates_of_another_ca() {
    let tls = start(Mtls::Optional).await;
    let server = &tls.server;
    let (_, agent) = tenant_with_agent(server, "acme").await;
    let forger = Ca::new("VaultGuard Test CA");
    let forged = forger.agent(&[&agent.id]);
    assert_transport_refused(
        server.grpc_url(),
        TlsOptions::new(tls.ca.pem()).with_identity(forged.cert, forged.key),
    )
    .await;

    // The genuine certificate for the same agent works on the same server.
    let genuine = tls.with_certificate(&tls.ca.agent(&[&agent.id])).await;
    genuine.who_am_i().await.expect("genuine certificate");
    tls.server.stop().await;
}

#[tokio::test]
async fn mtls_refuses_unknown_disabled_and_ambiguous_certificates() {
    let tls = start(Mtls::Optional).await;
    let server = &tls.server;
    let (tenant, agent) = tenant_with_agent(server, "acme").await;
    let (_, other_agent) = tenant_with_agent(server, "globex").await;

    // An agent id that was never created.
    let unknown = format!("agt_{}", uuid::Uuid::now_v7().simple());
    let client = tls.with_certificate(&tls.ca.agent(&[&unknown])).await;
    expect_code(client.who_am_i().await, Code::Unauthenticated);

    // A malformed agent id.
    let client = tls.with_certificate(&tls.ca.agent(&["not-an-id"])).await;
    expect_code(client.who_am_i().await, Code::Unauthenticated);

    // A certificate naming two agents.
    let client = tls
        .with_certificate(&tls.ca.agent(&[&agent.id, &other_agent.id]))
        .await;
    expect_code(client.who_am_i().await, Code::Unauthenticated);

    // A certificate naming no agent, without a bearer.
    let client = tls.with_certificate(&tls.ca.plain_client()).await;
    expect_code(client.who_am_i().await, Code::Unauthenticated);

    // A disabled agent: refused as its bearer would be, until re-enabled.
    let pair = tls.ca.agent(&[&agent.id]);
    let client = tls.with_certificate(&pair).await;
    client.who_am_i().await.expect("enabled agent");
    let admin = server.admin(&tenant.id, "admin@test").await;
    admin
        .disable_agent(pb::DisableAgentRequest {
            agent_id: agent.id.clone(),
        })
        .await
        .expect("disable agent");
    expect_reason(
        client.who_am_i().await,
        Code::PermissionDenied,
        pb::ErrorReason::AgentDisabled,
    );
    expect_reason(
        client
            .request_delegation(ask(&tenant.id, "stock.read"))
            .await,
        Code::PermissionDenied,
        pb::ErrorReason::AgentDisabled,
    );
    admin
        .enable_agent(pb::EnableAgentRequest {
            agent_id: agent.id.clone(),
        })
        .await
        .expect("enable agent");
    client.who_am_i().await.expect("re-enabled agent");

    // A suspended tenant's agent.
    let operator = server.operator().await;
    set_suspended(&operator, &tenant.id, true).await;
    expect_reason(
        client.who_am_i().await,
        Code::PermissionDenied,
        pb::ErrorReason::TenantSuspended,
    );
    tls.server.stop().await;
}

#[tokio::test]
async fn mtls_certificate_and_a_bearer_of_someone_else_are_refused() {
    let tls = start(Mtls::Optional).await;
    let server = &tls.server;
    let (tenant_a, agent_a) = tenant_with_agent(server, "acme").await;
    let (_, agent_b) = tenant_with_agent(server, "globex").await;
    let (sibling, _, _) = server.create_agent(&tenant_a.id, "sibling").await;
    let pair = tls.ca.agent(&[&agent_a.id]);

    for (who, bearer) in [
        ("tenant B's agent", client_token(server, &agent_b).await),
        ("a sibling agent", client_token(server, &sibling).await),
        (
            "tenant A's admin",
            server
                .mint("admin@test", Some(&tenant_a.id), &[pb::Role::Admin])
                .await,
        ),
        (
            "the operator",
            server.mint("operator", None, &[pb::Role::Operator]).await,
        ),
    ] {
        // The bearer alone is good, and so is the certificate alone
        // (below): only the two together are refused.
        let alone = server.with_bearer(&bearer).await;
        alone
            .who_am_i()
            .await
            .unwrap_or_else(|e| panic!("{who}'s bearer alone: {e:?}"));
        let client = tls.with_certificate(&pair).await.with_bearer(bearer);
        expect_code(client.who_am_i().await, Code::Unauthenticated);
        expect_code(
            client
                .request_delegation(ask(&tenant_a.id, "stock.read"))
                .await,
            Code::Unauthenticated,
        );
    }
    // Nothing was delegated by any of those calls.
    assert_eq!(server.count("delegations").await, 0);
    let certificate_alone = tls.with_certificate(&pair).await;
    let me = certificate_alone
        .who_am_i()
        .await
        .expect("the certificate alone");
    assert_eq!(me.actor.expect("actor").subject, agent_a.id);
    tls.server.stop().await;
}

#[tokio::test]
async fn mtls_agent_of_another_tenant_gets_not_found() {
    let tls = start(Mtls::Optional).await;
    let server = &tls.server;
    let (tenant_a, agent_a) = tenant_with_agent(server, "acme").await;
    let (_, agent_b) = tenant_with_agent(server, "globex").await;

    let client_a = tls.with_certificate(&tls.ca.agent(&[&agent_a.id])).await;
    let outcome = client_a
        .request_delegation(ask(&tenant_a.id, "stock.read"))
        .await
        .expect("tenant A's delegation");
    let delegation = outcome.delegation().expect("delegation").clone();
    let DelegationOutcome::Allowed { grant, .. } = outcome else {
        panic!("not allowed")
    };

    let client_b = tls.with_certificate(&tls.ca.agent(&[&agent_b.id])).await;
    expect_code(
        client_b.get_delegation(&delegation.id).await,
        Code::NotFound,
    );
    let request = client_b
        .request(pb::RelinquishDelegationRequest {
            delegation_id: delegation.id.clone(),
            reason: String::new(),
        })
        .await
        .expect("request");
    expect_code(
        client_b.delegations().relinquish_delegation(request).await,
        Code::NotFound,
    );
    // Tenant A's token is not addressed to tenant B: inactive for B.
    let verified = client_b
        .verify(grant.token.clone(), "stock.read")
        .await
        .expect("verify");
    assert!(!verified.active, "tenant B saw tenant A's token as active");
    // The delegation is untouched and still readable by its owner.
    let still = client_a
        .get_delegation(&delegation.id)
        .await
        .expect("owner reads");
    assert_eq!(still.status, pb::DelegationStatus::Active as i32);
    tls.server.stop().await;
}

#[tokio::test]
async fn required_client_auth_refuses_callers_without_a_certificate() {
    let tls = start(Mtls::Required).await;
    let server = &tls.server;
    let (tenant, agent) = tenant_with_agent(server, "acme").await;

    assert_transport_refused(server.grpc_url(), TlsOptions::new(tls.ca.pem())).await;

    let client = tls.with_certificate(&tls.ca.agent(&[&agent.id])).await;
    let me = client.who_am_i().await.expect("agent by certificate");
    assert_eq!(me.actor.expect("actor").tenant_id, tenant.id);
    tls.server.stop().await;
}

/// A client certificate's `notAfter` ends the standing of an agent it
/// authenticates on an open stream too (issue 23, item 2): the watch ends
/// UNAUTHENTICATED within the re-check period (5 s by default), as a new
/// call on the same connection is answered.
#[tokio::test]
async fn an_mtls_agents_watch_ends_when_its_certificate_expires() {
    let tls = start(Mtls::Optional).await;
    let server = &tls.server;
    let (tenant, agent) = tenant_with_agent(server, "acme").await;
    let admin = server.admin(&tenant.id, "admin@test").await;
    add_rule(&admin, inbound("pay.*", pb::Effect::StepUp)).await;
    // Valid for two hours of the real clock (the handshake's).
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let not_after = rcgen::date_time_ymd(1970, 1, 1) + (now + Duration::from_secs(7_200));
    let pair = tls.ca.leaf_with(
        "agent",
        vec![SanType::URI(
            format!("urn:vaultguard:agent:{}", agent.id)
                .try_into()
                .expect("uri"),
        )],
        ExtendedKeyUsagePurpose::ClientAuth,
        |params| params.not_after = not_after,
    );
    let client = tls.with_certificate(&pair).await;
    let outcome = client
        .request_delegation(ask(&tenant.id, "pay.invoice"))
        .await
        .expect("request by certificate");
    let DelegationOutcome::StepUp { challenge, .. } = outcome else {
        panic!("not a step-up: {outcome:?}")
    };
    let mut watch = watch_step_up(&client, &challenge.auth_req_id, 60)
        .await
        .expect("watch by certificate");
    assert_eq!(
        next_status(&mut watch).await.state(),
        pb::StepUpState::Pending
    );

    // Three hours on: the certificate is past its notAfter.
    server.clock.advance(3 * 3_600 * 1_000);
    let ended = tokio::time::timeout(Duration::from_secs(8), async {
        loop {
            match watch.message().await {
                Ok(Some(message)) => {
                    if let Some(pb::watch_step_up_response::Event::Status(status)) = message.event {
                        assert!(status.access_token.is_empty(), "a token was handed out");
                    }
                }
                Ok(None) => panic!("the watch ended with OK"),
                Err(status) => return vaultguard_client::ClientError::from(status),
            }
        }
    })
    .await
    .expect("the watch ended within the re-check period");
    assert_eq!(
        (ended.code(), ended.reason()),
        (
            Some(Code::Unauthenticated),
            Some(pb::ErrorReason::Unauthenticated)
        ),
        "{ended:?}"
    );
    let again = client
        .who_am_i()
        .await
        .expect_err("the certificate expired");
    assert_eq!(
        (again.code(), again.reason()),
        (ended.code(), ended.reason())
    );
    tls.server.stop().await;
}
