//! Builders for the objects most tests need — rules, request contexts,
//! delegation requests — and [`Pair`], the two tenants most tests play out
//! between: acme, whose agent `bot` asks, and globex, which receives, each
//! with an admin client.

use std::collections::HashMap;

use vaultguard_client::{ClientError, VaultGuardClient, pb};

use crate::{Rpc, TestServer};

// ---------------------------------------------------------------------------
// Rules and context values.

pub fn rule(direction: pb::RuleDirection, pattern: &str, effect: pb::Effect) -> pb::Rule {
    pb::Rule {
        direction: direction as i32,
        action_pattern: pattern.to_owned(),
        effect: effect as i32,
        ..Default::default()
    }
}

/// An inbound rule for any tenant and any agent.
pub fn inbound(pattern: &str, effect: pb::Effect) -> pb::Rule {
    rule(pb::RuleDirection::Inbound, pattern, effect)
}

/// An outbound rule for any tenant and any agent.
pub fn outbound(pattern: &str, effect: pb::Effect) -> pb::Rule {
    rule(pb::RuleDirection::Outbound, pattern, effect)
}

/// `rule` limited to the counterpart tenant `tenant_id`.
pub fn with_counterpart(tenant_id: &str, rule: pb::Rule) -> pb::Rule {
    pb::Rule {
        counterpart_tenant_id: tenant_id.to_owned(),
        ..rule
    }
}

/// `rule` with `conditions`.
pub fn when(conditions: Vec<pb::Condition>, rule: pb::Rule) -> pb::Rule {
    pb::Rule { conditions, ..rule }
}

pub fn num(value: f64) -> pb::AttributeValue {
    pb::AttributeValue {
        kind: Some(pb::attribute_value::Kind::NumberValue(value)),
    }
}

pub fn text(value: &str) -> pb::AttributeValue {
    pb::AttributeValue {
        kind: Some(pb::attribute_value::Kind::StringValue(value.to_owned())),
    }
}

/// A comparison of `attribute` with one operand.
pub fn cond(
    attribute: &str,
    operator: pb::ConditionOperator,
    value: pb::AttributeValue,
) -> pb::Condition {
    pb::Condition {
        attribute: attribute.to_owned(),
        operator: operator as i32,
        value: Some(value),
        values: Vec::new(),
        ..Default::default()
    }
}

/// A request context from pairs.
pub fn context(pairs: &[(&str, pb::AttributeValue)]) -> HashMap<String, pb::AttributeValue> {
    pairs
        .iter()
        .map(|(key, value)| ((*key).to_owned(), value.clone()))
        .collect()
}

// ---------------------------------------------------------------------------
// PolicyService calls.

pub async fn create_rule(
    admin: &VaultGuardClient,
    rule: pb::Rule,
) -> Result<pb::CreateRuleResponse, ClientError> {
    admin
        .create_rule(pb::CreateRuleRequest { rule: Some(rule) })
        .await
}

/// Creates `rule`, which must be valid; returns the stored rule.
pub async fn add_rule(admin: &VaultGuardClient, rule: pb::Rule) -> pb::Rule {
    create_rule(admin, rule)
        .await
        .expect("create rule")
        .rule
        .expect("rule")
}

// ---------------------------------------------------------------------------
// Delegation requests.

/// A request for `action` on `receiving` for 600 seconds, with no key (the
/// SDK fills in a random one).
pub fn ask(receiving: &str, action: &str) -> pb::RequestDelegationRequest {
    pb::RequestDelegationRequest {
        receiving_tenant_id: receiving.to_owned(),
        action: action.to_owned(),
        requested_ttl_seconds: 600,
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------
// A requesting tenant (acme, agent `bot`) and a receiving tenant (globex).

/// Binds parts of a [`Pair`] by reference in one line:
/// `parts!(pair => server, agent, globex_admin: admin)` is
/// `let Pair { server, agent, globex_admin: admin, .. } = &pair;`.
#[macro_export]
macro_rules! parts {
    ($pair:expr => $($field:ident $(: $alias:ident)?),+ $(,)?) => {
        let $crate::fixtures::Pair { $($field $(: $alias)?,)+ .. } = &$pair;
    };
}

pub struct Pair {
    pub server: TestServer,
    pub acme: pb::Tenant,
    pub globex: pb::Tenant,
    pub bot: pb::Agent,
    pub agent: VaultGuardClient,
    pub acme_admin: VaultGuardClient,
    pub globex_admin: VaultGuardClient,
}

pub async fn setup_pair() -> Pair {
    let server = TestServer::start().await;
    let acme = server.create_tenant("acme").await;
    let globex = server.create_tenant("globex").await;
    let (bot, _, agent) = server.create_agent(&acme.id, "bot").await;
    agent.bearer().await.expect("agent token");
    let acme_admin = server.human(&acme.id, "alice", &[pb::Role::Admin]).await;
    let globex_admin = server.human(&globex.id, "gina", &[pb::Role::Admin]).await;
    Pair {
        server,
        acme,
        globex,
        bot,
        agent,
        acme_admin,
        globex_admin,
    }
}

impl Pair {
    /// Globex lets any tenant's agents do `pattern`.
    pub async fn globex_allows(&self, pattern: &str) -> pb::Rule {
        add_rule(&self.globex_admin, inbound(pattern, pb::Effect::Allow)).await
    }

    /// Globex lets any tenant's agents do `pattern` with any scope and
    /// resource (`*`: what every rule granted before scopes were policy).
    pub async fn globex_allows_any_scope(&self, pattern: &str) -> pb::Rule {
        let rule = pb::Rule {
            scopes: vec!["*".into()],
            resources: vec!["*".into()],
            ..inbound(pattern, pb::Effect::Allow)
        };
        add_rule(&self.globex_admin, rule).await
    }

    /// A tenant that is no party to the pair's delegations, and its admin.
    pub async fn third_tenant(&self) -> (pb::Tenant, VaultGuardClient) {
        let initech = self.server.create_tenant("initech").await;
        let admin = self
            .server
            .human(&initech.id, "ian", &[pb::Role::Admin])
            .await;
        (initech, admin)
    }

    pub fn logs(&self) -> [&str; 2] {
        [self.acme.id.as_str(), self.globex.id.as_str()]
    }
}
