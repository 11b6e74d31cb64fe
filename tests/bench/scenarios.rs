//! One [`Op`] per scenario, over `connections` channels of its own (the
//! operation with sequence number `n` uses channel `n % connections`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use futures::{StreamExt, TryStreamExt};
use vaultguard_client::{DelegationOutcome, VaultGuardClient, pb};
use vaultguard_tests::{approve_step_up, get_step_up, watch_step_up};

use crate::fixture::{BUDGET_ACTION, Fixture, STEP_UP_ACTION};
use crate::load::{Op, op};
use crate::server::ServerProcess;

/// Every scenario, in the order they run.
pub const ALL: &[&str] = &[
    "floor.whoami",
    "token.issue",
    "delegation.allow.rs256",
    "delegation.allow.es256",
    "delegation.allow.eddsa",
    "delegation.allow.eddsa.budget",
    "verify",
    "exchange.cached",
    "sign.ed25519",
    "sign.secp256k1",
    "stepup.approve_to_watch",
    "stepup.cross_replica",
    "fairness",
    "vault.slow_provider",
    "flood.slow_body",
    "freeze.cross_replica",
    "replication.sync_standby",
];

/// `connections` clients; the one for operation `n` is `n % connections`.
struct Pool(Arc<Vec<VaultGuardClient>>);

impl Pool {
    async fn agents(fixture: &Fixture, server: &ServerProcess, connections: usize) -> Result<Self> {
        let mut clients = Vec::with_capacity(connections);
        for _ in 0..connections.max(1) {
            clients.push(fixture.agent_on(server).await?);
        }
        Ok(Self(Arc::new(clients)))
    }

    /// `client`'s credentials on `connections` channels of their own.
    async fn humans(
        client: &VaultGuardClient,
        server: &ServerProcess,
        connections: usize,
    ) -> Result<Self> {
        let token = client.bearer().await?;
        let mut clients = Vec::with_capacity(connections);
        for _ in 0..connections.max(1) {
            clients.push(server.anonymous().await?.with_bearer(token.clone()));
        }
        Ok(Self(Arc::new(clients)))
    }

    fn handle(&self) -> Arc<Vec<VaultGuardClient>> {
        self.0.clone()
    }
}

fn pick(clients: &[VaultGuardClient], seq: u64) -> Result<&VaultGuardClient> {
    let index = usize::try_from(seq)? % clients.len();
    clients.get(index).context("empty client pool")
}

/// What a scenario needs besides the fixture.
pub struct Scene<'a> {
    pub fixture: &'a Fixture,
    pub server: &'a ServerProcess,
    /// A second replica on the same database (PostgreSQL only).
    pub replica: Option<&'a ServerProcess>,
    pub connections: usize,
    pub concurrency: usize,
    pub verify_pool: usize,
    /// Distinguishes this run's idempotency keys and payloads.
    pub nonce: String,
}

/// The operation of `scenario`.
pub async fn prepare(name: &str, cx: &Scene<'_>) -> Result<Op> {
    match name {
        "floor.whoami" => floor(cx).await,
        "token.issue" => token_issue(cx).await,
        "delegation.allow.rs256" => delegation_allow(cx, "rs256").await,
        "delegation.allow.es256" => delegation_allow(cx, "es256").await,
        "delegation.allow.eddsa" => delegation_allow(cx, "eddsa").await,
        // The same ALLOW on an action a budget of the requester counts.
        "delegation.allow.eddsa.budget" => {
            let request = pb::RequestDelegationRequest {
                action: BUDGET_ACTION.to_owned(),
                ..cx.fixture.allow_request("eddsa")?
            };
            allow_op(cx, request).await
        }
        "verify" => verify(cx).await,
        "exchange.cached" => exchange_cached(cx).await,
        "sign.ed25519" => sign(cx, "ed25519").await,
        "sign.secp256k1" => sign(cx, "secp256k1").await,
        "stepup.approve_to_watch" => step_up(cx, cx.server).await,
        "stepup.cross_replica" => {
            let replica = cx
                .replica
                .context("cross-replica needs PostgreSQL and a second replica")?;
            step_up(cx, replica).await
        }
        "fairness" => bail!("fairness runs on a server of its own (fairness.rs)"),
        "vault.slow_provider" => {
            bail!("vault.slow_provider runs on a server of its own (slow_provider.rs)")
        }
        "flood.slow_body" => bail!("flood.slow_body runs on a server of its own (flood.rs)"),
        "replication.sync_standby" => {
            bail!("replication.sync_standby runs on a formation of its own (replication.rs)")
        }
        "freeze.cross_replica" => {
            bail!("freeze.cross_replica runs on servers of its own (freeze.rs)")
        }
        other => bail!("unknown scenario {other}; known: {}", ALL.join(", ")),
    }
}

/// WhoAmI as an agent: authenticated (the bearer's checks, the standing
/// check, the rate limits) but no database and no signature — the most any
/// RPC can do on this machine with this load tool, so the other figures can
/// be read against it.
async fn floor(cx: &Scene<'_>) -> Result<Op> {
    let agents = Pool::agents(cx.fixture, cx.server, cx.connections)
        .await?
        .handle();
    Ok(op(move |seq| {
        let agents = agents.clone();
        async move {
            let me = pick(&agents, seq)?.who_am_i().await?;
            ensure!(me.actor.is_some(), "WhoAmI without an actor");
            Ok(None)
        }
    }))
}

async fn token_issue(cx: &Scene<'_>) -> Result<Op> {
    let mut clients = Vec::new();
    for _ in 0..cx.connections.max(1) {
        clients.push(cx.server.anonymous().await?);
    }
    let clients = Arc::new(clients);
    let (id, secret) = (cx.fixture.agent_id.clone(), cx.fixture.agent_secret.clone());
    Ok(op(move |seq| {
        let (clients, id, secret) = (clients.clone(), id.clone(), secret.clone());
        async move {
            let issued = pick(&clients, seq)?.issue_token(&id, &secret).await?;
            ensure!(!issued.access_token.is_empty(), "no access token");
            Ok(None)
        }
    }))
}

/// One ALLOW delegation; answers its id and token.
async fn allow(
    agent: &VaultGuardClient,
    request: pb::RequestDelegationRequest,
) -> Result<(String, String)> {
    match agent.request_delegation(request).await? {
        DelegationOutcome::Allowed { grant, .. } => {
            let id = grant.delegation.context("grant without delegation")?.id;
            Ok((id, grant.token))
        }
        DelegationOutcome::StepUp { .. } => bail!("decided STEP_UP, not ALLOW"),
    }
}

async fn delegation_allow(cx: &Scene<'_>, algorithm: &str) -> Result<Op> {
    allow_op(cx, cx.fixture.allow_request(algorithm)?).await
}

async fn allow_op(cx: &Scene<'_>, request: pb::RequestDelegationRequest) -> Result<Op> {
    let agents = Pool::agents(cx.fixture, cx.server, cx.connections)
        .await?
        .handle();
    Ok(op(move |seq| {
        let (agents, request) = (agents.clone(), request.clone());
        async move {
            let (_, token) = allow(pick(&agents, seq)?, request).await?;
            ensure!(!token.is_empty(), "ALLOW without a token");
            Ok(None)
        }
    }))
}

/// `verify_pool` RS256 delegation tokens, every 100th revoked; verified
/// round-robin by the receiving tenant's admin, each answer checked.
async fn verify(cx: &Scene<'_>) -> Result<Op> {
    let agents = Pool::agents(cx.fixture, cx.server, cx.connections)
        .await?
        .handle();
    let request = cx.fixture.allow_request("rs256")?;
    let started = Instant::now();
    let issued: Vec<(String, String)> = futures::stream::iter(0..cx.verify_pool)
        .map(|i| {
            let (agents, request) = (agents.clone(), request.clone());
            async move { allow(pick(&agents, u64::try_from(i)?)?, request).await }
        })
        .buffered(cx.concurrency.max(1))
        .try_collect()
        .await?;
    let receiver = cx.fixture.receiver("rs256")?;
    let revoked: Vec<bool> = (0..issued.len()).map(|i| i % 100 == 0).collect();
    for ((id, _), _) in issued.iter().zip(&revoked).filter(|(_, r)| **r) {
        receiver.admin.revoke(id.clone(), "bench").await?;
    }
    eprintln!(
        "  verify: {} tokens issued, {} revoked in {:.1} s",
        issued.len(),
        revoked.iter().filter(|r| **r).count(),
        started.elapsed().as_secs_f64()
    );
    let pool: Arc<Vec<(String, bool)>> = Arc::new(
        issued
            .into_iter()
            .zip(revoked)
            .map(|((_, token), revoked)| (token, revoked))
            .collect(),
    );
    let verifiers = Pool::humans(&receiver.admin, cx.server, cx.connections)
        .await?
        .handle();
    // A verifier's first verification of a delegation is audited (a durable
    // write); repeats within `repeat_audit_window_seconds` are not. A
    // resource server checks the same token on every request it serves, so
    // the figure that counts is the repeat: every token is verified once
    // here, before the measurement, and the first pass's rate is printed.
    let started = Instant::now();
    let firsts: Vec<()> = futures::stream::iter(0..pool.len())
        .map(|index| {
            let (verifiers, pool) = (verifiers.clone(), pool.clone());
            async move {
                let (token, _) = pool.get(index).context("empty token pool")?;
                pick(&verifiers, u64::try_from(index)?)?
                    .verify(token.clone(), crate::fixture::ALLOW_ACTION)
                    .await?;
                Ok::<_, anyhow::Error>(())
            }
        })
        .buffer_unordered(cx.concurrency.max(1))
        .try_collect()
        .await?;
    let took = started.elapsed().as_secs_f64();
    eprintln!(
        "  verify: first verification of each token (audited) in {took:.1} s, {:.0}/s",
        firsts.len() as f64 / took
    );
    Ok(op(move |seq| {
        let (verifiers, pool) = (verifiers.clone(), pool.clone());
        async move {
            let index = usize::try_from(seq)? % pool.len();
            let (token, revoked) = pool.get(index).context("empty token pool")?;
            let answer = pick(&verifiers, seq)?
                .verify(token.clone(), crate::fixture::ALLOW_ACTION)
                .await?;
            ensure!(
                answer.active != *revoked,
                "token {index}: active = {} but revoked = {revoked}",
                answer.active
            );
            Ok(None)
        }
    }))
}

async fn exchange_cached(cx: &Scene<'_>) -> Result<Op> {
    let connection = cx
        .fixture
        .connection_id
        .clone()
        .context("no connected account")?;
    let agents = Pool::agents(cx.fixture, cx.server, cx.connections)
        .await?
        .handle();
    Ok(op(move |seq| {
        let (agents, connection) = (agents.clone(), connection.clone());
        async move {
            let answer = pick(&agents, seq)?.exchange(&connection, &[]).await?;
            ensure!(!answer.access_token.is_empty(), "no provider token");
            Ok(None)
        }
    }))
}

/// 32 bytes that differ for every operation of every run.
fn payload(nonce: &str, seq: u64) -> Vec<u8> {
    let mut context = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    context.update(nonce.as_bytes());
    context.update(&seq.to_be_bytes());
    context.finish().as_ref().to_vec()
}

/// Sign with a fresh idempotency key and payload each time: Ed25519 over a
/// 32-byte message (pure), secp256k1 over a 32-byte digest.
async fn sign(cx: &Scene<'_>, algorithm: &str) -> Result<Op> {
    let key_id = cx
        .fixture
        .keys
        .get(algorithm)
        .with_context(|| format!("no {algorithm} key"))?
        .clone();
    let ed25519 = algorithm == "ed25519";
    let agents = Pool::agents(cx.fixture, cx.server, cx.connections)
        .await?
        .handle();
    let nonce = cx.nonce.clone();
    Ok(op(move |seq| {
        let (agents, key_id, nonce) = (agents.clone(), key_id.clone(), nonce.clone());
        async move {
            let bytes = payload(&nonce, seq);
            let payload = if ed25519 {
                pb::sign_request::Payload::Message(pb::SignMessage {
                    data: bytes,
                    scheme: pb::SigningScheme::Ed25519Pure as i32,
                })
            } else {
                pb::sign_request::Payload::Digest(bytes)
            };
            let answer = pick(&agents, seq)?
                .sign(pb::SignRequest {
                    key_id,
                    payload: Some(payload),
                    idempotency_key: format!("{nonce}-{seq}"),
                    ..Default::default()
                })
                .await?;
            match answer.outcome {
                Some(pb::sign_response::Outcome::Signed(_)) => Ok(None),
                other => bail!("not signed: {other:?}"),
            }
        }
    }))
}

/// The next status event of a step-up watch, skipping heartbeats.
async fn next_status(
    watch: &mut vaultguard_tests::StepUpWatch,
    within: Duration,
) -> Result<pb::StepUpStatus> {
    use pb::watch_step_up_response::Event;
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let message = tokio::time::timeout_at(deadline, watch.message())
            .await
            .context("no watch message in time")??
            .context("the watch ended")?;
        if let Some(Event::Status(status)) = message.event {
            return Ok(status);
        }
    }
}

/// As `tests/benches/step_up_latency.rs`: the agent (on `watch_on`)
/// requests a step-up and watches it; once the watch shows PENDING, the
/// approver (on the first server) approves; the sample is approve sent →
/// APPROVED (with its token) received on the watch.
async fn step_up(cx: &Scene<'_>, watch_on: &ServerProcess) -> Result<Op> {
    let agents = Pool::agents(cx.fixture, watch_on, cx.connections)
        .await?
        .handle();
    let approvers = Pool::humans(&cx.fixture.approver, cx.server, cx.connections)
        .await?
        .handle();
    let request = pb::RequestDelegationRequest {
        receiving_tenant_id: cx.fixture.receiver("rs256")?.id.clone(),
        action: STEP_UP_ACTION.to_owned(),
        requested_ttl_seconds: 300,
        binding_message: "bench payment".to_owned(),
        ..Default::default()
    };
    Ok(op(move |seq| {
        let (agents, approvers, request) = (agents.clone(), approvers.clone(), request.clone());
        async move {
            let (agent, approver) = (pick(&agents, seq)?, pick(&approvers, seq)?);
            let DelegationOutcome::StepUp { challenge, .. } =
                agent.request_delegation(request).await?
            else {
                bail!("not decided STEP_UP");
            };
            let delegation = challenge
                .delegation
                .context("challenge without delegation")?;
            let shown = get_step_up(approver, &delegation.step_up_id).await?;
            // Heartbeats every 60 s: only the approval can wake the watch.
            let mut watch = watch_step_up(agent, &challenge.auth_req_id, 60).await?;
            let first = next_status(&mut watch, Duration::from_secs(10)).await?;
            ensure!(first.state() == pb::StepUpState::Pending, "first message");
            let started = Instant::now();
            approve_step_up(approver, &delegation.step_up_id, &shown.request_hash).await?;
            let event = next_status(&mut watch, Duration::from_secs(10)).await?;
            let latency = started.elapsed();
            ensure!(
                event.state() == pb::StepUpState::Approved && !event.access_token.is_empty(),
                "not APPROVED with a token: {:?}",
                event.state()
            );
            Ok(Some(latency))
        }
    }))
}
