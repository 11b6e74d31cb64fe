//! Tenant, agent, delegation and signing-key rows as the hot paths read
//! them: from memory, kept current on every replica.
//!
//! Every call checks the caller's standing (tenant active, agent enabled),
//! and every judgement needs both tenants' policy versions; reading those
//! rows from the database on each call was most of a delegation's round
//! trips. The [`Directory`] holds the rows it has read, and every write to a
//! tenant or agent row (status, settings, policy version) does two things:
//! it announces the id inside its transaction ([`announce`]: a `pg_notify`
//! delivered at commit to every replica's listener, which calls
//! [`Directory::forget`]), and after its commit it forgets the id locally, so
//! the writing replica reads its own write at once and the others within the
//! notification latency (about a millisecond here).
//!
//! Entries are trusted only while they can be kept current: on PostgreSQL
//! only while the listener is subscribed ([`Directory::set_live`]); after a
//! lost connection everything is forgotten and reads go to the database
//! until the listener is back. A read that raced an invalidation is not
//! cached (the epoch check), so an entry is never older than the last
//! invalidation this replica received. Absent rows are never cached, so
//! made-up ids cannot fill memory.
//!
//! Delegations are held for VerifyDelegationToken, which must see a
//! revocation on every replica. Only rows past PENDING are held: an ACTIVE
//! row changes only by ending it (revoke, relinquish: announced like the
//! others) or by expiring, which every reader derives from `expires_at`;
//! every other state is terminal and never changes again. PENDING rows
//! change by approval or denial, so they are always read afresh.
//!
//! Signing-key rows are held for Sign; a key changes only by being
//! disabled (once and for good), which is announced. Their parsed private
//! keys are held beside them (parsing derives the public key, for secp256k1
//! a scalar multiplication as costly as the signature) and dropped with the
//! row.
//!
//! External organisation bindings (an OIDC issuer's organisation → a
//! tenant) are held for the standing of OIDC humans, which every call and
//! every step of an open stream checks; unbinding is announced. They are
//! keyed by a digest of the issuer and the organisation id, which may hold
//! any character.
//!
//! A freeze (the kill switch) ends every delegation of a requester at once;
//! it announces the requester once ([`Entry::AgentDelegations`],
//! [`Entry::TenantDelegations`]) and every replica drops each held
//! delegation of that agent or tenant in one pass, instead of one
//! notification per delegation.
//!
//! Connection and OAuth-provider rows are held for ExchangeToken. Only
//! CONNECTED connections are held; every write to a connection (callback,
//! refresh, narrowed refresh that rotates, NEEDS_REAUTH, disconnect) and to a
//! provider (update, delete) is announced. The cached access token is still
//! judged by its `access_token_expires_at` on every read, and a refresh always
//! re-reads the row under the refresh lock.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{PoisonError, RwLock};

use sea_orm::{
    ConnectionTrait, DatabaseConnection, DbBackend, EntityTrait, PrimaryKeyTrait, Statement,
};

use std::sync::Arc;

use crate::custody::SecretKey;
use crate::error::Result;
use crate::store::entities::{
    agent, connection, custody_key, delegation, external_org, oauth_provider, tenant,
};

/// The PostgreSQL channel directory changes are announced on.
pub const CHANNEL: &str = "vaultguard_directory";

/// At most this many tenant or agent rows are held; a full map is emptied.
const MAX_ENTRIES: usize = 100_000;
/// At most this many delegation rows (about 1 KiB each) are held.
const MAX_DELEGATIONS: usize = 50_000;

/// Which row changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Tenant(String),
    Agent(String),
    Delegation(String),
    SigningKey(String),
    Connection(String),
    Provider(String),
    /// An external organisation binding, by [`Entry::organization`]'s key.
    Organization(String),
    /// Every delegation the agent requested (a freeze ended them at once).
    AgentDelegations(String),
    /// Every delegation the tenant's agents requested (a freeze of its
    /// traffic ended them at once).
    TenantDelegations(String),
}

impl Entry {
    /// The entry of the binding of `issuer`'s organisation `organization_id`.
    pub fn organization(issuer: &str, organization_id: &str) -> Self {
        Self::Organization(organization_key(issuer, organization_id))
    }

    fn payload(&self) -> String {
        match self {
            Self::Tenant(id) => format!("tenant|{id}"),
            Self::Agent(id) => format!("agent|{id}"),
            Self::Delegation(id) => format!("delegation|{id}"),
            Self::SigningKey(id) => format!("key|{id}"),
            Self::Connection(id) => format!("connection|{id}"),
            Self::Provider(id) => format!("provider|{id}"),
            Self::Organization(key) => format!("org|{key}"),
            Self::AgentDelegations(id) => format!("agent_delegations|{id}"),
            Self::TenantDelegations(id) => format!("tenant_delegations|{id}"),
        }
    }

    /// Parses a notification payload.
    pub fn parse(payload: &str) -> Option<Self> {
        match payload.split_once('|')? {
            ("tenant", id) => Some(Self::Tenant(id.to_owned())),
            ("agent", id) => Some(Self::Agent(id.to_owned())),
            ("delegation", id) => Some(Self::Delegation(id.to_owned())),
            ("key", id) => Some(Self::SigningKey(id.to_owned())),
            ("connection", id) => Some(Self::Connection(id.to_owned())),
            ("provider", id) => Some(Self::Provider(id.to_owned())),
            ("org", key) => Some(Self::Organization(key.to_owned())),
            ("agent_delegations", id) => Some(Self::AgentDelegations(id.to_owned())),
            ("tenant_delegations", id) => Some(Self::TenantDelegations(id.to_owned())),
            _ => None,
        }
    }
}

/// The key of an organisation binding: a digest of the issuer and the
/// organisation id (both free text), as a fixed-size notification payload.
fn organization_key(issuer: &str, organization_id: &str) -> String {
    let both = format!("{}:{issuer}{organization_id}", issuer.len());
    crate::crypto::sha256_hex(both.as_bytes())
}

/// Announces a change of `entry` inside the writer's transaction (on
/// PostgreSQL a NOTIFY delivered at commit; on SQLite, one process, the
/// writer's own [`Directory::forget`] after the commit is enough).
pub async fn announce<C: ConnectionTrait>(txn: &C, entry: &Entry) -> Result<()> {
    if txn.get_database_backend() == DbBackend::Postgres {
        txn.execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT pg_notify($1, $2)",
            [CHANNEL.into(), entry.payload().into()],
        ))
        .await?;
    }
    Ok(())
}

/// The rows this process holds.
#[derive(Debug)]
pub struct Directory {
    tenants: RwLock<HashMap<String, tenant::Model>>,
    agents: RwLock<HashMap<String, agent::Model>>,
    delegations: RwLock<HashMap<String, Arc<delegation::Model>>>,
    signing_keys: RwLock<HashMap<String, Arc<custody_key::Model>>>,
    parsed_keys: RwLock<HashMap<String, Arc<SecretKey>>>,
    connections: RwLock<HashMap<String, Arc<connection::Model>>>,
    providers: RwLock<HashMap<String, Arc<oauth_provider::Model>>>,
    organizations: RwLock<HashMap<String, external_org::Model>>,
    /// Bumped (under the map's write lock) by every invalidation.
    epoch: AtomicU64,
    /// Whether entries can be trusted (see the module docs).
    live: AtomicBool,
}

impl Directory {
    /// A directory for `backend`: SQLite is one process, so it is live from
    /// the start; PostgreSQL becomes live once the listener subscribes.
    pub fn new(backend: DbBackend) -> Self {
        Self {
            tenants: RwLock::default(),
            agents: RwLock::default(),
            delegations: RwLock::default(),
            signing_keys: RwLock::default(),
            parsed_keys: RwLock::default(),
            connections: RwLock::default(),
            providers: RwLock::default(),
            organizations: RwLock::default(),
            epoch: AtomicU64::new(0),
            live: AtomicBool::new(backend != DbBackend::Postgres),
        }
    }

    /// The tenant `id`, from memory or the database.
    pub async fn tenant(&self, db: &DatabaseConnection, id: &str) -> Result<Option<tenant::Model>> {
        self.read_through(
            &self.tenants,
            MAX_ENTRIES,
            id,
            |_| true,
            || tenant::Entity::find_by_id(id.to_owned()).one(db),
        )
        .await
    }

    /// The agent `id`, from memory or the database.
    pub async fn agent(&self, db: &DatabaseConnection, id: &str) -> Result<Option<agent::Model>> {
        self.read_through(
            &self.agents,
            MAX_ENTRIES,
            id,
            |_| true,
            || agent::Entity::find_by_id(id.to_owned()).one(db),
        )
        .await
    }

    /// The binding of `issuer`'s organisation `organization_id` to a
    /// tenant, from memory or the database.
    pub async fn organization(
        &self,
        db: &DatabaseConnection,
        issuer: &str,
        organization_id: &str,
    ) -> Result<Option<external_org::Model>> {
        let key = organization_key(issuer, organization_id);
        self.read_through(
            &self.organizations,
            MAX_ENTRIES,
            &key,
            |_| true,
            || {
                external_org::Entity::find_by_id((issuer.to_owned(), organization_id.to_owned()))
                    .one(db)
            },
        )
        .await
    }

    /// The delegation `id`, from memory or the database (see the module
    /// docs for which rows are held).
    pub async fn delegation(
        &self,
        db: &DatabaseConnection,
        id: &str,
    ) -> Result<Option<Arc<delegation::Model>>> {
        self.held::<delegation::Entity>(&self.delegations, MAX_DELEGATIONS, db, id, |row| {
            row.status != delegation::Status::Pending
        })
        .await
    }

    /// The signing key `id` (public parts and the sealed private key), from
    /// memory or the database.
    pub async fn signing_key(
        &self,
        db: &DatabaseConnection,
        id: &str,
    ) -> Result<Option<Arc<custody_key::Model>>> {
        self.held::<custody_key::Entity>(&self.signing_keys, MAX_ENTRIES, db, id, |_| true)
            .await
    }

    /// The parsed private key of signing key `id`, made by `parse` on first
    /// use and held like the rows (not while entries cannot be trusted, nor
    /// when the key was forgotten while it was being parsed). The caller has
    /// checked the key's row (its tenant, that it is enabled) first.
    ///
    /// # Errors
    ///
    /// Whatever `parse` returns.
    pub fn parsed_key(
        &self,
        id: &str,
        parse: impl FnOnce() -> Result<SecretKey>,
    ) -> Result<Arc<SecretKey>> {
        if let Some(key) = self.cached(&self.parsed_keys, id) {
            return Ok(key);
        }
        let epoch = self.epoch.load(Ordering::Acquire);
        let key = Arc::new(parse()?);
        self.remember(&self.parsed_keys, MAX_ENTRIES, epoch, id, &key);
        Ok(key)
    }

    /// The connection `id` (any tenant's: the caller checks the owner), from
    /// memory or the database; only CONNECTED rows are held.
    pub async fn connection(
        &self,
        db: &DatabaseConnection,
        id: &str,
    ) -> Result<Option<Arc<connection::Model>>> {
        self.held::<connection::Entity>(&self.connections, MAX_ENTRIES, db, id, |row| {
            row.status == connection::Status::Connected
        })
        .await
    }

    /// The OAuth provider `id` (any tenant's: the caller checks the owner),
    /// from memory or the database.
    pub async fn provider(
        &self,
        db: &DatabaseConnection,
        id: &str,
    ) -> Result<Option<Arc<oauth_provider::Model>>> {
        self.held::<oauth_provider::Entity>(&self.providers, MAX_ENTRIES, db, id, |_| true)
            .await
    }

    /// The row `id` of entity `E` held shared in `map` (at most
    /// `max_entries`), else read from the database and held if `keep` says
    /// it may be.
    async fn held<E>(
        &self,
        map: &RwLock<HashMap<String, Arc<E::Model>>>,
        max_entries: usize,
        db: &DatabaseConnection,
        id: &str,
        keep: fn(&Arc<E::Model>) -> bool,
    ) -> Result<Option<Arc<E::Model>>>
    where
        E: EntityTrait,
        E::Model: Sync,
        <E::PrimaryKey as PrimaryKeyTrait>::ValueType: From<String>,
    {
        self.read_through(map, max_entries, id, keep, || async {
            Ok(E::find_by_id(id.to_owned()).one(db).await?.map(Arc::new))
        })
        .await
    }

    /// `id` from `map`, else from `read`; a row read is remembered if `keep`
    /// says it may be (and no invalidation came in meanwhile), in a map of at
    /// most `max_entries`.
    async fn read_through<T, F, Fut>(
        &self,
        map: &RwLock<HashMap<String, T>>,
        max_entries: usize,
        id: &str,
        keep: fn(&T) -> bool,
        read: F,
    ) -> Result<Option<T>>
    where
        T: Clone,
        F: FnOnce() -> Fut,
        Fut: Future<Output = std::result::Result<Option<T>, sea_orm::DbErr>>,
    {
        if let Some(found) = self.cached(map, id) {
            return Ok(Some(found));
        }
        let epoch = self.epoch.load(Ordering::Acquire);
        let row = read().await?;
        if let Some(row) = row.as_ref().filter(|row| keep(row)) {
            self.remember(map, max_entries, epoch, id, row);
        }
        Ok(row)
    }

    /// Drops `entry`; called after a local commit and for every
    /// notification from any replica.
    pub fn forget(&self, entry: &Entry) {
        match entry {
            Entry::Tenant(id) => self.drop_key(&self.tenants, id),
            Entry::Agent(id) => self.drop_key(&self.agents, id),
            Entry::Delegation(id) => self.drop_key(&self.delegations, id),
            Entry::SigningKey(id) => {
                self.drop_key(&self.signing_keys, id);
                self.drop_key(&self.parsed_keys, id);
            }
            Entry::Connection(id) => self.drop_key(&self.connections, id),
            Entry::Provider(id) => self.drop_key(&self.providers, id),
            Entry::Organization(key) => self.drop_key(&self.organizations, key),
            Entry::AgentDelegations(id) => {
                self.drop_where(&self.delegations, |row| row.requesting_agent_id == *id);
            }
            Entry::TenantDelegations(id) => {
                self.drop_where(&self.delegations, |row| row.requesting_tenant_id == *id);
            }
        }
    }

    /// Drops everything (the listener reconnected: notifications may have
    /// been missed).
    pub fn flush(&self) {
        let mut tenants = self.tenants.write().unwrap_or_else(PoisonError::into_inner);
        let mut agents = self.agents.write().unwrap_or_else(PoisonError::into_inner);
        let mut delegations = self
            .delegations
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let mut signing_keys = self
            .signing_keys
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let mut parsed_keys = self
            .parsed_keys
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let mut connections = self
            .connections
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let mut providers = self
            .providers
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let mut organizations = self
            .organizations
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        organizations.clear();
        connections.clear();
        providers.clear();
        tenants.clear();
        agents.clear();
        delegations.clear();
        signing_keys.clear();
        parsed_keys.clear();
        self.epoch.fetch_add(1, Ordering::AcqRel);
    }

    /// Marks entries trustworthy (listener subscribed) or not (listener
    /// lost); either way what is held is dropped.
    pub fn set_live(&self, live: bool) {
        self.flush();
        self.live.store(live, Ordering::Release);
    }

    fn cached<T: Clone>(&self, map: &RwLock<HashMap<String, T>>, id: &str) -> Option<T> {
        if !self.live.load(Ordering::Acquire) {
            return None;
        }
        map.read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id)
            .cloned()
    }

    fn remember<T: Clone>(
        &self,
        map: &RwLock<HashMap<String, T>>,
        max_entries: usize,
        epoch: u64,
        id: &str,
        row: &T,
    ) {
        let mut map = map.write().unwrap_or_else(PoisonError::into_inner);
        // An invalidation since the read began may concern this very row.
        if self.epoch.load(Ordering::Acquire) != epoch || !self.live.load(Ordering::Acquire) {
            return;
        }
        if map.len() >= max_entries {
            map.clear();
        }
        map.insert(id.to_owned(), row.clone());
    }

    /// Drops every entry of `map` that `matches` (one pass over at most
    /// `MAX_DELEGATIONS` rows: a freeze, not a hot path).
    fn drop_where<T>(&self, map: &RwLock<HashMap<String, T>>, matches: impl Fn(&T) -> bool) {
        let mut map = map.write().unwrap_or_else(PoisonError::into_inner);
        map.retain(|_, row| !matches(row));
        self.epoch.fetch_add(1, Ordering::AcqRel);
    }

    fn drop_key<T>(&self, map: &RwLock<HashMap<String, T>>, id: &str) {
        let mut map = map.write().unwrap_or_else(PoisonError::into_inner);
        map.remove(id);
        self.epoch.fetch_add(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_round_trip() {
        for entry in [
            Entry::Tenant("ten_1".to_owned()),
            Entry::Agent("agt_1".to_owned()),
            Entry::Delegation("dlg_1".to_owned()),
            Entry::SigningKey("key_1".to_owned()),
            Entry::Connection("con_1".to_owned()),
            Entry::Provider("prv_1".to_owned()),
            Entry::organization("https://idp.example/", "org|1"),
            Entry::AgentDelegations("agt_1".to_owned()),
            Entry::TenantDelegations("tnt_1".to_owned()),
        ] {
            assert_eq!(Entry::parse(&entry.payload()), Some(entry));
        }
        assert_eq!(Entry::parse("policy|x"), None);
        assert_eq!(Entry::parse("tenant"), None);
    }

    #[test]
    fn a_read_that_raced_an_invalidation_is_not_cached() {
        // A string stands in for the row: only the bookkeeping is tested.
        let directory = Directory::new(DbBackend::Sqlite);
        let map = RwLock::new(HashMap::new());
        let epoch = directory.epoch.load(Ordering::Acquire);
        directory.drop_key(&map, "ten_1");
        directory.remember(&map, MAX_ENTRIES, epoch, "ten_1", &"old".to_owned());
        assert!(directory.cached(&map, "ten_1").is_none());
        let epoch = directory.epoch.load(Ordering::Acquire);
        directory.remember(&map, MAX_ENTRIES, epoch, "ten_1", &"new".to_owned());
        assert_eq!(directory.cached(&map, "ten_1").as_deref(), Some("new"));
        directory.set_live(false);
        assert!(directory.cached(&map, "ten_1").is_none());
    }

    #[test]
    fn a_parsed_key_is_made_once_and_dropped_with_its_row() {
        let directory = Directory::new(DbBackend::Sqlite);
        let parses = std::cell::Cell::new(0);
        let parse = || {
            parses.set(parses.get() + 1);
            Ok(
                SecretKey::parse(crate::custody::Algorithm::Secp256k1, &[7; 32])
                    .expect("a valid scalar"),
            )
        };
        let first = directory.parsed_key("key_1", parse).expect("parsed");
        let again = directory.parsed_key("key_1", parse).expect("held");
        assert!(Arc::ptr_eq(&first, &again));
        assert_eq!(parses.get(), 1);
        // Disabling the key (here or on another replica) forgets its row,
        // and the parsed key with it.
        directory.forget(&Entry::SigningKey("key_1".to_owned()));
        directory.parsed_key("key_1", parse).expect("parsed again");
        assert_eq!(parses.get(), 2);
        directory.flush();
        directory
            .parsed_key("key_1", parse)
            .expect("parsed after a flush");
        assert_eq!(parses.get(), 3);
        // A failed parse holds nothing.
        let failed = directory.parsed_key("key_2", || Err(crate::error::Error::internal("no")));
        assert!(failed.is_err());
        directory.parsed_key("key_2", parse).expect("parsed");
        assert_eq!(parses.get(), 4);
    }
}
