//! No secret ever reaches the server's log, the audit log or an error
//! message: client secrets (issued and presented), access and admin tokens,
//! the master key and the issuer keys' private material.

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use sea_orm::EntityTrait;
use vaultguard_client::{ClientError, DelegationOutcome, VaultGuardClient, pb};
use vaultguard_server::audit::PLATFORM_LOG;
use vaultguard_server::crypto::SealContext;
use vaultguard_server::store::entities::{audit_event, custody_key, issuer_key};
use vaultguard_tests::{TestServer, captured_logs, expect_code};

use crate::delegations::ask;
use crate::policies::{add_rule, inbound, with_counterpart};
use crate::vault_connections::{connected, expire_access_tokens};
use crate::vault_signing::create_key;
use vaultguard_tests::Rpc;

/// The secrets of the flow, by kind, and every text the server handed back.
#[derive(Default)]
struct Scan {
    secrets: Vec<(String, String)>,
    errors: Vec<String>,
    /// Fragments that mean key material even in part (`PRIVATE KEY`, DER
    /// headers).
    markers: Vec<String>,
}

impl Scan {
    /// Remembers `value` as a secret of `kind`.
    fn secret(&mut self, kind: &str, value: &str) {
        assert!(
            value.len() >= 16,
            "{kind} is too short to scan for reliably"
        );
        self.secrets.push((kind.to_owned(), value.to_owned()));
    }

    /// A client secret, whole and without its `vgs_` prefix.
    fn client_secret(&mut self, kind: &str, value: &str) {
        self.secret(kind, value);
        if let Some(random) = value.strip_prefix(vaultguard_server::domain::agents::SECRET_PREFIX) {
            self.secret(&format!("{kind} (random part)"), random);
        }
    }

    /// A JWT, whole and its signature alone.
    fn jwt(&mut self, kind: &str, value: &str) {
        self.secret(kind, value);
        let signature = value.rsplit('.').next().expect("jwt signature");
        self.secret(&format!("{kind} (signature)"), signature);
    }

    /// Raw key bytes in every encoding a log line might use.
    fn key_bytes(&mut self, kind: &str, bytes: &[u8]) {
        self.secret(
            &format!("{kind} (base64)"),
            STANDARD.encode(bytes).trim_end_matches('='),
        );
        self.secret(
            &format!("{kind} (base64url)"),
            &URL_SAFE_NO_PAD.encode(bytes),
        );
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        self.secret(&format!("{kind} (hex)"), &hex);
        self.secret(&format!("{kind} (HEX)"), &hex.to_uppercase());
        self.secret(
            &format!("{kind} (byte list)"),
            &format!("{:?}", &bytes[..bytes.len().min(16)]),
        );
    }

    /// Records a failed call's error, as the caller saw it.
    fn error(&mut self, err: &ClientError) {
        self.errors.push(format!("{err} / {err:?}"));
    }

    /// Fails the test if any remembered secret or marker occurs in the
    /// server's (debug) log, in any audit event of any tenant, or in an
    /// error a caller received.
    async fn assert_clean(&self, server: &TestServer) {
        server.wait_sealed().await;
        let audit_rows = audit_event::Entity::find()
            .all(&server.state.db)
            .await
            .expect("audit events");
        assert!(!audit_rows.is_empty());
        let audit_text: String = audit_rows.iter().map(|row| format!("{row:?}\n")).collect();

        let logs = captured_logs();
        // The capture works: the flow's admissions were logged at debug level.
        assert!(
            logs.contains("call admitted"),
            "debug logs were not captured"
        );
        let errors = self.errors.join("\n");
        let haystacks = [
            ("server log", logs.as_str()),
            ("audit events", audit_text.as_str()),
            ("error messages", errors.as_str()),
        ];
        let mut leaks = Vec::new();
        for (kind, value) in &self.secrets {
            for (place, text) in haystacks {
                if text.contains(value.as_str()) {
                    leaks.push(format!("{kind} found in the {place}"));
                }
            }
        }
        for marker in &self.markers {
            for (place, text) in haystacks {
                if text.contains(marker.as_str()) {
                    leaks.push(format!(
                        "private key material ({marker}) found in the {place}"
                    ));
                }
            }
        }
        assert!(leaks.is_empty(), "secrets leaked:\n{}", leaks.join("\n"));
    }
}

async fn issue(
    client: &VaultGuardClient,
    client_id: &str,
    client_secret: &str,
) -> Result<pb::IssueTokenResponse, ClientError> {
    client.issue_token(client_id, client_secret).await
}

#[tokio::test]
async fn secrets_never_reach_logs_audit_or_errors() {
    let server = TestServer::start().await;
    let mut scan = Scan::default();

    // Admin tokens.
    let operator_token = server.mint("operator", None, &[pb::Role::Operator]).await;
    scan.jwt("operator bearer token", &operator_token);
    let operator = server.with_bearer(&operator_token).await;
    let tenant = operator
        .create_tenant(pb::CreateTenantRequest {
            slug: "secrets".to_owned(),
            display_name: "Secrets".to_owned(),
            settings: None,
        })
        .await
        .expect("create tenant")
        .tenant
        .expect("tenant");
    let admin_token = server
        .mint("admin@test", Some(&tenant.id), &[pb::Role::Admin])
        .await;
    scan.jwt("tenant admin bearer token", &admin_token);
    let admin = server.with_bearer(&admin_token).await;

    // An agent, its secret, its access token.
    let created = admin
        .create_agent(pb::CreateAgentRequest {
            name: "runner".to_owned(),
            description: "has secrets".to_owned(),
        })
        .await
        .expect("create agent");
    let agent = created.agent.expect("agent");
    let first_secret = created.client_secret;
    scan.client_secret("client secret from CreateAgent", &first_secret);
    let agent_client = server
        .anonymous()
        .await
        .with_client_credentials(agent.id.clone(), first_secret.clone());
    let first_token = agent_client.bearer().await.expect("client credentials");
    scan.jwt("agent access token (first secret)", &first_token);
    let me = agent_client.who_am_i().await.expect("who am i");
    assert!(format!("{me:?}").contains(&agent.id));

    // Rotation: a new secret and token; the old secret stops working.
    let rotated = vaultguard_tests::calls::rotate_secret(&admin, &agent.id)
        .await
        .expect("rotate");
    let second_secret = rotated.client_secret;
    assert_ne!(second_secret, first_secret);
    scan.client_secret("client secret from RotateAgentSecret", &second_secret);
    let rotated_client = server
        .anonymous()
        .await
        .with_client_credentials(agent.id.clone(), second_secret.clone());
    let second_token = rotated_client
        .bearer()
        .await
        .expect("client credentials after rotation");
    scan.jwt("agent access token (rotated secret)", &second_token);
    rotated_client
        .who_am_i()
        .await
        .expect("who am i after rotation");

    // A second agent, so secrets can be presented for the wrong agent.
    let (other_agent, other_secret, other_client) = server.create_agent(&tenant.id, "other").await;
    scan.client_secret("client secret of a second agent", &other_secret);
    let other_token = other_client.bearer().await.expect("second agent token");
    scan.jwt("second agent's access token", &other_token);

    // Failed authentications, each presenting a secret-looking value.
    let anonymous = server.anonymous().await;
    let wrong_secret = format!(
        "vgs_{}",
        URL_SAFE_NO_PAD.encode(uuid::Uuid::new_v4().as_bytes().repeat(2))
    );
    scan.client_secret("wrong client secret presented", &wrong_secret);
    let err = expect_code(
        issue(&anonymous, &agent.id, &wrong_secret).await,
        tonic::Code::Unauthenticated,
    );
    scan.error(&err);
    let err = expect_code(
        issue(&anonymous, &agent.id, &first_secret).await,
        tonic::Code::Unauthenticated,
    );
    scan.error(&err);
    let err = expect_code(
        issue(&anonymous, &other_agent.id, &second_secret).await,
        tonic::Code::Unauthenticated,
    );
    scan.error(&err);
    let err = expect_code(
        issue(
            &anonymous,
            &format!("agt_{}", uuid::Uuid::new_v4().simple()),
            &other_secret,
        )
        .await,
        tonic::Code::Unauthenticated,
    );
    scan.error(&err);

    let garbage = format!(
        "eyJhbGciOiJSUzI1NiIsInR5cCI6ImF0K2p3dCJ9.{}.{}",
        URL_SAFE_NO_PAD.encode(uuid::Uuid::new_v4().as_bytes().repeat(3)),
        URL_SAFE_NO_PAD.encode(uuid::Uuid::new_v4().as_bytes().repeat(4)),
    );
    scan.jwt("garbage bearer presented", &garbage);
    let err = expect_code(
        server.with_bearer(&garbage).await.who_am_i().await,
        tonic::Code::Unauthenticated,
    );
    scan.error(&err);
    let opaque = URL_SAFE_NO_PAD.encode(uuid::Uuid::new_v4().as_bytes().repeat(2));
    scan.secret("opaque garbage bearer presented", &opaque);
    let err = expect_code(
        server.with_bearer(&opaque).await.who_am_i().await,
        tonic::Code::Unauthenticated,
    );
    scan.error(&err);
    // The client secret itself presented as a bearer.
    let err = expect_code(
        server.with_bearer(&second_secret).await.who_am_i().await,
        tonic::Code::Unauthenticated,
    );
    scan.error(&err);
    // A valid token with its signature tampered with.
    let (head, _) = second_token.rsplit_once('.').expect("jwt");
    let tampered = format!(
        "{head}.{}",
        URL_SAFE_NO_PAD.encode(uuid::Uuid::new_v4().as_bytes().repeat(4))
    );
    scan.jwt("tampered access token presented", &tampered);
    let err = expect_code(
        server.with_bearer(&tampered).await.who_am_i().await,
        tonic::Code::Unauthenticated,
    );
    scan.error(&err);
    // An agent token used where an admin is needed.
    let request = rotated_client
        .request(pb::RotateAgentSecretRequest {
            agent_id: agent.id.clone(),
        })
        .await
        .expect("request");
    let err = expect_code(
        rotated_client.agents().rotate_agent_secret(request).await,
        tonic::Code::PermissionDenied,
    );
    scan.error(&err);

    // The master key, and every issuer private key it seals.
    let master_file =
        std::fs::read_to_string(server.data_dir().join("master.key")).expect("read master.key");
    let master_text = master_file.trim();
    scan.secret("master key (file contents)", master_text);
    let master_bytes = [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD]
        .iter()
        .find_map(|engine| engine.decode(master_text).ok())
        .expect("master.key holds base64");
    assert_eq!(master_bytes.len(), 32);
    scan.key_bytes("master key", &master_bytes);
    let issuer_keys = issuer_key::Entity::find()
        .all(&server.state.db)
        .await
        .expect("issuer keys");
    assert!(!issuer_keys.is_empty());
    let mut key_markers = vec!["PRIVATE KEY".to_owned()];
    for key in &issuer_keys {
        let pkcs8 = server
            .state
            .master
            .open(
                SealContext {
                    table: "issuer_keys",
                    tenant_id: PLATFORM_LOG,
                    record_id: &key.kid,
                },
                &key.private_key_ciphertext,
            )
            .expect("open issuer key");
        scan.key_bytes(
            &format!("{} issuer private key (PKCS#8)", key.algorithm),
            &pkcs8,
        );
        // The DER header of the key's base64: a sign of key material even in part.
        key_markers.push(STANDARD.encode(&pkcs8)[..16].to_owned());
    }

    scan.markers = key_markers;
    assert!(
        captured_logs().contains("unauthenticated"),
        "refusals were not logged"
    );
    scan.assert_clean(&server).await;
    server.stop().await;
}

/// The vault's and the delegations' secrets, end to end with debug logging:
/// a connected account (provider client secret, authorization `state`,
/// refresh and access tokens, rotated on refresh), custodied private keys of
/// every algorithm after signing with them, the approval webhook's signing
/// secret, delegation tokens and a step-up's `auth_req_id` — and refused
/// calls that present such values. None may reach the server's log, any
/// audit event or any error a caller saw.
#[tokio::test]
async fn vault_and_delegation_secrets_never_reach_logs_audit_or_errors() {
    let (fixture, connection_id) = connected().await;
    let pair = &fixture.pair;
    let server = &pair.server;
    let provider = &fixture.provider;
    let mut scan = Scan::default();

    // Connected account: two exchanges, the second after expiry (a refresh
    // with rotation), then a refused exchange presenting a provider token as
    // a subject token.
    let own = pair
        .agent
        .exchange(&connection_id, &[])
        .await
        .expect("exchange");
    assert!(!own.access_token.is_empty());
    expire_access_tokens(server, &pair.agent).await;
    let refreshed = pair
        .agent
        .exchange(&connection_id, &[])
        .await
        .expect("exchange after expiry");
    assert_ne!(refreshed.access_token, own.access_token);
    assert!(provider.refreshes() >= 1, "the second exchange refreshed");
    let err = pair
        .agent
        .exchange_delegated(&refreshed.access_token, &connection_id, &[])
        .await
        .expect_err("a provider token is no delegation token");
    scan.error(&err);
    // The clock moved past the admins' tokens too: fresh ones.
    let acme_admin = server.admin(&pair.acme.id, "alice").await;
    let globex_admin = server.admin(&pair.globex.id, "gina").await;
    for token in provider.issued_refresh_tokens() {
        scan.secret("provider refresh token", &token);
    }
    for token in provider.issued_access_tokens() {
        scan.secret("provider access token", &token);
    }
    scan.secret(
        "provider client secret",
        provider
            .client_secret()
            .expect("the provider has a client secret"),
    );
    // A started (never finished) connection: its `state` is a bearer of the
    // callback.
    let started = acme_admin
        .start_connection(pb::StartConnectionRequest {
            provider_id: fixture.registered.id.clone(),
            ..Default::default()
        })
        .await
        .expect("start connection");
    let authorize = url::Url::parse(&started.authorize_url).expect("authorize url");
    let state = authorize
        .query_pairs()
        .find(|(name, _)| name == "state")
        .map(|(_, value)| value.into_owned())
        .expect("state in the authorize url");
    scan.secret("oauth state", &state);
    let callback = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("http client")
        .get(format!(
            "{}/oauth/callback?state={state}x&code=not-a-real-code-0123456789",
            server.http_url()
        ))
        .send()
        .await
        .expect("callback");
    assert_eq!(callback.status(), reqwest::StatusCode::BAD_REQUEST);
    scan.errors.push(callback.text().await.unwrap_or_default());

    // Custodied keys of every algorithm, each used once.
    add_rule(
        &acme_admin,
        with_counterpart(&pair.acme.id, inbound("*", pb::Effect::Allow)),
    )
    .await;
    let mut markers = vec!["PRIVATE KEY".to_owned()];
    for (name, algorithm, scheme) in [
        (
            "ed",
            pb::KeyAlgorithm::Ed25519,
            pb::SigningScheme::Ed25519Pure,
        ),
        (
            "eth",
            pb::KeyAlgorithm::Secp256k1,
            pb::SigningScheme::Eip191PersonalSign,
        ),
        ("nist", pb::KeyAlgorithm::P256, pb::SigningScheme::RawSha256),
    ] {
        let payload = |byte: u8| {
            pb::sign_request::Payload::Message(pb::SignMessage {
                data: vec![byte; 40],
                scheme: scheme as i32,
            })
        };
        let key = create_key(&acme_admin, name, algorithm, "")
            .await
            .expect("create signing key");
        let signed = pair
            .agent
            .sign(pb::SignRequest {
                key_id: key.id.clone(),
                payload: Some(payload(7)),
                idempotency_key: format!("secrets-{name}"),
                ..Default::default()
            })
            .await
            .expect("sign");
        assert!(matches!(
            signed.outcome,
            Some(pb::sign_response::Outcome::Signed(_))
        ));
        // The same idempotency key with another payload is refused.
        let err = pair
            .agent
            .sign(pb::SignRequest {
                key_id: key.id.clone(),
                payload: Some(payload(8)),
                idempotency_key: format!("secrets-{name}"),
                ..Default::default()
            })
            .await
            .expect_err("idempotency conflict");
        scan.error(&err);
        let stored = custody_key::Entity::find_by_id(key.id.clone())
            .one(&server.state.db)
            .await
            .expect("custody key row")
            .expect("custody key");
        let private = server
            .state
            .master
            .open(
                SealContext {
                    table: "custody_keys",
                    tenant_id: &pair.acme.id,
                    record_id: &key.id,
                },
                &stored.private_key_ciphertext,
            )
            .expect("open custodied key");
        scan.key_bytes(&format!("{name} custodied private key"), &private);
        markers.push(STANDARD.encode(&private)[..16].to_owned());
    }

    // The approval webhook's signing secret.
    let webhook = globex_admin
        .set_approval_webhook(pb::SetApprovalWebhookRequest {
            url: "http://127.0.0.1:9/approvals".to_owned(),
        })
        .await
        .expect("set webhook");
    scan.secret("webhook signing secret", &webhook.signing_secret);

    // Delegation tokens (ALLOW) and a step-up's auth_req_id (STEP_UP),
    // then refusals that present them.
    add_rule(&globex_admin, inbound("stock.read", pb::Effect::Allow)).await;
    add_rule(&globex_admin, inbound("stock.write", pb::Effect::StepUp)).await;
    let allowed = pair
        .agent
        .request_delegation(ask(&pair.globex.id, "stock.read"))
        .await
        .expect("allowed delegation");
    let DelegationOutcome::Allowed { grant, .. } = allowed else {
        panic!("stock.read is allowed");
    };
    scan.jwt("delegation token", &grant.token);
    let stepped = pair
        .agent
        .request_delegation(ask(&pair.globex.id, "stock.write"))
        .await
        .expect("step-up delegation");
    let DelegationOutcome::StepUp { challenge, .. } = stepped else {
        panic!("stock.write needs a human");
    };
    scan.secret("auth_req_id", &challenge.auth_req_id);
    // The delegation token presented as an API bearer.
    let err = expect_code(
        server.with_bearer(&grant.token).await.who_am_i().await,
        tonic::Code::Unauthenticated,
    );
    scan.error(&err);
    // The auth_req_id polled by another agent.
    let (_, _, intruder) = server.create_agent(&pair.acme.id, "intruder").await;
    let err: ClientError = intruder
        .poll_step_up(pb::PollStepUpRequest {
            auth_req_id: challenge.auth_req_id.clone(),
        })
        .await
        .expect_err("another agent's auth_req_id");
    scan.error(&err);
    // A tampered delegation token verified by the receiving tenant.
    let (head, _) = grant.token.rsplit_once('.').expect("jwt");
    let tampered = format!("{head}.{}", URL_SAFE_NO_PAD.encode([9u8; 64]));
    scan.jwt("tampered delegation token", &tampered);
    let (_, _, verifier) = server.create_agent(&pair.globex.id, "gatekeeper").await;
    let verdict = verifier
        .verify(&tampered, "")
        .await
        .expect("verify answers");
    assert!(!verdict.active);
    scan.errors.push(format!("{verdict:?}"));

    scan.markers = markers;
    scan.assert_clean(server).await;
}
