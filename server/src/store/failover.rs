//! Finding the writable PostgreSQL host among a primary and its standbys,
//! and following it through a failover without a restart.
//!
//! `database_url` may name several hosts the way libpq does
//! (`postgres://user@db1:5432,db2:5432/vaultguard?target_session_attrs=read-write`),
//! as operators write it for pg_auto_failover or Patroni. The pool is only
//! ever pointed at the host that answers `pg_is_in_recovery() = false`. The
//! health probe calls [`Failover::check`]: while the pool's host is writable
//! nothing else happens; when it fails or turns read-only every host is asked
//! again, the pool is re-pointed at the writable one, and every connection
//! opened before that moment is dropped instead of reused ([`SwitchMark`]).
//! While no host is writable the probe reports NOT_SERVING. The LISTEN
//! connection follows the pool's options on its next reconnect; advisory
//! locks are all transaction-scoped, so nothing else holds a session on the
//! old primary.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use sea_orm::DatabaseConnection;
use sea_orm::sqlx::postgres::{PgConnectOptions, PgConnection};
use sea_orm::sqlx::{ConnectOptions as _, Connection as _};

/// One host of a multi-host URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    pub host: String,
    pub port: u16,
}

impl std::fmt::Display for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// A PostgreSQL URL split into its hosts and one single-host URL per host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hosts {
    pub hosts: Vec<Host>,
    /// `urls[i]` is the configured URL with only `hosts[i]` in it and
    /// `target_session_attrs` removed (sqlx takes one host).
    pub urls: Vec<String>,
}

/// The port libpq assumes when a host names none.
const DEFAULT_PORT: u16 = 5432;

/// The most hosts one URL may name.
const MAX_HOSTS: usize = 16;

/// Splits a libpq-style PostgreSQL URL into its hosts. Errors name the
/// problem, never the URL (it may hold a password).
pub fn parse_hosts(url: &str) -> Result<Hosts, String> {
    let (scheme, after) = url
        .split_once("://")
        .ok_or_else(|| "database_url: expected postgres://…".to_owned())?;
    let authority_end = after.find(['/', '?', '#']).unwrap_or(after.len());
    let (authority, rest) = after.split_at(authority_end);
    let (userinfo, host_list) = match authority.rfind('@') {
        Some(at) => authority.split_at(at + 1),
        None => ("", authority),
    };
    let mut hosts = Vec::new();
    for (index, item) in host_list.split(',').enumerate() {
        hosts.push(parse_host(item).map_err(|e| format!("database_url: host {}: {e}", index + 1))?);
    }
    if hosts.len() > MAX_HOSTS {
        return Err(format!("database_url: at most {MAX_HOSTS} hosts"));
    }
    let rest = strip_session_attrs(rest)?;
    let urls = hosts
        .iter()
        .map(|host| format!("{scheme}://{userinfo}{host}{rest}"))
        .collect();
    Ok(Hosts { hosts, urls })
}

fn parse_host(item: &str) -> Result<Host, &'static str> {
    let (host, port) = if let Some(bracketed) = item.strip_prefix('[') {
        let (host, after) = bracketed
            .split_once(']')
            .ok_or("an IPv6 address needs its closing ]")?;
        match after.strip_prefix(':') {
            Some(port) => (host, Some(port)),
            None if after.is_empty() => (host, None),
            None => return Err("unexpected text after the IPv6 address"),
        }
    } else {
        match item.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (item, None),
        }
    };
    if host.is_empty() {
        return Err("empty host name");
    }
    let port = match port {
        None | Some("") => DEFAULT_PORT,
        Some(port) => port
            .parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or("the port is not a number from 1 to 65535")?,
    };
    Ok(Host {
        host: host.to_owned(),
        port,
    })
}

/// Removes `target_session_attrs` from the query (sqlx does not know it).
/// VaultGuard writes, so only the values that pick the writable host are
/// accepted.
fn strip_session_attrs(rest: &str) -> Result<String, String> {
    let Some((path, query)) = rest.split_once('?') else {
        return Ok(rest.to_owned());
    };
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("target_session_attrs", "read-write" | "primary")) => {}
            Some(("target_session_attrs", _)) => {
                return Err(
                    "database_url: target_session_attrs must be read-write or primary \
                            (VaultGuard writes; it follows the writable host by itself)"
                        .to_owned(),
                );
            }
            _ => kept.push(pair),
        }
    }
    Ok(if kept.is_empty() {
        path.to_owned()
    } else {
        format!("{path}?{}", kept.join("&"))
    })
}

/// When the pool last changed host: connections opened before it are
/// dropped at their next acquire instead of reused. Read on every acquire,
/// so one atomic load.
#[derive(Debug)]
pub struct SwitchMark {
    base: Instant,
    /// Milliseconds after `base`; 0 while the pool never switched.
    at_ms: AtomicU64,
}

impl SwitchMark {
    pub fn new() -> Self {
        Self {
            base: Instant::now(),
            at_ms: AtomicU64::new(0),
        }
    }

    fn mark(&self) {
        let now = u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.at_ms.store(now.max(1), Ordering::Release);
    }

    /// True when a connection of this age was opened after the last switch.
    pub fn keeps(&self, age: Duration) -> bool {
        let at = self.at_ms.load(Ordering::Acquire);
        if at == 0 {
            return true;
        }
        let opened = self.base.elapsed().saturating_sub(age);
        opened >= Duration::from_millis(at)
    }
}

impl Default for SwitchMark {
    fn default() -> Self {
        Self::new()
    }
}

/// True on a host that does not take writes: a standby (in recovery), or a
/// primary that refuses them for now (pg_auto_failover holds a promoted
/// standby read-only until the monitor confirms it; libpq's
/// `target_session_attrs=read-write` asks the same two questions).
const READ_ONLY: &str =
    "SELECT pg_is_in_recovery() OR current_setting('transaction_read_only') = 'on'";

/// What one host said when asked whether it takes writes.
async fn is_writable(options: &PgConnectOptions, timeout: Duration) -> Result<bool, String> {
    let ask = async {
        let mut conn = PgConnection::connect_with(options).await?;
        let read_only: bool = sea_orm::sqlx::query_scalar(READ_ONLY)
            .fetch_one(&mut conn)
            .await?;
        let _ = conn.close().await;
        Ok::<_, sea_orm::sqlx::Error>(!read_only)
    };
    match tokio::time::timeout(timeout, ask).await {
        Ok(Ok(writable)) => Ok(writable),
        Ok(Err(err)) => Err(err.to_string()),
        Err(_) => Err("timed out".to_owned()),
    }
}

/// The first host (in the configured order, as libpq tries them) that takes
/// writes, with the options to reach it.
pub async fn find_writable(
    base: &PgConnectOptions,
    hosts: &[Host],
    timeout: Duration,
) -> Option<(usize, PgConnectOptions)> {
    for (index, host) in hosts.iter().enumerate() {
        let options = base
            .clone()
            .host(&host.host)
            .port(host.port)
            .disable_statement_logging();
        match is_writable(&options, timeout).await {
            Ok(true) => return Some((index, options)),
            Ok(false) => tracing::info!(%host, "database host takes no writes (a standby)"),
            Err(error) => tracing::info!(%host, %error, "database host unreachable"),
        }
    }
    None
}

/// How long the probe's question may wait for the pool.
const POOL_CHECK_TIMEOUT: Duration = Duration::from_millis(250);

/// What the probe found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// The pool's host takes writes.
    Writable,
    /// The pool's host failed or turned read-only, and the pool now points
    /// at the writable host it found (perhaps the same one, restarted).
    Switched,
    /// No host takes writes.
    NoWritableHost,
}

/// The database's writable host, followed through failovers (PostgreSQL),
/// or a plain liveness check (SQLite).
#[derive(Debug)]
pub struct Failover {
    db: DatabaseConnection,
    hosts: Vec<Host>,
    current: AtomicUsize,
    mark: Arc<SwitchMark>,
    timeout: Duration,
}

impl Failover {
    pub fn new(
        db: DatabaseConnection,
        hosts: Vec<Host>,
        current: usize,
        mark: Arc<SwitchMark>,
        timeout: Duration,
    ) -> Self {
        Self {
            db,
            hosts,
            current: AtomicUsize::new(current),
            mark,
            timeout,
        }
    }

    /// Which configured host the pool uses (0 on SQLite).
    pub fn current(&self) -> usize {
        self.current.load(Ordering::Acquire)
    }

    /// Checks the pool's host and, when it fails or no longer takes writes,
    /// finds the one that does and points the pool at it.
    pub async fn check(&self) -> Probe {
        if !super::is_postgres(&self.db) {
            return match tokio::time::timeout(self.timeout, super::ping(&self.db)).await {
                Ok(Ok(())) => Probe::Writable,
                _ => Probe::NoWritableHost,
            };
        }
        let pool = self.db.get_postgres_connection_pool();
        // Briefly: while the host is gone the pool keeps retrying its
        // connect until the acquire timeout; the hosts are asked directly
        // below. A pool only busy answers through that path too (and keeps
        // its connections).
        let asked = tokio::time::timeout(
            POOL_CHECK_TIMEOUT.min(self.timeout),
            sea_orm::sqlx::query_scalar::<_, bool>(READ_ONLY).fetch_one(pool),
        )
        .await;
        let (busy, reason) = match asked {
            Ok(Ok(false)) => return Probe::Writable,
            Ok(Ok(true)) => (
                false,
                "the database host is in recovery (a standby)".to_owned(),
            ),
            Ok(Err(sea_orm::sqlx::Error::PoolTimedOut)) | Err(_) => (true, "timed out".to_owned()),
            Ok(Err(err)) => (false, err.to_string()),
        };
        let base = pool.connect_options();
        let Some((index, options)) = find_writable(&base, &self.hosts, self.timeout).await else {
            tracing::error!(%reason, hosts = self.hosts.len(), "no writable database host");
            return Probe::NoWritableHost;
        };
        let previous = self.current.swap(index, Ordering::AcqRel);
        if previous == index && busy {
            // The pool was only busy: its host still takes writes and its
            // connections are not suspect.
            return Probe::Writable;
        }
        if previous != index {
            pool.set_connect_options(options);
            metrics::counter!("vaultguard_database_failovers_total").increment(1);
            tracing::warn!(
                from = %self.hosts.get(previous).map(ToString::to_string).unwrap_or_default(),
                to = %self.hosts[index],
                %reason,
                "database primary moved; pool re-pointed"
            );
        } else {
            tracing::warn!(host = %self.hosts[index], %reason, "database host back; old connections dropped");
        }
        self.mark.mark();
        Probe::Switched
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(h: &str, p: u16) -> Host {
        Host {
            host: h.to_owned(),
            port: p,
        }
    }

    #[test]
    fn a_multi_host_url_becomes_one_url_per_host() {
        let parsed = parse_hosts(
            "postgres://vg:s3cret@db1:5433,db2,[::1]:6000/vaultguard?target_session_attrs=read-write&sslmode=disable",
        )
        .unwrap();
        assert_eq!(
            parsed.hosts,
            vec![host("db1", 5433), host("db2", 5432), host("::1", 6000)]
        );
        assert_eq!(
            parsed.urls,
            vec![
                "postgres://vg:s3cret@db1:5433/vaultguard?sslmode=disable",
                "postgres://vg:s3cret@db2:5432/vaultguard?sslmode=disable",
                "postgres://vg:s3cret@[::1]:6000/vaultguard?sslmode=disable",
            ]
        );
    }

    #[test]
    fn a_single_host_url_is_kept() {
        let parsed = parse_hosts("postgres://postgres@127.0.0.1:5432/vg").unwrap();
        assert_eq!(parsed.hosts, vec![host("127.0.0.1", 5432)]);
        assert_eq!(parsed.urls, vec!["postgres://postgres@127.0.0.1:5432/vg"]);
        let parsed = parse_hosts("postgresql://localhost?target_session_attrs=primary").unwrap();
        assert_eq!(parsed.urls, vec!["postgresql://localhost:5432"]);
    }

    #[test]
    fn bad_urls_are_named_without_the_password() {
        for (url, expected) in [
            ("postgres://u:pw@db1:x/vg", "host 1: the port"),
            ("postgres://u:pw@db1,,db3/vg", "host 2: empty host name"),
            ("postgres://u:pw@db1:0/vg", "host 1: the port"),
            ("postgres://u:pw@[::1/vg", "closing ]"),
            (
                "postgres://u:pw@db1/vg?target_session_attrs=read-only",
                "read-write or primary",
            ),
            ("db1:5432", "expected postgres://"),
        ] {
            let err = parse_hosts(url).unwrap_err();
            assert!(err.contains(expected), "{url}: {err}");
            assert!(!err.contains("pw"), "{err}");
        }
    }

    #[test]
    fn connections_opened_before_a_switch_are_not_kept() {
        let mark = SwitchMark::new();
        assert!(mark.keeps(Duration::from_secs(3600)));
        std::thread::sleep(Duration::from_millis(5));
        mark.mark();
        assert!(!mark.keeps(Duration::from_millis(50)));
        std::thread::sleep(Duration::from_millis(5));
        assert!(mark.keeps(Duration::from_millis(1)));
    }
}
