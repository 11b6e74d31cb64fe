//! Step-ups end to end (CIBA poll mode plus watches): approval, denial and
//! expiry as the requesting agent's watch and poll see them; `slow_down` and
//! the interval that stays grown; quorums of distinct approvers; approvals
//! bound to the request hash and to the policy as it is at approval time;
//! who may decide (never the requester, never another tenant, never an
//! agent or an auditor) and who may poll; 16 concurrent approvals minting one
//! token; the approvers' queue watch (snapshot, live changes, resume by
//! cursor); and two server processes on one PostgreSQL database, where a
//! watcher on one sees an approval made through the other.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Barrier;
use tonic::Code;
use vaultguard_client::{ClientError, VaultGuardClient, pb};
use vaultguard_server::clock::Clock;
use vaultguard_tests::{
    Backend, PendingStepUp, StepUpWatch, TestServer, approve_step_up, backend, expect_code,
    expect_invalid, expect_reason, get_step_up, next_message, next_status, request_step_up,
    watch_step_up,
};

use crate::delegations::{Pair, ask, assert_logged, in_both_logs, setup_pair};
use crate::policies::{add_rule, context, inbound, num, with_counterpart};
use vaultguard_tests::calls::update_rule;

use pb::ErrorReason as Reason;
use pb::StepUpState as State;
use pb::watch_pending_step_ups_response::Event as QueueEvent;
use vaultguard_tests::Rpc;
use vaultguard_tests::calls::{deny, poll};
use vaultguard_tests::require_backend;

/// The heartbeat interval of every watch in these tests, in seconds.
const BEAT: u32 = 1;

// ---------------------------------------------------------------------------
// Requests and calls.

/// Globex makes every `pay.*` request a step-up needing `quorum` approvals.
async fn steps_up(pair: &Pair, quorum: u32) -> pb::Rule {
    let rule = pb::Rule {
        approvals_required: quorum,
        ..inbound("pay.*", pb::Effect::StepUp)
    };
    add_rule(&pair.globex_admin, rule).await
}

/// A payment the bot asks globex for.
fn payment(pair: &Pair) -> pb::RequestDelegationRequest {
    pb::RequestDelegationRequest {
        binding_message: "pay invoice 7".to_owned(),
        context: context(&[("amount", num(1200.0))]),
        ..ask(&pair.globex.id, "pay.invoice")
    }
}

/// A human of globex holding ROLE_APPROVER only.
async fn approver(pair: &Pair, name: &str) -> VaultGuardClient {
    pair.server.approver(&pair.globex.id, name).await
}

/// A pair whose globex asks `quorum` approvals for payments (the rule),
/// its approver ann, and the bot's payment pending ann's decision.
async fn pending_for_ann(quorum: u32) -> (Pair, pb::Rule, VaultGuardClient, PendingStepUp) {
    let pair = setup_pair().await;
    let rule = steps_up(&pair, quorum).await;
    let ann = approver(&pair, "ann").await;
    let step = pending(&pair, &ann).await;
    (pair, rule, ann, step)
}

/// The bot asks globex for a payment, decided STEP_UP.
async fn pending(pair: &Pair, approver: &VaultGuardClient) -> PendingStepUp {
    request_step_up(&pair.agent, approver, payment(pair)).await
}

async fn list_pending(
    approver: &VaultGuardClient,
    filter: pb::ListPendingStepUpsRequest,
) -> Result<Vec<pb::StepUp>, ClientError> {
    Ok(approver.list_pending_step_ups(filter).await?.step_ups)
}

/// The ids of the step-ups `filter` lists for `approver`, queue order.
async fn pending_ids(
    approver: &VaultGuardClient,
    filter: pb::ListPendingStepUpsRequest,
) -> Vec<String> {
    list_pending(approver, filter)
        .await
        .expect("list pending step-ups")
        .into_iter()
        .map(|s| s.step_up_id)
        .collect()
}

/// The ids of the step-ups pending for `approver`'s tenant, queue order.
async fn queue_ids(approver: &VaultGuardClient) -> Vec<String> {
    pending_ids(approver, pb::ListPendingStepUpsRequest::default()).await
}

/// The step-up's state as `approver` reads it now.
async fn state_of(approver: &VaultGuardClient, step_up_id: &str) -> i32 {
    get_step_up(approver, step_up_id)
        .await
        .expect("get step-up")
        .state
}

/// Runs `call` until it answers anything but the retryable ABORTED (how
/// SQLite reports a concurrent writer), as the contract allows; at most 20
/// tries.
async fn retrying<T, Fut>(mut call: impl FnMut() -> Fut) -> Result<T, ClientError>
where
    Fut: std::future::Future<Output = Result<T, ClientError>>,
{
    let mut tries = 1;
    loop {
        match call().await {
            Err(err) if err.code() == Some(Code::Aborted) && tries < 20 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            other => return other,
        }
    }
}

/// Asserts a CIBA outcome: `code`, `reason` and metadata `ciba_error`;
/// returns the metadata.
#[track_caller]
fn expect_ciba<T: std::fmt::Debug>(
    result: Result<T, ClientError>,
    code: Code,
    reason: Reason,
    ciba_error: &str,
) -> HashMap<String, String> {
    let metadata = expect_reason(result, code, reason);
    assert_eq!(
        metadata.get("ciba_error").map(String::as_str),
        Some(ciba_error),
        "metadata {metadata:?}"
    );
    metadata
}

/// Asserts FAILED_PRECONDITION, INVALID_STATE with metadata `state`.
#[track_caller]
fn expect_state<T: std::fmt::Debug>(result: Result<T, ClientError>, state: &str) {
    let metadata = expect_reason(result, Code::FailedPrecondition, Reason::InvalidState);
    assert_eq!(
        metadata.get("state").map(String::as_str),
        Some(state),
        "metadata {metadata:?}"
    );
}

/// The tokens `polls` were handed; every other poll must have been told
/// `invalid_grant`.
async fn tokens_of(
    polls: Vec<tokio::task::JoinHandle<Result<pb::PollStepUpResponse, ClientError>>>,
) -> Vec<String> {
    let mut tokens = Vec::new();
    for task in polls {
        match task.await.unwrap() {
            Ok(response) => tokens.push(response.access_token),
            Err(err) => {
                expect_ciba(
                    Err::<(), _>(err),
                    Code::FailedPrecondition,
                    Reason::InvalidGrant,
                    "invalid_grant",
                );
            }
        }
    }
    tokens
}

/// Exactly one of `tokens` left the server, it verifies, and both parties'
/// logs record one redemption.
async fn assert_taken_once(pair: &Pair, step: &PendingStepUp, tokens: &[String]) {
    assert_eq!(tokens.len(), 1, "exactly one token");
    assert!(
        pair.globex_admin
            .verify(&tokens[0], "")
            .await
            .unwrap()
            .active
    );
    assert_redeemed_once(pair, step).await;
}

/// Both parties' logs record exactly one redemption of `step`.
async fn assert_redeemed_once(pair: &Pair, step: &PendingStepUp) {
    assert_eq!(
        in_both_logs(
            &pair.server,
            pair.logs(),
            "step_up.redeemed",
            &step.step_up_id
        )
        .await,
        [1, 1]
    );
}

/// The interval a CIBA error announces.
#[track_caller]
fn interval(metadata: &HashMap<String, String>) -> u32 {
    metadata
        .get("interval")
        .and_then(|i| i.parse().ok())
        .unwrap_or_else(|| panic!("no numeric interval in {metadata:?}"))
}

/// Asserts that `watch` ends with OK after what it sent.
async fn assert_ended(watch: &mut StepUpWatch, what: &str) {
    let rest = next_message(watch, Duration::from_secs(5)).await;
    assert!(rest.is_none(), "{what}: the watch went on with {rest:?}");
}

// ---------------------------------------------------------------------------
// The approvers' queue watch.

/// An approvers' queue watch (WatchPendingStepUps) that drops repeated
/// changes. The contract lets a watch repeat the changes of about the last
/// second (on PostgreSQL a snapshot's step-ups can come again as live
/// ADDED changes, and a resumed watch can repeat changes before its
/// cursor); in these tests each step-up gets at most one change of each
/// type, so a repeat is recognised by its type and step-up.
#[derive(Debug)]
struct Queue {
    stream: tonic::Streaming<pb::WatchPendingStepUpsResponse>,
    seen: HashSet<(pb::PendingStepUpEventType, String)>,
}

impl Queue {
    /// Opens the watch as `approver`, after `cursor` (empty: a snapshot
    /// first), with heartbeats every [`BEAT`] seconds.
    async fn open(approver: &VaultGuardClient, cursor: &str) -> Result<Self, ClientError> {
        let stream = approver
            .watch_pending_step_ups(pb::WatchPendingStepUpsRequest {
                cursor: cursor.to_owned(),
                heartbeat_interval_seconds: BEAT,
            })
            .await?;
        Ok(Self {
            stream,
            seen: HashSet::new(),
        })
    }

    /// The next message: its cursor and its change (`None`: a heartbeat).
    async fn next_message(&mut self) -> (String, Option<pb::PendingStepUpEvent>) {
        let message = next_message(&mut self.stream, Duration::from_secs(10))
            .await
            .expect("the queue watch does not end");
        assert!(!message.cursor.is_empty(), "every message has a cursor");
        match message.event.expect("an event") {
            QueueEvent::Change(change) => (message.cursor, Some(change)),
            QueueEvent::Heartbeat(_) => (message.cursor, None),
        }
    }

    /// The next change not seen before, skipping heartbeats; returns its
    /// cursor, type and step-up.
    async fn next_change(&mut self) -> (String, pb::PendingStepUpEventType, pb::StepUp) {
        for _ in 0..20 {
            if let (cursor, Some(change)) = self.next_message().await {
                let step_up = change.step_up.clone().expect("the change's step-up");
                if self
                    .seen
                    .insert((change.event_type(), step_up.step_up_id.clone()))
                {
                    return (cursor, change.event_type(), step_up);
                }
            }
        }
        panic!("no new change on the queue watch")
    }

    /// Asserts the next change is `event_type` of `step_up_id` in `state`;
    /// returns its cursor.
    async fn expect(
        &mut self,
        event_type: pb::PendingStepUpEventType,
        step_up_id: &str,
        state: State,
    ) -> String {
        let (cursor, kind, step_up) = self.next_change().await;
        assert_eq!(
            (kind, step_up.step_up_id.as_str(), step_up.state()),
            (event_type, step_up_id, state),
            "queue change"
        );
        cursor
    }

    /// Asserts the next change is the REMOVED of `step_up_id` after its
    /// approval. The event carries the step-up's current state: APPROVED,
    /// or already REDEEMED when the agent's live watch took the token first.
    async fn expect_left_approved(&mut self, step_up_id: &str) {
        let (_, kind, step_up) = self.next_change().await;
        assert_eq!(
            (kind, step_up.step_up_id.as_str()),
            (pb::PendingStepUpEventType::Removed, step_up_id)
        );
        assert!(
            matches!(step_up.state(), State::Approved | State::Redeemed),
            "left the queue approved: {:?}",
            step_up.state()
        );
    }
}

// ---------------------------------------------------------------------------
// Approve, deny, expire.

#[tokio::test]
async fn an_approval_reaches_the_agents_watch_with_a_token_handed_out_once() {
    let (pair, _, ann, step) = pending_for_ann(0).await;
    vaultguard_tests::parts!(pair => acme, globex, bot, agent, globex_admin);

    // The queue shows approvers what they decide on, never the auth_req_id.
    let queue = list_pending(&ann, pb::ListPendingStepUpsRequest::default())
        .await
        .unwrap();
    assert_eq!(queue.len(), 1);
    let shown = queue[0].clone();
    assert_eq!(shown, get_step_up(&ann, &step.step_up_id).await.unwrap());
    assert_eq!(shown.step_up_id, step.step_up_id);
    assert_eq!(shown.delegation_id, step.delegation_id);
    assert_eq!(shown.state(), State::Pending);
    assert_eq!(
        (
            shown.requesting_tenant_id.as_str(),
            shown.requesting_agent_id.as_str(),
            shown.receiving_tenant_id.as_str()
        ),
        (acme.id.as_str(), bot.id.as_str(), globex.id.as_str())
    );
    assert_eq!(shown.action, "pay.invoice");
    assert_eq!(shown.binding_message, "pay invoice 7");
    assert_eq!(shown.context, context(&[("amount", num(1200.0))]));
    assert_eq!(shown.requested_ttl_seconds, 600);
    assert!(
        shown.request_hash.len() == 64
            && shown
                .request_hash
                .chars()
                .all(|c| matches!(c, '0'..='9' | 'a'..='f')),
        "request_hash {}",
        shown.request_hash
    );
    assert_eq!(shown.approvals_required, 1, "a quorum of 0 means 1");
    assert!(shown.approvals.is_empty() && shown.end_time.is_none());
    assert_eq!(
        shown.decision.as_ref().unwrap().outcome,
        pb::Decision::StepUp as i32
    );
    assert!(!format!("{shown:?}").contains(&step.auth_req_id));

    // The agent's watch starts with the current state.
    let mut watch = watch_step_up(agent, &step.auth_req_id, BEAT).await.unwrap();
    let first = next_status(&mut watch).await;
    assert_eq!(first.state(), State::Pending);
    assert_eq!(first.ciba_error, "authorization_pending");
    assert_eq!((first.approvals_received, first.approvals_required), (0, 1));
    assert_eq!(first.expire_time, shown.expire_time);
    assert!(first.access_token.is_empty() && first.token_type.is_empty());
    let waiting = first.delegation.unwrap();
    assert_eq!(
        (waiting.id.as_str(), waiting.status()),
        (step.delegation_id.as_str(), pb::DelegationStatus::Pending)
    );

    let approved = approve_step_up(&ann, &step.step_up_id, &step.request_hash)
        .await
        .unwrap();
    assert!(approved.decision.is_some(), "the re-check is returned");
    let after = approved.step_up.unwrap();
    assert_eq!(after.state(), State::Approved);
    assert!(after.end_time.is_some());
    let approvers: Vec<_> = after
        .approvals
        .iter()
        .map(|a| a.approver.clone().unwrap().subject)
        .collect();
    assert_eq!(approvers, ["ann"]);

    // The watch gets APPROVED with the token, and ends.
    let event = next_status(&mut watch).await;
    assert_eq!(event.state(), State::Approved);
    assert_eq!(event.ciba_error, "");
    assert_eq!(event.token_type, "Bearer");
    assert!(
        (1..=600).contains(&event.expires_in),
        "{}",
        event.expires_in
    );
    assert_eq!(event.approvals_received, 1);
    assert_eq!(
        event.delegation.as_ref().unwrap().status(),
        pb::DelegationStatus::Active
    );
    assert_ended(&mut watch, "after APPROVED").await;
    let verified = globex_admin.verify(&event.access_token, "").await.unwrap();
    assert!(verified.active, "the token verifies: {verified:?}");
    assert_eq!(
        (verified.jti.as_str(), verified.sub.as_str()),
        (step.delegation_id.as_str(), bot.id.as_str())
    );

    // The token was handed out once: the id is spent.
    expect_ciba(
        poll(agent, &step.auth_req_id).await,
        Code::FailedPrecondition,
        Reason::InvalidGrant,
        "invalid_grant",
    );
    let mut again = watch_step_up(agent, &step.auth_req_id, BEAT).await.unwrap();
    let spent = next_status(&mut again).await;
    assert_eq!(spent.state(), State::Redeemed);
    assert_eq!(spent.ciba_error, "invalid_grant");
    assert!(spent.access_token.is_empty());
    assert_ended(&mut again, "after REDEEMED").await;
    assert_eq!(
        state_of(&ann, &step.step_up_id).await,
        State::Redeemed as i32
    );
    assert!(queue_ids(&ann).await.is_empty());

    assert_logged(
        &pair,
        &step.step_up_id,
        &[
            ("step_up.approved", [1, 1]),
            ("step_up.redeemed", [1, 1]),
            ("step_up.approval_recorded", [0, 0]),
            ("step_up.denied", [0, 0]),
        ],
    )
    .await;
    pair.server.stop().await;
}

#[tokio::test]
async fn a_denial_reaches_the_watch_and_the_poll_and_ends_the_delegation() {
    let (pair, _, ann, step) = pending_for_ann(2).await;
    vaultguard_tests::parts!(pair => server, agent, globex_admin);
    let mut watch = watch_step_up(agent, &step.auth_req_id, BEAT).await.unwrap();
    assert_eq!(next_status(&mut watch).await.state(), State::Pending);

    // One denial suffices whatever the quorum.
    let denied = deny(&ann, &step.step_up_id, "not this invoice")
        .await
        .unwrap();
    assert_eq!(denied.state(), State::Denied);
    assert_eq!(denied.deny_reason, "not this invoice");
    assert_eq!(denied.denied_by.unwrap().subject, "ann");
    assert!(denied.end_time.is_some());

    let event = next_status(&mut watch).await;
    assert_eq!(event.state(), State::Denied);
    assert_eq!(event.ciba_error, "access_denied");
    assert!(event.access_token.is_empty());
    assert_eq!(
        event.delegation.unwrap().status(),
        pb::DelegationStatus::Denied
    );
    assert_ended(&mut watch, "after DENIED").await;

    expect_ciba(
        poll(agent, &step.auth_req_id).await,
        Code::PermissionDenied,
        Reason::AccessDenied,
        "access_denied",
    );
    for client in [agent, globex_admin] {
        let delegation = client.get_delegation(&step.delegation_id).await.unwrap();
        assert_eq!(delegation.status(), pb::DelegationStatus::Denied);
        assert_eq!(delegation.end_reason, "not this invoice");
        assert_eq!(delegation.ended_by.unwrap().subject, "ann");
    }

    // A later watch reports the denial and ends; nothing decides it again.
    let mut again = watch_step_up(agent, &step.auth_req_id, BEAT).await.unwrap();
    assert_eq!(next_status(&mut again).await.state(), State::Denied);
    assert_ended(&mut again, "a watch of a denied step-up").await;
    expect_state(
        deny(&ann, &step.step_up_id, "twice").await,
        "STEP_UP_STATE_DENIED",
    );
    expect_state(
        approve_step_up(&ann, &step.step_up_id, &step.request_hash).await,
        "STEP_UP_STATE_DENIED",
    );
    assert!(queue_ids(&ann).await.is_empty());
    assert_eq!(
        in_both_logs(server, pair.logs(), "step_up.denied", &step.step_up_id).await,
        [1, 1]
    );
    assert_eq!(
        in_both_logs(server, pair.logs(), "step_up.approved", &step.step_up_id).await,
        [0, 0]
    );
    pair.server.stop().await;
}

#[tokio::test]
async fn expiry_reaches_the_watch_at_its_next_heartbeat() {
    let (pair, _, ann, step) = pending_for_ann(1).await;
    vaultguard_tests::parts!(pair => server, agent);
    let mut watch = watch_step_up(agent, &step.auth_req_id, BEAT).await.unwrap();
    let first = next_status(&mut watch).await;
    assert_eq!(first.state(), State::Pending);
    let expire = first.expire_time.unwrap().seconds;
    let now = server.clock.now_seconds();
    assert!((299..=300).contains(&(expire - now)), "expires_in 300 s");

    // Past the deadline by the server's clock: no waiting for real time.
    server.clock.advance(301_000);
    let started = Instant::now();
    let event = next_status(&mut watch).await;
    assert_eq!(event.state(), State::Expired);
    assert_eq!(event.ciba_error, "expired_token");
    assert!(event.access_token.is_empty());
    assert_eq!(
        event.delegation.unwrap().status(),
        pb::DelegationStatus::Expired
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "seen at the next heartbeat, after {:?}",
        started.elapsed()
    );
    assert_ended(&mut watch, "after EXPIRED").await;

    expect_ciba(
        poll(agent, &step.auth_req_id).await,
        Code::FailedPrecondition,
        Reason::ExpiredToken,
        "expired_token",
    );
    expect_state(
        approve_step_up(&ann, &step.step_up_id, &step.request_hash).await,
        "STEP_UP_STATE_EXPIRED",
    );
    expect_state(
        deny(&ann, &step.step_up_id, "late").await,
        "STEP_UP_STATE_EXPIRED",
    );
    assert_eq!(
        state_of(&ann, &step.step_up_id).await,
        State::Expired as i32
    );
    assert!(queue_ids(&ann).await.is_empty());
    let mut again = watch_step_up(agent, &step.auth_req_id, BEAT).await.unwrap();
    assert_eq!(next_status(&mut again).await.state(), State::Expired);
    assert_ended(&mut again, "a watch of an expired step-up").await;
    pair.server.stop().await;
}

#[tokio::test]
async fn an_approved_token_not_taken_before_the_delegation_ends_expires() {
    let (pair, _, ann, step) = pending_for_ann(1).await;
    vaultguard_tests::parts!(pair => server, agent);
    approve_step_up(&ann, &step.step_up_id, &step.request_hash)
        .await
        .unwrap();
    // The delegation's 600 s run from the approval; nobody took the token.
    server.clock.advance(601_000);
    expect_ciba(
        poll(agent, &step.auth_req_id).await,
        Code::FailedPrecondition,
        Reason::ExpiredToken,
        "expired_token",
    );
    let mut watch = watch_step_up(agent, &step.auth_req_id, BEAT).await.unwrap();
    let event = next_status(&mut watch).await;
    assert_eq!(
        (event.state(), event.access_token.as_str()),
        (State::Expired, "")
    );
    assert_ended(&mut watch, "after EXPIRED").await;
    assert_eq!(
        in_both_logs(server, pair.logs(), "step_up.redeemed", &step.step_up_id).await,
        [0, 0]
    );
    pair.server.stop().await;
}

#[tokio::test]
async fn polling_faster_than_the_interval_slows_down_for_good() {
    let (pair, _, ann, step) = pending_for_ann(1).await;
    vaultguard_tests::parts!(pair => server, agent);
    let pending_after = |result| {
        interval(&expect_ciba(
            result,
            Code::FailedPrecondition,
            Reason::AuthorizationPending,
            "authorization_pending",
        ))
    };
    let slowed = |result| {
        interval(&expect_ciba(
            result,
            Code::FailedPrecondition,
            Reason::SlowDown,
            "slow_down",
        ))
    };

    assert_eq!(pending_after(poll(agent, &step.auth_req_id).await), 5);
    assert_eq!(slowed(poll(agent, &step.auth_req_id).await), 10);
    // Waiting the old interval is no longer enough.
    server.clock.advance(5_500);
    assert_eq!(slowed(poll(agent, &step.auth_req_id).await), 15);
    // Waiting the grown one is; the interval stays grown.
    server.clock.advance(15_500);
    assert_eq!(pending_after(poll(agent, &step.auth_req_id).await), 15);
    server.clock.advance(15_500);
    assert_eq!(pending_after(poll(agent, &step.auth_req_id).await), 15);

    // Watching does not count as polling; the watch then delivers the token.
    server.clock.advance(15_500);
    let mut watch = watch_step_up(agent, &step.auth_req_id, BEAT).await.unwrap();
    assert_eq!(next_status(&mut watch).await.state(), State::Pending);
    assert_eq!(pending_after(poll(agent, &step.auth_req_id).await), 15);
    approve_step_up(&ann, &step.step_up_id, &step.request_hash)
        .await
        .unwrap();
    let event = next_status(&mut watch).await;
    assert_eq!(event.state(), State::Approved);
    assert!(!event.access_token.is_empty());
    expect_ciba(
        poll(agent, &step.auth_req_id).await,
        Code::FailedPrecondition,
        Reason::InvalidGrant,
        "invalid_grant",
    );

    // An approved token comes at once, however fast the poll.
    let next = pending(&pair, &ann).await;
    assert_eq!(pending_after(poll(agent, &next.auth_req_id).await), 5);
    approve_step_up(&ann, &next.step_up_id, &next.request_hash)
        .await
        .unwrap();
    let taken = poll(agent, &next.auth_req_id).await.unwrap();
    assert!(!taken.access_token.is_empty());
    assert_eq!(taken.token_type, "Bearer");
    assert_eq!(
        taken.delegation.unwrap().status(),
        pb::DelegationStatus::Active
    );
    pair.server.stop().await;
}

#[tokio::test]
async fn a_watcher_that_went_away_does_not_take_the_token() {
    let (pair, _, ann, step) = pending_for_ann(1).await;
    vaultguard_tests::parts!(pair => server, agent);
    // The agent watches (heartbeats every 60 s), then gives up on the
    // stream and falls back to polling, as the SDK does when a stream breaks.
    let mut watch = watch_step_up(agent, &step.auth_req_id, 60).await.unwrap();
    assert_eq!(next_status(&mut watch).await.state(), State::Pending);
    drop(watch);
    tokio::time::sleep(Duration::from_millis(200)).await;
    approve_step_up(&ann, &step.step_up_id, &step.request_hash)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Nobody received the APPROVED event, so the token is still the poll's.
    let taken = poll(agent, &step.auth_req_id).await;
    let redeemed = in_both_logs(server, pair.logs(), "step_up.redeemed", &step.step_up_id).await;
    assert!(
        taken.as_ref().is_ok_and(|t| !t.access_token.is_empty()),
        "the poll after a dropped watch got {taken:?}; step_up.redeemed per log {redeemed:?}"
    );
    pair.server.stop().await;
}

#[tokio::test]
async fn a_quorum_needs_distinct_approvers() {
    let pair = setup_pair().await;
    vaultguard_tests::parts!(pair => server, agent);
    steps_up(&pair, 2).await;
    let (ann, bob) = (approver(&pair, "ann").await, approver(&pair, "bob").await);
    let step = pending(&pair, &ann).await;
    assert_eq!(
        get_step_up(&ann, &step.step_up_id)
            .await
            .unwrap()
            .approvals_required,
        2
    );
    let mut watch = watch_step_up(agent, &step.auth_req_id, BEAT).await.unwrap();
    let first = next_status(&mut watch).await;
    assert_eq!((first.approvals_received, first.approvals_required), (0, 2));
    let mut queue = Queue::open(&bob, "").await.unwrap();
    queue
        .expect(
            pb::PendingStepUpEventType::Added,
            &step.step_up_id,
            State::Pending,
        )
        .await;

    // The first approval is recorded; the step-up stays pending.
    let partial = approve_step_up(&ann, &step.step_up_id, &step.request_hash)
        .await
        .unwrap()
        .step_up
        .unwrap();
    assert_eq!(
        (partial.state(), partial.approvals.len()),
        (State::Pending, 1)
    );
    let update = next_status(&mut watch).await;
    assert_eq!(
        (
            update.state(),
            update.approvals_received,
            update.access_token.as_str()
        ),
        (State::Pending, 1, "")
    );
    let (_, kind, shown) = queue.next_change().await;
    assert_eq!(
        (kind, shown.state(), shown.approvals.len()),
        (pb::PendingStepUpEventType::Updated, State::Pending, 1)
    );
    expect_ciba(
        poll(agent, &step.auth_req_id).await,
        Code::FailedPrecondition,
        Reason::AuthorizationPending,
        "authorization_pending",
    );

    // The same approver again changes nothing.
    let repeated = approve_step_up(&ann, &step.step_up_id, &step.request_hash)
        .await
        .unwrap()
        .step_up
        .unwrap();
    assert_eq!(repeated, partial);
    assert_eq!(
        in_both_logs(
            server,
            pair.logs(),
            "step_up.approval_recorded",
            &step.step_up_id
        )
        .await,
        [1, 1]
    );

    // A second approver completes the quorum; the watch's next status is
    // APPROVED, nothing in between.
    let done = approve_step_up(&bob, &step.step_up_id, &step.request_hash)
        .await
        .unwrap()
        .step_up
        .unwrap();
    assert_eq!(done.state(), State::Approved);
    let subjects: Vec<_> = done
        .approvals
        .iter()
        .map(|a| a.approver.clone().unwrap().subject)
        .collect();
    assert_eq!(subjects, ["ann", "bob"]);
    let event = next_status(&mut watch).await;
    assert_eq!(
        (
            event.state(),
            event.approvals_received,
            event.approvals_required
        ),
        (State::Approved, 2, 2)
    );
    assert!(!event.access_token.is_empty());
    assert_ended(&mut watch, "after APPROVED").await;
    queue.expect_left_approved(&step.step_up_id).await;
    assert_logged(
        &pair,
        &step.step_up_id,
        &[
            ("step_up.approval_recorded", [1, 1]),
            ("step_up.approved", [1, 1]),
        ],
    )
    .await;
    pair.server.stop().await;
}

#[tokio::test]
async fn an_approval_is_bound_to_the_request_it_was_shown() {
    let (pair, _, ann, step) = pending_for_ann(1).await;
    vaultguard_tests::parts!(pair => server);
    let other = pending(&pair, &ann).await;
    assert_eq!(
        step.request_hash, other.request_hash,
        "the same request has the same hash"
    );
    let different = request_step_up(
        &pair.agent,
        &ann,
        pb::RequestDelegationRequest {
            binding_message: "pay invoice 8".to_owned(),
            ..payment(&pair)
        },
    )
    .await;
    assert_ne!(different.request_hash, step.request_hash);

    // Another request's hash is refused and changes nothing.
    expect_state(
        approve_step_up(&ann, &step.step_up_id, &different.request_hash).await,
        "request_hash_mismatch",
    );
    let unchanged = get_step_up(&ann, &step.step_up_id).await.unwrap();
    assert_eq!(
        (unchanged.state(), unchanged.approvals.len()),
        (State::Pending, 0)
    );
    let upper = step.request_hash.to_uppercase();
    for (field, step_up_id, hash) in [
        ("request_hash", step.step_up_id.as_str(), ""),
        ("request_hash", step.step_up_id.as_str(), "ABC"),
        ("request_hash", step.step_up_id.as_str(), upper.as_str()),
        ("step_up_id", "", step.request_hash.as_str()),
        ("step_up_id", "stp_nope", step.request_hash.as_str()),
        (
            "step_up_id",
            step.delegation_id.as_str(),
            step.request_hash.as_str(),
        ),
    ] {
        expect_invalid(approve_step_up(&ann, step_up_id, hash).await, field);
    }
    expect_invalid(
        deny(&ann, &step.step_up_id, &"r".repeat(513)).await,
        "reason",
    );
    expect_invalid(get_step_up(&ann, "stp_nope").await, "step_up_id");
    assert_eq!(
        in_both_logs(server, pair.logs(), "step_up.approved", &step.step_up_id).await,
        [0, 0]
    );
    // The right hash is accepted.
    let approved = approve_step_up(&ann, &step.step_up_id, &step.request_hash)
        .await
        .unwrap();
    assert_eq!(approved.step_up.unwrap().state(), State::Approved);
    pair.server.stop().await;
}

#[tokio::test]
async fn a_policy_changed_to_block_before_approval_denies_the_step_up() {
    let (pair, rule, ann, step) = pending_for_ann(1).await;
    vaultguard_tests::parts!(pair => server, agent, globex_admin);
    let mut watch = watch_step_up(agent, &step.auth_req_id, BEAT).await.unwrap();
    assert_eq!(next_status(&mut watch).await.state(), State::Pending);

    let version = rule.version;
    let blocked = update_rule(
        globex_admin,
        pb::Rule {
            effect: pb::Effect::Block as i32,
            approvals_required: 0,
            ..rule
        },
        version,
    )
    .await
    .unwrap()
    .rule
    .unwrap();

    let metadata = expect_ciba(
        approve_step_up(&ann, &step.step_up_id, &step.request_hash).await,
        Code::FailedPrecondition,
        Reason::AccessDenied,
        "access_denied",
    );
    assert_eq!(
        metadata.get("policy_side").map(String::as_str),
        Some("inbound")
    );
    assert_eq!(metadata.get("rule_id"), Some(&blocked.id));
    assert!(
        metadata
            .get("policy_version")
            .is_some_and(|v| !v.is_empty()),
        "{metadata:?}"
    );

    let event = next_status(&mut watch).await;
    assert_eq!(
        (event.state(), event.ciba_error.as_str()),
        (State::Denied, "access_denied")
    );
    assert_ended(&mut watch, "after DENIED").await;
    let shown = get_step_up(&ann, &step.step_up_id).await.unwrap();
    assert_eq!(shown.state(), State::Denied);
    assert!(shown.approvals.is_empty(), "the approval was not recorded");
    assert!(
        shown
            .denied_by
            .as_ref()
            .is_none_or(|actor| actor.kind() == pb::PrincipalKind::System),
        "a policy block is no human's denial: {:?}",
        shown.denied_by
    );
    assert_eq!(
        agent
            .get_delegation(&step.delegation_id)
            .await
            .unwrap()
            .status(),
        pb::DelegationStatus::Denied
    );
    expect_ciba(
        poll(agent, &step.auth_req_id).await,
        Code::PermissionDenied,
        Reason::AccessDenied,
        "access_denied",
    );
    expect_state(
        approve_step_up(&ann, &step.step_up_id, &step.request_hash).await,
        "STEP_UP_STATE_DENIED",
    );
    for (event_type, expected) in [("step_up.denied", [1, 1]), ("step_up.approved", [0, 0])] {
        assert_eq!(
            in_both_logs(server, pair.logs(), event_type, &step.step_up_id).await,
            expected,
            "{event_type}"
        );
    }
    pair.server.stop().await;
}

// ---------------------------------------------------------------------------
// Who decides, who polls.

#[tokio::test]
async fn only_approvers_of_the_receiving_tenant_decide() {
    let (pair, _, ann, step) = pending_for_ann(1).await;
    vaultguard_tests::parts!(pair => server, acme, globex, bot, agent, acme_admin);
    let (initech, initech_admin) = pair.third_tenant().await;
    let auditor = server.human(&globex.id, "aud", &[pb::Role::Auditor]).await;
    let (_, _, globex_agent) = server.create_agent(&globex.id, "clerk").await;

    // An agent (the requester, or one of the receiving tenant) and an
    // auditor hold no approver role.
    for (who, client) in [
        ("the requesting agent", agent),
        ("an agent of the receiving tenant", &globex_agent),
        ("an auditor", &auditor),
    ] {
        for result in [
            approve_step_up(client, &step.step_up_id, &step.request_hash)
                .await
                .map(|_| ()),
            deny(client, &step.step_up_id, "no").await.map(|_| ()),
        ] {
            let err = expect_code(result, Code::PermissionDenied);
            assert_eq!(err.reason(), Some(Reason::RoleRequired), "{who}: {err:?}");
        }
    }
    // Another tenant's approvers, and the requesting tenant's, do not see it.
    let initech_approver = server.approver(&initech.id, "ivan").await;
    for (who, client) in [
        ("another tenant's admin", &initech_admin),
        ("another tenant's approver", &initech_approver),
        ("the requesting tenant's admin", acme_admin),
    ] {
        for result in [
            approve_step_up(client, &step.step_up_id, &step.request_hash)
                .await
                .map(|_| ()),
            deny(client, &step.step_up_id, "no").await.map(|_| ()),
            get_step_up(client, &step.step_up_id).await.map(|_| ()),
        ] {
            let err = expect_code(result, Code::NotFound);
            assert!(!format!("{err:?}").contains(&bot.id), "{who}: {err:?}");
        }
        assert!(queue_ids(client).await.is_empty(), "{who}'s queue");
        let mut queue = Queue::open(client, "").await.unwrap();
        let (_, change) = queue.next_message().await;
        assert!(change.is_none(), "{who}'s queue watch: {change:?}");
    }
    assert_eq!(
        state_of(&ann, &step.step_up_id).await,
        State::Pending as i32
    );
    for event_type in ["step_up.approved", "step_up.denied"] {
        assert_eq!(
            in_both_logs(server, pair.logs(), event_type, &step.step_up_id).await,
            [0, 0],
            "{event_type}"
        );
    }

    // The requester never decides its own request, even holding the
    // approver role of the tenant asked (here its own).
    add_rule(
        acme_admin,
        with_counterpart(&acme.id, inbound("pay.*", pb::Effect::StepUp)),
    )
    .await;
    let acme_approver = server.approver(&acme.id, "carl").await;
    let own = request_step_up(agent, &acme_approver, ask(&acme.id, "pay.self")).await;
    let itself = server
        .with_bearer(
            &server
                .mint(&bot.id, Some(&acme.id), &[pb::Role::Approver])
                .await,
        )
        .await;
    expect_reason(
        approve_step_up(&itself, &own.step_up_id, &own.request_hash).await,
        Code::PermissionDenied,
        Reason::SelfApproval,
    );
    expect_reason(
        deny(&itself, &own.step_up_id, "no").await,
        Code::PermissionDenied,
        Reason::SelfApproval,
    );
    assert_eq!(
        state_of(&acme_approver, &own.step_up_id).await,
        State::Pending as i32
    );
    // Someone else of that tenant may.
    let approved = approve_step_up(&acme_approver, &own.step_up_id, &own.request_hash)
        .await
        .unwrap();
    assert_eq!(approved.step_up.unwrap().state(), State::Approved);
    assert_eq!(
        server
            .audit_count(&acme.id, "step_up.approved", &own.step_up_id)
            .await,
        1,
        "one log: both parties are acme"
    );
    pair.server.stop().await;
}

#[tokio::test]
async fn only_the_requesting_agent_polls_or_watches_its_step_up() {
    let (pair, _, ann, step) = pending_for_ann(1).await;
    vaultguard_tests::parts!(pair => server, acme, agent, globex_admin);
    let (_, _, other_agent) = server.create_agent(&acme.id, "other").await;

    // Someone else's id, and an unknown one, are invalid_grant alike.
    let unknown = "A".repeat(43);
    for (who, client, id) in [
        ("another agent", &other_agent, step.auth_req_id.as_str()),
        ("an unknown id", agent, unknown.as_str()),
    ] {
        for result in [
            poll(client, id).await.map(|_| ()),
            watch_step_up(client, id, BEAT).await.map(|_| ()),
        ] {
            let metadata = expect_reason(result, Code::FailedPrecondition, Reason::InvalidGrant);
            assert_eq!(
                metadata.get("ciba_error").map(String::as_str),
                Some("invalid_grant"),
                "{who}"
            );
        }
    }
    // Malformed ids and heartbeat intervals are invalid arguments.
    for bad in [String::new(), "bad id!".to_owned(), "x".repeat(129)] {
        expect_invalid(poll(agent, &bad).await, "auth_req_id");
        expect_invalid(watch_step_up(agent, &bad, BEAT).await, "auth_req_id");
    }
    expect_invalid(
        watch_step_up(agent, &step.auth_req_id, 61).await,
        "heartbeat_interval_seconds",
    );
    let request = ann
        .request(pb::WatchPendingStepUpsRequest {
            cursor: String::new(),
            heartbeat_interval_seconds: 61,
        })
        .await
        .unwrap();
    expect_invalid(
        ann.step_ups().watch_pending_step_ups(request).await,
        "heartbeat_interval_seconds",
    );
    // Humans do not poll.
    for human in [&ann, globex_admin] {
        let err = expect_code(poll(human, &step.auth_req_id).await, Code::PermissionDenied);
        assert_eq!(err.reason(), Some(Reason::RoleRequired));
    }

    // None of it disturbed the step-up: it is still the agent's to take.
    approve_step_up(&ann, &step.step_up_id, &step.request_hash)
        .await
        .unwrap();
    expect_reason(
        poll(&other_agent, &step.auth_req_id).await,
        Code::FailedPrecondition,
        Reason::InvalidGrant,
    );
    assert!(
        !poll(agent, &step.auth_req_id)
            .await
            .unwrap()
            .access_token
            .is_empty()
    );
    pair.server.stop().await;
}

// ---------------------------------------------------------------------------
// Concurrency.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixteen_concurrent_approvals_mint_one_token() {
    const APPROVERS: usize = 16;
    const POLLERS: usize = 8;
    let pair = setup_pair().await;
    vaultguard_tests::parts!(pair => agent, globex_admin);
    steps_up(&pair, 1).await;
    let mut approvers = Vec::new();
    for n in 0..APPROVERS {
        approvers.push(approver(&pair, &format!("approver-{n}")).await);
    }
    let step = pending(&pair, &approvers[0]).await;

    let start = Arc::new(Barrier::new(APPROVERS));
    let tasks: Vec<_> = approvers
        .iter()
        .map(|client| {
            let (client, step, start) = (client.clone(), step.clone(), start.clone());
            tokio::spawn(async move {
                start.wait().await;
                retrying(|| approve_step_up(&client, &step.step_up_id, &step.request_hash)).await
            })
        })
        .collect();
    let mut approved = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(response) => {
                assert_eq!(response.step_up.unwrap().state(), State::Approved);
                approved += 1;
            }
            Err(err) => expect_state(Err::<(), _>(err), "STEP_UP_STATE_APPROVED"),
        }
    }
    assert_eq!(approved, 1, "exactly one approval succeeds");
    let shown = get_step_up(globex_admin, &step.step_up_id).await.unwrap();
    assert_eq!((shown.state(), shown.approvals.len()), (State::Approved, 1));
    assert_logged(
        &pair,
        &step.step_up_id,
        &[
            ("step_up.approved", [1, 1]),
            ("step_up.approval_recorded", [0, 0]),
        ],
    )
    .await;

    // Concurrent polls hand the token out once.
    let start = Arc::new(Barrier::new(POLLERS));
    let polls: Vec<_> = (0..POLLERS)
        .map(|_| {
            let (agent, id, start) = (agent.clone(), step.auth_req_id.clone(), start.clone());
            tokio::spawn(async move {
                start.wait().await;
                retrying(|| poll(&agent, &id)).await
            })
        })
        .collect();
    let tokens = tokens_of(polls).await;
    assert_taken_once(&pair, &step, &tokens).await;
    pair.server.stop().await;
}

/// Watches on the replica that approves are handed the decision it
/// committed instead of re-reading it; with polls racing them, the token
/// still leaves the server once and every other watch reports REDEEMED.
#[tokio::test]
async fn watches_and_polls_racing_for_an_approved_token_take_it_once() {
    const WATCHES: usize = 4;
    const POLLERS: usize = 4;
    let pair = setup_pair().await;
    let agent = &pair.agent;
    steps_up(&pair, 1).await;
    let ann = approver(&pair, "ann").await;
    let step = pending(&pair, &ann).await;
    let mut watches = Vec::new();
    for _ in 0..WATCHES {
        let mut watch = watch_step_up(agent, &step.auth_req_id, BEAT).await.unwrap();
        assert_eq!(next_status(&mut watch).await.state(), State::Pending);
        watches.push(watch);
    }

    approve_step_up(&ann, &step.step_up_id, &step.request_hash)
        .await
        .unwrap();
    let polls: Vec<_> = (0..POLLERS)
        .map(|_| {
            let (agent, id) = (agent.clone(), step.auth_req_id.clone());
            tokio::spawn(async move { retrying(|| poll(&agent, &id)).await })
        })
        .collect();
    let mut tokens = Vec::new();
    for mut watch in watches {
        let event = next_status(&mut watch).await;
        match event.state() {
            State::Approved => {
                assert_eq!(event.token_type, "Bearer");
                assert_eq!(
                    event.delegation.as_ref().unwrap().status(),
                    pb::DelegationStatus::Active
                );
                tokens.push(event.access_token);
            }
            State::Redeemed => {
                assert_eq!(event.ciba_error, "invalid_grant");
                assert!(event.access_token.is_empty());
            }
            other => panic!("a watch ended in {other:?}"),
        }
        assert_ended(&mut watch, "after the decision").await;
    }
    tokens.extend(tokens_of(polls).await);
    assert_taken_once(&pair, &step, &tokens).await;
    pair.server.stop().await;
}

// ---------------------------------------------------------------------------
// The approvers' queue.

#[tokio::test]
async fn the_queue_watch_sends_a_snapshot_then_changes_and_resumes_after_a_cursor() {
    use pb::PendingStepUpEventType::{Added, Removed};
    let pair = setup_pair().await;
    vaultguard_tests::parts!(pair => server);
    steps_up(&pair, 1).await;
    let ann = approver(&pair, "ann").await;
    let first = pending(&pair, &ann).await;

    // The snapshot, then live changes.
    let mut queue = Queue::open(&ann, "").await.unwrap();
    let mut cursors = vec![queue.expect(Added, &first.step_up_id, State::Pending).await];
    let second = pending(&pair, &ann).await;
    cursors.push(
        queue
            .expect(Added, &second.step_up_id, State::Pending)
            .await,
    );
    approve_step_up(&ann, &first.step_up_id, &first.request_hash)
        .await
        .unwrap();
    cursors.push(
        queue
            .expect(Removed, &first.step_up_id, State::Approved)
            .await,
    );
    deny(&ann, &second.step_up_id, "no").await.unwrap();
    cursors.push(
        queue
            .expect(Removed, &second.step_up_id, State::Denied)
            .await,
    );
    drop(queue);
    // A third request while nobody watches.
    let third = pending(&pair, &ann).await;
    let feed = [
        (Added, first.step_up_id.clone()),
        (Added, second.step_up_id.clone()),
        (Removed, first.step_up_id.clone()),
        (Removed, second.step_up_id.clone()),
        (Added, third.step_up_id.clone()),
    ];
    let now = HashMap::from([
        (first.step_up_id.clone(), State::Approved),
        (second.step_up_id.clone(), State::Denied),
        (third.step_up_id.clone(), State::Pending),
    ]);

    // Resuming from the cursor of a change never skips a change after it,
    // and sends no snapshot. It may repeat earlier ones in feed order (on
    // PostgreSQL those of about the last second, not settled yet; SQLite
    // commits in order and repeats nothing), each with the current state.
    for (n, cursor) in cursors.iter().enumerate() {
        let mut resumed = Queue::open(&ann, cursor).await.unwrap();
        let mut seen = Vec::new();
        while seen.last() != feed.last() {
            let (_, kind, step_up) = resumed.next_change().await;
            assert_eq!(Some(&step_up.state()), now.get(&step_up.step_up_id));
            seen.push((kind, step_up.step_up_id));
            assert!(seen.len() <= feed.len(), "from change {n}: {seen:?}");
        }
        let from = feed.len() - seen.len();
        assert_eq!(seen, feed[from..], "resumed from the cursor of change {n}");
        assert!(from <= n + 1, "from change {n}, skipped: {seen:?}");
        if backend() == Backend::Sqlite {
            assert_eq!(from, n + 1, "from change {n}, repeated: {seen:?}");
        }
    }

    // Once the feed has settled, a new watch sends the queue as it is now,
    // and its cursor resumes with nothing to repeat.
    server.clock.advance(2_000);
    let mut fresh = Queue::open(&ann, "").await.unwrap();
    let end = fresh.expect(Added, &third.step_up_id, State::Pending).await;
    assert_eq!(fresh.next_message().await, (end.clone(), None));
    let mut caught_up = Queue::open(&ann, &end).await.unwrap();
    assert_eq!(caught_up.next_message().await, (end, None));

    for bad in ["abc", "-1", &"9".repeat(257)] {
        expect_invalid(Queue::open(&ann, bad).await, "cursor");
    }
    pair.server.stop().await;
}

#[tokio::test]
async fn listing_filters_the_queue_and_pages_it_oldest_first() {
    let pair = setup_pair().await;
    vaultguard_tests::parts!(pair => server, acme, globex);
    steps_up(&pair, 1).await;
    let ann = approver(&pair, "ann").await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(pending(&pair, &ann).await.step_up_id);
    }
    let (initech, _) = pair.third_tenant().await;
    let (_, _, initech_bot) = server.create_agent(&initech.id, "ibot").await;
    let from_initech = request_step_up(&initech_bot, &ann, ask(&globex.id, "pay.salary")).await;

    let mut all = ids.clone();
    all.push(from_initech.step_up_id.clone());
    assert_eq!(queue_ids(&ann).await, all, "oldest first");
    let only = |requesting_tenant_id: &str, action: &str| pb::ListPendingStepUpsRequest {
        requesting_tenant_id: requesting_tenant_id.to_owned(),
        action: action.to_owned(),
        page: None,
    };
    assert_eq!(pending_ids(&ann, only(&acme.id, "")).await, ids);
    assert_eq!(
        pending_ids(&ann, only("", "pay.salary")).await,
        std::slice::from_ref(&from_initech.step_up_id)
    );
    assert!(
        pending_ids(&ann, only(&acme.id, "pay.salary"))
            .await
            .is_empty()
    );

    let mut paged = Vec::new();
    let mut token = String::new();
    loop {
        let response = ann
            .list_pending_step_ups(pb::ListPendingStepUpsRequest {
                page: Some(pb::PageRequest {
                    page_size: 3,
                    page_token: token.clone(),
                }),
                ..Default::default()
            })
            .await
            .unwrap();
        assert!(response.step_ups.len() <= 3);
        paged.extend(response.step_ups.into_iter().map(|s| s.step_up_id));
        token = response.page.unwrap_or_default().next_page_token;
        if token.is_empty() {
            break;
        }
    }
    assert_eq!(paged, all);
    expect_invalid(
        list_pending(
            &ann,
            pb::ListPendingStepUpsRequest {
                page: Some(pb::PageRequest {
                    page_size: 3,
                    page_token: "garbage".to_owned(),
                }),
                ..Default::default()
            },
        )
        .await,
        "page.page_token",
    );
    pair.server.stop().await;
}

// ---------------------------------------------------------------------------
// Two replicas.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_only_a_watcher_on_one_replica_sees_an_approval_made_through_another_within_a_second()
 {
    // Two server processes share one database only on PostgreSQL; on SQLite
    // changes fan out in-process and there is no second replica to test.
    require_backend(Backend::Postgres);
    let pair = setup_pair().await;
    steps_up(&pair, 1).await;
    let replica = TestServer::start_replica_of(&pair.server).await;
    // The agent's token from replica A and approvers minted by B work on
    // both: one database, one master key, one issuer.
    let agent_on_b = replica
        .with_bearer(&pair.agent.bearer().await.unwrap())
        .await;
    let ann_on_a = approver(&pair, "ann").await;
    let bob_on_b = replica.approver(&pair.globex.id, "bob").await;

    // The approvers' queue on B sees a request made on A.
    let mut queue_on_b = Queue::open(&bob_on_b, "").await.unwrap();
    let (_, change) = queue_on_b.next_message().await;
    assert!(change.is_none(), "nothing pending yet: {change:?}");
    let step = pending(&pair, &ann_on_a).await;
    let started = Instant::now();
    queue_on_b
        .expect(
            pb::PendingStepUpEventType::Added,
            &step.step_up_id,
            State::Pending,
        )
        .await;
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "queue on B after {:?}",
        started.elapsed()
    );

    // The agent's watch on B sees the approval made through A.
    let mut watch_on_b = watch_step_up(&agent_on_b, &step.auth_req_id, 15)
        .await
        .unwrap();
    assert_eq!(next_status(&mut watch_on_b).await.state(), State::Pending);
    let started = Instant::now();
    approve_step_up(&ann_on_a, &step.step_up_id, &step.request_hash)
        .await
        .unwrap();
    let event = next_status(&mut watch_on_b).await;
    let latency = started.elapsed();
    assert_eq!(event.state(), State::Approved);
    assert!(
        latency < Duration::from_secs(1),
        "approve on A → APPROVED on B took {latency:?}"
    );
    eprintln!("approve on A → APPROVED on B: {latency:?}");
    assert!(
        pair.globex_admin
            .verify(&event.access_token, "")
            .await
            .unwrap()
            .active,
        "B's token verifies on A"
    );
    queue_on_b.expect_left_approved(&step.step_up_id).await;
    // Redeemed through B: A knows.
    expect_reason(
        poll(&pair.agent, &step.auth_req_id).await,
        Code::FailedPrecondition,
        Reason::InvalidGrant,
    );
    assert_redeemed_once(&pair, &step).await;
    replica.stop().await;
    pair.server.stop().await;
}
