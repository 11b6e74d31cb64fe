//! The `vault.slow_provider` scenario (issue 23, item 4): does a tenant
//! whose OAuth provider answers slowly slow down another tenant?
//!
//! A server of its own (the default pool of 16 PostgreSQL connections),
//! three fresh tenants: the slow tenant, whose admin registers a local fake
//! provider answering every token request after `--provider-delay-ms` with
//! access tokens that live 0 s (so every exchange refreshes) and connects
//! `--slow-exchanges` accounts; a victim tenant; and a receiver whose
//! inbound rule allows `bench.*`. The victim's agent asks for ALLOW
//! delegations at a fixed arrival rate (`--victim-rate`) twice: alone, then
//! while the slow tenant's agent keeps `--slow-exchanges` exchanges in
//! flight (closed loop, one connection each). Until issue 23 a refresh held
//! a pooled connection across the provider's call, and 16 of them emptied
//! the pool for everyone; the victim's p99 should now be unaffected.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use vaultguard_client::pb;
use vaultguard_tests::oauth_provider::{FakeProvider, ProviderOptions};

use crate::fairness::{agent_clients, table, victim_of};
use crate::fixture::{create_rule, create_tenant};
use crate::load::{self, Mode, op};
use crate::server::{Backend, ServerProcess, ServerSpec};
use vaultguard_tests::Rpc;

/// What the scenario is run with.
pub struct Settings {
    /// How long the slow provider takes to answer a token request.
    pub provider_delay: Duration,
    /// Exchanges kept in flight at once, each on its own connection.
    pub slow_exchanges: usize,
    /// The victim's arrival rate, ops/s.
    pub victim_rate: f64,
    pub connections: usize,
    pub duration: f64,
    pub warmup: f64,
}

/// The provider's name in the slow tenant (action `exchange:slowmail`).
const PROVIDER_NAME: &str = "slowmail";

/// Registers `provider` for `tenant`, connects `count` accounts through it
/// (as a browser would, following the redirects back to the callback) and
/// lets the tenant's agents exchange; returns the connection ids.
async fn connect_accounts(
    tenant: &crate::fixture::Tenant,
    provider: &FakeProvider,
    count: usize,
) -> Result<Vec<String>> {
    let admin = &tenant.admin;
    let registered = admin
        .create_o_auth_provider(provider.registration(PROVIDER_NAME, &["mail.read"]))
        .await?
        .provider
        .context("no provider")?;
    let mut ids = Vec::with_capacity(count);
    for _ in 0..count {
        let started = admin
            .start_connection(pb::StartConnectionRequest {
                provider_id: registered.id.clone(),
                ..Default::default()
            })
            .await?;
        let page = reqwest::get(&started.authorize_url).await?;
        ensure!(
            page.status().is_success(),
            "the OAuth flow ended with {}",
            page.status()
        );
        ids.push(started.connection.context("no connection")?.id);
    }
    let action = format!("exchange:{PROVIDER_NAME}");
    create_rule(tenant, &action, pb::Effect::Allow, &tenant.id).await?;
    Ok(ids)
}

/// Runs the scenario on a server of its own.
pub async fn run(backend: Backend, spec: &ServerSpec, settings: &Settings) -> Result<()> {
    let server = ServerProcess::start(spec, "slow-provider").await?;
    eprintln!(
        "[{}] vault.slow_provider: provider delay {:?}, {} exchanges in flight, victim at {} ops/s",
        backend.name(),
        settings.provider_delay,
        settings.slow_exchanges,
        settings.victim_rate
    );
    let (operator, _, victim_op) = victim_of(&server, "slow", settings.connections).await?;

    // The slow tenant: connect with a fast provider, then slow it down.
    let slow = create_tenant(&server, &operator, "slow-tenant", pb::TokenAlgorithm::Eddsa).await?;
    let provider = FakeProvider::start(ProviderOptions {
        access_ttl_seconds: 0,
        ..ProviderOptions::default()
    })
    .await;
    let connections = Arc::new(connect_accounts(&slow, &provider, settings.slow_exchanges).await?);
    let clients = agent_clients(&server, &slow, "slow-bot", settings.connections).await?;
    provider.set_delay(settings.provider_delay);
    let exchange_op = op(move |seq| {
        let (clients, connections) = (clients.clone(), connections.clone());
        async move {
            let n = usize::try_from(seq)?;
            let client = clients.get(n % clients.len()).context("no client")?;
            let id = connections.get(n % connections.len()).context("no id")?;
            let answer = client.exchange(id, &[]).await?;
            ensure!(!answer.access_token.is_empty(), "no provider token");
            Ok(None)
        }
    });

    let victim_mode = Mode::Open {
        rate: settings.victim_rate,
    };
    let duration = Duration::from_secs_f64(settings.duration);
    let warmup = Duration::from_secs_f64(settings.warmup);
    let seq = Arc::new(AtomicU64::new(0));
    load::run(&victim_op, victim_mode, warmup, &seq).await?;
    let alone = load::run(&victim_op, victim_mode, duration, &seq).await?;

    let refreshes_before = provider.refreshes();
    let slow_run = {
        let (exchange_op, seq) = (exchange_op.clone(), Arc::new(AtomicU64::new(0)));
        let mode = Mode::Closed {
            concurrency: settings.slow_exchanges,
        };
        let slow_for = warmup + duration + settings.provider_delay;
        tokio::spawn(async move { load::run(&exchange_op, mode, slow_for, &seq).await })
    };
    // Every exchange is at the provider before the victim is measured.
    tokio::time::sleep(warmup.max(settings.provider_delay / 2)).await;
    let during = load::run(&victim_op, victim_mode, duration, &seq).await?;
    let slow_measured = slow_run.await??;
    let refreshes = provider.refreshes() - refreshes_before;

    println!();
    println!(
        "{} · vault.slow_provider · provider answers after {} ms · {} exchanges in flight \
         (closed loop, one connection each) · victim open loop {} ops/s · {} s measured after \
         {} s warm-up · pool 16",
        backend.name(),
        settings.provider_delay.as_millis(),
        settings.slow_exchanges,
        settings.victim_rate,
        settings.duration,
        settings.warmup
    );
    table(
        "operation",
        &[
            ("victim ALLOW, alone", &alone),
            ("victim ALLOW, during", &during),
            ("slow exchanges", &slow_measured),
        ],
    );
    for (name, m) in [
        ("alone", &alone),
        ("during", &during),
        ("slow", &slow_measured),
    ] {
        if let Some(error) = &m.first_error {
            println!("  {name}: first error: {error}");
        }
    }
    println!(
        "victim p99 during / alone: {:.2} / {:.2} ms = {:.2}x; the provider saw {refreshes} refreshes",
        during.millis(0.99),
        alone.millis(0.99),
        during.millis(0.99) / alone.millis(0.99).max(f64::EPSILON)
    );
    server.stop().await
}
