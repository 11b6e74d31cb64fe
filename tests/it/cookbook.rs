//! The grpcurl cookbook, `docs/admin.md`, executed: every ```` ```sh ```` block
//! of the page, in the order written, against a fresh server, with the real
//! `grpcurl` binary and the real `vaultguard token` CLI, so the page cannot
//! rot. The conventions (stated on the page too):
//!
//! - a block is cut into steps after each run of `# expect: <text>` lines;
//!   each step runs in `bash` with `set -euo pipefail`, must exit 0, and its
//!   stdout and stderr together must contain every `<text>`;
//! - the steps share one shell session: the variables the page assigns and
//!   the functions it defines are carried from step to step;
//! - `$VG_GRPC`/`$VG_HTTP` point at the test server, and
//!   `VAULTGUARD_DATA_DIR`, `VAULTGUARD_DATABASE_URL` and
//!   `VAULTGUARD_HTTP_ADDR` name its data dir, database and HTTP address, so
//!   the CLI mints with the server's master key and issuer;
//! - the one substitution: the CLI lines' `cargo run -q -p vaultguard-server
//!   --bin vaultguard --` prefix becomes the binary that command would run
//!   (`scripts/test.sh` builds it before the tests and names it in
//!   `VAULTGUARD_TEST_CLI`; run otherwise, `target/<profile>/vaultguard`,
//!   rebuilt here first when it is missing or older than the server's
//!   sources). Running cargo itself inside a test would wait on the build
//!   lock of whatever cargo holds the target directory (`cargo test` does,
//!   for the whole run). The CLI's arguments run as written.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use vaultguard_tests::TestServer;

const COOKBOOK: &str = "docs/admin.md";
const EXPECT: &str = "# expect:";
/// How the page runs the CLI; the test runs the binary it would start.
const CLI_PREFIX: &str = "cargo run -q -p vaultguard-server --bin vaultguard --";
/// The longest one step may take (a `cargo run` that must build the CLI).
const STEP_TIMEOUT: Duration = Duration::from_secs(240);

/// One runnable step of the page.
#[derive(Debug)]
struct Step {
    /// 1-based line of the step's first line in the page.
    line: usize,
    script: String,
    expects: Vec<String>,
}

/// The steps of every ```` ```sh ```` block of `markdown`, in order.
fn steps(markdown: &str) -> Vec<Step> {
    let mut steps = Vec::new();
    let mut in_block = false;
    let mut current: Option<Step> = None;
    for (index, raw) in markdown.lines().enumerate() {
        let line = raw.trim_end();
        if !in_block {
            in_block = line == "```sh";
            continue;
        }
        if line.starts_with("```") {
            in_block = false;
            if let Some(step) = current.take()
                && !step.script.trim().is_empty()
            {
                steps.push(step);
            }
            continue;
        }
        if let Some(expect) = line.trim_start().strip_prefix(EXPECT) {
            let step = current.get_or_insert_with(|| Step {
                line: index + 1,
                script: String::new(),
                expects: Vec::new(),
            });
            step.expects.push(expect.trim().to_owned());
            continue;
        }
        if current
            .as_ref()
            .is_some_and(|step| !step.expects.is_empty())
        {
            steps.extend(current.take());
        }
        let step = current.get_or_insert_with(|| Step {
            line: index + 1,
            script: String::new(),
            expects: Vec::new(),
        });
        step.script.push_str(raw);
        step.script.push('\n');
    }
    assert!(!in_block, "{COOKBOOK}: unterminated ```sh block");
    steps
}

/// The names of the shell variables `script` assigns (`NAME=…` at the start
/// of a line, optionally after `export`).
fn assigned_names(script: &str) -> Vec<String> {
    script
        .lines()
        .filter_map(|line| {
            let line = line.trim_start();
            let line = line.strip_prefix("export ").unwrap_or(line);
            let name: String = line
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            let starts_well = name.chars().next().is_some_and(|c| !c.is_ascii_digit());
            (starts_well && line[name.len()..].starts_with('=')).then_some(name)
        })
        .collect()
}

/// The repository root (the cookbook's commands run there, as a human runs
/// them from the checkout).
pub(crate) fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The profile directory this test binary was built in
/// (`<target>/<profile>/deps/it-…` → `<target>/<profile>`).
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    exe.parent()
        .and_then(Path::parent)
        .expect("the test binary lives in <target>/<profile>/deps")
        .to_path_buf()
}

/// The newest modification time of the files under `path`.
fn newest_mtime(path: &Path) -> SystemTime {
    let Ok(meta) = std::fs::metadata(path) else {
        return SystemTime::UNIX_EPOCH;
    };
    if !meta.is_dir() {
        return meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
    }
    std::fs::read_dir(path)
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| newest_mtime(&entry.path()))
        .max()
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

/// The `vaultguard` binary `cargo run -p vaultguard-server --bin vaultguard`
/// would start: the one `VAULTGUARD_TEST_CLI` names (`scripts/test.sh`
/// builds it before the tests and sets it, so no test runs cargo), else
/// `target/<profile>/vaultguard`, built first when it is missing or older
/// than the sources it is built from.
pub(crate) fn cli_binary() -> PathBuf {
    if let Some(given) = std::env::var_os("VAULTGUARD_TEST_CLI") {
        let binary = PathBuf::from(given);
        assert!(
            binary.is_file(),
            "VAULTGUARD_TEST_CLI={} is not a file",
            binary.display()
        );
        return binary;
    }
    let profile = profile_dir();
    let binary = profile.join("vaultguard");
    let root = repo_root();
    let sources = ["server", "proto", "migrations", "Cargo.toml", "Cargo.lock"]
        .iter()
        .map(|p| newest_mtime(&root.join(p)))
        .max()
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let built = std::fs::metadata(&binary)
        .and_then(|m| m.modified())
        .unwrap_or(SystemTime::UNIX_EPOCH);
    if built < sources {
        let target = profile.parent().expect("target dir");
        let mut cargo = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cargo
            .args([
                "build",
                "-q",
                "-p",
                "vaultguard-server",
                "--bin",
                "vaultguard",
            ])
            .env("CARGO_TARGET_DIR", target)
            .current_dir(&root);
        if profile.ends_with("release") {
            cargo.arg("--release");
        }
        let output = cargo.output().expect("run cargo build");
        assert!(
            output.status.success(),
            "cargo build of the vaultguard CLI failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    assert!(binary.is_file(), "{} was not built", binary.display());
    binary
}

/// The exit status, stdout and stderr of `bash script` (killed after
/// [`STEP_TIMEOUT`]).
fn run_bash(script: &Path, dir: &Path, envs: &[(&str, String)]) -> (String, String, String) {
    let stdout_path = dir.join("stdout");
    let stderr_path = dir.join("stderr");
    let mut command = Command::new("bash");
    command
        .arg(script)
        .current_dir(repo_root())
        .stdin(Stdio::null())
        .stdout(File::create(&stdout_path).expect("stdout file"))
        .stderr(File::create(&stderr_path).expect("stderr file"));
    for (key, value) in envs {
        command.env(key, value);
    }
    let mut child = command.spawn().expect("run bash");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for bash") {
            break status.to_string();
        }
        if started.elapsed() > STEP_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            break format!("killed after {STEP_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let read = |path: &Path| std::fs::read_to_string(path).unwrap_or_default();
    (status, read(&stdout_path), read(&stderr_path))
}

#[test]
fn the_steps_are_cut_after_each_run_of_expectations() {
    let page = "text\n```sh\nA=1\necho $A\n# expect: 1\n# expect: 1\nB=2\n\n```\n```text\nnot run\n```\n```sh\nfalse || true\n# expect: \n```\n";
    let steps = steps(page);
    assert_eq!(steps.len(), 3, "{steps:?}");
    assert_eq!(
        (steps[0].line, steps[0].script.as_str()),
        (3, "A=1\necho $A\n")
    );
    assert_eq!(steps[0].expects, ["1", "1"]);
    assert_eq!(
        (steps[1].script.as_str(), steps[1].expects.len()),
        ("B=2\n\n", 0)
    );
    assert_eq!(steps[2].script, "false || true\n");
    assert_eq!(
        assigned_names("A=1\n  export B_2=$(x)\nC =3\n9D=4\nif E=5; then\nF+=6\n"),
        ["A", "B_2"]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn every_cookbook_command_runs_as_written() {
    let markdown = std::fs::read_to_string(repo_root().join(COOKBOOK)).expect("read docs/admin.md");
    let steps = steps(&markdown);
    assert!(
        steps.len() >= 20,
        "{COOKBOOK} has only {} runnable steps",
        steps.len()
    );
    // Every grpcurl call goes through reflection on the plaintext listener.
    for step in &steps {
        for line in step.script.lines().filter(|l| l.contains("grpcurl -")) {
            assert!(
                line.contains("grpcurl -plaintext"),
                "{COOKBOOK}:{}: grpcurl without -plaintext first: {line}",
                step.line
            );
            assert!(
                !line.contains("-proto") && !line.contains("-import-path"),
                "{COOKBOOK}:{}: the cookbook uses reflection, not proto files: {line}",
                step.line
            );
        }
    }

    assert!(
        markdown.matches(CLI_PREFIX).count() >= 3,
        "{COOKBOOK} no longer runs the CLI as `{CLI_PREFIX} token …`; update this test"
    );
    let cli = tokio::task::spawn_blocking(cli_binary)
        .await
        .expect("build task");

    let server = TestServer::start().await;
    let work = tempfile::tempdir().expect("temp dir");
    let state = work.path().join("state.sh");
    std::fs::write(&state, "").expect("state file");
    let envs = vec![
        ("VG_GRPC", server.grpc_addr.to_string()),
        ("VG_HTTP", server.http_addr.to_string()),
        (
            "VAULTGUARD_DATA_DIR",
            server.data_dir().display().to_string(),
        ),
        ("VAULTGUARD_DATABASE_URL", server.database_url.clone()),
        ("VAULTGUARD_HTTP_ADDR", server.http_addr.to_string()),
        ("TMPDIR", work.path().display().to_string()),
    ];

    let mut names: Vec<String> = Vec::new();
    for step in &steps {
        for name in assigned_names(&step.script) {
            if !names.contains(&name) {
                names.push(name);
            }
        }
        // Run the step after the state the earlier ones left, then save the
        // variables assigned so far and every function for the next one.
        let script = format!(
            "set -euo pipefail\nsource {state}\n{body}\n{{ declare -p {names} 2>/dev/null || true; declare -f; }} > {state}.next\nmv {state}.next {state}\n",
            state = shell_quote(&state),
            body = step.script.replace(CLI_PREFIX, &shell_quote(&cli)),
            names = names.join(" "),
        );
        eprintln!("cookbook: {COOKBOOK}:{}", step.line);
        let path = work.path().join("step.sh");
        std::fs::write(&path, script).expect("write step");
        let dir = work.path().to_path_buf();
        let envs_for_step = envs.clone();
        let (status, stdout, stderr) =
            tokio::task::spawn_blocking(move || run_bash(&path, &dir, &envs_for_step))
                .await
                .expect("step task");
        let shown = format!(
            "{COOKBOOK}:{line}:\n{script}\n--- status: {status}\n--- stdout:\n{stdout}\n--- stderr:\n{stderr}",
            line = step.line,
            script = step.script.trim_end(),
        );
        assert_eq!(status, "exit status: 0", "the step failed\n{shown}");
        let output = format!("{stdout}\n{stderr}");
        for expect in &step.expects {
            assert!(
                output.contains(expect.as_str()),
                "the output lacks {expect:?}\n{shown}"
            );
        }
    }
    server.stop().await;
}

/// `path` single-quoted for bash.
fn shell_quote(path: &Path) -> String {
    format!("'{}'", path.display().to_string().replace('\'', r"'\''"))
}
