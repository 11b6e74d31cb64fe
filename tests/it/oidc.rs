//! Trusted OIDC issuers: tenant humans authenticated by a third-party issuer.
//!
//! Each test stands up a real local issuer (axum on 127.0.0.1:0) serving a
//! discovery document and a JWKS with a real RSA-2048 key, configures it as
//! the server's trusted issuer, binds the issuer's organisation `org_acme` to
//! a tenant and signs its own JWTs (RS256, by hand) so that every header
//! field, claim and signature byte is under the test's control.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rsa::KeySize;
use aws_lc_rs::signature::{KeyPair, RSA_PKCS1_SHA256, RsaKeyPair};
use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tonic::Code;
use vaultguard_client::{VaultGuardClient, pb};
use vaultguard_server::config::TrustedIssuer;
use vaultguard_tests::Rpc;
use vaultguard_tests::calls::get_agent;
use vaultguard_tests::{ClientError, TestOptions, TestServer, expect_code};

const AUDIENCE: &str = "vaultguard-test";
pub(crate) const ORG_ACME: &str = "org_acme";
pub(crate) const ORG_BETA: &str = "org_beta";

// ---------------------------------------------------------------------------
// Keys and hand-made JWTs
// ---------------------------------------------------------------------------

pub(crate) fn b64url(bytes: impl AsRef<[u8]>) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn now() -> i64 {
    let elapsed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970");
    i64::try_from(elapsed.as_secs()).expect("seconds fit i64")
}

/// `base64url(header).base64url(claims)`, the JWS signing input.
pub(crate) fn signing_input(header: &Value, claims: &Value) -> String {
    format!(
        "{}.{}",
        b64url(header.to_string()),
        b64url(claims.to_string())
    )
}

/// An RSA-2048 signing key of the local issuer and its `kid`.
struct SigningKey {
    kid: String,
    pair: RsaKeyPair,
}

impl SigningKey {
    fn generate(kid: &str) -> Self {
        let pair = aws_lc_rs::rsa::KeyPair::generate(KeySize::Rsa2048).expect("generate RSA key");
        Self {
            kid: kid.to_owned(),
            pair,
        }
    }

    fn modulus(&self) -> Vec<u8> {
        self.pair
            .public_key()
            .modulus()
            .big_endian_without_leading_zero()
            .to_vec()
    }

    /// The public key as a JWK, as an issuer publishes it.
    fn jwk(&self) -> Value {
        let public = self.pair.public_key();
        json!({
            "kty": "RSA",
            "kid": self.kid,
            "alg": "RS256",
            "use": "sig",
            "n": b64url(public.modulus().big_endian_without_leading_zero()),
            "e": b64url(public.exponent().big_endian_without_leading_zero()),
        })
    }

    /// The RS256 signature of `input`.
    fn sign(&self, input: &str) -> Vec<u8> {
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let mut signature = vec![0u8; self.pair.public_modulus_len()];
        self.pair
            .sign(&RSA_PKCS1_SHA256, &rng, input.as_bytes(), &mut signature)
            .expect("RS256 signing");
        signature
    }

    /// A complete RS256 JWT with this key's `kid`.
    fn token(&self, claims: &Value) -> String {
        self.token_with_kid(&self.kid, claims)
    }

    /// A complete RS256 JWT naming `kid` (which may not be this key's).
    fn token_with_kid(&self, kid: &str, claims: &Value) -> String {
        let header = json!({"alg": "RS256", "typ": "JWT", "kid": kid});
        let input = signing_input(&header, claims);
        format!("{input}.{}", b64url(self.sign(&input)))
    }

    /// The public key in the encodings an attacker would try as an HMAC
    /// secret: PKCS#1 DER, SubjectPublicKeyInfo DER, SPKI PEM (with and
    /// without the final newline), the raw modulus and the JWK's `n`.
    fn public_key_encodings(&self) -> Vec<(&'static str, Vec<u8>)> {
        let public = self.pair.public_key();
        let pkcs1 = public.as_ref().to_vec();
        let spki = public.as_der().expect("SPKI DER").as_ref().to_vec();
        rsa_public_key_encodings(pkcs1, spki, self.modulus())
    }
}

/// An RSA public key (given as PKCS#1 DER, SubjectPublicKeyInfo DER and its
/// modulus) in the encodings an attacker would try as an HMAC secret.
pub(crate) fn rsa_public_key_encodings(
    pkcs1: Vec<u8>,
    spki: Vec<u8>,
    modulus: Vec<u8>,
) -> Vec<(&'static str, Vec<u8>)> {
    let body = STANDARD.encode(&spki);
    let lines: Vec<&str> = body
        .as_bytes()
        .chunks(64)
        .map(|chunk| std::str::from_utf8(chunk).expect("base64 is ASCII"))
        .collect();
    let pem = format!(
        "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
        lines.join("\n")
    );
    let pkcs1_body = STANDARD.encode(&pkcs1);
    let pkcs1_lines: Vec<&str> = pkcs1_body
        .as_bytes()
        .chunks(64)
        .map(|chunk| std::str::from_utf8(chunk).expect("base64 is ASCII"))
        .collect();
    let pkcs1_pem = format!(
        "-----BEGIN RSA PUBLIC KEY-----\n{}\n-----END RSA PUBLIC KEY-----\n",
        pkcs1_lines.join("\n")
    );
    vec![
        ("PKCS#1 DER", pkcs1),
        ("SPKI DER", spki),
        ("SPKI PEM", pem.clone().into_bytes()),
        (
            "SPKI PEM without final newline",
            pem.trim_end().as_bytes().to_vec(),
        ),
        ("PKCS#1 PEM", pkcs1_pem.into_bytes()),
        ("raw modulus", modulus.clone()),
        ("JWK n", b64url(&modulus).into_bytes()),
    ]
}

/// A JWT with an arbitrary header and an HMAC-SHA256 signature under `secret`.
fn hs256_token(kid: &str, secret: &[u8], claims: &Value) -> String {
    let header = json!({"alg": "HS256", "typ": "JWT", "kid": kid});
    let input = signing_input(&header, claims);
    let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, secret);
    let tag = aws_lc_rs::hmac::sign(&key, input.as_bytes());
    format!("{input}.{}", b64url(tag.as_ref()))
}

/// An unsigned JWT (`alg` as given, empty signature).
fn unsigned_token(alg: &str, kid: &str, claims: &Value) -> String {
    let header = json!({"alg": alg, "typ": "JWT", "kid": kid});
    format!("{}.", signing_input(&header, claims))
}

/// Replaces the payload of a signed token, keeping its header and signature.
fn with_payload(token: &str, claims: &Value) -> String {
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "a JWS has three parts");
    format!("{}.{}.{}", parts[0], b64url(claims.to_string()), parts[2])
}

// ---------------------------------------------------------------------------
// The local issuer
// ---------------------------------------------------------------------------

/// What the issuer serves and how often it was asked.
struct IssuerShared {
    base_url: String,
    /// The `issuer` the discovery document names (normally `base_url`).
    discovery_issuer: Mutex<String>,
    jwks: Mutex<Value>,
    /// When set, both endpoints answer 503.
    failing: AtomicBool,
    /// How long the JWKS endpoint takes to answer, in ms.
    jwks_delay_ms: AtomicU64,
    /// The JWKS answer's `Cache-Control` header, if any.
    jwks_cache_control: Mutex<Option<String>>,
    discovery_fetches: AtomicUsize,
    jwks_fetches: AtomicUsize,
    /// The key the ID tokens of the code flow are signed with.
    id_key: Arc<SigningKey>,
    /// Who signs in at `/authorize` (claims besides iss, aud, iat, exp, nonce).
    user: Mutex<Value>,
    /// Codes handed out by `/authorize`, not yet redeemed.
    codes: Mutex<std::collections::HashMap<String, IssuedCode>>,
    /// How many codes `/token` redeemed.
    redeemed: AtomicUsize,
}

/// What `/authorize` remembers of a code for `/token`.
#[derive(Clone)]
struct IssuedCode {
    client_id: String,
    redirect_uri: String,
    nonce: String,
    challenge: String,
    user: Value,
}

async fn discovery_document(
    State(shared): State<Arc<IssuerShared>>,
) -> Result<Json<Value>, StatusCode> {
    shared.discovery_fetches.fetch_add(1, Ordering::SeqCst);
    if shared.failing.load(Ordering::SeqCst) {
        return Err(StatusCode::SERVICE_UNAVAILABLE);
    }
    let issuer = shared
        .discovery_issuer
        .lock()
        .expect("discovery lock")
        .clone();
    Ok(Json(json!({
        "issuer": issuer,
        "jwks_uri": format!("{}/jwks", shared.base_url),
        "authorization_endpoint": format!("{}/authorize", shared.base_url),
        "token_endpoint": format!("{}/token", shared.base_url),
        "response_types_supported": ["code"],
        "code_challenge_methods_supported": ["S256"],
        "id_token_signing_alg_values_supported": ["RS256"],
    })))
}

/// The authorization endpoint: the configured user "signs in" at once and
/// the browser goes back with a code (RFC 6749 §4.1.2). Only PKCE S256
/// requests of the code flow with a nonce are served.
async fn authorize(
    State(shared): State<Arc<IssuerShared>>,
    axum::extract::Query(query): axum::extract::Query<std::collections::HashMap<String, String>>,
) -> Response {
    let get = |key: &str| query.get(key).cloned().unwrap_or_default();
    if get("response_type") != "code"
        || get("code_challenge_method") != "S256"
        || get("code_challenge").is_empty()
        || get("nonce").is_empty()
        || !get("scope").split(' ').any(|scope| scope == "openid")
    {
        return (StatusCode::BAD_REQUEST, "not an OIDC code + PKCE request").into_response();
    }
    let code = uuid::Uuid::new_v4().simple().to_string();
    let user = shared.user.lock().expect("user lock").clone();
    shared.codes.lock().expect("codes lock").insert(
        code.clone(),
        IssuedCode {
            client_id: get("client_id"),
            redirect_uri: get("redirect_uri"),
            nonce: get("nonce"),
            challenge: get("code_challenge"),
            user,
        },
    );
    let mut back = url::Url::parse(&get("redirect_uri")).expect("redirect_uri");
    back.query_pairs_mut()
        .append_pair("code", &code)
        .append_pair("state", &get("state"));
    (StatusCode::FOUND, [(header::LOCATION, back.to_string())]).into_response()
}

/// The token endpoint of the code flow (public client, PKCE S256): an ID
/// token signed with the published key, `aud` the client, the nonce.
async fn token_endpoint(
    State(shared): State<Arc<IssuerShared>>,
    body: axum::body::Bytes,
) -> Response {
    let form: std::collections::HashMap<String, String> =
        url::form_urlencoded::parse(&body).into_owned().collect();
    let get = |key: &str| form.get(key).cloned().unwrap_or_default();
    let refuse =
        |error: &str| (StatusCode::BAD_REQUEST, Json(json!({"error": error}))).into_response();
    if get("grant_type") != "authorization_code" {
        return refuse("unsupported_grant_type");
    }
    let Some(issued) = shared
        .codes
        .lock()
        .expect("codes lock")
        .remove(&get("code"))
    else {
        return refuse("invalid_grant");
    };
    let challenge = b64url(aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        get("code_verifier").as_bytes(),
    ));
    if challenge != issued.challenge
        || get("redirect_uri") != issued.redirect_uri
        || get("client_id") != issued.client_id
    {
        return refuse("invalid_grant");
    }
    shared.redeemed.fetch_add(1, Ordering::SeqCst);
    let now = now();
    let mut claims = json!({
        "iss": shared.base_url,
        "aud": issued.client_id,
        "iat": now,
        "exp": now + 300,
        "nonce": issued.nonce,
    });
    if let (Some(claims), Some(user)) = (claims.as_object_mut(), issued.user.as_object()) {
        for (key, value) in user {
            claims.insert(key.clone(), value.clone());
        }
    }
    Json(json!({
        "access_token": "opaque-access-token",
        "token_type": "Bearer",
        "expires_in": 300,
        "id_token": shared.id_key.token(&claims),
    }))
    .into_response()
}

async fn jwks_document(State(shared): State<Arc<IssuerShared>>) -> Response {
    shared.jwks_fetches.fetch_add(1, Ordering::SeqCst);
    let delay = shared.jwks_delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    if shared.failing.load(Ordering::SeqCst) {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    let jwks = shared.jwks.lock().expect("jwks lock").clone();
    let mut response = Json(jwks).into_response();
    if let Some(value) = shared.jwks_cache_control.lock().expect("lock").clone() {
        response.headers_mut().insert(
            header::CACHE_CONTROL,
            HeaderValue::from_str(&value).expect("header value"),
        );
    }
    response
}

/// A real OIDC issuer on 127.0.0.1 with one RSA key published.
pub(crate) struct LocalIssuer {
    pub(crate) url: String,
    key: Arc<SigningKey>,
    shared: Arc<IssuerShared>,
    task: JoinHandle<()>,
}

impl LocalIssuer {
    pub(crate) async fn start(kid: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind issuer");
        let url = format!("http://{}", listener.local_addr().expect("issuer addr"));
        let key = Arc::new(SigningKey::generate(kid));
        let shared = Arc::new(IssuerShared {
            id_key: key.clone(),
            user: Mutex::new(
                json!({"sub": "auth0|alice", "org_id": ORG_ACME, "roles": ["approver"]}),
            ),
            codes: Mutex::new(std::collections::HashMap::new()),
            redeemed: AtomicUsize::new(0),
            base_url: url.clone(),
            discovery_issuer: Mutex::new(url.clone()),
            failing: AtomicBool::new(false),
            jwks_delay_ms: AtomicU64::new(0),
            jwks_cache_control: Mutex::new(None),
            jwks: Mutex::new(json!({ "keys": [key.jwk()] })),
            discovery_fetches: AtomicUsize::new(0),
            jwks_fetches: AtomicUsize::new(0),
        });
        let router = Router::new()
            .route("/.well-known/openid-configuration", get(discovery_document))
            .route("/jwks", get(jwks_document))
            .route("/authorize", get(authorize))
            .route("/token", axum::routing::post(token_endpoint))
            .with_state(shared.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Self {
            url,
            key,
            shared,
            task,
        }
    }

    /// The server configuration trusting this issuer.
    pub(crate) fn trusted(&self) -> TrustedIssuer {
        TrustedIssuer {
            issuer: self.url.clone(),
            audience: AUDIENCE.to_owned(),
            tenant_claim: "org_id".to_owned(),
            roles_claim: "roles".to_owned(),
            role_prefix: String::new(),
            ..Default::default()
        }
    }

    /// The configuration trusting this issuer with a console client.
    pub(crate) fn trusted_with_console(&self, client_id: &str) -> TrustedIssuer {
        TrustedIssuer {
            console_client_id: Some(client_id.to_owned()),
            console_display_name: Some("Acme SSO".to_owned()),
            console_scopes: vec!["vaultguard".to_owned()],
            ..self.trusted()
        }
    }

    /// Who signs in at `/authorize` from now on (`sub`, organisation, roles).
    pub(crate) fn set_user(&self, sub: &str, org: &str, roles: &[&str]) {
        *self.shared.user.lock().expect("user lock") =
            json!({"sub": sub, "org_id": org, "roles": roles});
    }

    /// How many codes the token endpoint redeemed.
    pub(crate) fn codes_redeemed(&self) -> usize {
        self.shared.redeemed.load(Ordering::SeqCst)
    }

    /// Publishes exactly `keys` from now on.
    fn publish(&self, keys: &[&SigningKey]) {
        let jwks: Vec<Value> = keys.iter().map(|key| key.jwk()).collect();
        *self.shared.jwks.lock().expect("jwks lock") = json!({ "keys": jwks });
    }

    /// Makes both endpoints answer 503 (or serve again).
    fn set_failing(&self, failing: bool) {
        self.shared.failing.store(failing, Ordering::SeqCst);
    }

    /// Makes the discovery document name `issuer` as its issuer.
    fn set_discovery_issuer(&self, issuer: &str) {
        *self.shared.discovery_issuer.lock().expect("discovery lock") = issuer.to_owned();
    }

    /// Makes the JWKS endpoint answer only after `delay`.
    fn set_jwks_delay(&self, delay: Duration) {
        self.shared.jwks_delay_ms.store(
            u64::try_from(delay.as_millis()).expect("delay in ms"),
            Ordering::SeqCst,
        );
    }

    /// Sends `Cache-Control: <value>` with the JWKS from now on.
    fn set_jwks_cache_control(&self, value: &str) {
        *self.shared.jwks_cache_control.lock().expect("lock") = Some(value.to_owned());
    }

    fn jwks_fetches(&self) -> usize {
        self.shared.jwks_fetches.load(Ordering::SeqCst)
    }

    fn discovery_fetches(&self) -> usize {
        self.shared.discovery_fetches.load(Ordering::SeqCst)
    }

    /// Fresh, valid claims of a user of `org` with `roles`.
    pub(crate) fn claims(&self, org: &str, roles: &[&str]) -> Value {
        let now = now();
        json!({
            "iss": self.url,
            "aud": AUDIENCE,
            "sub": "auth0|alice",
            "iat": now,
            "exp": now + 3600,
            "org_id": org,
            "roles": roles,
        })
    }

    /// `claims` signed with the published key.
    pub(crate) fn token(&self, claims: &Value) -> String {
        self.key.token(claims)
    }

    /// A valid token of an admin of `org_acme`.
    fn admin_token(&self) -> String {
        self.key.token(&self.claims(ORG_ACME, &["admin"]))
    }
}

impl Drop for LocalIssuer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------
// Server fixtures
// ---------------------------------------------------------------------------

/// A server trusting a local issuer, with tenant `acme` bound to `org_acme`.
struct Fixture {
    issuer: LocalIssuer,
    server: TestServer,
    acme: pb::Tenant,
}

async fn start() -> Fixture {
    let issuer = LocalIssuer::start("key-1").await;
    let server = TestServer::start_with(TestOptions {
        trusted_issuers: vec![issuer.trusted()],
        ..Default::default()
    })
    .await;
    let acme = server.create_tenant("acme").await;
    let tenant = bind(&server, &acme.id, &issuer.url, ORG_ACME).await;
    assert!(
        tenant
            .external_organizations
            .iter()
            .any(|org| org.issuer == issuer.url && org.organization_id == ORG_ACME),
        "binding not reflected: {tenant:?}"
    );
    Fixture {
        issuer,
        server,
        acme,
    }
}

/// `issuer`'s organisation `org`.
fn organization(issuer: &str, org: &str) -> Option<pb::ExternalOrganization> {
    Some(pb::ExternalOrganization {
        issuer: issuer.to_owned(),
        organization_id: org.to_owned(),
    })
}

/// Binds `issuer`'s organisation `org` to `tenant_id` as the operator.
pub(crate) async fn bind(
    server: &TestServer,
    tenant_id: &str,
    issuer: &str,
    org: &str,
) -> pb::Tenant {
    let (tenant_id, organization) = (tenant_id.to_owned(), organization(issuer, org));
    let request = pb::BindExternalOrganizationRequest {
        tenant_id,
        organization,
    };
    let operator = server.operator().await;
    let bound = operator.bind_external_organization(request).await;
    bound
        .expect("bind external organisation")
        .tenant
        .expect("tenant")
}

/// Unbinds `issuer`'s organisation `org` from `tenant_id` as the operator.
pub(crate) async fn unbind(server: &TestServer, tenant_id: &str, issuer: &str, org: &str) {
    let (tenant_id, organization) = (tenant_id.to_owned(), organization(issuer, org));
    let request = pb::UnbindExternalOrganizationRequest {
        tenant_id,
        organization,
    };
    let operator = server.operator().await;
    let unbound = operator.unbind_external_organization(request).await;
    unbound.expect("unbind external organisation");
}

pub(crate) async fn who_am_i(
    server: &TestServer,
    token: &str,
) -> Result<pb::WhoAmIResponse, ClientError> {
    let client = server.with_bearer(token).await;
    client.raw_who_am_i(pb::WhoAmIRequest {}).await
}

async fn list_agents(client: &VaultGuardClient) -> Result<pb::ListAgentsResponse, ClientError> {
    client.list_agents(pb::ListAgentsRequest::default()).await
}

async fn list_tenants(client: &VaultGuardClient) -> Result<pb::ListTenantsResponse, ClientError> {
    client.list_tenants(pb::ListTenantsRequest::default()).await
}

/// WhoAmI with `token` must be refused as UNAUTHENTICATED (see
/// [`assert_refused`]); `case` names the token in the failure.
pub(crate) async fn refused(server: &TestServer, case: &str, token: &str) {
    assert_refused(case, who_am_i(server, token).await);
}

/// Asserts that `token` is refused with UNAUTHENTICATED and the generic
/// ERROR_REASON_UNAUTHENTICATED.
#[track_caller]
pub(crate) fn assert_refused(case: &str, result: Result<pb::WhoAmIResponse, ClientError>) {
    let err = match result {
        Ok(response) => panic!("{case}: expected UNAUTHENTICATED, got Ok({response:?})"),
        Err(err) => err,
    };
    assert_eq!(
        err.code(),
        Some(Code::Unauthenticated),
        "{case}: unexpected error {err:?}"
    );
    assert_eq!(
        err.reason(),
        Some(pb::ErrorReason::Unauthenticated),
        "{case}: unexpected reason {err:?}"
    );
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[tokio::test]
async fn valid_issuer_token_authenticates_a_tenant_admin() {
    let Fixture {
        issuer,
        server,
        acme,
    } = start().await;
    let token = issuer.admin_token();

    let me = who_am_i(&server, &token)
        .await
        .expect("WhoAmI with the issuer's token");
    let actor = me.actor.clone().expect("actor");
    assert_eq!(actor.kind(), pb::PrincipalKind::Human);
    assert_eq!(actor.tenant_id, acme.id);
    assert_eq!(actor.subject, "auth0|alice");
    assert!(
        me.roles().any(|role| role == pb::Role::Admin),
        "roles: {:?}",
        me.roles
    );
    assert!(
        !me.roles().any(|role| role == pb::Role::Operator),
        "roles: {:?}",
        me.roles
    );
    assert_eq!(me.issuer.trim_end_matches('/'), issuer.url);
    assert!(me.expire_time.is_some(), "expire_time missing");
    assert_eq!(issuer.discovery_fetches(), 1, "discovery fetched once");
    assert_eq!(issuer.jwks_fetches(), 1, "JWKS fetched once");

    // The admin may call admin RPCs of its tenant, and sees that tenant's agents.
    let (agent, _, _) = server.create_agent(&acme.id, "bot").await;
    let admin = server.with_bearer(&token).await;
    let listed = list_agents(&admin)
        .await
        .expect("ListAgents as the issuer's admin");
    assert!(
        listed.agents.iter().any(|a| a.id == agent.id),
        "agents: {:?}",
        listed.agents
    );
    let got = get_agent(&admin, &agent.id)
        .await
        .expect("GetAgent as the issuer's admin");
    assert_eq!(got.agent.expect("agent").id, agent.id);

    // The key is cached: further calls do not fetch the JWKS again.
    assert_eq!(issuer.jwks_fetches(), 1, "the JWKS is cached between calls");

    // Roles given as one space-separated string work as well.
    let mut claims = issuer.claims(ORG_ACME, &[]);
    claims["roles"] = json!("auditor admin");
    let me = who_am_i(&server, &issuer.key.token(&claims))
        .await
        .expect("space-separated roles");
    assert!(
        me.roles().any(|role| role == pb::Role::Admin),
        "roles: {:?}",
        me.roles
    );
    assert!(
        me.roles().any(|role| role == pb::Role::Auditor),
        "roles: {:?}",
        me.roles
    );

    server.stop().await;
}

#[tokio::test]
async fn token_of_an_untrusted_issuer_is_refused() {
    let Fixture { issuer, server, .. } = start().await;
    // A second, fully working issuer that the server does not trust.
    let stranger = LocalIssuer::start("key-1").await;
    let token = stranger.key.token(&stranger.claims(ORG_ACME, &["admin"]));
    refused(&server, "untrusted issuer", &token).await;
    assert_eq!(
        stranger.discovery_fetches(),
        0,
        "an untrusted issuer is never contacted"
    );
    assert_eq!(
        stranger.jwks_fetches(),
        0,
        "an untrusted issuer is never contacted"
    );

    // The trusted issuer's `iss`, `kid` and claims, signed by another key.
    let forged = stranger
        .key
        .token_with_kid(&issuer.key.kid, &issuer.claims(ORG_ACME, &["admin"]));
    refused(&server, "trusted iss signed by another key", &forged).await;

    // No `iss` at all.
    let mut claims = issuer.claims(ORG_ACME, &["admin"]);
    claims.as_object_mut().expect("object").remove("iss");
    refused(&server, "no iss", &issuer.key.token(&claims)).await;

    // The genuine token still works.
    who_am_i(&server, &issuer.admin_token())
        .await
        .expect("genuine token");
    server.stop().await;
}

#[tokio::test]
async fn wrong_audience_and_expired_tokens_are_refused() {
    let Fixture { issuer, server, .. } = start().await;

    let mut claims = issuer.claims(ORG_ACME, &["admin"]);
    claims["aud"] = json!("another-api");
    refused(&server, "wrong audience", &issuer.key.token(&claims)).await;

    claims["aud"] = json!(["another-api", "yet-another"]);
    refused(
        &server,
        "audience list without ours",
        &issuer.key.token(&claims),
    )
    .await;

    claims.as_object_mut().expect("object").remove("aud");
    refused(&server, "no audience", &issuer.key.token(&claims)).await;

    let mut claims = issuer.claims(ORG_ACME, &["admin"]);
    claims["iat"] = json!(now() - 3_700);
    claims["exp"] = json!(now() - 100);
    refused(&server, "expired 100 s ago", &issuer.key.token(&claims)).await;

    claims.as_object_mut().expect("object").remove("exp");
    refused(&server, "no exp", &issuer.key.token(&claims)).await;

    let mut claims = issuer.claims(ORG_ACME, &["admin"]);
    claims.as_object_mut().expect("object").remove("sub");
    refused(&server, "no sub", &issuer.key.token(&claims)).await;

    let mut claims = issuer.claims(ORG_ACME, &["admin"]);
    claims["iss"] = json!(format!("{}/other", issuer.url));
    refused(
        &server,
        "iss with a different path",
        &issuer.key.token(&claims),
    )
    .await;

    // An audience list containing ours is fine.
    let mut claims = issuer.claims(ORG_ACME, &["admin"]);
    claims["aud"] = json!(["another-api", AUDIENCE]);
    who_am_i(&server, &issuer.key.token(&claims))
        .await
        .expect("audience list with ours");

    server.stop().await;
}

#[tokio::test]
async fn unsigned_and_algorithm_confusion_tokens_are_refused() {
    let Fixture { issuer, server, .. } = start().await;
    let claims = issuer.claims(ORG_ACME, &["admin"]);
    let kid = issuer.key.kid.clone();

    for alg in ["none", "None", "NONE", "nOnE"] {
        let token = unsigned_token(alg, &kid, &claims);
        refused(&server, &format!("alg {alg}"), &token).await;
    }
    // `alg: none` carrying the genuine RS256 signature of the same payload.
    let genuine = issuer.key.token(&claims);
    let signature = genuine.rsplit('.').next().expect("signature");
    let token = format!("{}{signature}", unsigned_token("none", &kid, &claims));
    refused(&server, "alg none with a signature", &token).await;

    // HS256 "signed" with the public key, in every encoding an attacker
    // could fetch from the JWKS.
    for (encoding, secret) in issuer.key.public_key_encodings() {
        let token = hs256_token(&kid, &secret, &claims);
        refused(
            &server,
            &format!("HS256 with the public key as {encoding}"),
            &token,
        )
        .await;
    }
    // Other symmetric algorithms, too.
    for alg in ["HS384", "HS512"] {
        let header = json!({"alg": alg, "typ": "JWT", "kid": kid});
        let input = signing_input(&header, &claims);
        let algorithm = if alg == "HS384" {
            aws_lc_rs::hmac::HMAC_SHA384
        } else {
            aws_lc_rs::hmac::HMAC_SHA512
        };
        let key = aws_lc_rs::hmac::Key::new(algorithm, &issuer.key.modulus());
        let tag = aws_lc_rs::hmac::sign(&key, input.as_bytes());
        let token = format!("{input}.{}", b64url(tag.as_ref()));
        refused(&server, &format!("{alg} with the modulus"), &token).await;
    }
    // An RS256 signature under an ES256 / PS256 header does not verify either.
    for alg in ["ES256", "PS256", "RS384"] {
        let header = json!({"alg": alg, "typ": "JWT", "kid": kid});
        let input = signing_input(&header, &claims);
        let token = format!("{input}.{}", b64url(issuer.key.sign(&input)));
        refused(&server, &format!("RS256 signature under alg {alg}"), &token).await;
    }

    // The genuine token still works.
    who_am_i(&server, &genuine).await.expect("genuine token");
    server.stop().await;
}

#[tokio::test]
async fn tampered_payload_is_refused() {
    let Fixture { issuer, server, .. } = start().await;
    let claims = issuer.claims(ORG_ACME, &["approver"]);
    let token = issuer.key.token(&claims);
    let me = who_am_i(&server, &token).await.expect("untampered token");
    assert!(
        me.roles().any(|role| role == pb::Role::Approver),
        "roles: {:?}",
        me.roles
    );

    let mut escalated = claims.clone();
    escalated["roles"] = json!(["admin"]);
    refused(
        &server,
        "roles changed after signing",
        &with_payload(&token, &escalated),
    )
    .await;

    let mut other_user = claims.clone();
    other_user["sub"] = json!("auth0|mallory");
    refused(
        &server,
        "sub changed after signing",
        &with_payload(&token, &other_user),
    )
    .await;

    let mut longer = claims.clone();
    longer["exp"] = json!(now() + 86_400 * 365);
    refused(
        &server,
        "exp changed after signing",
        &with_payload(&token, &longer),
    )
    .await;

    // A flipped bit in the signature.
    let mut bytes = URL_SAFE_NO_PAD
        .decode(token.rsplit('.').next().expect("signature"))
        .expect("signature b64");
    bytes[10] ^= 0x01;
    let (input, _) = token.rsplit_once('.').expect("three parts");
    let flipped = format!("{input}.{}", b64url(&bytes));
    refused(&server, "flipped signature bit", &flipped).await;

    // An empty signature on an RS256 header.
    refused(&server, "empty signature", &format!("{input}.")).await;

    server.stop().await;
}

#[tokio::test]
async fn organisation_not_bound_to_a_tenant_is_refused() {
    let Fixture { issuer, server, .. } = start().await;

    let token = issuer.key.token(&issuer.claims("org_nobody", &["admin"]));
    let err = expect_code(who_am_i(&server, &token).await, Code::Unauthenticated);
    assert_eq!(
        err.reason(),
        Some(pb::ErrorReason::UnknownOrganization),
        "{err:?}"
    );

    // The organisation claim is case-sensitive.
    let token = issuer.key.token(&issuer.claims("ORG_ACME", &["admin"]));
    let err = expect_code(who_am_i(&server, &token).await, Code::Unauthenticated);
    assert_eq!(
        err.reason(),
        Some(pb::ErrorReason::UnknownOrganization),
        "{err:?}"
    );

    // No organisation claim, or an empty one: refused too.
    let mut claims = issuer.claims(ORG_ACME, &["admin"]);
    claims.as_object_mut().expect("object").remove("org_id");
    refused(&server, "no org_id", &issuer.key.token(&claims)).await;
    claims["org_id"] = json!("");
    refused(&server, "empty org_id", &issuer.key.token(&claims)).await;
    claims["org_id"] = json!(["org_acme"]);
    refused(&server, "org_id not a string", &issuer.key.token(&claims)).await;

    server.stop().await;
}

#[tokio::test]
async fn unknown_kid_is_refused() {
    let Fixture { issuer, server, .. } = start().await;
    let claims = issuer.claims(ORG_ACME, &["admin"]);

    // The published key's signature under a kid the JWKS does not contain.
    let token = issuer.key.token_with_kid("no-such-kid", &claims);
    refused(&server, "unknown kid, published key", &token).await;
    let fetches = issuer.jwks_fetches();
    assert!(
        fetches >= 1,
        "the unknown kid made the server fetch the JWKS"
    );

    // An unpublished key with its own kid.
    let rogue = SigningKey::generate("rogue-key");
    refused(
        &server,
        "unknown kid, unpublished key",
        &rogue.token(&claims),
    )
    .await;
    assert!(
        issuer.jwks_fetches() > fetches,
        "an unknown kid triggers a re-fetch"
    );

    // No kid at all.
    let header = json!({"alg": "RS256", "typ": "JWT"});
    let input = signing_input(&header, &claims);
    let token = format!("{input}.{}", b64url(issuer.key.sign(&input)));
    refused(&server, "no kid", &token).await;

    // The genuine token still works.
    who_am_i(&server, &issuer.key.token(&claims))
        .await
        .expect("genuine token");
    server.stop().await;
}

#[tokio::test]
async fn key_rotation_at_the_issuer_is_picked_up() {
    let Fixture { issuer, server, .. } = start().await;
    let old_token = issuer.admin_token();
    who_am_i(&server, &old_token)
        .await
        .expect("token of the first key");
    assert_eq!(issuer.jwks_fetches(), 1);

    // The issuer rotates: a new key with a new kid, published alongside the old.
    let rotated = SigningKey::generate("key-2");
    issuer.publish(&[&issuer.key, &rotated]);
    let new_token = rotated.token(&issuer.claims(ORG_ACME, &["admin"]));
    let me = who_am_i(&server, &new_token)
        .await
        .expect("token of the rotated key");
    assert!(
        me.roles().any(|role| role == pb::Role::Admin),
        "roles: {:?}",
        me.roles
    );
    assert_eq!(
        issuer.jwks_fetches(),
        2,
        "the unknown kid made the server re-fetch the JWKS"
    );
    // Both keys now come from the cache.
    who_am_i(&server, &old_token)
        .await
        .expect("old key still published");
    who_am_i(&server, &new_token).await.expect("new key cached");
    assert_eq!(
        issuer.jwks_fetches(),
        2,
        "known kids are served from the cache"
    );

    // The issuer retires the old key: only the new one is published. Known
    // kids stay cached until an unknown kid forces a refresh.
    issuer.publish(&[&rotated]);
    let third = SigningKey::generate("key-3");
    refused(
        &server,
        "unpublished third key",
        &third.token(&issuer.claims(ORG_ACME, &["admin"])),
    )
    .await;
    assert_eq!(
        issuer.jwks_fetches(),
        3,
        "the unknown kid made the server re-fetch the JWKS"
    );
    refused(&server, "retired key after a refresh", &old_token).await;
    who_am_i(&server, &new_token)
        .await
        .expect("current key after the refresh");

    server.stop().await;
}

#[tokio::test]
async fn key_swapped_without_overlap_is_picked_up() {
    let Fixture { issuer, server, .. } = start().await;
    who_am_i(&server, &issuer.admin_token())
        .await
        .expect("token of the first key");
    assert_eq!(issuer.jwks_fetches(), 1);

    // The JWKS is swapped to a brand-new key only.
    let rotated = SigningKey::generate("key-2");
    issuer.publish(&[&rotated]);
    let token = rotated.token(&issuer.claims(ORG_ACME, &["admin"]));
    let me = who_am_i(&server, &token)
        .await
        .expect("token of the rotated key");
    assert_eq!(me.actor.expect("actor").kind(), pb::PrincipalKind::Human);
    assert_eq!(
        issuer.jwks_fetches(),
        2,
        "the unknown kid made the server re-fetch the JWKS"
    );

    server.stop().await;
}

#[tokio::test]
async fn issuer_roles_map_to_tenant_roles_only() {
    let Fixture {
        issuer,
        server,
        acme,
    } = start().await;

    // An approver is not an admin.
    let approver_token = issuer.key.token(&issuer.claims(ORG_ACME, &["approver"]));
    let me = who_am_i(&server, &approver_token)
        .await
        .expect("approver WhoAmI");
    assert_eq!(me.actor.clone().expect("actor").tenant_id, acme.id);
    assert_eq!(me.roles, vec![pb::Role::Approver as i32]);
    let approver = server.with_bearer(&approver_token).await;
    let err = expect_code(list_agents(&approver).await, Code::PermissionDenied);
    assert_eq!(err.reason(), Some(pb::ErrorReason::RoleRequired), "{err:?}");

    // "operator" from an external issuer grants nothing.
    let operator_token = issuer.key.token(&issuer.claims(ORG_ACME, &["operator"]));
    let pretender = server.with_bearer(&operator_token).await;
    let err = expect_code(list_tenants(&pretender).await, Code::PermissionDenied);
    assert_eq!(err.reason(), Some(pb::ErrorReason::RoleRequired), "{err:?}");

    // Nor does "agent"; alongside a tenant role the principal stays a human.
    let mixed_token = issuer
        .key
        .token(&issuer.claims(ORG_ACME, &["operator", "agent", "auditor"]));
    let me = who_am_i(&server, &mixed_token)
        .await
        .expect("mixed roles WhoAmI");
    let actor = me.actor.clone().expect("actor");
    assert_eq!(actor.kind(), pb::PrincipalKind::Human);
    assert_eq!(actor.tenant_id, acme.id);
    assert_eq!(
        me.roles,
        vec![pb::Role::Auditor as i32],
        "only tenant roles survive"
    );
    let mixed = server.with_bearer(&mixed_token).await;
    let err = expect_code(list_tenants(&mixed).await, Code::PermissionDenied);
    assert_eq!(err.reason(), Some(pb::ErrorReason::RoleRequired), "{err:?}");
    let err = expect_code(list_agents(&mixed).await, Code::PermissionDenied);
    assert_eq!(err.reason(), Some(pb::ErrorReason::RoleRequired), "{err:?}");

    // Unknown role names are ignored.
    let token = issuer
        .key
        .token(&issuer.claims(ORG_ACME, &["superuser", "Admin", "root"]));
    let client = server.with_bearer(&token).await;
    let err = expect_code(list_agents(&client).await, Code::PermissionDenied);
    assert_eq!(err.reason(), Some(pb::ErrorReason::RoleRequired), "{err:?}");

    server.stop().await;
}

#[tokio::test]
async fn role_prefix_is_required_and_stripped() {
    let issuer = LocalIssuer::start("key-1").await;
    let trusted = TrustedIssuer {
        role_prefix: "vaultguard:".to_owned(),
        ..issuer.trusted()
    };
    let server = TestServer::start_with(TestOptions {
        trusted_issuers: vec![trusted],
        ..Default::default()
    })
    .await;
    let acme = server.create_tenant("acme").await;
    bind(&server, &acme.id, &issuer.url, ORG_ACME).await;

    let token = issuer
        .key
        .token(&issuer.claims(ORG_ACME, &["vaultguard:admin", "approver"]));
    let me = who_am_i(&server, &token).await.expect("prefixed roles");
    assert_eq!(
        me.roles,
        vec![pb::Role::Admin as i32],
        "only prefixed roles count"
    );
    list_agents(&server.with_bearer(&token).await)
        .await
        .expect("prefixed admin lists agents");

    let token = issuer.key.token(&issuer.claims(ORG_ACME, &["admin"]));
    let client = server.with_bearer(&token).await;
    let err = expect_code(list_agents(&client).await, Code::PermissionDenied);
    assert_eq!(err.reason(), Some(pb::ErrorReason::RoleRequired), "{err:?}");

    server.stop().await;
}

#[tokio::test]
async fn organisation_of_another_tenant_cannot_reach_acme() {
    let Fixture {
        issuer,
        server,
        acme,
    } = start().await;
    let beta = server.create_tenant("beta").await;
    bind(&server, &beta.id, &issuer.url, ORG_BETA).await;
    let (acme_agent, _, _) = server.create_agent(&acme.id, "bot").await;

    let beta_token = issuer.key.token(&issuer.claims(ORG_BETA, &["admin"]));
    let me = who_am_i(&server, &beta_token)
        .await
        .expect("beta admin WhoAmI");
    assert_eq!(me.actor.expect("actor").tenant_id, beta.id);

    let beta_admin = server.with_bearer(&beta_token).await;
    expect_code(get_agent(&beta_admin, &acme_agent.id).await, Code::NotFound);
    let listed = list_agents(&beta_admin)
        .await
        .expect("beta lists its agents");
    assert!(
        listed.agents.iter().all(|agent| agent.id != acme_agent.id),
        "acme's agent leaked: {:?}",
        listed.agents
    );

    // Acme's own admin sees it.
    let acme_admin = server.with_bearer(&issuer.admin_token()).await;
    get_agent(&acme_admin, &acme_agent.id)
        .await
        .expect("acme admin reads its agent");

    // An organisation maps to one tenant only.
    let operator = server.operator().await;
    let request = operator
        .request(pb::BindExternalOrganizationRequest {
            tenant_id: beta.id.clone(),
            organization: Some(pb::ExternalOrganization {
                issuer: issuer.url.clone(),
                organization_id: ORG_ACME.to_owned(),
            }),
        })
        .await
        .expect("request");
    expect_code(
        operator.tenants().bind_external_organization(request).await,
        Code::AlreadyExists,
    );

    server.stop().await;
}

#[tokio::test]
async fn issuer_outage_refuses_new_kids_but_keeps_cached_keys() {
    let Fixture { issuer, server, .. } = start().await;
    let token = issuer.admin_token();
    who_am_i(&server, &token)
        .await
        .expect("token of the published key");

    // The issuer goes down: an unknown kid cannot be resolved, and the failed
    // re-fetch does not throw away the keys already cached.
    issuer.set_failing(true);
    let rotated = SigningKey::generate("key-2");
    issuer.publish(&[&issuer.key, &rotated]);
    let new_token = rotated.token(&issuer.claims(ORG_ACME, &["admin"]));
    refused(&server, "issuer unreachable", &new_token).await;
    who_am_i(&server, &token)
        .await
        .expect("cached key survives a failed re-fetch");

    // A discovery document naming another issuer is not followed (once the
    // failed fetch's 1 s back-off has passed, the fetch is tried again).
    issuer.set_failing(false);
    issuer.set_discovery_issuer("http://evil.invalid");
    let fetches = issuer.jwks_fetches();
    let discoveries = issuer.discovery_fetches();
    server.clock.advance(1_100);
    refused(&server, "discovery names another issuer", &new_token).await;
    assert_eq!(issuer.discovery_fetches(), discoveries + 1);
    assert_eq!(
        issuer.jwks_fetches(),
        fetches,
        "the JWKS of a mismatched discovery is not fetched"
    );

    // Back to normal: after the second (2 s) back-off the new key is
    // picked up.
    issuer.set_discovery_issuer(&issuer.url);
    server.clock.advance(2_100);
    who_am_i(&server, &new_token)
        .await
        .expect("rotated key after the outage");

    server.stop().await;
}

#[tokio::test]
async fn unbinding_and_suspension_take_effect_immediately() {
    let Fixture {
        issuer,
        server,
        acme,
    } = start().await;
    let token = issuer.admin_token();
    who_am_i(&server, &token).await.expect("bound organisation");
    let operator = server.operator().await;

    // Suspending the tenant refuses its OIDC humans.
    operator
        .suspend_tenant(pb::SuspendTenantRequest {
            tenant_id: acme.id.clone(),
            reason: "test".to_owned(),
        })
        .await
        .expect("suspend acme");
    let err = expect_code(who_am_i(&server, &token).await, Code::PermissionDenied);
    assert_eq!(
        err.reason(),
        Some(pb::ErrorReason::TenantSuspended),
        "{err:?}"
    );
    operator
        .reactivate_tenant(pb::ReactivateTenantRequest {
            tenant_id: acme.id.clone(),
            reason: "test".to_owned(),
        })
        .await
        .expect("reactivate acme");
    who_am_i(&server, &token).await.expect("reactivated tenant");

    // Unbinding the organisation refuses the same, still valid, token.
    operator
        .unbind_external_organization(pb::UnbindExternalOrganizationRequest {
            tenant_id: acme.id.clone(),
            organization: Some(pb::ExternalOrganization {
                issuer: issuer.url.clone(),
                organization_id: ORG_ACME.to_owned(),
            }),
        })
        .await
        .expect("unbind org_acme");
    let err = expect_code(who_am_i(&server, &token).await, Code::Unauthenticated);
    assert_eq!(
        err.reason(),
        Some(pb::ErrorReason::UnknownOrganization),
        "{err:?}"
    );

    server.stop().await;
}

/// Auth0 and others put a trailing slash on `iss` (`https://x.auth0.com/`),
/// so the issuer is configured with it. The binding is stored without the
/// slash (domain/tenants.rs `bind_org` trims it) but looked up with the
/// configured issuer verbatim (auth.rs `principal_from_oidc` uses
/// `ExternalIdentity::issuer` = `TrustedIssuer::issuer`), so every such
/// token is refused with ERROR_REASON_UNKNOWN_ORGANIZATION.
#[tokio::test]
async fn issuer_configured_with_trailing_slash_authenticates() {
    let issuer = LocalIssuer::start("key-1").await;
    let configured = format!("{}/", issuer.url);
    let trusted = TrustedIssuer {
        issuer: configured.clone(),
        ..issuer.trusted()
    };
    let server = TestServer::start_with(TestOptions {
        trusted_issuers: vec![trusted],
        ..Default::default()
    })
    .await;
    let acme = server.create_tenant("acme").await;
    bind(&server, &acme.id, &configured, ORG_ACME).await;

    let mut claims = issuer.claims(ORG_ACME, &["admin"]);
    claims["iss"] = json!(configured);
    let me = who_am_i(&server, &issuer.key.token(&claims))
        .await
        .expect("token with the configured iss");
    assert_eq!(me.actor.expect("actor").tenant_id, acme.id);

    server.stop().await;
}

#[tokio::test]
async fn a_key_removed_from_the_jwks_stops_verifying_after_its_lifetime() {
    let Fixture { issuer, server, .. } = start().await;
    let old_token = issuer.admin_token();
    // The issuer says its key set may be cached for two minutes.
    issuer.set_jwks_cache_control("public, max-age=120");
    who_am_i(&server, &old_token)
        .await
        .expect("token of the first key");
    assert_eq!(issuer.jwks_fetches(), 1);

    // The issuer rotates the key out. Within the lifetime the cached key
    // keeps verifying, without a fetch.
    let rotated = SigningKey::generate("key-2");
    issuer.publish(&[&rotated]);
    server.clock.advance(60_000);
    who_am_i(&server, &old_token)
        .await
        .expect("cached key within its lifetime");
    assert_eq!(
        issuer.jwks_fetches(),
        1,
        "a fresh cached key needs no fetch"
    );

    // Past the lifetime the key set is fetched again and the removed key no
    // longer verifies; the current one does, from the new cache.
    server.clock.advance(61_000);
    refused(
        &server,
        "a key rotated out, past the cache lifetime",
        &old_token,
    )
    .await;
    assert_eq!(
        issuer.jwks_fetches(),
        2,
        "the expired key set was re-fetched"
    );
    who_am_i(
        &server,
        &rotated.token(&issuer.claims(ORG_ACME, &["admin"])),
    )
    .await
    .expect("the current key");
    assert_eq!(issuer.jwks_fetches(), 2);
    server.stop().await;
}

#[tokio::test]
async fn a_failing_issuer_is_asked_once_per_back_off_period() {
    let Fixture { issuer, server, .. } = start().await;
    who_am_i(&server, &issuer.admin_token())
        .await
        .expect("token of the first key");
    let before = issuer.discovery_fetches();

    // The issuer goes down; tokens with an unknown kid keep coming.
    issuer.set_failing(true);
    let unknown = SigningKey::generate("key-2");
    let token = unknown.token(&issuer.claims(ORG_ACME, &["admin"]));
    refused(&server, "issuer down", &token).await;
    assert_eq!(issuer.discovery_fetches(), before + 1);
    let started = Instant::now();
    for _ in 0..20 {
        refused(&server, "issuer down, backing off", &token).await;
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "refusals while backing off are quick: {:?}",
        started.elapsed()
    );
    assert_eq!(
        issuer.discovery_fetches(),
        before + 1,
        "no fetch within the first back-off period"
    );

    // One more fetch once the back-off (1 s, then doubling) has passed.
    server.clock.advance(1_100);
    for _ in 0..5 {
        refused(&server, "issuer still down", &token).await;
    }
    assert_eq!(issuer.discovery_fetches(), before + 2);
    server.clock.advance(1_100);
    refused(&server, "second back-off (2 s)", &token).await;
    assert_eq!(
        issuer.discovery_fetches(),
        before + 2,
        "the back-off doubled"
    );
    server.clock.advance(1_000);
    refused(&server, "issuer still down", &token).await;
    assert_eq!(issuer.discovery_fetches(), before + 3);

    // The cached key keeps verifying throughout; once the issuer is back
    // and the back-off passed, the new key is picked up.
    who_am_i(&server, &issuer.admin_token())
        .await
        .expect("cached key while the issuer is down");
    issuer.set_failing(false);
    issuer.publish(&[&issuer.key, &unknown]);
    server.clock.advance(5_000);
    who_am_i(&server, &token)
        .await
        .expect("the new key after the outage");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_jwks_endpoint_does_not_block_cached_keys() {
    let Fixture { issuer, server, .. } = start().await;
    let cached = issuer.admin_token();
    who_am_i(&server, &cached).await.expect("first key");
    assert_eq!(issuer.jwks_fetches(), 1);

    // The issuer rotates in a second key and its JWKS endpoint turns slow.
    let rotated = SigningKey::generate("key-2");
    issuer.publish(&[&issuer.key, &rotated]);
    issuer.set_jwks_delay(Duration::from_secs(3));
    let new_token = rotated.token(&issuer.claims(ORG_ACME, &["admin"]));
    let waiting: Vec<_> = (0..4)
        .map(|_| {
            let (url, token) = (server.grpc_url(), new_token.clone());
            tokio::spawn(async move {
                let client = VaultGuardClient::connect(url)
                    .await
                    .unwrap()
                    .with_bearer(&token);
                client.raw_who_am_i(pb::WhoAmIRequest {}).await.map(|_| ())
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Meanwhile a token with the cached kid verifies at once.
    let started = Instant::now();
    who_am_i(&server, &cached)
        .await
        .expect("cached key during a slow fetch");
    println!(
        "a cached kid verified in {:?} during another kid's 3 s JWKS fetch",
        started.elapsed()
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "a cached kid waited {:?} for another kid's fetch",
        started.elapsed()
    );

    // The callers with the new kid shared one fetch.
    for call in waiting {
        call.await
            .unwrap()
            .expect("the new key after the slow fetch");
    }
    assert_eq!(
        issuer.jwks_fetches(),
        2,
        "one fetch for the concurrent unknown kids"
    );
    server.stop().await;
}
