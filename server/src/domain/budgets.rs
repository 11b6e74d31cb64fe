//! Spend budgets: a tenant's limits over rolling windows (CreateBudget …
//! DeleteBudget), which requests they apply to, and charging them.
//!
//! A charge is written in the same transaction as the delegation or
//! signature it pays for. That transaction first updates the budget's row
//! (`charges = charges + 1`), which takes the row's lock on PostgreSQL and the
//! database's write lock on SQLite; only then does it add up the window. So
//! two replicas charging one budget at once are serialised, and the sum of
//! what was allowed never passes the limit. A request waiting on a step-up
//! holds its charge until the step-up is approved (spent), denied
//! (released) or expires (a held charge counts only until its deadline).
//!
//! Budget edits bump the tenant's policy version like rule edits, so the
//! budgets a request is checked against are read from memory
//! (`policy_cache::BudgetCache`) and a request no budget applies to costs nothing more.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder,
    QuerySelect, Set,
};
use serde_json::{Value, json};
use vaultguard_proto::v1 as pb;

use crate::auth::CallContext;
use crate::clock::{Millis, to_timestamp};
use crate::domain::authorization_details::{self as details, Detail};
use crate::domain::page;
use crate::domain::policies::commit_edit;
use crate::domain::policy_engine::{self as engine, Attr, Decision, Direction, Outcome};
use crate::error::{Error, FieldViolation, Result, Violations, is_unique_violation};
use crate::ids::{IdKind, check_id, new_id};
use crate::state::AppState;
use crate::store::entities::{agent, budget, budget_charge, connection, custody_key, tenant};
use crate::store::lifecycle::Transitions;
use crate::validate;

const MIN_WINDOW_SECONDS: u32 = 60;
const MAX_WINDOW_SECONDS: u32 = 90 * 24 * 3600;
/// Fraction digits kept: amounts are whole micro-units.
const SCALE: i128 = 1_000_000;
const MAX_INTEGER_DIGITS: usize = 30;

/// An exact non-negative amount in millionths.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Amount(i128);

impl Amount {
    pub const ONE: Self = Self(SCALE);

    /// A decimal string of at most 30 integer and 6 fraction digits.
    pub fn parse(text: &str) -> Option<Self> {
        let (int, frac) = text.split_once('.').unwrap_or((text, ""));
        if int.is_empty()
            || int.len() > MAX_INTEGER_DIGITS
            || frac.len() > 6
            || (text.contains('.') && frac.is_empty())
            || !int.bytes().all(|b| b.is_ascii_digit())
            || !frac.bytes().all(|b| b.is_ascii_digit())
        {
            return None;
        }
        let int: i128 = int.parse().ok()?;
        let mut frac_value: i128 = if frac.is_empty() {
            0
        } else {
            frac.parse().ok()?
        };
        for _ in frac.len()..6 {
            frac_value *= 10;
        }
        int.checked_mul(SCALE)?.checked_add(frac_value).map(Self)
    }

    /// A finite non-negative number, from its shortest decimal form, rounded
    /// up to the next millionth (a limit is never passed by rounding).
    pub fn from_f64(n: f64) -> Option<Self> {
        if !n.is_finite() || n < 0.0 {
            return None;
        }
        let text = format!("{n}");
        let (int, frac) = text.split_once('.').unwrap_or((&text, ""));
        let kept = &frac[..frac.len().min(6)];
        let dropped = frac.len() > 6 && frac[6..].bytes().any(|b| b != b'0');
        let exact = if kept.is_empty() {
            Self::parse(int)?
        } else {
            Self::parse(&format!("{int}.{kept}"))?
        };
        if dropped {
            exact.checked_add(Self(1))
        } else {
            Some(exact)
        }
    }

    fn checked_add(self, other: Self) -> Option<Self> {
        self.0.checked_add(other.0).map(Self)
    }

    fn saturating_sub(self, other: Self) -> Self {
        Self((self.0 - other.0).max(0))
    }

    fn is_whole(self) -> bool {
        self.0 % SCALE == 0
    }
}

impl fmt::Display for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let int = self.0 / SCALE;
        let frac = self.0 % SCALE;
        if frac == 0 {
            write!(f, "{int}")
        } else {
            let digits = format!("{frac:06}");
            write!(f, "{int}.{}", digits.trim_end_matches('0'))
        }
    }
}

/// A budget ready to be checked.
#[derive(Debug, Clone)]
pub struct Budget {
    pub row: budget::Model,
    pub limit: Amount,
    detail_path: Vec<String>,
}

impl Budget {
    fn parse(row: budget::Model) -> Result<Self> {
        let limit = Amount::parse(&row.limit_amount)
            .ok_or_else(|| Error::internal("stored budget limit is not a decimal"))?;
        let detail_path = if row.sum_detail_path.is_empty() {
            Vec::new()
        } else {
            row.sum_detail_path.split('.').map(str::to_owned).collect()
        };
        Ok(Self {
            row,
            limit,
            detail_path,
        })
    }

    fn direction(&self) -> Direction {
        match self.row.direction {
            budget::Direction::Inbound => Direction::Inbound,
            budget::Direction::Outbound => Direction::Outbound,
        }
    }

    fn over_limit(&self) -> Outcome {
        Outcome::from(self.row.over_limit)
    }

    fn window_millis(&self) -> Millis {
        self.row.window_seconds * 1000
    }

    /// Whether the budget's scope selects `subject`.
    fn selects(&self, subject: &Subject<'_>) -> bool {
        let (counterpart, applies) = match self.direction() {
            Direction::Outbound => (
                subject.receiving_tenant_id,
                self.row.tenant_id == subject.requesting_tenant_id,
            ),
            Direction::Inbound => (
                subject.requesting_tenant_id,
                self.row.tenant_id == subject.receiving_tenant_id && !subject.vault_made,
            ),
        };
        let row = &self.row;
        applies
            && (row.scope_agent_id.is_empty() || row.scope_agent_id == subject.requesting_agent_id)
            && (row.scope_counterpart_tenant_id.is_empty()
                || row.scope_counterpart_tenant_id == counterpart)
            && (row.scope_action_pattern.is_empty()
                || engine::pattern_matches(&row.scope_action_pattern, subject.action))
            && (row.scope_signing_key_id.is_empty()
                || subject.signing_key_id == Some(row.scope_signing_key_id.as_str()))
            && (row.scope_connection_id.is_empty()
                || subject.connection_id == Some(row.scope_connection_id.as_str()))
    }

    /// What `subject` costs this budget.
    fn cost(&self, subject: &Subject<'_>) -> Cost {
        if self.row.measure == budget::Measure::Count {
            return Cost::Amount(Amount::ONE);
        }
        let currency = self.row.currency.as_str();
        if !self.row.sum_attribute.is_empty() {
            if !currency.is_empty() {
                match subject.context.get("currency") {
                    Some(Attr::String(c)) if c == currency => {}
                    _ => return Cost::NotCounted,
                }
            }
            return match subject.context.get(&self.row.sum_attribute) {
                Some(Attr::Number(n)) => Amount::from_f64(*n).map_or(Cost::Missing, Cost::Amount),
                Some(Attr::String(s)) => Amount::parse(s).map_or(Cost::Missing, Cost::Amount),
                _ => Cost::Missing,
            };
        }
        let mut total = Amount::default();
        let mut found = false;
        for detail in subject
            .details
            .iter()
            .filter(|d| d.kind() == self.row.sum_detail_type)
        {
            for (parent, value) in detail.parents_at(&self.detail_path) {
                if !currency.is_empty()
                    && parent.get("currency").and_then(Value::as_str) != Some(currency)
                {
                    continue;
                }
                let amount = match value {
                    Value::String(s) => Amount::parse(s),
                    other => details::as_number(other).and_then(Amount::from_f64),
                };
                match amount.and_then(|a| total.checked_add(a)) {
                    Some(sum) => {
                        total = sum;
                        found = true;
                    }
                    None => return Cost::Missing,
                }
            }
        }
        let any_of_type = subject
            .details
            .iter()
            .any(|d| d.kind() == self.row.sum_detail_type);
        if found {
            Cost::Amount(total)
        } else if any_of_type && !currency.is_empty() {
            // Details of the type, all in other currencies.
            Cost::NotCounted
        } else {
            Cost::Missing
        }
    }
}

/// What a request costs one budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cost {
    Amount(Amount),
    /// Outside the budget's currency.
    NotCounted,
    /// A SUM budget applies but the request states no measured value.
    Missing,
}

/// What is being charged: a request's parties, action and payload.
#[derive(Debug, Clone)]
pub struct Subject<'a> {
    pub requesting_tenant_id: &'a str,
    pub requesting_agent_id: &'a str,
    pub receiving_tenant_id: &'a str,
    pub action: &'a str,
    pub context: &'a BTreeMap<String, Attr>,
    pub details: &'a [Detail],
    pub signing_key_id: Option<&'a str>,
    pub connection_id: Option<&'a str>,
    /// A vault operation (Sign, ExchangeToken): only OUTBOUND budgets apply.
    pub vault_made: bool,
}

async fn tenant_budgets(state: &AppState, current: &tenant::Model) -> Result<Vec<Budget>> {
    let rows = match state.budget_cache.get(current) {
        Some(rows) => rows,
        None => read_budgets(state, current).await?,
    };
    rows.iter().cloned().map(Budget::parse).collect()
}

/// Reads a tenant's budgets at its current policy version and keeps them.
async fn read_budgets(
    state: &AppState,
    current: &tenant::Model,
) -> Result<Arc<Vec<budget::Model>>> {
    let mut before = current.clone();
    for _ in 0..3 {
        let rows = Arc::new(
            budget::Entity::find()
                .filter(budget::Column::TenantId.eq(&before.id))
                .order_by_asc(budget::Column::Id)
                .all(&state.db)
                .await?,
        );
        let after = tenant::Entity::find_by_id(before.id.clone())
            .one(&state.db)
            .await?
            .ok_or(Error::NotFound("tenant"))?;
        if after.policy_version == before.policy_version {
            state.budget_cache.put(&after, rows.clone());
            return Ok(rows);
        }
        before = after;
    }
    Err(Error::Conflict("the budgets changed while they were read"))
}

/// One budget a request must be charged against, and its cost.
#[derive(Debug, Clone)]
pub struct Applicable {
    pub budget: Budget,
    cost: Cost,
}

/// The budgets of both parties that apply to `subject`, by id. Reads memory
/// unless a policy version moved.
pub async fn applicable(
    state: &AppState,
    requesting: &tenant::Model,
    receiving: &tenant::Model,
    subject: &Subject<'_>,
) -> Result<Vec<Applicable>> {
    let mut out = Vec::new();
    let mut tenants = vec![requesting];
    if receiving.id != requesting.id && !subject.vault_made {
        tenants.push(receiving);
    }
    for tenant in tenants {
        for budget in tenant_budgets(state, tenant).await? {
            if budget.selects(subject) {
                let cost = budget.cost(subject);
                if cost != Cost::NotCounted {
                    out.push(Applicable { budget, cost });
                }
            }
        }
    }
    out.sort_by(|a, b| a.budget.row.id.cmp(&b.budget.row.id));
    Ok(out)
}

/// A budget the request would take past its limit.
#[derive(Debug, Clone)]
pub struct Exceeded {
    pub budget_id: String,
    pub tenant_id: String,
    pub direction: Direction,
    pub effect: Outcome,
    pub explanation: String,
}

/// What checking a request's budgets found, inside its transaction.
#[derive(Debug, Default)]
pub struct Checked {
    charges: Vec<(String, String, Amount)>,
    pub exceeded: Vec<Exceeded>,
}

impl Checked {
    /// The charges to record, as audit details.
    pub fn details(&self) -> Value {
        Value::Array(
            self.charges
                .iter()
                .map(|(id, _, amount)| json!({"budget_id": id, "amount": amount.to_string()}))
                .collect(),
        )
    }

    pub fn is_empty(&self) -> bool {
        self.charges.is_empty() && self.exceeded.is_empty()
    }
}

/// What a budget's window holds at `now`, and when its oldest charge leaves.
async fn usage<C: ConnectionTrait>(
    db: &C,
    budget: &Budget,
    now: Millis,
) -> Result<(Amount, Option<Millis>)> {
    let since = now - budget.window_millis();
    if budget.row.measure == budget::Measure::Count {
        return count_usage(db, budget, since, now).await;
    }
    let rows: Vec<(String, i64, budget_charge::State, Option<i64>)> = budget_charge::Entity::find()
        .select_only()
        .column(budget_charge::Column::Amount)
        .column(budget_charge::Column::ChargedAt)
        .column(budget_charge::Column::State)
        .column(budget_charge::Column::HoldExpiresAt)
        .filter(budget_charge::Column::BudgetId.eq(&budget.row.id))
        .filter(budget_charge::Column::ChargedAt.gt(since))
        .filter(budget_charge::Column::State.ne(budget_charge::State::Released))
        .into_tuple()
        .all(db)
        .await?;
    let mut used = Amount::default();
    let mut next: Option<Millis> = None;
    for (amount, charged_at, state, hold_until) in rows {
        let mut leaves = charged_at + budget.window_millis();
        if state == budget_charge::State::Held {
            match hold_until {
                Some(until) if until > now => leaves = leaves.min(until),
                _ => continue,
            }
        }
        let amount = Amount::parse(&amount)
            .ok_or_else(|| Error::internal("stored charge is not a decimal"))?;
        used = used
            .checked_add(amount)
            .ok_or_else(|| Error::internal("budget use overflows"))?;
        next = Some(next.map_or(leaves, |n| n.min(leaves)));
    }
    Ok((used, next))
}

/// A COUNT budget's window, added up by the database: the charges that
/// count (spent, or held until a deadline still ahead) are each worth one.
async fn count_usage<C: ConnectionTrait>(
    db: &C,
    budget: &Budget,
    since: Millis,
    now: Millis,
) -> Result<(Amount, Option<Millis>)> {
    use sea_orm::sea_query::Condition;
    let counted = Condition::any()
        .add(budget_charge::Column::State.eq(budget_charge::State::Spent))
        .add(
            Condition::all()
                .add(budget_charge::Column::State.eq(budget_charge::State::Held))
                .add(budget_charge::Column::HoldExpiresAt.gt(now)),
        );
    let row: Option<(i64, Option<i64>, Option<i64>)> = budget_charge::Entity::find()
        .select_only()
        .column_as(budget_charge::Column::Id.count(), "n")
        .column_as(budget_charge::Column::ChargedAt.min(), "oldest")
        .column_as(budget_charge::Column::HoldExpiresAt.min(), "hold")
        .filter(budget_charge::Column::BudgetId.eq(&budget.row.id))
        .filter(budget_charge::Column::ChargedAt.gt(since))
        .filter(counted)
        .into_tuple()
        .one(db)
        .await?;
    let (n, oldest, hold) = row.unwrap_or((0, None, None));
    let used = i128::from(n)
        .checked_mul(SCALE)
        .map(Amount)
        .ok_or_else(|| Error::internal("budget use overflows"))?;
    let next = match (oldest.map(|t| t + budget.window_millis()), hold) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    Ok((used, next))
}

/// Locks each applicable budget (in id order, so two requests never wait on
/// each other crosswise) and finds which the request would take past their
/// limit. Must run inside the transaction that stores what it pays for.
pub async fn check_in<C: ConnectionTrait>(
    txn: &C,
    applicable: &[Applicable],
    now: Millis,
) -> Result<Checked> {
    let mut checked = Checked::default();
    for item in applicable {
        let budget = &item.budget;
        let locked = budget::Entity::update_many()
            .col_expr(
                budget::Column::Charges,
                sea_orm::sea_query::ExprTrait::add(Expr::col(budget::Column::Charges), 1),
            )
            .filter(budget::Column::Id.eq(&budget.row.id))
            .exec(txn)
            .await?;
        if locked.rows_affected == 0 {
            // Deleted since it was cached: it no longer limits anything.
            continue;
        }
        let (used, _) = usage(txn, budget, now).await?;
        let unit = if budget.row.currency.is_empty() {
            String::new()
        } else {
            format!(" {}", budget.row.currency)
        };
        let refusal = match item.cost {
            Cost::NotCounted => None,
            Cost::Missing => Some(format!(
                "budget {} ({}) sums {} but the request does not state it → {}",
                budget.row.id,
                budget.row.name,
                measured(&budget.row),
                budget.over_limit().label()
            )),
            Cost::Amount(cost) => match used.checked_add(cost) {
                Some(total) if total <= budget.limit => {
                    checked.charges.push((
                        budget.row.id.clone(),
                        budget.row.tenant_id.clone(),
                        cost,
                    ));
                    None
                }
                _ => Some(format!(
                    "budget {} ({}): {}{unit} used of {}{unit} per {} s, this request {}{unit} → {}",
                    budget.row.id,
                    budget.row.name,
                    used,
                    budget.limit,
                    budget.row.window_seconds,
                    cost,
                    budget.over_limit().label()
                )),
            },
        };
        if let Some(explanation) = refusal {
            if budget.over_limit() == Outcome::StepUp {
                // A human may still approve: the request holds its cost.
                if let Cost::Amount(cost) = item.cost {
                    checked.charges.push((
                        budget.row.id.clone(),
                        budget.row.tenant_id.clone(),
                        cost,
                    ));
                }
            }
            checked.exceeded.push(Exceeded {
                budget_id: budget.row.id.clone(),
                tenant_id: budget.row.tenant_id.clone(),
                direction: budget.direction(),
                effect: budget.over_limit(),
                explanation,
            });
        }
    }
    Ok(checked)
}

fn measured(row: &budget::Model) -> String {
    if row.sum_attribute.is_empty() {
        format!("{}.{}", row.sum_detail_type, row.sum_detail_path)
    } else {
        row.sum_attribute.clone()
    }
}

/// `decision` with the exceeded budgets' effects applied to their sides.
pub fn apply(mut decision: Decision, checked: &Checked) -> Decision {
    for exceeded in &checked.exceeded {
        let side = match exceeded.direction {
            Direction::Outbound => &mut decision.outbound,
            Direction::Inbound => &mut decision.inbound,
        };
        if exceeded.effect.cmp(&side.outcome) == Ordering::Greater {
            side.outcome = exceeded.effect;
            if exceeded.effect == Outcome::StepUp {
                side.approvals_required = side.approvals_required.max(1);
            }
        }
        if exceeded.effect == Outcome::Block {
            side.budget_id = exceeded.budget_id.clone();
        }
        side.explanation =
            engine::truncate(format!("{}; {}", side.explanation, exceeded.explanation));
    }
    let outcome = decision.outbound.outcome.max(decision.inbound.outcome);
    if outcome != decision.outcome {
        decision.outcome = outcome;
        match outcome {
            Outcome::Block => {
                decision.max_ttl_seconds = 0;
                decision.approvals_required = 0;
                decision.scopes.clear();
                decision.resource.clear();
            }
            Outcome::StepUp => {
                decision.approvals_required = decision
                    .outbound
                    .approvals_required
                    .max(decision.inbound.approvals_required)
                    .max(1);
            }
            Outcome::Allow => {}
        }
    }
    decision
}

/// Records the charges of `checked` for `subject_id` (a delegation or a
/// signature): spent, or held until `held_until` for a step-up.
pub async fn record_in<C: ConnectionTrait>(
    txn: &C,
    checked: &Checked,
    subject_id: &str,
    held_until: Option<Millis>,
    now: Millis,
) -> Result<()> {
    if checked.charges.is_empty() {
        return Ok(());
    }
    let rows =
        checked.charges.iter().map(
            |(budget_id, tenant_id, amount)| budget_charge::ActiveModel {
                id: Set(new_id(IdKind::BudgetCharge)),
                budget_id: Set(budget_id.clone()),
                tenant_id: Set(tenant_id.clone()),
                amount: Set(amount.to_string()),
                charged_at: Set(now),
                subject_id: Set(subject_id.to_owned()),
                state: Set(if held_until.is_some() {
                    budget_charge::State::Held
                } else {
                    budget_charge::State::Spent
                }),
                hold_expires_at: Set(held_until),
            },
        );
    budget_charge::Entity::insert_many(rows).exec(txn).await?;
    Ok(())
}

/// The step-up of `subject_id` was approved: its held charges are spent.
pub async fn spend_held<C: ConnectionTrait>(txn: &C, subject_id: &str) -> Result<()> {
    settle(txn, subject_id, budget_charge::State::Spent).await
}

/// The step-up of `subject_id` was denied: its held charges no longer count.
pub async fn release_held<C: ConnectionTrait>(txn: &C, subject_id: &str) -> Result<()> {
    settle(txn, subject_id, budget_charge::State::Released).await
}

async fn settle<C: ConnectionTrait>(
    txn: &C,
    subject_id: &str,
    to: budget_charge::State,
) -> Result<()> {
    budget_charge::Entity::update_many()
        .col_expr(
            budget_charge::Column::HoldExpiresAt,
            Expr::value(Option::<i64>::None),
        )
        .filter(budget_charge::Column::SubjectId.eq(subject_id))
        .into_state(to)
        .exec(txn)
        .await?;
    Ok(())
}

// ---- CreateBudget … DeleteBudget ----

/// A budget with its use at `now`, for answers.
pub struct BudgetView {
    pub budget: Budget,
    pub used: Amount,
    pub next_release: Option<Millis>,
}

impl BudgetView {
    pub fn to_proto(&self) -> pb::Budget {
        let row = &self.budget.row;
        pb::Budget {
            id: row.id.clone(),
            name: row.name.clone(),
            description: row.description.clone(),
            direction: match row.direction {
                budget::Direction::Inbound => pb::RuleDirection::Inbound,
                budget::Direction::Outbound => pb::RuleDirection::Outbound,
            } as i32,
            measure: match row.measure {
                budget::Measure::Count => pb::BudgetMeasure::Count,
                budget::Measure::Sum => pb::BudgetMeasure::Sum,
            } as i32,
            sum_attribute: row.sum_attribute.clone(),
            sum_detail_type: row.sum_detail_type.clone(),
            sum_detail_path: row.sum_detail_path.clone(),
            currency: row.currency.clone(),
            scope: Some(pb::BudgetScope {
                agent_id: row.scope_agent_id.clone(),
                counterpart_tenant_id: row.scope_counterpart_tenant_id.clone(),
                action_pattern: row.scope_action_pattern.clone(),
                signing_key_id: row.scope_signing_key_id.clone(),
                connection_id: row.scope_connection_id.clone(),
            }),
            window_seconds: u32::try_from(row.window_seconds).unwrap_or_default(),
            limit: self.budget.limit.to_string(),
            over_limit: Outcome::from(row.over_limit).to_effect() as i32,
            used: self.used.to_string(),
            remaining: self.budget.limit.saturating_sub(self.used).to_string(),
            next_release_time: self.next_release.map(to_timestamp),
            version: u64::try_from(row.version).unwrap_or_default(),
            create_time: Some(to_timestamp(row.created_at)),
            update_time: Some(to_timestamp(row.updated_at)),
        }
    }
}

async fn view<C: ConnectionTrait>(db: &C, row: budget::Model, now: Millis) -> Result<BudgetView> {
    let budget = Budget::parse(row)?;
    let (used, next_release) = usage(db, &budget, now).await?;
    Ok(BudgetView {
        budget,
        used,
        next_release,
    })
}

fn check_name(field: &str, name: &str) -> std::result::Result<(), FieldViolation> {
    let valid = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if valid {
        Ok(())
    } else {
        Err(FieldViolation {
            field: field.to_owned(),
            description: "names are 1 to 64 characters of a-z, 0-9, '_' and '-'".to_owned(),
        })
    }
}

/// The mutable part of a budget, checked.
struct Terms {
    limit: Amount,
    window_seconds: u32,
    over_limit: Outcome,
}

fn check_terms(
    v: &mut Violations,
    prefix: &str,
    limit: &str,
    window_seconds: u32,
    over_limit: i32,
    description: &str,
    whole: bool,
) -> Option<Terms> {
    let limit_field = format!("{prefix}limit");
    let parsed = match Amount::parse(limit) {
        Some(amount) if amount > Amount::default() && (!whole || amount.is_whole()) => Some(amount),
        Some(_) if whole => {
            v.add(
                &limit_field,
                "must be a positive whole number for a COUNT budget",
            );
            None
        }
        _ => {
            v.add(
                &limit_field,
                "must be a positive decimal string of at most 30 integer and 6 fraction digits",
            );
            None
        }
    };
    if !(MIN_WINDOW_SECONDS..=MAX_WINDOW_SECONDS).contains(&window_seconds) {
        v.add(
            format!("{prefix}window_seconds"),
            format!("must be between {MIN_WINDOW_SECONDS} and {MAX_WINDOW_SECONDS}"),
        );
    }
    let effect = v
        .take(validate::enum_value::<pb::Effect>(
            &format!("{prefix}over_limit"),
            over_limit,
            false,
        ))
        .flatten();
    let over = match effect {
        Some(pb::Effect::StepUp) => Some(Outcome::StepUp),
        Some(pb::Effect::Block) => Some(Outcome::Block),
        Some(_) => {
            v.add(
                format!("{prefix}over_limit"),
                "must be EFFECT_STEP_UP or EFFECT_BLOCK",
            );
            None
        }
        None => None,
    };
    v.check(validate::optional_text(
        &format!("{prefix}description"),
        description,
        256,
    ));
    Some(Terms {
        limit: parsed?,
        window_seconds,
        over_limit: over?,
    })
}

fn refuse_output_only(budget: &pb::Budget, v: &mut Violations) {
    let set = [
        ("budget.id", !budget.id.is_empty()),
        ("budget.used", !budget.used.is_empty()),
        ("budget.remaining", !budget.remaining.is_empty()),
        (
            "budget.next_release_time",
            budget.next_release_time.is_some(),
        ),
        ("budget.version", budget.version != 0),
        ("budget.create_time", budget.create_time.is_some()),
        ("budget.update_time", budget.update_time.is_some()),
    ];
    for (field, is_set) in set {
        if is_set {
            v.add(field, "is output only");
        }
    }
}

fn optional_id(v: &mut Violations, field: &str, value: &str, kind: IdKind) {
    if !value.is_empty() {
        v.check(check_id(field, value, kind));
    }
}

/// CreateBudget.
pub async fn create(
    state: &AppState,
    ctx: &CallContext,
    budget: Option<&pb::Budget>,
) -> Result<BudgetView> {
    let tenant_id = ctx.principal.tenant_id()?.to_owned();
    let b = budget.ok_or_else(|| Error::invalid("budget", "is required"))?;
    let mut v = Violations::new();
    refuse_output_only(b, &mut v);
    v.check(check_name("budget.name", &b.name));
    let direction = v
        .take(validate::enum_value::<pb::RuleDirection>(
            "budget.direction",
            b.direction,
            false,
        ))
        .flatten()
        .and_then(Direction::from_proto);
    let measure = v
        .take(validate::enum_value::<pb::BudgetMeasure>(
            "budget.measure",
            b.measure,
            false,
        ))
        .flatten();
    let mut detail_path = String::new();
    match measure {
        Some(pb::BudgetMeasure::Count) => {
            for (field, value) in [
                ("budget.sum_attribute", &b.sum_attribute),
                ("budget.sum_detail_type", &b.sum_detail_type),
                ("budget.sum_detail_path", &b.sum_detail_path),
                ("budget.currency", &b.currency),
            ] {
                if !value.is_empty() {
                    v.add(field, "must be empty for a COUNT budget");
                }
            }
        }
        Some(pb::BudgetMeasure::Sum) => {
            match (b.sum_attribute.is_empty(), b.sum_detail_type.is_empty()) {
                (false, true) => {
                    v.check(engine::check_attribute_name(
                        "budget.sum_attribute",
                        &b.sum_attribute,
                    ));
                    if !b.sum_detail_path.is_empty() {
                        v.add("budget.sum_detail_path", "must be empty with sum_attribute");
                    }
                }
                (true, false) => {
                    v.check(details::check_type(
                        "budget.sum_detail_type",
                        &b.sum_detail_type,
                    ));
                    match details::check_path("budget.sum_detail_path", &b.sum_detail_path) {
                        Ok(path) => detail_path = path.join("."),
                        Err(e) => v.check(Err(e)),
                    }
                }
                _ => v.add(
                    "budget.sum_attribute",
                    "a SUM budget names exactly one of sum_attribute and sum_detail_type",
                ),
            }
        }
        _ => {}
    }
    let currency_ok =
        b.currency.len() <= 16 && b.currency.bytes().all(|c| c.is_ascii_alphanumeric());
    if !currency_ok {
        v.add("budget.currency", "must be 1 to 16 letters and digits");
    }
    let scope = b.scope.clone().unwrap_or_default();
    optional_id(
        &mut v,
        "budget.scope.agent_id",
        &scope.agent_id,
        IdKind::Agent,
    );
    optional_id(
        &mut v,
        "budget.scope.counterpart_tenant_id",
        &scope.counterpart_tenant_id,
        IdKind::Tenant,
    );
    if !scope.action_pattern.is_empty() {
        v.check(engine::check_pattern(
            "budget.scope.action_pattern",
            &scope.action_pattern,
        ));
    }
    optional_id(
        &mut v,
        "budget.scope.signing_key_id",
        &scope.signing_key_id,
        IdKind::SigningKey,
    );
    optional_id(
        &mut v,
        "budget.scope.connection_id",
        &scope.connection_id,
        IdKind::Connection,
    );
    let terms = check_terms(
        &mut v,
        "budget.",
        &b.limit,
        b.window_seconds,
        b.over_limit,
        &b.description,
        measure == Some(pb::BudgetMeasure::Count),
    );
    if direction == Some(Direction::Inbound)
        && !(scope.signing_key_id.is_empty() && scope.connection_id.is_empty())
    {
        v.add(
            "budget.scope",
            "signing_key_id and connection_id select the tenant's own vault calls: use an OUTBOUND budget",
        );
    }
    v.finish()?;
    let (Some(direction), Some(measure), Some(terms)) = (direction, measure, terms) else {
        return Err(Error::internal("validated budget missing"));
    };
    check_references(state, &tenant_id, direction, &scope).await?;
    let now = state.clock.now_millis();
    let model = budget::ActiveModel {
        id: Set(new_id(IdKind::Budget)),
        tenant_id: Set(tenant_id.clone()),
        name: Set(b.name.clone()),
        description: Set(b.description.clone()),
        direction: Set(match direction {
            Direction::Inbound => budget::Direction::Inbound,
            Direction::Outbound => budget::Direction::Outbound,
        }),
        measure: Set(if measure == pb::BudgetMeasure::Count {
            budget::Measure::Count
        } else {
            budget::Measure::Sum
        }),
        sum_attribute: Set(b.sum_attribute.clone()),
        sum_detail_type: Set(b.sum_detail_type.clone()),
        sum_detail_path: Set(detail_path),
        currency: Set(b.currency.clone()),
        scope_agent_id: Set(scope.agent_id.clone()),
        scope_counterpart_tenant_id: Set(scope.counterpart_tenant_id.clone()),
        scope_action_pattern: Set(scope.action_pattern.clone()),
        scope_signing_key_id: Set(scope.signing_key_id.clone()),
        scope_connection_id: Set(scope.connection_id.clone()),
        window_seconds: Set(i64::from(terms.window_seconds)),
        limit_amount: Set(terms.limit.to_string()),
        over_limit: Set(terms.over_limit.into()),
        version: Set(1),
        charges: Set(0),
        created_at: Set(now),
        updated_at: Set(now),
    };
    let txn = crate::store::begin(&state.db).await?;
    let model = match model.insert(&txn).await {
        Ok(model) => model,
        Err(err) if is_unique_violation(&err) => {
            return Err(Error::already_exists("a budget of this name exists"));
        }
        Err(err) => return Err(err.into()),
    };
    let details = json!({"budget": audit_details(&model)});
    commit_edit(
        txn,
        state,
        ctx,
        &tenant_id,
        "budget.created",
        &model.id,
        details,
    )
    .await?;
    view(&state.db, model, now).await
}

/// The scope's references as the rules check theirs: the counterpart
/// tenant exists; an OUTBOUND budget's agent, and the key and connection,
/// are the tenant's own (NOT_FOUND otherwise, as for an unknown one).
async fn check_references(
    state: &AppState,
    tenant_id: &str,
    direction: Direction,
    scope: &pb::BudgetScope,
) -> Result<()> {
    if !scope.counterpart_tenant_id.is_empty()
        && tenant::Entity::find_by_id(scope.counterpart_tenant_id.clone())
            .one(&state.db)
            .await?
            .is_none()
    {
        return Err(Error::invalid(
            "budget.scope.counterpart_tenant_id",
            "names no tenant",
        ));
    }
    if direction == Direction::Outbound
        && !scope.agent_id.is_empty()
        && agent::Entity::find_by_id(scope.agent_id.clone())
            .filter(agent::Column::TenantId.eq(tenant_id))
            .one(&state.db)
            .await?
            .is_none()
    {
        return Err(Error::NotFound("agent"));
    }
    if !scope.signing_key_id.is_empty()
        && custody_key::Entity::find_by_id(scope.signing_key_id.clone())
            .filter(custody_key::Column::TenantId.eq(tenant_id))
            .one(&state.db)
            .await?
            .is_none()
    {
        return Err(Error::NotFound("signing key"));
    }
    if !scope.connection_id.is_empty()
        && connection::Entity::find_by_id(scope.connection_id.clone())
            .filter(connection::Column::TenantId.eq(tenant_id))
            .one(&state.db)
            .await?
            .is_none()
    {
        return Err(Error::NotFound("connection"));
    }
    Ok(())
}

fn audit_details(row: &budget::Model) -> Value {
    json!({
        "id": row.id,
        "name": row.name,
        "direction": row.direction.as_str(),
        "measure": row.measure.as_str(),
        "sum_attribute": row.sum_attribute,
        "sum_detail_type": row.sum_detail_type,
        "sum_detail_path": row.sum_detail_path,
        "currency": row.currency,
        "scope": {
            "agent_id": row.scope_agent_id,
            "counterpart_tenant_id": row.scope_counterpart_tenant_id,
            "action_pattern": row.scope_action_pattern,
            "signing_key_id": row.scope_signing_key_id,
            "connection_id": row.scope_connection_id,
        },
        "window_seconds": row.window_seconds,
        "limit": row.limit_amount,
        "over_limit": Outcome::from(row.over_limit).as_str(),
        "version": row.version,
    })
}

async fn find(state: &AppState, tenant_id: &str, budget_id: &str) -> Result<budget::Model> {
    check_id("budget_id", budget_id, IdKind::Budget)?;
    budget::Entity::find_by_id(budget_id.to_owned())
        .filter(budget::Column::TenantId.eq(tenant_id))
        .one(&state.db)
        .await?
        .ok_or(Error::NotFound("budget"))
}

/// GetBudget.
pub async fn get(state: &AppState, ctx: &CallContext, budget_id: &str) -> Result<BudgetView> {
    let row = find(state, ctx.principal.tenant_id()?, budget_id).await?;
    view(&state.db, row, state.clock.now_millis()).await
}

/// ListBudgets: by name.
pub async fn list(
    state: &AppState,
    ctx: &CallContext,
    req: &pb::ListBudgetsRequest,
) -> Result<(Vec<BudgetView>, String)> {
    let tenant_id = ctx.principal.tenant_id()?.to_owned();
    let (size, token) = page::parts(req.page.as_ref());
    let size =
        validate::page_size("page.page_size", size).map_err(|e| Error::InvalidArgument(vec![e]))?;
    let scope = format!("budgets|{tenant_id}");
    let after = page::decode("page.page_token", &scope, token)?;
    let mut query = budget::Entity::find()
        .filter(budget::Column::TenantId.eq(&tenant_id))
        .order_by_asc(budget::Column::Name)
        .limit(size + 1);
    if let Some(after) = after {
        query = query.filter(budget::Column::Name.gt(after));
    }
    let rows = query.all(&state.db).await?;
    let (rows, next) = page::finish(rows, size, &scope, |r| r.name.clone());
    let now = state.clock.now_millis();
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        out.push(view(&state.db, row, now).await?);
    }
    Ok((out, next))
}

/// UpdateBudget.
pub async fn update(
    state: &AppState,
    ctx: &CallContext,
    req: &pb::UpdateBudgetRequest,
) -> Result<BudgetView> {
    let tenant_id = ctx.principal.tenant_id()?.to_owned();
    let mut v = Violations::new();
    v.check(check_id("budget_id", &req.budget_id, IdKind::Budget));
    if req.expected_version == 0 {
        v.add("expected_version", "is required");
    }
    v.finish()?;
    let current = find(state, &tenant_id, &req.budget_id).await?;
    let mut v = Violations::new();
    let terms = check_terms(
        &mut v,
        "",
        &req.limit,
        req.window_seconds,
        req.over_limit,
        &req.description,
        current.measure == budget::Measure::Count,
    );
    v.finish()?;
    let terms = terms.ok_or_else(|| Error::internal("validated terms missing"))?;
    let expected = i64::try_from(req.expected_version)
        .map_err(|_| Error::invalid("expected_version", "is out of range"))?;
    let now = state.clock.now_millis();
    let txn = crate::store::begin(&state.db).await?;
    let result = budget::Entity::update_many()
        .col_expr(
            budget::Column::LimitAmount,
            Expr::value(terms.limit.to_string()),
        )
        .col_expr(
            budget::Column::WindowSeconds,
            Expr::value(i64::from(terms.window_seconds)),
        )
        .col_expr(
            budget::Column::OverLimit,
            Expr::value(budget::Effect::from(terms.over_limit)),
        )
        .col_expr(
            budget::Column::Description,
            Expr::value(req.description.clone()),
        )
        .col_expr(
            budget::Column::Version,
            sea_orm::sea_query::ExprTrait::add(Expr::col(budget::Column::Version), 1),
        )
        .col_expr(budget::Column::UpdatedAt, Expr::value(now))
        .filter(budget::Column::Id.eq(&current.id))
        .filter(budget::Column::Version.eq(expected))
        .exec(&txn)
        .await?;
    if result.rows_affected == 0 {
        let mut err =
            Error::invalid_state("the version changed since it was read", "version_mismatch");
        if let Error::FailedPrecondition { metadata, .. } = &mut err {
            metadata.insert("current_version".to_owned(), current.version.to_string());
        }
        return Err(err);
    }
    let updated = budget::Entity::find_by_id(current.id.clone())
        .one(&txn)
        .await?
        .ok_or(Error::NotFound("budget"))?;
    let details = json!({"before": audit_details(&current), "after": audit_details(&updated)});
    commit_edit(
        txn,
        state,
        ctx,
        &tenant_id,
        "budget.updated",
        &current.id,
        details,
    )
    .await?;
    view(&state.db, updated, now).await
}

/// DeleteBudget.
pub async fn delete(state: &AppState, ctx: &CallContext, budget_id: &str) -> Result<()> {
    let tenant_id = ctx.principal.tenant_id()?.to_owned();
    let current = find(state, &tenant_id, budget_id).await?;
    let txn = crate::store::begin(&state.db).await?;
    budget_charge::Entity::delete_many()
        .filter(budget_charge::Column::BudgetId.eq(&current.id))
        .exec(&txn)
        .await?;
    let deleted = budget::Entity::delete_many()
        .filter(budget::Column::Id.eq(&current.id))
        .exec(&txn)
        .await?;
    if deleted.rows_affected == 0 {
        return Err(Error::NotFound("budget"));
    }
    let details = json!({"budget": audit_details(&current)});
    commit_edit(
        txn,
        state,
        ctx,
        &tenant_id,
        "budget.deleted",
        &current.id,
        details,
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_are_exact_decimals() {
        assert_eq!(Amount::parse("120.50").unwrap().to_string(), "120.5");
        assert_eq!(Amount::parse("0.000001").unwrap().to_string(), "0.000001");
        assert_eq!(Amount::parse("10000").unwrap().to_string(), "10000");
        assert!(Amount::parse("1.0000001").is_none());
        assert!(Amount::parse("-1").is_none());
        assert!(Amount::parse("1e5").is_none());
        assert!(Amount::parse(".5").is_none());
        assert!(Amount::parse("5.").is_none());
        let a = Amount::parse("0.1").unwrap();
        let b = Amount::parse("0.2").unwrap();
        assert_eq!(a.checked_add(b), Amount::parse("0.3"));
    }

    #[test]
    fn numbers_round_up_so_a_limit_is_never_passed_by_rounding() {
        assert_eq!(
            Amount::from_f64(0.1).unwrap(),
            Amount::parse("0.1").unwrap()
        );
        assert_eq!(
            Amount::from_f64(1.0000001).unwrap(),
            Amount::parse("1.000001").unwrap()
        );
        assert!(Amount::from_f64(-0.5).is_none());
        assert!(Amount::from_f64(f64::NAN).is_none());
    }
}
