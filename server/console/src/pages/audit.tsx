// The audit log: the tenant's events with their outcome in colour and in
// words, filters, a live tail (TailAuditEvents, resumed from the last
// sequence after a reconnect), CSV/NDJSON download (ExportAuditEvents into a
// Blob, checked against the export's SHA-256), and "verify chain" with the
// signed receipt of the chain head.
import { useEffect, useRef, useState } from "preact/hooks";
import { Code, ConnectError } from "@connectrpc/connect";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import {
  AuditOrder,
  AuditOutcome,
  ExportFormat,
  type AuditEvent,
  type VerifyAuditChainResponse,
} from "../../gen/vaultguard/v1/audit_service_pb";
import { Plain, describe, fieldErrors, type Problem } from "../errors";
import { actorKind, actorText, outcomeLabel, outcomeTone, shortId } from "../format";
import { audit } from "../rpc";
import { accessToken, invalidate, me } from "../session";
import { useDraft, useStore } from "../store";
import { useTitle } from "../title";
import {
  Checkbox,
  Chip,
  CopyButton,
  Empty,
  ErrorBanner,
  Loading,
  Notice,
  PageHeader,
  SelectField,
  TextField,
  Time,
  splitList,
  useLoad,
} from "../components/ui";

interface Filters {
  types: string;
  actor: string;
  subject: string;
  outcome: string;
  from: string;
  to: string;
  order: string;
  unsealed: boolean;
}

const EMPTY: Filters = { types: "", actor: "", subject: "", outcome: "", from: "", to: "", order: "newest", unsealed: false };

const OUTCOMES: Array<[string, string]> = [
  ["", "Any outcome"],
  [String(AuditOutcome.SUCCESS), "Success"],
  [String(AuditOutcome.DENIED), "Denied"],
  [String(AuditOutcome.FAILURE), "Failure"],
];

function localTime(v: string) {
  if (!v) return undefined;
  const d = new Date(v);
  return Number.isNaN(d.getTime()) ? undefined : timestampFromDate(d);
}

function matches(e: AuditEvent, f: Filters): boolean {
  if (f.actor && e.actor?.subject !== f.actor.trim()) return false;
  if (f.subject && !e.subjectIds.includes(f.subject.trim())) return false;
  if (f.outcome && e.outcome !== Number(f.outcome)) return false;
  return true;
}

function EventRow(props: { e: AuditEvent; fresh: boolean }) {
  const [open, setOpen] = useState(false);
  const e = props.e;
  const tone = outcomeTone(e.outcome);
  const id = `evt-${e.eventId}`;
  return (
    <>
      <tr
        class={`audit-row outcome-${tone} ${props.fresh ? "fresh" : ""}`}
        data-testid="audit-row"
        data-outcome={outcomeLabel[e.outcome].toLowerCase()}
        data-event-type={e.eventType}
      >
        <td class="num">{e.sequence ? String(e.sequence) : <span class="muted" title="Not sealed yet">—</span>}</td>
        <td>
          <Time value={e.time} />
        </td>
        <td>
          <code>{e.eventType}</code>
        </td>
        <td>
          <Chip tone={tone} testid="audit-outcome">
            {outcomeLabel[e.outcome]}
          </Chip>
        </td>
        <td>
          <span class="actor" title={e.actor?.subject}>
            {shortId(actorText(e.actor))}
          </span>
          <span class="muted small"> {actorKind(e.actor)}</span>
        </td>
        <td class="subjects">
          {e.subjectIds.map((s) => (
            <code key={s} class="id" title={s}>
              {shortId(s)}
            </code>
          ))}
        </td>
        <td>
          <button type="button" class="btn btn-small" aria-expanded={open} aria-controls={id} onClick={() => setOpen(!open)}>
            {open ? "Hide" : "Details"}
          </button>
        </td>
      </tr>
      {open ? (
        <tr class="audit-details" id={id}>
          <td colSpan={7}>
            <dl class="facts compact">
              <dt>Event</dt>
              <dd>
                <code class="id">{e.eventId}</code>
              </dd>
              <dt>Request id</dt>
              <dd>{e.requestId ? <code class="id">{e.requestId}</code> : <span class="muted">system</span>}</dd>
              <dt>Actor</dt>
              <dd>{e.actor?.subject ? <code class="id">{e.actor.subject}</code> : <span class="muted">—</span>}</dd>
              <dt>Objects</dt>
              <dd>
                {e.subjectIds.length ? (
                  e.subjectIds.map((s) => (
                    <code key={s} class="id block">
                      {s}
                    </code>
                  ))
                ) : (
                  <span class="muted">—</span>
                )}
              </dd>
              <dt>Actor tenant</dt>
              <dd>{e.actor?.tenantId ? <code class="id">{e.actor.tenantId}</code> : <span class="muted">—</span>}</dd>
              <dt>Hash</dt>
              <dd>
                <code class="hash-text">{e.hash || "not sealed yet"}</code>
              </dd>
              <dt>Previous hash</dt>
              <dd>
                <code class="hash-text">{e.prevHash || "—"}</code>
              </dd>
            </dl>
            <pre class="json" data-testid="audit-details">
              {JSON.stringify(e.details ?? {}, null, 2)}
            </pre>
          </td>
        </tr>
      ) : null}
    </>
  );
}

type Tail = "off" | "connecting" | "live" | "reconnecting";

export function AuditPage() {
  useTitle("Audit log");
  const who = useStore(me)!;
  const [draft, setDraft] = useDraft<Filters>("audit-filters", EMPTY);
  const [applied, setApplied] = useState<Filters>(draft);
  const [events, setEvents] = useState<AuditEvent[]>([]);
  const [next, setNext] = useState("");
  const [fresh, setFresh] = useState<Set<string>>(new Set());
  const [moreProblem, setMoreProblem] = useState<Problem | null>(null);
  const [tail, setTail] = useState<Tail>("off");
  const [tailProblem, setTailProblem] = useState<Problem | null>(null);
  const tailStop = useRef<AbortController | null>(null);

  const request = (f: Filters, pageToken: string) => ({
    eventTypes: splitList(f.types),
    actorSubject: f.actor.trim(),
    subjectId: f.subject.trim(),
    outcome: f.outcome ? (Number(f.outcome) as AuditOutcome) : AuditOutcome.UNSPECIFIED,
    order: f.order === "oldest" ? AuditOrder.OLDEST_FIRST : AuditOrder.NEWEST_FIRST,
    includeUnsealed: f.unsealed,
    startTime: localTime(f.from),
    endTime: localTime(f.to),
    page: { pageSize: 100, pageToken },
  });

  const list = useLoad(async () => {
    const res = await audit.listAuditEvents(request(applied, ""));
    setEvents(res.events);
    setNext(res.page?.nextPageToken ?? "");
    setFresh(new Set());
    return true;
  }, [applied]);
  const errors = fieldErrors(list.problem);

  const loadMore = async () => {
    setMoreProblem(null);
    try {
      const res = await audit.listAuditEvents(request(applied, next));
      setEvents((old) => [...old, ...res.events]);
      setNext(res.page?.nextPageToken ?? "");
    } catch (err) {
      setMoreProblem(describe(err));
    }
  };

  // ---- live tail ----
  const stopTail = () => {
    tailStop.current?.abort();
    tailStop.current = null;
    setTail("off");
  };
  useEffect(() => stopTail, []);
  useEffect(() => {
    if (tailStop.current) {
      stopTail();
      startTail();
    }
  }, [applied]);

  const startTail = () => {
    const stop = new AbortController();
    tailStop.current = stop;
    setTail("connecting");
    setTailProblem(null);
    const f = applied;
    void (async () => {
      let after = 0n;
      let atHead = true;
      let backoff = 0;
      while (!stop.signal.aborted) {
        let token = "";
        try {
          token = await accessToken();
          for await (const res of audit.tailAuditEvents(
            { afterSequence: after, startAtHead: atHead, eventTypes: splitList(f.types), heartbeatIntervalSeconds: 15 },
            { signal: stop.signal },
          )) {
            setTail("live");
            backoff = 0;
            after = res.sequence;
            atHead = false;
            if (res.item.case === "event") {
              const ev = res.item.value;
              if (!matches(ev, f)) continue;
              setEvents((old) => (f.order === "oldest" ? [...old, ev] : [ev, ...old]));
              setFresh((old) => new Set(old).add(ev.eventId));
            }
          }
        } catch (err) {
          if (stop.signal.aborted) break;
          const ce = ConnectError.from(err);
          if (ce.code === Code.Unauthenticated && token) invalidate(token);
          else setTailProblem(describe(err));
          if (ce.code === Code.PermissionDenied) {
            setTail("off");
            tailStop.current = null;
            return;
          }
        }
        if (stop.signal.aborted) break;
        setTail("reconnecting");
        backoff = Math.min(backoff ? backoff * 2 : 1000, 30_000);
        await new Promise((r) => setTimeout(r, backoff));
      }
    })();
  };

  const set = (k: keyof Filters) => (v: string) => setDraft({ ...draft, [k]: v });
  return (
    <div class="page">
      <PageHeader
        title="Audit log"
        actions={
          <>
            <button
              type="button"
              class={`btn ${tail !== "off" ? "btn-active" : ""}`}
              aria-pressed={tail !== "off"}
              onClick={() => (tail === "off" ? startTail() : stopTail())}
              data-testid="audit-live-toggle"
            >
              <span class={`live-dot ${tail === "live" ? "on" : ""}`} aria-hidden="true" />
              {tail === "off" ? "Live tail" : tail === "live" ? "Live — stop" : "Connecting… — stop"}
            </button>
            <Export filters={applied} tenantId={who.tenantId} />
          </>
        }
      >
        Everything that happened in your tenant, in a tamper-evident chain.
      </PageHeader>
      <VerifyChain />
      <form
        class="filters"
        aria-label="Filter events"
        onSubmit={(e) => {
          e.preventDefault();
          setApplied({ ...draft });
        }}
      >
        <TextField id="a-types" label="Event types" value={draft.types} onInput={set("types")} placeholder="delegation.*, step_up.denied" error={errors["event_types"]} testid="filter-event-types" />
        <TextField id="a-actor" label="Actor" value={draft.actor} onInput={set("actor")} placeholder="agt_… or a person" error={errors["actor_subject"]} />
        <TextField id="a-subject" label="Object id" value={draft.subject} onInput={set("subject")} placeholder="dlg_…" mono error={errors["subject_id"]} />
        <SelectField id="a-outcome" label="Outcome" value={draft.outcome} onChange={set("outcome")} options={OUTCOMES} testid="filter-outcome" />
        <TextField id="a-from" label="From" type="datetime-local" value={draft.from} onInput={set("from")} error={errors["start_time"]} />
        <TextField id="a-to" label="Until" type="datetime-local" value={draft.to} onInput={set("to")} error={errors["end_time"]} />
        <SelectField
          id="a-order"
          label="Order"
          value={draft.order}
          onChange={set("order")}
          options={[
            ["newest", "Newest first"],
            ["oldest", "Oldest first"],
          ]}
        />
        <Checkbox id="a-unsealed" label="Include events not sealed yet" checked={draft.unsealed} onChange={(v) => setDraft({ ...draft, unsealed: v })} />
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
      <ErrorBanner problem={list.problem} onRetry={list.reload} fields={["event_types", "actor_subject", "subject_id", "start_time", "end_time"]} />
      {tailProblem && tail !== "off" ? <ErrorBanner problem={tailProblem} testid="tail-error" /> : null}
      {list.loading && events.length === 0 ? (
        <Loading label="Loading events…" />
      ) : events.length === 0 && !list.problem ? (
        <Empty title="No events match" testid="audit-empty">
          Change the filters{tail === "off" ? ", or turn on the live tail to watch new events arrive" : ""}.
        </Empty>
      ) : events.length ? (
        <div class="table-wrap">
          <table class="table audit-table" data-testid="audit-table">
            <caption class="sr-only">Audit events</caption>
            <thead>
              <tr>
                <th scope="col">Seq.</th>
                <th scope="col">Time</th>
                <th scope="col">Event</th>
                <th scope="col">Outcome</th>
                <th scope="col">Actor</th>
                <th scope="col">Objects</th>
                <th scope="col">
                  <span class="sr-only">Details</span>
                </th>
              </tr>
            </thead>
            <tbody>
              {events.map((e) => (
                <EventRow key={e.eventId} e={e} fresh={fresh.has(e.eventId)} />
              ))}
            </tbody>
          </table>
        </div>
      ) : null}
      <ErrorBanner problem={moreProblem} />
      {next ? (
        <button type="button" class="btn" onClick={loadMore} data-testid="load-more">
          Load more
        </button>
      ) : null}
    </div>
  );
}

// ---- export ------------------------------------------------------------------

function hex(buf: ArrayBuffer): string {
  return [...new Uint8Array(buf)].map((b) => b.toString(16).padStart(2, "0")).join("");
}

function Export(props: { filters: Filters; tenantId: string }) {
  const [busy, setBusy] = useState<ExportFormat | null>(null);
  const [problem, setProblem] = useState<Problem | null>(null);
  const [done, setDone] = useState<string | null>(null);
  const run = async (format: ExportFormat) => {
    setBusy(format);
    setProblem(null);
    setDone(null);
    try {
      const chunks: Uint8Array[] = [];
      let summary = null;
      for await (const res of audit.exportAuditEvents({
        format,
        startTime: localTime(props.filters.from),
        endTime: localTime(props.filters.to),
        eventTypes: splitList(props.filters.types),
      })) {
        if (res.part.case === "data") chunks.push(res.part.value);
        else if (res.part.case === "summary") summary = res.part.value;
      }
      if (!summary) throw new Plain("The export ended without its summary; the file would be incomplete.");
      const csv = format === ExportFormat.CSV;
      const blob = new Blob(chunks as BlobPart[], { type: csv ? "text/csv" : "application/x-ndjson" });
      let checked = "";
      if (globalThis.crypto?.subtle) {
        const digest = hex(await crypto.subtle.digest("SHA-256", await blob.arrayBuffer()));
        if (digest !== summary.sha256) throw new Plain("The downloaded file doesn't match the server's checksum. Try again.");
        checked = ", checksum verified";
      }
      const url = URL.createObjectURL(blob);
      const a = document.createElement("a");
      const day = new Date().toISOString().slice(0, 10);
      a.href = url;
      a.download = `vaultguard-audit-${props.tenantId}-${day}.${csv ? "csv" : "ndjson"}`;
      document.body.append(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(url), 10_000);
      setDone(`Downloaded ${String(summary.eventCount)} events (${String(summary.byteCount)} bytes${checked}).`);
    } catch (err) {
      setProblem(describe(err));
    } finally {
      setBusy(null);
    }
  };
  return (
    <div class="export">
      <button type="button" class="btn" onClick={() => run(ExportFormat.CSV)} disabled={busy !== null} data-testid="audit-export-csv">
        {busy === ExportFormat.CSV ? "Exporting…" : "Download CSV"}
      </button>
      <button type="button" class="btn" onClick={() => run(ExportFormat.NDJSON)} disabled={busy !== null} data-testid="audit-export-ndjson">
        {busy === ExportFormat.NDJSON ? "Exporting…" : "Download NDJSON"}
      </button>
      <div class="export-status" aria-live="polite">
        {done ? (
          <span class="small" data-testid="export-result">
            {done}
          </span>
        ) : null}
        <ErrorBanner problem={problem} testid="export-error" />
      </div>
    </div>
  );
}

// ---- chain verification ---------------------------------------------------

function decodePart(part: string | undefined): string {
  if (!part) return "";
  try {
    const b64 = part.replace(/-/g, "+").replace(/_/g, "/").padEnd(Math.ceil(part.length / 4) * 4, "=");
    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    const text = new TextDecoder().decode(bytes);
    return JSON.stringify(JSON.parse(text), null, 2);
  } catch {
    return "(not readable)";
  }
}

function VerifyChain() {
  const [busy, setBusy] = useState(false);
  const [result, setResult] = useState<VerifyAuditChainResponse | null>(null);
  const [problem, setProblem] = useState<Problem | null>(null);
  const run = async () => {
    setBusy(true);
    setProblem(null);
    try {
      setResult(await audit.verifyAuditChain({ includeReceipt: true }));
    } catch (err) {
      setProblem(describe(err));
    } finally {
      setBusy(false);
    }
  };
  const [header, payload] = (result?.receipt ?? "").split(".");
  return (
    <section class="card verify" aria-labelledby="verify-title" data-testid="verify-card">
      <div class="card-head">
        <div>
          <h2 class="h3" id="verify-title">
            Verify the chain
          </h2>
          <p class="muted">
            Recomputes every sealed event's hash link and asks VaultGuard to sign a receipt of the chain head. Keep the
            receipt: a later rewrite of any event up to that head is then provable.
          </p>
        </div>
        <button type="button" class="btn btn-primary" onClick={run} disabled={busy} data-testid="verify-chain">
          {busy ? "Verifying…" : "Verify chain"}
        </button>
      </div>
      <ErrorBanner problem={problem} />
      {result ? (
        <div data-testid="verify-result" data-ok={result.ok ? "true" : "false"}>
          {result.ok ? (
            <Notice tone="good" title="The chain is intact.">
              <p>
                {String(result.checkedCount)} events checked
                {result.unsealedCount ? `; ${String(result.unsealedCount)} not sealed yet` : ""}.
              </p>
            </Notice>
          ) : (
            <div class="banner banner-bad" role="alert">
              <p class="banner-title">The chain is broken at sequence {String(result.firstBrokenSequence)}.</p>
              <p>{result.failure}</p>
            </div>
          )}
          <dl class="facts compact">
            <dt>Head sequence</dt>
            <dd>{String(result.headSequence)}</dd>
            <dt>Head hash</dt>
            <dd>
              <code class="hash-text">{result.headHash}</code>
            </dd>
            <dt>Verified</dt>
            <dd>
              <Time value={result.verifyTime} />
            </dd>
          </dl>
          {result.receipt ? (
            <div class="receipt">
              <div class="receipt-head">
                <h3 class="h4">Signed receipt</h3>
                <CopyButton text={result.receipt} label="Copy receipt" testid="copy-receipt" />
              </div>
              <p class="muted small">
                A compact JWS signed with VaultGuard's issuer key (check it against /.well-known/jwks.json).
              </p>
              <pre class="jws" data-testid="receipt">
                {result.receipt}
              </pre>
              <div class="grid-2">
                <div>
                  <h4 class="h5">Header</h4>
                  <pre class="json">{decodePart(header)}</pre>
                </div>
                <div>
                  <h4 class="h5">Payload</h4>
                  <pre class="json" data-testid="receipt-payload">
                    {decodePart(payload)}
                  </pre>
                </div>
              </div>
            </div>
          ) : null}
        </div>
      ) : null}
    </section>
  );
}
