//! What the server-streaming RPCs share: waiting, level-triggered, for a
//! relevant hub notification, a heartbeat, a deadline, the client leaving
//! or the server shutting down.

use std::time::Duration;

use tokio::sync::{broadcast, mpsc};
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use tonic::codegen::BoxStream;
use vaultguard_proto::v1 as pb;

use crate::clock::to_timestamp;
use crate::hub::Change;
use crate::state::AppState;

/// The sending half of a server stream: a bounded channel of boxed
/// messages. tokio allocates a channel's slots 32 at a time as it creates
/// the channel, and the watch messages are 700–800 bytes: unboxed, every
/// open stream held 23 KB of empty slots (10,000 queue watches took the
/// server from 29 to 303 MiB). Boxed, a slot is 16 bytes.
pub(super) struct StreamTx<T>(mpsc::Sender<Result<Box<T>, Status>>);

/// The client is gone: the stream has no receiver left.
#[derive(Debug)]
pub(super) struct Gone;

impl<T> Clone for StreamTx<T> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<T> StreamTx<T> {
    /// Queues `item`, waiting while the stream's buffer is full.
    pub(super) async fn send(&self, item: Result<T, Status>) -> Result<(), Gone> {
        self.0.send(item.map(Box::new)).await.map_err(|_| Gone)
    }

    /// Resolves when the client is gone.
    pub(super) async fn closed(&self) {
        self.0.closed().await;
    }

    pub(super) fn is_closed(&self) -> bool {
        self.0.is_closed()
    }
}

/// A server stream of at most `buffer` queued messages and its sender.
pub(super) fn channel<T: Send + 'static>(buffer: usize) -> (StreamTx<T>, BoxStream<T>) {
    let (tx, rx) = mpsc::channel::<Result<Box<T>, Status>>(buffer);
    let messages = ReceiverStream::new(rx).map(|item| item.map(|message| *message));
    (StreamTx(tx), Box::pin(messages))
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
