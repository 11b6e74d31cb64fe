//! The Rust SDK's step-up wait: `with_delegation` blocks until a human of the
//! receiving tenant decides, runs the work with the token on approval, and
//! passes the server's CIBA status on denial; `wait_for_step_up` honours
//! `slow_down` when it polls.

use std::time::Duration;

use tonic::Code;
use vaultguard_client::{ClientError, DelegationOutcome, VaultGuardClient, pb};
use vaultguard_tests::expect_reason;

use crate::delegations::{Pair, ask, setup_pair};
use crate::policies::{add_rule, inbound};
use vaultguard_tests::Rpc;

/// The first pending step-up of the approver's queue, once it shows up.
async fn first_pending(approver: &VaultGuardClient) -> pb::StepUp {
    for _ in 0..100 {
        let listed = approver
            .list_pending_step_ups(pb::ListPendingStepUpsRequest::default())
            .await
            .unwrap();
        if let Some(step_up) = listed.step_ups.into_iter().next() {
            return step_up;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no pending step-up appeared");
}

/// A pair whose receiving tenant asks a human for `stock.*`, its agent and
/// the receiving tenant's id (to move into the task that waits).
async fn stepped_up_pair() -> (Pair, VaultGuardClient, String) {
    let pair = setup_pair().await;
    add_rule(&pair.globex_admin, inbound("stock.*", pb::Effect::StepUp)).await;
    let agent = pair.agent.clone();
    let globex_id = pair.globex.id.clone();
    (pair, agent, globex_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_delegation_waits_for_the_approval_and_runs_the_work() {
    let (pair, agent, globex_id) = stepped_up_pair().await;
    let waiting = tokio::spawn(async move {
        agent
            .with_delegation(ask(&globex_id, "stock.write"), |token| async move { token })
            .await
    });

    let step_up = first_pending(&pair.globex_admin).await;
    pair.globex_admin
        .approve_step_up(pb::ApproveStepUpRequest {
            step_up_id: step_up.step_up_id.clone(),
            request_hash: step_up.request_hash.clone(),
            comment: "ok".into(),
        })
        .await
        .unwrap();

    let token = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("with_delegation returns after the approval")
        .unwrap()
        .expect("the work ran with a token");
    let verified = pair
        .globex_admin
        .verify(token, "stock.write")
        .await
        .unwrap();
    assert!(verified.active);
    assert_eq!(verified.jti, step_up.delegation_id);
    pair.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_delegation_reports_a_denial_without_running_the_work() {
    let (pair, agent, globex_id) = stepped_up_pair().await;
    let waiting = tokio::spawn(async move {
        agent
            .with_delegation(ask(&globex_id, "stock.write"), |_token| async move {
                panic!("the work must not run after a denial")
            })
            .await
    });
    let step_up = first_pending(&pair.globex_admin).await;
    vaultguard_tests::calls::deny(&pair.globex_admin, &step_up.step_up_id, "not today")
        .await
        .unwrap();
    let result: Result<(), ClientError> = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("with_delegation returns after the denial")
        .unwrap();
    let metadata = expect_reason(
        result,
        Code::PermissionDenied,
        pb::ErrorReason::AccessDenied,
    );
    assert_eq!(
        metadata.get("ciba_error").map(String::as_str),
        Some("access_denied")
    );
    pair.server.stop().await;
}

#[tokio::test]
async fn polling_honours_slow_down_and_the_deadline() {
    let pair = setup_pair().await;
    add_rule(&pair.globex_admin, inbound("stock.*", pb::Effect::StepUp)).await;
    let DelegationOutcome::StepUp { challenge, .. } = pair
        .agent
        .request_delegation(ask(&pair.globex.id, "stock.write"))
        .await
        .unwrap()
    else {
        panic!("expected a step-up")
    };
    // Two quick polls: the second is too fast and the interval grows.
    let poll = || async {
        pair.agent
            .poll_step_up(pb::PollStepUpRequest {
                auth_req_id: challenge.auth_req_id.clone(),
            })
            .await
    };
    expect_reason(
        poll().await,
        Code::FailedPrecondition,
        pb::ErrorReason::AuthorizationPending,
    );
    let metadata = expect_reason(
        poll().await,
        Code::FailedPrecondition,
        pb::ErrorReason::SlowDown,
    );
    assert_eq!(metadata.get("interval").map(String::as_str), Some("10"));

    // Nobody decides: the wait ends at the caller's deadline with the handle
    // to keep waiting on.
    let started = std::time::Instant::now();
    let err = pair
        .agent
        .wait_for_step_up(&challenge, Duration::from_millis(500))
        .await
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5));
    let ClientError::StepUpRequired { auth_req_id, .. } = err else {
        panic!("expected StepUpRequired, got {err:?}")
    };
    assert_eq!(auth_req_id, challenge.auth_req_id);
    pair.server.stop().await;
}
