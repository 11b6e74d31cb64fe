// Screenshots of the console for the README: the approval queue, a request,
// the trust graph and the audit log, as PNGs.
//
//   node tests/console/screenshots.mjs --out docs/console [--base URL --link URL]
//
// Without --base it starts the console's mock server (server/console/dev,
// the sample tenant "Acme" and its neighbours) and signs in with its demo
// link, so the pictures are the same from one run to the next. With --base
// (a running VaultGuard) and --link (a one-time sign-in link from
// `vaultguard console-link`), it photographs that server instead.
import { spawn } from "node:child_process";
import { mkdirSync } from "node:fs";
import { createServer } from "node:net";
import { join, resolve } from "node:path";
import { parseArgs } from "node:util";
import { ROOT, launch, newPage, tid } from "./lib.mjs";

const { values: args } = parseArgs({
  options: {
    out: { type: "string", default: "docs/console" },
    base: { type: "string" },
    link: { type: "string" },
  },
});
const out = resolve(args.out);
mkdirSync(out, { recursive: true });

async function freePort() {
  const server = createServer();
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  const { port } = server.address();
  await new Promise((r) => server.close(r));
  return port;
}

let mock = null;
let base = args.base;
let link = args.link;
if (!base) {
  const port = await freePort();
  mock = spawn("node", [join(ROOT, "server/console/dev/serve.mjs"), "--port", String(port)], {
    cwd: ROOT,
    env: { ...process.env, MOCK_ROLES: "admin" },
    stdio: ["ignore", "pipe", "inherit"],
  });
  await new Promise((ok, fail) => {
    mock.stdout.on("data", (d) => String(d).includes("mock VaultGuard console") && ok());
    mock.on("exit", (code) => fail(new Error(`the mock server exited (${code})`)));
  });
  base = `http://127.0.0.1:${port}`;
  link = `${base}/console/link#demo`;
}
if (!link) throw new Error("--base needs --link (a one-time sign-in link)");

const browser = await launch();
try {
  const page = await newPage(browser, { viewport: { width: 1280, height: 800 }, deviceScaleFactor: 1, colorScheme: "light" });
  await page.goto(link);
  await page.locator(tid("whoami")).waitFor({ timeout: 10_000 });
  // Freeze the clock-driven parts (countdowns, "2 min ago") for the shot.
  const shot = async (name) => {
    await page.waitForTimeout(400);
    await page.screenshot({ path: join(out, `${name}.png`), animations: "disabled", caret: "hide" });
    console.log(join(args.out, `${name}.png`));
  };

  await page.goto(`${base}/console/approvals`);
  await page.locator(tid("queue-item")).first().waitFor();
  await shot("queue");

  await page.locator(tid("queue-item")).first().click();
  await page.locator(tid("step-up-detail")).waitFor();
  await shot("request");

  await page.locator(tid("nav-graph")).click();
  await page.locator(tid("graph-edge")).first().waitFor();
  await shot("trust-graph");

  await page.locator(tid("nav-audit")).click();
  await page.locator(tid("audit-row")).first().waitFor();
  await shot("audit");
} finally {
  await browser.close();
  mock?.kill();
}
