//! Adapter for StepUpService, including its two server streams.
//!
//! Both watches subscribe to the [`crate::hub`] before reading state, then
//! re-read on every relevant notification (or lag), on every heartbeat, and
//! at the step-up's deadline: level-triggered, so nothing is missed and
//! nothing waits on a slow watcher. Each stream runs in its own task feeding
//! a small bounded channel; a client that stops reading only stalls its own
//! task, and a client that goes away ends it. The channel re-checks the
//! caller's standing at every step (`super::stream`), and an agent's watch
//! checks it again right before it redeems an approved token.
//!
//! A queue watch without a cursor first sends the queue as it is, read
//! [`step_ups::SNAPSHOT_PAGE`] step-ups at a time, then a heartbeat that
//! marks the snapshot's end, then the changes after the snapshot's cursor.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast;
use tonic::codegen::BoxStream;
use tonic::{Request, Response, Status};
use vaultguard_proto::v1 as pb;
use vaultguard_proto::v1::step_up_service_server::StepUpService;

use super::stream::{self, StreamTx, Wake, answer_wake, heartbeat, wait_for_change};
use super::{Reply, call_context, convert};
use crate::auth::CallContext;
use crate::clock::to_timestamp;
use crate::domain::step_ups::{self, StepUpView};
use crate::domain::webhooks;
use crate::error::{Error, is_database_unavailable};
use crate::hub::Change;
use crate::state::AppState;
use crate::store::entities::step_up;

/// Messages buffered per stream before its task waits for the client.
const STREAM_BUFFER: usize = 16;
/// Changes read per round by a queue watch.
const CHANGES_PER_ROUND: u64 = 100;

/// StepUpService over the domain layer.
#[derive(Debug, Clone)]
pub struct StepUpApi(pub AppState);

impl StepUpApi {
    /// The status event of a step-up for its agent.
    fn status(&self, ctx: &CallContext, view: &StepUpView) -> Result<pb::StepUpStatus, Status> {
        let viewer = ctx.principal.tenant_id.clone().unwrap_or_default();
        Ok(pb::StepUpStatus {
            state: pb::StepUpState::from(view.state) as i32,
            delegation: Some(convert::delegation(
                view.delegation.clone(),
                &viewer,
                self.0.clock.now_millis(),
            )?),
            approvals_received: u32::try_from(view.approvals.len()).unwrap_or(u32::MAX),
            approvals_required: u32::try_from(view.step.approvals_required.max(1)).unwrap_or(1),
            expire_time: Some(to_timestamp(view.step.expires_at)),
            ciba_error: step_ups::ciba_error(view.state).to_owned(),
            ..Default::default()
        })
    }

    /// Runs one agent watch until a terminal state or the client leaves.
    async fn run_watch(
        self,
        ctx: CallContext,
        step_up_id: String,
        mut events: broadcast::Receiver<Change>,
        beat: Duration,
        tx: StreamTx<pb::WatchStepUpResponse>,
    ) {
        use pb::watch_step_up_response::Event;
        let mut stopping = self.0.stopping.subscribe();
        let mut last_sent: Option<(step_up::State, usize)> = None;
        // A decision committed by this process, handed over by the change
        // that woke the watch: taken instead of re-reading the database.
        let mut handed: Option<Arc<step_ups::Decided>> = None;
        // The token signed with that decision, for the redemption.
        let mut minted: Option<step_ups::Minted> = None;
        loop {
            let read = match handed.take() {
                Some(decided) => {
                    let decided = Arc::unwrap_or_clone(decided);
                    minted = decided.minted;
                    Ok(decided.view)
                }
                // Boxed here and below: a watch's task is as large as the
                // largest future it awaits, held for the stream's life.
                None => Box::pin(step_ups::agent_view(&self.0, &step_up_id)).await,
            };
            let view = match read {
                Ok(view) => view,
                // The database is unreachable: the stream stays open
                // (heartbeats go on) and reads again on the next wake. The
                // listener's resubscription after the outage wakes every
                // watcher, so a decision made meanwhile through another
                // replica is not lost.
                Err(err) if is_database_unavailable(&err) => {
                    tracing::debug!(%step_up_id, "step-up watch waits for the database");
                    let id = step_up_id.clone();
                    let wake = wait_for_change(
                        &mut events,
                        &mut stopping,
                        tx.closed(),
                        move |change| change.concerns_step_up(&id),
                        beat,
                        None,
                    )
                    .await;
                    if !answer_wake(&tx, wake, || pb::WatchStepUpResponse {
                        event: Some(Event::Heartbeat(heartbeat(&self.0))),
                    })
                    .await
                    {
                        return;
                    }
                    continue;
                }
                Err(err) => {
                    let _ = tx.send(Err(err.into())).await;
                    return;
                }
            };
            let key = (view.state, view.approvals.len());
            if last_sent != Some(key) {
                let mut status = match self.status(&ctx, &view) {
                    Ok(status) => status,
                    Err(status) => {
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                };
                let mut terminal = view.state != step_up::State::Pending;
                if view.state == step_up::State::Approved {
                    // Redeem only for a client still listening: a watch the
                    // agent dropped must leave the token to its poll.
                    if tx.is_closed() {
                        return;
                    }
                    // And only for an agent in good standing now: one
                    // disabled (or whose tenant was suspended, or whose
                    // token expired) since the watch began gets what a poll
                    // would get, and the step-up stays approved, unredeemed.
                    if let Err(status) = tx.standing().await {
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                    match Box::pin(step_ups::redeem(
                        &self.0,
                        &ctx,
                        &view.step,
                        &view.delegation,
                        minted.take(),
                    ))
                    .await
                    {
                        Ok(redeemed) => {
                            status.access_token = redeemed.token;
                            status.token_type = "Bearer".to_owned();
                            status.expires_in = redeemed.expires_in;
                            if let Ok(delegation) = convert::delegation(
                                redeemed.delegation,
                                ctx.principal.tenant_id.as_deref().unwrap_or_default(),
                                self.0.clock.now_millis(),
                            ) {
                                status.delegation = Some(delegation);
                            }
                        }
                        // Redeemed elsewhere (a poll) or expired meanwhile:
                        // look again and report what it is now.
                        Err(_) => continue,
                    }
                    terminal = true;
                }
                let message = pb::WatchStepUpResponse {
                    event: Some(Event::Status(status)),
                };
                if tx.send(Ok(message)).await.is_err() {
                    return;
                }
                if terminal {
                    return;
                }
                last_sent = Some(key);
            }
            let until_deadline = Duration::from_millis(
                u64::try_from(view.step.expires_at - self.0.clock.now_millis()).unwrap_or(0),
            );
            let id = step_up_id.clone();
            let wake = wait_for_change(
                &mut events,
                &mut stopping,
                tx.closed(),
                move |change| change.concerns_step_up(&id),
                beat,
                Some(until_deadline),
            )
            .await;
            if let Wake::Change(Some(change)) = &wake {
                handed = change
                    .payload
                    .clone()
                    .and_then(|payload| payload.downcast::<step_ups::Decided>().ok());
                minted = None;
            }
            if !answer_wake(&tx, wake, || pb::WatchStepUpResponse {
                event: Some(Event::Heartbeat(heartbeat(&self.0))),
            })
            .await
            {
                return;
            }
        }
    }

    /// Sends a queue watch's snapshot: `first`, then the following pages of
    /// [`step_ups::SNAPSHOT_PAGE`] step-ups, each read once the one before
    /// is queued (a slow client holds at most a page and the channel), as
    /// ADDED events carrying the snapshot's `cursor`; then a heartbeat,
    /// which tells the client it holds the whole queue. False when the
    /// stream ended meanwhile (the client left, or a read failed).
    async fn send_snapshot(
        &self,
        tenant_id: &str,
        cursor: i64,
        first: Vec<StepUpView>,
        tx: &StreamTx<pb::WatchPendingStepUpsResponse>,
    ) -> bool {
        use pb::watch_pending_step_ups_response::Event;
        let full = |page: &[StepUpView]| {
            u64::try_from(page.len()).unwrap_or(u64::MAX) >= step_ups::SNAPSHOT_PAGE
        };
        let mut page = first;
        loop {
            let more = full(&page);
            let last = page.last().map(|view| view.step.id.clone());
            let now = self.0.clock.now_millis();
            for view in page {
                let message = match convert::step_up(view, tenant_id, now) {
                    Ok(step_up) => pb::WatchPendingStepUpsResponse {
                        cursor: cursor.to_string(),
                        event: Some(Event::Change(pb::PendingStepUpEvent {
                            event_type: pb::PendingStepUpEventType::Added as i32,
                            step_up: Some(step_up),
                        })),
                    },
                    Err(err) => {
                        let _ = tx.send(Err(err.into())).await;
                        return false;
                    }
                };
                if tx.send(Ok(message)).await.is_err() {
                    return false;
                }
            }
            let (true, Some(last)) = (more, last) else {
                break;
            };
            page = match Box::pin(step_ups::pending_page(
                &self.0,
                tenant_id,
                Some(&last),
                step_ups::SNAPSHOT_PAGE,
            ))
            .await
            {
                Ok(page) => page,
                Err(err) => {
                    let _ = tx.send(Err(err.into())).await;
                    return false;
                }
            };
        }
        let end = pb::WatchPendingStepUpsResponse {
            cursor: cursor.to_string(),
            event: Some(Event::Heartbeat(heartbeat(&self.0))),
        };
        tx.send(Ok(end)).await.is_ok()
    }

    /// Runs one queue watch until the client leaves.
    ///
    /// `settled` is the cursor below which every change is final (see
    /// [`step_ups::CHANGE_SETTLE_MILLIS`]); changes above it are sent as
    /// soon as they are seen and remembered, so a smaller id that commits a
    /// moment later is still sent, once. Each response carries the settled
    /// cursor: resuming from it may repeat up to a second of changes (each
    /// event carries the step-up's full current state), never skip one.
    async fn run_queue_watch(
        self,
        tenant_id: String,
        mut settled: i64,
        mut events: broadcast::Receiver<Change>,
        beat: Duration,
        tx: StreamTx<pb::WatchPendingStepUpsResponse>,
    ) {
        use pb::watch_pending_step_ups_response::Event;
        let mut stopping = self.0.stopping.subscribe();
        let mut sent = std::collections::BTreeSet::new();
        loop {
            let changes = match Box::pin(step_ups::changes_after(
                &self.0,
                &tenant_id,
                settled,
                CHANGES_PER_ROUND,
            ))
            .await
            {
                Ok(changes) => changes,
                // The database is unreachable: keep the stream, as the
                // agent watch does, and read again after the next wake.
                Err(err) if is_database_unavailable(&err) => {
                    tracing::debug!(%tenant_id, "queue watch waits for the database");
                    let tenant = tenant_id.clone();
                    let wake = wait_for_change(
                        &mut events,
                        &mut stopping,
                        tx.closed(),
                        move |change| change.concerns_tenant(&tenant),
                        beat,
                        None,
                    )
                    .await;
                    if !answer_wake(&tx, wake, || pb::WatchPendingStepUpsResponse {
                        cursor: settled.to_string(),
                        event: Some(Event::Heartbeat(heartbeat(&self.0))),
                    })
                    .await
                    {
                        return;
                    }
                    continue;
                }
                Err(err) => {
                    let _ = tx.send(Err(err.into())).await;
                    return;
                }
            };
            let full = u64::try_from(changes.len()).unwrap_or(0) >= CHANGES_PER_ROUND;
            let settled_before = settled;
            let horizon = step_ups::settled_at(&self.0, self.0.clock.now_millis());
            let mut fresh = false;
            let mut settling = true;
            for (change, view) in changes {
                if !sent.contains(&change.id) {
                    fresh = true;
                    let event_type = pb::PendingStepUpEventType::from(change.kind);
                    let step_up =
                        match convert::step_up(view, &tenant_id, self.0.clock.now_millis()) {
                            Ok(step_up) => step_up,
                            Err(err) => {
                                let _ = tx.send(Err(err.into())).await;
                                return;
                            }
                        };
                    sent.insert(change.id);
                    if settling && change.created_at <= horizon {
                        settled = change.id;
                        sent.retain(|id| *id > settled);
                    } else {
                        settling = false;
                    }
                    let message = pb::WatchPendingStepUpsResponse {
                        cursor: settled.to_string(),
                        event: Some(Event::Change(pb::PendingStepUpEvent {
                            event_type: event_type as i32,
                            step_up: Some(step_up),
                        })),
                    };
                    if tx.send(Ok(message)).await.is_err() {
                        return;
                    }
                } else if settling && change.created_at <= horizon {
                    settled = change.id;
                    sent.retain(|id| *id > settled);
                } else {
                    settling = false;
                }
            }
            // A full round may have more behind it: read on while it sent
            // something or moved the settled cursor (a round of repeats
            // that settled meanwhile sends nothing but moves it).
            if full && (fresh || settled != settled_before) {
                continue;
            }
            let tenant = tenant_id.clone();
            // Unsettled changes are re-read once they settle.
            let recheck = (!sent.is_empty()).then_some(Duration::from_millis(
                u64::try_from(step_ups::CHANGE_SETTLE_MILLIS).unwrap_or(1_000),
            ));
            let wake = wait_for_change(
                &mut events,
                &mut stopping,
                tx.closed(),
                move |change| change.concerns_tenant(&tenant),
                beat,
                recheck,
            )
            .await;
            if !answer_wake(&tx, wake, || pb::WatchPendingStepUpsResponse {
                cursor: settled.to_string(),
                event: Some(Event::Heartbeat(heartbeat(&self.0))),
            })
            .await
            {
                return;
            }
        }
    }
}

#[tonic::async_trait]
impl StepUpService for StepUpApi {
    async fn poll_step_up(
        &self,
        request: Request<pb::PollStepUpRequest>,
    ) -> Reply<pb::PollStepUpResponse> {
        let ctx = call_context(&request)?;
        let redeemed = step_ups::poll(&self.0, &ctx, &request.get_ref().auth_req_id).await?;
        let viewer = ctx.principal.tenant_id.clone().unwrap_or_default();
        Ok(Response::new(pb::PollStepUpResponse {
            access_token: redeemed.token,
            token_type: "Bearer".to_owned(),
            expires_in: redeemed.expires_in,
            delegation: Some(convert::delegation(
                redeemed.delegation,
                &viewer,
                self.0.clock.now_millis(),
            )?),
        }))
    }

    async fn watch_step_up(
        &self,
        request: Request<pb::WatchStepUpRequest>,
    ) -> Reply<BoxStream<pb::WatchStepUpResponse>> {
        let ctx = call_context(&request)?;
        let req = request.into_inner();
        let beat =
            Duration::from_secs(step_ups::heartbeat_seconds(req.heartbeat_interval_seconds)?);
        // Subscribe first, so no change between the read and the wait is lost.
        let events = self.0.hub.subscribe();
        let (step, _) = step_ups::find_for_agent(&self.0, &ctx, &req.auth_req_id).await?;
        let (tx, rx) = stream::channel(&self.0, &ctx, STREAM_BUFFER);
        tokio::spawn(self.clone().run_watch(ctx, step.id, events, beat, tx));
        Ok(Response::new(rx))
    }

    async fn get_step_up(
        &self,
        request: Request<pb::GetStepUpRequest>,
    ) -> Reply<pb::GetStepUpResponse> {
        let ctx = call_context(&request)?;
        let view = step_ups::get(&self.0, &ctx, &request.get_ref().step_up_id).await?;
        let viewer = ctx.principal.tenant_id.clone().unwrap_or_default();
        Ok(Response::new(pb::GetStepUpResponse {
            step_up: Some(convert::step_up(view, &viewer, self.0.clock.now_millis())?),
        }))
    }

    async fn list_pending_step_ups(
        &self,
        request: Request<pb::ListPendingStepUpsRequest>,
    ) -> Reply<pb::ListPendingStepUpsResponse> {
        let ctx = call_context(&request)?;
        let (views, next) = step_ups::list_pending(&self.0, &ctx, request.get_ref()).await?;
        let viewer = ctx.principal.tenant_id.clone().unwrap_or_default();
        let now = self.0.clock.now_millis();
        Ok(Response::new(pb::ListPendingStepUpsResponse {
            step_ups: views
                .into_iter()
                .map(|view| convert::step_up(view, &viewer, now))
                .collect::<Result<_, _>>()?,
            page: Some(pb::PageResponse {
                next_page_token: next,
            }),
        }))
    }

    async fn watch_pending_step_ups(
        &self,
        request: Request<pb::WatchPendingStepUpsRequest>,
    ) -> Reply<BoxStream<pb::WatchPendingStepUpsResponse>> {
        let ctx = call_context(&request)?;
        let req = request.into_inner();
        let tenant_id = ctx.principal.tenant_id().map_err(Status::from)?.to_owned();
        let beat =
            Duration::from_secs(step_ups::heartbeat_seconds(req.heartbeat_interval_seconds)?);
        let resume = if req.cursor.is_empty() {
            None
        } else {
            let parsed = req
                .cursor
                .parse::<i64>()
                .ok()
                .filter(|c| *c >= 0 && req.cursor.len() <= 256)
                .ok_or_else(|| Error::invalid("cursor", "is not a cursor of this stream"))?;
            Some(parsed)
        };
        let events = self.0.hub.subscribe();
        let (tx, rx) = stream::channel(&self.0, &ctx, STREAM_BUFFER);
        let cursor = match resume {
            Some(cursor) => cursor,
            None => {
                // The cursor first: every change after it is sent after the
                // snapshot, so a step-up that changes while the snapshot is
                // read page by page is reported again.
                let cursor = step_ups::latest_change(&self.0, &tenant_id).await?;
                let first =
                    step_ups::pending_page(&self.0, &tenant_id, None, step_ups::SNAPSHOT_PAGE)
                        .await?;
                let api = self.clone();
                let tenant = tenant_id.clone();
                tokio::spawn(async move {
                    if api.send_snapshot(&tenant, cursor, first, &tx).await {
                        api.run_queue_watch(tenant, cursor, events, beat, tx).await;
                    }
                });
                return Ok(Response::new(rx));
            }
        };
        tokio::spawn(
            self.clone()
                .run_queue_watch(tenant_id, cursor, events, beat, tx),
        );
        Ok(Response::new(rx))
    }

    async fn approve_step_up(
        &self,
        request: Request<pb::ApproveStepUpRequest>,
    ) -> Reply<pb::ApproveStepUpResponse> {
        let ctx = call_context(&request)?;
        let req = request.get_ref();
        let (view, decision) = step_ups::approve(
            &self.0,
            &ctx,
            &req.step_up_id,
            &req.request_hash,
            &req.comment,
        )
        .await?;
        let viewer = ctx.principal.tenant_id.clone().unwrap_or_default();
        Ok(Response::new(pb::ApproveStepUpResponse {
            step_up: Some(convert::step_up(view, &viewer, self.0.clock.now_millis())?),
            decision: Some(decision.to_proto()),
        }))
    }

    async fn deny_step_up(
        &self,
        request: Request<pb::DenyStepUpRequest>,
    ) -> Reply<pb::DenyStepUpResponse> {
        let ctx = call_context(&request)?;
        let req = request.get_ref();
        let view = step_ups::deny(&self.0, &ctx, &req.step_up_id, &req.reason).await?;
        let viewer = ctx.principal.tenant_id.clone().unwrap_or_default();
        Ok(Response::new(pb::DenyStepUpResponse {
            step_up: Some(convert::step_up(view, &viewer, self.0.clock.now_millis())?),
        }))
    }

    async fn set_approval_webhook(
        &self,
        request: Request<pb::SetApprovalWebhookRequest>,
    ) -> Reply<pb::SetApprovalWebhookResponse> {
        let ctx = call_context(&request)?;
        let set = webhooks::set(&self.0, &ctx, &request.get_ref().url).await?;
        Ok(Response::new(match set {
            Some((row, secret)) => pb::SetApprovalWebhookResponse {
                webhook: Some(webhooks::to_proto(&row)),
                signing_secret: secret,
            },
            None => pb::SetApprovalWebhookResponse::default(),
        }))
    }

    async fn get_approval_webhook(
        &self,
        request: Request<pb::GetApprovalWebhookRequest>,
    ) -> Reply<pb::GetApprovalWebhookResponse> {
        let ctx = call_context(&request)?;
        let row = webhooks::get(&self.0, &ctx).await?;
        Ok(Response::new(pb::GetApprovalWebhookResponse {
            webhook: Some(webhooks::to_proto(&row)),
        }))
    }
}
