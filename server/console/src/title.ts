// The document title: "(3) Approvals — VaultGuard", the count being the
// pending approvals of the live queue (for approvers and admins), on every
// page, so a person working in another tab sees new requests arrive.
import { useEffect } from "preact/hooks";
import { Store } from "./store";

export const pageName = new Store<string>("Console");
export const pendingCount = new Store<number | null>(null);

function render(): void {
  const n = pendingCount.get();
  document.title = `${n ? `(${n}) ` : ""}${pageName.get()} — VaultGuard`;
}

pageName.subscribe(render);
pendingCount.subscribe(render);

/** useTitle names the current page in the document title. */
export function useTitle(name: string): void {
  useEffect(() => {
    pageName.set(name);
  }, [name]);
}
