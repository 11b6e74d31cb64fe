//! SeaORM entities, one module per table. Times are milliseconds since the
//! Unix epoch; JSON-valued columns are TEXT holding serde_json. A column
//! holding one of a few words is an enum of its module stored as those words
//! ([`stored_enum!`]); the states of a row that changes over time come with
//! their entity's table of transitions ([`Lifecycle`]).

use crate::store::lifecycle::{Lifecycle, stored_enum};

pub mod tenant {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "tenants")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub slug: String,
        pub display_name: String,
        pub status: Status,
        pub token_algorithm: String,
        pub outbound_default: OutboundDefault,
        pub policy_version: i64,
        pub created_at: i64,
        pub updated_at: i64,
        pub policy_updated_at: Option<i64>,
        /// JSON of the actor who last changed the policy settings.
        pub policy_updated_by: Option<String>,
        /// When FreezeTenantTraffic froze the tenant's outbound traffic
        /// (none of its agents may ask, sign or exchange); NULL: not frozen.
        pub traffic_frozen_at: Option<i64>,
        /// Why it was frozen (empty when it is not).
        pub traffic_freeze_reason: String,
        /// JSON of the actor who froze it.
        pub traffic_frozen_by: Option<String>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}

    super::stored_enum! {
        /// A tenant's standing: a suspended tenant's principals are refused.
        pub enum Status {
            Active = "active",
            Suspended = "suspended",
        }
    }

    impl super::Lifecycle for Status {
        type Entity = Entity;
        const COLUMN: Column = Column::Status;
        const INITIAL: &'static [Self] = &[Self::Active];
        const TRANSITIONS: &'static [(Self, Self)] = &[
            // SuspendTenant (operator).
            (Self::Active, Self::Suspended),
            // ReactivateTenant (operator).
            (Self::Suspended, Self::Active),
        ];
    }

    super::stored_enum! {
        /// What a tenant's outbound side decides when none of its rules
        /// matches a request.
        pub enum OutboundDefault {
            Allow = "allow",
            Block = "block",
        }
    }
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
        pub status: Status,
        pub secret_digest: Vec<u8>,
        pub secret_rotated_at: i64,
        pub created_at: i64,
        pub updated_at: i64,
        /// When FreezeAgent froze it (it may not ask, sign or exchange);
        /// NULL: not frozen.
        pub frozen_at: Option<i64>,
        /// Why it was frozen (empty when it is not).
        pub freeze_reason: String,
        /// JSON of the actor who froze it.
        pub frozen_by: Option<String>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}

    super::stored_enum! {
        /// An agent's standing: a disabled agent is refused.
        pub enum Status {
            Active = "active",
            Disabled = "disabled",
        }
    }

    impl super::Lifecycle for Status {
        type Entity = Entity;
        const COLUMN: Column = Column::Status;
        const INITIAL: &'static [Self] = &[Self::Active];
        const TRANSITIONS: &'static [(Self, Self)] = &[
            // DisableAgent (tenant admin).
            (Self::Active, Self::Disabled),
            // EnableAgent (tenant admin).
            (Self::Disabled, Self::Active),
        ];
    }
}

pub mod issuer_key {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "issuer_keys")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub kid: String,
        pub algorithm: String,
        pub status: Status,
        pub private_key_ciphertext: Vec<u8>,
        pub public_jwk: String,
        pub created_at: i64,
        pub retired_at: Option<i64>,
        pub publish_until: Option<i64>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}

    super::stored_enum! {
        /// An issuer key's use: the active key of its algorithm signs; a
        /// retired one is only published until its last token expires.
        pub enum Status {
            Active = "active",
            Retired = "retired",
        }
    }

    impl super::Lifecycle for Status {
        type Entity = Entity;
        const COLUMN: Column = Column::Status;
        const INITIAL: &'static [Self] = &[Self::Active];
        const TRANSITIONS: &'static [(Self, Self)] = &[
            // RotateIssuerKey (operator): the algorithm's new key retires
            // the old one in the same transaction.
            (Self::Active, Self::Retired),
        ];
    }
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
        pub direction: Direction,
        pub action_pattern: String,
        pub counterpart_tenant_id: Option<String>,
        pub agent_id: Option<String>,
        /// JSON array of conditions.
        pub conditions: String,
        /// JSON time window, if any.
        pub time_window: Option<String>,
        pub effect: Effect,
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

    super::stored_enum! {
        /// Which side of a request a rule judges: the receiving tenant's
        /// (inbound) or the requesting tenant's (outbound).
        pub enum Direction {
            Inbound = "inbound",
            Outbound = "outbound",
        }
    }

    super::stored_enum! {
        /// What a rule decides when it matches.
        pub enum Effect {
            Allow = "allow",
            StepUp = "step_up",
            Block = "block",
        }
    }
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
        /// JSON array of the RFC 9396 authorization details (`[]` if none).
        pub authorization_details: String,
        /// Expiry is also applied at read time (`effective_status`).
        pub status: Status,
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

    super::stored_enum! {
        /// A delegation's status.
        pub enum Status {
            /// Waiting for its step-up.
            Pending = "pending",
            /// Its token is valid until `expires_at`.
            Active = "active",
            Denied = "denied",
            Expired = "expired",
            Revoked = "revoked",
            Relinquished = "relinquished",
            /// Refused by policy when requested.
            Blocked = "blocked",
        }
    }

    impl super::Lifecycle for Status {
        type Entity = Entity;
        const COLUMN: Column = Column::Status;
        /// ALLOW, STEP_UP and BLOCK decisions at RequestDelegation (and at
        /// the vault's Sign and ExchangeToken, which open delegations too).
        const INITIAL: &'static [Self] = &[Self::Pending, Self::Active, Self::Blocked];
        const TRANSITIONS: &'static [(Self, Self)] = &[
            // Its step-up approved (quorum reached, policy re-checked).
            (Self::Pending, Self::Active),
            // Its step-up denied, or blocked by the re-check at approval.
            (Self::Pending, Self::Denied),
            // The sweeper, past `expires_at` (the step-up deadline, or the
            // token's expiry).
            (Self::Pending, Self::Expired),
            (Self::Active, Self::Expired),
            // RevokeDelegation (receiving tenant's admin).
            (Self::Active, Self::Revoked),
            // RelinquishDelegation (requesting agent or its tenant's admin).
            (Self::Active, Self::Relinquished),
        ];
    }
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
        /// Expiry is also applied at read time (`effective_state`).
        pub state: State,
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

    super::stored_enum! {
        /// A step-up's state.
        pub enum State {
            Pending = "pending",
            /// Its delegation is active; its token not taken yet.
            Approved = "approved",
            Denied = "denied",
            Expired = "expired",
            /// Its token was handed out (once).
            Redeemed = "redeemed",
        }
    }

    impl super::Lifecycle for State {
        type Entity = Entity;
        const COLUMN: Column = Column::State;
        const INITIAL: &'static [Self] = &[Self::Pending];
        const TRANSITIONS: &'static [(Self, Self)] = &[
            // ApproveStepUp reaching the quorum.
            (Self::Pending, Self::Approved),
            // DenyStepUp, or the policy re-check at approval blocking.
            (Self::Pending, Self::Denied),
            // The sweeper, when its delegation expires: undecided, or
            // approved but never redeemed.
            (Self::Pending, Self::Expired),
            (Self::Approved, Self::Expired),
            // PollStepUp or WatchStepUp handing out the token.
            (Self::Approved, Self::Redeemed),
        ];
    }
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
        pub kind: Kind,
        /// The step-up's state after the change.
        pub state: super::step_up::State,
        pub created_at: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}

    super::stored_enum! {
        /// How a change moved a step-up in its tenant's queue.
        pub enum Kind {
            /// Opened (pending).
            Added = "added",
            /// Still pending, with a new approval.
            Updated = "updated",
            /// Decided or expired: out of the queue.
            Removed = "removed",
        }
    }
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
        pub status: Status,
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

    super::stored_enum! {
        /// A connection's status.
        pub enum Status {
            /// Started, never authorized.
            Pending = "pending",
            /// Holds tokens the exchange hands out.
            Connected = "connected",
            /// Its tokens can no longer be used: the account must be
            /// authorized again (StartConnection with its id).
            NeedsReauth = "needs_reauth",
            /// Its tokens erased (and revoked at the provider if it could).
            Disconnected = "disconnected",
        }
    }

    impl super::Lifecycle for Status {
        type Entity = Entity;
        const COLUMN: Column = Column::Status;
        /// StartConnection without a connection id.
        const INITIAL: &'static [Self] = &[Self::Pending];
        const TRANSITIONS: &'static [(Self, Self)] = &[
            // The OAuth callback's code exchange (a connected one is
            // re-authorized in place).
            (Self::Pending, Self::Connected),
            (Self::Connected, Self::Connected),
            (Self::NeedsReauth, Self::Connected),
            // A refresh the provider refuses (`invalid_grant`), a missing
            // refresh token, or the endpoints or client the tokens were
            // issued to gone from the provider: found at refresh, or by
            // UpdateOAuthProvider (which also erases what a NEEDS_REAUTH
            // connection still holds).
            (Self::Connected, Self::NeedsReauth),
            (Self::NeedsReauth, Self::NeedsReauth),
            // DeleteConnection (tenant admin).
            (Self::Pending, Self::Disconnected),
            (Self::Connected, Self::Disconnected),
            (Self::NeedsReauth, Self::Disconnected),
        ];
    }
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
        pub status: Status,
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
        /// Sign refuses `digest` payloads for this key.
        pub disable_digest_signing: bool,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}

    super::stored_enum! {
        /// A signing key's status.
        pub enum Status {
            Enabled = "enabled",
            Disabled = "disabled",
        }
    }

    impl super::Lifecycle for Status {
        type Entity = Entity;
        const COLUMN: Column = Column::Status;
        const INITIAL: &'static [Self] = &[Self::Enabled];
        const TRANSITIONS: &'static [(Self, Self)] = &[
            // DisableSigningKey (tenant admin), for good.
            (Self::Enabled, Self::Disabled),
        ];
    }
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
        pub status: Status,
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

    super::stored_enum! {
        /// A signature request's status (refusals are audited, not stored).
        pub enum Status {
            /// Waiting for its step-up.
            Pending = "pending",
            Signed = "signed",
        }
    }

    impl super::Lifecycle for Status {
        type Entity = Entity;
        const COLUMN: Column = Column::Status;
        /// Sign: signed at once on ALLOW, pending on STEP_UP.
        const INITIAL: &'static [Self] = &[Self::Pending, Self::Signed];
        const TRANSITIONS: &'static [(Self, Self)] = &[
            // Sign repeated with its idempotency key after the step-up's
            // approval.
            (Self::Pending, Self::Signed),
        ];
    }
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

pub mod console_session {
    use sea_orm::entity::prelude::*;

    /// A console session; the cookie holds the secret, the row its hash.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "console_sessions")]
    pub struct Model {
        /// SHA-256 (hex) of the session secret.
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub tenant_id: String,
        pub subject: String,
        /// Role names, space-separated (`admin approver auditor`).
        pub roles: String,
        /// The trusted issuer the person signed in with; empty for a link.
        pub issuer: String,
        /// The organisation the issuer named; empty for a link.
        pub organization_id: String,
        pub created_at: i64,
        pub expires_at: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod console_link {
    use sea_orm::entity::prelude::*;

    /// A one-time sign-in link made by `vaultguard console-link`.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "console_links")]
    pub struct Model {
        /// SHA-256 (hex) of the link's secret.
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub tenant_id: String,
        pub subject: String,
        /// Role names, space-separated.
        pub roles: String,
        pub created_at: i64,
        pub expires_at: i64,
        pub used_at: Option<i64>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod console_login {
    use sea_orm::entity::prelude::*;

    /// An OIDC sign-in in progress.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "console_logins")]
    pub struct Model {
        /// SHA-256 (hex) of the `state` sent to the issuer.
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        /// The trusted issuer, as configured.
        pub issuer: String,
        /// The PKCE verifier sealed under the master key.
        pub verifier_ciphertext: Vec<u8>,
        /// The nonce the ID token must carry.
        pub nonce: String,
        pub created_at: i64,
        pub expires_at: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod budget {
    use sea_orm::entity::prelude::*;

    pub use super::policy_rule::{Direction, Effect};

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "budgets")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub tenant_id: String,
        pub name: String,
        pub description: String,
        pub direction: Direction,
        pub measure: Measure,
        pub sum_attribute: String,
        pub sum_detail_type: String,
        /// Dot-separated.
        pub sum_detail_path: String,
        pub currency: String,
        pub scope_agent_id: String,
        pub scope_counterpart_tenant_id: String,
        pub scope_action_pattern: String,
        pub scope_signing_key_id: String,
        pub scope_connection_id: String,
        pub window_seconds: i64,
        /// A decimal string (`budgets::Amount`).
        pub limit_amount: String,
        pub over_limit: Effect,
        pub version: i64,
        /// Bumped by every charge: the update that takes the row's lock.
        pub charges: i64,
        pub created_at: i64,
        pub updated_at: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}

    super::stored_enum! {
        /// What a budget counts.
        pub enum Measure {
            Count = "count",
            Sum = "sum",
        }
    }
}

pub mod budget_charge {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "budget_charges")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub budget_id: String,
        pub tenant_id: String,
        /// A decimal string (`budgets::Amount`).
        pub amount: String,
        pub charged_at: i64,
        /// The delegation or signature it pays for.
        pub subject_id: String,
        pub state: State,
        /// A held charge counts until then (its step-up's deadline).
        pub hold_expires_at: Option<i64>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}

    super::stored_enum! {
        /// A charge's state.
        pub enum State {
            /// Paid for an allowed delegation or a signature.
            Spent = "spent",
            /// Held by a request waiting on its step-up.
            Held = "held",
            /// The step-up was denied: it no longer counts.
            Released = "released",
        }
    }

    impl super::Lifecycle for State {
        type Entity = Entity;
        const COLUMN: Column = Column::State;
        const INITIAL: &'static [Self] = &[Self::Spent, Self::Held];
        const TRANSITIONS: &'static [(Self, Self)] = &[
            // The step-up approved: the hold becomes the spend.
            (Self::Held, Self::Spent),
            // The step-up denied (by a human, the policy re-check or a
            // freeze); an expired hold simply stops counting.
            (Self::Held, Self::Released),
        ];
    }
}
