//! Opaque page tokens: base64url JSON naming the last key returned and the
//! scope (tenant and filters) it belongs to. A token presented under another
//! scope is INVALID_ARGUMENT, so one tenant's cursor never pages another's.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};

use crate::crypto::sha256_hex;
use crate::error::{Error, Result};

#[derive(Serialize, Deserialize)]
struct Cursor {
    after: String,
    scope: String,
}

/// A request's page size and token; an absent page is the first page of the
/// default size.
pub fn parts(page: Option<&vaultguard_proto::v1::PageRequest>) -> (u32, &str) {
    page.map_or((0, ""), |p| (p.page_size, p.page_token.as_str()))
}

/// Encodes a token that resumes after `last_key` within `scope`.
pub fn encode(scope: &str, last_key: &str) -> String {
    let cursor = Cursor {
        after: last_key.to_owned(),
        scope: sha256_hex(scope.as_bytes())[..16].to_owned(),
    };
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(&cursor).unwrap_or_default())
}

/// Decodes a token for `scope`; an empty token means the first page.
pub fn decode(field: &str, scope: &str, token: &str) -> Result<Option<String>> {
    if token.is_empty() {
        return Ok(None);
    }
    let invalid = || Error::invalid(field, "is not a page token of this listing");
    let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| invalid())?;
    let cursor: Cursor = serde_json::from_slice(&bytes).map_err(|_| invalid())?;
    if cursor.scope != sha256_hex(scope.as_bytes())[..16] {
        return Err(invalid());
    }
    Ok(Some(cursor.after))
}

/// Splits one extra fetched row off a page: returns the rows to show and the
/// next page token.
pub fn finish<T>(
    mut rows: Vec<T>,
    page_size: u64,
    scope: &str,
    key: impl Fn(&T) -> String,
) -> (Vec<T>, String) {
    let size = usize::try_from(page_size).unwrap_or(usize::MAX);
    if rows.len() > size {
        rows.truncate(size);
        let next = rows
            .last()
            .map(|row| encode(scope, &key(row)))
            .unwrap_or_default();
        (rows, next)
    } else {
        (rows, String::new())
    }
}

/// Property tests of page tokens: arbitrary tokens are refused, never a
/// panic; a token pages only the listing it came from.
#[cfg(test)]
mod props {
    use proptest::prelude::*;

    use super::*;
    use crate::props::{PURE_CASES, b64, config, json_value};

    proptest! {
        #![proptest_config(config(PURE_CASES))]

        #[test]
        fn arbitrary_tokens_never_panic(token in prop_oneof![
            any::<String>(),
            json_value().prop_map(|v| b64(v.to_string().as_bytes())),
            (any::<String>(), any::<String>()).prop_map(|(after, scope)| {
                b64(serde_json::json!({"after": after, "scope": scope}).to_string().as_bytes())
            }),
        ], scope in any::<String>()) {
            if let Ok(Some(_)) = decode("page_token", &scope, &token) {
                // Only a token naming this scope's digest can be accepted.
                let bytes = URL_SAFE_NO_PAD.decode(&token).unwrap();
                let cursor: Cursor = serde_json::from_slice(&bytes).unwrap();
                prop_assert_eq!(cursor.scope, sha256_hex(scope.as_bytes())[..16].to_owned());
            }
        }

        #[test]
        fn tokens_round_trip_within_their_scope_only(
            scope in any::<String>(),
            other in any::<String>(),
            last in any::<String>(),
        ) {
            let token = encode(&scope, &last);
            prop_assert_eq!(decode("page_token", &scope, &token).ok(), Some(Some(last)));
            prop_assume!(other != scope);
            prop_assert!(decode("page_token", &other, &token).is_err());
        }
    }
}
