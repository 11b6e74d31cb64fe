//! Trusted OIDC issuers: tokens of tenant humans from Auth0, Okta, Keycloak….
//!
//! For each configured issuer the discovery document and the JWKS are fetched
//! with reqwest and cached. A token naming an unknown `kid` triggers one
//! re-fetch (at most once per `jwks_min_refresh_seconds`, single flight per
//! issuer), which picks up the issuer's key rotations. Only asymmetric
//! algorithms are accepted, and the header's `alg` must match the JWK's key
//! type (and `alg`, when the JWK names one): no `none`, no HS256 signed with
//! a public key.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::Value;
use tokio::sync::Mutex;

use crate::clock::{Clock, Millis};
use crate::config::TrustedIssuer;
use crate::error::{Error, Result};
use crate::issuer::check_time_claims;

const ACCEPTED: [Algorithm; 7] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// What a trusted issuer's token says about its holder.
#[derive(Debug, Clone)]
pub struct ExternalIdentity {
    pub issuer: String,
    pub subject: String,
    pub organization_id: String,
    pub roles: Vec<String>,
    pub expires_at: i64,
}

#[derive(Default)]
struct JwksCache {
    keys: HashMap<String, Arc<Jwk>>,
    fetched_at: Option<Millis>,
}

struct IssuerState {
    config: TrustedIssuer,
    cache: Mutex<JwksCache>,
}

/// Verifies tokens of the configured trusted issuers.
pub struct OidcVerifier {
    issuers: HashMap<String, IssuerState>,
    http: reqwest::Client,
    clock: Arc<dyn Clock>,
    min_refresh_millis: Millis,
}

impl std::fmt::Debug for OidcVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OidcVerifier")
            .field("issuers", &self.issuers.keys().collect::<Vec<_>>())
            .finish()
    }
}

#[derive(Deserialize)]
struct Discovery {
    issuer: String,
    jwks_uri: String,
}

impl OidcVerifier {
    pub fn new(
        issuers: &[TrustedIssuer],
        clock: Arc<dyn Clock>,
        min_refresh_seconds: u64,
    ) -> Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .connect_timeout(Duration::from_secs(2))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(Error::internal)?;
        let issuers = issuers
            .iter()
            .map(|config| {
                let key = config.issuer.trim_end_matches('/').to_owned();
                (
                    key,
                    IssuerState {
                        config: config.clone(),
                        cache: Mutex::new(JwksCache::default()),
                    },
                )
            })
            .collect();
        Ok(Self {
            issuers,
            http,
            clock,
            min_refresh_millis: Millis::try_from(min_refresh_seconds).unwrap_or(i64::MAX / 2)
                * 1000,
        })
    }

    /// True when `issuer` is configured as trusted.
    pub fn is_trusted(&self, issuer: &str) -> bool {
        self.issuers.contains_key(issuer.trim_end_matches('/'))
    }

    /// The issuer exactly as configured (and as its tokens' `iss` and the
    /// stored organisation bindings spell it), for an issuer given with or
    /// without a trailing slash.
    pub fn canonical_issuer(&self, issuer: &str) -> Option<&str> {
        self.issuers
            .get(issuer.trim_end_matches('/'))
            .map(|state| state.config.issuer.as_str())
    }

    /// Verifies a token whose unverified `iss` is `issuer`.
    pub async fn verify(&self, token: &str, issuer: &str) -> Result<ExternalIdentity> {
        let state = self
            .issuers
            .get(issuer.trim_end_matches('/'))
            .ok_or(Error::Unauthenticated("issuer not trusted"))?;
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| Error::Unauthenticated("malformed token header"))?;
        if !ACCEPTED.contains(&header.alg) {
            return Err(Error::Unauthenticated("token algorithm not accepted"));
        }
        let kid = header
            .kid
            .ok_or(Error::Unauthenticated("token has no kid"))?;
        let jwk = self.key_for(state, &kid).await?;
        if jwk
            .common
            .key_algorithm
            .is_some_and(|alg| alg.to_string() != format!("{:?}", header.alg))
        {
            return Err(Error::Unauthenticated("token alg does not match its key"));
        }
        let decoding = DecodingKey::from_jwk(&jwk)
            .map_err(|_| Error::Unauthenticated("unusable issuer key"))?;
        if decoding.family() != header.alg.family() {
            return Err(Error::Unauthenticated(
                "token alg does not match its key type",
            ));
        }
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[&state.config.issuer]);
        validation.set_audience(&[&state.config.audience]);
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        let data = jsonwebtoken::decode::<Value>(token, &decoding, &validation)
            .map_err(|_| Error::Unauthenticated("token signature or claims invalid"))?;
        let claims = data.claims;
        check_time_claims(&claims, self.clock.now_seconds())?;
        let organization_id = claims
            .get(&state.config.tenant_claim)
            .and_then(Value::as_str)
            .filter(|org| !org.is_empty())
            .ok_or(Error::Unauthenticated("token has no organisation claim"))?
            .to_owned();
        let roles = match claims.get(&state.config.roles_claim) {
            Some(Value::Array(items)) => items
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect(),
            Some(Value::String(text)) => text.split_whitespace().map(str::to_owned).collect(),
            _ => Vec::new(),
        };
        let roles = roles
            .into_iter()
            .filter_map(|role: String| {
                role.strip_prefix(state.config.role_prefix.as_str())
                    .map(str::to_owned)
            })
            .collect();
        Ok(ExternalIdentity {
            issuer: state.config.issuer.clone(),
            subject: claims["sub"].as_str().unwrap_or_default().to_owned(),
            organization_id,
            roles,
            expires_at: claims["exp"].as_i64().unwrap_or_default(),
        })
    }

    async fn key_for(&self, state: &IssuerState, kid: &str) -> Result<Arc<Jwk>> {
        let mut cache = state.cache.lock().await;
        if let Some(key) = cache.keys.get(kid) {
            return Ok(key.clone());
        }
        let now = self.clock.now_millis();
        let may_refetch = cache
            .fetched_at
            .is_none_or(|at| now - at >= self.min_refresh_millis);
        if !may_refetch {
            return Err(Error::Unauthenticated("unknown kid"));
        }
        match self.fetch_jwks(&state.config).await {
            Ok(set) => {
                cache.keys = set
                    .keys
                    .into_iter()
                    .filter_map(|jwk| jwk.common.key_id.clone().map(|kid| (kid, Arc::new(jwk))))
                    .collect();
                cache.fetched_at = Some(now);
            }
            Err(err) => {
                tracing::warn!(issuer = %state.config.issuer, error = %err, "cannot fetch issuer keys");
                return Err(Error::Unauthenticated("issuer keys unavailable"));
            }
        }
        cache
            .keys
            .get(kid)
            .cloned()
            .ok_or(Error::Unauthenticated("unknown kid"))
    }

    async fn fetch_jwks(&self, config: &TrustedIssuer) -> anyhow::Result<JwkSet> {
        let discovery_url = format!(
            "{}/.well-known/openid-configuration",
            config.issuer.trim_end_matches('/')
        );
        let discovery: Discovery = self
            .http
            .get(&discovery_url)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        anyhow::ensure!(
            discovery.issuer.trim_end_matches('/') == config.issuer.trim_end_matches('/'),
            "discovery document names another issuer"
        );
        let set: JwkSet = self
            .http
            .get(&discovery.jwks_uri)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        Ok(set)
    }
}

/// Property tests of OIDC token verification against a real local issuer
/// (discovery and JWKS served over HTTP on 127.0.0.1, keys from a VaultGuard
/// key ring): arbitrary and tampered tokens are refused, never a panic.
#[cfg(test)]
mod props {
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use proptest::prelude::*;
    use proptest::test_runner::TestRunner;
    use serde_json::json;

    use super::*;
    use crate::clock::SystemClock;
    use crate::issuer::props::{kids, ring, runtime};
    use crate::issuer::{ALGORITHMS, IssuerKeys};
    use crate::props::{CRYPTO_CASES, b64, config, jws_like};

    /// Serves `keys`' JWKS and a discovery document naming `issuer`.
    async fn serve_issuer() -> (String, Arc<IssuerKeys>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let issuer = format!("http://{}", listener.local_addr().unwrap());
        let keys = Arc::new(ring(&issuer).await);
        let jwks = keys.jwks_json().await.unwrap();
        let discovery = json!({"issuer": issuer, "jwks_uri": format!("{issuer}/jwks")}).to_string();
        let app = axum::Router::new()
            .route(
                "/.well-known/openid-configuration",
                axum::routing::get(move || {
                    let body = discovery.clone();
                    async move { body }
                }),
            )
            .route(
                "/jwks",
                axum::routing::get(move || {
                    let body = jwks.clone();
                    async move { body }
                }),
            );
        tokio::spawn(async move { axum::serve(listener, app).await });
        (issuer, keys)
    }

    fn verifier(issuer: &str) -> OidcVerifier {
        let trusted = TrustedIssuer {
            issuer: issuer.to_owned(),
            audience: "vaultguard-console".to_owned(),
            tenant_claim: "org_id".to_owned(),
            roles_claim: "roles".to_owned(),
            role_prefix: String::new(),
        };
        OidcVerifier::new(&[trusted], Arc::new(SystemClock), 0).unwrap()
    }

    #[test]
    fn arbitrary_tokens_are_refused() {
        let rt = runtime();
        let (issuer, keys) = rt.block_on(serve_issuer());
        let oidc = verifier(&issuer);
        let kids = rt.block_on(kids(&keys));
        let mut runner = TestRunner::new(config(CRYPTO_CASES * 4));
        runner
            .run(&jws_like(kids), |token| {
                let verified = rt.block_on(oidc.verify(&token, &issuer));
                prop_assert!(verified.is_err(), "accepted {token}");
                Ok(())
            })
            .unwrap();
    }

    #[test]
    fn tampered_tokens_are_refused_and_genuine_ones_accepted() {
        let rt = runtime();
        let (issuer, keys) = rt.block_on(serve_issuer());
        let oidc = verifier(&issuer);
        let strategy = (
            prop::sample::select(ALGORITHMS.to_vec()),
            0usize..3,
            any::<prop::sample::Index>(),
            1u8..=255,
            crate::props::json_value(),
        );
        let mut runner = TestRunner::new(config(CRYPTO_CASES));
        runner
            .run(&strategy, |(algorithm, part, at, flip, roles)| {
                let now = SystemClock.now_seconds();
                let claims = json!({
                    "iss": issuer, "sub": "user-1", "aud": "vaultguard-console",
                    "exp": now + 600, "org_id": "org_1", "roles": roles,
                });
                let (token, _) = rt
                    .block_on(keys.sign_typed(algorithm, "JWT", &claims))
                    .unwrap();
                let identity = rt.block_on(oidc.verify(&token, &issuer));
                prop_assert!(
                    identity.is_ok(),
                    "refused a genuine token: {:?}",
                    identity.err()
                );

                let parts: Vec<&str> = token.split('.').collect();
                let mut decoded = URL_SAFE_NO_PAD.decode(parts[part]).unwrap();
                let i = at.index(decoded.len());
                decoded[i] ^= flip;
                let mut tampered: Vec<String> = parts.iter().map(|p| (*p).to_owned()).collect();
                tampered[part] = b64(&decoded);
                let verified = rt.block_on(oidc.verify(&tampered.join("."), &issuer));
                prop_assert!(verified.is_err(), "accepted a tampered token");
                Ok(())
            })
            .unwrap();
    }
}
