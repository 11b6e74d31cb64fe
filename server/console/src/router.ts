// Client-side routing under /console/ with the History API. The server
// answers index.html for every GET /console/<page> path that is not an
// asset, API or sign-in route, so a reload or a shared link lands on the
// same page.
import { Store } from "./store";

export const BASE = "/console";

export interface Route {
  /** path is the part after /console, always starting with "/". */
  path: string;
  /** parts are the path's non-empty segments. */
  parts: string[];
  query: URLSearchParams;
}

function current(): Route {
  let path = location.pathname.startsWith(BASE) ? location.pathname.slice(BASE.length) : location.pathname;
  if (!path.startsWith("/")) path = "/" + path;
  return { path, parts: path.split("/").filter(Boolean).map(decodeURIComponent), query: new URLSearchParams(location.search) };
}

export const route = new Store<Route>(current());

addEventListener("popstate", () => route.set(current()));

/** href turns an app path ("/audit") into a URL under /console. */
export function href(path: string): string {
  return BASE + (path.startsWith("/") ? path : "/" + path);
}

export function navigate(path: string, replace = false): void {
  const url = href(path);
  if (url === location.pathname + location.search) return;
  if (replace) history.replaceState(null, "", url);
  else history.pushState(null, "", url);
  route.set(current());
}

/**
 * onLinkClick makes a plain <a href> navigate inside the app while keeping
 * the browser's own behaviour for modified clicks (new tab, new window).
 */
export function onLinkClick(event: MouseEvent): void {
  if (event.defaultPrevented || event.button !== 0 || event.metaKey || event.ctrlKey || event.shiftKey || event.altKey) return;
  const anchor = (event.currentTarget as HTMLAnchorElement | null) ?? null;
  if (!anchor || anchor.target === "_blank") return;
  const url = new URL(anchor.href);
  if (url.origin !== location.origin || !url.pathname.startsWith(BASE)) return;
  event.preventDefault();
  navigate(url.pathname.slice(BASE.length) + url.search);
}
