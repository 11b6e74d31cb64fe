// A VaultGuard agent in TypeScript, on the generated @grpc/grpc-js stubs
// (ts-proto). The Node twin of examples/python-agent/agent.py, same flags,
// same output.
//
// It authenticates with its client credentials (AuthService/IssueToken),
// asks the receiving tenant for one delegation per action (RequestDelegation,
// with an idempotency key, replayed once to show retries are safe), and
// handles the three policy outcomes:
//
//   ALLOW    the response carries a signed delegation token; the agent
//            presents it to the receiving tenant's resource server, which
//            verifies it offline against VaultGuard's JWKS (resource-server.ts,
//            jose).
//   STEP_UP  a human of the receiving tenant must approve: the agent STREAMS
//            StepUpService/WatchStepUp and gets the token in the APPROVED
//            event; if the stream is unavailable it falls back to CIBA polling
//            (PollStepUp), honouring `interval` and `slow_down`.
//   BLOCK    RequestDelegation fails with PERMISSION_DENIED; the agent reads
//            the google.rpc.ErrorInfo reason from the status details
//            (`grpc-status-details-bin`).
//
// Each `--expect ACTION=OUTCOME` names an action and the outcome the agent
// must see; it exits 0 only if every one happened (and every token was
// accepted by the resource server), 1 otherwise.
//
// Build and run (stubs from scripts/gen-stubs.sh):
//   npx tsc -p examples/node-agent && node examples/node-agent/dist/agent.js --help

import { randomUUID } from "node:crypto";
import {
  type CallOptions,
  type ClientUnaryCall,
  credentials,
  Metadata,
  type ServiceError,
  status as Code,
} from "@grpc/grpc-js";
import { BinaryReader } from "@bufbuild/protobuf/wire";
import { AuthServiceClient, IssueTokenRequest } from "./gen/vaultguard/v1/auth_service";
import { ErrorReason, errorReasonToJSON } from "./gen/vaultguard/v1/common";
import {
  DelegationServiceClient,
  RequestDelegationRequest,
  type RequestDelegationResponse,
  type StepUpChallenge,
} from "./gen/vaultguard/v1/delegation_service";
import {
  PollStepUpRequest,
  StepUpServiceClient,
  StepUpState,
  stepUpStateToJSON,
  WatchStepUpRequest,
} from "./gen/vaultguard/v1/step_up_service";
import * as resourceServer from "./resource-server";

const OUTCOMES = ["ALLOW", "STEP_UP", "BLOCK"] as const;
type Outcome = (typeof OUTCOMES)[number];
const ERROR_DOMAIN = "vaultguard.dev";
const ERROR_INFO_TYPE = "type.googleapis.com/google.rpc.ErrorInfo";

function say(...parts: unknown[]): void {
  console.log(parts.join(" "));
}

const sleep = (seconds: number) => new Promise((resolve) => setTimeout(resolve, seconds * 1000));

// --- calls ------------------------------------------------------------------

type Unary<Req, Res> = (
  request: Req,
  metadata: Metadata,
  options: Partial<CallOptions>,
  callback: (error: ServiceError | null, response: Res) => void,
) => ClientUnaryCall;

/** A unary call as a promise, with a 10 s deadline. */
function unary<Req, Res>(method: Unary<Req, Res>, request: Req, metadata = new Metadata()): Promise<Res> {
  return new Promise((resolve, reject) =>
    method(request, metadata, { deadline: Date.now() + 10_000 }, (error, response) =>
      error ? reject(error) : resolve(response),
    ),
  );
}

function isServiceError(err: unknown): err is ServiceError {
  return typeof err === "object" && err !== null && "code" in err && "metadata" in err;
}

/**
 * The ErrorInfo reason and metadata of a failed call ("" if none), decoded
 * from the google.rpc.Status in the `grpc-status-details-bin` trailer:
 * Status{3: repeated Any{1: type_url, 2: value}}, ErrorInfo{1: reason,
 * 2: domain, 3: map<string, string> metadata}.
 */
function errorInfo(err: ServiceError): { reason: string; metadata: Record<string, string> } {
  const raw = err.metadata?.get("grpc-status-details-bin")?.[0];
  if (!raw || typeof raw === "string") return { reason: "", metadata: {} };
  const status = new BinaryReader(raw);
  while (status.pos < status.len) {
    const [field, wire] = status.tag();
    if (field !== 3) {
      status.skip(wire);
      continue;
    }
    const any = new BinaryReader(status.bytes());
    let typeUrl = "";
    let value: Uint8Array = new Uint8Array();
    while (any.pos < any.len) {
      const [f, w] = any.tag();
      if (f === 1) typeUrl = any.string();
      else if (f === 2) value = any.bytes();
      else any.skip(w);
    }
    if (typeUrl !== ERROR_INFO_TYPE) continue;
    const info = new BinaryReader(value);
    let reason = "";
    let domain = "";
    const metadata: Record<string, string> = {};
    while (info.pos < info.len) {
      const [f, w] = info.tag();
      if (f === 1) reason = info.string();
      else if (f === 2) domain = info.string();
      else if (f === 3) {
        const entry = new BinaryReader(info.bytes());
        let key = "";
        let val = "";
        while (entry.pos < entry.len) {
          const [ef, ew] = entry.tag();
          if (ef === 1) key = entry.string();
          else if (ef === 2) val = entry.string();
          else entry.skip(ew);
        }
        metadata[key] = val;
      } else info.skip(w);
    }
    if (domain === ERROR_DOMAIN) return { reason, metadata };
  }
  return { reason: "", metadata: {} };
}

const reasonName = (reason: ErrorReason) => errorReasonToJSON(reason);
const codeName = (code: number) => Code[code] ?? String(code);

// --- configuration ----------------------------------------------------------

interface Config {
  server: string;
  clientId: string;
  clientSecret: string;
  receivingTenant: string;
  issuer: string;
  jwksUrl?: string;
  resourceUrl?: string;
  expect: [string, Outcome][];
  pollOnly: boolean;
  timeout: number;
  runId: string;
}

const USAGE = `usage: agent.js --client-id agt_… --client-secret vgs_… --receiving-tenant tnt_… --expect ACTION=ALLOW|STEP_UP|BLOCK…
  --server ADDR          gRPC address [VG_GRPC, default 127.0.0.1:50051]
  --client-id ID         agent id [VG_CLIENT_ID]
  --client-secret S      agent secret [VG_CLIENT_SECRET]
  --receiving-tenant ID  tenant asked for delegations [VG_RECEIVING_TENANT]
  --issuer URL           VaultGuard's token issuer, its HTTP base URL [VG_ISSUER, default http://127.0.0.1:8080]
  --jwks-url URL         default <issuer>/.well-known/jwks.json [VG_JWKS_URL]
  --resource-url URL     a running resource-server.js; default: start one in-process [VG_RESOURCE_URL]
  --expect ACTION=OUTCOME  an action and the outcome it must get (repeatable)
  --poll-only            skip the watch stream; wait by CIBA polling only
  --timeout SECONDS      longest wait for a step-up decision [120]
  --run-id ID            prefix of the idempotency keys [VG_RUN_ID, default random]`;

function usage(problem: string): never {
  console.error(`${problem}\n${USAGE}`);
  process.exit(2);
}

function parseArgs(argv: string[]): Config {
  const env = process.env;
  const values: Record<string, string | undefined> = {
    server: env.VG_GRPC ?? "127.0.0.1:50051",
    "client-id": env.VG_CLIENT_ID,
    "client-secret": env.VG_CLIENT_SECRET,
    "receiving-tenant": env.VG_RECEIVING_TENANT,
    issuer: env.VG_ISSUER ?? "http://127.0.0.1:8080",
    "jwks-url": env.VG_JWKS_URL,
    "resource-url": env.VG_RESOURCE_URL,
    timeout: "120",
    "run-id": env.VG_RUN_ID,
  };
  const expect: [string, Outcome][] = [];
  let pollOnly = false;
  for (let i = 0; i < argv.length; i++) {
    const flag = argv[i];
    if (flag === "--help" || flag === "-h") {
      console.log(USAGE);
      process.exit(0);
    }
    if (flag === "--poll-only") {
      pollOnly = true;
      continue;
    }
    const name = flag.startsWith("--") ? flag.slice(2) : "";
    const value = argv[++i];
    if (value === undefined) usage(`${flag} needs a value`);
    if (name === "expect") {
      const [action, outcome] = value.split("=", 2);
      if (!action || !OUTCOMES.includes(outcome?.toUpperCase() as Outcome)) {
        usage(`expected ACTION=ALLOW|STEP_UP|BLOCK, got ${value}`);
      }
      expect.push([action, outcome.toUpperCase() as Outcome]);
    } else if (name in values) {
      values[name] = value;
    } else {
      usage(`unknown flag ${flag}`);
    }
  }
  const missing = ["client-id", "client-secret", "receiving-tenant"].filter((k) => !values[k]);
  if (missing.length || !expect.length) usage(`missing: ${missing.map((m) => `--${m}`).join(", ") || "--expect"}`);
  return {
    server: values.server!,
    clientId: values["client-id"]!,
    clientSecret: values["client-secret"]!,
    receivingTenant: values["receiving-tenant"]!,
    issuer: values.issuer!,
    jwksUrl: values["jwks-url"],
    resourceUrl: values["resource-url"],
    expect,
    pollOnly,
    timeout: Number(values.timeout),
    runId: values["run-id"] || randomUUID().replace(/-/g, "").slice(0, 12),
  };
}

// --- the agent --------------------------------------------------------------

/** Client-credentials access token, re-issued shortly before it expires. */
class Session {
  private token = "";
  private renewAt = 0;

  constructor(
    private readonly auth: AuthServiceClient,
    private readonly clientId: string,
    private readonly clientSecret: string,
  ) {}

  async metadata(): Promise<Metadata> {
    if (Date.now() >= this.renewAt) {
      const issued = await unary(
        this.auth.issueToken.bind(this.auth),
        IssueTokenRequest.fromPartial({
          grantType: "client_credentials",
          clientId: this.clientId,
          clientSecret: this.clientSecret,
        }),
      );
      this.token = issued.accessToken;
      this.renewAt = Date.now() + Math.max(issued.expiresIn - 30, issued.expiresIn / 2) * 1000;
    }
    const metadata = new Metadata();
    metadata.set("authorization", `Bearer ${this.token}`);
    return metadata;
  }
}

class Agent {
  private readonly session: Session;
  private readonly delegations: DelegationServiceClient;
  private readonly stepUps: StepUpServiceClient;

  constructor(
    private readonly config: Config,
    private readonly resourceUrl: string,
  ) {
    const insecure = credentials.createInsecure();
    this.session = new Session(new AuthServiceClient(config.server, insecure), config.clientId, config.clientSecret);
    this.delegations = new DelegationServiceClient(config.server, insecure);
    this.stepUps = new StepUpServiceClient(config.server, insecure);
  }

  private async request(action: string): Promise<RequestDelegationResponse> {
    return unary(
      this.delegations.requestDelegation.bind(this.delegations),
      RequestDelegationRequest.fromPartial({
        receivingTenantId: this.config.receivingTenant,
        action,
        requestedTtlSeconds: 300,
        // The same key on a retry returns the same delegation (and never
        // asks a human twice).
        idempotencyKey: `node-${this.config.runId}.${action}`,
        bindingMessage: `node agent ${this.config.runId}: ${action}`,
      }),
      await this.session.metadata(),
    );
  }

  /** Requests `action`; returns the outcome it saw, with "!" appended when
   * the outcome was right but its follow-up failed. */
  async run(action: string): Promise<string> {
    let response: RequestDelegationResponse;
    try {
      response = await this.request(action);
    } catch (err) {
      if (!isServiceError(err)) throw err;
      const { reason, metadata } = errorInfo(err);
      const blocked = [ErrorReason.ERROR_REASON_POLICY_BLOCKED, ErrorReason.ERROR_REASON_NO_MATCHING_RULE].map(reasonName);
      if (err.code === Code.PERMISSION_DENIED && blocked.includes(reason)) {
        say("BLOCK", action, `reason=${reason}`, `delegation=${metadata.delegation_id ?? ""}`);
        return "BLOCK";
      }
      say("ERROR", action, `code=${codeName(err.code)}`, `reason=${reason || "-"}`, `message=${err.details}`);
      return "ERROR";
    }
    if (response.allowed) {
      const grant = response.allowed;
      const replay = await this.request(action); // a retry with the same key
      const same = replay.allowed?.delegation?.id === grant.delegation?.id;
      const ok = await this.use(
        action,
        grant.token,
        `ALLOW ${action} delegation=${grant.delegation?.id} replay=${same ? "same" : "DIFFERENT"}`,
      );
      return ok && same ? "ALLOW" : "ALLOW!";
    }
    if (response.stepUp) {
      const challenge = response.stepUp;
      say("STEP_UP", action, "pending", `step_up=${challenge.delegation?.stepUpId}`, `interval=${challenge.interval}`);
      const [token, via] = await this.wait(action, challenge);
      if (!token) {
        say("STEP_UP", action, `not-approved via=${via}`);
        return "STEP_UP!";
      }
      const ok = await this.use(action, token, `STEP_UP ${action} approved via=${via} delegation=${challenge.delegation?.id}`);
      return ok ? "STEP_UP" : "STEP_UP!";
    }
    say("ERROR", action, "response without outcome");
    return "ERROR";
  }

  /** Waits for the human decision: the token and how it came ("" when
   * denied or expired). */
  private async wait(action: string, challenge: StepUpChallenge): Promise<[string, string]> {
    const seconds = Math.min(challenge.expiresIn || this.config.timeout, this.config.timeout);
    const deadline = Date.now() + seconds * 1000;
    if (!this.config.pollOnly) {
      const [done, token] = await this.watch(action, challenge.authReqId, deadline);
      if (done) return [token, "watch"];
    }
    return [await this.poll(action, challenge.authReqId, challenge.interval || 5, deadline), "poll"];
  }

  /** Streams WatchStepUp. [true, token] on APPROVED, [true, ""] on
   * DENIED/EXPIRED/REDEEMED, [false, ""] when the stream failed or ended
   * early, so the caller falls back to polling. */
  private async watch(action: string, authReqId: string, deadline: number): Promise<[boolean, string]> {
    let announced = false;
    try {
      const stream = this.stepUps.watchStepUp(
        WatchStepUpRequest.fromPartial({ authReqId, heartbeatIntervalSeconds: 5 }),
        await this.session.metadata(),
        { deadline },
      );
      for await (const message of stream) {
        const status = message.status;
        if (!status) continue; // heartbeat
        const state = stepUpStateToJSON(status.state);
        if (status.state === StepUpState.STEP_UP_STATE_PENDING) {
          if (!announced) {
            say("STEP_UP", action, "watching", `state=${state}`);
            announced = true;
          } else {
            say("STEP_UP", action, "progress", `approvals=${status.approvalsReceived}/${status.approvalsRequired}`);
          }
          continue;
        }
        if (status.state === StepUpState.STEP_UP_STATE_APPROVED) return [true, status.accessToken];
        say("STEP_UP", action, "ended", `state=${state}`, `ciba_error=${status.cibaError || "-"}`);
        return [true, ""];
      }
    } catch (err) {
      if (!isServiceError(err)) throw err;
      const { reason } = errorInfo(err);
      say("STEP_UP", action, "watch-failed", `code=${codeName(err.code)}`, `reason=${reason || "-"}`, "fallback=poll");
      return [false, ""];
    }
    say("STEP_UP", action, "watch-ended-early", "fallback=poll");
    return [false, ""];
  }

  /** CIBA poll mode: PollStepUp every `interval` seconds, slower on
   * slow_down; the token, or "" when denied, expired or timed out. */
  private async poll(action: string, authReqId: string, interval: number, deadline: number): Promise<string> {
    say("STEP_UP", action, "polling", `interval=${interval}`);
    const request = PollStepUpRequest.fromPartial({ authReqId });
    while (Date.now() < deadline) {
      await sleep(interval);
      try {
        const response = await unary(this.stepUps.pollStepUp.bind(this.stepUps), request, await this.session.metadata());
        return response.accessToken;
      } catch (err) {
        if (!isServiceError(err)) throw err;
        const { reason, metadata } = errorInfo(err);
        if (reason === reasonName(ErrorReason.ERROR_REASON_AUTHORIZATION_PENDING)) {
          interval = Number(metadata.interval ?? interval);
        } else if (reason === reasonName(ErrorReason.ERROR_REASON_SLOW_DOWN)) {
          interval = Number(metadata.interval ?? interval + 5);
          say("STEP_UP", action, "slow_down", `interval=${interval}`);
        } else if (err.code === Code.UNAVAILABLE || err.code === Code.DEADLINE_EXCEEDED) {
          continue; // transient: try again after the interval
        } else {
          // ACCESS_DENIED, EXPIRED_TOKEN, INVALID_GRANT, …
          say("STEP_UP", action, "poll-ended", `reason=${reason || codeName(err.code)}`);
          return "";
        }
      }
    }
    say("STEP_UP", action, "timed-out");
    return "";
  }

  /** Presents `token` to the resource server; prints `line` with the
   * answer. True when it was accepted for this agent. */
  private async use(action: string, token: string, line: string): Promise<boolean> {
    const answer = await fetch(`${this.resourceUrl}/actions/${encodeURIComponent(action)}`, {
      headers: { authorization: `Bearer ${token}` },
      signal: AbortSignal.timeout(10_000),
    });
    const body = (await answer.json()) as { claims?: { sub?: string }; detail?: string };
    const sub = body.claims?.sub ?? "";
    say(line, `resource=${answer.status}`, `sub=${sub || body.detail || "-"}`);
    return answer.status === 200 && sub === this.config.clientId;
  }
}

async function main(): Promise<number> {
  const config = parseArgs(process.argv.slice(2));
  let resourceUrl = config.resourceUrl;
  let server: Awaited<ReturnType<typeof resourceServer.start>> | undefined;
  if (!resourceUrl) {
    const verifier = new resourceServer.TokenVerifier(config.issuer, config.receivingTenant, config.jwksUrl);
    server = await resourceServer.start(verifier);
    resourceUrl = resourceServer.url(server);
  }
  const agent = new Agent(config, resourceUrl);
  let failures = 0;
  for (const [action, expected] of config.expect) {
    const got = await agent.run(action);
    if (got !== expected) {
      failures++;
      say("MISMATCH", action, `expected=${expected}`, `got=${got}`);
    }
  }
  say("RESULT", failures === 0 ? "ok" : "FAILED", `${config.expect.length - failures}/${config.expect.length}`);
  server?.close();
  return failures === 0 ? 0 : 1;
}

main().then(
  (code) => process.exit(code),
  (err) => {
    console.error(err);
    process.exit(1);
  },
);
