//! Fan-out of committed changes to the watchers of this process, from every
//! replica: step-up changes (for step-up and queue watches) and newly sealed
//! audit events (for audit tails).
//!
//! Each change is first written to the database (`step_up_changes`,
//! `audit_chain`) in the transaction that makes it. On PostgreSQL the same transaction runs `pg_notify`, delivered
//! at commit to every replica's listener ([`run_listener`]), which publishes
//! it here; on SQLite (one process) the writer publishes it itself after the
//! commit. Watchers are level-triggered: a notification only says "look
//! again", so a lagging watcher that misses some simply re-reads the state,
//! and nobody — writer or other watcher — ever waits for a slow one.

use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, Statement};
use tokio::sync::broadcast;

use crate::error::Result;

/// The PostgreSQL channel step-up changes are announced on.
const CHANNEL: &str = "vaultguard_step_ups";
/// Per-watcher buffer; a watcher further behind gets `Lagged` and re-reads.
const BUFFER: usize = 1024;
/// `step_up_id` of a change meaning "anything may have changed" (after the
/// listener reconnects).
pub const RESYNC: &str = "*";

/// `step_up_id` of an audit change (audit events were sealed in the
/// tenant's log).
pub const AUDIT: &str = "audit";

/// One committed change: which tenant, and which step-up (or [`AUDIT`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub tenant_id: String,
    pub step_up_id: String,
}

impl Change {
    /// Newly sealed audit events of `tenant_id`.
    pub fn audit(tenant_id: &str) -> Self {
        Self {
            tenant_id: tenant_id.to_owned(),
            step_up_id: AUDIT.to_owned(),
        }
    }

    /// Whether a watcher of `step_up_id` should look again.
    pub fn concerns_step_up(&self, step_up_id: &str) -> bool {
        self.step_up_id == step_up_id || self.step_up_id == RESYNC
    }

    /// Whether a watcher of `tenant_id`'s approval queue should look again.
    pub fn concerns_tenant(&self, tenant_id: &str) -> bool {
        (self.tenant_id == tenant_id && self.step_up_id != AUDIT) || self.step_up_id == RESYNC
    }

    /// Whether a tail of `tenant_id`'s audit log should look again.
    pub fn concerns_audit(&self, tenant_id: &str) -> bool {
        (self.tenant_id == tenant_id && self.step_up_id == AUDIT) || self.step_up_id == RESYNC
    }
}

/// The in-process side of the fan-out.
#[derive(Debug)]
pub struct Hub {
    tx: broadcast::Sender<Change>,
}

impl Default for Hub {
    fn default() -> Self {
        Self::new()
    }
}

impl Hub {
    pub fn new() -> Self {
        let (tx, _) = broadcast::channel(BUFFER);
        Self { tx }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.tx.subscribe()
    }

    fn publish(&self, change: Change) {
        // No receiver is fine: nobody is watching.
        let _ = self.tx.send(change);
    }

    /// Announces `change` inside the writer's transaction (PostgreSQL: a
    /// NOTIFY delivered at commit to every replica).
    pub async fn announce<C: ConnectionTrait>(&self, txn: &C, change: &Change) -> Result<()> {
        if txn.get_database_backend() == DbBackend::Postgres {
            txn.execute_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                "SELECT pg_notify($1, $2)",
                [
                    CHANNEL.into(),
                    format!("{}|{}", change.tenant_id, change.step_up_id).into(),
                ],
            ))
            .await?;
        }
        Ok(())
    }

    /// After the writer's commit: on SQLite, tell this process's watchers
    /// (on PostgreSQL the listener does, for every replica alike).
    pub fn committed(&self, db: &DatabaseConnection, changes: Vec<Change>) {
        if db.get_database_backend() != DbBackend::Postgres {
            for change in changes {
                self.publish(change);
            }
        }
    }
}

/// Relays NOTIFYs from PostgreSQL to this process's hub until `stop` flips;
/// reconnects after errors and then tells every watcher to re-read.
pub async fn run_listener(
    db: DatabaseConnection,
    hub: std::sync::Arc<Hub>,
    directory: std::sync::Arc<crate::directory::Directory>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    if db.get_database_backend() != DbBackend::Postgres {
        return;
    }
    let pool = db.get_postgres_connection_pool().clone();
    loop {
        let listener = async {
            let mut listener = sea_orm::sqlx::postgres::PgListener::connect_with(&pool).await?;
            listener
                .listen_all([CHANNEL, crate::directory::CHANNEL])
                .await?;
            Ok::<_, sea_orm::sqlx::Error>(listener)
        };
        let mut listener = tokio::select! {
            _ = stop.changed() => return,
            result = listener => match result {
                Ok(listener) => listener,
                Err(err) => {
                    tracing::warn!(error = %err, "step-up listener cannot connect; retrying");
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    continue;
                }
            },
        };
        // Subscribed: from here on every change is heard, so what was held
        // before (possibly missing changes) goes, and the cache is trusted.
        directory.set_live(true);
        hub.publish(Change {
            tenant_id: String::new(),
            step_up_id: RESYNC.to_owned(),
        });
        loop {
            tokio::select! {
                _ = stop.changed() => return,
                // `try_recv`, not `recv`: `recv` reconnects silently and
                // loses what was sent meanwhile; a lost connection must
                // instead distrust the cache and make watchers re-read.
                received = listener.try_recv() => match received {
                    Ok(Some(notification)) if notification.channel() == crate::directory::CHANNEL => {
                        if let Some(entry) = crate::directory::Entry::parse(notification.payload()) {
                            directory.forget(&entry);
                        }
                    }
                    Ok(Some(notification)) => {
                        if let Some((tenant_id, step_up_id)) = notification.payload().split_once('|') {
                            hub.publish(Change {
                                tenant_id: tenant_id.to_owned(),
                                step_up_id: step_up_id.to_owned(),
                            });
                        }
                    }
                    Ok(None) => {
                        directory.set_live(false);
                        tracing::warn!("change listener lost its connection; resubscribing");
                        break;
                    }
                    Err(err) => {
                        directory.set_live(false);
                        tracing::warn!(error = %err, "change listener failed; resubscribing");
                        break;
                    }
                },
            }
        }
    }
}
