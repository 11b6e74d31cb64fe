//! Trusted OIDC issuers: tokens of tenant humans from Auth0, Okta, Keycloak….
//!
//! For each configured issuer the discovery document and the JWKS are fetched
//! through the outbound address policy's client ([`crate::outbound`]: an
//! issuer or `jwks_uri` on a loopback, private or metadata address is never
//! fetched) and cached:
//! - **Lifetime.** A fetched key set verifies without a new fetch for the
//!   JWKS answer's `Cache-Control: max-age`, bounded below by
//!   `jwks_min_refresh_seconds` and above by `jwks_max_age_seconds` (also the
//!   lifetime when the issuer names none). In the last tenth of the lifetime
//!   a verification starts a fetch in the background; past it, the set is
//!   fetched again before a key of it verifies, so a key the issuer removed
//!   stops verifying at the latest one lifetime after it was last fetched.
//! - **Unknown `kid`.** A token naming a `kid` the cache lacks triggers a
//!   fetch (at most once per `jwks_min_refresh_seconds`), which picks up the
//!   issuer's key rotations.
//! - **Failures back off.** A failed fetch (unreachable, non-2xx, a
//!   discovery document naming another issuer, not a JWKS) is retried no
//!   sooner than 1 s later, doubling per consecutive failure up to 60 s (and
//!   never sooner than `jwks_min_refresh_seconds`); meanwhile unknown kids are
//!   refused at once. The keys of an expired set keep verifying for
//!   `jwks_stale_grace_seconds` past its expiry while fetches fail, so an
//!   issuer outage does not lock its users out at once.
//! - **No lock across I/O.** The cache is behind a plain mutex held only to
//!   read or write it. A fetch runs as a task of its own; callers that need
//!   it (an unknown or expired kid) share it as one future (single flight),
//!   and callers whose kid is cached and fresh never wait for it.
//!
//! Only asymmetric algorithms are accepted, and the header's `alg` must
//! match the JWK's key type (and `alg`, when the JWK names one): no `none`,
//! no HS256 signed with a public key.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::Value;

use crate::clock::{Clock, Millis};
use crate::config::{Config, TrustedIssuer};
use crate::error::{Error, Result};
use crate::issuer::check_time_claims;
use crate::outbound::{self, Outbound};

const ACCEPTED: [Algorithm; 7] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// The first retry delay after a failed fetch; it doubles per consecutive
/// failure …
const FIRST_BACKOFF_MILLIS: Millis = 1_000;
/// … up to this.
const MAX_BACKOFF_MILLIS: Millis = 60_000;
/// The most bytes read of a discovery document or a JWKS.
const MAX_DOCUMENT_BYTES: usize = 256 * 1024;

/// What a trusted issuer's token says about its holder.
#[derive(Debug, Clone)]
pub struct ExternalIdentity {
    pub issuer: String,
    pub subject: String,
    pub organization_id: String,
    pub roles: Vec<String>,
    pub expires_at: i64,
}

/// A fetch in progress, awaited by every caller that needs its result.
type Flight = Shared<BoxFuture<'static, ()>>;

/// One issuer's cached keys and fetch state.
#[derive(Default)]
struct JwksCache {
    keys: HashMap<String, Arc<Jwk>>,
    /// The keys verify without a fetch until then (0: never fetched).
    expires_at: Millis,
    /// From then on a verification starts a background fetch.
    refresh_at: Millis,
    /// No fetch starts before then: the least interval after a success,
    /// the back-off after a failure.
    next_fetch_at: Millis,
    /// Consecutive failed fetches.
    failures: u32,
    /// The fetch in progress.
    in_flight: Option<Flight>,
}

struct IssuerState {
    config: TrustedIssuer,
    /// Held only to read or write the cache, never across a fetch.
    cache: Mutex<JwksCache>,
}

impl IssuerState {
    fn cache(&self) -> std::sync::MutexGuard<'_, JwksCache> {
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The cache's timing settings, in milliseconds.
#[derive(Debug, Clone, Copy)]
struct Timing {
    min_refresh: Millis,
    max_age: Millis,
    stale_grace: Millis,
}

/// What fetches need: the client, the clock and the timing.
struct Fetcher {
    http: outbound::Client,
    clock: Arc<dyn Clock>,
    timing: Timing,
}

/// Verifies tokens of the configured trusted issuers.
pub struct OidcVerifier {
    issuers: HashMap<String, Arc<IssuerState>>,
    fetcher: Arc<Fetcher>,
}

impl std::fmt::Debug for OidcVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OidcVerifier")
            .field("issuers", &self.issuers.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// What VaultGuard reads of an issuer's discovery document.
#[derive(Deserialize)]
struct Discovery {
    issuer: String,
    jwks_uri: String,
    /// The code flow's endpoints (the console's sign-in); an issuer that
    /// only verifies bearer tokens need not name them.
    #[serde(default)]
    authorization_endpoint: Option<String>,
    #[serde(default)]
    token_endpoint: Option<String>,
}

fn seconds_to_millis(seconds: u64) -> Millis {
    Millis::try_from(seconds)
        .unwrap_or(Millis::MAX / 2_000)
        .min(Millis::MAX / 2_000)
        * 1_000
}

/// The `max-age` of a `Cache-Control` value in seconds; 0 for `no-store`
/// and `no-cache`; `None` when it names no lifetime.
fn cache_max_age(value: &str) -> Option<u64> {
    let mut max_age = None;
    for directive in value.split(',') {
        let directive = directive.trim().to_ascii_lowercase();
        if directive == "no-store" || directive == "no-cache" {
            return Some(0);
        }
        if let Some(seconds) = directive.strip_prefix("max-age=") {
            max_age = seconds.trim_matches('"').parse().ok().or(max_age);
        }
    }
    max_age
}

/// A fetched key set's lifetime: the issuer's `max-age` (or the maximum
/// when it names none) within `[min_refresh, max_age]`, at least 1 s.
fn lifetime_millis(max_age: Option<u64>, timing: Timing) -> Millis {
    let ceiling = timing.max_age.max(1_000);
    let floor = timing.min_refresh.clamp(1_000, ceiling);
    max_age
        .map_or(ceiling, seconds_to_millis)
        .clamp(floor, ceiling)
}

/// The delay before the next fetch after `failures` consecutive failures.
fn backoff_millis(failures: u32, min_refresh: Millis) -> Millis {
    let doublings = failures.saturating_sub(1).min(20);
    FIRST_BACKOFF_MILLIS
        .saturating_mul(1 << doublings)
        .min(MAX_BACKOFF_MILLIS)
        .max(min_refresh)
}

impl OidcVerifier {
    /// A verifier of `config`'s trusted issuers, fetching through
    /// `outbound`'s client. An issuer URL whose host is an IP literal the
    /// outbound policy forbids is refused here, at startup.
    pub fn new(
        config: &Config,
        clock: Arc<dyn Clock>,
        outbound: &Outbound,
    ) -> anyhow::Result<Self> {
        let http = outbound.client(outbound::ClientOptions {
            timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
            user_agent: concat!("VaultGuard/", env!("CARGO_PKG_VERSION")),
        })?;
        let mut issuers = HashMap::new();
        for (i, issuer) in config.trusted_issuers.iter().enumerate() {
            let parsed = reqwest::Url::parse(&issuer.issuer).map_err(|_| {
                anyhow::anyhow!(
                    "trusted_issuers[{i}].issuer: {:?} is not a URL",
                    issuer.issuer
                )
            })?;
            anyhow::ensure!(
                outbound.literal_permitted(&parsed),
                "trusted_issuers[{i}].issuer: {:?} is an address the outbound address policy forbids \
                 (loopback, private, link-local …); list its network in outbound_allowed_networks \
                 to reach it",
                issuer.issuer
            );
            let key = issuer.issuer.trim_end_matches('/').to_owned();
            issuers.insert(
                key,
                Arc::new(IssuerState {
                    config: issuer.clone(),
                    cache: Mutex::new(JwksCache::default()),
                }),
            );
        }
        Ok(Self {
            issuers,
            fetcher: Arc::new(Fetcher {
                http,
                clock,
                timing: Timing {
                    min_refresh: seconds_to_millis(config.jwks_min_refresh_seconds),
                    max_age: seconds_to_millis(config.jwks_max_age_seconds),
                    stale_grace: seconds_to_millis(config.jwks_stale_grace_seconds),
                },
            }),
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
        let state = self.issuer_state(issuer)?;
        let claims = self
            .verified_claims(state, token, &state.config.audience)
            .await?;
        identity_from_claims(&state.config, &claims)
    }

    /// Verifies an ID token the console received from `issuer`'s token
    /// endpoint: signed by the issuer's keys, `aud` the console's client,
    /// unexpired, carrying the sign-in's `nonce`; then maps organisation and
    /// roles exactly as [`Self::verify`] maps a bearer token's.
    pub async fn verify_id_token(
        &self,
        token: &str,
        issuer: &str,
        client_id: &str,
        nonce: &str,
    ) -> Result<ExternalIdentity> {
        let state = self.issuer_state(issuer)?;
        let claims = self.verified_claims(state, token, client_id).await?;
        if claims.get("nonce").and_then(Value::as_str) != Some(nonce) {
            return Err(Error::Unauthenticated("ID token nonce does not match"));
        }
        identity_from_claims(&state.config, &claims)
    }

    /// The issuer's authorization and token endpoints, from its discovery
    /// document (fetched each time: sign-ins are rare).
    pub async fn endpoints(&self, issuer: &str) -> anyhow::Result<Endpoints> {
        let state = self.issuer_state(issuer)?;
        let discovery = fetch_discovery(&self.fetcher.http, &state.config).await?;
        match (discovery.authorization_endpoint, discovery.token_endpoint) {
            (Some(authorization_endpoint), Some(token_endpoint)) => Ok(Endpoints {
                authorization_endpoint,
                token_endpoint,
            }),
            _ => anyhow::bail!("discovery document names no authorization or token endpoint"),
        }
    }

    fn issuer_state(&self, issuer: &str) -> Result<&Arc<IssuerState>> {
        self.issuers
            .get(issuer.trim_end_matches('/'))
            .ok_or(Error::Unauthenticated("issuer not trusted"))
    }

    /// The claims of `token`, signed by one of `state`'s issuer keys, with
    /// that `iss`, audience `audience` and valid time claims.
    async fn verified_claims(
        &self,
        state: &Arc<IssuerState>,
        token: &str,
        audience: &str,
    ) -> Result<Value> {
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
        validation.set_audience(&[audience]);
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        let data = jsonwebtoken::decode::<Value>(token, &decoding, &validation)
            .map_err(|_| Error::Unauthenticated("token signature or claims invalid"))?;
        let claims = data.claims;
        check_time_claims(&claims, self.fetcher.clock.now_seconds())?;
        Ok(claims)
    }

    /// The key `kid` of `state`'s issuer: from the cache while it is fresh;
    /// otherwise after the fetch in progress or a new one (unless backed
    /// off); a stale key while fetches fail, within the grace.
    async fn key_for(&self, state: &Arc<IssuerState>, kid: &str) -> Result<Arc<Jwk>> {
        let mut waited = false;
        loop {
            let now = self.fetcher.clock.now_millis();
            let flight = {
                let mut cache = state.cache();
                let known = cache.keys.get(kid).cloned();
                let may_fetch = now >= cache.next_fetch_at;
                let in_flight = cache
                    .in_flight
                    .clone()
                    .filter(|flight| flight.peek().is_none());
                if let Some(key) = known.clone()
                    && now < cache.expires_at
                {
                    if now >= cache.refresh_at && may_fetch && in_flight.is_none() {
                        // Refresh ahead, without waiting for it.
                        drop(start_fetch(&self.fetcher, state, &mut cache));
                    }
                    return Ok(key);
                }
                if waited {
                    return self.stale_or_refused(&state.config, &cache, known, now);
                }
                match in_flight {
                    Some(flight) => flight,
                    None if may_fetch => start_fetch(&self.fetcher, state, &mut cache),
                    None => return self.stale_or_refused(&state.config, &cache, known, now),
                }
            };
            flight.await;
            waited = true;
        }
    }

    /// The answer when no fetch can help now: an expired key while its
    /// issuer's fetches fail, within the grace; otherwise a refusal.
    fn stale_or_refused(
        &self,
        config: &TrustedIssuer,
        cache: &JwksCache,
        known: Option<Arc<Jwk>>,
        now: Millis,
    ) -> Result<Arc<Jwk>> {
        let failing = cache.failures > 0;
        match known {
            Some(key)
                if failing
                    && now
                        < cache
                            .expires_at
                            .saturating_add(self.fetcher.timing.stale_grace) =>
            {
                tracing::debug!(issuer = %config.issuer, "serving an expired issuer key while its fetches fail");
                Ok(key)
            }
            Some(_) if failing => Err(Error::Unauthenticated(
                "issuer keys expired and unavailable",
            )),
            None if failing => Err(Error::Unauthenticated("issuer keys unavailable")),
            _ => Err(Error::Unauthenticated("unknown kid")),
        }
    }
}

/// Starts a fetch of `state`'s key set as a task of its own (it finishes,
/// and stores its result, even if every caller waiting for it goes away)
/// and records it as the one in progress.
fn start_fetch(fetcher: &Arc<Fetcher>, state: &Arc<IssuerState>, cache: &mut JwksCache) -> Flight {
    let task = tokio::spawn(fetch_and_store(fetcher.clone(), state.clone()));
    let flight = async move {
        let _ = task.await;
    }
    .boxed()
    .shared();
    cache.in_flight = Some(flight.clone());
    flight
}

/// Fetches the key set and writes the outcome into the cache: new keys
/// and lifetime, or one more failure and its back-off (the old keys kept).
async fn fetch_and_store(fetcher: Arc<Fetcher>, state: Arc<IssuerState>) {
    metrics::counter!("vaultguard_jwks_fetches_total").increment(1);
    let fetched = fetch_jwks(&fetcher.http, &state.config).await;
    let now = fetcher.clock.now_millis();
    let timing = fetcher.timing;
    let mut cache = state.cache();
    match fetched {
        Ok((set, max_age)) => {
            let lifetime = lifetime_millis(max_age, timing);
            cache.keys = set
                .keys
                .into_iter()
                .filter_map(|jwk| jwk.common.key_id.clone().map(|kid| (kid, Arc::new(jwk))))
                .collect();
            cache.expires_at = now.saturating_add(lifetime);
            cache.refresh_at = now.saturating_add(lifetime - lifetime / 10);
            cache.next_fetch_at = now.saturating_add(timing.min_refresh);
            cache.failures = 0;
        }
        Err(err) => {
            cache.failures = cache.failures.saturating_add(1);
            let backoff = backoff_millis(cache.failures, timing.min_refresh);
            cache.next_fetch_at = now.saturating_add(backoff);
            metrics::counter!("vaultguard_jwks_fetch_failures_total").increment(1);
            tracing::warn!(
                issuer = %state.config.issuer,
                error = %err,
                failures = cache.failures,
                retry_in_ms = backoff,
                "cannot fetch issuer keys"
            );
        }
    }
    cache.in_flight = None;
}

/// GETs `url` and reads at most [`MAX_DOCUMENT_BYTES`] of a 2xx answer.
async fn get_document(
    http: &outbound::Client,
    url: &str,
) -> anyhow::Result<(Vec<u8>, reqwest::header::HeaderMap)> {
    let mut response = http.get(url)?.send().await.map_err(|err| {
        if outbound::is_forbidden_error(&err) {
            anyhow::anyhow!("{}", outbound::Refusal::ForbiddenAddress)
        } else {
            anyhow::anyhow!(err.without_url())
        }
    })?;
    let status = response.status();
    anyhow::ensure!(status.is_success(), "answered HTTP {}", status.as_u16());
    let headers = response.headers().clone();
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|err| anyhow::anyhow!(err.without_url()))?
    {
        anyhow::ensure!(
            body.len() + chunk.len() <= MAX_DOCUMENT_BYTES,
            "the document is larger than {MAX_DOCUMENT_BYTES} bytes"
        );
        body.extend_from_slice(&chunk);
    }
    Ok((body, headers))
}

/// An issuer's endpoints for the authorization-code flow.
#[derive(Debug, Clone)]
pub struct Endpoints {
    pub authorization_endpoint: String,
    pub token_endpoint: String,
}

/// The holder a verified token's claims describe: the organisation from
/// `tenant_claim`, the roles from `roles_claim` (an array or a
/// space-separated string) that carry `role_prefix`, stripped of it.
fn identity_from_claims(config: &TrustedIssuer, claims: &Value) -> Result<ExternalIdentity> {
    let organization_id = claims
        .get(&config.tenant_claim)
        .and_then(Value::as_str)
        .filter(|org| !org.is_empty())
        .ok_or(Error::Unauthenticated("token has no organisation claim"))?
        .to_owned();
    let roles = match claims.get(&config.roles_claim) {
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
            role.strip_prefix(config.role_prefix.as_str())
                .map(str::to_owned)
        })
        .collect();
    Ok(ExternalIdentity {
        issuer: config.issuer.clone(),
        subject: claims["sub"].as_str().unwrap_or_default().to_owned(),
        organization_id,
        roles,
        expires_at: claims["exp"].as_i64().unwrap_or_default(),
    })
}

/// The issuer's discovery document, which must name the issuer itself.
async fn fetch_discovery(
    http: &outbound::Client,
    config: &TrustedIssuer,
) -> anyhow::Result<Discovery> {
    let discovery_url = format!(
        "{}/.well-known/openid-configuration",
        config.issuer.trim_end_matches('/')
    );
    let (body, _) = get_document(http, &discovery_url).await?;
    let discovery: Discovery = serde_json::from_slice(&body)?;
    anyhow::ensure!(
        discovery.issuer.trim_end_matches('/') == config.issuer.trim_end_matches('/'),
        "discovery document names another issuer"
    );
    Ok(discovery)
}

/// The issuer's key set (through its discovery document) and the JWKS
/// answer's `max-age`.
async fn fetch_jwks(
    http: &outbound::Client,
    config: &TrustedIssuer,
) -> anyhow::Result<(JwkSet, Option<u64>)> {
    let discovery = fetch_discovery(http, config).await?;
    let (body, headers) = get_document(http, &discovery.jwks_uri).await?;
    let set: JwkSet = serde_json::from_slice(&body)?;
    let max_age = headers
        .get(reqwest::header::CACHE_CONTROL)
        .and_then(|value| value.to_str().ok())
        .and_then(cache_max_age);
    Ok((set, max_age))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMING: Timing = Timing {
        min_refresh: 10_000,
        max_age: 3_600_000,
        stale_grace: 900_000,
    };

    #[test]
    fn cache_control_names_the_lifetime() {
        assert_eq!(cache_max_age("public, max-age=120"), Some(120));
        assert_eq!(cache_max_age("Max-Age=\"60\", must-revalidate"), Some(60));
        assert_eq!(cache_max_age("no-store"), Some(0));
        assert_eq!(cache_max_age("private, no-cache, max-age=600"), Some(0));
        assert_eq!(cache_max_age("public"), None);
        assert_eq!(cache_max_age("max-age=soon"), None);
    }

    #[test]
    fn lifetimes_stay_within_the_configured_bounds() {
        assert_eq!(lifetime_millis(Some(120), TIMING), 120_000);
        assert_eq!(lifetime_millis(None, TIMING), 3_600_000);
        assert_eq!(lifetime_millis(Some(86_400 * 365), TIMING), 3_600_000);
        assert_eq!(lifetime_millis(Some(0), TIMING), 10_000);
        assert_eq!(lifetime_millis(Some(u64::MAX), TIMING), 3_600_000);
        let zero = Timing {
            min_refresh: 0,
            max_age: 0,
            stale_grace: 0,
        };
        assert_eq!(lifetime_millis(Some(0), zero), 1_000);
        assert_eq!(lifetime_millis(None, zero), 1_000);
    }

    #[test]
    fn failed_fetches_back_off_exponentially_up_to_a_minute() {
        let delays: Vec<Millis> = (1..=8).map(|n| backoff_millis(n, 0)).collect();
        assert_eq!(
            delays,
            [1_000, 2_000, 4_000, 8_000, 16_000, 32_000, 60_000, 60_000]
        );
        assert_eq!(backoff_millis(u32::MAX, 0), 60_000);
        assert_eq!(backoff_millis(1, 10_000), 10_000);
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
            ..Default::default()
        };
        let config = Config {
            trusted_issuers: vec![trusted],
            jwks_min_refresh_seconds: 0,
            outbound_allowed_networks: vec!["127.0.0.0/8".to_owned()],
            ..Config::default()
        };
        let outbound = Outbound::from_config(&config).unwrap();
        OidcVerifier::new(&config, Arc::new(SystemClock), &outbound).unwrap()
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
