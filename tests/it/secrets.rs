//! No secret ever reaches the server's log, the audit log or an error
//! message: client secrets (issued and presented), access and admin tokens,
//! the master key and the issuer keys' private material.

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use sea_orm::EntityTrait;
use vaultguard_client::{ClientError, VaultGuardClient, pb};
use vaultguard_server::audit::PLATFORM_LOG;
use vaultguard_server::crypto::SealContext;
use vaultguard_server::store::entities::{audit_event, issuer_key};
use vaultguard_tests::{TestServer, captured_logs, expect_code};

/// The secrets of the flow, by kind, and every text the server handed back.
#[derive(Default)]
struct Scan {
    secrets: Vec<(String, String)>,
    errors: Vec<String>,
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
    let request = operator
        .request(pb::CreateTenantRequest {
            slug: "secrets".to_owned(),
            display_name: "Secrets".to_owned(),
            settings: None,
        })
        .await
        .expect("request");
    let tenant = operator
        .tenants()
        .create_tenant(request)
        .await
        .expect("create tenant")
        .into_inner()
        .tenant
        .expect("tenant");
    let admin_token = server
        .mint("admin@test", Some(&tenant.id), &[pb::Role::Admin])
        .await;
    scan.jwt("tenant admin bearer token", &admin_token);
    let admin = server.with_bearer(&admin_token).await;

    // An agent, its secret, its access token.
    let request = admin
        .request(pb::CreateAgentRequest {
            name: "runner".to_owned(),
            description: "has secrets".to_owned(),
        })
        .await
        .expect("request");
    let created = admin
        .agents()
        .create_agent(request)
        .await
        .expect("create agent")
        .into_inner();
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
    let request = admin
        .request(pb::RotateAgentSecretRequest {
            agent_id: agent.id.clone(),
        })
        .await
        .expect("request");
    let rotated = admin
        .agents()
        .rotate_agent_secret(request)
        .await
        .expect("rotate")
        .into_inner();
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

    server.wait_sealed().await;
    let audit_rows = audit_event::Entity::find()
        .all(&server.state.db)
        .await
        .expect("audit events");
    assert!(!audit_rows.is_empty());
    let audit_text: String = audit_rows.iter().map(|row| format!("{row:?}\n")).collect();

    let logs = captured_logs();
    // The capture works: the flow's admissions and refusals were logged.
    assert!(
        logs.contains("call admitted"),
        "debug logs were not captured"
    );
    assert!(logs.contains("unauthenticated"), "refusals were not logged");

    let haystacks = [
        ("server log", logs.as_str()),
        ("audit events", audit_text.as_str()),
        ("error messages", &scan.errors.join("\n")),
    ];
    let mut leaks = Vec::new();
    for (kind, value) in &scan.secrets {
        for (place, text) in haystacks {
            if text.contains(value.as_str()) {
                leaks.push(format!("{kind} found in the {place}"));
            }
        }
    }
    for marker in &key_markers {
        for (place, text) in haystacks {
            if text.contains(marker) {
                leaks.push(format!(
                    "private key material ({marker}) found in the {place}"
                ));
            }
        }
    }
    assert!(leaks.is_empty(), "secrets leaked:\n{}", leaks.join("\n"));
    server.stop().await;
}
