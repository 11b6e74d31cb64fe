//! Rate limits and overload protection (`server/src/limits.rs`): per-agent,
//! per-tenant and per-`client_id` token buckets with RetryInfo, refusal
//! pacing past a key's refusal budget, the process-wide concurrency cap, the
//! request-size cap, the per-tenant cap on open streams, and an unread
//! stream not growing memory.

use std::time::{Duration, Instant};

use tonic::Code;
use tonic_types::StatusExt;
use vaultguard_client::{VaultGuardClient, pb};
use vaultguard_server::config::Config;
use vaultguard_tests::{TestOptions, TestServer, expect_code, expect_reason};

use crate::policies::{add_rule, inbound, text};

/// A server whose limits are all off, then changed by `adjust`.
async fn server_with(adjust: fn(&mut Config)) -> TestServer {
    TestServer::start_adjusted(adjust).await
}

pub(crate) fn no_limits(config: &mut Config) {
    config.rate_limit_agent_per_second = 0;
    config.rate_limit_tenant_per_second = 0;
    config.rate_limit_client_per_second = 0;
    config.max_concurrent_requests = 0;
    config.max_streams_per_tenant = 0;
}

/// WhoAmI as `client`, the raw status kept (for its RetryInfo).
async fn who_am_i(client: &VaultGuardClient) -> Result<pb::WhoAmIResponse, tonic::Status> {
    let request = client
        .request(pb::WhoAmIRequest {})
        .await
        .map_err(|e| tonic::Status::internal(format!("no request: {e}")))?;
    client
        .auth()
        .who_am_i(request)
        .await
        .map(|r| r.into_inner())
}

/// Asserts a RATE_LIMITED refusal of `scope`; returns its RetryInfo delay.
#[track_caller]
fn rate_limited<T: std::fmt::Debug>(
    result: Result<T, tonic::Status>,
    scope: &str,
) -> Option<Duration> {
    let status = match result {
        Ok(value) => panic!("expected RESOURCE_EXHAUSTED ({scope}), got Ok({value:?})"),
        Err(status) => status,
    };
    let retry = status
        .get_details_retry_info()
        .and_then(|info| info.retry_delay);
    let metadata = expect_reason(
        Err::<(), _>(status),
        Code::ResourceExhausted,
        pb::ErrorReason::RateLimited,
    );
    assert_eq!(
        metadata.get("scope").map(String::as_str),
        Some(scope),
        "{metadata:?}"
    );
    retry
}

#[tokio::test]
async fn an_agent_past_its_burst_waits_for_its_retry_info_and_spares_its_sibling() {
    let server = server_with(|config| {
        no_limits(config);
        config.rate_limit_agent_per_second = 2;
        config.rate_limit_agent_burst = 3;
    })
    .await;
    let acme = server.create_tenant("acme").await;
    let (_, _, bot) = server.create_agent(&acme.id, "bot").await;
    let (_, _, sibling) = server.create_agent(&acme.id, "sibling").await;
    bot.bearer().await.expect("token");

    for n in 0..3 {
        who_am_i(&bot)
            .await
            .unwrap_or_else(|e| panic!("call {n} within the burst: {e:?}"));
    }
    let delay = rate_limited(who_am_i(&bot).await, "agent").expect("RetryInfo");
    // One cell every 500 ms at 2 per second.
    assert!(
        delay > Duration::ZERO && delay <= Duration::from_millis(500),
        "retry delay {delay:?}"
    );
    // The sibling's bucket is its own.
    for _ in 0..3 {
        who_am_i(&sibling).await.expect("the sibling is admitted");
    }

    tokio::time::sleep(delay + Duration::from_millis(20)).await;
    who_am_i(&bot)
        .await
        .expect("admitted after the retry delay");
    rate_limited(who_am_i(&bot).await, "agent");
    server.stop().await;
}

#[tokio::test]
async fn the_tenant_limit_spans_agents_and_humans_and_spares_other_tenants() {
    let server = server_with(|config| {
        no_limits(config);
        config.rate_limit_tenant_per_second = 1;
        config.rate_limit_tenant_burst = 30;
    })
    .await;
    let acme = server.create_tenant("acme").await;
    let globex = server.create_tenant("globex").await;
    // Setting up spent part of acme's bucket (CreateAgent); spend the rest
    // with two agents taking turns.
    let (_, _, first) = server.create_agent(&acme.id, "first").await;
    let (_, _, second) = server.create_agent(&acme.id, "second").await;
    let (_, _, outsider) = server.create_agent(&globex.id, "outsider").await;
    let mut admitted = 0;
    let refusal = loop {
        let agent = if admitted % 2 == 0 { &first } else { &second };
        match who_am_i(agent).await {
            Ok(_) => admitted += 1,
            Err(status) => break status,
        }
        assert!(admitted <= 31, "the tenant limit never refused");
    };
    assert!(admitted >= 20, "refused after only {admitted} calls");
    let delay = rate_limited(Err::<(), _>(refusal), "tenant").expect("RetryInfo");
    assert!(delay <= Duration::from_secs(1), "retry delay {delay:?}");
    // Both agents and the tenant's humans are out of budget now.
    rate_limited(who_am_i(&first).await, "tenant");
    rate_limited(who_am_i(&second).await, "tenant");
    let admin = server.admin(&acme.id, "admin@acme").await;
    rate_limited(who_am_i(&admin).await, "tenant");
    // Another tenant is not.
    for _ in 0..10 {
        who_am_i(&outsider).await.expect("globex is admitted");
    }
    server.stop().await;
}

#[tokio::test]
async fn a_flooding_tenant_does_not_starve_another() {
    let server = server_with(|config| {
        no_limits(config);
        config.rate_limit_tenant_per_second = 20;
        config.rate_limit_tenant_burst = 20;
    })
    .await;
    let acme = server.create_tenant("acme").await;
    let globex = server.create_tenant("globex").await;
    let (_, _, flooder) = server.create_agent(&acme.id, "flooder").await;
    let (_, _, quiet) = server.create_agent(&globex.id, "quiet").await;
    flooder.bearer().await.expect("token");
    quiet.bearer().await.expect("token");

    let flood_until = Instant::now() + Duration::from_secs(2);
    let floods: Vec<_> = (0..8)
        .map(|_| {
            let flooder = flooder.clone();
            tokio::spawn(async move {
                let (mut ok, mut refused) = (0u32, 0u32);
                while Instant::now() < flood_until {
                    match who_am_i(&flooder).await {
                        Ok(_) => ok += 1,
                        Err(status) if status.code() == Code::ResourceExhausted => refused += 1,
                        Err(status) => panic!("unexpected: {status:?}"),
                    }
                }
                (ok, refused)
            })
        })
        .collect();
    // Globex asks 10 times a second while acme floods: every call admitted.
    for _ in 0..15 {
        who_am_i(&quiet)
            .await
            .expect("globex is admitted during acme's flood");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (mut ok, mut refused) = (0, 0);
    for flood in floods {
        let (o, r) = flood.await.expect("flood task");
        ok += o;
        refused += r;
    }
    assert!(
        refused > ok,
        "acme was mostly refused: {ok} admitted, {refused} refused"
    );
    // 20 burst + 20 per second for ~2 s (and setup spent some).
    assert!(ok <= 80, "acme admitted {ok} calls in 2 s");
    server.stop().await;
}

/// WhoAmI as `client`: the outcome and how long the answer took.
async fn timed_who_am_i(
    client: &VaultGuardClient,
) -> (Result<pb::WhoAmIResponse, tonic::Status>, Duration) {
    let started = Instant::now();
    let result = who_am_i(client).await;
    (result, started.elapsed())
}

/// Refusals waiting out their pacing now, from the server's `/metrics`
/// (each test runs in a process of its own, so the gauge is this server's).
async fn parked_refusals(server: &TestServer) -> u64 {
    let text = reqwest::get(format!("{}/metrics", server.http_url()))
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics text");
    text.lines()
        .find_map(|line| line.strip_prefix("vaultguard_limit_paced_refusals_waiting "))
        .map_or(0, |value| {
            value.trim().parse::<f64>().expect("gauge value") as u64
        })
}

/// An agent of 1 call/s (bucket 1) with one refusal a second answered at
/// once; later refusals wait 600 ms..1 s.
fn paced_agent(config: &mut Config) {
    no_limits(config);
    config.rate_limit_agent_per_second = 1;
    config.rate_limit_agent_burst = 1;
    config.rate_limit_refusals_per_second = 1;
    config.rate_limit_refusal_delay_min_ms = 600;
    config.rate_limit_refusal_delay_max_ms = 1_000;
}

const PACED_MIN: Duration = Duration::from_millis(600);

#[tokio::test]
async fn refusals_past_the_refusal_budget_are_answered_late_and_unchanged() {
    let server = server_with(paced_agent).await;
    let acme = server.create_tenant("acme").await;
    let (_, _, bot) = server.create_agent(&acme.id, "bot").await;
    bot.bearer().await.expect("token");

    who_am_i(&bot).await.expect("within the burst");
    // The first refusal is within the refusal budget: answered at once.
    let (refused, took) = timed_who_am_i(&bot).await;
    rate_limited(refused, "agent").expect("RetryInfo");
    assert!(took < PACED_MIN, "an immediate refusal took {took:?}");
    // The caller keeps calling: every further refusal waits at least the
    // lower bound, and is the same refusal (scope, RetryInfo).
    let calls: Vec<_> = (0..4)
        .map(|_| {
            let bot = bot.clone();
            tokio::spawn(async move { timed_who_am_i(&bot).await })
        })
        .collect();
    for call in calls {
        let (refused, took) = call.await.expect("call");
        let delay = rate_limited(refused, "agent").expect("RetryInfo");
        assert!(delay <= Duration::from_secs(1), "retry delay {delay:?}");
        assert!(took >= PACED_MIN, "a paced refusal took only {took:?}");
        assert!(
            took < Duration::from_secs(10),
            "a paced refusal took {took:?}"
        );
    }
    assert_eq!(parked_refusals(&server).await, 0, "none left parked");
    server.stop().await;
}

#[tokio::test]
async fn parked_refusals_hold_no_overload_slot() {
    let server = server_with(|config| {
        paced_agent(config);
        config.rate_limit_refusal_delay_min_ms = 5_000;
        config.rate_limit_refusal_delay_max_ms = 5_000;
        config.max_concurrent_requests = 8;
    })
    .await;
    let acme = server.create_tenant("acme").await;
    let globex = server.create_tenant("globex").await;
    let (_, _, flooder) = server.create_agent(&acme.id, "flooder").await;
    flooder.bearer().await.expect("token");
    let admin = server.admin(&globex.id, "admin@globex").await;

    // 200 calls of acme's agent at once, each retried while it is shed at
    // arrival (8 slots), until refused: nearly all of them park for 5 s.
    let calls: Vec<_> = (0..200)
        .map(|_| {
            let flooder = flooder.clone();
            tokio::spawn(async move {
                let deadline = Instant::now() + Duration::from_secs(20);
                loop {
                    match who_am_i(&flooder).await {
                        Err(status)
                            if status.code() == Code::Unavailable && Instant::now() < deadline =>
                        {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                        other => return other,
                    }
                }
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let parked = parked_refusals(&server).await;
        if parked >= 190 {
            break;
        }
        assert!(Instant::now() < deadline, "only {parked} refusals parked");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // 190+ parked refusals and 8 slots: globex's calls are still served.
    for n in 0..10 {
        who_am_i(&admin)
            .await
            .unwrap_or_else(|e| panic!("globex's call {n} with acme's refusals parked: {e:?}"));
    }
    let parked = parked_refusals(&server).await;
    assert!(
        parked >= 190,
        "only {parked} refusals were still parked after globex's calls"
    );
    let mut refused = 0;
    for call in calls {
        match call.await.expect("call") {
            Ok(_) => {}
            Err(status) => {
                rate_limited(Err::<(), _>(status), "agent");
                refused += 1;
            }
        }
    }
    assert!(refused >= 190, "{refused} refused");
    server.stop().await;
}

#[tokio::test]
async fn without_pacing_every_refusal_is_answered_at_once() {
    let server = server_with(|config| {
        paced_agent(config);
        config.rate_limit_refusals_per_second = 0;
    })
    .await;
    let acme = server.create_tenant("acme").await;
    let (_, _, bot) = server.create_agent(&acme.id, "bot").await;
    bot.bearer().await.expect("token");

    who_am_i(&bot).await.expect("within the burst");
    let mut refused = 0;
    for _ in 0..20 {
        // A refill may admit one now and then on a slow machine.
        let (result, took) = timed_who_am_i(&bot).await;
        if result.is_err() {
            rate_limited(result, "agent").expect("RetryInfo");
            assert!(took < PACED_MIN, "an unpaced refusal took {took:?}");
            refused += 1;
        }
    }
    assert!(refused >= 10, "only {refused} of 20 refused");
    assert_eq!(parked_refusals(&server).await, 0);
    server.stop().await;
}

#[tokio::test]
async fn an_issue_token_flood_on_one_client_id_does_not_refuse_another() {
    let server = server_with(|config| {
        no_limits(config);
        config.rate_limit_client_per_second = 1;
        config.rate_limit_client_burst = 3;
    })
    .await;
    let acme = server.create_tenant("acme").await;
    let (victim, _, _) = server.create_agent(&acme.id, "victim").await;
    let (other, other_secret, _) = server.create_agent(&acme.id, "other").await;
    let anonymous = server.anonymous().await;

    // Guessing the victim's secret: three guesses, then the bucket is empty.
    for _ in 0..3 {
        expect_code(
            anonymous.issue_token(&victim.id, "vgs_wrong").await,
            Code::Unauthenticated,
        );
    }
    let request = pb::IssueTokenRequest {
        grant_type: "client_credentials".to_owned(),
        client_id: victim.id.clone(),
        client_secret: "vgs_wrong".to_owned(),
    };
    let refused = anonymous.auth().issue_token(request).await;
    let delay = rate_limited(refused, "client").expect("RetryInfo");
    assert!(
        delay > Duration::ZERO && delay <= Duration::from_secs(1),
        "retry delay {delay:?}"
    );
    // Another client id is unaffected, and so are made-up ones.
    let issued = anonymous
        .issue_token(&other.id, &other_secret)
        .await
        .expect("another client id is admitted");
    assert!(!issued.access_token.is_empty());
    expect_code(
        anonymous
            .issue_token("agt_00000000000000000000000000000000", "x")
            .await,
        Code::Unauthenticated,
    );
    server.stop().await;
}

#[tokio::test]
async fn an_oversized_request_is_refused_and_writes_nothing() {
    let server = server_with(|config| {
        config.max_request_bytes = 8 * 1024;
    })
    .await;
    let acme = server.create_tenant("acme").await;
    let admin = server.admin(&acme.id, "admin@acme").await;
    // A valid rule of ~20 KB: 16 conditions of 4 values of 256 bytes.
    let values: Vec<pb::AttributeValue> = (0..4)
        .map(|n| text(&format!("{n:03}{}", "v".repeat(253))))
        .collect();
    let big = pb::Rule {
        conditions: (0..16)
            .map(|n| pb::Condition {
                attribute: format!("attr{n}"),
                operator: pb::ConditionOperator::In as i32,
                value: None,
                values: values.clone(),
                ..Default::default()
            })
            .collect(),
        ..inbound("big.*", pb::Effect::Allow)
    };
    server.wait_sealed().await;
    let (rules, events) = (
        server.count("policy_rules").await,
        server.count("audit_events").await,
    );

    let request = admin
        .request(pb::CreateRuleRequest {
            rule: Some(big.clone()),
        })
        .await
        .expect("request");
    let refused = expect_code(
        admin.policies().create_rule(request).await,
        Code::OutOfRange,
    );
    assert!(
        refused.to_string().contains("too large"),
        "tonic's message: {refused}"
    );
    // The public path reads IssueToken's body itself: the same cap.
    let oversized_secret = "s".repeat(9 * 1024);
    expect_code(
        server
            .anonymous()
            .await
            .issue_token("agt_00000000000000000000000000000000", &oversized_secret)
            .await,
        Code::OutOfRange,
    );
    server.wait_sealed().await;
    assert_eq!(server.count("policy_rules").await, rules, "no rule written");
    assert_eq!(
        server.count("audit_events").await,
        events,
        "no event written"
    );

    // A rule under the cap is written.
    add_rule(
        &admin,
        pb::Rule {
            conditions: big.conditions[..2].to_vec(),
            ..big
        },
    )
    .await;
    assert_eq!(server.count("policy_rules").await, rules + 1);
    server.stop().await;
}

/// A trusted OIDC issuer that accepts connections and never answers: a
/// call bearing a token of it waits in authentication (fetching the
/// issuer's discovery document, up to the 5 s HTTP timeout), holding its
/// concurrency slot. Returns the issuer's URL and the listener's task.
async fn silent_issuer() -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    (url, task)
}

/// WhoAmI with a (badly signed) token of `issuer`: in flight until dropped,
/// or until the issuer fetch times out.
async fn hanging_call(server: &TestServer, issuer: &str) -> tokio::task::JoinHandle<()> {
    use base64::Engine as _;
    let b64 = |value: serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(value.to_string())
    };
    let token = format!(
        "{}.{}.c2ln",
        b64(serde_json::json!({"alg": "RS256", "kid": "k1", "typ": "JWT"})),
        b64(serde_json::json!({"iss": issuer, "aud": "vaultguard", "sub": "someone"})),
    );
    let client = server.with_bearer(&token).await;
    tokio::spawn(async move {
        let _ = who_am_i(&client).await;
    })
}

#[tokio::test]
async fn calls_beyond_the_concurrency_cap_are_shed_at_once() {
    // Two calls waiting on a slow dependency (an OIDC issuer that never
    // answers) hold the two slots. (A call whose request message never
    // comes holds none: `slow_body.rs`.)
    let (issuer, silent) = silent_issuer().await;
    let server = TestServer::start_with(TestOptions {
        adjust_config: Some(|config: &mut Config| {
            no_limits(config);
            config.max_concurrent_requests = 2;
        }),
        ..TestOptions::trusting(&issuer)
    })
    .await;
    let acme = server.create_tenant("acme").await;
    let admin = server.admin(&acme.id, "admin@acme").await;
    let hanging = [
        hanging_call(&server, &issuer).await,
        hanging_call(&server, &issuer).await,
    ];

    // Once both are in flight, a third call is shed without waiting.
    let deadline = Instant::now() + Duration::from_secs(10);
    let (shed, took) = loop {
        let started = Instant::now();
        match who_am_i(&admin).await {
            Err(status) if status.code() == Code::Unavailable => break (status, started.elapsed()),
            Ok(_) => {}
            Err(status) => panic!("unexpected: {status:?}"),
        }
        assert!(Instant::now() < deadline, "never shed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(took < Duration::from_secs(1), "shedding took {took:?}");
    let metadata = expect_reason(
        Err::<(), _>(shed),
        Code::Unavailable,
        pb::ErrorReason::Unavailable,
    );
    assert_eq!(
        metadata.get("cause").map(String::as_str),
        Some("overloaded")
    );
    for _ in 0..3 {
        expect_code(who_am_i(&admin).await, Code::Unavailable);
    }

    // The hanging calls go away (their streams are reset): calls flow again.
    for call in hanging {
        call.abort();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while who_am_i(&admin).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "still shedding after the load left"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    silent.abort();
    server.stop().await;
}

async fn watch_queue(
    client: &VaultGuardClient,
) -> Result<tonic::Streaming<pb::WatchPendingStepUpsResponse>, tonic::Status> {
    let request = client
        .request(pb::WatchPendingStepUpsRequest {
            cursor: String::new(),
            heartbeat_interval_seconds: 60,
        })
        .await
        .map_err(|e| tonic::Status::internal(format!("no request: {e}")))?;
    Ok(client
        .step_ups()
        .watch_pending_step_ups(request)
        .await?
        .into_inner())
}

#[tokio::test]
async fn a_tenant_holds_at_most_its_cap_of_open_streams() {
    let server = server_with(|config| {
        no_limits(config);
        config.max_streams_per_tenant = 2;
    })
    .await;
    let acme = server.create_tenant("acme").await;
    let globex = server.create_tenant("globex").await;
    let approver = server.approver(&acme.id, "approver@acme").await;
    let auditor = server
        .human(&acme.id, "auditor@acme", &[pb::Role::Auditor])
        .await;
    let outsider = server.approver(&globex.id, "approver@globex").await;

    let first = watch_queue(&approver).await.expect("first stream");
    let _second = watch_queue(&approver).await.expect("second stream");
    let refused = watch_queue(&approver).await;
    assert!(rate_limited(refused, "streams").is_none(), "no RetryInfo");
    // Every streaming RPC of the tenant counts: a tail too.
    let tail = auditor
        .request(pb::TailAuditEventsRequest {
            heartbeat_interval_seconds: 60,
            ..Default::default()
        })
        .await
        .expect("request");
    rate_limited(auditor.audit().tail_audit_events(tail).await, "streams");
    // Unary calls are not streams; other tenants have their own cap.
    who_am_i(&approver)
        .await
        .expect("unary calls still admitted");
    let _theirs = watch_queue(&outsider).await.expect("globex's stream");

    // Closing one frees its slot.
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(10);
    let _third = loop {
        match watch_queue(&approver).await {
            Ok(stream) => break stream,
            Err(status) if status.code() == Code::ResourceExhausted => {}
            Err(status) => panic!("unexpected: {status:?}"),
        }
        assert!(
            Instant::now() < deadline,
            "the closed stream's slot was not freed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    rate_limited(watch_queue(&approver).await, "streams");
    server.stop().await;
}
