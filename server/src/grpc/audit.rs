//! Adapter for AuditService: list, verify, and the tail and export streams.
//!
//! The tail follows the same level-triggered pattern as the step-up
//! watches: subscribe to the hub, read what was sealed after the cursor,
//! wait for the tenant's next "sealed" notification or a heartbeat. The
//! export reads in batches of [`EXPORT_BATCH`], formatting one on a blocking
//! thread while the next is read, and never holds more than two batches and
//! one batch's chunks in memory.

use std::time::Duration;

use aws_lc_rs::digest;
use futures::StreamExt;
use tonic::codegen::BoxStream;
use tonic::{Request, Response, Status};
use vaultguard_proto::v1 as pb;
use vaultguard_proto::v1::audit_service_server::AuditService;

use super::{Reply, call_context};

/// Rows a tail reads at a time. A client that stops reading blocks its tail
/// with at most this batch plus the stream's channel in memory; the
/// per-tenant stream cap (`max_streams_per_tenant`) bounds how many such
/// tails one tenant can hold. Smaller than the export's batch, which has no
/// such multiplier.
const TAIL_BATCH: u64 = 128;
use super::stream::{self, StreamTx, Wake, wait_for_change};
use crate::auth::CallContext;
use crate::clock::to_timestamp;
use crate::domain::audit_log::{self, ExportPlan, TypeFilter};
use crate::domain::step_ups::heartbeat_seconds;
use crate::state::AppState;

/// Largest export chunk.
const CHUNK: usize = 64 * 1024;
/// Messages buffered per stream.
const STREAM_BUFFER: usize = 16;

/// AuditService over the domain layer.
#[derive(Debug, Clone)]
pub struct AuditApi(pub AppState);

impl AuditApi {
    async fn run_tail(
        self,
        tenant_id: String,
        mut cursor: i64,
        types: TypeFilter,
        beat: Duration,
        mut events: tokio::sync::broadcast::Receiver<crate::hub::Change>,
        tx: StreamTx<pb::TailAuditEventsResponse>,
    ) {
        use pb::tail_audit_events_response::Item;
        let mut stopping = self.0.stopping.subscribe();
        loop {
            // Boxed: a tail's task is as large as the largest future it
            // awaits, held for the stream's life.
            let rows = match Box::pin(audit_log::sealed_after(
                &self.0,
                &tenant_id,
                cursor,
                None,
                (None, None),
                &TypeFilter::default(),
                TAIL_BATCH,
            ))
            .await
            {
                Ok(rows) => rows,
                Err(err) => {
                    let _ = tx.send(Err(err.into())).await;
                    return;
                }
            };
            let full = u64::try_from(rows.len()).unwrap_or(0) >= TAIL_BATCH;
            for row in rows {
                let seq = row.seq.unwrap_or(cursor);
                if seq != cursor + 1 {
                    // Sealing is gapless; a gap means rows were removed.
                    let _ = tx
                        .send(Err(Status::data_loss(format!(
                            "audit sequence {} is missing",
                            cursor + 1
                        ))))
                        .await;
                    return;
                }
                cursor = seq;
                if types.matches(&row.event.event_type) {
                    let message = pb::TailAuditEventsResponse {
                        sequence: u64::try_from(cursor).unwrap_or(0),
                        item: Some(Item::Event(audit_log::to_proto(&row))),
                    };
                    if tx.send(Ok(message)).await.is_err() {
                        return;
                    }
                }
            }
            if full {
                continue;
            }
            let tenant = tenant_id.clone();
            let wake = wait_for_change(
                &mut events,
                &mut stopping,
                tx.closed(),
                move |change| change.concerns_audit(&tenant),
                beat,
                None,
            )
            .await;
            if wake == Wake::Stop {
                let _ = tx
                    .send(Err(Status::unavailable(
                        "server shutting down; resume from the last sequence",
                    )))
                    .await;
                return;
            }
            let heartbeat = wake == Wake::Heartbeat;
            if heartbeat {
                let message = pb::TailAuditEventsResponse {
                    sequence: u64::try_from(cursor).unwrap_or(0),
                    item: Some(Item::Heartbeat(stream::heartbeat(&self.0))),
                };
                if tx.send(Ok(message)).await.is_err() {
                    return;
                }
            }
        }
    }

    async fn run_export(
        self,
        ctx: CallContext,
        plan: ExportPlan,
        tx: StreamTx<pb::ExportAuditEventsResponse>,
    ) {
        use pb::export_audit_events_response::Part;
        // An unfiltered export reads the chain's sequence ranges, two at
        // once; a filtered one pages by the last sequence it got, so a rare
        // type is read through its index instead of range by range.
        let state = &self.0;
        let plan_ref = &plan;
        let batches: futures::stream::BoxStream<
            '_,
            crate::error::Result<Vec<audit_log::AuditRow>>,
        > = if plan.types.is_empty() && plan.range == (None, None) {
            futures::stream::iter(audit_log::seq_ranges(0, plan.upto, EXPORT_BATCH))
                .map(|(after, end)| {
                    audit_log::sealed_after(
                        state,
                        &plan.tenant_id,
                        after,
                        Some(end),
                        plan.range,
                        &plan.types,
                        EXPORT_BATCH,
                    )
                })
                .buffered(audit_log::READERS)
                .boxed()
        } else {
            futures::stream::try_unfold(Some(0), |after| async move {
                let Some(after) = after else {
                    return Ok(None);
                };
                let rows = audit_log::sealed_after(
                    state,
                    &plan_ref.tenant_id,
                    after,
                    Some(plan_ref.upto),
                    plan_ref.range,
                    &plan_ref.types,
                    EXPORT_BATCH,
                )
                .await?;
                let next = match rows.last() {
                    Some(row) if u64::try_from(rows.len()).unwrap_or(0) >= EXPORT_BATCH => row.seq,
                    _ => None,
                };
                Ok(Some((rows, next)))
            })
            .boxed()
        };
        let mut batches = batches;
        let mut out = Formatted {
            csv: plan.csv,
            digest: digest::Context::new(&digest::SHA256),
            buffer: Vec::with_capacity(CHUNK * 2),
            chunks: Vec::new(),
            count: 0,
            bytes: 0,
            first: 0,
            last: 0,
        };
        if plan.csv {
            out.buffer
                .extend_from_slice(audit_log::CSV_HEADER.as_bytes());
        }
        let mut batch = match batches.next().await.transpose() {
            Ok(batch) => batch,
            Err(err) => {
                let _ = tx.send(Err(err.into())).await;
                return;
            }
        };
        // Formatting (a blocking thread) and the next batches' reads
        // overlap; memory holds the batches in flight and one batch's
        // chunks at most.
        while let Some(rows) = batch {
            let format = tokio::task::spawn_blocking(move || out.format(&rows).map(|()| out));
            let (formatted, next) = tokio::join!(format, batches.next());
            out = match formatted {
                Ok(Ok(out)) => out,
                Ok(Err(err)) => {
                    let _ = tx.send(Err(err.into())).await;
                    return;
                }
                Err(err) => {
                    let _ = tx
                        .send(Err(crate::error::Error::internal(err).into()))
                        .await;
                    return;
                }
            };
            for chunk in std::mem::take(&mut out.chunks) {
                let message = pb::ExportAuditEventsResponse {
                    part: Some(Part::Data(chunk)),
                };
                if tx.send(Ok(message)).await.is_err() {
                    return;
                }
            }
            batch = match next.transpose() {
                Ok(batch) => batch,
                Err(err) => {
                    let _ = tx.send(Err(err.into())).await;
                    return;
                }
            };
        }
        if !out.buffer.is_empty() {
            let last = std::mem::take(&mut out.buffer);
            out.digest.update(&last);
            out.bytes += u64::try_from(last.len()).unwrap_or(0);
            let message = pb::ExportAuditEventsResponse {
                part: Some(Part::Data(last)),
            };
            if tx.send(Ok(message)).await.is_err() {
                return;
            }
        }
        let sha256: String = out
            .digest
            .finish()
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let (count, bytes) = (out.count, out.bytes);
        if let Err(err) =
            audit_log::record_export(&self.0, &ctx, &plan, count, bytes, &sha256).await
        {
            let _ = tx.send(Err(err.into())).await;
            return;
        }
        let summary = pb::ExportSummary {
            event_count: count,
            first_sequence: u64::try_from(out.first).unwrap_or(0),
            last_sequence: u64::try_from(out.last).unwrap_or(0),
            byte_count: bytes,
            sha256,
        };
        let _ = tx
            .send(Ok(pb::ExportAuditEventsResponse {
                part: Some(Part::Summary(summary)),
            }))
            .await;
    }
}

/// Rows an export reads per query.
const EXPORT_BATCH: u64 = 5_000;

/// An export's running state: the text not yet cut into a chunk, the
/// chunks cut from the last batch, and the digest and counts of what was.
struct Formatted {
    csv: bool,
    digest: digest::Context,
    buffer: Vec<u8>,
    chunks: Vec<Vec<u8>>,
    count: u64,
    bytes: u64,
    first: i64,
    last: i64,
}

impl Formatted {
    /// Formats `rows` and cuts full chunks (hashed and counted as cut).
    fn format(&mut self, rows: &[audit_log::AuditRow]) -> crate::error::Result<()> {
        for row in rows {
            let seq = row.seq.unwrap_or(0);
            if self.first == 0 {
                self.first = seq;
            }
            self.last = seq;
            self.count += 1;
            if self.csv {
                audit_log::csv_line(row, &mut self.buffer);
            } else {
                audit_log::ndjson_line(row, &mut self.buffer)?;
            }
            while self.buffer.len() >= CHUNK {
                let rest = self.buffer.split_off(CHUNK);
                let chunk = std::mem::replace(&mut self.buffer, rest);
                self.digest.update(&chunk);
                self.bytes += u64::try_from(chunk.len()).unwrap_or(0);
                self.chunks.push(chunk);
            }
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl AuditService for AuditApi {
    async fn list_audit_events(
        &self,
        request: Request<pb::ListAuditEventsRequest>,
    ) -> Reply<pb::ListAuditEventsResponse> {
        let ctx = call_context(&request)?;
        let (rows, next) = audit_log::list(&self.0, &ctx, request.get_ref()).await?;
        Ok(Response::new(pb::ListAuditEventsResponse {
            events: rows.iter().map(audit_log::to_proto).collect(),
            page: Some(pb::PageResponse {
                next_page_token: next,
            }),
        }))
    }

    async fn tail_audit_events(
        &self,
        request: Request<pb::TailAuditEventsRequest>,
    ) -> Reply<BoxStream<pb::TailAuditEventsResponse>> {
        let ctx = call_context(&request)?;
        let req = request.into_inner();
        let beat = Duration::from_secs(heartbeat_seconds(req.heartbeat_interval_seconds)?);
        let events = self.0.hub.subscribe();
        let (tenant_id, start, types) = audit_log::tail_start(&self.0, &ctx, &req).await?;
        let (tx, rx) = stream::channel(&self.0, &ctx, STREAM_BUFFER);
        tokio::spawn(
            self.clone()
                .run_tail(tenant_id, start, types, beat, events, tx),
        );
        Ok(Response::new(rx))
    }

    async fn export_audit_events(
        &self,
        request: Request<pb::ExportAuditEventsRequest>,
    ) -> Reply<BoxStream<pb::ExportAuditEventsResponse>> {
        let ctx = call_context(&request)?;
        let plan = audit_log::export_plan(&self.0, &ctx, request.get_ref()).await?;
        let (tx, rx) = stream::channel(&self.0, &ctx, 4);
        tokio::spawn(self.clone().run_export(ctx, plan, tx));
        Ok(Response::new(rx))
    }

    async fn verify_audit_chain(
        &self,
        request: Request<pb::VerifyAuditChainRequest>,
    ) -> Reply<pb::VerifyAuditChainResponse> {
        let ctx = call_context(&request)?;
        let req = request.get_ref();
        let found = audit_log::verify(&self.0, &ctx, req).await?;
        Ok(Response::new(pb::VerifyAuditChainResponse {
            ok: found.ok,
            first_broken_sequence: u64::try_from(found.first_broken).unwrap_or(0),
            failure: found.failure,
            checked_count: found.checked,
            unsealed_count: found.unsealed,
            head_sequence: u64::try_from(found.head_seq).unwrap_or(0),
            head_hash: found.head_hash,
            receipt: found.receipt,
            verify_time: Some(to_timestamp(found.verified_at)),
        }))
    }
}
