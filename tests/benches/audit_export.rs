//! Memory and throughput of a large audit export: 100,000 sealed events of
//! one tenant streamed through `AuditService/ExportAuditEvents`, as CSV and
//! as NDJSON.
//!
//! The events are inserted directly (`audit_events` + `audit_pending` in
//! transactions of 5,000), the server's own sealer links them into the
//! chain, then an auditor exports the whole log over real gRPC. Server and
//! client share this process, so the process's resident set is sampled every
//! 10 ms during each export (`VmRSS` in `/proc/self/status`); the client
//! hashes and drops every chunk, holding one at a time, so the growth over
//! the baseline taken just before the export is the server's (plus the
//! transport's) working memory. The target is a growth under 50 MB; the
//! benchmark exits non-zero above it.
//!
//! ```sh
//! CARGO_TARGET_DIR=/var/tmp/vaultguard-target cargo bench -p vaultguard-tests --bench audit_export
//! VAULTGUARD_TEST_DB=postgres CARGO_TARGET_DIR=/var/tmp/vaultguard-target \
//!   cargo bench -p vaultguard-tests --bench audit_export
//! ```
//!
//! `VG_BENCH_EVENTS` sets the number of events (default 100,000).
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sea_orm::{ConnectionTrait, Statement, Value as DbValue};
use vaultguard_client::{VaultGuardClient, pb};
use vaultguard_server::audit::placeholders;
use vaultguard_server::clock::Clock;
use vaultguard_tests::Rpc;
use vaultguard_tests::{TestServer, backend, count_rows};

/// The growth target, in MiB.
const TARGET_MIB: f64 = 50.0;
/// Rows per INSERT statement (11 parameters each).
const ROWS_PER_STATEMENT: usize = 500;
/// Rows per transaction.
const ROWS_PER_TRANSACTION: usize = 5_000;

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// A `kB` field of `/proc/self/status` (VmRSS, VmHWM), in KiB.
fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/self/status"))
}

/// Samples VmRSS every 10 ms on a thread of its own until stopped.
struct Sampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<u64>,
}

impl Sampler {
    fn start() -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(status_kib("VmRSS")));
        let thread = std::thread::spawn({
            let (stop, peak) = (stop.clone(), peak.clone());
            move || {
                let mut samples = 0;
                while !stop.load(Ordering::Relaxed) {
                    peak.fetch_max(status_kib("VmRSS"), Ordering::Relaxed);
                    samples += 1;
                    std::thread::sleep(Duration::from_millis(10));
                }
                samples
            }
        });
        Self { stop, peak, thread }
    }

    /// Stops sampling; returns (peak KiB, samples).
    fn finish(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        let samples = self.thread.join().expect("sampler");
        (
            self.peak.load(Ordering::Relaxed).max(status_kib("VmRSS")),
            samples,
        )
    }
}

/// Event `i` of the benchmark as `audit_events` values.
fn event_values(i: usize, start_millis: i64, tenant_id: &str, agent_id: &str) -> [DbValue; 11] {
    let details = serde_json::json!({
        "action": "stock.read",
        "decision": {
            "outcome": if i.is_multiple_of(7) { "block" } else { "allow" },
            "policy_version": i % 13,
            "rule_id": format!("rul_{:032x}", i % 97),
        },
        "note": format!("row {i}, \"quoted\", =formula"),
        "receiving_tenant_id": tenant_id,
        "requesting_agent_id": agent_id,
    });
    [
        format!("evt_{}", uuid::Uuid::new_v4().simple()).into(),
        tenant_id.into(),
        (start_millis + i64::try_from(i).expect("i")).into(),
        "agent".into(),
        agent_id.into(),
        tenant_id.into(),
        "policy.evaluated".into(),
        serde_json::to_string(&[agent_id]).expect("json").into(),
        if i.is_multiple_of(7) {
            "denied"
        } else {
            "success"
        }
        .into(),
        uuid::Uuid::new_v4().to_string().into(),
        details.to_string().into(),
    ]
}

/// Inserts events `from..upto` in one transaction and queues them for the
/// sealer.
async fn insert_range(
    server: &TestServer,
    (from, upto): (usize, usize),
    start_millis: i64,
    tenant_id: &str,
    agent_id: &str,
) -> Result<(), sea_orm::DbErr> {
    let db = &server.state.db;
    let backend = db.get_database_backend();
    // Read outside the transaction (on SQLite a read-then-write transaction
    // cannot upgrade while the sealer writes). Only this benchmark adds
    // events of the tenant, so its ids above this one are this batch's.
    let max_before: i64 = db
        .query_one_raw(Statement::from_string(
            backend,
            "SELECT COALESCE(MAX(id), 0) AS m FROM audit_events",
        ))
        .await?
        .expect("row")
        .try_get("", "m")?;
    let txn = vaultguard_server::store::begin(db).await?;
    let mut next = from;
    while next < upto {
        let rows = ROWS_PER_STATEMENT.min(upto - next);
        let mut values: Vec<DbValue> = Vec::with_capacity(rows * 11);
        for i in next..next + rows {
            values.extend(event_values(i, start_millis, tenant_id, agent_id));
        }
        let sql = format!(
            "INSERT INTO audit_events (event_id, tenant_id, occurred_at, actor_kind, \
             actor_subject, actor_tenant_id, event_type, subject_ids, outcome, request_id, \
             details) VALUES {}",
            vec!["(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"; rows].join(", ")
        );
        txn.execute_raw(Statement::from_sql_and_values(
            backend,
            placeholders(backend, &sql),
            values,
        ))
        .await?;
        next += rows;
    }
    txn.execute_raw(Statement::from_sql_and_values(
        backend,
        placeholders(
            backend,
            "INSERT INTO audit_pending (event_row_id, tenant_id) \
             SELECT id, tenant_id FROM audit_events WHERE tenant_id = ? AND id > ?",
        ),
        [tenant_id.into(), max_before.into()],
    ))
    .await?;
    txn.commit().await
}

/// Inserts `n` events of `tenant_id` and queues them for the sealer,
/// retrying a transaction that lost a SQLite lock race with the sealer.
async fn insert_events(server: &TestServer, tenant_id: &str, agent_id: &str, n: usize) {
    let start_millis = server.clock.now_millis() - i64::try_from(n).expect("n");
    let mut done = 0;
    let mut retries = 0;
    while done < n {
        let upto = (done + ROWS_PER_TRANSACTION).min(n);
        match insert_range(server, (done, upto), start_millis, tenant_id, agent_id).await {
            Ok(()) => done = upto,
            Err(err) if err.to_string().contains("database is locked") && retries < 50 => {
                retries += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(err) => panic!("insert events: {err}"),
        }
    }
    if retries > 0 {
        println!("({retries} insert transactions retried after SQLITE_BUSY)");
    }
}

/// Waits (up to 30 minutes) until the sealer has sealed everything.
async fn wait_sealed(server: &TestServer) {
    let started = Instant::now();
    let mut reported = Instant::now();
    loop {
        let pending = count_rows(&server.state.db, "audit_pending").await;
        if pending == 0 {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(1800),
            "the sealer did not finish within 30 minutes ({pending} pending)"
        );
        if reported.elapsed() > Duration::from_secs(10) {
            eprintln!("  … {pending} events still unsealed");
            reported = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// What one export measured.
struct Measured {
    format: &'static str,
    events: u64,
    bytes: u64,
    chunks: u64,
    seconds: f64,
    baseline_kib: u64,
    peak_kib: u64,
    hwm_before_kib: u64,
    hwm_after_kib: u64,
    samples: u64,
}

impl Measured {
    fn growth_mib(&self) -> f64 {
        mib(self.peak_kib.saturating_sub(self.baseline_kib))
    }

    fn print(&self) {
        let mb = self.bytes as f64 / 1_000_000.0;
        println!(
            "{:<6} events {:>7}  bytes {:>11} ({mb:.1} MB in {} chunks)  {:.2} s  {:.1} MB/s  {:.0} events/s",
            self.format,
            self.events,
            self.bytes,
            self.chunks,
            self.seconds,
            mb / self.seconds,
            self.events as f64 / self.seconds
        );
        println!(
            "       RSS baseline {:.1} MiB  peak {:.1} MiB  growth {:.1} MiB ({} samples)  VmHWM {:.1} → {:.1} MiB",
            mib(self.baseline_kib),
            mib(self.peak_kib),
            self.growth_mib(),
            self.samples,
            mib(self.hwm_before_kib),
            mib(self.hwm_after_kib)
        );
    }
}

async fn measure_export(
    auditor: &VaultGuardClient,
    format: pb::ExportFormat,
    expected_events: u64,
) -> Measured {
    use pb::export_audit_events_response::Part;
    // Let the allocator and the sealer settle before the baseline.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let baseline_kib = status_kib("VmRSS");
    let hwm_before_kib = status_kib("VmHWM");
    let sampler = Sampler::start();
    let started = Instant::now();
    let mut stream = auditor
        .export_audit_events(pb::ExportAuditEventsRequest {
            format: format as i32,
            ..Default::default()
        })
        .await
        .expect("export");
    let mut digest = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    let (mut bytes, mut chunks) = (0u64, 0u64);
    let mut summary = None;
    while let Some(message) = stream.message().await.expect("export stream") {
        match message.part.expect("part") {
            Part::Data(chunk) => {
                digest.update(&chunk);
                bytes += u64::try_from(chunk.len()).expect("len");
                chunks += 1;
            }
            Part::Summary(last) => summary = Some(last),
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let (peak_kib, samples) = sampler.finish();
    let summary = summary.expect("summary");
    let sha256: String = digest
        .finish()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(summary.sha256, sha256, "the summary's sha256");
    assert_eq!(summary.byte_count, bytes, "the summary's byte count");
    assert!(
        summary.event_count >= expected_events,
        "exported {} of {expected_events} events",
        summary.event_count
    );
    Measured {
        format: format.as_str_name().trim_start_matches("EXPORT_FORMAT_"),
        events: summary.event_count,
        bytes,
        chunks,
        seconds,
        baseline_kib,
        peak_kib,
        hwm_before_kib,
        hwm_after_kib: status_kib("VmHWM"),
        samples,
    }
}

async fn run() -> bool {
    let n: usize = std::env::var("VG_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    println!("audit export benchmark on {:?}: {n} events", backend());
    let server = TestServer::start().await;
    let tenant = server.create_tenant("bench-audit").await;
    let (agent, _, _) = server.create_agent(&tenant.id, "bench-bot").await;
    server.wait_sealed().await;

    let started = Instant::now();
    insert_events(&server, &tenant.id, &agent.id, n).await;
    let inserted = started.elapsed();
    wait_sealed(&server).await;
    let sealed = started.elapsed();
    println!(
        "inserted in {:.1} s, sealed after {:.1} s ({:.0} events/s sealed)",
        inserted.as_secs_f64(),
        sealed.as_secs_f64(),
        n as f64 / sealed.as_secs_f64()
    );

    let auditor = server
        .human(&tenant.id, "bench-auditor", &[pb::Role::Auditor])
        .await;
    let verify_started = Instant::now();
    let verified = auditor
        .verify_audit_chain(pb::VerifyAuditChainRequest::default())
        .await
        .expect("verify");
    assert!(verified.ok, "{verified:?}");
    println!(
        "VerifyAuditChain: {} events checked in {:.2} s",
        verified.checked_count,
        verify_started.elapsed().as_secs_f64()
    );
    let expected = u64::try_from(n).expect("n");
    let mut within = true;
    for format in [pb::ExportFormat::Csv, pb::ExportFormat::Ndjson] {
        let measured = measure_export(&auditor, format, expected).await;
        measured.print();
        if measured.growth_mib() >= TARGET_MIB {
            println!(
                "       FAIL: growth {:.1} MiB is not under {TARGET_MIB} MiB",
                measured.growth_mib()
            );
            within = false;
        }
    }
    server.stop().await;
    within
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    if !runtime.block_on(run()) {
        std::process::exit(1);
    }
}
