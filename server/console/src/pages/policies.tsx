// Admin › Policies: the tenant's outbound default, its rules in evaluation
// order (create, edit, delete, with the server's field violations shown on
// the field they name), and a dry run through EvaluatePolicy.
import { useEffect, useState } from "preact/hooks";
import type { MessageInitShape } from "@bufbuild/protobuf";
import type { AttributeValue, AttributeValueSchema } from "../../gen/vaultguard/v1/common_pb";
import {
  ConditionOperator,
  Decision,
  Effect,
  OutboundDefault,
  RuleDirection,
  Weekday,
  type EvaluatePolicyResponse,
  type Rule,
  type RuleSchema,
} from "../../gen/vaultguard/v1/policy_service_pb";
import type { Agent } from "../../gen/vaultguard/v1/agent_service_pb";
import { describe, fieldErrors, type Problem } from "../errors";
import {
  attributeText,
  decisionLabel,
  decisionTone,
  directionLabel,
  effectLabel,
  formatDuration,
  operatorLabel,
  shortId,
} from "../format";
import { href, navigate, onLinkClick } from "../router";
import { agents, policies } from "../rpc";
import { me } from "../session";
import { clearDraft, useDraft, useStore } from "../store";
import { useTitle } from "../title";
import { DecisionView } from "../components/decision";
import {
  Checkbox,
  Chip,
  Dialog,
  Empty,
  ErrorBanner,
  Id,
  Loading,
  Notice,
  PageHeader,
  SelectField,
  TextArea,
  TextField,
  Time,
  splitList,
  useLoad,
} from "../components/ui";
import { allPages } from "../paging";

// ---- shared helpers -----------------------------------------------------------

/**
 * picker collects the violations for one form field: its exact path and
 * any path below it (`scopes[2]`, `time_window.days_of_week[0]`), and
 * remembers which paths the form has shown, for the error summary.
 */
function picker(errors: Record<string, string>) {
  const used: string[] = [];
  const pick = (key: string): string | undefined => {
    const hits = Object.keys(errors).filter((k) => k === key || k.startsWith(key + "[") || k.startsWith(key + "."));
    used.push(...hits);
    return hits.length ? hits.map((k) => errors[k]).join(" ") : undefined;
  };
  return { pick, used };
}

type ValueType = "number" | "string" | "bool";

function toValue(type: ValueType, text: string): MessageInitShape<typeof AttributeValueSchema> {
  if (type === "number") return { kind: { case: "numberValue", value: Number(text.trim()) } };
  if (type === "bool") return { kind: { case: "boolValue", value: text.trim().toLowerCase() === "true" } };
  return { kind: { case: "stringValue", value: text } };
}

function typeOf(v: AttributeValue | undefined): ValueType {
  return v?.kind.case === "numberValue" ? "number" : v?.kind.case === "boolValue" ? "bool" : "string";
}

const TYPE_OPTIONS: Array<[ValueType, string]> = [
  ["number", "Number"],
  ["string", "Text"],
  ["bool", "Yes/no"],
];

const DAYS: Array<[Weekday, string]> = [
  [Weekday.MONDAY, "Mon"],
  [Weekday.TUESDAY, "Tue"],
  [Weekday.WEDNESDAY, "Wed"],
  [Weekday.THURSDAY, "Thu"],
  [Weekday.FRIDAY, "Fri"],
  [Weekday.SATURDAY, "Sat"],
  [Weekday.SUNDAY, "Sun"],
];

function minutesToClock(m: number): string {
  return `${String(Math.floor(m / 60) % 24).padStart(2, "0")}:${String(m % 60).padStart(2, "0")}`;
}

function clockToMinutes(s: string, end: boolean): number {
  const [h, m] = s.split(":").map(Number);
  const total = (h ?? 0) * 60 + (m ?? 0);
  return end && total === 0 ? 1440 : total;
}

function conditionText(rule: Rule): string {
  const parts = rule.conditions.map((c) => {
    const op = operatorLabel[c.operator];
    if (c.operator === ConditionOperator.EXISTS) return `${c.attribute} exists`;
    if (c.operator === ConditionOperator.IN || c.operator === ConditionOperator.NOT_IN) {
      return `${c.attribute} ${op} [${c.values.map(attributeText).join(", ")}]`;
    }
    return `${c.attribute} ${op} ${attributeText(c.value)}`;
  });
  if (rule.timeWindow) {
    const w = rule.timeWindow;
    const days = w.daysOfWeek.length ? " " + w.daysOfWeek.map((d) => DAYS.find(([v]) => v === d)?.[1] ?? "?").join(",") : "";
    parts.push(`${minutesToClock(w.startMinute)}–${minutesToClock(w.endMinute)} UTC${days}`);
  }
  return parts.join("; ");
}

// ---- the rule form --------------------------------------------------------------

interface CondForm {
  attribute: string;
  operator: string;
  type: ValueType;
  value: string;
  values: string;
}

interface RuleForm {
  direction: string;
  actionPattern: string;
  counterpart: string;
  agent: string;
  effect: string;
  priority: string;
  maxTtl: string;
  approvals: string;
  scopes: string;
  defaultScopes: string;
  resources: string;
  description: string;
  conditions: CondForm[];
  windowOn: boolean;
  windowStart: string;
  windowEnd: string;
  days: number[];
}

const NEW_RULE: RuleForm = {
  direction: String(RuleDirection.INBOUND),
  actionPattern: "",
  counterpart: "",
  agent: "",
  effect: String(Effect.ALLOW),
  priority: "0",
  maxTtl: "",
  approvals: "1",
  scopes: "",
  defaultScopes: "",
  resources: "",
  description: "",
  conditions: [],
  windowOn: false,
  windowStart: "09:00",
  windowEnd: "17:00",
  days: [],
};

function formOf(r: Rule): RuleForm {
  return {
    direction: String(r.direction),
    actionPattern: r.actionPattern,
    counterpart: r.counterpartTenantId,
    agent: r.agentId,
    effect: String(r.effect),
    priority: String(r.priority),
    maxTtl: r.maxTtlSeconds ? String(r.maxTtlSeconds) : "",
    approvals: String(r.approvalsRequired || 1),
    scopes: r.scopes.join(" "),
    defaultScopes: r.defaultScopes.join(" "),
    resources: r.resources.join("\n"),
    description: r.description,
    conditions: r.conditions.map((c) => ({
      attribute: c.attribute,
      operator: String(c.operator),
      type: typeOf(c.value ?? c.values[0]),
      value: c.value ? attributeText(c.value) : "",
      values: c.values.map(attributeText).join(", "),
    })),
    windowOn: !!r.timeWindow,
    windowStart: r.timeWindow ? minutesToClock(r.timeWindow.startMinute) : "09:00",
    windowEnd: r.timeWindow ? minutesToClock(r.timeWindow.endMinute) : "17:00",
    days: r.timeWindow?.daysOfWeek ?? [],
  };
}

function numberOr(text: string, fallback: number): number {
  const t = text.trim();
  return t === "" ? fallback : Number(t);
}

function ruleOf(f: RuleForm, id = ""): MessageInitShape<typeof RuleSchema> {
  const op = (c: CondForm) => Number(c.operator) as ConditionOperator;
  const effect = Number(f.effect) as Effect;
  return {
    id,
    direction: Number(f.direction) as RuleDirection,
    actionPattern: f.actionPattern.trim(),
    counterpartTenantId: f.counterpart.trim(),
    agentId: f.agent.trim(),
    effect,
    priority: numberOr(f.priority, 0),
    maxTtlSeconds: numberOr(f.maxTtl, 0),
    approvalsRequired: effect === Effect.STEP_UP ? numberOr(f.approvals, 1) : 0,
    scopes: splitList(f.scopes),
    defaultScopes: splitList(f.defaultScopes),
    resources: splitList(f.resources, /\n+/),
    description: f.description.trim(),
    conditions: f.conditions.map((c) => {
      const o = op(c);
      const list = o === ConditionOperator.IN || o === ConditionOperator.NOT_IN;
      const none = o === ConditionOperator.EXISTS;
      return {
        attribute: c.attribute.trim(),
        operator: o,
        value: list || none ? undefined : toValue(c.type, c.value),
        values: list ? splitList(c.values, /,/).map((v) => toValue(c.type, v)) : [],
      };
    }),
    timeWindow: f.windowOn
      ? {
          startMinute: clockToMinutes(f.windowStart, false),
          endMinute: clockToMinutes(f.windowEnd, true),
          daysOfWeek: f.days as Weekday[],
        }
      : undefined,
  };
}

const OPERATORS: Array<[string, string]> = [
  ConditionOperator.EQ,
  ConditionOperator.NE,
  ConditionOperator.LT,
  ConditionOperator.LTE,
  ConditionOperator.GT,
  ConditionOperator.GTE,
  ConditionOperator.IN,
  ConditionOperator.NOT_IN,
  ConditionOperator.EXISTS,
].map((o) => [String(o), operatorLabel[o]]);

function RuleEditor(props: { ruleId: string; onSaved: () => void }) {
  const isNew = props.ruleId === "new";
  const key = `rule-form:${props.ruleId}`;
  const [form, setForm] = useDraft<RuleForm>(key, NEW_RULE);
  const [loaded, setLoaded] = useState<Rule | null>(null);
  const [loadProblem, setLoadProblem] = useState<Problem | null>(null);
  const [problem, setProblem] = useState<Problem | null>(null);
  const [busy, setBusy] = useState(false);

  useEffect(() => {
    if (isNew) return;
    policies.getRule({ ruleId: props.ruleId }).then(
      (res) => {
        if (!res.rule) return;
        setLoaded(res.rule);
        setForm(formOf(res.rule));
      },
      (err: unknown) => setLoadProblem(describe(err)),
    );
  }, [props.ruleId]);

  if (!isNew && !loaded) {
    return loadProblem ? <ErrorBanner problem={loadProblem} /> : <Loading label="Loading the rule…" />;
  }

  const set = <K extends keyof RuleForm>(k: K) => (v: RuleForm[K]) => setForm({ ...form, [k]: v });
  const setCond = (i: number, patch: Partial<CondForm>) =>
    setForm({ ...form, conditions: form.conditions.map((c, j) => (j === i ? { ...c, ...patch } : c)) });
  const errors = fieldErrors(problem, "rule");
  const { pick, used } = picker(errors);
  const effect = Number(form.effect) as Effect;
  const inbound = Number(form.direction) === RuleDirection.INBOUND;
  const e = {
    direction: pick("direction"),
    actionPattern: pick("action_pattern"),
    counterpart: pick("counterpart_tenant_id"),
    agent: pick("agent_id"),
    effect: pick("effect"),
    priority: pick("priority"),
    maxTtl: pick("max_ttl_seconds"),
    approvals: pick("approvals_required"),
    scopes: pick("scopes"),
    defaultScopes: pick("default_scopes"),
    resources: pick("resources"),
    description: pick("description"),
    window: pick("time_window"),
    conditions: form.conditions.map((_, i) => ({
      attribute: pick(`conditions[${i}].attribute`),
      operator: pick(`conditions[${i}].operator`),
      value: pick(`conditions[${i}].value`),
      values: pick(`conditions[${i}].values`),
      row: pick(`conditions[${i}]`),
    })),
  };

  const save = async () => {
    setBusy(true);
    setProblem(null);
    try {
      if (isNew) await policies.createRule({ rule: ruleOf(form) });
      else await policies.updateRule({ rule: ruleOf(form, props.ruleId), expectedVersion: loaded!.version });
      clearDraft(key);
      props.onSaved();
    } catch (err) {
      setProblem(describe(err));
    } finally {
      setBusy(false);
    }
  };

  return (
    <section class="card rule-editor" aria-labelledby="rule-editor-title" data-testid="rule-editor">
      <h2 class="h3" id="rule-editor-title">
        {isNew ? "New rule" : `Edit rule ${shortId(props.ruleId)}`}
      </h2>
      {!isNew && loaded ? (
        <p class="muted small">
          Version {String(loaded.version)}, last changed <Time value={loaded.updateTime} relative />.
        </p>
      ) : null}
      <form
        onSubmit={(ev) => {
          ev.preventDefault();
          void save();
        }}
      >
        <ErrorBanner problem={problem} testid="rule-error" fields={used} prefix="rule" />
        <div class="form-grid">
          <SelectField
            id="r-direction"
            label="Direction"
            value={form.direction}
            onChange={set("direction")}
            disabled={!isNew}
            hint={isNew ? "Inbound judges requests to your tenant; outbound, your agents' requests." : "Fixed once created."}
            options={[
              [String(RuleDirection.INBOUND), "Inbound (what we receive)"],
              [String(RuleDirection.OUTBOUND), "Outbound (what our agents ask)"],
            ]}
            error={e.direction}
          />
          <TextField
            id="r-action"
            testid="rule-action-pattern"
            label="Action pattern"
            hint="stock.write, stock.*, *, sign:<key>, exchange:<provider>"
            value={form.actionPattern}
            onInput={set("actionPattern")}
            required
            mono
            error={e.actionPattern}
          />
          <SelectField
            id="r-effect"
            testid="rule-effect"
            label="Effect"
            value={form.effect}
            onChange={set("effect")}
            options={[
              [String(Effect.ALLOW), "Allow"],
              [String(Effect.STEP_UP), "Step-up (a human approves)"],
              [String(Effect.BLOCK), "Block"],
            ]}
            error={e.effect}
          />
          {effect === Effect.STEP_UP ? (
            <TextField id="r-approvals" label="Approvals required" hint="1 to 10 distinct approvers." type="number" value={form.approvals} onInput={set("approvals")} inputMode="numeric" error={e.approvals} />
          ) : null}
          <TextField
            id="r-counterpart"
            testid="rule-counterpart"
            label={inbound ? "From tenant" : "To tenant"}
            hint="Empty means any tenant."
            value={form.counterpart}
            onInput={set("counterpart")}
            placeholder="tnt_…"
            mono
            error={e.counterpart}
          />
          <TextField id="r-agent" label="Agent" hint={inbound ? "Only with a tenant above. Empty means any agent." : "One of your agents; empty means any."} value={form.agent} onInput={set("agent")} placeholder="agt_…" mono error={e.agent} />
          <TextField id="r-priority" label="Priority" hint="Higher first; 0 by default." type="number" value={form.priority} onInput={set("priority")} error={e.priority} />
          <TextField id="r-ttl" label="Lifetime cap (seconds)" hint="60 to 86400; empty for no cap." type="number" value={form.maxTtl} onInput={set("maxTtl")} inputMode="numeric" error={e.maxTtl} />
          <TextField id="r-scopes" testid="rule-scopes" label={inbound ? "Scopes granted" : "Scopes allowed"} hint="Space separated: contacts:read, mail.*, or *." value={form.scopes} onInput={set("scopes")} mono error={e.scopes} />
          {inbound ? (
            <TextField id="r-default-scopes" label="Default scopes" hint="Given to a request naming none." value={form.defaultScopes} onInput={set("defaultScopes")} mono error={e.defaultScopes} />
          ) : null}
          <TextArea id="r-resources" label={inbound ? "Resources granted" : "Resources allowed"} hint="One per line; a trailing * matches longer ones." value={form.resources} onInput={set("resources")} rows={2} error={e.resources} class="span-2" />
          <TextArea id="r-description" label="Description" value={form.description} onInput={set("description")} rows={2} maxLength={512} error={e.description} class="span-2" />
        </div>

        <fieldset class="conditions">
          <legend>Conditions on context values</legend>
          {form.conditions.length === 0 ? <p class="muted small">None: the rule matches whatever the context says.</p> : null}
          {form.conditions.map((c, i) => {
            const o = Number(c.operator) as ConditionOperator;
            const list = o === ConditionOperator.IN || o === ConditionOperator.NOT_IN;
            const none = o === ConditionOperator.EXISTS;
            const ce = e.conditions[i]!;
            return (
              <div class="condition" key={i} data-testid="rule-condition">
                <TextField id={`c${i}-attr`} label="Attribute" value={c.attribute} onInput={(v) => setCond(i, { attribute: v })} placeholder="amount" mono error={ce.attribute} />
                <SelectField id={`c${i}-op`} label="Operator" value={c.operator} onChange={(v) => setCond(i, { operator: v })} options={OPERATORS} error={ce.operator} />
                {none ? null : <SelectField id={`c${i}-type`} label="Type" value={c.type} onChange={(v) => setCond(i, { type: v })} options={TYPE_OPTIONS} />}
                {none ? null : list ? (
                  <TextField id={`c${i}-values`} label="Values" hint="Comma separated." value={c.values} onInput={(v) => setCond(i, { values: v })} error={ce.values ?? ce.value} />
                ) : (
                  <TextField id={`c${i}-value`} label="Value" value={c.value} onInput={(v) => setCond(i, { value: v })} error={ce.value ?? ce.values} />
                )}
                <button type="button" class="btn btn-small btn-ghost remove" onClick={() => setForm({ ...form, conditions: form.conditions.filter((_, j) => j !== i) })} aria-label={`Remove condition ${i + 1}`}>
                  Remove
                </button>
                {ce.row && !ce.attribute && !ce.value && !ce.values && !ce.operator ? <p class="field-error span-all">{ce.row}</p> : null}
              </div>
            );
          })}
          <button
            type="button"
            class="btn btn-small"
            onClick={() => setForm({ ...form, conditions: [...form.conditions, { attribute: "", operator: String(ConditionOperator.GT), type: "number", value: "", values: "" }] })}
            data-testid="add-condition"
          >
            Add condition
          </button>
        </fieldset>

        <fieldset class="window">
          <legend>Time window</legend>
          <Checkbox id="r-window" label="Only at certain times of day (UTC)" checked={form.windowOn} onChange={set("windowOn")} />
          {form.windowOn ? (
            <div class="form-grid">
              <TextField id="r-wstart" label="From (UTC)" type="time" value={form.windowStart} onInput={set("windowStart")} error={pick("time_window.start_minute")} />
              <TextField id="r-wend" label="Until (UTC)" type="time" value={form.windowEnd} onInput={set("windowEnd")} error={pick("time_window.end_minute")} />
              <fieldset class="days span-2">
                <legend>Days (none means every day)</legend>
                {DAYS.map(([d, label]) => (
                  <Checkbox
                    key={d}
                    id={`r-day-${d}`}
                    label={label}
                    checked={form.days.includes(d)}
                    onChange={(on) => setForm({ ...form, days: on ? [...form.days, d].sort() : form.days.filter((x) => x !== d) })}
                  />
                ))}
              </fieldset>
            </div>
          ) : null}
          {e.window ? <p class="field-error">{e.window}</p> : null}
        </fieldset>

        <div class="form-actions">
          <button
            type="button"
            class="btn btn-ghost"
            onClick={() => {
              clearDraft(key);
              navigate("/admin/policies");
            }}
          >
            Cancel
          </button>
          <button type="submit" class="btn btn-primary" disabled={busy} data-testid="rule-save">
            {busy ? "Saving…" : isNew ? "Create rule" : "Save changes"}
          </button>
        </div>
      </form>
    </section>
  );
}

// ---- the page ---------------------------------------------------------------------

async function allRules(): Promise<{ rules: Rule[]; version: bigint }> {
  let version = 0n;
  const rules = await allPages(async (token) => {
    const res = await policies.listRules({ page: { pageSize: 500, pageToken: token } });
    version = res.policyVersion;
    return { items: res.rules, next: res.page?.nextPageToken ?? "" };
  });
  return { rules, version };
}

function RulesTable(props: { title: string; rules: Rule[]; onDelete: (r: Rule) => void }) {
  return (
    <section aria-labelledby={`rules-${props.title}`}>
      <h2 class="h3" id={`rules-${props.title}`}>
        {props.title} rules
      </h2>
      {props.rules.length === 0 ? (
        <p class="muted">None.</p>
      ) : (
        <div class="table-wrap">
          <table class="table" data-testid="rules-table">
            <caption class="sr-only">{props.title} rules in evaluation order</caption>
            <thead>
              <tr>
                <th scope="col">#</th>
                <th scope="col">Action</th>
                <th scope="col">Effect</th>
                <th scope="col">Tenant / agent</th>
                <th scope="col">When</th>
                <th scope="col">Grants</th>
                <th scope="col">
                  <span class="sr-only">Actions</span>
                </th>
              </tr>
            </thead>
            <tbody>
              {props.rules.map((r, i) => (
                <tr key={r.id} data-testid="rule-row" data-rule-id={r.id}>
                  <td class="num" title={`priority ${r.priority}`}>
                    {i + 1}
                    {r.priority ? <div class="muted small">p{r.priority}</div> : null}
                  </td>
                  <td>
                    <code class="strong">{r.actionPattern}</code>
                    {r.description ? <div class="muted small">{r.description}</div> : null}
                  </td>
                  <td>
                    <Chip tone={r.effect === Effect.ALLOW ? "good" : r.effect === Effect.BLOCK ? "bad" : "warn"}>
                      {effectLabel[r.effect]}
                      {r.effect === Effect.STEP_UP && r.approvalsRequired > 1 ? ` ×${r.approvalsRequired}` : ""}
                    </Chip>
                  </td>
                  <td>
                    {r.counterpartTenantId ? <Id id={r.counterpartTenantId} short /> : <span class="muted">any tenant</span>}
                    {r.agentId ? (
                      <div>
                        <Id id={r.agentId} short />
                      </div>
                    ) : null}
                  </td>
                  <td class="small">{conditionText(r) || <span class="muted">always</span>}</td>
                  <td class="small">
                    {r.scopes.length ? r.scopes.join(" ") : <span class="muted">no scopes</span>}
                    {r.maxTtlSeconds ? <div class="muted">≤ {formatDuration(r.maxTtlSeconds)}</div> : null}
                  </td>
                  <td class="row-actions">
                    <a class="btn btn-small" href={href(`/admin/policies/${r.id}`)} onClick={onLinkClick} data-testid="edit-rule">
                      Edit
                    </a>
                    <button type="button" class="btn btn-small btn-ghost" onClick={() => props.onDelete(r)} data-testid="delete-rule">
                      Delete
                    </button>
                  </td>
                </tr>
              ))}
            </tbody>
          </table>
        </div>
      )}
    </section>
  );
}

function Settings(props: { onChanged: () => void }) {
  const s = useLoad(async () => (await policies.getPolicySettings({})).settings ?? null, []);
  const [busy, setBusy] = useState(false);
  const [problem, setProblem] = useState<Problem | null>(null);
  if (!s.data) return s.problem ? <ErrorBanner problem={s.problem} /> : null;
  const value = s.data.outboundDefault === OutboundDefault.BLOCK ? OutboundDefault.BLOCK : OutboundDefault.ALLOW;
  const change = async (next: string) => {
    setBusy(true);
    setProblem(null);
    try {
      const res = await policies.updatePolicySettings({
        outboundDefault: Number(next) as OutboundDefault,
        expectedPolicyVersion: s.data!.policyVersion,
      });
      if (res.settings) s.setData(res.settings);
      props.onChanged();
    } catch (err) {
      setProblem(describe(err));
      s.reload();
    } finally {
      setBusy(false);
    }
  };
  return (
    <section class="card settings">
      <div class="card-head">
        <div>
          <h2 class="h3">Outbound default</h2>
          <p class="muted">What your side decides when none of your outbound rules matches. Policy version {String(s.data.policyVersion)}.</p>
        </div>
        <SelectField
          id="outbound-default"
          label="When no outbound rule matches"
          value={String(value)}
          onChange={change}
          disabled={busy}
          options={[
            [String(OutboundDefault.ALLOW), "Allow (receiving tenant still decides)"],
            [String(OutboundDefault.BLOCK), "Block (least privilege)"],
          ]}
        />
      </div>
      <ErrorBanner problem={problem} />
    </section>
  );
}

export function PoliciesPage(props: { ruleId: string | undefined }) {
  useTitle("Policies");
  const list = useLoad(allRules, []);
  const [deleting, setDeleting] = useState<Rule | null>(null);
  const [problem, setProblem] = useState<Problem | null>(null);
  const [saved, setSaved] = useState<string | null>(null);
  const inbound = list.data?.rules.filter((r) => r.direction === RuleDirection.INBOUND) ?? [];
  const outbound = list.data?.rules.filter((r) => r.direction === RuleDirection.OUTBOUND) ?? [];

  const remove = async () => {
    if (!deleting) return;
    setProblem(null);
    try {
      await policies.deleteRule({ ruleId: deleting.id, expectedVersion: deleting.version });
      setSaved("Rule deleted.");
      list.reload();
    } catch (err) {
      setProblem(describe(err));
    } finally {
      setDeleting(null);
    }
  };

  return (
    <div class="page">
      <PageHeader
        title="Policies"
        actions={
          <a class="btn btn-primary" href={href("/admin/policies/new")} onClick={onLinkClick} data-testid="new-rule">
            New rule
          </a>
        }
      >
        Every request is judged by the requesting tenant's outbound rules and the receiving tenant's inbound rules; the
        stricter outcome wins. No matching inbound rule means Block.
      </PageHeader>
      {saved ? (
        <Notice tone="good" testid="policy-result">
          {saved}
        </Notice>
      ) : null}
      <ErrorBanner problem={problem} />
      {props.ruleId ? (
        <RuleEditor
          key={props.ruleId}
          ruleId={props.ruleId}
          onSaved={() => {
            setSaved(props.ruleId === "new" ? "Rule created." : "Rule saved.");
            list.reload();
            navigate("/admin/policies");
          }}
        />
      ) : null}
      <Settings onChanged={list.reload} />
      <ErrorBanner problem={list.problem} onRetry={list.reload} />
      {list.loading && !list.data ? <Loading label="Loading rules…" /> : null}
      {list.data ? (
        list.data.rules.length === 0 ? (
          <Empty title="No rules yet">Without an inbound rule, every request to your tenant is blocked.</Empty>
        ) : (
          <>
            <RulesTable title="Inbound" rules={inbound} onDelete={setDeleting} />
            <RulesTable title="Outbound" rules={outbound} onDelete={setDeleting} />
          </>
        )
      ) : null}
      <DryRun />
      <Dialog open={deleting !== null} title="Delete this rule?" onClose={() => setDeleting(null)} testid="delete-rule-dialog">
        {deleting ? (
          <>
            <p>
              <code>{deleting.actionPattern}</code> ({directionLabel[deleting.direction]}, {effectLabel[deleting.effect]}) stops
              applying at once. Delegations already decided are not affected.
            </p>
            <div class="dialog-actions">
              <button type="button" class="btn btn-ghost" onClick={() => setDeleting(null)}>
                Cancel
              </button>
              <button type="button" class="btn btn-danger" onClick={remove} data-testid="delete-rule-confirm">
                Delete rule
              </button>
            </div>
          </>
        ) : null}
      </Dialog>
    </div>
  );
}

// ---- dry run ----------------------------------------------------------------------

interface CtxRow {
  key: string;
  type: ValueType;
  value: string;
}

interface DryForm {
  agent: string;
  receiving: string;
  action: string;
  scopes: string;
  resource: string;
  ttl: string;
  message: string;
  context: CtxRow[];
}

function DryRun() {
  const who = useStore(me)!;
  const [form, setForm] = useDraft<DryForm>("dry-run", {
    agent: "",
    receiving: who.tenantId,
    action: "",
    scopes: "",
    resource: "",
    ttl: "300",
    message: "",
    context: [],
  });
  const agentList = useLoad(async () => (await agents.listAgents({ page: { pageSize: 500 } })).agents, []);
  const [result, setResult] = useState<EvaluatePolicyResponse | null>(null);
  const [problem, setProblem] = useState<Problem | null>(null);
  const [busy, setBusy] = useState(false);
  const set = <K extends keyof DryForm>(k: K) => (v: DryForm[K]) => setForm({ ...form, [k]: v });
  const errors = fieldErrors(problem);
  const { pick, used } = picker(errors);
  const options: Array<[string, string]> = [["", "Choose an agent"], ...(agentList.data ?? []).map((a: Agent): [string, string] => [a.id, a.name])];
  const e = {
    agent: pick("requesting_agent_id"),
    receiving: pick("receiving_tenant_id"),
    action: pick("action"),
    scopes: pick("scopes"),
    resource: pick("resource"),
    ttl: pick("requested_ttl_seconds"),
    message: pick("binding_message"),
    context: pick("context"),
  };
  const run = async () => {
    setBusy(true);
    setProblem(null);
    setResult(null);
    try {
      const context: Record<string, MessageInitShape<typeof AttributeValueSchema>> = {};
      for (const row of form.context) if (row.key.trim()) context[row.key.trim()] = toValue(row.type, row.value);
      setResult(
        await policies.evaluatePolicy({
          requestingAgentId: form.agent,
          receivingTenantId: form.receiving.trim(),
          action: form.action.trim(),
          scopes: splitList(form.scopes),
          resource: form.resource.trim(),
          requestedTtlSeconds: numberOr(form.ttl, 0),
          bindingMessage: form.message,
          context,
        }),
      );
    } catch (err) {
      setProblem(describe(err));
    } finally {
      setBusy(false);
    }
  };
  const d = result?.decision;
  return (
    <section class="card dry-run" aria-labelledby="dry-run-title" data-testid="dry-run">
      <h2 class="h3" id="dry-run-title">
        Dry run
      </h2>
      <p class="muted">What would happen if one of your agents asked this now. Nothing is created; the probe is audited.</p>
      <form
        onSubmit={(ev) => {
          ev.preventDefault();
          void run();
        }}
      >
        <ErrorBanner problem={problem} fields={used} testid="dry-run-error" />
        <div class="form-grid">
          <SelectField id="d-agent" label="Agent" value={form.agent} onChange={set("agent")} options={options} error={e.agent} testid="dry-run-agent" />
          <TextField id="d-receiving" label="Receiving tenant" value={form.receiving} onInput={set("receiving")} mono error={e.receiving} />
          <TextField id="d-action" label="Action" value={form.action} onInput={set("action")} placeholder="stock.write" mono required error={e.action} testid="dry-run-action" />
          <TextField id="d-scopes" label="Scopes" hint="Space separated." value={form.scopes} onInput={set("scopes")} mono error={e.scopes} />
          <TextField id="d-resource" label="Resource" value={form.resource} onInput={set("resource")} mono error={e.resource} />
          <TextField id="d-ttl" label="Lifetime asked (seconds)" type="number" value={form.ttl} onInput={set("ttl")} error={e.ttl} />
          <TextField id="d-message" label="Binding message" value={form.message} onInput={set("message")} maxLength={256} error={e.message} class="span-2" />
        </div>
        <fieldset class="conditions">
          <legend>Context values</legend>
          {form.context.map((row, i) => (
            <div class="condition" key={i}>
              <TextField id={`ctx${i}-key`} label="Attribute" value={row.key} onInput={(v) => set("context")(form.context.map((r, j) => (j === i ? { ...r, key: v } : r)))} placeholder="amount" mono />
              <SelectField id={`ctx${i}-type`} label="Type" value={row.type} onChange={(v) => set("context")(form.context.map((r, j) => (j === i ? { ...r, type: v } : r)))} options={TYPE_OPTIONS} />
              <TextField id={`ctx${i}-value`} label="Value" value={row.value} onInput={(v) => set("context")(form.context.map((r, j) => (j === i ? { ...r, value: v } : r)))} error={pick(`context.${row.key.trim()}`)} />
              <button type="button" class="btn btn-small btn-ghost remove" onClick={() => set("context")(form.context.filter((_, j) => j !== i))} aria-label={`Remove context value ${i + 1}`}>
                Remove
              </button>
            </div>
          ))}
          {e.context ? <p class="field-error">{e.context}</p> : null}
          <button type="button" class="btn btn-small" onClick={() => set("context")([...form.context, { key: "", type: "number", value: "" }])}>
            Add context value
          </button>
        </fieldset>
        <div class="form-actions">
          <button type="submit" class="btn btn-primary" disabled={busy} data-testid="dry-run-submit">
            {busy ? "Evaluating…" : "Evaluate"}
          </button>
        </div>
      </form>
      {d ? (
        <div class="dry-result" data-testid="dry-run-result" data-outcome={decisionLabel[d.outcome].toLowerCase()}>
          <h3 class="h4">
            Outcome: <Chip tone={decisionTone(d.outcome)}>{decisionLabel[d.outcome]}</Chip>
          </h3>
          <dl class="facts compact">
            {d.outcome !== Decision.BLOCK ? (
              <>
                <dt>Token lifetime</dt>
                <dd>{d.maxTtlSeconds ? formatDuration(d.maxTtlSeconds) : "—"}</dd>
                <dt>Scopes</dt>
                <dd>{d.scopes.join(" ") || <span class="muted">none</span>}</dd>
                <dt>Resource</dt>
                <dd>{d.resource || <span class="muted">none</span>}</dd>
              </>
            ) : null}
            {d.outcome === Decision.STEP_UP ? (
              <>
                <dt>Approvals needed</dt>
                <dd>{d.approvalsRequired}</dd>
              </>
            ) : null}
          </dl>
          <DecisionView decision={d} myTenantId={who.tenantId} />
        </div>
      ) : null}
    </section>
  );
}
