// The trust graph: tenants as nodes, with the signed-in tenant at the
// centre, and as edges the active delegations between them (from the
// requesting to the receiving tenant) and, for admins, the tenant's own
// policy rules that name a counterpart (inbound: counterpart → us;
// outbound: us → counterpart; a rule for any tenant points at "Any
// tenant"). Edges carry counts and actions; clicking one (or Enter on it)
// lists its delegations. Drawn as SVG, with the same data as a table.
import { useMemo, useState } from "preact/hooks";
import { DelegationSide, DelegationStatus, type Delegation } from "../../gen/vaultguard/v1/delegation_service_pb";
import { RuleDirection, type Rule } from "../../gen/vaultguard/v1/policy_service_pb";
import { effectLabel, shortId } from "../format";
import { href, onLinkClick } from "../router";
import { delegations, policies } from "../rpc";
import { me, type Me } from "../session";
import { useStore } from "../store";
import { useTitle } from "../title";
import { Empty, ErrorBanner, Id, Loading, PageHeader, Time, useLoad } from "../components/ui";
import { readPages } from "../paging";

const ANY = "*";
const MAX_PAGES = 4;

interface Edge {
  key: string;
  from: string;
  to: string;
  delegations: Delegation[];
  rules: Rule[];
  actions: string[];
}

interface GraphData {
  edges: Edge[];
  tenants: string[];
  truncated: boolean;
  rulesShown: boolean;
}

async function loadGraph(who: Me): Promise<GraphData> {
  const { items: dels, truncated } = await readPages<Delegation>(async (token) => {
    const res = await delegations.listDelegations({
      side: DelegationSide.ANY,
      statuses: [DelegationStatus.ACTIVE],
      page: { pageSize: 500, pageToken: token },
    });
    return { items: res.delegations, next: res.page?.nextPageToken ?? "" };
  }, MAX_PAGES);
  const rulesShown = who.roles.includes("admin");
  const rules: Rule[] = rulesShown
    ? (
        await readPages<Rule>(async (token) => {
          const res = await policies.listRules({ page: { pageSize: 500, pageToken: token } });
          return { items: res.rules, next: res.page?.nextPageToken ?? "" };
        }, MAX_PAGES)
      ).items
    : [];
  const edges = new Map<string, Edge>();
  const edge = (from: string, to: string): Edge => {
    const key = `${from}>${to}`;
    let e = edges.get(key);
    if (!e) {
      e = { key, from, to, delegations: [], rules: [], actions: [] };
      edges.set(key, e);
    }
    return e;
  };
  for (const d of dels) {
    const e = edge(d.requestingTenantId, d.receivingTenantId);
    e.delegations.push(d);
    if (!e.actions.includes(d.action)) e.actions.push(d.action);
  }
  for (const r of rules) {
    const other = r.counterpartTenantId || ANY;
    const e = r.direction === RuleDirection.INBOUND ? edge(other, who.tenantId) : edge(who.tenantId, other);
    e.rules.push(r);
    if (!e.actions.includes(r.actionPattern)) e.actions.push(r.actionPattern);
  }
  const tenants = new Set<string>();
  for (const e of edges.values()) {
    tenants.add(e.from);
    tenants.add(e.to);
  }
  tenants.delete(who.tenantId);
  const others = [...tenants].sort((a, b) => (a === ANY ? 1 : b === ANY ? -1 : a.localeCompare(b)));
  const sorted = [...edges.values()].sort((a, b) => a.key.localeCompare(b.key));
  return { edges: sorted, tenants: others, truncated, rulesShown };
}

const W = 900;
const H = 600;
const CX = W / 2;
const CY = H / 2 + 10;

interface Point {
  x: number;
  y: number;
}

function nodeLabel(id: string, who: Me): string {
  if (id === who.tenantId) return who.tenantName || shortId(id);
  if (id === ANY) return "Any tenant";
  return shortId(id);
}

function edgeSummary(e: Edge): string {
  const parts: string[] = [];
  if (e.delegations.length) parts.push(`${e.delegations.length} active`);
  if (e.rules.length) parts.push(`${e.rules.length} ${e.rules.length === 1 ? "rule" : "rules"}`);
  return parts.join(" · ");
}

function actionSummary(e: Edge): string {
  const shown = e.actions.slice(0, 2).join(", ");
  return e.actions.length > 2 ? `${shown} +${e.actions.length - 2}` : shown;
}

/** labelWidth estimates an edge label's width (12 px text, 11 px mono). */
function labelWidth(e: Edge): number {
  return Math.max(edgeSummary(e).length * 7, actionSummary(e).length * 6.7) + 14;
}

function Graph(props: { data: GraphData; who: Me; selected: string | null; onSelect: (key: string) => void }) {
  const { data, who } = props;
  const pos = useMemo(() => {
    const m = new Map<string, Point>();
    m.set(who.tenantId, { x: CX, y: CY });
    const n = data.tenants.length;
    const radius = Math.min(W, H) / 2 - 60;
    // A loop on the centre (the tenant's own agents acting on it) is drawn
    // above it, so no other tenant sits straight above then.
    const loop = data.edges.some((e) => e.from === who.tenantId && e.to === who.tenantId);
    const offset = loop || n === 2 ? 0.5 : 0;
    data.tenants.forEach((t, i) => {
      const angle = (2 * Math.PI * (i + offset)) / Math.max(n, 1) - Math.PI / 2;
      m.set(t, { x: CX + radius * 1.45 * Math.cos(angle), y: CY + radius * Math.sin(angle) });
    });
    return m;
  }, [data, who.tenantId]);
  const radiusOf = (id: string) => (id === who.tenantId ? 34 : 24);
  const shapes = useMemo(
    () =>
      data.edges.flatMap((e) => {
        const a = pos.get(e.from);
        const b = pos.get(e.to);
        if (!a || !b) return [];
        let d: string;
        let label: Point;
        if (e.from === e.to) {
          const r = radiusOf(e.from);
          d = `M ${a.x - 12} ${a.y - r} C ${a.x - 70} ${a.y - r - 95} ${a.x + 70} ${a.y - r - 95} ${a.x + 12} ${a.y - r}`;
          label = { x: a.x, y: a.y - r - 86 };
        } else {
          const dx = b.x - a.x;
          const dy = b.y - a.y;
          const len = Math.hypot(dx, dy) || 1;
          const ux = dx / len;
          const uy = dy / len;
          // Curve to the left of travel, so A→B and B→A never overlap.
          const bend = 36;
          const c = { x: (a.x + b.x) / 2 + uy * bend, y: (a.y + b.y) / 2 - ux * bend };
          const start = { x: a.x + ux * radiusOf(e.from), y: a.y + uy * radiusOf(e.from) };
          const end = { x: b.x - ux * (radiusOf(e.to) + 3), y: b.y - uy * (radiusOf(e.to) + 3) };
          d = `M ${start.x.toFixed(1)} ${start.y.toFixed(1)} Q ${c.x.toFixed(1)} ${c.y.toFixed(1)} ${end.x.toFixed(1)} ${end.y.toFixed(1)}`;
          // Labels sit nearer the outer tenant, where edges spread apart.
          const t = e.from === who.tenantId ? 0.62 : e.to === who.tenantId ? 0.38 : 0.5;
          const at = (p0: number, p1: number, p2: number) => (1 - t) * (1 - t) * p0 + 2 * (1 - t) * t * p1 + t * t * p2;
          label = { x: at(start.x, c.x, end.x), y: at(start.y, c.y, end.y) };
        }
        const kind = e.delegations.length ? "delegation" : "rule";
        const width = 1.5 + Math.min(4, Math.log2(1 + e.delegations.length));
        return [{ e, d, label, kind, width }];
      }),
    [data, pos],
  );

  return (
    <svg class="graph" viewBox={`0 0 ${W} ${H}`} role="group" aria-label="Trust graph" data-testid="trust-graph">
      <defs>
        <marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerUnits="userSpaceOnUse" markerWidth="11" markerHeight="11" orient="auto-start-reverse">
          <path d="M 0 0 L 10 5 L 0 10 z" class="arrow-head" />
        </marker>
        <marker id="arrow-rule" viewBox="0 0 10 10" refX="9" refY="5" markerUnits="userSpaceOnUse" markerWidth="11" markerHeight="11" orient="auto-start-reverse">
          <path d="M 0 0 L 10 5 L 0 10 z" class="arrow-head rule" />
        </marker>
        <marker id="arrow-selected" viewBox="0 0 10 10" refX="9" refY="5" markerUnits="userSpaceOnUse" markerWidth="11" markerHeight="11" orient="auto-start-reverse">
          <path d="M 0 0 L 10 5 L 0 10 z" class="arrow-head selected" />
        </marker>
      </defs>
      {shapes.map(({ e, d, width, kind }) => {
        const selected = props.selected === e.key;
        // The name says what the visible label says, and more; the label
        // itself is drawn in a separate, hidden layer (so it sits on top of
        // every line and is not read twice).
        const name = `${edgeSummary(e)}, ${actionSummary(e)}: from ${nodeLabel(e.from, who)} to ${nodeLabel(e.to, who)}; actions ${e.actions.join(", ")}`;
        return (
          <g
            key={e.key}
            class={`edge edge-${kind} ${selected ? "selected" : ""}`}
            tabIndex={0}
            role="button"
            aria-pressed={selected}
            aria-label={name}
            data-testid="graph-edge"
            data-from={e.from}
            data-to={e.to}
            onClick={() => props.onSelect(e.key)}
            onKeyDown={(ev) => {
              if (ev.key === "Enter" || ev.key === " ") {
                ev.preventDefault();
                props.onSelect(e.key);
              }
            }}
          >
            <path d={d} class="edge-hit" />
            <path d={d} class="edge-line" stroke-width={width} marker-end={`url(#${selected ? "arrow-selected" : kind === "rule" ? "arrow-rule" : "arrow"})`} />
          </g>
        );
      })}
      <g aria-hidden="true" class="edge-labels">
        {shapes.map(({ e, label }) => (
          <g
            key={e.key}
            class={props.selected === e.key ? "selected" : undefined}
            onClick={() => props.onSelect(e.key)}
            data-testid="graph-edge-label"
            data-from={e.from}
            data-to={e.to}
          >
            <rect
              class="edge-label-bg"
              x={label.x - labelWidth(e) / 2}
              y={label.y - 18}
              width={labelWidth(e)}
              height={34}
              rx={6}
            />
            <text x={label.x} y={label.y - 4} class="edge-label" text-anchor="middle">
              {edgeSummary(e)}
            </text>
            <text x={label.x} y={label.y + 11} class="edge-actions" text-anchor="middle">
              {actionSummary(e)}
            </text>
          </g>
        ))}
      </g>
      {[who.tenantId, ...data.tenants].map((t) => {
        const p = pos.get(t)!;
        const mine = t === who.tenantId;
        return (
          <g key={t} class={`node ${mine ? "node-me" : ""} ${t === ANY ? "node-any" : ""}`} data-testid="graph-node" data-tenant-id={t}>
            <title>{t === ANY ? "Rules that name no tenant apply to any tenant" : t}</title>
            <circle cx={p.x} cy={p.y} r={radiusOf(t)} />
            <text x={p.x} y={p.y + radiusOf(t) + 17} class="node-label" text-anchor="middle">
              {nodeLabel(t, who)}
            </text>
            {mine ? (
              <text x={p.x} y={p.y + 5} class="node-you" text-anchor="middle">
                you
              </text>
            ) : null}
          </g>
        );
      })}
    </svg>
  );
}

function EdgeDetail(props: { edge: Edge; who: Me }) {
  const e = props.edge;
  const who = props.who;
  return (
    <section class="card edge-detail" data-testid="edge-delegations" aria-labelledby="edge-title">
      <h2 class="h3" id="edge-title">
        {nodeLabel(e.from, who)} → {nodeLabel(e.to, who)}
      </h2>
      <p class="muted small">
        <Id id={e.from === ANY ? "any tenant" : e.from} /> → <Id id={e.to === ANY ? "any tenant" : e.to} />
      </p>
      <h3 class="h4">Active delegations</h3>
      {e.delegations.length === 0 ? (
        <p class="muted">None active.</p>
      ) : (
        <div class="table-wrap">
          <table class="table">
            <thead>
              <tr>
                <th scope="col">Action</th>
                <th scope="col">Agent</th>
                <th scope="col">Scopes</th>
                <th scope="col">Expires</th>
              </tr>
            </thead>
            <tbody>
              {e.delegations.map((d) => (
                <tr key={d.id} data-testid="edge-delegation">
                  <td>
                    <a href={href(`/delegations/${d.id}`)} onClick={onLinkClick}>
                      {d.action}
                    </a>
                  </td>
                  <td>
                    <code class="id" title={d.requestingAgentId}>
                      {shortId(d.requestingAgentId)}
                    </code>
                  </td>
                  <td>{d.scopes.join(" ") || <span class="muted">—</span>}</td>
                  <td>
                    <Time value={d.expireTime} relative />
                  </td>
                </tr>
              ))}
            </tbody>
          </table>
        </div>
      )}
      {e.rules.length ? (
        <>
          <h3 class="h4">Your rules on this edge</h3>
          <ul class="rule-list">
            {e.rules.map((r) => (
              <li key={r.id}>
                <a href={href(`/admin/policies/${r.id}`)} onClick={onLinkClick}>
                  <code>{r.actionPattern}</code>
                </a>{" "}
                — {effectLabel[r.effect]} ({r.direction === RuleDirection.INBOUND ? "inbound" : "outbound"})
                {r.description ? <span class="muted"> · {r.description}</span> : null}
              </li>
            ))}
          </ul>
        </>
      ) : null}
    </section>
  );
}

export function GraphPage() {
  useTitle("Trust graph");
  const who = useStore(me)!;
  const g = useLoad(() => loadGraph(who), [who.tenantId]);
  const [selected, setSelected] = useState<string | null>(null);
  const edge = g.data?.edges.find((e) => e.key === selected) ?? null;
  return (
    <div class="page">
      <PageHeader
        title="Trust graph"
        actions={
          <button type="button" class="btn" onClick={g.reload} disabled={g.loading}>
            Refresh
          </button>
        }
      >
        Which tenants' agents act where. Arrows point from the tenant whose agent asks to the tenant that receives.
        {g.data?.rulesShown ? " Dashed arrows are your rules without active delegations." : ""}
      </PageHeader>
      <ErrorBanner problem={g.problem} onRetry={g.reload} />
      {g.loading && !g.data ? <Loading label="Loading the graph…" /> : null}
      {g.data ? (
        g.data.edges.length === 0 ? (
          <Empty title="No connections yet">
            No active delegations{g.data.rulesShown ? " and no rules" : ""} involve your tenant.
          </Empty>
        ) : (
          <>
            {g.data.truncated ? (
              <p class="banner banner-info" role="status">
                Showing the newest 2000 active delegations.
              </p>
            ) : null}
            <div class="graph-wrap">
              <Graph data={g.data} who={who} selected={selected} onSelect={setSelected} />
            </div>
            {edge ? <EdgeDetail edge={edge} who={who} /> : <p class="muted">Select an arrow to list its delegations.</p>}
            <details class="card">
              <summary>All connections as a table</summary>
              <div class="table-wrap">
                <table class="table" data-testid="graph-table">
                  <thead>
                    <tr>
                      <th scope="col">From</th>
                      <th scope="col">To</th>
                      <th scope="col">Active</th>
                      <th scope="col">Rules</th>
                      <th scope="col">Actions</th>
                      <th scope="col">
                        <span class="sr-only">Select</span>
                      </th>
                    </tr>
                  </thead>
                  <tbody>
                    {g.data.edges.map((e) => (
                      <tr key={e.key}>
                        <td>{nodeLabel(e.from, who)}</td>
                        <td>{nodeLabel(e.to, who)}</td>
                        <td>{e.delegations.length}</td>
                        <td>{e.rules.length}</td>
                        <td>{e.actions.join(", ")}</td>
                        <td>
                          <button type="button" class="btn btn-small" onClick={() => setSelected(e.key)}>
                            Show
                          </button>
                        </td>
                      </tr>
                    ))}
                  </tbody>
                </table>
              </div>
            </details>
          </>
        )
      ) : null}
    </div>
  );
}
