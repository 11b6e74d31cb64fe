//! VaultGuard's own token-signing keys and the JWTs it signs with them.
//!
//! Keys are generated here (aws-lc-rs), stored as PKCS#8 sealed under the
//! master key, and held in memory already parsed, so signing never re-parses
//! a private key. One key per algorithm is ACTIVE; rotation retires the old
//! one, which stays in the JWKS until every token it signed has expired
//! (`publish_until` = retirement + the longest token lifetime).
//!
//! Verification of VaultGuard tokens pins the algorithm to the key named by
//! `kid` (no algorithm confusion, no `none`), checks `typ`, issuer and
//! audience with jsonwebtoken, and checks time against the injected clock.

use std::collections::HashMap;
use std::sync::Arc;

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rsa::KeySize;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair, KeyPair, RSA_PKCS1_SHA256,
    RsaKeyPair,
};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use sea_orm::{
    ActiveModelTrait, ActiveValue::Set, ColumnTrait, DatabaseConnection, EntityTrait, QueryFilter,
    QueryOrder,
};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::sync::RwLock;
use vaultguard_proto::v1::TokenAlgorithm;

use crate::audit::{self, AuditCtx, Outcome, PLATFORM_LOG};
use crate::clock::{Clock, Millis};
use crate::crypto::{MasterKey, SealContext, random_token};
use crate::error::{Error, Result, is_unique_violation};
use crate::store::entities::issuer_key;
use crate::store::lifecycle::Transitions;

/// Every algorithm VaultGuard signs with.
pub const ALGORITHMS: [TokenAlgorithm; 3] = [
    TokenAlgorithm::Rs256,
    TokenAlgorithm::Es256,
    TokenAlgorithm::Eddsa,
];

/// The stored name of an algorithm.
pub fn algorithm_name(algorithm: TokenAlgorithm) -> &'static str {
    match algorithm {
        TokenAlgorithm::Es256 => "ES256",
        TokenAlgorithm::Eddsa => "EdDSA",
        TokenAlgorithm::Rs256 | TokenAlgorithm::Unspecified => "RS256",
    }
}

/// Parses a stored algorithm name.
pub fn parse_algorithm(name: &str) -> Option<TokenAlgorithm> {
    ALGORITHMS
        .into_iter()
        .find(|alg| algorithm_name(*alg) == name)
}

fn jwt_algorithm(algorithm: TokenAlgorithm) -> Algorithm {
    match algorithm {
        TokenAlgorithm::Es256 => Algorithm::ES256,
        TokenAlgorithm::Eddsa => Algorithm::EdDSA,
        TokenAlgorithm::Rs256 | TokenAlgorithm::Unspecified => Algorithm::RS256,
    }
}

enum Signer {
    Rsa(RsaKeyPair),
    Ecdsa(EcdsaKeyPair),
    Ed25519(Ed25519KeyPair),
}

impl Signer {
    fn from_pkcs8(algorithm: TokenAlgorithm, der: &[u8]) -> Result<Self> {
        let rejected = |_| Error::internal("stored issuer key rejected");
        Ok(match algorithm {
            TokenAlgorithm::Es256 => Self::Ecdsa(
                EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der)
                    .map_err(rejected)?,
            ),
            TokenAlgorithm::Eddsa => {
                Self::Ed25519(Ed25519KeyPair::from_pkcs8(der).map_err(rejected)?)
            }
            TokenAlgorithm::Rs256 | TokenAlgorithm::Unspecified => {
                Self::Rsa(RsaKeyPair::from_pkcs8(der).map_err(rejected)?)
            }
        })
    }

    fn sign(&self, message: &[u8]) -> Result<Vec<u8>> {
        let rng = aws_lc_rs::rand::SystemRandom::new();
        match self {
            Self::Rsa(pair) => {
                let mut signature = vec![0u8; pair.public_modulus_len()];
                pair.sign(&RSA_PKCS1_SHA256, &rng, message, &mut signature)
                    .map_err(|_| Error::internal("RS256 signing failed"))?;
                Ok(signature)
            }
            Self::Ecdsa(pair) => pair
                .sign(&rng, message)
                .map(|s| s.as_ref().to_vec())
                .map_err(|_| Error::internal("ES256 signing failed")),
            Self::Ed25519(pair) => Ok(pair.sign(message).as_ref().to_vec()),
        }
    }

    /// The public JWK (without `kid`) and the matching decoding key.
    fn public_parts(&self) -> Result<(Value, DecodingKey)> {
        let b64 = |bytes: &[u8]| URL_SAFE_NO_PAD.encode(bytes);
        match self {
            Self::Rsa(pair) => {
                let public = pair.public_key();
                let n = public.modulus().big_endian_without_leading_zero().to_vec();
                let e = public.exponent().big_endian_without_leading_zero().to_vec();
                let jwk =
                    json!({"kty": "RSA", "alg": "RS256", "use": "sig", "n": b64(&n), "e": b64(&e)});
                Ok((jwk, DecodingKey::from_rsa_raw_components(&n, &e)))
            }
            Self::Ecdsa(pair) => {
                let point = pair.public_key().as_ref();
                if point.len() != 65 || point[0] != 4 {
                    return Err(Error::internal("unexpected P-256 public key encoding"));
                }
                let (x, y) = (b64(&point[1..33]), b64(&point[33..65]));
                let decoding = DecodingKey::from_ec_components(&x, &y).map_err(Error::internal)?;
                Ok((
                    json!({"kty": "EC", "alg": "ES256", "use": "sig", "crv": "P-256", "x": x, "y": y}),
                    decoding,
                ))
            }
            Self::Ed25519(pair) => {
                let x = b64(pair.public_key().as_ref());
                let decoding = DecodingKey::from_ed_components(&x).map_err(Error::internal)?;
                Ok((
                    json!({"kty": "OKP", "alg": "EdDSA", "use": "sig", "crv": "Ed25519", "x": x}),
                    decoding,
                ))
            }
        }
    }
}

fn generate_pkcs8(algorithm: TokenAlgorithm) -> Result<Vec<u8>> {
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let failed = |_| Error::internal("issuer key generation failed");
    Ok(match algorithm {
        TokenAlgorithm::Es256 => {
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
                .map_err(failed)?
                .as_ref()
                .to_vec()
        }
        TokenAlgorithm::Eddsa => Ed25519KeyPair::generate_pkcs8(&rng)
            .map_err(failed)?
            .as_ref()
            .to_vec(),
        TokenAlgorithm::Rs256 | TokenAlgorithm::Unspecified => {
            let pair = aws_lc_rs::rsa::KeyPair::generate(KeySize::Rsa2048).map_err(failed)?;
            pair.as_der().map_err(failed)?.as_ref().to_vec()
        }
    })
}

struct ActiveKey {
    kid: String,
    signer: Signer,
}

struct PublishedKey {
    algorithm: TokenAlgorithm,
    decoding: DecodingKey,
    jwk: Value,
    publish_until: Option<Millis>,
}

#[derive(Default)]
struct Ring {
    active: HashMap<i32, Arc<ActiveKey>>,
    published: HashMap<String, Arc<PublishedKey>>,
    loaded_at: Millis,
}

/// The key ring of this process, reloaded from the database when a token
/// names an unknown `kid` (a key rotated by another replica) and every
/// 30 seconds, so that every replica signs with the current key.
pub struct IssuerKeys {
    db: DatabaseConnection,
    master: Arc<MasterKey>,
    clock: Arc<dyn Clock>,
    issuer: String,
    max_token_ttl_millis: Millis,
    ring: RwLock<Ring>,
    reload_lock: tokio::sync::Mutex<()>,
    verified: VerifiedCache,
}

impl std::fmt::Debug for IssuerKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuerKeys")
            .field("issuer", &self.issuer)
            .finish_non_exhaustive()
    }
}

const RING_MAX_AGE_MILLIS: Millis = 30_000;

/// The least time between two reloads triggered by unknown `kid`s.
const UNKNOWN_KID_RELOAD_MILLIS: Millis = 1_000;

/// What a verified VaultGuard token says, with its raw claims.
#[derive(Debug, Clone)]
pub struct VerifiedToken<C> {
    pub kid: String,
    pub claims: C,
}

impl IssuerKeys {
    /// Loads the ring, generating the ACTIVE key of each algorithm that has none.
    pub async fn load(
        db: DatabaseConnection,
        master: Arc<MasterKey>,
        clock: Arc<dyn Clock>,
        issuer: String,
        max_token_ttl_seconds: u32,
    ) -> Result<Self> {
        let keys = Self {
            db,
            master,
            clock,
            issuer,
            max_token_ttl_millis: Millis::from(max_token_ttl_seconds) * 1000,
            ring: RwLock::new(Ring::default()),
            reload_lock: tokio::sync::Mutex::new(()),
            verified: VerifiedCache::default(),
        };
        keys.reload().await?;
        let missing: Vec<TokenAlgorithm> = {
            let ring = keys.ring.read().await;
            ALGORITHMS
                .into_iter()
                .filter(|alg| !ring.active.contains_key(&(*alg as i32)))
                .collect()
        };
        for algorithm in missing {
            keys.create_active(algorithm, &AuditCtx::system("startup"))
                .await?;
        }
        Ok(keys)
    }

    /// The `iss` of every VaultGuard token.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// Generates and stores a new ACTIVE key for `algorithm`, retiring the
    /// current one in the same transaction. Returns the new and retired rows.
    pub async fn rotate(
        &self,
        algorithm: TokenAlgorithm,
        ctx: &AuditCtx,
    ) -> Result<(issuer_key::Model, Option<issuer_key::Model>)> {
        self.create_active(algorithm, ctx).await
    }

    async fn create_active(
        &self,
        algorithm: TokenAlgorithm,
        ctx: &AuditCtx,
    ) -> Result<(issuer_key::Model, Option<issuer_key::Model>)> {
        let pkcs8 = tokio::task::spawn_blocking(move || generate_pkcs8(algorithm))
            .await
            .map_err(Error::internal)??;
        let signer = Signer::from_pkcs8(algorithm, &pkcs8)?;
        let kid = format!(
            "{}-{}",
            algorithm_name(algorithm).to_lowercase(),
            random_token(12)?
        );
        let (mut jwk, _) = signer.public_parts()?;
        jwk["kid"] = Value::String(kid.clone());
        let sealed = self.master.seal(
            SealContext {
                table: "issuer_keys",
                tenant_id: PLATFORM_LOG,
                record_id: &kid,
            },
            &pkcs8,
        )?;
        let now = self.clock.now_millis();
        let alg_name = algorithm_name(algorithm);

        let txn = crate::store::begin(&self.db).await?;
        let current = issuer_key::Entity::find()
            .filter(issuer_key::Column::Algorithm.eq(alg_name))
            .filter(issuer_key::Column::Status.eq(issuer_key::Status::Active))
            .one(&txn)
            .await?;
        let retired = match current {
            Some(mut retiring) => {
                let publish_until = now + self.max_token_ttl_millis;
                let updated = issuer_key::Entity::update_many()
                    .into_state(issuer_key::Status::Retired)
                    .col_expr(
                        issuer_key::Column::RetiredAt,
                        sea_orm::sea_query::Expr::value(Some(now)),
                    )
                    .col_expr(
                        issuer_key::Column::PublishUntil,
                        sea_orm::sea_query::Expr::value(Some(publish_until)),
                    )
                    .filter(issuer_key::Column::Kid.eq(retiring.kid.clone()))
                    .exec(&txn)
                    .await?;
                // None when a concurrent rotation retired it first: its new
                // key then refuses this one below.
                (updated.rows_affected == 1).then(|| {
                    retiring.status = issuer_key::Status::Retired;
                    retiring.retired_at = Some(now);
                    retiring.publish_until = Some(publish_until);
                    retiring
                })
            }
            None => None,
        };
        let inserted = issuer_key::ActiveModel {
            kid: Set(kid.clone()),
            algorithm: Set(alg_name.to_owned()),
            status: Set(issuer_key::Status::Active),
            private_key_ciphertext: Set(sealed),
            public_jwk: Set(jwk.to_string()),
            created_at: Set(now),
            retired_at: Set(None),
            publish_until: Set(None),
        }
        .insert(&txn)
        .await;
        let inserted = match inserted {
            Ok(row) => row,
            Err(err) if is_unique_violation(&err) => {
                // Another replica created the active key first: use its key.
                txn.rollback().await?;
                self.reload().await?;
                return Err(Error::Conflict(
                    "another replica rotated this key at the same time",
                ));
            }
            Err(err) => return Err(err.into()),
        };
        let mut subjects = vec![kid.clone()];
        if let Some(old) = &retired {
            subjects.push(old.kid.clone());
        }
        audit::append(
            &txn,
            self.clock.as_ref(),
            ctx.event(
                PLATFORM_LOG,
                "issuer_key.rotated",
                subjects,
                Outcome::Success,
                json!({"algorithm": alg_name, "kid": kid, "retired_kid": retired.as_ref().map(|r| r.kid.clone())}),
            ),
        )
        .await?;
        txn.commit().await?;
        self.reload().await?;
        tracing::info!(kid = %inserted.kid, algorithm = alg_name, "issuer key activated");
        Ok((inserted, retired))
    }

    /// Re-reads every published key from the database.
    pub async fn reload(&self) -> Result<()> {
        let _guard = self.reload_lock.lock().await;
        let now = self.clock.now_millis();
        let rows = issuer_key::Entity::find().all(&self.db).await?;
        let mut ring = Ring {
            loaded_at: now,
            ..Ring::default()
        };
        for row in rows {
            if row.publish_until.is_some_and(|until| until <= now) {
                continue;
            }
            let Some(algorithm) = parse_algorithm(&row.algorithm) else {
                continue;
            };
            let pkcs8 = self.master.open(
                SealContext {
                    table: "issuer_keys",
                    tenant_id: PLATFORM_LOG,
                    record_id: &row.kid,
                },
                &row.private_key_ciphertext,
            )?;
            let signer = Signer::from_pkcs8(algorithm, &pkcs8)?;
            let (_, decoding) = signer.public_parts()?;
            let jwk: Value = serde_json::from_str(&row.public_jwk).map_err(Error::internal)?;
            ring.published.insert(
                row.kid.clone(),
                Arc::new(PublishedKey {
                    algorithm,
                    decoding,
                    jwk,
                    publish_until: row.publish_until,
                }),
            );
            if row.status == issuer_key::Status::Active {
                ring.active.insert(
                    algorithm as i32,
                    Arc::new(ActiveKey {
                        kid: row.kid,
                        signer,
                    }),
                );
            }
        }
        *self.ring.write().await = ring;
        Ok(())
    }

    async fn reload_if_stale(&self) -> Result<()> {
        let stale =
            self.clock.now_millis() - self.ring.read().await.loaded_at > RING_MAX_AGE_MILLIS;
        if stale { self.reload().await } else { Ok(()) }
    }

    /// Signs `claims` as a JWT with header `typ: at+jwt` and the active key of
    /// `algorithm`. Returns the token and the `kid` used.
    pub async fn sign(
        &self,
        algorithm: TokenAlgorithm,
        claims: &Value,
    ) -> Result<(String, String)> {
        self.sign_typed(algorithm, "at+jwt", claims).await
    }

    /// Signs `claims` as a compact JWS with header `typ` and the active key
    /// of `algorithm` (receipts use their own `typ`, so they can never pass
    /// for access or delegation tokens). Returns the JWS and the `kid`.
    pub async fn sign_typed(
        &self,
        algorithm: TokenAlgorithm,
        typ: &str,
        claims: &Value,
    ) -> Result<(String, String)> {
        self.reload_if_stale().await?;
        let key = self
            .ring
            .read()
            .await
            .active
            .get(&(algorithm as i32))
            .cloned()
            .ok_or_else(|| Error::internal("no active issuer key"))?;
        let header = json!({"alg": algorithm_name(algorithm), "typ": typ, "kid": key.kid});
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let signature = key.signer.sign(signing_input.as_bytes())?;
        Ok((
            format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(signature)),
            key.kid.clone(),
        ))
    }

    /// Verifies a VaultGuard token: known `kid`, the algorithm of that key,
    /// `typ: at+jwt`, our issuer, `audience`, and `nbf <= now < exp` on the
    /// injected clock (30 s leeway on `nbf` only).
    pub async fn verify<C: DeserializeOwned>(
        &self,
        token: &str,
        audience: &str,
    ) -> Result<VerifiedToken<C>> {
        let VerifiedToken { kid, claims } = self.verify_shared(token, audience).await?;
        let claims = C::deserialize(claims.as_ref())
            .map_err(|_| Error::Unauthenticated("token claims malformed"))?;
        Ok(VerifiedToken { kid, claims })
    }

    /// [`Self::verify`] answering the claims as held by the verification
    /// cache, without copying them (hot paths that read a few claims).
    pub async fn verify_shared(
        &self,
        token: &str,
        audience: &str,
    ) -> Result<VerifiedToken<Arc<Value>>> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| Error::Unauthenticated("malformed token header"))?;
        if header.typ.as_deref() != Some("at+jwt") {
            return Err(Error::Unauthenticated("token typ is not at+jwt"));
        }
        let (kid, key, algorithm) = self.key_of(header).await?;
        // Everything above is re-checked on every call (the key may have
        // left the JWKS since); the signature, issuer and audience of a
        // byte-identical token are not, once they passed.
        let fingerprint = VerifiedCache::fingerprint(token, audience);
        let claims = match self.verified.get(&fingerprint) {
            Some(claims) => claims,
            None => {
                let mut validation = Validation::new(algorithm);
                validation.set_issuer(&[&self.issuer]);
                validation.set_audience(&[audience]);
                validation.validate_exp = false;
                validation.validate_nbf = false;
                validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
                let data = jsonwebtoken::decode::<Value>(token, &key.decoding, &validation)
                    .map_err(|_| Error::Unauthenticated("token signature or claims invalid"))?;
                let claims = Arc::new(data.claims);
                self.verified
                    .insert(fingerprint, claims.clone(), self.clock.now_seconds());
                claims
            }
        };
        check_time_claims(&claims, self.clock.now_seconds())?;
        Ok(VerifiedToken { kid, claims })
    }

    /// Verifies a statement this issuer signed with [`Self::sign_typed`]
    /// (an audit receipt): header `typ`, a published key of its `kid` and
    /// that key's algorithm, the signature and our `iss`. Statements carry
    /// no audience or expiry; the caller checks their claims.
    pub async fn verify_typed(&self, token: &str, typ: &str) -> Result<Value> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| Error::Unauthenticated("malformed token header"))?;
        if header.typ.as_deref() != Some(typ) {
            return Err(Error::Unauthenticated("token typ does not match"));
        }
        let (_, key, algorithm) = self.key_of(header).await?;
        let mut validation = Validation::new(algorithm);
        validation.set_issuer(&[&self.issuer]);
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        validation.set_required_spec_claims(&["iss"]);
        jsonwebtoken::decode::<Value>(token, &key.decoding, &validation)
            .map(|data| data.claims)
            .map_err(|_| Error::Unauthenticated("token signature or claims invalid"))
    }

    /// The published key a token's header names, with its algorithm, which
    /// the header's `alg` must be.
    async fn key_of(
        &self,
        header: jsonwebtoken::Header,
    ) -> Result<(String, Arc<PublishedKey>, jsonwebtoken::Algorithm)> {
        let kid = header
            .kid
            .ok_or(Error::Unauthenticated("token has no kid"))?;
        let key = match self.published_key(&kid).await {
            Some(key) => key,
            None => {
                // A key rotated by another replica: reload, but at most once
                // per UNKNOWN_KID_RELOAD_MILLIS, since anyone can present a
                // made-up kid and a reload decrypts and parses every key.
                let age = self.clock.now_millis() - self.ring.read().await.loaded_at;
                if age >= UNKNOWN_KID_RELOAD_MILLIS {
                    self.reload().await?;
                }
                self.published_key(&kid)
                    .await
                    .ok_or(Error::Unauthenticated("unknown kid"))?
            }
        };
        let algorithm = jwt_algorithm(key.algorithm);
        if header.alg != algorithm {
            return Err(Error::Unauthenticated("token alg does not match its key"));
        }
        let now = self.clock.now_millis();
        if key.publish_until.is_some_and(|until| until <= now) {
            return Err(Error::Unauthenticated("signing key no longer published"));
        }
        Ok((kid, key, algorithm))
    }

    async fn published_key(&self, kid: &str) -> Option<Arc<PublishedKey>> {
        self.ring.read().await.published.get(kid).cloned()
    }

    /// The JWK Set of every published key, sorted by `kid` (consumers select
    /// keys by `kid`, not by position).
    pub async fn jwks_json(&self) -> Result<String> {
        self.reload_if_stale().await?;
        let now = self.clock.now_millis();
        let ring = self.ring.read().await;
        let mut keys: Vec<&Value> = ring
            .published
            .values()
            .filter(|key| key.publish_until.is_none_or(|until| until > now))
            .map(|key| &key.jwk)
            .collect();
        keys.sort_by_key(|jwk| jwk["kid"].as_str().unwrap_or_default().to_owned());
        Ok(json!({ "keys": keys }).to_string())
    }

    /// Every key row that is still published, newest first.
    pub async fn list(&self) -> Result<Vec<issuer_key::Model>> {
        let now = self.clock.now_millis();
        let rows = issuer_key::Entity::find()
            .order_by_desc(issuer_key::Column::CreatedAt)
            .all(&self.db)
            .await?;
        Ok(rows
            .into_iter()
            .filter(|row| row.publish_until.is_none_or(|until| until > now))
            .collect())
    }
}

/// Claims of tokens whose signature, issuer and audience were verified,
/// keyed by SHA-256 of the token and the audience it was verified for.
///
/// Agents present the same access token on every call until it expires, and
/// an RS256 verification costs ~45 µs of CPU — the largest part of admitting
/// a call, refused ones included. Only a byte-identical token verified for
/// the same audience hits, so a hit proves exactly what the verification
/// proved; the key's publication and the time claims are still checked on
/// every call. Bounded: when full, expired entries go, and if that is not
/// enough the cache starts over.
#[derive(Default)]
struct VerifiedCache {
    entries: std::sync::Mutex<HashMap<[u8; 32], Arc<Value>>>,
}

impl VerifiedCache {
    const CAPACITY: usize = 16_384;

    fn fingerprint(token: &str, audience: &str) -> [u8; 32] {
        let mut context = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
        context.update(audience.as_bytes());
        context.update(&[0]);
        context.update(token.as_bytes());
        let mut fingerprint = [0u8; 32];
        fingerprint.copy_from_slice(context.finish().as_ref());
        fingerprint
    }

    fn get(&self, fingerprint: &[u8; 32]) -> Option<Arc<Value>> {
        self.entries.lock().ok()?.get(fingerprint).cloned()
    }

    fn insert(&self, fingerprint: [u8; 32], claims: Arc<Value>, now: i64) {
        let Ok(mut entries) = self.entries.lock() else {
            return;
        };
        if entries.len() >= Self::CAPACITY {
            entries.retain(|_, claims| claims["exp"].as_i64().is_some_and(|exp| exp > now));
            if entries.len() >= Self::CAPACITY {
                entries.clear();
            }
        }
        entries.insert(fingerprint, claims);
    }
}

/// Checks `exp` (required, strictly in the future) and `nbf` (if present,
/// not more than 30 s ahead) against `now` in seconds.
pub fn check_time_claims(claims: &Value, now: i64) -> Result<()> {
    const LEEWAY: i64 = 30;
    let exp = claims["exp"]
        .as_i64()
        .ok_or(Error::Unauthenticated("token has no exp"))?;
    if exp <= now {
        return Err(Error::Unauthenticated("token expired"));
    }
    if let Some(nbf) = claims.get("nbf").and_then(Value::as_i64)
        && nbf > now + LEEWAY
    {
        return Err(Error::Unauthenticated("token not yet valid"));
    }
    Ok(())
}

/// Property tests of token verification: arbitrary and tampered tokens are
/// refused (an error, never a panic), genuine ones accepted.
#[cfg(test)]
pub(crate) mod props {
    use proptest::prelude::*;
    use proptest::test_runner::TestRunner;

    use super::*;
    use crate::clock::SystemClock;
    use crate::props::{CRYPTO_CASES, b64, config, jws_like};

    /// A runtime for the async verifiers.
    pub(crate) fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// A key ring (one key per algorithm) on a fresh in-memory database.
    pub(crate) async fn ring(issuer: &str) -> IssuerKeys {
        let mut options = sea_orm::ConnectOptions::new("sqlite::memory:");
        options
            .max_connections(1)
            .min_connections(1)
            .sqlx_logging(false);
        let db = sea_orm::Database::connect(options).await.unwrap();
        crate::store::migrate(&db).await.unwrap();
        let master = Arc::new(MasterKey::from_bytes(&[7u8; 32]).unwrap());
        IssuerKeys::load(db, master, Arc::new(SystemClock), issuer.to_owned(), 3_600)
            .await
            .unwrap()
    }

    /// The `kid`s of the ring's published keys.
    pub(crate) async fn kids(keys: &IssuerKeys) -> Vec<String> {
        keys.list()
            .await
            .unwrap()
            .into_iter()
            .map(|row| row.kid)
            .collect()
    }

    fn claims(issuer: &str, audience: &str) -> Value {
        let now = SystemClock.now_seconds();
        json!({"iss": issuer, "sub": "agt_1", "aud": audience, "iat": now, "nbf": now, "exp": now + 600})
    }

    const ISSUER: &str = "https://vg.test";

    #[test]
    fn arbitrary_tokens_are_refused() {
        let rt = runtime();
        let keys = rt.block_on(ring(ISSUER));
        let kids = rt.block_on(kids(&keys));
        let mut runner = TestRunner::new(config(CRYPTO_CASES * 4));
        runner
            .run(&jws_like(kids), |token| {
                let verified = rt.block_on(keys.verify::<Value>(&token, crate::auth::API_AUDIENCE));
                prop_assert!(verified.is_err(), "accepted {token}");
                Ok(())
            })
            .unwrap();
    }

    #[test]
    fn tampered_tokens_are_refused_and_genuine_ones_accepted() {
        let rt = runtime();
        let keys = rt.block_on(ring(ISSUER));
        let strategy = (
            prop::sample::select(ALGORITHMS.to_vec()),
            0usize..3,
            any::<prop::sample::Index>(),
            1u8..=255,
            prop::sample::select(vec![
                "RS256", "ES256", "EdDSA", "HS256", "none", "PS256", "ES384",
            ]),
        );
        let mut runner = TestRunner::new(config(CRYPTO_CASES));
        runner
            .run(&strategy, |(algorithm, part, at, flip, other_alg)| {
                let (token, _) = rt
                    .block_on(keys.sign(algorithm, &claims(ISSUER, "vaultguard")))
                    .unwrap();
                let genuine = rt.block_on(keys.verify::<Value>(&token, "vaultguard"));
                prop_assert!(genuine.is_ok());
                let wrong_audience =
                    rt.block_on(keys.verify::<Value>(&token, "urn:vaultguard:tenant:x"));
                prop_assert!(wrong_audience.is_err());

                // Flip one bit pattern in one decoded part, re-encode.
                let parts: Vec<&str> = token.split('.').collect();
                let mut decoded = URL_SAFE_NO_PAD.decode(parts[part]).unwrap();
                let i = at.index(decoded.len());
                decoded[i] ^= flip;
                let mut tampered: Vec<String> = parts.iter().map(|p| (*p).to_owned()).collect();
                tampered[part] = b64(&decoded);
                let tampered = tampered.join(".");
                let verified = rt.block_on(keys.verify::<Value>(&tampered, "vaultguard"));
                prop_assert!(verified.is_err(), "accepted a tampered token");

                // The same signature under a header naming another algorithm.
                let mut header: Value =
                    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).unwrap()).unwrap();
                prop_assume!(header["alg"] != other_alg);
                header["alg"] = Value::String(other_alg.to_owned());
                let relabelled = format!(
                    "{}.{}.{}",
                    b64(header.to_string().as_bytes()),
                    parts[1],
                    parts[2]
                );
                let verified = rt.block_on(keys.verify::<Value>(&relabelled, "vaultguard"));
                prop_assert!(verified.is_err(), "accepted alg {other_alg}");
                Ok(())
            })
            .unwrap();
    }

    proptest! {
        #![proptest_config(config(crate::props::PURE_CASES))]

        #[test]
        fn time_claims_never_panic(claims in crate::props::json_value(), now in any::<i64>()) {
            if check_time_claims(&claims, now).is_ok() {
                prop_assert!(claims["exp"].as_i64().is_some_and(|exp| exp > now));
            }
        }

        #[test]
        fn algorithm_names_round_trip(name in prop_oneof![
            "(RS256|ES256|EdDSA|rs256|EDDSA|HS256|none)".prop_map(String::from),
            any::<String>(),
        ]) {
            if let Some(algorithm) = parse_algorithm(&name) {
                prop_assert_eq!(algorithm_name(algorithm), name.as_str());
            }
        }
    }
}
