//! The parsed policy rules each side of a tenant judged by last, kept by
//! version. Below the rest of the domain: `AppState` holds it, and only
//! `policies::judge` reads and fills it.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};

use crate::domain::policy_engine::{Direction, Rule};
use crate::store::entities::tenant;

/// Parsed rules of one side of one tenant, with the tenant row they were read
/// with. Every rule or settings edit bumps the tenant's `policy_version` in
/// its own transaction and announces the tenant (`crate::directory`), so an
/// entry whose version equals the directory's tenant row holds exactly the
/// current rules: a judgement reads nothing from the database unless a
/// version moved. A replica other than the editor's judges by the previous
/// version until the edit's notification reaches it (about a millisecond);
/// the decision records the version it used.
#[derive(Debug, Default)]
pub struct PolicyCache {
    entries: RwLock<HashMap<SideKey, CachedSide>>,
}

/// A tenant id and a direction name.
type SideKey = (String, &'static str);
/// The tenant row the rules were read with, and the parsed rules.
type CachedSide = (tenant::Model, Arc<Vec<Rule>>);

impl PolicyCache {
    /// The rules of `direction` at `current`'s policy version, if held.
    pub(crate) fn get(
        &self,
        current: &tenant::Model,
        direction: Direction,
    ) -> Option<Arc<Vec<Rule>>> {
        let entries = self.entries.read().unwrap_or_else(PoisonError::into_inner);
        entries
            .get(&(current.id.clone(), direction.as_str()))
            .filter(|(at, _)| at.policy_version == current.policy_version)
            .map(|(_, rules)| rules.clone())
    }

    /// Holds `rules`, read at `at`'s version, unless newer ones are held.
    pub(crate) fn put(&self, at: &tenant::Model, direction: Direction, rules: Arc<Vec<Rule>>) {
        let mut entries = self.entries.write().unwrap_or_else(PoisonError::into_inner);
        let key = (at.id.clone(), direction.as_str());
        let newer = entries
            .get(&key)
            .is_none_or(|(cached, _)| cached.policy_version <= at.policy_version);
        if newer {
            entries.insert(key, (at.clone(), rules));
        }
    }
}
