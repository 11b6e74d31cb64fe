//! Structured logging. Secrets never reach a log line: the types holding
//! them print nothing in `Debug`, handlers never log request bodies, and
//! `authorization` metadata is never recorded.

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber: `json` or `text` to stderr, filtered by
/// `RUST_LOG` (default `info`).
pub fn init(format: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = if format == "json" {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
    if let Err(err) = result {
        eprintln!("logging not initialised: {err}");
    }
}
