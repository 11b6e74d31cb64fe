// Sign-in: the configured OIDC issuers (GET /console/api/issuers), and how
// to get a one-time link when none is configured. The same options appear
// in the overlay shown when a session ends mid-work; there the issuer's
// sign-in opens in a popup so this page, and what was typed in it, stays.
import { useEffect, useRef, useState } from "preact/hooks";
import { describe, type Problem } from "../errors";
import {
  loadIssuers,
  loginUrl,
  openSignInPopup,
  recheck,
  redeemLink,
  type Issuer,
} from "../session";
import { ErrorBanner, Loading } from "../components/ui";
import { useTitle } from "../title";

function LinkHelp(props: { overlay: boolean }) {
  return (
    <div class="link-help" data-testid="signin-link-help">
      <h2 class="h3">One-time sign-in link</h2>
      <p>
        Without an identity provider, whoever runs VaultGuard can give you a link that signs you in once, within a
        few minutes:
      </p>
      <pre class="command">
        <code>vaultguard console-link --role approver --tenant &lt;tenant id&gt;</code>
      </pre>
      <p class="muted">
        {props.overlay
          ? "Open the new link in another tab of this browser. This page carries on by itself once you are signed in."
          : "Open the link in this browser. It works once; ask for a new one if it has expired."}
      </p>
    </div>
  );
}

function IssuerList(props: { overlay: boolean }) {
  const [issuers, setIssuers] = useState<Issuer[] | null>(null);
  const [problem, setProblem] = useState<Problem | null>(null);
  const [blocked, setBlocked] = useState<Issuer | null>(null);
  useEffect(() => {
    loadIssuers().then(setIssuers, (e: unknown) => setProblem(describe(e)));
  }, []);
  if (problem) return <ErrorBanner problem={problem} />;
  if (!issuers) return <Loading label="Loading sign-in options…" />;
  if (issuers.length === 0) {
    return <p class="muted">No identity provider is configured on this server.</p>;
  }
  return (
    <>
      <ul class="issuers" aria-label="Identity providers">
        {issuers.map((issuer) => (
          <li key={issuer.index}>
            <a
              class="btn btn-primary btn-block"
              href={loginUrl(issuer)}
              data-testid="signin-issuer"
              data-issuer-index={issuer.index}
              onClick={(e) => {
                if (!props.overlay) return;
                e.preventDefault();
                if (!openSignInPopup(issuer)) setBlocked(issuer);
              }}
            >
              Sign in with {issuer.name}
            </a>
          </li>
        ))}
      </ul>
      {blocked ? (
        <p class="banner banner-warn" role="alert">
          Your browser blocked the sign-in window.{" "}
          <a href={loginUrl(blocked)} target="_blank" rel="opener">
            Open the sign-in with {blocked.name} in a new tab
          </a>
          ; this page carries on once you are signed in.
        </p>
      ) : null}
    </>
  );
}

/** SignInPage is the full page shown when there is no session. */
export function SignInPage(props: { notice?: string }) {
  useTitle("Sign in");
  return (
    <main class="signin" id="main" data-testid="signin-page">
      <div class="signin-card">
        <p class="brand brand-large">
          <span class="brand-mark" aria-hidden="true" />
          VaultGuard
        </p>
        <h1>Sign in to the console</h1>
        {props.notice ? (
          <p class="banner banner-info" role="status">
            {props.notice}
          </p>
        ) : null}
        <IssuerList overlay={false} />
        <LinkHelp overlay={false} />
      </div>
    </main>
  );
}

/** SignInOverlay is shown over the app while the session has ended. */
export function SignInOverlay() {
  const ref = useRef<HTMLDialogElement>(null);
  const [checking, setChecking] = useState(false);
  const [notYet, setNotYet] = useState(false);
  useEffect(() => {
    const d = ref.current;
    if (d && !d.open) d.showModal();
    return () => {
      if (d?.open) d.close();
    };
  }, []);
  const check = async () => {
    setChecking(true);
    const ok = await recheck();
    setChecking(false);
    setNotYet(!ok);
  };
  return (
    <dialog
      ref={ref}
      class="dialog signin-overlay"
      aria-labelledby="signin-overlay-title"
      data-testid="signin-overlay"
      onCancel={(e) => e.preventDefault()}
    >
      <div class="dialog-body">
        <h2 id="signin-overlay-title">Your session has ended</h2>
        <p>
          Sign in again to carry on. Nothing you typed is lost: the console keeps it and retries what was waiting once
          you are back.
        </p>
        <IssuerList overlay={true} />
        <LinkHelp overlay={true} />
        <div class="dialog-actions">
          {notYet ? (
            <p class="muted" role="status">
              Not signed in yet.
            </p>
          ) : null}
          <button type="button" class="btn" onClick={check} disabled={checking} data-testid="signin-recheck">
            {checking ? "Checking…" : "I have signed in — continue"}
          </button>
        </div>
      </div>
    </dialog>
  );
}

let linkStarted = false;

/**
 * LinkPage is /console/link#<secret>: it takes the secret out of the
 * fragment (which never reaches a server log or a Referer), clears it from
 * the address bar and history at once, and trades it for a session.
 */
export function LinkPage(props: { onSignedIn: () => void }) {
  useTitle("Signing in");
  const [state, setState] = useState<"working" | "failed" | "missing" | "done">("working");
  useEffect(() => {
    if (linkStarted) return;
    linkStarted = true;
    const secret = decodeURIComponent(location.hash.replace(/^#/, ""));
    history.replaceState(null, "", location.pathname);
    if (!secret) {
      setState("missing");
      return;
    }
    redeemLink(secret).then(
      () => {
        setState("done");
        props.onSignedIn();
      },
      () => setState("failed"),
    );
  }, []);
  return (
    <main class="signin" id="main" data-testid="link-page">
      <div class="signin-card">
        <p class="brand brand-large">
          <span class="brand-mark" aria-hidden="true" />
          VaultGuard
        </p>
        {state === "working" || state === "done" ? (
          <>
            <h1>Signing you in…</h1>
            <Loading label="Checking the sign-in link…" />
          </>
        ) : (
          <>
            <h1>This sign-in link can't be used</h1>
            <p class="banner banner-bad" role="alert" data-testid="link-status">
              {state === "missing"
                ? "The link has no sign-in code. Copy the whole link, including the part after #."
                : "The link is invalid, was already used, or has expired. Each link works once, for a few minutes: ask for a new one."}
            </p>
            <IssuerList overlay={false} />
            <LinkHelp overlay={false} />
          </>
        )}
      </div>
    </main>
  );
}
