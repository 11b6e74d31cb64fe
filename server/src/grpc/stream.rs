//! What the server-streaming RPCs share: the caller's standing re-checked
//! at every step, and waiting, level-triggered, for a relevant hub
//! notification, a heartbeat, a deadline, the client leaving or the server
//! shutting down.
//!
//! Every server stream of the contract is made by [`channel`], which is
//! given the call's caller: the stream it returns re-checks the caller's
//! standing ([`crate::auth::check_still_standing`]: credential unexpired,
//! OIDC organisation still bound, tenant active, agent enabled) before it
//! hands each message to the transport, and every
//! `stream_standing_interval_ms` while it has nothing to send. A caller out
//! of standing gets the status a new call with its credential would get,
//! and the stream ends (its producer sees the client gone). While the
//! database cannot be reached, standing is unknown and the stream goes on
//! (heartbeats are all that flow then; watches outlive an outage), and the
//! next check decides. A producer about
//! to hand out something that must not reach a caller out of standing even
//! once (WatchStepUp's redemption of an approved token) asks
//! [`StreamTx::standing`] first.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, mpsc};
use tonic::Status;
use tonic::codegen::BoxStream;
use vaultguard_proto::v1 as pb;

use crate::auth::{CallContext, Principal};
use crate::clock::to_timestamp;
use crate::hub::Change;
use crate::state::AppState;

/// The shortest re-check period `stream_standing_interval_ms` may set.
const MIN_STANDING_INTERVAL_MS: u64 = 50;

/// The sending half of a server stream: a bounded channel of boxed
/// messages. tokio allocates a channel's slots 32 at a time as it creates
/// the channel, and the watch messages are 700–800 bytes: unboxed, every
/// open stream held 23 KB of empty slots (10,000 queue watches took the
/// server from 29 to 303 MiB). Boxed, a slot is 16 bytes.
pub(super) struct StreamTx<T> {
    tx: mpsc::Sender<Result<Box<T>, Status>>,
    standing: Standing,
}

/// The client is gone: the stream has no receiver left.
#[derive(Debug)]
pub(super) struct Gone;

impl<T> Clone for StreamTx<T> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
            standing: self.standing.clone(),
        }
    }
}

impl<T> StreamTx<T> {
    /// Queues `item`, waiting while the stream's buffer is full.
    pub(super) async fn send(&self, item: Result<T, Status>) -> Result<(), Gone> {
        self.tx.send(item.map(Box::new)).await.map_err(|_| Gone)
    }

    /// Resolves when the client is gone.
    pub(super) async fn closed(&self) {
        self.tx.closed().await;
    }

    pub(super) fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// Whether the stream's caller stands now; else the status a new call
    /// with its credential gets. The stream re-checks before every message
    /// anyway: this is for a producer about to do what must not happen at
    /// all for a caller out of standing (redeem a token).
    pub(super) async fn standing(&self) -> Result<(), Status> {
        self.standing.check().await
    }
}

/// The caller of one server stream, whose standing the stream re-checks.
#[derive(Clone)]
struct Standing {
    state: AppState,
    principal: Arc<Principal>,
}

impl Standing {
    /// The strict check, before handing out something that needs standing
    /// (a token): a database that cannot be reached refuses too.
    async fn check(&self) -> Result<(), Status> {
        match self.check_unless_unreachable().await {
            Ok(Checked::Stands) => Ok(()),
            Ok(Checked::Unknown(err)) => Err(Status::from(err)),
            Err(status) => Err(status),
        }
    }

    /// The check between messages. While the database cannot be reached the
    /// caller's standing is unknown, and the stream goes on: no message of
    /// substance can be made then (every one is read from the database or
    /// follows a commit to it; what flows is heartbeats), and nothing can
    /// change a standing either, so ending the stream would only break the
    /// promise that watches outlive an outage. The next check decides.
    async fn check_unless_unreachable(&self) -> Result<Checked, Status> {
        // Boxed: the check may read the database, and a stream holds the
        // future it awaits for as long as it is open.
        match Box::pin(crate::auth::check_still_standing(
            self.state.authenticator(),
            &self.principal,
        ))
        .await
        {
            Ok(()) => Ok(Checked::Stands),
            Err(err) if crate::error::is_database_unavailable(&err) => {
                tracing::debug!("stream standing unknown while the database is unreachable");
                Ok(Checked::Unknown(err))
            }
            Err(err) => {
                metrics::counter!("vaultguard_stream_standing_refusals_total").increment(1);
                Err(Status::from(err))
            }
        }
    }
}

/// What a standing check found.
enum Checked {
    Stands,
    /// The database could not be reached; the error it gave.
    Unknown(crate::error::Error),
}

/// A server stream for `caller` of at most `buffer` queued messages, and
/// its sender. The stream re-checks the caller's standing before each
/// message and every `stream_standing_interval_ms` while idle, and ends
/// with the refusal a new call would get once the caller no longer stands
/// (see the module docs).
pub(super) fn channel<T: Send + 'static>(
    state: &AppState,
    caller: &CallContext,
    buffer: usize,
) -> (StreamTx<T>, BoxStream<T>) {
    let (tx, rx) = mpsc::channel::<Result<Box<T>, Status>>(buffer);
    let standing = Standing {
        state: state.clone(),
        principal: Arc::new(caller.principal.clone()),
    };
    let every = Duration::from_millis(
        state
            .config
            .stream_standing_interval_ms
            .max(MIN_STANDING_INTERVAL_MS),
    );
    let messages = guarded(rx, standing.clone(), every);
    (StreamTx { tx, standing }, messages)
}

/// What a guarded stream holds between two messages.
struct Guard<T> {
    rx: mpsc::Receiver<Result<Box<T>, Status>>,
    standing: Standing,
    tick: tokio::time::Interval,
}

/// The messages of `rx`, each handed on only after a standing check, with
/// a check every `every` while none comes. A failed check is the stream's
/// last item; dropping the receiver then tells the producer the client is
/// gone.
fn guarded<T: Send + 'static>(
    rx: mpsc::Receiver<Result<Box<T>, Status>>,
    standing: Standing,
    every: Duration,
) -> BoxStream<T> {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let guard = Guard { rx, standing, tick };
    Box::pin(futures::stream::unfold(Some(guard), |guard| async move {
        let mut guard = guard?;
        loop {
            tokio::select! {
                item = guard.rx.recv() => {
                    let message = match item? {
                        Ok(message) => message,
                        // The producer's own end of the stream.
                        Err(status) => return Some((Err(status), None)),
                    };
                    if let Err(status) = guard.standing.check_unless_unreachable().await {
                        return Some((Err(status), None));
                    }
                    guard.tick.reset();
                    return Some((Ok(*message), Some(guard)));
                }
                _ = guard.tick.tick() => {
                    if let Err(status) = guard.standing.check_unless_unreachable().await {
                        return Some((Err(status), None));
                    }
                }
            }
        }
    }))
}

/// A heartbeat at the server's current time.
pub(super) fn heartbeat(state: &AppState) -> pb::Heartbeat {
    pb::Heartbeat {
        time: Some(to_timestamp(state.clock.now_millis())),
    }
}

/// Why a watch woke up.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Wake {
    /// Something may have changed: re-read. Carries the relevant change
    /// that woke the watch (none after a lag or at a deadline).
    Change(Option<Change>),
    /// The stream was idle for a heartbeat interval.
    Heartbeat,
    /// The server is shutting down: end the stream.
    Stop,
}

/// Waits for a notification that `concerns` says is relevant, the heartbeat
/// interval, the `deadline` (a re-read, as expiry may have come), or the
/// server shutting down.
pub(super) async fn wait_for_change(
    events: &mut broadcast::Receiver<Change>,
    stopping: &mut tokio::sync::watch::Receiver<bool>,
    client_gone: impl std::future::Future<Output = ()>,
    concerns: impl Fn(&Change) -> bool,
    heartbeat: Duration,
    deadline: Option<Duration>,
) -> Wake {
    if *stopping.borrow() {
        return Wake::Stop;
    }
    let sleep = tokio::time::sleep(deadline.map_or(heartbeat, |d| d.min(heartbeat)));
    tokio::pin!(sleep);
    tokio::pin!(client_gone);
    loop {
        tokio::select! {
            () = &mut client_gone => return Wake::Stop,
            () = &mut sleep => {
                return if deadline.is_none_or(|d| d >= heartbeat) {
                    Wake::Heartbeat
                } else {
                    Wake::Change(None)
                };
            }
            _ = stopping.changed() => return Wake::Stop,
            received = events.recv() => match received {
                Ok(change) if concerns(&change) => return Wake::Change(Some(change)),
                Ok(_) => {}
                // Lagged: something may have changed; closed: re-read and
                // let the heartbeat pace the loop.
                Err(broadcast::error::RecvError::Lagged(_)) => return Wake::Change(None),
                Err(broadcast::error::RecvError::Closed) => {
                    (&mut sleep).await;
                    return Wake::Heartbeat;
                }
            },
        }
    }
}

/// Answers a wake the same way in every watch: on [`Wake::Stop`] the stream
/// ends with [`shutting_down`], on [`Wake::Heartbeat`] it gets `heartbeat`'s
/// message. Returns whether the stream goes on (false: stopped, or the
/// client is gone).
pub(super) async fn answer_wake<T>(
    tx: &StreamTx<T>,
    wake: Wake,
    heartbeat: impl FnOnce() -> T,
) -> bool {
    match wake {
        Wake::Stop => {
            let _ = tx.send(Err(shutting_down())).await;
            false
        }
        Wake::Heartbeat => tx.send(Ok(heartbeat())).await.is_ok(),
        Wake::Change(_) => true,
    }
}

/// The status that ends a stream when the server shuts down.
pub(super) fn shutting_down() -> Status {
    Status::unavailable("server shutting down; reconnect to resume")
}
