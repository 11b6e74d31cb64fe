//! Lifecycles: the states of rows that change over time, each an enum
//! stored as the TEXT it always was ([`stored_enum!`]), and the transitions
//! each entity allows, written once per entity ([`Lifecycle`]). Every
//! conditional UPDATE that changes a state builds its guard from that table
//! ([`Transitions`]), so the guard and the table cannot disagree.
//!
//! The enums live in their entities' modules (`delegation::Status`,
//! `step_up::State`, …); ARCHITECTURE.md ("Lifecycles") draws their tables.

use sea_orm::sea_query::Expr;
use sea_orm::{ActiveEnum, ColumnTrait, EntityTrait, QueryFilter, UpdateMany};

/// Declares an enum stored in a TEXT column as exactly the strings given
/// (SeaORM `DeriveActiveEnum`, the same bytes on SQLite and PostgreSQL), with
/// [`as_str`](#method.as_str) and `Display` giving the same strings: the
/// enum's one string mapping.
macro_rules! stored_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $( $(#[$variant_meta:meta])* $variant:ident = $value:tt, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(
            Clone, Copy, Debug, PartialEq, Eq, Hash, sea_orm::EnumIter, sea_orm::DeriveActiveEnum,
        )]
        #[sea_orm(rs_type = "String", db_type = "Text")]
        pub enum $name {
            $( $(#[$variant_meta])* #[sea_orm(string_value = $value)] $variant, )+
        }

        impl $name {
            /// The string stored in the database.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $( Self::$variant => $value, )+
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}
pub(crate) use stored_enum;

/// The states of an entity's rows and the changes between them: the one
/// table every state-changing UPDATE of the entity is guarded by.
pub trait Lifecycle:
    ActiveEnum<Value = String> + Into<sea_orm::Value> + Copy + Eq + std::fmt::Debug + 'static
{
    /// The entity whose rows go through these states.
    type Entity: EntityTrait;
    /// The column holding the state.
    const COLUMN: <Self::Entity as EntityTrait>::Column;
    /// The states a row is created in.
    const INITIAL: &'static [Self];
    /// Every allowed change, `(from, to)`: the entity's whole table.
    const TRANSITIONS: &'static [(Self, Self)];

    /// Whether a row in this state may be moved to `next`.
    fn can_become(self, next: Self) -> bool {
        Self::TRANSITIONS.contains(&(self, next))
    }

    /// Whether no change leads out of this state.
    fn is_terminal(self) -> bool {
        Self::TRANSITIONS.iter().all(|&(from, _)| from != self)
    }

    /// The states that may become `to`.
    fn sources(to: Self) -> Vec<Self> {
        Self::TRANSITIONS
            .iter()
            .filter(|&&(_, into)| into == to)
            .map(|&(from, _)| from)
            .collect()
    }

    /// The condition "the row is in one of `from`, and may become `to`":
    /// the guard of a conditional UPDATE (or the filter of the read that
    /// picks its rows). A state of `from` the table does not let become
    /// `to` is left out, so a guard left with none matches no row; in debug
    /// builds such a state is a bug, stopped at once.
    fn guard(from: &[Self], to: Self) -> Expr {
        let allowed: Vec<Self> = from
            .iter()
            .copied()
            .filter(|state| state.can_become(to))
            .collect();
        debug_assert_eq!(
            allowed, from,
            "not every state of {from:?} may become {to:?}"
        );
        Self::COLUMN.is_in(allowed)
    }

    /// [`Lifecycle::guard`] from every state that may become `to`.
    fn guard_into(to: Self) -> Expr {
        Self::guard(&Self::sources(to), to)
    }
}

/// State changes as conditional UPDATEs, their guards taken from the table.
pub trait Transitions: Sized {
    type Entity: EntityTrait;

    /// Moves the rows in one of `from` to `to` (see [`Lifecycle::guard`]).
    #[must_use]
    fn transition<S: Lifecycle<Entity = Self::Entity>>(self, from: &[S], to: S) -> Self;

    /// Moves the rows in any state that may become `to` to `to`.
    #[must_use]
    fn into_state<S: Lifecycle<Entity = Self::Entity>>(self, to: S) -> Self {
        self.transition(&S::sources(to), to)
    }
}

impl<E: EntityTrait> Transitions for UpdateMany<E> {
    type Entity = E;

    fn transition<S: Lifecycle<Entity = E>>(self, from: &[S], to: S) -> Self {
        self.col_expr(S::COLUMN, Expr::value(to))
            .filter(S::guard(from, to))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::store::entities::{
        agent, connection, custody_key, delegation, issuer_key, policy_rule, signature, step_up,
        step_up_change, tenant,
    };

    /// The stored strings of every variant, checked against `as_str` and
    /// the SeaORM mapping, and read back.
    fn stored<S: ActiveEnum<Value = String> + Copy + Eq + std::fmt::Debug>(
        as_str: fn(S) -> &'static str,
    ) -> Vec<&'static str> {
        S::iter()
            .map(|state| {
                assert_eq!(state.to_value(), as_str(state));
                assert_eq!(S::try_from_value(&state.to_value()).unwrap(), state);
                as_str(state)
            })
            .collect()
    }

    /// What every table must hold: each state is initial or reached from
    /// one, every state reached is left only by listed changes, no change
    /// is listed twice, and `sources` inverts the table.
    fn check_table<S: Lifecycle>() -> BTreeSet<String> {
        let mut reached: Vec<S> = S::INITIAL.to_vec();
        let mut grew = true;
        while grew {
            grew = false;
            for &(from, to) in S::TRANSITIONS {
                if reached.contains(&from) && !reached.contains(&to) {
                    reached.push(to);
                    grew = true;
                }
            }
        }
        for state in S::iter() {
            assert!(reached.contains(&state), "{state:?} is never reached");
            for next in S::iter() {
                assert_eq!(
                    state.can_become(next),
                    S::sources(next).contains(&state),
                    "{state:?} → {next:?}"
                );
            }
        }
        let distinct: BTreeSet<(String, String)> = S::TRANSITIONS
            .iter()
            .map(|(from, to)| (from.to_value(), to.to_value()))
            .collect();
        assert_eq!(
            distinct.len(),
            S::TRANSITIONS.len(),
            "a change listed twice"
        );
        S::iter()
            .filter(|state| state.is_terminal())
            .map(|state| state.to_value())
            .collect()
    }

    fn names(states: &[&str]) -> BTreeSet<String> {
        states.iter().map(|s| (*s).to_owned()).collect()
    }

    /// A lifecycle of two states that go back and forth, created in
    /// `first`: nothing is terminal.
    fn toggles<S: Lifecycle>(first: S, second: S) {
        assert!(check_table::<S>().is_empty());
        assert!(first.can_become(second) && second.can_become(first));
        assert_eq!(S::INITIAL, [first]);
    }

    #[test]
    fn tenants_are_suspended_and_reactivated() {
        assert_eq!(stored(tenant::Status::as_str), ["active", "suspended"]);
        toggles(tenant::Status::Active, tenant::Status::Suspended);
    }

    #[test]
    fn agents_are_disabled_and_enabled() {
        assert_eq!(stored(agent::Status::as_str), ["active", "disabled"]);
        toggles(agent::Status::Active, agent::Status::Disabled);
    }

    #[test]
    fn delegations_end_once() {
        use delegation::Status::*;
        assert_eq!(
            stored(delegation::Status::as_str),
            [
                "pending",
                "active",
                "denied",
                "expired",
                "revoked",
                "relinquished",
                "blocked"
            ]
        );
        assert_eq!(
            check_table::<delegation::Status>(),
            names(&["denied", "expired", "revoked", "relinquished", "blocked"])
        );
        // Only an ACTIVE delegation is revoked or relinquished; a PENDING one
        // ends by its step-up (or expiry).
        assert_eq!(delegation::Status::sources(Revoked), [Active]);
        assert_eq!(delegation::Status::sources(Relinquished), [Active]);
        assert_eq!(delegation::Status::sources(Active), [Pending]);
        assert_eq!(delegation::Status::sources(Denied), [Pending]);
        assert_eq!(delegation::Status::sources(Expired), [Pending, Active]);
        assert!(delegation::Status::sources(Blocked).is_empty());
        assert!(!Active.can_become(Pending));
    }

    #[test]
    fn step_ups_are_decided_once() {
        use step_up::State::*;
        assert_eq!(
            stored(step_up::State::as_str),
            ["pending", "approved", "denied", "expired", "redeemed"]
        );
        assert_eq!(
            check_table::<step_up::State>(),
            names(&["denied", "expired", "redeemed"])
        );
        assert_eq!(step_up::State::sources(Redeemed), [Approved]);
        assert_eq!(step_up::State::sources(Approved), [Pending]);
        assert_eq!(step_up::State::sources(Denied), [Pending]);
        assert_eq!(step_up::State::sources(Expired), [Pending, Approved]);
        assert_eq!(step_up::State::INITIAL, [Pending]);
    }

    #[test]
    fn connections_end_disconnected() {
        use connection::Status::*;
        assert_eq!(
            stored(connection::Status::as_str),
            ["pending", "connected", "needs_reauth", "disconnected"]
        );
        assert_eq!(
            check_table::<connection::Status>(),
            names(&["disconnected"])
        );
        // The callback connects anything not disconnected (re-authorizing a
        // connected one), and DeleteConnection disconnects it.
        assert_eq!(
            connection::Status::sources(Connected),
            [Pending, Connected, NeedsReauth]
        );
        assert_eq!(
            connection::Status::sources(Disconnected),
            [Pending, Connected, NeedsReauth]
        );
        // Only tokens turn stale: a connection that never had any does not
        // need re-authorization.
        assert_eq!(
            connection::Status::sources(NeedsReauth),
            [Connected, NeedsReauth]
        );
        assert_eq!(connection::Status::INITIAL, [Pending]);
    }

    #[test]
    fn signing_keys_are_disabled_for_good() {
        use custody_key::Status::*;
        assert_eq!(stored(custody_key::Status::as_str), ["enabled", "disabled"]);
        assert_eq!(check_table::<custody_key::Status>(), names(&["disabled"]));
        assert!(!Disabled.can_become(Enabled));
    }

    #[test]
    fn signatures_are_signed_once() {
        use signature::Status::*;
        assert_eq!(stored(signature::Status::as_str), ["pending", "signed"]);
        assert_eq!(check_table::<signature::Status>(), names(&["signed"]));
        assert_eq!(signature::Status::INITIAL, [Pending, Signed]);
        assert_eq!(signature::Status::sources(Signed), [Pending]);
    }

    #[test]
    fn issuer_keys_retire_for_good() {
        use issuer_key::Status::*;
        assert_eq!(stored(issuer_key::Status::as_str), ["active", "retired"]);
        assert_eq!(check_table::<issuer_key::Status>(), names(&["retired"]));
        assert!(!Retired.can_become(Active));
    }

    #[test]
    fn other_stored_enums_keep_their_strings() {
        assert_eq!(
            stored(policy_rule::Direction::as_str),
            ["inbound", "outbound"]
        );
        assert_eq!(
            stored(policy_rule::Effect::as_str),
            ["allow", "step_up", "block"]
        );
        assert_eq!(stored(tenant::OutboundDefault::as_str), ["allow", "block"]);
        assert_eq!(
            stored(step_up_change::Kind::as_str),
            ["added", "updated", "removed"]
        );
    }

    #[test]
    fn guards_keep_only_allowed_sources() {
        use sea_orm::{DbBackend, QueryTrait};
        let sql = delegation::Entity::update_many()
            .into_state(delegation::Status::Expired)
            .build(DbBackend::Postgres)
            .to_string();
        assert_eq!(
            sql,
            r#"UPDATE "delegations" SET "status" = 'expired' WHERE "delegations"."status" IN ('pending', 'active')"#
        );
    }
}
