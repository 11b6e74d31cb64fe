//! Request messages are read in full, within a deadline, before a call
//! takes any shared capacity.
//!
//! A unary or server-streaming gRPC call carries exactly one request
//! message: one gRPC frame (a 5-byte prefix and the message), then the end
//! of the request stream. Before this layer, the concurrency cap
//! ([`crate::limits::OverloadLayer`]) was taken at arrival and the body was
//! read afterwards, by `IssueToken`'s limit or by the handler's decoder,
//! with no deadline: a client sending headers and a prefix announcing bytes
//! that never came held a slot for as long as its connection lived, and
//! 5 connections × 256 such calls held all 1,024 (issue 23, item 3).
//!
//! [`RequestBodyLayer`] sits in front of the concurrency cap and of
//! authentication. For every single-message method (read from the
//! descriptor sets of the contract and of `grpc.health.v1`) it reads the
//! whole body into memory, up to `max_request_bytes` (plus the prefix),
//! within `request_body_timeout_ms` of the call's headers, and only then
//! hands the call on, its body replaced by the bytes read. So:
//! - a call whose message is late holds nothing shared: no concurrency
//!   slot, no rate-limit cell, no open-stream slot, no database connection,
//!   no handler; it costs its own HTTP/2 stream (at most
//!   `max_concurrent_streams_per_connection` per connection), a timer, and
//!   the bytes it sent;
//! - a late message is answered DEADLINE_EXCEEDED with
//!   `ERROR_REASON_REQUEST_BODY_TIMEOUT` (metadata `timeout_ms`), before
//!   any authentication, rate limit or handler work; a body that fails (the
//!   client reset its stream) is answered CANCELLED, which nobody reads;
//! - a message over `max_request_bytes` is answered OUT_OF_RANGE as soon as
//!   the excess arrives (as tonic's decoder answers one), without reading
//!   further;
//! - bytes held while a call waits for the rest of its message count
//!   against a process-wide budget (`max_waiting_request_bytes`); a call
//!   that would exceed it is answered UNAVAILABLE (`cause` =
//!   `request_bytes`). A message that arrives whole is never counted, so
//!   callers whose requests fit in one write (nearly all) never meet it.
//!
//! Why DEADLINE_EXCEEDED and not CANCELLED: the caller did not cancel
//! anything; the server's deadline for the request passed. gRPC clients do
//! not retry it by default, which is right for a client that cannot send
//! its request in time.
//!
//! Client-streaming and bidirectional methods (server reflection only) and
//! unknown paths (answered UNIMPLEMENTED at once by the auth layer) are
//! passed through unread.

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::FutureExt as _;
use http::{HeaderMap, Request, Response};
use http_body::Frame;
use http_body_util::BodyExt as _;
use prost::Message as _;
use prost::bytes::{Bytes, BytesMut};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tonic::Status;
use tonic::body::Body;
use tower::{Layer, Service};
use vaultguard_proto::v1::ErrorReason;

use crate::config::Config;
use crate::error::Error;

/// The gRPC frame prefix: a compression flag and a 4-byte length.
const FRAME_PREFIX_BYTES: usize = 5;

/// The request message of a call as this layer read it (the whole gRPC
/// frame), left in the request's extensions for the limits that key on it
/// (`IssueToken`'s `client_id`).
#[derive(Debug, Clone)]
pub struct ReadMessage(pub Bytes);

/// Why a body was not handed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// The deadline passed before the end of the body.
    Late,
    /// More than the message cap.
    TooLarge,
    /// The waiting-bytes budget is spent.
    Budget,
    /// The body failed (the client reset its stream).
    Broken,
}

impl Refusal {
    fn as_str(self) -> &'static str {
        match self {
            Self::Late => "timeout",
            Self::TooLarge => "too_large",
            Self::Budget => "request_bytes",
            Self::Broken => "cancelled",
        }
    }
}

/// What the layer enforces; shared by every connection.
#[derive(Debug)]
struct Rules {
    /// Full paths of the methods whose request is one message.
    single_message: HashSet<String>,
    /// `request_body_timeout_ms`; `None`: no deadline.
    timeout: Option<Duration>,
    /// `max_request_bytes`; `usize::MAX`: no cap.
    max_message_bytes: usize,
    /// The budget of bytes held while waiting (one permit per byte);
    /// `None`: no cap.
    waiting: Option<Arc<Semaphore>>,
}

impl Rules {
    fn refusal(&self, refusal: Refusal) -> Response<Body> {
        metrics::counter!("vaultguard_request_body_refusals_total", "cause" => refusal.as_str())
            .increment(1);
        let status = match refusal {
            Refusal::Late => Status::from(Error::RequestBodyTimeout {
                timeout_ms: self
                    .timeout
                    .map_or(0, |t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
            }),
            Refusal::TooLarge => Status::from(Error::OutOfRange(format!(
                "request message too large: more than {} bytes",
                self.max_message_bytes
            ))),
            Refusal::Budget => Status::from(Error::Unavailable {
                reason: ErrorReason::Unavailable,
                message: "server overloaded; retry with back-off".to_owned(),
                metadata: HashMap::from([("cause".to_owned(), "request_bytes".to_owned())]),
            }),
            Refusal::Broken => Status::cancelled("request body not received"),
        };
        status.into_http()
    }

    /// Makes `held` cover `bytes` bytes of the waiting budget.
    fn charge(&self, held: &mut Option<OwnedSemaphorePermit>, bytes: usize) -> Result<(), Refusal> {
        let Some(budget) = &self.waiting else {
            return Ok(());
        };
        let have = held.as_ref().map_or(0, OwnedSemaphorePermit::num_permits);
        if bytes <= have {
            return Ok(());
        }
        let more = u32::try_from(bytes - have).map_err(|_| Refusal::Budget)?;
        let permit = budget
            .clone()
            .try_acquire_many_owned(more)
            .map_err(|_| Refusal::Budget)?;
        match held {
            Some(held) => held.merge(permit),
            None => *held = Some(permit),
        }
        Ok(())
    }

    /// Reads `body` to its end: its data and its trailers, if any.
    async fn read(&self, mut body: Body) -> Result<(Bytes, Option<HeaderMap>), Refusal> {
        let deadline = self.timeout.map(|timeout| Instant::now() + timeout);
        let cap = self.max_message_bytes.saturating_add(FRAME_PREFIX_BYTES);
        let mut data = BytesMut::new();
        let mut trailers: Option<HeaderMap> = None;
        // Bytes of the budget this call holds while it waits; given back
        // when the read ends either way.
        let mut held: Option<OwnedSemaphorePermit> = None;
        loop {
            if deadline.is_some_and(|deadline| Instant::now() >= deadline) {
                return Err(Refusal::Late);
            }
            let frame = match body.frame().now_or_never() {
                Some(frame) => frame,
                None => {
                    // The rest is not here yet: what was read waits with it.
                    self.charge(&mut held, data.len())?;
                    match deadline {
                        Some(deadline) => tokio::time::timeout_at(deadline, body.frame())
                            .await
                            .map_err(|_| Refusal::Late)?,
                        None => body.frame().await,
                    }
                }
            };
            let frame = match frame {
                None => break,
                Some(Ok(frame)) => frame,
                Some(Err(_)) => return Err(Refusal::Broken),
            };
            match frame.into_data() {
                Ok(chunk) => {
                    if data.len().saturating_add(chunk.len()) > cap {
                        return Err(Refusal::TooLarge);
                    }
                    data.extend_from_slice(&chunk);
                }
                Err(frame) => {
                    if let Ok(more) = frame.into_trailers() {
                        trailers.get_or_insert_with(HeaderMap::new).extend(more);
                    }
                }
            }
        }
        drop(held);
        Ok((data.freeze(), trailers))
    }
}

/// The body handed on: the bytes read, then the trailers the client sent.
fn replay(data: Bytes, trailers: Option<HeaderMap>) -> Body {
    match trailers {
        None => Body::new(http_body_util::Full::new(data)),
        Some(trailers) => {
            let frames = [
                Ok::<_, std::convert::Infallible>(Frame::data(data)),
                Ok(Frame::trailers(trailers)),
            ];
            Body::new(http_body_util::StreamBody::new(futures::stream::iter(
                frames,
            )))
        }
    }
}

/// Reads single-message request bodies before the layers behind it run (see
/// the module doc).
#[derive(Debug, Clone)]
pub struct RequestBodyLayer {
    rules: Arc<Rules>,
}

impl RequestBodyLayer {
    pub fn new(config: &Config) -> Result<Self, prost::DecodeError> {
        Ok(Self {
            rules: Arc::new(Rules {
                single_message: single_message_methods()?,
                timeout: (config.request_body_timeout_ms > 0)
                    .then(|| Duration::from_millis(config.request_body_timeout_ms)),
                max_message_bytes: match config.max_request_bytes {
                    0 => usize::MAX,
                    max => max,
                },
                waiting: (config.max_waiting_request_bytes > 0).then(|| {
                    Arc::new(Semaphore::new(
                        config.max_waiting_request_bytes.min(Semaphore::MAX_PERMITS),
                    ))
                }),
            }),
        })
    }
}

impl<S> Layer<S> for RequestBodyLayer {
    type Service = RequestBodyService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestBodyService {
            inner,
            rules: self.rules.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct RequestBodyService<S> {
    inner: S,
    rules: Arc<Rules>,
}

impl<S> Service<Request<Body>> for RequestBodyService<S>
where
    S: Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        // The clone that was made ready is the one we call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let rules = self.rules.clone();
        Box::pin(async move {
            if !rules.single_message.contains(request.uri().path()) {
                return inner.call(request).await;
            }
            let (mut parts, body) = request.into_parts();
            match rules.read(body).await {
                Ok((data, trailers)) => {
                    parts.extensions.insert(ReadMessage(data.clone()));
                    inner
                        .call(Request::from_parts(parts, replay(data, trailers)))
                        .await
                }
                Err(refusal) => {
                    tracing::debug!(
                        method = parts.uri.path(),
                        cause = refusal.as_str(),
                        "request body refused"
                    );
                    Ok(rules.refusal(refusal))
                }
            }
        })
    }
}

/// The full paths (`/package.Service/Method`) of the methods whose request
/// is a single message (unary and server-streaming), of the contract and of
/// `grpc.health.v1`, read from their descriptor sets.
fn single_message_methods() -> Result<HashSet<String>, prost::DecodeError> {
    let mut paths = HashSet::new();
    for encoded in [
        vaultguard_proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
    ] {
        let set = prost_types::FileDescriptorSet::decode(encoded)?;
        for file in &set.file {
            for service in &file.service {
                for method in &service.method {
                    if !method.client_streaming() {
                        paths.insert(format!(
                            "/{}.{}/{}",
                            file.package(),
                            service.name(),
                            method.name()
                        ));
                    }
                }
            }
        }
    }
    Ok(paths)
}

#[cfg(test)]
mod tests {
    use futures::StreamExt as _;

    use super::*;

    fn rules(timeout_ms: u64, max_message: usize, budget: usize) -> Rules {
        Rules {
            single_message: HashSet::new(),
            timeout: (timeout_ms > 0).then(|| Duration::from_millis(timeout_ms)),
            max_message_bytes: max_message,
            waiting: (budget > 0).then(|| Arc::new(Semaphore::new(budget))),
        }
    }

    #[test]
    fn every_single_message_method_is_found_and_reflection_is_not() {
        let paths = single_message_methods().unwrap();
        for path in [
            "/vaultguard.v1.AuthService/IssueToken",
            "/vaultguard.v1.AuthService/WhoAmI",
            "/vaultguard.v1.StepUpService/WatchPendingStepUps",
            "/vaultguard.v1.AuditService/ExportAuditEvents",
            "/grpc.health.v1.Health/Check",
            "/grpc.health.v1.Health/Watch",
        ] {
            assert!(paths.contains(path), "{path}");
        }
        assert!(!paths.iter().any(|path| path.contains("Reflection")));
    }

    /// A body of `parts`, each after `gap`, ending after the last one when
    /// `ends`.
    fn body(parts: Vec<&'static [u8]>, gap: Duration, ends: bool) -> Body {
        let stream = futures::stream::iter(parts)
            .then(move |part| async move {
                tokio::time::sleep(gap).await;
                Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(part)))
            })
            .chain(futures::stream::once(async move {
                if !ends {
                    futures::future::pending::<()>().await;
                }
                Ok(Frame::trailers(HeaderMap::new()))
            }));
        Body::new(http_body_util::StreamBody::new(stream))
    }

    #[tokio::test]
    async fn a_whole_body_is_read_and_its_waiting_bytes_given_back() {
        let rules = rules(1_000, 16, 100);
        let (data, trailers) = rules
            .read(body(
                vec![b"\0\0\0", b"\0\x02ab"],
                Duration::from_millis(5),
                true,
            ))
            .await
            .unwrap();
        assert_eq!(&data[..], b"\0\0\0\0\x02ab");
        assert!(trailers.is_some());
        let budget = rules.waiting.as_ref().unwrap();
        assert_eq!(budget.available_permits(), 100, "given back");
    }

    #[tokio::test]
    async fn a_body_that_never_ends_is_late() {
        let rules = rules(100, 16, 0);
        let started = Instant::now();
        let refused = rules
            .read(body(vec![b"\0\0\0\0\x01a"], Duration::ZERO, false))
            .await;
        assert_eq!(refused.unwrap_err(), Refusal::Late);
        assert!(started.elapsed() >= Duration::from_millis(100));
    }

    #[tokio::test]
    async fn a_body_over_the_cap_is_refused_when_the_excess_arrives() {
        let rules = rules(1_000, 4, 0);
        let refused = rules
            .read(body(vec![b"\0\0\0\0\x05", b"abcde"], Duration::ZERO, false))
            .await;
        assert_eq!(refused.unwrap_err(), Refusal::TooLarge);
    }

    #[tokio::test]
    async fn waiting_bytes_beyond_the_budget_are_refused_and_whole_bodies_never_count() {
        let rules = rules(1_000, 1_024, 8);
        // Ten bytes arrive, then the call waits: more than the budget.
        let refused = rules
            .read(body(
                vec![b"\0\0\0\0\x0aabcde", b"fghij"],
                Duration::from_millis(20),
                true,
            ))
            .await;
        assert_eq!(refused.unwrap_err(), Refusal::Budget);
        // The same ten bytes at once, ended at once: read, budget untouched.
        let (data, _) = rules
            .read(Body::new(http_body_util::Full::new(Bytes::from_static(
                b"\0\0\0\0\x0aabcdefghij",
            ))))
            .await
            .unwrap();
        assert_eq!(data.len(), 15);
        assert_eq!(rules.waiting.as_ref().unwrap().available_permits(), 8);
    }
}
