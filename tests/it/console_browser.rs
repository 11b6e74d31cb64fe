//! The console in a real headless Chromium (Debian's `chromium`, driven by
//! playwright-core from `tests/console/scenarios.mjs`), against the real
//! server started here, a real OpenID Provider (node `oidc-provider`, with
//! the login page the browser fills in) and the Python example agent.
//!
//! This test builds the world — the provider and its users, the server
//! trusting it for the console's sign-in, three tenants (Globex's agent asks
//! Acme; Initech is the other tenant), Acme's STEP_UP rules (one with a
//! quorum of two), a one-time sign-in link from `vaultguard console-link` —
//! and hands it to the scenario script as JSON. The script signs people in
//! and checks, in one browser and in sequence: the request appears in the
//! open queue within 1 s without a reload; Approve, the agent's watch gets
//! the token, the queue empties; deny with a comment; a quorum of two; the
//! XSS binding message stays text; an auditor sees no Approve button and
//! the server refuses the call made by hand; Initech's approver never sees
//! Acme's request; the one-time link signs in once; axe-core finds no
//! serious or critical violation on any page.
//!
//! Needs `/usr/bin/chromium` (or `VAULTGUARD_CHROMIUM`), the root `npm
//! install` (playwright-core, axe-core, oidc-provider), python3 with the
//! Python agent's packages, and the CLI binary (`VAULTGUARD_TEST_CLI`):
//! `scripts/test.sh` provides all of them and runs this test on SQLite only.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use vaultguard_client::pb;
use vaultguard_server::config::TrustedIssuer;
use vaultguard_tests::fixtures::{add_rule, inbound};
use vaultguard_tests::{Running, TestOptions, TestServer, run_to_end};

use crate::cookbook::cli_binary;

/// The longest the whole scenario script may take.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(100);
/// The console's OAuth client at the provider (tests/console/oidc-provider.mjs).
const CONSOLE_CLIENT: &str = "vaultguard-console";
const ORG_ACME: &str = "org_acme";
const ORG_INITECH: &str = "org_initech";

/// Acme's STEP_UP actions, one per scenario, and their quorums.
const ACTIONS: [(&str, &str, u32); 4] = [
    ("approve", "payment.send", 1),
    ("deny", "invoice.pay", 1),
    ("quorum", "wire.send", 2),
    ("xss", "report.export", 1),
];

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The provider's users: `(key in the world, username, org, roles)`.
const USERS: [(&str, &str, &str, &str); 5] = [
    ("approver", "alice", ORG_ACME, "approver"),
    ("approver2", "bob", ORG_ACME, "approver"),
    ("auditor", "carol", ORG_ACME, "auditor"),
    ("other_approver", "dave", ORG_INITECH, "approver"),
    ("admin", "erin", ORG_ACME, "admin"),
];

fn password(username: &str) -> String {
    format!("{username}-correct-horse")
}

/// Starts tests/console/oidc-provider.mjs on a free port; returns it and
/// its issuer URL.
fn start_provider() -> (Running, String) {
    let users: Vec<_> = USERS
        .iter()
        .map(|(_, name, org, role)| {
            json!({"username": name, "password": password(name), "org_id": org, "roles": [role]})
        })
        .collect();
    let mut child = Running(
        Command::new("node")
            .arg(repo_root().join("tests/console/oidc-provider.mjs"))
            .current_dir(repo_root())
            .env("OIDC_USERS", serde_json::Value::from(users).to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the OpenID Provider (node)"),
    );
    let stdout = child.0.stdout.take().expect("provider stdout");
    let mut stdout = BufReader::new(stdout);
    let mut line = String::new();
    stdout
        .read_line(&mut line)
        .expect("read the provider's first line");
    // Keep reading: a provider writing to a closed pipe would die.
    std::thread::spawn(move || {
        for line in stdout.lines() {
            let Ok(line) = line else { break };
            eprintln!("oidc-provider: {line}");
        }
    });
    let issuer = line
        .trim()
        .strip_prefix("ISSUER ")
        .unwrap_or_else(|| panic!("the provider did not announce its issuer: {line:?}"))
        .to_owned();
    (child, issuer)
}

/// A STEP_UP inbound rule for `action` needing `quorum` approvers.
async fn create_rule(admin: &vaultguard_client::VaultGuardClient, action: &str, quorum: u32) {
    let rule = pb::Rule {
        max_ttl_seconds: 600,
        approvals_required: quorum,
        ..inbound(action, pb::Effect::StepUp)
    };
    add_rule(admin, rule).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_console_works_in_a_real_browser() {
    let started = Instant::now();
    let out = tempfile::tempdir().expect("temp dir");
    // The Python agent's stubs, from proto/ as scripts/gen-stubs.sh makes them.
    run_to_end(
        Command::new("bash")
            .arg(repo_root().join("scripts/gen-stubs.sh"))
            .arg(out.path())
            .current_dir(repo_root()),
    );
    let stubs = out.path().join("examples/python-agent/gen");

    let (_provider, issuer) = start_provider();
    let server = TestServer::start_with(TestOptions {
        trusted_issuers: vec![TrustedIssuer {
            issuer: issuer.clone(),
            audience: "vaultguard".to_owned(),
            tenant_claim: "org_id".to_owned(),
            roles_claim: "roles".to_owned(),
            role_prefix: String::new(),
            console_client_id: Some(CONSOLE_CLIENT.to_owned()),
            console_client_secret: None,
            console_scopes: vec!["vaultguard".to_owned()],
            console_display_name: Some("Test SSO".to_owned()),
        }],
        ..TestOptions::default()
    })
    .await;

    let globex = server.create_tenant("globex").await;
    let acme = server.create_tenant("acme").await;
    let initech = server.create_tenant("initech").await;
    crate::oidc::bind(&server, &acme.id, &issuer, ORG_ACME).await;
    crate::oidc::bind(&server, &initech.id, &issuer, ORG_INITECH).await;
    let (agent, secret, _) = server.create_agent(&globex.id, "console-e2e-bot").await;
    let acme_admin = server
        .human(&acme.id, "admin@acme.test", &[pb::Role::Admin])
        .await;
    for (_, action, quorum) in ACTIONS {
        create_rule(&acme_admin, action, quorum).await;
    }
    // Initech has a rule too, so its approver's empty queue is not for want
    // of rules.
    let initech_admin = server
        .human(&initech.id, "admin@initech.test", &[pb::Role::Admin])
        .await;
    create_rule(&initech_admin, "payment.send", 1).await;

    let token_issuer = server.state.keys.issuer().to_owned();
    let link = run_to_end(
        Command::new(cli_binary())
            .arg("--data-dir")
            .arg(server.data_dir())
            .args(["--database-url", &server.database_url])
            .args(["--issuer", &token_issuer])
            .args(["console-link", "--tenant", &acme.id, "--role", "approver"])
            .args(["--subject", "linked-approver"]),
    );
    let link = link.trim().to_owned();
    assert!(
        link.starts_with(&format!("{}/console/link#", server.http_url())),
        "console-link printed {link:?}, not a link to {}",
        server.http_url()
    );

    let users: serde_json::Map<String, serde_json::Value> = USERS
        .iter()
        .map(|(key, name, _, _)| {
            (
                (*key).to_owned(),
                json!({"username": name, "password": password(name)}),
            )
        })
        .collect();
    let world = json!({
        "base": server.http_url(),
        "grpc": server.grpc_addr.to_string(),
        "token_issuer": token_issuer,
        "stubs_dir": stubs,
        "receiving_tenant": acme.id,
        "other_tenant": initech.id,
        "agent": {"id": agent.id, "secret": secret},
        "actions": ACTIONS.iter().map(|(k, a, _)| ((*k).to_owned(), json!(a))).collect::<serde_json::Map<_, _>>(),
        "users": users,
        "link": link,
        // VAULTGUARD_CONSOLE_SCREENSHOTS=<dir>: the scenarios also photograph
        // the queue, a request, the graph and the audit log (README pictures).
        "screenshots": std::env::var("VAULTGUARD_CONSOLE_SCREENSHOTS").ok(),
    });
    let world_file = out.path().join("world.json");
    std::fs::write(&world_file, world.to_string()).expect("write world.json");

    let setup = started.elapsed();
    let script = tokio::task::spawn_blocking(move || run_script(&world_file))
        .await
        .expect("scenario task");
    eprintln!(
        "console browser test: setup {setup:?}, scenarios {:?}\n{}",
        script.elapsed, script.stdout
    );
    assert!(
        script.success,
        "the console scenarios failed ({}):\n{}\n--- stderr:\n{}",
        script.status, script.stdout, script.stderr
    );
    // Every scenario ran and passed: a script that skipped one cannot pass.
    for name in [
        "approver-signs-in-with-oidc",
        "step-up-appears-live-and-is-approved",
        "deny-with-comment",
        "quorum-of-two-needs-a-second-approver",
        "xss-binding-message-is-inert-and-auditor-cannot-approve",
        "one-time-link-signs-in-once",
        "accessibility-of-every-page",
    ] {
        assert!(
            script
                .stdout
                .lines()
                .any(|line| line.starts_with(&format!("PASS {name} "))),
            "no PASS line for {name}:\n{}",
            script.stdout
        );
    }
    assert!(
        script
            .stdout
            .lines()
            .any(|l| l.starts_with("RESULT ok 7/7")),
        "{}",
        script.stdout
    );
    server.stop().await;
}

struct ScriptRun {
    success: bool,
    status: String,
    stdout: String,
    stderr: String,
    elapsed: Duration,
}

/// Runs tests/console/scenarios.mjs on `world_file`, killing it after
/// [`SCRIPT_TIMEOUT`].
fn run_script(world_file: &Path) -> ScriptRun {
    let started = Instant::now();
    let mut child = Running(
        Command::new("node")
            .arg(repo_root().join("tests/console/scenarios.mjs"))
            .arg("--world")
            .arg(world_file)
            .current_dir(repo_root())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start node tests/console/scenarios.mjs"),
    );
    let mut stdout = child.0.stdout.take().expect("stdout");
    let mut stderr = child.0.stderr.take().expect("stderr");
    let out_reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        text
    });
    let err_reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let status = loop {
        if let Some(status) = child.0.try_wait().expect("wait for node") {
            break Some(status);
        }
        if started.elapsed() > SCRIPT_TIMEOUT {
            let _ = child.0.kill();
            let _ = child.0.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stdout = out_reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    ScriptRun {
        success: status.is_some_and(|s| s.success()),
        status: status.map_or_else(
            || format!("killed after {SCRIPT_TIMEOUT:?}"),
            |s| s.to_string(),
        ),
        stdout,
        stderr,
        elapsed: started.elapsed(),
    }
}
