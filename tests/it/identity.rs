//! Tenants, agents and access tokens: lifecycle, suspension, isolation
//! between tenants, and bad input that must change nothing.

use tonic::Code;
use vaultguard_client::{VaultGuardClient, pb};
use vaultguard_tests::Rpc;
use vaultguard_tests::{TestServer, expect_code, expect_invalid};

async fn who(
    client: &VaultGuardClient,
) -> Result<pb::WhoAmIResponse, vaultguard_client::ClientError> {
    client.who_am_i().await
}

#[tokio::test]
async fn tenant_and_agent_lifecycle() {
    let server = TestServer::start().await;
    let operator = server.operator().await;
    let acme = server.create_tenant("acme").await;
    let globex = server.create_tenant("globex").await;
    assert_eq!(acme.status, pb::TenantStatus::Active as i32);
    assert_eq!(acme.audience, format!("urn:vaultguard:tenant:{}", acme.id));

    // Listing pages through every tenant, oldest first.
    let first = operator
        .list_tenants(pb::ListTenantsRequest {
            page: Some(pb::PageRequest {
                page_size: 1,
                page_token: String::new(),
            }),
            status: 0,
        })
        .await
        .unwrap();
    assert_eq!(first.tenants.len(), 1);
    assert_eq!(first.tenants[0].id, acme.id);
    let token = first.page.unwrap().next_page_token;
    assert!(!token.is_empty());
    let second = operator
        .list_tenants(pb::ListTenantsRequest {
            page: Some(pb::PageRequest {
                page_size: 1,
                page_token: token,
            }),
            status: 0,
        })
        .await
        .unwrap();
    assert_eq!(second.tenants[0].id, globex.id);

    // An agent is created, obtains a token and calls an authenticated RPC.
    let admin = server.admin(&acme.id, "alice").await;
    let (agent, secret, agent_client) = server.create_agent(&acme.id, "inventory-bot").await;
    assert!(
        secret.starts_with("vgs_") && secret.len() >= 40,
        "secret has 256 bits"
    );
    let me = who(&agent_client).await.unwrap();
    let actor = me.actor.unwrap();
    assert_eq!(actor.kind, pb::PrincipalKind::Agent as i32);
    assert_eq!(actor.subject, agent.id);
    assert_eq!(actor.tenant_id, acme.id);
    assert_eq!(me.roles, vec![pb::Role::Agent as i32]);

    let listed = admin
        .list_agents(pb::ListAgentsRequest::default())
        .await
        .unwrap();
    assert_eq!(listed.agents.len(), 1);

    // A second agent with the same name is refused.
    let dup = admin
        .create_agent(pb::CreateAgentRequest {
            name: "inventory-bot".into(),
            description: String::new(),
        })
        .await;
    expect_code(dup, Code::AlreadyExists);

    // Disabling stops the agent at once, token or not; enabling restores it.
    admin
        .agents()
        .disable_agent(
            admin
                .request(pb::DisableAgentRequest {
                    agent_id: agent.id.clone(),
                })
                .await
                .unwrap(),
        )
        .await
        .unwrap();
    let err = expect_code(who(&agent_client).await, Code::PermissionDenied);
    assert_eq!(err.reason(), Some(pb::ErrorReason::AgentDisabled));
    let fresh = server.anonymous().await;
    expect_code(
        fresh.issue_token(&agent.id, &secret).await,
        Code::Unauthenticated,
    );
    let again = admin
        .disable_agent(pb::DisableAgentRequest {
            agent_id: agent.id.clone(),
        })
        .await;
    assert_eq!(
        expect_code(again, Code::FailedPrecondition).reason(),
        Some(pb::ErrorReason::InvalidState)
    );
    admin
        .enable_agent(pb::EnableAgentRequest {
            agent_id: agent.id.clone(),
        })
        .await
        .unwrap();
    who(&agent_client).await.unwrap();

    // Rotating the secret: the old one stops working, the new one works.
    let rotated = vaultguard_tests::calls::rotate_secret(&admin, &agent.id)
        .await
        .unwrap();
    assert_ne!(rotated.client_secret, secret);
    expect_code(
        fresh.issue_token(&agent.id, &secret).await,
        Code::Unauthenticated,
    );
    let issued = fresh
        .issue_token(&agent.id, &rotated.client_secret)
        .await
        .unwrap();
    assert_eq!(issued.token_type, "Bearer");
    assert_eq!(issued.expires_in, 900);

    // The secret is stored only as a digest.
    let stored = vaultguard_server::store::entities::agent::Entity::find_by_id(agent.id.clone());
    use sea_orm::EntityTrait;
    let row = stored.one(&server.state.db).await.unwrap().unwrap();
    assert!(!String::from_utf8_lossy(&row.secret_digest).contains(&rotated.client_secret));
    assert_eq!(row.secret_digest.len(), 32);

    // Duplicate slugs are refused.
    let dup = operator
        .create_tenant(pb::CreateTenantRequest {
            slug: "acme".into(),
            display_name: "Again".into(),
            settings: None,
        })
        .await;
    expect_code(dup, Code::AlreadyExists);
    server.stop().await;
}

#[tokio::test]
async fn suspended_tenant_is_refused_everywhere() {
    let server = TestServer::start().await;
    let operator = server.operator().await;
    let acme = server.create_tenant("acme").await;
    let (agent, secret, agent_client) = server.create_agent(&acme.id, "bot").await;
    let admin = server.admin(&acme.id, "alice").await;
    who(&agent_client).await.unwrap();

    let suspended = operator
        .suspend_tenant(pb::SuspendTenantRequest {
            tenant_id: acme.id.clone(),
            reason: "billing".into(),
        })
        .await
        .unwrap()
        .tenant
        .unwrap();
    assert_eq!(suspended.status, pb::TenantStatus::Suspended as i32);

    // The agent's existing token, a new token, and the admin are all refused.
    let err = expect_code(who(&agent_client).await, Code::PermissionDenied);
    assert_eq!(err.reason(), Some(pb::ErrorReason::TenantSuspended));
    expect_code(
        server
            .anonymous()
            .await
            .issue_token(&agent.id, &secret)
            .await,
        Code::Unauthenticated,
    );
    let listed = admin.list_agents(pb::ListAgentsRequest::default()).await;
    assert_eq!(
        expect_code(listed, Code::PermissionDenied).reason(),
        Some(pb::ErrorReason::TenantSuspended)
    );

    let twice = operator
        .suspend_tenant(pb::SuspendTenantRequest {
            tenant_id: acme.id.clone(),
            reason: String::new(),
        })
        .await;
    expect_code(twice, Code::FailedPrecondition);

    operator
        .reactivate_tenant(pb::ReactivateTenantRequest {
            tenant_id: acme.id.clone(),
            reason: String::new(),
        })
        .await
        .unwrap();
    who(&agent_client).await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn another_tenant_sees_and_changes_nothing() {
    let server = TestServer::start().await;
    let acme = server.create_tenant("acme").await;
    let globex = server.create_tenant("globex").await;
    let (agent, _, acme_agent) = server.create_agent(&acme.id, "bot").await;
    let (_, _, globex_agent) = server.create_agent(&globex.id, "spy").await;
    let intruder = server.admin(&globex.id, "mallory").await;
    // Both agents hold tokens before counting (issuing one is audited).
    who(&acme_agent).await.unwrap();
    who(&globex_agent).await.unwrap();
    let audit_before = server.count("audit_events").await;

    // Agent RPCs on another tenant's agent: NOT_FOUND, nothing changed.
    let id = || agent.id.clone();
    expect_code(
        intruder
            .get_agent(pb::GetAgentRequest { agent_id: id() })
            .await,
        Code::NotFound,
    );
    expect_code(
        intruder
            .disable_agent(pb::DisableAgentRequest { agent_id: id() })
            .await,
        Code::NotFound,
    );
    expect_code(
        intruder
            .enable_agent(pb::EnableAgentRequest { agent_id: id() })
            .await,
        Code::NotFound,
    );
    expect_code(
        intruder
            .rotate_agent_secret(pb::RotateAgentSecretRequest { agent_id: id() })
            .await,
        Code::NotFound,
    );
    let listed = intruder
        .list_agents(pb::ListAgentsRequest::default())
        .await
        .unwrap();
    assert!(listed.agents.iter().all(|a| a.tenant_id == globex.id));
    who(&acme_agent).await.unwrap();

    // Tenant reads of another tenant: NOT_FOUND, for admins and agents alike.
    let get = |client: &VaultGuardClient| {
        let client = client.clone();
        let tenant_id = acme.id.clone();
        async move { client.get_tenant(pb::GetTenantRequest { tenant_id }).await }
    };
    expect_code(get(&intruder).await, Code::NotFound);
    expect_code(get(&globex_agent).await, Code::NotFound);
    let own = intruder
        .get_tenant(pb::GetTenantRequest {
            tenant_id: String::new(),
        })
        .await
        .unwrap();
    assert_eq!(own.tenant.unwrap().id, globex.id);

    // Operator-only RPCs: PERMISSION_DENIED for a tenant admin, naming the role.
    let denied = intruder
        .suspend_tenant(pb::SuspendTenantRequest {
            tenant_id: acme.id.clone(),
            reason: String::new(),
        })
        .await;
    let err = expect_code(denied, Code::PermissionDenied);
    assert_eq!(err.reason(), Some(pb::ErrorReason::RoleRequired));
    expect_code(
        intruder
            .reactivate_tenant(pb::ReactivateTenantRequest {
                tenant_id: acme.id.clone(),
                reason: String::new(),
            })
            .await,
        Code::PermissionDenied,
    );
    expect_code(
        intruder
            .create_tenant(pb::CreateTenantRequest {
                slug: "evil".into(),
                display_name: "Evil".into(),
                settings: None,
            })
            .await,
        Code::PermissionDenied,
    );
    expect_code(
        intruder
            .list_tenants(pb::ListTenantsRequest::default())
            .await,
        Code::PermissionDenied,
    );
    let org = || {
        Some(pb::ExternalOrganization {
            issuer: "https://idp.example".into(),
            organization_id: "org_1".into(),
        })
    };
    expect_code(
        intruder
            .bind_external_organization(pb::BindExternalOrganizationRequest {
                tenant_id: acme.id.clone(),
                organization: org(),
            })
            .await,
        Code::PermissionDenied,
    );
    expect_code(
        intruder
            .unbind_external_organization(pb::UnbindExternalOrganizationRequest {
                tenant_id: acme.id.clone(),
                organization: org(),
            })
            .await,
        Code::PermissionDenied,
    );
    expect_code(
        intruder
            .list_issuer_keys(pb::ListIssuerKeysRequest {})
            .await,
        Code::PermissionDenied,
    );
    expect_code(
        intruder
            .rotate_issuer_key(pb::RotateIssuerKeyRequest { algorithm: 0 })
            .await,
        Code::PermissionDenied,
    );

    // Roles within a tenant: agents and approvers cannot administer; the
    // operator cannot act inside a tenant.
    let create = |client: &VaultGuardClient| {
        let client = client.clone();
        async move {
            client
                .create_agent(pb::CreateAgentRequest {
                    name: "sneaky".into(),
                    description: String::new(),
                })
                .await
        }
    };
    expect_code(create(&acme_agent).await, Code::PermissionDenied);
    expect_code(
        create(&server.approver(&acme.id, "bob").await).await,
        Code::PermissionDenied,
    );
    expect_code(
        create(&server.operator().await).await,
        Code::PermissionDenied,
    );
    let settings = intruder
        .update_tenant_settings(pb::UpdateTenantSettingsRequest {
            settings: Some(pb::TenantSettings {
                token_algorithm: pb::TokenAlgorithm::Eddsa as i32,
            }),
        })
        .await
        .unwrap()
        .tenant
        .unwrap();
    assert_eq!(
        settings.id, globex.id,
        "settings change the caller's own tenant only"
    );

    // A token naming a tenant that does not exist is refused.
    let ghost = server
        .admin("tnt_00000000000000000000000000000000", "ghost")
        .await;
    expect_code(ghost.who_am_i().await, Code::Unauthenticated);

    // Nothing of acme changed: only globex's own settings event was added.
    let acme_now = server.operator().await;
    let acme_after = acme_now
        .get_tenant(pb::GetTenantRequest {
            tenant_id: acme.id.clone(),
        })
        .await
        .unwrap()
        .tenant
        .unwrap();
    assert_eq!(acme_after.status, pb::TenantStatus::Active as i32);
    // The six NOT_FOUNDs are in globex's own log (the callers'), none in
    // acme's; besides them only globex's own settings event was added.
    assert_eq!(
        server.not_found_methods(&globex.id).await,
        [
            "/vaultguard.v1.AgentService/GetAgent",
            "/vaultguard.v1.AgentService/DisableAgent",
            "/vaultguard.v1.AgentService/EnableAgent",
            "/vaultguard.v1.AgentService/RotateAgentSecret",
            "/vaultguard.v1.TenantService/GetTenant",
            "/vaultguard.v1.TenantService/GetTenant",
        ]
    );
    assert!(server.not_found_methods(&acme.id).await.is_empty());
    assert_eq!(server.count("audit_events").await, audit_before + 1 + 6);
    server.stop().await;
}

#[tokio::test]
async fn bad_input_is_refused_and_changes_nothing() {
    let server = TestServer::start().await;
    let operator = server.operator().await;
    let acme = server.create_tenant("acme").await;
    let admin = server.admin(&acme.id, "alice").await;
    let tenants_before = server.count("tenants").await;
    let agents_before = server.count("agents").await;
    let audit_before = server.count("audit_events").await;

    let create_tenant = |slug: &str, name: &str, alg: i32| {
        let operator = operator.clone();
        let request = pb::CreateTenantRequest {
            slug: slug.into(),
            display_name: name.into(),
            settings: Some(pb::TenantSettings {
                token_algorithm: alg,
            }),
        };
        async move { operator.create_tenant(request).await }
    };
    expect_invalid(create_tenant("", "Name", 0).await, "slug");
    expect_invalid(create_tenant("ab", "Name", 0).await, "slug");
    expect_invalid(create_tenant("Bad_Slug", "Name", 0).await, "slug");
    expect_invalid(create_tenant(&"a".repeat(64), "Name", 0).await, "slug");
    expect_invalid(create_tenant("okslug", "", 0).await, "display_name");
    expect_invalid(
        create_tenant("okslug", &"x".repeat(201), 0).await,
        "display_name",
    );
    expect_invalid(
        create_tenant("okslug", "Name", 99).await,
        "settings.token_algorithm",
    );

    let create_agent = |name: &str, description: &str| {
        let admin = admin.clone();
        let request = pb::CreateAgentRequest {
            name: name.into(),
            description: description.into(),
        };
        async move { admin.create_agent(request).await }
    };
    expect_invalid(create_agent("", "").await, "name");
    expect_invalid(create_agent("Bad Name", "").await, "name");
    expect_invalid(
        create_agent("good-name", &"d".repeat(501)).await,
        "description",
    );
    expect_invalid(create_agent("good-name", "bell\u{7}").await, "description");

    expect_invalid(
        admin
            .get_agent(pb::GetAgentRequest {
                agent_id: "agt_nope".into(),
            })
            .await,
        "agent_id",
    );
    expect_invalid(
        admin
            .disable_agent(pb::DisableAgentRequest {
                agent_id: String::new(),
            })
            .await,
        "agent_id",
    );
    expect_invalid(
        admin
            .list_agents(pb::ListAgentsRequest {
                page: None,
                status: 7,
            })
            .await,
        "status",
    );
    let bad_page = pb::ListTenantsRequest {
        page: Some(pb::PageRequest {
            page_size: 501,
            page_token: String::new(),
        }),
        status: 0,
    };
    expect_invalid(operator.list_tenants(bad_page).await, "page.page_size");
    let bad_token = pb::ListTenantsRequest {
        page: Some(pb::PageRequest {
            page_size: 10,
            page_token: "garbage".into(),
        }),
        status: 0,
    };
    expect_invalid(operator.list_tenants(bad_token).await, "page.page_token");
    let long_reason = pb::SuspendTenantRequest {
        tenant_id: acme.id.clone(),
        reason: "r".repeat(501),
    };
    expect_invalid(operator.suspend_tenant(long_reason).await, "reason");
    let bad_tenant = pb::SuspendTenantRequest {
        tenant_id: "acme".into(),
        reason: String::new(),
    };
    expect_invalid(operator.suspend_tenant(bad_tenant).await, "tenant_id");
    let untrusted = pb::BindExternalOrganizationRequest {
        tenant_id: acme.id.clone(),
        organization: Some(pb::ExternalOrganization {
            issuer: "https://untrusted.example".into(),
            organization_id: "org".into(),
        }),
    };
    expect_invalid(
        operator.bind_external_organization(untrusted).await,
        "organization.issuer",
    );
    let bad_settings = pb::UpdateTenantSettingsRequest {
        settings: Some(pb::TenantSettings {
            token_algorithm: 42,
        }),
    };
    expect_invalid(
        admin.update_tenant_settings(bad_settings).await,
        "settings.token_algorithm",
    );
    expect_invalid(
        operator
            .rotate_issuer_key(pb::RotateIssuerKeyRequest { algorithm: 9 })
            .await,
        "algorithm",
    );

    let anonymous = server.anonymous().await;
    let grant = |grant_type: &str, client_id: &str, secret: &str| pb::IssueTokenRequest {
        grant_type: grant_type.into(),
        client_id: client_id.into(),
        client_secret: secret.into(),
    };
    expect_invalid(
        anonymous
            .auth()
            .issue_token(grant(
                "password",
                "agt_00000000000000000000000000000000",
                "x",
            ))
            .await,
        "grant_type",
    );
    expect_invalid(
        anonymous
            .auth()
            .issue_token(grant("client_credentials", "not-an-id", "x"))
            .await,
        "client_id",
    );
    expect_invalid(
        anonymous
            .auth()
            .issue_token(grant(
                "client_credentials",
                "agt_00000000000000000000000000000000",
                "",
            ))
            .await,
        "client_secret",
    );

    assert_eq!(server.count("tenants").await, tenants_before);
    assert_eq!(server.count("agents").await, agents_before);
    assert_eq!(server.count("audit_events").await, audit_before);
    assert_eq!(server.count("tenant_external_orgs").await, 0);
    server.stop().await;
}

#[tokio::test]
async fn tenant_settings_choose_the_token_algorithm() {
    let server = TestServer::start().await;
    let acme = server.create_tenant("acme").await;
    let admin = server.admin(&acme.id, "alice").await;
    let updated = admin
        .update_tenant_settings(pb::UpdateTenantSettingsRequest {
            settings: Some(pb::TenantSettings {
                token_algorithm: pb::TokenAlgorithm::Es256 as i32,
            }),
        })
        .await
        .unwrap()
        .tenant
        .unwrap();
    assert_eq!(
        updated.settings.unwrap().token_algorithm,
        pb::TokenAlgorithm::Es256 as i32
    );
    expect_invalid(
        admin
            .update_tenant_settings(pb::UpdateTenantSettingsRequest { settings: None })
            .await,
        "settings",
    );
    server.stop().await;
}
