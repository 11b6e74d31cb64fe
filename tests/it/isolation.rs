//! The tenant-isolation sweep (issue 9, item 5): for EVERY RPC of the
//! contract (walked from the compiled descriptor, so an RPC without a case
//! fails the test by name), a principal of the attacker tenant `globex` —
//! each of its admin, approver, auditor and agent that the role matrix
//! admits, or all of them for operator-only RPCs, or no credential for the
//! public ones — calls it with REAL ids of the victim tenant `acme`'s
//! objects (tenant, agents, rules, ACTIVE and PENDING delegations, the
//! step-up's `auth_req_id` and `request_hash`, audit sequence numbers and
//! page tokens, OAuth provider and connected account, custodied key and a
//! signature's idempotency key, webhook, external organisation binding).
//!
//! Each case asserts the answer the contract gives such a caller (mostly
//! NOT_FOUND or PERMISSION_DENIED; where the contract answers otherwise the
//! case says why) and that nothing listed or returned belongs to acme. Around
//! the whole sweep, every row of acme (each table's rows whose tenant column
//! names acme, read with plain SQL) is snapshotted: nothing may change, and
//! acme's audit log may gain only the `auth.token_refused` event that
//! IssueToken documents; globex's refused delegation reads are audited in
//! globex's own log. Afterwards acme's objects still work. A last phase
//! covers delegations both tenants are party to: globex may revoke what it
//! receives (both logs record it) but not relinquish it, and a request of
//! globex's bot to acme is BLOCKED with the same events in both logs.

use std::collections::BTreeMap;
use std::time::Duration;

use sea_orm::{ConnectionTrait, DatabaseBackend, Statement};
use tonic::Code;
use vaultguard_client::{ClientError, DelegationOutcome, VaultGuardClient, pb};
use vaultguard_server::grpc::access::{Access, access_for};
use vaultguard_tests::oauth_provider::{FakeProvider, ProviderOptions};
use vaultguard_tests::{
    PendingStepUp, TestOptions, TestServer, approve_step_up, expect_code, expect_reason,
    request_step_up,
};

use crate::delegations::ask;
use crate::policies::{add_rule, inbound, outbound, with_counterpart};
use crate::vault_connections::{connect, fake_provider, register};
use crate::vault_signing::create_key;
use crate::webhooks::Receiver;

use pb::ErrorReason as Reason;
use vaultguard_tests::contract::every_method;

/// The trusted OIDC issuer acme's external organisation is bound to (never
/// contacted: only the binding matters here).
const IDP: &str = "http://127.0.0.1:9/idp";

// ---------------------------------------------------------------------------
// Calls.

/// One unary RPC as `client`, with its bearer.
macro_rules! rpc {
    ($client:expr, $service:ident . $method:ident, $message:expr) => {{
        let client: &VaultGuardClient = $client;
        async {
            let request = client.request($message).await?;
            let response = client.$service().$method(request).await?;
            Ok::<_, ClientError>(response.into_inner())
        }
        .await
    }};
}

/// A server-streaming RPC as `client`: the messages until the stream ends,
/// or until `stop` says a message is the last one wanted, or one second of
/// silence; an error status at the start or on the way is returned.
macro_rules! stream {
    ($client:expr, $service:ident . $method:ident, $message:expr, $stop:expr) => {{
        let client: &VaultGuardClient = $client;
        async {
            let request = client.request($message).await?;
            let mut stream = client.$service().$method(request).await?.into_inner();
            let mut messages = Vec::new();
            while let Ok(next) =
                tokio::time::timeout(Duration::from_secs(3), stream.message()).await
            {
                match next? {
                    Some(message) => {
                        let last = $stop(&message);
                        messages.push(message);
                        if last {
                            break;
                        }
                    }
                    None => break,
                }
            }
            Ok::<_, ClientError>(messages)
        }
        .await
    }};
}

// ---------------------------------------------------------------------------
// The two tenants.

/// The victim: everything acme has, with the ids and secrets an attacker
/// could have learnt.
struct Victim {
    tenant: pb::Tenant,
    admin: VaultGuardClient,
    approver: VaultGuardClient,
    auditor: VaultGuardClient,
    bot: pb::Agent,
    bot_secret: String,
    agent: VaultGuardClient,
    disabled: pb::Agent,
    rules: Vec<pb::Rule>,
    /// Two budgets of acme (on an action nothing else asks for).
    budgets: Vec<pb::Budget>,
    /// An ACTIVE delegation within acme, its idempotency key and token.
    active: pb::DelegationGrant,
    active_key: String,
    /// A PENDING delegation within acme and its step-up.
    pending: PendingStepUp,
    /// An ACTIVE delegation acme's bot holds on globex.
    shared: pb::DelegationGrant,
    provider: pb::OAuthProvider,
    connection_id: String,
    key: pb::SigningKey,
    signature_key: String,
    webhook_url: String,
    /// acme's registered OAuth return origins.
    return_origins: Vec<String>,
    org: pb::ExternalOrganization,
    head_sequence: u64,
    head_hash: String,
    /// A receipt of acme's chain head.
    head_receipt: String,
    /// Page tokens acme's own listings handed out (page size 1).
    agents_page: String,
    rules_page: String,
    budgets_page: String,
    delegations_page: String,
    audit_page: String,
}

/// The attacker: globex's principals, one per role.
struct Attacker {
    tenant: pb::Tenant,
    admin: VaultGuardClient,
    approver: VaultGuardClient,
    auditor: VaultGuardClient,
    agent: VaultGuardClient,
    bot_secret: String,
    /// globex's own provider (to aim StartConnection at acme's connection).
    provider: pb::OAuthProvider,
    /// A token of an ACTIVE delegation of globex's bot on globex for
    /// `exchange:mail`, a valid subject token for globex's connections.
    exchange_token: String,
    webhook_url: String,
    anonymous: VaultGuardClient,
}

struct Fixture {
    server: TestServer,
    a: Victim,
    b: Attacker,
    _oauth: FakeProvider,
    _receiver: Receiver,
}

fn granted(outcome: Result<DelegationOutcome, ClientError>) -> pb::DelegationGrant {
    match outcome {
        Ok(DelegationOutcome::Allowed { grant, .. }) => grant,
        other => panic!("expected ALLOW, got {other:?}"),
    }
}

fn keyed(key: &str, request: pb::RequestDelegationRequest) -> pb::RequestDelegationRequest {
    pb::RequestDelegationRequest {
        idempotency_key: key.to_owned(),
        ..request
    }
}

fn sign_request(key_id: &str, idempotency_key: &str) -> pb::SignRequest {
    pb::SignRequest {
        key_id: key_id.to_owned(),
        payload: Some(pb::sign_request::Payload::Message(pb::SignMessage {
            data: b"pay 10 EUR to acme-supplier".to_vec(),
            scheme: pb::SigningScheme::Ed25519Pure as i32,
        })),
        idempotency_key: idempotency_key.to_owned(),
        ..Default::default()
    }
}

fn page(page_token: &str) -> Option<pb::PageRequest> {
    Some(pb::PageRequest {
        page_size: 1,
        page_token: page_token.to_owned(),
    })
}

async fn setup() -> Fixture {
    let server = TestServer::start_with(TestOptions::trusting(IDP)).await;
    let operator = server.operator().await;

    // --- acme, the victim.
    let acme = server.create_tenant("acme").await;
    let org = pb::ExternalOrganization {
        issuer: IDP.to_owned(),
        organization_id: "org_acme".to_owned(),
    };
    rpc!(
        &operator,
        tenants.bind_external_organization,
        pb::BindExternalOrganizationRequest {
            tenant_id: acme.id.clone(),
            organization: Some(org.clone()),
        }
    )
    .expect("bind acme's organisation");
    let (bot, bot_secret, agent) = server.create_agent(&acme.id, "bot").await;
    let (disabled, _, _) = server.create_agent(&acme.id, "retired").await;
    let admin = server.admin(&acme.id, "alice").await;
    let approver = server.approver(&acme.id, "carol").await;
    let auditor = server.human(&acme.id, "audrey", &[pb::Role::Auditor]).await;
    rpc!(
        &admin,
        agents.disable_agent,
        pb::DisableAgentRequest {
            agent_id: disabled.id.clone(),
        }
    )
    .expect("disable acme's retired agent");
    let own = |pattern: &str, effect| with_counterpart(&acme.id, inbound(pattern, effect));
    let mut rules = Vec::new();
    for (pattern, effect) in [
        ("stock.read", pb::Effect::Allow),
        ("stock.write", pb::Effect::StepUp),
        ("sign:treasury", pb::Effect::Allow),
        ("exchange:mail", pb::Effect::Allow),
    ] {
        // Every scope of the vault's provider may be exchanged.
        let grants = if pattern.starts_with("exchange:") {
            vec!["*".to_owned()]
        } else {
            Vec::new()
        };
        let rule = pb::Rule {
            scopes: grants,
            ..own(pattern, effect)
        };
        rules.push(add_rule(&admin, rule).await);
    }

    // --- globex, the attacker (it receives acme's shared delegation).
    let globex = server.create_tenant("globex").await;
    let (_, b_bot_secret, b_agent) = server.create_agent(&globex.id, "globex-bot").await;
    let b_admin = server.admin(&globex.id, "mallory").await;
    let b_approver = server.approver(&globex.id, "trudy").await;
    let b_auditor = server.human(&globex.id, "eve", &[pb::Role::Auditor]).await;
    add_rule(&b_admin, inbound("shared.read", pb::Effect::Allow)).await;
    add_rule(
        &b_admin,
        with_counterpart(&globex.id, inbound("exchange:mail", pb::Effect::Allow)),
    )
    .await;

    // --- acme's delegations: ACTIVE and PENDING within acme, ACTIVE on globex.
    let active_key = "acme-order-1".to_owned();
    let active = granted(
        agent
            .request_delegation(keyed(&active_key, ask(&acme.id, "stock.read")))
            .await,
    );
    let pending = request_step_up(&agent, &approver, ask(&acme.id, "stock.write")).await;
    let shared = granted(
        agent
            .request_delegation(ask(&globex.id, "shared.read"))
            .await,
    );
    let exchange_token = granted(
        b_agent
            .request_delegation(ask(&globex.id, "exchange:mail"))
            .await,
    )
    .token;

    // --- acme's vault: a provider with a CONNECTED account, a key and a
    // signature; globex registers the same provider under the same name.
    let oauth = fake_provider(&server, ProviderOptions::default()).await;
    let provider = register(&admin, "mail", &oauth).await;
    let connection_id = connect(&admin, &provider.id).await.id;
    let b_provider = register(&b_admin, "mail", &oauth).await;
    let return_origins = vec!["https://console.acme.example".to_owned()];
    rpc!(
        &admin,
        vault.update_vault_settings,
        pb::UpdateVaultSettingsRequest {
            return_origins: return_origins.clone(),
        }
    )
    .expect("acme's return origins");
    let key = create_key(&admin, "treasury", pb::KeyAlgorithm::Ed25519, "")
        .await
        .expect("create acme's key");
    let signature_key = "acme-payment-1".to_owned();
    let signed = agent
        .sign(sign_request(&key.id, &signature_key))
        .await
        .expect("acme signs");
    assert!(matches!(
        signed.outcome,
        Some(pb::sign_response::Outcome::Signed(_))
    ));

    // --- acme's approval webhook, delivered to a real receiver.
    let receiver = Receiver::start().await;
    rpc!(
        &admin,
        step_ups.set_approval_webhook,
        pb::SetApprovalWebhookRequest {
            url: receiver.url.clone(),
        }
    )
    .expect("acme's webhook");

    // --- page tokens acme's listings hand out.
    let agents_page = rpc!(
        &admin,
        agents.list_agents,
        pb::ListAgentsRequest {
            page: page(""),
            ..Default::default()
        }
    )
    .expect("acme lists agents")
    .page
    .expect("page")
    .next_page_token;
    let rules_page = rpc!(
        &admin,
        policies.list_rules,
        pb::ListRulesRequest {
            page: page(""),
            ..Default::default()
        }
    )
    .expect("acme lists rules")
    .page
    .expect("page")
    .next_page_token;
    let mut budgets = Vec::new();
    for name in ["orders", "payments"] {
        let budget = pb::Budget {
            name: name.to_owned(),
            direction: pb::RuleDirection::Outbound as i32,
            measure: pb::BudgetMeasure::Count as i32,
            scope: Some(pb::BudgetScope {
                action_pattern: format!("budgets.{name}"),
                agent_id: bot.id.clone(),
                ..Default::default()
            }),
            window_seconds: 3600,
            limit: "100".to_owned(),
            over_limit: pb::Effect::Block as i32,
            ..Default::default()
        };
        budgets.push(
            rpc!(
                &admin,
                policies.create_budget,
                pb::CreateBudgetRequest {
                    budget: Some(budget)
                }
            )
            .expect("acme creates a budget")
            .budget
            .expect("budget"),
        );
    }
    let budgets_page = rpc!(
        &admin,
        policies.list_budgets,
        pb::ListBudgetsRequest { page: page("") }
    )
    .expect("acme lists budgets")
    .page
    .expect("page")
    .next_page_token;
    let delegations_page = rpc!(
        &admin,
        delegations.list_delegations,
        pb::ListDelegationsRequest {
            page: page(""),
            ..Default::default()
        }
    )
    .expect("acme lists delegations")
    .page
    .expect("page")
    .next_page_token;
    let audit_page = rpc!(
        &auditor,
        audit.list_audit_events,
        pb::ListAuditEventsRequest {
            include_unsealed: true,
            page: page(""),
            ..Default::default()
        }
    )
    .expect("acme lists its audit log")
    .page
    .expect("page")
    .next_page_token;
    for token in [
        &agents_page,
        &rules_page,
        &budgets_page,
        &delegations_page,
        &audit_page,
    ] {
        assert!(!token.is_empty(), "acme has more than one of each");
    }

    server.wait_sealed().await;
    let head = rpc!(
        &auditor,
        audit.verify_audit_chain,
        pb::VerifyAuditChainRequest {
            include_receipt: true,
            ..Default::default()
        }
    )
    .expect("acme's chain");
    assert!(head.ok && head.head_sequence > 0, "{head:?}");

    let anonymous = server.anonymous().await;
    let victim = Victim {
        tenant: acme,
        admin,
        approver,
        auditor,
        bot,
        bot_secret,
        agent,
        disabled,
        rules,
        budgets,
        active,
        active_key,
        pending,
        shared,
        provider,
        connection_id,
        key,
        signature_key,
        webhook_url: receiver.url.clone(),
        return_origins,
        org,
        head_sequence: head.head_sequence,
        head_hash: head.head_hash,
        head_receipt: head.receipt,
        agents_page,
        rules_page,
        budgets_page,
        delegations_page,
        audit_page,
    };
    let attacker = Attacker {
        tenant: globex,
        admin: b_admin,
        approver: b_approver,
        auditor: b_auditor,
        agent: b_agent,
        bot_secret: b_bot_secret,
        provider: b_provider,
        exchange_token,
        webhook_url: "http://127.0.0.1:9/globex-hooks".to_owned(),
        anonymous,
    };
    Fixture {
        server,
        a: victim,
        b: attacker,
        _oauth: oauth,
        _receiver: receiver,
    }
}

// ---------------------------------------------------------------------------
// Who attacks each RPC.

struct Principal<'a> {
    /// The principal's role; `Unspecified` for no credential.
    role: pb::Role,
    client: &'a VaultGuardClient,
}

impl Attacker {
    /// The principals of globex that call `path`: those whose role the
    /// matrix admits; all four when it admits none of them (operator-only
    /// RPCs, refused to every tenant principal); no credential for the
    /// public RPCs.
    fn principals(&self, path: &str) -> Vec<Principal<'_>> {
        let all = [
            (pb::Role::Admin, &self.admin),
            (pb::Role::Approver, &self.approver),
            (pb::Role::Auditor, &self.auditor),
            (pb::Role::Agent, &self.agent),
        ];
        match access_for(path) {
            Some(Access::Public) => vec![Principal {
                role: pb::Role::Unspecified,
                client: &self.anonymous,
            }],
            Some(Access::Roles(roles)) => {
                let admitted: Vec<Principal<'_>> = all
                    .iter()
                    .filter(|(role, _)| roles.contains(role))
                    .map(|(role, client)| Principal {
                        role: *role,
                        client,
                    })
                    .collect();
                if admitted.is_empty() {
                    all.iter()
                        .map(|(role, client)| Principal {
                            role: *role,
                            client,
                        })
                        .collect()
                } else {
                    admitted
                }
            }
            None => panic!("{path} has no entry in the role matrix"),
        }
    }
}

// ---------------------------------------------------------------------------
// Expectations.

#[track_caller]
fn not_found<T: std::fmt::Debug>(result: Result<T, ClientError>) {
    expect_code(result, Code::NotFound);
}

/// PERMISSION_DENIED with ERROR_REASON_ROLE_REQUIRED: the role matrix (or
/// the domain's role check) refuses before any object is looked up.
#[track_caller]
fn role_required<T: std::fmt::Debug>(result: Result<T, ClientError>) {
    expect_reason(result, Code::PermissionDenied, Reason::RoleRequired);
}

/// A page token acme received is refused to globex (tokens are bound to the
/// tenant and filters).
#[track_caller]
fn foreign_page_token<T: std::fmt::Debug>(result: Result<T, ClientError>) {
    vaultguard_tests::expect_invalid(result, "page.page_token");
}

// ---------------------------------------------------------------------------
// One case per RPC.

/// Runs the case of `path` as `who`; `false` when the sweep has no case for
/// `path`.
async fn case(f: &Fixture, path: &str, who: &Principal<'_>) -> bool {
    let (a, b, c) = (&f.a, &f.b, who.client);
    let agent = who.role == pb::Role::Agent;
    let admin = who.role == pb::Role::Admin;
    match path {
        // ------------------------------------------------------------ tenants
        // Operator-only: refused to every tenant principal, whatever the id.
        "/vaultguard.v1.TenantService/CreateTenant" => role_required(rpc!(
            c,
            tenants.create_tenant,
            pb::CreateTenantRequest {
                slug: "acme-2".to_owned(),
                display_name: a.tenant.display_name.clone(),
                settings: None,
            }
        )),
        // Another tenant's id answers NOT_FOUND to every tenant principal.
        "/vaultguard.v1.TenantService/GetTenant" => not_found(rpc!(
            c,
            tenants.get_tenant,
            pb::GetTenantRequest {
                tenant_id: a.tenant.id.clone(),
            }
        )),
        "/vaultguard.v1.TenantService/ListTenants" => role_required(rpc!(
            c,
            tenants.list_tenants,
            pb::ListTenantsRequest::default()
        )),
        "/vaultguard.v1.TenantService/SuspendTenant" => role_required(rpc!(
            c,
            tenants.suspend_tenant,
            pb::SuspendTenantRequest {
                tenant_id: a.tenant.id.clone(),
                reason: "hostile".to_owned(),
            }
        )),
        "/vaultguard.v1.TenantService/ReactivateTenant" => role_required(rpc!(
            c,
            tenants.reactivate_tenant,
            pb::ReactivateTenantRequest {
                tenant_id: a.tenant.id.clone(),
                reason: "hostile".to_owned(),
            }
        )),
        "/vaultguard.v1.TenantService/BindExternalOrganization" => {
            // Neither binding another organisation to acme nor stealing
            // acme's binding for globex.
            role_required(rpc!(
                c,
                tenants.bind_external_organization,
                pb::BindExternalOrganizationRequest {
                    tenant_id: a.tenant.id.clone(),
                    organization: Some(pb::ExternalOrganization {
                        issuer: IDP.to_owned(),
                        organization_id: "org_globex".to_owned(),
                    }),
                }
            ));
            role_required(rpc!(
                c,
                tenants.bind_external_organization,
                pb::BindExternalOrganizationRequest {
                    tenant_id: b.tenant.id.clone(),
                    organization: Some(a.org.clone()),
                }
            ));
        }
        "/vaultguard.v1.TenantService/UnbindExternalOrganization" => role_required(rpc!(
            c,
            tenants.unbind_external_organization,
            pb::UnbindExternalOrganizationRequest {
                tenant_id: a.tenant.id.clone(),
                organization: Some(a.org.clone()),
            }
        )),
        // No tenant field: it changes the caller's own tenant only.
        "/vaultguard.v1.TenantService/UpdateTenantSettings" => {
            let tenant = rpc!(
                c,
                tenants.update_tenant_settings,
                pb::UpdateTenantSettingsRequest {
                    settings: Some(pb::TenantSettings {
                        token_algorithm: pb::TokenAlgorithm::Es256 as i32,
                    }),
                }
            )
            .expect("globex updates its own settings")
            .tenant
            .expect("tenant");
            assert_eq!(tenant.id, b.tenant.id);
        }

        // ------------------------------------------------------------- agents
        // No tenant field: the agent lands in globex, even with acme's
        // agent's name.
        "/vaultguard.v1.AgentService/CreateAgent" => {
            let created = rpc!(
                c,
                agents.create_agent,
                pb::CreateAgentRequest {
                    name: a.bot.name.clone(),
                    description: String::new(),
                }
            )
            .expect("globex creates an agent named like acme's")
            .agent
            .expect("agent");
            assert_eq!(created.tenant_id, b.tenant.id);
            assert_ne!(created.id, a.bot.id);
        }
        "/vaultguard.v1.AgentService/GetAgent" => {
            for id in [&a.bot.id, &a.disabled.id] {
                not_found(rpc!(
                    c,
                    agents.get_agent,
                    pb::GetAgentRequest {
                        agent_id: id.clone(),
                    }
                ));
            }
        }
        // Lists only globex's agents; acme's page token is refused.
        "/vaultguard.v1.AgentService/ListAgents" => {
            let listed = rpc!(c, agents.list_agents, pb::ListAgentsRequest::default())
                .expect("globex lists its agents");
            assert!(!listed.agents.is_empty());
            for agent in &listed.agents {
                assert_eq!(agent.tenant_id, b.tenant.id, "{agent:?}");
            }
            foreign_page_token(rpc!(
                c,
                agents.list_agents,
                pb::ListAgentsRequest {
                    page: page(&a.agents_page),
                    ..Default::default()
                }
            ));
        }
        "/vaultguard.v1.AgentService/DisableAgent" => not_found(rpc!(
            c,
            agents.disable_agent,
            pb::DisableAgentRequest {
                agent_id: a.bot.id.clone(),
            }
        )),
        "/vaultguard.v1.AgentService/EnableAgent" => not_found(rpc!(
            c,
            agents.enable_agent,
            pb::EnableAgentRequest {
                agent_id: a.disabled.id.clone(),
            }
        )),
        // The kill switch: another tenant's agent does not exist for
        // globex, and globex may not name acme's traffic.
        "/vaultguard.v1.AgentService/FreezeAgent" => not_found(rpc!(
            c,
            agents.freeze_agent,
            pb::FreezeAgentRequest {
                agent_id: a.bot.id.clone(),
                reason: "probe".to_owned(),
            }
        )),
        "/vaultguard.v1.AgentService/UnfreezeAgent" => not_found(rpc!(
            c,
            agents.unfreeze_agent,
            pb::UnfreezeAgentRequest {
                agent_id: a.bot.id.clone(),
                reason: "probe".to_owned(),
            }
        )),
        "/vaultguard.v1.TenantService/FreezeTenantTraffic" => {
            expect_reason(
                rpc!(
                    c,
                    tenants.freeze_tenant_traffic,
                    pb::FreezeTenantTrafficRequest {
                        tenant_id: a.tenant.id.clone(),
                        reason: "probe".to_owned(),
                    }
                ),
                Code::PermissionDenied,
                Reason::TenantMismatch,
            );
        }
        "/vaultguard.v1.TenantService/UnfreezeTenantTraffic" => {
            expect_reason(
                rpc!(
                    c,
                    tenants.unfreeze_tenant_traffic,
                    pb::UnfreezeTenantTrafficRequest {
                        tenant_id: a.tenant.id.clone(),
                        reason: "probe".to_owned(),
                    }
                ),
                Code::PermissionDenied,
                Reason::TenantMismatch,
            );
        }
        "/vaultguard.v1.AgentService/RotateAgentSecret" => not_found(rpc!(
            c,
            agents.rotate_agent_secret,
            pb::RotateAgentSecretRequest {
                agent_id: a.bot.id.clone(),
            }
        )),

        // --------------------------------------------------------------- auth
        // Public: acme's client_id with globex's real secret is
        // UNAUTHENTICATED, like any wrong secret; the contract records the
        // refusal in the AGENT's tenant's log (acme's `auth.token_refused`,
        // the one event the sweep lets acme's log gain).
        "/vaultguard.v1.AuthService/IssueToken" => {
            let refused = c
                .auth()
                .issue_token(pb::IssueTokenRequest {
                    grant_type: "client_credentials".to_owned(),
                    client_id: a.bot.id.clone(),
                    client_secret: b.bot_secret.clone(),
                })
                .await;
            expect_reason(refused, Code::Unauthenticated, Reason::Unauthenticated);
        }
        // No input: it describes the caller, always in globex.
        "/vaultguard.v1.AuthService/WhoAmI" => {
            let me = rpc!(c, auth.who_am_i, pb::WhoAmIRequest {}).expect("who am i");
            assert_eq!(me.actor.expect("actor").tenant_id, b.tenant.id);
        }

        // -------------------------------------------------------- issuer keys
        // Public and platform-wide: the JWKS holds no tenant's object.
        "/vaultguard.v1.IssuerKeyService/GetJwks" => {
            let jwks = c
                .issuer_keys()
                .get_jwks(pb::GetJwksRequest {})
                .await
                .expect("jwks")
                .into_inner();
            assert!(!jwks.jwks_json.contains(&a.tenant.id));
        }
        "/vaultguard.v1.IssuerKeyService/ListIssuerKeys" => role_required(rpc!(
            c,
            issuer_keys.list_issuer_keys,
            pb::ListIssuerKeysRequest {}
        )),
        "/vaultguard.v1.IssuerKeyService/RotateIssuerKey" => role_required(rpc!(
            c,
            issuer_keys.rotate_issuer_key,
            pb::RotateIssuerKeyRequest::default()
        )),

        // ----------------------------------------------------------- policies
        // No tenant field: an output-only `id` naming acme's rule is
        // INVALID_ARGUMENT; a rule about acme as counterpart lands in globex.
        "/vaultguard.v1.PolicyService/CreateRule" => {
            let hijack = pb::Rule {
                id: a.rules[0].id.clone(),
                ..inbound("stock.read", pb::Effect::Allow)
            };
            vaultguard_tests::expect_invalid(
                rpc!(
                    c,
                    policies.create_rule,
                    pb::CreateRuleRequest { rule: Some(hijack) }
                ),
                "rule.id",
            );
            let created = rpc!(
                c,
                policies.create_rule,
                pb::CreateRuleRequest {
                    rule: Some(with_counterpart(
                        &a.tenant.id,
                        inbound("stock.read", pb::Effect::Allow),
                    )),
                }
            )
            .expect("globex creates a rule about acme")
            .rule
            .expect("rule");
            assert!(a.rules.iter().all(|rule| rule.id != created.id));
            // An outbound rule judges the tenant's own agents: naming acme's
            // agent is NOT_FOUND (the same answer as an unknown agent).
            not_found(rpc!(
                c,
                policies.create_rule,
                pb::CreateRuleRequest {
                    rule: Some(pb::Rule {
                        agent_id: a.bot.id.clone(),
                        ..outbound("stock.read", pb::Effect::Allow)
                    }),
                }
            ));
            not_found(rpc!(
                &a.admin,
                policies.get_rule,
                pb::GetRuleRequest {
                    rule_id: created.id.clone(),
                }
            ));
        }
        "/vaultguard.v1.PolicyService/GetRule" => {
            for rule in &a.rules {
                not_found(rpc!(
                    c,
                    policies.get_rule,
                    pb::GetRuleRequest {
                        rule_id: rule.id.clone(),
                    }
                ));
            }
        }
        // Lists only globex's rules, even filtered on acme as counterpart.
        "/vaultguard.v1.PolicyService/ListRules" => {
            let listed = rpc!(
                c,
                policies.list_rules,
                pb::ListRulesRequest {
                    counterpart_tenant_id: a.tenant.id.clone(),
                    ..Default::default()
                }
            )
            .expect("globex lists its rules");
            for rule in &listed.rules {
                assert!(a.rules.iter().all(|own| own.id != rule.id), "{rule:?}");
            }
            foreign_page_token(rpc!(
                c,
                policies.list_rules,
                pb::ListRulesRequest {
                    page: page(&a.rules_page),
                    ..Default::default()
                }
            ));
        }
        "/vaultguard.v1.PolicyService/UpdateRule" => {
            let rule = &a.rules[0];
            let widened = pb::Rule {
                counterpart_tenant_id: String::new(),
                ..rule.clone()
            };
            not_found(rpc!(
                c,
                policies.update_rule,
                pb::UpdateRuleRequest {
                    rule: Some(widened),
                    expected_version: rule.version,
                }
            ));
        }
        "/vaultguard.v1.PolicyService/DeleteRule" => {
            let rule = &a.rules[0];
            not_found(rpc!(
                c,
                policies.delete_rule,
                pb::DeleteRuleRequest {
                    rule_id: rule.id.clone(),
                    expected_version: rule.version,
                }
            ));
        }
        // An output-only `id` naming acme's budget is INVALID_ARGUMENT; an
        // OUTBOUND budget naming acme's agent, an agent that is not
        // globex's, is NOT_FOUND; acme's budgets are out of reach.
        "/vaultguard.v1.PolicyService/CreateBudget" => {
            let ours = |scope: pb::BudgetScope| pb::Budget {
                name: "hijack".to_owned(),
                id: String::new(),
                scope: Some(scope),
                version: 0,
                create_time: None,
                update_time: None,
                used: String::new(),
                remaining: String::new(),
                next_release_time: None,
                ..a.budgets[0].clone()
            };
            vaultguard_tests::expect_invalid(
                rpc!(
                    c,
                    policies.create_budget,
                    pb::CreateBudgetRequest {
                        budget: Some(pb::Budget {
                            id: a.budgets[0].id.clone(),
                            ..ours(pb::BudgetScope::default())
                        }),
                    }
                ),
                "budget.id",
            );
            not_found(rpc!(
                c,
                policies.create_budget,
                pb::CreateBudgetRequest {
                    budget: Some(ours(pb::BudgetScope {
                        agent_id: a.bot.id.clone(),
                        ..Default::default()
                    })),
                }
            ));
            not_found(rpc!(
                c,
                policies.create_budget,
                pb::CreateBudgetRequest {
                    budget: Some(ours(pb::BudgetScope {
                        signing_key_id: a.key.id.clone(),
                        ..Default::default()
                    })),
                }
            ));
        }
        "/vaultguard.v1.PolicyService/GetBudget" => {
            for budget in &a.budgets {
                not_found(rpc!(
                    c,
                    policies.get_budget,
                    pb::GetBudgetRequest {
                        budget_id: budget.id.clone(),
                    }
                ));
            }
        }
        "/vaultguard.v1.PolicyService/ListBudgets" => {
            let listed = rpc!(c, policies.list_budgets, pb::ListBudgetsRequest::default())
                .expect("globex lists its budgets");
            for budget in &listed.budgets {
                assert!(
                    a.budgets.iter().all(|own| own.id != budget.id),
                    "{budget:?}"
                );
            }
            foreign_page_token(rpc!(
                c,
                policies.list_budgets,
                pb::ListBudgetsRequest {
                    page: page(&a.budgets_page),
                }
            ));
        }
        "/vaultguard.v1.PolicyService/UpdateBudget" => {
            let budget = &a.budgets[0];
            not_found(rpc!(
                c,
                policies.update_budget,
                pb::UpdateBudgetRequest {
                    budget_id: budget.id.clone(),
                    expected_version: budget.version,
                    limit: "1000000".to_owned(),
                    window_seconds: 60,
                    over_limit: pb::Effect::StepUp as i32,
                    description: String::new(),
                }
            ));
        }
        "/vaultguard.v1.PolicyService/DeleteBudget" => {
            for budget in &a.budgets {
                not_found(rpc!(
                    c,
                    policies.delete_budget,
                    pb::DeleteBudgetRequest {
                        budget_id: budget.id.clone(),
                    }
                ));
            }
        }
        // An admin naming acme's agent: NOT_FOUND (not an agent of its
        // tenant); an agent naming another agent: PERMISSION_DENIED
        // ROLE_REQUIRED, as the contract says.
        "/vaultguard.v1.PolicyService/EvaluatePolicy" => {
            let result = rpc!(
                c,
                policies.evaluate_policy,
                pb::EvaluatePolicyRequest {
                    requesting_agent_id: a.bot.id.clone(),
                    receiving_tenant_id: b.tenant.id.clone(),
                    action: "stock.read".to_owned(),
                    requested_ttl_seconds: 600,
                    ..Default::default()
                }
            );
            if agent {
                role_required(result);
            } else {
                not_found(result);
            }
        }
        // No input: globex's own settings.
        "/vaultguard.v1.PolicyService/GetPolicySettings" => {
            rpc!(
                c,
                policies.get_policy_settings,
                pb::GetPolicySettingsRequest {}
            )
            .expect("globex reads its settings");
        }
        // No tenant field: changes globex's settings only.
        "/vaultguard.v1.PolicyService/UpdatePolicySettings" => {
            rpc!(
                c,
                policies.update_policy_settings,
                pb::UpdatePolicySettingsRequest {
                    outbound_default: pb::OutboundDefault::Allow as i32,
                    expected_policy_version: 0,
                }
            )
            .expect("globex updates its settings");
        }

        // -------------------------------------------------------- delegations
        // acme's bot's idempotency key is scoped to acme's bot: globex's bot
        // using it gets its own judgement (globex has no inbound rule for
        // it, so BLOCK with a BLOCKED record of its own), never acme's
        // delegation or token.
        "/vaultguard.v1.DelegationService/RequestDelegation" => {
            let metadata = expect_reason(
                c.request_delegation(keyed(&a.active_key, ask(&b.tenant.id, "stock.read")))
                    .await,
                Code::PermissionDenied,
                Reason::NoMatchingRule,
            );
            let delegation = metadata.get("delegation_id").expect("delegation_id");
            assert_ne!(delegation, &a.active.delegation.as_ref().expect("d").id);
        }
        // acme's internal delegations are NOT_FOUND to every globex role;
        // the shared one is visible to globex's humans (a party) but not to
        // globex's agent (it did not request it).
        "/vaultguard.v1.DelegationService/GetDelegation" => {
            let mut ids = vec![
                a.active.delegation.as_ref().expect("d").id.clone(),
                a.pending.delegation_id.clone(),
            ];
            if agent {
                ids.push(a.shared.delegation.as_ref().expect("d").id.clone());
            }
            for id in ids {
                not_found(rpc!(
                    c,
                    delegations.get_delegation,
                    pb::GetDelegationRequest { delegation_id: id }
                ));
            }
        }
        // Lists only delegations globex is a party to, even filtered on
        // acme and acme's bot; acme's page token is refused.
        "/vaultguard.v1.DelegationService/ListDelegations" => {
            let listed = rpc!(
                c,
                delegations.list_delegations,
                pb::ListDelegationsRequest {
                    counterpart_tenant_id: a.tenant.id.clone(),
                    requesting_agent_id: a.bot.id.clone(),
                    ..Default::default()
                }
            )
            .expect("globex lists its delegations");
            let shared = &a.shared.delegation.as_ref().expect("d").id;
            let ids: Vec<&String> = listed.delegations.iter().map(|d| &d.id).collect();
            if agent {
                assert!(ids.is_empty(), "{ids:?}");
            } else {
                assert_eq!(ids, vec![shared], "only the shared delegation");
            }
            foreign_page_token(rpc!(
                c,
                delegations.list_delegations,
                pb::ListDelegationsRequest {
                    page: page(&a.delegations_page),
                    ..Default::default()
                }
            ));
        }
        "/vaultguard.v1.DelegationService/RevokeDelegation" => {
            for id in [
                &a.active.delegation.as_ref().expect("d").id,
                &a.pending.delegation_id,
            ] {
                not_found(rpc!(
                    c,
                    delegations.revoke_delegation,
                    pb::RevokeDelegationRequest {
                        delegation_id: id.clone(),
                        reason: "hostile".to_owned(),
                    }
                ));
            }
        }
        // acme's internal delegation is NOT_FOUND; the shared one is
        // PERMISSION_DENIED TENANT_MISMATCH for globex's admin (globex only
        // receives it: it may revoke, never relinquish) and NOT_FOUND for
        // globex's agent (not its delegation).
        "/vaultguard.v1.DelegationService/RelinquishDelegation" => {
            not_found(
                c.relinquish(&a.active.delegation.as_ref().expect("d").id, "")
                    .await,
            );
            let shared = c
                .relinquish(&a.shared.delegation.as_ref().expect("d").id, "")
                .await;
            if admin {
                expect_reason(shared, Code::PermissionDenied, Reason::TenantMismatch);
            } else {
                not_found(shared);
            }
        }
        // The contract answers OK with only `active: false` for a token
        // addressed to another tenant (never saying why).
        "/vaultguard.v1.DelegationService/VerifyDelegationToken" => {
            let verified = rpc!(
                c,
                delegations.verify_delegation_token,
                pb::VerifyDelegationTokenRequest {
                    token: a.active.token.clone(),
                    required_action: String::new(),
                }
            )
            .expect("verify answers");
            assert_eq!(verified, pb::VerifyDelegationTokenResponse::default());
        }

        // ----------------------------------------------------------- step-ups
        // CIBA: an auth_req_id bound to another agent is invalid_grant
        // (FAILED_PRECONDITION), exactly like an unknown one.
        "/vaultguard.v1.StepUpService/PollStepUp" => {
            expect_reason(
                rpc!(
                    c,
                    step_ups.poll_step_up,
                    pb::PollStepUpRequest {
                        auth_req_id: a.pending.auth_req_id.clone(),
                    }
                ),
                Code::FailedPrecondition,
                Reason::InvalidGrant,
            );
        }
        "/vaultguard.v1.StepUpService/WatchStepUp" => {
            expect_reason(
                stream!(
                    c,
                    step_ups.watch_step_up,
                    pb::WatchStepUpRequest {
                        auth_req_id: a.pending.auth_req_id.clone(),
                        heartbeat_interval_seconds: 1,
                    },
                    |_: &pb::WatchStepUpResponse| true
                ),
                Code::FailedPrecondition,
                Reason::InvalidGrant,
            );
        }
        "/vaultguard.v1.StepUpService/GetStepUp" => not_found(rpc!(
            c,
            step_ups.get_step_up,
            pb::GetStepUpRequest {
                step_up_id: a.pending.step_up_id.clone(),
            }
        )),
        // Only globex's queue, even filtered on acme as requester.
        "/vaultguard.v1.StepUpService/ListPendingStepUps" => {
            let listed = rpc!(
                c,
                step_ups.list_pending_step_ups,
                pb::ListPendingStepUpsRequest {
                    requesting_tenant_id: a.tenant.id.clone(),
                    ..Default::default()
                }
            )
            .expect("globex lists its queue");
            assert!(listed.step_ups.is_empty(), "{:?}", listed.step_ups);
        }
        // Only globex's queue: neither the snapshot (empty cursor) nor the
        // replay of every change since the first (cursor 0, which covers
        // acme's ADDED change) shows acme's step-up.
        "/vaultguard.v1.StepUpService/WatchPendingStepUps" => {
            for cursor in ["", "0"] {
                let messages = stream!(
                    c,
                    step_ups.watch_pending_step_ups,
                    pb::WatchPendingStepUpsRequest {
                        cursor: cursor.to_owned(),
                        heartbeat_interval_seconds: 1,
                    },
                    |m: &pb::WatchPendingStepUpsResponse| matches!(
                        m.event,
                        Some(pb::watch_pending_step_ups_response::Event::Heartbeat(_))
                    )
                )
                .expect("globex watches its queue");
                assert!(
                    messages.iter().all(|m| !matches!(
                        m.event,
                        Some(pb::watch_pending_step_ups_response::Event::Change(_))
                    )),
                    "{messages:?}"
                );
            }
        }
        "/vaultguard.v1.StepUpService/ApproveStepUp" => {
            not_found(approve_step_up(c, &a.pending.step_up_id, &a.pending.request_hash).await)
        }
        "/vaultguard.v1.StepUpService/DenyStepUp" => not_found(rpc!(
            c,
            step_ups.deny_step_up,
            pb::DenyStepUpRequest {
                step_up_id: a.pending.step_up_id.clone(),
                reason: "hostile".to_owned(),
            }
        )),
        // No tenant field: sets globex's webhook only.
        "/vaultguard.v1.StepUpService/SetApprovalWebhook" => {
            let set = rpc!(
                c,
                step_ups.set_approval_webhook,
                pb::SetApprovalWebhookRequest {
                    url: b.webhook_url.clone(),
                }
            )
            .expect("globex sets its webhook");
            assert_eq!(set.webhook.expect("webhook").url, b.webhook_url);
        }
        // globex's own webhook (set in the fixture's sweep order or not):
        // never acme's.
        "/vaultguard.v1.StepUpService/GetApprovalWebhook" => {
            match rpc!(
                c,
                step_ups.get_approval_webhook,
                pb::GetApprovalWebhookRequest {}
            ) {
                Ok(got) => assert_eq!(got.webhook.expect("webhook").url, b.webhook_url),
                other => not_found(other),
            }
        }

        // -------------------------------------------------------------- vault
        // No tenant field: a provider named like acme's lands in globex (which
        // already has `mail`, so another name).
        "/vaultguard.v1.VaultService/CreateOAuthProvider" => {
            let p = &a.provider;
            let created = rpc!(
                c,
                vault.create_o_auth_provider,
                pb::CreateOAuthProviderRequest {
                    name: "mail-copy".to_owned(),
                    authorize_url: p.authorize_url.clone(),
                    token_url: p.token_url.clone(),
                    revocation_url: p.revocation_url.clone(),
                    client_id: p.client_id.clone(),
                    client_secret: String::new(),
                    scopes: p.scopes.clone(),
                    extra_authorize_params: p.extra_authorize_params.clone(),
                }
            )
            .expect("globex registers a provider")
            .provider
            .expect("provider");
            assert_ne!(created.id, a.provider.id);
        }
        "/vaultguard.v1.VaultService/GetOAuthProvider" => not_found(rpc!(
            c,
            vault.get_o_auth_provider,
            pb::GetOAuthProviderRequest {
                provider_id: a.provider.id.clone(),
            }
        )),
        "/vaultguard.v1.VaultService/ListOAuthProviders" => {
            let listed = rpc!(
                c,
                vault.list_o_auth_providers,
                pb::ListOAuthProvidersRequest::default()
            )
            .expect("globex lists its providers");
            assert!(!listed.providers.is_empty());
            assert!(listed.providers.iter().all(|p| p.id != a.provider.id));
        }
        "/vaultguard.v1.VaultService/UpdateOAuthProvider" => {
            let p = &a.provider;
            not_found(rpc!(
                c,
                vault.update_o_auth_provider,
                pb::UpdateOAuthProviderRequest {
                    provider_id: p.id.clone(),
                    authorize_url: p.authorize_url.clone(),
                    token_url: b.webhook_url.clone(),
                    revocation_url: p.revocation_url.clone(),
                    client_id: p.client_id.clone(),
                    client_secret: String::new(),
                    clear_client_secret: false,
                    scopes: p.scopes.clone(),
                    extra_authorize_params: p.extra_authorize_params.clone(),
                }
            ));
        }
        "/vaultguard.v1.VaultService/DeleteOAuthProvider" => not_found(rpc!(
            c,
            vault.delete_o_auth_provider,
            pb::DeleteOAuthProviderRequest {
                provider_id: a.provider.id.clone(),
            }
        )),
        // acme's provider, and acme's connection re-authorized through
        // globex's own provider: both NOT_FOUND.
        "/vaultguard.v1.VaultService/StartConnection" => {
            not_found(rpc!(
                c,
                vault.start_connection,
                pb::StartConnectionRequest {
                    provider_id: a.provider.id.clone(),
                    ..Default::default()
                }
            ));
            not_found(rpc!(
                c,
                vault.start_connection,
                pb::StartConnectionRequest {
                    provider_id: b.provider.id.clone(),
                    connection_id: a.connection_id.clone(),
                    ..Default::default()
                }
            ));
        }
        "/vaultguard.v1.VaultService/GetConnection" => not_found(rpc!(
            c,
            vault.get_connection,
            pb::GetConnectionRequest {
                connection_id: a.connection_id.clone(),
            }
        )),
        // Filtered on acme's provider: globex has no such connection.
        "/vaultguard.v1.VaultService/ListConnections" => {
            let listed = rpc!(
                c,
                vault.list_connections,
                pb::ListConnectionsRequest {
                    provider_id: a.provider.id.clone(),
                    ..Default::default()
                }
            )
            .expect("globex lists its connections");
            assert!(listed.connections.is_empty(), "{:?}", listed.connections);
        }
        "/vaultguard.v1.VaultService/DeleteConnection" => not_found(rpc!(
            c,
            vault.delete_connection,
            pb::DeleteConnectionRequest {
                connection_id: a.connection_id.clone(),
            }
        )),
        // acme's connection on globex's own authority: NOT_FOUND; with
        // globex's own valid delegation token (receiving globex): NOT_FOUND
        // (looked up in the token's receiving tenant); with acme's stolen
        // delegation token: FAILED_PRECONDITION INVALID_GRANT (issued to
        // another agent), as the contract says for a mismatched token.
        "/vaultguard.v1.VaultService/ExchangeToken" => {
            not_found(c.exchange(&a.connection_id, &[]).await);
            not_found(
                c.exchange_delegated(&b.exchange_token, &a.connection_id, &[])
                    .await,
            );
            expect_reason(
                c.exchange_delegated(&a.active.token, &a.connection_id, &[])
                    .await,
                Code::FailedPrecondition,
                Reason::InvalidGrant,
            );
        }
        // No tenant field: a key named like acme's lands in globex.
        "/vaultguard.v1.VaultService/CreateSigningKey" => {
            let created = create_key(c, &a.key.name, pb::KeyAlgorithm::Ed25519, "")
                .await
                .expect("globex creates a key named like acme's");
            assert_ne!(created.id, a.key.id);
        }
        "/vaultguard.v1.VaultService/GetSigningKey" => not_found(rpc!(
            c,
            vault.get_signing_key,
            pb::GetSigningKeyRequest {
                key_id: a.key.id.clone(),
            }
        )),
        "/vaultguard.v1.VaultService/ListSigningKeys" => {
            let listed = rpc!(
                c,
                vault.list_signing_keys,
                pb::ListSigningKeysRequest::default()
            )
            .expect("globex lists its keys");
            assert!(listed.keys.iter().all(|k| k.id != a.key.id));
        }
        "/vaultguard.v1.VaultService/UpdateSigningKey" => not_found(rpc!(
            c,
            vault.update_signing_key,
            pb::UpdateSigningKeyRequest {
                key_id: a.key.id.clone(),
                disable_digest_signing: Some(true),
                reason: "hostile".to_owned(),
            }
        )),
        "/vaultguard.v1.VaultService/DisableSigningKey" => not_found(rpc!(
            c,
            vault.disable_signing_key,
            pb::DisableSigningKeyRequest {
                key_id: a.key.id.clone(),
                reason: "hostile".to_owned(),
            }
        )),
        // acme's key with acme's signature's idempotency key and payload.
        "/vaultguard.v1.VaultService/Sign" => {
            not_found(c.sign(sign_request(&a.key.id, &a.signature_key)).await)
        }
        // No tenant field: globex's own settings, never acme's origins.
        "/vaultguard.v1.VaultService/GetVaultSettings" => {
            let settings = rpc!(c, vault.get_vault_settings, pb::GetVaultSettingsRequest {})
                .expect("globex reads its vault settings")
                .settings
                .expect("settings");
            assert!(
                settings
                    .return_origins
                    .iter()
                    .all(|origin| !a.return_origins.contains(origin)),
                "{settings:?}"
            );
        }
        // No tenant field: changes globex's settings only (acme's are
        // checked unchanged by the snapshot and by still_works).
        "/vaultguard.v1.VaultService/UpdateVaultSettings" => {
            let settings = rpc!(
                c,
                vault.update_vault_settings,
                pb::UpdateVaultSettingsRequest {
                    return_origins: vec!["https://console.globex.example".to_owned()],
                }
            )
            .expect("globex updates its vault settings")
            .settings
            .expect("settings");
            assert_eq!(settings.return_origins, ["https://console.globex.example"]);
        }

        // -------------------------------------------------------------- audit
        // Only globex's log, even filtered on acme's ids; acme's page token
        // is refused.
        "/vaultguard.v1.AuditService/ListAuditEvents" => {
            for (subject_id, actor_subject) in [
                (a.active.delegation.as_ref().expect("d").id.clone(), ""),
                (String::new(), a.bot.id.as_str()),
            ] {
                let listed = rpc!(
                    c,
                    audit.list_audit_events,
                    pb::ListAuditEventsRequest {
                        subject_id,
                        actor_subject: actor_subject.to_owned(),
                        include_unsealed: true,
                        ..Default::default()
                    }
                )
                .expect("globex lists its log");
                assert!(listed.events.iter().all(|e| e.tenant_id == b.tenant.id));
            }
            foreign_page_token(rpc!(
                c,
                audit.list_audit_events,
                pb::ListAuditEventsRequest {
                    include_unsealed: true,
                    page: page(&a.audit_page),
                    ..Default::default()
                }
            ));
        }
        // After acme's head sequence: OUT_OF_RANGE when globex's own log is
        // shorter, else globex's events only.
        "/vaultguard.v1.AuditService/TailAuditEvents" => {
            f.server.wait_sealed().await;
            let own_head = head_of(&f.server, &b.tenant.id).await;
            let tail = stream!(
                c,
                audit.tail_audit_events,
                pb::TailAuditEventsRequest {
                    after_sequence: a.head_sequence,
                    heartbeat_interval_seconds: 1,
                    ..Default::default()
                },
                |m: &pb::TailAuditEventsResponse| matches!(
                    m.item,
                    Some(pb::tail_audit_events_response::Item::Heartbeat(_))
                )
            );
            // globex's log grows during the sweep, so OUT_OF_RANGE is
            // allowed only while its head was below acme's before the call.
            match tail {
                Err(err) if a.head_sequence > own_head => {
                    assert_eq!(err.code(), Some(Code::OutOfRange), "{err:?}");
                }
                tail => {
                    for message in tail.expect("globex tails its log") {
                        if let Some(pb::tail_audit_events_response::Item::Event(event)) =
                            message.item
                        {
                            assert_eq!(event.tenant_id, b.tenant.id);
                        }
                    }
                }
            }
        }
        // The whole export is globex's log.
        "/vaultguard.v1.AuditService/ExportAuditEvents" => {
            let parts = stream!(
                c,
                audit.export_audit_events,
                pb::ExportAuditEventsRequest {
                    format: pb::ExportFormat::Ndjson as i32,
                    ..Default::default()
                },
                |_: &pb::ExportAuditEventsResponse| false
            )
            .expect("globex exports its log");
            let mut file = Vec::new();
            for part in parts {
                if let Some(pb::export_audit_events_response::Part::Data(data)) = part.part {
                    file.extend_from_slice(&data);
                }
            }
            let text = String::from_utf8(file).expect("utf-8 export");
            assert!(text.lines().count() > 0);
            for line in text.lines() {
                let event: serde_json::Value = serde_json::from_str(line).expect("ndjson line");
                assert_eq!(event["tenant_id"], b.tenant.id.as_str(), "{line}");
            }
        }
        // globex's own chain, never acme's head.
        "/vaultguard.v1.AuditService/VerifyAuditChain" => {
            let verified = rpc!(
                c,
                audit.verify_audit_chain,
                pb::VerifyAuditChainRequest {
                    include_receipt: true,
                    ..Default::default()
                }
            )
            .expect("globex verifies its chain");
            assert!(verified.ok, "{verified:?}");
            assert_ne!(verified.head_hash, a.head_hash);
            let from_acme_head = rpc!(
                c,
                audit.verify_audit_chain,
                pb::VerifyAuditChainRequest {
                    from_sequence: a.head_sequence,
                    ..Default::default()
                }
            );
            match from_acme_head {
                Err(err) if a.head_sequence > verified.head_sequence => {
                    assert_eq!(err.code(), Some(Code::OutOfRange), "{err:?}");
                }
                from_acme_head => {
                    assert_ne!(from_acme_head.expect("verify").head_hash, a.head_hash);
                }
            }
            // acme's receipt does not continue globex's verification.
            let since_acme = rpc!(
                c,
                audit.verify_audit_chain,
                pb::VerifyAuditChainRequest {
                    since_receipt: a.head_receipt.clone(),
                    ..Default::default()
                }
            )
            .expect_err("acme's receipt is refused");
            assert_eq!(
                since_acme.code(),
                Some(Code::InvalidArgument),
                "{since_acme:?}"
            );
            assert!(
                format!("{since_acme:?}").contains("since_receipt"),
                "{since_acme:?}"
            );
        }
        _ => return false,
    }
    true
}

/// `tenant_id`'s sealed head sequence, read from the database.
async fn head_of(server: &TestServer, tenant_id: &str) -> u64 {
    let db = &server.state.db;
    let row = db
        .query_one_raw(Statement::from_string(
            db.get_database_backend(),
            format!(
                "SELECT seq FROM audit_heads WHERE tenant_id = '{}'",
                checked_id(tenant_id)
            ),
        ))
        .await
        .expect("head query");
    row.map_or(0, |row| {
        u64::try_from(row.try_get::<i64>("", "seq").expect("seq")).expect("positive")
    })
}

// ---------------------------------------------------------------------------
// The victim's rows.

/// An id safe to inline in SQL (`tnt_` and hex digits).
fn checked_id(id: &str) -> &str {
    assert!(
        id.starts_with("tnt_") && id[4..].chars().all(|c| c.is_ascii_hexdigit()),
        "not a tenant id: {id}"
    );
    id
}

/// The tables whose changes by a sealed acme event are allowed, because
/// acme's log may gain the documented `auth.token_refused`: its chain
/// bookkeeping. Checked instead by VerifyAuditChain afterwards.
const CHAIN_TABLES: [&str; 3] = ["audit_chain", "audit_heads", "audit_pending"];

/// Columns naming a tenant that do not make a row the tenant's: the actor
/// of an event in another tenant's log, a rule's counterpart.
const NOT_OWNING: [&str; 2] = ["actor_tenant_id", "counterpart_tenant_id"];

/// One table's rows of the victim: column names and every row as text.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rows {
    columns: Vec<String>,
    rows: Vec<Vec<Option<String>>>,
}

/// Every row of `tenant_id` in every table (found in the database's own
/// catalogue, so a new table is covered without editing this file): rows
/// whose tenant column names it, its `tenants` row, and whole tables that
/// have no tenant column (issuer keys, approvals, migrations).
async fn snapshot(server: &TestServer, tenant_id: &str) -> BTreeMap<String, Rows> {
    let db = &server.state.db;
    let backend = db.get_database_backend();
    let catalogue = match backend {
        DatabaseBackend::Sqlite => {
            "SELECT m.name AS t, p.name AS c FROM sqlite_master m \
             JOIN pragma_table_info(m.name) p WHERE m.type = 'table' \
             AND m.name NOT LIKE 'sqlite_%' ORDER BY m.name, p.cid"
        }
        _ => {
            "SELECT table_name::text AS t, column_name::text AS c \
             FROM information_schema.columns WHERE table_schema = current_schema() \
             ORDER BY table_name, ordinal_position"
        }
    };
    let mut tables: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for row in db
        .query_all_raw(Statement::from_string(backend, catalogue))
        .await
        .expect("catalogue")
    {
        let table: String = row.try_get("", "t").expect("table");
        let column: String = row.try_get("", "c").expect("column");
        tables.entry(table).or_default().push(column);
    }
    assert!(tables.contains_key("delegations"), "{tables:?}");
    let tenant = checked_id(tenant_id);
    let mut snapshot = BTreeMap::new();
    for (table, columns) in tables {
        if CHAIN_TABLES.contains(&table.as_str()) {
            continue;
        }
        let owning: Vec<&String> = columns
            .iter()
            .filter(|c| {
                (c.as_str() == "tenant_id" || c.ends_with("_tenant_id"))
                    && !NOT_OWNING.contains(&c.as_str())
            })
            .collect();
        let filter = if table == "tenants" {
            format!(" WHERE id = '{tenant}'")
        } else if owning.is_empty() {
            String::new()
        } else {
            let any: Vec<String> = owning
                .iter()
                .map(|c| format!("\"{c}\" = '{tenant}'"))
                .collect();
            format!(" WHERE {}", any.join(" OR "))
        };
        let select: Vec<String> = columns
            .iter()
            .enumerate()
            .map(|(i, c)| match backend {
                DatabaseBackend::Sqlite => format!(
                    "CASE typeof(\"{c}\") WHEN 'blob' THEN hex(\"{c}\") \
                     ELSE CAST(\"{c}\" AS TEXT) END AS c{i}"
                ),
                _ => format!("CAST(\"{c}\" AS TEXT) AS c{i}"),
            })
            .collect();
        let sql = format!("SELECT {} FROM \"{table}\"{filter}", select.join(", "));
        let mut rows: Vec<Vec<Option<String>>> = db
            .query_all_raw(Statement::from_string(backend, sql))
            .await
            .unwrap_or_else(|e| panic!("read {table}: {e}"))
            .iter()
            .map(|row| {
                (0..columns.len())
                    .map(|i| {
                        row.try_get::<Option<String>>("", &format!("c{i}"))
                            .unwrap_or_else(|e| panic!("{table}.{}: {e}", columns[i]))
                    })
                    .collect()
            })
            .collect();
        rows.sort();
        snapshot.insert(table, Rows { columns, rows });
    }
    snapshot
}

/// Asserts `after` equals `before`, except that acme's log may have gained
/// exactly the events of `allowed_new` (event type, count).
fn assert_unchanged(
    before: &BTreeMap<String, Rows>,
    after: &BTreeMap<String, Rows>,
    allowed_new: &[(&str, usize)],
) {
    let mut changed = Vec::new();
    for (table, rows) in after {
        let Some(old) = before.get(table) else {
            changed.push(format!("{table}: a new table"));
            continue;
        };
        if table == "audit_events" {
            continue;
        }
        if old != rows {
            let gone: Vec<_> = old.rows.iter().filter(|r| !rows.rows.contains(r)).collect();
            let new: Vec<_> = rows.rows.iter().filter(|r| !old.rows.contains(r)).collect();
            changed.push(format!(
                "{table} {:?}: gone {gone:?}, new {new:?}",
                rows.columns
            ));
        }
    }
    assert!(
        changed.is_empty(),
        "the victim's rows changed: {changed:#?}"
    );

    let old = &before["audit_events"];
    let now = &after["audit_events"];
    for row in &old.rows {
        assert!(
            now.rows.contains(row),
            "an acme audit event changed: {row:?}"
        );
    }
    let kind = now
        .columns
        .iter()
        .position(|c| c == "event_type")
        .expect("event_type column");
    let mut new_types: BTreeMap<String, usize> = BTreeMap::new();
    for row in now.rows.iter().filter(|r| !old.rows.contains(r)) {
        *new_types
            .entry(row[kind].clone().unwrap_or_default())
            .or_default() += 1;
    }
    let allowed: BTreeMap<String, usize> = allowed_new
        .iter()
        .map(|(t, n)| ((*t).to_owned(), *n))
        .collect();
    assert_eq!(new_types, allowed, "events the sweep added to acme's log");
}

/// Waits until acme's webhook has been handed every change of acme's queue,
/// so the deliverer no longer touches acme's rows.
async fn wait_webhook_idle(server: &TestServer, tenant_id: &str) {
    let db = &server.state.db;
    let tenant = checked_id(tenant_id);
    let sql = format!(
        "SELECT w.delivered_change_id AS delivered, \
         (SELECT MAX(id) FROM step_up_changes WHERE tenant_id = '{tenant}') AS latest \
         FROM tenant_webhooks w WHERE w.tenant_id = '{tenant}'"
    );
    for _ in 0..200 {
        let row = db
            .query_one_raw(Statement::from_string(
                db.get_database_backend(),
                sql.clone(),
            ))
            .await
            .expect("webhook query")
            .expect("acme's webhook row");
        let delivered: i64 = row.try_get("", "delivered").expect("delivered");
        let latest: Option<i64> = row.try_get("", "latest").expect("latest");
        if latest.is_some_and(|latest| delivered >= latest) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("acme's webhook was not delivered");
}

// ---------------------------------------------------------------------------
// The sweep.

#[tokio::test]
async fn every_rpc_keeps_another_tenants_objects_out_of_reach() {
    let started = std::time::Instant::now();
    let f = setup().await;
    let (a, b) = (&f.a, &f.b);
    let fixture_time = started.elapsed();

    f.server.wait_sealed().await;
    wait_webhook_idle(&f.server, &a.tenant.id).await;
    let before = snapshot(&f.server, &a.tenant.id).await;

    let methods: Vec<String> = every_method().into_iter().map(|m| m.path).collect();
    assert!(methods.len() >= 61, "the contract: {}", methods.len());
    let mut uncovered = Vec::new();
    let mut calls = 0;
    for path in &methods {
        for who in b.principals(path) {
            eprintln!("isolation: {path} as globex {:?}", who.role);
            calls += 1;
            if !case(&f, path, &who).await {
                uncovered.push(path.clone());
                break;
            }
        }
    }
    assert!(
        uncovered.is_empty(),
        "RPCs the isolation sweep does not cover: {uncovered:?}"
    );

    f.server.wait_sealed().await;
    let after = snapshot(&f.server, &a.tenant.id).await;
    // IssueToken with acme's client_id records its refusal in acme's log
    // (the contract: "the audit log of the agent's tenant records which");
    // every other attempt is audited in globex's log or not at all.
    // One more: the CreateRule case checks that acme's own admin cannot read
    // the rule globex just created; that NOT_FOUND is in acme's log as
    // `auth.not_found`, as every NOT_FOUND is in its caller's log.
    assert_unchanged(
        &before,
        &after,
        &[("auth.token_refused", 1), ("auth.not_found", 1)],
    );
    let refused = f
        .server
        .audit_events(&a.tenant.id, "auth.token_refused")
        .await;
    let last = refused.last().expect("the refusal");
    assert_eq!(last.details, r#"{"reason":"invalid_client_secret"}"#);
    // The refused delegation reads are audited in the CALLER's log.
    let probed = &a.active.delegation.as_ref().expect("d").id;
    assert!(
        f.server
            .audit_count(&b.tenant.id, "delegation.not_found", probed)
            .await
            > 0,
        "globex's attempts on acme's delegation are in globex's log"
    );
    // Every other NOT_FOUND is in the caller's log as `auth.not_found`,
    // naming the method (acme's log, checked above, has none of them).
    let not_found = f.server.audit_events(&b.tenant.id, "auth.not_found").await;
    for method in [
        "/vaultguard.v1.AgentService/GetAgent",
        "/vaultguard.v1.PolicyService/GetRule",
        "/vaultguard.v1.StepUpService/GetStepUp",
        "/vaultguard.v1.VaultService/GetOAuthProvider",
        "/vaultguard.v1.VaultService/GetConnection",
        "/vaultguard.v1.VaultService/GetSigningKey",
        "/vaultguard.v1.TenantService/GetTenant",
    ] {
        assert!(
            not_found.iter().any(
                |event| event.details == format!(r#"{{"method":"{method}"}}"#)
                    && event.outcome == "denied"
            ),
            "globex's NOT_FOUND on {method} is audited in globex's log"
        );
    }
    let sweep_time = started.elapsed() - fixture_time;

    // acme's objects all still work.
    still_works(&f).await;
    // The delegation both tenants are party to.
    shared_delegation(&f).await;

    eprintln!(
        "isolation: {} RPCs, {calls} calls, fixture {fixture_time:?}, sweep {sweep_time:?}, total {:?}",
        methods.len(),
        started.elapsed()
    );
    f.server.stop().await;
}

/// acme's agent, delegations, step-up, connection, key, webhook, binding and
/// chain are intact and usable after the sweep.
async fn still_works(f: &Fixture) {
    let (a, server) = (&f.a, &f.server);
    // The agent still gets a token with its (unrotated) secret.
    let fresh = server
        .anonymous()
        .await
        .with_client_credentials(a.bot.id.clone(), a.bot_secret.clone());
    fresh.bearer().await.expect("acme's bot still gets a token");
    // The ACTIVE delegation still verifies.
    let verified = a
        .admin
        .verify(&a.active.token, "")
        .await
        .expect("acme verifies");
    assert!(verified.active);
    assert_eq!(verified.jti, a.active.delegation.as_ref().expect("d").id);
    // The pending step-up can still be approved, and its token redeemed.
    approve_step_up(&a.approver, &a.pending.step_up_id, &a.pending.request_hash)
        .await
        .expect("acme approves its step-up");
    let redeemed = rpc!(
        &a.agent,
        step_ups.poll_step_up,
        pb::PollStepUpRequest {
            auth_req_id: a.pending.auth_req_id.clone(),
        }
    )
    .expect("acme's bot redeems");
    assert!(!redeemed.access_token.is_empty());
    // The connected account still exchanges, the key still signs.
    let exchanged = a
        .agent
        .exchange(&a.connection_id, &[])
        .await
        .expect("acme exchanges");
    assert!(!exchanged.access_token.is_empty());
    let signed = a
        .agent
        .sign(sign_request(&a.key.id, "acme-payment-2"))
        .await
        .expect("acme signs");
    assert!(matches!(
        signed.outcome,
        Some(pb::sign_response::Outcome::Signed(_))
    ));
    // The webhook, the binding, the disabled agent and the rules are as set.
    let webhook = rpc!(
        &a.admin,
        step_ups.get_approval_webhook,
        pb::GetApprovalWebhookRequest {}
    )
    .expect("acme's webhook");
    assert_eq!(webhook.webhook.expect("webhook").url, a.webhook_url);
    let vault_settings = rpc!(
        &a.admin,
        vault.get_vault_settings,
        pb::GetVaultSettingsRequest {}
    )
    .expect("acme's vault settings")
    .settings
    .expect("settings");
    assert_eq!(vault_settings.return_origins, a.return_origins);
    let tenant = rpc!(
        &a.admin,
        tenants.get_tenant,
        pb::GetTenantRequest::default()
    )
    .expect("acme's tenant")
    .tenant
    .expect("tenant");
    assert_eq!(tenant.status(), pb::TenantStatus::Active);
    assert_eq!(tenant.external_organizations, vec![a.org.clone()]);
    let rules = rpc!(
        &a.admin,
        policies.list_rules,
        pb::ListRulesRequest::default()
    )
    .expect("acme's rules")
    .rules;
    assert_eq!(rules.len(), a.rules.len());
    // The chain still verifies.
    server.wait_sealed().await;
    let chain = rpc!(
        &a.auditor,
        audit.verify_audit_chain,
        pb::VerifyAuditChainRequest::default()
    )
    .expect("acme's chain");
    assert!(chain.ok, "{chain:?}");
}

/// acme's bot holds a delegation on globex: globex (receiving) may revoke it
/// (both logs record it), may not relinquish it, and reaches nothing else of
/// acme through it.
async fn shared_delegation(f: &Fixture) {
    let (a, b, server) = (&f.a, &f.b, &f.server);
    let shared = a.shared.delegation.as_ref().expect("d");
    // Visible to globex as a party, with acme's side of the decision
    // redacted by the contract; its ids lead nowhere else.
    let seen = b
        .admin
        .get_delegation(&shared.id)
        .await
        .expect("globex reads the shared delegation");
    assert_eq!(seen.requesting_agent_id, a.bot.id);
    not_found(rpc!(
        &b.admin,
        agents.get_agent,
        pb::GetAgentRequest {
            agent_id: seen.requesting_agent_id.clone(),
        }
    ));
    let requesting = seen
        .decision
        .and_then(|d| d.outbound)
        .expect("acme's side of the decision");
    assert_eq!(requesting.tenant_id, a.tenant.id);
    assert_eq!(
        requesting.explanation, "decided by the requesting tenant's policy",
        "acme's explanation is redacted for globex"
    );
    if !requesting.rule_id.is_empty() {
        not_found(rpc!(
            &b.admin,
            policies.get_rule,
            pb::GetRuleRequest {
                rule_id: requesting.rule_id.clone(),
            }
        ));
    }
    expect_reason(
        b.admin.relinquish(&shared.id, "").await,
        Code::PermissionDenied,
        Reason::TenantMismatch,
    );
    let revoked = b
        .admin
        .revoke(&shared.id, "no longer trusted")
        .await
        .expect("globex revokes what it receives");
    assert_eq!(revoked.status(), pb::DelegationStatus::Revoked);
    // The revocation is in both parties' logs, once each.
    for tenant in [&a.tenant.id, &b.tenant.id] {
        assert_eq!(
            server
                .audit_count(tenant, "delegation.revoked", &shared.id)
                .await,
            1,
            "in {tenant}'s log"
        );
    }
    let inactive = b
        .admin
        .verify(&a.shared.token, "")
        .await
        .expect("globex verifies");
    assert!(!inactive.active);

    // The other direction is no attack but changes acme by design: globex's
    // bot may ask acme for anything (tenant ids are addresses); acme's
    // inbound rules name only acme, so it is BLOCKED, and the BLOCKED record
    // and its events are in both parties' logs, identically.
    // acme's idempotency key with acme's exact parameters: the key is
    // globex's bot's own (bound to its BLOCKED request of the sweep), so a
    // conflict — never a replay of acme's delegation.
    expect_reason(
        b.agent
            .request_delegation(keyed(&a.active_key, ask(&a.tenant.id, "stock.read")))
            .await,
        Code::AlreadyExists,
        Reason::IdempotencyConflict,
    );
    let metadata = expect_reason(
        b.agent
            .request_delegation(ask(&a.tenant.id, "stock.read"))
            .await,
        Code::PermissionDenied,
        Reason::NoMatchingRule,
    );
    let blocked = metadata.get("delegation_id").expect("delegation_id");
    assert_ne!(blocked, &a.active.delegation.as_ref().expect("d").id);
    let logged = |auditor: &VaultGuardClient| {
        let auditor = auditor.clone();
        let blocked = blocked.clone();
        async move {
            let mut types: Vec<String> = rpc!(
                &auditor,
                audit.list_audit_events,
                pb::ListAuditEventsRequest {
                    subject_id: blocked,
                    include_unsealed: true,
                    ..Default::default()
                }
            )
            .expect("list")
            .events
            .into_iter()
            .map(|e| e.event_type)
            .collect();
            types.sort();
            types
        }
    };
    let in_acme = logged(&a.auditor).await;
    assert!(!in_acme.is_empty());
    assert_eq!(
        in_acme,
        logged(&b.auditor).await,
        "the same events in both logs"
    );
}
