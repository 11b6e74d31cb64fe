// A real OpenID Provider for the console's browser tests: node
// `oidc-provider` (a certified implementation) on 127.0.0.1, with a login
// page of its own that the tests fill in (username and password), users that
// carry `org_id` and `roles` claims, and one public client for the console.
//
//   node tests/console/oidc-provider.mjs [--port 0] [--host localhost] [--users users.json]
//
// It listens on the loopback addresses and prints `ISSUER http://<host>:<port>` on stdout
// once it does, and
// runs until killed. Users come from --users (a JSON array of {username,
// password, org_id, roles}) or OIDC_USERS (the same JSON), else two demo
// users.
//
// The client `vaultguard-console` is public (token_endpoint_auth_method
// none), so PKCE (S256) is required, and it is a native application whose
// redirect URI is `http://127.0.0.1/console/callback`: a loopback redirect
// URI that may carry any port (RFC 8252 section 7.3), so the test can start
// this provider before VaultGuard has a port. The scope `vaultguard` grants
// the claims `org_id` and `roles`, which go into the ID token
// (conformIdTokenClaims: false), where VaultGuard maps them.
//
// The issuer's host is `localhost` by default, so the provider is another
// site than a console on 127.0.0.1, as an organisation's identity provider
// is: the browser then applies the cross-site cookie rules (a SameSite=Strict
// cookie is not sent on the redirect back from the provider) that a
// same-site test provider would hide.
import { createServer } from "node:http";
import { generateKeyPairSync, randomBytes, timingSafeEqual } from "node:crypto";
import { readFileSync } from "node:fs";
import { parseArgs } from "node:util";
import Provider from "oidc-provider";

const { values: args } = parseArgs({
  options: {
    port: { type: "string", default: "0" },
    host: { type: "string", default: "localhost" },
    users: { type: "string" },
  },
});

export const CLIENT_ID = "vaultguard-console";

const users = JSON.parse(
  args.users
    ? readFileSync(args.users, "utf8")
    : (process.env.OIDC_USERS ??
        JSON.stringify([
          { username: "alice", password: "alice-password", org_id: "org_acme", roles: ["approver"] },
          { username: "carol", password: "carol-password", org_id: "org_acme", roles: ["auditor"] },
        ])),
);
const byName = new Map(users.map((u) => [u.username, u]));

function samePassword(a, b) {
  const x = Buffer.from(String(a));
  const y = Buffer.from(String(b));
  return x.length === y.length && timingSafeEqual(x, y);
}

function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

function loginPage(uid, clientName, error) {
  return `<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Sign in — Test SSO</title></head>
<body>
<main>
<h1>Test SSO</h1>
<p>Sign in to continue to ${escapeHtml(clientName)}.</p>
${error ? `<p role="alert" id="login-error">${escapeHtml(error)}</p>` : ""}
<form method="post" action="/interaction/${escapeHtml(uid)}/login" autocomplete="off">
<label for="username">Username</label>
<input id="username" name="username" required autofocus>
<label for="password">Password</label>
<input id="password" name="password" type="password" required>
<button type="submit" id="login-submit">Sign in</button>
</form>
</main>
</body></html>`;
}

async function readForm(req) {
  const chunks = [];
  let size = 0;
  for await (const chunk of req) {
    size += chunk.length;
    if (size > 16_384) throw new Error("form too large");
    chunks.push(chunk);
  }
  return new URLSearchParams(Buffer.concat(chunks).toString("utf8"));
}

const server = createServer();
await new Promise((resolve) => server.listen(Number(args.port), "127.0.0.1", resolve));
const port = server.address().port;
// The same port on ::1 too, where there is IPv6: a browser may try
// `localhost` as ::1 first.
const server6 = createServer();
await new Promise((resolve) => {
  server6.once("error", resolve);
  server6.listen(port, "::1", resolve);
});
const issuer = `http://${args.host}:${port}`;

const { privateKey } = generateKeyPairSync("rsa", { modulusLength: 2048 });
const signingKey = { ...privateKey.export({ format: "jwk" }), kid: "test-sso-1", use: "sig", alg: "RS256" };

const provider = new Provider(issuer, {
  clients: [
    {
      client_id: CLIENT_ID,
      client_name: "VaultGuard console",
      application_type: "native",
      token_endpoint_auth_method: "none",
      grant_types: ["authorization_code"],
      response_types: ["code"],
      redirect_uris: ["http://127.0.0.1/console/callback"],
    },
  ],
  jwks: { keys: [signingKey] },
  cookies: { keys: [randomBytes(32).toString("base64url")] },
  scopes: ["openid", "vaultguard"],
  claims: { openid: ["sub"], vaultguard: ["org_id", "roles"] },
  conformIdTokenClaims: false,
  pkce: { required: () => true },
  features: { devInteractions: { enabled: false } },
  interactions: { url: (_ctx, interaction) => `/interaction/${interaction.uid}` },
  async findAccount(_ctx, sub) {
    const user = byName.get(sub);
    if (!user) return undefined;
    return {
      accountId: sub,
      async claims() {
        return { sub, org_id: user.org_id, roles: user.roles };
      },
    };
  },
});
provider.on("server_error", (_ctx, err) => console.error("oidc-provider server_error:", err));

const callback = provider.callback();
async function handle(req, res) {
  const url = new URL(req.url, issuer);
  const match = /^\/interaction\/([\w-]+)(\/login)?$/.exec(url.pathname);
  if (!match) return callback(req, res);
  try {
    const details = await provider.interactionDetails(req, res);
    if (details.uid !== match[1]) throw new Error("interaction mismatch");
    const client = await provider.Client.find(details.params.client_id);
    const clientName = client?.clientName ?? details.params.client_id;
    res.setHeader("Cache-Control", "no-store");
    if (!match[2] && req.method === "GET") {
      res.setHeader("Content-Type", "text/html; charset=utf-8");
      return res.end(loginPage(details.uid, clientName, ""));
    }
    if (match[2] && req.method === "POST") {
      const form = await readForm(req);
      const user = byName.get(form.get("username") ?? "");
      if (!user || !samePassword(form.get("password") ?? "", user.password)) {
        res.statusCode = 401;
        res.setHeader("Content-Type", "text/html; charset=utf-8");
        return res.end(loginPage(details.uid, clientName, "Wrong username or password."));
      }
      // First-party client: the consent is given with the sign-in.
      const grant = details.grantId
        ? await provider.Grant.find(details.grantId)
        : new provider.Grant({ accountId: user.username, clientId: details.params.client_id });
      grant.addOIDCScope(String(details.params.scope ?? "openid"));
      const grantId = await grant.save();
      return provider.interactionFinished(
        req,
        res,
        { login: { accountId: user.username }, consent: { grantId } },
        { mergeWithLastSubmission: false },
      );
    }
    res.statusCode = 405;
    return res.end();
  } catch (err) {
    res.statusCode = 400;
    res.setHeader("Content-Type", "text/plain; charset=utf-8");
    return res.end(`interaction failed: ${err.message}`);
  }
}
server.on("request", handle);
server6.on("request", handle);

console.log(`ISSUER ${issuer}`);
for (const signal of ["SIGTERM", "SIGINT"]) process.on(signal, () => process.exit(0));
