//! The state every request handler shares.

use std::sync::Arc;

use sea_orm::DatabaseConnection;
use tokio::sync::Notify;

use crate::audit::{self, NewEvent};
use crate::clock::Clock;
use crate::config::Config;
use crate::crypto::MasterKey;
use crate::error::Result;
use crate::issuer::IssuerKeys;
use crate::oidc::OidcVerifier;

/// Shared, cheaply cloned handles: database, clock, keys, verifiers.
#[derive(Debug, Clone)]
pub struct AppState {
    pub db: DatabaseConnection,
    /// Follows the database's writable host (PostgreSQL with standbys);
    /// the health probe drives it.
    pub failover: Arc<crate::store::failover::Failover>,
    pub clock: Arc<dyn Clock>,
    pub master: Arc<MasterKey>,
    pub keys: Arc<IssuerKeys>,
    pub oidc: Arc<OidcVerifier>,
    pub config: Arc<Config>,
    /// Wakes the audit sealer after a commit that appended events.
    pub audit_wake: Arc<Notify>,
    /// Step-up changes for this process's watchers.
    pub hub: Arc<crate::hub::Hub>,
    /// Flips to true when the process starts shutting down; long-lived
    /// streams end themselves (UNAVAILABLE) so the drain can finish.
    pub stopping: Arc<tokio::sync::watch::Sender<bool>>,
    /// The outbound address policy every request to a third party obeys,
    /// and the clients built on it.
    pub outbound: Arc<crate::outbound::Outbound>,
    /// The OAuth client of connected accounts and its single-flight locks.
    pub oauth: Arc<crate::oauth_client::OAuthClient>,
    /// Parsed policy rules by tenant, side and version.
    pub policy_cache: Arc<crate::domain::policy_cache::PolicyCache>,
    /// Each tenant's parsed budgets, by policy version.
    pub budget_cache: Arc<crate::domain::policy_cache::BudgetCache>,
    /// The group-commit writer of stand-alone audit events.
    pub recorder: audit::Recorder,
    /// Tenant and agent rows, kept current on every replica.
    pub directory: Arc<crate::directory::Directory>,
    /// Rate limits and open-stream caps of this process.
    pub limits: Arc<crate::limits::Limits>,
    /// Which repeated reads were audited lately (a verifier's successful
    /// verification of a delegation, an agent handed the same provider
    /// token again).
    pub audited_recently: Arc<audit::Debounce>,
    /// Refusals an outsider can cause in a tenant's log, recorded a bounded
    /// number of times per window and key ([`audit::RefusalDebounce`]).
    pub refusals: Arc<audit::RefusalDebounce>,
}

impl AppState {
    /// The handles authentication reads, borrowed from here.
    pub fn authenticator(&self) -> crate::auth::Authenticator<'_> {
        crate::auth::Authenticator {
            db: &self.db,
            clock: self.clock.as_ref(),
            keys: &self.keys,
            oidc: &self.oidc,
            directory: &self.directory,
        }
    }

    /// Appends `events` in a transaction of their own (for events that
    /// record a refusal or a read, with no state change to share a
    /// transaction with) and wakes the sealer.
    /// Concurrent callers share one commit ([`audit::Recorder`]).
    pub async fn record(&self, events: Vec<NewEvent>) -> Result<()> {
        self.recorder.record(events).await
    }

    /// Appends the events `events()` builds, recording the caller of `ctx`
    /// reading `what`, unless that caller's read of `what` was recorded
    /// within `repeat_audit_window_seconds` ([`audit::Debounce`]); `always`
    /// records regardless (a new token handed out).
    pub async fn record_repeated(
        &self,
        ctx: &crate::auth::CallContext,
        what: &str,
        always: bool,
        events: impl FnOnce() -> Vec<NewEvent>,
    ) -> Result<()> {
        let key = format!("{}|{}|{what}", ctx.principal.issuer, ctx.principal.subject);
        let now = self.clock.now_millis();
        if !always && !self.audited_recently.due(&key, now) {
            return Ok(());
        }
        self.record(events()).await?;
        self.audited_recently.recorded(key, now);
        Ok(())
    }

    /// Appends the refusal `events` of `key` (who was refused, and where)
    /// unless the key's budget of recorded refusals for the current window
    /// is spent ([`audit::RefusalDebounce`]); then the refusal is only
    /// counted, and the key's next recorded event carries the count
    /// (`suppressed` in its details). Like [`Self::record`], a recorded
    /// refusal is answered only once its events are durable.
    pub async fn record_refusal(&self, key: String, events: Vec<NewEvent>) -> Result<()> {
        let now = self.clock.now_millis();
        let Some(admitted) = self.refusals.admit(&key, now, events) else {
            metrics::counter!("vaultguard_audit_refusals_suppressed_total").increment(1);
            return Ok(());
        };
        if let Err(err) = self.record(admitted.events).await {
            self.refusals.give_back(&key, admitted.suppressed);
            return Err(err);
        }
        Ok(())
    }

    /// After a commit that changed rows the directory holds (and announced
    /// them with [`crate::directory::announce`]): this replica reads its own
    /// write at once.
    pub fn directory_changed(&self, entries: &[crate::directory::Entry]) {
        for entry in entries {
            self.directory.forget(entry);
        }
    }

    /// Tells the sealer that new audit events were committed.
    pub fn audit_committed(&self) {
        self.audit_wake.notify_one();
    }
}
