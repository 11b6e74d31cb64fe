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

use sea_orm::sea_query::{
    Alias, CommonTableExpression, Expr, InsertStatement, PostgresQueryBuilder, Query,
    SelectStatement, SubQueryStatement, UnionType, WithQuery,
};
use sea_orm::{
    ActiveModelTrait, ConnectionTrait, DatabaseConnection, DbBackend, EntityName, EntityTrait,
    IdenStatic, Iterable, QueryTrait, Statement, TransactionTrait,
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
        let statement = group_statement(
            clock,
            &[Unit {
                insert: None,
                events,
            }],
        )?;
        txn.execute_raw(statement).await?;
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
pub fn chain_hash(event: &audit_event::Model, seq: i64, prev_hash: &str) -> String {
    let canonical = json!([
        event.tenant_id,
        seq,
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
        prev_hash,
    ]);
    sha256_hex(canonical.to_string().as_bytes())
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
        let mut sealed = 0;
        for row in rows {
            let tenant_id: String = row.try_get("", "tenant_id")?;
            loop {
                let count = self.seal_tenant(&tenant_id).await?;
                sealed += count;
                if count < SEAL_BATCH {
                    break;
                }
            }
        }
        Ok(sealed)
    }

    async fn seal_tenant(&self, tenant_id: &str) -> Result<u64> {
        let txn = self.db.begin().await?;
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
            let hash = chain_hash(event, seq, &prev_hash);
            links.push(Link {
                seq,
                event_row_id: event.id,
                prev_hash: std::mem::replace(&mut prev_hash, hash.clone()),
                hash,
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
                   AS l(seq BIGINT, event_row_id BIGINT, prev_hash TEXT, hash TEXT)\
                 ), chained AS (\
                   INSERT INTO audit_chain (tenant_id, seq, event_row_id, prev_hash, hash, sealed_at) \
                   SELECT $2, seq, event_row_id, prev_hash, hash, $3 FROM links\
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
            let rows = vec!["(?, ?, ?, ?, ?, ?)"; links.len()].join(", ");
            txn.execute_raw(Statement::from_sql_and_values(
                backend,
                placeholders(
                    backend,
                    &format!(
                        "INSERT INTO audit_chain (tenant_id, seq, event_row_id, prev_hash, hash, sealed_at) VALUES {rows}"
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
}

/// One write of a group commit: at most one row to insert (an idempotency
/// record: a delegation, a signature) and the events that record it,
/// written together or not at all.
#[derive(Debug)]
pub struct Unit {
    pub insert: Option<RowInsert>,
    pub events: Vec<NewEvent>,
}

/// A row a [`Unit`] inserts: as a statement (SQLite) and as the JSON text
/// of an object of every column (PostgreSQL's group statement, which joins
/// its rows' texts into an array: serialized once, however many times the
/// group is written), with its primary key `id`.
#[derive(Debug)]
pub struct RowInsert {
    table: &'static str,
    id: String,
    row: String,
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
        let mut row = serde_json::Map::new();
        for column in <<A as ActiveModelTrait>::Entity as EntityTrait>::Column::iter() {
            let value = active
                .get(column)
                .into_value()
                .ok_or_else(|| Error::internal(format!("column {} not set", column.as_str())))?;
            row.insert(column.as_str().to_owned(), json_value(value)?);
        }
        let id = row
            .get("id")
            .and_then(Value::as_str)
            .ok_or_else(|| Error::internal("a group insert needs a text id"))?
            .to_owned();
        let table = <A as ActiveModelTrait>::Entity::default().table_name();
        Ok(Self {
            table,
            id,
            row: serde_json::to_string(&row).map_err(Error::internal)?,
            statement: <A as ActiveModelTrait>::Entity::insert(active).into_query(),
        })
    }
}

/// A column's value as `json_populate_recordset` reads it back: numbers,
/// text, booleans and NULL as themselves, bytes as `\x…` hex (bytea's text
/// form). Other types are refused rather than guessed at.
fn json_value(value: sea_orm::Value) -> Result<Value> {
    use sea_orm::Value as V;
    Ok(match value {
        V::Bool(v) => v.map_or(Value::Null, Value::Bool),
        V::Int(v) => v.map_or(Value::Null, Value::from),
        V::BigInt(v) => v.map_or(Value::Null, Value::from),
        V::SmallInt(v) => v.map_or(Value::Null, Value::from),
        V::String(v) => v.map_or(Value::Null, Value::String),
        V::Bytes(v) => v.map_or(Value::Null, |bytes| {
            Value::String(format!("\\x{}", hex::encode(bytes)))
        }),
        other => {
            return Err(Error::internal(format!(
                "a group insert cannot carry {other:?}"
            )));
        }
    })
}

/// How a [`Unit`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// Its row and events are committed.
    Inserted,
    /// Its row met an existing one on a unique key (the same idempotency
    /// key, stored first by another request): nothing of it was written.
    Conflict,
}

/// The columns of an event in a group statement's JSON parameter, with
/// their types: [`EVENT_COLUMNS`] in order, after the unit's `gate` (the id
/// of its row, if it has one) and the event's place `ord` in the group.
const GROUP_EVENT_RECORD: &str = "gate TEXT, ord BIGINT, event_id TEXT, tenant_id TEXT, \
     occurred_at BIGINT, actor_kind TEXT, actor_subject TEXT, actor_tenant_id TEXT, \
     event_type TEXT, subject_ids TEXT, outcome TEXT, request_id TEXT, details TEXT";

/// PostgreSQL: one statement writing every unit of a group, which is its
/// own transaction (one round trip, one commit). Its text depends only on
/// which tables the group inserts rows into, so each connection parses and
/// plans it once or a few times, whatever the group's size; the rows and
/// events travel as JSON parameters:
///
/// ```sql
/// WITH r0 AS (INSERT INTO delegations SELECT * FROM
///               json_populate_recordset(NULL::delegations, $1)
///             ON CONFLICT DO NOTHING RETURNING id),
///      kept AS (SELECT id FROM r0 UNION ALL …),
///      e AS (INSERT INTO audit_events (…) SELECT … FROM json_to_recordset($n) AS v(…)
///            WHERE v.gate IS NULL OR v.gate IN (SELECT id FROM kept)
///            ORDER BY v.ord RETURNING id, tenant_id),
///      p AS (INSERT INTO audit_pending SELECT id, tenant_id FROM e)
/// SELECT id FROM kept
/// ```
///
/// A unit's events are gated on its row's id, so they exist only if its row
/// was inserted; a row that conflicts writes nothing of its unit and leaves
/// the others alone. The answer is the ids of the rows inserted.
fn group_statement(clock: &dyn Clock, units: &[Unit]) -> Result<Statement> {
    let mut tables: Vec<(&'static str, Vec<&str>)> = Vec::new();
    let mut events = Vec::new();
    for unit in units {
        let gate = match &unit.insert {
            Some(insert) => {
                match tables.iter_mut().find(|(table, _)| *table == insert.table) {
                    Some((_, rows)) => rows.push(&insert.row),
                    None => tables.push((insert.table, vec![&insert.row])),
                }
                Value::String(insert.id.clone())
            }
            None => Value::Null,
        };
        for event in &unit.events {
            let mut record = serde_json::Map::with_capacity(EVENT_COLUMNS.len() + 2);
            record.insert("gate".to_owned(), gate.clone());
            record.insert("ord".to_owned(), Value::from(events.len()));
            for (column, value) in EVENT_COLUMNS.iter().zip(event_values(clock, event)?) {
                record.insert(column.as_str().to_owned(), json_value(value)?);
            }
            events.push(Value::Object(record));
        }
    }
    if tables.is_empty() && events.is_empty() {
        return Err(Error::internal("an empty group commit"));
    }
    // The same tables in the same order give the same text.
    tables.sort_by_key(|(table, _)| *table);
    let mut sql = String::from("WITH ");
    let mut values: Vec<sea_orm::Value> = Vec::with_capacity(tables.len() + 1);
    let mut kept = Vec::with_capacity(tables.len());
    for (index, (table, rows)) in tables.into_iter().enumerate() {
        values.push(format!("[{}]", rows.join(",")).into());
        sql.push_str(&format!(
            "r{index} AS (INSERT INTO {table} SELECT * FROM json_populate_recordset(NULL::{table}, ${}::json) \
             ON CONFLICT DO NOTHING RETURNING id), ",
            values.len()
        ));
        kept.push(format!("SELECT id FROM r{index}"));
    }
    if kept.is_empty() {
        kept.push("SELECT NULL::TEXT AS id WHERE FALSE".to_owned());
    }
    values.push(
        serde_json::to_string(&events)
            .map_err(Error::internal)?
            .into(),
    );
    let columns = EVENT_COLUMNS.map(|column| column.as_str()).join(", ");
    sql.push_str(&format!(
        "kept AS ({}), \
         e AS (INSERT INTO audit_events ({columns}) \
           SELECT {columns} FROM json_to_recordset(${}::json) AS v({GROUP_EVENT_RECORD}) \
           WHERE v.gate IS NULL OR v.gate IN (SELECT id FROM kept) \
           ORDER BY v.ord RETURNING id, tenant_id), \
         p AS (INSERT INTO audit_pending (event_row_id, tenant_id) SELECT id, tenant_id FROM e) \
         SELECT id FROM kept",
        kept.join(" UNION ALL "),
        values.len()
    ));
    Ok(Statement::from_sql_and_values(
        DbBackend::Postgres,
        sql,
        values,
    ))
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
    let statement = group_statement(clock, units)?;
    let rows = db.query_all_raw(statement).await?;
    let mut kept = std::collections::HashSet::with_capacity(rows.len());
    for row in rows {
        kept.insert(row.try_get::<String>("", "id")?);
    }
    Ok(units
        .iter()
        .map(|unit| match &unit.insert {
            Some(insert) if !kept.contains(&insert.id) => Written::Conflict,
            _ => Written::Inserted,
        })
        .collect())
}

/// SQLite (one writer at a time anyway): one transaction per unit.
async fn write_one(db: &DatabaseConnection, clock: &dyn Clock, unit: &Unit) -> Result<Written> {
    let txn = db.begin().await?;
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

type Queued = (
    Unit,
    tokio::sync::oneshot::Sender<std::result::Result<Written, ()>>,
);

/// The sealer vacuums `audit_pending` (PostgreSQL) after sealing this many
/// events since its last vacuum: it holds at most about as many dead rows.
const VACUUM_AFTER_SEALED: u64 = 20_000;

/// How long the sealer lets events gather after a round that sealed some.
const SEAL_GATHER: Duration = Duration::from_millis(10);

/// Writer tasks: groups are committed this many at a time, so the
/// database works on several at once (one writer would leave all but one of
/// its cores idle while the next group waits).
const GROUP_WRITERS: usize = 4;

/// About the most values one group statement carries (an event has 11, a
/// delegation row about 25): a bound on a group's size, and so on how long
/// one commit keeps its callers waiting.
const GROUP_MAX_PARAMS: usize = 30_000;

impl Recorder {
    /// Starts the writer tasks on `db`.
    pub fn start(db: DatabaseConnection, clock: Arc<dyn Clock>, wake: Arc<Notify>) -> Self {
        let (tx, rx) = tokio::sync::mpsc::channel::<Queued>(4_096);
        let rx = Arc::new(tokio::sync::Mutex::new(rx));
        for _ in 0..GROUP_WRITERS {
            tokio::spawn(Self::run(
                db.clone(),
                clock.clone(),
                wake.clone(),
                rx.clone(),
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
    ) {
        loop {
            // The queue is held only while a group is taken from it, so the
            // other writers take the next group while this one commits.
            let group = {
                let mut rx = rx.lock().await;
                let Some(first) = rx.recv().await else { return };
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
                group
            };
            let (units, waiters): (Vec<Unit>, Vec<_>) = group.into_iter().unzip();
            let results = Self::write_isolated(&db, clock.as_ref(), units).await;
            if results.iter().any(Result::is_ok) {
                wake.notify_one();
            }
            for (done, result) in waiters.into_iter().zip(results) {
                let _ = done.send(result);
            }
        }
    }

    /// Writes the group; if the group statement fails (nothing of it was
    /// written), each unit alone, so that one unit the database rejects (say,
    /// a value a constraint forbids) fails only its own caller.
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
            Err(err) if units.len() == 1 => {
                failed(err);
                vec![Err(())]
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

/// About how many bind parameters `unit` adds to a group statement.
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

#[cfg(test)]
mod tests {
    use super::Debounce;

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

    #[test]
    fn a_zero_window_makes_every_read_due() {
        let debounce = Debounce::new(0);
        debounce.recorded("agt_1|dlg_1".to_owned(), 1_000);
        assert!(debounce.due("agt_1|dlg_1", 1_000));
    }
}
