//! Fan-out of committed changes to the watchers of this process, from every
//! replica: step-up changes (for step-up and queue watches) and newly sealed
//! audit events (for audit tails).
//!
//! Each change is first written to the database (`step_up_changes`,
//! `audit_chain`) in the transaction that makes it. After the commit the
//! writer publishes it to its own process's watchers ([`Hub::committed`]).
//! On PostgreSQL the same transaction also runs `pg_notify`, delivered at
//! commit to every replica's listener ([`run_listener`]), which publishes it
//! to that replica's watchers unless the change came from that very process
//! (the payload names its origin): a watcher on the writing replica is woken
//! without waiting for the notification's round trip through the database. Watchers are level-triggered: a notification only says "look
//! again", so a lagging watcher that misses some simply re-reads the state,
//! and nobody — writer or other watcher — ever waits for a slow one.

use std::any::Any;
use std::sync::Arc;

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

/// What a writer hands its own process's watchers with a change. The hub
/// carries it without looking inside: the writer puts its value in, and the
/// watchers that know its type take it back out (`Arc::downcast`).
pub type Payload = Arc<dyn Any + Send + Sync>;

/// One committed change: which tenant, and which step-up (or [`AUDIT`]).
#[derive(Debug, Clone)]
pub struct Change {
    pub tenant_id: String,
    pub step_up_id: String,
    /// What the writer's transaction left, for the watchers of this process
    /// only (never sent to other replicas): an approval's decided step-up
    /// and its token, which a watcher takes instead of re-reading the
    /// database (`crate::domain::step_ups::Decided`).
    pub payload: Option<Payload>,
}

/// Payloads are equal when they are the same value (the hub cannot look
/// inside them).
impl PartialEq for Change {
    fn eq(&self, other: &Self) -> bool {
        let same_payload = match (&self.payload, &other.payload) {
            (None, None) => true,
            (Some(one), Some(other)) => Arc::ptr_eq(one, other),
            _ => false,
        };
        self.tenant_id == other.tenant_id && self.step_up_id == other.step_up_id && same_payload
    }
}

impl Change {
    /// A change to step-up `step_up_id` of `tenant_id`.
    pub fn step_up(tenant_id: &str, step_up_id: &str) -> Self {
        Self {
            tenant_id: tenant_id.to_owned(),
            step_up_id: step_up_id.to_owned(),
            payload: None,
        }
    }

    /// Newly sealed audit events of `tenant_id`.
    pub fn audit(tenant_id: &str) -> Self {
        Self::step_up(tenant_id, AUDIT)
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
    /// Names this process in its notifications, so its listener can skip
    /// what the process published itself.
    origin: String,
}

impl Default for Hub {
    fn default() -> Self {
        Self::new()
    }
}

impl Hub {
    pub fn new() -> Self {
        let (tx, _) = broadcast::channel(BUFFER);
        Self {
            tx,
            origin: uuid::Uuid::now_v7().simple().to_string(),
        }
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
                self.notification(change),
            ))
            .await?;
        }
        Ok(())
    }

    /// The arguments of the `pg_notify(channel, payload)` announcing
    /// `change`, for a writer that runs it as part of a larger statement.
    pub fn notification(&self, change: &Change) -> [sea_orm::Value; 2] {
        [
            CHANNEL.into(),
            format!("{}|{}|{}", self.origin, change.tenant_id, change.step_up_id).into(),
        ]
    }

    /// After the writer's commit: tells this process's watchers (the other
    /// replicas hear the notification).
    pub fn committed(&self, changes: Vec<Change>) {
        for change in changes {
            self.publish(change);
        }
    }

    /// The change a notification payload (`origin|tenant|step-up`) carries,
    /// unless this process published it itself already.
    fn heard(&self, payload: &str) -> Option<Change> {
        let (origin, rest) = payload.split_once('|')?;
        let (tenant_id, step_up_id) = rest.split_once('|')?;
        (origin != self.origin).then(|| Change::step_up(tenant_id, step_up_id))
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
    // A connection of its own, outside the request pool: sqlx's listener
    // holds the connection it subscribes on for as long as it listens, so
    // taken from the pool it would leave `database_max_connections - 1` to
    // every request (and with two, a transaction that reads beside itself
    // would wait for the acquire timeout). Same server and session options
    // as the pool's connections.
    let shared = db.get_postgres_connection_pool();
    let pool = sea_orm::sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .min_connections(0)
        .acquire_timeout(shared.options().get_acquire_timeout())
        .connect_lazy_with(shared.connect_options().as_ref().clone());
    loop {
        // The pool's host of the moment: after a failover the request pool
        // points at the new primary, and so does the next subscription.
        pool.set_connect_options(shared.connect_options().as_ref().clone());
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
        hub.publish(Change::step_up("", RESYNC));
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
                        if let Some(change) = hub.heard(notification.payload()) {
                            hub.publish(change);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_skips_its_own_notifications_only() {
        let (writer, other) = (Hub::new(), Hub::new());
        assert_ne!(writer.origin, other.origin);
        let payload = format!("{}|tnt_1|stp_1", writer.origin);
        assert_eq!(writer.heard(&payload), None);
        assert_eq!(
            other.heard(&payload),
            Some(Change::step_up("tnt_1", "stp_1"))
        );
        assert_eq!(other.heard("tnt_1|stp_1"), None);
    }
}
