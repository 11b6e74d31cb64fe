//! The `freeze.cross_replica` scenario (PostgreSQL only): how long after
//! FreezeAgent answers on one replica does a second replica refuse the
//! frozen agent?
//!
//! Two `vaultguard serve` processes on one fresh database. Each round the
//! agent holds `--freeze-delegations` ACTIVE delegations (requested through
//! both replicas), replica B has verified one of their tokens (its
//! directory now holds the row) and signed for the agent once (it holds the
//! agent's row and the key); then the requesting tenant's admin freezes the
//! agent through replica A, and from the moment that call answers the load
//! tool polls replica B with VerifyDelegationToken and Sign, both at once,
//! until Verify answers inactive and Sign is refused with
//! ERROR_REASON_AGENT_FROZEN. That time (which includes the last poll's
//! round trip) is the figure; the freeze's own duration (revoking the
//! delegations, the audit events, waiting for older writers) is printed
//! beside it. UnfreezeAgent ends the round.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use futures::{StreamExt, TryStreamExt};
use vaultguard_client::{ClientError, DelegationOutcome, VaultGuardClient, pb};
use vaultguard_tests::Rpc;

use crate::fixture::Fixture;
use crate::server::{Backend, ServerProcess, ServerSpec};

/// What the scenario is run with.
pub struct Settings {
    /// Freezes measured.
    pub rounds: usize,
    /// ACTIVE delegations the agent holds at each freeze.
    pub delegations: usize,
    /// Delegation requests in flight while setting a round up.
    pub concurrency: usize,
}

/// The `q` quantile of sorted `samples`, in milliseconds.
fn millis(samples: &[Duration], q: f64) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    let last = samples.len() - 1;
    let index = ((last as f64) * q).round() as usize;
    samples[index.min(last)].as_secs_f64() * 1000.0
}

async fn allow(agent: &VaultGuardClient, request: pb::RequestDelegationRequest) -> Result<String> {
    match agent.request_delegation(request).await? {
        DelegationOutcome::Allowed { grant, .. } => Ok(grant.token),
        DelegationOutcome::StepUp { .. } => bail!("decided STEP_UP, not ALLOW"),
    }
}

fn sign_request(key_id: &str, round: usize, attempt: u64) -> pb::SignRequest {
    pb::SignRequest {
        key_id: key_id.to_owned(),
        payload: Some(pb::sign_request::Payload::Message(pb::SignMessage {
            data: format!("freeze bench {round} {attempt}").into_bytes(),
            scheme: pb::SigningScheme::Ed25519Pure as i32,
        })),
        ..Default::default()
    }
}

fn refused_as_frozen(outcome: &Result<pb::SignResponse, ClientError>) -> bool {
    matches!(outcome, Err(err) if err.reason() == Some(pb::ErrorReason::AgentFrozen))
}

pub async fn run(backend: Backend, spec: &ServerSpec, settings: &Settings) -> Result<()> {
    ensure!(
        backend == Backend::Postgres,
        "freeze.cross_replica needs two replicas: PostgreSQL only"
    );
    let primary = ServerProcess::start(spec, "freeze-a").await?;
    let replica = ServerProcess::start(spec, "freeze-b").await?;
    let fixture = Fixture::set_up(&primary).await?;
    let agents = [
        fixture.agent_on(&primary).await?,
        fixture.agent_on(&replica).await?,
    ];
    let agent_on_b = fixture.agent_on(&replica).await?;
    let receiver = fixture.receiver("eddsa")?;
    let verifier_on_b = replica
        .anonymous()
        .await?
        .with_bearer(receiver.admin.bearer().await?);
    let admin_on_a = &fixture.requester.admin;
    let key_id = fixture.keys.get("ed25519").context("ed25519 key")?.clone();
    let request = fixture.allow_request("eddsa")?;
    eprintln!(
        "[{}] freeze.cross_replica: {} rounds, {} ACTIVE delegations each",
        backend.name(),
        settings.rounds,
        settings.delegations
    );

    let (mut propagation, mut freezing, mut polls) = (Vec::new(), Vec::new(), 0_u64);
    for round in 0..settings.rounds {
        let agents = &agents;
        let tokens: Vec<String> = futures::stream::iter(0..settings.delegations)
            .map(|i| {
                let request = request.clone();
                async move { allow(&agents[i % agents.len()], request).await }
            })
            .buffer_unordered(settings.concurrency.max(1))
            .try_collect()
            .await?;
        let token = tokens.last().context("no delegation")?.clone();
        ensure!(
            verifier_on_b.verify(token.clone(), "").await?.active,
            "replica B does not see the token as active"
        );
        agent_on_b
            .sign(sign_request(&key_id, round, 0))
            .await
            .context("replica B signs before the freeze")?;

        let started = Instant::now();
        let frozen = admin_on_a
            .freeze_agent(pb::FreezeAgentRequest {
                agent_id: fixture.agent_id.clone(),
                reason: format!("bench round {round}"),
            })
            .await?;
        let answered = Instant::now();
        ensure!(
            usize::try_from(frozen.delegations_revoked)? >= settings.delegations,
            "the freeze revoked {} of {} delegations",
            frozen.delegations_revoked,
            settings.delegations
        );
        freezing.push(answered - started);
        let mut attempt = 0_u64;
        loop {
            attempt += 1;
            let (verified, signed) = tokio::join!(
                verifier_on_b.verify(token.clone(), ""),
                agent_on_b.sign(sign_request(&key_id, round, attempt)),
            );
            if !verified?.active && refused_as_frozen(&signed) {
                propagation.push(answered.elapsed());
                break;
            }
            ensure!(
                answered.elapsed() < Duration::from_secs(10),
                "replica B still serves the frozen agent 10 s after the freeze ({signed:?})"
            );
        }
        polls += attempt;
        admin_on_a
            .unfreeze_agent(pb::UnfreezeAgentRequest {
                agent_id: fixture.agent_id.clone(),
                reason: format!("bench round {round} done"),
            })
            .await?;
        // B learns of the unfreeze by the same notification; wait for it
        // before the next round asks through B.
        let unfrozen = Instant::now();
        while refused_as_frozen(&agent_on_b.sign(sign_request(&key_id, round, 0)).await) {
            ensure!(
                unfrozen.elapsed() < Duration::from_secs(10),
                "replica B still refuses 10 s after the unfreeze"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    propagation.sort();
    freezing.sort();
    println!();
    println!(
        "{} · freeze.cross_replica · {} rounds · {} ACTIVE delegations per freeze · \
         FreezeAgent through replica A, Verify + Sign polled on replica B",
        backend.name(),
        propagation.len(),
        settings.delegations
    );
    println!("{:<44} {:>8} {:>8} {:>8}", "", "p50 ms", "p99 ms", "max ms");
    println!(
        "{:<44} {:>8.2} {:>8.2} {:>8.2}",
        "answer → B refuses Verify and Sign",
        millis(&propagation, 0.50),
        millis(&propagation, 0.99),
        millis(&propagation, 1.0)
    );
    println!(
        "{:<44} {:>8.2} {:>8.2} {:>8.2}",
        "FreezeAgent call (revokes, audits, waits)",
        millis(&freezing, 0.50),
        millis(&freezing, 0.99),
        millis(&freezing, 1.0)
    );
    println!(
        "  polls of B per round: {:.2} on average (1 = refused at the first poll)",
        polls as f64 / propagation.len().max(1) as f64
    );
    replica.stop().await?;
    primary.stop().await?;
    Ok(())
}
