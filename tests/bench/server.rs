//! The server under test as a child process: free ports, a config file, the
//! database (a fresh PostgreSQL database or SQLite in a temp dir), readiness
//! through `grpc.health.v1`, bootstrap tokens from the `token` subcommand,
//! and its CPU time and resident set from `/proc/<pid>`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use base64::Engine;
use sea_orm::{ConnectionTrait, Database};
use tokio::process::{Child, Command};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use vaultguard_client::VaultGuardClient;

/// Clock ticks per second of `/proc/<pid>/stat` times (`sysconf(_SC_CLK_TCK)`):
/// 100 on every Linux architecture this runs on (`getconf CLK_TCK`).
const CLK_TCK: f64 = 100.0;

/// The audit events the sealer has not chained yet (PostgreSQL; SQLite's
/// file is the server's alone, and `None` here).
pub struct AuditBacklog {
    db: Option<sea_orm::DatabaseConnection>,
}

impl AuditBacklog {
    pub async fn connect(database_url: &str) -> Result<Self> {
        let db = if database_url.is_empty() {
            None
        } else {
            Some(Database::connect(database_url).await?)
        };
        Ok(Self { db })
    }

    /// Waits (up to `limit`) until the sealer has chained every event
    /// committed so far; returns how long that took.
    pub async fn drain(&self, limit: Duration) -> Result<Duration> {
        let started = std::time::Instant::now();
        let Some(db) = &self.db else {
            return Ok(Duration::ZERO);
        };
        loop {
            let row = db
                .query_one_raw(sea_orm::Statement::from_string(
                    sea_orm::DbBackend::Postgres,
                    "SELECT count(*) AS n FROM audit_pending",
                ))
                .await?
                .context("no count")?;
            let pending: i64 = row.try_get("", "n")?;
            if pending == 0 {
                return Ok(started.elapsed());
            }
            anyhow::ensure!(
                started.elapsed() < limit,
                "{pending} audit events still unsealed after {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn close(self) {
        if let Some(db) = self.db {
            db.close().await.ok();
        }
    }
}

/// The whole machine's CPU seconds so far, over every core, from the first
/// line of `/proc/stat` — the server, the load tool, PostgreSQL and the
/// kernel's network work together, so a figure can be read against what
/// the machine has.
#[derive(Debug, Clone, Copy, Default)]
pub struct MachineCpu {
    /// All but idle and iowait (steal included: the hypervisor's time is
    /// not ours to use either).
    pub busy: f64,
    /// Every second of every core.
    pub total: f64,
    /// Time the hypervisor gave another guest while this one had work.
    pub steal: f64,
}

impl std::ops::Sub for MachineCpu {
    type Output = Self;
    fn sub(self, before: Self) -> Self {
        Self {
            busy: self.busy - before.busy,
            total: self.total - before.total,
            steal: self.steal - before.steal,
        }
    }
}

impl std::ops::AddAssign for MachineCpu {
    fn add_assign(&mut self, other: Self) {
        self.busy += other.busy;
        self.total += other.total;
        self.steal += other.steal;
    }
}

pub fn machine_cpu_seconds() -> Result<MachineCpu> {
    let stat = std::fs::read_to_string("/proc/stat").context("read /proc/stat")?;
    let line = stat.lines().next().context("empty /proc/stat")?;
    let ticks: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|field| field.parse::<u64>().map(|t| t as f64))
        .collect::<std::result::Result<_, _>>()?;
    let total: f64 = ticks.iter().sum();
    let tick = |i: usize| ticks.get(i).copied().unwrap_or(0.0);
    Ok(MachineCpu {
        busy: (total - tick(3) - tick(4)) / CLK_TCK,
        total: total / CLK_TCK,
        steal: tick(7) / CLK_TCK,
    })
}

/// The user + system CPU seconds `pid` has used so far.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("read /proc/{pid}/stat"))?;
    stat_cpu_seconds(&stat)
}

/// The user + system CPU seconds every PostgreSQL process (postmaster,
/// backends, WAL writer, checkpointer…) has used so far, by the command name
/// in `/proc/<pid>/stat`. A backend that exits between two readings takes
/// its time with it; the server's pooled connections and the auxiliary
/// processes live through a measurement.
pub fn postgres_cpu_seconds() -> Result<f64> {
    let mut total = 0.0;
    for entry in std::fs::read_dir("/proc").context("read /proc")? {
        let Ok(entry) = entry else { continue };
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        // Processes come and go while the directory is read.
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        if stat.contains(" (postgres) ") {
            total += stat_cpu_seconds(&stat)?;
        }
    }
    Ok(total)
}

/// utime + stime of one `/proc/<pid>/stat` line, in seconds.
fn stat_cpu_seconds(stat: &str) -> Result<f64> {
    // The command name (field 2) may hold spaces: count from its ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("malformed /proc/<pid>/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state); utime is field 14, stime field 15.
    let ticks = |index: usize| -> Result<f64> {
        let value: u64 = fields
            .get(index)
            .context("short /proc/<pid>/stat")?
            .parse()?;
        Ok(value as f64)
    };
    Ok((ticks(11)? + ticks(12)?) / CLK_TCK)
}

/// A `kB` field of `/proc/<pid>/status` (VmRSS, VmHWM), in MiB.
pub fn status_mib(pid: u32, field: &str) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("read /proc/{pid}/status"))?;
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))?;
    Ok(kib as f64 / 1024.0)
}

/// A free TCP port of 127.0.0.1 (bound, then released for the server).
fn free_addr() -> Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?)
}

/// Which database the server runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    Postgres,
    Sqlite,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Self::Postgres => "postgres",
            Self::Sqlite => "sqlite",
        }
    }
}

/// A fresh PostgreSQL database, dropped by [`PgDatabase::drop_now`].
pub struct PgDatabase {
    base_url: String,
    pub name: String,
}

impl PgDatabase {
    /// Starts the local cluster if it is not answering, then creates
    /// `vaultguard_bench_<random>`.
    pub async fn create(base_url: &str) -> Result<Self> {
        ensure_postgres_running().await?;
        let name = format!("vaultguard_bench_{}", uuid::Uuid::new_v4().simple());
        let admin = Database::connect(format!("{base_url}/postgres"))
            .await
            .with_context(|| format!("connect to {base_url}/postgres"))?;
        admin
            .execute_unprepared(&format!("CREATE DATABASE {name}"))
            .await?;
        admin.close().await.ok();
        Ok(Self {
            base_url: base_url.to_owned(),
            name,
        })
    }

    /// The database's URL with `options` (a query string) appended.
    pub fn url(&self, options: &str) -> String {
        if options.is_empty() {
            format!("{}/{}", self.base_url, self.name)
        } else {
            format!("{}/{}?{options}", self.base_url, self.name)
        }
    }

    /// Renames the database to `name` (replacing one of that name) instead
    /// of dropping it.
    pub async fn keep_as(self, name: &str) -> Result<()> {
        anyhow::ensure!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
            "--scale-keep takes a database name of a-z, 0-9 and _"
        );
        let admin = Database::connect(format!("{}/postgres", self.base_url)).await?;
        admin
            .execute_unprepared(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await?;
        admin
            .execute_unprepared(&format!("ALTER DATABASE {} RENAME TO {name}", self.name))
            .await?;
        admin.close().await.ok();
        eprintln!("database kept: {}/{name}", self.base_url);
        Ok(())
    }

    pub async fn drop_now(self) -> Result<()> {
        let admin = Database::connect(format!("{}/postgres", self.base_url)).await?;
        admin
            .execute_unprepared(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .await?;
        admin.close().await.ok();
        Ok(())
    }
}

async fn pg_ready() -> bool {
    Command::new("pg_isready")
        .args(["-q", "-h", "127.0.0.1", "-p", "5432"])
        .status()
        .await
        .is_ok_and(|status| status.success())
}

/// `pg_ctlcluster --skip-systemctl-redirect <version> main start` when the
/// local cluster does not answer.
async fn ensure_postgres_running() -> Result<()> {
    if pg_ready().await {
        return Ok(());
    }
    let version = std::fs::read_dir("/etc/postgresql")
        .context("PostgreSQL is not running and /etc/postgresql is missing")?
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .min()
        .context("no cluster under /etc/postgresql")?;
    eprintln!("starting PostgreSQL {version}");
    let status = Command::new("pg_ctlcluster")
        .args(["--skip-systemctl-redirect", &version, "main", "start"])
        .status()
        .await?;
    ensure!(status.success(), "pg_ctlcluster failed: {status}");
    for _ in 0..60 {
        if pg_ready().await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    bail!("PostgreSQL did not become ready")
}

/// Everything one server process (or a replica of it) is started with.
#[derive(Clone)]
pub struct ServerSpec {
    pub binary: PathBuf,
    pub work_dir: PathBuf,
    /// Empty: SQLite in the data dir.
    pub database_url: String,
    /// Base64 of the master key every replica shares.
    pub master_key: String,
    /// `RUST_LOG` of the server.
    pub log_filter: String,
    /// The per-tenant rate limit (calls per second, burst); `None` turns it
    /// off. Every other limit is off: throughput runs measure the server,
    /// not its throttles.
    pub tenant_limit: Option<(u32, u32)>,
    /// Every limit at the server's defaults instead (`tenant_limit` is
    /// ignored): the overload scenarios measure the server as it ships.
    pub default_limits: bool,
    /// TOML lines appended to the server's config (`--server-config`).
    pub extra_config: Vec<String>,
}

impl ServerSpec {
    pub fn new(binary: PathBuf, work_dir: &Path, database_url: String) -> Result<Self> {
        let mut key = [0u8; 32];
        aws_lc_rs::rand::fill(&mut key).map_err(|_| anyhow::anyhow!("no randomness"))?;
        Ok(Self {
            binary,
            work_dir: work_dir.to_path_buf(),
            database_url,
            master_key: base64::engine::general_purpose::STANDARD.encode(key),
            log_filter: "warn".to_owned(),
            tenant_limit: None,
            default_limits: false,
            extra_config: Vec::new(),
        })
    }
}

/// A running `vaultguard serve`.
pub struct ServerProcess {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub pid: u32,
    /// From spawn to health SERVING.
    pub startup: Duration,
    config_path: PathBuf,
    spec: ServerSpec,
    child: Child,
}

impl ServerProcess {
    /// Writes `<work_dir>/<name>.toml`, spawns the server on free ports and
    /// waits (up to 60 s) until its health says SERVING.
    pub async fn start(spec: &ServerSpec, name: &str) -> Result<Self> {
        let grpc_addr = free_addr()?;
        let http_addr = free_addr()?;
        let data_dir = spec.work_dir.join(format!("{name}-data"));
        std::fs::create_dir_all(&data_dir)?;
        // Replicas of one deployment share the issuer (the first one's).
        let issuer_file = spec.work_dir.join("issuer");
        let issuer = match std::fs::read_to_string(&issuer_file) {
            Ok(issuer) => issuer,
            Err(_) => {
                let issuer = format!("http://{http_addr}");
                std::fs::write(&issuer_file, &issuer)?;
                issuer
            }
        };
        let config = format!(
            "data_dir = {data_dir:?}\n\
             database_url = {database_url:?}\n\
             master_key = {master_key:?}\n\
             grpc_addr = \"{grpc_addr}\"\n\
             http_addr = \"{http_addr}\"\n\
             issuer = {issuer:?}\n\
             oauth_allow_http = true\n\
             outbound_allowed_networks = [\"127.0.0.0/8\"]\n\
             database_max_connections = 16\n\
             {limits}",
            limits = if spec.default_limits {
                String::new()
            } else {
                format!(
                    "rate_limit_agent_per_second = 0\n\
                     rate_limit_tenant_per_second = {tenant_rate}\n\
                     rate_limit_tenant_burst = {tenant_burst}\n\
                     rate_limit_client_per_second = 0\n\
                     max_concurrent_requests = 0\n\
                     max_concurrent_streams_per_connection = 0\n\
                     max_streams_per_tenant = 0\n",
                    tenant_rate = spec.tenant_limit.map_or(0, |(rate, _)| rate),
                    tenant_burst = spec.tenant_limit.map_or(0, |(_, burst)| burst),
                )
            },
            data_dir = data_dir.display().to_string(),
            database_url = spec.database_url,
            master_key = spec.master_key,
        );
        let config = spec
            .extra_config
            .iter()
            .fold(config, |config, line| format!("{config}{line}\n"));
        let config_path = spec.work_dir.join(format!("{name}.toml"));
        std::fs::write(&config_path, config)?;
        let log = std::fs::File::create(spec.work_dir.join(format!("{name}.log")))?;
        let started = Instant::now();
        let child = Command::new(&spec.binary)
            .arg("--config")
            .arg(&config_path)
            .arg("serve")
            .env("RUST_LOG", &spec.log_filter)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("spawn {}", spec.binary.display()))?;
        let pid = child.id().context("the server exited at once")?;
        let mut server = Self {
            grpc_addr,
            http_addr,
            pid,
            startup: Duration::ZERO,
            config_path,
            spec: spec.clone(),
            child,
        };
        server.wait_serving().await?;
        server.startup = started.elapsed();
        Ok(server)
    }

    async fn wait_serving(&mut self) -> Result<()> {
        let url = self.grpc_url();
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                bail!("the server exited during startup: {status}");
            }
            if let Ok(channel) = tonic::transport::Endpoint::from_shared(url.clone())?
                .connect()
                .await
            {
                let answer = HealthClient::new(channel)
                    .check(HealthCheckRequest {
                        service: String::new(),
                    })
                    .await;
                if answer.is_ok_and(|r| r.into_inner().status() == ServingStatus::Serving) {
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        bail!("the server was not SERVING within 60 s")
    }

    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.grpc_addr)
    }

    /// A fresh channel to this server, without credentials.
    pub async fn anonymous(&self) -> Result<VaultGuardClient> {
        Ok(VaultGuardClient::connect(self.grpc_url()).await?)
    }

    /// A fresh channel authenticated with a bootstrap token of `role`.
    pub async fn human(&self, role: &str, tenant: Option<&str>) -> Result<VaultGuardClient> {
        let token = self.mint(role, tenant).await?;
        Ok(self.anonymous().await?.with_bearer(token))
    }

    /// `vaultguard token --role <role> [--tenant <id>]` on the same config
    /// (database, master key, issuer) as the server.
    pub async fn mint(&self, role: &str, tenant: Option<&str>) -> Result<String> {
        let mut command = Command::new(&self.spec.binary);
        command
            .arg("--config")
            .arg(&self.config_path)
            .args([
                "token",
                "--role",
                role,
                "--subject",
                "bench",
                "--ttl",
                "86400",
            ])
            .env("RUST_LOG", "error");
        if let Some(tenant) = tenant {
            command.args(["--tenant", tenant]);
        }
        let output = command.output().await?;
        ensure!(
            output.status.success(),
            "vaultguard token failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let token = String::from_utf8(output.stdout)?.trim().to_owned();
        ensure!(!token.is_empty(), "vaultguard token printed nothing");
        Ok(token)
    }

    pub fn cpu_seconds(&self) -> Result<f64> {
        cpu_seconds(self.pid)
    }

    pub fn rss_mib(&self) -> Result<f64> {
        status_mib(self.pid, "VmRSS")
    }

    /// Stops the server gracefully (health NOT_SERVING, in-flight calls
    /// finish), killing it after 10 s.
    pub async fn stop(mut self) -> Result<()> {
        terminate(&mut self.child, Duration::from_secs(10)).await
    }
}

/// SIGTERM to a child this tool started, then SIGKILL after `grace`.
pub async fn terminate(child: &mut Child, grace: Duration) -> Result<()> {
    let Some(pid) = child.id() else {
        return Ok(()); // already reaped
    };
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .await;
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        child.kill().await?;
    }
    Ok(())
}
