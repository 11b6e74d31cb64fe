//! Database-driven health: every service is SERVING while the database
//! takes writes and NOT_SERVING while it does not, per `grpc.health.v1`.
//! On PostgreSQL with standbys the probe is also what follows a failover
//! ([`Failover::check`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::store::failover::{Failover, Probe};

/// How often the probe looks again while no writable host is known, so
/// service resumes soon after a standby is promoted.
const RETRY_WHILE_DOWN: Duration = Duration::from_millis(100);

/// The fully qualified names of every VaultGuard service.
pub const SERVICE_NAMES: [&str; 9] = [
    "vaultguard.v1.TenantService",
    "vaultguard.v1.AgentService",
    "vaultguard.v1.AuthService",
    "vaultguard.v1.IssuerKeyService",
    "vaultguard.v1.PolicyService",
    "vaultguard.v1.DelegationService",
    "vaultguard.v1.StepUpService",
    "vaultguard.v1.VaultService",
    "vaultguard.v1.AuditService",
];

/// Sets every service, then the overall status `""` last: a client that
/// saw `""` change finds each service changed already.
pub async fn set_all(reporter: &HealthReporter, status: ServingStatus) {
    for name in SERVICE_NAMES {
        reporter.set_service_status(name, status).await;
    }
    reporter.set_service_status("", status).await;
}

/// Probes the database every `interval` (every [`RETRY_WHILE_DOWN`] while
/// it is down) until `shutdown` flips, updating the reporter and `healthy`
/// on every change. On shutdown every service turns NOT_SERVING, so load
/// balancers stop routing before the listener closes.
pub async fn run_probe(
    failover: Arc<Failover>,
    reporter: HealthReporter,
    healthy: Arc<AtomicBool>,
    interval: Duration,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut last: Option<bool> = None;
    loop {
        let ok = failover.check().await != Probe::NoWritableHost;
        if last != Some(ok) {
            if ok {
                tracing::info!("database reachable; services SERVING");
            } else {
                tracing::error!("database unreachable; services NOT_SERVING");
            }
            healthy.store(ok, Ordering::SeqCst);
            set_all(
                &reporter,
                if ok {
                    ServingStatus::Serving
                } else {
                    ServingStatus::NotServing
                },
            )
            .await;
            last = Some(ok);
        }
        let wait = if ok {
            interval
        } else {
            interval.min(RETRY_WHILE_DOWN)
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => {
                set_all(&reporter, ServingStatus::NotServing).await;
                return;
            }
        }
    }
}
