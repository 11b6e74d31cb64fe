//! The VaultGuard Rust SDK.
//!
//! ```no_run
//! # async fn demo() -> Result<(), vaultguard_client::ClientError> {
//! use vaultguard_client::VaultGuardClient;
//! let client = VaultGuardClient::connect("http://127.0.0.1:50051")
//!     .await?
//!     .with_client_credentials("agt_…", "vgs_…");
//! let me = client.who_am_i().await?;
//! # Ok(()) }
//! ```
//!
//! The client holds one HTTP/2 channel. With client credentials it obtains an
//! access token on first use and refreshes it shortly before it expires; with
//! a static bearer (an admin's token) it sends that. Every service client
//! returned by this type shares the channel; [`VaultGuardClient::request`]
//! wraps a message with the current bearer. [`VaultGuardClient::connect_tls`]
//! connects over TLS trusting a given CA ([`TlsOptions`]) and may present a
//! client certificate (mTLS), which then authenticates an agent without any
//! bearer.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Mutex;
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Request, Status};
use tonic_types::StatusExt;
pub use vaultguard_proto::v1 as pb;
use vaultguard_proto::v1::{
    agent_service_client::AgentServiceClient, audit_service_client::AuditServiceClient,
    auth_service_client::AuthServiceClient, delegation_service_client::DelegationServiceClient,
    issuer_key_service_client::IssuerKeyServiceClient, policy_service_client::PolicyServiceClient,
    step_up_service_client::StepUpServiceClient, tenant_service_client::TenantServiceClient,
    vault_service_client::VaultServiceClient,
};

/// A refused or failed call, with VaultGuard's error details decoded.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The channel could not be set up.
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The server answered with an error status.
    #[error("{code:?}: {message}")]
    Status {
        code: Code,
        message: String,
        /// The `google.rpc.ErrorInfo` reason, when the server sent one.
        reason: Option<pb::ErrorReason>,
        /// The `google.rpc.ErrorInfo` metadata.
        metadata: HashMap<String, String>,
        /// `google.rpc.BadRequest` violations: field name and description.
        field_violations: Vec<(String, String)>,
    },
    /// The client is not configured to authenticate.
    #[error("no credentials configured")]
    NoCredentials,
    /// The delegation is still waiting for a human approval (STEP_UP) at the
    /// caller's deadline. Keep waiting on `auth_req_id` with
    /// [`VaultGuardClient::wait_for_step_up`] or StepUpService.
    #[error("step-up approval required for delegation {delegation_id}")]
    StepUpRequired {
        delegation_id: String,
        auth_req_id: String,
        expires_in: u32,
        interval: u32,
    },
    /// The server's answer lacked a field the contract promises.
    #[error("malformed response: {0}")]
    MalformedResponse(&'static str),
}

impl ClientError {
    /// The gRPC code, for status errors.
    pub fn code(&self) -> Option<Code> {
        match self {
            Self::Status { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// The ErrorInfo reason, for status errors that carry one.
    pub fn reason(&self) -> Option<pb::ErrorReason> {
        match self {
            Self::Status { reason, .. } => *reason,
            _ => None,
        }
    }
}

impl From<Status> for ClientError {
    fn from(status: Status) -> Self {
        let details = status.get_error_details();
        let (reason, metadata) = details
            .error_info()
            .map(|info| {
                (
                    pb::ErrorReason::from_str_name(&info.reason),
                    info.metadata.clone(),
                )
            })
            .unwrap_or_default();
        let field_violations = details
            .bad_request()
            .map(|bad| {
                bad.field_violations
                    .iter()
                    .map(|v| (v.field.clone(), v.description.clone()))
                    .collect()
            })
            .unwrap_or_default();
        Self::Status {
            code: status.code(),
            message: status.message().to_owned(),
            reason,
            metadata,
            field_violations,
        }
    }
}

/// TLS settings for [`VaultGuardClient::connect_tls`]: the CA that signed
/// the server's certificate and, for mTLS, the client's certificate and key.
#[derive(Clone, Default)]
pub struct TlsOptions {
    ca_pem: Vec<u8>,
    identity: Option<(Vec<u8>, Vec<u8>)>,
    domain_name: Option<String>,
}

impl std::fmt::Debug for TlsOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsOptions")
            .field("identity", &self.identity.is_some())
            .field("domain_name", &self.domain_name)
            .finish_non_exhaustive()
    }
}

impl TlsOptions {
    /// Trusts the CA certificate(s) in `ca_pem` (PEM) for the server.
    pub fn new(ca_pem: impl Into<Vec<u8>>) -> Self {
        Self {
            ca_pem: ca_pem.into(),
            ..Self::default()
        }
    }

    /// Presents this client certificate chain and private key (PEM): mTLS.
    pub fn with_identity(self, cert_pem: impl Into<Vec<u8>>, key_pem: impl Into<Vec<u8>>) -> Self {
        Self {
            identity: Some((cert_pem.into(), key_pem.into())),
            ..self
        }
    }

    /// Checks the server's certificate for this name instead of the
    /// endpoint's host.
    pub fn with_domain_name(self, domain_name: impl Into<String>) -> Self {
        Self {
            domain_name: Some(domain_name.into()),
            ..self
        }
    }
}

#[derive(Clone)]
enum Credentials {
    None,
    /// The channel's client certificate authenticates (mTLS); no bearer.
    Certificate,
    Bearer(String),
    Client {
        client_id: String,
        client_secret: String,
    },
}

struct CachedToken {
    token: String,
    refresh_at: Instant,
}

/// A connection to VaultGuard and the credentials to use on it.
#[derive(Clone)]
pub struct VaultGuardClient {
    channel: Channel,
    credentials: Credentials,
    cached: Arc<Mutex<Option<CachedToken>>>,
}

impl std::fmt::Debug for VaultGuardClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VaultGuardClient").finish_non_exhaustive()
    }
}

impl VaultGuardClient {
    /// Connects to `endpoint` (for example `http://127.0.0.1:50051`).
    pub async fn connect(endpoint: impl Into<String>) -> Result<Self, ClientError> {
        let channel = Self::endpoint(endpoint)?.connect().await?;
        Ok(Self::from_channel(channel))
    }

    /// The settings every connection uses, plain or TLS.
    fn endpoint(endpoint: impl Into<String>) -> Result<Endpoint, ClientError> {
        Ok(Endpoint::from_shared(endpoint.into())?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true))
    }

    /// Connects over TLS to `endpoint` (`https://…`), trusting the CA in
    /// `tls`. With a client identity (mTLS), the client authenticates as the
    /// agent its certificate names and sends no bearer, until
    /// [`with_bearer`](Self::with_bearer) or
    /// [`with_client_credentials`](Self::with_client_credentials) sets one
    /// (the server then requires both to name the same agent).
    pub async fn connect_tls(
        endpoint: impl Into<String>,
        tls: TlsOptions,
    ) -> Result<Self, ClientError> {
        let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&tls.ca_pem));
        if let Some(domain) = &tls.domain_name {
            config = config.domain_name(domain.clone());
        }
        let has_identity = tls.identity.is_some();
        if let Some((cert_pem, key_pem)) = &tls.identity {
            config = config.identity(Identity::from_pem(cert_pem, key_pem));
        }
        let channel = Self::endpoint(endpoint)?
            .tls_config(config)?
            .connect()
            .await?;
        let mut client = Self::from_channel(channel);
        if has_identity {
            client.credentials = Credentials::Certificate;
        }
        Ok(client)
    }

    /// Uses an existing channel.
    pub fn from_channel(channel: Channel) -> Self {
        Self {
            channel,
            credentials: Credentials::None,
            cached: Arc::new(Mutex::new(None)),
        }
    }

    /// Authenticates as an agent with client credentials.
    pub fn with_client_credentials(
        self,
        client_id: impl Into<String>,
        client_secret: impl Into<String>,
    ) -> Self {
        Self {
            credentials: Credentials::Client {
                client_id: client_id.into(),
                client_secret: client_secret.into(),
            },
            cached: Arc::new(Mutex::new(None)),
            ..self
        }
    }

    /// Authenticates with a fixed bearer token (an admin's or operator's).
    pub fn with_bearer(self, token: impl Into<String>) -> Self {
        Self {
            credentials: Credentials::Bearer(token.into()),
            cached: Arc::new(Mutex::new(None)),
            ..self
        }
    }

    /// The channel, for callers that build their own stubs.
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// The current bearer token, obtaining or refreshing it when needed
    /// (client credentials: refreshed when 80% of its lifetime has passed).
    pub async fn bearer(&self) -> Result<String, ClientError> {
        match &self.credentials {
            Credentials::None | Credentials::Certificate => Err(ClientError::NoCredentials),
            Credentials::Bearer(token) => Ok(token.clone()),
            Credentials::Client {
                client_id,
                client_secret,
            } => {
                let mut cached = self.cached.lock().await;
                if let Some(current) = cached.as_ref()
                    && Instant::now() < current.refresh_at
                {
                    return Ok(current.token.clone());
                }
                let issued = self.issue_token(client_id, client_secret).await?;
                let lifetime = Duration::from_secs(u64::from(issued.expires_in));
                let token = issued.access_token;
                *cached = Some(CachedToken {
                    token: token.clone(),
                    refresh_at: Instant::now() + lifetime * 4 / 5,
                });
                Ok(token)
            }
        }
    }

    /// Forgets the cached access token, so the next call obtains a new one.
    pub async fn invalidate_token(&self) {
        *self.cached.lock().await = None;
    }

    /// Runs the client-credentials grant.
    pub async fn issue_token(
        &self,
        client_id: &str,
        client_secret: &str,
    ) -> Result<pb::IssueTokenResponse, ClientError> {
        let response = AuthServiceClient::new(self.channel.clone())
            .issue_token(pb::IssueTokenRequest {
                grant_type: "client_credentials".to_owned(),
                client_id: client_id.to_owned(),
                client_secret: client_secret.to_owned(),
            })
            .await?;
        Ok(response.into_inner())
    }

    /// Wraps `message` in a request carrying the bearer token.
    /// (none when the channel's client certificate authenticates).
    pub async fn request<T>(&self, message: T) -> Result<Request<T>, ClientError> {
        if matches!(self.credentials, Credentials::Certificate) {
            return Ok(Request::new(message));
        }
        let token = self.bearer().await?;
        let mut request = Request::new(message);
        let value = MetadataValue::try_from(format!("Bearer {token}"))
            .map_err(|_| ClientError::NoCredentials)?;
        request.metadata_mut().insert("authorization", value);
        Ok(request)
    }

    /// Who the server thinks this client is.
    pub async fn who_am_i(&self) -> Result<pb::WhoAmIResponse, ClientError> {
        let request = self.request(pb::WhoAmIRequest {}).await?;
        Ok(self.auth().who_am_i(request).await?.into_inner())
    }

    pub fn tenants(&self) -> TenantServiceClient<Channel> {
        TenantServiceClient::new(self.channel.clone())
    }

    pub fn agents(&self) -> AgentServiceClient<Channel> {
        AgentServiceClient::new(self.channel.clone())
    }

    pub fn auth(&self) -> AuthServiceClient<Channel> {
        AuthServiceClient::new(self.channel.clone())
    }

    pub fn issuer_keys(&self) -> IssuerKeyServiceClient<Channel> {
        IssuerKeyServiceClient::new(self.channel.clone())
    }

    pub fn policies(&self) -> PolicyServiceClient<Channel> {
        PolicyServiceClient::new(self.channel.clone())
    }

    pub fn delegations(&self) -> DelegationServiceClient<Channel> {
        DelegationServiceClient::new(self.channel.clone())
    }

    pub fn step_ups(&self) -> StepUpServiceClient<Channel> {
        StepUpServiceClient::new(self.channel.clone())
    }

    pub fn vault(&self) -> VaultServiceClient<Channel> {
        VaultServiceClient::new(self.channel.clone())
    }

    pub fn audit(&self) -> AuditServiceClient<Channel> {
        AuditServiceClient::new(self.channel.clone())
    }
}

/// What RequestDelegation decided, when it did not refuse.
#[derive(Debug, Clone)]
pub enum DelegationOutcome {
    /// ALLOW: an ACTIVE delegation and its token.
    Allowed {
        grant: pb::DelegationGrant,
        decision: pb::PolicyDecision,
    },
    /// STEP_UP: a PENDING delegation waiting for human approval.
    StepUp {
        challenge: pb::StepUpChallenge,
        decision: pb::PolicyDecision,
    },
}

impl DelegationOutcome {
    /// The delegation, whatever the outcome.
    pub fn delegation(&self) -> Option<&pb::Delegation> {
        match self {
            Self::Allowed { grant, .. } => grant.delegation.as_ref(),
            Self::StepUp { challenge, .. } => challenge.delegation.as_ref(),
        }
    }

    /// The policy decision with its explanation.
    pub fn decision(&self) -> &pb::PolicyDecision {
        match self {
            Self::Allowed { decision, .. } | Self::StepUp { decision, .. } => decision,
        }
    }
}

impl VaultGuardClient {
    /// Asks for a delegation as the calling agent. An empty
    /// `idempotency_key` is replaced by a fresh random one (so a retry of
    /// this call is NOT idempotent: set your own key to make retries safe).
    /// BLOCK is an error: PERMISSION_DENIED with reason
    /// `ERROR_REASON_POLICY_BLOCKED` or `ERROR_REASON_NO_MATCHING_RULE`.
    pub async fn request_delegation(
        &self,
        mut message: pb::RequestDelegationRequest,
    ) -> Result<DelegationOutcome, ClientError> {
        if message.idempotency_key.is_empty() {
            message.idempotency_key = random_idempotency_key();
        }
        let request = self.request(message).await?;
        let response = self
            .delegations()
            .request_delegation(request)
            .await?
            .into_inner();
        let decision = response.decision.unwrap_or_default();
        match response.outcome {
            Some(pb::request_delegation_response::Outcome::Allowed(grant)) => {
                Ok(DelegationOutcome::Allowed { grant, decision })
            }
            Some(pb::request_delegation_response::Outcome::StepUp(challenge)) => {
                Ok(DelegationOutcome::StepUp {
                    challenge,
                    decision,
                })
            }
            None => Err(ClientError::MalformedResponse(
                "RequestDelegation without outcome",
            )),
        }
    }

    /// Verifies a delegation token addressed to the caller's tenant (online
    /// introspection). An inactive token is `Ok` with `active: false`.
    pub async fn verify(
        &self,
        token: impl Into<String>,
        required_action: impl Into<String>,
    ) -> Result<pb::VerifyDelegationTokenResponse, ClientError> {
        let request = self
            .request(pb::VerifyDelegationTokenRequest {
                token: token.into(),
                required_action: required_action.into(),
            })
            .await?;
        Ok(self
            .delegations()
            .verify_delegation_token(request)
            .await?
            .into_inner())
    }

    /// Reads one delegation the caller's tenant is a party to.
    pub async fn get_delegation(
        &self,
        delegation_id: impl Into<String>,
    ) -> Result<pb::Delegation, ClientError> {
        let request = self
            .request(pb::GetDelegationRequest {
                delegation_id: delegation_id.into(),
            })
            .await?;
        self.delegations()
            .get_delegation(request)
            .await?
            .into_inner()
            .delegation
            .ok_or(ClientError::MalformedResponse(
                "GetDelegation without delegation",
            ))
    }

    /// Revokes an ACTIVE delegation addressed to the caller's tenant (admin).
    pub async fn revoke(
        &self,
        delegation_id: impl Into<String>,
        reason: impl Into<String>,
    ) -> Result<pb::Delegation, ClientError> {
        let request = self
            .request(pb::RevokeDelegationRequest {
                delegation_id: delegation_id.into(),
                reason: reason.into(),
            })
            .await?;
        self.delegations()
            .revoke_delegation(request)
            .await?
            .into_inner()
            .delegation
            .ok_or(ClientError::MalformedResponse(
                "RevokeDelegation without delegation",
            ))
    }

    /// Gives up an ACTIVE delegation the caller (agent or its admin) requested.
    pub async fn relinquish(
        &self,
        delegation_id: impl Into<String>,
        reason: impl Into<String>,
    ) -> Result<pb::Delegation, ClientError> {
        let request = self
            .request(pb::RelinquishDelegationRequest {
                delegation_id: delegation_id.into(),
                reason: reason.into(),
            })
            .await?;
        self.delegations()
            .relinquish_delegation(request)
            .await?
            .into_inner()
            .delegation
            .ok_or(ClientError::MalformedResponse(
                "RelinquishDelegation without delegation",
            ))
    }

    /// Requests a delegation and runs `work` with its token. On STEP_UP it
    /// waits for the human decision (see [`Self::wait_for_step_up`]) until
    /// the step-up itself expires; use [`Self::with_delegation_within`] to
    /// set your own deadline. BLOCK, a denial or an expiry answer the
    /// server's status (PERMISSION_DENIED, FAILED_PRECONDITION with the CIBA
    /// reason) and `work` does not run.
    pub async fn with_delegation<F, Fut, T>(
        &self,
        message: pb::RequestDelegationRequest,
        work: F,
    ) -> Result<T, ClientError>
    where
        F: FnOnce(String) -> Fut,
        Fut: std::future::Future<Output = T>,
    {
        self.with_delegation_within(message, None, work).await
    }

    /// [`Self::with_delegation`] that gives up waiting for a step-up after
    /// `deadline` (`None`: when the step-up expires) with
    /// [`ClientError::StepUpRequired`], which carries the `auth_req_id` to
    /// keep waiting on later. Give the request an explicit idempotency key
    /// to retry it later without creating a second delegation.
    pub async fn with_delegation_within<F, Fut, T>(
        &self,
        message: pb::RequestDelegationRequest,
        deadline: Option<Duration>,
        work: F,
    ) -> Result<T, ClientError>
    where
        F: FnOnce(String) -> Fut,
        Fut: std::future::Future<Output = T>,
    {
        match self.request_delegation(message).await? {
            DelegationOutcome::Allowed { grant, .. } => Ok(work(grant.token).await),
            DelegationOutcome::StepUp { challenge, .. } => {
                let deadline = deadline
                    .unwrap_or_else(|| Duration::from_secs(u64::from(challenge.expires_in)));
                let granted = self.wait_for_step_up(&challenge, deadline).await?;
                Ok(work(granted.access_token).await)
            }
        }
    }

    /// Waits for the decision on a step-up and redeems it: through
    /// `WatchStepUp` while the stream lasts, then by polling `PollStepUp` at
    /// the server's interval (growing it on `slow_down`). Answers the token
    /// on approval; the server's CIBA status on denial or expiry; and
    /// [`ClientError::StepUpRequired`] when `deadline` passes first.
    pub async fn wait_for_step_up(
        &self,
        challenge: &pb::StepUpChallenge,
        deadline: Duration,
    ) -> Result<pb::PollStepUpResponse, ClientError> {
        let end = tokio::time::Instant::now() + deadline;
        let pending = || ClientError::StepUpRequired {
            delegation_id: challenge
                .delegation
                .as_ref()
                .map(|d| d.id.clone())
                .unwrap_or_default(),
            auth_req_id: challenge.auth_req_id.clone(),
            expires_in: challenge.expires_in,
            interval: challenge.interval,
        };
        match tokio::time::timeout_at(end, self.watch_until_decided(&challenge.auth_req_id)).await {
            Err(_) => return Err(pending()),
            Ok(Some(granted)) => return Ok(granted),
            // The stream ended in another state or broke: polling answers
            // with the authoritative outcome.
            Ok(None) => {}
        }
        let mut interval = Duration::from_secs(u64::from(challenge.interval.max(1)));
        loop {
            let request = self
                .request(pb::PollStepUpRequest {
                    auth_req_id: challenge.auth_req_id.clone(),
                })
                .await?;
            match self.step_ups().poll_step_up(request).await {
                Ok(response) => return Ok(response.into_inner()),
                Err(status) => {
                    let err = ClientError::from(status);
                    match err.reason() {
                        Some(pb::ErrorReason::AuthorizationPending) => {}
                        Some(pb::ErrorReason::SlowDown) => {
                            interval = metadata_seconds(&err, "interval")
                                .unwrap_or(interval + Duration::from_secs(5));
                        }
                        _ => return Err(err),
                    }
                }
            }
            if tokio::time::Instant::now() + interval >= end {
                return Err(pending());
            }
            tokio::time::sleep(interval).await;
        }
    }

    /// Follows `WatchStepUp` until it delivers the token (`Some`) or ends or
    /// breaks without one (`None`).
    async fn watch_until_decided(&self, auth_req_id: &str) -> Option<pb::PollStepUpResponse> {
        let request = self
            .request(pb::WatchStepUpRequest {
                auth_req_id: auth_req_id.to_owned(),
                heartbeat_interval_seconds: 0,
            })
            .await
            .ok()?;
        let mut stream = self
            .step_ups()
            .watch_step_up(request)
            .await
            .ok()?
            .into_inner();
        while let Ok(Some(message)) = stream.message().await {
            if let Some(pb::watch_step_up_response::Event::Status(status)) = message.event {
                if !status.access_token.is_empty() {
                    return Some(pb::PollStepUpResponse {
                        access_token: status.access_token,
                        token_type: status.token_type,
                        expires_in: status.expires_in,
                        delegation: status.delegation,
                    });
                }
                if status.state != pb::StepUpState::Pending as i32 {
                    return None;
                }
            }
        }
        None
    }
}

/// The RFC 8693 grant type of ExchangeToken.
pub const GRANT_TYPE_TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
/// The RFC 8693 token type of a delegation token used as subject token.
pub const TOKEN_TYPE_ACCESS_TOKEN: &str = "urn:ietf:params:oauth:token-type:access_token";

/// The vault: provider access tokens and custodied signatures, so agents
/// never hold refresh tokens or private keys.
impl VaultGuardClient {
    /// ExchangeToken on the caller's own access token: a short-lived access
    /// token of a connection of the caller's tenant, narrowed to `scopes`
    /// (empty: all granted). A STEP_UP policy answers FAILED_PRECONDITION
    /// with `ERROR_REASON_STEP_UP_REQUIRED` and the `auth_req_id` in the
    /// metadata; redeem it and call [`Self::exchange_delegated`].
    pub async fn exchange(
        &self,
        connection_id: &str,
        scopes: &[String],
    ) -> Result<pb::ExchangeTokenResponse, ClientError> {
        self.exchange_token(String::new(), String::new(), connection_id, scopes)
            .await
    }

    /// ExchangeToken with a delegation token as the subject token (for a
    /// connection of the token's receiving tenant).
    pub async fn exchange_delegated(
        &self,
        subject_token: &str,
        connection_id: &str,
        scopes: &[String],
    ) -> Result<pb::ExchangeTokenResponse, ClientError> {
        self.exchange_token(
            subject_token.to_owned(),
            TOKEN_TYPE_ACCESS_TOKEN.to_owned(),
            connection_id,
            scopes,
        )
        .await
    }

    async fn exchange_token(
        &self,
        subject_token: String,
        subject_token_type: String,
        connection_id: &str,
        scopes: &[String],
    ) -> Result<pb::ExchangeTokenResponse, ClientError> {
        let request = self
            .request(pb::ExchangeTokenRequest {
                grant_type: GRANT_TYPE_TOKEN_EXCHANGE.to_owned(),
                subject_token,
                subject_token_type,
                connection_id: connection_id.to_owned(),
                scopes: scopes.to_vec(),
            })
            .await?;
        Ok(self.vault().exchange_token(request).await?.into_inner())
    }

    /// Sign as the calling agent: the response is either the signature or
    /// the step-up to wait for. An empty `idempotency_key` is replaced by a
    /// random one (set your own to make retries safe).
    pub async fn sign(
        &self,
        mut message: pb::SignRequest,
    ) -> Result<pb::SignResponse, ClientError> {
        if message.idempotency_key.is_empty() {
            message.idempotency_key = random_idempotency_key();
        }
        let request = self.request(message).await?;
        Ok(self.vault().sign(request).await?.into_inner())
    }

    /// Sign, waiting up to `within` for a human decision when the policy
    /// asks for one (see [`Self::wait_for_step_up`]), then signing the same
    /// request again: the approval covers exactly this payload. A denial or
    /// expiry answers the server's status; the deadline answers
    /// [`ClientError::StepUpRequired`] (retry later with the same
    /// idempotency key to pick the signature up).
    pub async fn sign_and_wait(
        &self,
        mut message: pb::SignRequest,
        within: Duration,
    ) -> Result<pb::SignedPayload, ClientError> {
        if message.idempotency_key.is_empty() {
            message.idempotency_key = random_idempotency_key();
        }
        let step_up = match self.sign(message.clone()).await?.outcome {
            Some(pb::sign_response::Outcome::Signed(signed)) => return Ok(signed),
            Some(pb::sign_response::Outcome::StepUp(step_up)) => step_up,
            None => return Err(ClientError::MalformedResponse("Sign without outcome")),
        };
        let challenge = pb::StepUpChallenge {
            auth_req_id: step_up.auth_req_id.clone(),
            expires_in: step_up.expires_in,
            interval: step_up.interval,
            delegation: Some(pb::Delegation {
                id: step_up.delegation_id.clone(),
                ..Default::default()
            }),
        };
        self.wait_for_step_up(&challenge, within).await?;
        match self.sign(message).await?.outcome {
            Some(pb::sign_response::Outcome::Signed(signed)) => Ok(signed),
            Some(pb::sign_response::Outcome::StepUp(step_up)) => Err(ClientError::StepUpRequired {
                delegation_id: step_up.delegation_id,
                auth_req_id: step_up.auth_req_id,
                expires_in: step_up.expires_in,
                interval: step_up.interval,
            }),
            None => Err(ClientError::MalformedResponse("Sign without outcome")),
        }
    }

    /// The public part of a custodied key (raw, PEM, JWK, Ethereum address).
    pub async fn public_key(&self, key_id: &str) -> Result<pb::SigningKey, ClientError> {
        let request = self
            .request(pb::GetSigningKeyRequest {
                key_id: key_id.to_owned(),
            })
            .await?;
        self.vault()
            .get_signing_key(request)
            .await?
            .into_inner()
            .key
            .ok_or(ClientError::MalformedResponse("GetSigningKey without key"))
    }
}

fn metadata_seconds(err: &ClientError, key: &str) -> Option<Duration> {
    match err {
        ClientError::Status { metadata, .. } => metadata
            .get(key)
            .and_then(|v| v.parse::<u64>().ok())
            .map(Duration::from_secs),
        _ => None,
    }
}

/// A random idempotency key: 128 bits as 32 hex digits.
pub fn random_idempotency_key() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}
