//! The audit writer and the chain sealer.
//!
//! Every state change calls [`append`] with its own open transaction, so the
//! event commits or rolls back with the change it records. `append` takes no
//! per-tenant lock: it inserts the event and a row in `audit_pending`.
//!
//! The [`Sealer`] then links pending events into each tenant's hash chain,
//! shortly after they commit: under the tenant's `audit_heads` row lock it
//! gives each event the next gapless sequence number and
//! `hash = SHA-256(canonical event ‖ prev_hash)`, inserts the `audit_chain`
//! row and deletes the pending row. Only the sealer serializes per tenant,
//! and it seals in batches, so audited requests never queue behind each other.

use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt as _, TryStreamExt as _};
use sea_orm::sea_query::{
    Alias, CommonTableExpression, Expr, InsertStatement, PostgresQueryBuilder, Query,
    SelectStatement, SubQueryStatement, UnionType, WithQuery,
};
use sea_orm::{
    ActiveModelTrait, ConnectionTrait, DatabaseConnection, DbBackend, EntityName, EntityTrait,
    IdenStatic, Iterable, QueryTrait, Statement,
};
use serde_json::{Value, json};
use tokio::sync::Notify;
use vaultguard_proto::v1::{Actor, PrincipalKind};

use crate::clock::Clock;
use crate::crypto::sha256_hex;
use crate::error::{Error, Result};
use crate::hub::{Change, Hub};
use crate::ids::{IdKind, new_id};
use crate::store::entities::audit_event;
use crate::store::is_postgres;

/// The pseudo-tenant whose log records platform events (tenant lifecycle is
/// also written to the tenant's own log; issuer key rotation only here).
pub const PLATFORM_LOG: &str = "platform";

/// The `prev_hash` of a tenant's first event.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// How an audited operation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Denied,
    Failure,
}

impl Outcome {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::Denied => "denied",
            Self::Failure => "failure",
        }
    }
}

/// One event to append. `details` must never hold a secret: callers put
/// hashes or ids there instead.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub tenant_id: String,
    pub actor: Actor,
    pub event_type: &'static str,
    pub subject_ids: Vec<String>,
    pub outcome: Outcome,
    pub request_id: String,
    pub details: Value,
}

/// Who did something and under which request id: the part of an audit event
/// that comes from the request.
#[derive(Debug, Clone)]
pub struct AuditCtx {
    pub actor: Actor,
    pub request_id: String,
}

impl AuditCtx {
    /// VaultGuard itself (sweeper, startup).
    pub fn system(request_id: impl Into<String>) -> Self {
        Self {
            actor: Actor {
                kind: PrincipalKind::System as i32,
                subject: "system".to_owned(),
                tenant_id: String::new(),
            },
            request_id: request_id.into(),
        }
    }

    /// An event of this context in `tenant_id`'s log.
    pub fn event(
        &self,
        tenant_id: &str,
        event_type: &'static str,
        subject_ids: Vec<String>,
        outcome: Outcome,
        details: Value,
    ) -> NewEvent {
        NewEvent {
            tenant_id: tenant_id.to_owned(),
            actor: self.actor.clone(),
            event_type,
            subject_ids,
            outcome,
            request_id: self.request_id.clone(),
            details,
        }
    }
}

fn actor_kind_name(kind: i32) -> &'static str {
    match PrincipalKind::try_from(kind) {
        Ok(PrincipalKind::Operator) => "operator",
        Ok(PrincipalKind::Human) => "human",
        Ok(PrincipalKind::Agent) => "agent",
        Ok(PrincipalKind::System) => "system",
        _ => "unspecified",
    }
}

/// The most bytes of `details` an event stores, as the contract promises.
pub const MAX_DETAILS_BYTES: usize = 16 * 1024;

/// `details` as stored: itself when small enough, else a stand-in naming its
/// size and SHA-256 and keeping only its short top-level scalar fields.
fn bounded_details(details: &Value) -> Result<String> {
    let text = serde_json::to_string(details).map_err(Error::internal)?;
    if text.len() <= MAX_DETAILS_BYTES {
        return Ok(text);
    }
    let mut kept = serde_json::Map::new();
    if let Value::Object(map) = details {
        for (key, value) in map {
            let short = match value {
                Value::String(s) => s.len() <= 256,
                Value::Number(_) | Value::Bool(_) | Value::Null => true,
                _ => false,
            };
            if short {
                kept.insert(key.clone(), value.clone());
            }
        }
    }
    kept.insert(
        "details_truncated".to_owned(),
        json!({"bytes": text.len(), "sha256": sha256_hex(text.as_bytes())}),
    );
    serde_json::to_string(&Value::Object(kept)).map_err(Error::internal)
}

/// The stored columns of an event (all but the row id), in the order of
/// [`event_values`].
const EVENT_COLUMNS: [audit_event::Column; 11] = [
    audit_event::Column::EventId,
    audit_event::Column::TenantId,
    audit_event::Column::OccurredAt,
    audit_event::Column::ActorKind,
    audit_event::Column::ActorSubject,
    audit_event::Column::ActorTenantId,
    audit_event::Column::EventType,
    audit_event::Column::SubjectIds,
    audit_event::Column::Outcome,
    audit_event::Column::RequestId,
    audit_event::Column::Details,
];

/// What `event` stores, column by column ([`EVENT_COLUMNS`]).
fn event_values(clock: &dyn Clock, event: &NewEvent) -> Result<Vec<sea_orm::Value>> {
    Ok(vec![
        new_id(IdKind::AuditEvent).into(),
        event.tenant_id.as_str().into(),
        clock.now_millis().into(),
        actor_kind_name(event.actor.kind).into(),
        event.actor.subject.as_str().into(),
        event.actor.tenant_id.as_str().into(),
        event.event_type.into(),
        serde_json::to_string(&event.subject_ids)
            .map_err(Error::internal)?
            .into(),
        event.outcome.as_str().into(),
        event.request_id.as_str().into(),
        bounded_details(&event.details)?.into(),
    ])
}

/// Appends `event` inside the caller's transaction `txn`.
pub async fn append<C: ConnectionTrait>(txn: &C, clock: &dyn Clock, event: NewEvent) -> Result<()> {
    append_all(txn, clock, vec![event]).await
}

/// Appends several events in one transaction: on PostgreSQL one statement
/// (the events and their `audit_pending` rows), elsewhere two per event.
pub async fn append_all<C: ConnectionTrait>(
    txn: &C,
    clock: &dyn Clock,
    events: Vec<NewEvent>,
) -> Result<()> {
    if events.is_empty() {
        return Ok(());
    }
    let backend = txn.get_database_backend();
    if backend == DbBackend::Postgres {
        // Inside the caller's transaction, so through sea-orm, which binds
        // no array with a NULL: the events as rows of a multi-row insert.
        // (Not a hot path: the hot writes go through the [`Recorder`].)
        let last = inserted_events("e");
        txn.execute_raw(with_events(clock, Vec::new(), &events, None, last)?)
            .await?;
        return Ok(());
    }
    for event in events {
        let tenant_id = event.tenant_id.clone();
        let mut insert = Query::insert();
        insert
            .into_table(audit_event::Entity)
            .columns(EVENT_COLUMNS)
            .values(event_values(clock, &event)?.into_iter().map(Into::into))
            .map_err(Error::internal)?;
        let inserted = txn.execute(&insert).await?;
        txn.execute_raw(Statement::from_sql_and_values(
            backend,
            "INSERT INTO audit_pending (event_row_id, tenant_id) VALUES (?, ?)",
            [inserted.last_insert_id().into(), tenant_id.into()],
        ))
        .await?;
    }
    Ok(())
}

/// Rewrites `?` placeholders as `$1, $2, …` for PostgreSQL.
pub fn placeholders(backend: DbBackend, sql: &str) -> String {
    if backend != DbBackend::Postgres {
        return sql.to_owned();
    }
    let mut out = String::with_capacity(sql.len() + 8);
    let mut index = 0;
    for ch in sql.chars() {
        if ch == '?' {
            index += 1;
            out.push('$');
            out.push_str(&index.to_string());
        } else {
            out.push(ch);
        }
    }
    out
}

/// The bytes hashed for one chain link: every field of the event, its
/// sequence number and the previous hash, as a JSON array (field order fixed).
///
/// # Errors
///
/// Only if serde_json could not serialize a string or an integer.
pub fn chain_hash(event: &audit_event::Model, seq: i64, prev_hash: &str) -> Result<String> {
    // Serialized straight from the fields (a tuple is a JSON array), the
    // same text `json!([...])` gives without building a `Value` first.
    let canonical = (
        &event.tenant_id,
        seq,
        &event.event_id,
        event.occurred_at,
        &event.actor_kind,
        &event.actor_subject,
        &event.actor_tenant_id,
        &event.event_type,
        &event.subject_ids,
        &event.outcome,
        &event.request_id,
        &event.details,
        prev_hash,
    );
    let bytes = serde_json::to_vec(&canonical).map_err(Error::internal)?;
    Ok(sha256_hex(&bytes))
}

/// A tenant's oldest pending events (parameters: the tenant, how many), in
/// order: the pending row ids first, then their events by primary key
/// (`= ANY (ARRAY(…))` is PostgreSQL's form of a key lookup by a list that
/// a generic plan keeps). The plan must never scan `audit_events`, which
/// grows forever: see `store::connect` for why it does not.
pub fn pending_events_sql(backend: DbBackend) -> &'static str {
    if backend == DbBackend::Postgres {
        "SELECT * FROM audit_events WHERE id = ANY (ARRAY(\
           SELECT event_row_id FROM audit_pending WHERE tenant_id = $1 \
           ORDER BY event_row_id LIMIT $2\
         )) ORDER BY id"
    } else {
        "SELECT * FROM audit_events WHERE id IN (\
           SELECT event_row_id FROM audit_pending WHERE tenant_id = ? \
           ORDER BY event_row_id LIMIT ?\
         ) ORDER BY id"
    }
}

/// PostgreSQL: vacuums `audit_pending`. Every sealed event leaves a dead
/// row and a dead index entry behind, and every sealing round reads the
/// table by its index (which tenants have pending rows, a tenant's oldest
/// ones), stepping over all of them until a vacuum removes them. Autovacuum
/// visits a database at most once a minute, by which time a busy server has
/// left hundreds of thousands: under a step-up load after a minute of
/// ALLOWs, each round's three reads took 0.7–1.8 ms for a handful of live
/// rows. The table holds only what is not sealed yet, so vacuuming it is
/// quick. `SKIP_LOCKED`: a replica vacuuming it already will do.
pub async fn vacuum_pending(db: &DatabaseConnection) -> Result<()> {
    db.execute_unprepared("VACUUM (SKIP_LOCKED) audit_pending")
        .await?;
    Ok(())
}

/// Links committed events into each tenant's chain, in the background.
#[derive(Debug)]
pub struct Sealer {
    db: DatabaseConnection,
    clock: Arc<dyn Clock>,
    wake: Arc<Notify>,
    hub: Arc<Hub>,
}

const SEAL_BATCH: u64 = 500;

/// Tenants sealed at once on PostgreSQL (each holds a pooled connection
/// while it seals).
const SEAL_TENANTS_AT_ONCE: usize = 4;

impl Sealer {
    pub fn new(
        db: DatabaseConnection,
        clock: Arc<dyn Clock>,
        wake: Arc<Notify>,
        hub: Arc<Hub>,
    ) -> Self {
        Self {
            db,
            clock,
            wake,
            hub,
        }
    }

    /// Seals until `shutdown` resolves: whenever woken, and every 200 ms.
    pub async fn run(self, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let mut since_vacuum = 0_u64;
        loop {
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                _ = shutdown.changed() => {
                    let _ = self.seal_all().await;
                    return;
                }
            }
            match self.seal_all().await {
                // Let the next round gather: sealing each commit's few
                // events on its own costs the database ~9 statements a
                // round, which under load competed with the requests
                // themselves; the chain now trails commits by at most
                // SEAL_GATHER more.
                Ok(sealed) if sealed > 0 => {
                    since_vacuum += sealed;
                    if since_vacuum >= VACUUM_AFTER_SEALED && is_postgres(&self.db) {
                        since_vacuum = 0;
                        if let Err(err) = vacuum_pending(&self.db).await {
                            tracing::warn!(error = %err, "vacuuming audit_pending failed");
                        }
                    }
                    tokio::time::sleep(SEAL_GATHER).await;
                }
                Ok(_) => {}
                Err(err) => tracing::warn!(error = %err, "audit sealing failed; will retry"),
            }
        }
    }

    /// Seals every pending event of every tenant; returns how many it sealed.
    pub async fn seal_all(&self) -> Result<u64> {
        let backend = self.db.get_database_backend();
        let rows = self
            .db
            .query_all_raw(Statement::from_string(
                backend,
                "SELECT DISTINCT tenant_id FROM audit_pending",
            ))
            .await?;
        let tenants = rows
            .iter()
            .map(|row| row.try_get::<String>("", "tenant_id"))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        // Each tenant's chain is its own (its head row is the only lock a
        // sealing takes), so on PostgreSQL several are sealed at once: one
        // tenant's reads, hashing and writes overlap another's, and a
        // backlog spread over tenants drains that many times faster.
        // SQLite has one connection, and seals one at a time.
        let at_once = if is_postgres(&self.db) {
            SEAL_TENANTS_AT_ONCE
        } else {
            1
        };
        futures::stream::iter(tenants)
            .map(|tenant_id| async move { self.seal_tenant_fully(&tenant_id).await })
            .buffer_unordered(at_once)
            .try_fold(0, |sealed, count| async move { Ok(sealed + count) })
            .await
    }

    /// Seals a tenant's pending events, a batch at a time, until none is
    /// left.
    async fn seal_tenant_fully(&self, tenant_id: &str) -> Result<u64> {
        let mut sealed = 0;
        loop {
            let count = self.seal_tenant(tenant_id).await?;
            sealed += count;
            if count < SEAL_BATCH {
                return Ok(sealed);
            }
        }
    }

    async fn seal_tenant(&self, tenant_id: &str) -> Result<u64> {
        let txn = crate::store::begin(&self.db).await?;
        let backend = txn.get_database_backend();
        let postgres = is_postgres(&txn);
        let now = self.clock.now_millis();
        let head = match self.lock_head(&txn, tenant_id).await? {
            Some(head) => head,
            None => {
                // A tenant's first sealing: make its head, then lock it.
                txn.execute_raw(Statement::from_sql_and_values(
                    backend,
                    placeholders(
                        backend,
                        "INSERT INTO audit_heads (tenant_id, seq, hash, updated_at) VALUES (?, 0, ?, ?) ON CONFLICT (tenant_id) DO NOTHING",
                    ),
                    [tenant_id.into(), GENESIS_HASH.into(), now.into()],
                ))
                .await?;
                self.lock_head(&txn, tenant_id)
                    .await?
                    .ok_or_else(|| Error::internal("audit head vanished"))?
            }
        };
        let (mut seq, mut prev_hash) = head;

        let events = audit_event::Entity::find()
            .from_raw_sql(Statement::from_sql_and_values(
                backend,
                pending_events_sql(backend),
                [
                    tenant_id.into(),
                    i64::try_from(SEAL_BATCH).unwrap_or(500).into(),
                ],
            ))
            .all(&txn)
            .await?;
        if events.is_empty() {
            txn.rollback().await?;
            return Ok(0);
        }
        let mut links = Vec::with_capacity(events.len());
        for event in &events {
            seq += 1;
            let hash = chain_hash(event, seq, &prev_hash)?;
            links.push(Link {
                seq,
                event_row_id: event.id,
                prev_hash: std::mem::replace(&mut prev_hash, hash.clone()),
                hash,
                occurred_at: event.occurred_at,
                event_type: event.event_type.clone(),
                actor_subject: event.actor_subject.clone(),
            });
        }
        if postgres {
            // The links, the pending rows' deletion and the head's move in
            // one statement of fixed text (the links travel as one JSON
            // parameter), so it is parsed and planned once per connection
            // whatever the batch's size. `= ANY (ARRAY(…))` keeps the
            // generic plan on the primary key, `(tenant_id, event_row_id)`.
            txn.execute_raw(Statement::from_sql_and_values(
                backend,
                "WITH links AS (\
                   SELECT * FROM json_to_recordset($1::json) \
                   AS l(seq BIGINT, event_row_id BIGINT, prev_hash TEXT, hash TEXT, \
                        occurred_at BIGINT, event_type TEXT, actor_subject TEXT)\
                 ), chained AS (\
                   INSERT INTO audit_chain (tenant_id, seq, event_row_id, prev_hash, hash, sealed_at, \
                     occurred_at, event_type, actor_subject) \
                   SELECT $2, seq, event_row_id, prev_hash, hash, $3, occurred_at, event_type, actor_subject \
                   FROM links\
                 ), sealed AS (\
                   DELETE FROM audit_pending WHERE tenant_id = $2 \
                   AND event_row_id = ANY (ARRAY(SELECT event_row_id FROM links))\
                 ) \
                 UPDATE audit_heads SET seq = $4, hash = $5, updated_at = $3 WHERE tenant_id = $2",
                [
                    serde_json::to_string(&links).map_err(Error::internal)?.into(),
                    tenant_id.into(),
                    now.into(),
                    seq.into(),
                    prev_hash.into(),
                ],
            ))
            .await?;
        } else {
            // One multi-row insert of the links and one delete of the
            // pending rows per batch, not two statements per event.
            let rows = vec!["(?, ?, ?, ?, ?, ?, ?, ?, ?)"; links.len()].join(", ");
            txn.execute_raw(Statement::from_sql_and_values(
                backend,
                placeholders(
                    backend,
                    &format!(
                        "INSERT INTO audit_chain (tenant_id, seq, event_row_id, prev_hash, hash, sealed_at, \
                         occurred_at, event_type, actor_subject) VALUES {rows}"
                    ),
                ),
                links.iter().flat_map(|link| {
                    [
                        tenant_id.into(),
                        link.seq.into(),
                        link.event_row_id.into(),
                        link.prev_hash.clone().into(),
                        link.hash.clone().into(),
                        now.into(),
                        link.occurred_at.into(),
                        link.event_type.clone().into(),
                        link.actor_subject.clone().into(),
                    ]
                }),
            ))
            .await?;
            let ids = vec!["?"; links.len()].join(", ");
            txn.execute_raw(Statement::from_sql_and_values(
                backend,
                placeholders(
                    backend,
                    &format!(
                        "DELETE FROM audit_pending WHERE tenant_id = ? AND event_row_id IN ({ids})"
                    ),
                ),
                std::iter::once(tenant_id.into())
                    .chain(links.iter().map(|link| link.event_row_id.into())),
            ))
            .await?;
            txn.execute_raw(Statement::from_sql_and_values(
                backend,
                placeholders(
                    backend,
                    "UPDATE audit_heads SET seq = ?, hash = ?, updated_at = ? WHERE tenant_id = ?",
                ),
                [seq.into(), prev_hash.into(), now.into(), tenant_id.into()],
            ))
            .await?;
        }
        let change = Change::audit(tenant_id);
        self.hub.announce(&txn, &change).await?;
        txn.commit().await?;
        self.hub.committed(vec![change]);
        Ok(u64::try_from(events.len()).unwrap_or(0))
    }

    /// The tenant's head (sequence and hash), locked for this transaction
    /// (`FOR UPDATE` on PostgreSQL; SQLite has one writer); `None` before
    /// the tenant's first sealing.
    async fn lock_head(
        &self,
        txn: &sea_orm::DatabaseTransaction,
        tenant_id: &str,
    ) -> Result<Option<(i64, String)>> {
        let backend = txn.get_database_backend();
        let lock = if is_postgres(txn) { " FOR UPDATE" } else { "" };
        let Some(head) = txn
            .query_one_raw(Statement::from_sql_and_values(
                backend,
                placeholders(
                    backend,
                    &format!("SELECT seq, hash FROM audit_heads WHERE tenant_id = ?{lock}"),
                ),
                [tenant_id.into()],
            ))
            .await?
        else {
            return Ok(None);
        };
        Ok(Some((head.try_get("", "seq")?, head.try_get("", "hash")?)))
    }
}

/// One event's place in its tenant's chain.
#[derive(Debug, serde::Serialize)]
struct Link {
    seq: i64,
    event_row_id: i64,
    prev_hash: String,
    hash: String,
    /// Copies of the event's fields that filtered listings read from the
    /// chain's indexes (not hashed; VerifyAuditChain compares them).
    occurred_at: i64,
    event_type: String,
    actor_subject: String,
}

/// One write of a group commit: at most one row to insert (an idempotency
/// record: a delegation, a signature) and the events that record it,
/// written together or not at all.
#[derive(Debug)]
pub struct Unit {
    pub insert: Option<RowInsert>,
    pub events: Vec<NewEvent>,
}

/// A row a [`Unit`] inserts: as a statement (SQLite) and as its column
/// names and values (PostgreSQL's group statement, which sends each column
/// of its rows as one array), with its primary key `id`.
#[derive(Debug)]
pub struct RowInsert {
    table: &'static str,
    id: String,
    columns: Vec<(&'static str, sea_orm::Value)>,
    statement: InsertStatement,
}

impl RowInsert {
    /// The insert of `active`, which must set every column (a column left
    /// out would be NULL in the group statement, not its default) and have a
    /// text primary key named `id`.
    pub fn of<A>(active: A) -> Result<Self>
    where
        A: ActiveModelTrait,
    {
        let mut columns = Vec::new();
        let mut id = None;
        for column in <<A as ActiveModelTrait>::Entity as EntityTrait>::Column::iter() {
            let value = active
                .get(column)
                .into_value()
                .ok_or_else(|| Error::internal(format!("column {} not set", column.as_str())))?;
            if let ("id", sea_orm::Value::String(Some(text))) = (column.as_str(), &value) {
                id = Some(text.clone());
            }
            columns.push((column.as_str(), value));
        }
        let id = id.ok_or_else(|| Error::internal("a group insert needs a text id"))?;
        let table = <A as ActiveModelTrait>::Entity::default().table_name();
        Ok(Self {
            table,
            id,
            columns,
            statement: <A as ActiveModelTrait>::Entity::insert(active).into_query(),
        })
    }
}

/// One column of a group statement's rows as the typed array PostgreSQL
/// unnests (`$n::TEXT[]`…), sent in the binary protocol: no text to parse
/// on either side. (JSON parameters cost PostgreSQL a validating parse and
/// then a second one, a quarter of its CPU on the ALLOW path.) Only the
/// types our group-written tables use; others are refused, not guessed at.
#[derive(Debug)]
enum ColumnArray {
    Bool(Vec<Option<bool>>),
    Int2(Vec<Option<i16>>),
    Int4(Vec<Option<i32>>),
    Int8(Vec<Option<i64>>),
    Text(Vec<Option<String>>),
    Bytea(Vec<Option<Vec<u8>>>),
}

impl ColumnArray {
    /// An empty array of `value`'s type, for `capacity` rows.
    fn like(value: &sea_orm::Value, capacity: usize) -> Result<Self> {
        use sea_orm::Value as V;
        Ok(match value {
            V::Bool(_) => Self::Bool(Vec::with_capacity(capacity)),
            V::SmallInt(_) => Self::Int2(Vec::with_capacity(capacity)),
            V::Int(_) => Self::Int4(Vec::with_capacity(capacity)),
            V::BigInt(_) => Self::Int8(Vec::with_capacity(capacity)),
            V::String(_) => Self::Text(Vec::with_capacity(capacity)),
            V::Bytes(_) => Self::Bytea(Vec::with_capacity(capacity)),
            other => {
                return Err(Error::internal(format!(
                    "a group insert cannot carry {other:?}"
                )));
            }
        })
    }

    fn push(&mut self, value: sea_orm::Value) -> Result<()> {
        use sea_orm::Value as V;
        match (self, value) {
            (Self::Bool(values), V::Bool(v)) => values.push(v),
            (Self::Int2(values), V::SmallInt(v)) => values.push(v),
            (Self::Int4(values), V::Int(v)) => values.push(v),
            (Self::Int8(values), V::BigInt(v)) => values.push(v),
            (Self::Text(values), V::String(v)) => values.push(v),
            (Self::Bytea(values), V::Bytes(v)) => values.push(v),
            (column, value) => {
                return Err(Error::internal(format!(
                    "a group insert mixes {value:?} into {}",
                    column.sql_type()
                )));
            }
        }
        Ok(())
    }

    const fn sql_type(&self) -> &'static str {
        match self {
            Self::Bool(_) => "BOOLEAN[]",
            Self::Int2(_) => "SMALLINT[]",
            Self::Int4(_) => "INTEGER[]",
            Self::Int8(_) => "BIGINT[]",
            Self::Text(_) => "TEXT[]",
            Self::Bytea(_) => "BYTEA[]",
        }
    }

    fn bind(self, query: PgQuery<'_>) -> PgQuery<'_> {
        match self {
            Self::Bool(values) => query.bind(values),
            Self::Int2(values) => query.bind(values),
            Self::Int4(values) => query.bind(values),
            Self::Int8(values) => query.bind(values),
            Self::Text(values) => query.bind(values),
            Self::Bytea(values) => query.bind(values),
        }
    }
}

/// A statement sent with sqlx directly, its parameters bound one by one.
type PgQuery<'q> =
    sea_orm::sqlx::query::Query<'q, sea_orm::sqlx::Postgres, sea_orm::sqlx::postgres::PgArguments>;

/// Gathers rows (each a list of column values in one fixed order) into
/// one [`ColumnArray`] per column.
#[derive(Debug)]
struct Columns {
    arrays: Vec<ColumnArray>,
}

impl Columns {
    /// No rows yet, of the columns whose types `types` shows (their values
    /// are ignored), for about `capacity` rows.
    fn of_types<'v>(
        types: impl IntoIterator<Item = &'v sea_orm::Value>,
        capacity: usize,
    ) -> Result<Self> {
        Ok(Self {
            arrays: types
                .into_iter()
                .map(|value| ColumnArray::like(value, capacity))
                .collect::<Result<_>>()?,
        })
    }

    fn push(&mut self, row: impl IntoIterator<Item = sea_orm::Value>) -> Result<()> {
        let mut width = 0;
        for (array, value) in self.arrays.iter_mut().zip(row) {
            array.push(value)?;
            width += 1;
        }
        if width != self.arrays.len() {
            return Err(Error::internal("a group insert row of another width"));
        }
        Ok(())
    }
}

/// How a [`Unit`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// Its row and events are committed.
    Inserted,
    /// Its row met an existing one on a unique key (the same idempotency
    /// key, stored first by another request), or its requester is frozen
    /// ([`requester_gate`]): nothing of it was written.
    Conflict,
}

/// The types of a group statement's event records: the unit's `gate` (the
/// id of its row, if it has one), the event's place `ord` in the group,
/// then [`EVENT_COLUMNS`] as the entity declares them (each a NULL of its
/// type, for [`Columns::of_types`]).
fn event_record_types() -> Result<Vec<sea_orm::Value>> {
    use sea_orm::ColumnTrait as _;
    use sea_orm::sea_query::ColumnType;
    let mut types = vec![sea_orm::Value::String(None), sea_orm::Value::BigInt(None)];
    for column in EVENT_COLUMNS {
        types.push(match column.def().get_column_type() {
            ColumnType::BigInteger => sea_orm::Value::BigInt(None),
            ColumnType::String(_) | ColumnType::Text => sea_orm::Value::String(None),
            other => {
                return Err(Error::internal(format!(
                    "an audit event column of type {other:?}"
                )));
            }
        });
    }
    Ok(types)
}

/// PostgreSQL: one statement writing every unit of a group, which is its
/// own transaction (one round trip, one commit). Its text depends only on
/// which tables the group inserts rows into, so each connection parses and
/// plans it once or a few times, whatever the group's size; the rows and
/// events travel column by column, each column one typed array parameter:
///
/// ```sql
/// WITH r0 AS (INSERT INTO delegations (id, …) SELECT * FROM
///               unnest($1::TEXT[], …, $25::BIGINT[])
///             ON CONFLICT DO NOTHING RETURNING id),
///      kept AS (SELECT id FROM r0 UNION ALL …),
///      e AS (INSERT INTO audit_events (…) SELECT … FROM unnest($26::TEXT[], …) AS v(gate, ord, …)
///            WHERE v.gate IS NULL OR v.gate IN (SELECT id FROM kept)
///            ORDER BY v.ord RETURNING id, tenant_id),
///      p AS (INSERT INTO audit_pending SELECT id, tenant_id FROM e)
/// SELECT id FROM kept
/// ```
///
/// A unit's events are gated on its row's id, so they exist only if its row
/// was inserted; a row that conflicts writes nothing of its unit and leaves
/// the others alone. The answer is the ids of the rows inserted.
fn group_statement(clock: &dyn Clock, units: &[Unit]) -> Result<(String, Vec<ColumnArray>)> {
    let mut tables: Vec<(&'static str, Vec<&'static str>, Columns)> = Vec::new();
    let event_count = units.iter().map(|unit| unit.events.len()).sum();
    let mut events = Columns::of_types(&event_record_types()?, event_count)?;
    let mut ord = 0_i64;
    for unit in units {
        let gate = match &unit.insert {
            Some(insert) => {
                let values = insert.columns.iter().map(|(_, value)| value.clone());
                match tables.iter_mut().find(|(table, ..)| *table == insert.table) {
                    Some((.., rows)) => rows.push(values)?,
                    None => {
                        let names = insert.columns.iter().map(|(name, _)| *name).collect();
                        let types = insert.columns.iter().map(|(_, value)| value);
                        let mut rows = Columns::of_types(types, units.len())?;
                        rows.push(values)?;
                        tables.push((insert.table, names, rows));
                    }
                }
                Some(insert.id.clone())
            }
            None => None,
        };
        for event in &unit.events {
            let record = [sea_orm::Value::String(gate.clone()), ord.into()];
            events.push(record.into_iter().chain(event_values(clock, event)?))?;
            ord += 1;
        }
    }
    if tables.is_empty() && event_count == 0 {
        return Err(Error::internal("an empty group commit"));
    }
    // The same tables in the same order give the same text.
    tables.sort_by_key(|(table, ..)| *table);
    let mut sql = String::from("WITH ");
    let mut arrays: Vec<ColumnArray> = Vec::new();
    let mut kept = Vec::with_capacity(tables.len());
    for (index, (table, names, rows)) in tables.into_iter().enumerate() {
        let unnest = unnest_of(rows, &mut arrays);
        let names = names.join(", ");
        let gate = requester_gate(table)
            .map(|(agent, tenant)| {
                format!(
                    " WHERE NOT EXISTS (SELECT 1 FROM agents a WHERE a.id = u.{agent} \
                       AND a.frozen_at IS NOT NULL) \
                     AND NOT EXISTS (SELECT 1 FROM tenants t WHERE t.id = u.{tenant} \
                       AND t.traffic_frozen_at IS NOT NULL)"
                )
            })
            .unwrap_or_default();
        sql.push_str(&format!(
            "r{index} AS (INSERT INTO {table} ({names}) SELECT * FROM {unnest} AS u({names}){gate} \
             ON CONFLICT DO NOTHING RETURNING id), ",
        ));
        kept.push(format!("SELECT id FROM r{index}"));
    }
    if kept.is_empty() {
        kept.push("SELECT NULL::TEXT AS id WHERE FALSE".to_owned());
    }
    let unnest = unnest_of(events, &mut arrays);
    let columns = EVENT_COLUMNS.map(|column| column.as_str()).join(", ");
    sql.push_str(&format!(
        "kept AS ({}), \
         e AS (INSERT INTO audit_events ({columns}) \
           SELECT {columns} FROM {unnest} AS v(gate, ord, {columns}) \
           WHERE v.gate IS NULL OR v.gate IN (SELECT id FROM kept) \
           ORDER BY v.ord RETURNING id, tenant_id), \
         p AS (INSERT INTO audit_pending (event_row_id, tenant_id) SELECT id, tenant_id FROM e) \
         SELECT id FROM kept",
        kept.join(" UNION ALL "),
    ));
    Ok((sql, arrays))
}

/// The requester columns (agent, tenant) of a table whose rows a frozen
/// requester may not add (the kill switch, `domain::kill_switch`): an ACTIVE
/// delegation or a signature is stored only if, as the storing statement or
/// transaction sees it, neither its agent nor its tenant's traffic is
/// frozen. A row refused so is reported as [`Written::Conflict`]; its caller
/// finds no row of its idempotency key and asks the database why.
pub fn requester_gate(table: &str) -> Option<(&'static str, &'static str)> {
    match table {
        "delegations" => Some(("requesting_agent_id", "requesting_tenant_id")),
        "signatures" => Some(("requester_subject", "tenant_id")),
        _ => None,
    }
}

/// `unnest($k::T[], …)` of `columns`, whose arrays join `arrays` (the
/// statement's parameters so far, numbered from 1).
fn unnest_of(columns: Columns, arrays: &mut Vec<ColumnArray>) -> String {
    let mut params = Vec::with_capacity(columns.arrays.len());
    for array in columns.arrays {
        params.push(format!("${}::{}", arrays.len() + 1, array.sql_type()));
        arrays.push(array);
    }
    format!("unnest({})", params.join(", "))
}

/// `INSERT INTO audit_events … SELECT … UNION ALL … RETURNING id,
/// tenant_id` of `events` (each row selected `FROM gate` when given, so it
/// exists only if the gate returned a row); `None` for no events.
fn events_insert(
    clock: &dyn Clock,
    events: &[NewEvent],
    gate: Option<&str>,
) -> Result<Option<InsertStatement>> {
    let mut rows: Option<SelectStatement> = None;
    for event in events {
        let mut row = Query::select();
        row.exprs(event_values(clock, event)?.into_iter().map(Expr::val));
        if let Some(gate) = gate {
            row.from(Alias::new(gate));
        }
        union_all(&mut rows, row);
    }
    let Some(rows) = rows else { return Ok(None) };
    let mut insert = Query::insert();
    insert
        .into_table(audit_event::Entity)
        .columns(EVENT_COLUMNS)
        .select_from(rows)
        .map_err(Error::internal)?
        .returning(
            Query::returning().columns([audit_event::Column::Id, audit_event::Column::TenantId]),
        );
    Ok(Some(insert))
}

/// The events the common table expression `name` inserted.
fn inserted_events(name: &str) -> SelectStatement {
    Query::select()
        .columns([Alias::new("id"), Alias::new("tenant_id")])
        .from(Alias::new(name))
        .to_owned()
}

/// The pending rows of the events `appended` selects.
fn pending_insert(appended: SelectStatement) -> Result<InsertStatement> {
    Ok(Query::insert()
        .into_table(Alias::new("audit_pending"))
        .columns([Alias::new("event_row_id"), Alias::new("tenant_id")])
        .select_from(appended)
        .map_err(Error::internal)?
        .to_owned())
}

/// PostgreSQL: several writes of one transaction in one round trip. Each of
/// `writes` becomes a common table expression under its name, `events` and
/// their pending rows two more (`e`, `p`), and the statement's result is
/// `last`, which may select from the writes' `RETURNING`. Every write runs
/// whether or not `last` reads it; none sees another's rows. With `gate`
/// (the name of one of the writes), each event is written once per row that
/// write returned: only if it changed something.
pub fn with_events(
    clock: &dyn Clock,
    writes: Vec<(String, SubQueryStatement)>,
    events: &[NewEvent],
    gate: Option<&str>,
    last: SelectStatement,
) -> Result<Statement> {
    let mut with = WithQuery::new();
    for (name, write) in writes {
        with.cte(cte(write, &name));
    }
    if let Some(insert) = events_insert(clock, events, gate)? {
        with.cte(cte(insert, "e"));
        with.cte(cte(pending_insert(inserted_events("e"))?, "p"));
    }
    let (sql, values) = with.query(last).build(PostgresQueryBuilder);
    Ok(Statement::from_sql_and_values(
        DbBackend::Postgres,
        sql,
        values.0,
    ))
}

/// The common table expression `name AS (query)`. (Built in place: the
/// builders' `to_owned()` clones, and a group statement's expressions
/// carry every bound value.)
fn cte(query: impl Into<SubQueryStatement>, name: &str) -> CommonTableExpression {
    let mut cte = CommonTableExpression::new();
    cte.query(query).table_name(Alias::new(name));
    cte
}

fn union_all(acc: &mut Option<SelectStatement>, next: SelectStatement) {
    match acc {
        Some(first) => {
            first.union(UnionType::All, next);
        }
        None => *acc = Some(next),
    }
}

/// PostgreSQL: writes `units` in one statement and says how each ended.
async fn write_group(
    db: &DatabaseConnection,
    clock: &dyn Clock,
    units: &[Unit],
) -> Result<Vec<Written>> {
    use sea_orm::sqlx::Row as _;
    let (sql, arrays) = group_statement(clock, units)?;
    // Straight to sqlx: sea-query binds arrays only without NULLs. The
    // statement is prepared once per connection (sqlx's statement cache).
    let mut query = sea_orm::sqlx::query(sea_orm::sqlx::AssertSqlSafe(sql));
    for array in arrays {
        query = array.bind(query);
    }
    let rows = query
        .fetch_all(db.get_postgres_connection_pool())
        .await
        .map_err(sqlx_error)?;
    let mut kept = std::collections::HashSet::with_capacity(rows.len());
    for row in rows {
        kept.insert(row.try_get::<String, _>("id").map_err(sqlx_error)?);
    }
    Ok(units
        .iter()
        .map(|unit| match &unit.insert {
            Some(insert) if !kept.contains(&insert.id) => Written::Conflict,
            _ => Written::Inserted,
        })
        .collect())
}

/// A sqlx error as sea-orm reports it, so that it is classified (unique
/// violation, unavailable database) as every other database error is.
fn sqlx_error(err: sea_orm::sqlx::Error) -> Error {
    sea_orm::DbErr::Query(sea_orm::RuntimeErr::SqlxError(Arc::new(err))).into()
}

/// SQLite (one writer at a time anyway): one transaction per unit.
async fn write_one(db: &DatabaseConnection, clock: &dyn Clock, unit: &Unit) -> Result<Written> {
    let txn = crate::store::begin(db).await?;
    if let Some(insert) = &unit.insert
        && let Some((agent, tenant)) = requester_gate(insert.table)
    {
        let value_of = |name: &str| {
            insert
                .columns
                .iter()
                .find(|(column, _)| *column == name)
                .map(|(_, value)| value.clone())
                .ok_or_else(|| Error::internal(format!("a gated insert without {name}")))
        };
        let frozen = txn
            .query_one_raw(Statement::from_sql_and_values(
                DbBackend::Sqlite,
                "SELECT EXISTS (SELECT 1 FROM agents WHERE id = ? AND frozen_at IS NOT NULL) \
                   OR EXISTS (SELECT 1 FROM tenants WHERE id = ? AND traffic_frozen_at IS NOT NULL) \
                   AS frozen",
                [value_of(agent)?, value_of(tenant)?],
            ))
            .await?
            .map(|row| row.try_get::<bool>("", "frozen"))
            .transpose()?
            .unwrap_or(false);
        if frozen {
            txn.rollback().await?;
            return Ok(Written::Conflict);
        }
    }
    if let Some(insert) = &unit.insert {
        match txn.execute(&insert.statement).await {
            Ok(_) => {}
            Err(err) if crate::error::is_unique_violation(&err) => {
                txn.rollback().await?;
                return Ok(Written::Conflict);
            }
            Err(err) => return Err(err.into()),
        }
    }
    append_all(&txn, clock, unit.events.clone()).await?;
    txn.commit().await?;
    Ok(Written::Inserted)
}

/// Group commit for the hottest writes: stand-alone events (refusals,
/// reads) and rows written with their events in one go (ALLOW and BLOCK
/// delegations, signatures). Callers hand a [`Unit`] to a queue and wait
/// for its commit; a free writer task takes whatever queued while the
/// others were writing and commits it all in one statement. Nobody waits for a timer —
/// a lone caller is written at once — and nobody is answered before their
/// unit is durable; under load, many callers share one round trip, one
/// parse and one commit.
#[derive(Debug, Clone)]
pub struct Recorder {
    tx: tokio::sync::mpsc::Sender<Queued>,
}

/// The group writers' shared state: how many are writing a group, and a
/// signal when one is done.
#[derive(Debug, Default)]
struct Writing {
    busy: std::sync::atomic::AtomicUsize,
    finished: Notify,
    /// A writer starts a group while another is writing only once this
    /// many units queued (`audit_group_overlap_min`): a smaller group would
    /// only add a statement's fixed work (executor start-up, commit, WAL
    /// flush) where waiting for the other writer would let it grow.
    overlap_min: usize,
}

/// One writer's group in flight: counted in [`Writing::busy`] until
/// dropped (also if the writer panics), which signals the others.
struct Busy<'a>(&'a Writing);

impl<'a> Busy<'a> {
    fn start(writing: &'a Writing) -> Self {
        writing
            .busy
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Self(writing)
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0
            .busy
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        self.0.finished.notify_one();
    }
}

/// How often a waiting writer looks at the queue again.
const OVERLAP_POLL: Duration = Duration::from_millis(1);

type Queued = (
    Unit,
    tokio::sync::oneshot::Sender<std::result::Result<Written, ()>>,
);

/// The sealer vacuums `audit_pending` (PostgreSQL) after sealing this many
/// events since its last vacuum: it holds at most about as many dead rows.
const VACUUM_AFTER_SEALED: u64 = 20_000;

/// How long the sealer lets events gather after a round that sealed some.
const SEAL_GATHER: Duration = Duration::from_millis(10);

/// About the most values one group statement carries (an event has 11, a
/// delegation row about 25): a bound on a group's size, and so on how long
/// one commit keeps its callers waiting.
const GROUP_MAX_PARAMS: usize = 30_000;

impl Recorder {
    /// Starts `writers` writer tasks (at least one) on `db`.
    pub fn start(
        db: DatabaseConnection,
        clock: Arc<dyn Clock>,
        wake: Arc<Notify>,
        writers: u32,
        overlap_min: u32,
    ) -> Self {
        let (tx, rx) = tokio::sync::mpsc::channel::<Queued>(4_096);
        let rx = Arc::new(tokio::sync::Mutex::new(rx));
        let writing = Arc::new(Writing {
            overlap_min: usize::try_from(overlap_min.max(1)).unwrap_or(usize::MAX),
            ..Writing::default()
        });
        for _ in 0..writers.max(1) {
            tokio::spawn(Self::run(
                db.clone(),
                clock.clone(),
                wake.clone(),
                rx.clone(),
                writing.clone(),
            ));
        }
        Self { tx }
    }

    /// Appends `events` durably (returns after their commit).
    pub async fn record(&self, events: Vec<NewEvent>) -> Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        self.write(Unit {
            insert: None,
            events,
        })
        .await
        .map(|_| ())
    }

    /// Inserts `active` (every column set, a text `id`) and appends
    /// `events` atomically (returns after the commit), or nothing when the
    /// row conflicts on a unique key.
    pub async fn insert_with_events<A: ActiveModelTrait>(
        &self,
        active: A,
        events: Vec<NewEvent>,
    ) -> Result<Written> {
        self.write(Unit {
            insert: Some(RowInsert::of(active)?),
            events,
        })
        .await
    }

    async fn write(&self, unit: Unit) -> Result<Written> {
        let (done, committed) = tokio::sync::oneshot::channel();
        self.tx
            .send((unit, done))
            .await
            .map_err(|_| Error::internal("audit recorder stopped"))?;
        match committed.await {
            Ok(Ok(written)) => Ok(written),
            // The statement's error was logged by the writer; a failed
            // group commit is the database's (unreachable, full), and the
            // caller may retry: nothing was written.
            Ok(Err(())) => Err(Error::Unavailable {
                reason: vaultguard_proto::v1::ErrorReason::Unavailable,
                message: "database unavailable; retry later".to_owned(),
                metadata: std::collections::HashMap::new(),
            }),
            Err(_) => Err(Error::internal("audit recorder stopped")),
        }
    }

    async fn run(
        db: DatabaseConnection,
        clock: Arc<dyn Clock>,
        wake: Arc<Notify>,
        rx: Arc<tokio::sync::Mutex<tokio::sync::mpsc::Receiver<Queued>>>,
        writing: Arc<Writing>,
    ) {
        loop {
            // The queue is held only while a group is taken from it, so the
            // other writers take the next group while this one commits.
            let (group, busy) = {
                let mut rx = rx.lock().await;
                let Some(first) = rx.recv().await else { return };
                // Overlap another writer's statement only with a group worth
                // a statement of its own; else let the queue gather until
                // that writer is done.
                while writing.busy.load(std::sync::atomic::Ordering::Acquire) > 0
                    && rx.len() + 1 < writing.overlap_min
                {
                    tokio::select! {
                        () = writing.finished.notified() => {}
                        () = tokio::time::sleep(OVERLAP_POLL) => {}
                    }
                }
                let busy = Busy::start(&writing);
                let mut params = unit_params(&first.0);
                let mut group = vec![first];
                while params < GROUP_MAX_PARAMS {
                    match rx.try_recv() {
                        Ok(next) => {
                            params += unit_params(&next.0);
                            group.push(next);
                        }
                        Err(_) => break,
                    }
                }
                (group, busy)
            };
            let (units, waiters): (Vec<Unit>, Vec<_>) = group.into_iter().unzip();
            let results = Self::write_isolated(&db, clock.as_ref(), units).await;
            drop(busy);
            if results.iter().any(Result::is_ok) {
                wake.notify_one();
            }
            for (done, result) in waiters.into_iter().zip(results) {
                let _ = done.send(result);
            }
        }
    }

    /// Writes the group; if the database refuses the group statement
    /// (nothing of it was written), each unit alone, so that one unit it
    /// rejects (say, a value a constraint forbids) fails only its own
    /// caller. If the database cannot be reached, the whole group fails.
    async fn write_isolated(
        db: &DatabaseConnection,
        clock: &dyn Clock,
        units: Vec<Unit>,
    ) -> Vec<std::result::Result<Written, ()>> {
        let failed = |err: Error| tracing::error!(error = %err, "audit group commit failed");
        // SQLite: a transaction per unit, each with its own outcome (a
        // failure must not send units already committed round again).
        if db.get_database_backend() != DbBackend::Postgres {
            let mut results = Vec::with_capacity(units.len());
            for unit in &units {
                results.push(write_one(db, clock, unit).await.map_err(failed));
            }
            return results;
        }
        match write_group(db, clock, &units).await {
            Ok(written) => written.into_iter().map(Ok).collect(),
            // Unit by unit only when the database refused the statement:
            // an unreachable one would refuse each unit in turn, each
            // after the pool's acquire timeout, while the queue waits.
            Err(err) if units.len() == 1 || crate::error::is_database_unavailable(&err) => {
                failed(err);
                units.iter().map(|_| Err(())).collect()
            }
            Err(err) => {
                tracing::warn!(error = %err, "group commit failed; writing its units one by one");
                let mut results = Vec::with_capacity(units.len());
                for unit in &units {
                    results.push(
                        match write_group(db, clock, std::slice::from_ref(unit)).await {
                            Ok(written) => written.first().copied().ok_or(()),
                            Err(err) => {
                                failed(err);
                                Err(())
                            }
                        },
                    );
                }
                results
            }
        }
    }
}

/// About how many values `unit` adds to a group statement's arrays.
fn unit_params(unit: &Unit) -> usize {
    unit.events.len() * EVENT_COLUMNS.len() + if unit.insert.is_some() { 32 } else { 0 }
}

/// Remembers which repeated reads were audited lately, so that a read made
/// again and again (a resource server verifying the same token on every
/// request it serves) writes one event per window instead of one per call.
/// A key names who read what ([`crate::state::AppState::record_repeated`]);
/// it is due again `window` after its last recorded event. Memory is
/// bounded: past [`Debounce::MAX_KEYS`] keys the map is emptied, which only
/// makes some keys due early.
#[derive(Debug)]
pub struct Debounce {
    window_ms: i64,
    last: std::sync::Mutex<std::collections::HashMap<String, i64>>,
}

impl Debounce {
    const MAX_KEYS: usize = 100_000;

    /// A window of `window_seconds`; 0 makes every read due.
    pub fn new(window_seconds: u32) -> Self {
        Self {
            window_ms: i64::from(window_seconds) * 1_000,
            last: std::sync::Mutex::default(),
        }
    }

    /// Whether `key` has no event recorded within the window before `now`.
    pub fn due(&self, key: &str, now: crate::clock::Millis) -> bool {
        if self.window_ms == 0 {
            return true;
        }
        self.last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(key)
            .is_none_or(|at| now.saturating_sub(*at) >= self.window_ms)
    }

    /// Notes that an event for `key` was recorded at `now`; called after its
    /// commit, so a failed write leaves the key due.
    pub fn recorded(&self, key: String, now: crate::clock::Millis) {
        if self.window_ms == 0 {
            return;
        }
        let mut last = self
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if last.len() >= Self::MAX_KEYS {
            last.clear();
        }
        last.insert(key, now);
    }
}

/// Bounds what an outsider can make VaultGuard write into a tenant's
/// append-only log by being refused (issue 23, item 8): IssueToken with a
/// wrong secret for a known `client_id` (`auth.token_refused`), NOT_FOUND
/// answers (`auth.not_found`, `delegation.not_found`), the OAuth callback
/// with a spent or expired `state` (`connection.callback_refused`). Each
/// such refusal was one event; a loop of them grew the log without bound.
///
/// Refusals are grouped by a key naming who was refused and where (the
/// `client_id`; the principal and method; the connection). A key's first
/// `per_window` refusals of a window (`refusal_audit_window_seconds`,
/// starting at its first recorded event) are recorded as before; later
/// ones in the window are counted, not written. The next event recorded for
/// the key carries the count in its details as `suppressed`: the first
/// refusal after the window, or, if none comes, the latest suppressed
/// refusal itself, written when the window is over by
/// [`run_refusal_flusher`] (so its `suppressed` counts the ones before it).
/// Every recorded event is a real refusal, and the refusals of a key are
/// its events plus the sum of their `suppressed`. A flood of one key thus
/// writes at most `per_window + 1` events a window, and a suppressed
/// refusal waits for no database write at all.
///
/// Per process: N replicas record up to N times as many. Memory is bounded
/// by [`RefusalDebounce::MAX_KEYS`]: keys whose window is over with nothing
/// left to report are dropped every second; past the cap new keys are
/// recorded without debouncing (the log stays complete).
#[derive(Debug)]
pub struct RefusalDebounce {
    window_ms: i64,
    per_window: u32,
    keys: std::sync::Mutex<std::collections::HashMap<String, RefusalWindow>>,
}

/// One key's current window.
#[derive(Debug)]
struct RefusalWindow {
    /// When the window began: the key's first recorded event in it.
    started: crate::clock::Millis,
    /// Events of the key recorded in the window.
    recorded: u32,
    /// Refusals of the key not recorded since its last recorded event.
    suppressed: u64,
    /// The latest of those, written by the flusher if no later refusal
    /// carries the count.
    latest: Option<Vec<NewEvent>>,
}

/// Refusal events to write now, and the count of earlier refusals of their
/// key their details carry (`suppressed`).
#[derive(Debug)]
pub struct AdmittedRefusal {
    pub events: Vec<NewEvent>,
    pub suppressed: u64,
}

/// `events` with `suppressed` in their details (when not 0).
fn with_suppressed(mut events: Vec<NewEvent>, suppressed: u64) -> Vec<NewEvent> {
    if suppressed > 0 {
        for event in &mut events {
            if let Value::Object(details) = &mut event.details {
                details.insert("suppressed".to_owned(), Value::from(suppressed));
            }
        }
    }
    events
}

impl RefusalDebounce {
    pub const MAX_KEYS: usize = 100_000;

    /// Windows of `window_seconds` (0: every refusal is recorded) holding
    /// `per_window` recorded events each (at least 1).
    pub fn new(window_seconds: u32, per_window: u32) -> Self {
        Self {
            window_ms: i64::from(window_seconds) * 1_000,
            per_window: per_window.max(1),
            keys: std::sync::Mutex::default(),
        }
    }

    fn keys(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, RefusalWindow>> {
        self.keys
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A refusal of `key` at `now`, recorded as `events`: `Some` with the
    /// events to write (carrying the count of the refusals suppressed
    /// before them), or `None` when it is only counted.
    pub fn admit(
        &self,
        key: &str,
        now: crate::clock::Millis,
        events: Vec<NewEvent>,
    ) -> Option<AdmittedRefusal> {
        if self.window_ms == 0 {
            return Some(AdmittedRefusal {
                events,
                suppressed: 0,
            });
        }
        let mut keys = self.keys();
        if !keys.contains_key(key) && keys.len() >= Self::MAX_KEYS {
            let window_ms = self.window_ms;
            keys.retain(|_, w| w.suppressed > 0 || now.saturating_sub(w.started) < window_ms);
            if keys.len() >= Self::MAX_KEYS {
                tracing::warn!("refusal debounce full; recording without it");
                return Some(AdmittedRefusal {
                    events,
                    suppressed: 0,
                });
            }
        }
        let window = keys.entry(key.to_owned()).or_insert(RefusalWindow {
            started: now,
            recorded: 0,
            suppressed: 0,
            latest: None,
        });
        if now.saturating_sub(window.started) >= self.window_ms {
            window.started = now;
            window.recorded = 0;
        }
        if window.recorded >= self.per_window {
            window.suppressed += 1;
            window.latest = Some(events);
            return None;
        }
        window.recorded += 1;
        let suppressed = std::mem::take(&mut window.suppressed);
        window.latest = None;
        Some(AdmittedRefusal {
            events: with_suppressed(events, suppressed),
            suppressed,
        })
    }

    /// The write of an admitted refusal of `key` failed: its place in the
    /// window and the count it carried return.
    pub fn give_back(&self, key: &str, suppressed: u64) {
        if let Some(window) = self.keys().get_mut(key) {
            window.recorded = window.recorded.saturating_sub(1);
            window.suppressed += suppressed;
        }
    }

    /// The keys whose window is over with refusals left unrecorded, each
    /// with its latest refusal carrying the count of the others (that
    /// event opens the key's next window). Forgets keys with nothing left.
    pub fn due_summaries(&self, now: crate::clock::Millis) -> Vec<(String, AdmittedRefusal)> {
        let mut due = Vec::new();
        let window_ms = self.window_ms;
        let mut keys = self.keys();
        keys.retain(|key, window| {
            if now.saturating_sub(window.started) < window_ms {
                return true;
            }
            let Some(latest) = window.latest.take() else {
                // Over, and nothing to report: the same as no entry.
                return false;
            };
            let suppressed = window.suppressed.saturating_sub(1);
            *window = RefusalWindow {
                started: now,
                recorded: 1,
                suppressed: 0,
                latest: None,
            };
            due.push((
                key.clone(),
                AdmittedRefusal {
                    events: with_suppressed(latest, suppressed),
                    suppressed,
                },
            ));
            true
        });
        due
    }

    /// A summary of `key` from [`Self::due_summaries`] was not written:
    /// it waits for the next round.
    fn put_back(&self, key: String, summary: AdmittedRefusal) {
        let mut keys = self.keys();
        let window = keys.entry(key).or_insert(RefusalWindow {
            started: 0,
            recorded: 0,
            suppressed: 0,
            latest: None,
        });
        // Due again at once: the next round (or the key's next refusal)
        // reports it.
        window.started = crate::clock::Millis::MIN;
        window.suppressed += summary.suppressed + 1;
        window.latest = Some(summary.events);
    }
}

/// Writes the refusal summaries of [`RefusalDebounce`] whose window is
/// over, every second until the server stops, then every one still
/// pending (a stopping server leaves no count unrecorded if the database
/// takes it).
pub async fn run_refusal_flusher(
    refusals: Arc<RefusalDebounce>,
    recorder: Recorder,
    clock: Arc<dyn Clock>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stopping = tokio::select! {
            _ = tick.tick() => false,
            _ = stop.changed() => true,
        };
        let now = if stopping {
            crate::clock::Millis::MAX
        } else {
            clock.now_millis()
        };
        for (key, summary) in refusals.due_summaries(now) {
            if let Err(err) = recorder.record(summary.events.clone()).await {
                tracing::warn!(error = %err, "refusal summary not recorded; retrying");
                refusals.put_back(key, summary);
            }
        }
        if stopping {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::{
        AuditCtx, ColumnArray, Debounce, Outcome, RefusalDebounce, RowInsert, Unit, chain_hash,
        group_statement,
    };
    use crate::clock::SystemClock;
    use crate::crypto::sha256_hex;
    use crate::store::entities::{audit_event, signature};

    /// A signature row (`signed`: with the signature bytes and recovery id,
    /// else NULL there) and `events` events.
    fn signature_unit(id: &str, signed: bool, events: usize) -> Unit {
        let row = signature::Model {
            id: id.to_owned(),
            tenant_id: "ten_a".to_owned(),
            key_id: "key_a".to_owned(),
            requester_subject: "agt_a".to_owned(),
            idempotency_key: format!("key-{id}"),
            payload_hash: "00".to_owned(),
            status: signature::Status::Signed,
            signature: signed.then(|| vec![1, 2, 3]),
            delegation_id: None,
            created_at: 1,
            updated_at: 1,
            request_hash: "ab".to_owned(),
            scheme: "digest".to_owned(),
            decision: "{}".to_owned(),
            recovery_id: signed.then_some(1),
            signed_at: None,
        };
        Unit {
            insert: Some(RowInsert::of(signature::ActiveModel::from(row)).unwrap()),
            events: (0..events)
                .map(|_| {
                    AuditCtx::system("req_1").event(
                        "ten_a",
                        "key.signed",
                        vec![id.to_owned()],
                        Outcome::Success,
                        json!({"n": 1}),
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn a_group_statement_has_one_text_per_set_of_tables_whatever_its_size() {
        let (one, one_arrays) =
            group_statement(&SystemClock, &[signature_unit("sig_1", true, 1)]).unwrap();
        let units: Vec<Unit> = (0..5)
            .map(|i| signature_unit(&format!("sig_{i}"), i % 2 == 0, i))
            .collect();
        let (many, many_arrays) = group_statement(&SystemClock, &units).unwrap();
        assert_eq!(one, many);
        // A parameter per signature column (16), then per event field (13).
        assert_eq!(one_arrays.len(), 16 + 13);
        assert_eq!(many_arrays.len(), 16 + 13);
        assert!(many.contains("unnest($1::TEXT[]"), "{many}");

        // Each column keeps its rows in order, NULLs included.
        let bytes: Vec<_> = many_arrays
            .iter()
            .filter_map(|array| match array {
                ColumnArray::Bytea(values) => Some(values.clone()),
                _ => None,
            })
            .collect();
        let signed = Some(vec![1, 2, 3]);
        assert_eq!(
            bytes,
            [vec![signed.clone(), None, signed.clone(), None, signed]]
        );
        // 0 + 1 + 2 + 3 + 4 events, each gated on its unit's row id.
        let gates = many_arrays.get(16).unwrap();
        let ColumnArray::Text(gates) = gates else {
            panic!("gate is not text: {gates:?}")
        };
        let expected: Vec<_> = (1..5)
            .flat_map(|i| std::iter::repeat_n(Some(format!("sig_{i}")), i))
            .collect();
        assert_eq!(gates, &expected);

        // Events alone: no row table, the same event fields.
        let mut lone = signature_unit("sig_9", true, 2);
        lone.insert = None;
        let (events_only, arrays) = group_statement(&SystemClock, &[lone]).unwrap();
        assert!(!events_only.contains("signatures"), "{events_only}");
        assert_eq!(arrays.len(), 13);
        assert!(group_statement(&SystemClock, &[]).is_err());
    }

    #[test]
    fn a_chain_hash_is_over_the_same_text_a_json_array_of_the_fields_gives() {
        let event = audit_event::Model {
            id: 7,
            event_id: "evt_\u{1F600}\"quoted\"".to_owned(),
            tenant_id: "ten_a\\b".to_owned(),
            occurred_at: -1,
            actor_kind: "agent".to_owned(),
            actor_subject: "agt_\n\t\u{7}".to_owned(),
            actor_tenant_id: "ten_b".to_owned(),
            event_type: "delegation.decided".to_owned(),
            subject_ids: r#"["dlg_1","agt_2"]"#.to_owned(),
            outcome: "success".to_owned(),
            request_id: "</script>".to_owned(),
            details: r#"{"a":"é\u0000"}"#.to_owned(),
        };
        let prev = "00ff";
        let expected = json!([
            event.tenant_id,
            i64::MAX,
            event.event_id,
            event.occurred_at,
            event.actor_kind,
            event.actor_subject,
            event.actor_tenant_id,
            event.event_type,
            event.subject_ids,
            event.outcome,
            event.request_id,
            event.details,
            prev,
        ]);
        assert_eq!(
            chain_hash(&event, i64::MAX, prev).expect("hash"),
            sha256_hex(expected.to_string().as_bytes())
        );
    }

    #[test]
    fn a_pair_is_due_once_per_window() {
        let debounce = Debounce::new(60);
        assert!(debounce.due("agt_1|dlg_1", 1_000));
        debounce.recorded("agt_1|dlg_1".to_owned(), 1_000);
        assert!(!debounce.due("agt_1|dlg_1", 60_999));
        assert!(debounce.due("agt_1|dlg_1", 61_000));
        // Another reader, or another object, is its own key.
        assert!(debounce.due("agt_2|dlg_1", 2_000));
        assert!(debounce.due("agt_1|dlg_2", 2_000));
    }

    fn refusal(request_id: &str) -> Vec<super::NewEvent> {
        vec![AuditCtx::system(request_id).event(
            "ten_a",
            "auth.token_refused",
            vec!["agt_1".to_owned()],
            Outcome::Denied,
            json!({"reason": "invalid_client_secret"}),
        )]
    }

    fn suppressed(admitted: &super::AdmittedRefusal) -> Option<u64> {
        admitted.events[0].details["suppressed"].as_u64()
    }

    #[test]
    fn refusals_past_the_window_budget_are_counted_and_reported_once() {
        let refusals = RefusalDebounce::new(60, 2);
        let key = "auth.token_refused|agt_1";
        for n in 0..2 {
            let admitted = refusals.admit(key, 1_000 + n, refusal("r")).unwrap();
            assert_eq!(suppressed(&admitted), None);
        }
        for n in 0..5 {
            assert!(refusals.admit(key, 2_000 + n, refusal("r")).is_none());
        }
        // Another key has a window of its own.
        assert!(refusals.admit("other", 2_000, refusal("r")).is_some());
        assert!(refusals.due_summaries(60_999).is_empty(), "window not over");
        // The next window's first refusal carries the count.
        let admitted = refusals.admit(key, 61_000, refusal("next")).unwrap();
        assert_eq!(suppressed(&admitted), Some(5));
        assert_eq!(admitted.suppressed, 5);
        assert!(refusals.due_summaries(200_000).is_empty(), "nothing left");
    }

    #[test]
    fn a_window_over_with_suppressed_refusals_is_summarised_by_its_latest() {
        let refusals = RefusalDebounce::new(60, 1);
        let key = "k";
        assert!(refusals.admit(key, 0, refusal("first")).is_some());
        for n in 1..=4 {
            assert!(refusals.admit(key, n, refusal(&format!("r{n}"))).is_none());
        }
        let due = refusals.due_summaries(60_000);
        assert_eq!(due.len(), 1);
        let (due_key, summary) = &due[0];
        assert_eq!(due_key, key);
        // The latest refusal, carrying the three before it.
        assert_eq!(summary.events[0].request_id, "r4");
        assert_eq!(suppressed(summary), Some(3));
        // It opened the next window: a refusal right after is counted.
        assert!(refusals.admit(key, 60_001, refusal("again")).is_none());
        // A failed write puts it back, count and all.
        let (due_key, summary) = refusals.due_summaries(120_001).remove(0);
        assert_eq!(suppressed(&summary), None, "only itself");
        refusals.put_back(due_key, summary);
        let (_, summary) = refusals.due_summaries(120_002).remove(0);
        assert_eq!(summary.events[0].request_id, "again");
    }

    #[test]
    fn a_failed_write_gives_its_count_back_and_a_zero_window_records_all() {
        let refusals = RefusalDebounce::new(60, 1);
        assert!(refusals.admit("k", 0, refusal("a")).is_some());
        assert!(refusals.admit("k", 1, refusal("b")).is_none());
        let admitted = refusals.admit("k", 60_000, refusal("c")).unwrap();
        assert_eq!(admitted.suppressed, 1);
        refusals.give_back("k", admitted.suppressed);
        let admitted = refusals.admit("k", 60_001, refusal("d")).unwrap();
        assert_eq!(suppressed(&admitted), Some(1));

        let every = RefusalDebounce::new(0, 1);
        for n in 0..10 {
            assert!(every.admit("k", n, refusal("x")).is_some());
        }
    }

    #[test]
    fn a_zero_window_makes_every_read_due() {
        let debounce = Debounce::new(0);
        debounce.recorded("agt_1|dlg_1".to_owned(), 1_000);
        assert!(debounce.due("agt_1|dlg_1", 1_000));
    }
}
