//! The audit log in the database itself: `audit_events` and `audit_chain`
//! refuse UPDATE and DELETE on both backends, the sealer links every event of
//! a tenant into a gapless, verifiable hash chain (also under concurrent
//! writers), and state changes leave the expected event types behind.

use std::collections::HashMap;

use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseConnection, DbBackend, EntityTrait, QueryFilter,
    Statement,
};
use vaultguard_client::pb;
use vaultguard_server::audit::{
    GENESIS_HASH, PLATFORM_LOG, chain_hash, pending_events_sql, placeholders, vacuum_pending,
};
use vaultguard_server::store::entities::audit_event;
use vaultguard_tests::Rpc;
use vaultguard_tests::require_backend;
use vaultguard_tests::{Backend, TestServer, backend};

/// Every audit event of `tenant_id`, by row id.
async fn events_of(db: &DatabaseConnection, tenant_id: &str) -> HashMap<i64, audit_event::Model> {
    audit_event::Entity::find()
        .filter(audit_event::Column::TenantId.eq(tenant_id))
        .all(db)
        .await
        .expect("load audit events")
        .into_iter()
        .map(|event| (event.id, event))
        .collect()
}

/// The event types of `tenant_id`'s log.
async fn event_types_of(db: &DatabaseConnection, tenant_id: &str) -> Vec<String> {
    events_of(db, tenant_id)
        .await
        .into_values()
        .map(|event| event.event_type)
        .collect()
}

/// Verifies `tenant_id`'s chain link by link against its events and its
/// head; returns its length. Panics on any gap, broken link or unsealed event.
async fn verify_chain(db: &DatabaseConnection, tenant_id: &str) -> i64 {
    let backend = db.get_database_backend();
    let events = events_of(db, tenant_id).await;
    let rows = db
        .query_all_raw(Statement::from_sql_and_values(
            backend,
            placeholders(
                backend,
                "SELECT seq, event_row_id, prev_hash, hash FROM audit_chain WHERE tenant_id = ? ORDER BY seq",
            ),
            [tenant_id.into()],
        ))
        .await
        .expect("load audit chain");
    let mut prev_hash = GENESIS_HASH.to_owned();
    let mut expected_seq = 0_i64;
    for row in &rows {
        expected_seq += 1;
        let seq: i64 = row.try_get("", "seq").expect("seq");
        let event_row_id: i64 = row.try_get("", "event_row_id").expect("event_row_id");
        let stored_prev: String = row.try_get("", "prev_hash").expect("prev_hash");
        let stored_hash: String = row.try_get("", "hash").expect("hash");
        assert_eq!(
            seq, expected_seq,
            "chain of {tenant_id} has a gap or duplicate before seq {expected_seq}"
        );
        let event = events
            .get(&event_row_id)
            .unwrap_or_else(|| panic!("chain link {seq} of {tenant_id} points at row {event_row_id}, not an event of the tenant"));
        assert_eq!(
            stored_prev, prev_hash,
            "link {seq} of {tenant_id}: prev_hash is not the previous link's hash"
        );
        assert_eq!(
            chain_hash(event, seq, &prev_hash).expect("chain hash"),
            stored_hash,
            "link {seq} of {tenant_id}: hash does not match its event"
        );
        prev_hash = stored_hash;
    }
    let length = i64::try_from(rows.len()).expect("chain length");
    assert_eq!(
        length,
        i64::try_from(events.len()).expect("event count"),
        "every event of {tenant_id} is sealed exactly once"
    );
    let head = db
        .query_one_raw(Statement::from_sql_and_values(
            backend,
            placeholders(
                backend,
                "SELECT seq, hash FROM audit_heads WHERE tenant_id = ?",
            ),
            [tenant_id.into()],
        ))
        .await
        .expect("load audit head")
        .unwrap_or_else(|| panic!("no audit head for {tenant_id}"));
    assert_eq!(
        head.try_get::<i64>("", "seq").expect("head seq"),
        length,
        "head seq of {tenant_id}"
    );
    assert_eq!(
        head.try_get::<String>("", "hash").expect("head hash"),
        prev_hash,
        "head hash of {tenant_id}"
    );
    length
}

/// Creates an agent, rotates its secret; returns the tenant id.
async fn a_few_changes(server: &TestServer, slug: &str) -> String {
    let tenant = server.create_tenant(slug).await;
    let (agent, _secret, _client) = server.create_agent(&tenant.id, "builder").await;
    let admin = server.admin(&tenant.id, "admin@test").await;
    vaultguard_tests::calls::rotate_secret(&admin, &agent.id)
        .await
        .expect("rotate secret");
    tenant.id
}

/// Runs `sql` directly and asserts the database refused it as an audit
/// change (not for some unrelated reason).
async fn assert_refused(db: &DatabaseConnection, sql: &str) {
    match db.execute_unprepared(sql).await {
        Ok(result) => panic!(
            "`{sql}` was allowed ({} rows affected)",
            result.rows_affected()
        ),
        Err(err) => assert!(
            err.to_string().contains("append-only"),
            "`{sql}` failed, but not because the audit log is append-only: {err}"
        ),
    }
}

#[tokio::test]
async fn audit_tables_refuse_update_and_delete() {
    let server = TestServer::start().await;
    let tenant_id = a_few_changes(&server, "tamper").await;
    server.wait_sealed().await;
    let db = &server.state.db;
    let events_before = server.count("audit_events").await;
    let chain_before = server.count("audit_chain").await;
    assert!(
        events_before >= 4,
        "expected audit events, found {events_before}"
    );
    assert_eq!(chain_before, events_before, "every event is sealed");

    assert_refused(db, "UPDATE audit_events SET details = '{}'").await;
    assert_refused(
        db,
        &format!("UPDATE audit_events SET outcome = 'denied' WHERE tenant_id = '{tenant_id}'"),
    )
    .await;
    assert_refused(db, "DELETE FROM audit_events").await;
    assert_refused(
        db,
        &format!("DELETE FROM audit_events WHERE tenant_id = '{tenant_id}'"),
    )
    .await;
    assert_refused(db, "UPDATE audit_chain SET hash = prev_hash").await;
    assert_refused(
        db,
        &format!("UPDATE audit_chain SET seq = seq + 1000 WHERE tenant_id = '{tenant_id}'"),
    )
    .await;
    assert_refused(db, "DELETE FROM audit_chain").await;
    assert_refused(
        db,
        &format!("DELETE FROM audit_chain WHERE tenant_id = '{tenant_id}'"),
    )
    .await;
    if backend() == Backend::Postgres {
        assert_refused(db, "TRUNCATE audit_chain").await;
        assert_refused(db, "TRUNCATE audit_events CASCADE").await;
    }

    assert_eq!(
        server.count("audit_events").await,
        events_before,
        "audit_events rows unchanged"
    );
    assert_eq!(
        server.count("audit_chain").await,
        chain_before,
        "audit_chain rows unchanged"
    );
    verify_chain(db, &tenant_id).await;
    verify_chain(db, PLATFORM_LOG).await;
    server.stop().await;
}

/// Statements that would rewrite existing audit rows through an insert:
/// SQLite's REPLACE conflict resolution deletes the old row without firing
/// delete triggers (unless `recursive_triggers` is on), and upserts update.
fn rewriting_inserts(tenant_id: &str) -> Vec<String> {
    let events = "INTO audit_events (id, event_id, tenant_id, occurred_at, actor_kind, actor_subject, actor_tenant_id, \
                  event_type, subject_ids, outcome, request_id, details) \
                  SELECT id, event_id, tenant_id, occurred_at, actor_kind, actor_subject, actor_tenant_id, \
                  event_type, subject_ids, 'denied', request_id, '{\"forged\":true}' FROM audit_events";
    let chain = "INTO audit_chain (tenant_id, seq, event_row_id, prev_hash, hash, sealed_at) \
                 SELECT tenant_id, seq, event_row_id, prev_hash, 'forged', sealed_at FROM audit_chain";
    let filter = format!("WHERE tenant_id = '{tenant_id}'");
    match backend() {
        Backend::Sqlite => vec![
            format!("INSERT OR REPLACE {events} {filter}"),
            format!("REPLACE {chain} {filter}"),
            format!(
                "INSERT {events} {filter} AND true ON CONFLICT (id) DO UPDATE SET details = excluded.details"
            ),
            format!(
                "INSERT {chain} {filter} AND true ON CONFLICT (tenant_id, seq) DO UPDATE SET hash = excluded.hash"
            ),
        ],
        Backend::Postgres => vec![
            format!(
                "INSERT {events} {filter} ON CONFLICT (id) DO UPDATE SET details = excluded.details"
            ),
            format!(
                "INSERT {chain} {filter} ON CONFLICT (tenant_id, seq) DO UPDATE SET hash = excluded.hash"
            ),
        ],
    }
}

#[tokio::test]
async fn audit_rows_cannot_be_rewritten_by_insert() {
    let server = TestServer::start().await;
    let tenant_id = a_few_changes(&server, "replace").await;
    server.wait_sealed().await;
    let db = &server.state.db;
    let events_before = server.count("audit_events").await;
    let chain_before = server.count("audit_chain").await;
    let mut allowed = Vec::new();
    for sql in rewriting_inserts(&tenant_id) {
        match db.execute_unprepared(&sql).await {
            Ok(result) => allowed.push(format!(
                "`{sql}` ({} rows affected)",
                result.rows_affected()
            )),
            Err(err) => assert!(
                err.to_string().contains("append-only"),
                "`{sql}` failed for another reason: {err}"
            ),
        }
    }
    assert!(
        allowed.is_empty(),
        "audit rows were rewritten through inserts:\n{}",
        allowed.join("\n")
    );
    assert_eq!(server.count("audit_events").await, events_before);
    assert_eq!(server.count("audit_chain").await, chain_before);
    verify_chain(db, &tenant_id).await;
    server.stop().await;
}

#[tokio::test]
async fn sealed_chain_is_gapless_and_verifies() {
    let server = TestServer::start().await;
    let tenant_id = a_few_changes(&server, "chain").await;
    let other_id = a_few_changes(&server, "other").await;
    server.wait_sealed().await;
    let db = &server.state.db;
    assert_eq!(
        verify_chain(db, &tenant_id).await,
        3,
        "tenant.created, agent.created, agent.secret_rotated"
    );
    assert_eq!(verify_chain(db, &other_id).await, 3);
    // Startup's issuer keys plus one tenant.created per tenant.
    assert!(verify_chain(db, PLATFORM_LOG).await >= 2);

    // A later change extends the same chain.
    server.create_agent(&tenant_id, "second").await;
    server.wait_sealed().await;
    assert_eq!(verify_chain(db, &tenant_id).await, 4);
    server.stop().await;
}

#[tokio::test]
async fn concurrent_writers_yield_a_gapless_chain() {
    const TASKS: usize = 8;
    const AGENTS_PER_TASK: usize = 25;
    let server = TestServer::start().await;
    let tenant = server.create_tenant("busy").await;
    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let admin = server.admin(&tenant.id, "admin@test").await;
        tasks.push(tokio::spawn(async move {
            for n in 0..AGENTS_PER_TASK {
                admin
                    .create_agent(pb::CreateAgentRequest {
                        name: format!("agent-{task}-{n}"),
                        description: String::new(),
                    })
                    .await
                    .expect("create agent");
            }
        }));
    }
    for task in tasks {
        task.await.expect("writer task");
    }
    server.wait_sealed().await;
    let db = &server.state.db;
    let total = i64::try_from(events_of(db, &tenant.id).await.len()).expect("count");
    assert_eq!(
        total,
        i64::try_from(1 + TASKS * AGENTS_PER_TASK).expect("expected"),
        "one event per change"
    );
    assert_eq!(verify_chain(db, &tenant.id).await, total);
    server.stop().await;
}

/// The sealer reads a tenant's pending events by key however long the log
/// grows. A pooled PostgreSQL connection plans a statement once
/// (`force_generic_plan`), often while the statistics still say the tables
/// are empty; planned that way, the read scanned every audit event ever
/// written on every sealing round. The server's sessions price sequential
/// scans out (`enable_seqscan = off`), so the plan made on an empty
/// database is a key lookup, and `audit_pending`'s only index leads with
/// the tenant.
#[tokio::test]
async fn postgres_only_sealing_reads_pending_events_by_key_whatever_the_statistics() {
    require_backend(Backend::Postgres);
    let server = TestServer::start().await;
    // The server's own pool, with its session settings.
    let db = &server.state.db;
    let txn = vaultguard_server::store::begin(db)
        .await
        .expect("one connection");
    let sql = pending_events_sql(DbBackend::Postgres);
    for statement in [
        // The statistics of a young database: a handful of events.
        "ANALYZE audit_events".to_owned(),
        "ANALYZE audit_pending".to_owned(),
        format!("PREPARE pending_events (TEXT, BIGINT) AS {sql}"),
    ] {
        txn.execute_unprepared(&statement).await.expect(&statement);
    }
    let plan: Vec<String> = txn
        .query_all_raw(Statement::from_string(
            DbBackend::Postgres,
            "EXPLAIN EXECUTE pending_events ('ten_any', 500)",
        ))
        .await
        .expect("explain")
        .iter()
        .map(|row| row.try_get_by_index::<String>(0).expect("plan line"))
        .collect();
    txn.rollback().await.expect("rollback");
    let plan = plan.join("\n");
    assert!(
        plan.contains("Index Scan using audit_events_pkey")
            && !plan.contains("Seq Scan on audit_events"),
        "the sealer's statement scans the log:\n{plan}"
    );
    // And only the tenant's pending rows, not every tenant's.
    assert!(
        plan.contains("Index Cond: (tenant_id = $1)") && !plan.contains("Filter: (tenant_id"),
        "the sealer's statement reads other tenants' pending rows:\n{plan}"
    );
    server.stop().await;
}

/// The sealer's vacuum of `audit_pending` (PostgreSQL) runs on the server's
/// pool, outside any transaction, and leaves the chain whole.
#[tokio::test]
async fn postgres_only_vacuuming_the_pending_queue_works_on_the_pool_and_keeps_the_chain() {
    require_backend(Backend::Postgres);
    let server = TestServer::start().await;
    let tenant_id = a_few_changes(&server, "vacuumed").await;
    server.wait_sealed().await;
    vacuum_pending(&server.state.db)
        .await
        .expect("VACUUM audit_pending");
    a_few_changes(&server, "after-vacuum").await;
    server.wait_sealed().await;
    verify_chain(&server.state.db, &tenant_id).await;
    server.stop().await;
}

#[tokio::test]
async fn state_changes_leave_expected_event_types() {
    let server = TestServer::start().await;
    let tenant_id = a_few_changes(&server, "types").await;
    server.wait_sealed().await;
    let db = &server.state.db;
    let tenant_types = event_types_of(db, &tenant_id).await;
    for expected in ["tenant.created", "agent.created", "agent.secret_rotated"] {
        assert!(
            tenant_types.iter().any(|t| t == expected),
            "{expected} missing from the tenant's log: {tenant_types:?}"
        );
    }
    let platform_events = events_of(db, PLATFORM_LOG).await;
    assert!(
        platform_events
            .values()
            .any(|e| e.event_type == "tenant.created" && e.subject_ids.contains(&tenant_id)),
        "tenant.created for {tenant_id} missing from the platform log"
    );
    // Agent events belong to the tenant only.
    assert!(
        platform_events
            .values()
            .all(|e| !e.event_type.starts_with("agent.")),
        "agent events leaked into the platform log"
    );
    server.stop().await;
}
