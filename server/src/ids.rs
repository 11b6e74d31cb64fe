//! Opaque, prefixed identifiers (`tnt_…`, `agt_…`). The prefix names the kind
//! of object, so an id of one kind is never mistaken for another; the body is
//! a UUIDv7 in lowercase hex, so ids sort by creation time.

use crate::error::FieldViolation;

/// The kinds of object that have ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdKind {
    Tenant,
    Agent,
    Rule,
    Delegation,
    StepUp,
    Provider,
    Connection,
    SigningKey,
    Signature,
    AuditEvent,
    IssuerKey,
    Budget,
    BudgetCharge,
}

impl IdKind {
    pub const fn prefix(self) -> &'static str {
        match self {
            Self::Tenant => "tnt",
            Self::Agent => "agt",
            Self::Rule => "rul",
            Self::Delegation => "dlg",
            Self::StepUp => "stp",
            Self::Provider => "prv",
            Self::Connection => "con",
            Self::SigningKey => "key",
            Self::Signature => "sig",
            Self::AuditEvent => "evt",
            Self::IssuerKey => "kid",
            Self::Budget => "bgt",
            Self::BudgetCharge => "chg",
        }
    }
}

/// A new id of the given kind.
pub fn new_id(kind: IdKind) -> String {
    format!("{}_{}", kind.prefix(), uuid::Uuid::now_v7().simple())
}

/// Checks that `value` is a well-formed id of `kind`; `field` names the
/// request field in the violation.
pub fn check_id(field: &str, value: &str, kind: IdKind) -> Result<(), FieldViolation> {
    let well_formed = value
        .strip_prefix(kind.prefix())
        .and_then(|rest| rest.strip_prefix('_'))
        .is_some_and(|body| {
            body.len() == 32
                && body
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        });
    if well_formed {
        Ok(())
    } else if value.is_empty() {
        Err(FieldViolation {
            field: field.to_owned(),
            description: "is required".to_owned(),
        })
    } else {
        Err(FieldViolation {
            field: field.to_owned(),
            description: format!(
                "must be a {} id ({}_ followed by 32 hex digits)",
                kind.prefix(),
                kind.prefix()
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_ids_are_well_formed_and_kind_checked() {
        let id = new_id(IdKind::Tenant);
        assert!(check_id("tenant_id", &id, IdKind::Tenant).is_ok());
        assert!(check_id("agent_id", &id, IdKind::Agent).is_err());
        assert!(check_id("tenant_id", "tnt_XYZ", IdKind::Tenant).is_err());
        assert!(check_id("tenant_id", "", IdKind::Tenant).is_err());
    }
}

/// Property tests of id checking.
#[cfg(test)]
mod props {
    use proptest::prelude::*;

    use super::*;
    use crate::props::{PURE_CASES, config};

    const KINDS: [IdKind; 13] = [
        IdKind::Tenant,
        IdKind::Agent,
        IdKind::Rule,
        IdKind::Delegation,
        IdKind::StepUp,
        IdKind::Provider,
        IdKind::Connection,
        IdKind::SigningKey,
        IdKind::Signature,
        IdKind::AuditEvent,
        IdKind::IssuerKey,
        IdKind::Budget,
        IdKind::BudgetCharge,
    ];

    proptest! {
        #![proptest_config(config(PURE_CASES))]

        #[test]
        fn check_id_accepts_exactly_the_documented_form(
            kind in prop::sample::select(KINDS.to_vec()),
            value in prop_oneof![
                "[a-z]{3}_[0-9a-fA-F]{30,34}".prop_map(String::from),
                "(tnt|agt|dlg)_[0-9a-f]{32}".prop_map(String::from),
                any::<String>(),
            ],
        ) {
            let expected = value
                .strip_prefix(&format!("{}_", kind.prefix()))
                .is_some_and(|body| body.len() == 32 && body.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')));
            prop_assert_eq!(check_id("id", &value, kind).is_ok(), expected);
        }

        #[test]
        fn new_ids_are_accepted_only_for_their_own_kind(
            kind in prop::sample::select(KINDS.to_vec()),
            other in prop::sample::select(KINDS.to_vec()),
        ) {
            let id = new_id(kind);
            prop_assert!(check_id("id", &id, kind).is_ok());
            prop_assert_eq!(check_id("id", &id, other).is_ok(), kind == other);
        }
    }
}
