//! Storage: the database connection, the SeaORM entities and their
//! lifecycles. Only the domain layer uses this module; gRPC adapters never
//! see an entity.

pub mod entities;
pub mod failover;
pub mod lifecycle;

use std::sync::Arc;
use std::time::Duration;

use sea_orm::{
    ConnectOptions, ConnectionTrait, Database, DatabaseBackend, DatabaseConnection,
    DatabaseTransaction, DbErr, Statement, TransactionTrait,
};
use vaultguard_migrations::{Migrator, MigratorTrait};

use crate::config::Config;

/// The smallest PostgreSQL pool the server runs on. Some paths read through
/// the pool while their transaction holds a connection (an approval's
/// policy re-check reads what the caches miss under the step-up's row
/// lock), so on one connection they would wait for themselves until the
/// acquire timeout (`tests/it/small_pool.rs` runs every hot path at once on
/// this pool, and fails on one connection).
pub const MIN_POSTGRES_CONNECTIONS: u32 = 2;

/// An opened database and what follows its writable host.
#[derive(Debug)]
pub struct Opened {
    pub db: DatabaseConnection,
    pub failover: Arc<failover::Failover>,
}

/// Opens the configured database (see [`open`]).
pub async fn connect(config: &Config) -> Result<DatabaseConnection, DbErr> {
    open(config).await.map(|opened| opened.db)
}

/// Opens the configured database. SQLite gets WAL, a busy timeout, foreign
/// keys, and one pooled connection (SQLite serializes writers anyway; one
/// connection turns lock contention into queueing instead of SQLITE_BUSY).
/// PostgreSQL's URL may name several hosts: the pool goes to the one that
/// takes writes, and [`failover::Failover`] follows it from there.
pub async fn open(config: &Config) -> Result<Opened, DbErr> {
    let configured = config.effective_database_url();
    let is_sqlite = configured.starts_with("sqlite:");
    let timeout = Duration::from_millis(config.database_acquire_timeout_ms);
    let mark = Arc::new(failover::SwitchMark::new());
    let (url, hosts, current) = if is_sqlite {
        (configured, Vec::new(), 0)
    } else {
        if config.database_max_connections < MIN_POSTGRES_CONNECTIONS {
            return Err(DbErr::Custom(format!(
                "database_max_connections must be at least {MIN_POSTGRES_CONNECTIONS} on PostgreSQL (it is {})",
                config.database_max_connections
            )));
        }
        let parsed = failover::parse_hosts(&configured).map_err(DbErr::Custom)?;
        let base = parsed.urls[0]
            .parse::<sea_orm::sqlx::postgres::PgConnectOptions>()
            .map_err(|_| DbErr::Custom("database_url: not a valid PostgreSQL URL".to_owned()))?;
        let wait = Duration::from_millis(config.database_startup_wait_ms);
        let started = std::time::Instant::now();
        let current = loop {
            if let Some((current, _)) = failover::find_writable(&base, &parsed.hosts, timeout).await
            {
                break current;
            }
            if started.elapsed() >= wait {
                return Err(DbErr::Custom(format!(
                    "no writable database host among the {} configured (each was unreachable or in recovery) after {} ms",
                    parsed.hosts.len(),
                    started.elapsed().as_millis()
                )));
            }
            tracing::warn!(
                hosts = parsed.hosts.len(),
                "no writable database host yet; waiting (database_startup_wait_ms)"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        (parsed.urls[current].clone(), parsed.hosts, current)
    };
    if is_sqlite {
        std::fs::create_dir_all(&config.data_dir)
            .map_err(|e| DbErr::Custom(format!("cannot create data dir: {e}")))?;
    }
    let mut options = ConnectOptions::new(url);
    options
        .sqlx_logging(false)
        .connect_timeout(Duration::from_millis(config.database_acquire_timeout_ms))
        .acquire_timeout(Duration::from_millis(config.database_acquire_timeout_ms))
        .test_before_acquire(false);
    if is_sqlite {
        options
            .max_connections(1)
            .min_connections(1)
            .map_sqlx_sqlite_opts(|o| {
                o.journal_mode(sea_orm::sqlx::sqlite::SqliteJournalMode::Wal)
                    .synchronous(sea_orm::sqlx::sqlite::SqliteSynchronous::Normal)
                    .busy_timeout(Duration::from_secs(5))
                    .foreign_keys(true)
            });
    } else {
        // After a failover the pool drops, instead of reusing, every
        // connection opened before it (one atomic load per acquire).
        let keep = mark.clone();
        options
            .map_sqlx_postgres_before_acquire(move |_, meta| {
                let keeps = keep.keeps(meta.age);
                Box::pin(async move { Ok(keeps) })
            })
            .max_connections(config.database_max_connections)
            .min_connections(1)
            // Every statement is prepared once per connection and then
            // executed with the plan made for any parameters. Left to
            // choose, PostgreSQL re-planned the hot writes (multi-row
            // inserts in common table expressions) on many executions: an
            // ALLOW delegation cost the machine 0.74 CPU-ms with custom plans
            // and 0.63 with generic ones (+15-20% ALLOW/s, +8% Sign/s in
            // `scripts/bench.sh`). Our queries are index lookups and
            // cursor pages, whose plan does not depend on the values.
            //
            // Nor may it depend on the tables' sizes when it was made: a
            // connection plans a statement once, often on a young database
            // whose statistics say its tables are empty, where reading a
            // whole table costs nothing. The sealer's read of pending events
            // was planned that way and went on reading every audit event
            // ever written on every round (3.2M rows in 14 s of ALLOW load
            // in `scripts/bench.sh`) until autovacuum's next ANALYZE, which
            // on a table that grows by 10% a minute comes late. With
            // sequential scans priced out, every statement that can use an
            // index plans with it whatever the statistics say; a statement
            // that has none still scans.
            .map_sqlx_postgres_opts(|o| {
                o.options([
                    ("plan_cache_mode", "force_generic_plan"),
                    ("enable_seqscan", "off"),
                ])
            });
    }
    let db = Database::connect(options).await?;
    let failover = Arc::new(failover::Failover::new(
        db.clone(),
        hosts,
        current,
        mark,
        timeout,
    ));
    Ok(Opened { db, failover })
}

/// Applies every pending migration.
pub async fn migrate(db: &DatabaseConnection) -> Result<(), DbErr> {
    Migrator::up(db, None).await
}

/// True when the backend is PostgreSQL (advisory locks, LISTEN/NOTIFY).
pub fn is_postgres(db: &impl ConnectionTrait) -> bool {
    db.get_database_backend() == DatabaseBackend::Postgres
}

/// Begins a transaction. Every transaction of the server starts here
/// (clippy's `disallowed-methods` refuses sea-orm's own `begin` elsewhere).
///
/// BEGIN runs in a task of its own, to its end whatever happens to the
/// caller: sqlx counts a transaction only once BEGIN's answer is read, so a
/// caller that went away in between (a cancelled call, a dropped stream, a
/// deadline) returned its connection to the pool inside a transaction
/// nobody owned. The next callers' statements then ran inside it (an
/// autocommit write answered OK stayed uncommitted until someone else's
/// COMMIT, or was lost with the connection), and after one failed statement
/// every later one failed (`tests/it/small_pool.rs`). Now a transaction
/// nobody takes is dropped by the task, which rolls it back. Costs one task
/// spawn per transaction.
pub async fn begin(db: &DatabaseConnection) -> Result<DatabaseTransaction, DbErr> {
    begin_with(db, None, None).await
}

/// [`begin`] with an isolation level and access mode.
pub async fn begin_with(
    db: &DatabaseConnection,
    isolation: Option<sea_orm::IsolationLevel>,
    access: Option<sea_orm::AccessMode>,
) -> Result<DatabaseTransaction, DbErr> {
    let db = db.clone();
    #[allow(clippy::disallowed_methods)]
    let begun = tokio::spawn(async move { db.begin_with_config(isolation, access).await });
    begun
        .await
        .map_err(|err| DbErr::Custom(format!("BEGIN's task failed: {err}")))?
}

/// A read-only transaction whose reads all see one snapshot: REPEATABLE READ
/// on PostgreSQL; on SQLite every transaction reads one snapshot.
pub async fn begin_snapshot(db: &DatabaseConnection) -> Result<DatabaseTransaction, DbErr> {
    if is_postgres(db) {
        begin_with(
            db,
            Some(sea_orm::IsolationLevel::RepeatableRead),
            Some(sea_orm::AccessMode::ReadOnly),
        )
        .await
    } else {
        begin(db).await
    }
}

/// A cheap liveness query for the health service.
pub async fn ping(db: &DatabaseConnection) -> Result<(), DbErr> {
    let backend = db.get_database_backend();
    db.execute_raw(Statement::from_string(backend, "SELECT 1"))
        .await
        .map(|_| ())
}
