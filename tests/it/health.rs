//! Database-driven health: `grpc.health.v1` and `/healthz` follow the
//! database. On PostgreSQL the server connects through a TCP proxy the test
//! cuts and restores ([`vaultguard_tests::Proxy`]); on SQLite (no outage to
//! simulate) every service simply reports SERVING.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use vaultguard_client::{VaultGuardClient, pb};
use vaultguard_server::health::SERVICE_NAMES;
use vaultguard_tests::Rpc;
use vaultguard_tests::require_backend;
use vaultguard_tests::{Backend, Proxy, TestOptions, TestServer};

const POLL: Duration = Duration::from_millis(100);
const DEADLINE: Duration = Duration::from_secs(10);

async fn health_client(grpc_addr: SocketAddr) -> HealthClient<Channel> {
    let channel = Endpoint::from_shared(format!("http://{grpc_addr}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    HealthClient::new(channel)
}

async fn status_of(health: &mut HealthClient<Channel>, service: &str) -> ServingStatus {
    let response = health
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .unwrap_or_else(|status| panic!("health check of {service:?} failed: {status:?}"))
        .into_inner();
    ServingStatus::try_from(response.status).expect("known serving status")
}

/// Polls until every one of `services` reports `wanted`; panics after
/// [`DEADLINE`] naming the last statuses seen.
async fn wait_for_status(
    health: &mut HealthClient<Channel>,
    services: &[&str],
    wanted: ServingStatus,
) -> Duration {
    let started = Instant::now();
    loop {
        let mut seen = Vec::new();
        for service in services {
            seen.push((*service, status_of(health, service).await));
        }
        if seen.iter().all(|(_, status)| *status == wanted) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < DEADLINE,
            "health did not turn {wanted:?} within {DEADLINE:?}: {seen:?}"
        );
        tokio::time::sleep(POLL).await;
    }
}

async fn healthz(http_addr: SocketAddr) -> reqwest::StatusCode {
    reqwest::get(format!("http://{http_addr}/healthz"))
        .await
        .expect("GET /healthz")
        .status()
}

async fn create_tenant(
    client: &VaultGuardClient,
    slug: &str,
) -> Result<pb::Tenant, vaultguard_client::ClientError> {
    Ok(client
        .create_tenant(pb::CreateTenantRequest {
            slug: slug.to_owned(),
            display_name: slug.to_owned(),
            settings: None,
        })
        .await?
        .tenant
        .expect("tenant"))
}

/// On SQLite the database is a file the server holds open: every service
/// serves, and `/healthz` answers OK.
#[tokio::test]
async fn sqlite_only_health_serves_every_service() {
    require_backend(Backend::Sqlite);
    let server = TestServer::start().await;
    let mut health = health_client(server.grpc_addr).await;
    let mut services = vec![""];
    services.extend(SERVICE_NAMES);
    for service in services {
        assert_eq!(
            status_of(&mut health, service).await,
            ServingStatus::Serving,
            "service {service:?}"
        );
    }
    assert_eq!(healthz(server.http_addr).await, reqwest::StatusCode::OK);
    server.stop().await;
}

/// On PostgreSQL health follows the database through an outage and back.
#[tokio::test]
async fn postgres_only_health_follows_the_database() {
    require_backend(Backend::Postgres);
    postgres_outage_is_detected().await;
}

async fn postgres_outage_is_detected() {
    let proxy = Proxy::to_postgres().await;
    let server = TestServer::start_with(TestOptions {
        database_proxy: Some(proxy.addr),
        ..TestOptions::default()
    })
    .await;
    let operator = server.operator().await;
    let mut health = health_client(server.grpc_addr).await;
    let services = ["", "vaultguard.v1.TenantService"];

    // Healthy to begin with.
    wait_for_status(&mut health, &services, ServingStatus::Serving).await;
    assert_eq!(healthz(server.http_addr).await, reqwest::StatusCode::OK);
    create_tenant(&operator, "before")
        .await
        .expect("create tenant while healthy");

    // Outage.
    proxy.cut();
    wait_for_status(&mut health, &services, ServingStatus::NotServing).await;
    let mut all = vec![""];
    all.extend(SERVICE_NAMES);
    wait_for_status(&mut health, &all, ServingStatus::NotServing).await;
    assert_eq!(
        healthz(server.http_addr).await,
        reqwest::StatusCode::SERVICE_UNAVAILABLE
    );
    for attempt in 0..3 {
        let started = Instant::now();
        let result = tokio::time::timeout(
            Duration::from_secs(5),
            create_tenant(&operator, &format!("during-{attempt}")),
        )
        .await
        .unwrap_or_else(|_| panic!("CreateTenant attempt {attempt} hung during the outage"));
        let err = result.expect_err("CreateTenant succeeded while the database was unreachable");
        assert_eq!(
            err.code(),
            Some(tonic::Code::Unavailable),
            "CreateTenant attempt {attempt} during the outage: {err:?} after {:?}",
            started.elapsed()
        );
    }

    // Recovery.
    proxy.restore();
    wait_for_status(&mut health, &all, ServingStatus::Serving).await;
    assert_eq!(healthz(server.http_addr).await, reqwest::StatusCode::OK);
    let tenant = create_tenant(&operator, "after")
        .await
        .expect("create tenant after recovery");
    assert_eq!(tenant.slug, "after");
    for n in 0..5 {
        create_tenant(&operator, &format!("after-{n}"))
            .await
            .expect("every call succeeds after recovery");
    }
    assert_eq!(
        vaultguard_tests::count_rows(&server.state.db, "tenants").await,
        7,
        "before, after, after-0..4"
    );

    server.stop().await;
    proxy.stop();
}

/// With a libpq multi-host URL the server starts on the first host that
/// takes writes (the first one listed is down), and when that one goes
/// away it moves to the other by itself: health NOT_SERVING while no host
/// answers, then SERVING again and writes succeed, without a restart, and
/// `/metrics` counts the move. (The real thing, a promoted standby, is
/// `failover.rs`; here both hosts are proxies to one database.)
#[tokio::test]
async fn postgres_only_a_multi_host_url_follows_the_host_that_takes_writes() {
    require_backend(Backend::Postgres);
    let (first, second) = (Proxy::to_postgres().await, Proxy::to_postgres().await);
    first.cut();
    let server = TestServer::start_with(TestOptions {
        database_hosts: vec![first.addr, second.addr],
        ..TestOptions::default()
    })
    .await;
    let operator = server.operator().await;
    let mut health = health_client(server.grpc_addr).await;
    wait_for_status(&mut health, &[""], ServingStatus::Serving).await;
    create_tenant(&operator, "on-the-second")
        .await
        .expect("a write through the second host");

    // The second host goes; the first is back.
    first.restore();
    second.cut();
    let moved = wait_for_status(&mut health, &[""], ServingStatus::Serving).await;
    let started = Instant::now();
    loop {
        match create_tenant(&operator, "on-the-first").await {
            Ok(_) => break,
            Err(err) => {
                assert_eq!(err.code(), Some(tonic::Code::Unavailable), "{err:?}");
                assert!(
                    started.elapsed() < DEADLINE,
                    "no write through the first host within {DEADLINE:?}"
                );
                tokio::time::sleep(POLL).await;
            }
        }
    }
    eprintln!(
        "moved to the first host: SERVING after {moved:?}, a write after {:?} more",
        started.elapsed()
    );
    let metrics = reqwest::get(format!("http://{}/metrics", server.http_addr))
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics text");
    assert!(
        metrics.contains("vaultguard_database_failovers_total 1"),
        "the move is counted: {}",
        metrics
            .lines()
            .filter(|l| l.contains("database"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    // No host at all: NOT_SERVING, and calls fail with UNAVAILABLE.
    first.cut();
    wait_for_status(&mut health, &[""], ServingStatus::NotServing).await;
    let err = create_tenant(&operator, "nowhere")
        .await
        .expect_err("no host takes writes");
    assert_eq!(err.code(), Some(tonic::Code::Unavailable), "{err:?}");
    first.restore();
    wait_for_status(&mut health, &[""], ServingStatus::Serving).await;
    server.stop().await;
}

/// A replica (re)started while no host takes writes (during a failover)
/// waits for one (`database_startup_wait_ms`) instead of exiting, and
/// serves once a host answers.
#[tokio::test]
async fn postgres_only_a_server_started_while_no_host_takes_writes_waits_for_one() {
    require_backend(Backend::Postgres);
    let (first, second) = (Proxy::to_postgres().await, Proxy::to_postgres().await);
    first.cut();
    second.cut();
    let hosts = vec![first.addr, second.addr];
    let restore = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        second.restore();
        second
    });
    let started = Instant::now();
    let server = TestServer::start_with(TestOptions {
        database_hosts: hosts,
        ..TestOptions::default()
    })
    .await;
    let waited = started.elapsed();
    let _second = restore.await.expect("restore");
    assert!(
        waited >= Duration::from_millis(1_500),
        "it served before any host answered ({waited:?})"
    );
    create_tenant(&server.operator().await, "after-the-wait")
        .await
        .expect("a write once the host answers");
    server.stop().await;
}
