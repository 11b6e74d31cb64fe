// A tiny resource server of the receiving tenant: it accepts a VaultGuard
// delegation token only after verifying it OFFLINE with `jose` and the JWKS
// VaultGuard publishes at `<issuer>/.well-known/jwks.json` (fetched once and
// cached; refetched when a token names an unknown `kid`, e.g. after a key
// rotation). It never calls VaultGuard's gRPC API.
//
//   GET /actions/<action>   Authorization: Bearer <delegation token>
//
// answers 200 with the verified claims when the token is a valid RFC 9068
// access token (`typ: at+jwt`) of the expected issuer, addressed to this
// tenant (`aud: urn:vaultguard:tenant:<tenant id>`), not expired, granting
// exactly <action>; 401 (bad or missing token) or 403 (another action)
// otherwise.
//
// Standalone: node dist/resource-server.js --tenant tnt_… [--issuer http://127.0.0.1:8080] [--port 8091]

import { createServer, type Server } from "node:http";
import type { AddressInfo } from "node:net";
import { createRemoteJWKSet, errors, jwtVerify, type JWTPayload } from "jose";

// The algorithms VaultGuard signs delegation tokens with (per tenant setting).
const ALGORITHMS = ["RS256", "ES256", "EdDSA"];
const REQUIRED_CLAIMS = ["iss", "sub", "aud", "exp", "nbf", "iat", "jti"];

export class TokenVerifier {
  readonly issuer: string;
  readonly audience: string;
  private readonly jwks: ReturnType<typeof createRemoteJWKSet>;

  constructor(issuer: string, tenantId: string, jwksUrl?: string) {
    this.issuer = issuer.replace(/\/+$/, "");
    this.audience = `urn:vaultguard:tenant:${tenantId}`;
    this.jwks = createRemoteJWKSet(new URL(jwksUrl || `${this.issuer}/.well-known/jwks.json`));
  }

  /** The verified claims; throws on any failed check. */
  async verify(token: string): Promise<JWTPayload> {
    const { payload } = await jwtVerify(token, this.jwks, {
      issuer: this.issuer,
      audience: this.audience,
      typ: "at+jwt",
      algorithms: ALGORITHMS,
      requiredClaims: REQUIRED_CLAIMS,
    });
    return payload;
  }
}

/** Starts the server on 127.0.0.1:`port` (0: any free port); resolves once listening. */
export function start(verifier: TokenVerifier, port = 0): Promise<Server> {
  const server = createServer(async (req, res) => {
    const reply = (status: number, body: object) => {
      res.writeHead(status, { "content-type": "application/json" });
      res.end(JSON.stringify(body));
    };
    const path = req.url ?? "";
    if (req.method !== "GET" || !path.startsWith("/actions/")) {
      return reply(404, { error: "not_found" });
    }
    const action = decodeURIComponent(path.slice("/actions/".length));
    const [scheme, token] = (req.headers.authorization ?? "").split(" ", 2);
    if (scheme?.toLowerCase() !== "bearer" || !token) {
      return reply(401, { error: "invalid_token", detail: "no bearer token" });
    }
    let claims: JWTPayload;
    try {
      claims = await verifier.verify(token);
    } catch (err) {
      const detail = err instanceof errors.JOSEError ? `${err.code}: ${err.message}` : String(err);
      return reply(401, { error: "invalid_token", detail });
    }
    if (claims.action !== action) {
      return reply(403, { error: "insufficient_scope", detail: `token grants ${String(claims.action)}` });
    }
    reply(200, { ok: true, action, claims });
  });
  return new Promise((resolve, reject) => {
    server.once("error", reject);
    server.listen(port, "127.0.0.1", () => resolve(server));
  });
}

export function url(server: Server): string {
  const { address, port } = server.address() as AddressInfo;
  return `http://${address}:${port}`;
}

if (require.main === module) {
  const arg = (name: string, fallback?: string) => {
    const at = process.argv.indexOf(`--${name}`);
    return at >= 0 ? process.argv[at + 1] : fallback;
  };
  const tenant = arg("tenant");
  if (!tenant) {
    console.error("usage: resource-server.js --tenant tnt_… [--issuer URL] [--jwks-url URL] [--port N]");
    process.exit(2);
  }
  const verifier = new TokenVerifier(arg("issuer", "http://127.0.0.1:8080")!, tenant, arg("jwks-url"));
  start(verifier, Number(arg("port", "8091"))).then((server) =>
    console.log(`resource server of ${tenant} on ${url(server)}`),
  );
}
