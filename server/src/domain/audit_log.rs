//! Reading a tenant's audit log: listing, tailing, exporting and verifying
//! the hash chain the sealer builds (see `crate::audit`).
//!
//! Everything here reads; the only write is the `audit.exported` event. The
//! caller's tenant comes from its credential, so a tenant can only ever read
//! its own log.

use futures::StreamExt;
use sea_orm::{ConnectionTrait, QueryResult, Statement, Value as DbValue};
use serde_json::{Value, json};
use vaultguard_proto::v1 as pb;

use crate::audit::{GENESIS_HASH, chain_hash, placeholders};
use crate::auth::CallContext;
use crate::clock::{Millis, to_timestamp};
use crate::domain::page;
use crate::error::{Error, Result, Violations};
use crate::state::AppState;
use crate::store::entities::audit_event;
use crate::validate;

/// Most event-type filters.
const MAX_TYPES: usize = 32;

/// One event with its chain link (absent while unsealed).
#[derive(Debug, Clone)]
pub struct AuditRow {
    pub event: audit_event::Model,
    pub seq: Option<i64>,
    pub prev_hash: Option<String>,
    pub hash: Option<String>,
}

/// An event-type filter: exact types and `<area>.*` prefixes.
#[derive(Debug, Clone, Default)]
pub struct TypeFilter {
    exact: Vec<String>,
    areas: Vec<String>,
}

impl TypeFilter {
    /// Checks `types` (field `field[i]`), adding violations to `v`.
    pub fn parse(field: &str, types: &[String], v: &mut Violations) -> Self {
        let mut filter = Self::default();
        if types.len() > MAX_TYPES {
            v.add(field, format!("at most {MAX_TYPES} event types"));
            return filter;
        }
        let segment = |s: &str| {
            !s.is_empty()
                && s.starts_with(|c: char| c.is_ascii_lowercase())
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        };
        for (i, t) in types.iter().enumerate() {
            let ok = t.len() <= 64
                && match t.split_once('.') {
                    Some((area, "*")) if segment(area) => {
                        filter.areas.push(format!("{area}."));
                        true
                    }
                    Some((area, verb)) if segment(area) && segment(verb) => {
                        filter.exact.push(t.clone());
                        true
                    }
                    _ => false,
                };
            if !ok {
                v.add(
                    format!("{field}[{i}]"),
                    "must be `<area>.<verb>` or `<area>.*` in lowercase, at most 64 characters",
                );
            }
        }
        filter
    }

    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.areas.is_empty()
    }

    pub fn matches(&self, event_type: &str) -> bool {
        self.is_empty()
            || self.exact.iter().any(|t| t == event_type)
            || self
                .areas
                .iter()
                .any(|a| event_type.starts_with(a.as_str()))
    }

    /// `(sql, values)` restricting `column` (an event type), or nothing
    /// when empty.
    fn sql(&self, column: &str, values: &mut Vec<DbValue>) -> String {
        if self.is_empty() {
            return String::new();
        }
        let mut parts = Vec::new();
        for t in &self.exact {
            parts.push(format!("{column} = ?"));
            values.push(t.clone().into());
        }
        for a in &self.areas {
            parts.push(format!("{column} LIKE ? ESCAPE '\\'"));
            values.push(format!("{}%", escape_like(a)).into());
        }
        format!(" AND ({})", parts.join(" OR "))
    }
}

fn escape_like(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

const COLUMNS: &str = "SELECT e.id, e.event_id, e.tenant_id, e.occurred_at, e.actor_kind, \
     e.actor_subject, e.actor_tenant_id, e.event_type, e.subject_ids, e.outcome, e.request_id, \
     e.details, c.seq, c.prev_hash, c.hash";

/// Sealed events, driven by the chain's `(tenant_id, seq)` primary key so
/// that a batch after a cursor reads only that batch, whatever the log size.
fn select_sealed() -> String {
    format!("{COLUMNS} FROM audit_chain c JOIN audit_events e ON e.id = c.event_row_id")
}

/// Events without a chain link yet (only listed on request), found through
/// the sealer's queue `audit_pending` (one row per unsealed event, keyed by
/// tenant and event row), so a listing reads the few unsealed events, not
/// every event of the tenant looking for those without a link.
fn select_unsealed() -> String {
    format!(
        "{COLUMNS} FROM audit_pending p JOIN audit_events e ON e.id = p.event_row_id \
         LEFT JOIN audit_chain c ON c.event_row_id = e.id"
    )
}

/// The event columns of a row (selected as [`COLUMNS`] names them), with
/// its row id `id`.
fn event_of(row: &QueryResult, id: i64) -> Result<audit_event::Model> {
    Ok(audit_event::Model {
        id,
        event_id: row.try_get("", "event_id")?,
        tenant_id: row.try_get("", "tenant_id")?,
        occurred_at: row.try_get("", "occurred_at")?,
        actor_kind: row.try_get("", "actor_kind")?,
        actor_subject: row.try_get("", "actor_subject")?,
        actor_tenant_id: row.try_get("", "actor_tenant_id")?,
        event_type: row.try_get("", "event_type")?,
        subject_ids: row.try_get("", "subject_ids")?,
        outcome: row.try_get("", "outcome")?,
        request_id: row.try_get("", "request_id")?,
        details: row.try_get("", "details")?,
    })
}

fn row_of(row: &QueryResult) -> Result<AuditRow> {
    Ok(AuditRow {
        event: event_of(row, row.try_get("", "id")?)?,
        seq: row.try_get("", "seq")?,
        prev_hash: row.try_get("", "prev_hash")?,
        hash: row.try_get("", "hash")?,
    })
}

async fn query(state: &AppState, sql: &str, values: Vec<DbValue>) -> Result<Vec<AuditRow>> {
    query_on(&state.db, sql, values).await
}

async fn query_on(
    conn: &impl ConnectionTrait,
    sql: &str,
    values: Vec<DbValue>,
) -> Result<Vec<AuditRow>> {
    let backend = conn.get_database_backend();
    conn.query_all_raw(Statement::from_sql_and_values(
        backend,
        placeholders(backend, sql),
        values,
    ))
    .await?
    .iter()
    .map(row_of)
    .collect()
}

fn limit(n: u64) -> DbValue {
    i64::try_from(n).unwrap_or(i64::MAX).into()
}

/// One row of a single-row query about `tenant_id`, if any.
async fn tenant_row(state: &AppState, sql: &str, tenant_id: &str) -> Result<Option<QueryResult>> {
    let backend = state.db.get_database_backend();
    Ok(state
        .db
        .query_one_raw(Statement::from_sql_and_values(
            backend,
            placeholders(backend, sql),
            [tenant_id.into()],
        ))
        .await?)
}

/// The tenant's chain head: last sealed sequence and its hash.
pub async fn head(state: &AppState, tenant_id: &str) -> Result<(i64, String)> {
    let sql = "SELECT seq, hash FROM audit_heads WHERE tenant_id = ?";
    match tenant_row(state, sql, tenant_id).await? {
        Some(row) => Ok((row.try_get("", "seq")?, row.try_get("", "hash")?)),
        None => Ok((0, GENESIS_HASH.to_owned())),
    }
}

/// How many committed events of the tenant are not sealed yet.
pub async fn unsealed_count(state: &AppState, tenant_id: &str) -> Result<u64> {
    let sql = "SELECT COUNT(*) AS n FROM audit_pending WHERE tenant_id = ?";
    let n: i64 = match tenant_row(state, sql, tenant_id).await? {
        Some(row) => row.try_get("", "n")?,
        None => 0,
    };
    Ok(u64::try_from(n).unwrap_or(0))
}

/// Sealed events with `after < seq <= upto`, in sequence order, at most
/// `max`, optionally within a time range and of some types.
pub async fn sealed_after(
    state: &AppState,
    tenant_id: &str,
    after: i64,
    upto: Option<i64>,
    range: (Option<Millis>, Option<Millis>),
    types: &TypeFilter,
    max: u64,
) -> Result<Vec<AuditRow>> {
    let mut values: Vec<DbValue> = vec![tenant_id.into(), after.into()];
    let mut sql = format!("{} WHERE c.tenant_id = ? AND c.seq > ?", select_sealed());
    if let Some(upto) = upto {
        sql.push_str(" AND c.seq <= ?");
        values.push(upto.into());
    }
    if let Some(start) = range.0 {
        sql.push_str(" AND c.occurred_at >= ?");
        values.push(start.into());
    }
    if let Some(end) = range.1 {
        sql.push_str(" AND c.occurred_at < ?");
        values.push(end.into());
    }
    sql.push_str(&types.sql("c.event_type", &mut values));
    sql.push_str(" ORDER BY c.seq ASC LIMIT ?");
    values.push(limit(max));
    query(state, &sql, values).await
}

/// The latest time accepted in a filter: 9999-12-31T23:59:59Z.
const MAX_SECONDS: i64 = 253_402_300_799;
/// The earliest: 0001-01-01T00:00:00Z.
const MIN_SECONDS: i64 = -62_135_596_800;

/// A timestamp as milliseconds; outside years 1 to 9999, or with nanos
/// outside 0..1e9, it is a violation of `field`.
fn millis_of(
    field: &str,
    ts: Option<&prost_types::Timestamp>,
    v: &mut Violations,
) -> Option<Millis> {
    let t = ts?;
    if !(MIN_SECONDS..=MAX_SECONDS).contains(&t.seconds) || !(0..1_000_000_000).contains(&t.nanos) {
        v.add(field, "must be a valid timestamp between years 1 and 9999");
        return None;
    }
    Some(t.seconds * 1000 + i64::from(t.nanos) / 1_000_000)
}

/// Checks a `[start, end)` range (`end` after `start` when both are set).
pub fn time_range(
    start: Option<&prost_types::Timestamp>,
    end: Option<&prost_types::Timestamp>,
    v: &mut Violations,
) -> (Option<Millis>, Option<Millis>) {
    let (start, end) = (
        millis_of("start_time", start, v),
        millis_of("end_time", end, v),
    );
    if let (Some(s), Some(e)) = (start, end)
        && e <= s
    {
        v.add("end_time", "must be after start_time");
    }
    (start, end)
}

/// ListAuditEvents.
pub async fn list(
    state: &AppState,
    ctx: &CallContext,
    req: &pb::ListAuditEventsRequest,
) -> Result<(Vec<AuditRow>, String)> {
    let tenant = ctx.principal.tenant_id()?.to_owned();
    let mut v = Violations::new();
    let range = time_range(req.start_time.as_ref(), req.end_time.as_ref(), &mut v);
    let types = TypeFilter::parse("event_types", &req.event_types, &mut v);
    if req.actor_subject.chars().count() > 256 {
        v.add("actor_subject", "must be at most 256 characters");
    }
    if req.subject_id.chars().count() > 64 {
        v.add("subject_id", "must be at most 64 characters");
    }
    let outcome = v
        .take(validate::enum_value::<pb::AuditOutcome>(
            "outcome",
            req.outcome,
            true,
        ))
        .flatten();
    let order = v
        .take(validate::enum_value::<pb::AuditOrder>(
            "order", req.order, true,
        ))
        .flatten()
        .unwrap_or(pb::AuditOrder::NewestFirst);
    let page_req = req.page.clone().unwrap_or_default();
    let size = v.take(validate::page_size("page.page_size", page_req.page_size));
    v.finish()?;
    let size = size.unwrap_or(50);
    let scope = format!(
        "audit|{tenant}|{range:?}|{types:?}|{}|{}|{outcome:?}|{order:?}|{}",
        req.actor_subject, req.subject_id, req.include_unsealed
    );
    let cursor = page::decode("page.page_token", &scope, &page_req.page_token)?;
    let oldest = order == pb::AuditOrder::OldestFirst;
    // Phases: sealed by sequence, unsealed by row id; unsealed come after
    // the sealed ones oldest-first and before them newest-first.
    let phases: Vec<bool> = match (oldest, req.include_unsealed) {
        (true, true) => vec![true, false],
        (false, true) => vec![false, true],
        (_, false) => vec![true],
    };
    let (mut phase_index, mut after) = match cursor.as_deref().and_then(|c| c.split_once(':')) {
        Some(("s", key)) => (
            phases.iter().position(|p| *p).unwrap_or(0),
            key.parse::<i64>().ok(),
        ),
        Some(("u", key)) => (
            phases.iter().position(|p| !*p).unwrap_or(0),
            key.parse::<i64>().ok(),
        ),
        Some(_) => {
            return Err(Error::invalid(
                "page.page_token",
                "is not a page token of this listing",
            ));
        }
        None => (0, None),
    };

    // Both phases read one snapshot: an event the sealer links between the
    // sealed and the unsealed query would otherwise be in neither.
    let snapshot = crate::store::begin_snapshot(&state.db).await?;
    if snapshot.get_database_backend() == sea_orm::DbBackend::Postgres {
        // Planned for this tenant, these filters and this page size: a
        // cached generic plan cannot tell a tenant with ten million events
        // from one with ten, nor a page of 50 from a scan, and chose
        // parallel workers (5 ms to start, for a 0.2 ms page) or sorted a
        // whole time range where walking the sequence index found a page
        // at once (608 ms instead of 2).
        snapshot
            .execute_unprepared("SET LOCAL plan_cache_mode = force_custom_plan")
            .await?;
    }
    let mut rows: Vec<AuditRow> = Vec::new();
    while phase_index < phases.len() && u64::try_from(rows.len()).unwrap_or(0) <= size {
        let sealed = phases[phase_index];
        let mut values: Vec<DbValue> = vec![tenant.clone().into()];
        // A sealed page filtered by nothing but the chain's own columns is
        // chosen from the chain alone and only its rows' events are read:
        // a time window of a thousand events sorts a thousand index
        // entries, not a thousand joined events.
        let chain_only = sealed && req.subject_id.is_empty() && outcome.is_none();
        let mut sql = if chain_only {
            "SELECT c.seq, c.event_row_id, c.prev_hash, c.hash FROM audit_chain c \
             WHERE c.tenant_id = ?"
                .to_owned()
        } else if sealed {
            format!("{} WHERE c.tenant_id = ?", select_sealed())
        } else {
            format!(
                "{} WHERE p.tenant_id = ? AND e.tenant_id = p.tenant_id AND c.seq IS NULL",
                select_unsealed()
            )
        };
        // Sealed events are filtered on the chain row's indexed copies of
        // time, type and actor (migration 20), unsealed ones on the event.
        let table = if sealed { "c" } else { "e" };
        if let Some(start) = range.0 {
            sql.push_str(&format!(" AND {table}.occurred_at >= ?"));
            values.push(start.into());
        }
        if let Some(end) = range.1 {
            sql.push_str(&format!(" AND {table}.occurred_at < ?"));
            values.push(end.into());
        }
        sql.push_str(&types.sql(&format!("{table}.event_type"), &mut values));
        if !req.actor_subject.is_empty() {
            sql.push_str(&format!(" AND {table}.actor_subject = ?"));
            values.push(req.actor_subject.clone().into());
        }
        if !req.subject_id.is_empty() {
            sql.push_str(" AND e.subject_ids LIKE ? ESCAPE '\\'");
            values.push(format!("%\"{}\"%", escape_like(&json_escape(&req.subject_id))).into());
        }
        if let Some(outcome) = outcome {
            sql.push_str(" AND e.outcome = ?");
            values.push(outcome_name(outcome).into());
        }
        let key = if sealed { "c.seq" } else { "p.event_row_id" };
        if let Some(after) = after {
            sql.push_str(&format!(" AND {key} {} ?", if oldest { ">" } else { "<" }));
            values.push(after.into());
        }
        let direction = if oldest { "ASC" } else { "DESC" };
        sql.push_str(&format!(" ORDER BY {key} {direction} LIMIT ?"));
        values.push(limit(size + 1 - u64::try_from(rows.len()).unwrap_or(0)));
        if chain_only {
            sql = format!(
                "{COLUMNS} FROM ({sql}) c JOIN audit_events e ON e.id = c.event_row_id \
                 ORDER BY c.seq {direction}"
            );
        }
        rows.extend(query_on(&snapshot, &sql, values).await?);
        phase_index += 1;
        after = None;
    }
    snapshot.commit().await?;
    let (rows, next) = page::finish(rows, size, &scope, |row| match row.seq {
        Some(seq) => format!("s:{seq}"),
        None => format!("u:{}", row.event.id),
    });
    Ok((rows, next))
}

fn json_escape(text: &str) -> String {
    let quoted = Value::String(text.to_owned()).to_string();
    quoted[1..quoted.len() - 1].to_owned()
}

fn outcome_name(outcome: pb::AuditOutcome) -> &'static str {
    match outcome {
        pb::AuditOutcome::Denied => "denied",
        pb::AuditOutcome::Failure => "failure",
        _ => "success",
    }
}

fn outcome_proto(stored: &str) -> pb::AuditOutcome {
    match stored {
        "success" => pb::AuditOutcome::Success,
        "denied" => pb::AuditOutcome::Denied,
        "failure" => pb::AuditOutcome::Failure,
        _ => pb::AuditOutcome::Unspecified,
    }
}

fn kind_proto(stored: &str) -> pb::PrincipalKind {
    match stored {
        "operator" => pb::PrincipalKind::Operator,
        "human" => pb::PrincipalKind::Human,
        "agent" => pb::PrincipalKind::Agent,
        "system" => pb::PrincipalKind::System,
        _ => pb::PrincipalKind::Unspecified,
    }
}

fn to_prost_value(value: Value) -> prost_types::Value {
    use prost_types::value::Kind;
    prost_types::Value {
        kind: Some(match value {
            Value::Null => Kind::NullValue(0),
            Value::Bool(b) => Kind::BoolValue(b),
            Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
            Value::String(s) => Kind::StringValue(s),
            Value::Array(items) => Kind::ListValue(prost_types::ListValue {
                values: items.into_iter().map(to_prost_value).collect(),
            }),
            Value::Object(map) => Kind::StructValue(prost_types::Struct {
                fields: map
                    .into_iter()
                    .map(|(k, v)| (k, to_prost_value(v)))
                    .collect(),
            }),
        }),
    }
}

/// The proto view of an event.
pub fn to_proto(row: &AuditRow) -> pb::AuditEvent {
    let e = &row.event;
    let details = match serde_json::from_str::<Value>(&e.details) {
        Ok(Value::Object(map)) => Some(prost_types::Struct {
            fields: map
                .into_iter()
                .map(|(k, v)| (k, to_prost_value(v)))
                .collect(),
        }),
        _ => None,
    };
    pb::AuditEvent {
        tenant_id: e.tenant_id.clone(),
        sequence: row.seq.and_then(|s| u64::try_from(s).ok()).unwrap_or(0),
        event_id: e.event_id.clone(),
        time: Some(to_timestamp(e.occurred_at)),
        actor: Some(pb::Actor {
            kind: kind_proto(&e.actor_kind) as i32,
            subject: e.actor_subject.clone(),
            tenant_id: e.actor_tenant_id.clone(),
        }),
        event_type: e.event_type.clone(),
        subject_ids: serde_json::from_str(&e.subject_ids).unwrap_or_default(),
        outcome: outcome_proto(&e.outcome) as i32,
        request_id: e.request_id.clone(),
        details,
        prev_hash: row.prev_hash.clone().unwrap_or_default(),
        hash: row.hash.clone().unwrap_or_default(),
    }
}

/// One event as an NDJSON line: the proto3 JSON mapping of `AuditEvent`
/// with the original field names (64-bit integers as strings, enums by
/// name, timestamps in RFC 3339).
pub fn ndjson_line(row: &AuditRow, out: &mut Vec<u8>) -> Result<()> {
    let e = &row.event;
    // Written field by field (no `Value` tree per event: the export's
    // cost); strings through serde_json's escaping, the stored JSON texts
    // verbatim when they are valid single-line JSON.
    let field = |name: &str, value: &str, out: &mut Vec<u8>| -> Result<()> {
        out.extend_from_slice(name.as_bytes());
        serde_json::to_writer(&mut *out, value).map_err(Error::internal)
    };
    field("{\"tenant_id\":", &e.tenant_id, out)?;
    field(",\"sequence\":", &row.seq.unwrap_or(0).to_string(), out)?;
    field(",\"event_id\":", &e.event_id, out)?;
    field(",\"time\":", &to_timestamp(e.occurred_at).to_string(), out)?;
    field(
        ",\"actor\":{\"kind\":",
        kind_proto(&e.actor_kind).as_str_name(),
        out,
    )?;
    field(",\"subject\":", &e.actor_subject, out)?;
    field(",\"tenant_id\":", &e.actor_tenant_id, out)?;
    field("},\"event_type\":", &e.event_type, out)?;
    out.extend_from_slice(b",\"subject_ids\":");
    stored_json(&e.subject_ids, Value::Array(Vec::new()), out)?;
    field(
        ",\"outcome\":",
        outcome_proto(&e.outcome).as_str_name(),
        out,
    )?;
    field(",\"request_id\":", &e.request_id, out)?;
    out.extend_from_slice(b",\"details\":");
    stored_json(&e.details, Value::Null, out)?;
    field(
        ",\"prev_hash\":",
        row.prev_hash.as_deref().unwrap_or_default(),
        out,
    )?;
    field(",\"hash\":", row.hash.as_deref().unwrap_or_default(), out)?;
    out.extend_from_slice(b"}\n");
    Ok(())
}

/// A stored JSON text (`subject_ids`, `details`) into a line: verbatim when
/// it parses and holds no line break (the server stores compact JSON), else
/// re-serialized, or `fallback` when it does not parse.
fn stored_json(text: &str, fallback: Value, out: &mut Vec<u8>) -> Result<()> {
    let parses = serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok();
    if parses && !text.contains(['\n', '\r']) {
        out.extend_from_slice(text.trim().as_bytes());
        return Ok(());
    }
    let value = serde_json::from_str::<Value>(text).unwrap_or(fallback);
    serde_json::to_writer(&mut *out, &value).map_err(Error::internal)
}

/// The CSV header row (CRLF-terminated).
pub const CSV_HEADER: &str = "tenant_id,sequence,event_id,time,actor_kind,actor_subject,actor_tenant_id,event_type,subject_ids,outcome,request_id,details,prev_hash,hash\r\n";

/// One CSV cell: formula-leading characters neutralised with `'`, then
/// RFC 4180 quoting when needed.
pub fn csv_cell(value: &str, out: &mut Vec<u8>) {
    let neutralised;
    let value = if value.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        neutralised = format!("'{value}");
        neutralised.as_str()
    } else {
        value
    };
    if value.contains([',', '"', '\r', '\n']) {
        out.push(b'"');
        out.extend_from_slice(value.replace('"', "\"\"").as_bytes());
        out.push(b'"');
    } else {
        out.extend_from_slice(value.as_bytes());
    }
}

/// The cells of one event's CSV record, in [`CSV_HEADER`] order, unescaped
/// (what [`csv_line`] writes, as the tests read it back).
#[cfg(test)]
fn csv_cells(row: &AuditRow) -> [String; 14] {
    let e = &row.event;
    let subjects: Vec<String> = serde_json::from_str(&e.subject_ids).unwrap_or_default();
    [
        e.tenant_id.clone(),
        row.seq.unwrap_or(0).to_string(),
        e.event_id.clone(),
        to_timestamp(e.occurred_at).to_string(),
        e.actor_kind.clone(),
        e.actor_subject.clone(),
        e.actor_tenant_id.clone(),
        e.event_type.clone(),
        subjects.join(" "),
        e.outcome.clone(),
        e.request_id.clone(),
        e.details.clone(),
        row.prev_hash.clone().unwrap_or_default(),
        row.hash.clone().unwrap_or_default(),
    ]
}

/// One event as a CSV record (CRLF-terminated), written cell by cell.
pub fn csv_line(row: &AuditRow, out: &mut Vec<u8>) {
    let e = &row.event;
    let subjects: Vec<String> = serde_json::from_str(&e.subject_ids).unwrap_or_default();
    let (seq, time) = (
        row.seq.unwrap_or(0).to_string(),
        to_timestamp(e.occurred_at).to_string(),
    );
    let cells: [&str; 14] = [
        &e.tenant_id,
        &seq,
        &e.event_id,
        &time,
        &e.actor_kind,
        &e.actor_subject,
        &e.actor_tenant_id,
        &e.event_type,
        &subjects.join(" "),
        &e.outcome,
        &e.request_id,
        &e.details,
        row.prev_hash.as_deref().unwrap_or_default(),
        row.hash.as_deref().unwrap_or_default(),
    ];
    for (i, cell) in cells.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        csv_cell(cell, out);
    }
    out.extend_from_slice(b"\r\n");
}

/// What verification found.
#[derive(Debug, Clone, Default)]
pub struct Verification {
    pub ok: bool,
    pub first_broken: i64,
    pub failure: String,
    pub checked: u64,
    pub unsealed: u64,
    pub head_seq: i64,
    pub head_hash: String,
    pub receipt: String,
    pub verified_at: Millis,
}

/// One chain row as verification reads it: the link, the chain's copies of
/// the filtered fields, and the event it links (absent if deleted).
struct ChainRow {
    seq: i64,
    prev_hash: String,
    hash: String,
    occurred_at: i64,
    event_type: String,
    actor_subject: String,
    event: Option<audit_event::Model>,
}

/// Chain rows (with their events, if still there) by sequence.
async fn chain_rows(
    state: &AppState,
    tenant_id: &str,
    after: i64,
    upto: i64,
    max: u64,
) -> Result<Vec<ChainRow>> {
    let backend = state.db.get_database_backend();
    let sql = "SELECT c.seq AS chain_seq, c.prev_hash AS chain_prev, c.hash AS chain_hash, \
         c.occurred_at AS chain_time, c.event_type AS chain_type, c.actor_subject AS chain_actor, \
         e.id, e.event_id, e.tenant_id, e.occurred_at, e.actor_kind, e.actor_subject, \
         e.actor_tenant_id, e.event_type, e.subject_ids, e.outcome, e.request_id, e.details \
         FROM audit_chain c LEFT JOIN audit_events e ON e.id = c.event_row_id \
         WHERE c.tenant_id = ? AND c.seq > ? AND c.seq <= ? ORDER BY c.seq ASC LIMIT ?";
    let rows = state
        .db
        .query_all_raw(Statement::from_sql_and_values(
            backend,
            placeholders(backend, sql),
            [tenant_id.into(), after.into(), upto.into(), limit(max)],
        ))
        .await?;
    rows.iter()
        .map(|row| {
            let event = match row.try_get::<Option<i64>>("", "id")? {
                Some(id) => Some(event_of(row, id)?),
                None => None,
            };
            Ok(ChainRow {
                seq: row.try_get("", "chain_seq")?,
                prev_hash: row.try_get("", "chain_prev")?,
                hash: row.try_get("", "chain_hash")?,
                occurred_at: row.try_get("", "chain_time")?,
                event_type: row.try_get("", "chain_type")?,
                actor_subject: row.try_get("", "chain_actor")?,
                event,
            })
        })
        .collect()
}

/// Rows verification reads per query: large enough that a round trip is
/// a small part of a batch's cost.
const VERIFY_BATCH: u64 = 10_000;

/// Batches a verification or an unfiltered export reads at once: the
/// database's share of a row (an index step on the chain and a key lookup
/// of its event, ~3 µs) is most of a row's cost, and two readers keep both
/// cores busy beside the hashing or formatting.
pub const READERS: usize = 2;

/// `(after, upto]` cut into `(after, end]` ranges of `size` sequences: the
/// chain is gapless, so each range holds at most `size` links.
pub fn seq_ranges(after: i64, upto: i64, size: u64) -> Vec<(i64, i64)> {
    let size = i64::try_from(size.max(1)).unwrap_or(i64::MAX);
    let mut ranges = Vec::new();
    let mut at = after;
    while at < upto {
        let end = at.saturating_add(size).min(upto);
        ranges.push((at, end));
        at = end;
    }
    ranges
}

/// Where a batch check stopped: the sequence and what was wrong there.
type Break = (i64, &'static str);

/// Checks one batch of chain rows, in order, starting at `next` with the
/// link `expected_prev`. Returns how many held, the next sequence and link,
/// and the first break if any. Pure CPU: runs on a blocking thread while the
/// next batch is read.
fn check_batch(
    tenant: &str,
    rows: &[ChainRow],
    mut next: i64,
    mut expected_prev: String,
) -> Result<(u64, i64, String, Option<Break>)> {
    let mut checked = 0;
    for row in rows {
        let failure = if row.seq != next {
            Some((next, "missing sequence"))
        } else if row.prev_hash != expected_prev {
            Some((row.seq, "prev_hash mismatch"))
        } else {
            match &row.event {
                None => Some((row.seq, "missing event")),
                Some(event) if chain_hash(event, row.seq, &row.prev_hash)? != row.hash => {
                    Some((row.seq, "hash mismatch"))
                }
                Some(event) if event.tenant_id != tenant => {
                    Some((row.seq, "event of another tenant"))
                }
                Some(event)
                    if event.occurred_at != row.occurred_at
                        || event.event_type != row.event_type
                        || event.actor_subject != row.actor_subject =>
                {
                    Some((row.seq, "chain copy mismatch"))
                }
                Some(_) => None,
            }
        };
        if failure.is_some() {
            return Ok((checked, next, expected_prev, failure));
        }
        checked += 1;
        expected_prev.clone_from(&row.hash);
        next = row.seq + 1;
    }
    Ok((checked, next, expected_prev, None))
}

/// The (sequence, hash) a receipt this server signed for `tenant` commits
/// to; any other text is a violation of `since_receipt`.
async fn receipt_head(state: &AppState, tenant: &str, receipt: &str) -> Result<(i64, String)> {
    const MAX_RECEIPT: usize = 8 * 1024;
    let refused = || {
        Error::invalid(
            "since_receipt",
            "is not an audit receipt of this tenant signed by a key this server publishes",
        )
    };
    if receipt.len() > MAX_RECEIPT {
        return Err(Error::invalid("since_receipt", "must be at most 8 KiB"));
    }
    let claims = state
        .keys
        .verify_typed(receipt, RECEIPT_TYPE)
        .await
        .map_err(|_| refused())?;
    if claims["tenant_id"].as_str() != Some(tenant) {
        return Err(refused());
    }
    match (
        claims["head_sequence"].as_i64(),
        claims["head_hash"].as_str(),
    ) {
        (Some(seq), Some(hash)) if seq >= 0 => Ok((seq, hash.to_owned())),
        _ => Err(refused()),
    }
}

/// The JWS `typ` of audit receipts.
const RECEIPT_TYPE: &str = "vaultguard-audit-receipt+jwt";

/// VerifyAuditChain.
pub async fn verify(
    state: &AppState,
    ctx: &CallContext,
    req: &pb::VerifyAuditChainRequest,
) -> Result<Verification> {
    let tenant = ctx.principal.tenant_id()?.to_owned();
    let (from, to) = (req.from_sequence, req.to_sequence);
    if to != 0 && to < from {
        return Err(Error::invalid(
            "to_sequence",
            "must not be below from_sequence",
        ));
    }
    let since = if req.since_receipt.is_empty() {
        None
    } else if from != 0 {
        return Err(Error::invalid(
            "since_receipt",
            "must not be combined with from_sequence",
        ));
    } else {
        Some(receipt_head(state, &tenant, &req.since_receipt).await?)
    };
    let (head_seq, head_hash) = head(state, &tenant).await?;
    let from = match &since {
        Some((seq, _)) => seq.saturating_add(1),
        None => i64::try_from(from.max(1)).map_err(|_| {
            Error::OutOfRange(format!("from_sequence is beyond the head ({head_seq})"))
        })?,
    };
    if since.is_none() && from > head_seq.max(1) && !(from == 1 && head_seq == 0) {
        return Err(Error::OutOfRange(format!(
            "from_sequence {from} is beyond the head ({head_seq})"
        )));
    }
    let upto = if to == 0 {
        head_seq
    } else {
        i64::try_from(to).unwrap_or(i64::MAX).min(head_seq)
    };
    let now = state.clock.now_millis();
    let mut result = Verification {
        ok: true,
        head_seq,
        head_hash: head_hash.clone(),
        verified_at: now,
        ..Verification::default()
    };
    // The link into the range: the hash of the event before `from` (which
    // a receipt, when given, must agree with).
    let mut expected_prev = if from == 1 {
        GENESIS_HASH.to_owned()
    } else {
        match chain_rows(state, &tenant, from - 2, from - 1, 1)
            .await?
            .into_iter()
            .next()
        {
            Some(row) => match &since {
                Some((_, hash)) if *hash != row.hash => {
                    result.ok = false;
                    result.first_broken = from - 1;
                    result.failure = "receipt head mismatch".to_owned();
                    row.hash
                }
                _ => row.hash,
            },
            None => {
                result.ok = false;
                result.first_broken = from - 1;
                result.failure = if since.is_some() {
                    "receipt head missing"
                } else {
                    "missing sequence"
                }
                .to_owned();
                String::new()
            }
        }
    };
    // Reading and hashing overlap: the sequence range is cut into batches
    // read [`READERS`] at a time on connections of their own, while a
    // blocking thread checks the batch before, in order.
    let mut next = from;
    let ranges = if result.ok {
        seq_ranges(from - 1, upto, VERIFY_BATCH)
    } else {
        Vec::new()
    };
    let tenant_ref = tenant.as_str();
    let mut reads = futures::stream::iter(ranges)
        .map(|(after, end)| chain_rows(state, tenant_ref, after, end, VERIFY_BATCH))
        .buffered(READERS);
    let mut batch = reads.next().await.transpose()?;
    while let Some(rows) = batch {
        let owned_tenant = tenant.clone();
        let check = tokio::task::spawn_blocking(move || {
            check_batch(&owned_tenant, &rows, next, expected_prev)
        });
        let (checked, read) = tokio::join!(check, reads.next());
        let (count, at, prev, broken) = checked.map_err(Error::internal)??;
        result.checked += count;
        next = at;
        expected_prev = prev;
        if let Some((seq, what)) = broken {
            result.ok = false;
            result.first_broken = seq;
            result.failure = what.to_owned();
            break;
        }
        batch = read.transpose()?;
    }
    if result.ok && next <= upto {
        result.ok = false;
        result.first_broken = next;
        result.failure = "missing sequence".to_owned();
    }
    if result.ok && upto == head_seq && head_seq > 0 && expected_prev != head_hash {
        result.ok = false;
        result.first_broken = head_seq;
        result.failure = "head hash mismatch".to_owned();
    }
    result.unsealed = unsealed_count(state, &tenant).await?;
    if req.include_receipt {
        let claims = json!({
            "iss": state.keys.issuer(),
            "tenant_id": tenant,
            "head_sequence": head_seq,
            "head_hash": head_hash,
            "time": to_timestamp(now).to_string(),
        });
        let (receipt, _) = state
            .keys
            .sign_typed(
                vaultguard_proto::v1::TokenAlgorithm::Rs256,
                RECEIPT_TYPE,
                &claims,
            )
            .await?;
        result.receipt = receipt;
    }
    Ok(result)
}

/// Checks TailAuditEvents' input; returns the start cursor and the filter.
pub async fn tail_start(
    state: &AppState,
    ctx: &CallContext,
    req: &pb::TailAuditEventsRequest,
) -> Result<(String, i64, TypeFilter)> {
    let tenant = ctx.principal.tenant_id()?.to_owned();
    let mut v = Violations::new();
    let types = TypeFilter::parse("event_types", &req.event_types, &mut v);
    v.finish()?;
    let (head_seq, _) = head(state, &tenant).await?;
    let start = if req.start_at_head {
        head_seq
    } else {
        let after = i64::try_from(req.after_sequence)
            .map_err(|_| Error::OutOfRange("after_sequence is beyond the head".to_owned()))?;
        if after > head_seq {
            return Err(Error::OutOfRange(format!(
                "after_sequence {after} is beyond the head ({head_seq})"
            )));
        }
        after
    };
    Ok((tenant, start, types))
}

/// Checks ExportAuditEvents' input.
pub struct ExportPlan {
    pub tenant_id: String,
    pub csv: bool,
    pub range: (Option<Millis>, Option<Millis>),
    pub types: TypeFilter,
    /// The head when the export started: later events are not included.
    pub upto: i64,
}

pub async fn export_plan(
    state: &AppState,
    ctx: &CallContext,
    req: &pb::ExportAuditEventsRequest,
) -> Result<ExportPlan> {
    let tenant = ctx.principal.tenant_id()?.to_owned();
    let mut v = Violations::new();
    let format = v
        .take(validate::enum_value::<pb::ExportFormat>(
            "format", req.format, false,
        ))
        .flatten();
    let range = time_range(req.start_time.as_ref(), req.end_time.as_ref(), &mut v);
    let types = TypeFilter::parse("event_types", &req.event_types, &mut v);
    v.finish()?;
    let (upto, _) = head(state, &tenant).await?;
    Ok(ExportPlan {
        tenant_id: tenant,
        csv: format == Some(pb::ExportFormat::Csv),
        range,
        types,
        upto,
    })
}

/// Records a finished export in the tenant's log.
pub async fn record_export(
    state: &AppState,
    ctx: &CallContext,
    plan: &ExportPlan,
    count: u64,
    bytes: u64,
    sha256: &str,
) -> Result<()> {
    state
        .record(vec![ctx.audit().event(
            &plan.tenant_id,
            "audit.exported",
            Vec::new(),
            crate::audit::Outcome::Success,
            json!({
                "format": if plan.csv { "csv" } else { "ndjson" },
                "start": plan.range.0,
                "end": plan.range.1,
                "up_to_sequence": plan.upto,
                "event_count": count,
                "byte_count": bytes,
                "sha256": sha256,
            }),
        )])
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_cells_are_quoted_and_neutralised() {
        let cell = |s: &str| {
            let mut out = Vec::new();
            csv_cell(s, &mut out);
            String::from_utf8(out).unwrap()
        };
        assert_eq!(cell("plain"), "plain");
        assert_eq!(cell("a,b"), "\"a,b\"");
        assert_eq!(cell("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(cell("line\nbreak"), "\"line\nbreak\"");
        assert_eq!(cell("=SUM(A1)"), "'=SUM(A1)");
        assert_eq!(cell("-1,2"), "\"'-1,2\"");
        assert_eq!(cell("@x"), "'@x");
    }

    #[test]
    fn type_filters() {
        let mut v = Violations::new();
        let f = TypeFilter::parse(
            "t",
            &["delegation.*".to_owned(), "rule.created".to_owned()],
            &mut v,
        );
        assert!(v.finish().is_ok());
        assert!(f.matches("delegation.revoked"));
        assert!(f.matches("rule.created"));
        assert!(!f.matches("rule.deleted"));
        let mut v = Violations::new();
        TypeFilter::parse(
            "t",
            &[
                "Delegation.x".to_owned(),
                "a".to_owned(),
                "a.*.b".to_owned(),
            ],
            &mut v,
        );
        assert!(v.finish().is_err());
    }
}

/// Property tests of the export encoders (CSV read back by the `csv` crate,
/// NDJSON by serde_json), the proto view and the event-type filter.
#[cfg(test)]
mod props {
    use proptest::prelude::*;

    use super::*;
    use crate::props::{PURE_CASES, config};

    /// Strings rich in what CSV and JSON must escape.
    fn hostile_text() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<String>(),
            "[=+@\t\r\n\",' a-]{0,12}".prop_map(String::from),
            "[=+@\t\r-]?[a-z,\"\r\n]{0,6}".prop_map(String::from),
        ]
    }

    /// What a reader of the CSV gets back for `original`: formula-leading
    /// cells carry the documented `'` prefix.
    fn expected_cell(original: &str) -> String {
        if original.starts_with(['=', '+', '-', '@', '\t', '\r']) {
            format!("'{original}")
        } else {
            original.to_owned()
        }
    }

    fn read_csv(bytes: &[u8], headers: bool) -> Vec<Vec<String>> {
        csv::ReaderBuilder::new()
            .has_headers(headers)
            .from_reader(bytes)
            .records()
            .map(|record| {
                record
                    .expect("the csv crate reads every record")
                    .iter()
                    .map(str::to_owned)
                    .collect()
            })
            .collect()
    }

    fn row_strategy() -> impl Strategy<Value = AuditRow> {
        let details = prop_oneof![
            crate::props::json_value().prop_map(|v| v.to_string()),
            hostile_text(),
        ];
        let subjects = prop_oneof![
            prop::collection::vec(hostile_text(), 0..3)
                .prop_map(|ids| serde_json::to_string(&ids).unwrap()),
            hostile_text(),
        ];
        (
            (
                hostile_text(),
                hostile_text(),
                -10_000_000_000_000i64..10_000_000_000_000,
                hostile_text(),
                hostile_text(),
                hostile_text(),
            ),
            (
                hostile_text(),
                subjects,
                hostile_text(),
                hostile_text(),
                details,
            ),
            (
                prop::option::of(any::<i64>()),
                prop::option::of(hostile_text()),
                prop::option::of(hostile_text()),
            ),
        )
            .prop_map(
                |(
                    (event_id, tenant_id, occurred_at, actor_kind, actor_subject, actor_tenant_id),
                    (event_type, subject_ids, outcome, request_id, details),
                    (seq, prev_hash, hash),
                )| AuditRow {
                    event: audit_event::Model {
                        id: 1,
                        event_id,
                        tenant_id,
                        occurred_at,
                        actor_kind,
                        actor_subject,
                        actor_tenant_id,
                        event_type,
                        subject_ids,
                        outcome,
                        request_id,
                        details,
                    },
                    seq,
                    prev_hash,
                    hash,
                },
            )
    }

    proptest! {
        #![proptest_config(config(PURE_CASES))]

        #[test]
        fn csv_cells_read_back_as_written(
            before in hostile_text(),
            cell in hostile_text(),
            after in hostile_text(),
        ) {
            let mut out = Vec::new();
            for (i, value) in [&before, &cell, &after].into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                csv_cell(value, &mut out);
            }
            out.extend_from_slice(b"\r\n");
            let records = read_csv(&out, false);
            prop_assert_eq!(records.len(), 1, "one record, never a split row: {:?}", String::from_utf8_lossy(&out));
            prop_assert_eq!(
                &records[0],
                &vec![expected_cell(&before), expected_cell(&cell), expected_cell(&after)]
            );
        }

        #[test]
        fn csv_exports_read_back_row_for_row(rows in prop::collection::vec(row_strategy(), 0..4)) {
            let mut out = CSV_HEADER.as_bytes().to_vec();
            for row in &rows {
                csv_line(row, &mut out);
            }
            let records = read_csv(&out, true);
            prop_assert_eq!(records.len(), rows.len());
            for (row, record) in rows.iter().zip(&records) {
                prop_assert_eq!(record.len(), 14);
                // Each cell read back as it was before escaping.
                let expected = csv_cells(row);
                prop_assert_eq!(&expected[0], &row.event.tenant_id);
                prop_assert_eq!(&expected[11], &row.event.details);
                for (got, original) in record.iter().zip(&expected) {
                    prop_assert_eq!(got, &expected_cell(original));
                }
            }
        }

        #[test]
        fn ndjson_lines_are_one_json_object_each(rows in prop::collection::vec(row_strategy(), 0..4)) {
            let mut out = Vec::new();
            for row in &rows {
                ndjson_line(row, &mut out).unwrap();
            }
            let text = String::from_utf8(out).unwrap();
            let lines: Vec<&str> = text.split_terminator('\n').collect();
            prop_assert_eq!(lines.len(), rows.len());
            for (row, line) in rows.iter().zip(lines) {
                let value: Value = serde_json::from_str(line).unwrap();
                let e = &row.event;
                prop_assert_eq!(value["event_id"].as_str(), Some(e.event_id.as_str()));
                prop_assert_eq!(value["tenant_id"].as_str(), Some(e.tenant_id.as_str()));
                prop_assert_eq!(value["actor"]["subject"].as_str(), Some(e.actor_subject.as_str()));
                prop_assert_eq!(value["event_type"].as_str(), Some(e.event_type.as_str()));
                prop_assert_eq!(value["request_id"].as_str(), Some(e.request_id.as_str()));
                prop_assert_eq!(value["sequence"].as_str().map(str::to_owned), Some(row.seq.unwrap_or(0).to_string()));
                prop_assert_eq!(
                    &value["details"],
                    &serde_json::from_str::<Value>(&e.details).unwrap_or(Value::Null)
                );
                prop_assert_eq!(
                    &value["subject_ids"],
                    &serde_json::from_str::<Value>(&e.subject_ids).unwrap_or(Value::Array(Vec::new()))
                );
            }
        }

        #[test]
        fn the_proto_view_never_panics(row in row_strategy()) {
            let event = to_proto(&row);
            prop_assert_eq!(event.event_id, row.event.event_id);
        }

        #[test]
        fn timestamps_of_any_stored_time_render(millis in any::<i64>()) {
            let _ = to_timestamp(millis).to_string();
        }

        #[test]
        fn type_filters_never_panic(
            types in prop::collection::vec(
                prop_oneof!["[a-z_]{1,6}\\.(\\*|[a-z_]{1,6})".prop_map(String::from), "[a-zA-Z._*%\\\\]{0,10}".prop_map(String::from), any::<String>()],
                0..40,
            ),
            event_type in prop_oneof!["[a-z_]{1,6}\\.[a-z_]{1,6}".prop_map(String::from), any::<String>()],
        ) {
            let mut v = Violations::new();
            let filter = TypeFilter::parse("event_types", &types, &mut v);
            if v.finish().is_ok() {
                let matched = filter.matches(&event_type);
                let expected = types.is_empty()
                    || types.iter().any(|t| match t.strip_suffix('*') {
                        Some(area) => event_type.starts_with(area),
                        None => t == &event_type,
                    });
                prop_assert_eq!(matched, expected);
                let mut values = Vec::new();
                let _ = filter.sql("e.event_type", &mut values);
            }
        }
    }
}
