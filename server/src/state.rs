//! The state every request handler shares.

use std::sync::Arc;

use sea_orm::DatabaseConnection;
use tokio::sync::Notify;

use crate::clock::Clock;
use crate::config::Config;
use crate::crypto::MasterKey;
use crate::issuer::IssuerKeys;
use crate::oidc::OidcVerifier;

/// Shared, cheaply cloned handles: database, clock, keys, verifiers.
#[derive(Debug, Clone)]
pub struct AppState {
    pub db: DatabaseConnection,
    pub clock: Arc<dyn Clock>,
    pub master: Arc<MasterKey>,
    pub keys: Arc<IssuerKeys>,
    pub oidc: Arc<OidcVerifier>,
    pub config: Arc<Config>,
    /// Wakes the audit sealer after a commit that appended events.
    pub audit_wake: Arc<Notify>,
}

impl AppState {
    /// Tells the sealer that new audit events were committed.
    pub fn audit_committed(&self) {
        self.audit_wake.notify_one();
    }
}
