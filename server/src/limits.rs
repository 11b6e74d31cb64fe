//! Rate limits and overload protection of the gRPC listener.
//!
//! - **Rate limits** (token buckets, [`governor`] keyed limiters): every
//!   call of a tenant principal counts against its tenant, an agent's calls
//!   also against the agent, the operator's against a bucket of its own
//!   (tenant quota), and `AuthService/IssueToken` against the presented
//!   `client_id`. The auth layer applies them right after authentication,
//!   before any handler (so before any database work); a refusal is
//!   RESOURCE_EXHAUSTED with `ERROR_REASON_RATE_LIMITED`, metadata `scope`
//!   and a `google.rpc.RetryInfo` saying when a call would be admitted.
//!   Limits are per process: N replicas admit up to N times the rate.
//! - **Refusal pacing**: a refused call costs no database work, but
//!   answering it still costs HTTP/2 framing and send/recv system calls,
//!   and a caller that ignores RetryInfo asks again at once: a closed loop
//!   of 64 callers got 10–18k refusals a second answered, on cores another
//!   tenant's calls needed (`docs/security.md`, fairness). So each limited
//!   key (agent, tenant, operator, `client_id`) has a second bucket of
//!   `rate_limit_refusals_per_second` refusals (default 50, bucket one
//!   second's worth) answered at once; past it (a caller that keeps calling
//!   after being told when to come back) a refusal is answered only after
//!   its RetryInfo delay clamped to `rate_limit_refusal_delay_min_ms` ..
//!   `rate_limit_refusal_delay_max_ms` (250 ms .. 1 s). The answer is the
//!   same RESOURCE_EXHAUSTED (reason, `scope`, the RetryInfo computed when
//!   refused). A closed loop of C callers then gets about 50 refusals a
//!   second answered, plus C per 250 ms, however fast it asks. Why 50: a
//!   caller honouring RetryInfo is refused about once per retry per
//!   concurrent caller, so a few callers stay within it, and 50 answers a
//!   second cost under 0.5% of a core (the flood above kept ~0.7 cores busy
//!   with 10k+ of them, so ≤ 70 µs each). Pacing costs a caller latency,
//!   not admitted calls: its bucket keeps filling while it waits, and the
//!   default bursts hold 2 s of the rate, more than the longest wait. A
//!   paced refusal waits after [`OverloadLayer`] gave back its slot (parked
//!   refusals never shed other callers' calls), costs a timer and the
//!   caller's own HTTP/2 stream, no database work, and at most
//!   `max_paced_refusals` (10,000) wait at once; past that, refusals are
//!   answered at once again. Counted in
//!   `vaultguard_limit_paced_refusals_total{limit=<scope>}`; the gauge
//!   `vaultguard_limit_paced_refusals_waiting` counts those waiting now.
//!   Refusals of the open-stream cap carry no RetryInfo and are not paced.
//! - **Open streams per tenant**: a server-streaming call (watches, tail,
//!   export) holds a slot of its tenant from admission until its response
//!   body is dropped (stream ended or client gone); past the cap it is
//!   refused with RESOURCE_EXHAUSTED, scope `streams`.
//! - **Concurrent requests** ([`OverloadLayer`]): at most
//!   `max_concurrent_requests` calls between their request message having
//!   been read in full ([`crate::request_body`]: a call whose message is
//!   slow or never comes holds no slot) and their response headers, in the
//!   whole process; past that a call is shed at once with
//!   UNAVAILABLE (`ERROR_REASON_UNAVAILABLE`, metadata `cause` =
//!   `overloaded`) instead of queueing: UNAVAILABLE says "retry with back-off,
//!   perhaps on another replica", which gRPC clients retry by default, while
//!   RESOURCE_EXHAUSTED is kept for the caller's own quota. Streams count
//!   until their headers are sent; the per-tenant cap bounds them after.
//!
//! Bucket time is governor's monotonic clock, not [`crate::clock::Clock`]:
//! a test moving the wall clock must not refill buckets.

use std::collections::{HashMap, HashSet};
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use governor::clock::{Clock as _, DefaultClock};
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};
use http::{Request, Response};
use prost::Message;
use prost::bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::Status;
use tonic::body::Body;
use tower::{Layer, Service};
use vaultguard_proto::v1::{ErrorReason, IssueTokenRequest};

use crate::auth::Principal;
use crate::config::Config;
use crate::error::Error;

/// The public method whose calls are limited per presented `client_id`.
const ISSUE_TOKEN: &str = "/vaultguard.v1.AuthService/IssueToken";

/// At most this many distinct `client_id`s hold a bucket; past it (a flood
/// of made-up ids faster than the janitor forgets them) new ids share one.
const MAX_CLIENT_KEYS: usize = 100_000;
/// The shared bucket of ids beyond [`MAX_CLIENT_KEYS`].
const OVERFLOW_KEY: &str = "\u{0}overflow";
/// A `client_id` longer than this is keyed by its prefix (real ids are 36
/// bytes), so a key never holds more than this of attacker input.
const MAX_CLIENT_KEY_BYTES: usize = 64;
/// How often buckets indistinguishable from fresh ones are dropped.
const JANITOR_INTERVAL: Duration = Duration::from_secs(5);

/// The gauge of refusals waiting out their pacing (process-wide).
pub const PARKED_GAUGE: &str = "vaultguard_limit_paced_refusals_waiting";

type Keyed = RateLimiter<String, DefaultKeyedStateStore<String>, DefaultClock>;

/// Which limit refused a call; the `scope` metadata of the refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Agent,
    Tenant,
    Operator,
    Client,
    Streams,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Agent => "agent",
            Self::Tenant => "tenant",
            Self::Operator => "operator",
            Self::Client => "client",
            Self::Streams => "streams",
        }
    }
}

/// One keyed token bucket, or none when its rate is 0 (unlimited).
fn keyed(per_second: u32, burst: u32) -> Option<Keyed> {
    let rate = NonZeroU32::new(per_second)?;
    // Burst 0 means one second's worth.
    let burst = NonZeroU32::new(burst).unwrap_or(rate);
    Some(RateLimiter::keyed(
        Quota::per_second(rate).allow_burst(burst),
    ))
}

/// Refusal pacing (see the module doc): per scope, the keyed buckets of
/// refusals answered at once.
#[derive(Debug)]
struct Pacing {
    agent: Keyed,
    /// Tenants and the operator (their keys never collide).
    tenant: Keyed,
    client: Keyed,
    min_delay: Duration,
    max_delay: Duration,
    max_parked: usize,
    parked: Arc<AtomicUsize>,
    /// Paced refusals so far, for spreading their delays.
    paced: AtomicU64,
}

impl Pacing {
    /// None when pacing is off (no refusal budget, or no delay).
    fn new(config: &Config) -> Option<Self> {
        let per_second = config.rate_limit_refusals_per_second;
        let budget = || keyed(per_second, 0);
        let max_delay = Duration::from_millis(config.rate_limit_refusal_delay_max_ms);
        if max_delay.is_zero() {
            return None;
        }
        Some(Self {
            agent: budget()?,
            tenant: budget()?,
            client: budget()?,
            // A minimum above the maximum gives way to it.
            min_delay: Duration::from_millis(config.rate_limit_refusal_delay_min_ms).min(max_delay),
            max_delay,
            max_parked: match config.max_paced_refusals {
                0 => usize::MAX,
                max => max,
            },
            parked: Arc::default(),
            paced: AtomicU64::new(0),
        })
    }

    /// The pacing of a refusal of `key` by the limit of `scope`: `None`
    /// while the key is within its budget of immediate refusals (or too many
    /// refusals are parked already).
    fn pace(&self, scope: Scope, key: String, retry_after: Duration) -> Option<PacedRefusal> {
        let budget = match scope {
            Scope::Agent => &self.agent,
            Scope::Tenant | Scope::Operator => &self.tenant,
            Scope::Client => &self.client,
            Scope::Streams => return None,
        };
        if budget.check_key(&key).is_ok() {
            return None;
        }
        // Counted before the check, so that racing refusals never park more
        // than the cap; the guard gives the place back either way.
        let guard = ParkedGuard::new(self.parked.clone());
        if guard.previous >= self.max_parked {
            return None;
        }
        metrics::counter!("vaultguard_limit_paced_refusals_total", "limit" => scope.as_str())
            .increment(1);
        Some(PacedRefusal {
            delay: self.delay(retry_after),
            _parked: Arc::new(guard),
        })
    }

    /// The RetryInfo delay clamped to the bounds, stretched by up to as much
    /// again (within the maximum). The stretch spreads a flood's parked
    /// callers: with one fixed delay, callers refused together came back
    /// together, met a bucket refilled meanwhile and took it in one burst
    /// of admitted calls (tens at once, measured), which is what slowed
    /// other tenants' calls then. Successive refusals take successive
    /// points of the golden-ratio sequence, which covers the range evenly
    /// without a random number generator.
    fn delay(&self, retry_after: Duration) -> Duration {
        let least = retry_after.max(self.min_delay).min(self.max_delay);
        let most = least.saturating_mul(2).min(self.max_delay);
        let n = self.paced.fetch_add(1, Ordering::Relaxed);
        // The top 53 bits of n·2⁶⁴/φ (mod 2⁶⁴): a fraction in [0, 1).
        let fraction = (n.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11) as f64 / (1u64 << 53) as f64;
        least + (most - least).mul_f64(fraction)
    }
}

/// One place among the parked refusals, given back when dropped (the wait
/// is over or the caller went away).
#[derive(Debug)]
struct ParkedGuard {
    parked: Arc<AtomicUsize>,
    /// Refusals parked before this one.
    previous: usize,
}

impl ParkedGuard {
    fn new(parked: Arc<AtomicUsize>) -> Self {
        let previous = parked.fetch_add(1, Ordering::Relaxed);
        metrics::gauge!(PARKED_GAUGE).increment(1.0);
        Self { parked, previous }
    }
}

impl Drop for ParkedGuard {
    fn drop(&mut self) {
        self.parked.fetch_sub(1, Ordering::Relaxed);
        metrics::gauge!(PARKED_GAUGE).decrement(1.0);
    }
}

/// A refusal to answer only after `delay` (refusal pacing, see the module
/// doc). The limit check leaves it in the request's extensions; the auth
/// layer moves it onto the refusal ([`PacedRefusal::carry`]) and
/// [`OverloadLayer`] waits it out after giving back its slot.
#[derive(Debug, Clone)]
pub struct PacedRefusal {
    delay: Duration,
    _parked: Arc<ParkedGuard>,
}

impl PacedRefusal {
    /// Moves the pacing a refused `request` carries onto its `response`.
    pub fn carry<B, C>(request: &mut Request<B>, response: &mut Response<C>) {
        if let Some(paced) = request.extensions_mut().remove::<Self>() {
            response.extensions_mut().insert(paced);
        }
    }
}

/// Every limit of one process. Cheap to share (`Arc`).
#[derive(Debug)]
pub struct Limits {
    agent: Option<Keyed>,
    tenant: Option<Keyed>,
    client: Option<Keyed>,
    pacing: Option<Pacing>,
    clock: DefaultClock,
    max_request_bytes: usize,
    max_streams_per_tenant: usize,
    streams: Arc<Mutex<HashMap<String, usize>>>,
    /// Full paths of the server-streaming RPCs of the contract.
    streaming: HashSet<String>,
}

impl Limits {
    pub fn new(config: &Config) -> Result<Self, prost::DecodeError> {
        Ok(Self {
            agent: keyed(
                config.rate_limit_agent_per_second,
                config.rate_limit_agent_burst,
            ),
            tenant: keyed(
                config.rate_limit_tenant_per_second,
                config.rate_limit_tenant_burst,
            ),
            client: keyed(
                config.rate_limit_client_per_second,
                config.rate_limit_client_burst,
            ),
            pacing: Pacing::new(config),
            clock: DefaultClock::default(),
            max_request_bytes: if config.max_request_bytes == 0 {
                usize::MAX
            } else {
                config.max_request_bytes
            },
            max_streams_per_tenant: config.max_streams_per_tenant,
            streams: Arc::default(),
            streaming: server_streaming_methods()?,
        })
    }

    /// The largest request message any service decodes.
    pub fn max_request_bytes(&self) -> usize {
        self.max_request_bytes
    }

    /// Applies the authenticated caller's rate limits and, for a
    /// server-streaming method, takes a slot of its tenant's open streams,
    /// left in the request's extensions for [`StreamSlot::take`].
    pub fn admit<B>(
        &self,
        principal: &Principal,
        path: &str,
        request: &mut Request<B>,
    ) -> Result<(), Error> {
        if let (Some(agent), Some(agent_id)) = (&self.agent, principal.agent_id()) {
            // The agent first: an agent refused at its own limit does not
            // spend its tenant's budget.
            self.check(agent, agent_id.to_owned(), Scope::Agent, request)?;
        }
        // The operator has no tenant: it gets a bucket of its own, of the
        // tenant quota (tenant ids never contain ':').
        let (key, scope) = match &principal.tenant_id {
            Some(tenant_id) => (tenant_id.clone(), Scope::Tenant),
            None => (format!("operator:{}", principal.subject), Scope::Operator),
        };
        if let Some(tenant) = &self.tenant {
            self.check(tenant, key.clone(), scope, request)?;
        }
        if self.max_streams_per_tenant > 0 && self.streaming.contains(path) {
            let slot = self.open_stream(key)?;
            request.extensions_mut().insert(slot);
        }
        Ok(())
    }

    /// Applies the limits of public calls: `IssueToken` counts against the
    /// `client_id` it presents, read from the message
    /// [`crate::request_body::RequestBodyLayer`] read before (bounded by
    /// `max_request_bytes` and `request_body_timeout_ms`).
    pub fn admit_public<B>(&self, path: &str, request: &mut Request<B>) -> Result<(), Status> {
        let Some(client) = &self.client else {
            return Ok(());
        };
        if path != ISSUE_TOKEN {
            return Ok(());
        }
        let bytes = request
            .extensions()
            .get::<crate::request_body::ReadMessage>()
            .map(|read| read.0.clone())
            .unwrap_or_default();
        let client_id = presented_client_id(&bytes);
        // An unparsable request is refused by the handler's decoder anyway;
        // it still spends the shared bucket of the empty id.
        let mut key = client_id.unwrap_or_default();
        if key.len() > MAX_CLIENT_KEY_BYTES {
            let mut end = MAX_CLIENT_KEY_BYTES;
            while !key.is_char_boundary(end) {
                end -= 1;
            }
            key.truncate(end);
        }
        if client.len() >= MAX_CLIENT_KEYS {
            client.retain_recent();
            if client.len() >= MAX_CLIENT_KEYS {
                key = OVERFLOW_KEY.to_owned();
            }
        }
        self.check(client, key, Scope::Client, request)
            .map_err(Status::from)
    }

    /// One bucket's check; a refusal past the key's refusal budget leaves a
    /// [`PacedRefusal`] in the request's extensions.
    fn check<B>(
        &self,
        limiter: &Keyed,
        key: String,
        scope: Scope,
        request: &mut Request<B>,
    ) -> Result<(), Error> {
        match limiter.check_key(&key) {
            Ok(()) => Ok(()),
            Err(not_until) => {
                let retry_after = not_until.wait_time_from(self.clock.now());
                if let Some(paced) = self
                    .pacing
                    .as_ref()
                    .and_then(|pacing| pacing.pace(scope, key, retry_after))
                {
                    request.extensions_mut().insert(paced);
                }
                Err(refused(scope, Some(retry_after)))
            }
        }
    }

    fn open_stream(&self, key: String) -> Result<StreamSlot, Error> {
        let mut open = self
            .streams
            .lock()
            .map_err(|_| Error::internal("stream counts poisoned"))?;
        let count = open.entry(key.clone()).or_insert(0);
        if *count >= self.max_streams_per_tenant {
            return Err(refused(Scope::Streams, None));
        }
        *count += 1;
        Ok(StreamSlot {
            _guard: Arc::new(SlotGuard {
                streams: self.streams.clone(),
                key,
            }),
        })
    }

    /// Open streams of `tenant_id` (tests and metrics).
    pub fn open_streams(&self, tenant_id: &str) -> usize {
        self.streams
            .lock()
            .map(|open| open.get(tenant_id).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    /// Forgets buckets that are full again (indistinguishable from fresh).
    fn forget_idle(&self) {
        let pacing = self.pacing.as_ref();
        for limiter in [&self.agent, &self.tenant, &self.client]
            .into_iter()
            .flatten()
            .chain(pacing.map(|p| &p.agent))
            .chain(pacing.map(|p| &p.tenant))
            .chain(pacing.map(|p| &p.client))
        {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }
}

fn refused(scope: Scope, retry_after: Option<Duration>) -> Error {
    metrics::counter!("vaultguard_limit_refusals_total", "limit" => scope.as_str()).increment(1);
    tracing::debug!(
        scope = scope.as_str(),
        ?retry_after,
        "call refused by a limit"
    );
    Error::RateLimited {
        scope: scope.as_str(),
        retry_after,
    }
}

/// The `client_id` of an uncompressed gRPC-framed `IssueTokenRequest`.
fn presented_client_id(frame: &[u8]) -> Option<String> {
    let (&compressed, rest) = frame.split_first()?;
    let (length, message) = rest.split_first_chunk::<4>()?;
    let length = usize::try_from(u32::from_be_bytes(*length)).ok()?;
    if compressed != 0 || message.len() != length {
        return None;
    }
    IssueTokenRequest::decode(message)
        .ok()
        .map(|request| request.client_id)
}

/// The full paths (`/package.Service/Method`) of the contract's
/// server-streaming RPCs, read from the descriptor set so a new stream is
/// covered without a list to maintain.
fn server_streaming_methods() -> Result<HashSet<String>, prost::DecodeError> {
    let set = prost_types::FileDescriptorSet::decode(vaultguard_proto::FILE_DESCRIPTOR_SET)?;
    let mut paths = HashSet::new();
    for file in &set.file {
        for service in &file.service {
            for method in &service.method {
                if method.server_streaming() {
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
    Ok(paths)
}

/// Drops idle buckets every few seconds until the server stops, so keyed
/// limiters hold only recently active keys.
pub async fn run_janitor(limits: Arc<Limits>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(JANITOR_INTERVAL);
    loop {
        tokio::select! {
            _ = tick.tick() => limits.forget_idle(),
            _ = stop.changed() => return,
        }
    }
}

#[derive(Debug)]
struct SlotGuard {
    streams: Arc<Mutex<HashMap<String, usize>>>,
    key: String,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        if let Ok(mut open) = self.streams.lock()
            && let Some(count) = open.get_mut(&self.key)
        {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.remove(&self.key);
            }
        }
    }
}

/// One open stream of a tenant, released when the last clone is dropped.
#[derive(Debug, Clone)]
pub struct StreamSlot {
    _guard: Arc<SlotGuard>,
}

impl StreamSlot {
    /// Takes the slot [`Limits::admit`] left in the request, so that it
    /// lives with the response body rather than with the handler's request.
    pub fn take<B>(request: &mut Request<B>) -> Option<Self> {
        request.extensions_mut().remove::<Self>()
    }

    /// The response, its body holding `slot` (if any) until it is dropped.
    pub fn hold(slot: Option<Self>, response: Response<Body>) -> Response<Body> {
        match slot {
            None => response,
            Some(slot) => response.map(|inner| Body::new(HeldBody { inner, _slot: slot })),
        }
    }
}

/// A response body that keeps a stream slot for as long as it exists.
struct HeldBody {
    inner: Body,
    _slot: StreamSlot,
}

impl http_body::Body for HeldBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Sheds calls beyond `max_concurrent_requests` (0: no cap) at once, and
/// waits out a paced refusal after giving back the refused call's slot.
#[derive(Debug, Clone)]
pub struct OverloadLayer {
    permits: Option<Arc<Semaphore>>,
}

impl OverloadLayer {
    pub fn new(max_concurrent_requests: usize) -> Self {
        Self {
            permits: (max_concurrent_requests > 0)
                .then(|| Arc::new(Semaphore::new(max_concurrent_requests))),
        }
    }
}

impl<S> Layer<S> for OverloadLayer {
    type Service = OverloadService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        OverloadService {
            inner,
            permits: self.permits.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct OverloadService<S> {
    inner: S,
    permits: Option<Arc<Semaphore>>,
}

fn overloaded() -> Response<Body> {
    metrics::counter!("vaultguard_limit_refusals_total", "limit" => "concurrency").increment(1);
    Status::from(Error::Unavailable {
        reason: ErrorReason::Unavailable,
        message: "server overloaded; retry with back-off".to_owned(),
        metadata: HashMap::from([("cause".to_owned(), "overloaded".to_owned())]),
    })
    .into_http()
}

impl<S> Service<Request<Body>> for OverloadService<S>
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
        let permit: Option<OwnedSemaphorePermit> = match &self.permits {
            None => None,
            Some(permits) => match permits.clone().try_acquire_owned() {
                Ok(permit) => Some(permit),
                Err(_) => return Box::pin(async { Ok(overloaded()) }),
            },
        };
        // The clone that was made ready is the one we call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let mut response = inner.call(request).await?;
            drop(permit);
            // Outside the counted section: parked refusals of one caller
            // must not take the slots other callers' calls need.
            if let Some(paced) = response.extensions_mut().remove::<PacedRefusal>() {
                tokio::time::sleep(paced.delay).await;
            }
            Ok(response)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_contract_streams_are_found() {
        let streaming = server_streaming_methods().unwrap();
        for path in [
            "/vaultguard.v1.StepUpService/WatchStepUp",
            "/vaultguard.v1.StepUpService/WatchPendingStepUps",
            "/vaultguard.v1.AuditService/TailAuditEvents",
            "/vaultguard.v1.AuditService/ExportAuditEvents",
        ] {
            assert!(streaming.contains(path), "{path}");
        }
        assert!(!streaming.contains(ISSUE_TOKEN));
    }

    fn pacing(per_second: u32, min_ms: u64, max_ms: u64, max_parked: usize) -> Option<Pacing> {
        Pacing::new(&Config {
            rate_limit_refusals_per_second: per_second,
            rate_limit_refusal_delay_min_ms: min_ms,
            rate_limit_refusal_delay_max_ms: max_ms,
            max_paced_refusals: max_parked,
            ..Config::default()
        })
    }

    fn delay(pacing: &Pacing, scope: Scope, key: &str, retry_after_ms: u64) -> Option<Duration> {
        pacing
            .pace(scope, key.to_owned(), Duration::from_millis(retry_after_ms))
            .map(|paced| paced.delay)
    }

    #[test]
    fn refusals_past_the_budget_are_paced_within_the_bounds_up_to_the_cap() {
        let pacing = pacing(2, 250, 1_000, 3).unwrap();
        assert_eq!(delay(&pacing, Scope::Tenant, "t1", 5), None, "budget");
        assert_eq!(delay(&pacing, Scope::Tenant, "t1", 5), None, "budget");
        let ms = Duration::from_millis;
        let held: Vec<PacedRefusal> = [5, 600, 5_000]
            .into_iter()
            .map(|retry| {
                pacing
                    .pace(Scope::Tenant, "t1".to_owned(), ms(retry))
                    .unwrap()
            })
            .collect();
        // RetryInfo clamped to the bounds, stretched by up to as much again
        // within the maximum.
        let within = [
            (ms(250), ms(500)),
            (ms(600), ms(1_000)),
            (ms(1_000), ms(1_000)),
        ];
        for (paced, (least, most)) in held.iter().zip(within) {
            assert!(
                paced.delay >= least && paced.delay <= most,
                "{:?} outside {least:?}..={most:?}",
                paced.delay
            );
        }
        assert_eq!(pacing.parked.load(Ordering::Relaxed), 3);
        assert_eq!(delay(&pacing, Scope::Tenant, "t1", 5), None, "the cap");
        assert_eq!(pacing.parked.load(Ordering::Relaxed), 3);
        drop(held);
        assert_eq!(pacing.parked.load(Ordering::Relaxed), 0);
        assert!(delay(&pacing, Scope::Operator, "t1", 5).is_some());
        // Other keys and other scopes have budgets of their own; the
        // stream cap is never paced.
        assert_eq!(delay(&pacing, Scope::Tenant, "t2", 5), None);
        assert_eq!(delay(&pacing, Scope::Agent, "t1", 5), None);
        assert_eq!(delay(&pacing, Scope::Client, "t1", 5), None);
        for _ in 0..3 {
            assert_eq!(delay(&pacing, Scope::Streams, "t1", 5), None);
        }
    }

    #[test]
    fn paced_delays_spread_over_their_range() {
        let pacing = pacing(1, 100, 1_000, 0).unwrap();
        let delays: Vec<Duration> = (0..100)
            .map(|_| pacing.delay(Duration::from_millis(5)))
            .collect();
        // Every tenth of 100..=200 ms holds some of 100 successive delays.
        for tenth in 0..10u64 {
            let (from, to) = (100 + 10 * tenth, 110 + 10 * tenth);
            let count = delays
                .iter()
                .filter(|d| (from..to).contains(&u64::try_from(d.as_millis()).unwrap()))
                .count();
            assert!(
                (5..=15).contains(&count),
                "{count} delays in {from}..{to} ms"
            );
        }
    }

    #[test]
    fn pacing_is_off_at_zero_and_a_minimum_above_the_maximum_gives_way() {
        assert!(pacing(0, 250, 1_000, 10).is_none());
        assert!(pacing(10, 250, 0, 10).is_none());
        let pacing = pacing(1, 2_000, 500, 0).unwrap();
        assert_eq!(pacing.max_parked, usize::MAX, "0: no cap");
        assert_eq!(delay(&pacing, Scope::Agent, "a", 5), None);
        assert_eq!(
            delay(&pacing, Scope::Agent, "a", 5),
            Some(Duration::from_millis(500))
        );
    }

    #[test]
    fn the_client_id_is_read_from_the_frame() {
        let message = IssueTokenRequest {
            grant_type: "client_credentials".to_owned(),
            client_id: "agt_1".to_owned(),
            client_secret: "s".to_owned(),
        }
        .encode_to_vec();
        let mut frame = vec![0];
        frame.extend_from_slice(&u32::try_from(message.len()).unwrap().to_be_bytes());
        frame.extend_from_slice(&message);
        assert_eq!(presented_client_id(&frame).as_deref(), Some("agt_1"));
        frame[0] = 1;
        assert_eq!(presented_client_id(&frame), None, "compressed");
        assert_eq!(presented_client_id(&frame[..3]), None, "short");
    }
}
