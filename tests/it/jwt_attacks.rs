//! The JWT attack suite: every known way of forging or bending a token,
//! against both kinds of token VaultGuard verifies.
//!
//! - API access tokens presented as bearers (AuthService/WhoAmI): each
//!   forgery is UNAUTHENTICATED with the generic reason, and nothing at all
//!   is written (the auth layer records no event for a refused bearer).
//! - Delegation tokens presented to DelegationService/VerifyDelegationToken:
//!   each forgery answers `active: false` and nothing else, and writes
//!   exactly one `delegation.verified` DENIED event in the verifying
//!   tenant's log whose reason is the generic "signature, type, issuer,
//!   audience or time" (the caller never learns which check failed).
//!
//! The genuine tokens are accepted first (controls), so a refusal shows the
//! attack failed, not the setup. Tokens with valid signatures but bad
//! claims are signed with the server's own keys through the test's
//! `AppState` (same database and master key).

use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};
use tonic::Code;
use vaultguard_client::pb;
use vaultguard_server::clock::Clock;
use vaultguard_tests::{TestServer, expect_invalid};

use crate::delegations::{
    Pair, ask, assert_inactive, grant, jwks, jwt_part, setup_pair, with_claims,
};
use crate::oidc::{assert_refused, b64url, rsa_public_key_encodings, signing_input, who_am_i};
use crate::policies::{add_rule, inbound, with_counterpart};
use crate::vault_signing::{create_key, sign_message, sign_now};

use pb::TokenAlgorithm as Alg;
use vaultguard_tests::Rpc;

/// The audit reason of every Verify refused by the signature or claim checks.
const GENERIC_REASON: &str = "signature, type, issuer, audience or time";

/// The tables a refused token must leave as they were (`audit_pending` and
/// `audit_chain` move with the sealer and are left out).
const TABLES: [&str; 16] = [
    "tenants",
    "agents",
    "policy_rules",
    "delegations",
    "step_ups",
    "step_up_approvals",
    "step_up_changes",
    "signatures",
    "custody_keys",
    "connections",
    "oauth_states",
    "oauth_providers",
    "issuer_keys",
    "tenant_webhooks",
    "tenant_external_orgs",
    "audit_events",
];

async fn footprint(server: &TestServer) -> Vec<(&'static str, i64)> {
    let mut counts = Vec::new();
    for table in TABLES {
        counts.push((table, server.count(table).await));
    }
    counts
}

// ---------------------------------------------------------------------------
// Token surgery.

/// A compact JWS from a header, claims and raw signature bytes.
fn forge(header: &Value, claims: &Value, signature: &[u8]) -> String {
    format!("{}.{}", signing_input(header, claims), b64url(signature))
}

/// The raw signature bytes of a compact JWS.
fn signature_of(token: &str) -> Vec<u8> {
    let part = token.split('.').nth(2).expect("signature part");
    URL_SAFE_NO_PAD.decode(part).expect("base64url signature")
}

/// `token` with its header replaced, claims and signature kept.
fn with_header(token: &str, header: &Value) -> String {
    let parts: Vec<&str> = token.split('.').collect();
    format!("{}.{}.{}", b64url(header.to_string()), parts[1], parts[2])
}

fn hmac_sha256(secret: &[u8], input: &str) -> Vec<u8> {
    let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, secret);
    aws_lc_rs::hmac::sign(&key, input.as_bytes())
        .as_ref()
        .to_vec()
}

/// A DER length.
fn der_len(len: usize) -> Vec<u8> {
    if len < 0x80 {
        vec![u8::try_from(len).unwrap()]
    } else {
        let bytes: Vec<u8> = len
            .to_be_bytes()
            .into_iter()
            .skip_while(|b| *b == 0)
            .collect();
        [vec![0x80 | u8::try_from(bytes.len()).unwrap()], bytes].concat()
    }
}

fn der(tag: u8, content: &[u8]) -> Vec<u8> {
    [vec![tag], der_len(content.len()), content.to_vec()].concat()
}

/// A positive DER INTEGER from big-endian bytes.
fn der_uint(bytes: &[u8]) -> Vec<u8> {
    let content = if bytes.first().is_some_and(|b| b & 0x80 != 0) {
        [vec![0], bytes.to_vec()].concat()
    } else {
        bytes.to_vec()
    };
    der(0x02, &content)
}

/// The RSA key `kid` of the JWKS in every encoding an attacker would try
/// as an HMAC secret (the shared list of the OIDC tests, plus the JWK JSON).
fn rsa_hmac_secrets(jwks: &Value, kid: &str) -> Vec<(String, Vec<u8>)> {
    let jwk = jwks["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .find(|key| key["kid"] == json!(kid))
        .expect("the RS256 kid is published")
        .clone();
    let decode = |member: &str| {
        URL_SAFE_NO_PAD
            .decode(jwk[member].as_str().expect("RSA member"))
            .expect("base64url")
    };
    let (n, e) = (decode("n"), decode("e"));
    let pkcs1 = der(0x30, &[der_uint(&n), der_uint(&e)].concat());
    let rsa_encryption = [
        der(
            0x06,
            &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01],
        ),
        vec![0x05, 0x00],
    ]
    .concat();
    let spki = der(
        0x30,
        &[
            der(0x30, &rsa_encryption),
            der(0x03, &[vec![0], pkcs1.clone()].concat()),
        ]
        .concat(),
    );
    let mut secrets: Vec<(String, Vec<u8>)> = rsa_public_key_encodings(pkcs1, spki, n)
        .into_iter()
        .map(|(name, bytes)| (name.to_owned(), bytes))
        .collect();
    secrets.push((
        "JWK JSON as published".to_owned(),
        jwk.to_string().into_bytes(),
    ));
    secrets.push((
        "JWK JSON with e, kty, n only".to_owned(),
        json!({"e": jwk["e"], "kty": "RSA", "n": jwk["n"]})
            .to_string()
            .into_bytes(),
    ));
    secrets
}

/// The server's key ring signs `claims` with `typ` and the active key of
/// `algorithm`, as it signs its own tokens.
async fn sign(server: &TestServer, algorithm: Alg, typ: &str, claims: &Value) -> String {
    server
        .state
        .keys
        .sign_typed(algorithm, typ, claims)
        .await
        .expect("sign")
        .0
}

fn now(server: &TestServer) -> i64 {
    server.clock.now_seconds()
}

/// `claims` with `edit` applied.
fn edited(claims: &Value, edit: impl FnOnce(&mut Value)) -> Value {
    let mut claims = claims.clone();
    edit(&mut claims);
    claims
}

/// Every attack built from a genuine RS256 `token` (whose claims are
/// `claims`), valid for `audience`, and a wrong audience `other_audience`.
async fn attacks(
    server: &TestServer,
    token: &str,
    claims: &Value,
    other_audience: &str,
) -> Vec<(String, String)> {
    let header = jwt_part(token, 0);
    let kid = header["kid"].as_str().expect("kid").to_owned();
    assert_eq!(header["alg"], json!("RS256"), "the genuine token is RS256");
    let signature = signature_of(token);
    let jwks = jwks(server).await;
    let kid_of = |alg: &str| -> String {
        jwks["keys"]
            .as_array()
            .expect("keys")
            .iter()
            .find(|key| key["alg"] == json!(alg))
            .and_then(|key| key["kid"].as_str())
            .expect("a published key of each algorithm")
            .to_owned()
    };
    let (es_kid, ed_kid) = (kid_of("ES256"), kid_of("EdDSA"));
    let t = now(server);
    let mut cases: Vec<(String, String)> = Vec::new();

    // alg none, in several casings, without and with a signature part, and
    // without the signature part at all.
    for alg in ["none", "None", "NONE", "nOnE"] {
        let none = json!({"alg": alg, "typ": "at+jwt", "kid": kid});
        cases.push((
            format!("alg {alg}, empty signature"),
            forge(&none, claims, b""),
        ));
        cases.push((
            format!("alg {alg}, genuine signature"),
            forge(&none, claims, &signature),
        ));
        cases.push((
            format!("alg {alg}, two parts"),
            signing_input(&none, claims),
        ));
    }
    cases.push((
        "alg none without kid".to_owned(),
        forge(&json!({"alg": "none", "typ": "at+jwt"}), claims, b""),
    ));

    // HS256 keyed with the RSA public key, in every encoding.
    for (encoding, secret) in rsa_hmac_secrets(&jwks, &kid) {
        for alg in ["HS256", "HS512"] {
            let hs = json!({"alg": alg, "typ": "at+jwt", "kid": kid});
            let input = signing_input(&hs, claims);
            let mac = if alg == "HS256" {
                hmac_sha256(&secret, &input)
            } else {
                let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA512, &secret);
                aws_lc_rs::hmac::sign(&key, input.as_bytes())
                    .as_ref()
                    .to_vec()
            };
            cases.push((
                format!("{alg} keyed with the RSA public key as {encoding}"),
                format!("{input}.{}", b64url(mac)),
            ));
        }
    }

    // kid: unknown, missing, odd types; the signature is the genuine one.
    for (what, bad_kid) in [
        ("an unknown kid", json!("rs256-unknown")),
        ("a path as kid", json!("../../issuer_keys")),
        ("a numeric kid", json!(1)),
        ("an empty kid", json!("")),
    ] {
        let h = json!({"alg": "RS256", "typ": "at+jwt", "kid": bad_kid});
        cases.push((what.to_owned(), with_header(token, &h)));
    }
    cases.push((
        "no kid".to_owned(),
        with_header(token, &json!({"alg": "RS256", "typ": "at+jwt"})),
    ));

    // A real signature under a header naming another algorithm or key type.
    for alg in ["ES256", "EdDSA", "PS256", "RS512", "ES384"] {
        let h = json!({"alg": alg, "typ": "at+jwt", "kid": kid});
        cases.push((
            format!("RS256 kid relabelled {alg}"),
            with_header(token, &h),
        ));
    }
    cases.push((
        "an ES256 kid with the RS256 signature".to_owned(),
        with_header(
            token,
            &json!({"alg": "RS256", "typ": "at+jwt", "kid": es_kid}),
        ),
    ));
    let es_token = sign(server, Alg::Es256, "at+jwt", claims).await;
    for alg in ["RS256", "EdDSA", "ES384"] {
        let h = json!({"alg": alg, "typ": "at+jwt", "kid": es_kid});
        cases.push((
            format!("ES256 token relabelled {alg}"),
            with_header(&es_token, &h),
        ));
    }
    let ed_token = sign(server, Alg::Eddsa, "at+jwt", claims).await;
    cases.push((
        "EdDSA token relabelled ES256".to_owned(),
        with_header(
            &ed_token,
            &json!({"alg": "ES256", "typ": "at+jwt", "kid": ed_kid}),
        ),
    ));
    cases.push((
        "EdDSA signature under the ES256 kid".to_owned(),
        with_header(
            &ed_token,
            &json!({"alg": "EdDSA", "typ": "at+jwt", "kid": es_kid}),
        ),
    ));

    // Validly signed, but expired or not yet valid.
    let expired = edited(claims, |c| {
        c["iat"] = json!(t - 600);
        c["nbf"] = json!(t - 600);
        c["exp"] = json!(t - 1);
    });
    cases.push((
        "expired".to_owned(),
        sign(server, Alg::Rs256, "at+jwt", &expired).await,
    ));
    let ends_now = edited(claims, |c| c["exp"] = json!(t));
    cases.push((
        "exp == now".to_owned(),
        sign(server, Alg::Rs256, "at+jwt", &ends_now).await,
    ));
    let no_exp = edited(claims, |c| {
        c.as_object_mut().unwrap().remove("exp");
    });
    cases.push((
        "no exp".to_owned(),
        sign(server, Alg::Rs256, "at+jwt", &no_exp).await,
    ));
    let string_exp = edited(claims, |c| c["exp"] = json!((t + 600).to_string()));
    cases.push((
        "exp as a string".to_owned(),
        sign(server, Alg::Rs256, "at+jwt", &string_exp).await,
    ));
    let early = edited(claims, |c| {
        c["nbf"] = json!(t + 3_600);
        c["exp"] = json!(t + 7_200);
    });
    cases.push((
        "not yet valid (nbf in an hour)".to_owned(),
        sign(server, Alg::Rs256, "at+jwt", &early).await,
    ));
    let just_early = edited(claims, |c| c["nbf"] = json!(t + 90));
    cases.push((
        "not yet valid (nbf past the 30 s leeway)".to_owned(),
        sign(server, Alg::Rs256, "at+jwt", &just_early).await,
    ));

    // Validly signed with another typ. The check is exact: RFC 9068's
    // `application/at+jwt` and other casings are refused too.
    for typ in [
        "JWT",
        "jwt",
        "AT+JWT",
        "At+Jwt",
        "application/at+jwt",
        "at+jwt ",
        "vg-receipt+jwt",
    ] {
        cases.push((
            format!("typ {typ:?}"),
            sign(server, Alg::Rs256, typ, claims).await,
        ));
    }
    cases.push((
        "typ removed".to_owned(),
        with_header(token, &json!({"alg": "RS256", "kid": kid})),
    ));

    // Validly signed for another audience or by another issuer.
    let issuer = server.state.keys.issuer().to_owned();
    for (what, aud) in [
        ("another audience", json!(other_audience)),
        ("an empty audience", json!("")),
        ("no audience list member", json!([])),
    ] {
        let wrong = edited(claims, |c| c["aud"] = aud);
        cases.push((
            what.to_owned(),
            sign(server, Alg::Rs256, "at+jwt", &wrong).await,
        ));
    }
    for (what, iss) in [
        ("another issuer", json!("https://evil.example")),
        (
            "the issuer with a trailing slash",
            json!(format!("{issuer}/")),
        ),
        ("the issuer in upper case", json!(issuer.to_uppercase())),
    ] {
        let wrong = edited(claims, |c| c["iss"] = iss);
        cases.push((
            what.to_owned(),
            sign(server, Alg::Rs256, "at+jwt", &wrong).await,
        ));
    }
    let no_iss = edited(claims, |c| {
        c.as_object_mut().unwrap().remove("iss");
    });
    cases.push((
        "no issuer".to_owned(),
        sign(server, Alg::Rs256, "at+jwt", &no_iss).await,
    ));

    // Tampered payloads under the genuine signature.
    cases.push((
        "exp pushed a day later".to_owned(),
        with_claims(token, |c| {
            c["exp"] = json!(c["exp"].as_i64().unwrap() + 86_400)
        }),
    ));
    cases.push((
        "sub changed".to_owned(),
        with_claims(token, |c| {
            c["sub"] = json!("agt_0190000000007000800000000000000a")
        }),
    ));
    cases.push((
        "audience swapped".to_owned(),
        with_claims(token, |c| c["aud"] = json!(other_audience)),
    ));

    // Broken signatures.
    cases.push((
        "signature truncated".to_owned(),
        forge(&header, claims, &signature[..signature.len() - 1]),
    ));
    let mut flipped = signature.clone();
    flipped[0] ^= 1;
    cases.push((
        "signature bit flipped".to_owned(),
        forge(&header, claims, &flipped),
    ));
    cases.push((
        "another token's signature".to_owned(),
        forge(
            &header,
            claims,
            &signature_of(&sign(server, Alg::Rs256, "at+jwt", &expired).await),
        ),
    ));
    cases.push((
        "four parts".to_owned(),
        format!("{token}.{}", b64url(&signature)),
    ));
    cases
}

/// The claims of an API access token of the pair's agent, valid for an hour.
fn agent_claims(pair: &Pair) -> Value {
    let t = now(&pair.server);
    json!({
        "iss": pair.server.state.keys.issuer(),
        "sub": pair.bot.id,
        "aud": "vaultguard",
        "iat": t,
        "nbf": t,
        "exp": t + 3_600,
        "jti": "3f1b2c4d5e6f708192a3b4c5d6e7f801",
        "tid": pair.acme.id,
        "roles": ["agent"],
        "client_id": pair.bot.id,
    })
}

/// The agent's genuine access token, after checking that it authenticates.
async fn genuine_access_token(pair: &Pair) -> String {
    let token = pair.agent.bearer().await.expect("agent token");
    let me = who_am_i(&pair.server, &token)
        .await
        .expect("the genuine token works");
    assert_eq!(me.actor.expect("actor").subject, pair.bot.id);
    token
}

/// A genuine delegation of `stock.write` on globex, after checking that
/// Verify says it is active.
async fn genuine_delegation(pair: &Pair) -> (pb::Delegation, String) {
    pair.globex_allows("stock.*").await;
    let (delegation, token) = grant(&pair.agent, ask(&pair.globex.id, "stock.write")).await;
    let verified = pair.globex_admin.verify(&token, "").await.expect("verify");
    assert!(verified.active, "the genuine delegation token is active");
    (delegation, token)
}

/// Presents each token as a bearer: UNAUTHENTICATED, nothing written.
async fn assert_bearers_refused(server: &TestServer, cases: &[(String, String)]) {
    server.wait_sealed().await;
    let before = footprint(server).await;
    for (case, token) in cases {
        assert_refused(case, who_am_i(server, token).await);
    }
    assert_eq!(
        footprint(server).await,
        before,
        "a refused bearer writes nothing"
    );
}

/// Presents each token to Verify as globex's admin: `active: false`, and
/// exactly one generic DENIED `delegation.verified` event each in globex's
/// log, naming no delegation.
async fn assert_verifications_inactive(pair: &Pair, cases: &[(String, String)]) {
    let server = &pair.server;
    server.wait_sealed().await;
    let before = footprint(server).await;
    let events_before = server
        .audit_events(&pair.globex.id, "delegation.verified")
        .await
        .len();
    for (case, token) in cases {
        assert_inactive(pair.globex_admin.verify(token, "").await, case);
    }
    let events = server
        .audit_events(&pair.globex.id, "delegation.verified")
        .await;
    let new = &events[events_before..];
    assert_eq!(new.len(), cases.len(), "one verification event per call");
    for event in new {
        assert_eq!(event.outcome, "denied");
        assert_eq!(
            event.subject_ids, "[]",
            "a refused token names no delegation"
        );
        let details: Value = serde_json::from_str(&event.details).expect("details");
        assert_eq!(details, json!({"active": false, "reason": GENERIC_REASON}));
    }
    let after = footprint(server).await;
    for ((table, was), (_, is)) in before.iter().zip(&after) {
        let expected = if *table == "audit_events" {
            was + i64::try_from(cases.len()).unwrap()
        } else {
            *was
        };
        assert_eq!(
            *is, expected,
            "{table}: only the verification events are written"
        );
    }
}

// ---------------------------------------------------------------------------
// Tests.

#[tokio::test]
async fn forged_access_tokens_are_unauthenticated_and_write_nothing() {
    let pair = setup_pair().await;
    let token = genuine_access_token(&pair).await;
    let claims = jwt_part(&token, 1);
    let mut cases = attacks(&pair.server, &token, &claims, &pair.globex.audience).await;
    // Claims a tampered token would want.
    cases.push((
        "roles raised to operator".to_owned(),
        with_claims(&token, |c| c["roles"] = json!(["operator"])),
    ));
    cases.push((
        "tenant moved to globex".to_owned(),
        with_claims(&token, |c| c["tid"] = json!(pair.globex.id)),
    ));
    // A delegation token is no bearer.
    let (_, delegation_token) = genuine_delegation(&pair).await;
    cases.push(("a delegation token as bearer".to_owned(), delegation_token));
    assert!(cases.len() > 60, "{} cases", cases.len());
    assert_bearers_refused(&pair.server, &cases).await;
    // The genuine token still works afterwards.
    who_am_i(&pair.server, &token).await.expect("genuine token");
    pair.server.stop().await;
}

#[tokio::test]
async fn forged_delegation_tokens_verify_as_inactive_with_one_generic_event_each() {
    let pair = setup_pair().await;
    let (_, token) = genuine_delegation(&pair).await;
    let claims = jwt_part(&token, 1);
    let mut cases = attacks(&pair.server, &token, &claims, &pair.acme.audience).await;
    cases.push((
        "action widened".to_owned(),
        with_claims(&token, |c| c["action"] = json!("stock.delete")),
    ));
    // An access token is no delegation token (audience `vaultguard`).
    let access = genuine_access_token(&pair).await;
    cases.push(("the agent's access token".to_owned(), access));
    let api_audience = edited(&claims, |c| c["aud"] = json!("vaultguard"));
    cases.push((
        "the delegation's claims for the API audience".to_owned(),
        sign(&pair.server, Alg::Rs256, "at+jwt", &api_audience).await,
    ));
    assert!(cases.len() > 60, "{} cases", cases.len());
    assert_verifications_inactive(&pair, &cases).await;
    let verified = pair.globex_admin.verify(&token, "").await.expect("verify");
    assert!(verified.active, "the genuine token is still active");
    pair.server.stop().await;
}

#[tokio::test]
async fn a_token_signed_with_another_tenants_custodied_key_is_refused() {
    let pair = setup_pair().await;
    let (delegation, genuine) = genuine_delegation(&pair).await;
    let server = &pair.server;

    // Globex (the attacker here) holds a P-256 key in the vault and lets its
    // agent sign anything with it.
    let (_, _, forger) = server.create_agent(&pair.globex.id, "forger").await;
    let key = create_key(&pair.globex_admin, "forge", pb::KeyAlgorithm::P256, "")
        .await
        .expect("create key");
    add_rule(
        &pair.globex_admin,
        with_counterpart(&pair.globex.id, inbound("sign:forge", pb::Effect::Allow)),
    )
    .await;
    let jwk: Value = serde_json::from_str(&key.public_key_jwk).expect("jwk");
    let custody_kid = jwk["kid"].as_str().expect("kid").to_owned();
    let issuer_es_kid = jwks(server).await["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["alg"] == json!("ES256"))
        .and_then(|k| k["kid"].as_str())
        .unwrap()
        .to_owned();

    // ES256 over the JWS signing input is RAW_SHA256 with a P-256 key.
    let mut n = 0;
    let mut forge_with_vault = |kid: String, claims: Value| {
        n += 1;
        let forger = forger.clone();
        let key_id = key.id.clone();
        async move {
            let header = json!({"alg": "ES256", "typ": "at+jwt", "kid": kid});
            let input = signing_input(&header, &claims);
            let signed = sign_now(
                &forger,
                sign_message(
                    &key_id,
                    input.as_bytes(),
                    pb::SigningScheme::RawSha256,
                    &format!("forge-{n}"),
                ),
            )
            .await;
            assert_eq!(signed.signature.len(), 64, "P1363 r||s, as ES256 wants");
            format!("{input}.{}", b64url(&signed.signature))
        }
    };
    let t = now(server);
    let acme_admin_claims = json!({
        "iss": server.state.keys.issuer(), "sub": "mallory", "aud": "vaultguard",
        "iat": t, "nbf": t, "exp": t + 600, "jti": "f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0",
        "tid": pair.acme.id, "roles": ["admin"],
    });
    let agent_claims = agent_claims(&pair);
    let operator_claims = edited(&acme_admin_claims, |c| {
        c.as_object_mut().unwrap().remove("tid");
        c["roles"] = json!(["operator"]);
    });
    let bearers = vec![
        (
            "acme admin, custody kid".to_owned(),
            forge_with_vault(custody_kid.clone(), acme_admin_claims.clone()).await,
        ),
        (
            "acme agent, custody kid".to_owned(),
            forge_with_vault(custody_kid.clone(), agent_claims).await,
        ),
        (
            "operator, custody kid".to_owned(),
            forge_with_vault(custody_kid.clone(), operator_claims).await,
        ),
        (
            "acme admin, the issuer's ES256 kid".to_owned(),
            forge_with_vault(issuer_es_kid.clone(), acme_admin_claims).await,
        ),
    ];
    let delegation_claims = jwt_part(&genuine, 1);
    assert_eq!(delegation_claims["jti"], json!(delegation.id));
    let verifications = vec![
        (
            "the delegation's claims, custody kid".to_owned(),
            forge_with_vault(custody_kid.clone(), delegation_claims.clone()).await,
        ),
        (
            "the delegation's claims, the issuer's ES256 kid".to_owned(),
            forge_with_vault(issuer_es_kid, delegation_claims).await,
        ),
    ];

    // The forgeries are well-formed ES256 JWSs under the vault key's JWK: a
    // relying party trusting that key would accept them.
    let decoding =
        jsonwebtoken::DecodingKey::from_jwk(&serde_json::from_value(jwk).unwrap()).unwrap();
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    validation.required_spec_claims.clear();
    validation.validate_aud = false;
    for (case, token) in bearers.iter().chain(&verifications) {
        jsonwebtoken::decode::<Value>(token, &decoding, &validation)
            .unwrap_or_else(|e| panic!("{case}: not a valid ES256 JWS: {e}"));
    }

    assert_bearers_refused(server, &bearers).await;
    assert_verifications_inactive(&pair, &verifications).await;
    pair.server.stop().await;
}

#[tokio::test]
async fn a_retired_issuer_key_stops_verifying_after_its_publication_window() {
    let pair = setup_pair().await;
    let (_, genuine) = genuine_delegation(&pair).await;
    let server = &pair.server;
    // Tokens of the current RS256 key that outlive the window (10 days), so
    // only the key's retirement can refuse them.
    let t = now(server);
    let far = t + 10 * 86_400;
    let access = sign(
        server,
        Alg::Rs256,
        "at+jwt",
        &edited(&agent_claims(&pair), |c| c["exp"] = json!(far)),
    )
    .await;
    let delegation = sign(
        server,
        Alg::Rs256,
        "at+jwt",
        &edited(&jwt_part(&genuine, 1), |c| c["exp"] = json!(far)),
    )
    .await;
    let old_kid = jwt_part(&access, 0)["kid"].as_str().unwrap().to_owned();
    who_am_i(server, &access)
        .await
        .expect("accepted before the rotation");

    let operator = server.operator().await;
    let rotated = operator
        .rotate_issuer_key(pb::RotateIssuerKeyRequest {
            algorithm: Alg::Rs256 as i32,
        })
        .await
        .expect("rotate");
    assert_eq!(rotated.retired.expect("retired key").kid, old_kid);
    who_am_i(server, &access)
        .await
        .expect("a retired key verifies while it is published");
    assert!(
        pair.globex_admin
            .verify(&delegation, "")
            .await
            .unwrap()
            .active
    );

    // Past retirement + max_token_ttl (one day) the key is gone.
    server.clock.advance(86_400_000 + 60_000);
    let kids: Vec<Value> = jwks(server).await["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].clone())
        .collect();
    assert!(
        !kids.contains(&json!(old_kid)),
        "the retired key left the JWKS"
    );
    assert_bearers_refused(server, &[("retired kid".to_owned(), access)]).await;
    // The admin's own token expired with the jump: a fresh one.
    let globex_admin = server.admin(&pair.globex.id, "gina").await;
    let fresh = Pair {
        globex_admin,
        ..pair
    };
    assert_verifications_inactive(&fresh, &[("retired kid".to_owned(), delegation)]).await;
    fresh.server.stop().await;
}

/// Validly signed RS256 tokens of `claims` plus a padding claim, one for
/// each length base64url can reach between `min` and `max` bytes (it cannot
/// reach every length: a JWS part is never 1 mod 4 characters long).
async fn tokens_near(server: &TestServer, claims: &Value, min: usize, max: usize) -> Vec<String> {
    let probe = sign(
        server,
        Alg::Rs256,
        "at+jwt",
        &edited(claims, |c| c["pad"] = json!("")),
    )
    .await;
    let estimate = (min.saturating_sub(probe.len())) * 3 / 4;
    let mut found: Vec<String> = Vec::new();
    for pad in estimate.saturating_sub(6)..estimate + 6 {
        let padded = edited(claims, |c| c["pad"] = json!("p".repeat(pad)));
        let token = sign(server, Alg::Rs256, "at+jwt", &padded).await;
        if (min..=max).contains(&token.len()) && !found.iter().any(|t| t.len() == token.len()) {
            found.push(token);
        }
    }
    assert!(!found.is_empty(), "no token of {min} to {max} bytes");
    found
}

/// The longest validly signed token of at most 8192 bytes (the cap) and the
/// shortest one above it; the gap is at most 2 bytes.
async fn tokens_around_the_cap(server: &TestServer, claims: &Value) -> (String, String) {
    const CAP: usize = 8 * 1024;
    let below = tokens_near(server, claims, CAP - 3, CAP).await;
    let above = tokens_near(server, claims, CAP + 1, CAP + 4).await;
    let at_cap = below.into_iter().max_by_key(String::len).unwrap();
    let over = above.into_iter().min_by_key(String::len).unwrap();
    assert!(
        over.len() - at_cap.len() <= 3,
        "{} vs {}",
        at_cap.len(),
        over.len()
    );
    (at_cap, over)
}

#[tokio::test]
async fn oversized_tokens_are_refused_before_parsing() {
    let pair = setup_pair().await;
    let (_, genuine) = genuine_delegation(&pair).await;
    let server = &pair.server;

    // Bearers: 8 KiB is the cap. A validly signed token just under it
    // authenticates; one just over it (1 to 3 bytes more) is refused.
    let claims = agent_claims(&pair);
    let (at_cap, over) = tokens_around_the_cap(server, &claims).await;
    eprintln!(
        "bearer cap: {} bytes accepted, {} bytes refused",
        at_cap.len(),
        over.len()
    );
    who_am_i(server, &at_cap)
        .await
        .expect("a token at the cap is accepted");
    let started = Instant::now();
    let refused_over = who_am_i(server, &over).await;
    let over_elapsed = started.elapsed();
    assert_bearers_refused(server, &[("over the cap".to_owned(), over)]).await;
    assert_refused("over the cap", refused_over);

    // A huge bearer (1 MiB) never reaches the parser: HTTP/2 refuses the
    // header block first, and the server keeps serving.
    let huge = format!(
        "{}.{}.{}",
        "a".repeat(64),
        "b".repeat(1 << 20),
        "c".repeat(64)
    );
    let before = footprint(server).await;
    let started = Instant::now();
    let result = tokio::time::timeout(Duration::from_secs(10), who_am_i(server, &huge))
        .await
        .expect("a huge bearer is answered within 10 s");
    let huge_elapsed = started.elapsed();
    let err = result.expect_err("a huge bearer is refused");
    eprintln!(
        "oversized bearers: over the cap refused in {over_elapsed:?}; 1 MiB refused in {huge_elapsed:?} with {:?}",
        err.code()
    );
    assert!(
        matches!(
            err.code(),
            Some(
                Code::Unauthenticated
                    | Code::Internal
                    | Code::Unavailable
                    | Code::ResourceExhausted
            )
        ),
        "unexpected error {err:?}"
    );
    assert!(
        huge_elapsed < Duration::from_secs(5),
        "refused in {huge_elapsed:?}"
    );
    assert_eq!(footprint(server).await, before);
    who_am_i(server, &at_cap)
        .await
        .expect("the server still serves");

    // Verify: the same cap on the `token` field is INVALID_ARGUMENT (a
    // malformed request, not an inactive token), and writes nothing.
    let delegation_claims = jwt_part(&genuine, 1);
    let (at_cap, over) = tokens_around_the_cap(server, &delegation_claims).await;
    assert!(pair.globex_admin.verify(&at_cap, "").await.unwrap().active);
    server.wait_sealed().await;
    let before = footprint(server).await;
    expect_invalid(pair.globex_admin.verify(&over, "").await, "token");
    let started = Instant::now();
    expect_invalid(
        pair.globex_admin.verify("x".repeat(512 * 1024), "").await,
        "token",
    );
    let verify_elapsed = started.elapsed();
    eprintln!("oversized verify: 512 KiB token refused in {verify_elapsed:?}");
    assert!(verify_elapsed < Duration::from_secs(5));
    assert_eq!(
        footprint(server).await,
        before,
        "an oversized token writes nothing"
    );
    pair.server.stop().await;
}

/// Validly signed access tokens whose principal does not stand: no tenant,
/// an agent claiming another tenant, an agent that does not exist.
#[tokio::test]
async fn an_access_token_without_a_tenant_or_for_an_unknown_agent_is_unauthenticated() {
    let pair = setup_pair().await;
    let server = &pair.server;
    let claims = agent_claims(&pair);
    let no_tenant = edited(&claims, |c| {
        c.as_object_mut().unwrap().remove("tid");
    });
    let other_tenant = edited(&claims, |c| c["tid"] = json!(pair.globex.id));
    let unknown_agent = edited(&claims, |c| {
        c["sub"] = json!("agt_0190000000007000800000000000000a")
    });
    let cases = vec![
        (
            "an agent without tid".to_owned(),
            sign(server, Alg::Rs256, "at+jwt", &no_tenant).await,
        ),
        (
            "an agent of acme claiming globex".to_owned(),
            sign(server, Alg::Rs256, "at+jwt", &other_tenant).await,
        ),
        (
            "an unknown agent".to_owned(),
            sign(server, Alg::Rs256, "at+jwt", &unknown_agent).await,
        ),
    ];
    assert_bearers_refused(server, &cases).await;
    pair.server.stop().await;
}
