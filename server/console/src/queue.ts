// The live approval queue: WatchPendingStepUps, kept open for as long as an
// approver or admin is signed in, so that the count in the tab title is
// right on every page. With an empty cursor the server sends the queue as it
// is (ADDED events, then a first heartbeat that marks the snapshot's end);
// after that, ADDED/UPDATED/REMOVED changes. Every message carries a cursor:
// a stream that ends (a token that expired, a restart, a proxy) is reopened
// from the last cursor, so no change is missed; a cursor the server no
// longer knows (`cursor_expired`) starts over with a snapshot.
import { Code, ConnectError } from "@connectrpc/connect";
import { PendingStepUpEventType, StepUpState, type StepUp } from "../gen/vaultguard/v1/step_up_service_pb";
import { describe, type Problem } from "./errors";
import { stepUps } from "./rpc";
import { accessToken, invalidate } from "./session";
import { Store } from "./store";
import { toDate } from "./format";

export type Connection = "connecting" | "live" | "reconnecting" | "stopped";

export interface QueueState {
  /** items are the pending step-ups, oldest first. */
  items: StepUp[];
  /** ended keeps the final state of step-ups that left the queue. */
  ended: Map<string, StepUp>;
  /** ready is true once the first snapshot has arrived. */
  ready: boolean;
  connection: Connection;
  problem: Problem | null;
}

export const queue = new Store<QueueState>({
  items: [],
  ended: new Map(),
  ready: false,
  connection: "stopped",
  problem: null,
});

const HEARTBEAT_SECONDS = 15;
/** A stream silent for this long is presumed dead and reopened. */
const SILENCE_MS = (HEARTBEAT_SECONDS * 2 + 10) * 1000;

function byAge(a: StepUp, b: StepUp): number {
  const ta = toDate(a.createTime)?.getTime() ?? 0;
  const tb = toDate(b.createTime)?.getTime() ?? 0;
  return ta - tb || a.stepUpId.localeCompare(b.stepUpId);
}

let running: AbortController | null = null;

export function startQueue(): void {
  if (running) return;
  const stop = new AbortController();
  running = stop;
  queue.update((q) => ({ ...q, connection: "connecting" }));
  void run(stop.signal);
}

export function stopQueue(): void {
  running?.abort();
  running = null;
  queue.set({ items: [], ended: new Map(), ready: false, connection: "stopped", problem: null });
}

const sleep = (ms: number, signal: AbortSignal) =>
  new Promise<void>((resolve) => {
    const t = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => {
      clearTimeout(t);
      resolve();
    });
  });

async function run(signal: AbortSignal): Promise<void> {
  let cursor = "";
  let backoff = 0;
  let items = new Map<string, StepUp>();
  while (!signal.aborted) {
    const call = new AbortController();
    const onStop = () => call.abort();
    signal.addEventListener("abort", onStop);
    let watchdog: ReturnType<typeof setTimeout> | undefined;
    const arm = () => {
      clearTimeout(watchdog);
      watchdog = setTimeout(() => call.abort(), SILENCE_MS);
    };
    let token = "";
    let received = false;
    try {
      token = await accessToken();
      // A snapshot is gathered apart and swapped in at its closing
      // heartbeat, so a reconnect never shows a half-filled queue.
      let snapshot: Map<string, StepUp> | null = cursor ? null : new Map();
      arm();
      for await (const res of stepUps.watchPendingStepUps(
        { cursor, heartbeatIntervalSeconds: HEARTBEAT_SECONDS },
        { signal: call.signal },
      )) {
        arm();
        backoff = 0;
        received = true;
        if (res.cursor) cursor = res.cursor;
        const ended = new Map(queue.get().ended);
        if (res.event.case === "change") {
          const change = res.event.value;
          const s = change.stepUp;
          if (!s) continue;
          const target = snapshot ?? items;
          if (change.eventType === PendingStepUpEventType.REMOVED || s.state !== StepUpState.PENDING) {
            target.delete(s.stepUpId);
            ended.set(s.stepUpId, s);
          } else {
            target.set(s.stepUpId, s);
            ended.delete(s.stepUpId);
          }
        } else if (res.event.case === "heartbeat" && snapshot) {
          items = snapshot;
          snapshot = null;
        }
        if (snapshot) continue;
        queue.set({
          items: [...items.values()].sort(byAge),
          ended,
          ready: true,
          connection: "live",
          problem: null,
        });
      }
      // The server ended the stream cleanly (for example its token expired
      // at a message boundary): reopen from the cursor at once, unless it
      // ended without a single message (then back off as after an error).
      if (!received) backoff = Math.min(backoff ? backoff * 2 : 1000, 30_000);
    } catch (err) {
      if (signal.aborted) break;
      const ce = ConnectError.from(err);
      const problem = describe(err);
      if (ce.code === Code.Unauthenticated && token) invalidate(token);
      if (problem.reason === "INVALID_STATE" && problem.metadata["state"] === "cursor_expired") cursor = "";
      if (ce.code === Code.PermissionDenied && problem.reason === "ROLE_REQUIRED") {
        queue.update((q) => ({ ...q, connection: "stopped", problem }));
        break;
      }
      const silent = ce.code === Code.Canceled || ce.code === Code.Unauthenticated;
      queue.update((q) => ({ ...q, connection: "reconnecting", problem: silent ? null : problem }));
      backoff = Math.min(backoff ? backoff * 2 : 1000, 30_000);
    } finally {
      clearTimeout(watchdog);
      signal.removeEventListener("abort", onStop);
    }
    if (signal.aborted) break;
    if (queue.get().connection === "live") queue.update((q) => ({ ...q, connection: "reconnecting" }));
    await sleep(backoff, signal);
  }
}
