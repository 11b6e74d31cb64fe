//! A real pg_auto_failover formation (a monitor, a primary and a standby,
//! each its own PostgreSQL) run by `scripts/pg-ha.sh`, for the failover
//! test and the `replication.sync_standby` benchmark; torn down on drop.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};

/// A running formation.
pub struct Formation {
    script: PathBuf,
    dir: String,
    /// The libpq multi-host URL of both data nodes.
    pub url: String,
}

/// Runs `scripts/pg-ha.sh` with `args`; its last line of output.
fn run(script: &PathBuf, args: &[String]) -> Result<String> {
    let output = Command::new(script)
        .args(args)
        .output()
        .with_context(|| format!("run {}", script.display()))?;
    if !output.status.success() {
        bail!(
            "pg-ha.sh {args:?} failed:\n{}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .trim()
        .to_owned())
}

impl Formation {
    /// `pg-ha.sh up` in a fresh directory under /var/tmp, the monitor on
    /// `base_port` and the nodes on the next two; the standby synchronous
    /// or not.
    pub async fn up(base_port: u16, synchronous: bool) -> Result<Self> {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/pg-ha.sh");
        let dir = format!("/var/tmp/vg-ha-{}", uuid::Uuid::new_v4().simple());
        let mut args = vec!["up".to_owned(), dir.clone(), base_port.to_string()];
        if !synchronous {
            args.push("--async".to_owned());
        }
        let script_for_up = script.clone();
        let url = tokio::task::spawn_blocking(move || run(&script_for_up, &args)).await??;
        let formation = Self { script, dir, url };
        ensure!(
            formation.url.starts_with("postgres://"),
            "pg-ha.sh up printed {}",
            formation.url
        );
        Ok(formation)
    }

    /// One subcommand on this formation (`kill-primary`, `wait-primary`,
    /// `rejoin a`, `sync on`): its last line of output.
    pub async fn call(&self, args: &[&str]) -> Result<String> {
        let (command, rest) = args.split_first().context("no pg-ha.sh subcommand")?;
        let mut all = vec![(*command).to_owned(), self.dir.clone()];
        all.extend(rest.iter().map(|a| (*a).to_owned()));
        let script = self.script.clone();
        tokio::task::spawn_blocking(move || run(&script, &all)).await?
    }
}

impl Drop for Formation {
    fn drop(&mut self) {
        let _ = Command::new(&self.script)
            .args(["down", &self.dir])
            .output();
    }
}
