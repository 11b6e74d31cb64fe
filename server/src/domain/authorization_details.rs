//! RFC 9396 authorization details: checking what a request carries, the
//! JSON form judged, stored, shown to approvers and signed into the token's
//! `authorization_details` claim, and reading values by path for policy
//! conditions and budgets.
//!
//! A detail is kept as the JSON object the token carries: the common members
//! (`type`, `locations`, `actions`, `datatypes`, `identifier`, `privileges`,
//! only those set) beside the type's own fields. Objects are ordered maps, so
//! the same request always serialises to the same bytes (and so to the same
//! request hash).

use crate::error::FieldViolation;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Number, Value};
use vaultguard_proto::v1 as pb;

/// At most this many details per request.
pub const MAX_DETAILS: usize = 8;
/// At most this many bytes of JSON for all of a request's details.
pub const MAX_TOTAL_BYTES: usize = 16 * 1024;
const MAX_DEPTH: usize = 6;
const MAX_ARRAY: usize = 64;
const MAX_STRING_BYTES: usize = 1024;
const MAX_LIST: usize = 16;
const MAX_PATH_SEGMENTS: usize = 6;

/// The members every detail may carry (RFC 9396 section 2.2).
const COMMON: [&str; 6] = [
    "type",
    "locations",
    "actions",
    "datatypes",
    "identifier",
    "privileges",
];

/// One checked authorization detail, as its JSON object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Detail(Map<String, Value>);

impl Detail {
    /// The detail's `type`.
    pub fn kind(&self) -> &str {
        self.0
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or_default()
    }

    /// The JSON object, as the token's claim carries it.
    pub fn as_json(&self) -> &Map<String, Value> {
        &self.0
    }

    /// The proto form, for answers and approvers.
    pub fn to_proto(&self) -> pb::AuthorizationDetail {
        let list = |name: &str| -> Vec<String> {
            self.0
                .get(name)
                .and_then(Value::as_array)
                .map(|items| {
                    items
                        .iter()
                        .filter_map(|v| v.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default()
        };
        let fields: std::collections::BTreeMap<String, prost_types::Value> = self
            .0
            .iter()
            .filter(|(name, _)| !COMMON.contains(&name.as_str()))
            .map(|(name, value)| (name.clone(), to_proto_value(value)))
            .collect();
        pb::AuthorizationDetail {
            r#type: self.kind().to_owned(),
            locations: list("locations"),
            actions: list("actions"),
            datatypes: list("datatypes"),
            identifier: self
                .0
                .get("identifier")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
            privileges: list("privileges"),
            fields: (!fields.is_empty()).then_some(prost_types::Struct { fields }),
        }
    }

    /// Every value at `path` (arrays contribute each item).
    pub fn values_at<'a>(&'a self, path: &[String]) -> Vec<&'a Value> {
        let mut current: Vec<&Value> = Vec::new();
        let Some((first, rest)) = path.split_first() else {
            return current;
        };
        if let Some(v) = self.0.get(first) {
            current.push(v);
        }
        for segment in rest {
            current = current
                .into_iter()
                .flat_map(|v| match v {
                    Value::Array(items) => items.iter().collect::<Vec<_>>(),
                    other => vec![other],
                })
                .filter_map(|v| v.as_object().and_then(|o| o.get(segment)))
                .collect();
        }
        current
            .into_iter()
            .flat_map(|v| match v {
                Value::Array(items) => items.iter().collect::<Vec<_>>(),
                other => vec![other],
            })
            .collect()
    }

    /// The object holding the member at `path` (for a budget's currency
    /// check: the `instructedAmount` around `instructedAmount.amount`).
    pub fn parents_at<'a>(&'a self, path: &[String]) -> Vec<(&'a Map<String, Value>, &'a Value)> {
        let Some((last, parent_path)) = path.split_last() else {
            return Vec::new();
        };
        let parents: Vec<&Map<String, Value>> = if parent_path.is_empty() {
            vec![&self.0]
        } else {
            self.values_at(parent_path)
                .into_iter()
                .filter_map(Value::as_object)
                .collect()
        };
        parents
            .into_iter()
            .filter_map(|p| p.get(last).map(|v| (p, v)))
            .collect()
    }
}

/// All values at `path` in every detail of `kind`.
pub fn values_of<'a>(details: &'a [Detail], kind: &str, path: &[String]) -> Vec<&'a Value> {
    details
        .iter()
        .filter(|d| d.kind() == kind)
        .flat_map(|d| d.values_at(path))
        .collect()
}

/// A detail value as a number: JSON numbers, and decimal strings such as
/// `"120.00"` (amounts are strings in RFC 9396's examples).
pub fn as_number(value: &Value) -> Option<f64> {
    match value {
        Value::Number(n) => n.as_f64(),
        Value::String(s) if is_decimal(s) => s.parse::<f64>().ok().filter(|n| n.is_finite()),
        _ => None,
    }
}

/// `[0-9]+(\.[0-9]+)?`.
fn is_decimal(s: &str) -> bool {
    let (int, frac) = s.split_once('.').unwrap_or((s, "0"));
    !int.is_empty()
        && !frac.is_empty()
        && int.bytes().all(|b| b.is_ascii_digit())
        && frac.bytes().all(|b| b.is_ascii_digit())
}

fn violation(field: impl Into<String>, description: impl Into<String>) -> FieldViolation {
    FieldViolation {
        field: field.into(),
        description: description.into(),
    }
}

/// A detail `type`: 1 to 128 characters of `[A-Za-z0-9._:/-]`, starting with
/// a letter or digit.
pub fn check_type(field: &str, kind: &str) -> Result<(), FieldViolation> {
    let valid = (1..=128).contains(&kind.len())
        && kind.starts_with(|c: char| c.is_ascii_alphanumeric())
        && kind
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'/' | b'-'));
    if valid {
        Ok(())
    } else {
        Err(violation(
            field,
            "types are 1 to 128 characters of A-Z, a-z, 0-9 and . _ : / -, starting with a letter or digit",
        ))
    }
}

fn is_member_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// A detail path: 1 to 6 dot-separated member names.
pub fn check_path(field: &str, path: &str) -> Result<Vec<String>, FieldViolation> {
    let segments: Vec<String> = path.split('.').map(str::to_owned).collect();
    if path.is_empty()
        || segments.len() > MAX_PATH_SEGMENTS
        || !segments.iter().all(|s| is_member_name(s))
    {
        return Err(violation(
            field,
            "paths are 1 to 6 dot-separated names of A-Z, a-z, 0-9 and '_' (for example instructedAmount.amount)",
        ));
    }
    Ok(segments)
}

fn printable(s: &str) -> bool {
    !s.chars().any(char::is_control)
}

fn check_list(
    field: &str,
    items: &[String],
    max_len: usize,
    out: &mut Map<String, Value>,
    name: &str,
    v: &mut Vec<FieldViolation>,
) {
    if items.len() > MAX_LIST {
        v.push(violation(field, format!("at most {MAX_LIST} items")));
        return;
    }
    for (i, item) in items.iter().enumerate() {
        if item.is_empty() || item.chars().count() > max_len || !printable(item) {
            v.push(violation(
                format!("{field}[{i}]"),
                format!("must be 1 to {max_len} printable characters"),
            ));
        }
    }
    if !items.is_empty() {
        out.insert(
            name.to_owned(),
            Value::Array(items.iter().cloned().map(Value::String).collect()),
        );
    }
}

/// Checks a request's details; fields are named
/// `authorization_details[i].…`. `None` details give an empty list.
pub fn check(details: &[pb::AuthorizationDetail]) -> Result<Vec<Detail>, Vec<FieldViolation>> {
    let mut v = Vec::new();
    if details.len() > MAX_DETAILS {
        return Err(vec![violation(
            "authorization_details",
            format!("at most {MAX_DETAILS} details"),
        )]);
    }
    let mut out = Vec::with_capacity(details.len());
    for (i, d) in details.iter().enumerate() {
        let field = format!("authorization_details[{i}]");
        let mut object = Map::new();
        match check_type(&format!("{field}.type"), &d.r#type) {
            Ok(()) => {
                object.insert("type".to_owned(), Value::String(d.r#type.clone()));
            }
            Err(e) => v.push(e),
        }
        check_list(
            &format!("{field}.locations"),
            &d.locations,
            512,
            &mut object,
            "locations",
            &mut v,
        );
        check_list(
            &format!("{field}.actions"),
            &d.actions,
            128,
            &mut object,
            "actions",
            &mut v,
        );
        check_list(
            &format!("{field}.datatypes"),
            &d.datatypes,
            128,
            &mut object,
            "datatypes",
            &mut v,
        );
        check_list(
            &format!("{field}.privileges"),
            &d.privileges,
            128,
            &mut object,
            "privileges",
            &mut v,
        );
        if !d.identifier.is_empty() {
            if d.identifier.chars().count() > 256 || !printable(&d.identifier) {
                v.push(violation(
                    format!("{field}.identifier"),
                    "must be at most 256 printable characters",
                ));
            } else {
                object.insert("identifier".to_owned(), Value::String(d.identifier.clone()));
            }
        }
        if let Some(fields) = &d.fields {
            for (name, value) in &fields.fields {
                let member = format!("{field}.{}", name.chars().take(64).collect::<String>());
                if !is_member_name(name) {
                    v.push(violation(
                        &member,
                        "member names are 1 to 64 characters of A-Z, a-z, 0-9 and '_', not starting with a digit",
                    ));
                    continue;
                }
                if COMMON.contains(&name.as_str()) {
                    v.push(violation(
                        &member,
                        "is a common member: set it as its own field, not in fields",
                    ));
                    continue;
                }
                match to_json(&member, value, 1) {
                    Ok(json) => {
                        object.insert(name.clone(), json);
                    }
                    Err(e) => v.push(e),
                }
            }
        }
        if v.is_empty() {
            check_known_type(&field, &object, &mut v);
        }
        out.push(Detail(object));
    }
    if v.is_empty() {
        let size = serde_json::to_vec(&out)
            .map(|b| b.len())
            .unwrap_or(usize::MAX);
        if size > MAX_TOTAL_BYTES {
            v.push(violation(
                "authorization_details",
                format!("at most {MAX_TOTAL_BYTES} bytes of JSON in all"),
            ));
        }
    }
    if v.is_empty() { Ok(out) } else { Err(v) }
}

/// A Struct value as JSON, within the depth and size limits.
fn to_json(field: &str, value: &prost_types::Value, depth: usize) -> Result<Value, FieldViolation> {
    use prost_types::value::Kind;
    if depth > MAX_DEPTH {
        return Err(violation(
            field,
            format!("nesting is at most {MAX_DEPTH} deep"),
        ));
    }
    Ok(match &value.kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::BoolValue(b)) => Value::Bool(*b),
        Some(Kind::NumberValue(n)) => {
            number(*n).ok_or_else(|| violation(field, "numbers must be finite"))?
        }
        Some(Kind::StringValue(s)) => {
            if s.len() > MAX_STRING_BYTES {
                return Err(violation(
                    field,
                    format!("strings are at most {MAX_STRING_BYTES} bytes"),
                ));
            }
            Value::String(s.clone())
        }
        Some(Kind::ListValue(list)) => {
            if list.values.len() > MAX_ARRAY {
                return Err(violation(
                    field,
                    format!("arrays hold at most {MAX_ARRAY} items"),
                ));
            }
            let mut items = Vec::with_capacity(list.values.len());
            for (i, item) in list.values.iter().enumerate() {
                items.push(to_json(&format!("{field}[{i}]"), item, depth + 1)?);
            }
            Value::Array(items)
        }
        Some(Kind::StructValue(object)) => {
            let mut out = Map::new();
            for (name, item) in &object.fields {
                let member = format!("{field}.{}", name.chars().take(64).collect::<String>());
                if !is_member_name(name) {
                    return Err(violation(
                        member,
                        "member names are 1 to 64 characters of A-Z, a-z, 0-9 and '_', not starting with a digit",
                    ));
                }
                out.insert(name.clone(), to_json(&member, item, depth + 1)?);
            }
            Value::Object(out)
        }
    })
}

/// A finite number as JSON: integral values within 2^53 as integers, so
/// `5` reads back as `5`, not `5.0`.
fn number(n: f64) -> Option<Value> {
    if !n.is_finite() {
        return None;
    }
    const EXACT: f64 = 9_007_199_254_740_992.0;
    if n.fract() == 0.0 && n.abs() < EXACT {
        #[allow(clippy::cast_possible_truncation)]
        return Some(Value::Number(Number::from(n as i64)));
    }
    Number::from_f64(n).map(Value::Number)
}

fn to_proto_value(value: &Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match value {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(*b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        Value::String(s) => Kind::StringValue(s.clone()),
        Value::Array(items) => Kind::ListValue(prost_types::ListValue {
            values: items.iter().map(to_proto_value).collect(),
        }),
        Value::Object(o) => Kind::StructValue(prost_types::Struct {
            fields: o
                .iter()
                .map(|(k, v)| (k.clone(), to_proto_value(v)))
                .collect(),
        }),
    };
    prost_types::Value { kind: Some(kind) }
}

/// The strict shapes of the types VaultGuard knows.
fn check_known_type(field: &str, object: &Map<String, Value>, v: &mut Vec<FieldViolation>) {
    if object.get("type").and_then(Value::as_str) != Some("payment_initiation") {
        return;
    }
    for (name, value) in object {
        let member = format!("{field}.{name}");
        match name.as_str() {
            n if COMMON.contains(&n) => {}
            "instructedAmount" => check_amount(&member, value, v),
            "creditorName" | "remittanceInformationUnstructured" => {
                if !value.as_str().is_some_and(|s| s.chars().count() <= 140 && printable(s)) {
                    v.push(violation(member, "must be a string of at most 140 printable characters"));
                }
            }
            "creditorAccount" => match value.as_object() {
                Some(account) if !account.is_empty() => {
                    for (key, item) in account {
                        let at = format!("{member}.{key}");
                        if !matches!(key.as_str(), "iban" | "bic" | "accountNumber") {
                            v.push(violation(at, "is not a member of creditorAccount (iban, bic, accountNumber)"));
                        } else if !item
                            .as_str()
                            .is_some_and(|s| (1..=34).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric()))
                        {
                            v.push(violation(at, "must be 1 to 34 letters and digits"));
                        }
                    }
                }
                _ => v.push(violation(member, "must be an object with iban, bic or accountNumber")),
            },
            _ => v.push(violation(
                member,
                "is not a member of payment_initiation (instructedAmount, creditorName, creditorAccount, remittanceInformationUnstructured)",
            )),
        }
    }
    if !object.contains_key("instructedAmount") {
        v.push(violation(
            format!("{field}.instructedAmount"),
            "is required for payment_initiation",
        ));
    }
}

fn check_amount(field: &str, value: &Value, v: &mut Vec<FieldViolation>) {
    let Some(amount) = value.as_object() else {
        v.push(violation(field, "must be an object {currency, amount}"));
        return;
    };
    match amount.get("currency").and_then(Value::as_str) {
        Some(c) if c.len() == 3 && c.bytes().all(|b| b.is_ascii_uppercase()) => {}
        _ => v.push(violation(
            format!("{field}.currency"),
            "must be three upper-case letters (ISO 4217), for example EUR",
        )),
    }
    let decimal = amount
        .get("amount")
        .and_then(Value::as_str)
        .is_some_and(|s| {
            let (int, frac) = s.split_once('.').unwrap_or((s, ""));
            is_decimal(s)
                && (1..=15).contains(&int.len())
                && frac.len() <= 6
                && (int == "0" || !int.starts_with('0'))
        });
    if !decimal {
        v.push(violation(
            format!("{field}.amount"),
            "must be a decimal string of at most 15 integer and 6 fraction digits, for example \"120.00\"",
        ));
    }
    for key in amount.keys() {
        if !matches!(key.as_str(), "currency" | "amount") {
            v.push(violation(
                format!("{field}.{key}"),
                "is not a member of instructedAmount (currency, amount)",
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost_types::value::Kind;

    fn s(text: &str) -> prost_types::Value {
        prost_types::Value {
            kind: Some(Kind::StringValue(text.into())),
        }
    }

    fn object(members: &[(&str, prost_types::Value)]) -> prost_types::Struct {
        prost_types::Struct {
            fields: members
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect(),
        }
    }

    fn payment(currency: &str, amount: &str) -> pb::AuthorizationDetail {
        pb::AuthorizationDetail {
            r#type: "payment_initiation".into(),
            actions: vec!["initiate".into()],
            fields: Some(object(&[
                (
                    "instructedAmount",
                    prost_types::Value {
                        kind: Some(Kind::StructValue(object(&[
                            ("currency", s(currency)),
                            ("amount", s(amount)),
                        ]))),
                    },
                ),
                ("creditorName", s("ACME")),
            ])),
            ..Default::default()
        }
    }

    #[test]
    fn a_payment_round_trips_and_reads_by_path() {
        let details = check(&[payment("EUR", "120.50")]).unwrap();
        let path = check_path("p", "instructedAmount.amount").unwrap();
        let values = values_of(&details, "payment_initiation", &path);
        assert_eq!(values.len(), 1);
        assert_eq!(as_number(values[0]), Some(120.5));
        assert_eq!(details[0].to_proto(), payment("EUR", "120.50"));
        let json = serde_json::to_value(&details).unwrap();
        assert_eq!(json[0]["instructedAmount"]["currency"], "EUR");
        assert_eq!(json[0]["actions"][0], "initiate");
    }

    #[test]
    fn bad_shapes_name_the_path() {
        let fields = |d: pb::AuthorizationDetail| -> Vec<String> {
            check(&[d])
                .unwrap_err()
                .into_iter()
                .map(|v| v.field)
                .collect()
        };
        assert_eq!(
            fields(payment("eur", "1")),
            ["authorization_details[0].instructedAmount.currency"]
        );
        assert_eq!(
            fields(payment("EUR", "1e9")),
            ["authorization_details[0].instructedAmount.amount"]
        );
        assert_eq!(
            fields(payment("EUR", "01.5")),
            ["authorization_details[0].instructedAmount.amount"]
        );
        let mut extra = payment("EUR", "1");
        extra
            .fields
            .as_mut()
            .unwrap()
            .fields
            .insert("type".into(), s("other"));
        assert_eq!(fields(extra), ["authorization_details[0].type"]);
        let no_type = pb::AuthorizationDetail::default();
        assert_eq!(fields(no_type), ["authorization_details[0].type"]);
    }

    #[test]
    fn nesting_is_bounded() {
        let mut value = s("x");
        for _ in 0..10 {
            value = prost_types::Value {
                kind: Some(Kind::StructValue(object(&[("a", value)]))),
            };
        }
        let detail = pb::AuthorizationDetail {
            r#type: "custom".into(),
            fields: Some(object(&[("deep", value)])),
            ..Default::default()
        };
        let errors = check(&[detail]).unwrap_err();
        assert!(
            errors[0]
                .field
                .starts_with("authorization_details[0].deep.a")
        );
    }
}
