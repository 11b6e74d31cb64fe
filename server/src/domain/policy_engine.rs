//! The policy language and its evaluation, free of storage: action grammar,
//! conditions, time windows, rule ordering, and combining the two sides of a
//! request. Everything here is a pure function of its inputs (time included),
//! so the ordering documented in `policy_service.proto` is tested directly.

use std::cmp::Ordering;
use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};
use vaultguard_proto::v1 as pb;

use crate::clock::Millis;
use crate::domain::authorization_details::{self as details, Detail};
use crate::error::FieldViolation;
use crate::store::entities::policy_rule;

/// Longest action or action pattern.
pub const MAX_ACTION_LEN: usize = 128;
/// Longest segment of an action.
const MAX_SEGMENT_LEN: usize = 64;
/// Most context entries on a request.
pub const MAX_CONTEXT_ENTRIES: usize = 32;
/// Longest string value of a context attribute, in bytes.
pub const MAX_STRING_VALUE_BYTES: usize = 256;
/// Longest attribute name.
const MAX_ATTRIBUTE_LEN: usize = 64;
/// Most conditions on a rule.
pub const MAX_CONDITIONS: usize = 16;
/// Most operands of IN / NOT_IN.
const MAX_IN_VALUES: usize = 64;
/// Longest explanation sent to a caller.
const MAX_EXPLANATION: usize = 1024;

fn violation(field: &str, description: impl Into<String>) -> FieldViolation {
    FieldViolation {
        field: field.to_owned(),
        description: description.into(),
    }
}

fn valid_segment(segment: &str) -> bool {
    (1..=MAX_SEGMENT_LEN).contains(&segment.len())
        && segment.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b':' | b'-')
        })
}

/// A concrete action: `.`-separated segments of `[a-z0-9_:-]`, no wildcard.
pub fn check_action(field: &str, action: &str) -> Result<(), FieldViolation> {
    if action.is_empty() {
        return Err(violation(field, "is required"));
    }
    if action.len() > MAX_ACTION_LEN {
        return Err(violation(
            field,
            format!("must be at most {MAX_ACTION_LEN} characters"),
        ));
    }
    if action.split('.').all(valid_segment) {
        Ok(())
    } else {
        Err(violation(
            field,
            "must be segments of 1 to 64 characters of a-z, 0-9, '_', ':' and '-' separated by '.', without wildcards",
        ))
    }
}

/// An action pattern: a concrete action, a prefix ending in `.*`, or `*`.
pub fn check_pattern(field: &str, pattern: &str) -> Result<(), FieldViolation> {
    if pattern.is_empty() {
        return Err(violation(field, "is required"));
    }
    if pattern.len() > MAX_ACTION_LEN {
        return Err(violation(
            field,
            format!("must be at most {MAX_ACTION_LEN} characters"),
        ));
    }
    if pattern == "*" {
        return Ok(());
    }
    let literal = pattern.strip_suffix(".*").unwrap_or(pattern);
    if literal.split('.').all(valid_segment) {
        Ok(())
    } else {
        Err(violation(
            field,
            "must be an action (segments of a-z, 0-9, '_', ':' and '-' separated by '.'), optionally ending in '.*', or the lone '*'",
        ))
    }
}

/// Whether `pattern` (already valid) matches the concrete `action`.
pub fn pattern_matches(pattern: &str, action: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    match pattern.strip_suffix(".*") {
        Some(prefix) => action
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.len() > 1 && rest.starts_with('.')),
        None => pattern == action,
    }
}

/// How specific a pattern is: exact actions beat every wildcard, longer
/// prefixes beat shorter ones, the lone `*` is least specific.
pub fn pattern_specificity(pattern: &str) -> u32 {
    if pattern == "*" {
        return 0;
    }
    match pattern.strip_suffix(".*") {
        Some(prefix) => u32::try_from(prefix.split('.').count()).unwrap_or(u32::MAX - 1),
        None => 1_000,
    }
}

/// Most scope patterns, default scopes or resource patterns on a rule.
pub const MAX_GRANTS: usize = 32;
/// Longest scope or scope pattern.
pub const MAX_SCOPE_LEN: usize = 128;
/// Longest resource or resource pattern.
pub const MAX_RESOURCE_LEN: usize = 512;

/// A concrete scope: 1 to 128 printable ASCII characters without space,
/// `"`, `\` or `*` (RFC 6749 §3.3 `scope-token`, minus the characters that
/// need escaping in JSON and the wildcard of rules' patterns, so no token
/// carries a scope that reads as a pattern).
pub fn check_scope(field: &str, scope: &str) -> Result<(), FieldViolation> {
    if check_scope_text(scope) && !scope.contains('*') {
        Ok(())
    } else {
        Err(violation(
            field,
            "scopes are 1 to 128 printable ASCII characters without space, '\"', '\\' or '*'",
        ))
    }
}

fn check_scope_text(scope: &str) -> bool {
    (1..=MAX_SCOPE_LEN).contains(&scope.len())
        && scope
            .bytes()
            .all(|b| (0x21..=0x7e).contains(&b) && b != b'"' && b != b'\\')
}

/// A scope pattern of a rule: a concrete scope (matched exactly), a prefix
/// ending in `:*`, `.*` or `/*` (`contacts:*` matches `contacts:read` and
/// `contacts:write.all`, not `contacts`; `mail.*` matches `mail.send`), or
/// the lone `*` (every scope). The delimiter before the `*` keeps a prefix
/// to whole segments: `read*` is not a pattern, so it cannot grant
/// `readwrite`.
pub fn check_scope_pattern(field: &str, pattern: &str) -> Result<(), FieldViolation> {
    if !check_scope_text(pattern) {
        return Err(violation(
            field,
            "scope patterns are 1 to 128 printable ASCII characters without space, '\"' or '\\'",
        ));
    }
    if pattern == "*" {
        return Ok(());
    }
    match scope_prefix(pattern) {
        Some(prefix) if prefix.len() < 2 => Err(violation(
            field,
            "a prefix pattern needs a prefix before its ':*', '.*' or '/*'",
        )),
        Some(prefix) if prefix.contains('*') => Err(violation(
            field,
            "'*' may only be the whole pattern or follow a final ':', '.' or '/'",
        )),
        Some(_) => Ok(()),
        None if pattern.contains('*') => Err(violation(
            field,
            "'*' may only be the whole pattern or follow a final ':', '.' or '/'",
        )),
        None => Ok(()),
    }
}

/// The prefix of a prefix pattern, delimiter included (`contacts:` of
/// `contacts:*`), or `None` for an exact scope or the lone `*`.
fn scope_prefix(pattern: &str) -> Option<&str> {
    let prefix = pattern.strip_suffix('*')?;
    prefix.ends_with([':', '.', '/']).then_some(prefix)
}

/// Whether the scope pattern (already valid) grants the concrete `scope`.
pub fn scope_matches(pattern: &str, scope: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    match scope_prefix(pattern) {
        Some(prefix) => scope.len() > prefix.len() && scope.starts_with(prefix),
        None => pattern == scope,
    }
}

/// A resource pattern of a rule: an exact resource (an RFC 8707 URI or any
/// other text the resource server understands), a prefix ending in `*`
/// (`https://api.example.com/orders/*`), or the lone `*` (every resource).
/// 1 to 512 characters, no control characters, `*` only at the end.
pub fn check_resource_pattern(field: &str, pattern: &str) -> Result<(), FieldViolation> {
    if pattern.is_empty() || pattern.chars().count() > MAX_RESOURCE_LEN {
        return Err(violation(
            field,
            format!("must be 1 to {MAX_RESOURCE_LEN} characters"),
        ));
    }
    if pattern.chars().any(char::is_control) {
        return Err(violation(field, "must not contain control characters"));
    }
    let literal = pattern.strip_suffix('*').unwrap_or(pattern);
    if literal.contains('*') {
        return Err(violation(field, "'*' may only end the pattern"));
    }
    Ok(())
}

/// Whether the resource pattern (already valid) grants `resource`.
pub fn resource_matches(pattern: &str, resource: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => resource.len() > prefix.len() && resource.starts_with(prefix),
        None => pattern == resource,
    }
}

/// What a rule grants besides its effect: the scopes and resources a token
/// decided by it may carry.
///
/// On an INBOUND rule (the receiving tenant's): a requested scope or resource
/// is granted only if one of the patterns matches it, so a rule that names
/// none grants none; `default_scopes` are what a request naming no scope
/// gets. On an OUTBOUND rule (the requesting tenant's): the patterns limit
/// what the tenant's own agents may ask for; a rule naming none limits
/// nothing, and `default_scopes` are not used.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grants {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scopes: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub default_scopes: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resources: Vec<String>,
}

impl Grants {
    /// Checks a rule's grant fields (`rule.scopes`, `rule.default_scopes`,
    /// `rule.resources`) for a rule of `direction`.
    pub fn from_proto(
        direction: Option<Direction>,
        scopes: &[String],
        default_scopes: &[String],
        resources: &[String],
    ) -> Result<Self, Vec<FieldViolation>> {
        let mut violations = Vec::new();
        let mut list =
            |name: &str, values: &[String], check: fn(&str, &str) -> Result<(), FieldViolation>| {
                if values.len() > MAX_GRANTS {
                    violations.push(violation(
                        &format!("rule.{name}"),
                        format!("at most {MAX_GRANTS} entries"),
                    ));
                }
                for (i, value) in values.iter().enumerate() {
                    let field = format!("rule.{name}[{i}]");
                    if let Err(v) = check(&field, value) {
                        violations.push(v);
                    } else if values[..i].contains(value) {
                        violations.push(violation(&field, "is a duplicate"));
                    }
                }
            };
        list("scopes", scopes, check_scope_pattern);
        list("default_scopes", default_scopes, check_scope);
        list("resources", resources, check_resource_pattern);
        if direction == Some(Direction::Outbound) && !default_scopes.is_empty() {
            violations.push(violation(
                "rule.default_scopes",
                "only inbound rules give default scopes",
            ));
        }
        for (i, scope) in default_scopes.iter().enumerate() {
            if check_scope("", scope).is_ok() && !scopes.iter().any(|p| scope_matches(p, scope)) {
                violations.push(violation(
                    &format!("rule.default_scopes[{i}]"),
                    "is not granted by rule.scopes",
                ));
            }
        }
        if violations.is_empty() {
            Ok(Self {
                scopes: scopes.to_vec(),
                default_scopes: default_scopes.to_vec(),
                resources: resources.to_vec(),
            })
        } else {
            Err(violations)
        }
    }

    fn grants_scope(&self, scope: &str) -> bool {
        self.scopes.iter().any(|p| scope_matches(p, scope))
    }

    fn grants_resource(&self, resource: &str) -> bool {
        self.resources.iter().any(|p| resource_matches(p, resource))
    }
}

/// A typed attribute value as stored and compared.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Attr {
    String(String),
    Number(f64),
    Bool(bool),
}

impl Attr {
    fn same_type(&self, other: &Self) -> bool {
        std::mem::discriminant(self) == std::mem::discriminant(other)
    }

    pub fn to_proto(&self) -> pb::AttributeValue {
        use pb::attribute_value::Kind;
        pb::AttributeValue {
            kind: Some(match self {
                Self::String(s) => Kind::StringValue(s.clone()),
                Self::Number(n) => Kind::NumberValue(*n),
                Self::Bool(b) => Kind::BoolValue(*b),
            }),
        }
    }

    fn display(&self) -> String {
        match self {
            Self::String(s) => format!("{s:?}"),
            Self::Number(n) => n.to_string(),
            Self::Bool(b) => b.to_string(),
        }
    }
}

/// Checks one attribute value; `None` kind and non-finite numbers are refused.
pub fn check_value(field: &str, value: &pb::AttributeValue) -> Result<Attr, FieldViolation> {
    use pb::attribute_value::Kind;
    match &value.kind {
        None => Err(violation(field, "must hold a string, number or bool value")),
        Some(Kind::StringValue(s)) if s.len() > MAX_STRING_VALUE_BYTES => Err(violation(
            field,
            format!("string values are at most {MAX_STRING_VALUE_BYTES} bytes"),
        )),
        Some(Kind::StringValue(s)) => Ok(Attr::String(s.clone())),
        Some(Kind::NumberValue(n)) if !n.is_finite() => {
            Err(violation(field, "numbers must be finite"))
        }
        Some(Kind::NumberValue(n)) => Ok(Attr::Number(*n)),
        Some(Kind::BoolValue(b)) => Ok(Attr::Bool(*b)),
    }
}

/// An attribute name: 1 to 64 characters of `[a-z][a-z0-9_]*`.
pub fn check_attribute_name(field: &str, name: &str) -> Result<(), FieldViolation> {
    let valid = (1..=MAX_ATTRIBUTE_LEN).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if valid {
        Ok(())
    } else {
        Err(violation(
            field,
            "attribute names are 1 to 64 characters of a-z, 0-9 and '_', starting with a letter",
        ))
    }
}

/// Checks a request's context: at most 32 entries, valid names, no reserved
/// `vg_` names, valid values. Field names are `context` and `context.<key>`.
pub fn check_context(
    context: &std::collections::HashMap<String, pb::AttributeValue>,
) -> Result<BTreeMap<String, Attr>, Vec<FieldViolation>> {
    let mut violations = Vec::new();
    if context.len() > MAX_CONTEXT_ENTRIES {
        violations.push(violation(
            "context",
            format!("at most {MAX_CONTEXT_ENTRIES} entries"),
        ));
        return Err(violations);
    }
    let mut out = BTreeMap::new();
    for (key, value) in context {
        let field = format!("context.{}", key.chars().take(64).collect::<String>());
        if let Err(v) = check_attribute_name(&field, key) {
            violations.push(v);
            continue;
        }
        if key.starts_with("vg_") {
            violations.push(violation(&field, "names starting with vg_ are reserved"));
            continue;
        }
        match check_value(&field, value) {
            Ok(attr) => {
                out.insert(key.clone(), attr);
            }
            Err(v) => violations.push(v),
        }
    }
    if violations.is_empty() {
        Ok(out)
    } else {
        violations.sort_by(|a, b| a.field.cmp(&b.field));
        Err(violations)
    }
}

/// A comparison operator of a condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    Eq,
    Ne,
    Lt,
    Lte,
    Gt,
    Gte,
    In,
    NotIn,
    Exists,
}

impl Op {
    fn from_proto(op: pb::ConditionOperator) -> Option<Self> {
        use pb::ConditionOperator as P;
        Some(match op {
            P::Unspecified => return None,
            P::Eq => Self::Eq,
            P::Ne => Self::Ne,
            P::Lt => Self::Lt,
            P::Lte => Self::Lte,
            P::Gt => Self::Gt,
            P::Gte => Self::Gte,
            P::In => Self::In,
            P::NotIn => Self::NotIn,
            P::Exists => Self::Exists,
        })
    }

    pub fn to_proto(self) -> pb::ConditionOperator {
        use pb::ConditionOperator as P;
        match self {
            Self::Eq => P::Eq,
            Self::Ne => P::Ne,
            Self::Lt => P::Lt,
            Self::Lte => P::Lte,
            Self::Gt => P::Gt,
            Self::Gte => P::Gte,
            Self::In => P::In,
            Self::NotIn => P::NotIn,
            Self::Exists => P::Exists,
        }
    }

    const fn symbol(self) -> &'static str {
        match self {
            Self::Eq => "==",
            Self::Ne => "!=",
            Self::Lt => "<",
            Self::Lte => "<=",
            Self::Gt => ">",
            Self::Gte => ">=",
            Self::In => "in",
            Self::NotIn => "not in",
            Self::Exists => "exists",
        }
    }
}

/// One condition of a rule, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Condition {
    pub attribute: String,
    pub op: Op,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<Attr>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<Attr>,
    /// When set, the condition tests the request's authorization details of
    /// this type at `detail_path` instead of the context attribute.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail_type: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub detail_path: Vec<String>,
}

impl Condition {
    /// Checks a proto condition; `field` is its path (`rule.conditions[0]`).
    pub fn from_proto(field: &str, c: &pb::Condition) -> Result<Self, Vec<FieldViolation>> {
        let mut violations = Vec::new();
        let mut detail_path = Vec::new();
        if c.detail_type.is_empty() {
            if let Err(v) = check_attribute_name(&format!("{field}.attribute"), &c.attribute) {
                violations.push(v);
            }
            if !c.detail_path.is_empty() {
                violations.push(violation(
                    &format!("{field}.detail_path"),
                    "must be empty unless detail_type is set",
                ));
            }
        } else {
            if !c.attribute.is_empty() {
                violations.push(violation(
                    &format!("{field}.attribute"),
                    "must be empty when detail_type is set",
                ));
            }
            if let Err(v) = details::check_type(&format!("{field}.detail_type"), &c.detail_type) {
                violations.push(v);
            }
            match details::check_path(&format!("{field}.detail_path"), &c.detail_path) {
                Ok(path) => detail_path = path,
                Err(v) => violations.push(v),
            }
        }
        let op = match pb::ConditionOperator::try_from(c.operator)
            .ok()
            .and_then(Op::from_proto)
        {
            Some(op) => op,
            None => {
                violations.push(violation(
                    &format!("{field}.operator"),
                    "must be a known operator",
                ));
                return Err(violations);
            }
        };
        let value_field = format!("{field}.value");
        let values_field = format!("{field}.values");
        let mut value = None;
        let mut values = Vec::new();
        match op {
            Op::Eq | Op::Ne | Op::Lt | Op::Lte | Op::Gt | Op::Gte => {
                match c.value.as_ref().map(|v| check_value(&value_field, v)) {
                    None => {
                        violations.push(violation(&value_field, "is required for this operator"))
                    }
                    Some(Err(v)) => violations.push(v),
                    Some(Ok(attr)) => {
                        if matches!(op, Op::Lt | Op::Lte | Op::Gt | Op::Gte)
                            && !matches!(attr, Attr::Number(_))
                        {
                            violations.push(violation(
                                &value_field,
                                "must be a number for an ordering operator",
                            ));
                        }
                        value = Some(attr);
                    }
                }
                if !c.values.is_empty() {
                    violations.push(violation(&values_field, "must be empty for this operator"));
                }
            }
            Op::In | Op::NotIn => {
                if c.value.is_some() {
                    violations.push(violation(&value_field, "must be unset for in / not_in"));
                }
                if c.values.is_empty() || c.values.len() > MAX_IN_VALUES {
                    violations.push(violation(
                        &values_field,
                        format!("must hold 1 to {MAX_IN_VALUES} values"),
                    ));
                }
                for (i, v) in c.values.iter().enumerate() {
                    match check_value(&format!("{values_field}[{i}]"), v) {
                        Ok(attr) => values.push(attr),
                        Err(v) => violations.push(v),
                    }
                }
            }
            Op::Exists => {
                if c.value.is_some() {
                    violations.push(violation(&value_field, "must be unset for exists"));
                }
                if !c.values.is_empty() {
                    violations.push(violation(&values_field, "must be empty for exists"));
                }
            }
        }
        if violations.is_empty() {
            Ok(Self {
                attribute: c.attribute.clone(),
                op,
                value,
                values,
                detail_type: c.detail_type.clone(),
                detail_path,
            })
        } else {
            Err(violations)
        }
    }

    pub fn to_proto(&self) -> pb::Condition {
        pb::Condition {
            attribute: self.attribute.clone(),
            operator: self.op.to_proto() as i32,
            value: self.value.as_ref().map(Attr::to_proto),
            values: self.values.iter().map(Attr::to_proto).collect(),
            detail_type: self.detail_type.clone(),
            detail_path: self.detail_path.join("."),
        }
    }

    /// Whether the condition holds for `request` in a rule of `effect`: a
    /// context condition as [`Self::holds`]; a detail condition over every
    /// value at its path, all of them for ALLOW (and at least one), any of
    /// them for STEP_UP and BLOCK, so the most restrictive reading wins.
    pub fn matches(&self, request: &Request<'_>, effect: Outcome) -> bool {
        if self.detail_type.is_empty() {
            return self.holds(request.context);
        }
        let values: Vec<Attr> = details::values_of(
            request.authorization_details,
            &self.detail_type,
            &self.detail_path,
        )
        .into_iter()
        .filter_map(|v| detail_attr(v, self.numeric()))
        .collect();
        let one = |attr: &Attr| {
            let mut context = BTreeMap::new();
            context.insert(String::new(), attr.clone());
            Condition {
                attribute: String::new(),
                detail_type: String::new(),
                detail_path: Vec::new(),
                ..self.clone()
            }
            .holds(&context)
        };
        match effect {
            Outcome::Allow => !values.is_empty() && values.iter().all(one),
            Outcome::StepUp | Outcome::Block => values.iter().any(one),
        }
    }

    /// Whether the operands are numbers (so decimal strings in details
    /// compare as numbers).
    fn numeric(&self) -> bool {
        matches!(self.value, Some(Attr::Number(_)))
            || self.values.iter().any(|v| matches!(v, Attr::Number(_)))
    }

    /// What the condition tests, for explanations.
    fn subject(&self) -> String {
        if self.detail_type.is_empty() {
            self.attribute.clone()
        } else {
            format!("{}.{}", self.detail_type, self.detail_path.join("."))
        }
    }

    /// Whether the condition holds for `context` (absent or mismatched
    /// types make it false, for every operator).
    pub fn holds(&self, context: &BTreeMap<String, Attr>) -> bool {
        let Some(actual) = context.get(&self.attribute) else {
            return false;
        };
        let compare = |expected: &Attr| -> Option<Ordering> {
            match (actual, expected) {
                (Attr::Number(a), Attr::Number(b)) => a.partial_cmp(b),
                (Attr::String(a), Attr::String(b)) => Some(a.cmp(b)),
                (Attr::Bool(a), Attr::Bool(b)) => Some(a.cmp(b)),
                _ => None,
            }
        };
        match self.op {
            Op::Exists => true,
            Op::Eq => self
                .value
                .as_ref()
                .is_some_and(|v| compare(v) == Some(Ordering::Equal)),
            Op::Ne => self
                .value
                .as_ref()
                .and_then(compare)
                .is_some_and(|o| o != Ordering::Equal),
            Op::Lt | Op::Lte | Op::Gt | Op::Gte => {
                let (Some(Attr::Number(_)), Attr::Number(_)) = (&self.value, actual) else {
                    return false;
                };
                let Some(order) = self.value.as_ref().and_then(compare) else {
                    return false;
                };
                match self.op {
                    Op::Lt => order == Ordering::Less,
                    Op::Lte => order != Ordering::Greater,
                    Op::Gt => order == Ordering::Greater,
                    _ => order != Ordering::Less,
                }
            }
            Op::In => self
                .values
                .iter()
                .any(|v| compare(v) == Some(Ordering::Equal)),
            Op::NotIn => {
                self.values.iter().any(|v| v.same_type(actual))
                    && !self
                        .values
                        .iter()
                        .any(|v| compare(v) == Some(Ordering::Equal))
            }
        }
    }

    fn describe(&self, request: &Request<'_>) -> String {
        let actual = if self.detail_type.is_empty() {
            request
                .context
                .get(&self.attribute)
                .map(Attr::display)
                .unwrap_or_default()
        } else {
            details::values_of(
                request.authorization_details,
                &self.detail_type,
                &self.detail_path,
            )
            .into_iter()
            .filter_map(|v| detail_attr(v, self.numeric()))
            .map(|a| a.display())
            .collect::<Vec<_>>()
            .join("|")
        };
        let subject = self.subject();
        match self.op {
            Op::Exists => format!("{subject} exists"),
            Op::In | Op::NotIn => format!(
                "{} {} {} [{}]",
                subject,
                actual,
                self.op.symbol(),
                self.values
                    .iter()
                    .map(Attr::display)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            _ => format!(
                "{} {} {} {}",
                subject,
                actual,
                self.op.symbol(),
                self.value.as_ref().map(Attr::display).unwrap_or_default()
            ),
        }
    }
}

/// A UTC time-of-day window, optionally limited to some weekdays (1 =
/// Monday … 7 = Sunday).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimeWindow {
    pub start: u32,
    pub end: u32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub days: Vec<u32>,
}

impl TimeWindow {
    pub fn from_proto(field: &str, w: &pb::TimeWindow) -> Result<Self, Vec<FieldViolation>> {
        let mut violations = Vec::new();
        if w.start_minute > 1439 {
            violations.push(violation(
                &format!("{field}.start_minute"),
                "must be 0 to 1439",
            ));
        }
        if !(1..=1440).contains(&w.end_minute) {
            violations.push(violation(
                &format!("{field}.end_minute"),
                "must be 1 to 1440",
            ));
        } else if w.end_minute == w.start_minute {
            violations.push(violation(
                &format!("{field}.end_minute"),
                "must differ from start_minute",
            ));
        }
        let mut days = Vec::new();
        for (i, raw) in w.days_of_week.iter().enumerate() {
            let day_field = format!("{field}.days_of_week[{i}]");
            match u32::try_from(*raw) {
                Ok(day @ 1..=7) if !days.contains(&day) => days.push(day),
                Ok(1..=7) => violations.push(violation(&day_field, "is a duplicate")),
                _ => violations.push(violation(&day_field, "must be a weekday")),
            }
        }
        if violations.is_empty() {
            days.sort_unstable();
            Ok(Self {
                start: w.start_minute,
                end: w.end_minute,
                days,
            })
        } else {
            Err(violations)
        }
    }

    pub fn to_proto(&self) -> pb::TimeWindow {
        pb::TimeWindow {
            start_minute: self.start,
            end_minute: self.end,
            days_of_week: self
                .days
                .iter()
                .map(|d| i32::try_from(*d).unwrap_or_default())
                .collect(),
        }
    }

    /// Whether `now` (ms since the epoch) lies in the window.
    pub fn contains(&self, now: Millis) -> bool {
        let minutes = now.div_euclid(60_000);
        let minute = u32::try_from(minutes.rem_euclid(1440)).unwrap_or_default();
        let day_index = minutes.div_euclid(1440);
        let (inside, started_yesterday) = if self.start < self.end {
            (minute >= self.start && minute < self.end, false)
        } else if minute >= self.start {
            (true, false)
        } else {
            (minute < self.end, true)
        };
        if !inside {
            return false;
        }
        if self.days.is_empty() {
            return true;
        }
        let start_day = if started_yesterday {
            day_index - 1
        } else {
            day_index
        };
        // 1970-01-01 was a Thursday (weekday 4).
        let weekday = u32::try_from((start_day + 3).rem_euclid(7) + 1).unwrap_or_default();
        self.days.contains(&weekday)
    }
}

/// Which side of a request a rule judges (a rule's stored `direction`).
pub use crate::store::entities::policy_rule::Direction;

impl Direction {
    pub fn from_proto(d: pb::RuleDirection) -> Option<Self> {
        match d {
            pb::RuleDirection::Inbound => Some(Self::Inbound),
            pb::RuleDirection::Outbound => Some(Self::Outbound),
            pb::RuleDirection::Unspecified => None,
        }
    }

    pub const fn to_proto(self) -> pb::RuleDirection {
        match self {
            Self::Inbound => pb::RuleDirection::Inbound,
            Self::Outbound => pb::RuleDirection::Outbound,
        }
    }
}

/// A decision, ordered by severity: ALLOW < STEP_UP < BLOCK.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Allow,
    StepUp,
    Block,
}

impl Outcome {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::StepUp => "step_up",
            Self::Block => "block",
        }
    }

    pub fn from_effect(e: pb::Effect) -> Option<Self> {
        match e {
            pb::Effect::Allow => Some(Self::Allow),
            pb::Effect::StepUp => Some(Self::StepUp),
            pb::Effect::Block => Some(Self::Block),
            pb::Effect::Unspecified => None,
        }
    }

    pub const fn to_effect(self) -> pb::Effect {
        match self {
            Self::Allow => pb::Effect::Allow,
            Self::StepUp => pb::Effect::StepUp,
            Self::Block => pb::Effect::Block,
        }
    }

    pub const fn to_decision(self) -> pb::Decision {
        match self {
            Self::Allow => pb::Decision::Allow,
            Self::StepUp => pb::Decision::StepUp,
            Self::Block => pb::Decision::Block,
        }
    }

    pub(crate) const fn label(self) -> &'static str {
        match self {
            Self::Allow => "ALLOW",
            Self::StepUp => "STEP_UP",
            Self::Block => "BLOCK",
        }
    }
}

/// A rule's stored effect is the outcome it decides.
impl From<policy_rule::Effect> for Outcome {
    fn from(effect: policy_rule::Effect) -> Self {
        match effect {
            policy_rule::Effect::Allow => Self::Allow,
            policy_rule::Effect::StepUp => Self::StepUp,
            policy_rule::Effect::Block => Self::Block,
        }
    }
}

impl From<Outcome> for policy_rule::Effect {
    fn from(outcome: Outcome) -> Self {
        match outcome {
            Outcome::Allow => Self::Allow,
            Outcome::StepUp => Self::StepUp,
            Outcome::Block => Self::Block,
        }
    }
}

/// One side's rules, indexed by what their action patterns can match, so a
/// judgement looks only at the rules that can match the request's action
/// however many rules the tenant has: exact patterns by the action itself,
/// `prefix.*` patterns by each prefix of the action that ends before a dot,
/// and the lone `*`. The rule set of a tenant with 10,000 rules for other
/// actions costs a request a few hash lookups, not 10,000 pattern matches.
#[derive(Debug, Default)]
pub struct RuleSet {
    rules: Vec<Rule>,
    exact: HashMap<String, Vec<usize>>,
    prefixed: HashMap<String, Vec<usize>>,
    any: Vec<usize>,
}

impl RuleSet {
    pub fn new(rules: Vec<Rule>) -> Self {
        let mut set = Self::default();
        for (index, rule) in rules.iter().enumerate() {
            let pattern = rule.action_pattern.as_str();
            if pattern == "*" {
                set.any.push(index);
            } else if let Some(prefix) = pattern.strip_suffix(".*") {
                set.prefixed
                    .entry(prefix.to_owned())
                    .or_default()
                    .push(index);
            } else {
                set.exact.entry(pattern.to_owned()).or_default().push(index);
            }
        }
        set.rules = rules;
        set
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Every rule whose pattern can match `action` (each once), and only
    /// those: a superset of [`pattern_matches`]' answer, which
    /// [`judge_side`] still applies.
    pub fn candidates<'a>(&'a self, action: &'a str) -> impl Iterator<Item = &'a Rule> + 'a {
        let exact = self.exact.get(action).into_iter().flatten();
        let prefixed = action
            .match_indices('.')
            .filter_map(|(at, _)| self.prefixed.get(&action[..at]))
            .flatten();
        self.any
            .iter()
            .chain(exact)
            .chain(prefixed)
            .filter_map(|&index| self.rules.get(index))
    }
}

/// A rule ready for evaluation.
#[derive(Debug, Clone)]
pub struct Rule {
    pub id: String,
    pub action_pattern: String,
    pub counterpart_tenant_id: Option<String>,
    pub agent_id: Option<String>,
    pub conditions: Vec<Condition>,
    pub time_window: Option<TimeWindow>,
    pub effect: Outcome,
    pub max_ttl_seconds: u32,
    pub priority: i32,
    pub approvals_required: u32,
    pub created_at: Millis,
    pub grants: Grants,
}

impl Rule {
    fn condition_count(&self) -> usize {
        self.conditions.len() + usize::from(self.time_window.is_some())
    }

    /// The documented evaluation order: `Less` means `self` comes first.
    pub fn evaluation_order(&self, other: &Self) -> Ordering {
        other
            .priority
            .cmp(&self.priority)
            .then_with(|| {
                pattern_specificity(&other.action_pattern)
                    .cmp(&pattern_specificity(&self.action_pattern))
            })
            .then_with(|| {
                other
                    .counterpart_tenant_id
                    .is_some()
                    .cmp(&self.counterpart_tenant_id.is_some())
            })
            .then_with(|| other.agent_id.is_some().cmp(&self.agent_id.is_some()))
            .then_with(|| other.condition_count().cmp(&self.condition_count()))
            .then_with(|| other.effect.cmp(&self.effect))
            .then_with(|| self.created_at.cmp(&other.created_at))
            .then_with(|| self.id.cmp(&other.id))
    }
}

/// What is being judged.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    pub requesting_tenant_id: &'a str,
    pub requesting_agent_id: &'a str,
    pub receiving_tenant_id: &'a str,
    pub action: &'a str,
    pub context: &'a BTreeMap<String, Attr>,
    pub requested_ttl_seconds: u32,
    /// The scopes asked for (none: the deciding inbound rule's defaults).
    pub scopes: &'a [String],
    /// The resource asked for; `None` when there is none to grant (no
    /// resource, or a vault operation whose object the action and the
    /// reserved `vg_` attributes already name).
    pub resource: Option<&'a str>,
    /// The request's RFC 9396 authorization details.
    pub authorization_details: &'a [Detail],
}

/// A detail value as a condition compares it: strings, booleans and
/// numbers; against `numeric` operands a decimal string is a number.
fn detail_attr(value: &serde_json::Value, numeric: bool) -> Option<Attr> {
    match value {
        serde_json::Value::Bool(b) => Some(Attr::Bool(*b)),
        serde_json::Value::Number(_) => details::as_number(value).map(Attr::Number),
        serde_json::Value::String(s) => Some(
            details::as_number(value)
                .filter(|_| numeric)
                .map(Attr::Number)
                .unwrap_or_else(|| Attr::String(s.clone())),
        ),
        _ => None,
    }
}

/// How one side judged a request, as recorded with the delegation and in
/// the audit log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SideDecision {
    pub tenant_id: String,
    pub outcome: Outcome,
    #[serde(default)]
    pub rule_id: String,
    pub policy_version: u64,
    pub max_ttl_seconds: u32,
    pub approvals_required: u32,
    pub explanation: String,
    /// Scopes of the request this side's deciding rule does not grant
    /// (inbound) or does not allow its agents (outbound); each makes the
    /// side BLOCK.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scopes_not_granted: Vec<String>,
    /// Whether this side's deciding rule refused the request's resource.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub resource_not_granted: bool,
    /// The scopes this side settled on: for the inbound side the request's,
    /// or its deciding rule's defaults when the request named none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scopes: Vec<String>,
    /// The budget of this side that made it BLOCK, if one did
    /// (`budgets::apply`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub budget_id: String,
}

/// The combined decision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    pub outcome: Outcome,
    pub outbound: SideDecision,
    pub inbound: SideDecision,
    pub max_ttl_seconds: u32,
    pub approvals_required: u32,
    pub evaluated_at: Millis,
    /// The scopes a token of this decision carries: the request's, or the
    /// inbound rule's defaults when it named none, each granted by both
    /// sides. Empty on BLOCK.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scopes: Vec<String>,
    /// The resource a token of this decision carries (granted by both
    /// sides), empty when none. Empty on BLOCK.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub resource: String,
}

pub(crate) fn truncate(mut text: String) -> String {
    if text.chars().count() > MAX_EXPLANATION {
        text = text.chars().take(MAX_EXPLANATION - 1).collect();
        text.push('…');
    }
    text
}

/// Judges one side: `rules` are the tenant's rules of `direction` (or at
/// least every one of them that can match the action: [`RuleSet::candidates`]); `default`
/// is the outcome when none matches. The deciding rule must also grant
/// (inbound) or allow (outbound) the request's scopes and resource, see
/// [`Grants`]; whatever it does not turns the side into BLOCK, naming it.
/// For the outbound side, `request.scopes` should be what the inbound side
/// settled on ([`SideDecision::scopes`]), so defaults are limited too.
pub fn judge_side<'r>(
    tenant_id: &str,
    policy_version: u64,
    direction: Direction,
    rules: impl IntoIterator<Item = &'r Rule>,
    request: &Request<'_>,
    default: Outcome,
    now: Millis,
) -> SideDecision {
    let counterpart = match direction {
        Direction::Inbound => request.requesting_tenant_id,
        Direction::Outbound => request.receiving_tenant_id,
    };
    let winner = rules
        .into_iter()
        .filter(|rule| {
            pattern_matches(&rule.action_pattern, request.action)
                && rule
                    .counterpart_tenant_id
                    .as_deref()
                    .is_none_or(|t| t == counterpart)
                && rule
                    .agent_id
                    .as_deref()
                    .is_none_or(|a| a == request.requesting_agent_id)
                && rule
                    .conditions
                    .iter()
                    .all(|c| c.matches(request, rule.effect))
                && rule.time_window.as_ref().is_none_or(|w| w.contains(now))
        })
        .min_by(|a, b| a.evaluation_order(b));
    match winner {
        Some(rule) => {
            let mut because = Vec::new();
            if !rule.conditions.is_empty() {
                because.extend(rule.conditions.iter().map(|c| c.describe(request)));
            }
            if let Some(w) = &rule.time_window {
                because.push(format!(
                    "UTC time in {:02}:{:02}-{:02}:{:02}",
                    w.start / 60,
                    w.start % 60,
                    w.end / 60,
                    w.end % 60
                ));
            }
            let because = if because.is_empty() {
                String::new()
            } else {
                format!(": {}", because.join(", "))
            };
            let granted = judge_grants(direction, rule, request);
            let refused = !granted.scopes_not_granted.is_empty() || granted.resource_not_granted;
            let outcome = if refused { Outcome::Block } else { rule.effect };
            let explanation = if refused && rule.effect != Outcome::Block {
                format!(
                    "{} rule {} (priority {}, {}) matched{} → {}, but {} → BLOCK",
                    direction.as_str(),
                    rule.id,
                    rule.priority,
                    rule.action_pattern,
                    because,
                    rule.effect.label(),
                    granted.refusal(direction),
                )
            } else {
                format!(
                    "{} rule {} (priority {}, {}) matched{} → {}",
                    direction.as_str(),
                    rule.id,
                    rule.priority,
                    rule.action_pattern,
                    because,
                    rule.effect.label()
                )
            };
            SideDecision {
                tenant_id: tenant_id.to_owned(),
                outcome,
                rule_id: rule.id.clone(),
                policy_version,
                max_ttl_seconds: if outcome == Outcome::Block {
                    0
                } else {
                    rule.max_ttl_seconds
                },
                approvals_required: if outcome == Outcome::StepUp {
                    rule.approvals_required.max(1)
                } else {
                    0
                },
                explanation: truncate(explanation),
                scopes_not_granted: if rule.effect == Outcome::Block {
                    Vec::new()
                } else {
                    granted.scopes_not_granted
                },
                resource_not_granted: rule.effect != Outcome::Block && granted.resource_not_granted,
                scopes: granted.scopes,
                budget_id: String::new(),
            }
        }
        None => SideDecision {
            tenant_id: tenant_id.to_owned(),
            outcome: default,
            rule_id: String::new(),
            policy_version,
            max_ttl_seconds: 0,
            approvals_required: if default == Outcome::StepUp { 1 } else { 0 },
            scopes_not_granted: Vec::new(),
            resource_not_granted: false,
            scopes: request.scopes.to_vec(),
            budget_id: String::new(),
            explanation: match direction {
                Direction::Inbound => {
                    "no inbound rule matched → BLOCK (inbound default)".to_owned()
                }
                Direction::Outbound => format!(
                    "no outbound rule matched → {} (outbound default)",
                    default.label()
                ),
            },
        },
    }
}

/// What a deciding rule made of a request's scopes and resource.
struct Granted {
    scopes: Vec<String>,
    scopes_not_granted: Vec<String>,
    resource_not_granted: bool,
}

impl Granted {
    fn refusal(&self, direction: Direction) -> String {
        let verb = match direction {
            Direction::Inbound => "grant",
            Direction::Outbound => "allow",
        };
        let mut parts = Vec::new();
        if !self.scopes_not_granted.is_empty() {
            let quoted: Vec<String> = self
                .scopes_not_granted
                .iter()
                .map(|s| format!("{s:?}"))
                .collect();
            let noun = if quoted.len() == 1 { "scope" } else { "scopes" };
            parts.push(format!("it does not {verb} {noun} {}", quoted.join(", ")));
        }
        if self.resource_not_granted {
            parts.push(format!("it does not {verb} the resource"));
        }
        parts.join(" and ")
    }
}

fn judge_grants(direction: Direction, rule: &Rule, request: &Request<'_>) -> Granted {
    let grants = &rule.grants;
    match direction {
        Direction::Inbound => {
            let scopes = if request.scopes.is_empty() {
                grants.default_scopes.clone()
            } else {
                request.scopes.to_vec()
            };
            Granted {
                scopes_not_granted: scopes
                    .iter()
                    .filter(|s| !grants.grants_scope(s))
                    .cloned()
                    .collect(),
                resource_not_granted: request
                    .resource
                    .is_some_and(|r| !r.is_empty() && !grants.grants_resource(r)),
                scopes,
            }
        }
        Direction::Outbound => Granted {
            scopes_not_granted: if grants.scopes.is_empty() {
                Vec::new()
            } else {
                request
                    .scopes
                    .iter()
                    .filter(|s| !grants.grants_scope(s))
                    .cloned()
                    .collect()
            },
            resource_not_granted: !grants.resources.is_empty()
                && request
                    .resource
                    .is_some_and(|r| !r.is_empty() && !grants.grants_resource(r)),
            scopes: request.scopes.to_vec(),
        },
    }
}

/// Combines both sides: the stricter outcome wins; the lifetime is the
/// smallest of the request, each side's non-zero cap and the server cap.
pub fn combine(
    outbound: SideDecision,
    inbound: SideDecision,
    resource: Option<&str>,
    requested_ttl_seconds: u32,
    server_cap_seconds: u32,
    now: Millis,
) -> Decision {
    let outcome = outbound.outcome.max(inbound.outcome);
    let max_ttl_seconds = if outcome == Outcome::Block {
        0
    } else {
        [
            requested_ttl_seconds,
            outbound.max_ttl_seconds,
            inbound.max_ttl_seconds,
            server_cap_seconds,
        ]
        .into_iter()
        .filter(|t| *t > 0)
        .min()
        .unwrap_or(server_cap_seconds)
    };
    let approvals_required = if outcome == Outcome::StepUp {
        outbound
            .approvals_required
            .max(inbound.approvals_required)
            .max(1)
    } else {
        0
    };
    let (scopes, resource) = if outcome == Outcome::Block {
        (Vec::new(), String::new())
    } else {
        (
            inbound.scopes.clone(),
            resource.unwrap_or_default().to_owned(),
        )
    };
    Decision {
        outcome,
        outbound,
        inbound,
        max_ttl_seconds,
        approvals_required,
        evaluated_at: now,
        scopes,
        resource,
    }
}

impl Decision {
    /// The side that decided a BLOCK (outbound first), for error metadata.
    pub fn blocking_side(&self) -> Option<(Direction, &SideDecision)> {
        if self.outbound.outcome == Outcome::Block {
            Some((Direction::Outbound, &self.outbound))
        } else if self.inbound.outcome == Outcome::Block {
            Some((Direction::Inbound, &self.inbound))
        } else {
            None
        }
    }

    /// The decision as `viewer_tenant` may see it: of a side owned by
    /// another tenant only the outcome and what it refused of the request
    /// remain; its rule id, policy version, lifetime cap and explanation
    /// are that tenant's business and are replaced by a generic text.
    pub fn redacted_for(&self, viewer_tenant: &str) -> Self {
        fn redact(side: &mut SideDecision, text: &str) {
            side.explanation = text.to_owned();
            side.rule_id = String::new();
            side.policy_version = 0;
            side.max_ttl_seconds = 0;
            side.budget_id = String::new();
        }
        let mut out = self.clone();
        if out.outbound.tenant_id != viewer_tenant {
            redact(
                &mut out.outbound,
                "decided by the requesting tenant's policy",
            );
        }
        if out.inbound.tenant_id != viewer_tenant {
            redact(&mut out.inbound, "decided by the receiving tenant's policy");
        }
        out
    }

    /// Whether a BLOCK came from scopes or a resource the deciding rules did
    /// not grant (rather than from an effect).
    pub fn refused_grant(&self) -> Option<(Direction, &SideDecision)> {
        self.blocking_side()
            .filter(|(_, side)| !side.scopes_not_granted.is_empty() || side.resource_not_granted)
    }

    pub fn to_proto(&self) -> pb::PolicyDecision {
        let side = |s: &SideDecision| pb::SideDecision {
            tenant_id: s.tenant_id.clone(),
            outcome: s.outcome.to_decision() as i32,
            rule_id: s.rule_id.clone(),
            policy_version: s.policy_version,
            max_ttl_seconds: s.max_ttl_seconds,
            explanation: s.explanation.clone(),
            scopes_not_granted: s.scopes_not_granted.clone(),
            resource_not_granted: s.resource_not_granted,
        };
        pb::PolicyDecision {
            outcome: self.outcome.to_decision() as i32,
            outbound: Some(side(&self.outbound)),
            inbound: Some(side(&self.inbound)),
            max_ttl_seconds: self.max_ttl_seconds,
            approvals_required: self.approvals_required,
            evaluate_time: Some(crate::clock::to_timestamp(self.evaluated_at)),
            scopes: self.scopes.clone(),
            resource: self.resource.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(id: &str, pattern: &str, effect: Outcome) -> Rule {
        Rule {
            id: id.to_owned(),
            action_pattern: pattern.to_owned(),
            counterpart_tenant_id: None,
            agent_id: None,
            conditions: Vec::new(),
            time_window: None,
            effect,
            max_ttl_seconds: 0,
            priority: 0,
            approvals_required: 0,
            created_at: 0,
            grants: Grants::default(),
        }
    }

    fn judge(rules: &[Rule], action: &str, context: &BTreeMap<String, Attr>) -> SideDecision {
        let request = Request {
            requesting_tenant_id: "tnt_a",
            requesting_agent_id: "agt_1",
            receiving_tenant_id: "tnt_b",
            action,
            context,
            requested_ttl_seconds: 600,
            scopes: &[],
            resource: None,
            authorization_details: &[],
        };
        judge_side(
            "tnt_b",
            3,
            Direction::Inbound,
            rules,
            &request,
            Outcome::Block,
            0,
        )
    }

    #[test]
    fn action_grammar() {
        for good in [
            "stock.write",
            "sign:treasury",
            "exchange:github",
            "a-b_c.d:e",
        ] {
            assert!(check_action("action", good).is_ok(), "{good}");
            assert!(check_pattern("p", good).is_ok(), "{good}");
        }
        for good in ["*", "stock.*", "stock.trade.*"] {
            assert!(check_pattern("p", good).is_ok(), "{good}");
            assert!(check_action("action", good).is_err(), "{good}");
        }
        let long = "a".repeat(129);
        for bad in [
            "",
            "Stock",
            "a..b",
            ".a",
            "a.",
            "stock.wr*",
            "sign:*",
            "*.a",
            "a.*.b",
            "a b",
            &long,
        ] {
            assert!(check_pattern("p", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn wildcards_match_whole_segments() {
        assert!(pattern_matches("stock.*", "stock.write"));
        assert!(pattern_matches("stock.*", "stock.write.bulk"));
        assert!(!pattern_matches("stock.*", "stock"));
        assert!(!pattern_matches("stock.*", "stockpile.write"));
        assert!(pattern_matches("*", "anything.at.all"));
        assert!(pattern_matches("stock.write", "stock.write"));
        assert!(!pattern_matches("stock.write", "stock.write.bulk"));
    }

    #[test]
    fn order_is_priority_then_specificity_then_severity() {
        let ctx = BTreeMap::new();
        let mut wildcard = rule("rul_1", "*", Outcome::Allow);
        wildcard.priority = 5;
        let exact = rule("rul_2", "stock.write", Outcome::Block);
        assert_eq!(
            judge(&[exact.clone(), wildcard.clone()], "stock.write", &ctx).rule_id,
            "rul_1"
        );
        wildcard.priority = 0;
        assert_eq!(
            judge(&[exact, wildcard], "stock.write", &ctx).rule_id,
            "rul_2"
        );

        let longer = rule("rul_3", "stock.trade.*", Outcome::Allow);
        let shorter = rule("rul_4", "stock.*", Outcome::Block);
        assert_eq!(
            judge(&[shorter, longer], "stock.trade.buy", &ctx).rule_id,
            "rul_3"
        );

        let allow = rule("rul_5", "stock.*", Outcome::Allow);
        let step = rule("rul_6", "stock.*", Outcome::StepUp);
        let block = rule("rul_7", "stock.*", Outcome::Block);
        let side = judge(&[allow.clone(), step.clone(), block], "stock.x", &ctx);
        assert_eq!(
            (side.rule_id.as_str(), side.outcome),
            ("rul_7", Outcome::Block)
        );
        let side = judge(&[allow, step], "stock.x", &ctx);
        assert_eq!(
            (side.outcome, side.approvals_required),
            (Outcome::StepUp, 1)
        );

        let mut for_agent = rule("rul_8", "stock.*", Outcome::Allow);
        for_agent.agent_id = Some("agt_1".to_owned());
        let mut for_other = rule("rul_9", "stock.*", Outcome::Allow);
        for_other.agent_id = Some("agt_2".to_owned());
        let any = rule("rul_a", "stock.*", Outcome::Block);
        assert_eq!(
            judge(
                &[any.clone(), for_agent, for_other.clone()],
                "stock.x",
                &ctx
            )
            .rule_id,
            "rul_8"
        );
        assert_eq!(judge(&[any, for_other], "stock.x", &ctx).rule_id, "rul_a");
    }

    #[test]
    fn no_match_uses_the_default() {
        let side = judge(
            &[rule("rul_1", "other.*", Outcome::Allow)],
            "stock.write",
            &BTreeMap::new(),
        );
        assert_eq!(side.outcome, Outcome::Block);
        assert!(side.rule_id.is_empty());
    }

    #[test]
    fn conditions_compare_typed_values() {
        let gt = |n: f64| Condition {
            attribute: "amount".to_owned(),
            op: Op::Gt,
            value: Some(Attr::Number(n)),
            values: Vec::new(),
            detail_type: String::new(),
            detail_path: Vec::new(),
        };
        let ctx = |v: Attr| BTreeMap::from([("amount".to_owned(), v)]);
        assert!(gt(1000.0).holds(&ctx(Attr::Number(1200.0))));
        assert!(!gt(1000.0).holds(&ctx(Attr::Number(1000.0))));
        assert!(!gt(1000.0).holds(&ctx(Attr::String("2000".into()))));
        assert!(!gt(1000.0).holds(&BTreeMap::new()));
        let not_in = Condition {
            attribute: "amount".to_owned(),
            op: Op::NotIn,
            value: None,
            values: vec![Attr::String("EUR".into())],
            detail_type: String::new(),
            detail_path: Vec::new(),
        };
        assert!(not_in.holds(&ctx(Attr::String("USD".into()))));
        assert!(!not_in.holds(&ctx(Attr::String("EUR".into()))));
        assert!(!not_in.holds(&BTreeMap::new()));
        let ne = Condition {
            attribute: "amount".to_owned(),
            op: Op::Ne,
            value: Some(Attr::Bool(true)),
            values: Vec::new(),
            detail_type: String::new(),
            detail_path: Vec::new(),
        };
        assert!(ne.holds(&ctx(Attr::Bool(false))));
        assert!(!ne.holds(&ctx(Attr::Number(1.0))));
    }

    #[test]
    fn time_windows_wrap_and_respect_days() {
        // 1970-01-05 was a Monday.
        let monday = 4 * 86_400_000;
        let at = |day: i64, minute: i64| monday + day * 86_400_000 + minute * 60_000;
        let office = TimeWindow {
            start: 9 * 60,
            end: 17 * 60,
            days: vec![1, 2, 3, 4, 5],
        };
        assert!(office.contains(at(0, 10 * 60)));
        assert!(!office.contains(at(0, 17 * 60)));
        assert!(!office.contains(at(5, 10 * 60)));
        let night = TimeWindow {
            start: 22 * 60,
            end: 2 * 60,
            days: vec![5],
        };
        assert!(night.contains(at(4, 23 * 60)));
        assert!(
            night.contains(at(5, 60)),
            "Friday's window runs into Saturday"
        );
        assert!(
            !night.contains(at(4, 60)),
            "Friday 01:00 belongs to Thursday's window"
        );
    }

    #[test]
    fn combine_takes_the_stricter_side_and_the_smallest_ttl() {
        let side = |outcome, ttl, approvals| SideDecision {
            tenant_id: "t".into(),
            outcome,
            rule_id: String::new(),
            policy_version: 1,
            max_ttl_seconds: ttl,
            approvals_required: approvals,
            explanation: String::new(),
            scopes_not_granted: Vec::new(),
            resource_not_granted: false,
            scopes: Vec::new(),
            budget_id: String::new(),
        };
        let d = combine(
            side(Outcome::Allow, 300, 0),
            side(Outcome::StepUp, 0, 2),
            None,
            600,
            86_400,
            0,
        );
        assert_eq!(
            (d.outcome, d.max_ttl_seconds, d.approvals_required),
            (Outcome::StepUp, 300, 2)
        );
        let d = combine(
            side(Outcome::Block, 300, 0),
            side(Outcome::Allow, 0, 0),
            None,
            600,
            86_400,
            0,
        );
        assert_eq!((d.outcome, d.max_ttl_seconds), (Outcome::Block, 0));
        assert_eq!(
            d.blocking_side().map(|(dir, _)| dir),
            Some(Direction::Outbound)
        );
        let d = combine(
            side(Outcome::Allow, 0, 0),
            side(Outcome::Allow, 0, 0),
            None,
            90_000,
            3_600,
            0,
        );
        assert_eq!(d.max_ttl_seconds, 3_600);
    }

    fn granting(pattern: &str, scopes: &[&str], defaults: &[&str], resources: &[&str]) -> Rule {
        let strings = |xs: &[&str]| xs.iter().map(|x| (*x).to_owned()).collect::<Vec<_>>();
        Rule {
            grants: Grants {
                scopes: strings(scopes),
                default_scopes: strings(defaults),
                resources: strings(resources),
            },
            ..rule("rul_g", pattern, Outcome::Allow)
        }
    }

    fn judge_with(
        direction: Direction,
        rules: &[Rule],
        scopes: &[&str],
        resource: Option<&str>,
    ) -> SideDecision {
        let scopes: Vec<String> = scopes.iter().map(|s| (*s).to_owned()).collect();
        let context = BTreeMap::new();
        let request = Request {
            requesting_tenant_id: "tnt_a",
            requesting_agent_id: "agt_1",
            receiving_tenant_id: "tnt_b",
            action: "crm.read",
            context: &context,
            requested_ttl_seconds: 600,
            scopes: &scopes,
            resource,
            authorization_details: &[],
        };
        let default = match direction {
            Direction::Inbound => Outcome::Block,
            Direction::Outbound => Outcome::Allow,
        };
        judge_side("tnt_b", 3, direction, rules, &request, default, 0)
    }

    #[test]
    fn scope_patterns_match_whole_segments() {
        for good in [
            "read",
            "contacts:*",
            "mail.*",
            "https://api.example.com/auth/*",
            "*",
        ] {
            assert!(check_scope_pattern("p", good).is_ok(), "{good}");
        }
        for bad in [
            "",
            ":*",
            "read*",
            "a*b",
            "*:*",
            "has space",
            "quote\"",
            "x".repeat(129).as_str(),
        ] {
            assert!(check_scope_pattern("p", bad).is_err(), "{bad:?}");
        }
        assert!(scope_matches("contacts:*", "contacts:read"));
        assert!(scope_matches("contacts:*", "contacts:write.all"));
        assert!(!scope_matches("contacts:*", "contacts:"));
        assert!(!scope_matches("contacts:*", "contacts"));
        assert!(!scope_matches("contacts:*", "contactsx:read"));
        assert!(scope_matches("mail.*", "mail.send"));
        assert!(scope_matches("*", "admin"));
        assert!(scope_matches("admin", "admin"));
        assert!(!scope_matches("admin", "admin:all"));
        assert!(resource_matches(
            "https://a.example/orders/*",
            "https://a.example/orders/7"
        ));
        assert!(!resource_matches(
            "https://a.example/orders/*",
            "https://a.example/orders/"
        ));
        assert!(!resource_matches(
            "https://a.example/orders/*",
            "https://a.example/order"
        ));
        assert!(resource_matches("*", "anything"));
        assert!(check_resource_pattern("r", "a*b").is_err());
        assert!(check_resource_pattern("r", "line\nbreak").is_err());
    }

    #[test]
    fn an_inbound_rule_grants_only_what_it_names() {
        let silent = granting("crm.*", &[], &[], &[]);
        let side = judge_with(
            Direction::Inbound,
            std::slice::from_ref(&silent),
            &["admin", "contacts:write"],
            None,
        );
        assert_eq!(side.outcome, Outcome::Block);
        assert_eq!(side.scopes_not_granted, vec!["admin", "contacts:write"]);
        assert!(
            side.explanation
                .contains("does not grant scopes \"admin\", \"contacts:write\""),
            "{}",
            side.explanation
        );
        let side = judge_with(
            Direction::Inbound,
            std::slice::from_ref(&silent),
            &[],
            Some("https://x"),
        );
        assert_eq!(
            (side.outcome, side.resource_not_granted),
            (Outcome::Block, true)
        );
        // Naming nothing asks for nothing, which needs no grant.
        assert_eq!(
            judge_with(Direction::Inbound, &[silent], &[], None).outcome,
            Outcome::Allow
        );

        let rule = granting(
            "crm.*",
            &["contacts:*", "profile"],
            &["profile"],
            &["https://crm.example/*"],
        );
        let side = judge_with(
            Direction::Inbound,
            std::slice::from_ref(&rule),
            &["contacts:read"],
            Some("https://crm.example/people"),
        );
        assert_eq!(
            (side.outcome, side.scopes.clone()),
            (Outcome::Allow, vec!["contacts:read".to_owned()])
        );
        let side = judge_with(Direction::Inbound, std::slice::from_ref(&rule), &[], None);
        assert_eq!(
            side.scopes,
            vec!["profile"],
            "defaults fill a request naming none"
        );
        let side = judge_with(
            Direction::Inbound,
            std::slice::from_ref(&rule),
            &["contacts:read", "admin"],
            None,
        );
        assert_eq!(
            (side.outcome, side.scopes_not_granted.clone()),
            (Outcome::Block, vec!["admin".to_owned()])
        );
        let side = judge_with(
            Direction::Inbound,
            &[rule],
            &[],
            Some("https://other.example/"),
        );
        assert!(side.resource_not_granted);

        // A BLOCK rule refuses by its effect, not by its grants.
        let block = Rule {
            effect: Outcome::Block,
            ..granting("crm.*", &[], &[], &[])
        };
        let side = judge_with(Direction::Inbound, &[block], &["admin"], None);
        assert_eq!(side.outcome, Outcome::Block);
        assert!(side.scopes_not_granted.is_empty());
    }

    #[test]
    fn an_outbound_rule_limits_only_when_it_names_scopes() {
        let open = granting("crm.*", &[], &[], &[]);
        assert_eq!(
            judge_with(Direction::Outbound, &[open], &["admin"], Some("r")).outcome,
            Outcome::Allow
        );
        let limited = granting("crm.*", &["contacts:read"], &[], &["https://crm.example/*"]);
        let side = judge_with(
            Direction::Outbound,
            std::slice::from_ref(&limited),
            &["contacts:read", "admin"],
            None,
        );
        assert_eq!(
            (side.outcome, side.scopes_not_granted.clone()),
            (Outcome::Block, vec!["admin".to_owned()])
        );
        assert!(
            side.explanation.contains("does not allow scope \"admin\""),
            "{}",
            side.explanation
        );
        let side = judge_with(
            Direction::Outbound,
            &[limited],
            &[],
            Some("https://elsewhere/"),
        );
        assert!(side.resource_not_granted);
        // No outbound rule: the default limits nothing.
        assert_eq!(
            judge_with(Direction::Outbound, &[], &["admin"], Some("r")).outcome,
            Outcome::Allow
        );
    }

    #[test]
    fn a_decision_shown_to_the_counterpart_names_none_of_its_rules() {
        let side = |tenant: &str| SideDecision {
            tenant_id: tenant.into(),
            outcome: Outcome::Block,
            rule_id: format!("rul_{tenant}"),
            policy_version: 7,
            max_ttl_seconds: 300,
            approvals_required: 0,
            explanation: format!("secret terms of {tenant}"),
            scopes_not_granted: vec!["admin".into()],
            resource_not_granted: false,
            scopes: Vec::new(),
            budget_id: String::new(),
        };
        let decision = combine(side("tnt_a"), side("tnt_b"), None, 600, 86_400, 0);
        let seen = decision.redacted_for("tnt_a");
        assert_eq!(seen.outbound.rule_id, "rul_tnt_a");
        assert_eq!(
            (
                seen.inbound.rule_id.as_str(),
                seen.inbound.policy_version,
                seen.inbound.max_ttl_seconds
            ),
            ("", 0, 0)
        );
        assert!(!seen.inbound.explanation.contains("secret"));
        assert_eq!(
            seen.inbound.scopes_not_granted,
            vec!["admin"],
            "the request's own scopes stay"
        );
        let seen = decision.redacted_for("tnt_b");
        assert_eq!(
            (
                seen.outbound.rule_id.as_str(),
                seen.inbound.rule_id.as_str()
            ),
            ("", "rul_tnt_b")
        );
    }
}

/// Property tests of the action grammar, matching, specificity, rule order
/// and conditions (see `crate::props` for case counts).
#[cfg(test)]
mod props {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;
    use crate::props::{PURE_CASES, config};

    fn segment() -> impl Strategy<Value = String> {
        "[a-z0-9_:-]{1,6}".prop_map(String::from)
    }

    fn action() -> impl Strategy<Value = String> {
        prop::collection::vec(segment(), 1..5).prop_map(|segments| segments.join("."))
    }

    /// Strings over the grammar's alphabet plus the characters that must be
    /// refused, so that near misses are common.
    fn grammar_noise() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z0-9_:.*-]{0,24}".prop_map(String::from),
            "[a-zA-Z0-9_:.* \u{e9}\u{130}-]{0,24}".prop_map(String::from),
            any::<String>(),
        ]
    }

    fn attr() -> impl Strategy<Value = Attr> {
        prop_oneof![
            "[a-z]{0,3}".prop_map(Attr::String),
            any::<String>().prop_map(Attr::String),
            (-5i32..5).prop_map(|n| Attr::Number(f64::from(n))),
            any::<f64>().prop_map(Attr::Number),
            any::<bool>().prop_map(Attr::Bool),
        ]
    }

    /// A value a request may carry: finite numbers (non-finite ones are
    /// refused by `check_value`).
    fn valid_attr() -> impl Strategy<Value = Attr> {
        prop_oneof![
            "[a-z]{0,3}".prop_map(Attr::String),
            (-5i32..5).prop_map(|n| Attr::Number(f64::from(n))),
            any::<f64>()
                .prop_filter("finite", |n| n.is_finite())
                .prop_map(Attr::Number),
            any::<bool>().prop_map(Attr::Bool),
        ]
    }

    fn op() -> impl Strategy<Value = Op> {
        prop::sample::select(vec![
            Op::Eq,
            Op::Ne,
            Op::Lt,
            Op::Lte,
            Op::Gt,
            Op::Gte,
            Op::In,
            Op::NotIn,
            Op::Exists,
        ])
    }

    fn condition(op: Op, value: Option<Attr>, values: Vec<Attr>) -> Condition {
        Condition {
            attribute: "x".to_owned(),
            op,
            value,
            values,
            detail_type: String::new(),
            detail_path: Vec::new(),
        }
    }

    fn context(value: Option<Attr>) -> BTreeMap<String, Attr> {
        value
            .map(|v| BTreeMap::from([("x".to_owned(), v)]))
            .unwrap_or_default()
    }

    fn proto_value() -> impl Strategy<Value = pb::AttributeValue> {
        use pb::attribute_value::Kind;
        prop_oneof![
            Just(pb::AttributeValue { kind: None }),
            any::<String>().prop_map(|s| pb::AttributeValue {
                kind: Some(Kind::StringValue(s))
            }),
            ".{250,260}".prop_map(|s| pb::AttributeValue {
                kind: Some(Kind::StringValue(s))
            }),
            any::<f64>().prop_map(|n| pb::AttributeValue {
                kind: Some(Kind::NumberValue(n))
            }),
            any::<bool>().prop_map(|b| pb::AttributeValue {
                kind: Some(Kind::BoolValue(b))
            }),
        ]
    }

    fn proto_condition() -> impl Strategy<Value = pb::Condition> {
        (
            prop_oneof![
                "[a-z][a-z0-9_]{0,5}".prop_map(String::from),
                any::<String>()
            ],
            prop_oneof![0i32..=10, any::<i32>()],
            prop::option::of(proto_value()),
            prop::collection::vec(proto_value(), 0..4),
        )
            .prop_map(|(attribute, operator, value, values)| pb::Condition {
                attribute,
                operator,
                value,
                values,
                ..Default::default()
            })
    }

    fn rule_with(pattern: &str) -> Rule {
        Rule {
            id: "rul_p".to_owned(),
            action_pattern: pattern.to_owned(),
            counterpart_tenant_id: None,
            agent_id: None,
            conditions: Vec::new(),
            time_window: None,
            effect: Outcome::Allow,
            max_ttl_seconds: 0,
            priority: 0,
            approvals_required: 0,
            created_at: 0,
            grants: Grants::default(),
        }
    }

    fn rule_strategy() -> impl Strategy<Value = Rule> {
        (
            prop_oneof![
                Just("*".to_owned()),
                action(),
                action().prop_map(|a| format!("{a}.*"))
            ],
            prop::option::of(Just("tnt_a".to_owned())),
            prop::option::of(Just("agt_1".to_owned())),
            0usize..3,
            any::<bool>(),
            prop::sample::select(vec![Outcome::Allow, Outcome::StepUp, Outcome::Block]),
            -2i32..3,
            0i64..3,
            "rul_[0-9]",
        )
            .prop_map(
                |(
                    pattern,
                    counterpart,
                    agent,
                    conditions,
                    window,
                    effect,
                    priority,
                    created,
                    id,
                )| {
                    Rule {
                        id,
                        action_pattern: pattern,
                        counterpart_tenant_id: counterpart,
                        agent_id: agent,
                        conditions: vec![condition(Op::Exists, None, Vec::new()); conditions],
                        time_window: window.then(|| TimeWindow {
                            start: 0,
                            end: 1440,
                            days: Vec::new(),
                        }),
                        effect,
                        max_ttl_seconds: 0,
                        priority,
                        approvals_required: 0,
                        created_at: created,
                        grants: Grants::default(),
                    }
                },
            )
    }

    /// Found by `proto_conditions_never_panic_and_round_trip`: without
    /// serde_json's `float_roundtrip`, a condition stored as JSON read back a
    /// neighbouring number (`-6.904118035380247e202` became `…246e202`), so
    /// the rule judged against another threshold than the one its admin set.
    #[test]
    fn stored_condition_numbers_read_back_exactly() {
        for n in [
            -6.904118035380247e202,
            -6.904118035380246e202,
            -3.891787313208329e246,
            -3.8917873132083295e246,
            0.1 + 0.2,
        ] {
            let c = condition(Op::In, None, vec![Attr::Number(n)]);
            let stored = serde_json::to_string(&c).unwrap();
            assert_eq!(serde_json::from_str::<Condition>(&stored).unwrap(), c);
        }
    }

    proptest! {
        #![proptest_config(config(PURE_CASES))]

        #[test]
        fn action_checks_never_panic_and_actions_are_patterns(s in grammar_noise()) {
            let action_ok = check_action("action", &s).is_ok();
            let pattern_ok = check_pattern("p", &s).is_ok();
            if action_ok {
                prop_assert!(pattern_ok, "an action must also be a valid pattern");
                prop_assert!(!s.contains('*'));
            }
            if pattern_ok {
                prop_assert!(s.len() <= MAX_ACTION_LEN && !s.is_empty());
                prop_assert!(s.is_ascii());
                // Matching and ordering never panic on any accepted pattern.
                let _ = pattern_matches(&s, "a.b");
                let _ = pattern_specificity(&s);
            }
        }

        #[test]
        fn generated_patterns_are_accepted_and_round_trip(a in action()) {
            prop_assume!(a.len() + 2 <= MAX_ACTION_LEN);
            prop_assert!(check_action("action", &a).is_ok());
            for pattern in [a.clone(), format!("{a}.*"), "*".to_owned()] {
                prop_assert!(check_pattern("p", &pattern).is_ok(), "{pattern}");
                // The parsed form (prefix, wildcard) renders back to the same text.
                let rendered = match pattern.strip_suffix(".*") {
                    _ if pattern == "*" => "*".to_owned(),
                    Some(prefix) => format!("{}.*", prefix.split('.').collect::<Vec<_>>().join(".")),
                    None => pattern.split('.').collect::<Vec<_>>().join("."),
                };
                prop_assert_eq!(&rendered, &pattern);
                // A rule stored as JSON keeps its pattern byte for byte.
                let stored = serde_json::to_string(&pattern).unwrap();
                prop_assert_eq!(serde_json::from_str::<String>(&stored).unwrap(), pattern);
            }
        }

        #[test]
        fn star_matches_every_action(a in action()) {
            prop_assert!(pattern_matches("*", &a));
        }

        #[test]
        fn an_exact_pattern_matches_only_itself(p in action(), a in action()) {
            prop_assert_eq!(pattern_matches(&p, &a), p == a);
            prop_assert!(pattern_matches(&p, &p));
        }

        #[test]
        fn a_prefix_wildcard_matches_exactly_the_actions_below_it(
            prefix in action(),
            a in action(),
            below in action(),
        ) {
            let pattern = format!("{prefix}.*");
            let expected = a.starts_with(&format!("{prefix}."));
            prop_assert_eq!(pattern_matches(&pattern, &a), expected);
            let below_prefix = format!("{prefix}.{below}");
            prop_assert!(pattern_matches(&pattern, &below_prefix));
            prop_assert!(!pattern_matches(&pattern, &prefix), "the prefix itself is not below it");
        }

        #[test]
        fn specificity_follows_inclusion(a in action()) {
            // Every pattern matching `a`: `*`, each proper prefix + `.*`, `a` itself.
            let segments: Vec<&str> = a.split('.').collect();
            let mut chain = vec!["*".to_owned()];
            for n in 1..segments.len() {
                chain.push(format!("{}.*", segments[..n].join(".")));
            }
            chain.push(a.clone());
            for p in &chain {
                prop_assert!(pattern_matches(p, &a), "{p} should match {a}");
            }
            // Each pattern's matches include the next one's: specificity strictly grows.
            for pair in chain.windows(2) {
                prop_assert!(
                    pattern_specificity(&pair[0]) < pattern_specificity(&pair[1]),
                    "{} vs {}", pair[0], pair[1]
                );
            }
        }

        /// The index by action answers as the whole list does: the same
        /// deciding rule and decision, for rules whose patterns match the
        /// action (drawn from its own prefixes) and rules that do not.
        #[test]
        fn a_rule_set_judges_as_the_whole_list_does(
            a in action(),
            unrelated in prop::collection::vec(rule_strategy(), 0..8),
            related in prop::collection::vec((0usize..8, rule_strategy()), 0..8),
        ) {
            let segments: Vec<&str> = a.split('.').collect();
            let mut chain = vec!["*".to_owned(), a.clone(), format!("{a}.*")];
            for n in 1..segments.len() {
                chain.push(format!("{}.*", segments[..n].join(".")));
            }
            let mut rules = unrelated;
            for (pick, rule) in related {
                rules.push(Rule { action_pattern: chain[pick % chain.len()].clone(), ..rule });
            }
            let set = RuleSet::new(rules.clone());
            prop_assert_eq!(set.len(), rules.len());
            let candidates: Vec<&Rule> = set.candidates(&a).collect();
            let mut ids: Vec<*const Rule> = candidates.iter().map(|r| *r as *const Rule).collect();
            ids.sort();
            ids.dedup();
            prop_assert_eq!(ids.len(), candidates.len(), "a rule offered twice");
            for rule in &rules {
                if pattern_matches(&rule.action_pattern, &a) {
                    prop_assert!(
                        candidates.iter().any(|c| c.action_pattern == rule.action_pattern),
                        "{} matches {} but is not a candidate", rule.action_pattern, a
                    );
                }
            }
            let context = BTreeMap::new();
            let request = Request {
                requesting_tenant_id: "tnt_a",
                requesting_agent_id: "agt_1",
                receiving_tenant_id: "tnt_b",
                action: &a,
                context: &context,
                requested_ttl_seconds: 600,
                scopes: &[],
                resource: None,
                authorization_details: &[],
            };
            for direction in [Direction::Inbound, Direction::Outbound] {
                let whole = judge_side("tnt_b", 1, direction, &rules, &request, Outcome::Block, 0);
                let indexed = judge_side("tnt_b", 1, direction, set.candidates(&a), &request, Outcome::Block, 0);
                prop_assert_eq!(format!("{whole:?}"), format!("{indexed:?}"));
            }
        }

        #[test]
        fn evaluation_order_is_a_total_order(
            r1 in rule_strategy(),
            r2 in rule_strategy(),
            r3 in rule_strategy(),
        ) {
            prop_assert_eq!(r1.evaluation_order(&r2), r2.evaluation_order(&r1).reverse());
            prop_assert_eq!(r1.evaluation_order(&r1), Ordering::Equal);
            if r1.evaluation_order(&r2) != Ordering::Greater
                && r2.evaluation_order(&r3) != Ordering::Greater
            {
                prop_assert!(r1.evaluation_order(&r3) != Ordering::Greater);
            }
            if r1.priority == r2.priority
                && pattern_specificity(&r1.action_pattern) > pattern_specificity(&r2.action_pattern)
            {
                prop_assert_eq!(r1.evaluation_order(&r2), Ordering::Less);
            }
        }

        #[test]
        fn the_winner_is_the_first_matching_rule_in_order(
            rules in prop::collection::vec(rule_strategy(), 0..6),
            a in action(),
        ) {
            let ctx = BTreeMap::from([("x".to_owned(), Attr::Bool(true))]);
            let request = Request {
                requesting_tenant_id: "tnt_a",
                requesting_agent_id: "agt_1",
                receiving_tenant_id: "tnt_b",
                action: &a,
                context: &ctx,
                requested_ttl_seconds: 60,
                scopes: &[],
                resource: None,
                authorization_details: &[],
            };
            let side = judge_side("tnt_b", 1, Direction::Inbound, &rules, &request, Outcome::Block, 0);
            let mut matching: Vec<&Rule> = rules
                .iter()
                .filter(|r| pattern_matches(&r.action_pattern, &a))
                .collect();
            matching.sort_by(|x, y| x.evaluation_order(y));
            match matching.first() {
                Some(first) => {
                    prop_assert_eq!(&side.rule_id, &first.id);
                    prop_assert_eq!(side.outcome, first.effect);
                }
                None => {
                    prop_assert!(side.rule_id.is_empty());
                    prop_assert_eq!(side.outcome, Outcome::Block);
                }
            }
        }

        #[test]
        fn conditions_never_panic(
            op in op(),
            value in prop::option::of(attr()),
            values in prop::collection::vec(attr(), 0..4),
            actual in prop::option::of(attr()),
        ) {
            let c = condition(op, value, values);
            let ctx = context(actual);
            let _ = c.holds(&ctx);
            let request = Request {
                requesting_tenant_id: "tnt_a",
                requesting_agent_id: "agt_1",
                receiving_tenant_id: "tnt_b",
                action: "x",
                context: &ctx,
                requested_ttl_seconds: 1,
                scopes: &[],
                resource: None,
                authorization_details: &[],
            };
            let _ = c.describe(&request);
        }

        #[test]
        fn an_absent_attribute_makes_every_condition_false(
            op in op(),
            value in prop::option::of(attr()),
            values in prop::collection::vec(attr(), 0..4),
            other in attr(),
        ) {
            let c = condition(op, value, values);
            prop_assert!(!c.holds(&BTreeMap::new()));
            let elsewhere = BTreeMap::from([("y".to_owned(), other)]);
            prop_assert!(!c.holds(&elsewhere));
        }

        #[test]
        fn comparison_laws(expected in valid_attr(), actual in valid_attr()) {
            let ctx = context(Some(actual.clone()));
            let holds = |op, value: Option<Attr>, values: Vec<Attr>| condition(op, value, values).holds(&ctx);
            let eq = holds(Op::Eq, Some(expected.clone()), Vec::new());
            let ne = holds(Op::Ne, Some(expected.clone()), Vec::new());
            let same_type = expected.same_type(&actual);
            // NOT(EQ) == NE wherever a comparison is defined (same type);
            // a type mismatch makes both false.
            prop_assert_eq!(ne, same_type && !eq);
            prop_assert_eq!(eq, same_type && expected == actual);
            // IN of a singleton is EQ; NOT_IN of a singleton is NE.
            prop_assert_eq!(holds(Op::In, None, vec![expected.clone()]), eq);
            prop_assert_eq!(holds(Op::NotIn, None, vec![expected.clone()]), ne);
            prop_assert!(holds(Op::Exists, None, Vec::new()));
            // Ordering operators hold only between numbers, and complement there.
            let numbers = matches!((&expected, &actual), (Attr::Number(_), Attr::Number(_)));
            let lt = holds(Op::Lt, Some(expected.clone()), Vec::new());
            let gte = holds(Op::Gte, Some(expected.clone()), Vec::new());
            let gt = holds(Op::Gt, Some(expected.clone()), Vec::new());
            let lte = holds(Op::Lte, Some(expected.clone()), Vec::new());
            if numbers {
                prop_assert_eq!(lt, !gte);
                prop_assert_eq!(gt, !lte);
                prop_assert_eq!(lte && gte, eq);
            } else {
                prop_assert!(!lt && !gte && !gt && !lte);
            }
        }

        #[test]
        fn in_is_any_of_eq(
            values in prop::collection::vec(valid_attr(), 1..5),
            actual in valid_attr(),
        ) {
            let ctx = context(Some(actual));
            let any_eq = values
                .iter()
                .any(|v| condition(Op::Eq, Some(v.clone()), Vec::new()).holds(&ctx));
            prop_assert_eq!(condition(Op::In, None, values).holds(&ctx), any_eq);
        }

        #[test]
        fn proto_conditions_never_panic_and_round_trip(c in proto_condition()) {
            if let Ok(parsed) = Condition::from_proto("rule.conditions[0]", &c) {
                let again = Condition::from_proto("rule.conditions[0]", &parsed.to_proto());
                prop_assert_eq!(again.as_ref().ok(), Some(&parsed));
                // As stored in the database (JSON).
                let stored = serde_json::to_string(&parsed).unwrap();
                let loaded: Condition = serde_json::from_str(&stored).unwrap();
                prop_assert_eq!(loaded, parsed);
            }
        }

        #[test]
        fn contexts_never_panic(
            entries in prop::collection::hash_map(
                prop_oneof!["[a-z][a-z0-9_]{0,5}".prop_map(String::from), "vg_[a-z]{1,3}".prop_map(String::from), any::<String>()],
                proto_value(),
                0..40,
            ),
        ) {
            let entries: HashMap<String, pb::AttributeValue> = entries;
            match check_context(&entries) {
                Ok(checked) => {
                    prop_assert!(checked.len() <= MAX_CONTEXT_ENTRIES);
                    for (key, value) in &checked {
                        prop_assert!(check_attribute_name("k", key).is_ok() && !key.starts_with("vg_"));
                        if let Attr::Number(n) = value {
                            prop_assert!(n.is_finite());
                        }
                        if let Attr::String(s) = value {
                            prop_assert!(s.len() <= MAX_STRING_VALUE_BYTES);
                        }
                    }
                }
                Err(violations) => prop_assert!(!violations.is_empty()),
            }
        }

        #[test]
        fn scope_patterns_never_panic_and_a_granted_scope_matches_a_pattern(
            patterns in prop::collection::vec(prop_oneof![
                "[a-z]{1,4}(:|\\.|/)?\\*?".prop_map(String::from),
                Just("*".to_owned()),
                grammar_noise(),
            ], 0..4),
            defaults in prop::collection::vec("[a-z]{1,4}(:[a-z]{1,3})?".prop_map(String::from), 0..3),
            requested in prop::collection::vec(prop_oneof![
                "[a-z]{1,4}((:|\\.|/)[a-z]{0,3})?".prop_map(String::from),
                grammar_noise(),
            ], 0..4),
        ) {
            let Ok(grants) = Grants::from_proto(Some(Direction::Inbound), &patterns, &defaults, &[]) else {
                return Ok(());
            };
            let rule = Rule { grants: grants.clone(), ..rule_with("crm.*") };
            let context = BTreeMap::new();
            let request = Request {
                requesting_tenant_id: "tnt_a",
                requesting_agent_id: "agt_1",
                receiving_tenant_id: "tnt_b",
                action: "crm.read",
                context: &context,
                requested_ttl_seconds: 60,
                scopes: &requested,
                resource: None,
                authorization_details: &[],
            };
            let side = judge_side("tnt_b", 1, Direction::Inbound, &[rule], &request, Outcome::Block, 0);
            if side.outcome != Outcome::Block {
                for scope in &side.scopes {
                    prop_assert!(grants.scopes.iter().any(|p| scope_matches(p, scope)), "{scope} granted by none of {:?}", grants.scopes);
                }
                if requested.is_empty() {
                    prop_assert_eq!(&side.scopes, &grants.default_scopes);
                } else {
                    prop_assert_eq!(&side.scopes, &requested);
                }
            } else {
                prop_assert!(!side.scopes_not_granted.is_empty());
                prop_assert!(side.scopes_not_granted.iter().all(|s| !grants.scopes.iter().any(|p| scope_matches(p, s))));
            }
        }

        #[test]
        fn time_windows_never_panic_and_round_trip(
            start in prop_oneof![0u32..1440, any::<u32>()],
            end in prop_oneof![0u32..=1440, any::<u32>()],
            days in prop::collection::vec(prop_oneof![1i32..=7, any::<i32>()], 0..9),
            now in any::<i64>(),
        ) {
            let proto = pb::TimeWindow { start_minute: start, end_minute: end, days_of_week: days };
            if let Ok(window) = TimeWindow::from_proto("rule.time_window", &proto) {
                let _ = window.contains(now);
                let again = TimeWindow::from_proto("rule.time_window", &window.to_proto());
                prop_assert_eq!(again.ok(), Some(window));
            }
            // Unchecked windows (as a corrupt row could hold) must not panic either.
            let raw = TimeWindow { start, end, days: Vec::new() };
            let _ = raw.contains(now);
        }
    }
}
