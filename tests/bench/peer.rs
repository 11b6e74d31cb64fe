//! The peer: node `oidc-provider` (`bench/peer/`) issuing client-credentials
//! JWT access tokens with the same algorithm and key size, driven by the same
//! load loop over HTTP at the same concurrency. Its packages are installed
//! with `npm ci` into a cache under /var/tmp the first time.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use base64::Engine;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::load::{Op, op};

/// The peer's sources, in the repository.
fn source_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("bench")
        .join("peer")
}

/// Where the peer runs from: its package files, `node_modules` and script.
const CACHE_DIR: &str = "/var/tmp/vaultguard-bench-peer";

/// Copies the package files and script to the cache and runs `npm ci` when
/// the lock file changed since the last install.
async fn install() -> Result<PathBuf> {
    let source = source_dir();
    let cache = PathBuf::from(CACHE_DIR);
    std::fs::create_dir_all(&cache)?;
    let lock = std::fs::read(source.join("package-lock.json"))?;
    let installed = cache.join("node_modules").join(".bench-lock.json");
    if std::fs::read(&installed).ok().as_deref() != Some(lock.as_slice()) {
        for file in ["package.json", "package-lock.json"] {
            std::fs::copy(source.join(file), cache.join(file))?;
        }
        eprintln!("peer: npm ci in {CACHE_DIR}");
        let status = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(&cache)
            // Keep stdout for the tables.
            .stdout(Stdio::from(std::io::stderr()))
            .status()
            .await
            .context("run npm")?;
        ensure!(status.success(), "npm ci failed: {status}");
        std::fs::write(&installed, &lock)?;
    }
    std::fs::copy(source.join("peer.mjs"), cache.join("peer.mjs"))?;
    Ok(cache)
}

/// A running peer.
pub struct Peer {
    pub port: u16,
    /// The processes whose CPU time counts (the workers).
    pub pids: Vec<u32>,
    child: Child,
    http: reqwest::Client,
}

impl Peer {
    /// Installs (once) and starts the peer with `workers` node processes.
    pub async fn start(workers: usize) -> Result<Self> {
        let dir = install().await?;
        let mut child = Command::new("node")
            .arg("peer.mjs")
            .current_dir(&dir)
            .env("PEER_WORKERS", workers.to_string())
            .env("NODE_ENV", "production")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("spawn node (is Node.js installed?)")?;
        let stdout = child.stdout.take().context("peer stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let ready = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .context("the peer did not start within 30 s")??
            .context("the peer exited")?;
        let mut words = ready.split_whitespace();
        if words.next() != Some("READY") {
            bail!("unexpected peer output: {ready}");
        }
        let port = words.next().context("no port")?.parse()?;
        let pids = words
            .next()
            .context("no pids")?
            .split(',')
            .map(str::parse)
            .collect::<Result<Vec<u32>, _>>()?;
        // Keep reading (and dropping) the peer's stdout so it never blocks.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Self {
            port,
            pids,
            child,
            http: reqwest::Client::builder().tcp_nodelay(true).build()?,
        })
    }

    pub fn cpu_seconds(&self) -> Result<f64> {
        let mut total = 0.0;
        for pid in &self.pids {
            total += crate::server::cpu_seconds(*pid)?;
        }
        Ok(total)
    }

    /// The client-credentials grant for the resource of `algorithm`
    /// (`rs256`, `es256`, `eddsa`), checked for a token.
    pub fn token_op(&self, algorithm: &str) -> Op {
        let url = Arc::new(format!("http://127.0.0.1:{}/token", self.port));
        let body = format!(
            "grant_type=client_credentials&scope=bench.read&resource=urn%3Abench%3A{algorithm}"
        );
        let basic = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD
                .encode("bench-client:bench-client-secret-7d1f0e9b2c4a")
        );
        let http = self.http.clone();
        op(move |_| {
            let request = http
                .post(url.as_str())
                .header(reqwest::header::AUTHORIZATION, basic.clone())
                .header(
                    reqwest::header::CONTENT_TYPE,
                    "application/x-www-form-urlencoded",
                )
                .body(body.clone());
            async move {
                let response = request.send().await?;
                ensure!(response.status().is_success(), "{}", response.status());
                let answer: serde_json::Value = response.json().await?;
                ensure!(
                    answer["access_token"]
                        .as_str()
                        .is_some_and(|t| !t.is_empty()),
                    "no access_token"
                );
                Ok(None)
            }
        })
    }

    pub async fn stop(mut self) -> Result<()> {
        crate::server::terminate(&mut self.child, Duration::from_secs(5)).await
    }
}
