//! Two server replicas on one PostgreSQL database under concurrent load
//! (PostgreSQL only: on SQLite one process owns the file). Beyond the
//! single-approval and single-process checks of `step_ups` and
//! `replica_process`:
//!
//! - one idempotency key sent at once to both replicas, several times each,
//!   makes one delegation (ALLOW, STEP_UP) or one signature, every caller
//!   is answered with it, and it is decided and audited once;
//! - when the clock passes many expiries, both replicas' sweepers and
//!   extra sweeps racing them through both replicas' pools end each
//!   delegation (and its step-up) once, with one expiry event per log;
//! - an approvers' queue watch on one replica sees every ADDED, UPDATED and
//!   REMOVED of step-ups created, partially approved, approved and denied
//!   concurrently through the other, each once, in order;
//! - a revocation through one replica ends VerifyDelegationToken on the
//!   other, which held the ACTIVE row in memory, within a second (the
//!   notification latency: milliseconds), and a signing key disabled
//!   through one replica stops signing on the other likewise.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
use tokio::sync::Barrier;
use vaultguard_client::{DelegationOutcome, VaultGuardClient, pb};
use vaultguard_server::clock::Clock;
use vaultguard_server::domain::delegations::sweep_expired;
use vaultguard_server::store::entities::{delegation, signature, step_up};
use vaultguard_tests::{Backend, TestServer, approve_step_up, get_step_up, request_step_up};

use crate::crash::{AuditIndex, assert_chain_intact, wait_all_sealed};
use crate::delegations::{ask, grant};
use crate::policies::{add_rule, inbound, with_counterpart};
use vaultguard_tests::calls::deny;

use pb::PendingStepUpEventType as Kind;
use pb::StepUpState as State;
use vaultguard_tests::Rpc;
use vaultguard_tests::require_backend;

/// Callers per idempotency key, half on each replica.
const CALLERS: usize = 4;
/// Keys per kind of request.
const KEYS: usize = 10;

/// Two replicas, two tenants and the clients that work through them.
struct Replicas {
    a: TestServer,
    b: TestServer,
    acme: pb::Tenant,
    globex: pb::Tenant,
    bot: pb::Agent,
    /// The same agent, through A and through B.
    agents: [VaultGuardClient; 2],
    acme_admin: VaultGuardClient,
    globex_admin: VaultGuardClient,
}

impl Replicas {
    async fn start() -> Self {
        let a = TestServer::start().await;
        let b = TestServer::start_replica_of(&a).await;
        let acme = a.create_tenant("acme").await;
        let globex = a.create_tenant("globex").await;
        let (bot, secret, agent_a) = a.create_agent(&acme.id, "bot").await;
        agent_a.bearer().await.expect("agent token");
        let agent_b = b
            .anonymous()
            .await
            .with_client_credentials(bot.id.clone(), secret);
        agent_b.bearer().await.expect("agent token through B");
        let acme_admin = a.admin(&acme.id, "alice").await;
        let globex_admin = b.admin(&globex.id, "gina").await;
        Self {
            a,
            b,
            acme,
            globex,
            bot,
            agents: [agent_a, agent_b],
            acme_admin,
            globex_admin,
        }
    }

    fn logs(&self) -> [&str; 2] {
        [self.acme.id.as_str(), self.globex.id.as_str()]
    }

    async fn stop(self) {
        self.b.stop().await;
        self.a.stop().await;
    }
}

/// Runs `call(agent, key)` [`CALLERS`] times at once per key, alternating
/// between the replicas; returns every answer per key.
async fn race<T, F, Fut>(
    agents: &[VaultGuardClient; 2],
    prefix: &str,
    call: F,
) -> Vec<(String, Vec<T>)>
where
    T: Send + 'static,
    F: Fn(VaultGuardClient, String) -> Fut,
    Fut: std::future::Future<Output = T> + Send + 'static,
{
    let mut answers = Vec::new();
    for k in 0..KEYS {
        let key = format!("{prefix}-{k}");
        let barrier = Arc::new(Barrier::new(CALLERS));
        let mut tasks = Vec::new();
        for n in 0..CALLERS {
            let barrier = barrier.clone();
            let future = call(agents[n % 2].clone(), key.clone());
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                future.await
            }));
        }
        let mut results = Vec::new();
        for task in tasks {
            results.push(task.await.expect("caller"));
        }
        answers.push((key, results));
    }
    answers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_only_one_key_sent_to_both_replicas_at_once_makes_one_delegation_or_signature() {
    require_backend(Backend::Postgres);
    let started = Instant::now();
    let r = Replicas::start().await;
    add_rule(&r.globex_admin, inbound("stock.read", pb::Effect::Allow)).await;
    add_rule(&r.globex_admin, inbound("stock.write", pb::Effect::StepUp)).await;
    let key_id = r
        .acme_admin
        .create_signing_key(pb::CreateSigningKeyRequest {
            name: "treasury".to_owned(),
            algorithm: pb::KeyAlgorithm::Secp256k1 as i32,
            description: String::new(),
            disable_digest_signing: false,
        })
        .await
        .unwrap()
        .key
        .unwrap()
        .id;
    add_rule(
        &r.acme_admin,
        with_counterpart(&r.acme.id, inbound("sign:treasury", pb::Effect::Allow)),
    )
    .await;
    let globex = r.globex.id.clone();

    // ALLOW: one delegation, and every caller gets a token for it.
    let receiving = globex.clone();
    let allowed = race(&r.agents, "allow", move |agent, key| {
        let request = pb::RequestDelegationRequest {
            idempotency_key: key,
            ..ask(&receiving, "stock.read")
        };
        async move { agent.request_delegation(request).await }
    })
    .await;
    let mut allow_ids = Vec::new();
    for (key, answers) in allowed {
        let mut ids = HashSet::new();
        for answer in answers {
            let Ok(DelegationOutcome::Allowed { grant, .. }) = answer else {
                panic!("{key}: {answer:?}")
            };
            let id = grant.delegation.expect("delegation").id;
            assert_eq!(crate::crash::jti_of(&grant.token), id, "{key}");
            ids.insert(id);
        }
        assert_eq!(ids.len(), 1, "{key}: every caller got the same delegation");
        allow_ids.extend(ids);
    }

    // STEP_UP: one pending delegation and step-up, one auth_req_id.
    let receiving = globex.clone();
    let stepped = race(&r.agents, "step", move |agent, key| {
        let request = pb::RequestDelegationRequest {
            idempotency_key: key,
            ..ask(&receiving, "stock.write")
        };
        async move { agent.request_delegation(request).await }
    })
    .await;
    let mut step_ids = Vec::new();
    for (key, answers) in stepped {
        let mut seen = HashSet::new();
        for answer in answers {
            let Ok(DelegationOutcome::StepUp { challenge, .. }) = answer else {
                panic!("{key}: {answer:?}")
            };
            let delegation = challenge.delegation.expect("delegation");
            seen.insert((delegation.id, delegation.step_up_id, challenge.auth_req_id));
        }
        assert_eq!(
            seen.len(),
            1,
            "{key}: one step-up for every caller: {seen:?}"
        );
        step_ids.extend(seen.into_iter().map(|(id, _, _)| id));
    }

    // Sign: one signature row, the identical signature for every caller.
    let key = key_id.clone();
    let signed = race(&r.agents, "sign", move |agent, idempotency_key| {
        let request = pb::SignRequest {
            key_id: key.clone(),
            payload: Some(pb::sign_request::Payload::Digest(vec![7; 32])),
            idempotency_key,
            ..Default::default()
        };
        async move { agent.sign(request).await }
    })
    .await;
    let mut signature_ids = Vec::new();
    for (key, answers) in signed {
        let mut seen = HashSet::new();
        for answer in answers {
            let Some(pb::sign_response::Outcome::Signed(signed)) = answer.expect("Sign").outcome
            else {
                panic!("{key}: not signed")
            };
            seen.insert((signed.signature_id, signed.signature));
        }
        assert_eq!(seen.len(), 1, "{key}: one signature for every caller");
        signature_ids.extend(seen.into_iter().map(|(id, _)| id));
    }

    // The database: one row per key, decided and audited once.
    let db = &r.a.state.db;
    wait_all_sealed(db, Duration::from_secs(10)).await;
    let logs = r.logs();
    let audit = AuditIndex::load(db, &logs).await;
    let rows = delegation::Entity::find()
        .filter(delegation::Column::RequestingAgentId.eq(r.bot.id.clone()))
        .all(db)
        .await
        .unwrap();
    assert_eq!(
        rows.len(),
        2 * KEYS,
        "one delegation per ALLOW and STEP_UP key"
    );
    for id in &allow_ids {
        assert_eq!(
            audit.in_both(logs, "delegation.decided", id),
            [1, 1],
            "{id}"
        );
        assert_eq!(
            audit.in_both(logs, "delegation.token_issued", id),
            [1, 1],
            "{id}"
        );
        assert_eq!(
            audit.in_both(logs, "delegation.token_reissued", id),
            [CALLERS - 1, CALLERS - 1],
            "{id}: every other caller was answered by a replay"
        );
    }
    for id in &step_ids {
        assert_eq!(
            audit.in_both(logs, "delegation.decided", id),
            [1, 1],
            "{id}"
        );
        let steps = step_up::Entity::find()
            .filter(step_up::Column::DelegationId.eq(id.clone()))
            .all(db)
            .await
            .unwrap();
        assert_eq!(steps.len(), 1, "{id}: one step-up");
    }
    let signatures = signature::Entity::find()
        .filter(signature::Column::KeyId.eq(key_id.clone()))
        .all(db)
        .await
        .unwrap();
    assert_eq!(signatures.len(), KEYS, "one signature row per Sign key");
    for id in &signature_ids {
        assert_eq!(audit.count(&r.acme.id, "key.signed", id), 1, "{id}");
    }
    let acme_links = assert_chain_intact(db, &r.acme_admin, &r.acme.id).await;
    let globex_links = assert_chain_intact(db, &r.globex_admin, &r.globex.id).await;
    eprintln!(
        "two replicas, {CALLERS} callers per key split across them: {KEYS} ALLOW keys → {} \
         delegations, {KEYS} STEP_UP keys → {} step-ups, {KEYS} Sign keys → {} signatures, each \
         decided and audited once; chains {acme_links} / {globex_links} events; {:?}",
        allow_ids.len(),
        step_ids.len(),
        signature_ids.len(),
        started.elapsed()
    );
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_only_both_replicas_sweeping_end_each_expired_delegation_once() {
    require_backend(Backend::Postgres);
    let started = Instant::now();
    let r = Replicas::start().await;
    add_rule(&r.globex_admin, inbound("stock.read", pb::Effect::Allow)).await;
    add_rule(&r.globex_admin, inbound("pay.*", pb::Effect::StepUp)).await;
    let approver = r.b.approver(&r.globex.id, "ann").await;
    let mut ids = Vec::new();
    for n in 0..30 {
        let request = pb::RequestDelegationRequest {
            requested_ttl_seconds: 60,
            ..ask(&r.globex.id, "stock.read")
        };
        let outcome = r.agents[n % 2].request_delegation(request).await.unwrap();
        ids.push(outcome.delegation().expect("delegation").id.clone());
    }
    let mut pending = Vec::new();
    for n in 0..10 {
        let step =
            request_step_up(&r.agents[n % 2], &approver, ask(&r.globex.id, "pay.bill")).await;
        ids.push(step.delegation_id.clone());
        pending.push(step);
    }

    // Past the 60 s of the ALLOWed delegations on both replicas' shared
    // clock: the replicas' own sweepers (every 5 s) end them.
    let db = r.a.state.db.clone();
    let open = |status: delegation::Status| {
        let db = db.clone();
        async move {
            delegation::Entity::find()
                .filter(delegation::Column::Status.eq(status))
                .all(&db)
                .await
                .unwrap()
                .len()
        }
    };
    r.a.clock.advance(61_000);
    let waited = Instant::now();
    while open(delegation::Status::Active).await > 0 {
        assert!(
            waited.elapsed() < Duration::from_secs(12),
            "the replicas' sweepers did not end the expired delegations"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let by_sweepers = waited.elapsed();
    assert_eq!(
        open(delegation::Status::Pending).await,
        pending.len(),
        "the step-ups run 300 s"
    );

    // Past the step-ups' 300 s: eight extra sweeps through both replicas'
    // pools race each other and the replicas' sweepers.
    r.a.clock.advance(240_000);
    let now = r.a.clock.now_millis();
    let mut sweeps = Vec::new();
    for n in 0..8 {
        let state = if n % 2 == 0 {
            r.a.state.clone()
        } else {
            r.b.state.clone()
        };
        let db = db.clone();
        sweeps.push(tokio::spawn(async move {
            let mut ended = 0;
            for _ in 0..200 {
                ended += sweep_expired(&state, now).await.expect("sweep");
                let left = delegation::Entity::find()
                    .filter(
                        delegation::Column::Status
                            .is_in([delegation::Status::Active, delegation::Status::Pending]),
                    )
                    .all(&db)
                    .await
                    .unwrap();
                if left.is_empty() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            ended
        }));
    }
    let mut by_extra_sweeps = 0;
    for sweep in sweeps {
        by_extra_sweeps += sweep.await.unwrap();
    }
    // Every replica's sweeper runs at least once more over the ended rows.
    let interval = Duration::from_millis(r.a.state.config.sweep_interval_ms);
    tokio::time::sleep(interval + Duration::from_millis(500)).await;

    wait_all_sealed(&db, Duration::from_secs(10)).await;
    let logs = r.logs();
    let audit = AuditIndex::load(&db, &logs).await;
    for id in &ids {
        let row = delegation::Entity::find_by_id(id.clone())
            .one(&db)
            .await
            .unwrap()
            .expect("row");
        assert_eq!(row.status, delegation::Status::Expired, "{id}");
        assert_eq!(
            audit.in_both(logs, "delegation.expired", id),
            [1, 1],
            "{id}: ended once"
        );
    }
    for step in &pending {
        let row = step_up::Entity::find_by_id(step.step_up_id.clone())
            .one(&db)
            .await
            .unwrap()
            .expect("step-up");
        assert_eq!(row.state, step_up::State::Expired);
        let shown = get_step_up(&approver, &step.step_up_id).await.unwrap();
        assert_eq!(shown.state(), State::Expired);
    }
    let removed = vaultguard_tests::count_rows(&db, "step_up_changes").await;
    assert_eq!(
        usize::try_from(removed).unwrap(),
        2 * pending.len(),
        "one ADDED and one REMOVED change per step-up"
    );
    eprintln!(
        "two replicas' sweepers, then 8 sweeps racing them: {} delegations expired once each \
         with one delegation.expired per log ({} ALLOWed ones by the replicas' sweepers within \
         {by_sweepers:?}; of the {} pending step-ups, {by_extra_sweeps} by the extra sweeps, \
         the rest by the replicas'); {:?}",
        ids.len(),
        ids.len() - pending.len(),
        pending.len(),
        started.elapsed()
    );
    r.stop().await;
}

/// Calls `refused` every millisecond until it says the other replica
/// refuses; fails with `what` after a second. Returns how long it took.
async fn lag_until<F, Fut>(what: &str, mut refused: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while !refused().await {
        assert!(started.elapsed() < Duration::from_secs(1), "{what}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    started.elapsed()
}

/// Whether `result` is the FAILED_PRECONDITION of a withdrawn key or
/// connection (any other error fails the test); `false` while it succeeds.
fn refused<T>(result: Result<T, vaultguard_client::ClientError>) -> bool {
    match result {
        Err(err) => {
            assert_eq!(err.code(), Some(tonic::Code::FailedPrecondition), "{err:?}");
            true
        }
        Ok(_) => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_only_a_revocation_through_one_replica_ends_verify_on_the_other() {
    require_backend(Backend::Postgres);
    let r = Replicas::start().await;
    add_rule(&r.globex_admin, inbound("stock.read", pb::Effect::Allow)).await;
    // A resource server of globex verifying through A, whose memory then
    // holds the ACTIVE rows; globex's admin revokes through B.
    let verifier = r.a.admin(&r.globex.id, "gate").await;
    let mut lags = Vec::new();
    for n in 0..5 {
        let (delegation, token) = grant(&r.agents[n % 2], ask(&r.globex.id, "stock.read")).await;
        for _ in 0..3 {
            assert!(verifier.verify(&token, "").await.unwrap().active, "{n}");
        }
        r.globex_admin
            .revoke(&delegation.id, "compromised")
            .await
            .unwrap();
        let what = format!("{n}: A still accepts a token revoked through B");
        lags.push(
            lag_until(&what, || async {
                !verifier.verify(&token, "").await.unwrap().active
            })
            .await,
        );
    }
    println!("revoked through B → refused on A after {lags:?}");
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_only_a_key_disabled_through_one_replica_stops_signing_on_the_other() {
    require_backend(Backend::Postgres);
    let r = Replicas::start().await;
    let key = crate::vault_signing::create_key(&r.acme_admin, "hot", pb::KeyAlgorithm::Ed25519, "")
        .await
        .unwrap();
    add_rule(
        &r.acme_admin,
        with_counterpart(&r.acme.id, inbound("sign:hot", pb::Effect::Allow)),
    )
    .await;
    let sign = |n: usize| pb::SignRequest {
        key_id: key.id.clone(),
        payload: Some(pb::sign_request::Payload::Message(pb::SignMessage {
            data: format!("payload {n}").into_bytes(),
            scheme: pb::SigningScheme::Ed25519Pure as i32,
        })),
        idempotency_key: format!("disable-race-{n}"),
        ..Default::default()
    };
    // B holds the key row in memory after signing with it.
    for n in 0..3 {
        r.agents[1].sign(sign(n)).await.unwrap();
    }
    vaultguard_tests::calls::disable_key(&r.acme_admin, &key.id)
        .await
        .unwrap();
    let attempts = std::sync::atomic::AtomicUsize::new(3);
    let lag = lag_until("B still signs with a key disabled through A", || async {
        let n = attempts.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        refused(r.agents[1].sign(sign(n)).await)
    })
    .await;
    println!("disabled through A → refused on B after {lag:?}");
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_only_a_disconnect_through_one_replica_ends_exchanges_on_the_other() {
    require_backend(Backend::Postgres);
    let r = Replicas::start().await;
    let provider = crate::vault_connections::fake_provider(&r.a, Default::default()).await;
    let registered = crate::vault_connections::register(&r.acme_admin, "mail", &provider).await;
    add_rule(
        &r.acme_admin,
        crate::vault_connections::mail_exchanges(&r.acme.id, pb::Effect::Allow),
    )
    .await;
    let connection = crate::vault_connections::connect(&r.acme_admin, &registered.id).await;
    // B holds the CONNECTED row (and its cached token) after exchanging.
    let handed = r.agents[1].exchange(&connection.id, &[]).await.unwrap();
    for _ in 0..3 {
        let again = r.agents[1].exchange(&connection.id, &[]).await.unwrap();
        assert_eq!(again.access_token, handed.access_token, "the cached token");
    }
    vaultguard_tests::calls::delete_connection(&r.acme_admin, &connection.id)
        .await
        .unwrap();
    let lag = lag_until(
        "B still hands out the token of a connection disconnected through A",
        || async { refused(r.agents[1].exchange(&connection.id, &[]).await) },
    )
    .await;
    println!("disconnected through A → refused on B after {lag:?}");
    r.stop().await;
}

/// What the test expects a step-up to go through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Approved,
    Denied,
    /// Quorum 2: one approval (UPDATED), then the second.
    ApprovedTwice,
    /// Quorum 2: one approval (UPDATED), then a denial.
    ApprovedThenDenied,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_only_a_queue_watch_on_one_replica_sees_every_change_made_through_the_other() {
    require_backend(Backend::Postgres);
    let started = Instant::now();
    let r = Replicas::start().await;
    let quorum = |pattern: &str, approvals_required| pb::Rule {
        approvals_required,
        ..inbound(pattern, pb::Effect::StepUp)
    };
    add_rule(&r.globex_admin, quorum("pay.one", 1)).await;
    add_rule(&r.globex_admin, quorum("pay.two", 2)).await;
    // The watch on B; every request and decision goes through A.
    let bob_on_b = r.b.approver(&r.globex.id, "bob").await;
    let mut queue = bob_on_b
        .watch_pending_step_ups(pb::WatchPendingStepUpsRequest {
            cursor: String::new(),
            heartbeat_interval_seconds: 1,
        })
        .await
        .unwrap();
    let ann = r.a.approver(&r.globex.id, "ann").await;
    let carl = r.a.approver(&r.globex.id, "carl").await;
    let agent = r.agents[0].clone();

    // 24 step-ups created by four concurrent tasks, then decided by four.
    let fates = [
        Fate::Approved,
        Fate::Denied,
        Fate::ApprovedTwice,
        Fate::ApprovedThenDenied,
    ];
    let mut creators = Vec::new();
    for fate in fates {
        let (agent, ann, globex) = (agent.clone(), ann.clone(), r.globex.id.clone());
        creators.push(tokio::spawn(async move {
            let action = match fate {
                Fate::Approved | Fate::Denied => "pay.one",
                Fate::ApprovedTwice | Fate::ApprovedThenDenied => "pay.two",
            };
            let mut made = Vec::new();
            for _ in 0..6 {
                made.push((
                    request_step_up(&agent, &ann, ask(&globex, action)).await,
                    fate,
                ));
            }
            made
        }));
    }
    let mut steps = Vec::new();
    for creator in creators {
        steps.extend(creator.await.unwrap());
    }
    let mut deciders = Vec::new();
    for lane_fate in fates {
        let mine: Vec<_> = steps
            .iter()
            .filter(|(_, f)| *f == lane_fate)
            .cloned()
            .collect();
        let (ann, carl) = (ann.clone(), carl.clone());
        deciders.push(tokio::spawn(async move {
            for (step, fate) in mine {
                let (id, hash) = (&step.step_up_id, &step.request_hash);
                match fate {
                    Fate::Approved => drop(approve_step_up(&ann, id, hash).await.unwrap()),
                    Fate::Denied => drop(deny(&ann, id, "no").await.unwrap()),
                    Fate::ApprovedTwice => {
                        approve_step_up(&ann, id, hash).await.unwrap();
                        approve_step_up(&carl, id, hash).await.unwrap();
                    }
                    Fate::ApprovedThenDenied => {
                        approve_step_up(&ann, id, hash).await.unwrap();
                        deny(&carl, id, "no").await.unwrap();
                    }
                }
            }
        }));
    }
    for decider in deciders {
        decider.await.unwrap();
    }
    let decided = started.elapsed();

    // Every change, in order per step-up, with the state it ended in.
    let fate_of: HashMap<String, Fate> = steps
        .iter()
        .map(|(step, fate)| (step.step_up_id.clone(), *fate))
        .collect();
    let mut expected = HashSet::new();
    for (id, fate) in &fate_of {
        expected.insert((Kind::Added, id.clone()));
        expected.insert((Kind::Removed, id.clone()));
        if matches!(fate, Fate::ApprovedTwice | Fate::ApprovedThenDenied) {
            expected.insert((Kind::Updated, id.clone()));
        }
    }
    let mut received: Vec<(Kind, String, State)> = Vec::new();
    let mut all_seen_at = None;
    let deadline = Instant::now() + Duration::from_secs(15);
    // Once everything came, listen 1.5 s longer (past the feed's settling
    // second) for repeats.
    while all_seen_at.is_none_or(|at: Instant| at.elapsed() < Duration::from_millis(1_500)) {
        assert!(Instant::now() < deadline, "missing after 15 s: {:?}", {
            let got: HashSet<_> = received.iter().map(|(k, id, _)| (*k, id.clone())).collect();
            expected.difference(&got).cloned().collect::<Vec<_>>()
        });
        let message = tokio::time::timeout(Duration::from_secs(5), queue.message())
            .await
            .expect("the queue watch answers within 5 s")
            .expect("the queue watch does not fail")
            .expect("the queue watch does not end");
        if let Some(pb::watch_pending_step_ups_response::Event::Change(change)) = message.event {
            let step_up = change.step_up.clone().expect("step-up");
            received.push((
                change.event_type(),
                step_up.step_up_id.clone(),
                step_up.state(),
            ));
        }
        let got: HashSet<_> = received.iter().map(|(k, id, _)| (*k, id.clone())).collect();
        if all_seen_at.is_none() && got.is_superset(&expected) {
            all_seen_at = Some(Instant::now());
        }
    }
    let got: Vec<_> = received.iter().map(|(k, id, _)| (*k, id.clone())).collect();
    let distinct: HashSet<_> = got.iter().cloned().collect();
    assert_eq!(distinct, expected, "exactly the changes made through A");
    assert_eq!(
        got.len(),
        distinct.len(),
        "a live watch repeats nothing: {got:?}"
    );
    for (id, fate) in &fate_of {
        let order: Vec<Kind> = got
            .iter()
            .filter(|(_, i)| i == id)
            .map(|(k, _)| *k)
            .collect();
        let mut wanted = vec![Kind::Added];
        if matches!(fate, Fate::ApprovedTwice | Fate::ApprovedThenDenied) {
            wanted.push(Kind::Updated);
        }
        wanted.push(Kind::Removed);
        assert_eq!(order, wanted, "{id} ({fate:?})");
        let (_, _, final_state) = received
            .iter()
            .find(|(k, i, _)| *k == Kind::Removed && i == id)
            .expect("removed");
        let final_wanted = match fate {
            Fate::Approved | Fate::ApprovedTwice => State::Approved,
            Fate::Denied | Fate::ApprovedThenDenied => State::Denied,
        };
        assert_eq!(*final_state, final_wanted, "{id} ({fate:?})");
    }
    eprintln!(
        "queue watch on B, {} step-ups created and decided through A by 4+4 concurrent tasks in \
         {decided:?}: {} changes expected, {} received, none missing or repeated; {:?}",
        fate_of.len(),
        expected.len(),
        received.len(),
        started.elapsed()
    );
    r.stop().await;
}
