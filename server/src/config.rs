//! Server configuration: defaults, then an optional TOML file, then
//! environment variables (`VAULTGUARD_*`), then command-line flags, each
//! overriding the one before.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

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
    /// `kid` shows up.
    pub jwks_min_refresh_seconds: u64,
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
    /// `json` or `text`.
    pub log_format: String,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("data"),
            database_url: String::new(),
            database_max_connections: 16,
            database_acquire_timeout_ms: 2_000,
            grpc_addr: SocketAddr::from(([127, 0, 0, 1], 50051)),
            http_addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            issuer: String::new(),
            master_key: String::new(),
            master_key_file: PathBuf::new(),
            access_token_ttl_seconds: 900,
            max_token_ttl_seconds: 86_400,
            trusted_issuers: Vec::new(),
            jwks_min_refresh_seconds: 10,
            health_probe_interval_ms: 1_000,
            step_up_expires_in_seconds: 300,
            step_up_interval_seconds: 5,
            sweep_interval_ms: 5_000,
            webhook_allow_http: false,
            webhook_poll_interval_ms: 1_000,
            webhook_timeout_ms: 10_000,
            webhook_max_attempts: 12,
            oauth_allow_http: false,
            oauth_redirect_uri: String::new(),
            oauth_state_ttl_seconds: 600,
            oauth_timeout_ms: 10_000,
            oauth_refresh_margin_seconds: 60,
            log_format: "text".to_owned(),
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

    /// The issuer, defaulting to the HTTP listener's URL.
    pub fn effective_issuer(&self, bound_http: SocketAddr) -> String {
        if self.issuer.is_empty() {
            format!("http://{bound_http}")
        } else {
            self.issuer.trim_end_matches('/').to_owned()
        }
    }
}
