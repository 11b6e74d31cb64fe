//! SeaORM entities, one module per table. Times are milliseconds since the
//! Unix epoch; JSON-valued columns are TEXT holding serde_json.

pub mod tenant {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "tenants")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub slug: String,
        pub display_name: String,
        pub status: String,
        pub token_algorithm: String,
        pub outbound_default: String,
        pub policy_version: i64,
        pub created_at: i64,
        pub updated_at: i64,
        pub policy_updated_at: Option<i64>,
        /// JSON of the actor who last changed the policy settings.
        pub policy_updated_by: Option<String>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod external_org {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "tenant_external_orgs")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub issuer: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub organization_id: String,
        pub tenant_id: String,
        pub created_at: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod agent {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "agents")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub tenant_id: String,
        pub name: String,
        pub description: String,
        pub status: String,
        pub secret_digest: Vec<u8>,
        pub secret_rotated_at: i64,
        pub created_at: i64,
        pub updated_at: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod issuer_key {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "issuer_keys")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub kid: String,
        pub algorithm: String,
        pub status: String,
        pub private_key_ciphertext: Vec<u8>,
        pub public_jwk: String,
        pub created_at: i64,
        pub retired_at: Option<i64>,
        pub publish_until: Option<i64>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod audit_event {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "audit_events")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i64,
        pub event_id: String,
        pub tenant_id: String,
        pub occurred_at: i64,
        pub actor_kind: String,
        pub actor_subject: String,
        pub actor_tenant_id: String,
        pub event_type: String,
        pub subject_ids: String,
        pub outcome: String,
        pub request_id: String,
        pub details: String,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod policy_rule {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "policy_rules")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub tenant_id: String,
        /// `inbound` or `outbound`.
        pub direction: String,
        pub action_pattern: String,
        pub counterpart_tenant_id: Option<String>,
        pub agent_id: Option<String>,
        /// JSON array of conditions.
        pub conditions: String,
        /// JSON time window, if any.
        pub time_window: Option<String>,
        /// `allow`, `step_up` or `block`.
        pub effect: String,
        pub max_ttl_seconds: i64,
        pub priority: i32,
        pub approvals_required: i32,
        pub description: String,
        pub version: i64,
        pub created_at: i64,
        pub updated_at: i64,
        /// JSON of the actor who created or last updated the rule.
        pub updated_by: String,
        /// JSON object of what the rule grants: scope patterns, default
        /// scopes, resource patterns (`policy_engine::Grants`).
        pub grants: String,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod delegation {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "delegations")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub requesting_tenant_id: String,
        pub requesting_agent_id: String,
        pub receiving_tenant_id: String,
        pub action: String,
        /// JSON array of scopes.
        pub scopes: String,
        pub resource: String,
        pub binding_message: String,
        /// JSON object of context attributes.
        pub context: String,
        /// `pending`, `active`, `denied`, `expired`, `revoked`,
        /// `relinquished` or `blocked`; expiry is also applied at read time.
        pub status: String,
        /// JSON of the policy decision taken at request time.
        pub decision: String,
        pub idempotency_key: String,
        /// SHA-256 of the canonical request, for idempotent replays.
        pub request_hash: String,
        /// The requested lifetime.
        pub ttl_seconds: i64,
        /// The JWS `alg` of its token; empty when it never had one.
        pub token_algorithm: String,
        pub signing_kid: Option<String>,
        pub created_at: i64,
        pub activated_at: Option<i64>,
        pub expires_at: Option<i64>,
        pub ended_at: Option<i64>,
        /// JSON of the actor who ended it.
        pub ended_by: Option<String>,
        pub end_reason: Option<String>,
        pub step_up_id: Option<String>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod step_up {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "step_ups")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub delegation_id: String,
        pub receiving_tenant_id: String,
        pub requesting_tenant_id: String,
        pub requesting_agent_id: String,
        /// SHA-256 of the `auth_req_id`; the id itself is never stored.
        pub auth_req_id_hash: String,
        /// `pending`, `approved`, `denied`, `expired` or `redeemed`.
        pub state: String,
        pub request_hash: String,
        pub interval_seconds: i64,
        pub last_polled_at: Option<i64>,
        pub approvals_required: i32,
        pub expires_at: i64,
        pub created_at: i64,
        pub updated_at: i64,
        pub decided_at: Option<i64>,
        pub redeemed_at: Option<i64>,
        pub ended_at: Option<i64>,
        /// JSON of the actor who denied it (the system for a policy block).
        pub denied_by: Option<String>,
        pub deny_reason: Option<String>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod step_up_approval {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "step_up_approvals")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub step_up_id: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub approver_subject: String,
        /// `approve` (denials end the step-up and are recorded on it).
        pub decision: String,
        /// The approver's comment.
        pub reason: String,
        pub created_at: i64,
        /// JSON of the approving actor.
        pub approver: String,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod step_up_change {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "step_up_changes")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i64,
        /// The receiving tenant, whose queue changed.
        pub tenant_id: String,
        pub step_up_id: String,
        pub delegation_id: String,
        /// `added`, `updated` or `removed`.
        pub kind: String,
        /// The step-up's state after the change.
        pub state: String,
        pub created_at: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod tenant_webhook {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "tenant_webhooks")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub tenant_id: String,
        pub url: String,
        /// The signing secret, sealed under the master key.
        pub secret_ciphertext: Vec<u8>,
        pub created_at: i64,
        pub updated_at: i64,
        /// The last `step_up_changes.id` delivered (or skipped as older than
        /// the webhook).
        pub delivered_change_id: i64,
        /// Failed attempts at the next change.
        pub attempts: i32,
        pub next_attempt_at: i64,
        pub last_success_at: Option<i64>,
        pub last_failure_at: Option<i64>,
        pub last_failure_reason: Option<String>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod oauth_provider {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "oauth_providers")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub tenant_id: String,
        pub name: String,
        pub authorize_url: String,
        pub token_url: String,
        pub revocation_url: Option<String>,
        pub client_id: String,
        /// The client secret sealed under the master key; empty for a public
        /// client.
        pub client_secret_ciphertext: Vec<u8>,
        /// JSON array of default scopes.
        pub scopes: String,
        /// JSON object of extra authorize parameters.
        pub extra_params: String,
        pub created_at: i64,
        pub updated_at: i64,
        /// JSON of the admin who registered it.
        pub created_by: String,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod oauth_state {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "oauth_states")]
    pub struct Model {
        /// SHA-256 of the `state`; the state itself is never stored.
        #[sea_orm(primary_key, auto_increment = false)]
        pub state_hash: String,
        pub tenant_id: String,
        pub provider_id: String,
        pub connection_id: String,
        /// JSON of the admin who started the flow.
        pub initiator: String,
        /// The PKCE verifier sealed under the master key.
        pub pkce_verifier_ciphertext: Vec<u8>,
        /// JSON array of the requested scopes.
        pub scopes: String,
        pub expires_at: i64,
        pub used_at: Option<i64>,
        pub created_at: i64,
        pub return_url: String,
        pub redirect_uri: String,
        /// The token endpoint the code and PKCE verifier may be sent to (the
        /// provider's when the flow started).
        pub token_url: String,
        /// The client the flow was started for.
        pub client_id: String,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod connection {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "connections")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub tenant_id: String,
        pub provider_id: String,
        /// `pending`, `connected`, `needs_reauth` or `disconnected`.
        pub status: String,
        /// JSON array of the scopes requested by the last StartConnection.
        pub scopes: String,
        /// The refresh token sealed under the master key.
        pub refresh_token_ciphertext: Option<Vec<u8>>,
        /// The cached provider access token sealed under the master key.
        pub access_token_ciphertext: Option<Vec<u8>>,
        pub access_token_expires_at: Option<i64>,
        /// JSON of the admin who first started it.
        pub created_by: String,
        pub created_at: i64,
        pub updated_at: i64,
        /// JSON array of the scopes the provider granted.
        pub granted_scopes: String,
        pub external_subject: String,
        pub connected_at: Option<i64>,
        /// JSON of the admin who started the flow that connected it.
        pub connected_by: Option<String>,
        pub last_refresh_at: Option<i64>,
        pub status_reason: String,
        /// The cached access token's `token_type`.
        pub token_type: String,
        /// The cached access token's space-separated scopes.
        pub access_token_scope: String,
        /// Bumped by every write of the stored tokens (optimistic locking).
        pub token_version: i64,
        /// Who holds the refresh lease (a random id per refresh), if anyone.
        pub refresh_lease_holder: Option<String>,
        /// When the refresh lease lapses (server clock, ms); a holder that
        /// died gives way to the next caller then.
        pub refresh_lease_expires_at: Option<i64>,
        /// The token endpoint that issued the stored tokens: the only one
        /// the refresh token is ever sent to.
        pub issuer_token_url: String,
        /// The revocation endpoint the provider had when the tokens were
        /// issued: the only one the refresh token is ever revoked at.
        pub issuer_revocation_url: Option<String>,
        /// The client the stored tokens were issued to.
        pub issuer_client_id: String,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod custody_key {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "custody_keys")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub tenant_id: String,
        pub name: String,
        /// `ed25519`, `secp256k1` or `p256`.
        pub algorithm: String,
        /// `enabled` or `disabled`.
        pub status: String,
        /// The private key sealed under the master key.
        pub private_key_ciphertext: Vec<u8>,
        /// The raw public key (32 bytes Ed25519, 65-byte SEC1 point otherwise).
        pub public_key: Vec<u8>,
        pub ethereum_address: Option<String>,
        pub created_at: i64,
        pub updated_at: i64,
        pub description: String,
        /// JSON of the admin who created it.
        pub created_by: String,
        pub disabled_at: Option<i64>,
        /// JSON of the admin who disabled it.
        pub disabled_by: Option<String>,
        pub disable_reason: String,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod signature {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "signatures")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub tenant_id: String,
        pub key_id: String,
        /// The calling agent's id.
        pub requester_subject: String,
        pub idempotency_key: String,
        /// Lowercase hex of the 32-byte payload hash.
        pub payload_hash: String,
        /// `pending` (waiting for a step-up), `signed` or `refused`.
        pub status: String,
        pub signature: Option<Vec<u8>>,
        /// The PENDING delegation standing for a stepped-up request.
        pub delegation_id: Option<String>,
        pub created_at: i64,
        pub updated_at: i64,
        /// SHA-256 of the canonical request (key, payload, scheme, context,
        /// binding message): the idempotency fingerprint.
        pub request_hash: String,
        /// `digest`, `raw_sha256`, `eip191_personal_sign` or `ed25519_pure`.
        pub scheme: String,
        /// JSON of the policy decision.
        pub decision: String,
        pub recovery_id: Option<i32>,
        pub signed_at: Option<i64>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod vault_settings {
    use sea_orm::entity::prelude::*;

    /// A tenant's vault settings; no row means the defaults (no return
    /// origin registered).
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "vault_settings")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub tenant_id: String,
        /// JSON array of origins (`scheme://host[:port]`, normalised) the
        /// OAuth callback may send a browser back to.
        pub return_origins: String,
        pub updated_at: i64,
        /// JSON of the admin who last changed them.
        pub updated_by: String,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}
