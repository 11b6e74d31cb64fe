//! The HTTP surface on its own listener: `/.well-known/jwks.json`,
//! `/.well-known/openid-configuration`, `/healthz` and `/metrics`.

use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
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
