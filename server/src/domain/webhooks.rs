//! Approval webhooks, the CIBA "ping" analogue: a tenant registers an
//! `https` URL and VaultGuard POSTs a signed notice there whenever a step-up
//! enters, changes in or leaves the tenant's approval queue.
//!
//! The outbox is `step_up_changes` itself: every change to a step-up writes a
//! row there in the transaction that makes it, so nothing is enqueued on the
//! request path and delivery never blocks or fails a request. Per tenant,
//! `tenant_webhooks.delivered_change_id` is the position reached; the
//! deliverer POSTs the next change (the smallest id above it), in order, one
//! at a time:
//! - a 2xx answer advances the position and resets the attempt count;
//! - anything else (non-2xx, redirect, timeout, refused connection) counts a
//!   failed attempt, records when and why (a short reason, never the secret,
//!   the body or the URL) and backs off exponentially (1 s, 2 s, 4 s … at
//!   most 5 minutes); after `webhook_max_attempts` failed attempts at one
//!   change the deliverer skips it with a warning, so one poisoned change
//!   cannot stall the tenant's feed forever.
//!
//! Delivery is at least once: the `X-VaultGuard-Delivery` id (`chg_<change
//! id>`) is the same on every retry, for the receiver to de-duplicate.
//!
//! Tenants are independent: the deliverer of each process looks for tenants
//! with a due change every `webhook_poll_interval_ms` and runs a task per
//! tenant (at most `webhook_concurrent_tenants` at once), which delivers
//! that tenant's changes in order until none is due or one fails. A tenant
//! whose receiver answers slowly (or times out) holds only its own task: no
//! other tenant's notice waits for it.
//!
//! Across replicas a tenant is delivered by one deliverer at a time through
//! a lease on its row, not a lock: before each attempt the deliverer claims
//! the row by a conditional UPDATE that pushes `next_attempt_at` past the
//! attempt's deadline (`webhook_timeout_ms` plus a minute), so no other
//! deliverer finds it due meanwhile; the attempt's outcome is written
//! conditionally on the row as claimed. Should the process die mid-attempt,
//! the lease runs out and another one carries on (at least once). No
//! database connection or transaction is held across the HTTP call: the
//! claim and the outcome are one statement each. Every write of delivery
//! state is conditional on the row as the attempt read it (position,
//! attempts, lease, sealed secret), so a webhook re-set or removed while a
//! delivery is in flight is never overwritten by that delivery's outcome.
//! Re-setting a webhook restarts delivery after the tenant's latest change
//! and clears the delivery status.
//!
//! Deliveries go through the outbound address policy's client
//! ([`crate::outbound`]): a URL on a loopback, private, link-local or
//! metadata address is refused when it is set (`url` INVALID_ARGUMENT) and,
//! for a name that resolves there later, at connection time (the attempt
//! fails with reason `forbidden address`).
//!
//! Commit order: on PostgreSQL ids come from a sequence and two transactions
//! can commit out of id order; a change becomes deliverable only once it is
//! [`step_ups::CHANGE_SETTLE_MILLIS`] old, so a slightly later commit of a smaller id is not
//! overtaken. SQLite serialises writers, so ids commit in order there.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use aws_lc_rs::hmac;
use sea_orm::sea_query::{Expr, Query};
use sea_orm::{
    ActiveModelTrait, ActiveValue::Set, ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter,
    QueryOrder, QuerySelect,
};
use serde_json::json;
use vaultguard_proto::v1 as pb;

use crate::audit::{self, Outcome};
use crate::auth::CallContext;
use crate::clock::{Millis, to_timestamp};
use crate::crypto::{SealContext, random_token};
use crate::domain::step_ups;
use crate::error::{Error, FieldViolation, Result, is_unique_violation};
use crate::outbound;
use crate::state::AppState;
use crate::store::entities::{step_up, step_up_change, tenant_webhook};

/// The prefix of signing secrets, so that leaked ones are recognisable.
pub const SECRET_PREFIX: &str = "whsec_";
/// The longest accepted URL, in characters.
pub const MAX_URL_CHARS: usize = 2048;
/// The header carrying `t=<unix seconds>,v1=<hex HMAC-SHA256>`.
pub const SIGNATURE_HEADER: &str = "X-VaultGuard-Signature";
/// The header carrying the event name (`step_up.added` …).
pub const EVENT_HEADER: &str = "X-VaultGuard-Event";
/// The header carrying the delivery id (`chg_<change id>`), the same on retries.
pub const DELIVERY_HEADER: &str = "X-VaultGuard-Delivery";
/// The prefix of delivery ids.
pub const DELIVERY_PREFIX: &str = "chg_";

/// The table name bound into the sealed secret.
const TABLE: &str = "tenant_webhooks";
/// The first retry delay; it doubles with each failed attempt …
const FIRST_BACKOFF_MILLIS: Millis = 1_000;
/// … up to this.
const MAX_BACKOFF_MILLIS: Millis = 5 * 60 * 1_000;
/// Due tenants read per poll; the rest are found by the next one.
const TENANTS_PER_POLL: u64 = 256;
/// Changes a tenant's task delivers before it lets a waiting tenant have
/// its slot (it then queues for one again).
const CHANGES_PER_TURN: usize = 20;
/// How much longer than the attempt's timeout a claim lasts.
const LEASE_MARGIN_MILLIS: Millis = 60_000;
/// The longest stored failure reason.
const MAX_REASON_CHARS: usize = 256;

// ---------------------------------------------------------------------------
// Configuration: SetApprovalWebhook, GetApprovalWebhook.

/// Checks a webhook URL: absolute, `https` (or `http` when `allow_http`),
/// with a host, no user info, at most [`MAX_URL_CHARS`] characters. Returns
/// the parsed URL.
pub fn validate_url(url: &str, allow_http: bool) -> Result<reqwest::Url, FieldViolation> {
    let invalid = |description: &str| FieldViolation {
        field: "url".to_owned(),
        description: description.to_owned(),
    };
    if url.chars().count() > MAX_URL_CHARS {
        return Err(invalid("must be at most 2048 characters"));
    }
    if url.trim() != url || url.chars().any(char::is_control) {
        return Err(invalid(
            "must not contain spaces around it or control characters",
        ));
    }
    let parsed = reqwest::Url::parse(url).map_err(|_| invalid("must be an absolute https URL"))?;
    match parsed.scheme() {
        "https" => {}
        "http" if allow_http => {}
        _ => return Err(invalid("must be an absolute https URL")),
    }
    // The parser forgives spellings such as `https:///host` or `https:\\host`;
    // the URL must be written out as `scheme://host…`.
    let authority = url
        .get(parsed.scheme().len()..)
        .and_then(|rest| rest.strip_prefix("://"));
    if parsed.host_str().is_none_or(str::is_empty)
        || authority.is_none_or(|rest| rest.starts_with(['/', '\\']))
    {
        return Err(invalid("must name a host"));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(invalid(
            "must not contain credentials; requests are authenticated by their signature",
        ));
    }
    Ok(parsed)
}

/// The host of a stored URL, for audit details and logs (never the whole
/// URL: some receivers put a secret in the path or query).
fn host_of(url: &str) -> String {
    reqwest::Url::parse(url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_owned))
        .unwrap_or_default()
}

fn seal_context(tenant_id: &str) -> SealContext<'_> {
    SealContext {
        table: TABLE,
        tenant_id,
        record_id: tenant_id,
    }
}

/// The largest change id of `tenant_id`'s feed, 0 when it has none.
async fn max_change_id<C: ConnectionTrait>(db: &C, tenant_id: &str) -> Result<i64> {
    let max: Option<Option<i64>> = step_up_change::Entity::find()
        .select_only()
        .column_as(step_up_change::Column::Id.max(), "max_id")
        .filter(step_up_change::Column::TenantId.eq(tenant_id))
        .into_tuple()
        .one(db)
        .await?;
    Ok(max.flatten().unwrap_or(0))
}

/// SetApprovalWebhook: `Some((row, signing_secret))` when set, `None` when
/// removed (empty `url`). Each set generates a new secret, returned here
/// only, and delivery starts after the tenant's latest change (older changes
/// are not replayed). Removing a webhook that does not exist changes nothing.
pub async fn set(
    state: &AppState,
    ctx: &CallContext,
    url: &str,
) -> Result<Option<(tenant_webhook::Model, String)>> {
    let tenant_id = ctx.principal.tenant_id()?.to_owned();
    if url.is_empty() {
        return remove(state, ctx, &tenant_id).await;
    }
    let parsed = validate_url(url, state.config.webhook_allow_http)?;
    state
        .outbound
        .check_registered_url("url", &parsed)
        .await
        .map_err(Error::from)?;
    let host = parsed.host_str().unwrap_or_default().to_owned();

    let secret = format!("{SECRET_PREFIX}{}", random_token(32)?);
    let sealed = state
        .master
        .seal(seal_context(&tenant_id), secret.as_bytes())?;
    let now = state.clock.now_millis();
    let txn = crate::store::begin(&state.db).await?;
    let start_after = max_change_id(&txn, &tenant_id).await?;
    let existing = tenant_webhook::Entity::find_by_id(tenant_id.clone())
        .one(&txn)
        .await?;
    let replaced = existing.is_some();
    let row = tenant_webhook::ActiveModel {
        tenant_id: Set(tenant_id.clone()),
        url: Set(url.to_owned()),
        secret_ciphertext: Set(sealed),
        created_at: Set(existing.as_ref().map_or(now, |e| e.created_at)),
        updated_at: Set(now),
        delivered_change_id: Set(start_after),
        attempts: Set(0),
        next_attempt_at: Set(0),
        last_success_at: Set(None),
        last_failure_at: Set(None),
        last_failure_reason: Set(None),
    };
    let written = if replaced {
        row.update(&txn).await
    } else {
        row.insert(&txn).await
    };
    let model = match written {
        Ok(model) => model,
        Err(err) if is_unique_violation(&err) => {
            return Err(Error::Conflict("the webhook was set concurrently"));
        }
        Err(sea_orm::DbErr::RecordNotUpdated) => {
            return Err(Error::Conflict("the webhook was removed concurrently"));
        }
        Err(err) => return Err(err.into()),
    };
    audit::append(
        &txn,
        state.clock.as_ref(),
        ctx.audit().event(
            &tenant_id,
            "webhook.set",
            vec![tenant_id.clone()],
            Outcome::Success,
            json!({"host": host, "replaced": replaced}),
        ),
    )
    .await?;
    txn.commit().await?;
    state.audit_committed();
    tracing::info!(tenant_id = %tenant_id, host = %host, "approval webhook set");
    Ok(Some((model, secret)))
}

async fn remove(
    state: &AppState,
    ctx: &CallContext,
    tenant_id: &str,
) -> Result<Option<(tenant_webhook::Model, String)>> {
    let txn = crate::store::begin(&state.db).await?;
    let Some(existing) = tenant_webhook::Entity::find_by_id(tenant_id.to_owned())
        .one(&txn)
        .await?
    else {
        txn.rollback().await?;
        return Ok(None);
    };
    let deleted = tenant_webhook::Entity::delete_many()
        .filter(tenant_webhook::Column::TenantId.eq(tenant_id))
        .exec(&txn)
        .await?;
    if deleted.rows_affected == 0 {
        txn.rollback().await?;
        return Ok(None);
    }
    audit::append(
        &txn,
        state.clock.as_ref(),
        ctx.audit().event(
            tenant_id,
            "webhook.removed",
            vec![tenant_id.to_owned()],
            Outcome::Success,
            json!({"host": host_of(&existing.url)}),
        ),
    )
    .await?;
    txn.commit().await?;
    state.audit_committed();
    tracing::info!(tenant_id = %tenant_id, "approval webhook removed");
    Ok(None)
}

/// GetApprovalWebhook: the caller's tenant's webhook; NOT_FOUND when none
/// is set.
pub async fn get(state: &AppState, ctx: &CallContext) -> Result<tenant_webhook::Model> {
    let tenant_id = ctx.principal.tenant_id()?;
    tenant_webhook::Entity::find_by_id(tenant_id.to_owned())
        .one(&state.db)
        .await?
        .ok_or(Error::NotFound("webhook"))
}

/// The proto view of a webhook; never the secret.
pub fn to_proto(row: &tenant_webhook::Model) -> pb::ApprovalWebhook {
    pb::ApprovalWebhook {
        url: row.url.clone(),
        secret_set: !row.secret_ciphertext.is_empty(),
        update_time: Some(to_timestamp(row.updated_at)),
        last_success_time: row.last_success_at.map(to_timestamp),
        last_failure_time: row.last_failure_at.map(to_timestamp),
        last_failure_reason: row.last_failure_reason.clone().unwrap_or_default(),
    }
}

// ---------------------------------------------------------------------------
// Delivery.

/// The HTTP client deliveries use: the outbound address policy, the
/// configured timeout, no redirects.
pub fn http_client(state: &AppState) -> Result<outbound::Client> {
    let timeout = Duration::from_millis(state.config.webhook_timeout_ms.max(1));
    state
        .outbound
        .client(outbound::ClientOptions {
            timeout,
            connect_timeout: timeout.min(Duration::from_secs(5)),
            user_agent: concat!("VaultGuard-Webhook/", env!("CARGO_PKG_VERSION")),
        })
        .map_err(|err| Error::internal(err.without_url()))
}

/// The delay before the next attempt after `attempts` failed ones.
pub fn backoff_millis(attempts: i32) -> Millis {
    let doublings = u32::try_from(attempts.saturating_sub(1).clamp(0, 30)).unwrap_or(0);
    FIRST_BACKOFF_MILLIS
        .saturating_mul(1_i64 << doublings)
        .min(MAX_BACKOFF_MILLIS)
}

/// The proto name of a stored step-up state (`pending` →
/// `STEP_UP_STATE_PENDING`).
fn state_name(state: step_up::State) -> &'static str {
    pb::StepUpState::from(state).as_str_name()
}

/// The event name of a change kind (`added` → `step_up.added`).
fn event_name(kind: step_up_change::Kind) -> String {
    format!("step_up.{kind}")
}

/// The JSON body POSTed for `change`: ids only.
pub fn body_of(change: &step_up_change::Model) -> Result<Vec<u8>> {
    serde_json::to_vec(&json!({
        "event": event_name(change.kind),
        "step_up_id": change.step_up_id,
        "delegation_id": change.delegation_id,
        "tenant_id": change.tenant_id,
        "state": state_name(change.state),
        "time": to_timestamp(change.created_at).to_string(),
    }))
    .map_err(Error::internal)
}

/// The `X-VaultGuard-Signature` value for `body` signed at `t` (Unix
/// seconds) with `secret`.
pub fn signature(secret: &str, t: i64, body: &[u8]) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes());
    let mut context = hmac::Context::with_key(&key);
    context.update(t.to_string().as_bytes());
    context.update(b".");
    context.update(body);
    format!("t={t},v1={}", hex::encode(context.sign().as_ref()))
}

/// How one attempt ended.
enum Attempt {
    Delivered,
    Failed(String),
}

/// Signs and POSTs `change` to `hook`. Never logs the secret, the body or
/// the URL.
async fn attempt(
    state: &AppState,
    client: &outbound::Client,
    hook: &tenant_webhook::Model,
    change: &step_up_change::Model,
) -> Attempt {
    let secret = match state
        .master
        .open(seal_context(&hook.tenant_id), &hook.secret_ciphertext)
        .and_then(|bytes| String::from_utf8(bytes).map_err(Error::internal))
    {
        Ok(secret) => secret,
        Err(err) => {
            tracing::error!(tenant_id = %hook.tenant_id, error = %err, "cannot open the webhook signing secret");
            return Attempt::Failed("signing secret unavailable".to_owned());
        }
    };
    let body = match body_of(change) {
        Ok(body) => body,
        Err(err) => {
            tracing::error!(tenant_id = %hook.tenant_id, error = %err, "cannot encode a webhook body");
            return Attempt::Failed("internal error".to_owned());
        }
    };
    let t = state.clock.now_seconds();
    let request = match client.post(hook.url.as_str()) {
        Ok(request) => request,
        Err(outbound::Refusal::ForbiddenAddress) => {
            return Attempt::Failed("forbidden address".to_owned());
        }
        Err(outbound::Refusal::InvalidUrl) => {
            return Attempt::Failed("invalid request".to_owned());
        }
    };
    let sent = request
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header(SIGNATURE_HEADER, signature(&secret, t, &body))
        .header(EVENT_HEADER, event_name(change.kind))
        .header(DELIVERY_HEADER, format!("{DELIVERY_PREFIX}{}", change.id))
        .body(body)
        .send()
        .await;
    match sent {
        Ok(response) if response.status().is_success() => Attempt::Delivered,
        Ok(response) => Attempt::Failed(format!("HTTP {}", response.status().as_u16())),
        Err(err) if outbound::is_forbidden_error(&err) => {
            Attempt::Failed("forbidden address".to_owned())
        }
        Err(err) if err.is_timeout() => Attempt::Failed("timeout".to_owned()),
        Err(err) if err.is_connect() => Attempt::Failed("connection failed".to_owned()),
        Err(err) if err.is_builder() => Attempt::Failed("invalid request".to_owned()),
        Err(_) => Attempt::Failed("request failed".to_owned()),
    }
}

/// The next undelivered change of `hook`'s tenant that is old enough.
async fn next_change(
    state: &AppState,
    hook: &tenant_webhook::Model,
    settled: Millis,
) -> Result<Option<step_up_change::Model>> {
    Ok(step_up_change::Entity::find()
        .filter(step_up_change::Column::TenantId.eq(hook.tenant_id.as_str()))
        .filter(step_up_change::Column::Id.gt(hook.delivered_change_id))
        .filter(step_up_change::Column::CreatedAt.lte(settled))
        .order_by_asc(step_up_change::Column::Id)
        .one(&state.db)
        .await?)
}

/// Claims `hook`'s row for one attempt: pushes `next_attempt_at` to the
/// attempt's deadline, conditionally on the row being as `hook` read it;
/// returns the row as claimed, or `None` when another deliverer claimed it
/// first or the webhook changed.
async fn claim(
    state: &AppState,
    hook: &tenant_webhook::Model,
    now: Millis,
) -> Result<Option<tenant_webhook::Model>> {
    let timeout = Millis::try_from(state.config.webhook_timeout_ms).unwrap_or(Millis::MAX / 4);
    let lease_until = now
        .saturating_add(timeout)
        .saturating_add(LEASE_MARGIN_MILLIS);
    let claimed = tenant_webhook::Entity::update_many()
        .col_expr(
            tenant_webhook::Column::NextAttemptAt,
            Expr::value(lease_until),
        )
        .filter(unchanged(hook))
        .exec(&state.db)
        .await?;
    Ok((claimed.rows_affected > 0).then(|| tenant_webhook::Model {
        next_attempt_at: lease_until,
        ..hook.clone()
    }))
}

/// The condition "the row is as `hook` read it" of every delivery write.
fn unchanged(hook: &tenant_webhook::Model) -> sea_orm::Condition {
    sea_orm::Condition::all()
        .add(tenant_webhook::Column::TenantId.eq(hook.tenant_id.as_str()))
        .add(tenant_webhook::Column::UpdatedAt.eq(hook.updated_at))
        .add(tenant_webhook::Column::SecretCiphertext.eq(hook.secret_ciphertext.clone()))
        .add(tenant_webhook::Column::DeliveredChangeId.eq(hook.delivered_change_id))
        .add(tenant_webhook::Column::Attempts.eq(hook.attempts))
        .add(tenant_webhook::Column::NextAttemptAt.eq(hook.next_attempt_at))
}

/// Writes the outcome of an attempt at `change`, conditionally on the row
/// being as `hook` (the claimed row) says; returns the row as written, or
/// `None` when the webhook was re-set, removed or claimed by another
/// deliverer meanwhile.
async fn record(
    state: &AppState,
    hook: &tenant_webhook::Model,
    change: &step_up_change::Model,
    outcome: &Attempt,
) -> Result<Option<tenant_webhook::Model>> {
    let now = state.clock.now_millis();
    let mut next = hook.clone();
    match outcome {
        Attempt::Delivered => {
            next.delivered_change_id = change.id;
            next.attempts = 0;
            next.next_attempt_at = 0;
            next.last_success_at = Some(now);
        }
        Attempt::Failed(reason) => {
            let attempts = hook.attempts.saturating_add(1);
            let max = i32::try_from(state.config.webhook_max_attempts.max(1)).unwrap_or(i32::MAX);
            next.last_failure_at = Some(now);
            next.last_failure_reason = Some(reason.chars().take(MAX_REASON_CHARS).collect());
            if attempts >= max {
                tracing::warn!(
                    tenant_id = %hook.tenant_id,
                    delivery = %format!("{DELIVERY_PREFIX}{}", change.id),
                    attempts,
                    reason = %reason,
                    "approval webhook delivery abandoned after the maximum attempts; skipping the change"
                );
                metrics::counter!("vaultguard_webhook_deliveries_skipped_total").increment(1);
                next.delivered_change_id = change.id;
                next.attempts = 0;
                next.next_attempt_at = 0;
            } else {
                next.attempts = attempts;
                next.next_attempt_at = now.saturating_add(backoff_millis(attempts));
            }
        }
    }
    let updated = tenant_webhook::Entity::update_many()
        .col_expr(
            tenant_webhook::Column::DeliveredChangeId,
            Expr::value(next.delivered_change_id),
        )
        .col_expr(tenant_webhook::Column::Attempts, Expr::value(next.attempts))
        .col_expr(
            tenant_webhook::Column::NextAttemptAt,
            Expr::value(next.next_attempt_at),
        )
        .col_expr(
            tenant_webhook::Column::LastSuccessAt,
            Expr::value(next.last_success_at),
        )
        .col_expr(
            tenant_webhook::Column::LastFailureAt,
            Expr::value(next.last_failure_at),
        )
        .col_expr(
            tenant_webhook::Column::LastFailureReason,
            Expr::value(next.last_failure_reason.clone()),
        )
        .filter(unchanged(hook))
        .exec(&state.db)
        .await?;
    Ok((updated.rows_affected > 0).then_some(next))
}

/// Delivers `tenant_id`'s due changes in order, at most `max_changes`,
/// until one fails or none is due (the webhook backing off, claimed by
/// another deliverer, or nothing left); returns the attempts made and
/// whether it stopped only because of `max_changes`.
async fn deliver_tenant(
    state: &AppState,
    client: &outbound::Client,
    tenant_id: &str,
    max_changes: usize,
) -> Result<(u64, bool)> {
    let mut attempted = 0;
    for _ in 0..max_changes {
        let now = state.clock.now_millis();
        let Some(hook) = tenant_webhook::Entity::find_by_id(tenant_id.to_owned())
            .one(&state.db)
            .await?
            .filter(|hook| hook.next_attempt_at <= now)
        else {
            return Ok((attempted, false));
        };
        let settled = step_ups::settled_at(state, now);
        let Some(change) = next_change(state, &hook, settled).await? else {
            return Ok((attempted, false));
        };
        let Some(hook) = claim(state, &hook, now).await? else {
            return Ok((attempted, false));
        };
        // The HTTP call: no database connection is held while it runs.
        let outcome = attempt(state, client, &hook, &change).await;
        attempted += 1;
        match &outcome {
            Attempt::Delivered => {
                metrics::counter!("vaultguard_webhook_deliveries_total", "result" => "success")
                    .increment(1);
                tracing::debug!(
                    tenant_id = %hook.tenant_id,
                    delivery = %format!("{DELIVERY_PREFIX}{}", change.id),
                    event = %event_name(change.kind),
                    "approval webhook delivered"
                );
            }
            Attempt::Failed(reason) => {
                metrics::counter!("vaultguard_webhook_deliveries_total", "result" => "failure")
                    .increment(1);
                tracing::info!(
                    tenant_id = %hook.tenant_id,
                    host = %host_of(&hook.url),
                    delivery = %format!("{DELIVERY_PREFIX}{}", change.id),
                    attempt = hook.attempts.saturating_add(1),
                    reason = %reason,
                    "approval webhook delivery failed"
                );
            }
        }
        let recorded = record(state, &hook, &change, &outcome).await?;
        if recorded.is_none() || !matches!(outcome, Attempt::Delivered) {
            // A failure waits for its back-off; a re-set, removed or
            // re-claimed webhook is picked up afresh by a later poll.
            return Ok((attempted, false));
        }
    }
    Ok((attempted, true))
}

/// `EXISTS` body: the webhook's tenant has an undelivered change created at
/// or before `settled`.
fn pending_changes(settled: Millis) -> sea_orm::sea_query::SelectStatement {
    use sea_orm::ExprTrait;
    Query::select()
        .expr(Expr::val(1))
        .from(step_up_change::Entity)
        .and_where(
            Expr::col((step_up_change::Entity, step_up_change::Column::TenantId))
                .equals((tenant_webhook::Entity, tenant_webhook::Column::TenantId)),
        )
        .and_where(
            Expr::col((step_up_change::Entity, step_up_change::Column::Id)).gt(Expr::col((
                tenant_webhook::Entity,
                tenant_webhook::Column::DeliveredChangeId,
            ))),
        )
        .and_where(
            Expr::col((step_up_change::Entity, step_up_change::Column::CreatedAt)).lte(settled),
        )
        .to_owned()
}

/// The tenants with a due change: their webhook's back-off (or another
/// deliverer's claim) elapsed, and an undelivered settled change exists.
async fn due_tenants(state: &AppState) -> Result<Vec<String>> {
    let now = state.clock.now_millis();
    let settled = step_ups::settled_at(state, now);
    Ok(tenant_webhook::Entity::find()
        .select_only()
        .column(tenant_webhook::Column::TenantId)
        .filter(tenant_webhook::Column::NextAttemptAt.lte(now))
        .filter(Expr::exists(pending_changes(settled)))
        .order_by_asc(tenant_webhook::Column::NextAttemptAt)
        .order_by_asc(tenant_webhook::Column::TenantId)
        .limit(TENANTS_PER_POLL)
        .into_tuple()
        .all(&state.db)
        .await?)
}

/// The tenants that have a task in this process; a task removes its
/// tenant when it ends (or is aborted).
#[derive(Default)]
struct Running(Mutex<HashSet<String>>);

impl Running {
    fn set(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Removes its tenant from [`Running`] when dropped.
struct RunningEntry {
    running: Arc<Running>,
    tenant_id: String,
}

impl Drop for RunningEntry {
    fn drop(&mut self) {
        self.running.set().remove(&self.tenant_id);
    }
}

/// One tenant's task: waits for a slot, delivers a turn of its changes,
/// and queues for a slot again while a turn ends with more to deliver.
async fn tenant_task(
    state: AppState,
    client: outbound::Client,
    slots: Arc<tokio::sync::Semaphore>,
    entry: RunningEntry,
) {
    loop {
        let Ok(_slot) = slots.acquire().await else {
            return;
        };
        match deliver_tenant(&state, &client, &entry.tenant_id, CHANGES_PER_TURN).await {
            Ok((_, true)) => {}
            Ok((_, false)) => return,
            Err(err) => {
                tracing::warn!(tenant_id = %entry.tenant_id, error = %err, "approval webhook delivery failed");
                return;
            }
        }
    }
}

/// Looks for tenants with a due change every `webhook_poll_interval_ms` and
/// starts a task for each one without a task yet (at most
/// `webhook_concurrent_tenants` deliver at once), until `stop` flips; the
/// tasks in flight are then dropped (a claimed attempt is retried when its
/// lease runs out).
pub async fn run_deliverer(state: AppState, mut stop: tokio::sync::watch::Receiver<bool>) {
    let period = Duration::from_millis(state.config.webhook_poll_interval_ms.max(50));
    let client = match http_client(&state) {
        Ok(client) => client,
        Err(err) => {
            tracing::error!(error = %err, "cannot build the webhook HTTP client; approval webhooks are not delivered");
            return;
        }
    };
    let slots = Arc::new(tokio::sync::Semaphore::new(
        state.config.webhook_concurrent_tenants.max(1),
    ));
    let running = Arc::new(Running::default());
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            () = tokio::time::sleep(period) => {}
        }
        while tasks.try_join_next().is_some() {}
        let due = tokio::select! {
            _ = stop.changed() => return,
            due = due_tenants(&state) => due,
        };
        let due = match due {
            Ok(due) => due,
            Err(err) => {
                tracing::warn!(error = %err, "cannot look for due approval webhooks");
                continue;
            }
        };
        for tenant_id in due {
            if !running.set().insert(tenant_id.clone()) {
                continue;
            }
            let entry = RunningEntry {
                running: running.clone(),
                tenant_id,
            };
            tasks.spawn(tenant_task(
                state.clone(),
                client.clone(),
                slots.clone(),
                entry,
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_https_unless_http_is_allowed() {
        assert!(validate_url("https://hooks.example.com/vg", false).is_ok());
        let err = validate_url("http://hooks.example.com/vg", false).unwrap_err();
        assert_eq!(err.field, "url");
        assert!(validate_url("http://hooks.example.com/vg", true).is_ok());
        for bad in [
            "ftp://hooks.example.com/vg",
            "/vg/hook",
            "hooks.example.com/vg",
            "https://",
            "https:///hooks.example.com/",
            "https:\\\\hooks.example.com/",
            "https:hooks.example.com/",
            "https://user:pw@hooks.example.com/",
            " https://hooks.example.com/",
            "https://hooks.example.com/\n",
            "file:///etc/passwd",
            "data:text/plain,hi",
        ] {
            assert!(validate_url(bad, true).is_err(), "{bad:?} accepted");
        }
        let longest = format!("https://h.example/{}", "a".repeat(MAX_URL_CHARS - 18));
        assert_eq!(longest.len(), MAX_URL_CHARS);
        assert!(validate_url(&longest, false).is_ok());
        assert!(validate_url(&format!("{longest}a"), false).is_err());
    }

    #[test]
    fn backoff_doubles_from_one_second_up_to_five_minutes() {
        let delays: Vec<Millis> = (1..=12).map(backoff_millis).collect();
        assert_eq!(
            delays,
            [
                1_000, 2_000, 4_000, 8_000, 16_000, 32_000, 64_000, 128_000, 256_000, 300_000,
                300_000, 300_000
            ]
        );
        assert_eq!(backoff_millis(0), 1_000);
        assert_eq!(backoff_millis(i32::MAX), 300_000);
    }

    #[test]
    fn signature_is_hmac_sha256_over_time_dot_body() {
        let secret = "whsec_test";
        let body = br#"{"event":"step_up.added"}"#;
        let header = signature(secret, 1_700_000_000, body);
        let key = hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes());
        let expected = hmac::sign(&key, b"1700000000.{\"event\":\"step_up.added\"}");
        assert_eq!(
            header,
            format!("t=1700000000,v1={}", hex::encode(expected.as_ref()))
        );
    }

    #[test]
    fn body_carries_ids_state_and_time_only() {
        let change = step_up_change::Model {
            id: 7,
            tenant_id: "ten_1".into(),
            step_up_id: "stp_1".into(),
            delegation_id: "dlg_1".into(),
            kind: step_up_change::Kind::Removed,
            state: step_up::State::Approved,
            created_at: 1_700_000_000_250,
        };
        let body: serde_json::Value = serde_json::from_slice(&body_of(&change).unwrap()).unwrap();
        assert_eq!(
            body,
            json!({
                "event": "step_up.removed",
                "step_up_id": "stp_1",
                "delegation_id": "dlg_1",
                "tenant_id": "ten_1",
                "state": "STEP_UP_STATE_APPROVED",
                "time": "2023-11-14T22:13:20.250Z",
            })
        );
    }
}

/// Property tests of webhook URL checking and signing.
#[cfg(test)]
mod props {
    use proptest::prelude::*;

    use super::*;
    use crate::props::{PURE_CASES, config};

    proptest! {
        #![proptest_config(config(PURE_CASES))]

        #[test]
        fn accepted_urls_name_a_host_without_credentials(
            url in prop_oneof![
                any::<String>(),
                "(https?|ftp|file|data)?:?(//|///|\\\\\\\\)?([a-z:@.\\[\\]0-9%-]{0,20})(/[a-z?#=&%.]{0,10})?"
                    .prop_map(String::from),
                "[ \t\n]?https://[a-z]{1,8}\\.example(:[0-9]{1,5})?/[a-z]{0,8}[ \n]?".prop_map(String::from),
            ],
            allow_http in any::<bool>(),
        ) {
            if let Ok(parsed) = validate_url(&url, allow_http) {
                prop_assert!(parsed.scheme() == "https" || (allow_http && parsed.scheme() == "http"));
                prop_assert!(parsed.host_str().is_some_and(|h| !h.is_empty()));
                prop_assert!(parsed.username().is_empty() && parsed.password().is_none());
                prop_assert!(url.trim() == url && !url.chars().any(char::is_control));
                let written_prefix = format!("{}://", parsed.scheme());
                prop_assert!(url.starts_with(&written_prefix));
                prop_assert!(url.chars().count() <= MAX_URL_CHARS);
            }
            let _ = host_of(&url);
        }

        #[test]
        fn signatures_are_well_formed_and_bound_to_time_and_body(
            secret in any::<String>(),
            t in any::<i64>(),
            body in prop::collection::vec(any::<u8>(), 0..64),
            other in prop::collection::vec(any::<u8>(), 0..64),
        ) {
            let header = signature(&secret, t, &body);
            let (time, mac) = header.split_once(",v1=").unwrap();
            let expected_time = format!("t={t}");
            prop_assert_eq!(time, expected_time);
            prop_assert_eq!(mac.len(), 64);
            prop_assert!(mac.bytes().all(|b| b.is_ascii_hexdigit()));
            prop_assert_eq!(signature(&secret, t, &other) == header, other == body);
        }
    }
}
