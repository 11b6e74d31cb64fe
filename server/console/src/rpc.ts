// gRPC-Web clients of VaultGuard's own services (Connect-ES), same origin.
// Every call carries the in-memory access token; a unary call the server
// refuses as UNAUTHENTICATED is retried once with a fresh token (which may
// wait for the person to sign in again). Streams reconnect on their own
// (see queue.ts, pages/audit.tsx) and call invalidate() themselves.
import { Code, ConnectError, createClient, type Interceptor } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { AgentService } from "../gen/vaultguard/v1/agent_service_pb";
import { AuditService } from "../gen/vaultguard/v1/audit_service_pb";
import { DelegationService } from "../gen/vaultguard/v1/delegation_service_pb";
import { PolicyService } from "../gen/vaultguard/v1/policy_service_pb";
import { StepUpService } from "../gen/vaultguard/v1/step_up_service_pb";
import { VaultService } from "../gen/vaultguard/v1/vault_service_pb";
import { accessToken, invalidate } from "./session";

const auth: Interceptor = (next) => async (req) => {
  const token = await accessToken();
  req.header.set("authorization", `Bearer ${token}`);
  if (req.stream) return next(req);
  try {
    return await next(req);
  } catch (err) {
    if (ConnectError.from(err).code !== Code.Unauthenticated) throw err;
    invalidate(token);
    req.header.set("authorization", `Bearer ${await accessToken()}`);
    return next(req);
  }
};

const transport = createGrpcWebTransport({
  baseUrl: location.origin,
  useBinaryFormat: true,
  interceptors: [auth],
});

export const stepUps = createClient(StepUpService, transport);
export const delegations = createClient(DelegationService, transport);
export const audit = createClient(AuditService, transport);
export const agents = createClient(AgentService, transport);
export const policies = createClient(PolicyService, transport);
export const vault = createClient(VaultService, transport);
