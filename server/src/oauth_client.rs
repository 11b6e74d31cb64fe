//! VaultGuard as an OAuth 2.0 client of the providers tenants register: the
//! token endpoint (authorization code with PKCE, refresh) and RFC 7009
//! revocation, over one shared client of the outbound address policy
//! ([`crate::outbound`]: a provider endpoint on a loopback, private or
//! metadata address is never called), plus the per-connection single-flight
//! locks that make concurrent exchanges share one refresh.
//!
//! Nothing here logs or returns a token: [`TokenGrant`]'s `Debug` redacts
//! them, and [`ProviderError`] carries only the provider's error code, a
//! short description and the HTTP status.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::Deserialize;

use crate::outbound::{self, Outbound};

/// The most bytes read from a provider's response.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;
/// Single-flight entries kept before dead ones are pruned.
const PRUNE_AT: usize = 1024;

/// A token endpoint's successful answer (RFC 6749 §5.1).
#[derive(Clone, Deserialize)]
pub struct TokenGrant {
    pub access_token: String,
    #[serde(default)]
    pub token_type: String,
    #[serde(default, deserialize_with = "lenient_u64")]
    pub expires_in: Option<u64>,
    #[serde(default)]
    pub refresh_token: Option<String>,
    #[serde(default)]
    pub scope: Option<String>,
    #[serde(default)]
    pub id_token: Option<String>,
}

impl std::fmt::Debug for TokenGrant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenGrant")
            .field("token_type", &self.token_type)
            .field("expires_in", &self.expires_in)
            .field("refresh_token", &self.refresh_token.as_ref().map(|_| ".."))
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

/// `expires_in` as a number or a numeric string (some providers send one).
fn lenient_u64<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Number(u64),
        Text(String),
    }
    Ok(match Option::<Raw>::deserialize(d)? {
        Some(Raw::Number(n)) => Some(n),
        Some(Raw::Text(text)) => text.trim().parse().ok(),
        None => None,
    })
}

/// Reads an answer that RFC 6749 (§5.1, §5.2) and RFC 7009 define as a JSON
/// object. A derived `Deserialize` would also take a JSON array, field by
/// position, which no provider means.
fn json_object<T: serde::de::DeserializeOwned>(body: &[u8]) -> serde_json::Result<T> {
    let object: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(body)?;
    serde_json::from_value(serde_json::Value::Object(object))
}

/// A token endpoint's error answer (RFC 6749 §5.2).
#[derive(Deserialize)]
struct ErrorBody {
    error: String,
    #[serde(default)]
    error_description: Option<String>,
}

/// Why a provider call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProviderError {
    /// `invalid_grant`: the code or refresh token is no longer good; the
    /// user must authorize again.
    InvalidGrant { description: String },
    /// Any other OAuth error answer (`invalid_client`, `invalid_scope`, …).
    Rejected {
        error: String,
        description: String,
        status: u16,
    },
    /// Unreachable, timed out, 5xx, or an answer that is not OAuth.
    Unavailable(String),
}

impl std::fmt::Display for ProviderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::InvalidGrant { description } if description.is_empty() => {
                f.write_str("invalid_grant")
            }
            Self::InvalidGrant { description } => write!(f, "invalid_grant: {description}"),
            Self::Rejected {
                error,
                description,
                status,
            } => write!(f, "{error} (HTTP {status}) {description}"),
            Self::Unavailable(detail) => write!(f, "provider unavailable: {detail}"),
        }
    }
}

/// How VaultGuard authenticates to a provider.
#[derive(Clone, Copy)]
pub struct ClientAuth<'a> {
    pub client_id: &'a str,
    /// `None` for a public client (PKCE only).
    pub client_secret: Option<&'a str>,
}

/// The shared client and the single-flight locks.
pub struct OAuthClient {
    http: outbound::Client,
    flights: Mutex<HashMap<String, Weak<tokio::sync::Mutex<()>>>>,
}

impl std::fmt::Debug for OAuthClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OAuthClient(..)")
    }
}

/// `application/x-www-form-urlencoded` encoding of one value.
pub fn form_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'*' | b'-' | b'.' | b'_' => {
                out.push(char::from(byte));
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{byte:02X}")),
        }
    }
    out
}

fn form_body(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", form_encode(k), form_encode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// Keeps at most `max` characters of provider-supplied text, without control
/// characters (it ends up in status reasons and audit details).
pub fn tidy(text: &str, max: usize) -> String {
    text.chars().filter(|c| !c.is_control()).take(max).collect()
}

impl OAuthClient {
    /// A client under `outbound`'s address policy with the given per-call
    /// timeout; it never follows redirects.
    pub fn new(outbound: &Outbound, timeout_ms: u64) -> anyhow::Result<Self> {
        let timeout = Duration::from_millis(timeout_ms.max(1));
        let http = outbound.client(outbound::ClientOptions {
            timeout,
            connect_timeout: timeout.min(Duration::from_secs(5)),
            user_agent: concat!("VaultGuard/", env!("CARGO_PKG_VERSION")),
        })?;
        Ok(Self {
            http,
            flights: Mutex::new(HashMap::new()),
        })
    }

    /// The lock every refresh of `key` (a connection id) takes in this
    /// process, so concurrent exchanges wait for one refresh instead of each
    /// starting their own.
    pub fn flight(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut flights = self
            .flights
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(lock) = flights.get(key).and_then(Weak::upgrade) {
            return lock;
        }
        if flights.len() >= PRUNE_AT {
            flights.retain(|_, weak| weak.strong_count() > 0);
        }
        let lock = Arc::new(tokio::sync::Mutex::new(()));
        flights.insert(key.to_owned(), Arc::downgrade(&lock));
        lock
    }

    /// The POST of `pairs` to `url`, or why the address policy refuses it.
    fn post(
        &self,
        url: &str,
        auth: ClientAuth<'_>,
        pairs: &[(&str, &str)],
    ) -> Result<reqwest::RequestBuilder, ProviderError> {
        let mut pairs = pairs.to_vec();
        pairs.push(("client_id", auth.client_id));
        let mut request = self
            .http
            .post(url)
            .map_err(|refusal| ProviderError::Unavailable(refusal.to_string()))?
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .header(reqwest::header::ACCEPT, "application/json");
        if let Some(secret) = auth.client_secret {
            // RFC 6749 §2.3.1: both parts form-encoded, then Basic.
            let credentials = format!("{}:{}", form_encode(auth.client_id), form_encode(secret));
            request = request.header(
                reqwest::header::AUTHORIZATION,
                format!("Basic {}", STANDARD.encode(credentials)),
            );
        }
        Ok(request.body(form_body(&pairs)))
    }

    /// Calls a token endpoint with `pairs` (the grant's parameters).
    pub async fn token(
        &self,
        url: &str,
        auth: ClientAuth<'_>,
        pairs: &[(&str, &str)],
    ) -> Result<TokenGrant, ProviderError> {
        let response = self
            .post(url, auth, pairs)?
            .send()
            .await
            .map_err(unavailable)?;
        let status = response.status();
        let body = read_capped(response).await?;
        if status.is_success() {
            let grant: TokenGrant = json_object(&body).map_err(|_| {
                ProviderError::Unavailable("the token response is not OAuth JSON".to_owned())
            })?;
            if grant.access_token.is_empty() {
                return Err(ProviderError::Unavailable(
                    "the token response has no access_token".to_owned(),
                ));
            }
            return Ok(grant);
        }
        if status.is_server_error() {
            return Err(ProviderError::Unavailable(format!(
                "token endpoint answered HTTP {}",
                status.as_u16()
            )));
        }
        match json_object::<ErrorBody>(&body) {
            Ok(error) if error.error == "invalid_grant" => Err(ProviderError::InvalidGrant {
                description: tidy(error.error_description.as_deref().unwrap_or_default(), 200),
            }),
            Ok(error) => Err(ProviderError::Rejected {
                error: tidy(&error.error, 64),
                description: tidy(error.error_description.as_deref().unwrap_or_default(), 200),
                status: status.as_u16(),
            }),
            Err(_) => Err(ProviderError::Unavailable(format!(
                "token endpoint answered HTTP {} without an OAuth error",
                status.as_u16()
            ))),
        }
    }

    /// RFC 7009 revocation of a refresh token. A 200 means revoked (or
    /// already invalid, which the RFC treats the same).
    pub async fn revoke(
        &self,
        url: &str,
        auth: ClientAuth<'_>,
        refresh_token: &str,
    ) -> Result<(), ProviderError> {
        let response = self
            .post(
                url,
                auth,
                &[
                    ("token", refresh_token),
                    ("token_type_hint", "refresh_token"),
                ],
            )?
            .send()
            .await
            .map_err(unavailable)?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let body = read_capped(response).await.unwrap_or_default();
        match json_object::<ErrorBody>(&body) {
            Ok(error) if !status.is_server_error() => Err(ProviderError::Rejected {
                error: tidy(&error.error, 64),
                description: tidy(error.error_description.as_deref().unwrap_or_default(), 200),
                status: status.as_u16(),
            }),
            _ => Err(ProviderError::Unavailable(format!(
                "revocation endpoint answered HTTP {}",
                status.as_u16()
            ))),
        }
    }
}

/// A failed send as a [`ProviderError`]: a refusal of the address policy
/// says so; other errors without the URL.
fn unavailable(err: reqwest::Error) -> ProviderError {
    if outbound::is_forbidden_error(&err) {
        return ProviderError::Unavailable(outbound::Refusal::ForbiddenAddress.to_string());
    }
    ProviderError::Unavailable(err.without_url().to_string())
}

async fn read_capped(mut response: reqwest::Response) -> Result<Vec<u8>, ProviderError> {
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|err| ProviderError::Unavailable(err.without_url().to_string()))?
    {
        if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
            return Err(ProviderError::Unavailable(
                "the provider's response is too large".to_owned(),
            ));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_encoding_follows_the_html_rules() {
        assert_eq!(form_encode("a b+c/d:é"), "a+b%2Bc%2Fd%3A%C3%A9");
        assert_eq!(
            form_body(&[("grant_type", "refresh_token"), ("scope", "read write")]),
            "grant_type=refresh_token&scope=read+write"
        );
    }

    #[test]
    fn grants_never_print_their_tokens() {
        let grant: TokenGrant = serde_json::from_str(
            r#"{"access_token":"AT-secret","refresh_token":"RT-secret","expires_in":"3600","token_type":"Bearer"}"#,
        )
        .unwrap();
        let printed = format!("{grant:?}");
        assert!(!printed.contains("AT-secret") && !printed.contains("RT-secret"));
        assert_eq!(grant.expires_in, Some(3600));
    }

    #[test]
    fn answers_that_are_not_json_objects_are_refused() {
        // Found by `token_answers_never_panic`: a derived `Deserialize`
        // reads a struct from an array, field by position.
        assert!(json_object::<TokenGrant>(br#"["AT","Bearer",0]"#).is_err());
        assert!(json_object::<ErrorBody>(br#"["invalid_grant"]"#).is_err());
        let grant: TokenGrant = json_object(br#"{"access_token":"AT","expires_in":0}"#).unwrap();
        assert_eq!(grant.expires_in, Some(0));
    }

    #[tokio::test]
    async fn one_flight_per_key_while_held() {
        let outbound = Outbound::new(
            outbound::Policy::default(),
            Arc::new(outbound::SystemLookup),
        );
        let client = OAuthClient::new(&outbound, 1_000).unwrap();
        let a = client.flight("con_1");
        let b = client.flight("con_1");
        assert!(Arc::ptr_eq(&a, &b));
        let c = client.flight("con_2");
        assert!(!Arc::ptr_eq(&a, &c));
        drop((a, b));
        let d = client.flight("con_1");
        assert_eq!(Arc::strong_count(&d), 1);
    }
}

/// Property tests of form encoding, provider text and token answers.
#[cfg(test)]
mod props {
    use proptest::prelude::*;

    use super::*;
    use crate::props::{PURE_CASES, config, json_value};

    /// Decodes `application/x-www-form-urlencoded` text (the inverse of
    /// `form_encode`, written independently of it).
    fn form_decode(text: &str) -> Vec<u8> {
        let bytes = text.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'+' => out.push(b' '),
                b'%' => {
                    let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
                    out.push(u8::from_str_radix(hex, 16).unwrap());
                    i += 2;
                }
                other => out.push(other),
            }
            i += 1;
        }
        out
    }

    proptest! {
        #![proptest_config(config(PURE_CASES))]

        #[test]
        fn form_encoding_round_trips(value in any::<String>()) {
            let encoded = form_encode(&value);
            prop_assert!(encoded.bytes().all(|b| b.is_ascii_alphanumeric() || b"*-._+%".contains(&b)));
            prop_assert_eq!(form_decode(&encoded), value.as_bytes().to_vec());
        }

        #[test]
        fn tidy_keeps_few_printable_characters(text in any::<String>(), max in 0usize..50) {
            let tidied = tidy(&text, max);
            prop_assert!(tidied.chars().count() <= max);
            prop_assert!(!tidied.chars().any(char::is_control));
        }

        #[test]
        fn token_answers_never_panic(
            body in prop_oneof![
                json_value().prop_map(|v| v.to_string()),
                (any::<String>(), prop_oneof![
                    any::<u64>().prop_map(|n| serde_json::json!(n)),
                    any::<i64>().prop_map(|n| serde_json::json!(n)),
                    any::<String>().prop_map(|s| serde_json::json!(s)),
                    " ?[0-9]{1,22} ?".prop_map(|s| serde_json::json!(s)),
                    any::<f64>().prop_map(|n| serde_json::json!(n)),
                ]).prop_map(|(token, expires_in)| {
                    serde_json::json!({"access_token": token, "expires_in": expires_in}).to_string()
                }),
                any::<String>(),
            ],
        ) {
            if let Ok(grant) = json_object::<TokenGrant>(body.as_bytes()) {
                let value: serde_json::Value = serde_json::from_str(&body).unwrap();
                prop_assert!(value.is_object());
                let expected = match &value["expires_in"] {
                    serde_json::Value::Number(n) => n.as_u64(),
                    serde_json::Value::String(s) => s.trim().parse().ok(),
                    _ => None,
                };
                prop_assert_eq!(grant.expires_in, expected);
                let _ = format!("{grant:?}");
            }
            if json_object::<ErrorBody>(body.as_bytes()).is_ok() {
                let object = serde_json::from_str::<serde_json::Value>(&body).unwrap();
                prop_assert!(object.is_object());
            }
        }
    }
}
