//! Slow request bodies (issue 23, item 3): a call whose request message
//! never arrives must hold no shared capacity, and is answered once the
//! body read deadline (`request_body_timeout_ms`) passes, without any
//! handler work. The flood is a raw HTTP/2 client (`vaultguard_tests::slow_body`).

use std::time::{Duration, Instant};

use tonic::Code;
use tonic_types::StatusExt;
use vaultguard_client::{VaultGuardClient, pb};
use vaultguard_server::config::Config;
use vaultguard_tests::TestServer;
use vaultguard_tests::slow_body::{
    Flood, FloodSpec, call_in_two_parts, call_once, frame_prefix, framed,
};

const WHO_AM_I: &str = "/vaultguard.v1.AuthService/WhoAmI";
const WATCH_PENDING: &str = "/vaultguard.v1.StepUpService/WatchPendingStepUps";

async fn server_with(adjust: fn(&mut Config)) -> TestServer {
    TestServer::start_adjusted(adjust).await
}

/// WhoAmI as `client` must answer OK within `within`.
async fn served(client: &VaultGuardClient, who: &str, within: Duration) -> Duration {
    let started = Instant::now();
    let request = client.request(pb::WhoAmIRequest {}).await.expect("request");
    let answer = tokio::time::timeout(within, client.auth().who_am_i(request))
        .await
        .unwrap_or_else(|_| panic!("{who}'s call got no answer within {within:?}"));
    if let Err(status) = answer {
        panic!("{who}'s call during the flood: {status:?}");
    }
    started.elapsed()
}

/// `x` as a bearer header.
fn bearer(token: &str) -> Vec<(String, String)> {
    vec![("authorization".to_owned(), format!("Bearer {token}"))]
}

#[tokio::test]
async fn an_unauthenticated_slow_body_flood_leaves_everyone_else_served() {
    // The default limits: max_concurrent_requests 1,024, 256 streams per
    // connection; the flood of the issue holds 5 × 256 = 1,280 calls.
    let server = TestServer::start().await;
    let acme = server.create_tenant("acme").await;
    let (agent, secret, bot) = server.create_agent(&acme.id, "bot").await;
    bot.bearer().await.expect("token");
    let operator = server.operator().await;

    let flood = Flood::start(FloodSpec::issue_token(server.grpc_addr, 5, 256))
        .await
        .expect("flood");
    flood
        .wait_open(Duration::from_secs(30))
        .await
        .expect("the flood is in place");

    // For two seconds, the operator, the agent and the agent's own
    // IssueToken (the flooded method; every 100 ms, within its client_id's
    // rate limit) are answered promptly.
    let until = Instant::now() + Duration::from_secs(2);
    let mut slowest = Duration::ZERO;
    while Instant::now() < until {
        slowest = slowest.max(served(&operator, "the operator", Duration::from_secs(5)).await);
        slowest = slowest.max(served(&bot, "the agent", Duration::from_secs(5)).await);
        let started = Instant::now();
        tokio::time::timeout(
            Duration::from_secs(5),
            server.anonymous().await.issue_token(&agent.id, &secret),
        )
        .await
        .expect("IssueToken answered")
        .expect("the agent's IssueToken during the flood");
        slowest = slowest.max(started.elapsed());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(slowest < Duration::from_secs(2), "slowest call {slowest:?}");
    // The flood's calls are still waiting: none was answered (the read
    // deadline is 10 s by default).
    assert!(
        flood.counts.snapshot().is_empty(),
        "answers: {:?}",
        flood.counts.snapshot()
    );
    flood.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn authenticated_slow_bodies_hold_no_shared_capacity() {
    let server = server_with(|config| {
        config.max_concurrent_requests = 16;
    })
    .await;
    let acme = server.create_tenant("acme").await;
    let globex = server.create_tenant("globex").await;
    let (_, _, bot) = server.create_agent(&acme.id, "bot").await;
    let token = bot.bearer().await.expect("token");
    let approver_token = server
        .mint("approver@acme", Some(&acme.id), &[pb::Role::Approver])
        .await;
    let outsider = server.admin(&globex.id, "admin@globex").await;
    let operator = server.operator().await;

    // acme's agent: unary calls whose message never comes, and whole
    // messages whose stream never ends; its approver: queue watches whose
    // request never comes. 140 calls against 16 slots.
    let mut floods = Vec::new();
    for spec in [
        FloodSpec {
            path: WHO_AM_I.to_owned(),
            headers: bearer(&token),
            ..FloodSpec::issue_token(server.grpc_addr, 1, 60)
        },
        FloodSpec {
            path: WHO_AM_I.to_owned(),
            headers: bearer(&token),
            body: framed(&[]),
            ..FloodSpec::issue_token(server.grpc_addr, 1, 40)
        },
        FloodSpec {
            path: WATCH_PENDING.to_owned(),
            headers: bearer(&approver_token),
            ..FloodSpec::issue_token(server.grpc_addr, 1, 40)
        },
    ] {
        let flood = Flood::start(spec).await.expect("flood");
        flood
            .wait_open(Duration::from_secs(30))
            .await
            .expect("the flood is in place");
        floods.push(flood);
    }
    for _ in 0..10 {
        served(&operator, "the operator", Duration::from_secs(5)).await;
        served(&outsider, "globex's admin", Duration::from_secs(5)).await;
        served(&bot, "the flooding agent itself", Duration::from_secs(5)).await;
    }
    for flood in floods {
        assert!(
            flood.counts.snapshot().is_empty(),
            "answers: {:?}",
            flood.counts.snapshot()
        );
        flood.stop().await;
    }
    server.stop().await;
}

/// The status of a raw call's answer, or a panic if none came in time.
#[track_caller]
fn status_of(answer: Option<http::HeaderMap>, case: &str) -> tonic::Status {
    let headers = answer.unwrap_or_else(|| panic!("{case}: no answer"));
    tonic::Status::from_header_map(&headers).unwrap_or_else(|| panic!("{case}: no grpc-status"))
}

#[tokio::test]
async fn a_stalled_body_is_answered_after_the_read_deadline_without_handler_work() {
    let server = server_with(|config| {
        config.request_body_timeout_ms = 400;
    })
    .await;
    let acme = server.create_tenant("acme").await;
    let (agent, _, bot) = server.create_agent(&acme.id, "bot").await;
    let token = bot.bearer().await.expect("token");
    let approver_token = server
        .mint("approver@acme", Some(&acme.id), &[pb::Role::Approver])
        .await;
    let wrong_secret = pb::IssueTokenRequest {
        grant_type: "client_credentials".to_owned(),
        client_id: agent.id.clone(),
        client_secret: "vgs_wrong".to_owned(),
    };
    let base = FloodSpec::issue_token(server.grpc_addr, 1, 1);
    let cases = [
        ("IssueToken, a prefix announcing 100 bytes", base.clone()),
        (
            "IssueToken, headers and nothing else",
            FloodSpec {
                body: Vec::new(),
                ..base.clone()
            },
        ),
        (
            "IssueToken, half of the message",
            FloodSpec {
                body: framed(&prost::Message::encode_to_vec(&wrong_secret))[..20].to_vec(),
                ..base.clone()
            },
        ),
        (
            "IssueToken, the whole message but never END_STREAM",
            FloodSpec {
                body: framed(&prost::Message::encode_to_vec(&wrong_secret)),
                ..base.clone()
            },
        ),
        (
            "WhoAmI with the agent's bearer, a prefix only",
            FloodSpec {
                path: WHO_AM_I.to_owned(),
                headers: bearer(&token),
                ..base.clone()
            },
        ),
        (
            "WatchPendingStepUps with the approver's bearer, a prefix only",
            FloodSpec {
                path: WATCH_PENDING.to_owned(),
                headers: bearer(&approver_token),
                body: frame_prefix(8),
                ..base.clone()
            },
        ),
    ];
    server.wait_sealed().await;
    let events_before = server.count("audit_events").await;
    for (case, spec) in &cases {
        let started = Instant::now();
        let answer = call_once(spec, Duration::from_secs(5)).await.expect(case);
        let took = started.elapsed();
        let status = status_of(answer, case);
        assert_eq!(status.code(), Code::DeadlineExceeded, "{case}: {status:?}");
        let info = status
            .get_details_error_info()
            .unwrap_or_else(|| panic!("{case}: no ErrorInfo in {status:?}"));
        assert_eq!(
            info.reason,
            pb::ErrorReason::RequestBodyTimeout.as_str_name(),
            "{case}"
        );
        assert_eq!(
            info.metadata.get("timeout_ms").map(String::as_str),
            Some("400"),
            "{case}"
        );
        assert!(
            took >= Duration::from_millis(350) && took < Duration::from_secs(3),
            "{case}: answered after {took:?}"
        );
    }
    // No handler ran: the refused secret left no `auth.token_refused`.
    server.wait_sealed().await;
    assert_eq!(server.count("audit_events").await, events_before);
    assert!(
        server
            .audit_events(&acme.id, "auth.token_refused")
            .await
            .is_empty()
    );

    // The same calls with their whole message and END_STREAM are served.
    let whole = FloodSpec {
        body: framed(&prost::Message::encode_to_vec(&wrong_secret)),
        end_stream: true,
        ..base.clone()
    };
    let status = status_of(
        call_once(&whole, Duration::from_secs(5))
            .await
            .expect("call"),
        "a whole IssueToken",
    );
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    let who = FloodSpec {
        path: WHO_AM_I.to_owned(),
        headers: bearer(&token),
        body: framed(&[]),
        end_stream: true,
        ..base.clone()
    };
    let status = status_of(
        call_once(&who, Duration::from_secs(5)).await.expect("call"),
        "a whole WhoAmI",
    );
    assert_eq!(status.code(), Code::Ok, "{status:?}");
    server.stop().await;
}

#[tokio::test]
async fn a_slow_but_steady_body_within_the_deadline_is_served() {
    let server = server_with(|config| {
        config.request_body_timeout_ms = 2_000;
    })
    .await;
    let acme = server.create_tenant("acme").await;
    let (_, _, bot) = server.create_agent(&acme.id, "bot").await;
    let token = bot.bearer().await.expect("token");
    // The prefix now, the (empty) message's end 500 ms later.
    let spec = FloodSpec {
        path: WHO_AM_I.to_owned(),
        headers: bearer(&token),
        body: frame_prefix(0),
        ..FloodSpec::issue_token(server.grpc_addr, 1, 1)
    };
    let status = status_of(
        call_in_two_parts(&spec, Duration::from_millis(500), &[])
            .await
            .expect("call"),
        "a body in two parts",
    );
    assert_eq!(status.code(), Code::Ok, "{status:?}");
    server.stop().await;
}
