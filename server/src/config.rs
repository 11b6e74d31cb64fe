//! Server configuration: defaults, then an optional TOML file, then
//! environment variables (`VAULTGUARD_*`), then command-line flags, each
//! overriding the one before.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use serde::Deserialize;

/// The future a [`NameLookup`] returns.
pub type LookupFuture = Pin<Box<dyn Future<Output = std::io::Result<Vec<IpAddr>>> + Send>>;

/// How outbound requests look names up: the system resolver
/// (`crate::outbound::SystemLookup`) unless a test injects its own
/// ([`Config::outbound_lookup`]). Declared here, beside the setting that
/// carries it, so the configuration needs nothing above it.
pub trait NameLookup: Send + Sync + std::fmt::Debug {
    /// The addresses `host` resolves to.
    fn lookup(&self, host: &str) -> LookupFuture;
}

/// A trusted OIDC issuer whose JWTs authenticate tenant humans.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TrustedIssuer {
    /// The issuer URL, exactly as in the `iss` claim; discovery is fetched
    /// from `<issuer>/.well-known/openid-configuration`.
    pub issuer: String,
    /// The `aud` the issuer's tokens must carry for VaultGuard.
    pub audience: String,
    /// The claim holding the external organisation id (Auth0: `org_id`).
    #[serde(default = "default_tenant_claim")]
    pub tenant_claim: String,
    /// The claim holding the user's roles: an array of strings or a
    /// space-separated string.
    #[serde(default = "default_roles_claim")]
    pub roles_claim: String,
    /// A prefix the role values carry (for example `vaultguard:`), stripped
    /// before matching `admin`, `approver` and `auditor`.
    #[serde(default)]
    pub role_prefix: String,
    /// The console's OAuth client at this issuer: when set, the console
    /// offers "Sign in with <issuer>" (authorization code with PKCE, S256)
    /// and maps the ID token's claims with `tenant_claim`, `roles_claim`
    /// and `role_prefix` exactly as bearer tokens are mapped.
    #[serde(default)]
    pub console_client_id: Option<String>,
    /// The console client's secret (sent as `client_secret_basic`); none
    /// for a public client, which PKCE alone protects.
    #[serde(default)]
    pub console_client_secret: Option<String>,
    /// Scopes the console asks for besides `openid` (for example the scope
    /// that puts the organisation and roles claims into the ID token).
    #[serde(default)]
    pub console_scopes: Vec<String>,
    /// The name on the console's sign-in button; default: the issuer's host.
    #[serde(default)]
    pub console_display_name: Option<String>,
}

impl Default for TrustedIssuer {
    /// An issuer with the serde defaults (`org_id`, `roles`, no prefix, no
    /// console client); `issuer` and `audience` still to be set.
    fn default() -> Self {
        Self {
            issuer: String::new(),
            audience: String::new(),
            tenant_claim: default_tenant_claim(),
            roles_claim: default_roles_claim(),
            role_prefix: String::new(),
            console_client_id: None,
            console_client_secret: None,
            console_scopes: Vec::new(),
            console_display_name: None,
        }
    }
}

fn default_tenant_claim() -> String {
    "org_id".to_owned()
}

fn default_roles_claim() -> String {
    "roles".to_owned()
}

/// The whole configuration of one server process.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where the SQLite database and the dev master key live.
    pub data_dir: PathBuf,
    /// `postgres://…` or `sqlite://…`; empty means SQLite in `data_dir`.
    pub database_url: String,
    /// Maximum pooled database connections (PostgreSQL).
    pub database_max_connections: u32,
    /// How long a request waits for a database connection before UNAVAILABLE.
    pub database_acquire_timeout_ms: u64,
    /// PostgreSQL: how long start-up waits for a host that takes writes (a
    /// replica restarted during a failover waits for the promotion instead
    /// of exiting); 0: fail at once.
    pub database_startup_wait_ms: u64,
    /// PostgreSQL: group commits of the hot writes (delegations, signatures,
    /// audit events) in flight at once. A writer takes whatever queued
    /// while it waited; one starts a group beside another's only once
    /// `audit_group_overlap_min` units queued (docs/performance.md). More
    /// writers suit a database with cores to spare.
    pub audit_group_writers: u32,
    /// PostgreSQL: how many units must be queued before a writer starts a
    /// group beside another writer's (1: whenever one is free).
    pub audit_group_overlap_min: u32,
    /// The gRPC listener.
    pub grpc_addr: SocketAddr,
    /// The HTTP listener: JWKS, discovery, /healthz, /metrics.
    pub http_addr: SocketAddr,
    /// The `iss` of every token VaultGuard signs; also the base URL of the
    /// discovery document. Empty means `http://<http_addr>`.
    pub issuer: String,
    /// Base64 of the 32-byte master key. Empty means `master_key_file`.
    pub master_key: String,
    /// A file holding the base64 master key. Empty means
    /// `<data_dir>/master.key`, generated on first start.
    pub master_key_file: PathBuf,
    /// Lifetime of agents' access tokens.
    pub access_token_ttl_seconds: u32,
    /// The longest lifetime of any token VaultGuard signs; a retired issuer
    /// key stays published this long after retirement.
    pub max_token_ttl_seconds: u32,
    /// Trusted OIDC issuers.
    pub trusted_issuers: Vec<TrustedIssuer>,
    /// The least time between two JWKS fetches of one issuer when an unknown
    /// `kid` shows up; also the shortest lifetime a fetched key set gets,
    /// whatever the issuer's `Cache-Control` says.
    pub jwks_min_refresh_seconds: u64,
    /// The longest a fetched key set is used without fetching it again: an
    /// issuer's `Cache-Control: max-age` is honoured up to this, and a key
    /// set without one lives this long. A key the issuer removed stops
    /// verifying at the latest this long after the last fetch.
    pub jwks_max_age_seconds: u64,
    /// While an issuer's key set cannot be fetched (its fetches fail and are
    /// backed off), keys of the expired set keep verifying for this long
    /// past its expiry; 0: not at all.
    pub jwks_stale_grace_seconds: u64,
    /// How often the database is probed for the health service.
    pub health_probe_interval_ms: u64,
    /// How long a step-up waits for a human before it expires (CIBA
    /// `expires_in`).
    pub step_up_expires_in_seconds: u32,
    /// The initial CIBA polling `interval` of a step-up.
    pub step_up_interval_seconds: u32,
    /// How often the sweeper marks expired delegations EXPIRED.
    pub sweep_interval_ms: u64,
    /// Accept `http://` approval webhook URLs (development and tests only;
    /// production webhooks must be `https://`).
    pub webhook_allow_http: bool,
    /// How often the webhook deliverer looks for undelivered changes.
    pub webhook_poll_interval_ms: u64,
    /// Timeout of one webhook delivery attempt.
    pub webhook_timeout_ms: u64,
    /// Attempts at one change before the deliverer skips it.
    pub webhook_max_attempts: u32,
    /// Tenants whose webhooks this process delivers to at once (each
    /// tenant's notices in order, tenants independently of each other).
    pub webhook_concurrent_tenants: usize,
    /// CIDR blocks that outbound requests (provider endpoints, webhooks,
    /// issuers' discovery and JWKS) may reach although the outbound address
    /// policy forbids them (loopback, private, link-local …; see
    /// `crate::outbound`). Empty: none.
    pub outbound_allowed_networks: Vec<String>,
    /// How outbound requests look names up; `None` (always, outside tests):
    /// the system resolver. Never read from a file.
    #[serde(skip)]
    pub outbound_lookup: Option<Arc<dyn NameLookup>>,
    /// Accept `http://` OAuth provider endpoints and return URLs
    /// (development and tests only; production providers are `https://`).
    pub oauth_allow_http: bool,
    /// The `redirect_uri` sent to OAuth providers; empty means
    /// `<issuer>/oauth/callback` (the HTTP listener serves the callback).
    pub oauth_redirect_uri: String,
    /// How long a connection's authorization flow may take (the `state`'s
    /// lifetime).
    pub oauth_state_ttl_seconds: u32,
    /// Timeout of one call to a provider's token or revocation endpoint.
    pub oauth_timeout_ms: u64,
    /// A cached provider access token is handed out only while it has more
    /// than this many seconds left; closer to expiry it is refreshed.
    pub oauth_refresh_margin_seconds: u32,
    /// A repeated read is audited once per this many seconds: a verifier's
    /// successful VerifyDelegationToken of one delegation, an agent handed
    /// the same provider access token again by ExchangeToken. Refusals and
    /// new tokens are always audited; 0 audits every call.
    pub repeat_audit_window_seconds: u32,
    /// `json` or `text`.
    pub log_format: String,
    /// How long a console session lasts after sign-in.
    pub console_session_seconds: u32,
    /// The lifetime of a console access token (the app asks for the next
    /// one before it ends); at most 600.
    pub console_token_seconds: u32,
    // Limits (see `crate::limits`; per process, so N replicas admit N times)
    /// Calls per second each agent may make (token bucket refill); 0: no
    /// agent limit.
    pub rate_limit_agent_per_second: u32,
    /// Calls an agent may make at once beyond its rate (bucket size); 0: one
    /// second's worth.
    pub rate_limit_agent_burst: u32,
    /// Calls per second all principals of one tenant may make together
    /// (agents, humans); also the operator's own bucket. 0: no tenant limit.
    pub rate_limit_tenant_per_second: u32,
    /// Bucket size of the tenant limit; 0: one second's worth.
    pub rate_limit_tenant_burst: u32,
    /// `IssueToken` calls per second per presented `client_id` (credential
    /// guessing, token floods); 0: no limit.
    pub rate_limit_client_per_second: u32,
    /// Bucket size of the `client_id` limit; 0: one second's worth.
    pub rate_limit_client_burst: u32,
    /// Refusals per second of one limited key (an agent, a tenant, the
    /// operator, a `client_id`) answered at once; a key refused more often
    /// than this gets its further refusals answered only after a delay
    /// (refusal pacing, see `crate::limits`). 0: every refusal at once.
    pub rate_limit_refusals_per_second: u32,
    /// Least delay of a paced refusal, in ms; the delay is the refusal's
    /// RetryInfo clamped to `min..=max`.
    pub rate_limit_refusal_delay_min_ms: u64,
    /// Longest delay of a paced refusal, in ms. 0: no pacing.
    pub rate_limit_refusal_delay_max_ms: u64,
    /// Paced refusals waiting at once in the process; past it refusals are
    /// answered at once. 0: no cap.
    pub max_paced_refusals: usize,
    /// gRPC calls in the process between arrival and response headers; more
    /// are shed at once with UNAVAILABLE. 0: no cap.
    pub max_concurrent_requests: usize,
    /// HTTP/2 `SETTINGS_MAX_CONCURRENT_STREAMS` of each gRPC connection;
    /// clients queue beyond it. 0: no cap.
    pub max_concurrent_streams_per_connection: u32,
    /// The largest request message any service decodes; larger ones are
    /// refused (OUT_OF_RANGE) before the handler runs. 0: no cap.
    pub max_request_bytes: usize,
    /// Open server-streaming calls (watches, tails, exports) per tenant;
    /// more are refused with RESOURCE_EXHAUSTED. 0: no cap.
    pub max_streams_per_tenant: usize,
    /// How often an open server stream re-checks its caller's standing
    /// while it sends nothing (it is also checked before every message), in
    /// ms; values below 50 count as 50.
    pub stream_standing_interval_ms: u64,
    /// PENDING step-ups one requesting tenant may have waiting in one
    /// receiving tenant's queue (a tenant's own vault step-ups count
    /// against itself); past it a new step-up is refused with
    /// RESOURCE_EXHAUSTED. 0: no cap.
    pub max_pending_step_ups_per_pair: u32,
    /// How long the request message of a unary or server-streaming call may
    /// take to arrive in full (its gRPC frame and the end of the request
    /// stream), from its headers; later, the call is answered
    /// DEADLINE_EXCEEDED without any work (see `crate::request_body`). 0: no
    /// deadline.
    pub request_body_timeout_ms: u64,
    /// Bytes of request messages the process holds while their calls wait
    /// for the rest; a call that would go beyond is answered UNAVAILABLE
    /// (`cause` = `request_bytes`). A message that arrives whole is never
    /// counted. 0: no cap.
    pub max_waiting_request_bytes: usize,
    /// Refusals that an outsider can cause in a tenant's log (IssueToken
    /// with a wrong secret for a known `client_id`, NOT_FOUND answers, the
    /// OAuth callback with a spent `state`) are recorded at most
    /// `refusal_audit_events_per_window` times per window of this many
    /// seconds and key; the rest are counted, and the next recorded event
    /// of the key carries the count (`suppressed`). 0: every refusal.
    pub refusal_audit_window_seconds: u32,
    /// Refusal events recorded per key and window (see
    /// `refusal_audit_window_seconds`); at least 1.
    pub refusal_audit_events_per_window: u32,
    // TLS
    /// PEM certificate chain of both listeners; with `tls_key_file`, both
    /// serve TLS only (see `crate::tls`).
    pub tls_cert_file: PathBuf,
    /// PEM private key of `tls_cert_file`.
    pub tls_key_file: PathBuf,
    /// PEM bundle of the CAs whose client certificates the gRPC listener
    /// verifies; enables mTLS agent authentication. Empty: no client
    /// certificates are asked for.
    pub tls_client_ca_file: PathBuf,
    /// `optional` (default): callers without a client certificate are let
    /// in (they authenticate with a bearer); `required`: the handshake
    /// refuses them.
    pub tls_client_auth: String,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("data"),
            database_url: String::new(),
            database_max_connections: 16,
            database_acquire_timeout_ms: 2_000,
            database_startup_wait_ms: 30_000,
            audit_group_writers: 2,
            audit_group_overlap_min: 16,
            grpc_addr: SocketAddr::from(([127, 0, 0, 1], 50051)),
            http_addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            issuer: String::new(),
            master_key: String::new(),
            master_key_file: PathBuf::new(),
            access_token_ttl_seconds: 900,
            max_token_ttl_seconds: 86_400,
            trusted_issuers: Vec::new(),
            jwks_min_refresh_seconds: 10,
            jwks_max_age_seconds: 3_600,
            jwks_stale_grace_seconds: 900,
            health_probe_interval_ms: 1_000,
            step_up_expires_in_seconds: 300,
            step_up_interval_seconds: 5,
            sweep_interval_ms: 5_000,
            webhook_allow_http: false,
            webhook_poll_interval_ms: 1_000,
            webhook_timeout_ms: 10_000,
            webhook_max_attempts: 12,
            webhook_concurrent_tenants: 16,
            outbound_allowed_networks: Vec::new(),
            outbound_lookup: None,
            oauth_allow_http: false,
            oauth_redirect_uri: String::new(),
            oauth_state_ttl_seconds: 600,
            oauth_timeout_ms: 10_000,
            oauth_refresh_margin_seconds: 60,
            repeat_audit_window_seconds: 60,
            log_format: "text".to_owned(),
            console_session_seconds: 8 * 3600,
            console_token_seconds: 300,
            rate_limit_agent_per_second: 500,
            rate_limit_agent_burst: 1_000,
            rate_limit_tenant_per_second: 2_000,
            rate_limit_tenant_burst: 4_000,
            rate_limit_client_per_second: 10,
            rate_limit_client_burst: 20,
            rate_limit_refusals_per_second: 50,
            rate_limit_refusal_delay_min_ms: 250,
            rate_limit_refusal_delay_max_ms: 1_000,
            max_paced_refusals: 10_000,
            max_concurrent_requests: 1_024,
            max_concurrent_streams_per_connection: 256,
            max_request_bytes: 1024 * 1024,
            max_streams_per_tenant: 1_000,
            stream_standing_interval_ms: 5_000,
            max_pending_step_ups_per_pair: 100,
            request_body_timeout_ms: 10_000,
            max_waiting_request_bytes: 64 * 1024 * 1024,
            refusal_audit_window_seconds: 60,
            refusal_audit_events_per_window: 10,
            tls_cert_file: PathBuf::new(),
            tls_key_file: PathBuf::new(),
            tls_client_ca_file: PathBuf::new(),
            tls_client_auth: "optional".to_owned(),
        }
    }
}

impl Config {
    /// Reads a TOML file over the defaults.
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read config file {}: {e}", path.display()))?;
        toml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("invalid config file {}: {e}", path.display()))
    }

    /// The database URL, defaulting to SQLite in the data directory.
    pub fn effective_database_url(&self) -> String {
        if self.database_url.is_empty() {
            format!(
                "sqlite://{}?mode=rwc",
                self.data_dir.join("vaultguard.db").display()
            )
        } else {
            self.database_url.clone()
        }
    }

    /// Whether both listeners serve TLS.
    pub fn tls_enabled(&self) -> bool {
        !self.tls_cert_file.as_os_str().is_empty() && !self.tls_key_file.as_os_str().is_empty()
    }

    /// The issuer, defaulting to the HTTP listener's URL (`https://` when
    /// the listeners serve TLS).
    pub fn effective_issuer(&self, bound_http: SocketAddr) -> String {
        if self.issuer.is_empty() {
            let scheme = if self.tls_enabled() { "https" } else { "http" };
            format!("{scheme}://{bound_http}")
        } else {
            self.issuer.trim_end_matches('/').to_owned()
        }
    }
}

/// Property tests of reading a configuration file.
#[cfg(test)]
mod props {
    use proptest::prelude::*;

    use super::*;
    use crate::props::{PURE_CASES, config};

    /// Keys of `Config` with a value of the right type.
    fn known_entry() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z ]{0,8}".prop_map(|s| format!("database_url = {s:?}")),
            "[a-z ]{0,8}".prop_map(|s| format!("issuer = {s:?}")),
            any::<u32>().prop_map(|n| format!("access_token_ttl_seconds = {n}")),
            any::<u32>().prop_map(|n| format!("max_token_ttl_seconds = {n}")),
            any::<bool>().prop_map(|b| format!("webhook_allow_http = {b}")),
            (0u8..=255, 0u16..=65535).prop_map(|(a, p)| format!("grpc_addr = \"127.0.0.{a}:{p}\"")),
            Just("log_format = \"json\"".to_owned()),
        ]
    }

    /// A well-formed TOML value of any type, including ones a key does not take.
    fn valid_value() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<String>().prop_map(|s| toml::Value::String(s).to_string()),
            any::<i64>().prop_map(|n| n.to_string()),
            any::<f64>().prop_map(|n| toml::Value::Float(n).to_string()),
            any::<bool>().prop_map(|b| b.to_string()),
            Just("[]".to_owned()),
            Just("[1, \"a\"]".to_owned()),
            Just("{ a = 1 }".to_owned()),
            Just("1979-05-27T07:32:00Z".to_owned()),
        ]
    }

    /// Any value text, well-formed or not.
    fn any_value() -> impl Strategy<Value = String> {
        prop_oneof![
            valid_value(),
            "[0-9a-z.:\\[\\]\"'{}= -]{0,16}".prop_map(String::from),
        ]
    }

    fn toml_soup() -> impl Strategy<Value = String> {
        let key = prop_oneof![
            "(data_dir|database_url|database_max_connections|grpc_addr|http_addr|issuer|master_key|trusted_issuers|log_format|sweep_interval_ms)"
                .prop_map(String::from),
            "[a-z_.\"]{1,12}".prop_map(String::from),
        ];
        let line = prop_oneof![
            4 => (key, any_value()).prop_map(|(k, v)| format!("{k} = {v}")),
            1 => Just("[[trusted_issuers]]".to_owned()),
            1 => Just("issuer = \"https://idp.example\"\naudience = \"vg\"".to_owned()),
            1 => "\\[[a-z_.]{0,12}\\]".prop_map(String::from),
            1 => any::<String>(),
        ];
        prop::collection::vec(line, 0..8).prop_map(|lines| lines.join("\n"))
    }

    proptest! {
        #![proptest_config(config(PURE_CASES))]

        #[test]
        fn any_text_is_read_or_refused_without_panicking(text in prop_oneof![any::<String>(), toml_soup()]) {
            let _ = toml::from_str::<Config>(&text);
        }

        #[test]
        fn known_keys_are_read(entries in prop::collection::vec(known_entry(), 0..5)) {
            let mut seen = std::collections::BTreeSet::new();
            let text = entries
                .into_iter()
                .filter(|e| seen.insert(e.split(" = ").next().unwrap_or_default().to_owned()))
                .collect::<Vec<_>>()
                .join("\n");
            prop_assert!(toml::from_str::<Config>(&text).is_ok(), "{text}");
        }

        #[test]
        fn unknown_keys_are_refused(
            entries in prop::collection::vec(known_entry(), 0..3),
            unknown in prop_oneof![
                "zz_[a-z_]{1,10}".prop_map(String::from),
                "(grpc_addr|issuer|master_key|log_format)_(x|typo|old)".prop_map(String::from),
            ],
            value in valid_value(),
            in_issuer in any::<bool>(),
        ) {
            let mut seen = std::collections::BTreeSet::new();
            let mut lines: Vec<String> = entries
                .into_iter()
                .filter(|e| seen.insert(e.split(" = ").next().unwrap_or_default().to_owned()))
                .collect();
            if in_issuer {
                lines.push(format!(
                    "[[trusted_issuers]]\nissuer = \"https://idp.example\"\naudience = \"vg\"\n{unknown} = {value}"
                ));
            } else {
                lines.insert(0, format!("{unknown} = {value}"));
            }
            let text = lines.join("\n");
            prop_assert!(toml::from_str::<Config>(&text).is_err(), "{text}");
        }
    }
}
