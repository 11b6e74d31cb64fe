//! The console on the HTTP listener: the web app's files (built into the
//! binary from `server/console/dist/`), the sign-in endpoints of
//! `/console/api/*`, the OIDC redirect and callback, and the security
//! headers of every console answer. The app's data comes from the gRPC
//! services through gRPC-Web on the same listener (`crate::server`), never
//! from here: `/console/api/*` only handles the session.
//!
//! - Sessions: an HttpOnly, `SameSite=Strict` cookie (`Secure` when the
//!   public URL is https) scoped to `/console`, holding a random secret the
//!   database keeps only as a hash (`domain::console_sessions`).
//! - CSRF: every POST needs `X-VaultGuard-CSRF: 1` (a header no cross-site
//!   form can send, and no cross-site script can without a CORS preflight
//!   this server never answers) and, when the browser says where it comes
//!   from, an `Origin` of this server.
//! - Login CSRF: `/console/login` sets a second cookie bound to the sign-in's
//!   `state` (`SameSite=Lax`, so it comes back on the issuer's redirect);
//!   the callback refuses a `state` the browser did not start.
//! - Every answer carries a strict CSP (`script-src 'self'`, no inline
//!   script or style, `frame-ancestors 'none'`), `nosniff`, no referrer.

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;

use crate::auth::role_name;
use crate::domain::console_sessions::{self, ConsoleError, NewSession};
use crate::state::AppState;

/// The session cookie.
pub const SESSION_COOKIE: &str = "vg_console";
/// The cookie binding an OIDC sign-in to the browser that started it.
const LOGIN_COOKIE: &str = "vg_console_login";
/// The header every console POST must carry.
pub const CSRF_HEADER: &str = "x-vaultguard-csrf";

/// The console's Content-Security-Policy.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    img-src 'self' data:; connect-src 'self'; font-src 'self'; frame-ancestors 'none'; \
    base-uri 'none'; form-action 'self'";

const INDEX_HTML: &[u8] = include_bytes!("../console/dist/index.html");
const APP_JS: &[u8] = include_bytes!("../console/dist/app.js");
const APP_CSS: &[u8] = include_bytes!("../console/dist/app.css");
const NOTICES: &[u8] = include_bytes!("../console/dist/THIRD_PARTY_NOTICES.txt");

/// The console's routes, merged into the HTTP router.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/console", get(to_console))
        .route("/console/", get(index))
        .route("/console/assets/{file}", get(asset))
        .route("/console/api/me", get(me))
        .route("/console/api/issuers", get(issuers))
        .route("/console/api/token", post(token))
        .route("/console/api/link", post(link))
        .route("/console/api/logout", post(logout))
        .route("/console/api/{*rest}", get(api_unknown).post(api_unknown))
        .route("/console/login", get(login))
        .route("/console/callback", get(callback))
        .route("/console/{*page}", get(index))
        .layer(axum::middleware::map_response(with_security_headers))
        .with_state(state)
}

/// An answer's type and caching.
fn headers(
    content_type: &'static str,
    cache: &'static str,
) -> [(header::HeaderName, &'static str); 2] {
    [
        (header::CONTENT_TYPE, content_type),
        (header::CACHE_CONTROL, cache),
    ]
}

/// The headers every console answer carries, pages, JSON, redirects and
/// errors alike (set by [`with_security_headers`] on the whole router).
const SECURITY_HEADERS: [(header::HeaderName, &str); 4] = [
    (header::CONTENT_SECURITY_POLICY, CSP),
    (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
    (header::REFERRER_POLICY, "no-referrer"),
    (header::X_FRAME_OPTIONS, "DENY"),
];

/// Adds [`SECURITY_HEADERS`] to an answer of the console's router.
async fn with_security_headers(mut response: Response) -> Response {
    for (name, value) in SECURITY_HEADERS {
        response
            .headers_mut()
            .insert(name, HeaderValue::from_static(value));
    }
    response
}

fn json_answer(status: StatusCode, value: serde_json::Value) -> Response {
    (
        status,
        headers("application/json", "no-store"),
        value.to_string(),
    )
        .into_response()
}

fn problem(status: StatusCode, code: &str, message: &str) -> Response {
    json_answer(status, json!({"error": code, "message": message}))
}

async fn to_console() -> Response {
    (
        StatusCode::PERMANENT_REDIRECT,
        [(header::LOCATION, "/console/")],
    )
        .into_response()
}

async fn index() -> Response {
    (headers("text/html; charset=utf-8", "no-cache"), INDEX_HTML).into_response()
}

async fn asset(axum::extract::Path(file): axum::extract::Path<String>) -> Response {
    let (body, content_type) = match file.as_str() {
        "app.js" => (APP_JS, "text/javascript; charset=utf-8"),
        "app.css" => (APP_CSS, "text/css; charset=utf-8"),
        "THIRD_PARTY_NOTICES.txt" => (NOTICES, "text/plain; charset=utf-8"),
        _ => {
            return (
                StatusCode::NOT_FOUND,
                headers("text/plain; charset=utf-8", "no-store"),
                "not found",
            )
                .into_response();
        }
    };
    (headers(content_type, "no-cache"), body).into_response()
}

async fn api_unknown() -> Response {
    problem(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such console endpoint",
    )
}

/// The value of cookie `name` in the request's `Cookie` headers.
fn cookie<'a>(request_headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    request_headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value.trim_matches('"'))
        .filter(|value| !value.is_empty())
}

/// The request id the request-id layer kept or made (or a new one).
fn request_id(request_headers: &HeaderMap) -> String {
    request_headers
        .get(crate::request_id::HEADER)
        .and_then(|value| value.to_str().ok())
        .filter(|value| !value.is_empty())
        .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_owned)
}

/// Whether this server's public URL is https (cookies then say `Secure`).
fn secure(state: &AppState) -> bool {
    state.keys.issuer().starts_with("https://") || state.config.tls_enabled()
}

fn set_cookie(
    state: &AppState,
    name: &str,
    value: &str,
    path: &str,
    same_site: &str,
    max_age: i64,
) -> Option<HeaderValue> {
    let secure = if secure(state) { "; Secure" } else { "" };
    HeaderValue::from_str(&format!(
        "{name}={value}; Path={path}; HttpOnly; SameSite={same_site}; Max-Age={max_age}{secure}"
    ))
    .ok()
}

/// The origins a console POST may come from: this server's public URL, and
/// the origin the browser addressed (`Host`), which differ behind a proxy.
fn origin_allowed(state: &AppState, request_headers: &HeaderMap) -> bool {
    let Some(origin) = request_headers.get(header::ORIGIN) else {
        // Browsers send Origin on every POST fetch; a client without one
        // is no browser a cross-site page could drive.
        return true;
    };
    let Ok(origin) = origin.to_str() else {
        return false;
    };
    let public = reqwest::Url::parse(state.keys.issuer())
        .ok()
        .map(|url| url.origin().ascii_serialization());
    if public.as_deref() == Some(origin) {
        return true;
    }
    let scheme = if secure(state) { "https" } else { "http" };
    request_headers
        .get(header::HOST)
        .and_then(|host| host.to_str().ok())
        .is_some_and(|host| origin == format!("{scheme}://{host}"))
}

/// The CSRF check of every console POST.
fn csrf_refusal(state: &AppState, request_headers: &HeaderMap) -> Option<Response> {
    let marked = request_headers
        .get(CSRF_HEADER)
        .is_some_and(|value| value.as_bytes() == b"1");
    if !marked {
        return Some(problem(
            StatusCode::FORBIDDEN,
            "csrf",
            "console requests must carry X-VaultGuard-CSRF: 1",
        ));
    }
    if !origin_allowed(state, request_headers) {
        return Some(problem(
            StatusCode::FORBIDDEN,
            "csrf",
            "console requests must come from the console's origin",
        ));
    }
    None
}

fn now(state: &AppState) -> crate::clock::Millis {
    state.clock.now_millis()
}

/// A console error as an HTTP answer; internal errors are logged, not told.
fn refusal(err: &ConsoleError) -> Response {
    match err {
        ConsoleError::SessionEnded => {
            problem(StatusCode::UNAUTHORIZED, "session_ended", &err.to_string())
        }
        ConsoleError::LinkInvalid => {
            problem(StatusCode::UNAUTHORIZED, "link_invalid", &err.to_string())
        }
        ConsoleError::LoginInvalid => {
            problem(StatusCode::BAD_REQUEST, "login_invalid", &err.to_string())
        }
        ConsoleError::IssuerUnknown => {
            problem(StatusCode::NOT_FOUND, "issuer_unknown", &err.to_string())
        }
        ConsoleError::Provider(_) => problem(StatusCode::BAD_GATEWAY, "provider", &err.to_string()),
        ConsoleError::Refused(_) => problem(StatusCode::FORBIDDEN, "refused", &err.to_string()),
        ConsoleError::Invalid { field, .. } => json_answer(
            StatusCode::BAD_REQUEST,
            json!({"error": "invalid_argument", "field": field, "message": err.to_string()}),
        ),
        ConsoleError::Internal(inner) => {
            tracing::error!(error = %inner, "console request failed");
            problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "the console cannot answer right now; try again",
            )
        }
    }
}

async fn me(State(state): State<AppState>, request_headers: HeaderMap) -> Response {
    let Some(secret) = cookie(&request_headers, SESSION_COOKIE) else {
        return refusal(&ConsoleError::SessionEnded);
    };
    match console_sessions::session(&state, secret, now(&state)).await {
        Ok(view) => json_answer(
            StatusCode::OK,
            json!({
                "tenant_id": view.tenant_id,
                "tenant_name": view.tenant_name,
                "subject": view.subject,
                "roles": view.roles.iter().map(|r| role_name(*r)).collect::<Vec<_>>(),
                "expires_at": view.expires_at / 1000,
            }),
        ),
        Err(err) => refusal(&err),
    }
}

async fn issuers(State(state): State<AppState>) -> Response {
    let list: Vec<_> = console_sessions::console_issuers(&state)
        .into_iter()
        .map(|issuer| json!({"index": issuer.index, "display_name": issuer.display_name}))
        .collect();
    json_answer(StatusCode::OK, json!({ "issuers": list }))
}

async fn token(State(state): State<AppState>, request_headers: HeaderMap) -> Response {
    if let Some(refused) = csrf_refusal(&state, &request_headers) {
        return refused;
    }
    let Some(secret) = cookie(&request_headers, SESSION_COOKIE) else {
        return refusal(&ConsoleError::SessionEnded);
    };
    match console_sessions::token(&state, secret, now(&state)).await {
        Ok(issued) => json_answer(
            StatusCode::OK,
            json!({"access_token": issued.access_token, "expires_in": issued.expires_in,
                   "token_type": "Bearer"}),
        ),
        Err(err) => refusal(&err),
    }
}

#[derive(Deserialize)]
struct LinkBody {
    secret: String,
}

/// The answer that starts a session: the cookie and who signed in.
fn signed_in(
    state: &AppState,
    session: &NewSession,
    status: StatusCode,
    location: Option<&str>,
) -> Response {
    let max_age = ((session.expires_at - now(state)) / 1000).max(0);
    let mut response = match location {
        Some(to) => (status, [(header::LOCATION, to.to_owned())]).into_response(),
        None => json_answer(status, json!({"tenant_id": session.tenant_id})),
    };
    if let Some(value) = set_cookie(
        state,
        SESSION_COOKIE,
        &session.secret,
        "/console",
        "Strict",
        max_age,
    ) {
        response.headers_mut().append(header::SET_COOKIE, value);
    }
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

async fn link(
    State(state): State<AppState>,
    request_headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if let Some(refused) = csrf_refusal(&state, &request_headers) {
        return refused;
    }
    let Ok(body) = serde_json::from_slice::<LinkBody>(&body) else {
        return json_answer(
            StatusCode::BAD_REQUEST,
            json!({"error": "invalid_argument", "field": "secret",
                   "message": "the body must be JSON {\"secret\": \"…\"}"}),
        );
    };
    let id = request_id(&request_headers);
    match console_sessions::redeem_link(&state, body.secret.trim(), &id, now(&state)).await {
        Ok(session) => signed_in(&state, &session, StatusCode::OK, None),
        Err(err) => refusal(&err),
    }
}

async fn logout(State(state): State<AppState>, request_headers: HeaderMap) -> Response {
    if let Some(refused) = csrf_refusal(&state, &request_headers) {
        return refused;
    }
    if let Some(secret) = cookie(&request_headers, SESSION_COOKIE) {
        let id = request_id(&request_headers);
        if let Err(err) = console_sessions::sign_out(&state, secret, &id, now(&state)).await {
            return refusal(&err);
        }
    }
    let mut response = json_answer(StatusCode::OK, json!({"signed_out": true}));
    if let Some(value) = set_cookie(&state, SESSION_COOKIE, "", "/console", "Strict", 0) {
        response.headers_mut().append(header::SET_COOKIE, value);
    }
    response
}

/// Where the issuer sends the browser back to.
fn callback_uri(state: &AppState) -> String {
    format!("{}/console/callback", state.keys.issuer())
}

#[derive(Deserialize)]
struct LoginQuery {
    issuer: Option<String>,
}

async fn login(State(state): State<AppState>, Query(query): Query<LoginQuery>) -> Response {
    let index = match query.issuer.as_deref().unwrap_or("0").parse::<usize>() {
        Ok(index) => index,
        Err(_) => {
            return failure_page(
                StatusCode::BAD_REQUEST,
                "The sign-in link names no identity provider.",
            );
        }
    };
    match console_sessions::start_login(&state, index, &callback_uri(&state), now(&state)).await {
        Ok(started) => {
            let mut response = (
                StatusCode::SEE_OTHER,
                [(header::LOCATION, started.authorize_url)],
            )
                .into_response();
            let max_age = console_sessions::LOGIN_TTL_MILLIS / 1000;
            if let Some(value) = set_cookie(
                &state,
                LOGIN_COOKIE,
                &started.browser_binding,
                "/console/callback",
                "Lax",
                max_age,
            ) {
                response.headers_mut().append(header::SET_COOKIE, value);
            }
            response
        }
        Err(err) => failure_for(&err),
    }
}

#[derive(Deserialize)]
struct CallbackQuery {
    code: Option<String>,
    state: Option<String>,
    error: Option<String>,
}

async fn callback(
    State(state): State<AppState>,
    request_headers: HeaderMap,
    Query(query): Query<CallbackQuery>,
) -> Response {
    if let Some(error) = query.error.as_deref() {
        let said = match error {
            "access_denied" => "The sign-in was cancelled or refused at the identity provider.",
            "login_required" | "interaction_required" => {
                "The identity provider needs you to sign in again."
            }
            _ => "The identity provider could not sign you in.",
        };
        return failure_page(StatusCode::BAD_REQUEST, said);
    }
    let (Some(code), Some(state_value)) = (query.code.as_deref(), query.state.as_deref()) else {
        return failure_page(
            StatusCode::BAD_REQUEST,
            "The identity provider's answer has no code or state.",
        );
    };
    let binding = cookie(&request_headers, LOGIN_COOKIE).unwrap_or_default();
    let id = request_id(&request_headers);
    let result = console_sessions::finish_login(
        &state,
        state_value,
        binding,
        code,
        &callback_uri(&state),
        &id,
        now(&state),
    )
    .await;
    let mut response = match result {
        Ok(session) => signed_in(&state, &session, StatusCode::SEE_OTHER, Some("/console/")),
        Err(err) => failure_for(&err),
    };
    if let Some(value) = set_cookie(&state, LOGIN_COOKIE, "", "/console/callback", "Lax", 0) {
        response.headers_mut().append(header::SET_COOKIE, value);
    }
    response
}

fn failure_for(err: &ConsoleError) -> Response {
    match err {
        ConsoleError::Internal(inner) => {
            tracing::error!(error = %inner, "console sign-in failed");
            failure_page(
                StatusCode::SERVICE_UNAVAILABLE,
                "VaultGuard cannot finish the sign-in right now; try again.",
            )
        }
        ConsoleError::IssuerUnknown => failure_page(
            StatusCode::NOT_FOUND,
            "No such identity provider is configured.",
        ),
        ConsoleError::LoginInvalid => failure_page(
            StatusCode::BAD_REQUEST,
            "This sign-in is unknown, was already used, or has expired. Start again from the console.",
        ),
        ConsoleError::Provider(_) => failure_page(StatusCode::BAD_GATEWAY, &err.to_string()),
        _ => failure_page(StatusCode::FORBIDDEN, &err.to_string()),
    }
}

/// A small page that says why a sign-in failed, the reason as escaped
/// text, with a way back.
fn failure_page(status: StatusCode, message: &str) -> Response {
    let page = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>Sign-in failed · VaultGuard</title>\
         <link rel=\"stylesheet\" href=\"/console/assets/app.css\"></head>\
         <body><main class=\"signin\" id=\"main\"><h1>Sign-in failed</h1>\
         <p class=\"banner banner-bad\" role=\"alert\" data-testid=\"signin-failure\">{}</p>\
         <p><a href=\"/console/\">Back to the console</a></p></main></body></html>",
        crate::http::escape_html(message)
    );
    (
        status,
        headers("text/html; charset=utf-8", "no-store"),
        page,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_are_found_by_exact_name() {
        let mut request_headers = HeaderMap::new();
        request_headers.insert(
            header::COOKIE,
            HeaderValue::from_static("vg_console_login=a; vg_console=b; other=c"),
        );
        assert_eq!(cookie(&request_headers, SESSION_COOKIE), Some("b"));
        assert_eq!(cookie(&request_headers, LOGIN_COOKIE), Some("a"));
        assert_eq!(cookie(&request_headers, "missing"), None);
    }

    #[tokio::test]
    async fn failure_pages_escape_what_they_say() {
        let page = with_security_headers(failure_page(
            StatusCode::BAD_REQUEST,
            "<img src=x onerror=alert(1)> & \"'",
        ))
        .await;
        assert_eq!(page.status(), StatusCode::BAD_REQUEST);
        assert_eq!(page.headers()[header::CONTENT_SECURITY_POLICY], CSP);
        let body = axum::body::to_bytes(page.into_body(), 64 * 1024)
            .await
            .expect("body");
        let body = String::from_utf8(body.to_vec()).expect("utf-8");
        assert!(
            body.contains("&lt;img src=x onerror=alert(1)&gt; &amp; &quot;&#x27;"),
            "{body}"
        );
        assert!(!body.contains("<img"), "{body}");
    }
}
