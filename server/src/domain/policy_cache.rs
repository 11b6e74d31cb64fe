//! The parsed policy rules each side of a tenant judged by last, and each
//! tenant's budgets, kept by policy version. Below the rest of the domain:
//! `AppState` holds them; only `policies::judge` reads and fills the rules,
//! only `budgets::applicable` the budgets.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};

use crate::domain::policy_engine::{Direction, RuleSet};
use crate::store::entities::{budget, tenant};

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
type CachedSide = (tenant::Model, Arc<RuleSet>);

impl PolicyCache {
    /// The rules of `direction` at `current`'s policy version, if held.
    pub(crate) fn get(
        &self,
        current: &tenant::Model,
        direction: Direction,
    ) -> Option<Arc<RuleSet>> {
        let entries = self.entries.read().unwrap_or_else(PoisonError::into_inner);
        entries
            .get(&(current.id.clone(), direction.as_str()))
            .filter(|(at, _)| at.policy_version == current.policy_version)
            .map(|(_, rules)| rules.clone())
    }

    /// Holds `rules`, read at `at`'s version, unless newer ones are held.
    pub(crate) fn put(&self, at: &tenant::Model, direction: Direction, rules: Arc<RuleSet>) {
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

/// A tenant's policy version and its budget rows at that version.
type VersionedBudgets = (i64, Arc<Vec<budget::Model>>);

/// Each tenant's budget rows, by policy version: budget edits bump it as
/// rule edits do, so a request reads its budgets from memory unless a
/// version moved (`budgets::applicable`).
#[derive(Debug, Default)]
pub struct BudgetCache {
    entries: RwLock<HashMap<String, VersionedBudgets>>,
}

impl BudgetCache {
    /// The budgets of `current` at its policy version, if held.
    pub(crate) fn get(&self, current: &tenant::Model) -> Option<Arc<Vec<budget::Model>>> {
        let entries = self.entries.read().unwrap_or_else(PoisonError::into_inner);
        entries
            .get(&current.id)
            .filter(|(version, _)| *version == current.policy_version)
            .map(|(_, rows)| rows.clone())
    }

    /// Holds `rows`, read at `at`'s version, unless newer ones are held.
    pub(crate) fn put(&self, at: &tenant::Model, rows: Arc<Vec<budget::Model>>) {
        let mut entries = self.entries.write().unwrap_or_else(PoisonError::into_inner);
        let newer = entries
            .get(&at.id)
            .is_none_or(|(version, _)| *version <= at.policy_version);
        if newer {
            entries.insert(at.id.clone(), (at.policy_version, rows));
        }
    }
}
