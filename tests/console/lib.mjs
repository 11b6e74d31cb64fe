// Shared by the console's browser tests (scenarios.mjs) and the screenshots
// script: the browser, sign-in, the accessibility check, the Python example
// agent as a child process, and a hand-made gRPC-Web call.
import { spawn } from "node:child_process";
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

export const ROOT = join(dirname(fileURLToPath(import.meta.url)), "..", "..");
export const CHROMIUM = process.env.VAULTGUARD_CHROMIUM ?? "/usr/bin/chromium";

const require = createRequire(import.meta.url);
const AXE_SOURCE = readFileSync(require.resolve("axe-core/axe.min.js"), "utf8");

/** launch starts the one headless Chromium of a run (Debian's package). */
export function launch() {
  return chromium.launch({ executablePath: CHROMIUM, headless: true });
}

/** tid is the CSS selector of a data-testid. */
export function tid(id, extra = "") {
  return `[data-testid="${id}"]${extra}`;
}

export class Failure extends Error {}

export function check(condition, message) {
  if (!condition) throw new Failure(message);
}

/**
 * newPage opens a page in a fresh context (its own cookies: one person) and
 * records what would show a defect: JavaScript dialogs (an executed
 * `alert`), uncaught errors, and CSP violations reported on the console.
 */
export async function newPage(browser, options = {}) {
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 }, ...options });
  // Fail fast: every step here takes well under a second on a quiet machine.
  context.setDefaultTimeout(10_000);
  const page = await context.newPage();
  page.dialogs = [];
  page.errors = [];
  page.on("dialog", (dialog) => {
    page.dialogs.push(`${dialog.type()}: ${dialog.message()}`);
    void dialog.dismiss();
  });
  page.on("pageerror", (err) => page.errors.push(String(err)));
  // The last navigations, for a failure's message.
  page.trail = [];
  page.on("response", (res) => {
    if (res.request().isNavigationRequest()) page.trail = [...page.trail.slice(-7), `${res.status()} ${res.url()}`];
  });
  page.on("requestfailed", (req) => {
    page.trail = [...page.trail.slice(-7), `failed (${req.failure()?.errorText}) ${req.url()}`];
  });
  page.on("console", (msg) => {
    if (msg.type() === "error" && /Content Security Policy/i.test(msg.text())) page.errors.push(msg.text());
  });
  return page;
}

/**
 * signInWithIssuer signs in on the console's sign-in page through the OIDC
 * issuer's login page: the sign-in button, the provider's form, back to the
 * console. Returns when the shell shows who is signed in.
 */
export async function signInWithIssuer(page, base, user) {
  try {
    await page.goto(`${base}/console/`);
    await page.locator(tid("signin-issuer")).first().click();
    await page.locator("#username").fill(user.username);
    await page.locator("#password").fill(user.password);
    await page.locator("#login-submit").click();
    await page.waitForURL((url) => url.href.startsWith(`${base}/console/`), { timeout: 10_000 });
    await page.locator(tid("whoami")).waitFor({ timeout: 10_000 });
  } catch (err) {
    const body = (await page.locator("body").innerText().catch(() => "")).slice(0, 400);
    throw new Failure(
      `signing in ${user.username} through the issuer failed at ${page.url()}: ${err.message.split("\n")[0]}\n` +
        `  navigations:\n    ${page.trail.join("\n    ")}\n  page says: ${body}`,
    );
  }
}

/**
 * axeCheck runs axe-core on the page as it is and fails on any serious or
 * critical violation. The script is evaluated through the DevTools protocol,
 * so the console's CSP (no inline script) stays on.
 */
export async function axeCheck(page, label) {
  await page.evaluate(AXE_SOURCE);
  const violations = await page.evaluate(async () => {
    const result = await globalThis.axe.run(document, { resultTypes: ["violations"] });
    return result.violations.map((v) => ({
      id: v.id,
      impact: v.impact,
      help: v.help,
      nodes: v.nodes.slice(0, 3).map((n) => n.target.join(" ")),
    }));
  });
  const bad = violations.filter((v) => v.impact === "serious" || v.impact === "critical");
  check(
    bad.length === 0,
    `${label}: ${bad.length} serious or critical accessibility violations:\n` +
      bad.map((v) => `  [${v.impact}] ${v.id}: ${v.help} at ${v.nodes.join(", ")}`).join("\n"),
  );
  return violations.length;
}

/**
 * Agent is one run of the Python example agent (examples/python-agent):
 * its stdout lines as they come, and its exit.
 */
export class Agent {
  constructor(world, runId, action, bindingMessage) {
    const args = [
      join(ROOT, "examples/python-agent/agent.py"),
      "--server", world.grpc,
      "--client-id", world.agent.id,
      "--client-secret", world.agent.secret,
      "--receiving-tenant", world.receiving_tenant,
      "--issuer", world.token_issuer,
      "--jwks-url", `${world.base}/.well-known/jwks.json`,
      "--run-id", runId,
      "--expect", `${action}=STEP_UP`,
      "--timeout", "60",
    ];
    if (bindingMessage !== undefined) args.push("--binding-message", bindingMessage);
    this.shown = `agent ${runId} ${action}`;
    this.lines = [];
    this.stderr = "";
    this.waiters = [];
    this.child = spawn("python3", args, {
      cwd: ROOT,
      env: { ...process.env, VG_STUBS_DIR: world.stubs_dir },
      stdio: ["ignore", "pipe", "pipe"],
    });
    this.child.stderr.on("data", (d) => (this.stderr += d));
    createInterface({ input: this.child.stdout }).on("line", (line) => {
      this.lines.push(line);
      this.waiters = this.waiters.filter((w) => !w(line));
    });
    this.exited = new Promise((resolve) => this.child.on("exit", (code) => resolve(code)));
  }

  /** line waits for a stdout line matching `pattern`; returns its match. */
  line(pattern, timeoutMs = 15_000) {
    const found = this.lines.map((l) => pattern.exec(l)).find(Boolean);
    if (found) return Promise.resolve(found);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(
        () => reject(new Failure(`${this.shown}: no line ${pattern} within ${timeoutMs} ms; it printed:\n${this.output()}`)),
        timeoutMs,
      );
      this.waiters.push((line) => {
        const m = pattern.exec(line);
        if (m) {
          clearTimeout(timer);
          resolve(m);
        }
        return Boolean(m);
      });
      void this.exited.then(() =>
        setTimeout(() => reject(new Failure(`${this.shown} exited without a line ${pattern}:\n${this.output()}`)), 50),
      );
    });
  }

  /** pending waits for the STEP_UP challenge; returns the step-up id. */
  async pending() {
    const [, stepUpId] = await this.line(/^STEP_UP \S+ pending step_up=(stp_\S+)/);
    return stepUpId;
  }

  async exit(timeoutMs = 15_000) {
    let timer;
    const code = await Promise.race([
      this.exited,
      new Promise((resolve) => (timer = setTimeout(() => resolve("timeout"), timeoutMs))),
    ]);
    clearTimeout(timer);
    check(code !== "timeout", `${this.shown} did not exit within ${timeoutMs} ms:\n${this.output()}`);
    return code;
  }

  output() {
    return `${this.lines.join("\n")}${this.stderr ? `\n--- stderr:\n${this.stderr}` : ""}`;
  }

  kill() {
    if (this.child.exitCode === null) this.child.kill();
  }
}

/**
 * grpcWebCall calls `/vaultguard.v1.<service>/<method>` from the page, the
 * way the console itself does (gRPC-Web, binary, same origin), with the
 * session's own access token (POST /console/api/token), bypassing the
 * app's UI: what anyone signed in could do from the devtools. `fields` are
 * the request's string fields by number. Returns the gRPC status code and
 * message (trailers-only answers carry them as headers, others in the
 * trailer frame).
 */
export async function grpcWebCall(page, service, method, fields) {
  return page.evaluate(
    async ({ service, method, fields }) => {
      const tokenAnswer = await fetch("/console/api/token", {
        method: "POST",
        headers: { "X-VaultGuard-CSRF": "1" },
        credentials: "same-origin",
      });
      if (!tokenAnswer.ok) return { error: `token: HTTP ${tokenAnswer.status}` };
      const { access_token: token } = await tokenAnswer.json();
      // Protobuf: each field a length-delimited string (wire type 2).
      const bytes = [];
      const varint = (n) => {
        while (n > 0x7f) {
          bytes.push((n & 0x7f) | 0x80);
          n >>>= 7;
        }
        bytes.push(n);
      };
      for (const [number, value] of Object.entries(fields)) {
        const data = new TextEncoder().encode(value);
        varint((Number(number) << 3) | 2);
        varint(data.length);
        bytes.push(...data);
      }
      const frame = new Uint8Array(5 + bytes.length);
      new DataView(frame.buffer).setUint32(1, bytes.length);
      frame.set(bytes, 5);
      const res = await fetch(`/vaultguard.v1.${service}/${method}`, {
        method: "POST",
        headers: {
          "content-type": "application/grpc-web+proto",
          "x-grpc-web": "1",
          authorization: `Bearer ${token}`,
        },
        body: frame,
      });
      let status = res.headers.get("grpc-status");
      let message = res.headers.get("grpc-message") ?? "";
      const body = new Uint8Array(await res.arrayBuffer());
      for (let at = 0; at + 5 <= body.length; ) {
        const length = new DataView(body.buffer, body.byteOffset + at + 1, 4).getUint32(0);
        if (body[at] & 0x80) {
          const trailers = new TextDecoder().decode(body.subarray(at + 5, at + 5 + length));
          for (const line of trailers.split("\r\n")) {
            const [name, ...rest] = line.split(":");
            const value = rest.join(":").trim();
            if (name.toLowerCase() === "grpc-status") status = value;
            if (name.toLowerCase() === "grpc-message") message = value;
          }
        }
        at += 5 + length;
      }
      return { http: res.status, status: status === null ? null : Number(status), message: decodeURIComponent(message) };
    },
    { service, method, fields },
  );
}
