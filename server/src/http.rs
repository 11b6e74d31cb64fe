//! The HTTP surface on its own listener: `/.well-known/jwks.json`,
//! `/.well-known/openid-configuration`, `/healthz`, `/metrics` and the OAuth
//! callback of connected accounts (`/oauth/callback`).

use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde_json::json;

use crate::state::AppState;

/// The process-wide Prometheus recorder (installed once, shared by every
/// server started in the process).
pub fn metrics_handle() -> Option<&'static PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| match PrometheusBuilder::new().install_recorder() {
            Ok(handle) => Some(handle),
            Err(err) => {
                tracing::warn!(error = %err, "metrics recorder not installed");
                None
            }
        })
        .as_ref()
}

#[derive(Clone)]
struct HttpState {
    app: AppState,
    healthy: Arc<AtomicBool>,
}

/// Builds the router.
pub fn router(app: AppState, healthy: Arc<AtomicBool>) -> Router {
    Router::new()
        .route("/.well-known/jwks.json", get(jwks))
        .route("/.well-known/openid-configuration", get(discovery))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics_text))
        .route("/oauth/callback", get(oauth_callback))
        .with_state(HttpState { app, healthy })
}

async fn jwks(State(state): State<HttpState>) -> Response {
    match state.app.keys.jwks_json().await {
        Ok(body) => (
            [
                (header::CONTENT_TYPE, "application/jwk-set+json"),
                (header::CACHE_CONTROL, "public, max-age=60"),
            ],
            body,
        )
            .into_response(),
        Err(err) => {
            tracing::error!(error = %err, "cannot serve jwks");
            StatusCode::SERVICE_UNAVAILABLE.into_response()
        }
    }
}

async fn discovery(State(state): State<HttpState>) -> Response {
    let issuer = state.app.keys.issuer().to_owned();
    axum::Json(json!({
        "issuer": issuer,
        "jwks_uri": format!("{issuer}/.well-known/jwks.json"),
        "grant_types_supported": ["client_credentials", "urn:openid:params:grant-type:ciba"],
        "token_endpoint_auth_methods_supported": ["client_secret_post"],
        "backchannel_token_delivery_modes_supported": ["poll"],
        "access_token_signing_alg_values_supported": ["RS256", "ES256", "EdDSA"],
        "id_token_signing_alg_values_supported": ["RS256", "ES256", "EdDSA"],
        "subject_types_supported": ["public"],
        "response_types_supported": ["token"],
    }))
    .into_response()
}

async fn healthz(State(state): State<HttpState>) -> Response {
    if state.healthy.load(Ordering::SeqCst) {
        (StatusCode::OK, "ok").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "database unavailable").into_response()
    }
}

async fn metrics_text() -> Response {
    match metrics_handle() {
        Some(handle) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            handle.render(),
        )
            .into_response(),
        None => StatusCode::SERVICE_UNAVAILABLE.into_response(),
    }
}

/// The headers of every callback answer: the URL carried a code and a
/// state, so nothing may cache it or leak it onward; the page runs no
/// script, loads nothing, cannot be framed and is never sniffed as
/// anything but what it says.
const CALLBACK_HEADERS: [(header::HeaderName, &str); 5] = [
    (header::CACHE_CONTROL, "no-store"),
    (header::REFERRER_POLICY, "no-referrer"),
    (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
    (header::X_FRAME_OPTIONS, "DENY"),
    (
        header::CONTENT_SECURITY_POLICY,
        "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; \
         form-action 'none'; frame-ancestors 'none'",
    ),
];

/// `text` escaped for HTML text and quoted attribute values: `&`, `<`,
/// `>`, `"` and `'` become character references, everything else stays.
pub(crate) fn escape_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#x27;"),
            other => out.push(other),
        }
    }
    out
}

/// A small result page; `title` and `text` are escaped here, so callers
/// may pass whatever came in the request.
fn callback_page(status: StatusCode, title: &str, text: &str) -> Response {
    let (title, text) = (escape_html(title), escape_html(text));
    let body = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{title}</title></head>\
         <body style=\"font-family:sans-serif;margin:3em\"><h1>{title}</h1><p>{text}</p></body></html>"
    );
    let mut response = (
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        body,
    )
        .into_response();
    for (name, value) in CALLBACK_HEADERS {
        response
            .headers_mut()
            .insert(name, axum::http::HeaderValue::from_static(value));
    }
    response
}

/// Where the provider sends the browser back: the domain layer checks the
/// state and exchanges the code; this renders the result.
async fn oauth_callback(
    State(state): State<HttpState>,
    headers: axum::http::HeaderMap,
    Query(query): Query<crate::domain::connections::CallbackQuery>,
) -> Response {
    use crate::domain::connections::{CallbackOutcome, callback};
    let request_id = headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128)
        .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_owned);
    match callback(&state.app, &query, &request_id).await {
        Ok(CallbackOutcome::Refused(reason)) => callback_page(
            StatusCode::BAD_REQUEST,
            "Authorization refused",
            &format!(
                "This authorization link cannot be used: {reason}. Start the connection again."
            ),
        ),
        Ok(CallbackOutcome::Finished {
            connection_id,
            return_url,
            error,
        }) => {
            if return_url.is_empty() {
                return if error.is_empty() {
                    callback_page(
                        StatusCode::OK,
                        "Account connected",
                        "The account is connected. You can close this window.",
                    )
                } else {
                    callback_page(
                        StatusCode::OK,
                        "Connection failed",
                        &format!("The provider answered {error}. Start the connection again."),
                    )
                };
            }
            let Ok(mut url) = reqwest::Url::parse(&return_url) else {
                return callback_page(
                    StatusCode::OK,
                    "Connection finished",
                    "You can close this window.",
                );
            };
            {
                let mut pairs = url.query_pairs_mut();
                pairs.append_pair("connection_id", &connection_id);
                if error.is_empty() {
                    pairs.append_pair("status", "connected");
                } else {
                    pairs
                        .append_pair("status", "error")
                        .append_pair("error", &error);
                }
            }
            let mut response =
                (StatusCode::SEE_OTHER, [(header::LOCATION, url.to_string())]).into_response();
            for (name, value) in CALLBACK_HEADERS {
                response
                    .headers_mut()
                    .insert(name, axum::http::HeaderValue::from_static(value));
            }
            response
        }
        Err(err) => {
            let status = tonic::Status::from(err);
            tracing::error!(code = ?status.code(), "OAuth callback failed");
            callback_page(
                StatusCode::INTERNAL_SERVER_ERROR,
                "Something went wrong",
                "VaultGuard could not finish the connection. Try again later.",
            )
        }
    }
}

/// Property tests of the callback page's escaping.
#[cfg(test)]
mod props {
    use proptest::prelude::*;

    use super::escape_html;
    use crate::props::{PURE_CASES, config};

    /// Decodes the five references `escape_html` writes (written
    /// independently of it).
    fn unescape(text: &str) -> String {
        text.replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&quot;", "\"")
            .replace("&#x27;", "'")
            .replace("&amp;", "&")
    }

    #[test]
    fn markup_is_escaped() {
        assert_eq!(
            escape_html("<script>alert(\"x\" & 'y')</script>"),
            "&lt;script&gt;alert(&quot;x&quot; &amp; &#x27;y&#x27;)&lt;/script&gt;"
        );
        assert_eq!(escape_html("&lt;"), "&amp;lt;");
        assert_eq!(escape_html("plain text, é"), "plain text, é");
    }

    proptest! {
        #![proptest_config(config(PURE_CASES))]

        /// Nothing that opens a tag, an attribute value or a reference
        /// survives, and the text reads back unchanged.
        #[test]
        fn escaped_text_has_no_markup_and_round_trips(text in prop_oneof![
            any::<String>(),
            "[<>&\"' a-z;#x0-9/=]{0,40}".prop_map(String::from),
        ]) {
            let escaped = escape_html(&text);
            prop_assert!(!escaped.contains(['<', '>', '"', '\'']));
            for (i, _) in escaped.match_indices('&') {
                let rest = &escaped[i..];
                prop_assert!(
                    ["&amp;", "&lt;", "&gt;", "&quot;", "&#x27;"]
                        .iter()
                        .any(|r| rest.starts_with(r)),
                    "a bare & at {} in {}", i, escaped
                );
            }
            prop_assert_eq!(unescape(&escaped), text);
        }
    }
}
