// Formatting of API values for people: times, durations, enum names,
// attribute values. Everything returns plain strings that are rendered as
// text nodes.
import { timestampDate, type Timestamp } from "@bufbuild/protobuf/wkt";
import type { Actor, AttributeValue } from "../gen/vaultguard/v1/common_pb";
import { PrincipalKind } from "../gen/vaultguard/v1/common_pb";
import { AuditOutcome } from "../gen/vaultguard/v1/audit_service_pb";
import { DelegationStatus } from "../gen/vaultguard/v1/delegation_service_pb";
import { Decision, Effect, ConditionOperator, RuleDirection } from "../gen/vaultguard/v1/policy_service_pb";
import { StepUpState } from "../gen/vaultguard/v1/step_up_service_pb";
import { AgentStatus } from "../gen/vaultguard/v1/agent_service_pb";
import { ConnectionStatus, KeyAlgorithm, SigningKeyState } from "../gen/vaultguard/v1/vault_service_pb";

export function toDate(ts: Timestamp | undefined): Date | null {
  return ts ? timestampDate(ts) : null;
}

const withYear = new Intl.DateTimeFormat(undefined, {
  year: "numeric",
  month: "short",
  day: "numeric",
  hour: "2-digit",
  minute: "2-digit",
  second: "2-digit",
});
const thisYear = new Intl.DateTimeFormat(undefined, {
  month: "short",
  day: "numeric",
  hour: "2-digit",
  minute: "2-digit",
  second: "2-digit",
});

/** formatTime: "Dec 6, 16:43:14" in the person's locale, the year when not this one. */
export function formatTime(when: Date | Timestamp | null | undefined): string {
  if (!when) return "—";
  const d = when instanceof Date ? when : timestampDate(when);
  return (d.getFullYear() === new Date().getFullYear() ? thisYear : withYear).format(d);
}

/** formatDuration: 75 → "1 min 15 s", 7200 → "2 h", 90000 → "1 d 1 h". */
export function formatDuration(totalSeconds: number): string {
  const s = Math.max(0, Math.round(totalSeconds));
  if (s < 60) return `${s} s`;
  const d = Math.floor(s / 86400);
  const h = Math.floor((s % 86400) / 3600);
  const m = Math.floor((s % 3600) / 60);
  const sec = s % 60;
  if (d > 0) return h ? `${d} d ${h} h` : `${d} d`;
  if (h > 0) return m ? `${h} h ${m} min` : `${h} h`;
  return sec ? `${m} min ${sec} s` : `${m} min`;
}

/** formatClock: seconds as "4:05" or "1:02:03", for countdowns. */
export function formatClock(totalSeconds: number): string {
  const s = Math.max(0, Math.floor(totalSeconds));
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const sec = String(s % 60).padStart(2, "0");
  return h ? `${h}:${String(m).padStart(2, "0")}:${sec}` : `${m}:${sec}`;
}

/** roughDuration drops the seconds past a minute: "4 min", "2 h 5 min". */
function roughDuration(totalSeconds: number): string {
  const s = Math.max(0, Math.round(totalSeconds));
  return s < 60 ? `${s} s` : formatDuration(s - (s % 60));
}

export function formatRelative(when: Date | Timestamp | null | undefined, now = Date.now()): string {
  if (!when) return "—";
  const d = when instanceof Date ? when : timestampDate(when);
  const diff = Math.round((d.getTime() - now) / 1000);
  if (Math.abs(diff) < 10) return "just now";
  return diff < 0 ? `${roughDuration(-diff)} ago` : `in ${roughDuration(diff)}`;
}

export function attributeText(v: AttributeValue | undefined): string {
  switch (v?.kind.case) {
    case "stringValue":
      return v.kind.value;
    case "numberValue":
      return String(v.kind.value);
    case "boolValue":
      return v.kind.value ? "true" : "false";
    default:
      return "—";
  }
}

export function attributeType(v: AttributeValue | undefined): string {
  switch (v?.kind.case) {
    case "stringValue":
      return "text";
    case "numberValue":
      return "number";
    case "boolValue":
      return "yes/no";
    default:
      return "";
  }
}

export function actorText(a: Actor | undefined): string {
  if (!a) return "—";
  switch (a.kind) {
    case PrincipalKind.OPERATOR:
      return "the operator";
    case PrincipalKind.SYSTEM:
      return "VaultGuard";
    default:
      return a.subject || "—";
  }
}

export function actorKind(a: Actor | undefined): string {
  switch (a?.kind) {
    case PrincipalKind.OPERATOR:
      return "operator";
    case PrincipalKind.HUMAN:
      return "person";
    case PrincipalKind.AGENT:
      return "agent";
    case PrincipalKind.SYSTEM:
      return "system";
    default:
      return "";
  }
}

/** shortId keeps the prefix and the first hex digits: tnt_3f9a1c…. */
export function shortId(id: string, keep = 6): string {
  const m = /^([a-z]+_)([0-9a-f]{16,})$/.exec(id);
  if (!m) return id;
  return `${m[1]}${m[2]!.slice(0, keep)}…`;
}

export const decisionLabel: Record<Decision, string> = {
  [Decision.UNSPECIFIED]: "—",
  [Decision.ALLOW]: "Allow",
  [Decision.STEP_UP]: "Step-up",
  [Decision.BLOCK]: "Block",
};

export const effectLabel: Record<Effect, string> = {
  [Effect.UNSPECIFIED]: "—",
  [Effect.ALLOW]: "Allow",
  [Effect.STEP_UP]: "Step-up",
  [Effect.BLOCK]: "Block",
};

export const directionLabel: Record<RuleDirection, string> = {
  [RuleDirection.UNSPECIFIED]: "—",
  [RuleDirection.INBOUND]: "Inbound",
  [RuleDirection.OUTBOUND]: "Outbound",
};

export const operatorLabel: Record<ConditionOperator, string> = {
  [ConditionOperator.UNSPECIFIED]: "?",
  [ConditionOperator.EQ]: "=",
  [ConditionOperator.NE]: "≠",
  [ConditionOperator.LT]: "<",
  [ConditionOperator.LTE]: "≤",
  [ConditionOperator.GT]: ">",
  [ConditionOperator.GTE]: "≥",
  [ConditionOperator.IN]: "in",
  [ConditionOperator.NOT_IN]: "not in",
  [ConditionOperator.EXISTS]: "exists",
};

export const delegationStatusLabel: Record<DelegationStatus, string> = {
  [DelegationStatus.UNSPECIFIED]: "—",
  [DelegationStatus.PENDING]: "Pending",
  [DelegationStatus.ACTIVE]: "Active",
  [DelegationStatus.DENIED]: "Denied",
  [DelegationStatus.EXPIRED]: "Expired",
  [DelegationStatus.REVOKED]: "Revoked",
  [DelegationStatus.RELINQUISHED]: "Relinquished",
  [DelegationStatus.BLOCKED]: "Blocked",
};

export const stepUpStateLabel: Record<StepUpState, string> = {
  [StepUpState.UNSPECIFIED]: "—",
  [StepUpState.PENDING]: "Pending",
  [StepUpState.APPROVED]: "Approved",
  [StepUpState.DENIED]: "Denied",
  [StepUpState.EXPIRED]: "Expired",
  [StepUpState.REDEEMED]: "Approved",
};

export const outcomeLabel: Record<AuditOutcome, string> = {
  [AuditOutcome.UNSPECIFIED]: "—",
  [AuditOutcome.SUCCESS]: "Success",
  [AuditOutcome.DENIED]: "Denied",
  [AuditOutcome.FAILURE]: "Failure",
};

export const agentStatusLabel: Record<AgentStatus, string> = {
  [AgentStatus.UNSPECIFIED]: "—",
  [AgentStatus.ACTIVE]: "Active",
  [AgentStatus.DISABLED]: "Disabled",
};

export const connectionStatusLabel: Record<ConnectionStatus, string> = {
  [ConnectionStatus.UNSPECIFIED]: "—",
  [ConnectionStatus.PENDING]: "Pending",
  [ConnectionStatus.CONNECTED]: "Connected",
  [ConnectionStatus.NEEDS_REAUTH]: "Needs reconnecting",
  [ConnectionStatus.DISCONNECTED]: "Disconnected",
};

export const keyAlgorithmLabel: Record<KeyAlgorithm, string> = {
  [KeyAlgorithm.UNSPECIFIED]: "—",
  [KeyAlgorithm.ED25519]: "Ed25519",
  [KeyAlgorithm.SECP256K1]: "secp256k1",
  [KeyAlgorithm.P256]: "P-256",
};

export const keyStateLabel: Record<SigningKeyState, string> = {
  [SigningKeyState.UNSPECIFIED]: "—",
  [SigningKeyState.ENABLED]: "Enabled",
  [SigningKeyState.DISABLED]: "Disabled",
};

/** Tone is the colour family of a status chip; chips always carry text too. */
export type Tone = "good" | "bad" | "warn" | "info" | "muted";

export function decisionTone(d: Decision): Tone {
  return d === Decision.ALLOW ? "good" : d === Decision.BLOCK ? "bad" : d === Decision.STEP_UP ? "warn" : "muted";
}

export function delegationTone(s: DelegationStatus): Tone {
  switch (s) {
    case DelegationStatus.ACTIVE:
      return "good";
    case DelegationStatus.PENDING:
      return "warn";
    case DelegationStatus.DENIED:
    case DelegationStatus.BLOCKED:
    case DelegationStatus.REVOKED:
      return "bad";
    default:
      return "muted";
  }
}

export function outcomeTone(o: AuditOutcome): Tone {
  return o === AuditOutcome.SUCCESS ? "good" : o === AuditOutcome.DENIED ? "bad" : o === AuditOutcome.FAILURE ? "warn" : "muted";
}
