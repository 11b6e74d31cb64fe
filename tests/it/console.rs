//! The console's server side: the app served from the binary with strict
//! headers, sign-in by one-time link and by a trusted issuer (code + PKCE),
//! sessions that mint short-lived tokens only while they stand, CSRF and
//! login-CSRF refusals, and gRPC-Web calls that meet the same
//! authentication, roles and tenant walls as gRPC.
//!
//! The browser itself is driven in `console_browser.rs`; these tests speak
//! HTTP to the real server, the way a hostile client would.

use std::process::Command;

use prost::Message;
use reqwest::StatusCode;
use reqwest::header::{HeaderMap, LOCATION, SET_COOKIE};
use serde_json::Value;
use vaultguard_client::pb;
use vaultguard_tests::{TestOptions, TestServer};

use crate::cookbook::cli_binary;
use crate::oidc::{LocalIssuer, ORG_ACME, ORG_BETA, bind, unbind};

const CLIENT_ID: &str = "vaultguard-console";

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("http client")
}

/// GET `url` without following redirects.
async fn get(url: impl reqwest::IntoUrl) -> reqwest::Response {
    http().get(url).send().await.expect("GET")
}

/// POST `body` to the server's `path` with one extra header.
async fn post_body(
    server: &TestServer,
    path: &str,
    header: (&str, &str),
    body: &'static str,
) -> reqwest::Response {
    http()
        .post(format!("{}{path}", server.http_url()))
        .header(header.0, header.1)
        .body(body)
        .send()
        .await
        .expect("POST")
}

/// `name=value` of cookie `name` among `Set-Cookie` headers, and the whole
/// header (for its attributes).
fn set_cookie(headers: &HeaderMap, name: &str) -> Option<(String, String)> {
    headers
        .get_all(SET_COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .find(|value| value.starts_with(&format!("{name}=")))
        .map(|whole| {
            let pair = whole.split(';').next().unwrap_or_default().to_owned();
            (pair, whole.to_owned())
        })
}

/// Runs `vaultguard console-link` against the test server's store (off the
/// runtime's thread: the server in this process keeps serving meanwhile).
async fn console_link(server: &TestServer, args: &[&str]) -> std::process::Output {
    let mut command = Command::new(cli_binary());
    command
        .arg("--data-dir")
        .arg(server.data_dir())
        .args(["--database-url", &server.database_url])
        .args(["--issuer", &server.http_url()])
        .arg("console-link")
        .args(args);
    tokio::task::spawn_blocking(move || command.output().expect("run vaultguard console-link"))
        .await
        .expect("CLI thread")
}

/// A link's secret (the part after `#`) for `roles` of `tenant_id`.
async fn link_secret(server: &TestServer, tenant_id: &str, roles: &[&str]) -> String {
    let mut args = vec!["--tenant", tenant_id, "--subject", "ops@acme"];
    for role in roles {
        args.extend(["--role", role]);
    }
    let output = console_link(server, &args).await;
    assert!(
        output.status.success(),
        "console-link failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let url = String::from_utf8(output.stdout).expect("utf-8");
    let url = url.trim();
    let expected = format!("{}/console/link#", server.http_url());
    assert!(url.starts_with(&expected), "link {url:?}");
    url[expected.len()..].to_owned()
}

/// POST /console/api/link as the app does; the session cookie's
/// `name=value` when it worked.
async fn redeem(server: &TestServer, secret: &str) -> (StatusCode, Option<String>) {
    let response = http()
        .post(format!("{}/console/api/link", server.http_url()))
        .header("X-VaultGuard-CSRF", "1")
        .header("Origin", server.http_url())
        .json(&serde_json::json!({ "secret": secret }))
        .send()
        .await
        .expect("POST link");
    let cookie = set_cookie(response.headers(), "vg_console").map(|(pair, _)| pair);
    (response.status(), cookie)
}

async fn me(server: &TestServer, cookie: &str) -> (StatusCode, Value) {
    let response = http()
        .get(format!("{}/console/api/me", server.http_url()))
        .header("Cookie", cookie)
        .send()
        .await
        .expect("GET me");
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn console_token(server: &TestServer, cookie: &str) -> (StatusCode, Value) {
    let response = http()
        .post(format!("{}/console/api/token", server.http_url()))
        .header("Cookie", cookie)
        .header("X-VaultGuard-CSRF", "1")
        .send()
        .await
        .expect("POST token");
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// A console access token of a person of `tenant_id` with `roles`, signed
/// in by a one-time link.
async fn signed_in_token(server: &TestServer, tenant_id: &str, roles: &[&str]) -> String {
    let secret = link_secret(server, tenant_id, roles).await;
    let cookie = redeem(server, &secret).await.1.expect("cookie");
    console_token(server, &cookie).await.1["access_token"]
        .as_str()
        .expect("token")
        .to_owned()
}

/// How many `event_type` events `tenant_id`'s log holds.
async fn events(server: &TestServer, tenant_id: &str, event_type: &str) -> usize {
    server.audit_events(tenant_id, event_type).await.len()
}

/// One unary gRPC-Web call on the HTTP listener: the grpc-status and the
/// message, decoded.
async fn grpc_web<Req: Message, Res: Message + Default>(
    server: &TestServer,
    method: &str,
    bearer: Option<&str>,
    request: &Req,
) -> (i32, Option<Res>) {
    let (status, message) = grpc_web_bytes(server, method, bearer, request.encode_to_vec()).await;
    (
        status,
        message.map(|bytes| Res::decode(&bytes[..]).expect("decode message")),
    )
}

/// [`grpc_web`] on an encoded request; the answer's message undecoded.
async fn grpc_web_bytes(
    server: &TestServer,
    method: &str,
    bearer: Option<&str>,
    body: Vec<u8>,
) -> (i32, Option<Vec<u8>>) {
    let mut framed = vec![0u8];
    framed.extend_from_slice(&u32::try_from(body.len()).expect("len").to_be_bytes());
    framed.extend_from_slice(&body);
    let mut call = http()
        .post(format!("{}/vaultguard.v1.{method}", server.http_url()))
        .header("Content-Type", "application/grpc-web+proto")
        .header("X-Grpc-Web", "1")
        .body(framed);
    if let Some(token) = bearer {
        call = call.bearer_auth(token);
    }
    let response = call.send().await.expect("gRPC-Web call");
    assert_eq!(response.status(), StatusCode::OK, "gRPC-Web answers 200");
    let header_status = response
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok());
    let bytes = response.bytes().await.expect("body");
    let (mut message, mut status) = (None, header_status);
    let mut rest = &bytes[..];
    while rest.len() >= 5 {
        let flag = rest[0];
        let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        let frame = &rest[5..5 + len];
        if flag & 0x80 == 0 {
            message = Some(frame.to_vec());
        } else {
            let trailers = String::from_utf8_lossy(frame);
            status = trailers
                .lines()
                .find_map(|line| line.strip_prefix("grpc-status:"))
                .and_then(|v| v.trim().parse().ok());
        }
        rest = &rest[5 + len..];
    }
    (status.expect("a grpc-status"), message)
}

#[tokio::test]
async fn the_console_is_served_from_the_binary_with_strict_headers() {
    let server = TestServer::start().await;
    let base = server.http_url();
    for page in [
        "/console/",
        "/console/approvals/stp_123",
        "/console/admin/agents",
        "/console/link",
    ] {
        let response = get(format!("{base}{page}")).await;
        assert_eq!(response.status(), StatusCode::OK, "{page}");
        let headers = response.headers().clone();
        let csp = headers["content-security-policy"].to_str().expect("csp");
        assert!(csp.contains("script-src 'self'"), "{csp}");
        assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
        assert!(!csp.contains("unsafe-inline"), "{csp}");
        assert_eq!(headers["x-content-type-options"], "nosniff");
        assert_eq!(headers["x-frame-options"], "DENY");
        assert_eq!(headers["referrer-policy"], "no-referrer");
        assert!(
            headers["content-type"]
                .to_str()
                .expect("type")
                .starts_with("text/html")
        );
        let html = response.text().await.expect("html");
        assert!(
            html.contains("/console/assets/app.js"),
            "the app's page: {html}"
        );
        assert!(!html.contains("<script>"), "no inline script");
    }
    let js = get(format!("{base}/console/assets/app.js")).await;
    assert_eq!(js.status(), StatusCode::OK);
    assert!(
        js.headers()["content-type"]
            .to_str()
            .expect("type")
            .starts_with("text/javascript")
    );
    let css = get(format!("{base}/console/assets/app.css")).await;
    assert!(
        css.headers()["content-type"]
            .to_str()
            .expect("type")
            .starts_with("text/css")
    );
    for missing in [
        "/console/assets/../../etc/passwd",
        "/console/assets/nope.js",
        "/console/api/nope",
    ] {
        let response = get(format!("{base}{missing}")).await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{missing}");
    }
    let bare = get(format!("{base}/console")).await;
    assert_eq!(bare.status(), StatusCode::PERMANENT_REDIRECT);
    assert_eq!(bare.headers()["x-frame-options"], "DENY", "redirects too");
    assert_eq!(bare.headers()[LOCATION], "/console/");
    // Without a session the app is told to sign in; no issuer is configured.
    let (status, _) = me(&server, "vg_console=nothing").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let issuers: Value = get(format!("{base}/console/api/issuers"))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(issuers, serde_json::json!({"issuers": []}));
}

#[tokio::test]
async fn a_one_time_link_signs_in_once_and_the_session_mints_short_tokens() {
    let server = TestServer::start().await;
    let acme = server.create_tenant("acme").await;
    let secret = link_secret(&server, &acme.id, &["approver", "auditor"]).await;
    assert_eq!(events(&server, &acme.id, "console.link_created").await, 1);

    let (status, cookie) = redeem(&server, &secret).await;
    assert_eq!(status, StatusCode::OK);
    let cookie = cookie.expect("session cookie");
    // The cookie: HttpOnly, SameSite=Strict, scoped to the console.
    let response = http()
        .post(format!("{}/console/api/link", server.http_url()))
        .header("X-VaultGuard-CSRF", "1")
        .json(&serde_json::json!({ "secret": link_secret(&server, &acme.id, &["approver"]).await }))
        .send()
        .await
        .expect("POST link");
    let (_, whole) = set_cookie(response.headers(), "vg_console").expect("cookie");
    assert!(whole.contains("HttpOnly"), "{whole}");
    assert!(whole.contains("SameSite=Strict"), "{whole}");
    assert!(whole.contains("Path=/console"), "{whole}");

    // Used once: the same link again signs nobody in.
    let (again, no_cookie) = redeem(&server, &secret).await;
    assert_eq!(again, StatusCode::UNAUTHORIZED);
    assert!(no_cookie.is_none());

    let (status, who) = me(&server, &cookie).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(who["tenant_id"], acme.id.as_str());
    assert_eq!(who["tenant_name"], acme.display_name.as_str());
    assert_eq!(who["subject"], "ops@acme");
    assert_eq!(who["roles"], serde_json::json!(["approver", "auditor"]));

    let (status, token) = console_token(&server, &cookie).await;
    assert_eq!(status, StatusCode::OK);
    let expires_in = token["expires_in"].as_u64().expect("expires_in");
    assert!((1..=600).contains(&expires_in), "{expires_in}");
    let access = token["access_token"].as_str().expect("token").to_owned();

    // The token is an ordinary API token of the session's tenant and roles,
    // over gRPC-Web on the HTTP listener as over gRPC.
    let (code, answer) = grpc_web::<_, pb::WhoAmIResponse>(
        &server,
        "AuthService/WhoAmI",
        Some(&access),
        &pb::WhoAmIRequest {},
    )
    .await;
    assert_eq!(code, 0);
    let actor = answer.expect("WhoAmI answer").actor.expect("actor");
    assert_eq!(actor.tenant_id, acme.id);
    assert_eq!(actor.subject, "ops@acme");
    let over_grpc = crate::oidc::who_am_i(&server, &access)
        .await
        .expect("WhoAmI over gRPC");
    assert_eq!(over_grpc.actor.expect("actor").tenant_id, acme.id);
    assert_eq!(
        over_grpc.roles,
        vec![pb::Role::Approver as i32, pb::Role::Auditor as i32]
    );

    // Signing out ends the session: no more tokens, no more `me`.
    let response = http()
        .post(format!("{}/console/api/logout", server.http_url()))
        .header("Cookie", &cookie)
        .header("X-VaultGuard-CSRF", "1")
        .send()
        .await
        .expect("logout");
    assert_eq!(response.status(), StatusCode::OK);
    let (cleared, _) = set_cookie(response.headers(), "vg_console").expect("cleared cookie");
    assert_eq!(cleared, "vg_console=");
    assert_eq!(me(&server, &cookie).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(
        console_token(&server, &cookie).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(events(&server, &acme.id, "console.signed_in").await, 2);
    assert_eq!(events(&server, &acme.id, "console.signed_out").await, 1);
    // The log holds hashes, never a secret.
    for event in server.audit_events(&acme.id, "console.link_created").await {
        assert!(!event.details.contains(&secret), "secret in the audit log");
    }
    assert!(
        !vaultguard_tests::captured_logs().contains(&secret),
        "secret in the log"
    );
}

#[tokio::test]
async fn links_expire_and_refuse_what_they_cannot_be() {
    let server = TestServer::start().await;
    let acme = server.create_tenant("acme").await;
    let secret = link_secret(&server, &acme.id, &["approver"]).await;
    server.clock.advance(301_000);
    assert_eq!(redeem(&server, &secret).await.0, StatusCode::UNAUTHORIZED);

    // The CLI refuses roles a console has no use for, unknown tenants and
    // silly lifetimes, and writes nothing.
    let links = server.count("console_links").await;
    for args in [
        vec!["--tenant", "tnt_missing", "--role", "approver"],
        vec![
            "--tenant",
            acme.id.as_str(),
            "--role",
            "approver",
            "--ttl-seconds",
            "0",
        ],
        vec![
            "--tenant",
            acme.id.as_str(),
            "--role",
            "approver",
            "--subject",
            "",
        ],
    ] {
        let output = console_link(&server, &args).await;
        assert!(!output.status.success(), "{args:?} was accepted");
    }
    let operator = console_link(&server, &["--tenant", &acme.id, "--role", "operator"]).await;
    assert!(!operator.status.success(), "an operator link was made");
    assert_eq!(server.count("console_links").await, links);

    // Garbage and oversized secrets sign nobody in and write nothing.
    let sessions = server.count("console_sessions").await;
    for secret in ["", "x", &"A".repeat(10_000), "<script>alert(1)</script>"] {
        assert_eq!(
            redeem(&server, secret).await.0,
            StatusCode::UNAUTHORIZED,
            "{secret:.20}"
        );
    }
    let csrf = ("X-VaultGuard-CSRF", "1");
    let not_json = post_body(&server, "/console/api/link", csrf, "secret=abc").await;
    assert_eq!(not_json.status(), StatusCode::BAD_REQUEST);
    let problem: Value = not_json.json().await.expect("json");
    assert_eq!(problem["field"], "secret");
    assert_eq!(server.count("console_sessions").await, sessions);
}

#[tokio::test]
async fn console_posts_without_the_csrf_header_or_from_another_origin_are_refused() {
    let server = TestServer::start().await;
    let acme = server.create_tenant("acme").await;
    let secret = link_secret(&server, &acme.id, &["approver"]).await;
    let url = format!("{}/console/api/link", server.http_url());
    // A cross-site form post: no custom header possible.
    let form = http()
        .post(&url)
        .header("Content-Type", "text/plain")
        .header("Origin", "https://evil.example")
        .body(format!("{{\"secret\":\"{secret}\"}}"))
        .send()
        .await
        .expect("POST");
    assert_eq!(form.status(), StatusCode::FORBIDDEN);
    // The header, but from another origin.
    let foreign = http()
        .post(&url)
        .header("X-VaultGuard-CSRF", "1")
        .header("Origin", "https://evil.example")
        .json(&serde_json::json!({ "secret": secret }))
        .send()
        .await
        .expect("POST");
    assert_eq!(foreign.status(), StatusCode::FORBIDDEN);
    assert_eq!(server.count("console_sessions").await, 0);
    // The link was not spent by the refused attempts.
    let (status, cookie) = redeem(&server, &secret).await;
    assert_eq!(status, StatusCode::OK);
    let cookie = cookie.expect("cookie");
    for path in ["token", "logout"] {
        let refused = http()
            .post(format!("{}/console/api/{path}", server.http_url()))
            .header("Cookie", &cookie)
            .send()
            .await
            .expect("POST");
        assert_eq!(refused.status(), StatusCode::FORBIDDEN, "{path}");
    }
    assert_eq!(
        me(&server, &cookie).await.0,
        StatusCode::OK,
        "session untouched"
    );
}

#[tokio::test]
async fn grpc_web_calls_meet_the_same_authentication_roles_and_tenant_walls() {
    let server = TestServer::start().await;
    let acme = server.create_tenant("acme").await;
    let beta = server.create_tenant("beta").await;
    let (agent, _, _) = server.create_agent(&acme.id, "crm-bot").await;
    // An auditor's session token may not approve; another tenant's admin
    // sees nothing of acme's agents; no credential is no caller.
    let auditor = signed_in_token(&server, &acme.id, &["auditor"]).await;
    let beta_admin = signed_in_token(&server, &beta.id, &["admin"]).await;
    let approve = pb::ApproveStepUpRequest {
        step_up_id: "stp_x".to_owned(),
        ..Default::default()
    };
    let get_agent = pb::GetAgentRequest {
        agent_id: agent.id.clone(),
    };
    for (method, bearer, request, expected) in [
        (
            "AuthService/WhoAmI",
            None,
            pb::WhoAmIRequest {}.encode_to_vec(),
            tonic::Code::Unauthenticated,
        ),
        (
            "StepUpService/ApproveStepUp",
            Some(auditor.as_str()),
            approve.encode_to_vec(),
            tonic::Code::PermissionDenied,
        ),
        (
            "AgentService/GetAgent",
            Some(beta_admin.as_str()),
            get_agent.encode_to_vec(),
            tonic::Code::NotFound,
        ),
    ] {
        let (code, _) = grpc_web_bytes(&server, method, bearer, request).await;
        assert_eq!(code, expected as i32, "{method}");
    }
    // Anything else on the HTTP listener that is not gRPC-Web is 404.
    let json = ("Content-Type", "application/json");
    let plain = post_body(&server, "/vaultguard.v1.AuthService/WhoAmI", json, "{}").await;
    assert_eq!(plain.status(), StatusCode::NOT_FOUND);
}

/// A server with a console client at a local issuer; tenant acme bound to
/// the issuer's `org_acme`.
async fn with_issuer() -> (LocalIssuer, TestServer, pb::Tenant) {
    let issuer = LocalIssuer::start("key-1").await;
    let server = TestServer::start_with(TestOptions {
        trusted_issuers: vec![issuer.trusted_with_console(CLIENT_ID)],
        ..Default::default()
    })
    .await;
    let acme = server.create_tenant("acme").await;
    bind(&server, &acme.id, &issuer.url, ORG_ACME).await;
    (issuer, server, acme)
}

/// The browser's round trip: /console/login → the issuer → the callback.
/// Returns the callback's answer and the login cookie the browser kept.
async fn sign_in(server: &TestServer) -> (reqwest::Response, String) {
    let start = get(format!("{}/console/login?issuer=0", server.http_url())).await;
    assert_eq!(start.status(), StatusCode::SEE_OTHER);
    let (login_cookie, whole) =
        set_cookie(start.headers(), "vg_console_login").expect("login cookie");
    assert!(
        whole.contains("HttpOnly") && whole.contains("SameSite=Lax"),
        "{whole}"
    );
    let authorize = start.headers()[LOCATION]
        .to_str()
        .expect("location")
        .to_owned();
    let parsed = url::Url::parse(&authorize).expect("authorize URL");
    let query: std::collections::HashMap<_, _> = parsed.query_pairs().into_owned().collect();
    assert_eq!(query["client_id"], CLIENT_ID);
    assert_eq!(query["code_challenge_method"], "S256");
    assert_eq!(query["scope"], "openid vaultguard");
    assert_eq!(
        query["redirect_uri"],
        format!("{}/console/callback", server.http_url())
    );
    assert!(!query["nonce"].is_empty() && !query["state"].is_empty());
    let at_issuer = get(&authorize).await;
    assert_eq!(at_issuer.status(), StatusCode::FOUND);
    let callback = at_issuer.headers()[LOCATION]
        .to_str()
        .expect("callback")
        .to_owned();
    let answer = http()
        .get(&callback)
        .header("Cookie", &login_cookie)
        .send()
        .await
        .expect("callback");
    (answer, callback)
}

#[tokio::test]
async fn an_issuer_sign_in_maps_organisation_and_roles_like_a_bearer_token() {
    let (issuer, server, acme) = with_issuer().await;
    let issuers: Value = get(format!("{}/console/api/issuers", server.http_url()))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(
        issuers,
        serde_json::json!({"issuers": [{"index": 0, "display_name": "Acme SSO"}]})
    );
    issuer.set_user("auth0|alice", ORG_ACME, &["approver", "operator", "agent"]);
    let (answer, _) = sign_in(&server).await;
    assert_eq!(answer.status(), StatusCode::SEE_OTHER);
    assert_eq!(answer.headers()[LOCATION], "/console/");
    let (session, whole) = set_cookie(answer.headers(), "vg_console").expect("session cookie");
    assert!(
        whole.contains("SameSite=Strict") && whole.contains("HttpOnly"),
        "{whole}"
    );
    let (status, who) = me(&server, &session).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(who["tenant_id"], acme.id.as_str());
    assert_eq!(who["subject"], "auth0|alice");
    // Operator and agent are never a human's from an issuer.
    assert_eq!(who["roles"], serde_json::json!(["approver"]));
    assert_eq!(issuer.codes_redeemed(), 1);
    assert_eq!(events(&server, &acme.id, "console.signed_in").await, 1);

    // Unbinding the organisation ends the session at its next token.
    assert_eq!(console_token(&server, &session).await.0, StatusCode::OK);
    unbind(&server, &acme.id, &issuer.url, ORG_ACME).await;
    assert_eq!(
        console_token(&server, &session).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(me(&server, &session).await.0, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn an_issuer_sign_in_is_refused_without_role_binding_or_the_browser_that_began_it() {
    let (issuer, server, _acme) = with_issuer().await;
    // No VaultGuard role.
    issuer.set_user("auth0|bob", ORG_ACME, &["viewer"]);
    let (answer, _) = sign_in(&server).await;
    assert_eq!(answer.status(), StatusCode::FORBIDDEN);
    assert!(
        set_cookie(answer.headers(), "vg_console").is_none_or(|(pair, _)| pair == "vg_console=")
    );
    // An organisation bound to no tenant.
    issuer.set_user("auth0|carol", ORG_BETA, &["admin"]);
    let (answer, _) = sign_in(&server).await;
    assert_eq!(answer.status(), StatusCode::FORBIDDEN);
    let page = answer.text().await.expect("page");
    assert!(
        page.contains("not connected to a VaultGuard tenant"),
        "{page}"
    );
    assert_eq!(server.count("console_sessions").await, 0);

    // Login CSRF: a callback URL carried to another browser (no login
    // cookie) signs nobody in, and is spent for nobody either.
    issuer.set_user("auth0|mallory", ORG_ACME, &["admin"]);
    let start = get(format!("{}/console/login?issuer=0", server.http_url())).await;
    let authorize = start.headers()[LOCATION]
        .to_str()
        .expect("location")
        .to_owned();
    let at_issuer = get(&authorize).await;
    let callback = at_issuer.headers()[LOCATION]
        .to_str()
        .expect("callback")
        .to_owned();
    let victim = get(&callback).await;
    assert_eq!(victim.status(), StatusCode::BAD_REQUEST);
    assert!(
        set_cookie(victim.headers(), "vg_console").is_none_or(|(pair, _)| pair == "vg_console=")
    );
    assert_eq!(server.count("console_sessions").await, 0);

    // A replayed callback is refused.
    issuer.set_user("auth0|alice", ORG_ACME, &["approver"]);
    let (answer, callback) = sign_in(&server).await;
    assert_eq!(answer.status(), StatusCode::SEE_OTHER);
    let replay = get(&callback).await;
    assert_eq!(replay.status(), StatusCode::BAD_REQUEST);
    assert_eq!(server.count("console_sessions").await, 1);

    // Hostile or unknown input: clear refusals, nothing written.
    for (path, status) in [
        ("/console/login?issuer=abc", StatusCode::BAD_REQUEST),
        ("/console/login?issuer=7", StatusCode::NOT_FOUND),
        (
            "/console/callback?error=access_denied&state=x",
            StatusCode::BAD_REQUEST,
        ),
        ("/console/callback?code=x", StatusCode::BAD_REQUEST),
        (
            "/console/callback?code=%3Cscript%3E&state=%3Cimg%20src%3Dx%3E",
            StatusCode::BAD_REQUEST,
        ),
    ] {
        let response = http()
            .get(format!("{}{path}", server.http_url()))
            .header("Cookie", "vg_console_login=%3Cimg%20src%3Dx%3E")
            .send()
            .await
            .expect("GET");
        assert_eq!(response.status(), status, "{path}");
        assert_eq!(
            response.headers()["content-security-policy"],
            vaultguard_server::console::CSP,
            "{path}"
        );
        let page = response.text().await.expect("page");
        assert!(
            !page.contains("<script>") && !page.contains("<img"),
            "{page}"
        );
    }
    assert_eq!(server.count("console_sessions").await, 1);
}
