#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

//! The integration-test harness: starts the real server on 127.0.0.1:0 with
//! a fresh database of the backend named by `VAULTGUARD_TEST_DB` (`sqlite`,
//! the default, or `postgres` at `VAULTGUARD_TEST_PG_URL`), and hands out
//! generated clients authenticated as the operator, tenant admins or agents.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use sea_orm::{
    ColumnTrait, ConnectionTrait, Database, DatabaseConnection, EntityTrait, QueryFilter,
    QueryOrder, Statement,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use vaultguard_client::{DelegationOutcome, VaultGuardClient, pb};
use vaultguard_server::clock::{Clock, OffsetClock};
use vaultguard_server::config::{Config, TrustedIssuer};
use vaultguard_server::domain::tokens;
use vaultguard_server::state::AppState;
use vaultguard_server::store::entities::audit_event;

pub use calls::{approve_step_up, get_step_up};
pub use rpc::{Rpc, Tag};
pub use vaultguard_client::ClientError;

pub mod calls;
pub mod contract;
pub mod fixtures;
pub mod oauth_provider;
pub mod pg_ha;
pub mod rpc;
pub mod slow_body;

/// Runs `command` to its end with nothing on its stdin; its stdout, or a
/// panic with its whole output unless it succeeds.
pub fn run_to_end(command: &mut std::process::Command) -> String {
    let shown = format!("{command:?}");
    let output = command
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap_or_else(|err| panic!("cannot run {shown}: {err}"));
    assert!(
        output.status.success(),
        "{shown} failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("utf-8 output")
}

/// A child process killed (and reaped) when the test ends or gives up.
pub struct Running(pub std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// The database backend under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

pub fn backend() -> Backend {
    match std::env::var("VAULTGUARD_TEST_DB").as_deref() {
        Ok("postgres") => Backend::Postgres,
        _ => Backend::Sqlite,
    }
}

/// Panics unless the suite runs on `wanted`. A test for one backend only
/// is named `postgres_only_…` or `sqlite_only_…` and starts with this
/// guard: scripts/test.sh's nextest filters leave it out on the other
/// backend (reported as skipped), and a selection that runs it there anyway
/// fails loudly instead of passing without having tested anything.
#[track_caller]
pub fn require_backend(wanted: Backend) {
    assert_eq!(
        backend(),
        wanted,
        "a {wanted:?}-only test ran on another backend: select it out with \
         `not test(/::postgres_only_/)` or `not test(/::sqlite_only_/)`"
    );
}

/// The PostgreSQL server URL without a database name.
pub fn pg_base_url() -> String {
    std::env::var("VAULTGUARD_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_owned())
}

/// Everything the server logged in this test process (debug level for
/// VaultGuard's crates), for the secret scan.
pub fn captured_logs() -> String {
    let buffer = log_buffer().lock().map(|b| b.clone()).unwrap_or_default();
    String::from_utf8_lossy(&buffer).into_owned()
}

fn log_buffer() -> &'static Arc<Mutex<Vec<u8>>> {
    static BUFFER: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    BUFFER.get_or_init(|| Arc::new(Mutex::new(Vec::new())))
}

#[derive(Clone)]
struct BufferWriter;

impl Write for BufferWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut buffer) = log_buffer().lock() {
            buffer.extend_from_slice(data);
        }
        // Mirror to stderr so failing tests show the server's log.
        std::io::stderr().write(data)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn init_logging() {
    static INIT: OnceLock<()> = OnceLock::new();
    INIT.get_or_init(|| {
        let filter = tracing_subscriber::EnvFilter::new(
            "info,vaultguard_server=debug,vaultguard_client=debug",
        );
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(false)
            .with_writer(|| BufferWriter)
            .try_init();
    });
}

/// Options for one test server.
#[derive(Debug, Clone, Default)]
pub struct TestOptions {
    pub trusted_issuers: Vec<TrustedIssuer>,
    /// The server reaches PostgreSQL through this address (a proxy the test
    /// controls) instead of directly; the test's own state stays direct.
    pub database_proxy: Option<SocketAddr>,
    /// The server's database URL names these hosts, in order, in libpq's
    /// multi-host form (each a proxy the test controls), instead of the
    /// database's own host; the test's own state stays direct.
    pub database_hosts: Vec<SocketAddr>,
    /// Join an existing server as another replica instead of starting on a
    /// fresh database (see [`TestServer::start_replica_of`]).
    pub replica_of: Option<Primary>,
    /// Serve both listeners over TLS (and optionally verify client
    /// certificates); the harness's own clients then connect with
    /// [`TestTls::client`].
    pub tls: Option<TestTls>,
    /// Changes the server's configuration before it starts (small limits
    /// for `tests/it/limits.rs`).
    pub adjust_config: Option<fn(&mut Config)>,
    /// Start WITHOUT the outbound allowance for 127.0.0.0/8 and ::1 that
    /// every other test server has (its third parties listen there), so the
    /// outbound address policy refuses loopback like a production server.
    pub outbound_strict: bool,
    /// How the server looks names up for its outbound requests, instead of
    /// the system resolver (a test's own DNS answers, to rebind a name).
    pub outbound_lookup: Option<Arc<dyn vaultguard_server::outbound::NameLookup>>,
}

/// TLS for a test server: the PEM files it serves with and how the
/// harness's clients (readiness probe, `anonymous`, `operator`, …) connect.
#[derive(Debug, Clone)]
pub struct TestTls {
    /// `tls_cert_file`.
    pub cert_file: std::path::PathBuf,
    /// `tls_key_file`.
    pub key_file: std::path::PathBuf,
    /// `tls_client_ca_file`: enables mTLS agent authentication.
    pub client_ca_file: Option<std::path::PathBuf>,
    /// `tls_client_auth`: `optional` or `required`.
    pub client_auth: String,
    /// What the harness's clients trust (and present, if anything).
    pub client: vaultguard_client::TlsOptions,
}

impl TestOptions {
    /// A server trusting the OIDC issuer `issuer` for audience `vaultguard`
    /// with the default claims (`org_id`, `roles`, no role prefix): enough to
    /// bind an external organisation to a tenant.
    pub fn trusting(issuer: &str) -> Self {
        Self {
            trusted_issuers: vec![TrustedIssuer {
                issuer: issuer.to_owned(),
                audience: "vaultguard".to_owned(),
                tenant_claim: "org_id".to_owned(),
                roles_claim: "roles".to_owned(),
                role_prefix: String::new(),
                ..Default::default()
            }],
            ..Self::default()
        }
    }
}

/// What a second server process shares with the first one on the same
/// PostgreSQL database: the database itself (neither created nor dropped by
/// the replica), the master key that seals the issuer keys, the issuer
/// (tokens minted by either are accepted by both) and the clock (one wall
/// clock for both machines, so `clock.advance` moves both).
#[derive(Debug, Clone)]
pub struct Primary {
    pub database_url: String,
    /// Base64 of the 32-byte master key, as `Config.master_key` takes it.
    pub master_key: String,
    pub issuer: String,
    pub clock: Arc<OffsetClock>,
}

/// `url` with its host and port replaced by `proxy`.
fn through_proxy(url: &str, proxy: SocketAddr) -> String {
    let mut url = reqwest::Url::parse(url).expect("database url");
    url.set_ip_host(proxy.ip()).expect("proxy host");
    url.set_port(Some(proxy.port())).expect("proxy port");
    url.to_string()
}

/// `url` with its host and port replaced by `hosts`, libpq's multi-host
/// form (`postgres://user@h1:p1,h2:p2/db`).
fn through_hosts(url: &str, hosts: &[SocketAddr]) -> String {
    let parsed = reqwest::Url::parse(url).expect("database url");
    let authority = format!(
        "{}:{}",
        parsed.host_str().expect("database host"),
        parsed.port().unwrap_or(5432)
    );
    let listed = hosts
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",");
    url.replacen(&authority, &listed, 1)
}

/// A running server and its fresh database.
pub struct TestServer {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    /// The test database's URL (direct, not through any proxy).
    pub database_url: String,
    pub clock: Arc<OffsetClock>,
    /// State on the same database and master key as the server, for minting
    /// tokens and inspecting rows directly.
    pub state: AppState,
    /// Base64 of the master key the server uses.
    master_key: String,
    /// How the harness's clients connect when the server serves TLS.
    tls_client: Option<vaultguard_client::TlsOptions>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
    pg_database: Option<String>,
    _dir: tempfile::TempDir,
}

/// Creates a fresh PostgreSQL database; returns its URL and name.
pub async fn create_pg_database() -> (String, String) {
    let name = format!("vg_test_{}", uuid::Uuid::new_v4().simple());
    let admin = Database::connect(format!("{}/postgres", pg_base_url()))
        .await
        .expect("connect to postgres");
    admin
        .execute_unprepared(&format!("CREATE DATABASE {name}"))
        .await
        .expect("create test database");
    admin.close().await.ok();
    (format!("{}/{name}", pg_base_url()), name)
}

/// Drops a database made by [`create_pg_database`], closing its connections.
pub async fn drop_pg_database(name: &str) {
    if let Ok(admin) = Database::connect(format!("{}/postgres", pg_base_url())).await {
        let _ = admin
            .execute_unprepared(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await;
        admin.close().await.ok();
    }
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(TestOptions::default()).await
    }

    /// A server whose configuration `adjust` changes before it starts.
    pub async fn start_adjusted(adjust: fn(&mut Config)) -> Self {
        let adjust_config = Some(adjust);
        Self::start_with(TestOptions {
            adjust_config,
            ..TestOptions::default()
        })
        .await
    }

    pub async fn start_with(options: TestOptions) -> Self {
        init_logging();
        let dir = tempfile::tempdir().expect("temp dir");
        let primary = options.replica_of.clone();
        let (database_url, pg_database) = match (&primary, backend()) {
            (Some(primary), _) => (primary.database_url.clone(), None),
            (None, Backend::Sqlite) => (
                format!(
                    "sqlite://{}?mode=rwc",
                    dir.path().join("vaultguard.db").display()
                ),
                None,
            ),
            (None, Backend::Postgres) => {
                let (url, name) = create_pg_database().await;
                (url, Some(name))
            }
        };
        let grpc = TcpListener::bind("127.0.0.1:0").await.expect("bind grpc");
        let http = TcpListener::bind("127.0.0.1:0").await.expect("bind http");
        let grpc_addr = grpc.local_addr().expect("grpc addr");
        let http_addr = http.local_addr().expect("http addr");
        let mut config = Config {
            data_dir: dir.path().to_path_buf(),
            database_url: match options.database_proxy {
                Some(proxy) => through_proxy(&database_url, proxy),
                None if !options.database_hosts.is_empty() => {
                    through_hosts(&database_url, &options.database_hosts)
                }
                None => database_url.clone(),
            },
            trusted_issuers: options.trusted_issuers.clone(),
            jwks_min_refresh_seconds: 0,
            health_probe_interval_ms: 200,
            webhook_allow_http: true,
            oauth_allow_http: true,
            webhook_poll_interval_ms: 200,
            // The tests' OAuth providers, OIDC issuers and webhook receivers
            // listen on loopback, which the outbound address policy refuses
            // unless allowed (`outbound_strict` leaves it refused).
            outbound_allowed_networks: if options.outbound_strict {
                Vec::new()
            } else {
                vec!["127.0.0.0/8".to_owned(), "::1/128".to_owned()]
            },
            outbound_lookup: options.outbound_lookup.clone(),
            database_acquire_timeout_ms: 1_000,
            master_key: primary
                .as_ref()
                .map(|p| p.master_key.clone())
                .unwrap_or_default(),
            issuer: primary
                .as_ref()
                .map(|p| p.issuer.clone())
                .unwrap_or_default(),
            tls_cert_file: options
                .tls
                .as_ref()
                .map(|t| t.cert_file.clone())
                .unwrap_or_default(),
            tls_key_file: options
                .tls
                .as_ref()
                .map(|t| t.key_file.clone())
                .unwrap_or_default(),
            tls_client_ca_file: options
                .tls
                .as_ref()
                .and_then(|t| t.client_ca_file.clone())
                .unwrap_or_default(),
            tls_client_auth: options
                .tls
                .as_ref()
                .map_or_else(|| "optional".to_owned(), |t| t.client_auth.clone()),
            ..Config::default()
        };
        if let Some(adjust) = options.adjust_config {
            adjust(&mut config);
        }
        let clock = primary.map_or_else(OffsetClock::new, |p| p.clock);
        let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
        let server_clock: Arc<dyn Clock> = clock.clone();
        let task = tokio::spawn(vaultguard_server::server::serve(
            config.clone(),
            server_clock,
            grpc,
            http,
            async move {
                let _ = shutdown_rx.await;
            },
        ));
        let tls_client = options.tls.as_ref().map(|t| t.client.clone());
        match &tls_client {
            Some(tls) => wait_ready_tls(grpc_addr, tls).await,
            None => wait_ready(grpc_addr).await,
        }
        let mut direct = config.clone();
        direct.database_url = database_url.clone();
        let state_clock: Arc<dyn Clock> = clock.clone();
        let issuer = direct.effective_issuer(http_addr);
        let state = vaultguard_server::server::prepare(direct, state_clock, issuer, false)
            .await
            .expect("test state");
        let master_key = if config.master_key.is_empty() {
            std::fs::read_to_string(dir.path().join("master.key"))
                .expect("the server's generated master.key")
                .trim()
                .to_owned()
        } else {
            config.master_key.clone()
        };
        Self {
            grpc_addr,
            http_addr,
            database_url,
            clock,
            state,
            master_key,
            tls_client,
            shutdown: Some(shutdown_tx),
            task: Some(task),
            pg_database,
            _dir: dir,
        }
    }

    /// Starts a second server on `first`'s PostgreSQL database, as another
    /// replica behind the same load balancer would run: same database URL
    /// (not created, and not dropped when this one stops), same master key,
    /// issuer and clock; its own listeners, data directory, connection pool,
    /// sweeper, sealer, hub and LISTEN connection. It runs in this test
    /// process but shares nothing in memory with `first` except the test
    /// clock, so a change reaches it only through the database. PostgreSQL only: on SQLite step-up
    /// changes fan out in-process, so there is no second replica.
    pub async fn start_replica_of(first: &Self) -> Self {
        assert_eq!(
            backend(),
            Backend::Postgres,
            "replicas share a PostgreSQL database"
        );
        Self::start_with(TestOptions {
            replica_of: Some(first.primary()),
            ..TestOptions::default()
        })
        .await
    }

    /// What a replica of this server shares with it.
    pub fn primary(&self) -> Primary {
        Primary {
            database_url: self.database_url.clone(),
            master_key: self.master_key.clone(),
            issuer: self.state.keys.issuer().to_owned(),
            clock: self.clock.clone(),
        }
    }

    /// `https` when the server serves TLS, else `http`.
    fn scheme(&self) -> &'static str {
        if self.tls_client.is_some() {
            "https"
        } else {
            "http"
        }
    }

    pub fn grpc_url(&self) -> String {
        format!("{}://{}", self.scheme(), self.grpc_addr)
    }

    /// The server's data directory (it holds the generated `master.key`).
    pub fn data_dir(&self) -> &std::path::Path {
        self._dir.path()
    }

    pub fn http_url(&self) -> String {
        format!("{}://{}", self.scheme(), self.http_addr)
    }

    /// A client without credentials (over TLS as [`TestTls::client`] says,
    /// when the server serves TLS).
    pub async fn anonymous(&self) -> VaultGuardClient {
        match &self.tls_client {
            Some(tls) => VaultGuardClient::connect_tls(self.grpc_url(), tls.clone()).await,
            None => VaultGuardClient::connect(self.grpc_url()).await,
        }
        .expect("connect")
    }

    /// A client with a fixed bearer token.
    pub async fn with_bearer(&self, token: &str) -> VaultGuardClient {
        self.anonymous().await.with_bearer(token)
    }

    /// Mints a token as the `vaultguard token` CLI does.
    pub async fn mint(&self, subject: &str, tenant: Option<&str>, roles: &[pb::Role]) -> String {
        tokens::mint(&self.state, subject, tenant, roles, None, 3600)
            .await
            .expect("mint token")
            .access_token
    }

    /// A client authenticated as the platform operator.
    pub async fn operator(&self) -> VaultGuardClient {
        let token = self.mint("operator", None, &[pb::Role::Operator]).await;
        self.with_bearer(&token).await
    }

    /// A client authenticated as a human of `tenant_id` with `roles`.
    pub async fn human(
        &self,
        tenant_id: &str,
        subject: &str,
        roles: &[pb::Role],
    ) -> VaultGuardClient {
        let token = self.mint(subject, Some(tenant_id), roles).await;
        self.with_bearer(&token).await
    }

    /// A client authenticated as `subject`, an admin of `tenant_id`.
    pub async fn admin(&self, tenant_id: &str, subject: &str) -> VaultGuardClient {
        self.human(tenant_id, subject, &[pb::Role::Admin]).await
    }

    /// A client authenticated as `subject`, an approver of `tenant_id`.
    pub async fn approver(&self, tenant_id: &str, subject: &str) -> VaultGuardClient {
        self.human(tenant_id, subject, &[pb::Role::Approver]).await
    }

    /// A client authenticated as `auditor@test`, the auditor of `tenant_id`.
    pub async fn auditor(&self, tenant_id: &str) -> VaultGuardClient {
        self.human(tenant_id, "auditor@test", &[pb::Role::Auditor])
            .await
    }

    /// Creates a tenant as the operator and returns it.
    pub async fn create_tenant(&self, slug: &str) -> pb::Tenant {
        let operator = self.operator().await;
        let request = operator
            .request(pb::CreateTenantRequest {
                slug: slug.to_owned(),
                display_name: slug.to_owned(),
                settings: None,
            })
            .await
            .expect("request");
        operator
            .tenants()
            .create_tenant(request)
            .await
            .expect("create tenant")
            .into_inner()
            .tenant
            .expect("tenant")
    }

    /// Creates an agent in `tenant_id` as that tenant's admin; returns the
    /// agent, its secret, and a client authenticated with its credentials.
    pub async fn create_agent(
        &self,
        tenant_id: &str,
        name: &str,
    ) -> (pb::Agent, String, VaultGuardClient) {
        let admin = self
            .human(tenant_id, "admin@test", &[pb::Role::Admin])
            .await;
        let request = admin
            .request(pb::CreateAgentRequest {
                name: name.to_owned(),
                description: String::new(),
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
        let client = self
            .anonymous()
            .await
            .with_client_credentials(agent.id.clone(), created.client_secret.clone());
        (agent, created.client_secret, client)
    }

    /// Counts rows of a table (for "nothing was written" checks).
    pub async fn count(&self, table: &str) -> i64 {
        count_rows(&self.state.db, table).await
    }

    /// The events of `event_type` in `tenant_id`'s audit log, oldest first.
    pub async fn audit_events(&self, tenant_id: &str, event_type: &str) -> Vec<audit_event::Model> {
        audit_event::Entity::find()
            .filter(audit_event::Column::TenantId.eq(tenant_id))
            .filter(audit_event::Column::EventType.eq(event_type))
            .order_by_asc(audit_event::Column::Id)
            .all(&self.state.db)
            .await
            .expect("load audit events")
    }

    /// The methods of the `auth.not_found` events in `tenant_id`'s log
    /// (NOT_FOUND answers to that tenant's principals), oldest first.
    pub async fn not_found_methods(&self, tenant_id: &str) -> Vec<String> {
        self.audit_events(tenant_id, "auth.not_found")
            .await
            .into_iter()
            .map(|event| {
                let details: serde_json::Value =
                    serde_json::from_str(&event.details).expect("details json");
                details["method"].as_str().expect("method").to_owned()
            })
            .collect()
    }

    /// How many events of `event_type` in `tenant_id`'s log name `subject_id`
    /// among their `subject_ids`.
    pub async fn audit_count(&self, tenant_id: &str, event_type: &str, subject_id: &str) -> usize {
        self.audit_events(tenant_id, event_type)
            .await
            .iter()
            .filter(|event| {
                serde_json::from_str::<Vec<String>>(&event.subject_ids)
                    .expect("subject_ids is a JSON array of strings")
                    .iter()
                    .any(|id| id == subject_id)
            })
            .count()
    }

    /// Waits until the sealer has linked every committed audit event.
    pub async fn wait_sealed(&self) {
        for _ in 0..100 {
            if count_rows(&self.state.db, "audit_pending").await == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("audit events were not sealed");
    }

    /// Stops the server and drops its database (a replica leaves the
    /// database to the server it joined).
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
        self.state.db.clone().close().await.ok();
        if let Some(name) = self.pg_database.take() {
            drop_pg_database(&name).await;
        }
    }
}

/// Waits until the server on `grpc_addr` answers (its migrations ran and its
/// issuer keys exist); panics after 10 seconds.
pub async fn wait_ready(grpc_addr: SocketAddr) {
    let url = format!("http://{grpc_addr}");
    wait_until_answering(|| VaultGuardClient::connect(url.clone())).await;
}

/// [`wait_ready`] for a server that serves TLS, connecting with `tls`.
pub async fn wait_ready_tls(grpc_addr: SocketAddr, tls: &vaultguard_client::TlsOptions) {
    let url = format!("https://{grpc_addr}");
    wait_until_answering(|| VaultGuardClient::connect_tls(url.clone(), tls.clone())).await;
}

/// Connects with `connect` until GetJwks answers; panics after 10 seconds.
async fn wait_until_answering<F>(connect: impl Fn() -> F)
where
    F: std::future::Future<Output = Result<VaultGuardClient, ClientError>>,
{
    for _ in 0..200 {
        if let Ok(client) = connect().await
            && client
                .issuer_keys()
                .get_jwks(pb::GetJwksRequest {})
                .await
                .is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("server did not start");
}

pub async fn count_rows(db: &DatabaseConnection, table: &str) -> i64 {
    let backend = db.get_database_backend();
    let row = db
        .query_one_raw(Statement::from_string(
            backend,
            format!("SELECT COUNT(*) AS n FROM {table}"),
        ))
        .await
        .expect("count query")
        .expect("count row");
    row.try_get::<i64>("", "n").expect("count value")
}

/// Asserts that `result` failed with `code`; returns the error.
#[track_caller]
pub fn expect_code<T: std::fmt::Debug>(
    result: Result<T, impl Into<ClientError>>,
    code: tonic::Code,
) -> ClientError {
    match result {
        Ok(value) => panic!("expected {code:?}, got Ok({value:?})"),
        Err(err) => {
            let err: ClientError = err.into();
            assert_eq!(err.code(), Some(code), "unexpected error: {err:?}");
            err
        }
    }
}

/// Asserts that `result` failed with `code` and ErrorInfo `reason`; returns
/// the error's ErrorInfo metadata.
#[track_caller]
pub fn expect_reason<T: std::fmt::Debug>(
    result: Result<T, impl Into<ClientError>>,
    code: tonic::Code,
    reason: pb::ErrorReason,
) -> std::collections::HashMap<String, String> {
    let err = expect_code(result, code);
    assert_eq!(err.reason(), Some(reason), "unexpected error: {err:?}");
    match err {
        ClientError::Status { metadata, .. } => metadata,
        other => panic!("not a status: {other:?}"),
    }
}

/// Asserts INVALID_ARGUMENT naming `field` among its violations; `field`
/// may list `|`-separated alternatives, for the few limits whose field the
/// contract leaves open (which bound of an empty time window is wrong).
#[track_caller]
pub fn expect_invalid<T: std::fmt::Debug>(result: Result<T, impl Into<ClientError>>, field: &str) {
    let err = expect_code(result, tonic::Code::InvalidArgument);
    let ClientError::Status {
        field_violations, ..
    } = &err
    else {
        panic!("not a status: {err:?}")
    };
    assert!(
        field
            .split('|')
            .any(|one| field_violations.iter().any(|(name, _)| name == one)),
        "expected a violation on {field}, got {field_violations:?}"
    );
}

// ---------------------------------------------------------------------------
// StepUpService calls shared by the integration tests and the benchmark.

/// An open WatchStepUp stream.
pub type StepUpWatch = tonic::Streaming<pb::WatchStepUpResponse>;

/// Opens WatchStepUp on `auth_req_id` as `agent`, with heartbeats every
/// `heartbeat_seconds` (0: the server's 15 s).
pub async fn watch_step_up(
    agent: &VaultGuardClient,
    auth_req_id: &str,
    heartbeat_seconds: u32,
) -> Result<StepUpWatch, ClientError> {
    let request = agent
        .request(pb::WatchStepUpRequest {
            auth_req_id: auth_req_id.to_owned(),
            heartbeat_interval_seconds: heartbeat_seconds,
        })
        .await?;
    Ok(agent.step_ups().watch_step_up(request).await?.into_inner())
}

/// The next message of a watch, or `None` when the stream ended with OK;
/// panics on an error status or after `within` without a message.
pub async fn next_message<T>(stream: &mut tonic::Streaming<T>, within: Duration) -> Option<T> {
    match tokio::time::timeout(within, stream.message()).await {
        Ok(Ok(message)) => message,
        Ok(Err(status)) => panic!("the watch failed: {:?}", ClientError::from(status)),
        Err(_) => panic!("no watch message within {within:?}"),
    }
}

/// The next status event of an agent watch, skipping heartbeats; panics if
/// the stream ends or fails first, or nothing comes within 10 seconds.
pub async fn next_status(watch: &mut StepUpWatch) -> pb::StepUpStatus {
    use pb::watch_step_up_response::Event;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match next_message(watch, left).await.and_then(|m| m.event) {
            Some(Event::Status(status)) => return status,
            Some(Event::Heartbeat(_)) => {}
            None => panic!("the watch ended without a status"),
        }
    }
}

/// A STEP_UP request as its agent (`auth_req_id`) and its approvers
/// (`step_up_id`, `request_hash`) address it.
#[derive(Debug, Clone)]
pub struct PendingStepUp {
    pub auth_req_id: String,
    pub step_up_id: String,
    pub delegation_id: String,
    pub request_hash: String,
}

/// Sends `request` as `agent`, which the policies must decide STEP_UP, and
/// reads the step-up as `approver` (of the receiving tenant) sees it.
pub async fn request_step_up(
    agent: &VaultGuardClient,
    approver: &VaultGuardClient,
    request: pb::RequestDelegationRequest,
) -> PendingStepUp {
    let outcome = agent.request_delegation(request).await;
    let Ok(DelegationOutcome::StepUp { challenge, .. }) = outcome else {
        panic!("the request was not decided STEP_UP: {outcome:?}")
    };
    let delegation = challenge.delegation.expect("challenge without delegation");
    let shown = get_step_up(approver, &delegation.step_up_id)
        .await
        .expect("the approver reads the step-up");
    PendingStepUp {
        auth_req_id: challenge.auth_req_id,
        step_up_id: delegation.step_up_id,
        delegation_id: delegation.id,
        request_hash: shown.request_hash,
    }
}

// ---------------------------------------------------------------------------
// A database outage the test controls.

/// Whether a [`Proxy`] forwards, and which outage it is in: every cut starts
/// a new epoch, and a connection forwarded in an earlier epoch is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ProxyState {
    up: bool,
    epoch: u64,
}

/// A TCP proxy to PostgreSQL standing for the database server in outage
/// tests: [`Proxy::cut`] closes every forwarded connection and stops
/// listening, so new connections are refused (ECONNREFUSED, as from a
/// stopped PostgreSQL); [`Proxy::restore`] listens again on the same port.
/// Stopping the real PostgreSQL cluster instead would break every other
/// test running in parallel against it.
pub struct Proxy {
    /// The address the server under test connects to instead of the
    /// database.
    pub addr: SocketAddr,
    state: tokio::sync::watch::Sender<ProxyState>,
    task: JoinHandle<()>,
}

impl Proxy {
    /// A proxy to the PostgreSQL server of [`pg_base_url`].
    pub async fn to_postgres() -> Self {
        let base = reqwest::Url::parse(&pg_base_url()).expect("pg_base_url is a URL");
        let upstream = format!(
            "{}:{}",
            base.host_str().expect("pg host"),
            base.port().unwrap_or(5432)
        );
        Self::start(upstream).await
    }

    /// A proxy on 127.0.0.1 (a free port) to `upstream` (`host:port`).
    pub async fn start(upstream: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let (state, _) = tokio::sync::watch::channel(ProxyState { up: true, epoch: 0 });
        let task = tokio::spawn(Self::run(listener, upstream, state.clone()));
        Self { addr, state, task }
    }

    async fn run(
        listener: TcpListener,
        upstream: String,
        state: tokio::sync::watch::Sender<ProxyState>,
    ) {
        let addr = listener.local_addr().expect("proxy addr");
        let mut changes = state.subscribe();
        let mut listener = Some(listener);
        loop {
            let epoch = match changes.wait_for(|s| s.up).await {
                Ok(current) => current.epoch,
                Err(_) => return,
            };
            let bound = match listener.take() {
                Some(bound) => bound,
                None => Self::rebind(addr).await,
            };
            loop {
                tokio::select! {
                    accepted = bound.accept() => {
                        let Ok((mut inbound, _)) = accepted else { continue };
                        let mut closed = state.subscribe();
                        let upstream = upstream.clone();
                        tokio::spawn(async move {
                            let Ok(mut outbound) = TcpStream::connect(&upstream).await else {
                                return;
                            };
                            tokio::select! {
                                _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                                _ = closed.wait_for(|s| s.epoch != epoch) => {}
                            }
                        });
                    }
                    // Cut: dropping the listener refuses new connections.
                    _ = changes.wait_for(|s| s.epoch != epoch) => break,
                }
            }
        }
    }

    /// Listens on `addr` again (tokio sets SO_REUSEADDR, so the closed
    /// connections' TIME_WAIT does not block it).
    async fn rebind(addr: SocketAddr) -> TcpListener {
        for _ in 0..100 {
            if let Ok(listener) = TcpListener::bind(addr).await {
                return listener;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the proxy cannot listen on {addr} again");
    }

    /// Starts an outage: every forwarded connection is closed and new ones
    /// are refused until [`Proxy::restore`].
    pub fn cut(&self) {
        self.state.send_modify(|s| {
            s.up = false;
            s.epoch += 1;
        });
    }

    /// Ends the outage: the proxy listens and forwards again.
    pub fn restore(&self) {
        self.state.send_modify(|s| s.up = true);
    }

    /// Cuts for good and stops the proxy.
    pub fn stop(self) {
        self.cut();
        self.task.abort();
    }
}
