// The console's end-to-end scenarios in one headless Chromium, against the
// real VaultGuard server, a real OpenID Provider (oidc-provider.mjs) and the
// Python example agent. tests/it/console_browser.rs sets up the world (the
// server, tenants, rules, the agent, the provider's users, a one-time link)
// and runs:
//
//   node tests/console/scenarios.mjs --world world.json [--only name,name]
//
// One line per scenario (`PASS <name> <ms>` or `FAIL <name>: <why>`), then
// `RESULT ok|FAILED <passed>/<total>`; exit status 0 only if all passed.
import { readFileSync } from "node:fs";
import { parseArgs } from "node:util";
import {
  Agent,
  Failure,
  axeCheck,
  check,
  grpcWebCall,
  launch,
  newPage,
  signInWithIssuer,
  tid,
} from "./lib.mjs";

const { values: args } = parseArgs({
  options: { world: { type: "string" }, only: { type: "string" } },
});
if (!args.world) {
  console.error("usage: node tests/console/scenarios.mjs --world world.json");
  process.exit(2);
}
/**
 * The world, as console_browser.rs writes it:
 *   base            VaultGuard's HTTP base (the console's origin)
 *   grpc            its gRPC address, host:port, for the agent
 *   token_issuer    its token issuer (the agent's resource server checks it)
 *   stubs_dir       the Python stubs (scripts/gen-stubs.sh)
 *   receiving_tenant, other_tenant   tnt_… ids
 *   agent           {id, secret}: an agent of a third tenant
 *   actions         {approve, deny, quorum, xss}: STEP_UP actions at the
 *                   receiving tenant; `quorum` needs two approvers
 *   users           {approver, approver2, auditor, other_approver, admin}:
 *                   {username, password} at the OpenID Provider
 *   link            a one-time sign-in link (approver of the receiving tenant)
 */
const world = JSON.parse(readFileSync(args.world, "utf8"));
const base = world.base;

/** focusedIs: whether the focused element (or its nearest ancestor with a
 * test id) carries `id`. */
async function focusedIs(page, id) {
  return page.evaluate((want) => {
    const el = document.activeElement;
    return !!el && !!el.closest(`[data-testid='${want}']`);
  }, id);
}

/** tabTo presses Tab until the element with test id `id` has focus. */
async function tabTo(page, id) {
  const seen = [];
  for (let i = 0; i < 40; i += 1) {
    if (await focusedIs(page, id)) return;
    await page.keyboard.press("Tab");
    seen.push(await page.evaluate(() => {
      const el = document.activeElement;
      return el ? `${el.tagName}[${el.getAttribute("data-testid") ?? ""}]` : "none";
    }));
  }
  throw new Failure(`Tab never reached ${id}; it went ${seen.slice(0, 16).join(" ")}`);
}

/** shoot saves a README picture of `page` when the world asks for them. */
async function shoot(page, name) {
  if (!world.screenshots) return;
  await page.waitForTimeout(300);
  const path = `${world.screenshots}/${name}.png`;
  await page.screenshot({ path, animations: "disabled", caret: "hide" });
  console.log(`SHOT ${path}`);
}
const only = args.only ? new Set(args.only.split(",")) : null;

const started = Date.now();
const browser = await launch();
const agents = [];
const pages = {};
/** Step-up ids the scenarios made, for the accessibility pass. */
const made = {};

function agent(runId, action, message) {
  const a = new Agent(world, runId, action, message);
  agents.push(a);
  return a;
}

/** person opens (once) a page signed in as `who` through the issuer. */
async function person(who) {
  if (!pages[who]) {
    const page = await newPage(browser);
    await signInWithIssuer(page, base, world.users[who]);
    pages[who] = page;
  }
  return pages[who];
}

function queueItem(id) {
  return tid("queue-item", `[data-step-up-id="${id}"]`);
}

/** openQueue shows the approvals page without reloading if already there. */
async function openQueue(page) {
  if (!new URL(page.url()).pathname.startsWith("/console/approvals")) {
    await page.locator(tid("nav-approvals")).click();
  } else if (new URL(page.url()).pathname !== "/console/approvals") {
    await page.keyboard.press("Escape");
  }
  await page.locator(tid("queue-count")).waitFor();
}

/** markNoReload sets a flag a reload or navigation would lose. */
async function markNoReload(page) {
  await page.evaluate(() => {
    globalThis.__vgNoReload = true;
  });
}

async function assertNoReload(page, label) {
  check(await page.evaluate(() => globalThis.__vgNoReload === true), `${label}: the page was reloaded`);
}

/** openRequest opens a queued request from the queue (a click, no reload). */
async function openRequest(page, id) {
  await page.locator(queueItem(id)).click();
  await page.locator(tid("step-up-detail", `[data-step-up-id="${id}"]`)).waitFor();
}

async function queueEmptied(page, id, label) {
  await page.locator(queueItem(id)).waitFor({ state: "detached", timeout: 5_000 });
  await openQueue(page);
  await page.locator(tid("queue-empty")).waitFor({ timeout: 5_000 });
  check((await page.locator(tid("queue-item")).count()) === 0, `${label}: the queue is not empty`);
  check(!/^\(\d+\)/.test(await page.title()), `${label}: the tab title still counts: ${await page.title()}`);
}

const scenarios = [
  [
    "approver-signs-in-with-oidc",
    async () => {
      const page = await newPage(browser);
      await page.goto(`${base}/console/`);
      await page.locator(tid("signin-page")).waitFor();
      await axeCheck(page, "sign-in page");
      await page.close();
      const alice = await person("approver");
      const whoami = await alice.locator(tid("whoami")).innerText();
      check(whoami.includes(world.users.approver.username), `whoami does not name the approver: ${whoami}`);
      check(new URL(alice.url()).pathname === "/console/approvals", `an approver starts at the queue, not ${alice.url()}`);
      // The other tenant's approver watches their own queue all along.
      const dave = await person("other_approver");
      await openQueue(dave);
    },
  ],
  [
    "step-up-appears-live-and-is-approved",
    async () => {
      const alice = await person("approver");
      const dave = await person("other_approver");
      await openQueue(alice);
      await markNoReload(alice);
      await markNoReload(dave);
      const a = agent("approve", world.actions.approve, "e2e: please approve the payment");
      const id = await a.pending();
      made.approved = id;
      const t0 = Date.now();
      await alice.locator(queueItem(id)).waitFor({ timeout: 1_000 });
      const shownMs = Date.now() - t0;
      await assertNoReload(alice, "queue");
      // While it is pending, the other tenant's approver's live queue gets
      // it within the same second, or never.
      const leaked = await dave
        .locator(queueItem(id))
        .waitFor({ timeout: 1_000 })
        .then(
          () => true,
          () => false,
        );
      check(!leaked, "another tenant's approver saw the request in their queue");
      check(/^\(\d+\) /.test(await alice.title()), `the tab title has no count: ${await alice.title()}`);
      await openRequest(alice, id);
      check(
        (await alice.locator(tid("binding-message")).innerText()) === "e2e: please approve the payment",
        "the binding message is not shown",
      );
      check((await alice.locator(tid("receiving-tenant")).innerText()).includes(world.receiving_tenant), "receiving tenant");
      check((await alice.locator(tid("requesting-agent")).innerText()).includes(world.agent.id), "requesting agent");
      await a.line(/^STEP_UP \S+ watching/);
      await alice.locator(tid("approve-button")).click();
      await alice.locator(tid("decision-result")).waitFor();
      await a.line(/^STEP_UP \S+ approved via=watch delegation=dlg_\S+ resource=200/);
      check((await a.exit()) === 0, `the agent did not exit 0:\n${a.output()}`);
      await queueEmptied(alice, id, "after approval");
      await assertNoReload(alice, "queue after approval");
      // Nor later, nor by its id.
      await assertNoReload(dave, "other tenant's queue");
      check((await dave.locator(queueItem(id)).count()) === 0, "another tenant's approver saw the request");
      await dave.goto(`${base}/console/approvals/${id}`);
      await dave.locator(tid("step-up-error")).waitFor();
      check((await dave.locator(tid("step-up-detail")).count()) === 0, "another tenant's approver opened the request");
      return `shown after ${shownMs} ms`;
    },
  ],
  [
    "deny-with-comment",
    async () => {
      const alice = await person("approver");
      await openQueue(alice);
      const a = agent("deny", world.actions.deny, "e2e: this one is denied");
      const id = await a.pending();
      made.denied = id;
      await alice.locator(queueItem(id)).waitFor({ timeout: 1_000 });
      // On a phone-sized screen (the list and a request are separate
      // screens there), with the keyboard only: Tab to Approvals, Enter, Tab
      // to the request, Enter, Tab to the comment, type, Tab to Deny, Enter.
      await alice.setViewportSize({ width: 390, height: 844 });
      await tabTo(alice, "nav-approvals");
      await alice.keyboard.press("Enter");
      await alice.locator(queueItem(id)).waitFor();
      await tabTo(alice, "queue-item");
      await alice.keyboard.press("Enter");
      await alice.locator(tid("step-up-detail")).waitFor();
      await a.line(/^STEP_UP \S+ watching/);
      await tabTo(alice, "decision-comment");
      await alice.keyboard.type("not this quarter");
      await tabTo(alice, "deny-button");
      await alice.keyboard.press("Enter");
      await alice.locator(tid("decision-result")).waitFor();
      const overflow = await alice.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
      check(overflow <= 0, `the page scrolls sideways on a phone by ${overflow}px`);
      await alice.setViewportSize({ width: 1280, height: 900 });
      await a.line(/^STEP_UP \S+ ended state=STEP_UP_STATE_DENIED/);
      check((await a.exit()) === 1, "the agent did not report its step-up refused");
      // The comment is the server's, not the page's memory: read it anew.
      await alice.reload();
      const final = await alice.locator(tid("step-up-final")).innerText();
      check(final.includes("not this quarter"), `the denial does not show the comment: ${final}`);
      check((await alice.locator(tid("step-up-state")).innerText()).toLowerCase().includes("denied"), "state");
      await queueEmptied(alice, id, "after denial");
    },
  ],
  [
    "quorum-of-two-needs-a-second-approver",
    async () => {
      const alice = await person("approver");
      const bob = await person("approver2");
      await openQueue(alice);
      await openQueue(bob);
      const a = agent("quorum", world.actions.quorum, "e2e: two approvers");
      const id = await a.pending();
      await alice.locator(queueItem(id)).waitFor({ timeout: 1_000 });
      await bob.locator(queueItem(id)).waitFor({ timeout: 1_000 });
      await shoot(alice, "queue");
      await openRequest(alice, id);
      await a.line(/^STEP_UP \S+ watching/);
      check((await alice.locator(tid("quorum")).innerText()).includes("0 of 2"), "quorum not 0 of 2");
      await shoot(alice, "request");
      await alice.locator(tid("approve-button")).click();
      const result = await alice.locator(tid("decision-result")).innerText();
      check(/1 of 2/.test(result), `the first approval does not say 1 of 2: ${result}`);
      await a.line(/^STEP_UP \S+ progress approvals=1\/2/);
      check(await alice.locator(tid("approve-button")).isDisabled(), "the first approver may approve twice");
      check(!a.lines.some((l) => / approved /.test(l)), "the agent got a token after one approval of two");
      await openRequest(bob, id);
      await bob.locator(tid("quorum")).filter({ hasText: world.users.approver.username }).waitFor();
      await bob.locator(tid("approve-button")).click();
      await bob.locator(tid("decision-result")).waitFor();
      await a.line(/^STEP_UP \S+ approved via=watch delegation=dlg_\S+ resource=200/);
      check((await a.exit()) === 0, `the agent did not exit 0:\n${a.output()}`);
      await queueEmptied(bob, id, "bob after quorum");
      await queueEmptied(alice, id, "alice after quorum");
    },
  ],
  [
    "xss-binding-message-is-inert-and-auditor-cannot-approve",
    async () => {
      const xss = "<img src=x onerror=alert(1)>";
      const alice = await person("approver");
      await openQueue(alice);
      const a = agent("xss", world.actions.xss, xss);
      const id = await a.pending();
      await alice.locator(queueItem(id)).waitFor({ timeout: 1_000 });
      await openRequest(alice, id);
      const shown = await alice.locator(tid("binding-message")).textContent();
      check(shown === xss, `the binding message is not shown as its characters: ${JSON.stringify(shown)}`);
      check((await alice.locator("img").count()) === 0, "an <img> element was created");
      await alice.waitForTimeout(300);
      check(alice.dialogs.length === 0, `a dialog fired: ${alice.dialogs.join("; ")}`);
      const hash = await alice.locator(tid("request-hash")).getAttribute("title");
      check(/^[0-9a-f]{64}$/.test(hash ?? ""), `no full request hash on the page: ${hash}`);

      // The auditor: no Approve button anywhere, and the server refuses the
      // call made by hand with the auditor's own session.
      const carol = await person("auditor");
      check((await carol.locator(tid("nav-approvals")).count()) === 0, "an auditor has the Approvals page");
      await carol.goto(`${base}/console/approvals/${id}`);
      await carol.locator(tid("whoami")).waitFor();
      await carol.waitForTimeout(300);
      check((await carol.locator(tid("approve-button")).count()) === 0, "an auditor sees an Approve button");
      const forced = await grpcWebCall(carol, "StepUpService", "ApproveStepUp", { 1: id, 2: hash });
      check(forced.status === 7, `the forced ApproveStepUp was not PERMISSION_DENIED: ${JSON.stringify(forced)}`);
      // Still pending: deny it (which also ends the agent).
      await alice.locator(tid("deny-button")).click();
      await alice.locator(tid("decision-result")).waitFor();
      await a.line(/^STEP_UP \S+ ended state=STEP_UP_STATE_DENIED/);
      await a.exit();
      check(!a.lines.some((l) => / approved /.test(l)), "the forced approval went through");
      check(alice.dialogs.length === 0 && carol.dialogs.length === 0, "a dialog fired");
      return `auditor's forced call: ${forced.status} ${forced.message}`;
    },
  ],
  [
    "one-time-link-signs-in-once",
    async () => {
      const first = await newPage(browser);
      await first.goto(world.link);
      await first.locator(tid("whoami")).waitFor({ timeout: 10_000 });
      check(!first.url().includes("#"), `the secret stayed in the address bar: ${first.url()}`);
      check(new URL(first.url()).pathname === "/console/approvals", `the link landed on ${first.url()}`);
      await first.context().close();
      const second = await newPage(browser);
      await second.goto(world.link);
      await second.locator(tid("link-status")).waitFor({ timeout: 10_000 });
      check((await second.locator(tid("whoami")).count()) === 0, "a used link signed in again");
      await axeCheck(second, "used link page");
      await second.context().close();
    },
  ],
  [
    "accessibility-of-every-page",
    async () => {
      const admin = await person("admin");
      const visited = [];
      const visit = async (path, ready) => {
        await admin.goto(`${base}/console${path}`);
        await admin.locator(ready).first().waitFor({ timeout: 10_000 });
        await admin.waitForTimeout(200);
        await axeCheck(admin, path);
        visited.push(path);
      };
      await visit("/approvals", tid("queue-count"));
      await visit(`/approvals/${made.approved}`, tid("step-up-detail"));
      await visit(`/approvals/${made.denied}`, tid("step-up-detail"));
      await visit("/delegations", tid("delegation-row"));
      await admin.locator(tid("delegation-row")).first().locator("a").first().click();
      await admin.locator(tid("delegation-detail")).waitFor();
      await axeCheck(admin, "a delegation");
      await visit("/graph", tid("trust-graph"));
      await shoot(admin, "trust-graph");
      await visit("/audit", tid("audit-row"));
      await shoot(admin, "audit");
      await visit("/admin/agents", tid("create-agent"));
      await visit("/admin/policies", tid("rule-row"));
      await visit("/admin/vault", "main h1");
      await visit("/admin/webhook", tid("webhook-url"));
      const carol = await person("auditor");
      await carol.goto(`${base}/console/audit`);
      await carol.locator(tid("audit-row")).first().waitFor();
      await axeCheck(carol, "/audit as an auditor");
      for (const page of [admin, carol]) check(page.errors.length === 0, `page errors: ${page.errors.join("; ")}`);
      return `${visited.length + 2} pages`;
    },
  ],
];

let passed = 0;
let total = 0;
for (const [name, run] of scenarios) {
  if (only && !only.has(name)) continue;
  total += 1;
  const t0 = Date.now();
  try {
    const note = await run();
    for (const page of Object.values(pages)) {
      check(page.dialogs.length === 0, `a dialog fired: ${page.dialogs.join("; ")}`);
      check(page.errors.length === 0, `page errors: ${page.errors.join("; ")}`);
    }
    passed += 1;
    console.log(`PASS ${name} ${Date.now() - t0}ms${note ? ` (${note})` : ""}`);
  } catch (err) {
    const why = err instanceof Failure ? err.message : (err?.stack ?? String(err));
    console.log(`FAIL ${name} ${Date.now() - t0}ms: ${why}`);
    for (const a of agents) a.kill();
  }
}
for (const a of agents) a.kill();
await browser.close();
console.log(`RESULT ${passed === total ? "ok" : "FAILED"} ${passed}/${total} in ${Date.now() - started}ms`);
process.exit(passed === total && total > 0 ? 0 : 1);
