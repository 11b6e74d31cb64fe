//! The polyglot example agents (`examples/python-agent`, grpcio; and
//! `examples/node-agent`, @grpc/grpc-js) against a real server: each runs
//! all three policy outcomes — ALLOW (its token accepted by the receiving
//! tenant's resource server after offline JWKS verification), STEP_UP
//! (approved by this test while the agent is streaming WatchStepUp; then
//! again by CIBA polling alone) and BLOCK (the ErrorInfo reason read from the
//! status details) — and exits 0 only if every expected outcome happened.
//!
//! Stubs are generated for each test from the committed proto, with
//! `scripts/gen-stubs.sh` (buf.gen.yaml, local plugins), into the test's own
//! directory; the Node agent is then type-checked and compiled against them
//! with `tsc`. Needs python3 with grpcio-tools, grpcio-status and PyJWT, and
//! the root `npm install` (buf, ts-proto, typescript, @grpc/grpc-js, jose):
//! `scripts/test.sh` installs both.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use vaultguard_client::{VaultGuardClient, pb};
use vaultguard_tests::Rpc;
use vaultguard_tests::{Running, TestServer};

/// The three actions and what the receiving tenant's inbound rules make of
/// them: an ALLOW rule, a STEP_UP rule, and no rule at all (BLOCK).
const ALLOWED: &str = "report.read";
const STEPPED_UP: &str = "payment.send";
const BLOCKED: &str = "account.delete";
/// The longest an agent run may take.
const RUN_TIMEOUT: Duration = Duration::from_secs(90);

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// A server with two tenants: Globex's agent asks Acme for delegations, and
/// Acme's approver decides step-ups.
struct World {
    server: TestServer,
    receiving_tenant_id: String,
    agent_id: String,
    secret: String,
    approver: VaultGuardClient,
}

async fn world() -> World {
    let server = TestServer::start().await;
    let globex = server.create_tenant("globex").await;
    let acme = server.create_tenant("acme").await;
    let (agent, secret, _) = server.create_agent(&globex.id, "polyglot-bot").await;
    let admin = server.admin(&acme.id, "admin@acme.test").await;
    for (pattern, effect) in [
        (ALLOWED, pb::Effect::Allow),
        (STEPPED_UP, pb::Effect::StepUp),
    ] {
        admin
            .create_rule(pb::CreateRuleRequest {
                rule: Some(pb::Rule {
                    direction: pb::RuleDirection::Inbound as i32,
                    action_pattern: pattern.to_owned(),
                    effect: effect as i32,
                    max_ttl_seconds: 600,
                    ..Default::default()
                }),
            })
            .await
            .expect("create rule");
    }
    let approver = server.approver(&acme.id, "approver@acme.test").await;
    World {
        server,
        receiving_tenant_id: acme.id,
        agent_id: agent.id,
        secret,
        approver,
    }
}

impl World {
    /// The agent flags every run shares: server, credentials, receiving
    /// tenant, issuer and JWKS of the resource server's offline check.
    fn agent_args(&self, run_id: &str) -> Vec<String> {
        let issuer = self.server.state.keys.issuer().to_owned();
        [
            "--server",
            &self.server.grpc_addr.to_string(),
            "--client-id",
            &self.agent_id,
            "--client-secret",
            &self.secret,
            "--receiving-tenant",
            &self.receiving_tenant_id,
            "--issuer",
            &issuer,
            "--jwks-url",
            &format!("{}/.well-known/jwks.json", self.server.http_url()),
            "--run-id",
            run_id,
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect()
    }

    /// Approves the agent's pending `action` as Acme's approver: lists the
    /// queue until the step-up shows up, then approves it with its
    /// `request_hash`.
    async fn approve(&self, action: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let step_up = loop {
            let pending = self
                .approver
                .list_pending_step_ups(pb::ListPendingStepUpsRequest {
                    requesting_tenant_id: String::new(),
                    action: action.to_owned(),
                    page: None,
                })
                .await
                .expect("list pending step-ups")
                .step_ups;
            if let Some(found) = pending
                .into_iter()
                .find(|s| s.requesting_agent_id == self.agent_id)
            {
                break found;
            }
            assert!(
                Instant::now() < deadline,
                "the agent's {action} step-up never showed up in the queue"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let approved = self
            .approver
            .approve_step_up(pb::ApproveStepUpRequest {
                step_up_id: step_up.step_up_id.clone(),
                request_hash: step_up.request_hash.clone(),
                comment: "checked by the polyglot test".to_owned(),
            })
            .await
            .expect("approve the step-up");
        // The agent is streaming, so it may already have taken the token.
        let state = approved.step_up.map(|s| s.state);
        assert!(
            state == Some(pb::StepUpState::Approved as i32)
                || state == Some(pb::StepUpState::Redeemed as i32),
            "approved step-up in state {state:?}"
        );
    }
}

/// Runs `program args…` and writes nothing to it; panics with its output
/// unless it succeeds.
async fn run_tool(program: &str, args: Vec<String>, cwd: PathBuf) {
    let program = program.to_owned();
    tokio::task::spawn_blocking(move || {
        vaultguard_tests::run_to_end(Command::new(program).args(&args).current_dir(cwd))
    })
    .await
    .expect("tool task");
}

/// Generates the Python and TypeScript stubs from proto/ into `out`
/// (`out/examples/{python,node}-agent/gen`), as a developer would with
/// `scripts/gen-stubs.sh`.
async fn generate_stubs(out: &Path) {
    let script = repo_root().join("scripts/gen-stubs.sh");
    run_tool(
        "bash",
        vec![script.display().to_string(), out.display().to_string()],
        repo_root(),
    )
    .await;
}

/// What an agent run printed, and how it ended.
struct AgentRun {
    status: ExitStatus,
    lines: Vec<String>,
    stderr: String,
}

impl AgentRun {
    fn shown(&self) -> String {
        format!(
            "status: {}\n--- stdout:\n{}\n--- stderr:\n{}",
            self.status,
            self.lines.join("\n"),
            self.stderr
        )
    }

    /// The stdout line that starts with `prefix`; panics if there is none.
    #[track_caller]
    fn line(&self, prefix: &str) -> &str {
        self.lines
            .iter()
            .find(|line| line.starts_with(prefix))
            .unwrap_or_else(|| panic!("no line starts with {prefix:?}\n{}", self.shown()))
    }
}

/// Runs an agent to its end, approving its STEP_UP from this test as soon as
/// it reports that it is waiting (`STEP_UP <action> watching` when
/// streaming, `… polling` when polling).
async fn run_agent(world: &World, mut command: Command, approve_on: Option<&str>) -> AgentRun {
    command
        .current_dir(repo_root())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let shown = format!("{command:?}");
    let mut child = Running(
        command
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start {shown}: {err}")),
    );
    let stdout = child.0.stdout.take().expect("stdout");
    let mut stderr = child.0.stderr.take().expect("stderr");
    let (tx, mut rx) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let stderr_reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });

    let deadline = Instant::now() + RUN_TIMEOUT;
    let mut lines = Vec::new();
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(line)) => {
                let approve = approve_on.is_some_and(|prefix| line.starts_with(prefix));
                lines.push(line);
                if approve {
                    world.approve(STEPPED_UP).await;
                }
            }
            Ok(None) => break,
            Err(_) => panic!(
                "{shown} did not finish within {RUN_TIMEOUT:?}; it printed:\n{}",
                lines.join("\n")
            ),
        }
    }
    let status = loop {
        if let Some(status) = child.0.try_wait().expect("wait for the agent") {
            break status;
        }
        assert!(Instant::now() < deadline, "{shown} did not exit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let stderr = stderr_reader.join().unwrap_or_default();
    AgentRun {
        status,
        lines,
        stderr,
    }
}

/// The three checks every agent must pass: (1) all three outcomes, the
/// STEP_UP approved while the agent streams; (2) a STEP_UP waited out by
/// CIBA polling alone; (3) a wrong expectation makes it exit 1.
async fn exercise(world: &World, agent: impl Fn(&[String]) -> Command, label: &str) {
    let agent_id = &world.agent_id;

    // 1. ALLOW, STEP_UP approved while the agent watches, BLOCK.
    let mut args = world.agent_args(&format!("{label}-watch"));
    for (action, outcome) in [
        (ALLOWED, "ALLOW"),
        (STEPPED_UP, "STEP_UP"),
        (BLOCKED, "BLOCK"),
    ] {
        args.extend(["--expect".to_owned(), format!("{action}={outcome}")]);
    }
    let watching = format!("STEP_UP {STEPPED_UP} watching");
    let run = run_agent(world, agent(&args), Some(&watching)).await;
    assert!(run.status.success(), "the agent failed\n{}", run.shown());
    let allowed = run.line(&format!("ALLOW {ALLOWED} delegation=dlg_"));
    for part in ["replay=same", "resource=200", &format!("sub={agent_id}")] {
        assert!(allowed.contains(part), "{part} missing\n{}", run.shown());
    }
    run.line(&format!("STEP_UP {STEPPED_UP} pending step_up=stp_"));
    run.line(&format!("{watching} state=STEP_UP_STATE_PENDING"));
    let approved = run.line(&format!(
        "STEP_UP {STEPPED_UP} approved via=watch delegation=dlg_"
    ));
    for part in ["resource=200", &format!("sub={agent_id}")] {
        assert!(approved.contains(part), "{part} missing\n{}", run.shown());
    }
    run.line(&format!(
        "BLOCK {BLOCKED} reason=ERROR_REASON_NO_MATCHING_RULE delegation=dlg_"
    ));
    run.line("RESULT ok 3/3");

    // 2. The poll fallback alone: CIBA polling at the challenge's interval.
    let mut args = world.agent_args(&format!("{label}-poll"));
    args.extend([
        "--expect".to_owned(),
        format!("{STEPPED_UP}=STEP_UP"),
        "--poll-only".to_owned(),
    ]);
    let polling = format!("STEP_UP {STEPPED_UP} polling");
    let run = run_agent(world, agent(&args), Some(&polling)).await;
    assert!(run.status.success(), "the agent failed\n{}", run.shown());
    run.line(&format!("{polling} interval="));
    let approved = run.line(&format!(
        "STEP_UP {STEPPED_UP} approved via=poll delegation=dlg_"
    ));
    assert!(approved.contains("resource=200"), "{}", run.shown());
    assert!(
        !run.lines.iter().any(|line| line.contains("slow_down")),
        "the agent polled faster than the interval\n{}",
        run.shown()
    );
    run.line("RESULT ok 1/1");

    // 3. An outcome other than the expected one fails the run.
    let mut args = world.agent_args(&format!("{label}-wrong"));
    args.extend(["--expect".to_owned(), format!("{BLOCKED}=ALLOW")]);
    let run = run_agent(world, agent(&args), None).await;
    assert_eq!(run.status.code(), Some(1), "{}", run.shown());
    run.line(&format!("MISMATCH {BLOCKED} expected=ALLOW got=BLOCK"));
    run.line("RESULT FAILED 0/1");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_python_agent_gets_all_three_outcomes() {
    let world = world().await;
    let out = tempfile::tempdir().expect("temp dir");
    generate_stubs(out.path()).await;
    let stubs = out.path().join("examples/python-agent/gen");
    let script = repo_root().join("examples/python-agent/agent.py");
    let agent = |args: &[String]| {
        let mut command = Command::new("python3");
        command
            .arg(&script)
            .args(args)
            .env("VG_STUBS_DIR", &stubs)
            .env("PYTHONDONTWRITEBYTECODE", "1");
        command
    };
    exercise(&world, agent, "py").await;
    world.server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_node_agent_gets_all_three_outcomes() {
    let world = world().await;
    let out = tempfile::tempdir().expect("temp dir");
    generate_stubs(out.path()).await;
    // Compile the example next to its freshly generated stubs: its sources
    // and tsconfig are copied beside `gen/`, and node_modules is the root's.
    let root = repo_root();
    let example = out.path().join("examples/node-agent");
    for entry in std::fs::read_dir(root.join("examples/node-agent")).expect("read example") {
        let path = entry.expect("entry").path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if path.is_file() && (name.ends_with(".ts") || name.ends_with(".json")) {
            std::fs::copy(&path, example.join(name)).expect("copy example source");
        }
    }
    let modules = root.join("node_modules");
    assert!(
        modules.join("typescript").is_dir() && modules.join("@grpc/grpc-js").is_dir(),
        "run `npm install` at the repository root first (scripts/test.sh does)"
    );
    std::os::unix::fs::symlink(&modules, out.path().join("node_modules"))
        .expect("link node_modules");
    run_tool(
        "node",
        vec![
            modules.join("typescript/bin/tsc").display().to_string(),
            "-p".to_owned(),
            example.display().to_string(),
        ],
        root,
    )
    .await;
    let script = example.join("dist/agent.js");
    let agent = |args: &[String]| {
        let mut command = Command::new("node");
        command.arg(&script).args(args);
        command
    };
    exercise(&world, agent, "node").await;
    world.server.stop().await;
}
