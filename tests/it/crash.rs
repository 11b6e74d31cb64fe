//! Crash consistency: the real `vaultguard` binary under mixed load (ALLOW,
//! STEP_UP with approval and token pick-up, revoke, Sign) is killed with
//! SIGKILL several times at random moments and restarted on the same
//! database, while its clients retry what the dead server did not answer
//! with the same idempotency key. Afterwards every call a client saw succeed
//! is in the database with its audit events in both tenants' logs, nothing
//! half-written is left (no delegation without its decision, no ACTIVE one
//! without its issuance event), every received token's `jti` has its row,
//! each retried key names one delegation, and each tenant's hash chain is
//! gapless and verifies. PostgreSQL and SQLite alike (one process at a time
//! owns the SQLite file). Token exchange is left out: it needs an OAuth
//! provider behind the child, and its writes are single-row stand-alone
//! events already covered by the other calls' shape.
//!
//! The helpers that check audit logs and chains serve the outage and
//! replica tests too.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseConnection, EntityTrait, QueryFilter, Statement,
};
use tonic::Code;
use vaultguard_client::{ClientError, DelegationOutcome, VaultGuardClient, pb};
use vaultguard_server::clock::OffsetClock;
use vaultguard_server::store::entities::{audit_event, delegation, signature, step_up};
use vaultguard_tests::{
    Backend, Primary, TestOptions, TestServer, approve_step_up, backend, create_pg_database,
    drop_pg_database, get_step_up, wait_ready,
};

use crate::cookbook::cli_binary;
use crate::policies::{add_rule, inbound, with_counterpart};
use crate::replica_process::{Running, free_port};
use crate::vault_signing::create_key;
use vaultguard_tests::Rpc;

/// How many times the server is killed.
const KILLS: usize = 4;

// ---------------------------------------------------------------------------
// Audit checks shared with the outage and replica tests.

/// Every event of some tenants' logs, counted by tenant, event type and
/// subject id.
pub(crate) struct AuditIndex {
    counts: HashMap<(String, String, String), usize>,
}

impl AuditIndex {
    /// Reads every event of `tenants`' logs.
    pub(crate) async fn load(db: &DatabaseConnection, tenants: &[&str]) -> Self {
        let events = audit_event::Entity::find()
            .filter(audit_event::Column::TenantId.is_in(tenants.iter().copied()))
            .all(db)
            .await
            .expect("load audit events");
        let mut counts = HashMap::new();
        for event in events {
            let subjects: Vec<String> =
                serde_json::from_str(&event.subject_ids).expect("subject_ids is a JSON array");
            for subject in subjects {
                *counts
                    .entry((event.tenant_id.clone(), event.event_type.clone(), subject))
                    .or_default() += 1;
            }
        }
        Self { counts }
    }

    /// Events of `event_type` naming `subject` in `tenant`'s log.
    pub(crate) fn count(&self, tenant: &str, event_type: &str, subject: &str) -> usize {
        self.counts
            .get(&(tenant.to_owned(), event_type.to_owned(), subject.to_owned()))
            .copied()
            .unwrap_or(0)
    }

    /// [`Self::count`] in each of two logs.
    pub(crate) fn in_both(&self, logs: [&str; 2], event_type: &str, subject: &str) -> [usize; 2] {
        [
            self.count(logs[0], event_type, subject),
            self.count(logs[1], event_type, subject),
        ]
    }
}

async fn one_number(db: &DatabaseConnection, sql: String) -> i64 {
    let row = db
        .query_one_raw(Statement::from_string(db.get_database_backend(), sql))
        .await
        .expect("query")
        .expect("a row");
    row.try_get::<Option<i64>>("", "n")
        .expect("a number")
        .unwrap_or(0)
}

/// Waits until every committed audit event is sealed (no `audit_pending`
/// row is left behind); panics after `within`.
pub(crate) async fn wait_all_sealed(db: &DatabaseConnection, within: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let pending = vaultguard_tests::count_rows(db, "audit_pending").await;
        if pending == 0 {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "{pending} audit events still unsealed after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Asserts that `tenant_id`'s chain covers every one of its events with the
/// gapless sequence 1..=n, and that VerifyAuditChain (as `admin`, an admin
/// of that tenant) checks all n links and finds them intact; returns n.
pub(crate) async fn assert_chain_intact(
    db: &DatabaseConnection,
    admin: &VaultGuardClient,
    tenant_id: &str,
) -> u64 {
    let events = one_number(
        db,
        format!("SELECT COUNT(*) AS n FROM audit_events WHERE tenant_id = '{tenant_id}'"),
    )
    .await;
    let links = one_number(
        db,
        format!("SELECT COUNT(*) AS n FROM audit_chain WHERE tenant_id = '{tenant_id}'"),
    )
    .await;
    let lowest = one_number(
        db,
        format!("SELECT MIN(seq) AS n FROM audit_chain WHERE tenant_id = '{tenant_id}'"),
    )
    .await;
    let highest = one_number(
        db,
        format!("SELECT MAX(seq) AS n FROM audit_chain WHERE tenant_id = '{tenant_id}'"),
    )
    .await;
    assert_eq!(links, events, "{tenant_id}: every event is linked once");
    assert_eq!(
        (lowest, highest),
        (1, links),
        "{tenant_id}: sequence numbers 1..={links} without a gap"
    );
    let verified = admin
        .verify_audit_chain(pb::VerifyAuditChainRequest::default())
        .await
        .expect("VerifyAuditChain");
    assert!(
        verified.ok,
        "{tenant_id}: chain broken at {} ({})",
        verified.first_broken_sequence, verified.failure
    );
    let n = u64::try_from(links).expect("count");
    assert_eq!(verified.checked_count, n, "{tenant_id}: links checked");
    assert_eq!(verified.head_sequence, n, "{tenant_id}: head");
    assert_eq!(verified.unsealed_count, 0, "{tenant_id}: unsealed");
    n
}

/// Asserts that no delegation row of `logs`' two tenants was written
/// without its events: each has exactly one `delegation.decided` in both
/// logs, and each ACTIVE one its issuance event (`delegation.token_issued`
/// for ALLOW, `step_up.approved` after a step-up) exactly once in both.
/// Returns (delegations, active ones).
pub(crate) async fn assert_no_half_written_delegation(
    db: &DatabaseConnection,
    audit: &AuditIndex,
    logs: [&str; 2],
) -> (usize, usize) {
    let rows = delegation::Entity::find()
        .filter(delegation::Column::RequestingTenantId.is_in(logs))
        .all(db)
        .await
        .expect("load delegations");
    let mut active = 0;
    for row in &rows {
        let parties = [
            row.requesting_tenant_id.as_str(),
            row.receiving_tenant_id.as_str(),
        ];
        assert_eq!(
            audit.in_both(parties, "delegation.decided", &row.id),
            [1, 1],
            "delegation {} ({}) and its decision",
            row.id,
            row.status
        );
        if row.status == delegation::Status::Active {
            active += 1;
            let issued = if row.step_up_id.is_some() {
                "step_up.approved"
            } else {
                "delegation.token_issued"
            };
            assert_eq!(
                audit.in_both(parties, issued, &row.id),
                [1, 1],
                "ACTIVE delegation {} and its {issued}",
                row.id
            );
        }
    }
    (rows.len(), active)
}

// ---------------------------------------------------------------------------
// Calls against a server that may be dead.

/// Whether `err` says the server was not there (killed or starting) rather
/// than answering: the caller retries the same request.
pub(crate) fn server_gone(err: &ClientError) -> bool {
    match err {
        ClientError::Transport(_) => true,
        ClientError::Status { code, .. } => {
            matches!(code, Code::Unavailable | Code::Unknown | Code::Cancelled)
        }
        _ => false,
    }
}

/// Runs `call` until the server answers (anything but [`server_gone`]),
/// each attempt bounded by 10 s; returns the answer and how many attempts
/// failed before it.
async fn answered<T, F, Fut>(mut call: F) -> (Result<T, ClientError>, u32)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, ClientError>>,
{
    let give_up = Instant::now() + Duration::from_secs(30);
    let mut failed = 0;
    loop {
        let result = tokio::time::timeout(Duration::from_secs(10), call())
            .await
            .unwrap_or_else(|_| panic!("a call hung for 10 s"));
        match result {
            Err(err) if server_gone(&err) && Instant::now() < give_up => {
                failed += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => return (other, failed),
        }
    }
}

/// The `jti` of a compact JWT (its payload decoded, not verified).
pub(crate) fn jti_of(token: &str) -> String {
    let payload = token.split('.').nth(1).expect("a JWT payload");
    let claims: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).expect("base64url"))
            .expect("JSON claims");
    claims["jti"].as_str().expect("a jti").to_owned()
}

/// A random duration between `low` and `high` milliseconds.
pub(crate) fn jitter(low: u64, high: u64) -> Duration {
    let mut bytes = [0u8; 8];
    aws_lc_rs::rand::fill(&mut bytes).expect("random");
    Duration::from_millis(low + u64::from_le_bytes(bytes) % (high - low))
}

// ---------------------------------------------------------------------------
// The fixture and the child process.

/// What the child servers need and what the test set up through the
/// in-process server before stopping it. The failover test runs two
/// children (replicas) on one database; clients alternate between them.
pub(crate) struct Fixture {
    /// The `vaultguard` binary, built (if stale) once before the first start.
    binary: std::path::PathBuf,
    pub(crate) database_url: String,
    pg_database: Option<String>,
    master_key: String,
    issuer: String,
    /// Each replica's (gRPC, HTTP) port.
    ports: Vec<(u16, u16)>,
    /// Which replica the next client talks to.
    next_replica: std::sync::atomic::AtomicUsize,
    pub(crate) acme: String,
    pub(crate) globex: String,
    /// Agents of acme: (id, secret).
    reader: (String, String),
    churner: (String, String),
    stepper: (String, String),
    signer: (String, String),
    key_id: String,
    acme_admin: String,
    pub(crate) globex_admin: String,
    pub(crate) globex_approver: String,
    dir: tempfile::TempDir,
}

impl Fixture {
    /// A fresh database of the test's backend, one replica.
    async fn set_up() -> Self {
        Self::set_up_on(None, 1).await
    }

    /// Sets everything up on `database` (a fresh one of the test's backend
    /// when `None`; a given one is neither created nor dropped) for
    /// `replicas` child servers.
    pub(crate) async fn set_up_on(database: Option<String>, replicas: usize) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let (database_url, pg_database) = match (database, backend()) {
            (Some(url), _) => (url, None),
            (None, Backend::Postgres) => {
                let (url, name) = create_pg_database().await;
                (url, Some(name))
            }
            (None, Backend::Sqlite) => (
                format!(
                    "sqlite://{}?mode=rwc",
                    dir.path().join("vaultguard.db").display()
                ),
                None,
            ),
        };
        let mut key = [0u8; 32];
        aws_lc_rs::rand::fill(&mut key).expect("random");
        let ports: Vec<(u16, u16)> = (0..replicas).map(|_| (free_port(), free_port())).collect();
        let primary = Primary {
            database_url: database_url.clone(),
            master_key: STANDARD.encode(key),
            issuer: format!("http://127.0.0.1:{}", ports[0].1),
            clock: OffsetClock::new(),
        };
        // The in-process server migrates the database and sets everything
        // up; as a "replica" it leaves the database behind when it stops.
        let server = TestServer::start_with(TestOptions {
            replica_of: Some(primary.clone()),
            ..TestOptions::default()
        })
        .await;
        let acme = server.create_tenant("acme").await;
        let globex = server.create_tenant("globex").await;
        let globex_admin = server.admin(&globex.id, "gina").await;
        let acme_admin = server.admin(&acme.id, "alice").await;
        add_rule(&globex_admin, inbound("stock.read", pb::Effect::Allow)).await;
        add_rule(&globex_admin, inbound("stock.write", pb::Effect::StepUp)).await;
        let mut agents = Vec::new();
        for name in ["reader", "churner", "stepper", "signer"] {
            let (agent, secret, _) = server.create_agent(&acme.id, name).await;
            agents.push((agent.id, secret));
        }
        let key = create_key(&acme_admin, "treasury", pb::KeyAlgorithm::Ed25519, "")
            .await
            .expect("create signing key");
        add_rule(
            &acme_admin,
            with_counterpart(&acme.id, inbound("sign:treasury", pb::Effect::Allow)),
        )
        .await;
        let roles = [pb::Role::Admin];
        let fixture = Self {
            binary: cli_binary(),
            acme_admin: server.mint("alice", Some(&acme.id), &roles).await,
            globex_admin: server.mint("gina", Some(&globex.id), &roles).await,
            globex_approver: server
                .mint("ann", Some(&globex.id), &[pb::Role::Approver])
                .await,
            database_url,
            pg_database,
            master_key: primary.master_key,
            issuer: primary.issuer,
            ports,
            next_replica: std::sync::atomic::AtomicUsize::new(0),
            acme: acme.id,
            globex: globex.id,
            signer: agents.pop().expect("signer"),
            stepper: agents.pop().expect("stepper"),
            churner: agents.pop().expect("churner"),
            reader: agents.pop().expect("reader"),
            key_id: key.id,
            dir,
        };
        server.stop().await;
        fixture
    }

    /// Replica `replica`'s gRPC URL.
    pub(crate) fn grpc_url(&self, replica: usize) -> String {
        format!("http://127.0.0.1:{}", self.ports[replica].0)
    }

    /// Starts the real binary as replica `replica` on the fixture's
    /// database and that replica's ports; returns once it answers.
    pub(crate) async fn spawn(&self, replica: usize) -> Running {
        let (grpc_port, http_port) = self.ports[replica];
        let data_dir = self.dir.path().join(format!("child-{replica}"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("child-{replica}.log")))
            .expect("child log");
        let child = Command::new(&self.binary)
            .arg("--data-dir")
            .arg(&data_dir)
            .args(["--database-url", &self.database_url])
            .args(["--issuer", &self.issuer])
            .env("VAULTGUARD_MASTER_KEY", &self.master_key)
            .args(["serve", "--grpc-addr"])
            .arg(format!("127.0.0.1:{grpc_port}"))
            .arg("--http-addr")
            .arg(format!("127.0.0.1:{http_port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start vaultguard");
        let running = Running(child);
        wait_ready(format!("127.0.0.1:{grpc_port}").parse().expect("addr")).await;
        running
    }

    /// A direct connection to the fixture's database (through the
    /// server's own store, which follows a multi-host URL to the primary).
    pub(crate) async fn database(&self) -> DatabaseConnection {
        let config = vaultguard_server::config::Config {
            database_url: self.database_url.clone(),
            data_dir: self.dir.path().to_path_buf(),
            ..Default::default()
        };
        vaultguard_server::store::connect(&config)
            .await
            .expect("connect to the database")
    }

    /// A client of the next replica in turn.
    async fn client(&self) -> VaultGuardClient {
        let replica = self.next_replica.fetch_add(1, Ordering::Relaxed) % self.ports.len();
        VaultGuardClient::connect(self.grpc_url(replica))
            .await
            .expect("connect")
    }

    async fn agent(&self, (id, secret): &(String, String)) -> VaultGuardClient {
        self.client()
            .await
            .with_client_credentials(id.clone(), secret.clone())
    }

    pub(crate) async fn human(&self, token: &str) -> VaultGuardClient {
        self.client().await.with_bearer(token)
    }

    /// The reader agent on replica `replica`.
    pub(crate) async fn reader_on(&self, replica: usize) -> VaultGuardClient {
        VaultGuardClient::connect(self.grpc_url(replica))
            .await
            .expect("connect")
            .with_client_credentials(self.reader.0.clone(), self.reader.1.clone())
    }

    /// The stepper agent on replica `replica`.
    pub(crate) async fn stepper_on(&self, replica: usize) -> VaultGuardClient {
        VaultGuardClient::connect(self.grpc_url(replica))
            .await
            .expect("connect")
            .with_client_credentials(self.stepper.0.clone(), self.stepper.1.clone())
    }

    /// A human with `token` on replica `replica`.
    pub(crate) async fn human_on(&self, replica: usize, token: &str) -> VaultGuardClient {
        VaultGuardClient::connect(self.grpc_url(replica))
            .await
            .expect("connect")
            .with_bearer(token)
    }
}

// ---------------------------------------------------------------------------
// What the clients saw succeed.

#[derive(Debug, Default)]
pub(crate) struct Seen {
    /// ALLOW (reader and churner): idempotency key → (delegation id, jti).
    pub(crate) allowed: HashMap<String, (String, String)>,
    /// Keys answered only after at least one failed attempt.
    pub(crate) retried: HashSet<String>,
    /// Delegations whose revocation was answered OK.
    pub(crate) revoked: HashSet<String>,
    /// STEP_UP delegations answered PENDING.
    pub(crate) stepped_up: HashSet<String>,
    /// STEP_UP delegations whose approval was answered OK.
    pub(crate) approved: HashSet<String>,
    /// The `jti` of every step-up token received.
    pub(crate) step_up_jtis: HashSet<String>,
    /// Approved step-ups whose token a killed server took with it.
    pub(crate) tokens_lost: usize,
    /// Sign: signature id → idempotency key.
    pub(crate) signed: HashMap<String, String>,
    /// Attempts that met a dead or starting server.
    pub(crate) failed_attempts: u64,
}

type Shared = Arc<Mutex<Seen>>;

fn note(seen: &Shared, edit: impl FnOnce(&mut Seen)) {
    edit(&mut seen.lock().expect("seen"));
}

pub(crate) fn allow_request(globex: &str, key: &str) -> pb::RequestDelegationRequest {
    pb::RequestDelegationRequest {
        receiving_tenant_id: globex.to_owned(),
        action: "stock.read".to_owned(),
        requested_ttl_seconds: 600,
        idempotency_key: key.to_owned(),
        ..Default::default()
    }
}

/// One ALLOW request, retried with its key until answered; returns the
/// delegation id.
async fn allow_once(agent: &VaultGuardClient, globex: &str, key: &str, seen: &Shared) -> String {
    let (outcome, failed) = answered(|| agent.request_delegation(allow_request(globex, key))).await;
    let grant = match outcome {
        Ok(DelegationOutcome::Allowed { grant, .. }) => grant,
        Ok(other) => panic!("stock.read was not allowed: {other:?}"),
        Err(err) => panic!("ALLOW {key} failed: {err:?}"),
    };
    let id = grant.delegation.expect("delegation").id;
    let jti = jti_of(&grant.token);
    assert_eq!(jti, id, "the token's jti is its delegation");
    note(seen, |s| {
        s.failed_attempts += u64::from(failed);
        if failed > 0 {
            s.retried.insert(key.to_owned());
        }
        s.allowed.insert(key.to_owned(), (id.clone(), jti));
    });
    id
}

async fn reader_load(fx: Arc<Fixture>, lane: usize, stop: Arc<AtomicBool>, seen: Shared) {
    let agent = fx.agent(&fx.reader).await;
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        allow_once(&agent, &fx.globex, &format!("read-{lane}-{n}"), &seen).await;
        n += 1;
    }
}

async fn churner_load(fx: Arc<Fixture>, stop: Arc<AtomicBool>, seen: Shared) {
    let agent = fx.agent(&fx.churner).await;
    let admin = fx.human(&fx.globex_admin).await;
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        let key = format!("churn-{n}");
        n += 1;
        let id = allow_once(&agent, &fx.globex, &key, &seen).await;
        let (revoked, failed) = answered(|| admin.revoke(id.clone(), "crash test")).await;
        note(&seen, |s| s.failed_attempts += u64::from(failed));
        match revoked {
            Ok(row) => {
                assert_eq!(row.status(), pb::DelegationStatus::Revoked);
                note(&seen, |s| {
                    s.revoked.insert(id);
                });
            }
            // Revoked by the attempt the server died answering.
            Err(err) if failed > 0 && err.code() == Some(Code::FailedPrecondition) => {}
            Err(err) => panic!("revoke {id}: {err:?}"),
        }
    }
}

/// Takes an approved step-up's token through WatchStepUp, reconnecting when
/// the server dies; `None` when a killed server had already redeemed it.
async fn take_token(agent: &VaultGuardClient, auth_req_id: &str, seen: &Shared) -> Option<String> {
    use pb::watch_step_up_response::Event;
    for _ in 0..50 {
        let (opened, failed) =
            answered(|| vaultguard_tests::watch_step_up(agent, auth_req_id, 1)).await;
        note(seen, |s| s.failed_attempts += u64::from(failed));
        let mut watch = opened.expect("open WatchStepUp");
        loop {
            let message = tokio::time::timeout(Duration::from_secs(10), watch.message())
                .await
                .expect("a watch message within 10 s");
            let status = match message {
                Ok(Some(pb::WatchStepUpResponse {
                    event: Some(Event::Status(status)),
                })) => status,
                Ok(Some(_)) => continue,
                // Ended (the server stopped) or broken (killed): reconnect.
                Ok(None) => break,
                Err(status) if server_gone(&ClientError::from(status.clone())) => break,
                Err(status) => panic!("the watch failed: {status:?}"),
            };
            match status.state() {
                pb::StepUpState::Pending => {}
                pb::StepUpState::Approved if !status.access_token.is_empty() => {
                    return Some(status.access_token);
                }
                pb::StepUpState::Redeemed => return None,
                other => panic!("an approved step-up became {other:?}"),
            }
        }
        note(seen, |s| s.failed_attempts += 1);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no token after 50 watches")
}

async fn stepper_load(fx: Arc<Fixture>, stop: Arc<AtomicBool>, seen: Shared) {
    let agent = fx.agent(&fx.stepper).await;
    let approver = fx.human(&fx.globex_approver).await;
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        let key = format!("step-{n}");
        n += 1;
        let request = pb::RequestDelegationRequest {
            action: "stock.write".to_owned(),
            ..allow_request(&fx.globex, &key)
        };
        let (outcome, failed) = answered(|| agent.request_delegation(request.clone())).await;
        note(&seen, |s| s.failed_attempts += u64::from(failed));
        let Ok(DelegationOutcome::StepUp { challenge, .. }) = outcome else {
            panic!("stock.write was not stepped up: {outcome:?}")
        };
        let delegation = challenge.delegation.expect("delegation");
        note(&seen, |s| {
            s.stepped_up.insert(delegation.id.clone());
        });
        let (shown, failed) = answered(|| get_step_up(&approver, &delegation.step_up_id)).await;
        note(&seen, |s| s.failed_attempts += u64::from(failed));
        let shown = shown.expect("GetStepUp");
        let (approval, failed) =
            answered(|| approve_step_up(&approver, &delegation.step_up_id, &shown.request_hash))
                .await;
        note(&seen, |s| s.failed_attempts += u64::from(failed));
        match approval {
            Ok(_) => note(&seen, |s| {
                s.approved.insert(delegation.id.clone());
            }),
            // Approved by the attempt the server died answering.
            Err(err) if failed > 0 && err.code() == Some(Code::FailedPrecondition) => {}
            Err(err) => panic!("approve {}: {err:?}", delegation.id),
        }
        match take_token(&agent, &challenge.auth_req_id, &seen).await {
            Some(token) => {
                let jti = jti_of(&token);
                assert_eq!(jti, delegation.id);
                note(&seen, |s| {
                    s.step_up_jtis.insert(jti);
                });
            }
            None => note(&seen, |s| s.tokens_lost += 1),
        }
    }
}

async fn signer_load(fx: Arc<Fixture>, stop: Arc<AtomicBool>, seen: Shared) {
    let agent = fx.agent(&fx.signer).await;
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        let key = format!("sign-{n}");
        let request = pb::SignRequest {
            key_id: fx.key_id.clone(),
            payload: Some(pb::sign_request::Payload::Message(pb::SignMessage {
                data: format!("payment {n}").into_bytes(),
                scheme: pb::SigningScheme::Ed25519Pure as i32,
            })),
            idempotency_key: key.clone(),
            ..Default::default()
        };
        n += 1;
        let (signed, failed) = answered(|| agent.sign(request.clone())).await;
        let Some(pb::sign_response::Outcome::Signed(signed)) = signed.expect("Sign").outcome else {
            panic!("the Sign was not signed")
        };
        note(&seen, |s| {
            s.failed_attempts += u64::from(failed);
            s.signed.insert(signed.signature_id, key);
        });
    }
}

/// The mixed load of the crash and failover tests: two readers, the
/// churner, the stepper and the signer, until [`Load::finish`].
pub(crate) struct Load {
    stop: Arc<AtomicBool>,
    seen: Shared,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    pub(crate) fn start(fx: &Arc<Fixture>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let seen: Shared = Arc::default();
        let mut tasks = Vec::new();
        for lane in 0..2 {
            tasks.push(tokio::spawn(reader_load(
                fx.clone(),
                lane,
                stop.clone(),
                seen.clone(),
            )));
        }
        tasks.push(tokio::spawn(churner_load(
            fx.clone(),
            stop.clone(),
            seen.clone(),
        )));
        tasks.push(tokio::spawn(stepper_load(
            fx.clone(),
            stop.clone(),
            seen.clone(),
        )));
        tasks.push(tokio::spawn(signer_load(
            fx.clone(),
            stop.clone(),
            seen.clone(),
        )));
        Self { stop, seen, tasks }
    }

    /// Stops the load, waits for every client's last call, and answers
    /// what the clients saw succeed.
    pub(crate) async fn finish(self) -> Seen {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            tokio::time::timeout(Duration::from_secs(60), task)
                .await
                .expect("the load stops")
                .expect("a load task failed");
        }
        Arc::try_unwrap(self.seen)
            .expect("load done")
            .into_inner()
            .expect("seen")
    }
}

/// What [`assert_nothing_lost`] counted.
pub(crate) struct Checked {
    pub(crate) sealing: Duration,
    pub(crate) delegations: usize,
    pub(crate) active: usize,
    pub(crate) replayed: usize,
    pub(crate) signatures: usize,
    pub(crate) acme_links: u64,
    pub(crate) globex_links: u64,
}

/// After the load: every call a client saw succeed is in the database with
/// its audit events in both tenants' logs, nothing is half-written, every
/// retried key replays its one delegation and token id, and both chains are
/// gapless and verify.
pub(crate) async fn assert_nothing_lost(fx: &Fixture, seen: &Seen) -> Checked {
    // The sealer of the last process links everything.
    let db = fx.database().await;
    let sealing = wait_all_sealed(&db, Duration::from_secs(20)).await;
    let logs = [fx.acme.as_str(), fx.globex.as_str()];
    let audit = AuditIndex::load(&db, &logs).await;

    // Every ALLOW seen: its row, jti and events, and one row per key.
    for (key, (id, jti)) in &seen.allowed {
        let row = delegation::Entity::find_by_id(jti.clone())
            .one(&db)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("no row for the jti {jti} of {key}"));
        let agent = if key.starts_with("churn-") {
            &fx.churner.0
        } else {
            &fx.reader.0
        };
        let by_key = delegation::Entity::find()
            .filter(delegation::Column::RequestingAgentId.eq(agent.clone()))
            .filter(delegation::Column::IdempotencyKey.eq(key.clone()))
            .all(&db)
            .await
            .unwrap();
        assert_eq!(by_key.len(), 1, "{key} names one delegation");
        assert_eq!(&by_key[0].id, id, "{key}");
        if seen.revoked.contains(id) {
            assert_eq!(row.status, delegation::Status::Revoked, "{key}");
        } else if key.starts_with("churn-") {
            // Revoked by an attempt whose answer the kill lost, or still
            // active when the load stopped.
            assert!(
                matches!(
                    row.status,
                    delegation::Status::Active | delegation::Status::Revoked
                ),
                "{key}"
            );
        } else {
            assert_eq!(row.status, delegation::Status::Active, "{key}");
        }
        if row.status == delegation::Status::Revoked {
            assert_eq!(
                audit.in_both(logs, "delegation.revoked", id),
                [1, 1],
                "{key}"
            );
        }
        assert_eq!(
            audit.in_both(logs, "delegation.decided", id),
            [1, 1],
            "{key}"
        );
        assert_eq!(
            audit.in_both(logs, "delegation.token_issued", id),
            [1, 1],
            "{key}"
        );
    }
    // Every step-up seen, approval seen and token received.
    for id in &seen.stepped_up {
        let row = delegation::Entity::find_by_id(id.clone())
            .one(&db)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("no row for the step-up delegation {id}"));
        assert_eq!(
            audit.in_both(logs, "delegation.decided", id),
            [1, 1],
            "{id}"
        );
        if seen.approved.contains(id) || seen.step_up_jtis.contains(id) {
            assert_eq!(row.status, delegation::Status::Active, "{id}");
            let step = step_up::Entity::find_by_id(row.step_up_id.clone().expect("step-up"))
                .one(&db)
                .await
                .unwrap()
                .expect("its step-up");
            assert!(
                matches!(
                    step.state,
                    step_up::State::Approved | step_up::State::Redeemed
                ),
                "{id}: {}",
                step.state
            );
            assert_eq!(audit.in_both(logs, "step_up.approved", id), [1, 1], "{id}");
        }
    }
    for jti in &seen.step_up_jtis {
        let row = delegation::Entity::find_by_id(jti.clone())
            .one(&db)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("no row for the jti {jti}"));
        assert_eq!(row.status, delegation::Status::Active);
        assert_eq!(
            audit.in_both(logs, "step_up.redeemed", jti),
            [1, 1],
            "token {jti} handed out once"
        );
    }
    // Every signature seen: its row and one `key.signed`.
    for (signature_id, key) in &seen.signed {
        let row = signature::Entity::find_by_id(signature_id.clone())
            .one(&db)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("no row for the signature {signature_id} ({key})"));
        assert_eq!(row.status, signature::Status::Signed);
        assert_eq!(&row.idempotency_key, key);
        assert_eq!(
            audit.count(&fx.acme, "key.signed", signature_id),
            1,
            "{key}"
        );
    }
    let all_signed = signature::Entity::find()
        .filter(signature::Column::TenantId.eq(fx.acme.clone()))
        .all(&db)
        .await
        .unwrap();
    for row in &all_signed {
        assert_eq!(row.status, signature::Status::Signed, "{}", row.id);
        assert_eq!(
            audit.count(&fx.acme, "key.signed", &row.id),
            1,
            "{}",
            row.id
        );
    }
    // Nothing half-written.
    let (delegations, active) = assert_no_half_written_delegation(&db, &audit, logs).await;
    // A retried key whose first attempt committed before the kill was
    // answered by a replay.
    let replayed = seen
        .retried
        .iter()
        .filter(|key| audit.count(&fx.acme, "delegation.token_reissued", &seen.allowed[*key].0) > 0)
        .count();

    // Every retried key replays its one delegation and the same token id.
    let reader = fx.agent(&fx.reader).await;
    let churner = fx.agent(&fx.churner).await;
    for key in &seen.retried {
        let agent = if key.starts_with("churn-") {
            &churner
        } else {
            &reader
        };
        let (outcome, _) =
            answered(|| agent.request_delegation(allow_request(&fx.globex, key))).await;
        let (id, jti) = &seen.allowed[key];
        match outcome {
            Ok(DelegationOutcome::Allowed { grant, .. }) => {
                assert_eq!(&grant.delegation.expect("delegation").id, id, "{key}");
                assert_eq!(&jti_of(&grant.token), jti, "{key}");
            }
            // A revoked delegation's key answers its state, not a token.
            Err(err) if key.starts_with("churn-") => {
                assert_eq!(err.code(), Some(Code::FailedPrecondition), "{key}: {err:?}");
            }
            other => panic!("replay of {key}: {other:?}"),
        }
    }

    // Gapless verified chains, the replays' events included.
    wait_all_sealed(&db, Duration::from_secs(20)).await;
    let acme_admin = fx.human(&fx.acme_admin).await;
    let globex_admin = fx.human(&fx.globex_admin).await;
    let acme_links = assert_chain_intact(&db, &acme_admin, &fx.acme).await;
    let globex_links = assert_chain_intact(&db, &globex_admin, &fx.globex).await;

    db.close().await.ok();
    Checked {
        sealing,
        delegations,
        active,
        replayed,
        signatures: all_signed.len(),
        acme_links,
        globex_links,
    }
}

// ---------------------------------------------------------------------------
// The test.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_mid_load_the_server_loses_nothing_a_client_saw_succeed() {
    let started = Instant::now();
    let fx = Arc::new(Fixture::set_up().await);
    let mut child = fx.spawn(0).await;

    let load = Load::start(&fx);

    let mut downtime = Duration::ZERO;
    for _ in 0..KILLS {
        tokio::time::sleep(jitter(2_000, 5_000)).await;
        let killed_at = Instant::now();
        // `Child::kill` is SIGKILL on Unix: no shutdown hook runs.
        child.0.kill().expect("SIGKILL");
        child.0.wait().expect("reap");
        tokio::time::sleep(jitter(100, 500)).await;
        child = fx.spawn(0).await;
        downtime += killed_at.elapsed();
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let seen = load.finish().await;
    let load_done = started.elapsed();

    let checked = assert_nothing_lost(&fx, &seen).await;
    let Checked {
        sealing,
        delegations,
        active,
        replayed,
        signatures,
        acme_links,
        globex_links,
    } = checked;
    eprintln!(
        "crash consistency ({backend:?}): {KILLS} SIGKILLs, {downtime:?} without a server, \
         load {load_done:?}, sealing after the load {sealing:?}, total {total:?}\n  \
         seen succeed: {allowed} ALLOW ({retried} answered only after a retry, {replayed} of \
         them committed before the kill), {revoked} revokes, {stepped} STEP_UP, {approved} \
         approvals, {tokens} step-up tokens ({lost} taken by a killed server), {signed} \
         signatures; {failed} attempts met a dead server\n  \
         database: {delegations} delegations ({active} ACTIVE), {signatures} signatures, \
         chains acme {acme_links} / globex {globex_links} events, gapless and verified",
        backend = backend(),
        allowed = seen.allowed.len(),
        retried = seen.retried.len(),
        revoked = seen.revoked.len(),
        stepped = seen.stepped_up.len(),
        approved = seen.approved.len(),
        tokens = seen.step_up_jtis.len(),
        lost = seen.tokens_lost,
        signed = seen.signed.len(),
        failed = seen.failed_attempts,
        total = started.elapsed(),
    );
    assert!(seen.failed_attempts > 0, "the kills interrupted calls");
    assert!(!seen.allowed.is_empty() && !seen.signed.is_empty() && !seen.approved.is_empty());

    drop(child);
    if let Some(name) = &fx.pg_database {
        drop_pg_database(name).await;
    }
}
