//! Standing on open streams (issue 23, item 2): a server stream is only as
//! good as its caller's standing at each step. Every server-streaming RPC
//! of the contract (read from the descriptor set, so a new one cannot be
//! forgotten) ends, while idle too, within the re-check period once the
//! caller's credential expires, its agent is disabled, its tenant is
//! suspended or its OIDC organisation is unbound — with the status a new
//! call with the same credential gets — and an approved step-up's token is
//! never redeemed for, let alone sent to, an agent out of standing.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use prost::Message as _;
use tonic::Code;
use vaultguard_client::{ClientError, VaultGuardClient, pb};
use vaultguard_server::audit::{AuditCtx, Outcome};
use vaultguard_server::config::Config;
use vaultguard_tests::{
    PendingStepUp, TestOptions, TestServer, approve_step_up, get_step_up, next_status,
    request_step_up, watch_step_up,
};

use crate::delegations::{ask, set_suspended};
use crate::oidc::{LocalIssuer, bind, unbind};
use crate::policies::{add_rule, inbound};

use pb::StepUpState as State;
use vaultguard_tests::Rpc;

/// The re-check period of the servers in these tests, in ms.
const CHECK_MS: u64 = 300;
/// How late past the re-check period an end may come on a busy machine.
const SLACK: Duration = Duration::from_millis(1_500);
/// The heartbeat interval of every stream here: longer than any test, so
/// nothing but the standing check can end an idle stream.
const QUIET: u32 = 60;
/// The lifetime of the access tokens the streams are opened with.
const TOKEN_TTL: u32 = 900;

/// Short re-checks; step-ups outlive the tokens (the clock moves past
/// them).
fn short_checks(config: &mut Config) {
    config.stream_standing_interval_ms = CHECK_MS;
    config.step_up_expires_in_seconds = 3 * TOKEN_TTL;
}

/// The default re-check period (5 s), so that only a check made at the
/// moment of redemption can keep a token from a caller out of standing.
fn long_checks(config: &mut Config) {
    config.step_up_expires_in_seconds = 3 * TOKEN_TTL;
}

/// Two tenants: acme's agent asks globex for `pay.*`, which globex steps up.
struct World {
    server: TestServer,
    acme: pb::Tenant,
    globex: pb::Tenant,
    bot: pb::Agent,
    /// The agent, with a fixed access token of [`TOKEN_TTL`] seconds.
    agent: VaultGuardClient,
    acme_admin: VaultGuardClient,
    globex_admin: VaultGuardClient,
    /// Globex's approver and auditor, with tokens of [`TOKEN_TTL`] seconds.
    approver: VaultGuardClient,
    auditor: VaultGuardClient,
}

/// An access token as `vaultguard token` or IssueToken mints it.
async fn token(
    server: &TestServer,
    subject: &str,
    tenant: &str,
    roles: &[pb::Role],
    client_id: Option<&str>,
) -> String {
    vaultguard_server::domain::tokens::mint(
        &server.state,
        subject,
        Some(tenant),
        roles,
        client_id,
        TOKEN_TTL,
    )
    .await
    .expect("mint token")
    .access_token
}

async fn world(adjust: fn(&mut Config)) -> World {
    let server = TestServer::start_adjusted(adjust).await;
    let acme = server.create_tenant("acme").await;
    let globex = server.create_tenant("globex").await;
    let (bot, _, _) = server.create_agent(&acme.id, "bot").await;
    let agent_token = token(
        &server,
        &bot.id,
        &acme.id,
        &[pb::Role::Agent],
        Some(&bot.id),
    )
    .await;
    let agent = server.with_bearer(&agent_token).await;
    let acme_admin = server.admin(&acme.id, "alice").await;
    let globex_admin = server.admin(&globex.id, "gina").await;
    add_rule(&globex_admin, inbound("pay.*", pb::Effect::StepUp)).await;
    let approver_token = token(&server, "ann", &globex.id, &[pb::Role::Approver], None).await;
    let approver = server.with_bearer(&approver_token).await;
    let auditor_token = token(&server, "aud", &globex.id, &[pb::Role::Auditor], None).await;
    let auditor = server.with_bearer(&auditor_token).await;
    World {
        server,
        acme,
        globex,
        bot,
        agent,
        acme_admin,
        globex_admin,
        approver,
        auditor,
    }
}

impl World {
    /// The agent asks globex for a payment, decided STEP_UP.
    async fn step_up(&self) -> PendingStepUp {
        request_step_up(
            &self.agent,
            &self.globex_admin,
            ask(&self.globex.id, "pay.invoice"),
        )
        .await
    }
}

// ---------------------------------------------------------------------------
// The streams.

/// Any open server stream of the contract, as its caller reads it.
enum Open {
    Watch(tonic::Streaming<pb::WatchStepUpResponse>),
    Queue(tonic::Streaming<pb::WatchPendingStepUpsResponse>),
    Tail(tonic::Streaming<pb::TailAuditEventsResponse>),
    Export(tonic::Streaming<pb::ExportAuditEventsResponse>),
}

/// What a stream sent before it ended.
#[derive(Debug, Default)]
struct Sent {
    messages: usize,
    /// Tokens handed out in WatchStepUp's APPROVED events.
    tokens: Vec<String>,
    /// Whether an export reached its summary.
    summary: bool,
}

impl Open {
    async fn watch(agent: &VaultGuardClient, step: &PendingStepUp) -> Self {
        let mut watch = watch_step_up(agent, &step.auth_req_id, QUIET)
            .await
            .expect("open WatchStepUp");
        assert_eq!(next_status(&mut watch).await.state(), State::Pending);
        Self::Watch(watch)
    }

    async fn queue(approver: &VaultGuardClient) -> Result<Self, ClientError> {
        let request = approver
            .request(pb::WatchPendingStepUpsRequest {
                cursor: String::new(),
                heartbeat_interval_seconds: QUIET,
            })
            .await?;
        Ok(Self::Queue(
            approver
                .step_ups()
                .watch_pending_step_ups(request)
                .await?
                .into_inner(),
        ))
    }

    async fn tail(reader: &VaultGuardClient) -> Result<Self, ClientError> {
        let request = reader
            .request(pb::TailAuditEventsRequest {
                heartbeat_interval_seconds: QUIET,
                ..Default::default()
            })
            .await?;
        Ok(Self::Tail(
            reader
                .audit()
                .tail_audit_events(request)
                .await?
                .into_inner(),
        ))
    }

    async fn export(reader: &VaultGuardClient) -> Result<Self, ClientError> {
        let request = reader
            .request(pb::ExportAuditEventsRequest {
                format: pb::ExportFormat::Ndjson as i32,
                ..Default::default()
            })
            .await?;
        Ok(Self::Export(
            reader
                .audit()
                .export_audit_events(request)
                .await?
                .into_inner(),
        ))
    }

    /// The next message (`Ok(None)`: the stream ended with OK).
    async fn next(&mut self, sent: &mut Sent) -> Result<Option<()>, tonic::Status> {
        use pb::export_audit_events_response::Part;
        use pb::watch_step_up_response::Event;
        let got = match self {
            Self::Watch(stream) => stream.message().await?.map(|message| {
                if let Some(Event::Status(status)) = message.event
                    && !status.access_token.is_empty()
                {
                    sent.tokens.push(status.access_token);
                }
            }),
            Self::Queue(stream) => stream.message().await?.map(drop),
            Self::Tail(stream) => stream.message().await?.map(drop),
            Self::Export(stream) => stream.message().await?.map(|message| {
                if let Some(Part::Summary(_)) = message.part {
                    sent.summary = true;
                }
            }),
        };
        if got.is_some() {
            sent.messages += 1;
        }
        Ok(got)
    }

    /// Reads whatever comes for `period` and asserts the stream is still
    /// open (it may send, and must not end).
    async fn stays_open(&mut self, period: Duration, what: &str) {
        let mut sent = Sent::default();
        let deadline = tokio::time::Instant::now() + period;
        loop {
            match tokio::time::timeout_at(deadline, self.next(&mut sent)).await {
                Err(_) => return,
                Ok(Ok(Some(()))) => {}
                Ok(Ok(None)) => panic!("{what}: the stream ended"),
                Ok(Err(status)) => panic!("{what}: the stream failed: {status:?}"),
            }
        }
    }

    /// Reads until the stream fails, at most `within`; the failure and what
    /// came before it. Panics if it ends with OK or goes on.
    async fn ends(&mut self, within: Duration, what: &str) -> (ClientError, Sent) {
        let mut sent = Sent::default();
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.next(&mut sent)).await {
                Err(_) => panic!("{what}: still open after {within:?} (sent {sent:?})"),
                Ok(Ok(Some(()))) => {}
                Ok(Ok(None)) => panic!("{what}: ended with OK (sent {sent:?})"),
                Ok(Err(status)) => return (ClientError::from(status), sent),
            }
        }
    }
}

/// Asserts that `stream` ends with `code` and `reason` within the re-check
/// period (plus [`SLACK`]) counted from `since`, handing out no token.
async fn ends_with(
    stream: &mut Open,
    since: Instant,
    code: Code,
    reason: pb::ErrorReason,
    what: &str,
) -> Sent {
    let within = Duration::from_millis(CHECK_MS) + SLACK;
    let (err, sent) = stream.ends(within, what).await;
    assert_eq!(
        (err.code(), err.reason()),
        (Some(code), Some(reason)),
        "{what}: ended with {err:?}"
    );
    assert!(
        since.elapsed() <= within,
        "{what}: ended {:?} after the change, past the re-check period",
        since.elapsed()
    );
    assert!(sent.tokens.is_empty(), "{what}: a token was handed out");
    sent
}

/// The code and reason a new call with `client`'s credential gets.
async fn new_call(client: &VaultGuardClient) -> (Option<Code>, Option<pb::ErrorReason>) {
    let err = client
        .who_am_i()
        .await
        .expect_err("a new call with the same credential is refused");
    (err.code(), err.reason())
}

async fn set_agent_enabled(admin: &VaultGuardClient, agent_id: &str, enabled: bool) {
    if enabled {
        admin
            .enable_agent(pb::EnableAgentRequest {
                agent_id: agent_id.to_owned(),
            })
            .await
            .unwrap();
    } else {
        admin
            .disable_agent(pb::DisableAgentRequest {
                agent_id: agent_id.to_owned(),
            })
            .await
            .unwrap();
    }
}

async fn poll(agent: &VaultGuardClient, auth_req_id: &str) -> Result<String, ClientError> {
    Ok(agent
        .poll_step_up(pb::PollStepUpRequest {
            auth_req_id: auth_req_id.to_owned(),
        })
        .await?
        .access_token)
}

// ---------------------------------------------------------------------------
// The exploit: a disabled agent's watch and an approval.

#[tokio::test]
async fn a_disabled_agents_watch_is_not_handed_the_approved_token() {
    // The re-check period is the default 5 s: the approval comes long
    // before it, so only the check at redemption stands in the way.
    let w = world(long_checks).await;
    let step = w.step_up().await;
    let mut watch = Open::watch(&w.agent, &step).await;

    set_agent_enabled(&w.acme_admin, &w.bot.id, false).await;
    let approver = w.server.approver(&w.globex.id, "ann").await;
    let approved = approve_step_up(&approver, &step.step_up_id, &step.request_hash)
        .await
        .expect("the approvers approve");
    assert_eq!(approved.step_up.unwrap().state(), State::Approved);

    let (err, sent) = watch
        .ends(Duration::from_secs(10), "the disabled agent's watch")
        .await;
    assert!(
        sent.tokens.is_empty(),
        "the watch handed a disabled agent the approved token"
    );
    assert_eq!(
        (err.code(), err.reason()),
        (
            Some(Code::PermissionDenied),
            Some(pb::ErrorReason::AgentDisabled)
        ),
        "{err:?}"
    );
    assert_eq!(
        (err.code(), err.reason()),
        new_call(&w.agent).await,
        "the watch ends as a new call is answered"
    );
    // Nothing was redeemed: the step-up still waits, approved, for its
    // agent, and no redemption event exists in either log.
    let now = get_step_up(&approver, &step.step_up_id).await.unwrap();
    assert_eq!(now.state(), State::Approved, "the step-up was redeemed");
    for tenant in [&w.acme.id, &w.globex.id] {
        assert!(
            w.server
                .audit_events(tenant, "step_up.redeemed")
                .await
                .is_empty(),
            "a redemption was recorded"
        );
    }
    // The poll is refused the same way while the agent is disabled.
    let err = poll(&w.agent, &step.auth_req_id).await.unwrap_err();
    assert_eq!(err.reason(), Some(pb::ErrorReason::AgentDisabled));

    // Enabled again, the agent takes the token it was approved for, once.
    set_agent_enabled(&w.acme_admin, &w.bot.id, true).await;
    let taken = poll(&w.agent, &step.auth_req_id).await.expect("the token");
    assert!(!taken.is_empty());
    let again = poll(&w.agent, &step.auth_req_id).await.unwrap_err();
    assert_eq!(again.reason(), Some(pb::ErrorReason::InvalidGrant));
    w.server.stop().await;
}

// ---------------------------------------------------------------------------
// Idle streams end when standing is lost.

#[tokio::test]
async fn an_idle_watch_ends_when_its_agent_is_disabled() {
    let w = world(short_checks).await;
    let step = w.step_up().await;
    let mut watch = Open::watch(&w.agent, &step).await;
    watch
        .stays_open(Duration::from_millis(3 * CHECK_MS), "watch")
        .await;

    set_agent_enabled(&w.acme_admin, &w.bot.id, false).await;
    let since = Instant::now();
    ends_with(
        &mut watch,
        since,
        Code::PermissionDenied,
        pb::ErrorReason::AgentDisabled,
        "the watch of a disabled agent",
    )
    .await;
    assert_eq!(
        new_call(&w.agent).await,
        (
            Some(Code::PermissionDenied),
            Some(pb::ErrorReason::AgentDisabled)
        )
    );
    w.server.stop().await;
}

#[tokio::test]
async fn idle_streams_end_when_their_token_expires() {
    let w = world(short_checks).await;
    let step = w.step_up().await;
    let mut streams = vec![
        ("WatchStepUp", Open::watch(&w.agent, &step).await),
        (
            "WatchPendingStepUps",
            Open::queue(&w.approver).await.unwrap(),
        ),
        ("TailAuditEvents", Open::tail(&w.auditor).await.unwrap()),
    ];
    for (what, stream) in &mut streams {
        stream
            .stays_open(Duration::from_millis(3 * CHECK_MS), what)
            .await;
    }

    // Past the tokens' lifetime (and before the step-up's).
    w.server.clock.advance(i64::from(TOKEN_TTL) * 1_000 + 1_000);
    let since = Instant::now();
    for (what, stream) in &mut streams {
        ends_with(
            stream,
            since,
            Code::Unauthenticated,
            pb::ErrorReason::Unauthenticated,
            what,
        )
        .await;
    }
    for client in [&w.agent, &w.approver, &w.auditor] {
        assert_eq!(
            new_call(client).await,
            (
                Some(Code::Unauthenticated),
                Some(pb::ErrorReason::Unauthenticated)
            ),
            "a new call is answered as the stream ended"
        );
    }
    // The step-up itself is still pending: only the credential lapsed.
    let admin = &w.globex_admin;
    assert_eq!(
        get_step_up(admin, &step.step_up_id).await.unwrap().state(),
        State::Pending
    );
    w.server.stop().await;
}

#[tokio::test]
async fn idle_streams_end_when_their_tenant_is_suspended() {
    let w = world(short_checks).await;
    let step = w.step_up().await;
    let mut watch = Open::watch(&w.agent, &step).await;
    let mut queue = Open::queue(&w.approver).await.unwrap();
    let mut tail = Open::tail(&w.auditor).await.unwrap();
    let operator = w.server.operator().await;

    // Globex suspended: its approver's queue and its auditor's tail end;
    // acme's agent's watch of the step-up globex holds goes on.
    set_suspended(&operator, &w.globex.id, true).await;
    let since = Instant::now();
    for (what, stream) in [("queue", &mut queue), ("tail", &mut tail)] {
        ends_with(
            stream,
            since,
            Code::PermissionDenied,
            pb::ErrorReason::TenantSuspended,
            what,
        )
        .await;
    }
    for client in [&w.approver, &w.auditor] {
        assert_eq!(
            new_call(client).await,
            (
                Some(Code::PermissionDenied),
                Some(pb::ErrorReason::TenantSuspended)
            )
        );
    }
    watch
        .stays_open(Duration::from_millis(3 * CHECK_MS), "acme's watch")
        .await;

    // Acme suspended: its agent's watch ends too.
    set_suspended(&operator, &w.acme.id, true).await;
    let since = Instant::now();
    ends_with(
        &mut watch,
        since,
        Code::PermissionDenied,
        pb::ErrorReason::TenantSuspended,
        "acme's watch",
    )
    .await;
    assert_eq!(
        new_call(&w.agent).await,
        (
            Some(Code::PermissionDenied),
            Some(pb::ErrorReason::TenantSuspended)
        )
    );

    // Reactivated, the same credentials stream again.
    set_suspended(&operator, &w.globex.id, false).await;
    let mut tail = Open::tail(&w.auditor).await.unwrap();
    tail.stays_open(Duration::from_millis(3 * CHECK_MS), "tail again")
        .await;
    w.server.stop().await;
}

#[tokio::test]
async fn an_export_stops_at_the_next_chunk_once_its_tenant_is_suspended() {
    let w = world(long_checks).await;
    // A log of about 1.2 MB, 19 chunks of 64 KiB.
    let audit = AuditCtx::system("bulk");
    let padding = "x".repeat(4_000);
    let txn = vaultguard_server::store::begin(&w.server.state.db)
        .await
        .unwrap();
    let events = (0..300)
        .map(|n| {
            audit.event(
                &w.globex.id,
                "test.bulk",
                vec![format!("bulk-{n}")],
                Outcome::Success,
                serde_json::json!({ "padding": padding }),
            )
        })
        .collect();
    vaultguard_server::audit::append_all(&txn, w.server.clock.as_ref(), events)
        .await
        .unwrap();
    txn.commit().await.unwrap();
    w.server.wait_sealed().await;

    // Exported whole while globex stands.
    let mut export = Open::export(&w.auditor).await.unwrap();
    let mut whole = Sent::default();
    while export.next(&mut whole).await.unwrap().is_some() {}
    assert!(whole.summary && whole.messages > 12, "{whole:?}");

    // Suspended after the first chunk: a few chunks already on their way
    // may still arrive, then the export fails and never completes. The
    // client's HTTP/2 window is one chunk, so the server cannot have sent
    // the whole file ahead of the reader (a default window is 2 MiB).
    let channel = tonic::transport::Endpoint::from_shared(w.server.grpc_url())
        .unwrap()
        .initial_stream_window_size(64 * 1024)
        .initial_connection_window_size(64 * 1024)
        .connect()
        .await
        .unwrap();
    let auditor_token = token(&w.server, "aud", &w.globex.id, &[pb::Role::Auditor], None).await;
    let narrow = VaultGuardClient::from_channel(channel).with_bearer(auditor_token);
    let mut export = Open::export(&narrow).await.unwrap();
    let mut first = Sent::default();
    export
        .next(&mut first)
        .await
        .unwrap()
        .expect("a first chunk");
    set_suspended(&w.server.operator().await, &w.globex.id, true).await;
    let (err, rest) = export
        .ends(Duration::from_secs(10), "the suspended tenant's export")
        .await;
    assert_eq!(
        (err.code(), err.reason()),
        (
            Some(Code::PermissionDenied),
            Some(pb::ErrorReason::TenantSuspended)
        ),
        "{err:?}"
    );
    assert!(!rest.summary, "the export completed");
    assert!(
        rest.messages <= 4,
        "{} chunks were sent after the suspension",
        rest.messages
    );
    w.server.stop().await;
}

// ---------------------------------------------------------------------------
// OIDC humans: expiry and unbinding of their organisation.

fn oidc_checks(config: &mut Config) {
    config.stream_standing_interval_ms = CHECK_MS;
}

#[tokio::test]
async fn an_oidc_humans_streams_end_when_its_organisation_is_unbound_or_its_token_expires() {
    let issuer = LocalIssuer::start("key-1").await;
    let server = TestServer::start_with(TestOptions {
        trusted_issuers: vec![issuer.trusted()],
        adjust_config: Some(oidc_checks),
        ..TestOptions::default()
    })
    .await;
    let globex = server.create_tenant("globex").await;
    bind(&server, &globex.id, &issuer.url, "org_globex").await;
    let token = issuer.token(&issuer.claims("org_globex", &["admin"]));
    let human = server.with_bearer(&token).await;
    human.who_am_i().await.expect("the OIDC admin is let in");

    let mut queue = Open::queue(&human).await.unwrap();
    let mut tail = Open::tail(&human).await.unwrap();
    queue
        .stays_open(Duration::from_millis(3 * CHECK_MS), "queue")
        .await;
    unbind(&server, &globex.id, &issuer.url, "org_globex").await;
    let since = Instant::now();
    for (what, stream) in [("queue", &mut queue), ("tail", &mut tail)] {
        ends_with(
            stream,
            since,
            Code::Unauthenticated,
            pb::ErrorReason::UnknownOrganization,
            what,
        )
        .await;
    }
    assert_eq!(
        new_call(&human).await,
        (
            Some(Code::Unauthenticated),
            Some(pb::ErrorReason::UnknownOrganization)
        )
    );

    // Bound again, the same token streams until it expires.
    bind(&server, &globex.id, &issuer.url, "org_globex").await;
    let mut tail = Open::tail(&human).await.unwrap();
    tail.stays_open(Duration::from_millis(3 * CHECK_MS), "tail again")
        .await;
    server.clock.advance(3_601_000);
    let since = Instant::now();
    ends_with(
        &mut tail,
        since,
        Code::Unauthenticated,
        pb::ErrorReason::Unauthenticated,
        "the expired token's tail",
    )
    .await;
    assert_eq!(
        new_call(&human).await,
        (
            Some(Code::Unauthenticated),
            Some(pb::ErrorReason::Unauthenticated)
        )
    );
    server.stop().await;
}

// ---------------------------------------------------------------------------
// Every stream of the contract is covered.

/// The server-streaming RPCs these tests open (the export in its own test).
const COVERED: &[&str] = &[
    "/vaultguard.v1.StepUpService/WatchStepUp",
    "/vaultguard.v1.StepUpService/WatchPendingStepUps",
    "/vaultguard.v1.AuditService/TailAuditEvents",
    "/vaultguard.v1.AuditService/ExportAuditEvents",
];

#[test]
fn every_server_streaming_rpc_of_the_contract_is_covered_here() {
    let set = prost_types::FileDescriptorSet::decode(vaultguard_proto::FILE_DESCRIPTOR_SET)
        .expect("descriptor set");
    let mut streaming = BTreeSet::new();
    for file in &set.file {
        for service in &file.service {
            for method in &service.method {
                if method.server_streaming() {
                    streaming.insert(format!(
                        "/{}.{}/{}",
                        file.package(),
                        service.name(),
                        method.name()
                    ));
                }
            }
        }
    }
    let covered: BTreeSet<String> = COVERED.iter().map(|m| (*m).to_owned()).collect();
    assert_eq!(
        streaming, covered,
        "a server-streaming RPC was added or removed: its stream must be opened \
         through grpc/stream.rs (standing re-checked) and tested here"
    );
}
