//! Assembles and runs one server process: storage, keys, the gRPC server on
//! one listener and the HTTP surface on another, background tasks, and
//! graceful shutdown. Listeners are passed in already bound, so tests run on
//! port 0.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tonic::transport::server::TcpIncoming;
use tower::ServiceBuilder;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use vaultguard_proto::v1::agent_service_server::AgentServiceServer;
use vaultguard_proto::v1::audit_service_server::AuditServiceServer;
use vaultguard_proto::v1::auth_service_server::AuthServiceServer;
use vaultguard_proto::v1::delegation_service_server::DelegationServiceServer;
use vaultguard_proto::v1::issuer_key_service_server::IssuerKeyServiceServer;
use vaultguard_proto::v1::policy_service_server::PolicyServiceServer;
use vaultguard_proto::v1::step_up_service_server::StepUpServiceServer;
use vaultguard_proto::v1::tenant_service_server::TenantServiceServer;
use vaultguard_proto::v1::vault_service_server::VaultServiceServer;

use crate::audit::Sealer;
use crate::clock::Clock;
use crate::config::Config;
use crate::crypto::MasterKey;
use crate::domain::{connections, delegations};
use crate::grpc;
use crate::issuer::IssuerKeys;
use crate::oidc::OidcVerifier;
use crate::state::AppState;
use crate::{health, http, store};

/// The largest decoded header list of one gRPC call (HTTP/2
/// `SETTINGS_MAX_HEADER_LIST_SIZE`; hyper's default, stated here because the
/// cost of a waiting call depends on it).
const MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;

/// Opens storage (migrating it first when `migrate` is set), loads the master
/// key and the issuer keys, and returns the shared state. The CLI uses this
/// too, to mint bootstrap tokens.
pub async fn prepare(
    config: Config,
    clock: Arc<dyn Clock>,
    issuer: String,
    migrate: bool,
) -> anyhow::Result<AppState> {
    let key_file = if config.master_key_file.as_os_str().is_empty() {
        config.data_dir.join("master.key")
    } else {
        config.master_key_file.clone()
    };
    let master = Arc::new(MasterKey::load_or_generate(&config.master_key, &key_file)?);
    let store::Opened { db, failover } = store::open(&config)
        .await
        .map_err(|e| anyhow::anyhow!("cannot open database: {e}"))?;
    if migrate {
        store::migrate(&db)
            .await
            .map_err(|e| anyhow::anyhow!("migration failed: {e}"))?;
    }
    let keys = IssuerKeys::load(
        db.clone(),
        master.clone(),
        clock.clone(),
        issuer,
        config.max_token_ttl_seconds,
    )
    .await
    .map_err(|e| anyhow::anyhow!("cannot load issuer keys: {e}"))?;
    let outbound = Arc::new(crate::outbound::Outbound::from_config(&config)?);
    let oidc = OidcVerifier::new(&config, clock.clone(), &outbound)
        .map_err(|e| anyhow::anyhow!("cannot build OIDC verifier: {e}"))?;
    let oauth = crate::oauth_client::OAuthClient::new(&outbound, config.oauth_timeout_ms)
        .map_err(|e| anyhow::anyhow!("cannot build the OAuth client: {e}"))?;
    let audit_wake = Arc::new(Notify::new());
    let limits = crate::limits::Limits::new(&config)
        .map_err(|e| anyhow::anyhow!("cannot read the contract's descriptors: {e}"))?;
    Ok(AppState {
        limits: Arc::new(limits),
        audited_recently: Arc::new(crate::audit::Debounce::new(
            config.repeat_audit_window_seconds,
        )),
        refusals: Arc::new(crate::audit::RefusalDebounce::new(
            config.refusal_audit_window_seconds,
            config.refusal_audit_events_per_window,
        )),
        recorder: crate::audit::Recorder::start(
            db.clone(),
            clock.clone(),
            audit_wake.clone(),
            config.audit_group_writers,
            config.audit_group_overlap_min,
        ),
        audit_wake,
        oauth: Arc::new(oauth),
        outbound,
        policy_cache: Arc::default(),
        budget_cache: Arc::default(),
        directory: Arc::new(crate::directory::Directory::new(db.get_database_backend())),
        db,
        failover,
        clock,
        master,
        keys: Arc::new(keys),
        oidc: Arc::new(oidc),
        config: Arc::new(config),
        hub: Arc::new(crate::hub::Hub::new()),
        stopping: Arc::new(tokio::sync::watch::channel(false).0),
    })
}

/// Runs the server on the given listeners until `shutdown` resolves, then
/// drains: health turns NOT_SERVING, in-flight calls finish, the sealer
/// seals what is pending.
pub async fn serve(
    config: Config,
    clock: Arc<dyn Clock>,
    grpc_listener: TcpListener,
    http_listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let grpc_addr = grpc_listener.local_addr()?;
    let http_addr = http_listener.local_addr()?;
    let issuer = config.effective_issuer(http_addr);
    let tls = crate::tls::TlsSetup::from_config(&config)?;
    let probe_interval = Duration::from_millis(config.health_probe_interval_ms);
    let state = prepare(config, clock.clone(), issuer, true).await?;
    let _ = http::metrics_handle();

    let stop_tx = state.stopping.clone();
    let stop_rx = stop_tx.subscribe();
    let sealer = Sealer::new(
        state.db.clone(),
        clock,
        state.audit_wake.clone(),
        state.hub.clone(),
    );
    let sealer_task = tokio::spawn(sealer.run(stop_rx.clone()));
    let sweeper_task = tokio::spawn(run_sweeper(state.clone(), stop_rx.clone()));
    let webhook_task = tokio::spawn(crate::domain::webhooks::run_deliverer(
        state.clone(),
        stop_rx.clone(),
    ));
    let refusals_task = tokio::spawn(crate::audit::run_refusal_flusher(
        state.refusals.clone(),
        state.recorder.clone(),
        state.clock.clone(),
        stop_rx.clone(),
    ));
    let limits_task = tokio::spawn(crate::limits::run_janitor(
        state.limits.clone(),
        stop_rx.clone(),
    ));
    let listener_task = tokio::spawn(crate::hub::run_listener(
        state.db.clone(),
        state.hub.clone(),
        state.directory.clone(),
        stop_rx.clone(),
    ));

    let (reporter, health_service) = tonic_health::server::health_reporter();
    // Every service is known (NOT_SERVING) before the listener answers, so
    // no client is told "service not registered" while the first probe runs.
    health::set_all(&reporter, tonic_health::ServingStatus::NotServing).await;
    let healthy = Arc::new(AtomicBool::new(false));
    let probe_task = tokio::spawn(health::run_probe(
        state.failover.clone(),
        reporter,
        healthy.clone(),
        probe_interval,
        stop_rx.clone(),
    ));

    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(vaultguard_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(vaultguard_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    // In order: a caller's request id is kept only if short and plain
    // (else one is made up) and echoed on the response; the request message
    // is read in full within its deadline; only then does the call take a
    // concurrency slot, get authenticated and meet its rate limits.
    let request_body = crate::request_body::RequestBodyLayer::new(&state.config)
        .map_err(|e| anyhow::anyhow!("cannot read the contract's descriptors: {e}"))?;
    let layers = ServiceBuilder::new()
        .map_request(crate::request_id::sanitize::<tonic::body::Body>)
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(request_body)
        .layer(crate::limits::OverloadLayer::new(
            state.config.max_concurrent_requests,
        ))
        .layer(grpc::layer::AuthLayer::new(state.clone()))
        .into_inner();

    // Every service decodes at most this much of one request message.
    let max_request = state.limits.max_request_bytes();
    let api = api_routes(&state, max_request);
    let mut grpc_stop = stop_rx.clone();
    let grpc_server = crate::tls::grpc_server_builder(tls.as_ref())?
        // A connection whose peer stops answering pings is closed within
        // 50 s; an idle healthy one is kept.
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        // What one call's headers may hold once decoded (HPACK lets a few
        // bytes on the wire stand for many): room for an 8 KiB bearer.
        .http2_max_header_list_size(MAX_HEADER_LIST_BYTES)
        .max_concurrent_streams(
            Some(state.config.max_concurrent_streams_per_connection).filter(|max| *max > 0),
        )
        .layer(layers.clone())
        .add_routes(api.clone())
        .add_service(health_service.max_decoding_message_size(max_request))
        .add_service(reflection_v1.max_decoding_message_size(max_request))
        .add_service(reflection_v1alpha.max_decoding_message_size(max_request))
        .serve_with_incoming_shutdown(
            // Nagle off: a unary answer is several small writes (headers,
            // message, trailers), and Nagle holding them for the peer's
            // delayed ACK costs ~40 ms a call.
            TcpIncoming::from(grpc_listener).with_nodelay(Some(true)),
            async move {
                let _ = grpc_stop.changed().await;
            },
        );

    let mut http_stop = stop_rx.clone();
    // The OAuth callback audits its request id too.
    // The console's gRPC-Web calls go through the same layers (request id,
    // whole message before capacity, concurrency, authentication, limits)
    // to the same services.
    let grpc_web = tower::util::BoxCloneSyncService::new(
        ServiceBuilder::new()
            .layer(tonic_web::GrpcWebLayer::new())
            .layer(layers)
            .service(api),
    );
    let http_app = http::router(state.clone(), healthy)
        .merge(crate::console::router(state.clone()))
        .fallback(move |request: axum::extract::Request| grpc_web_call(grpc_web.clone(), request))
        .layer(tower::util::MapRequestLayer::new(
            crate::request_id::sanitize::<axum::body::Body>,
        ));
    let http_shutdown = async move {
        let _ = http_stop.changed().await;
    };
    let http_server: std::pin::Pin<Box<dyn Future<Output = std::io::Result<()>> + Send>> =
        match &tls {
            Some(tls) => Box::pin(
                axum::serve(tls.http_listener(http_listener), http_app)
                    .with_graceful_shutdown(http_shutdown)
                    .into_future(),
            ),
            None => {
                let http_listener = http_listener.tap_io(|stream| {
                    if let Err(err) = stream.set_nodelay(true) {
                        tracing::debug!(error = %err, "TCP_NODELAY not set on an HTTP connection");
                    }
                });
                Box::pin(
                    axum::serve(http_listener, http_app)
                        .with_graceful_shutdown(http_shutdown)
                        .into_future(),
                )
            }
        };

    tracing::info!(%grpc_addr, %http_addr, issuer = %state.keys.issuer(), tls = tls.is_some(), mtls = tls.as_ref().is_some_and(|t| t.mtls()), "vaultguard serving");
    let signal = tokio::spawn(async move {
        shutdown.await;
        tracing::info!("shutting down: draining calls");
        let _ = stop_tx.send(true);
    });

    let (grpc_result, http_result) = tokio::join!(grpc_server, http_server);
    signal.abort();
    let _ = tokio::join!(
        sealer_task,
        probe_task,
        sweeper_task,
        listener_task,
        webhook_task,
        limits_task,
        refusals_task
    );
    grpc_result?;
    http_result?;
    tracing::info!("vaultguard stopped");
    Ok(())
}

/// VaultGuard's own services (not health or reflection), served as gRPC on
/// the gRPC listener and as gRPC-Web on the HTTP one.
fn api_routes(state: &AppState, max_request: usize) -> tonic::service::Routes {
    tonic::service::Routes::new(
        TenantServiceServer::new(grpc::TenantApi(state.clone()))
            .max_decoding_message_size(max_request),
    )
    .add_service(
        AgentServiceServer::new(grpc::AgentApi(state.clone()))
            .max_decoding_message_size(max_request),
    )
    .add_service(
        AuthServiceServer::new(grpc::AuthApi(state.clone())).max_decoding_message_size(max_request),
    )
    .add_service(
        IssuerKeyServiceServer::new(grpc::IssuerKeyApi(state.clone()))
            .max_decoding_message_size(max_request),
    )
    .add_service(
        PolicyServiceServer::new(grpc::PolicyApi(state.clone()))
            .max_decoding_message_size(max_request),
    )
    .add_service(
        DelegationServiceServer::new(grpc::DelegationApi(state.clone()))
            .max_decoding_message_size(max_request),
    )
    .add_service(
        StepUpServiceServer::new(grpc::StepUpApi(state.clone()))
            .max_decoding_message_size(max_request),
    )
    .add_service(
        VaultServiceServer::new(grpc::VaultApi(state.clone()))
            .max_decoding_message_size(max_request),
    )
    .add_service(
        AuditServiceServer::new(grpc::AuditApi(state.clone()))
            .max_decoding_message_size(max_request),
    )
    .prepare()
}

/// The gRPC-Web service behind the HTTP listener's other routes.
type GrpcWeb = tower::util::BoxCloneSyncService<
    ::http::Request<axum::body::Body>,
    ::http::Response<tonic::body::Body>,
    std::convert::Infallible,
>;

/// A request no HTTP route took: a gRPC-Web call (by its content type) goes
/// to the services; anything else is 404.
async fn grpc_web_call(
    service: GrpcWeb,
    request: axum::extract::Request,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    use tower::ServiceExt;
    let grpc_web = request
        .headers()
        .get(::http::header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("application/grpc-web"));
    if !grpc_web {
        return ::http::StatusCode::NOT_FOUND.into_response();
    }
    match service.oneshot(request).await {
        Ok(response) => response.into_response(),
        Err(never) => match never {},
    }
}

/// The sweeper: every `sweep_interval_ms` until `stop` flips, ends expired
/// delegations ([`delegations::sweep_expired`], a batch at a time) and
/// prunes spent OAuth authorization states ([`connections::prune_states`]).
async fn run_sweeper(state: AppState, mut stop: tokio::sync::watch::Receiver<bool>) {
    let period = Duration::from_millis(state.config.sweep_interval_ms.max(100));
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            () = tokio::time::sleep(period) => {}
        }
        loop {
            match delegations::sweep_expired(&state, state.clock.now_millis()).await {
                Ok(n) if n >= delegations::SWEEP_BATCH => continue,
                Ok(_) => break,
                Err(err) => {
                    tracing::warn!(error = %err, "delegation sweep failed");
                    break;
                }
            }
        }
        if let Err(err) = connections::prune_states(&state, state.clock.now_millis()).await {
            tracing::warn!(error = %err, "OAuth state pruning failed");
        }
        if let Err(err) =
            crate::domain::console_sessions::prune(&state, state.clock.now_millis()).await
        {
            tracing::warn!(error = %err, "console session pruning failed");
        }
    }
}
