//! `vaultguard-bench --scale <levels>`: the hot paths, the audit reads, the
//! server's start-up and its memory as the database grows to a production
//! shape (PostgreSQL only).
//!
//! One fresh database serves the whole run. The server starts on it empty
//! and the usual parties are set up over gRPC (fixture.rs). First the rules
//! measurement: ALLOW EdDSA with 10 inbound rules in the receiving tenant,
//! then with `--scale-rules` (10,000), the others created through the real
//! CreateRule, none matching the requested action (they stay for the rest
//! of the run). Then the hot scenarios (`--scenarios`, default [`HOT`]) and
//! the audit reads ([`audit_paths`]) are measured at the empty level and,
//! for each level L in increasing order, the server is stopped, the
//! database seeded up to L, the server started again (its time to SERVING
//! and RSS recorded) and the same measurements run. One table of every
//! level ends the run.
//!
//! A level L means, in whole-table totals (what the previous levels and
//! the measurements wrote counts): L events in the requesting tenant's
//! audit log, L/10 delegations, L/100 agents and L/1000 tenants; `1e7` is
//! the issue's largest shape (10 M events, 1 M delegations, 100,000
//! agents, 10,000 tenants). Rows go in through the real schema (the
//! migrations' tables, constraints and indexes, nothing dropped or
//! deferred), shaped as the server writes them:
//!
//! - tenants and agents: `INSERT … SELECT generate_series`, ids shaped as
//!   the server's (`tnt_`/`agt_` and a UUIDv7 in hex), unique slugs and
//!   names, 1% of tenants suspended and 2% of agents disabled, creation
//!   times over the past year. A tenth of the agents belong to the
//!   requesting tenant (it is the big one: its log is the measured one),
//!   the rest spread evenly over the seeded tenants. Every agent's secret
//!   digest is a copy of the fixture agent's (a real digest).
//! - delegations: clones of the requester's real ALLOW delegations to each
//!   receiver (their action, scopes, decision JSON, algorithm, signing
//!   key), half by the requester's agents and half by other tenants'
//!   agents, three in five to the fixture's receivers and the rest to
//!   seeded tenants (their decision JSON still names the fixture
//!   receiver's rule); 2% ACTIVE (created within the last half of their
//!   TTL, so they expire between half a TTL and a TTL after seeding, one
//!   hour for the fixture's ALLOW), the rest ended over the past year:
//!   70% EXPIRED, 15% REVOKED, 13% RELINQUISHED, each with the `ended_by`
//!   and `end_reason` the server writes. Ids, idempotency keys and
//!   request hashes are unique.
//! - audit events: COPY into `audit_events` and `audit_chain` with a
//!   valid hash chain continuing from the tenant's head (the server's own
//!   `chain_hash`; the chain's copies of the event's time, type and actor
//!   too when the schema has them), `audit_heads` moved in the links'
//!   transaction (`audit_pending` is left alone: nothing is unsealed).
//!   50,000 events at a time are generated on a thread of their own while
//!   the previous ones are copied, events and links on two connections at
//!   once. Each event clones a real event of its type from the requester's
//!   log (the latest of the type's most common outcome and action), the
//!   type chosen by [`MIX`] (mostly `delegation.decided`,
//!   `delegation.token_issued`, `key.signed`, `connection.token_exchanged`;
//!   `rule.created` 0.01%): its `subject_ids` and `details` as the server
//!   wrote them, with fresh delegation, step-up, signature and event ids in
//!   them and the acting agent replaced by one of the requester's many
//!   agents. Times follow one plan for the whole run, the largest level's
//!   events spread over the year before the run in sequence order, so
//!   every level sees the same events per hour (a one-hour window finds as
//!   many at 1e5 as at 1e7) and the largest fills the year. (The events the
//!   measurements write carry the real time, so times go back where a
//!   level's seeded events follow them in the chain; the server never
//!   takes the log's times to be ordered by sequence.)
//! - nothing else: no vault connections, signatures, step-ups or budget
//!   charges are seeded (no sealed secret is written), and other tenants'
//!   logs only hold what the measurements wrote.
//!
//! After seeding, `VACUUM (ANALYZE)` of the seeded tables: a log that old
//! has been vacuumed by autovacuum, which would otherwise do it during the
//! measurements.

use std::collections::HashMap;
use std::io::Write as _;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use futures::{StreamExt, TryStreamExt};
use sea_orm::sqlx::{self, AssertSqlSafe, postgres::PgConnection};
use sea_orm::{ConnectionTrait, Database, DatabaseConnection, DbBackend, QueryResult, Statement};
use vaultguard_client::{VaultGuardClient, pb};
use vaultguard_server::audit::{AuditCtx, GENESIS_HASH, chain_hash};
use vaultguard_server::clock::{Clock, SystemClock, to_timestamp};
use vaultguard_server::domain::actor_json;
use vaultguard_server::store::entities::audit_event;
use vaultguard_tests::Rpc;

use crate::fixture::{self, Fixture};
use crate::server::{AuditBacklog, Backend, PgDatabase, ServerProcess, ServerSpec};
use crate::{Args, Row, SEAL_LIMIT, measure, scenarios, scene};

/// The scenarios measured at each level unless `--scenarios` names others.
const HOT: &[&str] = &[
    "floor.whoami",
    "delegation.allow.eddsa",
    "delegation.allow.rs256",
    "verify",
    "sign.ed25519",
    "exchange.cached",
    "stepup.approve_to_watch",
];

/// Scenarios that need a server or a formation of their own.
const ELSEWHERE: &[&str] = &[
    "stepup.cross_replica",
    "fairness",
    "vault.slow_provider",
    "flood.slow_body",
    "freeze.cross_replica",
    "replication.sync_standby",
];

/// The ratios of the last level to the empty one are printed for these.
const RATIOS: &[&str] = &[
    "delegation.allow.eddsa",
    "delegation.allow.rs256",
    "verify",
    "sign.ed25519",
];

/// The scenario of the rules measurement.
const RULES_SCENARIO: &str = "delegation.allow.eddsa";
/// The receiver's inbound rules in the rules measurement's first half.
const FEW_RULES: usize = 10;
/// CreateRule calls in flight while the rules are added.
const RULES_IN_FLIGHT: usize = 16;

/// The seeded log's event types, per 10,000 events. A type the
/// requester's log has no event of to clone is left out (and said so).
const MIX: &[(&str, u64)] = &[
    ("delegation.decided", 3_400),
    ("delegation.token_issued", 3_000),
    ("key.signed", 1_500),
    ("connection.token_exchanged", 1_000),
    ("delegation.verified", 500),
    ("delegation.expired", 200),
    ("delegation.revoked", 150),
    ("delegation.relinquished", 50),
    ("step_up.approved", 50),
    ("step_up.redeemed", 50),
    ("step_up.approval_recorded", 40),
    ("step_up.denied", 10),
    ("agent.created", 9),
    ("rule.created", 1),
];
/// The rare type the listing filters by (0.01% of the seeded events).
const RARE_TYPE: &str = "rule.created";
/// The common one.
const COMMON_TYPE: &str = "delegation.decided";

/// Id kinds (`vaultguard_server::ids`) a cloned event gets fresh ids of:
/// what each event is about. Tenants, keys, connections, providers, issuer
/// keys and the rules that decided stay those of the original.
const FRESH_PREFIXES: &[&str] = &["dlg", "stp", "sig", "chg", "evt"];

const YEAR_MS: i64 = 365 * 86_400_000;
/// How long after an event the seeded chain link says it was sealed.
const SEAL_DELAY_MS: i64 = 25;
/// Events per chunk: one COPY of events and one of their links (bounds the
/// generator's memory: two chunks queued and one being copied, ~50 MB
/// each).
const EVENTS_PER_CHUNK: u64 = 50_000;
/// Rows per `INSERT … SELECT` of tenants, agents and delegations.
const ROWS_PER_STATEMENT: u64 = 200_000;

/// ListAuditEvents page size (the server's default).
const PAGE_SIZE: u32 = 50;
/// The longest one listing query is repeated for, per level.
const LIST_BUDGET: Duration = Duration::from_secs(30);

/// A count as `--scale` takes it: `100000`, `100_000`, `1e5` or `2.5e6`.
pub fn parse_count(text: &str) -> Result<u64, String> {
    let plain = text.trim().replace('_', "");
    let invalid = || format!("{text:?} is not a count (100000, 100_000, 1e5)");
    let value = match plain.split_once(['e', 'E']) {
        Some((mantissa, exponent)) => {
            let mantissa: f64 = mantissa.parse().map_err(|_| invalid())?;
            let exponent: i32 = exponent.parse().map_err(|_| invalid())?;
            let value = mantissa * 10f64.powi(exponent);
            if !(1.0..=1e12).contains(&value) || value.fract() != 0.0 {
                return Err(invalid());
            }
            value as u64
        }
        None => plain.parse::<u64>().map_err(|_| invalid())?,
    };
    if value == 0 {
        return Err(invalid());
    }
    Ok(value)
}

/// `1e5`, `2.5e6`… for round counts, else the count with separators.
fn label(count: u64) -> String {
    let mut exponent = 0;
    let mut mantissa = count;
    while mantissa >= 10 && mantissa.is_multiple_of(10) {
        mantissa /= 10;
        exponent += 1;
    }
    match (exponent, mantissa) {
        (3.., 1..=9) => format!("{mantissa}e{exponent}"),
        (2.., 10..=99) => format!("{}.{}e{}", mantissa / 10, mantissa % 10, exponent + 1),
        _ => thousands(count),
    }
}

/// `1234567` as `1,234,567`.
fn thousands(count: u64) -> String {
    let digits = count.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

/// The server's clock (milliseconds since the epoch), as its rows hold.
fn now_millis() -> i64 {
    SystemClock.now_millis()
}

/// `text` as an SQL string literal (the values inlined are ids and hashes
/// this tool read or made).
fn quoted(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// The scale run: see the module's documentation.
pub async fn run(args: &Args, binary: PathBuf) -> Result<()> {
    let mut levels = args.scale.clone();
    levels.sort_unstable();
    levels.dedup();
    let names = scenario_names(args)?;
    let work_dir = tempfile::tempdir()?;
    let database = PgDatabase::create(&args.pg_url).await?;
    let outcome = run_on(args, binary, work_dir.path(), &database, &levels, &names).await;
    let dropped = match &args.scale_keep {
        Some(name) if outcome.is_ok() => database.keep_as(name).await,
        _ => database.drop_now().await,
    };
    if outcome.is_err() {
        eprintln!("server logs in {} (kept)", work_dir.keep().display());
    }
    outcome?;
    dropped
}

/// `--scenarios` if given (those that run on the one server), else [`HOT`].
fn scenario_names(args: &Args) -> Result<Vec<String>> {
    if args.scenarios.is_empty() {
        return Ok(HOT.iter().map(|name| (*name).to_owned()).collect());
    }
    let names = crate::selected(args, Backend::Postgres)?;
    if let Some(name) = names.iter().find(|name| ELSEWHERE.contains(&name.as_str())) {
        bail!("--scale measures the scenarios of one server; {name} needs its own");
    }
    Ok(names)
}

/// What the measurements of every level share.
struct Session<'a> {
    args: &'a Args,
    names: &'a [String],
    /// This tool's own connection: counts, sizes, seeding.
    db: DatabaseConnection,
    backlog: AuditBacklog,
    requester: String,
    /// The receipt of the last level's full verification: the next level
    /// verifies from it (what was seeded and written since).
    receipt: std::sync::Mutex<Option<String>>,
}

async fn run_on(
    args: &Args,
    binary: PathBuf,
    work_dir: &Path,
    database: &PgDatabase,
    levels: &[u64],
    names: &[String],
) -> Result<()> {
    let url = database.url(&args.pg_options);
    let mut spec = ServerSpec::new(binary, work_dir, url.clone())?;
    spec.log_filter = args.server_log.clone();
    spec.extra_config = args.server_config.clone();
    let mut server = ServerProcess::start(&spec, "primary").await?;
    let idle_rss = settle(&server).await?;
    let mut fixture = Fixture::set_up(&server).await?;
    if names.iter().any(|name| name == "exchange.cached") {
        fixture.connect_account().await?;
    }
    let session = Session {
        args,
        names,
        db: Database::connect(&url).await?,
        backlog: AuditBacklog::connect(&url).await?,
        requester: fixture.requester.id.clone(),
        receipt: std::sync::Mutex::new(None),
    };
    let rules = if args.scale_rules > 0 && !args.scale_seed_only {
        Some(measure_rules(&session, &fixture, &server).await?)
    } else {
        None
    };
    // The empty level is always measured: its events are the templates of
    // the seeded ones.
    let mut results = vec![
        session
            .level("empty", &server, idle_rss, &fixture, None, true)
            .await?,
    ];
    let capacity = levels.last().copied().unwrap_or(0);
    let mut seeder = Seeder::new(&session.db, &fixture, capacity).await?;
    for &target in levels {
        let label = label(target);
        session.backlog.drain(SEAL_LIMIT).await?;
        server.stop().await?;
        eprintln!("[scale {label}] seeding");
        let seeded = seeder.seed(target).await?;
        server = ServerProcess::start(&spec, "primary").await?;
        let idle_rss = settle(&server).await?;
        fixture.reconnect(&server).await?;
        let mut level = session
            .level(
                &label,
                &server,
                idle_rss,
                &fixture,
                seeder.window(),
                !args.scale_seed_only,
            )
            .await?;
        level.seeded = Some(seeded);
        results.push(level);
    }
    session.backlog.drain(SEAL_LIMIT).await?;
    server.stop().await?;
    print_report(args, names, &results, rules.as_ref());
    session.backlog.close().await;
    session.db.close().await.ok();
    Ok(())
}

/// The server's RSS (MiB) once a second has let start-up's background
/// work (sealer, sweeper) settle.
async fn settle(server: &ServerProcess) -> Result<f64> {
    tokio::time::sleep(Duration::from_secs(1)).await;
    server.rss_mib()
}

/// What one level measured.
struct Level {
    label: String,
    startup: Duration,
    idle_rss: f64,
    rss_after: f64,
    rows: Vec<Row>,
    audit: Option<AuditFigures>,
    seeded: Option<Seeded>,
    sizes: Sizes,
}

/// How big the database is.
struct Sizes {
    /// Events in the requester's log (sealed and not).
    log: i64,
    delegations: i64,
    agents: i64,
    tenants: i64,
    bytes: i64,
}

async fn sizes(db: &DatabaseConnection, requester: &str) -> Result<Sizes> {
    let tenant = quoted(requester);
    let row = one(
        db,
        &format!(
            "SELECT (SELECT COALESCE(max(seq), 0) FROM audit_heads WHERE tenant_id = {tenant}) \
               + (SELECT count(*) FROM audit_pending WHERE tenant_id = {tenant}) AS log, \
             (SELECT count(*) FROM delegations) AS delegations, \
             (SELECT count(*) FROM agents) AS agents, \
             (SELECT count(*) FROM tenants) AS tenants, \
             pg_database_size(current_database()) AS bytes"
        ),
    )
    .await?;
    Ok(Sizes {
        log: row.try_get("", "log")?,
        delegations: row.try_get("", "delegations")?,
        agents: row.try_get("", "agents")?,
        tenants: row.try_get("", "tenants")?,
        bytes: row.try_get("", "bytes")?,
    })
}

async fn one(db: &DatabaseConnection, sql: &str) -> Result<QueryResult> {
    db.query_one_raw(Statement::from_string(DbBackend::Postgres, sql))
        .await?
        .with_context(|| format!("no row from {sql}"))
}

async fn all(db: &DatabaseConnection, sql: &str) -> Result<Vec<QueryResult>> {
    Ok(db
        .query_all_raw(Statement::from_string(DbBackend::Postgres, sql))
        .await?)
}

impl Session<'_> {
    /// The measurements of one level on `server` (started on it, its RSS
    /// `idle_rss` a second after): the scenarios when `hot`, and the audit
    /// reads unless `--scale-seed-only`. `window` is the seeded events'
    /// time range, if any.
    async fn level(
        &self,
        label: &str,
        server: &ServerProcess,
        idle_rss: f64,
        fixture: &Fixture,
        window: Option<(i64, i64)>,
        hot: bool,
    ) -> Result<Level> {
        eprintln!(
            "[scale {label}] server pid {} SERVING after {:.0} ms, idle RSS {idle_rss:.1} MiB",
            server.pid,
            server.startup.as_secs_f64() * 1000.0
        );
        let mut rows = Vec::new();
        if hot {
            for name in self.names {
                eprintln!("[scale {label}] {name}");
                let scene = scene(self.args, fixture, server, None);
                let op = scenarios::prepare(name, &scene).await?;
                let row = measure(
                    self.args,
                    name,
                    &op,
                    &[server],
                    self.args.warmup,
                    Some(&self.backlog),
                )
                .await?;
                rows.push(row);
            }
        }
        let audit = if self.args.scale_seed_only {
            None
        } else {
            self.backlog.drain(SEAL_LIMIT).await?;
            Some(self.audit_paths(label, server, fixture, window).await?)
        };
        Ok(Level {
            label: label.to_owned(),
            startup: server.startup,
            idle_rss,
            rss_after: server.rss_mib()?,
            rows,
            audit,
            seeded: None,
            sizes: sizes(&self.db, &self.requester).await?,
        })
    }

    /// The audit reads of the requester's admin ([`audit_paths`]), with
    /// the filters' values for this level.
    async fn audit_paths(
        &self,
        label: &str,
        server: &ServerProcess,
        fixture: &Fixture,
        window: Option<(i64, i64)>,
    ) -> Result<AuditFigures> {
        let tenant = quoted(&self.requester);
        let (start, end) = match window {
            Some(window) => window,
            None => {
                let row = one(
                    &self.db,
                    &format!(
                        "SELECT COALESCE(min(occurred_at), 0) AS first, \
                         COALESCE(max(occurred_at), 0) AS last \
                         FROM audit_events WHERE tenant_id = {tenant}"
                    ),
                )
                .await?;
                (row.try_get("", "first")?, row.try_get("", "last")?)
            }
        };
        let middle = start + (end - start) / 2;
        let hour = (middle - 1_800_000, middle + 1_800_000);
        // One of the requester's seeded agents once events are seeded (they
        // act in them), else the fixture's agent (which acts in the rest).
        let seeded_actor = match window {
            Some(_) => all(
                &self.db,
                &format!(
                    "SELECT id FROM agents WHERE tenant_id = {tenant} \
                     AND name LIKE 'seed-agent-%' ORDER BY id LIMIT 1"
                ),
            )
            .await?
            .first()
            .map(|row| row.try_get::<String>("", "id"))
            .transpose()?,
            None => None,
        };
        let actor = seeded_actor.unwrap_or_else(|| fixture.agent_id.clone());
        eprintln!("[scale {label}] audit reads");
        let previous = self
            .receipt
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        let figures = audit_paths(
            &fixture.requester.admin,
            server,
            &AuditQueries {
                hour,
                actor,
                rounds: self.args.scale_list_rounds,
            },
            previous,
        )
        .await?;
        *self
            .receipt
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(figures.receipt.clone());
        Ok(figures)
    }
}

// ---------------------------------------------------------------------------
// The rules measurement.

/// ALLOW EdDSA with few and with many inbound rules in the receiver.
struct RulesFigures {
    few: Row,
    many: Row,
    many_rules: usize,
    added: usize,
    adding: Duration,
}

async fn inbound_rules(db: &DatabaseConnection, tenant_id: &str) -> Result<usize> {
    let row = one(
        db,
        &format!(
            "SELECT count(*) AS n FROM policy_rules WHERE tenant_id = {} AND direction = 'inbound'",
            quoted(tenant_id)
        ),
    )
    .await?;
    Ok(usize::try_from(row.try_get::<i64>("", "n")?)?)
}

/// ALLOW EdDSA with [`FEW_RULES`] inbound rules in the EdDSA receiver, then
/// with `--scale-rules`; the added rules never match the requested action
/// (`svc<i>.op<j>` exact actions and `svc<i>.*` prefixes, ALLOW, BLOCK and
/// STEP_UP in turn, any counterpart), so both measure the same decision.
async fn measure_rules(
    session: &Session<'_>,
    fixture: &Fixture,
    server: &ServerProcess,
) -> Result<RulesFigures> {
    let args = session.args;
    let receiver = fixture.receiver("eddsa")?;
    let many_rules = args.scale_rules.max(FEW_RULES);
    let existing = inbound_rules(&session.db, &receiver.id).await?;
    add_rules(receiver, existing..FEW_RULES).await?;
    let scene = scene(args, fixture, server, None);
    let op = scenarios::prepare(RULES_SCENARIO, &scene).await?;
    eprintln!("[scale rules] {RULES_SCENARIO} with {FEW_RULES} inbound rules");
    let few = measure(
        args,
        RULES_SCENARIO,
        &op,
        &[server],
        args.warmup,
        Some(&session.backlog),
    )
    .await?;
    let from = existing.max(FEW_RULES);
    eprintln!(
        "[scale rules] adding {} inbound rules through CreateRule",
        many_rules.saturating_sub(from)
    );
    let started = Instant::now();
    add_rules(receiver, from..many_rules).await?;
    let adding = started.elapsed();
    let now = inbound_rules(&session.db, &receiver.id).await?;
    eprintln!("[scale rules] {RULES_SCENARIO} with {now} inbound rules");
    let many = measure(
        args,
        RULES_SCENARIO,
        &op,
        &[server],
        args.warmup,
        Some(&session.backlog),
    )
    .await?;
    Ok(RulesFigures {
        few,
        many,
        many_rules: now,
        added: many_rules.saturating_sub(from),
        adding,
    })
}

/// Inbound rules number `range` of `receiver`, [`RULES_IN_FLIGHT`] at once.
async fn add_rules(receiver: &fixture::Tenant, range: Range<usize>) -> Result<()> {
    futures::stream::iter(range)
        .map(|i| async move {
            let pattern = if i % 4 == 0 {
                format!("svc{i}.*")
            } else {
                format!("svc{}.op{}", i / 4, i % 4)
            };
            let effect = match i % 3 {
                0 => pb::Effect::Allow,
                1 => pb::Effect::Block,
                _ => pb::Effect::StepUp,
            };
            fixture::create_rule(receiver, &pattern, effect, "").await
        })
        .buffer_unordered(RULES_IN_FLIGHT)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(())
}

// ---------------------------------------------------------------------------
// The audit reads.

/// The filters' values of one level.
pub struct AuditQueries {
    /// A one-hour `[start, end)` window (ms) in the middle of the log.
    pub hour: (i64, i64),
    /// An agent whose events the actor filter lists.
    pub actor: String,
    /// How many times each listing runs.
    pub rounds: usize,
}

/// What the audit reads of one level took.
pub struct AuditFigures {
    /// The time window of `list.hour`, ms.
    pub hour: (i64, i64),
    pub lists: Vec<ListFigures>,
    pub exports: Vec<ExportFigures>,
    pub verify: VerifyFigures,
    /// From the previous level's receipt (what was written since).
    pub since_previous: Option<VerifyFigures>,
    /// From this level's own receipt, after the exports' two events.
    pub since_own: VerifyFigures,
    pub receipt: String,
}

pub struct ListFigures {
    pub name: &'static str,
    pub runs: usize,
    /// Events on the (last) page.
    pub events: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

pub struct ExportFigures {
    pub format: &'static str,
    pub events: u64,
    pub bytes: u64,
    pub elapsed: Duration,
    /// The server's RSS before, at most during, and after, MiB.
    pub rss: (f64, f64, f64),
}

pub struct VerifyFigures {
    pub checked: u64,
    pub elapsed: Duration,
    pub receipt: String,
}

/// Every audit read, in turn, as `admin` (an admin of the tenant whose log
/// is read): the listings (each `queries.rounds` times, sequentially),
/// the whole log exported as CSV and as NDJSON, and the whole chain
/// verified.
pub async fn audit_paths(
    admin: &VaultGuardClient,
    server: &ServerProcess,
    queries: &AuditQueries,
    previous_receipt: Option<String>,
) -> Result<AuditFigures> {
    let page = Some(pb::PageRequest {
        page_size: PAGE_SIZE,
        page_token: String::new(),
    });
    let listings = [
        ("list.newest", pb::ListAuditEventsRequest::default()),
        (
            "list.hour",
            pb::ListAuditEventsRequest {
                start_time: Some(to_timestamp(queries.hour.0)),
                end_time: Some(to_timestamp(queries.hour.1)),
                ..Default::default()
            },
        ),
        (
            "list.rare_type",
            pb::ListAuditEventsRequest {
                event_types: vec![RARE_TYPE.to_owned()],
                ..Default::default()
            },
        ),
        (
            "list.common_type",
            pb::ListAuditEventsRequest {
                event_types: vec![COMMON_TYPE.to_owned()],
                ..Default::default()
            },
        ),
        (
            "list.actor",
            pb::ListAuditEventsRequest {
                actor_subject: queries.actor.clone(),
                ..Default::default()
            },
        ),
    ];
    let mut lists = Vec::new();
    for (name, request) in listings {
        let request = pb::ListAuditEventsRequest {
            page: page.clone(),
            ..request
        };
        lists.push(list_latency(admin, name, request, queries.rounds).await?);
    }
    let since_previous = match previous_receipt {
        Some(receipt) => Some(
            verify_chain(
                admin,
                pb::VerifyAuditChainRequest {
                    since_receipt: receipt,
                    ..Default::default()
                },
            )
            .await?,
        ),
        None => None,
    };
    let verify = verify_chain(
        admin,
        pb::VerifyAuditChainRequest {
            include_receipt: true,
            ..Default::default()
        },
    )
    .await?;
    let mut exports = Vec::new();
    for format in [pb::ExportFormat::Csv, pb::ExportFormat::Ndjson] {
        exports.push(export(admin, server, format).await?);
    }
    let since_own = verify_chain(
        admin,
        pb::VerifyAuditChainRequest {
            since_receipt: verify.receipt.clone(),
            ..Default::default()
        },
    )
    .await?;
    Ok(AuditFigures {
        hour: queries.hour,
        lists,
        exports,
        receipt: verify.receipt.clone(),
        verify,
        since_previous,
        since_own,
    })
}

/// `request` `rounds` times in a row (at most [`LIST_BUDGET`]).
pub async fn list_latency(
    admin: &VaultGuardClient,
    name: &'static str,
    request: pb::ListAuditEventsRequest,
    rounds: usize,
) -> Result<ListFigures> {
    let started = Instant::now();
    let mut millis = Vec::with_capacity(rounds);
    let mut events = 0;
    while millis.len() < rounds.max(1) && started.elapsed() < LIST_BUDGET {
        let sent = Instant::now();
        let page = admin
            .list_audit_events(request.clone())
            .await
            .with_context(|| name)?;
        millis.push(sent.elapsed().as_secs_f64() * 1000.0);
        events = page.events.len();
    }
    millis.sort_by(f64::total_cmp);
    let at = |quantile: f64| {
        let index = ((millis.len() - 1) as f64 * quantile).round() as usize;
        millis.get(index).copied().unwrap_or(0.0)
    };
    Ok(ListFigures {
        name,
        runs: millis.len(),
        events,
        p50_ms: at(0.50),
        p99_ms: at(0.99),
    })
}

/// The whole log exported in `format`, read to the end (and dropped).
pub async fn export(
    admin: &VaultGuardClient,
    server: &ServerProcess,
    format: pb::ExportFormat,
) -> Result<ExportFigures> {
    use pb::export_audit_events_response::Part;
    let before = server.rss_mib()?;
    let mut peak = before;
    let started = Instant::now();
    let mut stream = admin
        .export_audit_events(pb::ExportAuditEventsRequest {
            format: format as i32,
            ..Default::default()
        })
        .await?;
    let (mut bytes, mut messages, mut summary) = (0u64, 0u64, None);
    while let Some(message) = stream.message().await? {
        match message.part {
            Some(Part::Data(chunk)) => bytes += u64::try_from(chunk.len())?,
            Some(Part::Summary(done)) => summary = Some(done),
            None => {}
        }
        messages += 1;
        if messages % 64 == 0 {
            peak = peak.max(server.rss_mib()?);
        }
    }
    let elapsed = started.elapsed();
    let summary = summary.context("the export ended without its summary")?;
    ensure!(
        summary.byte_count == bytes,
        "the export's summary says {} bytes, {bytes} came",
        summary.byte_count
    );
    let after = server.rss_mib()?;
    Ok(ExportFigures {
        format: if format == pb::ExportFormat::Csv {
            "csv"
        } else {
            "ndjson"
        },
        events: summary.event_count,
        bytes,
        elapsed,
        rss: (before, peak.max(after), after),
    })
}

/// VerifyAuditChain with `request` (the default checks the whole chain);
/// a broken chain is an error (the seeding made it).
pub async fn verify_chain(
    admin: &VaultGuardClient,
    request: pb::VerifyAuditChainRequest,
) -> Result<VerifyFigures> {
    let started = Instant::now();
    let answer = admin.verify_audit_chain(request).await?;
    let elapsed = started.elapsed();
    ensure!(
        answer.ok,
        "VerifyAuditChain: the chain is broken at {}: {}",
        answer.first_broken_sequence,
        answer.failure
    );
    Ok(VerifyFigures {
        checked: answer.checked_count,
        elapsed,
        receipt: answer.receipt,
    })
}

// ---------------------------------------------------------------------------
// Seeding.

/// What seeding one level wrote and took.
struct Seeded {
    tables: Vec<TableSeed>,
    vacuum: Duration,
    total: Duration,
}

struct TableSeed {
    table: &'static str,
    rows: u64,
    elapsed: Duration,
    /// Of `elapsed`, the time spent making the rows outside the database
    /// (audit events: rendering and hashing, on its own thread).
    generating: Option<Duration>,
}

impl TableSeed {
    fn rate(&self) -> f64 {
        self.rows as f64 / self.elapsed.as_secs_f64().max(f64::EPSILON)
    }
}

/// Fills the database level by level (module documentation).
struct Seeder {
    db: DatabaseConnection,
    requester: String,
    fixture_agent: String,
    /// Makes this run's seeded ids its own: the SQL ids are md5s of it,
    /// the table and the row number, the events' come from a SplitMix64
    /// seeded with it and the event number.
    salt: u64,
    templates: Arc<Vec<Template>>,
    /// Real ALLOW delegations of the requester, one per receiver.
    delegation_templates: Vec<String>,
    /// The time of seeded event `k` is `plan_start + k * plan_step`.
    plan_start: i64,
    plan_step: f64,
    /// Rows seeded so far, by table (the next row's number).
    events: u64,
    tenants: u64,
    agents: u64,
    delegations: u64,
}

impl Seeder {
    /// Reads the templates from what the empty level's measurements wrote;
    /// the event time plan spreads `capacity` events over the past year.
    async fn new(db: &DatabaseConnection, fixture: &Fixture, capacity: u64) -> Result<Self> {
        let requester = fixture.requester.id.clone();
        let templates = load_templates(db, &requester).await?;
        let delegation_templates: Vec<String> = all(
            db,
            &format!(
                "SELECT DISTINCT ON (receiving_tenant_id) id FROM delegations \
                 WHERE requesting_tenant_id = {r} AND requesting_agent_id = {a} \
                 AND receiving_tenant_id <> {r} AND status = 'active' AND step_up_id IS NULL \
                 AND token_algorithm <> '' AND decision::jsonb ->> 'outcome' = 'allow' \
                 ORDER BY receiving_tenant_id, created_at DESC",
                r = quoted(&requester),
                a = quoted(&fixture.agent_id),
            ),
        )
        .await?
        .iter()
        .map(|row| row.try_get::<String>("", "id"))
        .collect::<std::result::Result<_, _>>()?;
        ensure!(
            !delegation_templates.is_empty(),
            "no ALLOW delegation of the requester to clone: run an allow scenario or verify"
        );
        let now = now_millis();
        Ok(Self {
            db: db.clone(),
            requester,
            fixture_agent: fixture.agent_id.clone(),
            salt: uuid::Uuid::new_v4().as_u64_pair().0,
            templates: Arc::new(templates),
            delegation_templates,
            plan_start: now - YEAR_MS,
            plan_step: YEAR_MS as f64 / capacity.max(1) as f64,
            events: 0,
            tenants: 0,
            agents: 0,
            delegations: 0,
        })
    }

    /// The time range of the events seeded so far.
    fn window(&self) -> Option<(i64, i64)> {
        (self.events > 0).then(|| (self.plan_start, self.event_time(self.events)))
    }

    fn event_time(&self, k: u64) -> i64 {
        self.plan_start + (k as f64 * self.plan_step) as i64
    }

    /// Seeds up to `target` (whole-table totals, see the module's
    /// documentation), then vacuums and analyzes.
    async fn seed(&mut self, target: u64) -> Result<Seeded> {
        let started = Instant::now();
        let have = sizes(&self.db, &self.requester).await?;
        let missing = |want: u64, have: i64| want.saturating_sub(u64::try_from(have).unwrap_or(0));
        let mut tables = vec![
            self.seed_tenants(missing(target / 1000, have.tenants))
                .await?,
            self.seed_agents(missing(target / 100, have.agents)).await?,
            self.seed_delegations(missing(target / 10, have.delegations))
                .await?,
            self.seed_events(missing(target, have.log)).await?,
        ];
        tables.retain(|table| table.rows > 0);
        for table in &tables {
            eprintln!(
                "  {:<12} {:>10} rows in {:>6.1} s: {:>9.0} rows/s{}",
                table.table,
                thousands(table.rows),
                table.elapsed.as_secs_f64(),
                table.rate(),
                match table.generating {
                    Some(busy) => format!(
                        " (generating and hashing {:.1} s of it, on its own thread)",
                        busy.as_secs_f64()
                    ),
                    None => String::new(),
                }
            );
        }
        let vacuuming = Instant::now();
        self.db
            .execute_unprepared(
                "VACUUM (ANALYZE) tenants, agents, delegations, audit_events, audit_chain, audit_heads",
            )
            .await?;
        let vacuum = vacuuming.elapsed();
        eprintln!("  VACUUM (ANALYZE) in {:.1} s", vacuum.as_secs_f64());
        Ok(Seeded {
            tables,
            vacuum,
            total: started.elapsed(),
        })
    }

    /// `count` rows by `INSERT … SELECT` statements of at most
    /// [`ROWS_PER_STATEMENT`], numbered from `first`; `sql` makes the
    /// statement for an inclusive range of row numbers.
    async fn insert_rows(
        &self,
        table: &'static str,
        first: u64,
        count: u64,
        sql: impl Fn(u64, u64) -> String,
    ) -> Result<TableSeed> {
        let started = Instant::now();
        let mut from = first;
        while from < first + count {
            let to = (from + ROWS_PER_STATEMENT).min(first + count);
            self.db.execute_unprepared(&sql(from, to - 1)).await?;
            from = to;
        }
        Ok(TableSeed {
            table,
            rows: count,
            elapsed: started.elapsed(),
            generating: None,
        })
    }

    /// The per-row columns `i` (row number), `ms` (a creation time in the
    /// year before `now`) and `h` (a unique md5) of rows `from..=to` of
    /// `kind`.
    fn numbered(&self, kind: &str, from: u64, to: u64, now: i64) -> String {
        format!(
            "SELECT i, {now} - (random() * {YEAR_MS})::bigint AS ms, \
             md5('{salt}:{kind}:' || i) AS h FROM generate_series({from}, {to}) AS i",
            salt = self.salt,
        )
    }

    async fn seed_tenants(&mut self, count: u64) -> Result<TableSeed> {
        let first = self.tenants;
        let now = now_millis();
        let seeded = self
            .insert_rows("tenants", first, count, |from, to| {
                format!(
                    "INSERT INTO tenants (id, slug, display_name, status, token_algorithm, \
                     outbound_default, policy_version, created_at, updated_at, policy_updated_at, \
                     policy_updated_by, traffic_frozen_at, traffic_freeze_reason, traffic_frozen_by) \
                     SELECT {id}, 'seed-tenant-' || i, 'Seed tenant ' || i, \
                     CASE WHEN i % 100 = 99 THEN 'suspended' ELSE 'active' END, \
                     (ARRAY['RS256', 'ES256', 'EdDSA'])[1 + i % 3], 'allow', 0, ms, ms, \
                     NULL, NULL, NULL, '', NULL FROM ({rows}) AS s",
                    id = sql_id("tnt"),
                    rows = self.numbered("tnt", from, to, now),
                )
            })
            .await?;
        self.tenants += count;
        Ok(seeded)
    }

    async fn seed_agents(&mut self, count: u64) -> Result<TableSeed> {
        let first = self.agents;
        let now = now_millis();
        let requester = quoted(&self.requester);
        let fixture_agent = quoted(&self.fixture_agent);
        let seeded = self
            .insert_rows("agents", first, count, |from, to| {
                format!(
                    "WITH st AS (SELECT (row_number() OVER (ORDER BY id)) - 1 AS n, id FROM tenants \
                       WHERE slug LIKE 'seed-tenant-%') \
                     INSERT INTO agents (id, tenant_id, name, description, status, secret_digest, \
                     secret_rotated_at, created_at, updated_at, frozen_at, freeze_reason, frozen_by) \
                     SELECT {id}, CASE WHEN s.i % 10 = 0 OR st.id IS NULL THEN {requester} ELSE st.id END, \
                     'seed-agent-' || s.i, '', CASE WHEN s.i % 50 = 49 THEN 'disabled' ELSE 'active' END, \
                     d.secret_digest, ms, ms, ms, NULL, '', NULL \
                     FROM ({rows}) AS s \
                     CROSS JOIN (SELECT secret_digest FROM agents WHERE id = {fixture_agent}) AS d \
                     LEFT JOIN st ON st.n = s.i % GREATEST((SELECT count(*) FROM st), 1)",
                    id = sql_id("agt"),
                    rows = self.numbered("agt", from, to, now),
                )
            })
            .await?;
        self.agents += count;
        Ok(seeded)
    }

    async fn seed_delegations(&mut self, count: u64) -> Result<TableSeed> {
        let first = self.delegations;
        let requester = quoted(&self.requester);
        let templates = self
            .delegation_templates
            .iter()
            .map(|id| quoted(id))
            .collect::<Vec<_>>()
            .join(", ");
        let now = now_millis();
        let system = actor_json(&AuditCtx::system("").actor)?;
        let human = pb::PrincipalKind::Human as i32;
        let agent = pb::PrincipalKind::Agent as i32;
        let salt = self.salt;
        let seeded = self
            .insert_rows("delegations", first, count, |from, to| {
                format!(
                    "WITH t AS (SELECT (row_number() OVER (ORDER BY id)) - 1 AS n, \
                       receiving_tenant_id AS t_receiving, action, scopes, resource, binding_message, \
                       context, authorization_details, decision, ttl_seconds, token_algorithm, \
                       signing_kid FROM delegations WHERE id IN ({templates})), \
                     ra AS (SELECT (row_number() OVER (ORDER BY id)) - 1 AS n, id, tenant_id \
                       FROM agents WHERE tenant_id = {requester}), \
                     sa AS (SELECT (row_number() OVER (ORDER BY id)) - 1 AS n, id, tenant_id \
                       FROM agents WHERE name LIKE 'seed-agent-%' AND tenant_id <> {requester}), \
                     st AS (SELECT (row_number() OVER (ORDER BY id)) - 1 AS n, id FROM tenants \
                       WHERE slug LIKE 'seed-tenant-%'), \
                     s AS (SELECT i, md5('{salt}:dlg:' || i) AS h, random() AS u, random() AS v, \
                         CASE WHEN r < 20 THEN 'active' WHEN r < 720 THEN 'expired' \
                           WHEN r < 870 THEN 'revoked' ELSE 'relinquished' END AS status \
                       FROM (SELECT i, floor(random() * 1000)::int AS r \
                         FROM generate_series({from}, {to}) AS i) AS g), \
                     picked AS (SELECT s.*, t.*, \
                         CASE WHEN s.status = 'active' \
                           THEN {now} - (s.u * t.ttl_seconds * 500)::bigint \
                           ELSE {now} - 3600000 - (s.u * {YEAR_MS})::bigint END AS ms, \
                         CASE WHEN s.i % 2 = 0 OR sa.id IS NULL THEN ra.id ELSE sa.id END AS agent_id, \
                         CASE WHEN s.i % 2 = 0 OR sa.id IS NULL THEN ra.tenant_id ELSE sa.tenant_id END \
                           AS agent_tenant, \
                         CASE WHEN s.i % 5 < 3 OR st.id IS NULL THEN t.t_receiving ELSE st.id END \
                           AS receiving \
                       FROM s JOIN t ON t.n = s.i % (SELECT count(*) FROM t) \
                       LEFT JOIN ra ON ra.n = (s.i / 2) % GREATEST((SELECT count(*) FROM ra), 1) \
                       LEFT JOIN sa ON sa.n = (s.i / 2) % GREATEST((SELECT count(*) FROM sa), 1) \
                       LEFT JOIN st ON st.n = (s.i / 5) % GREATEST((SELECT count(*) FROM st), 1)) \
                     INSERT INTO delegations (id, requesting_tenant_id, requesting_agent_id, \
                       receiving_tenant_id, action, scopes, resource, binding_message, context, \
                       authorization_details, status, decision, idempotency_key, request_hash, \
                       ttl_seconds, token_algorithm, signing_kid, created_at, activated_at, expires_at, \
                       ended_at, ended_by, end_reason, step_up_id) \
                     SELECT {id}, agent_tenant, agent_id, receiving, action, scopes, resource, \
                       binding_message, context, authorization_details, status, decision, \
                       substr(md5(h || 'k'), 1, 12) || '4' || substr(md5(h || 'k'), 14, 3) || 'a' \
                         || substr(md5(h || 'k'), 18, 15), \
                       md5(h || 'r') || md5(h || 's'), ttl_seconds, token_algorithm, signing_kid, \
                       ms, ms, ms + ttl_seconds * 1000, \
                       CASE status WHEN 'active' THEN NULL \
                         WHEN 'expired' THEN ms + ttl_seconds * 1000 + (v * 60000)::bigint \
                         ELSE ms + (v * ttl_seconds * 1000)::bigint END, \
                       CASE status WHEN 'active' THEN NULL WHEN 'expired' THEN {system} \
                         WHEN 'revoked' THEN '{{\"kind\":{human},\"subject\":\"admin\",\"tenant_id\":\"' \
                           || receiving || '\"}}' \
                         ELSE '{{\"kind\":{agent},\"subject\":\"' || agent_id || '\",\"tenant_id\":\"' \
                           || agent_tenant || '\"}}' END, \
                       CASE status WHEN 'active' THEN NULL WHEN 'expired' THEN 'expired' \
                         WHEN 'revoked' THEN 'no longer needed' ELSE 'task finished' END, \
                       NULL \
                     FROM picked",
                    id = sql_id("dlg"),
                    system = quoted(&system),
                )
            })
            .await?;
        self.delegations += count;
        Ok(seeded)
    }

    /// `count` events appended to the requester's chain: generated and
    /// hashed on a thread of their own, COPYed a chunk per transaction
    /// with the head's move.
    async fn seed_events(&mut self, count: u64) -> Result<TableSeed> {
        let started = Instant::now();
        if count == 0 {
            return Ok(TableSeed {
                table: "audit_events",
                rows: 0,
                elapsed: started.elapsed(),
                generating: None,
            });
        }
        let tenant = quoted(&self.requester);
        let (seq, prev) = match all(
            &self.db,
            &format!("SELECT seq, hash FROM audit_heads WHERE tenant_id = {tenant}"),
        )
        .await?
        .first()
        {
            Some(head) => (
                head.try_get::<i64>("", "seq")?,
                head.try_get::<String>("", "hash")?,
            ),
            None => (0, GENESIS_HASH.to_owned()),
        };
        let last_row: i64 = one(
            &self.db,
            "SELECT COALESCE(max(id), 0) AS id FROM audit_events",
        )
        .await?
        .try_get("", "id")?;
        let actors: Vec<String> = all(
            &self.db,
            &format!("SELECT id FROM agents WHERE tenant_id = {tenant} ORDER BY id"),
        )
        .await?
        .iter()
        .map(|row| row.try_get::<String>("", "id"))
        .collect::<std::result::Result<_, _>>()?;
        ensure!(!actors.is_empty(), "the requester has no agent");

        let links = link_columns(&self.db).await?;
        let chain_copy = format!(
            "COPY audit_chain ({}) FROM STDIN",
            links
                .iter()
                .map(|column| column.name())
                .collect::<Vec<_>>()
                .join(", ")
        );
        let generator = Generator {
            templates: self.templates.clone(),
            links,
            actors,
            requester: self.requester.clone(),
            salt: self.salt,
            plan_start: self.plan_start,
            plan_step: self.plan_step,
        };
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Chunk>(2);
        let first = self.events;
        let worker = std::thread::spawn(move || {
            generator.run(first..first + count, last_row, seq, prev, &tx)
        });
        let pool = self.db.get_postgres_connection_pool();
        let (mut events_conn, mut links_conn) = (pool.acquire().await?, pool.acquire().await?);
        for conn in [&mut events_conn, &mut links_conn] {
            sqlx::raw_sql("SET synchronous_commit = off")
                .execute(&mut **conn)
                .await?;
        }
        let mut written = 0;
        while let Some(chunk) = rx.recv().await {
            write_chunk(
                &mut events_conn,
                &mut links_conn,
                &self.requester,
                &chain_copy,
                &chunk,
            )
            .await?;
            written += chunk.count;
        }
        let generating = worker
            .join()
            .map_err(|_| anyhow!("the event generator panicked"))??;
        ensure!(written == count, "{written} of {count} events written");
        sqlx::raw_sql(
            "SELECT setval(pg_get_serial_sequence('audit_events', 'id'), \
             (SELECT max(id) FROM audit_events))",
        )
        .execute(&mut *events_conn)
        .await?;
        self.events += count;
        Ok(TableSeed {
            table: "audit_events",
            rows: count,
            elapsed: started.elapsed(),
            generating: Some(generating),
        })
    }
}

/// SQL of an id of kind `prefix` shaped as the server's (`<prefix>_` and a
/// UUIDv7 in lowercase hex), of the row's columns `ms` (its time) and `h`
/// (a unique md5).
fn sql_id(prefix: &str) -> String {
    format!(
        "'{prefix}_' || lpad(to_hex(ms), 12, '0') || '7' || substr(h, 1, 3) || '8' \
         || substr(h, 4, 15)"
    )
}

/// A column of `audit_chain` a seeded link fills: the link itself and, on a
/// schema that has them, the copies of the event's time, type and actor
/// that filtered listings read from the chain's indexes (the sealer writes
/// them with the link; VerifyAuditChain compares them with the event).
#[derive(Debug, Clone, Copy)]
enum LinkColumn {
    TenantId,
    Seq,
    EventRowId,
    PrevHash,
    Hash,
    SealedAt,
    OccurredAt,
    EventType,
    ActorSubject,
}

impl LinkColumn {
    const ALL: [Self; 9] = [
        Self::TenantId,
        Self::Seq,
        Self::EventRowId,
        Self::PrevHash,
        Self::Hash,
        Self::SealedAt,
        Self::OccurredAt,
        Self::EventType,
        Self::ActorSubject,
    ];

    fn name(self) -> &'static str {
        match self {
            Self::TenantId => "tenant_id",
            Self::Seq => "seq",
            Self::EventRowId => "event_row_id",
            Self::PrevHash => "prev_hash",
            Self::Hash => "hash",
            Self::SealedAt => "sealed_at",
            Self::OccurredAt => "occurred_at",
            Self::EventType => "event_type",
            Self::ActorSubject => "actor_subject",
        }
    }
}

/// The columns of `audit_chain` in this database, as [`LinkColumn`]s; a
/// column the seeder does not know is an error unless the database can
/// fill it (nullable or with a default).
async fn link_columns(db: &DatabaseConnection) -> Result<Vec<LinkColumn>> {
    let mut columns = Vec::new();
    for row in all(
        db,
        "SELECT column_name::text AS name, is_nullable = 'YES' OR column_default IS NOT NULL \
         AS optional FROM information_schema.columns \
         WHERE table_schema = current_schema() AND table_name = 'audit_chain' \
         ORDER BY ordinal_position",
    )
    .await?
    {
        let name: String = row.try_get("", "name")?;
        match LinkColumn::ALL
            .into_iter()
            .find(|column| column.name() == name)
        {
            Some(column) => columns.push(column),
            None => ensure!(
                row.try_get::<bool>("", "optional")?,
                "audit_chain has a column {name} the seeder cannot fill (tests/bench/scale.rs)"
            ),
        }
    }
    ensure!(!columns.is_empty(), "no audit_chain table");
    Ok(columns)
}

/// The COPY of seeded events.
const EVENTS_COPY: &str = "COPY audit_events (id, event_id, tenant_id, occurred_at, actor_kind, \
     actor_subject, actor_tenant_id, event_type, subject_ids, outcome, request_id, details) \
     FROM STDIN";

/// One chunk: its events COPYed on `events` while its chain links are,
/// with the head's move in the same transaction, on `links` (COPY is bound
/// by one backend's CPU: two use both cores). The server is stopped, so
/// nothing reads a link before its event commits.
async fn write_chunk(
    events: &mut PgConnection,
    links: &mut PgConnection,
    tenant_id: &str,
    chain_copy: &str,
    chunk: &Chunk,
) -> Result<()> {
    let head = format!(
        "INSERT INTO audit_heads (tenant_id, seq, hash, updated_at) VALUES ({}, {}, {}, {}) \
         ON CONFLICT (tenant_id) DO UPDATE SET seq = EXCLUDED.seq, hash = EXCLUDED.hash, \
         updated_at = EXCLUDED.updated_at",
        quoted(tenant_id),
        chunk.seq,
        quoted(&chunk.hash),
        chunk.sealed_at
    );
    let copy_events = copy_in(events, EVENTS_COPY, &chunk.events);
    let copy_links = async {
        sqlx::raw_sql("BEGIN").execute(&mut *links).await?;
        copy_in(links, chain_copy, &chunk.chain).await?;
        sqlx::raw_sql(AssertSqlSafe(head))
            .execute(&mut *links)
            .await?;
        sqlx::raw_sql("COMMIT").execute(&mut *links).await?;
        anyhow::Ok(())
    };
    tokio::try_join!(copy_events, copy_links)?;
    Ok(())
}

async fn copy_in(conn: &mut PgConnection, statement: &str, data: &[u8]) -> Result<u64> {
    let mut copy = conn.copy_in_raw(statement).await?;
    copy.send(data).await?;
    Ok(copy.finish().await?)
}

/// A real event of the requester's log, as a pattern for clones.
struct Template {
    event_type: String,
    /// Per 10,000 seeded events ([`MIX`]).
    share: u64,
    /// The actor is an agent: each clone gets one of the requester's
    /// agents. Other actors (an admin, the system) are kept.
    agent_actor: bool,
    actor_kind: String,
    actor_subject: String,
    actor_tenant_id: String,
    outcome: String,
    subject_ids: Vec<Piece>,
    details: Vec<Piece>,
    /// The kind (id prefix) of each fresh id a clone gets.
    slots: Vec<String>,
}

/// A part of a template's text.
enum Piece {
    Text(String),
    /// The clone's fresh id number `n`.
    Fresh(usize),
    /// The clone's acting agent.
    Actor,
}

/// Templates of each type in [`MIX`]: the latest event of the type's most
/// common kind (outcome and action) in the requester's log, so
/// `delegation.decided` is an ALLOW of the allow scenarios, not the
/// step-up scenario's last request.
async fn load_templates(db: &DatabaseConnection, requester: &str) -> Result<Vec<Template>> {
    let types = MIX
        .iter()
        .map(|(event_type, _)| quoted(event_type))
        .collect::<Vec<_>>()
        .join(", ");
    let rows = all(
        db,
        &format!(
            "SELECT DISTINCT ON (event_type) event_type, actor_kind, actor_subject, \
             actor_tenant_id, outcome, subject_ids, details FROM (\
               SELECT *, count(*) OVER (PARTITION BY event_type, outcome, \
                 details::jsonb ->> 'action') AS kind FROM audit_events \
               WHERE tenant_id = {} AND event_type IN ({types})) AS e \
             ORDER BY event_type, kind DESC, id DESC",
            quoted(requester)
        ),
    )
    .await?;
    let mut templates = Vec::new();
    for row in &rows {
        let event_type: String = row.try_get("", "event_type")?;
        let share = MIX
            .iter()
            .find(|(name, _)| *name == event_type)
            .map_or(0, |(_, share)| *share);
        let actor_kind: String = row.try_get("", "actor_kind")?;
        let actor_subject: String = row.try_get("", "actor_subject")?;
        let agent_actor = actor_kind == "agent";
        let actor = agent_actor.then_some(actor_subject.as_str());
        // Rule events are about a rule: theirs is fresh too.
        let fresh_rules = event_type.starts_with("rule.");
        let mut slots = Vec::new();
        let mut seen = HashMap::new();
        let mut split = |text: &str| split_ids(text, actor, fresh_rules, &mut slots, &mut seen);
        let subject_ids = split(&row.try_get::<String>("", "subject_ids")?);
        let details = split(&row.try_get::<String>("", "details")?);
        templates.push(Template {
            event_type,
            share,
            agent_actor,
            actor_kind,
            actor_subject,
            actor_tenant_id: row.try_get("", "actor_tenant_id")?,
            outcome: row.try_get("", "outcome")?,
            subject_ids,
            details,
            slots,
        });
    }
    ensure!(
        !templates.is_empty(),
        "the requester's log holds no event of the seeded types to clone"
    );
    let total: u64 = templates.iter().map(|t| t.share).sum();
    let mix: Vec<String> = templates
        .iter()
        .map(|t| {
            format!(
                "{} {:.2}%",
                t.event_type,
                100.0 * t.share as f64 / total as f64
            )
        })
        .collect();
    let missing: Vec<&str> = MIX
        .iter()
        .map(|(name, _)| *name)
        .filter(|name| !templates.iter().any(|t| t.event_type == *name))
        .collect();
    eprintln!("  seeded events: {}", mix.join(", "));
    if !missing.is_empty() {
        eprintln!(
            "  left out (no event of the type in the requester's log to clone): {}",
            missing.join(", ")
        );
    }
    Ok(templates)
}

/// Whether `bytes[at..]` starts with a whole id: three lowercase letters,
/// `_` and 32 lowercase hex digits, not inside a longer word.
fn id_at(bytes: &[u8], at: usize) -> bool {
    let Some(candidate) = bytes.get(at..at + 36) else {
        return false;
    };
    let word = |byte: Option<&u8>| byte.is_some_and(|b| b.is_ascii_alphanumeric() || *b == b'_');
    candidate.iter().take(3).all(u8::is_ascii_lowercase)
        && candidate.get(3) == Some(&b'_')
        && candidate
            .iter()
            .skip(4)
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
        && !word(at.checked_sub(1).and_then(|before| bytes.get(before)))
        && !word(bytes.get(at + 36))
}

/// `text` cut at the ids a clone changes: the acting agent's (`actor`) and
/// those of [`FRESH_PREFIXES`] (and rules' when `fresh_rules`); each
/// distinct fresh id gets a slot (`slots` holds its kind).
fn split_ids(
    text: &str,
    actor: Option<&str>,
    fresh_rules: bool,
    slots: &mut Vec<String>,
    seen: &mut HashMap<String, usize>,
) -> Vec<Piece> {
    let bytes = text.as_bytes();
    let mut pieces = Vec::new();
    let (mut literal, mut at) = (0, 0);
    while at < bytes.len() {
        if !id_at(bytes, at) {
            at += 1;
            continue;
        }
        let id = text.get(at..at + 36).unwrap_or_default();
        let kind = id.get(..3).unwrap_or_default();
        let piece = if Some(id) == actor {
            Some(Piece::Actor)
        } else if FRESH_PREFIXES.contains(&kind) || (fresh_rules && kind == "rul") {
            let slot = *seen.entry(id.to_owned()).or_insert_with(|| {
                slots.push(kind.to_owned());
                slots.len() - 1
            });
            Some(Piece::Fresh(slot))
        } else {
            None
        };
        if let Some(piece) = piece {
            if literal < at {
                pieces.push(Piece::Text(
                    text.get(literal..at).unwrap_or_default().to_owned(),
                ));
            }
            pieces.push(piece);
            literal = at + 36;
        }
        at += 36;
    }
    if literal < bytes.len() {
        pieces.push(Piece::Text(
            text.get(literal..).unwrap_or_default().to_owned(),
        ));
    }
    pieces
}

fn render(pieces: &[Piece], fresh: &[String], actor: &str) -> String {
    let mut out = String::with_capacity(256);
    for piece in pieces {
        match piece {
            Piece::Text(text) => out.push_str(text),
            Piece::Fresh(slot) => out.push_str(fresh.get(*slot).map_or("", String::as_str)),
            Piece::Actor => out.push_str(actor),
        }
    }
    out
}

/// SplitMix64: the generator's fast, seedable randomness.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number below `n` (> 0).
    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % u64::try_from(n.max(1)).unwrap_or(1)).unwrap_or(0)
    }

    /// 32 lowercase hex digits shaped as a UUIDv7 of `millis`.
    fn uuid7_hex(&mut self, millis: i64) -> String {
        let (a, b) = (self.next(), self.next());
        format!(
            "{:012x}7{:03x}{:x}{:015x}",
            (millis as u64) & 0xffff_ffff_ffff,
            a >> 52,
            8 | (b >> 62),
            b & 0x0fff_ffff_ffff_ffff
        )
    }

    /// A hyphenated UUIDv4 (the server's request ids).
    fn uuid4(&mut self) -> String {
        let (a, b) = (self.next(), self.next());
        format!(
            "{:08x}-{:04x}-4{:03x}-{:x}{:03x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0xfff,
            8 | (b >> 62),
            (b >> 48) & 0xfff,
            b & 0xffff_ffff_ffff
        )
    }
}

/// Events as COPY text, for one transaction.
struct Chunk {
    events: Vec<u8>,
    chain: Vec<u8>,
    count: u64,
    /// The head after this chunk.
    seq: i64,
    hash: String,
    sealed_at: i64,
}

/// Makes the seeded events (on a thread of its own).
struct Generator {
    templates: Arc<Vec<Template>>,
    /// What each chain link holds, in COPY order.
    links: Vec<LinkColumn>,
    /// The requester's agents.
    actors: Vec<String>,
    requester: String,
    salt: u64,
    plan_start: i64,
    plan_step: f64,
}

impl Generator {
    /// Events number `range` (of the run's seeded events) after row id
    /// `last_row` and the head `(seq, prev)`, a chunk at a time into `tx`;
    /// answers the time spent making them.
    fn run(
        &self,
        range: Range<u64>,
        mut last_row: i64,
        mut seq: i64,
        mut prev: String,
        tx: &tokio::sync::mpsc::Sender<Chunk>,
    ) -> Result<Duration> {
        let total: u64 = self.templates.iter().map(|t| t.share).sum();
        let mut busy = Duration::ZERO;
        let mut next = range.start;
        while next < range.end {
            let started = Instant::now();
            let end = (next + EVENTS_PER_CHUNK).min(range.end);
            let capacity = usize::try_from(end - next)? * 700;
            let mut chunk = Chunk {
                events: Vec::with_capacity(capacity),
                chain: Vec::with_capacity(capacity / 3),
                count: end - next,
                seq,
                hash: String::new(),
                sealed_at: 0,
            };
            for k in next..end {
                last_row += 1;
                seq += 1;
                let event = self.event(k, last_row, total)?;
                let hash = chain_hash(&event, seq, &prev)?;
                let sealed_at = event.occurred_at + SEAL_DELAY_MS;
                write_event(&mut chunk.events, &event)?;
                self.write_link(&mut chunk.chain, &event, seq, &prev, &hash, sealed_at)?;
                chunk.sealed_at = sealed_at;
                prev = hash;
            }
            chunk.seq = seq;
            chunk.hash = prev.clone();
            busy += started.elapsed();
            tx.blocking_send(chunk)
                .map_err(|_| anyhow!("the seeding stopped taking events"))?;
            next = end;
        }
        Ok(busy)
    }

    /// `event`'s chain link (sequence `seq`, hashes `prev` → `hash`) in
    /// COPY text format, its columns in [`Self::links`] order.
    fn write_link(
        &self,
        out: &mut Vec<u8>,
        event: &audit_event::Model,
        seq: i64,
        prev: &str,
        hash: &str,
        sealed_at: i64,
    ) -> Result<()> {
        for (index, column) in self.links.iter().enumerate() {
            if index > 0 {
                out.push(b'\t');
            }
            match column {
                LinkColumn::TenantId => copy_text(out, &event.tenant_id),
                LinkColumn::Seq => write!(out, "{seq}")?,
                LinkColumn::EventRowId => write!(out, "{}", event.id)?,
                LinkColumn::PrevHash => copy_text(out, prev),
                LinkColumn::Hash => copy_text(out, hash),
                LinkColumn::SealedAt => write!(out, "{sealed_at}")?,
                LinkColumn::OccurredAt => write!(out, "{}", event.occurred_at)?,
                LinkColumn::EventType => copy_text(out, &event.event_type),
                LinkColumn::ActorSubject => copy_text(out, &event.actor_subject),
            }
        }
        out.push(b'\n');
        Ok(())
    }

    /// Seeded event number `k`, row `id`.
    fn event(&self, k: u64, id: i64, total_share: u64) -> Result<audit_event::Model> {
        let mut random = SplitMix(self.salt ^ k.wrapping_mul(0xD1B5_4A32_D192_ED03));
        let mut pick = random.next() % total_share.max(1);
        let template = self
            .templates
            .iter()
            .find(|t| {
                let hit = pick < t.share;
                pick = pick.saturating_sub(t.share);
                hit
            })
            .or_else(|| self.templates.first())
            .context("no event template")?;
        let occurred_at = self.plan_start + (k as f64 * self.plan_step) as i64;
        let fresh: Vec<String> = template
            .slots
            .iter()
            .map(|kind| format!("{kind}_{}", random.uuid7_hex(occurred_at)))
            .collect();
        let (actor_subject, actor_tenant_id) = if template.agent_actor {
            let agent = self
                .actors
                .get(random.below(self.actors.len()))
                .context("no agent")?;
            (agent.clone(), self.requester.clone())
        } else {
            (
                template.actor_subject.clone(),
                template.actor_tenant_id.clone(),
            )
        };
        Ok(audit_event::Model {
            id,
            event_id: format!("evt_{}", random.uuid7_hex(occurred_at)),
            tenant_id: self.requester.clone(),
            occurred_at,
            actor_kind: template.actor_kind.clone(),
            subject_ids: render(&template.subject_ids, &fresh, &actor_subject),
            details: render(&template.details, &fresh, &actor_subject),
            actor_subject,
            actor_tenant_id,
            event_type: template.event_type.clone(),
            outcome: template.outcome.clone(),
            request_id: random.uuid4(),
        })
    }
}

/// One `audit_events` row in COPY text format.
fn write_event(out: &mut Vec<u8>, event: &audit_event::Model) -> Result<()> {
    write!(out, "{}\t", event.id)?;
    copy_text(out, &event.event_id);
    out.push(b'\t');
    copy_text(out, &event.tenant_id);
    write!(out, "\t{}\t", event.occurred_at)?;
    for field in [
        &event.actor_kind,
        &event.actor_subject,
        &event.actor_tenant_id,
        &event.event_type,
        &event.subject_ids,
        &event.outcome,
        &event.request_id,
    ] {
        copy_text(out, field);
        out.push(b'\t');
    }
    copy_text(out, &event.details);
    out.push(b'\n');
    Ok(())
}

/// `value` escaped for COPY's text format.
fn copy_text(out: &mut Vec<u8>, value: &str) {
    if !value
        .bytes()
        .any(|b| matches!(b, b'\\' | b'\t' | b'\n' | b'\r'))
    {
        out.extend_from_slice(value.as_bytes());
        return;
    }
    for byte in value.bytes() {
        match byte {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\t' => out.extend_from_slice(b"\\t"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            other => out.push(other),
        }
    }
}

// ---------------------------------------------------------------------------
// The report.

fn cpu_ms_per_op(row: &Row) -> f64 {
    row.server_cpu * 1000.0 / row.measured.ops.max(1) as f64
}

fn print_report(args: &Args, names: &[String], levels: &[Level], rules: Option<&RulesFigures>) {
    let load = match args.rate {
        Some(rate) => format!("open loop at {rate} ops/s"),
        None => format!(
            "closed loop, concurrency {} (step-up {})",
            args.concurrency, args.stepup_concurrency
        ),
    };
    println!();
    println!(
        "postgres · scale · {load} · {} connections · {} s measured after {} s warm-up \
         (level = events in the requesting tenant's audit log; L/10 delegations, L/100 agents, \
         L/1000 tenants in all)",
        args.connections, args.duration, args.warmup
    );
    if let Some(rules) = rules {
        println!(
            "the EdDSA receiver holds {} inbound rules from the rules measurement on \
             (none matches bench.read)",
            thousands(rules.many_rules as u64)
        );
    }

    println!();
    println!(
        "{:<8} {:>12} {:>12} {:>9} {:>8} {:>8} {:>11} {:>12} {:>12}",
        "level",
        "log events",
        "delegations",
        "agents",
        "tenants",
        "DB GiB",
        "SERVING ms",
        "idle RSS MiB",
        "RSS after"
    );
    for level in levels {
        let sizes = &level.sizes;
        let count = |n: i64| thousands(u64::try_from(n).unwrap_or(0));
        println!(
            "{:<8} {:>12} {:>12} {:>9} {:>8} {:>8.2} {:>11.0} {:>12.1} {:>12.1}",
            level.label,
            count(sizes.log),
            count(sizes.delegations),
            count(sizes.agents),
            count(sizes.tenants),
            sizes.bytes as f64 / f64::from(1u32 << 30),
            level.startup.as_secs_f64() * 1000.0,
            level.idle_rss,
            level.rss_after
        );
    }
    println!(
        "  (SERVING: from spawn to health SERVING; the empty level's includes the migrations)"
    );

    if levels.iter().any(|level| level.seeded.is_some()) {
        println!();
        println!("seeding, rows in s (rows/s)");
        for level in levels {
            let Some(seeded) = &level.seeded else {
                continue;
            };
            let tables: Vec<String> = seeded
                .tables
                .iter()
                .map(|table| {
                    format!(
                        "{} {} in {:.1} s ({:.0}/s)",
                        table.table,
                        thousands(table.rows),
                        table.elapsed.as_secs_f64(),
                        table.rate()
                    )
                })
                .collect();
            println!(
                "{:<8} {} · VACUUM (ANALYZE) {:.1} s · total {:.1} s",
                level.label,
                if tables.is_empty() {
                    "nothing to add".to_owned()
                } else {
                    tables.join(" · ")
                },
                seeded.vacuum.as_secs_f64(),
                seeded.total.as_secs_f64()
            );
        }
    }

    if levels.iter().any(|level| !level.rows.is_empty()) {
        println!();
        println!(
            "{:<26} {:<8} {:>9} {:>8} {:>8} {:>8} {:>7} {:>14}",
            "scenario", "level", "ops/s", "p50 ms", "p99 ms", "p999 ms", "errors", "srv CPU-ms/op"
        );
        for name in names {
            let mut first = true;
            for level in levels {
                let Some(row) = level.rows.iter().find(|row| &row.scenario == name) else {
                    continue;
                };
                let m = &row.measured;
                println!(
                    "{:<26} {:<8} {:>9.0} {:>8.2} {:>8.2} {:>8.2} {:>7} {:>14.3}",
                    if first { name.as_str() } else { "" },
                    level.label,
                    m.throughput(),
                    m.millis(0.50),
                    m.millis(0.99),
                    m.millis(0.999),
                    m.errors,
                    cpu_ms_per_op(row)
                );
                first = false;
            }
        }
        for level in levels {
            for row in &level.rows {
                if let Some(error) = &row.measured.first_error {
                    println!(
                        "  {} at {}: first error: {error}",
                        row.scenario, level.label
                    );
                }
            }
        }
    }

    print_audit(levels);
    print_ratios(levels);
    if let Some(rules) = rules {
        print_rules(rules);
    }
}

fn print_audit(levels: &[Level]) {
    let audited: Vec<(&Level, &AuditFigures)> = levels
        .iter()
        .filter_map(|level| Some((level, level.audit.as_ref()?)))
        .collect();
    let Some((_, first)) = audited.first() else {
        return;
    };
    println!();
    println!(
        "{:<26} {:<8} {:>6} {:>7} {:>8} {:>8}",
        "ListAuditEvents (page 50)", "level", "runs", "events", "p50 ms", "p99 ms"
    );
    for (index, list) in first.lists.iter().enumerate() {
        let mut label = list.name;
        for (level, audit) in &audited {
            let Some(list) = audit.lists.get(index) else {
                continue;
            };
            println!(
                "{:<26} {:<8} {:>6} {:>7} {:>8.2} {:>8.2}",
                label, level.label, list.runs, list.events, list.p50_ms, list.p99_ms
            );
            label = "";
        }
    }
    println!(
        "  list.rare_type: {RARE_TYPE}; list.common_type: {COMMON_TYPE}; list.actor: one of \
         the requester's agents; list.hour: one hour in the middle of the seeded events (of \
         the whole log before any is seeded):"
    );
    for (level, audit) in &audited {
        println!(
            "    {}: {} to {}",
            level.label,
            to_timestamp(audit.hour.0),
            to_timestamp(audit.hour.1)
        );
    }
    println!();
    println!(
        "{:<26} {:<8} {:>12} {:>9} {:>8} {:>10} {:>8}  server RSS MiB before / peak / after",
        "audit export / verify", "level", "events", "MB", "s", "events/s", "MB/s"
    );
    for (index, export) in first.exports.iter().enumerate() {
        let mut label = format!("ExportAuditEvents {}", export.format);
        for (level, audit) in &audited {
            let Some(export) = audit.exports.get(index) else {
                continue;
            };
            let seconds = export.elapsed.as_secs_f64().max(f64::EPSILON);
            println!(
                "{:<26} {:<8} {:>12} {:>9.1} {:>8.1} {:>10.0} {:>8.1}  {:.1} / {:.1} / {:.1}",
                label,
                level.label,
                thousands(export.events),
                export.bytes as f64 / 1e6,
                seconds,
                export.events as f64 / seconds,
                export.bytes as f64 / 1e6 / seconds,
                export.rss.0,
                export.rss.1,
                export.rss.2
            );
            label.clear();
        }
    }
    type Pick = fn(&AuditFigures) -> Option<&VerifyFigures>;
    let verifications: [(&str, Pick); 3] = [
        ("VerifyAuditChain (full)", |audit| Some(&audit.verify)),
        ("  since previous level", |audit| {
            audit.since_previous.as_ref()
        }),
        ("  since own receipt", |audit| Some(&audit.since_own)),
    ];
    for (mut label, figures) in verifications {
        for (level, audit) in &audited {
            let Some(verify) = figures(audit) else {
                continue;
            };
            let seconds = verify.elapsed.as_secs_f64().max(f64::EPSILON);
            println!(
                "{:<26} {:<8} {:>12} {:>9} {:>8.3} {:>10.0}",
                label,
                level.label,
                thousands(verify.checked),
                "-",
                seconds,
                verify.checked as f64 / seconds
            );
            label = "";
        }
    }
}

fn print_ratios(levels: &[Level]) {
    let (Some(empty), Some(last)) = (levels.first(), levels.last()) else {
        return;
    };
    if levels.len() < 2 {
        return;
    }
    let mut lines = Vec::new();
    for name in RATIOS {
        let find = |rows: &[Row]| {
            rows.iter()
                .find(|row| row.scenario == *name)
                .map(|row| (row.measured.throughput(), row.measured.millis(0.99)))
        };
        if let (Some(a), Some(b)) = (find(&empty.rows), find(&last.rows)) {
            lines.push(format!(
                "{:<26} {:>12.2} {:>12.2}",
                name,
                b.0 / a.0.max(f64::EPSILON),
                b.1 / a.1.max(f64::EPSILON)
            ));
        }
    }
    if lines.is_empty() {
        return;
    }
    println!();
    println!(
        "{:<26} {:>12} {:>12}",
        format!("{} / empty", last.label),
        "ops/s ratio",
        "p99 ratio"
    );
    for line in lines {
        println!("{line}");
    }
}

fn print_rules(rules: &RulesFigures) {
    println!();
    println!(
        "rules: {RULES_SCENARIO}, receiver with {FEW_RULES} inbound rules vs {} ({} added \
         through CreateRule in {:.1} s, {:.0}/s, {RULES_IN_FLIGHT} in flight)",
        thousands(rules.many_rules as u64),
        thousands(rules.added as u64),
        rules.adding.as_secs_f64(),
        rules.added as f64 / rules.adding.as_secs_f64().max(f64::EPSILON)
    );
    println!(
        "{:<14} {:>9} {:>8} {:>8} {:>8} {:>14}",
        "inbound rules", "ops/s", "p50 ms", "p99 ms", "p999 ms", "srv CPU-ms/op"
    );
    for (count, row) in [(FEW_RULES, &rules.few), (rules.many_rules, &rules.many)] {
        let m = &row.measured;
        println!(
            "{:<14} {:>9.0} {:>8.2} {:>8.2} {:>8.2} {:>14.3}",
            thousands(count as u64),
            m.throughput(),
            m.millis(0.50),
            m.millis(0.99),
            m.millis(0.999),
            cpu_ms_per_op(row)
        );
    }
    let (few, many) = (&rules.few.measured, &rules.many.measured);
    println!(
        "{:<14} {:>9.2} {:>8.2} {:>8.2} {:>8} {:>14.2}",
        "ratio",
        many.throughput() / few.throughput().max(f64::EPSILON),
        many.millis(0.50) / few.millis(0.50).max(f64::EPSILON),
        many.millis(0.99) / few.millis(0.99).max(f64::EPSILON),
        "",
        cpu_ms_per_op(&rules.many) / cpu_ms_per_op(&rules.few).max(f64::EPSILON)
    );
    for row in [&rules.few, &rules.many] {
        if let Some(error) = &row.measured.first_error {
            println!("  rules: first error: {error}");
        }
    }
}
