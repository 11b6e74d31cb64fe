//! A raw HTTP/2 client that opens many gRPC calls whose request message
//! never arrives (the slow-body flood of issue 23, item 3), shared by the
//! integration tests (`tests/it/slow_body.rs`) and the benchmark's
//! `flood.slow_body` scenario.
//!
//! Each call sends its headers and then only what [`FloodSpec::body`] says
//! (by default the 5-byte gRPC frame prefix announcing a 100-byte message),
//! and never ends its request stream. The `h2` crate is used directly: a gRPC
//! client library always sends whole messages.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use prost::bytes::Bytes;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The IssueToken path: public, so the flood needs no credential.
pub const ISSUE_TOKEN: &str = "/vaultguard.v1.AuthService/IssueToken";

/// A gRPC frame prefix (uncompressed) announcing a message of `length`
/// bytes.
pub fn frame_prefix(length: u32) -> Vec<u8> {
    let mut prefix = vec![0];
    prefix.extend_from_slice(&length.to_be_bytes());
    prefix
}

/// `message` as one gRPC frame (prefix and message).
pub fn framed(message: &[u8]) -> Vec<u8> {
    let mut frame = frame_prefix(u32::try_from(message.len()).unwrap_or(u32::MAX));
    frame.extend_from_slice(message);
    frame
}

/// What the flood opens.
#[derive(Debug, Clone)]
pub struct FloodSpec {
    /// The server's gRPC listener (plaintext).
    pub addr: SocketAddr,
    /// HTTP/2 connections.
    pub connections: usize,
    /// Calls held open on each connection at once (the client also waits
    /// for the server's `SETTINGS_MAX_CONCURRENT_STREAMS`).
    pub streams_per_connection: usize,
    /// The method's full path.
    pub path: String,
    /// Extra request headers (an `authorization` bearer, an
    /// `x-request-id`).
    pub headers: Vec<(String, String)>,
    /// What each call sends of its request body.
    pub body: Vec<u8>,
    /// Whether the request stream is ended after `body` (a whole message
    /// that never ends its stream is the default's cousin).
    pub end_stream: bool,
    /// Open a new call in place of each one the server answers, so the
    /// flood keeps its size for as long as it runs.
    pub reopen: bool,
}

impl FloodSpec {
    /// The flood of the issue: `connections` × `streams_per_connection`
    /// IssueToken calls, each sending a prefix announcing 100 bytes that
    /// never come, reopened when answered.
    pub fn issue_token(
        addr: SocketAddr,
        connections: usize,
        streams_per_connection: usize,
    ) -> Self {
        Self {
            addr,
            connections,
            streams_per_connection,
            path: ISSUE_TOKEN.to_owned(),
            headers: Vec::new(),
            body: frame_prefix(100),
            end_stream: false,
            reopen: true,
        }
    }
}

/// What the server answered the flood's calls so far.
#[derive(Debug, Default)]
pub struct FloodCounts {
    /// Calls whose headers and body bytes were handed to the connection.
    pub opened: AtomicU64,
    /// Answers by `grpc-status` (`reset` for a stream reset, `error` for a
    /// connection error).
    pub answers: Mutex<BTreeMap<String, u64>>,
}

impl FloodCounts {
    fn answered(&self, status: String) {
        if let Ok(mut answers) = self.answers.lock() {
            *answers.entry(status).or_default() += 1;
        }
    }

    /// How many calls were answered with `status` so far.
    pub fn answered_with(&self, status: &str) -> u64 {
        self.answers
            .lock()
            .map(|answers| answers.get(status).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    /// Every answer so far, by status.
    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        self.answers
            .lock()
            .map(|answers| answers.clone())
            .unwrap_or_default()
    }
}

/// A running flood; [`Flood::stop`] (or dropping it) closes its
/// connections.
pub struct Flood {
    pub counts: Arc<FloodCounts>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    total: usize,
}

impl Flood {
    /// Connects and starts opening calls; returns once every connection's
    /// handshake is done (the calls are opened in the background: see
    /// [`Flood::wait_open`]).
    pub async fn start(spec: FloodSpec) -> Result<Self> {
        let counts = Arc::new(FloodCounts::default());
        let (stop, stopped) = watch::channel(false);
        let spec = Arc::new(spec);
        let mut tasks = Vec::new();
        for _ in 0..spec.connections {
            let tcp = TcpStream::connect(spec.addr)
                .await
                .with_context(|| format!("connect to {}", spec.addr))?;
            tcp.set_nodelay(true)?;
            let (send, connection) = h2::client::Builder::new()
                .handshake::<_, Bytes>(tcp)
                .await
                .context("HTTP/2 handshake")?;
            let mut connection_stopped = stopped.clone();
            tasks.push(tokio::spawn(async move {
                tokio::select! {
                    _ = connection => {}
                    _ = connection_stopped.wait_for(|stop| *stop) => {}
                }
            }));
            for _ in 0..spec.streams_per_connection {
                tasks.push(tokio::spawn(hold_calls(
                    send.clone(),
                    spec.clone(),
                    counts.clone(),
                    stopped.clone(),
                )));
            }
        }
        Ok(Self {
            counts,
            stop,
            tasks,
            total: spec.connections * spec.streams_per_connection,
        })
    }

    /// Waits until every call of the flood was opened at least once, then
    /// a little longer for the server to have read them.
    pub async fn wait_open(&self, within: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + within;
        while self.counts.opened.load(Ordering::Relaxed) < self.total as u64 {
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "only {} of {} flood calls opened within {within:?} (answers so far: {:?})",
                self.counts.opened.load(Ordering::Relaxed),
                self.total,
                self.counts.snapshot()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        Ok(())
    }

    /// Closes every connection of the flood.
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        for task in self.tasks.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// One slot of the flood: opens a call, holds it until the server answers
/// (or the flood stops), and opens the next one if the spec says so.
async fn hold_calls(
    send: h2::client::SendRequest<Bytes>,
    spec: Arc<FloodSpec>,
    counts: Arc<FloodCounts>,
    mut stopped: watch::Receiver<bool>,
) {
    loop {
        let answer = tokio::select! {
            answer = one_call(send.clone(), &spec, &counts) => answer,
            _ = stopped.wait_for(|stop| *stop) => return,
        };
        counts.answered(answer);
        if !spec.reopen || *stopped.borrow() {
            return;
        }
    }
}

/// One call of the flood; its answer's `grpc-status` (or what went wrong).
async fn one_call(
    send: h2::client::SendRequest<Bytes>,
    spec: &FloodSpec,
    counts: &FloodCounts,
) -> String {
    let Ok(mut send) = send.ready().await else {
        // The connection is gone: nothing more to hold on it.
        futures::future::pending::<()>().await;
        return "error".to_owned();
    };
    let mut request = http::Request::builder()
        .method("POST")
        .uri(format!("http://{}{}", spec.addr, spec.path))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (name, value) in &spec.headers {
        request = request.header(name.as_str(), value.as_str());
    }
    let Ok(request) = request.body(()) else {
        return "bad request".to_owned();
    };
    let Ok((response, mut stream)) = send.send_request(request, false) else {
        return "error".to_owned();
    };
    if stream
        .send_data(Bytes::from(spec.body.clone()), spec.end_stream)
        .is_err()
    {
        return "reset".to_owned();
    }
    counts.opened.fetch_add(1, Ordering::Relaxed);
    let answer = match response.await {
        Ok(response) => grpc_status(response).await,
        Err(err) if err.is_reset() => "reset".to_owned(),
        Err(_) => "error".to_owned(),
    };
    // Held until the answer, so the stream is not cancelled before.
    drop(stream);
    answer
}

/// The `grpc-status` of a response: in its headers (trailers-only) or in
/// its trailers.
async fn grpc_status(response: http::Response<h2::RecvStream>) -> String {
    let from = |headers: &http::HeaderMap| {
        headers
            .get("grpc-status")
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned)
    };
    if let Some(status) = from(response.headers()) {
        return status;
    }
    let mut body = response.into_body();
    while let Some(chunk) = body.data().await {
        match chunk {
            Ok(bytes) => {
                let _ = body.flow_control().release_capacity(bytes.len());
            }
            Err(_) => return "reset".to_owned(),
        }
    }
    match body.trailers().await {
        Ok(Some(trailers)) => from(&trailers).unwrap_or_else(|| "no status".to_owned()),
        Ok(None) => "no status".to_owned(),
        Err(_) => "reset".to_owned(),
    }
}

/// One call as `spec` describes it (its `connections`, `streams_per_connection`
/// and `reopen` are ignored), on a connection of its own: the header map
/// that carries its `grpc-status` (the response headers of a trailers-only
/// answer, else the trailers), or `None` if nothing came within `within`.
pub async fn call_once(spec: &FloodSpec, within: Duration) -> Result<Option<http::HeaderMap>> {
    call(spec, None, within).await
}

/// [`call_once`] whose body comes in two parts: `spec.body` at once, then
/// after `delay` `rest`, ending the request stream.
pub async fn call_in_two_parts(
    spec: &FloodSpec,
    delay: Duration,
    rest: &[u8],
) -> Result<Option<http::HeaderMap>> {
    call(spec, Some((delay, rest)), delay + Duration::from_secs(5)).await
}

async fn call(
    spec: &FloodSpec,
    second: Option<(Duration, &[u8])>,
    within: Duration,
) -> Result<Option<http::HeaderMap>> {
    let tcp = TcpStream::connect(spec.addr).await?;
    tcp.set_nodelay(true)?;
    let (send, connection) = h2::client::handshake(tcp).await?;
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut send = send.ready().await?;
    let mut request = http::Request::builder()
        .method("POST")
        .uri(format!("http://{}{}", spec.addr, spec.path))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (name, value) in &spec.headers {
        request = request.header(name.as_str(), value.as_str());
    }
    let (response, mut stream) = send.send_request(request.body(())?, false)?;
    let ends_now = spec.end_stream && second.is_none();
    if !spec.body.is_empty() || ends_now {
        stream.send_data(Bytes::from(spec.body.clone()), ends_now)?;
    }
    let answer = tokio::time::timeout(within, async {
        if let Some((delay, rest)) = second {
            tokio::time::sleep(delay).await;
            stream.send_data(Bytes::copy_from_slice(rest), true)?;
        }
        let response = response.await?;
        if response.headers().contains_key("grpc-status") {
            return Ok::<_, anyhow::Error>(response.headers().clone());
        }
        let mut body = response.into_body();
        while let Some(chunk) = body.data().await {
            let bytes = chunk?;
            let _ = body.flow_control().release_capacity(bytes.len());
        }
        Ok(body.trailers().await?.unwrap_or_default())
    })
    .await;
    driver.abort();
    match answer {
        Ok(headers) => Ok(Some(headers?)),
        Err(_) => Ok(None),
    }
}
