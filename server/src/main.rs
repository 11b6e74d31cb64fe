//! The `vaultguard` binary: `serve`, `migrate`, and `token` (mints bootstrap
//! tokens for the operator and tenant admins, for first use and grpcurl).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand, ValueEnum};
use vaultguard_proto::v1::Role;
use vaultguard_server::clock::{Clock, SystemClock};
use vaultguard_server::config::Config;
use vaultguard_server::domain::tokens;
use vaultguard_server::{server, store, telemetry};

/// mimalloc instead of glibc's malloc: a gRPC call allocates and frees many
/// small buffers across threads, and glibc's malloc/free took ~18% of the
/// server's CPU under load (docs/performance.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(
    name = "vaultguard",
    version,
    about = "gRPC authorization broker for AI agents"
)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
    #[command(subcommand)]
    command: Command,
}

/// Settings shared by every subcommand; each overrides the config file.
#[derive(Args, Debug)]
struct CommonArgs {
    /// A TOML config file (see README.md for its keys).
    #[arg(long, global = true, env = "VAULTGUARD_CONFIG")]
    config: Option<PathBuf>,
    /// Where SQLite data and the dev master key live.
    #[arg(long, global = true, env = "VAULTGUARD_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// `postgres://…` or `sqlite://…`; default: SQLite in the data dir.
    #[arg(long, global = true, env = "VAULTGUARD_DATABASE_URL")]
    database_url: Option<String>,
    /// Base64 of the 32-byte master key (prefer --master-key-file).
    #[arg(
        long,
        global = true,
        env = "VAULTGUARD_MASTER_KEY",
        hide_env_values = true
    )]
    master_key: Option<String>,
    /// File holding the base64 master key.
    #[arg(long, global = true, env = "VAULTGUARD_MASTER_KEY_FILE")]
    master_key_file: Option<PathBuf>,
    /// The `iss` of tokens VaultGuard signs (its public HTTP base URL).
    #[arg(long, global = true, env = "VAULTGUARD_ISSUER")]
    issuer: Option<String>,
    /// Log format: text or json.
    #[arg(long, global = true, env = "VAULTGUARD_LOG_FORMAT")]
    log_format: Option<String>,
    /// PEM certificate chain; with --tls-key-file both listeners serve TLS.
    #[arg(long, global = true, env = "VAULTGUARD_TLS_CERT_FILE")]
    tls_cert_file: Option<PathBuf>,
    /// PEM private key of --tls-cert-file.
    #[arg(long, global = true, env = "VAULTGUARD_TLS_KEY_FILE")]
    tls_key_file: Option<PathBuf>,
    /// PEM CA bundle for client certificates (mTLS agent authentication).
    #[arg(long, global = true, env = "VAULTGUARD_TLS_CLIENT_CA_FILE")]
    tls_client_ca_file: Option<PathBuf>,
    /// Client certificates: optional or required.
    #[arg(long, global = true, env = "VAULTGUARD_TLS_CLIENT_AUTH")]
    tls_client_auth: Option<String>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Runs the server (migrating the database first).
    Serve(ServeArgs),
    /// Applies (or reverts) database migrations, then exits.
    Migrate {
        /// `up` applies every pending migration; `down` reverts the last one.
        #[arg(value_enum, default_value = "up")]
        direction: Direction,
    },
    /// Mints a bootstrap access token and prints it on stdout.
    Token(TokenArgs),
    /// The optional upgrade to scoped rules: makes every inbound ALLOW or
    /// STEP_UP rule that grants no scope and no resource grant any (`*`),
    /// as such rules did before scopes were part of the policy. Each rule
    /// changed is an audited edit; prints `tenant rule version` per rule.
    /// Run it with the server stopped on SQLite (a running SQLite server
    /// would keep judging by the rules it cached).
    GrantLegacyScopes(GrantLegacyArgs),
    /// Prints a one-time console sign-in link for a tenant's person (for a
    /// server with no identity provider configured): it signs one browser
    /// in once, within --ttl-seconds.
    ConsoleLink(ConsoleLinkArgs),
}

#[derive(Args, Debug)]
struct ConsoleLinkArgs {
    /// The tenant id (`tnt_…`).
    #[arg(long)]
    tenant: String,
    /// A role of the session: admin, approver or auditor (repeat for more).
    #[arg(long = "role", value_enum, required = true)]
    roles: Vec<ConsoleRole>,
    /// Who the session stands for (shown in the audit log).
    #[arg(long, default_value = "console-link")]
    subject: String,
    /// How long the link may be used, in seconds.
    #[arg(long, default_value_t = 300)]
    ttl_seconds: u32,
    /// The HTTP address the server publishes its console at, when no
    /// --issuer is configured.
    #[arg(long, env = "VAULTGUARD_HTTP_ADDR")]
    http_addr: Option<SocketAddr>,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum ConsoleRole {
    Admin,
    Approver,
    Auditor,
}

#[derive(Args, Debug)]
struct GrantLegacyArgs {
    /// Only this tenant's rules.
    #[arg(long)]
    tenant: Option<String>,
    /// List the rules that would change, change nothing.
    #[arg(long)]
    dry_run: bool,
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// gRPC listen address.
    #[arg(long, env = "VAULTGUARD_GRPC_ADDR")]
    grpc_addr: Option<SocketAddr>,
    /// HTTP listen address (JWKS, discovery, /healthz, /metrics).
    #[arg(long, env = "VAULTGUARD_HTTP_ADDR")]
    http_addr: Option<SocketAddr>,
}

#[derive(Args, Debug)]
struct TokenArgs {
    /// The role the token carries.
    #[arg(long, value_enum)]
    role: CliRole,
    /// The tenant id, for admin, approver and auditor tokens.
    #[arg(long)]
    tenant: Option<String>,
    /// The token's subject (who it stands for).
    #[arg(long, default_value = "bootstrap")]
    subject: String,
    /// Lifetime in seconds (at most the server's max token TTL).
    #[arg(long, default_value_t = 3600)]
    ttl: u32,
    /// The HTTP address the server publishes its issuer at, when no --issuer
    /// is configured (must match the running server's issuer).
    #[arg(long, env = "VAULTGUARD_HTTP_ADDR")]
    http_addr: Option<SocketAddr>,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum Direction {
    Up,
    Down,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum CliRole {
    Operator,
    Admin,
    Approver,
    Auditor,
}

fn load_config(common: &CommonArgs) -> anyhow::Result<Config> {
    let mut config = match &common.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    if let Some(v) = &common.data_dir {
        config.data_dir = v.clone();
    }
    if let Some(v) = &common.database_url {
        config.database_url = v.clone();
    }
    if let Some(v) = &common.master_key {
        config.master_key = v.clone();
    }
    if let Some(v) = &common.master_key_file {
        config.master_key_file = v.clone();
    }
    if let Some(v) = &common.issuer {
        config.issuer = v.clone();
    }
    if let Some(v) = &common.log_format {
        config.log_format = v.clone();
    }
    if let Some(v) = &common.tls_cert_file {
        config.tls_cert_file = v.clone();
    }
    if let Some(v) = &common.tls_key_file {
        config.tls_key_file = v.clone();
    }
    if let Some(v) = &common.tls_client_ca_file {
        config.tls_client_ca_file = v.clone();
    }
    if let Some(v) = &common.tls_client_auth {
        config.tls_client_auth = v.clone();
    }
    if let Ok(json) = std::env::var("VAULTGUARD_TRUSTED_ISSUERS") {
        config.trusted_issuers = serde_json::from_str(&json).map_err(|e| {
            anyhow::anyhow!("VAULTGUARD_TRUSTED_ISSUERS is not a JSON list of issuers: {e}")
        })?;
    }
    Ok(config)
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut config = load_config(&cli.common)?;
    telemetry::init(&config.log_format);
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    match cli.command {
        Command::Serve(args) => {
            if let Some(addr) = args.grpc_addr {
                config.grpc_addr = addr;
            }
            if let Some(addr) = args.http_addr {
                config.http_addr = addr;
            }
            let grpc = tokio::net::TcpListener::bind(config.grpc_addr).await?;
            let http = tokio::net::TcpListener::bind(config.http_addr).await?;
            server::serve(config, clock, grpc, http, shutdown_signal()).await
        }
        Command::Migrate { direction } => {
            let db = store::connect(&config).await?;
            match direction {
                Direction::Up => store::migrate(&db).await?,
                Direction::Down => {
                    use vaultguard_migrations::MigratorTrait;
                    vaultguard_migrations::Migrator::down(&db, Some(1)).await?;
                }
            }
            eprintln!("migrations applied");
            Ok(())
        }
        Command::Token(args) => {
            if let Some(addr) = args.http_addr {
                config.http_addr = addr;
            }
            anyhow::ensure!(
                args.ttl > 0 && args.ttl <= config.max_token_ttl_seconds,
                "--ttl must be 1..={}",
                config.max_token_ttl_seconds
            );
            let issuer = config.effective_issuer(config.http_addr);
            let state = server::prepare(config, clock, issuer, true).await?;
            let (role, tenant) = match args.role {
                CliRole::Operator => (Role::Operator, None),
                CliRole::Admin => (Role::Admin, args.tenant.as_deref()),
                CliRole::Approver => (Role::Approver, args.tenant.as_deref()),
                CliRole::Auditor => (Role::Auditor, args.tenant.as_deref()),
            };
            if role != Role::Operator {
                anyhow::ensure!(tenant.is_some(), "--tenant is required for tenant roles");
            }
            let issued = tokens::mint(&state, &args.subject, tenant, &[role], None, args.ttl)
                .await
                .map_err(|e| anyhow::anyhow!("cannot mint token: {e}"))?;
            println!("{}", issued.access_token);
            Ok(())
        }
        Command::ConsoleLink(args) => {
            if let Some(addr) = args.http_addr {
                config.http_addr = addr;
            }
            let issuer = config.effective_issuer(config.http_addr);
            let base = issuer.clone();
            let state = server::prepare(config, clock.clone(), issuer, true).await?;
            let roles: Vec<Role> = args
                .roles
                .iter()
                .map(|role| match role {
                    ConsoleRole::Admin => Role::Admin,
                    ConsoleRole::Approver => Role::Approver,
                    ConsoleRole::Auditor => Role::Auditor,
                })
                .collect();
            let secret = vaultguard_server::domain::console_sessions::create_link(
                &state,
                &args.tenant,
                &args.subject,
                &roles,
                args.ttl_seconds,
                clock.now_millis(),
            )
            .await
            .map_err(|e| anyhow::anyhow!("cannot make a sign-in link: {e}"))?;
            // The fragment never reaches a server log: the browser keeps it.
            println!("{base}/console/link#{secret}");
            Ok(())
        }
        Command::GrantLegacyScopes(args) => {
            let issuer = config.effective_issuer(config.http_addr);
            let state = server::prepare(config, clock, issuer, true).await?;
            let granted = vaultguard_server::domain::policies::grant_legacy_scopes(
                &state,
                args.tenant.as_deref(),
                args.dry_run,
            )
            .await
            .map_err(|e| anyhow::anyhow!("cannot grant legacy scopes: {e}"))?;
            for rule in &granted {
                println!("{} {} {}", rule.tenant_id, rule.rule_id, rule.rule_version);
            }
            eprintln!(
                "{} rule(s) {}",
                granted.len(),
                if args.dry_run {
                    "would change"
                } else {
                    "now grant any scope and resource"
                }
            );
            Ok(())
        }
    }
}
