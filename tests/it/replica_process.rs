//! A second server *process* (the real `vaultguard` binary) on the same
//! PostgreSQL database as the in-process server: an approval made through
//! one reaches an agent's watch on the other through LISTEN/NOTIFY alone —
//! the two share nothing but the database, the master key and the issuer.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vaultguard_client::{DelegationOutcome, VaultGuardClient, pb};
use vaultguard_tests::{Backend, wait_ready};

use crate::cookbook::cli_binary;
use crate::delegations::{ask, setup_pair};
use crate::policies::{add_rule, inbound};
use vaultguard_tests::Rpc;
use vaultguard_tests::require_backend;

/// Kills the child process when the test ends, however it ends.
pub(crate) struct Running(pub(crate) Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_only_an_approval_reaches_a_watch_on_another_server_process_within_a_second() {
    // One process owns a SQLite file; replicas need PostgreSQL.
    require_backend(Backend::Postgres);
    let pair = setup_pair().await;
    add_rule(&pair.globex_admin, inbound("stock.*", pb::Effect::StepUp)).await;
    let (bot, secret, _) = pair.server.create_agent(&pair.acme.id, "far-bot").await;

    let primary = pair.server.primary();
    let data_dir = tempfile::tempdir().expect("data dir");
    let (grpc_port, http_port) = (free_port(), free_port());
    let child = Command::new(cli_binary())
        .args(["--data-dir"])
        .arg(data_dir.path())
        .args(["--database-url", &primary.database_url])
        .args(["--issuer", &primary.issuer])
        .env("VAULTGUARD_MASTER_KEY", &primary.master_key)
        .args(["serve", "--grpc-addr", &format!("127.0.0.1:{grpc_port}")])
        .args(["--http-addr", &format!("127.0.0.1:{http_port}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the second server process");
    let _running = Running(child);
    let far_addr: std::net::SocketAddr = format!("127.0.0.1:{grpc_port}").parse().unwrap();
    wait_ready(far_addr).await;

    // The agent works entirely against the other process.
    let far_agent = VaultGuardClient::connect(format!("http://{far_addr}"))
        .await
        .unwrap()
        .with_client_credentials(bot.id.clone(), secret);
    let DelegationOutcome::StepUp { challenge, .. } = far_agent
        .request_delegation(ask(&pair.globex.id, "stock.write"))
        .await
        .unwrap()
    else {
        panic!("expected a step-up")
    };
    let mut watch = far_agent
        .watch_step_up(pb::WatchStepUpRequest {
            auth_req_id: challenge.auth_req_id.clone(),
            heartbeat_interval_seconds: 30,
        })
        .await
        .unwrap();
    let first = watch.message().await.unwrap().expect("first status");
    let Some(pb::watch_step_up_response::Event::Status(status)) = first.event else {
        panic!("expected a status first")
    };
    assert_eq!(status.state, pb::StepUpState::Pending as i32);

    // The approver works against the in-process server.
    let step_up_id = challenge.delegation.as_ref().unwrap().step_up_id.clone();
    let shown = pair
        .globex_admin
        .get_step_up(pb::GetStepUpRequest {
            step_up_id: step_up_id.clone(),
        })
        .await
        .unwrap()
        .step_up
        .unwrap();
    let request = pair
        .globex_admin
        .request(pb::ApproveStepUpRequest {
            step_up_id,
            request_hash: shown.request_hash,
            comment: String::new(),
        })
        .await
        .unwrap();
    let approved_at = Instant::now();
    pair.globex_admin
        .step_ups()
        .approve_step_up(request)
        .await
        .unwrap();

    let next = tokio::time::timeout(Duration::from_secs(5), watch.message())
        .await
        .expect("the far watch saw the approval")
        .unwrap()
        .expect("a status");
    let latency = approved_at.elapsed();
    let Some(pb::watch_step_up_response::Event::Status(status)) = next.event else {
        panic!("expected a status, got {next:?}")
    };
    assert_eq!(status.state, pb::StepUpState::Approved as i32);
    assert!(!status.access_token.is_empty());
    assert!(
        latency < Duration::from_secs(1),
        "approval reached the other process after {latency:?}"
    );
    // The token the far process handed out verifies on the near one.
    let verified = pair
        .globex_admin
        .verify(status.access_token, "stock.write")
        .await
        .unwrap();
    assert!(verified.active);
    pair.server.stop().await;
}
