//! AuditService end to end, on the backend named by `VAULTGUARD_TEST_DB`:
//! every state-changing RPC of the contract leaves its audit event (the test
//! walks the compiled descriptor, so a new RPC without an entry in its tables
//! fails), tampering with sealed rows is named by VerifyAuditChain, a tail
//! opened before 8 × 500 concurrent writes sees every sequence exactly once
//! in order, CSV and NDJSON exports round-trip through independent parsers
//! (Python's `csv` module; the descriptor's field names), list filters and
//! pages agree with a local filter of the whole log, the tail resumes and
//! filters as documented, and a tenant's log is its own: other tenants'
//! auditors, operators, approvers and agents read nothing of it.

use std::collections::{BTreeSet, HashMap};
use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use prost::Message;
use sea_orm::{ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, Statement};
use serde_json::{Value, json};
use tonic::Code;
use vaultguard_client::{ClientError, VaultGuardClient, pb};
use vaultguard_server::audit::PLATFORM_LOG;
use vaultguard_server::clock::Clock;
use vaultguard_server::store::entities::audit_event;
use vaultguard_tests::oauth_provider::{FakeProvider, ProviderOptions};
use vaultguard_tests::{
    Backend, TestOptions, TestServer, backend, expect_code, expect_invalid, expect_reason,
};

use crate::delegations::{Pair, ask, setup_pair};
use crate::policies::{add_rule, inbound, with_counterpart};

use pb::export_audit_events_response::Part;
use pb::tail_audit_events_response::Item;
use vaultguard_tests::Rpc;
use vaultguard_tests::Tag;
use vaultguard_tests::contract::{call_empty, every_method};
use vaultguard_tests::require_backend;
use vaultguard_tests::rpc::Tagged;

// ---------------------------------------------------------------------------
// The audit tables: every RPC of the contract is in exactly one of them.

/// RPCs that change nothing and so write no audit event (a refused
/// cross-tenant read may still be recorded as a refusal; that is not a
/// state change).
const READ_ONLY: &[&str] = &[
    "TenantService/GetTenant",
    "TenantService/ListTenants",
    "AgentService/GetAgent",
    "AgentService/ListAgents",
    "AuthService/WhoAmI",
    "IssuerKeyService/GetJwks",
    "IssuerKeyService/ListIssuerKeys",
    "PolicyService/GetRule",
    "PolicyService/ListRules",
    "PolicyService/GetBudget",
    "PolicyService/ListBudgets",
    "PolicyService/GetPolicySettings",
    "DelegationService/GetDelegation",
    "DelegationService/ListDelegations",
    "StepUpService/GetStepUp",
    "StepUpService/ListPendingStepUps",
    "StepUpService/WatchPendingStepUps",
    "StepUpService/GetApprovalWebhook",
    "VaultService/GetOAuthProvider",
    "VaultService/ListOAuthProviders",
    "VaultService/GetConnection",
    "VaultService/ListConnections",
    "VaultService/GetSigningKey",
    "VaultService/ListSigningKeys",
    "VaultService/GetVaultSettings",
    "AuditService/ListAuditEvents",
    "AuditService/TailAuditEvents",
    "AuditService/VerifyAuditChain",
];

/// RPCs that change state (or are audited by contract, like the
/// EvaluatePolicy dry run and token verification), with the event types
/// each may write.
const AUDITED: &[(&str, &[&str])] = &[
    ("TenantService/CreateTenant", &["tenant.created"]),
    ("TenantService/SuspendTenant", &["tenant.suspended"]),
    ("TenantService/ReactivateTenant", &["tenant.reactivated"]),
    (
        "TenantService/FreezeTenantTraffic",
        &["tenant.traffic_frozen"],
    ),
    (
        "TenantService/UnfreezeTenantTraffic",
        &["tenant.traffic_unfrozen"],
    ),
    (
        "TenantService/BindExternalOrganization",
        &["tenant.organization_bound"],
    ),
    (
        "TenantService/UnbindExternalOrganization",
        &["tenant.organization_unbound"],
    ),
    (
        "TenantService/UpdateTenantSettings",
        &["tenant.settings_updated"],
    ),
    ("AgentService/CreateAgent", &["agent.created"]),
    ("AgentService/DisableAgent", &["agent.disabled"]),
    ("AgentService/EnableAgent", &["agent.enabled"]),
    ("AgentService/RotateAgentSecret", &["agent.secret_rotated"]),
    ("AgentService/FreezeAgent", &["agent.frozen"]),
    ("AgentService/UnfreezeAgent", &["agent.unfrozen"]),
    (
        "AuthService/IssueToken",
        &["auth.token_issued", "auth.token_refused"],
    ),
    ("IssuerKeyService/RotateIssuerKey", &["issuer_key.rotated"]),
    ("PolicyService/CreateRule", &["rule.created"]),
    ("PolicyService/UpdateRule", &["rule.updated"]),
    ("PolicyService/DeleteRule", &["rule.deleted"]),
    ("PolicyService/CreateBudget", &["budget.created"]),
    ("PolicyService/UpdateBudget", &["budget.updated"]),
    ("PolicyService/DeleteBudget", &["budget.deleted"]),
    ("PolicyService/EvaluatePolicy", &["policy.evaluated"]),
    (
        "PolicyService/UpdatePolicySettings",
        &["policy.settings_updated"],
    ),
    (
        "DelegationService/RequestDelegation",
        &[
            "delegation.decided",
            "delegation.token_issued",
            "delegation.token_reissued",
            "delegation.refused",
        ],
    ),
    (
        "DelegationService/RevokeDelegation",
        &["delegation.revoked"],
    ),
    (
        "DelegationService/RelinquishDelegation",
        &["delegation.relinquished"],
    ),
    (
        "DelegationService/VerifyDelegationToken",
        &["delegation.verified"],
    ),
    ("StepUpService/PollStepUp", &["step_up.redeemed"]),
    ("StepUpService/WatchStepUp", &["step_up.redeemed"]),
    (
        "StepUpService/ApproveStepUp",
        &["step_up.approved", "step_up.approval_recorded"],
    ),
    ("StepUpService/DenyStepUp", &["step_up.denied"]),
    (
        "StepUpService/SetApprovalWebhook",
        &["webhook.set", "webhook.removed"],
    ),
    ("AuditService/ExportAuditEvents", &["audit.exported"]),
    ("VaultService/CreateOAuthProvider", &["provider.created"]),
    (
        "VaultService/UpdateOAuthProvider",
        &["provider.updated", "connection.needs_reauth"],
    ),
    ("VaultService/DeleteOAuthProvider", &["provider.deleted"]),
    (
        "VaultService/StartConnection",
        &[
            "connection.started",
            "connection.connected",
            "connection.callback_refused",
            "connection.failed",
        ],
    ),
    (
        "VaultService/DeleteConnection",
        &["connection.disconnected"],
    ),
    (
        "VaultService/ExchangeToken",
        &[
            "connection.token_exchanged",
            "connection.needs_reauth",
            "connection.exchange_refused",
            "delegation.decided",
        ],
    ),
    ("VaultService/CreateSigningKey", &["key.created"]),
    ("VaultService/UpdateSigningKey", &["key.updated"]),
    ("VaultService/DisableSigningKey", &["key.disabled"]),
    (
        "VaultService/Sign",
        &["key.signed", "key.sign_refused", "delegation.decided"],
    ),
    (
        "VaultService/UpdateVaultSettings",
        &["vault.settings_updated"],
    ),
];

/// The areas an event type may start with (AuditService's contract).
const AREAS: &[&str] = &[
    "tenant",
    "agent",
    "auth",
    "rule",
    "budget",
    "policy",
    "delegation",
    "step_up",
    "webhook",
    "provider",
    "connection",
    "key",
    "issuer_key",
    "audit",
    "vault",
];

fn audited(rpc: &str) -> Option<&'static [&'static str]> {
    AUDITED
        .iter()
        .find(|(name, _)| *name == rpc)
        .map(|(_, types)| *types)
}

/// The field names of message `vaultguard.v1.<name>`, from the descriptor.
fn message_fields(name: &str) -> BTreeSet<String> {
    let set = prost_types::FileDescriptorSet::decode(vaultguard_proto::FILE_DESCRIPTOR_SET)
        .expect("descriptor set");
    set.file
        .iter()
        .filter(|file| file.package() == "vaultguard.v1")
        .flat_map(|file| file.message_type.iter())
        .find(|message| message.name() == name)
        .unwrap_or_else(|| panic!("no message {name}"))
        .field
        .iter()
        .map(|field| field.name().to_owned())
        .collect()
}

// ---------------------------------------------------------------------------
// AuditService calls.

async fn list(
    reader: &VaultGuardClient,
    filter: pb::ListAuditEventsRequest,
) -> Result<pb::ListAuditEventsResponse, ClientError> {
    reader.list_audit_events(filter).await
}

/// Every event matching `filter` through all pages of `page_size`.
async fn list_pages(
    reader: &VaultGuardClient,
    filter: pb::ListAuditEventsRequest,
    page_size: u32,
) -> Vec<pb::AuditEvent> {
    let mut events = Vec::new();
    let mut token = String::new();
    loop {
        let page = list(
            reader,
            pb::ListAuditEventsRequest {
                page: Some(pb::PageRequest {
                    page_size,
                    page_token: token.clone(),
                }),
                ..filter.clone()
            },
        )
        .await
        .expect("list audit events");
        assert!(
            page.events.len() <= usize::try_from(page_size).expect("size"),
            "a page of {page_size} held {} events",
            page.events.len()
        );
        events.extend(page.events);
        token = page.page.map(|p| p.next_page_token).unwrap_or_default();
        if token.is_empty() {
            return events;
        }
    }
}

fn oldest_first() -> pb::ListAuditEventsRequest {
    pb::ListAuditEventsRequest {
        order: pb::AuditOrder::OldestFirst as i32,
        ..Default::default()
    }
}

/// The whole sealed log, oldest first.
async fn whole_log(reader: &VaultGuardClient) -> Vec<pb::AuditEvent> {
    list_pages(reader, oldest_first(), 500).await
}

async fn verify(
    reader: &VaultGuardClient,
    from_sequence: u64,
    to_sequence: u64,
    include_receipt: bool,
) -> Result<pb::VerifyAuditChainResponse, ClientError> {
    reader
        .verify_audit_chain(pb::VerifyAuditChainRequest {
            from_sequence,
            to_sequence,
            include_receipt,
            ..Default::default()
        })
        .await
}

/// VerifyAuditChain from `receipt` on, with a new receipt.
async fn verify_since(
    reader: &VaultGuardClient,
    receipt: &str,
) -> Result<pb::VerifyAuditChainResponse, ClientError> {
    reader
        .verify_audit_chain(pb::VerifyAuditChainRequest {
            since_receipt: receipt.to_owned(),
            include_receipt: true,
            ..Default::default()
        })
        .await
}

type Tail = tonic::Streaming<pb::TailAuditEventsResponse>;

async fn tail(
    reader: &VaultGuardClient,
    request: pb::TailAuditEventsRequest,
) -> Result<Tail, ClientError> {
    reader.tail_audit_events(request).await
}

fn tail_after(after_sequence: u64) -> pb::TailAuditEventsRequest {
    pb::TailAuditEventsRequest {
        after_sequence,
        heartbeat_interval_seconds: 1,
        ..Default::default()
    }
}

/// The next tail message; panics on an error, the end, or 10 s of silence.
async fn next_tail(stream: &mut Tail) -> pb::TailAuditEventsResponse {
    match tokio::time::timeout(Duration::from_secs(10), stream.message()).await {
        Ok(Ok(Some(message))) => message,
        Ok(Ok(None)) => panic!("the tail ended"),
        Ok(Err(status)) => panic!("the tail failed: {:?}", ClientError::from(status)),
        Err(_) => panic!("no tail message within 10 s"),
    }
}

/// Tail messages until the first heartbeat: the events before it and the
/// heartbeat's cursor.
async fn tail_until_heartbeat(stream: &mut Tail) -> (Vec<pb::AuditEvent>, u64) {
    let mut events = Vec::new();
    loop {
        let message = next_tail(stream).await;
        match message.item {
            Some(Item::Event(event)) => {
                assert_eq!(message.sequence, event.sequence, "an event's cursor");
                events.push(event);
            }
            Some(Item::Heartbeat(beat)) => {
                assert!(beat.time.is_some(), "a heartbeat carries the time");
                return (events, message.sequence);
            }
            None => panic!("a tail message without item"),
        }
    }
}

/// An export concatenated, with its summary.
#[derive(Debug)]
struct Exported {
    file: Vec<u8>,
    summary: pb::ExportSummary,
}

async fn export(
    reader: &VaultGuardClient,
    request: pb::ExportAuditEventsRequest,
) -> Result<Exported, ClientError> {
    let mut stream = reader.export_audit_events(request).await?;
    let mut file = Vec::new();
    let mut summary = None;
    while let Some(message) = stream.message().await? {
        assert!(summary.is_none(), "a message after the summary");
        match message.part.expect("export message without part") {
            Part::Data(chunk) => {
                assert!(
                    (1..=64 * 1024).contains(&chunk.len()),
                    "chunk of {} bytes",
                    chunk.len()
                );
                file.extend_from_slice(&chunk);
            }
            Part::Summary(last) => summary = Some(last),
        }
    }
    Ok(Exported {
        file,
        summary: summary.expect("the export ended without a summary"),
    })
}

fn export_all(format: pb::ExportFormat) -> pb::ExportAuditEventsRequest {
    pb::ExportAuditEventsRequest {
        format: format as i32,
        ..Default::default()
    }
}

fn sha256_hex(data: &[u8]) -> String {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn millis(ts: Option<&prost_types::Timestamp>) -> i64 {
    let ts = ts.expect("timestamp");
    ts.seconds * 1000 + i64::from(ts.nanos) / 1_000_000
}

fn timestamp(millis: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: millis.div_euclid(1000),
        nanos: i32::try_from(millis.rem_euclid(1000) * 1_000_000).expect("nanos"),
    }
}

fn struct_json(details: Option<&prost_types::Struct>) -> Value {
    fn value(v: &prost_types::Value) -> Value {
        use prost_types::value::Kind;
        match &v.kind {
            None | Some(Kind::NullValue(_)) => Value::Null,
            Some(Kind::BoolValue(b)) => json!(b),
            Some(Kind::NumberValue(n)) => json!(n),
            Some(Kind::StringValue(s)) => json!(s),
            Some(Kind::ListValue(list)) => Value::Array(list.values.iter().map(value).collect()),
            Some(Kind::StructValue(s)) => Value::Object(
                s.fields
                    .iter()
                    .map(|(k, v)| (k.clone(), value(v)))
                    .collect(),
            ),
        }
    }
    match details {
        Some(s) => Value::Object(
            s.fields
                .iter()
                .map(|(k, v)| (k.clone(), value(v)))
                .collect(),
        ),
        None => Value::Null,
    }
}

/// `value` with every number as a float, to compare a Struct (doubles) with
/// the stored JSON.
fn floats(value: Value) -> Value {
    match value {
        Value::Number(n) => json!(n.as_f64().expect("number")),
        Value::Array(items) => Value::Array(items.into_iter().map(floats).collect()),
        Value::Object(map) => Value::Object(map.into_iter().map(|(k, v)| (k, floats(v))).collect()),
        other => other,
    }
}

fn kind_name(kind: i32) -> String {
    pb::PrincipalKind::try_from(kind)
        .expect("principal kind")
        .as_str_name()
        .trim_start_matches("PRINCIPAL_KIND_")
        .to_lowercase()
}

fn outcome_name(outcome: i32) -> String {
    pb::AuditOutcome::try_from(outcome)
        .expect("outcome")
        .as_str_name()
        .trim_start_matches("AUDIT_OUTCOME_")
        .to_lowercase()
}

/// The chain hash of `event` per the formula in audit_service.proto, from
/// the stored `details` string (as the CSV export carries it).
fn spec_hash(event: &pb::AuditEvent, details: &str) -> String {
    let actor = event.actor.clone().expect("actor");
    let canonical = json!([
        event.tenant_id,
        event.sequence,
        event.event_id,
        millis(event.time.as_ref()),
        kind_name(actor.kind),
        actor.subject,
        actor.tenant_id,
        event.event_type,
        serde_json::to_string(&event.subject_ids).expect("subject ids"),
        outcome_name(event.outcome),
        event.request_id,
        details,
        event.prev_hash,
    ]);
    sha256_hex(canonical.to_string().as_bytes())
}

/// Parses a CSV file with Python's `csv` module (strict), and says whether
/// writing the rows back with RFC 4180 minimal quoting and CRLF gives the
/// same bytes.
fn python_csv(file: &[u8]) -> (Vec<Vec<String>>, bool) {
    const SCRIPT: &str = r#"
import csv, io, json, sys
text = sys.stdin.buffer.read().decode("utf-8", errors="strict")
rows = list(csv.reader(io.StringIO(text, newline=""), strict=True))
out = io.StringIO(newline="")
csv.writer(out, lineterminator="\r\n").writerows(rows)
json.dump({"rows": rows, "same": out.getvalue() == text}, sys.stdout)
"#;
    let mut child = Command::new("python3")
        .args(["-c", SCRIPT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(file)
        .expect("write csv to python");
    let output = child.wait_with_output().expect("python output");
    assert!(
        output.status.success(),
        "python's csv module refused the export: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let parsed: Value = serde_json::from_slice(&output.stdout).expect("python json");
    let rows = serde_json::from_value(parsed["rows"].clone()).expect("rows");
    (rows, parsed["same"] == json!(true))
}

/// A CSV cell as the export must write it: formula-leading characters
/// neutralised with a `'`.
fn neutralised(cell: &str) -> String {
    if cell.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{cell}")
    } else {
        cell.to_owned()
    }
}

const CSV_HEADER: [&str; 14] = [
    "tenant_id",
    "sequence",
    "event_id",
    "time",
    "actor_kind",
    "actor_subject",
    "actor_tenant_id",
    "event_type",
    "subject_ids",
    "outcome",
    "request_id",
    "details",
    "prev_hash",
    "hash",
];

// ---------------------------------------------------------------------------
// Tampering: the append-only guards off for one transaction.

/// Runs `statements` in one transaction on a connection of its own with the
/// audit tables' append-only triggers (and foreign keys) disabled, then puts
/// the guards back: on SQLite by dropping and re-creating the triggers (with
/// `foreign_keys` off on that connection), on PostgreSQL with
/// `session_replication_role = replica` for the transaction.
async fn tamper(server: &TestServer, statements: &[String]) {
    let mut options = sea_orm::ConnectOptions::new(server.database_url.clone());
    options.max_connections(1).min_connections(1);
    let db = sea_orm::Database::connect(options)
        .await
        .expect("tamper connection");
    let sqlite = backend() == Backend::Sqlite;
    let triggers: Vec<(String, String)> = if sqlite {
        db.execute_unprepared("PRAGMA foreign_keys = OFF")
            .await
            .expect("foreign keys off");
        db.query_all_raw(Statement::from_string(
            db.get_database_backend(),
            "SELECT name, sql FROM sqlite_master WHERE type = 'trigger' \
             AND tbl_name IN ('audit_events', 'audit_chain')",
        ))
        .await
        .expect("triggers")
        .iter()
        .map(|row| {
            (
                row.try_get("", "name").expect("name"),
                row.try_get("", "sql").expect("sql"),
            )
        })
        .collect()
    } else {
        Vec::new()
    };
    let txn = vaultguard_server::store::begin(&db).await.expect("begin");
    if sqlite {
        assert!(
            triggers.len() >= 4,
            "the append-only triggers: {triggers:?}"
        );
        for (name, _) in &triggers {
            txn.execute_unprepared(&format!("DROP TRIGGER {name}"))
                .await
                .expect("drop trigger");
        }
    } else {
        txn.execute_unprepared("SET LOCAL session_replication_role = replica")
            .await
            .expect("triggers off");
    }
    for sql in statements {
        let done = txn.execute_unprepared(sql).await.expect("tampering");
        assert_eq!(done.rows_affected(), 1, "`{sql}` changed one row");
    }
    for (_, sql) in &triggers {
        txn.execute_unprepared(sql)
            .await
            .expect("re-create trigger");
    }
    txn.commit().await.expect("commit tampering");
    db.close().await.ok();
    // The guards are back.
    let refused = server
        .state
        .db
        .execute_unprepared("UPDATE audit_events SET details = '{}'")
        .await
        .expect_err("the append-only guard is back");
    assert!(refused.to_string().contains("append-only"), "{refused}");
}

/// The `audit_events` row id of `tenant_id`'s event `seq`.
async fn row_id(server: &TestServer, tenant_id: &str, seq: u64) -> i64 {
    let db = &server.state.db;
    db.query_one_raw(Statement::from_string(
        db.get_database_backend(),
        format!(
            "SELECT event_row_id FROM audit_chain WHERE tenant_id = '{tenant_id}' AND seq = {seq}"
        ),
    ))
    .await
    .expect("chain row")
    .expect("a chain row")
    .try_get("", "event_row_id")
    .expect("event_row_id")
}

/// A tenant whose log holds `tenant.created` and `agents` `agent.created`,
/// all sealed; returns it and an auditor of it.
async fn sealed_tenant(
    server: &TestServer,
    slug: &str,
    agents: usize,
) -> (pb::Tenant, VaultGuardClient) {
    let tenant = server.create_tenant(slug).await;
    for n in 0..agents {
        server.create_agent(&tenant.id, &format!("agent-{n}")).await;
    }
    server.wait_sealed().await;
    let auditor = server.auditor(&tenant.id).await;
    (tenant, auditor)
}

/// Checks a receipt: a compact JWS with typ `vaultguard-audit-receipt+jwt`,
/// signed by a key of the public JWKS, committing to `head`.
async fn check_receipt(
    server: &TestServer,
    tenant_id: &str,
    verified: &pb::VerifyAuditChainResponse,
) {
    let receipt = &verified.receipt;
    assert_eq!(receipt.split('.').count(), 3, "a compact JWS: {receipt}");
    let header = jsonwebtoken::decode_header(receipt).expect("receipt header");
    assert_eq!(header.typ.as_deref(), Some("vaultguard-audit-receipt+jwt"));
    let kid = header.kid.clone().expect("receipt kid");
    let jwks: Value = reqwest::get(format!("{}/.well-known/jwks.json", server.http_url()))
        .await
        .expect("jwks")
        .json()
        .await
        .expect("jwks json");
    let jwk = jwks["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .find(|key| key["kid"] == json!(kid))
        .unwrap_or_else(|| panic!("kid {kid} is not in the JWKS"));
    let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(jwk.clone()).expect("jwk");
    let key = jsonwebtoken::DecodingKey::from_jwk(&jwk).expect("decoding key");
    let mut validation = jsonwebtoken::Validation::new(header.alg);
    validation.required_spec_claims.clear();
    validation.validate_exp = false;
    validation.validate_aud = false;
    validation.set_issuer(&[server.state.keys.issuer()]);
    let claims = jsonwebtoken::decode::<Value>(receipt, &key, &validation)
        .expect("the receipt's signature verifies against the JWKS")
        .claims;
    assert_eq!(claims["tenant_id"], json!(tenant_id));
    assert_eq!(claims["head_sequence"], json!(verified.head_sequence));
    assert_eq!(claims["head_hash"], json!(verified.head_hash));
    let time = claims["time"].as_str().expect("time");
    assert!(
        time.ends_with('Z') && time.len() >= 20 && &time[10..11] == "T",
        "RFC 3339 UTC: {time}"
    );
    // A forged payload with the genuine signature is refused.
    let parts: Vec<&str> = receipt.split('.').collect();
    let mut forged_claims = claims.clone();
    forged_claims["head_sequence"] = json!(verified.head_sequence + 1);
    use base64::Engine;
    let forged = format!(
        "{}.{}.{}",
        parts[0],
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(serde_json::to_vec(&forged_claims).expect("json")),
        parts[2]
    );
    assert!(jsonwebtoken::decode::<Value>(&forged, &key, &validation).is_err());
}

// ---------------------------------------------------------------------------
// 1. Every state-changing RPC is audited.

#[test]
fn every_rpc_is_either_read_only_or_mapped_to_its_audit_events() {
    let rpcs: Vec<(String, bool)> = every_method()
        .into_iter()
        .map(|m| (m.rpc, m.server_streaming))
        .collect();
    assert!(rpcs.len() >= 61, "the whole contract: {}", rpcs.len());
    let names: BTreeSet<&str> = rpcs.iter().map(|(name, _)| name.as_str()).collect();
    let mut unlisted = Vec::new();
    let mut twice = Vec::new();
    for name in &names {
        match (READ_ONLY.contains(name), audited(name).is_some()) {
            (false, false) => unlisted.push(*name),
            (true, true) => twice.push(*name),
            _ => {}
        }
    }
    assert!(
        unlisted.is_empty(),
        "RPCs in neither READ_ONLY nor AUDITED (say which audit events they write): {unlisted:?}"
    );
    assert!(twice.is_empty(), "RPCs in both tables: {twice:?}");
    let stale: Vec<&str> = READ_ONLY
        .iter()
        .copied()
        .chain(AUDITED.iter().map(|(name, _)| *name))
        .filter(|name| !names.contains(name))
        .collect();
    assert!(
        stale.is_empty(),
        "entries for RPCs the contract no longer has: {stale:?}"
    );
    for name in READ_ONLY {
        let method = name.split('/').nth(1).expect("method");
        assert!(
            ["Get", "List", "Watch", "Tail", "Verify"]
                .iter()
                .any(|p| method.starts_with(p))
                || method == "WhoAmI",
            "{name} is listed as read-only but is not named like a read"
        );
    }
    for (name, types) in AUDITED {
        assert!(!types.is_empty(), "{name} names no event type");
        for event_type in *types {
            let (area, verb) = event_type.split_once('.').expect("area.verb");
            assert!(
                AREAS.contains(&area),
                "{name}: {event_type} has an unknown area"
            );
            assert!(
                !verb.is_empty()
                    && verb.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
                    && event_type.len() <= 64,
                "{name}: {event_type} is not `<area>.<verb>`"
            );
        }
    }
}

const IDP: &str = "https://idp.audit-walk.example";

/// The events the walk expects, and which RPCs it exercised.
#[derive(Default)]
struct Walk {
    /// (rpc, log, event type, request id).
    expected: Vec<(String, String, &'static str, String)>,
    exercised: BTreeSet<String>,
    calls: usize,
    /// Secrets handed out on the way, which no event may contain.
    secrets: Vec<String>,
}

impl Walk {
    /// A fresh request id naming `rpc`.
    fn rid(&mut self, rpc: &str) -> String {
        self.calls += 1;
        format!("walk-{}-{}", self.calls, rpc.replace('/', "."))
    }

    /// `rpc`'s call `rid` must have left each of `types` in each of `logs`.
    #[track_caller]
    fn expect(&mut self, rpc: &str, rid: &str, logs: &[&str], types: &[&'static str]) {
        let allowed = audited(rpc).unwrap_or_else(|| panic!("{rpc} is not in AUDITED"));
        for event_type in types {
            assert!(
                allowed.contains(event_type),
                "{rpc} writes {event_type}, which its AUDITED entry lacks"
            );
            for log in logs {
                self.expected.push((
                    rpc.to_owned(),
                    (*log).to_owned(),
                    event_type,
                    rid.to_owned(),
                ));
            }
        }
        self.exercised.insert(rpc.to_owned());
    }

    /// A request id for the next call, `rpc`, which must leave each of
    /// `types` in each of `logs`.
    #[track_caller]
    fn next(&mut self, rpc: &str, logs: &[&str], types: &[&'static str]) -> String {
        let rid = self.rid(rpc);
        self.expect(rpc, &rid, logs, types);
        rid
    }

    /// `client`, its next call tagged as `rpc` (see [`Self::next`]).
    #[track_caller]
    fn call<'a>(
        &mut self,
        client: &'a VaultGuardClient,
        rpc: &str,
        logs: &[&str],
        types: &[&'static str],
    ) -> Tagged<'a> {
        client.tagged(self.next(rpc, logs, types))
    }

    /// Awaits `call` to the read-only `rpc`, which must succeed.
    async fn reads<T, E: std::fmt::Debug>(
        &mut self,
        rpc: &str,
        call: impl std::future::Future<Output = Result<T, E>>,
    ) -> T {
        let answer = call.await.unwrap_or_else(|err| panic!("{rpc}: {err:?}"));
        self.read(rpc);
        answer
    }

    fn read(&mut self, rpc: &str) {
        assert!(READ_ONLY.contains(&rpc), "{rpc} is not in READ_ONLY");
        self.exercised.insert(rpc.to_owned());
    }
}

/// The step-up of a STEP_UP outcome: (auth_req_id, step_up_id, request_hash).
async fn step_up_of(
    response: pb::RequestDelegationResponse,
    approver: &VaultGuardClient,
) -> (String, String, String) {
    let Some(pb::request_delegation_response::Outcome::StepUp(challenge)) = response.outcome else {
        panic!("not a step-up: {response:?}")
    };
    let step_up_id = challenge.delegation.expect("delegation").step_up_id;
    let shown = approver
        .get_step_up(pb::GetStepUpRequest {
            step_up_id: step_up_id.clone(),
        })
        .await
        .expect("get step-up")
        .step_up
        .expect("step-up");
    (challenge.auth_req_id, step_up_id, shown.request_hash)
}

/// The VaultService part of the walk: a real local OAuth provider, one
/// connection through the HTTP callback, an exchange, a signing key and a
/// signature, then everything taken down again.
#[allow(clippy::too_many_lines)]
async fn walk_vault(
    walk: &mut Walk,
    acme: &str,
    admin: &VaultGuardClient,
    agent: &VaultGuardClient,
) {
    let provider = FakeProvider::start(ProviderOptions::default()).await;
    walk.secrets
        .push(provider.client_secret().expect("secret").to_owned());
    add_rule(
        admin,
        pb::Rule {
            scopes: vec!["*".to_owned()],
            ..with_counterpart(acme, inbound("exchange:walk-idp", pb::Effect::Allow))
        },
    )
    .await;
    add_rule(
        admin,
        with_counterpart(acme, inbound("sign:walk-key", pb::Effect::Allow)),
    )
    .await;

    let request = provider.registration("walk-idp", &["read"]);
    let created = walk
        .call(
            admin,
            "VaultService/CreateOAuthProvider",
            &[acme],
            &["provider.created"],
        )
        .create_o_auth_provider(request)
        .await
        .expect("create provider")
        .provider
        .expect("provider");

    let request = pb::UpdateOAuthProviderRequest {
        provider_id: created.id.clone(),
        authorize_url: provider.authorize_url(),
        token_url: provider.token_url(),
        revocation_url: provider.revocation_url(),
        client_id: provider.client_id().to_owned(),
        scopes: vec!["read".to_owned(), "write".to_owned()],
        ..Default::default()
    };
    walk.call(
        admin,
        "VaultService/UpdateOAuthProvider",
        &[acme],
        &["provider.updated"],
    )
    .update_o_auth_provider(request)
    .await
    .expect("update provider");
    let request = pb::GetOAuthProviderRequest {
        provider_id: created.id.clone(),
    };
    admin
        .get_o_auth_provider(request)
        .await
        .expect("get provider");
    walk.read("VaultService/GetOAuthProvider");
    admin
        .list_o_auth_providers(pb::ListOAuthProvidersRequest::default())
        .await
        .expect("list providers");
    walk.read("VaultService/ListOAuthProviders");

    let request = pb::UpdateVaultSettingsRequest {
        return_origins: vec!["https://console.acme.example".to_owned()],
    };
    walk.call(
        admin,
        "VaultService/UpdateVaultSettings",
        &[acme],
        &["vault.settings_updated"],
    )
    .update_vault_settings(request)
    .await
    .expect("update vault settings");
    admin
        .get_vault_settings(pb::GetVaultSettingsRequest {})
        .await
        .expect("get vault settings");
    walk.read("VaultService/GetVaultSettings");

    let request = pb::StartConnectionRequest {
        provider_id: created.id.clone(),
        ..Default::default()
    };
    let started = walk
        .call(
            admin,
            "VaultService/StartConnection",
            &[acme],
            &["connection.started"],
        )
        .start_connection(request)
        .await
        .expect("start connection");
    // The browser's round trip: the provider's redirect, then the callback
    // under its own request id.
    let browser = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("browser");
    let to_callback = browser
        .get(&started.authorize_url)
        .send()
        .await
        .expect("authorize");
    let location = to_callback.headers()[reqwest::header::LOCATION]
        .to_str()
        .expect("location")
        .to_owned();
    let rpc = "VaultService/StartConnection";
    let rid = walk.rid("callback");
    let landed = browser
        .get(&location)
        .header("x-request-id", &rid)
        .send()
        .await
        .expect("callback");
    assert_eq!(landed.status(), reqwest::StatusCode::OK);
    walk.expect(rpc, &rid, &[acme], &["connection.connected"]);
    let connection_id = started.connection.expect("connection").id;
    let request = pb::GetConnectionRequest {
        connection_id: connection_id.clone(),
    };
    let connection = admin
        .get_connection(request)
        .await
        .expect("get connection")
        .connection
        .expect("connection");
    assert_eq!(connection.status, pb::ConnectionStatus::Connected as i32);
    walk.read("VaultService/GetConnection");
    admin
        .list_connections(pb::ListConnectionsRequest::default())
        .await
        .expect("list connections");
    walk.read("VaultService/ListConnections");

    let request = pb::ExchangeTokenRequest {
        grant_type: vaultguard_client::GRANT_TYPE_TOKEN_EXCHANGE.to_owned(),
        connection_id: connection_id.clone(),
        ..Default::default()
    };
    let exchanged = walk
        .call(
            agent,
            "VaultService/ExchangeToken",
            &[acme],
            &["connection.token_exchanged"],
        )
        .exchange_token(request)
        .await
        .expect("exchange");
    walk.secrets.push(exchanged.access_token);
    walk.secrets.extend(provider.issued_refresh_tokens());
    walk.secrets.extend(provider.issued_access_tokens());

    let request = pb::CreateSigningKeyRequest {
        name: "walk-key".to_owned(),
        algorithm: pb::KeyAlgorithm::Secp256k1 as i32,
        description: "audit walk".to_owned(),
        disable_digest_signing: false,
    };
    let key = walk
        .call(
            admin,
            "VaultService/CreateSigningKey",
            &[acme],
            &["key.created"],
        )
        .create_signing_key(request)
        .await
        .expect("create key")
        .key
        .expect("key");
    agent.public_key(&key.id).await.expect("get key");
    walk.read("VaultService/GetSigningKey");
    agent
        .list_signing_keys(pb::ListSigningKeysRequest::default())
        .await
        .expect("list keys");
    walk.read("VaultService/ListSigningKeys");
    let request = pb::SignRequest {
        key_id: key.id.clone(),
        payload: Some(pb::sign_request::Payload::Digest(vec![7; 32])),
        idempotency_key: "walk-sign".to_owned(),
        ..Default::default()
    };
    let signed = walk
        .call(agent, "VaultService/Sign", &[acme], &["key.signed"])
        .raw_sign(request)
        .await
        .expect("sign");
    assert!(matches!(
        signed.outcome,
        Some(pb::sign_response::Outcome::Signed(_))
    ));
    let request = pb::UpdateSigningKeyRequest {
        key_id: key.id.clone(),
        disable_digest_signing: Some(true),
        reason: "audit walk".to_owned(),
    };
    walk.call(
        admin,
        "VaultService/UpdateSigningKey",
        &[acme],
        &["key.updated"],
    )
    .update_signing_key(request)
    .await
    .expect("update key");
    let request = pb::DisableSigningKeyRequest {
        key_id: key.id.clone(),
        reason: "audit walk".to_owned(),
    };
    walk.call(
        admin,
        "VaultService/DisableSigningKey",
        &[acme],
        &["key.disabled"],
    )
    .disable_signing_key(request)
    .await
    .expect("disable key");

    let request = pb::DeleteConnectionRequest {
        connection_id: connection_id.clone(),
    };
    let deleted = walk
        .call(
            admin,
            "VaultService/DeleteConnection",
            &[acme],
            &["connection.disconnected"],
        )
        .delete_connection(request)
        .await
        .expect("delete connection");
    assert!(deleted.revoked_at_provider);
    let request = pb::DeleteOAuthProviderRequest {
        provider_id: created.id.clone(),
    };
    walk.call(
        admin,
        "VaultService/DeleteOAuthProvider",
        &[acme],
        &["provider.deleted"],
    )
    .delete_o_auth_provider(request)
    .await
    .expect("delete provider");
}

#[allow(clippy::too_many_lines)]
#[tokio::test]
async fn every_state_changing_rpc_leaves_its_audit_event_in_the_right_log() {
    let server = TestServer::start_with(TestOptions::trusting(IDP)).await;
    let mut walk = Walk::default();
    let operator = server.operator().await;

    // TenantService.
    let mut tenants = Vec::new();
    for slug in ["acme", "globex"] {
        let request = pb::CreateTenantRequest {
            slug: slug.to_owned(),
            display_name: slug.to_owned(),
            settings: None,
        };
        let rpc = "TenantService/CreateTenant";
        let rid = walk.rid(rpc);
        let created = operator.tagged(&rid).create_tenant(request).await;
        let tenant = created.expect("create tenant").tenant.expect("tenant");
        let logs = [tenant.id.as_str(), PLATFORM_LOG];
        walk.expect(rpc, &rid, &logs, &["tenant.created"]);
        tenants.push(tenant);
    }
    let (acme, globex) = (tenants[0].id.clone(), tenants[1].id.clone());
    for (rpc, event_type) in [
        ("TenantService/SuspendTenant", "tenant.suspended"),
        ("TenantService/ReactivateTenant", "tenant.reactivated"),
    ] {
        let rid = walk.rid(rpc);
        if rpc.ends_with("SuspendTenant") {
            let request = pb::SuspendTenantRequest {
                tenant_id: globex.clone(),
                reason: "audit walk".to_owned(),
            };
            operator
                .tagged(&rid)
                .suspend_tenant(request)
                .await
                .expect("suspend");
        } else {
            let request = pb::ReactivateTenantRequest {
                tenant_id: globex.clone(),
                reason: "audit walk".to_owned(),
            };
            operator
                .tagged(&rid)
                .reactivate_tenant(request)
                .await
                .expect("reactivate");
        }
        walk.expect(rpc, &rid, &[globex.as_str(), PLATFORM_LOG], &[event_type]);
    }
    // The kill switch on a tenant that holds nothing: one event each, in
    // the tenant's log and (the operator's doing) the platform's.
    for (rpc, event_type) in [
        ("TenantService/FreezeTenantTraffic", "tenant.traffic_frozen"),
        (
            "TenantService/UnfreezeTenantTraffic",
            "tenant.traffic_unfrozen",
        ),
    ] {
        let rid = walk.rid(rpc);
        let tenant_id = globex.clone();
        let reason = "audit walk".to_owned();
        if rpc.ends_with("/FreezeTenantTraffic") {
            let request = pb::FreezeTenantTrafficRequest { tenant_id, reason };
            operator
                .tagged(&rid)
                .freeze_tenant_traffic(request)
                .await
                .expect("freeze");
        } else {
            let request = pb::UnfreezeTenantTrafficRequest { tenant_id, reason };
            operator
                .tagged(&rid)
                .unfreeze_tenant_traffic(request)
                .await
                .expect("unfreeze");
        }
        walk.expect(rpc, &rid, &[globex.as_str(), PLATFORM_LOG], &[event_type]);
    }
    let organization = pb::ExternalOrganization {
        issuer: IDP.to_owned(),
        organization_id: "org_walk".to_owned(),
    };
    let request = pb::BindExternalOrganizationRequest {
        tenant_id: acme.clone(),
        organization: Some(organization.clone()),
    };
    walk.call(
        &operator,
        "TenantService/BindExternalOrganization",
        &[acme.as_str(), PLATFORM_LOG],
        &["tenant.organization_bound"],
    )
    .bind_external_organization(request)
    .await
    .expect("bind");
    let request = pb::UnbindExternalOrganizationRequest {
        tenant_id: acme.clone(),
        organization: Some(organization),
    };
    walk.call(
        &operator,
        "TenantService/UnbindExternalOrganization",
        &[acme.as_str(), PLATFORM_LOG],
        &["tenant.organization_unbound"],
    )
    .unbind_external_organization(request)
    .await
    .expect("unbind");

    let acme_admin = server.admin(&acme, "alice").await;
    let globex_admin = server.admin(&globex, "gina").await;
    let request = pb::UpdateTenantSettingsRequest {
        settings: Some(pb::TenantSettings {
            token_algorithm: pb::TokenAlgorithm::Es256 as i32,
        }),
    };
    walk.call(
        &acme_admin,
        "TenantService/UpdateTenantSettings",
        &[acme.as_str()],
        &["tenant.settings_updated"],
    )
    .update_tenant_settings(request)
    .await
    .expect("update settings");

    // AgentService.
    let mut agents = Vec::new();
    for name in ["bot", "spare"] {
        let request = pb::CreateAgentRequest {
            name: name.to_owned(),
            description: String::new(),
        };
        let created = walk
            .call(
                &acme_admin,
                "AgentService/CreateAgent",
                &[acme.as_str()],
                &["agent.created"],
            )
            .create_agent(request)
            .await
            .expect("create agent");
        walk.secrets.push(created.client_secret.clone());
        agents.push((created.agent.expect("agent"), created.client_secret));
    }
    let spare = agents[1].0.id.clone();
    for (rpc, event_type) in [
        ("AgentService/DisableAgent", "agent.disabled"),
        ("AgentService/EnableAgent", "agent.enabled"),
        ("AgentService/RotateAgentSecret", "agent.secret_rotated"),
    ] {
        let rid = walk.rid(rpc);
        let admin = acme_admin.tagged(&rid);
        let agent_id = spare.clone();
        match rpc {
            "AgentService/DisableAgent" => {
                admin
                    .disable_agent(pb::DisableAgentRequest { agent_id })
                    .await
                    .expect("disable");
            }
            "AgentService/EnableAgent" => {
                admin
                    .enable_agent(pb::EnableAgentRequest { agent_id })
                    .await
                    .expect("enable");
            }
            _ => {
                let rotated = admin
                    .rotate_agent_secret(pb::RotateAgentSecretRequest { agent_id })
                    .await
                    .expect("rotate");
                walk.secrets.push(rotated.client_secret);
            }
        }
        walk.expect(rpc, &rid, &[acme.as_str()], &[event_type]);
    }
    for (rpc, event_type) in [
        ("AgentService/FreezeAgent", "agent.frozen"),
        ("AgentService/UnfreezeAgent", "agent.unfrozen"),
    ] {
        let rid = walk.rid(rpc);
        let admin = acme_admin.tagged(&rid);
        let (agent_id, reason) = (spare.clone(), "audit walk".to_owned());
        if rpc.ends_with("/FreezeAgent") {
            let request = pb::FreezeAgentRequest { agent_id, reason };
            admin.freeze_agent(request).await.expect("freeze");
        } else {
            let request = pb::UnfreezeAgentRequest { agent_id, reason };
            admin.unfreeze_agent(request).await.expect("unfreeze");
        }
        walk.expect(rpc, &rid, &[acme.as_str()], &[event_type]);
    }

    // AuthService.
    let (bot, bot_secret) = agents[0].clone();
    let rid = walk.next(
        "AuthService/IssueToken",
        &[acme.as_str()],
        &["auth.token_issued"],
    );
    let mut request = tonic::Request::new(pb::IssueTokenRequest {
        grant_type: "client_credentials".to_owned(),
        client_id: bot.id.clone(),
        client_secret: bot_secret.clone(),
    });
    request
        .metadata_mut()
        .insert("x-request-id", rid.parse().expect("rid"));
    let issued = server
        .anonymous()
        .await
        .auth()
        .issue_token(request)
        .await
        .expect("issue token")
        .into_inner();
    let rpc = "AuthService/IssueToken";
    let rid = walk.rid(rpc);
    let mut request = tonic::Request::new(pb::IssueTokenRequest {
        grant_type: "client_credentials".to_owned(),
        client_id: bot.id.clone(),
        client_secret: format!("{bot_secret}x"),
    });
    request
        .metadata_mut()
        .insert("x-request-id", rid.parse().expect("rid"));
    let refused = server.anonymous().await.auth().issue_token(request).await;
    expect_code(refused, Code::Unauthenticated);
    walk.expect(rpc, &rid, &[acme.as_str()], &["auth.token_refused"]);
    walk.secrets.push(issued.access_token.clone());
    let agent = server.with_bearer(&issued.access_token).await;

    // IssuerKeyService.
    let request = pb::RotateIssuerKeyRequest {
        algorithm: pb::TokenAlgorithm::Rs256 as i32,
    };
    walk.call(
        &operator,
        "IssuerKeyService/RotateIssuerKey",
        &[PLATFORM_LOG],
        &["issuer_key.rotated"],
    )
    .rotate_issuer_key(request)
    .await
    .expect("rotate issuer key");

    // PolicyService.
    let mut rules = Vec::new();
    for (pattern, effect) in [
        ("read.*", pb::Effect::Allow),
        ("pay.*", pb::Effect::StepUp),
        ("tmp.*", pb::Effect::Block),
    ] {
        let rule = pb::Rule {
            approvals_required: u32::from(effect == pb::Effect::StepUp),
            ..inbound(pattern, effect)
        };
        let created = walk
            .call(
                &globex_admin,
                "PolicyService/CreateRule",
                &[globex.as_str()],
                &["rule.created"],
            )
            .create_rule(pb::CreateRuleRequest { rule: Some(rule) })
            .await
            .expect("create rule")
            .rule
            .expect("rule");
        rules.push(created);
    }
    let tmp = rules[2].clone();
    let request = pb::UpdateRuleRequest {
        rule: Some(pb::Rule {
            description: "edited by the walk".to_owned(),
            ..tmp.clone()
        }),
        expected_version: tmp.version,
    };
    walk.call(
        &globex_admin,
        "PolicyService/UpdateRule",
        &[globex.as_str()],
        &["rule.updated"],
    )
    .update_rule(request)
    .await
    .expect("update rule");
    let request = pb::DeleteRuleRequest {
        rule_id: tmp.id.clone(),
        expected_version: 0,
    };
    walk.call(
        &globex_admin,
        "PolicyService/DeleteRule",
        &[globex.as_str()],
        &["rule.deleted"],
    )
    .delete_rule(request)
    .await
    .expect("delete rule");
    let request = pb::UpdatePolicySettingsRequest {
        outbound_default: pb::OutboundDefault::Allow as i32,
        expected_policy_version: 0,
    };
    walk.call(
        &globex_admin,
        "PolicyService/UpdatePolicySettings",
        &[globex.as_str()],
        &["policy.settings_updated"],
    )
    .update_policy_settings(request)
    .await
    .expect("update policy settings");
    let request = pb::CreateBudgetRequest {
        budget: Some(pb::Budget {
            name: "walk".to_owned(),
            direction: pb::RuleDirection::Inbound as i32,
            measure: pb::BudgetMeasure::Count as i32,
            scope: Some(pb::BudgetScope {
                action_pattern: "walk.budget".to_owned(),
                ..Default::default()
            }),
            window_seconds: 3600,
            limit: "10".to_owned(),
            over_limit: pb::Effect::Block as i32,
            ..Default::default()
        }),
    };
    let budget = walk
        .call(
            &globex_admin,
            "PolicyService/CreateBudget",
            &[globex.as_str()],
            &["budget.created"],
        )
        .create_budget(request)
        .await
        .expect("create budget")
        .budget
        .expect("budget");
    let request = pb::UpdateBudgetRequest {
        budget_id: budget.id.clone(),
        expected_version: budget.version,
        limit: "20".to_owned(),
        window_seconds: 3600,
        over_limit: pb::Effect::StepUp as i32,
        description: String::new(),
    };
    walk.call(
        &globex_admin,
        "PolicyService/UpdateBudget",
        &[globex.as_str()],
        &["budget.updated"],
    )
    .update_budget(request)
    .await
    .expect("update budget");
    let request = pb::DeleteBudgetRequest {
        budget_id: budget.id.clone(),
    };
    walk.call(
        &globex_admin,
        "PolicyService/DeleteBudget",
        &[globex.as_str()],
        &["budget.deleted"],
    )
    .delete_budget(request)
    .await
    .expect("delete budget");
    // A budget the reads below find.
    let request = pb::CreateBudgetRequest {
        budget: Some(pb::Budget {
            name: "kept".to_owned(),
            ..budget
        }),
    };
    let request = pb::CreateBudgetRequest {
        budget: request.budget.map(|b| pb::Budget {
            id: String::new(),
            used: String::new(),
            remaining: String::new(),
            next_release_time: None,
            version: 0,
            create_time: None,
            update_time: None,
            ..b
        }),
    };
    walk.call(
        &globex_admin,
        "PolicyService/CreateBudget",
        &[globex.as_str()],
        &["budget.created"],
    )
    .create_budget(request)
    .await
    .expect("create a second budget");
    let request = pb::EvaluatePolicyRequest {
        requesting_agent_id: bot.id.clone(),
        receiving_tenant_id: globex.clone(),
        action: "read.data".to_owned(),
        requested_ttl_seconds: 600,
        ..Default::default()
    };
    walk.call(
        &acme_admin,
        "PolicyService/EvaluatePolicy",
        &[acme.as_str(), globex.as_str()],
        &["policy.evaluated"],
    )
    .evaluate_policy(request)
    .await
    .expect("evaluate");

    // DelegationService.
    let request_delegation = async |walk: &mut Walk, action: &str, types: &[&'static str]| {
        let rpc = "DelegationService/RequestDelegation";
        let rid = walk.rid(rpc);
        let request = pb::RequestDelegationRequest {
            idempotency_key: rid.clone(),
            ..ask(&globex, action)
        };
        let response = agent
            .tagged(&rid)
            .raw_request_delegation(request)
            .await
            .expect("request delegation");
        walk.expect(rpc, &rid, &[acme.as_str(), globex.as_str()], types);
        response
    };
    let grant = |response: pb::RequestDelegationResponse| match response.outcome {
        Some(pb::request_delegation_response::Outcome::Allowed(grant)) => grant,
        other => panic!("not allowed: {other:?}"),
    };
    let first = grant(
        request_delegation(
            &mut walk,
            "read.data",
            &["delegation.decided", "delegation.token_issued"],
        )
        .await,
    );
    let second = grant(
        request_delegation(
            &mut walk,
            "read.more",
            &["delegation.decided", "delegation.token_issued"],
        )
        .await,
    );
    let request = pb::VerifyDelegationTokenRequest {
        token: first.token.clone(),
        required_action: "read.data".to_owned(),
    };
    let verified = walk
        .call(
            &globex_admin,
            "DelegationService/VerifyDelegationToken",
            &[globex.as_str()],
            &["delegation.verified"],
        )
        .verify_delegation_token(request)
        .await
        .expect("verify token");
    assert!(verified.active);
    walk.secrets.push(first.token.clone());
    walk.secrets.push(second.token.clone());
    let request = pb::RevokeDelegationRequest {
        delegation_id: first.delegation.expect("delegation").id,
        reason: "walk".to_owned(),
    };
    walk.call(
        &globex_admin,
        "DelegationService/RevokeDelegation",
        &[acme.as_str(), globex.as_str()],
        &["delegation.revoked"],
    )
    .revoke_delegation(request)
    .await
    .expect("revoke");
    let request = pb::RelinquishDelegationRequest {
        delegation_id: second.delegation.expect("delegation").id,
        reason: "walk".to_owned(),
    };
    walk.call(
        &agent,
        "DelegationService/RelinquishDelegation",
        &[acme.as_str(), globex.as_str()],
        &["delegation.relinquished"],
    )
    .relinquish_delegation(request)
    .await
    .expect("relinquish");

    // StepUpService: approve + poll, approve + watch, deny.
    let mut step_ups = Vec::new();
    for n in 0..3 {
        let response = request_delegation(
            &mut walk,
            &format!("pay.invoice{n}"),
            &["delegation.decided"],
        )
        .await;
        step_ups.push(step_up_of(response, &globex_admin).await);
    }
    for (_, step_up_id, request_hash) in &step_ups[..2] {
        let request = pb::ApproveStepUpRequest {
            step_up_id: step_up_id.clone(),
            request_hash: request_hash.clone(),
            comment: String::new(),
        };
        walk.call(
            &globex_admin,
            "StepUpService/ApproveStepUp",
            &[acme.as_str(), globex.as_str()],
            &["step_up.approved"],
        )
        .approve_step_up(request)
        .await
        .expect("approve");
    }
    let request = pb::PollStepUpRequest {
        auth_req_id: step_ups[0].0.clone(),
    };
    let polled = walk
        .call(
            &agent,
            "StepUpService/PollStepUp",
            &[acme.as_str(), globex.as_str()],
            &["step_up.redeemed"],
        )
        .poll_step_up(request)
        .await
        .expect("poll");
    assert!(!polled.access_token.is_empty());
    walk.secrets.push(polled.access_token);
    let request = pb::WatchStepUpRequest {
        auth_req_id: step_ups[1].0.clone(),
        heartbeat_interval_seconds: 1,
    };
    let mut watch = walk
        .call(
            &agent,
            "StepUpService/WatchStepUp",
            &[acme.as_str(), globex.as_str()],
            &["step_up.redeemed"],
        )
        .watch_step_up(request)
        .await
        .expect("watch");
    let first_message = tokio::time::timeout(Duration::from_secs(10), watch.message())
        .await
        .expect("a watch message")
        .expect("watch ok")
        .expect("a message");
    match first_message.event {
        Some(pb::watch_step_up_response::Event::Status(status)) => {
            assert!(
                !status.access_token.is_empty(),
                "the watch redeems: {status:?}"
            );
            walk.secrets.push(status.access_token);
        }
        other => panic!("expected the approved status, got {other:?}"),
    }
    drop(watch);
    let request = pb::DenyStepUpRequest {
        step_up_id: step_ups[2].1.clone(),
        reason: "walk".to_owned(),
    };
    walk.call(
        &globex_admin,
        "StepUpService/DenyStepUp",
        &[acme.as_str(), globex.as_str()],
        &["step_up.denied"],
    )
    .deny_step_up(request)
    .await
    .expect("deny");
    for (url, event_type) in [
        ("https://hooks.audit-walk.example/approvals", "webhook.set"),
        ("", "webhook.removed"),
    ] {
        let request = pb::SetApprovalWebhookRequest {
            url: url.to_owned(),
        };
        let set = walk
            .call(
                &globex_admin,
                "StepUpService/SetApprovalWebhook",
                &[globex.as_str()],
                &[event_type],
            )
            .set_approval_webhook(request)
            .await
            .expect("set webhook");
        if !set.signing_secret.is_empty() {
            walk.secrets.push(set.signing_secret);
        }
    }

    // AuditService.
    server.wait_sealed().await;
    let globex_auditor = server.auditor(&globex).await;
    let mut stream = walk
        .call(
            &globex_auditor,
            "AuditService/ExportAuditEvents",
            &[globex.as_str()],
            &["audit.exported"],
        )
        .export_audit_events(export_all(pb::ExportFormat::Ndjson))
        .await
        .expect("export");
    while stream.message().await.expect("export stream").is_some() {}

    walk_vault(&mut walk, &acme, &acme_admin, &agent).await;

    // VaultService: each RPC still UNIMPLEMENTED is skipped; one that
    // answers anything else has landed and needs its exercise here.
    let admin_token = server
        .mint("alice", Some(acme.as_str()), &[pb::Role::Admin])
        .await;
    let mut skipped = Vec::new();
    for method in every_method() {
        let (rpc, path, streaming) = (method.rpc, method.path, method.server_streaming);
        if !rpc.starts_with("VaultService/") || walk.exercised.contains(&rpc) {
            continue;
        }
        let mut result = call_empty(&server, &path, streaming, Some(&admin_token)).await;
        if matches!(&result, Err(status) if status.code() == Code::PermissionDenied) {
            result = call_empty(&server, &path, streaming, Some(&issued.access_token)).await;
        }
        match result {
            Err(status) if status.code() == Code::Unimplemented => skipped.push(rpc),
            other => panic!(
                "{rpc} is implemented now ({other:?}): exercise it in this walk and check its {:?} events",
                audited(&rpc).or_else(|| READ_ONLY.contains(&rpc.as_str()).then_some(&[][..]))
            ),
        }
    }

    // Every mapped RPC that is implemented was exercised.
    let missing: Vec<&str> = AUDITED
        .iter()
        .map(|(name, _)| *name)
        .filter(|name| !walk.exercised.contains(*name) && !skipped.iter().any(|s| s == name))
        .collect();
    assert!(
        missing.is_empty(),
        "audited RPCs the walk did not exercise: {missing:?}"
    );
    eprintln!("skipped (UNIMPLEMENTED): {skipped:?}");

    // Each expected event is in the right log, with the call's request id.
    let mut logs: HashMap<String, Vec<(String, String, String, String)>> = HashMap::new();
    for log in [acme.as_str(), globex.as_str()] {
        let auditor = server.auditor(log).await;
        let events = list_pages(
            &auditor,
            pb::ListAuditEventsRequest {
                include_unsealed: true,
                ..oldest_first()
            },
            500,
        )
        .await;
        let text = format!("{events:?}");
        for secret in &walk.secrets {
            assert!(
                !text.contains(secret.as_str()),
                "a secret in {log}'s log: {secret}"
            );
        }
        logs.insert(
            log.to_owned(),
            events
                .into_iter()
                .map(|e| {
                    let actor = e.actor.unwrap_or_default().subject;
                    (e.tenant_id, e.event_type, e.request_id, actor)
                })
                .collect(),
        );
    }
    let platform = audit_event::Entity::find()
        .filter(audit_event::Column::TenantId.eq(PLATFORM_LOG))
        .all(&server.state.db)
        .await
        .expect("platform log");
    let every_row = format!(
        "{:?}",
        audit_event::Entity::find()
            .all(&server.state.db)
            .await
            .expect("audit rows")
    );
    assert!(walk.secrets.len() >= 9, "{}", walk.secrets.len());
    for secret in &walk.secrets {
        assert!(
            !every_row.contains(secret.as_str()),
            "a secret in audit_events: {secret}"
        );
    }
    logs.insert(
        PLATFORM_LOG.to_owned(),
        platform
            .into_iter()
            .map(|e| (e.tenant_id, e.event_type, e.request_id, e.actor_subject))
            .collect(),
    );
    let mut absent = Vec::new();
    for (rpc, log, event_type, rid) in &walk.expected {
        let found = logs[log]
            .iter()
            .any(|(tenant, t, r, _)| tenant == log && t == event_type && r == rid);
        if !found {
            absent.push(format!("{rpc} → {event_type} in {log} (request {rid})"));
        }
    }
    assert!(
        absent.is_empty(),
        "missing audit events:\n{}",
        absent.join("\n")
    );
    // Nothing of one tenant's calls leaked into the other's log.
    for (log, events) in &logs {
        assert!(events.iter().all(|(tenant, ..)| tenant == log));
    }

    // Read-only RPCs write nothing.
    server.wait_sealed().await;
    let before = server.count("audit_events").await;
    reads_write_nothing(
        &server,
        &mut walk,
        &acme,
        &globex,
        &agent,
        &bot.id,
        &step_ups[2].1,
        &rules[0].id,
    )
    .await;
    assert_eq!(
        server.count("audit_events").await,
        before,
        "read-only RPCs wrote audit events"
    );
    let unread: Vec<&str> = READ_ONLY
        .iter()
        .copied()
        .filter(|name| !walk.exercised.contains(*name) && !skipped.iter().any(|s| s == name))
        .collect();
    assert!(
        unread.is_empty(),
        "read-only RPCs the walk did not call: {unread:?}"
    );

    // And every log's chain verifies.
    server.wait_sealed().await;
    for log in [&acme, &globex] {
        let auditor = server.auditor(log).await;
        let verified = verify(&auditor, 0, 0, false).await.expect("verify");
        assert!(verified.ok, "{log}: {verified:?}");
    }
    server.stop().await;
}

/// Calls every implemented read-only RPC successfully.
#[allow(clippy::too_many_arguments)]
async fn reads_write_nothing(
    server: &TestServer,
    walk: &mut Walk,
    acme: &str,
    globex: &str,
    agent: &VaultGuardClient,
    bot_id: &str,
    step_up_id: &str,
    rule_id: &str,
) {
    let operator = server.operator().await;
    let acme_admin = server.admin(acme, "alice").await;
    let globex_admin = server.admin(globex, "gina").await;
    let auditor = server.auditor(globex).await;
    let (tenant_id, agent_id) = (acme.to_owned(), bot_id.to_owned());
    let (rule_id, step_up_id) = (rule_id.to_owned(), step_up_id.to_owned());

    let tenant = operator.get_tenant(pb::GetTenantRequest { tenant_id });
    walk.reads("TenantService/GetTenant", tenant).await;
    let tenants = operator.list_tenants(pb::ListTenantsRequest::default());
    walk.reads("TenantService/ListTenants", tenants).await;
    let bot = acme_admin.get_agent(pb::GetAgentRequest { agent_id });
    walk.reads("AgentService/GetAgent", bot).await;
    let agents = acme_admin.list_agents(pb::ListAgentsRequest::default());
    walk.reads("AgentService/ListAgents", agents).await;
    walk.reads("AuthService/WhoAmI", agent.who_am_i()).await;
    let mut issuer_keys = operator.issuer_keys();
    let jwks = issuer_keys.get_jwks(pb::GetJwksRequest {});
    walk.reads("IssuerKeyService/GetJwks", jwks).await;
    let keys = operator.list_issuer_keys(pb::ListIssuerKeysRequest::default());
    walk.reads("IssuerKeyService/ListIssuerKeys", keys).await;
    let rule = globex_admin.get_rule(pb::GetRuleRequest { rule_id });
    walk.reads("PolicyService/GetRule", rule).await;
    let rules = globex_admin.list_rules(pb::ListRulesRequest::default());
    walk.reads("PolicyService/ListRules", rules).await;
    let budgets = globex_admin.list_budgets(pb::ListBudgetsRequest::default());
    let budgets = walk.reads("PolicyService/ListBudgets", budgets).await;
    let budget_id = budgets.budgets.first().expect("a budget").id.clone();
    let budget = globex_admin.get_budget(pb::GetBudgetRequest { budget_id });
    walk.reads("PolicyService/GetBudget", budget).await;
    let settings = globex_admin.get_policy_settings(pb::GetPolicySettingsRequest {});
    walk.reads("PolicyService/GetPolicySettings", settings)
        .await;
    let listed = globex_admin.list_delegations(pb::ListDelegationsRequest::default());
    let listed = walk
        .reads("DelegationService/ListDelegations", listed)
        .await;
    let delegation_id = listed.delegations.first().expect("a delegation").id.clone();
    let delegation = globex_admin.get_delegation(delegation_id);
    walk.reads("DelegationService/GetDelegation", delegation)
        .await;
    let step_up = globex_admin.get_step_up(pb::GetStepUpRequest { step_up_id });
    walk.reads("StepUpService/GetStepUp", step_up).await;
    let pending = globex_admin.list_pending_step_ups(pb::ListPendingStepUpsRequest::default());
    walk.reads("StepUpService/ListPendingStepUps", pending)
        .await;
    let mut queue = globex_admin
        .watch_pending_step_ups(pb::WatchPendingStepUpsRequest {
            cursor: String::new(),
            heartbeat_interval_seconds: 1,
        })
        .await
        .expect("watch pending");
    tokio::time::timeout(Duration::from_secs(10), queue.message())
        .await
        .expect("a queue message")
        .expect("queue ok");
    drop(queue);
    walk.read("StepUpService/WatchPendingStepUps");
    // No webhook is set any more: NOT_FOUND, and still nothing written.
    let webhook = globex_admin
        .get_approval_webhook(pb::GetApprovalWebhookRequest {})
        .await;
    expect_code(webhook, Code::NotFound);
    walk.read("StepUpService/GetApprovalWebhook");
    list(&auditor, oldest_first()).await.expect("list");
    walk.read("AuditService/ListAuditEvents");
    let mut stream = tail(&auditor, tail_after(0)).await.expect("tail");
    next_tail(&mut stream).await;
    drop(stream);
    walk.read("AuditService/TailAuditEvents");
    verify(&auditor, 0, 0, true).await.expect("verify");
    walk.read("AuditService/VerifyAuditChain");
}

// ---------------------------------------------------------------------------
// 2. Tampering.

#[tokio::test]
async fn a_changed_event_is_named_by_verification_and_an_intact_chain_verifies_with_a_receipt() {
    let server = TestServer::start().await;
    let (tenant, auditor) = sealed_tenant(&server, "tampered", 8).await;
    let log = whole_log(&auditor).await;
    assert_eq!(log.len(), 9, "tenant.created and eight agent.created");

    // Intact: everything checked, the head is the last event.
    let intact = verify(&auditor, 0, 0, true).await.expect("verify");
    assert!(intact.ok, "{intact:?}");
    assert_eq!(
        (intact.first_broken_sequence, intact.failure.as_str()),
        (0, "")
    );
    assert_eq!(intact.checked_count, 9);
    assert_eq!(intact.head_sequence, 9);
    assert_eq!(intact.unsealed_count, 0);
    assert_eq!(intact.head_hash, log[8].hash);
    assert!(intact.verify_time.is_some());
    check_receipt(&server, &tenant.id, &intact).await;
    let without = verify(&auditor, 0, 0, false).await.expect("verify");
    assert!(without.receipt.is_empty(), "a receipt only on request");
    let part = verify(&auditor, 3, 5, false).await.expect("verify a range");
    assert!(part.ok);
    assert_eq!((part.checked_count, part.head_sequence), (3, 9));
    let clipped = verify(&auditor, 3, 1000, false)
        .await
        .expect("verify past the head");
    assert_eq!(
        (clipped.ok, clipped.checked_count),
        (true, 7),
        "{clipped:?}"
    );
    let last = verify(&auditor, 9, 9, false)
        .await
        .expect("verify the head alone");
    assert_eq!((last.ok, last.checked_count), (true, 1), "{last:?}");

    // Sequence 4's details rewritten with the guard off.
    let row = row_id(&server, &tenant.id, 4).await;
    tamper(
        &server,
        &[format!(
            "UPDATE audit_events SET details = '{{\"tampered\":true}}' WHERE id = {row}"
        )],
    )
    .await;
    let broken = verify(&auditor, 0, 0, true).await.expect("verify");
    assert!(!broken.ok, "{broken:?}");
    assert_eq!(broken.first_broken_sequence, 4);
    assert_eq!(broken.failure, "hash mismatch");
    assert_eq!(broken.checked_count, 3, "1 to 3 held");
    assert_eq!(
        (broken.head_sequence, broken.head_hash.as_str()),
        (9, log[8].hash.as_str())
    );
    check_receipt(&server, &tenant.id, &broken).await;
    // Ranges that leave 4 out still verify; ranges that include it do not.
    assert!(verify(&auditor, 1, 3, false).await.expect("verify").ok);
    let after = verify(&auditor, 5, 0, false).await.expect("verify");
    assert!(after.ok, "links after the change still hold: {after:?}");
    assert_eq!(after.checked_count, 5);
    let only = verify(&auditor, 4, 4, false).await.expect("verify");
    assert_eq!((only.ok, only.first_broken_sequence), (false, 4));
    // The listing shows the rewritten details with the original hash.
    let shown = &whole_log(&auditor).await[3];
    assert_eq!(
        struct_json(shown.details.as_ref()),
        json!({"tampered": true})
    );
    assert_eq!(shown.hash, log[3].hash);

    // The chain grows on, and verification still names 4.
    server.create_agent(&tenant.id, "later").await;
    server.wait_sealed().await;
    let grown = verify(&auditor, 0, 0, false).await.expect("verify");
    assert_eq!(
        (grown.ok, grown.first_broken_sequence, grown.head_sequence),
        (false, 4, 10)
    );
    server.stop().await;
}

#[tokio::test]
async fn verification_goes_on_from_a_receipt_and_checks_only_what_was_sealed_since() {
    let server = TestServer::start().await;
    let (tenant, auditor) = sealed_tenant(&server, "incremental", 8).await;
    let first = verify(&auditor, 0, 0, true).await.expect("verify");
    assert_eq!((first.ok, first.checked_count), (true, 9), "{first:?}");

    // Nothing new: nothing to check, and the receipt's head still holds.
    let same = verify_since(&auditor, &first.receipt).await.expect("since");
    assert_eq!(
        (same.ok, same.checked_count, same.head_sequence),
        (true, 0, 9),
        "{same:?}"
    );

    // Three new events: only they are checked, and the new receipt goes on.
    for n in 0..3 {
        server.create_agent(&tenant.id, &format!("later-{n}")).await;
    }
    server.wait_sealed().await;
    let grown = verify_since(&auditor, &first.receipt).await.expect("since");
    assert_eq!(
        (grown.ok, grown.checked_count, grown.head_sequence),
        (true, 3, 12),
        "{grown:?}"
    );
    check_receipt(&server, &tenant.id, &grown).await;
    let again = verify_since(&auditor, &grown.receipt).await.expect("since");
    assert_eq!((again.ok, again.checked_count), (true, 0), "{again:?}");

    // Not a receipt of this tenant's log signed by this server: refused,
    // naming the field, and so is a receipt combined with from_sequence.
    let (other, other_auditor) = sealed_tenant(&server, "other", 1).await;
    let other_receipt = verify(&other_auditor, 0, 0, true)
        .await
        .expect("verify")
        .receipt;
    assert!(!other_receipt.is_empty(), "{}", other.id);
    let parts: Vec<&str> = first.receipt.split('.').collect();
    let forged_payload = {
        use base64::Engine;
        let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let mut claims: Value =
            serde_json::from_slice(&engine.decode(parts[1]).expect("b64")).expect("claims");
        claims["head_sequence"] = json!(2);
        engine.encode(serde_json::to_vec(&claims).expect("json"))
    };
    let forged = format!("{}.{forged_payload}.{}", parts[0], parts[2]);
    for bad in [
        other_receipt.as_str(),
        forged.as_str(),
        "not a receipt",
        &"x".repeat(9000),
    ] {
        expect_invalid(verify_since(&auditor, bad).await, "since_receipt");
    }
    expect_invalid(
        auditor
            .verify_audit_chain(pb::VerifyAuditChainRequest {
                since_receipt: first.receipt.clone(),
                from_sequence: 3,
                ..Default::default()
            })
            .await,
        "since_receipt",
    );

    // A change after the receipt is named; one before it is for the full
    // verification (the receipt vouches for what it covered).
    let row = row_id(&server, &tenant.id, 11).await;
    tamper(
        &server,
        &[format!(
            "UPDATE audit_events SET request_id = 'rewritten' WHERE id = {row}"
        )],
    )
    .await;
    let broken = verify_since(&auditor, &first.receipt).await.expect("since");
    assert_eq!(
        (
            broken.ok,
            broken.first_broken_sequence,
            broken.failure.as_str(),
            broken.checked_count
        ),
        (false, 11, "hash mismatch", 1),
        "{broken:?}"
    );
    // The receipt's own head rewritten (hash and the next link with it):
    // the receipt no longer matches the chain.
    tamper(
        &server,
        &[
            format!(
                "UPDATE audit_chain SET hash = '{}' WHERE tenant_id = '{}' AND seq = 9",
                "a".repeat(64),
                tenant.id
            ),
            format!(
                "UPDATE audit_chain SET prev_hash = '{}' WHERE tenant_id = '{}' AND seq = 10",
                "a".repeat(64),
                tenant.id
            ),
        ],
    )
    .await;
    let moved = verify_since(&auditor, &first.receipt).await.expect("since");
    assert_eq!(
        (
            moved.ok,
            moved.first_broken_sequence,
            moved.failure.as_str()
        ),
        (false, 9, "receipt head mismatch"),
        "{moved:?}"
    );
    server.stop().await;
}

/// The chain row's copies of an event's time, type and actor drive the
/// filtered listings; an edited copy would hide the event from them, so
/// verification compares each copy with its event.
#[tokio::test]
async fn an_edited_chain_copy_that_would_hide_an_event_from_a_filter_is_named() {
    let server = TestServer::start().await;
    let (tenant, auditor) = sealed_tenant(&server, "copies", 4).await;
    let agents_created = || pb::ListAuditEventsRequest {
        event_types: vec!["agent.created".to_owned()],
        ..Default::default()
    };
    let before = list(&auditor, agents_created()).await.expect("list").events;
    assert_eq!(before.len(), 4);
    tamper(
        &server,
        &[format!(
            "UPDATE audit_chain SET event_type = 'tenant.created' WHERE tenant_id = '{}' AND seq = 3",
            tenant.id
        )],
    )
    .await;
    let hidden = list(&auditor, agents_created()).await.expect("list").events;
    assert_eq!(
        hidden.len(),
        3,
        "the edited copy hides sequence 3 from the filter"
    );
    let found = verify(&auditor, 0, 0, false).await.expect("verify");
    assert_eq!(
        (
            found.ok,
            found.first_broken_sequence,
            found.failure.as_str(),
            found.checked_count
        ),
        (false, 3, "chain copy mismatch", 2),
        "{found:?}"
    );
    server.stop().await;
}

/// Appends `count` sealed events to `tenant_id`'s chain straight into the
/// tables (what the sealer would have written: valid links, the chain's
/// copies of time, type and actor, the head moved), in multi-row inserts;
/// one in a hundred is `rule.created`, the rest `delegation.decided`.
async fn append_sealed(server: &TestServer, tenant_id: &str, count: usize) {
    let db = &server.state.db;
    let backend = db.get_database_backend();
    let one = |sql: String| async move {
        db.query_one_raw(Statement::from_string(backend, sql))
            .await
            .expect("query")
            .expect("a row")
    };
    let head = one(format!(
        "SELECT seq, hash FROM audit_heads WHERE tenant_id = '{tenant_id}'"
    ))
    .await;
    let (mut seq, mut prev): (i64, String) = (
        head.try_get("", "seq").expect("seq"),
        head.try_get("", "hash").expect("hash"),
    );
    let mut id: i64 = one("SELECT COALESCE(MAX(id), 0) AS id FROM audit_events".to_owned())
        .await
        .try_get("", "id")
        .expect("id");
    let now = server.clock.now_millis();
    let txn = vaultguard_server::store::begin(db).await.expect("begin");
    for chunk in 0..count.div_ceil(400) {
        let (mut events, mut links) = (Vec::new(), Vec::new());
        for n in chunk * 400..((chunk + 1) * 400).min(count) {
            id += 1;
            seq += 1;
            let event = audit_event::Model {
                id,
                event_id: format!("evt_seeded{n:08}"),
                tenant_id: tenant_id.to_owned(),
                occurred_at: now + i64::try_from(n).expect("n"),
                actor_kind: "agent".to_owned(),
                actor_subject: format!("agt_seeded{}", n % 7),
                actor_tenant_id: tenant_id.to_owned(),
                event_type: if n % 100 == 0 {
                    "rule.created"
                } else {
                    "delegation.decided"
                }
                .to_owned(),
                subject_ids: format!("[\"dlg_seeded{n}\"]"),
                outcome: "success".to_owned(),
                request_id: "seeded".to_owned(),
                details: format!("{{\"n\":{n}}}"),
            };
            let hash = vaultguard_server::audit::chain_hash(&event, seq, &prev).expect("hash");
            events.push(format!(
                "({id}, '{}', '{tenant_id}', {}, 'agent', '{}', '{tenant_id}', '{}', '{}', 'success', 'seeded', '{}')",
                event.event_id, event.occurred_at, event.actor_subject, event.event_type,
                event.subject_ids, event.details
            ));
            links.push(format!(
                "('{tenant_id}', {seq}, {id}, '{prev}', '{hash}', {now}, {}, '{}', '{}')",
                event.occurred_at, event.event_type, event.actor_subject
            ));
            prev = hash;
        }
        txn.execute_unprepared(&format!(
            "INSERT INTO audit_events (id, event_id, tenant_id, occurred_at, actor_kind, actor_subject, \
             actor_tenant_id, event_type, subject_ids, outcome, request_id, details) VALUES {}",
            events.join(", ")
        ))
        .await
        .expect("events");
        txn.execute_unprepared(&format!(
            "INSERT INTO audit_chain (tenant_id, seq, event_row_id, prev_hash, hash, sealed_at, \
             occurred_at, event_type, actor_subject) VALUES {}",
            links.join(", ")
        ))
        .await
        .expect("links");
    }
    txn.execute_unprepared(&format!(
        "UPDATE audit_heads SET seq = {seq}, hash = '{prev}' WHERE tenant_id = '{tenant_id}'"
    ))
    .await
    .expect("head");
    if backend == sea_orm::DbBackend::Postgres {
        txn.execute_unprepared(
            "SELECT setval(pg_get_serial_sequence('audit_events', 'id'), (SELECT MAX(id) FROM audit_events))",
        )
        .await
        .expect("sequence");
    }
    txn.commit().await.expect("commit");
}

/// A log longer than one read: verification and export read it in batches
/// of sequence ranges, several at once, and must still check every link
/// in order, name the first break exactly, and export every event once, in
/// order.
#[tokio::test]
async fn a_log_of_many_batches_verifies_and_exports_whole_and_in_order() {
    let server = TestServer::start().await;
    let (tenant, auditor) = sealed_tenant(&server, "long", 1).await;
    append_sealed(&server, &tenant.id, 25_000).await;
    let head = 25_002;

    let full = verify(&auditor, 0, 0, true).await.expect("verify");
    assert_eq!(
        (full.ok, full.checked_count, full.head_sequence),
        (true, head, head),
        "{full:?}"
    );
    let part = verify(&auditor, 9_990, 20_010, false)
        .await
        .expect("verify");
    assert_eq!((part.ok, part.checked_count), (true, 10_021), "{part:?}");

    let exported = export(&auditor, export_all(pb::ExportFormat::Ndjson))
        .await
        .expect("export");
    assert_eq!(exported.summary.event_count, head);
    let sequences: Vec<u64> = String::from_utf8(exported.file)
        .expect("utf-8")
        .lines()
        .map(|line| {
            let event: Value = serde_json::from_str(line).expect("json");
            event["sequence"]
                .as_str()
                .expect("sequence")
                .parse()
                .expect("number")
        })
        .collect();
    assert_eq!(
        sequences,
        (1..=head).collect::<Vec<_>>(),
        "every event once, in order"
    );
    let rare = export(
        &auditor,
        pb::ExportAuditEventsRequest {
            event_types: vec!["rule.created".to_owned()],
            ..export_all(pb::ExportFormat::Csv)
        },
    )
    .await
    .expect("filtered export");
    assert_eq!(rare.summary.event_count, 250);
    let listed = list(
        &auditor,
        pb::ListAuditEventsRequest {
            event_types: vec!["rule.created".to_owned()],
            actor_subject: "agt_seeded0".to_owned(),
            ..Default::default()
        },
    )
    .await
    .expect("list");
    assert_eq!(
        listed.events.len(),
        36,
        "n % 700 == 0, newest first: a page of 50 holds all"
    );
    assert!(
        listed
            .events
            .windows(2)
            .all(|w| w[0].sequence > w[1].sequence)
    );

    // A change in the third batch is named at its sequence, the links
    // before it counted, whichever read finished first.
    let row = row_id(&server, &tenant.id, 21_234).await;
    tamper(
        &server,
        &[format!(
            "UPDATE audit_events SET details = '{{}}' WHERE id = {row}"
        )],
    )
    .await;
    let broken = verify(&auditor, 0, 0, false).await.expect("verify");
    assert_eq!(
        (
            broken.ok,
            broken.first_broken_sequence,
            broken.failure.as_str(),
            broken.checked_count
        ),
        (false, 21_234, "hash mismatch", 21_233),
        "{broken:?}"
    );
    let since = verify_since(&auditor, &full.receipt).await.expect("since");
    assert_eq!(
        (since.ok, since.checked_count),
        (true, since.head_sequence - head),
        "{since:?}"
    );
    server.stop().await;
}

#[tokio::test]
async fn deleted_events_are_named_by_verification_and_stop_the_tail() {
    let server = TestServer::start().await;
    let (tenant, auditor) = sealed_tenant(&server, "deleted", 8).await;
    let other = sealed_tenant(&server, "bystander", 2).await;
    assert!(verify(&auditor, 0, 0, false).await.expect("verify").ok);

    // Sequence 6's event row removed, its chain link left behind.
    let row6 = row_id(&server, &tenant.id, 6).await;
    tamper(
        &server,
        &[format!("DELETE FROM audit_events WHERE id = {row6}")],
    )
    .await;
    let broken = verify(&auditor, 0, 0, false).await.expect("verify");
    assert_eq!(
        (
            broken.ok,
            broken.first_broken_sequence,
            broken.failure.as_str()
        ),
        (false, 6, "missing event"),
        "{broken:?}"
    );
    assert_eq!(broken.checked_count, 5);

    // Sequence 3 removed entirely (event and chain link): named first.
    let row3 = row_id(&server, &tenant.id, 3).await;
    tamper(
        &server,
        &[
            format!(
                "DELETE FROM audit_chain WHERE tenant_id = '{}' AND seq = 3",
                tenant.id
            ),
            format!("DELETE FROM audit_events WHERE id = {row3}"),
        ],
    )
    .await;
    let broken = verify(&auditor, 0, 0, true).await.expect("verify");
    assert_eq!(
        (
            broken.ok,
            broken.first_broken_sequence,
            broken.failure.as_str()
        ),
        (false, 3, "missing sequence"),
        "{broken:?}"
    );
    assert_eq!(broken.checked_count, 2);
    assert_eq!(
        broken.head_sequence, 9,
        "the head still counts the removed events"
    );
    // A range starting right after the hole cannot link into it.
    let from4 = verify(&auditor, 4, 0, false).await.expect("verify");
    assert_eq!(
        (from4.ok, from4.first_broken_sequence),
        (false, 3),
        "{from4:?}"
    );
    let from7 = verify(&auditor, 7, 0, false).await.expect("verify");
    assert!(from7.ok, "7 to 9 are intact: {from7:?}");

    // The tail never skips: it delivers 1 and 2, then fails at the hole.
    let mut stream = tail(&auditor, tail_after(0)).await.expect("tail");
    let mut delivered = Vec::new();
    let failure = loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.message()).await {
            Ok(Ok(Some(message))) => match message.item {
                Some(Item::Event(event)) => delivered.push(event.sequence),
                Some(Item::Heartbeat(_)) => {
                    panic!("the tail went idle over a hole after {delivered:?}")
                }
                None => panic!("message without item"),
            },
            Ok(Ok(None)) => panic!("the tail ended without an error after {delivered:?}"),
            Ok(Err(status)) => break status,
            Err(_) => panic!("the tail hung after {delivered:?}"),
        }
    };
    assert_eq!(delivered, [1, 2]);
    assert_eq!(failure.code(), Code::DataLoss, "{failure:?}");

    // The other tenant's log is unaffected.
    let bystander = verify(&other.1, 0, 0, false).await.expect("verify");
    assert!(
        bystander.ok && bystander.checked_count == 3,
        "{bystander:?}"
    );
    server.stop().await;
}

// ---------------------------------------------------------------------------
// 3. Concurrency.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_concurrent_writers_leave_a_gapless_chain_and_the_tail_sees_each_event_once() {
    const WRITERS: usize = 8;
    const EACH: usize = 500;
    let server = TestServer::start().await;
    let tenant = server.create_tenant("busy").await;
    let (agent, _, _) = server.create_agent(&tenant.id, "bot").await;
    let auditor = server.auditor(&tenant.id).await;

    // The tail, opened before any write, collects until told the head.
    let mut stream = tail(&auditor, tail_after(0)).await.expect("tail");
    let target = Arc::new(AtomicU64::new(u64::MAX));
    let collector = tokio::spawn({
        let target = target.clone();
        async move {
            let mut sequences: Vec<u64> = Vec::new();
            let mut cursor = 0;
            let mut beats = 0;
            while cursor < target.load(Ordering::SeqCst) {
                let message =
                    match tokio::time::timeout(Duration::from_secs(60), stream.message()).await {
                        Ok(Ok(Some(message))) => message,
                        other => panic!("the tail stopped at {cursor}: {other:?}"),
                    };
                match message.item {
                    Some(Item::Event(event)) => {
                        assert_eq!(message.sequence, event.sequence);
                        sequences.push(event.sequence);
                        cursor = event.sequence;
                    }
                    Some(Item::Heartbeat(_)) => {
                        assert_eq!(message.sequence, cursor, "a heartbeat reports the cursor");
                        beats += 1;
                    }
                    None => panic!("message without item"),
                }
            }
            (sequences, beats)
        }
    });

    let started = Instant::now();
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        writers
            .push(spawn_writer(&server, &tenant.id, &agent.id, &format!("writer-{w}"), EACH).await);
    }
    for writer in writers {
        writer.await.expect("writer");
    }
    let written = started.elapsed();
    let mut sealed = false;
    for _ in 0..600 {
        if server.count("audit_pending").await == 0 {
            sealed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(sealed, "the sealer did not catch up within 30 s");
    let sealed_after = started.elapsed();

    let expected = u64::try_from(2 + WRITERS * EACH).expect("count");
    let verified = verify(&auditor, 0, 0, false).await.expect("verify");
    assert!(verified.ok, "{verified:?}");
    assert_eq!(
        (
            verified.head_sequence,
            verified.checked_count,
            verified.unsealed_count
        ),
        (expected, expected, 0),
        "tenant.created, agent.created and one policy.evaluated per call"
    );

    // Gapless, oldest first through every page.
    let log = list_pages(&auditor, oldest_first(), 500).await;
    let sequences: Vec<u64> = log.iter().map(|e| e.sequence).collect();
    assert_eq!(sequences, (1..=expected).collect::<Vec<_>>());
    let mut per_writer: HashMap<String, usize> = HashMap::new();
    for event in &log {
        if event.event_type == "policy.evaluated" {
            *per_writer
                .entry(event.actor.clone().expect("actor").subject)
                .or_default() += 1;
        }
    }
    assert_eq!(per_writer.len(), WRITERS);
    assert!(per_writer.values().all(|n| *n == EACH), "{per_writer:?}");
    for pair in log.windows(2) {
        assert_eq!(pair[1].prev_hash, pair[0].hash, "link {}", pair[1].sequence);
    }

    // The tail saw each sequence exactly once, in order.
    target.store(expected, Ordering::SeqCst);
    let (tailed, beats) = tokio::time::timeout(Duration::from_secs(60), collector)
        .await
        .expect("the tail reached the head")
        .expect("collector");
    assert_eq!(tailed.len(), sequences.len(), "events tailed");
    assert_eq!(tailed, sequences, "the tail skipped, repeated or reordered");
    eprintln!(
        "{WRITERS}×{EACH} EvaluatePolicy on {:?}: written in {written:?} ({:.0}/s), sealed after {sealed_after:?}, tail done after {:?} ({beats} heartbeats)",
        backend(),
        f64::from(u32::try_from(WRITERS * EACH).expect("n")) / written.as_secs_f64(),
        started.elapsed()
    );
    server.stop().await;
}

// ---------------------------------------------------------------------------
// 4. Export.

/// (human subject, request id, free text for details): commas, quotes, line
/// breaks and every formula-leading character, in the cells that carry
/// them verbatim (actor_subject, request_id) and inside details (a rule's
/// description, a suspension reason). A request id other than 1–128
/// characters of `[A-Za-z0-9._:-]` is replaced by a server-made one
/// (`server/src/request_id.rs`), so of these only `-req:1` (which a
/// spreadsheet reads as a formula) and `plain-req` reach the log as sent.
const TRICKY: [(&str, &str, &str); 7] = [
    (
        "=HYPERLINK(\"https://evil.example\",\"click\")",
        "=1+2",
        "plain, with a comma",
    ),
    ("+SUM(A1:A9)", "+req", "say \"hi\", then leave"),
    ("-2+3,\"x\"", "-req:1", "line one\nline two"),
    (
        "@cmd|' /C calc'!A0",
        "@req",
        "=formula in details, \"quoted\"",
    ),
    ("multi\nline, \"subject\"", "plain-req", "tab\there"),
    ("\ttabbed", "req with spaces", "-starts with minus"),
    ("\rcarriage\r\nreturn", "req;semicolon", "@at start"),
];

#[allow(clippy::too_many_lines)]
#[tokio::test]
async fn csv_and_ndjson_exports_round_trip_and_are_audited() {
    let server = TestServer::start().await;
    let tenant = server.create_tenant("exports").await;
    let operator = server.operator().await;
    for (n, (subject, rid, description)) in TRICKY.iter().enumerate() {
        let admin = server.admin(&tenant.id, subject).await;
        let rule = pb::Rule {
            description: (*description).to_owned(),
            ..inbound(&format!("x{n}.*"), pb::Effect::Allow)
        };
        admin
            .tagged(*rid)
            .create_rule(pb::CreateRuleRequest { rule: Some(rule) })
            .await
            .expect("create rule");
    }
    // The operator's suspension reasons land in the tenant's details.
    for (_, _, reason) in TRICKY {
        let request = pb::SuspendTenantRequest {
            tenant_id: tenant.id.clone(),
            reason: reason.to_owned(),
        };
        operator.suspend_tenant(request).await.expect("suspend");
        let request = pb::ReactivateTenantRequest {
            tenant_id: tenant.id.clone(),
            reason: format!("{reason}, again"),
        };
        operator
            .reactivate_tenant(request)
            .await
            .expect("reactivate");
    }
    server.wait_sealed().await;
    let auditor = server.auditor(&tenant.id).await;
    let log = whole_log(&auditor).await;
    assert_eq!(
        log.len(),
        1 + 3 * TRICKY.len(),
        "{:?}",
        log.iter()
            .map(|e| e.event_type.as_str())
            .collect::<Vec<_>>()
    );
    let head = log.last().expect("events").sequence;

    // CSV.
    let csv = export(&auditor, export_all(pb::ExportFormat::Csv))
        .await
        .expect("csv export");
    let summary = &csv.summary;
    assert_eq!(summary.event_count, u64::try_from(log.len()).expect("n"));
    assert_eq!((summary.first_sequence, summary.last_sequence), (1, head));
    assert_eq!(
        summary.byte_count,
        u64::try_from(csv.file.len()).expect("n")
    );
    assert_eq!(summary.sha256, sha256_hex(&csv.file));
    assert!(
        csv.file
            .starts_with(format!("{}\r\n", CSV_HEADER.join(",")).as_bytes()),
        "the header row, without BOM"
    );
    assert!(csv.file.ends_with(b"\r\n"), "CRLF line ends");
    let (rows, same) = python_csv(&csv.file);
    assert!(
        same,
        "re-writing the parsed rows with RFC 4180 minimal quoting and CRLF gives other bytes"
    );
    assert_eq!(rows[0], CSV_HEADER);
    assert_eq!(rows.len(), log.len() + 1);
    for (row, event) in rows[1..].iter().zip(&log) {
        let actor = event.actor.clone().expect("actor");
        let expected = [
            event.tenant_id.clone(),
            event.sequence.to_string(),
            event.event_id.clone(),
            event.time.as_ref().expect("time").to_string(),
            kind_name(actor.kind),
            actor.subject.clone(),
            actor.tenant_id.clone(),
            event.event_type.clone(),
            event.subject_ids.join(" "),
            outcome_name(event.outcome),
            event.request_id.clone(),
        ];
        for (i, value) in expected.iter().enumerate() {
            assert_eq!(
                row[i],
                neutralised(value),
                "column {} of sequence {}",
                CSV_HEADER[i],
                event.sequence
            );
        }
        let details: Value = serde_json::from_str(&row[11]).expect("details cell is JSON");
        assert_eq!(floats(details), floats(struct_json(event.details.as_ref())));
        assert_eq!((&row[12], &row[13]), (&event.prev_hash, &event.hash));
        assert_eq!(
            spec_hash(event, &row[11]),
            event.hash,
            "the documented hash formula, recomputed from the export, at {}",
            event.sequence
        );
    }
    for (subject, rid, _) in TRICKY {
        let event = log
            .iter()
            .find(|e| e.actor.as_ref().is_some_and(|a| a.subject == subject))
            .unwrap_or_else(|| panic!("no event by {subject:?}"));
        let kept = rid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".:_-".contains(&b));
        if kept {
            assert_eq!(
                (event.event_type.as_str(), event.request_id.as_str()),
                ("rule.created", rid)
            );
        } else {
            assert_eq!(event.event_type, "rule.created");
            assert!(
                uuid::Uuid::parse_str(&event.request_id).is_ok(),
                "{rid:?} was replaced by a server-made id, not {:?}",
                event.request_id
            );
        }
    }
    let reasons: Vec<Value> = log
        .iter()
        .filter(|e| e.event_type == "tenant.suspended")
        .map(|e| struct_json(e.details.as_ref())["reason"].clone())
        .collect();
    assert_eq!(
        reasons,
        TRICKY
            .iter()
            .map(|(_, _, reason)| json!(reason))
            .collect::<Vec<_>>()
    );

    // NDJSON, of the log that now also holds the CSV export's event.
    server.wait_sealed().await;
    let log = whole_log(&auditor).await;
    assert_eq!(log.last().expect("events").event_type, "audit.exported");
    let head = log.last().expect("events").sequence;
    let ndjson = export(&auditor, export_all(pb::ExportFormat::Ndjson))
        .await
        .expect("ndjson export");
    assert_eq!(ndjson.summary.event_count, summary.event_count + 1);
    assert_eq!(
        (ndjson.summary.first_sequence, ndjson.summary.last_sequence),
        (1, head)
    );
    assert_eq!(
        ndjson.summary.byte_count,
        u64::try_from(ndjson.file.len()).expect("n")
    );
    assert_eq!(ndjson.summary.sha256, sha256_hex(&ndjson.file));
    let text = String::from_utf8(ndjson.file.clone()).expect("utf-8");
    assert!(text.ends_with('\n') && !text.contains('\r'), "LF line ends");
    let lines: Vec<&str> = text.trim_end_matches('\n').split('\n').collect();
    assert_eq!(lines.len(), log.len());
    let event_fields = message_fields("AuditEvent");
    let actor_fields = message_fields("Actor");
    for (line, event) in lines.iter().zip(&log) {
        let parsed: Value = serde_json::from_str(line).expect("an NDJSON line is JSON");
        let object = parsed.as_object().expect("an object per line");
        for key in object.keys() {
            assert!(
                event_fields.contains(key),
                "{key} is not an AuditEvent field (original proto names)"
            );
        }
        for key in parsed["actor"].as_object().expect("actor object").keys() {
            assert!(actor_fields.contains(key), "{key} is not an Actor field");
        }
        let actor = event.actor.clone().expect("actor");
        assert_eq!(parsed["tenant_id"], json!(event.tenant_id));
        assert_eq!(
            parsed["sequence"],
            json!(event.sequence.to_string()),
            "uint64 as a JSON string"
        );
        assert_eq!(parsed["event_id"], json!(event.event_id));
        assert_eq!(
            parsed["time"],
            json!(event.time.as_ref().expect("time").to_string())
        );
        assert_eq!(
            parsed["actor"]["kind"],
            json!(
                pb::PrincipalKind::try_from(actor.kind)
                    .expect("kind")
                    .as_str_name()
            )
        );
        assert_eq!(parsed["actor"]["subject"], json!(actor.subject));
        assert_eq!(parsed["event_type"], json!(event.event_type));
        assert_eq!(parsed["subject_ids"], json!(event.subject_ids));
        assert_eq!(
            parsed["outcome"],
            json!(
                pb::AuditOutcome::try_from(event.outcome)
                    .expect("outcome")
                    .as_str_name()
            )
        );
        assert_eq!(parsed["request_id"], json!(event.request_id));
        assert_eq!(
            floats(parsed["details"].clone()),
            floats(struct_json(event.details.as_ref()))
        );
        assert_eq!(parsed["prev_hash"], json!(event.prev_hash));
        assert_eq!(parsed["hash"], json!(event.hash));
    }

    // Both exports are in the log, each with its own summary.
    server.wait_sealed().await;
    let exported = list_pages(
        &auditor,
        pb::ListAuditEventsRequest {
            event_types: vec!["audit.exported".to_owned()],
            ..oldest_first()
        },
        50,
    )
    .await;
    assert_eq!(exported.len(), 2, "one audit.exported per export");
    for (event, (format, file)) in exported.iter().zip([("csv", &csv), ("ndjson", &ndjson)]) {
        let details = struct_json(event.details.as_ref());
        assert_eq!(details["format"], json!(format));
        assert_eq!(details["sha256"], json!(file.summary.sha256));
        assert_eq!(
            floats(details["event_count"].clone()),
            json!(file.summary.event_count as f64)
        );
        assert_eq!(
            floats(details["byte_count"].clone()),
            json!(file.summary.byte_count as f64)
        );
        assert_eq!(event.actor.clone().expect("actor").subject, "auditor@test");
    }

    // Filters: a type, a time range, and an empty range.
    let rules = export(
        &auditor,
        pb::ExportAuditEventsRequest {
            event_types: vec!["rule.*".to_owned()],
            ..export_all(pb::ExportFormat::Csv)
        },
    )
    .await
    .expect("rules export");
    let (rule_rows, _) = python_csv(&rules.file);
    assert_eq!(rule_rows.len(), 1 + TRICKY.len());
    assert!(rule_rows[1..].iter().all(|row| row[7] == "rule.created"));
    let start = millis(log[2].time.as_ref());
    let end = millis(log[5].time.as_ref());
    let in_range: Vec<u64> = log
        .iter()
        .filter(|e| (start..end).contains(&millis(e.time.as_ref())))
        .map(|e| e.sequence)
        .collect();
    let ranged = export(
        &auditor,
        pb::ExportAuditEventsRequest {
            start_time: Some(timestamp(start)),
            end_time: Some(timestamp(end)),
            ..export_all(pb::ExportFormat::Ndjson)
        },
    )
    .await
    .expect("ranged export");
    let ranged_sequences: Vec<u64> = String::from_utf8(ranged.file)
        .expect("utf-8")
        .lines()
        .map(|line| {
            serde_json::from_str::<Value>(line).expect("json")["sequence"]
                .as_str()
                .expect("sequence")
                .parse()
                .expect("number")
        })
        .collect();
    assert_eq!(ranged_sequences, in_range);
    assert_eq!(
        ranged.summary.event_count,
        u64::try_from(in_range.len()).expect("n")
    );
    let future = server.clock.now_millis() + 3_600_000;
    let empty = export(
        &auditor,
        pb::ExportAuditEventsRequest {
            start_time: Some(timestamp(future)),
            ..export_all(pb::ExportFormat::Csv)
        },
    )
    .await
    .expect("empty export");
    assert_eq!(
        empty.file,
        format!("{}\r\n", CSV_HEADER.join(",")).into_bytes(),
        "an empty CSV export is its header"
    );
    assert_eq!(
        (
            empty.summary.event_count,
            empty.summary.first_sequence,
            empty.summary.last_sequence
        ),
        (0, 0, 0)
    );
    let empty = export(
        &auditor,
        pb::ExportAuditEventsRequest {
            start_time: Some(timestamp(future)),
            ..export_all(pb::ExportFormat::Ndjson)
        },
    )
    .await
    .expect("empty export");
    assert!(empty.file.is_empty());
    assert_eq!(
        (empty.summary.byte_count, empty.summary.sha256.as_str()),
        (0, sha256_hex(b"").as_str())
    );
    server.stop().await;
}

// ---------------------------------------------------------------------------
// 5. Isolation, roles, bad input, filters, the tail's cursor.

/// Pair plus activity in both logs: globex allows `read.*`, the agent gets a
/// delegation, globex revokes it. Returns the delegation id.
async fn pair_with_activity(pair: &Pair) -> String {
    add_rule(&pair.globex_admin, inbound("read.*", pb::Effect::Allow)).await;
    let outcome = pair
        .agent
        .request_delegation(ask(&pair.globex.id, "read.data"))
        .await
        .expect("request");
    let id = outcome.delegation().expect("delegation").id.clone();
    pair.globex_admin
        .revoke(id.clone(), "done")
        .await
        .expect("revoke");
    pair.server.wait_sealed().await;
    id
}

#[tokio::test]
async fn another_tenants_auditor_sees_nothing_of_this_log() {
    let pair = setup_pair().await;
    let delegation_id = pair_with_activity(&pair).await;
    let server = &pair.server;
    let (initech, _) = pair.third_tenant().await;
    server.wait_sealed().await;
    let outsider = server.auditor(&initech.id).await;
    let foreign = [
        pair.acme.id.as_str(),
        pair.globex.id.as_str(),
        pair.bot.id.as_str(),
        delegation_id.as_str(),
    ];
    let leaks = |text: &str| foreign.iter().any(|id| text.contains(id));

    // The parties see the delegation (the control)...
    for log in pair.logs() {
        let auditor = server.auditor(log).await;
        let events = list_pages(
            &auditor,
            pb::ListAuditEventsRequest {
                subject_id: delegation_id.clone(),
                ..oldest_first()
            },
            50,
        )
        .await;
        assert!(events.len() >= 2, "{log} sees the delegation");
    }
    // ...the outsider sees only its own tenant.created.
    let own = list_pages(
        &outsider,
        pb::ListAuditEventsRequest {
            include_unsealed: true,
            ..oldest_first()
        },
        50,
    )
    .await;
    assert_eq!(own.len(), 1, "{own:?}");
    assert_eq!(
        (own[0].tenant_id.as_str(), own[0].event_type.as_str()),
        (initech.id.as_str(), "tenant.created")
    );
    assert!(!leaks(&format!("{own:?}")));
    for filter in [
        pb::ListAuditEventsRequest {
            subject_id: delegation_id.clone(),
            ..Default::default()
        },
        pb::ListAuditEventsRequest {
            actor_subject: pair.bot.id.clone(),
            ..Default::default()
        },
        pb::ListAuditEventsRequest {
            event_types: vec!["delegation.*".to_owned(), "rule.*".to_owned()],
            include_unsealed: true,
            ..Default::default()
        },
    ] {
        let page = list(&outsider, filter).await.expect("list");
        assert!(page.events.is_empty(), "{page:?}");
    }

    // A page token of another tenant's listing is not a token of this one.
    let globex_auditor = server.auditor(&pair.globex.id).await;
    let one = |page_token: String| pb::ListAuditEventsRequest {
        page: Some(pb::PageRequest {
            page_size: 1,
            page_token,
        }),
        ..Default::default()
    };
    let foreign_token = list(&globex_auditor, one(String::new()))
        .await
        .expect("list")
        .page
        .expect("page")
        .next_page_token;
    assert!(!foreign_token.is_empty());
    expect_invalid(list(&outsider, one(foreign_token)).await, "page.page_token");

    // Tail: its own event, then a heartbeat at its own head, even while the
    // pair keeps writing.
    let mut stream = tail(&outsider, tail_after(0)).await.expect("tail");
    pair.agent
        .request_delegation(ask(&pair.globex.id, "read.more"))
        .await
        .expect("request");
    let (events, cursor) = tail_until_heartbeat(&mut stream).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].tenant_id, initech.id);
    assert_eq!(cursor, 1);
    server.wait_sealed().await;
    let (events, cursor) = tail_until_heartbeat(&mut stream).await;
    assert!(
        events.is_empty(),
        "another tenant's event reached the tail: {events:?}"
    );
    assert_eq!(cursor, 1);
    drop(stream);

    // Export: its own rows only (each export adds its own audit.exported).
    for format in [pb::ExportFormat::Csv, pb::ExportFormat::Ndjson] {
        server.wait_sealed().await;
        let head = verify(&outsider, 0, 0, false)
            .await
            .expect("verify")
            .head_sequence;
        let file = export(&outsider, export_all(format)).await.expect("export");
        assert_eq!(file.summary.event_count, head);
        assert!(!leaks(&String::from_utf8_lossy(&file.file)));
    }
    let (rows, _) = python_csv(
        &export(&outsider, export_all(pb::ExportFormat::Csv))
            .await
            .expect("export")
            .file,
    );
    assert!(rows[1..].iter().all(|row| row[0] == initech.id));
    assert!(
        rows[1..]
            .iter()
            .all(|row| row[7] == "tenant.created" || row[7] == "audit.exported")
    );

    // Verify: its own head, its own receipt.
    server.wait_sealed().await;
    let verified = verify(&outsider, 0, 0, true).await.expect("verify");
    assert!(verified.ok);
    let own_head = verified.head_sequence;
    assert!(
        own_head <= 4,
        "tenant.created and the outsider's own exports"
    );
    check_receipt(server, &initech.id, &verified).await;
    // The pair's heads are beyond the outsider's: cursors are per tenant.
    let globex_head = verify(&server.auditor(&pair.globex.id).await, 0, 0, false)
        .await
        .expect("verify")
        .head_sequence;
    assert!(globex_head > own_head);
    expect_code(
        tail(&outsider, tail_after(globex_head)).await,
        Code::OutOfRange,
    );
    expect_code(
        verify(&outsider, globex_head, 0, false).await,
        Code::OutOfRange,
    );
    pair.server.stop().await;
}

#[tokio::test]
async fn only_admins_and_auditors_of_the_tenant_read_its_log() {
    let pair = setup_pair().await;
    pair_with_activity(&pair).await;
    let server = &pair.server;
    let operator = server.operator().await;
    let approver = server.approver(&pair.globex.id, "approver@test").await;
    let agent = &pair.agent;
    for (who, client) in [
        ("operator", &operator),
        ("approver", &approver),
        ("agent", agent),
    ] {
        let before = server.count("audit_events").await;
        expect_reason(
            list(client, oldest_first()).await,
            Code::PermissionDenied,
            pb::ErrorReason::RoleRequired,
        );
        expect_reason(
            tail(client, tail_after(0)).await,
            Code::PermissionDenied,
            pb::ErrorReason::RoleRequired,
        );
        expect_reason(
            export(client, export_all(pb::ExportFormat::Csv)).await,
            Code::PermissionDenied,
            pb::ErrorReason::RoleRequired,
        );
        expect_reason(
            verify(client, 0, 0, true).await,
            Code::PermissionDenied,
            pb::ErrorReason::RoleRequired,
        );
        assert_eq!(
            server.count("audit_events").await,
            before,
            "{who}'s refused exports write nothing"
        );
    }
    // The tenant's admins read it as its auditors do.
    let admin_view = whole_log(&pair.globex_admin).await;
    let auditor = server.auditor(&pair.globex.id).await;
    assert_eq!(admin_view, whole_log(&auditor).await);
    assert!(admin_view.len() >= 4);
    assert!(
        verify(&pair.globex_admin, 0, 0, false)
            .await
            .expect("verify")
            .ok
    );
    pair.server.stop().await;
}

#[tokio::test]
async fn bad_input_is_refused_naming_the_field() {
    let pair = setup_pair().await;
    pair_with_activity(&pair).await;
    let server = &pair.server;
    let auditor = server.auditor(&pair.globex.id).await;
    let now = server.clock.now_millis();
    let backwards = || pb::ListAuditEventsRequest {
        start_time: Some(timestamp(now)),
        end_time: Some(timestamp(now - 1000)),
        ..Default::default()
    };
    expect_invalid(list(&auditor, backwards()).await, "end_time");
    expect_invalid(
        list(
            &auditor,
            pb::ListAuditEventsRequest {
                start_time: Some(timestamp(now)),
                end_time: Some(timestamp(now)),
                ..Default::default()
            },
        )
        .await,
        "end_time",
    );
    for bad in [
        "Delegation.revoked",
        "delegation",
        "delegation.*.x",
        "*",
        "rule.",
        ".created",
    ] {
        expect_invalid(
            list(
                &auditor,
                pb::ListAuditEventsRequest {
                    event_types: vec!["rule.created".to_owned(), bad.to_owned()],
                    ..Default::default()
                },
            )
            .await,
            "event_types[1]",
        );
    }
    expect_invalid(
        list(
            &auditor,
            pb::ListAuditEventsRequest {
                event_types: vec![format!("rule.{}", "x".repeat(60))],
                ..Default::default()
            },
        )
        .await,
        "event_types[0]",
    );
    expect_invalid(
        list(
            &auditor,
            pb::ListAuditEventsRequest {
                event_types: (0..33).map(|n| format!("rule.v{n}")).collect(),
                ..Default::default()
            },
        )
        .await,
        "event_types",
    );
    expect_invalid(
        list(
            &auditor,
            pb::ListAuditEventsRequest {
                outcome: 99,
                ..Default::default()
            },
        )
        .await,
        "outcome",
    );
    expect_invalid(
        list(
            &auditor,
            pb::ListAuditEventsRequest {
                actor_subject: "a".repeat(257),
                ..Default::default()
            },
        )
        .await,
        "actor_subject",
    );
    expect_invalid(
        list(
            &auditor,
            pb::ListAuditEventsRequest {
                subject_id: "s".repeat(65),
                ..Default::default()
            },
        )
        .await,
        "subject_id",
    );
    let paged = |page_size, page_token: &str| pb::ListAuditEventsRequest {
        page: Some(pb::PageRequest {
            page_size,
            page_token: page_token.to_owned(),
        }),
        ..Default::default()
    };
    expect_invalid(list(&auditor, paged(501, "")).await, "page.page_size");
    expect_invalid(list(&auditor, paged(1, "garbage")).await, "page.page_token");
    let token = list(&auditor, paged(1, ""))
        .await
        .expect("list")
        .page
        .expect("page")
        .next_page_token;
    assert!(!token.is_empty());
    expect_invalid(
        list(
            &auditor,
            pb::ListAuditEventsRequest {
                order: pb::AuditOrder::OldestFirst as i32,
                ..paged(1, &token)
            },
        )
        .await,
        "page.page_token",
    );

    expect_invalid(
        tail(
            &auditor,
            pb::TailAuditEventsRequest {
                heartbeat_interval_seconds: 61,
                ..Default::default()
            },
        )
        .await,
        "heartbeat_interval_seconds",
    );
    expect_invalid(
        tail(
            &auditor,
            pb::TailAuditEventsRequest {
                event_types: vec!["Rule.created".to_owned()],
                ..Default::default()
            },
        )
        .await,
        "event_types[0]",
    );
    let head = verify(&auditor, 0, 0, false)
        .await
        .expect("verify")
        .head_sequence;
    expect_code(tail(&auditor, tail_after(head + 1)).await, Code::OutOfRange);
    expect_code(tail(&auditor, tail_after(u64::MAX)).await, Code::OutOfRange);

    expect_invalid(
        export(&auditor, export_all(pb::ExportFormat::Unspecified)).await,
        "format",
    );
    expect_invalid(
        export(
            &auditor,
            pb::ExportAuditEventsRequest {
                start_time: Some(timestamp(now)),
                end_time: Some(timestamp(now - 1)),
                ..export_all(pb::ExportFormat::Csv)
            },
        )
        .await,
        "end_time",
    );
    expect_invalid(
        export(
            &auditor,
            pb::ExportAuditEventsRequest {
                event_types: vec!["audit".to_owned()],
                ..export_all(pb::ExportFormat::Csv)
            },
        )
        .await,
        "event_types[0]",
    );

    expect_invalid(verify(&auditor, 5, 3, false).await, "to_sequence");
    expect_code(verify(&auditor, head + 1, 0, false).await, Code::OutOfRange);
    expect_code(
        verify(&auditor, head + 1, head + 5, false).await,
        Code::OutOfRange,
    );
    expect_invalid(
        list(
            &auditor,
            pb::ListAuditEventsRequest {
                order: 99,
                ..Default::default()
            },
        )
        .await,
        "order",
    );
    expect_invalid(
        export(
            &auditor,
            pb::ExportAuditEventsRequest {
                format: 99,
                ..Default::default()
            },
        )
        .await,
        "format",
    );
    pair.server.stop().await;
}

#[tokio::test]
async fn a_from_sequence_past_the_head_is_out_of_range_however_large() {
    // VerifyAuditChain: "OUT_OF_RANGE when `from_sequence` is beyond the
    // head", as TailAuditEvents answers for any `after_sequence` beyond it,
    // u64::MAX included.
    let server = TestServer::start().await;
    let (_, auditor) = sealed_tenant(&server, "far", 1).await;
    expect_code(tail(&auditor, tail_after(u64::MAX)).await, Code::OutOfRange);
    for from in [1 << 63, u64::MAX] {
        let result = verify(&auditor, from, 0, false).await;
        assert_eq!(
            result.as_ref().err().and_then(ClientError::code),
            Some(Code::OutOfRange),
            "from_sequence {from}: {result:?}"
        );
    }
    server.stop().await;
}

/// A listing filter, what it is, and the same filter applied locally.
type FilterCase<'a> = (
    &'static str,
    pb::ListAuditEventsRequest,
    Box<dyn Fn(&pb::AuditEvent) -> bool + 'a>,
);

#[allow(clippy::too_many_lines)]
#[tokio::test]
async fn list_filters_and_pages_agree_with_the_whole_log() {
    let pair = setup_pair().await;
    let server = &pair.server;
    let t0 = server.clock.now_millis();
    // Phase A.
    add_rule(&pair.globex_admin, inbound("read.*", pb::Effect::Allow)).await;
    let first = pair
        .agent
        .request_delegation(ask(&pair.globex.id, "read.data"))
        .await
        .expect("request")
        .delegation()
        .expect("delegation")
        .id
        .clone();
    server.clock.advance(60_000);
    // Phase B, a minute later.
    add_rule(&pair.globex_admin, inbound("block.*", pb::Effect::Block)).await;
    expect_code(
        pair.agent
            .request_delegation(ask(&pair.globex.id, "block.this"))
            .await,
        Code::PermissionDenied,
    );
    let second = pair
        .agent
        .request_delegation(ask(&pair.globex.id, "read.more"))
        .await
        .expect("request")
        .delegation()
        .expect("delegation")
        .id
        .clone();
    pair.globex_admin
        .revoke(first.clone(), "filters")
        .await
        .expect("revoke");
    server.wait_sealed().await;
    let auditor = server.auditor(&pair.globex.id).await;
    let all = whole_log(&auditor).await;
    assert!(all.len() >= 8, "{}", all.len());

    let middle = t0 + 30_000;
    let cases: Vec<FilterCase<'_>> = vec![
        (
            "exact type",
            pb::ListAuditEventsRequest {
                event_types: vec!["rule.created".to_owned()],
                ..oldest_first()
            },
            Box::new(|e| e.event_type == "rule.created"),
        ),
        (
            "area wildcard",
            pb::ListAuditEventsRequest {
                event_types: vec!["delegation.*".to_owned()],
                ..oldest_first()
            },
            Box::new(|e| e.event_type.starts_with("delegation.")),
        ),
        (
            "union of types",
            pb::ListAuditEventsRequest {
                event_types: vec!["rule.created".to_owned(), "delegation.revoked".to_owned()],
                ..oldest_first()
            },
            Box::new(|e| e.event_type == "rule.created" || e.event_type == "delegation.revoked"),
        ),
        (
            "human actor",
            pb::ListAuditEventsRequest {
                actor_subject: "gina".to_owned(),
                ..oldest_first()
            },
            Box::new(|e| e.actor.as_ref().is_some_and(|a| a.subject == "gina")),
        ),
        (
            "agent actor",
            pb::ListAuditEventsRequest {
                actor_subject: pair.bot.id.clone(),
                ..oldest_first()
            },
            Box::new(|e| e.actor.as_ref().is_some_and(|a| a.subject == pair.bot.id)),
        ),
        (
            "subject id",
            pb::ListAuditEventsRequest {
                subject_id: first.clone(),
                ..oldest_first()
            },
            Box::new(|e| e.subject_ids.contains(&first)),
        ),
        (
            "denied",
            pb::ListAuditEventsRequest {
                outcome: pb::AuditOutcome::Denied as i32,
                ..oldest_first()
            },
            Box::new(|e| e.outcome == pb::AuditOutcome::Denied as i32),
        ),
        (
            "success",
            pb::ListAuditEventsRequest {
                outcome: pb::AuditOutcome::Success as i32,
                ..oldest_first()
            },
            Box::new(|e| e.outcome == pb::AuditOutcome::Success as i32),
        ),
        (
            "since",
            pb::ListAuditEventsRequest {
                start_time: Some(timestamp(middle)),
                ..oldest_first()
            },
            Box::new(move |e| millis(e.time.as_ref()) >= middle),
        ),
        (
            "until",
            pb::ListAuditEventsRequest {
                end_time: Some(timestamp(middle)),
                ..oldest_first()
            },
            Box::new(move |e| millis(e.time.as_ref()) < middle),
        ),
        (
            "combined",
            pb::ListAuditEventsRequest {
                start_time: Some(timestamp(middle)),
                end_time: Some(timestamp(middle + 3_600_000)),
                event_types: vec!["delegation.*".to_owned()],
                actor_subject: pair.bot.id.clone(),
                outcome: pb::AuditOutcome::Success as i32,
                ..oldest_first()
            },
            Box::new(|e| {
                millis(e.time.as_ref()) >= middle
                    && e.event_type.starts_with("delegation.")
                    && e.actor.as_ref().is_some_and(|a| a.subject == pair.bot.id)
                    && e.outcome == pb::AuditOutcome::Success as i32
            }),
        ),
    ];
    for (what, filter, keep) in &cases {
        let expected: Vec<&str> = all
            .iter()
            .filter(|e| keep(e))
            .map(|e| e.event_id.as_str())
            .collect();
        assert!(
            !expected.is_empty() && expected.len() < all.len(),
            "{what}: a filter that selects something but not everything ({} of {})",
            expected.len(),
            all.len()
        );
        for page_size in [2, 500] {
            let got = list_pages(&auditor, filter.clone(), page_size).await;
            let got: Vec<&str> = got.iter().map(|e| e.event_id.as_str()).collect();
            assert_eq!(got, expected, "{what}, pages of {page_size}");
        }
        let newest = list_pages(
            &auditor,
            pb::ListAuditEventsRequest {
                order: pb::AuditOrder::NewestFirst as i32,
                ..filter.clone()
            },
            3,
        )
        .await;
        let mut newest: Vec<&str> = newest.iter().map(|e| e.event_id.as_str()).collect();
        newest.reverse();
        assert_eq!(newest, expected, "{what}, newest first");
    }
    assert!(all.iter().any(|e| e.subject_ids.contains(&second)));

    // Unfiltered pages in both orders; UNSPECIFIED means newest first.
    let sequences: Vec<u64> = all.iter().map(|e| e.sequence).collect();
    assert_eq!(
        sequences,
        (1..=u64::try_from(all.len()).expect("n")).collect::<Vec<_>>()
    );
    for page_size in [1, 4, 7] {
        let oldest: Vec<u64> = list_pages(&auditor, oldest_first(), page_size)
            .await
            .iter()
            .map(|e| e.sequence)
            .collect();
        assert_eq!(oldest, sequences);
        let newest: Vec<u64> =
            list_pages(&auditor, pb::ListAuditEventsRequest::default(), page_size)
                .await
                .iter()
                .map(|e| e.sequence)
                .rev()
                .collect();
        assert_eq!(newest, sequences);
    }
    let first_page = list(&auditor, pb::ListAuditEventsRequest::default())
        .await
        .expect("list");
    assert_eq!(
        first_page.events.first().map(|e| e.sequence),
        sequences.last().copied()
    );
    assert_eq!(first_page.events.len(), all.len().min(50));
    pair.server.stop().await;
}

#[tokio::test]
async fn the_tail_resumes_filters_and_beats_at_its_cursor() {
    let server = TestServer::start().await;
    let (tenant, auditor) = sealed_tenant(&server, "tailed", 3).await;

    // Resuming after 2 starts at 3.
    let mut stream = tail(&auditor, tail_after(2)).await.expect("tail");
    let (events, cursor) = tail_until_heartbeat(&mut stream).await;
    assert_eq!(
        events.iter().map(|e| e.sequence).collect::<Vec<_>>(),
        [3, 4]
    );
    assert_eq!(cursor, 4);
    // Live events follow, then beats again.
    server.create_agent(&tenant.id, "live").await;
    let message = next_tail(&mut stream).await;
    let Some(Item::Event(event)) = message.item.clone() else {
        panic!("expected the live event, got {message:?}")
    };
    assert_eq!(
        (event.sequence, event.event_type.as_str()),
        (5, "agent.created")
    );
    assert!(!event.hash.is_empty(), "only sealed events are tailed");
    drop(stream);

    // A filter hides events, but the heartbeat's cursor passes them.
    let mut stream = tail(
        &auditor,
        pb::TailAuditEventsRequest {
            event_types: vec!["tenant.*".to_owned()],
            ..tail_after(0)
        },
    )
    .await
    .expect("tail");
    let (events, cursor) = tail_until_heartbeat(&mut stream).await;
    assert_eq!(
        events
            .iter()
            .map(|e| e.event_type.as_str())
            .collect::<Vec<_>>(),
        ["tenant.created"]
    );
    assert_eq!(cursor, 5, "hidden events advance the cursor");
    drop(stream);

    // From the head: nothing old, the next new event.
    let mut stream = tail(
        &auditor,
        pb::TailAuditEventsRequest {
            start_at_head: true,
            after_sequence: 1,
            heartbeat_interval_seconds: 1,
            ..Default::default()
        },
    )
    .await
    .expect("tail");
    let (events, cursor) = tail_until_heartbeat(&mut stream).await;
    assert!(events.is_empty());
    assert_eq!(cursor, 5);
    server.create_agent(&tenant.id, "newest").await;
    let message = next_tail(&mut stream).await;
    assert_eq!(message.sequence, 6, "{message:?}");
    drop(stream);

    // Exactly at the head is allowed; beyond it is not.
    let mut stream = tail(&auditor, tail_after(6)).await.expect("tail");
    let (events, cursor) = tail_until_heartbeat(&mut stream).await;
    assert_eq!((events.len(), cursor), (0, 6));
    expect_code(tail(&auditor, tail_after(7)).await, Code::OutOfRange);

    // At shutdown an open tail ends with UNAVAILABLE (resume is safe).
    server.stop().await;
    let ended = loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.message()).await {
            Ok(Ok(Some(message))) if matches!(message.item, Some(Item::Heartbeat(_))) => {}
            other => break other,
        }
    };
    match ended {
        Ok(Err(status)) => assert_eq!(status.code(), Code::Unavailable, "{status:?}"),
        other => panic!("the tail did not end with UNAVAILABLE at shutdown: {other:?}"),
    }
}

#[tokio::test]
async fn rule_events_record_the_whole_rule() {
    // PolicyService: "auditors read [policies] through the audit log, which
    // records every change", so a rule event carries every field of the
    // rule but the output-only bookkeeping.
    let server = TestServer::start().await;
    let tenant = server.create_tenant("rules").await;
    let admin = server.admin(&tenant.id, "alice").await;
    let rule = add_rule(
        &admin,
        pb::Rule {
            description: "pay suppliers, up to 1,000 \"EUR\"".to_owned(),
            ..inbound("pay.*", pb::Effect::Allow)
        },
    )
    .await;
    let request = pb::UpdateRuleRequest {
        rule: Some(pb::Rule {
            description: "only the description changed".to_owned(),
            ..rule.clone()
        }),
        expected_version: rule.version,
    };
    admin.update_rule(request).await.expect("update rule");
    server.wait_sealed().await;
    let auditor = server.auditor(&tenant.id).await;
    let events = list_pages(
        &auditor,
        pb::ListAuditEventsRequest {
            event_types: vec!["rule.*".to_owned()],
            ..oldest_first()
        },
        50,
    )
    .await;
    assert_eq!(events.len(), 2);
    let output_only = ["create_time", "update_time", "update_actor"];
    for (event, description) in events.iter().zip([
        "pay suppliers, up to 1,000 \"EUR\"",
        "only the description changed",
    ]) {
        let details = struct_json(event.details.as_ref());
        let recorded = details["rule"].as_object().expect("details.rule");
        let missing: Vec<String> = message_fields("Rule")
            .into_iter()
            .filter(|field| !output_only.contains(&field.as_str()) && !recorded.contains_key(field))
            .collect();
        assert!(
            missing.is_empty(),
            "{} details lack rule fields {missing:?}: {details}",
            event.event_type
        );
        assert_eq!(details["rule"]["description"], json!(description));
    }
    server.stop().await;
}

/// Inserts a committed event of `tenant_id` with its `audit_pending` row, as
/// the server writes one, for the sealer to link (see [`hold_sealing`]).
async fn unsealed_row(server: &TestServer, tenant_id: &str, n: usize) -> String {
    let event_id = format!("evt_{}", uuid::Uuid::new_v4().simple());
    let now = server.clock.now_millis();
    let db = &server.state.db;
    let txn = vaultguard_server::store::begin(db).await.expect("begin");
    txn.execute_unprepared(&format!(
        "INSERT INTO audit_events (event_id, tenant_id, occurred_at, actor_kind, actor_subject, \
         actor_tenant_id, event_type, subject_ids, outcome, request_id, details) VALUES \
         ('{event_id}', '{tenant_id}', {now}, 'system', 'system', '', 'agent.created', \
         '[\"agt_unsealed{n}\"]', 'success', '', '{{\"n\":{n}}}')"
    ))
    .await
    .expect("insert unsealed event");
    txn.execute_unprepared(&format!(
        "INSERT INTO audit_pending (event_row_id, tenant_id) \
         SELECT id, tenant_id FROM audit_events WHERE event_id = '{event_id}'"
    ))
    .await
    .expect("insert its pending row");
    txn.commit().await.expect("commit");
    event_id
}

/// Makes the database refuse `tenant_id`'s chain links until
/// [`release_sealing`]: the sealer's rounds for it fail and its events stay
/// committed but unsealed, on either backend.
async fn hold_sealing(server: &TestServer, tenant_id: &str) {
    let db = &server.state.db;
    let statements = if backend() == Backend::Postgres {
        vec![
            format!(
                "CREATE FUNCTION test_hold_sealing() RETURNS trigger LANGUAGE plpgsql AS $$ \
                 BEGIN IF NEW.tenant_id = '{tenant_id}' THEN RAISE EXCEPTION 'sealing held'; END IF; \
                 RETURN NEW; END $$"
            ),
            "CREATE TRIGGER test_hold_sealing BEFORE INSERT ON audit_chain FOR EACH ROW \
             EXECUTE FUNCTION test_hold_sealing()"
                .to_owned(),
        ]
    } else {
        vec![format!(
            "CREATE TRIGGER test_hold_sealing BEFORE INSERT ON audit_chain \
             WHEN NEW.tenant_id = '{tenant_id}' BEGIN SELECT RAISE(ABORT, 'sealing held'); END"
        )]
    };
    for sql in statements {
        db.execute_unprepared(&sql).await.expect("hold sealing");
    }
}

async fn release_sealing(server: &TestServer) {
    let sql = if backend() == Backend::Postgres {
        "DROP TRIGGER test_hold_sealing ON audit_chain"
    } else {
        "DROP TRIGGER test_hold_sealing"
    };
    server
        .state
        .db
        .execute_unprepared(sql)
        .await
        .expect("release sealing");
}

#[tokio::test]
async fn unsealed_events_come_after_the_sealed_ones_oldest_first_and_before_them_newest_first() {
    let server = TestServer::start().await;
    let (tenant, auditor) = sealed_tenant(&server, "unsealed", 3).await;
    let sealed: Vec<String> = whole_log(&auditor)
        .await
        .into_iter()
        .map(|e| e.event_id)
        .collect();
    assert_eq!(sealed.len(), 4);
    hold_sealing(&server, &tenant.id).await;
    let mut unsealed = Vec::new();
    for n in 0..3 {
        unsealed.push(unsealed_row(&server, &tenant.id, n).await);
    }
    let with_unsealed = |order: pb::AuditOrder| pb::ListAuditEventsRequest {
        include_unsealed: true,
        order: order as i32,
        ..Default::default()
    };
    let oldest: Vec<String> = sealed.iter().chain(&unsealed).cloned().collect();
    let newest: Vec<String> = oldest.iter().rev().cloned().collect();
    for page_size in [1, 2, 3, 5, 500] {
        let got = list_pages(
            &auditor,
            with_unsealed(pb::AuditOrder::OldestFirst),
            page_size,
        )
        .await;
        assert_eq!(
            got.iter().map(|e| e.event_id.clone()).collect::<Vec<_>>(),
            oldest,
            "oldest first, pages of {page_size}"
        );
        for event in &got {
            let is_unsealed = unsealed.contains(&event.event_id);
            assert_eq!(event.sequence == 0, is_unsealed);
            assert_eq!(event.hash.is_empty(), is_unsealed);
            assert_eq!(event.prev_hash.is_empty(), is_unsealed);
        }
        let got = list_pages(
            &auditor,
            with_unsealed(pb::AuditOrder::NewestFirst),
            page_size,
        )
        .await;
        assert_eq!(
            got.iter().map(|e| e.event_id.clone()).collect::<Vec<_>>(),
            newest,
            "newest first, pages of {page_size}"
        );
    }
    // Without include_unsealed, only the chain; filters apply to both.
    assert_eq!(
        whole_log(&auditor)
            .await
            .iter()
            .map(|e| e.event_id.clone())
            .collect::<Vec<_>>(),
        sealed
    );
    let subject = list_pages(
        &auditor,
        pb::ListAuditEventsRequest {
            subject_id: "agt_unsealed1".to_owned(),
            ..with_unsealed(pb::AuditOrder::OldestFirst)
        },
        50,
    )
    .await;
    assert_eq!(subject.len(), 1);
    assert_eq!(subject[0].event_id, unsealed[1]);
    // Tails and exports carry sealed events only.
    let mut stream = tail(&auditor, tail_after(0)).await.expect("tail");
    let (events, cursor) = tail_until_heartbeat(&mut stream).await;
    assert_eq!((events.len(), cursor), (4, 4));
    drop(stream);
    let exported = export(&auditor, export_all(pb::ExportFormat::Ndjson))
        .await
        .expect("export");
    assert_eq!(exported.summary.event_count, 4);
    // Released, the sealer links them after the sealed ones.
    release_sealing(&server).await;
    server.wait_sealed().await;
    let linked = whole_log(&auditor).await;
    assert_eq!(
        linked
            .iter()
            .take(oldest.len())
            .map(|e| e.event_id.clone())
            .collect::<Vec<_>>(),
        oldest,
        "then the export's own event"
    );

    // On PostgreSQL, a real committed-but-unsealed event: hold the tenant's
    // chain head so the sealer waits, write through the API, look, release.
    if backend() == Backend::Postgres {
        server.wait_sealed().await;
        let head = verify(&auditor, 0, 0, false)
            .await
            .expect("verify")
            .head_sequence;
        let db = &server.state.db;
        let holder = vaultguard_server::store::begin(db).await.expect("begin");
        holder
            .execute_unprepared(&format!(
                "SELECT seq FROM audit_heads WHERE tenant_id = '{}' FOR UPDATE",
                tenant.id
            ))
            .await
            .expect("hold the head");
        let (agent, _, _) = server.create_agent(&tenant.id, "while-held").await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let verified = verify(&auditor, 0, 0, false).await.expect("verify");
        assert_eq!(
            (verified.ok, verified.head_sequence, verified.unsealed_count),
            (true, head, 1)
        );
        let pending = list(
            &auditor,
            pb::ListAuditEventsRequest {
                subject_id: agent.id.clone(),
                include_unsealed: true,
                ..Default::default()
            },
        )
        .await
        .expect("list");
        assert_eq!(pending.events.len(), 1);
        assert_eq!(pending.events[0].sequence, 0);
        holder.rollback().await.expect("release");
        server.wait_sealed().await;
        let sealed_now = list(
            &auditor,
            pb::ListAuditEventsRequest {
                subject_id: agent.id.clone(),
                ..Default::default()
            },
        )
        .await
        .expect("list");
        assert_eq!(sealed_now.events.len(), 1);
        assert_eq!(sealed_now.events[0].sequence, head + 1);
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_only_two_replicas_write_one_gapless_chain_and_each_tails_it_whole() {
    // Two server processes share one database only on PostgreSQL.
    require_backend(Backend::Postgres);
    const WRITERS_PER_REPLICA: usize = 4;
    const EACH: usize = 100;
    let first = TestServer::start().await;
    let tenant = first.create_tenant("replicated").await;
    let (agent, _, _) = first.create_agent(&tenant.id, "bot").await;
    let second = TestServer::start_replica_of(&first).await;
    let mut streams = Vec::new();
    for server in [&first, &second] {
        let auditor = server.auditor(&tenant.id).await;
        streams.push(tail(&auditor, tail_after(0)).await.expect("tail"));
    }
    let mut writers = Vec::new();
    for (r, server) in [&first, &second].into_iter().enumerate() {
        for w in 0..WRITERS_PER_REPLICA {
            let name = format!("writer-{r}-{w}");
            writers.push(spawn_writer(server, &tenant.id, &agent.id, &name, EACH).await);
        }
    }
    for writer in writers {
        writer.await.expect("writer");
    }
    first.wait_sealed().await;
    let expected = u64::try_from(2 + 2 * WRITERS_PER_REPLICA * EACH).expect("n");
    let auditor = second.auditor(&tenant.id).await;
    let verified = verify(&auditor, 0, 0, false).await.expect("verify");
    assert!(verified.ok, "{verified:?}");
    assert_eq!(
        (verified.head_sequence, verified.checked_count),
        (expected, expected)
    );
    let sequences: Vec<u64> = whole_log(&auditor)
        .await
        .iter()
        .map(|e| e.sequence)
        .collect();
    assert_eq!(sequences, (1..=expected).collect::<Vec<_>>());
    for (n, mut stream) in streams.into_iter().enumerate() {
        let mut seen = Vec::new();
        while seen.last().copied().unwrap_or(0) < expected {
            let message = next_tail(&mut stream).await;
            if let Some(Item::Event(event)) = message.item {
                seen.push(event.sequence);
            }
        }
        assert_eq!(seen, sequences, "the tail on replica {n}");
    }
    second.stop().await;
    first.stop().await;
}

#[tokio::test]
async fn timestamps_out_of_range_are_invalid_arguments() {
    // A google.protobuf.Timestamp far outside 0001..9999 must be refused
    // naming the field, not overflow the server's millisecond arithmetic
    // (which panics the handler in a debug build and wraps in a release one).
    let server = TestServer::start().await;
    let (_, auditor) = sealed_tenant(&server, "huge", 1).await;
    for seconds in [i64::MAX, i64::MIN] {
        let ts = Some(prost_types::Timestamp { seconds, nanos: 0 });
        expect_invalid(
            list(
                &auditor,
                pb::ListAuditEventsRequest {
                    start_time: ts,
                    ..Default::default()
                },
            )
            .await,
            "start_time",
        );
        expect_invalid(
            list(
                &auditor,
                pb::ListAuditEventsRequest {
                    end_time: ts,
                    ..Default::default()
                },
            )
            .await,
            "end_time",
        );
        expect_invalid(
            export(
                &auditor,
                pb::ExportAuditEventsRequest {
                    start_time: ts,
                    ..export_all(pb::ExportFormat::Csv)
                },
            )
            .await,
            "start_time",
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn event_details_stay_within_16_kib() {
    // AuditEvent.details: "At most 16 KiB as JSON". The largest rule the
    // policy limits accept (16 IN conditions of 64 strings of 256 bytes)
    // must not produce a larger event.
    let server = TestServer::start().await;
    let (tenant, auditor) = sealed_tenant(&server, "bigrule", 0).await;
    let admin = server.admin(&tenant.id, "alice").await;
    let values: Vec<pb::AttributeValue> = (0..64)
        .map(|n| crate::policies::text(&format!("{n:03}{}", "v".repeat(253))))
        .collect();
    let conditions: Vec<pb::Condition> = (0..16)
        .map(|n| pb::Condition {
            attribute: format!("attr{n}"),
            operator: pb::ConditionOperator::In as i32,
            value: None,
            values: values.clone(),
            ..Default::default()
        })
        .collect();
    add_rule(
        &admin,
        pb::Rule {
            conditions,
            ..inbound("big.*", pb::Effect::Allow)
        },
    )
    .await;
    server.wait_sealed().await;
    for event in whole_log(&auditor).await {
        let size = struct_json(event.details.as_ref()).to_string().len();
        assert!(
            size <= 16 * 1024,
            "{} details are {size} bytes of JSON",
            event.event_type
        );
    }
    server.stop().await;
}

/// An admin of `tenant_id` named `name` that writes `count` audit events
/// (one `policy.evaluated` per EvaluatePolicy call) in a task of its own.
async fn spawn_writer(
    server: &TestServer,
    tenant_id: &str,
    agent_id: &str,
    name: &str,
    count: usize,
) -> tokio::task::JoinHandle<()> {
    let admin = server.admin(tenant_id, name).await;
    let input = pb::EvaluatePolicyRequest {
        requesting_agent_id: agent_id.to_owned(),
        receiving_tenant_id: tenant_id.to_owned(),
        action: "stock.read".to_owned(),
        requested_ttl_seconds: 600,
        ..Default::default()
    };
    tokio::spawn(async move {
        for _ in 0..count {
            admin
                .evaluate_policy(input.clone())
                .await
                .expect("evaluate policy");
        }
    })
}
