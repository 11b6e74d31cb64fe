// Delegations: the ones the signed-in tenant is a party to, on either side,
// with filters; one in full; revoke (receiving side) with a reason, and
// relinquish (requesting side).
import { useState } from "preact/hooks";
import {
  DelegationSide,
  DelegationStatus,
  type Delegation,
} from "../../gen/vaultguard/v1/delegation_service_pb";
import { describe, fieldErrors, type Problem } from "../errors";
import { actorText, delegationStatusLabel, delegationTone, formatDuration, shortId } from "../format";
import { href, navigate, onLinkClick } from "../router";
import { delegations } from "../rpc";
import { me, type Me } from "../session";
import { useDraft, useStore } from "../store";
import { useTitle } from "../title";
import { AuthorizationDetails, ContextTable, DecisionView } from "../components/decision";
import {
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
  useLoad,
} from "../components/ui";

interface Filters {
  side: string;
  status: string;
  action: string;
  counterpart: string;
  agent: string;
}

const EMPTY: Filters = { side: "any", status: "", action: "", counterpart: "", agent: "" };

const SIDES: Array<[string, string]> = [
  ["any", "Either side"],
  ["receiving", "Asked of us (receiving)"],
  ["requesting", "Asked by our agents (requesting)"],
];

const STATUSES: Array<[string, string]> = [
  ["", "Any status"],
  ...[
    DelegationStatus.ACTIVE,
    DelegationStatus.PENDING,
    DelegationStatus.DENIED,
    DelegationStatus.EXPIRED,
    DelegationStatus.REVOKED,
    DelegationStatus.RELINQUISHED,
    DelegationStatus.BLOCKED,
  ].map((s): [string, string] => [String(s), delegationStatusLabel[s]]),
];

function sideOf(f: Filters): DelegationSide {
  return f.side === "receiving" ? DelegationSide.RECEIVING : f.side === "requesting" ? DelegationSide.REQUESTING : DelegationSide.ANY;
}

interface PageData {
  rows: Delegation[];
  next: string;
}

export function DelegationsPage(props: { id: string | undefined }) {
  useTitle(props.id ? "Delegation" : "Delegations");
  const who = useStore(me)!;
  const [draft, setDraft] = useDraft<Filters>("delegation-filters", EMPTY);
  const [applied, setApplied] = useState<Filters>(draft);
  const [more, setMore] = useState<{ busy: boolean; problem: Problem | null }>({ busy: false, problem: null });

  const fetchPage = async (f: Filters, pageToken: string): Promise<PageData> => {
    const res = await delegations.listDelegations({
      side: sideOf(f),
      statuses: f.status ? [Number(f.status) as DelegationStatus] : [],
      action: f.action.trim(),
      counterpartTenantId: f.counterpart.trim(),
      requestingAgentId: f.agent.trim(),
      page: { pageSize: 50, pageToken },
    });
    return { rows: res.delegations, next: res.page?.nextPageToken ?? "" };
  };
  const list = useLoad(() => fetchPage(applied, ""), [applied]);
  const problemFields = fieldErrors(list.problem);

  const loadMore = async () => {
    if (!list.data?.next) return;
    setMore({ busy: true, problem: null });
    try {
      const page = await fetchPage(applied, list.data.next);
      list.setData({ rows: [...list.data.rows, ...page.rows], next: page.next });
      setMore({ busy: false, problem: null });
    } catch (err) {
      setMore({ busy: false, problem: describe(err) });
    }
  };

  if (props.id) return <DelegationDetail id={props.id} who={who} onChanged={list.reload} />;

  const set = (k: keyof Filters) => (v: string) => setDraft({ ...draft, [k]: v });
  return (
    <div class="page">
      <PageHeader title="Delegations">
        Every delegation your tenant is a party to: asked of you by other tenants' agents, or asked by your own agents.
      </PageHeader>
      <form
        class="filters"
        aria-label="Filter delegations"
        onSubmit={(e) => {
          e.preventDefault();
          setApplied({ ...draft });
        }}
      >
        <SelectField id="f-side" label="Side" value={draft.side} onChange={set("side")} options={SIDES} testid="filter-side" />
        <SelectField id="f-status" label="Status" value={draft.status} onChange={set("status")} options={STATUSES} testid="filter-status" />
        <TextField id="f-action" label="Action" value={draft.action} onInput={set("action")} placeholder="stock.write" error={problemFields["action"]} testid="filter-action" />
        <TextField id="f-counterpart" label="Other tenant" value={draft.counterpart} onInput={set("counterpart")} placeholder="tnt_…" mono error={problemFields["counterpart_tenant_id"]} />
        <TextField id="f-agent" label="Agent" value={draft.agent} onInput={set("agent")} placeholder="agt_…" mono error={problemFields["requesting_agent_id"]} />
        <div class="filter-actions">
          <button type="submit" class="btn btn-primary" data-testid="filter-apply">
            Apply
          </button>
          <button
            type="button"
            class="btn btn-ghost"
            onClick={() => {
              setDraft(EMPTY);
              setApplied(EMPTY);
            }}
          >
            Clear
          </button>
        </div>
      </form>
      <ErrorBanner problem={list.problem} onRetry={list.reload} fields={["action", "counterpart_tenant_id", "requesting_agent_id"]} />
      {list.loading && !list.data ? (
        <Loading label="Loading delegations…" />
      ) : list.data && list.data.rows.length === 0 ? (
        <Empty title="No delegations match">Change the filters, or wait for an agent to ask.</Empty>
      ) : list.data ? (
        <>
          <div class="table-wrap">
            <table class="table" data-testid="delegations-table">
              <caption class="sr-only">Delegations, newest first</caption>
              <thead>
                <tr>
                  <th scope="col">Action</th>
                  <th scope="col">Status</th>
                  <th scope="col">From</th>
                  <th scope="col">To</th>
                  <th scope="col">Asked</th>
                  <th scope="col">Expires</th>
                </tr>
              </thead>
              <tbody>
                {list.data.rows.map((d) => (
                  <tr key={d.id} data-testid="delegation-row" data-delegation-id={d.id}>
                    <td>
                      <a href={href(`/delegations/${d.id}`)} onClick={onLinkClick} class="strong">
                        {d.action}
                      </a>
                      <div class="muted small">{shortId(d.id)}</div>
                    </td>
                    <td>
                      <Chip tone={delegationTone(d.status)}>{delegationStatusLabel[d.status]}</Chip>
                    </td>
                    <td>
                      <TenantRef id={d.requestingTenantId} who={who} />
                      <div class="muted small" title={d.requestingAgentId}>
                        {shortId(d.requestingAgentId)}
                      </div>
                    </td>
                    <td>
                      <TenantRef id={d.receivingTenantId} who={who} />
                    </td>
                    <td>
                      <Time value={d.createTime} relative />
                    </td>
                    <td>
                      <Time value={d.expireTime} relative />
                    </td>
                  </tr>
                ))}
              </tbody>
            </table>
          </div>
          <ErrorBanner problem={more.problem} />
          {list.data.next ? (
            <button type="button" class="btn" onClick={loadMore} disabled={more.busy} data-testid="load-more">
              {more.busy ? "Loading…" : "Load more"}
            </button>
          ) : null}
        </>
      ) : null}
    </div>
  );
}

export function TenantRef(props: { id: string; who: Me }) {
  if (props.id === props.who.tenantId) {
    return (
      <span class="you-tenant" title={props.id}>
        {props.who.tenantName || shortId(props.id)} <span class="you">(you)</span>
      </span>
    );
  }
  return (
    <code class="id" title={props.id}>
      {shortId(props.id)}
    </code>
  );
}

function DelegationDetail(props: { id: string; who: Me; onChanged: () => void }) {
  const d = useLoad(async () => (await delegations.getDelegation({ delegationId: props.id })).delegation ?? null, [props.id]);
  const [ending, setEnding] = useState<"revoke" | "relinquish" | null>(null);
  const [reason, setReason] = useDraft(`end-reason:${props.id}`, "");
  const [busy, setBusy] = useState(false);
  const [problem, setProblem] = useState<Problem | null>(null);
  const [done, setDone] = useState<string | null>(null);
  const who = props.who;
  const back = (
    <a
      class="back-link"
      href={href("/delegations")}
      onClick={(e) => {
        e.preventDefault();
        navigate("/delegations");
      }}
    >
      ← All delegations
    </a>
  );
  if (d.loading && !d.data) return <Loading label="Loading the delegation…" />;
  if (!d.data) {
    return (
      <div class="page">
        {back}
        <ErrorBanner problem={d.problem} onRetry={d.reload} />
      </div>
    );
  }
  const x = d.data;
  const admin = who.roles.includes("admin");
  const active = x.status === DelegationStatus.ACTIVE;
  const canRevoke = admin && active && x.receivingTenantId === who.tenantId;
  const canRelinquish = admin && active && x.requestingTenantId === who.tenantId;
  const errors = fieldErrors(problem);

  const end = async () => {
    setBusy(true);
    setProblem(null);
    try {
      const res =
        ending === "revoke"
          ? await delegations.revokeDelegation({ delegationId: x.id, reason: reason.trim() })
          : await delegations.relinquishDelegation({ delegationId: x.id, reason: reason.trim() });
      if (res.delegation) d.setData(res.delegation);
      setDone(ending === "revoke" ? "Revoked. Its token stops working for online checks at once." : "Relinquished.");
      setEnding(null);
      setReason("");
      props.onChanged();
    } catch (err) {
      setProblem(describe(err));
    } finally {
      setBusy(false);
    }
  };

  return (
    <div class="page" data-testid="delegation-detail" data-delegation-id={x.id}>
      {back}
      <PageHeader
        title={x.action}
        actions={
          <>
            {canRevoke ? (
              <button type="button" class="btn btn-danger" onClick={() => setEnding("revoke")} data-testid="revoke-button">
                Revoke…
              </button>
            ) : null}
            {canRelinquish ? (
              <button type="button" class="btn" onClick={() => setEnding("relinquish")} data-testid="relinquish-button">
                Give up…
              </button>
            ) : null}
          </>
        }
      >
        <Chip tone={delegationTone(x.status)} testid="delegation-status">
          {delegationStatusLabel[x.status]}
        </Chip>
      </PageHeader>
      {done ? (
        <Notice tone="good" testid="delegation-result">
          {done}
        </Notice>
      ) : null}
      {x.status === DelegationStatus.PENDING && x.stepUpId && x.receivingTenantId === who.tenantId && (admin || who.roles.includes("approver")) ? (
        <Notice tone="info">
          This delegation waits for approval.{" "}
          <a href={href(`/approvals/${x.stepUpId}`)} onClick={onLinkClick}>
            Open the request
          </a>
        </Notice>
      ) : null}
      <div class="grid-2">
        <section class="card">
          <h2 class="h3">Request</h2>
          <dl class="facts">
            <dt>Delegation</dt>
            <dd>
              <Id id={x.id} />
            </dd>
            <dt>From tenant</dt>
            <dd>
              <Id id={x.requestingTenantId} />
              {x.requestingTenantId === who.tenantId ? <span class="you"> (you)</span> : null}
            </dd>
            <dt>Agent</dt>
            <dd>
              <Id id={x.requestingAgentId} />
            </dd>
            <dt>To tenant</dt>
            <dd>
              <Id id={x.receivingTenantId} />
              {x.receivingTenantId === who.tenantId ? <span class="you"> (you)</span> : null}
            </dd>
            <dt>Scopes</dt>
            <dd>{x.scopes.length ? x.scopes.join(" ") : <span class="muted">none</span>}</dd>
            <dt>Resource</dt>
            <dd>{x.resource ? <code class="wrap">{x.resource}</code> : <span class="muted">none</span>}</dd>
            <dt>Message</dt>
            <dd class="pre-wrap">{x.bindingMessage || <span class="muted">none</span>}</dd>
            <dt>Lifetime asked</dt>
            <dd>{formatDuration(x.requestedTtlSeconds)}</dd>
          </dl>
        </section>
        <section class="card">
          <h2 class="h3">Lifecycle</h2>
          <dl class="facts">
            <dt>Asked</dt>
            <dd>
              <Time value={x.createTime} />
            </dd>
            <dt>Active since</dt>
            <dd>
              <Time value={x.activateTime} />
            </dd>
            <dt>Expires</dt>
            <dd>
              <Time value={x.expireTime} />
            </dd>
            <dt>Ended</dt>
            <dd>
              <Time value={x.endTime} />
            </dd>
            {x.endedBy ? (
              <>
                <dt>Ended by</dt>
                <dd>{actorText(x.endedBy)}</dd>
              </>
            ) : null}
            {x.endReason ? (
              <>
                <dt>Reason</dt>
                <dd class="pre-wrap" data-testid="end-reason">
                  {x.endReason}
                </dd>
              </>
            ) : null}
            <dt>Token algorithm</dt>
            <dd>{x.tokenAlgorithm || <span class="muted">no token</span>}</dd>
          </dl>
        </section>
      </div>
      <h2 class="h3">Context values</h2>
      <ContextTable context={x.context} />
      <h3>Authorization details</h3>
      <AuthorizationDetails details={x.authorizationDetails} />
      <h2 class="h3">Policy decision</h2>
      <DecisionView decision={x.decision} myTenantId={who.tenantId} level={3} />

      <Dialog
        open={ending !== null}
        title={ending === "revoke" ? "Revoke this delegation?" : "Give up this delegation?"}
        onClose={() => setEnding(null)}
        testid="end-dialog"
      >
        <form
          onSubmit={(e) => {
            e.preventDefault();
            void end();
          }}
        >
          <p>
            {ending === "revoke"
              ? "The agent loses this authority at once for online verification; offline verifiers accept its token until it expires."
              : "Your agent no longer needs this delegation; it ends now."}
          </p>
          <ErrorBanner problem={problem} fields={["reason"]} />
          <TextArea
            id="end-reason"
            testid="revoke-reason"
            label="Reason"
            hint="Recorded as the delegation's end reason and in both tenants' audit logs."
            value={reason}
            onInput={setReason}
            maxLength={512}
            required={ending === "revoke"}
            error={errors["reason"]}
          />
          <div class="dialog-actions">
            <button type="button" class="btn btn-ghost" onClick={() => setEnding(null)}>
              Cancel
            </button>
            <button
              type="submit"
              class={ending === "revoke" ? "btn btn-danger" : "btn btn-primary"}
              disabled={busy || (ending === "revoke" && !reason.trim())}
              data-testid="revoke-confirm"
            >
              {busy ? "Working…" : ending === "revoke" ? "Revoke" : "Give up"}
            </button>
          </div>
        </form>
      </Dialog>
    </div>
  );
}
