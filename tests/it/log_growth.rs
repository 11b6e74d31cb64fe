//! Growing a victim's append-only log from outside (issue 23, item 8): a
//! caller's `x-request-id` is stored in every event its call writes, and
//! refusals that anyone can cause (IssueToken with a wrong secret for a
//! known `client_id`, NOT_FOUND answers, a replayed OAuth callback) were
//! one event each. Request ids
//! are now short and plain or replaced (`server/src/request_id.rs`), and
//! such refusals are recorded a bounded number of times per window and key,
//! the rest counted (`audit::RefusalDebounce`).

use std::time::Duration;

use futures::StreamExt as _;
use sea_orm::EntityTrait;
use tonic::Code;
use tonic::metadata::AsciiMetadataValue;
use vaultguard_client::{VaultGuardClient, pb};
use vaultguard_server::config::Config;
use vaultguard_server::store::entities::audit_event;
use vaultguard_tests::Rpc;
use vaultguard_tests::{TestServer, expect_code};

async fn server_with(adjust: fn(&mut Config)) -> TestServer {
    TestServer::start_adjusted(adjust).await
}

/// IssueToken for `client_id` with a wrong secret, sending `request_id` (if
/// the client library accepts it as a header value): the answer's status
/// (or the transport's error, for ids HTTP/2 refuses).
async fn refused_issue_token(
    anonymous: &VaultGuardClient,
    client_id: &str,
    request_id: &[u8],
) -> Option<tonic::Status> {
    let mut request = tonic::Request::new(pb::IssueTokenRequest {
        grant_type: "client_credentials".to_owned(),
        client_id: client_id.to_owned(),
        client_secret: "vgs_wrong".to_owned(),
    });
    let value = AsciiMetadataValue::try_from(request_id).ok()?;
    request.metadata_mut().insert("x-request-id", value);
    match anonymous.auth().issue_token(request).await {
        Ok(_) => panic!("a wrong secret was accepted"),
        Err(status) => Some(status),
    }
}

/// The request id the server says a call used.
fn echoed_id(status: &tonic::Status) -> Option<String> {
    status
        .metadata()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// Every request id in the whole audit log.
async fn stored_request_ids(server: &TestServer) -> Vec<String> {
    audit_event::Entity::find()
        .all(&server.state.db)
        .await
        .expect("audit events")
        .into_iter()
        .map(|event| event.request_id)
        .collect()
}

fn plain(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

#[tokio::test]
async fn hostile_request_ids_never_reach_the_audit_log() {
    // Every refusal recorded (no debounce) and no client_id rate limit, so
    // each case writes its event.
    let server = server_with(|config| {
        config.rate_limit_client_per_second = 0;
        config.refusal_audit_window_seconds = 0;
    })
    .await;
    let acme = server.create_tenant("acme").await;
    let (agent, _, _) = server.create_agent(&acme.id, "bot").await;
    let admin = server.admin(&acme.id, "admin@acme").await;
    let anonymous = server.anonymous().await;

    let megabyte = "r".repeat(1024 * 1024);
    let sixty_four_k = "r".repeat(64 * 1024);
    let eight_k = "r".repeat(8 * 1024);
    let just_too_long = "r".repeat(129);
    let hostile: Vec<(&str, &[u8])> = vec![
        ("1 MiB", megabyte.as_bytes()),
        ("64 KiB", sixty_four_k.as_bytes()),
        ("8 KiB", eight_k.as_bytes()),
        ("129 characters", just_too_long.as_bytes()),
        ("a tab", b"trace\tid"),
        ("a space", b"trace id"),
        ("markup", b"<script>alert(1)</script>"),
        ("a spreadsheet formula", b"=HYPERLINK(\"http://x\")"),
        ("a quote and a comma", b"a\",b"),
        ("non-ASCII bytes", b"caf\xc3\xa9"),
        ("a DEL byte", b"a\x7fb"),
    ];
    let mut audited = Vec::new();
    for (case, id) in &hostile {
        let Some(status) = refused_issue_token(&anonymous, &agent.id, id).await else {
            // The client library would not send it (not a header value).
            eprintln!("{case}: not a header value to tonic");
            continue;
        };
        if status.code() != Code::Unauthenticated {
            // HTTP/2 refused the headers (over 16 KiB): nothing reached the server.
            assert!(id.len() > 16 * 1024, "{case}: {status:?}");
            eprintln!("{case}: {:?} before the server", status.code());
            continue;
        }
        audited.push(*case);
        let used = echoed_id(&status).unwrap_or_else(|| panic!("{case}: no x-request-id"));
        assert!(used.as_bytes() != *id, "{case}: the caller's id was kept");
        assert!(
            uuid::Uuid::parse_str(&used).is_ok(),
            "{case}: {used} is not a server-made id"
        );
        // The refusal is audited under the id the response named.
        let refusals = server.audit_events(&acme.id, "auth.token_refused").await;
        assert!(
            refusals.iter().any(|event| event.request_id == used),
            "{case}: the refusal is not audited under {used}"
        );
    }

    eprintln!("refused and audited under a server-made id: {audited:?}");
    assert!(audited.len() >= 8, "{audited:?}");

    // An authenticated call that writes an event: the same.
    let mut request = admin
        .request(pb::GetAgentRequest {
            agent_id: format!("agt_{}", "0".repeat(32)),
        })
        .await
        .expect("request");
    request
        .metadata_mut()
        .insert("x-request-id", AsciiMetadataValue::from_static("<b>hi</b>"));
    let status = admin.agents().get_agent(request).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let used = echoed_id(&status).expect("x-request-id");
    assert!(uuid::Uuid::parse_str(&used).is_ok(), "{used}");
    assert!(
        server
            .audit_events(&acme.id, "auth.not_found")
            .await
            .iter()
            .any(|event| event.request_id == used)
    );

    // A short plain id is kept, echoed and audited as sent.
    let status = refused_issue_token(&anonymous, &agent.id, b"trace-42:A_b.c")
        .await
        .expect("sent");
    assert_eq!(echoed_id(&status).as_deref(), Some("trace-42:A_b.c"));
    assert!(
        server
            .audit_events(&acme.id, "auth.token_refused")
            .await
            .iter()
            .any(|event| event.request_id == "trace-42:A_b.c")
    );

    // Nothing hostile anywhere in the log.
    for id in stored_request_ids(&server).await {
        assert!(
            plain(&id),
            "stored request id {:?}",
            &id[..id.len().min(64)]
        );
    }
    server.stop().await;
}

/// The events of `event_type` in `tenant_id`'s log, and the refusals they
/// stand for (each event plus the `suppressed` count it carries).
async fn trace(server: &TestServer, tenant_id: &str, event_type: &str) -> (usize, u64) {
    let events = server.audit_events(tenant_id, event_type).await;
    let mut total = 0;
    for event in &events {
        let details: serde_json::Value = serde_json::from_str(&event.details).expect("details");
        total += 1 + details["suppressed"].as_u64().unwrap_or(0);
    }
    (events.len(), total)
}

#[tokio::test]
async fn refusal_floods_leave_a_bounded_trail_that_counts_them() {
    // No client_id rate limit: the debounce alone bounds the trail. The
    // defaults otherwise: 10 events per key and 60 s window.
    let server = server_with(|config| {
        config.rate_limit_client_per_second = 0;
        config.rate_limit_tenant_per_second = 0;
    })
    .await;
    let acme = server.create_tenant("acme").await;
    let (agent, secret, _) = server.create_agent(&acme.id, "bot").await;
    let admin = server.admin(&acme.id, "admin@acme").await;
    let anonymous = server.anonymous().await;

    // An outsider guesses the agent's secret 500 times.
    let refused = futures::stream::iter(0..500)
        .map(|_| {
            let anonymous = anonymous.clone();
            let client_id = agent.id.clone();
            async move { anonymous.issue_token(&client_id, "vgs_wrong").await }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    for answer in refused {
        expect_code(answer, Code::Unauthenticated);
    }
    // The tenant's admin probes 200 made-up agent ids.
    for n in 0..200 {
        expect_code(
            admin
                .get_agent(pb::GetAgentRequest {
                    agent_id: format!("agt_{n:032}"),
                })
                .await,
            Code::NotFound,
        );
    }
    // And 100 made-up delegation ids.
    for n in 0..100 {
        expect_code(
            admin.get_delegation(format!("dlg_{n:032}")).await,
            Code::NotFound,
        );
    }
    server.wait_sealed().await;
    let (events, _) = trace(&server, &acme.id, "auth.token_refused").await;
    assert!(
        events <= 10,
        "{events} auth.token_refused events for 500 refusals"
    );
    let (events, _) = trace(&server, &acme.id, "auth.not_found").await;
    assert!(
        events <= 10,
        "{events} auth.not_found events for 200 refusals"
    );
    let (events, _) = trace(&server, &acme.id, "delegation.not_found").await;
    assert!(
        events <= 10,
        "{events} delegation.not_found events for 100 refusals"
    );

    // Once the window is over, the latest refusal of each is written with
    // the count of the others: every refusal is accounted for.
    server.clock.advance(61_000);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let refusals = trace(&server, &acme.id, "auth.token_refused").await;
        let probes = trace(&server, &acme.id, "auth.not_found").await;
        let delegations = trace(&server, &acme.id, "delegation.not_found").await;
        if refusals.1 == 500 && probes.1 == 200 && delegations.1 == 100 {
            assert!(refusals.0 <= 11, "{refusals:?}");
            assert!(probes.0 <= 11, "{probes:?}");
            assert!(delegations.0 <= 11, "{delegations:?}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "(events, refusals) accounted for: {refusals:?} of 500, {probes:?} of 200, \
             {delegations:?} of 100"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The genuine agent was never locked out by the flood.
    anonymous
        .issue_token(&agent.id, &secret)
        .await
        .expect("the agent's own secret");
    server.stop().await;
}
