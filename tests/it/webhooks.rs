//! Approval webhooks end to end: SetApprovalWebhook / GetApprovalWebhook
//! (the secret shown once, bad URLs, tenants, roles) and delivery to a real
//! local receiver (axum on 127.0.0.1:0): a STEP_UP request is POSTed as a
//! signed `step_up.added` carrying ids only; failures (503, nothing
//! listening) are retried with the same delivery id after the back-off; a
//! change that keeps failing is skipped after the maximum attempts. Back-off
//! waits are skipped by moving the server's clock, not by sleeping.

use std::str::FromStr;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tonic::Code;
use vaultguard_client::{DelegationOutcome, VaultGuardClient, pb};
use vaultguard_server::clock::Clock;
use vaultguard_server::domain::webhooks;
use vaultguard_server::store::entities::{step_up_change, tenant_webhook};
use vaultguard_tests::{TestServer, captured_logs, expect_code, expect_invalid};

use crate::delegations::{Pair, ask, setup_pair};
use crate::policies::{add_rule, context, inbound, text};
use vaultguard_tests::Rpc;
use vaultguard_tests::calls::{get_webhook, set_webhook, webhook};

/// What the requester tells the approvers; must never reach a webhook.
const BINDING_MESSAGE: &str = "pay invoice 7 to ACME-WIRE-4411";
/// A context value; must never reach a webhook.
const CONTEXT_VALUE: &str = "iban-DE89370400440532013000";

// ---------------------------------------------------------------------------
// A local webhook receiver.

/// One request the receiver got, and the status it answered.
#[derive(Debug, Clone)]
struct Delivery {
    headers: HeaderMap,
    body: Vec<u8>,
    answered: u16,
}

impl Delivery {
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .unwrap_or_else(|| panic!("no {name} header in {:?}", self.headers))
            .to_str()
            .expect("ascii header")
    }

    fn id(&self) -> &str {
        self.header("x-vaultguard-delivery")
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("json body")
    }
}

#[derive(Debug)]
struct Shared {
    answer: AtomicU16,
    /// How long the receiver takes to answer, in ms (0: at once).
    delay_ms: AtomicU64,
    deliveries: Mutex<Vec<Delivery>>,
}

pub(crate) struct Receiver {
    pub(crate) url: String,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn receive(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> StatusCode {
    let answer = shared.answer.load(Ordering::SeqCst);
    shared.deliveries.lock().unwrap().push(Delivery {
        headers,
        body: body.to_vec(),
        answered: answer,
    });
    let delay = shared.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    StatusCode::from_u16(answer).unwrap()
}

impl Receiver {
    /// A receiver on a free port, answering 200.
    pub(crate) async fn start() -> Self {
        Self::serve(
            TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind receiver"),
        )
    }

    /// A receiver on `port`, answering 200.
    async fn start_on(port: u16) -> Self {
        Self::serve(
            TcpListener::bind(("127.0.0.1", port))
                .await
                .expect("bind receiver on its old port"),
        )
    }

    fn serve(listener: TcpListener) -> Self {
        let addr = listener.local_addr().expect("receiver addr");
        let shared = Arc::new(Shared {
            answer: AtomicU16::new(200),
            delay_ms: AtomicU64::new(0),
            deliveries: Mutex::new(Vec::new()),
        });
        let router = Router::new()
            .route("/hooks/vaultguard", post(receive))
            .with_state(shared.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Self {
            url: format!("http://{addr}/hooks/vaultguard"),
            shared,
            task,
        }
    }

    /// Answers `status` from now on.
    fn answer(&self, status: u16) {
        self.shared.answer.store(status, Ordering::SeqCst);
    }

    /// Answers only after `delay` from now on (the request is recorded as
    /// it arrives).
    fn delay(&self, delay: Duration) {
        self.shared
            .delay_ms
            .store(u64::try_from(delay.as_millis()).unwrap(), Ordering::SeqCst);
    }

    fn deliveries(&self) -> Vec<Delivery> {
        self.shared.deliveries.lock().unwrap().clone()
    }

    /// Waits until some delivery satisfies `want`; returns them all.
    async fn wait_until(&self, what: &str, want: impl Fn(&[Delivery]) -> bool) -> Vec<Delivery> {
        for _ in 0..400 {
            let deliveries = self.deliveries();
            if want(&deliveries) {
                return deliveries;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the receiver never got {what}: {:?}", self.deliveries());
    }

    async fn wait_for(&self, count: usize) -> Vec<Delivery> {
        self.wait_until(&format!("{count} deliveries"), |d| d.len() >= count)
            .await
    }
}

/// A port nothing listens on (bound, then released).
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

// ---------------------------------------------------------------------------
// StepUpService calls and checks.

/// Sets `url` and returns the webhook and its secret.
async fn set_ok(admin: &VaultGuardClient, url: &str) -> (pb::ApprovalWebhook, String) {
    let response = set_webhook(admin, url).await.expect("set webhook");
    (response.webhook.expect("webhook"), response.signing_secret)
}

/// Asserts `secret` is `whsec_` and the base64url of 32 bytes.
#[track_caller]
fn assert_secret(secret: &str) {
    let random = secret
        .strip_prefix("whsec_")
        .unwrap_or_else(|| panic!("secret {secret:?} lacks whsec_"));
    assert_eq!(URL_SAFE_NO_PAD.decode(random).expect("base64url").len(), 32);
}

/// Checks `delivery`'s signature with `secret` as a receiver would: the
/// HMAC over "<t>.<raw body>", compared in constant time; returns `t`.
#[track_caller]
fn verify_signature(delivery: &Delivery, secret: &str) -> i64 {
    let header = delivery.header("x-vaultguard-signature");
    let (t, v1) = header
        .split_once(',')
        .and_then(|(t, v1)| Some((t.strip_prefix("t=")?, v1.strip_prefix("v1=")?)))
        .unwrap_or_else(|| panic!("malformed signature header {header:?}"));
    assert!(
        v1.len() == 64
            && v1
                .chars()
                .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c)),
        "v1 is not lowercase hex: {v1}"
    );
    let mac: Vec<u8> = (0..32)
        .map(|i| u8::from_str_radix(&v1[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    let mut signed = format!("{t}.").into_bytes();
    signed.extend_from_slice(&delivery.body);
    let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, secret.as_bytes());
    aws_lc_rs::hmac::verify(&key, &signed, &mac).expect("signature verifies with the secret");
    t.parse().expect("t is unix seconds")
}

/// Globex makes every `pay.*` request a step-up.
async fn globex_steps_up(pair: &Pair) {
    add_rule(&pair.globex_admin, inbound("pay.*", pb::Effect::StepUp)).await;
}

/// Asks globex for `pay.invoice` (a step-up) with a binding message and
/// context; returns the pending delegation.
async fn request_step_up(pair: &Pair) -> pb::Delegation {
    let request = pb::RequestDelegationRequest {
        binding_message: BINDING_MESSAGE.to_owned(),
        context: context(&[("invoice", text(CONTEXT_VALUE))]),
        ..ask(&pair.globex.id, "pay.invoice")
    };
    match pair.agent.request_delegation(request).await {
        Ok(DelegationOutcome::StepUp { challenge, .. }) => {
            challenge.delegation.expect("delegation")
        }
        other => panic!("expected STEP_UP, got {other:?}"),
    }
}

/// The change rows of `tenant_id`'s feed, oldest first.
async fn changes(server: &TestServer, tenant_id: &str) -> Vec<step_up_change::Model> {
    step_up_change::Entity::find()
        .filter(step_up_change::Column::TenantId.eq(tenant_id))
        .order_by_asc(step_up_change::Column::Id)
        .all(&server.state.db)
        .await
        .unwrap()
}

/// The delivery id of the `kind` change of `step_up_id`.
async fn delivery_id(server: &TestServer, tenant_id: &str, step_up_id: &str, kind: &str) -> String {
    let change = changes(server, tenant_id)
        .await
        .into_iter()
        .find(|c| c.step_up_id == step_up_id && c.kind.as_str() == kind)
        .unwrap_or_else(|| panic!("no {kind} change for {step_up_id}"));
    format!("chg_{}", change.id)
}

async fn stored(server: &TestServer, tenant_id: &str) -> Option<tenant_webhook::Model> {
    tenant_webhook::Entity::find_by_id(tenant_id.to_owned())
        .one(&server.state.db)
        .await
        .unwrap()
}

/// Waits until GetApprovalWebhook satisfies `want`; returns it.
async fn wait_webhook(
    admin: &VaultGuardClient,
    what: &str,
    want: impl Fn(&pb::ApprovalWebhook) -> bool,
) -> pb::ApprovalWebhook {
    for _ in 0..400 {
        let current = webhook(admin).await;
        if want(&current) {
            return current;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "the webhook never showed {what}: {:?}",
        webhook(admin).await
    );
}

// ---------------------------------------------------------------------------
// Configuration.

#[tokio::test]
async fn set_shows_the_secret_once_and_get_never_does() {
    let server = TestServer::start().await;
    let acme = server.create_tenant("acme").await;
    let admin = server.admin(&acme.id, "alice").await;
    expect_code(get_webhook(&admin).await, Code::NotFound);
    let before = server.clock.now_millis();

    let url = "http://hooks.example.com/vaultguard?team=payments";
    let (hook, secret) = set_ok(&admin, url).await;
    assert_secret(&secret);
    assert_eq!(hook.url, url);
    assert!(hook.secret_set);
    let set_time = hook.update_time.expect("update_time");
    assert!(set_time.seconds >= before / 1000 - 1);
    assert!(hook.last_success_time.is_none() && hook.last_failure_time.is_none());
    assert_eq!(hook.last_failure_reason, "");

    // Get shows the same webhook, and the secret appears nowhere in it.
    let got = get_webhook(&admin).await.unwrap();
    assert_eq!(got.webhook.as_ref(), Some(&hook));
    let encoded = prost::Message::encode_to_vec(&got);
    let random = secret.strip_prefix("whsec_").unwrap();
    assert!(
        !String::from_utf8_lossy(&encoded).contains(random),
        "GetApprovalWebhook leaked the secret"
    );
    // Stored sealed: the database row does not hold it either.
    let row = stored(&server, &acme.id).await.expect("row");
    assert!(
        !String::from_utf8_lossy(&row.secret_ciphertext).contains(random)
            && !row.secret_ciphertext.is_empty()
    );

    // Setting again replaces URL and secret.
    let (again, second) = set_ok(&admin, "https://hooks.example.org/other").await;
    assert_secret(&second);
    assert_ne!(second, secret);
    assert_eq!(again.url, "https://hooks.example.org/other");
    assert_eq!(webhook(&admin).await, again);

    // An empty URL removes it; removing nothing is not an error.
    let removed = set_webhook(&admin, "").await.unwrap();
    assert!(removed.webhook.is_none());
    assert_eq!(removed.signing_secret, "");
    expect_code(get_webhook(&admin).await, Code::NotFound);
    set_webhook(&admin, "").await.unwrap();
    assert!(stored(&server, &acme.id).await.is_none());

    // Audited in the tenant's log with the host only.
    let set_events = server.audit_events(&acme.id, "webhook.set").await;
    assert_eq!(set_events.len(), 2);
    let removed_events = server.audit_events(&acme.id, "webhook.removed").await;
    assert_eq!(removed_events.len(), 1);
    for event in set_events.iter().chain(&removed_events) {
        assert_eq!(event.actor_subject, "alice");
        assert!(!event.details.contains("whsec_"), "{}", event.details);
        assert!(!event.details.contains(random) && !event.details.contains("team=payments"));
    }
    assert!(set_events[0].details.contains("hooks.example.com"));
    assert!(removed_events[0].details.contains("hooks.example.org"));
    for secret in [&secret, &second] {
        assert!(!captured_logs().contains(secret.as_str()), "secret logged");
    }
    server.stop().await;
}

#[tokio::test]
async fn bad_urls_are_refused_naming_url_and_write_nothing() {
    let server = TestServer::start().await;
    let acme = server.create_tenant("acme").await;
    let admin = server.admin(&acme.id, "alice").await;
    let too_long = format!("https://hooks.example.com/{}", "a".repeat(2049 - 26));
    assert_eq!(too_long.chars().count(), 2049);
    for bad in [
        "ftp://hooks.example.com/vaultguard",
        "/hooks/vaultguard",
        "hooks.example.com/vaultguard",
        "https://",
        "https:///nohost",
        "javascript:alert(1)",
        "https://user:password@hooks.example.com/",
        " https://hooks.example.com/",
        too_long.as_str(),
    ] {
        expect_invalid(set_webhook(&admin, bad).await, "url");
    }
    assert_eq!(server.count("tenant_webhooks").await, 0);
    assert!(
        server
            .audit_events(&acme.id, "webhook.set")
            .await
            .is_empty()
    );

    // 2048 characters is still fine.
    let longest = &too_long[..2048];
    assert_eq!(set_ok(&admin, longest).await.0.url, longest);
    // A refused URL leaves the current webhook as it was.
    let current = webhook(&admin).await;
    expect_invalid(set_webhook(&admin, "ftp://x.example/").await, "url");
    assert_eq!(webhook(&admin).await, current);
    server.stop().await;
}

#[tokio::test]
async fn only_admins_of_the_tenant_manage_its_webhook() {
    let pair = setup_pair().await;
    vaultguard_tests::parts!(pair => server, acme, globex, agent, acme_admin, globex_admin);
    let (acme_hook, _) = set_ok(acme_admin, "https://hooks.acme.example/vg").await;

    // Other roles of the same tenant may neither set nor read it.
    let approver = server.approver(&acme.id, "ann").await;
    let auditor = server.human(&acme.id, "aud", &[pb::Role::Auditor]).await;
    let operator = server.operator().await;
    for (who, client) in [
        ("agent", agent),
        ("approver", &approver),
        ("auditor", &auditor),
        ("operator", &operator),
    ] {
        for (rpc, result) in [
            (
                "Set",
                set_webhook(client, "https://evil.example/")
                    .await
                    .map(|_| ()),
            ),
            ("Remove", set_webhook(client, "").await.map(|_| ())),
            ("Get", get_webhook(client).await.map(|_| ())),
        ] {
            let err = expect_code(result, Code::PermissionDenied);
            assert_eq!(
                err.reason(),
                Some(pb::ErrorReason::RoleRequired),
                "{who} {rpc}"
            );
        }
    }

    // Another tenant's admin sees no webhook, and setting and removing its
    // own leaves acme's untouched.
    expect_code(get_webhook(globex_admin).await, Code::NotFound);
    let (globex_hook, _) = set_ok(globex_admin, "https://hooks.globex.example/vg").await;
    assert_eq!(webhook(globex_admin).await, globex_hook);
    assert_eq!(webhook(acme_admin).await, acme_hook);
    set_webhook(globex_admin, "").await.unwrap();
    expect_code(get_webhook(globex_admin).await, Code::NotFound);
    assert_eq!(webhook(acme_admin).await, acme_hook);
    assert_eq!(
        server
            .audit_events(&globex.id, "webhook.removed")
            .await
            .len(),
        1
    );
    assert!(
        server
            .audit_events(&acme.id, "webhook.removed")
            .await
            .is_empty()
    );
    pair.server.stop().await;
}

// ---------------------------------------------------------------------------
// Delivery.

#[tokio::test]
async fn a_step_up_is_delivered_signed_with_ids_only() {
    let pair = setup_pair().await;
    vaultguard_tests::parts!(pair => server, acme, globex, acme_admin, globex_admin);
    globex_steps_up(&pair).await;
    // A step-up from before the webhook existed is not replayed.
    let old = request_step_up(&pair).await;

    let receiver = Receiver::start().await;
    let bystander = Receiver::start().await;
    let (_, secret) = set_ok(globex_admin, &receiver.url).await;
    // The requesting tenant's webhook hears nothing of globex's queue.
    set_ok(acme_admin, &bystander.url).await;

    let delegation = request_step_up(&pair).await;
    let deliveries = receiver.wait_for(1).await;
    let delivery = &deliveries[0];
    assert_eq!(delivery.answered, 200);
    assert_eq!(delivery.header("content-type"), "application/json");
    assert_eq!(delivery.header("x-vaultguard-event"), "step_up.added");
    assert_eq!(
        delivery.id(),
        delivery_id(server, &globex.id, &delegation.step_up_id, "added").await
    );
    let t = verify_signature(delivery, &secret);
    assert!((t - server.clock.now_seconds()).abs() <= 10, "t = {t}");

    let body = delivery.json();
    let mut fields: Vec<&str> = body
        .as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .collect();
    fields.sort_unstable();
    assert_eq!(
        fields,
        [
            "delegation_id",
            "event",
            "state",
            "step_up_id",
            "tenant_id",
            "time"
        ]
    );
    assert_eq!(body["event"], "step_up.added");
    assert_eq!(body["step_up_id"], delegation.step_up_id);
    assert_eq!(body["delegation_id"], delegation.id);
    assert_eq!(body["tenant_id"], globex.id);
    assert_eq!(body["state"], "STEP_UP_STATE_PENDING");
    let time = prost_types::Timestamp::from_str(body["time"].as_str().unwrap()).expect("RFC 3339");
    let created = delegation.create_time.expect("create_time");
    assert!(
        (time.seconds - created.seconds).abs() <= 1,
        "{time} vs {created:?}"
    );
    let raw = String::from_utf8_lossy(&delivery.body);
    for private in [BINDING_MESSAGE, CONTEXT_VALUE, "invoice", acme.id.as_str()] {
        assert!(
            !raw.contains(private),
            "the body carries {private:?}: {raw}"
        );
    }
    assert!(
        !deliveries
            .iter()
            .any(|d| d.json()["step_up_id"] == old.step_up_id),
        "a change from before the webhook was replayed"
    );

    // Leaving the queue (a denial) follows, in order, as `step_up.removed`.
    globex_admin
        .deny_step_up(pb::DenyStepUpRequest {
            step_up_id: delegation.step_up_id.clone(),
            reason: "no".into(),
        })
        .await
        .expect("deny");
    let deliveries = receiver.wait_for(2).await;
    let removed = &deliveries[1];
    assert_eq!(removed.header("x-vaultguard-event"), "step_up.removed");
    assert_eq!(
        removed.id(),
        delivery_id(server, &globex.id, &delegation.step_up_id, "removed").await
    );
    verify_signature(removed, &secret);
    assert_eq!(removed.json()["state"], "STEP_UP_STATE_DENIED");
    assert_eq!(removed.json()["step_up_id"], delegation.step_up_id);

    let shown = webhook(globex_admin).await;
    assert!(shown.last_success_time.is_some());
    assert!(shown.last_failure_time.is_none());
    assert!(bystander.deliveries().is_empty());
    assert!(!captured_logs().contains(&secret), "secret logged");
    pair.server.stop().await;
}

#[tokio::test]
async fn a_failed_delivery_is_retried_with_the_same_delivery_id() {
    let pair = setup_pair().await;
    vaultguard_tests::parts!(pair => server, globex, globex_admin);
    globex_steps_up(&pair).await;
    let receiver = Receiver::start().await;
    receiver.answer(503);
    let (_, secret) = set_ok(globex_admin, &receiver.url).await;

    let delegation = request_step_up(&pair).await;
    let expected_id = delivery_id(server, &globex.id, &delegation.step_up_id, "added").await;
    let first = receiver.wait_for(1).await.remove(0);
    assert_eq!(first.answered, 503);
    assert_eq!(first.id(), expected_id);
    let failed = wait_webhook(globex_admin, "the failure", |w| {
        w.last_failure_reason == "HTTP 503"
    })
    .await;
    assert!(failed.last_failure_time.is_some());
    assert!(failed.last_success_time.is_none());
    let row = stored(server, &globex.id).await.unwrap();
    assert!(row.attempts >= 1);
    assert!(row.next_attempt_at > row.last_failure_at.unwrap());

    // The receiver recovers; skipping the back-off, the same delivery comes
    // again and succeeds.
    receiver.answer(200);
    server.clock.advance(70_000);
    let deliveries = receiver
        .wait_until("a successful retry", |d| {
            d.iter().any(|d| d.answered == 200)
        })
        .await;
    let success = deliveries.iter().find(|d| d.answered == 200).unwrap();
    assert!(deliveries.len() >= 2);
    assert!(deliveries.iter().all(|d| d.id() == expected_id));
    assert_eq!(success.body, first.body);
    verify_signature(success, &secret);
    let recovered = wait_webhook(globex_admin, "the success", |w| {
        w.last_success_time.is_some()
    })
    .await;
    assert_eq!(recovered.last_failure_reason, "HTTP 503");
    assert!(recovered.last_failure_time.is_some());
    let row = stored(server, &globex.id).await.unwrap();
    assert_eq!(row.attempts, 0);
    assert_eq!(format!("chg_{}", row.delivered_change_id), expected_id);
    pair.server.stop().await;
}

#[tokio::test]
async fn an_endpoint_not_listening_yet_gets_the_change_when_it_starts() {
    let pair = setup_pair().await;
    vaultguard_tests::parts!(pair => server, globex, globex_admin);
    globex_steps_up(&pair).await;
    let port = closed_port();
    set_ok(
        globex_admin,
        &format!("http://127.0.0.1:{port}/hooks/vaultguard"),
    )
    .await;

    let delegation = request_step_up(&pair).await;
    let expected_id = delivery_id(server, &globex.id, &delegation.step_up_id, "added").await;
    let failed = wait_webhook(globex_admin, "a connection failure", |w| {
        w.last_failure_reason == "connection failed"
    })
    .await;
    assert!(failed.last_success_time.is_none());

    let receiver = Receiver::start_on(port).await;
    server.clock.advance(70_000);
    let deliveries = receiver.wait_for(1).await;
    assert_eq!(deliveries[0].id(), expected_id);
    assert_eq!(deliveries[0].json()["step_up_id"], delegation.step_up_id);
    let recovered = wait_webhook(globex_admin, "the success", |w| {
        w.last_success_time.is_some()
    })
    .await;
    assert_eq!(recovered.last_failure_reason, "connection failed");
    pair.server.stop().await;
}

#[tokio::test]
async fn a_change_failing_every_attempt_is_skipped_after_the_maximum() {
    let pair = setup_pair().await;
    vaultguard_tests::parts!(pair => server, globex, globex_admin);
    globex_steps_up(&pair).await;
    let receiver = Receiver::start().await;
    receiver.answer(500);
    set_ok(globex_admin, &receiver.url).await;
    let first = request_step_up(&pair).await;
    let second = request_step_up(&pair).await;
    let first_id = delivery_id(server, &globex.id, &first.step_up_id, "added").await;
    let second_id = delivery_id(server, &globex.id, &second.step_up_id, "added").await;

    // Each failure backs off at most 5 minutes: move the clock past it until
    // the deliverer gives up on the first change and moves to the next. The
    // receiver sees an attempt before the deliverer records its failure and
    // schedules the next one from the clock; a move that lands in between is
    // spent, so the clock moves again after half a second without an attempt.
    let max_attempts = server.state.config.webhook_max_attempts as usize;
    let mut seen = 0;
    let mut quiet = 0;
    for _ in 0..600 {
        let deliveries = receiver.deliveries();
        if deliveries.iter().any(|d| d.id() != first_id) {
            break;
        }
        quiet += 1;
        if deliveries.len() > seen || quiet >= 10 {
            seen = deliveries.len();
            quiet = 0;
            server.clock.advance(301_000);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let deliveries = receiver.deliveries();
    let attempts_at_first = deliveries.iter().filter(|d| d.id() == first_id).count();
    assert_eq!(attempts_at_first, max_attempts, "{deliveries:?}");
    assert!(
        deliveries[..max_attempts]
            .iter()
            .all(|d| d.id() == first_id),
        "delivery is ordered"
    );
    assert_eq!(deliveries[max_attempts].id(), second_id);
    assert!(captured_logs().contains("skipping the change"));

    // Tokens minted before the clock moved an hour have expired.
    let admin = server.admin(&globex.id, "gina").await;
    let shown = webhook(&admin).await;
    assert_eq!(shown.last_failure_reason, "HTTP 500");
    assert!(shown.last_success_time.is_none());
    let row = stored(server, &globex.id).await.unwrap();
    let first_change: i64 = first_id.strip_prefix("chg_").unwrap().parse().unwrap();
    assert!(row.delivered_change_id >= first_change);
    pair.server.stop().await;
}

#[tokio::test]
async fn concurrent_deliverers_deliver_each_change_once_in_order() {
    let pair = setup_pair().await;
    vaultguard_tests::parts!(pair => server, globex, globex_admin);
    globex_steps_up(&pair).await;
    let receiver = Receiver::start().await;
    let (_, secret) = set_ok(globex_admin, &receiver.url).await;

    // Four more deliverers race the server's own, as other replicas would
    // (each with tasks of its own): the claim on the tenant's row lets one
    // of them attempt a change at a time.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let racers: Vec<_> = (0..4)
        .map(|_| {
            tokio::spawn(webhooks::run_deliverer(
                server.state.clone(),
                stopped.clone(),
            ))
        })
        .collect();
    let mut expected = Vec::new();
    for _ in 0..5 {
        let delegation = request_step_up(&pair).await;
        expected.push(delivery_id(server, &globex.id, &delegation.step_up_id, "added").await);
    }
    receiver.wait_for(expected.len()).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.send(true).unwrap();
    for racer in racers {
        racer.await.unwrap();
    }
    let deliveries = receiver.deliveries();
    let ids: Vec<&str> = deliveries.iter().map(Delivery::id).collect();
    assert_eq!(ids, expected, "each change once, in order");
    for delivery in &deliveries {
        verify_signature(delivery, &secret);
    }
    let row = stored(server, &globex.id).await.unwrap();
    assert_eq!(
        format!("chg_{}", row.delivered_change_id),
        expected[expected.len() - 1]
    );
    pair.server.stop().await;
}

#[tokio::test]
async fn a_slow_tenant_endpoint_does_not_delay_another_tenants_notices() {
    let pair = setup_pair().await;
    let (initech, initech_admin) = pair.third_tenant().await;
    globex_steps_up(&pair).await;
    add_rule(&initech_admin, inbound("pay.*", pb::Effect::StepUp)).await;

    // Globex's receiver answers only after 9.9 s (within the 10 s timeout);
    // initech's answers at once.
    let slow = Receiver::start().await;
    slow.delay(Duration::from_millis(9_900));
    let fast = Receiver::start().await;
    set_ok(&pair.globex_admin, &slow.url).await;
    set_ok(&initech_admin, &fast.url).await;

    // A globex notice is in flight at its slow receiver …
    request_step_up(&pair).await;
    slow.wait_for(1).await;

    // … while initech's notice arrives within its normal latency.
    let started = std::time::Instant::now();
    let request = pb::RequestDelegationRequest {
        binding_message: BINDING_MESSAGE.to_owned(),
        ..ask(&initech.id, "pay.invoice")
    };
    let Ok(DelegationOutcome::StepUp { challenge, .. }) =
        pair.agent.request_delegation(request).await
    else {
        panic!("initech's request was not a step-up");
    };
    let step_up_id = challenge.delegation.expect("delegation").step_up_id;
    let deliveries = fast.wait_for(1).await;
    let latency = started.elapsed();
    println!(
        "initech's notice arrived {latency:?} after its request, beside globex's 9.9 s receiver"
    );
    assert_eq!(deliveries[0].json()["step_up_id"], step_up_id);
    assert!(
        latency < Duration::from_secs(3),
        "initech's notice waited {latency:?} behind globex's slow receiver"
    );
    pair.server.stop().await;
}
