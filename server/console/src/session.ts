// The console's session, as the app sees it. The session secret lives only
// in the HttpOnly `vg_console` cookie, which the app never reads. The app
// asks POST /console/api/token (cookie + `X-VaultGuard-CSRF: 1`) for a
// short-lived VaultGuard access token, keeps it in this module's memory only
// (never localStorage or sessionStorage), sends it as `authorization:
// Bearer` on gRPC-Web calls and asks again before it expires. When the
// session has ended (401), calls wait while the sign-in overlay is shown,
// and go on once the person has signed in again (in a popup or another tab),
// so nothing typed is lost.
import { Store } from "./store";

export type Role = "admin" | "approver" | "auditor";

export interface Issuer {
  /** index is what /console/login?issuer= takes. */
  index: number;
  name: string;
}

export interface Me {
  tenantId: string;
  tenantName: string;
  subject: string;
  roles: Role[];
  expiresAt: Date | null;
}

const CSRF_HEADER = { "X-VaultGuard-CSRF": "1" };
const CHANNEL = "vaultguard-console";
/** POPUP_NAME is the window name of the sign-in popup opened by the overlay. */
export const POPUP_NAME = "vaultguard-signin";

/** me is the signed-in person, null before the first answer or when signed out. */
export const me = new Store<Me | null>(null);
/** signInNeeded is true while the session has ended and calls are waiting. */
export const signInNeeded = new Store<boolean>(false);

export class HttpError extends Error {
  constructor(readonly status: number, message: string) {
    super(message);
  }
}

function api(path: string, init: RequestInit = {}): Promise<Response> {
  return fetch(path, { credentials: "same-origin", cache: "no-store", redirect: "error", ...init });
}

function parseRoles(raw: unknown): Role[] {
  if (!Array.isArray(raw)) return [];
  const roles = new Set<Role>();
  for (const r of raw) {
    const name = String(r).toLowerCase().replace(/^role_/, "");
    if (name === "admin" || name === "approver" || name === "auditor") roles.add(name);
  }
  return [...roles];
}

function parseTime(raw: unknown): Date | null {
  if (typeof raw === "number") return new Date(raw * 1000);
  if (typeof raw === "string" && raw) {
    const d = new Date(raw);
    return Number.isNaN(d.getTime()) ? null : d;
  }
  return null;
}

/** loadMe reads GET /console/api/me; null when there is no session (401). */
export async function loadMe(): Promise<Me | null> {
  const res = await api("/console/api/me");
  if (res.status === 401) return null;
  if (!res.ok) throw new HttpError(res.status, `The server answered ${res.status} to /console/api/me.`);
  const body = (await res.json()) as Record<string, unknown>;
  return {
    tenantId: String(body["tenant_id"] ?? ""),
    tenantName: String(body["tenant_name"] ?? ""),
    subject: String(body["subject"] ?? ""),
    roles: parseRoles(body["roles"]),
    expiresAt: parseTime(body["expires_at"]),
  };
}

/** loadIssuers reads the public GET /console/api/issuers. */
export async function loadIssuers(): Promise<Issuer[]> {
  const res = await api("/console/api/issuers");
  if (!res.ok) throw new HttpError(res.status, `The server answered ${res.status} to /console/api/issuers.`);
  const body = (await res.json()) as unknown;
  const list = Array.isArray(body) ? body : ((body as Record<string, unknown>)?.["issuers"] ?? []);
  if (!Array.isArray(list)) return [];
  return list.map((item, i) => {
    const it = (item ?? {}) as Record<string, unknown>;
    const index = typeof it["index"] === "number" ? it["index"] : i;
    const name = String(it["display_name"] ?? it["name"] ?? `Identity provider ${index + 1}`);
    return { index, name };
  });
}

/** loginUrl is where the OIDC sign-in with one configured issuer starts. */
export function loginUrl(issuer: Issuer): string {
  return `/console/login?issuer=${encodeURIComponent(String(issuer.index))}`;
}

/**
 * redeemLink trades a one-time sign-in link's secret for a session
 * (POST /console/api/link); the server sets the cookie.
 */
export async function redeemLink(secret: string): Promise<void> {
  const res = await api("/console/api/link", {
    method: "POST",
    headers: { ...CSRF_HEADER, "Content-Type": "application/json" },
    body: JSON.stringify({ secret }),
  });
  if (!res.ok) throw new HttpError(res.status, "link refused");
  announceSignedIn();
}

export async function signOut(): Promise<void> {
  clearToken();
  try {
    await api("/console/api/logout", { method: "POST", headers: CSRF_HEADER });
  } finally {
    me.set(null);
  }
}

// ---- the access token ----------------------------------------------------

interface Token {
  value: string;
  /** expiresAt is Date.now() milliseconds. */
  expiresAt: number;
}

let token: Token | null = null;
let minting: Promise<string> | null = null;
let refreshTimer: ReturnType<typeof setTimeout> | undefined;
let waiters: Array<() => void> = [];

function clearToken(): void {
  token = null;
  clearTimeout(refreshTimer);
}

/**
 * accessToken answers a valid access token, minting one when there is none
 * or it expires within 30 s. While the session has ended it waits for the
 * person to sign in again.
 */
export function accessToken(): Promise<string> {
  if (token && token.expiresAt - 30_000 > Date.now()) return Promise.resolve(token.value);
  minting ??= mint().finally(() => {
    minting = null;
  });
  return minting;
}

/**
 * invalidate drops the token the server refused (UNAUTHENTICATED), so the
 * next call mints a new one; a newer token is kept.
 */
export function invalidate(refused: string): void {
  if (token?.value === refused) clearToken();
}

async function mint(): Promise<string> {
  for (;;) {
    const res = await api("/console/api/token", { method: "POST", headers: CSRF_HEADER });
    if (res.ok) {
      const body = (await res.json()) as Record<string, unknown>;
      const value = String(body["access_token"] ?? "");
      const lifetime = Number(body["expires_in"] ?? 0);
      if (!value || !(lifetime > 0)) throw new HttpError(500, "The token answer is malformed.");
      token = { value, expiresAt: Date.now() + lifetime * 1000 };
      clearTimeout(refreshTimer);
      // Ask again one minute before expiry (at least 5 s from now), so a
      // stream or a click never waits on a fresh token.
      refreshTimer = setTimeout(() => {
        token = null;
        void accessToken().catch(() => undefined);
      }, Math.max(5, lifetime - 60) * 1000);
      signInNeeded.set(false);
      return value;
    }
    if (res.status !== 401) throw new HttpError(res.status, `The server answered ${res.status} when asked for a token.`);
    clearToken();
    signInNeeded.set(true);
    await new Promise<void>((resolve) => waiters.push(resolve));
  }
}

/**
 * recheck is called when the person may have signed in again (the popup or
 * another tab said so, the window got focus, or they pressed "Continue"):
 * if the session is back, waiting calls go on; if another person signed in,
 * the console reloads so nothing of the previous identity stays on screen.
 */
export async function recheck(): Promise<boolean> {
  const next = await loadMe().catch(() => null);
  if (!next) return false;
  const prev = me.get();
  if (prev && (prev.tenantId !== next.tenantId || prev.subject !== next.subject)) {
    location.reload();
    return false;
  }
  me.set(next);
  const resume = waiters;
  waiters = [];
  for (const go of resume) go();
  if (resume.length === 0) signInNeeded.set(false);
  return true;
}

// ---- other windows -------------------------------------------------------

const channel = typeof BroadcastChannel === "function" ? new BroadcastChannel(CHANNEL) : null;

/** announceSignedIn tells the console's other windows that a session exists now. */
export function announceSignedIn(): void {
  channel?.postMessage({ type: "signed-in" });
}

channel?.addEventListener("message", (event: MessageEvent) => {
  const data = event.data as { type?: string } | null;
  if (data?.type === "signed-in" && signInNeeded.get()) void recheck();
});

addEventListener("focus", () => {
  if (signInNeeded.get()) void recheck();
});

setInterval(() => {
  if (signInNeeded.get()) void recheck();
}, 10_000);

/** openSignInPopup opens an issuer's sign-in in a popup, keeping this page. */
export function openSignInPopup(issuer: Issuer): boolean {
  const popup = window.open(loginUrl(issuer), POPUP_NAME, "popup,width=520,height=720");
  return popup !== null;
}

/**
 * isSignInPopup is true in the popup the overlay opened, once the sign-in
 * has landed back on /console/: it then tells the opener and closes.
 */
export function isSignInPopup(): boolean {
  return window.name === POPUP_NAME;
}
