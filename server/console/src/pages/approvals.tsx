// Approvals, the heart of the console: the live queue of step-ups addressed
// to the signed-in tenant, and one request in full with Approve / Deny.
// An approval echoes the `request_hash` of the version on screen, so the
// person approves exactly what they read; when the request changed, expired
// or was decided meanwhile, the server refuses and this page says so in
// plain words and shows the request as it is now.
//
// Keyboard: j / ↓ and k / ↑ move through the queue, Enter opens a request,
// `a` moves to Approve and `d` to Deny (Enter then confirms), Esc goes back
// to the queue, `?` shows the shortcuts.
import { useEffect, useRef, useState } from "preact/hooks";
import { Code } from "@connectrpc/connect";
import { StepUpState, type StepUp } from "../../gen/vaultguard/v1/step_up_service_pb";
import { describe, type Problem } from "../errors";
import { actorText, formatDuration, shortId, stepUpStateLabel, toDate } from "../format";
import { queue } from "../queue";
import { href, navigate, onLinkClick } from "../router";
import { stepUps } from "../rpc";
import { me } from "../session";
import { clearDraft, useDraft, useStore } from "../store";
import { useTitle } from "../title";
import { AuthorizationDetails, ContextTable, DecisionView } from "../components/decision";
import { Chip, Countdown, Empty, ErrorBanner, Id, Loading, Notice, TextArea, Time, useNow } from "../components/ui";

function isTyping(target: EventTarget | null): boolean {
  const el = target as HTMLElement | null;
  return !!el?.closest?.("input, textarea, select, [contenteditable='true']");
}

function queueItems(): HTMLAnchorElement[] {
  return [...document.querySelectorAll<HTMLAnchorElement>("[data-testid='queue-item']")];
}

function ConnectionState() {
  const q = useStore(queue);
  const label =
    q.connection === "live" ? "Live" : q.connection === "reconnecting" ? "Reconnecting…" : q.connection === "connecting" ? "Connecting…" : "Stopped";
  return (
    <span class={`live live-${q.connection}`} data-testid="queue-status" role="status" aria-live="polite">
      <span class="live-dot" aria-hidden="true" />
      {label}
    </span>
  );
}

function QueueItem(props: { s: StepUp; selected: boolean }) {
  const s = props.s;
  const got = s.approvals.length;
  const need = Math.max(1, s.approvalsRequired);
  return (
    <li>
      <a
        href={href(`/approvals/${s.stepUpId}`)}
        onClick={onLinkClick}
        class={`queue-item ${props.selected ? "selected" : ""}`}
        aria-current={props.selected ? "true" : undefined}
        data-testid="queue-item"
        data-step-up-id={s.stepUpId}
      >
        <span class="qi-top">
          <span class="qi-action">{s.action}</span>
          <Countdown until={s.expireTime} />
        </span>
        <span class="qi-message">{s.bindingMessage || "No message"}</span>
        <span class="qi-meta">
          <span title={s.requestingTenantId}>from {shortId(s.requestingTenantId)}</span>
          <span aria-hidden="true"> · </span>
          <span title={s.requestingAgentId}>{shortId(s.requestingAgentId)}</span>
          {need > 1 ? (
            <>
              <span aria-hidden="true"> · </span>
              <span>
                {got} of {need} approvals
              </span>
            </>
          ) : null}
        </span>
      </a>
    </li>
  );
}

export function ApprovalsPage(props: { id: string | undefined }) {
  useTitle("Approvals");
  const q = useStore(queue);
  const [help, setHelp] = useState(false);

  useEffect(() => {
    const onKey = (e: KeyboardEvent) => {
      if (e.defaultPrevented || e.altKey || e.ctrlKey || e.metaKey || isTyping(e.target)) return;
      if (document.querySelector("dialog[open]")) return;
      const items = queueItems();
      const active = document.activeElement as HTMLElement | null;
      const onItem = items.indexOf(active as HTMLAnchorElement);
      const selected = items.findIndex((a) => a.dataset["stepUpId"] === props.id);
      const at = onItem >= 0 ? onItem : selected;
      const arrows = e.key === "ArrowDown" || e.key === "ArrowUp";
      // Arrow keys move through the queue only when focus is in it (or
      // nowhere), so they still scroll a request being read.
      if (arrows && onItem < 0 && active && active !== document.body && active.id !== "main") return;
      switch (e.key) {
        case "j":
        case "ArrowDown": {
          const next = items[Math.min(items.length - 1, at + 1)];
          next?.focus();
          e.preventDefault();
          break;
        }
        case "k":
        case "ArrowUp": {
          const prev = items[Math.max(0, at - 1)];
          prev?.focus();
          e.preventDefault();
          break;
        }
        case "a":
          document.querySelector<HTMLButtonElement>("[data-testid='approve-button']:not([disabled])")?.focus();
          e.preventDefault();
          break;
        case "d":
          document.querySelector<HTMLButtonElement>("[data-testid='deny-button']:not([disabled])")?.focus();
          e.preventDefault();
          break;
        case "Escape":
          (items[selected] ?? items[0])?.focus();
          break;
        case "?":
          setHelp((h) => !h);
          break;
      }
    };
    document.addEventListener("keydown", onKey);
    return () => document.removeEventListener("keydown", onKey);
  }, [props.id]);

  const n = q.items.length;
  return (
    <div class={`approvals ${props.id ? "has-detail" : ""}`}>
      <section class="queue-pane" aria-labelledby="queue-heading">
        <header class="pane-header">
          <h1 id="queue-heading">Approvals</h1>
          <ConnectionState />
        </header>
        <p class="queue-count" data-testid="queue-count" aria-live="polite">
          {q.ready ? (n === 0 ? "Nothing waiting" : n === 1 ? "1 request waiting" : `${n} requests waiting`) : ""}
        </p>
        {q.problem ? <ErrorBanner problem={q.problem} testid="queue-error" /> : null}
        {!q.ready ? (
          <Loading label="Loading the queue…" />
        ) : n === 0 ? (
          <Empty title="All caught up" testid="queue-empty">
            New requests appear here as soon as an agent asks.
          </Empty>
        ) : (
          <ul class="queue" aria-label="Pending requests, oldest first" data-testid="queue">
            {q.items.map((s) => (
              <QueueItem key={s.stepUpId} s={s} selected={s.stepUpId === props.id} />
            ))}
          </ul>
        )}
        <div class="shortcuts">
          <button type="button" class="link-button" aria-expanded={help} onClick={() => setHelp(!help)}>
            Keyboard shortcuts
          </button>
          {help ? (
            <dl class="keys" data-testid="shortcuts">
              <dt>
                <kbd>j</kbd> <kbd>k</kbd> or <kbd>↓</kbd> <kbd>↑</kbd>
              </dt>
              <dd>move through the queue</dd>
              <dt>
                <kbd>Enter</kbd>
              </dt>
              <dd>open the request</dd>
              <dt>
                <kbd>a</kbd> then <kbd>Enter</kbd>
              </dt>
              <dd>approve</dd>
              <dt>
                <kbd>d</kbd> then <kbd>Enter</kbd>
              </dt>
              <dd>deny (write the comment first)</dd>
              <dt>
                <kbd>Esc</kbd>
              </dt>
              <dd>back to the queue</dd>
            </dl>
          ) : null}
        </div>
      </section>
      <section class="detail-pane" aria-label="Request">
        {props.id ? (
          <StepUpDetail key={props.id} id={props.id} />
        ) : (
          <Empty title="Select a request">
            Pick a request from the queue to see what is asked, by whom, and why it needs a human.
          </Empty>
        )}
      </section>
    </div>
  );
}

function Quorum(props: { s: StepUp }) {
  const s = props.s;
  const need = Math.max(1, s.approvalsRequired);
  const slots = Array.from({ length: Math.max(need, s.approvals.length) }, (_, i) => s.approvals[i]);
  return (
    <div class="quorum" data-testid="quorum">
      <p class="quorum-summary">
        <strong>
          {s.approvals.length} of {need}
        </strong>{" "}
        {need === 1 ? "approval needed" : "approvals needed"}
      </p>
      <ol class="quorum-steps">
        {slots.map((a, i) => (
          <li key={i} class={a ? "done" : "todo"}>
            {a ? (
              <>
                <span class="approver">{actorText(a.approver)}</span>
                <span class="when">
                  <Time value={a.approveTime} relative />
                </span>
                {a.comment ? <span class="comment">“{a.comment}”</span> : null}
              </>
            ) : (
              <span class="muted">Waiting for an approver</span>
            )}
          </li>
        ))}
      </ol>
    </div>
  );
}

function finalWords(s: StepUp): string {
  switch (s.state) {
    case StepUpState.APPROVED:
    case StepUpState.REDEEMED:
      return "Approved. The agent receives its token.";
    case StepUpState.DENIED:
      return s.deniedBy
        ? `Denied by ${actorText(s.deniedBy)}${s.denyReason ? `: “${s.denyReason}”` : "."}`
        : `Denied${s.denyReason ? `: ${s.denyReason}` : " by policy at approval time."}`;
    case StepUpState.EXPIRED:
      return "Expired before a decision.";
    default:
      return "";
  }
}

function StepUpDetail(props: { id: string }) {
  const who = useStore(me)!;
  const q = useStore(queue);
  const now = useNow();
  const live = q.items.find((s) => s.stepUpId === props.id) ?? q.ended.get(props.id) ?? null;
  const [fetched, setFetched] = useState<StepUp | null>(null);
  const [loadProblem, setLoadProblem] = useState<Problem | null>(null);
  const [shown, setShown] = useState<StepUp | null>(live);
  const [newer, setNewer] = useState<StepUp | null>(null);
  const [comment, setComment] = useDraft(`approval-comment:${props.id}`, "");
  const [busy, setBusy] = useState<"approve" | "deny" | null>(null);
  const [problem, setProblem] = useState<Problem | null>(null);
  const [result, setResult] = useState<string | null>(null);
  const headingRef = useRef<HTMLHeadingElement>(null);

  // Read the request from the server too: a deep link, a request that left
  // the queue, or one the snapshot has not delivered yet.
  const refresh = async (): Promise<StepUp | null> => {
    try {
      const res = await stepUps.getStepUp({ stepUpId: props.id });
      setFetched(res.stepUp ?? null);
      setLoadProblem(null);
      return res.stepUp ?? null;
    } catch (err) {
      setLoadProblem(describe(err));
      return null;
    }
  };
  useEffect(() => {
    void refresh();
  }, [props.id]);

  // On a narrow screen the request replaces the queue: move focus to it.
  const focused = useRef(false);
  useEffect(() => {
    if (focused.current || !shown || !window.matchMedia("(max-width: 900px)").matches) return;
    focused.current = true;
    window.scrollTo(0, 0);
    headingRef.current?.focus({ preventScroll: true });
  }, [shown !== null]);

  // Follow the live version while it is the same request (new approvals,
  // its end); a different request_hash is only offered, never swapped in
  // under the person's eyes.
  const current = live ?? fetched;
  useEffect(() => {
    if (!current) return;
    if (!shown) {
      setShown(current);
      return;
    }
    if (current.requestHash === shown.requestHash) {
      if (current !== shown) setShown(current);
      setNewer(null);
    } else {
      setNewer(current);
    }
  }, [current]);

  if (!shown) {
    if (loadProblem) {
      return (
        <div class="detail">
          <BackLink />
          <ErrorBanner problem={loadProblem} testid="step-up-error" />
        </div>
      );
    }
    return <Loading label="Loading the request…" />;
  }

  const s = shown;
  const expireAt = toDate(s.expireTime)?.getTime() ?? Infinity;
  const pending = s.state === StepUpState.PENDING && expireAt > now;
  const iApproved = s.approvals.some((a) => a.approver?.subject === who.subject);
  const mine = s.requestingTenantId === who.tenantId;

  const afterRefusal = async (err: unknown) => {
    const p = describe(err);
    setProblem(p);
    // The request changed, expired or was decided meanwhile: show it as it
    // is now, so the person reviews what they would really approve.
    if (p.reason === "INVALID_STATE" || p.reason === "ACCESS_DENIED" || p.reason === "EXPIRED_TOKEN" || p.code === Code.NotFound) {
      const now2 = await refresh();
      if (now2) {
        setShown(now2);
        setNewer(null);
      }
    }
    headingRef.current?.focus();
  };

  const approve = async () => {
    setBusy("approve");
    setProblem(null);
    setResult(null);
    try {
      const res = await stepUps.approveStepUp({ stepUpId: s.stepUpId, requestHash: s.requestHash, comment: comment.trim() });
      const after = res.stepUp;
      if (after) setShown(after);
      clearDraft(`approval-comment:${props.id}`);
      setComment("");
      if (after && after.state === StepUpState.PENDING) {
        setResult(`Your approval is recorded: ${after.approvals.length} of ${Math.max(1, after.approvalsRequired)}. Another approver must approve too.`);
      } else {
        setResult("Approved. The agent receives its token.");
      }
    } catch (err) {
      await afterRefusal(err);
    } finally {
      setBusy(null);
    }
  };

  const deny = async () => {
    setBusy("deny");
    setProblem(null);
    setResult(null);
    try {
      const res = await stepUps.denyStepUp({ stepUpId: s.stepUpId, reason: comment.trim() });
      if (res.stepUp) setShown(res.stepUp);
      clearDraft(`approval-comment:${props.id}`);
      setComment("");
      setResult("Denied. The agent is told its request was refused.");
    } catch (err) {
      await afterRefusal(err);
    } finally {
      setBusy(null);
    }
  };

  return (
    <article class="detail" data-testid="step-up-detail" data-step-up-id={s.stepUpId} aria-labelledby="detail-title">
      <BackLink />
      <header class="detail-header">
        <p class="eyebrow">Step-up request</p>
        <h2 id="detail-title" ref={headingRef} tabIndex={-1}>
          {s.action}
        </h2>
        <div class="detail-status">
          <Chip tone={pending ? "warn" : s.state === StepUpState.DENIED ? "bad" : s.state === StepUpState.EXPIRED ? "muted" : s.state === StepUpState.PENDING ? "muted" : "good"} testid="step-up-state">
            {s.state === StepUpState.PENDING && !pending ? "Expired" : stepUpStateLabel[s.state]}
          </Chip>
          {s.state === StepUpState.PENDING ? <Countdown until={s.expireTime} long testid="expiry-countdown" /> : null}
        </div>
      </header>

      {newer ? (
        <Notice tone="warn" testid="request-changed" title="This request changed since you opened it — review it again.">
          <button
            type="button"
            class="btn btn-small"
            onClick={() => {
              setShown(newer);
              setNewer(null);
              setProblem(null);
            }}
          >
            Show the new version
          </button>
        </Notice>
      ) : null}
      {s.state !== StepUpState.PENDING && !result ? (
        <Notice tone={s.state === StepUpState.DENIED ? "warn" : "info"} testid="step-up-final">
          {finalWords(s)}
        </Notice>
      ) : null}

      <section class="binding" aria-labelledby="binding-title">
        <h3 id="binding-title">Message from the requester</h3>
        <p class={`binding-message ${s.bindingMessage ? "" : "muted"}`} data-testid="binding-message">
          {s.bindingMessage || "The requester sent no message."}
        </p>
      </section>

      <dl class="facts">
        <dt>Requesting tenant</dt>
        <dd data-testid="requesting-tenant">
          <Id id={s.requestingTenantId} />
          {mine ? <span class="you"> (you)</span> : null}
        </dd>
        <dt>Agent</dt>
        <dd data-testid="requesting-agent">
          <Id id={s.requestingAgentId} />
        </dd>
        <dt>Receiving tenant</dt>
        <dd data-testid="receiving-tenant">
          <Id id={s.receivingTenantId} />
          {s.receivingTenantId === who.tenantId ? <span class="you"> (you)</span> : null}
        </dd>
        <dt>Action</dt>
        <dd>
          <code>{s.action}</code>
        </dd>
        <dt>Scopes</dt>
        <dd data-testid="scopes">
          {s.scopes.length ? (
            <ul class="tags">
              {s.scopes.map((sc) => (
                <li key={sc}>
                  <code>{sc}</code>
                </li>
              ))}
            </ul>
          ) : (
            <span class="muted">none named</span>
          )}
        </dd>
        <dt>Resource</dt>
        <dd data-testid="resource">{s.resource ? <code class="wrap">{s.resource}</code> : <span class="muted">none</span>}</dd>
        <dt>Lifetime asked</dt>
        <dd>{formatDuration(s.requestedTtlSeconds)}</dd>
        <dt>Asked</dt>
        <dd>
          <Time value={s.createTime} />
        </dd>
        <dt>Expires</dt>
        <dd>
          <Time value={s.expireTime} />
        </dd>
        <dt>Delegation</dt>
        <dd>
          <a href={href(`/delegations/${s.delegationId}`)} onClick={onLinkClick}>
            <Id id={s.delegationId} />
          </a>
        </dd>
      </dl>

      <h3>Context values</h3>
      <ContextTable context={s.context} />
      <h3>Authorization details</h3>
      <AuthorizationDetails details={s.authorizationDetails} />

      <h3>Why it needs a human</h3>
      <DecisionView decision={s.decision} myTenantId={who.tenantId} />

      <h3>Approvals</h3>
      <Quorum s={s} />

      <section class="decide" aria-labelledby="decide-title">
        <h3 id="decide-title">Your decision</h3>
        <ErrorBanner problem={problem} testid="decision-error" />
        {result ? (
          <Notice tone="good" testid="decision-result">
            {result}
          </Notice>
        ) : null}
        {pending ? (
          <>
            <TextArea
              id="decision-comment"
              testid="decision-comment"
              label="Comment"
              hint="Optional. Recorded in the audit log; a denial's comment is shown to both parties."
              value={comment}
              onInput={setComment}
              maxLength={512}
              rows={2}
            />
            <div class="decide-row">
              <p class="hash muted">
                Applies to this exact request, fingerprint{" "}
                <code data-testid="request-hash" title={s.requestHash}>
                  {s.requestHash.slice(0, 12)}
                </code>
              </p>
              <div class="decide-actions">
              <button
                type="button"
                class="btn btn-danger"
                onClick={deny}
                disabled={busy !== null}
                data-testid="deny-button"
                aria-keyshortcuts="d"
              >
                {busy === "deny" ? "Denying…" : "Deny"}
              </button>
              <button
                type="button"
                class="btn btn-primary"
                onClick={approve}
                disabled={busy !== null || iApproved}
                data-testid="approve-button"
                aria-keyshortcuts="a"
              >
                {busy === "approve" ? "Approving…" : iApproved ? "You approved" : "Approve"}
              </button>
              </div>
            </div>
          </>
        ) : (
          <p class="muted">This request is no longer waiting for a decision.</p>
        )}
      </section>
    </article>
  );
}

function BackLink() {
  return (
    <a
      class="back-link"
      href={href("/approvals")}
      onClick={(e) => {
        e.preventDefault();
        navigate("/approvals");
      }}
    >
      ← Queue
    </a>
  );
}
