// Turns a failed call into plain words. VaultGuard sends a google.rpc.Status
// in the `grpc-status-details-bin` trailer: an ErrorInfo whose `reason` is an
// ErrorReason name (common.proto), a BadRequest naming each bad field, and
// sometimes a RetryInfo. Connect decodes them with the generated schemas.
import { Code, ConnectError } from "@connectrpc/connect";
import { BadRequestSchema, ErrorInfoSchema, RetryInfoSchema } from "../gen/google/rpc/error_details_pb";
import { HttpError } from "./session";

export interface FieldViolation {
  /** field is the server's path, as sent (`rule.conditions[0].value`). */
  field: string;
  description: string;
}

export interface Problem {
  code: Code | null;
  /** reason is the ErrorReason name without its prefix, or "". */
  reason: string;
  metadata: Record<string, string>;
  /** message is the plain-words sentence to show. */
  message: string;
  violations: FieldViolation[];
  retryAfterSeconds: number | null;
}

function stateSentence(state: string): string {
  const s = state.toLowerCase();
  if (s === "request_hash_mismatch") return "This request changed since you opened it — review it again.";
  if (s === "version_mismatch") return "Someone else changed this meanwhile. Reload it and try again.";
  if (s === "cursor_expired") return "The live view fell too far behind and starts over.";
  if (s === "has_connections") return "This provider still has connections. Disconnect them first.";
  if (s.includes("expired")) return "This request expired before it was decided.";
  if (s.includes("denied")) return "This request was already denied.";
  if (s.includes("approved") || s.includes("redeemed")) return "This request was already approved.";
  if (s.includes("revoked")) return "This delegation was already revoked.";
  if (s.includes("relinquished")) return "This delegation was already given up by its requester.";
  if (s.includes("blocked")) return "This delegation was blocked by policy; it never became active.";
  if (s.includes("pending")) return "This is still waiting for approval; deny the step-up instead.";
  if (s.includes("disconnected")) return "This connection is disconnected.";
  return `This can't be done in its current state (${state}).`;
}

const REASONS: Record<string, (meta: Record<string, string>) => string> = {
  UNAUTHENTICATED: () => "Your session has ended. Sign in again to continue.",
  ROLE_REQUIRED: (m) =>
    m["required_roles"] ? `Your role doesn't allow this (it needs: ${m["required_roles"]}).` : "Your role doesn't allow this.",
  TENANT_SUSPENDED: () => "A tenant involved is suspended, so nothing can be done for it now.",
  AGENT_DISABLED: () => "The agent is disabled.",
  TENANT_MISMATCH: () => "Only the other party of this delegation can do that.",
  UNKNOWN_ORGANIZATION: () => "Your organisation is no longer linked to this tenant. Sign in again.",
  POLICY_BLOCKED: (m) => `The ${m["policy_side"] || "policy"} side blocks this.`,
  NO_MATCHING_RULE: () => "No inbound rule of the receiving tenant matches, which always blocks.",
  IDEMPOTENCY_CONFLICT: () => "That idempotency key was already used with other parameters.",
  INVALID_STATE: (m) => stateSentence(m["state"] ?? ""),
  ACCESS_DENIED: () => "The policy now blocks this request, so it has been denied.",
  EXPIRED_TOKEN: () => "This request expired before it was decided.",
  INVALID_GRANT: () => "This grant is unknown, used up or expired.",
  SELF_APPROVAL: () => "You can't decide a request that you made yourself.",
  NEEDS_REAUTH: () => "This connection must be reconnected by an admin.",
  KEY_DISABLED: () => "This signing key is disabled.",
  STEP_UP_REQUIRED: () => "This needs a human approval first.",
  RATE_LIMITED: () => "Too many requests right now. Wait a moment and try again.",
  PROVIDER_ERROR: () => "The OAuth provider failed or could not be reached. Try again.",
  STORAGE_CONFLICT: () => "A conflicting change happened at the same moment. Try again.",
  UNAVAILABLE: () => "VaultGuard is busy or its database is unreachable. Try again shortly.",
  SCOPE_NOT_GRANTED: (m) => `A rule doesn't grant the scope(s) ${m["scopes_not_granted"] ?? "asked for"}.`,
  RESOURCE_NOT_GRANTED: () => "A rule doesn't grant the resource asked for.",
  STEP_UP_QUEUE_FULL: () => "The approval queue is full for this tenant pair.",
  REQUEST_BODY_TIMEOUT: () => "The request took too long to send. Try again.",
};

const CODES: Partial<Record<Code, string>> = {
  [Code.Unauthenticated]: "Your session has ended. Sign in again to continue.",
  [Code.PermissionDenied]: "You aren't allowed to do this.",
  [Code.NotFound]: "Not found: it may have been removed, or it isn't visible to your tenant.",
  [Code.InvalidArgument]: "Some values need attention.",
  [Code.AlreadyExists]: "That already exists.",
  [Code.FailedPrecondition]: "This can't be done in its current state.",
  [Code.ResourceExhausted]: "Too many requests right now. Wait a moment and try again.",
  [Code.Aborted]: "A conflicting change happened at the same moment. Try again.",
  [Code.Unavailable]: "Couldn't reach VaultGuard. Check your connection and try again.",
  [Code.DeadlineExceeded]: "VaultGuard took too long to answer. Try again.",
  [Code.Internal]: "Something went wrong inside VaultGuard. Try again, or ask an operator to check the server log.",
  [Code.Canceled]: "The request was cancelled.",
  [Code.OutOfRange]: "That position is beyond the end of the log.",
  [Code.Unimplemented]: "This server doesn't offer that call.",
};

/** Plain is an error the console raises itself, already in plain words. */
export class Plain extends Error {}

export function describe(err: unknown): Problem {
  if (err instanceof HttpError || err instanceof Plain) {
    return { code: null, reason: "", metadata: {}, message: err.message, violations: [], retryAfterSeconds: null };
  }
  const ce = ConnectError.from(err);
  const info = ce.findDetails(ErrorInfoSchema)[0];
  const reason = info?.reason.replace(/^ERROR_REASON_/, "") ?? "";
  const metadata = { ...(info?.metadata ?? {}) };
  const violations = ce
    .findDetails(BadRequestSchema)
    .flatMap((b) => b.fieldViolations.map((v) => ({ field: v.field, description: v.description })));
  const retry = ce.findDetails(RetryInfoSchema)[0]?.retryDelay;
  const retryAfterSeconds = retry ? Number(retry.seconds) + retry.nanos / 1e9 : null;
  const byReason = REASONS[reason];
  let message = byReason ? byReason(metadata) : CODES[ce.code] ?? "Something went wrong.";
  if (!byReason && ce.code === Code.InvalidArgument && violations.length === 0 && ce.rawMessage) {
    message = `The server refused a value: ${ce.rawMessage}`;
  }
  if (retryAfterSeconds !== null) message += ` (retry in ${Math.ceil(retryAfterSeconds)} s)`;
  return { code: ce.code, reason, metadata, message, violations, retryAfterSeconds };
}

/** isCode tells whether an error is a ConnectError with this code. */
export function isCode(err: unknown, code: Code): boolean {
  return err instanceof ConnectError && err.code === code;
}

/**
 * normalizeField turns a server field path into the key forms use:
 * camelCase segments become snake_case and a leading `prefix.` is dropped
 * (`rule.conditions[0].value` → `conditions[0].value` for prefix "rule").
 */
export function normalizeField(field: string, prefix = ""): string {
  let f = field.replace(/[A-Z]/g, (c) => "_" + c.toLowerCase());
  if (prefix && f.startsWith(prefix + ".")) f = f.slice(prefix.length + 1);
  return f;
}

/** fieldErrors indexes violations by normalized field path. */
export function fieldErrors(problem: Problem | null, prefix = ""): Record<string, string> {
  const out: Record<string, string> = {};
  for (const v of problem?.violations ?? []) {
    const key = normalizeField(v.field, prefix);
    out[key] = out[key] ? `${out[key]} ${v.description}` : v.description;
  }
  return out;
}
