//! A real OAuth 2.0 authorization server on 127.0.0.1:0 for the vault tests.
//!
//! [`FakeProvider`] speaks the parts of RFC 6749, RFC 7636 (PKCE), RFC 7009
//! (revocation) and OpenID Connect that VaultGuard's connected accounts use,
//! over real HTTP (axum), and checks what a strict provider checks:
//!
//! * `GET /authorize` wants `response_type=code`, the configured
//!   `client_id`, an absolute `redirect_uri`, `code_challenge_method=S256`
//!   and a `code_challenge`; it issues a single-use code bound to the client,
//!   the redirect URI, the challenge and the scope and answers `302` to
//!   `redirect_uri?code=…&state=…` (or `?error=access_denied&state=…` while
//!   [`FakeProvider::set_deny`] is on). A request it cannot redirect for
//!   (wrong client, missing redirect URI, missing PKCE) gets `400`.
//! * `POST /token` (form) authenticates the client (HTTP Basic with
//!   form-urlencoded id and secret, or `client_secret_post`; a public client
//!   only names its `client_id`), then serves the `authorization_code` grant
//!   (code single-use, same `redirect_uri`, `BASE64URL(SHA256(verifier))` =
//!   challenge) and the `refresh_token` grant (known, unrevoked token; a
//!   requested `scope` must be a subset of the grant; a rotated token is
//!   spent). Errors are RFC 6749 §5.2 JSON bodies.
//! * `POST /revoke` (RFC 7009) revokes a refresh token with every access
//!   token of its grant, or one access token; it answers `200` for unknown
//!   tokens too.
//! * `GET /userinfo` answers `200 {"sub": …}` only for a live access token
//!   it issued (`Authorization: Bearer …`), else `401`: this is how a test
//!   proves that a token VaultGuard handed out really works.
//!
//! Failure modes can be switched at runtime (`invalid_grant` on every
//! refresh, `5xx` on every token call, rotation, access-token lifetime, a
//! delay that widens race windows), and everything it saw or issued can be
//! read back: counters of calls, every token it issued (so a test can search
//! logs, responses and database rows for leaks), the refresh tokens
//! presented, the scope of the last refresh, and every token or revocation
//! request as it arrived, before any check ([`FakeProvider::received`]: a
//! provider standing for an attacker's server records what it was sent even
//! when it would refuse it).
//!
//! Access-token expiry is measured on [`ProviderOptions::clock`] when set
//! (pass the test server's clock so that moving it expires the provider's
//! tokens as well), else on the system clock.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use vaultguard_client::pb;
use vaultguard_server::clock::{Clock, SystemClock};

/// How a provider is set up when it starts.
#[derive(Debug, Clone)]
pub struct ProviderOptions {
    /// The client id VaultGuard must present.
    pub client_id: String,
    /// The client secret VaultGuard must present; `None` for a public
    /// client (PKCE only).
    pub client_secret: Option<String>,
    /// The `sub` of the account that "logs in" at the authorize endpoint.
    pub subject: String,
    /// The account's email, put in the ID token.
    pub email: String,
    /// Whether the code exchange returns an (unsigned) ID token.
    pub id_token: bool,
    /// The lifetime of issued access tokens, in seconds.
    pub access_ttl_seconds: u64,
    /// Whether a refresh rotates the refresh token.
    pub rotate: bool,
    /// The clock access-token expiry is measured on; `None`: the system
    /// clock.
    pub clock: Option<Arc<dyn Clock>>,
}

impl Default for ProviderOptions {
    fn default() -> Self {
        Self {
            client_id: "vaultguard-test-client".to_owned(),
            client_secret: Some("provider-client-secret-8f3a2c91d7e4".to_owned()),
            subject: "provider-user-4711".to_owned(),
            email: "user-4711@provider.test".to_owned(),
            id_token: true,
            access_ttl_seconds: 3600,
            rotate: false,
            clock: None,
        }
    }
}

/// How a token request authenticated its client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// `Authorization: Basic` (RFC 6749 §2.3.1).
    Basic,
    /// `client_secret` in the form body.
    Post,
    /// No secret: a public client naming its `client_id` only.
    None,
}

/// A code issued by `/authorize`, waiting for its exchange.
#[derive(Debug, Clone)]
struct PendingCode {
    client_id: String,
    redirect_uri: String,
    challenge: String,
    scope: Vec<String>,
}

/// A live refresh token.
#[derive(Debug, Clone)]
struct Grant {
    /// Ties the refresh token to the access tokens minted from it (and to
    /// its rotated successors) for revocation.
    family: u64,
    scope: Vec<String>,
}

/// A live access token.
#[derive(Debug, Clone)]
struct AccessGrant {
    family: u64,
    expires_at_millis: i64,
}

/// A token or revocation request as it arrived, before any check.
#[derive(Debug, Clone)]
pub struct Received {
    /// `/token` or `/revoke`.
    pub path: String,
    /// The form fields of the body, decoded.
    pub form: HashMap<String, String>,
    /// The client id and secret of an `Authorization: Basic` header,
    /// decoded (RFC 6749 §2.3.1), if one came.
    pub basic: Option<(String, String)>,
    /// The raw `Authorization` header, if any.
    pub authorization: Option<String>,
}

impl Received {
    /// Whether `secret` occurs anywhere in the request: a form value, the
    /// decoded Basic credentials or the raw header.
    pub fn contains(&self, secret: &str) -> bool {
        !secret.is_empty()
            && (self.form.values().any(|v| v.contains(secret))
                || self
                    .basic
                    .as_ref()
                    .is_some_and(|(id, pw)| id.contains(secret) || pw.contains(secret))
                || self
                    .authorization
                    .as_ref()
                    .is_some_and(|h| h.contains(secret)))
    }
}

/// What the provider issued and saw.
#[derive(Debug, Default)]
struct Ledger {
    codes: HashMap<String, PendingCode>,
    refresh_tokens: HashMap<String, Grant>,
    access_tokens: HashMap<String, AccessGrant>,
    issued_refresh: Vec<String>,
    issued_access: Vec<String>,
    presented_refresh: Vec<String>,
    revoked: Vec<String>,
    last_refresh_scope: Option<String>,
    last_authorize_query: Option<HashMap<String, String>>,
    token_auth: Vec<ClientAuth>,
    received: Vec<Received>,
    next_family: u64,
}

/// Everything the handlers share.
struct Shared {
    client_id: String,
    client_secret: Option<String>,
    subject: String,
    email: String,
    id_token: bool,
    clock: Arc<dyn Clock>,
    base_url: String,
    deny: AtomicBool,
    invalid_grant: AtomicBool,
    fail_5xx: AtomicBool,
    rotate: AtomicBool,
    access_ttl_seconds: AtomicU64,
    delay_millis: AtomicU64,
    authorize_calls: AtomicUsize,
    code_exchanges: AtomicUsize,
    refreshes: AtomicUsize,
    revocations: AtomicUsize,
    ledger: Mutex<Ledger>,
}

impl Shared {
    /// The ledger; a panic in another handler does not hide it.
    fn ledger(&self) -> MutexGuard<'_, Ledger> {
        self.ledger
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A running fake authorization server; stops when dropped.
pub struct FakeProvider {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Drop for FakeProvider {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl std::fmt::Debug for FakeProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeProvider")
            .field("base_url", &self.shared.base_url)
            .finish_non_exhaustive()
    }
}

impl FakeProvider {
    /// Starts a provider on a free port of 127.0.0.1.
    pub async fn start(options: ProviderOptions) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fake provider");
        let addr = listener.local_addr().expect("fake provider address");
        let shared = Arc::new(Shared {
            client_id: options.client_id,
            client_secret: options.client_secret,
            subject: options.subject,
            email: options.email,
            id_token: options.id_token,
            clock: options.clock.unwrap_or_else(|| Arc::new(SystemClock)),
            base_url: format!("http://{addr}"),
            deny: AtomicBool::new(false),
            invalid_grant: AtomicBool::new(false),
            fail_5xx: AtomicBool::new(false),
            rotate: AtomicBool::new(options.rotate),
            access_ttl_seconds: AtomicU64::new(options.access_ttl_seconds),
            delay_millis: AtomicU64::new(0),
            authorize_calls: AtomicUsize::new(0),
            code_exchanges: AtomicUsize::new(0),
            refreshes: AtomicUsize::new(0),
            revocations: AtomicUsize::new(0),
            ledger: Mutex::new(Ledger::default()),
        });
        let router = Router::new()
            .route("/authorize", get(authorize))
            .route("/token", post(token))
            .route("/revoke", post(revoke))
            .route("/userinfo", get(userinfo))
            .with_state(shared.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Self { addr, shared, task }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn base_url(&self) -> String {
        self.shared.base_url.clone()
    }

    /// The authorization endpoint.
    pub fn authorize_url(&self) -> String {
        format!("{}/authorize", self.shared.base_url)
    }

    /// The token endpoint.
    pub fn token_url(&self) -> String {
        format!("{}/token", self.shared.base_url)
    }

    /// The RFC 7009 revocation endpoint.
    pub fn revocation_url(&self) -> String {
        format!("{}/revoke", self.shared.base_url)
    }

    /// The userinfo endpoint (proves an access token works).
    pub fn userinfo_url(&self) -> String {
        format!("{}/userinfo", self.shared.base_url)
    }

    /// The socket address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The configured client id.
    pub fn client_id(&self) -> &str {
        &self.shared.client_id
    }

    /// The configured client secret (`None`: a public client).
    pub fn client_secret(&self) -> Option<&str> {
        self.shared.client_secret.as_deref()
    }

    /// A CreateOAuthProvider request registering this provider as `name`
    /// with its endpoints, client credentials and the default `scopes`.
    pub fn registration(&self, name: &str, scopes: &[&str]) -> pb::CreateOAuthProviderRequest {
        pb::CreateOAuthProviderRequest {
            name: name.to_owned(),
            authorize_url: self.authorize_url(),
            token_url: self.token_url(),
            revocation_url: self.revocation_url(),
            client_id: self.client_id().to_owned(),
            client_secret: self.client_secret().unwrap_or_default().to_owned(),
            scopes: scopes.iter().map(|&scope| scope.to_owned()).collect(),
            extra_authorize_params: HashMap::new(),
        }
    }

    /// The `sub` of the account that logs in.
    pub fn subject(&self) -> &str {
        &self.shared.subject
    }

    /// The account's email.
    pub fn email(&self) -> &str {
        &self.shared.email
    }

    /// While on, `/authorize` answers `error=access_denied` (the user
    /// refused) instead of a code.
    pub fn set_deny(&self, on: bool) {
        self.shared.deny.store(on, Ordering::SeqCst);
    }

    /// While on, every refresh answers `400 {"error":"invalid_grant"}`.
    pub fn set_invalid_grant(&self, on: bool) {
        self.shared.invalid_grant.store(on, Ordering::SeqCst);
    }

    /// While on, every token call answers `503` (after being counted).
    pub fn set_fail_5xx(&self, on: bool) {
        self.shared.fail_5xx.store(on, Ordering::SeqCst);
    }

    /// Whether refreshes rotate the refresh token from now on.
    pub fn set_rotate(&self, on: bool) {
        self.shared.rotate.store(on, Ordering::SeqCst);
    }

    /// The lifetime of access tokens issued from now on.
    pub fn set_access_ttl(&self, seconds: u64) {
        self.shared
            .access_ttl_seconds
            .store(seconds, Ordering::SeqCst);
    }

    /// Sleeps this long (real time) inside every token call before
    /// answering, to widen race windows.
    pub fn set_delay(&self, delay: Duration) {
        let millis = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.shared.delay_millis.store(millis, Ordering::SeqCst);
    }

    /// `/authorize` requests received.
    pub fn authorize_calls(&self) -> usize {
        self.shared.authorize_calls.load(Ordering::SeqCst)
    }

    /// `authorization_code` token requests received (whatever their
    /// outcome).
    pub fn code_exchanges(&self) -> usize {
        self.shared.code_exchanges.load(Ordering::SeqCst)
    }

    /// `refresh_token` token requests received (whatever their outcome).
    pub fn refreshes(&self) -> usize {
        self.shared.refreshes.load(Ordering::SeqCst)
    }

    /// Authenticated revocation requests received.
    pub fn revocations(&self) -> usize {
        self.shared.revocations.load(Ordering::SeqCst)
    }

    /// Every refresh token it issued, oldest first.
    pub fn issued_refresh_tokens(&self) -> Vec<String> {
        self.shared.ledger().issued_refresh.clone()
    }

    /// Every access token it issued, oldest first.
    pub fn issued_access_tokens(&self) -> Vec<String> {
        self.shared.ledger().issued_access.clone()
    }

    /// The refresh tokens presented to the `refresh_token` grant, in order.
    pub fn presented_refresh_tokens(&self) -> Vec<String> {
        self.shared.ledger().presented_refresh.clone()
    }

    /// The tokens revoked through `/revoke`, in order.
    pub fn revoked_tokens(&self) -> Vec<String> {
        self.shared.ledger().revoked.clone()
    }

    /// The `scope` parameter of the last refresh: `None` before any refresh,
    /// `Some(None)` when the last refresh had none.
    pub fn last_refresh_scope(&self) -> Option<Option<String>> {
        let ledger = self.shared.ledger();
        if ledger.presented_refresh.is_empty() {
            None
        } else {
            Some(ledger.last_refresh_scope.clone())
        }
    }

    /// The query of the last `/authorize` request.
    pub fn last_authorize_query(&self) -> Option<HashMap<String, String>> {
        self.shared.ledger().last_authorize_query.clone()
    }

    /// How each authenticated token request presented its client, in order.
    pub fn token_client_auth(&self) -> Vec<ClientAuth> {
        self.shared.ledger().token_auth.clone()
    }

    /// Every request to `/token` and `/revoke`, in arrival order, recorded
    /// before the client is authenticated or anything else is checked.
    pub fn received(&self) -> Vec<Received> {
        self.shared.ledger().received.clone()
    }
}

// ---------------------------------------------------------------------------
// Responses.

/// An RFC 6749 §5.2 error body with `status`.
fn oauth_error(status: StatusCode, error: &str) -> Response {
    (status, no_store(), axum::Json(json!({ "error": error }))).into_response()
}

/// The headers RFC 6749 §5.1 requires on token responses.
fn no_store() -> [(header::HeaderName, &'static str); 2] {
    [
        (header::CACHE_CONTROL, "no-store"),
        (header::PRAGMA, "no-cache"),
    ]
}

/// `400` with a plain-text explanation (for requests that cannot be
/// redirected back).
fn bad_request(why: &str) -> Response {
    (StatusCode::BAD_REQUEST, why.to_owned()).into_response()
}

/// A random opaque token with `prefix`.
fn random_token(prefix: &str) -> String {
    format!(
        "{prefix}{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

/// Form-decodes one `application/x-www-form-urlencoded` component.
fn form_decode(component: &str) -> String {
    url::form_urlencoded::parse(format!("v={component}").as_bytes())
        .next()
        .map(|(_, value)| value.into_owned())
        .unwrap_or_default()
}

/// The space-separated `scope` as a list (empty entries dropped).
fn split_scope(scope: &str) -> Vec<String> {
    scope
        .split(' ')
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

// ---------------------------------------------------------------------------
// GET /authorize.

async fn authorize(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    shared.authorize_calls.fetch_add(1, Ordering::SeqCst);
    shared.ledger().last_authorize_query = Some(query.clone());
    let param = |name: &str| query.get(name).map(String::as_str).unwrap_or_default();
    if param("client_id") != shared.client_id {
        return bad_request("unknown client_id");
    }
    let Ok(mut redirect) = url::Url::parse(param("redirect_uri")) else {
        return bad_request("redirect_uri missing or not absolute");
    };
    if param("response_type") != "code" {
        return bad_request("response_type must be code");
    }
    if param("code_challenge_method") != "S256" {
        return bad_request("code_challenge_method must be S256");
    }
    let challenge = param("code_challenge");
    if challenge.len() < 43 || URL_SAFE_NO_PAD.decode(challenge).is_err() {
        return bad_request("code_challenge missing or not base64url of 32 bytes");
    }
    {
        let mut pairs = redirect.query_pairs_mut();
        if shared.deny.load(Ordering::SeqCst) {
            pairs.append_pair("error", "access_denied");
        } else {
            let code = random_token("code_");
            shared.ledger().codes.insert(
                code.clone(),
                PendingCode {
                    client_id: shared.client_id.clone(),
                    redirect_uri: param("redirect_uri").to_owned(),
                    challenge: challenge.to_owned(),
                    scope: split_scope(param("scope")),
                },
            );
            pairs.append_pair("code", &code);
        }
        if let Some(state) = query.get("state") {
            pairs.append_pair("state", state);
        }
    }
    (
        StatusCode::FOUND,
        [(header::LOCATION, redirect.to_string())],
    )
        .into_response()
}

// ---------------------------------------------------------------------------
// Client authentication.

/// Why a token or revocation request's client was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// `401 invalid_client`: unknown client or wrong secret.
    InvalidClient,
    /// `400 invalid_request`: more than one authentication method.
    InvalidRequest,
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        match self {
            Self::InvalidClient => oauth_error(StatusCode::UNAUTHORIZED, "invalid_client"),
            Self::InvalidRequest => oauth_error(StatusCode::BAD_REQUEST, "invalid_request"),
        }
    }
}

/// Checks the client of a token or revocation request; returns how it
/// authenticated.
fn authenticate(
    shared: &Shared,
    headers: &HeaderMap,
    form: &HashMap<String, String>,
) -> Result<ClientAuth, Refusal> {
    let basic = match headers.get(header::AUTHORIZATION) {
        None => None,
        Some(value) => {
            let value = value.to_str().map_err(|_| Refusal::InvalidClient)?;
            let encoded = value.strip_prefix("Basic ").ok_or(Refusal::InvalidClient)?;
            let decoded = STANDARD
                .decode(encoded.trim())
                .ok()
                .and_then(|bytes| String::from_utf8(bytes).ok())
                .ok_or(Refusal::InvalidClient)?;
            let (id, secret) = decoded.split_once(':').ok_or(Refusal::InvalidClient)?;
            Some((form_decode(id), form_decode(secret)))
        }
    };
    let form_id = form.get("client_id");
    let form_secret = form.get("client_secret");
    if basic.is_some() && form_secret.is_some() {
        // RFC 6749 §2.3: one authentication method per request.
        return Err(Refusal::InvalidRequest);
    }
    if let (Some((id, _)), Some(form_id)) = (&basic, form_id)
        && id != form_id
    {
        return Err(Refusal::InvalidClient);
    }
    let client_id = basic
        .as_ref()
        .map(|(id, _)| id.as_str())
        .or(form_id.map(String::as_str));
    if client_id != Some(shared.client_id.as_str()) {
        return Err(Refusal::InvalidClient);
    }
    match (&shared.client_secret, &basic, form_secret) {
        (None, None, None) => Ok(ClientAuth::None),
        (Some(expected), Some((_, secret)), None) if secret == expected => Ok(ClientAuth::Basic),
        (Some(expected), None, Some(secret)) if secret == expected => Ok(ClientAuth::Post),
        _ => Err(Refusal::InvalidClient),
    }
}

/// Records a token or revocation request as it arrived.
fn record_received(
    shared: &Shared,
    path: &str,
    headers: &HeaderMap,
    form: &HashMap<String, String>,
) {
    let authorization = headers
        .get(header::AUTHORIZATION)
        .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned());
    let basic = authorization
        .as_deref()
        .and_then(|value| value.strip_prefix("Basic "))
        .and_then(|encoded| STANDARD.decode(encoded.trim()).ok())
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .and_then(|decoded| {
            decoded
                .split_once(':')
                .map(|(id, secret)| (form_decode(id), form_decode(secret)))
        });
    shared.ledger().received.push(Received {
        path: path.to_owned(),
        form: form.clone(),
        basic,
        authorization,
    });
}

/// The form fields of a body (the last value of a repeated field wins).
fn parse_form(body: &Bytes) -> HashMap<String, String> {
    url::form_urlencoded::parse(body)
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

// ---------------------------------------------------------------------------
// POST /token.

async fn token(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    let delay = shared.delay_millis.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let form = parse_form(&body);
    record_received(&shared, "/token", &headers, &form);
    let grant_type = form.get("grant_type").map(String::as_str).unwrap_or("");
    match grant_type {
        "authorization_code" => shared.code_exchanges.fetch_add(1, Ordering::SeqCst),
        "refresh_token" => shared.refreshes.fetch_add(1, Ordering::SeqCst),
        _ => 0,
    };
    if shared.fail_5xx.load(Ordering::SeqCst) {
        return oauth_error(StatusCode::SERVICE_UNAVAILABLE, "temporarily_unavailable");
    }
    let auth = match authenticate(&shared, &headers, &form) {
        Ok(auth) => auth,
        Err(refusal) => return refusal.into_response(),
    };
    shared.ledger().token_auth.push(auth);
    match grant_type {
        "authorization_code" => exchange_code(&shared, &form),
        "refresh_token" => refresh(&shared, &form),
        _ => oauth_error(StatusCode::BAD_REQUEST, "unsupported_grant_type"),
    }
}

/// Mints an access token of `family` for `scope`; returns it and its
/// lifetime in seconds.
fn mint_access(shared: &Shared, ledger: &mut Ledger, family: u64) -> (String, u64) {
    let ttl = shared.access_ttl_seconds.load(Ordering::SeqCst);
    let access = random_token("at_");
    let expires_at_millis = shared
        .clock
        .now_millis()
        .saturating_add(i64::try_from(ttl.saturating_mul(1000)).unwrap_or(i64::MAX));
    ledger.access_tokens.insert(
        access.clone(),
        AccessGrant {
            family,
            expires_at_millis,
        },
    );
    ledger.issued_access.push(access.clone());
    (access, ttl)
}

/// Mints a refresh token of `family` for `scope`.
fn mint_refresh(ledger: &mut Ledger, family: u64, scope: Vec<String>) -> String {
    let refresh = random_token("rt_");
    ledger
        .refresh_tokens
        .insert(refresh.clone(), Grant { family, scope });
    ledger.issued_refresh.push(refresh.clone());
    refresh
}

/// An unsigned (`alg: none`) ID token with `sub` and `email`.
fn id_token(shared: &Shared) -> String {
    let now = shared.clock.now_seconds();
    let header = json!({"alg": "none", "typ": "JWT"});
    let claims = json!({
        "iss": shared.base_url,
        "aud": shared.client_id,
        "sub": shared.subject,
        "email": shared.email,
        "iat": now,
        "exp": now + 3600,
    });
    let part = |value: &Value| URL_SAFE_NO_PAD.encode(value.to_string().as_bytes());
    format!("{}.{}.unsigned", part(&header), part(&claims))
}

/// The `authorization_code` grant.
fn exchange_code(shared: &Shared, form: &HashMap<String, String>) -> Response {
    let field = |name: &str| form.get(name).map(String::as_str).unwrap_or_default();
    let mut ledger = shared.ledger();
    // Single use: the code is gone whatever the outcome.
    let Some(pending) = ledger.codes.remove(field("code")) else {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant");
    };
    if pending.client_id != shared.client_id || pending.redirect_uri != field("redirect_uri") {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant");
    }
    let verifier = field("code_verifier");
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, verifier.as_bytes());
    if verifier.len() < 43 || URL_SAFE_NO_PAD.encode(digest.as_ref()) != pending.challenge {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant");
    }
    ledger.next_family += 1;
    let family = ledger.next_family;
    let (access, ttl) = mint_access(shared, &mut ledger, family);
    let refresh = mint_refresh(&mut ledger, family, pending.scope.clone());
    drop(ledger);
    let mut body = json!({
        "access_token": access,
        "token_type": "Bearer",
        "expires_in": ttl,
        "refresh_token": refresh,
        "scope": pending.scope.join(" "),
    });
    if shared.id_token {
        body["id_token"] = Value::String(id_token(shared));
    }
    (StatusCode::OK, no_store(), axum::Json(body)).into_response()
}

/// The `refresh_token` grant.
fn refresh(shared: &Shared, form: &HashMap<String, String>) -> Response {
    let presented = form.get("refresh_token").cloned().unwrap_or_default();
    let mut ledger = shared.ledger();
    ledger.presented_refresh.push(presented.clone());
    ledger.last_refresh_scope = form.get("scope").cloned();
    if shared.invalid_grant.load(Ordering::SeqCst) {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant");
    }
    let Some(grant) = ledger.refresh_tokens.get(&presented).cloned() else {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant");
    };
    let scope = match form.get("scope") {
        None => grant.scope.clone(),
        Some(asked) => {
            let asked = split_scope(asked);
            let granted: HashSet<&String> = grant.scope.iter().collect();
            if asked.is_empty() || !asked.iter().all(|s| granted.contains(s)) {
                return oauth_error(StatusCode::BAD_REQUEST, "invalid_scope");
            }
            asked
        }
    };
    let (access, ttl) = mint_access(shared, &mut ledger, grant.family);
    let mut body = json!({
        "access_token": access,
        "token_type": "Bearer",
        "expires_in": ttl,
        "scope": scope.join(" "),
    });
    if shared.rotate.load(Ordering::SeqCst) {
        ledger.refresh_tokens.remove(&presented);
        let rotated = mint_refresh(&mut ledger, grant.family, grant.scope);
        body["refresh_token"] = Value::String(rotated);
    }
    drop(ledger);
    (StatusCode::OK, no_store(), axum::Json(body)).into_response()
}

// ---------------------------------------------------------------------------
// POST /revoke and GET /userinfo.

async fn revoke(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    let form = parse_form(&body);
    record_received(&shared, "/revoke", &headers, &form);
    if let Err(refusal) = authenticate(&shared, &headers, &form) {
        return refusal.into_response();
    }
    shared.revocations.fetch_add(1, Ordering::SeqCst);
    let token = form.get("token").cloned().unwrap_or_default();
    let mut ledger = shared.ledger();
    ledger.revoked.push(token.clone());
    if let Some(grant) = ledger.refresh_tokens.remove(&token) {
        ledger
            .refresh_tokens
            .retain(|_, other| other.family != grant.family);
        ledger
            .access_tokens
            .retain(|_, access| access.family != grant.family);
    } else {
        ledger.access_tokens.remove(&token);
    }
    StatusCode::OK.into_response()
}

async fn userinfo(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .unwrap_or_default();
    let live = shared
        .ledger()
        .access_tokens
        .get(bearer)
        .is_some_and(|access| shared.clock.now_millis() < access.expires_at_millis);
    if live {
        (StatusCode::OK, axum::Json(json!({ "sub": shared.subject }))).into_response()
    } else {
        (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer error=\"invalid_token\"")],
        )
            .into_response()
    }
}

#[cfg(test)]
mod tests {
    //! The fake provider itself, driven by hand the way VaultGuard drives it.

    use super::*;

    const REDIRECT: &str = "http://127.0.0.1:9/oauth/callback";
    const VERIFIER: &str = "a-pkce-verifier-of-at-least-43-characters-0123456789";

    fn challenge(verifier: &str) -> String {
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, verifier.as_bytes());
        URL_SAFE_NO_PAD.encode(digest.as_ref())
    }

    fn no_redirects() -> reqwest::Client {
        reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap()
    }

    /// Runs `/authorize`; returns the redirect's query.
    async fn authorize_query(provider: &FakeProvider, scope: &str) -> HashMap<String, String> {
        let mut url = url::Url::parse(&provider.authorize_url()).unwrap();
        url.query_pairs_mut()
            .append_pair("response_type", "code")
            .append_pair("client_id", provider.client_id())
            .append_pair("redirect_uri", REDIRECT)
            .append_pair("scope", scope)
            .append_pair("state", "s-1")
            .append_pair("code_challenge", &challenge(VERIFIER))
            .append_pair("code_challenge_method", "S256");
        let response = no_redirects().get(url.as_str()).send().await.unwrap();
        assert_eq!(response.status(), 302);
        let location = response.headers()[header::LOCATION].to_str().unwrap();
        assert!(location.starts_with(REDIRECT), "{location}");
        url::Url::parse(location)
            .unwrap()
            .query_pairs()
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect()
    }

    /// POSTs `pairs` to `url` with HTTP Basic client authentication.
    async fn post(provider: &FakeProvider, url: &str, pairs: &[(&str, &str)]) -> (u16, Value) {
        let body = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(pairs)
            .finish();
        let credentials = format!(
            "{}:{}",
            provider.client_id(),
            provider.client_secret().unwrap_or_default()
        );
        let response = reqwest::Client::new()
            .post(url)
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(
                header::AUTHORIZATION,
                format!("Basic {}", STANDARD.encode(credentials)),
            )
            .body(body)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    async fn userinfo_status(provider: &FakeProvider, token: &str) -> u16 {
        reqwest::Client::new()
            .get(provider.userinfo_url())
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    #[tokio::test]
    async fn code_refresh_rotation_and_revocation() {
        let provider = FakeProvider::start(ProviderOptions {
            rotate: true,
            ..ProviderOptions::default()
        })
        .await;
        let query = authorize_query(&provider, "a b").await;
        assert_eq!(query["state"], "s-1");
        let code = query["code"].clone();
        let token_url = provider.token_url();

        // A wrong verifier spends the code.
        let wrong = [
            ("grant_type", "authorization_code"),
            ("code", code.as_str()),
            ("redirect_uri", REDIRECT),
            (
                "code_verifier",
                "a-wrong-verifier-of-43-characters-or-more-xxxxx",
            ),
        ];
        assert_eq!(post(&provider, &token_url, &wrong).await.0, 400);
        let code = authorize_query(&provider, "a b").await["code"].clone();
        let exchange = [
            ("grant_type", "authorization_code"),
            ("code", code.as_str()),
            ("redirect_uri", REDIRECT),
            ("code_verifier", VERIFIER),
            ("client_id", provider.client_id()),
        ];
        let (status, body) = post(&provider, &token_url, &exchange).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["scope"], "a b");
        assert!(body["id_token"].as_str().unwrap().split('.').count() == 3);
        let access = body["access_token"].as_str().unwrap().to_owned();
        let first = body["refresh_token"].as_str().unwrap().to_owned();
        assert_eq!(userinfo_status(&provider, &access).await, 200);
        assert_eq!(
            post(&provider, &token_url, &exchange).await.1["error"],
            "invalid_grant",
            "single use"
        );

        let refresh = |token: &str, scope: Option<&'static str>| {
            let mut pairs = vec![("grant_type", "refresh_token"), ("refresh_token", token)];
            if let Some(scope) = scope {
                pairs.push(("scope", scope));
            }
            pairs
                .into_iter()
                .map(|(k, v)| (k, v.to_owned()))
                .collect::<Vec<_>>()
        };
        let send = async |pairs: Vec<(&str, String)>| {
            let borrowed: Vec<(&str, &str)> = pairs.iter().map(|(k, v)| (*k, v.as_str())).collect();
            post(&provider, &token_url, &borrowed).await
        };
        let (status, body) = send(refresh(&first, Some("a"))).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["scope"], "a");
        assert_eq!(provider.last_refresh_scope(), Some(Some("a".to_owned())));
        let second = body["refresh_token"].as_str().unwrap().to_owned();
        assert_ne!(second, first, "rotated");
        assert_eq!(
            send(refresh(&first, None)).await.1["error"],
            "invalid_grant"
        );
        assert_eq!(
            send(refresh(&second, Some("c"))).await.1["error"],
            "invalid_scope"
        );
        provider.set_fail_5xx(true);
        assert_eq!(send(refresh(&second, None)).await.0, 503);
        provider.set_fail_5xx(false);
        assert_eq!(provider.refreshes(), 4);
        assert_eq!(provider.token_client_auth()[0], ClientAuth::Basic);

        let (status, _) = post(
            &provider,
            &provider.revocation_url(),
            &[
                ("token", second.as_str()),
                ("token_type_hint", "refresh_token"),
            ],
        )
        .await;
        assert_eq!(status, 200);
        assert_eq!(provider.revocations(), 1);
        assert_eq!(
            userinfo_status(&provider, &access).await,
            401,
            "grant ended"
        );
        assert_eq!(
            send(refresh(&second, None)).await.1["error"],
            "invalid_grant"
        );
    }

    #[tokio::test]
    async fn wrong_client_and_denial() {
        let provider = FakeProvider::start(ProviderOptions::default()).await;
        let response = reqwest::Client::new()
            .post(provider.token_url())
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body("grant_type=refresh_token&refresh_token=x&client_id=vaultguard-test-client&client_secret=nope")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 401);
        provider.set_deny(true);
        let query = authorize_query(&provider, "a").await;
        assert_eq!(
            query.get("error").map(String::as_str),
            Some("access_denied")
        );
        assert!(!query.contains_key("code"));
    }
}
