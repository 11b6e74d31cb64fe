//! What the server-streaming RPCs share: waiting, level-triggered, for a
//! relevant hub notification, a heartbeat, a deadline, the client leaving
//! or the server shutting down.

use std::time::Duration;

use tokio::sync::broadcast;
use tonic::Status;
use vaultguard_proto::v1 as pb;

use crate::clock::to_timestamp;
use crate::hub::Change;
use crate::state::AppState;

/// A heartbeat at the server's current time.
pub(super) fn heartbeat(state: &AppState) -> pb::Heartbeat {
    pb::Heartbeat {
        time: Some(to_timestamp(state.clock.now_millis())),
    }
}

/// Why a watch woke up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Wake {
    /// Something may have changed: re-read.
    Change,
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
                    Wake::Change
                };
            }
            _ = stopping.changed() => return Wake::Stop,
            received = events.recv() => match received {
                Ok(change) if concerns(&change) => return Wake::Change,
                Ok(_) => {}
                // Lagged: something may have changed; closed: re-read and
                // let the heartbeat pace the loop.
                Err(broadcast::error::RecvError::Lagged(_)) => return Wake::Change,
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
    tx: &tokio::sync::mpsc::Sender<Result<T, Status>>,
    wake: Wake,
    heartbeat: impl FnOnce() -> T,
) -> bool {
    match wake {
        Wake::Stop => {
            let _ = tx.send(Err(shutting_down())).await;
            false
        }
        Wake::Heartbeat => tx.send(Ok(heartbeat())).await.is_ok(),
        Wake::Change => true,
    }
}

/// The status that ends a stream when the server shuts down.
pub(super) fn shutting_down() -> Status {
    Status::unavailable("server shutting down; reconnect to resume")
}
