// A mock VaultGuard for working on the console without the Rust server:
// serves dist/ with the console's security headers (so CSP mistakes show up
// in the browser console), answers /console/api/* like the real server is
// specified to, and answers gRPC-Web for the services the console calls from
// in-memory sample data, with live streams and the error details the real
// server sends. Development only: nothing here is part of the product.
// Run: node server/console/dev/serve.mjs [--port 8089] (see README.md).
import { createServer, type IncomingMessage, type ServerResponse } from "node:http";
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { randomBytes, createHash } from "node:crypto";
import { create, fromBinary, toBinary, type DescMessage, type DescService, type MessageShape } from "@bufbuild/protobuf";
import { anyPack, timestampFromMs } from "@bufbuild/protobuf/wkt";
import { StatusSchema } from "../gen/google/rpc/status_pb";
import { BadRequestSchema, ErrorInfoSchema } from "../gen/google/rpc/error_details_pb";
import { AgentService, AgentStatus, type Agent } from "../gen/vaultguard/v1/agent_service_pb";
import { AuditOutcome, AuditService, ExportFormat, type AuditEvent, AuditEventSchema } from "../gen/vaultguard/v1/audit_service_pb";
import { PrincipalKind, type Actor, type AttributeValue } from "../gen/vaultguard/v1/common_pb";
import { DelegationService, DelegationSide, DelegationStatus, type Delegation } from "../gen/vaultguard/v1/delegation_service_pb";
import {
  ConditionOperator,
  Decision,
  Effect,
  OutboundDefault,
  PolicyService,
  RuleDirection,
  type PolicyDecision,
  type Rule,
} from "../gen/vaultguard/v1/policy_service_pb";
import { PendingStepUpEventType, StepUpService, StepUpState, type StepUp } from "../gen/vaultguard/v1/step_up_service_pb";
import { ConnectionStatus, KeyAlgorithm, SigningKeyState, VaultService, type Connection, type SigningKey } from "../gen/vaultguard/v1/vault_service_pb";

const args = process.argv.slice(2);
const PORT = Number(args[args.indexOf("--port") + 1] || process.env["PORT"] || 8089);
const DIST = process.env["DIST"] ?? join(process.cwd(), "server/console/dist");
let roles = (process.env["MOCK_ROLES"] ?? "admin").split(",");

const CSP =
  "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; font-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

// ---- sample data ----------------------------------------------------------------

const hex = (seed: string, n = 32) => createHash("sha256").update(seed).digest("hex").slice(0, n);
const id = (prefix: string, seed: string) => `${prefix}_${hex(prefix + seed)}`;
const ME = id("tnt", "northwind");
const ACME = id("tnt", "acme");
const GLOBEX = id("tnt", "globex");
const INITECH = id("tnt", "initech");
const NOW = Date.now();
const ts = (offsetMs: number) => timestampFromMs(NOW + offsetMs);
const MIN = 60_000;
const H = 60 * MIN;

const human = (subject: string, tenantId = ME): Actor => ({ $typeName: "vaultguard.v1.Actor", kind: PrincipalKind.HUMAN, subject, tenantId });
const agentActor = (subject: string, tenantId: string): Actor => ({ $typeName: "vaultguard.v1.Actor", kind: PrincipalKind.AGENT, subject, tenantId });
const num = (v: number): AttributeValue => ({ $typeName: "vaultguard.v1.AttributeValue", kind: { case: "numberValue", value: v } });
const str = (v: string): AttributeValue => ({ $typeName: "vaultguard.v1.AttributeValue", kind: { case: "stringValue", value: v } });

function decision(from: string, outcome: Decision, explanation: string, quorum = 1): PolicyDecision {
  return {
    $typeName: "vaultguard.v1.PolicyDecision",
    outcome,
    outbound: {
      $typeName: "vaultguard.v1.SideDecision",
      tenantId: from,
      outcome: Decision.ALLOW,
      ruleId: from === ME ? id("rul", "out1") : "",
      policyVersion: from === ME ? 14n : 0n,
      maxTtlSeconds: 0,
      explanation: from === ME ? "no outbound rule matched: the outbound default ALLOW applies" : "decided by the requesting tenant's policy",
      scopesNotGranted: [],
      resourceNotGranted: false,
    },
    inbound: {
      $typeName: "vaultguard.v1.SideDecision",
      tenantId: ME,
      outcome,
      ruleId: id("rul", "in-stock"),
      policyVersion: 14n,
      maxTtlSeconds: 900,
      explanation,
      scopesNotGranted: [],
      resourceNotGranted: false,
    },
    maxTtlSeconds: 900,
    approvalsRequired: outcome === Decision.STEP_UP ? quorum : 0,
    evaluateTime: ts(-5 * MIN),
    scopes: [],
    resource: "",
  };
}

function makeStepUp(seed: string, init: Partial<StepUp> & { action: string; requestingTenantId: string; ageMin: number; ttlMin: number }): StepUp {
  const s: StepUp = {
    $typeName: "vaultguard.v1.StepUp",
    stepUpId: id("stp", seed),
    delegationId: id("dlg", seed),
    state: StepUpState.PENDING,
    requestingAgentId: id("agt", seed),
    receivingTenantId: ME,
    scopes: [],
    resource: "",
    bindingMessage: "",
    context: {},
    requestedTtlSeconds: 600,
    requestHash: hex("hash" + seed, 64),
    decision: decision(init.requestingTenantId, Decision.STEP_UP, "rule rul_… (priority 10, stock.*) matched: amount 1200 > 1000 → STEP_UP", init.approvalsRequired || 1),
    approvalsRequired: 1,
    approvals: [],
    createTime: ts(-init.ageMin * MIN),
    expireTime: ts((init.ttlMin - init.ageMin) * MIN),
    denyReason: "",
    ...init,
  } as StepUp;
  return s;
}

const stepUps = new Map<string, StepUp>();
for (const s of [
  makeStepUp("restock", {
    action: "stock.write",
    requestingTenantId: ACME,
    ageMin: 6,
    ttlMin: 30,
    scopes: ["inventory:write", "inventory:read"],
    resource: "https://api.northwind.example/warehouses/ams-2",
    bindingMessage: "Restock order #4471: 1,200 units of SKU NW-8812 for the Amsterdam DC",
    context: { amount: num(1200), currency: str("EUR"), sku: str("NW-8812") },
    approvalsRequired: 2,
    approvals: [{ $typeName: "vaultguard.v1.Approval", approver: human("dana@northwind.example"), approveTime: ts(-3 * MIN), comment: "Matches PO 4471" }],
    decision: decision(ACME, Decision.STEP_UP, "rule rul_9f2c… (priority 10, stock.*) matched: amount 1200 > 1000 → STEP_UP, 2 approvals", 2),
  }),
  makeStepUp("refund", {
    action: "payments.refund",
    requestingTenantId: GLOBEX,
    ageMin: 2,
    ttlMin: 15,
    scopes: ["payments:refund"],
    bindingMessage: "Refund invoice INV-20931 (EUR 3,480.00) to customer 88213",
    context: { amount: num(3480), currency: str("EUR"), customer: str("88213") },
    decision: decision(GLOBEX, Decision.STEP_UP, "rule rul_31d0… (priority 0, payments.refund) matched: every refund needs a human → STEP_UP"),
  }),
  makeStepUp("xss", {
    action: "sign:treasury-hot",
    requestingTenantId: ME,
    requestingAgentId: id("agt", "treasury-bot"),
    ageMin: 1,
    ttlMin: 10,
    resource: `key:${id("key", "hot")}`,
    bindingMessage: "<img src=x onerror=alert(1)>",
    context: { amount: num(25000), chain_id: num(1), vg_payload_hash: str(hex("payload", 64)), vg_key_algorithm: str("secp256k1") },
    decision: decision(ME, Decision.STEP_UP, "rule rul_77aa… (priority 50, sign:treasury-hot) matched: amount 25000 > 10000 → STEP_UP"),
  }),
]) {
  stepUps.set(s.stepUpId, s);
}

const delegations: Delegation[] = [];
function addDelegation(seed: string, d: Partial<Delegation> & { action: string; from: string; to: string; status: DelegationStatus; ageMin: number }) {
  const del: Delegation = {
    $typeName: "vaultguard.v1.Delegation",
    id: id("dlg", seed),
    requestingTenantId: d.from,
    requestingAgentId: id("agt", seed.split("-")[0]!),
    receivingTenantId: d.to,
    scopes: [],
    resource: "",
    bindingMessage: "",
    context: {},
    requestedTtlSeconds: 600,
    decision: decision(d.from, Decision.ALLOW, "rule rul_… (priority 0, " + d.action + ") matched → ALLOW"),
    stepUpId: "",
    createTime: ts(-d.ageMin * MIN),
    activateTime: d.status === DelegationStatus.BLOCKED || d.status === DelegationStatus.PENDING ? undefined : ts(-d.ageMin * MIN + 1000),
    expireTime: ts(-d.ageMin * MIN + 15 * MIN),
    endTime: d.status === DelegationStatus.ACTIVE || d.status === DelegationStatus.PENDING ? undefined : ts(-d.ageMin * MIN + 10 * MIN),
    endReason: d.status === DelegationStatus.REVOKED ? "order cancelled" : d.status === DelegationStatus.EXPIRED ? "expired" : "",
    tokenAlgorithm: d.status === DelegationStatus.BLOCKED ? "" : "RS256",
    ...d,
  } as Delegation;
  delegations.push(del);
}
addDelegation("acme-1", { action: "stock.read", from: ACME, to: ME, status: DelegationStatus.ACTIVE, ageMin: 4, scopes: ["inventory:read"] });
addDelegation("acme-2", { action: "stock.read", from: ACME, to: ME, status: DelegationStatus.ACTIVE, ageMin: 8, scopes: ["inventory:read"] });
addDelegation("acme-3", { action: "stock.write", from: ACME, to: ME, status: DelegationStatus.ACTIVE, ageMin: 9, scopes: ["inventory:write"] });
addDelegation("globex-1", { action: "payments.status", from: GLOBEX, to: ME, status: DelegationStatus.ACTIVE, ageMin: 3 });
addDelegation("nw-1", { action: "orders.create", from: ME, to: INITECH, status: DelegationStatus.ACTIVE, ageMin: 2 });
addDelegation("nw-2", { action: "orders.read", from: ME, to: INITECH, status: DelegationStatus.ACTIVE, ageMin: 1 });
addDelegation("nw-3", { action: "sign:treasury-hot", from: ME, to: ME, status: DelegationStatus.ACTIVE, ageMin: 5 });
addDelegation("globex-2", { action: "payments.refund", from: GLOBEX, to: ME, status: DelegationStatus.DENIED, ageMin: 70, endReason: "amount does not match the invoice" });
addDelegation("acme-4", { action: "stock.write", from: ACME, to: ME, status: DelegationStatus.REVOKED, ageMin: 180 });
addDelegation("initech-1", { action: "hr.export", from: INITECH, to: ME, status: DelegationStatus.BLOCKED, ageMin: 240 });
addDelegation("acme-5", { action: "stock.read", from: ACME, to: ME, status: DelegationStatus.EXPIRED, ageMin: 400 });
for (const s of stepUps.values()) {
  addDelegation(s.stepUpId, { action: s.action, from: s.requestingTenantId, to: ME, status: DelegationStatus.PENDING, ageMin: 3, stepUpId: s.stepUpId, id: s.delegationId });
}
delegations.sort((a, b) => Number(b.createTime!.seconds - a.createTime!.seconds));

const audit: AuditEvent[] = [];
function record(eventType: string, actor: Actor, subjects: string[], outcome: AuditOutcome, details: Record<string, unknown>, atMs = Date.now()): AuditEvent {
  const seq = BigInt(audit.length + 1);
  const prev = audit.length ? audit[audit.length - 1]!.hash : "0".repeat(64);
  const e = create(AuditEventSchema, {
    tenantId: ME,
    sequence: seq,
    eventId: id("evt", String(seq) + eventType),
    time: timestampFromMs(atMs),
    actor,
    eventType,
    subjectIds: subjects,
    outcome,
    requestId: hex("req" + seq, 8) + "-" + hex("r" + seq, 4),
    details: details as never,
    prevHash: prev,
    hash: hex("h" + seq + prev, 64),
  });
  audit.push(e);
  for (const l of tailers) l(e);
  return e;
}
const tailers = new Set<(e: AuditEvent) => void>();
{
  const kinds: Array<[string, AuditOutcome, Actor, Record<string, unknown>]> = [
    ["delegation.decided", AuditOutcome.SUCCESS, agentActor(id("agt", "acme"), ACME), { outcome: "allow", action: "stock.read" }],
    ["delegation.token_issued", AuditOutcome.SUCCESS, agentActor(id("agt", "acme"), ACME), { alg: "RS256" }],
    ["delegation.refused", AuditOutcome.DENIED, agentActor(id("agt", "initech"), INITECH), { reason: "ERROR_REASON_NO_MATCHING_RULE", action: "hr.export" }],
    ["step_up.approval_recorded", AuditOutcome.SUCCESS, human("dana@northwind.example"), { approvals: 1, required: 2 }],
    ["rule.updated", AuditOutcome.SUCCESS, human("sam@northwind.example"), { rule_id: id("rul", "in-stock"), policy_version: 14 }],
    ["connection.needs_reauth", AuditOutcome.FAILURE, { $typeName: "vaultguard.v1.Actor", kind: PrincipalKind.SYSTEM, subject: "system", tenantId: "" }, { provider: "salesforce", error: "invalid_grant" }],
    ["auth.not_found", AuditOutcome.DENIED, human("eve@northwind.example"), { method: "/vaultguard.v1.AgentService/GetAgent" }],
    ["key.signed", AuditOutcome.SUCCESS, agentActor(id("agt", "treasury-bot"), ME), { payload_hash: hex("p", 64), scheme: "EIP191_PERSONAL_SIGN" }],
  ];
  for (let i = 0; i < 36; i++) {
    const [t, o, a, d] = kinds[i % kinds.length]!;
    record(t, a, [id("dlg", "a" + i)], o, d, NOW - (36 - i) * 7 * MIN);
  }
}

const agents: Agent[] = ["inventory-bot", "treasury-bot", "orders-sync", "legacy-importer"].map((name, i) => ({
  $typeName: "vaultguard.v1.Agent",
  id: id("agt", name),
  tenantId: ME,
  name,
  description: ["Keeps warehouse stock in sync", "Signs treasury transfers", "Pushes orders to Initech", "Old CSV importer"][i]!,
  status: i === 3 ? AgentStatus.DISABLED : AgentStatus.ACTIVE,
  createTime: ts(-(40 - i) * 24 * H),
  updateTime: ts(-i * H),
  secretRotateTime: ts(-(10 + i * 5) * 24 * H),
}));

let policyVersion = 14n;
const rule = (seed: string, r: Partial<Rule>): Rule =>
  ({
    $typeName: "vaultguard.v1.Rule",
    id: id("rul", seed),
    counterpartTenantId: "",
    agentId: "",
    conditions: [],
    maxTtlSeconds: 0,
    priority: 0,
    approvalsRequired: 0,
    description: "",
    createTime: ts(-30 * 24 * H),
    updateTime: ts(-2 * 24 * H),
    version: 1n,
    updateActor: human("sam@northwind.example"),
    scopes: [],
    defaultScopes: [],
    resources: [],
    ...r,
  }) as Rule;
const rules: Rule[] = [
  rule("in-stock-big", {
    direction: RuleDirection.INBOUND,
    actionPattern: "stock.write",
    effect: Effect.STEP_UP,
    priority: 10,
    approvalsRequired: 2,
    counterpartTenantId: ACME,
    scopes: ["inventory:*"],
    conditions: [{ $typeName: "vaultguard.v1.Condition", attribute: "amount", operator: ConditionOperator.GT, value: num(1000), values: [] }],
    description: "Large restocks need two people",
  }),
  rule("in-stock", { direction: RuleDirection.INBOUND, actionPattern: "stock.*", effect: Effect.ALLOW, counterpartTenantId: ACME, maxTtlSeconds: 900, scopes: ["inventory:*"] }),
  rule("in-refund", { direction: RuleDirection.INBOUND, actionPattern: "payments.refund", effect: Effect.STEP_UP, counterpartTenantId: GLOBEX, approvalsRequired: 1, scopes: ["payments:refund"] }),
  rule("in-pay", { direction: RuleDirection.INBOUND, actionPattern: "payments.*", effect: Effect.ALLOW, counterpartTenantId: GLOBEX, scopes: ["payments:read"] }),
  rule("in-hr", {
    direction: RuleDirection.INBOUND,
    actionPattern: "hr.*",
    effect: Effect.BLOCK,
    timeWindow: { $typeName: "vaultguard.v1.TimeWindow", startMinute: 1320, endMinute: 360, daysOfWeek: [] },
    description: "Never at night",
  }),
  rule("out-orders", { direction: RuleDirection.OUTBOUND, actionPattern: "orders.*", effect: Effect.ALLOW, counterpartTenantId: INITECH }),
  rule("out-sign", { direction: RuleDirection.OUTBOUND, actionPattern: "sign:treasury-hot", effect: Effect.ALLOW, counterpartTenantId: ME }),
];

const providers = [
  { $typeName: "vaultguard.v1.OAuthProvider", id: id("prv", "sf"), name: "salesforce", authorizeUrl: "https://login.salesforce.com/services/oauth2/authorize", tokenUrl: "https://login.salesforce.com/services/oauth2/token", revocationUrl: "", clientId: "3MVG9…", clientSecretSet: true, scopes: ["api", "refresh_token"], extraAuthorizeParams: {} },
  { $typeName: "vaultguard.v1.OAuthProvider", id: id("prv", "gh"), name: "github", authorizeUrl: "https://github.com/login/oauth/authorize", tokenUrl: "https://github.com/login/oauth/access_token", revocationUrl: "", clientId: "Iv1.8a61…", clientSecretSet: true, scopes: ["repo"], extraAuthorizeParams: {} },
];
const connections: Connection[] = [
  { $typeName: "vaultguard.v1.Connection", id: id("con", "sf1"), providerId: id("prv", "sf"), status: ConnectionStatus.NEEDS_REAUTH, requestedScopes: ["api"], grantedScopes: ["api", "refresh_token"], externalSubject: "ops@northwind.example", createTime: ts(-20 * 24 * H), lastRefreshTime: ts(-2 * H), connectedBy: human("sam@northwind.example"), statusReason: "provider answered invalid_grant" } as Connection,
  { $typeName: "vaultguard.v1.Connection", id: id("con", "gh1"), providerId: id("prv", "gh"), status: ConnectionStatus.CONNECTED, requestedScopes: ["repo"], grantedScopes: ["repo"], externalSubject: "northwind-ci", createTime: ts(-9 * 24 * H), lastRefreshTime: ts(-12 * MIN), connectedBy: human("sam@northwind.example"), statusReason: "" } as Connection,
];
const keys: SigningKey[] = [
  { $typeName: "vaultguard.v1.SigningKey", id: id("key", "hot"), name: "treasury-hot", algorithm: KeyAlgorithm.SECP256K1, state: SigningKeyState.ENABLED, publicKey: new Uint8Array(65), publicKeyPem: "-----BEGIN PUBLIC KEY-----\nMFYwEAYHKoZIzj0CAQYFK4EEAAoDQgAE…\n-----END PUBLIC KEY-----", publicKeyJwk: '{"kty":"EC","crv":"secp256k1","x":"…","y":"…"}', ethereumAddress: "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed", description: "Hot wallet for supplier payouts", createTime: ts(-15 * 24 * H), createActor: human("sam@northwind.example") } as SigningKey,
  { $typeName: "vaultguard.v1.SigningKey", id: id("key", "ed"), name: "release-signing", algorithm: KeyAlgorithm.ED25519, state: SigningKeyState.ENABLED, publicKey: new Uint8Array(32), publicKeyPem: "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEA…\n-----END PUBLIC KEY-----", publicKeyJwk: '{"kty":"OKP","crv":"Ed25519","x":"…"}', ethereumAddress: "", description: "", createTime: ts(-60 * 24 * H), createActor: human("sam@northwind.example") } as SigningKey,
];
let webhook: Record<string, unknown> | null = { url: "https://approvals.northwind.example/vaultguard", secretSet: true, updateTime: ts(-4 * 24 * H), lastSuccessTime: ts(-20 * MIN), lastFailureTime: ts(-3 * H), lastFailureReason: "HTTP 503" };

// ---- queue events ------------------------------------------------------------------

let cursor = 1000;
const queueWatchers = new Set<(type: PendingStepUpEventType, s: StepUp) => void>();
function queueChange(type: PendingStepUpEventType, s: StepUp) {
  cursor++;
  for (const w of queueWatchers) w(type, s);
}

// ---- errors -------------------------------------------------------------------------

class RpcError extends Error {
  constructor(readonly code: number, message: string, readonly details: Uint8Array[] = []) {
    super(message);
  }
}
function errorInfo(code: number, reason: string, metadata: Record<string, string> = {}, message = reason) {
  const status = create(StatusSchema, {
    code,
    message,
    details: [anyPack(ErrorInfoSchema, create(ErrorInfoSchema, { reason: `ERROR_REASON_${reason}`, domain: "vaultguard.dev", metadata }))],
  });
  return new RpcError(code, message, [toBinary(StatusSchema, status)]);
}
function badRequest(violations: Array<[string, string]>) {
  const status = create(StatusSchema, {
    code: 3,
    message: "invalid argument",
    details: [anyPack(BadRequestSchema, create(BadRequestSchema, { fieldViolations: violations.map(([field, description]) => ({ field, description })) }))],
  });
  return new RpcError(3, "invalid argument", [toBinary(StatusSchema, status)]);
}
const notFound = () => errorInfo(5, "UNSPECIFIED", {}, "not found");

// ---- handlers -------------------------------------------------------------------------

type Init = Record<string, unknown>;
interface Stream {
  send(msg: Init): void;
  closed: Promise<void>;
}
type Unary = (req: any) => Init | Promise<Init>;
type Streaming = (req: any, s: Stream) => Promise<void>;

const page = <T,>(items: T[], req: any): [T[], Init] => {
  const size = req.page?.pageSize || 50;
  const start = Number(req.page?.pageToken || 0);
  const next = start + size < items.length ? String(start + size) : "";
  return [items.slice(start, start + size), { nextPageToken: next }];
};
const me = () => human(session?.subject ?? "alex@northwind.example");

const unary: Record<string, Unary> = {
  "StepUpService/GetStepUp": (r) => {
    const s = stepUps.get(r.stepUpId) ?? ended.get(r.stepUpId);
    if (!s) throw notFound();
    return { stepUp: s };
  },
  "StepUpService/ApproveStepUp": (r) => {
    const s = stepUps.get(r.stepUpId);
    if (!s) {
      const e = ended.get(r.stepUpId);
      if (e) throw errorInfo(9, "INVALID_STATE", { state: StepUpState[e.state] ? `STEP_UP_STATE_${StepUpState[e.state]}` : "" });
      throw notFound();
    }
    if (s.requestingTenantId === ME && s.requestingAgentId.includes(hex("agtxx"))) throw errorInfo(7, "SELF_APPROVAL");
    if (r.requestHash !== s.requestHash) throw errorInfo(9, "INVALID_STATE", { state: "request_hash_mismatch" });
    if (!s.approvals.some((a) => a.approver?.subject === me().subject)) {
      s.approvals.push({ $typeName: "vaultguard.v1.Approval", approver: me(), approveTime: timestampFromMs(Date.now()), comment: r.comment });
    }
    record("step_up.approval_recorded", me(), [s.stepUpId, s.delegationId], AuditOutcome.SUCCESS, { comment: r.comment });
    if (s.approvals.length >= Math.max(1, s.approvalsRequired)) {
      s.state = StepUpState.APPROVED;
      s.endTime = timestampFromMs(Date.now());
      stepUps.delete(s.stepUpId);
      ended.set(s.stepUpId, s);
      queueChange(PendingStepUpEventType.REMOVED, s);
      record("step_up.approved", me(), [s.stepUpId, s.delegationId], AuditOutcome.SUCCESS, {});
    } else {
      queueChange(PendingStepUpEventType.UPDATED, s);
    }
    return { stepUp: s, decision: s.decision };
  },
  "StepUpService/DenyStepUp": (r) => {
    const s = stepUps.get(r.stepUpId);
    if (!s) throw ended.has(r.stepUpId) ? errorInfo(9, "INVALID_STATE", { state: "STEP_UP_STATE_DENIED" }) : notFound();
    s.state = StepUpState.DENIED;
    s.deniedBy = me();
    s.denyReason = r.reason;
    s.endTime = timestampFromMs(Date.now());
    stepUps.delete(s.stepUpId);
    ended.set(s.stepUpId, s);
    queueChange(PendingStepUpEventType.REMOVED, s);
    record("step_up.denied", me(), [s.stepUpId, s.delegationId], AuditOutcome.DENIED, { reason: r.reason });
    return { stepUp: s };
  },
  "StepUpService/GetApprovalWebhook": () => {
    if (!webhook) throw notFound();
    return { webhook };
  },
  "StepUpService/SetApprovalWebhook": (r) => {
    if (!r.url) {
      webhook = null;
      return {};
    }
    if (!String(r.url).startsWith("https://")) throw badRequest([["url", "must be an absolute https URL"]]);
    webhook = { url: r.url, secretSet: true, updateTime: timestampFromMs(Date.now()) };
    return { webhook, signingSecret: "whsec_" + randomBytes(32).toString("base64url") };
  },
  "DelegationService/ListDelegations": (r) => {
    let list = delegations.filter((d) => d.requestingTenantId === ME || d.receivingTenantId === ME);
    if (r.side === DelegationSide.RECEIVING) list = list.filter((d) => d.receivingTenantId === ME);
    if (r.side === DelegationSide.REQUESTING) list = list.filter((d) => d.requestingTenantId === ME);
    if (r.statuses?.length) list = list.filter((d) => r.statuses.includes(d.status));
    if (r.action) list = list.filter((d) => d.action === r.action);
    if (r.counterpartTenantId) {
      if (!/^tnt_[0-9a-f]{32}$/.test(r.counterpartTenantId)) throw badRequest([["counterpart_tenant_id", "must be a tenant id (tnt_ followed by 32 hex digits)"]]);
      list = list.filter((d) => d.requestingTenantId === r.counterpartTenantId || d.receivingTenantId === r.counterpartTenantId);
    }
    const [items, p] = page(list, r);
    return { delegations: items, page: p };
  },
  "DelegationService/GetDelegation": (r) => {
    const d = delegations.find((x) => x.id === r.delegationId);
    if (!d) throw notFound();
    return { delegation: d };
  },
  "DelegationService/RevokeDelegation": (r) => {
    const d = delegations.find((x) => x.id === r.delegationId);
    if (!d) throw notFound();
    if (!r.reason) throw badRequest([["reason", "is required (1 to 512 characters)"]]);
    if (d.status !== DelegationStatus.ACTIVE) throw errorInfo(9, "INVALID_STATE", { state: `DELEGATION_STATUS_${DelegationStatus[d.status]}` });
    d.status = DelegationStatus.REVOKED;
    d.endReason = r.reason;
    d.endedBy = me();
    d.endTime = timestampFromMs(Date.now());
    record("delegation.revoked", me(), [d.id], AuditOutcome.SUCCESS, { reason: r.reason });
    return { delegation: d };
  },
  "AuditService/ListAuditEvents": (r) => {
    let list = [...audit];
    if (r.eventTypes?.length) list = list.filter((e) => r.eventTypes.some((t: string) => (t.endsWith(".*") ? e.eventType.startsWith(t.slice(0, -1)) : e.eventType === t)));
    if (r.outcome) list = list.filter((e) => e.outcome === r.outcome);
    if (r.actorSubject) list = list.filter((e) => e.actor?.subject === r.actorSubject);
    if (r.subjectId) list = list.filter((e) => e.subjectIds.includes(r.subjectId));
    if (r.order !== 1) list.reverse();
    const [items, p] = page(list, r);
    return { events: items, page: p };
  },
  "AuditService/VerifyAuditChain": () => {
    const head = audit[audit.length - 1]!;
    const enc = (o: unknown) => Buffer.from(JSON.stringify(o)).toString("base64url");
    const receipt = `${enc({ alg: "RS256", kid: "vg-2026-01", typ: "vaultguard-audit-receipt+jwt" })}.${enc({ iss: `http://localhost:${PORT}`, tenant_id: ME, head_sequence: Number(head.sequence), head_hash: head.hash, time: new Date().toISOString() })}.${randomBytes(64).toString("base64url")}`;
    return { ok: true, checkedCount: head.sequence, unsealedCount: 0n, headSequence: head.sequence, headHash: head.hash, receipt, verifyTime: timestampFromMs(Date.now()) };
  },
  "AgentService/ListAgents": (r) => {
    const [items, p] = page(agents, r);
    return { agents: items, page: p };
  },
  "AgentService/CreateAgent": (r) => {
    if (!/^[a-z][a-z0-9-]{2,62}$/.test(r.name)) throw badRequest([["name", "must be 3 to 63 characters of [a-z0-9-], starting with a letter"]]);
    if (agents.some((a) => a.name === r.name)) throw errorInfo(6, "UNSPECIFIED", {}, "an agent with this name exists");
    const a: Agent = { $typeName: "vaultguard.v1.Agent", id: id("agt", r.name + Date.now()), tenantId: ME, name: r.name, description: r.description, status: AgentStatus.ACTIVE, createTime: timestampFromMs(Date.now()), updateTime: timestampFromMs(Date.now()), secretRotateTime: timestampFromMs(Date.now()) };
    agents.push(a);
    return { agent: a, clientSecret: "vgs_" + randomBytes(32).toString("base64url") };
  },
  "AgentService/DisableAgent": (r) => {
    const a = agents.find((x) => x.id === r.agentId);
    if (!a) throw notFound();
    a.status = AgentStatus.DISABLED;
    return { agent: a };
  },
  "AgentService/EnableAgent": (r) => {
    const a = agents.find((x) => x.id === r.agentId);
    if (!a) throw notFound();
    a.status = AgentStatus.ACTIVE;
    return { agent: a };
  },
  "AgentService/RotateAgentSecret": (r) => {
    const a = agents.find((x) => x.id === r.agentId);
    if (!a) throw notFound();
    a.secretRotateTime = timestampFromMs(Date.now());
    return { agent: a, clientSecret: "vgs_" + randomBytes(32).toString("base64url") };
  },
  "PolicyService/ListRules": (r) => {
    const [items, p] = page(rules, r);
    return { rules: items, policyVersion, page: p };
  },
  "PolicyService/GetRule": (r) => {
    const x = rules.find((y) => y.id === r.ruleId);
    if (!x) throw notFound();
    return { rule: x };
  },
  "PolicyService/CreateRule": (r) => {
    const v: Array<[string, string]> = [];
    if (!/^([a-z0-9_:-]{1,64}\.)*([a-z0-9_:-]{1,64}|\*)$/.test(r.rule.actionPattern)) v.push(["rule.action_pattern", "segments of [a-z0-9_:-] separated by dots; only the last may be *"]);
    if (r.rule.counterpartTenantId && !/^tnt_[0-9a-f]{32}$/.test(r.rule.counterpartTenantId)) v.push(["rule.counterpart_tenant_id", "names no tenant"]);
    r.rule.conditions.forEach((c: any, i: number) => {
      if (!/^[a-z][a-z0-9_]{0,63}$/.test(c.attribute)) v.push([`rule.conditions[${i}].attribute`, "1 to 64 characters of [a-z][a-z0-9_]*"]);
    });
    if (v.length) throw badRequest(v);
    policyVersion++;
    const x = rule("new" + Date.now(), { ...r.rule, id: id("rul", "n" + Date.now()), version: 1n });
    rules.push(x);
    return { rule: x, policyVersion };
  },
  "PolicyService/UpdateRule": (r) => {
    const i = rules.findIndex((y) => y.id === r.rule.id);
    if (i < 0) throw notFound();
    if (rules[i]!.version !== r.expectedVersion) throw errorInfo(9, "INVALID_STATE", { state: "version_mismatch", current_version: String(rules[i]!.version) });
    policyVersion++;
    rules[i] = rule(r.rule.id, { ...r.rule, version: rules[i]!.version + 1n });
    return { rule: rules[i], policyVersion };
  },
  "PolicyService/DeleteRule": (r) => {
    const i = rules.findIndex((y) => y.id === r.ruleId);
    if (i < 0) throw notFound();
    rules.splice(i, 1);
    policyVersion++;
    return { policyVersion };
  },
  "PolicyService/GetPolicySettings": () => ({ settings: { outboundDefault: OutboundDefault.ALLOW, policyVersion } }),
  "PolicyService/UpdatePolicySettings": (r) => {
    policyVersion++;
    return { settings: { outboundDefault: r.outboundDefault, policyVersion } };
  },
  "PolicyService/EvaluatePolicy": (r) => {
    if (!r.requestingAgentId) throw badRequest([["requesting_agent_id", "is required for an admin"]]);
    if (!r.action) throw badRequest([["action", "is required"]]);
    const amount = r.context?.amount?.kind?.value ?? 0;
    const outcome = r.action.startsWith("hr.") ? Decision.BLOCK : amount > 1000 ? Decision.STEP_UP : Decision.ALLOW;
    return { decision: decision(ME, outcome, `dry run: amount ${amount} → ${Decision[outcome]}`, 2) };
  },
  "VaultService/ListOAuthProviders": () => ({ providers }),
  "VaultService/ListConnections": () => ({ connections }),
  "VaultService/StartConnection": (r) => {
    const c = connections.find((x) => x.id === r.connectionId);
    return { connection: c, authorizeUrl: `http://localhost:${PORT}/dev/provider?state=${randomBytes(8).toString("hex")}`, expireTime: timestampFromMs(Date.now() + 10 * MIN) };
  },
  "VaultService/ListSigningKeys": () => ({ keys }),
  "VaultService/CreateSigningKey": (r) => {
    if (!/^[a-z][a-z0-9-]{0,63}$/.test(r.name)) throw badRequest([["name", "1 to 64 characters of [a-z0-9-], starting with a letter"]]);
    const k = { ...keys[1]!, id: id("key", r.name), name: r.name, algorithm: r.algorithm, description: r.description, ethereumAddress: r.algorithm === KeyAlgorithm.SECP256K1 ? "0xfB6916095ca1df60bB79Ce92cE3Ea74c37c5d359" : "" } as SigningKey;
    keys.push(k);
    return { key: k };
  },
  "VaultService/DisableSigningKey": (r) => {
    const k = keys.find((x) => x.id === r.keyId);
    if (!k) throw notFound();
    k.state = SigningKeyState.DISABLED;
    k.disableTime = timestampFromMs(Date.now());
    k.disableActor = me();
    return { key: k };
  },
};
const ended = new Map<string, StepUp>();

const streaming: Record<string, Streaming> = {
  "StepUpService/WatchPendingStepUps": async (r, s) => {
    if (!r.cursor) {
      for (const x of [...stepUps.values()]) s.send({ cursor: String(cursor), event: { case: "change", value: { eventType: PendingStepUpEventType.ADDED, stepUp: x } } });
    }
    s.send({ cursor: String(cursor), event: { case: "heartbeat", value: { time: timestampFromMs(Date.now()) } } });
    const w = (type: PendingStepUpEventType, x: StepUp) => s.send({ cursor: String(cursor), event: { case: "change", value: { eventType: type, stepUp: x } } });
    queueWatchers.add(w);
    const hb = setInterval(() => s.send({ cursor: String(cursor), event: { case: "heartbeat", value: { time: timestampFromMs(Date.now()) } } }), (r.heartbeatIntervalSeconds || 15) * 1000);
    await s.closed;
    clearInterval(hb);
    queueWatchers.delete(w);
  },
  "AuditService/TailAuditEvents": async (r, s) => {
    let after = r.startAtHead ? audit.length : Number(r.afterSequence);
    for (const e of audit.slice(after)) s.send({ sequence: e.sequence, item: { case: "event", value: e } });
    after = audit.length;
    const l = (e: AuditEvent) => s.send({ sequence: e.sequence, item: { case: "event", value: e } });
    tailers.add(l);
    const hb = setInterval(() => s.send({ sequence: BigInt(audit.length), item: { case: "heartbeat", value: { time: timestampFromMs(Date.now()) } } }), 15_000);
    await s.closed;
    clearInterval(hb);
    tailers.delete(l);
  },
  "AuditService/ExportAuditEvents": async (r, s) => {
    const csv = r.format === ExportFormat.CSV;
    const lines = audit.map((e) => (csv ? `${e.tenantId},${e.sequence},${e.eventId},${e.eventType}\r\n` : JSON.stringify({ sequence: String(e.sequence), event_type: e.eventType }) + "\n"));
    const body = Buffer.from((csv ? "tenant_id,sequence,event_id,event_type\r\n" : "") + lines.join(""));
    for (let i = 0; i < body.length; i += 1024) s.send({ part: { case: "data", value: body.subarray(i, i + 1024) } });
    s.send({ part: { case: "summary", value: { eventCount: BigInt(audit.length), firstSequence: 1n, lastSequence: BigInt(audit.length), byteCount: BigInt(body.length), sha256: createHash("sha256").update(body).digest("hex") } } });
  },
};

// ---- gRPC-Web plumbing ---------------------------------------------------------------

const services: DescService[] = [StepUpService, DelegationService, AuditService, AgentService, PolicyService, VaultService];
function findMethod(path: string) {
  const m = /^\/vaultguard\.v1\.(\w+)\/(\w+)$/.exec(path);
  if (!m) return null;
  const svc = services.find((s) => s.name === m[1]);
  const method = svc?.methods.find((x) => x.name === m[2]);
  return method ? { key: `${m[1]}/${m[2]}`, method } : null;
}

function frame(flag: number, payload: Uint8Array): Buffer {
  const head = Buffer.alloc(5);
  head[0] = flag;
  head.writeUInt32BE(payload.length, 1);
  return Buffer.concat([head, Buffer.from(payload)]);
}
function trailer(code: number, message = "", details?: Uint8Array): Buffer {
  let t = `grpc-status: ${code}\r\ngrpc-message: ${encodeURIComponent(message)}\r\n`;
  if (details) t += `grpc-status-details-bin: ${Buffer.from(details).toString("base64")}\r\n`;
  return frame(0x80, Buffer.from(t));
}

async function body(req: IncomingMessage): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const c of req) chunks.push(c as Buffer);
  return Buffer.concat(chunks);
}

let session: { subject: string; token: string; tokenExp: number } | null = null;
let sessionEnded = false;

async function grpcWeb(req: IncomingMessage, res: ServerResponse, path: string) {
  const found = findMethod(path);
  const raw = await body(req);
  res.writeHead(200, { "content-type": "application/grpc-web+proto", "cache-control": "no-store" });
  const fail = (e: unknown) => {
    if (e instanceof RpcError) res.end(trailer(e.code, e.message, e.details[0]));
    else {
      console.error(e);
      res.end(trailer(13, "internal"));
    }
  };
  if (!found) return res.end(trailer(12, "unimplemented"));
  const auth = req.headers["authorization"];
  if (!session || sessionEnded || auth !== `Bearer ${session.token}` || Date.now() > session.tokenExp) {
    return fail(errorInfo(16, "UNAUTHENTICATED", {}, "unauthenticated"));
  }
  const input = fromBinary(found.method.input as DescMessage, raw.subarray(5, 5 + raw.readUInt32BE(1)));
  const out = found.method.output as DescMessage;
  const encode = (m: Init) => frame(0, toBinary(out, create(out, m as never) as MessageShape<DescMessage>));
  await new Promise((r) => setTimeout(r, 120 + Math.random() * 200));
  try {
    if (found.method.methodKind === "unary") {
      const handler = unary[found.key];
      if (!handler) return res.end(trailer(12, "not in the mock"));
      const result = await handler(input);
      res.write(encode(result));
      res.end(trailer(0));
      return;
    }
    const handler = streaming[found.key];
    if (!handler) return res.end(trailer(12, "not in the mock"));
    let closed = false;
    const done = new Promise<void>((resolve) => {
      res.on("close", () => {
        closed = true;
        resolve();
      });
    });
    await handler(input, {
      send: (m) => {
        if (!closed) res.write(encode(m));
      },
      closed: found.key.endsWith("ExportAuditEvents") ? Promise.resolve() : done,
    });
    if (!closed) res.end(trailer(0));
  } catch (e) {
    fail(e);
  }
}

// ---- HTTP -------------------------------------------------------------------------------

const TYPES: Record<string, string> = { js: "text/javascript; charset=utf-8", css: "text/css; charset=utf-8", html: "text/html; charset=utf-8" };
function headers(res: ServerResponse, type: string, cache = "no-store") {
  res.setHeader("Content-Security-Policy", CSP);
  res.setHeader("X-Content-Type-Options", "nosniff");
  res.setHeader("Referrer-Policy", "no-referrer");
  res.setHeader("X-Frame-Options", "DENY");
  res.setHeader("Cache-Control", cache);
  res.setHeader("Content-Type", type);
}
function json(res: ServerResponse, status: number, value: unknown) {
  headers(res, "application/json");
  res.statusCode = status;
  res.end(JSON.stringify(value));
}
function startSession(subject: string) {
  session = { subject, token: randomBytes(16).toString("hex"), tokenExp: 0 };
  sessionEnded = false;
}
const csrf = (req: IncomingMessage) => req.method === "POST" && req.headers["x-vaultguard-csrf"] === "1";

const server = createServer(async (req, res) => {
  const url = new URL(req.url ?? "/", `http://${req.headers.host}`);
  const p = url.pathname;
  try {
    if (req.method === "POST" && p.startsWith("/vaultguard.v1.")) return await grpcWeb(req, res, p);
    if (p === "/console/api/issuers") return json(res, 200, { issuers: [{ index: 0, display_name: "Northwind SSO (Okta)" }] });
    if (p === "/console/api/me") {
      if (!session || sessionEnded) return json(res, 401, { error: "no session" });
      return json(res, 200, { tenant_id: ME, tenant_name: "Northwind Logistics", subject: session.subject, roles, expires_at: new Date(Date.now() + 8 * H).toISOString(), issuers: [] });
    }
    if (p === "/console/api/token") {
      if (!csrf(req)) return json(res, 403, { error: "csrf" });
      if (!session || sessionEnded) return json(res, 401, { error: "no session" });
      session.token = randomBytes(16).toString("hex");
      session.tokenExp = Date.now() + 600_000;
      return json(res, 200, { access_token: session.token, token_type: "Bearer", expires_in: 600 });
    }
    if (p === "/console/api/link") {
      if (!csrf(req)) return json(res, 403, { error: "csrf" });
      const b = JSON.parse((await body(req)).toString() || "{}") as { secret?: string };
      if (b.secret !== "demo") return json(res, 401, { error: "invalid link" });
      startSession("alex@northwind.example");
      return json(res, 200, {});
    }
    if (p === "/console/api/logout") {
      if (!csrf(req)) return json(res, 403, { error: "csrf" });
      session = null;
      return json(res, 200, {});
    }
    if (p === "/console/login") {
      startSession("alex@northwind.example");
      res.writeHead(303, { location: "/console/" });
      return res.end();
    }
    // Dev controls: switch roles, end the session, add a request to the queue.
    if (p === "/dev/roles") {
      roles = (url.searchParams.get("set") ?? "admin").split(",");
      return json(res, 200, { roles });
    }
    if (p === "/dev/expire") {
      sessionEnded = true;
      return json(res, 200, { ended: true });
    }
    if (p === "/dev/signin") {
      startSession(url.searchParams.get("subject") ?? "alex@northwind.example");
      return json(res, 200, { ok: true });
    }
    if (p === "/dev/step-up") {
      const s = makeStepUp("live" + Date.now(), { action: "stock.write", requestingTenantId: ACME, ageMin: 0, ttlMin: 10, bindingMessage: url.searchParams.get("message") ?? "Urgent restock: 300 units of NW-1002", context: { amount: num(1500) } });
      stepUps.set(s.stepUpId, s);
      queueChange(PendingStepUpEventType.ADDED, s);
      return json(res, 200, { stepUpId: s.stepUpId });
    }
    if (p === "/dev/change") {
      const s = stepUps.get(url.searchParams.get("id") ?? "");
      if (!s) return json(res, 404, {});
      s.requestHash = hex(s.requestHash + "x", 64);
      s.bindingMessage += " (amended)";
      queueChange(PendingStepUpEventType.UPDATED, s);
      return json(res, 200, {});
    }
    if (p === "/dev/provider") {
      headers(res, TYPES["html"]!);
      return res.end("<!doctype html><title>Provider</title><p>The provider's sign-in page would be here.</p>");
    }
    if (p.startsWith("/console/assets/")) {
      const name = p.slice("/console/assets/".length);
      if (!/^[a-z]+\.(js|css)$/.test(name)) return json(res, 404, {});
      const file = await readFile(join(DIST, name));
      headers(res, TYPES[name.split(".").pop()!]!, "no-cache");
      return res.end(file);
    }
    if (p === "/console" || p.startsWith("/console/")) {
      headers(res, TYPES["html"]!);
      return res.end(await readFile(join(DIST, "index.html")));
    }
    res.writeHead(302, { location: "/console/" });
    res.end();
  } catch (e) {
    console.error(e);
    if (!res.headersSent) json(res, 500, { error: "mock failure" });
  }
});
server.listen(PORT, "127.0.0.1", () => {
  console.log(`mock VaultGuard console on http://127.0.0.1:${PORT}/console/ (roles: ${roles.join(",")}); one-time link: /console/link#demo`);
});
