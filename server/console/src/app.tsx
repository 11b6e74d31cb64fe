// The console's shell: boot (who is signed in), the role-aware navigation,
// the page for the current route, and the sign-in overlay over everything
// when the session ends mid-work (the pages stay mounted underneath, so
// their drafts survive).
import type { ComponentChildren } from "preact";
import { useEffect, useRef, useState } from "preact/hooks";
import { describe, type Problem } from "./errors";
import { href, navigate, onLinkClick, route } from "./router";
import { queue, startQueue, stopQueue } from "./queue";
import { announceSignedIn, isSignInPopup, loadMe, me, signInNeeded, signOut, type Me, type Role } from "./session";
import { useStore } from "./store";
import { pendingCount, useTitle } from "./title";
import { ErrorBanner, Loading } from "./components/ui";
import { LinkPage, SignInOverlay, SignInPage } from "./pages/signin";
import { ApprovalsPage } from "./pages/approvals";
import { DelegationsPage } from "./pages/delegations";
import { GraphPage } from "./pages/graph";
import { AuditPage } from "./pages/audit";
import { AgentsPage } from "./pages/agents";
import { PoliciesPage } from "./pages/policies";
import { VaultPage } from "./pages/vault";
import { WebhookPage } from "./pages/webhook";

interface NavItem {
  path: string;
  label: string;
  testid: string;
  roles: Role[];
  group?: "admin";
}

const NAV: NavItem[] = [
  { path: "/approvals", label: "Approvals", testid: "nav-approvals", roles: ["approver", "admin"] },
  { path: "/delegations", label: "Delegations", testid: "nav-delegations", roles: ["admin", "approver", "auditor"] },
  { path: "/graph", label: "Trust graph", testid: "nav-graph", roles: ["admin", "approver", "auditor"] },
  { path: "/audit", label: "Audit log", testid: "nav-audit", roles: ["admin", "auditor"] },
  { path: "/admin/agents", label: "Agents", testid: "nav-agents", roles: ["admin"], group: "admin" },
  { path: "/admin/policies", label: "Policies", testid: "nav-policies", roles: ["admin"], group: "admin" },
  { path: "/admin/vault", label: "Vault", testid: "nav-vault", roles: ["admin"], group: "admin" },
  { path: "/admin/webhook", label: "Approval webhook", testid: "nav-webhook", roles: ["admin"], group: "admin" },
];

export function allowed(who: Me, roles: Role[]): boolean {
  return who.roles.some((r) => roles.includes(r));
}

export function canApprove(who: Me): boolean {
  return allowed(who, ["approver", "admin"]);
}

/** homePath: approvers and admins start at the queue, auditors at the log. */
function homePath(who: Me): string {
  if (canApprove(who)) return "/approvals";
  if (who.roles.includes("auditor")) return "/audit";
  return "/delegations";
}

const roleLabel: Record<Role, string> = { admin: "Admin", approver: "Approver", auditor: "Auditor" };

function Nav(props: { who: Me; path: string; pending: number | null }) {
  const items = NAV.filter((n) => allowed(props.who, n.roles));
  const main = items.filter((n) => !n.group);
  const admin = items.filter((n) => n.group === "admin");
  const link = (n: NavItem) => {
    const active = props.path === n.path || props.path.startsWith(n.path + "/");
    return (
      <li key={n.path}>
        <a
          href={href(n.path)}
          onClick={onLinkClick}
          aria-current={active ? "page" : undefined}
          class={active ? "active" : undefined}
          data-testid={n.testid}
        >
          <span>{n.label}</span>
          {n.path === "/approvals" && props.pending ? (
            <span class="count" data-testid="nav-approvals-count">
              {props.pending}
              <span class="sr-only"> pending</span>
            </span>
          ) : null}
        </a>
      </li>
    );
  };
  return (
    <nav class="sidenav" aria-label="Console">
      <ul>{main.map(link)}</ul>
      {admin.length ? (
        <>
          <p class="nav-group" id="nav-admin">
            Admin
          </p>
          <ul aria-labelledby="nav-admin">{admin.map(link)}</ul>
        </>
      ) : null}
    </nav>
  );
}

function TopBar(props: { who: Me }) {
  const [busy, setBusy] = useState(false);
  return (
    <header class="topbar">
      <a class="brand" href={href("/")} onClick={onLinkClick}>
        <span class="brand-mark" aria-hidden="true" />
        VaultGuard
      </a>
      <div class="who" data-testid="whoami">
        <span class="tenant" title={props.who.tenantId}>
          {props.who.tenantName || props.who.tenantId}
        </span>
        <span class="subject">{props.who.subject}</span>
        <span class="roles">{props.who.roles.map((r) => roleLabel[r]).join(", ")}</span>
      </div>
      <button
        type="button"
        class="btn btn-ghost"
        disabled={busy}
        data-testid="sign-out"
        onClick={async () => {
          setBusy(true);
          await signOut().catch(() => undefined);
          setBusy(false);
        }}
      >
        Sign out
      </button>
    </header>
  );
}

function Forbidden() {
  useTitle("Not available");
  return (
    <div class="page">
      <h1>Not available for your role</h1>
      <p>Your roles don't include this page. The navigation shows what you can use.</p>
    </div>
  );
}

function NotFound() {
  useTitle("Not found");
  return (
    <div class="page">
      <h1>Page not found</h1>
      <p>
        <a href={href("/")} onClick={onLinkClick}>
          Go to the console's start page
        </a>
      </p>
    </div>
  );
}

function Page(props: { who: Me; parts: string[] }) {
  const [first, second, third] = props.parts;
  const gate = (roles: Role[], page: ComponentChildren) => (allowed(props.who, roles) ? page : <Forbidden />);
  switch (first) {
    case "approvals":
      return gate(["approver", "admin"], <ApprovalsPage id={second} />);
    case "delegations":
      return gate(["admin", "approver", "auditor"], <DelegationsPage id={second} />);
    case "graph":
      return gate(["admin", "approver", "auditor"], <GraphPage />);
    case "audit":
      return gate(["admin", "auditor"], <AuditPage />);
    case "admin":
      switch (second) {
        case "agents":
          return gate(["admin"], <AgentsPage />);
        case "policies":
          return gate(["admin"], <PoliciesPage ruleId={third} />);
        case "vault":
          return gate(["admin"], <VaultPage />);
        case "webhook":
          return gate(["admin"], <WebhookPage />);
        default:
          return <NotFound />;
      }
    default:
      return <NotFound />;
  }
}

function Shell(props: { who: Me }) {
  const r = useStore(route);
  const q = useStore(queue);
  const needSignIn = useStore(signInNeeded);
  const mainRef = useRef<HTMLElement>(null);
  const first = useRef(true);
  const approver = canApprove(props.who);

  useEffect(() => {
    if (approver) startQueue();
    else stopQueue();
  }, [approver]);
  useEffect(() => {
    pendingCount.set(approver && q.ready ? q.items.length : null);
  }, [approver, q.ready, q.items.length]);
  useEffect(() => {
    if (r.parts.length === 0) navigate(homePath(props.who), true);
  }, [r.path]);
  // Move focus to a new page (not on first load), so keyboard and
  // screen-reader users start at its top. Opening a request inside the
  // approvals page is not a new page: the queue keeps focus there.
  const pageKey = r.parts[0] === "approvals" ? "approvals" : r.parts.slice(0, 3).join("/");
  useEffect(() => {
    if (first.current) {
      first.current = false;
      return;
    }
    window.scrollTo(0, 0);
    mainRef.current?.focus({ preventScroll: true });
  }, [pageKey]);

  return (
    <>
      <a class="skip-link" href="#main">
        Skip to content
      </a>
      <TopBar who={props.who} />
      <div class="layout">
        <Nav who={props.who} path={r.path} pending={approver && q.ready ? q.items.length : null} />
        <main id="main" ref={mainRef} tabIndex={-1}>
          {r.parts.length === 0 ? <Loading /> : <Page who={props.who} parts={r.parts} />}
        </main>
      </div>
      {needSignIn ? <SignInOverlay /> : null}
    </>
  );
}

type Phase = { kind: "boot" } | { kind: "link" } | { kind: "signed-out"; notice?: string } | { kind: "error"; problem: Problem };

export function App() {
  const who = useStore(me);
  const [phase, setPhase] = useState<Phase>(() =>
    route.get().parts[0] === "link" ? { kind: "link" } : { kind: "boot" },
  );

  const boot = () => {
    setPhase({ kind: "boot" });
    loadMe().then(
      (m) => {
        if (!m) {
          setPhase({ kind: "signed-out" });
          return;
        }
        announceSignedIn();
        if (isSignInPopup()) {
          // The popup the overlay opened has landed back here signed in:
          // the opener carries on, this window's job is done.
          window.close();
        }
        me.set(m);
      },
      (err: unknown) => setPhase({ kind: "error", problem: describe(err) }),
    );
  };

  useEffect(() => {
    if (phase.kind === "boot") boot();
  }, []);

  // Signing out (or a failed boot) leaves the app for the sign-in page.
  const wasSignedIn = useRef(false);
  useEffect(() => {
    if (who) wasSignedIn.current = true;
    else if (wasSignedIn.current) {
      stopQueue();
      setPhase({ kind: "signed-out", notice: "You have signed out." });
    }
  }, [who]);

  if (phase.kind === "link") {
    return (
      <LinkPage
        onSignedIn={() => {
          navigate("/", true);
          boot();
        }}
      />
    );
  }
  if (who) return <Shell who={who} />;
  if (phase.kind === "signed-out") return <SignInPage notice={phase.notice} />;
  if (phase.kind === "error") {
    return (
      <main class="signin" id="main">
        <div class="signin-card">
          <h1>The console can't start</h1>
          <ErrorBanner problem={phase.problem} onRetry={boot} />
        </div>
      </main>
    );
  }
  return (
    <main class="signin" id="main">
      <Loading label="Starting the console…" />
    </main>
  );
}
