//! Shared settings and generators of the property tests (proptest) that sit
//! next to each parser in its module's `props` tests.
//!
//! Every property runs a fixed number of cases, chosen so that the whole
//! suite stays within a few seconds of the unit tests in CI; set
//! `PROPTEST_CASES` to run every property longer locally, e.g.
//! `PROPTEST_CASES=20000 cargo nextest run -p vaultguard-server props`.
//! Failures are not persisted to files (the shrunk input is printed).

use proptest::prelude::*;

/// The configuration of one property: `cases` cases unless `PROPTEST_CASES`
/// says otherwise.
pub(crate) fn config(cases: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(cases);
    ProptestConfig {
        cases,
        // Rejections (`prop_assume!`) grow with the cases; proptest's fixed
        // default would abort a long local run that found nothing.
        max_global_rejects: cases.max(1024),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Cheap pure parsers: many cases.
pub(crate) const PURE_CASES: u32 = 1024;

/// Parsers that do cryptography or run on a runtime: fewer cases.
pub(crate) const CRYPTO_CASES: u32 = 128;

/// Base64url (no padding) of arbitrary bytes.
pub(crate) fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A JSON value of bounded depth with arbitrary strings, numbers and keys.
pub(crate) fn json_value() -> BoxedStrategy<serde_json::Value> {
    use serde_json::Value;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        any::<String>().prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    any::<String>(),
                    "(iss|sub|aud|exp|nbf|iat|jti|kid|alg|typ|tid|roles|email)"
                        .prop_map(String::from)
                ],
                inner,
                0..6
            )
            .prop_map(|map| Value::Object(map.into_iter().collect())),
        ]
    })
    .boxed()
}

/// Something that looks like a compact JWS: three (sometimes two or four)
/// dot-separated parts, each base64url of JSON, of arbitrary bytes, or
/// arbitrary text, with JOSE headers naming algorithms (`none` in several
/// casings, HMAC, the asymmetric ones, garbage) and `kid`s from `kids`.
pub(crate) fn jws_like(kids: Vec<String>) -> impl Strategy<Value = String> {
    let alg = prop_oneof![
        Just("none".to_owned()),
        Just("None".to_owned()),
        Just("NONE".to_owned()),
        Just("HS256".to_owned()),
        Just("RS256".to_owned()),
        Just("ES256".to_owned()),
        Just("EdDSA".to_owned()),
        Just("PS256".to_owned()),
        any::<String>(),
    ];
    let typ = prop_oneof![
        Just(Some("at+jwt".to_owned())),
        Just(Some("JWT".to_owned())),
        Just(None),
        any::<String>().prop_map(Some),
    ];
    let kid = if kids.is_empty() {
        any::<String>().boxed()
    } else {
        prop_oneof![prop::sample::select(kids), any::<String>()].boxed()
    };
    let header = (alg, typ, kid, json_value())
        .prop_map(|(alg, typ, kid, extra)| {
            let mut header = serde_json::json!({"alg": alg, "kid": kid, "x": extra});
            if let Some(typ) = typ {
                header["typ"] = serde_json::Value::String(typ);
            }
            b64(header.to_string().as_bytes())
        })
        .boxed();
    let part = prop_oneof![
        json_value().prop_map(|v| b64(v.to_string().as_bytes())),
        prop::collection::vec(any::<u8>(), 0..300).prop_map(|bytes| b64(&bytes)),
        any::<String>(),
        "[A-Za-z0-9_=+/-]{0,80}".prop_map(String::from),
    ];
    let claims = prop_oneof![
        json_value().prop_map(|v| b64(v.to_string().as_bytes())),
        part.clone(),
    ];
    let signature = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..300).prop_map(|bytes| b64(&bytes)),
        Just(String::new()),
        part.clone(),
    ];
    prop_oneof![
        4 => (header.clone(), claims.clone(), signature.clone())
            .prop_map(|(h, c, s)| format!("{h}.{c}.{s}")),
        1 => (header.clone(), claims.clone()).prop_map(|(h, c)| format!("{h}.{c}")),
        1 => (header, claims, signature.clone(), signature)
            .prop_map(|(h, c, s, t)| format!("{h}.{c}.{s}.{t}")),
        1 => any::<String>(),
        1 => prop::collection::vec(any::<u8>(), 0..400)
            .prop_map(|bytes| String::from_utf8_lossy(&bytes).into_owned()),
    ]
}
