//! The parties every scenario uses, set up once per server over real gRPC:
//! a requesting tenant with an agent, receiving tenants that sign with
//! RS256, ES256 and EdDSA, their rules, the requesting tenant's custodied
//! keys and a connected account on a local fake OAuth provider.

use std::collections::HashMap;

use anyhow::{Context, Result, ensure};
use vaultguard_client::{VaultGuardClient, pb};
use vaultguard_tests::oauth_provider::{FakeProvider, ProviderOptions};

use crate::server::ServerProcess;
use vaultguard_tests::Rpc;

/// The action every ALLOW delegation asks for (an inbound ALLOW rule of each
/// receiving tenant matches `bench.*`).
pub const ALLOW_ACTION: &str = "bench.read";
/// An action the requester's budget counts (its receivers allow `bench.*`).
pub const BUDGET_ACTION: &str = "bench.budgeted";
/// The action the step-up scenario asks for (`pay.*`: STEP_UP, quorum 1).
pub const STEP_UP_ACTION: &str = "pay.invoice";
/// The provider the exchange scenario uses (action `exchange:benchmail`).
const PROVIDER_NAME: &str = "benchmail";

/// A tenant and a client of its admin.
pub struct Tenant {
    pub id: String,
    pub admin: VaultGuardClient,
}

/// What [`Fixture::set_up`] made which the scenarios need.
pub struct Fixture {
    pub requester: Tenant,
    pub agent_id: String,
    pub agent_secret: String,
    /// Receiving tenants by token algorithm: "rs256", "es256", "eddsa".
    pub receivers: HashMap<&'static str, Tenant>,
    /// An approver of the RS256 receiver (which judges `pay.*` STEP_UP).
    pub approver: VaultGuardClient,
    /// Custodied keys of the requester: "ed25519", "secp256k1".
    pub keys: HashMap<&'static str, String>,
    /// Filled by [`Fixture::connect_account`].
    pub connection_id: Option<String>,
    /// The provider behind `connection_id`; stops when dropped.
    provider: Option<FakeProvider>,
}

/// Unwraps a response message field the contract promises.
fn required<T>(field: Option<T>, what: &'static str) -> Result<T> {
    field.with_context(|| format!("the response has no {what}"))
}

pub async fn create_tenant(
    server: &ServerProcess,
    operator: &VaultGuardClient,
    slug: &str,
    algorithm: pb::TokenAlgorithm,
) -> Result<Tenant> {
    let request = operator
        .request(pb::CreateTenantRequest {
            slug: slug.to_owned(),
            display_name: slug.to_owned(),
            settings: Some(pb::TenantSettings {
                token_algorithm: algorithm as i32,
            }),
        })
        .await?;
    let tenant = required(
        operator
            .tenants()
            .create_tenant(request)
            .await?
            .into_inner()
            .tenant,
        "tenant",
    )?;
    let admin = server.human("admin", Some(&tenant.id)).await?;
    // The setting again through UpdateTenantSettings, as an admin would.
    admin
        .update_tenant_settings(pb::UpdateTenantSettingsRequest {
            settings: Some(pb::TenantSettings {
                token_algorithm: algorithm as i32,
            }),
        })
        .await?;
    Ok(Tenant {
        id: tenant.id,
        admin,
    })
}

/// An inbound rule of `tenant` for `pattern`; `counterpart` names the
/// requesting tenant it applies to (empty: any).
pub async fn create_rule(
    tenant: &Tenant,
    pattern: &str,
    effect: pb::Effect,
    counterpart: &str,
) -> Result<()> {
    tenant
        .admin
        .create_rule(pb::CreateRuleRequest {
            rule: Some(pb::Rule {
                direction: pb::RuleDirection::Inbound as i32,
                action_pattern: pattern.to_owned(),
                counterpart_tenant_id: counterpart.to_owned(),
                effect: effect as i32,
                max_ttl_seconds: 3600,
                approvals_required: u32::from(effect == pb::Effect::StepUp),
                // Any scope: the exchange scenarios hand out the provider's
                // scopes, which the deciding rule must grant.
                scopes: vec!["*".to_owned()],
                ..Default::default()
            }),
        })
        .await?;
    Ok(())
}

impl Fixture {
    pub async fn set_up(server: &ServerProcess) -> Result<Self> {
        let operator = server.human("operator", None).await?;
        let requester = create_tenant(
            server,
            &operator,
            "bench-requester",
            pb::TokenAlgorithm::Rs256,
        )
        .await?;
        let created = requester
            .admin
            .create_agent(pb::CreateAgentRequest {
                name: "bench-bot".to_owned(),
                description: String::new(),
            })
            .await?;
        let agent_id = required(created.agent, "agent")?.id;

        let mut receivers = HashMap::new();
        for (name, algorithm) in [
            ("rs256", pb::TokenAlgorithm::Rs256),
            ("es256", pb::TokenAlgorithm::Es256),
            ("eddsa", pb::TokenAlgorithm::Eddsa),
        ] {
            let tenant =
                create_tenant(server, &operator, &format!("bench-{name}"), algorithm).await?;
            create_rule(&tenant, "bench.*", pb::Effect::Allow, "").await?;
            receivers.insert(name, tenant);
        }
        // A budget on BUDGET_ACTION: at most a billion a day, so it counts
        // every request and refuses none.
        let request = requester
            .admin
            .request(pb::CreateBudgetRequest {
                budget: Some(pb::Budget {
                    name: "bench-budget".to_owned(),
                    direction: pb::RuleDirection::Outbound as i32,
                    measure: pb::BudgetMeasure::Count as i32,
                    scope: Some(pb::BudgetScope {
                        action_pattern: BUDGET_ACTION.to_owned(),
                        ..Default::default()
                    }),
                    window_seconds: 86_400,
                    limit: "1000000000".to_owned(),
                    over_limit: pb::Effect::Block as i32,
                    ..Default::default()
                }),
            })
            .await?;
        requester.admin.policies().create_budget(request).await?;
        let rs256 = receivers.get("rs256").context("rs256 receiver")?;
        create_rule(rs256, "pay.*", pb::Effect::StepUp, "").await?;
        let approver = server.human("approver", Some(&rs256.id)).await?;

        let mut keys = HashMap::new();
        for (name, algorithm) in [
            ("ed25519", pb::KeyAlgorithm::Ed25519),
            ("secp256k1", pb::KeyAlgorithm::Secp256k1),
        ] {
            let key_name = format!("bench-{name}");
            let request = requester
                .admin
                .request(pb::CreateSigningKeyRequest {
                    name: key_name.clone(),
                    algorithm: algorithm as i32,
                    description: String::new(),
                    disable_digest_signing: false,
                })
                .await?;
            let key = required(
                requester
                    .admin
                    .vault()
                    .create_signing_key(request)
                    .await?
                    .into_inner()
                    .key,
                "key",
            )?;
            // The tenant's own policy judges its agents' signatures.
            let action = format!("sign:{key_name}");
            create_rule(&requester, &action, pb::Effect::Allow, &requester.id).await?;
            keys.insert(name, key.id);
        }
        Ok(Self {
            requester,
            agent_id,
            agent_secret: created.client_secret,
            receivers,
            approver,
            keys,
            connection_id: None,
            provider: None,
        })
    }

    /// Registers a local fake OAuth provider, connects an account through
    /// its authorize endpoint (as a browser would, following redirects back
    /// to VaultGuard's callback) and lets the requester's agents exchange.
    pub async fn connect_account(&mut self) -> Result<()> {
        let provider = FakeProvider::start(ProviderOptions::default()).await;
        let admin = &self.requester.admin;
        let request = admin
            .request(provider.registration(PROVIDER_NAME, &["mail.read"]))
            .await?;
        let registered = required(
            admin
                .vault()
                .create_o_auth_provider(request)
                .await?
                .into_inner()
                .provider,
            "provider",
        )?;
        let request = admin
            .request(pb::StartConnectionRequest {
                provider_id: registered.id,
                ..Default::default()
            })
            .await?;
        let started = admin.vault().start_connection(request).await?.into_inner();
        let page = reqwest::get(&started.authorize_url).await?;
        ensure!(
            page.status().is_success(),
            "the OAuth flow ended with {}",
            page.status()
        );
        let connection = required(started.connection, "connection")?;
        let action = format!("exchange:{PROVIDER_NAME}");
        create_rule(
            &self.requester,
            &action,
            pb::Effect::Allow,
            &self.requester.id,
        )
        .await?;
        self.connection_id = Some(connection.id);
        self.provider = Some(provider);
        Ok(())
    }

    /// The same parties on `server`, a restart of the server the fixture was
    /// set up on (same database, new ports): every human client gets a
    /// channel to it, with the bearer token it had (tokens are signed by
    /// the issuer keys in the database, so they stay valid).
    pub async fn reconnect(&mut self, server: &ServerProcess) -> Result<()> {
        async fn moved(
            client: &VaultGuardClient,
            server: &ServerProcess,
        ) -> Result<VaultGuardClient> {
            Ok(server
                .anonymous()
                .await?
                .with_bearer(client.bearer().await?))
        }
        self.requester.admin = moved(&self.requester.admin, server).await?;
        for tenant in self.receivers.values_mut() {
            tenant.admin = moved(&tenant.admin, server).await?;
        }
        self.approver = moved(&self.approver, server).await?;
        Ok(())
    }

    /// The agent, on `server`, with its own channel.
    pub async fn agent_on(&self, server: &ServerProcess) -> Result<VaultGuardClient> {
        Ok(server
            .anonymous()
            .await?
            .with_client_credentials(self.agent_id.clone(), self.agent_secret.clone()))
    }

    pub fn receiver(&self, algorithm: &str) -> Result<&Tenant> {
        self.receivers
            .get(algorithm)
            .with_context(|| format!("no {algorithm} receiver"))
    }

    /// An ALLOW delegation request to the `algorithm` receiver (a fresh
    /// idempotency key is filled in by the SDK).
    pub fn allow_request(&self, algorithm: &str) -> Result<pb::RequestDelegationRequest> {
        Ok(pb::RequestDelegationRequest {
            receiving_tenant_id: self.receiver(algorithm)?.id.clone(),
            action: ALLOW_ACTION.to_owned(),
            requested_ttl_seconds: 3600,
            ..Default::default()
        })
    }
}
